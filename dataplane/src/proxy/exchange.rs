//! One request on a client connection, from routing to its access line: the
//! [`Exchange`] the connection owns while the request lasts, and the [`Client`]
//! methods that carry it (after sozu's session states): [`Client::exchange`] routes
//! and checks it, `forward` sends it to the app, `relay_response` brings the answer
//! back, and every end goes through one of three doors — `finish` (an answer relayed),
//! [`Client::refuse`] (the proxy's own answer, built and sent only there) or `abort`
//! (closed without an answer).

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use appproxy_shared::header::{self, IdPolicy};
use appproxy_shared::{scope_traced, RequestId};

use super::retry::{self, Attempt, Retry};
use super::tunnel::TunnelEnds;
use super::upstream::HeadFailure;
use super::{
    connect, connect_route, kind_of, note_health, read_response_head, AppSide, MAX_INTERIM,
};
use super::{forwarded_id, Client, Failure, Left, Next, BODY_BUF_LIMIT};
use crate::core::pool::Lease;
use crate::core::{access_log, counter, AccessEntry, Core, Route};
use crate::http::encode::{self, ClientFraming, Keep, TraceHeaders};
use crate::http::error::{ProxyError, Refusal, RequestError, ResponseError};
use crate::http::parse::{self, BodyFraming, Method, RequestHead, ResponseHead};
use crate::io::TcpConn;
use crate::relay::{self, DstWatch, Mode, RelayError, RelayOpts, Trailers};

/// Copies of the head's method and path, for logging after the buffer moved on: one
/// buffer the connection hands from request to request (no allocation per request).
pub(super) struct LogLine {
    /// The method token (at most [`access_log::METHOD_MAX`] bytes), then the request
    /// target (at most [`access_log::PATH_MAX`] bytes): what the line keeps.
    text: Vec<u8>,
    /// Where the method ends in `text`.
    method_len: usize,
}

impl LogLine {
    fn method(&self) -> &[u8] {
        &self.text[..self.method_len]
    }

    fn path(&self) -> &[u8] {
        &self.text[self.method_len..]
    }
}

/// One request on the connection: its head (ranges into the client buffer) and what
/// its access line needs.
pub(super) struct Exchange {
    /// The request head, at the start of the client buffer until consumed.
    head: RequestHead,
    /// The request ID (forwarded, echoed, logged).
    pub(super) id: RequestId,
    /// The trace position, with `[tracing] trace_context`.
    pub(super) trace: Option<crate::trace::Hop>,
    /// Method and path for the access line.
    line: LogLine,
    /// When the head was complete.
    started: Instant,
    /// The circuit, once routed.
    route: Option<Rc<Route>>,
    /// The client's address as the request rate and the circuit's allowlist see it,
    /// once read (a tunnel is re-checked with it when a deployment changes the
    /// circuit; an exchange past admission always has it).
    client: Option<std::net::IpAddr>,
    /// The client's address as the connection knows it (the peer, or the one a
    /// PROXY protocol header named), for the access line until `client` is known.
    peer: std::net::IpAddr,
    /// Request head bytes the access line of a refusal counts.
    bytes_in: u64,
    /// The app tried and the body bytes it was given, for a refusal's or an
    /// abort's access line.
    side: AppSide,
}

/// A request's ID (taken from its header when valid, else generated; `-` when IDs are
/// off) and its trace hop (when trace context is on), from its head parsed out of
/// `buf`. The HTTP/1.1 connection and each HTTP/2 stream start here.
pub(crate) fn identify(
    core: &Core,
    buf: &[u8],
    head: &RequestHead,
) -> (RequestId, Option<crate::trace::Hop>) {
    let id = request_id(
        core,
        head.headers
            .iter()
            .map(|h| (&buf[h.name.clone()], &buf[h.value.clone()])),
    );
    let trace = core
        .rt
        .trace_context
        .then(|| crate::trace::Hop::resolve(buf, &head.headers, &id));
    (id, trace)
}

/// A request's ID from its header fields (the first valid of the ID headers, in
/// their rank), or a new one; `-` when request IDs are off.
pub(crate) fn request_id<'a>(
    core: &Core,
    fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> RequestId {
    if !core.rt.request_ids {
        return RequestId::parse(b"-").unwrap_or_else(|_| RequestId::generate(core.rt.id_version));
    }
    header::resolve(
        IdPolicy::GenerateIfMissing,
        header::extract(fields),
        core.rt.id_version,
    )
    .0
    .unwrap_or_else(|| RequestId::generate(core.rt.id_version))
}

impl Exchange {
    /// A request whose head was just parsed from `buf`: its ID resolved (or
    /// generated) and its trace context read.
    /// `text`: the storage of the method and path copies (the previous request's,
    /// reused; see [`Exchange::into_storage`]).
    pub(super) fn new(
        core: &Core,
        buf: &[u8],
        head: RequestHead,
        started: Instant,
        mut text: Vec<u8>,
        peer: std::net::IpAddr,
    ) -> Self {
        let (id, trace) = identify(core, buf, &head);
        let method = &buf[head.method_raw.clone()];
        let path = &buf[head.target.clone()];
        text.clear();
        let method = &method[..method.len().min(access_log::METHOD_MAX)];
        text.extend_from_slice(method);
        text.extend_from_slice(&path[..path.len().min(access_log::PATH_MAX)]);
        let line = LogLine {
            text,
            method_len: method.len(),
        };
        Self {
            head,
            id,
            trace,
            line,
            started,
            route: None,
            client: None,
            peer,
            bytes_in: 0,
            side: AppSide::default(),
        }
    }

    /// The storage of the method and path copies and of the head's field list, for
    /// the next request.
    pub(super) fn into_storage(self) -> (Vec<u8>, Vec<parse::HeaderField>) {
        (self.line.text, self.head.headers)
    }

    /// The storage of the head's field list, taken for the next connection (an
    /// exchange kept for a tunnel's access line needs none of its fields).
    pub(super) fn take_fields(&mut self) -> Vec<parse::HeaderField> {
        std::mem::take(&mut self.head.headers)
    }

    /// The circuit served, once routed.
    fn circuit(&self) -> Option<&appproxy_shared::model::Circuit> {
        self.route.as_deref().map(|r| &r.circuit.circuit)
    }

    /// The access entry of this exchange with `status`, `bytes_in`, `bytes_out` and
    /// `upstream`.
    fn entry(
        &self,
        status: u16,
        bytes: (u64, u64),
        upstream: Option<SocketAddr>,
    ) -> AccessEntry<'_> {
        AccessEntry {
            request_id: &self.id,
            circuit: self.circuit(),
            client: Some(self.client.unwrap_or(self.peer)),
            method: self.line.method(),
            path: self.line.path(),
            status,
            bytes_in: bytes.0,
            bytes_out: bytes.1,
            upstream,
            started: self.started,
        }
    }

    /// The access entry of this exchange when the app's answer did not reach the
    /// client (a refusal of `status`, or an abort: 0): the request's `head_bytes`
    /// and the body bytes the app was given, the app tried last, out only the
    /// interim heads relayed before (the refusal's own bytes are added where it is
    /// sent). Before, those interim heads were left out (an outside tester's find).
    fn unanswered_entry(&self, status: u16, head_bytes: u64) -> AccessEntry<'_> {
        let bytes_in = head_bytes + self.side.body_in.get();
        let out = self.side.interim_out.get();
        self.entry(status, (bytes_in, out), self.side.addr.get())
    }
}

/// Whether a relay counted its bytes out (`appproxy_bytes_out_total`) as they went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    Already,
    Not,
}

/// Why an exchange ended while the app had not answered yet.
pub(crate) const CLIENT_LEFT: &str = "the client left before the app answered";

/// A connect's outcome watched with [`relay::unless_client_left`]: the client's
/// leaving (`None`) aborts the exchange as such.
fn unless_left<T>(watched: Option<Result<T, Failure>>) -> Result<T, Failure> {
    watched.unwrap_or_else(|| Err(Failure::Abort(CLIENT_LEFT.into())))
}

/// How an attempt on an upstream connection failed.
enum Attempted {
    /// The retry rule says: again, on a fresh connection (the message for the log).
    Retry(ProxyError, &'static str),
    /// The exchange fails.
    Failed(Failure),
}

/// The request as it went out: what the response is relayed with.
struct Sent {
    /// The app's connection.
    upstream: TcpConn,
    /// The app's address.
    addr: SocketAddr,
    /// Request bytes read from the client (head and body).
    bytes_in: u64,
    /// What the request offered to upgrade to, when it asked for an upgrade.
    offered: Option<Offer>,
    /// Whether the app answered before it took the whole request body: the rest of
    /// the body is still on the client connection, which closes after the answer.
    body_cut: bool,
}

/// What an upgrade request offered, copied before its head leaves the buffer.
struct Offer {
    /// Its `Upgrade` value.
    protocols: Vec<u8>,
    /// Its `Sec-WebSocket-Extensions` values, joined with commas.
    extensions: Vec<u8>,
    /// Its `Sec-WebSocket-Key` values (one, in a WebSocket handshake).
    keys: Vec<Vec<u8>>,
}

impl Offer {
    fn of(head: &RequestHead, buf: &[u8]) -> Option<Self> {
        let upgrade = head.upgrade.clone()?;
        let mut extensions = Vec::new();
        let mut keys = Vec::new();
        for h in &head.headers {
            let name = &buf[h.name.clone()];
            if parse::name_is(name, "sec-websocket-extensions") {
                if !extensions.is_empty() {
                    extensions.push(b',');
                }
                extensions.extend_from_slice(&buf[h.value.clone()]);
            } else if parse::name_is(name, "sec-websocket-key") {
                keys.push(buf[h.value.clone()].to_vec());
            }
        }
        Some(Self {
            protocols: buf[upgrade].to_vec(),
            extensions,
            keys,
        })
    }
}

/// A completed exchange.
pub(super) struct Done {
    pub(super) status: u16,
    pub(super) bytes_in: u64,
    pub(super) bytes_out: u64,
    pub(super) upstream: SocketAddr,
    pub(super) next: Next,
}

impl Client {
    /// Handles one request whose head is at the start of the client buffer.
    pub(super) async fn exchange(&mut self, x: &mut Exchange) -> Next {
        let core = self.core.clone();
        if let Some(t) = &x.trace {
            t.log_rejection();
        }
        // The client's request rate (429), before anything else is looked at: a
        // request for no circuit costs its client as much as any.
        let client_ip = self.client_ip(&x.head);
        if let Ok(ip) = client_ip {
            // Named on the access line from here, refused or not.
            x.client = Some(ip);
            if let Err(err) = core.take_request(&self.hop, ip) {
                x.bytes_in = x.head.head_len as u64;
                return self.refuse(x, (&err).into(), Left::Whole).await;
            }
        }
        let head = &x.head;
        let host = head.host.clone().map(|h| &self.buf.filled()[h]);
        let Some(route) = core.route_for(self.hop.local_port, host) else {
            let err = ProxyError::UnknownCircuit;
            tracing::info!(error = %err, port = self.hop.local_port, "request refused");
            return self.refuse(x, (&err).into(), Left::Whole).await;
        };
        x.route = Some(route.clone());
        let Ok(peer_ip) = client_ip else {
            let err = ProxyError::Request(RequestError::Malformed(super::UNREAD_FORWARDED_FOR));
            return self.refuse(x, (&err).into(), Left::Whole).await;
        };
        // Access control: the allowlist (403), then credentials (401) and, for the
        // permit, the request's origin (403). Nothing about the circuit is in the answer.
        let refused = if !route.circuit.admits(peer_ip) {
            tracing::info!(peer = %peer_ip, "client address not in the circuit's allowlist");
            Some(crate::auth::Refused {
                status: 403,
                code: "forbidden",
                message: "client address not allowed",
            })
        } else {
            match super::admit(&core, &self.hop, self.buf.filled(), &x.head, &route) {
                Ok(super::Admit::Forward) => None,
                Ok(super::Admit::Preflight(fields)) => {
                    x.bytes_in = x.head.head_len as u64;
                    return self.answer_preflight(x, &fields).await;
                }
                Err(refused) => Some(refused),
            }
        };
        if let Some(refused) = refused {
            x.bytes_in = x.head.head_len as u64;
            return self.refuse(x, refused.into(), Left::Whole).await;
        }
        core.mark_access(route.circuit.circuit.id);
        // The hop names this request's client (and whether its app is an RStudio
        // Server) for what is forwarded, set in place: every admitted request sets it.
        self.hop.admitted(peer_ip, route.is_rstudio());
        if x.head.upgrade.is_some() && x.head.framing != BodyFraming::Length(0) {
            // An upgrade offered on a request with a body is ignored (RFC 9110 §7.8
            // lets a server do so): apps disagree on where such a body ends, some
            // taking it for the new protocol's first bytes, which would reach them
            // uninspected. The request goes on as a plain one (no `Upgrade`, nothing
            // listed in `Connection`), and a 101 to it is refused. Clients such as
            // curl offer `h2c` on a POST; refusing would break them.
            x.head.upgrade = None;
        }
        let early = if x.head.method == Method::Connect {
            Some(ProxyError::Request(RequestError::Malformed(
                "CONNECT is not supported",
            )))
        } else {
            match x.head.framing {
                BodyFraming::Length(n) if core.rt.max_body > 0 && n > core.rt.max_body => {
                    Some(ProxyError::Request(RequestError::BodyTooLarge))
                }
                _ => None,
            }
        };
        if let Some(err) = early {
            return self.refuse(x, (&err).into(), Left::Whole).await;
        }
        x.bytes_in = x.head.head_len as u64;
        if matches!(
            route.circuit.circuit.protocol,
            appproxy_shared::model::ProxyProtocol::Http2
                | appproxy_shared::model::ProxyProtocol::Grpc
        ) {
            return self.bridge(x, &route).await;
        }
        let outcome = self.forward(x, &route).await;
        self.conclude(x, outcome).await
    }

    /// An HTTP/1.1 request to an app that speaks HTTP/2 only: bridged (no upgrades
    /// there).
    async fn bridge(&mut self, x: &Exchange, route: &Route) -> Next {
        let core = self.core.clone();
        // Watched while it lives (a gRPC call may stream for hours): a deployment
        // that no longer admits it closes the client's connection and drops the
        // exchange, which resets the app's stream.
        let watched = match (&x.route, x.client) {
            (Some(admitted), Some(client)) => {
                Some(core.stream_open(admitted, client, Some(&self.conn)))
            }
            _ => None,
        };
        let revoked = async {
            crate::core::tunnels::Signal::fired_if(watched.as_ref().map(|(_, s)| &**s)).await;
            Err(crate::http2::stream::Fail::Abort(
                "a deployment no longer admits the exchange".into(),
            ))
        };
        // An exchange whose place in the core's budget of streams to apps another
        // address's stream took ends ([`crate::http2::stream::made_room`]).
        let activity = crate::http2::budget::Activity::new(core.reactor.now());
        let made_room = crate::http2::stream::made_room(&core, &activity, &x.side);
        let bridged = futures_lite::future::or(
            crate::http2::bridge::forward(
                &core,
                &self.conn,
                &mut self.buf,
                self.hop,
                &x.head,
                route,
                x.id,
                x.trace,
                &x.side,
                &activity,
            ),
            futures_lite::future::or(revoked, made_room),
        )
        .await;
        let bridged = bridged.map_err(|failure| failure.drained(&core, &x.side));
        match bridged {
            // The bridge counted its bytes out itself.
            Ok(b) => {
                let status = b.done.status;
                let bytes_in = x.head.head_len as u64 + b.done.bytes_in;
                core.metrics.status(status);
                core.record(&x.entry(status, (bytes_in, b.done.bytes_out), Some(b.done.upstream)));
                if b.keep_alive {
                    Next::KeepAlive
                } else if b.body_left {
                    Next::Linger
                } else {
                    Next::Close
                }
            }
            // The bridge read the body as it went: the stream position is lost.
            Err(crate::http2::stream::Fail::Answer(err)) => {
                let failed = Failure::Answer(err, Left::Partial);
                self.conclude(x, Err(failed)).await
            }
            Err(crate::http2::stream::Fail::Abort(reason)) => self.abort(x, &reason),
            // As an answer relayed whole: the head's bytes in, the bytes out already
            // counted.
            Err(crate::http2::stream::Fail::Cut(cut)) => {
                let bytes = (x.head.head_len as u64 + cut.bytes.0, cut.bytes.1);
                self.cut(x, &retry::Cut { bytes, ..cut }, Counted::Already)
            }
        }
    }

    /// Ends an exchange by its outcome: a relayed answer, a refusal or an abort.
    async fn conclude(&mut self, x: &Exchange, outcome: Result<Done, Failure>) -> Next {
        let outcome = outcome.map_err(|failure| failure.drained(&self.core, &x.side));
        match outcome {
            Ok(done) => self.finish(x, &done),
            Err(Failure::Answer(err, left)) => {
                tracing::warn!(error = %err, "request failed");
                self.refuse(x, (&err).into(), left).await
            }
            Err(Failure::Abort(reason)) => self.abort(x, &reason),
            Err(Failure::Cut(cut)) => self.cut(x, &cut, Counted::Not),
        }
    }

    /// An answer was relayed: counted and logged (a tunnel handed to a task of its
    /// own, once it ends: [`super::tunnel::Handoff`]; without one to hand, the
    /// exchange is logged now and the connection closes).
    fn finish(&self, x: &Exchange, done: &Done) -> Next {
        if done.next == Next::Tunnel && self.handoff.is_some() {
            return Next::Tunnel;
        }
        Self::finished(&self.core, x, done);
        match done.next {
            Next::Tunnel => Next::Close,
            next => next,
        }
    }

    /// Counts and logs an exchange whose answer was relayed.
    pub(super) fn finished(core: &Core, x: &Exchange, done: &Done) {
        core.metrics.status(done.status);
        core.metrics.add(counter::BYTES_OUT, done.bytes_out);
        core.record(&x.entry(
            done.status,
            (done.bytes_in, done.bytes_out),
            Some(done.upstream),
        ));
    }

    /// The exchange ended without an answer (the response had started, or the
    /// client is gone): logged with status 0, and the connection closes.
    fn abort(&self, x: &Exchange, reason: &str) -> Next {
        Self::aborted(&self.core, x, reason);
        Next::Close
    }

    /// Counts and logs an exchange that ended without an answer.
    pub(super) fn aborted(core: &Core, x: &Exchange, reason: &str) {
        tracing::info!(reason = %reason, "exchange aborted");
        core.metrics.add(counter::PROXY_ERRORS, 1);
        core.metrics
            .add(counter::BYTES_OUT, x.side.interim_out.get());
        core.record(&x.unanswered_entry(0, x.head.head_len as u64));
    }

    /// An answer was cut part way: counted as relayed so far (its status, the bytes
    /// that went, unless the relay `counted` them as they went) and as a proxy
    /// error; the connection closes.
    fn cut(&self, x: &Exchange, cut: &retry::Cut, counted: Counted) -> Next {
        tracing::info!(reason = %cut.reason, status = cut.status, "response cut");
        let core = &self.core;
        core.metrics.add(counter::PROXY_ERRORS, 1);
        core.metrics.status(cut.status);
        if counted == Counted::Not {
            core.metrics.add(counter::BYTES_OUT, cut.bytes.1);
        }
        core.record(&x.entry(cut.status, cut.bytes, Some(cut.upstream)));
        Next::Close
    }

    /// Refuses the exchange `x` with one of the proxy's own answers; `left`: how much
    /// of the request the buffer still holds, which decides whether the connection
    /// goes on.
    pub(super) async fn refuse(&mut self, x: &Exchange, r: Refusal, left: Left) -> Next {
        let next = match self.settle(&x.head, left, r.closes) {
            // A client too slow to send its request is not waited for again.
            Next::Linger if r.status == 408 => Next::Close,
            next => next,
        };
        let entry = x.unanswered_entry(r.status, x.bytes_in);
        let bodiless = x.head.method == Method::Head;
        let keep = Keep::of(next != Next::KeepAlive, x.head.version);
        self.send_refusal(&entry, &r, keep, bodiless).await;
        next
    }

    /// Answers a CORS preflight to a private circuit itself (204 with `fields`): it is
    /// bodiless (checked before it was admitted), so the connection goes on.
    async fn answer_preflight(
        &mut self,
        x: &Exchange,
        fields: &[crate::auth::PreflightField],
    ) -> Next {
        let next = self.settle(&x.head, Left::Whole, false);
        let core = &self.core;
        self.out.clear();
        let keep = Keep::of(next != Next::KeepAlive, x.head.version);
        encode::preflight_response(&mut self.out, fields, &x.id, keep);
        self.conn.set_timeout(core.rt.body_idle_timeout);
        let _ = self.conn.write_all(&self.out).await;
        core.metrics.add(counter::BYTES_OUT, self.out.len() as u64);
        core.metrics.status(204);
        core.record(&x.entry(204, (x.bytes_in, self.out.len() as u64), None));
        next
    }

    /// Refuses a request whose head could not be read (no exchange yet); the
    /// connection closes, lingering unless the head timed out.
    pub(super) async fn refuse_head(&mut self, e: RequestError) -> Next {
        let next = if e == RequestError::HeadTimeout {
            Next::Close
        } else {
            Next::Linger
        };
        // The client's own ID and trace when its head carried them, as far as it
        // was read: its line, its access line and its span are the refusal's.
        let head = parse::RefusedHead::read(self.buf.filled());
        let id = head.id_or(self.core.rt.id_version);
        let span = head.span(self.core.rt.trace_context, &id);
        let err = ProxyError::Request(e);
        let r = Refusal::from(&err);
        // A `HEAD` whose head was refused still gets no content: its request line
        // is read as far as the method.
        let bodiless = parse::is_head_request(self.buf.filled());
        scope_traced(Some(id), span, async {
            tracing::info!(error = %err, "request refused");
            let entry = AccessEntry::unread(&id, self.hop.peer.ip(), r.status, 0);
            self.send_refusal(&entry, &r, Keep::Close, bodiless).await;
        })
        .await;
        next
    }

    /// The one place where the proxy's own HTTP/1 answers are built and sent: the
    /// JSON error body with the request ID (none to a `HEAD`: `bodiless`), counted
    /// and logged (the answer's bytes added to `entry`'s `bytes_out`: the interim
    /// heads that went before it).
    async fn send_refusal(
        &mut self,
        entry: &AccessEntry<'_>,
        r: &Refusal,
        keep: Keep,
        bodiless: bool,
    ) {
        let core = &self.core;
        let out = &mut self.out;
        out.clear();
        encode::refusal_response(out, r, entry.request_id, keep, bodiless);
        self.conn.set_timeout(core.rt.body_idle_timeout);
        let _ = self.conn.write_all(out).await;
        core.count_refusal(r);
        let bytes_out = entry.bytes_out + out.len() as u64;
        core.metrics.add(counter::BYTES_OUT, bytes_out);
        core.record(&AccessEntry {
            bytes_out,
            ..*entry
        });
    }

    /// Forwards the request and relays the response.
    async fn forward(&mut self, x: &Exchange, route: &Route) -> Result<Done, Failure> {
        let core = self.core.clone();
        let head = &x.head;
        let addr = pick_upstream(&core, route)?;
        let has_body = head.framing != BodyFraming::Length(0);
        // Copied now: the head leaves the buffer before the response comes.
        let offered = Offer::of(head, self.buf.filled());
        if has_body {
            // From here the body is timed: the idle timeout per wait, and the minimum
            // average rate over the whole body. No upstream connection is held until the
            // first body bytes are in.
            self.conn
                .arm_read_floor(core.rt.min_body_rate, core.rt.body_idle_timeout);
            if let Err(f) = self.await_body(head, &x.id).await {
                self.conn.disarm_read_floor();
                return Err(f);
            }
        }
        let opened = self.open_upstream(route, addr, &x.side, has_body).await;
        let (mut upstream, addr, reused) = match opened {
            Ok(opened) => opened,
            Err(f) => {
                self.conn.disarm_read_floor();
                return Err(f);
            }
        };
        let mut attempt = Attempt::first(head.method, has_body, reused);
        self.ubuf.consume(usize::MAX);
        loop {
            match self.attempt(x, route, &upstream, addr, attempt).await {
                Ok((resp, bytes_in, body_cut)) => {
                    let sent = Sent {
                        upstream,
                        addr,
                        bytes_in,
                        offered,
                        body_cut,
                    };
                    return self.relay_response(x, route, resp, sent).await;
                }
                Err(Attempted::Retry(err, what)) => {
                    tracing::debug!(error = %err, "{what}");
                    attempt = attempt.again();
                    let again = async { Ok::<_, Failure>(connect(&core, route, addr).await?) };
                    let abort = core.rt.abort_on_client_close;
                    let watched = relay::unless_client_left(again, &self.conn, !has_body, abort);
                    upstream = unless_left(watched.await)?;
                }
                Err(Attempted::Failed(f)) => return Err(f),
            }
        }
    }

    /// A pooled connection to `addr`, or a new one (to `addr` or, when that fails,
    /// another upstream of the route): the connection, its address, whether reused.
    /// `side` is told the apps tried.
    ///
    /// The client is watched while the app is connected to, as while the app is
    /// silent ([`read_response_head`]), and one gone (reset or hung up; for a
    /// request without a body, read whole, its end of stream too with `[upstream]
    /// abort_on_client_close`) ends the connect, dropped, the app's health
    /// untouched: the exchange is logged as the client's leaving, not as the 502
    /// or 504 of a connect that failed seconds after it left. With a body to come,
    /// its end of stream is no leaving (the body's reads see it).
    async fn open_upstream(
        &mut self,
        route: &Route,
        addr: SocketAddr,
        side: &AppSide,
        has_body: bool,
    ) -> Result<(TcpConn, SocketAddr, bool), Failure> {
        let core = &self.core;
        if let Some(c) =
            core.pool
                .take(addr, kind_of(route, addr), core.reactor.now(), self.conn_id)
        {
            side.tried(addr);
            core.metrics.add(counter::POOL_HIT, 1);
            return Ok((c, addr, true));
        }
        core.metrics.add(counter::POOL_MISS, 1);
        let connect = connect_route(core, route, addr, side);
        let abort = core.rt.abort_on_client_close;
        let watched = relay::unless_client_left(connect, &self.conn, !has_body, abort);
        let (conn, used) = unless_left(watched.await)?;
        Ok((conn, used, false))
    }

    /// The final answer an app sent before it took the whole request body (it
    /// closed, or it stopped reading): interim heads before it (an unsolicited 100,
    /// a 103) are passed over, at most [`MAX_INTERIM`] of them, since the client's
    /// connection closes after the answer anyway. Logged; the caller relays it.
    async fn early_answer(
        &mut self,
        core: &Core,
        (upstream, addr): (&TcpConn, SocketAddr),
        method: Method,
    ) -> Result<ResponseHead, HeadFailure> {
        for _ in 0..=MAX_INTERIM {
            let resp = read_response_head(
                core,
                upstream,
                &mut self.ubuf,
                &mut self.resp_fields,
                method,
                None,
            )
            .await?;
            match resp.status {
                101 => break,
                100..=199 => self.ubuf.consume(resp.head_len),
                status => {
                    // The address dialled: the socket's own peer is gone once the
                    // app closed (it read "Transport endpoint is not connected").
                    tracing::info!(
                        upstream = %addr,
                        status,
                        "the app answered before taking the whole request body"
                    );
                    return Ok(resp);
                }
            }
        }
        Err(HeadFailure::Invalid(ResponseError::Malformed(
            "no final answer before the request body was taken",
        )))
    }

    /// One attempt on `upstream`: the request sent (head, and body as it comes), its
    /// response head read. Returns the head, the request bytes read from the client,
    /// and whether the app answered before it took the whole body; a failure is
    /// either retried ([`retry::may_retry`]) or the exchange's.
    async fn attempt(
        &mut self,
        x: &Exchange,
        route: &Route,
        upstream: &TcpConn,
        addr: SocketAddr,
        attempt: Attempt,
    ) -> Result<(ResponseHead, u64, bool), Attempted> {
        let core = self.core.clone();
        let rt = &core.rt;
        let head = &x.head;
        let has_body = head.framing != BodyFraming::Length(0);
        let mut bytes_in = head.head_len as u64;
        self.out.clear();
        let traceparent = x.trace.map(|t| t.span.traceparent());
        encode::upstream_request_traced(
            &mut self.out,
            self.buf.filled(),
            head,
            forwarded_id(&core, &x.id),
            x.trace
                .zip(traceparent.as_ref())
                .map(|(t, h)| TraceHeaders {
                    traceparent: h.as_bytes(),
                    keep_tracestate: t.keep_tracestate,
                }),
            &self.hop,
            addr,
        );
        let upstream_head_len = self.out.len() as u64;
        let send = if attempt.replayable() {
            // No body: the head alone, kept in the client buffer until the response
            // arrived, so a dead pooled connection can be retried.
            upstream.set_timeout(rt.body_idle_timeout);
            upstream
                .write_all(&self.out)
                .await
                .map(|()| 0)
                .map_err(|e| (RelayError::Destination(e), 0))
        } else {
            self.buf.consume(head.head_len);
            let mode = match head.framing {
                BodyFraming::Length(n) => Mode::Length(n),
                BodyFraming::Chunked => Mode::Chunked(Trailers::RefuseForbidden),
                BodyFraming::Eof => Mode::UntilClose,
            };
            let opts = RelayOpts {
                max_payload: rt.max_body,
                idle: rt.body_idle_timeout,
                source_idle: rt.body_idle_timeout,
                buf_limit: BODY_BUF_LIMIT,
                // An app's early refusal is watched for by peeking at raw bytes:
                // not through TLS.
                watch_dst: if upstream.is_tls() {
                    DstWatch::None
                } else {
                    DstWatch::Refusal
                },
            };
            relay::relay_body_counted(
                &self.conn,
                &mut self.buf,
                upstream,
                &mut self.out,
                mode,
                opts,
            )
            .await
        };
        // What the app was given, for the access line however the exchange ends.
        let (Ok(written) | Err((_, written))) = send;
        x.side
            .body_in
            .set(written.saturating_sub(upstream_head_len));
        let send = send.map_err(|(e, _)| e);
        let floor_cut = has_body && self.conn.floor_cut();
        if has_body {
            self.conn.disarm_read_floor();
        }
        let failed = |f| Err(Attempted::Failed(f));
        match send {
            Ok(n) => bytes_in += n.saturating_sub(upstream_head_len),
            // The app closed the connection, or stopped taking the body for
            // `body_idle_secs` (504). Either way it may have answered first: an app
            // that refuses a body (413, 401 …) before it has read it all, then
            // closes, or a success the relay let the body go on past (an app that
            // answers early and reads on). That answer is relayed, not a 502 or 504,
            // and the client's connection closes after it, the rest of the body
            // unread. A closed app's answer, if any, is already in the socket (read
            // at once); a stalled one's is looked for only where it may be waiting.
            // (A request without a body was sent whole before any wait.)
            Err(RelayError::Destination(e)) => {
                let stalled = e.kind() == io::ErrorKind::TimedOut;
                let err = if stalled {
                    ProxyError::UpstreamTimeout
                } else {
                    ProxyError::UpstreamClosed(e)
                };
                if !stalled && retry::may_retry(err.fault(), Retry::IfReused, attempt) {
                    let what = "pooled upstream connection was dead; retrying on a new one";
                    return Err(Attempted::Retry(err, what));
                }
                if !attempt.replayable()
                    && (!stalled || upstream.answer_may_wait(!self.ubuf.is_empty()))
                {
                    if let Ok(resp) = self
                        .early_answer(&core, (upstream, addr), head.method)
                        .await
                    {
                        note_health(&core, route, addr, true);
                        return Ok((resp, bytes_in, true));
                    }
                }
                if stalled {
                    tracing::warn!(upstream = %addr, "the app stopped taking the request body");
                }
                self.ubuf.consume(usize::MAX);
                let left = if attempt.replayable() {
                    Left::Whole
                } else {
                    Left::Partial
                };
                return failed(Failure::Answer(err, left));
            }
            // The app began an answer that ends the request while it was still
            // being given the body (it stopped reading, or the client's next bytes
            // were awaited): relayed at once, the connection to the app not reused
            // and the client's closed after it, the rest of the body unread.
            Err(RelayError::Answered) => {
                // The body ends here for the app too: one that answered early but
                // reads on (full duplex) sees its end rather than waiting for bytes
                // that never come while the worker waits for its answer.
                upstream.shutdown_write();
                return match self
                    .early_answer(&core, (upstream, addr), head.method)
                    .await
                {
                    Ok(resp) => {
                        note_health(&core, route, addr, true);
                        Ok((resp, bytes_in, true))
                    }
                    Err(f) => {
                        note_health(&core, route, addr, false);
                        failed(Failure::Answer(f.into_error(), Left::Partial))
                    }
                };
            }
            Err(RelayError::Source(e)) => return failed(body_read_failure(e, floor_cut)),
            Err(RelayError::Framing(what)) => {
                let err = ProxyError::Request(RequestError::BadChunk(what));
                return failed(Failure::Answer(err, Left::Partial));
            }
            Err(RelayError::TooLarge) => {
                let err = ProxyError::Request(RequestError::BodyTooLarge);
                return failed(Failure::Answer(err, Left::Partial));
            }
        }
        let sent = core.metrics.histograms().then(Instant::now);
        // The client watched meanwhile: one gone ends the wait (and the app's
        // connection, holding a request it may still answer, is closed). Its
        // request was read whole: its end of stream is its leaving, with
        // `[upstream] abort_on_client_close`.
        let outcome = read_response_head(
            &core,
            upstream,
            &mut self.ubuf,
            &mut self.resp_fields,
            head.method,
            Some((&self.conn, relay::Gone::on_close(rt.abort_on_client_close))),
        )
        .await;
        if let Err(HeadFailure::ClientGone) = outcome {
            return failed(Failure::Abort(CLIENT_LEFT.into()));
        }
        if let (Ok(_), Some(sent)) = (&outcome, sent) {
            core.metrics.upstream_head.observe(sent.elapsed());
        }
        match outcome {
            Ok(resp) => {
                note_health(&core, route, addr, true);
                if attempt.replayable() {
                    self.buf.consume(head.head_len);
                }
                Ok((resp, bytes_in, false))
            }
            Err(f) => {
                let retry = f.retry();
                let err = f.into_error();
                let attempt = Attempt {
                    response_started: !self.ubuf.is_empty(),
                    ..attempt
                };
                if retry::may_retry(err.fault(), retry, attempt) {
                    let what = "pooled upstream connection closed before answering; retrying";
                    return Err(Attempted::Retry(err, what));
                }
                note_health(&core, route, addr, false);
                if attempt.replayable() {
                    self.buf.consume(head.head_len);
                }
                failed(Failure::Answer(err, Left::Nothing))
            }
        }
    }

    /// Waits until the first bytes of the request body are buffered, sending
    /// `100 Continue` first when the client waits for it, so that an upstream
    /// connection is opened only once a body is really coming. The body timers
    /// (armed by the caller) apply.
    async fn await_body(&mut self, head: &RequestHead, id: &RequestId) -> Result<(), Failure> {
        let core = &self.core;
        if self.buf.filled().len() > head.head_len {
            return Ok(());
        }
        if head.expect_continue {
            self.out.clear();
            encode::continue_response(&mut self.out, forwarded_id(core, id).map(|i| i.as_bytes()));
            self.conn.set_timeout(core.rt.body_idle_timeout);
            self.conn
                .write_all(&self.out)
                .await
                .map_err(|e| Failure::Abort(format!("client write: {e}")))?;
        }
        tracing::debug!("waiting for the request body before connecting upstream");
        let limit = BODY_BUF_LIMIT.max(self.head_limit);
        while self.buf.filled().len() <= head.head_len {
            self.conn.set_timeout(core.rt.body_idle_timeout);
            match self.buf.fill(&self.conn, limit).await {
                Ok(0) => return Err(Failure::Abort("client closed before its body".into())),
                Ok(n) => core.metrics.add(counter::BYTES_IN, n as u64),
                Err(e) => return Err(body_read_failure(e, self.conn.floor_cut())),
            }
        }
        Ok(())
    }

    /// Relays the response (interim heads, final head, body) and settles both
    /// connections.
    async fn relay_response(
        &mut self,
        x: &Exchange,
        route: &Route,
        resp: ResponseHead,
        sent: Sent,
    ) -> Result<Done, Failure> {
        let (mut resp, mut bytes_out) = self.relay_interim(x, &sent, resp).await?;
        if resp.status == 101 {
            return self.upgrade(x, route, resp, sent, bytes_out).await;
        }
        let core = self.core.clone();
        let rt = &core.rt;
        let req = &x.head;
        let Sent {
            upstream,
            addr,
            bytes_in,
            body_cut,
            ..
        } = sent;
        let framing = ClientFraming::choose(resp.framing, req.version);
        let close = !req.keep_alive || core.draining.get() || body_cut;
        self.out.clear();
        encode::client_response(
            &mut self.out,
            self.ubuf.filled(),
            &resp,
            framing,
            forwarded_id(&core, &x.id),
            req.version,
            close,
        );
        self.ubuf.consume(resp.head_len);
        self.resp_fields = std::mem::take(&mut resp.headers);
        let mode = match framing {
            ClientFraming::Empty => Mode::Length(0),
            ClientFraming::Length(n) => Mode::Length(n),
            ClientFraming::Chunked => Mode::Chunked(Trailers::DropForbidden),
            ClientFraming::Dechunk => Mode::Dechunk,
            ClientFraming::Rechunk => Mode::Rechunk,
            ClientFraming::UntilClose => Mode::UntilClose,
        };
        let opts = RelayOpts {
            max_payload: 0,
            idle: rt.body_idle_timeout,
            source_idle: rt.response_idle_timeout,
            buf_limit: BODY_BUF_LIMIT,
            // The client gone while the app is silent ends the relay at once. Its
            // end of stream too (`[upstream] abort_on_client_close`), unless the
            // rest of its body is still unread after an early answer: that end
            // may be the body's.
            watch_dst: DstWatch::Gone(relay::Gone::on_close(rt.abort_on_client_close && !body_cut)),
        };
        // A response of no set length (server-sent events, a token stream) may run
        // for hours: watched while it is relayed, as a tunnel is, so a deployment
        // that no longer admits its client closes both connections. A response of a
        // known length ends by itself and costs nothing here.
        let _watched = match (&mode, &x.route, x.client) {
            (Mode::Length(_), _, _) => None,
            (_, Some(admitted), Some(client)) => {
                let (watched, _) = core.stream_open(admitted, client, Some(&self.conn));
                watched.watch(&upstream);
                Some(watched)
            }
            _ => None,
        };
        let relayed = relay::relay_body_counted(
            &upstream,
            &mut self.ubuf,
            &self.conn,
            &mut self.out,
            mode,
            opts,
        )
        .await;
        match relayed {
            Ok(n) => bytes_out += n,
            // Nothing reached the client yet but interim heads, which commit to
            // nothing (the head goes out with the first body bytes): it still gets
            // a 502 instead of an empty reply.
            Err((RelayError::Framing(what), 0)) => {
                tracing::warn!(upstream = %addr, error = what, "malformed chunked response body");
                return Err(Failure::Answer(
                    ProxyError::UpstreamResponse(ResponseError::BadChunk(what)),
                    Left::Nothing,
                ));
            }
            Err((RelayError::Source(e), 0)) => {
                return Err(Failure::Answer(
                    ProxyError::UpstreamClosed(e),
                    Left::Nothing,
                ));
            }
            Err((e, n)) => {
                if framing.closes() {
                    // The client's only end-of-body mark is the close: it must not
                    // look like one.
                    self.conn.reset_on_close();
                }
                if n == 0 {
                    // Interim heads went out, the final one did not.
                    return Err(Failure::Abort(format!("response body: {e}")));
                }
                return Err(Failure::Cut(retry::Cut {
                    reason: format!("response body: {e}"),
                    status: resp.status,
                    bytes: (bytes_in, bytes_out + n),
                    upstream: addr,
                }));
            }
        }
        // Reuse the upstream connection only if the response was fully and exactly read.
        if resp.keep_alive
            && !body_cut
            && self.ubuf.is_empty()
            && !matches!(mode, Mode::Rechunk | Mode::UntilClose)
        {
            let lease = Lease {
                owner: self.conn_id,
                bodiless: req.method == Method::Head || resp.status == 204 || resp.status == 304,
            };
            core.pool.put(
                addr,
                kind_of(route, addr),
                upstream,
                core.reactor.now(),
                lease,
            );
        }
        Ok(Done {
            status: resp.status,
            bytes_in,
            bytes_out,
            upstream: addr,
            next: if body_cut {
                Next::Linger
            } else if close || framing.closes() {
                Next::Close
            } else {
                Next::KeepAlive
            },
        })
    }

    /// Relays interim (1xx) responses to HTTP/1.1 clients (an HTTP/1.0 client must
    /// get none, RFC 9110 §15.2), at most [`MAX_INTERIM`] of them, until the final
    /// head or a 101; returns it and the bytes written to the client.
    async fn relay_interim(
        &mut self,
        x: &Exchange,
        sent: &Sent,
        mut resp: ResponseHead,
    ) -> Result<(ResponseHead, u64), Failure> {
        let core = self.core.clone();
        let req = &x.head;
        let mut bytes_out = 0u64;
        let mut interim = 0;
        while (100..200).contains(&resp.status) && resp.status != 101 {
            interim += 1;
            if interim > MAX_INTERIM {
                tracing::warn!(
                    upstream = %sent.addr,
                    limit = MAX_INTERIM,
                    "too many interim responses; closing"
                );
                // Interim heads commit to nothing: the client still gets a
                // final answer (RFC 9110 §15.2), as nginx gives one.
                return Err(Failure::Answer(
                    ProxyError::UpstreamResponse(ResponseError::Malformed(
                        "too many interim responses",
                    )),
                    Left::Nothing,
                ));
            }
            if req.version == parse::Version::Http11 {
                self.out.clear();
                encode::interim_response(
                    &mut self.out,
                    self.ubuf.filled(),
                    &resp,
                    forwarded_id(&core, &x.id).map(|i| i.as_bytes()),
                );
                self.conn.set_timeout(core.rt.body_idle_timeout);
                self.conn
                    .write_all(&self.out)
                    .await
                    .map_err(|e| Failure::Abort(format!("client write: {e}")))?;
                bytes_out += self.out.len() as u64;
                x.side.interim_out.set(bytes_out);
            }
            self.ubuf.consume(resp.head_len);
            self.resp_fields = std::mem::take(&mut resp.headers);
            let next = read_response_head(
                &core,
                &sent.upstream,
                &mut self.ubuf,
                &mut self.resp_fields,
                req.method,
                Some((
                    &self.conn,
                    relay::Gone::on_close(core.rt.abort_on_client_close),
                )),
            );
            resp = match next.await {
                Ok(r) => r,
                Err(HeadFailure::ClientGone) => return Err(Failure::Abort(CLIENT_LEFT.into())),
                // After interim heads too: they commit to nothing.
                Err(f) => return Err(Failure::Answer(f.into_error(), Left::Nothing)),
            };
        }
        Ok((resp, bytes_out))
    }

    /// The app's 101 (only to an upgrade request): relayed, then the connection
    /// becomes a tunnel.
    async fn upgrade(
        &mut self,
        x: &Exchange,
        route: &Route,
        resp: ResponseHead,
        sent: Sent,
        bytes_out: u64,
    ) -> Result<Done, Failure> {
        let core = self.core.clone();
        let req = &x.head;
        let chosen = resp.upgrade.clone().map(|u| &self.ubuf.filled()[u]);
        let offered = sent.offered.as_ref();
        // One `Upgrade` field line: the parser keeps the last of several, and a 101
        // naming `websocket` on one line and another offered protocol on the next
        // would be relayed as that other protocol's raw tunnel, its frames uninspected
        // (RFC 9110 §5.3 reads the lines as one list naming both: not one protocol).
        let lines = resp
            .headers
            .iter()
            .filter(|h| parse::name_is(&self.ubuf.filled()[h.name.clone()], "upgrade"))
            .count();
        let switched = match lines {
            0 | 1 => switched_to(offered.map(|o| &o.protocols[..]), chosen),
            _ => Err("101 with more than one Upgrade field line"),
        };
        let switched = switched.and_then(|websocket| {
            if !websocket {
                return Ok(None);
            }
            let buf = self.ubuf.filled();
            let named = |name: &'static str| {
                resp.headers
                    .iter()
                    .filter(move |h| parse::name_is(&buf[h.name.clone()], name))
                    .map(|h| &buf[h.value.clone()])
            };
            let keys = offered.map_or(&[][..], |o| &o.keys[..]);
            crate::ws::check_accept(keys.iter().map(|k| &k[..]), named("sec-websocket-accept"))?;
            let extensions = offered.map_or(&[][..], |o| &o.extensions[..]);
            crate::ws::negotiated_rsv(extensions, named("sec-websocket-extensions")).map(Some)
        });
        let ws_rsv = match switched {
            Ok(ws_rsv) => ws_rsv,
            Err(what) => {
                tracing::warn!(upstream = %sent.addr, error = what, "app's 101 refused");
                return Err(Failure::Answer(
                    ProxyError::UpstreamResponse(ResponseError::Malformed(what)),
                    Left::Nothing,
                ));
            }
        };
        self.out.clear();
        encode::client_response(
            &mut self.out,
            self.ubuf.filled(),
            &resp,
            ClientFraming::Empty,
            forwarded_id(&core, &x.id),
            req.version,
            false,
        );
        self.ubuf.consume(resp.head_len);
        let ends = TunnelEnds {
            upstream: sent.upstream,
            addr: sent.addr,
            bytes_in: sent.bytes_in,
            bytes_out,
            ws_rsv,
            session: x.id,
            circuit: route.circuit.clone(),
        };
        // Watched from here: a deployment that removes the circuit, or makes it
        // refuse this client, closes the tunnel.
        let (Some(route), Some(client)) = (&x.route, x.client) else {
            return Err(Failure::Abort("upgrade of a request never admitted".into()));
        };
        let open = core.tunnel_open(route, client, &self.conn);
        open.watch(&ends.upstream);
        self.tunnel(ends, open).await
    }
}

/// What an app's 101 switched to, checked against the protocols the request offered
/// (`None`: it offered none): the 101 must name the protocol (RFC 9110 §7.8), and only
/// protocols the client offered. Returns whether it is WebSocket, which decides how the
/// tunnel relays (frames inspected, or raw bytes), whatever the request listed.
fn switched_to(offered: Option<&[u8]>, chosen: Option<&[u8]>) -> Result<bool, &'static str> {
    let offered = offered.ok_or("101 without an upgrade request")?;
    let chosen = chosen.ok_or("101 without an Upgrade header")?;
    let mut websocket = false;
    let mut named = false;
    for protocol in parse::list_elements(chosen) {
        if !parse::upgrade_offers(offered).any(|o| o.eq_ignore_ascii_case(protocol)) {
            return Err("101 to a protocol the client did not offer");
        }
        named = true;
        let name = protocol.split(|b| *b == b'/').next().unwrap_or(protocol);
        websocket |= name.eq_ignore_ascii_case(b"websocket");
    }
    if !named {
        return Err("101 without an Upgrade header");
    }
    Ok(websocket)
}

/// An upstream of the route by weighted choice among the healthy ones; none is 503
/// when the health check took every route out, else 502.
fn pick_upstream(core: &Core, route: &Route) -> Result<SocketAddr, Failure> {
    route
        .pick(core.draw(), core.reactor.now(), None)
        .ok_or_else(|| {
            let health_checked_out =
                route.circuit.circuit.route_info.iter().any(|r| {
                    r.health_status == Some(appproxy_shared::model::RouteHealth::Unhealthy)
                });
            let e = if health_checked_out {
                ProxyError::NoHealthyRoute
            } else {
                ProxyError::NoRoute
            };
            Failure::Answer(e, Left::Whole)
        })
}

/// A failed read of the request body: a timeout is answered with 408 (stalled, or
/// below the minimum rate when `floor_cut`), anything else ends the exchange.
fn body_read_failure(e: io::Error, floor_cut: bool) -> Failure {
    if e.kind() != io::ErrorKind::TimedOut {
        return Failure::Abort(format!("client body: {e}"));
    }
    let err = if floor_cut {
        RequestError::BodyTooSlow
    } else {
        RequestError::BodyTimeout
    };
    Failure::Answer(ProxyError::Request(err), Left::Partial)
}
