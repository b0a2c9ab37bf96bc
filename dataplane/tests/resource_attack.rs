//! Resource exhaustion through raw TCP circuits: a TCP circuit's upstream connect that
//! fails because the worker ran out of descriptors (`EMFILE`, under a real, lowered
//! `RLIMIT_NOFILE`) is the proxy's own failure, counted and logged as such, and never
//! held against the app's health; once descriptors are back, the same app is used.
//! And the admin endpoint, which answers one request at a time, cannot be held by a
//! client that trickles its request head, or takes its answer a few bytes at a time:
//! `/health` keeps answering. And a log file at its size limit loses lines, never the
//! worker.

mod common;

use appproxy_test_support::net::ReadUninterrupted;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{
    eventually, log_count, metric, open_fds, set_nofile, Client, Upstream, Worker, WorkerOpts,
};

/// An echo app: one thread per connection.
fn echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read_uninterrupted(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A relayed TCP connection through the worker: one byte goes to the app and back.
fn relayed(w: &Worker) -> Option<TcpStream> {
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"x").ok()?;
    let mut b = [0u8; 1];
    match s.read_uninterrupted(&mut b) {
        Ok(1) if b == *b"x" => Some(s),
        _ => None,
    }
}

#[test]
fn tcp_circuit_out_of_descriptors_is_a_local_failure_never_the_apps() {
    let app = echo_app();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        circuit_extra: "protocol = \"tcp\"".into(),
        extra: "[limits]\nmax_connections_per_core = 100000\n".into(),
        ..Default::default()
    });
    let pid = w.pid();
    // At rest: the readiness probe's connection relayed and closed.
    common::resting_fds(&w);
    // Lower the limit to a little above what the worker uses, leaving an odd number
    // of descriptors free for the cores (the admin thread's pending accept holds one
    // that /proc does not list): relayed connections take two each, and the last one
    // is left for a client whose app connection then cannot be opened.
    let (used, max) = open_fds(pid);
    let mut limit = max + 1 + 20;
    if (limit - used - 1) % 2 == 0 {
        limit += 1;
    }
    set_nofile(pid, limit);
    let mut held = Vec::new();
    loop {
        let (used, _) = open_fds(pid);
        let free = limit - used - 1;
        if free < 3 {
            assert_eq!(free, 1, "one descriptor left for the failing clients");
            break;
        }
        held.push(relayed(&w).expect("relayed while descriptors last"));
    }
    // One descriptor left: each client is accepted, its app connection fails with
    // EMFILE, and it is closed. More times than the failure threshold (3).
    for _ in 0..5 {
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = s.write_all(b"x");
        let mut rest = Vec::new();
        // End of stream or a reset: either way, nothing was relayed.
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "nothing relayed without an app connection");
    }
    eventually("the local failures are counted in /metrics", || {
        metric(&w, "appproxy_local_resource_errors_total") == 5
    });
    assert_eq!(
        log_count(&w, "upstream marked unhealthy"),
        0,
        "a local EMFILE is not the app's failure"
    );
    // Descriptors back: the same app is used at once.
    drop(held);
    eventually("the app is relayed to again", || relayed(&w).is_some());
    w.wait_log("end of the local failures", |v| {
        v["message"] == "upstream connects work again after local resource failures"
    });
    assert_eq!(log_count(&w, "upstream marked unhealthy"), 0);
    assert_eq!(
        log_count(&w, "upstream answers the probe again: back in rotation"),
        0,
        "the app was never out of rotation"
    );
}

#[test]
fn a_client_trickling_its_head_to_the_admin_endpoint_does_not_hold_health() {
    let w = Worker::start(WorkerOpts::default());
    // The trickler: a request line that never ends, one byte every 200 ms (each read
    // of the admin thread gets something well inside its per-read timeout), for up
    // to a minute or until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let admin = w.admin;
    let trickler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(admin).expect("connect admin");
            let _ = s.write_all(b"GET /health?");
            let until = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
                if s.write_all(b"a").is_err() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            false
        })
    };
    // Let the admin thread take the trickler first.
    std::thread::sleep(Duration::from_millis(500));
    let r = w.admin_get("/health");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "ok");
    let _ = trickler.join();
}

/// A scraper that takes `/metrics` a KiB at a time, four times a second: a tiny
/// receive window and a small segment size, so that each of the admin thread's
/// writes makes a little progress well inside any per-write timeout. The whole answer has a
/// deadline: `/health` answers while the slow reader still reads.
#[test]
fn a_client_reading_its_admin_answer_slowly_does_not_hold_health() {
    // A circuit of many routes (never connected to): a `/metrics` answer of a few
    // hundred KiB, well past what the kernel buffers of both sides hold.
    let w = Worker::start(WorkerOpts {
        upstreams: (0..2000u16)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 20000 + i)))
            .collect(),
        admin_extra: "per_circuit_metrics = true".into(),
        ..Default::default()
    });
    let size = w.admin_get("/metrics").text().len();
    assert!(size > 100_000, "{size}");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let admin = w.admin;
    let (started, reading) = std::sync::mpsc::channel();
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            s.set_recv_buffer_size(1).expect("rcvbuf");
            s.set_tcp_mss(536).expect("mss");
            s.connect(&admin.into()).expect("connect admin");
            let mut s: TcpStream = s.into();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n")
                .expect("request");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut got = 0usize;
            let mut buf = [0u8; 1024];
            let until = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
                match s.read_uninterrupted(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if got == 0 {
                            let _ = started.send(());
                        }
                        got += n;
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            got
        })
    };
    reading
        .recv_timeout(Duration::from_secs(20))
        .expect("the slow reader gets the start of its answer");
    let r = w.admin_get("/health");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "ok");
    let got = reader.join().expect("reader");
    assert!(
        got < size,
        "the slow reader was cut before its whole answer ({got} of {size} bytes)"
    );
}

/// Many silent connections from one address: it holds at most half the admin
/// endpoint's slots (its further connections are closed unserved at once), and
/// `/health` asked from another address is answered while its admitted silent
/// connections are all still open and unanswered. Before, 16 silent connections
/// from anywhere held every slot until their head deadline, and an orchestrator's
/// health check behind them waited or failed.
#[test]
fn one_address_cannot_take_every_admin_slot() {
    const SILENT: usize = 40;
    let w = Worker::start(WorkerOpts::default());
    // From an address nothing else uses (the harness's own probes come from
    // 127.0.0.1 and may still hold a slot or two).
    let from = std::net::Ipv4Addr::new(127, 0, 0, 3);
    let silent: Vec<common::Client> = (0..SILENT)
        .map(|_| common::Client::connect_from(from, w.admin))
        .collect();
    // Each is seen by the accept thread (admitted, or closed unserved) before the
    // health check connects, so the check is never simply first in line.
    let state = |c: &common::Client| {
        c.stream.set_nonblocking(true).expect("nonblocking");
        let mut b = [0u8; 1];
        c.stream.peek(&mut b).map_err(|e| e.kind())
    };
    eventually(
        "the connections past the address's share are closed",
        || {
            silent
                .iter()
                .filter(|s| state(s) != Err(std::io::ErrorKind::WouldBlock))
                .count()
                >= SILENT - 16
        },
    );
    let mut c = common::Client::connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), w.admin);
    c.send(b"GET /health HTTP/1.1\r\nHost: admin\r\n\r\n");
    let r = c.response();
    assert_eq!(r.status, 200, "{}", r.text());
    let waiting = silent
        .iter()
        .filter(|s| state(s) == Err(std::io::ErrorKind::WouldBlock))
        .count();
    // Half the 32 slots, less any the harness's probes still held when the address
    // reached half: the rest were closed at once. Without the rule, the check waits
    // for the first silent ones to be cut at their deadline, and only the later ones
    // (8 here) are still waiting when it is answered.
    assert!(
        (12..=16).contains(&waiting),
        "the address's half was still waiting, unanswered, when /health answered: {waiting}"
    );
}

/// Silent clients of the admin endpoint (connected, sending nothing) are each cut at
/// the head deadline, but `/health` does not wait behind them: it is answered while
/// they are all still open and unanswered.
#[test]
fn silent_admin_clients_do_not_queue_health_behind_them() {
    let w = Worker::start(WorkerOpts::default());
    let silent: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(w.admin).expect("connect admin"))
        .collect();
    let r = w.admin_get("/health");
    assert_eq!(r.status, 200, "{}", r.text());
    for (i, s) in silent.iter().enumerate() {
        s.set_nonblocking(true).expect("nonblocking");
        let mut b = [0u8; 1];
        let state = s.peek(&mut b);
        assert!(
            matches!(&state, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "silent client {i} was still waiting when /health answered: {state:?}"
        );
    }
}

/// Runs a second worker whose one circuit listens on `port` (its admin endpoint on
/// a port of its own): its exit status and output, or `None` when it was still
/// running after 20 s (then it is stopped).
fn second_worker_on(port: u16) -> Option<(std::process::ExitStatus, String)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        r#"
[worker]
cores = 1
bind_host = "127.0.0.1"
port_range = [1024, 65535]

[admin]
bind = "127.0.0.1:0"

[[circuits]]
id = "c0a8f5d2-9999-4222-8333-444455556666"
app = "other"
port = {port}
open_to_public = true
route_info = [{{ session_id = "6d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b", kernel_host = "127.0.0.1", kernel_port = 9, traffic_ratio = 1.0 }}]
"#
    );
    let path = dir.path().join("worker.toml");
    std::fs::write(&path, config).expect("write config");
    let log = dir.path().join("worker.log");
    let out = std::fs::File::create(&log).expect("log file");
    let err = out.try_clone().expect("log file");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_appproxy-worker"))
        .arg("--config")
        .arg(&path)
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start worker");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some((status, std::fs::read_to_string(&log).unwrap_or_default()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A circuit's port is this worker's alone. Every listener has `SO_REUSEPORT` (one
/// per core, the kernel spreading connections over them), which lets any other
/// socket of the same user with the option join the port and take a share of its
/// new connections: a second worker on the host (two workers' ranges overlapping,
/// or a standalone one) silently took some of a circuit's clients to its own
/// circuit, another user's app. A worker now refuses a port another socket holds
/// (here: a process listening with `SO_REUSEPORT`, and a running worker with two
/// cores), and the first worker keeps every connection. A range that overlaps the
/// kernel's ports for outgoing connections is warned of at start.
#[test]
fn a_port_another_process_listens_on_is_never_shared() {
    // A listener of another process, with SO_REUSEPORT as a worker's would have.
    let holder = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .expect("socket");
    holder.set_reuse_address(true).expect("reuseaddr");
    holder.set_reuse_port(true).expect("reuseport");
    holder
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    holder.listen(16).expect("listen");
    let held = holder
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet")
        .port();
    let (status, log) = second_worker_on(held).expect("the worker kept the held port");
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!("cannot listen on 127.0.0.1:{held}")),
        "{log}"
    );
    drop(holder);

    // A running worker, two cores on its circuit's port.
    let app = echo_app();
    let first = Worker::start(WorkerOpts {
        upstreams: vec![app],
        cores: 2,
        circuit_extra: "protocol = \"tcp\"".into(),
        ..Default::default()
    });
    let (status, log) = second_worker_on(first.port).expect("the second worker shared the port");
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!("cannot listen on 127.0.0.1:{}", first.port)),
        "{log}"
    );
    // Every new connection still reaches the first worker's circuit.
    for _ in 0..20 {
        assert!(relayed(&first).is_some());
    }
    // Its range (the test's 1024-65535) holds ports the kernel may give the
    // host's own connections as their local port, which would keep a circuit from
    // listening there: it says so at start.
    if std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports")
        .is_ok_and(|r| r.trim().is_empty())
    {
        let log = first.log_text();
        assert!(
            log.contains("kernel's range for outgoing connections' local ports")
                && log.contains("\"ports\":\"[worker] port_range\""),
            "{log}"
        );
    }
}

/// A worker whose log goes to a file it may not grow past `RLIMIT_FSIZE` (a unit's
/// `LimitFSIZE`, a stdout redirected to a size-limited file) died at the limit, from
/// `SIGXFSZ`, with every connection it held. It now loses the lines that do not fit
/// (counted) and goes on answering, on the same client connection.
#[test]
fn a_log_file_at_its_size_limit_loses_lines_not_the_worker() {
    let app = Upstream::start();
    let mut w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        ..Default::default()
    });
    let log_len = |w: &Worker| std::fs::metadata(&w.log).expect("the log").len();
    let limit = log_len(&w) + 8192;
    rustix::process::prlimit(
        rustix::process::Pid::from_raw(w.pid() as i32),
        rustix::process::Resource::Fsize,
        rustix::process::Rlimit {
            current: Some(limit),
            maximum: Some(limit),
        },
    )
    .expect("prlimit on the worker");
    // Requests until the log is full, then as many again.
    let mut client = Client::connect(w.addr());
    let mut past_the_limit = 0;
    for i in 0..20_000 {
        let r = client.get(&format!("/r{i}"), "");
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        if log_len(&w) >= limit {
            past_the_limit += 1;
            if past_the_limit == 200 {
                break;
            }
        }
    }
    assert_eq!(past_the_limit, 200, "the log never reached its limit");
    assert_eq!(log_len(&w), limit, "the log grew past its limit");
    assert!(
        w.child
            .as_mut()
            .expect("the worker")
            .try_wait()
            .expect("wait")
            .is_none(),
        "the worker died at the limit"
    );
    let metrics = w.admin_get("/metrics").text();
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("appproxy_log_lines_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no dropped-lines count:\n{metrics}"));
    assert!(dropped > 0, "the lost lines are counted");
    assert_eq!(client.get("/after", "").status, 200);
}
