//! Every row of the limits table (`docs/limits.md`), against the worker binary: bad input gets a
//! clear JSON error with the request ID, framing errors close the connection, and
//! the worker keeps serving.

mod common;

use appproxy_test_support::net::ReadUninterrupted;
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

/// How a client's connection ended after its answer.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// End of stream after the answer (the worker shut its write half).
    Clean,
    /// A reset or another error.
    Failed(std::io::ErrorKind),
}

/// Sends `first` in one write, then `follow` from a second thread (in 64 KiB writes,
/// `rounds` times), reading meanwhile until the worker ends the connection. Returns
/// what was read, how the read side ended, and whether every write went through.
fn send_while_answered(
    w: &Worker,
    first: &[u8],
    follow: u8,
    rounds: usize,
) -> (String, End, Result<(), std::io::ErrorKind>) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(first).expect("first write");
    let mut out = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let block = vec![follow; 64 << 10];
        for _ in 0..rounds {
            out.write_all(&block).map_err(|e| e.kind())?;
        }
        out.shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.kind())
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let end = loop {
        match s.read_uninterrupted(&mut buf) {
            Ok(0) => break End::Clean,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break End::Failed(e.kind()),
        }
    };
    let wrote = writer.join().expect("writer");
    (String::from_utf8_lossy(&got).into_owned(), end, wrote)
}

/// A client still sending when the worker answers and closes (a 413 before the body,
/// a head refused mid-way, a framing error in the body) reads the whole answer, then
/// a clean end, and every byte it sends is taken: the worker shuts its write half and
/// drops what follows (a lingering close). Closing with bytes unread makes the kernel
/// answer them with a reset, which on a real network can destroy the answer before
/// the client reads it. Table: what goes in the first write, the status.
#[test]
fn a_client_still_sending_reads_its_answer_and_a_clean_close() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        extra: "[limits]\nmax_body = 1000\n".into(),
        ..Default::default()
    });
    let filler = "x".repeat(64 << 10);
    #[rustfmt::skip]
    let table: Vec<(&str, String, u16)> = vec![
        ("body over max_body", format!("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100000000\r\n\r\n{filler}"), 413),
        ("head too large", format!("GET / HTTP/1.1\r\nHost: t\r\nX-Big: {filler}"), 431),
        ("bad chunk size", format!("POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{filler}"), 400),
    ];
    for (what, first, status) in &table {
        // 4 MiB after the first write: far more than the sockets hold.
        let (got, end, wrote) = send_while_answered(&w, first.as_bytes(), b'x', 64);
        assert!(
            got.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {got}"
        );
        assert!(
            got.to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{what}: {got}"
        );
        assert!(
            got.contains("\"request_id\""),
            "{what}: the whole answer: {got}"
        );
        assert_eq!(
            end,
            End::Clean,
            "{what}: the answer must end cleanly, not reset"
        );
        assert_eq!(
            wrote,
            Ok(()),
            "{what}: the client's bytes must be taken, not reset"
        );
    }
    // The worker goes on serving.
    assert_eq!(Client::connect(w.addr()).get("/after", "").status, 200);
}

/// The lingering close is bounded: a client that never stops sending is cut after
/// `lingering_secs`, one that stays silent without closing is released after
/// `lingering_idle_secs`, and `lingering_secs = 0` closes at once (the client's next
/// bytes are then met with a reset).
#[test]
fn lingering_closes_are_bounded() {
    let up = Upstream::start();
    let first = format!(
        "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100000000\r\n\r\n{}",
        "x".repeat(64 << 10)
    );
    let worker = |timeouts: &str| {
        Worker::start(WorkerOpts {
            upstreams: vec![up.addr],
            extra: format!("[limits]\nmax_body = 1000\n[timeouts]\n{timeouts}\n"),
            ..Default::default()
        })
    };

    // Never stops sending (10 GiB would take minutes): cut after 1 s of lingering.
    let w = worker("lingering_secs = 1\nlingering_idle_secs = 600");
    let (got, end, wrote) = send_while_answered(&w, first.as_bytes(), b'x', 160_000);
    assert!(got.starts_with("HTTP/1.1 413 "), "{got}");
    assert_eq!(end, End::Clean, "the answer itself still ends cleanly");
    assert!(
        wrote.is_err(),
        "an endless sender must be cut once lingering_secs have passed"
    );

    // Silent, never closing: released after 1 s of silence, while the client still
    // holds its socket open.
    let w = worker("lingering_secs = 600\nlingering_idle_secs = 1");
    let (got, end, wrote) = send_while_answered(&w, first.as_bytes(), b'x', 0);
    assert!(got.starts_with("HTTP/1.1 413 "), "{got}");
    assert_eq!((end, wrote), (End::Clean, Ok(())));
    // (`send_while_answered` shut the client's write half: that is a close the worker
    // would see at once. A client that keeps its socket whole instead:)
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(first.as_bytes()).expect("write");
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .expect("the answer, then end of stream");
    assert!(got.starts_with(b"HTTP/1.1 413 "));
    common::eventually("the silent lingering connection is released", || {
        common::metric(&w, "appproxy_connections_active") == 0
    });
    drop(s);

    // Off: closed at once with the client's bytes unread, which the kernel resets.
    let w = worker("lingering_secs = 0");
    let (got, _, wrote) = send_while_answered(&w, first.as_bytes(), b'x', 64);
    assert!(got.starts_with("HTTP/1.1 413 "), "{got}");
    assert!(
        wrote.is_err(),
        "without lingering the client's bytes meet a reset"
    );
}

/// A later request's head has `[timeouts] head_secs` from its first byte also when
/// that byte came pipelined behind the request before it (read with it): not the
/// keep-alive timeout, which would give a slow client minutes for every head after
/// its first.
#[test]
fn a_pipelined_partial_head_gets_the_head_timeout_not_the_keepalive_one() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        extra: "[timeouts]\nhead_secs = 1\nkeepalive_secs = 300\n".into(),
        ..Default::default()
    });
    let mut c = Client::connect(w.addr());
    c.send(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\r\nHost: t\r\n");
    assert_eq!(c.response().status, 200);
    // The rest of the second head never comes: the 408 at its head timeout, well
    // within the client's 20 s read guard (the keep-alive timeout is 300 s).
    let r = c.response();
    assert_json_error(&r, 408, "request_timeout");
    assert!(c.is_closed());
    assert_eq!(up.count(), 1);
}

/// `[limits] max_request_rate_per_client`: a client address gets its burst, then a
/// 429 with `Retry-After` and its request ID for each request past its rate, on
/// every connection it opens, over HTTP/1.1 and HTTP/2 alike, and its connection
/// goes on; nothing refused reaches the app; another address has its own rate, and
/// behind a trusted proxy each forwarded address has its own. The rate is one
/// request in 1,000 s: how fast the test runs cannot matter.
#[test]
fn a_client_past_its_request_rate_gets_429_and_other_clients_are_served() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        extra: "[limits]\nmax_request_rate_per_client = 0.001\nmax_request_burst_per_client = 3\n"
            .into(),
        worker_extra: "trusted_proxies = [\"127.0.0.9/32\"]".into(),
        ..Default::default()
    });
    let mut c = Client::connect(w.addr());
    for i in 0..3 {
        assert_eq!(c.get(&format!("/ok{i}"), "").status, 200, "request {i}");
    }
    let r = c.get("/past", "");
    assert_json_error(&r, 429, "request_rate_limit");
    let secs: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert!((990..=1000).contains(&secs), "Retry-After: {secs}");
    let id = r.header("x-backend-request-id").expect("an ID").to_owned();
    let line = w.wait_access_line(&id);
    assert_eq!(line["status"], 429, "{line}");
    assert_eq!(line["client"], "127.0.0.1", "{line}");
    // The connection goes on; the address's other connections are refused too (one
    // whose refused request had a body is closed after it, as for any refusal
    // that leaves a body unread).
    assert_eq!(c.get("/again", "").status, 429);
    let mut other_conn = Client::connect(w.addr());
    other_conn.send(b"POST /post HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(other_conn.response().status, 429);
    assert_eq!(up.count(), 3, "nothing refused reached the app");

    // Another address: a burst of its own.
    let mut second = Client::connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), w.addr());
    for i in 0..3 {
        assert_eq!(second.get(&format!("/second{i}"), "").status, 200);
    }
    assert_eq!(second.get("/second-past", "").status, 429);

    // HTTP/2 streams count as requests: four from a third address (a connection
    // each: curl 7.88 cannot reuse a prior-knowledge connection, with any server).
    let url = format!("http://127.0.0.1:{}/h2", w.port);
    let mut heads = String::new();
    for _ in 0..4 {
        let out = std::process::Command::new("curl")
            .args([
                "--http2-prior-knowledge",
                "--interface",
                "127.0.0.3",
                "-sS",
                "-D",
                "-",
                "-o",
                "/dev/null",
                "--max-time",
                "20",
                &url,
            ])
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        heads.push_str(&String::from_utf8_lossy(&out.stdout).to_ascii_lowercase());
    }
    assert_eq!(heads.matches("http/2 200").count(), 3, "{heads}");
    assert_eq!(heads.matches("http/2 429").count(), 1, "{heads}");
    assert!(heads.contains("retry-after: "), "{heads}");

    // Behind a trusted proxy, each forwarded address is a client of its own.
    let mut proxy = Client::connect_from(std::net::Ipv4Addr::new(127, 0, 0, 9), w.addr());
    for client in ["10.0.0.1", "10.0.0.2"] {
        for i in 0..3 {
            let r = proxy.get(
                &format!("/fwd{i}"),
                &format!("X-Forwarded-For: {client}\r\n"),
            );
            assert_eq!(r.status, 200, "{client} request {i}");
        }
        let r = proxy.get("/fwd-past", &format!("X-Forwarded-For: {client}\r\n"));
        assert_eq!(r.status, 429, "{client}");
    }
    // The trusted proxy's own requests (no forwarded address: its health checks)
    // are not limited, as its connections are not.
    for i in 0..5 {
        assert_eq!(proxy.get(&format!("/own{i}"), "").status, 200, "own {i}");
    }
    assert_eq!(up.count(), 3 + 3 + 3 + 6 + 5);
    // The cores publish their counters at their tick.
    let refused = 1 + 1 + 1 + 1 + 1 + 2;
    common::eventually("the refusals are counted", || {
        common::metric_all_cores(&w, "appproxy_requests_refused_per_client_rate_total") == refused
    });
}

/// A request for no circuit (a wildcard host nothing serves) costs its client as much
/// as any: a scan of host names is limited too, and the budget it used is the one
/// the client's requests to a real circuit draw on.
#[test]
fn requests_for_no_circuit_count_against_the_request_rate() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        extra: "[limits]\nmax_request_rate_per_client = 0.001\nmax_request_burst_per_client = 2\n"
            .into(),
        worker_extra: "frontend_mode = \"wildcard\"\nwildcard_domain = \".apps.test\"\nwildcard_traffic_port = {PORT}".into(),
        circuit_extra: "frontend_mode = \"wildcard\"\nsubdomain = \"app\"".into(),
        ..Default::default()
    });
    let port = w.port;
    let ask = |c: &mut Client, host: &str| {
        c.send(format!("GET / HTTP/1.1\r\nHost: {host}.apps.test:{port}\r\n\r\n").as_bytes());
        c.response()
    };
    let mut c = Client::connect(w.addr());
    assert_json_error(&ask(&mut c, "nope1"), 404, "unknown_circuit");
    assert_json_error(&ask(&mut c, "nope2"), 404, "unknown_circuit");
    assert_json_error(&ask(&mut c, "nope3"), 429, "request_rate_limit");
    assert_json_error(&ask(&mut c, "app"), 429, "request_rate_limit");
    // Another address reaches the circuit.
    let mut other = Client::connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), w.addr());
    assert_eq!(ask(&mut other, "app").status, 200);
    assert_eq!(up.count(), 1);
}
