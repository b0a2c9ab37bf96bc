//! Manager → coordinator → control agent → every core → app, with one request ID,
//! deployments found by polling.

mod common;

#[test]
fn manager_call_to_app_request_under_one_id() {
    common::manager_call_to_app_request(None, 50, None);
}
