//! What a worker's whole-set read costs at scale. In the suite it runs with 12,000
//! circuits (three pages: two full, one not) and checks the read; by hand, at any
//! scale, it is the measurement:
//!
//! ```text
//! PAGE_LOAD_CIRCUITS=100000 cargo test --release -p appproxy-coordinator --test page_load -- --nocapture
//! ```
//!
//! One wildcard worker with N circuits, on each engine: SQLite in a
//! temporary file and a throwaway PostgreSQL. The circuits are written in bulk, not
//! through the API (one is stored through the store, the rest cloned from it with
//! fresh IDs, sessions and subdomains). Then, for each engine, the whole set is read
//! page by page (5,000 a page, as the agent does) three times through the store
//! (`Store::circuits_page`) and three times through the coordinator binary's HTTP
//! endpoint (`GET /api/worker/{id}/circuits?after=…&limit=5000`, each answer read
//! into the wire type as the agent reads it). Prints the best and worst of each,
//! and asserts that every circuit came exactly once in every read.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use appproxy_coordinator::store::Store;
use appproxy_shared::model::{AppMode, Circuit, FrontendMode, ProxyProtocol, RouteInfo};
use appproxy_shared::wire::{CircuitSet, MAX_CIRCUITS_PER_ANSWER};
use appproxy_test_support::pg::Pg;
use common::Coordinator;
use serde_json::json;

const SECRET: &str = "api-secret";

fn circuits_wanted() -> usize {
    std::env::var("PAGE_LOAD_CIRCUITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12_000)
}

fn worker_body() -> serde_json::Value {
    json!({"authority": "worker-1", "frontend_mode": "wildcard", "protocol": "http",
        "hostname": "proxy1.test", "tls_listen": false, "tls_advertised": false, "api_port": 10201,
        "port_range": null, "wildcard_domain": ".apps.test", "wildcard_traffic_port": 10300,
        "accepted_traffics": ["interactive", "inference"], "filtered_apps_only": false,
        "node_id": "node-1"})
}

fn circuit(worker: uuid::Uuid, n: usize) -> Circuit {
    let session = uuid::Uuid::new_v4();
    Circuit {
        id: uuid::Uuid::new_v4(),
        app: Some("jupyter".into()),
        protocol: ProxyProtocol::Http,
        worker: Some(worker),
        app_mode: AppMode::Interactive,
        frontend_mode: FrontendMode::Wildcard,
        envs: Default::default(),
        arguments: None,
        open_to_public: false,
        allowed_client_ips: Vec::new(),
        port: None,
        subdomain: Some(format!("app-{n}")),
        user_id: Some(uuid::Uuid::new_v4()),
        endpoint_id: None,
        runtime_variant: None,
        route_info: vec![RouteInfo {
            route_id: None,
            session_id: session,
            session_name: None,
            kernel_host: "127.0.0.1".into(),
            kernel_port: 30000 + (n % 1000) as u16,
            protocol: ProxyProtocol::Http,
            traffic_ratio: 1.0,
            health_status: None,
            upstream_tls: Default::default(),
        }],
        session_ids: vec![session],
        created_at: None,
        updated_at: None,
        upstream_reuse: None,
    }
}

fn trace() -> appproxy_shared::TraceContext {
    appproxy_shared::TraceContext::read(
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        None,
    )
    .expect("a valid trace context")
}

fn coordinator(dir: &std::path::Path, database: &str) -> Coordinator {
    common::start(
        dir,
        &format!(
            "[coordinator]\nbind = \"127.0.0.1:0\"\n[secrets]\napi_secret = \"{SECRET}\"\njwt_secret = \"jwt-key\"\n[database]\n{database}\n[logging]\nfilter = \"warn,appproxy_coordinator=info\"\n"
        ),
    )
}

/// Best and worst of the runs, and the per-page times of the best.
fn report(engine: &str, what: &str, runs: &[(Duration, Vec<Duration>)]) {
    let best = runs.iter().min_by_key(|r| r.0).expect("a run");
    let worst = runs.iter().map(|r| r.0).max().expect("a run");
    let pages: Vec<String> = best
        .1
        .iter()
        .map(|p| format!("{:.0}", p.as_secs_f64() * 1e3))
        .collect();
    println!(
        "{engine:>10} {what:<6} whole set in {:>7.1} ms (worst of {} runs {:>7.1} ms); pages ms: {}",
        best.0.as_secs_f64() * 1e3,
        runs.len(),
        worst.as_secs_f64() * 1e3,
        pages.join(" ")
    );
}

async fn read_store(store: &Store, worker: uuid::Uuid, n: usize) -> (Duration, Vec<Duration>) {
    let started = Instant::now();
    let mut pages = Vec::new();
    let mut seen = HashSet::new();
    let mut after = None;
    loop {
        let t = Instant::now();
        let (_, page) = store
            .circuits_page(worker, after, MAX_CIRCUITS_PER_ANSWER)
            .await
            .expect("page");
        pages.push(t.elapsed());
        for (c, _) in &page {
            assert!(seen.insert(c.id), "{} twice", c.id);
        }
        if page.len() < MAX_CIRCUITS_PER_ANSWER {
            break;
        }
        after = page.last().map(|(c, _)| c.id);
    }
    assert_eq!(seen.len(), n);
    (started.elapsed(), pages)
}

fn read_http(addr: SocketAddr, worker: uuid::Uuid, n: usize) -> (Duration, Vec<Duration>) {
    let started = Instant::now();
    let mut pages = Vec::new();
    let mut seen = HashSet::new();
    let mut after = String::new();
    loop {
        let t = Instant::now();
        let r = appproxy_test_support::http::request(
            addr,
            "GET",
            &format!("/api/worker/{worker}/circuits?after={after}&limit={MAX_CIRCUITS_PER_ANSWER}"),
            &[("X-BackendAI-Token", SECRET)],
            b"",
        );
        assert_eq!(r.status, 200);
        let page: CircuitSet = serde_json::from_slice(&r.body).expect("a page");
        pages.push(t.elapsed());
        for c in page.circuits.unwrap_or_default() {
            assert!(seen.insert(c.id), "{} twice", c.id);
        }
        match page.next.flatten() {
            Some(next) => after = next.to_string(),
            None => break,
        }
    }
    assert_eq!(seen.len(), n);
    (started.elapsed(), pages)
}

/// Clones the stored circuit `template` into `n - 1` more with fresh IDs, sessions
/// and subdomains, in one statement.
async fn fill_postgres(url: &str, template: uuid::Uuid, n: usize) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .execute(
            "INSERT INTO circuits (id, app, protocol, worker, app_mode, frontend_mode, port,
                subdomain, envs, arguments, open_to_public, allowed_client_ips, user_id,
                endpoint_id, runtime_variant, session_ids, route_info, origin_request_id,
                traceparent, tracestate, idle_check_at)
             SELECT gen_random_uuid(), app, protocol, worker, app_mode, frontend_mode, port,
                'app-' || g, envs, arguments, open_to_public, allowed_client_ips, gen_random_uuid(),
                endpoint_id, runtime_variant, ARRAY[s.id],
                jsonb_set(route_info, '{0,session_id}', to_jsonb(s.id::text)),
                'req-' || g, traceparent, tracestate, idle_check_at
             FROM circuits c, generate_series(1, $2::int) g,
                LATERAL (SELECT gen_random_uuid() AS id, g AS n) s
             WHERE c.id = $1",
            &[&template, &((n - 1) as i32)],
        )
        .await
        .expect("fill");
    client.batch_execute("ANALYZE").await.expect("analyze");
}

/// The same for SQLite, where a circuit's wire JSON is stored beside its columns.
fn fill_sqlite(path: &std::path::Path, template: uuid::Uuid, n: usize) {
    let mut db = rusqlite::Connection::open(path).expect("db");
    let tx = db.transaction().expect("tx");
    let (worker, body, created, updated): (String, String, String, String) = tx
        .query_row(
            "SELECT worker, body, created_at, updated_at FROM circuits WHERE id = ?1",
            [template.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .expect("template");
    let template: serde_json::Value = serde_json::from_str(&body).expect("body");
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO circuits (id, worker, port, subdomain, body, origin_request_id,
                    created_at, updated_at, traceparent)
                 VALUES (?1, ?2, NULL, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .expect("prepare");
        for i in 1..n {
            let id = uuid::Uuid::new_v4();
            let session = uuid::Uuid::new_v4();
            let mut body = template.clone();
            body["id"] = json!(id);
            body["subdomain"] = json!(format!("app-{i}"));
            body["session_ids"] = json!([session]);
            body["route_info"][0]["session_id"] = json!(session);
            insert
                .execute(rusqlite::params![
                    id.to_string(),
                    worker,
                    format!("app-{i}"),
                    body.to_string(),
                    format!("req-{i}"),
                    created,
                    updated,
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ])
                .expect("insert");
        }
    }
    tx.commit().expect("commit");
}

#[test]
fn whole_set_read_cost() {
    let n = circuits_wanted();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("{n} circuits on one worker, {MAX_CIRCUITS_PER_ANSWER} a page");
    for engine in ["sqlite", "postgresql"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let pg = (engine == "postgresql").then(Pg::start);
        let url = pg.as_ref().map(Pg::url);
        let sqlite = dir.path().join("coordinator.sqlite3");
        let store = rt
            .block_on(Store::open(url.as_deref(), &sqlite))
            .expect("open");
        let worker = rt
            .block_on(store.upsert_worker(&worker_body()))
            .expect("register");
        let first = circuit(worker, 0);
        rt.block_on(store.insert_circuit(&first, Some("req-0"), Some(&trace())))
            .expect("insert");
        let t = Instant::now();
        match &url {
            Some(url) => rt.block_on(fill_postgres(url, first.id, n)),
            None => fill_sqlite(&sqlite, first.id, n),
        }
        println!("{engine:>10} filled in {:.1} s", t.elapsed().as_secs_f64());
        let runs: Vec<_> = (0..3)
            .map(|_| rt.block_on(read_store(&store, worker, n)))
            .collect();
        report(engine, "store", &runs);
        let database = match &url {
            Some(url) => format!("url = \"{url}\""),
            None => format!("sqlite_path = \"{}\"", sqlite.display()),
        };
        drop(store);
        let c = coordinator(dir.path(), &database);
        let runs: Vec<_> = (0..3).map(|_| read_http(c.addr, worker, n)).collect();
        report(engine, "http", &runs);
    }
}
