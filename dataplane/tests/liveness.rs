//! Liveness of the worker's cores: no core sleeps while work waits for it.
//!
//! - the glommio hazard behind the stalled cores, reproduced on demand: an executor
//!   whose preemption timer has fired when the scheduler looks parks in its ring with
//!   a runnable task, and only a foreign wake (the watchdog's kick) gets it going —
//!   which is why the worker runs glommio with a preemption timer that never fires;
//! - bursts of connections, WebSocket sessions and idle gaps against a 1-core worker,
//!   with and without a CPU hog on its core: after every burst a fresh request is
//!   answered, `/health` stays ok and the watchdog never had to kick a core;
//! - `SIGTERM` ends the worker, in a loop, with traffic and idle connections;
//! - each core's thread runs with the scheduler slice it is configured to ask for;
//! - a stdout nobody reads (a stalled log collector), or one closed, never stalls
//!   the cores.

mod common;

use appproxy_test_support::net::Uninterrupted;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::{Duration, Instant};

/// Where this process's thread named `name` sleeps in the kernel (its `wchan`).
fn wchan(name: &str) -> String {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return String::new();
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            return std::fs::read_to_string(task.path().join("wchan")).unwrap_or_default();
        }
    }
    String::new()
}

/// One executor shaped like a worker core (a task that is never `Pending` without
/// waking itself, plus a parked kick task), with a preemption timer so short that it
/// has often fired by the time the scheduler checks it: the state a loaded machine
/// produces now and then with a timer of any length (the worker used 10 ms).
struct Hazard {
    turns: Arc<AtomicU64>,
    kick: Arc<Mutex<Option<Waker>>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
    name: String,
}

impl Hazard {
    fn start(n: usize) -> Self {
        let turns = Arc::new(AtomicU64::new(0));
        let kick: Arc<Mutex<Option<Waker>>> = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let name = format!("glommio-hazard{n}");
        let thread = {
            let (turns, kick, stop) = (turns.clone(), kick.clone(), stop.clone());
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                        .preempt_timer(Duration::from_micros(50))
                        .make()
                        .expect("executor");
                    ex.run(async move {
                        let k = kick.clone();
                        glommio::spawn_local(std::future::poll_fn(move |cx| {
                            *k.lock().unwrap() = Some(cx.waker().clone());
                            std::task::Poll::<()>::Pending
                        }))
                        .detach();
                        while !stop.load(Ordering::Relaxed) {
                            turns.fetch_add(1, Ordering::Relaxed);
                            futures_lite::future::yield_now().await;
                        }
                    });
                })
                .expect("thread")
        };
        Self {
            turns,
            kick,
            stop,
            thread,
            name,
        }
    }

    /// Waits until the thread sleeps in glommio's ring while its task is runnable
    /// (no turn across 100 ms); returns the turns made by then.
    fn wait_asleep_in_ring(&self, within: Duration) -> Option<u64> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let before = self.turns.load(Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(100));
            if self.turns.load(Ordering::Relaxed) == before
                && wchan(&self.name).contains("io_cqring_wait")
            {
                return Some(before);
            }
        }
        None
    }

    fn kick(&self) -> bool {
        match self.kick.lock().unwrap().as_ref() {
            Some(w) => {
                w.wake_by_ref();
                true
            }
            None => false,
        }
    }
}

#[test]
fn glommio_parks_with_a_runnable_task_once_its_preemption_timer_fired() {
    // An executor may fall asleep before its kick task ever ran (then nothing can wake
    // it: that is the hazard too, but the test needs the kick); such a one is left
    // asleep and another started.
    let mut woke_by_itself = 0;
    for attempt in 0..20 {
        let h = Hazard::start(attempt);
        let Some(before) = h.wait_asleep_in_ring(Duration::from_secs(20)) else {
            panic!("the executor never parked with its task runnable");
        };
        if before == 0 || h.kick.lock().unwrap().is_none() {
            h.stop.store(true, Ordering::Relaxed);
            continue;
        }
        // Still asleep a while later: nothing but a kick wakes it. A stop and
        // continue of the test process (a machine freezing the test's sandbox) also
        // ends the ring's wait; such an attempt shows nothing, and another is made.
        std::thread::sleep(Duration::from_millis(300));
        if h.turns.load(Ordering::Relaxed) != before {
            woke_by_itself += 1;
            h.stop.store(true, Ordering::Relaxed);
            continue;
        }
        // The watchdog's kick: a foreign wake of a task parked on the executor. The
        // executor may fall asleep again at once; each kick gets it further.
        let deadline = Instant::now() + Duration::from_secs(10);
        while h.turns.load(Ordering::Relaxed) == before {
            assert!(h.kick(), "kick waker");
            assert!(
                Instant::now() < deadline,
                "the kick did not wake the executor"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        h.stop.store(true, Ordering::Relaxed);
        while !h.thread.is_finished() {
            assert!(h.kick(), "kick waker");
            assert!(
                Instant::now() < deadline,
                "the kick did not wake the executor"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        h.thread.join().expect("executor thread");
        return;
    }
    panic!(
        "no executor stayed asleep with its task runnable: {woke_by_itself} of 20 woke up by themselves, the others fell asleep before their kick task ran"
    );
}

/// A busy loop pinned to one CPU, until dropped.
struct CpuHog {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CpuHog {
    fn on(cpu: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            // Building an executor with a fixed placement pins this thread.
            let _pin = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(cpu))
                .make()
                .expect("pinned executor");
            let mut x = 0u64;
            while !s.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One WebSocket session through the worker: `messages` echoes, then a close.
fn ws_session(port: u16, messages: usize) {
    use tungstenite::client::IntoClientRequest;
    use tungstenite::Message;
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let req = format!("ws://127.0.0.1:{port}/ws")
        .into_client_request()
        .expect("request");
    let (mut ws, _) = tungstenite::client(req, Uninterrupted(stream)).expect("handshake");
    for i in 0..messages {
        ws.send(Message::Text(format!("m{i}").into()))
            .expect("send");
        loop {
            match ws.read().expect("echo") {
                Message::Text(t) => {
                    assert_eq!(t.as_str(), format!("m{i}"));
                    break;
                }
                _ => continue,
            }
        }
    }
    let _ = ws.close(None);
    while ws.read().is_ok() {}
}

/// Bursts of keep-alive requests, WebSocket sessions, connections opened and closed
/// without a request, then an idle gap; after every burst a fresh request must be
/// answered (a stalled core would leave it in the listen backlog).
fn bursts_and_idle_gaps(hog: bool) {
    let up = common::Upstream::start();
    let app = common::ws::echo_app();
    let ws_port = common::free_port();
    let w = common::Worker::start(common::WorkerOpts {
        upstreams: vec![up.addr],
        extra: format!(
            r#"[[circuits]]
id = "c0a8f5d2-1111-4222-8333-777788889999"
app = "ws"
port = {ws_port}
open_to_public = true
route_info = [{{ session_id = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b", kernel_host = "127.0.0.1", kernel_port = {}, traffic_ratio = 1.0 }}]
"#,
            app.addr.port()
        ),
        ..Default::default()
    });
    let _hog = hog.then(|| CpuHog::on(0));
    let addr = w.addr();
    for round in 0..25u64 {
        let mut threads = Vec::new();
        for t in 0..12 {
            threads.push(std::thread::spawn(move || {
                let mut c = common::Client::connect(addr);
                for i in 0..(4 + t % 5) {
                    let r = c.get(&format!("/burst/{round}/{t}/{i}"), "");
                    assert_eq!(r.status, 200);
                }
            }));
        }
        for _ in 0..3 {
            threads.push(std::thread::spawn(move || ws_session(ws_port, 5)));
        }
        for _ in 0..6 {
            // Accepted, then closed with nothing sent.
            drop(std::net::TcpStream::connect(addr).expect("connect"));
        }
        for t in threads {
            t.join().expect("burst client");
        }
        // An idle gap long enough for the core to park.
        std::thread::sleep(Duration::from_millis(20 + (round * 37) % 280));
        let mut fresh = common::Client::connect(addr);
        let r = fresh.get(&format!("/fresh/{round}"), "Connection: close\r\n");
        assert_eq!(r.status, 200, "round {round}");
    }
    let health = w.admin_get("/health");
    assert_eq!(health.status, 200, "{}", health.text());
    let metrics = w.admin_get("/metrics").text();
    assert!(
        metrics.contains("\nappproxy_core_stalls_total 0\n"),
        "the watchdog had to kick a core:\n{metrics}"
    );
}

#[test]
fn bursts_and_idle_gaps_never_stall_a_core() {
    bursts_and_idle_gaps(false);
}

#[test]
fn bursts_and_idle_gaps_never_stall_a_core_sharing_its_cpu_with_a_hog() {
    bursts_and_idle_gaps(true);
}

#[test]
fn sigterm_ends_the_worker_every_time() {
    let up = common::Upstream::start();
    for round in 0..8 {
        let mut w = common::Worker::start(common::WorkerOpts {
            cores: 1 + round % 2,
            upstreams: vec![up.addr],
            extra: "[timeouts]\ndrain_secs = 2\n".into(),
            ..Default::default()
        });
        // Traffic, an idle keep-alive connection and an idle gap before the signal.
        let mut idle = common::Client::connect(w.addr());
        assert_eq!(idle.get("/a", "").status, 200);
        std::thread::sleep(Duration::from_millis(50 * round as u64));
        let started = Instant::now();
        let status = w.terminate();
        assert!(
            status.success(),
            "round {round}: {status:?}\n{}",
            w.log_text()
        );
        // drain_secs plus the stop margins (2 s, then 2 s after a kick); the
        // terminate helper itself gives up after 30 s.
        assert!(
            started.elapsed() < Duration::from_secs(2 + 4 + 2),
            "round {round}: took {:?}",
            started.elapsed()
        );
        assert!(
            idle.is_closed(),
            "the idle connection was closed by the drain"
        );
    }
}

/// Every spin budget starts every core. With a budget of 0 the reactor's first turn
/// parked inside the spawn of its own task, before the core had reported ready, so
/// a worker of two cores never came up.
#[test]
fn a_worker_starts_and_serves_whatever_its_spin_budget() {
    let up = common::Upstream::start();
    for spin in [0, 1, 32] {
        let mut w = common::Worker::start(common::WorkerOpts {
            cores: 2,
            upstreams: vec![up.addr],
            extra: format!("[reactor]\nspin_polls = {spin}\n"),
            ..Default::default()
        });
        for _ in 0..4 {
            let mut c = common::Client::connect(w.addr());
            assert_eq!(c.get("/a", "").status, 200, "spin_polls = {spin}");
        }
        let status = w.terminate();
        assert!(
            status.success(),
            "spin_polls = {spin}: {status:?}\n{}",
            w.log_text()
        );
    }
}

/// Each core's thread runs with the slice `[reactor] sched_slice_us` asks for (the
/// default, another value, and 0 for the kernel's own), read back from the kernel for
/// every `appproxy-core-N` thread of the running worker. On a kernel without custom slices
/// (before 6.12) the threads must report none and the worker must say so.
#[test]
fn each_core_runs_with_the_scheduler_slice_it_asks_for() {
    let up = common::Upstream::start();
    let kernel_has_slices = appproxy_sys::thread_slice(0)
        .expect("sched_getattr")
        .is_some();
    for (extra, want) in [
        ("", Some(Duration::from_micros(200))),
        (
            "[reactor]\nsched_slice_us = 750\n",
            Some(Duration::from_micros(750)),
        ),
        ("[reactor]\nsched_slice_us = 0\n", None),
    ] {
        let mut w = common::Worker::start(common::WorkerOpts {
            cores: 2,
            upstreams: vec![up.addr],
            extra: extra.into(),
            ..Default::default()
        });
        assert_eq!(common::Client::connect(w.addr()).get("/a", "").status, 200);
        // Each core's executor thread is named `appproxy-core-N`; glommio's blocking
        // thread, which it starts, inherits the name and keeps the kernel's slice.
        let mut slices: std::collections::BTreeMap<String, Vec<Option<Duration>>> =
            Default::default();
        for task in std::fs::read_dir(format!("/proc/{}/task", w.pid())).expect("tasks") {
            let task = task.expect("task").path();
            let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
            if !name.starts_with("appproxy-core-") {
                continue;
            }
            let tid: i32 = task
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse().ok())
                .expect("tid");
            let got = appproxy_sys::thread_slice(tid).expect("the core's sched_getattr");
            slices.entry(name.trim().to_string()).or_default().push(got);
        }
        assert_eq!(slices.len(), 2, "two cores: {slices:?}");
        // The kernel's own slice: what the worker's main thread, which never asks, has.
        let kernel_default =
            appproxy_sys::thread_slice(w.pid() as i32).expect("the main thread's sched_getattr");
        for (name, got) in &slices {
            let expected = if kernel_has_slices { want } else { None };
            let with = got
                .iter()
                .filter(|s| **s == expected.or(kernel_default))
                .count();
            match expected {
                Some(_) => assert_eq!(
                    with, 1,
                    "one thread of {name} with {expected:?} ({extra:?}): {got:?}"
                ),
                None => assert_eq!(
                    with,
                    got.len(),
                    "{name} keeps the kernel's slice ({extra:?}): {got:?}"
                ),
            }
        }
        if !kernel_has_slices && want.is_some() {
            w.wait_log("the kernel's own slice", |v| {
                v.to_string().contains("custom slices need Linux 6.12")
            });
        }
        assert!(w.terminate().success(), "{}", w.log_text());
    }
}

/// A worker whose stdout is a pipe nobody reads (a container's log driver that
/// stalled) goes on serving: its cores hand their access-log batches and log lines to
/// a writer thread instead of writing them, what overflows the writer's queue is
/// dropped and counted, and once the pipe is read again the lines come out whole,
/// with a warning of how many were lost. Before, the core blocked in `write` once the
/// pipe's 64 KiB were full: a few hundred requests, then none.
#[test]
fn a_stdout_nobody_reads_never_stalls_the_cores() {
    use std::io::{BufRead as _, BufReader};
    let up = common::Upstream::start();
    let mut w = PipedWorker::start(&up);
    // Held open and not read until the end.
    let stdout = w.child.stdout.take().expect("stdout");
    // Far more access lines than the pipe (64 KiB) and the writer's queue (8 MiB)
    // hold: every request is still answered.
    w.serve(4, 10_000);
    // A core hands on its last batch of lines when it next wakes: as the clients'
    // connections close, just after. A batch that then meets the full queue is
    // dropped too, so the count is taken once it has settled (before, one batch of
    // 49 lines dropped after it was read made the sum short).
    let mut dropped = w.dropped_lines();
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let now = w.dropped_lines();
        if now == dropped {
            break;
        }
        dropped = now;
    }
    assert!(dropped > 0, "40,000 lines fit 64 KiB and 8 MiB?");
    // Read again, to the end (SIGTERM once the loss was told: the worker writes what
    // it still holds before it exits): the lines come out whole, and the loss is told.
    let (mut access, mut told) = (0u64, false);
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("a line");
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        access += u64::from(v["status"] == 200);
        if !told
            && v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("log lines dropped"))
        {
            told = true;
            let _ = std::process::Command::new("kill")
                .arg(w.child.id().to_string())
                .status();
        }
    }
    assert!(w.child.wait().expect("exit").success());
    assert!(told, "the loss was never told");
    assert_eq!(
        access + dropped,
        40_000,
        "{access} written, {dropped} dropped"
    );
}

/// A worker whose stdout was closed by its reader (each write fails with EPIPE) goes
/// on serving, and counts what it could not write as dropped.
#[test]
fn a_closed_stdout_never_stalls_the_cores() {
    let up = common::Upstream::start();
    let mut w = PipedWorker::start(&up);
    drop(w.child.stdout.take());
    w.serve(2, 500);
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.dropped_lines() < 1_000 {
        assert!(
            Instant::now() < deadline,
            "{} lines counted as dropped",
            w.dropped_lines()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::process::Command::new("kill")
        .arg(w.child.id().to_string())
        .status();
    assert!(w.child.wait().expect("exit").success());
}

/// A one-core worker with its access log on and its stdout a pipe the test holds.
struct PipedWorker {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    admin: u16,
    _dir: tempfile::TempDir,
}

impl PipedWorker {
    fn start(up: &common::Upstream) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (port, admin) = (
            appproxy_test_support::free_port(),
            appproxy_test_support::free_port(),
        );
        let config = dir.path().join("worker.toml");
        std::fs::write(
            &config,
            format!(
                "[worker]\ncores = 1\nbind_host = \"127.0.0.1\"\nport_range = [1024, 65535]\n\
                 [admin]\nbind = \"127.0.0.1:{admin}\"\n[logging]\nformat = \"json\"\nfilter = \"info\"\naccess_log = true\n\
                 [[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455556666\"\napp = \"test\"\nport = {port}\nopen_to_public = true\n\
                 route_info = [{{ session_id = \"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\", kernel_host = \"127.0.0.1\", kernel_port = {} }}]\n",
                up.addr.port()
            ),
        )
        .expect("config");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_appproxy-worker"))
            .arg("--config")
            .arg(&config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start worker");
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "the worker never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            addr,
            admin,
            _dir: dir,
        }
    }

    /// `clients` keep-alive clients, `each` requests each: every one answered 200.
    fn serve(&self, clients: usize, each: usize) {
        let addr = self.addr;
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut c = common::Client::connect(addr);
                    for _ in 0..each {
                        assert_eq!(
                            c.get("/a-path-long-enough-to-fill-lines-sooner", "").status,
                            200
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("every request answered");
        }
    }

    /// `appproxy_log_lines_dropped_total` from the admin endpoint.
    fn dropped_lines(&self) -> u64 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.admin)).expect("admin");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .expect("metrics");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut s, &mut text).expect("metrics");
        text.lines()
            .find_map(|l| l.strip_prefix("appproxy_log_lines_dropped_total "))
            .and_then(|v| v.trim().parse().ok())
            .expect("the dropped-lines counter")
    }
}

/// The safety net, end to end: with glommio's preemption timer brought back (short,
/// so the hazard shows within seconds), cores fall asleep with work waiting; the
/// watchdog sees it, counts it and kicks them, so every request is still answered.
#[test]
fn a_core_asleep_in_glommio_is_seen_counted_and_kicked() {
    let up = common::Upstream::start();
    // In this mode a core can fall asleep in glommio before its kick task ever ran
    // (then nothing but a signal wakes it, and the worker never reports ready): such a
    // start is abandoned (the harness kills it) and another one made.
    let start = || {
        common::Worker::start(common::WorkerOpts {
            upstreams: vec![up.addr],
            extra: "[reactor]\nglommio_preempt_us = 50\n".into(),
            admin_extra: "core_stall_ms = 100".into(),
            ..Default::default()
        })
    };
    let w = (0..5)
        .find_map(|_| std::panic::catch_unwind(std::panic::AssertUnwindSafe(start)).ok())
        .expect("the worker never started in diagnosis mode");
    let addr = w.addr();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stalls = 0u64;
    let mut round = 0;
    while stalls == 0 {
        assert!(
            Instant::now() < deadline,
            "no stall seen in {round} rounds; log:\n{}",
            w.log_text()
        );
        let mut threads = Vec::new();
        for t in 0..4 {
            threads.push(std::thread::spawn(move || {
                let mut c = common::Client::connect(addr);
                for i in 0..50 {
                    assert_eq!(c.get(&format!("/r/{round}/{t}/{i}"), "").status, 200);
                }
            }));
        }
        for t in threads {
            t.join().expect("client");
        }
        let metrics = w.admin_get("/metrics").text();
        stalls = metrics
            .lines()
            .find_map(|l| l.strip_prefix("appproxy_core_stalls_total "))
            .and_then(|v| v.trim().parse().ok())
            .expect("stall counter");
        round += 1;
    }
    // The counter is raised before the line is logged, through the log's writer
    // thread: waited for, bounded.
    w.wait_log("the stall", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("core stalled with work waiting"))
    });
}
