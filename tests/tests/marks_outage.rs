//! A worker's last-access marks outlive a Redis that refuses writes: a connection
//! made while Redis is full (`maxmemory` with `noeviction`) is marked once Redis
//! takes writes again, with the time it was made and counted once, though no
//! request comes after. Otherwise the circuit would look idle since before the
//! outage, and idle collection could remove it while it was in use. A real Redis, a
//! real coordinator (SQLite store) and a worker, started here.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{start_coordinator, start_worker, wait_logs};

const SESSION: &str = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";

fn config_set(conn: &mut redis::Connection, key: &str, value: &str) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(key)
        .arg(value)
        .query(conn)
        .expect("CONFIG SET");
}

/// A coordinator on SQLite in `dir`, with Redis at `redis_url`.
fn coordinator_on(dir: &std::path::Path, redis_url: &str) -> common::CoordinatorThread {
    start_coordinator(&format!(
        "[coordinator]\nbind = \"127.0.0.1:0\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\nsqlite_path = \"{}\"\n[redis]\nurl = \"{redis_url}\"\n",
        dir.join("c.sqlite3").display(),
    ))
}

/// A managed worker's config: one core, the one frontend port `port`, marks
/// flushed every 100 ms, `extra` in its `[coordinator]` section.
fn worker_config(coord: std::net::SocketAddr, port: u16, redis_url: &str, extra: &str) -> String {
    format!(
        "[worker]\nauthority = \"w1\"\ncores = 1\nbind_host = \"127.0.0.1\"\nhostname = \"127.0.0.1\"\napi_port = {}\nport_range = [{port}, {port}]\n[coordinator]\nurl = \"http://{coord}\"\naccess_flush_ms = 100\n{extra}[redis]\nurl = \"{redis_url}\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\npermit_secret = \"permit\"\n",
        common::free_port(),
    )
}

/// Creates [`SESSION`]'s TCP circuit to the echo app on `echo_port` as the manager
/// does; its ID.
fn create_tcp_circuit(coord: std::net::SocketAddr, echo_port: u16) -> String {
    common::create_circuit(coord, echo_port, SESSION, SESSION, "ssh", "tcp")
}

/// One echo on `c`, a connection to the circuit's frontend.
fn echo_through(c: &mut TcpStream) {
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    c.write_all(b"ping").expect("write");
    let mut got = [0u8; 4];
    c.read_exact(&mut got).expect("echo");
    assert_eq!(&got, b"ping");
}

#[test]
fn marks_refused_by_a_full_redis_are_written_once_it_takes_writes() {
    let sink = common::capture_logs();
    let redis = common::redis::Redis::start();
    let mut conn = redis::Client::open(redis.url())
        .expect("url")
        .get_connection()
        .expect("redis");
    let echo_port = common::tcp_echo_app();
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = coordinator_on(dir.path(), &redis.url());
    let coord = coordinator.addr;
    let port = common::free_port();
    let worker = start_worker(&worker_config(coord, port, &redis.url(), ""));
    wait_logs(
        &sink,
        "subscribed to circuit events",
        1,
        Duration::from_secs(30),
    );
    let circuit = create_tcp_circuit(coord, echo_port);
    let last_access_key = format!("circuit.{circuit}.last_access");
    let requests_key = format!("circuit.{circuit}.requests");

    // Redis fills up: every write is refused from now on.
    config_set(&mut conn, "maxmemory-policy", "noeviction");
    config_set(&mut conn, "maxmemory", "1");
    let refused: redis::RedisResult<()> = redis::cmd("SET").arg("probe").arg("1").query(&mut conn);
    assert!(refused.is_err(), "a full Redis refuses writes");

    // One connection through the circuit, during the outage; none after.
    let used_at = appproxy_shared::jwt::now_epoch();
    {
        let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        echo_through(&mut c);
    }
    // A flush fails while Redis is full, and a few more flush periods pass.
    wait_logs(
        &sink,
        "last-access marks not written",
        1,
        Duration::from_secs(20),
    );
    std::thread::sleep(Duration::from_millis(500));
    let during: Option<String> = redis::cmd("GET")
        .arg(&last_access_key)
        .query(&mut conn)
        .expect("GET");
    assert_eq!(during, None, "nothing was written while Redis was full");
    let freed_at = appproxy_shared::jwt::now_epoch();
    config_set(&mut conn, "maxmemory", "0");

    // The mark lands without another request: the time of the connection, counted
    // once however many flushes failed.
    let deadline = Instant::now() + Duration::from_secs(10);
    let at = loop {
        let got: Option<String> = redis::cmd("GET")
            .arg(&last_access_key)
            .query(&mut conn)
            .expect("GET");
        if let Some(at) = got {
            break at.parse::<f64>().expect("epoch seconds");
        }
        assert!(
            Instant::now() < deadline,
            "the access made while Redis was full was never marked"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        at >= used_at - 1.0 && at <= freed_at,
        "marked at {at}: used at {used_at}, Redis freed at {freed_at}"
    );
    let requests: Option<u64> = redis::cmd("GET")
        .arg(&requests_key)
        .query(&mut conn)
        .expect("GET");
    assert_eq!(requests, Some(1), "counted once");
    let session: Option<String> = redis::cmd("GET")
        .arg(format!("session.{SESSION}.last_access"))
        .query(&mut conn)
        .expect("GET");
    assert_eq!(
        session.as_deref(),
        Some(format!("{at:.6}").as_str()),
        "the session is marked with it"
    );
    worker.stop();
    coordinator.stop();
}

/// A worker whose clock is 10 minutes behind the store's writes its marks on the
/// store's clock, as its heartbeats measure it, and says so: its marks looked 10
/// minutes old, and idle collection removed its circuits that much early (circuits
/// in use, once the lag passed the idle timeout). The worker is a process of its
/// own under libfaketime (its wall clock only); Redis and the coordinator (SQLite:
/// the store's clock is the coordinator's) keep the real time.
#[test]
fn a_worker_behind_the_stores_clock_marks_on_the_stores_clock() {
    const BEHIND_SECS: f64 = 600.0;
    let redis = common::redis::Redis::start();
    let mut conn = redis::Client::open(redis.url())
        .expect("url")
        .get_connection()
        .expect("redis");
    let echo_port = common::tcp_echo_app();
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = coordinator_on(dir.path(), &redis.url());
    let coord = coordinator.addr;
    let port = common::free_port();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        worker_config(coord, port, &redis.url(), "heartbeat_secs = 1\n"),
    )
    .expect("config");
    let log = dir.path().join("worker.log");
    let worker = std::process::Command::new(env!("CARGO_BIN_EXE_appproxy-e2e-worker"))
        .arg("--config")
        .arg(&config)
        .env(
            "LD_PRELOAD",
            appproxy_test_support::pg::faketime_library_mt(),
        )
        .env("FAKETIME", format!("-{BEHIND_SECS}s"))
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start the worker process");
    // Killed however the test ends (a failed assertion included).
    let _worker = Killed(worker);
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let wait_for = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !logs().contains(what) {
            assert!(Instant::now() < deadline, "no {what:?} in:\n{}", logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("subscribed to circuit events");
    // Its heartbeats measured the lag, and it said so.
    wait_for("this worker's clock differs from the store's");
    let circuit = create_tcp_circuit(coord, echo_port);
    let used_at = appproxy_shared::jwt::now_epoch();
    {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut c = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(c) => break c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "never deployed: {e}\n{}", logs());
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        echo_through(&mut c);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let at = loop {
        let got: Option<String> = redis::cmd("GET")
            .arg(format!("circuit.{circuit}.last_access"))
            .query(&mut conn)
            .expect("GET");
        if let Some(at) = got {
            break at.parse::<f64>().expect("epoch seconds");
        }
        assert!(Instant::now() < deadline, "never marked:\n{}", logs());
        std::thread::sleep(Duration::from_millis(20));
    };
    let now = appproxy_shared::jwt::now_epoch();
    assert!(
        at >= used_at - 2.0 && at <= now + 2.0,
        "marked at {at}, {:.0} s before its use at {used_at}",
        used_at - at
    );
    coordinator.stop();
}

/// A child process killed and reaped when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
