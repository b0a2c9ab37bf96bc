//! A single node restarted with a narrower `port_range` withdraws, as it registers
//! again, the circuits stored on ports it no longer listens on, as a remote worker's
//! registration does. Its own test binary: the node's coordinator logs as the one
//! `single_node.rs` waits for would.

mod common;

/// A node restarted with a narrower `port_range` withdraws, as it registers again,
/// the circuits stored on ports it no longer listens on, as a remote worker's
/// registration does: they would otherwise stay in its set, pointing at nothing,
/// until a reuse or idle collection found them. The store (SQLite) is kept across
/// the restart.
#[test]
fn a_node_restarted_on_other_ports_withdraws_the_circuits_it_no_longer_serves() {
    use std::time::{Duration, Instant};
    const SESSION: &str = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
    let dir = tempfile::tempdir().expect("tempdir");
    let start = |port: u16| common::start_node(&dir.path().join("c.sqlite3"), port, "");
    let circuit_status = |coord, circuit: &str| {
        common::http(coord, &format!("GET /api/circuit/{circuit} HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n")).0
    };
    let ask = |coord| {
        let token = common::conf_token(coord, 9, SESSION, SESSION);
        let (status, _, body) = common::http(coord, &format!("GET /v2/proxy/auth?token={token}&session_id={SESSION}&app=jupyter&protocol=http HTTP/1.1\r\nHost: c\r\nAccept: application/json\r\nConnection: close\r\n\r\n"));
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        let url = v["redirect_url"].as_str().expect("url");
        let setup = url.split("token=").nth(1).expect("token");
        let circuit = appproxy_shared::jwt::verify_hs256(setup.as_bytes(), "jwt").expect("jwt")
            ["circuit"]
            .as_str()
            .expect("id")
            .to_owned();
        (circuit, v["reuse"] == true)
    };

    let (worker, agent, coord) = start(common::free_port());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !common::http(coord, "GET /api/worker HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n").2.contains("\"w1\"") {
        assert!(Instant::now() < deadline, "the node did not register");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (first, reused) = ask(coord);
    assert!(!reused);
    assert_eq!(ask(coord), (first.clone(), true), "served: reused");
    agent.stop();
    worker.stop();

    // Back on another port, the same store.
    let (worker, agent, coord) = start(common::free_port());
    let deadline = Instant::now() + Duration::from_secs(20);
    while circuit_status(coord, &first) != 404 {
        assert!(
            Instant::now() < deadline,
            "the circuit on a port the node no longer listens on is left stored"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (replacement, reused) = ask(coord);
    assert!(!reused && replacement != first);
    agent.stop();
    worker.stop();
}
