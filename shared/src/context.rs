//! The request-ID context: which request the code running right now belongs to.
//!
//! The current ID lives in a thread-local slot. [`RequestScope`] is a future wrapper
//! that installs its ID in that slot for the duration of every `poll` and restores the
//! previous value afterwards, so the binding follows the task across awaits and
//! threads, and concurrent tasks never see each other's ID. It needs nothing from the
//! runtime, so the same API works on glommio executors and on tokio (current-thread or
//! multi-thread) alike; the runtime-specific spawn helpers are behind the `tokio` and
//! `glommio` features.
//!
//! Beside the ID, the same slot mechanism carries the request's trace position (a
//! [`SpanContext`]: trace, span and parent span IDs) for the components that trace.
//! [`scope`] and [`with_request_id`] bind an ID with no span; [`scope_traced`] and
//! [`with_request_context`] bind both; [`inherit`] hands both on.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::request_id::{IdVersion, RequestId};
use crate::trace::SpanContext;

thread_local! {
    /// The ID bound on this thread right now, if any.
    static CURRENT: Cell<Option<RequestId>> = const { Cell::new(None) };
    /// The span bound on this thread right now, if any.
    static SPAN: Cell<Option<SpanContext>> = const { Cell::new(None) };
}

/// The request ID bound to the code running now, if any.
pub fn current_request_id() -> Option<RequestId> {
    CURRENT.with(Cell::get)
}

/// The span (trace position) bound to the code running now, if any.
pub fn current_span() -> Option<SpanContext> {
    SPAN.with(Cell::get)
}

/// Runs `f` with `id` bound and no span, restoring the previous binding afterwards
/// (also on panic).
pub fn with_request_id<R>(id: Option<RequestId>, f: impl FnOnce() -> R) -> R {
    let _guard = Guard::install(id, None);
    f()
}

/// Runs `f` with `id` and `span` bound, restoring the previous binding afterwards.
pub fn with_request_context<R>(
    id: Option<RequestId>,
    span: Option<SpanContext>,
    f: impl FnOnce() -> R,
) -> R {
    let _guard = Guard::install(id, span);
    f()
}

/// Restores the previous binding when dropped.
struct Guard {
    /// The ID binding that was in force before this guard installed its own.
    previous: Option<RequestId>,
    /// The span binding that was in force before.
    previous_span: Option<SpanContext>,
}

impl Guard {
    fn install(id: Option<RequestId>, span: Option<SpanContext>) -> Self {
        Self {
            previous: CURRENT.with(|c| c.replace(id)),
            previous_span: SPAN.with(|c| c.replace(span)),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.previous));
        SPAN.with(|c| c.set(self.previous_span));
    }
}

pin_project_lite::pin_project! {
    /// A future that runs with a request ID bound during every poll.
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub struct RequestScope<F> {
        // The ID installed around each poll of `inner`.
        id: Option<RequestId>,
        // The span installed around each poll of `inner`.
        span: Option<SpanContext>,
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

    /// The span this scope binds.
    pub fn span(&self) -> Option<SpanContext> {
        self.span
    }
}

impl<F: Future> Future for RequestScope<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _guard = Guard::install(*this.id, *this.span);
        this.inner.poll(cx)
    }
}

/// Binds `id` (and no span) around every poll of `fut`.
pub fn scope<F: Future>(id: Option<RequestId>, fut: F) -> RequestScope<F> {
    scope_traced(id, None, fut)
}

/// Binds `id` and `span` around every poll of `fut`.
pub fn scope_traced<F: Future>(
    id: Option<RequestId>,
    span: Option<SpanContext>,
    fut: F,
) -> RequestScope<F> {
    RequestScope {
        id,
        span,
        inner: fut,
    }
}

/// Binds the caller's current ID and span around every poll of `fut`: the way to hand
/// a request's context to a task it spawns.
pub fn inherit<F: Future>(fut: F) -> RequestScope<F> {
    scope_traced(current_request_id(), current_span(), fut)
}

/// Binds the caller's current ID and a child of its span (same trace, new span, the
/// caller's span as parent) around `fut`: for a sub-task worth its own span, such as a
/// background job a request starts.
pub fn inherit_child<F: Future>(fut: F) -> RequestScope<F> {
    scope_traced(current_request_id(), current_span().map(|s| s.child()), fut)
}

/// Binds a freshly generated ID around `fut`: for background jobs, each run of which is
/// its own traceable unit (the seeds' `with_request_id_context`).
pub fn background<F: Future>(version: IdVersion, fut: F) -> RequestScope<F> {
    scope(Some(RequestId::generate(version)), fut)
}

/// Spawns `fut` on the current tokio runtime; the task inherits the caller's ID and span.
#[cfg(feature = "tokio")]
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(inherit(fut))
}

/// Spawns `fut` on the current tokio runtime in a child span of the caller's (same
/// request ID and trace, a new span whose parent is the caller's): for background jobs
/// a request starts, so the job is its own hop in the trace.
#[cfg(feature = "tokio")]
pub fn spawn_child<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    #[cfg(feature = "otlp")]
    let fut = exported_job(fut);
    tokio::spawn(inherit_child(fut))
}

/// Runs `fut` (inside the job's child span) and hands the span to the OTLP exporter
/// when it ends: an internal span named `background job` under the request's.
#[cfg(all(feature = "tokio", feature = "otlp"))]
async fn exported_job<F: Future>(fut: F) -> F::Output {
    let started = std::time::Instant::now();
    let out = fut.await;
    if crate::otlp::enabled() {
        if let Some(span) = current_span() {
            let mut r =
                crate::otlp::SpanRecord::new(span, crate::otlp::Kind::Internal, "background job");
            r.ended_now(started.elapsed());
            r.request_id = current_request_id();
            crate::otlp::export(&r);
        }
    }
    out
}

/// Runs blocking work on tokio's blocking pool; the closure runs with the caller's
/// ID and span bound (a blocking thread has no task to carry it otherwise).
#[cfg(feature = "tokio")]
pub fn spawn_blocking<F, R>(f: F) -> tokio::task::JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let id = current_request_id();
    let span = current_span();
    tokio::task::spawn_blocking(move || with_request_context(id, span, f))
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
