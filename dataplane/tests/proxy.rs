//! End-to-end behaviour of the worker binary with real sockets and a real app.

mod common;

use appproxy_test_support::net::ReadUninterrupted;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Client, Upstream, Worker, WorkerOpts};

fn worker_for(up: &Upstream) -> Worker {
    Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        ..Default::default()
    })
}

#[test]
fn request_ids_are_preserved_generated_and_echoed() {
    let up = Upstream::start();
    let w = worker_for(&up);
    let mut c = Client::connect(w.addr());

    // Present: preserved, forwarded under the primary name, echoed (the app's own
    // header does not win), logged.
    let r = c.get("/a?secret=1", "X-Backend-Request-ID: client-id-1\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.headers_named("x-backend-request-id"), vec!["client-id-1"]);
    let seen = up.last();
    assert_eq!(
        seen.headers_named("x-backend-request-id"),
        vec!["client-id-1"]
    );
    let access = w.wait_access_line("client-id-1");
    assert_eq!(access["status"], 200);
    assert_eq!(access["method"], "GET");
    assert_eq!(access["path"], "/a", "the query is not logged");
    assert_eq!(access["circuit"], "c0a8f5d2-1111-4222-8333-444455556666");
    assert_eq!(
        access["client"], "127.0.0.1",
        "the client's address: {access}"
    );
    assert!(access["duration_us"].is_u64());
    assert!(access["bytes_out"].as_u64().unwrap_or(0) > 0);

    // Alias: preserved under the primary name; the alias is not forwarded.
    let r = c.get("/b", "X-Request-ID: alias-id-2\r\n");
    assert_eq!(r.header("x-backend-request-id"), Some("alias-id-2"));
    let seen = up.last();
    assert_eq!(seen.header("x-backend-request-id"), Some("alias-id-2"));
    assert_eq!(seen.header("x-request-id"), None);

    // Absent: generated (UUID), forwarded and echoed.
    let r = c.get("/c", "");
    let id = r.header("x-backend-request-id").expect("echoed").to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    assert_eq!(up.last().header("x-backend-request-id"), Some(id.as_str()));
    w.wait_access_line(&id);

    // Invalid: replaced; the raw value is neither forwarded nor logged.
    let r = c.get("/d", "X-Backend-Request-ID: evil value;<script>\r\n");
    let id = r.header("x-backend-request-id").expect("echoed").to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    assert_eq!(up.last().header("x-backend-request-id"), Some(id.as_str()));
    w.wait_access_line(&id);
    assert!(!w.log_text().contains("evil value"));
    assert!(!format!("{:?}", up.seen.lock().expect("seen")).contains("evil value"));
}

#[test]
fn forwarding_headers_and_hop_by_hop() {
    let up = Upstream::start();
    let w = worker_for(&up);
    let mut c = Client::connect(w.addr());
    let r = c.get(
        "/h",
        "Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\nX-Forwarded-For: 6.6.6.6\r\nX-Repeat: 1\r\nx-repeat: 2\r\nCookie: a=b\r\n",
    );
    assert_eq!(r.status, 200);
    let seen = up.last();
    assert_eq!(
        seen.header("x-hop"),
        None,
        "names listed in Connection are hop-by-hop"
    );
    assert_eq!(seen.header("keep-alive"), None);
    assert_eq!(seen.header("connection"), None);
    assert_eq!(
        seen.headers_named("x-forwarded-for"),
        vec!["127.0.0.1"],
        "an untrusted peer's XFF is replaced"
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("test"));
    assert_eq!(
        seen.header("x-forwarded-port"),
        Some(w.port.to_string().as_str())
    );
    assert!(seen
        .header("forwarded")
        .is_some_and(|f| f.contains("for=127.0.0.1")));
    assert_eq!(seen.headers_named("x-repeat"), vec!["1", "2"]);
    // Name case is kept as the client sent it.
    assert!(seen.headers.iter().any(|(n, _)| n == "x-repeat"));
    assert!(seen.headers.iter().any(|(n, _)| n == "X-Repeat"));
    assert_eq!(seen.header("cookie"), Some("a=b"));
}

#[test]
fn keep_alive_and_pipelining_answer_in_order() {
    let up = Upstream::start();
    let w = worker_for(&up);
    let mut c = Client::connect(w.addr());
    let mut batch = Vec::new();
    for i in 0..5 {
        batch.extend_from_slice(
            format!("GET /p{i} HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: pipe-{i}\r\n\r\n")
                .as_bytes(),
        );
    }
    c.send(&batch);
    for i in 0..5 {
        let r = c.response();
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["path"], format!("/p{i}"));
        assert_eq!(
            r.header("x-backend-request-id"),
            Some(format!("pipe-{i}").as_str())
        );
    }
    // The same client connection goes on, and the app saw one pooled connection.
    for _ in 0..20 {
        assert_eq!(c.get("/again", "").status, 200);
    }
    assert_eq!(up.connections.load(std::sync::atomic::Ordering::Relaxed), 1);
    let metrics = w.admin_get("/metrics").text();
    assert!(
        metrics.contains("appproxy_upstream_pool_hits_total"),
        "{metrics}"
    );
}

#[test]
fn chunked_both_ways_with_trailers() {
    let up = Upstream::start();
    let w = worker_for(&up);
    let mut c = Client::connect(w.addr());
    c.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: yes\r\n\r\n");
    let r = c.response();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], 12);
    assert_eq!(up.last().header("transfer-encoding"), Some("chunked"));

    let r = c.get("/chunked", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.text(), "hello world");

    // A close-delimited response reaches an HTTP/1.1 client re-chunked, keep-alive.
    let r = c.get("/until-close", "");
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.text(), "all of this until close");
    assert_eq!(c.get("/still-open", "").status, 200);
}

#[test]
fn http10_clients_get_close_delimited_or_keep_alive() {
    let up = Upstream::start();
    let w = worker_for(&up);
    let mut c = Client::connect(w.addr());
    c.send(b"GET /chunked HTTP/1.0\r\n\r\n");
    let r = c.response();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("transfer-encoding"),
        None,
        "HTTP/1.0 cannot take chunked"
    );
    assert_eq!(r.text(), "hello world");
    assert!(c.is_closed());

    let mut c = Client::connect(w.addr());
    c.send(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    let r = c.response();
    assert_eq!(r.header("connection"), Some("keep-alive"));
    c.send(b"GET /y HTTP/1.0\r\n\r\n");
    let r = c.response();
    assert_eq!(r.json()["path"], "/y");
    assert!(c.is_closed());
}

#[test]
fn bodiless_responses_and_expect_continue() {
    let up = Upstream::start();
    let w = worker_for(&up);
    let mut c = Client::connect(w.addr());
    c.send(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.response_to("HEAD");
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-length").is_some(),
        "HEAD keeps the representation's length"
    );
    for code in [204, 304] {
        let r = c.get(&format!("/status?code={code}"), "");
        assert_eq!(r.status, code);
        assert!(r.body.is_empty());
    }
    // Expect: 100-continue: the proxy says 100 before the client sends the body,
    // under the request's ID (a client that gives up after it has the ID to quote).
    c.send(b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\nX-Backend-Request-ID: expecting-1\r\n\r\n");
    let (status, headers) = c.head();
    assert_eq!(status, 100);
    let ids: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("x-backend-request-id"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(ids, vec!["expecting-1"], "{headers:?}");
    c.send(b"body");
    let r = c.response();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-backend-request-id"), Some("expecting-1"));
    assert_eq!(r.json()["body_len"], 4);
    assert_eq!(up.last().header("expect"), None);
}

#[test]
fn server_sent_events_stream_event_by_event() {
    let up = Upstream::start();
    let w = worker_for(&up);
    let mut c = Client::connect(w.addr());
    c.send(b"GET /sse HTTP/1.1\r\nHost: t\r\n\r\n");
    let (status, headers) = c.head();
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("content-type") && v == "text/event-stream"));
    // The first event arrives while the app is still holding the second one back.
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains("data: first") {
        let n = c.reader.read_uninterrupted(&mut buf).expect("first event");
        assert!(n > 0, "stream ended before the first event");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(!String::from_utf8_lossy(&got).contains("second"));
    up.open_gate();
    while !String::from_utf8_lossy(&got).ends_with("0\r\n\r\n") {
        let n = c.reader.read_uninterrupted(&mut buf).expect("rest");
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).contains("data: second"));
}

#[test]
fn large_bodies_stream_with_bounded_memory() {
    const SIZE: u64 = 100 << 20;
    let up = Upstream::start();
    let w = worker_for(&up);
    let mut c = Client::connect(w.addr());
    // Upload 100 MiB.
    c.send(
        format!("POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {SIZE}\r\n\r\n").as_bytes(),
    );
    let block = vec![b'u'; 1 << 20];
    for _ in 0..100 {
        c.stream.write_all(&block).expect("upload");
    }
    let r = c.response();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], SIZE);
    // Download 100 MiB.
    c.send(format!("GET /bytes?n={SIZE} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    let (status, headers) = c.head();
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("content-length") && *v == SIZE.to_string()));
    let mut left = SIZE;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = c
            .reader
            .read_uninterrupted(&mut buf[..left.min(1 << 20) as usize])
            .expect("download");
        assert!(n > 0);
        left -= n as u64;
    }
    let peak = w.peak_rss_kib();
    assert!(
        peak > 0 && peak < 64 * 1024,
        "worker peak RSS {peak} KiB for 100 MiB each way"
    );
    assert_eq!(c.get("/after", "").status, 200);
}

#[test]
fn requests_are_served_on_more_than_one_core() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        cores: 2,
        upstreams: vec![up.addr],
        ..Default::default()
    });
    for i in 0..64 {
        let mut c = Client::connect(w.addr());
        assert_eq!(
            c.get("/spread", &format!("X-Backend-Request-ID: spread-{i}\r\n"))
                .status,
            200
        );
    }
    let cores: std::collections::BTreeSet<u64> = (0..64)
        .map(|i| {
            w.wait_access_line(&format!("spread-{i}"))["core"]
                .as_u64()
                .expect("core")
        })
        .collect();
    assert_eq!(
        cores.len(),
        2,
        "64 connections all landed on one core: {cores:?}"
    );
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits() {
    let up = Upstream::start();
    let mut w = worker_for(&up);
    let mut idle = Client::connect(w.addr());
    assert_eq!(idle.get("/warm", "").status, 200);
    let mut busy = Client::connect(w.addr());
    busy.send(b"GET /wait?ms=700 HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: in-flight\r\n\r\n");
    // Let the request reach the app before the signal.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !up
        .seen
        .lock()
        .expect("seen")
        .iter()
        .any(|s| s.path.starts_with("/wait"))
    {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = w.terminate();
    assert!(status.success(), "exit status {status:?}");
    let r = busy.response();
    assert_eq!(r.status, 200, "the in-flight request completed");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(
        idle.is_closed(),
        "idle keep-alive connections are closed on drain"
    );
    assert!(
        std::net::TcpStream::connect(w.addr()).is_err(),
        "no longer accepting"
    );
}

/// While one core drains a long request, the core that has stopped is not stalled:
/// liveness (`/health`) answers 200 and no stall is logged; a second stop signal is
/// logged. Before, every graceful
/// stop with one long connection open answered 503 (a liveness probe could kill the
/// worker mid-drain) and logged a stall at every check.
#[test]
fn a_drain_does_not_make_stopped_cores_look_stalled() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        cores: 2,
        upstreams: vec![up.addr],
        admin_extra: "core_stall_ms = 100".into(),
        ..Default::default()
    });
    let mut busy = Client::connect(w.addr());
    busy.send(b"GET /wait?ms=2500 HTTP/1.1\r\nHost: t\r\n\r\n");
    up.wait_seen("/wait");
    w.signal("-TERM");
    w.wait_log("a core stopped", |v| v["message"] == "core stopped");
    // Well past the stall bound, with the other core still draining.
    std::thread::sleep(Duration::from_millis(800));
    let r = w.admin_get("/health");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!w.log_text().contains("core stalled"), "{}", w.log_text());
    // A second stop signal is said to have come (it was ignored without a word);
    // the drain goes on and the request in flight is answered.
    w.signal("-TERM");
    w.wait_log("the second signal's warning", |v| {
        v["level"] == "WARN"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("a signal during the drain"))
    });
    assert_eq!(busy.response().status, 200);
}

/// Requests still in flight when the drain's deadline passes are cut, each with its
/// access line and request ID: one the app had and had not answered is told 504
/// `drain_deadline` (the app may have acted on it: not the 503 that invites sending
/// it again), one whose body was still coming too, a response under way is cut
/// (its status, the bytes that went), an HTTP/2 stream likewise. Before, the core
/// stopped with them open: the connections were closed by the process's exit and
/// nothing said which requests they were.
#[test]
fn requests_cut_at_the_drain_deadline_keep_their_access_lines() {
    let up = Upstream::start();
    let mut w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        extra: "[timeouts]\ndrain_secs = 1\n".into(),
        ..Default::default()
    });
    let mut waiting = Client::connect(w.addr());
    waiting.send(
        b"GET /wait?ms=20000 HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: cut-waiting\r\n\r\n",
    );
    let mut streaming = Client::connect(w.addr());
    streaming.send(b"GET /sse HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: cut-streaming\r\n\r\n");
    let (status, _) = streaming.head();
    assert_eq!(status, 200);
    let mut uploading = Client::connect(w.addr());
    uploading.send(
        b"POST /wait?ms=20000 HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: cut-uploading\r\nContent-Length: 100000\r\n\r\npart of the body",
    );
    let h2 = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "30", "--http2-prior-knowledge"])
        .args(["-o", "/dev/null", "-w", "%{http_code}"])
        .args(["-H", "x-backend-request-id: cut-h2"])
        .arg(format!("http://{}/wait?ms=20000", w.addr()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("curl must be installed (.ci/run installs it)");
    // The upload's head reached the app (its body never will: the app records a
    // request once it has read the body).
    common::eventually("every request reached the app", || {
        let seen = up.seen.lock().expect("seen");
        seen.iter().filter(|s| s.path.starts_with("/wait")).count() == 2
            && up.connections.load(Ordering::SeqCst) == 4
    });
    let status = w.terminate();
    assert!(status.success(), "exit status {status:?}");
    // Told why, where nothing had gone out to the client yet.
    let told = waiting.response();
    assert_eq!(told.status, 504);
    assert_eq!(told.json()["code"], "drain_deadline", "{}", told.text());
    let h2 = h2.wait_with_output().expect("curl");
    assert_eq!(String::from_utf8_lossy(&h2.stdout), "504");
    let line = |id: &str| {
        w.log_json()
            .into_iter()
            .find(|v| v["target"] == "access" && v["request_id"] == id)
            .unwrap_or_else(|| panic!("no access line for {id}:\n{}", w.log_text()))
    };
    assert_eq!(line("cut-waiting")["status"], 504);
    assert_eq!(line("cut-uploading")["status"], 504);
    assert_eq!(line("cut-h2")["status"], 504);
    let cut = line("cut-streaming");
    assert_eq!(cut["status"], 200);
    assert!(cut["bytes_out"].as_u64().unwrap_or(0) > 0, "{cut}");
    // Each cut says why, under its request ID.
    let said = w
        .log_json()
        .into_iter()
        .filter(|v| {
            v["request_id"] == "cut-streaming"
                && v["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("drain deadline"))
        })
        .count();
    assert_eq!(said, 1, "{}", w.log_text());
    assert!(w.log_text().contains("drain timeout"), "{}", w.log_text());
}

/// `SIGUSR1` and `SIGUSR2` (nginx's log reopening and binary upgrade, which
/// logrotate scripts and habit send) are logged and the worker serves on: their
/// default action ended it at once, connections and all. `SIGQUIT` (nginx's
/// graceful stop, its images' stop signal) drains as `SIGTERM` does.
#[test]
fn unused_signals_are_logged_and_sigquit_drains() {
    let up = Upstream::start();
    let mut w = worker_for(&up);
    let mut c = Client::connect(w.addr());
    assert_eq!(c.get("/before", "").status, 200);
    for sig in ["-USR1", "-USR2"] {
        w.signal(sig);
    }
    common::eventually("both signals said", || {
        let said =
            "a signal the worker does not use (logs go to stdout; no binary upgrade): serving on";
        common::log_count(&w, said) == 2
    });
    assert_eq!(c.get("/after", "").status, 200, "the same connection");
    let mut busy = Client::connect(w.addr());
    busy.send(b"GET /wait?ms=500 HTTP/1.1\r\nHost: t\r\n\r\n");
    up.wait_seen("/wait");
    w.signal("-QUIT");
    assert_eq!(busy.response().status, 200, "drained, not killed");
    let status = w.wait_exit();
    assert!(status.success(), "{status:?}\n{}", w.log_text());
}

/// A circuit whose app is `rstudio` tells the app the URL the browser asked for
/// (`X-RStudio-Request`, `X-RStudio-Proto`, as the original does), over HTTP/1.1
/// and HTTP/2 alike; what a client sends under those names never reaches it.
#[test]
fn an_rstudio_circuit_gets_the_url_the_browser_asked_for() {
    let up = Upstream::start();
    let w = worker_for(&up);
    let mut c = Client::connect(w.addr());
    let mut ask = || {
        let r = c.get(
            "/auth-sign-in?appUri=%2F",
            "X-RStudio-Request: http://evil/\r\n",
        );
        assert_eq!(r.status, 200, "{}", r.text());
        up.last()
    };
    // Not an RStudio circuit: a client's field never reaches the app.
    assert!(ask().headers_named("x-rstudio-request").is_empty());
    w.reload(|text| text.replace("app = \"test\"", "app = \"rstudio\""));
    common::eventually("the reload applied", || {
        !ask().headers_named("x-rstudio-request").is_empty()
    });
    let seen = ask();
    // The test client names its host `test`.
    assert_eq!(
        seen.headers_named("x-rstudio-request"),
        vec!["http://test/auth-sign-in"]
    );
    let host = format!("127.0.0.1:{}", w.port);
    assert_eq!(seen.headers_named("x-rstudio-proto"), vec!["http"]);
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
        ])
        .args(["-H", "x-rstudio-request: http://evil/"])
        .arg(format!("http://{host}/s/1/?x=1"))
        .output()
        .expect("curl must be installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = up.last();
    assert_eq!(
        seen.headers_named("x-rstudio-request"),
        vec![format!("http://{host}/s/1/")]
    );
}

#[test]
fn retries_once_when_a_pooled_connection_died() {
    let up = Upstream::start();
    let w = worker_for(&up);
    let mut c = Client::connect(w.addr());
    // The app claims keep-alive but closes right after answering.
    assert_eq!(c.get("/close-after", "").status, 200);
    // Every connection the app accepted (the pooled one) is closed on its side.
    common::eventually("the app closed the pooled connection", || {
        let closed = up.closed.load(Ordering::Relaxed);
        closed >= 1 && closed == up.connections.load(Ordering::Relaxed)
    });
    let r = c.get("/next", "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/next");
}

#[test]
fn admin_health_and_metrics() {
    let up = Upstream::start();
    let w = worker_for(&up);
    let r = w.admin_get("/health");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
    assert_eq!(r.json()["circuits"], 1);
    let mut c = Client::connect(w.addr());
    assert_eq!(c.get("/m", "").status, 200);
    // Counters are published by the reactor tick (every 50 ms).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = w.admin_get("/metrics").text();
        if text.contains("appproxy_requests_total{core=\"0\",status=\"2xx\"} 1") {
            assert!(
                text.contains("appproxy_connections_active{core=\"0\"} 1"),
                "{text}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(w.admin_get("/nope").status, 404);
}

#[test]
fn reload_moves_circuits_without_cutting_connections() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        cores: 2,
        upstreams: vec![up.addr],
        ..Default::default()
    });
    let mut old = Client::connect(w.addr());
    assert_eq!(old.get("/before", "").status, 200);
    let new_port = common::free_port();
    let old_port = w.port;
    w.reload(|text| text.replace(&format!("port = {old_port}"), &format!("port = {new_port}")));
    // Every core applies the deployment, all under the one reload ID.
    let applied = w.wait_log("deployment applied on both cores", |v| {
        v["message"] == "deployment applied"
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut applied = applied;
    while applied.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", w.log_text());
        std::thread::sleep(Duration::from_millis(20));
        applied = w
            .log_json()
            .into_iter()
            .filter(|v| v["message"] == "deployment applied")
            .collect();
    }
    let ids: std::collections::BTreeSet<String> = applied
        .iter()
        .map(|v| v["request_id"].as_str().expect("request_id").to_owned())
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "one ID links the reload and every core: {applied:?}"
    );
    let cores: std::collections::BTreeSet<u64> = applied
        .iter()
        .map(|v| v["core"].as_u64().expect("core"))
        .collect();
    assert_eq!(cores.len(), 2);
    // The established connection stays open; its port no longer has a circuit.
    let r = old.get("/after", "");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], "unknown_circuit");
    assert!(r.json()["request_id"].is_string());
    // The new port serves; the old one no longer accepts.
    let mut fresh = Client::connect(std::net::SocketAddr::from(([127, 0, 0, 1], new_port)));
    assert_eq!(fresh.get("/moved", "").status, 200);
    assert!(std::net::TcpStream::connect(w.addr()).is_err());
    // A broken file is refused and the running circuits stay.
    let text = std::fs::read_to_string(w.dir.path().join("worker.toml")).expect("config");
    w.reload(|_| "this is [not toml".into());
    w.wait_log("refused reload", |v| {
        v["message"] == "reload refused; everything running stays"
    });
    assert_eq!(fresh.get("/still", "").status, 200);
    // So is an empty one, or one of comments only (a file being written when the
    // signal came): each used to be taken as a config of no circuits, and every app
    // of the node went down.
    for (i, written) in ["", "\n", "# appproxy-worker\n"].into_iter().enumerate() {
        w.reload(|_| written.into());
        common::eventually("the refusal", || {
            let refusals = w.log_json().into_iter().filter(|v| {
                v["message"] == "reload refused; everything running stays"
                    && v["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("names no [worker]"))
            });
            refusals.count() > i
        });
        assert_eq!(fresh.get("/still", "").status, 200);
    }
    // A setting a reload does not apply is named, and the circuits are applied.
    w.reload(|_| text.replace("[admin]", "[limits]\nmax_headers = 50\n\n[admin]"));
    w.wait_log("the section that needs a restart", |v| {
        v["level"] == "WARN" && v["section"] == "limits"
    });
    assert_eq!(fresh.get("/still", "").status, 200);
    // A file cut short after its header lists no circuits: refused, the circuit
    // stays (a reload never empties a worker).
    w.reload(|_| "[worker]\n".into());
    w.wait_log("the refusal of a file of no circuits", |v| {
        v["message"] == "reload refused; everything running stays"
            && v["error"]
                .as_str()
                .is_some_and(|e| e.contains("lists no circuits where 1 run"))
    });
    assert_eq!(fresh.get("/still", "").status, 200);
    // The file's circuits are checked against the running settings, which stay: a
    // port range the file narrows is warned of and not applied, and its circuit,
    // outside it, is served on.
    w.reload(|_| text.replace("port_range = [1024, 65535]", "port_range = [1024, 1025]"));
    w.wait_log("the [worker] change warned of", |v| {
        v["level"] == "WARN" && v["section"] == "worker"
    });
    assert_eq!(fresh.get("/still", "").status, 200);
    assert!(
        !w.log_text().contains("is outside [worker] port_range"),
        "{}",
        w.log_text()
    );
}

#[test]
fn wildcard_mode_routes_by_host() {
    let a = Upstream::start();
    let b = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![a.addr],
        worker_extra: "frontend_mode = \"wildcard\"\nwildcard_domain = \".apps.test\"\nwildcard_traffic_port = {PORT}".into(),
        circuit_extra: format!(
            "open_to_public = true\nfrontend_mode = \"wildcard\"\nsubdomain = \"alpha\"\n\n[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455550002\"\nfrontend_mode = \"wildcard\"\nsubdomain = \"beta\"\nopen_to_public = true\nroute_info = [{{ session_id = \"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\", kernel_host = \"127.0.0.1\", kernel_port = {} }}]\n",
            b.addr.port()
        ),
        ..Default::default()
    });
    let mut c = Client::connect(w.addr());
    c.send(b"GET /one HTTP/1.1\r\nHost: alpha.apps.test\r\n\r\n");
    assert_eq!(c.response().status, 200);
    c.send(
        format!(
            "GET /two HTTP/1.1\r\nHost: BETA.apps.test:{}\r\n\r\n",
            w.port
        )
        .as_bytes(),
    );
    assert_eq!(c.response().status, 200);
    assert_eq!(a.last().path, "/one");
    assert_eq!(b.last().path, "/two");
    assert_eq!(
        b.last().header("host").map(str::to_owned),
        Some(format!("BETA.apps.test:{}", w.port))
    );
    for host in ["gamma.apps.test", "alpha.elsewhere.test", "apps.test"] {
        c.send(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
        let r = c.response();
        assert_eq!(r.status, 404, "{host}");
        assert_eq!(r.json()["code"], "unknown_circuit");
        assert!(
            !r.text().contains("alpha") && !r.text().contains("beta"),
            "nothing about circuits leaks"
        );
    }
    assert_eq!(a.count() + b.count(), 2);
}

#[test]
fn dead_routes_leave_rotation_and_requests_still_succeed() {
    let up = Upstream::start();
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], appproxy_test_support::free_port()));
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr, dead],
        extra: "[upstream]\nprobe_interval_secs = 0\nunhealthy_secs = 60\n".into(),
        ..Default::default()
    });
    let mut c = Client::connect(w.addr());
    for i in 0..40 {
        // A refused connect is retried on the other route: the client never sees it.
        let r = c.get("/", &format!("X-Backend-Request-ID: health-{i}\r\n"));
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    // With half of the weight on the dead route, three failures come quickly.
    let marked = w.wait_log("unhealthy mark", |v| {
        v["message"] == "upstream marked unhealthy"
    });
    assert_eq!(marked[0]["upstream"], dead.to_string());
    let connect_failures = w
        .log_json()
        .iter()
        .filter(|v| v["message"] == "upstream connect failed")
        .count();
    assert_eq!(
        connect_failures, 3,
        "out of rotation after the third failure"
    );
}

#[test]
fn the_active_probe_brings_a_route_back_as_soon_as_its_app_answers() {
    let up = Upstream::start();
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], appproxy_test_support::free_port()));
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr, dead],
        extra: "[upstream]\nprobe_interval_secs = 1\nunhealthy_secs = 3600\n".into(),
        ..Default::default()
    });
    let mut c = Client::connect(w.addr());
    let mut i = 0;
    while w
        .log_json()
        .iter()
        .all(|v| v["message"] != "upstream marked unhealthy")
    {
        assert!(i < 200, "the dead route was never marked unhealthy");
        let r = c.get("/", "");
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        i += 1;
    }
    // The app comes up on the dead address: the probe (visiting only the circuits
    // reported unhealthy) finds it long before the hour of back-off is over.
    let revived = std::net::TcpListener::bind(dead).expect("bind the dead address");
    let back = w.wait_log("back in rotation", |v| {
        v["message"] == "upstream answers the probe again: back in rotation"
    });
    assert_eq!(back[0]["upstream"], dead.to_string());
    drop(revived);
}

#[test]
fn request_ids_can_be_turned_off_for_measurement() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra: "request_ids = false".into(),
        ..Default::default()
    });
    let mut c = Client::connect(w.addr());
    let r = c.get("/off", "X-Backend-Request-ID: client-sent\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-backend-request-id"), None, "no echo");
    assert_eq!(
        up.last().header("x-backend-request-id"),
        None,
        "nothing forwarded"
    );
}

/// Reads from `s` until `needle` shows up (true) or the stream ends (false).
fn read_until(s: &mut std::net::TcpStream, seen: &mut Vec<u8>, needle: &[u8]) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        if seen.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        match s.read_uninterrupted(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// A response stream may pause longer than a client's body may stall
/// (`response_idle_secs` vs `body_idle_secs`); past `response_idle_secs` it is cut.
#[test]
fn a_response_stream_may_pause_longer_than_a_request_body() {
    for (response_idle, survives) in [(30, true), (1, false)] {
        let up = Upstream::start();
        let w = Worker::start(WorkerOpts {
            upstreams: vec![up.addr],
            extra: format!(
                "[timeouts]\nbody_idle_secs = 1\nresponse_idle_secs = {response_idle}\n"
            ),
            ..Default::default()
        });
        let mut s = std::net::TcpStream::connect(w.addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        s.write_all(b"GET /sse HTTP/1.1\r\nHost: t\r\n\r\n")
            .expect("send");
        let mut seen = Vec::new();
        assert!(read_until(&mut s, &mut seen, b"data: first"), "first event");
        // Silent for longer than body_idle_secs.
        std::thread::sleep(Duration::from_millis(2500));
        up.open_gate();
        let second = read_until(&mut s, &mut seen, b"data: second");
        assert_eq!(
            second,
            survives,
            "response_idle_secs = {response_idle}: {}",
            String::from_utf8_lossy(&seen)
        );
    }
}

/// A connection reuses one buffer for its requests' method and path copies: each
/// access line names exactly its own request, whatever the previous one on the
/// connection was (longer, shorter, another method, pipelined behind it), and a
/// target is logged up to 512 bytes.
#[test]
fn access_lines_name_each_request_on_a_reused_connection() {
    let up = Upstream::start();
    let w = worker_for(&up);
    let mut c = Client::connect(w.addr());
    let long = format!("/{}", "l".repeat(700));
    let cases: Vec<(&str, String, String)> = vec![
        ("GET", long.clone(), long[..512].to_owned()),
        ("DELETE", "/s".into(), "/s".into()),
        ("OPTIONS", "/medium/path?q=1".into(), "/medium/path".into()),
        ("GET", "/".into(), "/".into()),
        (
            "PATCH",
            format!("{}?x=y", &long[..300]),
            long[..300].to_owned(),
        ),
        ("PUT", "/p".into(), "/p".into()),
    ];
    for (i, (method, target, _)) in cases.iter().enumerate() {
        let body = if matches!(*method, "PATCH" | "PUT") {
            "Content-Length: 0\r\n"
        } else {
            ""
        };
        c.send(
            format!("{method} {target} HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: reuse-{i}\r\n{body}\r\n")
                .as_bytes(),
        );
        assert_eq!(c.response().status, 200, "{method} {target}");
    }
    // Pipelined: two heads in one write.
    c.send(b"GET /first-of-two HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: piped-1\r\n\r\nHEAD /2 HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: piped-2\r\n\r\n");
    assert_eq!(c.response().status, 200);
    let mut expected: Vec<(String, String, String)> = cases
        .into_iter()
        .enumerate()
        .map(|(i, (m, _, logged))| (format!("reuse-{i}"), m.to_owned(), logged))
        .collect();
    expected.push(("piped-1".into(), "GET".into(), "/first-of-two".into()));
    expected.push(("piped-2".into(), "HEAD".into(), "/2".into()));
    for (id, method, path) in expected {
        let line = w.wait_access_line(&id);
        assert_eq!(line["method"], method.as_str(), "{id}");
        assert_eq!(line["path"], path.as_str(), "{id}");
    }
}

/// The field lists of request and response heads are recycled from one exchange to
/// the next on a connection: a head with many fields followed by one with few must
/// leave nothing of the first in the second, either way, interim heads included.
#[test]
fn each_head_on_a_reused_connection_carries_only_its_own_fields() {
    use std::io::{BufRead, BufReader, Read};
    let app = std::net::TcpListener::bind("127.0.0.1:0").expect("bind app");
    let app_addr = app.local_addr().expect("app addr");
    // One keep-alive app connection: the first answer has 40 fields of its own and
    // an interim head with 20 before it, the second has none of them.
    let served = std::thread::spawn(move || {
        let (s, _) = app.accept().expect("accept");
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut w = s;
        let mut heads = Vec::new();
        for round in 0..2 {
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).expect("read") == 0 {
                    return heads;
                }
                if line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            heads.push(head);
            let mut out = String::new();
            if round == 0 {
                out.push_str("HTTP/1.1 103 Early Hints\r\n");
                for i in 0..20 {
                    out.push_str(&format!("Link: </hint-{i}>; rel=preload\r\n"));
                }
                out.push_str("\r\nHTTP/1.1 200 OK\r\n");
                for i in 0..40 {
                    out.push_str(&format!("X-First-{i}: first\r\n"));
                }
            } else {
                out.push_str("HTTP/1.1 200 OK\r\n");
            }
            out.push_str("Content-Length: 2\r\n\r\nok");
            w.write_all(out.as_bytes()).expect("answer");
        }
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest);
        heads
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app_addr],
        ..Default::default()
    });
    let mut c = Client::connect(w.addr());
    let mut first = String::from("GET /one HTTP/1.1\r\nHost: t\r\n");
    for i in 0..40 {
        first.push_str(&format!("X-Req-{i}: from-the-first\r\n"));
    }
    first.push_str("\r\n");
    c.send(first.as_bytes());
    let (status, fields) = c.head();
    assert_eq!(status, 103);
    let links = fields
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("link"));
    assert_eq!(links.count(), 20);
    let one = c.response();
    assert_eq!(one.status, 200);
    assert_eq!(one.headers_named("x-first-39"), vec!["first"]);
    c.send(b"GET /two HTTP/1.1\r\nHost: t\r\n\r\n");
    let two = c.response();
    assert_eq!(two.status, 200);
    assert_eq!(two.text(), "ok");
    let stale: Vec<_> = two
        .headers
        .iter()
        .filter(|(n, _)| {
            n.to_ascii_lowercase().starts_with("x-first") || n.eq_ignore_ascii_case("link")
        })
        .collect();
    assert!(
        stale.is_empty(),
        "the first answer's fields in the second: {stale:?}"
    );
    drop(c);
    drop(w);
    let heads = served.join().expect("app");
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert_eq!(
        heads[0].matches("from-the-first").count(),
        40,
        "{}",
        heads[0]
    );
    assert!(heads[1].starts_with("GET /two "), "{}", heads[1]);
    assert!(
        !heads[1].contains("from-the-first") && !heads[1].contains("X-Req-"),
        "the first request's fields in the second: {}",
        heads[1]
    );
}

/// An answer the app cuts part way (it closes 5,000 bytes into a body of 100,000)
/// is logged as what it was, over HTTP/1.1 and HTTP/2: the app's status and the
/// bytes that went to the client, not as an answer that never started (status 0,
/// nothing out), and the bytes are counted.
#[test]
fn an_answer_cut_part_way_is_logged_with_its_status_and_the_bytes_that_went() {
    use std::io::{BufRead, BufReader, Read};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind app");
    let app = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut r = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 && !line.ends_with("\r\n\r\n") {}
            let mut s = stream;
            let mut answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
            answer.resize(answer.len() + 5000, b'c');
            let _ = s.write_all(&answer);
        }
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        ..Default::default()
    });
    let mut s = std::net::TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(b"GET /cut HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: cut-1\r\n\r\n")
        .expect("send");
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("read to the close");
    let body = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| got.len() - at - 4)
        .expect("a head");
    assert_eq!(body, 5000, "what the app sent reached the client");
    let access = w.wait_access_line("cut-1");
    assert_eq!(access["status"], 200, "{access}");
    assert_eq!(access["bytes_out"], got.len() as u64, "{access}");
    assert_eq!(access["upstream"], app.to_string(), "{access}");
    assert_eq!(
        common::metric(&w, "appproxy_bytes_out_total"),
        got.len() as u64
    );

    // An HTTP/2 client's stream (h2c): reset at the cut, the access line the same
    // (an HTTP/2 line counts the body's bytes).
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
        ])
        .args(["-H", "X-Backend-Request-ID: cut-2"])
        .arg(format!("http://127.0.0.1:{}/cut", w.port))
        .output()
        .expect("curl must be installed (.ci/run installs it)");
    assert!(!out.status.success(), "the stream is reset, not ended");
    let access = w.wait_access_line("cut-2");
    assert_eq!(access["status"], 200, "{access}");
    assert_eq!(access["bytes_out"], 5000, "{access}");
    assert_eq!(access["upstream"], app.to_string(), "{access}");
}

/// A 502 or 504 of the worker's own, after it went to an app, names that app in
/// its access line and counts the request body bytes the app was given, as nginx's
/// `$upstream_addr` does: over HTTP/1.1 and HTTP/2, to HTTP/1.1 and HTTP/2 apps.
/// Before, such a line named no app and counted the request head alone (HTTP/2:
/// nothing), and an operator could not tell which app failed.
#[test]
fn a_failed_exchanges_access_line_names_the_app_and_what_it_was_given() {
    use std::io::{BufRead, BufReader, Read};
    // Reads a request head and its `Content-Length` body, then closes without a word
    // (`/close`) or stays silent past the head timeout (`/silent`).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind app");
    let app = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = BufReader::new(stream);
                let (mut first, mut length) = (String::new(), 0usize);
                if r.read_line(&mut first).unwrap_or(0) == 0 {
                    return;
                }
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; length];
                if r.read_exact(&mut body).is_err() {
                    return;
                }
                if first.contains("/silent") {
                    std::thread::sleep(Duration::from_secs(5));
                }
            });
        }
    });
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], appproxy_test_support::free_port()));
    let start = |to: std::net::SocketAddr, circuit_extra: &str| {
        Worker::start(WorkerOpts {
            upstreams: vec![to],
            circuit_extra: circuit_extra.into(),
            extra: "[timeouts]\nupstream_head_secs = 1\n".into(),
            ..Default::default()
        })
    };
    let body = vec![b'b'; 1000];
    // HTTP/1.1 client, HTTP/1.1 app: (request ID, path, expected status).
    let w = start(app, "");
    for (id, path, status) in [("closed-1", "/close", 502), ("silent-1", "/silent", 504)] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: {id}\r\nContent-Length: 1000\r\n\r\n"
        );
        let mut c = Client::connect(w.addr());
        c.send(&[head.as_bytes(), &body].concat());
        assert_eq!(c.response().status, status, "{id}");
        let access = w.wait_access_line(id);
        assert_eq!(access["status"], status, "{access}");
        assert_eq!(access["upstream"], app.to_string(), "{access}");
        assert_eq!(access["bytes_in"], (head.len() + 1000) as u64, "{access}");
    }
    // HTTP/2 client (h2c), HTTP/1.1 app: an HTTP/2 line counts the body alone.
    for (id, path, status) in [("closed-2", "/close", 502), ("silent-2", "/silent", 504)] {
        assert_eq!(h2_post_of(&w, id, path, &body), status.to_string(), "{id}");
        let access = w.wait_access_line(id);
        assert_eq!(access["status"], status, "{access}");
        assert_eq!(access["upstream"], app.to_string(), "{access}");
        assert_eq!(access["bytes_in"], 1000, "{access}");
    }
    drop(w);
    // A body past `max_body` to an HTTP/2 app (silent; the window it grants is
    // the default): counted up to what the app's stream took, never past the limit.
    let h2_app = std::net::TcpListener::bind("127.0.0.1:0").expect("bind h2 app");
    let h2_addr = h2_app.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in h2_app.incoming().flatten() {
            std::thread::spawn(move || {
                appproxy_test_support::h2frames::serve_raw_app(s, |_| Vec::new())
            });
        }
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![h2_addr],
        circuit_extra: "protocol = \"http2\"".into(),
        extra: "[limits]\nmax_body = 5000\n".into(),
        ..Default::default()
    });
    let head = "POST /big HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: big-1\r\nTransfer-Encoding: chunked\r\n\r\n";
    let chunk = [b"bb8\r\n".as_slice(), &[b'c'; 3000], b"\r\n"].concat();
    let mut c = Client::connect(w.addr());
    c.send(&[head.as_bytes(), &chunk, &chunk, b"0\r\n\r\n"].concat());
    assert_eq!(c.response().status, 413);
    let access = w.wait_access_line("big-1");
    assert_eq!(access["upstream"], h2_addr.to_string(), "{access}");
    assert_eq!(access["bytes_in"], (head.len() + 3000) as u64, "{access}");
    // What curl reports varies: curl 7.88 may fail a stream its server answers
    // while it still uploads. The worker's line is what is checked.
    let _ = h2_post_of(&w, "big-2", "/big", &[b'd'; 6000]);
    let access = w.wait_access_line("big-2");
    assert!(
        access["bytes_in"].as_u64().is_some_and(|n| n <= 5000),
        "{access}"
    );
    drop(w);
    // An app nobody listens on, HTTP/1.1 and HTTP/2 clients: the app tried is named.
    for extra in ["", "protocol = \"http2\""] {
        let w = start(dead, extra);
        let mut c = Client::connect(w.addr());
        let r = c.get("/x", "X-Backend-Request-ID: dead-1\r\n");
        assert_eq!(r.status, 502, "{extra}");
        // Its line is checked (curl may fail a stream answered mid-upload).
        let _ = h2_post_of(&w, "dead-2", "/x", &body);
        for id in ["dead-1", "dead-2"] {
            let access = w.wait_access_line(id);
            assert_eq!(access["status"], 502, "{extra}: {access}");
            assert_eq!(access["upstream"], dead.to_string(), "{extra}: {access}");
        }
    }
}

/// The status curl got for an h2c (prior knowledge) POST of `body` to `path` on
/// `w`, under the request ID `id`.
fn h2_post_of(w: &Worker, id: &str, path: &str, body: &[u8]) -> String {
    let file = tempfile::NamedTempFile::new().expect("body file");
    std::fs::write(file.path(), body).expect("write body");
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "30", "--http2-prior-knowledge"])
        .args(["-o", "/dev/null", "-w", "%{http_code}"])
        .args(["-H", &format!("X-Backend-Request-ID: {id}")])
        .args(["--data-binary", &format!("@{}", file.path().display())])
        .arg(format!("http://127.0.0.1:{}{path}", w.port))
        .output()
        .expect("curl must be installed (.ci/run installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The worker's own answers to a `HEAD` have no content (RFC 9110 §9.3.2), as the
/// app's have: a refused `HEAD` (here by the client-address allowlist, the
/// refusal every check shares) is its head alone, `Content-Length` naming the JSON
/// a `GET` gets, and a request pipelined behind it is answered in step. Before,
/// the JSON body followed the head, and the client read it as the start of its
/// next answer.
#[test]
fn a_refused_head_request_gets_no_body() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        circuit_extra: "allowed_client_ips = [\"10.1.2.0/24\"]".into(),
        ..Default::default()
    });
    for version in ["HTTP/1.1", "HTTP/1.0"] {
        let mut c = Client::connect(w.addr());
        c.send(
            format!(
                "HEAD /a {version}\r\nHost: t\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.1\r\nHost: t\r\n\r\n"
            )
            .as_bytes(),
        );
        let head = c.response_to("HEAD");
        assert_eq!(head.status, 403, "{version}");
        assert!(head.body.is_empty(), "{version}");
        let length: usize = head
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .expect("the length a GET would get");
        // The HTTP/1.0 client's connection goes on, and its answer says so (the
        // HTTP/1.1 GET's does not need to).
        let told = if version == "HTTP/1.0" {
            assert_eq!(head.header("connection"), Some("keep-alive"), "{version}");
            "Connection: keep-alive\r\n".len() as u64
        } else {
            0
        };
        let get = c.response();
        assert_eq!(get.status, 403, "{version}: the next answer, in step");
        assert_eq!(get.body.len(), length, "{version}");
        assert_eq!(get.json()["code"], "forbidden", "{version}");
        assert_eq!(
            w.wait_access_line(head.header("x-backend-request-id").expect("id"))["bytes_out"]
                .as_u64(),
            Some(
                w.wait_access_line(get.header("x-backend-request-id").expect("id"))["bytes_out"]
                    .as_u64()
                    .expect("bytes")
                    - length as u64
                    + told
            ),
            "{version}: the HEAD's line counts its head alone"
        );
    }
    // A `HEAD` whose head is refused (here a field name with a space, 400): its
    // head alone, then the close.
    // So with empty lines before it, which the parser skips (a verifier's find).
    for raw in [
        &b"HEAD /a HTTP/1.1\r\nHost: t\r\nBad Field: x\r\n\r\n"[..],
        b"\r\n\r\nHEAD /a HTTP/1.1\r\nHost: t\r\nBad Field: x\r\n\r\n",
    ] {
        let mut c = Client::connect(w.addr());
        c.send(raw);
        let head = c.response_to("HEAD");
        assert_eq!(head.status, 400);
        assert!(head.header("content-length").is_some());
        assert!(c.is_closed(), "no body follows the head");
    }
    assert_eq!(up.count(), 0, "nothing reached the app");
}
