//! Stopping as a load balancer needs it: from a stop signal on, `/readyz` answers
//! 503 `stopping` while `/livez` stays 200; with `[timeouts] stop_grace_secs` the
//! worker goes on accepting and serving for that long (so clients still sent its way
//! are served while the balancer learns it is going), and a second stop signal ends
//! the grace at once; without it, the drain begins at once and finishes what is in
//! flight. Real worker process, real signals, real sockets.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{eventually, Client, Upstream, Worker, WorkerOpts};

#[test]
fn a_stopping_worker_serves_through_its_grace_and_is_not_ready() {
    let up = Upstream::start();
    let mut w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        extra: "[timeouts]\nstop_grace_secs = 600\n".into(),
        ..Default::default()
    });
    let ready = w.admin_get("/readyz");
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert!(
        ready.text().contains("\"ready\":\"ready\""),
        "{}",
        ready.text()
    );
    w.signal("-TERM");
    eventually("not ready once stopping", || {
        w.admin_get("/readyz").status == 503
    });
    assert!(w
        .admin_get("/readyz")
        .text()
        .contains("\"status\":\"stopping\""));
    assert_eq!(w.admin_get("/livez").status, 200, "alive through the grace");
    // New connections are still accepted and served during the grace.
    for _ in 0..3 {
        let mut c = Client::connect(w.addr());
        assert_eq!(c.get("/ok", "").status, 200);
    }
    w.wait_log("the grace", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("stopping: /readyz answers 503"))
    });
    // A second stop signal ends the grace: the worker drains and exits cleanly, long
    // before the 600 s.
    let status = w.terminate();
    assert!(status.success(), "{status:?}");
    let log = w.log_text();
    assert!(log.contains("another stop signal: the grace ends"), "{log}");
    assert!(log.contains("worker stopped"), "{log}");
}

#[test]
fn without_a_grace_a_draining_worker_is_not_ready_and_finishes_what_is_in_flight() {
    let up = Upstream::start();
    let mut w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        ..Default::default()
    });
    // An event stream in flight: its first event through the worker.
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(b"GET /sse HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("request");
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while !line.contains("data: first") {
        line.clear();
        assert!(r.read_line(&mut line).expect("read") > 0, "closed early");
    }
    w.signal("-TERM");
    eventually("not ready while draining", || {
        w.admin_get("/readyz").status == 503
    });
    assert!(w
        .admin_get("/readyz")
        .text()
        .contains("\"status\":\"stopping\""));
    assert_eq!(w.admin_get("/livez").status, 200);
    // The stream in flight is finished, then the worker exits.
    up.open_gate();
    let mut rest = String::new();
    while !rest.contains("data: second") {
        line.clear();
        assert!(
            r.read_line(&mut line).expect("read") > 0,
            "cut before its end: {rest}"
        );
        rest.push_str(&line);
    }
    let status = w.terminate();
    assert!(status.success(), "{status:?}");
}
