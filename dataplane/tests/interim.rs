//! Hostile suite, interim-response class: an app flooding 1xx responses gets at most
//! a few through before the exchange is ended, and an HTTP/1.0 client never gets a
//! 1xx at all.

mod common;
mod lenient;

use std::io::{BufRead, Read, Write};
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

/// Sends `req` and reads everything until the worker closes the connection.
fn exchange_to_close(w: &Worker, req: &[u8]) -> String {
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(req).expect("send");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw).into_owned()
}

#[test]
fn a_few_interim_responses_are_relayed_to_http11() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    let mut c = Client::connect(w.addr());
    c.send(b"GET /interim?n=2 HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: interim-1\r\n\r\n");
    for _ in 0..2 {
        let (status, headers) = c.head();
        assert_eq!(status, 103);
        assert!(headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("link")));
        // Sanitized as a final head: the app plants neither the worker's permit
        // cookie nor a request ID of its own, under any of the ID's names; the
        // worker's ID is there, once (a client that stops at a 1xx has it to quote).
        assert!(
            !headers
                .iter()
                .any(|(n, v)| n.eq_ignore_ascii_case("set-cookie")
                    || n.eq_ignore_ascii_case("x-request-id")
                    || n.eq_ignore_ascii_case("x-backendai-requestid")
                    || v.contains("planted")
                    || v.contains("spoofed-by-app")),
            "{headers:?}"
        );
        let ids: Vec<&str> = headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("x-backend-request-id"))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(ids, vec!["interim-1"], "{headers:?}");
    }
    let r = c.response();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "final");
    // The final head carries the worker's ID only.
    for name in ["x-request-id", "x-backendai-requestid"] {
        assert_eq!(r.header(name), None, "{name}: {:?}", r.headers);
    }
    assert_eq!(r.headers_named("x-backend-request-id").len(), 1);
    // Keep-alive goes on.
    assert_eq!(c.get("/after", "").json()["path"], "/after");
}

#[test]
fn an_interim_flood_is_cut_after_a_few() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    let raw = exchange_to_close(
        &w,
        b"GET /interim?n=20000 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    let interim = raw.matches("HTTP/1.1 103").count();
    assert!(
        (1..=5).contains(&interim),
        "{interim} interim responses relayed"
    );
    assert!(!raw.contains("final"), "the app's answer is not relayed");
    // Interim heads commit to nothing: a final answer follows them.
    let last = &raw[raw.rfind("HTTP/1.1 ").expect("a head")..];
    assert!(last.starts_with("HTTP/1.1 502 "), "{raw}");
    assert!(
        last.contains("\"code\":\"upstream_invalid_response\""),
        "{raw}"
    );
    // The worker is fine for the next client.
    let mut c = Client::connect(w.addr());
    assert_eq!(c.get("/next", "").json()["path"], "/next");
}

/// An app that fails after an interim head (it closes) gets its client a final
/// answer all the same: interim heads commit to nothing. Before, the client got the
/// 103 and then the end of its connection.
#[test]
fn an_app_failing_after_an_interim_head_is_a_final_502() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    let mut c = Client::connect(w.addr());
    c.send(b"GET /interim-then-close HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.response();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.text().contains("\"code\":\"upstream_closed\""),
        "{}",
        r.text()
    );
    // The client's connection goes on.
    assert_eq!(c.get("/after", "").json()["path"], "/after");
}

/// Whatever ends an exchange after interim heads went out, the client gets a
/// final answer (a 502: interim heads commit to nothing), and the access line's
/// `bytes_out` is every byte it was sent, the interim heads too. Before, a final
/// head whose chunked body broke before its first byte ended the connection
/// after the 103 with no answer, and the line of a 502 after interim heads
/// counted the 502 alone (an outside tester's find: 295 bytes logged of 583
/// sent).
#[test]
fn after_interim_heads_a_failure_is_a_502_and_every_byte_sent_is_counted() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    for (path, id, code) in [
        ("/interim-then-close", "interim-bytes-1", "upstream_closed"),
        (
            "/interim?n=20000",
            "interim-bytes-2",
            "upstream_invalid_response",
        ),
        (
            "/interim-then-bad-chunk",
            "interim-bytes-3",
            "upstream_invalid_response",
        ),
    ] {
        let raw = exchange_to_close(
            &w,
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: {id}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        assert!(raw.starts_with("HTTP/1.1 103 "), "{path}: {raw}");
        let last = &raw[raw.rfind("HTTP/1.1 ").expect("a head")..];
        assert!(last.starts_with("HTTP/1.1 502 "), "{path}: {raw}");
        assert!(
            last.contains(&format!("\"code\":\"{code}\"")),
            "{path}: {raw}"
        );
        let line = w.wait_access_line(id);
        assert_eq!(line["status"], 502, "{path}: {line}");
        assert_eq!(line["bytes_out"], raw.len() as u64, "{path}: {line}");
    }
}

#[test]
fn http10_clients_get_no_interim_responses() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    let mut c = Client::connect(w.addr());
    c.send(b"GET /interim?n=3 HTTP/1.0\r\n\r\n");
    let mut first = String::new();
    c.reader.read_line(&mut first).expect("status line");
    assert!(first.starts_with("HTTP/1.1 200"), "first line {first:?}");
    let mut rest = Vec::new();
    c.reader.read_to_end(&mut rest).expect("to close");
    let rest = String::from_utf8_lossy(&rest);
    assert!(!rest.contains(" 103 "), "{rest}");
    assert!(rest.ends_with("final"), "{rest}");
}

#[test]
fn an_interim_flood_to_http10_is_a_502() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    let raw = exchange_to_close(&w, b"GET /interim?n=20000 HTTP/1.0\r\n\r\n");
    assert!(raw.starts_with("HTTP/1.1 502 "), "{raw}");
    assert!(!raw.contains(" 103 "), "{raw}");
    assert!(
        raw.contains("\"code\":\"upstream_invalid_response\""),
        "{raw}"
    );
}

/// The worker's own answer to an HTTP/1.0 client whose connection goes on says
/// `Connection: keep-alive`, as a relayed answer does: without it the client takes
/// the connection to end with the answer (and the worker waits the idle timeout on
/// a connection its client left). Before, the 502 said nothing.
#[test]
fn an_http10_keep_alive_client_is_told_its_connection_goes_on_after_a_refusal() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    let mut c = Client::connect(w.addr());
    c.send(b"GET /interim?n=20000 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    let r = c.response();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        r.header("connection"),
        Some("keep-alive"),
        "{:?}",
        r.headers
    );
    c.send(b"GET /after HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    let r = c.response();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("connection"),
        Some("keep-alive"),
        "{:?}",
        r.headers
    );
    // Without keep-alive, the refusal closes the connection, and says so.
    let raw = exchange_to_close(&w, b"GET /interim?n=20000 HTTP/1.0\r\n\r\n");
    assert!(raw.contains("\r\nConnection: close\r\n"), "{raw}");
}

/// RFC 9110 §10.1.1: an HTTP/1.0 request's `Expect: 100-continue` is ignored. The
/// worker's own `100 Continue` is an interim response too: an HTTP/1.0 client never
/// gets it (a 1.0 peer would take it for the final answer); the worker waits for
/// the body as for any request, then answers once.
#[test]
fn an_http10_client_expecting_100_continue_gets_no_interim_response() {
    let app = LenientApp::start();
    let w = worker_for(&app);
    let mut c = Client::connect(w.addr());
    c.send(b"POST /upload HTTP/1.0\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    assert!(
        !common::answered_within(&c.stream, Duration::from_millis(500)),
        "nothing is sent before the body"
    );
    c.send(b"hello");
    let mut raw = Vec::new();
    c.reader.read_to_end(&mut raw).expect("to close");
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 200 "), "{raw}");
    assert!(!raw.contains(" 100 "), "{raw}");
    assert!(raw.ends_with("\"body_len\":5}"), "{raw}");
}
