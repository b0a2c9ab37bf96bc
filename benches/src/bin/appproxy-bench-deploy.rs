//! `appproxy-bench-deploy`: how fast circuits deploy and how many the coordinator
//! creates per second, with real servers started here (throwaway PostgreSQL and Redis
//! from the installed binaries).
//!
//! - **Deployment latency**, API call → routable on every core: in single-node mode
//!   (coordinator inside the worker process, SQLite, in-process bus) and in cluster
//!   mode (PostgreSQL + Redis events). In both modes `/v2/proxy/auth` answers only
//!   after every core acknowledged the new table, so the call's duration *is* the
//!   latency; each circuit's port is connected to right after, to check it.
//! - **Creations per second** on PostgreSQL, `--clients` concurrent managers: the store
//!   and placement alone (no events), and with Redis events and worker acknowledgement.
//!
//! - **Scale** (`--circuits 100,1000,10000,100000`): what a creation, a poll and a
//!   restart cost as the circuit count grows, on a worker process of its own (see
//!   `deploy/scale.rs`).
//!
//! Timings are printed (p50/p90/p99/max); nothing is asserted.

#[path = "deploy/scale.rs"]
mod scale;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use clap::Parser;

/// Deployment latency and creation throughput of the control plane.
#[derive(Parser, Debug)]
#[command(name = "appproxy-bench-deploy")]
struct Args {
    /// Circuits per latency run.
    #[arg(long, default_value_t = 200)]
    count: u16,
    /// Concurrent managers in the throughput runs.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Circuits per throughput run.
    #[arg(long, default_value_t = 2000)]
    creations: usize,
    /// Worker cores.
    #[arg(long, default_value_t = 2)]
    cores: usize,
    /// Scale mode: the circuit counts to measure at (comma-separated, ascending);
    /// only the scale measurement runs.
    #[arg(long, value_delimiter = ',')]
    circuits: Vec<usize>,
    /// Scale mode: the engines (`sqlite`, `postgres`).
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    engines: Vec<String>,
    /// Scale mode: the worker binary (default: `appproxy-worker` beside this one).
    #[arg(long)]
    worker_bin: Option<std::path::PathBuf>,
    /// Scale mode: keep the worker's logs (at `info`) in this directory.
    #[arg(long)]
    logs: Option<std::path::PathBuf>,
}

const SESSION: &str = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";

use appproxy_test_support::{free_port, pg, redis as redis_server};

/// A run of `n` consecutive free ports.
fn free_range(n: u16) -> anyhow::Result<u16> {
    for _ in 0..100 {
        // Below the ephemeral range, so ports picked by the kernel never land in it.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let base = 10_000 + (seed % 20_000) as u16;
        if (base..base + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return Ok(base);
        }
    }
    anyhow::bail!("no run of {n} free ports")
}

fn http(addr: SocketAddr, req: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

fn token(coord: SocketAddr) -> anyhow::Result<String> {
    let conf = format!(
        r#"{{"login_session_token":null,"kernel_host":"127.0.0.1","kernel_port":9,"session":{{"id":"{SESSION}","user_uuid":"{SESSION}","group_id":"{SESSION}","access_key":"AK","domain_name":"default"}}}}"#
    );
    let (status, body) = http(coord, &format!("POST /v2/conf HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{conf}", conf.len()))?;
    anyhow::ensure!(status == 200, "/v2/conf: {status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    Ok(v["token"].as_str().unwrap_or_default().to_owned())
}

/// One creation; its duration.
fn create(coord: SocketAddr, token: &str, id: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let (status, body) = http(coord, &format!("GET /v2/proxy/auth?token={token}&session_id={SESSION}&app=bench&protocol=http&no_reuse=true HTTP/1.1\r\nHost: c\r\nAccept: application/json\r\nX-Backend-Request-ID: {id}\r\nConnection: close\r\n\r\n"))?;
    let took = started.elapsed();
    anyhow::ensure!(status == 200, "/v2/proxy/auth: {status} {body}");
    Ok(took)
}

/// The coordinator of a deployment run: no cap on circuits per session, since a run
/// makes hundreds in one.
fn coordinator_config(
    port: u16,
    database: &str,
    redis: Option<&str>,
) -> anyhow::Result<appproxy_coordinator::config::CoordinatorConfig> {
    let redis = redis
        .map(|u| format!("[redis]\nurl = \"{u}\"\n"))
        .unwrap_or_default();
    Ok(toml::from_str(&format!(
        "[coordinator]\nbind = \"127.0.0.1:{port}\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\n{database}\n{redis}[logging]\nfilter = \"warn\"\n[limits]\nmax_circuits_per_session = 0\n"
    ))?)
}

/// Runs a coordinator on its own runtime until the process ends.
fn spawn_coordinator(
    config: appproxy_coordinator::config::CoordinatorConfig,
) -> anyhow::Result<SocketAddr> {
    let addr = config.coordinator.bind;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            if let Err(e) = appproxy_coordinator::serve(&config, std::future::pending()).await {
                eprintln!("coordinator: {e:#}");
            }
        });
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "coordinator did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(addr)
}

/// Starts a worker (with its agent) on `cores` cores and ports `base..base+n`.
fn spawn_worker(
    cores: usize,
    base: u16,
    n: u16,
    link: &str,
    redis: Option<&str>,
    embedded: Option<appproxy_coordinator::config::CoordinatorConfig>,
) -> anyhow::Result<appproxy_dataplane::worker::Worker> {
    let redis = redis
        .map(|u| format!("[redis]\nurl = \"{u}\"\n"))
        .unwrap_or_default();
    // The API's port outside the range (the worker refuses one inside it): the
    // range and the port come from two pickers that may overlap.
    let ports = base..base + n;
    let api_port = std::iter::repeat_with(free_port)
        .find(|p| !ports.contains(p))
        .unwrap_or(base + n);
    let text = format!(
        "[worker]\nauthority = \"bench-worker\"\ncores = {cores}\nbind_host = \"127.0.0.1\"\nhostname = \"127.0.0.1\"\napi_port = {api_port}\nport_range = [{base}, {}]\n[coordinator]\n{link}\npoll_interval_ms = 60000\n{redis}[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\npermit_secret = \"permit\"\n[logging]\naccess_log = false\n",
        base + n - 1
    );
    let config =
        appproxy_dataplane::config::Config::parse(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let online: Vec<usize> =
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    let worker = appproxy_dataplane::worker::Worker::start(config.validate(&online)?)?;
    appproxy_node::spawn_agent(config, embedded, worker.deployer(), worker.access_marks())?;
    Ok(worker)
}

fn wait_registered(coord: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = http(coord, "GET /api/worker HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n")?;
        if body.contains("bench-worker") {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "worker did not register");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn percentiles(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{label:<44} n={:<5} p50 {:>8.2?}  p90 {:>8.2?}  p99 {:>8.2?}  max {:>8.2?}",
        samples.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
}

/// Sequential creations; each call's duration, after checking its port listens.
fn latency_run(coord: SocketAddr, base: u16, count: u16, label: &str) -> anyhow::Result<()> {
    let token = token(coord)?;
    let mut samples = Vec::with_capacity(count as usize);
    for i in 0..count {
        samples.push(create(coord, &token, &format!("bench-{i}"))?);
        // Placement takes the lowest free port: circuit i is on base + i.
        if TcpStream::connect(("127.0.0.1", base + i)).is_err() {
            let later = (0..100).any(|_| {
                std::thread::sleep(Duration::from_millis(10));
                TcpStream::connect(("127.0.0.1", base + i)).is_ok()
            });
            anyhow::bail!(
                "circuit {i}: port {} not routable after the answer (within 1 s: {later})",
                base + i
            );
        }
    }
    percentiles(label, samples);
    Ok(())
}

/// `clients` concurrent managers creating `total` circuits; creations per second.
fn throughput_run(
    coord: SocketAddr,
    clients: usize,
    total: usize,
    label: &str,
) -> anyhow::Result<()> {
    let token = token(coord)?;
    let started = Instant::now();
    let per = total / clients;
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let token = token.clone();
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                (0..per)
                    .map(|i| create(coord, &token, &format!("tp-{c}-{i}")))
                    .collect()
            })
        })
        .collect();
    let mut samples = Vec::new();
    for h in handles {
        samples.extend(h.join().map_err(|_| anyhow::anyhow!("client panicked"))??);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{label:<44} {:>8.0} creations/s ({} in {secs:.2} s, {clients} clients)",
        samples.len() as f64 / secs,
        samples.len()
    );
    percentiles(&format!("{label} (per call)"), samples);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    if !args.circuits.is_empty() {
        let worker_bin = match args.worker_bin {
            Some(p) => p,
            None => std::env::current_exe()?
                .parent()
                .map(|d| d.join("appproxy-worker"))
                .ok_or_else(|| anyhow::anyhow!("no directory beside this binary"))?,
        };
        anyhow::ensure!(
            worker_bin.exists(),
            "{} not found: build it (cargo build --release -p appproxy-node --bin appproxy-worker) or pass --worker-bin",
            worker_bin.display()
        );
        let mut sizes = args.circuits.clone();
        sizes.sort_unstable();
        return scale::run(
            &scale::Scale {
                sizes,
                clients: args.clients,
                cores: args.cores,
                worker_bin,
                engines: args.engines.clone(),
                logs: args.logs.clone(),
            },
            dir.path(),
        );
    }
    println!("deployment latency: API call -> acknowledged by every core (-> port connected)");

    // Single node: SQLite, the coordinator inside the worker process.
    let base = free_range(args.count)?;
    let port = free_port();
    let cc = coordinator_config(
        port,
        &format!(
            "sqlite_path = \"{}\"",
            dir.path().join("single.sqlite3").display()
        ),
        None,
    )?;
    let _single = spawn_worker(
        args.cores,
        base,
        args.count,
        "embedded = \"unused.toml\"",
        None,
        Some(cc),
    )?;
    let coord = SocketAddr::from(([127, 0, 0, 1], port));
    wait_registered(coord)?;
    latency_run(
        coord,
        base,
        args.count,
        "single node (SQLite, in-process bus)",
    )?;

    // Cluster: PostgreSQL + Redis, the worker's agent over HTTP and Redis events.
    let pg = pg::Pg::start();
    let redis = redis_server::Redis::start();
    let base = free_range(args.count)?;
    let coord = spawn_coordinator(coordinator_config(
        free_port(),
        &format!("url = \"{}\"", pg.database("latency")),
        Some(&redis.url()),
    )?)?;
    let _clustered = spawn_worker(
        args.cores,
        base,
        args.count,
        &format!("url = \"http://{coord}\""),
        Some(&redis.url()),
        None,
    )?;
    wait_registered(coord)?;
    std::thread::sleep(Duration::from_millis(300)); // the agent subscribes
    latency_run(
        coord,
        base,
        args.count,
        "cluster (PostgreSQL, Redis events)",
    )?;

    println!("\ncoordinator creations on PostgreSQL");
    // The store and placement alone: a registered worker with a wide port range.
    let coord = spawn_coordinator(coordinator_config(
        free_port(),
        &format!("url = \"{}\"", pg.database("throughput")),
        None,
    )?)?;
    let range = args.creations + 10;
    let worker = format!(
        r#"{{"authority":"bench-worker","frontend_mode":"port","protocol":"http","hostname":"127.0.0.1","api_port":1,"port_range":[20000,{}]}}"#,
        20000 + range
    );
    let (status, body) = http(coord, &format!("PUT /api/worker HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{worker}", worker.len()))?;
    anyhow::ensure!(status == 200, "register: {body}");
    throughput_run(
        coord,
        args.clients,
        args.creations,
        "store + placement (no events)",
    )?;
    // With events: every creation waits for the worker's acknowledgement.
    let n = (args.creations as u16).min(1000);
    let base = free_range(n)?;
    let coord = spawn_coordinator(coordinator_config(
        free_port(),
        &format!("url = \"{}\"", pg.database("acked")),
        Some(&redis.url()),
    )?)?;
    let _acking = spawn_worker(
        args.cores,
        base,
        n,
        &format!("url = \"http://{coord}\""),
        Some(&redis.url()),
        None,
    )?;
    wait_registered(coord)?;
    std::thread::sleep(Duration::from_millis(300));
    throughput_run(
        coord,
        args.clients,
        n as usize,
        "with Redis events and worker acks",
    )?;
    Ok(())
}
