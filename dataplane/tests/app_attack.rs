//! Hostile suite, app class: the worker against an app that is broken or malicious
//! and controls every byte it sends back. Response framing the worker must not
//! misread (and must not keep an app connection whose framing was in doubt), heads it
//! must not relay as sent, stalls it must bound, and ends it must not present as a
//! complete response.

mod common;

use appproxy_test_support::net::ReadUninterrupted;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::{eventually, Client, Worker, WorkerOpts};

/// One thing the app does in answer to a request.
#[derive(Clone)]
enum Step {
    /// Writes these bytes.
    Send(Vec<u8>),
    /// Writes these bytes one at a time, pausing between them; counts in
    /// [`App::dribbled`] how many went out before a write failed.
    Dribble(Vec<u8>, Duration),
    /// Waits (to put bytes in separate segments, or after the response is out).
    Pause(Duration),
    /// Closes the connection (a FIN).
    Close,
    /// Resets the connection (`SO_LINGER` 0, then close: an RST).
    Reset,
    /// Sends nothing more and waits until the worker closes the connection.
    Hold,
    /// Counts one in this counter (what came before was written).
    Mark(Arc<AtomicUsize>),
    /// Waits until the test opens this gate (bounded: a hang guard), so what follows
    /// reaches the worker only after what the test waited for.
    Await(Gate),
}

/// A gate the app's [`Step::Await`] waits on, opened and shut by the test.
type Gate = Arc<(Mutex<bool>, Condvar)>;

/// Opens (`true`) or shuts `gate`.
fn set_gate(gate: &Gate, open: bool) {
    let (lock, cv) = &**gate;
    *lock.lock().expect("gate") = open;
    cv.notify_all();
}

fn send(bytes: impl AsRef<[u8]>) -> Step {
    Step::Send(bytes.as_ref().to_vec())
}

/// One request as the app read it.
#[derive(Debug, Clone)]
struct Seen {
    /// Which accepted connection carried it (0-based).
    conn: usize,
    path: String,
}

type Script = dyn Fn(&str, &str) -> Vec<Step> + Send + Sync;

/// A scripted app: for each request (method, path), the steps its script gives;
/// every request, connection and connection end is recorded.
struct App {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections accepted.
    connections: Arc<AtomicUsize>,
    /// Connections on which the app read an end of stream or an error (the worker
    /// closed them), by index.
    ended: Arc<Mutex<Vec<usize>>>,
    /// Bytes of the last dribble written before a write failed.
    dribbled: Arc<AtomicUsize>,
    /// Whether the last dribble was cut (a write failed before its end).
    dribble_cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl App {
    fn start(script: impl Fn(&str, &str) -> Vec<Step> + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind app");
        let addr = listener.local_addr().expect("addr");
        let script: Arc<Script> = Arc::new(script);
        let app = Self {
            addr,
            seen: Arc::default(),
            connections: Arc::default(),
            ended: Arc::default(),
            dribbled: Arc::default(),
            dribble_cut: Arc::default(),
            stop: Arc::default(),
        };
        let (seen, connections, ended, dribbled, cut, stop) = (
            app.seen.clone(),
            app.connections.clone(),
            app.ended.clone(),
            app.dribbled.clone(),
            app.dribble_cut.clone(),
            app.stop.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let conn = connections.fetch_add(1, Ordering::SeqCst);
                let (seen, ended, dribbled, cut, script) = (
                    seen.clone(),
                    ended.clone(),
                    dribbled.clone(),
                    cut.clone(),
                    script.clone(),
                );
                std::thread::spawn(move || {
                    let peer_ended = serve(stream, conn, &seen, &dribbled, &cut, &*script);
                    if peer_ended {
                        ended.lock().expect("ended").push(conn);
                    }
                });
            }
        });
        app
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// The connection that carried the request for `path` (the last one).
    fn conn_of(&self, path: &str) -> usize {
        self.seen()
            .iter()
            .rev()
            .find(|s| s.path == path)
            .unwrap_or_else(|| panic!("no request for {path} reached the app"))
            .conn
    }

    /// Waits (bounded) until the worker has closed app connection `conn`.
    fn wait_ended(&self, conn: usize) {
        eventually(&format!("the worker closes app connection {conn}"), || {
            self.ended.lock().expect("ended").contains(&conn)
        });
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Serves one app connection; returns whether it ended because the worker closed it
/// (the app read an end of stream or an error) rather than by the script.
fn serve(
    stream: TcpStream,
    conn: usize,
    seen: &Mutex<Vec<Seen>>,
    dribbled: &AtomicUsize,
    cut: &AtomicBool,
    script: &Script,
) -> bool {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(read_half) = stream.try_clone() else {
        return false;
    };
    let mut r = BufReader::new(read_half);
    let mut w = stream;
    loop {
        // The request head (the worker always writes CRLF lines), then any body.
        let mut head = Vec::new();
        loop {
            let mut line = Vec::new();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
            let end = line == b"\r\n";
            head.extend_from_slice(&line);
            if end {
                break;
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut words = head.split(' ');
        let method = words.next().unwrap_or("").to_owned();
        let path = words.next().unwrap_or("").to_owned();
        // Paths starting with /early are answered with the body unread.
        let length: usize = if path.starts_with("/early") {
            0
        } else {
            head.lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.trim()
                        .eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0)
        };
        let mut body = vec![0; length];
        if r.read_exact(&mut body).is_err() {
            return true;
        }
        seen.lock().expect("seen").push(Seen {
            conn,
            path: path.clone(),
        });
        for step in script(&method, &path) {
            match step {
                Step::Send(bytes) => {
                    if w.write_all(&bytes).is_err() {
                        return true;
                    }
                }
                Step::Dribble(bytes, every) => {
                    dribbled.store(0, Ordering::SeqCst);
                    cut.store(false, Ordering::SeqCst);
                    for (i, b) in bytes.iter().enumerate() {
                        if w.write_all(&[*b]).is_err() {
                            cut.store(true, Ordering::SeqCst);
                            return true;
                        }
                        dribbled.store(i + 1, Ordering::SeqCst);
                        std::thread::sleep(every);
                    }
                }
                Step::Pause(d) => std::thread::sleep(d),
                Step::Mark(counter) => {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                Step::Await(gate) => {
                    let (lock, cv) = &*gate;
                    let open = lock.lock().expect("gate");
                    let _open = cv
                        .wait_timeout_while(open, Duration::from_secs(20), |open| !*open)
                        .expect("gate");
                }
                Step::Close => return false,
                Step::Reset => {
                    let _ = rustix::net::sockopt::set_socket_linger(&w, Some(Duration::ZERO));
                    return false;
                }
                Step::Hold => {
                    let mut sink = [0u8; 1024];
                    loop {
                        match r.read_uninterrupted(&mut sink) {
                            Ok(0) | Err(_) => return true,
                            Ok(_) => {}
                        }
                    }
                }
            }
        }
    }
}

/// The answer every path without a script gets: `honest {path} {method}`.
fn honest(path: &str, method: &str) -> Vec<Step> {
    let body = format!("honest {path} {method}");
    vec![send(format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ))]
}

/// Asserts `r` is the app's honest answer (its text starts with `start`) with
/// nothing of the attacker's: no bytes of another exchange reached it.
fn assert_honest(r: &common::Response, start: &str, what: &str) {
    assert_eq!(r.header("x-attacker"), None, "{what}");
    assert!(
        r.text().starts_with(start),
        "{what}: {} {}",
        r.status,
        r.text()
    );
}

/// A whole response the attacker wants some other client to receive.
const POISON: &[u8] = b"HTTP/1.1 200 OK\r\nX-Attacker: yes\r\nContent-Length: 8\r\n\r\npoisoned";

fn worker_for(app: &App) -> Worker {
    Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        ..Default::default()
    })
}

/// Reads everything until the worker closes; an error (a reset) ends it too, and is
/// reported.
fn read_to_end(s: &mut impl Read) -> (Vec<u8>, Option<ErrorKind>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read_uninterrupted(&mut buf) {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!(
                    "the worker neither finished nor closed; got {:?}",
                    String::from_utf8_lossy(&got)
                )
            }
            Err(e) => return (got, Some(e.kind())),
        }
    }
}

/// Sends `req` on a new connection, opens `gate` once the client has read the
/// response head (the worker committed to its answer), reads until the worker
/// closes the connection and shuts `gate` again.
fn exchange_past_the_head(w: &Worker, req: &[u8], gate: &Gate) -> (String, Option<ErrorKind>) {
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(req).expect("send");
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    let mut err = None;
    while !got.ends_with(b"\r\n\r\n") {
        match s.read_uninterrupted(&mut byte) {
            Ok(1) => got.push(byte[0]),
            Ok(_) => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                err = Some(e.kind());
                break;
            }
        }
    }
    set_gate(gate, true);
    if err.is_none() {
        let (rest, end) = read_to_end(&mut s);
        got.extend_from_slice(&rest);
        err = end;
    }
    set_gate(gate, false);
    (String::from_utf8_lossy(&got).into_owned(), err)
}

/// Sends `req` on a new connection and reads until the worker closes it.
fn exchange_to_close(w: &Worker, req: &[u8]) -> (String, Option<ErrorKind>) {
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(req).expect("send");
    let (got, err) = read_to_end(&mut s);
    (String::from_utf8_lossy(&got).into_owned(), err)
}

/// Writes `mib` MiB of body to `s` from another thread (more than the sockets
/// hold, so that the worker is still sending when the app answers); its outcome
/// when joined: every byte taken, or how the writes failed.
fn send_body(s: &TcpStream, mib: usize) -> std::thread::JoinHandle<Result<(), ErrorKind>> {
    let mut body = s.try_clone().expect("clone");
    std::thread::spawn(move || {
        let block = vec![b'u'; 1 << 20];
        for _ in 0..mib {
            body.write_all(&block).map_err(|e| e.kind())?;
        }
        Ok(())
    })
}

/// The head of a raw response: its status line and fields, lowercase names.
fn head_fields(raw: &str) -> (String, Vec<(String, String)>) {
    let head = raw.split("\r\n\r\n").next().unwrap_or("");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("").to_owned();
    let fields = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, fields)
}

fn lengths(fields: &[(String, String)]) -> Vec<&str> {
    fields
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Method, path, the app's answer, the lengths of the final head, and of each
/// interim head.
type LengthCase<'a> = (
    &'a str,
    &'a str,
    &'a str,
    &'a [&'a str],
    &'a [&'a [&'a str]],
);

/// The app's framing fields on a response without a body are the worker's to write:
/// never a length on a 204 or an interim response (RFC 9110 §8.6: a client may take
/// it for a body), and on HEAD and 304 answers the representation's length once and
/// canonical, or none when the app's is not one valid length. Table: request, app's
/// answer, the lengths the client must see (the final head's, then each interim's).
#[test]
fn lengths_on_bodiless_responses_are_the_workers() {
    #[rustfmt::skip]
    let table: &[LengthCase<'_>] = &[
        ("GET", "/204-length", "HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n", &[], &[]),
        ("GET", "/204-zero", "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", &[], &[]),
        ("GET", "/103-length",
            "HTTP/1.1 103 Early Hints\r\nContent-Length: 50\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            &["2"], &[&[]]),
        ("HEAD", "/head-conflict", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n", &[], &[]),
        ("HEAD", "/head-invalid", "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n", &[], &[]),
        ("HEAD", "/head-list", "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", &["5"], &[]),
        ("HEAD", "/head-repeat", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", &["5"], &[]),
        // What stays: the representation's length on HEAD and 304, and a 0 length.
        ("HEAD", "/head", "HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n", &["40"], &[]),
        ("GET", "/304", "HTTP/1.1 304 Not Modified\r\nContent-Length: 40\r\n\r\n", &["40"], &[]),
        ("GET", "/empty", "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", &["0"], &[]),
    ];
    let answers: std::collections::HashMap<&str, &str> =
        table.iter().map(|(_, p, a, _, _)| (*p, *a)).collect();
    let app = App::start(move |method, path| match answers.get(path) {
        Some(a) => vec![send(a)],
        None => honest(path, method),
    });
    let w = worker_for(&app);
    for (method, path, _, want, interim_want) in table {
        let (raw, err) = exchange_to_close(
            &w,
            format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert_eq!(err, None, "{path}: {raw}");
        let heads: Vec<&str> = raw.split("HTTP/1.1 ").filter(|h| !h.is_empty()).collect();
        assert_eq!(heads.len(), interim_want.len() + 1, "{path}: {raw}");
        for (head, want) in heads.iter().zip(interim_want.iter().chain([want])) {
            let (status, fields) = head_fields(&format!("HTTP/1.1 {head}"));
            assert_eq!(&lengths(&fields), want, "{path}, {status}: {raw}");
        }
    }
}

/// Over HTTP/2 the same answers reach a real client (curl, whose nghttp2 refuses a
/// response stream with a repeated or malformed `content-length`, or a 204 with one
/// other than 0).
#[test]
fn http2_clients_can_read_what_the_app_framed_loosely() {
    let app = App::start(|method, path| match path {
        "/204-length" => vec![send("HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n")],
        "/repeat" => vec![send(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        )],
        "/list" => vec![send("HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok")],
        "/head-conflict" => vec![send(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n",
        )],
        _ => honest(path, method),
    });
    let w = worker_for(&app);
    let mut failed = Vec::new();
    for (path, head, want_status, want_body) in [
        ("/204-length", false, "204", ""),
        ("/repeat", false, "200", "ok"),
        ("/list", false, "200", "ok"),
        ("/head-conflict", true, "200", ""),
    ] {
        let url = format!("http://127.0.0.1:{}{path}", w.port);
        let mut args = vec![
            "-sS",
            "--max-time",
            "20",
            "--http2-prior-knowledge",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
        ];
        if head {
            args.push("-I");
        }
        args.push(&url);
        let out = std::process::Command::new("curl")
            .args(&args)
            .output()
            .expect("curl must be installed (.ci/run installs it)");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        if !out.status.success() || status != want_status || (!head && body != want_body) {
            failed.push(format!(
                "{path}: {stdout:?} {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

/// A response whose framing is in doubt is relayed, but its app connection is closed
/// after it, never handed to the next request (its client's, or another's) with
/// bytes of it possibly still to come; one whose framing is clear is reused. Table: request,
/// the app's answer, whether the connection may be reused.
#[test]
fn an_app_connection_whose_framing_was_in_doubt_is_not_reused() {
    #[rustfmt::skip]
    let table: &[(&str, &str, &str, bool)] = &[
        // HTTP/1.0 with Transfer-Encoding: RFC 9112 §6.1, faulty framing.
        ("GET", "/http10-chunked",
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", false),
        // A 204 announcing a body it must not have.
        ("GET", "/204-chunked", "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n", false),
        ("GET", "/204-length", "HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n", false),
        // Bodiless answers whose lengths conflict.
        ("HEAD", "/head-conflict", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n", false),
        ("HEAD", "/head-te-length", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", false),
        ("GET", "/304-invalid", "HTTP/1.1 304 Not Modified\r\nContent-Length: 0x5\r\n\r\n", false),
        // Clear framing: reused.
        ("GET", "/http10-length", "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", true),
        ("GET", "/204", "HTTP/1.1 204 No Content\r\n\r\n", true),
        ("GET", "/204-zero", "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", true),
        ("HEAD", "/head-chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", true),
        ("HEAD", "/head-length", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true),
        ("GET", "/304", "HTTP/1.1 304 Not Modified\r\nContent-Length: 40\r\n\r\n", true),
    ];
    let answers: std::collections::HashMap<&str, &str> =
        table.iter().map(|(_, p, a, _)| (*p, *a)).collect();
    let app = App::start(move |method, path| match answers.get(path) {
        Some(a) => vec![send(a)],
        None => honest(path, method),
    });
    let w = worker_for(&app);
    for (i, (method, path, _, reusable)) in table.iter().enumerate() {
        let mut first = Client::connect(w.addr());
        first.send(format!("{method} {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        let r = first.response_to(method);
        assert!(r.status < 400, "{path}: {} {}", r.status, r.text());
        let conn = app.conn_of(path);
        if !reusable {
            app.wait_ended(conn);
        }
        // The next request, from the same client: an app connection after a
        // bodiless answer is its own client's for a while
        // (`an_app_connection_after_a_bodiless_answer_is_its_clients_for_a_while`).
        let next = format!("/next-{i}");
        let r = first.get(&next, "");
        assert_eq!(r.status, 200, "after {path}: {}", r.text());
        assert!(
            r.text().starts_with(&format!("honest {next} ")),
            "{}",
            r.text()
        );
        assert_eq!(
            app.conn_of(&next) == conn,
            *reusable,
            "after {path}: app connection reused: {}",
            app.conn_of(&next) == conn
        );
    }
}

/// Bytes an app sends after a response — in the same write, or later while its
/// connection waits in the pool — are never served to the next client, and that
/// connection is not used again. Table: request, the response, what follows it.
#[test]
fn bytes_after_a_response_never_reach_the_next_client() {
    let poison = String::from_utf8_lossy(POISON).into_owned();
    let chunked_poison = format!(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{poison}\r\n0\r\n\r\n",
        poison.len()
    );
    #[rustfmt::skip]
    let table: Vec<(&str, &str, String, String)> = vec![
        ("GET", "/length-extra", "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody".into(), poison.clone()),
        ("GET", "/chunked-extra", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n".into(), poison.clone()),
        // A body on answers that have none: the body is the attacker's response.
        ("HEAD", "/head-body", "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n".into(), poison.clone()),
        ("HEAD", "/head-chunked-body", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".into(), chunked_poison.clone()),
        ("GET", "/204-body", "HTTP/1.1 204 No Content\r\n\r\n".into(), poison.clone()),
        ("GET", "/304-body", "HTTP/1.1 304 Not Modified\r\nContent-Length: 8\r\n\r\n".into(), poison.clone()),
        // Interim responses, then the final one and more.
        ("GET", "/interim-extra", "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".into(), poison.clone()),
    ];
    let answers: std::collections::HashMap<String, (String, String)> = table
        .iter()
        .map(|(_, p, r, x)| (p.to_string(), (r.clone(), x.clone())))
        .collect();
    let written = Arc::new(AtomicUsize::new(0));
    let w2 = written.clone();
    let app = App::start(move |method, path| {
        let (base, late) = path
            .strip_suffix("?late")
            .map_or((path, false), |b| (b, true));
        match answers.get(base) {
            // Together: one write. Late: the response, and the rest once the worker
            // had time to pool the connection (not a timing assertion: the test waits
            // for the write either way).
            Some((resp, extra)) if late => {
                vec![
                    send(resp),
                    Step::Pause(Duration::from_millis(200)),
                    send(extra),
                    Step::Mark(w2.clone()),
                ]
            }
            Some((resp, extra)) => vec![send(format!("{resp}{extra}")), Step::Mark(w2.clone())],
            None => honest(path, method),
        }
    });
    let w = worker_for(&app);
    for (method, path, _, _) in &table {
        for late in [false, true] {
            let target = if late {
                format!("{path}?late")
            } else {
                path.to_string()
            };
            let before = written.load(Ordering::SeqCst);
            let mut first = Client::connect(w.addr());
            first.send(format!("{method} {target} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
            let r = first.response_to(method);
            assert!(r.status < 400, "{target}: {} {}", r.status, r.text());
            assert_eq!(r.header("x-attacker"), None, "{target}");
            eventually("the app wrote what follows its response", || {
                written.load(Ordering::SeqCst) > before
            });
            let conn = app.conn_of(&target);
            let next = format!("/next{}", target.replace('?', "-"));
            let mut second = Client::connect(w.addr());
            let r = second.get(&next, "");
            assert_eq!(r.status, 200, "after {target}: {}", r.text());
            assert_honest(&r, &format!("honest {next} "), &format!("after {target}"));
            assert_ne!(
                app.conn_of(&next),
                conn,
                "after {target}: connection reused"
            );
            // The first client's connection goes on with its own answers too.
            let r = first.get(&format!("{next}-same"), "");
            assert_honest(&r, "honest ", &format!("after {target}"));
        }
    }
}

/// An app that sends a body on an answer that has none (a `HEAD`, a 204, a 304)
/// in a later write — a moment after the answer, once the next client's request
/// may already be on its way over that connection — never has it read as another
/// client's response: such a connection is kept for its own client for a while
/// (`pool::SETTLE`). The test holds the stray bytes back until the next client's
/// request was sent; before, that request took the pooled connection and was
/// answered with them.
#[test]
fn a_body_sent_late_on_a_bodiless_answer_never_reaches_another_client() {
    let poison = String::from_utf8_lossy(POISON).into_owned();
    let gate: Gate = Arc::default();
    let written = Arc::new(AtomicUsize::new(0));
    #[rustfmt::skip]
    let table: Vec<(&str, &str, &str)> = vec![
        ("HEAD", "/late-head", "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n"),
        ("GET", "/late-204", "HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", "/late-304", "HTTP/1.1 304 Not Modified\r\n\r\n"),
    ];
    let answers: std::collections::HashMap<String, String> = table
        .iter()
        .map(|(_, p, r)| (p.to_string(), r.to_string()))
        .collect();
    let (g, w2) = (gate.clone(), written.clone());
    let app = App::start(move |method, path| match answers.get(path) {
        Some(resp) => vec![
            send(resp),
            Step::Await(g.clone()),
            send(&poison),
            Step::Mark(w2.clone()),
        ],
        None => honest(path, method),
    });
    let w = worker_for(&app);
    for (method, path, _) in &table {
        set_gate(&gate, false);
        let before = written.load(Ordering::SeqCst);
        let mut first = Client::connect(w.addr());
        first.send(format!("{method} {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        let r = first.response_to(method);
        assert!(r.status < 400, "{path}: {} {}", r.status, r.text());
        let conn = app.conn_of(path);
        // The next client asks at once; the stray bytes go out only after (the
        // pause lets its request reach the app connection, were it taken).
        let next = format!("/next{path}");
        let mut second = Client::connect(w.addr());
        second.send(format!("GET {next} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        std::thread::sleep(Duration::from_millis(100));
        set_gate(&gate, true);
        let r = second.response();
        assert_honest(&r, &format!("honest {next} "), &format!("after {path}"));
        assert_ne!(app.conn_of(&next), conn, "after {path}: connection reused");
        eventually("the app wrote its stray bytes", || {
            written.load(Ordering::SeqCst) > before
        });
        // Its own client goes on with its own answers: the connection, which holds
        // the stray bytes, is not used again.
        let r = first.get(&format!("{next}-same"), "");
        assert_honest(&r, "honest ", &format!("after {path}"));
    }
}

/// The hold goes on through its own client's reuse: a body sent late on a `HEAD`
/// answer is read as that client's next response (as on a direct connection), and
/// that next request's real answer, still to come on the connection, never reaches
/// another client. Before, the connection went back to the pool unheld after the
/// next answer, and the next client got the first client's answer.
#[test]
fn a_late_body_read_by_its_own_client_shifts_no_answer_to_another() {
    let poison = String::from_utf8_lossy(POISON).into_owned();
    let gate: Gate = Arc::default();
    let g = gate.clone();
    let app = App::start(move |method, path| match path {
        "/held-head" => vec![
            send("HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n"),
            Step::Await(g.clone()),
            send(&poison),
        ],
        // Answered a moment later: not there yet when the next client asks.
        "/a2" => [
            vec![Step::Pause(Duration::from_millis(150))],
            honest(path, method),
        ]
        .concat(),
        _ => honest(path, method),
    });
    let w = worker_for(&app);
    let mut first = Client::connect(w.addr());
    first.send(b"HEAD /held-head HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(first.response_to("HEAD").status, 200);
    // Its next request goes out on the same app connection; the late body comes
    // after it and is taken for its answer.
    first.send(b"GET /a2 HTTP/1.1\r\nHost: t\r\n\r\n");
    std::thread::sleep(Duration::from_millis(50));
    set_gate(&gate, true);
    let r = first.response();
    assert_eq!(
        r.header("x-attacker"),
        Some("yes"),
        "its own client: {}",
        r.text()
    );
    // `/a2`'s own answer is still on that connection: another client asking now
    // gets its own.
    let r = Client::connect(w.addr()).get("/b", "");
    assert_honest(&r, "honest /b ", "another client");
}

/// With `[upstream] reuse = "client"`, an app connection is reused only by the
/// client connection whose request opened it, and closed with it: an app that
/// answers a request twice (the second answer late, once another client's request
/// may be on its way) shifts only its own client's answers. With connections
/// shared (the default, as in nginx and HAProxy), the other client's request here
/// took the pooled connection and was answered with the stray one.
#[test]
fn with_reuse_by_client_an_app_answering_twice_reaches_no_other_client() {
    let poison = String::from_utf8_lossy(POISON).into_owned();
    let gate: Gate = Arc::default();
    let written = Arc::new(AtomicUsize::new(0));
    let (g, w2) = (gate.clone(), written.clone());
    let app = App::start(move |method, path| match path {
        "/twice" => [
            honest(path, method),
            vec![
                Step::Await(g.clone()),
                send(&poison),
                Step::Mark(w2.clone()),
            ],
        ]
        .concat(),
        _ => honest(path, method),
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        extra: "[upstream]\nreuse = \"client\"\n".into(),
        ..Default::default()
    });
    // Its own client keeps its connection across requests.
    let mut first = Client::connect(w.addr());
    assert_honest(&first.get("/one", ""), "honest /one ", "first");
    assert_honest(&first.get("/twice", ""), "honest /twice ", "first");
    let conn = app.conn_of("/twice");
    assert_eq!(app.conn_of("/one"), conn, "its own client reuses it");
    // Another client, while the stray answer is still to come: a connection of its
    // own, and its own answer.
    let mut second = Client::connect(w.addr());
    second.send(b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n");
    std::thread::sleep(Duration::from_millis(100));
    set_gate(&gate, true);
    assert_honest(&second.response(), "honest /next ", "the other client");
    assert_ne!(app.conn_of("/next"), conn, "another client's connection");
    assert_honest(
        &second.get("/next-again", ""),
        "honest /next-again ",
        "again",
    );
    eventually("the app wrote its stray answer", || {
        written.load(Ordering::SeqCst) == 1
    });
    // The first client goes on (whatever it gets at first: the stray answer was
    // its own); its last request's connection, clean and pooled, closes with it.
    assert_eq!(first.get("/mine", "").status, 200);
    assert_honest(&first.get("/mine-last", ""), "honest /mine-last ", "first");
    let mine = app.conn_of("/mine-last");
    drop(first);
    app.wait_ended(mine);
    // The other client's connection stays its own.
    assert_honest(
        &second.get("/last", ""),
        "honest /last ",
        "the other client",
    );
    assert_eq!(app.conn_of("/last"), app.conn_of("/next"));
}

/// A circuit's own `upstream_reuse` decides for it, beside a circuit of the worker's
/// default to the same app address (the pool's key): on the `"client"` circuit an
/// app that answers twice shifts only its own client's answers, on the shared one
/// the stray answer reaches the next client (as nginx's); and neither circuit's
/// clients take the other's connections. Before the field, the worker's
/// `[upstream] reuse` decided for both, and the `"client"` circuit's other client
/// got the stray answer.
#[test]
fn a_circuits_upstream_reuse_isolates_its_clients_beside_a_shared_circuit() {
    let poison = String::from_utf8_lossy(POISON).into_owned();
    let gate: Gate = Arc::default();
    let written = Arc::new(AtomicUsize::new(0));
    let (g, w2) = (gate.clone(), written.clone());
    let app = App::start(move |method, path| match path {
        "/twice" | "/twice-b" => [
            honest(path, method),
            vec![
                Step::Await(g.clone()),
                send(&poison),
                Step::Mark(w2.clone()),
            ],
        ]
        .concat(),
        _ => honest(path, method),
    });
    let shared_port = TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("addr")
        .port();
    // The worker's first circuit reuses by client; its second, to the same app,
    // follows the worker (shared).
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        circuit_extra: format!(
            "open_to_public = true\nupstream_reuse = \"client\"\n\n\
             [[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455556667\"\napp = \"shared\"\n\
             port = {shared_port}\nopen_to_public = true\n\
             route_info = [{{ session_id = \"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\", \
             kernel_host = \"{}\", kernel_port = {}, traffic_ratio = 1.0 }}]\n",
            app.addr.ip(),
            app.addr.port()
        ),
        ..Default::default()
    });
    let private = w.addr();
    let shared = SocketAddr::new(private.ip(), shared_port);
    eventually("the shared circuit listens", || {
        TcpStream::connect(shared).is_ok()
    });

    // The "client" circuit: its own client keeps its connection.
    let mut first = Client::connect(private);
    assert_honest(&first.get("/one", ""), "honest /one ", "first");
    assert_honest(&first.get("/twice", ""), "honest /twice ", "first");
    let conn = app.conn_of("/twice");
    assert_eq!(app.conn_of("/one"), conn, "its own client reuses it");
    // A client of the shared circuit, the stray answer still to come: not that
    // connection.
    let r = Client::connect(shared).get("/between", "");
    assert_honest(&r, "honest /between ", "the shared circuit's client");
    let between = app.conn_of("/between");
    assert_ne!(
        between, conn,
        "a shared circuit's client took a private connection"
    );
    // Another client of the "client" circuit: a connection of its own (neither the
    // first client's nor the shared circuit's), and its own answer.
    let mut second = Client::connect(private);
    second.send(b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n");
    std::thread::sleep(Duration::from_millis(100));
    set_gate(&gate, true);
    assert_honest(&second.response(), "honest /next ", "the other client");
    let next = app.conn_of("/next");
    assert!(
        next != conn && next != between,
        "{next}: another's connection"
    );
    eventually("the app wrote its stray answer", || {
        written.load(Ordering::SeqCst) == 1
    });
    // The first client's connection closes with it.
    assert_eq!(first.get("/mine", "").status, 200);
    assert_honest(&first.get("/mine-last", ""), "honest /mine-last ", "first");
    let mine = app.conn_of("/mine-last");
    drop(first);
    app.wait_ended(mine);

    // The shared circuit: the next client's request goes out on the connection a
    // stray answer is still to come on, and is answered with it.
    set_gate(&gate, false);
    let mut first = Client::connect(shared);
    assert_honest(
        &first.get("/twice-b", ""),
        "honest /twice-b ",
        "first, shared",
    );
    let conn = app.conn_of("/twice-b");
    let mut second = Client::connect(shared);
    second.send(b"GET /next-b HTTP/1.1\r\nHost: t\r\n\r\n");
    std::thread::sleep(Duration::from_millis(100));
    set_gate(&gate, true);
    let r = second.response();
    // The stray answer was written before the app read `/next-b`: wait for it.
    eventually("the app reads /next-b", || {
        app.seen().iter().any(|s| s.path == "/next-b")
    });
    assert_eq!(app.conn_of("/next-b"), conn, "shared: the same connection");
    assert_eq!(
        r.header("x-attacker"),
        Some("yes"),
        "shared: the stray answer reaches the other client: {}",
        r.text()
    );
    drop(first);
}

/// An app connection that last answered a bodiless request goes on at once for its
/// own client, is not taken by another client during `pool::SETTLE` (250 ms), and
/// is after it; at the per-route connection cap, a held connection is closed to
/// make room rather than the other client refused.
#[test]
fn an_app_connection_after_a_bodiless_answer_is_its_clients_for_a_while() {
    let head_only = |method: &str, path: &str| {
        if method == "HEAD" {
            vec![send("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")]
        } else {
            honest(path, method)
        }
    };
    let app = App::start(head_only);
    let w = worker_for(&app);
    let mut first = Client::connect(w.addr());
    first.send(b"HEAD /a HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(first.response_to("HEAD").status, 200);
    let conn = app.conn_of("/a");
    assert_eq!(first.get("/a-again", "").status, 200);
    assert_eq!(app.conn_of("/a-again"), conn, "its own client, at once");
    // Past the hold, another client has it.
    first.send(b"HEAD /b HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(first.response_to("HEAD").status, 200);
    drop(first);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(Client::connect(w.addr()).get("/later", "").status, 200);
    assert_eq!(
        app.conn_of("/later"),
        conn,
        "another client, after the hold"
    );
    // Within it, another client gets a connection of its own.
    let mut first = Client::connect(w.addr());
    first.send(b"HEAD /c HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(first.response_to("HEAD").status, 200);
    let conn = app.conn_of("/c");
    assert_eq!(Client::connect(w.addr()).get("/other", "").status, 200);
    assert_ne!(app.conn_of("/other"), conn, "another client, at once");

    // One connection per route: another client is served on a new one, the held
    // one closed for it.
    let app = App::start(head_only);
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        extra: "[upstream]\nmax_connections_per_route = 1\n".into(),
        ..Default::default()
    });
    let mut first = Client::connect(w.addr());
    first.send(b"HEAD /a HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(first.response_to("HEAD").status, 200);
    let conn = app.conn_of("/a");
    let r = Client::connect(w.addr()).get("/other", "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(app.conn_of("/other"), conn);
    app.wait_ended(conn);
}

/// A head the app dribbles one byte at a time gets no more than
/// `[timeouts] upstream_head_secs` in all (not per byte): the client gets a 504, the
/// app connection is closed before the head could end, and no descriptor stays open.
#[test]
fn a_dribbled_head_is_cut_at_the_head_deadline() {
    let mut head = b"HTTP/1.1 200 OK\r\nX-Slow: ".to_vec();
    head.extend([b'a'; 100]);
    head.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\nok");
    let total = head.len();
    let app = App::start(move |method, path| match path {
        "/dribble" => vec![Step::Dribble(head.clone(), Duration::from_millis(100))],
        _ => honest(path, method),
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        extra: "[timeouts]\nupstream_head_secs = 1\n".into(),
        ..Default::default()
    });
    // At rest with one app connection in the pool (as after the last request).
    assert!(Client::connect(w.addr())
        .get("/warm", "")
        .text()
        .starts_with("honest /warm"));
    let at_rest = common::resting_fds(&w);
    let mut c = Client::connect(w.addr());
    let r = c.get("/dribble", "");
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["code"], "upstream_timeout");
    eventually("the app's dribble is cut by the worker", || {
        app.dribble_cut.load(Ordering::SeqCst)
    });
    let sent = app.dribbled.load(Ordering::SeqCst);
    assert!(sent < total, "the whole head ({total} bytes) went out");
    app.wait_ended(app.conn_of("/dribble"));
    // The client connection goes on; nothing is left open.
    assert!(c.get("/after", "").text().starts_with("honest /after"));
    drop(c);
    assert_eq!(common::resting_fds(&w), at_rest, "descriptors leaked");
}

/// How the client can tell a response whose body did not arrive whole.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framed {
    /// `Content-Length`: fewer bytes, then the close.
    Length,
    /// Chunked: no last chunk.
    Chunked,
    /// Delimited by the close (an HTTP/1.0 client): only a reset tells.
    Close,
}

/// Asserts that `raw` (and how the stream ended) cannot pass for a whole response.
fn assert_not_whole(what: &str, raw: &str, err: Option<ErrorKind>, framed: Framed) {
    let (status, fields) = head_fields(raw);
    assert!(status.starts_with("HTTP/1.1 200"), "{what}: {raw}");
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    match framed {
        Framed::Length => {
            let want: usize = lengths(&fields)
                .first()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{what}: no length: {raw}"));
            assert!(body.len() < want, "{what}: a whole body: {raw}");
        }
        Framed::Chunked => {
            assert!(
                fields
                    .iter()
                    .any(|(n, v)| n == "transfer-encoding" && v == "chunked"),
                "{what}: {raw}"
            );
            assert!(
                !body.ends_with("0\r\n\r\n"),
                "{what}: a last chunk: {raw:?}"
            );
        }
        Framed::Close => {
            assert!(
                lengths(&fields).is_empty()
                    && !fields.iter().any(|(n, _)| n == "transfer-encoding"),
                "{what}: {raw}"
            );
            assert_eq!(
                err,
                Some(ErrorKind::ConnectionReset),
                "{what}: a close-delimited body cut short ended with a clean close: {raw:?}"
            );
        }
    }
}

/// The partial responses of the truncation tests: (path, what the app sends before
/// it stops, the client's version, how the client can tell). The last two are
/// delimited by the close: what ends them (an idle timeout, a close, a reset) is
/// each test's own case.
#[rustfmt::skip]
fn partial_responses() -> Vec<(&'static str, &'static str, &'static str, Framed)> {
    vec![
        ("/length", "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", "1.1", Framed::Length),
        ("/chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n", "1.1", Framed::Chunked),
        ("/chunked-mid", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n0123456789", "1.1", Framed::Chunked),
        ("/length", "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", "1.0", Framed::Length),
        ("/chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n", "1.0", Framed::Close),
        ("/chunked-mid", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n0123456789", "1.0", Framed::Close),
        // A trailer section past the decoder's bounds (32 fields) ends it the same way.
        ("/trailer-flood", trailer_flood(), "1.1", Framed::Chunked),
        ("/trailer-flood", trailer_flood(), "1.0", Framed::Close),
        ("/until-close", "HTTP/1.1 200 OK\r\n\r\n0123456789", "1.1", Framed::Chunked),
        ("/until-close", "HTTP/1.1 200 OK\r\n\r\n0123456789", "1.0", Framed::Close),
    ]
}

/// A chunked response whose trailer section has more fields than allowed, after
/// its first chunk went out.
fn trailer_flood() -> &'static str {
    let fields: String = (0..40).map(|i| format!("X-T{i}: v\r\n")).collect();
    format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n{PAUSE}0\r\n{fields}")
        .leak()
}

/// Where an answer is split into two writes, the second once the client has the
/// response head (so what comes before reaches the client first, and the worker
/// has committed to relaying the response when the rest arrives).
const PAUSE: &str = "<pause>";

/// The steps that send `answer`, split at each [`PAUSE`], each part after the
/// first once `gate` opens.
fn in_segments(answer: &str, gate: &Gate) -> Vec<Step> {
    let mut steps = Vec::new();
    for (i, part) in answer.split(PAUSE).enumerate() {
        if i > 0 {
            steps.push(Step::Await(gate.clone()));
        }
        steps.push(send(part));
    }
    steps
}

/// A body the app stops sending mid-way is cut after `[timeouts] response_idle_secs`
/// and never presented as complete; the app connection is closed and no descriptor
/// stays open.
#[test]
fn a_stalled_body_is_cut_and_never_looks_complete() {
    // Those delimited by the close: only the idle timeout ends them, never as a
    // whole body.
    let cases = partial_responses();
    let answers: std::collections::HashMap<&str, &str> =
        cases.iter().map(|(p, a, _, _)| (*p, *a)).collect();
    let gate = Gate::default();
    let app_gate = gate.clone();
    let app = App::start(move |method, path| match answers.get(path) {
        Some(a) => {
            let mut steps = in_segments(a, &app_gate);
            steps.push(Step::Hold);
            steps
        }
        None => honest(path, method),
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        extra: "[timeouts]\nresponse_idle_secs = 1\n".into(),
        ..Default::default()
    });
    let at_rest = common::resting_fds(&w);
    for (path, _, version, framed) in &cases {
        let what = format!("{path} to HTTP/{version}");
        let (raw, err) = exchange_past_the_head(
            &w,
            format!("GET {path} HTTP/{version}\r\nHost: t\r\n\r\n").as_bytes(),
            &gate,
        );
        assert_not_whole(&what, &raw, err, *framed);
        app.wait_ended(app.conn_of(path));
    }
    assert_eq!(common::resting_fds(&w), at_rest, "descriptors leaked");
}

/// An app that closes or resets its connection mid-body: the client never gets the
/// truncated body as a complete response.
#[test]
fn an_app_ending_mid_body_never_completes_the_response() {
    // Those delimited by the close: the close completes them, a reset does not.
    let cases = partial_responses();
    let answers: std::collections::HashMap<&str, &str> =
        cases.iter().map(|(p, a, _, _)| (*p, *a)).collect();
    let gate = Gate::default();
    let app_gate = gate.clone();
    let app = App::start(move |method, path| {
        let (base, reset) = path
            .strip_suffix("?reset")
            .map_or((path, false), |b| (b, true));
        match answers.get(base) {
            // The end comes once the client has the head: the response was under
            // way when the app ended it.
            Some(a) => {
                let mut steps = in_segments(a, &app_gate);
                steps.push(Step::Await(app_gate.clone()));
                steps.push(if reset { Step::Reset } else { Step::Close });
                steps
            }
            None => honest(path, method),
        }
    });
    let w = worker_for(&app);
    let at_rest = common::resting_fds(&w);
    for (path, _, version, framed) in &cases {
        for reset in [false, true] {
            if *path == "/until-close" && !reset {
                continue;
            }
            let target = if reset {
                format!("{path}?reset")
            } else {
                path.to_string()
            };
            let what = format!("{target} to HTTP/{version}");
            let (raw, err) = exchange_past_the_head(
                &w,
                format!("GET {target} HTTP/{version}\r\nHost: t\r\n\r\n").as_bytes(),
                &gate,
            );
            assert_not_whole(&what, &raw, err, *framed);
        }
    }
    assert_eq!(common::resting_fds(&w), at_rest, "descriptors leaked");
}

/// An app that refuses a request body (413, 401 …) may answer before it read it all
/// and close: its answer reaches the client (not a 502 for the reset that follows),
/// the client connection closes after it (the rest of the body is read and dropped:
/// a lingering close), and the
/// app connection is not reused. Table: path, the app's answer, the status relayed.
#[test]
fn an_answer_before_the_whole_body_is_relayed() {
    #[rustfmt::skip]
    let table: &[(&str, &str, u16)] = &[
        ("/early-413", "HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!", 413),
        // Claims keep-alive, then closes anyway.
        ("/early-401", "HTTP/1.1 401 Unauthorized\r\nContent-Length: 8\r\n\r\nwho are?", 401),
        // Interim heads first (an unsolicited 100, a 103): passed over.
        ("/early-100", "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!", 413),
    ];
    let answers: std::collections::HashMap<&str, &str> =
        table.iter().map(|(p, a, _)| (*p, *a)).collect();
    // Paths starting with /early are answered after the head, the body unread.
    let app = App::start(move |method, path| match answers.get(path) {
        Some(a) => vec![send(a), Step::Close],
        None => honest(path, method),
    });
    let w = worker_for(&app);
    const SIZE: usize = 32 << 20;
    for (path, answer, status) in table {
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.write_all(
            format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {SIZE}\r\n\r\n").as_bytes(),
        )
        .expect("head");
        // More than the sockets hold: the worker is still sending when the app closes.
        let writer = send_body(&s, SIZE >> 20);
        let (got, end) = read_to_end(&mut s);
        let wrote = writer.join().expect("writer");
        let got = String::from_utf8_lossy(&got).into_owned();
        // A lingering close: the answer ends cleanly and the rest of the body is
        // taken and dropped, not met with a reset.
        assert_eq!(end, None, "{path}: the answer must end cleanly: {got}");
        assert_eq!(wrote, Ok(()), "{path}: the body's rest must be taken");
        let (line, fields) = head_fields(&got);
        assert!(
            line.starts_with(&format!("HTTP/1.1 {status} ")),
            "{path}: {got}"
        );
        assert!(
            fields
                .iter()
                .any(|(n, v)| n == "connection" && v == "close"),
            "{path}: the client's body is unread, its connection must close: {got}"
        );
        let app_body = answer.rsplit_once("\r\n\r\n").map_or("", |(_, b)| b);
        assert!(
            got.ends_with(&format!("\r\n\r\n{app_body}")),
            "{path}: {got}"
        );
        let conn = app.conn_of(path);
        let next = format!("/next{path}");
        let r = Client::connect(w.addr()).get(&next, "");
        assert!(
            r.text().starts_with(&format!("honest {next} ")),
            "{}",
            r.text()
        );
        assert_ne!(app.conn_of(&next), conn, "after {path}: connection reused");
    }
}

/// An app that refuses a request body (413, 401 …) and keeps its connection open
/// without reading on: its answer reaches the client at once, whether the worker
/// was writing the body to it (blocked: the app no longer reads) or waiting for
/// the client's next bytes; the client's connection closes after it (the rest of
/// the body unread) and the app's is not reused. Before, the answer sat unread: a
/// body larger than the sockets hold ended a minute later in a 502 for the stalled
/// write, and a client waiting for the answer before sending on got nothing. A
/// successful answer begun early is no refusal: the app reads on, the whole body
/// goes to it, and its answer follows.
#[test]
fn an_app_refusing_a_body_it_leaves_unread_is_answered_at_once() {
    let gate = Gate::default();
    let hold = gate.clone();
    let app = App::start(move |method, path| {
        match path {
        "/early-413" => vec![
            send("HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!"),
            Step::Await(hold.clone()),
        ],
        "/early-401" => vec![
            send("HTTP/1.1 401 Unauthorized\r\nContent-Length: 8\r\n\r\nwho are?"),
            Step::Await(hold.clone()),
        ],
        // The refusal behind an interim head.
        "/early-100-413" => vec![
            send("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!"),
            Step::Await(hold.clone()),
        ],
        // A status line cut off by the app's end: a broken answer, at once.
        "/early-cut" => vec![send("HTTP/1.1 4"), Step::Close],
        // Answers at once, then reads the whole body (until the worker closes).
        "/early-200" => vec![
            send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"),
            Step::Hold,
        ],
        _ => honest(path, method),
    }
    });
    let w = worker_for(&app);
    let post = |path: &str, size: usize, extra: &str| {
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.write_all(
            format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n{extra}\r\n")
                .as_bytes(),
        )
        .expect("head");
        s
    };
    let answered = |got: &[u8], status: &str, body: &str| {
        let got = String::from_utf8_lossy(got).into_owned();
        let (line, fields) = head_fields(&got);
        assert!(line.starts_with(&format!("HTTP/1.1 {status} ")), "{got}");
        assert!(got.ends_with(&format!("\r\n\r\n{body}")), "{got}");
        fields
            .iter()
            .any(|(n, v)| n == "connection" && v == "close")
    };
    // More than the sockets hold: the body's write blocks, the app reading none.
    const SIZE: usize = 64 << 20;
    // A refusal while the worker's write of the body blocks (`blocking`: the rest
    // is taken after the answer), or while it waits for the client's next bytes
    // (ten of 100,000 sent, the client waiting for an answer): answered whole, at
    // once, and the client's connection closed.
    let refused = |path: &str, blocking: bool, status: &str, body: &str| {
        let (mut s, writer) = if blocking {
            let s = post(path, SIZE, "");
            let writer = send_body(&s, SIZE >> 20);
            (s, Some(writer))
        } else {
            let mut s = post(path, 100_000, "");
            s.write_all(&[b'u'; 10]).expect("first bytes");
            (s, None)
        };
        let (got, end) = read_to_end(&mut s);
        assert_eq!(end, None, "{path}: the answer ends cleanly");
        assert!(
            answered(&got, status, body),
            "{path}: the client's connection closes"
        );
        if let Some(writer) = writer {
            let sent = writer.join().expect("writer");
            assert_eq!(sent, Ok(()), "{path}: the rest is taken");
        }
    };
    refused("/early-413", true, "413", "too big!");
    refused("/early-401", false, "401", "who are?");
    refused("/early-100-413", true, "413", "too big!");
    // The app's end seen behind a cut status line ends the wait too (before, the
    // watch saw the same bytes again at once, for ever, and the core spun: the
    // request below was never answered).
    let mut s = post("/early-cut", 100_000, "");
    s.write_all(&[b'u'; 10]).expect("first bytes");
    let (got, _) = read_to_end(&mut s);
    let got = String::from_utf8_lossy(&got).into_owned();
    assert!(got.starts_with("HTTP/1.1 502 "), "{got}");
    set_gate(&gate, true);
    for path in ["/early-413", "/early-401", "/early-100-413"] {
        app.wait_ended(app.conn_of(path));
    }
    // A success begun early: the whole body goes on, then the answer (and the
    // close the client asked for).
    let mut s = post("/early-200", 8 << 20, "Connection: close\r\n");
    let writer = send_body(&s, 8);
    let (got, _) = read_to_end(&mut s);
    assert_eq!(writer.join().expect("writer"), Ok(()));
    answered(&got, "200", "ok");
    // Logged as an early answer: the two refusals, not the success.
    let early = "the app answered before taking the whole request body";
    let lines = w.wait_log(early, |v| v["message"] == early && v["status"] == 401);
    assert_eq!(lines.len(), 1);
    // The third refusal's line is queued after the 401's: waited for (bounded),
    // then compared whole as before.
    eventually("the three refusals logged", || {
        w.logged_statuses(early).len() >= 3
    });
    assert_eq!(
        w.logged_statuses(early),
        [413, 401, 413],
        "{}",
        w.log_text()
    );
    let r = Client::connect(w.addr()).get("/after", "");
    assert!(r.text().starts_with("honest /after "), "{}", r.text());
}

/// A success an app answers before it has the whole body, its connection then
/// closed: that answer is all it will say, and the body can no longer reach it. It
/// is relayed at once, the client's connection closed after it (the rest of the
/// body unread). Before, it was held while the body went on: a client waiting for
/// the answer before it sent more got a 408 at the body timeout instead (an
/// outside tester's find).
#[test]
fn a_success_answered_early_by_an_app_that_then_closes_is_relayed_at_once() {
    let app = App::start(move |method, path| match path {
        "/early-200-close" => vec![
            send("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly"),
            Step::Close,
        ],
        _ => honest(path, method),
    });
    // Before, each request below was a 408 once this passed.
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        extra: "[timeouts]\nbody_idle_secs = 3\n".into(),
        ..Default::default()
    });
    for _ in 0..2 {
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.write_all(b"POST /early-200-close HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n")
            .expect("head");
        s.write_all(&[b'u'; 10]).expect("first bytes");
        let (got, end) = read_to_end(&mut s);
        let got = String::from_utf8_lossy(&got).into_owned();
        assert_eq!(end, None, "the answer ends cleanly: {got}");
        assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
        assert!(got.ends_with("\r\n\r\nearly"), "{got}");
    }
    // Logged as an early answer, naming the app (before, the closed socket's peer
    // lookup: "Transport endpoint is not connected").
    let early = "the app answered before taking the whole request body";
    let lines = w.wait_log(early, |v| v["message"] == early && v["status"] == 200);
    assert_eq!(
        lines[0]["upstream"],
        app.addr.to_string(),
        "{}",
        w.log_text()
    );
    let r = Client::connect(w.addr()).get("/after", "");
    assert!(r.text().starts_with("honest /after "), "{}", r.text());
}

/// An app that answers a success before it has the whole body and then stops
/// reading has its answer relayed once the body's write stalls for
/// `body_idle_secs`; one that stops reading without answering gets the client a 504
/// `upstream_timeout`. Before, both were a 502 `upstream_closed` ("timed out"), the
/// success thrown away.
#[test]
fn a_success_answered_before_a_body_the_app_stopped_taking_is_relayed() {
    let gate = Gate::default();
    let hold = gate.clone();
    let app = App::start(move |method, path| match path {
        "/early-silent" => vec![Step::Await(hold.clone())],
        "/early-200-stop" => vec![
            send("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsaved"),
            Step::Await(hold.clone()),
        ],
        _ => honest(path, method),
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        extra: "[timeouts]\nbody_idle_secs = 1\n".into(),
        ..Default::default()
    });
    const SIZE: usize = 64 << 20;
    for (path, status, body) in [
        ("/early-200-stop", "200", "saved"),
        ("/early-silent", "504", ""),
    ] {
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.write_all(
            format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {SIZE}\r\n\r\n").as_bytes(),
        )
        .expect("head");
        let writer = send_body(&s, SIZE >> 20);
        let (got, _) = read_to_end(&mut s);
        let got = String::from_utf8_lossy(&got).into_owned();
        assert!(
            got.starts_with(&format!("HTTP/1.1 {status} ")),
            "{path}: {got}"
        );
        if body.is_empty() {
            assert!(got.contains(r#""upstream_timeout""#), "{path}: {got}");
        } else {
            assert!(got.ends_with(&format!("\r\n\r\n{body}")), "{path}: {got}");
        }
        let (line, fields) = head_fields(&got);
        assert!(
            fields
                .iter()
                .any(|(n, v)| n == "connection" && v == "close"),
            "{path}: {line}"
        );
        let _ = writer.join();
    }
    set_gate(&gate, true);
    let r = Client::connect(w.addr()).get("/after", "");
    assert!(r.text().starts_with("honest /after "), "{}", r.text());
}

/// Heads the worker cannot relay faithfully are a 502 `upstream_invalid_response`
/// (never passed on, never guessed at); the app connection is closed and the client
/// connection goes on. Table: what the app answers.
#[test]
fn malformed_heads_are_a_502_and_their_connection_is_dropped() {
    let many_fields: String = (0..200).map(|i| format!("X-F{i}: v\r\n")).collect();
    let big_field = format!("X-Big: {}\r\n", "b".repeat(70 * 1024));
    #[rustfmt::skip]
    let table: Vec<(&str, String)> = vec![
        ("status-000", "HTTP/1.1 000 X\r\nContent-Length: 0\r\n\r\n".into()),
        ("status-1000", "HTTP/1.1 1000 X\r\nContent-Length: 0\r\n\r\n".into()),
        ("status-99", "HTTP/1.1 099 X\r\nContent-Length: 0\r\n\r\n".into()),
        // RFC 9110 §15: past 599 a status is invalid (a library's internal code).
        ("status-600", "HTTP/1.1 600 X\r\nContent-Length: 0\r\n\r\n".into()),
        ("status-999", "HTTP/1.1 999 X\r\nContent-Length: 0\r\n\r\n".into()),
        ("version-2", "HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n".into()),
        ("not-http", "ICY 200 OK\r\nContent-Length: 0\r\n\r\n".into()),
        ("nul-in-value", "HTTP/1.1 200 OK\r\nX-A: a\0b\r\nContent-Length: 0\r\n\r\n".into()),
        ("cr-in-value", "HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n".into()),
        ("space-in-name", "HTTP/1.1 200 OK\r\nX A: b\r\nContent-Length: 0\r\n\r\n".into()),
        ("space-before-colon", "HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n".into()),
        ("obs-fold", "HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n".into()),
        ("length-plus", "HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok".into()),
        ("length-hex", "HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\nok".into()),
        ("length-huge", "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\nok".into()),
        ("length-differ", "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok".into()),
        ("length-empty", "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\nok".into()),
        ("te-and-length", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n".into()),
        ("te-not-last", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nok".into()),
        ("te-identity", "HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nok".into()),
        ("te-twice", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n".into()),
        ("bad-chunk-size", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+2\r\nok\r\n0\r\n\r\n".into()),
        ("101-unasked", "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\nRAW".into()),
        ("too-many-fields", format!("HTTP/1.1 200 OK\r\n{many_fields}Content-Length: 0\r\n\r\n")),
        ("head-too-large", format!("HTTP/1.1 200 OK\r\n{big_field}Content-Length: 0\r\n\r\n")),
    ];
    let answers: std::collections::HashMap<String, String> = table
        .iter()
        .map(|(p, a)| (format!("/{p}"), a.clone()))
        .collect();
    let app = App::start(move |method, path| match answers.get(path) {
        Some(a) => vec![send(a), Step::Hold],
        None => honest(path, method),
    });
    let w = worker_for(&app);
    let mut c = Client::connect(w.addr());
    for (name, _) in &table {
        let path = format!("/{name}");
        let r = c.get(&path, "");
        assert_eq!(r.status, 502, "{name}: {}", r.text());
        assert_eq!(r.json()["code"], "upstream_invalid_response", "{name}");
        app.wait_ended(app.conn_of(&path));
        let after = format!("/after-{name}");
        assert!(
            c.get(&after, "")
                .text()
                .starts_with(&format!("honest {after} ")),
            "{name}: the client connection goes on"
        );
    }
}

/// An app's cookies reach the client without `Domain`, host-only: with it, the app
/// at `alpha.apps.test` could set cookies for every circuit under `apps.test`, and
/// one on a port of `proxy1.example.com` for every host under `example.com`
/// (another user's app's session, or a cookie bomb that makes them refuse the
/// browser's requests). The cookie's other attributes are as sent, on a wildcard
/// circuit and a port circuit alike. Before, `Domain` went out as the app wrote
/// it, to HTTP/1.1 and HTTP/2 clients.
#[test]
fn an_apps_cookies_are_host_only() {
    const SET: &str = "HTTP/1.1 200 OK\r\nSet-Cookie: s=1; Domain=apps.test; Path=/\r\nSet-Cookie: t=2;domain=.APPS.test\r\nSet-Cookie: u=3; Path=/; HttpOnly\r\nSet-Cookie: v=Domain=x; Secure; DOMAIN = apps.test ; SameSite=Lax\r\nSet-Cookie: w=4 ; Domain=apps.test\r\nContent-Length: 2\r\n\r\nok";
    const HOST_ONLY: [&str; 5] = [
        "s=1; Path=/",
        "t=2",
        "u=3; Path=/; HttpOnly",
        "v=Domain=x; Secure; SameSite=Lax",
        // Never a value ending in a space, which HTTP/2 clients refuse.
        "w=4",
    ];
    let app = App::start(|method, path| match path {
        "/cookie" => vec![send(SET)],
        _ => honest(path, method),
    });
    let wildcard = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        worker_extra: "frontend_mode = \"wildcard\"\nwildcard_domain = \".apps.test\"\nwildcard_traffic_port = {PORT}".into(),
        circuit_extra: "open_to_public = true\nfrontend_mode = \"wildcard\"\nsubdomain = \"alpha\"\n".into(),
        ..Default::default()
    });
    let by_port = worker_for(&app);
    for (w, host, want) in [
        (&wildcard, "alpha.apps.test", HOST_ONLY),
        (&by_port, "127.0.0.1", HOST_ONLY),
    ] {
        let mut c = Client::connect(w.addr());
        c.send(format!("GET /cookie HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
        let r = c.response();
        assert_eq!(r.status, 200, "{host}: {}", r.text());
        assert_eq!(r.headers_named("set-cookie"), want, "{host}, HTTP/1.1");
        // HTTP/2 clients, through the same circuit.
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "20", "--http2-prior-knowledge"])
            .args(["-o", "/dev/null", "-D", "-", "-H"])
            .arg(format!("Host: {host}"))
            .arg(format!("http://127.0.0.1:{}/cookie", w.port))
            .output()
            .expect("curl must be installed (.ci/run installs it)");
        let head = String::from_utf8_lossy(&out.stdout).into_owned();
        let got: Vec<&str> = head
            .lines()
            .filter_map(|l| l.strip_prefix("set-cookie: "))
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .collect();
        assert_eq!(got, want, "{host}, HTTP/2: {head}");
    }
}

/// Hop-by-hop fields of the app's answer, and the fields its `Connection` names, stay
/// on the app's hop; the worker's own framing and request ID replace the app's (and
/// the app's IDs under the ID's aliases, `X-Request-ID` and `X-BackendAI-RequestID`,
/// are left out: a client saw two or three request IDs, the app's unchecked).
#[test]
fn the_apps_hop_by_hop_fields_stay_on_its_hop() {
    let app = App::start(|method, path| {
        match path {
        "/hop" => vec![send(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret, Set-Cookie\r\nX-Secret: s\r\nSet-Cookie: a=b\r\nKeep-Alive: timeout=1\r\nUpgrade: h2c\r\nProxy-Connection: keep-alive\r\nTrailer: X-T\r\nTE: trailers\r\nX-Backend-Request-ID: app-chosen\r\nX-Request-ID: app-alias\r\nX-BackendAI-RequestID: bad id \"x\"\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok",
        )],
        _ => honest(path, method),
    }
    });
    let w = worker_for(&app);
    let mut c = Client::connect(w.addr());
    let r = c.get("/hop", "X-Backend-Request-ID: client-id\r\n");
    assert_eq!(r.text(), "ok");
    for name in [
        "x-secret",
        "set-cookie",
        "keep-alive",
        "upgrade",
        "proxy-connection",
        "trailer",
        "te",
        "connection",
        // The request ID's aliases: the worker's ID is the one echoed.
        "x-request-id",
        "x-backendai-requestid",
    ] {
        assert_eq!(r.header(name), None, "{name} relayed: {:?}", r.headers);
    }
    assert_eq!(r.header("x-kept"), Some("yes"));
    assert_eq!(r.headers_named("x-backend-request-id"), vec!["client-id"]);
    // The app's keep-alive or close says nothing about the client's connection.
    assert!(c.get("/after", "").text().starts_with("honest /after"));
}

/// The same over HTTP/2: a client uploading more than the app reads gets the app's
/// early answer (then its stream is reset with NO_ERROR, RFC 9113 §8.1: stop
/// sending, no error), not a 502. The client is nghttp (curl 7.88 takes that
/// reset, arriving while it still uploads, for an error).
#[test]
fn an_answer_before_the_whole_body_reaches_http2_clients() {
    let app = App::start(|method, path| {
        match path {
        "/early-413" => vec![
            send("HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!"),
            Step::Close,
        ],
        // An interim head first: relayed as one, then the answer.
        "/early-100" => vec![
            send("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!"),
            Step::Close,
        ],
        _ => honest(path, method),
    }
    });
    let w = worker_for(&app);
    let mut upload = tempfile::NamedTempFile::new().expect("temp file");
    let block = vec![b'u'; 1 << 20];
    for _ in 0..32 {
        upload.write_all(&block).expect("write");
    }
    for path in ["/early-100", "/early-413"] {
        let url = format!("http://127.0.0.1:{}{path}", w.port);
        let out = std::process::Command::new("timeout")
            .args(["30", "nghttp", "-d"])
            .arg(upload.path())
            .arg(&url)
            .output()
            .expect("nghttp must be installed (.ci/run installs it)");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{path}: nghttp: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout, "too big!", "{path}");
    }
    let conn = app.conn_of("/early-413");
    let r = Client::connect(w.addr()).get("/next", "");
    assert!(r.text().starts_with("honest /next "), "{}", r.text());
    assert_ne!(app.conn_of("/next"), conn, "connection reused");
}

/// A short successful answer an app begins while the worker waits for more of the
/// client's body (a chunked one, whose end the app cannot know) is read once the
/// body is over: the early-answer watch's peek at it leaves the socket readable.
/// Before, a peek that saw fewer bytes than its room marked the socket unreadable
/// with those bytes still in it, and the reactor's epoll being edge-triggered, no
/// edge came again for them: the request waited for its answer until
/// `upstream_head_secs`, a 504 in place of the app's 200.
#[test]
fn a_short_success_seen_by_the_watch_is_read_after_the_body() {
    let app = App::start(|method, path| match path {
        "/early-ok" => vec![
            send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
            Step::Hold,
        ],
        _ => honest(path, method),
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        extra: "[timeouts]\nupstream_head_secs = 5\n".into(),
        ..Default::default()
    });
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(
        b"POST /early-ok HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n",
    )
    .expect("head and a chunk");
    // The worker waits for the rest, watching the app, which answers meanwhile.
    std::thread::sleep(Duration::from_millis(500));
    s.write_all(b"0\r\n\r\n").expect("the last chunk");
    let (got, _) = read_to_end(&mut s);
    let got = String::from_utf8_lossy(&got).into_owned();
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
    assert!(got.ends_with("\r\n\r\nok"), "{got}");
}

/// The head of the worker's answer to `GET path` from an HTTP/2 client (curl, with
/// prior knowledge), which must read the response.
fn h2_answer_head(w: &Worker, path: &str) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--http2-prior-knowledge"])
        .args(["-o", "/dev/null", "-D", "-"])
        .arg(format!("http://127.0.0.1:{}{path}", w.port))
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

/// Whether the head `head` has a field named `name`.
fn has_field(head: &str, name: &str) -> bool {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .any(|(n, _)| n.trim().eq_ignore_ascii_case(name))
}

/// `Proxy-Authenticate`, `Proxy-Authorization` and `HTTP2-Settings` from the app
/// stay on its hop for HTTP/2 clients too (on interim heads and the final one), as
/// for HTTP/1.1 clients: one hop-by-hop rule on every path. Before, they reached
/// HTTP/2 clients.
#[test]
fn the_apps_proxy_auth_fields_stay_on_its_hop_for_http2_clients() {
    const FIELDS: &str = "Proxy-Authenticate: Basic realm=\"app\"\r\nProxy-Authorization: Basic eDp5\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nX-Kept: yes\r\n";
    let app = App::start(|method, path| {
        match path {
        "/proxy-auth" => vec![send(format!(
            "HTTP/1.1 103 Early Hints\r\n{FIELDS}\r\nHTTP/1.1 200 OK\r\n{FIELDS}Content-Length: 2\r\n\r\nok"
        ))],
        _ => honest(path, method),
    }
    });
    let w = worker_for(&app);
    let head = h2_answer_head(&w, "/proxy-auth");
    assert!(head.contains("HTTP/2 103"), "{head}");
    assert!(head.contains("HTTP/2 200"), "{head}");
    assert_eq!(head.matches("x-kept: yes").count(), 2, "{head}");
    for name in [
        "proxy-authenticate",
        "proxy-authorization",
        "http2-settings",
    ] {
        assert!(!has_field(&head, name), "{name} relayed: {head}");
    }
    let r = Client::connect(w.addr()).get("/proxy-auth", "");
    assert_eq!(r.text(), "ok");
    for name in [
        "proxy-authenticate",
        "proxy-authorization",
        "http2-settings",
    ] {
        assert_eq!(r.header(name), None, "{name} relayed: {:?}", r.headers);
    }
}

/// The app's `Clear-Site-Data` never reaches the client (HTTP/1.1 or HTTP/2): over
/// HTTPS a browser clears the cookies of the whole registrable domain, among them
/// every user's permit cookie for the other apps (`Domain=` the wildcard domain):
/// one app must not reach the others' cookies (as with `Domain` on its
/// `Set-Cookie`). Before, it was relayed.
#[test]
fn an_apps_clear_site_data_never_reaches_the_client() {
    let app = App::start(|method, path| {
        match path {
        "/clear" => vec![send(
            "HTTP/1.1 200 OK\r\nClear-Site-Data: \"cookies\", \"storage\"\r\nclear-site-data: \"*\"\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok",
        )],
        // Nor as a trailer (a client or gateway that folds trailers into the head
        // would act on it).
        "/clear-trailer" => vec![send(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nClear-Site-Data: \"cookies\"\r\nX-Kept-Trailer: yes\r\n\r\n",
        )],
        _ => honest(path, method),
    }
    });
    let w = worker_for(&app);
    let r = Client::connect(w.addr()).get("/clear", "");
    assert_eq!(r.text(), "ok");
    assert_eq!(r.header("clear-site-data"), None, "{:?}", r.headers);
    assert_eq!(r.header("x-kept"), Some("yes"), "{:?}", r.headers);
    let head = h2_answer_head(&w, "/clear");
    assert!(head.starts_with("HTTP/2 200"), "{head}");
    assert!(!has_field(&head, "clear-site-data"), "relayed: {head}");
    assert!(has_field(&head, "x-kept"), "{head}");
    let mut s = std::net::TcpStream::connect(w.addr()).expect("connect");
    s.write_all(b"GET /clear-trailer HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .expect("send");
    let answer = String::from_utf8_lossy(&common::read_until_closed(&mut s)).to_lowercase();
    assert!(
        answer.contains("\r\n0\r\nx-kept-trailer: yes\r\n"),
        "{answer}"
    );
    assert!(!answer.contains("clear-site-data"), "relayed: {answer}");
    // curl writes an HTTP/2 answer's trailers after its head.
    let fields = h2_answer_head(&w, "/clear-trailer");
    assert!(has_field(&fields, "x-kept-trailer"), "{fields}");
    assert!(!has_field(&fields, "clear-site-data"), "relayed: {fields}");
}

/// Waits (bounded) for the HEADERS of an interim answer on stream `id` of `s` (the
/// app sends nothing else: the first HEADERS on the stream, which does not end it).
fn await_interim(s: &mut TcpStream, id: u32) {
    use appproxy_test_support::h2frames::{read_frame, END_STREAM, HEADERS};
    loop {
        let f = read_frame(s).expect("an interim head before the read timeout");
        if f.0 == HEADERS && f.2 == id {
            assert_eq!(f.1 & END_STREAM, 0, "{f:?}");
            return;
        }
    }
}

/// An HTTP/2 client that resets its stream, or closes its connection, while the app
/// is silent after an interim head (`103`) frees the app connection at once, as it
/// does before the first head: the app sees its connection closed well before the
/// head timeout (`upstream_head_secs`, set long here, restarted by each interim
/// head). Before, the wait for the next head did not watch the client, and the app
/// connection was held until the timeout.
#[test]
fn an_http2_client_leaving_after_an_interim_head_frees_the_app_connection() {
    use appproxy_test_support::h2frames::{connect, frame, request, END_HEADERS, END_STREAM};
    use appproxy_test_support::h2frames::{HEADERS, RST_STREAM};
    let app = App::start(|method, path| {
        if path.starts_with("/interim") {
            vec![
                send("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"),
                Step::Hold,
            ]
        } else {
            honest(path, method)
        }
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        extra: "[timeouts]\nupstream_head_secs = 600\n".into(),
        ..Default::default()
    });
    // The stream reset (CANCEL), the connection kept open.
    let mut s = connect(w.addr());
    let open = |s: &mut TcpStream, id: u32, path: &str| {
        s.write_all(&frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            id,
            &request("GET", path, &[]),
        ))
        .expect("request");
    };
    open(&mut s, 1, "/interim-reset");
    await_interim(&mut s, 1);
    s.write_all(&frame(RST_STREAM, 0, 1, &8u32.to_be_bytes()))
        .expect("reset");
    app.wait_ended(app.conn_of("/interim-reset"));
    // The connection closed.
    open(&mut s, 3, "/interim-close");
    await_interim(&mut s, 3);
    drop(s);
    app.wait_ended(app.conn_of("/interim-close"));
}
