//! What one client can do to the others through the HTTP/2 paths, on raw sockets:
//! an HTTP/2 app's DATA after a bodiless answer (204, 304) never reaches the
//! client as a body (on a kept-alive HTTP/1.1 connection it would be read as the
//! next response); request bodies sent over HTTP/2 below `[limits] min_body_rate`
//! are cut as HTTP/1.1 ones are (to HTTP/1.1 and HTTP/2 apps, and bridged HTTP/1.1
//! clients of `http2` circuits), freeing the app connection they held; and clients
//! that never read their downloads from an `http2` app do not stall the other
//! clients of that app, which share the core's HTTP/2 connection to it; streams
//! to HTTP/2 apps are held to a per-core budget shared by address (what stalled
//! clients make the worker buffer); a burst of streams dials one app connection
//! per `max_concurrent_streams` of them, not one each; an HTTP/2 app's complete early
//! answer, reset with `NO_ERROR` while a bridged client's body goes on, is relayed.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Upstream, Worker, WorkerOpts};

use appproxy_test_support::h2frames::{
    frame, read_frame, request as req, serve_raw_app, status, Frame, ACK, DATA, END_HEADERS,
    END_STREAM, HEADERS, RST_STREAM, SETTINGS,
};
use appproxy_test_support::net::ReadUninterrupted;

/// The response an HTTP/1.1 app would have to make for a client to take it as the
/// next answer on its connection.
const INJECTED: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nX-Injected: yes\r\n\r\nINJECTED-BODY";

/// An HTTP/2 app on raw frames that answers every stream with the static-table
/// `:status` byte `status` (0x89: 204, 0x8b: 304), then DATA [`INJECTED`] with
/// END_STREAM: a body a bodiless answer must not have.
fn bodiless_app(status: u8) -> SocketAddr {
    raw_app(move |&(ty, flags, id, _)| {
        let mut out = Vec::new();
        if (ty == HEADERS || ty == DATA) && flags & END_STREAM != 0 {
            out.extend(frame(HEADERS, END_HEADERS, id, &[status]));
            out.extend(frame(DATA, END_STREAM, id, INJECTED));
        }
        out
    })
}

/// An HTTP/2 app on raw frames answering every stream, once its request has ended,
/// with the head `fields` (HPACK literals, as written) and the body `body`.
fn answering_app(
    fields: &'static [(&'static [u8], &'static [u8])],
    body: &'static [u8],
) -> SocketAddr {
    raw_app(move |&(ty, flags, id, _)| {
        let mut out = Vec::new();
        if (ty == HEADERS || ty == DATA) && flags & END_STREAM != 0 {
            let head = appproxy_test_support::h2frames::block(fields);
            out.extend(frame(HEADERS, END_HEADERS, id, &head));
            out.extend(frame(DATA, END_STREAM, id, body));
        }
        out
    })
}

/// An HTTP/2 app on raw frames answering each frame it reads with `answer`'s
/// frames, one thread per connection.
fn raw_app(answer: impl Fn(&Frame) -> Vec<u8> + Copy + Send + 'static) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            std::thread::spawn(move || serve_raw_app(s, answer));
        }
    });
    addr
}

/// The head of the worker's answer to an HTTP/1.1 `GET /` with `Host: host`, on a
/// connection of its own.
fn answer_head(w: &Worker, host: &str) -> String {
    let mut s = sent(
        w,
        format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
    );
    let got = read_heads(&mut s, 1);
    let text = String::from_utf8_lossy(&got).into_owned();
    text.split("\r\n\r\n").next().unwrap_or_default().to_owned()
}

/// A worker whose one circuit is `protocol = "http2"` to `app`, with `extra` in its
/// config.
fn http2_worker(app: SocketAddr, extra: &str) -> Worker {
    Worker::start(WorkerOpts {
        upstreams: vec![app],
        circuit_extra: "protocol = \"http2\"".into(),
        extra: extra.into(),
        ..Default::default()
    })
}

/// A connection to the worker on which `request` was sent (reads time out after
/// 20 s).
fn sent(w: &Worker, request: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(request).expect("write");
    s
}

/// Reads from `s` until `heads` response heads are in; returns everything read.
fn read_heads(s: &mut TcpStream, heads: usize) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.windows(4).filter(|w| w == b"\r\n\r\n").count() < heads {
        assert!(Instant::now() < deadline, "no answer: {got:?}");
        match s.read_uninterrupted(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read: {e}; got {:?}", String::from_utf8_lossy(&got)),
        }
    }
    got
}

/// An HTTP/2 app's `content-length` reaches an HTTP/1.1 client as one canonical
/// field: two equal ones (which `h2` accepts) or a zero-padded one would otherwise
/// pass as written, and a client or a cache behind it may read two lengths as a
/// framing error or pick another. Before, both fields went out as the app sent them.
#[test]
fn an_http2_apps_content_length_reaches_http1_clients_as_one_canonical_field() {
    let app = answering_app(
        &[
            (b":status", b"200"),
            (b"content-length", b"005"),
            (b"content-length", b"5"),
        ],
        b"hello",
    );
    let w = http2_worker(app, "");
    let head = answer_head(&w, "127.0.0.1").to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let lengths: Vec<&str> = head
        .lines()
        .filter_map(|l| l.strip_prefix("content-length:"))
        .map(str::trim)
        .collect();
    assert_eq!(lengths, ["5"], "{head}");
}

/// An HTTP/2 app's status past 599 (invalid, RFC 9110 §15) is the relay's 502 to
/// HTTP/1.1 and HTTP/2 clients alike, as on the HTTP/1.1 app path; 599 is relayed.
/// Before, 600 to 999 went out as the app sent them.
#[test]
fn an_http2_apps_status_past_599_is_a_502() {
    let app = raw_app(|&(ty, flags, id, _)| {
        let mut out = Vec::new();
        if (ty == HEADERS || ty == DATA) && flags & END_STREAM != 0 {
            // Answers in turn: 600, 999, 599 (HTTP/1.1 clients), 600, 599 (HTTP/2).
            static ANSWERED: AtomicUsize = AtomicUsize::new(0);
            let code: &[u8] = match ANSWERED.fetch_add(1, Ordering::SeqCst) {
                0 | 3 => b"600",
                1 => b"999",
                _ => b"599",
            };
            let head = appproxy_test_support::h2frames::block(&[
                (b":status", code),
                (b"content-length", b"2"),
            ]);
            out.extend(frame(HEADERS, END_HEADERS, id, &head));
            out.extend(frame(DATA, END_STREAM, id, b"ok"));
        }
        out
    });
    let w = http2_worker(app, "");
    let mut statuses = Vec::new();
    for _ in 0..3 {
        // A connection each: the bridge's refusal closes its client's connection.
        let mut s = sent(&w, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // One answer: its head, then the body its length gives.
        let whole = |got: &[u8]| {
            let text = String::from_utf8_lossy(got).to_ascii_lowercase();
            let (head, body) = text.split_once("\r\n\r\n")?;
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())?;
            (body.len() >= len).then(|| head.to_owned())
        };
        let head = loop {
            if let Some(head) = whole(&got) {
                break head;
            }
            match s.read_uninterrupted(&mut buf) {
                Ok(0) => panic!("closed: {:?}", String::from_utf8_lossy(&got)),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("read: {e}; got {:?}", String::from_utf8_lossy(&got)),
            }
        };
        statuses.push(head.lines().next().unwrap_or_default().to_owned());
        if head.starts_with("http/1.1 502") {
            assert!(
                String::from_utf8_lossy(&got).contains("upstream_invalid_response"),
                "{got:?}"
            );
        }
    }
    assert!(statuses[0].starts_with("http/1.1 502"), "{statuses:?}");
    assert!(statuses[1].starts_with("http/1.1 502"), "{statuses:?}");
    assert!(statuses[2].starts_with("http/1.1 599"), "{statuses:?}");
    // An HTTP/2 client's streams, through the same connection to the app.
    for want in ["502", "599"] {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "20", "--http2-prior-knowledge"])
            .args(["-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://127.0.0.1:{}/", w.port))
            .output()
            .expect("curl must be installed (.ci/run installs it)");
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{out:?}");
    }
}

/// An HTTP/2 app's cookies lose their `Domain` (on a wildcard circuit they would
/// reach every circuit of the domain), for HTTP/1.1 clients (the bridge) and HTTP/2
/// ones, as an HTTP/1.1 app's do (`app_attack.rs`).
#[test]
fn an_http2_apps_cookies_are_host_only() {
    let app = answering_app(
        &[
            (b":status", b"200"),
            (b"set-cookie", b"s=1; Domain=apps.test; Path=/"),
            (b"set-cookie", b"t=2; Secure"),
            (b"content-length", b"2"),
        ],
        b"ok",
    );
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        worker_extra: "frontend_mode = \"wildcard\"\nwildcard_domain = \".apps.test\"\nwildcard_traffic_port = {PORT}".into(),
        circuit_extra: "protocol = \"http2\"\nopen_to_public = true\nfrontend_mode = \"wildcard\"\nsubdomain = \"alpha\"\n".into(),
        ..Default::default()
    });
    let want = ["s=1; Path=/", "t=2; Secure"];
    let head = answer_head(&w, "alpha.apps.test");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let cookies: Vec<&str> = head
        .lines()
        .filter_map(|l| l.strip_prefix("set-cookie: "))
        .collect();
    assert_eq!(cookies, want, "HTTP/1.1: {head}");
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--http2-prior-knowledge"])
        .args(["-o", "/dev/null", "-D", "-", "-H", "Host: alpha.apps.test"])
        .arg(format!("http://127.0.0.1:{}/", w.port))
        .output()
        .expect("curl must be installed (.ci/run installs it)");
    let head = String::from_utf8_lossy(&out.stdout).into_owned();
    let cookies: Vec<&str> = head
        .lines()
        .filter_map(|l| l.strip_prefix("set-cookie: "))
        .map(str::trim_end)
        .collect();
    assert_eq!(cookies, want, "HTTP/2: {head}");
}

/// An HTTP/1.0 keep-alive client of an HTTP/2 app is told its connection goes on
/// (`Connection: keep-alive`), as on the HTTP/1.1 app path, and is served again on
/// it. Before, the bridge said nothing, and such a client took the connection to
/// end with the answer.
#[test]
fn an_http10_keep_alive_client_of_an_http2_app_is_told_its_connection_goes_on() {
    let app = answering_app(&[(b":status", b"200"), (b"content-length", b"2")], b"ok");
    let w = http2_worker(app, "");
    let mut c = common::Client::connect(w.addr());
    for path in ["/one", "/two"] {
        c.send(format!("GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").as_bytes());
        let r = c.response();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.text(), "ok", "{path}");
        assert_eq!(
            r.header("connection"),
            Some("keep-alive"),
            "{path}: {:?}",
            r.headers
        );
    }
}

#[test]
fn data_after_a_bodiless_answer_of_an_http2_app_never_reaches_the_client() {
    for (status, code) in [(0x89u8, "204 No Content"), (0x8b, "304 Not Modified")] {
        let app = bodiless_app(status);
        let w = http2_worker(app, "");
        // HTTP/1.1 client, kept alive: the second answer is the app's second answer,
        // never the DATA that followed the first.
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        s.write_all(get("/first").as_bytes()).expect("write");
        let first = read_heads(&mut s, 1);
        let text = String::from_utf8_lossy(&first).into_owned();
        assert!(text.starts_with(&format!("HTTP/1.1 {code}\r\n")), "{text}");
        s.write_all(get("/second").as_bytes()).expect("write");
        let both = [first, read_heads(&mut s, 1)].concat();
        let text = String::from_utf8_lossy(&both).into_owned();
        let second = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        assert!(
            second.starts_with(&format!("HTTP/1.1 {code}\r\n")),
            "{text}"
        );
        assert!(
            !text.contains("INJECTED") && !text.contains("X-Injected"),
            "{text}"
        );
        // HTTP/2 client: the answer's stream carries no DATA payload.
        let mut h = appproxy_test_support::h2frames::connect(w.addr());
        h.write_all(&frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &req("GET", "/h2", &[]),
        ))
        .expect("write");
        let mut data = Vec::new();
        let mut status_seen = false;
        loop {
            let (ty, flags, id, p) = read_frame(&mut h).expect("the stream ends");
            if id != 1 {
                continue;
            }
            match ty {
                HEADERS => status_seen = true,
                DATA => data.extend_from_slice(&p),
                RST_STREAM => break,
                _ => {}
            }
            if flags & END_STREAM != 0 {
                break;
            }
        }
        assert!(status_seen);
        assert!(data.is_empty(), "{:?}", String::from_utf8_lossy(&data));
    }
}

/// An HTTP/1.1 app that reads each request's body whole (its `content-length`),
/// answers `200 ok` and closes; counts the connections the worker holds open to it.
struct CountingApp {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
}

impl CountingApp {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let open = Arc::new(AtomicUsize::new(0));
        let count = open.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let count = count.clone();
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    Self::serve(&mut s);
                    count.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self { addr, open }
    }

    fn serve(s: &mut TcpStream) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
        let mut got = Vec::new();
        let mut buf = [0u8; 16384];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if got.len() >= end + 4 + length {
                    let _ = s.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    );
                    return;
                }
            }
            match s.read_uninterrupted(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// Frames read from `s` by a thread of their own, as they come.
fn frames_of(s: &TcpStream) -> mpsc::Receiver<Frame> {
    let mut r = s.try_clone().expect("clone");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        while let Some(f) = read_frame(&mut r) {
            if tx.send(f).is_err() {
                return;
            }
        }
    });
    rx
}

/// How a stream ended for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Status(u16),
    Reset,
}

/// Over one HTTP/2 connection: stream 1 trickles its body (1 byte per 250 ms,
/// far below the floor), stream 3 sends 6,000 bytes at twice `min_body_rate =
/// 1000` (500 bytes per 250 ms). `content_type`: the slow stream's, when it claims
/// one. Returns how each ended.
fn trickle_and_keep_up(addr: SocketAddr, content_type: Option<&str>) -> (End, End) {
    let mut s = appproxy_test_support::h2frames::connect(addr);
    let frames = frames_of(&s);
    for (id, path, length) in [(1u32, "/slow", "100000"), (3, "/steady", "6000")] {
        let mut fields: Vec<(&[u8], &[u8])> = vec![(b"content-length", length.as_bytes())];
        if let (1, Some(t)) = (id, content_type) {
            fields.push((b"content-type", t.as_bytes()));
        }
        let head = req("POST", path, &fields);
        s.write_all(&frame(HEADERS, END_HEADERS, id, &head))
            .expect("write");
    }
    let mut ends: [Option<End>; 2] = [None, None];
    let mut steady_sent = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while ends.iter().any(Option::is_none) {
        assert!(
            Instant::now() < deadline,
            "streams not ended: slow {:?}, steady {:?}",
            ends[0],
            ends[1]
        );
        if ends[0].is_none() {
            // A write to a stream the worker reset is fine: it ignores the frame.
            let _ = s.write_all(&frame(DATA, 0, 1, b"a"));
        }
        if steady_sent < 6000 {
            steady_sent += 500;
            let flags = if steady_sent == 6000 { END_STREAM } else { 0 };
            let _ = s.write_all(&frame(DATA, flags, 3, &[b's'; 500]));
        }
        let tick = Instant::now() + Duration::from_millis(250);
        while let Ok((ty, _, id, p)) =
            frames.recv_timeout(tick.saturating_duration_since(Instant::now()))
        {
            let slot = match id {
                1 => 0,
                3 => 1,
                _ => continue,
            };
            if ends[slot].is_some() {
                continue;
            }
            match ty {
                HEADERS => ends[slot] = Some(End::Status(status(&p))),
                RST_STREAM => ends[slot] = Some(End::Reset),
                _ => {}
            }
        }
    }
    (
        ends[0].expect("slow stream ended"),
        ends[1].expect("steady stream ended"),
    )
}

/// The worker's count of bodies cut for their rate.
fn body_rate_timeouts(w: &Worker) -> u64 {
    let line = "appproxy_timeouts_total{core=\"0\",kind=\"client_body_rate\"} ";
    w.admin_get("/metrics")
        .text()
        .lines()
        .find_map(|l| l.strip_prefix(line))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

const FLOOR: &str = "[timeouts]\nbody_idle_secs = 2\n[limits]\nmin_body_rate = 1000\n";

#[test]
fn http2_request_bodies_below_the_rate_floor_are_cut_and_free_the_app() {
    // To an HTTP/1.1 app: the trickling stream gets 408, the app connection it held
    // is closed; the stream at twice the floor's rate is answered.
    let app = CountingApp::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        extra: FLOOR.into(),
        ..Default::default()
    });
    let (slow, steady) = trickle_and_keep_up(w.addr(), None);
    assert_eq!(slow, End::Status(408));
    assert_eq!(steady, End::Status(200));
    common::eventually("the app connections are closed", || app.open() == 0);
    common::eventually("the 408 is counted as the floor's", || {
        body_rate_timeouts(&w) == 1
    });
}

#[test]
fn bodies_to_http2_apps_below_the_rate_floor_are_cut() {
    // The app is a second worker serving h2c, with no floor of its own: what cuts
    // the trickle is the front worker's.
    let app = CountingApp::start();
    let h2app = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        extra: "[timeouts]\nbody_idle_secs = 600\n[limits]\nmin_body_rate = 0\n".into(),
        ..Default::default()
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![h2app.addr()],
        extra: FLOOR.into(),
        circuit_extra: "protocol = \"http2\"".into(),
        ..Default::default()
    });
    let (slow, steady) = trickle_and_keep_up(w.addr(), None);
    assert!(matches!(slow, End::Status(408) | End::Reset), "{slow:?}");
    assert_eq!(steady, End::Status(200));
    // The app's stream was reset: the second worker dropped its app connection.
    common::eventually("the app connections are closed", || app.open() == 0);
    // A stream claiming to be a gRPC call is no exemption on an `http2` circuit:
    // only `grpc` circuits are exempt.
    // (Cut before its answer, it gets the trailers-only gRPC error, `:status` 200;
    // the app's own 200 would need the whole body; the count below is the floor's.)
    let (slow, steady) = trickle_and_keep_up(w.addr(), Some("application/grpc"));
    assert!(matches!(slow, End::Status(200) | End::Reset), "{slow:?}");
    assert_eq!(steady, End::Status(200));
    common::eventually("the app connections are closed", || app.open() == 0);
    // An HTTP/1.1 client of the same circuit (bridged) trickling its body: 408.
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(250)))
        .expect("timeout");
    s.write_all(b"POST /bridged HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n")
        .expect("write");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        assert!(Instant::now() < deadline, "the trickle was never cut");
        let _ = s.write_all(b"a");
        match s.read_uninterrupted(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(text.contains("request_body_too_slow"), "{text}");
    common::eventually("the three cuts are counted as the floor's", || {
        body_rate_timeouts(&w) == 3
    });
}

/// The test app behind a worker serving it over h2c, and a front worker whose
/// `http2` circuit leads there with `front_extra` in its config; neither cuts a
/// stalled download during a test. Keep all three alive.
fn patient_http2_app(front_extra: &str) -> (Upstream, Worker, Worker) {
    let up = Upstream::start();
    let patient = "[timeouts]\nbody_idle_secs = 600\nresponse_idle_secs = 600\n";
    let h2app = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        extra: patient.into(),
        ..Default::default()
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![h2app.addr()],
        extra: format!("{patient}{front_extra}"),
        circuit_extra: "protocol = \"http2\"".into(),
        ..Default::default()
    });
    (up, h2app, w)
}

#[test]
fn clients_that_never_read_do_not_stall_the_others_of_an_http2_app() {
    let (_up, _h2app, w) = patient_http2_app("");
    // Sixteen HTTP/1.1 clients with tiny receive buffers ask for 50 MB each and
    // never read past the first bytes: together their streams could hold many
    // times the default 1 MiB connection window.
    let mut stalled = Vec::new();
    for k in 0..16 {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.set_recv_buffer_size(4096).expect("rcvbuf");
        sock.connect(&w.addr().into()).expect("connect");
        let mut s: TcpStream = sock.into();
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        write!(
            s,
            "GET /bytes?n=50000000&k={k} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        .expect("write");
        // Its answer started (so its stream is open and filling).
        let mut one = [0u8; 1];
        assert_eq!(s.peek(&mut one).expect("answer"), 1);
        stalled.push(s);
    }
    // Another client of the same app gets its whole download.
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(b"GET /bytes?n=4000000 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut all = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        match s.read_uninterrupted(&mut buf) {
            Ok(0) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) => panic!("the download stalled after {} bytes: {e}", all.len()),
        }
    }
    let head_end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    assert!(all.starts_with(b"HTTP/1.1 200 "));
    assert_eq!(all.len() - head_end, 4_000_000);
    drop(stalled);
}

#[test]
fn streams_to_http2_apps_are_held_to_a_per_core_budget_and_a_share_per_address() {
    let (_up, _h2app, w) =
        patient_http2_app("[http2]\nmax_app_streams = 32\nmax_app_streams_per_address = 4\n");
    // One client connection whose streams never get a byte of window
    // (SETTINGS_INITIAL_WINDOW_SIZE = 0) asks for 40 big downloads: each stream
    // given a place would make the worker buffer its window from the app. (No
    // HPACK dynamic table either, so that every `:status` reads alone.)
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    let mut hello = appproxy_test_support::h2frames::PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[0, 1, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0]));
    s.write_all(&hello).expect("preface");
    let frames = frames_of(&s);
    for k in 0..40u32 {
        let path = format!("/bytes?n=5000000&k={k}");
        let head = req("GET", &path, &[]);
        s.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1 + 2 * k, &head))
            .expect("write");
    }
    // Half the budget (16) is answered; past it this address holds more than its
    // share (4): the other 24 streams are refused with 503 `app_stream_limit`.
    let mut heads: std::collections::HashMap<u32, u16> = Default::default();
    let mut refusals = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while heads.len() < 40 {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((ty, flags, id, p)) = frames.recv_timeout(left) else {
            panic!("only {} heads came: {heads:?}", heads.len());
        };
        if ty == SETTINGS && flags & ACK == 0 {
            let _ = s.write_all(&frame(SETTINGS, ACK, 0, &[]));
        }
        if ty == HEADERS && id % 2 == 1 && !heads.contains_key(&id) {
            heads.insert(id, status(&p));
        }
        if ty == DATA && String::from_utf8_lossy(&p).contains("app_stream_limit") {
            refusals += 1;
        }
    }
    let answered = heads.values().filter(|&&c| c == 200).count();
    let refused = heads.values().filter(|&&c| c == 503).count();
    assert_eq!((answered, refused), (16, 24), "{heads:?}");
    // The 503 bodies are flow-controlled too: with no window, none came yet.
    assert_eq!(refusals, 0);
    // Another address still gets its whole download through the same app.
    let all = answered_to_another_address(&w, "/bytes?n=1000000");
    let head_end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    assert_eq!(all.len() - head_end, 1_000_000);
    common::eventually("the refusals are counted", || {
        common::metric(&w, "appproxy_http2_app_stream_limit_total") == 24
    });
    drop(s);
}

/// A GET of `path` from another address (127.0.0.2), on a connection of its own:
/// answered 200; all it read, head and body, to the close.
fn answered_to_another_address(w: &Worker, path: &str) -> Vec<u8> {
    let mut o =
        appproxy_test_support::net::connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), w.addr())
            .expect("connect from 127.0.0.2");
    o.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    o.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .expect("write");
    let mut all = Vec::new();
    o.read_to_end(&mut all).expect("read");
    assert!(
        all.starts_with(b"HTTP/1.1 200 "),
        "{:?}",
        String::from_utf8_lossy(&all[..all.len().min(300)])
    );
    all
}

/// A TCP relay to `to` that counts the connections made to it.
fn counting_relay(to: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(a) = s else { continue };
            c.fetch_add(1, Ordering::SeqCst);
            let Ok(b) = TcpStream::connect(to) else {
                continue;
            };
            for (mut from, mut into) in [
                (a.try_clone().expect("clone"), b.try_clone().expect("clone")),
                (b, a),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    (addr, count)
}

#[test]
fn a_burst_of_streams_to_an_http2_app_dials_one_connection_per_four() {
    // The app (a second worker serving h2c) holds every `/sse` answer open after
    // its first event until the gate opens, so the burst's streams all stay open.
    let up = Upstream::start();
    let h2app = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        ..Default::default()
    });
    let (relay, dialed) = counting_relay(h2app.addr());
    let w = Worker::start(WorkerOpts {
        upstreams: vec![relay],
        extra: "[http2]\nmax_concurrent_streams = 4\n".into(),
        circuit_extra: "protocol = \"http2\"".into(),
        ..Default::default()
    });
    // 20 clients at once: 20 streams, at most 4 on one connection to the app.
    const N: usize = 20;
    let start = Arc::new(std::sync::Barrier::new(N));
    let clients: Vec<_> = (0..N)
        .map(|k| {
            let (addr, start) = (w.addr(), start.clone());
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(20)))
                    .expect("timeout");
                start.wait();
                write!(s, "GET /sse?k={k} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").expect("write");
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(5).any(|w| w == b"first") {
                    match s.read_uninterrupted(&mut buf) {
                        Ok(0) | Err(_) => {
                            panic!("stream {k}: {:?}", String::from_utf8_lossy(&got))
                        }
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                s
            })
        })
        .collect();
    let open: Vec<TcpStream> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    // Every stream is open at the app: ceil(20 / 4) = 5 connections carry them.
    assert_eq!(dialed.load(Ordering::SeqCst), N.div_ceil(4));
    up.open_gate();
    drop(open);
}

/// An HTTP/2 app that answers each stream as soon as its head arrives: with
/// `answer`, a complete `200` ("early", END_STREAM) first; then, either way,
/// `RST_STREAM(NO_ERROR)`, the body unread (what Go's servers and gRPC do when a
/// handler returns without reading the whole body).
fn early_answering_app(answer: bool) -> SocketAddr {
    raw_app(move |&(ty, _, id, _)| {
        let mut out = Vec::new();
        if ty == HEADERS {
            if answer {
                let head = appproxy_test_support::h2frames::block(&[
                    (b":status", b"200"),
                    (b"content-length", b"5"),
                ]);
                out.extend(frame(HEADERS, END_HEADERS, id, &head));
                out.extend(frame(DATA, END_STREAM, id, b"early"));
            }
            out.extend(frame(RST_STREAM, 0, id, &[0, 0, 0, 0]));
        }
        out
    })
}

/// A complete early answer from an HTTP/2 app, followed by `RST_STREAM(NO_ERROR)`
/// while an HTTP/1.1 client's body is still going (larger than the app's stream
/// window), reaches the client (RFC 9113 §8.1: the client must not discard it), and
/// the connection closes after it since the rest of the body was not read. Before,
/// the client got 502 `upstream_closed`. A reset with no answer is still a 502.
#[test]
fn an_http2_apps_early_answer_before_its_reset_reaches_an_http1_client() {
    for (answer, want) in [(true, "HTTP/1.1 200"), (false, "HTTP/1.1 502")] {
        let w = Worker::start(WorkerOpts {
            upstreams: vec![early_answering_app(answer)],
            circuit_extra: "protocol = \"http2\"".into(),
            ..Default::default()
        });
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        const BODY: usize = 200_000;
        s.write_all(
            format!("POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {BODY}\r\n\r\n")
                .as_bytes(),
        )
        .expect("write");
        // The body goes from another thread: the worker stops reading it.
        let mut writer = s.try_clone().expect("clone");
        std::thread::spawn(move || {
            let _ = writer.write_all(&vec![b'x'; BODY]);
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read_uninterrupted(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                // The lingering close may end with a reset once the answer is read.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("read: {e}; got {:?}", String::from_utf8_lossy(&got)),
            }
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        assert!(text.starts_with(want), "{text}");
        if answer {
            assert!(text.ends_with("\r\n\r\nearly"), "{text}");
            assert!(
                text.to_ascii_lowercase().contains("connection: close\r\n"),
                "{text}"
            );
        }
    }
}

/// An HTTP/2 app that resets its stream 5,000 bytes into an answer: the bridged
/// HTTP/1.1 client's connection is closed short of the body's end, and the access
/// line gives the app's status and the bytes that went (it said status 0, nothing
/// out, as if no answer had started).
#[test]
fn an_http2_apps_answer_cut_part_way_is_logged_with_its_status_and_bytes() {
    let app = raw_app(|&(ty, flags, id, _)| {
        let mut out = Vec::new();
        if (ty == HEADERS || ty == DATA) && flags & END_STREAM != 0 {
            // :status 200 (static table index 8), 5,000 bytes, then a reset.
            out.extend(frame(HEADERS, END_HEADERS, id, &[0x88]));
            out.extend(frame(DATA, 0, id, &[b'c'; 5000]));
            out.extend(frame(RST_STREAM, 0, id, &[0, 0, 0, 2]));
        }
        out
    });
    let w = http2_worker(app, "");
    let mut s = sent(
        &w,
        b"GET /cut HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Backend-Request-ID: cut-3\r\n\r\n",
    );
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.ends_with("\r\n0\r\n\r\n"),
        "never ended like a whole body"
    );
    let access = w.wait_access_line("cut-3");
    assert_eq!(access["status"], 200, "{access}");
    assert_eq!(access["bytes_out"], 5000, "{access}");
    assert_eq!(access["upstream"], app.to_string(), "{access}");
    // The request's head read, as for an answer relayed whole; the bytes out
    // counted once (the bridge counts them as they go).
    assert_eq!(access["bytes_in"], 67, "{access}");
    assert_eq!(common::metric(&w, "appproxy_bytes_out_total"), 5000);
}

/// Streams to an HTTP/1.1 app that announce a body and never send a byte of it
/// hold no app connection, but each holds its parsed head, tens of KiB when HPACK
/// repeats a large field for a few bytes on the wire: a tester's client took a
/// worker from 11 MB to 2.25 GB with 4 MB sent. Such streams now take their place
/// in the core's budget of streams to apps as they open (`max_app_streams`, 32
/// here, shared by address once half is taken: 4), so one client holds at most
/// half the budget, the rest of its streams being refused 503 `app_stream_limit`,
/// and another address is still served. Before, all 40 waited.
#[test]
fn streams_waiting_for_a_body_that_never_comes_are_held_to_the_stream_budget() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        extra: "[http2]\nmax_app_streams = 32\nmax_app_streams_per_address = 4\n".into(),
        ..Default::default()
    });
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    let mut hello = appproxy_test_support::h2frames::PREFACE.to_vec();
    // No HPACK dynamic table, so that every `:status` reads alone.
    hello.extend(frame(SETTINGS, 0, 0, &[0, 1, 0, 0, 0, 0]));
    s.write_all(&hello).expect("preface");
    let frames = frames_of(&s);
    let head = req("POST", "/upload", &[(b"content-length", b"10")]);
    for k in 0..40u32 {
        s.write_all(&frame(HEADERS, END_HEADERS, 1 + 2 * k, &head))
            .expect("write");
    }
    // 16 wait for their bodies (no answer); 24 are refused at once.
    let mut refused = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while refused.len() < 24 {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((ty, flags, id, p)) = frames.recv_timeout(left) else {
            panic!("only {} streams were refused", refused.len());
        };
        if ty == SETTINGS && flags & ACK == 0 {
            let _ = s.write_all(&frame(SETTINGS, ACK, 0, &[]));
        }
        if ty == HEADERS && id % 2 == 1 {
            assert_eq!(status(&p), 503, "stream {id}");
            refused.insert(id);
        }
    }
    common::eventually("the refusals are counted", || {
        common::metric(&w, "appproxy_http2_app_stream_limit_total") == 24
    });
    assert_eq!(
        common::metric(&w, "appproxy_http2_streams_active"),
        16,
        "the waiting streams"
    );
    // Another address is still served by the same core.
    answered_to_another_address(&w, "/");
    drop(s);
}

/// The head of the worker's answer to `GET /` with `Host: host` from an HTTP/2 client
/// (curl, with prior knowledge), which must read the response: its nghttp2 refuses
/// a whole response with one malformed field.
fn h2_answer_head(w: &Worker, host: &str) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--http2-prior-knowledge"])
        .args(["-o", "/dev/null", "-D", "-", "-H"])
        .arg(format!("Host: {host}"))
        .arg(format!("http://127.0.0.1:{}/", w.port))
        .output()
        .expect("curl must be installed (.ci/run installs it)");
    let head = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(
        out.status.success(),
        "HTTP/2 client refused the answer: {} {head}",
        String::from_utf8_lossy(&out.stderr)
    );
    head
}

/// The values of the fields named `name` (lowercase) in the head `head`.
fn fields_named<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

/// An HTTP/2 app's hop-by-hop fields (`Proxy-Authenticate`, `Proxy-Authorization`,
/// `HTTP2-Settings`) stay on its hop, for HTTP/1.1 clients (the bridge) and HTTP/2
/// ones, as an HTTP/1.1 app's do (`app_attack.rs`): one rule on every path. Before,
/// they reached HTTP/2 clients, and `Proxy-Authenticate` HTTP/1.1 ones.
#[test]
fn an_http2_apps_hop_by_hop_fields_stay_on_its_hop() {
    let app = answering_app(
        &[
            (b":status", b"200"),
            (b"proxy-authenticate", b"Basic realm=\"app\""),
            (b"proxy-authorization", b"Basic eDp5"),
            (b"http2-settings", b"AAMAAABkAARAAAAAAAIAAAAA"),
            (b"x-kept", b"yes"),
            (b"content-length", b"2"),
        ],
        b"ok",
    );
    let w = http2_worker(app, "");
    for (what, head) in [
        ("HTTP/1.1", answer_head(&w, "127.0.0.1")),
        ("HTTP/2", h2_answer_head(&w, "127.0.0.1")),
    ] {
        assert!(head.starts_with("HTTP/"), "{what}: {head}");
        assert_eq!(fields_named(&head, "x-kept"), ["yes"], "{what}: {head}");
        for name in [
            "proxy-authenticate",
            "proxy-authorization",
            "http2-settings",
        ] {
            assert!(
                fields_named(&head, name).is_empty(),
                "{what}: {name} relayed: {head}"
            );
        }
    }
}

/// An HTTP/2 app's field value with whitespace around it (malformed in HTTP/2, RFC
/// 9113 §8.2.1) reaches clients trimmed, as an HTTP/1.1 app's does: an HTTP/2
/// client reads the response. Before, the value went on as sent and the client
/// refused the whole response.
#[test]
fn an_http2_apps_padded_field_values_reach_http2_clients_trimmed() {
    let app = answering_app(
        &[
            (b":status", b"200"),
            (b"x-a", b" spaced "),
            (b"x-b", b"\ttabbed"),
            (b"content-length", b"2"),
        ],
        b"ok",
    );
    let w = http2_worker(app, "");
    let head = h2_answer_head(&w, "127.0.0.1");
    assert!(head.starts_with("HTTP/2 200"), "{head}");
    assert!(head.contains("\nx-a: spaced\n"), "{head:?}");
    assert!(head.contains("\nx-b: tabbed\n"), "{head:?}");
    let head = answer_head(&w, "127.0.0.1");
    assert!(head.contains("\r\nx-a: spaced\r\n"), "{head:?}");
}

/// An HTTP/2 app's `Clear-Site-Data` never reaches the client (HTTP/1.1 or HTTP/2):
/// over HTTPS a browser would clear the cookies of the whole registrable domain,
/// every user's permit cookie for the other apps among them (as an HTTP/1.1 app's,
/// `app_attack.rs`). Before, it was relayed.
#[test]
fn an_http2_apps_clear_site_data_never_reaches_the_client() {
    let app = answering_app(
        &[
            (b":status", b"200"),
            (b"clear-site-data", b"\"cookies\", \"storage\""),
            (b"x-kept", b"yes"),
            (b"content-length", b"2"),
        ],
        b"ok",
    );
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        worker_extra: "frontend_mode = \"wildcard\"\nwildcard_domain = \".apps.test\"\nwildcard_traffic_port = {PORT}".into(),
        circuit_extra: "protocol = \"http2\"\nopen_to_public = true\nfrontend_mode = \"wildcard\"\nsubdomain = \"alpha\"\n".into(),
        ..Default::default()
    });
    for (what, head) in [
        ("HTTP/1.1", answer_head(&w, "alpha.apps.test")),
        ("HTTP/2", h2_answer_head(&w, "alpha.apps.test")),
    ] {
        assert_eq!(fields_named(&head, "x-kept"), ["yes"], "{what}: {head}");
        assert!(
            fields_named(&head, "clear-site-data").is_empty(),
            "{what}: relayed: {head}"
        );
    }
}

/// An app's answer on stream `id`: `n` interim heads of `fields` (a `:status`
/// first), then `200` with the body `ok`.
fn interim_then_ok(fields: &[(&[u8], &[u8])], n: usize, id: u32) -> Vec<u8> {
    let early = appproxy_test_support::h2frames::block(fields);
    let mut out = Vec::new();
    for _ in 0..n {
        out.extend(frame(HEADERS, END_HEADERS, id, &early));
    }
    out.extend(ok_answer(id));
    out
}

/// `200` with the body `ok` on stream `id`.
fn ok_answer(id: u32) -> Vec<u8> {
    let head =
        appproxy_test_support::h2frames::block(&[(b":status", b"200"), (b"content-length", b"2")]);
    let mut out = frame(HEADERS, END_HEADERS, id, &head);
    out.extend(frame(DATA, END_STREAM, id, b"ok"));
    out
}

/// An early hint.
const EARLY: &[(&[u8], &[u8])] = &[(b":status", b"103"), (b"link", b"</a.css>; rel=preload")];

/// An HTTP/2 app's interim heads are held to the limit an HTTP/1.1 app's are: the
/// first five are relayed, and a sixth ends the exchange with a 502, for HTTP/1.1
/// clients (the bridge) and HTTP/2 ones alike. Before, the heads past the fifth
/// were read and dropped without end (each decoded, for as long as the head
/// timeout: an app sending them without end held a core at 80 % for 60 s per
/// request), and the app's final answer went out after any number of them. The
/// app's connection is closed (an HTTP/1.1 app's is): kept open, it was read for
/// as long as the app sent frames on the stream the worker had reset.
#[test]
fn an_http2_apps_interim_heads_are_held_to_the_limit() {
    // Counts the app's connections, opened and closed.
    let (opened, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = l.local_addr().expect("addr");
    let (o, c) = (opened.clone(), closed.clone());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            o.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            std::thread::spawn(move || {
                serve_raw_app(s, |&(ty, flags, id, _)| {
                    if (ty == HEADERS || ty == DATA) && flags & END_STREAM != 0 {
                        interim_then_ok(EARLY, 20, id)
                    } else {
                        Vec::new()
                    }
                });
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    // An idle app connection would stay open for ten minutes: the one closed
    // below is closed for what its app did.
    let w = http2_worker(app, "[upstream]\nidle_timeout_secs = 600\n");
    // An HTTP/1.1 client: interim heads, then the first head that is none.
    let mut s = sent(&w, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    let final_head = |got: &[u8]| {
        let text = String::from_utf8_lossy(got).into_owned();
        let mut heads: Vec<String> = text.split("\r\n\r\n").map(str::to_owned).collect();
        heads.pop(); // Not yet ended by a blank line.
        heads
            .iter()
            .position(|h| !h.starts_with("HTTP/1.1 1"))
            .map(|at| (at, heads[at].clone()))
    };
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let (interim, head) = loop {
        if let Some(found) = final_head(&got) {
            break found;
        }
        match s.read_uninterrupted(&mut buf) {
            Ok(0) => panic!("closed: {:?}", String::from_utf8_lossy(&got)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read: {e}; got {:?}", String::from_utf8_lossy(&got)),
        }
    };
    assert_eq!(interim, 5, "{got:?}");
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    // The app broke the protocol on its connection: it is closed, as an HTTP/1.1
    // app's would be, and the next stream gets a new one.
    common::eventually("the app's connection closed", || {
        closed.load(Ordering::SeqCst) == 1
    });
    // An HTTP/2 client's stream.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--http2-prior-knowledge"])
        .args(["-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{}/", w.port))
        .output()
        .expect("curl must be installed (.ci/run installs it)");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "502", "{out:?}");
    common::eventually("the second connection closed", || {
        closed.load(Ordering::SeqCst) == 2
    });
    assert_eq!(opened.load(Ordering::SeqCst), 2);
}

/// A bridged HTTP/1.1 client gets an HTTP/2 app's interim heads as an HTTP/1.1
/// app's (RFC 9110 §15.2: a proxy forwards them), sanitized as the final head is:
/// no length, no request ID of the app's. An HTTP/1.0 client gets none. Before,
/// the bridge dropped them all.
#[test]
fn a_bridged_http11_client_gets_an_http2_apps_interim_heads() {
    let app = raw_app(|&(ty, flags, id, _)| {
        if (ty == HEADERS || ty == DATA) && flags & END_STREAM != 0 {
            let early: &[(&[u8], &[u8])] = &[
                (b":status", b"103"),
                (b"link", b"</a.css>; rel=preload"),
                (b"content-length", b"50"),
                (b"x-backend-request-id", b"spoofed-by-app"),
            ];
            interim_then_ok(early, 2, id)
        } else {
            Vec::new()
        }
    });
    let w = http2_worker(app, "");
    for (version, relayed) in [("1.1", 2), ("1.0", 0)] {
        let mut s = sent(
            &w,
            format!("GET / HTTP/{version}\r\nHost: 127.0.0.1\r\nX-Backend-Request-ID: bridged-1\r\n\r\n")
                .as_bytes(),
        );
        let got = read_heads(&mut s, relayed + 1);
        let text = String::from_utf8_lossy(&got).into_owned();
        let heads: Vec<&str> = text.split("\r\n\r\n").collect();
        for early in &heads[..relayed] {
            assert!(early.starts_with("HTTP/1.1 103 Early Hints\r\n"), "{text}");
            assert!(early.contains("link: </a.css>; rel=preload"), "{text}");
            assert!(!early.contains("content-length"), "{text}");
            // The worker's ID, not the app's.
            assert!(early.contains("X-Backend-Request-ID: bridged-1"), "{text}");
        }
        assert!(heads[relayed].starts_with("HTTP/1.1 200"), "{text}");
        assert!(!text.contains("spoofed-by-app"), "{text}");
    }
}

/// An HTTP/2 client gets an HTTP/2 app's interim head sanitized as the final head
/// is: no request ID of the app's, no permit cookie, cookies host-only. (Each path
/// sanitizes interim heads for its client's protocol; this is the HTTP/2 one.)
#[test]
fn an_http2_client_gets_an_http2_apps_interim_head_sanitized() {
    let app = raw_app(|&(ty, flags, id, _)| {
        if (ty == HEADERS || ty == DATA) && flags & END_STREAM != 0 {
            let early: &[(&[u8], &[u8])] = &[
                (b":status", b"103"),
                (b"link", b"</a.css>; rel=preload"),
                (b"x-backend-request-id", b"spoofed-by-app"),
                (b"set-cookie", b"appproxy_permit=stolen; Path=/"),
                (b"set-cookie", b"s=1; Domain=apps.test; Path=/"),
            ];
            interim_then_ok(early, 1, id)
        } else {
            Vec::new()
        }
    });
    let w = http2_worker(app, "");
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--http2-prior-knowledge"])
        .args(["-o", "/dev/null", "-D", "-"])
        .args(["-H", "x-backend-request-id: h2-early-1"])
        .arg(format!("http://127.0.0.1:{}/", w.port))
        .output()
        .expect("curl must be installed (.ci/run installs it)");
    let heads = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
    let early = heads
        .split("\n\n")
        .find(|h| h.starts_with("HTTP/2 103"))
        .unwrap_or_else(|| panic!("no 103 relayed: {heads}"));
    assert!(early.contains("link: </a.css>; rel=preload"), "{early}");
    assert!(
        early.contains("x-backend-request-id: h2-early-1"),
        "{early}"
    );
    assert!(!early.contains("spoofed-by-app"), "{early}");
    assert!(!early.contains("appproxy_permit"), "{early}");
    let cookies: Vec<&str> = early
        .lines()
        .filter_map(|l| l.strip_prefix("set-cookie: "))
        .collect();
    assert_eq!(cookies, ["s=1; Path=/"], "{early}");
    assert!(heads.contains("HTTP/2 200"), "{heads}");
}

/// After relaying an interim head to a bridged HTTP/1.1 client, the wait for the
/// app's next head is bounded by the head timeout, as the first was, not by the
/// client's write timeout (`body_idle_secs`) armed for the interim head's write:
/// an app that answers a while after its `103` is relayed. Before, the client's
/// deadline passed during the wait, which took the client for gone.
#[test]
fn the_head_after_an_interim_one_is_awaited_as_the_first_was() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let Ok(mut w) = s.try_clone() else { continue };
            std::thread::spawn(move || {
                serve_raw_app(s, |&(ty, flags, id, _)| {
                    if (ty == HEADERS || ty == DATA) && flags & END_STREAM != 0 {
                        let early = appproxy_test_support::h2frames::block(EARLY);
                        let _ = w.write_all(&frame(HEADERS, END_HEADERS, id, &early));
                        // Longer than the client's write timeout below.
                        std::thread::sleep(Duration::from_millis(2500));
                        ok_answer(id)
                    } else {
                        Vec::new()
                    }
                });
            });
        }
    });
    let w = http2_worker(
        app,
        "[timeouts]\nbody_idle_secs = 1\nupstream_head_secs = 30\n",
    );
    let mut s = sent(&w, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    let got = read_heads(&mut s, 2);
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(text.starts_with("HTTP/1.1 103 Early Hints\r\n"), "{text}");
    let finals: Vec<&str> = text.split("\r\n\r\n").collect();
    assert!(finals[1].starts_with("HTTP/1.1 200"), "{text}");
}
