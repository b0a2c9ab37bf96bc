//! Every row of the limits table (`docs/limits.md`), against the worker binary: bad input gets a
//! clear JSON error with the request ID, framing errors close the connection, and
//! the worker keeps serving.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Upstream, Worker, WorkerOpts};

/// Sends raw bytes on a fresh connection; returns the response and whether the
/// connection was closed after it.
fn send_raw(w: &Worker, bytes: &[u8]) -> (common::Response, bool) {
    let mut c = Client::connect(w.addr());
    c.send(bytes);
    let r = c.response();
    let closed = c.is_closed();
    (r, closed)
}

fn assert_json_error(r: &common::Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let id = r
        .header("x-backend-request-id")
        .expect("request id on proxy errors")
        .to_owned();
    let body = r.json();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["request_id"], id.as_str());
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(r.header("content-type"), Some("application/json"));
}

#[test]
fn malformed_requests_are_refused_and_closed() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        ..Default::default()
    });
    let long_line = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(9000));
    let big_headers = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "b".repeat(17 * 1024)
    );
    let many_headers = format!(
        "GET / HTTP/1.1\r\nHost: t\r\n{}\r\n",
        "X-A: 1\r\n".repeat(101)
    );
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("request line > 8 KiB", long_line.into_bytes(), 414, "uri_too_long"),
        ("header block > 16 KiB", big_headers.into_bytes(), 431, "headers_too_large"),
        ("> 100 headers", many_headers.into_bytes(), 431, "too_many_headers"),
        (
            "CL and TE",
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            400,
            "length_and_transfer_encoding",
        ),
        (
            "differing CL",
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_vec(),
            400,
            "invalid_content_length",
        ),
        (
            "final TE not chunked",
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n".to_vec(),
            400,
            "bad_transfer_encoding",
        ),
        (
            "TE coding before chunked",
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".to_vec(),
            501,
            "unsupported_transfer_coding",
        ),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b\r\n\r\n".to_vec(), 400, "malformed_request"),
        ("bare CR", b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n\r\n".to_vec(), 400, "malformed_request"),
        ("NUL in value", b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\0b\r\n\r\n".to_vec(), 400, "malformed_request"),
        ("bad header name", b"GET / HTTP/1.1\r\nHost: t\r\nX A: b\r\n\r\n".to_vec(), 400, "malformed_request"),
        ("missing Host", b"GET / HTTP/1.1\r\n\r\n".to_vec(), 400, "bad_host"),
        (
            "bad chunk size",
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(),
            400,
            "bad_chunk",
        ),
    ];
    for (what, bytes, status, code) in cases {
        let (r, closed) = send_raw(&w, &bytes);
        assert_json_error(&r, status, code);
        assert!(closed, "{what}: a framing error closes the connection");
        assert_eq!(r.header("connection"), Some("close"), "{what}");
    }
    // None of it reached the app except nothing; the worker still serves.
    assert_eq!(up.count(), 0, "refused requests never reach the app");
    let mut c = Client::connect(w.addr());
    assert_eq!(c.get("/ok", "").status, 200);
}

#[test]
fn slow_heads_get_408_and_idle_clients_are_closed() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        extra: "[timeouts]\nhead_secs = 1\nkeepalive_secs = 1\n".into(),
        ..Default::default()
    });
    let mut c = Client::connect(w.addr());
    c.send(b"GET / HTTP/1.1\r\nHost: t\r\n");
    let r = c.response();
    assert_json_error(&r, 408, "request_timeout");
    assert!(c.is_closed());

    // An idle keep-alive connection is closed without a response.
    let mut c = Client::connect(w.addr());
    assert_eq!(c.get("/x", "").status, 200);
    let started = Instant::now();
    assert!(c.is_closed());
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn body_limit_gives_413() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        extra: "[limits]\nmax_body = 10\n".into(),
        ..Default::default()
    });
    let (r, closed) = send_raw(
        &w,
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello world",
    );
    assert_json_error(&r, 413, "body_too_large");
    assert!(closed);
    let (r, _) = send_raw(
        &w,
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n",
    );
    assert_json_error(&r, 413, "body_too_large");
    let (r, _) = send_raw(
        &w,
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n0123456789",
    );
    assert_eq!(r.status, 200);
}

#[test]
fn upstream_failures_map_to_502_and_504() {
    // Refused: nothing listens on the route's port.
    let dead_addr =
        std::net::SocketAddr::from(([127, 0, 0, 1], appproxy_test_support::free_port()));
    let w = Worker::start(WorkerOpts {
        upstreams: vec![dead_addr],
        ..Default::default()
    });
    let mut c = Client::connect(w.addr());
    let r = c.get("/", "X-Backend-Request-ID: refused-1\r\n");
    assert_json_error(&r, 502, "upstream_connect_failed");
    assert_eq!(r.header("x-backend-request-id"), Some("refused-1"));
    // The client connection survives an upstream failure.
    let r = c.get("/", "");
    assert_eq!(r.status, 502);
    drop(w);

    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        extra: "[timeouts]\nupstream_head_secs = 1\n".into(),
        ..Default::default()
    });
    let mut c = Client::connect(w.addr());
    let r = c.get("/wait?ms=3000", "");
    assert_json_error(&r, 504, "upstream_timeout");
    let r = c.get("/malformed", "");
    assert_json_error(&r, 502, "upstream_invalid_response");
    let r = c.get("/garbage", "");
    assert_json_error(&r, 502, "upstream_invalid_response");
    assert_eq!(c.get("/fine", "").status, 200);
}

#[test]
fn hostile_bytes_never_take_the_worker_down() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        ..Default::default()
    });
    // A deterministic spray of junk, each on its own connection.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..200 {
        let mut bytes = Vec::new();
        let len = 1 + (round * 37) % 700;
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.push((x >> 24) as u8);
        }
        if round % 3 == 0 {
            let mut prefixed = b"GET / HTTP/1.1\r\nHost: t\r\n".to_vec();
            prefixed.extend_from_slice(&bytes);
            bytes = prefixed;
        }
        if let Ok(mut s) = std::net::TcpStream::connect(w.addr()) {
            use std::io::Write;
            let _ = s.write_all(&bytes);
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
    }
    let mut c = Client::connect(w.addr());
    assert_eq!(c.get("/alive", "").status, 200);
    let r = w.admin_get("/health");
    assert_eq!(r.status, 200);
}
