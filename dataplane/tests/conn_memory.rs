//! What a client connection costs the worker while it sends nothing: accepted and
//! silent, or kept alive between requests. Found from outside: every accepted
//! connection took two 16 KiB read buffers at once, allocated zeroed (every page
//! touched), about 27 KB of RSS each before a byte arrived (5,000 bare connections:
//! 10.8 → 144 MB), and the memory stayed after they closed. A connection now takes
//! its read buffer only for a read that finds bytes, the app's read buffer only to
//! read from an app, and its storage with its first bytes; each goes back while it
//! waits idle, and part of a head waits copied aside (what was sent, not 16 KiB).
//!
//! The assertions are on the worker's resident memory, with bounds far from both
//! sides (the old cost per connection was over twice the bound, the new one is well
//! under it), and on what the worker says it holds (`appproxy_read_buffers_held`).

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use common::{eventually, metric, metric_all_cores, Client, Upstream, Worker, WorkerOpts};

/// Connections opened by each test.
const N: usize = 2000;

/// The worker's resident memory now (VmRSS), in KiB.
fn rss_kib(w: &Worker) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", w.pid())).expect("status");
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

fn active(w: &Worker) -> u64 {
    metric(w, "appproxy_connections_active")
}

/// A worker serving one app, warmed up by a few requests (pools, lazy statics).
fn warm_worker(up: &Upstream) -> Worker {
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        ..Default::default()
    });
    let mut c = Client::connect(w.addr());
    for _ in 0..20 {
        assert_eq!(c.get("/warm", "").status, 200);
    }
    drop(c);
    eventually("the warm-up connection closed", || active(&w) == 0);
    w
}

/// The bound on KiB of RSS per idle connection: the old cost was 27 KB (release
/// build) and more in the test's debug build; what is left now is the connection's
/// task and its registration (a few KiB).
const BOUND_KIB: f64 = 12.0;

fn buffers_held(w: &Worker) -> u64 {
    metric_all_cores(w, "appproxy_read_buffers_held")
}

/// Asserts that the `conns` connections open now (`what` they are) cost the worker
/// less than [`BOUND_KIB`] of RSS each over `before` (its RSS with none), and that
/// none of them holds a read buffer.
fn assert_light(w: &Worker, before: u64, conns: usize, what: &str) {
    // The worker has accepted (and polled) every one of them.
    eventually("every connection accepted", || active(w) == conns as u64);
    std::thread::sleep(Duration::from_millis(300));
    let per = rss_kib(w).saturating_sub(before) as f64 / conns as f64;
    eprintln!("{conns} {what}: RSS {before} KiB + {per:.1} KiB each");
    assert!(per < BOUND_KIB, "{what}: {per:.1} KiB of worker RSS each");
    eventually("no read buffer held while they wait", || {
        buffers_held(w) == 0
    });
}

#[test]
fn silent_connections_hold_no_read_buffers() {
    let up = Upstream::start();
    let w = warm_worker(&up);
    let before = rss_kib(&w);
    let conns: Vec<TcpStream> = (0..N)
        .map(|_| TcpStream::connect(w.addr()).expect("connect"))
        .collect();
    assert_light(&w, before, N, "silent connections");
    drop(conns);
    eventually("every connection closed", || active(&w) == 0);
    // The worker still serves, and a connection sends its head after a silence.
    let s = TcpStream::connect(w.addr()).expect("connect");
    std::thread::sleep(Duration::from_millis(200));
    send_the_rest_and_expect_200(
        s,
        b"GET /late HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
}

/// Sends what is left of a head ending with `Connection: close` on `s`, and checks
/// that the answer is a 200 (the connection is read to its close).
fn send_the_rest_and_expect_200(mut s: TcpStream, rest: &[u8]) {
    s.write_all(rest).expect("send");
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("read");
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

#[test]
fn kept_alive_connections_give_their_buffers_back_between_requests() {
    let up = Upstream::start();
    let w = warm_worker(&up);
    let before = rss_kib(&w);
    let mut conns: Vec<Client> = Vec::with_capacity(N);
    for _ in 0..N {
        let mut c = Client::connect(w.addr());
        assert_eq!(c.get("/one", "").status, 200);
        conns.push(c);
    }
    assert_light(&w, before, N, "kept-alive idle connections");
    // Each goes on with its next request.
    for c in conns.iter_mut().take(50) {
        assert_eq!(c.get("/two", "").status, 200);
    }
    drop(conns);
    eventually("every connection closed", || active(&w) == 0);
}

/// Part of a head, then silence (a slow client, or an attacker's 1-byte heads): the
/// bytes are copied aside while the connection waits, and its buffer is back with
/// the pool. Before, each held both 16 KiB buffers until its head timed out.
#[test]
fn connections_with_part_of_a_head_hold_what_they_sent() {
    let up = Upstream::start();
    let w = warm_worker(&up);
    let before = rss_kib(&w);
    let conns: Vec<TcpStream> = (0..N)
        .map(|_| {
            let mut s = TcpStream::connect(w.addr()).expect("connect");
            s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-A: ")
                .expect("send");
            s
        })
        .collect();
    assert_light(&w, before, N, "connections with part of a head");
    // Each still completes its head and is answered.
    for s in conns.into_iter().take(20) {
        send_the_rest_and_expect_200(s, b"1\r\nConnection: close\r\n\r\n");
    }
    eventually("every connection closed", || active(&w) == 0);
}

/// A head that arrives in pieces, with waits in between (the first piece waits copied
/// aside, the buffer back with the pool), small, larger than a page and larger than
/// the buffer itself, then a pipelined pair: each is read whole, as before.
#[test]
fn heads_in_pieces_large_and_pipelined_are_read_whole() {
    let up = Upstream::start();
    let w = warm_worker(&up);
    let mut c = Client::connect(w.addr());
    // The last one, a long path and a long field, is larger than the buffer.
    for (path_pad, size) in [(0, 100usize), (0, 5_000), (7_000, 12_000)] {
        let path = format!("/piece{}", "q".repeat(path_pad));
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "p".repeat(size)
        );
        let (a, b) = head.as_bytes().split_at(head.len() / 2);
        c.send(&a[..1]);
        std::thread::sleep(Duration::from_millis(50));
        c.send(&a[1..]);
        std::thread::sleep(Duration::from_millis(50));
        c.send(b);
        let r = c.response();
        assert_eq!(r.status, 200, "head of {} bytes", head.len());
        let seen = up.last();
        assert_eq!(seen.path, path);
        assert_eq!(seen.header("x-pad").map(str::len), Some(size));
    }
    c.send(b"GET /p1 HTTP/1.1\r\nHost: x\r\n\r\nGET /p2 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.response().status, 200);
    assert_eq!(c.response().status, 200);
    assert_eq!(up.last().path, "/p2");
}

/// The gauge counts what is held, not what was: a connection in the middle of a
/// body holds its read buffer, and gives it back once its exchange is over.
#[test]
fn a_connection_holds_a_read_buffer_only_while_it_has_bytes_to_read() {
    let up = Upstream::start();
    let w = warm_worker(&up);
    eventually("nothing held after the warm-up", || buffers_held(&w) == 0);
    let mut c = Client::connect(w.addr());
    c.send(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345");
    eventually("a buffer held mid-body", || buffers_held(&w) >= 1);
    c.send(b"67890");
    assert_eq!(c.response().status, 200);
    assert_eq!(up.last().body_len, 10);
    eventually("none held once the exchange is over", || {
        buffers_held(&w) == 0
    });
    assert!(
        metric_all_cores(&w, "appproxy_read_buffers_pooled") >= 1,
        "what was held is back with the pool"
    );
    drop(c);
    eventually("the connection closed", || active(&w) == 0);
}
