//! The HTTP/2 → HTTP/1.1 downgrade under a hostile client: each stream is written
//! frame by frame on a raw socket with a raw HPACK encoder (literal never-indexed
//! fields, so nothing sanitizes the bytes), and the app is a recording upstream that
//! logs every raw byte it receives on each connection. Each test asserts what the
//! app saw — exactly one well-framed request per forwarded stream, nothing smuggled,
//! no injected header — and what the client got (400, stream reset or GOAWAY).
//! Also: a stream whose pooled app connection dies under it follows the HTTP/1.1
//! retry rule (a bodiless GET is sent again on a fresh connection, a body is not).

mod common;

use appproxy_test_support::net::ReadUninterrupted;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Worker, WorkerOpts};

use appproxy_test_support::h2frames::{
    block, frame, goaway_code, read_frame, request as req, serve_raw_app, status, Field, DATA,
    END_HEADERS, END_STREAM, GOAWAY, HEADERS, RST_STREAM,
};

/// What became of a stream on the client's side.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Status(u16),
    Reset(u32),
    GoAway(u32),
    Closed,
}

impl Outcome {
    fn refused(&self) -> bool {
        matches!(
            self,
            Outcome::Status(400) | Outcome::Reset(_) | Outcome::GoAway(_)
        )
    }
}

/// A connection that has sent the preface and an empty SETTINGS.
fn open(w: &Worker) -> TcpStream {
    appproxy_test_support::h2frames::connect(w.addr())
}

/// Reads frames until `stream` gets a response head or a reset, or the connection
/// gets a GOAWAY or ends.
fn outcome(s: &mut TcpStream, stream: u32) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Some((ty, _, id, p)) = read_frame(s) else {
            return Outcome::Closed;
        };
        match (ty, goaway_code(&p)) {
            (GOAWAY, Some(code)) => return Outcome::GoAway(code),
            (RST_STREAM, _) if id == stream && p.len() >= 4 => {
                return Outcome::Reset(u32::from_be_bytes([p[0], p[1], p[2], p[3]]))
            }
            (HEADERS, _) if id == stream => {
                // The worker's answers start with `:status` from the static table
                // (indexed 8..14) or as a literal with an indexed name.
                return Outcome::Status(status(&p));
            }
            _ => {}
        }
    }
    Outcome::Closed
}

/// The DATA payload of `stream` up to its end (bounded; what came by then).
fn data_of(s: &mut TcpStream, stream: u32) -> Vec<u8> {
    let mut body = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Some((ty, flags, id, p)) = read_frame(s) else {
            break;
        };
        if ty == DATA && id == stream {
            body.extend_from_slice(&p);
            if flags & END_STREAM != 0 {
                break;
            }
        }
    }
    body
}

/// An app that records every raw byte of every connection and answers each complete
/// request (framed by its content-length or chunked) with an empty 200.
struct Recorder {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Log>>>,
}

/// One app connection: its bytes, and whether the worker closed it.
type Log = Arc<Mutex<(Vec<u8>, bool)>>;

impl Recorder {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let conns: Arc<Mutex<Vec<Log>>> = Arc::default();
        let c = conns.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let log: Log = Arc::default();
                c.lock().expect("conns").push(log.clone());
                std::thread::spawn(move || record(s, log));
            }
        });
        Self { addr, conns }
    }

    /// Every connection's bytes so far, and whether the worker closed it.
    fn bytes(&self) -> Vec<(Vec<u8>, bool)> {
        self.conns
            .lock()
            .expect("conns")
            .iter()
            .map(|c| c.lock().expect("log").clone())
            .collect()
    }

    /// All whole requests, each connection's bytes split strictly; panics on bytes
    /// that are not part of a well-framed request (something smuggled), except a
    /// request cut short on a connection the worker then closed (a stream refused
    /// mid-body), which is not counted.
    ///
    /// The bytes are judged as one snapshot taken once they have settled: the app's
    /// reader threads may still be receiving what the worker wrote before the client
    /// saw its answer, so a snapshot is only taken when every connection is whole
    /// or closed and nothing has arrived for a moment.
    fn requests(&self) -> Vec<String> {
        // A connection left with a request cut short must be closed by the worker,
        // never pooled: wait (bounded) for the close to be seen.
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut snapshot = self.bytes();
        loop {
            let settled = snapshot.iter().all(|(conn, closed)| *closed || whole(conn));
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(if settled { 50 } else { 20 }));
            let next = self.bytes();
            if settled && next == snapshot {
                break;
            }
            snapshot = next;
        }
        let mut all = Vec::new();
        for (conn, closed) in snapshot {
            let mut at = 0;
            while at < conn.len() {
                match frame_request(&conn[at..]) {
                    Some(n) => {
                        all.push(String::from_utf8_lossy(&conn[at..at + n]).into_owned());
                        at += n;
                    }
                    None if closed && frame_head(&conn[at..]) => break,
                    None => panic!(
                        "bytes on an app connection that are not a whole request: {:?}",
                        String::from_utf8_lossy(&conn[at..])
                    ),
                }
            }
        }
        all
    }
}

/// Whether `b` is whole requests only.
fn whole(mut b: &[u8]) -> bool {
    while !b.is_empty() {
        match frame_request(b) {
            Some(n) => b = &b[n..],
            None => return false,
        }
    }
    true
}

/// Whether `b` starts with a well-formed head whose body was cut short.
fn frame_head(b: &[u8]) -> bool {
    b.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .is_some_and(|end| {
            // The same head with no body promised frames as a whole request.
            let text = String::from_utf8_lossy(&b[..end + 4]).into_owned();
            let text = text
                .split("\r\n")
                .filter(|l| {
                    let l = l.to_ascii_lowercase();
                    !l.starts_with("content-length:") && !l.starts_with("transfer-encoding:")
                })
                .collect::<Vec<_>>()
                .join("\r\n");
            frame_request(text.as_bytes()).is_some()
        })
}

/// The length of the well-framed request at the start of `b`, if complete.
fn frame_request(b: &[u8]) -> Option<usize> {
    let end = b.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&b[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let start = lines.next()?;
    let parts: Vec<&str> = start.split(' ').collect();
    if parts.len() != 3 || parts[2] != "HTTP/1.1" || !parts[1].starts_with('/') {
        return None;
    }
    let mut length = None;
    let mut chunked = false;
    for l in lines.filter(|l| !l.is_empty()) {
        let (n, v) = l.split_once(':')?;
        if n.is_empty() || n.bytes().any(|c| !c.is_ascii_graphic()) {
            return None;
        }
        if v.bytes().any(|c| c == 0 || c == b'\r' || c == b'\n') {
            return None;
        }
        if n.eq_ignore_ascii_case("content-length") {
            if length.is_some() {
                return None;
            }
            length = Some(v.trim().parse::<usize>().ok()?);
        }
        if n.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.trim() == "chunked";
        }
    }
    if chunked {
        let mut at = end;
        loop {
            let e = b[at..].windows(2).position(|w| w == b"\r\n")? + at;
            let size = usize::from_str_radix(std::str::from_utf8(&b[at..e]).ok()?, 16).ok()?;
            at = e + 2;
            if size == 0 {
                // No trailers are ever sent to an HTTP/1.1 app.
                return (b.get(at..at + 2)? == b"\r\n").then_some(at + 2);
            }
            at += size;
            if b.get(at..at + 2)? != b"\r\n" {
                return None;
            }
            at += 2;
        }
    }
    let n = end + length.unwrap_or(0);
    (b.len() >= n).then_some(n)
}

fn record(mut s: TcpStream, log: Log) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let mut buf = [0u8; 16384];
    let mut answered = 0usize;
    loop {
        let n = match s.read_uninterrupted(&mut buf) {
            Ok(0) | Err(_) => {
                log.lock().expect("log").1 = true;
                return;
            }
            Ok(n) => n,
        };
        let all = {
            let mut l = log.lock().expect("log");
            l.0.extend_from_slice(&buf[..n]);
            l.0.clone()
        };
        while let Some(k) = frame_request(&all[answered..]) {
            answered += k;
            if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .is_err()
            {
                return;
            }
        }
    }
}

fn worker(app: &Recorder) -> Worker {
    Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        ..Default::default()
    })
}

/// Sends `frames` as stream 1 on a new connection; returns what the client got.
fn one(w: &Worker, frames: &[u8]) -> Outcome {
    let mut s = open(w);
    s.write_all(frames).expect("write");
    outcome(&mut s, 1)
}

/// Stream 1 of a request: its head (`method path`, then `extra` fields), one DATA
/// frame for each of `data`, then `trailers` as a second HEADERS unless empty; the
/// last frame ends the stream.
fn stream(
    method: &str,
    path: &str,
    extra: &[Field],
    data: &[&[u8]],
    trailers: &[Field],
) -> Vec<u8> {
    let ends = |last: bool| if last { END_STREAM } else { 0 };
    let mut f = frame(
        HEADERS,
        END_HEADERS | ends(data.is_empty() && trailers.is_empty()),
        1,
        &req(method, path, extra),
    );
    for (i, d) in data.iter().enumerate() {
        f.extend(frame(
            DATA,
            ends(i + 1 == data.len() && trailers.is_empty()),
            1,
            d,
        ));
    }
    if !trailers.is_empty() {
        f.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &block(trailers),
        ));
    }
    f
}

/// Sends `GET path` with `extra` fields and no body on a new connection; returns
/// what the client got.
fn get(w: &Worker, path: &str, extra: &[Field]) -> Outcome {
    one(w, &stream("GET", path, extra, &[], &[]))
}

/// A plain request on a new connection still works and is the last the app saw.
fn still_clean(w: &Worker, app: &Recorder, marker: &str) {
    let got = get(w, marker, &[]);
    assert_eq!(got, Outcome::Status(200), "{marker}");
    let all = app.requests();
    let last = all.last().expect("a request");
    assert!(
        last.starts_with(&format!("GET {marker} HTTP/1.1\r\n")),
        "{last}"
    );
}

/// A POST whose body disagrees with its head: (what, path, content-length fields,
/// DATA frames).
type BodyCase<'a> = (&'a str, &'a str, &'a [Field<'a>], &'a [&'a [u8]]);

#[test]
fn content_length_disagreeing_with_data_is_refused_and_nothing_smuggled() {
    let app = Recorder::start();
    let w = worker(&app);
    let smuggled: &[u8] = b"GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n";
    let short_body = [&b"hello"[..], smuggled].concat();
    // Each stream's body disagrees with what its head announced, and each is refused.
    let cases: [BodyCase; 4] = [
        (
            "content-length smaller than the DATA: the extra bytes are a second request",
            "/short",
            &[(b"content-length", b"5")],
            &[&short_body],
        ),
        (
            "the same split in two DATA frames",
            "/short2",
            &[(b"content-length", b"5")],
            &[b"hello", smuggled],
        ),
        (
            "content-length larger than the DATA, then END_STREAM",
            "/long",
            &[(b"content-length", b"100")],
            &[b"hello"],
        ),
        (
            "two different content-length fields",
            "/two",
            &[(b"content-length", b"5"), (b"content-length", b"40")],
            &[b"hello"],
        ),
    ];
    for (what, path, fields, data) in cases {
        let got = one(&w, &stream("POST", path, fields, data, &[]));
        assert!(got.refused(), "{what}: {got:?}");
    }

    // The pooled connection is not poisoned: the next request is the next whole
    // request on whatever connection carries it, and nothing smuggled arrived.
    still_clean(&w, &app, "/after");
    let all = app.requests();
    assert!(
        all.iter().all(|r| !r.contains("/smuggled")),
        "smuggled: {all:?}"
    );
    // A body cut short by the client never leaves a half request pooled: every
    // forwarded request is whole (checked by `requests`), and a request that
    // carried `/long` (if one was forwarded before the short body showed) was not
    // followed on its connection by another.
    for (conn, _) in app.bytes() {
        let text = String::from_utf8_lossy(&conn).into_owned();
        if text.contains("/long") || text.contains("/short") {
            assert_eq!(text.matches(" HTTP/1.1\r\n").count(), 1, "{text}");
        }
    }
}

#[test]
fn connection_specific_fields_are_refused_never_forwarded() {
    let app = Recorder::start();
    let w = worker(&app);
    let cases: [(&[u8], &[u8]); 7] = [
        (b"transfer-encoding", b"chunked"),
        (b"te", b"gzip"),
        (b"connection", b"close"),
        (b"keep-alive", b"timeout=5"),
        (b"upgrade", b"websocket"),
        (b"proxy-connection", b"keep-alive"),
        (b"transfer-encoding", b"identity"),
    ];
    for (i, (n, v)) in cases.iter().enumerate() {
        let path = format!("/conn{i}");
        let got = get(&w, &path, &[(n, v)]);
        assert!(got.refused(), "{}: {got:?}", String::from_utf8_lossy(n));
        assert!(
            app.requests().iter().all(|r| !r.contains(&path)),
            "{} reached the app",
            String::from_utf8_lossy(n)
        );
    }
    // `te: trailers` is HTTP/2's own and is served.
    let got = get(&w, "/te", &[(b"te", b"trailers")]);
    assert_eq!(got, Outcome::Status(200));
    still_clean(&w, &app, "/after");
}

#[test]
fn raw_bytes_in_field_names_and_values_inject_nothing() {
    let app = Recorder::start();
    let w = worker(&app);
    let cases: [(&[u8], &[u8]); 9] = [
        (b"x-a", b"1\r\nx-injected: yes"),
        (b"x-a", b"1\nx-injected: yes"),
        (b"x-a", b"1\rx-injected: yes"),
        (b"x-a", b"1\0x-injected: yes"),
        (b"x-a\r\nx-injected", b"yes"),
        (b"x-a: 1\r\nx-injected", b"yes"),
        (b"x:injected", b"yes"),
        (b"X-Injected", b"yes"),
        (b"x injected", b"yes"),
    ];
    for (i, (n, v)) in cases.iter().enumerate() {
        let path = format!("/raw{i}");
        let got = get(&w, &path, &[(n, v)]);
        let all = app.requests();
        assert!(
            all.iter().all(
                |r| !r.to_ascii_lowercase().contains("x-injected") && !r.contains("x:injected")
            ),
            "case {i}: injected: {all:?}"
        );
        assert!(got.refused(), "case {i}: {got:?}");
    }
    still_clean(&w, &app, "/after");
}

#[test]
fn pseudo_header_tricks_are_refused() {
    let app = Recorder::start();
    let w = worker(&app);
    let std_fields = |m: &'static [u8], p: &'static [u8]| -> Vec<(&'static [u8], &'static [u8])> {
        vec![
            (b":method", m),
            (b":scheme", b"http"),
            (b":path", p),
            (b":authority", b"127.0.0.1"),
        ]
    };
    let mut cases: Vec<(&str, Vec<Field>)> = vec![
        ("absolute-form path", std_fields(b"GET", b"http://evil/x")),
        ("empty path", std_fields(b"GET", b"")),
        ("asterisk with GET", std_fields(b"GET", b"*")),
        ("path without slash", std_fields(b"GET", b"evil")),
        (
            "no scheme",
            vec![
                (b":method", b"GET"),
                (b":path", b"/p"),
                (b":authority", b"127.0.0.1"),
            ],
        ),
        (
            "no path",
            vec![
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", b"127.0.0.1"),
            ],
        ),
        (
            "CONNECT",
            vec![(b":method", b"CONNECT"), (b":authority", b"evil:443")],
        ),
        (
            "extended CONNECT",
            vec![
                (b":method", b"CONNECT"),
                (b":protocol", b"websocket"),
                (b":scheme", b"http"),
                (b":path", b"/ws"),
                (b":authority", b"127.0.0.1"),
            ],
        ),
    ];
    let mut after = std_fields(b"GET", b"/late");
    after.insert(2, (b"x-a", b"1"));
    cases.push(("pseudo after regular", after));
    let mut dup = std_fields(b"GET", b"/dup");
    dup.push((b":path", b"/other"));
    cases.push(("duplicated :path", dup));
    let mut dupm = std_fields(b"GET", b"/dupm");
    dupm.push((b":method", b"POST"));
    cases.push(("duplicated :method", dupm));
    let mut unknown = std_fields(b"GET", b"/unknown");
    unknown.push((b":evil", b"1"));
    cases.push(("unknown pseudo", unknown));
    for (what, fields) in &cases {
        let before = app.requests().len();
        let got = one(
            &w,
            &frame(HEADERS, END_HEADERS | END_STREAM, 1, &block(fields)),
        );
        assert!(got.refused(), "{what}: {got:?}");
        assert_eq!(app.requests().len(), before, "{what} reached the app");
    }
    still_clean(&w, &app, "/after");
}

/// A request that names its host in `host` and has no `:authority` (RFC 9113
/// §8.3.1 allows it; a client translating HTTP/1.1 sends one) is served as an
/// origin-form HTTP/1.1 request, its `host` the app's `Host`. Before, it was
/// refused 400: the `h2` crate leaves `:scheme` out of a URI without an authority,
/// and the worker took the missing scheme for a malformed target. A request with
/// neither is still refused.
#[test]
fn a_request_naming_its_host_without_authority_is_served() {
    let app = Recorder::start();
    let w = worker(&app);
    let fields: Vec<Field> = vec![
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/hostonly"),
        (b"host", b"named.example"),
    ];
    let got = one(
        &w,
        &frame(HEADERS, END_HEADERS | END_STREAM, 1, &block(&fields)),
    );
    assert_eq!(got, Outcome::Status(200));
    let all = app.requests();
    let r = all
        .iter()
        .find(|r| r.contains("/hostonly"))
        .expect("forwarded");
    assert!(r.starts_with("GET /hostonly HTTP/1.1\r\n"), "{r}");
    assert_eq!(
        r.to_ascii_lowercase().matches("\r\nhost: ").count(),
        1,
        "{r}"
    );
    assert!(r.contains("\r\nhost: named.example\r\n"), "{r}");
    let neither: Vec<Field> = vec![
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/nohost"),
    ];
    let got = one(
        &w,
        &frame(HEADERS, END_HEADERS | END_STREAM, 1, &block(&neither)),
    );
    assert!(got.refused(), "{got:?}");
    assert!(app.requests().iter().all(|r| !r.contains("/nohost")));
}

#[test]
fn authority_routes_and_a_disagreeing_host_is_not_forwarded() {
    let app = Recorder::start();
    let w = worker(&app);
    let got = get(&w, "/hosts", &[(b"host", b"evil.example")]);
    let all = app.requests();
    if got == Outcome::Status(200) {
        // Served: the app saw exactly one Host, the one that routed (`:authority`).
        let r = all.last().expect("a request");
        assert_eq!(
            r.to_ascii_lowercase().matches("\r\nhost: ").count(),
            1,
            "{r}"
        );
        assert!(!r.contains("evil.example"), "{r}");
    } else {
        assert!(got.refused(), "{got:?}");
        assert!(all.iter().all(|r| !r.contains("/hosts")), "{all:?}");
    }
}

#[test]
fn forbidden_request_trailers_never_reach_the_app() {
    let app = Recorder::start();
    let w = worker(&app);
    for (i, (n, v)) in [
        (&b"authorization"[..], &b"Bearer stolen"[..]),
        (b"content-length", b"0"),
        (b"host", b"evil"),
        (b"x-forwarded-for", b"6.6.6.6"),
        (b"cookie", b"a=b"),
    ]
    .iter()
    .enumerate()
    {
        let path = format!("/trailer{i}");
        let mut s = open(&w);
        s.write_all(&stream("POST", &path, &[], &[b"hello"], &[(n, v)]))
            .expect("write");
        let got = outcome(&mut s, 1);
        // Refused with a 400 that names the rule, not a chunked body's syntax.
        assert_eq!(got, Outcome::Status(400), "{}", String::from_utf8_lossy(n));
        let body = data_of(&mut s, 1);
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains("\"forbidden_trailer\"") && body.contains("forbidden trailer field"),
            "{body}"
        );
        let all = app.requests();
        assert!(
            all.iter()
                .all(|r| !r.contains(std::str::from_utf8(v).unwrap_or("?"))),
            "{all:?}"
        );
    }
    // A trailer that may be one is served (not forwarded to an HTTP/1.1 app).
    let fine = stream("POST", "/fine", &[], &[b"hello"], &[(b"x-checksum", b"42")]);
    assert_eq!(one(&w, &fine), Outcome::Status(200));
    still_clean(&w, &app, "/after");
}

#[test]
fn credentials_are_checked_per_stream_not_per_connection() {
    use appproxy_dataplane::auth::sign_hs256;
    let app = Recorder::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        extra: "[secrets]\njwt_secret = \"jwt-key\"\npermit_secret = \"p\"\n".into(),
        circuit_extra: "open_to_public = false\napp_mode = \"inference\"".into(),
        ..Default::default()
    });
    let token = format!(
        "Bearer {}",
        sign_hs256(
            &serde_json::json!({"id": "c0a8f5d2-1111-4222-8333-444455556666", "exp": 4_000_000_000u64}),
            "jwt-key"
        )
    );
    let mut s = open(&w);
    let authed = req("GET", "/authed", &[(b"authorization", token.as_bytes())]);
    s.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &authed))
        .expect("write");
    assert_eq!(outcome(&mut s, 1), Outcome::Status(200));
    // Same connection, no credentials: refused, and nothing reached the app.
    s.write_all(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        3,
        &req("GET", "/anonymous", &[]),
    ))
    .expect("write");
    let got = outcome(&mut s, 3);
    assert!(!matches!(got, Outcome::Status(200)), "{got:?}");
    let all = app.requests();
    assert!(all.iter().any(|r| r.contains("/authed")), "{all:?}");
    assert!(all.iter().all(|r| !r.contains("/anonymous")), "{all:?}");
}

/// An HTTP/2 app on raw frames: records (type, flags, stream) of every frame the
/// worker sends it, and answers each stream once it ends with `:status 200`, DATA
/// and trailers `x-checksum: 42`, `set-cookie: stolen=1`, `content-type: evil`.
struct H2App {
    addr: SocketAddr,
    frames: Arc<Mutex<Vec<(u8, u8, u32)>>>,
}

impl H2App {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let frames: Arc<Mutex<Vec<(u8, u8, u32)>>> = Arc::default();
        let f = frames.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let f = f.clone();
                std::thread::spawn(move || serve_h2(s, f));
            }
        });
        Self { addr, frames }
    }

    fn seen(&self) -> Vec<(u8, u8, u32)> {
        self.frames.lock().expect("frames").clone()
    }
}

fn serve_h2(s: TcpStream, frames: Arc<Mutex<Vec<(u8, u8, u32)>>>) {
    serve_raw_app(s, |&(ty, flags, id, _)| {
        frames.lock().expect("frames").push((ty, flags, id));
        let mut out = Vec::new();
        if (ty == HEADERS || ty == DATA) && flags & END_STREAM != 0 {
            out.extend(frame(HEADERS, END_HEADERS, id, &[0x88]));
            out.extend(frame(DATA, 0, id, b"ok"));
            out.extend(frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                id,
                &block(&[
                    (b"x-checksum", b"42"),
                    (b"set-cookie", b"stolen=1"),
                    (b"content-type", b"evil"),
                ]),
            ));
        }
        out
    })
}

#[test]
fn trailers_to_and_from_an_http2_app_follow_the_http1_rules() {
    let app = H2App::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        circuit_extra: "protocol = \"http2\"".into(),
        ..Default::default()
    });
    // A forbidden request trailer: the app's stream is reset before any trailer
    // reaches it, and the client is refused.
    let trailer: &[Field] = &[(b"authorization", b"Bearer stolen")];
    let got = one(&w, &stream("POST", "/t", &[], &[b"hello"], trailer));
    assert!(got.refused(), "{got:?}");
    // The client's refusal and the app's reset travel on different connections:
    // wait (bounded) for the reset to reach the app before reading what it saw.
    common::eventually("the app's stream was reset", || {
        app.seen().iter().any(|f| f.0 == RST_STREAM)
    });
    let seen = app.seen();
    let headers = seen.iter().filter(|f| f.0 == HEADERS).count();
    assert_eq!(
        headers, 1,
        "only the request head reached the app: {seen:?}"
    );
    // An allowed request trailer is forwarded; the app's response trailers reach
    // the client without the fields a trailer must not carry.
    let allowed = stream("POST", "/t2", &[], &[b"hello"], &[(b"x-checksum", b"7")]);
    assert_eq!(one(&w, &allowed), Outcome::Status(200));
    let seen = app.seen();
    assert_eq!(
        seen.iter()
            .filter(|f| f.0 == HEADERS && f.1 & END_STREAM != 0)
            .count(),
        1,
        "the allowed trailers reached the app: {seen:?}"
    );
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--http2-prior-knowledge", "-i"])
        .arg(format!("http://127.0.0.1:{}/r", w.port))
        .output()
        .expect("curl must be installed (.ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(text.starts_with("http/2 200"), "{text}");
    assert!(text.contains("x-checksum: 42"), "{text}");
    assert!(!text.contains("stolen") && !text.contains("evil"), "{text}");
}

/// An app whose kept-alive connections die under the next request: each connection
/// answers its first request (keep-alive), then reads the second whole and closes
/// without a byte. Records `(connection number, request line)` for every request.
struct DiesOnReuse {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(usize, String)>>>,
}

impl DiesOnReuse {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let seen: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
        let log = seen.clone();
        std::thread::spawn(move || {
            for (n, s) in l.incoming().enumerate() {
                let Ok(s) = s else { continue };
                let log = log.clone();
                std::thread::spawn(move || Self::serve(n, s, &log));
            }
        });
        Self { addr, seen }
    }

    fn serve(conn: usize, mut s: TcpStream, log: &Mutex<Vec<(usize, String)>>) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
        let mut all = Vec::new();
        let mut buf = [0u8; 16384];
        let mut answered = 0usize;
        loop {
            while let Some(k) = frame_request(&all[answered..]) {
                let text = String::from_utf8_lossy(&all[answered..answered + k]).into_owned();
                let line = text.lines().next().unwrap_or_default().to_owned();
                let first = log.lock().expect("log").iter().all(|(c, _)| *c != conn);
                log.lock().expect("log").push((conn, line));
                if !first {
                    // The second request on this connection: close, never answer.
                    return;
                }
                answered += k;
                if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .is_err()
                {
                    return;
                }
            }
            match s.read_uninterrupted(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    }

    fn seen(&self) -> Vec<(usize, String)> {
        self.seen.lock().expect("log").clone()
    }
}

#[test]
fn a_dead_pooled_connection_is_retried_by_the_one_rule() {
    let app = DiesOnReuse::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        ..Default::default()
    });
    let get = |path: &str| {
        one(
            &w,
            &frame(HEADERS, END_HEADERS | END_STREAM, 1, &req("GET", path, &[])),
        )
    };
    // The first stream opens app connection 0, which is pooled after its answer.
    assert_eq!(get("/one"), Outcome::Status(200));
    // The next takes it from the pool; the app closes it under the request: a
    // bodiless GET on a reused connection is sent again, once, on a fresh one.
    assert_eq!(get("/two"), Outcome::Status(200));
    assert_eq!(
        app.seen(),
        vec![
            (0, "GET /one HTTP/1.1".to_owned()),
            (0, "GET /two HTTP/1.1".to_owned()),
            (1, "GET /two HTTP/1.1".to_owned()),
        ]
    );
    // Connection 1 is pooled now; a request with a body on it is not replayable:
    // its death is the client's 502, and the app saw it once.
    let mut f = frame(
        HEADERS,
        END_HEADERS,
        1,
        &req("POST", "/three", &[(b"content-length", b"5")]),
    );
    f.extend(frame(DATA, END_STREAM, 1, b"hello"));
    assert_eq!(one(&w, &f), Outcome::Status(502));
    let posts: Vec<_> = app
        .seen()
        .into_iter()
        .filter(|(_, line)| line.starts_with("POST"))
        .collect();
    assert_eq!(posts, vec![(1, "POST /three HTTP/1.1".to_owned())]);
}
