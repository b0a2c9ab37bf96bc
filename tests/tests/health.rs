//! Active health checks end to end, with a real Redis, coordinator and worker: two
//! model replicas (real HTTP servers here) behind one endpoint. A replica failing its
//! health path, or hanging, is taken out of rotation — the manager hears
//! `model_service_status_updated` on the `events` stream, no request reaches the
//! replica afterwards and the other keeps answering; when it answers again traffic
//! returns; with both out the endpoint answers 503 JSON with the request ID. The
//! leader's `worker_lost` anycast event is checked too.

mod common;

use appproxy_test_support::net::ReadUninterrupted;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{http, start_coordinator, start_worker};

const OK: u8 = 0;
const FAILING: u8 = 1;
const HANGING: u8 = 2;

/// A model replica: answers its name, `/health` by `mode`; counts the requests that
/// are not health probes and keeps the probes' request IDs.
struct Replica {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    hits: Arc<AtomicUsize>,
    probe_ids: Arc<Mutex<Vec<String>>>,
}

impl Replica {
    fn start(name: &'static str) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let mode = Arc::new(AtomicU8::new(OK));
        let hits = Arc::new(AtomicUsize::new(0));
        let probe_ids = Arc::new(Mutex::new(Vec::new()));
        let (m, h, p) = (mode.clone(), hits.clone(), probe_ids.clone());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (m, h, p) = (m.clone(), h.clone(), p.clone());
                std::thread::spawn(move || serve(s, name, &m, &h, &p));
            }
        });
        Self {
            addr,
            mode,
            hits,
            probe_ids,
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn serve(
    mut s: TcpStream,
    name: &str,
    mode: &AtomicU8,
    hits: &AtomicUsize,
    probe_ids: &Mutex<Vec<String>>,
) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read_uninterrupted(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 65536 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let path = text.split_whitespace().nth(1).unwrap_or("").to_owned();
    let health = path == "/health";
    if health {
        if let Some(id) = text.lines().find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("x-backend-request-id:")
                .then(|| l[21..].trim().to_owned())
        }) {
            probe_ids.lock().expect("ids").push(id);
        }
    } else {
        hits.fetch_add(1, Ordering::SeqCst);
    }
    // A hanging replica accepts and never answers (until it is told to stop hanging,
    // so no thread outlives the test for long).
    let deadline = Instant::now() + Duration::from_secs(30);
    while mode.load(Ordering::SeqCst) == HANGING && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, body) = match (health, mode.load(Ordering::SeqCst)) {
        (true, FAILING) => ("500 Internal Server Error", "sick"),
        (true, _) => ("200 OK", "ok"),
        (false, _) => ("200 OK", name),
    };
    let _ = s.write_all(
        format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
}

fn post(coord: SocketAddr, path: &str, body: &str) -> serde_json::Value {
    let (status, _, text) = http(coord, &format!("POST {path} HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()));
    assert_eq!(status, 200, "{path}: {text}");
    serde_json::from_str(&text).expect("json")
}

/// Every `model_service_status_updated` body on the manager's stream, in order.
fn status_events(redis_port: u16) -> Vec<serde_json::Value> {
    stream_payloads(redis_port, "events")
        .into_iter()
        .filter(|(name, _)| name == "model_service_status_updated")
        .map(|(_, p)| p)
        .collect()
}

/// (name, JSON payload) of every entry of `stream`, read with redis-cli.
fn stream_payloads(redis_port: u16, stream: &str) -> Vec<(String, serde_json::Value)> {
    stream_payloads_in(redis_port, 0, stream)
}

/// [`stream_payloads`] in database `db`.
fn stream_payloads_in(redis_port: u16, db: u8, stream: &str) -> Vec<(String, serde_json::Value)> {
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis_port.to_string(),
            "-n",
            &db.to_string(),
            "--raw",
            "XRANGE",
            stream,
            "-",
            "+",
        ])
        .output()
        .expect("redis-cli");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    let mut events = Vec::new();
    let mut name = String::new();
    for pair in lines.windows(2) {
        match pair[0] {
            "name" => name = pair[1].to_owned(),
            "payload" => {
                if let Ok(v) = serde_json::from_str(pair[1]) {
                    events.push((name.clone(), v));
                }
            }
            _ => {}
        }
    }
    events
}

/// Waits (bounded) until the manager has heard `status` for `route`, `count` times.
fn until_event(redis_port: u16, route: &str, status: &str, count: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen: Vec<_> = status_events(redis_port)
            .into_iter()
            .filter(|e| e["route_id"] == route && e["new_status"] == status)
            .collect();
        if seen.len() >= count {
            return seen[count - 1].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {status} event for {route}: {:?}",
            status_events(redis_port)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One inference request; (status, head, body).
fn call(frontend: SocketAddr, bearer: &str, id: &str) -> (u16, String, String) {
    http(
        frontend,
        &format!("POST /v1/completions HTTP/1.1\r\nHost: m\r\n{bearer}X-Backend-Request-ID: {id}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"),
    )
}

/// Waits (bounded) until `n` answers in a row come from `name`.
fn settle_on(frontend: SocketAddr, bearer: &str, name: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut streak = 0;
    while streak < n {
        let (status, _, body) = call(frontend, bearer, "settle");
        streak = if status == 200 && body == name {
            streak + 1
        } else {
            0
        };
        assert!(
            Instant::now() < deadline,
            "answers did not settle on {name}: {status} {body}"
        );
    }
}

#[test]
fn health_checks_take_failing_and_hanging_replicas_out_and_bring_them_back() {
    let sink = common::capture_logs();
    let redis = common::redis::Redis::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = start_coordinator(
        &format!(
            "[coordinator]\nbind = \"127.0.0.1:0\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\nsqlite_path = \"{}\"\n[redis]\nurl = \"{}\"\n[health_check]\nrefresh_interval_secs = 0.2\nmin_interval_secs = 0.05\n",
            dir.path().join("c.sqlite3").display(),
            redis.url()
        ),
    );
    let coord = coordinator.addr;
    let port = common::free_port();
    let worker = start_worker(&format!(
        "[worker]\nauthority = \"w1\"\ncores = 2\nbind_host = \"127.0.0.1\"\nhostname = \"127.0.0.1\"\napi_port = {}\nport_range = [{port}, {port}]\n[coordinator]\nurl = \"http://{coord}\"\npoll_interval_ms = 60000\n[redis]\nurl = \"{}\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\npermit_secret = \"permit\"\n",
        common::free_port(),
        redis.url()
    ));
    common::wait_registered(coord, "w1");
    // The agent listens for circuit events before any is sent.
    common::wait_log(&sink, "subscribed to circuit events");

    let e = "e7c08c1e-9a4d-4e6f-8b7a-1c2d3e4f5a71";
    post(
        coord,
        &format!("/v2/endpoints/{e}"),
        r#"{"service_name":"llama","tags":{"session":{"user_uuid":"3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b","project_id":"9a1e8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b","domain_name":"default"},"endpoint":{"runtime_variant":"vllm","existing_url":null}},
           "health_check":{"enable":true,"interval":0.3,"path":"/health","max_retries":2,"max_wait_time":0.5,"expected_status_code":200,"initial_delay":0}}"#,
    );
    let frontend = SocketAddr::from(([127, 0, 0, 1], port));
    let token = post(
        coord,
        &format!("/v2/endpoints/{e}/token"),
        r#"{"user_uuid":"3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b","exp":4070908800}"#,
    )["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let bearer = format!("Authorization: Bearer {token}\r\n");

    let (a, b) = (Replica::start("model-a"), Replica::start("model-b"));
    let (ra, rb) = (
        "0b9e8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a71",
        "0b9e8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a72",
    );
    let (sa, sb) = (
        "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a71",
        "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a72",
    );
    let route = |id: &str, session: &str, addr: SocketAddr| {
        format!(
            r#"{{"session_id":"{session}","route_id":"{id}","kernel_host":"127.0.0.1","kernel_port":{}}}"#,
            addr.port()
        )
    };
    post(
        coord,
        "/v2/endpoints/bulk/routes/register",
        &format!(
            r#"{{"endpoints":[{{"deployment_id":"{e}","routes":[{},{}]}}]}}"#,
            route(ra, sa, a.addr),
            route(rb, sb, b.addr)
        ),
    );
    // Both replicas pass their first probes: the manager hears they are healthy.
    let healthy = until_event(redis.port, ra, "healthy", 1);
    assert_eq!(healthy["session_id"], sa);
    assert_eq!(healthy["endpoint_id"], e);
    until_event(redis.port, rb, "healthy", 1);
    // Both serve.
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.hits() == 0 || b.hits() == 0 {
        let (status, _, body) = call(frontend, &bearer, "both");
        assert_eq!(status, 200, "{body}");
        assert!(Instant::now() < deadline, "traffic did not reach both");
    }

    // A fails its health path: out of rotation, the manager told, B answers.
    a.set(FAILING);
    let down = until_event(redis.port, ra, "unhealthy", 1);
    assert!(
        down["reason"].as_str().is_some_and(|r| r.contains("500")),
        "{down}"
    );
    settle_on(frontend, &bearer, "model-b", 10);
    let before = a.hits();
    for i in 0..40 {
        let (status, _, body) = call(frontend, &bearer, &format!("only-b-{i}"));
        assert_eq!((status, body.as_str()), (200, "model-b"));
    }
    assert_eq!(a.hits(), before, "no request reached the unhealthy replica");

    // A recovers: healthy again, traffic returns.
    a.set(OK);
    until_event(redis.port, ra, "healthy", 2);
    let before = a.hits();
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.hits() == before {
        let (status, _, _) = call(frontend, &bearer, "back");
        assert_eq!(status, 200);
        assert!(Instant::now() < deadline, "traffic did not return to A");
    }

    // Both fail: 503 JSON with the request ID.
    a.set(FAILING);
    b.set(FAILING);
    until_event(redis.port, ra, "unhealthy", 2);
    until_event(redis.port, rb, "unhealthy", 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    let (head, body) = loop {
        let (status, head, body) = call(frontend, &bearer, "all-down-1");
        if status == 503 {
            break (head, body);
        }
        assert!(
            Instant::now() < deadline,
            "no 503 with every route unhealthy: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let err: serde_json::Value = serde_json::from_str(&body).expect("JSON error");
    assert_eq!(err["code"], "no_healthy_route", "{body}");
    assert_eq!(err["request_id"], "all-down-1");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-backend-request-id: all-down-1"),
        "{head}"
    );

    // Both recover; then A hangs (accepts, never answers): taken out the same way.
    a.set(OK);
    b.set(OK);
    until_event(redis.port, ra, "healthy", 3);
    until_event(redis.port, rb, "healthy", 2);
    a.set(HANGING);
    let hung = until_event(redis.port, ra, "unhealthy", 3);
    assert!(
        hung["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no answer within")),
        "{hung}"
    );
    settle_on(frontend, &bearer, "model-b", 10);
    let before = a.hits();
    for i in 0..40 {
        let (status, _, body) = call(frontend, &bearer, &format!("hung-{i}"));
        assert_eq!((status, body.as_str()), (200, "model-b"));
    }
    assert_eq!(a.hits(), before, "no request reached the hanging replica");
    // The log is read before the hanging replica is released: once it answers, the
    // probe in flight to it would log a seventh change.
    let logs = String::from_utf8_lossy(&sink.0.lock().expect("sink")).into_owned();
    a.set(OK);

    // Every probe ran under a request ID of its own.
    let ids = a.probe_ids.lock().expect("ids").clone();
    assert!(ids.len() > 5, "{ids:?}");
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "probe IDs repeat: {ids:?}");
    // Each change is logged with route, endpoint and reason, under the ID of the probe
    // that decided it (the one the replica saw).
    let changes: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["message"] == "route health changed" && l["route"] == ra)
        .collect();
    assert_eq!(changes.len(), 6, "{changes:?}");
    for c in &changes {
        assert_eq!(c["endpoint"], e, "{c}");
        assert!(c["reason"].as_str().is_some_and(|r| !r.is_empty()), "{c}");
        let id = c["request_id"].as_str().unwrap_or_default().to_owned();
        assert!(ids.contains(&id), "{c} not under a probe's ID");
    }

    // The prober's work is counted in the coordinator's metrics.
    let (status, _, metrics) = http(
        coord,
        "GET /metrics HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(
        value("appproxy_coordinator_health_probes_total ") > 10,
        "{metrics}"
    );
    assert!(
        value("appproxy_coordinator_health_probe_failures_total ") >= 6,
        "{metrics}"
    );
    assert!(
        value("appproxy_coordinator_route_health_changes_total ") >= 6,
        "{metrics}"
    );

    worker.stop();
    coordinator.stop();
}

/// As the platform keeps its Redis — keys in database 2, streams in database 4, each
/// read there by the manager — with `[redis] url = …/2` and `stream_db = 4`: a
/// heartbeat's `proxy-worker.last_seen` is written in database 2, and the lost
/// worker's `worker_lost` goes to database 4's stream, none to 2's or 0's.
#[test]
fn with_stream_db_the_streams_go_to_their_database_and_the_keys_stay_in_the_urls() {
    let redis = common::redis::Redis::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = start_coordinator(&format!(
        "[coordinator]\nbind = \"127.0.0.1:0\"\nworker_heartbeat_timeout_secs = 1\ncheck_worker_lost_interval_secs = 1\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\nsqlite_path = \"{}\"\n[redis]\nurl = \"{}2\"\nstream_db = 4\n",
        dir.path().join("c.sqlite3").display(),
        redis.url()
    ));
    let coord = coordinator.addr;
    let body = r#"{"authority":"gone-2","frontend_mode":"port","protocol":"http","hostname":"127.0.0.1","tls_listen":false,"tls_advertised":false,"api_port":10201,"port_range":[30000,30010],"accepted_traffics":["interactive","inference"],"filtered_apps_only":false}"#;
    let (status, _, text) = http(coord, &format!("PUT /api/worker?brief=true HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()));
    assert_eq!(status, 200, "{text}");
    let id = serde_json::from_str::<serde_json::Value>(&text).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    // One heartbeat, then none: the leader finds it lost.
    let (status, _, text) = http(coord, &format!("PATCH /api/worker/{id} HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"));
    assert_eq!(status, 200, "{text}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if stream_payloads_in(redis.port, 4, "events-appproxy")
            .iter()
            .any(|(n, p)| n == "worker_lost" && p["worker_id"] == "gone-2")
        {
            break;
        }
        assert!(Instant::now() < deadline, "no worker_lost in database 4");
        std::thread::sleep(Duration::from_millis(100));
    }
    for db in [0, 2] {
        assert!(
            stream_payloads_in(redis.port, db, "events-appproxy").is_empty(),
            "a stream entry in database {db}"
        );
    }
    let last_seen = |db: u8| {
        let out = std::process::Command::new("redis-cli")
            .args([
                "-p",
                &redis.port.to_string(),
                "-n",
                &db.to_string(),
                "--raw",
                "HGET",
                "proxy-worker.last_seen",
                "gone-2",
            ])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert!(
        last_seen(2).parse::<f64>().is_ok_and(|t| t > 1.0e9),
        "last_seen in database 2: {:?}",
        last_seen(2)
    );
    assert_eq!(last_seen(4), "", "no key in the streams' database");
    coordinator.stop();
}

#[test]
fn the_leader_announces_a_lost_worker_on_the_anycast_stream() {
    let redis = common::redis::Redis::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = start_coordinator(
        &format!(
            "[coordinator]\nbind = \"127.0.0.1:0\"\nworker_heartbeat_timeout_secs = 1\ncheck_worker_lost_interval_secs = 1\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\nsqlite_path = \"{}\"\n[redis]\nurl = \"{}\"\n[health_check]\nevent_envelope = \"both\"\n",
            dir.path().join("c.sqlite3").display(),
            redis.url()
        ),
    );
    let coord = coordinator.addr;
    let body = r#"{"authority":"gone-1","frontend_mode":"port","protocol":"http","hostname":"127.0.0.1","tls_listen":false,"tls_advertised":false,"api_port":10201,"port_range":[30000,30010],"accepted_traffics":["interactive","inference"],"filtered_apps_only":false}"#;
    let (status, _, text) = http(coord, &format!("PUT /api/worker HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()));
    assert_eq!(status, 200, "{text}");
    // It never heartbeats: the leader marks it LOST and says so on events-appproxy.
    let deadline = Instant::now() + Duration::from_secs(20);
    let lost = loop {
        if let Some((_, p)) = stream_payloads(redis.port, "events-appproxy")
            .into_iter()
            .find(|(n, _)| n == "worker_lost")
        {
            break p;
        }
        assert!(Instant::now() < deadline, "no worker_lost event");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        lost,
        serde_json::json!({"worker_id": "gone-1", "reason": "heartbeat timeout"})
    );
    // Legacy consumers read `args`: msgpack of [authority, reason].
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "--raw",
            "XRANGE",
            "events-appproxy",
            "-",
            "+",
        ])
        .output()
        .expect("redis-cli");
    let raw = out.stdout;
    let mut want = vec![0x92, 0xa6];
    want.extend_from_slice(b"gone-1");
    want.push(0xb1);
    want.extend_from_slice(b"heartbeat timeout");
    assert!(
        raw.windows(want.len()).any(|w| w == want.as_slice()),
        "no msgpack args in {}",
        String::from_utf8_lossy(&raw)
    );
    coordinator.stop();
}
