//! The OTLP exporter against a real receiver (an HTTP server decoding the protobuf
//! with the `opentelemetry-proto` types): spans arrive with their IDs, parent and
//! attributes under the resource's `service.name`, a refused batch is retried, and a
//! dead or hung collector never blocks the side that pushes spans: the queue stays
//! bounded and what does not fit is dropped and counted.

use appproxy_test_support::otlp as otlp_receiver;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use appproxy_shared::otlp::{Endpoint, Exporter, Inline, Kind, Settings, SpanRecord};
use appproxy_shared::trace::TraceParent;
use appproxy_shared::{RequestId, SpanContext};
use otlp_receiver::Receiver;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";
const USER: &str = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";

fn settings(url: &str, queue: usize, timeout: Duration) -> Settings {
    Settings {
        endpoint: Endpoint::parse(url).expect("endpoint"),
        service_name: "appproxy-test".into(),
        queue,
        batch: 2,
        flush: Duration::from_millis(20),
        timeout,
        retries: 2,
    }
}

fn record(i: u16) -> SpanRecord {
    let incoming = TraceParent::parse(format!("00-{TRACE}-{CALLER}-01").as_bytes()).expect("tp");
    let id = RequestId::parse(format!("req-{i}").as_bytes()).expect("id");
    let mut r = SpanRecord::new(
        SpanContext::start(Some(&incoming), Some(&id)),
        Kind::Server,
        "request",
    );
    r.ended_now(Duration::from_micros(1500));
    r.request_id = Some(id);
    r.method = Inline::new("GET");
    r.path = Inline::new("/lab");
    r.status = if i == 2 { 502 } else { 200 };
    r.user_id = Some(USER.parse().expect("uuid"));
    r.access_key = Inline::new("AKIAEXAMPLE");
    r.core = Some(i);
    r
}

fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    // A hang guard only.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn spans_reach_the_collector_with_ids_parent_and_attributes() {
    // The first request is refused (503): the batch is retried, not lost.
    let rx = Receiver::start_refusing(1);
    let exporter =
        Exporter::start(settings(&rx.url(), 64, Duration::from_secs(10))).expect("exporter");
    let records: Vec<SpanRecord> = (0..3).map(record).collect();
    // A span of a trace the caller does not sample is not exported.
    let mut unsampled = record(9);
    unsampled.span.flags = 0;
    exporter.push(&unsampled);
    for r in &records {
        exporter.push(r);
    }
    eventually("three spans exported", || {
        exporter.stats().exported.load(Ordering::Relaxed) == 3
    });
    assert!(exporter.stats().request_errors.load(Ordering::Relaxed) >= 1);
    assert_eq!(exporter.stats().dropped.load(Ordering::Relaxed), 0);
    let spans = rx.spans();
    assert_eq!(spans.len(), 3, "only the sampled spans: {spans:#?}");
    for post in rx.posts() {
        assert_eq!(post.path, "/v1/traces");
        assert_eq!(post.content_type, "application/x-protobuf");
    }
    for (i, r) in records.iter().enumerate() {
        let got = spans
            .iter()
            .find(|g| g.span_id() == r.span.span_id.hex().as_str())
            .unwrap_or_else(|| panic!("span {i} not received: {spans:#?}"));
        assert_eq!(got.service, "appproxy-test");
        assert_eq!(got.trace_id(), TRACE);
        assert_eq!(got.parent_span_id(), CALLER);
        assert_eq!(got.span.name, "GET");
        assert_eq!(got.span.kind, 2, "SERVER");
        assert_eq!(got.span.flags & 0xff, 1);
        assert!(got.span.end_time_unix_nano - got.span.start_time_unix_nano >= 1_500_000);
        assert_eq!(
            got.str("request_id").as_deref(),
            Some(format!("req-{i}").as_str())
        );
        assert_eq!(got.str("http.request.method").as_deref(), Some("GET"));
        assert_eq!(got.str("url.path").as_deref(), Some("/lab"));
        assert_eq!(
            got.int("http.response.status_code"),
            Some(i64::from(r.status))
        );
        assert_eq!(got.str("user_id").as_deref(), Some(USER));
        assert_eq!(got.str("access_key").as_deref(), Some("AKIAEXAMPLE"));
        assert_eq!(got.int("core"), Some(i as i64));
        assert_eq!(got.str("session_id"), None, "unknown fields are left out");
        // A 5xx is an error span; the others have no status.
        let code = got.span.status.as_ref().map_or(0, |s| s.code);
        assert_eq!(code, if r.status >= 500 { 2 } else { 0 });
    }
}

/// Pushes until the queue has dropped a span; every push returns at once.
fn push_until_dropped(exporter: &Exporter, capacity: usize) {
    let r = record(0);
    eventually("a span dropped", || {
        for _ in 0..1000 {
            exporter.push(&r);
            assert!(exporter.queued() <= capacity, "the queue is bounded");
        }
        exporter.stats().dropped.load(Ordering::Relaxed) > 0
    });
}

#[test]
fn a_hung_collector_blocks_nothing_and_the_queue_stays_bounded() {
    let addr = otlp_receiver::hung_collector();
    // The collector accepts and never answers; the timeout is long so the exporter
    // thread is stuck in its first request for the whole test.
    let exporter = Exporter::start(settings(
        &format!("http://{addr}"),
        8,
        Duration::from_secs(600),
    ))
    .expect("exporter");
    push_until_dropped(&exporter, 8);
    assert_eq!(exporter.stats().exported.load(Ordering::Relaxed), 0);
}

#[test]
fn a_dead_collector_blocks_nothing_and_failed_batches_are_counted() {
    let addr = otlp_receiver::dead_collector();
    let exporter = Exporter::start(settings(
        &format!("http://{addr}"),
        8,
        Duration::from_secs(5),
    ))
    .expect("exporter");
    push_until_dropped(&exporter, 8);
    eventually("a batch given up after its retries", || {
        exporter.stats().failed.load(Ordering::Relaxed) > 0
    });
    assert!(exporter.stats().request_errors.load(Ordering::Relaxed) >= 3);
}
