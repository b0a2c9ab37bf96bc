//! Hostile suite, smuggling class: every request-smuggling and framing vector of the
//! worker-hardening issue, against a lenient app that accepts bare LF (which is what
//! makes smuggling visible), plus the canonical re-encoding of chunked bodies both
//! ways and the replacement of spoofable client-address headers.

mod common;
mod lenient;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Client, Worker, WorkerOpts};
use lenient::LenientApp;

fn worker_for(app: &LenientApp) -> Worker {
    Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        ..Default::default()
    })
}

/// Sends a chunked request whose body is `body` and expects a 400 JSON `bad_chunk`
/// answer followed by the connection closing.
fn refused_with_bad_chunk(w: &Worker, method: &str, body: &[u8]) {
    let mut c = Client::connect(w.addr());
    let mut req =
        format!("{method} /victim HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
            .into_bytes();
    req.extend_from_slice(body);
    c.send(&req);
    let r = c.response();
    assert_eq!(
        r.status,
        400,
        "{:?}: {}",
        String::from_utf8_lossy(body),
        r.text()
    );
    let v = r.json();
    assert_eq!(v["code"], "bad_chunk", "{v}");
    assert!(r.header("x-backend-request-id").is_some());
    assert_eq!(
        v["request_id"],
        r.header("x-backend-request-id").unwrap_or_default()
    );
    assert!(c.is_closed(), "a framing error closes the connection");
}

/// After an attack: a fresh client, possibly on the pooled app connection, gets its
/// own response and the app never saw `/smuggled`.
fn next_user_is_safe(w: &Worker, app: &LenientApp) {
    let mut c = Client::connect(w.addr());
    let r = c.get("/next-user", "");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-attacker"),
        None,
        "poisoned response: {}",
        r.text()
    );
    assert_eq!(r.json()["path"], "/next-user");
    assert!(
        !app.saw_path("/smuggled"),
        "smuggled request reached the app: {:?}",
        app.seen()
    );
}

#[test]
fn bare_lf_after_last_chunk_does_not_smuggle() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    refused_with_bad_chunk(
        &w,
        "POST",
        b"0\r\n\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    next_user_is_safe(&w, &app);
}

#[test]
fn bare_lf_inside_trailers_does_not_smuggle() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    refused_with_bad_chunk(
        &w,
        "POST",
        b"5\r\nhello\r\n0\r\nX-A: 1\n\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    refused_with_bad_chunk(
        &w,
        "POST",
        b"0\r\nX-A: 1\r\n\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    next_user_is_safe(&w, &app);
}

#[test]
fn trailer_line_without_colon_is_refused() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    refused_with_bad_chunk(&w, "POST", b"0\r\nX-No-Colon\r\n\r\n");
    refused_with_bad_chunk(
        &w,
        "POST",
        b"0\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    next_user_is_safe(&w, &app);
}

#[test]
fn nul_in_trailer_section_is_refused() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    refused_with_bad_chunk(&w, "POST", b"0\r\nX-A: a\0b\r\n\r\n");
    refused_with_bad_chunk(
        &w,
        "POST",
        b"0\r\n\0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    next_user_is_safe(&w, &app);
}

#[test]
fn forbidden_trailer_fields_are_refused_and_never_forwarded() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    for field in [
        "Content-Length: 5",
        "Transfer-Encoding: chunked",
        "Host: evil.example",
        "Authorization: Bearer stolen",
        "Cookie: s=1",
        "X-Forwarded-For: 6.6.6.6",
        "X-Real-IP: 6.6.6.6",
        "Connection: close",
    ] {
        refused_with_bad_chunk(
            &w,
            "POST",
            format!("3\r\nabc\r\n0\r\n{field}\r\n\r\n").as_bytes(),
        );
    }
    for s in app.seen() {
        assert!(
            s.trailers.is_empty(),
            "a forbidden trailer reached the app: {s:?}"
        );
    }
    next_user_is_safe(&w, &app);
}

/// A bare LF ends a line for httparse (RFC 9112 §2.2 allows it) but not for a peer
/// in front of the worker that keeps it inside a field's value: there
/// `X: y\nContent-Length: 35` is one field, the POST has no body, and its body is
/// a request of its own, which the worker would take in as the POST's body. Every
/// head with a bare LF is refused, and nothing of it reaches the app.
#[test]
fn a_bare_lf_anywhere_in_a_request_head_is_refused() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let heads = [
        format!(
            "POST /a HTTP/1.1\r\nHost: a\r\nX: y\nContent-Length: {}\r\n\r\n",
            smuggled.len()
        ),
        "POST /a HTTP/1.1\nHost: a\r\nContent-Length: 0\r\n\r\n".to_owned(),
        "POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\n".to_owned(),
        "POST /a HTTP/1.1\nHost: a\nContent-Length: 0\n\n".to_owned(),
        "\nPOST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n".to_owned(),
    ];
    for head in heads {
        let mut c = Client::connect(w.addr());
        c.send(format!("{head}{smuggled}").as_bytes());
        let r = c.response();
        assert_eq!(r.status, 400, "{head:?}: {}", r.text());
        assert_eq!(r.json()["code"], "malformed_request", "{head:?}");
        assert!(c.is_closed(), "{head:?}: the connection goes on");
    }
    next_user_is_safe(&w, &app);
    assert!(
        !app.saw_path("/a"),
        "a refused head reached the app: {:?}",
        app.seen()
    );
}

/// A head refused before it was parsed whole (framing in doubt, two `Host` fields, a
/// bare LF, too large) is answered under the request ID the client sent, when a
/// valid one is among the lines read: the client and the access line name the same
/// request. An invalid one is replaced, as always. Its access line is in the
/// client's trace when one valid `traceparent` was among the lines read (a child of
/// it, as for any request), else in a trace of its own; before, it had no trace at
/// all, and the client's trace lost the refused request.
#[test]
fn a_refused_head_answers_under_the_clients_request_id() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    let pad = "a".repeat(17_000);
    const TP: &str = "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n";
    let heads = [
        ("id-clte", format!("POST /a HTTP/1.1\r\nHost: a\r\nX-Backend-Request-ID: id-clte\r\n{TP}Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), 400, true),
        ("id-hosts", "GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\nX-Request-ID: id-hosts\r\n\r\n".to_owned(), 400, false),
        ("id-lf", "GET /a HTTP/1.1\r\nX-Backend-Request-ID: id-lf\nHost: a\r\n\r\n".to_owned(), 400, false),
        ("id-big", format!("GET /a HTTP/1.1\r\nHost: a\r\nX-Backend-Request-ID: id-big\r\n{TP}X-Pad: {pad}\r\n\r\n"), 431, true),
        // Two lines: neither counts, as for a parsed head.
        ("id-two", format!("GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\nX-Backend-Request-ID: id-two\r\n{TP}{TP}\r\n"), 400, false),
    ];
    for (id, head, status, in_trace) in heads {
        let mut c = Client::connect(w.addr());
        c.send(head.as_bytes());
        let r = c.response();
        assert_eq!(r.status, status, "{id}: {}", r.text());
        assert_eq!(r.header("X-Backend-Request-ID"), Some(id), "{id}");
        assert_eq!(r.json()["request_id"], id, "{id}: {}", r.text());
        let line = w.wait_access_line(id);
        assert_eq!(line["status"], status, "{id}");
        let trace = line["trace_id"].as_str().expect("a trace");
        assert_eq!(trace.len(), 32, "{line}");
        assert_eq!(
            trace == "0af7651916cd43dd8448eb211c80319c",
            in_trace,
            "{id}: {line}"
        );
        assert_eq!(
            line["parent_span_id"] == "b7ad6b7169203331",
            in_trace,
            "{id}: {line}"
        );
    }
    // Not a valid ID: replaced by one of the worker's.
    let mut c = Client::connect(w.addr());
    c.send(b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\nX-Backend-Request-ID: not valid\r\n\r\n");
    let r = c.response();
    assert_eq!(r.status, 400);
    let given = r.header("X-Backend-Request-ID").expect("an ID").to_owned();
    assert!(uuid::Uuid::parse_str(&given).is_ok(), "{given}");
    assert!(
        !app.saw_path("/a"),
        "a refused head reached the app: {:?}",
        app.seen()
    );
}

#[test]
fn options_with_a_smuggled_delete_is_refused() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    refused_with_bad_chunk(
        &w,
        "OPTIONS",
        b"0\r\n\nDELETE /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    next_user_is_safe(&w, &app);
}

#[test]
fn chunked_request_reaches_the_app_canonically() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    let mut c = Client::connect(w.addr());
    c.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=\"x\"\r\nhello\r\n000007\r\n, world\r\n0\r\nX-Sum: 42\r\nContent-Type: ignored\r\n\r\n");
    let r = c.response();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_len"], 12);
    let seen = app.request("/upload");
    let raw = String::from_utf8_lossy(&seen.raw).into_owned();
    let (_, body) = raw.split_once("\r\n\r\n").expect("head");
    assert_eq!(
        canonical_chunks(body),
        ("hello, world".to_owned(), "X-Sum: 42\r\n".to_owned()),
        "chunk sizes canonical, extensions and disallowed trailers gone: {body:?}"
    );
    assert_eq!(seen.body, b"hello, world");
    // The connection stays usable.
    assert_eq!(c.get("/after", "").json()["path"], "/after");
}

#[test]
fn chunked_response_reaches_the_client_canonically() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(b"GET /chunked-trailers HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read to close");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").expect("head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert_eq!(
        canonical_chunks(body),
        ("hello world".to_owned(), "X-Sum: 42\r\n".to_owned()),
        "re-encoded, forbidden trailers dropped: {body:?}"
    );
}

/// The payload and trailer section of a chunked body whose every size line is
/// canonical: lowercase hex without leading zeros or extensions, CRLF everywhere,
/// and the body ends where the text does. Where the proxy cuts its chunks (one per
/// read, payload runs of a read together) is its own business.
fn canonical_chunks(body: &str) -> (String, String) {
    let mut payload = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n").expect("a size line");
        assert!(
            !size.is_empty()
                && size
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                && (size == "0" || !size.starts_with('0')),
            "size line {size:?} in {body:?}"
        );
        let n = usize::from_str_radix(size, 16).expect("hex");
        if n == 0 {
            let trailers = after.strip_suffix("\r\n").expect("the final CRLF");
            return (payload, trailers.to_owned());
        }
        payload.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").expect("CRLF after data");
    }
}

#[test]
fn malformed_chunked_response_trailers_never_reach_the_client() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(b"GET /trailer-lf HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw).into_owned();
    // Either the head and part of the body then a close (no last chunk), or a 502:
    // never the injected second response.
    assert_eq!(raw.matches("HTTP/1.1 ").count(), 1, "{raw}");
    assert!(
        !raw.contains("0\r\n\r\n"),
        "the body must not look complete: {raw}"
    );
}

#[test]
fn upstream_bad_chunk_size_before_anything_is_a_502() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    let mut c = Client::connect(w.addr());
    let r = c.get("/bad-chunk", "");
    assert_eq!(r.status, 502, "{}", r.text());
    let v = r.json();
    assert_eq!(v["code"], "upstream_invalid_response", "{v}");
    assert_eq!(
        v["request_id"],
        r.header("x-backend-request-id").unwrap_or_default()
    );
    // The client connection is still good.
    assert_eq!(c.get("/again", "").json()["path"], "/again");
}

#[test]
fn a_reason_phrase_with_obs_text_is_relayed_without_it() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    let mut c = Client::connect(w.addr());
    let r = c.get("/obs-reason", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ok");
    assert_eq!(c.get("/after", "").json()["path"], "/after");
}

#[test]
fn http10_without_host_reaches_the_app_with_one() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    let mut c = Client::connect(w.addr());
    c.send(b"GET /old HTTP/1.0\r\n\r\n");
    let r = c.response();
    assert_eq!(r.status, 200);
    let seen = app.request("/old");
    assert_eq!(seen.version, "HTTP/1.1");
    assert_eq!(seen.header("host"), Some(app.addr.to_string().as_str()));
    let hosts = seen
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("host"))
        .count();
    assert_eq!(hosts, 1);
}

/// The worker routes and checks access by `Host`; an absolute-form target naming
/// another authority would reach an app that reads it as a request for something
/// else than what was routed. It is refused; one naming the `Host` itself (which a
/// server must accept) reaches the app in origin-form; bare targets are refused.
#[test]
fn request_targets_reach_the_app_in_origin_form_or_not_at_all() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    for (target, host) in [
        ("http://elsewhere.example/stolen", "t"),
        ("stolen", "t"),
        ("http://t", "t"),
        ("/stolen#fragment", "t"),
        ("/stolen?q=1#fragment", "t"),
    ] {
        let mut c = Client::connect(w.addr());
        c.send(format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
        let r = c.response();
        assert_eq!(r.status, 400, "{target}: {}", r.text());
        assert_eq!(r.json()["code"], "malformed_request", "{target}");
    }
    let mut c = Client::connect(w.addr());
    c.send(b"GET HTTP://T/kept?q=1 HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.response();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/kept?q=1");
    assert!(
        app.seen().iter().all(|s| !s.path.contains("stolen")),
        "{:?}",
        app.seen()
    );
    assert_eq!(app.request("/kept?q=1").method, "GET");
}

/// A `Host` that is not an authority is a 400 (RFC 9112 §3.2), not a value copied
/// to the app and into `X-Forwarded-Host`; the connection closes, and the app sees
/// none of them.
#[test]
fn a_host_that_is_not_an_authority_never_reaches_the_app() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    for host in [
        "a b@c/d", "user@t", "t/stolen", "t:99999", "t:80:80", "t\\x",
    ] {
        let mut c = Client::connect(w.addr());
        c.send(format!("GET /stolen HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
        let r = c.response();
        assert_eq!(r.status, 400, "{host}: {}", r.text());
        assert_eq!(r.json()["code"], "bad_host", "{host}");
        assert!(c.is_closed(), "{host}: the connection closes");
    }
    let mut c = Client::connect(w.addr());
    let r = c.get("/kept", "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        app.seen().iter().all(|s| !s.path.contains("stolen")),
        "{:?}",
        app.seen()
    );
}

#[test]
fn spoofable_client_address_headers_are_replaced() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    let mut c = Client::connect(w.addr());
    let r = c.get(
        "/who",
        "X-Real-IP: 6.6.6.6\r\nX-Client-IP: 6.6.6.6\r\nTrue-Client-IP: 6.6.6.6\r\nCF-Connecting-IP: 6.6.6.6\r\nClient-IP: 6.6.6.6\r\nX-Cluster-Client-IP: 6.6.6.6\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n",
    );
    assert_eq!(r.status, 200);
    let seen = app.request("/who");
    for (n, v) in &seen.headers {
        assert!(!v.contains("6.6.6.6"), "{n}: {v} reached the app");
    }
    assert_eq!(seen.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
}

/// Fields named with `_` where a client-address, forwarding, request-ID or
/// method-override name has `-` never reach the app: CGI-style servers (WSGI, Rack,
/// PHP) read `X_Real_IP` as `X-Real-IP`, so it would sit beside, or be joined to, the
/// worker's own value. Before, all of these reached the app as sent. Other names with
/// `_` still go on.
#[test]
fn underscored_spellings_of_the_workers_fields_never_reach_the_app() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    let mut c = Client::connect(w.addr());
    let r = c.get(
        "/who",
        "X_Real_IP: 6.6.6.6\r\nX_Forwarded_For: 6.6.6.6\r\nTrue_Client_IP: 6.6.6.6\r\nX_Forwarded_Proto: 6.6.6.6\r\nx_forwarded_host: 6.6.6.6\r\nX_HTTP_Method_Override: 6.6.6.6\r\nX_Backend_Request_ID: 6.6.6.6\r\nMy_Own_Field: kept\r\n",
    );
    assert_eq!(r.status, 200);
    let seen = app.request("/who");
    for (n, v) in &seen.headers {
        assert!(!v.contains("6.6.6.6"), "{n}: {v} reached the app");
    }
    assert_eq!(seen.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(seen.header("my_own_field"), Some("kept"));
}
