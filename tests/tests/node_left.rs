//! A worker whose node the coordinator counts as left while it runs (a
//! deregistration of its previous process, answered after this one registered)
//! registers again at its next heartbeat, refused `409 node-left`, and is `ALIVE`
//! again: before, it stayed `LOST` until restarted, every heartbeat refused. A real
//! coordinator (SQLite store) and a worker with its control agent, in this process.

mod common;

use std::time::{Duration, Instant};

use common::{http, start_coordinator, start_worker};

/// The one worker's ID and status, as `GET /api/worker` lists it.
fn worker_state(coord: std::net::SocketAddr) -> (String, String) {
    let (status, _, body) = http(
        coord,
        "GET /api/worker HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let w = &v["workers"][0];
    (
        w["id"].as_str().unwrap_or_default().to_owned(),
        w["status"].as_str().unwrap_or_default().to_owned(),
    )
}

fn wait_status(coord: std::net::SocketAddr, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (id, status) = worker_state(coord);
        if status == want {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "the worker is {status:?}, never {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_worker_counted_as_left_while_it_runs_registers_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = start_coordinator(&format!(
        "[coordinator]\nbind = \"127.0.0.1:0\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\nsqlite_path = \"{}\"\n",
        dir.path().join("c.sqlite3").display()
    ));
    let coord = coordinator.addr;
    let port = common::free_port();
    let text = format!(
        "[worker]\nauthority = \"w1\"\ncores = 1\nbind_host = \"127.0.0.1\"\nhostname = \"127.0.0.1\"\napi_port = {}\nport_range = [{port}, {port}]\n[coordinator]\nurl = \"http://{coord}\"\nheartbeat_secs = 1\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\npermit_secret = \"permit\"\n",
        common::free_port()
    );
    let node = appproxy_dataplane::agent::node_id(
        &appproxy_dataplane::config::Config::parse(&text).expect("config"),
    );
    let worker = start_worker(&text);
    let id = wait_status(coord, "ALIVE");
    // The late deregistration of this node.
    let (status, _, body) = http(
        coord,
        &format!("DELETE /api/worker/{id}?node={node} HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n"),
    );
    assert!((200..300).contains(&status), "{status} {body}");
    assert_eq!(worker_state(coord).1, "LOST");
    assert_eq!(wait_status(coord, "ALIVE"), id, "the same worker");
    worker.stop();
    coordinator.stop();
}
