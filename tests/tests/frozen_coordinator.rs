//! A worker with two coordinators, one of which freezes (takes connections, never
//! answers), moves to the other and stays there. Before, the heartbeat and the read
//! of the circuit set, both hung on the frozen one, each moved the worker's pointer
//! on by one when they timed out: two moves with two coordinators put it back on
//! the frozen one, and the worker flapped between them for the whole freeze, its
//! heartbeats 10 s apart or worse (a healthy worker taken for lost). A real
//! coordinator (SQLite store, in this process) behind two relays
//! (`appproxy_test_support::relay::Relay`) — one of which freezes — and a worker
//! in this process.

mod common;

use std::time::{Duration, Instant};

use appproxy_test_support::relay::Relay;

#[test]
fn a_worker_leaves_a_frozen_coordinator_for_good() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = common::start_coordinator(&format!(
        "[coordinator]\nbind = \"127.0.0.1:0\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\nsqlite_path = \"{}\"\n",
        dir.path().join("c.sqlite3").display()
    ));
    let first = Relay::start(coordinator.addr);
    let second = Relay::start(coordinator.addr);
    let port = common::free_port();
    // Reads of the circuit set and heartbeats both come often: at the freeze, one
    // of each is likely in flight on the first coordinator.
    let worker = common::start_worker(&format!(
        "[worker]\nauthority = \"w1\"\ncores = 1\nbind_host = \"127.0.0.1\"\nhostname = \"127.0.0.1\"\napi_port = {}\nport_range = [{port}, {port}]\n[coordinator]\nurl = \"http://{},http://{}\"\npoll_interval_ms = 100\nheartbeat_secs = 1\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\npermit_secret = \"permit\"\n",
        common::free_port(),
        first.addr,
        second.addr,
    ));
    common::wait_registered(coordinator.addr, "w1");
    // Calls go to the first coordinator while it answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    while first.taken() < 10 {
        assert!(
            Instant::now() < deadline,
            "no calls to the first coordinator"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(second.taken(), 0);
    first.freeze(true);
    let at_freeze = first.taken();
    // Past the first calls' 10 s limit, and long enough for a pointer moved back
    // onto the frozen one to send it more.
    std::thread::sleep(Duration::from_secs(16));
    let after = first.taken() - at_freeze;
    assert!(
        after <= 2,
        "{after} connections to the frozen coordinator after it froze: the worker went back to it"
    );
    assert!(
        second.taken() > 3,
        "the worker did not move to the coordinator that answers"
    );
    worker.stop();
    coordinator.stop();
}
