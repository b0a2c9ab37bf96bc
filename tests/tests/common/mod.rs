//! The manager → coordinator → control agent → every core → app flow, shared by the
//! end-to-end tests. The coordinator (embedded SQLite) and the worker (glommio cores
//! plus the control agent) run in the test process on real sockets; a manager-like
//! client creates a circuit with `X-Backend-Request-ID: R`; the worker deploys it on
//! every core under R; a client request reaches the app through the new port.
#![allow(dead_code)]

pub mod traced;

/// [`appproxy_test_support::http::raw`], with a chunked body decoded: the
/// coordinator streams `GET /api/worker` (chunked), and the callers here read bodies
/// as JSON.
pub fn http(addr: std::net::SocketAddr, req: &str) -> (u16, String, String) {
    let (status, head, body) = appproxy_test_support::http::raw(addr, req);
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(n, v)| {
            n.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    if !chunked {
        return (status, head, body);
    }
    let mut rest = body.as_bytes();
    let mut out = Vec::new();
    while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
        let line = String::from_utf8_lossy(&rest[..end]);
        let size = line.split(';').next().unwrap_or_default().trim();
        let Ok(n) = usize::from_str_radix(size, 16) else {
            break;
        };
        let after = &rest[end + 2..];
        if n == 0 || after.len() < n {
            break;
        }
        out.extend_from_slice(&after[..n]);
        rest = after[n..].strip_prefix(b"\r\n").unwrap_or(&after[n..]);
    }
    (status, head, String::from_utf8_lossy(&out).into_owned())
}
pub use appproxy_test_support::logs::Sink;
#[allow(unused_imports)]
pub use appproxy_test_support::{free_port, pg, redis};

use appproxy_test_support::net::ReadUninterrupted;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Sends every log line of this test process (JSON, `info`) to the returned sink.
pub fn capture_logs() -> Sink {
    capture_logs_as("e2e")
}

/// Sends every log line of this test process (JSON, `info`, naming `component`) to
/// the returned sink.
pub fn capture_logs_as(component: &'static str) -> Sink {
    let sink = Sink::default();
    let sub = appproxy_shared::telemetry::subscriber(
        &appproxy_shared::telemetry::LoggingConfig {
            format: appproxy_shared::telemetry::LogFormat::Json,
            filter: "info".into(),
        },
        component,
        sink.clone(),
    )
    .expect("subscriber");
    tracing::subscriber::set_global_default(sub).expect("global subscriber");
    sink
}

/// Waits (within 10 s) until a captured log line contains `line`; panics if none does.
pub fn wait_log(sink: &Sink, line: &str) {
    wait_logs(sink, line, 1, Duration::from_secs(10));
}

/// Waits (within `limit`) until the captured logs contain `line` `n` times; panics if
/// they do not.
pub fn wait_logs(sink: &Sink, line: &str, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while sink.text().matches(line).count() < n {
        assert!(Instant::now() < deadline, "no {n}× {line:?} in the logs");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How the flow is wired.
#[derive(Default)]
pub struct Flow<'a> {
    /// Redis for events, acknowledgements and last-access marks.
    pub redis_url: Option<&'a str>,
    /// PostgreSQL for the coordinator's store (else SQLite).
    pub postgres_url: Option<&'a str>,
    /// The agent's poll interval.
    pub poll_ms: u64,
    /// A log line to wait for before the manager's call.
    pub ready_log: Option<&'a str>,
    /// Single node: the coordinator runs inside the worker process.
    pub embedded: bool,
}

/// What the flow observed.
pub struct Observed {
    /// Every captured log line.
    pub logs: String,
    /// The manager's call, from sending it to the answer.
    pub api_call: Duration,
}

/// Runs the whole flow. Returns the captured log lines.
pub fn manager_call_to_app_request(flow: Flow<'_>) -> Observed {
    let Flow {
        redis_url,
        postgres_url,
        poll_ms,
        ready_log,
        embedded,
    } = flow;
    let redis_table = redis_url
        .map(|u| format!("[redis]\nurl = \"{u}\"\n"))
        .unwrap_or_default();
    let sink = capture_logs();
    let dir = tempfile::tempdir().expect("tempdir");

    // The app: answers 200 and keeps the request-ID header it got.
    let app = TcpListener::bind("127.0.0.1:0").expect("app");
    let app_addr = app.local_addr().expect("addr");
    let seen_ids = Arc::new(Mutex::new(Vec::new()));
    let seen = seen_ids.clone();
    std::thread::spawn(move || {
        for mut s in app.incoming().flatten() {
            let mut buf = vec![0u8; 8192];
            let n = s.read_uninterrupted(&mut buf).unwrap_or(0);
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if let Some(line) = text
                .lines()
                .find(|l| l.to_ascii_lowercase().starts_with("x-backend-request-id:"))
            {
                seen.lock().expect("seen").push(
                    line.split_once(':')
                        .map(|x| x.1.trim().to_owned())
                        .unwrap_or_default(),
                );
            }
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nfrom-app",
            );
        }
    });

    // The coordinator, on a port the kernel picks.
    let database = match postgres_url {
        Some(url) => format!("url = \"{url}\""),
        None => format!(
            "sqlite_path = \"{}\"",
            dir.path().join("c.sqlite3").display()
        ),
    };
    let coord_text = format!(
        "[coordinator]\nbind = \"127.0.0.1:0\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\n{database}\n{redis_table}"
    );
    let embedded_config = embedded.then(|| {
        toml::from_str::<appproxy_coordinator::config::CoordinatorConfig>(&coord_text)
            .expect("coordinator config")
    });
    let coordinator = (!embedded).then(|| start_coordinator(&coord_text));
    // Where the embedded one serves is learned once the agent started it.
    let logged_from = sink.0.lock().expect("sink").len();

    // The worker, managed.
    let circuit_port = free_port();
    let cores = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(2);
    // Single node: the worker runs the coordinator itself (the file name is only
    // checked for presence here; the test hands the parsed config over directly).
    let coordinator_link = match &coordinator {
        Some(c) => format!("url = \"http://{}\"", c.addr),
        None => "embedded = \"coordinator.toml\"".to_owned(),
    };
    let worker_redis = if embedded {
        String::new()
    } else {
        redis_table.clone()
    };
    let text = format!(
        "[worker]\nauthority = \"w1\"\ncores = {cores}\nbind_host = \"127.0.0.1\"\nhostname = \"127.0.0.1\"\napi_port = {}\nport_range = [{circuit_port}, {circuit_port}]\n[admin]\nbind = \"127.0.0.1:{}\"\n[coordinator]\n{coordinator_link}\npoll_interval_ms = {poll_ms}\naccess_flush_ms = 100\n{worker_redis}[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\npermit_secret = \"permit\"\n",
        free_port(),
        free_port()
    );
    let config = appproxy_dataplane::config::Config::parse(&text).expect("worker config");
    let online: Vec<usize> =
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    let rt = config.validate(&online).expect("valid");
    let worker = appproxy_dataplane::worker::Worker::start(rt).expect("worker");
    let agent = appproxy_node::spawn_agent(
        config,
        embedded_config,
        worker.deployer(),
        worker.access_marks(),
    )
    .expect("agent");
    let coord_addr = match &coordinator {
        Some(c) => c.addr,
        None => appproxy_test_support::serving::logged(
            &sink,
            logged_from,
            "coordinator serving",
            "addr",
        ),
    };
    assert_eq!(agent.coordinator, embedded.then_some(coord_addr));

    if let Some(line) = ready_log {
        wait_log(&sink, line);
    }
    // Wait for the registration, then act as the manager.
    wait_registered(coord_addr, "w1");
    let session = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
    let user = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
    let token = conf_token(coord_addr, app_addr.port(), session, user);
    let started = Instant::now();
    let (status, head, body) = http(
        coord_addr,
        &format!("GET /v2/proxy/auth?token={token}&session_id={session}&app=jupyter&protocol=http HTTP/1.1\r\nHost: c\r\nAccept: application/json\r\nX-Backend-Request-ID: manager-R-1\r\nConnection: close\r\n\r\n"),
    );
    let api_call = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert!(head
        .to_ascii_lowercase()
        .contains("x-backend-request-id: manager-r-1"));
    let circuit_id = {
        let url = serde_json::from_str::<serde_json::Value>(&body).expect("json")["redirect_url"]
            .as_str()
            .expect("redirect_url")
            .to_owned();
        let token = url.split("token=").nth(1).expect("token").to_owned();
        appproxy_shared::jwt::verify_hs256(token.as_bytes(), "jwt").expect("setup token")["circuit"]
            .as_str()
            .expect("circuit")
            .to_owned()
    };

    // Routable on the circuit's port once every core has the deployment.
    let circuit_addr = SocketAddr::from(([127, 0, 0, 1], circuit_port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(circuit_addr).is_err() {
        assert!(Instant::now() < deadline, "circuit never became routable");
        std::thread::sleep(Duration::from_millis(1));
    }
    let latency = started.elapsed();
    let path = if embedded {
        "the in-process bus".to_owned()
    } else if redis_url.is_some() {
        "a Redis event".to_owned()
    } else {
        format!("polling every {poll_ms} ms")
    };
    eprintln!("deployment latency (API call -> routable, through {path}): {latency:?}; the call itself took {api_call:?}");
    let cookie = permit_cookie(user);
    let (status, _, body) = http(
        circuit_addr,
        &format!("GET /lab HTTP/1.1\r\nHost: t\r\nCookie: appproxy_permit=\"{cookie}\"\r\nX-Backend-Request-ID: client-1\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!((status, body.as_str()), (200, "from-app"));
    assert!(seen_ids
        .lock()
        .expect("seen")
        .contains(&"client-1".to_owned()));

    // Every core logged the deployment under the manager's ID.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = String::from_utf8_lossy(&sink.0.lock().expect("sink")).into_owned();
        let applied: Vec<serde_json::Value> = logs
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|v: &serde_json::Value| {
                v["message"] == "deployment applied" && v["circuits"] == 1
            })
            .collect();
        if applied.len() >= cores {
            assert!(
                applied.iter().all(|v| v["request_id"] == "manager-R-1"),
                "{applied:?}"
            );
            let coordinator_line = logs.lines().any(|l| {
                l.contains("circuit created") && l.contains("\"request_id\":\"manager-R-1\"")
            });
            assert!(
                coordinator_line,
                "the coordinator logged the creation under the same ID"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every core applied the deployment:\n{logs}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The worker's admin endpoint counts the deployed circuit.
    let admin = appproxy_dataplane::admin::spawn(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        worker.metrics.clone(),
        worker.health_info(),
    )
    .expect("admin");
    let (_, _, health) = http(
        admin,
        "GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(health.contains("\"circuits\":1"), "{health}");
    let (_, _, metrics) = http(
        admin,
        "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(metrics.contains("appproxy_circuits 1"), "{metrics}");

    // The request reached the coordinator as a last-access mark and a request count.
    if embedded || redis_url.is_some() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, _, body) = http(coord_addr, &format!("GET /api/circuit/{circuit_id}/statistics HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n"));
            assert_eq!(status, 200, "{body}");
            let stats: serde_json::Value = serde_json::from_str(&body).expect("json");
            if stats["requests"] == 1 {
                assert!(stats["ttl"].as_i64().is_some_and(|t| t > 3500), "{stats}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no request count reached the coordinator: {stats}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Draining leaves the coordinator first: the worker is no longer offered circuits.
    let remote = !embedded;
    agent.stop();
    if remote {
        let (_, _, body) = http(coord_addr, "GET /api/worker HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["workers"][0]["status"], "LOST", "{body}");
        assert_eq!(v["workers"][0]["nodes"], 0);
    }
    worker.stop();
    if let Some(c) = coordinator {
        c.stop();
    }
    let logs = String::from_utf8_lossy(&sink.0.lock().expect("sink")).into_owned();
    Observed { logs, api_call }
}

/// A coordinator on its own runtime thread.
pub struct CoordinatorThread {
    /// The address it serves on: the one it bound, learned, not chosen beforehand.
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// Starts a coordinator from a config text; returns once it listens, with the address
/// it bound. Give its `bind` port 0 so that the kernel picks a free port (a port
/// chosen beforehand can be taken by another process first); a restart that must
/// keep the address binds the port the first start learned. Panics with the reason
/// when it cannot start.
pub fn start_coordinator(text: &str) -> CoordinatorThread {
    let config: appproxy_coordinator::config::CoordinatorConfig =
        toml::from_str(text).expect("config");
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel::<Result<SocketAddr, String>>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async move {
            let c = match appproxy_coordinator::Coordinator::bind(&config).await {
                Ok(c) => c,
                Err(e) => {
                    let _ = bound_tx.send(Err(format!("{e:#}")));
                    return;
                }
            };
            let _ = bound_tx.send(Ok(c.addr));
            if let Err(e) = c
                .run(async {
                    let _ = stop_rx.await;
                })
                .await
            {
                panic!("coordinator: {e:#}");
            }
        });
    });
    // Bound means listening: connections wait in its backlog until it accepts them.
    match bound_rx.recv_timeout(appproxy_test_support::serving::DEADLINE) {
        Ok(Ok(addr)) => CoordinatorThread { addr, stop, thread },
        Ok(Err(e)) => panic!("coordinator did not start: {e}"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match thread.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => panic!("coordinator thread ended before binding"),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!(
                "coordinator did not bind within {:?}",
                appproxy_test_support::serving::DEADLINE
            )
        }
    }
}

impl CoordinatorThread {
    /// Stops it and waits.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// A worker and its control agent (remote coordinator), as the worker process runs them.
pub struct RunningWorker {
    /// The cores.
    pub worker: appproxy_dataplane::worker::Worker,
    /// The agent.
    pub agent: appproxy_dataplane::agent::Agent,
}

impl RunningWorker {
    /// Stops as the process does on SIGTERM: deregister, then drain.
    pub fn stop(self) {
        self.agent.stop();
        self.worker.stop();
    }
}

/// Starts a worker and its control agent (remote coordinator).
pub fn start_worker(text: &str) -> RunningWorker {
    let config = appproxy_dataplane::config::Config::parse(text).expect("worker config");
    let online: Vec<usize> =
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    let worker =
        appproxy_dataplane::worker::Worker::start(config.validate(&online).expect("valid"))
            .expect("worker");
    let agent =
        appproxy_dataplane::agent::spawn_remote(config, worker.deployer(), worker.access_marks())
            .expect("agent");
    RunningWorker { worker, agent }
}

/// A TCP echo app on a free loopback port (a thread per connection); its port.
pub fn tcp_echo_app() -> u16 {
    let echo = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = echo.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut s in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read_uninterrupted(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// A single node as the worker process runs it with `[coordinator] embedded`: one
/// core whose one frontend port is `port`, and a coordinator in this process on
/// the SQLite file `sqlite` (kept across restarts), binding a port the kernel picks;
/// `coordinator_extra` is added to the worker's `[coordinator]` table. Returns the
/// worker, its agent and the coordinator's address.
pub fn start_node(
    sqlite: &std::path::Path,
    port: u16,
    coordinator_extra: &str,
) -> (
    appproxy_dataplane::worker::Worker,
    appproxy_dataplane::agent::Agent,
    SocketAddr,
) {
    let cc: appproxy_coordinator::config::CoordinatorConfig = toml::from_str(&format!(
        "[coordinator]\nbind = \"127.0.0.1:0\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\nsqlite_path = \"{}\"\n",
        sqlite.display()
    ))
    .expect("coordinator config");
    let config = appproxy_dataplane::config::Config::parse(&format!(
        "[worker]\nauthority = \"w1\"\ncores = 1\nbind_host = \"127.0.0.1\"\nhostname = \"127.0.0.1\"\napi_port = {}\nport_range = [{port}, {port}]\n[coordinator]\nembedded = \"c.toml\"\n{coordinator_extra}\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\npermit_secret = \"permit\"\n",
        free_port()
    ))
    .expect("worker config");
    let online: Vec<usize> =
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    let worker =
        appproxy_dataplane::worker::Worker::start(config.validate(&online).expect("valid"))
            .expect("worker");
    let agent =
        appproxy_node::spawn_agent(config, Some(cc), worker.deployer(), worker.access_marks())
            .expect("agent");
    let coord = agent
        .coordinator
        .expect("the embedded coordinator's address");
    (worker, agent, coord)
}

/// Waits (within 10 s) until the coordinator at `coord` lists the worker
/// `authority` (API secret `api`); panics with its last answer if it does not.
pub fn wait_registered(coord: SocketAddr, authority: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let listed = format!("\"authority\":\"{authority}\"");
    loop {
        let (_, _, body) = http(coord, "GET /api/worker HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n");
        if body.contains(&listed) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "worker {authority} did not register: {body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The permit cookie's value for `user` under the tests' `permit_secret`
/// (`"permit"`, SHA-256): what a browser that went through `/setup` sends.
pub fn permit_cookie(user: &str) -> String {
    appproxy_dataplane::auth::permit_value(
        "permit",
        &user.parse().expect("a user UUID"),
        appproxy_dataplane::auth::PermitDigest::Sha256,
    )
}

/// The manager's `/v2/conf` for `session` of `user`, whose kernel listens on
/// `kernel_port`: the token it answers with.
pub fn conf_token(coord_addr: SocketAddr, kernel_port: u16, session: &str, user: &str) -> String {
    let conf = format!(
        r#"{{"login_session_token":null,"kernel_host":"127.0.0.1","kernel_port":{kernel_port},"session":{{"id":"{session}","user_uuid":"{user}","group_id":"{user}","access_key":"AK","domain_name":"default"}}}}"#,
    );
    let (status, _, body) = http(
        coord_addr,
        &format!("POST /v2/conf HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{conf}", conf.len()),
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).expect("json")["token"]
        .as_str()
        .expect("token")
        .to_owned()
}

/// Creates the circuit of `app` over `protocol` for `session` of `user` (kernel on
/// `kernel_port`) as the manager does (`/v2/conf`, then `/v2/proxy/auth`, answered
/// once the worker acknowledged it); its ID, read from the setup token.
pub fn create_circuit(
    coord: SocketAddr,
    kernel_port: u16,
    session: &str,
    user: &str,
    app: &str,
    protocol: &str,
) -> String {
    let token = conf_token(coord, kernel_port, session, user);
    let (status, _, body) = http(
        coord,
        &format!("GET /v2/proxy/auth?token={token}&session_id={session}&app={app}&protocol={protocol} HTTP/1.1\r\nHost: c\r\nAccept: application/json\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 200, "{body}");
    let url = serde_json::from_str::<serde_json::Value>(&body).expect("json")["redirect_url"]
        .as_str()
        .expect("redirect_url")
        .to_owned();
    let setup = url.split("token=").nth(1).expect("token");
    appproxy_shared::jwt::verify_hs256(setup.as_bytes(), "jwt").expect("setup token")["circuit"]
        .as_str()
        .expect("circuit")
        .to_owned()
}
