//! Faults, with real PostgreSQL and Redis started here. Circuits are created while
//! Redis is stopped and started again, then the coordinator and the worker are
//! restarted; after each fault the worker ends with exactly the circuits the store
//! holds — every creation answered 200 is routable, every one answered 503 was
//! withdrawn and is not — and nothing is half-written.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{http, start_coordinator, start_worker, Sink};

const SESSION: &str = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
const PORTS: u16 = 16;

fn count(sink: &Sink, needle: &str) -> usize {
    String::from_utf8_lossy(&sink.0.lock().expect("sink"))
        .matches(needle)
        .count()
}

fn wait_for(sink: &Sink, needle: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(sink, needle) < n {
        assert!(Instant::now() < deadline, "no {n}× {needle:?} in the logs");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Creates one circuit under `id`; its status and (when created) its port.
fn create(coord: SocketAddr, token: &str, id: &str) -> (u16, Option<u16>) {
    let (status, _, body) = http(
        coord,
        &format!("GET /v2/proxy/auth?token={token}&session_id={SESSION}&app=jupyter&protocol=http&no_reuse=true HTTP/1.1\r\nHost: c\r\nAccept: application/json\r\nX-Backend-Request-ID: {id}\r\nConnection: close\r\n\r\n"),
    );
    let port = (status == 200).then(|| {
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        let url = v["redirect_url"].as_str().expect("url");
        let token = url.split("token=").nth(1).expect("token");
        let circuit = appproxy_shared::jwt::verify_hs256(token.as_bytes(), "jwt").expect("jwt")["circuit"]
            .as_str()
            .expect("circuit")
            .to_owned();
        let (_, _, body) = http(coord, &format!("GET /api/circuit/{circuit} HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n"));
        serde_json::from_str::<serde_json::Value>(&body).expect("json")["port"].as_u64().expect("port") as u16
    });
    (status, port)
}

/// The ports the store assigns to this worker's circuits.
fn stored_ports(coord: SocketAddr) -> Vec<u16> {
    let (_, _, body) = http(
        coord,
        "GET /api/slots HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n",
    );
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let mut ports: Vec<u16> = v["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .map(|s| s["port"].as_u64().expect("port") as u16)
        .collect();
    ports.sort_unstable();
    ports
}

/// Waits until the worker listens on exactly the stored ports of the range.
fn converges(coord: SocketAddr, base: u16, what: &str) -> Vec<u16> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stored = stored_ports(coord);
        let listening: Vec<u16> = (base..base + PORTS)
            .filter(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok())
            .collect();
        if listening == stored {
            return stored;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the worker listens on {listening:?}, the store holds {stored:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn redis_coordinator_and_worker_restarts_lose_no_circuit() {
    let sink = common::capture_logs();
    let mut redis = common::redis::Redis::start();
    let pg = common::pg::Pg::start();
    // First on a port the kernel picks; the restart binds the same one (the worker
    // knows the coordinator by it).
    let (pg_url, redis_url) = (pg.url(), redis.url());
    let coord_text = |bind: &str| {
        format!(
            "[coordinator]\nbind = \"{bind}\"\nworker_ack_timeout_secs = 5.0\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\nurl = \"{pg_url}\"\n[redis]\nurl = \"{redis_url}\"\n"
        )
    };
    let coordinator = start_coordinator(&coord_text("127.0.0.1:0"));
    let coord = coordinator.addr;
    let base = appproxy_test_support::free_range(PORTS);
    let worker_text = format!(
        "[worker]\nauthority = \"w1\"\ncores = 2\nbind_host = \"127.0.0.1\"\nhostname = \"127.0.0.1\"\napi_port = {}\nport_range = [{base}, {}]\n[coordinator]\nurl = \"http://{coord}\"\npoll_interval_ms = 60000\nheartbeat_secs = 1\n[redis]\nurl = \"{}\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\npermit_secret = \"permit\"\n",
        common::free_port(),
        base + PORTS - 1,
        redis.url()
    );
    let worker = start_worker(&worker_text);
    wait_for(&sink, "subscribed to circuit events", 1);
    let conf = format!(
        r#"{{"login_session_token":null,"kernel_host":"127.0.0.1","kernel_port":9,"session":{{"id":"{SESSION}","user_uuid":"{SESSION}","group_id":"{SESSION}","access_key":"AK","domain_name":"default"}}}}"#
    );
    let (status, _, body) = http(coord, &format!("POST /v2/conf HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{conf}", conf.len()));
    assert_eq!(status, 200, "{body}");
    let token = serde_json::from_str::<serde_json::Value>(&body).expect("json")["token"]
        .as_str()
        .expect("token")
        .to_owned();

    // Redis goes away in the middle of a run of creations and comes back.
    let mut answers = Vec::new();
    for i in 0..8 {
        if i == 3 {
            redis.stop();
        }
        if i == 5 {
            redis.restart();
        }
        answers.push(create(coord, &token, &format!("fault-{i}")));
    }
    let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    assert_eq!(&statuses[..3], &[200, 200, 200], "before the fault");
    assert!(
        statuses[3..5].iter().all(|s| *s == 503),
        "no Redis, no acknowledgement: {statuses:?}"
    );
    // Once the worker is subscribed again, creations work again.
    wait_for(&sink, "subscribed to circuit events", 2);
    // And the coordinator listens for acknowledgements again.
    wait_for(&sink, "listening for acknowledgements", 2);
    for i in 8..10 {
        let (status, _) = create(coord, &token, &format!("fault-{i}"));
        assert_eq!(status, 200, "after the worker resubscribed");
    }
    let stored = converges(coord, base, "after the Redis restart");
    let created: Vec<u16> = answers.iter().filter_map(|a| a.1).collect();
    assert!(
        created.iter().all(|p| stored.contains(p)),
        "every 200 is stored: {created:?} ⊄ {stored:?}"
    );
    assert_eq!(
        stored.len(),
        created.len() + 2,
        "every 503 was withdrawn: {statuses:?}"
    );

    // The coordinator restarts: state intact, creations go on.
    coordinator.stop();
    let coordinator = start_coordinator(&coord_text(&coord.to_string()));
    assert_eq!(
        stored_ports(coord),
        stored,
        "state survives a coordinator restart"
    );
    let (status, port) = create(coord, &token, "after-coordinator-restart");
    assert_eq!(status, 200);
    let stored = converges(coord, base, "after the coordinator restart");
    assert!(stored.contains(&port.expect("port")));

    // The worker restarts: it gets its circuits back from the coordinator.
    worker.stop();
    let after_stop: Vec<u16> = (base..base + PORTS)
        .filter(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok())
        .collect();
    assert!(
        after_stop.is_empty(),
        "a stopped worker listens on nothing: {after_stop:?}"
    );
    let worker = start_worker(&worker_text);
    assert_eq!(converges(coord, base, "after the worker restart"), stored);
    worker.stop();
    coordinator.stop();
    // The worker deregistered when it stopped and registered again on the same row.
    assert_eq!(
        pg.psql(
            "appproxy",
            "SELECT count(*) || ' ' || max(nodes) || ' ' || max(status) FROM workers"
        ),
        "1 0 LOST",
        "stopped last: deregistered"
    );
    // Nothing half-written: every stored circuit has its ID from the manager.
    assert_eq!(
        pg.psql(
            "appproxy",
            "SELECT count(*) FROM circuits WHERE origin_request_id IS NULL"
        ),
        "0"
    );
}
