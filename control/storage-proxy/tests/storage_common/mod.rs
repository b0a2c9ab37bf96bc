//! The storage-proxy test harness shared by the storage test files: a real
//! `appproxy-storage-proxy` process on ports the kernel picks (learned from its
//! serving line) with a throwaway volume, and the manager-API calls the tests make.

#![allow(dead_code)]

use appproxy_test_support::http::{request, Resp};
use appproxy_test_support::serving;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

/// The manager API token of every test proxy.
pub const TOKEN: &str = "manager-secret";
/// The vfolder the tests use.
pub const VFID: &str = "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/5d6c8c1e9a4d4e6f8b7a1c2d3e4f5a6b";

/// A running storage-proxy and its directory (config, log, volume).
pub struct Proxy {
    pub child: Child,
    pub manager: SocketAddr,
    pub client: SocketAddr,
    pub dir: tempfile::TempDir,
    /// Environment variables the process gets (on restarts too).
    pub env: Vec<(String, String)>,
    /// A command the binary runs under (on restarts too), empty for none.
    pub prefix: Vec<String>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the proxy on the configuration in `dir`, with `env`, its output to `log`,
/// under the command `prefix` (when not empty).
fn spawn(
    dir: &std::path::Path,
    env: &[(String, String)],
    log: std::fs::File,
    prefix: &[String],
) -> Child {
    spawn_to(
        dir,
        env,
        Stdio::from(log.try_clone().expect("log")),
        Stdio::from(log),
        prefix,
    )
}

/// [`spawn`] with stdout and stderr given.
fn spawn_to(
    dir: &std::path::Path,
    env: &[(String, String)],
    stdout: Stdio,
    stderr: Stdio,
    prefix: &[String],
) -> Child {
    let bin = env!("CARGO_BIN_EXE_appproxy-storage-proxy");
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.arg("--config")
        .arg(dir.join("storage.toml"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("start storage-proxy")
}

/// Writes `dir/storage.toml`: both APIs on ports the kernel picks, one volume in
/// `dir/vol`, `extra_storage` in `[storage]`, then `extra_tables`.
fn write_config(dir: &std::path::Path, extra_storage: &str, extra_tables: &str) {
    let config = format!(
        "[storage]\nmanager_bind = \"127.0.0.1:0\"\nclient_bind = \"127.0.0.1:0\"\n{extra_storage}\n[secrets]\nmanager_token = \"{TOKEN}\"\nsession_secret = \"session-key\"\n[logging]\nfilter = \"debug\"\n[[volumes]]\nname = \"local\"\npath = \"{}\"\n{extra_tables}\n",
        dir.join("vol").display()
    );
    std::fs::write(dir.join("storage.toml"), config).expect("config");
}

impl Proxy {
    /// [`Proxy::start`] with its stdout a pipe the test holds (its stderr goes to the
    /// log): the proxy and that pipe, read up to the serving line.
    pub fn start_piped() -> (Self, std::io::BufReader<std::process::ChildStdout>) {
        let dir = tempfile::tempdir().expect("tempdir");
        write_config(dir.path(), "", "");
        let log = std::fs::File::create(dir.path().join("storage.log")).expect("log");
        let mut child = spawn_to(dir.path(), &[], Stdio::piped(), Stdio::from(log), &[]);
        let (addrs, stdout) = appproxy_test_support::stalled_stdout::serving(
            &mut child,
            "storage-proxy serving",
            &["manager", "client"],
        );
        let proxy = Self {
            child,
            manager: addrs[0],
            client: addrs[1],
            dir,
            env: Vec::new(),
            prefix: Vec::new(),
        };
        (proxy, stdout)
    }

    pub fn start(extra_storage: &str) -> Self {
        Self::start_with(extra_storage, "")
    }

    pub fn start_with(extra_storage: &str, extra_tables: &str) -> Self {
        Self::start_with_env(extra_storage, extra_tables, &[])
    }

    /// [`Proxy::start_with`], the process also getting `env`.
    pub fn start_with_env(extra_storage: &str, extra_tables: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_at(dir, extra_storage, extra_tables, env, Vec::new())
    }

    /// [`Proxy::start`] with its directory (and volume) made in `parent`: a
    /// filesystem of the test's choosing (a tmpfs, whose times go past year 9999).
    pub fn start_in(parent: &std::path::Path, extra_storage: &str) -> Self {
        let dir = tempfile::tempdir_in(parent).expect("tempdir");
        Self::start_at(dir, extra_storage, "", &[], Vec::new())
    }

    /// [`Proxy::start`], the process bound by file permissions as a service user
    /// is: run by root, it runs without `CAP_DAC_OVERRIDE` and
    /// `CAP_DAC_READ_SEARCH` (dropped from its bounding set by `setpriv`), so that
    /// a directory made unreadable (`chmod 000`) cannot be read by it either.
    pub fn start_bound_by_permissions(extra_storage: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix = if rustix::process::geteuid().is_root() {
            [
                "setpriv",
                "--bounding-set=-dac_override,-dac_read_search",
                "--",
            ]
            .map(str::to_owned)
            .to_vec()
        } else {
            Vec::new()
        };
        Self::start_at(dir, extra_storage, "", &[], prefix)
    }

    /// [`Proxy::start`] under the command `prefix` (e.g. `prlimit --nofile=…`).
    pub fn start_under(prefix: &[&str], extra_storage: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix = prefix.iter().map(|s| (*s).to_owned()).collect();
        Self::start_at(dir, extra_storage, "", &[], prefix)
    }

    fn start_at(
        dir: tempfile::TempDir,
        extra_storage: &str,
        extra_tables: &str,
        env: &[(&str, &str)],
        prefix: Vec<String>,
    ) -> Self {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        write_config(dir.path(), extra_storage, extra_tables);
        Self::serve_in(dir, env, prefix)
    }

    /// Starts the proxy on the configuration in `dir` (its log a new file there),
    /// both APIs on ports the kernel picks, learned from the serving line.
    fn serve_in(dir: tempfile::TempDir, env: Vec<(String, String)>, prefix: Vec<String>) -> Self {
        let log_path = dir.path().join("storage.log");
        let log = std::fs::File::create(&log_path).expect("log");
        let mut child = spawn(dir.path(), &env, log, &prefix);
        let addrs = serving::addrs(
            &mut child,
            &log_path,
            0,
            "storage-proxy serving",
            &["manager", "client"],
        );
        Self {
            child,
            manager: addrs[0],
            client: addrs[1],
            dir,
            env,
            prefix,
        }
    }

    /// A second process on this one's configuration and volume (ports of its own,
    /// its log in a directory of its own), as two nodes sharing one volume are.
    pub fn beside(&self) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::copy(
            self.dir.path().join("storage.toml"),
            dir.path().join("storage.toml"),
        )
        .expect("config");
        Self::serve_in(dir, self.env.clone(), self.prefix.clone())
    }

    /// Stops the proxy and starts it again on the same configuration and volume (new
    /// ports): what it kept in memory is gone, what is on disk stays.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log_path = self.dir.path().join("storage.log");
        let from = std::fs::metadata(&log_path).map_or(0, |m| m.len());
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&log_path)
            .expect("log");
        self.child = spawn(self.dir.path(), &self.env, log, &self.prefix);
        let addrs = serving::addrs(
            &mut self.child,
            &log_path,
            from,
            "storage-proxy serving",
            &["manager", "client"],
        );
        self.manager = addrs[0];
        self.client = addrs[1];
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("storage.log")).unwrap_or_default()
    }

    /// The log once it holds `text`, waited for up to 30 s (lines reach the file
    /// through a writer thread, so one written just before an answer may come
    /// after it); panics with the log when it never does.
    pub fn log_holding(&self, text: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {text:?} in the log: {log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Waits (`within` at most, else the test fails) until a background task ended
    /// in the log: `true` if it was done, `false` if it failed.
    pub fn wait_bgtask(&self, within: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        loop {
            let log = self.log_json();
            if log.iter().any(|v| v["message"] == "bgtask done") {
                return true;
            }
            if log.iter().any(|v| v["message"] == "bgtask failed") {
                return false;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no background task ended within {within:?}: {}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn log_json(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// A manager call answered within `wait` (else the test fails), for work whose
    /// time grows with the machine's load: a walk of a tree deeper than any stack.
    pub fn manager_within(
        &self,
        path: &str,
        body: serde_json::Value,
        wait: std::time::Duration,
    ) -> Resp {
        appproxy_test_support::http::request_within(
            self.manager,
            "POST",
            path,
            &[
                ("X-BackendAI-Storage-Auth-Token", TOKEN),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
            wait,
        )
        .expect("an answer within the wait")
    }

    pub fn manager(&self, path: &str, body: serde_json::Value, request_id: Option<&str>) -> Resp {
        let mut headers = vec![
            ("X-BackendAI-Storage-Auth-Token", TOKEN),
            ("Content-Type", "application/json"),
        ];
        if let Some(id) = request_id {
            headers.push(("X-Backend-Request-ID", id));
        }
        request(
            self.manager,
            "POST",
            path,
            &headers,
            body.to_string().as_bytes(),
        )
    }

    /// A manager call whose body is the bytes given, as they are: JSON no
    /// `serde_json::Value` can hold (lone surrogates), or no JSON at all.
    pub fn manager_raw(&self, path: &str, raw: &[u8]) -> Resp {
        request(
            self.manager,
            "POST",
            path,
            &[
                ("X-BackendAI-Storage-Auth-Token", TOKEN),
                ("Content-Type", "application/json"),
            ],
            raw,
        )
    }

    /// A session token from the manager API (`/folder/file/upload` or `download`).
    pub fn token(&self, path: &str, body: serde_json::Value) -> String {
        let r = self.manager(path, body, None);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()["token"].as_str().expect("token").to_owned()
    }

    pub fn vfolder_path(&self) -> std::path::PathBuf {
        self.dir
            .path()
            .join("vol/3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b/5d/6c/8c1e9a4d4e6f8b7a1c2d3e4f5a6b")
    }
}

pub fn create_folder(p: &Proxy) {
    let r = p.manager(
        "/folder/create",
        serde_json::json!({"volume": "local", "vfid": VFID}),
        None,
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
}

impl Proxy {
    /// A manager call with any method.
    pub fn manager_method(&self, method: &str, path: &str, body: serde_json::Value) -> Resp {
        request(
            self.manager,
            method,
            path,
            &[
                ("X-BackendAI-Storage-Auth-Token", TOKEN),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
    }

    /// Downloads `relpath` of the test vfolder (a fresh token each time).
    pub fn download(&self, relpath: &str, query: &str, headers: &[(&str, &str)]) -> Resp {
        let r = self.manager(
            "/folder/file/download",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": relpath}),
            None,
        );
        let Some(token) = r.json()["token"].as_str().map(str::to_owned) else {
            return r;
        };
        request(
            self.client,
            "GET",
            &format!("/download?token={token}{query}"),
            headers,
            b"",
        )
    }

    /// `GET path` on the client API, answered whole within `wait` (else the test
    /// fails: the proxy is stuck).
    pub fn client_get(&self, path: &str, wait: std::time::Duration) -> Resp {
        self.client_call("GET", path, &[], b"", wait)
    }

    /// `GET /download-archive` with `token`, answered whole within 60 s.
    pub fn download_archive(&self, token: &str) -> Resp {
        self.client_get(
            &format!("/download-archive?token={token}"),
            std::time::Duration::from_secs(60),
        )
    }

    /// A tus `PATCH` of `body` at `offset` to the session of `token`, answered within
    /// 20 s (a PATCH parked on a staging file the user swapped fails here).
    pub fn tus_patch(&self, token: &str, offset: &str, body: &[u8]) -> Resp {
        self.client_call(
            "PATCH",
            &format!("/upload?token={token}"),
            &[("Upload-Offset", offset), ("Tus-Resumable", "1.0.0")],
            body,
            std::time::Duration::from_secs(20),
        )
    }

    /// A tus `PATCH` at offset 0 announcing `length` bytes, whose body comes one
    /// byte per `every` until the answer comes (the wait for it is the pause between
    /// bytes, so no byte is sent after the server answered) or `length` bytes were
    /// sent. Returns the answer (read within 60 s) and the bytes sent.
    pub fn trickled_patch(
        &self,
        token: &str,
        length: usize,
        every: std::time::Duration,
    ) -> (Resp, usize) {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(self.client).expect("connect");
        write!(
            s,
            "PATCH /upload?token={token} HTTP/1.1\r\nHost: test\r\nUpload-Offset: 0\r\nTus-Resumable: 1.0.0\r\nContent-Length: {length}\r\n\r\n"
        )
        .expect("head");
        let mut raw = Vec::new();
        let mut sent = 0;
        s.set_read_timeout(Some(every)).expect("timeout");
        let mut buf = [0u8; 4096];
        while sent < length {
            match s.read(&mut buf) {
                Ok(n) => {
                    raw.extend_from_slice(&buf[..n]);
                    break;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("reading the answer: {e}"),
            }
            s.write_all(b"t").expect("a byte of the body");
            sent += 1;
        }
        s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .expect("timeout");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        raw.extend_from_slice(&rest);
        (appproxy_test_support::http::parse(&raw, false), sent)
    }

    /// A tus `HEAD` of the session of `token`, answered within 20 s.
    pub fn tus_head(&self, token: &str) -> Resp {
        self.client_call(
            "HEAD",
            &format!("/upload?token={token}"),
            &[("Tus-Resumable", "1.0.0")],
            b"",
            std::time::Duration::from_secs(20),
        )
    }

    fn client_call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        wait: std::time::Duration,
    ) -> Resp {
        appproxy_test_support::http::request_within(self.client, method, path, headers, body, wait)
            .unwrap_or_else(|| panic!("{method} {path}: no whole answer within {wait:?}"))
    }

    /// Uploads `data` to `relpath` of the test vfolder in one PATCH; returns the
    /// session creation's answer when it is refused, else the PATCH's.
    pub fn upload(&self, relpath: &str, data: &[u8]) -> Resp {
        let r = self.manager(
            "/folder/file/upload",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": relpath, "size": data.len()}),
            None,
        );
        if r.status != 200 {
            return r;
        }
        let token = r.json()["token"].as_str().unwrap_or_default().to_owned();
        request(
            self.client,
            "PATCH",
            &format!("/upload?token={token}"),
            &[("Upload-Offset", "0"), ("Tus-Resumable", "1.0.0")],
            data,
        )
    }
}

/// Every file under `dir` (symlinks not followed) with its content: a canary's
/// fingerprint.
pub fn snapshot(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let path = e.path();
            let rel = path
                .strip_prefix(dir)
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            match e.file_type() {
                Ok(t) if t.is_dir() => {
                    out.insert(format!("{rel}/"), Vec::new());
                    stack.push(path);
                }
                Ok(_) => {
                    out.insert(rel, std::fs::read(&path).unwrap_or_default());
                }
                Err(_) => {}
            }
        }
    }
    out
}

/// Swaps two entries atomically (`renameat2(RENAME_EXCHANGE)`) until dropped: one
/// side a real directory, the other a symlink out of the volume, so a path through
/// `a` names one or the other at any instant.
pub struct Flipper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Flipper {
    /// Starts swapping `a` and `b`.
    pub fn start(a: std::path::PathBuf, b: std::path::PathBuf) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &a,
                    rustix::fs::CWD,
                    &b,
                    rustix::fs::RenameFlags::EXCHANGE,
                )
                .is_ok()
                {
                    n += 1;
                }
                if n % 64 == 0 {
                    std::thread::yield_now();
                }
            }
            n
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns how many swaps were made.
    pub fn stop(mut self) -> u64 {
        self.halt()
    }

    fn halt(&mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Flipper {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Sends `GET path` to the client API on a connection with a small receive buffer
/// (set before it connects, so that its window stays small) and reads until the
/// answer has `until` in it (the local header of an archive's entry: its name),
/// then stops reading: the proxy's writer is soon held back by the client,
/// whatever it reads stays unsent. The connection and what came.
pub fn get_until(p: &Proxy, path: &str, until: &[u8]) -> (std::net::TcpStream, Vec<u8>) {
    use appproxy_test_support::net::ReadUninterrupted as _;
    use std::io::Write as _;
    let fd = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::STREAM,
        None,
    )
    .expect("socket");
    rustix::net::sockopt::set_socket_recv_buffer_size(&fd, 16 << 10).expect("SO_RCVBUF");
    rustix::net::connect(&fd, &p.client).expect("connect");
    let mut s = std::net::TcpStream::from(fd);
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !raw.windows(until.len()).any(|w| w == until) {
        let n = s.read_uninterrupted(&mut buf).expect("the answer's start");
        assert!(
            n > 0,
            "closed before {}: {}",
            String::from_utf8_lossy(until),
            String::from_utf8_lossy(&raw[..raw.len().min(300)])
        );
        raw.extend_from_slice(&buf[..n]);
    }
    (s, raw)
}

/// The proxy's offset in its open descriptor of `path` (an archive's writer reading
/// it), once it has one: `None` if it does not open it within a minute.
pub fn proxy_offset(p: &Proxy, path: &std::path::Path) -> Option<u64> {
    let pid = p.child.id();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        for e in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
            if std::fs::read_link(e.path()).ok().as_deref() != Some(path) {
                continue;
            }
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            if let Some(pos) = info
                .lines()
                .find_map(|l| l.strip_prefix("pos:"))
                .and_then(|v| v.trim().parse().ok())
            {
                return Some(pos);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    None
}

/// Runs a Python script on `path` (Python's `zipfile` is the independent reader of
/// the archives the proxy writes): its standard output, or its error output when it
/// failed.
pub fn python(script: &str, path: &std::path::Path) -> Result<String, String> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .output()
        .expect("python3");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `len` bytes that do not compress (a xorshift stream): an archive stores them,
/// never deflates them.
pub fn incompressible(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
