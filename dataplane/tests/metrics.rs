//! The worker's `/metrics` after real traffic: every family has `# HELP` and `# TYPE`,
//! the request-duration histogram's buckets are cumulative and add up to the requests
//! answered, per-circuit series appear when opted in, proxy errors are counted by code,
//! timeouts by kind, an idle core's sleep (no periodic wake-ups), upstream health per route (the coordinator's verdict and the
//! cores' passive one), latency histograms can be turned off, and every metric the
//! shipped Grafana dashboard queries is exported.

mod common;

use appproxy_test_support::net::ReadUninterrupted;
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
    // Bytes both ways, and each core's parked time (the busy ratio's input).
    assert!(s["appproxy_bytes_in_total{core=\"0\"}"] > 0.0);
    assert!(s["appproxy_bytes_out_total{core=\"0\"}"] > 0.0);
    assert!(
        s.contains_key("appproxy_core_parked_seconds_total{core=\"0\"}"),
        "{text}"
    );
    // The core slept between the requests (it spins only while work keeps coming),
    // and what its spinning cost is counted.
    assert!(s["appproxy_core_parks_total{core=\"0\"}"] >= 1.0, "{text}");
    assert!(
        s.contains_key("appproxy_core_empty_polls_total{core=\"0\"}"),
        "{text}"
    );
}

#[test]
fn an_idle_core_sleeps_until_there_is_work_and_wakes_for_it() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        ..Default::default()
    });
    let parks = |w: &Worker| common::metric(w, "appproxy_core_parks_total");
    for _ in 0..20 {
        assert_eq!(Client::connect(w.addr()).get("/", "").status, 200);
    }
    scrape_after(&w, 20.0);
    // The tick after the activity publishes it; then the core has nothing due.
    std::thread::sleep(Duration::from_millis(500));
    let before = parks(&w);
    std::thread::sleep(Duration::from_secs(3));
    let woken = parks(&w) - before;
    // A periodic wake-up would show here: a 1 ms park 3,000 times, the 50 ms tick 60.
    // What may wake an idle core in these 3 s is an event of its own (the app
    // closing a pooled connection, a pool expiry): a handful at most.
    assert!(woken <= 10, "an idle core woke {woken} times in 3 s");
    // It still wakes for work, and counts the sleeps around it.
    assert_eq!(Client::connect(w.addr()).get("/", "").status, 200);
    common::eventually("a park counted after new work", || {
        parks(&w) > before + woken
    });
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
    // Route health: the bounded per-state counts only.
    assert!(!text.contains("appproxy_upstream_healthy"), "{text}");
    let s = samples(&text);
    assert_eq!(s["appproxy_upstream_routes{state=\"healthy\"}"], 1.0);
    assert_eq!(
        s["appproxy_upstream_routes{state=\"passive_unhealthy\"}"],
        0.0
    );
}

/// `appproxy_upstream_healthy` per route joins both judges: a route the coordinator's
/// health check marked unhealthy is 0 from the start, a refused upstream turns 0
/// once the core takes it out of rotation, and the per-state counts follow.
#[test]
fn upstream_health_per_route_shows_refused_and_coordinator_marked_routes() {
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let tcp_circuit = "d1a8f5d2-1111-4222-8333-444455556666";
    let (marked, fine) = (
        "aaaaaaaa-1111-4222-8333-444455556666",
        "bbbbbbbb-1111-4222-8333-444455556666",
    );
    let session = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
    let w = Worker::start(WorkerOpts {
        upstreams: vec![dead],
        admin_extra: "per_circuit_metrics = true".into(),
        circuit_extra: format!(
            "\n[[circuits]]\nid = \"{tcp_circuit}\"\napp = \"tcp\"\nprotocol = \"tcp\"\nport = {}\nroute_info = [{{ route_id = \"{marked}\", session_id = \"{session}\", kernel_host = \"127.0.0.1\", kernel_port = 9, health_status = \"unhealthy\" }}, {{ route_id = \"{fine}\", session_id = \"{session}\", kernel_host = \"127.0.0.1\", kernel_port = 10, health_status = \"healthy\" }}]\n",
            common::free_port()
        ),
        ..Default::default()
    });
    let main = "c0a8f5d2-1111-4222-8333-444455556666";
    let healthy = |s: &BTreeMap<String, f64>, circuit: &str, route: &str, upstream: &str| {
        s.get(&format!(
            "appproxy_upstream_healthy{{circuit=\"{circuit}\",route=\"{route}\",upstream=\"{upstream}\"}}"
        ))
        .copied()
    };
    let s = samples(&w.admin_get("/metrics").text());
    assert_eq!(
        healthy(&s, main, "0", &dead.to_string()),
        Some(1.0),
        "{s:?}"
    );
    assert_eq!(
        healthy(&s, tcp_circuit, marked, "127.0.0.1:9"),
        Some(0.0),
        "{s:?}"
    );
    assert_eq!(
        healthy(&s, tcp_circuit, fine, "127.0.0.1:10"),
        Some(1.0),
        "{s:?}"
    );
    assert_eq!(s["appproxy_upstream_routes{state=\"healthy\"}"], 2.0);
    assert_eq!(
        s["appproxy_upstream_routes{state=\"active_unhealthy\"}"],
        1.0
    );
    assert_eq!(
        s["appproxy_upstream_routes{state=\"passive_unhealthy\"}"],
        0.0
    );
    // Refused connects take the main circuit's only upstream out of rotation.
    for _ in 0..4 {
        let r = Client::connect(w.addr()).get("/", "Connection: close\r\n");
        assert_eq!(r.status, 502);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let s = loop {
        let s = samples(&w.admin_get("/metrics").text());
        if healthy(&s, main, "0", &dead.to_string()) == Some(0.0) {
            break s;
        }
        assert!(Instant::now() < deadline, "never shown unhealthy: {s:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        s["appproxy_upstream_routes{state=\"passive_unhealthy\"}"],
        1.0
    );
    assert_eq!(s["appproxy_upstream_routes{state=\"healthy\"}"], 1.0);
    assert_eq!(
        s["appproxy_upstream_routes{state=\"active_unhealthy\"}"],
        1.0
    );
    // `/circuits` says which judge decided.
    let circuits = w.admin_get("/circuits").json();
    let routes = &circuits["circuits"][1]["routes"];
    assert_eq!(routes[0]["route"], marked, "{circuits}");
    assert_eq!(routes[0]["state"], "active_unhealthy");
    assert_eq!(routes[0]["active_health"], "unhealthy");
    assert_eq!(routes[1]["state"], "healthy");
    assert_eq!(
        circuits["circuits"][0]["routes"][0]["state"],
        "passive_unhealthy"
    );
}

/// A reload keeps what passive health learnt: the same file deployed again leaves
/// an app out of rotation until its back-off ends (no new failures to find it
/// out again); a file that routes elsewhere is served at once. Before, every
/// reload forgot every route's health: the dead app took requests again and was
/// marked unhealthy anew.
#[test]
fn a_reload_keeps_passive_health() {
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let live = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![dead],
        ..Default::default()
    });
    let state = |w: &Worker| {
        w.admin_get("/circuits").json()["circuits"][0]["routes"][0]["state"]
            .as_str()
            .map(str::to_owned)
    };
    let refused = |w: &Worker| {
        for _ in 0..4 {
            let r = Client::connect(w.addr()).get("/", "Connection: close\r\n");
            assert_eq!(r.status, 502);
        }
    };
    refused(&w);
    common::eventually("out of rotation", || {
        state(&w).as_deref() == Some("passive_unhealthy")
    });
    common::eventually("marked once", || {
        common::log_count(&w, "upstream marked unhealthy") == 1
    });
    // The same file again.
    let applied = |w: &Worker| common::log_count(w, "deployment applied");
    let before = applied(&w);
    w.reload(|text| text);
    common::eventually("the reload applied", || applied(&w) > before);
    refused(&w);
    let id = "after-the-reload";
    let r = Client::connect(w.addr()).get("/", &format!("X-Backend-Request-ID: {id}\r\n"));
    assert_eq!(r.status, 502);
    w.wait_access_line(id);
    assert_eq!(state(&w).as_deref(), Some("passive_unhealthy"));
    assert_eq!(
        common::log_count(&w, "upstream marked unhealthy"),
        1,
        "found out again after a reload of the same file: {}",
        w.log_text()
    );
    // A file routing elsewhere: served at once, and the view follows.
    let before = applied(&w);
    w.reload(|text| {
        text.replace(
            &format!("kernel_port = {}", dead.port()),
            &format!("kernel_port = {}", live.addr.port()),
        )
    });
    common::eventually("the second reload applied", || applied(&w) > before);
    assert_eq!(Client::connect(w.addr()).get("/", "").status, 200);
    common::eventually("healthy in the view", || {
        state(&w).as_deref() == Some("healthy")
    });
}

/// With `[admin] latency_histograms = false` nothing is observed and the histogram
/// families are left out; the counters go on.
#[test]
fn latency_histograms_can_be_turned_off() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        admin_extra: "per_circuit_metrics = true\nlatency_histograms = false".into(),
        ..Default::default()
    });
    let mut c = Client::connect(w.addr());
    for _ in 0..3 {
        assert_eq!(c.get("/", "").status, 200);
    }
    let text = scrape_after(&w, 3.0);
    for family in [
        "appproxy_request_duration_seconds",
        "appproxy_upstream_response_head_duration_seconds",
        "appproxy_circuit_request_duration_seconds",
    ] {
        assert!(!text.contains(family), "{family} in {text}");
    }
    let s = samples(&text);
    let circuit = "c0a8f5d2-1111-4222-8333-444455556666";
    assert_eq!(
        s[&format!("appproxy_circuit_requests_total{{circuit=\"{circuit}\",status=\"2xx\"}}")],
        3.0
    );
}

/// Timeouts are counted by kind: a client that never finishes its head (408) and an
/// app that accepts but never answers (504).
#[test]
fn timeouts_are_counted_by_kind() {
    // Connects complete in the kernel's backlog; nothing is ever read or answered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let w = Worker::start(WorkerOpts {
        upstreams: vec![silent.local_addr().expect("addr")],
        extra: "[timeouts]\nhead_secs = 1\nupstream_head_secs = 1".into(),
        ..Default::default()
    });
    let mut slow = Client::connect(w.addr());
    slow.send(b"GET / HTTP/1.1\r\nHost: t\r\n");
    assert_eq!(slow.response().status, 408);
    let r = Client::connect(w.addr()).get("/", "");
    assert_eq!(r.status, 504);
    let text = scrape_after(&w, 2.0);
    let s = samples(&text);
    let kind = |k: &str| s[&format!("appproxy_timeouts_total{{core=\"0\",kind=\"{k}\"}}")];
    assert_eq!(kind("client_head"), 1.0, "{text}");
    assert_eq!(kind("upstream_head"), 1.0, "{text}");
    assert_eq!(kind("client_body"), 0.0);
    assert_eq!(kind("upstream_connect"), 0.0);
    drop(silent);
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
    // Published at the core's next tick, which may come after the route's change.
    common::eventually("four accepted connections shown", || {
        w.admin_get("/connections").json()["cores"][0]["connections_accepted"].as_u64() >= Some(4)
    });
    let conns = w.admin_get("/connections").json();
    assert_eq!(conns["cores"][0]["core"], 0, "{conns}");
    assert_eq!(conns["cores"][0]["stalled"], false);
}

/// The worker binary refuses a bad file at start-up (exit status 2) with the file,
/// the key path and what to change on stderr, for parse and validation mistakes alike.
#[test]
fn the_binary_refuses_a_bad_config_naming_the_file_the_key_and_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let circuit = |route_extra: &str, port: u16| {
        format!(
            "[worker]\ncores = 1\nport_range = [10205, 10300]\n\n[[circuits]]\nid = \"00000000-0000-4000-8000-000000000001\"\napp = \"demo\"\nport = {port}\nopen_to_public = true\nroute_info = [{{ {route_extra}session_id = \"00000000-0000-4000-8000-0000000000aa\", kernel_host = \"127.0.0.1\", kernel_port = 8080 }}]\n"
        )
    };
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unknown key",
            "[worker]\nbnd_host = \"0.0.0.0\"\n".into(),
            vec!["worker.bnd_host", "line 2", "did you mean `bind_host`?"],
        ),
        (
            "bad UUID",
            circuit("route_id = \"nope\", ", 10205),
            vec!["circuits[0].route_info[0].route_id", "UUID"],
        ),
        (
            "port outside the range",
            circuit("", 9000),
            vec![
                "circuits[0]",
                "port 9000 is outside [worker] port_range [10205, 10300]",
            ],
        ),
        (
            "the API port",
            circuit("", 10250).replace("[worker]\n", "[worker]\napi_port = 10250\n"),
            vec![
                "circuits[0]",
                "port 10250 is the worker's [worker] api_port (serving /setup)",
            ],
        ),
        (
            "port 0",
            circuit("", 0).replace("[10205, 10300]", "[0, 10300]"),
            vec!["circuits[0]", "port 0 is no port a client can reach"],
        ),
        (
            "wildcard traffic on the API port",
            "[worker]\ncores = 1\napi_port = 10250\nfrontend_mode = \"wildcard\"\nwildcard_domain = \".apps.test\"\nwildcard_traffic_port = 10250\n".into(),
            vec!["[worker] wildcard_traffic_port 10250 is the api_port too"],
        ),
    ];
    for (what, text, wants) in cases {
        let path = dir.path().join(format!("{}.toml", what.replace(' ', "-")));
        std::fs::write(&path, text).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_appproxy-worker"))
            .arg("--config")
            .arg(&path)
            .arg("--check-config")
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(
            err.contains(&format!("invalid config {}", path.display())),
            "{what}: {err}"
        );
        for want in wants {
            assert!(err.contains(want), "{what}: {err:?} lacks {want:?}");
        }
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_appproxy-worker"))
        .arg("--config")
        .arg(dir.path().join("absent.toml"))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot read config") && err.contains("absent.toml"),
        "{err}"
    );
}

/// A TCP tunnel is counted while open (active, opened), its bytes both ways, and its
/// close after `[timeouts] tunnel_idle_secs` of silence as a `tunnel_idle` timeout.
#[test]
fn tunnels_are_counted_open_and_closed_for_idleness() {
    use std::io::{Read as _, Write as _};
    // An echo app on a plain socket.
    let echo = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let echo_addr = echo.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut s in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read_uninterrupted(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let up = Upstream::start();
    let tcp_port = common::free_port();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        extra: "[timeouts]\ntunnel_idle_secs = 1".into(),
        circuit_extra: format!(
            "\n[[circuits]]\nid = \"d1a8f5d2-1111-4222-8333-444455556666\"\napp = \"tcp\"\nprotocol = \"tcp\"\nport = {tcp_port}\nroute_info = [{{ session_id = \"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\", kernel_host = \"127.0.0.1\", kernel_port = {} }}]\n",
            echo_addr.port()
        ),
        ..Default::default()
    });
    let mut t = std::net::TcpStream::connect(("127.0.0.1", tcp_port)).expect("connect");
    t.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let payload = [7u8; 1000];
    t.write_all(&payload).expect("send");
    let mut back = vec![0u8; payload.len()];
    t.read_exact(&mut back).expect("echo");
    let value = |s: &BTreeMap<String, f64>, k: &str| s.get(k).copied().unwrap_or(-1.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = samples(&w.admin_get("/metrics").text());
        if value(&s, "appproxy_tunnels_active{core=\"0\"}") == 1.0 {
            assert_eq!(value(&s, "appproxy_tunnels_opened_total{core=\"0\"}"), 1.0);
            break;
        }
        assert!(Instant::now() < deadline, "tunnel never shown open: {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Silence: the worker closes the tunnel after a second.
    let mut rest = Vec::new();
    let _ = t.read_to_end(&mut rest);
    let deadline = Instant::now() + Duration::from_secs(20);
    let s = loop {
        let s = samples(&w.admin_get("/metrics").text());
        if value(&s, "appproxy_tunnels_active{core=\"0\"}") == 0.0
            && value(
                &s,
                "appproxy_timeouts_total{core=\"0\",kind=\"tunnel_idle\"}",
            ) == 1.0
        {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "tunnel never closed for idleness: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(value(&s, "appproxy_bytes_in_total{core=\"0\"}") >= 1000.0);
    assert!(value(&s, "appproxy_bytes_out_total{core=\"0\"}") >= 1000.0);
    assert_eq!(value(&s, "appproxy_tunnels_opened_total{core=\"0\"}"), 1.0);
}

/// The Prometheus scrape example scrapes the jobs the control-plane dashboard selects
/// and, for each service, the address its default config serves metrics on.
#[test]
fn the_scrape_example_matches_the_dashboards_and_the_default_addresses() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/");
    let scrape = std::fs::read_to_string(format!("{root}prometheus.yml")).expect("scrape file");
    // job name → its targets.
    let mut jobs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in scrape.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- job_name:") {
            current = Some(name.trim().to_owned());
            jobs.entry(name.trim().to_owned()).or_default();
        } else if let (Some(list), Some(job)) = (line.strip_prefix("- targets:"), &current) {
            let list = list.split('#').next().unwrap_or("");
            jobs.entry(job.clone()).or_default().extend(
                list.split(['[', ']', ',', '"'])
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned),
            );
        }
    }
    let control =
        std::fs::read_to_string(format!("{root}appproxy-control.json")).expect("dashboard");
    let selected: std::collections::BTreeSet<&str> = control
        .split("job=\\\"")
        .skip(1)
        .filter_map(|rest| rest.split("\\\"").next())
        .collect();
    assert!(selected.len() >= 2, "{selected:?}");
    for job in &selected {
        assert!(
            jobs.contains_key(*job),
            "the dashboard selects job {job}, which the scrape example lacks: {jobs:?}"
        );
    }
    let worker_admin = appproxy_dataplane::config::Config::default()
        .admin
        .bind
        .expect("default admin bind");
    let coordinator = appproxy_coordinator::config::CoordinatorConfig::default()
        .coordinator
        .bind;
    let storage = appproxy_storage_proxy::config::StorageConfig::default()
        .storage
        .manager_bind;
    for (job, addr) in [
        ("appproxy-worker", worker_admin),
        ("appproxy-coordinator", coordinator),
        ("appproxy-storage-proxy", storage),
    ] {
        assert_eq!(
            jobs.get(job),
            Some(&vec![addr.to_string()]),
            "{job}: {jobs:?}"
        );
    }
}

/// The admin endpoint asks no credential, and `/circuits` and `/connections` name
/// apps' addresses, sessions and clients: bound off loopback, the worker says so at
/// start; on loopback (every other test here), it does not.
#[test]
fn an_admin_endpoint_off_loopback_is_warned_about() {
    let warning = "the admin endpoint is not on a loopback address and asks no credential: keep [admin] bind on a loopback or operator network";
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        admin_bind: "0.0.0.0:0".into(),
        ..Default::default()
    });
    w.wait_log("the warning", |v| {
        v["message"] == warning && v["level"] == "WARN"
    });
    let quiet = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        ..Default::default()
    });
    assert_eq!(common::log_count(&quiet, warning), 0);
}
