//! What the trace tests share: the manager's trace, a worker process started from a
//! config file (its log captured, killed on drop), the waits on what it logs, and
//! what `appproxy-trace` reads of the logs (entries, a trace's timeline).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use appproxy_test_support::serving;

use super::Sink;

/// The manager's trace.
pub const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
/// The manager's span: the parent of the coordinator's.
pub const MANAGER_SPAN: &str = "00f067aa0ba902b7";
/// The manager's `tracestate`.
pub const TRACESTATE: &str = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE";
/// The session of the manager's circuit.
pub const SESSION: &str = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
/// Its user.
pub const USER: &str = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";

/// A worker process (`appproxy-e2e-worker`), its output in `log`; killed on drop.
pub struct WorkerProc {
    child: Child,
    log: std::path::PathBuf,
}

impl WorkerProc {
    /// Starts the worker with the config at `config`, its output going to `log`.
    pub fn start(config: &std::path::Path, log: std::path::PathBuf) -> Self {
        let out = std::fs::File::create(&log).expect("log");
        let err = out.try_clone().expect("log");
        Self {
            child: Command::new(env!("CARGO_BIN_EXE_appproxy-e2e-worker"))
                .arg("--config")
                .arg(config)
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err))
                .spawn()
                .expect("start the worker"),
            log,
        }
    }

    /// Fails at once, with its log, when the process has exited.
    pub fn assert_running(&mut self) {
        serving::assert_running(&mut self.child, "worker process", &self.log, 0);
    }

    /// Everything it wrote so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its JSON lines so far.
    pub fn json(&self) -> Vec<serde_json::Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Kills the process and waits for it; gives its log.
    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.logs()
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `done`, failing after a minute (a hang guard only: generous, the
/// machine may be shared).
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the sink holds, as text.
pub fn text(sink: &Sink) -> String {
    String::from_utf8_lossy(&sink.0.lock().expect("sink")).into_owned()
}

/// The manager's call, in its own trace: `/v2/conf` for the session whose kernel
/// listens on `kernel_port`, then `/v2/proxy/auth` under request ID `manager-R-1`
/// with the manager's `traceparent` ([`TRACE`], [`MANAGER_SPAN`]) and
/// [`TRACESTATE`]. The coordinator creates the circuit.
pub fn managers_call(coord_addr: std::net::SocketAddr, kernel_port: u16) {
    let incoming = format!("00-{TRACE}-{MANAGER_SPAN}-01");
    let token = super::conf_token(coord_addr, kernel_port, SESSION, USER);
    let (status, _, body) = super::http(
        coord_addr,
        &format!("GET /v2/proxy/auth?token={token}&session_id={SESSION}&app=jupyter&protocol=http HTTP/1.1\r\nHost: c\r\nAccept: application/json\r\nX-Backend-Request-ID: manager-R-1\r\ntraceparent: {incoming}\r\ntracestate: {TRACESTATE}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 200, "{body}");
}

/// The manager's trace of its deletion of the circuit.
pub const DELETE_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
/// The manager's span of that deletion: the parent of the coordinator's.
pub const DELETE_MANAGER_SPAN: &str = "b9c7c989f97918e1";

/// The manager deletes `circuit` by a traced call of its own: request ID
/// `manager-D-1`, [`DELETE_TRACE`] with [`DELETE_MANAGER_SPAN`] as parent, and
/// `tracestate` when given. Gives the coordinator's `circuit deleted` line among what
/// `sink` holds, checked to be in that trace as the manager span's child.
pub fn managers_delete(
    coord_addr: std::net::SocketAddr,
    sink: &Sink,
    circuit: &str,
    tracestate: Option<&str>,
) -> serde_json::Value {
    let tracestate = tracestate
        .map(|t| format!("tracestate: {t}\r\n"))
        .unwrap_or_default();
    let (status, _, body) = super::http(
        coord_addr,
        &format!("DELETE /api/circuit/{circuit} HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nX-Backend-Request-ID: manager-D-1\r\ntraceparent: 00-{DELETE_TRACE}-{DELETE_MANAGER_SPAN}-01\r\n{tracestate}Connection: close\r\n\r\n"),
    );
    assert_eq!(status, 200, "{body}");
    let deleted = text(sink)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "circuit deleted" && v["request_id"] == "manager-D-1")
        .expect("the coordinator's deletion line");
    assert_eq!(deleted["trace_id"], DELETE_TRACE, "{deleted}");
    assert_eq!(deleted["parent_span_id"], DELETE_MANAGER_SPAN, "{deleted}");
    deleted
}

/// The coordinator's `circuit created` line among what `sink` holds, checked to be a
/// child of the manager's span in the manager's trace.
pub fn circuit_created(sink: &Sink) -> serde_json::Value {
    let created = text(sink)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "circuit created")
        .expect("the coordinator's creation line");
    assert_eq!(created["trace_id"], TRACE);
    assert_eq!(created["parent_span_id"], MANAGER_SPAN);
    created
}

/// The `appproxy-trace` timeline of the manager's trace across `logs` (each a log's
/// text and its file name), checked to hold that one trace, and its text rendering.
pub fn manager_timeline(logs: &[(&str, &str)]) -> (appproxy_trace::Timeline, String) {
    timeline_of(TRACE, logs)
}

/// The `appproxy-trace` timeline of `trace` across `logs` (each a log's text and its
/// file name), checked to hold that one trace, and its text rendering.
pub fn timeline_of(trace: &str, logs: &[(&str, &str)]) -> (appproxy_trace::Timeline, String) {
    let selected = appproxy_trace::select(
        &entries_of(logs),
        &appproxy_trace::Query::Trace(trace.into()),
    );
    let timeline = appproxy_trace::timeline(&selected);
    let rendered = appproxy_trace::render_text(&timeline, false);
    assert_eq!(timeline.trace_ids, vec![trace.to_owned()], "{rendered}");
    (timeline, rendered)
}

/// What `appproxy-trace` reads of `logs` (each a log's text and its file name).
pub fn entries_of(logs: &[(&str, &str)]) -> Vec<appproxy_trace::Entry> {
    let mut entries = Vec::new();
    for (text, name) in logs {
        entries.extend(appproxy_trace::parse_text(text, name));
    }
    entries
}

/// Where the hop of `span` sits in `timeline` (failing with the rendering when it is
/// not there).
pub fn hop_position(timeline: &appproxy_trace::Timeline, rendered: &str, span: &str) -> usize {
    timeline
        .hops
        .iter()
        .position(|h| h.span_id.as_deref() == Some(span))
        .unwrap_or_else(|| panic!("no hop {span}:\n{rendered}"))
}
