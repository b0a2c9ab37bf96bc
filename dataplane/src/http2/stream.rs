//! One HTTP/2 stream from a client, handled like an HTTP/1.1 request: its head is
//! written out as an HTTP/1.1 head (`:authority` as `Host`, cookies joined, the body
//! framed by `content-length` or chunked) and parsed by the same parser, so routing,
//! access control (allowlist, permit cookie or bearer token, the CORS preflight
//! rule), request-ID resolution, trace context and header sanitation are the
//! HTTP/1.1 code paths, unchanged. Then:
//!
//! - `http`/`preopen` circuits: forwarded as HTTP/1.1 over the core's upstream pool,
//!   the response relayed back as HTTP/2 frames (hop-by-hop fields dropped, chunked
//!   trailers as HTTP/2 trailers);
//! - `http2`/`grpc` circuits: forwarded over HTTP/2 ([`super::upstream`]).
//!
//! Bodies move one DATA frame at a time; a frame's flow-control capacity is given
//! back to its sender only once the other side took it, so nothing holds a whole
//! body. Errors are the product's JSON answer with the request-ID header, or, for
//! gRPC requests, a trailers-only gRPC status (`grpc-status`, `grpc-message`, the
//! request ID) with HTTP 200.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use appproxy_shared::model::ProxyProtocol;
use appproxy_shared::{scope_traced, RequestId};
use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::h1_body::H1Body;
use super::{within, BodyFloor, ConnCtx, Stall, StreamGuard};
use crate::core::pool::Lease;
use crate::core::tunnels::Signal;
use crate::core::{counter, AccessEntry, Route};
use crate::http::chunked::{encode_chunk, trailer_verdict, ChunkedDecoder, TrailerVerdict};
use crate::http::encode::{self, host_only_cookie, sets_permit_cookie, ClientHop, TraceHeaders};
use crate::http::error::{ProxyError, Refusal, RequestError, ResponseError};
use crate::http::parse::{self, BodyFraming, Method, RequestHead};
use crate::io::TcpConn;
use crate::proxy::retry::{self, Attempt, Retry};
use crate::proxy::{self, AppSide, Failure};
use crate::relay;
use crate::relay::ReadBuf;

/// Largest read buffer towards an HTTP/1.1 app.
const BODY_BUF_LIMIT: usize = 64 * 1024;

/// How a stream failed.
pub enum Fail {
    /// Nothing was sent to the client yet: answer with this error.
    Answer(ProxyError),
    /// No answer can be sent (the client reset the stream, or an interim head went
    /// out): reset it.
    Abort(String),
    /// The app's answer was relayed part way, then broke off: reset, the access
    /// line telling what went.
    Cut(retry::Cut),
}

impl From<Failure> for Fail {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Answer(e, _) => Fail::Answer(e),
            Failure::Abort(s) => Fail::Abort(s),
            Failure::Cut(c) => Fail::Cut(c),
        }
    }
}

impl Fail {
    /// This failure as the core leaves it ([`Failure::drained`]).
    pub(crate) fn drained(self, core: &crate::core::Core, side: &AppSide) -> Self {
        // A stream's body is read as it goes: none of it is left to keep.
        let failure = match self {
            Fail::Answer(e) => Failure::Answer(e, crate::proxy::retry::Left::Partial),
            Fail::Abort(s) => Failure::Abort(s),
            Fail::Cut(c) => Failure::Cut(c),
        };
        failure.drained(core, side).into()
    }
}

/// A completed exchange.
pub struct Done {
    /// The app's status.
    pub status: u16,
    /// Request body bytes.
    pub bytes_in: u64,
    /// Response body bytes.
    pub bytes_out: u64,
    /// The app's address.
    pub upstream: SocketAddr,
}

/// What a stream's handling knows about its request.
pub struct Req<'a> {
    /// The HTTP/1.1 rendering of the stream's head.
    pub buf: &'a [u8],
    /// Its parse.
    pub head: &'a RequestHead,
    /// `:authority` (or `host`), for the HTTP/2 request to the app.
    pub authority: Option<&'a str>,
    /// Path and query.
    pub path: &'a str,
    /// The client asked for trailers (`te: trailers`).
    pub te_trailers: bool,
    /// Told the app tried and the body bytes it took, for the access line however
    /// the exchange ends.
    pub side: &'a AppSide,
    /// The client: the connection's peer, or the address a trusted proxy's
    /// `X-Forwarded-For` named once the stream's admission read it.
    pub client: &'a std::cell::Cell<std::net::IpAddr>,
    /// Told of the bytes it moves, for its place in the core's budget of streams
    /// to apps ([`super::budget`]), which may be taken to make room.
    pub activity: &'a Rc<super::budget::Activity>,
}

impl Req<'_> {
    /// The connection's hop for this stream's client, to `route`'s app.
    pub fn hop(&self, mut hop: ClientHop, route: &Route) -> ClientHop {
        hop.admitted(self.client.get(), route.is_rstudio());
        hop
    }
}

/// Writes the stream's head as an HTTP/1.1 head into `out`.
fn render_head(parts: &http::request::Parts, end_stream: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(if path.is_empty() {
        b"/"
    } else {
        path.as_bytes()
    });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let authority = parts.uri.authority().map(|a| a.as_str());
    if let Some(a) = authority {
        push(out, b"host", a.as_bytes());
    }
    let mut cookies: Vec<&[u8]> = Vec::new();
    let mut has_length = false;
    for (name, value) in &parts.headers {
        if name == http::header::HOST && authority.is_some() {
            continue;
        }
        if name == http::header::COOKIE {
            cookies.push(value.as_bytes());
            continue;
        }
        has_length |= name == http::header::CONTENT_LENGTH;
        push(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !cookies.is_empty() {
        // RFC 9113 §8.2.3: split cookie fields are joined for HTTP/1.1.
        out.extend_from_slice(b"cookie: ");
        for (i, c) in cookies.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b"; ");
            }
            out.extend_from_slice(c);
        }
        out.extend_from_slice(b"\r\n");
    }
    if !has_length && !end_stream {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn push(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Handles one accepted stream to its end.
pub async fn handle(
    ctx: Rc<ConnCtx>,
    guard: StreamGuard,
    req: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let _guard = guard;
    let core = ctx.core.clone();
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let grpc = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // What the access line keeps of it (the request goes on with the whole method).
    let method = parts.method.as_str().as_bytes();
    let method = method[..method.len().min(crate::core::access_log::METHOD_MAX)].to_vec();
    let path: Vec<u8> = parts
        .uri
        .path_and_query()
        .map_or(&b"/"[..], |p| p.as_str().as_bytes())
        .iter()
        .take(crate::core::access_log::PATH_MAX)
        .copied()
        .collect();
    // `:path` must be origin-form (`*` only for OPTIONS): `h2` takes any bytes, and
    // an absolute-form or bare target would reach the app as something else than
    // what routed (RFC 9113 §8.3.1). CONNECT has no `:path` and is not served.
    // `:scheme` is the target URI's scheme (RFC 9113 §8.3.1): the worker serves
    // `http` and `https` ones, and another (`javascript`, `ftp`) is malformed here,
    // as in an HTTP/1.1 absolute-form target.
    // Without `:authority` the `h2` crate checks `:scheme` and leaves it out of the
    // URI (a URI cannot hold a scheme without an authority): the request names its
    // host in `host`, which RFC 9113 §8.3.1 allows, and is taken as an origin-form
    // HTTP/1.1 request is.
    let target_ok = parts.uri.path_and_query().is_some_and(|p| {
        p.as_str().starts_with('/') || (p.as_str() == "*" && parts.method == http::Method::OPTIONS)
    }) && parts
        .uri
        .scheme_str()
        .map_or(parts.uri.authority().is_none(), |s| {
            s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https")
        });
    // Refused before its head is rendered and parsed: under the client's request
    // ID and in its trace all the same (its fields are parsed already: one valid
    // `traceparent`, as for a parsed head), logged as HTTP/1.1's are.
    let refused_early = |e: RequestError| {
        let id = proxy::exchange::request_id(
            &core,
            parts
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
        );
        ctx.note_id(id);
        let mut lines = parts
            .headers
            .get_all(appproxy_shared::trace::TRACEPARENT)
            .iter();
        let incoming = match (lines.next(), lines.next()) {
            (Some(v), None) => appproxy_shared::trace::TraceParent::parse(v.as_bytes()).ok(),
            _ => None,
        };
        let span = core
            .rt
            .trace_context
            .then(|| appproxy_shared::trace::SpanContext::start(incoming.as_ref(), Some(&id)));
        let err = ProxyError::Request(e);
        appproxy_shared::with_request_context(Some(id), span, || {
            tracing::info!(error = %err, "HTTP/2 request refused");
        });
        (id, span, err)
    };
    let early = match target_ok {
        false => Some(RequestError::Malformed("request target")),
        true => None,
    };
    let mut buf = Vec::with_capacity(512);
    let parsed = match early {
        Some(e) => Err(e),
        None => {
            render_head(&parts, body.is_end_stream(), &mut buf);
            match parse::parse_request(&buf, &core.rt.head_limits) {
                Ok(Some(h)) => Ok(h),
                Ok(None) => Err(RequestError::Malformed("request head incomplete")),
                Err(e) => Err(e),
            }
        }
    };
    let head = match parsed {
        Ok(h) => h,
        Err(e) => {
            let (id, span, err) = refused_early(e);
            let line = Line::new(&method, &path, started, ctx.hop.peer.ip());
            let refusal = err.into();
            let refused = refuse(&ctx, &mut respond, grpc, &refusal, &id, None, &line);
            appproxy_shared::scope_traced(Some(id), span, refused).await;
            return;
        }
    };
    let (id, trace) = proxy::exchange::identify(&core, &buf, &head);
    ctx.note_id(id);
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let te_trailers = parts
        .headers
        .get(http::header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    let path_str = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let line = Line::new(&method, &path, started, ctx.hop.peer.ip());
    let activity = super::budget::Activity::new(core.reactor.now());
    let request = Req {
        buf: &buf,
        head: &head,
        authority: authority.as_deref(),
        path: path_str,
        te_trailers,
        side: &line.side,
        client: &line.client,
        activity: &activity,
    };
    scope_traced(
        Some(id),
        trace.map(|t| t.span),
        serve_stream(&ctx, &request, body, &mut respond, id, trace, grpc, &line),
    )
    .await;
}

/// Method and path for the access line, and what it says of the app side when the
/// app's answer does not reach the client.
struct Line<'a> {
    method: &'a [u8],
    path: &'a [u8],
    started: Instant,
    side: AppSide,
    /// The client's address for the access line: the connection's peer, then the
    /// one the circuit's allowlist saw once it is read.
    client: std::cell::Cell<std::net::IpAddr>,
}

impl<'a> Line<'a> {
    fn new(method: &'a [u8], path: &'a [u8], started: Instant, peer: std::net::IpAddr) -> Self {
        Self {
            method,
            path,
            started,
            side: AppSide::default(),
            client: std::cell::Cell::new(peer),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_stream(
    ctx: &Rc<ConnCtx>,
    req: &Req<'_>,
    body: RecvStream,
    respond: &mut SendResponse<Bytes>,
    id: RequestId,
    trace: Option<crate::trace::Hop>,
    grpc: bool,
    line: &Line<'_>,
) {
    let core = &ctx.core;
    if let Some(t) = &trace {
        t.log_rejection();
    }
    let head = req.head;
    // The client's request rate (429) first, a request for no circuit included;
    // then the circuit, the allowlist and credentials.
    let client_ip = proxy::client_ip_of(&ctx.hop, &core.rt.trusted_proxies, req.buf, head);
    if let Ok(ip) = client_ip {
        line.client.set(ip);
        if let Err(limited) = core.take_request(&ctx.hop, ip) {
            refuse(
                ctx,
                respond,
                grpc,
                &Refusal::from(&limited),
                &id,
                None,
                line,
            )
            .await;
            return;
        }
    }
    let host = head.host.clone().map(|h| &req.buf[h]);
    let Some(route) = core.route_for(ctx.hop.local_port, host) else {
        let err = ProxyError::UnknownCircuit;
        tracing::info!(error = %err, port = ctx.hop.local_port, "request refused");
        refuse(ctx, respond, grpc, &err.into(), &id, None, line).await;
        return;
    };
    let circuit = &route.circuit.circuit;
    let grpc = grpc || circuit.protocol == ProxyProtocol::Grpc;
    let refusal = match client_ip {
        Err(()) => Some(Refusal::from(ProxyError::Request(RequestError::Malformed(
            proxy::UNREAD_FORWARDED_FOR,
        )))),
        Ok(ip) if !route.circuit.admits(ip) => {
            tracing::info!(peer = %ip, "client address not in the circuit's allowlist");
            Some(Refusal::from(crate::auth::Refused {
                status: 403,
                code: "forbidden",
                message: "client address not allowed",
            }))
        }
        Ok(_) => match proxy::admit(core, &ctx.hop, req.buf, head, &route) {
            Ok(proxy::Admit::Forward) => None,
            Ok(proxy::Admit::Preflight(fields)) => {
                answer_preflight(ctx, respond, &fields, &id, circuit, line);
                return;
            }
            Err(r) => Some(Refusal::from(r)),
        },
    };
    if let Some(r) = refusal {
        refuse(ctx, respond, grpc, &r, &id, Some(circuit), line).await;
        return;
    }
    core.mark_access(circuit.id);
    let early = if head.method == Method::Connect {
        Some(ProxyError::Request(RequestError::Malformed(
            "CONNECT is not supported",
        )))
    } else {
        match head.framing {
            BodyFraming::Length(n) if core.rt.max_body > 0 && n > core.rt.max_body => {
                Some(ProxyError::Request(RequestError::BodyTooLarge))
            }
            _ => None,
        }
    };
    if let Some(err) = early {
        refuse(ctx, respond, grpc, &err.into(), &id, Some(circuit), line).await;
        return;
    }
    // `expect: 100-continue` (never forwarded): the request passed every check, so
    // the client may send its body, as the HTTP/1.1 path answers it.
    if head.expect_continue && head.framing != BodyFraming::Length(0) {
        let mut go_on = http::Response::new(());
        *go_on.status_mut() = http::StatusCode::CONTINUE;
        name_request(core, &id, go_on.headers_mut());
        // A stream the client already reset fails on its first DATA instead.
        let _ = respond.send_informational(go_on);
    }
    let h2_app = matches!(circuit.protocol, ProxyProtocol::Http2 | ProxyProtocol::Grpc);
    ctx.note_work();
    // A stream is watched while it lives (a gRPC call or a stream of events may
    // run for hours): a deployment that no longer admits it resets it, and the
    // connection's other streams go on.
    let watched = client_ip.ok().map(|ip| core.stream_open(&route, ip, None));
    let revoked = async {
        Signal::fired_if(watched.as_ref().map(|(_, s)| &**s)).await;
        Err(Fail::Abort(
            "a deployment no longer admits the stream".into(),
        ))
    };
    let made_room = made_room(core, req.activity, req.side);
    let exchange = async {
        if h2_app {
            super::upstream::forward(ctx, &route, req, body, respond, id, trace).await
        } else {
            forward_h1(ctx, &route, req, body, respond, id, trace).await
        }
    };
    let outcome = futures_lite::future::or(exchange, futures_lite::future::or(revoked, made_room))
        .await
        .map_err(|failure| failure.drained(core, &line.side));
    match outcome {
        Ok(done) => {
            core.metrics.status(done.status);
            core.record(&AccessEntry {
                request_id: &id,
                circuit: Some(circuit),
                client: Some(line.client.get()),
                method: line.method,
                path: line.path,
                status: done.status,
                bytes_in: done.bytes_in,
                bytes_out: done.bytes_out,
                upstream: Some(done.upstream),
                started: line.started,
            });
        }
        Err(Fail::Answer(err)) => {
            tracing::warn!(error = %err, "request failed");
            refuse(ctx, respond, grpc, &err.into(), &id, Some(circuit), line).await;
        }
        Err(Fail::Abort(reason)) => {
            tracing::info!(reason = %reason, "stream aborted");
            respond.send_reset(h2::Reason::INTERNAL_ERROR);
            core.metrics.add(counter::PROXY_ERRORS, 1);
            core.record(&AccessEntry {
                request_id: &id,
                circuit: Some(circuit),
                client: Some(line.client.get()),
                method: line.method,
                path: line.path,
                status: 0,
                bytes_in: line.side.body_in.get(),
                bytes_out: 0,
                upstream: line.side.addr.get(),
                started: line.started,
            });
        }
        Err(Fail::Cut(cut)) => {
            tracing::info!(reason = %cut.reason, status = cut.status, "response cut");
            respond.send_reset(h2::Reason::INTERNAL_ERROR);
            core.metrics.add(counter::PROXY_ERRORS, 1);
            core.metrics.status(cut.status);
            core.record(&AccessEntry {
                request_id: &id,
                circuit: Some(circuit),
                client: Some(line.client.get()),
                method: line.method,
                path: line.path,
                status: cut.status,
                bytes_in: cut.bytes.0,
                bytes_out: cut.bytes.1,
                upstream: Some(cut.upstream),
                started: line.started,
            });
        }
    }
}

/// Why a stream ended to make room for another address's ([`super::budget`]).
const MADE_ROOM: &str = "ended to make room for another address's stream";

/// Resolves once the place in the core's budget of the stream (or bridged
/// exchange) whose `activity` and app `side` these are was taken for another
/// address's stream: how it ends. Before the app was given it (while its body's
/// first bytes are awaited, or its app connected to), answered 503
/// `app_stream_limit` (safe to send again, as for a stream refused a place); once
/// its answer began, cut as an answer cut short is (its status and bytes on its
/// access line); in between, aborted (the app may have it: no answer says to send
/// it again).
pub(crate) async fn made_room<T>(
    core: &crate::core::Core,
    activity: &super::budget::Activity,
    side: &AppSide,
) -> Result<T, Fail> {
    activity.ended().await;
    tracing::info!("a stream ended to make room for another address's");
    core.metrics.add(counter::H2_APP_STREAM_LIMIT, 1);
    Err(
        match (activity.was_given(), side.addr.get(), activity.status()) {
            (false, _, _) => Fail::Answer(ProxyError::AppStreamLimit),
            (true, Some(upstream), Some(status)) => Fail::Cut(retry::Cut {
                reason: MADE_ROOM.into(),
                status,
                bytes: (side.body_in.get(), activity.bytes_sent()),
                upstream,
            }),
            (true, _, _) => Fail::Abort(MADE_ROOM.into()),
        },
    )
}

/// The gRPC status for one of the proxy's HTTP answers (the gRPC project's
/// HTTP-to-gRPC mapping).
fn grpc_status(status: u16) -> u8 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec).
fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The request-ID header.
fn id_header(id: &RequestId) -> Option<HeaderValue> {
    HeaderValue::from_bytes(id.as_bytes()).ok()
}

/// Names the request's ID in an answer's `headers` (final or interim), unless IDs are
/// off ([`proxy::forwarded_id`]).
pub(super) fn name_request(
    core: &crate::core::Core,
    id: &RequestId,
    headers: &mut http::HeaderMap,
) {
    if let Some(v) = proxy::forwarded_id(core, id).and_then(id_header) {
        headers.insert(HeaderName::from_static("x-backend-request-id"), v);
    }
}

/// Sends one of the proxy's own answers (the HTTP/1.1 path's [`Refusal`] and JSON
/// body, or a trailers-only gRPC status), counted like every refusal, and logs the
/// stream.
async fn refuse(
    ctx: &ConnCtx,
    respond: &mut SendResponse<Bytes>,
    grpc: bool,
    r: &Refusal,
    id: &RequestId,
    circuit: Option<&appproxy_shared::model::Circuit>,
    line: &Line<'_>,
) {
    let core = &ctx.core;
    let mut resp = http::Response::new(());
    if !grpc {
        *resp.status_mut() =
            http::StatusCode::from_u16(r.status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    }
    let headers = resp.headers_mut();
    if let Some(v) = id_header(id) {
        headers.insert(HeaderName::from_static("x-backend-request-id"), v);
    }
    let mut bytes_out = 0;
    if grpc {
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        let status = grpc_status(r.status);
        headers.insert(
            HeaderName::from_static("grpc-status"),
            HeaderValue::from(u16::from(status)),
        );
        let msg = format!("{} ({}; request {id})", r.message, r.code);
        if let Ok(v) = HeaderValue::from_str(&grpc_message(&msg)) {
            headers.insert(HeaderName::from_static("grpc-message"), v);
        }
        let _ = respond.send_response(resp, true);
    } else {
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = r.retry_after {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        let mut body = String::with_capacity(128);
        encode::error_body(&mut body, r.code, &r.message, id);
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        if line.method == b"HEAD" {
            // No content to a `HEAD` (RFC 9110 §9.3.2): the head ends the stream,
            // its `content-length` naming what a `GET` would have had.
            let _ = respond.send_response(resp, true);
        } else if let Ok(mut send) = respond.send_response(resp, false) {
            bytes_out = body.len() as u64;
            // The answer is small: it fits the initial window.
            let _ = send.send_data(Bytes::from(body), true);
        }
    }
    core.count_refusal(r);
    core.record(&AccessEntry {
        request_id: id,
        circuit,
        client: Some(line.client.get()),
        method: line.method,
        path: line.path,
        status: r.status,
        bytes_in: line.side.body_in.get(),
        bytes_out,
        upstream: line.side.addr.get(),
        started: line.started,
    });
}

/// Answers a CORS preflight to a private circuit itself: 204 with `fields`
/// ([`crate::auth::answer_preflight`]) and the request ID, the stream ended.
fn answer_preflight(
    ctx: &ConnCtx,
    respond: &mut SendResponse<Bytes>,
    fields: &[crate::auth::PreflightField],
    id: &RequestId,
    circuit: &appproxy_shared::model::Circuit,
    line: &Line<'_>,
) {
    let mut resp = http::Response::new(());
    *resp.status_mut() = http::StatusCode::NO_CONTENT;
    let headers = resp.headers_mut();
    for (name, value) in fields {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            headers.insert(n, v);
        }
    }
    if let Some(v) = id_header(id) {
        headers.insert(HeaderName::from_static("x-backend-request-id"), v);
    }
    let _ = respond.send_response(resp, true);
    ctx.core.metrics.status(204);
    ctx.core.record(&AccessEntry {
        request_id: id,
        circuit: Some(circuit),
        client: Some(line.client.get()),
        method: line.method,
        path: line.path,
        status: 204,
        bytes_in: 0,
        bytes_out: 0,
        upstream: None,
        started: line.started,
    });
}

/// Picks the route's upstream, or says why there is none.
pub fn pick(
    core: &crate::core::Core,
    route: &Route,
    exclude: Option<SocketAddr>,
) -> Result<SocketAddr, Fail> {
    route
        .pick(core.draw(), core.reactor.now(), exclude)
        .ok_or_else(|| {
            let checked_out =
                route.circuit.circuit.route_info.iter().any(|r| {
                    r.health_status == Some(appproxy_shared::model::RouteHealth::Unhealthy)
                });
            Fail::Answer(if checked_out {
                ProxyError::NoHealthyRoute
            } else {
                ProxyError::NoRoute
            })
        })
}

/// Why [`send_all`] stopped short.
#[derive(Debug)]
pub enum SendEnd {
    /// The receiver took nothing within the body idle timeout.
    Idle,
    /// The stream takes no more: its receiver reset it (or the connection ended).
    Closed(String),
}

impl std::fmt::Display for SendEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Idle => f.write_str("the receiver took nothing within the idle timeout"),
            Self::Closed(why) => f.write_str(why),
        }
    }
}

/// Sends `data` on `send` as the peer's flow control allows, waiting at most the
/// body idle timeout for each grant of capacity.
pub async fn send_all(
    core: &crate::core::Core,
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
) -> Result<(), SendEnd> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let cap = within(
            &core.reactor,
            core.rt.body_idle_timeout,
            std::future::poll_fn(|cx| send.poll_capacity(cx)),
        )
        .await;
        let cap = match cap {
            None => return Err(SendEnd::Idle),
            // No capacity for a stream that is no longer open for sending: reset.
            Some(None) => return Err(SendEnd::Closed("stream closed".into())),
            Some(Some(Err(e))) => return Err(SendEnd::Closed(e.to_string())),
            Some(Some(Ok(n))) => n,
        };
        if cap == 0 {
            continue;
        }
        let part = data.split_to(cap.min(data.len()));
        send.send_data(part, false)
            .map_err(|e| SendEnd::Closed(e.to_string()))?;
    }
    Ok(())
}

/// Whether `name` must not be sent in an HTTP/2 message nor passed on from one:
/// the hop-by-hop fields of the HTTP/1.1 path ([`encode::is_hop_by_hop_name`], one
/// rule for every path), which hold HTTP/2's connection-specific ones (RFC 9113
/// §8.2.2) and also `Proxy-Authenticate`, `Proxy-Authorization` and
/// `HTTP2-Settings`. Fields named in an HTTP/1.1 `Connection` are the caller's.
#[inline]
pub fn is_connection_specific(name: &[u8]) -> bool {
    encode::is_hop_by_hop_name(name)
}

/// `value` without the whitespace around it: an HTTP/2 field value that begins or
/// ends with a space or tab is malformed (RFC 9113 §8.2.1; an HTTP/2 client refuses
/// the whole response), and the HTTP/1.1 path's parser trims it as optional
/// whitespace.
fn trimmed(value: &HeaderValue) -> HeaderValue {
    let bytes = value.as_bytes();
    let t = bytes.trim_ascii();
    if t.len() == bytes.len() {
        return value.clone();
    }
    // A part of a valid value is one.
    HeaderValue::from_bytes(t).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// An HTTP/2 app's response head (final or interim) sanitized as an HTTP/1.1 app's
/// is ([`encode::client_response`]): its hop-by-hop fields ([`is_connection_specific`])
/// and withheld ones ([`encode::is_withheld_response_field`]) left out, each value
/// [`trimmed`]. Request IDs and cookies are [`drop_request_ids`]' and
/// [`filter_cookies`]'.
pub fn sanitize_app_fields(headers: &mut HeaderMap) {
    let drop = |n: &HeaderName| {
        let n = n.as_str().as_bytes();
        is_connection_specific(n) || encode::is_withheld_response_field(n)
    };
    let padded = |v: &HeaderValue| {
        let b = v.as_bytes();
        b.trim_ascii().len() != b.len()
    };
    if !headers.iter().any(|(n, v)| drop(n) || padded(v)) {
        return;
    }
    let mut kept = HeaderMap::with_capacity(headers.len());
    for (n, v) in headers.iter() {
        if !drop(n) {
            kept.append(n.clone(), trimmed(v));
        }
    }
    *headers = kept;
}

/// An HTTP/2 app's head (final or interim) as an HTTP/2 client gets it:
/// [`sanitize_app_fields`], then the request IDs and cookies as
/// [`drop_request_ids`] and [`filter_cookies`] leave them (the bridge writes an
/// HTTP/1.1 client's lines with its own `app_fields` instead).
pub fn sanitize_app_head(headers: &mut HeaderMap) {
    sanitize_app_fields(headers);
    drop_request_ids(headers);
    filter_cookies(headers);
}

/// Leaves the request-ID fields out of an app's response head
/// ([`crate::http::encode::is_request_id_field`]): the worker's ID is the one echoed.
fn drop_request_ids(headers: &mut HeaderMap) {
    for name in appproxy_shared::header::INPUT_HEADERS {
        headers.remove(name);
    }
}

/// An app's response head's `Set-Cookie` fields as they reach the client: every one
/// that sets the worker's permit cookie ([`sets_permit_cookie`]) left out, the others
/// host-only ([`host_only_cookie`]), in order; the other fields stay as they were.
fn filter_cookies(headers: &mut HeaderMap) {
    let set_cookie = http::header::SET_COOKIE;
    if !headers
        .get_all(&set_cookie)
        .iter()
        .any(|v| sets_permit_cookie(v.as_bytes()) || encode::has_domain_attribute(v.as_bytes()))
    {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(&set_cookie)
        .iter()
        .filter(|v| !sets_permit_cookie(v.as_bytes()))
        .filter_map(|v| match host_only_cookie(v.as_bytes()) {
            None => Some(v.clone()),
            // Fails closed: a rewrite that were no field value is left out.
            Some(r) => HeaderValue::from_bytes(&r).ok(),
        })
        .collect();
    headers.remove(&set_cookie);
    for v in kept {
        headers.append(set_cookie.clone(), v);
    }
}

/// Trailers as the HTTP/1.1 path treats them (`chunked::trailer_verdict`): fields
/// that describe the message are left out; one that must never be a trailer
/// (framing, routing, authentication, forwarding) makes a request's `None`
/// (refused) and is left out of a response's.
pub fn filter_trailers(trailers: &HeaderMap, request: bool) -> Option<HeaderMap> {
    let mut kept = HeaderMap::new();
    for (name, value) in trailers {
        match trailer_verdict(name.as_str().as_bytes()) {
            TrailerVerdict::Keep => kept.append(name.clone(), trimmed(value)),
            TrailerVerdict::Forbidden if request => return None,
            TrailerVerdict::Drop | TrailerVerdict::Forbidden => continue,
        };
    }
    Some(kept)
}

/// Forwards a stream to an HTTP/1.1 app over the core's pool and relays the answer.
async fn forward_h1(
    ctx: &Rc<ConnCtx>,
    route: &Route,
    req: &Req<'_>,
    mut body: RecvStream,
    respond: &mut SendResponse<Bytes>,
    id: RequestId,
    trace: Option<crate::trace::Hop>,
) -> Result<Done, Fail> {
    let core = &ctx.core;
    let rt = &core.rt;
    let head = req.head;
    let side = req.side;
    let has_body = head.framing != BodyFraming::Length(0);
    // Each stream takes a place in the core's budget of streams to apps, fairly
    // shared by client address, before it waits for anything: else one client
    // connection's streams, each sending a byte of body, could hold
    // `max_concurrent_streams` app connections, and a few a route's whole cap; and
    // streams that announce a body and never send it, each holding its parsed head
    // (tens of KiB with HPACK's help, for a few bytes on the wire), could take
    // gigabytes across a client's connections.
    let _slot = super::upstream::AppStreamSlot::take(core, req.client.get(), req.activity)?;
    // As on the HTTP/1.1 path (`await_body`): an app connection is taken or opened
    // only once the body's first bytes are in (or it ended empty). A stream that
    // announces a body and sends none holds its own stream and its place, under the
    // body timers, and no app connection; it moves no bytes, so it is among the
    // first of its address's to go when another address needs its place.
    let mut floor = BodyFloor::new(core);
    let first = if has_body {
        first_body_bytes(ctx, &mut body, &mut floor, req.activity).await?
    } else {
        None
    };
    let mut addr = pick(core, route, None)?;
    let (mut upstream, reused) = match core.pool.take(
        addr,
        proxy::kind_of(route, addr),
        core.reactor.now(),
        ctx.conn_id,
    ) {
        Some(c) => {
            side.tried(addr);
            core.metrics.add(counter::POOL_HIT, 1);
            (c, true)
        }
        None => {
            core.metrics.add(counter::POOL_MISS, 1);
            // A client that resets its stream meanwhile ends the connect: its
            // access line says so (status 0), not the app's 502 or 504 when the
            // connect fails later, and the app's health is left as it was.
            let connect = proxy::connect_route(core, route, addr, side);
            let (c, used) = unless_reset(ctx, respond, connect, CONNECTING).await??;
            addr = used;
            (c, false)
        }
    };
    let mut out = Vec::with_capacity(1024);
    let traceparent = trace.map(|t| t.span.traceparent());
    encode::upstream_request_traced(
        &mut out,
        req.buf,
        head,
        proxy::forwarded_id(core, &id),
        trace.zip(traceparent.as_ref()).map(|(t, h)| TraceHeaders {
            traceparent: h.as_bytes(),
            keep_tracestate: t.keep_tracestate,
        }),
        &req.hop(ctx.hop, route),
        addr,
    );
    // From the core's pool of read buffers (shared with HTTP/1.1 connections), back
    // to it when the stream ends, whichever way.
    let mut ubuf = core.read_bufs.take();
    let mut bytes_in = 0u64;
    // The retry rule is the HTTP/1.1 exchange's ([`retry::may_retry`]): the head is
    // kept in `out` until the response head arrived, so a bodiless idempotent request
    // on a dead pooled connection is sent again, once, on a fresh one.
    let mut attempt = Attempt::first(head.method, has_body, reused);
    // Set when the app closed before it took the whole body: its answer, if it gave
    // one first, is relayed; otherwise this is the stream's 502.
    let mut body_cut: Option<std::io::Error> = None;
    let resp = loop {
        upstream.set_timeout(rt.body_idle_timeout);
        // From its first byte on, the app may have the request.
        req.activity.given();
        let wrote = upstream.write_all(&out).await;
        if let Err(e) = wrote {
            let err = ProxyError::UpstreamClosed(e);
            if retry::may_retry(err.fault(), Retry::IfReused, attempt) {
                attempt = attempt.again();
                let again = connect_again(core, route, addr);
                upstream = unless_reset(ctx, respond, again, CONNECTING).await??;
                continue;
            }
            return Err(Fail::Answer(err));
        }
        if has_body {
            match send_body_h1(
                ctx,
                &upstream,
                &mut body,
                head.framing,
                &mut floor,
                first.clone(),
                side,
                req.activity,
            )
            .await
            {
                Ok(BodySent::Whole(n)) => bytes_in = n,
                // The app began an answer that ends the request while it was given
                // the body (it stopped reading, or the client's next bytes were
                // awaited): the answer is read and relayed at once, the connection
                // to the app not reused, and the h2 crate resets the client's
                // stream with NO_ERROR after it (the client stops sending). The
                // body ends here for the app too: one that answered early but reads
                // on (full duplex) sees its end rather than waiting for bytes that
                // never come while the worker waits for its answer.
                Ok(BodySent::Answered(n)) => {
                    bytes_in = n;
                    upstream.shutdown_write();
                    body_cut = Some(std::io::Error::other(
                        "the app answered before taking the whole request body",
                    ));
                }
                // An app that refuses a body (413, 401 …) may answer before it has
                // read it all, then close (as on the HTTP/1.1 path).
                Err(Fail::Answer(ProxyError::UpstreamClosed(e)))
                    if e.kind() != std::io::ErrorKind::TimedOut =>
                {
                    body_cut = Some(e);
                }
                // The app stopped taking the body for `body_idle_secs`: an answer
                // already there (a success sent early) is relayed, else 504 (as on
                // the HTTP/1.1 path).
                Err(Fail::Answer(ProxyError::UpstreamClosed(e)))
                    if upstream.answer_may_wait(!ubuf.is_empty()) =>
                {
                    body_cut = Some(e);
                }
                Err(Fail::Answer(ProxyError::UpstreamClosed(_))) => {
                    return Err(Fail::Answer(ProxyError::UpstreamTimeout));
                }
                Err(f) => return Err(f),
            }
        }
        let sent = Instant::now();
        let outcome = head_unless_reset(ctx, &upstream, &mut ubuf, head.method, respond).await?;
        if let Ok(r) = &outcome {
            core.metrics.upstream_head.observe(sent.elapsed());
            if r.status >= 100 {
                proxy::note_health(core, route, addr, true);
            }
        }
        if let Some(e) = body_cut.take() {
            match outcome {
                // Interim heads before it are relayed as such below, then the answer.
                Ok(r) if r.status >= 100 && r.status != 101 => {
                    tracing::info!(
                        upstream = %addr,
                        status = r.status,
                        "the app answered before taking the whole request body"
                    );
                    body_cut = Some(e);
                    break r;
                }
                _ => return Err(Fail::Answer(ProxyError::UpstreamClosed(e))),
            }
        }
        match outcome {
            Ok(r) => break r,
            Err(f) => {
                let retry = f.retry();
                let err = f.into_error();
                let started = Attempt {
                    response_started: !ubuf.is_empty(),
                    ..attempt
                };
                if retry::may_retry(err.fault(), retry, started) {
                    attempt = attempt.again();
                    let again = connect_again(core, route, addr);
                    upstream = unless_reset(ctx, respond, again, CONNECTING).await??;
                    continue;
                }
                proxy::note_health(core, route, addr, false);
                return Err(Fail::Answer(err));
            }
        }
    };
    let mut resp = resp;
    let mut interim = 0;
    while (100..200).contains(&resp.status) {
        interim += 1;
        if resp.status == 101 {
            return Err(Fail::Answer(ProxyError::UpstreamResponse(
                ResponseError::Malformed(
                    "a 101 (Switching Protocols) is not relayable over HTTP/2",
                ),
            )));
        }
        if interim > proxy::MAX_INTERIM {
            // Said as the HTTP/1.1 path says it: HTTP/2 carries interim heads, a
            // flood of them is what is refused.
            tracing::warn!(
                upstream = %addr,
                limit = proxy::MAX_INTERIM,
                "too many interim responses; closing"
            );
            return Err(Fail::Answer(ProxyError::UpstreamResponse(
                ResponseError::Malformed("too many interim responses"),
            )));
        }
        // Relayed as an informational HEADERS frame (103 Early Hints, 100 …), its
        // fields sanitized like the final head's.
        if let Ok(code) = http::StatusCode::from_u16(resp.status) {
            let mut info = http::Response::new(());
            *info.status_mut() = code;
            copy_fields(ubuf.filled(), &resp, true, info.headers_mut());
            name_request(core, &id, info.headers_mut());
            respond
                .send_informational(info)
                .map_err(|e| Fail::Abort(format!("client stream: {e}")))?;
        }
        ubuf.consume(resp.head_len);
        // The wait for the next head ends at the client's reset as the first's does
        // (the app's connection was held until `upstream_head_secs`, restarted by
        // each interim head).
        resp = head_unless_reset(ctx, &upstream, &mut ubuf, head.method, respond)
            .await?
            .map_err(|f| Fail::Answer(f.into_error()))?;
    }
    let rbuf = ubuf.filled();
    let lease = Lease {
        owner: ctx.conn_id,
        bodiless: head.method == Method::Head || resp.status == 204 || resp.status == 304,
    };
    let bodiless = lease.bodiless || resp.framing == BodyFraming::Length(0);
    let mut response = http::Response::new(());
    *response.status_mut() = http::StatusCode::from_u16(resp.status).map_err(|_| {
        Fail::Answer(ProxyError::UpstreamResponse(ResponseError::Malformed(
            "status code",
        )))
    })?;
    let headers = response.headers_mut();
    copy_fields(rbuf, &resp, bodiless, headers);
    name_request(core, &id, headers);
    let status = resp.status;
    let framing = resp.framing;
    let keep_alive = resp.keep_alive;
    ubuf.consume(resp.head_len);
    let mut send = respond
        .send_response(response, bodiless)
        .map_err(|e| Fail::Abort(format!("client stream: {e}")))?;
    req.activity.responded(status);
    let mut bytes_out = 0;
    if !bodiless {
        let relayed = relay_h1_response(
            ctx,
            &upstream,
            &mut ubuf,
            framing,
            &mut send,
            &mut bytes_out,
            req.activity,
        )
        .await;
        if let Err(e) = relayed {
            send.send_reset(h2::Reason::INTERNAL_ERROR);
            return Err(Fail::Cut(retry::Cut {
                reason: format!("response body: {e}"),
                status,
                bytes: (bytes_in, bytes_out),
                upstream: addr,
            }));
        }
    }
    // After an early answer the app connection, closed by the app, is not kept (and
    // the h2 crate, the response sent, resets the stream with NO_ERROR: the client
    // stops sending the rest, RFC 9113 §8.1).
    if body_cut.is_none() && keep_alive && ubuf.is_empty() && framing != BodyFraming::Eof {
        core.pool.put(
            addr,
            proxy::kind_of(route, addr),
            upstream,
            core.reactor.now(),
            lease,
        );
    }
    Ok(Done {
        status,
        bytes_in,
        bytes_out,
        upstream: addr,
    })
}

/// The HTTP/1.1 app's next response head (final or interim), unless the client
/// resets its stream first: that ends the exchange at once, and the app's
/// connection with it (never pooled half read), rather than at
/// `upstream_head_secs`.
async fn head_unless_reset(
    ctx: &ConnCtx,
    upstream: &TcpConn,
    ubuf: &mut ReadBuf,
    method: Method,
    respond: &mut SendResponse<Bytes>,
) -> Result<Result<parse::ResponseHead, proxy::upstream::HeadFailure>, Fail> {
    let mut fields = Vec::new();
    let read = proxy::read_response_head(&ctx.core, upstream, ubuf, &mut fields, method, None);
    unless_reset(ctx, respond, read, ANSWERING).await
}

/// When a stream was reset, for [`unless_reset`]: while its app's connection was
/// dialed or handshaken.
pub(super) const CONNECTING: &str = "while its app was connected to";

/// When a stream was reset, for [`unless_reset`]: while its app had its request.
pub(super) const ANSWERING: &str = "while its app was answering";

/// `work`'s outcome, unless the client resets its stream first: that ends the
/// wait at once, `work` dropped, with `Fail::Abort` saying the stream was reset
/// `when`.
pub(super) async fn unless_reset<F: std::future::Future>(
    ctx: &ConnCtx,
    respond: &mut SendResponse<Bytes>,
    work: F,
    when: &str,
) -> Result<F::Output, Fail> {
    let work = std::pin::pin!(work);
    let reset = std::future::poll_fn(|cx| respond.poll_reset(cx));
    match relay::or_watch(work, || {}, reset).await {
        Ok(outcome) => Ok(outcome),
        Err(_) => Err(client_reset(ctx, when)),
    }
}

/// The client reset its stream `when`: noted for the rapid-reset rule, and the
/// stream aborted with that reason.
pub(super) fn client_reset(ctx: &ConnCtx, when: &str) -> Fail {
    ctx.note_client_reset();
    Fail::Abort(format!("client reset the stream {when}"))
}

/// The fields of an HTTP/1.1 app's response head `resp` (in `rbuf`) as HTTP/2 fields:
/// without hop-by-hop ([`is_connection_specific`]), `Connection`-listed and withheld
/// ([`encode::is_withheld_response_field`]) ones and the app's request ID (the
/// worker sets its own). `content-length` is the worker's, one canonical value: the
/// body's length, or on a bodiless response (HEAD, 304) the representation's when the
/// app gave one valid length; never on an interim head or a 204 (an HTTP/2 client
/// refuses a stream whose `content-length` is repeated, not a number, or not 0 on a
/// 204).
fn copy_fields(rbuf: &[u8], resp: &parse::ResponseHead, bodiless: bool, headers: &mut HeaderMap) {
    for f in &resp.headers {
        let name = &rbuf[f.name.clone()];
        let listed = resp
            .connection_tokens
            .iter()
            .any(|t| rbuf[t.clone()].eq_ignore_ascii_case(name));
        if listed
            || is_connection_specific(name)
            || encode::is_withheld_response_field(name)
            || crate::http::encode::is_request_id_field(name)
            || parse::name_is(name, "content-length")
            || (parse::name_is(name, "set-cookie") && sets_permit_cookie(&rbuf[f.value.clone()]))
        {
            continue;
        }
        let value = &rbuf[f.value.clone()];
        let rewritten = encode::host_only_field(name, value);
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name),
            HeaderValue::from_bytes(rewritten.as_deref().unwrap_or(value)),
        ) {
            headers.append(n, v);
        }
    }
    let length = match resp.framing {
        _ if resp.status < 200 || resp.status == 204 => None,
        _ if bodiless => resp.content_length,
        BodyFraming::Length(n) => Some(n),
        BodyFraming::Chunked | BodyFraming::Eof => None,
    };
    if let Some(n) = length {
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
    }
}

/// A new connection to `addr` after a pooled one was found dead.
async fn connect_again(
    core: &crate::core::Core,
    route: &Route,
    addr: SocketAddr,
) -> Result<TcpConn, Fail> {
    tracing::debug!("pooled upstream connection was dead; retrying on a new one");
    proxy::connect(core, route, addr)
        .await
        .map_err(|e| Fail::from(Failure::from(e)))
}

/// Relays the client's request body to an HTTP/1.1 app (chunked when the client
/// gave no length), giving each frame's capacity back once the app took it.
/// How a body that stalled is answered.
fn stalled(s: Stall) -> Fail {
    Fail::Answer(ProxyError::Request(match s {
        Stall::Idle => RequestError::BodyTimeout,
        Stall::TooSlow => RequestError::BodyTooSlow,
    }))
}

/// Waits, under the body timers, for the first bytes of a stream's body: `Some`
/// with them, `None` when the body ended without any. Empty DATA frames are not
/// bytes: the whole wait is bounded by the idle timeout, however many come.
/// `activity` is told when they came.
async fn first_body_bytes(
    ctx: &ConnCtx,
    body: &mut RecvStream,
    floor: &mut Option<BodyFloor>,
    activity: &super::budget::Activity,
) -> Result<Option<Bytes>, Fail> {
    let core = &ctx.core;
    let since = core.reactor.now();
    loop {
        let waited = core.reactor.now().saturating_duration_since(since);
        let idle = core.rt.body_idle_timeout.saturating_sub(waited);
        let next = BodyFloor::wait(floor, &core.reactor, idle, body.data(), super::data_len);
        match next.await.map_err(stalled)? {
            None => return Ok(None),
            Some(Ok(c)) if c.is_empty() => continue,
            Some(Ok(c)) => {
                activity.moved(core.reactor.now());
                return Ok(Some(c));
            }
            Some(Err(e)) => {
                ctx.note_client_error(&e);
                return Err(Fail::Abort(format!("client body: {e}")));
            }
        }
    }
}

/// How a stream's body went to an HTTP/1.1 app; the payload bytes sent either way.
enum BodySent {
    /// All of it.
    Whole(u64),
    /// Part of it: the app began an answer that ends the request first
    /// ([`relay::app_refused`]).
    Answered(u64),
}

/// Sends a stream's body to an HTTP/1.1 app: `first`, the bytes already taken
/// ([`first_body_bytes`]), then the rest, under `floor` (the HTTP/1.1 rate floor,
/// per stream: a trickle would hold the app connection). Each wait, on the client's
/// next bytes or on an app that does not take them, watches a plaintext app for an
/// early refusal (413, 401 … with its connection kept open and the body unread), as
/// the HTTP/1.1 relay does: its answer then goes to the client at once rather than
/// after the write stalls out, a 502 a minute later. `side` is told the payload
/// bytes the app took, as they go, and `activity` when.
#[allow(clippy::too_many_arguments)]
async fn send_body_h1(
    ctx: &ConnCtx,
    upstream: &TcpConn,
    body: &mut RecvStream,
    framing: BodyFraming,
    floor: &mut Option<BodyFloor>,
    mut first: Option<Bytes>,
    side: &AppSide,
    activity: &super::budget::Activity,
) -> Result<BodySent, Fail> {
    let core = &ctx.core;
    let rt = &core.rt;
    let chunked = framing == BodyFraming::Chunked;
    let mut total = 0u64;
    let mut out = Vec::new();
    // Raw bytes are peeked at: not through TLS. Cleared once the app's first bytes
    // turn out not to refuse the request.
    let mut watching = !upstream.is_tls();
    macro_rules! watched {
        ($work:expr) => {
            match relay::or_refusal_while($work, upstream, &mut watching).await {
                Ok(done) => done,
                Err(_) => return Ok(BodySent::Answered(total)),
            }
        };
    }
    loop {
        let next = match first.take() {
            Some(c) => Ok(Some(Ok(c))),
            None => watched!(BodyFloor::wait(
                floor,
                &core.reactor,
                rt.body_idle_timeout,
                body.data(),
                super::data_len,
            )),
        };
        let chunk = match next.map_err(stalled)? {
            None => break,
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                ctx.note_client_error(&e);
                return Err(Fail::Abort(format!("client body: {e}")));
            }
        };
        let taken = total + chunk.len() as u64;
        if rt.max_body > 0 && taken > rt.max_body {
            return Err(Fail::Answer(ProxyError::Request(
                RequestError::BodyTooLarge,
            )));
        }
        upstream.set_timeout(rt.body_idle_timeout);
        let wrote = if chunked {
            out.clear();
            encode_chunk(&mut out, &chunk);
            watched!(upstream.write_all(&out))
        } else {
            watched!(upstream.write_all(&chunk))
        };
        wrote.map_err(|e| Fail::Answer(ProxyError::UpstreamClosed(e)))?;
        // Counted once the app took it: an early answer that cuts a write leaves
        // that chunk out.
        total = taken;
        side.body_in.set(total);
        activity.moved(core.reactor.now());
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    // Trailers are not forwarded to an HTTP/1.1 app, but a forbidden one is refused
    // as on the HTTP/1.1 path (the app connection, mid-request, is dropped).
    let trailers = watched!(BodyFloor::wait(
        floor,
        &core.reactor,
        rt.body_idle_timeout,
        body.trailers(),
        |_| 0,
    ));
    match trailers.map_err(stalled)? {
        Err(e) => {
            ctx.note_client_error(&e);
            return Err(Fail::Abort(format!("client trailers: {e}")));
        }
        Ok(Some(t)) if filter_trailers(&t, true).is_none() => {
            return Err(Fail::Answer(ProxyError::Request(
                RequestError::ForbiddenTrailer,
            )));
        }
        Ok(_) => {}
    }
    if chunked {
        upstream.set_timeout(rt.body_idle_timeout);
        upstream
            .write_all(b"0\r\n\r\n")
            .await
            .map_err(|e| Fail::Answer(ProxyError::UpstreamClosed(e)))?;
    }
    Ok(BodySent::Whole(total))
}

/// Relays an HTTP/1.1 response body as DATA frames (chunked trailers as HTTP/2
/// trailers); the next read from the app waits until the client took the last.
/// `total`: the payload bytes handed to the client, however it ends; `activity`
/// is told when.
async fn relay_h1_response(
    ctx: &ConnCtx,
    upstream: &TcpConn,
    ubuf: &mut ReadBuf,
    framing: BodyFraming,
    send: &mut SendStream<Bytes>,
    total: &mut u64,
    activity: &super::budget::Activity,
) -> Result<(), String> {
    let rt = &ctx.core.rt;
    let mut body = H1Body::new(framing, ChunkedDecoder::new);
    while !body.done() {
        let (data, progressed) = body.take(ubuf).map_err(|e| format!("chunked: {e}"))?;
        if !data.is_empty() {
            let n = data.len();
            *total += n as u64;
            if let Err(e) = send_all(&ctx.core, send, data).await {
                if matches!(e, SendEnd::Closed(_)) {
                    ctx.note_client_reset();
                }
                return Err(e.to_string());
            }
            activity.sent(ctx.core.reactor.now(), n);
        }
        if body.done() || (progressed && !ubuf.is_empty()) {
            continue;
        }
        upstream.set_timeout(rt.response_idle_timeout);
        // While the app is silent, the client resetting the stream or its connection
        // going away ends the relay at once (the stream's task would otherwise hold
        // the app's connection until the app writes again).
        let fill = ubuf.fill(upstream, BODY_BUF_LIMIT);
        futures_lite::pin!(fill);
        let reset = std::future::poll_fn(|cx| send.poll_reset(cx));
        let Ok(filled) = relay::or_watch(fill, || {}, reset).await else {
            ctx.note_client_reset();
            return Err("the client reset the stream while the app was silent".into());
        };
        match filled {
            Ok(0) if framing == BodyFraming::Eof => body.end(),
            Ok(0) => return Err("the app closed before the end of the body".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    let mut trailers = HeaderMap::new();
    for (name, value) in body.trailers() {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name),
            HeaderValue::from_bytes(value.trim_ascii()),
        ) {
            if !is_connection_specific(name) {
                trailers.append(n, v);
            }
        }
    }
    if trailers.is_empty() {
        send.send_data(Bytes::new(), true)
    } else {
        send.send_trailers(trailers)
    }
    .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_cookies(headers: &HeaderMap) -> Vec<&str> {
        headers
            .get_all(http::header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().expect("ascii"))
            .collect()
    }

    /// An app's `Set-Cookie` of the worker's permit cookie is left out on both
    /// HTTP/2 response paths: an HTTP/1.1 app's head copied into the stream's, and
    /// an HTTP/2 app's head passed on; the app's other cookies stay, in order.
    #[test]
    fn the_permit_cookie_never_reaches_an_http2_client() {
        let raw = b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: appproxy_permit=planted; Path=/api\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n";
        let head = parse::parse_response(raw, Method::Get, 4096)
            .expect("valid")
            .expect("complete");
        let mut copied = HeaderMap::new();
        copy_fields(raw, &head, false, &mut copied);
        assert_eq!(set_cookies(&copied), vec!["a=1", "b=2"]);

        let mut passed = HeaderMap::new();
        for v in [
            "a=1",
            " appproxy_permit =x",
            "b=2",
            "appproxy_permit=y; HttpOnly",
        ] {
            passed.append(http::header::SET_COOKIE, HeaderValue::from_static(v));
        }
        passed.insert(http::header::SERVER, HeaderValue::from_static("app"));
        passed.append(
            http::header::SET_COOKIE,
            HeaderValue::from_static("c=3; Domain=apps.test; Path=/"),
        );
        filter_cookies(&mut passed);
        // `Domain` left out too, the order kept.
        assert_eq!(set_cookies(&passed), vec!["a=1", "b=2", "c=3; Path=/"]);
        let raw =
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; domain=apps.test\r\nContent-Length: 0\r\n\r\n";
        let head = parse::parse_response(raw, Method::Get, 4096)
            .expect("valid")
            .expect("complete");
        let mut copied = HeaderMap::new();
        copy_fields(raw, &head, false, &mut copied);
        assert_eq!(set_cookies(&copied), vec!["a=1"]);
        assert_eq!(
            passed.get(http::header::SERVER).map(|v| v.as_bytes()),
            Some(&b"app"[..])
        );
    }

    /// One hop-by-hop rule on every path: HTTP/2's connection-specific fields (RFC
    /// 9113 §8.2.2) are among the HTTP/1.1 path's hop-by-hop ones, and an HTTP/2
    /// app's head loses those, `Clear-Site-Data`, and the whitespace around values.
    #[test]
    fn http2_paths_share_the_hop_by_hop_rule() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "upgrade",
            "te",
            "proxy-authenticate",
            "proxy-authorization",
            "http2-settings",
        ] {
            assert!(is_connection_specific(name.as_bytes()), "{name}");
        }
        assert!(!is_connection_specific(b"content-type"));
        let mut headers = HeaderMap::new();
        for (n, v) in [
            ("proxy-authenticate", "Basic"),
            ("clear-site-data", "\"cookies\""),
            ("x-a", " spaced "),
            ("x-a", "two"),
            ("x-b", "kept"),
        ] {
            headers.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        sanitize_app_fields(&mut headers);
        let got: Vec<(&str, &[u8])> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(
            got,
            [("x-a", &b"spaced"[..]), ("x-a", b"two"), ("x-b", b"kept")]
        );
    }
}
