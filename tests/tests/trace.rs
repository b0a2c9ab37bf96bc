//! One trace across the whole path, with real servers: a manager call carrying a
//! `traceparent` reaches the coordinator, whose circuit event goes through Redis with
//! the trace in its metadata; the worker process (two cores) deploys and acknowledges
//! under a child span; then a client request of the same trace goes through the
//! worker to an app that records the `traceparent` it receives. The captured logs of
//! the coordinator and the worker, read by `appproxy-trace`, show every hop under the
//! one trace in call order, with consistent parent and child span IDs. The
//! manager's `tracestate` travels with the trace in the event's metadata and comes
//! back on the worker's acknowledgement. Last, the manager deletes the circuit by a
//! traced call of its own: the removal event's deployment (which owes no
//! acknowledgement) is under the DELETE's request ID, a child of the coordinator's
//! span of the DELETE, and exported over OTLP like the creation's.

mod common;

use appproxy_test_support::net::ReadUninterrupted;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::http;
use common::traced::{
    managers_delete, text, wait_until, WorkerProc, DELETE_TRACE, MANAGER_SPAN, SESSION, TRACE,
    TRACESTATE, USER,
};

#[test]
fn one_trace_from_the_managers_call_through_redis_and_the_worker_to_the_app() {
    let redis = common::redis::Redis::start();
    // Every message on the broadcast channel, raw, to see the events' metadata.
    let published: Arc<Mutex<Vec<u8>>> = Arc::default();
    {
        let mut sub = TcpStream::connect(("127.0.0.1", redis.port)).expect("redis");
        let cmd = format!(
            "SUBSCRIBE {}\r\n",
            appproxy_shared::model::BROADCAST_CHANNEL
        );
        sub.write_all(cmd.as_bytes()).expect("subscribe");
        let seen = published.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n @ 1..) = sub.read_uninterrupted(&mut buf) {
                seen.lock().expect("published").extend_from_slice(&buf[..n]);
            }
        });
    }
    let messages = |published: &Mutex<Vec<u8>>| -> Vec<String> {
        let all = String::from_utf8_lossy(&published.lock().expect("published")).into_owned();
        all.split("$7\r\nmessage\r\n")
            .skip(1)
            .map(str::to_owned)
            .collect()
    };
    wait_until("the subscription", || {
        String::from_utf8_lossy(&published.lock().expect("published")).contains("subscribe")
    });
    let dir = tempfile::tempdir().expect("tempdir");
    // The coordinator runs here; its lines go to this sink.
    let sink = common::capture_logs_as("coordinator");

    // The app: records the traceparent of every request.
    let app = TcpListener::bind("127.0.0.1:0").expect("app");
    let app_addr = app.local_addr().expect("addr");
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = received.clone();
    std::thread::spawn(move || {
        for mut s in app.incoming().flatten() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = vec![0u8; 8192];
            let n = s.read_uninterrupted(&mut buf).unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            for line in head.lines() {
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("traceparent") {
                        seen.lock().expect("seen").push(value.trim().to_owned());
                    }
                }
            }
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nfrom-app",
            );
        }
    });

    let coordinator = common::start_coordinator(
        &format!(
            "[coordinator]\nbind = \"127.0.0.1:0\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\nsqlite_path = \"{}\"\n[redis]\nurl = \"{}\"\n",
            dir.path().join("c.sqlite3").display(),
            redis.url()
        ),
    );
    let coord_addr = coordinator.addr;

    // The worker: its own process, tracing lines and access lines in one file; its
    // spans also go to a real OTLP receiver.
    let otlp = appproxy_test_support::otlp::Receiver::start();
    let circuit_port = common::free_port();
    let config = format!(
        "[worker]\nauthority = \"w1\"\ncores = 2\nbind_host = \"127.0.0.1\"\nhostname = \"127.0.0.1\"\napi_port = {}\nport_range = [{circuit_port}, {circuit_port}]\n[coordinator]\nurl = \"http://{coord_addr}\"\npoll_interval_ms = 60000\n[redis]\nurl = \"{}\"\n[logging]\nformat = \"json\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\npermit_secret = \"permit\"\n[telemetry]\notlp_endpoint = \"{}\"\notlp_flush_ms = 50\n",
        common::free_port(),
        redis.url(),
        otlp.url()
    );
    let path = dir.path().join("worker.toml");
    std::fs::write(&path, config).expect("config");
    let log = dir.path().join("worker.log");
    let mut worker = WorkerProc::start(&path, log);
    wait_until("the worker's subscription", || {
        worker.assert_running();
        worker.logs().contains("subscribed to circuit events")
    });
    // Its first read of the circuit set is done: that read cannot race the manager's
    // call below (a circuit it brought would be deployed without the call's trace,
    // and the event's copy then changes nothing).
    wait_until("the worker's first read of its circuit set", || {
        worker.assert_running();
        worker
            .logs()
            .contains("circuit set read from the coordinator")
    });
    wait_until("the worker's registration", || {
        worker.assert_running();
        let (_, _, body) = http(coord_addr, "GET /api/worker HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n");
        body.contains("\"authority\":\"w1\"")
    });

    // The manager's call, in its own trace.
    common::traced::managers_call(coord_addr, app_addr.port());

    // The client's request, in the same trace (the manager's workflow goes on).
    let incoming = format!("00-{TRACE}-{MANAGER_SPAN}-01");
    let circuit_addr = SocketAddr::from(([127, 0, 0, 1], circuit_port));
    wait_until("the circuit's port", || {
        worker.assert_running();
        TcpStream::connect(circuit_addr).is_ok()
    });
    let cookie = common::permit_cookie(USER);
    let (status, _, body) = http(
        circuit_addr,
        &format!("GET /lab HTTP/1.1\r\nHost: t\r\nCookie: appproxy_permit=\"{cookie}\"\r\nX-Backend-Request-ID: client-1\r\ntraceparent: {incoming}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!((status, body.as_str()), (200, "from-app"));

    // The app got the trace, with the worker's span as parent.
    let got = received.lock().expect("received").clone();
    assert_eq!(got.len(), 1, "{got:?}");
    let parts: Vec<&str> = got[0].split('-').collect();
    assert_eq!(parts.len(), 4, "{got:?}");
    assert_eq!(parts[1], TRACE);
    let worker_span = parts[2].to_owned();
    assert_ne!(worker_span, MANAGER_SPAN);

    // The worker's access line: the same span, the caller's as parent, user context.
    let mut access = serde_json::Value::Null;
    wait_until("the worker's access line", || {
        access = worker
            .json()
            .into_iter()
            .find(|v| v["target"] == "access" && v["request_id"] == "client-1")
            .unwrap_or_default();
        !access.is_null()
    });
    assert_eq!(access["trace_id"], TRACE);
    assert_eq!(access["span_id"], worker_span.as_str());
    assert_eq!(access["parent_span_id"], MANAGER_SPAN);
    assert_eq!(access["user_id"], USER);
    assert_eq!(access["session_id"], SESSION);
    assert!(access["duration_us"].is_u64());

    // The coordinator's hop is the manager span's child; the deployment (every core,
    // and the acknowledgement) is the coordinator hop's child.
    let created = common::traced::circuit_created(&sink);
    let coordinator_span = created["span_id"].as_str().expect("span").to_owned();
    let mut deployment = Vec::new();
    wait_until("the deployment lines", || {
        let lines = worker.json();
        deployment = lines
            .iter()
            .filter(|v| {
                v["trace_id"] == TRACE
                    && (v["message"] == "deployment applied"
                        || v["message"] == "deployment acknowledged")
            })
            .cloned()
            .collect();
        let cores: std::collections::BTreeSet<String> = deployment
            .iter()
            .filter(|v| v["message"] == "deployment applied")
            .map(|v| v["core"].to_string())
            .collect();
        cores.len() == 2
            && deployment
                .iter()
                .any(|v| v["message"] == "deployment acknowledged")
    });
    let deploy_span = deployment[0]["span_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no span on {deployment:?}\n{}", worker.logs()))
        .to_owned();
    for line in &deployment {
        assert_eq!(line["trace_id"], TRACE, "{line}");
        assert_eq!(line["span_id"], deploy_span.as_str(), "{line}");
        assert_eq!(line["parent_span_id"], coordinator_span.as_str(), "{line}");
        assert_eq!(line["request_id"], "manager-R-1", "{line}");
    }
    // The same hops reach the OTLP receiver: the deployment as an internal span under
    // the coordinator's, the client's request as the worker's server span.
    let exported = otlp.wait_for("the deployment span", |g| g.span.name == "deployment");
    assert_eq!(exported.trace_id(), TRACE);
    assert_eq!(exported.span_id(), deploy_span);
    assert_eq!(exported.parent_span_id(), coordinator_span);
    assert_eq!(exported.str("request_id").as_deref(), Some("manager-R-1"));
    let hop = otlp.wait_for("the request span", |g| {
        g.str("request_id").as_deref() == Some("client-1")
    });
    assert_eq!(hop.trace_id(), TRACE);
    assert_eq!(hop.span_id(), worker_span);
    assert_eq!(hop.parent_span_id(), MANAGER_SPAN);

    // The tracestate went out with the coordinator's event and came back with the
    // worker's acknowledgement.
    wait_until("the acknowledgement's tracestate", || {
        messages(&published)
            .iter()
            .any(|m| m.contains("appproxy-worker") && m.contains(TRACESTATE))
    });
    assert!(
        messages(&published)
            .iter()
            .any(|m| m.contains("appproxy-coordinator") && m.contains(TRACESTATE)),
        "{:?}",
        messages(&published)
    );

    // appproxy-trace on the two logs: one trace, the hops in call order.
    let coord_log = dir.path().join("coordinator.log");
    std::fs::write(&coord_log, text(&sink)).expect("coordinator log");
    let (timeline, rendered) = common::traced::manager_timeline(&[
        (&text(&sink), "coordinator.log"),
        (&worker.logs(), "worker.log"),
    ]);
    let position = |span: &str| common::traced::hop_position(&timeline, &rendered, span);
    let (c, d, w) = (
        position(&coordinator_span),
        position(&deploy_span),
        position(&worker_span),
    );
    assert!(c < d, "the coordinator's hop comes first:\n{rendered}");
    let hop = |i: usize| &timeline.hops[i];
    assert_eq!(hop(c).component, "coordinator");
    assert_eq!(hop(d).component, "worker");
    assert_eq!(hop(w).component, "worker");
    assert_eq!(
        hop(d).parent_span_id.as_deref(),
        Some(coordinator_span.as_str())
    );
    assert!(hop(d).depth > hop(c).depth, "{rendered}");
    assert_eq!(hop(w).parent_span_id.as_deref(), Some(MANAGER_SPAN));
    assert!(
        hop(w).measured,
        "the worker's access line gives its duration"
    );
    assert!(hop(w).start_us >= hop(c).start_us, "{rendered}");
    // Only the manager's own span (the external caller) has no line here.
    let missing: Vec<&str> = timeline
        .missing
        .iter()
        .map(|m| m.span_id.as_str())
        .collect();
    assert_eq!(missing, vec![MANAGER_SPAN], "{rendered}");
    eprintln!("{rendered}");

    // The manager deletes the circuit by a traced call of its own; the removal
    // event's deployment is that call's, in the lines and over OTLP.
    let circuit = created["circuit"]
        .as_str()
        .expect("the circuit's ID")
        .to_owned();
    let deleted = managers_delete(coord_addr, &sink, &circuit, None);
    let delete_span = deleted["span_id"].as_str().expect("span").to_owned();
    let mut removal = Vec::new();
    wait_until("the removal on both cores", || {
        worker.assert_running();
        removal = worker
            .json()
            .into_iter()
            .filter(|v| v["request_id"] == "manager-D-1" && v["message"] == "deployment applied")
            .collect();
        removal
            .iter()
            .map(|v| v["core"].to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            == 2
    });
    let removal_span = removal[0]["span_id"].as_str().expect("span").to_owned();
    for line in &removal {
        assert_eq!(line["trace_id"], DELETE_TRACE, "{line}");
        assert_eq!(line["span_id"], removal_span.as_str(), "{line}");
        assert_eq!(line["parent_span_id"], delete_span.as_str(), "{line}");
    }
    let exported = otlp.wait_for("the removal's deployment span", |g| {
        g.span.name == "deployment" && g.span_id() == removal_span
    });
    assert_eq!(exported.trace_id(), DELETE_TRACE);
    assert_eq!(exported.parent_span_id(), delete_span);
    assert_eq!(exported.str("request_id").as_deref(), Some("manager-D-1"));

    drop(worker);
    coordinator.stop();
}
