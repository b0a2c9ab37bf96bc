//! The per-core readiness reactor: an edge-triggered epoll set driven by one task on
//! the core's glommio executor.
//!
//! Why not glommio's own socket path: each wait there is an io_uring poll whose
//! completion arrives by task-work signalling that interrupts the executor thread; on
//! the reference machine that halves throughput (33k req/s against nginx's 67k). Here
//! every socket joins the epoll set once, edge-triggered, and only when a task first
//! has to wait on it (a short-lived connection served without waiting never costs an
//! `epoll_ctl`); connection tasks try the syscall first and wait on their slot only on
//! `EAGAIN`; the reactor task polls with a zero timeout while the tasks it woke keep
//! running and, at the first empty poll with no other task runnable (or after a
//! configured run of them, `[reactor] spin_polls`), parks in `epoll_wait` until the
//! next deadline (an eventfd in the same set wakes it for bridge messages). See
//! `docs/dataplane.md` for the design and its measurements.
//!
//! **The one place a core sleeps.** The reactor task never returns `Pending` without
//! waking itself, so glommio always has it runnable and never parks in its own ring
//! (which has none of the core's wake-up sources armed; see "Lost wake-ups" in the
//! docs). The core thread therefore sleeps only inside this task's `epoll_wait`, and
//! only when a wake-up is armed for every way work can arrive: every socket a task
//! waits on is in the epoll set (a wait adds it first), so is the bridge's eventfd,
//! and the wait's timeout is the earliest of the sleepers, the slot deadlines and the
//! tick hooks' next due time. Tasks woken by
//! other tasks (not by the reactor) are seen through a per-thread poll counter bumped
//! by every task spawned with [`spawn`]: the reactor parks only after a yield during
//! which no other task ran, i.e. when the executor's queue held nothing but itself.
//!
//! The reactor also keeps the core's timers: a coarse per-slot deadline (scanned every
//! [`DEADLINE_SCAN`] while any is set) for I/O timeouts, which costs one field write per
//! operation, and a small ordered map of sleepers for everything else.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::event::{eventfd, EventfdFlags};

use crate::liveness::CoreLiveness;

/// How often slot deadlines are checked. I/O timeouts fire up to this much late.
pub const DEADLINE_SCAN: Duration = Duration::from_millis(50);

thread_local! {
    /// Polls of tasks spawned with [`spawn`] on this thread (wrapping).
    static TASK_POLLS: Cell<u64> = const { Cell::new(0) };
    /// Reads the task being polled has begun in this poll ([`poll_read_turn`]).
    static READS_THIS_POLL: Cell<u32> = const { Cell::new(0) };
    /// Bytes the task being polled has read in this poll ([`read_bytes`]).
    static BYTES_THIS_POLL: Cell<usize> = const { Cell::new(0) };
}

/// How many reads a task may begin in one of its polls before it lets the core's
/// other tasks run. A relay whose source always has bytes and whose destination
/// always takes them never waits, so without a bound it would run in one poll for
/// as long as its peers keep up, and every other connection of the core would wait
/// for it: an HTTP/2 client flooding PINGs held one for the whole flood (20 s).
/// 64 reads of a relay's 64 KiB buffers would be 4 MiB: [`BYTES_PER_POLL`] ends
/// such a turn sooner. A small request takes two or three. A turn given up costs a yield and
/// the reactor's turn: an SSE relay fed without pause gives one up every 64 reads
/// (with 32 it cost 54 more user-space instructions an event in one callgrind run,
/// 405 against 459; with 64, none in another, 237 against 237).
pub const READS_PER_POLL: u32 = 64;

/// How many bytes a task may read in one of its polls before it lets the core's
/// other tasks run, whatever the count of reads. What a relay does with what it
/// reads grows with the bytes: a client flooding 7-byte WebSocket frames fills
/// every 64 KiB read with 9,000 frames to inspect, so 64 full reads were 4 MiB
/// and ~5 ms of one task, and another session's echo, which needs the core four
/// times, waited 16-26 ms behind it; with 1 MiB, 4-5 ms. 256 KiB gave 1-2 ms but
/// cost 1 MiB uploads 8 % in two harness runs (a yield every 256 KiB of a body);
/// 1 MiB cost them nothing measurable.
pub const BYTES_PER_POLL: usize = 1024 * 1024;

/// A task's turn on its core, taken before each read (every read of a
/// [`crate::io::TcpConn`] passes here): `Pending`, the task woken to run again
/// after the core's other tasks, once it has begun [`READS_PER_POLL`] reads or
/// read [`BYTES_PER_POLL`] bytes in this poll ([`counted`] starts each poll with
/// fresh counts; so does the yield). The bytes are charged once read, so the read
/// that crosses the bound completes (over TLS, with the records it took to find
/// plaintext) and the next one yields.
pub fn poll_read_turn(cx: &mut Context<'_>) -> Poll<()> {
    READS_THIS_POLL.with(|reads| {
        let n = reads.get();
        if n >= READS_PER_POLL || BYTES_THIS_POLL.with(Cell::get) >= BYTES_PER_POLL {
            reads.set(0);
            BYTES_THIS_POLL.with(|b| b.set(0));
            cx.waker().wake_by_ref();
            Poll::Pending
        } else {
            reads.set(n + 1);
            Poll::Ready(())
        }
    })
}

/// Charges `n` bytes read to the task being polled (its turn: [`poll_read_turn`]).
#[inline]
pub fn read_bytes(n: usize) {
    BYTES_THIS_POLL.with(|b| b.set(b.get().saturating_add(n)));
}

fn task_polls() -> u64 {
    TASK_POLLS.with(Cell::get)
}

/// Spawns a task on this core's executor whose polls the reactor can see: every task
/// of a core must be spawned this way (or be the reactor itself), so the reactor knows
/// when the executor has nothing else to run and may sleep.
pub fn spawn<F>(fut: F) -> glommio::Task<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    glommio::spawn_local(counted(fut))
}

/// Wraps `fut` so that each poll bumps this thread's task-poll counter.
pub fn counted<F: Future>(fut: F) -> Counted<F> {
    Counted { inner: fut }
}

pin_project_lite::pin_project! {
    /// A future whose every poll bumps this thread's task-poll counter and starts
    /// its task's read turn afresh ([`counted`]). A struct, not an `async fn`: an
    /// `async fn` keeps its argument and the pinned local it moves into side by
    /// side, so every task (an idle WebSocket session has three) took twice its
    /// future's size.
    pub struct Counted<F> {
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        TASK_POLLS.with(|p| p.set(p.get().wrapping_add(1)));
        // glommio polls a task it spawns at once, inside the spawning task's poll:
        // the spawner's turn goes on where it was once the new task's first poll
        // is over, and the new task does not start with what the spawner read.
        let reads = READS_THIS_POLL.with(|r| r.replace(0));
        let bytes = BYTES_THIS_POLL.with(|b| b.replace(0));
        let polled = self.project().inner.poll(cx);
        READS_THIS_POLL.with(|r| r.set(reads));
        BYTES_THIS_POLL.with(|b| b.set(bytes));
        polled
    }
}

/// Token of the wake-up eventfd in the epoll set.
const WAKE_TOKEN: u64 = u64::MAX;

/// Readiness state of one registered file descriptor.
#[derive(Default)]
struct Slot {
    /// Bumped on every release so stale events for a reused index are ignored.
    generation: u32,
    /// Whether the slot is registered right now.
    in_use: bool,
    /// Whether its descriptor is in the epoll set: added the first time a task has
    /// to wait on it, so a connection served without waiting never costs an
    /// `epoll_ctl` (nor the set's removal work when it closes).
    armed: bool,
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
    /// Its mark in the reactor's `reusable` queue while it may be closed to admit a
    /// new connection at the cap (0: it may not).
    reusable: u64,
    /// Closed to admit a new connection ([`Reactor::shed_reusable`]): its task is to
    /// close it even if bytes came in before it ran (a later deadline does not undo
    /// this, as it undoes `timed_out`).
    shed: bool,
    /// Its tunnel's circuit was removed, or no longer admits its client
    /// ([`Reactor::revoke`]): every wait on it fails at once, whatever deadline is
    /// set later, and the relays end at their next turn.
    revoked: bool,
    /// A client's connection ([`Registration::set_client`]): a drain's deadline cuts
    /// the apps' connections first ([`Reactor::revoke_apps`]), so that an answer to
    /// a client can still go out.
    client: bool,
}

impl Slot {
    /// Has `cx`'s task woken at the next edge in `dir` (a waker of the same task
    /// already there is kept, not cloned again).
    fn wake_on(&mut self, dir: Direction, cx: &Context<'_>) {
        let waker = match dir {
            Direction::Read => &mut self.read_waker,
            Direction::Write => &mut self.write_waker,
        };
        match waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => *waker = Some(cx.waker().clone()),
        }
    }
}

/// A registered descriptor's slot as it is now: its index and generation, so that a
/// key kept elsewhere never names the slot's next occupant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotKey {
    index: u32,
    generation: u32,
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
    /// Client connections that may be closed to admit a new one at the connection
    /// cap (nginx's reusable connections), oldest first: (slot, its mark). An entry
    /// whose slot no longer bears its mark (busy again, released, marked anew) is
    /// stale and passed over.
    reusable: RefCell<std::collections::VecDeque<(u32, u64)>>,
    /// Likewise, client connections whose request head (or TLS handshake) is under
    /// way but unfinished: closed only when `reusable` has none. A client pushing
    /// the core to its cap with connections that send nothing makes them close each
    /// other, not another client's head that is still coming in.
    unfinished: RefCell<std::collections::VecDeque<(u32, u64)>>,
    /// The last mark handed out.
    reuse_mark: Cell<u64>,
    /// Sleepers by (deadline, sequence).
    timers: RefCell<BTreeMap<(Instant, u64), Waker>>,
    /// Sequence for timer keys.
    timer_seq: Cell<u64>,
    /// Set when the wake fd fired; taken by the bridge task.
    woken: Cell<bool>,
    /// The task waiting for a wake-up (the core's bridge receiver).
    wake_waker: RefCell<Option<Waker>>,
    /// Empty zero-timeout polls in a row before the reactor may park.
    spin_polls: u32,
    /// Longest single park (`None`: until the next deadline or I/O).
    park_max: Option<Duration>,
    /// The earliest slot deadline set since the last scan (a lower bound on the
    /// next one that can fire).
    earliest_deadline: Cell<Option<Instant>>,
    /// When the tick hooks next need to run (`None`: not until there is activity).
    next_tick: Cell<Option<Instant>>,
    /// Tasks were woken (by I/O, the bridge or a timer) or ran since the last tick,
    /// or in the turn it ran in, before they ran: one more tick is due to publish
    /// what they did.
    active: Cell<bool>,
    /// What this core publishes for the admin thread.
    liveness: Arc<CoreLiveness>,
    /// When slot deadlines were last scanned.
    last_scan: Cell<Instant>,
    /// Asked to stop (the core is exiting).
    stopped: Cell<bool>,
    /// The time at the last poll: deadlines are coarse (scanned every
    /// [`DEADLINE_SCAN`]), so operations read this instead of the clock.
    now: Cell<Instant>,
    /// Hooks run at every tick (access-log flush, metrics publication); each says
    /// when it next needs one.
    tick_hooks: RefCell<Vec<TickHook>>,
}

/// A tick hook: runs at `now`, returns when it needs to run again (`None`: only
/// after new activity).
pub type TickHook = Box<dyn Fn(Instant) -> Option<Instant>>;

/// How the reactor spins and parks; the default never spins and parks until the next
/// deadline or I/O.
#[derive(Debug, Clone, Copy, Default)]
pub struct ParkPolicy {
    /// Empty zero-timeout polls in a row before it may park.
    pub spin_polls: u32,
    /// Longest single park (`None`: until the next deadline or I/O).
    pub park_max: Option<Duration>,
}

/// How long a park may last and still say that spinning would have paid: a budget of
/// 32 empty polls spins for ~15 µs (an empty turn — a zero-timeout
/// `epoll_wait` and a yield — measured ~0.45 µs), and a park's own sleep and wake-up
/// take ~15 µs of that wall time (`appproxy-bench park-cost`), so an arrival within
/// 50 µs of parking is one a full spin would about have caught.
const SPIN_PAYS: Duration = Duration::from_micros(50);

/// The spin budget: how many empty polls in a row the reactor spins through before
/// it parks. It adapts between 0 and the configured maximum so the reactor spins only
/// while work keeps arriving: a park that ended with I/O within [`SPIN_PAYS`] (a spin
/// would have caught it without a sleep and a wake-up) doubles it; any other park
/// (a long gap, a timer, or the thread kept off its CPU by another process, when
/// sleeping gives the scheduler's wake-up preference back) halves it. A spin that
/// ends with events leaves it as it is.
#[derive(Debug, Clone, Copy)]
struct Spin {
    /// The configured maximum.
    max: u32,
    /// The current budget.
    budget: u32,
}

impl Spin {
    fn new(max: u32) -> Self {
        Self { max, budget: max }
    }

    /// Empty polls allowed before the next park.
    fn budget(&self) -> u32 {
        self.budget
    }

    /// A park ended after `slept`; `io`: with events.
    fn parked(&mut self, slept: Duration, io: bool) {
        self.budget = if io && slept <= SPIN_PAYS {
            self.budget.saturating_mul(2).max(1).min(self.max)
        } else {
            self.budget / 2
        };
    }
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
    pub fn new(policy: ParkPolicy, liveness: Arc<CoreLiveness>) -> std::io::Result<Rc<Self>> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let wake_fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        epoll::add(
            &epoll,
            &wake_fd,
            epoll::EventData::new_u64(WAKE_TOKEN),
            epoll::EventFlags::IN | epoll::EventFlags::ET,
        )?;
        liveness.attach(epoll.try_clone()?, wake_fd.try_clone()?);
        Ok(Rc::new(Self {
            epoll,
            wake_fd: Rc::new(wake_fd),
            slots: RefCell::new(Vec::with_capacity(1024)),
            free: RefCell::new(Vec::new()),
            reusable: RefCell::new(std::collections::VecDeque::new()),
            unfinished: RefCell::new(std::collections::VecDeque::new()),
            reuse_mark: Cell::new(0),
            timers: RefCell::new(BTreeMap::new()),
            timer_seq: Cell::new(0),
            woken: Cell::new(false),
            wake_waker: RefCell::new(None),
            spin_polls: policy.spin_polls,
            park_max: policy.park_max,
            earliest_deadline: Cell::new(None),
            next_tick: Cell::new(None),
            active: Cell::new(false),
            liveness,
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

    /// Takes a slot for a descriptor. The descriptor joins the epoll set
    /// (edge-triggered, read and write) only when a task first has to wait on it
    /// ([`Registration::poll_ready`]): until then operations just try the syscall.
    pub fn register(self: &Rc<Self>) -> Registration {
        let index = match self.free.borrow_mut().pop() {
            Some(i) => i,
            None => {
                let mut slots = self.slots.borrow_mut();
                slots.push(Slot::default());
                (slots.len() - 1) as u32
            }
        };
        {
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[index as usize];
            slot.in_use = true;
            slot.armed = false;
            slot.readable = true;
            slot.writable = true;
            slot.read_closed = false;
            slot.write_closed = false;
            slot.deadline = None;
            slot.timed_out = false;
            slot.idle = false;
            slot.reusable = 0;
            slot.shed = false;
            slot.revoked = false;
            slot.client = false;
        }
        Registration {
            reactor: self.clone(),
            index,
        }
    }

    /// Adds `fd` to the epoll set under `slot`'s token. Adding reports the
    /// descriptor's current state as an event, so readiness that arrived between the
    /// `EAGAIN` that led here and this call is not lost.
    fn arm(&self, slot: &mut Slot, index: u32, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        let token = (u64::from(slot.generation) << 32) | u64::from(index);
        let flags = epoll::EventFlags::IN
            | epoll::EventFlags::OUT
            | epoll::EventFlags::RDHUP
            | epoll::EventFlags::ET;
        epoll::add(&self.epoll, fd, epoll::EventData::new_u64(token), flags)?;
        slot.armed = true;
        Ok(())
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
        slot.reusable = 0;
        slot.shed = false;
        slot.revoked = false;
        drop(slots);
        self.free.borrow_mut().push(index);
    }

    /// Number of registered descriptors.
    pub fn registered(&self) -> usize {
        self.slots.borrow().len() - self.free.borrow().len()
    }

    /// Adds a hook run at every tick: every [`DEADLINE_SCAN`] while the core is busy,
    /// once more after activity stops, and whenever a hook asked for one.
    pub fn on_tick(&self, hook: TickHook) {
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

    /// Times out the client connection that has been reusable the longest (waiting
    /// for its next request, or lingering after its last answer), to admit a new
    /// connection at the cap: what nginx does with its reusable connections. Its
    /// task closes it at its next poll. `false` when there is none.
    pub fn shed_reusable(&self) -> bool {
        let mut slots = self.slots.borrow_mut();
        for queue in [&self.reusable, &self.unfinished] {
            let mut queue = queue.borrow_mut();
            while let Some((index, mark)) = queue.pop_front() {
                let slot = &mut slots[index as usize];
                if slot.in_use && slot.reusable == mark {
                    slot.reusable = 0;
                    slot.shed = true;
                    slot.timed_out = true;
                    wake_both(slot);
                    return true;
                }
            }
        }
        false
    }

    /// Revokes the descriptor `key` names, if it is still registered: nothing more is
    /// read from it (it is never ready to read, though bytes wait), a wait on it
    /// fails with `TimedOut` (a deadline set later does not undo this), and its
    /// waiting tasks are woken. Writes that do not block still go out (a WebSocket
    /// close frame). For a tunnel whose circuit was removed or no longer admits its
    /// client: each relay's next read fails, busy or idle, and the tunnel ends.
    /// `false` when the slot has another occupant now (or none).
    pub fn revoke(&self, key: SlotKey) -> bool {
        let mut slots = self.slots.borrow_mut();
        match slots.get_mut(key.index as usize) {
            Some(slot) if slot.in_use && slot.generation == key.generation => {
                slot.revoked = true;
                slot.timed_out = true;
                wake_both(slot);
                true
            }
            _ => false,
        }
    }

    /// Revokes every registered descriptor that is not a client's connection
    /// ([`Reactor::revoke`] for each): the first step of cutting what is still open
    /// when the drain's deadline passes. An exchange waiting on its app fails at
    /// once and can still tell its client so, over HTTP/1.1 or HTTP/2.
    pub fn revoke_apps(&self) {
        self.revoke_where(|s| !s.client)
    }

    /// Revokes every registered descriptor: the second step, for exchanges waiting
    /// on their clients (a body still coming, an answer not read). Each ends through
    /// its own failure path (its answer or cut, its access line) rather than being
    /// dropped with the core.
    pub fn revoke_all(&self) {
        self.revoke_where(|_| true)
    }

    fn revoke_where(&self, which: impl Fn(&Slot) -> bool) {
        let mut slots = self.slots.borrow_mut();
        for slot in slots.iter_mut().filter(|s| s.in_use && which(s)) {
            slot.revoked = true;
            slot.timed_out = true;
            wake_both(slot);
        }
    }

    /// Wakes every task waiting on a descriptor, without failing its wait (used by
    /// drain: a connection busy with a request sees the drain at its next poll, so an
    /// HTTP/2 connection sends `GOAWAY` at once, not when its streams are done). A
    /// woken wait that is still not ready registers again.
    pub fn wake_all(&self) {
        let mut slots = self.slots.borrow_mut();
        for slot in slots.iter_mut().filter(|s| s.in_use) {
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

    /// The reactor task: run it once per core with `glommio::spawn_local` (not
    /// [`spawn`]: its own polls must not count as other work).
    pub async fn run(self: Rc<Self>) {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(256);
        let mut empty_polls = 0u32;
        let mut spin = Spin::new(self.spin_polls);
        let (mut parks, mut empty_total) = (0u64, 0u64);
        // `None` until the first yield: the first turn must not block either. glommio
        // may run a new task inside the spawn call, so the reactor's first turn can run
        // in the middle of the task that spawned it, before that task has reported the
        // core ready; parking there would hold it until some I/O came (with a spin
        // budget of 0, a core that never started).
        let mut polls_at_yield: Option<u64> = None;
        while !self.stopped.get() {
            // Only a turn after a yield during which no other task ran may block: one
            // that did run may have woken more tasks, queued behind us (and before the
            // first yield there has been no such yield at all).
            let idle_yield = polls_at_yield == Some(task_polls());
            // Tasks ran during the yield, however they were woken (one task waking
            // another: a connection shed for a new one): one more tick publishes
            // what they did. Else a change made after the last tick (a gauge) could
            // wait unpublished until the core next had I/O or a timer.
            if polls_at_yield.is_some() && !idle_yield {
                self.active.set(true);
            }
            let parked_at = if !idle_yield || empty_polls < spin.budget() {
                None
            } else {
                Some(Instant::now())
            };
            let timeout = match parked_at {
                None => Some(Duration::ZERO),
                Some(now) => {
                    let timeout = self.park_timeout(now);
                    self.liveness.parking(now, timeout);
                    timeout
                }
            };
            let ready = self.poll_once(&mut events, timeout);
            if ready == 0 {
                empty_polls = empty_polls.saturating_add(1);
            } else {
                empty_polls = 0;
                self.active.set(true);
            }
            let now = Instant::now();
            match parked_at {
                Some(at) => {
                    parks += 1;
                    spin.parked(now.saturating_duration_since(at), ready > 0);
                }
                None if ready == 0 => empty_total += 1,
                None => {}
            }
            self.liveness.polls(parks, empty_total);
            self.now.set(now);
            let fired = self.fire_timers(now);
            if self.tick_due(now) {
                self.tick(now);
            }
            // The tasks this turn woke (by I/O, the bridge or a timer) run after the
            // yield below, so after any tick just run: what they change (gauges, a
            // pooled connection to evict) is published by the next one.
            if ready > 0 || fired {
                self.active.set(true);
            }
            self.liveness.turned(now);
            // Let the tasks just woken run before the next poll.
            polls_at_yield = Some(task_polls());
            futures_lite::future::yield_now().await;
        }
    }

    /// Whether the deadline scan and tick hooks are due at `now`.
    fn tick_due(&self, now: Instant) -> bool {
        let scan_at = self.last_scan.get() + DEADLINE_SCAN;
        if now >= scan_at && (self.active.get() || self.earliest_deadline.get().is_some()) {
            return true;
        }
        self.next_tick.get().is_some_and(|at| now >= at)
    }

    /// Scans slot deadlines and runs the tick hooks.
    fn tick(&self, now: Instant) {
        self.last_scan.set(now);
        // Connections the scan times out are handled after this tick: one more tick
        // then publishes what they changed (gauges, counters, log lines).
        let expired = self.scan_deadlines(now);
        self.active.set(expired);
        let mut next: Option<Instant> = None;
        for hook in self.tick_hooks.borrow().iter() {
            if let Some(at) = hook(now) {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        self.next_tick.set(next);
    }

    /// How long the next park may last: until the earliest sleeper, slot deadline
    /// (scan granularity), or tick a hook asked for; `None` when nothing is due.
    fn park_timeout(&self, now: Instant) -> Option<Duration> {
        let mut due: Option<Instant> = self
            .timers
            .borrow()
            .first_key_value()
            .map(|((at, _), _)| *at);
        let mut earliest = |at: Instant| due = Some(due.map_or(at, |d| d.min(at)));
        let scan_floor = self.last_scan.get() + DEADLINE_SCAN;
        if self.active.get() {
            earliest(scan_floor);
        }
        if let Some(d) = self.earliest_deadline.get() {
            earliest(d.max(scan_floor));
        }
        if let Some(t) = self.next_tick.get() {
            earliest(t);
        }
        let timeout = due.map(|at| at.saturating_duration_since(now));
        match (timeout, self.park_max) {
            (Some(t), Some(max)) => Some(t.min(max)),
            (t, max) => t.or(max),
        }
    }

    /// One `epoll_wait` (`timeout` `None`: until an event); wakes the tasks whose
    /// descriptors became ready.
    fn poll_once(&self, events: &mut Vec<epoll::Event>, timeout: Option<Duration>) -> usize {
        events.clear();
        let ts = timeout.map(|t| rustix::event::Timespec {
            tv_sec: t.as_secs().min(i64::MAX as u64) as _,
            tv_nsec: t.subsec_nanos() as _,
        });
        let n = match epoll::wait(
            &self.epoll,
            rustix::buffer::spare_capacity(events),
            ts.as_ref(),
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

    /// Wakes the sleepers due at `now`; true when there were some.
    fn fire_timers(&self, now: Instant) -> bool {
        let mut timers = self.timers.borrow_mut();
        let mut fired = false;
        while let Some(entry) = timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            entry.remove().wake();
            fired = true;
        }
        fired
    }

    /// Times out the slots whose deadline passed; true when there were some.
    fn scan_deadlines(&self, now: Instant) -> bool {
        if self.earliest_deadline.get().is_none_or(|d| d > now) {
            return false;
        }
        let mut slots = self.slots.borrow_mut();
        let mut earliest: Option<Instant> = None;
        let mut expired = false;
        for slot in slots.iter_mut().filter(|s| s.in_use && !s.timed_out) {
            match slot.deadline {
                Some(d) if d <= now => {
                    slot.timed_out = true;
                    expired = true;
                    wake_both(slot);
                }
                Some(d) => earliest = Some(earliest.map_or(d, |e| e.min(d))),
                None => {}
            }
        }
        self.earliest_deadline.set(earliest);
        expired
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

    /// Whether an operation in `dir` may succeed without blocking. A revoked
    /// descriptor is never ready to read ([`Reactor::revoke`]).
    pub fn is_ready(&self, dir: Direction) -> bool {
        self.with(|s| match dir {
            Direction::Read => s.readable && !s.revoked,
            Direction::Write => s.writable,
        })
    }

    /// Records that the descriptor may be ready in `dir` again (the next operation
    /// tries the syscall): after bytes seen by a peek were taken, the rest may
    /// already be there, and no new edge would announce it.
    pub fn mark_ready(&self, dir: Direction) {
        self.with(|s| match dir {
            Direction::Read => s.readable = true,
            Direction::Write => s.writable = true,
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

    /// Waits for readiness in `dir` of `fd` (the descriptor this slot was taken
    /// for): `Ready(Ok)` when an edge arrived, `Ready(Err)` on timeout (or when the
    /// descriptor cannot join the epoll set), `Pending` otherwise (the waker is kept).
    pub fn poll_ready(
        &self,
        cx: &mut Context<'_>,
        dir: Direction,
        fd: BorrowedFd<'_>,
    ) -> Poll<std::io::Result<()>> {
        let mut slots = self.reactor.slots.borrow_mut();
        let s = &mut slots[self.index as usize];
        let ready = match dir {
            Direction::Read => s.readable && !s.revoked,
            Direction::Write => s.writable,
        };
        if ready {
            return Poll::Ready(Ok(()));
        }
        if s.timed_out {
            return Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
        }
        if !s.armed {
            if let Err(e) = self.reactor.arm(s, self.index, fd) {
                return Poll::Ready(Err(e));
            }
        }
        s.wake_on(dir, cx);
        Poll::Pending
    }

    /// Ready once the reactor has seen the peer's end in `dir` — `Read`: its end of
    /// stream (or a hang-up, an error); `Write`: a hang-up or an error, so that
    /// nothing written will arrive — or the descriptor timed out or was revoked.
    /// Until then `cx` is woken at the next edge in `dir`, whatever it is (the caller
    /// looks again). Unlike [`Registration::poll_ready`] it neither needs nor takes
    /// the direction's readiness: a watch beside the direction's one user, at the
    /// cost of one look at the slot (an arm of the descriptor at most).
    pub fn poll_peer_end(
        &self,
        cx: &mut Context<'_>,
        dir: Direction,
        fd: BorrowedFd<'_>,
    ) -> Poll<()> {
        let mut slots = self.reactor.slots.borrow_mut();
        let s = &mut slots[self.index as usize];
        let seen = match dir {
            Direction::Read => s.read_closed,
            Direction::Write => s.write_closed,
        };
        if seen || s.timed_out {
            return Poll::Ready(());
        }
        if !s.armed && self.reactor.arm(s, self.index, fd).is_err() {
            return Poll::Ready(());
        }
        s.wake_on(dir, cx);
        Poll::Pending
    }

    /// Whether the descriptor is in the epoll set, so that an edge would have been
    /// seen: until then [`Registration::is_ready`] only says what the last syscall
    /// left.
    pub fn is_armed(&self) -> bool {
        self.with(|s| s.armed)
    }

    /// Sets (or clears) the deadline of the current operation; clears a past timeout
    /// (not a revocation's).
    pub fn set_deadline(&self, deadline: Option<Instant>) {
        self.with(|s| {
            s.deadline = deadline;
            s.timed_out = s.revoked;
        });
        if let Some(d) = deadline {
            let earliest = &self.reactor.earliest_deadline;
            if earliest.get().is_none_or(|e| d < e) {
                earliest.set(Some(d));
            }
        }
    }

    /// Marks the descriptor as a client's connection (see [`Reactor::revoke_apps`]).
    pub fn set_client(&self) {
        self.with(|s| s.client = true)
    }

    /// Marks the descriptor as an idle client connection (drain closes it at once).
    pub fn set_idle(&self, idle: bool) {
        self.with(|s| s.idle = idle)
    }

    /// Marks the descriptor as a client connection with nothing in hand (waiting for
    /// a request, or lingering), or clears that: at the connection cap the oldest
    /// such one is closed to admit a new connection ([`Reactor::shed_reusable`]).
    /// `idle`: drain closes it at once too (not a new connection's wait for its first
    /// request, which drain still serves).
    pub fn set_reusable(&self, reusable: bool, idle: bool) {
        if !reusable {
            return self.with(|s| {
                s.idle = idle;
                s.reusable = 0;
            });
        }
        self.queue_reusable(&self.reactor.reusable, idle);
    }

    /// Marks the descriptor as a client connection whose request head (or TLS
    /// handshake) is under way but unfinished: at the connection cap it may be
    /// closed for a new one, but only once no connection with nothing at all in
    /// hand is left ([`Reactor::shed_reusable`]). Drain lets it finish.
    pub fn set_unfinished(&self) {
        self.queue_reusable(&self.reactor.unfinished, false);
    }

    /// Gives the descriptor a new mark at the back of `queue`.
    fn queue_reusable(&self, queue: &RefCell<std::collections::VecDeque<(u32, u64)>>, idle: bool) {
        let reactor = &self.reactor;
        let mark = reactor.reuse_mark.get() + 1;
        reactor.reuse_mark.set(mark);
        self.with(|s| {
            s.idle = idle;
            s.reusable = mark;
        });
        let mut queue = queue.borrow_mut();
        queue.push_back((self.index, mark));
        // Stale entries are dropped once they could outnumber the slots: the queue
        // stays within twice the registered descriptors, at a cost per mark that is
        // constant on average.
        let slots = reactor.slots.borrow();
        if queue.len() > 64 + 2 * slots.len() {
            queue.retain(|(i, m)| {
                let s = &slots[*i as usize];
                s.in_use && s.reusable == *m
            });
        }
    }

    /// Whether the connection was closed to admit a new one at the cap
    /// ([`Reactor::shed_reusable`]): bytes that arrived since are not served.
    pub fn was_shed(&self) -> bool {
        self.with(|s| s.shed)
    }

    /// This slot as it is now, for [`Reactor::revoke`].
    pub fn key(&self) -> SlotKey {
        SlotKey {
            index: self.index,
            generation: self.with(|s| s.generation),
        }
    }

    /// Whether the descriptor was revoked ([`Reactor::revoke`]).
    pub fn was_revoked(&self) -> bool {
        self.with(|s| s.revoked)
    }

    /// The deadline set, if any.
    pub fn deadline(&self) -> Option<Instant> {
        self.with(|s| s.deadline)
    }

    /// Whether the deadline passed.
    pub fn timed_out(&self) -> bool {
        self.with(|s| s.timed_out)
    }

    /// Whether the peer's end of stream (or a hang-up) has been seen: every byte it
    /// sent is already in the socket, and no further edge will come.
    pub fn read_closed(&self) -> bool {
        self.with(|s| s.read_closed)
    }

    /// Whether the connection hung up or failed (`EPOLLHUP`/`EPOLLERR`: a reset, or
    /// both sides shut), not only the peer's side of it.
    pub fn hung_up(&self) -> bool {
        self.with(|s| s.write_closed)
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

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_micros(10);
    const LONG: Duration = Duration::from_millis(5);

    #[test]
    fn the_spin_budget_shrinks_when_parks_are_long_and_grows_back_when_work_returns() {
        let mut spin = Spin::new(32);
        assert_eq!(spin.budget(), 32);
        // Long gaps (or a timer, or I/O only after a long sleep): halve, down to 0.
        let halvings: Vec<u32> = (0..7)
            .map(|i| {
                spin.parked(LONG, i % 2 == 0);
                spin.budget()
            })
            .collect();
        assert_eq!(halvings, [16, 8, 4, 2, 1, 0, 0]);
        // A short park that a timer ended is no reason to spin.
        spin.parked(SHORT, false);
        assert_eq!(spin.budget(), 0);
        // Work arriving within a spin's reach: back up, doubling, to the maximum.
        let growth: Vec<u32> = (0..7)
            .map(|_| {
                spin.parked(SHORT, true);
                spin.budget()
            })
            .collect();
        assert_eq!(growth, [1, 2, 4, 8, 16, 32, 32]);
        // The boundary counts as within reach.
        let mut at_edge = Spin { max: 32, budget: 4 };
        at_edge.parked(SPIN_PAYS, true);
        assert_eq!(at_edge.budget(), 8);
        at_edge.parked(SPIN_PAYS + Duration::from_micros(1), true);
        assert_eq!(at_edge.budget(), 4);
    }

    #[test]
    fn a_budget_of_zero_configured_never_spins() {
        let mut spin = Spin::new(0);
        for (slept, io) in [(SHORT, true), (LONG, true), (SHORT, false), (SHORT, true)] {
            spin.parked(slept, io);
            assert_eq!(spin.budget(), 0);
        }
        let mut odd = Spin::new(5);
        for _ in 0..3 {
            odd.parked(LONG, true);
        }
        assert_eq!(odd.budget(), 0);
        for expect in [1, 2, 4, 5, 5] {
            odd.parked(SHORT, true);
            assert_eq!(odd.budget(), expect);
        }
    }

    /// Runs `body` as the main task of a new executor on a thread of its own, with the
    /// liveness record of one core for its reactor.
    fn on_a_core<F, Fut>(body: F) -> std::thread::JoinHandle<()>
    where
        F: FnOnce(Arc<CoreLiveness>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        std::thread::spawn(move || {
            let executor = glommio::LocalExecutorBuilder::default()
                .make()
                .expect("executor");
            executor.run(counted(async move {
                let live = crate::liveness::Liveness::new(&[0], Duration::from_secs(60));
                body(live.cores[0].clone()).await;
            }));
        })
    }

    /// glommio polls a task it spawns at once, inside the spawner's poll: the new
    /// task starts its turn afresh, and the spawner's goes on where it was, neither
    /// lengthened nor cut short by the reads the new task made.
    #[test]
    fn a_task_polled_inside_another_neither_takes_nor_resets_its_turn() {
        use futures_lite::future::{block_on, poll_once};
        use std::future::poll_fn;
        block_on(counted(async {
            for _ in 1..READS_PER_POLL {
                poll_fn(poll_read_turn).await;
            }
            let inner = counted(async {
                for _ in 0..READS_PER_POLL {
                    poll_fn(poll_read_turn).await;
                }
            });
            assert_eq!(
                poll_once(inner).await,
                Some(()),
                "the new task starts afresh"
            );
            assert_eq!(
                poll_once(poll_fn(poll_read_turn)).await,
                Some(()),
                "the last read of the turn"
            );
            assert_eq!(
                poll_once(poll_fn(poll_read_turn)).await,
                None,
                "the turn is over"
            );
        }));
    }

    /// Counting a task's polls adds nothing to its size: every task of a core is
    /// wrapped so, and an idle WebSocket session has three. (As an `async fn`, the
    /// wrapper held its argument and the pinned copy side by side: twice the size.)
    #[test]
    fn counting_a_tasks_polls_adds_nothing_to_its_size() {
        async fn task() -> usize {
            let held = [7u8; 1024];
            futures_lite::future::yield_now().await;
            held.iter().map(|&b| usize::from(b)).sum()
        }
        let bare = std::mem::size_of_val(&task());
        assert!(bare >= 1024);
        assert_eq!(std::mem::size_of_val(&counted(task())), bare);
        assert_eq!(futures_lite::future::block_on(counted(task())), 7 * 1024);
    }

    /// glommio runs a new task inside its spawn call, so the reactor's first turn runs
    /// in the middle of the task that started it. Whatever the spin budget, that turn
    /// must not park: the starting task still has to report the core ready, and no I/O
    /// would ever come to wake it (with a budget of 0 a worker core never started).
    #[test]
    fn the_task_that_starts_the_reactor_goes_on_without_any_io() {
        for spin_polls in [0, 1, 32] {
            let (tx, rx) = std::sync::mpsc::channel();
            let core = on_a_core(move |core| async move {
                let policy = ParkPolicy {
                    spin_polls,
                    park_max: None,
                };
                let reactor = Reactor::new(policy, core.clone()).expect("reactor");
                let run = glommio::spawn_local(reactor.clone().run());
                // The reactor's first turn has run (inside the spawn) and yielded:
                // it polled, and did not park. A park would block here until I/O
                // or, where a signal is not blocked, until one interrupted it.
                let (parks, _) = core.poll_counts();
                // What a core does next: report itself ready.
                tx.send((parks, reactor.waking().remote().expect("remote waker")))
                    .expect("send");
                reactor.woken().await;
                reactor.stop();
                run.await;
            });
            // A bound for a hang, not a measurement: the send follows at once.
            let (parks, stop) = rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| {
                    panic!("spin_polls = {spin_polls}: the task that started the reactor was held in its first park")
                });
            stop.wake();
            assert_eq!(parks, 0, "spin_polls = {spin_polls}: the first turn parked");
            core.join().expect("core thread");
        }
    }

    /// What a task does after the last wake-up of a burst is published: the tick due
    /// in the turn that woke it runs before it, so one more tick must follow, whether
    /// the task was woken by I/O or by a timer.
    #[test]
    fn what_a_woken_task_does_is_published_by_a_later_tick() {
        use std::io::Write;
        use std::os::unix::net::UnixStream;
        use std::sync::atomic::{AtomicU64, Ordering};

        let (mut ours, theirs) = UnixStream::pair().expect("socket pair");
        theirs.set_nonblocking(true).expect("nonblocking");
        let published = Arc::new(AtomicU64::new(0));
        let seen = published.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let core = on_a_core(move |core| async move {
            let reactor = Reactor::new(ParkPolicy::default(), core).expect("reactor");
            // The state a tick publishes: what the task below has done.
            let done = Rc::new(Cell::new(0u64));
            let d = done.clone();
            reactor.on_tick(Box::new(move |_| {
                seen.store(d.get(), Ordering::Relaxed);
                None
            }));
            let reg = reactor.register();
            reg.clear_ready(Direction::Read);
            let r = reactor.clone();
            spawn(async move {
                std::future::poll_fn(|cx| reg.poll_ready(cx, Direction::Read, theirs.as_fd()))
                    .await
                    .expect("readable");
                done.set(1);
                r.sleep(DEADLINE_SCAN * 2).await;
                done.set(2);
                drop((reg, theirs));
            })
            .detach();
            let run = glommio::spawn_local(reactor.clone().run());
            tx.send(reactor.waking().remote().expect("remote waker"))
                .expect("send");
            reactor.woken().await;
            reactor.stop();
            run.await;
        });
        let stop = rx.recv().expect("the core started");
        // Setup, not a measurement: the reactor goes idle, so that a tick is due in
        // the turn that sees the byte (its last one was more than a scan ago).
        std::thread::sleep(DEADLINE_SCAN * 3);
        ours.write_all(b"x").expect("write");
        for (want, how) in [(1, "by I/O"), (2, "by a timer")] {
            let deadline = Instant::now() + Duration::from_secs(5);
            while published.load(Ordering::Relaxed) != want && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(
                published.load(Ordering::Relaxed),
                want,
                "what a task woken {how} did was never published"
            );
        }
        stop.wake();
        core.join().expect("core thread");
    }
}
