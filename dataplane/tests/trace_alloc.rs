//! The worker's per-request trace work allocates nothing: resolving the hop from the
//! client's `traceparent`, formatting the one sent to the app, encoding the upstream
//! head with it (into a buffer with room), binding the span and formatting the IDs for
//! the access line, and handing the finished hop to the OTLP exporter's queue —
//! counted by a global allocator in this test binary.

// SAFETY: a global allocator takes `unsafe`; this one only delegates to the system
// allocator (each call's contract is restated where it is made) and counts.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use appproxy_dataplane::http::encode::{upstream_request_traced, ClientHop, TraceHeaders};
use appproxy_dataplane::http::parse::{parse_request, HeadLimits};
use appproxy_dataplane::trace::Hop;
use appproxy_shared::RequestId;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: delegates to the system allocator; only counts calls on this thread.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: as for `realloc` on the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCS.with(Cell::get)
}

#[test]
fn trace_work_per_request_does_not_allocate() {
    let requests: [&[u8]; 3] = [
        b"GET /small HTTP/1.1\r\nHost: a\r\nX-Backend-Request-ID: 4bf92f35-77b3-4da6-a3ce-929d0e0e4736\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\ntracestate: rojo=1\r\n\r\n",
        b"GET /small HTTP/1.1\r\nHost: a\r\ntraceparent: 00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01\r\n\r\n",
        b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n",
    ];
    let id = RequestId::parse(b"4bf92f35-77b3-4da6-a3ce-929d0e0e4736").expect("id");
    let hop = ClientHop::new("10.1.2.3:5555".parse().expect("addr"), 8080, false);
    let app = "10.9.9.9:8888".parse().expect("addr");
    let mut out = Vec::with_capacity(4096);
    let mut line = String::with_capacity(4096);
    // Warm the per-thread random generator and the tracing callsites first.
    let _ = Hop::resolve(requests[0], &[], &id);
    for raw in requests {
        let head = parse_request(raw, &HeadLimits::default())
            .expect("valid")
            .expect("complete");
        let before = allocations();
        let t = Hop::resolve(raw, &head.headers, &id);
        let tp = t.span.traceparent();
        out.clear();
        upstream_request_traced(
            &mut out,
            raw,
            &head,
            Some(&id),
            Some(TraceHeaders {
                traceparent: tp.as_bytes(),
                keep_tracestate: t.keep_tracestate,
            }),
            &hop,
            app,
        );
        appproxy_shared::with_request_context(Some(id), Some(t.span), || {
            use std::fmt::Write as _;
            let span = appproxy_shared::current_span().expect("bound");
            line.clear();
            let _ = write!(
                line,
                "{}{}",
                span.trace_id.hex().as_str(),
                span.span_id.hex().as_str()
            );
            if let Some(p) = span.parent_span_id {
                line.push_str(p.hex().as_str());
            }
        });
        assert_eq!(
            allocations() - before,
            0,
            "allocations for {:?}",
            String::from_utf8_lossy(raw)
        );
        let sent = String::from_utf8_lossy(&out);
        assert!(sent.contains(tp.as_str()), "{sent}");
    }
}

#[test]
fn handing_a_finished_hop_to_the_otlp_exporter_does_not_allocate() {
    // A collector address where nothing listens: the exporter thread fails and
    // retries on its own thread; this thread only fills queue slots (and, once the
    // small queue is full, counts drops).
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let config = appproxy_shared::telemetry::TelemetryConfig {
        otlp_endpoint: Some(format!("http://{dead}")),
        otlp_queue: 8,
        ..Default::default()
    };
    assert!(appproxy_shared::otlp::install(&config, "worker").expect("install"));
    let raw = b"GET /small?q=1 HTTP/1.1\r\nHost: a\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n";
    let head = parse_request(raw, &HeadLimits::default())
        .expect("valid")
        .expect("complete");
    let id = RequestId::parse(b"4bf92f35-77b3-4da6-a3ce-929d0e0e4736").expect("id");
    let hop = Hop::resolve(raw, &head.headers, &id);
    let entry = appproxy_dataplane::core::AccessEntry {
        request_id: &id,
        circuit: None,
        client: Some([127, 0, 0, 1].into()),
        method: b"GET",
        path: b"/small?q=1",
        status: 200,
        bytes_in: 0,
        bytes_out: 0,
        upstream: None,
        started: std::time::Instant::now(),
    };
    let push = || {
        appproxy_shared::with_request_context(Some(id), Some(hop.span), || {
            appproxy_dataplane::trace::export(&entry, std::time::Duration::from_micros(300), 0);
        });
    };
    // Warm up (the clock, the thread-locals), then count: with room in the queue
    // and when it is full alike.
    push();
    for _ in 0..64 {
        let before = allocations();
        push();
        assert_eq!(allocations() - before, 0, "allocations per exported hop");
    }
}

#[test]
fn an_access_line_does_not_allocate() {
    use appproxy_dataplane::core::{AccessEntry, AccessLog};
    use appproxy_shared::telemetry::LogFormat;
    let circuit: appproxy_shared::model::Circuit = serde_json::from_value(serde_json::json!({
        "id": "c0a8f5d2-1111-4222-8333-444455556666",
        "user_id": "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b",
        "session_ids": ["4bf92f35-77b3-4da6-a3ce-929d0e0e4736"],
        "endpoint_id": "0af76519-16cd-43dd-8448-eb211c80319c",
    }))
    .expect("circuit");
    let id = RequestId::parse(b"4bf92f35-77b3-4da6-a3ce-929d0e0e4736").expect("id");
    let raw = b"GET /small HTTP/1.1\r\nHost: a\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n";
    let head = parse_request(raw, &HeadLimits::default())
        .expect("valid")
        .expect("complete");
    let span = Hop::resolve(raw, &head.headers, &id).span;
    for format in [LogFormat::Json, LogFormat::Logfmt] {
        let log = AccessLog::new(format, true, 3);
        for upstream in ["10.9.9.9:8888", "[fe80::1%2]:8888"] {
            let entry = AccessEntry {
                request_id: &id,
                circuit: Some(&circuit),
                client: Some(upstream.parse::<std::net::SocketAddr>().expect("addr").ip()),
                method: b"GET",
                path: b"/small?token=x",
                status: 200,
                bytes_in: 87,
                bytes_out: 154,
                upstream: Some(upstream.parse().expect("addr")),
                started: std::time::Instant::now(),
            };
            appproxy_shared::with_request_context(Some(id), Some(span), || {
                // The first line of a second formats the second's text once.
                log.record(&entry, std::time::Duration::from_micros(250));
                let before = allocations();
                for _ in 0..10 {
                    log.record(&entry, std::time::Duration::from_micros(250));
                }
                assert_eq!(allocations() - before, 0, "{format:?}, upstream {upstream}");
            });
        }
    }
}
