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
    // One process, two components: the coordinator's lines name it (the trace tool
    // shows its hop apart from the worker's), the worker's keep the process's name.
    let component_of = |message: &str| -> Vec<String> {
        logs.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"] == message && v["request_id"] == "manager-R-1")
            .map(|v| v["component"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let created = component_of("circuit created");
    assert!(
        !created.is_empty() && created.iter().all(|c| c == "coordinator"),
        "{created:?}\n{logs}"
    );
    let applied = component_of("deployment applied");
    assert!(
        !applied.is_empty() && applied.iter().all(|c| c == "e2e"),
        "{applied:?}\n{logs}"
    );
    let manager_call = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| {
            v["target"] == "access"
                && v["request_id"] == "manager-R-1"
                && v["path"] == "/v2/proxy/auth"
        })
        .unwrap_or_else(|| panic!("no access line for the manager's call:\n{logs}"));
    assert_eq!(manager_call["component"], "coordinator", "{manager_call}");
}
