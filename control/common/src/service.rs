//! What both control-plane binaries do after reading their config: a multi-thread
//! tokio runtime, and a shutdown future that resolves on SIGINT or SIGTERM.

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

/// Runs `serve(shutdown)` on a multi-thread runtime until it returns.
pub fn run<F, Fut, T>(serve: F) -> anyhow::Result<T>
where
    F: FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(Box::pin(shutdown_signal())))
}
