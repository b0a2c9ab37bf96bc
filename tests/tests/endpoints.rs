//! An inference endpoint end to end, with a real Redis: the manager creates the
//! endpoint, registers a route to the model server, and a client with the endpoint's
//! API token reaches it through the worker; the routes change (unregister, replace)
//! and the worker follows each `appproxy_circuit_route_updated_event` without a poll.

mod common;

use appproxy_test_support::net::ReadUninterrupted;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::{http, start_coordinator, start_worker};

/// A model server answering `name` to every request.
fn model_server(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = s.read_uninterrupted(&mut buf);
            let _ = s.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
                    name.len()
                )
                .as_bytes(),
            );
        }
    });
    addr
}

fn post(coord: SocketAddr, path: &str, body: &str) -> serde_json::Value {
    let (status, _, text) = http(coord, &format!("POST {path} HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nX-Backend-Request-ID: mgr-inference\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()));
    assert_eq!(status, 200, "{path}: {text}");
    serde_json::from_str(&text).expect("json")
}

/// Waits until a request with `auth` answers `want` (status, body).
fn until(addr: SocketAddr, auth: &str, want: (u16, &str)) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, body) = http(addr, &format!("POST /v1/completions HTTP/1.1\r\nHost: m\r\n{auth}Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"));
        if status == want.0 && (want.1.is_empty() || body == want.1) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "wanted {want:?}, got {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn inference_endpoint_follows_route_updates() {
    let sink = common::capture_logs();
    let redis = common::redis::Redis::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = start_coordinator(
        &format!(
            "[coordinator]\nbind = \"127.0.0.1:0\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\nsqlite_path = \"{}\"\n[redis]\nurl = \"{}\"\n",
            dir.path().join("c.sqlite3").display(),
            redis.url()
        ),
    );
    let coord = coordinator.addr;
    let port = common::free_port();
    let worker = start_worker(&format!(
        "[worker]\nauthority = \"w1\"\ncores = 2\nbind_host = \"127.0.0.1\"\nhostname = \"127.0.0.1\"\napi_port = {}\nport_range = [{port}, {port}]\n[coordinator]\nurl = \"http://{coord}\"\npoll_interval_ms = 60000\n[redis]\nurl = \"{}\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\npermit_secret = \"permit\"\n",
        common::free_port(),
        redis.url()
    ));
    common::wait_registered(coord, "w1");
    // The agent listens for circuit events before any is sent.
    common::wait_log(&sink, "subscribed to circuit events");

    let e = "e7c08c1e-9a4d-4e6f-8b7a-1c2d3e4f5a61";
    let created = post(
        coord,
        &format!("/v2/endpoints/{e}"),
        r#"{"service_name":"llama","tags":{"session":{"user_uuid":"3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b","project_id":"9a1e8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b","domain_name":"default"},"endpoint":{"runtime_variant":"vllm","existing_url":null}},"health_check":null}"#,
    );
    assert_eq!(created["endpoint"], format!("http://127.0.0.1:{port}"));
    let frontend = SocketAddr::from(([127, 0, 0, 1], port));
    let token = post(
        coord,
        &format!("/v2/endpoints/{e}/token"),
        r#"{"user_uuid":"3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b","exp":4070908800}"#,
    )["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let bearer = format!("Authorization: Bearer {token}\r\n");
    // No route yet: the endpoint answers, but has nowhere to send the request.
    until(frontend, &bearer, (502, ""));
    until(frontend, "", (401, ""));

    let (a, b) = (model_server("model-a"), model_server("model-b"));
    let route = |id: &str, addr: SocketAddr| {
        format!(
            r#"{{"session_id":"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b","route_id":"{id}","kernel_host":"127.0.0.1","kernel_port":{}}}"#,
            addr.port()
        )
    };
    let (ra, rb) = (
        "0b9e8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a61",
        "0b9e8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a62",
    );
    post(
        coord,
        "/v2/endpoints/bulk/routes/register",
        &format!(
            r#"{{"endpoints":[{{"deployment_id":"{e}","routes":[{}]}}]}}"#,
            route(ra, a)
        ),
    );
    until(frontend, &bearer, (200, "model-a"));
    post(
        coord,
        "/v2/endpoints/bulk/routes",
        &format!(
            r#"{{"endpoints":[{{"deployment_id":"{e}","routes":[{}]}}]}}"#,
            route(rb, b)
        ),
    );
    until(frontend, &bearer, (200, "model-b"));
    post(
        coord,
        "/v2/endpoints/bulk/routes/unregister",
        &format!(r#"{{"endpoints":[{{"deployment_id":"{e}","route_ids":["{rb}"]}}]}}"#),
    );
    until(frontend, &bearer, (502, ""));
    worker.stop();
    coordinator.stop();
}
