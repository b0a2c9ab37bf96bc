//! `appproxy-bench-deploy --circuits N,N,…`: what a creation costs as the number of
//! circuits grows, on a wildcard-mode worker started as its own process (the
//! `appproxy-worker` binary), once per engine:
//!
//! - **SQLite, single node**: the coordinator embedded in the worker process;
//! - **PostgreSQL + Redis**: the coordinator in this process, the worker's agent over
//!   HTTP and Redis events.
//!
//! The set is filled up to each N by concurrent managers (untimed), each creation for
//! a session of its own (as a platform with many sessions: the reuse lookup runs and
//! finds nothing). At each N it prints create p50/p99 (sequential calls), creations/s
//! (concurrent managers), the worker's RSS, the CPU per creation of the worker's cores,
//! its agent and the coordinator side, what an idle poll costs, and — at the largest
//! N — how long a restarted worker takes to route every circuit again. Nothing is
//! asserted.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{free_port, http, percentiles};

/// What a scale run needs.
pub struct Scale {
    /// The sizes to measure at, ascending.
    pub sizes: Vec<usize>,
    /// Concurrent managers while filling and in the throughput run.
    pub clients: usize,
    /// Worker cores.
    pub cores: usize,
    /// The `appproxy-worker` binary.
    pub worker_bin: PathBuf,
    /// Which engines: `sqlite`, `postgres`.
    pub engines: Vec<String>,
    /// Keep the worker's logs (at `info`) in this directory.
    pub logs: Option<PathBuf>,
}

const DOMAIN: &str = ".apps.test";

/// The worker process and what it needs to be restarted.
struct WorkerProc {
    child: Child,
    config: PathBuf,
    bin: PathBuf,
    log: PathBuf,
}

impl WorkerProc {
    fn start(bin: &Path, config: &Path, log: &Path) -> anyhow::Result<Self> {
        let out = std::fs::File::create(log)?;
        let child = Command::new(bin)
            .arg("--config")
            .arg(config)
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(Self {
            child,
            config: config.to_owned(),
            bin: bin.to_owned(),
            log: log.to_owned(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn restart(&mut self) -> anyhow::Result<Instant> {
        stop(&mut self.child);
        let started = Instant::now();
        *self = Self::start(&self.bin.clone(), &self.config.clone(), &self.log.clone())?;
        Ok(started)
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn stop(child: &mut Child) {
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).expect("a child's pid is positive"),
        rustix::process::Signal::TERM,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// CPU seconds of a process's threads, grouped: cores, agent, the rest.
fn cpu_by_thread(pid: u32) -> (f64, f64, f64) {
    let tick = 100.0; // USER_HZ on Linux
    let (mut cores, mut agent, mut rest) = (0.0, 0.0, 0.0);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0.0, 0.0, 0.0);
    };
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let Some((name, rest_fields)) = stat.split_once('(').and_then(|(_, r)| r.rsplit_once(')'))
        else {
            continue;
        };
        let fields: Vec<&str> = rest_fields.split_whitespace().collect();
        let ticks = fields
            .get(11)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            + fields
                .get(12)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        let secs = ticks / tick;
        if name.starts_with("appproxy-core") {
            cores += secs;
        } else if name.starts_with("appproxy-agent") {
            agent += secs;
        } else {
            rest += secs;
        }
    }
    (cores, agent, rest)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// One creation for a session of its own: the token (untimed), then the timed call.
/// Returns the call's duration and the circuit's host name.
fn create_one(coord: SocketAddr, n: usize) -> anyhow::Result<(Duration, String)> {
    let session = uuid_like(n);
    let conf = format!(
        r#"{{"login_session_token":null,"kernel_host":"127.0.0.1","kernel_port":9,"session":{{"id":"{session}","user_uuid":"{session}","group_id":"{session}","access_key":"AK","domain_name":"default"}}}}"#
    );
    let (status, body) = http(coord, &format!("POST /v2/conf HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{conf}", conf.len()))?;
    anyhow::ensure!(status == 200, "/v2/conf: {status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let token = v["token"].as_str().unwrap_or_default().to_owned();
    let started = Instant::now();
    let (status, body) = http(coord, &format!("GET /v2/proxy/auth?token={token}&session_id={session}&app=jupyter&protocol=http HTTP/1.1\r\nHost: c\r\nAccept: application/json\r\nX-Backend-Request-ID: scale-{n}\r\nConnection: close\r\n\r\n"))?;
    let took = started.elapsed();
    anyhow::ensure!(status == 200, "/v2/proxy/auth: {status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    Ok((
        took,
        v["redirect_url"].as_str().unwrap_or_default().to_owned(),
    ))
}

/// The host name of the circuit a setup URL names: its ID from the setup token's
/// claims, its subdomain from the coordinator.
fn host_of(coord: SocketAddr, setup_url: &str) -> anyhow::Result<String> {
    use base64::Engine as _;
    let token = setup_url
        .split("token=")
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no token in {setup_url}"))?;
    let claims = token
        .split('.')
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("not a JWT: {token}"))?;
    let claims: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims)?)?;
    let id = claims["circuit"].as_str().unwrap_or_default();
    let (status, body) = http(
        coord,
        &format!("GET /api/circuit/{id} HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n"),
    )?;
    anyhow::ensure!(status == 200, "circuit {id}: {status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    Ok(format!(
        "{}{DOMAIN}",
        v["subdomain"].as_str().unwrap_or_default()
    ))
}

/// A distinct UUID for creation `n` (sessions of their own).
fn uuid_like(n: usize) -> String {
    format!("5d6c8c1e-9a4d-4e6f-8b7a-{:012x}", n)
}

/// `clients` managers creating until `counter` reaches `target`; the durations.
fn create_many(
    coord: SocketAddr,
    clients: usize,
    counter: &Arc<AtomicUsize>,
    target: usize,
) -> anyhow::Result<Vec<Duration>> {
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let counter = counter.clone();
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                let mut out = Vec::new();
                loop {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    if n >= target {
                        counter.fetch_sub(1, Ordering::Relaxed);
                        return Ok(out);
                    }
                    out.push(create_one(coord, n)?.0);
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().map_err(|_| anyhow::anyhow!("client panicked"))??);
    }
    Ok(all)
}

/// Whether the worker routes `host` (anything but a 404 from the worker: the app
/// behind it is a closed port, so a routed request gets 502).
fn routed(port: u16, host: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(
        format!("GET / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && !head.starts_with(b"HTTP/1.1 404")
}

fn wait_routed(port: u16, host: &str, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if routed(port, host) {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn coordinator_toml(bind: u16, database: &str, redis: Option<&str>) -> String {
    let redis = redis
        .map(|u| format!("[redis]\nurl = \"{u}\"\n"))
        .unwrap_or_default();
    format!(
        "[coordinator]\nbind = \"127.0.0.1:{bind}\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\n{database}\n{redis}[logging]\nfilter = \"warn\"\n"
    )
}

fn worker_toml(
    cores: usize,
    traffic: u16,
    link: &str,
    redis: Option<&str>,
    filter: &str,
) -> String {
    let redis = redis
        .map(|u| format!("[redis]\nurl = \"{u}\"\n"))
        .unwrap_or_default();
    format!(
        "[worker]\nauthority = \"scale-worker\"\ncores = {cores}\nbind_host = \"127.0.0.1\"\nhostname = \"127.0.0.1\"\nfrontend_mode = \"wildcard\"\nwildcard_domain = \"{DOMAIN}\"\nwildcard_traffic_port = {traffic}\napi_port = {}\n[admin]\nbind = \"127.0.0.1:{}\"\n[coordinator]\n{link}\npoll_interval_ms = 200\n{redis}[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\npermit_secret = \"permit\"\n[logging]\nfilter = \"{filter}\"\naccess_log = false\n",
        free_port(),
        free_port()
    )
}

/// Runs the scale measurement on every engine asked for.
pub fn run(scale: &Scale, dir: &Path) -> anyhow::Result<()> {
    let (log_dir, filter) = match &scale.logs {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (d.as_path(), "info")
        }
        None => (dir, "warn"),
    };
    println!(
        "scale: wildcard worker, {} cores, {} managers; each N filled untimed, then measured",
        scale.cores, scale.clients
    );
    for engine in &scale.engines {
        match engine.as_str() {
            "sqlite" => {
                let coord_port = free_port();
                let coord_conf = dir.join("scale-coordinator.toml");
                std::fs::write(
                    &coord_conf,
                    coordinator_toml(
                        coord_port,
                        &format!("sqlite_path = \"{}\"", dir.join("scale.sqlite3").display()),
                        None,
                    ),
                )?;
                let traffic = free_port();
                let conf = dir.join("scale-worker-sqlite.toml");
                std::fs::write(
                    &conf,
                    worker_toml(
                        scale.cores,
                        traffic,
                        &format!("embedded = \"{}\"", coord_conf.display()),
                        None,
                        filter,
                    ),
                )?;
                let worker =
                    WorkerProc::start(&scale.worker_bin, &conf, &log_dir.join("scale-sqlite.log"))?;
                let coord = SocketAddr::from(([127, 0, 0, 1], coord_port));
                measure(scale, "SQLite, single node", coord, traffic, worker, None)?;
            }
            "postgres" => {
                let pg = super::pg::Pg::start();
                let redis = super::redis_server::Redis::start();
                let coord_port = free_port();
                let config: appproxy_coordinator::config::CoordinatorConfig =
                    toml::from_str(&coordinator_toml(
                        coord_port,
                        &format!("url = \"{}\"", pg.database("scale")),
                        Some(&redis.url()),
                    ))?;
                let coord = super::spawn_coordinator(config)?;
                let traffic = free_port();
                let conf = dir.join("scale-worker-pg.toml");
                std::fs::write(
                    &conf,
                    worker_toml(
                        scale.cores,
                        traffic,
                        &format!("url = \"http://{coord}\""),
                        Some(&redis.url()),
                        filter,
                    ),
                )?;
                let worker =
                    WorkerProc::start(&scale.worker_bin, &conf, &log_dir.join("scale-pg.log"))?;
                measure(
                    scale,
                    "PostgreSQL + Redis",
                    coord,
                    traffic,
                    worker,
                    Some(std::process::id()),
                )?;
            }
            other => anyhow::bail!("unknown engine {other:?} (sqlite, postgres)"),
        }
    }
    Ok(())
}

fn wait_up(coord: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((_, body)) = http(coord, "GET /api/worker HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n") {
            if body.contains("scale-worker") {
                return Ok(());
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "the worker did not register");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Fills and measures one engine. `coordinator_pid`: the process whose CPU is the
/// coordinator's (cluster mode: this one); `None`: the worker's other threads.
fn measure(
    scale: &Scale,
    label: &str,
    coord: SocketAddr,
    traffic: u16,
    mut worker: WorkerProc,
    coordinator_pid: Option<u32>,
) -> anyhow::Result<()> {
    wait_up(coord)?;
    std::thread::sleep(Duration::from_millis(500)); // the agent subscribes
    let idle_rss = rss_kib(worker.pid());
    println!(
        "\n{label}: worker RSS idle {:.1} MiB",
        idle_rss as f64 / 1024.0
    );
    println!(
        "{:>8} | {:>17} | {:>11} | {:>10} | {:>26} | {:>18}",
        "circuits",
        "create p50 / p99",
        "creations/s",
        "worker RSS",
        "CPU/creation cores/agent/coord",
        "idle poll CPU-s/s"
    );
    let counter = Arc::new(AtomicUsize::new(0));
    let latency_n = 100;
    let throughput_n = 400;
    let mut last_url = String::new();
    let mut first_url = String::new();
    for &size in &scale.sizes {
        // Fill (untimed) to N, then measure there (the runs add their creations).
        let fill_to = size;
        if counter.load(Ordering::Relaxed) < fill_to {
            let started = Instant::now();
            let from = counter.load(Ordering::Relaxed);
            create_many(coord, scale.clients, &counter, fill_to)?;
            eprintln!(
                "  filled {from} -> {fill_to} in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        // Sequential creations: latency.
        let mut samples = Vec::with_capacity(latency_n);
        for _ in 0..latency_n {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let (took, url) = create_one(coord, n)?;
            if first_url.is_empty() {
                first_url = url.clone();
            }
            last_url = url;
            samples.push(took);
        }
        samples.sort();
        let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
        // Concurrent creations: throughput and CPU per creation.
        let before = cpu_by_thread(worker.pid());
        let coord_before = coordinator_pid.map(cpu_by_thread);
        let started = Instant::now();
        let target = counter.load(Ordering::Relaxed) + throughput_n;
        let done = create_many(coord, scale.clients, &counter, target)?.len();
        let secs = started.elapsed().as_secs_f64();
        let after = cpu_by_thread(worker.pid());
        let coord_cpu = match (coordinator_pid, coord_before) {
            (Some(pid), Some(b)) => {
                let a = cpu_by_thread(pid);
                (a.0 + a.1 + a.2) - (b.0 + b.1 + b.2)
            }
            _ => after.2 - before.2,
        };
        let per = |v: f64| v / done.max(1) as f64 * 1000.0;
        // An idle poll: nothing changes for 2 s.
        let idle_before = cpu_by_thread(worker.pid());
        let idle_coord_before = coordinator_pid.map(cpu_by_thread);
        std::thread::sleep(Duration::from_secs(2));
        let idle_after = cpu_by_thread(worker.pid());
        let worker_idle = (idle_after.0 + idle_after.1 + idle_after.2)
            - (idle_before.0 + idle_before.1 + idle_before.2);
        let coord_idle = match (coordinator_pid, idle_coord_before) {
            (Some(pid), Some(b)) => {
                let a = cpu_by_thread(pid);
                (a.0 + a.1 + a.2) - (b.0 + b.1 + b.2)
            }
            _ => 0.0,
        };
        let n_now = size.max(fill_to);
        println!(
            "{:>8} | {:>7.2} / {:>5.2} ms | {:>11.0} | {:>7.1} MiB | {:>8.2} / {:>5.2} / {:>5.2} ms | {:>7.3} w + {:.3} c",
            n_now,
            at(0.5).as_secs_f64() * 1000.0,
            at(0.99).as_secs_f64() * 1000.0,
            done as f64 / secs,
            rss_kib(worker.pid()) as f64 / 1024.0,
            per(after.0 - before.0),
            per(after.1 - before.1),
            per(coord_cpu),
            worker_idle / 2.0,
            coord_idle / 2.0,
        );
        percentiles(&format!("  create at {n_now}"), samples);
    }
    // Memory: per circuit above the idle worker, then stability over 10,000 further
    // creations; then a restart.
    let n = counter.load(Ordering::Relaxed);
    let rss = rss_kib(worker.pid());
    println!(
        "  RSS above idle at {n} circuits: {:.0} B per circuit ({} cores)",
        (rss.saturating_sub(idle_rss) as f64 * 1024.0) / n.max(1) as f64,
        scale.cores
    );
    let more = 10_000;
    create_many(coord, scale.clients, &counter, n + more)?;
    let after = rss_kib(worker.pid());
    println!(
        "  RSS after {more} further creations: {:.1} -> {:.1} MiB ({:.0} B per added circuit)",
        rss as f64 / 1024.0,
        after as f64 / 1024.0,
        (after.saturating_sub(rss) as f64 * 1024.0) / more as f64
    );
    let n = counter.load(Ordering::Relaxed);
    let first_host = host_of(coord, &first_url)?;
    let last_host = host_of(coord, &last_url)?;
    anyhow::ensure!(
        routed(traffic, &first_host) && routed(traffic, &last_host),
        "{first_host} and {last_host} should route before the restart"
    );
    let started = worker.restart()?;
    let first = wait_routed(traffic, &first_host, Duration::from_secs(120));
    let last = wait_routed(traffic, &last_host, Duration::from_secs(120));
    let total = started.elapsed();
    println!(
        "  restart at {n} circuits: first circuit routable after {:?}, newest after {:?}, both by {total:.2?} from the restart",
        first, last
    );
    Ok(())
}
