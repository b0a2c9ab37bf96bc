//! A deployment the worker finds by a fetch rather than an event is traced as an
//! event's is: the coordinator keeps the trace context of the request behind each
//! circuit change with the change and returns it with the changes answer (`traces`,
//! and for a removal the removing request's ID in `removed_by`), and the worker's
//! deployment runs under that request's ID as a child of the coordinator's request
//! span.
//!
//! Real servers, no Redis (so no events at all): a coordinator, and a two-core
//! worker process that polls. The manager's traced call creates a circuit; the
//! worker finds it by its next poll (`?since=R`, the changes answer). Then a new
//! worker process takes over the same authority and finds it by its first read of
//! the whole set (the page answer). Both deployments are children of the
//! coordinator's span, in the lines every core logs, in the spans exported over OTLP
//! and in the timeline `appproxy-trace` reconstructs from the logs. Last, the
//! manager deletes the circuit by a traced call of its own (another request ID,
//! another trace): the worker finds the removal by a poll, and its deployment is
//! found by the DELETE's request ID and is a child of the coordinator's span of the
//! DELETE, in the same three places.

mod common;

use common::http;
use common::traced::{
    managers_delete, text, wait_until, WorkerProc, DELETE_MANAGER_SPAN, DELETE_TRACE, MANAGER_SPAN,
    TRACE, TRACESTATE,
};

/// Waits for the deployment of the manager's circuit on both cores, and gives
/// its lines (the agent's and every core's).
fn deployment(worker: &mut WorkerProc) -> Vec<serde_json::Value> {
    deployment_of(worker, "manager-R-1")
}

/// Waits for the deployment under request ID `request` on both cores, and gives its
/// lines (the agent's and every core's).
fn deployment_of(worker: &mut WorkerProc, request: &str) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    wait_until("the deployment on both cores", || {
        worker.assert_running();
        lines = worker
            .json()
            .into_iter()
            .filter(|v| {
                v["request_id"] == request
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

/// Every line of a deployment is under one span, a child of `parent` in the
/// manager's trace; that span.
fn child_span_of(lines: &[serde_json::Value], parent: &str, logs: &str) -> String {
    child_span_in(TRACE, lines, parent, logs)
}

/// Every line of a deployment is under one span, a child of `parent` in `trace`;
/// that span.
fn child_span_in(trace: &str, lines: &[serde_json::Value], parent: &str, logs: &str) -> String {
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
        assert_eq!(line["trace_id"], trace, "{line}");
        assert_eq!(line["span_id"], span.as_str(), "{line}");
        assert_eq!(line["parent_span_id"], parent, "{line}");
    }
    span
}

#[test]
fn a_deployment_found_by_a_fetch_is_a_child_of_the_coordinators_request_span() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The coordinator runs here; its lines go to this sink.
    let sink = common::capture_logs_as("coordinator");

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
    common::traced::managers_call(coord_addr, 1);

    // The coordinator's hop is the manager span's child.
    let created = common::traced::circuit_created(&sink);
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
    let polled = deployment(&mut worker);
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
    let read = deployment(&mut worker);
    let read_span = child_span_of(&read, &coordinator_span, &worker.logs());
    assert_ne!(read_span, poll_span, "each deployment has its own span");
    let exported = otlp.wait_for("the read deployment's span", |g| {
        g.span.name == "deployment" && g.span_id() == read_span
    });
    assert_eq!(exported.trace_id(), TRACE);
    assert_eq!(exported.parent_span_id(), coordinator_span);
    let deployed_revision = answer["revision"].as_u64().expect("a revision");

    // The manager deletes the circuit by a traced call of its own.
    let deleted = managers_delete(coord_addr, &sink, &circuit, Some(TRACESTATE));
    let delete_span = deleted["span_id"].as_str().expect("span").to_owned();

    // The changes answer names the removing request and carries its trace context.
    let (status, _, body) = http(
        coord_addr,
        &format!("GET /api/worker/{worker_id}/circuits?since={deployed_revision} HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(answer["removed"], serde_json::json!([circuit]), "{answer}");
    assert_eq!(answer["removed_by"][&circuit], "manager-D-1", "{answer}");
    assert_eq!(
        answer["traces"][&circuit],
        serde_json::json!({
            "traceparent": format!("00-{DELETE_TRACE}-{delete_span}-01"),
            "tracestate": TRACESTATE,
        }),
        "{answer}"
    );

    // The worker finds the removal by a poll: its deployment (the agent's line and
    // every core's) is under the DELETE's request ID and the coordinator hop's child.
    let removal = deployment_of(&mut worker, "manager-D-1");
    assert!(
        removal
            .iter()
            .any(|v| v["message"] == "deploying the coordinator's circuits" && v["removed"] == 1),
        "{removal:?}"
    );
    let removal_span = child_span_in(DELETE_TRACE, &removal, &delete_span, &worker.logs());
    let exported = otlp.wait_for("the removal's deployment span", |g| {
        g.span.name == "deployment" && g.span_id() == removal_span
    });
    assert_eq!(exported.trace_id(), DELETE_TRACE);
    assert_eq!(exported.parent_span_id(), delete_span);
    assert_eq!(exported.str("request_id").as_deref(), Some("manager-D-1"));
    let second_log = worker.stop();

    // appproxy-trace on the logs: one trace, both deployments under the coordinator.
    let (timeline, rendered) = common::traced::manager_timeline(&[
        (&text(&sink), "coordinator.log"),
        (&first_log, "worker-1.log"),
        (&second_log, "worker-2.log"),
    ]);
    let position = |span: &str| common::traced::hop_position(&timeline, &rendered, span);
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

    // The deletion's trace: the coordinator's hop, then the worker's removal under it.
    let logs = [
        (text(&sink), "coordinator.log"),
        (second_log.clone(), "worker-2.log"),
    ];
    let logs: Vec<(&str, &str)> = logs.iter().map(|(t, n)| (t.as_str(), *n)).collect();
    let (timeline, rendered) = common::traced::timeline_of(DELETE_TRACE, &logs);
    let position = |span: &str| common::traced::hop_position(&timeline, &rendered, span);
    let (c, d) = (position(&delete_span), position(&removal_span));
    assert_eq!(timeline.hops[c].component, "coordinator");
    assert_eq!(timeline.hops[d].component, "worker");
    assert!(c < d, "the coordinator's hop comes first:\n{rendered}");
    assert_eq!(
        timeline.hops[d].parent_span_id.as_deref(),
        Some(delete_span.as_str())
    );
    let missing: Vec<&str> = timeline
        .missing
        .iter()
        .map(|m| m.span_id.as_str())
        .collect();
    assert_eq!(missing, vec![DELETE_MANAGER_SPAN], "{rendered}");
    // By the DELETE's request ID alone, the worker's lines of the removal are found.
    let by_id = appproxy_trace::select(
        &common::traced::entries_of(&logs),
        &appproxy_trace::Query::Request("manager-D-1".into()),
    );
    let applied = by_id
        .iter()
        .filter(|e| e.component == "worker" && e.message == "deployment applied")
        .count();
    assert_eq!(applied, 2, "every core's line, found by the request ID");
    eprintln!("{rendered}");

    coordinator.stop();
}
