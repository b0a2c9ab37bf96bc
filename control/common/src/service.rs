//! What both control-plane binaries do after reading their config: the descriptor
//! limit raised as far as allowed, a multi-thread tokio runtime, and a shutdown
//! future that resolves on SIGINT or SIGTERM.

use std::future::Future;

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let terminated = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminated => {}
    }
    tracing::info!("shutting down");
}

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
/// multi-thread runtime until it returns; then writes what the stdout writer still
/// holds (`appproxy_shared::logout`), at most [`STDOUT_DRAIN`], however `serve` ended.
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
    rt.block_on(serve(Box::pin(shutdown_signal())))
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
