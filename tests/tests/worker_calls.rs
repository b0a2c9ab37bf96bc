//! The worker's own calls to the coordinator (registration, the reads of its circuit
//! set, heartbeats) each go under one request ID that is on both sides: sent as
//! `X-Backend-Request-ID`, on the coordinator's access line, and on the worker's
//! lines about that call. Before, the worker made an ID up inside each call and
//! logged none of it: a failed heartbeat or fetch could not be followed from the
//! worker to the coordinator, and with the coordinator down there was no ID at all.
//! A real coordinator (SQLite store, in this process, its lines captured) and a
//! worker process managed by it (its JSON lines in a file).

mod common;

use common::traced::{text, wait_until, WorkerProc};

/// The worker's line with this message (the first), once it is written.
fn worker_line(worker: &mut WorkerProc, message: &str) -> serde_json::Value {
    let mut found = None;
    wait_until(message, || {
        worker.assert_running();
        found = worker.json().into_iter().find(|l| l["message"] == message);
        found.is_some()
    });
    found.unwrap_or_default()
}

/// The coordinator's access line for the request with this ID, once written.
fn access_line(sink: &common::Sink, id: &str) -> serde_json::Value {
    let mut found = None;
    wait_until(&format!("the coordinator's access line of {id}"), || {
        found = text(sink)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["request_id"] == id && l["message"] == "request");
        found.is_some()
    });
    found.unwrap_or_default()
}

#[test]
fn the_workers_calls_are_logged_on_both_sides_under_one_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = common::capture_logs_as("coordinator");
    let coordinator = common::start_coordinator(&format!(
        "[coordinator]\nbind = \"127.0.0.1:0\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\nsqlite_path = \"{}\"\n",
        dir.path().join("c.sqlite3").display()
    ));
    let coord = coordinator.addr;
    let port = common::free_port();
    let config = format!(
        "[worker]\nauthority = \"w1\"\ncores = 1\nbind_host = \"127.0.0.1\"\nhostname = \"127.0.0.1\"\napi_port = {}\nport_range = [{port}, {port}]\n[coordinator]\nurl = \"http://{coord}\"\npoll_interval_ms = 60000\nheartbeat_secs = 1\n[logging]\nformat = \"json\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\npermit_secret = \"permit\"\n",
        common::free_port()
    );
    let path = dir.path().join("worker.toml");
    std::fs::write(&path, config).expect("config");
    let mut worker = WorkerProc::start(&path, dir.path().join("worker.log"));

    // The registration.
    let line = worker_line(&mut worker, "registered with the coordinator");
    let id = line["request_id"]
        .as_str()
        .expect("a request ID on the line");
    let access = access_line(&sink, id);
    assert_eq!(access["method"], "PUT", "{access}");
    assert!(
        access["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("/api/worker")),
        "{access}"
    );
    // The first read of its circuit set, under another ID.
    let line = worker_line(&mut worker, "circuit set read from the coordinator");
    let read = line["request_id"]
        .as_str()
        .expect("a request ID on the line");
    assert_ne!(read, id);
    let access = access_line(&sink, read);
    assert_eq!(access["method"], "GET", "{access}");
    assert!(
        access["path"]
            .as_str()
            .is_some_and(|p| p.contains("/circuits")),
        "{access}"
    );
    // Heartbeats reach the coordinator under IDs of their own.
    let mut beats: Vec<String> = Vec::new();
    wait_until("two heartbeats at the coordinator", || {
        beats = text(&sink)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["message"] == "request" && l["method"] == "PATCH")
            .map(|l| l["request_id"].as_str().unwrap_or_default().to_owned())
            .collect();
        beats.len() >= 2
    });
    assert!(beats.iter().all(|i| !i.is_empty()), "{beats:?}");
    assert_ne!(beats[0], beats[1], "one ID per heartbeat");
    // With the coordinator gone, each failure is on a line with the ID the call
    // would have been sent under, one per heartbeat.
    coordinator.stop();
    wait_until("two failed heartbeats", || {
        worker.assert_running();
        worker
            .json()
            .iter()
            .filter(|l| l["message"] == "heartbeat failed")
            .count()
            >= 2
    });
    let failed: Vec<String> = worker
        .json()
        .iter()
        .filter(|l| l["message"] == "heartbeat failed")
        .map(|l| l["request_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(failed.iter().all(|i| !i.is_empty()), "{failed:?}");
    assert_ne!(failed[0], failed[1], "one ID per call");
}
