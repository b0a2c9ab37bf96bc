//! What both control-plane binaries do after reading their config: the descriptor
//! limit raised as far as allowed, a multi-thread tokio runtime, and a shutdown
//! future that resolves on SIGINT, SIGTERM or SIGQUIT (a SIGHUP, SIGUSR1 or
//! SIGUSR2 is logged, not obeyed; a second stop signal ends the process at once).

use std::future::Future;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// The signals a control-plane service answers, their handlers installed as soon as
/// it is made (before the service starts: a signal during its start is taken too).
pub struct StopSignals {
    term: Option<Signal>,
    int: Option<Signal>,
    quit: Option<Signal>,
    hup: Option<Signal>,
    usr1: Option<Signal>,
    usr2: Option<Signal>,
}

impl StopSignals {
    /// Installs the handlers; must run within a tokio runtime.
    pub fn install() -> Self {
        Self {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
            quit: signal(SignalKind::quit()).ok(),
            hup: signal(SignalKind::hangup()).ok(),
            usr1: signal(SignalKind::user_defined1()).ok(),
            usr2: signal(SignalKind::user_defined2()).ok(),
        }
    }
}

/// The next delivery of `signal` (never, without a handler).
async fn next(signal: &mut Option<Signal>) {
    if let Some(s) = signal.as_mut() {
        if s.recv().await.is_some() {
            return;
        }
    }
    std::future::pending::<()>().await;
}

/// Resolves on SIGINT, SIGTERM or SIGQUIT (nginx's graceful stop, and the stop
/// signal of its container images). SIGHUP (`systemctl reload`, a terminal closed)
/// is logged and the service serves on: its config is read at start only; so are
/// SIGUSR1 and SIGUSR2 (nginx's log reopening and binary upgrade: logs go to
/// stdout). Each one's default action ended the process at once, without its drain
/// or a log line.
pub async fn shutdown_signal(mut signals: StopSignals) {
    loop {
        tokio::select! {
            _ = next(&mut signals.term) => break,
            _ = next(&mut signals.int) => break,
            _ = next(&mut signals.quit) => break,
            _ = next(&mut signals.hup) => tracing::warn!(
                "SIGHUP: the config is read at start only; restart to apply a change (serving on)"
            ),
            _ = next(&mut signals.usr1) => tracing::warn!(
                "SIGUSR1: logs go to stdout, there is no file to reopen (serving on)"
            ),
            _ = next(&mut signals.usr2) => tracing::warn!(
                "SIGUSR2: not used (serving on)"
            ),
        }
    }
    tracing::info!("shutting down");
    // A second stop signal during the drain ends the process at once, as an
    // operator's second Ctrl-C asks. Before, the handlers stayed installed with
    // nothing watching them: a second SIGTERM, SIGINT or SIGQUIT was swallowed, and
    // only SIGKILL ended a drain held up (an outside tester's find).
    tokio::spawn(async move {
        tokio::select! {
            _ = next(&mut signals.term) => {}
            _ = next(&mut signals.int) => {}
            _ = next(&mut signals.quit) => {}
        }
        tracing::warn!("a second stop signal: exiting now, without waiting for the drain");
        appproxy_shared::logout::drain(SECOND_SIGNAL_DRAIN);
        std::process::exit(1);
    });
}

/// How long the log lines still queued may take to be written when a second stop
/// signal ends the process.
const SECOND_SIGNAL_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// How long blocking work still running when a service's drain has ended (a copy,
/// a tree being removed) may hold the exit: it is left to the process's end after
/// that. Before, the runtime waited for all of it, however long — a clone of
/// 150,000 files held a stop 34 s, past the drain a service promises (an outside
/// tester's find).
pub const BLOCKING_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The most descriptors a service asks for, when its hard limit allows.
const NOFILE_WANTED: u64 = 1 << 20;

/// Raises the soft descriptor limit to the hard one (at most [`NOFILE_WANTED`]); the
/// limit in force after. Connections, store and Redis connections, an archive's
/// open directories and uploads all hold descriptors; the connection caps are
/// fitted below the limit in force ([`crate::server::fitted_cap`]).
pub fn raise_nofile() -> Option<u64> {
    appproxy_shared::nofile::raise(NOFILE_WANTED, false)
}

/// Raises the descriptor limit ([`raise_nofile`]) and runs `serve(shutdown)` on a
/// multi-thread runtime until it returns; then gives blocking work still running
/// [`BLOCKING_WAIT`] at most, and writes what the stdout writer still holds
/// (`appproxy_shared::logout`), at most [`STDOUT_DRAIN`], however `serve` ended.
pub fn run<F, Fut, T>(serve: F) -> anyhow::Result<T>
where
    F: FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    raise_nofile();
    let _drain = DrainStdout;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let signals = {
        let _in = rt.enter();
        StopSignals::install()
    };
    let served = rt.block_on(serve(Box::pin(shutdown_signal(signals))));
    rt.shutdown_timeout(BLOCKING_WAIT);
    served
}

/// How long the lines still queued for stdout may take to be written at exit: a
/// stdout nobody reads any more must not hold the process.
pub const STDOUT_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Drains the stdout writer when dropped (the end of [`run`], also by a panic).
struct DrainStdout;

impl Drop for DrainStdout {
    fn drop(&mut self) {
        appproxy_shared::logout::drain(STDOUT_DRAIN);
    }
}
