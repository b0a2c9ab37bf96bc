//! Readiness of a managed worker (`/readyz`), apart from its liveness (`/livez`):
//! with its coordinator away the worker is alive but not ready (it has no circuit set
//! yet, so a load balancer must not send it clients); once the coordinator answers
//! and every core applied the first set, it is ready. Real coordinator (SQLite), real
//! worker and agent, the admin endpoint and the API port (which answers the
//! original's probes) over real sockets.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{free_port, http, start_coordinator, start_worker};

/// `GET path` on the admin endpoint: its status and body.
fn admin(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
    );
    (status, body)
}

#[test]
fn a_managed_worker_is_ready_only_once_its_first_circuit_set_is_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator_config = |bind: &str| {
        format!(
            "[coordinator]\nbind = \"{bind}\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\nsqlite_path = \"{}\"\n",
            dir.path().join("c.sqlite3").display()
        )
    };
    // The coordinator's address is learned from a first start, then it is stopped:
    // the worker starts while nothing answers there.
    let first = start_coordinator(&coordinator_config("127.0.0.1:0"));
    let coord = first.addr;
    first.stop();
    let port = free_port();
    let api_port = free_port();
    let api = SocketAddr::from(([127, 0, 0, 1], api_port));
    let worker = start_worker(&format!(
        "[worker]\nauthority = \"w1\"\ncores = 1\nbind_host = \"127.0.0.1\"\nhostname = \"127.0.0.1\"\napi_port = {}\nport_range = [{port}, {port}]\n[coordinator]\nurl = \"http://{coord}\"\npoll_interval_ms = 200\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\npermit_secret = \"permit\"\n",
        api_port
    ));
    let admin_addr = appproxy_dataplane::admin::spawn(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        worker.worker.metrics.clone(),
        worker.worker.health_info(),
    )
    .expect("admin");
    // Several registration attempts fail meanwhile (one a second): never ready, always
    // alive.
    let until = Instant::now() + Duration::from_millis(2500);
    let mut asked = 0;
    while Instant::now() < until {
        let (status, body) = admin(admin_addr, "/readyz");
        assert_eq!(status, 503, "not ready without a circuit set: {body}");
        assert!(body.contains("\"status\":\"starting\""), "{body}");
        let (status, body) = admin(admin_addr, "/livez");
        assert_eq!(status, 200, "alive all the same: {body}");
        assert!(body.contains("\"ready\":\"starting\""), "{body}");
        let (status, _) = admin(admin_addr, "/health/readyz");
        assert_eq!(status, 503);
        // The API port answers the same probes (the original's orchestrator checks
        // point there).
        for path in ["/readyz", "/health/readyz"] {
            let (status, body) = admin(api, path);
            assert_eq!(status, 503, "API port {path}: {body}");
            assert!(body.contains("\"status\":\"starting\""), "{body}");
        }
        for path in ["/", "/health", "/livez", "/health/livez"] {
            let (status, body) = admin(api, path);
            assert_eq!(status, 200, "API port {path}: {body}");
            assert!(body.contains("\"ready\":\"starting\""), "{body}");
        }
        asked += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(asked >= 5, "asked {asked} times");
    // The coordinator comes back on the same address: the worker registers, reads the
    // (empty) set, every core applies it, and it is ready.
    let again = start_coordinator(&coordinator_config(&coord.to_string()));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = admin(admin_addr, "/readyz");
        if status == 200 {
            assert!(body.contains("\"status\":\"ok\""), "{body}");
            assert!(body.contains("\"ready\":\"ready\""), "{body}");
            let (status, body) = admin(api, "/health/readyz");
            assert_eq!(status, 200, "API port: {body}");
            assert!(body.contains("\"ready\":\"ready\""), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never ready once the coordinator answered: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Stopping (as the process does on a stop signal): no longer ready, still alive.
    worker.worker.readiness.mark_stopping();
    let (status, body) = admin(admin_addr, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"status\":\"stopping\""), "{body}");
    assert_eq!(admin(admin_addr, "/livez").0, 200);
    let (status, body) = admin(api, "/readyz");
    assert_eq!(status, 503, "API port: {body}");
    assert!(body.contains("\"status\":\"stopping\""), "{body}");
    assert_eq!(admin(api, "/health/livez").0, 200);
    worker.stop();
    again.stop();
}
