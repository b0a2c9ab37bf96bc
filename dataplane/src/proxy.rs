//! One client connection: read a request head, route it, forward it to the app over a
//! pooled connection, relay the response, repeat (keep-alive and pipelining, in order).
//!
//! The request ID is resolved from the head (or generated) and bound with
//! [`appproxy_shared::scope`] around the handling of that request, so every log line
//! written meanwhile carries it; it is forwarded to the app and echoed on every
//! response, the proxy's own errors included.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use appproxy_shared::header::{self, IdPolicy};
use appproxy_shared::{scope, scope_traced, RequestId};

use crate::core::{counter, AccessEntry, Core, Route};
use crate::http::encode::{self, ClientFraming, ClientHop, TraceHeaders};
use crate::http::error::{ProxyError, RequestError, ResponseError};
use crate::http::parse::{self, BodyFraming, Method, RequestHead, ResponseHead};
use crate::io::TcpConn;
use crate::relay::{self, Mode, ReadBuf, RelayError, RelayOpts, Trailers};

/// Initial size of each read buffer; heads grow it up to the head limit.
const BUF_SIZE: usize = 16 * 1024;
/// Largest body buffer.
const BODY_BUF_LIMIT: usize = 64 * 1024;

/// What happens after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Read the next request.
    KeepAlive,
    /// Close the client connection.
    Close,
}

/// The client side of a connection.
struct Client {
    /// The socket.
    conn: TcpConn,
    /// Bytes read and not yet consumed (the next pipelined request may be here).
    buf: ReadBuf,
    /// The hop facts forwarded to the app.
    hop: ClientHop,
    /// Largest head, in bytes.
    head_limit: usize,
}

/// Serves one accepted connection until it closes.
pub async fn serve(core: Rc<Core>, conn: TcpConn, peer: SocketAddr, local_port: u16) {
    core.metrics.add(counter::ACCEPTED, 1);
    core.metrics.add(counter::ACTIVE, 1);
    let conn_id = core.next_conn_id();
    let span = tracing::debug_span!("conn", core = core.cpu, conn = conn_id, peer = %peer);
    let _enter = span.enter();
    let trusted = core
        .rt
        .trusted_proxies
        .iter()
        .any(|n| n.contains(peer.ip()));
    let limits = core.rt.head_limits;
    let tls = conn.is_tls();
    let mut client = Client {
        conn,
        buf: ReadBuf::new(BUF_SIZE),
        hop: ClientHop::new(peer, local_port, trusted).over_tls(tls),
        head_limit: limits.max_request_line + limits.max_header_bytes + 4,
    };
    let mut upstream_buf = ReadBuf::new(BUF_SIZE);
    let mut out = Vec::with_capacity(4096);
    client.conn.set_timeout(core.rt.head_timeout);
    let mut first = true;
    loop {
        let started;
        let head = match read_head(&core, &mut client, first).await {
            Ok(Some(head)) => {
                started = Instant::now();
                head
            }
            Ok(None) => break,
            Err(e) => {
                let id = RequestId::generate(core.rt.id_version);
                let err = ProxyError::Request(e);
                scope(Some(id), async {
                    tracing::info!(error = %err, "request refused");
                })
                .await;
                let line = LogLine {
                    method: b"-".to_vec(),
                    path: b"-".to_vec(),
                };
                answer(
                    &core,
                    &client,
                    &mut out,
                    Refusal::from_error(&err, &id, &line, Instant::now()),
                )
                .await;
                break;
            }
        };
        first = false;
        let id = if !core.rt.request_ids {
            RequestId::parse(b"-").unwrap_or_else(|_| RequestId::generate(core.rt.id_version))
        } else {
            let buf = client.buf.filled();
            let found = header::extract(
                head.headers
                    .iter()
                    .map(|h| (&buf[h.name.clone()], &buf[h.value.clone()])),
            );
            header::resolve(IdPolicy::GenerateIfMissing, found, core.rt.id_version)
                .0
                .unwrap_or_else(|| RequestId::generate(core.rt.id_version))
        };
        let trace = core
            .rt
            .trace_context
            .then(|| crate::trace::Hop::resolve(client.buf.filled(), &head.headers, &id));
        let span = tracing::debug_span!("request", request_id = %id);
        let fut = scope_traced(
            Some(id),
            trace.map(|t| t.span),
            handle(
                &core,
                &mut client,
                &mut upstream_buf,
                &mut out,
                head,
                id,
                trace,
                started,
            ),
        );
        let next = fut.await;
        drop(span);
        if next == Next::Close || core.draining.get() {
            break;
        }
        client.conn.set_timeout(core.rt.keepalive_timeout);
    }
    core.metrics.sub(counter::ACTIVE, 1);
}

/// The ID to forward and echo: always, unless request IDs are turned off for
/// measuring their cost (`[worker] request_ids = false`).
fn forwarded_id<'a>(core: &Core, id: &'a RequestId) -> Option<&'a RequestId> {
    core.rt.request_ids.then_some(id)
}

/// Reads until a complete head is buffered. `Ok(None)`: the client went away (or
/// stayed idle past the keep-alive timeout) with nothing to answer.
async fn read_head(
    core: &Core,
    client: &mut Client,
    first: bool,
) -> Result<Option<RequestHead>, RequestError> {
    let mut waiting_idle = !first && client.buf.is_empty();
    client.conn.set_idle(waiting_idle);
    loop {
        if let Some(head) = parse::parse_request(client.buf.filled(), &core.rt.head_limits)? {
            client.conn.set_idle(false);
            return Ok(Some(head));
        }
        match client.buf.fill(&client.conn, client.head_limit).await {
            Ok(0) => return Ok(None),
            Ok(n) => {
                core.metrics.add(counter::BYTES_IN, n as u64);
                if waiting_idle {
                    waiting_idle = false;
                    client.conn.set_idle(false);
                    client.conn.set_timeout(core.rt.head_timeout);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return if client.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(RequestError::HeadTimeout)
                };
            }
            Err(e) if e.kind() == io::ErrorKind::OutOfMemory => {
                return Err(RequestError::HeadersTooLarge)
            }
            Err(_) => return Ok(None),
        }
    }
}

/// One of the proxy's own answers, with what its access-log line needs.
struct Refusal<'a> {
    /// Status and machine code.
    status: u16,
    code: &'static str,
    /// Human-readable reason (never includes client bytes).
    message: String,
    id: &'a RequestId,
    circuit: Option<&'a appproxy_shared::model::Circuit>,
    started: Instant,
    line: &'a LogLine,
    bytes_in: u64,
    /// Whether the connection closes after this answer.
    close: bool,
}

impl<'a> Refusal<'a> {
    fn from_error(
        err: &ProxyError,
        id: &'a RequestId,
        line: &'a LogLine,
        started: Instant,
    ) -> Self {
        let (status, code) = err.status_and_code();
        Self {
            status,
            code,
            message: err.to_string(),
            id,
            circuit: None,
            started,
            line,
            bytes_in: 0,
            close: err.closes_connection(),
        }
    }
}

/// Sends one of the proxy's own error responses and logs the request.
async fn answer(core: &Core, client: &Client, out: &mut Vec<u8>, r: Refusal<'_>) {
    out.clear();
    encode::error_response(out, r.status, r.code, &r.message, r.id, r.close);
    client.conn.set_timeout(core.rt.body_idle_timeout);
    let _ = client.conn.write_all(out).await;
    core.metrics.status(r.status);
    core.metrics.add(counter::PROXY_ERRORS, 1);
    core.metrics.error_code(r.code);
    core.metrics.add(counter::BYTES_OUT, out.len() as u64);
    core.record(&AccessEntry {
        request_id: r.id,
        circuit: r.circuit,
        method: &r.line.method,
        path: &r.line.path,
        status: r.status,
        bytes_in: r.bytes_in,
        bytes_out: out.len() as u64,
        upstream: None,
        started: r.started,
    });
}

/// Copies of the head's method and path, for logging after the buffer moved on.
struct LogLine {
    method: Vec<u8>,
    path: Vec<u8>,
}

/// Handles one request whose head is at the start of the client buffer.
#[allow(clippy::too_many_arguments)]
async fn handle(
    core: &Rc<Core>,
    client: &mut Client,
    ubuf: &mut ReadBuf,
    out: &mut Vec<u8>,
    head: RequestHead,
    id: RequestId,
    trace: Option<crate::trace::Hop>,
    started: Instant,
) -> Next {
    if let Some(t) = &trace {
        t.log_rejection();
    }
    let line = {
        let buf = client.buf.filled();
        LogLine {
            method: buf[head.method_raw.clone()].to_vec(),
            path: buf[head.target.clone()].iter().take(512).copied().collect(),
        }
    };
    let has_body = head.framing != BodyFraming::Length(0);
    let host = head.host.clone().map(|h| &client.buf.filled()[h]);
    let route = match core.route_for(client.hop.local_port, host) {
        Some(r) => r,
        None => {
            let err = ProxyError::UnknownCircuit;
            tracing::info!(error = %err, port = client.hop.local_port, "request refused");
            let next = settle(client, &head, Left::Whole, &err);
            let mut r = Refusal::from_error(&err, &id, &line, started);
            r.close = next == Next::Close;
            answer(core, client, out, r).await;
            return next;
        }
    };
    let circuit_id = route.circuit.circuit.id;
    let circuit = &route.circuit.circuit;
    let peer_ip = match client_ip(client, &head) {
        Ok(ip) => ip,
        Err(()) => {
            let err = ProxyError::Request(RequestError::Malformed(
                "X-Forwarded-For from a trusted proxy must hold exactly one address",
            ));
            let mut r = Refusal::from_error(&err, &id, &line, started);
            r.circuit = Some(circuit);
            r.close = true;
            answer(core, client, out, r).await;
            return Next::Close;
        }
    };
    // Access control: the allowlist (403), then credentials (401). Nothing about the
    // circuit is in the answer.
    let refusal = if !route.circuit.allowed.is_empty()
        && !route.circuit.allowed.iter().any(|n| n.contains(peer_ip))
    {
        tracing::info!(peer = %peer_ip, "client address not in the circuit's allowlist");
        Some(crate::auth::Refused {
            status: 403,
            code: "forbidden",
            message: "client address not allowed",
        })
    } else {
        check_credentials(core, client.buf.filled(), &head, &route)
            .err()
            .inspect(|r| tracing::info!(code = r.code, reason = r.message, "credentials refused"))
    };
    if let Some(refusal) = refusal {
        let next = if has_body || !head.keep_alive {
            Next::Close
        } else {
            consume_head(client, &head)
        };
        let answer_to = Refusal {
            status: refusal.status,
            code: refusal.code,
            message: refusal.message.into(),
            id: &id,
            circuit: Some(circuit),
            started,
            line: &line,
            bytes_in: head.head_len as u64,
            close: next == Next::Close,
        };
        answer(core, client, out, answer_to).await;
        return next;
    }
    core.mark_access(circuit_id);
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
        let mut r = Refusal::from_error(&err, &id, &line, started);
        r.circuit = Some(circuit);
        r.close = true;
        answer(core, client, out, r).await;
        return Next::Close;
    }
    match forward(core, client, ubuf, out, &head, &route, id, trace).await {
        Ok(done) => {
            core.metrics.status(done.status);
            core.metrics.add(counter::BYTES_OUT, done.bytes_out);
            core.record(&AccessEntry {
                request_id: &id,
                circuit: Some(circuit),
                method: &line.method,
                path: &line.path,
                status: done.status,
                bytes_in: done.bytes_in,
                bytes_out: done.bytes_out,
                upstream: Some(done.upstream),
                started,
            });
            done.next
        }
        Err(Failure::Answer(err, left)) => {
            tracing::warn!(error = %err, "request failed");
            let next = settle(client, &head, left, &err);
            let mut r = Refusal::from_error(&err, &id, &line, started);
            r.circuit = Some(circuit);
            r.bytes_in = head.head_len as u64;
            r.close = next == Next::Close;
            answer(core, client, out, r).await;
            next
        }
        Err(Failure::Abort(reason)) => {
            tracing::info!(reason = %reason, "exchange aborted");
            core.metrics.add(counter::PROXY_ERRORS, 1);
            core.record(&AccessEntry {
                request_id: &id,
                circuit: Some(circuit),
                method: &line.method,
                path: &line.path,
                status: 0,
                bytes_in: head.head_len as u64,
                bytes_out: 0,
                upstream: None,
                started,
            });
            Next::Close
        }
    }
}

/// The client's address: the TCP peer, or, when the peer is a trusted proxy, the one
/// address of its single `X-Forwarded-For` (anything else from a trusted proxy is
/// refused, as the original's strict one-hop rule does).
fn client_ip(client: &Client, head: &RequestHead) -> Result<std::net::IpAddr, ()> {
    let peer = client.hop.peer.ip();
    if !client.hop.trusted {
        return Ok(peer);
    }
    let buf = client.buf.filled();
    let mut xff = head
        .headers
        .iter()
        .filter(|h| parse::name_is(&buf[h.name.clone()], "x-forwarded-for"))
        .map(|h| &buf[h.value.clone()]);
    match (xff.next(), xff.next()) {
        (None, _) => Ok(peer),
        (Some(v), None) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or(()),
        _ => Err(()),
    }
}

/// The circuit's credential check: the permit cookie for interactive apps, a bearer
/// JWT for inference. Skipped only for `open_to_public` circuits and for a genuine
/// CORS preflight ([`crate::auth::is_cors_preflight`]); every other request, whatever
/// its method, path or `Upgrade`, needs the credential before any byte of it reaches
/// the app.
fn check_credentials(
    core: &Core,
    buf: &[u8],
    head: &RequestHead,
    route: &Route,
) -> Result<(), crate::auth::Refused> {
    let circuit = &route.circuit.circuit;
    if circuit.open_to_public {
        return Ok(());
    }
    if head.method == Method::Options
        && head.framing == BodyFraming::Length(0)
        && head.upgrade.is_none()
        && crate::auth::is_cors_preflight(
            head.headers
                .iter()
                .map(|h| (&buf[h.name.clone()], &buf[h.value.clone()])),
        )
    {
        return Ok(());
    }
    let secrets = &core.rt.secrets;
    // Validation refuses non-public circuits without their key; be safe anyway.
    const NO_KEY: crate::auth::Refused = crate::auth::Refused {
        status: 401,
        code: "E20006",
        message: "no key configured for this circuit",
    };
    let values = |name: &'static str| {
        head.headers
            .iter()
            .filter(move |h| parse::name_is(&buf[h.name.clone()], name))
            .map(|h| &buf[h.value.clone()])
    };
    match circuit.app_mode {
        appproxy_shared::model::AppMode::Interactive => {
            let key = secrets.permit_secret.as_deref().ok_or(NO_KEY)?;
            let cookies: Vec<&[u8]> = values("cookie").collect();
            crate::auth::check_permit(
                &cookies,
                key,
                circuit.user_id.as_ref(),
                secrets.permit_digest,
            )
        }
        appproxy_shared::model::AppMode::Inference => {
            let key = secrets.jwt_secret.as_deref().ok_or(NO_KEY)?;
            crate::auth::check_bearer(values("authorization").next(), key, &circuit.id)
        }
    }
}

/// After a failed exchange: whether the connection can go on, consuming the head
/// of a bodiless request the exchange left in the buffer.
fn settle(client: &mut Client, head: &RequestHead, left: Left, err: &ProxyError) -> Next {
    if err.closes_connection() || !head.keep_alive {
        return Next::Close;
    }
    match left {
        Left::Whole if head.framing == BodyFraming::Length(0) => consume_head(client, head),
        Left::Nothing => Next::KeepAlive,
        _ => Next::Close,
    }
}

fn consume_head(client: &mut Client, head: &RequestHead) -> Next {
    client.buf.consume(head.head_len);
    if head.keep_alive {
        Next::KeepAlive
    } else {
        Next::Close
    }
}

/// A completed exchange.
struct Done {
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
    upstream: SocketAddr,
    next: Next,
}

/// How much of the request the client buffer still holds after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Left {
    /// The head (and any body) is untouched.
    Whole,
    /// Head and body were consumed.
    Nothing,
    /// Part of the body was read: the stream position is lost.
    Partial,
}

/// How an exchange failed.
enum Failure {
    /// Nothing was sent to the client yet: answer with this error.
    Answer(ProxyError, Left),
    /// The response had started (or the client is gone): close without answering.
    Abort(String),
}

/// Forwards the request and relays the response.
#[allow(clippy::too_many_arguments)]
async fn forward(
    core: &Rc<Core>,
    client: &mut Client,
    ubuf: &mut ReadBuf,
    out: &mut Vec<u8>,
    head: &RequestHead,
    route: &Route,
    id: RequestId,
    trace: Option<crate::trace::Hop>,
) -> Result<Done, Failure> {
    let rt = &core.rt;
    let mut addr = route
        .pick(core.draw(), core.reactor.now(), None)
        .ok_or_else(|| {
            // Routes exist but the health check took every one out: say so (503).
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
        })?;
    let has_body = head.framing != BodyFraming::Length(0);
    let retryable = head.method.is_idempotent() && !has_body;
    let websocket = head
        .upgrade
        .as_ref()
        .is_some_and(|u| client.buf.filled()[u.clone()].eq_ignore_ascii_case(b"websocket"));
    if has_body {
        // From here the body is timed: the idle timeout per wait, and the minimum
        // average rate over the whole body. No upstream connection is held until the
        // first body bytes are in.
        client
            .conn
            .arm_read_floor(rt.min_body_rate, rt.body_idle_timeout);
        if let Err(f) = await_body(core, client, head).await {
            client.conn.disarm_read_floor();
            return Err(f);
        }
    }
    let (mut upstream, mut reused) = match core.pool.take(addr, core.reactor.now()) {
        Some(c) => {
            core.metrics.add(counter::POOL_HIT, 1);
            (c, true)
        }
        None => {
            core.metrics.add(counter::POOL_MISS, 1);
            match connect_route(core, route, addr).await {
                Ok((conn, used)) => {
                    addr = used;
                    (conn, false)
                }
                Err(f) => {
                    client.conn.disarm_read_floor();
                    return Err(f);
                }
            }
        }
    };
    let opts = RelayOpts {
        max_payload: rt.max_body,
        idle: rt.body_idle_timeout,
        source_idle: rt.body_idle_timeout,
        buf_limit: BODY_BUF_LIMIT,
    };
    let mut bytes_in = head.head_len as u64;
    ubuf.consume(usize::MAX);
    let traceparent = trace.map(|t| t.span.traceparent());
    loop {
        out.clear();
        encode::upstream_request_traced(
            out,
            client.buf.filled(),
            head,
            forwarded_id(core, &id),
            trace.zip(traceparent.as_ref()).map(|(t, h)| TraceHeaders {
                traceparent: h.as_bytes(),
                keep_tracestate: t.keep_tracestate,
            }),
            client.hop,
            addr,
        );
        let upstream_head_len = out.len() as u64;
        let send = if retryable {
            // No body: the head alone, kept in the client buffer until the response
            // arrived, so a dead pooled connection can be retried.
            upstream.set_timeout(rt.body_idle_timeout);
            upstream
                .write_all(out)
                .await
                .map(|()| 0)
                .map_err(RelayError::Destination)
        } else {
            client.buf.consume(head.head_len);
            let mode = match head.framing {
                BodyFraming::Length(n) => Mode::Length(n),
                BodyFraming::Chunked => Mode::Chunked(Trailers::RefuseForbidden),
                BodyFraming::Eof => Mode::UntilClose,
            };
            relay::relay_body(&client.conn, &mut client.buf, &upstream, out, mode, opts).await
        };
        let floor_cut = has_body && client.conn.floor_cut();
        if has_body {
            client.conn.disarm_read_floor();
        }
        match send {
            Ok(n) => bytes_in += n.saturating_sub(upstream_head_len),
            Err(RelayError::Destination(e)) if reused && retryable => {
                tracing::debug!(error = %e, "pooled upstream connection was dead; retrying on a new one");
                reused = false;
                upstream = connect(core, route, addr).await?;
                continue;
            }
            Err(RelayError::Destination(e)) => {
                let left = if retryable {
                    Left::Whole
                } else {
                    Left::Partial
                };
                return Err(Failure::Answer(ProxyError::UpstreamClosed(e), left));
            }
            Err(RelayError::Source(e)) => return Err(body_read_failure(e, floor_cut)),
            Err(RelayError::Framing(what)) => {
                return Err(Failure::Answer(
                    ProxyError::Request(RequestError::BadChunk(what)),
                    Left::Partial,
                ))
            }
            Err(RelayError::TooLarge) => {
                return Err(Failure::Answer(
                    ProxyError::Request(RequestError::BodyTooLarge),
                    Left::Partial,
                ))
            }
        }
        let sent = Instant::now();
        let outcome = read_response_head(core, &upstream, ubuf, head.method).await;
        if outcome.is_ok() {
            core.metrics.upstream_head.observe(sent.elapsed());
        }
        let retrying = matches!(outcome, Err(HeadFailure::Closed(_))) && reused && retryable;
        if !retrying {
            note_health(core, route, addr, outcome.is_ok());
        }
        match outcome {
            Ok(resp) => {
                if retryable {
                    client.buf.consume(head.head_len);
                }
                return relay_response(
                    core,
                    client,
                    upstream,
                    ubuf,
                    out,
                    head,
                    resp,
                    addr,
                    id,
                    bytes_in,
                    websocket,
                    &route.circuit.circuit,
                )
                .await;
            }
            Err(HeadFailure::Closed(e)) if reused && retryable => {
                tracing::debug!(error = %e, "pooled upstream connection closed before answering; retrying");
                reused = false;
                upstream = connect(core, route, addr).await?;
            }
            Err(f) => {
                if retryable {
                    client.buf.consume(head.head_len);
                }
                let err = match f {
                    HeadFailure::Closed(e) => ProxyError::UpstreamClosed(e),
                    HeadFailure::Timeout => ProxyError::UpstreamTimeout,
                    HeadFailure::Invalid(e) => ProxyError::UpstreamResponse(e),
                };
                return Err(Failure::Answer(err, Left::Nothing));
            }
        }
    }
}

/// Records an exchange's outcome in the route's passive health.
fn note_health(core: &Core, route: &Route, addr: SocketAddr, ok: bool) {
    let policy = core.health_policy();
    if route.record(addr, ok, core.reactor.now(), policy) {
        tracing::warn!(upstream = %addr, failures = policy.threshold, backoff_secs = policy.backoff.as_secs(), "upstream marked unhealthy");
    }
}

/// Connects to `addr`; when that fails, records it and tries one other upstream of
/// the route (connect failures are safe to retry: nothing was sent). An upstream at
/// its connection cap is skipped the same way, without counting against its health;
/// a local failure (out of descriptors …) is answered at once: it is nobody's health
/// and another upstream would fail the same way.
async fn connect_route(
    core: &Core,
    route: &Route,
    addr: SocketAddr,
) -> Result<(TcpConn, SocketAddr), Failure> {
    match connect(core, route, addr).await {
        Ok(c) => Ok((c, addr)),
        Err(ConnectError::Local(e)) => Err(ConnectError::Local(e).into()),
        Err(first) => {
            if matches!(first, ConnectError::Upstream(_)) {
                note_health(core, route, addr, false);
            }
            match route.pick(core.draw(), core.reactor.now(), Some(addr)) {
                Some(alt) if alt != addr => match connect(core, route, alt).await {
                    Ok(c) => Ok((c, alt)),
                    Err(e) => {
                        if matches!(e, ConnectError::Upstream(_)) {
                            note_health(core, route, alt, false);
                        }
                        Err(e.into())
                    }
                },
                _ => Err(first.into()),
            }
        }
    }
}

/// Why no upstream connection was opened.
enum ConnectError {
    /// The upstream already has the most connections this core may open to it.
    Busy,
    /// A local failure: descriptors, memory or ports of this host ran out.
    Local(io::Error),
    /// The upstream refused, was unreachable or did not answer in time.
    Upstream(io::Error),
}

impl From<ConnectError> for Failure {
    fn from(e: ConnectError) -> Self {
        let err = match e {
            ConnectError::Busy => ProxyError::UpstreamBusy,
            ConnectError::Local(e) => ProxyError::LocalResources(e),
            ConnectError::Upstream(e) => ProxyError::UpstreamConnect(e),
        };
        Failure::Answer(err, Left::Whole)
    }
}

/// Opens a new connection to `addr`, counted in its per-core cap until it closes.
async fn connect(core: &Core, route: &Route, addr: SocketAddr) -> Result<TcpConn, ConnectError> {
    let Some(slot) = core.pool.reserve(addr) else {
        core.metrics.add(counter::UPSTREAM_LIMIT, 1);
        tracing::debug!(upstream = %addr, cap = core.rt.max_upstream_conns, "upstream connection limit reached on this core ([upstream] max_connections_per_route)");
        return Err(ConnectError::Busy);
    };
    match TcpConn::connect(&core.reactor, addr, core.rt.connect_timeout).await {
        Ok(mut conn) => {
            conn.count_in(slot);
            core.connect_succeeded();
            // An app that serves HTTPS: the handshake is part of the connect.
            let tls = route
                .circuit
                .upstream_tls
                .iter()
                .find(|(a, _, _)| *a == addr);
            if let Some((_, mode, name)) = tls {
                let session = core
                    .rt
                    .upstream_tls
                    .session(*mode, name)
                    .map_err(|e| ConnectError::Upstream(io::Error::other(e)))?;
                conn.start_tls(session);
                conn.set_deadline(Some(Instant::now() + core.rt.connect_timeout));
                if let Err(e) = conn.handshake().await {
                    tracing::warn!(upstream = %addr, name = %name, error = %e, "upstream TLS handshake failed");
                    return Err(ConnectError::Upstream(e));
                }
                conn.set_deadline(None);
            }
            Ok(conn)
        }
        Err(e) if crate::core::is_local_error(&e) => {
            core.local_connect_failure(addr, &e);
            Err(ConnectError::Local(e))
        }
        Err(e) => {
            tracing::warn!(upstream = %addr, error = %e, "upstream connect failed");
            Err(ConnectError::Upstream(e))
        }
    }
}

/// Waits until the first bytes of the request body are buffered, sending
/// `100 Continue` first when the client waits for it, so that an upstream connection
/// is opened only once a body is really coming. The body timers (armed by the
/// caller) apply.
async fn await_body(core: &Core, client: &mut Client, head: &RequestHead) -> Result<(), Failure> {
    if client.buf.filled().len() > head.head_len {
        return Ok(());
    }
    if head.expect_continue {
        client.conn.set_timeout(core.rt.body_idle_timeout);
        client
            .conn
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(|e| Failure::Abort(format!("client write: {e}")))?;
    }
    tracing::debug!("waiting for the request body before connecting upstream");
    let limit = BODY_BUF_LIMIT.max(client.head_limit);
    while client.buf.filled().len() <= head.head_len {
        client.conn.set_timeout(core.rt.body_idle_timeout);
        match client.buf.fill(&client.conn, limit).await {
            Ok(0) => return Err(Failure::Abort("client closed before its body".into())),
            Ok(n) => core.metrics.add(counter::BYTES_IN, n as u64),
            Err(e) => return Err(body_read_failure(e, client.conn.floor_cut())),
        }
    }
    Ok(())
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

enum HeadFailure {
    Closed(io::Error),
    Timeout,
    Invalid(ResponseError),
}

impl HeadFailure {
    fn into_error(self) -> ProxyError {
        match self {
            HeadFailure::Closed(e) => ProxyError::UpstreamClosed(e),
            HeadFailure::Timeout => ProxyError::UpstreamTimeout,
            HeadFailure::Invalid(e) => ProxyError::UpstreamResponse(e),
        }
    }
}

/// Most interim (1xx) responses accepted before a final one; past it the exchange is
/// ended and the upstream connection discarded.
const MAX_INTERIM: usize = 5;

async fn read_response_head(
    core: &Core,
    upstream: &TcpConn,
    ubuf: &mut ReadBuf,
    method: Method,
) -> Result<ResponseHead, HeadFailure> {
    upstream.set_timeout(core.rt.upstream_head_timeout);
    loop {
        if let Some(head) = parse::parse_response(ubuf.filled(), method, core.rt.max_response_head)
            .map_err(HeadFailure::Invalid)?
        {
            return Ok(head);
        }
        match ubuf.fill(upstream, core.rt.max_response_head + 1024).await {
            Ok(0) => {
                return Err(HeadFailure::Closed(io::ErrorKind::UnexpectedEof.into()));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(HeadFailure::Timeout),
            Err(e) if e.kind() == io::ErrorKind::OutOfMemory => {
                return Err(HeadFailure::Invalid(ResponseError::HeadTooLarge))
            }
            Err(e) => return Err(HeadFailure::Closed(e)),
        }
    }
}

/// Relays the response (interim heads, final head, body) and settles both
/// connections.
#[allow(clippy::too_many_arguments)]
async fn relay_response(
    core: &Rc<Core>,
    client: &mut Client,
    upstream: TcpConn,
    ubuf: &mut ReadBuf,
    out: &mut Vec<u8>,
    req: &RequestHead,
    mut resp: ResponseHead,
    addr: SocketAddr,
    id: RequestId,
    bytes_in: u64,
    websocket: bool,
    circuit: &appproxy_shared::model::Circuit,
) -> Result<Done, Failure> {
    let rt = &core.rt;
    let mut bytes_out = 0u64;
    // Interim responses (100, 103 …) are relayed to HTTP/1.1 clients only (an
    // HTTP/1.0 client must get none, RFC 9110 §15.2), at most MAX_INTERIM of them;
    // 101 ends HTTP on this connection.
    let mut interim = 0;
    while (100..200).contains(&resp.status) && resp.status != 101 {
        interim += 1;
        if interim > MAX_INTERIM {
            tracing::warn!(
                upstream = %addr,
                limit = MAX_INTERIM,
                "too many interim responses; closing"
            );
            return Err(if bytes_out == 0 {
                Failure::Answer(
                    ProxyError::UpstreamResponse(ResponseError::Malformed(
                        "too many interim responses",
                    )),
                    Left::Nothing,
                )
            } else {
                Failure::Abort("too many interim responses".into())
            });
        }
        if req.version == parse::Version::Http11 {
            out.clear();
            encode::interim_response(out, ubuf.filled(), &resp);
            client.conn.set_timeout(rt.body_idle_timeout);
            client
                .conn
                .write_all(out)
                .await
                .map_err(|e| Failure::Abort(format!("client write: {e}")))?;
            bytes_out += out.len() as u64;
        }
        ubuf.consume(resp.head_len);
        resp = match read_response_head(core, &upstream, ubuf, req.method).await {
            Ok(r) => r,
            Err(f) if bytes_out == 0 => {
                return Err(Failure::Answer(f.into_error(), Left::Nothing));
            }
            Err(_) => {
                return Err(Failure::Abort(
                    "upstream failed after an interim response".into(),
                ))
            }
        };
    }
    if resp.status == 101 {
        if req.upgrade.is_none() {
            return Err(Failure::Answer(
                ProxyError::UpstreamResponse(ResponseError::Malformed(
                    "101 without an upgrade request",
                )),
                Left::Nothing,
            ));
        }
        out.clear();
        encode::client_response(
            out,
            ubuf.filled(),
            &resp,
            ClientFraming::Empty,
            forwarded_id(core, &id),
            req.version,
            false,
        );
        let ws_rsv = websocket.then(|| {
            let buf = ubuf.filled();
            let ext = resp
                .headers
                .iter()
                .find(|h| parse::name_is(&buf[h.name.clone()], "sec-websocket-extensions"))
                .map(|h| &buf[h.value.clone()]);
            crate::ws::allowed_rsv(ext)
        });
        ubuf.consume(resp.head_len);
        let ends = TunnelEnds {
            upstream,
            addr,
            bytes_in,
            bytes_out,
            ws_rsv,
            session: id,
            circuit,
        };
        let _open = core.tunnel_open(circuit.id);
        return tunnel(core, client, ubuf, out, ends).await;
    }
    let framing = ClientFraming::choose(resp.framing, req.version);
    let close = !req.keep_alive || core.draining.get();
    out.clear();
    encode::client_response(
        out,
        ubuf.filled(),
        &resp,
        framing,
        forwarded_id(core, &id),
        req.version,
        close,
    );
    ubuf.consume(resp.head_len);
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
    };
    match relay::relay_body_counted(&upstream, ubuf, &client.conn, out, mode, opts).await {
        Ok(n) => bytes_out += n,
        // Nothing reached the client yet (the head goes out with the first body
        // bytes): it still gets a 502 instead of an empty reply.
        Err((RelayError::Framing(what), 0)) if bytes_out == 0 => {
            tracing::warn!(upstream = %addr, error = what, "malformed chunked response body");
            return Err(Failure::Answer(
                ProxyError::UpstreamResponse(ResponseError::BadChunk(what)),
                Left::Nothing,
            ));
        }
        Err((RelayError::Source(e), 0)) if bytes_out == 0 => {
            return Err(Failure::Answer(
                ProxyError::UpstreamClosed(e),
                Left::Nothing,
            ));
        }
        Err((e, _)) => return Err(Failure::Abort(format!("response body: {e}"))),
    }
    // Reuse the upstream connection only if the response was fully and exactly read.
    if resp.keep_alive && ubuf.is_empty() && !matches!(mode, Mode::Rechunk | Mode::UntilClose) {
        core.pool.put(addr, upstream, core.reactor.now());
    }
    Ok(Done {
        status: resp.status,
        bytes_in,
        bytes_out,
        upstream: addr,
        next: if close || framing.closes() {
            Next::Close
        } else {
            Next::KeepAlive
        },
    })
}

/// What a tunnel starts with.
struct TunnelEnds<'a> {
    /// The app's connection, after its 101.
    upstream: TcpConn,
    /// The app's address.
    addr: SocketAddr,
    /// Bytes read from the client so far.
    bytes_in: u64,
    /// Bytes written to the client so far.
    bytes_out: u64,
    /// `Some(allowed RSV bits)` for a WebSocket session; `None` relays raw bytes.
    ws_rsv: Option<u8>,
    /// The upgrade request's ID: it names the session.
    session: RequestId,
    /// The circuit (its user context goes on the session line).
    circuit: &'a appproxy_shared::model::Circuit,
}

/// After a 101: relays both ways until both sides close or the tunnel idles out.
/// WebSocket sessions are relayed frame by frame (inspected, unchanged); anything
/// else as raw bytes.
async fn tunnel(
    core: &Rc<Core>,
    client: &mut Client,
    ubuf: &mut ReadBuf,
    out: &mut Vec<u8>,
    ends: TunnelEnds<'_>,
) -> Result<Done, Failure> {
    let idle = core.rt.tunnel_idle_timeout;
    let TunnelEnds {
        upstream,
        addr,
        bytes_in,
        mut bytes_out,
        ws_rsv,
        session,
        circuit,
    } = ends;
    // What each side sent right behind the handshake.
    let from_app = ubuf.filled().to_vec();
    ubuf.consume(usize::MAX);
    let from_client = client.buf.filled().to_vec();
    client.buf.consume(usize::MAX);
    if ws_rsv.is_none() {
        out.extend_from_slice(&from_app);
    }
    // The HTTP buffers are done with: a long-lived tunnel should not keep them.
    *ubuf = ReadBuf::new(0);
    client.buf = ReadBuf::new(0);
    client.conn.set_timeout(idle);
    client
        .conn
        .write_all(out)
        .await
        .map_err(|e| Failure::Abort(format!("client write: {e}")))?;
    bytes_out += out.len() as u64;
    *out = Vec::new();
    // Drain closes tunnels like idle keep-alive connections.
    client.conn.set_idle(true);
    let started = Instant::now();
    let (up_bytes, down_bytes) = match ws_rsv {
        Some(rsv) => {
            tracing::info!(upstream = %addr, "websocket session opened");
            let shared = relay::WsShared::default();
            let per_message = core.rt.ws_message_ids == crate::config::WsMessageIds::PerMessage;
            let log = |direction: &'static str| {
                let shared = &shared;
                move |count: u32| {
                    for _ in 0..count {
                        let seq = shared.seq.get().wrapping_add(1);
                        shared.seq.set(seq);
                        if per_message {
                            let id = session.message_id(seq);
                            appproxy_shared::with_request_id(Some(id), || {
                                tracing::debug!(direction, seq, "websocket message")
                            });
                        } else {
                            tracing::debug!(direction, seq, "websocket message");
                        }
                    }
                }
            };
            let to_app = log("to_app");
            let to_client = log("to_client");
            let (up, down) = futures_lite::future::zip(
                relay::ws_pipe(
                    &client.conn,
                    &upstream,
                    from_client,
                    true,
                    rsv,
                    &shared,
                    idle,
                    &to_app,
                    &core.scratch,
                ),
                relay::ws_pipe(
                    &upstream,
                    &client.conn,
                    from_app,
                    false,
                    rsv,
                    &shared,
                    idle,
                    &to_client,
                    &core.scratch,
                ),
            )
            .await;
            tracing::info!(
                duration_ms = started.elapsed().as_millis() as u64,
                messages_to_app = up.messages,
                messages_to_client = down.messages,
                bytes_to_app = up.bytes,
                bytes_to_client = down.bytes,
                close_code = shared
                    .close
                    .get()
                    .or(up.close_seen)
                    .or(down.close_seen)
                    .unwrap_or(1006),
                user_id = circuit.user_id.map(tracing::field::display),
                session_id = circuit.session_ids.first().map(tracing::field::display),
                endpoint_id = circuit.endpoint_id.map(tracing::field::display),
                "websocket session closed"
            );
            (up.bytes, down.bytes)
        }
        None => {
            if !from_client.is_empty() {
                upstream.set_timeout(idle);
                upstream
                    .write_all(&from_client)
                    .await
                    .map_err(|e| Failure::Abort(format!("upstream write: {e}")))?;
            }
            tracing::info!(upstream = %addr, "upgraded connection established");
            let mut up_buf = vec![0u8; 16 * 1024];
            let mut down_buf = vec![0u8; 16 * 1024];
            let (up, down) = futures_lite::future::zip(
                relay::pipe(&client.conn, &upstream, &mut up_buf, idle),
                relay::pipe(&upstream, &client.conn, &mut down_buf, idle),
            )
            .await;
            let (up, down) = (up.unwrap_or(0), down.unwrap_or(0));
            tracing::info!(
                duration_ms = started.elapsed().as_millis() as u64,
                bytes_to_app = up,
                bytes_to_client = down,
                "upgraded connection closed"
            );
            (up, down)
        }
    };
    Ok(Done {
        status: 101,
        bytes_in: bytes_in + up_bytes,
        bytes_out: bytes_out + down_bytes,
        upstream: addr,
        next: Next::Close,
    })
}
