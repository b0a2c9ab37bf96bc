//! The worker API port (`[worker] api_port`): `GET /setup?token=…`, which validates
//! the coordinator's HS256 token, sets the `appproxy_permit` cookie exactly as the
//! original computes it and redirects to the circuit; `GET /status`; and the
//! original's probes there (`/`, `/health`, `/livez`, `/readyz`, `/health/livez`,
//! `/health/readyz`), so an orchestrator's checks written for it keep working. The
//! admin endpoint (`[admin] bind`) answers them too, with the stalled cores.
//!
//! One request per connection (`Connection: close`): these are browser redirects, not
//! a hot path. `HEAD` is answered as `GET` is, without the body (RFC 9110 §9.3.2);
//! another method gets 405 with `Allow`. A request that sent more than its head (a
//! body, a second request) is closed through the lingering close, so its answer is
//! not destroyed by a reset.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;

use appproxy_shared::model::{AppMode, FrontendMode, ProxyProtocol};
use appproxy_shared::{scope_traced, RequestId};

use crate::core::access_log::AccessEntry;
use crate::core::{Core, Route};
use crate::http::encode;
use crate::http::parse::{self, BodyFraming, Method};
use crate::io::TcpConn;
use crate::readiness::PROBES;
use crate::relay::ReadBuf;

/// Serves one API connection.
pub async fn serve(core: Rc<Core>, conn: TcpConn, peer: SocketAddr) {
    let mut buf = ReadBuf::new(8 * 1024);
    let limit = core.rt.head_limits.max_request_line + core.rt.head_limits.max_header_bytes + 4;
    // The head timeout from the accept: a TLS handshake took part of it (one
    // timeout through both, as on the frontends).
    conn.set_timeout_within(core.rt.head_timeout);
    let head = loop {
        match parse::parse_request(buf.filled(), &core.rt.head_limits) {
            Ok(Some(h)) => break h,
            Ok(None) => {}
            Err(e) => {
                // The client's own ID when its head carried a valid one, as on the
                // frontends.
                let refused = parse::RefusedHead::read(buf.filled());
                let id = refused.id_or(core.rt.id_version);
                let span = refused.span(core.rt.trace_context, &id);
                let mut out = Vec::new();
                // A HEAD refused before its head was whole gets no body either.
                let bodiless = parse::is_head_request(buf.filled());
                let (status, code) = (e.status(), e.code());
                encode::error_response(
                    &mut out,
                    status,
                    code,
                    &e.to_string(),
                    &id,
                    encode::Keep::Close,
                    bodiless,
                );
                let sent = conn.write_all(&out).await.is_ok();
                scope_traced(Some(id), span, async {
                    tracing::info!(error = %e, "api request refused");
                    let bytes_out = if sent { out.len() as u64 } else { 0 };
                    core.record(&AccessEntry::unread(&id, peer.ip(), status, bytes_out));
                })
                .await;
                if sent {
                    // The rest of the head, or more, may still be on its way.
                    crate::proxy::lingering_close(&core, &conn, buf.scratch(), true).await;
                }
                return;
            }
        }
        match buf.fill(&conn, limit).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    };
    // As on the frontends, a request's time is from its head's completion.
    let started = std::time::Instant::now();
    let bytes = buf.filled();
    // The ID and, with `[tracing] trace_context`, the hop's trace position, as on
    // the frontends: `/setup` is the step between the manager's creation and the
    // app's first request.
    let (id, trace) = crate::proxy::exchange::identify(&core, bytes, &head);
    let span = trace.map(|t| t.span);
    let (out, status, probed, route) = scope_traced(Some(id), span, async {
        if let Some(t) = &trace {
            t.log_rejection();
        }
        respond(&core, bytes, &head, &id)
    })
    .await;
    // What the client sent past its head is never read: a body, or a request behind.
    let unread = bytes.len() > head.head_len
        || matches!(head.framing, BodyFraming::Chunked)
        || matches!(head.framing, BodyFraming::Length(n) if n > 0);
    conn.set_timeout(core.rt.body_idle_timeout);
    let sent = conn.write_all(&out).await.is_ok();
    let path = &bytes[head.target.clone()];
    // Probes come every few seconds from each checker: their lines are at debug
    // (`respond`). Every other request has its access line (the query, which holds
    // the `/setup` token, is left out as on every line).
    if !probed {
        scope_traced(Some(id), span, async {
            core.record(&AccessEntry {
                request_id: &id,
                // The circuit a `/setup` token named, found here: its line says
                // whose app it was for.
                circuit: route.as_deref().map(|r| &r.circuit.circuit),
                client: Some(peer.ip()),
                method: bytes[..head.target.start].trim_ascii(),
                path,
                status,
                bytes_in: head.head_len as u64,
                bytes_out: if sent { out.len() as u64 } else { 0 },
                upstream: None,
                started,
            })
        })
        .await;
    }
    if sent && unread {
        crate::proxy::lingering_close(&core, &conn, buf.scratch(), true).await;
    }
}

/// A response of the API port.
struct Answer {
    status: u16,
    extra_headers: String,
    content_type: &'static str,
    body: String,
    /// The circuit the request named (a `/setup` token's, once found), for its
    /// access line.
    route: Option<Rc<Route>>,
}

/// A probe's answer, as the admin endpoint's: liveness, no core stalled (this one
/// answers; another that holds waiting work without turning makes every probe 503
/// `stalled`, not only the share `SO_REUSEPORT` sends to it, which would time out);
/// readiness (`/readyz`): alive, serving the circuits it is meant to, and not
/// stopping, else 503 naming why ([`crate::readiness::verdict`]).
fn probe(core: &Core, path: &str) -> Answer {
    let state = core.readiness.state();
    let stalled = core.liveness.looks_stalled();
    let (ok, word) = crate::readiness::verdict(path, &stalled, state);
    let status = if ok { 200 } else { 503 };
    Answer {
        status,
        extra_headers: String::new(),
        content_type: "application/json",
        route: None,
        body: format!(
            "{{\"status\":\"{word}\",\"ready\":\"{}\",\"component\":\"appproxy-worker\",\"version\":\"{}\",\"stalled_cores\":{stalled:?}}}",
            state.as_str(),
            env!("CARGO_PKG_VERSION"),
        ),
    }
}

/// A refusal of the API port, logged with why (a `/setup` refused is where "I
/// cannot get into my app" fails: the line says which token check it failed).
fn json_error(status: u16, code: &str, message: &str, id: &RequestId) -> Answer {
    tracing::info!(status, code, error = message, "api request refused");
    let mut body = String::from("{\"error\":\"");
    appproxy_shared::telemetry::push_json_escaped(&mut body, message);
    let _ = write!(body, "\",\"code\":\"{code}\",\"request_id\":\"{id}\"}}");
    Answer {
        status,
        extra_headers: String::new(),
        content_type: "application/json",
        body,
        route: None,
    }
}

/// The answer to the request `head` (in `buf`) under `id`, its status, whether it
/// was a probe's, and the circuit it named.
fn respond(
    core: &Core,
    buf: &[u8],
    head: &parse::RequestHead,
    id: &RequestId,
) -> (Vec<u8>, u16, bool, Option<Rc<Route>>) {
    let target = String::from_utf8_lossy(&buf[head.target.clone()]).into_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let answer = match (head.method, path) {
        (Method::Get | Method::Head, "/setup") => setup(core, query, id),
        (Method::Get | Method::Head, "/status") => Answer {
            status: 200,
            extra_headers: String::new(),
            content_type: "application/json",
            body: "{\"api_version\":\"v2\"}".into(),
            route: None,
        },
        (Method::Get | Method::Head, p) if PROBES.contains(&p) => probe(core, path),
        (Method::Get | Method::Head, _) => json_error(404, "not_found", "no such endpoint", id),
        _ => {
            let mut a = json_error(405, "method_not_allowed", "method not allowed", id);
            a.extra_headers.push_str("Allow: GET, HEAD\r\n");
            a
        }
    };
    // HEAD: the head a GET gets, Content-Length naming its body, and no body.
    let body = if head.method == Method::Head {
        ""
    } else {
        answer.body.as_str()
    };
    // Probes come every few seconds from each checker: logged only at debug (the
    // others get their access lines).
    let probed = PROBES.contains(&path);
    if probed {
        tracing::debug!(path, status = answer.status, "api request");
    }
    let mut out = String::with_capacity(512 + answer.body.len());
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nX-Backend-Request-ID: {id}\r\nAccess-Control-Allow-Origin: *\r\nAccess-Control-Allow-Headers: *\r\nAccess-Control-Expose-Headers: *\r\nCache-Control: no-store\r\nConnection: close\r\n{}\r\n{}",
        answer.status,
        reason(answer.status),
        answer.content_type,
        answer.body.len(),
        answer.extra_headers,
        body
    );
    (out.into_bytes(), answer.status, probed, answer.route)
}

fn reason(status: u16) -> &'static str {
    match status {
        302 => "Found",
        s => crate::http::error::reason(s),
    }
}

/// Percent-decodes a query value (tokens are URL-safe, but clients may escape them).
fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn find_circuit(core: &Core, circuit: &uuid::Uuid) -> Option<Rc<Route>> {
    core.routes.borrow().get(circuit)
}

fn setup(core: &Core, query: &str, id: &RequestId) -> Answer {
    let token = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "token")
        .map(|(_, v)| percent_decode(v));
    let Some(token) = token else {
        return json_error(400, "E20006", "token missing", id);
    };
    let Some(secret) = core.rt.secrets.jwt_secret.as_deref() else {
        return json_error(503, "E20006", "no jwt_secret configured on this worker", id);
    };
    let claims = match crate::auth::verify_hs256(token.as_bytes(), secret) {
        Ok(c) => c,
        Err(r) => return json_error(r.status, r.code, r.message, id),
    };
    let circuit_id = claims
        .get("circuit")
        .and_then(|v| v.as_str())
        .and_then(|s| uuid::Uuid::parse_str(s).ok());
    let Some(route) = circuit_id.and_then(|c| find_circuit(core, &c)) else {
        return json_error(404, "unknown_circuit", "no such circuit on this worker", id);
    };
    let mut answer = setup_circuit(core, &route, &claims, &token, id);
    answer.route = Some(route);
    answer
}

/// `/setup` for the circuit `route` its verified token (`claims`) names.
fn setup_circuit(
    core: &Core,
    route: &Route,
    claims: &serde_json::Map<String, serde_json::Value>,
    token: &str,
    id: &RequestId,
) -> Answer {
    let circuit = &route.circuit.circuit;
    if circuit.app_mode == AppMode::Inference {
        return json_error(400, "E20011", "Not supported for inference apps", id);
    }
    let redirect = claims
        .get("redirect")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let scheme = if core.rt.tls_advertised {
        "https"
    } else {
        "http"
    };
    let (host, port) = match (&route.circuit.frontend, &core.rt.wildcard) {
        (crate::config::Frontend::Subdomain(sub), Some(w)) => {
            (format!("{sub}{}", w.domain), w.port)
        }
        (crate::config::Frontend::Port(p), _) => (core.rt.advertised_host.clone(), *p),
        (crate::config::Frontend::Subdomain(_), None) => {
            return json_error(
                500,
                "internal",
                "wildcard circuit without a wildcard frontend",
                id,
            )
        }
    };
    match circuit.protocol {
        ProxyProtocol::Http | ProxyProtocol::Preopen => {
            let path = if redirect.starts_with('/') {
                redirect.to_owned()
            } else {
                format!("/{redirect}")
            };
            let location = format!("{scheme}://{host}:{port}{path}");
            let mut extra = String::new();
            if location.bytes().all(|b| b.is_ascii_graphic()) {
                let _ = write!(extra, "Location: {location}\r\n");
            } else {
                return json_error(400, "E20006", "redirect is not a valid path", id);
            }
            if let (Some(permit_secret), Some(user)) =
                (&core.rt.secrets.permit_secret, &circuit.user_id)
            {
                let value =
                    crate::auth::permit_value(permit_secret, user, core.rt.secrets.permit_digest);
                let name = crate::http::encode::permit_cookie_name(user);
                let _ = write!(extra, "Set-Cookie: {name}=\"{value}\"; HttpOnly; Max-Age=604800; Path=/; SameSite=Lax");
                if core.rt.tls_advertised {
                    extra.push_str("; Secure");
                }
                if circuit.frontend_mode == FrontendMode::Wildcard {
                    if let Some(w) = &core.rt.wildcard {
                        let _ = write!(extra, "; Domain={}", w.domain);
                    }
                }
                extra.push_str("\r\n");
            }
            Answer {
                status: 302,
                extra_headers: extra,
                content_type: "application/json",
                body: "{}".into(),
                route: None,
            }
        }
        ProxyProtocol::Tcp => {
            // The worker's own TLS wraps TCP circuits too: the local client unwraps it.
            let gateway = if core.rt.tls.is_some() { "tls" } else { "tcp" };
            let url = format!(
                "http://localhost:45678/start?directTCP=true&auth={token}&proto=tcp&gateway={gateway}://{host}:{port}"
            );
            if redirect.is_empty() {
                let mut body = String::from("{\"redirect\":\"");
                appproxy_shared::telemetry::push_json_escaped(&mut body, &url);
                body.push_str("\",\"redirectURI\":\"");
                appproxy_shared::telemetry::push_json_escaped(&mut body, &url);
                body.push_str("\"}");
                Answer {
                    status: 200,
                    extra_headers: String::new(),
                    content_type: "application/json",
                    body,
                    route: None,
                }
            } else {
                Answer {
                    status: 302,
                    extra_headers: format!("Location: {url}\r\n"),
                    content_type: "application/json",
                    body: "{}".into(),
                    route: None,
                }
            }
        }
        _ => json_error(400, "E20002", "unsupported protocol", id),
    }
}
