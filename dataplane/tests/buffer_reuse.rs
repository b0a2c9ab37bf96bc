//! Hostile suite, class "one connection's bytes in another's": a closed connection's
//! client and app read buffers go back to its core's pool and the next connection
//! takes them without zeroing, as it takes the rest of the connection's storage
//! (what it writes, its heads' field lists and access-line copies: `ConnStorage`,
//! cleared when kept). Here, on one core, every probe connection comes right
//! after a poisoning one that filled both buffers with secrets (the client's in its
//! head, body and pipelined garbage; the app's in its response head, body and bytes
//! after the body; the pool is last in, first out, so a probe's client buffer was the
//! poisoning connection's app buffer and the other way round). The probes then take every path that reads into or answers from
//! those buffers: partial, split, malformed and oversized heads, the proxy's own
//! errors (400, 408, 413, 414, 431, 502), truncated bodies both ways, `Expect:
//! 100-continue`, pipelining, raw and WebSocket upgrades with early bytes both ways,
//! and HTTP/2 preface sniffing with and without a fallback. No fragment of either
//! secret may reach a probe client, the app (outside the poisoning requests) or the
//! worker's log. The same attack runs over TLS: the buffers then hold plaintext that
//! rustls decrypted into them, and the probes' bytes arrive in records of any size.
//!
//! HTTP/2 streams take from the same pool: each stream forwarded to an HTTP/1.1 app
//! reads the app's answer into a 16 KiB buffer from its core's pool, given back
//! unzeroed when the stream ends, whichever way it ends. There, connections of concurrent h2c streams (nghttp, prior
//! knowledge) fill several of them with secrets (the client's in a header and a
//! request body the app echoes; the app's in heads, bodies, chunked trailers and a
//! whole unsolicited response left unread after the answer), and each probe opens
//! several streams at once on a new connection through every path that reads the
//! app into that buffer: heads cut short, malformed, split, growing or too large
//! (502), no answer, bodies cut short or delimited by close, chunked bodies with
//! trailers, 1xx interim heads (in the same read as the answer or not), a 101, 204,
//! 304 and HEAD answers, bytes after the body, echoed request bodies (with and
//! without a length, behind `expect: 100-continue`) and answers before the request
//! body is in. Again no fragment may reach a client (heads, bodies, trailers,
//! errors), the app or the log, nor may a poisoning stream get another's leftovers.

mod common;
#[path = "common/tls.rs"]
mod tls_support;

use appproxy_test_support::net::ReadUninterrupted;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, metric, Worker, WorkerOpts};
use rustls::ClientConfig;
use tls_support::{Pki, TlsStream};

/// What the poisoning clients send (header values, bodies, pipelined garbage).
const CLIENT_SECRET: &str = "Qz9#Kx";
/// What the app answers the poisoning requests with (head, body, trailing bytes).
const APP_SECRET: &str = "Vw7%Jy";

/// Every 4-byte window of the secrets repeated: any stale stretch of a poisoned
/// buffer longer than a few bytes contains one.
fn secret_fragments() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for token in [CLIENT_SECRET, APP_SECRET] {
        let cycle = token.repeat(2).into_bytes();
        for i in 0..token.len() {
            out.push(cycle[i..i + 4].to_vec());
        }
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Where a secret fragment shows in `bytes`, described; `None` when clean.
fn leak(what: &str, bytes: &[u8]) -> Option<String> {
    secret_fragments().iter().find_map(|frag| {
        let at = find(bytes, frag)?;
        let from = at.saturating_sub(80);
        let to = (at + 80).min(bytes.len());
        Some(format!(
            "{what}: a secret of another connection leaked ({:?} at byte {at}): …{}…",
            String::from_utf8_lossy(frag),
            String::from_utf8_lossy(&bytes[from..to])
        ))
    })
}

/// The test app: records every byte it receives except the poisoning requests.
struct App {
    addr: SocketAddr,
    /// Bytes received outside `/poison*` requests (leftovers and tunnels included).
    clean: Arc<Mutex<Vec<u8>>>,
    /// `/poison*` requests served.
    poisoned: Arc<AtomicUsize>,
    /// Connections whose every received byte is accounted for (closed).
    closed: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
}

impl App {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind app");
        let addr = listener.local_addr().expect("addr");
        let clean = Arc::new(Mutex::new(Vec::new()));
        let poisoned = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (c, p, d, a) = (
            clean.clone(),
            poisoned.clone(),
            closed.clone(),
            accepted.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                let (c, p, d) = (c.clone(), p.clone(), d.clone());
                std::thread::spawn(move || {
                    let mut pending = Vec::new();
                    let _ = serve_app(stream, &mut pending, &c, &p);
                    c.lock().expect("clean").extend_from_slice(&pending);
                    d.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            clean,
            poisoned,
            closed,
            accepted,
        }
    }
}

/// Reads more into `pending`; false at end of stream.
fn read_more(s: &mut TcpStream, pending: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut b = [0u8; 8192];
    let n = s.read_uninterrupted(&mut b)?;
    pending.extend_from_slice(&b[..n]);
    Ok(n > 0)
}

fn header_value(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

fn serve_app(
    mut s: TcpStream,
    pending: &mut Vec<u8>,
    clean: &Mutex<Vec<u8>>,
    poisoned: &AtomicUsize,
) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    loop {
        let head_end = loop {
            if let Some(i) = find(pending, b"\r\n\r\n") {
                break i + 4;
            }
            if !read_more(&mut s, pending)? {
                return Ok(());
            }
        };
        let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
        let path = head.split(' ').nth(1).unwrap_or("").to_owned();
        // Answers before the request body is in (read afterwards, or never).
        if path == "/early-answer" || path == "/early-close" {
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly")?;
            if path == "/early-close" {
                return Ok(());
            }
        }
        let end = if let Some(len) = header_value(&head, "content-length") {
            let end = head_end + len.parse::<usize>().unwrap_or(0);
            while pending.len() < end {
                if !read_more(&mut s, pending)? {
                    return Ok(());
                }
            }
            end
        } else if header_value(&head, "transfer-encoding").is_some() {
            loop {
                if let Some(i) = find(&pending[head_end - 2..], b"\r\n0\r\n\r\n") {
                    break head_end - 2 + i + 7;
                }
                if !read_more(&mut s, pending)? {
                    return Ok(());
                }
            }
        } else {
            head_end
        };
        let request: Vec<u8> = pending.drain(..end).collect();
        if path.starts_with("/poison") {
            poisoned.fetch_add(1, Ordering::SeqCst);
        } else {
            clean.lock().expect("clean").extend_from_slice(&request);
        }
        match path.as_str() {
            "/poison" | "/poison-extra" => {
                let mut resp = format!(
                    "HTTP/1.1 200 OK\r\nX-App-Secret: {}\r\nContent-Length: {}\r\n\r\n",
                    APP_SECRET.repeat(1700),
                    60 * 1024
                )
                .into_bytes();
                resp.extend(APP_SECRET.bytes().cycle().take(60 * 1024));
                if path == "/poison-extra" {
                    // Bytes after the response: left in the proxy's app buffer.
                    resp.extend(APP_SECRET.bytes().cycle().take(12 * 1024));
                }
                s.write_all(&resp)?;
            }
            // HTTP/2 poisoning: the request (the client's secrets) echoed behind a
            // secret head, then a complete response nobody asked for.
            "/poison-echo" => {
                let mut resp = format!(
                    "HTTP/1.1 200 OK\r\nX-App-Secret: {}\r\nContent-Length: {}\r\n\r\n",
                    APP_SECRET.repeat(1700),
                    request.len()
                )
                .into_bytes();
                resp.extend_from_slice(&request);
                resp.extend(smuggled_response());
                s.write_all(&resp)?;
            }
            // A chunked body and trailers full of the app's secret, then a complete
            // response nobody asked for.
            "/poison-chunked" => {
                let mut resp = format!(
                    "HTTP/1.1 200 OK\r\nX-App-Secret: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
                    APP_SECRET.repeat(1000)
                )
                .into_bytes();
                for _ in 0..5 {
                    resp.extend(b"2000\r\n");
                    resp.extend(APP_SECRET.bytes().cycle().take(0x2000));
                    resp.extend(b"\r\n");
                }
                resp.extend(
                    format!("0\r\nX-App-Trailer: {}\r\n\r\n", APP_SECRET.repeat(100)).bytes(),
                );
                resp.extend(smuggled_response());
                s.write_all(&resp)?;
            }
            "/poison-smuggle" => {
                let mut resp = format!(
                    "HTTP/1.1 200 OK\r\nX-App-Secret: {}\r\nContent-Length: {}\r\n\r\n",
                    APP_SECRET.repeat(1700),
                    20 * 1024
                )
                .into_bytes();
                resp.extend(APP_SECRET.bytes().cycle().take(20 * 1024));
                resp.extend(smuggled_response());
                s.write_all(&resp)?;
            }
            // Heads that grow the buffer: past its 16 KiB, and past the limit.
            "/big-head" | "/huge-head" => {
                let n = if path == "/big-head" { 20 } else { 70 } * 1024;
                s.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 3\r\n\r\nbig",
                        "b".repeat(n)
                    )
                    .as_bytes(),
                )?;
            }
            "/trunc-head" => {
                s.write_all(b"HTTP/1.1 200 OK\r\nX-Trunc: ab")?;
                return Ok(());
            }
            "/eof-body" => {
                s.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-close")?;
                return Ok(());
            }
            "/trailing-garbage" => {
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbodyEXTRA")?;
            }
            "/chunked-trailers" => {
                let parts: [&[u8]; 4] = [
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Probe-Trailer\r\n\r\n",
                    b"6\r\nchunks\r\n",
                    b"5\r\n-more\r\n0\r\nX-Probe",
                    b"-Trailer: tail\r\n\r\n",
                ];
                for piece in parts {
                    s.write_all(piece)?;
                    // Separate segments (not a timing assertion).
                    std::thread::sleep(Duration::from_millis(3));
                }
            }
            "/interim" | "/interim-split" => {
                let info = b"HTTP/1.1 103 Early Hints\r\nLink: </probe.css>; rel=preload\r\n\r\n";
                let last = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal";
                if path == "/interim" {
                    s.write_all(&[&info[..], &last[..]].concat())?;
                } else {
                    s.write_all(info)?;
                    // Separate segments (not a timing assertion).
                    std::thread::sleep(Duration::from_millis(3));
                    s.write_all(last)?;
                }
            }
            "/no-content" => s.write_all(b"HTTP/1.1 204 No Content\r\nX-Probe: none\r\n\r\n")?,
            "/not-modified" => s.write_all(
                b"HTTP/1.1 304 Not Modified\r\nETag: \"probe\"\r\nContent-Length: 40\r\n\r\n",
            )?,
            // Answered before the body came in.
            "/early-answer" => {}
            "/bad-head" => {
                s.write_all(b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n")?;
                return Ok(());
            }
            "/no-response" => return Ok(()),
            "/short-body" => {
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")?;
                return Ok(());
            }
            "/split-head" => {
                let resp = b"HTTP/1.1 200 OK\r\nX-Split: yes\r\nContent-Length: 5\r\n\r\nsplit";
                for piece in resp.chunks(7) {
                    s.write_all(piece)?;
                    // Separate segments (not a timing assertion).
                    std::thread::sleep(Duration::from_millis(3));
                }
            }
            "/upgrade" => {
                let ws = header_value(&head, "upgrade")
                    .is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
                let mut resp = if ws {
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n".to_vec()
                } else {
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x-raw\r\nConnection: Upgrade\r\n\r\n".to_vec()
                };
                // Early bytes right behind the 101 (an unmasked text frame for
                // WebSocket).
                let early = b"EARLY-APP";
                if ws {
                    resp.extend([0x81, early.len() as u8]);
                }
                resp.extend_from_slice(early);
                s.write_all(&resp)?;
                // The tunnel: everything received is recorded; raw bytes are echoed
                // until the client closes. A WebSocket session ends with the app
                // closing once the client's frame is in (its early bytes precede that
                // end of stream, so the client gets them whatever the timing).
                let mut tunneled = 0;
                loop {
                    if !ws && !pending.is_empty() {
                        s.write_all(pending)?;
                    }
                    tunneled += pending.len();
                    clean.lock().expect("clean").extend(pending.drain(..));
                    if ws && tunneled >= WS_CLIENT_FRAME_LEN {
                        return Ok(());
                    }
                    if !read_more(&mut s, pending)? {
                        return Ok(());
                    }
                }
            }
            _ => {
                // Echo: the app's view of the request goes back to the client.
                let mut resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                    request.len()
                )
                .into_bytes();
                if !head.starts_with("HEAD ") {
                    resp.extend_from_slice(&request);
                }
                s.write_all(&resp)?;
            }
        }
    }
}

/// A whole response full of the app's secret: sent after an answer, it is left
/// unread in the proxy's buffer, where the next exchange must not find it.
fn smuggled_response() -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nX-Smuggled: {}\r\nContent-Length: 600\r\n\r\n",
        APP_SECRET.repeat(100)
    )
    .into_bytes();
    r.extend(APP_SECRET.bytes().cycle().take(600));
    r
}

/// Reads until the worker closes (or the read times out: a hang guard), or until
/// `limit` bytes are in.
fn read_to_close(s: &mut dyn Read, limit: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut b = [0u8; 16 * 1024];
    while got.len() < limit {
        let want = (limit - got.len()).min(b.len());
        match s.read_uninterrupted(&mut b[..want]) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!(
                    "the worker neither answered nor closed; got {:?}",
                    String::from_utf8_lossy(&got)
                )
            }
            // A reset after the answer: what was read is what the client got.
            Err(_) => return got,
        }
    }
    got
}

/// A client connection to the worker: plain TCP or TLS.
trait Conn: Read + Write {
    /// Ends the client's side of the stream (over TLS, with a close_notify first).
    fn close_write(&mut self);
    /// Everything the worker sends until it closes, or its first `limit` bytes.
    fn read_to_close(&mut self, limit: usize) -> Vec<u8>;
}

impl Conn for TcpStream {
    fn close_write(&mut self) {
        let _ = self.shutdown(Shutdown::Write);
    }
    fn read_to_close(&mut self, limit: usize) -> Vec<u8> {
        read_to_close(self, limit)
    }
}

impl Conn for TlsStream {
    fn close_write(&mut self) {
        self.conn.send_close_notify();
        let _ = self.flush();
        let _ = self.sock.shutdown(Shutdown::Write);
    }

    /// Reads records only: a rustls stream's `read` first retries the client's
    /// unsent bytes, and fails on a worker that answered early and closed.
    fn read_to_close(&mut self, limit: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut b = [0u8; 16 * 1024];
        while got.len() < limit {
            let want = (limit - got.len()).min(b.len());
            match self.conn.reader().read_uninterrupted(&mut b[..want]) {
                Ok(0) => return got,
                Ok(n) => {
                    got.extend_from_slice(&b[..n]);
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // Closed without a close_notify: what was read is what it sent.
                Err(_) => return got,
            }
            match self.conn.read_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!(
                        "the worker neither answered nor closed; got {:?}",
                        String::from_utf8_lossy(&got)
                    )
                }
                Err(_) => return got,
            }
            if self.conn.process_new_packets().is_err() {
                return got;
            }
        }
        got
    }
}

/// The worker under attack and how its clients reach it.
struct Target<'a> {
    w: &'a Worker,
    /// TLS client settings when the worker terminates TLS.
    tls: Option<Arc<ClientConfig>>,
}

impl Target<'_> {
    fn connect(&self) -> Box<dyn Conn> {
        match &self.tls {
            None => {
                let s = TcpStream::connect(self.w.addr()).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(20)))
                    .expect("timeout");
                s.set_nodelay(true).expect("nodelay");
                Box::new(s)
            }
            // Each write leaves in its own records: the worker gets the pieces as sent.
            Some(config) => Box::new(
                tls_support::connect(self.w.addr(), config, "localhost").expect("TLS handshake"),
            ),
        }
    }
}

/// Reads one response framed by its Content-Length: status and body.
fn read_response(r: &mut impl BufRead) -> (u16, Vec<u8>) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let n = r.read_until(b'\n', &mut head).expect("response head");
        assert!(n > 0, "end of stream in a response head");
    }
    let head = String::from_utf8_lossy(&head);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a status line: {head:?}"));
    let len = header_value(&head, "content-length").map_or(0, |v| v.parse().expect("length"));
    let mut body = vec![0; len];
    r.read_exact(&mut body).expect("response body");
    (status, body)
}

/// Waits until the worker has closed every client connection: their buffers are
/// back in the pool, for the next connection to take.
fn settle(w: &Worker) {
    eventually("every client connection closed", || {
        metric(w, "appproxy_connections_active") == 0
    });
}

/// A connection that fills both of its buffers with secrets, then closes.
fn poison(t: &Target, app: &App, variant: usize) {
    let before = app.poisoned.load(Ordering::SeqCst);
    let mut s = BufReader::new(t.connect());
    let secret_header = CLIENT_SECRET.repeat(1400);
    let mut req = match variant % 3 {
        // A large head and a body that fills the buffer in one read; closes.
        0 => format!(
            "POST /poison HTTP/1.1\r\nHost: t\r\nX-Secret: {secret_header}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            32 * 1024
        ),
        // Pipelined garbage behind a closing request: left in the client buffer.
        1 => format!(
            "GET /poison-extra HTTP/1.1\r\nHost: t\r\nX-Secret: {secret_header}\r\nConnection: close\r\n\r\n"
        ),
        // Keep-alive: the client goes away after its response.
        _ => format!(
            "POST /poison HTTP/1.1\r\nHost: t\r\nX-Secret: {secret_header}\r\nContent-Length: {}\r\n\r\n",
            32 * 1024
        ),
    }
    .into_bytes();
    let trailing = if variant % 3 == 1 {
        12 * 1024
    } else {
        32 * 1024
    };
    req.extend(CLIENT_SECRET.bytes().cycle().take(trailing));
    s.get_mut().write_all(&req).expect("poison request");
    let (status, body) = read_response(&mut s);
    assert_eq!(status, 200, "the poisoning request reached the app");
    assert!(
        find(&body, APP_SECRET.as_bytes()).is_some(),
        "the poisoning client got the app's secret"
    );
    drop(s);
    assert_eq!(app.poisoned.load(Ordering::SeqCst), before + 1);
    settle(t.w);
}

/// One probe: its bytes in order (each a separate write, a few milliseconds apart
/// so that the worker reads them separately), then optionally a half-close; returns
/// everything the worker sent back until it closed.
struct Probe {
    name: &'static str,
    parts: Vec<Vec<u8>>,
    half_close: bool,
    /// What the answer must start with (empty: anything, even nothing).
    expect_start: &'static str,
    /// What the answer must contain.
    expect_contains: &'static [&'static str],
    /// Whether the answer must open with an HTTP/2 SETTINGS frame.
    expect_h2: bool,
    /// Whether the parts after the first wait until the worker has sent as many
    /// bytes as `expect_start` has (an interim answer it owes only while it waits
    /// for them: once they are in, `100 Continue` may rightly be left out).
    awaits_start: bool,
}

fn probe(name: &'static str, parts: Vec<Vec<u8>>) -> Probe {
    Probe {
        name,
        parts,
        half_close: true,
        expect_start: "",
        expect_contains: &[],
        expect_h2: false,
        awaits_start: false,
    }
}

impl Probe {
    fn starts(mut self, s: &'static str) -> Self {
        self.expect_start = s;
        self
    }
    fn contains(mut self, s: &'static [&'static str]) -> Self {
        self.expect_contains = s;
        self
    }
    fn h2(mut self) -> Self {
        self.expect_h2 = true;
        self
    }
    fn keep_open(mut self) -> Self {
        self.half_close = false;
        self
    }
    fn awaits_start(mut self) -> Self {
        self.awaits_start = true;
        self
    }

    fn run(&self, t: &Target) -> Vec<u8> {
        let mut s = t.connect();
        let mut got = Vec::new();
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 && self.awaits_start && got.is_empty() {
                got = s.read_to_close(self.expect_start.len());
            } else if i > 0 {
                // Separate reads on the worker's side (not a timing assertion).
                std::thread::sleep(Duration::from_millis(5));
            }
            if s.write_all(part).is_err() {
                break;
            }
        }
        if self.half_close {
            s.close_write();
        }
        got.extend(s.read_to_close(usize::MAX));
        got
    }
}

fn bytes(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn byte_by_byte(s: &str) -> Vec<Vec<u8>> {
    s.as_bytes().iter().map(|b| vec![*b]).collect()
}

/// The client's early WebSocket frame: `masked_text(b"EARLY-CLIENT")`.
const WS_CLIENT_FRAME_LEN: usize = 2 + 4 + 12;

/// A masked client text frame.
fn masked_text(payload: &[u8]) -> Vec<u8> {
    let key = [0x11, 0x22, 0x33, 0x44];
    let mut f = vec![0x81, 0x80 | payload.len() as u8];
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

/// One core (every connection takes the previous one's buffers), a short head
/// timeout and a body limit for the 408 and 413 probes.
fn worker_opts(app: &App) -> WorkerOpts {
    WorkerOpts {
        cores: 1,
        upstreams: vec![app.addr],
        // The probes half-close after their requests and read every answer: a
        // client's end of stream must not end its exchange here.
        extra: "[timeouts]\nhead_secs = 2\n[limits]\nmax_body = 100000\n[upstream]\nabort_on_client_close = false\n".into(),
        ..Default::default()
    }
}

#[test]
fn no_byte_of_a_closed_connection_reaches_the_next_one() {
    let app = App::start();
    let w = Worker::start(worker_opts(&app));
    attack(w, None, &app, probes());
}

/// The probes that also run over TLS: a head cut short, a malformed head, a head in
/// one-byte records, a head that grows the buffer, a request body cut short,
/// pipelining, the app's malformed head and short body, and upgrades with early
/// bytes both ways.
const TLS_PROBES: &[&str] = &[
    "partial head, then end of stream",
    "malformed header name",
    "head > 16 KiB, in pieces (the buffer grows)",
    "body shorter than its length, then end of stream",
    "a head one byte at a time",
    "pipelined requests in one write",
    "the app's malformed head (502)",
    "the app's body shorter than its length",
    "raw upgrade with early bytes both ways",
    "WebSocket upgrade with early frames both ways",
];

/// The same attack on a worker terminating TLS: the poisoning and probe clients
/// speak TLS (rustls), so the worker's client buffers are filled through rustls.
#[test]
fn no_byte_of_a_closed_tls_connection_reaches_the_next_one() {
    let pki = Pki::new();
    let app = App::start();
    let w = Worker::start(WorkerOpts {
        worker_extra: pki.worker_lines(),
        ..worker_opts(&app)
    });
    let probes: Vec<Probe> = probes()
        .into_iter()
        .filter(|p| TLS_PROBES.contains(&p.name))
        .collect();
    assert_eq!(probes.len(), TLS_PROBES.len(), "every TLS probe is known");
    attack(w, Some(pki.default_client()), &app, probes);
}

/// Every probe, in order.
fn probes() -> Vec<Probe> {
    let ws_head = "GET /upgrade HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let mut ws_early = bytes(ws_head);
    ws_early.extend(masked_text(b"EARLY-CLIENT"));
    let mut h2_settings = h2_preface();
    h2_settings.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);

    vec![
        probe("partial head, then end of stream", vec![bytes(
            "GET /b HTTP/1.1\r\nHost: t\r\nX-Partial: abc",
        )]),
        probe("partial head, then silence", vec![bytes("GET /b HTTP/1.1\r\nHost: t\r\nX-Par")])
            .keep_open()
            .starts("HTTP/1.1 408"),
        probe("a lone CR-LF, then end of stream", vec![bytes("\r\n")]),
        probe("malformed header name", vec![bytes("GET /b HTTP/1.1\r\nHost: t\r\nX A: b\r\n\r\n")])
            .starts("HTTP/1.1 400"),
        probe("bare CR split across reads", vec![
            bytes("GET /b HTTP/1.1\r\nHost: t\r\nX-A: a"),
            bytes("\rb\r\n\r\n"),
        ])
        .starts("HTTP/1.1 400"),
        probe("no Host", vec![bytes("GET /b HTTP/1.1\r\n\r\n")]).starts("HTTP/1.1 400"),
        probe("request line > 8 KiB", vec![bytes(&format!(
            "GET /{} HTTP/1.1\r\nHost: t\r\n\r\n",
            "a".repeat(9000)
        ))])
        .starts("HTTP/1.1 414"),
        probe("head > 16 KiB, in pieces (the buffer grows)", vec![
            bytes("GET /b HTTP/1.1\r\nHost: t\r\nX-Big: "),
            bytes(&"b".repeat(10 * 1024)),
            bytes(&"b".repeat(8 * 1024)),
            bytes("\r\n\r\n"),
        ])
        .starts("HTTP/1.1 431"),
        probe("body over max_body", vec![bytes(
            "POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 200000\r\nConnection: close\r\n\r\nabc",
        )])
        .starts("HTTP/1.1 413"),
        probe("bad chunk size", vec![bytes(
            "POST /b HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        )])
        .starts("HTTP/1.1 400"),
        probe("body shorter than its length, then end of stream", vec![bytes(
            "POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\n0123456789",
        )]),
        probe("chunked body cut mid-chunk", vec![
            bytes("POST /b HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"),
            bytes("20\r\nonly-a-few"),
        ]),
        probe("a head one byte at a time", byte_by_byte(
            "GET /echo HTTP/1.1\r\nHost: t\r\nX-Probe: one-by-one\r\nConnection: close\r\n\r\n",
        ))
        .starts("HTTP/1.1 200")
        .contains(&["X-Probe: one-by-one"]),
        probe("pipelined requests in one write", vec![bytes(
            "GET /echo1 HTTP/1.1\r\nHost: t\r\n\r\nGET /echo2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )])
        .starts("HTTP/1.1 200")
        .contains(&["GET /echo1 ", "GET /echo2 "]),
        probe("a body in small pieces", vec![
            bytes("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 12\r\nConnection: close\r\n\r\n"),
            bytes("body"),
            bytes("-in-"),
            bytes("bits"),
        ])
        .starts("HTTP/1.1 200")
        .contains(&["body-in-bits"]),
        probe("Expect: 100-continue", vec![
            bytes("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"),
            bytes("continue"),
        ])
        .starts("HTTP/1.1 100")
        .awaits_start()
        .contains(&["HTTP/1.1 200", "continue"]),
        probe("the app's malformed head (502)", vec![bytes(
            "GET /bad-head HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )])
        .starts("HTTP/1.1 502"),
        probe("the app closes without answering (502)", vec![bytes(
            "GET /no-response HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )])
        .starts("HTTP/1.1 502"),
        probe("the app's body shorter than its length", vec![bytes(
            "GET /short-body HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )])
        .starts("HTTP/1.1 200")
        .contains(&["0123456789"]),
        probe("the app's head split across reads", vec![bytes(
            "GET /split-head HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )])
        .starts("HTTP/1.1 200")
        .contains(&["X-Split: yes", "split"]),
        probe("raw upgrade with early bytes both ways", vec![
            bytes("GET /upgrade HTTP/1.1\r\nHost: t\r\nUpgrade: x-raw\r\nConnection: Upgrade\r\n\r\nEARLY-CLIENT"),
            bytes("LATER"),
        ])
        .starts("HTTP/1.1 101")
        .contains(&["EARLY-APP", "EARLY-CLIENT", "LATER"]),
        probe("WebSocket upgrade with early frames both ways", vec![ws_early])
            .keep_open()
            .starts("HTTP/1.1 101")
            .contains(&["EARLY-APP"]),
        probe("HTTP/2 preface cut short, then HTTP/1.1", vec![
            bytes("PRI * HT"),
            bytes("TP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
        ])
        .starts("HTTP/1.1 "),
        probe("HTTP/2 preface diverging late", vec![bytes("PRI * HTTP/2.0\r\n\r\nXM\r\n\r\n")])
            .starts("HTTP/1.1 "),
        probe("HTTP/2 preface in pieces, then SETTINGS", vec![
            h2_settings[..10].to_vec(),
            h2_settings[10..].to_vec(),
        ])
        .h2(),
    ]
}

/// Poisons the worker's buffers before each probe, runs it, and checks that no
/// fragment of a secret reached the probe's client, the app or the worker's log.
fn attack(w: Worker, tls: Option<Arc<ClientConfig>>, app: &App, probes: Vec<Probe>) {
    let t = Target { w: &w, tls };
    let mut f = Findings::default();
    for (i, p) in probes.iter().enumerate() {
        poison(&t, app, i);
        let got = p.run(&t);
        settle(&w);
        f.after_probe(p.name, &got, app);
        let wrong = &mut f.wrong;
        let text = String::from_utf8_lossy(&got);
        if !text.starts_with(p.expect_start) {
            wrong.push(format!(
                "{}: expected an answer starting with {:?}, got {text:?}",
                p.name, p.expect_start
            ));
        }
        if p.expect_h2 && !(got.len() >= 9 && got[3] == 0x4) {
            wrong.push(format!("{}: no HTTP/2 SETTINGS frame in {got:?}", p.name));
        }
        for s in p.expect_contains {
            if !text.contains(s) {
                wrong.push(format!("{}: {s:?} missing from {text:?}", p.name));
            }
        }
    }
    f.assert_none();
    drop(t);
    app_and_log_are_clean(w, app, &[b"EARLY-CLIENT", b"X-Probe: one-by-one"]);
}

/// What the probes of one attack turned up. Every probe runs; a leak anywhere is
/// reported before any unexpected answer (stale bytes in a head may well turn the
/// answer into a 400 first).
#[derive(Default)]
struct Findings {
    leaks: Vec<String>,
    wrong: Vec<String>,
    /// How much of what the app recorded outside poisoning the probes have seen.
    app_seen: usize,
}

impl Findings {
    /// Looks for secrets in what the probe's client got and in what the app got
    /// since the last probe.
    fn after_probe(&mut self, name: &str, got: &[u8], app: &App) {
        self.leaks
            .extend(leak(&format!("what the client of {name:?} got"), got));
        let clean = app.clean.lock().expect("clean");
        self.leaks.extend(leak(
            &format!("what the app got up to {name:?}"),
            &clean[self.app_seen..],
        ));
        self.app_seen = clean.len();
    }

    fn assert_none(&self) {
        let (leaks, wrong) = (&self.leaks, &self.wrong);
        assert!(
            leaks.is_empty(),
            "{} leak(s):\n{}\n(and {} unexpected answer(s):\n{})",
            leaks.len(),
            leaks.join("\n"),
            wrong.len(),
            wrong.join("\n")
        );
        assert!(
            wrong.is_empty(),
            "unexpected answers:\n{}",
            wrong.join("\n")
        );
    }
}

/// Once the worker is gone (so the app saw everything it was sent): it did not
/// panic, the app recorded the probes (`markers`), and no secret reached the app
/// outside the poisoning requests nor the worker's log.
fn app_and_log_are_clean(mut w: Worker, app: &App, markers: &[&[u8]]) {
    w.terminate();
    eventually("the app's connections all closed", || {
        app.closed.load(Ordering::SeqCst) == app.accepted.load(Ordering::SeqCst)
    });
    let clean = app.clean.lock().expect("clean").clone();
    let log = w.log_text();
    assert!(!log.contains("panicked"), "the worker panicked:\n{log}");
    assert!(
        markers.iter().all(|m| find(&clean, m).is_some()),
        "the app recorded the probes"
    );
    let late = leak("what the app got outside the poisoning requests", &clean);
    assert!(late.is_none(), "{}", late.unwrap_or_default());
    let logged = leak("the worker's log", log.as_bytes());
    assert!(logged.is_none(), "{}", logged.unwrap_or_default());
}

/// The HTTP/2 connection preface.
fn h2_preface() -> Vec<u8> {
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()
}

// HTTP/2: each stream forwarded to an HTTP/1.1 app reads the app's answer into a
// read buffer from its core's pool, given back unzeroed when the stream ends.

/// How many streams each HTTP/2 probe opens at once (each takes its own pooled
/// buffer, the last ones the poisoning streams gave back).
const H2_PROBE_STREAMS: usize = 3;

/// Runs `nghttp -v` (h2c, prior knowledge: one new connection, every stream on it at
/// once) against the worker; returns everything it printed: the received heads,
/// trailers, DATA payloads, resets and errors.
fn nghttp(w: &Worker, args: &[&str], paths: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("nghttp")
        .args(["-v", "-t", "20"])
        .args(args)
        .args(
            paths
                .iter()
                .map(|p| format!("http://127.0.0.1:{}{p}", w.port)),
        )
        .output()
        .expect("nghttp must be installed (.ci/run installs nghttp2-client)");
    let mut got = out.stdout;
    got.extend_from_slice(&out.stderr);
    got
}

/// A file holding `bytes`, for `nghttp -d`.
fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(bytes).expect("write");
    f
}

/// Waits until no HTTP/2 stream or connection is open: every stream's buffer is
/// back with the core's pool.
fn settle_h2(w: &Worker) {
    eventually("every HTTP/2 stream and connection closed", || {
        metric(w, "appproxy_http2_streams_active") == 0
            && metric(w, "appproxy_connections_active") == 0
    });
}

/// One connection of concurrent streams that fill their buffers with secrets: the
/// client's (a header and the request body, echoed back by the app) and the app's
/// (heads, bodies, chunked trailers, whole responses after the answer). Returns the
/// leaks seen by the poisoning clients themselves (a response left behind by an
/// earlier stream served as theirs) and what else went wrong.
fn poison_h2(w: &Worker, app: &App, body: &std::path::Path) -> (Vec<String>, Vec<String>) {
    let before = app.poisoned.load(Ordering::SeqCst);
    let secret = format!("x-secret: {}", CLIENT_SECRET.repeat(1000));
    let paths = [
        "/poison",
        "/poison-echo",
        "/poison-chunked",
        "/poison-smuggle",
    ];
    let got = nghttp(
        w,
        &[
            "-n",
            "-m",
            "2",
            "-H",
            &secret,
            "-d",
            &body.to_string_lossy(),
        ],
        &paths,
    );
    settle_h2(w);
    let text = String::from_utf8_lossy(&got);
    let mut leaks = Vec::new();
    let mut wrong = Vec::new();
    if let Some(at) = find(&got, b"x-smuggled") {
        leaks.push(format!(
            "a poisoning stream was answered with the response another stream left behind: …{}…",
            String::from_utf8_lossy(&got[at.saturating_sub(200)..(at + 200).min(got.len())])
        ));
    }
    let answered = text.matches(":status: 200").count();
    let served = app.poisoned.load(Ordering::SeqCst) - before;
    if answered != 2 * paths.len() || served != 2 * paths.len() {
        wrong.push(format!(
            "poisoning: {answered} streams answered, {served} served by the app, of {}: …{}",
            2 * paths.len(),
            String::from_utf8_lossy(&got[got.len().saturating_sub(3000)..])
        ));
    }
    (leaks, wrong)
}

/// An HTTP/2 probe: paths requested on a new connection, each
/// [`H2_PROBE_STREAMS`] times at once, with nghttp options; what the output must
/// hold.
struct H2Probe {
    name: &'static str,
    args: Vec<String>,
    path: &'static str,
    expect: &'static [&'static str],
}

fn h2_probe(name: &'static str, path: &'static str, expect: &'static [&'static str]) -> H2Probe {
    H2Probe {
        name,
        args: Vec::new(),
        path,
        expect,
    }
}

impl H2Probe {
    fn args(mut self, args: &[&str]) -> Self {
        self.args = args.iter().map(|a| (*a).to_owned()).collect();
        self
    }
}

/// Every path of `stream.rs` that reads the app's answer into the stream's buffer.
fn h2_probes(upload: &str) -> Vec<H2Probe> {
    vec![
        h2_probe(
            "app head cut short, then close (502)",
            "/trunc-head",
            &[":status: 502"],
        ),
        h2_probe("app's malformed head (502)", "/bad-head", &[":status: 502"]),
        h2_probe(
            "app closes without answering (502)",
            "/no-response",
            &[":status: 502"],
        ),
        // The stream is reset (`h2` drops its queued head and DATA with it).
        h2_probe(
            "app's body shorter than its length",
            "/short-body",
            &["RST_STREAM"],
        ),
        h2_probe(
            "app's head split across reads",
            "/split-head",
            &["x-split: yes", "split"],
        ),
        h2_probe(
            "app's head past 16 KiB (the buffer grows)",
            "/big-head",
            &[":status: 200", "bbbbbbbb"],
        ),
        h2_probe(
            "app's head past the limit (502)",
            "/huge-head",
            &[":status: 502"],
        ),
        h2_probe(
            "app's 101 (not relayable: 502)",
            "/upgrade",
            &[":status: 502"],
        ),
        h2_probe(
            "chunked body with trailers, in pieces",
            "/chunked-trailers",
            &["chunks", "-more", "x-probe-trailer: tail"],
        ),
        h2_probe(
            "1xx interim, then the answer, in one read",
            "/interim",
            &[":status: 103", "final"],
        ),
        h2_probe(
            "1xx interim, then the answer, in two reads",
            "/interim-split",
            &[":status: 103", "final"],
        ),
        h2_probe(
            "204 without a body",
            "/no-content",
            &[":status: 204", "x-probe: none"],
        ),
        h2_probe("304 without a body", "/not-modified", &[":status: 304"]),
        h2_probe("HEAD", "/echo-head", &[":status: 200"]).args(&["-H", ":method: HEAD"]),
        h2_probe(
            "body delimited by the app's close",
            "/eof-body",
            &["until-close"],
        ),
        h2_probe(
            "bytes after the answer's body",
            "/trailing-garbage",
            &[":status: 200", "body"],
        ),
        h2_probe(
            "GET echoed by the app",
            "/echo",
            &["GET /echo HTTP/1.1", "x-probe: h2"],
        )
        .args(&["-H", "x-probe: h2"]),
        h2_probe(
            "request body echoed by the app",
            "/echo-body",
            &["POST /echo-body", "probe-upload"],
        )
        .args(&["-d", upload]),
        h2_probe(
            "request body without a length (chunked to the app)",
            "/echo-chunked",
            &["Transfer-Encoding: chunked", "probe-upload"],
        )
        .args(&["--no-content-length", "-d", upload]),
        h2_probe(
            "expect: 100-continue",
            "/echo-continue",
            &[":status: 100", "probe-upload"],
        )
        .args(&["--expect-continue", "-d", upload]),
        h2_probe(
            "the app answers before the request body",
            "/early-answer",
            &[":status: 200", "early"],
        )
        .args(&["-d", upload]),
        // Whether the body still fits in the socket's buffers decides between the
        // early answer and a 502: either is fine, a secret is not.
        h2_probe(
            "the app answers before the request body, then closes",
            "/early-close",
            &[":status: "],
        )
        .args(&["-d", upload]),
    ]
}

#[test]
fn no_byte_of_a_finished_http2_stream_reaches_the_next_one() {
    let app = App::start();
    let w = Worker::start(worker_opts(&app));
    let poison_body = file_with(
        &CLIENT_SECRET
            .bytes()
            .cycle()
            .take(32 * 1024)
            .collect::<Vec<_>>(),
    );
    let upload = file_with(b"probe-upload");
    let upload_path = upload.path().to_string_lossy().into_owned();
    let mut f = Findings::default();
    for p in h2_probes(&upload_path) {
        let (l, x) = poison_h2(&w, &app, poison_body.path());
        f.leaks.extend(l);
        f.wrong.extend(x);
        let args: Vec<&str> = p.args.iter().map(String::as_str).collect();
        let multiply = H2_PROBE_STREAMS.to_string();
        let got = nghttp(&w, &[&["-m", &multiply][..], &args].concat(), &[p.path]);
        settle_h2(&w);
        f.after_probe(p.name, &got, &app);
        let text = String::from_utf8_lossy(&got);
        for s in p.expect {
            if text.matches(s).count() < H2_PROBE_STREAMS {
                f.wrong.push(format!(
                    "{}: {s:?} not in every stream's answer: {text}",
                    p.name
                ));
            }
        }
    }
    f.assert_none();
    app_and_log_are_clean(w, &app, &[b"x-probe: h2", b"probe-upload"]);
}
