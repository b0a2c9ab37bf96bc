//! `http2` and `grpc` circuits: streams forwarded to the app over HTTP/2.
//!
//! Each core keeps HTTP/2 connections per app address (prior knowledge in the
//! clear; TLS with ALPN `h2` when the route has `upstream_tls`), each driven by a
//! task of the core, and multiplexes the streams of every client over them: at most
//! `max_concurrent_streams` on one (a connection takes streams from before it is
//! dialed, so a burst dials one per that many), whose connection window holds all
//! their stream windows, so a stream whose client does not read holds only its own
//! window, never the connection's that the others need. That window (`app_stream_window`)
//! is all a stalled stream makes the worker buffer, and a core has at most
//! `max_app_streams` such streams, shared fairly by client site (an IPv4 address,
//! an IPv6 /48: [`AppStreamSlot`], [`super::budget`]); a stream past them gets
//! 503, or takes the place of an idle stream of a site holding more. A stream is
//! relayed both ways at once (bidirectional gRPC streams), trailers included; each
//! DATA frame's capacity goes back to its sender only once the other side has taken
//! it, so a stream holds at most a window in flight, never a whole body. A client
//! that resets its stream resets the app's (`CANCEL`); an app that resets resets the
//! client's with the same reason. Before the response started, a failure is the
//! product's JSON error, or for gRPC a trailers-only `grpc-status: 14`
//! (`UNAVAILABLE`) with `grpc-message` and the request ID.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use appproxy_shared::fair_share::ClientKey;
use appproxy_shared::model::{ProxyProtocol, UpstreamTls};
use appproxy_shared::RequestId;
use bytes::Bytes;
use h2::client::SendRequest;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{HeaderName, HeaderValue};

use super::budget::{Activity, Budget, Place};
use super::io::H2Io;
use super::stream::{is_connection_specific, pick, send_all, Done, Fail, Req};
use super::{within, BodyFloor, ConnCtx, Stall};
use crate::core::{Core, Route};
use crate::http::encode::ClientHop;
use crate::http::encode::{self, TraceHeaders};
use crate::http::error::Fault;
use crate::http::error::{ProxyError, RequestError, ResponseError};
use crate::http::parse::{self, HeadLimits};
use crate::proxy::retry::{self, Attempt, Retry};
use crate::proxy::{self, AppSide, ConnectError};

/// An HTTP/2 connection to an app in the core's set (connecting or open), with
/// its generation.
type Pooled = (u64, Rc<UpConn>);

thread_local! {
    /// This core's HTTP/2 connections to apps, by address (each with at most
    /// [`streams_per_conn`] of our streams), with a generation so a closing driver
    /// removes only its own entry. A connection is in it from before it is dialed,
    /// so that a burst of streams fills it instead of each dialing its own.
    static UPSTREAMS: RefCell<HashMap<SocketAddr, Vec<Pooled>>> =
        RefCell::new(HashMap::new());
    static GENERATION: Cell<u64> = const { Cell::new(0) };
    /// This core's places for streams to apps ([`AppStreamSlot`]), made from its
    /// configuration at the first stream.
    static APP_STREAMS: RefCell<Option<Budget>> = const { RefCell::new(None) };
}

/// One stream's place in the core's budget of streams to apps (`[http2]
/// max_app_streams`, [`Budget`]), held for the stream's life: a stream to an HTTP/2
/// app, and a stream to an HTTP/1.1 app from its start (its parsed head is memory
/// too). A stream to an HTTP/2 app may make the worker buffer its window
/// (`app_stream_window`) from the app while its client does not read, and one to
/// an HTTP/1.1 app holds a connection of the route's cap, so the budget bounds the
/// core's memory and keeps a few client connections (each with up to
/// `max_concurrent_streams` streams) from taking a route's connections; once half
/// of it is taken an address holds at most `max_app_streams_per_address`, and when
/// all of it is, an address holding fewer places than another takes the place of
/// that address's stream idle longest, which is ended.
pub struct AppStreamSlot {
    /// Given back when the stream ends.
    place: Place,
}

impl AppStreamSlot {
    /// A place for a stream of the client at `client` (the connection's peer, or
    /// the address a trusted proxy named: a trusted proxy's clients are counted each
    /// by its own address) whose activity is `activity`, or `AppStreamLimit`. A
    /// stream whose place is taken to make room is told so ([`Activity::end`]).
    /// Places are held by site ([`ClientKey::site_of`]: an IPv4 address, an IPv6
    /// /48), so that addresses had for free cannot hold the budget, and shared
    /// within a site by /64 ([`ClientKey::of`]), so that one /64 cannot shut out
    /// the rest of its /48.
    pub(super) fn take(
        core: &Core,
        client: std::net::IpAddr,
        activity: &Rc<Activity>,
    ) -> Result<Self, Fail> {
        let (key, holder) = (ClientKey::site_of(client), ClientKey::of(client));
        let taken = APP_STREAMS.with(|a| {
            let mut a = a.borrow_mut();
            // The core's budget: `max_app_streams`, within the descriptor limit; an
            // address's share at most an eighth of it (the defaults' ratio), so that
            // a budget cut down to the limit still leaves room for others.
            let budget = a.get_or_insert_with(|| {
                let max = core.conns.app_streams;
                let cfg = &core.rt.http2;
                let per_address = cfg.max_app_streams_per_address.min((max / 8).max(1));
                Budget::new(max, per_address)
            });
            budget
                .take(key, holder, activity, core.reactor.now())
                .map_err(|refused| (refused, budget.taken(), budget.per_address()))
        });
        match taken {
            Ok((place, ended)) => {
                if let Some(ended) = ended {
                    // Its task ends it at its next turn; the place is this one's now.
                    ended.end();
                }
                Ok(Self { place })
            }
            Err((refused, taken, share)) => {
                core.metrics
                    .add(crate::core::counter::H2_APP_STREAM_LIMIT, 1);
                tracing::debug!(client = %client, taken, share, refused = ?refused, "no place for another stream to an app ([http2] max_app_streams, max_app_streams_per_address)");
                Err(Fail::Answer(ProxyError::AppStreamLimit))
            }
        }
    }
}

impl Drop for AppStreamSlot {
    fn drop(&mut self) {
        // Not while the core's thread ends (its locals may be gone already).
        let _ = APP_STREAMS.try_with(|a| {
            if let Some(budget) = a.borrow_mut().as_mut() {
                budget.give_back(self.place);
            }
        });
    }
}

/// The most streams the worker puts on one connection to an app: `[http2]
/// max_concurrent_streams`, fewer if that many stream windows would pass HTTP/2's
/// largest window. A stream past it opens another connection.
fn streams_per_conn(core: &Core) -> usize {
    let cfg = &core.rt.http2;
    let window = u64::from(cfg.app_stream_window.max(1));
    let fit = (u64::from(MAX_WINDOW) / window).max(1);
    u64::from(cfg.max_concurrent_streams).min(fit) as usize
}

/// HTTP/2's largest flow-control window (RFC 9113 §6.9.1).
const MAX_WINDOW: u32 = (1 << 31) - 1;

/// The receive window of a connection to an app: room for every stream it may
/// carry to fill its own window ([`streams_per_conn`] × `app_stream_window`),
/// so that only a stream's window bounds it. With a smaller connection window the
/// few streams whose clients do not read would hold all of it (their DATA is
/// given back only as their clients take it) and every other client of the app
/// would get its head and then no body.
fn conn_window(core: &Core) -> u32 {
    let cfg = &core.rt.http2;
    let all = (streams_per_conn(core) as u64) * u64::from(cfg.app_stream_window);
    all.clamp(
        u64::from(cfg.initial_connection_window),
        u64::from(MAX_WINDOW),
    ) as u32
}

/// Where an [`UpConn`] is in its life.
enum State {
    /// Being dialed and handshaken: streams take places on it and wait.
    Connecting,
    /// Open: streams are sent on it.
    Ready(SendRequest<Bytes>),
    /// The dial or handshake failed (out of the core's set); its waiters get this.
    Failed(ConnectError),
}

/// An HTTP/2 connection to an app: idle (no stream of ours on it) for the pool's
/// idle timeout, it is closed (its driver's wait times out).
pub struct UpConn {
    /// The socket, once connected.
    conn: RefCell<Option<Rc<crate::io::TcpConn>>>,
    streams: Cell<usize>,
    idle: std::time::Duration,
    state: RefCell<State>,
    /// Streams waiting for it to connect, by registration ([`UpConn::connected`]):
    /// a stream that goes meanwhile (its client reset it, it was ended to make
    /// room) takes its waker with it. Kept in a list, every stream reset during a
    /// slow dial left one behind (its task's memory with it) and made the next
    /// registration's scan longer, for as long as the dial lasted.
    waiters: RefCell<BTreeMap<u64, std::task::Waker>>,
    /// The next registration's number.
    next_waiter: Cell<u64>,
    /// Its TLS mode and server name (`None`: plain TCP): only routes that would
    /// make the same connection use it ([`proxy::kind_of`]).
    tls: Option<(UpstreamTls, Box<str>)>,
    /// Where it is in the core's set: the app's address and its generation.
    key: (SocketAddr, u64),
    /// The app broke the protocol on it ([`UpStreamGuard::retire`]): closed once
    /// no stream of ours is left on it, never idle.
    retired: Cell<bool>,
}

impl UpConn {
    /// A connection being dialed, made as `tls` says, idle at most `idle`, at
    /// `key` in the core's set.
    fn connecting(
        idle: std::time::Duration,
        tls: Option<(UpstreamTls, Box<str>)>,
        key: (SocketAddr, u64),
    ) -> Self {
        Self {
            conn: RefCell::new(None),
            streams: Cell::new(0),
            idle,
            state: RefCell::new(State::Connecting),
            waiters: RefCell::new(BTreeMap::new()),
            next_waiter: Cell::new(0),
            tls,
            key,
            retired: Cell::new(false),
        }
    }

    /// The app broke the protocol on this connection (it sent what ends an
    /// exchange, a [`Refusal`]): new streams go to another one, and it is closed
    /// once the streams on it end, as an HTTP/1.1 app's connection is closed at
    /// once. Kept open, it would be read for as long as the app sends: frames on
    /// a stream we reset are decoded and dropped, and an app sending them without
    /// end held a core busy until the pool's idle timeout, restarted by every
    /// stream.
    fn retire(&self) {
        if !self.retired.replace(true) {
            forget(self.key.0, self.key.1);
        }
    }

    /// Its state is final: waiters are woken to read it.
    fn settle(&self, state: State) {
        *self.state.borrow_mut() = state;
        for w in self.waiters.take().into_values() {
            w.wake();
        }
    }

    /// A handle once it is open, or why it will not be.
    async fn connected(&self) -> Result<SendRequest<Bytes>, ConnectError> {
        let mut waiting = Waiting {
            up: self,
            key: None,
        };
        poll_fn(|cx| match &*self.state.borrow() {
            State::Connecting => {
                waiting.register(cx.waker());
                std::task::Poll::Pending
            }
            State::Ready(s) => std::task::Poll::Ready(Ok(s.clone())),
            State::Failed(e) => std::task::Poll::Ready(Err(e.again())),
        })
        .await
    }
}

/// A stream's registration among an [`UpConn`]'s waiters, withdrawn when the
/// stream stops waiting, whichever way.
struct Waiting<'a> {
    up: &'a UpConn,
    key: Option<u64>,
}

impl Waiting<'_> {
    /// Registers `waker` (or keeps the one registered, when it wakes the same task).
    fn register(&mut self, waker: &std::task::Waker) {
        let mut all = self.up.waiters.borrow_mut();
        if let Some(kept) = self.key.and_then(|k| all.get_mut(&k)) {
            if !kept.will_wake(waker) {
                *kept = waker.clone();
            }
            return;
        }
        let key = self.up.next_waiter.get();
        self.up.next_waiter.set(key + 1);
        all.insert(key, waker.clone());
        self.key = Some(key);
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.up.waiters.borrow_mut().remove(&key);
        }
    }
}

/// One stream of ours on an [`UpConn`], for as long as it lives.
pub struct UpStreamGuard(Rc<UpConn>);

impl UpStreamGuard {
    fn new(up: Rc<UpConn>) -> Self {
        if up.streams.get() == 0 {
            if let Some(c) = &*up.conn.borrow() {
                c.set_deadline(None);
            }
        }
        up.streams.set(up.streams.get() + 1);
        Self(up)
    }
}

impl Drop for UpStreamGuard {
    fn drop(&mut self) {
        let n = self.0.streams.get().saturating_sub(1);
        self.0.streams.set(n);
        if n == 0 {
            if let Some(c) = &*self.0.conn.borrow() {
                if self.0.retired.get() {
                    c.set_timeout(std::time::Duration::ZERO);
                } else {
                    c.set_timeout(self.0.idle);
                }
            }
        }
    }
}

/// A ready handle on an HTTP/2 connection to `addr` with a stream's place taken on
/// it: one of the core's connections with room (fewer than [`streams_per_conn`] of
/// our streams and of the app's own limit), open or still connecting (then the
/// stream waits for it), or a new one. So a burst of streams dials one connection
/// per `streams_per_conn` of them, not one each.
async fn sender(
    core: &Rc<Core>,
    route: &Route,
    addr: SocketAddr,
) -> Result<(SendRequest<Bytes>, UpStreamGuard), ConnectError> {
    let cap = streams_per_conn(core);
    let room = |up: &UpConn| match &*up.state.borrow() {
        State::Connecting => cap,
        State::Ready(s) => cap.min(s.current_max_send_streams()),
        State::Failed(_) => 0,
    };
    let tls = proxy::kind_of(route, addr).tls;
    let made_as = |up: &UpConn| up.tls.as_ref().map(|(m, n)| (*m, &**n)) == tls;
    loop {
        let open = UPSTREAMS.with(|u| {
            u.borrow().get(&addr).and_then(|all| {
                all.iter()
                    .find(|(_, up)| made_as(up) && up.streams.get() < room(up))
                    .map(|(g, up)| (*g, up.clone()))
            })
        });
        let Some((generation, up)) = open else {
            break;
        };
        // The place is taken before the wait, so that streams arriving meanwhile
        // count it.
        let guard = UpStreamGuard::new(up.clone());
        // A connection being dialed is bounded by its dial's own timeouts
        // (connect, TLS, HTTP/2 handshake); this is a backstop.
        let s = match within(&core.reactor, core.rt.connect_timeout * 3, up.connected()).await {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                if matches!(e, ConnectError::Busy) {
                    core.metrics.add(crate::core::counter::UPSTREAM_LIMIT, 1);
                }
                return Err(e);
            }
            None => return Err(ConnectError::Upstream(io::ErrorKind::TimedOut.into())),
        };
        // Places were taken while it connected, before the app's own stream limit
        // was known: past it, this stream looks again.
        if up.streams.get() > room(&up) {
            continue;
        }
        match within(&core.reactor, core.rt.connect_timeout, s.ready()).await {
            Some(Ok(s)) => return Ok((s, guard)),
            _ => forget(addr, generation),
        }
    }
    let generation = GENERATION.with(|g| {
        g.set(g.get() + 1);
        g.get()
    });
    let tls = tls.map(|(m, n)| (m, n.into()));
    let up = Rc::new(UpConn::connecting(
        core.rt.pool_idle_timeout,
        tls,
        (addr, generation),
    ));
    UPSTREAMS.with(|u| {
        u.borrow_mut()
            .entry(addr)
            .or_default()
            .push((generation, up.clone()))
    });
    let guard = UpStreamGuard::new(up.clone());
    // The dial is the connection's, not this stream's: a task of the core (under
    // this stream's request ID), so that a stream ended while it dials (its client
    // gone, its access revoked, its place taken for another's) leaves it to the
    // streams waiting on the connection. Before, they all failed with it.
    let dialed = crate::reactor::spawn(appproxy_shared::context::inherit(dial_settled(
        core.clone(),
        up.clone(),
        addr,
        generation,
    )))
    .detach();
    let send = match dialed.await {
        Some(dialed) => dialed?,
        None => {
            return Err(ConnectError::Local(io::Error::other(
                "the dial of the app's connection was dropped",
            )))
        }
    };
    match within(&core.reactor, core.rt.connect_timeout, send.ready()).await {
        Some(Ok(s)) => Ok((s, guard)),
        Some(Err(e)) => Err(ConnectError::Upstream(io::Error::other(e))),
        None => Err(ConnectError::Upstream(io::ErrorKind::TimedOut.into())),
    }
}

/// [`dial`], then settles `up` with what came of it for the streams waiting on it
/// (taken out of the core's set when it failed): the dialing stream gets the
/// outcome itself, whose health it notes.
async fn dial_settled(
    core: Rc<Core>,
    up: Rc<UpConn>,
    addr: SocketAddr,
    generation: u64,
) -> Result<SendRequest<Bytes>, ConnectError> {
    let dialed = dial(&core, addr, &up, generation).await;
    match &dialed {
        Ok(send) => up.settle(State::Ready(send.clone())),
        Err(e) => {
            forget(addr, generation);
            up.settle(State::Failed(e.again()));
        }
    }
    dialed
}

/// Dials `addr` (as `up` was made: TLS or not) and does the HTTP/2 handshake for
/// `up` (`generation` in the set), its driver spawned on the core.
async fn dial(
    core: &Core,
    addr: SocketAddr,
    up: &UpConn,
    generation: u64,
) -> Result<SendRequest<Bytes>, ConnectError> {
    let tls = up.tls.as_ref().map(|(mode, name)| (*mode, &**name));
    let conn = proxy::connect_as(core, tls, addr, true).await?;
    if conn.is_tls() {
        let alpn = conn.tls_info().and_then(|i| i.alpn);
        if alpn.as_deref() != Some(b"h2") {
            tracing::warn!(upstream = %addr, "the app's TLS server did not agree to HTTP/2 (ALPN h2)");
            return Err(ConnectError::Upstream(io::Error::other(
                "the app did not agree to HTTP/2 over TLS",
            )));
        }
    }
    let conn = Rc::new(conn);
    let cfg = &core.rt.http2;
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(cfg.app_stream_window)
        .initial_connection_window_size(conn_window(core))
        .max_header_list_size(cfg.max_header_list_size)
        .max_frame_size(cfg.max_frame_size)
        .max_send_buffer_size(cfg.max_send_buffer)
        .enable_push(false);
    conn.set_timeout(core.rt.connect_timeout);
    let io = H2Io::new(conn.clone(), Vec::new(), None);
    let (send, driver) = match builder.handshake::<_, Bytes>(io).await {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(upstream = %addr, error = %e, "HTTP/2 handshake with the app failed");
            return Err(ConnectError::Upstream(io::Error::other(e)));
        }
    };
    // Idle only once no stream is on it (streams took places while it connected).
    if up.streams.get() == 0 {
        conn.set_timeout(core.rt.pool_idle_timeout);
    } else {
        conn.set_deadline(None);
    }
    *up.conn.borrow_mut() = Some(conn.clone());
    crate::reactor::spawn(async move {
        if let Err(e) = driver.await {
            tracing::debug!(upstream = %addr, error = %e, "HTTP/2 connection to the app ended");
        }
        drop(conn);
        forget(addr, generation);
    })
    .detach();
    Ok(send)
}

/// Takes the connection `generation` to `addr` out of the core's set (new streams
/// no longer go to it; those on it run on).
fn forget(addr: SocketAddr, generation: u64) {
    UPSTREAMS.with(|u| {
        let mut u = u.borrow_mut();
        if let Some(all) = u.get_mut(&addr) {
            all.retain(|(g, _)| *g != generation);
            if all.is_empty() {
                u.remove(&addr);
            }
        }
    });
}

/// [`sender`] with the HTTP/1.1 path's failover: a failed connect counts against
/// the route's health and one other upstream is tried. `side` is told each app
/// tried.
async fn sender_route(
    core: &Rc<Core>,
    route: &Route,
    addr: SocketAddr,
    side: &AppSide,
) -> Result<(SendRequest<Bytes>, UpStreamGuard, SocketAddr), Fail> {
    side.tried(addr);
    let first = match sender(core, route, addr).await {
        Ok((s, guard)) => return Ok((s, guard, addr)),
        Err(e) => e,
    };
    if let ConnectError::Local(_) = first {
        return Err(Fail::from(proxy::Failure::from(first)));
    }
    if matches!(first, ConnectError::Upstream(_)) {
        proxy::note_health(core, route, addr, false);
    }
    match pick(core, route, Some(addr)) {
        Ok(alt) if alt != addr => {
            side.tried(alt);
            match sender(core, route, alt).await {
                Ok((s, guard)) => Ok((s, guard, alt)),
                Err(e) => {
                    if matches!(e, ConnectError::Upstream(_)) {
                        proxy::note_health(core, route, alt, false);
                    }
                    Err(Fail::from(proxy::Failure::from(e)))
                }
            }
        }
        _ => Err(Fail::from(proxy::Failure::from(first))),
    }
}

/// The request to the app: the head sanitized exactly as for HTTP/1.1 apps
/// (hop-by-hop and client-address fields, forwarding headers, request ID, trace
/// context), then carried as HTTP/2 (`te: trailers` kept when the client sent it).
fn build_request(
    core: &Core,
    hop: ClientHop,
    req: &Req<'_>,
    addr: SocketAddr,
    tls: bool,
    id: &RequestId,
    trace: Option<crate::trace::Hop>,
) -> Result<http::Request<()>, Fail> {
    let mut out = Vec::with_capacity(1024);
    let traceparent = trace.map(|t| t.span.traceparent());
    encode::upstream_request_traced(
        &mut out,
        req.buf,
        req.head,
        proxy::forwarded_id(core, id),
        trace.zip(traceparent.as_ref()).map(|(t, h)| TraceHeaders {
            traceparent: h.as_bytes(),
            keep_tracestate: t.keep_tracestate,
        }),
        &hop,
        addr,
    );
    let limits = HeadLimits {
        max_request_line: out.len(),
        max_header_bytes: out.len(),
        max_headers: out.len(),
    };
    let bad = || {
        Fail::Answer(ProxyError::Request(RequestError::Malformed(
            "request not expressible over HTTP/2",
        )))
    };
    let head = match parse::parse_request(&out, &limits) {
        Ok(Some(h)) => h,
        _ => return Err(bad()),
    };
    let authority = req
        .authority
        .map(str::to_owned)
        .unwrap_or_else(|| addr.to_string());
    let uri = http::Uri::builder()
        .scheme(if tls { "https" } else { "http" })
        .authority(authority)
        .path_and_query(req.path)
        .build()
        .map_err(|_| bad())?;
    let method = http::Method::from_bytes(&out[head.method_raw.clone()]).map_err(|_| bad())?;
    let mut request = http::Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    for f in &head.headers {
        let name = &out[f.name.clone()];
        if parse::name_is(name, "host") || is_connection_specific(name) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name),
            HeaderValue::from_bytes(&out[f.value.clone()]),
        ) {
            headers.append(n, v);
        }
    }
    if req.te_trailers {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
    Ok(request)
}

/// How relaying one direction of a stream ended badly.
enum RelayEnd {
    /// The source failed or reset (its reason went on to the destination).
    Source(String),
    /// The destination stopped taking data (its idle timeout passed).
    Destination(String),
    /// The destination reset the stream (or its connection ended).
    DestinationReset(String),
    /// The request body passed `[limits] max_body_bytes`.
    TooLarge,
    /// The request's trailers carried a field that must never be a trailer.
    ForbiddenTrailer,
    /// The request body came in below `[limits] min_body_rate`.
    TooSlow,
}

/// Relays one direction: DATA as the destination's window allows, capacity given
/// back to the source as frames are handed on, then the trailers (or the end).
/// `floor`: the request body's rate floor ([`BodyFloor`]), when it has one;
/// `activity` is told of each frame handed on.
#[allow(clippy::too_many_arguments)]
async fn relay(
    core: &Core,
    activity: &Activity,
    src: &mut RecvStream,
    dst: &mut SendStream<Bytes>,
    max: u64,
    total: &Cell<u64>,
    request: bool,
    mut floor: Option<BodyFloor>,
) -> Result<(), RelayEnd> {
    enum Next {
        Data(Option<Result<Bytes, h2::Error>>),
        Reset(Result<h2::Reason, h2::Error>),
    }
    let len = |n: &Next| match n {
        Next::Data(d) => super::data_len(d),
        Next::Reset(_) => 0,
    };
    loop {
        let next = BodyFloor::wait(
            &mut floor,
            &core.reactor,
            core.rt.tunnel_idle_timeout,
            futures_lite::future::or(async { Next::Data(src.data().await) }, async {
                Next::Reset(poll_fn(|cx| dst.poll_reset(cx)).await)
            }),
            len,
        )
        .await;
        let chunk = match next {
            Err(stall) => {
                dst.send_reset(h2::Reason::CANCEL);
                return Err(match stall {
                    Stall::Idle => RelayEnd::Source("idle timeout".into()),
                    Stall::TooSlow => RelayEnd::TooSlow,
                });
            }
            Ok(Next::Data(None)) => break,
            Ok(Next::Data(Some(Ok(b)))) => b,
            Ok(Next::Data(Some(Err(e)))) => {
                dst.send_reset(e.reason().unwrap_or(h2::Reason::CANCEL));
                return Err(RelayEnd::Source(e.to_string()));
            }
            Ok(Next::Reset(r)) => {
                return Err(RelayEnd::DestinationReset(match r {
                    Ok(reason) => format!("reset: {reason}"),
                    Err(e) => e.to_string(),
                }))
            }
        };
        let n = chunk.len();
        let taken = total.get() + n as u64;
        if max > 0 && taken > max {
            dst.send_reset(h2::Reason::CANCEL);
            return Err(RelayEnd::TooLarge);
        }
        send_all(core, dst, chunk).await.map_err(|e| match e {
            super::stream::SendEnd::Idle => RelayEnd::Destination(e.to_string()),
            super::stream::SendEnd::Closed(why) => RelayEnd::DestinationReset(why),
        })?;
        // Counted once `dst` took it: an access line never counts what did not go.
        total.set(taken);
        if request {
            activity.moved(core.reactor.now());
        } else {
            activity.sent(core.reactor.now(), n);
        }
        let _ = src.flow_control().release_capacity(n);
    }
    match src.trailers().await {
        Ok(Some(t)) => match super::stream::filter_trailers(&t, request) {
            None => {
                dst.send_reset(h2::Reason::CANCEL);
                return Err(RelayEnd::ForbiddenTrailer);
            }
            Some(kept) if kept.is_empty() => dst.send_data(Bytes::new(), true),
            Some(kept) => dst.send_trailers(kept),
        },
        Ok(None) => dst.send_data(Bytes::new(), true),
        Err(e) => {
            dst.send_reset(e.reason().unwrap_or(h2::Reason::CANCEL));
            return Err(RelayEnd::Source(e.to_string()));
        }
    }
    .map_err(|e| RelayEnd::DestinationReset(e.to_string()))
}

/// What came next on an app's stream.
pub enum NextHead {
    /// An interim head (103 Early Hints, …) as the app sent it: each path
    /// sanitizes it as it does the final head, for the client's protocol
    /// ([`super::stream::sanitize_app_head`], the bridge's own lines).
    Interim(http::Response<()>),
    /// The final head, or the stream's failure.
    Final(Result<http::Response<RecvStream>, h2::Error>),
    /// A head that ends the exchange.
    Refused(Refusal),
}

/// A head of an HTTP/2 app's answer that ends the exchange (a 502; interim heads
/// commit to nothing, so the client still gets a final answer, RFC 9110 §15.2).
pub enum Refusal {
    /// A 101: HTTP/2 has none (RFC 9113 §8.6), and an HTTP/2 client would take it
    /// for a malformed answer. The app's health is noted as failing, as for a 101
    /// from an HTTP/1.1 app to an HTTP/2 client.
    Switching,
    /// More than [`proxy::MAX_INTERIM`] interim heads, as with an HTTP/1.1 app:
    /// each one is decoded, and an app sending them without end would hold the
    /// core busy for the whole head timeout.
    TooManyInterim,
}

impl Refusal {
    /// The exchange's error.
    pub(crate) fn fail(self, core: &Core, route: &Route, addr: SocketAddr) -> Fail {
        let why = match self {
            Self::Switching => {
                proxy::note_health(core, route, addr, false);
                "a 101 from an HTTP/2 app"
            }
            Self::TooManyInterim => {
                tracing::warn!(
                    upstream = %addr,
                    limit = proxy::MAX_INTERIM,
                    "too many interim responses; closing"
                );
                "too many interim responses"
            }
        };
        Fail::Answer(ProxyError::UpstreamResponse(ResponseError::Malformed(why)))
    }
}

/// An HTTP/2 app's answer to come on a stream, with the interim heads it sent
/// so far: the one wait for an HTTP/2 app's answer, for HTTP/2 clients and
/// bridged HTTP/1.1 ones alike.
pub struct Answer {
    response: h2::client::ResponseFuture,
    interim: usize,
    /// The connection it comes on, retired when the app breaks the protocol.
    conn: Rc<UpConn>,
}

impl Answer {
    /// Polls for the answer's next head.
    pub(crate) fn poll_next_head(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<NextHead> {
        use std::task::Poll;
        if let Poll::Ready(Some(Ok(info))) = self.response.poll_informational(cx) {
            let refused = if info.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                Some(Refusal::Switching)
            } else {
                self.interim += 1;
                (self.interim > proxy::MAX_INTERIM).then_some(Refusal::TooManyInterim)
            };
            if let Some(refused) = refused {
                self.conn.retire();
                return Poll::Ready(NextHead::Refused(refused));
            }
            return Poll::Ready(NextHead::Interim(info));
        }
        std::future::Future::poll(std::pin::Pin::new(&mut self.response), cx).map(NextHead::Final)
    }

    /// The answer's final head (or the stream's failure), the interim heads
    /// before it dropped but counted: for waits while a bridged client's body is
    /// still going.
    pub(crate) async fn past_interim(
        &mut self,
    ) -> Result<Result<http::Response<RecvStream>, h2::Error>, Refusal> {
        poll_fn(|cx| loop {
            match self.poll_next_head(cx) {
                std::task::Poll::Ready(NextHead::Interim(_)) => {}
                std::task::Poll::Ready(NextHead::Final(r)) => return std::task::Poll::Ready(Ok(r)),
                std::task::Poll::Ready(NextHead::Refused(r)) => {
                    return std::task::Poll::Ready(Err(r))
                }
                std::task::Poll::Pending => return std::task::Poll::Pending,
            }
        })
        .await
    }
}

/// A stream opened on the app's HTTP/2 connection: the response to come, the
/// request body's sender, the connection's use and the stream's place in the
/// core's budget, and the app's address.
pub type Opened = (
    Answer,
    SendStream<Bytes>,
    (UpStreamGuard, AppStreamSlot),
    SocketAddr,
);

/// Picks the app, gets a ready HTTP/2 connection to it and sends the request head,
/// in `place` (a retry's: the exchange keeps the one place it took), else in a
/// place it takes.
#[allow(clippy::too_many_arguments)]
pub async fn open_stream(
    core: &Rc<Core>,
    hop: ClientHop,
    route: &Route,
    req: &Req<'_>,
    id: &RequestId,
    trace: Option<crate::trace::Hop>,
    end: bool,
    place: Option<AppStreamSlot>,
) -> Result<Opened, Fail> {
    let slot = match place {
        Some(slot) => slot,
        None => AppStreamSlot::take(core, req.client.get(), req.activity)?,
    };
    let addr = pick(core, route, None)?;
    let (mut sender, guard, addr) = sender_route(core, route, addr, req.side).await?;
    let tls = proxy::kind_of(route, addr).tls.is_some();
    let request = build_request(core, hop, req, addr, tls, id, trace)?;
    let (response, send) = sender
        .send_request(request, end)
        .map_err(|e| Fail::Answer(ProxyError::UpstreamClosed(io::Error::other(e))))?;
    req.activity.given();
    let answer = Answer {
        response,
        interim: 0,
        conn: guard.0.clone(),
    };
    Ok((answer, send, (guard, slot), addr))
}

/// What an HTTP/2 app's failure of a stream says about sending it again: a stream
/// it refused (`REFUSED_STREAM`) or that was above the last one of its GOAWAY was
/// never processed ([`Retry::Unprocessed`]); anything else is not retried.
pub(crate) fn retry_of(e: &h2::Error) -> Retry {
    let refused = e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM);
    // A remote GOAWAY is given only to the streams above its last stream: those
    // below run on, and end with their own answer or the connection's error.
    if e.is_remote() && (refused || e.is_go_away()) {
        Retry::Unprocessed
    } else {
        Retry::Never
    }
}

/// Why the app gave no answer (the route's health noted when it is the app's).
pub fn response_failure(core: &Core, route: &Route, addr: SocketAddr, e: h2::Error) -> Fail {
    // A stream the app refused or reset is its answer, not its health.
    if e.is_io() || e.is_go_away() {
        proxy::note_health(core, route, addr, false);
    }
    tracing::warn!(upstream = %addr, error = %e, "HTTP/2 app failed the stream");
    Fail::Answer(ProxyError::UpstreamClosed(io::Error::other(e)))
}

/// An HTTP/2 app's final status, refused past 599 as the HTTP/1.1 path refuses a
/// malformed head (RFC 9110 §15: invalid, to be read as a 5xx), the app's health
/// noted as failing: the client gets the relay's 502, the app's stream is reset.
pub fn status_in_range(
    core: &Core,
    route: &Route,
    addr: SocketAddr,
    status: http::StatusCode,
) -> Result<(), Fail> {
    if status.as_u16() <= 599 {
        return Ok(());
    }
    proxy::note_health(core, route, addr, false);
    Err(Fail::Answer(ProxyError::UpstreamResponse(
        ResponseError::Malformed("status code out of range"),
    )))
}

/// Forwards a stream to an `http2`/`grpc` app and relays the answer.
pub async fn forward(
    ctx: &Rc<ConnCtx>,
    route: &Route,
    req: &Req<'_>,
    mut body: RecvStream,
    respond: &mut SendResponse<Bytes>,
    id: RequestId,
    trace: Option<crate::trace::Hop>,
) -> Result<Done, Fail> {
    let core = &ctx.core;
    let end = body.is_end_stream();
    // A client that resets its stream while the app's connection is dialed or
    // handshaken ends the wait (the dial goes on for the others): its access line
    // says so, not the app's 502 or 504 when the dial fails later.
    let hop = req.hop(ctx.hop, route);
    let open = open_stream(core, hop, route, req, &id, trace, end, None);
    let (response, mut up_send, _on_conn, addr) =
        super::stream::unless_reset(ctx, respond, open, super::stream::CONNECTING).await??;
    let bytes_in = &req.side.body_in;
    let too_large = Cell::new(false);
    let too_slow = Cell::new(false);
    let forbidden_trailer = Cell::new(false);
    let grpc = route.circuit.circuit.protocol == ProxyProtocol::Grpc;
    // The HTTP/1.1 body rate floor, except on `grpc` circuits: their request
    // streams carry messages (bidirectional streams may rest between them for long)
    // and their own deadlines; they keep the tunnel idle timeout. The exemption is
    // the operator's choice of circuit, never the client's `content-type`: any
    // client could claim gRPC on an `http2` circuit to hold a stream for an hour.
    let floor = if grpc { None } else { BodyFloor::new(core) };
    // The request body goes on while the response comes (bidirectional streams);
    // its end (or failure, passed on as a reset) never ends the exchange by itself.
    let request_side = async {
        if !end {
            match relay(
                core,
                req.activity,
                &mut body,
                &mut up_send,
                core.rt.max_body,
                bytes_in,
                true,
                floor,
            )
            .await
            {
                Err(RelayEnd::TooLarge) => too_large.set(true),
                Err(RelayEnd::TooSlow) => too_slow.set(true),
                Err(RelayEnd::ForbiddenTrailer) => forbidden_trailer.set(true),
                _ => {}
            }
        }
        std::future::pending::<Result<Done, Fail>>().await
    };
    let method_head = req.head.method == parse::Method::Head;
    let response_side = async {
        enum Head {
            Next(NextHead),
            ClientReset,
        }
        let mut response = response;
        let mut addr = addr;
        // A bodiless stream the app never processed goes again, once
        // ([`retry_of`]); the retry's send half lives as long as it, and its
        // places replace the first stream's (as the bridge's do).
        let mut attempt = Attempt::first(req.head.method, !end, false);
        let mut _again = None;
        let mut _on_conn = _on_conn;
        let (resp, sent) = loop {
            let sent = Instant::now();
            let wait = poll_fn(|cx| {
                if respond.poll_reset(cx).is_ready() {
                    return std::task::Poll::Ready(Head::ClientReset);
                }
                response.poll_next_head(cx).map(Head::Next)
            });
            // gRPC calls carry their own deadlines (a watch may answer hours later):
            // they wait the tunnel idle timeout; other apps the head timeout.
            let bound = if grpc {
                core.rt.tunnel_idle_timeout
            } else {
                core.rt.upstream_head_timeout
            };
            let head = within(&core.reactor, bound, wait).await;
            match head {
                None => {
                    proxy::note_health(core, route, addr, false);
                    return Err(Fail::Answer(ProxyError::UpstreamTimeout));
                }
                Some(Head::ClientReset) => {
                    return Err(super::stream::client_reset(ctx, super::stream::ANSWERING));
                }
                Some(Head::Next(NextHead::Refused(r))) => return Err(r.fail(core, route, addr)),
                // Relayed as it comes; the next head has its own wait, as from an
                // HTTP/1.1 app. A client gone meanwhile shows in poll_reset.
                Some(Head::Next(NextHead::Interim(mut info))) => {
                    super::stream::sanitize_app_head(info.headers_mut());
                    super::stream::name_request(core, &id, info.headers_mut());
                    let _ = respond.send_informational(info);
                    continue;
                }
                Some(Head::Next(NextHead::Final(Err(e)))) => {
                    if too_large.get() {
                        return Err(Fail::Answer(ProxyError::Request(
                            RequestError::BodyTooLarge,
                        )));
                    }
                    if too_slow.get() {
                        return Err(Fail::Answer(ProxyError::Request(RequestError::BodyTooSlow)));
                    }
                    if forbidden_trailer.get() {
                        return Err(Fail::Answer(ProxyError::Request(
                            RequestError::ForbiddenTrailer,
                        )));
                    }
                    if retry::may_retry(Fault::Upstream, retry_of(&e), attempt) {
                        tracing::info!(upstream = %addr, error = %e, "the app did not process the stream; sending it again");
                        attempt = attempt.again();
                        // In the place the first stream took: one per exchange.
                        let place = Some(_on_conn.1);
                        let hop = req.hop(ctx.hop, route);
                        let again = open_stream(core, hop, route, req, &id, trace, end, place);
                        let (r, send, places, a) = super::stream::unless_reset(
                            ctx,
                            respond,
                            again,
                            super::stream::CONNECTING,
                        )
                        .await??;
                        (response, addr, _again, _on_conn) = (r, a, Some(send), places);
                        continue;
                    }
                    return Err(response_failure(core, route, addr, e));
                }
                Some(Head::Next(NextHead::Final(Ok(r)))) => break (r, sent),
            }
        };
        status_in_range(core, route, addr, resp.status())?;
        proxy::note_health(core, route, addr, true);
        core.metrics.upstream_head.observe(sent.elapsed());
        let (parts, mut rbody) = resp.into_parts();
        let status = parts.status.as_u16();
        let mut response = http::Response::new(());
        *response.status_mut() = parts.status;
        let mut headers = parts.headers;
        super::stream::sanitize_app_head(&mut headers);
        // A 204 has no length (RFC 9110 §8.6), as on the HTTP/1.1 app path.
        if status == 204 {
            headers.remove(http::header::CONTENT_LENGTH);
        }
        if let Some(v) =
            proxy::forwarded_id(core, &id).and_then(|i| HeaderValue::from_bytes(i.as_bytes()).ok())
        {
            headers.insert(HeaderName::from_static("x-backend-request-id"), v);
        }
        *response.headers_mut() = headers;
        // A HEAD, 204 or 304 answer ends with its head: DATA the app sends after it
        // is not a body and never reaches the client (the app's stream, if it goes
        // on, is cancelled when this exchange drops its handles).
        let bodiless = method_head || status == 204 || status == 304;
        let rend = bodiless || rbody.is_end_stream();
        let mut send = respond
            .send_response(response, rend)
            .map_err(|e| Fail::Abort(format!("client stream: {e}")))?;
        req.activity.responded(status);
        let bytes_out = Cell::new(0u64);
        if !rend {
            let relayed = relay(
                core,
                req.activity,
                &mut rbody,
                &mut send,
                0,
                &bytes_out,
                false,
                None,
            )
            .await;
            if let Err(RelayEnd::DestinationReset(_)) = relayed {
                // The client reset the stream as its answer went out.
                ctx.note_client_reset();
            }
            match relayed {
                Ok(()) => {}
                Err(RelayEnd::Source(e)) => {
                    // The app's reset went on to the client as is.
                    tracing::info!(upstream = %addr, reason = %e, "app ended the stream early");
                }
                Err(RelayEnd::Destination(e) | RelayEnd::DestinationReset(e)) => {
                    return Err(Fail::Cut(retry::Cut {
                        reason: format!("client: {e}"),
                        status,
                        bytes: (bytes_in.get(), bytes_out.get()),
                        upstream: addr,
                    }));
                }
                Err(RelayEnd::TooLarge | RelayEnd::ForbiddenTrailer | RelayEnd::TooSlow) => {}
            }
        }
        Ok(Done {
            status,
            bytes_in: bytes_in.get(),
            bytes_out: bytes_out.get(),
            upstream: addr,
        })
    };
    futures_lite::future::or(response_side, request_side).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An [`UpConn`] being dialed.
    fn connecting() -> UpConn {
        let key = (SocketAddr::from(([127, 0, 0, 1], 1)), 1);
        UpConn::connecting(std::time::Duration::from_secs(1), None, key)
    }

    /// A stream that stops waiting for a connection being dialed (its client reset
    /// it, it was ended to make room) withdraws its waker, and one still waiting is
    /// woken by the dial's end and reads it. Before, each stream that went left its
    /// waker (and with it its task's memory) in a list that every registration
    /// scanned, until the dial ended: a flood of streams reset during a slow dial
    /// cost memory and, per stream, time in proportion to those before it.
    #[test]
    fn a_stream_that_stops_waiting_for_a_dial_leaves_nothing_behind() {
        use futures_lite::future::{block_on, poll_once};
        let up = connecting();
        for _ in 0..100 {
            let mut wait = std::pin::pin!(up.connected());
            assert!(block_on(poll_once(wait.as_mut())).is_none());
            assert!(block_on(poll_once(wait.as_mut())).is_none());
            assert_eq!(up.waiters.borrow().len(), 1);
        }
        assert!(up.waiters.borrow().is_empty());
        let mut wait = std::pin::pin!(up.connected());
        assert!(block_on(poll_once(wait.as_mut())).is_none());
        up.settle(State::Failed(ConnectError::Busy));
        assert!(up.waiters.borrow().is_empty());
        assert!(matches!(block_on(wait), Err(ConnectError::Busy)));
    }

    /// A waiter polled again by another task's waker keeps one registration, with
    /// the last waker: the dial's end wakes that one.
    #[test]
    fn a_waiter_polled_with_another_waker_is_woken_by_the_last() {
        use std::future::Future;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use std::task::{Context, Wake, Waker};
        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let (first, last) = (
            Arc::new(Count(AtomicUsize::new(0))),
            Arc::new(Count(AtomicUsize::new(0))),
        );
        let up = connecting();
        let mut wait = std::pin::pin!(up.connected());
        for count in [&first, &last] {
            let waker = Waker::from(count.clone());
            assert!(wait
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending());
            assert_eq!(up.waiters.borrow().len(), 1);
        }
        up.settle(State::Failed(ConnectError::Busy));
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(last.0.load(Ordering::SeqCst), 1);
    }
}
