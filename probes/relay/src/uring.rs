//! The relay on an io_uring ring created with `SINGLE_ISSUER | DEFER_TASKRUN`: the
//! completions of a loop turn are handled, the sends and re-armed receives they call
//! for are queued, and the next turn submits them all and waits in one
//! `io_uring_enter` (with `DEFER_TASKRUN` the kernel runs the completions' task work
//! inside that call, not by interrupting the thread).
//!
//! Two ways to receive:
//! - **single-shot**: one `RECV` armed per direction into that direction's own buffer,
//!   re-armed after its data is sent (natural back-pressure: nothing is read while a
//!   send is pending);
//! - **multishot**: one multishot `RECV` per direction picking buffers from a
//!   provided-buffer ring shared by all connections; received buffers queue per
//!   direction and are sent in order, and a direction whose queue grows past
//!   [`MAX_QUEUED`] has its receive cancelled until the queue drains (back-pressure
//!   without a per-message re-arm).
//!
//! Every buffer the kernel may write into is owned by this module until the operation
//! that uses it has completed: a pair is freed only when no operation of it is in
//! flight, and the provided buffers live as long as the ring.

#![allow(unsafe_code)]

use std::alloc::Layout;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};

use anyhow::Context as _;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use rustix::net::Shutdown;

use crate::Route;

/// Submission queue entries (the completion queue is twice that by default).
const RING_ENTRIES: u32 = 4096;
/// Provided buffers in the multishot mode's buffer ring (a power of two).
const PROVIDED: u16 = 2048;
/// The provided-buffer group.
const GROUP: u16 = 0;
/// Received buffers queued on one direction before its receive is cancelled.
const MAX_QUEUED: usize = 8;

const TAG_ACCEPT: u64 = 0;
const TAG_RECV: u64 = 1;
const TAG_SEND: u64 = 2;
const TAG_CANCEL: u64 = 3;

fn user_data(tag: u64, slot: usize, dir: usize, generation: u32) -> u64 {
    (u64::from(generation) << 32) | ((slot as u64) << 3) | ((dir as u64) << 2) | tag
}

/// What is queued on one direction in the multishot mode: a provided buffer `bid`
/// holding `len` bytes of which `sent` have gone out.
struct Queued {
    bid: u16,
    len: usize,
    sent: usize,
}

/// One direction of a pair: from `fds[d]` to `fds[1 - d]`.
struct Direction {
    /// Single-shot mode: the direction's own buffer and its unsent `start..end`.
    buf: Box<[u8]>,
    pending: (usize, usize),
    /// Multishot mode: received buffers in order, the front one possibly being sent.
    queue: VecDeque<Queued>,
    /// A receive (single- or multishot) is in flight.
    receiving: bool,
    /// A send is in flight.
    sending: bool,
    /// Multishot mode: the receive was cancelled or ran out of buffers; re-arm it when
    /// the queue drains.
    rearm: bool,
    /// Multishot mode: the source closed; close the pair once the queue is sent.
    eof: bool,
}

struct Pair {
    generation: u32,
    fds: [OwnedFd; 2],
    dirs: [Direction; 2],
    /// Operations in flight whose last completion has not arrived.
    inflight: u32,
    closing: bool,
}

/// The provided-buffer ring of the multishot mode.
struct Provided {
    ring: *mut types::BufRingEntry,
    ring_layout: Layout,
    memory: Vec<u8>,
    size: usize,
    tail: u16,
}

impl Provided {
    fn new(uring: &IoUring, size: usize) -> anyhow::Result<Self> {
        let ring_layout = Layout::from_size_align(
            PROVIDED as usize * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )?;
        // SAFETY: the layout has a non-zero size.
        let ring = unsafe { std::alloc::alloc_zeroed(ring_layout) }.cast::<types::BufRingEntry>();
        anyhow::ensure!(!ring.is_null(), "cannot allocate the buffer ring");
        let mut p = Provided {
            ring,
            ring_layout,
            memory: vec![0; PROVIDED as usize * size],
            size,
            tail: 0,
        };
        // SAFETY: `ring` points to PROVIDED zeroed, page-aligned entries that live (in
        // `p`) until after the ring is dropped: `run` drops its `Provided` last.
        unsafe {
            uring
                .submitter()
                .register_buf_ring_with_flags(ring as u64, PROVIDED, GROUP, 0)?;
        }
        for bid in 0..PROVIDED {
            p.push(bid);
        }
        p.publish();
        Ok(p)
    }

    /// Hands buffer `bid` back to the kernel (visible after [`Provided::publish`]).
    fn push(&mut self, bid: u16) {
        let index = (self.tail & (PROVIDED - 1)) as usize;
        // SAFETY: `index` < PROVIDED, inside the allocation; the kernel reads entries
        // only up to the published tail, and this one is past it.
        let entry = unsafe { &mut *self.ring.add(index) };
        entry.set_addr(self.memory.as_ptr() as u64 + u64::from(bid) * self.size as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes the entries pushed since the last call.
    fn publish(&self) {
        // SAFETY: the tail field overlays the first entry's reserved field, which the
        // kernel reads as the tail; it is a u16 at a 2-aligned address inside the
        // allocation, and written only here.
        unsafe {
            let tail = types::BufRingEntry::tail(self.ring)
                .cast_mut()
                .cast::<u16>();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }

    fn bytes(&self, bid: u16, range: std::ops::Range<usize>) -> &[u8] {
        let start = bid as usize * self.size;
        &self.memory[start + range.start..start + range.end]
    }
}

impl Drop for Provided {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the ring that used it is gone.
        unsafe { std::alloc::dealloc(self.ring.cast(), self.ring_layout) }
    }
}

/// The ring and its connections.
struct Relay {
    ring: IoUring,
    pairs: Vec<Option<Pair>>,
    free: Vec<usize>,
    generation: u32,
    buffer: usize,
    multishot: bool,
}

impl Relay {
    /// Queues `entry`; submits what is queued first if the queue is full.
    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every buffer an entry points into is kept alive until its
            // completion: a pair's own buffers live until its `inflight` is zero,
            // provided buffers until the ring is gone.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                eprintln!("relay probe: submit failed: {e}");
            }
        }
    }

    fn arm_recv(&mut self, slot: usize, d: usize) {
        let Some(pair) = self.pairs[slot].as_mut() else {
            return;
        };
        let fd = types::Fd(pair.fds[d].as_raw_fd());
        let ud = user_data(TAG_RECV, slot, d, pair.generation);
        let entry = if self.multishot {
            opcode::RecvMulti::new(fd, GROUP).build()
        } else {
            let buf = &mut pair.dirs[d].buf;
            opcode::Recv::new(fd, buf.as_mut_ptr(), buf.len() as u32).build()
        };
        pair.dirs[d].receiving = true;
        pair.dirs[d].rearm = false;
        pair.inflight += 1;
        self.push(entry.user_data(ud));
    }

    fn send(&mut self, slot: usize, d: usize, bytes: *const u8, len: usize) {
        let Some(pair) = self.pairs[slot].as_mut() else {
            return;
        };
        let fd = types::Fd(pair.fds[1 - d].as_raw_fd());
        let ud = user_data(TAG_SEND, slot, d, pair.generation);
        pair.dirs[d].sending = true;
        pair.inflight += 1;
        let entry = opcode::Send::new(fd, bytes, len as u32)
            .flags(rustix::net::SendFlags::NOSIGNAL.bits() as i32)
            .build()
            .user_data(ud);
        self.push(entry);
    }

    fn close(&mut self, slot: usize) {
        if let Some(pair) = self.pairs[slot].as_mut() {
            if !pair.closing {
                pair.closing = true;
                // Pending receives complete (0 or an error) once both sides are shut.
                for fd in &pair.fds {
                    let _ = rustix::net::shutdown(fd, Shutdown::Both);
                }
            }
        }
    }

    /// Frees a closing pair once nothing of it is in flight.
    fn reap(&mut self, slot: usize, provided: &mut Option<Provided>) {
        let done = matches!(&self.pairs[slot], Some(p) if p.closing && p.inflight == 0);
        if done {
            if let (Some(pair), Some(pb)) = (self.pairs[slot].take(), provided.as_mut()) {
                for dir in &pair.dirs {
                    for q in &dir.queue {
                        pb.push(q.bid);
                    }
                }
            }
            self.pairs[slot] = None;
            self.free.push(slot);
        }
    }

    fn accept(&mut self, client: OwnedFd, upstream: std::net::SocketAddr) {
        let Ok(up) = crate::connect(upstream) else {
            return;
        };
        if rustix::net::sockopt::set_tcp_nodelay(&client, true).is_err() {
            return;
        }
        self.generation = self.generation.wrapping_add(1);
        let slot = self.free.pop().unwrap_or_else(|| {
            self.pairs.push(None);
            self.pairs.len() - 1
        });
        let dir = |buffer: usize, multishot: bool| Direction {
            buf: vec![0; if multishot { 0 } else { buffer }].into_boxed_slice(),
            pending: (0, 0),
            queue: VecDeque::new(),
            receiving: false,
            sending: false,
            rearm: false,
            eof: false,
        };
        self.pairs[slot] = Some(Pair {
            generation: self.generation,
            fds: [client, up],
            dirs: [
                dir(self.buffer, self.multishot),
                dir(self.buffer, self.multishot),
            ],
            inflight: 0,
            closing: false,
        });
        self.arm_recv(slot, 0);
        self.arm_recv(slot, 1);
    }

    /// Sends the front of direction `d`'s queue (multishot mode), if any.
    fn send_front(&mut self, slot: usize, d: usize, provided: &Provided) {
        let Some(pair) = self.pairs[slot].as_ref() else {
            return;
        };
        if let Some(q) = pair.dirs[d].queue.front() {
            let bytes = provided.bytes(q.bid, q.sent..q.len);
            let (ptr, len) = (bytes.as_ptr(), bytes.len());
            self.send(slot, d, ptr, len);
        }
    }

    fn on_recv(
        &mut self,
        slot: usize,
        d: usize,
        res: i32,
        flags: u32,
        provided: &mut Option<Provided>,
    ) {
        let Some(pair) = self.pairs[slot].as_mut() else {
            return;
        };
        let more = cqueue::more(flags);
        if !more {
            pair.inflight -= 1;
            pair.dirs[d].receiving = false;
        }
        if pair.closing {
            if let (Some(bid), Some(pb)) = (cqueue::buffer_select(flags), provided.as_mut()) {
                pb.push(bid);
            }
            return self.reap(slot, provided);
        }
        if res == -(rustix::io::Errno::NOBUFS.raw_os_error())
            || res == -(rustix::io::Errno::CANCELED.raw_os_error())
        {
            // Out of provided buffers, or cancelled for back-pressure: re-arm when
            // this direction's queue drains.
            pair.dirs[d].rearm = true;
            if pair.dirs[d].queue.is_empty() {
                self.arm_recv(slot, d);
            }
            return;
        }
        if res == 0 && (pair.dirs[d].sending || !pair.dirs[d].queue.is_empty()) {
            // End of stream behind data still queued (multishot receives run ahead of
            // the sends): close once it is out.
            pair.dirs[d].eof = true;
            return;
        }
        if res <= 0 {
            if let (Some(bid), Some(pb)) = (cqueue::buffer_select(flags), provided.as_mut()) {
                pb.push(bid);
            }
            self.close(slot);
            return self.reap(slot, provided);
        }
        let n = res as usize;
        match provided.as_mut() {
            None => {
                pair.dirs[d].pending = (0, n);
                let ptr = pair.dirs[d].buf.as_ptr();
                self.send(slot, d, ptr, n);
            }
            Some(pb) => {
                let Some(bid) = cqueue::buffer_select(flags) else {
                    self.close(slot);
                    return;
                };
                let dir = &mut pair.dirs[d];
                dir.queue.push_back(Queued {
                    bid,
                    len: n,
                    sent: 0,
                });
                if !more {
                    dir.rearm = true;
                } else if dir.queue.len() > MAX_QUEUED && dir.receiving {
                    let target = user_data(TAG_RECV, slot, d, pair.generation);
                    let ud = user_data(TAG_CANCEL, slot, d, pair.generation);
                    self.push(opcode::AsyncCancel::new(target).build().user_data(ud));
                }
                let pair = self.pairs[slot].as_ref().expect("present above");
                if !pair.dirs[d].sending {
                    let pb: &Provided = pb;
                    self.send_front(slot, d, pb);
                }
            }
        }
    }

    fn on_send(&mut self, slot: usize, d: usize, res: i32, provided: &mut Option<Provided>) {
        let Some(pair) = self.pairs[slot].as_mut() else {
            return;
        };
        pair.inflight -= 1;
        pair.dirs[d].sending = false;
        if pair.closing {
            return self.reap(slot, provided);
        }
        if res < 0 {
            self.close(slot);
            return self.reap(slot, provided);
        }
        let n = res as usize;
        match provided.as_mut() {
            None => {
                let dir = &mut pair.dirs[d];
                dir.pending.0 += n;
                if dir.pending.0 < dir.pending.1 {
                    let ptr = dir.buf[dir.pending.0..].as_ptr();
                    let len = dir.pending.1 - dir.pending.0;
                    self.send(slot, d, ptr, len);
                } else {
                    self.arm_recv(slot, d);
                }
            }
            Some(pb) => {
                let dir = &mut pair.dirs[d];
                let Some(front) = dir.queue.front_mut() else {
                    return;
                };
                front.sent += n;
                if front.sent >= front.len {
                    let bid = front.bid;
                    dir.queue.pop_front();
                    pb.push(bid);
                }
                let drained = dir.queue.is_empty();
                let rearm = dir.rearm && !dir.receiving && !dir.eof;
                let eof = dir.eof;
                let pb: &Provided = pb;
                if !drained {
                    self.send_front(slot, d, pb);
                } else if eof {
                    self.close(slot);
                    self.reap(slot, provided);
                } else if rearm {
                    self.arm_recv(slot, d);
                }
            }
        }
    }
}

/// Runs the relay until a fatal error.
pub fn run(routes: Vec<Route>, buffer: usize, multishot: bool) -> anyhow::Result<()> {
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .build(RING_ENTRIES)
        .context("cannot create an io_uring ring with SINGLE_ISSUER | DEFER_TASKRUN (kernel 6.1 or later, io_uring enabled)")?;
    let mut provided = if multishot {
        Some(Provided::new(&ring, buffer)?)
    } else {
        None
    };
    let mut relay = Relay {
        ring,
        pairs: Vec::new(),
        free: Vec::new(),
        generation: 0,
        buffer,
        multishot,
    };
    for (i, r) in routes.iter().enumerate() {
        let accept = opcode::AcceptMulti::new(types::Fd(r.listener.as_raw_fd()))
            .flags(libc_cloexec())
            .build()
            .user_data(user_data(TAG_ACCEPT, i, 0, 0));
        relay.push(accept);
    }
    crate::serving(&routes)?;
    let mut completions: Vec<(u64, i32, u32)> = Vec::with_capacity(RING_ENTRIES as usize);
    loop {
        match relay.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INTR.raw_os_error()) => {}
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) => {}
            Err(e) => return Err(e.into()),
        }
        completions.clear();
        completions.extend(
            relay
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(ud, res, flags) in &completions {
            let tag = ud & 3;
            let slot = ((ud & 0xffff_ffff) >> 3) as usize;
            let d = ((ud >> 2) & 1) as usize;
            if tag == TAG_ACCEPT {
                let route = &routes[slot];
                if res >= 0 {
                    // SAFETY: a successful accept's result is a new descriptor that
                    // nothing else owns.
                    let client = unsafe { OwnedFd::from_raw_fd(res) };
                    relay.accept(client, route.upstream);
                }
                if !cqueue::more(flags) {
                    let accept = opcode::AcceptMulti::new(types::Fd(route.listener.as_raw_fd()))
                        .flags(libc_cloexec())
                        .build()
                        .user_data(ud);
                    relay.push(accept);
                }
                continue;
            }
            let live =
                matches!(relay.pairs.get(slot), Some(Some(p)) if p.generation == (ud >> 32) as u32);
            if !live {
                continue;
            }
            match tag {
                TAG_RECV => relay.on_recv(slot, d, res, flags, &mut provided),
                TAG_SEND => relay.on_send(slot, d, res, &mut provided),
                _ => {} // TAG_CANCEL: its target's completion does the work
            }
        }
        if let Some(pb) = provided.as_ref() {
            pb.publish();
        }
    }
}

fn libc_cloexec() -> i32 {
    rustix::net::SocketFlags::CLOEXEC.bits() as i32
}
