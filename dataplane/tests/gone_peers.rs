//! Hostile suite, class "a peer gone while the other one stalls": a client whose
//! connection is reset while the worker waits on the app's side — an event stream
//! or a download whose app went silent, an answer whose head has not come yet, a
//! tunnel whose app stopped reading — must
//! free both connections and the core's slot at once, not when the app next writes
//! or after the hour-long idle timeouts; an HTTP/2 client whose connection closes,
//! likewise. Before, each such
//! connection was held: an attacker who holds no socket at all could fill a core
//! (`max_connections_per_core`) and have every other client refused.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, metric, Worker, WorkerOpts};

/// A client's key and the answer to it (RFC 6455 §1.3's example).
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// An app that answers by path and then goes silent, counting the connections the
/// worker closed on it:
/// - `/events`: an event stream's head and one event;
/// - `/stall`: 1,000 of a body of 1,000,000 bytes;
/// - `/ws`: a WebSocket 101, then never reads again;
/// - `/hold`: nothing at all (the response head never comes);
/// - `/late`: a short answer, two seconds after the request.
///
/// Where it still reads (all but `/ws`), the worker's close is its end of stream.
struct SilentApp {
    addr: SocketAddr,
    /// Requests whose head it read.
    received: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

fn silent_app() -> SilentApp {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind app");
    let addr = listener.local_addr().expect("addr");
    let closed = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    let (count, heads) = (closed.clone(), received.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (count, heads) = (count.clone(), heads.clone());
            std::thread::spawn(move || {
                let mut s = stream;
                let mut r = BufReader::new(s.try_clone().expect("clone"));
                let Some(line) = read_request_head(&mut r) else {
                    return;
                };
                let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                heads.fetch_add(1, Ordering::SeqCst);
                if path == "/late" {
                    std::thread::sleep(Duration::from_secs(2));
                }
                let answer = match path.as_str() {
                    "/late" => "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate".to_owned(),
                    "/events" => "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n".to_owned(),
                    "/stall" => format!("HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n{}", "x".repeat(1000)),
                    "/ws" => format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {WS_ACCEPT}\r\n\r\n"),
                    _ => String::new(),
                };
                if s.write_all(answer.as_bytes()).is_err() {
                    return;
                }
                if path != "/ws" {
                    // Silent, but reading: the worker's close ends this.
                    let mut buf = [0u8; 1024];
                    while matches!(r.read(&mut buf), Ok(n) if n > 0) {}
                    count.fetch_add(1, Ordering::SeqCst);
                } else {
                    // Neither reading nor writing, for longer than any test runs.
                    std::thread::sleep(Duration::from_secs(600));
                }
            });
        }
    });
    SilentApp {
        addr,
        received,
        closed,
    }
}

/// Reads a request head from an app's connection: its request line, or `None` when
/// the connection ends first.
fn read_request_head(r: &mut BufReader<TcpStream>) -> Option<String> {
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    loop {
        let mut h = String::new();
        match r.read_line(&mut h) {
            Ok(0) | Err(_) => return None,
            Ok(_) if h == "\r\n" => return Some(line),
            Ok(_) => {}
        }
    }
}

/// An app that takes connections and never reads from them (a TCP circuit's).
fn mute_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind app");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    addr
}

/// A worker in front of `app` whose writes may stall `stall_secs` without progress
/// (`body_idle_secs`; the tunnels' and responses' idle timeouts stay at their hour).
fn worker(app: SocketAddr, circuit_extra: &str, stall_secs: u64) -> Worker {
    worker_with(app, circuit_extra, stall_secs, true)
}

/// [`worker`] with `[upstream] abort_on_client_close` as given (on by default):
/// off, a client that only ended its side keeps its answer (HAProxy's default).
fn worker_with(app: SocketAddr, circuit_extra: &str, stall_secs: u64, abort: bool) -> Worker {
    // On is left to the default (which the tests below thus check).
    let upstream = if abort {
        ""
    } else {
        "\n[upstream]\nabort_on_client_close = false\n"
    };
    Worker::start(WorkerOpts {
        upstreams: vec![app],
        extra: format!(
            "[timeouts]\nbody_idle_secs = {stall_secs}\nupstream_head_secs = 60\n{upstream}"
        ),
        circuit_extra: circuit_extra.into(),
        ..Default::default()
    })
}

/// The client leaves with a reset (`SO_LINGER` 0).
fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    drop(s);
}

/// Reads until `needle` has arrived.
fn read_until(s: &mut TcpStream, needle: &[u8]) {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(needle.len()).any(|w| w == needle) {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed before {needle:?}: {seen:?}");
        seen.extend_from_slice(&buf[..n]);
    }
}

/// Writes to `s` without blocking until the socket takes no more: the worker has
/// stopped reading it, its write to an app that does not read being blocked.
fn push_until_blocked(s: &mut TcpStream, chunk: &[u8]) {
    s.set_nonblocking(true).expect("nonblocking");
    let mut quiet = 0;
    // Blocked for a second in a row: every buffer on the way is full.
    while quiet < 20 {
        match s.write(chunk) {
            Ok(_) => quiet = 0,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                quiet += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("push: {e}"),
        }
    }
}

/// A WebSocket session through `w` to [`silent_app`]'s `/ws`, its client having
/// pushed masked binary frames of 60,000 bytes (a zero mask leaves the payload as
/// is) until the worker stopped taking them: its write to the app is blocked.
fn websocket_blocked_on_its_app(w: &Worker) -> TcpStream {
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.write_all(format!("GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n\r\n").as_bytes())
        .expect("handshake");
    read_until(&mut s, b"\r\n\r\n");
    let mut frame = vec![0x82, 0x80 | 126, 0xEA, 0x60, 0, 0, 0, 0];
    frame.resize(frame.len() + 60_000, b'w');
    push_until_blocked(&mut s, &frame);
    s
}

#[test]
fn a_client_gone_from_a_silent_response_frees_it_at_once() {
    let app = silent_app();
    let w = worker(app.addr, "", 60);
    // (A client that only ends its side may still read: it keeps its answer, as
    // `buffer_reuse.rs`' half-closing probes check; see `docs/limits.md`.)
    for (expected, path) in [(1, "/events"), (2, "/stall")] {
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .expect("request");
        read_until(
            &mut s,
            if path == "/events" {
                b"data: 1"
            } else {
                b"xxxxx"
            },
        );
        eventually(&format!("{path}: counted"), || {
            metric(&w, "appproxy_connections_active") == 1
        });
        reset(s);
        eventually(&format!("{path}: the app's connection closed"), || {
            app.closed.load(Ordering::SeqCst) == expected
        });
        eventually(&format!("{path}: the slot freed"), || {
            metric(&w, "appproxy_connections_active") == 0
        });
    }
}

/// Before its answer's head, too: the wait for the app's head watches the client
/// (it was bounded only by `upstream_head_secs`, a minute by default), and a client
/// that only ended its side still gets the head that comes later.
#[test]
fn a_client_gone_before_the_apps_answer_frees_it_at_once() {
    let app = silent_app();
    let w = worker(app.addr, "", 60);
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.write_all(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("request");
    eventually("the request reached the app", || {
        app.received.load(Ordering::SeqCst) == 1
    });
    reset(s);
    eventually("the app's connection closed", || {
        app.closed.load(Ordering::SeqCst) == 1
    });
    eventually("the slot freed", || {
        metric(&w, "appproxy_connections_active") == 0
    });
    // The line goes through the log's writer thread: waited for (bounded), then
    // counted once more (more than one still fails).
    let aborted = || {
        w.log_json()
            .iter()
            .filter(|v| {
                v["message"] == "exchange aborted"
                    && v["reason"] == "the client left before the app answered"
            })
            .count()
    };
    eventually("the exchange's end logged", || aborted() >= 1);
    assert_eq!(aborted(), 1, "the exchange's end logged with its reason");
}

/// With `[upstream] abort_on_client_close = false` (HAProxy's default), a client
/// that only ended its side after its request (a FIN) still gets the head that
/// comes later; on (the default), the same client's FIN ends the exchange
/// (`a_client_that_closed_before_the_apps_answer_has_the_apps_connection_closed`).
#[test]
fn a_half_closed_client_keeps_its_late_answer_with_abort_on_close_off() {
    let app = silent_app();
    let w = worker_with(app.addr, "", 60, false);
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.write_all(b"GET /late HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("request");
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("\r\n\r\nlate"),
        "the half-closed client's late answer: {answer:?}"
    );
}

/// A client that leaves while the worker still connects to its app (one whose
/// accept queue is full: the connect waits out `upstream_connect_secs`, a minute
/// here) ends the connect: the exchange is logged at once as the client's leaving
/// (status 0, the reason), not as the 502 or 504 of a connect that fails after it
/// left, whether the client closed (a FIN, with `abort_on_client_close` on, the
/// default) or reset. As while the app is silent, with the rule off a client that
/// only ended its side still gets the connect's outcome: its 502, the connect
/// bounded at 2 s there.
#[test]
fn a_client_that_leaves_while_its_app_is_connected_to_ends_the_connect() {
    let (_app, _queued, app) = common::never_accepting_app();
    let with = |abort: &str, connect_secs: u32, circuit: &str| {
        Worker::start(WorkerOpts {
            upstreams: vec![app],
            extra: format!(
                "[timeouts]\nupstream_connect_secs = {connect_secs}\n[upstream]\nabort_on_client_close = {abort}\n"
            ),
            circuit_extra: circuit.into(),
            ..Default::default()
        })
    };
    // A GET, or a POST whose body has begun (the app is connected to once a body
    // is really coming) and is still to come.
    let send = |w: &Worker, n: u32, method: &str| {
        let id = test_id(100 + n);
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        let body = if method == "POST" {
            "Content-Length: 10\r\n\r\nhalf."
        } else {
            "\r\n"
        };
        s.write_all(
            format!("{method} /held HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: {id}\r\n{body}")
                .as_bytes(),
        )
        .expect("request");
        // The worker connects meanwhile (a client gone first ends it the same way).
        std::thread::sleep(Duration::from_millis(300));
        (s, id)
    };
    let request = |w: &Worker, n: u32| send(w, n, "GET");
    // An HTTP/1.1 app's connect, and the dial of an HTTP/2 app's connection for
    // a client bridged to it.
    for (n, circuit) in [(1, ""), (3, "protocol = \"http2\"")] {
        let w = with("true", 60, circuit);
        let (s, closed) = request(&w, n);
        let rest = close_and_drain(s);
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
        let (s, was_reset) = request(&w, n + 1);
        reset(s);
        // With a body to come, a reset is a leaving (its end of stream is not:
        // below).
        let (s, reset_in_body) = send(&w, n + 10, "POST");
        reset(s);
        for id in [closed, was_reset, reset_in_body] {
            logged_as_left(&w, &id, circuit);
        }
        eventually("the slots freed", || {
            metric(&w, "appproxy_connections_active") == 0
        });
    }
    let w = with("false", 2, "");
    let (s, half_closed) = request(&w, 5);
    let answer = half_close_and_read(s);
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer:?}");
    assert_eq!(w.wait_access_line(&half_closed)["status"], 502);
    // A body's end of stream during the connect is no leaving, whatever the rule.
    let w = with("true", 2, "");
    let (s, ended_in_body) = send(&w, 6, "POST");
    let answer = half_close_and_read(s);
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer:?}");
    assert_eq!(w.wait_access_line(&ended_in_body)["status"], 502);
}

/// The connect after a dead pooled connection is watched as the first one is: a
/// bodiless request sent on a reused app connection that the app closes without an
/// answer is retried on a new connection, and a client that leaves while that
/// connect hangs ends it at once, logged as the client's leaving (before, the retry
/// connect went on to its timeout and the exchange was logged as its 502).
#[test]
fn a_client_that_leaves_while_its_request_is_retried_ends_the_retry_connect() {
    for leave in ["FIN", "reset"] {
        let (app, served) = closes_its_reused_connection_then_stops_accepting();
        // The connect is never timed out within the test: only the client's leaving
        // can end it.
        let w = Worker::start(WorkerOpts {
            upstreams: vec![app],
            extra: "[timeouts]\nupstream_connect_secs = 60\n".into(),
            ..Default::default()
        });
        let id = test_id(if leave == "FIN" { 10 } else { 11 });
        let mut first = TcpStream::connect(w.addr()).expect("connect");
        first
            .write_all(b"GET /once HTTP/1.1\r\nHost: t\r\n\r\n")
            .expect("first request");
        read_until(&mut first, b"ok\n");
        drop(first);
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.write_all(
            format!("GET /again HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: {id}\r\n\r\n")
                .as_bytes(),
        )
        .expect("second request");
        // The app reads it on the pooled connection and closes that without an
        // answer; the worker's new connect then hangs on the app's full backlog.
        served
            .recv_timeout(Duration::from_secs(10))
            .expect("the app read the request");
        std::thread::sleep(Duration::from_millis(300));
        if leave == "FIN" {
            let rest = close_and_drain(s);
            assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
        } else {
            reset(s);
        }
        logged_as_left(&w, &id, leave);
        eventually("the slots freed", || {
            metric(&w, "appproxy_connections_active") == 0
        });
        assert_eq!(
            metric(&w, "appproxy_upstream_pool_hits_total"),
            1,
            "{leave}: the retry followed a reused connection"
        );
    }
}

/// An app that answers one request on its first connection, keeps it open, then
/// fills its own backlog (a backlog of 0 and one connection queued, never
/// accepted: later connects never complete), reads the next request on that
/// connection and closes it without answering. `served` is told when it read it.
fn closes_its_reused_connection_then_stops_accepting() -> (SocketAddr, std::sync::mpsc::Receiver<()>)
{
    let app = TcpListener::bind("127.0.0.1:0").expect("bind");
    rustix::net::listen(&app, 0).expect("a backlog of 0");
    let addr = app.local_addr().expect("addr");
    let (tell, served) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((c, _)) = app.accept() else { return };
        let mut c = BufReader::new(c);
        if read_request_head(&mut c).is_none() {
            return;
        }
        let _ = c
            .get_mut()
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n");
        let Ok(_queued) = TcpStream::connect(addr) else {
            return;
        };
        if read_request_head(&mut c).is_some() {
            let _ = tell.send(());
        }
        drop(c);
        // The listener and the queued connection live as long as the test.
        std::thread::sleep(Duration::from_secs(120));
    });
    (addr, served)
}

/// Half-closes `s` (a client that sent all it will) and reads what the worker
/// answers until it closes (30 s at most).
fn half_close_and_read(mut s: TcpStream) -> String {
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

/// The exchange `id` is logged as a client gone (`what` names the case): its
/// access line with status 0, and the abort's reason.
fn logged_as_left(w: &Worker, id: &str, what: &str) {
    let line = w.wait_access_line(id);
    assert_eq!(line["status"], 0, "{what}: logged as a client gone: {line}");
    w.wait_log("the abort's reason", |v| {
        v["message"] == "exchange aborted"
            && v["reason"] == "the client left before the app answered"
            && v["request_id"] == id
    });
}

/// The request ID a test client sends, numbered.
fn test_id(n: u32) -> String {
    format!("7f3e9a10-2b4c-4d5e-8f60-{n:012}")
}

/// Ends the client's side (a FIN, as a client that closed sends) and reads what the
/// worker still sends until it closes: nothing, once the exchange was given up.
fn close_and_drain(mut s: TcpStream) -> Vec<u8> {
    s.shutdown(std::net::Shutdown::Write).expect("FIN");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    rest
}

/// With `[upstream] abort_on_client_close` on (the default, as nginx and Envoy do),
/// a client that closed (its FIN, after its whole request) while the app has not
/// answered yet ends the exchange at once: the app's connection is closed (the app
/// sees the client leave and can stop its work), well before `upstream_head_secs`
/// (60 s here), nothing is written to the client, and the access line records it as
/// a client gone (status 0, its request ID). Pipelined requests behind it, or a
/// request's body read whole, change nothing.
#[test]
fn a_client_that_closed_before_the_apps_answer_has_the_apps_connection_closed() {
    let app = silent_app();
    let w = worker(app.addr, "", 60);
    for (n, request) in [
        "GET /hold HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: {id}\r\n\r\n",
        "POST /hold HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: {id}\r\nContent-Length: 4\r\n\r\nbody",
        "GET /hold HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: {id}\r\n\r\nGET /late HTTP/1.1\r\nHost: t\r\n\r\n",
    ]
    .into_iter()
    .enumerate()
    {
        let n = n + 1;
        let id = test_id(n as u32);
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.write_all(request.replace("{id}", &id).as_bytes())
            .expect("request");
        eventually(&format!("{n}: the request reached the app"), || {
            app.received.load(Ordering::SeqCst) == n
        });
        let rest = close_and_drain(s);
        assert!(
            rest.is_empty(),
            "{n}: nothing written after the client closed: {:?}",
            String::from_utf8_lossy(&rest)
        );
        eventually(&format!("{n}: the app's connection closed"), || {
            app.closed.load(Ordering::SeqCst) == n
        });
        logged_as_left(&w, &id, &n.to_string());
    }
    eventually("the slot freed", || {
        metric(&w, "appproxy_connections_active") == 0
    });
    assert_eq!(
        app.received.load(Ordering::SeqCst),
        3,
        "a pipelined request behind the abort never went"
    );
}

/// The same while a response body's app is silent (an event stream, a stalled
/// download): the client's FIN ends the relay at once, the app's connection is
/// closed (not pooled), nothing more goes to the client, and the access line keeps
/// the answer's status and request ID as for a client whose connection was reset.
#[test]
fn a_client_that_closed_behind_a_silent_response_body_has_the_apps_connection_closed() {
    let app = silent_app();
    let w = worker(app.addr, "", 60);
    for (n, path) in [(1, "/events"), (2, "/stall")] {
        let id = test_id(100 + n);
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: {id}\r\n\r\n")
                .as_bytes(),
        )
        .expect("request");
        let until: &[u8] = if path == "/events" {
            b"data: 1\n\n\r\n"
        } else {
            &[b'x'; 1000]
        };
        read_until(&mut s, until);
        let rest = close_and_drain(s);
        assert!(
            rest.is_empty(),
            "{path}: nothing written after the client closed: {:?}",
            String::from_utf8_lossy(&rest)
        );
        eventually(&format!("{path}: the app's connection closed"), || {
            app.closed.load(Ordering::SeqCst) == n as usize
        });
        let line = w.wait_access_line(&id);
        assert_eq!(line["status"], 200, "{path}: {line}");
        w.wait_log("the cut's reason", |v| {
            v["request_id"] == id.as_str()
                && v["reason"].as_str().is_some_and(|r| {
                    r.contains("the client closed its connection while the app was silent")
                })
        });
    }
    eventually("the slot freed", || {
        metric(&w, "appproxy_connections_active") == 0
    });
}

/// An early answer (the app refuses a request body without reading it) is no
/// silence to abort on: the client's end of stream then may be its body's (a
/// client told 413 stops sending and half-closes), and it keeps the whole answer,
/// however long the app pauses in it, with `abort_on_client_close` on.
#[test]
fn an_early_answer_is_relayed_whole_to_a_client_that_stopped_its_body() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind app");
    let app = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let Some(Ok(mut s)) = listener.incoming().next() else {
            return;
        };
        // The head only, byte by byte: the body is never read.
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && matches!(s.read(&mut b), Ok(1)) {
            head.push(b[0]);
        }
        let _ = s.write_all(
            b"HTTP/1.1 413 Payload Too Large\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst \r\n",
        );
        // A pause in the answer, long after the client's end of stream.
        std::thread::sleep(Duration::from_millis(1500));
        let _ = s.write_all(b"4\r\nhalf\r\n0\r\n\r\n");
        std::thread::sleep(Duration::from_secs(10));
    });
    let w = worker(app, "", 60);
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 50000000\r\n\r\n")
        .expect("head");
    // Some of the body (the worker reads it all, the rest never comes): the
    // app's refusal arrives while the worker waits for more of it.
    s.write_all(&[b'b'; 8192]).expect("body");
    // Told 413, the client stops its body and ends its side, mid-answer.
    read_until(&mut s, b"first \r\n");
    s.shutdown(std::net::Shutdown::Write).expect("FIN");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert_eq!(
        String::from_utf8_lossy(&rest),
        "4\r\nhalf\r\n0\r\n\r\n",
        "the rest of the early answer, after the pause"
    );
}

/// The bridge to an `http2` app follows the same rule for an HTTP/1.1 client: its
/// FIN while the app's answer has not come, or while its event stream is silent,
/// has the app's stream reset at once (with the switch off, it keeps its answers:
/// `an_http1_client_waiting_on_an_http2_app_is_answered_unless_it_reset`).
#[test]
fn an_http1_client_that_closed_has_its_http2_apps_stream_reset() {
    let app = H2App::start();
    let w = worker(app.addr, "protocol = \"http2\"", 60);
    for (round, mode) in [(1, H2App::HOLD), (2, H2App::EVENTS)] {
        app.set(mode);
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.write_all(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
            .expect("request");
        if mode == H2App::EVENTS {
            read_until(&mut s, b"data: 1\n\n\r\n");
        } else {
            eventually("the request reached the app", || {
                app.heads.load(Ordering::SeqCst) == round
            });
        }
        let rest = close_and_drain(s);
        assert!(
            rest.is_empty(),
            "round {round}: {:?}",
            String::from_utf8_lossy(&rest)
        );
        eventually(&format!("round {round}: the app's stream reset"), || {
            app.resets.load(Ordering::SeqCst) == round
        });
    }
    eventually("the slot freed", || {
        metric(&w, "appproxy_connections_active") == 0
    });
}

#[test]
fn a_client_reset_behind_a_tunnel_blocked_on_its_app_frees_it_at_once() {
    let app = silent_app();
    // A WebSocket session, inspected frame by frame.
    let w = worker(app.addr, "", 60);
    let s = websocket_blocked_on_its_app(&w);
    eventually("the session counted", || {
        metric(&w, "appproxy_tunnels_active") == 1
    });
    reset(s);
    eventually("the WebSocket session ended", || {
        metric(&w, "appproxy_tunnels_active") == 0 && metric(&w, "appproxy_connections_active") == 0
    });
    drop(w);

    // A TCP circuit: raw bytes. Its end is its log line (the harness's readiness
    // probe, closed at once, stays relayed half-closed to this app, which never
    // closes, so the gauge does not go back to nought).
    let w = worker(mute_app(), "protocol = \"tcp\"", 60);
    let closed = || common::log_count(&w, "tcp connection closed");
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    push_until_blocked(&mut s, &[b't'; 65536]);
    assert_eq!(closed(), 0, "the tunnel is open while its client is");
    reset(s);
    eventually("the TCP tunnel ended", || closed() == 1);
}

#[test]
fn an_http2_client_gone_from_a_silent_response_frees_its_stream() {
    let app = silent_app();
    let w = worker(app.addr, "", 60);
    for round in 1..=2 {
        // nghttp waits a second for the stream, then exits: its connection closes
        // with the stream still open.
        let out = Command::new("nghttp")
            .args(["-t", "1"])
            .arg(format!("http://127.0.0.1:{}/events", w.port))
            .output()
            .expect("nghttp must be installed (.ci/run installs nghttp2-client)");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.contains("data: 1"),
            "the event reached the client: {said}"
        );
        eventually(
            &format!("round {round}: the app's connection closed"),
            || app.closed.load(Ordering::SeqCst) == round,
        );
        eventually(&format!("round {round}: the slot freed"), || {
            metric(&w, "appproxy_connections_active") == 0
        });
    }
}

/// An HTTP/2 app on raw frames, for an `http2` circuit (the bridge), answering each
/// stream as its `mode` says when the stream's head comes ([`H2App::EVENTS`] …),
/// and counting the heads it got and the streams the worker reset.
struct H2App {
    addr: SocketAddr,
    heads: Arc<AtomicUsize>,
    resets: Arc<AtomicUsize>,
    mode: Arc<AtomicU8>,
}

impl H2App {
    /// An event stream's head and one event, then silence.
    const EVENTS: u8 = 0;
    /// As `EVENTS`, then a second event and the stream's end a second later.
    const EVENTS_THEN_END: u8 = 1;
    /// Nothing at all.
    const HOLD: u8 = 2;
    /// A whole answer (`late`), a second later.
    const LATE: u8 = 3;

    fn start() -> Self {
        use appproxy_test_support::h2frames::{
            block, frame, serve_raw_app, DATA, END_HEADERS, END_STREAM, HEADERS, RST_STREAM,
        };
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind app");
        let addr = listener.local_addr().expect("addr");
        let app = Self {
            addr,
            heads: Arc::new(AtomicUsize::new(0)),
            resets: Arc::new(AtomicUsize::new(0)),
            mode: Arc::new(AtomicU8::new(Self::EVENTS)),
        };
        let (heads, resets, mode) = (app.heads.clone(), app.resets.clone(), app.mode.clone());
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let (heads, resets, mode) = (heads.clone(), resets.clone(), mode.clone());
                let Ok(later) = s.try_clone() else { continue };
                std::thread::spawn(move || {
                    serve_raw_app(s, |(ty, _, id, _)| {
                        if *ty == RST_STREAM {
                            resets.fetch_add(1, Ordering::SeqCst);
                        }
                        if *ty != HEADERS {
                            return Vec::new();
                        }
                        heads.fetch_add(1, Ordering::SeqCst);
                        let events = block(&[
                            (b":status", b"200"),
                            (b"content-type", b"text/event-stream"),
                        ]);
                        let id = *id;
                        let after_a_second = |bytes: Vec<u8>| {
                            if let Ok(mut later) = later.try_clone() {
                                std::thread::spawn(move || {
                                    std::thread::sleep(Duration::from_secs(1));
                                    let _ = later.write_all(&bytes);
                                });
                            }
                        };
                        match mode.load(Ordering::SeqCst) {
                            Self::HOLD => return Vec::new(),
                            Self::LATE => {
                                let head =
                                    block(&[(b":status", b"200"), (b"content-length", b"4")]);
                                after_a_second(
                                    [
                                        frame(HEADERS, END_HEADERS, id, &head),
                                        frame(DATA, END_STREAM, id, b"late"),
                                    ]
                                    .concat(),
                                );
                                return Vec::new();
                            }
                            Self::EVENTS_THEN_END => {
                                after_a_second(frame(DATA, END_STREAM, id, b"data: 2\n\n"));
                            }
                            _ => {}
                        }
                        [
                            frame(HEADERS, END_HEADERS, id, &events),
                            frame(DATA, 0, id, b"data: 1\n\n"),
                        ]
                        .concat()
                    })
                });
            }
        });
        app
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

/// The number of log lines whose `reason` holds `reason`.
fn logged_reasons(w: &Worker, reason: &str) -> usize {
    w.log_json()
        .iter()
        .filter(|v| v["reason"].as_str().is_some_and(|r| r.contains(reason)))
        .count()
}

/// An HTTP/1.1 client of an `http2` circuit (the bridge): a client whose connection
/// is reset while its app's stream is silent (an event stream never ended) frees the
/// slot and has the app's stream reset at once; before, both were held for
/// `response_idle_secs` (an hour). With `abort_on_client_close = false`, a client
/// that only ended its side still gets the rest, which the app sends a second later.
#[test]
fn an_http1_client_gone_from_a_silent_http2_app_frees_its_stream() {
    let app = H2App::start();
    let w = worker_with(app.addr, "protocol = \"http2\"", 60, false);
    for round in 1..=2 {
        app.set(H2App::EVENTS);
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.write_all(b"GET /events HTTP/1.1\r\nHost: t\r\n\r\n")
            .expect("request");
        read_until(&mut s, b"data: 1");
        eventually(&format!("round {round}: counted"), || {
            metric(&w, "appproxy_connections_active") == 1
        });
        reset(s);
        eventually(&format!("round {round}: the app's stream reset"), || {
            app.resets.load(Ordering::SeqCst) == round
        });
        eventually(&format!("round {round}: the slot freed"), || {
            metric(&w, "appproxy_connections_active") == 0
        });
        if round == 2 {
            break;
        }
        app.set(H2App::EVENTS_THEN_END);
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.write_all(b"GET /late HTTP/1.1\r\nHost: t\r\n\r\n")
            .expect("request");
        read_until(&mut s, b"data: 1");
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
        read_until(&mut s, b"data: 2\n\n\r\n0\r\n\r\n");
        assert_eq!(
            app.resets.load(Ordering::SeqCst),
            1,
            "a stream ended whole is not reset"
        );
    }
    let reason = "the client's connection was reset while the app was silent";
    // The lines go through the log's writer thread: waited for (bounded), then
    // counted once more (more than two still fails).
    eventually("each cut logged", || logged_reasons(&w, reason) >= 2);
    assert_eq!(
        logged_reasons(&w, reason),
        2,
        "each cut logged with its reason"
    );
}

/// The bridge's wait for an `http2` app's answer watches the client as the HTTP/1.1
/// path's does (a `grpc` circuit's, which may last hours, ends at the client's end
/// of stream: `grpc_head_wait.rs`): a client whose connection is reset frees its slot and has the app's
/// stream reset at once; with `abort_on_client_close = false`, a client that only
/// ended its side after its requests (`nc -N`, HTTP/1.0 tools) still gets every
/// answer, pipelined ones included. Before,
/// the client's end of stream alone cancelled the app's stream and closed the
/// connection with no answer at all.
#[test]
fn an_http1_client_waiting_on_an_http2_app_is_answered_unless_it_reset() {
    let app = H2App::start();
    let w = worker_with(app.addr, "protocol = \"http2\"", 60, false);
    app.set(H2App::HOLD);
    let s = TcpStream::connect(w.addr()).expect("connect");
    (&s).write_all(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("request");
    eventually("the request reached the app", || {
        app.heads.load(Ordering::SeqCst) == 1
    });
    reset(s);
    eventually("the app's stream reset", || {
        app.resets.load(Ordering::SeqCst) == 1
    });
    eventually("the slot freed", || {
        metric(&w, "appproxy_connections_active") == 0
    });
    // The line goes through the log's writer thread: waited for (bounded), then
    // counted once more (more than one still fails).
    eventually("the exchange's end logged", || {
        logged_reasons(&w, "the client left before the app answered") >= 1
    });
    assert_eq!(
        logged_reasons(&w, "the client left before the app answered"),
        1
    );

    app.set(H2App::LATE);
    for requests in [
        "GET /a HTTP/1.1\r\nHost: t\r\n\r\n",
        "GET /a HTTP/1.0\r\nHost: t\r\n\r\n",
        "POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nbody",
        "GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.write_all(requests.as_bytes()).expect("requests");
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut answers = String::new();
        s.read_to_string(&mut answers).expect("answers");
        let expected = requests.matches(" HTTP/1.").count();
        assert_eq!(
            answers.matches("HTTP/1.1 200").count(),
            expected,
            "{requests:?}: {answers:?}"
        );
        assert!(answers.ends_with("late"), "{requests:?}: {answers:?}");
    }
    assert_eq!(
        app.resets.load(Ordering::SeqCst),
        1,
        "no answered stream was reset"
    );
}

/// A client that stops reading, or vanishes behind its own full window (its end of
/// stream queued behind bytes the worker will never take), leaves a tunnel write
/// blocked with no progress: it ends after `body_idle_secs` (2 s here), as nginx's
/// `proxy_send_timeout` would end it, not after the tunnel's idle hour. Here the
/// client closes with unsent bytes still queued, so its end never arrives.
#[test]
fn a_tunnel_write_that_makes_no_progress_ends_after_the_stall_bound() {
    let app = silent_app();
    let w = worker(app.addr, "", 2);
    let s = websocket_blocked_on_its_app(&w);
    drop(s);
    eventually("the stalled WebSocket session ended", || {
        metric(&w, "appproxy_tunnels_active") == 0 && metric(&w, "appproxy_connections_active") == 0
    });
    drop(w);

    let w = worker(mute_app(), "protocol = \"tcp\"", 2);
    let closed = || common::log_count(&w, "tcp connection closed");
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    push_until_blocked(&mut s, &[b't'; 65536]);
    drop(s);
    eventually("the stalled TCP tunnel ended", || closed() == 1);
}

/// A client that never reads, facing an app that floods it, cannot stretch the
/// write's bound by sending now and then: each of its frames is a read of the same
/// connection, and a read re-arms the connection's one deadline to the tunnel's
/// idle timeout (an hour), which kept the session (its app connection, megabytes
/// queued in the socket) as long as the pings went on. The write's bound is the
/// latest any deadline set meanwhile may be: the session ends `body_idle_secs` (1 s
/// here) after the last byte the client took, its pings notwithstanding.
#[test]
fn a_client_that_never_reads_cannot_stretch_the_stall_bound_by_sending() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind app");
    let app = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read_exact(&mut byte).is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let answer = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {WS_ACCEPT}\r\n\r\n");
                if s.write_all(answer.as_bytes()).is_err() {
                    return;
                }
                // Binary frames of 60,000 bytes for as long as anyone takes them.
                let mut frame = vec![0x82, 126, 0xEA, 0x60];
                frame.resize(frame.len() + 60_000, b'f');
                while s.write_all(&frame).is_ok() {}
            });
        }
    });
    let w = worker(app, "", 1);
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.write_all(format!("GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n\r\n").as_bytes())
        .expect("handshake");
    read_until(&mut s, b"\r\n\r\n");
    eventually("the session counted", || {
        metric(&w, "appproxy_tunnels_active") == 1
    });
    // A masked ping every 200 ms, never a read: until the worker closes.
    let stop = Arc::new(AtomicU8::new(0));
    let pinger = {
        let (mut s, stop) = (s.try_clone().expect("clone"), stop.clone());
        std::thread::spawn(move || {
            while stop.load(Ordering::SeqCst) == 0 {
                if s.write_all(&[0x89, 0x80, 0, 0, 0, 0]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    // Ended by the stall bound (the tunnel's idle timeout is an hour).
    eventually("the stalled session ended, pings and all", || {
        metric(&w, "appproxy_tunnels_active") == 0
    });
    stop.store(1, Ordering::SeqCst);
    let _ = pinger.join();
}

/// The bound is on a write that makes no progress, and only while it waits: a
/// TCP client that sends its request and ends its side, then waits for an app that
/// answers later than `body_idle_secs`, still gets the answer (the connection's one
/// deadline, which its other direction's read shares, is not left at the write's
/// bound).
#[test]
fn a_half_closed_tunnel_client_still_gets_a_late_answer() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind app");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            counted.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut s = stream;
                let mut got = Vec::new();
                // The request, to its end.
                if s.read_to_end(&mut got).is_err() {
                    return;
                }
                // Later than the stall bound (2 s).
                std::thread::sleep(Duration::from_secs(4));
                let _ = s.write_all(format!("ANSWER {}", got.len()).as_bytes());
            });
        }
    });
    let w = worker(addr, "protocol = \"tcp\"", 2);
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    // The tunnel stands (the app is connected) before the request goes.
    eventually("the tunnel counted", || {
        metric(&w, "appproxy_tunnels_active") >= 1 || metric(&w, "appproxy_connections_active") >= 1
    });
    s.write_all(&[b'r'; 1000]).expect("request");
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    assert_eq!(answer, "ANSWER 1000");
}

/// A client that closed its connection while the app is silent cannot be told by its
/// end of stream from one that only ended its side and still reads, which keeps its
/// answer; nor does a client whose host vanished send anything at all. TCP
/// keepalive finds both: once the client's socket is gone (here its closed socket's
/// `FIN_WAIT2` is cut to a second, `TCP_LINGER2`), a probe is answered with a reset,
/// and the worker frees both connections, instead of holding them for
/// `response_idle_secs` (an hour). The client is Python's: Rust's sockets offer no
/// `TCP_LINGER2`.
#[test]
fn a_client_that_closed_behind_a_silent_app_is_found_by_keepalive_probes() {
    let app = silent_app();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        // The client's end of stream alone would end the relay with the default
        // `abort_on_client_close`: off, only the probes find it.
        extra: "[timeouts]\nclient_tcp_keepalive_secs = 1\nclient_tcp_keepalive_interval_secs = 1\nclient_tcp_keepalive_probes = 3\n\n[upstream]\nabort_on_client_close = false\n".into(),
        ..Default::default()
    });
    let client = format!(
        r#"
import socket
s = socket.create_connection(("127.0.0.1", {port}))
s.sendall(b"GET /events HTTP/1.1\r\nHost: t\r\n\r\n")
seen = b""
while b"data: 1" not in seen:
    got = s.recv(4096)
    assert got, seen
    seen += got
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_LINGER2, 1)
s.close()
"#,
        port = w.port
    );
    let out = Command::new("python3")
        .args(["-c", &client])
        .output()
        .expect("python3 runs the client");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("the app's connection closed", || {
        app.closed.load(Ordering::SeqCst) == 1
    });
    eventually("the slot freed", || {
        metric(&w, "appproxy_connections_active") == 0
    });
}
