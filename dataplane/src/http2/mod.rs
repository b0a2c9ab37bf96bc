//! HTTP/2 on the worker: client connections (ALPN `h2` over TLS, prior-knowledge
//! `h2c` in the clear) served with the `h2` crate over the per-core reactor
//! ([`io::H2Io`]), each stream handled like an HTTP/1.1 request ([`stream`]), and
//! `http2`/`grpc` circuits proxied to their apps over HTTP/2 ([`upstream`]).
//!
//! This module owns the connection: the `h2` server with the `[http2]` bounds, the
//! connection's deadlines (head timeout until the first stream, keep-alive timeout
//! while no stream is open, the head timeout again once a frame or header block is
//! begun then and not finished, none while streams run: each stream times its own
//! waits), `GOAWAY` on drain and on every close while idle, and the connection's
//! log line naming its streams.

pub mod bridge;
pub mod budget;
mod h1_body;
pub mod io;
pub mod stream;
pub mod upstream;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use appproxy_shared::rate_floor::RateFloor;
use appproxy_shared::RequestId;
use bytes::Bytes;

use crate::core::{counter, Core};
use crate::http::encode::ClientHop;
use crate::io::TcpConn;
use crate::reactor::Reactor;

/// The client connection preface of RFC 9113 §3.4.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Stream request IDs named on the connection's log line (the count is always
/// there).
const LOGGED_IDS: usize = 16;

/// How long a draining connection whose streams are all done has to flush its last
/// frames (`GOAWAY`, the final responses) and close: its I/O waits time out after it.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// How long a connection closed while idle (its keep-alive or head timeout passed,
/// or the connection cap shed it) has to flush its `GOAWAY` before it is cut.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How long a stream the worker reset is remembered, so that frames the client sent
/// before it saw the reset are dropped rather than answered with a reset of their
/// own (round trips of far clients, and bodies queued behind other streams' frames).
const RESET_STREAM_MEMORY: Duration = Duration::from_secs(10);

/// How long the resets a client makes are weighed together ([`ConnCtx`]'s
/// `resets_too_many`). A client that resets more streams once their work began
/// than its stream cap within a window, and more than half of those streams, is
/// cut; one that cancels streams now and then (a video player seeking, map tiles
/// scrolled past, gRPC calls cancelled, an `EventSource` closed) is weighed afresh
/// each window rather than over the connection's whole life, where its
/// cancellations added up. What the rule does not stop, and the in-flight cap
/// bounds: a client that pads each reset with an app request it reads whole, or
/// opens a new connection every stream cap's worth of resets, costs an app
/// connection (or a connect, abandoned at the reset) per reset, in proportion to
/// what it sends (the per-client request rate, when set, bounds that too).
const RESET_WINDOW: Duration = Duration::from_secs(60);

/// Streams whose work began (routed, admitted, handed to an app) and those of them
/// the client reset, counted since `since`.
#[derive(Debug, Clone, Copy)]
struct ResetWindow {
    since: Instant,
    worked: u64,
    resets: u64,
}

impl ResetWindow {
    fn new(since: Instant) -> Self {
        Self {
            since,
            worked: 0,
            resets: 0,
        }
    }
}

/// What the streams of one client connection share.
pub struct ConnCtx {
    /// The core.
    pub core: Rc<Core>,
    /// The socket (deadlines are set here; the `h2` driver does the I/O).
    conn: Rc<TcpConn>,
    /// The client hop facts forwarded to apps.
    pub hop: ClientHop,
    /// Streams being handled now.
    active: Cell<usize>,
    /// Streams accepted so far.
    streams: Cell<u64>,
    /// The first [`LOGGED_IDS`] streams' request IDs.
    ids: RefCell<Vec<RequestId>>,
    /// Streams whose work began and those the client reset, this window's.
    resets: Cell<ResetWindow>,
    /// The connection is over (its `h2` driver gone, maybe lingering): a stream
    /// whose handling ends after it leaves the socket's deadline and reusability to
    /// the lingering close.
    ended: Cell<bool>,
    /// In its lingering close while streams were still being handled (not to be
    /// closed for a new connection at the cap until the last of them ends).
    lingering_held: Cell<bool>,
    /// The timeouts between requests, shared with the connection's [`io::H2Io`].
    between: Rc<io::Between>,
    /// The connection's per-core number (the pool holds some app connections for
    /// the client they last served).
    pub conn_id: u64,
}

impl ConnCtx {
    /// A stream was accepted: the connection is busy (no idle deadline).
    fn stream_opened(&self) {
        if self.active.get() == 0 {
            self.between.busy();
            self.conn.set_deadline(None);
            self.conn.set_reusable(false, false);
        }
        self.active.set(self.active.get() + 1);
        self.streams.set(self.streams.get() + 1);
        self.core.metrics.add(counter::H2_STREAMS, 1);
        self.core.metrics.add(counter::H2_STREAMS_ACTIVE, 1);
    }

    /// A stream's handling ended: with none left, the keep-alive timeout runs. When
    /// draining, the connection is not idle (drain would cut it before its `GOAWAY`
    /// and last frames are out): it has [`DRAIN_GRACE`] to flush them and close
    /// itself. After the connection ended, the socket is the lingering close's.
    fn stream_closed(&self) {
        let n = self.active.get().saturating_sub(1);
        self.active.set(n);
        self.core.metrics.sub(counter::H2_STREAMS_ACTIVE, 1);
        if n == 0 && self.ended.get() {
            if self.lingering_held.get() {
                // The socket is the lingering close's alone now: it may make room
                // for a new connection at the cap.
                self.conn.set_reusable(true, true);
            }
        } else if n == 0 {
            if self.core.draining.get() {
                self.conn.set_timeout(DRAIN_GRACE);
            } else {
                let rt = &self.core.rt;
                self.between
                    .now_idle(&self.conn, rt.keepalive_timeout, rt.head_timeout);
                self.conn.set_reusable(true, true);
            }
        }
    }

    /// The reset window as of now, begun again once [`RESET_WINDOW`] has passed.
    fn reset_window(&self) -> ResetWindow {
        let now = self.core.reactor.now();
        let w = self.resets.get();
        if now.saturating_duration_since(w.since) >= RESET_WINDOW {
            ResetWindow::new(now)
        } else {
            w
        }
    }

    /// A stream's work began: it goes to an app.
    pub fn note_work(&self) {
        let mut w = self.reset_window();
        w.worked += 1;
        self.resets.set(w);
    }

    /// A stream was reset by the client while its request was being worked on
    /// (once per stream: the stream's work ends with it), in any phase: waiting for
    /// the app's head, sending the request's body, relaying the answer (the client's
    /// stream reset or closed as DATA goes out, or while the app is silent; a reset
    /// the `h2` library made for the client's own protocol error on the stream
    /// counts as the client's).
    pub fn note_client_reset(&self) {
        let mut w = self.reset_window();
        w.resets += 1;
        self.resets.set(w);
    }

    /// Notes `e`, an error of the client's side of a stream whose work began, as the
    /// client's reset when the client sent it (`RST_STREAM`, or a `GOAWAY` ending the
    /// stream).
    pub fn note_client_error(&self, e: &h2::Error) {
        if e.is_remote() {
            self.note_client_reset();
        }
    }

    /// Whether the client resets streams like an attacker: within one
    /// [`RESET_WINDOW`], more than the streams it may have open at once, and more
    /// than half of the streams whose work began. Streams the worker answers itself
    /// (a refusal, a preflight) are not in the count: a client padding its resets
    /// with such cheap streams kept the ratio under half and was never cut.
    fn resets_too_many(&self) -> bool {
        let w = self.reset_window();
        w.resets > u64::from(self.core.rt.http2.max_concurrent_streams) && w.resets * 2 > w.worked
    }

    /// Names a stream's request ID on the connection line.
    pub fn note_id(&self, id: RequestId) {
        let mut ids = self.ids.borrow_mut();
        if ids.len() < LOGGED_IDS {
            ids.push(id);
        }
    }
}

/// Ends a stream's bookkeeping however its task ends.
pub struct StreamGuard(Rc<ConnCtx>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.stream_closed();
    }
}

/// Serves an HTTP/2 client connection until it closes. `prefix` is what was read
/// from it already (all or part of the preface).
pub async fn serve(
    core: Rc<Core>,
    conn: Rc<TcpConn>,
    hop: ClientHop,
    prefix: Vec<u8>,
    conn_id: u64,
) {
    let started = Instant::now();
    let ctx = Rc::new(ConnCtx {
        core: core.clone(),
        conn: conn.clone(),
        hop,
        active: Cell::new(0),
        streams: Cell::new(0),
        ids: RefCell::new(Vec::new()),
        resets: Cell::new(ResetWindow::new(core.reactor.now())),
        ended: Cell::new(false),
        lingering_held: Cell::new(false),
        between: Rc::new(io::Between::new(io::max_block(&core.rt.http2))),
        conn_id,
    });
    // The preface, the SETTINGS and the first complete request head within the head
    // timeout from the accept (a connection that sends the preface and nothing else
    // is cut).
    conn.set_timeout_within(core.rt.head_timeout);
    let cfg = &core.rt.http2;
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(cfg.max_concurrent_streams)
        .initial_window_size(cfg.initial_stream_window)
        .initial_connection_window_size(cfg.initial_connection_window)
        .max_header_list_size(cfg.max_header_list_size)
        .max_frame_size(cfg.max_frame_size)
        .max_send_buffer_size(cfg.max_send_buffer)
        .max_pending_accept_reset_streams(cfg.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(Some(cfg.max_local_error_reset_streams))
        // Streams the worker resets are remembered a while, so that the frames the
        // client sent before it saw the reset are dropped quietly: a stream answered
        // before its whole body came (the worker's 413, an app's early 401) ends
        // with `RST_STREAM(NO_ERROR)` while its DATA is still in flight. Forgotten
        // (h2's defaults: 50 streams, 1 s), such a frame draws a `STREAM_CLOSED`
        // reset that counts against `max_local_error_reset_streams`, and a burst of
        // refused uploads on one connection (a front proxy's, a client far away)
        // had the connection cut with `ENHANCE_YOUR_CALM`, its other streams lost.
        // At most a connection's concurrent streams are remembered at once.
        .max_concurrent_reset_streams(cfg.max_concurrent_streams as usize)
        .reset_stream_duration(RESET_STREAM_MEMORY);
    let io = io::H2Io::new(conn.clone(), prefix, Some(core.clone())).between(ctx.between.clone());
    let mut h2c = match builder.handshake::<_, Bytes>(io).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(conn = conn_id, error = %e, "HTTP/2 handshake failed; connection closed");
            return;
        }
    };
    let mut end: Option<String> = None;
    let mut going_away = false;
    let mut cut = false;
    let mut closing_idle = false;
    // Streams whose handling may run at once: the protocol's cap, with slack for
    // tasks finishing just after their stream closed.
    let in_flight_cap = cfg.max_concurrent_streams as usize + 16;
    loop {
        // Checked on every poll of the connection (any frame, any stream's progress),
        // so a drain reaches busy connections at once.
        let next = std::future::poll_fn(|cx| {
            if !closing_idle && ctx.active.get() == 0 && (conn.timed_out() || conn.was_shed()) {
                ctx.between.busy();
                // Closed while idle (keep-alive or head timeout, drain, or shed at
                // the connection cap): a GOAWAY naming the last stream taken comes
                // first (RFC 9113 §9.1), so the client knows a stream it opened just
                // now was not processed and may be retried. Streams opened after it
                // are ignored; the connection closes once it is flushed, within
                // [`IDLE_CLOSE_GRACE`].
                closing_idle = true;
                going_away = true;
                conn.set_reusable(false, false);
                conn.set_timeout(IDLE_CLOSE_GRACE);
                h2c.abrupt_shutdown(h2::Reason::NO_ERROR);
            }
            if !cut && ctx.resets_too_many() {
                cut = true;
                core.metrics.add(counter::H2_ABUSE, 1);
                tracing::warn!(
                    conn = conn_id,
                    peer = %hop.peer,
                    resets = ctx.resets.get().resets,
                    worked = ctx.resets.get().worked,
                    streams = ctx.streams.get(),
                    "HTTP/2 client resets most of its streams once their work started (rapid reset); closing the connection"
                );
                h2c.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
            }
            if !going_away
                && !cut
                && (core.draining.get()
                    || (cfg.max_streams_per_connection > 0
                        && ctx.streams.get() >= cfg.max_streams_per_connection))
            {
                // Finish the streams in flight, take no new ones.
                h2c.graceful_shutdown();
                going_away = true;
            }
            h2c.poll_accept(cx)
        })
        .await;
        match next {
            Some(Ok((req, mut respond))) => {
                if ctx.active.get() >= in_flight_cap {
                    // The protocol caps open streams, but a stream the client reset
                    // is closed for the protocol while its work here goes on: a
                    // client resetting streams as fast as it opens them (rapid
                    // reset, CVE-2023-44487) would make unbounded work. Streams in
                    // flight here are capped instead; past the cap the connection
                    // is cut.
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    if !cut {
                        cut = true;
                        core.metrics.add(counter::H2_ABUSE, 1);
                        tracing::warn!(
                            conn = conn_id,
                            peer = %hop.peer,
                            in_flight = ctx.active.get(),
                            streams = ctx.streams.get(),
                            "HTTP/2 client keeps more streams in flight than max_concurrent_streams by resetting them (rapid reset); closing the connection"
                        );
                        h2c.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                    }
                    continue;
                }
                ctx.stream_opened();
                let guard = StreamGuard(ctx.clone());
                crate::reactor::spawn(stream::handle(ctx.clone(), guard, req, respond)).detach();
            }
            Some(Err(e)) => {
                // The `h2` library's own cuts (`GOAWAY` with ENHANCE_YOUR_CALM:
                // resets before accept past its cap, a CONTINUATION flood, a header
                // list past its abuse limit, many small DATA frames, many streams
                // reset for errors) are cuts for abuse as the worker's own are:
                // counted, and no lingering close (such a client was read for
                // `lingering_secs` after it, at up to 40 % of a core). The error
                // `h2` reports once its `GOAWAY` is sent no longer names the cause
                // (its debug data), so the two an honest client can meet are
                // counted with the rest.
                if e.is_go_away()
                    && e.is_library()
                    && e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
                    && !cut
                {
                    cut = true;
                    core.metrics.add(counter::H2_ABUSE, 1);
                    tracing::warn!(
                        conn = conn_id,
                        peer = %hop.peer,
                        error = %e,
                        "HTTP/2 client cut for abuse by the protocol's own limits; closing the connection"
                    );
                }
                end = Some(e.to_string());
                break;
            }
            None => break,
        }
    }
    let ids = ctx
        .ids
        .borrow()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    tracing::info!(
        conn = conn_id,
        peer = %hop.peer,
        streams = ctx.streams.get(),
        stream_ids = %ids,
        duration_ms = started.elapsed().as_millis() as u64,
        error = end.as_deref(),
        "http2 connection closed"
    );
    // Frames the client sent after the `GOAWAY` (a stream opened in the same instant)
    // are read and dropped, not answered with an RST that could destroy the `GOAWAY`
    // before the client reads it, and with it the last stream it names. Streams
    // still being handled (their tasks see the connection's end at their next poll)
    // no longer touch the socket's deadline: a keep-alive timeout armed by the last
    // one to end would stretch the lingering close past its bounds.
    ctx.ended.set(true);
    ctx.between.busy();
    drop(h2c);
    // Not for a client cut for abuse, nor for one that sent no request head within
    // the head timeout: as after an HTTP/1 408, such a client is not waited for
    // again.
    if cut || (closing_idle && ctx.streams.get() == 0) {
        return;
    }
    let mut scratch = core.read_bufs.take();
    // Streams still being handled hold the socket: closing the connection at the
    // cap would free nothing and admit the new one over it (the last of them to end
    // makes it sheddable).
    let sheddable = ctx.active.get() == 0;
    ctx.lingering_held.set(!sheddable);
    crate::proxy::lingering_close(&core, &conn, scratch.scratch(), sheddable).await;
    ctx.lingering_held.set(false);
}

/// Runs `fut` for at most `d` (the reactor's timers; the timer is armed only when
/// `fut` does not complete at once). `None`: timed out.
pub async fn within<F: Future>(reactor: &Rc<Reactor>, d: Duration, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut sleep = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        let s = sleep.get_or_insert_with(|| reactor.sleep(d));
        match Pin::new(s).poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// The HTTP/1.1 request-body rate floor ([`TcpConn::arm_read_floor`]: `[limits]
/// min_body_rate`, banked up to `body_idle_secs`) for one HTTP/2 stream's body,
/// whose bytes come as DATA frames rather than reads of a socket of its own: a
/// budget of waiting time that starts full, is earned back by every DATA byte
/// (`1 / rate` seconds each, up to the cap) and drained by the time spent waiting
/// for the next frame. Time the proxy spends handing a frame on (the app's window)
/// is not counted. Without it a stream that sends one byte per idle timeout holds
/// its app connection (or app stream) for ever.
pub struct BodyFloor(RateFloor);

/// Why waiting for a body's next frame ended without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// No frame within the idle timeout.
    Idle,
    /// The floor's budget ran out first.
    TooSlow,
}

impl BodyFloor {
    /// The core's floor, or `None` when `min_body_rate` is 0.
    pub fn new(core: &Core) -> Option<Self> {
        RateFloor::new(core.rt.min_body_rate, core.rt.body_idle_timeout).map(Self)
    }

    /// Runs `fut` (a wait for the body's next frame) for at most `idle`, or the
    /// floor's budget when that is shorter; `n` of the result is booked as bytes
    /// received.
    pub async fn wait<F: Future>(
        floor: &mut Option<Self>,
        reactor: &Rc<Reactor>,
        idle: Duration,
        fut: F,
        n: impl FnOnce(&F::Output) -> usize,
    ) -> Result<F::Output, Stall> {
        let (limit, binding) = floor.as_ref().map_or((idle, false), |f| f.0.bound(idle));
        let since = reactor.now();
        let Some(out) = within(reactor, limit, fut).await else {
            return Err(if binding { Stall::TooSlow } else { Stall::Idle });
        };
        if let Some(f) = floor {
            f.0.book(reactor.now().saturating_duration_since(since), n(&out));
        }
        Ok(out)
    }
}

/// The bytes of a DATA frame as [`h2::RecvStream::data`] gives it, for
/// [`BodyFloor::wait`].
pub fn data_len(d: &Option<Result<Bytes, h2::Error>>) -> usize {
    match d {
        Some(Ok(b)) => b.len(),
        _ => 0,
    }
}
