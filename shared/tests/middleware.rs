//! The tower middleware: policy, echo, normalization and access logging, driven with a
//! real tower service and real `http` types.
#![cfg(feature = "tower")]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use appproxy_shared::header::IdPolicy;
use appproxy_shared::middleware::RequestIdLayer;
use appproxy_shared::telemetry::{subscriber, LogFormat, LoggingConfig};
use appproxy_shared::{current_request_id, current_span, IdVersion, RequestId, SpanContext};
use http::{Request, Response};
use http_body::Body;
use tower::{Layer, Service, ServiceExt};

use appproxy_test_support::logs::Sink;

/// What the handler saw: the context ID and the request-ID headers it received.
#[derive(Debug, Clone)]
struct Seen {
    context: Option<RequestId>,
    headers: Vec<(String, String)>,
    /// The span bound in the handler.
    span: Option<SpanContext>,
    /// The span in the request extensions.
    ext_span: Option<SpanContext>,
    /// The `traceparent`/`tracestate` headers the handler received.
    trace_headers: Vec<(String, String)>,
}

/// Runs one request through the layer; returns the response headers, what the handler
/// saw and the log lines.
fn run(policy: IdPolicy, headers: &[(&str, &str)]) -> (http::HeaderMap, Seen, Vec<String>) {
    let sink = Sink::default();
    let config = LoggingConfig {
        format: LogFormat::Json,
        filter: "debug".into(),
    };
    let sub = subscriber(&config, "test", sink.clone()).expect("subscriber");
    let seen = Arc::new(Mutex::new(None));
    let seen2 = seen.clone();
    let handler = tower::service_fn(move |req: Request<String>| {
        let seen = seen2.clone();
        async move {
            tracing::info!("handler ran");
            let headers = req
                .headers()
                .iter()
                .filter(|(n, _)| n.as_str().contains("request"))
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("?").to_owned()))
                .collect();
            let trace_headers = req
                .headers()
                .iter()
                .filter(|(n, _)| n.as_str().starts_with("trace"))
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("?").to_owned()))
                .collect();
            *seen.lock().expect("seen") = Some(Seen {
                context: current_request_id(),
                headers,
                span: current_span(),
                ext_span: req.extensions().get::<SpanContext>().copied(),
                trace_headers,
            });
            Ok::<_, Infallible>(Response::new("hello".to_owned()))
        }
    });
    let mut svc = RequestIdLayer::new(policy, IdVersion::V4).layer(handler);
    let mut builder = Request::builder()
        .method("GET")
        .uri("/v2/conf?token=secret");
    for (n, v) in headers {
        builder = builder.header(*n, *v);
    }
    let req = builder.body(String::new()).expect("request");
    // The access line is written at the body's end: read the body (as hyper would)
    // under the test's subscriber.
    let resp = tracing::subscriber::with_default(sub, || {
        futures_lite::future::block_on(async {
            svc.ready().await.expect("ready");
            let resp = svc.call(req).await.expect("infallible");
            let (parts, body) = resp.into_parts();
            let mut body = std::pin::pin!(body);
            while let Some(frame) =
                futures_lite::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await
            {
                frame.expect("infallible");
            }
            Response::from_parts(parts, ())
        })
    });
    let lines = String::from_utf8(sink.0.lock().expect("sink").clone())
        .expect("utf8")
        .lines()
        .map(str::to_owned)
        .collect();
    let seen = seen.lock().expect("seen").clone().expect("handler ran");
    (resp.headers().clone(), seen, lines)
}

fn access_line(lines: &[String]) -> serde_json::Value {
    let line = lines
        .iter()
        .find(|l| l.contains("\"target\":\"access\""))
        .expect("an access line");
    serde_json::from_str(line).expect("json")
}

#[test]
fn absent_is_generated_and_echoed() {
    let (headers, seen, lines) = run(IdPolicy::GenerateIfMissing, &[]);
    let echoed = headers
        .get("x-backend-request-id")
        .expect("echoed")
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(uuid::Uuid::parse_str(&echoed).is_ok(), "{echoed}");
    assert_eq!(seen.context.map(|i| i.to_string()), Some(echoed.clone()));
    assert_eq!(
        seen.headers,
        vec![("x-backend-request-id".to_owned(), echoed.clone())]
    );
    let access = access_line(&lines);
    assert_eq!(access["request_id"], echoed.as_str());
    assert_eq!(access["method"], "GET");
    assert_eq!(
        access["path"], "/v2/conf",
        "the query (which may hold tokens) is not logged"
    );
    assert_eq!(access["status"], 200);
    assert_eq!(access["bytes"], 5);
    assert_eq!(access["complete"], true);
    assert!(access.get("error").is_none());
    assert!(access["duration_us"].is_u64());
    assert!(access["head_us"].as_u64() <= access["duration_us"].as_u64());
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("\"target\":\"access\""))
            .count(),
        1,
        "one access line"
    );
    let handler_line = lines
        .iter()
        .find(|l| l.contains("handler ran"))
        .expect("handler log");
    assert!(handler_line.contains(&echoed));
    // No traceparent came in and the ID is a UUID: the trace ID is its bytes.
    let span = seen.span.expect("a span is bound in the handler");
    assert_eq!(seen.ext_span, Some(span));
    assert_eq!(span.trace_id.to_string(), echoed.replace('-', ""));
    assert_eq!(span.parent_span_id, None);
    assert_eq!(access["trace_id"], span.trace_id.to_string().as_str());
    assert_eq!(access["span_id"], span.span_id.to_string().as_str());
    assert!(access.get("parent_span_id").is_none());
    let handler: serde_json::Value = serde_json::from_str(handler_line).expect("json");
    assert_eq!(handler["span_id"], access["span_id"]);
    assert_eq!(
        headers["traceparent"],
        span.traceparent().as_str(),
        "the response echoes this hop's traceparent"
    );
    assert_eq!(
        seen.trace_headers,
        vec![("traceparent".to_owned(), span.traceparent().to_string())]
    );
}

#[test]
fn absent_stays_absent_with_extract_only() {
    let (headers, seen, lines) = run(IdPolicy::ExtractOnly, &[]);
    assert!(headers.get("x-backend-request-id").is_none());
    assert_eq!(seen.context, None);
    assert!(seen.headers.is_empty());
    assert!(access_line(&lines).get("request_id").is_none());
}

#[test]
fn present_is_preserved() {
    for policy in [IdPolicy::ExtractOnly, IdPolicy::GenerateIfMissing] {
        let (headers, seen, lines) = run(policy, &[("X-Backend-Request-ID", "client-id-1")]);
        assert_eq!(headers["x-backend-request-id"], "client-id-1");
        assert_eq!(
            seen.context.map(|i| i.to_string()).as_deref(),
            Some("client-id-1")
        );
        assert_eq!(access_line(&lines)["request_id"], "client-id-1");
    }
}

#[test]
fn alias_is_preserved_under_the_primary_name() {
    for alias in ["X-BackendAI-RequestID", "X-Request-ID"] {
        let (headers, seen, _) = run(IdPolicy::ExtractOnly, &[(alias, "alias-id")]);
        assert_eq!(headers["x-backend-request-id"], "alias-id");
        assert_eq!(
            seen.headers,
            vec![("x-backend-request-id".to_owned(), "alias-id".to_owned())],
            "only the primary header reaches the handler"
        );
    }
}

#[test]
fn invalid_is_replaced_and_never_logged_or_forwarded() {
    let (headers, seen, lines) = run(
        IdPolicy::GenerateIfMissing,
        &[("X-Request-ID", "bad value!")],
    );
    let echoed = headers["x-backend-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_ne!(echoed, "bad value!");
    assert!(uuid::Uuid::parse_str(&echoed).is_ok());
    assert_eq!(
        seen.headers,
        vec![("x-backend-request-id".to_owned(), echoed)]
    );
    let all = lines.join("\n");
    assert!(!all.contains("bad value!"), "{all}");
    // ExtractOnly treats invalid as absent.
    let (headers, seen, lines) = run(
        IdPolicy::ExtractOnly,
        &[("X-Backend-Request-ID", "%0d%0aInjected")],
    );
    assert!(headers.get("x-backend-request-id").is_none());
    assert!(seen.headers.is_empty());
    assert!(!lines.join("\n").contains("Injected"));
}

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn valid_traceparent_makes_a_child_span() {
    let (headers, seen, lines) = run(
        IdPolicy::GenerateIfMissing,
        &[
            ("traceparent", PARENT),
            ("tracestate", "rojo=00f067aa0ba902b7"),
            ("tracestate", " congo=t61rcWkgMzE"),
        ],
    );
    let span = seen.span.expect("span");
    assert_eq!(
        span.trace_id.to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(
        span.parent_span_id.map(|p| p.to_string()).as_deref(),
        Some("00f067aa0ba902b7")
    );
    assert_ne!(span.span_id.to_string(), "00f067aa0ba902b7");
    let access = access_line(&lines);
    assert_eq!(access["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(access["parent_span_id"], "00f067aa0ba902b7");
    assert_eq!(access["span_id"], span.span_id.to_string().as_str());
    assert!(access["duration_us"].is_u64());
    assert_eq!(headers["traceparent"], span.traceparent().as_str());
    assert_eq!(
        seen.trace_headers,
        vec![
            ("traceparent".to_owned(), span.traceparent().to_string()),
            (
                "tracestate".to_owned(),
                "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE".to_owned()
            ),
        ]
    );
}

#[test]
fn invalid_trace_headers_are_ignored_and_never_logged() {
    // Uppercase hex: invalid; the tracestate goes with it.
    let bad = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01";
    let (headers, seen, lines) = run(
        IdPolicy::GenerateIfMissing,
        &[("traceparent", bad), ("tracestate", "rojo=secretvalue")],
    );
    let span = seen.span.expect("span");
    let echoed = headers["x-backend-request-id"].to_str().expect("ascii");
    assert_eq!(span.trace_id.to_string(), echoed.replace('-', ""));
    assert_eq!(span.parent_span_id, None);
    let all = lines.join("\n");
    assert!(!all.contains("4BF92F"), "{all}");
    assert!(!all.contains("secretvalue"), "{all}");
    assert!(all.contains("invalid traceparent ignored"), "{all}");
    assert_eq!(
        seen.trace_headers,
        vec![("traceparent".to_owned(), span.traceparent().to_string())]
    );
    // A valid traceparent with an invalid tracestate: the state alone is dropped.
    let (_, seen, lines) = run(
        IdPolicy::ExtractOnly,
        &[("traceparent", PARENT), ("tracestate", "Bad Key=x")],
    );
    let span = seen.span.expect("span");
    assert_eq!(
        span.trace_id.to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(seen.trace_headers.len(), 1);
    let all = lines.join("\n");
    assert!(all.contains("invalid tracestate dropped"), "{all}");
    assert!(!all.contains("Bad Key"), "{all}");
    // Without a request ID the trace ID is random but the span is still there.
    let access = access_line(&lines);
    assert!(access.get("request_id").is_none());
    assert_eq!(access["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
}
