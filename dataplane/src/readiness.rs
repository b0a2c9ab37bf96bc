//! Readiness: whether the worker should be sent new traffic, as `/readyz` tells a
//! load balancer or an orchestrator. Apart from liveness (`/livez`: no core is
//! stalled), a worker is ready once it serves the circuits it is meant to serve and
//! until it begins to stop:
//!
//! - **starting**: a managed worker has not yet registered with its coordinator and
//!   had the first circuit set applied by every core (a standalone worker serves its
//!   file's circuits from the start);
//! - **stopping**: a stop signal came; during `[timeouts] stop_grace_secs` the worker
//!   still accepts and serves (so clients a load balancer still sends it are not
//!   refused while it learns the worker is going), then it drains.
//!
//! Written by the node's main thread (stop) and the control agent (first set applied),
//! read by the admin thread: atomics, no lock.

use std::sync::atomic::{AtomicBool, Ordering};

/// Why a worker is not ready, or that it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Serving what it is meant to serve.
    Ready,
    /// Its first circuit set is not applied yet.
    Starting,
    /// A stop signal came: it finishes what it has and takes no new work.
    Stopping,
}

impl State {
    /// The word `/readyz` and `/health` answer with.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Starting => "starting",
            Self::Stopping => "stopping",
        }
    }
}

/// The probe paths the admin endpoint and the API port answer (the original
/// worker's, on its API port).
pub const PROBES: [&str; 6] = [
    "/",
    "/health",
    "/livez",
    "/readyz",
    "/health/livez",
    "/health/readyz",
];

/// What the probe on `path` answers, one rule for the admin endpoint and the API
/// port: whether it is a success (200, else 503) and the word its `status` says.
/// Every probe is a liveness probe (`stalled` while some core holds waiting work
/// without turning: `stalled` lists them); `/readyz` and `/health/readyz` ask for
/// readiness too (the `state`'s word while it is not ready).
pub fn verdict(path: &str, stalled: &[usize], state: State) -> (bool, &'static str) {
    if !stalled.is_empty() {
        (false, "stalled")
    } else if matches!(path, "/readyz" | "/health/readyz") && state != State::Ready {
        (false, state.as_str())
    } else {
        (true, "ok")
    }
}

/// The worker's readiness, shared by the threads that change and read it.
#[derive(Debug)]
pub struct Readiness {
    /// The first circuit set is applied (standalone: from the start).
    synced: AtomicBool,
    /// A stop signal came.
    stopping: AtomicBool,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// A worker serving its configured circuits: ready until [`Self::expect_sync`]
    /// says a coordinator will hand it its set.
    pub fn new() -> Self {
        Self {
            synced: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
        }
    }

    /// A coordinator will hand the worker its circuits: not ready until
    /// [`Self::mark_synced`].
    pub fn expect_sync(&self) {
        self.synced.store(false, Ordering::Release);
    }

    /// The first circuit set is applied by every core.
    pub fn mark_synced(&self) {
        if !self.synced.swap(true, Ordering::AcqRel) {
            tracing::info!("ready: the first circuit set is applied on every core");
        }
    }

    /// Whether the first circuit set is applied.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// A stop signal came; returns whether it is the first.
    pub fn mark_stopping(&self) -> bool {
        !self.stopping.swap(true, Ordering::AcqRel)
    }

    /// Where the worker stands.
    pub fn state(&self) -> State {
        if self.stopping.load(Ordering::Acquire) {
            State::Stopping
        } else if !self.synced.load(Ordering::Acquire) {
            State::Starting
        } else {
            State::Ready
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One rule for every probe path: a stalled core fails them all, readiness
    /// fails only the readiness paths.
    #[test]
    fn a_probe_fails_for_a_stalled_core_and_readiness_probes_while_not_ready() {
        use State::{Ready, Starting, Stopping};
        // (path, stalled cores, state, verdict)
        type Case<'a> = (&'a str, &'a [usize], State, (bool, &'a str));
        let table: &[Case] = &[
            ("/health", &[], Ready, (true, "ok")),
            ("/", &[], Starting, (true, "ok")),
            ("/livez", &[], Stopping, (true, "ok")),
            ("/health/livez", &[1], Ready, (false, "stalled")),
            ("/readyz", &[], Ready, (true, "ok")),
            ("/readyz", &[], Starting, (false, "starting")),
            ("/health/readyz", &[], Stopping, (false, "stopping")),
            ("/health/readyz", &[0, 2], Starting, (false, "stalled")),
        ];
        for (path, stalled, state, want) in table {
            assert!(PROBES.contains(path), "{path}");
            assert_eq!(
                verdict(path, stalled, *state),
                *want,
                "{path} {stalled:?} {state:?}"
            );
        }
    }

    #[test]
    fn a_worker_is_ready_between_its_first_set_and_its_stop() {
        let r = Readiness::new();
        assert_eq!(r.state(), State::Ready, "standalone: ready from the start");
        r.expect_sync();
        assert_eq!(r.state(), State::Starting);
        r.mark_synced();
        assert_eq!(r.state(), State::Ready);
        assert!(r.mark_stopping(), "the first stop signal");
        assert!(!r.mark_stopping(), "a second one is not the first");
        assert_eq!(r.state(), State::Stopping);
        r.mark_synced();
        assert_eq!(r.state(), State::Stopping, "stopping stays stopping");
    }

    #[test]
    fn a_stop_before_the_first_set_is_stopping() {
        let r = Readiness::new();
        r.expect_sync();
        r.mark_stopping();
        assert_eq!(r.state(), State::Stopping);
    }
}
