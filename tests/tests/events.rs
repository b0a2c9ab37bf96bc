//! The clustered path with real servers started here: PostgreSQL for the store and
//! Redis for events. The coordinator publishes `appproxy_circuit_created_event`; the
//! worker's agent, subscribed, fetches and deploys at once — its poll interval is a
//! minute, so a deployment within seconds can only have come through the event —
//! under the manager's request ID, and acknowledges once every core has it; the
//! coordinator answers the manager only then. The circuits row holds the manager's ID.

mod common;

#[test]
fn redis_events_and_postgresql_deploy_under_the_managers_id() {
    let redis = common::redis::Redis::start();
    let pg = common::pg::Pg::start();
    let seen = common::manager_call_to_app_request(common::Flow {
        redis_url: Some(&redis.url()),
        postgres_url: Some(&pg.url()),
        poll_ms: 60_000,
        ready_log: Some("subscribed to circuit events"),
        embedded: false,
    });
    let logs = &seen.logs;
    assert!(
        logs.lines()
            .any(|l| l.contains("circuit event received") && l.contains("manager-R-1")),
        "{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("deployment acknowledged") && l.contains("manager-R-1")),
        "{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("worker acknowledged") && l.contains("manager-R-1")),
        "{logs}"
    );
    assert_eq!(
        pg.psql("appproxy", "SELECT origin_request_id FROM circuits"),
        "manager-R-1",
        "the circuits row holds the manager's ID"
    );
}
