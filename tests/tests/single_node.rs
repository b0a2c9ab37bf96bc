//! Single node: the coordinator runs inside the worker process on SQLite and feeds the
//! bridge directly — no Redis, no HTTP between them, a poll interval of a minute — so
//! the manager's call returns once every core has the circuit (the in-process
//! acknowledgement), and request counts reach the coordinator without Redis.

mod common;

#[test]
fn single_node_deploys_through_the_in_process_bus() {
    let seen = common::manager_call_to_app_request(common::Flow {
        poll_ms: 60_000,
        embedded: true,
        ..Default::default()
    });
    let logs = &seen.logs;
    assert!(
        logs.lines()
            .any(|l| l.contains("worker acknowledged") && l.contains("manager-R-1")),
        "{logs}"
    );
    assert!(
        !logs.contains("circuit event received"),
        "no Redis in single-node mode"
    );
}
