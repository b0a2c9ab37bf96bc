//! The relay on an edge-triggered epoll set, as the worker's reactor drives a tunnel:
//! every socket registered once (`IN | OUT | RDHUP | ET`), the syscall tried first,
//! a short read or write taken as "drained" (the next arrival is a new edge), so a
//! relayed message costs one `recv` and one `send`, with `epoll_wait` amortised over
//! whatever became ready meanwhile.

use std::os::fd::OwnedFd;

use rustix::event::epoll;
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags, Shutdown};

use crate::Route;

/// One side of a relayed connection.
struct Side {
    fd: OwnedFd,
    readable: bool,
    writable: bool,
    /// The peer's end of stream (or an error) was signalled: no further edge comes,
    /// so a short read must not mark the side drained.
    read_closed: bool,
}

/// A client and its upstream; direction `d` copies from `sides[d]` to `sides[1 - d]`.
struct Pair {
    generation: u32,
    sides: [Side; 2],
    bufs: [Vec<u8>; 2],
    /// Bytes of `bufs[d]` received and not yet sent: `start..end`.
    pending: [(usize, usize); 2],
}

/// Token bit marking a listener (its index in the low bits).
const LISTENER: u64 = 1 << 63;

fn token(slot: usize, generation: u32, side: usize) -> u64 {
    (u64::from(generation) << 32) | ((slot as u64) << 1) | side as u64
}

/// Runs the relay until a fatal error.
pub fn run(routes: Vec<Route>, buffer: usize) -> anyhow::Result<()> {
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    for (i, r) in routes.iter().enumerate() {
        epoll::add(
            &ep,
            &r.listener,
            epoll::EventData::new_u64(LISTENER | i as u64),
            epoll::EventFlags::IN | epoll::EventFlags::ET,
        )?;
    }
    crate::serving(&routes)?;
    let mut pairs: Vec<Option<Pair>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut generation = 0u32;
    let mut events: Vec<epoll::Event> = Vec::with_capacity(256);
    loop {
        events.clear();
        match epoll::wait(&ep, rustix::buffer::spare_capacity(&mut events), None) {
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        for ev in &events {
            let t = ev.data.u64();
            if t & LISTENER != 0 {
                let route = &routes[(t & !LISTENER) as usize];
                while let Ok((client, _)) = route.listener.accept() {
                    let Ok(upstream) = crate::connect(route.upstream) else {
                        continue;
                    };
                    if client.set_nodelay(true).is_err() || client.set_nonblocking(true).is_err() {
                        continue;
                    }
                    generation = generation.wrapping_add(1);
                    let slot = free.pop().unwrap_or_else(|| {
                        pairs.push(None);
                        pairs.len() - 1
                    });
                    let side = |fd: OwnedFd| Side {
                        fd,
                        readable: true,
                        writable: true,
                        read_closed: false,
                    };
                    let pair = Pair {
                        generation,
                        sides: [side(client.into()), side(upstream)],
                        bufs: [vec![0; buffer], vec![0; buffer]],
                        pending: [(0, 0); 2],
                    };
                    let flags = epoll::EventFlags::IN
                        | epoll::EventFlags::OUT
                        | epoll::EventFlags::RDHUP
                        | epoll::EventFlags::ET;
                    let ok = (0..2).all(|k| {
                        epoll::add(
                            &ep,
                            &pair.sides[k].fd,
                            epoll::EventData::new_u64(token(slot, generation, k)),
                            flags,
                        )
                        .is_ok()
                    });
                    if ok {
                        pairs[slot] = Some(pair);
                    } else {
                        free.push(slot);
                    }
                }
                continue;
            }
            let slot = ((t & 0xffff_ffff) >> 1) as usize;
            let k = (t & 1) as usize;
            let Some(Some(pair)) = pairs.get_mut(slot) else {
                continue;
            };
            if pair.generation != (t >> 32) as u32 {
                continue;
            }
            use epoll::EventFlags as F;
            let flags = ev.flags;
            if flags.intersects(F::IN | F::RDHUP | F::HUP | F::ERR) {
                pair.sides[k].readable = true;
            }
            if flags.intersects(F::RDHUP | F::HUP | F::ERR) {
                pair.sides[k].read_closed = true;
            }
            if flags.intersects(F::OUT | F::HUP | F::ERR) {
                pair.sides[k].writable = true;
            }
            if !pump(pair) {
                for s in &pair.sides {
                    let _ = rustix::net::shutdown(&s.fd, Shutdown::Both);
                }
                pairs[slot] = None;
                free.push(slot);
            }
        }
    }
}

/// Moves what can be moved in both directions; false when the pair is finished.
fn pump(pair: &mut Pair) -> bool {
    for d in 0..2 {
        loop {
            let (start, end) = pair.pending[d];
            if start < end {
                if !pair.sides[1 - d].writable {
                    break;
                }
                match rustix::net::send(
                    &pair.sides[1 - d].fd,
                    &pair.bufs[d][start..end],
                    SendFlags::NOSIGNAL,
                ) {
                    Ok(n) => {
                        pair.pending[d].0 += n;
                        if start + n < end {
                            pair.sides[1 - d].writable = false;
                            break;
                        }
                    }
                    Err(Errno::AGAIN) => {
                        pair.sides[1 - d].writable = false;
                        break;
                    }
                    Err(Errno::INTR) => {}
                    Err(_) => return false,
                }
                continue;
            }
            if !pair.sides[d].readable {
                break;
            }
            match rustix::net::recv(&pair.sides[d].fd, &mut pair.bufs[d][..], RecvFlags::empty()) {
                Ok((0, _)) => return false,
                Ok((n, _)) => {
                    if n < pair.bufs[d].len() && !pair.sides[d].read_closed {
                        pair.sides[d].readable = false;
                    }
                    pair.pending[d] = (0, n);
                }
                Err(Errno::AGAIN) => {
                    pair.sides[d].readable = false;
                    break;
                }
                Err(Errno::INTR) => {}
                Err(_) => return false,
            }
        }
    }
    true
}
