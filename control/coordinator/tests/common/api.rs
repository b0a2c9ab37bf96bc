//! What the coordinator's API scenarios share (`coordinator.rs`, `withdrawal.rs`):
//! the API secret and its header, the session their `/v2/conf` token is for, the
//! workers they register, the config they start the binary with, the bodies they
//! send, the set-up most of them begin with (the interactive worker and a token)
//! and the log they read. A module of its own, included (`#[path]`) only by
//! the tests that use all of it: `common/mod.rs`, the start-up every black-box
//! test shares, is also compiled by tests that call none of this, and would warn
//! of dead code there.

use std::path::Path;
use std::time::Duration;

use appproxy_test_support::http::Resp;

use crate::common::Coordinator;

/// The coordinator's API secret in these tests.
pub const SECRET: &str = "api-secret";

/// The header that carries [`SECRET`].
pub const AUTH: (&str, &str) = ("X-BackendAI-Token", SECRET);

/// The session of the `/v2/conf` token ([`conf_body`]).
pub const SESSION: &str = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";

/// An interactive port worker, `worker-1`, with four ports (10205-10208).
pub const INTERACTIVE_WORKER: &str = r#"{"authority":"worker-1","frontend_mode":"port","protocol":"http","hostname":"proxy1.test","api_port":10201,"port_range":[10205,10208],"accepted_traffics":["interactive"]}"#;

/// A wildcard worker for inference traffic, `inference-1` (`*.apps.test` on port 80).
pub const INFERENCE_WORKER: &str = r#"{"authority":"inference-1","frontend_mode":"wildcard","protocol":"http","hostname":"proxy2.test","api_port":10201,"wildcard_domain":".apps.test","wildcard_traffic_port":80,"accepted_traffics":["inference"]}"#;

/// The coordinator's config: `extra`, more `[coordinator]` keys then any further
/// tables; `database`, the `[database]` keys.
pub fn config(extra: &str, database: &str) -> String {
    format!(
        "[coordinator]\nbind = \"127.0.0.1:0\"\n{extra}\n[secrets]\napi_secret = \"{SECRET}\"\njwt_secret = \"jwt-key\"\n[database]\n{database}\n[logging]\nfilter = \"info\"\n"
    )
}

/// A `/v2/conf` body for [`SESSION`], its kernel at 10.0.1.7:30512.
pub fn conf_body() -> String {
    format!(
        r#"{{"login_session_token":null,"kernel_host":"10.0.1.7","kernel_port":30512,"session":{{"id":"{SESSION}","user_uuid":"3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b","group_id":"9a1e8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b","access_key":"AKIA","domain_name":"default"}}}}"#
    )
}

/// A `/v2/endpoints` item named `name`, with `deployment` as its `deployment_id`.
pub fn endpoint_body(name: &str, deployment: Option<&str>) -> String {
    let id = deployment
        .map(|d| format!(r#""deployment_id":"{d}","#))
        .unwrap_or_default();
    format!(
        r#"{{{id}"version":"v2","service_name":"{name}","tags":{{"session":{{"user_uuid":"3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b","project_id":"9a1e8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b","domain_name":"default"}},"endpoint":{{"id":null,"runtime_variant":"vllm","existing_url":null}}}},"open_to_public":false,"health_check":{{"enable":true,"interval":10.0,"path":"/health","max_retries":10,"max_wait_time":15.0,"expected_status_code":200,"initial_delay":60.0}}}}"#
    )
}

/// Registers [`INTERACTIVE_WORKER`] on `c`, hands its answer (200) to
/// `registered`, then takes a `/v2/conf` token for [`SESSION`] ([`conf_body`]) and
/// returns it. Each a JSON request with [`AUTH`], its answer awaited `wait` at most.
pub fn setup(c: &Coordinator, wait: Duration, registered: impl FnOnce(&Resp)) -> String {
    let send = |method: &str, path: &str, body: &str| {
        appproxy_test_support::http::request_within(
            c.addr,
            method,
            path,
            &[AUTH, ("Content-Type", "application/json")],
            body.as_bytes(),
            wait,
        )
        .expect("a response")
    };
    let r = send("PUT", "/api/worker", INTERACTIVE_WORKER);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    registered(&r);
    let r = send("POST", "/v2/conf", &conf_body());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["token"].as_str().expect("token").to_owned()
}

/// The JSON lines of the coordinator's log in `dir` (others skipped).
pub fn log_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("coordinator.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
