//! The request-ID context: which request the code running right now belongs to.
//!
//! The current ID lives in a thread-local slot. [`RequestScope`] is a future wrapper
//! that installs its ID in that slot for the duration of every `poll` and restores the
//! previous value afterwards, so the binding follows the task across awaits and
//! threads, and concurrent tasks never see each other's ID. It needs nothing from the
//! runtime, so the same API works on glommio executors and on tokio (current-thread or
//! multi-thread) alike; the runtime-specific spawn helpers are behind the `tokio` and
//! `glommio` features.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::request_id::{IdVersion, RequestId};

thread_local! {
    /// The ID bound on this thread right now, if any.
    static CURRENT: Cell<Option<RequestId>> = const { Cell::new(None) };
}

/// The request ID bound to the code running now, if any.
pub fn current_request_id() -> Option<RequestId> {
    CURRENT.with(Cell::get)
}

/// Runs `f` with `id` bound, restoring the previous binding afterwards (also on panic).
pub fn with_request_id<R>(id: Option<RequestId>, f: impl FnOnce() -> R) -> R {
    let _guard = Guard::install(id);
    f()
}

/// Restores the previous binding when dropped.
struct Guard {
    /// The binding that was in force before this guard installed its own.
    previous: Option<RequestId>,
}

impl Guard {
    fn install(id: Option<RequestId>) -> Self {
        Self {
            previous: CURRENT.with(|c| c.replace(id)),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.previous));
    }
}

pin_project_lite::pin_project! {
    /// A future that runs with a request ID bound during every poll.
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub struct RequestScope<F> {
        // The ID installed around each poll of `inner`.
        id: Option<RequestId>,
        // The wrapped future.
        #[pin]
        inner: F,
    }
}

impl<F> RequestScope<F> {
    /// The ID this scope binds.
    pub fn request_id(&self) -> Option<RequestId> {
        self.id
    }
}

impl<F: Future> Future for RequestScope<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _guard = Guard::install(*this.id);
        this.inner.poll(cx)
    }
}

/// Binds `id` around every poll of `fut`.
pub fn scope<F: Future>(id: Option<RequestId>, fut: F) -> RequestScope<F> {
    RequestScope { id, inner: fut }
}

/// Binds the caller's current ID around every poll of `fut`: the way to hand a request's
/// ID to a task it spawns.
pub fn inherit<F: Future>(fut: F) -> RequestScope<F> {
    scope(current_request_id(), fut)
}

/// Binds a freshly generated ID around `fut`: for background jobs, each run of which is
/// its own traceable unit (the seeds' `with_request_id_context`).
pub fn background<F: Future>(version: IdVersion, fut: F) -> RequestScope<F> {
    scope(Some(RequestId::generate(version)), fut)
}

/// Spawns `fut` on the current tokio runtime; the task inherits the caller's ID.
#[cfg(feature = "tokio")]
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(inherit(fut))
}

/// Runs blocking work on tokio's blocking pool; the closure runs with the caller's
/// ID bound (a blocking thread has no task to carry it otherwise).
#[cfg(feature = "tokio")]
pub fn spawn_blocking<F, R>(f: F) -> tokio::task::JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let id = current_request_id();
    tokio::task::spawn_blocking(move || with_request_id(id, f))
}

/// Spawns a background job on the current tokio runtime under a fresh ID.
#[cfg(feature = "tokio")]
pub fn spawn_background<F>(version: IdVersion, fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(background(version, fut))
}

/// Spawns `fut` on the current glommio executor; the task inherits the caller's ID.
#[cfg(feature = "glommio")]
pub fn spawn_local<F>(fut: F) -> glommio::Task<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    glommio::spawn_local(inherit(fut))
}
