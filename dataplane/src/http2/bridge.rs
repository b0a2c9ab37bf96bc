//! HTTP/1.1 clients of `http2` and `grpc` circuits: the request (already routed and
//! checked by `proxy.rs`) goes to the app over HTTP/2 like a stream's
//! ([`super::upstream::open_stream`]: same sanitation, same connection), its body
//! read from the client as framed (length or chunked) and handed on as the app's
//! window allows; the answer comes back as an HTTP/1.1 response (its length kept,
//! or chunked with the app's trailers; close-delimited for HTTP/1.0 clients).

use std::time::Instant;

use appproxy_shared::model::ProxyProtocol;
use appproxy_shared::RequestId;
use bytes::Bytes;
use h2::RecvStream;

use super::budget::Activity;
use super::h1_body::H1Body;
use super::stream::{send_all, Done, Fail, Req};
use super::upstream::{self, Answer, NextHead};
use super::within;
use crate::core::{Core, Route};
use crate::http::chunked::{encode_chunk, ChunkedDecoder};
use crate::http::encode::{push_u64, sets_permit_cookie, ClientHop};
use crate::http::error::{Fault, ProxyError, RequestError};
use crate::http::parse::{self, BodyFraming, Method, RequestHead, Version};
use crate::io::TcpConn;
use crate::proxy::{self, retry, retry::Attempt, AppSide};
use crate::relay::{self, ReadBuf};

/// Largest client read buffer while relaying a body.
const BODY_BUF_LIMIT: usize = 64 * 1024;

/// A completed bridged exchange.
pub struct Bridged {
    /// Status, bytes and app.
    pub done: Done,
    /// Whether the client connection can take another request.
    pub keep_alive: bool,
    /// Whether the client may still be sending (its body was left unread after the
    /// app ended the stream early): the connection closes lingering.
    pub body_left: bool,
}

/// Forwards the HTTP/1.1 request whose head starts `cbuf` to the circuit's
/// HTTP/2 app and relays the answer to `conn`; `side` is told the app tried and the
/// body bytes it took, for the access line of a failure, and `activity` of the
/// bytes moved and the answer begun, for its place in the core's budget of streams
/// to apps ([`super::budget`]).
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    core: &std::rc::Rc<Core>,
    conn: &TcpConn,
    cbuf: &mut ReadBuf,
    hop: ClientHop,
    head: &RequestHead,
    route: &Route,
    id: RequestId,
    trace: Option<crate::trace::Hop>,
    side: &AppSide,
    activity: &std::rc::Rc<Activity>,
) -> Result<Bridged, Fail> {
    let rt = &core.rt;
    let (authority, path, te_trailers) = {
        let buf = cbuf.filled();
        let authority = head
            .host
            .clone()
            .map(|h| String::from_utf8_lossy(&buf[h]).into_owned());
        let path = String::from_utf8_lossy(&buf[head.target.clone()]).into_owned();
        let te = head.headers.iter().any(|h| {
            parse::name_is(&buf[h.name.clone()], "te")
                && parse::list_elements(&buf[h.value.clone()])
                    .any(|e| e.eq_ignore_ascii_case(b"trailers"))
        });
        (authority, path, te)
    };
    let end = head.framing == BodyFraming::Length(0);
    // The request as a stream's (its head in the client buffer), from the client
    // `hop` names.
    let client = std::cell::Cell::new(hop.client_ip());
    // The request as a stream's (its head in the client buffer).
    macro_rules! req {
        () => {
            Req {
                buf: cbuf.filled(),
                head,
                authority: authority.as_deref(),
                path: &path,
                te_trailers,
                side,
                client: &client,
                activity,
            }
        };
    }
    // A client that leaves while its app's connection is dialed ends the wait,
    // as while the app is silent (with a body to come, by a reset or a hang-up).
    let abort = rt.abort_on_client_close;
    let client_left = || Fail::Abort(crate::proxy::exchange::CLIENT_LEFT.into());
    let first = req!();
    let open = upstream::open_stream(core, hop, route, &first, &id, trace, end, None);
    let (mut response, mut up_send, mut _on_conn, mut addr) =
        relay::unless_client_left(open, conn, end, abort)
            .await
            .ok_or_else(client_left)??;
    // A request without a body keeps its head in the client buffer until the
    // answer's head came: a stream the app never processed is sent again once
    // ([`upstream::retry_of`]).
    let mut attempt = Attempt::first(head.method, !end, false);
    if !end {
        cbuf.consume(head.head_len);
    }
    let mut bytes_in = 0;
    // The app's answer when it came while the body was still going: one that
    // ends the request (`early`: the rest of the body is left unread), or a
    // success begun early (`answered`: the app read on, and took the whole body).
    let mut early = None;
    let mut answered = None;
    if !end && head.expect_continue && cbuf.is_empty() {
        conn.set_timeout(rt.body_idle_timeout);
        let mut out = Vec::with_capacity(64);
        crate::http::encode::continue_response(
            &mut out,
            crate::proxy::forwarded_id(core, &id).map(|i| i.as_bytes()),
        );
        conn.write_all(&out)
            .await
            .map_err(|e| Fail::Abort(format!("client write: {e}")))?;
    }
    if !end {
        // The HTTP/1.1 body rate floor, as on the HTTP/1.1 app path: a trickle would
        // hold the app stream (and its share of the app connection).
        conn.arm_read_floor(rt.min_body_rate, rt.body_idle_timeout);
        let sent = send_body(
            core,
            conn,
            cbuf,
            head.framing,
            &mut up_send,
            &mut response,
            &mut bytes_in,
            activity,
        )
        .await;
        conn.disarm_read_floor();
        side.body_in.set(bytes_in);
        match sent {
            Ok(BodyEnd::Whole(None)) => {}
            Ok(BodyEnd::Whole(Some(r))) => answered = Some(r),
            // The app answered, no success, before it took the whole body, and
            // keeps its stream open: its answer is relayed at once, the rest of
            // the body left unread (the connection closes after it, lingering),
            // and the app's stream reset once the answer is read (the h2 crate
            // does so when its last handle goes).
            Ok(BodyEnd::Answered(r)) => {
                tracing::info!(
                    upstream = %addr,
                    status = r.status().as_u16(),
                    "the app answered before taking the whole request body"
                );
                early = Some(r);
            }
            Ok(BodyEnd::Failed(e)) => {
                return Err(upstream::response_failure(core, route, addr, e));
            }
            Ok(BodyEnd::Refused(r)) => return Err(r.fail(core, route, addr)),
            // The app ended its stream while the body was going. When it did so after
            // a complete answer (RFC 9113 §8.1: an early answer, then
            // `RST_STREAM(NO_ERROR)`; what Go's servers and gRPC do when a handler
            // returns without reading the whole body), that answer is relayed: the
            // client must not lose it. The rest of the client's body is left unread,
            // so the connection closes after it.
            Err(Fail::Answer(ProxyError::UpstreamClosed(e))) => {
                match futures_lite::future::poll_once(response.past_interim()).await {
                    Some(Ok(Ok(r))) => early = Some(r),
                    Some(Err(r)) => return Err(r.fail(core, route, addr)),
                    _ => return Err(Fail::Answer(ProxyError::UpstreamClosed(e))),
                }
            }
            Err(e) => return Err(e),
        }
    }
    let body_left = early.is_some();
    // gRPC calls carry their own deadlines (a watch may answer hours later): they
    // wait the tunnel idle timeout; other apps the head timeout. Either wait ends
    // when the client is gone: its app stream is reset, not held for the bound.
    // Gone, for a wait bounded by the head timeout, is the HTTP/1.1 path's rule
    // (`fill_watching`): its end of stream too with `[upstream]
    // abort_on_client_close` (the default; its body is whole here, an early
    // answer is not waited for), else a connection reset or hung up, while a
    // client that only ended its side after its requests (`nc -N`, HTTP/1.0
    // tools) still reads and keeps its answers, pipelined ones too. A gRPC wait
    // may last hours, and a client that closed cannot be told from one that
    // half-closed: its end of stream ends the wait (seen even behind bytes it sent
    // ahead, pipelined or a TLS close_notify, which stay unread), as it would hold
    // a place of the core's app-stream budget for as long.
    let grpc = route.circuit.circuit.protocol == ProxyProtocol::Grpc;
    let bound = if grpc {
        rt.tunnel_idle_timeout
    } else {
        rt.upstream_head_timeout
    };
    conn.set_deadline(None);
    let (resp, sent) = if let Some(r) = early.or(answered) {
        (r, Instant::now())
    } else {
        loop {
            let sent = Instant::now();
            let answer = {
                let next = std::future::poll_fn(|cx| response.poll_next_head(cx));
                let answer = std::pin::pin!(within(&core.reactor, bound, next));
                let gone = async {
                    if grpc {
                        conn.peer_gone().await
                    } else {
                        conn.gone(relay::Gone::on_close(rt.abort_on_client_close))
                            .await
                    }
                };
                relay::or_watch(answer, || {}, gone).await
            };
            let Ok(resp) = answer else {
                up_send.send_reset(h2::Reason::CANCEL);
                return Err(Fail::Abort(crate::proxy::exchange::CLIENT_LEFT.into()));
            };
            match resp {
                None => {
                    proxy::note_health(core, route, addr, false);
                    return Err(Fail::Answer(ProxyError::UpstreamTimeout));
                }
                Some(NextHead::Refused(r)) => return Err(r.fail(core, route, addr)),
                // Relayed to an HTTP/1.1 client as it comes (an HTTP/1.0 one gets
                // none, RFC 9110 §15.2); the next head has its own wait.
                Some(NextHead::Interim(mut info)) => {
                    if head.version == Version::Http11 {
                        super::stream::sanitize_app_fields(info.headers_mut());
                        let mut out = Vec::with_capacity(256);
                        status_line(&mut out, info.status().as_u16());
                        app_fields(&mut out, info.headers());
                        if let Some(id) = crate::proxy::forwarded_id(core, &id) {
                            crate::http::encode::push_field(
                                &mut out,
                                b"X-Backend-Request-ID",
                                id.as_bytes(),
                            );
                        }
                        out.extend_from_slice(b"\r\n");
                        conn.set_timeout(rt.body_idle_timeout);
                        conn.write_all(&out)
                            .await
                            .map_err(|e| Fail::Abort(format!("client write: {e}")))?;
                        // The wait for the next head is bounded by its own
                        // timeout, not the client's (as before the first).
                        conn.set_deadline(None);
                    }
                }
                Some(NextHead::Final(Err(e)))
                    if retry::may_retry(Fault::Upstream, upstream::retry_of(&e), attempt) =>
                {
                    tracing::info!(upstream = %addr, error = %e, "the app did not process the stream; sending it again");
                    attempt = attempt.again();
                    // In the place the first stream took: one per exchange.
                    let place = Some(_on_conn.1);
                    let retried = req!();
                    let again =
                        upstream::open_stream(core, hop, route, &retried, &id, trace, end, place);
                    (response, up_send, _on_conn, addr) =
                        relay::unless_client_left(again, conn, end, abort)
                            .await
                            .ok_or_else(client_left)??;
                }
                Some(NextHead::Final(Err(e))) => {
                    return Err(upstream::response_failure(core, route, addr, e))
                }
                Some(NextHead::Final(Ok(r))) => break (r, sent),
            }
        }
    };
    if end {
        cbuf.consume(head.head_len);
    }
    upstream::status_in_range(core, route, addr, resp.status())?;
    proxy::note_health(core, route, addr, true);
    core.metrics.upstream_head.observe(sent.elapsed());
    let (mut parts, rbody) = resp.into_parts();
    // Hop-by-hop and withheld fields left out, values trimmed, as on every path.
    super::stream::sanitize_app_fields(&mut parts.headers);
    let status = parts.status.as_u16();
    let length: Option<u64> = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let bodiless = head.method == Method::Head || status == 204 || status == 304;
    let http10 = head.version == Version::Http10;
    let chunked = !bodiless && length.is_none() && !rbody.is_end_stream() && !http10;
    let close_delimited = !bodiless && length.is_none() && !rbody.is_end_stream() && http10;
    let keep_alive = head.keep_alive && !close_delimited && !body_left && !core.draining.get();
    let mut out = Vec::with_capacity(1024);
    status_line(&mut out, status);
    app_fields(&mut out, &parts.headers);
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    } else if let Some(n) = length.filter(|_| status != 204) {
        out.extend_from_slice(b"content-length: ");
        push_u64(&mut out, n);
        out.extend_from_slice(b"\r\n");
    } else if length.is_none() && !bodiless && !close_delimited {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    if let Some(id) = proxy::forwarded_id(core, &id) {
        out.extend_from_slice(b"x-backend-request-id: ");
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    crate::http::encode::Keep::of(!keep_alive, head.version).push_field(&mut out);
    out.extend_from_slice(b"\r\n");
    activity.responded(status);
    conn.set_timeout(rt.body_idle_timeout);
    conn.write_all(&out)
        .await
        .map_err(|e| Fail::Abort(format!("client write: {e}")))?;
    let bytes_out = if bodiless {
        // A HEAD, 204 or 304 answer ends with its head: DATA the app sends after it
        // would be read by the client as the next response on this connection. It
        // is never relayed; the app's stream, if it goes on, is reset.
        if !rbody.is_end_stream() {
            up_send.send_reset(h2::Reason::CANCEL);
        }
        0
    } else {
        let mut sent = 0;
        // A client's end of stream is its leaving unless its body's rest is unread.
        let gone = relay::Gone::on_close(rt.abort_on_client_close && !body_left);
        let relayed = relay_response(
            core, conn, rbody, chunked, length, gone, &mut sent, activity,
        )
        .await;
        if let Err(e) = relayed {
            if close_delimited {
                // The close is the body's only end mark: not for a truncated one.
                conn.reset_on_close();
            }
            return Err(Fail::Cut(retry::Cut {
                reason: e,
                status,
                bytes: (bytes_in, sent),
                upstream: addr,
            }));
        }
        sent
    };
    Ok(Bridged {
        done: Done {
            status,
            bytes_in,
            bytes_out,
            upstream: addr,
        },
        keep_alive,
        body_left,
    })
}

/// An HTTP/1.1 status line with the status's reason.
fn status_line(out: &mut Vec<u8>, status: u16) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_u64(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(crate::http::error::reason(status).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// An HTTP/2 app's head fields (sanitized already, hop-by-hop ones gone) as
/// HTTP/1.1 lines: the app's request ID and `content-length` fields (two equal
/// ones pass `h2`, and `005` would pass as written; a final head gets one
/// canonical value of its own, an interim head none) and the worker's permit
/// cookie left out, cookies host-only.
fn app_fields(out: &mut Vec<u8>, fields: &http::HeaderMap) {
    for (name, value) in fields {
        let n = name.as_str().as_bytes();
        if crate::http::encode::is_request_id_field(n)
            || parse::name_is(n, "content-length")
            || (parse::name_is(n, "set-cookie") && sets_permit_cookie(value.as_bytes()))
        {
            continue;
        }
        let rewritten = crate::http::encode::host_only_field(n, value.as_bytes());
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(rewritten.as_deref().unwrap_or(value.as_bytes()));
        out.extend_from_slice(b"\r\n");
    }
}

/// How a client's body to an HTTP/2 app ended.
enum BodyEnd {
    /// All of it went; with the app's answer when it came meanwhile (a success begun
    /// early: the app read on).
    Whole(Option<http::Response<RecvStream>>),
    /// The app answered before it took all of it: no success (3xx–5xx), or a success
    /// and then the end of its stream. The rest stays unread.
    Answered(http::Response<RecvStream>),
    /// The app failed the stream while it was given the body.
    Failed(h2::Error),
    /// The app sent a head that ends the exchange while it was given the body.
    Refused(upstream::Refusal),
}

/// Reads the client's body (length or chunked) and hands it to the app's stream,
/// counting what it handed on in `total` (and telling `activity`). Each wait, on
/// the client's next bytes or on the app's window, also watches for the app's
/// answer (`response`), as the HTTP/1.1 relay watches an HTTP/1.1 app: an app that
/// refuses the body (413, 401 …) and keeps its stream open without granting more
/// window is answered at once, rather than when the wait times out.
#[allow(clippy::too_many_arguments)]
async fn send_body(
    core: &Core,
    conn: &TcpConn,
    cbuf: &mut ReadBuf,
    framing: BodyFraming,
    up: &mut h2::SendStream<Bytes>,
    response: &mut Answer,
    total: &mut u64,
    activity: &Activity,
) -> Result<BodyEnd, Fail> {
    let rt = &core.rt;
    let upstream_gone =
        |e: String| Fail::Answer(ProxyError::UpstreamClosed(std::io::Error::other(e)));
    // A success that came early: the body goes on, unwatched.
    let mut answered: Option<http::Response<RecvStream>> = None;
    // Races a pinned wait against the app's answer: `Some` when the wait ended
    // first, `None` when a success came (held in `answered`); an answer that ends
    // the request, or a failed stream, ends the body.
    macro_rules! race_answer {
        ($work:expr) => {
            match relay::or_watch($work, || {}, response.past_interim()).await {
                Ok(done) => Some(done),
                Err(Ok(Ok(r))) if r.status().as_u16() >= 300 => {
                    return Ok(BodyEnd::Answered(r));
                }
                Err(Ok(Ok(r))) => {
                    answered = Some(r);
                    None
                }
                Err(Ok(Err(e))) => return Ok(BodyEnd::Failed(e)),
                Err(Err(r)) => return Ok(BodyEnd::Refused(r)),
            }
        };
    }
    // A wait watched for the app's answer until one came, then awaited alone.
    macro_rules! watched {
        ($work:expr) => {{
            let work = $work;
            futures_lite::pin!(work);
            let raced = if answered.is_none() {
                race_answer!(work.as_mut())
            } else {
                None
            };
            match raced {
                Some(done) => done,
                None => work.await,
            }
        }};
    }
    // The app's stream ended while the body was going: after a success it
    // answered, that answer is the exchange's (the app needed no more); otherwise
    // the caller looks for an answer still to come.
    macro_rules! gone {
        ($e:expr) => {{
            let e: String = $e;
            match answered.take() {
                Some(r) => return Ok(BodyEnd::Answered(r)),
                None => upstream_gone(e),
            }
        }};
    }
    let mut body = H1Body::new(framing, ChunkedDecoder::for_request);
    while !body.done() {
        let (data, progressed) = body
            .take(cbuf)
            .map_err(|e| Fail::Answer(ProxyError::Request(RequestError::BadChunk(e))))?;
        if !data.is_empty() {
            let taken = *total + data.len() as u64;
            if rt.max_body > 0 && taken > rt.max_body {
                up.send_reset(h2::Reason::CANCEL);
                return Err(Fail::Answer(ProxyError::Request(
                    RequestError::BodyTooLarge,
                )));
            }
            if let Err(e) = watched!(send_all(core, up, data)) {
                return Err(gone!(e.to_string()));
            }
            // Counted once the app's stream took it (the access line's "given").
            *total = taken;
            activity.moved(core.reactor.now());
        }
        if body.done() || (progressed && !cbuf.is_empty()) {
            continue;
        }
        conn.set_timeout(rt.body_idle_timeout);
        // The client's next bytes, watched as the window is; after a success begun
        // early (then or meanwhile), for the app's end of its stream instead: a
        // reset after its complete answer (gRPC's trailers-only answers do so)
        // makes that answer the exchange's at once, the rest of the body unread,
        // not when the client next sends.
        let mut fill = std::pin::pin!(cbuf.fill(conn, BODY_BUF_LIMIT));
        let filled = if answered.is_none() {
            race_answer!(fill.as_mut())
        } else {
            None
        };
        let filled = match filled {
            Some(filled) => filled,
            None => {
                let reset = std::future::poll_fn(|cx| up.poll_reset(cx));
                match relay::or_watch(fill.as_mut(), || {}, reset).await {
                    Ok(filled) => filled,
                    Err(_) => return Err(gone!("the app reset its stream".to_owned())),
                }
            }
        };
        match filled {
            Ok(0) => {
                up.send_reset(h2::Reason::CANCEL);
                return Err(Fail::Abort(
                    "client closed before the end of its body".into(),
                ));
            }
            Ok(n) => core.metrics.add(crate::core::counter::BYTES_IN, n as u64),
            // A revocation fails the wait as a timeout does: no 408 for that.
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut && !conn.was_revoked() => {
                up.send_reset(h2::Reason::CANCEL);
                return Err(Fail::Answer(ProxyError::Request(if conn.floor_cut() {
                    RequestError::BodyTooSlow
                } else {
                    RequestError::BodyTimeout
                })));
            }
            Err(e) => {
                up.send_reset(h2::Reason::CANCEL);
                return Err(Fail::Abort(format!("client body: {e}")));
            }
        }
    }
    if let Err(e) = up.send_data(Bytes::new(), true) {
        return Err(gone!(e.to_string()));
    }
    Ok(BodyEnd::Whole(answered))
}

/// Relays the app's DATA frames to the client (chunked with the app's trailers, or
/// as is), giving capacity back as the client takes them; `total`: the payload bytes
/// written, however it ends; `activity` is told when.
///
/// While the app is silent (an event stream, a token stream, a stalled download)
/// the client is watched, as the HTTP/1.1 relay watches it (`gone`): a client
/// whose connection was reset (or, with [`relay::Gone::Ended`], that closed) ends
/// the relay at once, and the app's stream is reset as its handles go, rather than
/// both being held for as long as the app may stay silent (`response_idle_secs`).
/// With [`relay::Gone::HungUp`] a client that only ended its side still reads, and
/// keeps its answer.
///
/// An app that sent all of the `length` it announced and then reset its stream
/// with `NO_ERROR` in place of ending it (RFC 9113 §8.1 allows it once the answer
/// is complete) gave the whole answer: it is not a cut, and the client's connection
/// goes on.
#[allow(clippy::too_many_arguments)]
async fn relay_response(
    core: &Core,
    conn: &TcpConn,
    mut body: RecvStream,
    chunked: bool,
    length: Option<u64>,
    gone: relay::Gone,
    total: &mut u64,
    activity: &Activity,
) -> Result<(), String> {
    let rt = &core.rt;
    let mut out = Vec::new();
    loop {
        let next = {
            let data = std::pin::pin!(within(&core.reactor, rt.response_idle_timeout, body.data()));
            // The client's deadline bounds writes to it, set again before each.
            relay::or_watch(data, || conn.set_deadline(None), conn.gone(gone)).await
        };
        let Ok(next) = next else {
            return Err(if conn.was_revoked() {
                "the client's access was revoked".into()
            } else if conn.peer_ended() && !conn.peer_reset() {
                "the client closed its connection while the app was silent".into()
            } else {
                "the client's connection was reset while the app was silent".into()
            });
        };
        let chunk = match next {
            None => return Err("the app sent nothing within the idle timeout".into()),
            Some(None) => break,
            Some(Some(Ok(c))) => c,
            Some(Some(Err(e)))
                if length == Some(*total) && e.reason() == Some(h2::Reason::NO_ERROR) =>
            {
                break
            }
            Some(Some(Err(e))) => return Err(format!("app stream: {e}")),
        };
        *total += chunk.len() as u64;
        conn.set_timeout(rt.body_idle_timeout);
        let wrote = if chunked {
            out.clear();
            encode_chunk(&mut out, &chunk);
            conn.write_all(&out).await
        } else {
            conn.write_all(&chunk).await
        };
        wrote.map_err(|e| format!("client write: {e}"))?;
        activity.sent(core.reactor.now(), chunk.len());
        core.metrics
            .add(crate::core::counter::BYTES_OUT, chunk.len() as u64);
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    if chunked {
        out.clear();
        out.extend_from_slice(b"0\r\n");
        if let Ok(Some(trailers)) = body.trailers().await {
            for (name, value) in &trailers {
                let n = name.as_str().as_bytes();
                if crate::http::chunked::trailer_verdict(n)
                    != crate::http::chunked::TrailerVerdict::Keep
                {
                    continue;
                }
                out.extend_from_slice(n);
                out.extend_from_slice(b": ");
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        out.extend_from_slice(b"\r\n");
        conn.set_timeout(rt.body_idle_timeout);
        conn.write_all(&out)
            .await
            .map_err(|e| format!("client write: {e}"))?;
    }
    Ok(())
}
