//! The access line written at the response body's end, over real sockets: the
//! middleware in front of a tower service, served by hyper on a loopback port, asked
//! by plain TCP clients. Each request's line is waited for (bounded poll of the log),
//! and after the server is stopped (every connection task and body dropped) each
//! request still has exactly one line.
#![cfg(feature = "tower")]

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use appproxy_shared::header::IdPolicy;
use appproxy_shared::middleware::{note_access_key, RequestIdLayer, MAX_ERROR_LEN};
use appproxy_shared::telemetry::{subscriber, LogFormat, LoggingConfig};
use appproxy_shared::IdVersion;
use appproxy_test_support::http::request;
use appproxy_test_support::logs::Sink;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tower::Layer;

/// The access key every request notes.
const ACCESS_KEY: &str = "AKTESTKEY0001";
/// One chunk of a streamed test body.
static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];
/// The size of `/long`: far more than the socket buffers hold.
const LONG: u64 = 1 << 30;
/// The data a `/fail` body sends before its error.
const BEFORE_FAILURE: u64 = 3 * 1000;
/// The data a `/trailers` body sends before its trailers.
const TRAILED: u64 = 4_500;
/// What `/short` announces in its `Content-Length`, and what it sends.
const SHORT_ANNOUNCED: u64 = 10_000;
const SHORT_SENT: u64 = 4_000;

/// A test response body: `left` bytes in chunks of `chunk`, then the end, or an
/// error after `fail_after` chunks.
struct Chunks {
    left: u64,
    chunk: usize,
    /// Whether it knows its size (`size_hint` exact, `is_end_stream` once sent).
    sized: bool,
    /// Chunks sent before the error, for a failing body.
    fail_after: Option<u32>,
    sent: u32,
    /// Ends with a trailers frame (still to send), never saying it has ended.
    trailers: bool,
}

impl Chunks {
    fn streamed(len: u64, chunk: usize) -> Self {
        Self {
            left: len,
            chunk,
            sized: false,
            fail_after: None,
            sent: 0,
            trailers: false,
        }
    }
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.fail_after == Some(self.sent) {
            // Longer than an access line keeps, to see it cut.
            let text = format!("disk read failed: boom {}", "e".repeat(2 * MAX_ERROR_LEN));
            return Poll::Ready(Some(Err(std::io::Error::other(text))));
        }
        if self.left == 0 {
            if self.trailers {
                self.trailers = false;
                let mut fields = http::HeaderMap::new();
                fields.insert("x-checksum", http::HeaderValue::from_static("abc"));
                return Poll::Ready(Some(Ok(Frame::trailers(fields))));
            }
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk as u64) as usize;
        self.left -= n as u64;
        self.sent += 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&CHUNK[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.sized && self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.sized {
            SizeHint::with_exact(self.left)
        } else {
            SizeHint::default()
        }
    }
}

/// The handler: the body by path.
fn answer(path: &str) -> Response<Chunks> {
    note_access_key(ACCESS_KEY);
    let (status, body) = match path {
        "/fixed" => (
            StatusCode::OK,
            Chunks {
                sized: true,
                ..Chunks::streamed(11, 4)
            },
        ),
        "/long" => (StatusCode::OK, Chunks::streamed(LONG, CHUNK.len())),
        "/fail" => (
            StatusCode::OK,
            Chunks {
                fail_after: Some(3),
                ..Chunks::streamed(10 * 1000, 1000)
            },
        ),
        "/nocontent" => (StatusCode::NO_CONTENT, Chunks::streamed(100, 10)),
        "/trailers" => (
            StatusCode::OK,
            Chunks {
                trailers: true,
                ..Chunks::streamed(TRAILED, 1000)
            },
        ),
        "/short" => {
            // Announces more than it sends (a file cut while read).
            let mut resp = Response::new(Chunks::streamed(SHORT_SENT, 1000));
            resp.headers_mut().insert(
                http::header::CONTENT_LENGTH,
                http::HeaderValue::from(SHORT_ANNOUNCED),
            );
            return resp;
        }
        other => match other.strip_prefix("/stream/").and_then(|n| n.parse().ok()) {
            Some(n) => (StatusCode::OK, Chunks::streamed(n, 10_000)),
            None => (StatusCode::NOT_FOUND, Chunks::streamed(0, 1)),
        },
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp
}

/// The middleware in front of [`answer`], served by hyper on a loopback port from a
/// thread of its own (a current-thread runtime whose default subscriber writes JSON
/// lines to `sink`).
struct Server {
    addr: SocketAddr,
    sink: Sink,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start() -> Self {
        let sink = Sink::default();
        let config = LoggingConfig {
            format: LogFormat::Json,
            filter: "info".into(),
        };
        let sub = subscriber(&config, "test", sink.clone()).expect("subscriber");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let _default = tracing::subscriber::set_default(sub);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let handler = tower::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    if req.uri().path() == "/hang" {
                        // An answer that never comes (while its client goes away).
                        note_access_key(ACCESS_KEY);
                        tracing::info!("hanging");
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    Ok::<_, Infallible>(answer(req.uri().path()))
                });
                let svc =
                    RequestIdLayer::new(IdPolicy::GenerateIfMissing, IdVersion::V4).layer(handler);
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            let svc = hyper_util::service::TowerToHyperService::new(svc.clone());
                            tokio::spawn(async move {
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                    .await;
                            });
                        }
                    }
                }
            });
            // The runtime is dropped here, under the subscriber: every connection
            // task still open, and the body it holds, is dropped now.
            drop(rt);
        });
        Self {
            addr,
            sink,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The access lines of request `rid` so far.
    fn lines_of(&self, rid: &str) -> Vec<serde_json::Value> {
        self.sink
            .json_lines()
            .into_iter()
            .filter(|v| v["target"] == "access" && v["request_id"] == rid)
            .collect()
    }

    /// Waits (30 s at most) for the access line of `rid`.
    fn wait_line(&self, rid: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = self.lines_of(rid).into_iter().next() {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no access line for {rid}:\n{}",
                self.sink.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (30 s at most) until the handler holds request `rid` of `/hang`.
    fn wait_hanging(&self, rid: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self
            .sink
            .json_lines()
            .iter()
            .any(|v| v["message"] == "hanging" && v["request_id"] == rid)
        {
            assert!(
                Instant::now() < deadline,
                "the handler never had {rid}:\n{}",
                self.sink.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the server (every connection and body dropped) and checks that each of
    /// `rids` has exactly one access line.
    fn stop_and_count(mut self, rids: &[&str]) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().expect("server thread");
        }
        for rid in rids {
            assert_eq!(
                self.lines_of(rid).len(),
                1,
                "exactly one access line for {rid}:\n{}",
                self.sink.text()
            );
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// What every access line carries beside its numbers.
fn assert_context(line: &serde_json::Value, rid: &str) {
    assert_eq!(line["request_id"], rid, "{line}");
    assert_eq!(line["access_key"], ACCESS_KEY, "{line}");
    assert!(line["method"].is_string(), "{line}");
    assert_eq!(line["trace_id"].as_str().map(str::len), Some(32), "{line}");
    assert_eq!(line["span_id"].as_str().map(str::len), Some(16), "{line}");
    let (head, whole) = (line["head_us"].as_u64(), line["duration_us"].as_u64());
    assert!(head.is_some() && whole.is_some(), "{line}");
    assert!(whole >= head, "the line ends after the head: {line}");
}

/// The span ID of an echoed `traceparent`.
fn echoed_span(traceparent: Option<&str>) -> String {
    let tp = traceparent.expect("traceparent echoed");
    tp.split('-').nth(2).expect("span id").to_owned()
}

#[test]
fn a_streamed_body_is_logged_at_its_end_with_its_bytes() {
    let server = Server::start();
    let total: u64 = 300_000;
    let r = request(
        server.addr,
        "GET",
        &format!("/stream/{total}"),
        &[("X-Backend-Request-ID", "stream-1")],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.body.len() as u64, total);
    let line = server.wait_line("stream-1");
    assert_context(&line, "stream-1");
    assert_eq!(line["bytes"], total, "{line}");
    assert_eq!(line["complete"], true, "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["path"], format!("/stream/{total}"));
    assert!(line.get("error").is_none(), "{line}");
    assert_eq!(
        line["span_id"],
        echoed_span(r.header("traceparent")),
        "the line is the request's span"
    );
    server.stop_and_count(&["stream-1"]);
}

#[test]
fn a_fixed_length_body_keeps_its_content_length_and_is_counted() {
    let server = Server::start();
    let r = request(
        server.addr,
        "GET",
        "/fixed",
        &[("X-Backend-Request-ID", "fixed-1")],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("11"), "{:?}", r.headers);
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(r.body.len(), 11);
    let line = server.wait_line("fixed-1");
    assert_context(&line, "fixed-1");
    assert_eq!(line["bytes"], 11, "{line}");
    assert_eq!(line["complete"], true, "{line}");
    server.stop_and_count(&["fixed-1"]);
}

#[test]
fn nothing_to_send_is_logged_at_once_as_complete() {
    let server = Server::start();
    let r = request(
        server.addr,
        "HEAD",
        "/fixed",
        &[("X-Backend-Request-ID", "head-1")],
        b"",
    );
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    let r = request(
        server.addr,
        "GET",
        "/nocontent",
        &[("X-Backend-Request-ID", "nocontent-1")],
        b"",
    );
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    for rid in ["head-1", "nocontent-1"] {
        let line = server.wait_line(rid);
        assert_context(&line, rid);
        assert_eq!(line["bytes"], 0, "{line}");
        assert_eq!(line["complete"], true, "{line}");
        assert_eq!(line["duration_us"], line["head_us"], "{line}");
    }
    server.stop_and_count(&["head-1", "nocontent-1"]);
}

#[test]
fn a_download_cut_by_the_client_is_logged_once_as_incomplete() {
    let server = Server::start();
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(b"GET /long HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: cut-1\r\n\r\n")
        .expect("send");
    // Read a part (1 MiB past the head), then go away.
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while got < (1 << 20) {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "the server closed early");
        got += n;
    }
    drop(s);
    let line = server.wait_line("cut-1");
    assert_context(&line, "cut-1");
    assert_eq!(line["complete"], false, "{line}");
    let bytes = line["bytes"].as_u64().expect("bytes");
    assert!(bytes > 0 && bytes < LONG, "{line}");
    assert!(line.get("error").is_none(), "{line}");
    server.stop_and_count(&["cut-1"]);
}

#[test]
fn a_body_error_is_logged_once_with_its_text() {
    let server = Server::start();
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(
        b"GET /fail HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Backend-Request-ID: fail-1\r\n\r\n",
    )
    .expect("send");
    // hyper aborts the connection on a body error (what it had buffered, the head
    // too, may never go out): read to the end or the reset.
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let line = server.wait_line("fail-1");
    assert_context(&line, "fail-1");
    assert_eq!(line["complete"], false, "{line}");
    assert_eq!(line["bytes"], BEFORE_FAILURE, "{line}");
    let error = line["error"].as_str().expect("error text");
    assert!(error.starts_with("disk read failed: boom"), "{line}");
    assert!(
        error.len() <= MAX_ERROR_LEN,
        "the error text is bounded: {line}"
    );
    server.stop_and_count(&["fail-1"]);
}

#[test]
fn several_requests_on_one_connection_each_get_one_line() {
    let server = Server::start();
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(
        b"GET /stream/5000 HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: ka-1\r\n\r\n\
          GET /fixed HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: ka-2\r\n\r\n\
          GET /stream/7 HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Backend-Request-ID: ka-3\r\n\r\n",
    )
    .expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    for (rid, bytes) in [("ka-1", 5000), ("ka-2", 11), ("ka-3", 7)] {
        let line = server.wait_line(rid);
        assert_context(&line, rid);
        assert_eq!(line["bytes"], bytes, "{line}");
        assert_eq!(line["complete"], true, "{line}");
    }
    server.stop_and_count(&["ka-1", "ka-2", "ka-3"]);
}

#[test]
fn a_body_ending_with_trailers_is_complete() {
    let server = Server::start();
    let r = request(
        server.addr,
        "GET",
        "/trailers",
        &[("X-Backend-Request-ID", "trailers-1"), ("TE", "trailers")],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len() as u64, TRAILED);
    let line = server.wait_line("trailers-1");
    assert_context(&line, "trailers-1");
    assert_eq!(line["bytes"], TRAILED, "{line}");
    assert_eq!(line["complete"], true, "{line}");
    assert!(line.get("error").is_none(), "{line}");
    server.stop_and_count(&["trailers-1"]);
}

#[test]
fn a_body_short_of_its_content_length_is_logged_as_cut() {
    let server = Server::start();
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(b"GET /short HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: short-1\r\n\r\n")
        .expect("send");
    // hyper closes the connection when the body ends short: read to the end.
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let line = server.wait_line("short-1");
    assert_context(&line, "short-1");
    assert_eq!(line["complete"], false, "{line}");
    assert_eq!(line["bytes"], SHORT_SENT, "{line}");
    assert_eq!(
        line["error"],
        format!("body ended short of its Content-Length: {SHORT_SENT} of {SHORT_ANNOUNCED} bytes"),
        "{line}"
    );
    server.stop_and_count(&["short-1"]);
}

#[test]
fn a_request_whose_client_leaves_before_the_answer_is_logged_as_499() {
    let server = Server::start();
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.write_all(b"GET /hang HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: gone-1\r\n\r\n")
        .expect("send");
    // The client goes away while the handler waits.
    server.wait_hanging("gone-1");
    drop(s);
    let line = server.wait_line("gone-1");
    assert_context(&line, "gone-1");
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["bytes"], 0, "{line}");
    assert_eq!(line["complete"], false, "{line}");
    assert_eq!(
        line["error"], "the connection closed before the answer",
        "{line}"
    );
    // A request still unanswered when the server stops is logged so too.
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.write_all(b"GET /hang HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: gone-2\r\n\r\n")
        .expect("send");
    server.wait_hanging("gone-2");
    let sink = server.sink.clone();
    server.stop_and_count(&["gone-1", "gone-2"]);
    let stopped = sink
        .json_lines()
        .into_iter()
        .find(|v| v["target"] == "access" && v["request_id"] == "gone-2")
        .expect("a line for the request the stop cut");
    assert_eq!(stopped["status"], 499, "{stopped}");
    drop(s);
}
