//! The worker counts its Redis event subscription's reconnections: with a real
//! coordinator (SQLite store) and a real Redis started here, Redis is restarted under
//! a subscribed worker; the worker subscribes again and its admin `/metrics` shows
//! `appproxy_worker_redis_reconnects_total` gone up. (Its own test binary: the
//! counter is process-wide, as a worker process has one subscription.)

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use appproxy_test_support::prom::Exposition;
use common::{http, start_coordinator, start_worker, wait_logs};

/// The worker's reconnect counter as its admin endpoint exports it (with its
/// `# HELP` and `# TYPE` lines).
fn reconnects(admin: SocketAddr) -> u64 {
    const NAME: &str = "appproxy_worker_redis_reconnects_total";
    let (status, _, text) = http(
        admin,
        "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{text}");
    let e = Exposition::parse(&text);
    assert!(e.helps.contains_key(NAME), "no # HELP {NAME}:\n{text}");
    assert_eq!(
        e.kinds.get(NAME).map(String::as_str),
        Some("counter"),
        "{text}"
    );
    e.value(NAME, "")
        .unwrap_or_else(|| panic!("no reconnect counter in /metrics:\n{text}")) as u64
}

#[test]
fn a_redis_restart_is_counted_as_a_reconnect() {
    let sink = common::capture_logs();
    let mut redis = common::redis::Redis::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = start_coordinator(&format!(
        "[coordinator]\nbind = \"127.0.0.1:0\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\nsqlite_path = \"{}\"\n[redis]\nurl = \"{}\"\n",
        dir.path().join("c.sqlite3").display(),
        redis.url()
    ));
    let coord = coordinator.addr;
    let port = common::free_port();
    let worker = start_worker(&format!(
        "[worker]\nauthority = \"w1\"\ncores = 1\nbind_host = \"127.0.0.1\"\nhostname = \"127.0.0.1\"\napi_port = {}\nport_range = [{port}, {port}]\n[coordinator]\nurl = \"http://{coord}\"\npoll_interval_ms = 60000\n[redis]\nurl = \"{}\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\npermit_secret = \"permit\"\n",
        common::free_port(),
        redis.url()
    ));
    let admin = appproxy_dataplane::admin::spawn(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        worker.worker.metrics.clone(),
        worker.worker.health_info(),
    )
    .expect("admin");
    wait_logs(
        &sink,
        "subscribed to circuit events",
        1,
        Duration::from_secs(30),
    );
    let before = reconnects(admin);
    assert_eq!(before, 0, "a first subscription is no reconnect");

    redis.restart();
    // The dropped subscription is noticed and replaced.
    wait_logs(
        &sink,
        "subscribed to circuit events",
        2,
        Duration::from_secs(30),
    );
    let after = reconnects(admin);
    assert!(after > before, "reconnects {before} → {after}");
    worker.stop();
    coordinator.stop();
}
