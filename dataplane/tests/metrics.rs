//! The worker's `/metrics` after real traffic: every family has `# HELP` and `# TYPE`,
//! the request-duration histogram's buckets are cumulative and add up to the requests
//! answered, per-circuit series appear when opted in, proxy errors are counted by code,
//! and every metric the shipped Grafana dashboard queries is exported.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Client, Upstream, Worker, WorkerOpts};

/// Samples of one scrape: `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn sum_of(s: &BTreeMap<String, f64>, family: &str) -> f64 {
    s.iter()
        .filter(|(k, _)| k.split('{').next() == Some(family))
        .map(|(_, v)| v)
        .sum()
}

/// Scrapes until the cores have published `requests` answered requests.
fn scrape_after(w: &Worker, requests: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = w.admin_get("/metrics").text();
        let s = samples(&text);
        if sum_of(&s, "appproxy_requests_total") >= requests {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never caught up:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn histograms_add_up_and_every_family_is_described() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        admin_extra: "per_circuit_metrics = true".into(),
        ..Default::default()
    });
    let mut c = Client::connect(w.addr());
    for i in 0..20 {
        assert_eq!(c.get(&format!("/m/{i}"), "").status, 200);
    }
    // Two errors the proxy makes itself.
    for _ in 0..2 {
        let mut bad = Client::connect(w.addr());
        bad.send(b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(bad.response().status, 400);
    }
    let text = scrape_after(&w, 22.0);
    let s = samples(&text);
    // Every family is described.
    for name in s.keys() {
        let family = name.split('{').next().unwrap_or("");
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suf| family.strip_suffix(suf))
            .filter(|b| text.contains(&format!("# TYPE {b} histogram")))
            .unwrap_or(family);
        assert!(text.contains(&format!("# HELP {base} ")), "{base}: no HELP");
        assert!(text.contains(&format!("# TYPE {base} ")), "{base}: no TYPE");
    }
    // The histogram adds up to the requests answered, and its buckets are cumulative.
    let answered = sum_of(&s, "appproxy_requests_total");
    assert_eq!(s["appproxy_request_duration_seconds_count"], answered);
    assert_eq!(
        s["appproxy_request_duration_seconds_bucket{le=\"+Inf\"}"],
        answered
    );
    let buckets: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("appproxy_request_duration_seconds_bucket"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .collect();
    assert!(
        buckets.len() > 5 && buckets.windows(2).all(|w| w[0] <= w[1]),
        "{buckets:?}"
    );
    assert_eq!(
        s["appproxy_upstream_response_head_duration_seconds_count"],
        20.0
    );
    // Per circuit, opted in.
    let circuit = "c0a8f5d2-1111-4222-8333-444455556666";
    assert_eq!(
        s[&format!("appproxy_circuit_requests_total{{circuit=\"{circuit}\",status=\"2xx\"}}")],
        20.0
    );
    assert_eq!(
        s[&format!("appproxy_circuit_request_duration_seconds_count{{circuit=\"{circuit}\"}}")],
        20.0
    );
    // Errors by code; process metrics.
    assert_eq!(sum_of(&s, "appproxy_proxy_errors_by_code_total"), 2.0);
    assert!(s["appproxy_process_open_fds"] > 0.0);
    assert!(s["appproxy_process_max_fds"] >= s["appproxy_process_open_fds"]);
    assert!(s["appproxy_process_resident_memory_bytes"] > 0.0);
}

#[test]
fn per_circuit_series_are_off_by_default() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        ..Default::default()
    });
    assert_eq!(Client::connect(w.addr()).get("/", "").status, 200);
    let text = scrape_after(&w, 1.0);
    assert!(!text.contains("appproxy_circuit_requests_total"), "{text}");
}

/// Every metric the shipped dashboard queries is exported by the worker.
#[test]
fn the_dashboard_queries_only_exported_metrics() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/appproxy-worker.json"
        ))
        .expect("dashboard file"),
    )
    .expect("dashboard JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    assert!(exprs.len() >= 8, "{exprs:?}");
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        admin_extra: "per_circuit_metrics = true".into(),
        ..Default::default()
    });
    assert_eq!(Client::connect(w.addr()).get("/", "").status, 200);
    let text = scrape_after(&w, 1.0);
    for expr in exprs {
        let names: Vec<&str> = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|t| t.starts_with("appproxy_"))
            .collect();
        assert!(!names.is_empty(), "{expr}: no metric");
        for name in names {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "the dashboard queries {name}, which the worker does not export"
            );
        }
    }
}

/// `/circuits` shows what is deployed and which routes are out of rotation on which
/// core; `/connections` summarises each core.
#[test]
fn admin_introspection_shows_circuits_route_health_and_cores() {
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let w = Worker::start(WorkerOpts {
        upstreams: vec![dead],
        ..Default::default()
    });
    let circuits = w.admin_get("/circuits").json();
    assert_eq!(circuits["count"], 1, "{circuits}");
    assert!(circuits["deployment_request_id"].is_null(), "from the file");
    let route = &circuits["circuits"][0]["routes"][0];
    assert_eq!(route["upstream"], dead.to_string());
    assert_eq!(route["health"], "healthy");
    // Refused connects take the only upstream out of rotation.
    for _ in 0..4 {
        let r = Client::connect(w.addr()).get("/", "Connection: close\r\n");
        assert_eq!(r.status, 502);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let circuits = w.admin_get("/circuits").json();
        let route = &circuits["circuits"][0]["routes"][0];
        if route["health"] == "unhealthy" {
            assert_eq!(route["unhealthy_on_cores"], serde_json::json!([0]));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never shown unhealthy: {circuits}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let conns = w.admin_get("/connections").json();
    assert_eq!(conns["cores"][0]["core"], 0, "{conns}");
    assert_eq!(conns["cores"][0]["stalled"], false);
    assert!(conns["cores"][0]["connections_accepted"].as_u64() >= Some(4));
}
