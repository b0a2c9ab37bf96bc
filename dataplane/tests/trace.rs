//! The worker's hop of a W3C trace: the span it takes from the client's `traceparent`
//! (or from a UUID request ID), the `traceparent` it sends the app, the trace fields
//! and user context on its access line, and the switch that turns it off.

mod common;

use appproxy_test_support::net::Uninterrupted;
use common::{Client, Upstream, Worker, WorkerOpts};

const USER: &str = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
const SESSION: &str = "7e0f6a55-2b1c-4d3e-8f9a-0b1c2d3e4f5a";
const ENDPOINT: &str = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d";
const INCOMING: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn worker(up: &Upstream, worker_extra: &str) -> Worker {
    Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra: worker_extra.into(),
        circuit_extra: format!(
            "user_id = \"{USER}\"\nsession_ids = [\"{SESSION}\"]\nendpoint_id = \"{ENDPOINT}\""
        ),
        ..Default::default()
    })
}

/// The parts of a `traceparent` the app received: (trace, parent span, flags).
fn parts(tp: &str) -> (String, String, String) {
    let p: Vec<&str> = tp.split('-').collect();
    assert_eq!(p.len(), 4, "{tp}");
    assert_eq!(p[0], "00", "{tp}");
    (p[1].into(), p[2].into(), p[3].into())
}

#[test]
fn a_valid_traceparent_is_continued_with_the_workers_span() {
    let up = Upstream::start();
    let w = worker(&up, "");
    let mut c = Client::connect(w.addr());
    let r = c.get(
        "/t",
        &format!(
            "X-Backend-Request-ID: traced-1\r\ntraceparent: {INCOMING}\r\ntracestate: rojo=00f067aa0ba902b7\r\ntracestate: congo=t61rcWkgMzE\r\n"
        ),
    );
    assert_eq!(r.status, 200);
    let seen = up.last();
    let sent = seen.headers_named("traceparent");
    assert_eq!(sent.len(), 1, "one traceparent reaches the app: {sent:?}");
    let (trace, parent, flags) = parts(sent[0]);
    assert_eq!(trace, "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(flags, "01");
    assert_ne!(
        parent, "b7ad6b7169203331",
        "the worker's own span is the parent"
    );
    assert_eq!(
        seen.headers_named("tracestate"),
        vec!["rojo=00f067aa0ba902b7", "congo=t61rcWkgMzE"],
        "tracestate goes on unchanged"
    );
    let access = w.wait_access_line("traced-1");
    assert_eq!(access["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(access["span_id"], parent.as_str());
    assert_eq!(access["parent_span_id"], "b7ad6b7169203331");
    assert!(access["duration_us"].is_u64());
    assert_eq!(access["user_id"], USER);
    assert_eq!(access["session_id"], SESSION);
    assert_eq!(access["endpoint_id"], ENDPOINT);
}

#[test]
fn without_a_traceparent_a_uuid_request_id_names_the_trace() {
    let up = Upstream::start();
    let w = worker(&up, "");
    let mut c = Client::connect(w.addr());
    let rid = "4bf92f35-77b3-4da6-a3ce-929d0e0e4736";
    c.get("/u", &format!("X-Backend-Request-ID: {rid}\r\n"));
    let (trace, span, flags) = parts(up.last().header("traceparent").expect("traceparent"));
    assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(flags, "01");
    let access = w.wait_access_line(rid);
    assert_eq!(access["trace_id"], trace.as_str());
    assert_eq!(access["span_id"], span.as_str());
    assert!(
        access.get("parent_span_id").is_none(),
        "a root span: {access}"
    );

    // A generated request ID is a UUID too: its trace is derived the same way.
    let r = c.get("/g", "");
    let id = r.header("x-backend-request-id").expect("echoed").to_owned();
    let (trace, _, _) = parts(up.last().header("traceparent").expect("traceparent"));
    assert_eq!(trace, id.replace('-', ""));
}

#[test]
fn an_invalid_traceparent_is_ignored_and_never_logged_or_forwarded() {
    let up = Upstream::start();
    let w = worker(&up, "");
    let mut c = Client::connect(w.addr());
    let rid = "5bf92f35-77b3-4da6-a3ce-929d0e0e4736";
    let bad = "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01";
    c.get(
        "/i",
        &format!(
            "X-Backend-Request-ID: {rid}\r\ntraceparent: {bad}\r\ntracestate: rojo=secretish\r\n"
        ),
    );
    let seen = up.last();
    let (trace, _, _) = parts(seen.header("traceparent").expect("traceparent"));
    assert_eq!(
        trace, "5bf92f3577b34da6a3ce929d0e0e4736",
        "restarted from the request ID"
    );
    assert!(
        seen.header("tracestate").is_none(),
        "a restarted trace drops tracestate"
    );
    let access = w.wait_access_line(rid);
    assert!(access.get("parent_span_id").is_none());
    let log = w.log_text();
    assert!(
        !log.contains("0AF7651916CD43DD"),
        "the raw value is never logged"
    );
    assert!(!log.contains("secretish"));
    assert!(
        w.log_json()
            .iter()
            .any(|l| l["message"] == "invalid traceparent ignored"
                && l["trace_id"] == trace.as_str()),
        "the reason is logged under the hop's trace"
    );

    // Two traceparent lines are invalid too.
    c.get(
        "/i2",
        &format!("traceparent: {INCOMING}\r\ntraceparent: {INCOMING}\r\n"),
    );
    let (trace, _, _) = parts(up.last().header("traceparent").expect("traceparent"));
    assert_ne!(trace, "0af7651916cd43dd8448eb211c80319c");
}

#[test]
fn trace_context_off_passes_headers_through_and_logs_no_span() {
    let up = Upstream::start();
    let w = worker(&up, "trace_context = false");
    let mut c = Client::connect(w.addr());
    c.get(
        "/o",
        &format!(
            "X-Backend-Request-ID: off-1\r\ntraceparent: {INCOMING}\r\ntracestate: rojo=1\r\n"
        ),
    );
    let seen = up.last();
    assert_eq!(seen.headers_named("traceparent"), vec![INCOMING]);
    assert_eq!(seen.headers_named("tracestate"), vec!["rojo=1"]);
    let access = w.wait_access_line("off-1");
    assert!(access.get("trace_id").is_none(), "{access}");
    assert_eq!(
        access["user_id"], USER,
        "user context does not depend on tracing"
    );
}

#[test]
fn a_websocket_session_line_carries_the_trace_and_user_context() {
    use tungstenite::client::IntoClientRequest;
    let app = common::ws::echo_app();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        circuit_extra: format!(
            "user_id = \"{USER}\"\nsession_ids = [\"{SESSION}\"]\nendpoint_id = \"{ENDPOINT}\""
        ),
        ..Default::default()
    });
    let mut req = format!("ws://127.0.0.1:{}/ws", w.port)
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "X-Backend-Request-ID",
        "ws-traced-1".parse().expect("value"),
    );
    req.headers_mut()
        .insert("traceparent", INCOMING.parse().expect("value"));
    let stream = std::net::TcpStream::connect(w.addr()).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("timeout");
    let (mut ws, _) = tungstenite::client(req, Uninterrupted(stream)).expect("handshake");
    ws.send(tungstenite::Message::Text("hi".into()))
        .expect("send");
    let _ = ws.read();
    ws.close(None).expect("close");
    while ws.read().is_ok() {}
    let closed = w.wait_log("session close line", |v| {
        v["message"] == "websocket session closed"
    });
    let line = &closed[0];
    assert_eq!(line["request_id"], "ws-traced-1");
    assert_eq!(line["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(line["parent_span_id"], "b7ad6b7169203331");
    assert_eq!(line["user_id"], USER);
    assert_eq!(line["session_id"], SESSION);
    assert_eq!(line["endpoint_id"], ENDPOINT);
    let access = w.wait_access_line("ws-traced-1");
    assert_eq!(access["status"], 101);
    assert_eq!(
        access["span_id"], line["span_id"],
        "one span for the session"
    );
}
