//! Test harness: a real upstream app on a thread, the real worker binary in a
//! throwaway directory on free ports, and a raw-socket client.
#![allow(dead_code)]

pub mod upgrade;
pub mod ws;

use appproxy_test_support::net::ReadUninterrupted;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use appproxy_test_support::free_port;

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body_len: u64,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A test app: answers by path, records every request.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// Connections the app has closed.
    pub closed: Arc<AtomicUsize>,
    /// Released by tests that need the app to wait (SSE, drain).
    pub gate: Arc<(Mutex<bool>, std::sync::Condvar)>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, c, d, g, st) = (
            seen.clone(),
            connections.clone(),
            closed.clone(),
            gate.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                c.fetch_add(1, Ordering::Relaxed);
                let (s, d, g) = (s.clone(), d.clone(), g.clone());
                std::thread::spawn(move || {
                    // `serve_app` owns the stream: it is closed when it returns.
                    let _ = serve_app(stream, s, g);
                    d.fetch_add(1, Ordering::Relaxed);
                });
            }
        });
        Self {
            addr,
            seen,
            connections,
            closed,
            gate,
            stop,
        }
    }

    pub fn open_gate(&self) {
        let (lock, cv) = &*self.gate;
        *lock.lock().expect("gate") = true;
        cv.notify_all();
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .expect("seen")
            .last()
            .cloned()
            .expect("a request reached the app")
    }

    pub fn count(&self) -> usize {
        self.seen.lock().expect("seen").len()
    }

    /// Waits (bounded) until the app has read a request whose path starts with
    /// `prefix` (its body included: it records a request once it has read it).
    pub fn wait_seen(&self, prefix: &str) {
        eventually(&format!("a request for {prefix} reached the app"), || {
            self.seen
                .lock()
                .expect("seen")
                .iter()
                .any(|s| s.path.starts_with(prefix))
        });
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn read_line(r: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    Ok(line)
}

/// Reads a chunked body, returning the payload length.
fn read_chunked(r: &mut impl BufRead) -> std::io::Result<u64> {
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let line = read_line(r)?;
        let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| std::io::Error::other("bad chunk size"))?;
        if size == 0 {
            loop {
                let t = read_line(r)?;
                if t == "\r\n" || t.is_empty() {
                    return Ok(total);
                }
            }
        }
        let mut left = size;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = r.read_uninterrupted(&mut buf[..want])?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            left -= n as u64;
        }
        total += size;
        read_line(r)?;
    }
}

fn serve_app(
    stream: TcpStream,
    seen: Arc<Mutex<Vec<Seen>>>,
    gate: Arc<(Mutex<bool>, std::sync::Condvar)>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut w = stream;
    loop {
        let request_line = read_line(&mut reader)?;
        if request_line.is_empty() {
            return Ok(());
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let path = parts.next().unwrap_or("").to_owned();
        let mut headers = Vec::new();
        loop {
            let line = read_line(&mut reader)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((n, v)) = line.trim_end().split_once(':') {
                headers.push((n.to_owned(), v.trim().to_owned()));
            }
        }
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _): &&(String, String)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let body_len =
            if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
                read_chunked(&mut reader)?
            } else {
                let n: u64 = get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                std::io::copy(&mut (&mut reader).take(n), &mut std::io::sink())?
            };
        let record = Seen {
            method: method.clone(),
            path: path.clone(),
            headers: headers.clone(),
            body_len,
        };
        seen.lock().expect("seen").push(record.clone());
        let route = path.split('?').next().unwrap_or("");
        let query: HashMap<&str, &str> = path
            .split_once('?')
            .map(|(_, q)| q.split('&').filter_map(|kv| kv.split_once('=')).collect())
            .unwrap_or_default();
        match route {
            "/bytes" => {
                // n bytes with Content-Length, streamed in 64 KiB writes.
                let n: u64 = query.get("n").and_then(|v| v.parse().ok()).unwrap_or(0);
                write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n")?;
                let block = vec![b'x'; 64 * 1024];
                let mut left = n;
                while left > 0 {
                    let k = left.min(block.len() as u64) as usize;
                    w.write_all(&block[..k])?;
                    left -= k as u64;
                }
            }
            "/chunked" => {
                w.write_all(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n",
                )?;
                w.write_all(b"5\r\nhello\r\n")?;
                w.write_all(b"6\r\n world\r\n")?;
                w.write_all(b"0\r\nX-Checksum: 42\r\n\r\n")?;
            }
            "/sse" => {
                w.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")?;
                let ev = b"data: first\n\n";
                write!(w, "{:x}\r\n", ev.len())?;
                w.write_all(ev)?;
                w.write_all(b"\r\n")?;
                w.flush()?;
                // Wait until the test has seen the first event through the proxy.
                let (lock, cv) = &*gate;
                let mut open = lock.lock().expect("gate");
                while !*open {
                    open = cv.wait(open).expect("gate");
                }
                drop(open);
                let ev = b"data: second\n\n";
                write!(w, "{:x}\r\n", ev.len())?;
                w.write_all(ev)?;
                w.write_all(b"\r\n0\r\n\r\n")?;
            }
            "/until-close" => {
                w.write_all(
                    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of this until close",
                )?;
                return Ok(());
            }
            "/wait" => {
                let ms: u64 = query.get("ms").and_then(|v| v.parse().ok()).unwrap_or(500);
                std::thread::sleep(Duration::from_millis(ms));
                w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nwaited")?;
            }
            "/malformed" => {
                w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc")?;
                return Ok(());
            }
            "/garbage" => {
                w.write_all(b"this is not http\r\n\r\n")?;
                return Ok(());
            }
            "/close-after" => {
                // Claims keep-alive, then closes once the response is out.
                w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")?;
                w.flush()?;
                std::thread::sleep(Duration::from_millis(100));
                return Ok(());
            }
            "/status" => {
                let code: u16 = query
                    .get("code")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(200);
                if code == 204 || code == 304 {
                    write!(w, "HTTP/1.1 {code} X\r\nContent-Length: 7\r\n\r\n")?;
                } else {
                    write!(w, "HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n")?;
                }
            }
            _ => {
                // Echo: what the app received, as JSON.
                let mut body = String::from("{");
                body.push_str(&format!(
                    "\"method\":{:?},\"path\":{:?},\"body_len\":{body_len}",
                    method, path
                ));
                body.push('}');
                if method == "HEAD" {
                    write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/json\r\n\r\n", body.len())?;
                } else {
                    write!(
                        w,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/json\r\nX-Backend-Request-ID: app-should-not-win\r\n\r\n{body}",
                        body.len()
                    )?;
                }
            }
        }
        w.flush()?;
    }
}

/// The worker binary, running on a config made for the test.
pub struct Worker {
    pub child: Option<Child>,
    pub port: u16,
    /// A second free port, substituted for `{AUX_PORT}` in the config.
    pub aux_port: u16,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
}

/// Settings the tests vary.
pub struct WorkerOpts {
    pub cores: usize,
    pub upstreams: Vec<SocketAddr>,
    pub extra: String,
    pub circuit_extra: String,
    /// Lines added to the `[worker]` table.
    pub worker_extra: String,
    /// Lines added to the `[admin]` table.
    pub admin_extra: String,
    /// `[admin] bind` (default `127.0.0.1:0`).
    pub admin_bind: String,
    /// Run the worker under this descriptor limit (soft and hard, set by
    /// `prlimit(1)` before it starts).
    pub nofile: Option<u64>,
}

impl Default for WorkerOpts {
    fn default() -> Self {
        Self {
            cores: 1,
            upstreams: Vec::new(),
            extra: String::new(),
            circuit_extra: String::new(),
            worker_extra: String::new(),
            admin_extra: String::new(),
            admin_bind: "127.0.0.1:0".into(),
            nofile: None,
        }
    }
}

impl Worker {
    pub fn start(opts: WorkerOpts) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let aux_port = free_port();
        let routes: Vec<String> = opts
            .upstreams
            .iter()
            .map(|a| {
                format!(
                    "{{ session_id = \"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\", kernel_host = \"{}\", kernel_port = {}, traffic_ratio = 1.0 }}",
                    a.ip(),
                    a.port()
                )
            })
            .collect();
        let config = format!(
            r#"
[worker]
cores = {cores}
bind_host = "127.0.0.1"
port_range = [1024, 65535]
{extra_worker}

[admin]
bind = "{admin_bind}"
{admin_extra}

[logging]
format = "json"
filter = "debug"

{extra}

[[circuits]]
id = "c0a8f5d2-1111-4222-8333-444455556666"
app = "test"
port = {port}
{open_to_public}
route_info = [{routes}]
{circuit_extra}
"#,
            cores = opts.cores,
            admin_bind = opts.admin_bind,
            extra_worker = opts
                .worker_extra
                .replace("{PORT}", &port.to_string())
                .replace("{AUX_PORT}", &aux_port.to_string()),
            extra = opts.extra,
            admin_extra = opts.admin_extra,
            circuit_extra = opts.circuit_extra,
            routes = routes.join(", "),
            open_to_public = if opts.circuit_extra.contains("open_to_public") {
                ""
            } else {
                "open_to_public = true"
            },
        );
        let path = dir.path().join("worker.toml");
        std::fs::write(&path, config).expect("write config");
        let log = dir.path().join("worker.log");
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut command = match opts.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_appproxy-worker"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_appproxy-worker")),
        };
        let mut child = command
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("start worker");
        // The admin endpoint on a port the kernel picks, learned from its serving line
        // (circuit ports are the config's, so those are waited for).
        let admin = appproxy_test_support::serving::addr(
            &mut child,
            &log,
            0,
            "admin endpoint serving /health and /metrics",
            "admin",
        );
        let mut w = Self {
            child: Some(child),
            port,
            aux_port,
            admin,
            dir,
            log,
        };
        w.wait_ready();
        w
    }

    /// Waits until the admin and circuit ports accept; fails at once, with the log,
    /// when the worker exits first (a port of its config taken, say).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if TcpStream::connect(self.admin).is_ok()
                && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                appproxy_test_support::serving::assert_running(child, "worker", &self.log, 0);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("worker did not start; log:\n{}", self.log_text());
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Log lines as JSON (lines that are not JSON are skipped).
    pub fn log_json(&self) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The `status` of every log line whose message is `message`, in order.
    pub fn logged_statuses(&self, message: &str) -> Vec<serde_json::Value> {
        self.log_json()
            .into_iter()
            .filter(|v| v["message"] == message)
            .map(|v| v["status"].clone())
            .collect()
    }

    /// Waits (bounded) until the access log holds a line for `request_id`.
    pub fn wait_access_line(&self, request_id: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = self
                .log_json()
                .into_iter()
                .find(|v| v["target"] == "access" && v["request_id"] == request_id)
            {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no access line for {request_id}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn admin_get(&self, path: &str) -> Response {
        let mut c = Client::connect(self.admin);
        c.send(format!("GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n").as_bytes());
        c.response()
    }

    /// Rewrites the config file with `edit` and sends SIGHUP.
    pub fn reload(&self, edit: impl FnOnce(String) -> String) {
        let path = self.dir.path().join("worker.toml");
        let text = std::fs::read_to_string(&path).expect("config");
        std::fs::write(&path, edit(text)).expect("write config");
        self.signal("-HUP");
    }

    /// Sends the worker a signal (`kill SIG PID`: "-HUP", "-STOP", "-CONT", "-TERM").
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {sig}");
    }

    /// Waits (bounded) until `pred` holds for some log line.
    pub fn wait_log(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let hits: Vec<_> = self.log_json().into_iter().filter(|v| pred(v)).collect();
            if !hits.is_empty() {
                return hits;
            }
            assert!(
                Instant::now() < deadline,
                "no log line for {what}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // Not asserted: a worker that already exited is waited for all the same.
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        self.wait_exit()
    }

    /// Waits (bounded) for the worker to exit, after a stop signal; its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker did not exit after its stop signal"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw-socket HTTP/1.1 client (its own small parser, independent of the worker's).
pub struct Client {
    pub reader: BufReader<TcpStream>,
    pub stream: TcpStream,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Self {
        Self::over(TcpStream::connect(addr).expect("connect"))
    }

    /// A client connecting from `from` (another loopback address, say) to `addr`.
    pub fn connect_from(from: std::net::Ipv4Addr, addr: SocketAddr) -> Self {
        Self::over(appproxy_test_support::net::connect_from(from, addr).expect("connect"))
    }

    fn over(stream: TcpStream) -> Self {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        Self {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            stream,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    pub fn get(&mut self, path: &str, extra: &str) -> Response {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n").as_bytes());
        self.response()
    }

    /// Reads the head only.
    pub fn head(&mut self) -> (u16, Vec<(String, String)>) {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        assert!(line.starts_with("HTTP/1."), "not a status line: {line:?}");
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h).expect("header line");
            if h == "\r\n" || h.is_empty() {
                break;
            }
            let (n, v) = h.trim_end().split_once(':').expect("header");
            headers.push((n.to_owned(), v.trim().to_owned()));
        }
        (status, headers)
    }

    /// Reads one response to a GET (bodies framed by length, chunked or close).
    pub fn response(&mut self) -> Response {
        self.response_to("GET")
    }

    pub fn response_to(&mut self, method: &str) -> Response {
        loop {
            let (status, headers) = self.head();
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            let resp = Response {
                status,
                headers,
                body: Vec::new(),
            };
            let body = if method == "HEAD" || status == 204 || status == 304 || status == 101 {
                Vec::new()
            } else if resp.header("transfer-encoding").is_some() {
                let mut body = Vec::new();
                loop {
                    let mut size = String::new();
                    self.reader.read_line(&mut size).expect("chunk size");
                    let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                        .expect("hex");
                    if n == 0 {
                        loop {
                            let mut t = String::new();
                            self.reader.read_line(&mut t).expect("trailer");
                            if t == "\r\n" || t.is_empty() {
                                break;
                            }
                        }
                        break;
                    }
                    let mut chunk = vec![0; n + 2];
                    self.reader.read_exact(&mut chunk).expect("chunk");
                    body.extend_from_slice(&chunk[..n]);
                }
                body
            } else if let Some(n) = resp.header("content-length") {
                let mut body = vec![0; n.parse().expect("length")];
                self.reader.read_exact(&mut body).expect("body");
                body
            } else {
                let mut body = Vec::new();
                self.reader.read_to_end(&mut body).expect("body to close");
                body
            };
            return Response { body, ..resp };
        }
    }

    /// True when the server closed the connection (reads end of stream).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read_uninterrupted(&mut b), Ok(0) | Err(_))
    }
}

/// Sleeps until `when` (at once if it has passed): steps of a test timed from one
/// instant, without the drift of consecutive sleeps.
pub fn sleep_until(when: Instant) {
    std::thread::sleep(when.saturating_duration_since(Instant::now()));
}

/// Whether the server has sent something on `s` within `wait` (peeked: it stays
/// to be read), or closed it.
pub fn answered_within(s: &TcpStream, wait: Duration) -> bool {
    let until = Instant::now() + wait;
    let mut b = [0u8; 1];
    let answered = loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break false;
        }
        s.set_read_timeout(Some(left)).expect("timeout");
        match s.peek(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break false
            }
            _ => break true,
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    answered
}

/// Polls `pred` (bounded: a hang guard, not a timing assertion).
pub fn eventually(what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pred() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A counter's value on core 0, from the admin `/metrics`.
pub fn metric(w: &Worker, name: &str) -> u64 {
    metric_in(&w.admin_get("/metrics").text(), name)
}

/// A counter's value on core 0 in a `/metrics` text.
fn metric_in(text: &str, name: &str) -> u64 {
    let prefix = format!("{name}{{core=\"0\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

/// A counter's sum over every core in `/metrics`.
pub fn metric_all_cores(w: &Worker, name: &str) -> u64 {
    sum_over_cores(&w.admin_get("/metrics").text(), name)
}

fn sum_over_cores(text: &str, name: &str) -> u64 {
    let prefix = format!("{name}{{core=\"");
    let values: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse().ok())
        .collect();
    assert!(!values.is_empty(), "{name} not in /metrics:\n{text}");
    values.iter().sum()
}

/// Log lines of the worker with this message.
pub fn log_count(w: &Worker, message: &str) -> usize {
    w.log_json()
        .iter()
        .filter(|v| v["message"] == message)
        .count()
}

/// The worker's open descriptors: (count, highest number).
pub fn open_fds(pid: u32) -> (u64, u64) {
    let mut count = 0;
    let mut max = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .flatten()
    {
        if let Some(n) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) {
            count += 1;
            max = max.max(n);
        }
    }
    (count, max)
}

/// What the worker's descriptors point at (`number:target`), for failure messages.
pub fn fd_targets(pid: u32) -> String {
    let mut fds: Vec<(u64, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((n, target.display().to_string()))
        })
        .collect();
    fds.sort();
    fds.iter()
        .map(|(n, t)| format!("{n}:{t}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The worker's descriptors at rest, the count a test compares with once what it
/// did is over: the connection [`Worker::start`] made to see the circuit port accept
/// has been accepted and closed and no client connection is open (as `/metrics`
/// publishes it), and the admin connection that said so is closed too (read to its
/// end: the admin thread answers one request per connection). Counted any earlier,
/// those connections may still be open: the count is too high to catch a leaked
/// descriptor, and `appproxy_connections_active` may still count the probe. On a
/// TLS port that connection never completes a handshake: it is done once counted as
/// a failed one and none is in progress.
pub fn resting_fds(w: &Worker) -> u64 {
    eventually(
        "the worker at rest: its readiness connection accepted and closed",
        || {
            let mut s = TcpStream::connect(w.admin).expect("connect admin");
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n")
                .expect("request");
            let mut text = String::new();
            s.read_to_string(&mut text).expect("metrics to the end");
            at_rest(&text)
        },
    );
    open_fds(w.pid()).0
}

/// Waits until the worker is at rest as [`resting_fds`] says (every core counted),
/// so that the connection [`Worker::start`] made holds nothing a test counts (a
/// unit of its client address's connection limit, say).
pub fn wait_at_rest(w: &Worker) {
    eventually(
        "the worker at rest: its readiness connection accepted and closed",
        || at_rest(&w.admin_get("/metrics").text()),
    );
}

/// Whether a `/metrics` text shows the worker at rest, summed over its cores.
fn at_rest(text: &str) -> bool {
    let probed = sum_over_cores(text, "appproxy_connections_accepted_total")
        + sum_over_cores(text, "appproxy_tls_handshake_failures_total");
    probed >= 1
        && sum_over_cores(text, "appproxy_connections_active") == 0
        && sum_over_cores(text, "appproxy_tls_handshakes_in_progress") == 0
        && sum_over_cores(text, "appproxy_proxy_protocol_headers_waiting") == 0
}

/// Sets a running process's descriptor limit (soft and hard) to `limit`.
pub fn set_nofile(pid: u32, limit: u64) {
    rustix::process::prlimit(
        rustix::process::Pid::from_raw(pid as i32),
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(limit),
            maximum: Some(limit),
        },
    )
    .expect("prlimit on the worker");
}

/// Reads until the worker closes (bounded by the socket's read timeout, a hang
/// guard that fails the test: a connection left open is not "closed"); returns
/// what it sent. A reset counts as the close.
pub fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read_uninterrupted(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("connection not closed by the worker: {e}"),
        }
    }
}

/// An app whose connects never complete: a backlog of 0 with its one queued
/// connection never accepted (the kernel drops further SYNs). Both sockets are kept
/// for the test's length; the address is the app's.
pub fn never_accepting_app() -> (TcpListener, TcpStream, std::net::SocketAddr) {
    let app = TcpListener::bind("127.0.0.1:0").expect("bind");
    rustix::net::listen(&app, 0).expect("a backlog of 0");
    let addr = app.local_addr().expect("addr");
    let queued = TcpStream::connect(addr).expect("the one queued connection");
    (app, queued, addr)
}
