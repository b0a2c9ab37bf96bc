//! Probe load of the coordinator's active health check at 10,000 routes: a
//! measurement, run by hand, never in the suite (`#[ignore]`):
//!
//! ```text
//! cargo test --release -p appproxy-control --test health_load -- --ignored --nocapture
//! ```
//!
//! 100 endpoints × 100 routes, every route probed every 10 s (the original's default
//! interval) against one nginx (a separate process, so its work is not counted). The
//! coordinator runs in this process on a 2-thread runtime; the CPU time of the whole
//! process (`/proc/self/stat` utime + stime) over a 30 s window after warm-up is the
//! prober's cost, printed as CPU-seconds per second together with the probe rate.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use appproxy_test_support::http::{free_port, request};

const ENDPOINTS: usize = 100;
const ROUTES_PER_ENDPOINT: usize = 100;

/// utime + stime of this process, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("stat");
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    // SAFETY-free: the clock tick is 100 Hz on every Linux this runs on.
    ticks / 100.0
}

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nginx(dir: &Path, port: u16) -> Nginx {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 20000; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  server {{\n    listen 127.0.0.1:{port} backlog=4096;\n    location = /health {{ return 200 \"ok\"; }}\n  }}\n}}\n",
            d = dir.display()
        ),
    )
    .expect("conf");
    let child = Command::new("nginx")
        .args(["-c", &conf.to_string_lossy(), "-p", &dir.to_string_lossy()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx must be installed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    Nginx(child)
}

#[test]
#[ignore = "a measurement: run by hand with --ignored --nocapture"]
fn probe_load_at_ten_thousand_routes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model_port = free_port();
    let _nginx = nginx(dir.path(), model_port);
    let text = format!(
        "[coordinator]\nbind = \"127.0.0.1:0\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\nsqlite_path = \"{}\"\n[logging]\nfilter = \"warn\"\n",
        dir.path().join("c.sqlite3").display()
    );
    let config: appproxy_coordinator::config::CoordinatorConfig =
        toml::from_str(&text).expect("config");
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // The coordinator binds a port the kernel picks and says which (or why not).
    let (bound_tx, bound_rx) = std::sync::mpsc::channel::<Result<SocketAddr, String>>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async move {
            let c = match appproxy_coordinator::Coordinator::bind(&config).await {
                Ok(c) => c,
                Err(e) => {
                    let _ = bound_tx.send(Err(format!("{e:#}")));
                    return;
                }
            };
            let _ = bound_tx.send(Ok(c.addr));
            let _ = c
                .run(async {
                    let _ = stop_rx.await;
                })
                .await;
        });
    });
    let coord = match bound_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(addr)) => addr,
        Ok(Err(e)) => panic!("coordinator did not start: {e}"),
        Err(e) => panic!("coordinator did not start: {e}"),
    };
    let auth = [
        ("X-BackendAI-Token", "api"),
        ("Content-Type", "application/json"),
    ];
    let worker = format!(
        r#"{{"authority":"w1","frontend_mode":"port","protocol":"http","hostname":"127.0.0.1","tls_listen":false,"tls_advertised":false,"api_port":10201,"port_range":[40000,{}],"accepted_traffics":["inference"],"filtered_apps_only":false}}"#,
        40000 + ENDPOINTS + 10
    );
    assert_eq!(
        request(coord, "PUT", "/api/worker", &auth, worker.as_bytes()).status,
        200
    );
    for e in 0..ENDPOINTS {
        let id = uuid::Uuid::new_v4();
        let body = format!(
            r#"{{"service_name":"svc{e}","tags":{{"session":{{"user_uuid":"{u}","project_id":"{u}","domain_name":"default"}},"endpoint":{{"runtime_variant":"vllm","existing_url":null}}}},
               "health_check":{{"enable":true,"interval":10.0,"path":"/health","max_retries":3,"max_wait_time":5.0,"expected_status_code":200,"initial_delay":0}}}}"#,
            u = uuid::Uuid::new_v4()
        );
        let r = request(
            coord,
            "POST",
            &format!("/v2/endpoints/{id}"),
            &auth,
            body.as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let routes: Vec<String> = (0..ROUTES_PER_ENDPOINT)
            .map(|_| {
                format!(
                    r#"{{"session_id":"{}","route_id":"{}","kernel_host":"127.0.0.1","kernel_port":{model_port}}}"#,
                    uuid::Uuid::new_v4(),
                    uuid::Uuid::new_v4()
                )
            })
            .collect();
        let body = format!(
            r#"{{"endpoints":[{{"deployment_id":"{id}","routes":[{}]}}]}}"#,
            routes.join(",")
        );
        let r = request(
            coord,
            "POST",
            "/v2/endpoints/bulk/routes/register",
            &auth,
            body.as_bytes(),
        );
        assert_eq!(r.status, 200);
    }
    let probes = || appproxy_coordinator::health::COUNTS[0].load(Ordering::Relaxed);
    let changes = || appproxy_coordinator::health::COUNTS[2].load(Ordering::Relaxed);
    // Warm-up: every route probed once (first probes spread over one interval) and
    // every first "healthy" stored.
    let (w0, wc0) = (Instant::now(), cpu_seconds());
    let deadline = Instant::now() + Duration::from_secs(300);
    while changes() < (ENDPOINTS * ROUTES_PER_ENDPOINT) as u64 {
        assert!(Instant::now() < deadline, "warm-up: {} probes", probes());
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "warm-up: {} first states stored in {:.1} s, {:.2} CPU-s",
        changes(),
        w0.elapsed().as_secs_f64(),
        cpu_seconds() - wc0
    );
    std::thread::sleep(Duration::from_secs(10));
    let (p0, c0, t0) = (probes(), cpu_seconds(), Instant::now());
    // Probes per second, second by second: spread, not in step.
    let mut per_second = Vec::new();
    let mut last = p0;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_secs(1));
        let now = probes();
        per_second.push(now - last);
        last = now;
    }
    let (p1, c1, t1) = (probes(), cpu_seconds(), Instant::now());
    println!(
        "probes per second over the window: min {} max {}",
        per_second.iter().min().copied().unwrap_or(0),
        per_second.iter().max().copied().unwrap_or(0)
    );
    let wall = (t1 - t0).as_secs_f64();
    let rate = (p1 - p0) as f64 / wall;
    let cpu = (c1 - c0) / wall;
    println!(
        "health-check load: {} routes, {rate:.0} probes/s, {cpu:.3} CPU-s/s on the coordinator ({:.2} ms CPU per probe), {} state changes stored",
        ENDPOINTS * ROUTES_PER_ENDPOINT,
        cpu * 1000.0 / rate.max(1.0),
        changes()
    );
    let failed = appproxy_coordinator::health::COUNTS[1].load(Ordering::Relaxed);
    assert_eq!(failed, 0, "probes failed against nginx");
    let _ = stop.send(());
    let _ = thread.join();
}
