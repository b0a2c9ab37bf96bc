//! Manager → coordinator → control agent → every core → app, with one request ID,
//! deployments found by polling (no Redis: nothing to wait for an acknowledgement).

mod common;

#[test]
fn manager_call_to_app_request_under_one_id() {
    common::manager_call_to_app_request(common::Flow {
        poll_ms: 50,
        ..Default::default()
    });
}
