//! A deployment the worker finds by a fetch rather than an event is traced as an
//! event's is: the coordinator keeps the trace context of the request behind each
//! circuit change with the change and returns it with the changes answer (`traces`),
//! and the worker's deployment is a child of the coordinator's request span.
//!
//! Real servers, no Redis (so no events at all): a coordinator, and a two-core
//! worker process that polls. The manager's traced call creates a circuit; the
//! worker finds it by its next poll (`?since=R`, the changes answer). Then a new
//! worker process takes over the same authority and finds it by its first read of
//! the whole set (the page answer). Both deployments are children of the
//! coordinator's span, in the lines every core logs, in the spans exported over OTLP
//! and in the timeline `appproxy-trace` reconstructs from the logs.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use appproxy_test_support::serving;
use common::{http, Sink};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const MANAGER_SPAN: &str = "00f067aa0ba902b7";
const SESSION: &str = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
const USER: &str = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
const TRACESTATE: &str = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE";

/// A worker process; killed on drop.
struct WorkerProc {
    child: Child,
    log: std::path::PathBuf,
}

impl WorkerProc {
    fn start(config: &std::path::Path, log: std::path::PathBuf) -> Self {
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
    fn assert_running(&mut self) {
        serving::assert_running(&mut self.child, "worker process", &self.log, 0);
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn json(&self) -> Vec<serde_json::Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for the deployment of the manager's circuit on both cores, and gives
    /// its lines (the agent's and every core's).
    fn deployment(&mut self) -> Vec<serde_json::Value> {
        let mut lines = Vec::new();
        wait_until("the deployment on both cores", || {
            self.assert_running();
            lines = self
                .json()
                .into_iter()
                .filter(|v| {
                    v["request_id"] == "manager-R-1"
                        && (v["message"] == "deployment applied"
                            || v["message"] == "deploying the coordinator's circuits")
                })
                .collect();
            let cores: std::collections::BTreeSet<String> = lines
                .iter()
                .filter(|v| v["message"] == "deployment applied")
                .map(|v| v["core"].to_string())
                .collect();
            cores.len() == 2
        });
        lines
    }

    /// Kills the process and waits for it.
    fn stop(mut self) -> String {
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

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    // A hang guard only: generous, the machine may be shared.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn text(sink: &Sink) -> String {
    String::from_utf8_lossy(&sink.0.lock().expect("sink")).into_owned()
}

/// Every line of a deployment is under one span, a child of `parent` in the
/// manager's trace; that span.
fn child_span_of(lines: &[serde_json::Value], parent: &str, logs: &str) -> String {
    assert!(
        lines
            .iter()
            .any(|v| v["message"] == "deploying the coordinator's circuits"),
        "{lines:?}"
    );
    let span = lines[0]["span_id"]
        .as_str()
        .unwrap_or_else(|| panic!("a deployment without a span: {lines:?}\n{logs}"))
        .to_owned();
    for line in lines {
        assert_eq!(line["trace_id"], TRACE, "{line}");
        assert_eq!(line["span_id"], span.as_str(), "{line}");
        assert_eq!(line["parent_span_id"], parent, "{line}");
    }
    span
}

#[test]
fn a_deployment_found_by_a_fetch_is_a_child_of_the_coordinators_request_span() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The coordinator runs here; its lines go to this sink.
    let sink = Sink::default();
    let sub = appproxy_shared::telemetry::subscriber(
        &appproxy_shared::telemetry::LoggingConfig {
            format: appproxy_shared::telemetry::LogFormat::Json,
            filter: "info".into(),
        },
        "coordinator",
        sink.clone(),
    )
    .expect("subscriber");
    tracing::subscriber::set_global_default(sub).expect("global subscriber");

    // No Redis: no event reaches the worker, only its fetches do.
    let coordinator = common::start_coordinator(&format!(
        "[coordinator]\nbind = \"127.0.0.1:0\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\nsqlite_path = \"{}\"\n",
        dir.path().join("c.sqlite3").display(),
    ));
    let coord_addr = coordinator.addr;
    // The workers' spans also go to a real OTLP receiver.
    let otlp = appproxy_test_support::otlp::Receiver::start();
    let circuit_port = common::free_port();
    let config = format!(
        "[worker]\nauthority = \"w1\"\ncores = 2\nbind_host = \"127.0.0.1\"\nhostname = \"127.0.0.1\"\napi_port = {}\nport_range = [{circuit_port}, {circuit_port}]\n[coordinator]\nurl = \"http://{coord_addr}\"\npoll_interval_ms = 100\n[logging]\nformat = \"json\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\npermit_secret = \"permit\"\n[telemetry]\notlp_endpoint = \"{}\"\notlp_flush_ms = 50\n",
        common::free_port(),
        otlp.url(),
    );
    let config_path = dir.path().join("worker.toml");
    std::fs::write(&config_path, config).expect("config");
    let mut worker = WorkerProc::start(&config_path, dir.path().join("worker-1.log"));
    // Its first read of the whole set is done (empty): the circuit below comes with
    // a poll asking what changed since.
    wait_until("the worker's first read of its circuit set", || {
        worker.assert_running();
        worker
            .logs()
            .contains("circuit set read from the coordinator")
    });
    let workers = |addr| {
        let (_, _, body) = http(addr, "GET /api/worker HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n");
        serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default()
    };
    let worker_id = workers(coord_addr)["workers"][0]["id"]
        .as_str()
        .expect("the worker is registered")
        .to_owned();

    // The manager's call, in its own trace.
    let incoming = format!("00-{TRACE}-{MANAGER_SPAN}-01");
    let conf = format!(
        r#"{{"login_session_token":null,"kernel_host":"127.0.0.1","kernel_port":1,"session":{{"id":"{SESSION}","user_uuid":"{USER}","group_id":"{USER}","access_key":"AK","domain_name":"default"}}}}"#,
    );
    let (status, _, body) = http(
        coord_addr,
        &format!("POST /v2/conf HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{conf}", conf.len()),
    );
    assert_eq!(status, 200, "{body}");
    let token = serde_json::from_str::<serde_json::Value>(&body).expect("json")["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let (status, _, body) = http(
        coord_addr,
        &format!("GET /v2/proxy/auth?token={token}&session_id={SESSION}&app=jupyter&protocol=http HTTP/1.1\r\nHost: c\r\nAccept: application/json\r\nX-Backend-Request-ID: manager-R-1\r\ntraceparent: {incoming}\r\ntracestate: {TRACESTATE}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 200, "{body}");

    // The coordinator's hop is the manager span's child.
    let coord_lines: Vec<serde_json::Value> = text(&sink)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let created = coord_lines
        .iter()
        .find(|v| v["message"] == "circuit created")
        .expect("the coordinator's creation line");
    assert_eq!(created["trace_id"], TRACE);
    assert_eq!(created["parent_span_id"], MANAGER_SPAN);
    let coordinator_span = created["span_id"].as_str().expect("span").to_owned();
    let circuit = created["circuit"].as_str().expect("circuit").to_owned();

    // The changes answer carries the request's trace context beside its ID.
    let (status, _, body) = http(
        coord_addr,
        &format!("GET /api/worker/{worker_id}/circuits?since=0 HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(answer["origins"][&circuit], "manager-R-1", "{answer}");
    assert_eq!(
        answer["traces"][&circuit],
        serde_json::json!({
            "traceparent": format!("00-{TRACE}-{coordinator_span}-01"),
            "tracestate": TRACESTATE,
        }),
        "{answer}"
    );

    // The worker found it by a poll: its deployment (the agent's line and every
    // core's) is the coordinator hop's child, as an event's would be.
    let polled = worker.deployment();
    let poll_span = child_span_of(&polled, &coordinator_span, &worker.logs());
    // Exported too, once every core applied it (a poll owes no acknowledgement).
    let exported = otlp.wait_for("the polled deployment's span", |g| {
        g.span.name == "deployment" && g.span_id() == poll_span
    });
    assert_eq!(exported.trace_id(), TRACE);
    assert_eq!(exported.parent_span_id(), coordinator_span);
    assert_eq!(exported.str("request_id").as_deref(), Some("manager-R-1"));
    let first_log = worker.stop();

    // A new process for the same authority finds it by its first read of the whole
    // set (the page answer): again the coordinator hop's child.
    let mut worker = WorkerProc::start(&config_path, dir.path().join("worker-2.log"));
    let read = worker.deployment();
    let read_span = child_span_of(&read, &coordinator_span, &worker.logs());
    assert_ne!(read_span, poll_span, "each deployment has its own span");
    let exported = otlp.wait_for("the read deployment's span", |g| {
        g.span.name == "deployment" && g.span_id() == read_span
    });
    assert_eq!(exported.trace_id(), TRACE);
    assert_eq!(exported.parent_span_id(), coordinator_span);
    let second_log = worker.stop();

    // appproxy-trace on the logs: one trace, both deployments under the coordinator.
    let mut entries = appproxy_trace::parse_text(&text(&sink), "coordinator.log");
    entries.extend(appproxy_trace::parse_text(&first_log, "worker-1.log"));
    entries.extend(appproxy_trace::parse_text(&second_log, "worker-2.log"));
    let selected = appproxy_trace::select(&entries, &appproxy_trace::Query::Trace(TRACE.into()));
    let timeline = appproxy_trace::timeline(&selected);
    let rendered = appproxy_trace::render_text(&timeline, false);
    assert_eq!(timeline.trace_ids, vec![TRACE.to_owned()], "{rendered}");
    let position = |span: &str| {
        timeline
            .hops
            .iter()
            .position(|h| h.span_id.as_deref() == Some(span))
            .unwrap_or_else(|| panic!("no hop {span}:\n{rendered}"))
    };
    let c = position(&coordinator_span);
    assert_eq!(timeline.hops[c].component, "coordinator");
    for span in [&poll_span, &read_span] {
        let d = position(span);
        let hop = &timeline.hops[d];
        assert!(c < d, "the coordinator's hop comes first:\n{rendered}");
        assert_eq!(hop.component, "worker");
        assert_eq!(
            hop.parent_span_id.as_deref(),
            Some(coordinator_span.as_str())
        );
        assert!(hop.depth > timeline.hops[c].depth, "{rendered}");
    }
    let missing: Vec<&str> = timeline
        .missing
        .iter()
        .map(|m| m.span_id.as_str())
        .collect();
    assert_eq!(missing, vec![MANAGER_SPAN], "{rendered}");
    eprintln!("{rendered}");

    coordinator.stop();
}
