//! Log capture: every event inside a request scope carries `request_id`, also events
//! without a span; events outside carry none; both output formats.

use std::io::Write;
use std::sync::{Arc, Mutex};

use appproxy_shared::context::{scope, with_request_id};
use appproxy_shared::telemetry::{subscriber, LogFormat, LoggingConfig};
use appproxy_shared::RequestId;

/// An in-memory log sink shared with the test.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("sink").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Sink {
    type Writer = Sink;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

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
