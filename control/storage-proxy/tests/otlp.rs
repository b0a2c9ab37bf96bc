//! OTLP export from the real storage-proxy binary to a real OTLP receiver started by
//! the test: a call and the background job it starts are a span and its child, under
//! the caller's trace.

mod storage_common;

use appproxy_test_support::http::{request, Resp};
use appproxy_test_support::otlp::Receiver;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

/// The span ID of the `traceparent` the storage-proxy echoed (in the caller's trace).
fn echoed_span(r: &Resp) -> String {
    let tp = r.header("traceparent").expect("traceparent echoed");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[1], TRACE, "{tp}");
    parts[2].to_owned()
}

#[test]
fn a_storage_proxy_call_is_a_span_of_the_callers_trace() {
    let rx = Receiver::start();
    let p = storage_common::Proxy::start_with(
        "",
        &format!(
            "[telemetry]\notlp_endpoint = \"{}\"\notlp_flush_ms = 50\n",
            rx.url()
        ),
    );
    let traceparent = format!("00-{TRACE}-{CALLER}-01");
    let body = serde_json::json!({"volume": "local", "vfid": storage_common::VFID}).to_string();
    let r = request(
        p.manager,
        "POST",
        "/folder/create",
        &[
            ("X-BackendAI-Storage-Auth-Token", storage_common::TOKEN),
            ("Content-Type", "application/json"),
            ("traceparent", &traceparent),
            ("X-Backend-Request-ID", "otlp-storage-1"),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    let span = echoed_span(&r);
    let got = rx.wait_for("of the storage call", |g| {
        g.str("request_id").as_deref() == Some("otlp-storage-1")
    });
    assert_eq!(got.service, "appproxy-storage-proxy");
    assert_eq!(got.trace_id(), TRACE);
    assert_eq!(got.parent_span_id(), CALLER);
    assert_eq!(got.span_id(), span);
    assert_eq!(got.str("http.request.method").as_deref(), Some("POST"));
    assert_eq!(got.str("url.path").as_deref(), Some("/folder/create"));
    assert_eq!(got.int("http.response.status_code"), Some(204));

    // A delete starts a background job: an internal span, child of the request's.
    let r = request(
        p.manager,
        "POST",
        "/folder/delete",
        &[
            ("X-BackendAI-Storage-Auth-Token", storage_common::TOKEN),
            ("Content-Type", "application/json"),
            ("traceparent", &traceparent),
            ("X-Backend-Request-ID", "otlp-storage-2"),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let request_span = echoed_span(&r);
    let job = rx.wait_for("of the background job", |g| {
        g.str("request_id").as_deref() == Some("otlp-storage-2") && g.span.kind == 1
    });
    assert_eq!(job.service, "appproxy-storage-proxy");
    assert_eq!(job.span.name, "background job");
    assert_eq!(job.trace_id(), TRACE);
    assert_eq!(job.parent_span_id(), request_span);
    assert_ne!(job.span_id(), request_span);
}
