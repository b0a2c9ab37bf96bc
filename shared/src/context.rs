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

use crate::request_id::{IdVersion, RequestId, MAX_LEN};
use crate::trace::SpanContext;

/// What is bound on one thread: the ID (as its length and bytes, so that binding one
/// copies only the bytes it has rather than a whole 130-byte `Option<RequestId>`) and
/// the span.
struct Slot {
    /// Length of the bound ID in bytes; 0 when no ID is bound.
    len: Cell<u8>,
    /// The bound ID's bytes: the first `len` are meaningful.
    buf: Cell<[u8; MAX_LEN]>,
    /// The span bound right now, if any.
    span: Cell<Option<SpanContext>>,
}

thread_local! {
    /// The binding on this thread right now.
    static SLOT: Slot = const {
        Slot {
            len: Cell::new(0),
            buf: Cell::new([0; MAX_LEN]),
            span: Cell::new(None),
        }
    };
}

impl Slot {
    /// Whether nothing (neither ID nor span) is bound: the usual state between task
    /// polls, and the one a binding can be undone to without saving anything.
    fn is_unbound(&self) -> bool {
        self.len.get() == 0 && self.span.get().is_none()
    }

    fn id(&self) -> Option<RequestId> {
        let len = usize::from(self.len.get());
        if len == 0 {
            return None;
        }
        let cells: &Cell<[u8]> = &self.buf;
        let mut bytes = [0u8; MAX_LEN];
        for (b, c) in bytes.iter_mut().zip(&cells.as_slice_of_cells()[..len]) {
            *b = c.get();
        }
        Some(RequestId::from_valid_bytes(&bytes[..len]))
    }

    fn bind(&self, id: Option<&RequestId>, span: Option<SpanContext>) {
        match id {
            Some(id) => {
                let bytes = id.as_bytes();
                let cells: &Cell<[u8]> = &self.buf;
                for (c, &b) in cells.as_slice_of_cells().iter().zip(bytes) {
                    c.set(b);
                }
                // An ID is 1..=MAX_LEN (128) bytes, so its length fits a `u8` and is
                // never 0 (the "unbound" mark).
                self.len.set(bytes.len() as u8);
            }
            None => self.len.set(0),
        }
        self.span.set(span);
    }

    fn unbind(&self) {
        self.len.set(0);
        self.span.set(None);
    }
}

/// Runs `f` with `id` and `span` bound on this thread, and afterwards (also on panic)
/// restores what was bound before. When nothing was (a task polled by its executor at
/// top level), restoring is only clearing the slot; a binding nested in another one
/// saves the outer binding and puts it back.
#[inline]
fn enter<R>(id: Option<&RequestId>, span: Option<SpanContext>, f: impl FnOnce() -> R) -> R {
    SLOT.with(|slot| {
        if slot.is_unbound() {
            let _guard = Unbind(slot);
            slot.bind(id, span);
            f()
        } else {
            let _guard = Restore {
                slot,
                id: slot.id(),
                span: slot.span.get(),
            };
            slot.bind(id, span);
            f()
        }
    })
}

/// Clears the slot when dropped: undoes a binding made when nothing was bound.
struct Unbind<'a>(&'a Slot);

impl Drop for Unbind<'_> {
    fn drop(&mut self) {
        self.0.unbind();
    }
}

/// Puts the binding that was in force before back when dropped.
struct Restore<'a> {
    slot: &'a Slot,
    /// The ID binding that was in force before.
    id: Option<RequestId>,
    /// The span binding that was in force before.
    span: Option<SpanContext>,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        self.slot.bind(self.id.as_ref(), self.span);
    }
}

/// The request ID bound to the code running now, if any.
pub fn current_request_id() -> Option<RequestId> {
    SLOT.with(Slot::id)
}

/// The span (trace position) bound to the code running now, if any.
pub fn current_span() -> Option<SpanContext> {
    SLOT.with(|slot| slot.span.get())
}

/// Runs `f` with `id` bound and no span, restoring the previous binding afterwards
/// (also on panic).
pub fn with_request_id<R>(id: Option<RequestId>, f: impl FnOnce() -> R) -> R {
    enter(id.as_ref(), None, f)
}

/// Runs `f` under `id` with the current span when `id` is the current request's,
/// with none otherwise: a line about one circuit of a deployment, logged under the
/// request that created it, is traced when the deployment is that request's (a
/// warning that says why a creation failed is then found by its trace ID too).
pub fn with_origin_request<R>(id: Option<RequestId>, f: impl FnOnce() -> R) -> R {
    let span = current_span().filter(|_| id.is_some() && id == current_request_id());
    enter(id.as_ref(), span, f)
}

/// Runs `f` with `id` and `span` bound, restoring the previous binding afterwards.
pub fn with_request_context<R>(
    id: Option<RequestId>,
    span: Option<SpanContext>,
    f: impl FnOnce() -> R,
) -> R {
    enter(id.as_ref(), span, f)
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
        let inner = this.inner;
        enter(this.id.as_ref(), *this.span, || inner.poll(cx))
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

#[cfg(test)]
mod tests {
    use std::cell::Cell as StdCell;
    use std::future::Future;
    use std::panic::AssertUnwindSafe;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures_lite::FutureExt;
    use proptest::prelude::*;

    use super::*;
    use crate::trace::{SpanId, TraceId};

    /// The previous implementation, kept as the oracle: the whole binding copied into
    /// and out of plain cells around every poll.
    mod oracle {
        use std::cell::Cell;
        use std::future::Future;
        use std::pin::Pin;
        use std::task::{Context, Poll};

        use crate::request_id::RequestId;
        use crate::trace::SpanContext;

        thread_local! {
            static CURRENT: Cell<Option<RequestId>> = const { Cell::new(None) };
            static SPAN: Cell<Option<SpanContext>> = const { Cell::new(None) };
        }

        pub fn current_request_id() -> Option<RequestId> {
            CURRENT.with(Cell::get)
        }

        pub fn current_span() -> Option<SpanContext> {
            SPAN.with(Cell::get)
        }

        struct Guard {
            previous: Option<RequestId>,
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

        /// The old `RequestScope` (the body boxed, which the oracle does not mind).
        pub struct Scope {
            pub id: Option<RequestId>,
            pub span: Option<SpanContext>,
            pub inner: Pin<Box<dyn Future<Output = ()>>>,
        }

        impl Future for Scope {
            type Output = ();

            fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                let _guard = Guard::install(self.id, self.span);
                self.inner.as_mut().poll(cx)
            }
        }
    }

    fn id(s: &str) -> RequestId {
        s.parse().expect("valid id")
    }

    fn span(n: u8) -> SpanContext {
        SpanContext {
            trace_id: TraceId::from_bytes([n; 16]).expect("nonzero"),
            span_id: SpanId::from_bytes([n; 8]).expect("nonzero"),
            parent_span_id: None,
            flags: 1,
        }
    }

    /// Returns `Pending` once (waking itself), then `Ready`.
    struct YieldOnce(bool);

    impl Future for YieldOnce {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                Poll::Ready(())
            } else {
                self.0 = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    fn both() -> (Option<RequestId>, Option<SpanContext>) {
        (current_request_id(), current_span())
    }

    /// A line about one circuit of a deployment, under the request that created it:
    /// traced by the deployment's span when the deployment is that request's, not
    /// when it is another's (the span would name the wrong trace), and the binding
    /// before is back after.
    #[test]
    fn an_origin_request_keeps_the_span_only_when_it_is_the_current_one() {
        let (creating, other) = (id("creating"), id("another"));
        with_request_context(Some(creating), Some(span(3)), || {
            with_origin_request(Some(creating), || {
                assert_eq!(both(), (Some(creating), Some(span(3))));
            });
            with_origin_request(Some(other), || assert_eq!(both(), (Some(other), None)));
            with_origin_request(None, || assert_eq!(both(), (None, None)));
            assert_eq!(both(), (Some(creating), Some(span(3))));
        });
        with_origin_request(Some(creating), || {
            assert_eq!(both(), (Some(creating), None));
        });
    }

    #[test]
    fn nested_scope_restores_the_outer_binding_after_every_poll() {
        let (outer, inner) = (id("outer"), id("inner-id-longer-than-the-outer-one"));
        let (outer_span, inner_span) = (span(1), span(2));
        let inner_polls = StdCell::new(0u32);
        let polls = &inner_polls;
        futures_lite::future::block_on(scope_traced(Some(outer), Some(outer_span), async {
            let mut nested = std::pin::pin!(scope_traced(Some(inner), Some(inner_span), async {
                for _ in 0..3 {
                    polls.set(polls.get() + 1);
                    assert_eq!(both(), (Some(inner), Some(inner_span)));
                    YieldOnce(false).await;
                }
                7
            }));
            // Poll the inner scope by hand: after each poll, Pending or Ready, the
            // outer binding is back in force.
            let out = std::future::poll_fn(|cx| {
                let r = nested.as_mut().poll(cx);
                assert_eq!(both(), (Some(outer), Some(outer_span)));
                r
            })
            .await;
            assert_eq!(out, 7);
            assert_eq!(both(), (Some(outer), Some(outer_span)));
        }));
        assert_eq!(inner_polls.get(), 3);
        assert_eq!(both(), (None, None));
    }

    #[test]
    fn unbound_scope_inside_a_bound_one() {
        let outer = id("outer");
        futures_lite::future::block_on(scope_traced(Some(outer), Some(span(3)), async {
            scope(None, async {
                assert_eq!(both(), (None, None));
                YieldOnce(false).await;
                assert_eq!(both(), (None, None));
            })
            .await;
            assert_eq!(both(), (Some(outer), Some(span(3))));
            // A span with no ID, and an ID with no span, inside.
            scope_traced(None, Some(span(4)), async {
                assert_eq!(both(), (None, Some(span(4))));
                scope(Some(outer), async {
                    assert_eq!(both(), (Some(outer), None));
                })
                .await;
                assert_eq!(both(), (None, Some(span(4))));
            })
            .await;
            assert_eq!(both(), (Some(outer), Some(span(3))));
        }));
        assert_eq!(both(), (None, None));
    }

    #[test]
    fn a_panicking_inner_scope_still_restores() {
        let outer = id("outer");
        futures_lite::future::block_on(scope_traced(Some(outer), Some(span(5)), async {
            let caught = AssertUnwindSafe(scope(Some(id("doomed")), async {
                YieldOnce(false).await;
                panic!("inner future fails");
            }))
            .catch_unwind()
            .await;
            assert!(caught.is_err());
            assert_eq!(both(), (Some(outer), Some(span(5))));
        }));
        let caught = futures_lite::future::block_on(
            AssertUnwindSafe(scope(Some(outer), async { panic!("top-level failure") }))
                .catch_unwind(),
        );
        assert!(caught.is_err());
        assert_eq!(both(), (None, None));
        let caught = std::panic::catch_unwind(|| {
            with_request_id(Some(outer), || panic!("closure fails"));
        });
        assert!(caught.is_err());
        assert_eq!(both(), (None, None));
    }

    #[test]
    fn the_longest_id_round_trips_and_a_shorter_one_replaces_it_whole() {
        let long = id(&"L".repeat(MAX_LEN));
        let short = id("s");
        with_request_id(Some(long), || {
            assert_eq!(current_request_id(), Some(long));
            with_request_id(Some(short), || {
                let got = current_request_id().expect("bound");
                assert_eq!(got.as_str(), "s");
            });
            assert_eq!(current_request_id(), Some(long));
        });
        assert_eq!(current_request_id(), None);
    }

    #[test]
    fn request_scope_is_send_when_its_future_is() {
        fn assert_send<T: Send>(_: &T) {}
        let s = scope(Some(id("a")), async {});
        assert_send(&s);
    }

    /// A nesting program: observe the binding, yield, or run a nested scope.
    #[derive(Debug, Clone)]
    enum Op {
        Observe,
        Yield,
        Nested(Option<usize>, Option<u8>, Vec<Op>),
    }

    const IDS: [&str; 4] = [
        "a",
        "550e8400-e29b-41d4-a716-446655440000",
        "sess-msg-0000000a",
        "x.y_z:0123456789012345678901234567890123456789012345678901234567890123456789",
    ];

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        let leaf = prop_oneof![Just(Op::Observe), Just(Op::Yield)];
        let op = leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                Just(Op::Observe),
                Just(Op::Yield),
                (
                    proptest::option::of(0..IDS.len()),
                    proptest::option::of(1u8..4),
                    proptest::collection::vec(inner, 0..4)
                )
                    .prop_map(|(i, s, body)| Op::Nested(i, s, body)),
            ]
        });
        proptest::collection::vec(op, 0..6)
    }

    type Seen = Vec<(Option<RequestId>, Option<SpanContext>)>;

    fn run_new(
        ops: Vec<Op>,
        seen: std::rc::Rc<std::cell::RefCell<Seen>>,
    ) -> Pin<Box<dyn Future<Output = ()>>> {
        Box::pin(async move {
            for op in ops {
                match op {
                    Op::Observe => seen.borrow_mut().push(both()),
                    Op::Yield => YieldOnce(false).await,
                    Op::Nested(i, s, body) => {
                        scope_traced(
                            i.map(|i| id(IDS[i])),
                            s.map(span),
                            run_new(body, seen.clone()),
                        )
                        .await;
                        seen.borrow_mut().push(both());
                    }
                }
            }
        })
    }

    fn run_oracle(
        ops: Vec<Op>,
        seen: std::rc::Rc<std::cell::RefCell<Seen>>,
    ) -> Pin<Box<dyn Future<Output = ()>>> {
        Box::pin(async move {
            for op in ops {
                match op {
                    Op::Observe => seen
                        .borrow_mut()
                        .push((oracle::current_request_id(), oracle::current_span())),
                    Op::Yield => YieldOnce(false).await,
                    Op::Nested(i, s, body) => {
                        oracle::Scope {
                            id: i.map(|i| id(IDS[i])),
                            span: s.map(span),
                            inner: run_oracle(body, seen.clone()),
                        }
                        .await;
                        seen.borrow_mut()
                            .push((oracle::current_request_id(), oracle::current_span()));
                    }
                }
            }
        })
    }

    proptest! {
        #[test]
        fn matches_the_simple_implementation(
            top in (proptest::option::of(0..IDS.len()), proptest::option::of(1u8..4)),
            program in ops(),
        ) {
            let (i, s) = top;
            let new = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
            futures_lite::future::block_on(scope_traced(
                i.map(|i| id(IDS[i])),
                s.map(span),
                run_new(program.clone(), new.clone()),
            ));
            let old = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
            futures_lite::future::block_on(oracle::Scope {
                id: i.map(|i| id(IDS[i])),
                span: s.map(span),
                inner: run_oracle(program, old.clone()),
            });
            prop_assert_eq!(&*new.borrow(), &*old.borrow());
            prop_assert_eq!(both(), (None, None));
        }
    }
}
