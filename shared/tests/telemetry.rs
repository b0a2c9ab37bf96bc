//! Log capture: every event inside a request scope carries `request_id`, also events
//! without a span; events outside carry none; both output formats.

use appproxy_shared::context::{
    inherit, inherit_child, scope, scope_traced, with_request_context, with_request_id,
};
use appproxy_shared::telemetry::{subscriber, LogFormat, LoggingConfig};
use appproxy_shared::RequestId;

/// An in-memory log sink shared with the test.
use appproxy_test_support::logs::Sink;

fn capture(format: LogFormat, body: impl FnOnce()) -> Vec<String> {
    let sink = Sink::default();
    let config = LoggingConfig {
        format,
        filter: "trace".into(),
    };
    let sub = subscriber(&config, "test", sink.clone()).expect("subscriber");
    tracing::subscriber::with_default(sub, body);
    let bytes = sink.0.lock().expect("sink").clone();
    String::from_utf8(bytes)
        .expect("utf8")
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn json_lines_carry_request_id_inside_scope_only() {
    let id: RequestId = "req-json-1".parse().expect("valid");
    let lines = capture(LogFormat::Json, || {
        tracing::info!("outside before");
        futures_lite::future::block_on(scope(Some(id), async {
            tracing::info!(answer = 42, "inside, no span");
            helper_without_span();
            let span = tracing::info_span!("work", core = 1);
            let _e = span.enter();
            tracing::warn!(flag = true, "inside a span");
        }));
        tracing::info!("outside after");
    });
    assert_eq!(lines.len(), 5, "{lines:#?}");
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert!(parsed[0].get("request_id").is_none());
    for v in &parsed {
        assert!(v.get("trace_id").is_none(), "no span is bound: {v}");
    }
    for v in &parsed[1..4] {
        assert_eq!(v["request_id"], "req-json-1", "{v}");
        assert_eq!(v["component"], "test");
    }
    assert_eq!(parsed[1]["answer"], 42);
    assert_eq!(parsed[1]["message"], "inside, no span");
    assert_eq!(parsed[2]["message"], "helper");
    assert_eq!(parsed[3]["core"], 1);
    assert_eq!(parsed[3]["flag"], true);
    assert_eq!(parsed[3]["level"], "WARN");
    assert!(parsed[4].get("request_id").is_none());
}

fn helper_without_span() {
    tracing::debug!("helper");
}

#[test]
fn logfmt_lines_carry_request_id() {
    let id: RequestId = "req-logfmt-1".parse().expect("valid");
    let lines = capture(LogFormat::Logfmt, || {
        with_request_id(Some(id), || tracing::info!(path = "/a b", "hello"));
        tracing::info!("bare");
    });
    assert_eq!(lines.len(), 2);
    assert!(
        lines[0].contains(" request_id=req-logfmt-1 "),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains(" msg=hello"), "{}", lines[0]);
    assert!(lines[0].contains(" path=\"/a b\""), "{}", lines[0]);
    assert!(!lines[1].contains("request_id="), "{}", lines[1]);
    assert!(!lines[0].contains("trace_id="), "{}", lines[0]);
}

#[test]
fn traced_lines_carry_trace_span_and_parent() {
    let id: RequestId = "req-traced-1".parse().expect("valid");
    let parent = appproxy_shared::TraceParent::parse(
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    .expect("valid");
    let span = appproxy_shared::SpanContext::start(Some(&parent), Some(&id));
    let lines = capture(LogFormat::Json, || {
        tracing::info!("outside before");
        futures_lite::future::block_on(scope_traced(Some(id), Some(span), async {
            tracing::info!(trace_id = "spoofed", "inside");
            inherit(async { tracing::info!("inherited") }).await;
            inherit_child(async { tracing::info!("child") }).await;
            scope(Some(id), async { tracing::info!("untraced scope") }).await;
        }));
        tracing::info!("outside after");
    });
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(parsed.len(), 6, "{lines:#?}");
    for v in [&parsed[0], &parsed[4], &parsed[5]] {
        assert!(v.get("trace_id").is_none(), "{v}");
        assert!(v.get("span_id").is_none(), "{v}");
    }
    for v in &parsed[1..3] {
        assert_eq!(v["request_id"], "req-traced-1");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["span_id"], span.span_id.to_string().as_str());
        assert_eq!(v["parent_span_id"], "00f067aa0ba902b7");
    }
    assert_eq!(
        lines[1].matches("trace_id").count(),
        1,
        "the bound span wins over a same-named field: {}",
        lines[1]
    );
    let child = &parsed[3];
    assert_eq!(child["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(child["parent_span_id"], span.span_id.to_string().as_str());
    assert_ne!(child["span_id"], span.span_id.to_string().as_str());
    let logfmt = capture(LogFormat::Logfmt, || {
        with_request_context(Some(id), Some(span), || tracing::info!("hello"));
    });
    let want = format!(
        " request_id=req-traced-1 trace_id=4bf92f3577b34da6a3ce929d0e0e4736 span_id={} parent_span_id=00f067aa0ba902b7 ",
        span.span_id
    );
    assert!(logfmt[0].contains(&want), "{}", logfmt[0]);
}

#[test]
fn span_request_id_field_is_used_without_context() {
    let lines = capture(LogFormat::Json, || {
        let span = tracing::info_span!("conn", request_id = "from-span");
        let _e = span.enter();
        tracing::info!("in span");
    });
    let v: serde_json::Value = serde_json::from_str(&lines[0]).expect("json");
    assert_eq!(v["request_id"], "from-span");
}

#[test]
fn bad_filter_is_a_clear_error() {
    let config = LoggingConfig {
        format: LogFormat::Json,
        filter: "info,[[[".into(),
    };
    let err = subscriber(&config, "test", Sink::default())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("invalid log filter"), "{err}");
}
