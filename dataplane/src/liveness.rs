//! Core liveness: each core publishes when it last completed a reactor turn and
//! whether it is parked; the admin thread reads it to tell a stuck core from an idle
//! one, reports it on `/health` and `/metrics`, and kicks it awake.
//!
//! A core is *stalled* when it has not turned for longer than the stall bound while
//! work is waiting for it: it is not parked at all (a turn takes microseconds, so a
//! long gap means the thread sleeps somewhere it should not, or one task hogs it), or
//! it is parked but its epoll set has held events for longer than the bound (seen by
//! the checks, with no turn in between), or its park overran its own deadline. An
//! idle core parked in `epoll_wait` with nothing ready is never stalled, however long
//! it sleeps; nor is one whose work has just arrived and whose thread has not been
//! scheduled yet: its last turn is old, but the work is not.
//!
//! The kick wakes both places a core thread can sleep: the reactor's eventfd (its
//! `epoll_wait`) and glommio's ring (a foreign wake of a task parked for this purpose,
//! which writes glommio's own eventfd). See `docs/dataplane.md`, "Lost wake-ups".

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::{Duration, Instant};

/// `parked_until` value: the core is running (not inside `epoll_wait`).
const RUNNING: u64 = 0;
/// `parked_until` value: parked with no deadline (only I/O or the bridge wakes it).
const PARKED_FOREVER: u64 = u64::MAX;

/// What one core publishes; written by the core (relaxed stores, once per turn),
/// read by the admin thread.
pub struct CoreLiveness {
    /// The CPU the core is pinned to.
    pub cpu: usize,
    /// The worker's clock origin (shared by every core).
    base: Instant,
    /// Reactor turns completed.
    turns: AtomicU64,
    /// When the last turn completed, in milliseconds since `base`.
    last_turn_ms: AtomicU64,
    /// [`RUNNING`], [`PARKED_FOREVER`], or the park's deadline in ms since `base` (+1).
    parked_until: AtomicU64,
    /// Time spent parked in `epoll_wait`, microseconds (busy ratio = 1 − its rate).
    parked_us: AtomicU64,
    /// When the current park began, µs since `base` (0: not parked).
    park_started_us: AtomicU64,
    /// Times the core blocked in `epoll_wait` (written by the core only).
    parks: AtomicU64,
    /// Zero-timeout polls that found nothing: the cost of spinning (written by the
    /// core only).
    empty_polls: AtomicU64,
    /// A duplicate of the core's epoll descriptor: polled (never waited on) to see
    /// whether events are pending.
    epoll: Mutex<Option<OwnedFd>>,
    /// A duplicate of the reactor's wake eventfd.
    wake_fd: Mutex<Option<OwnedFd>>,
    /// The waker of the core's kick task (wakes glommio's ring sleep).
    kick: Mutex<Option<Waker>>,
    /// Since when the checks have seen events waiting in the parked core's epoll set,
    /// with the turn count then (reset by a turn or an empty set).
    pending_since: Mutex<Option<(u64, Instant)>>,
    /// The core finished its drain and stopped: it takes no work any more, so it is
    /// never stalled (another core may drain on for a long while).
    stopped: std::sync::atomic::AtomicBool,
}

impl CoreLiveness {
    fn new(cpu: usize, base: Instant) -> Self {
        Self {
            cpu,
            base,
            turns: AtomicU64::new(0),
            last_turn_ms: AtomicU64::new(0),
            parked_until: AtomicU64::new(RUNNING),
            parked_us: AtomicU64::new(0),
            park_started_us: AtomicU64::new(0),
            parks: AtomicU64::new(0),
            empty_polls: AtomicU64::new(0),
            epoll: Mutex::new(None),
            wake_fd: Mutex::new(None),
            kick: Mutex::new(None),
            pending_since: Mutex::new(None),
            stopped: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Marks the core stopped (its drain done): from now on it is never stalled.
    pub fn mark_stopped(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_millis() as u64
    }

    /// Called by the core once its reactor exists.
    pub fn attach(&self, epoll: OwnedFd, wake_fd: OwnedFd) {
        *lock(&self.epoll) = Some(epoll);
        *lock(&self.wake_fd) = Some(wake_fd);
    }

    /// Records a completed turn at `now` (the core is running).
    pub fn turned(&self, now: Instant) {
        self.turns.fetch_add(1, Ordering::Relaxed);
        self.last_turn_ms.store(self.ms(now), Ordering::Relaxed);
        if self.parked_until.swap(RUNNING, Ordering::Relaxed) != RUNNING {
            let started = self.park_started_us.swap(0, Ordering::Relaxed);
            let now_us = now.saturating_duration_since(self.base).as_micros() as u64;
            self.parked_us
                .fetch_add(now_us.saturating_sub(started), Ordering::Relaxed);
        }
    }

    /// Publishes the core's poll counts: parks and empty spin polls so far. Plain
    /// stores: only the core writes them.
    pub fn polls(&self, parks: u64, empty_polls: u64) {
        self.parks.store(parks, Ordering::Relaxed);
        self.empty_polls.store(empty_polls, Ordering::Relaxed);
    }

    /// Times the core blocked in `epoll_wait`, and the zero-timeout polls that found
    /// nothing, as last published.
    pub fn poll_counts(&self) -> (u64, u64) {
        (
            self.parks.load(Ordering::Relaxed),
            self.empty_polls.load(Ordering::Relaxed),
        )
    }

    /// Records that the core is about to block in `epoll_wait` for at most `timeout`
    /// (`None`: until I/O or the bridge).
    pub fn parking(&self, now: Instant, timeout: Option<Duration>) {
        let until = match timeout {
            None => PARKED_FOREVER,
            Some(t) => self.ms(now + t).saturating_add(1),
        };
        self.park_started_us.store(
            now.saturating_duration_since(self.base).as_micros() as u64,
            Ordering::Relaxed,
        );
        self.parked_until.store(until, Ordering::Relaxed);
    }

    /// Stores the waker of the core's kick task.
    pub fn set_kick(&self, waker: &Waker) {
        let mut slot = lock(&self.kick);
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    /// Time spent parked so far, the park in progress included.
    pub fn parked(&self, now: Instant) -> Duration {
        let mut us = self.parked_us.load(Ordering::Relaxed);
        let started = self.park_started_us.load(Ordering::Relaxed);
        if started != 0 && self.parked_until.load(Ordering::Relaxed) != RUNNING {
            let now_us = now.saturating_duration_since(self.base).as_micros() as u64;
            us += now_us.saturating_sub(started);
        }
        Duration::from_micros(us)
    }

    /// Turns completed so far.
    pub fn turns(&self) -> u64 {
        self.turns.load(Ordering::Relaxed)
    }

    /// How long ago the last turn completed.
    pub fn since_last_turn(&self, now: Instant) -> Duration {
        Duration::from_millis(
            self.ms(now)
                .saturating_sub(self.last_turn_ms.load(Ordering::Relaxed)),
        )
    }

    /// Whether work is waiting that the core has not taken for longer than `bound`.
    pub fn stalled(&self, now: Instant, bound: Duration) -> bool {
        if self.stopped.load(Ordering::Relaxed) || self.since_last_turn(now) <= bound {
            return false;
        }
        match self.parked_until.load(Ordering::Relaxed) {
            RUNNING => true,
            until => {
                let overran = until != PARKED_FOREVER
                    && self.ms(now) > until.saturating_add(bound.as_millis() as u64);
                overran || self.pending_for(now) >= bound
            }
        }
    }

    /// How long events have been waiting in the parked core's epoll set, as seen by
    /// the checks: zero when none are, or when they were first seen now (the last
    /// turn of a core that was idle is old, the work that just woke it is not).
    fn pending_for(&self, now: Instant) -> Duration {
        let mut seen = lock(&self.pending_since);
        if !self.events_pending() {
            *seen = None;
            return Duration::ZERO;
        }
        let turns = self.turns();
        match *seen {
            Some((t, since)) if t == turns => now.saturating_duration_since(since),
            _ => {
                *seen = Some((turns, now));
                Duration::ZERO
            }
        }
    }

    /// Whether the core's epoll set holds events (a zero-timeout `poll`, which does not
    /// consume them).
    fn events_pending(&self) -> bool {
        let guard = lock(&self.epoll);
        let Some(fd) = guard.as_ref() else {
            return false;
        };
        let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
        matches!(rustix::event::poll(&mut fds, Some(&rustix::event::Timespec::default())), Ok(n) if n > 0)
    }

    /// Wakes the core wherever it sleeps: its `epoll_wait` and glommio's ring.
    pub fn kick(&self) {
        if let Some(fd) = lock(&self.wake_fd).as_ref() {
            let _ = rustix::io::write(fd.as_fd(), &1u64.to_ne_bytes());
        }
        if let Some(w) = lock(&self.kick).as_ref() {
            w.wake_by_ref();
        }
    }
}

/// Every core's liveness, plus the stall bound and the stalls seen.
pub struct Liveness {
    /// One entry per core, in row order.
    pub cores: Vec<Arc<CoreLiveness>>,
    /// How long a core may hold waiting work before it counts as stalled.
    pub bound: Duration,
    /// Stalls detected (each kicked).
    stalls: AtomicU64,
}

impl Liveness {
    /// Entries for `cpus`, sharing one clock origin.
    pub fn new(cpus: &[usize], bound: Duration) -> Arc<Self> {
        let base = Instant::now();
        Arc::new(Self {
            cores: cpus
                .iter()
                .map(|&c| Arc::new(CoreLiveness::new(c, base)))
                .collect(),
            bound,
            stalls: AtomicU64::new(0),
        })
    }

    /// Stalls detected since start.
    pub fn stalls(&self) -> u64 {
        self.stalls.load(Ordering::Relaxed)
    }

    /// The CPUs of the cores stalled now. A core that looks stalled is re-checked
    /// after a short pause (it may have been woken a moment ago): only one that made
    /// no turn in between counts. Each stalled core is logged, counted and kicked.
    pub fn check(&self) -> Vec<usize> {
        let suspects: Vec<(&Arc<CoreLiveness>, u64)> = self
            .stalled_now(Instant::now())
            .map(|c| (c, c.turns()))
            .collect();
        if suspects.is_empty() {
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        let mut stalled = Vec::new();
        for (core, turns) in suspects {
            if core.turns() == turns && core.stalled(now, self.bound) {
                self.stalls.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    core = core.cpu,
                    since_last_turn_ms = core.since_last_turn(now).as_millis() as u64,
                    "core stalled with work waiting: kicking it awake"
                );
                core.kick();
                stalled.push(core.cpu);
            }
        }
        stalled
    }

    /// The CPUs of the cores that look stalled now, without [`Self::check`]'s pause,
    /// kick or log: for a core answering a probe, which must not sleep (the
    /// watchdog's check kicks and counts).
    pub fn looks_stalled(&self) -> Vec<usize> {
        self.stalled_now(Instant::now()).map(|c| c.cpu).collect()
    }

    /// The cores that [look stalled](CoreLiveness::stalled) at `now`.
    fn stalled_now(&self, now: Instant) -> impl Iterator<Item = &Arc<CoreLiveness>> {
        self.cores
            .iter()
            .filter(move |c| c.stalled(now, self.bound))
    }

    /// Prometheus families for the cores' liveness.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let now = Instant::now();
        self.per_core(
            out,
            "appproxy_core_last_turn_age_seconds",
            "gauge",
            "Time since the core last completed a reactor turn (large and harmless while idle).",
            |c| format!("{:.3}", c.since_last_turn(now).as_secs_f64()),
        );
        self.per_core(
            out,
            "appproxy_core_stalled",
            "gauge",
            "Whether the core holds waiting work it has not taken within the stall bound.",
            |c| u8::from(c.stalled(now, self.bound)).to_string(),
        );
        self.per_core(
            out,
            "appproxy_core_parked_seconds_total",
            "counter",
            "Time the core slept in epoll_wait with nothing to do (busy ratio = 1 - rate of this).",
            |c| format!("{:.6}", c.parked(now).as_secs_f64()),
        );
        self.per_core(
            out,
            "appproxy_core_parks_total",
            "counter",
            "Times the core blocked in epoll_wait (each a sleep and a wake-up).",
            |c| c.poll_counts().0.to_string(),
        );
        self.per_core(
            out,
            "appproxy_core_empty_polls_total",
            "counter",
            "Zero-timeout epoll polls that found nothing: what spinning before a park costs.",
            |c| c.poll_counts().1.to_string(),
        );
        let _ = write!(
            out,
            "# HELP appproxy_core_stalls_total Stalled cores detected (and kicked) since start.\n\
             # TYPE appproxy_core_stalls_total counter\n\
             appproxy_core_stalls_total {}\n",
            self.stalls()
        );
    }

    /// One family with a sample per core: `# HELP`, `# TYPE`, then `name{core="N"}`
    /// and the value.
    fn per_core(
        &self,
        out: &mut String,
        name: &str,
        kind: &str,
        help: &str,
        value: impl Fn(&CoreLiveness) -> String,
    ) {
        use std::fmt::Write as _;
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
        for c in &self.cores {
            let _ = writeln!(out, "{name}{{core=\"{}\"}} {}", c.cpu, value(c));
        }
    }

    /// Watches the cores every `bound` on its own thread, so a stalled core is
    /// kicked even when nobody asks `/health`.
    pub fn spawn_watchdog(self: &Arc<Self>) -> std::io::Result<()> {
        let me = Arc::downgrade(self);
        let every = self.bound.max(Duration::from_millis(100));
        std::thread::Builder::new()
            .name("appproxy-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                match me.upgrade() {
                    Some(l) => {
                        l.check();
                    }
                    None => return,
                }
            })
            .map(|_| ())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A core that has not turned for longer than the bound while running is named;
    /// one that just turned is not; looking neither kicks nor counts.
    #[test]
    fn a_core_not_turning_past_the_bound_looks_stalled_without_a_kick() {
        let l = Liveness::new(&[3, 5], Duration::from_millis(50));
        assert!(l.looks_stalled().is_empty(), "both just started");
        std::thread::sleep(Duration::from_millis(120));
        l.cores[0].turned(Instant::now());
        assert_eq!(l.looks_stalled(), vec![5]);
        assert_eq!(l.stalls(), 0, "only the watchdog's check counts a stall");
        l.cores[1].turned(Instant::now());
        assert!(l.looks_stalled().is_empty());
    }

    /// A core that finished its drain turns no more and is not stalled, however long
    /// another core drains on (it was named, `/health` answered 503 and the watchdog
    /// kicked it every check until the last core stopped).
    #[test]
    fn a_stopped_core_is_never_stalled() {
        let l = Liveness::new(&[3, 5], Duration::from_millis(50));
        l.cores[1].mark_stopped();
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(l.looks_stalled(), vec![3]);
        l.cores[0].mark_stopped();
        assert!(l.looks_stalled().is_empty());
    }
}
