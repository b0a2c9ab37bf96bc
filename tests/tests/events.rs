//! The event path: with a real redis-server (started here), the coordinator publishes
//! `appproxy_circuit_created_event` and the worker's agent, subscribed, fetches and
//! deploys at once — its poll interval is a minute, so a deployment within seconds can
//! only have come through the event — under the manager's request ID.

mod common;

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

#[test]
fn redis_events_deploy_without_waiting_for_a_poll() {
    let redis_port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let redis_dir = tempfile::tempdir().expect("tempdir");
    let mut redis = std::process::Command::new("redis-server")
        .args([
            "--port",
            &redis_port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(redis_dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server must be installed (apt-get install redis-server)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", redis_port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let url = format!("redis://127.0.0.1:{redis_port}/");
    let logs = common::manager_call_to_app_request(
        Some(&url),
        60_000,
        Some("subscribed to circuit events"),
    );
    assert!(
        logs.lines().any(|l| l.contains("circuit event received")),
        "{logs}"
    );
    let _ = redis.kill();
    let _ = redis.wait();
}
