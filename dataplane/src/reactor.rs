//! The per-core readiness reactor: an edge-triggered epoll set driven by one task on
//! the core's glommio executor.
//!
//! Why not glommio's own socket path: each wait there is an io_uring poll whose
//! completion arrives by task-work signalling that interrupts the executor thread; on
//! the reference machine that halves throughput (33k req/s against nginx's 67k). Here
//! every socket is registered once, edge-triggered; connection tasks try the syscall
//! first and wait on their slot only on `EAGAIN`; the reactor task polls with a zero
//! timeout while there is work and, after a run of empty polls, parks in `epoll_wait`
//! for at most `park_max` (an eventfd in the same set wakes it for bridge messages).
//! See `docs/dataplane.md` for the design and its measurements.
//!
//! The reactor also keeps the core's timers: a coarse per-slot deadline (scanned every
//! [`DEADLINE_SCAN`]) for I/O timeouts, which costs one field write per operation, and a
//! small ordered map of sleepers for everything else.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::event::{eventfd, EventfdFlags};

/// How often slot deadlines are checked. I/O timeouts fire up to this much late.
pub const DEADLINE_SCAN: Duration = Duration::from_millis(50);

/// Empty zero-timeout polls in a row before the reactor starts to park.
const SPIN_POLLS: u32 = 32;

/// Token of the wake-up eventfd in the epoll set.
const WAKE_TOKEN: u64 = u64::MAX;

/// Readiness state of one registered file descriptor.
#[derive(Default)]
struct Slot {
    /// Bumped on every release so stale events for a reused index are ignored.
    generation: u32,
    /// Whether the slot is registered right now.
    in_use: bool,
    /// False only after a read returned `EAGAIN` (or a short read) with no edge since:
    /// then a read is known to block and the syscall is skipped.
    readable: bool,
    /// Same as `readable`, for writes.
    writable: bool,
    /// The peer closed its side (`EPOLLRDHUP`/`EPOLLHUP`/`EPOLLERR` seen): reads no
    /// longer block, and no further edge will come, so `readable` stays set.
    read_closed: bool,
    /// The connection failed or hung up entirely: writes no longer block either.
    write_closed: bool,
    /// The task waiting to read.
    read_waker: Option<Waker>,
    /// The task waiting to write.
    write_waker: Option<Waker>,
    /// When the current operation on this descriptor times out.
    deadline: Option<Instant>,
    /// Set by the deadline scan; waits on the slot then fail with `TimedOut`.
    timed_out: bool,
    /// A client connection waiting for its next request: drain closes it at once.
    idle: bool,
}

/// The per-core reactor. Lives in an `Rc`: it is per-core state and never crosses a
/// thread.
pub struct Reactor {
    /// The epoll set of every socket on this core.
    epoll: OwnedFd,
    /// Written by other threads (the bridge) to wake a parked reactor.
    wake_fd: Rc<OwnedFd>,
    /// Readiness slots, indexed by the low half of the epoll token.
    slots: RefCell<Vec<Slot>>,
    /// Indexes of released slots.
    free: RefCell<Vec<u32>>,
    /// Sleepers by (deadline, sequence).
    timers: RefCell<BTreeMap<(Instant, u64), Waker>>,
    /// Sequence for timer keys.
    timer_seq: Cell<u64>,
    /// Set when the wake fd fired; taken by the bridge task.
    woken: Cell<bool>,
    /// The task waiting for a wake-up (the core's bridge receiver).
    wake_waker: RefCell<Option<Waker>>,
    /// Longest park while idle.
    park_max: Duration,
    /// When slot deadlines were last scanned.
    last_scan: Cell<Instant>,
    /// Asked to stop (the core is exiting).
    stopped: Cell<bool>,
    /// The time at the last poll: deadlines are coarse (scanned every
    /// [`DEADLINE_SCAN`]), so operations read this instead of the clock.
    now: Cell<Instant>,
    /// Hooks run at every deadline scan (access-log flush, metrics publication).
    tick_hooks: RefCell<Vec<Box<dyn Fn()>>>,
}

/// A handle other threads use to wake the reactor.
#[derive(Clone)]
pub struct Waking {
    /// The reactor's eventfd.
    fd: Rc<OwnedFd>,
}

/// A thread-safe handle to a reactor's eventfd.
pub struct RemoteWaker {
    /// A duplicate of the reactor's eventfd, owned by the other thread.
    fd: OwnedFd,
}

impl RemoteWaker {
    /// Wakes the reactor (if parked) so it looks at its bridge channel.
    pub fn wake(&self) {
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }
}

impl Waking {
    /// A handle usable from another thread.
    pub fn remote(&self) -> std::io::Result<RemoteWaker> {
        Ok(RemoteWaker {
            fd: self.fd.try_clone()?,
        })
    }
}

impl Reactor {
    /// Creates the reactor for this core.
    pub fn new(park_max: Duration) -> std::io::Result<Rc<Self>> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let wake_fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        epoll::add(
            &epoll,
            &wake_fd,
            epoll::EventData::new_u64(WAKE_TOKEN),
            epoll::EventFlags::IN | epoll::EventFlags::ET,
        )?;
        Ok(Rc::new(Self {
            epoll,
            wake_fd: Rc::new(wake_fd),
            slots: RefCell::new(Vec::with_capacity(1024)),
            free: RefCell::new(Vec::new()),
            timers: RefCell::new(BTreeMap::new()),
            timer_seq: Cell::new(0),
            woken: Cell::new(false),
            wake_waker: RefCell::new(None),
            park_max,
            last_scan: Cell::new(Instant::now()),
            stopped: Cell::new(false),
            now: Cell::new(Instant::now()),
            tick_hooks: RefCell::new(Vec::new()),
        }))
    }

    /// The handle for waking this reactor from elsewhere.
    pub fn waking(&self) -> Waking {
        Waking {
            fd: self.wake_fd.clone(),
        }
    }

    /// Registers `fd` (edge-triggered, read and write) and returns its slot.
    pub fn register(self: &Rc<Self>, fd: BorrowedFd<'_>) -> std::io::Result<Registration> {
        let index = match self.free.borrow_mut().pop() {
            Some(i) => i,
            None => {
                let mut slots = self.slots.borrow_mut();
                slots.push(Slot::default());
                (slots.len() - 1) as u32
            }
        };
        let generation = {
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[index as usize];
            slot.in_use = true;
            slot.readable = true;
            slot.writable = true;
            slot.read_closed = false;
            slot.write_closed = false;
            slot.deadline = None;
            slot.timed_out = false;
            slot.idle = false;
            slot.generation
        };
        let token = (u64::from(generation) << 32) | u64::from(index);
        let flags = epoll::EventFlags::IN
            | epoll::EventFlags::OUT
            | epoll::EventFlags::RDHUP
            | epoll::EventFlags::ET;
        if let Err(e) = epoll::add(&self.epoll, fd, epoll::EventData::new_u64(token), flags) {
            self.release(index);
            return Err(e.into());
        }
        Ok(Registration {
            reactor: self.clone(),
            index,
        })
    }

    fn release(&self, index: u32) {
        let mut slots = self.slots.borrow_mut();
        let slot = &mut slots[index as usize];
        slot.in_use = false;
        slot.generation = slot.generation.wrapping_add(1);
        slot.read_waker = None;
        slot.write_waker = None;
        slot.deadline = None;
        slot.idle = false;
        drop(slots);
        self.free.borrow_mut().push(index);
    }

    /// Number of registered descriptors.
    pub fn registered(&self) -> usize {
        self.slots.borrow().len() - self.free.borrow().len()
    }

    /// Adds a hook run at every deadline scan (every [`DEADLINE_SCAN`]).
    pub fn on_tick(&self, hook: Box<dyn Fn()>) {
        self.tick_hooks.borrow_mut().push(hook);
    }

    /// The time of the last poll (at most one park interval old).
    pub fn now(&self) -> Instant {
        self.now.get()
    }

    /// Asks the reactor task to return.
    pub fn stop(&self) {
        self.stopped.set(true);
    }

    /// Times out every idle client connection now (used by drain).
    pub fn expire_idle(&self) {
        let mut slots = self.slots.borrow_mut();
        for slot in slots.iter_mut().filter(|s| s.in_use && s.idle) {
            slot.timed_out = true;
            wake_both(slot);
        }
    }

    /// Resolves when the wake eventfd has fired since the last call.
    pub fn woken(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.woken.replace(false) {
                Poll::Ready(())
            } else {
                *self.wake_waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }

    /// A future that completes at `deadline`.
    pub fn sleep_until(self: &Rc<Self>, deadline: Instant) -> Sleep {
        Sleep {
            reactor: self.clone(),
            deadline,
            key: None,
        }
    }

    /// A future that completes after `duration`.
    pub fn sleep(self: &Rc<Self>, duration: Duration) -> Sleep {
        self.sleep_until(Instant::now() + duration)
    }

    /// The reactor task: run it once per core with `glommio::spawn_local`.
    pub async fn run(self: Rc<Self>) {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(256);
        let mut empty_polls = 0u32;
        while !self.stopped.get() {
            let timeout = if empty_polls < SPIN_POLLS {
                Duration::ZERO
            } else {
                self.park_timeout()
            };
            let ready = self.poll_once(&mut events, timeout);
            if ready == 0 {
                empty_polls = empty_polls.saturating_add(1);
            } else {
                empty_polls = 0;
            }
            let now = Instant::now();
            self.now.set(now);
            self.fire_timers(now);
            if now.duration_since(self.last_scan.get()) >= DEADLINE_SCAN {
                self.last_scan.set(now);
                self.scan_deadlines(now);
                for hook in self.tick_hooks.borrow().iter() {
                    hook();
                }
            }
            // Let the tasks just woken run before the next poll.
            futures_lite::future::yield_now().await;
        }
    }

    fn park_timeout(&self) -> Duration {
        let now = Instant::now();
        let mut timeout = self.park_max;
        if let Some(((at, _), _)) = self.timers.borrow().first_key_value() {
            timeout = timeout.min(at.saturating_duration_since(now));
        }
        let scan_at = self.last_scan.get() + DEADLINE_SCAN;
        timeout.min(scan_at.saturating_duration_since(now))
    }

    /// One `epoll_wait`; wakes the tasks whose descriptors became ready.
    fn poll_once(&self, events: &mut Vec<epoll::Event>, timeout: Duration) -> usize {
        events.clear();
        let ts = rustix::event::Timespec {
            tv_sec: timeout.as_secs() as _,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        let n = match epoll::wait(
            &self.epoll,
            rustix::buffer::spare_capacity(events),
            Some(&ts),
        ) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => return 0,
            Err(e) => {
                tracing::error!(error = %e, "epoll_wait failed");
                return 0;
            }
        };
        let mut slots = self.slots.borrow_mut();
        for ev in events.iter() {
            let token = ev.data.u64();
            let flags = ev.flags;
            if token == WAKE_TOKEN {
                let mut buf = [0u8; 8];
                let _ = rustix::io::read(&*self.wake_fd, &mut buf);
                self.woken.set(true);
                if let Some(w) = self.wake_waker.borrow_mut().take() {
                    w.wake();
                }
                continue;
            }
            let index = (token & 0xffff_ffff) as usize;
            let generation = (token >> 32) as u32;
            let Some(slot) = slots.get_mut(index) else {
                continue;
            };
            if !slot.in_use || slot.generation != generation {
                continue;
            }
            use epoll::EventFlags as F;
            if flags.intersects(F::RDHUP | F::HUP | F::ERR) {
                slot.read_closed = true;
            }
            if flags.intersects(F::HUP | F::ERR) {
                slot.write_closed = true;
            }
            if flags.intersects(F::IN | F::RDHUP | F::HUP | F::ERR | F::PRI) {
                slot.readable = true;
                if let Some(w) = slot.read_waker.take() {
                    w.wake();
                }
            }
            if flags.intersects(F::OUT | F::HUP | F::ERR) {
                slot.writable = true;
                if let Some(w) = slot.write_waker.take() {
                    w.wake();
                }
            }
        }
        n
    }

    fn fire_timers(&self, now: Instant) {
        let mut timers = self.timers.borrow_mut();
        while let Some(entry) = timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            entry.remove().wake();
        }
    }

    fn scan_deadlines(&self, now: Instant) {
        let mut slots = self.slots.borrow_mut();
        for slot in slots.iter_mut() {
            if slot.in_use && !slot.timed_out && slot.deadline.is_some_and(|d| d <= now) {
                slot.timed_out = true;
                wake_both(slot);
            }
        }
    }
}

fn wake_both(slot: &mut Slot) {
    if let Some(w) = slot.read_waker.take() {
        w.wake();
    }
    if let Some(w) = slot.write_waker.take() {
        w.wake();
    }
}

/// Which way a descriptor is used.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Direction {
    /// Reading (and accepting).
    Read,
    /// Writing (and connecting).
    Write,
}

/// A registered descriptor's handle on its slot. Released on drop; the owner closes the
/// descriptor after this is dropped (closing removes it from the epoll set).
pub struct Registration {
    /// The reactor owning the slot.
    reactor: Rc<Reactor>,
    /// The slot index.
    index: u32,
}

impl Registration {
    fn with<R>(&self, f: impl FnOnce(&mut Slot) -> R) -> R {
        let mut slots = self.reactor.slots.borrow_mut();
        f(&mut slots[self.index as usize])
    }

    /// Whether an operation in `dir` may succeed without blocking.
    pub fn is_ready(&self, dir: Direction) -> bool {
        self.with(|s| match dir {
            Direction::Read => s.readable,
            Direction::Write => s.writable,
        })
    }

    /// Records that an operation in `dir` would block (got `EAGAIN` or a short count).
    /// Once the peer closed that side, nothing blocks any more and the flag stays.
    pub fn clear_ready(&self, dir: Direction) {
        self.with(|s| match dir {
            Direction::Read => s.readable = s.read_closed,
            Direction::Write => s.writable = s.write_closed,
        })
    }

    /// Waits for readiness in `dir`: `Ready(Ok)` when an edge arrived, `Ready(Err)` on
    /// timeout, `Pending` otherwise (the waker is kept).
    pub fn poll_ready(&self, cx: &mut Context<'_>, dir: Direction) -> Poll<std::io::Result<()>> {
        self.with(|s| {
            let ready = match dir {
                Direction::Read => s.readable,
                Direction::Write => s.writable,
            };
            if ready {
                return Poll::Ready(Ok(()));
            }
            if s.timed_out {
                return Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
            }
            let slot = match dir {
                Direction::Read => &mut s.read_waker,
                Direction::Write => &mut s.write_waker,
            };
            match slot {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *slot = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
    }

    /// Sets (or clears) the deadline of the current operation; clears a past timeout.
    pub fn set_deadline(&self, deadline: Option<Instant>) {
        self.with(|s| {
            s.deadline = deadline;
            s.timed_out = false;
        })
    }

    /// Marks the descriptor as an idle client connection (drain closes it at once).
    pub fn set_idle(&self, idle: bool) {
        self.with(|s| s.idle = idle)
    }

    /// Whether the deadline passed.
    pub fn timed_out(&self) -> bool {
        self.with(|s| s.timed_out)
    }

    /// The owning reactor.
    pub fn reactor(&self) -> &Rc<Reactor> {
        &self.reactor
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.reactor.release(self.index);
    }
}

/// A timer future from [`Reactor::sleep_until`].
pub struct Sleep {
    /// The reactor keeping the timer.
    reactor: Rc<Reactor>,
    /// When it fires.
    deadline: Instant,
    /// The key in the reactor's timer map, while registered.
    key: Option<(Instant, u64)>,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            if let Some(key) = self.key.take() {
                self.reactor.timers.borrow_mut().remove(&key);
            }
            return Poll::Ready(());
        }
        let key = match self.key {
            Some(k) => k,
            None => {
                let seq = self.reactor.timer_seq.get();
                self.reactor.timer_seq.set(seq + 1);
                let k = (self.deadline, seq);
                self.key = Some(k);
                k
            }
        };
        self.reactor
            .timers
            .borrow_mut()
            .insert(key, cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.reactor.timers.borrow_mut().remove(&key);
        }
    }
}

impl AsFd for Reactor {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}
