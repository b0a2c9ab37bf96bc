//! The cluster fault suite: PostgreSQL, Redis, a coordinator and worker processes,
//! all real, and one fault per scenario — a worker frozen with SIGSTOP, a frontend
//! port held by another process, Redis restarted, PostgreSQL frozen and stopped.
//! After each: every creation answered 200 is routable on its worker, every failure
//! was withdrawn, nothing stray is stored, and each worker listens on exactly the
//! ports the store gives it. The hung-worker scenario also prints creations/s and
//! API-call → routable p50/p99 with every worker healthy and with one frozen.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use appproxy_test_support::serving;
use common::{http, start_coordinator, start_worker, CoordinatorThread, Sink};

const SESSION: &str = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";

/// One scenario at a time: they start whole clusters on a small machine.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// This process's log lines (the coordinator and in-process workers).
fn logs() -> &'static Sink {
    static SINK: OnceLock<Sink> = OnceLock::new();
    SINK.get_or_init(common::capture_logs)
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sink_text() -> String {
    String::from_utf8_lossy(&logs().0.lock().expect("sink")).into_owned()
}

/// A worker process (`appproxy-e2e-worker`), its log in a file.
struct WorkerProc {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl WorkerProc {
    fn start(config: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("worker.toml");
        std::fs::write(&path, config).expect("config");
        let log = dir.path().join("worker.log");
        let file = std::fs::File::create(&log).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_appproxy-e2e-worker"))
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start the worker process");
        Self {
            child,
            log,
            _dir: dir,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `n` lines with `needle`; fails at once when the process exits first.
    fn wait_log(&mut self, needle: &str, n: usize) {
        // A hang guard only: generous, the machine may be shared.
        let deadline = Instant::now() + Duration::from_secs(90);
        while count(&self.logs(), needle) < n {
            serving::assert_running(&mut self.child, "worker process", &self.log, 0);
            assert!(
                Instant::now() < deadline,
                "no {n}× {needle:?} in the worker log:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {}", self.child.id());
    }

    /// SIGTERM, then waits (bounded) for the process to exit.
    fn terminate(mut self) {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the worker did not exit on SIGTERM:\n{}", self.logs());
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-CONT", &pid]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn worker_text(authority: &str, base: u16, ports: u16, coord: SocketAddr, redis: &str) -> String {
    format!(
        "[worker]\nauthority = \"{authority}\"\ncores = 2\nbind_host = \"127.0.0.1\"\nhostname = \"127.0.0.1\"\napi_port = {}\nport_range = [{base}, {}]\n[coordinator]\nurl = \"http://{coord}\"\npoll_interval_ms = 60000\nheartbeat_secs = 1\n[redis]\nurl = \"{redis}\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\npermit_secret = \"permit\"\n",
        common::free_port(),
        base + ports - 1,
    )
}

fn get(coord: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let (status, _, body) = http(
        coord,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n"
        ),
    );
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// A `/v2/conf` token for the test session.
fn token(coord: SocketAddr) -> String {
    let conf = format!(
        r#"{{"login_session_token":null,"kernel_host":"127.0.0.1","kernel_port":9,"session":{{"id":"{SESSION}","user_uuid":"{SESSION}","group_id":"{SESSION}","access_key":"AK","domain_name":"default"}}}}"#
    );
    let (status, _, body) = http(coord, &format!("POST /v2/conf HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{conf}", conf.len()));
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).expect("json")["token"]
        .as_str()
        .expect("token")
        .to_owned()
}

/// One creation's answer.
struct Created {
    status: u16,
    body: serde_json::Value,
    /// The circuit's port, when answered 200.
    port: Option<u16>,
    started: Instant,
    /// The API call.
    call: Duration,
}

fn create(coord: SocketAddr, token: &str, id: &str) -> Created {
    let started = Instant::now();
    let (status, _, body) = http(
        coord,
        &format!("GET /v2/proxy/auth?token={token}&session_id={SESSION}&app=jupyter&protocol=http&no_reuse=true HTTP/1.1\r\nHost: c\r\nAccept: application/json\r\nX-Backend-Request-ID: {id}\r\nConnection: close\r\n\r\n"),
    );
    let call = started.elapsed();
    let body: serde_json::Value = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    let port = (status == 200).then(|| {
        let url = body["redirect_url"].as_str().expect("url");
        let token = url.split("token=").nth(1).expect("token");
        let circuit = appproxy_shared::jwt::verify_hs256(token.as_bytes(), "jwt").expect("jwt")
            ["circuit"]
            .as_str()
            .expect("circuit")
            .to_owned();
        let (_, v) = get(coord, &format!("/api/circuit/{circuit}"));
        v["port"].as_u64().expect("port") as u16
    });
    Created {
        status,
        body,
        port,
        started,
        call,
    }
}

/// The ports the store gives the worker `authority`.
fn stored_ports(coord: SocketAddr, authority: &str) -> Vec<u16> {
    let (_, v) = get(coord, &format!("/api/slots?wsproxy_host={authority}"));
    let mut ports: Vec<u16> = v["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .map(|s| s["port"].as_u64().expect("port") as u16)
        .collect();
    ports.sort_unstable();
    ports
}

fn listening(base: u16, n: u16, except: &[u16]) -> Vec<u16> {
    (base..base + n)
        .filter(|p| !except.contains(p) && TcpStream::connect(("127.0.0.1", *p)).is_ok())
        .collect()
}

/// Waits until the worker on `base..base+n` listens on exactly its stored ports.
fn converges(coord: SocketAddr, authority: &str, base: u16, n: u16, except: &[u16]) -> Vec<u16> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stored = stored_ports(coord, authority);
        let open = listening(base, n, except);
        if open == stored {
            return stored;
        }
        assert!(
            Instant::now() < deadline,
            "{authority} listens on {open:?}, the store holds {stored:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metric(coord: SocketAddr, name: &str) -> u64 {
    let (_, _, text) = http(
        coord,
        "GET /metrics HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n",
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// A coordinator on a port the kernel picks with this store, Redis and extra
/// `[coordinator]` lines; returns it and its address.
fn coordinator_on(database: &str, redis: &str, extra: &str) -> (CoordinatorThread, SocketAddr) {
    let c = start_coordinator(&coordinator_text(database, redis, extra));
    let addr = c.addr;
    (c, addr)
}

/// (No cap on circuits per session: these runs make many in one session.)
fn coordinator_text(database: &str, redis: &str, extra: &str) -> String {
    format!(
        "[coordinator]\nbind = \"127.0.0.1:0\"\n{extra}\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\n{database}\n[redis]\nurl = \"{redis}\"\n[limits]\nmax_circuits_per_session = 0\n"
    )
}

/// Runs `rounds` creations on each of `managers` concurrent threads; each answer
/// with the time from the call to the circuit being routable (200s only).
fn creations(
    coord: SocketAddr,
    token: &str,
    managers: usize,
    rounds: usize,
    tag: &str,
) -> Vec<(Created, Option<Duration>)> {
    let threads: Vec<_> = (0..managers)
        .map(|m| {
            let token = token.to_owned();
            let tag = tag.to_owned();
            std::thread::spawn(move || {
                (0..rounds)
                    .map(|r| {
                        let c = create(coord, &token, &format!("{tag}-{m}-{r}"));
                        let routable = c.port.map(|port| {
                            let deadline = Instant::now() + Duration::from_secs(10);
                            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                                assert!(Instant::now() < deadline, "a 200 never became routable");
                                std::thread::sleep(Duration::from_millis(1));
                            }
                            c.started.elapsed()
                        });
                        (c, routable)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().expect("manager thread"))
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn report(what: &str, runs: &[(Created, Option<Duration>)], wall: Duration) {
    let mut lat: Vec<Duration> = runs.iter().filter_map(|(_, r)| *r).collect();
    lat.sort_unstable();
    let ok = lat.len();
    eprintln!(
        "{what}: {ok}/{} answered 200, {:.1} creations/s, API call -> routable p50 {:?} p99 {:?}",
        runs.len(),
        ok as f64 / wall.as_secs_f64(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
    );
}

/// Found #1: a frozen worker costs at most one acknowledgement timeout. Placement
/// stops offering it circuits once it misses one (its breaker opens), the creations
/// already waiting on it stop waiting, and each is placed again on the healthy worker
/// within the same call: every creation is answered 200 and routable.
#[test]
fn frozen_worker_costs_one_timeout_and_creations_go_elsewhere() {
    let _serial = serial();
    logs();
    let redis = common::redis::Redis::start();
    let pg = common::pg::Pg::start();
    let ack_timeout = Duration::from_secs(5);
    let (coordinator, coord) = coordinator_on(
        &format!("url = \"{}\"", pg.url()),
        &redis.url(),
        // A back-off far shorter than the freeze: once it is over the frozen
        // worker is still skipped, because it has not heartbeated since.
        "worker_ack_timeout_secs = 5.0\nworker_breaker_backoff_secs = 0.2",
    );
    const PORTS: u16 = 80;
    // One free run split in two: disjoint by construction (two separate picks can
    // overlap).
    let b1 = appproxy_test_support::free_range(2 * PORTS);
    let b2 = b1 + PORTS;
    let mut w1 = WorkerProc::start(&worker_text("w1", b1, PORTS, coord, &redis.url()));
    let mut w2 = WorkerProc::start(&worker_text("w2", b2, PORTS, coord, &redis.url()));
    w1.wait_log("deployment acknowledged", 1);
    w2.wait_log("deployment acknowledged", 1);
    wait_until("two alive workers", || {
        let (_, v) = get(coord, "/api/worker");
        v["workers"]
            .as_array()
            .is_some_and(|w| w.iter().filter(|w| w["status"] == "ALIVE").count() == 2)
    });
    let token = token(coord);

    // Healthy: both workers take circuits.
    let started = Instant::now();
    let healthy = creations(coord, &token, 8, 5, "healthy");
    report("every worker healthy", &healthy, started.elapsed());
    assert!(healthy.iter().all(|(c, _)| c.status == 200));

    // w1 freezes. Placement prefers it (more free ports) until it misses an ack.
    w1.signal("-STOP");
    let started = Instant::now();
    let frozen = creations(coord, &token, 8, 5, "frozen");
    let wall = started.elapsed();
    report("one worker frozen (SIGSTOP)", &frozen, wall);
    let statuses: Vec<u16> = frozen.iter().map(|(c, _)| c.status).collect();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every creation is placed again on the healthy worker: {statuses:?} {:?}",
        frozen
            .iter()
            .find(|(c, _)| c.status != 200)
            .map(|(c, _)| &c.body)
    );
    let in_w2 = |p: u16| (b2..b2 + PORTS).contains(&p);
    assert!(
        frozen.iter().all(|(c, _)| c.port.is_some_and(in_w2)),
        "nothing answered 200 on the frozen worker"
    );
    // One miss opened w1's breaker; the creations waiting with it stopped together,
    // and no creation tried w1 again while it did not heartbeat.
    assert_eq!(
        metric(coord, "appproxy_coordinator_worker_breaker_trips_total"),
        1
    );
    let slow = frozen.iter().filter(|(c, _)| c.call >= ack_timeout).count();
    assert!(
        slow <= 8,
        "only creations in flight when it froze waited: {slow}"
    );
    let first_trip = frozen
        .iter()
        .filter(|(c, _)| c.call >= ack_timeout)
        .map(|(c, _)| c.started + c.call)
        .min();
    if let Some(t) = first_trip {
        let after: Vec<(Created, Option<Duration>)> =
            frozen.into_iter().filter(|(c, _)| c.started >= t).collect();
        assert!(
            after.iter().all(|(c, _)| c.call < ack_timeout),
            "after the first timeout no creation waits for the frozen worker"
        );
        let end = after
            .iter()
            .map(|(c, r)| c.started + r.unwrap_or(c.call))
            .max()
            .unwrap_or(t);
        report(
            "one worker frozen, creations started after the first timeout",
            &after,
            end.saturating_duration_since(t),
        );
    }

    // w1 thaws: it catches up with the withdrawals; both workers listen on exactly
    // their stored circuits, and the store holds nothing stray.
    w1.signal("-CONT");
    let on_w1 = converges(coord, "w1", b1, PORTS, &[]);
    let on_w2 = converges(coord, "w2", b2, PORTS, &[]);
    let answered = healthy.iter().filter(|(c, _)| c.status == 200).count() + 40;
    assert_eq!(on_w1.len() + on_w2.len(), answered, "nothing stray");
    let (_, all) = get(coord, "/api/slots");
    assert_eq!(all["slots"].as_array().map(Vec::len), Some(answered));

    // Found #7: every deployment and acknowledgement is logged under an ID (a batch
    // under its own), and every creating request's ID is on a worker line.
    let worker_lines: Vec<serde_json::Value> = [&w1, &w2]
        .iter()
        .flat_map(|w| {
            w.logs()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<_>>()
        })
        .collect();
    for message in ["deployment applied", "deployment acknowledged"] {
        let lines: Vec<&serde_json::Value> = worker_lines
            .iter()
            .filter(|v| v["message"] == message)
            .collect();
        assert!(!lines.is_empty(), "{message}");
        assert!(
            lines.iter().all(|v| v["request_id"].is_string()),
            "a {message:?} line without a request ID: {lines:?}"
        );
    }
    let ids = ["healthy", "frozen"]
        .into_iter()
        .flat_map(|tag| (0..8).flat_map(move |m| (0..5).map(move |r| format!("{tag}-{m}-{r}"))));
    for id in ids {
        assert!(
            worker_lines.iter().any(|v| v["request_id"] == id.as_str()),
            "no worker line under {id}"
        );
    }
    drop(w1);
    drop(w2);
    coordinator.stop();
}

/// Found #3: a port of the worker's range held by another process. The worker
/// reports that circuit's frontend as failed in its acknowledgement; the coordinator
/// withdraws it and places the creation on another port: the 200 is routable on the
/// worker, and the held port is not stored.
#[test]
fn a_port_held_by_another_process_is_never_answered_200() {
    let _serial = serial();
    logs();
    let redis = common::redis::Redis::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (coordinator, coord) = coordinator_on(
        &format!(
            "sqlite_path = \"{}\"",
            dir.path().join("c.sqlite3").display()
        ),
        &redis.url(),
        "worker_ack_timeout_secs = 5.0",
    );
    const PORTS: u16 = 4;
    let base = appproxy_test_support::free_range(PORTS);
    // Placement takes the lowest free port first: that one is held.
    let squatter = TcpListener::bind(("127.0.0.1", base)).expect("hold the port");
    let before = count(&sink_text(), "subscribed to circuit events");
    let worker = start_worker(&worker_text("w1", base, PORTS, coord, &redis.url()));
    wait_until("the worker subscribed", || {
        count(&sink_text(), "subscribed to circuit events") > before
    });
    let token = token(coord);
    let c = create(coord, &token, "held-port-1");
    assert_eq!(c.status, 200, "{}", c.body);
    let port = c.port.expect("port");
    assert_ne!(port, base, "never the held port");
    let stored = converges(coord, "w1", base, PORTS, &[base]);
    assert_eq!(stored, vec![port], "the failed placement was withdrawn");
    assert!(metric(coord, "appproxy_coordinator_worker_deploy_failures_total") >= 1);
    // The failure is on the worker's log under the creating request's ID.
    let text = sink_text();
    assert!(text.lines().any(
        |l| l.contains("circuit not deployed") && l.contains("\"request_id\":\"held-port-1\"")
    ));
    drop(squatter);
    worker.stop();
    coordinator.stop();
}

/// Found #4: after Redis restarts, the first creation succeeds — the publish that
/// fails on the stale connection is retried once on a fresh one.
#[test]
fn first_creation_after_a_redis_restart_succeeds() {
    let _serial = serial();
    logs();
    let mut redis = common::redis::Redis::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (subs, acks) = (
        count(&sink_text(), "subscribed to circuit events"),
        count(&sink_text(), "listening for acknowledgements"),
    );
    let (coordinator, coord) = coordinator_on(
        &format!(
            "sqlite_path = \"{}\"",
            dir.path().join("c.sqlite3").display()
        ),
        &redis.url(),
        "worker_ack_timeout_secs = 5.0",
    );
    const PORTS: u16 = 4;
    let base = appproxy_test_support::free_range(PORTS);
    let worker = start_worker(&worker_text("w1", base, PORTS, coord, &redis.url()));
    wait_until("the worker subscribed", || {
        count(&sink_text(), "subscribed to circuit events") > subs
    });
    let token = token(coord);
    assert_eq!(create(coord, &token, "before-restart").status, 200);
    redis.stop();
    redis.restart();
    // Both subscribers are back (the worker's events, the coordinator's acks).
    wait_until("resubscriptions", || {
        let text = sink_text();
        count(&text, "subscribed to circuit events") > subs + 1
            && count(&text, "listening for acknowledgements") > acks + 1
    });
    let c = create(coord, &token, "after-restart");
    assert_eq!(c.status, 200, "{}", c.body);
    converges(coord, "w1", base, PORTS, &[]);
    worker.stop();
    coordinator.stop();
}

/// Found by an outside tester: a worker following coordinator A applied no event
/// while a heartbeat or poll to A was unanswered, so with A frozen the creations
/// another coordinator (B) made on it waited for that call's timeout (10 s), past
/// B's acknowledgement timeout: 503, and B's breaker opened for a healthy worker.
/// Events come over Redis; the calls to A no longer hold them.
#[test]
fn a_frozen_coordinator_holds_no_events_the_others_send() {
    let _serial = serial();
    logs();
    let redis = common::redis::Redis::start();
    let pg = common::pg::Pg::start();
    let database = format!("url = \"{}\"", pg.url());
    let ack = "worker_ack_timeout_secs = 5.0";
    let (a, a_addr) = coordinator_on(&database, &redis.url(), ack);
    let (b, b_addr) = coordinator_on(&database, &redis.url(), ack);
    let relay = appproxy_test_support::relay::Relay::start(a_addr);
    const PORTS: u16 = 8;
    let base = appproxy_test_support::free_range(PORTS);
    // The worker follows A (through the relay), polling often so that a poll is
    // in flight when A freezes, and heartbeating every second.
    let text = worker_text("w1", base, PORTS, relay.addr, &redis.url())
        .replace("poll_interval_ms = 60000", "poll_interval_ms = 200");
    let mut w = WorkerProc::start(&text);
    w.wait_log("subscribed to circuit events", 1);
    wait_until("an alive worker", || {
        let (_, v) = get(b_addr, "/api/worker");
        v["workers"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["status"] == "ALIVE"))
    });
    let token = token(b_addr);
    assert_eq!(create(b_addr, &token, "before-freeze").status, 200);
    relay.freeze(true);
    // A heartbeat and a poll are now stuck on A.
    std::thread::sleep(Duration::from_millis(1500));
    for i in 0..3 {
        let c = create(b_addr, &token, &format!("a-frozen-{i}"));
        assert_eq!(c.status, 200, "{} after {:?}", c.body, c.call);
    }
    assert_eq!(
        metric(b_addr, "appproxy_coordinator_worker_breaker_trips_total"),
        0
    );
    relay.freeze(false);
    converges(b_addr, "w1", base, PORTS, &[]);
    drop(w);
    a.stop();
    b.stop();
}

/// Found #5: PostgreSQL frozen (SIGSTOP) or stopped: API calls end within the store
/// deadline with 503 and the product's JSON error (no pool or driver text), and the
/// coordinator answers normally once PostgreSQL is back.
#[test]
fn a_frozen_or_stopped_database_is_a_bounded_503() {
    let _serial = serial();
    logs();
    let redis = common::redis::Redis::start();
    let pg = common::pg::Pg::start();
    let (coordinator, coord) = coordinator_on(&format!("url = \"{}\"", pg.url()), &redis.url(), "");
    assert_eq!(get(coord, "/api/worker").0, 200);
    pg.signal("-STOP");
    let check = |what: &str| {
        let (status, head, body) = http(
            coord,
            "GET /api/worker HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nX-Backend-Request-ID: db-down-1\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(status, 503, "{what}: {head}\n{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
        assert_eq!(v["code"], "store-unavailable", "{what}: {v}");
        assert_eq!(v["request_id"], "db-down-1", "{what}: {v}");
        assert!(
            !body.contains("pool") && !body.contains("postgres"),
            "{what}: {body}"
        );
    };
    check("frozen");
    pg.signal("-CONT");
    wait_until("the store answers again", || {
        get(coord, "/api/worker").0 == 200
    });
    drop(pg);
    check("stopped");
    coordinator.stop();
}

/// Found #2: a worker killed with SIGKILL and started again is the same HA node
/// (`nodes` stays 1), and its SIGTERM deregistration leaves it `LOST` with no node
/// counted (the node kept, marked as left), so creations are refused at once
/// instead of waiting for a stopped worker.
#[test]
fn a_crashed_and_restarted_worker_counts_once_and_leaves_lost() {
    let _serial = serial();
    logs();
    let redis = common::redis::Redis::start();
    let pg = common::pg::Pg::start();
    let (coordinator, coord) = coordinator_on(
        &format!("url = \"{}\"", pg.url()),
        &redis.url(),
        "worker_ack_timeout_secs = 5.0",
    );
    const PORTS: u16 = 4;
    let base = appproxy_test_support::free_range(PORTS);
    let text = worker_text("w1", base, PORTS, coord, &redis.url());
    let worker_state = || {
        let (_, v) = get(coord, "/api/worker");
        let w = &v["workers"][0];
        (
            w["status"].as_str().unwrap_or("").to_owned(),
            w["nodes"].as_i64().unwrap_or(-1),
        )
    };
    let mut w1 = WorkerProc::start(&text);
    w1.wait_log("deployment acknowledged", 1);
    assert_eq!(worker_state(), ("ALIVE".to_owned(), 1));
    let token = token(coord);
    assert_eq!(create(coord, &token, "before-crash").status, 200);

    w1.signal("-KILL");
    drop(w1);
    let mut w1 = WorkerProc::start(&text);
    w1.wait_log("deployment acknowledged", 1);
    assert_eq!(
        worker_state(),
        ("ALIVE".to_owned(), 1),
        "the restarted process is the same node"
    );
    converges(coord, "w1", base, PORTS, &[]);

    w1.terminate();
    assert_eq!(worker_state(), ("LOST".to_owned(), 0), "deregistered");
    let c = create(coord, &token, "after-stop");
    assert_eq!(c.status, 503, "{}", c.body);
    assert_eq!(c.body["code"], "no-available-worker", "{}", c.body);
    // The node is kept, marked as left: a late heartbeat of it does not count it
    // again until it registers.
    assert_eq!(
        pg.psql(
            "appproxy",
            "SELECT count(*) FROM worker_nodes WHERE left_at IS NULL"
        ),
        "0"
    );
    assert_eq!(
        pg.psql(
            "appproxy",
            "SELECT count(*) FROM worker_nodes WHERE left_at IS NOT NULL"
        ),
        "1"
    );
    coordinator.stop();
}

/// Workers know more than one coordinator: with `url = [A, B]` the worker follows A,
/// and when A stops it heartbeats to B, so B (the leader, checking heartbeats) never
/// marks it LOST and creations through B reach it.
#[test]
fn losing_one_coordinator_of_a_pair_does_not_lose_the_worker() {
    let _serial = serial();
    logs();
    let redis = common::redis::Redis::start();
    let pg = common::pg::Pg::start();
    let keys = "worker_ack_timeout_secs = 5.0\nworker_heartbeat_timeout_secs = 3\ncheck_worker_lost_interval_secs = 1";
    let database = format!("url = \"{}\"", pg.url());
    // B first, so that B holds the leader lease and runs the heartbeat check.
    let coordinator_b = start_coordinator(&coordinator_text(&database, &redis.url(), keys));
    let b = coordinator_b.addr;
    wait_until("B leads", || {
        Command::new("redis-cli")
            .args([
                "-p",
                &redis.port.to_string(),
                "EXISTS",
                "leader:appproxy:coordinator",
            ])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "1")
    });
    let coordinator_a = start_coordinator(&coordinator_text(&database, &redis.url(), keys));
    let a = coordinator_a.addr;
    const PORTS: u16 = 4;
    let base = appproxy_test_support::free_range(PORTS);
    let text = worker_text("w1", base, PORTS, a, &redis.url()).replace(
        &format!("url = \"http://{a}\""),
        &format!("url = [\"http://{a}\", \"http://{b}\"]"),
    );
    let mut w1 = WorkerProc::start(&text);
    w1.wait_log("deployment acknowledged", 1);
    coordinator_a.stop();
    w1.wait_log("switched to another coordinator", 1);
    // Longer than the heartbeat timeout, with B checking every second.
    std::thread::sleep(Duration::from_secs(5));
    let (_, v) = get(b, "/api/worker");
    assert_eq!(v["workers"][0]["status"], "ALIVE", "{v}");
    let token = token(b);
    let c = create(b, &token, "through-b");
    assert_eq!(c.status, 200, "{}", c.body);
    converges(b, "w1", base, PORTS, &[]);
    drop(w1);
    coordinator_b.stop();
}
