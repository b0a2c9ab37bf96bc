//! Circuit events forged on Redis. Anything that can publish on the coordinator's
//! Redis (another service sharing it, a compromised host) can publish the events the
//! coordinator publishes; a worker that deployed the circuits an event carried could
//! be made to open a circuit to any address, reroute a user's circuit to one, or
//! remove it. With `[redis] circuits_from = "coordinator"` an event is only a sign
//! to read what changed from the coordinator's API: forged events change nothing,
//! and real ones still deploy at once. By default (`"event"`, the original's
//! behaviour, for a Redis only the coordinators can publish on) the carried circuits
//! are deployed, as the same forged events show.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use appproxy_shared::model::{BroadcastMessage, EventMetadata, RequestIdText, BROADCAST_CHANNEL};
use appproxy_test_support::net::ReadUninterrupted;
use common::http;

const USER: &str = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";

/// An app answering every request with `body`, on a free loopback port.
fn app(body: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("app");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = vec![0u8; 8192];
            let _ = s.read_uninterrupted(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// What a client gets from the circuit on `port`: the app's body, or `None` when
/// nothing listens there.
fn served(port: u16) -> Option<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect(addr).ok()?;
    let cookie = common::permit_cookie(USER);
    let (status, _, body) = http(
        addr,
        &format!("GET / HTTP/1.1\r\nHost: t\r\nCookie: appproxy_permit=\"{cookie}\"\r\nConnection: close\r\n\r\n"),
    );
    Some(format!("{status} {body}"))
}

/// The manager's creation of a circuit for `session` (kernel on `kernel_port`),
/// answered once the worker acknowledged it: its ID and port.
fn create(coord: SocketAddr, kernel_port: u16, session: &str) -> (String, u16) {
    let id = common::create_circuit(coord, kernel_port, session, USER, "jupyter", "http");
    let (status, _, body) = http(
        coord,
        &format!("GET /api/circuit/{id} HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 200, "{body}");
    let port = serde_json::from_str::<serde_json::Value>(&body).expect("json")["port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("a port: {body}"));
    (id, port)
}

/// Publishes `body` as the coordinator's event `name`, as anything that can
/// publish on the Redis can.
fn forge(redis_url: &str, name: &str, body: &serde_json::Value, request_id: &str) {
    let meta = EventMetadata {
        request_id: Some(RequestIdText(request_id.to_owned())),
        ..Default::default()
    };
    let envelope =
        BroadcastMessage::encode(name, "appproxy-coordinator", body, &meta).expect("envelope");
    let mut conn = redis::Client::open(redis_url)
        .expect("redis url")
        .get_connection()
        .expect("redis");
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg(BROADCAST_CHANNEL)
        .arg(serde_json::to_string(&envelope).expect("json"))
        .query(&mut conn)
        .expect("publish");
    assert!(receivers >= 1, "the worker hears the channel");
}

/// What the forged events did, seen by clients.
struct Outcome {
    /// The real circuit after a forged route update to the attacker's app.
    rerouted: Option<String>,
    /// The port of a forged creation.
    planted: Option<String>,
    /// The real circuit after a forged removal.
    removed: Option<String>,
}

/// One forgery run at a time: the tests of this file share one process under
/// `cargo test`, and with it the log sink their waits read.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// This process's log lines (one subscriber per process).
fn logs() -> &'static common::Sink {
    static SINK: std::sync::OnceLock<common::Sink> = std::sync::OnceLock::new();
    SINK.get_or_init(common::capture_logs)
}

/// Waits (bounded) until `line` was logged `n` more times than `before`.
fn wait_more(sink: &common::Sink, line: &str, before: usize, n: usize) {
    common::wait_logs(sink, line, before + n, Duration::from_secs(10));
}

/// Runs the forgeries against a worker with `redis_extra` in its `[redis]` table.
fn forgeries(redis_extra: &str) -> Outcome {
    let _serial = serial();
    let sink = logs();
    let count = |line: &str| sink.text().matches(line).count();
    let redis = appproxy_test_support::redis::Redis::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = common::start_coordinator(&format!(
        "[coordinator]\nbind = \"127.0.0.1:0\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\nsqlite_path = \"{}\"\n[redis]\nurl = \"{}\"\n",
        dir.path().join("c.sqlite3").display(),
        redis.url()
    ));
    let coord = coordinator.addr;
    // Four frontend ports beside the API and admin ports; the poll is a minute away
    // (only events act here).
    let (api, admin) = (
        appproxy_test_support::free_port(),
        appproxy_test_support::free_port(),
    );
    let first = loop {
        let p = appproxy_test_support::free_port();
        let range = p..=p.saturating_add(3);
        if p < 60_000
            && !range.contains(&api)
            && !range.contains(&admin)
            && (1..4).all(|i| TcpListener::bind(("127.0.0.1", p + i)).is_ok())
        {
            break p;
        }
    };
    let subscribed = count("subscribed to circuit events");
    let worker = common::start_worker(&format!(
        "[worker]\nauthority = \"w1\"\ncores = 1\nbind_host = \"127.0.0.1\"\nhostname = \"127.0.0.1\"\napi_port = {api}\nport_range = [{first}, {}]\n[admin]\nbind = \"127.0.0.1:{admin}\"\n[coordinator]\nurl = \"http://{coord}\"\npoll_interval_ms = 60000\n[redis]\nurl = \"{}\"\n{redis_extra}\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\npermit_secret = \"permit\"\n",
        first + 3,
        redis.url()
    ));
    wait_more(sink, "subscribed to circuit events", subscribed, 1);
    let heard = count("circuit event received");
    common::wait_registered(coord, "w1");
    let (honest, attacker) = (app("honest"), app("attacker"));
    let (id, port) = create(coord, honest, "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a61");
    assert_eq!(served(port).as_deref(), Some("200 honest"));

    // The real circuit as the coordinator has it, rerouted to the attacker's app.
    let (_, _, body) = http(
        coord,
        &format!("GET /api/circuit/{id} HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n"),
    );
    let mut circuit: serde_json::Value = serde_json::from_str(&body).expect("json");
    let session = circuit["route_info"][0]["session_id"].clone();
    let routes = serde_json::json!([{
        "session_id": session, "kernel_host": "127.0.0.1", "kernel_port": attacker,
        "traffic_ratio": 1.0
    }]);
    circuit["route_info"] = routes.clone();
    forge(
        &redis.url(),
        appproxy_shared::model::EVENT_CIRCUIT_ROUTE_UPDATED,
        &serde_json::json!({
            "target_worker_authority": "w1", "circuit": circuit, "routes": routes
        }),
        "forged-1",
    );
    // A circuit of its own on a free port of the worker, open to anyone.
    // The coordinator gives the lowest free port: the real circuits take the first
    // three.
    assert_eq!(port, first);
    let planted_port = first + 3;
    let mut planted = circuit.clone();
    planted["id"] = serde_json::json!("c0a8f5d2-1111-4222-8333-0000000000aa");
    planted["port"] = serde_json::json!(planted_port);
    planted["open_to_public"] = serde_json::json!(true);
    forge(
        &redis.url(),
        appproxy_shared::model::EVENT_CIRCUIT_CREATED,
        &serde_json::json!({"target_worker_authority": "w1", "circuits": [planted]}),
        "forged-2",
    );
    wait_more(sink, "circuit event received", heard, 3);
    // A real creation after them: answered once the worker acknowledged it, that is
    // once it dealt with every event before it.
    let (_, second) = create(coord, honest, "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a62");
    assert_ne!(second, planted_port);
    assert_eq!(served(second).as_deref(), Some("200 honest"));
    let rerouted = served(port);
    let planted = served(planted_port);

    forge(
        &redis.url(),
        appproxy_shared::model::EVENT_CIRCUIT_REMOVED,
        &serde_json::json!({"target_worker_authority": "w1", "circuits": [circuit]}),
        "forged-3",
    );
    wait_more(sink, "circuit event received", heard, 5);
    let (_, third) = create(coord, honest, "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a63");
    assert_ne!(third, planted_port);
    assert_eq!(served(third).as_deref(), Some("200 honest"));
    let removed = served(port);
    worker.stop();
    coordinator.stop();
    Outcome {
        rerouted,
        planted,
        removed,
    }
}

#[test]
fn forged_circuit_events_change_nothing_where_circuits_come_from_the_coordinator() {
    let seen = forgeries("circuits_from = \"coordinator\"");
    assert_eq!(seen.rerouted.as_deref(), Some("200 honest"), "rerouted");
    assert_eq!(seen.planted, None, "a circuit planted");
    assert_eq!(seen.removed.as_deref(), Some("200 honest"), "removed");
}

/// The same forgeries against a worker that trusts its Redis (the default): they
/// work, so the test above shows the setting stopping them, not forgeries that never
/// read.
#[test]
fn forged_circuit_events_deploy_where_events_are_trusted() {
    let seen = forgeries("");
    assert_eq!(seen.rerouted.as_deref(), Some("200 attacker"), "rerouted");
    assert_eq!(seen.planted.as_deref(), Some("200 attacker"), "planted");
    assert_eq!(seen.removed, None, "removed");
}
