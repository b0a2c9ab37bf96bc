//! Deployments at scale: a worker whose set is larger than one coordinator answer reads
//! it page by page (no size ceiling) and routes every circuit; afterwards it deploys
//! only what changed — a creation, a removal — found by a conditional poll; a circuit
//! the worker cannot take is refused alone while the rest keep deploying.
//!
//! The store is filled directly (the coordinator's own store API on its SQLite file)
//! before the coordinator starts, so the test does not spend its time on 6,000 API
//! calls; everything after that goes through the coordinator's API, the agent's poll
//! and the cores, on real sockets.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use appproxy_coordinator::store::Store;
use appproxy_shared::model::{AppMode, Circuit, FrontendMode, ProxyProtocol, RouteInfo};

const DOMAIN: &str = ".apps.test";
const SECRET: &str = "api";
/// More than one answer's worth (5,000 circuits a page).
const CIRCUITS: usize = 6_001;

fn circuit(worker: uuid::Uuid, n: usize, ratio: f64) -> Circuit {
    let session = uuid::Uuid::from_u128(0x5d6c_0000 + n as u128);
    Circuit {
        id: uuid::Uuid::from_u128(0xc1c0_0000_0000 + n as u128),
        app: Some("jupyter".into()),
        protocol: ProxyProtocol::Http,
        worker: Some(worker),
        app_mode: AppMode::Interactive,
        frontend_mode: FrontendMode::Wildcard,
        envs: Default::default(),
        arguments: None,
        open_to_public: true,
        allowed_client_ips: Vec::new(),
        port: None,
        subdomain: Some(format!("c{n}")),
        user_id: None,
        endpoint_id: None,
        runtime_variant: None,
        route_info: vec![RouteInfo {
            route_id: None,
            session_id: session,
            session_name: None,
            kernel_host: "127.0.0.1".into(),
            // A closed port: a routed request gets 502 from the worker, an unrouted
            // one 404.
            kernel_port: 9,
            protocol: ProxyProtocol::Http,
            traffic_ratio: ratio,
            health_status: None,
            upstream_tls: Default::default(),
        }],
        session_ids: vec![session],
        created_at: None,
        updated_at: None,
        upstream_reuse: None,
    }
}

/// The worker's status for a request to circuit `n`'s host.
fn status_of(port: u16, n: usize) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(
        format!("GET / HTTP/1.1\r\nHost: c{n}{DOMAIN}:{port}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Waits (bounded) until circuit `n` answers `want` (502: routed, 404: not).
fn wait_status(port: u16, n: usize, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = status_of(port, n);
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "circuit {n}: {got:?}, wanted {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_large_set_deploys_page_by_page_then_only_what_changes() {
    let logs = common::capture_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("coordinator.sqlite3");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let traffic = common::free_port();
    let authority = "scale-worker";
    let registration = serde_json::json!({
        "authority": authority, "frontend_mode": "wildcard", "protocol": "http",
        "hostname": "127.0.0.1", "api_port": 1, "wildcard_domain": DOMAIN,
        "wildcard_traffic_port": traffic, "accepted_traffics": ["interactive", "inference"],
        "filtered_apps_only": false,
    });
    let store = rt.block_on(async {
        let store = Store::open(None, &db).await.expect("store");
        let worker = store.upsert_worker(&registration).await.expect("worker");
        for n in 0..CIRCUITS {
            store
                .insert_circuit(&circuit(worker, n, 1.0), None, None)
                .await
                .expect("insert");
        }
        (store, worker)
    });
    let (store, worker_id) = store;

    let coordinator = common::start_coordinator(
        &format!(
            "[coordinator]\nbind = \"127.0.0.1:0\"\n[secrets]\napi_secret = \"{SECRET}\"\njwt_secret = \"jwt\"\n[database]\nsqlite_path = \"{}\"\n",
            db.display()
        ),
    );
    let coord_addr = coordinator.addr;
    let api_port = common::free_port();
    let worker = common::start_worker(&format!(
        "[worker]\nauthority = \"{authority}\"\ncores = 2\nbind_host = \"127.0.0.1\"\nhostname = \"127.0.0.1\"\napi_port = {api_port}\nfrontend_mode = \"wildcard\"\nwildcard_domain = \"{DOMAIN}\"\nwildcard_traffic_port = {traffic}\n[coordinator]\nurl = \"http://{coord_addr}\"\npoll_interval_ms = 200\n[secrets]\napi_secret = \"{SECRET}\"\njwt_secret = \"jwt\"\npermit_secret = \"permit\"\n"
    ));

    let text = || String::from_utf8_lossy(&logs.0.lock().expect("sink")).into_owned();

    // The whole set, read in pages, routes on every core.
    for n in [0, CIRCUITS / 2, 5_000, CIRCUITS - 1] {
        wait_status(traffic, n, 502);
    }
    let deployed: Vec<serde_json::Value> = text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "deploying the coordinator's circuits")
        .collect();
    let total: u64 = deployed.iter().filter_map(|v| v["changed"].as_u64()).sum();
    assert_eq!(
        total, CIRCUITS as u64,
        "each circuit deployed once: {deployed:?}"
    );

    // From now on only changes travel. One circuit the worker cannot take (a negative
    // traffic ratio) is refused alone; a good one created beside it deploys; a
    // removal through the API unroutes its circuit.
    rt.block_on(async {
        store
            .insert_circuit(&circuit(worker_id, CIRCUITS, -1.0), None, None)
            .await
            .expect("insert");
        store
            .insert_circuit(&circuit(worker_id, CIRCUITS + 1, 1.0), None, None)
            .await
            .expect("insert");
    });
    wait_status(traffic, CIRCUITS + 1, 502);
    assert_eq!(
        status_of(traffic, CIRCUITS),
        Some(404),
        "the refused circuit"
    );
    let removed = circuit(worker_id, 7, 1.0).id;
    let r = common::http(
        coord_addr,
        &format!("DELETE /api/circuit/{removed} HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: {SECRET}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(r.0, 200, "{r:?}");
    wait_status(traffic, 7, 404);
    wait_status(traffic, 8, 502);
    let lines = text();
    assert!(
        lines.lines().any(|l| l.contains("circuit refused")
            && l.contains(&circuit(worker_id, CIRCUITS, -1.0).id.to_string())
            && l.contains("traffic_ratio")),
        "the refusal names the circuit and why"
    );
    // The changes after the first read were deltas: no deployment after it carried
    // more than the few circuits that changed.
    let later: Vec<(u64, u64)> = lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "deploying the coordinator's circuits")
        .skip(deployed.len())
        .map(|v| {
            (
                v["changed"].as_u64().unwrap_or(u64::MAX),
                v["removed"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    assert!(!later.is_empty());
    assert!(
        later.iter().all(|(c, r)| *c <= 1 && *r <= 1),
        "deltas only: {later:?}"
    );
    worker.stop();
    coordinator.stop();
}
