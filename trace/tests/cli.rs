//! The `appproxy-trace` binary on log files it is given: timelines by trace and by
//! request ID, hop order and nesting, missing hops, journald prefixes on stdin, the SVG
//! waterfall and the slowest list; on these logs, the same as reading them whole.

mod common;

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const EXTERNAL: &str = "00f067aa0ba902b7";
const COORD: &str = "1111111111111111";
const CORE0: &str = "2222222222222222";
const CORE1: &str = "3333333333333333";
const APP_CALL: &str = "4444444444444444";
const APP: &str = "5555555555555555";

#[allow(clippy::too_many_arguments)]
fn line(
    ts: &str,
    component: &str,
    target: &str,
    message: &str,
    request_id: &str,
    span: &str,
    parent: &str,
    duration_us: Option<u64>,
) -> String {
    let mut v = serde_json::json!({
        "timestamp": format!("2026-11-30T16:00:{ts}Z"),
        "level": "INFO",
        "component": component,
        "target": target,
        "request_id": request_id,
        "trace_id": TRACE,
        "span_id": span,
        "message": message,
    });
    if !parent.is_empty() {
        v["parent_span_id"] = parent.into();
    }
    if let Some(d) = duration_us {
        v["duration_us"] = d.into();
        v["method"] = "POST".into();
        v["path"] = format!("/{component}").into();
        v["status"] = 200.into();
    }
    v.to_string()
}

/// Logs of three components: the coordinator (called by an external span), two worker
/// cores it deployed to, and an app whose caller's span (the worker's app call) is in
/// no log given; plus an unrelated, slower request without trace.
fn write_logs(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let coordinator = [
        line("01.000000", "coordinator", "appproxy_control", "circuit create", "req-1", COORD, EXTERNAL, None),
        line("01.100000", "coordinator", "access", "request", "req-1", COORD, EXTERNAL, Some(100_000)),
        // A line of another request, not part of the trace.
        r#"{"timestamp":"2026-11-30T16:00:05.000000Z","level":"INFO","component":"coordinator","target":"access","request_id":"slow-1","message":"request","duration_us":3000000,"path":"/slow"}"#.to_owned(),
        r#"{"timestamp":"2026-11-30T16:00:02.000000Z","level":"INFO","component":"coordinator","target":"x","request_id":"slow-1","message":"started"}"#.to_owned(),
        "not a json line".to_owned(),
    ];
    let worker = [
        line(
            "01.020000",
            "worker",
            "deploy",
            "route deployed core 0",
            "req-1",
            CORE0,
            COORD,
            None,
        ),
        line(
            "01.030000",
            "worker",
            "deploy",
            "route deployed core 1",
            "req-1",
            CORE1,
            COORD,
            None,
        ),
        line(
            "01.050000",
            "worker",
            "access",
            "request",
            "req-1",
            CORE1,
            COORD,
            Some(20_000),
        ),
    ];
    let app = [line(
        "01.200000",
        "app",
        "access",
        "request",
        "app-req-9",
        APP,
        APP_CALL,
        Some(1_000),
    )];
    let mut paths = Vec::new();
    for (name, lines) in [
        ("coordinator.log", &coordinator[..]),
        ("worker.log", &worker[..]),
        ("app.log", &app[..]),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, lines.join("\n") + "\n").expect("write log");
        paths.push(p);
    }
    paths
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_appproxy-trace"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run appproxy-trace");
    {
        let mut input = child.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).expect("write stdin");
        }
    }
    child.wait_with_output().expect("output")
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).expect("utf8")
}

#[test]
fn trace_timeline_orders_hops_and_flags_missing_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_logs(dir.path());
    let mut args: Vec<&str> = paths.iter().map(|p| p.to_str().expect("utf8")).collect();
    let svg = dir.path().join("w.svg");
    args.extend(["--trace-id", TRACE, "--svg", svg.to_str().expect("utf8")]);
    let out = stdout(&run(&args, None));
    // Hops: coordinator first (root of the logs), the two cores nested under it in
    // start order, then the app.
    let pos = |needle: &str| {
        out.find(needle)
            .unwrap_or_else(|| panic!("{needle} in\n{out}"))
    };
    assert!(
        pos(&format!("span {COORD}")) < pos(&format!("span {CORE0}")),
        "{out}"
    );
    assert!(
        pos(&format!("span {CORE0}")) < pos(&format!("span {CORE1}")),
        "{out}"
    );
    assert!(
        pos(&format!("span {CORE1}")) < pos(&format!("span {APP}")),
        "{out}"
    );
    assert!(out.contains("4 hop(s), 2 missing"), "{out}");
    // Durations from the access lines; the coordinator's hop starts at its access
    // line minus its duration.
    assert!(
        out.contains("coordinator    POST /coordinator -> 200  dur 100.000ms"),
        "{out}"
    );
    assert!(out.contains("dur 20.000ms"), "{out}");
    // The core nested one level under the coordinator, started 30ms after it.
    assert!(out.contains("\n  +30.000ms"), "{out}");
    assert!(out.contains("(+30.000ms after parent start)"), "{out}");
    // The worker's app call and the external caller are missing hops.
    assert!(
        out.contains(&format!(
            "MISSING HOP: span {APP_CALL} is the parent of {APP} (app)"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "MISSING HOP: span {EXTERNAL} is the parent of {COORD} (coordinator)"
        )),
        "{out}"
    );
    assert!(!out.contains("slow-1"), "{out}");
    let svg = std::fs::read_to_string(&svg).expect("svg written");
    assert!(svg.starts_with("<svg"), "{svg}");
    assert_eq!(svg.matches("<rect").count(), 4 + 2, "{svg}");
    assert!(
        svg.contains(&format!("missing hop: span {APP_CALL}")),
        "{svg}"
    );
}

#[test]
fn request_id_finds_the_whole_trace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_logs(dir.path());
    let mut args: Vec<&str> = paths.iter().map(|p| p.to_str().expect("utf8")).collect();
    args.extend(["--request-id", "req-1", "-v"]);
    let out = stdout(&run(&args, None));
    // The app's line has another request ID but the same trace.
    assert!(out.contains(&format!("span {APP}")), "{out}");
    assert!(out.contains("request app-req-9,req-1"), "{out}");
    assert!(
        out.contains("route deployed core 0"),
        "verbose lists lines: {out}"
    );
    assert!(out.contains("worker.log:1"), "{out}");
}

#[test]
fn stdin_with_journald_prefix_and_derived_trace_id() {
    // Untraced lines of a UUID request: the trace ID derived from it finds them.
    let input = "\
-- Journal begins --
Nov 30 16:00:00 host appproxy-coordinator[1]: {\"timestamp\":\"2026-11-30T16:00:00.000000Z\",\"level\":\"INFO\",\"component\":\"coordinator\",\"target\":\"x\",\"request_id\":\"4bf92f35-77b3-4da6-a3ce-929d0e0e4736\",\"message\":\"hello\"}
Nov 30 16:00:00 host appproxy-coordinator[1]: {\"timestamp\":\"2026-11-30T16:00:00.004000Z\",\"level\":\"INFO\",\"component\":\"coordinator\",\"target\":\"access\",\"request_id\":\"4bf92f35-77b3-4da6-a3ce-929d0e0e4736\",\"message\":\"request\",\"duration_us\":4000,\"method\":\"GET\",\"path\":\"/x\",\"status\":200}
";
    let out = stdout(&run(&["--trace-id", TRACE], Some(input)));
    assert!(out.contains("1 hop(s), 0 missing, total 4.000ms"), "{out}");
    assert!(out.contains("GET /x -> 200  dur 4.000ms"), "{out}");
    let out = stdout(&run(
        &["-", "--request-id", "4bf92f35-77b3-4da6-a3ce-929d0e0e4736"],
        Some(input),
    ));
    assert!(out.contains("1 hop(s)"), "{out}");
}

#[test]
fn slowest_lists_traces_by_duration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_logs(dir.path());
    let mut args: Vec<&str> = paths.iter().map(|p| p.to_str().expect("utf8")).collect();
    args.extend(["--slowest", "5"]);
    let out = stdout(&run(&args, None));
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows[0].contains("request:slow-1"), "{out}");
    assert!(rows[0].trim_start().starts_with("3000.000ms"), "{out}");
    assert!(rows[1].contains(TRACE), "{out}");
    assert!(rows[1].contains("app,coordinator,worker"), "{out}");
    let out = stdout(&run(
        &{
            let mut a = args.clone();
            a[args.len() - 1] = "1";
            a
        },
        None,
    ));
    assert_eq!(out.lines().count(), 2, "{out}");
}

#[test]
fn unknown_ids_and_bad_usage_fail_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_logs(dir.path());
    let file = paths[0].to_str().expect("utf8");
    let o = run(&[file, "--request-id", "nope"], None);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no line"));
    let o = run(&[file], None);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["/nonexistent/log", "--slowest", "1"], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/log"));
    // A trace ID that is not one (a typo) is a usage error, not "no line"; a valid
    // one that left no line is.
    for bad in ["zz", &"a".repeat(31), &"g".repeat(32)] {
        let o = run(&[file, "--trace-id", bad], None);
        assert_eq!(o.status.code(), Some(2), "{bad}");
        assert!(String::from_utf8_lossy(&o.stderr).contains("32 hex digits"));
    }
    let o = run(&[file, "--trace-id", &"0".repeat(32)], None);
    assert_eq!(o.status.code(), Some(1));
    // A logfmt log: said to be no JSON log, not only "0 parsed line(s)"; a JSON log
    // that lacks the ID is not told so.
    let logfmt =
        "timestamp=2026-12-07T18:00:00Z level=INFO component=worker request_id=r1 message=\"x\"\n";
    let o = run(&["--request-id", "r1"], Some(logfmt));
    assert_eq!(o.status.code(), Some(1));
    let said = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        said.contains("none of the 1 line(s) read is a JSON log line"),
        "{said}"
    );
    let o = run(&[file, "--request-id", "nope"], None);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("JSON log line"));
}

/// A reader that stops reading (`appproxy-trace … | head -1`) ends the output
/// quietly, exit 0: it panicked on the closed pipe ("failed printing to stdout").
#[test]
fn a_reader_that_stops_ends_the_output_quietly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_logs(dir.path());
    let mut args: Vec<&str> = paths.iter().map(|p| p.to_str().expect("utf8")).collect();
    args.extend(["--trace-id", TRACE, "-v"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_appproxy-trace"))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run appproxy-trace");
    // The reader is gone before the tool has read its logs.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The tool reads its logs line by line, twice for a timeline: on these logs (files
/// and stdin) it prints what it printed reading them whole.
#[test]
fn streaming_gives_what_reading_whole_gives_on_these_logs() {
    use common::{whole_input, Ask};
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_logs(dir.path());
    let inputs: Vec<(String, Vec<u8>)> = paths
        .iter()
        .map(|p| (p.display().to_string(), std::fs::read(p).expect("read log")))
        .collect();
    let files: Vec<&str> = paths.iter().map(|p| p.to_str().expect("utf8")).collect();
    for ask in [
        Ask::Request("req-1".to_owned()),
        Ask::Request("slow-1".to_owned()),
        Ask::Request("app-req-9".to_owned()),
        Ask::Trace(TRACE.to_owned()),
        Ask::Slowest(5),
    ] {
        let mut args = files.clone();
        let n;
        match &ask {
            Ask::Request(r) => args.extend(["--request-id", r, "-v"]),
            Ask::Trace(t) => args.extend(["--trace-id", t, "-v"]),
            Ask::Slowest(k) => {
                n = k.to_string();
                args.extend(["--slowest", &n]);
            }
        }
        let (want, _) = whole_input(&inputs, &ask).expect("found");
        assert_eq!(stdout(&run(&args, None)), want, "{ask:?}");
        // All of it on stdin.
        let text: Vec<u8> = inputs.iter().flat_map(|(_, b)| b.clone()).collect();
        let stdin_inputs = [("stdin".to_owned(), text.clone())];
        let (want, _) = whole_input(&stdin_inputs, &ask).expect("found");
        let args = &args[files.len()..];
        let text = String::from_utf8(text).expect("utf8");
        assert_eq!(stdout(&run(args, Some(&text))), want, "{ask:?}");
    }
}
