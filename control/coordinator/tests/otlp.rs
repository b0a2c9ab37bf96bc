//! OTLP export from the real coordinator binary to a real OTLP receiver started by
//! the test (an HTTP server decoding the protobuf): a manager call's span arrives with
//! the caller's trace, the caller's span as parent, the span the response's
//! `traceparent` names, and its attributes (request ID, method, path, status, the
//! access key of the manager's token); the access key is on the coordinator's access
//! line, the API secret on none. A hung collector blocks no request: the export queue
//! stays bounded and the drops are counted.

use std::time::{Duration, Instant};

mod common;

use appproxy_test_support::http::{request, Resp};
use appproxy_test_support::otlp as otlp_receiver;
use otlp_receiver::Receiver;

const SECRET: &str = "api-secret-value";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";
const SESSION: &str = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
const USER: &str = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
const ACCESS_KEY: &str = "AKIAOTLPTEST0001";

/// A coordinator with its own directory (removed after it).
struct Coordinator {
    running: common::Coordinator,
    dir: tempfile::TempDir,
}

impl Coordinator {
    /// The binary with SQLite and `telemetry` as its `[telemetry]` table.
    fn start(telemetry: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = format!(
            "[coordinator]\nbind = \"127.0.0.1:0\"\n[secrets]\napi_secret = \"{SECRET}\"\njwt_secret = \"jwt-key\"\n[database]\nsqlite_path = \"{}\"\n[logging]\nfilter = \"info\"\n[telemetry]\n{telemetry}\n",
            dir.path().join("c.sqlite3").display()
        );
        let running = common::start(dir.path(), &config);
        Self { running, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("coordinator.log")).unwrap_or_default()
    }

    fn call(&self, method: &str, path: &str, extra: &[(&str, &str)], body: &str) -> Resp {
        let mut headers = vec![
            ("X-BackendAI-Token", SECRET),
            ("Content-Type", "application/json"),
        ];
        headers.extend_from_slice(extra);
        request(self.running.addr, method, path, &headers, body.as_bytes())
    }

    fn metric(&self, name: &str) -> u64 {
        let r = self.call("GET", "/metrics", &[], "");
        let text = String::from_utf8_lossy(&r.body).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
    }
}

/// The span a response's `traceparent` names.
fn echoed_span(r: &Resp) -> String {
    let tp = r.header("traceparent").expect("traceparent echoed");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[1], TRACE, "{tp}");
    parts[2].to_owned()
}

#[test]
fn the_coordinators_spans_reach_the_collector_with_the_access_key() {
    let rx = Receiver::start();
    let c = Coordinator::start(&format!(
        "otlp_endpoint = \"{}\"\notlp_flush_ms = 50",
        rx.url()
    ));
    let traceparent = format!("00-{TRACE}-{CALLER}-01");
    let conf = format!(
        r#"{{"login_session_token":null,"kernel_host":"127.0.0.1","kernel_port":8080,"session":{{"id":"{SESSION}","user_uuid":"{USER}","group_id":"{USER}","access_key":"{ACCESS_KEY}","domain_name":"default"}}}}"#
    );
    let r = c.call(
        "POST",
        "/v2/conf",
        &[
            ("traceparent", &traceparent),
            ("X-Backend-Request-ID", "otlp-conf-1"),
        ],
        &conf,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let token = r.json()["token"].as_str().expect("token").to_owned();
    let conf_span = echoed_span(&r);

    let got = rx.wait_for("of the /v2/conf call", |g| {
        g.str("request_id").as_deref() == Some("otlp-conf-1")
    });
    assert_eq!(got.service, "appproxy-coordinator");
    assert_eq!(got.trace_id(), TRACE);
    assert_eq!(got.parent_span_id(), CALLER);
    assert_eq!(got.span_id(), conf_span);
    assert_eq!(got.span.kind, 2, "SERVER");
    assert_eq!(got.span.name, "POST");
    assert_eq!(got.str("http.request.method").as_deref(), Some("POST"));
    assert_eq!(got.str("url.path").as_deref(), Some("/v2/conf"));
    assert_eq!(got.int("http.response.status_code"), Some(200));
    assert_eq!(got.str("access_key").as_deref(), Some(ACCESS_KEY));
    assert!(got.span.end_time_unix_nano >= got.span.start_time_unix_nano);

    // /v2/proxy/auth finds the access key through the token, whatever the outcome
    // (no worker here, so the call itself fails).
    let r = c.call(
        "GET",
        &format!("/v2/proxy/auth?token={token}&session_id={SESSION}&app=jupyter&protocol=http"),
        &[
            ("traceparent", &traceparent),
            ("X-Backend-Request-ID", "otlp-auth-1"),
        ],
        "",
    );
    let auth_span = echoed_span(&r);
    let got = rx.wait_for("of the /v2/proxy/auth call", |g| {
        g.str("request_id").as_deref() == Some("otlp-auth-1")
    });
    assert_eq!(got.span_id(), auth_span);
    assert_eq!(got.parent_span_id(), CALLER);
    assert_eq!(
        got.int("http.response.status_code"),
        Some(i64::from(r.status))
    );
    assert_eq!(got.str("access_key").as_deref(), Some(ACCESS_KEY));

    // The same key on the access lines; the API secret on no line, no span.
    let lines: Vec<serde_json::Value> = c
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for rid in ["otlp-conf-1", "otlp-auth-1"] {
        let access = lines
            .iter()
            .find(|v| v["target"] == "access" && v["request_id"] == rid)
            .unwrap_or_else(|| panic!("no access line for {rid}:\n{}", c.log()));
        assert_eq!(access["access_key"], ACCESS_KEY, "{access}");
    }
    assert!(!c.log().contains(SECRET), "the API secret is never logged");
    for g in rx.spans() {
        for kv in &g.span.attributes {
            assert!(!format!("{:?}", kv.value).contains(SECRET), "{kv:?}");
        }
    }
    let posts = rx.posts();
    assert!(posts
        .iter()
        .all(|p| p.path == "/v1/traces" && p.content_type == "application/x-protobuf"));
    assert!(c.metric("appproxy_otlp_spans_exported_total") >= 2);
    assert_eq!(c.metric("appproxy_otlp_spans_dropped_total"), 0);
}

#[test]
fn a_hung_collector_blocks_no_request_and_drops_are_counted() {
    let hung = otlp_receiver::hung_collector();
    // A tiny queue and a collector that never answers (the exporter thread waits
    // for its first request for the whole test).
    let c = Coordinator::start(&format!(
        "otlp_endpoint = \"http://{hung}\"\notlp_queue = 4\notlp_batch = 2\notlp_flush_ms = 10\notlp_timeout_ms = 600000"
    ));
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    // Every request is answered; keep going until the queue has overflowed.
    loop {
        let r = c.call("GET", "/api/worker", &[], "");
        assert_eq!(r.status, 200);
        n += 1;
        if n >= 20 && c.metric("appproxy_otlp_spans_dropped_total") > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no drop counted after {n} requests"
        );
    }
    assert!(c.metric("appproxy_otlp_queue_spans") <= 4);
    assert_eq!(c.metric("appproxy_otlp_spans_exported_total"), 0);
}
