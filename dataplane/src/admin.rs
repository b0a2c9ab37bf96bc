//! The admin endpoint: `/health` (also `/livez`, `/readyz`) and Prometheus `/metrics`.
//!
//! Served by plain threads with blocking sockets: it is off the data path, answers
//! a handful of requests per scrape, and must keep answering while the cores are busy.
//! `/health` and `/livez` answer 503 naming the cores that hold waiting work without
//! turning (see [`crate::liveness`]), so an operator's health check catches a stuck
//! core; `/readyz` also answers 503 while the worker is starting or stopping (see
//! [`crate::readiness`]), so a load balancer sends it traffic only while it serves.
//! It keeps a small reserve of descriptors, so that it still answers when the process
//! is at its descriptor limit: when an accept fails with `EMFILE`/`ENFILE`, one
//! reserved descriptor is closed and the accept retried (as HAProxy and nginx do), and
//! the reserve is refilled once a descriptor is free again. Up to [`MAX_CLIENTS`]
//! clients are served at once, each on a short-lived thread of its own (once half
//! of them are taken, an address holding [`PER_ADDRESS`] gets no more), and each has
//! [`HEAD_DEADLINE`] for its whole request head and another
//! for taking its whole answer, however it spaces its bytes or reads: a trickling or
//! slow-reading client cannot hold `/health`, nor can many connections from one
//! address.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::core::SharedMetrics;
use crate::liveness::Liveness;
use appproxy_shared::fair_share::{FairShare, Slot};

/// What `/health` reports.
pub struct HealthInfo {
    /// Executor count.
    pub cores: usize,
    /// The cores' liveness.
    pub liveness: Arc<Liveness>,
    /// What the cores publish for `/circuits`.
    pub board: Arc<crate::introspect::Board>,
    /// Whether the worker should be sent new traffic (`/readyz`).
    pub readiness: Arc<crate::readiness::Readiness>,
}

/// Binds `addr` and serves on a background thread.
pub fn spawn(
    addr: SocketAddr,
    metrics: Arc<SharedMetrics>,
    info: HealthInfo,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    let mut reserve = Reserve::default();
    reserve.refill();
    let shared = Arc::new((metrics, info));
    let slots = FairShare::new(MAX_CLIENTS, PER_ADDRESS);
    std::thread::Builder::new()
        .name("appproxy-admin".into())
        .spawn(move || loop {
            slots.wait_for_one();
            match listener.accept() {
                Ok((stream, peer)) => {
                    // One address past its share is closed unserved: the slots
                    // stay for others (a health checker among them).
                    if let Ok(slot) = slots.take(peer.ip()) {
                        serve_apart(stream, &shared, slot);
                    }
                    reserve.refill();
                }
                Err(e) if crate::core::is_out_of_descriptors(&e) => {
                    if !reserve.release_one() {
                        // Nothing left to give back: wait for descriptors to free up.
                        std::thread::sleep(Duration::from_millis(20));
                        reserve.refill();
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        })?;
    Ok(local)
}

/// How many admin clients are served at once, each on a thread of its own: a few
/// silent or slow clients (each cut at its deadlines) never queue `/health` behind
/// them. Past it, the accept waits for one to end.
const MAX_CLIENTS: usize = 32;

/// Once half the slots are taken, a client address (an IPv4 address, or an IPv6
/// address's /64, as `[limits] max_connections_per_client` counts) that holds this
/// many gets no more: its further connections are closed at once, unserved. One
/// address takes at most half the slots, and it takes several more addresses to
/// take the rest and hold `/health` from everyone else.
const PER_ADDRESS: usize = 4;

/// Serves `stream` on a thread of its own, which gives `slot` back when done; on
/// the accept thread when no thread can be started (the old way: one at a time,
/// each bounded by its deadlines).
fn serve_apart(stream: TcpStream, shared: &Arc<(Arc<SharedMetrics>, HealthInfo)>, slot: Slot) {
    let shared2 = shared.clone();
    // The stream and slot move into the thread; kept here only if it cannot start.
    let held = Arc::new(std::sync::Mutex::new(Some((stream, slot))));
    let held2 = held.clone();
    let started = std::thread::Builder::new()
        .name("appproxy-admin-client".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let taken = held2.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some((stream, _slot)) = taken {
                let _ = serve_one(stream, &shared2.0, &shared2.1);
            }
        });
    if started.is_err() {
        let taken = held.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((stream, _slot)) = taken {
            let _ = serve_one(stream, &shared.0, &shared.1);
        }
    }
}

/// Descriptors held back for the admin thread (`/dev/null`, opened read-only).
#[derive(Default)]
struct Reserve {
    held: Vec<std::fs::File>,
    /// Whether the reserve was used since it was last full (for one log line).
    used: bool,
}

/// How many descriptors the reserve holds: the admin thread needs one per request;
/// the others cover a core taking a released one first.
const RESERVE: usize = 4;

impl Reserve {
    /// Tops the reserve up as far as descriptors allow.
    fn refill(&mut self) {
        while self.held.len() < RESERVE {
            match std::fs::File::open("/dev/null") {
                Ok(f) => self.held.push(f),
                Err(_) => return,
            }
        }
        if std::mem::take(&mut self.used) {
            tracing::info!("admin descriptor reserve refilled");
        }
    }

    /// Closes one reserved descriptor so that the next accept can succeed.
    fn release_one(&mut self) -> bool {
        if !self.used {
            self.used = true;
            tracing::warn!(
                "process at its descriptor limit: admin endpoint answering from its reserve"
            );
        }
        self.held.pop().is_some()
    }
}

/// How long one admin client may take to send its whole request head (and, apart,
/// to take its whole answer): it holds one of the [`MAX_CLIENTS`] slots meanwhile, so
/// a client that trickles its head, or reads the answer a few bytes at a time, holds
/// it no longer than this (twice over).
const HEAD_DEADLINE: Duration = Duration::from_secs(2);

/// Reads from `stream` until `until`: each read waits at most the time left, so a
/// peer that keeps sending a byte now and then is cut at the deadline all the same.
struct ReadUntil<'a> {
    stream: &'a TcpStream,
    until: std::time::Instant,
}

impl std::io::Read for ReadUntil<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self
            .until
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        (&mut &*self.stream).read(buf)
    }
}

fn serve_one(stream: TcpStream, metrics: &SharedMetrics, info: &HealthInfo) -> std::io::Result<()> {
    // Reads through a reference: no second descriptor for the reader.
    let mut reader = BufReader::new(ReadUntil {
        stream: &stream,
        until: std::time::Instant::now() + HEAD_DEADLINE,
    });
    let mut line = String::new();
    reader.by_ref().take(8192).read_line(&mut line)?;
    // Skip the rest of the head (bounded).
    let mut header = String::new();
    for _ in 0..100 {
        header.clear();
        if reader.by_ref().take(8192).read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("").split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", p) if crate::readiness::PROBES.contains(&p) => {
            // The watchdog's check (it kicks and counts a stalled core, as this
            // endpoint is where stalls are reported).
            let stalled = info.liveness.check();
            let ready = info.readiness.state();
            let (ok, word) = crate::readiness::verdict(path, &stalled, ready);
            let status = if ok {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (
                status,
                "application/json",
                format!(
                    "{{\"status\":\"{word}\",\"ready\":\"{}\",\"component\":\"appproxy-worker\",\"version\":\"{}\",\"cores\":{},\"circuits\":{},\"stalled_cores\":{:?}}}",
                    ready.as_str(),
                    env!("CARGO_PKG_VERSION"),
                    info.cores,
                    metrics.circuits.load(std::sync::atomic::Ordering::Relaxed),
                    stalled
                ),
            )
        }
        ("GET", "/metrics") => {
            let mut text = metrics.render();
            info.liveness.render(&mut text);
            info.board.render_health(&mut text);
            appproxy_shared::otlp::render_metrics(&mut text);
            appproxy_shared::logout::render_metrics(&mut text);
            ("200 OK", "text/plain; version=0.0.4", text)
        }
        ("GET", "/circuits") => (
            "200 OK",
            "application/json",
            info.board.circuits().to_string(),
        ),
        ("GET", "/connections") => (
            "200 OK",
            "application/json",
            crate::introspect::connections(metrics, &info.liveness).to_string(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "application/json",
            "{\"error\":\"not found\",\"code\":\"not_found\"}".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "application/json",
            "{\"error\":\"method not allowed\",\"code\":\"method_not_allowed\"}".into(),
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    write_until(&stream, &out, std::time::Instant::now() + HEAD_DEADLINE)
}

/// Writes `bytes` to `stream` by `until`: each write waits at most the time left, so
/// a client that takes the answer a few bytes at a time (a small receive window,
/// read now and then) is cut at the deadline instead of holding the thread.
fn write_until(
    mut stream: &TcpStream,
    mut bytes: &[u8],
    until: std::time::Instant,
) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "admin client did not take its answer in time",
            ));
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

use std::io::Read as _;
