//! W3C trace context through the real storage-proxy binary: a manager call's
//! `traceparent` is accepted and echoed, every line of the request and of the
//! background job it starts carries the trace, and `appproxy-trace` rebuilds the
//! timeline from the process's own log (request hop, then the job as its child hop).

mod storage_common;

use appproxy_test_support::http::request;
use storage_common::{Proxy, TOKEN, VFID};

use std::time::{Duration, Instant};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

fn call(p: &Proxy, path: &str, extra: &[(&str, &str)]) -> appproxy_test_support::http::Resp {
    let mut headers = vec![
        ("X-BackendAI-Storage-Auth-Token", TOKEN),
        ("Content-Type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    let body = serde_json::json!({"volume": "local", "vfid": VFID}).to_string();
    request(p.manager, "POST", path, &headers, body.as_bytes())
}

#[test]
fn traceparent_reaches_the_logs_and_the_timeline() {
    let p = Proxy::start("");
    let traceparent = format!("00-{TRACE}-{CALLER}-01");
    let r = call(
        &p,
        "/folder/create",
        &[
            ("traceparent", &traceparent),
            ("X-Backend-Request-ID", "trace-create-1"),
        ],
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    let echoed = r
        .header("traceparent")
        .expect("traceparent echoed")
        .to_owned();
    assert!(echoed.starts_with(&format!("00-{TRACE}-")), "{echoed}");
    assert!(
        !echoed.contains(CALLER),
        "a new span for this hop: {echoed}"
    );

    // The delete starts a background job: its lines are a child span of the request.
    let r = call(
        &p,
        "/folder/delete",
        &[
            ("traceparent", &traceparent),
            ("X-Backend-Request-ID", "trace-delete-1"),
        ],
    );
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.log_json().iter().any(|v| v["message"] == "bgtask done") {
        assert!(Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    }

    // An invalid traceparent is ignored (never logged); a UUID request ID gives the
    // trace ID.
    let rid = "9b2f6c1e-3a4d-4e6f-8b7a-1c2d3e4f5a6b";
    let bad = format!("00-{}-{CALLER}-01", TRACE.to_ascii_uppercase());
    let r = call(
        &p,
        "/folder/usage",
        &[("traceparent", &bad), ("X-Backend-Request-ID", rid)],
    );
    let echoed = r.header("traceparent").expect("traceparent echoed");
    assert!(
        echoed.starts_with("00-9b2f6c1e3a4d4e6f8b7a1c2d3e4f5a6b-"),
        "{echoed}"
    );
    let log = p.log();
    assert!(!log.contains(&TRACE.to_ascii_uppercase()), "{log}");

    let lines: Vec<serde_json::Value> = p.log_json();
    let delete_access = lines
        .iter()
        .find(|v| v["target"] == "access" && v["request_id"] == "trace-delete-1")
        .expect("delete access line");
    assert_eq!(delete_access["trace_id"], TRACE);
    assert_eq!(delete_access["parent_span_id"], CALLER);
    let job: Vec<_> = lines
        .iter()
        .filter(|v| v["task"] == "delete_vfolder")
        .collect();
    assert!(job.len() >= 2, "{log}");
    for v in &job {
        assert_eq!(v["request_id"], "trace-delete-1", "{v}");
        assert_eq!(v["trace_id"], TRACE, "{v}");
        assert_eq!(v["parent_span_id"], delete_access["span_id"], "{v}");
        assert_ne!(v["span_id"], delete_access["span_id"], "{v}");
    }

    // The CLI's library on the process's own log: three hops under one trace, the
    // job nested under the delete, only the external caller missing.
    let entries = appproxy_trace::parse_text(&log, "storage.log");
    let selected = appproxy_trace::select(&entries, &appproxy_trace::Query::Trace(TRACE.into()));
    let t = appproxy_trace::timeline(&selected);
    assert_eq!(t.trace_ids, vec![TRACE.to_owned()]);
    let names: Vec<(&str, usize)> = t.hops.iter().map(|h| (h.name.as_str(), h.depth)).collect();
    assert_eq!(
        names,
        vec![
            ("POST /folder/create", 0),
            ("POST /folder/delete", 0),
            ("bgtask started", 1),
        ],
        "{}",
        appproxy_trace::render_text(&t, true)
    );
    assert!(t.hops[..2]
        .iter()
        .all(|h| h.measured && h.component == "storage-proxy"));
    assert_eq!(t.missing.len(), 1);
    assert_eq!(t.missing[0].span_id, CALLER);
    // The derived trace ID finds the request by its UUID.
    let derived = appproxy_trace::select(
        &entries,
        &appproxy_trace::Query::Trace("9b2f6c1e3a4d4e6f8b7a1c2d3e4f5a6b".into()),
    );
    assert!(derived.iter().any(|e| e.target == "access"), "{log}");
}

/// The access lines of request `rid` in the proxy's log, once there is one (waited
/// for up to 30 s: lines reach the file through a writer thread).
fn access_lines_of(p: &Proxy, rid: &str) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lines: Vec<serde_json::Value> = p
            .log_json()
            .into_iter()
            .filter(|v| v["target"] == "access" && v["request_id"] == rid)
            .collect();
        if !lines.is_empty() {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "no access line for {rid}: {}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A download's access line is written at the body's end: the bytes of the file and
/// `complete: true` for a whole one; `complete: false` and fewer bytes for one the
/// client cut.
#[test]
fn a_downloads_access_line_tells_what_was_sent() {
    use std::io::{Read, Write};
    let p = Proxy::start("");
    storage_common::create_folder(&p);
    let small = storage_common::incompressible(300_000);
    let r = p.upload("small.bin", &small);
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    let big_len: u64 = 256 << 20;
    let big = std::fs::File::create(p.vfolder_path().join("big.bin")).expect("big file");
    big.set_len(big_len).expect("sparse 256 MiB");
    drop(big);

    // Whole.
    let r = p.download("small.bin", "", &[("X-Backend-Request-ID", "dl-whole-1")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, small);
    let lines = access_lines_of(&p, "dl-whole-1");
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["path"], "/download", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["bytes"], small.len() as u64, "{line}");
    assert_eq!(line["complete"], true, "{line}");
    assert!(
        line["duration_us"].as_u64() >= line["head_us"].as_u64(),
        "{line}"
    );
    assert!(
        line["trace_id"].is_string() && line["span_id"].is_string(),
        "{line}"
    );

    // Cut by the client after 1 MiB.
    let token = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": storage_common::VFID, "relpath": "big.bin"}),
    );
    let mut s = std::net::TcpStream::connect(p.client).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write!(
        s,
        "GET /download?token={token} HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: dl-cut-1\r\n\r\n"
    )
    .expect("send");
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while got < (1 << 20) {
        let n = s.read(&mut buf).expect("the download's start");
        assert!(n > 0, "closed after {got} bytes");
        got += n;
    }
    drop(s);
    let lines = access_lines_of(&p, "dl-cut-1");
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["path"], "/download", "{line}");
    assert_eq!(line["complete"], false, "{line}");
    let bytes = line["bytes"].as_u64().expect("bytes");
    assert!(bytes > 0 && bytes < big_len, "{line}");
}
