//! The tower middleware of the tokio services: request-ID policy, context binding,
//! echo, and one access-log line per request.
//!
//! For each request it finds the ID ([`crate::header::extract`]), applies the policy,
//! rewrites the request so handlers see only the primary header with the resolved ID
//! (an invalid raw value is removed, never forwarded), stores the [`RequestId`] in the
//! request extensions, binds it around the handler (and everything the handler spawns
//! with [`crate::context::inherit`]), echoes it on the response when there is one, and
//! logs `target: "access"` with method, path, status, bytes, head_us, duration_us,
//! complete and request_id.
//!
//! **The access line is written when the response body ends**, not when its head is
//! ready: the response body is wrapped in an [`AccessBody`], which counts the data
//! bytes handed on to the connection and owns the line until it writes it, exactly
//! once, at the first of
//! - the body's end (`poll_frame` gave `None` or a trailers frame, the body reports
//!   `is_end_stream`, or all the bytes of its `Content-Length` went out):
//!   `complete: true`, unless it ended short of that length (below);
//! - a body error: `complete: false` and `error` (the error's text, at most
//!   [`MAX_ERROR_LEN`] bytes); a body that ends short of the `Content-Length` it
//!   announced counts as one (`error: "body ended short of its Content-Length: …"`);
//! - the body being dropped before its end (the client went away, the connection
//!   closed): `complete: false`.
//!
//! `bytes` is what was handed on (for a cut answer, what was sent up to the cut),
//! `head_us` the time from the request's arrival to the response head, `duration_us`
//! from the arrival to the line (the body's end). An answer with nothing to send (a
//! `HEAD`, a 1xx, 204 or 304, a body already at its end) is logged at once with
//! `bytes: 0`, `complete: true` and `duration_us` equal to `head_us`. hyper polls
//! and drops the body in its connection task, outside the request's scope, so the
//! body re-binds the request's ID and span and re-enters its line span (which holds
//! the `access_key` note) to write the line. When the service fails (`Err`), the line
//! is written at once with `status: "error"`, as there is no body. A request whose
//! connection closes before the service answers (the client went away, the server
//! stopped) is logged as its future is dropped: status 499 (nginx's "client closed
//! request"), `bytes: 0`, `complete: false` and the reason. So every request has
//! exactly one line.
//!
//! It also opens one span per request (W3C Trace Context, [`crate::trace`]): a valid
//! `traceparent` makes the span a child of the caller's; otherwise the span is a root
//! whose trace ID is derived from the request ID when that is a UUID. An invalid
//! `traceparent` or `tracestate` is dropped (logged at debug by reason only, never
//! raw). The handler sees `traceparent` naming this span as parent (what it forwards
//! to a next hop) and the validated `tracestate`; the [`SpanContext`] and
//! [`TraceState`] are in the request extensions; the span is bound with the ID, so
//! every line carries `trace_id`, `span_id` and `parent_span_id`; the response echoes
//! `traceparent`.
//!
//! A handler may add what it learns about the caller with [`note_access_key`] (the
//! manager's access key): it goes on every later line of the request (the access line
//! too) and, with OTLP export on (feature `otlp`), on the request's exported span.
//! The exported span ends with the access line (at the body's end), so its duration
//! is the line's `duration_us`.

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Buf;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tower_layer::Layer;
use tower_service::Service;

use crate::context::{scope_traced, with_request_context};
use crate::header::{self, IdPolicy, Origin, INPUT_HEADERS, PRIMARY_HEADER};
use crate::request_id::{IdVersion, RequestId};
use crate::trace::{
    InvalidTraceParent, InvalidTraceState, SpanContext, TraceParent, TraceState, TRACEPARENT,
    TRACESTATE,
};

/// Layer that wraps a service in [`RequestIdService`].
#[derive(Debug, Clone, Copy)]
pub struct RequestIdLayer {
    /// What to do when a request has no usable ID.
    policy: IdPolicy,
    /// UUID version of generated IDs.
    version: IdVersion,
}

impl RequestIdLayer {
    /// A layer applying `policy`, generating `version` IDs when it generates.
    pub fn new(policy: IdPolicy, version: IdVersion) -> Self {
        Self { policy, version }
    }
}

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService {
            inner,
            policy: self.policy,
            version: self.version,
        }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct RequestIdService<S> {
    /// The wrapped service.
    inner: S,
    /// What to do when a request has no usable ID.
    policy: IdPolicy,
    /// UUID version of generated IDs.
    version: IdVersion,
}

/// The boxed response future (the control plane is not the hot path; one box per
/// request keeps the types readable).
pub type ResponseFuture<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S, ReqB, ResB> Service<Request<ReqB>> for RequestIdService<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Send + 'static,
    ResB: Body + Send + 'static,
{
    type Response = Response<AccessBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let extracted = header::extract(
            req.headers()
                .iter()
                .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
        );
        let (id, origin) = header::resolve(self.policy, extracted, self.version);
        normalize_request_headers(&mut req, id);
        if let Some(id) = id {
            req.extensions_mut().insert(id);
        }
        let trace = read_trace_headers(req.headers());
        let span = SpanContext::start(trace.parent.as_ref().ok(), id.as_ref());
        let traceparent = span.traceparent();
        normalize_trace_headers(&mut req, &span, trace.state.as_ref());
        req.extensions_mut().insert(span);
        if let Some(Ok(state)) = &trace.state {
            req.extensions_mut().insert(state.clone());
        }
        let method = req.method().clone();
        let path = shown_path(req.uri().path());
        let started = Instant::now();
        let notes = Arc::new(Mutex::new(Notes {
            access_key: None,
            tracestate: match &trace.state {
                Some(Ok(state)) if !state.is_empty() => Some(state.clone()),
                _ => None,
            },
        }));
        let line_span = tracing::info_span!("request", access_key = tracing::field::Empty);
        // The service that was made ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // The line exists from the start: a request whose connection closes before
        // its answer (the client went away, the server stopped) is logged as the
        // future is dropped (499, as nginx logs it).
        let mut unanswered = Unanswered(Some(AccessLine {
            id,
            span,
            line_span: line_span.clone(),
            notes: notes.clone(),
            method: req.method().clone(),
            path: path.clone(),
            status: 0,
            started,
            head_us: 0,
        }));
        let fut = async move {
            if origin == Origin::Replaced {
                tracing::debug!("invalid request id replaced by a generated one");
            }
            if let Err(Some(reason)) = &trace.parent {
                tracing::debug!(reason = %reason, "invalid traceparent ignored");
            }
            if let Some(Err(reason)) = &trace.state {
                tracing::debug!(reason = %reason, "invalid tracestate dropped");
            }
            let result = inner.call(req).await;
            let head = started.elapsed();
            // Only this line takes it, once: the future ends here.
            let Some(mut line) = unanswered.0.take() else {
                unreachable!("the access line is taken only once the service answered");
            };
            line.head_us = micros(head);
            match result {
                Ok(mut resp) => {
                    if let Some(id) = id {
                        if let Ok(value) = HeaderValue::from_bytes(id.as_bytes()) {
                            resp.headers_mut().insert(PRIMARY_HEADER, value);
                        }
                    }
                    if let Ok(value) = HeaderValue::from_bytes(traceparent.as_bytes()) {
                        resp.headers_mut().insert(TRACEPARENT, value);
                    }
                    let status = resp.status();
                    let nothing_to_send = method == Method::HEAD
                        || status.is_informational()
                        || status == StatusCode::NO_CONTENT
                        || status == StatusCode::NOT_MODIFIED
                        || resp.body().is_end_stream();
                    let expected =
                        content_length(resp.headers()).or_else(|| resp.body().size_hint().exact());
                    line.status = status.as_u16();
                    Ok(resp.map(|body| AccessBody::new(body, line, expected, nothing_to_send)))
                }
                Err(e) => {
                    #[cfg(feature = "otlp")]
                    export_span(&span, id.as_ref(), &method, &path, 0, &line.notes, head);
                    drop(line);
                    tracing::info!(
                        target: "access",
                        method = %method,
                        path = %path,
                        status = "error",
                        duration_us = micros(head),
                        "request"
                    );
                    Err(e)
                }
            }
        };
        Box::pin(scope_traced(
            id,
            Some(span),
            tracing::Instrument::instrument(WithNotes { notes, inner: fut }, line_span),
        ))
    }
}

/// A duration in whole microseconds (saturating).
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The response's `Content-Length`, when it has exactly one that is a number: hyper
/// frames the answer by it, and stops polling the body once that many bytes went out.
fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => v.to_str().ok()?.trim().parse().ok(),
        _ => None,
    }
}

/// The longest `error` text an access line carries, in bytes (cut at a character
/// boundary).
pub const MAX_ERROR_LEN: usize = 256;

/// Everything the access line of a request needs once its head is out: owned by the
/// [`AccessBody`] until the line is written.
struct AccessLine {
    /// The request's ID, re-bound when the line is written.
    id: Option<RequestId>,
    /// The request's span, re-bound when the line is written.
    span: SpanContext,
    /// The request's line span (it holds the `access_key` field), re-entered when the
    /// line is written.
    line_span: tracing::Span,
    /// What the handler noted (the OTLP span's access key).
    #[cfg_attr(not(feature = "otlp"), allow(dead_code))]
    notes: Arc<Mutex<Notes>>,
    /// The request's method.
    method: Method,
    /// The request's path as logged ([`shown_path`]).
    path: String,
    /// The response's status code.
    status: u16,
    /// When the request arrived.
    started: Instant,
    /// Arrival to response head, in microseconds.
    head_us: u64,
}

/// How a response body ended, for its access line.
enum BodyEnd {
    /// It reached its end: everything was handed on.
    Complete,
    /// It was dropped before its end (client gone, connection closed).
    Dropped,
    /// It failed; the error's text, bounded.
    Error(String),
}

impl AccessLine {
    /// Writes the access line (and, OTLP on, exports the span) inside the request's
    /// context: its ID and span bound, its line span entered. `bytes` were handed on.
    fn write(self, bytes: u64, end: BodyEnd, at_head: bool) {
        let elapsed = if at_head {
            Duration::from_micros(self.head_us)
        } else {
            self.started.elapsed()
        };
        let duration_us = micros(elapsed).max(self.head_us);
        let (complete, error) = match &end {
            BodyEnd::Complete => (true, None),
            BodyEnd::Dropped => (false, None),
            BodyEnd::Error(text) => (false, Some(text.as_str())),
        };
        with_request_context(self.id, Some(self.span), || {
            self.line_span.in_scope(|| {
                tracing::info!(
                    target: "access",
                    method = %self.method,
                    path = %self.path,
                    status = self.status,
                    bytes,
                    head_us = self.head_us,
                    duration_us,
                    complete,
                    error,
                    "request"
                );
            });
        });
        #[cfg(feature = "otlp")]
        export_span(
            &self.span,
            self.id.as_ref(),
            &self.method,
            &self.path,
            self.status,
            &self.notes,
            elapsed,
        );
    }
}

/// The access line of a request not answered yet: written, if the request's future
/// is dropped before the service answers (its connection closed: the client went
/// away, or the server stopped), with status 499 (nginx's "client closed request"),
/// `bytes: 0`, `complete: false` and the reason.
struct Unanswered(Option<AccessLine>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(mut line) = self.0.take() {
            line.status = 499;
            line.head_us = micros(line.started.elapsed());
            line.write(
                0,
                BodyEnd::Error("the connection closed before the answer".into()),
                true,
            );
        }
    }
}

/// `text` cut to at most [`MAX_ERROR_LEN`] bytes at a character boundary.
fn bounded(mut text: String) -> String {
    if text.len() > MAX_ERROR_LEN {
        let mut cut = MAX_ERROR_LEN;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

pin_project_lite::pin_project! {
    /// The response body of [`RequestIdService`]: the handler's body `B`, unchanged
    /// on the wire (same frames, same `size_hint` and `is_end_stream`, so hyper still
    /// sends `Content-Length` for a fixed-length answer), counting the data bytes it
    /// hands on. It owns the request's access line until it writes it, exactly once:
    /// at the body's end (`complete: true`), at a body error (`complete: false` and
    /// `error`) or when dropped before its end (`complete: false`); see the module
    /// documentation.
    pub struct AccessBody<B> {
        // The handler's body.
        #[pin]
        inner: B,
        // Data bytes handed on so far.
        bytes: u64,
        // The `Content-Length` the answer is framed by (or the body's exact size):
        // once that many bytes went out the body is complete, even if hyper drops it
        // without polling it to its end.
        expected: Option<u64>,
        // The access line, until it is written.
        line: Option<Box<AccessLine>>,
    }

    impl<B> PinnedDrop for AccessBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            finish(this.line, *this.bytes, *this.expected, |sent, expected| {
                if expected.is_some_and(|n| sent >= n) {
                    BodyEnd::Complete
                } else {
                    BodyEnd::Dropped
                }
            });
        }
    }
}

/// Writes the access line, if it is still to be written, for a body that handed on
/// `bytes` (logged as at most `expected`: hyper cuts a frame that runs past the
/// `Content-Length`), ended as `end` says of them.
fn finish(
    line: &mut Option<Box<AccessLine>>,
    bytes: u64,
    expected: Option<u64>,
    end: impl FnOnce(u64, Option<u64>) -> BodyEnd,
) {
    if let Some(line) = line.take() {
        line.write(
            expected.map_or(bytes, |n| bytes.min(n)),
            end(bytes, expected),
            false,
        );
    }
}

/// How a body that ended after `bytes` ended: complete, or short of the
/// `Content-Length` it announced (a file cut while read: the client sees it cut).
fn ended_at(bytes: u64, expected: Option<u64>) -> BodyEnd {
    match expected {
        Some(n) if bytes < n => BodyEnd::Error(format!(
            "body ended short of its Content-Length: {bytes} of {n} bytes"
        )),
        _ => BodyEnd::Complete,
    }
}

impl<B> AccessBody<B> {
    /// Wraps `inner`; with `nothing_to_send` the line is written now (`bytes: 0`,
    /// `complete: true`).
    fn new(inner: B, line: AccessLine, expected: Option<u64>, nothing_to_send: bool) -> Self {
        let line = if nothing_to_send {
            line.write(0, BodyEnd::Complete, true);
            None
        } else {
            Some(Box::new(line))
        };
        Self {
            inner,
            bytes: 0,
            expected,
            line,
        }
    }
}

impl<B> fmt::Debug for AccessBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessBody")
            .field("bytes", &self.bytes)
            .field("expected", &self.expected)
            .field("logged", &self.line.is_none())
            .finish_non_exhaustive()
    }
}

impl<B> Body for AccessBody<B>
where
    B: Body,
    B::Error: fmt::Display,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let polled = match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(polled) => polled,
            Poll::Pending => return Poll::Pending,
        };
        match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    *this.bytes += data.remaining() as u64;
                }
                // Trailers are the last frame (hyper drops the body after them);
                // a body may also say it has ended with its last frame. Either
                // ends the answer, as `None` does. hyper also stops at the
                // `Content-Length`: all of it sent is the end too.
                let ended = frame.is_trailers() || this.inner.is_end_stream();
                if ended || this.expected.is_some_and(|n| *this.bytes >= n) {
                    finish(this.line, *this.bytes, *this.expected, ended_at);
                }
            }
            Some(Err(e)) => finish(this.line, *this.bytes, *this.expected, |_, _| {
                BodyEnd::Error(bounded(e.to_string()))
            }),
            None => finish(this.line, *this.bytes, *this.expected, ended_at),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a handler learned about the caller, for the request's lines and span.
#[derive(Debug, Default)]
struct Notes {
    /// The access key of the manager's token.
    access_key: Option<String>,
    /// The request's validated, non-empty `tracestate`.
    tracestate: Option<TraceState>,
}

thread_local! {
    /// The notes of the request being polled on this thread, if any.
    static NOTES: RefCell<Option<Arc<Mutex<Notes>>>> = const { RefCell::new(None) };
}

pin_project_lite::pin_project! {
    /// Makes a request's [`Notes`] reachable by [`note_access_key`] during every poll.
    struct WithNotes<F> {
        notes: Arc<Mutex<Notes>>,
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for WithNotes<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let previous = NOTES.with(|n| n.replace(Some(this.notes.clone())));
        let out = this.inner.poll(cx);
        NOTES.with(|n| *n.borrow_mut() = previous);
        out
    }
}

/// Puts the manager's access key on the current request: every line logged after
/// this inside the request, its access line and (OTLP on) its span carry
/// `access_key`. Only the key, never a secret; a value that is not 1-64 printable
/// ASCII characters is ignored. Outside a request of this middleware: nothing.
pub fn note_access_key(access_key: &str) {
    if access_key.is_empty()
        || access_key.len() > 64
        || !access_key.bytes().all(|b| b.is_ascii_graphic())
    {
        return;
    }
    let noted = NOTES.with(|n| {
        let slot = n.borrow();
        let Some(notes) = slot.as_ref() else {
            return false;
        };
        if let Ok(mut notes) = notes.lock() {
            notes.access_key = Some(access_key.to_owned());
        }
        true
    });
    if noted {
        tracing::Span::current().record("access_key", access_key);
    }
}

/// The validated `tracestate` of the request being handled (by this middleware) on
/// this task, for a next hop that is not an HTTP call (a circuit event's metadata).
pub fn current_tracestate() -> Option<TraceState> {
    NOTES.with(|n| {
        n.borrow()
            .as_ref()
            .and_then(|notes| notes.lock().ok().and_then(|g| g.tracestate.clone()))
    })
}

/// The trace context to hand on for `span` when the next hop is not an HTTP call (a
/// circuit event's metadata, a stored circuit change): `span` as the parent, with the
/// request's validated `tracestate` only when `span` is the span of the request being
/// handled on this task (another span's, a health check's, gets none).
pub fn trace_context_of(span: SpanContext) -> crate::trace::TraceContext {
    let tracestate = (Some(span) == crate::current_span())
        .then(current_tracestate)
        .flatten();
    crate::trace::TraceContext::of_span(&span, tracestate)
}

/// The trace context of the request being handled on this task (its span as the
/// next hop's parent, with its validated `tracestate`), for what it stores or
/// publishes; `None` outside a traced request.
pub fn current_trace_context() -> Option<crate::trace::TraceContext> {
    crate::current_span().map(trace_context_of)
}

/// Hands the request's span to the OTLP exporter, when one is installed.
#[cfg(feature = "otlp")]
fn export_span(
    span: &SpanContext,
    id: Option<&RequestId>,
    method: &http::Method,
    path: &str,
    status: u16,
    notes: &Mutex<Notes>,
    elapsed: std::time::Duration,
) {
    use crate::otlp::{self, Inline, Kind, SpanRecord};
    if !otlp::enabled() {
        return;
    }
    let mut record = SpanRecord::new(*span, Kind::Server, "request");
    record.ended_now(elapsed);
    record.request_id = id.copied();
    record.method = Inline::new(method.as_str());
    record.path = Inline::new(path);
    record.status = status;
    if let Ok(notes) = notes.lock() {
        if let Some(ak) = &notes.access_key {
            record.access_key = Inline::new(ak);
        }
    }
    otlp::export(&record);
}

/// Leaves exactly one request-ID header on the request: the primary one with the
/// resolved ID, or none.
fn normalize_request_headers<B>(req: &mut Request<B>, id: Option<RequestId>) {
    for name in INPUT_HEADERS {
        req.headers_mut().remove(name);
    }
    if let Some(id) = id {
        if let Ok(value) = HeaderValue::from_bytes(id.as_bytes()) {
            req.headers_mut().insert(PRIMARY_HEADER, value);
        }
    }
}

/// The trace headers of a request, validated.
struct TraceHeaders {
    /// The caller's `traceparent`: `Err(None)` when absent, `Err(Some(reason))` when
    /// invalid (two headers count as invalid).
    parent: Result<TraceParent, Option<InvalidTraceParent>>,
    /// The caller's `tracestate` (all header lines joined), only looked at when the
    /// `traceparent` is valid.
    state: Option<Result<TraceState, InvalidTraceState>>,
}

fn read_trace_headers(headers: &http::HeaderMap) -> TraceHeaders {
    let mut values = headers.get_all(TRACEPARENT).iter();
    let parent = match (values.next(), values.next()) {
        (None, _) => Err(None),
        (Some(v), None) => TraceParent::parse(v.as_bytes()).map_err(Some),
        (Some(_), Some(_)) => Err(Some(InvalidTraceParent::Shape)),
    };
    let state = if parent.is_ok() {
        let mut lines = headers.get_all(TRACESTATE).iter().peekable();
        lines.peek().is_some().then(|| {
            let mut joined = Vec::new();
            for (i, v) in lines.enumerate() {
                if i > 0 {
                    joined.push(b',');
                }
                joined.extend_from_slice(v.as_bytes());
            }
            TraceState::parse(&joined)
        })
    } else {
        None
    };
    TraceHeaders { parent, state }
}

/// Leaves the handler this span's `traceparent` and the validated `tracestate` (when
/// there is a non-empty one), and nothing the caller sent raw.
fn normalize_trace_headers<B>(
    req: &mut Request<B>,
    span: &SpanContext,
    state: Option<&Result<TraceState, InvalidTraceState>>,
) {
    req.headers_mut().remove(TRACEPARENT);
    req.headers_mut().remove(TRACESTATE);
    if let Ok(value) = HeaderValue::from_bytes(span.traceparent().as_bytes()) {
        req.headers_mut().insert(TRACEPARENT, value);
    }
    if let Some(Ok(state)) = state {
        if !state.is_empty() {
            if let Ok(value) = HeaderValue::from_str(state.as_str()) {
                req.headers_mut().insert(TRACESTATE, value);
            }
        }
    }
}

/// A request's path as it is logged, with the bearer capabilities a path can carry
/// shown as `***`, so that whoever reads the logs cannot use them:
/// - the token of the deprecated `/v2/proxy/{token}/{session}/add` (a setup token,
///   a UUID: with the session ID, all `/v2/proxy/auth` needs): the segment after
///   `/v2/proxy/` of any path but `/v2/proxy/auth` (a cut or mangled add path is
///   hidden too);
/// - any segment that is a JWT.
pub fn shown_path(path: &str) -> String {
    let add_token = path
        .strip_prefix("/v2/proxy/")
        .and_then(|rest| rest.split('/').next())
        .is_some_and(|segment| !segment.is_empty() && segment != "auth");
    if !add_token && !path.contains("eyJ") {
        return path.to_owned();
    }
    path.split('/')
        .enumerate()
        .map(|(i, segment)| {
            let jwt = segment.starts_with("eyJ")
                && segment.bytes().filter(|&b| b == b'.').count() == 2
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='));
            // Segment 3 of "/v2/proxy/{token}/...": "", "v2", "proxy", token.
            if jwt || (add_token && i == 3) {
                "***"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod shown_path_tests {
    use super::shown_path;

    #[test]
    fn a_token_in_a_path_is_never_logged() {
        for (path, shown) in [
            ("/v2/conf", "/v2/conf"),
            (
                "/v2/proxy/eyJhbGciOiJIUzI1NiJ9.eyJzIjoxfQ.c2ln-_x/sess-1/add",
                "/v2/proxy/***/sess-1/add",
            ),
            ("/files/eyJnot-a-token", "/files/eyJnot-a-token"),
            ("/a/eyJ.b.c%2F/d", "/a/eyJ.b.c%2F/d"),
            (
                "/v2/proxy/5f1c3a9e-8c1e-4d2a-9a57-0b6f1f3c2d10/sess-1/add",
                "/v2/proxy/***/sess-1/add",
            ),
            ("/v2/proxy/not-a-token/x", "/v2/proxy/***/x"),
            // Cut short, or its slashes encoded: a 404, logged without the token.
            (
                "/v2/proxy/5f1c3a9e-8c1e-4d2a-9a57-0b6f1f3c2d10",
                "/v2/proxy/***",
            ),
            (
                "/v2/proxy/5f1c3a9e-8c1e-4d2a-9a57-0b6f1f3c2d10%2Fs%2Fadd",
                "/v2/proxy/***",
            ),
            ("/v2/proxy/auth", "/v2/proxy/auth"),
            ("/v2/proxy/auth/x", "/v2/proxy/auth/x"),
            ("/v2/proxy/", "/v2/proxy/"),
            ("/v1/proxy/a/b", "/v1/proxy/a/b"),
        ] {
            assert_eq!(shown_path(path), shown, "{path}");
        }
    }
}
