//! `appproxy-bench`: measures the worker against nginx, HAProxy and a direct
//! connection on the same upstream, in one run, with interleaved rounds.
//!
//! Layout on an N-core machine: the proxies are pinned to the first `--cores` CPUs;
//! the upstream (nginx `return 200`) and the load generator (wrk) share the others.
//! Each scenario runs every target once per round, in rotating order, after a warm-up,
//! and reports medians: req/s, p50/p99/p99.9 latency, CPU seconds per 100k requests
//! of the proxy process, and ratios against nginx and direct.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use appproxy_benches::report::{self, Row, ScenarioResult};
use clap::Parser;

/// Throughput benchmark of appproxy-worker against nginx, HAProxy and direct.
#[derive(Parser, Debug)]
#[command(name = "appproxy-bench", about)]
struct Args {
    /// CPUs given to each proxy (the rest run the upstream and wrk).
    #[arg(long, default_value_t = 1)]
    cores: usize,
    /// Seconds measured per target per round.
    #[arg(long, default_value_t = 8)]
    duration: u64,
    /// Warm-up seconds before each measurement.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Interleaved rounds per scenario.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// wrk connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Scenarios to run (small, 64k, upload, newconn, reqid, trace, histograms, sse, ws, ws-idle,
    /// idle, contention, and over TLS: tls, tls-newconn; HTTP/2 with h2load: h2, grpc).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "small,64k,upload,newconn,reqid,sse,ws,ws-idle,idle,contention"
    )]
    scenarios: Vec<String>,
    /// Where the JSON, Markdown and SVG report goes.
    #[arg(long, default_value = "target/bench-report")]
    out: PathBuf,
    /// Use the worker binary as built; do not run cargo build.
    #[arg(long)]
    skip_build: bool,
    /// A second worker binary (an earlier build) measured beside the current one in
    /// every plain scenario, on the same CPUs with the same configuration: before and
    /// after in one run.
    #[arg(long)]
    baseline_worker: Option<PathBuf>,
    /// Idle WebSocket sessions held for the memory scenario (each costs the proxy two
    /// descriptors: 9,000 fits a 20,000-descriptor hard limit; use 10,000 where the
    /// limit allows). The worker's connection cap is set to hold them: the cap it
    /// derives from a 20,000-descriptor limit on one core, with its HTTP/2 streams'
    /// share set aside, is 8,912.
    #[arg(long, default_value_t = 9_000)]
    idle_sessions: usize,
    /// Also measure the relay probe (`probes/relay`: one byte relay driven by epoll,
    /// by an io_uring ring, and by a ring with multishot receives) in the plain and
    /// WebSocket/SSE scenarios. It relays bytes without parsing HTTP (a TCP-mode
    /// proxy) on one thread: compare it with `--cores 1` only.
    #[arg(long)]
    relay_probe: bool,
    /// Every proxy writes an access log to a file in the run's directory: the worker
    /// its JSON lines (batched per core), nginx a line with the request ID
    /// (`buffer=64k flush=1s`), HAProxy `option httplog` to its stdout. Off: no proxy
    /// logs requests.
    #[arg(long)]
    access_logs: bool,
    /// Internal: the harness runs its WebSocket tools as pinned subprocesses.
    #[command(subcommand)]
    tool: Option<Tool>,
}

/// The harness's own load tools (run as subprocesses so they can be pinned).
#[derive(clap::Subcommand, Debug)]
#[allow(clippy::enum_variant_names)] // the subcommand names are ws-echo, ws-load …
enum Tool {
    /// A WebSocket echo app.
    #[command(hide = true)]
    WsEcho { port: u16 },
    /// A WebSocket app that only holds sessions.
    #[command(hide = true)]
    WsIdleApp { port: u16 },
    /// WebSocket echo load.
    #[command(hide = true)]
    WsLoad {
        addr: std::net::SocketAddr,
        conns: usize,
        secs: u64,
    },
    /// Holds idle WebSocket sessions until stdin closes.
    #[command(hide = true)]
    WsIdleClient {
        addr: std::net::SocketAddr,
        n: usize,
    },
    /// An endless server-sent-events app.
    #[command(hide = true)]
    SseApp { port: u16 },
    /// Server-sent-events load.
    #[command(hide = true)]
    SseLoad {
        addr: std::net::SocketAddr,
        conns: usize,
        secs: u64,
    },
    /// The gRPC app (HTTP/2, unary and server-streaming methods).
    #[command(hide = true)]
    GrpcApp { port: u16 },
    /// Measures what a park costs against a spin on this machine (the numbers the
    /// reactor's `spin_polls` budget is weighed with) and prints them.
    ParkCost {
        /// The CPU of the waiting side (a proxy core).
        #[arg(long, default_value_t = 0)]
        cpu: usize,
        /// The CPU of the waking side.
        #[arg(long, default_value_t = 1)]
        waker_cpu: usize,
    },
    /// Measures what adding a connection to the epoll set costs (the `epoll_ctl` and
    /// its removal at close) against serving it without, and prints both.
    ArmCost {
        /// The CPU of the serving side (a proxy core).
        #[arg(long, default_value_t = 0)]
        cpu: usize,
        /// The CPU of the clients.
        #[arg(long, default_value_t = 1)]
        client_cpu: usize,
        /// Batches of 100 connections, alternating the two ways.
        #[arg(long, default_value_t = 200)]
        batches: u32,
    },
    /// Spins on the CPU until killed (the contention scenario's hog).
    #[command(hide = true)]
    CpuHog,
}

/// A proxy (or none) in front of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Direct,
    Worker,
    Nginx,
    Haproxy,
    /// The worker with request-ID handling turned off (the request-ID scenario only).
    WorkerNoIds,
    /// The worker with trace context turned off (the trace scenario only).
    WorkerNoTrace,
    /// The worker with its latency histograms turned off (the histograms scenario only).
    WorkerNoHist,
    /// The worker terminating TLS (the TLS scenarios only).
    WorkerTls,
    /// nginx terminating TLS with the same certificate (the TLS scenarios only).
    NginxTls,
    /// The `--baseline-worker` binary, configured as [`Target::Worker`] on ports
    /// [`BASELINE_OFFSET`] higher.
    WorkerBaseline,
    /// The relay probe in one of its modes (`--relay-probe`).
    Probe(ProbeMode),
}

/// How the relay probe waits for its sockets (its `--mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum ProbeMode {
    Epoll,
    Uring,
    UringMultishot,
}

impl ProbeMode {
    const ALL: [ProbeMode; 3] = [Self::Epoll, Self::Uring, Self::UringMultishot];

    fn arg(self) -> &'static str {
        match self {
            Self::Epoll => "epoll",
            Self::Uring => "uring",
            Self::UringMultishot => "uring-multishot",
        }
    }

    /// The probe's first port in this mode: +0 relays to the HTTP upstream, +1 to
    /// the WebSocket echo app, +2 to the SSE app.
    fn port(self) -> u16 {
        PROBE_PORT
            + 4 * match self {
                Self::Epoll => 0,
                Self::Uring => 1,
                Self::UringMultishot => 2,
            }
    }
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Worker => "appproxy-worker",
            Self::Nginx => "nginx",
            Self::Haproxy => "haproxy",
            Self::WorkerNoIds => "appproxy-worker, IDs off",
            Self::WorkerNoTrace => "appproxy-worker, trace context off",
            Self::WorkerNoHist => "appproxy-worker, histograms off",
            Self::WorkerTls => "appproxy-worker, TLS",
            Self::NginxTls => "nginx, TLS",
            Self::WorkerBaseline => "appproxy-worker, baseline",
            Self::Probe(ProbeMode::Epoll) => "relay probe, epoll",
            Self::Probe(ProbeMode::Uring) => "relay probe, io_uring",
            Self::Probe(ProbeMode::UringMultishot) => "relay probe, io_uring multishot",
        }
    }

    /// Whether the target serves TLS (measured only in the TLS scenarios).
    fn tls(self) -> bool {
        matches!(self, Self::WorkerTls | Self::NginxTls)
    }
}

const UPSTREAM_PORT: u16 = 19081;
/// How far above the worker's ports the baseline worker listens.
const BASELINE_OFFSET: u16 = 1000;
const WORKER_PORT: u16 = 19083;
const NGINX_PORT: u16 = 19082;
const HAPROXY_PORT: u16 = 19084;
const WORKER_ADMIN: u16 = 19093;
const WORKER_NOIDS_PORT: u16 = 19095;
const WORKER_NOIDS_ADMIN: u16 = 19096;
const WORKER_NOTRACE_PORT: u16 = 19112;
const WORKER_NOTRACE_ADMIN: u16 = 19113;
const WORKER_NOHIST_PORT: u16 = 19116;
const WORKER_NOHIST_ADMIN: u16 = 19117;
/// WebSocket echo app, and each proxy's frontend for it.
const WS_APP_PORT: u16 = 19085;
const WS_WORKER_PORT: u16 = 19086;
const WS_NGINX_PORT: u16 = 19087;
const WS_HAPROXY_PORT: u16 = 19088;
/// Idle-session app, and the proxies' frontends for it.
const IDLE_APP_PORT: u16 = 19089;
const IDLE_WORKER_PORT: u16 = 19090;
const IDLE_NGINX_PORT: u16 = 19091;
/// Server-sent-events app, and each proxy's frontend for it.
const SSE_APP_PORT: u16 = 19098;
const SSE_WORKER_PORT: u16 = 19097;
const SSE_NGINX_PORT: u16 = 19099;
const SSE_HAPROXY_PORT: u16 = 19100;
/// The TLS-terminating worker (and its admin port) and nginx.
const WORKER_TLS_PORT: u16 = 19101;
const WORKER_TLS_ADMIN: u16 = 19103;
const NGINX_TLS_PORT: u16 = 19102;
/// nginx serving prior-knowledge HTTP/2 (the worker's plain port serves it too).
const NGINX_H2_PORT: u16 = 19114;
/// The gRPC app, the worker's `grpc` circuit for it, and nginx `grpc_pass` to it.
const GRPC_APP_PORT: u16 = 19120;
const WORKER_GRPC_PORT: u16 = 19121;
const NGINX_GRPC_PORT: u16 = 19122;
/// The relay probe's first port (see [`ProbeMode::port`]).
const PROBE_PORT: u16 = 19130;

/// A running server; killed on drop.
struct Server {
    name: &'static str,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM first: an nginx master stops its workers on it; SIGKILL would
        // orphan them, still listening.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd} >/dev/null 2>&1"))
        .status()
        .is_ok_and(|s| s.success())
}

fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn wait_port(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not start listening on port {port}")
}

/// Processes to kill if the harness itself is interrupted.
static CHILDREN: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// On SIGINT/SIGTERM: kill every server started, then exit.
fn kill_children_on_signal() -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            if let Ok(pids) = CHILDREN.lock() {
                for pid in pids.iter() {
                    let _ = Command::new("kill").arg(pid.to_string()).status();
                }
            }
            eprintln!("interrupted (signal {sig}); servers stopped");
            std::process::exit(130);
        }
    });
    Ok(())
}

/// Fails when a port the harness needs is taken (a stale server would skew results).
fn ensure_free(port: u16) -> anyhow::Result<()> {
    std::net::TcpListener::bind(("127.0.0.1", port))
        .map(drop)
        .with_context(|| {
            format!(
                "port {port} is in use: stop whatever listens there (a stale benchmark server?)"
            )
        })
}

fn spawn(
    name: &'static str,
    cpus: &[usize],
    program: &str,
    args: &[&str],
    log: &Path,
) -> anyhow::Result<Server> {
    let out = std::fs::File::create(log)?;
    let child = Command::new("taskset")
        .arg("-c")
        .arg(cpu_list(cpus))
        .arg(program)
        .args(args)
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out))
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    if let Ok(mut pids) = CHILDREN.lock() {
        pids.push(child.id());
    }
    Ok(Server { name, child })
}

/// Total CPU seconds (user + system) of a process and its threads/children.
fn cpu_seconds(pid: u32) -> f64 {
    let mut pids = vec![pid];
    // nginx: the master and its workers.
    if let Ok(out) = Command::new("pgrep")
        .arg("-P")
        .arg(pid.to_string())
        .output()
    {
        pids.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.trim().parse::<u32>().ok()),
        );
    }
    let ticks = 100.0; // USER_HZ
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|stat| {
            let after = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = after.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .sum()
}

struct Setup {
    dir: tempfile::TempDir,
    proxy_cpus: Vec<usize>,
    load_cpus: Vec<usize>,
    servers: BTreeMap<Target, Server>,
    _upstream: Server,
    /// The WebSocket apps.
    _apps: Vec<Server>,
}

/// An nginx configuration; `access_log`: its `access_log` directive's arguments.
fn nginx_conf(dir: &Path, name: &str, body: &str, workers: usize, access_log: &str) -> PathBuf {
    let path = dir.join(format!("{name}.conf"));
    let text = format!(
        "worker_processes {workers};\ndaemon off;\npid {pid};\nerror_log {err} warn;\nevents {{ worker_connections 20000; }}\nhttp {{\n  log_format rid '$remote_addr [$time_iso8601] \"$request\" $status $request_length $bytes_sent $request_time $upstream_addr $http_x_backend_request_id $sent_http_x_backend_request_id';\n  access_log {access_log};\n  keepalive_requests 10000000;\n  client_body_temp_path {dir}/body-{name};\n  proxy_temp_path {dir}/proxy-{name};\n  client_max_body_size 8m;\n{body}\n}}\n",
        pid = dir.join(format!("{name}.pid")).display(),
        err = dir.join(format!("{name}.err")).display(),
        dir = dir.display(),
    );
    let _ = std::fs::write(&path, text);
    path
}

fn start(args: &Args, worker_bin: &Path) -> anyhow::Result<Setup> {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    if args.cores >= online && online > 1 {
        bail!(
            "--cores {} leaves no CPU for the upstream and wrk (this machine has {online})",
            args.cores
        );
    }
    let proxy_cpus: Vec<usize> = (0..args.cores.max(1)).collect();
    let load_cpus: Vec<usize> = if online > args.cores {
        (args.cores..online).collect()
    } else {
        vec![0]
    };
    let dir = tempfile::tempdir()?;
    // The upstream: nginx returning a 64-byte body, a 64 KiB file, and accepting uploads.
    std::fs::write(dir.path().join("64k"), vec![b'x'; 64 * 1024])?;
    let up_body = format!(
        "  server {{\n    listen 127.0.0.1:{UPSTREAM_PORT} reuseport backlog=4096;\n    location = / {{ return 200 \"0123456789012345678901234567890123456789012345678901234567890123\"; }}\n    location = /64k {{ root {}; }}\n    location = /upload {{ return 200 \"ok\"; }}\n  }}",
        dir.path().display()
    );
    let up_conf = nginx_conf(dir.path(), "upstream", &up_body, load_cpus.len(), "off");
    let upstream = spawn(
        "upstream",
        &load_cpus,
        "nginx",
        &[
            "-c",
            &up_conf.to_string_lossy(),
            "-p",
            &dir.path().to_string_lossy(),
        ],
        &dir.path().join("upstream.log"),
    )?;
    wait_port(UPSTREAM_PORT, "the upstream nginx")?;

    let me = std::env::current_exe()?;
    let me = me.to_string_lossy().into_owned();
    let ws_app = spawn(
        "ws-echo",
        &load_cpus,
        &me,
        &["ws-echo", &WS_APP_PORT.to_string()],
        &dir.path().join("ws-echo.log"),
    )?;
    let idle_app = spawn(
        "ws-idle-app",
        &load_cpus,
        &me,
        &["ws-idle-app", &IDLE_APP_PORT.to_string()],
        &dir.path().join("ws-idle.log"),
    )?;
    let sse_app = spawn(
        "sse-app",
        &load_cpus,
        &me,
        &["sse-app", &SSE_APP_PORT.to_string()],
        &dir.path().join("sse.log"),
    )?;
    let grpc_app = spawn(
        "grpc-app",
        &load_cpus,
        &me,
        &["grpc-app", &GRPC_APP_PORT.to_string()],
        &dir.path().join("grpc-app.log"),
    )?;
    wait_port(GRPC_APP_PORT, "the gRPC app")?;
    wait_port(WS_APP_PORT, "the WebSocket echo app")?;
    wait_port(SSE_APP_PORT, "the SSE app")?;
    wait_port(IDLE_APP_PORT, "the idle-session app")?;
    let mut servers = BTreeMap::new();
    // appproxy-worker.
    let worker_conf = dir.path().join("worker.toml");
    std::fs::write(
        &worker_conf,
        format!(
            "[worker]\ncores = \"{cpus}\"\nbind_host = \"127.0.0.1\"\nport_range = [1024, 65535]\n[admin]\nbind = \"127.0.0.1:{WORKER_ADMIN}\"\n[logging]\nfilter = \"warn\"\naccess_log = {access_log}\n[limits]\nmax_connections_per_core = {cap}\n[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455556666\"\nport = {WORKER_PORT}\nopen_to_public = true\nroute_info = [{{ session_id = \"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\", kernel_host = \"127.0.0.1\", kernel_port = {UPSTREAM_PORT} }}]\n[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455550001\"\nport = {WS_WORKER_PORT}\nopen_to_public = true\nroute_info = [{{ session_id = \"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\", kernel_host = \"127.0.0.1\", kernel_port = {WS_APP_PORT} }}]\n[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455550002\"\nport = {IDLE_WORKER_PORT}\nopen_to_public = true\nroute_info = [{{ session_id = \"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\", kernel_host = \"127.0.0.1\", kernel_port = {IDLE_APP_PORT} }}]\n[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455550003\"\nport = {SSE_WORKER_PORT}\nopen_to_public = true\nroute_info = [{{ session_id = \"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\", kernel_host = \"127.0.0.1\", kernel_port = {SSE_APP_PORT} }}]\n[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455550004\"\nport = {WORKER_GRPC_PORT}\nprotocol = \"grpc\"\nopen_to_public = true\nroute_info = [{{ session_id = \"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\", kernel_host = \"127.0.0.1\", kernel_port = {GRPC_APP_PORT} }}]\n",
            cpus = cpu_list(&proxy_cpus),
            access_log = args.access_logs,
            // Every idle session of the memory scenario on one core, with room for
            // the other scenarios' connections.
            cap = args.idle_sessions + 1_024,
        ),
    )?;
    let w = spawn(
        "appproxy-worker",
        &proxy_cpus,
        &worker_bin.to_string_lossy(),
        &["--config", &worker_conf.to_string_lossy()],
        &dir.path().join("worker.log"),
    )?;
    wait_port(WORKER_PORT, "appproxy-worker")?;
    servers.insert(Target::Worker, w);
    // The baseline worker: the same configuration, every port shifted.
    if let Some(bin) = &args.baseline_worker {
        let conf = dir.path().join("worker-baseline.toml");
        let mut text = std::fs::read_to_string(&worker_conf)?.replace(
            &format!("127.0.0.1:{WORKER_ADMIN}"),
            &format!("127.0.0.1:{}", WORKER_ADMIN + BASELINE_OFFSET),
        );
        for port in [
            WORKER_PORT,
            WS_WORKER_PORT,
            IDLE_WORKER_PORT,
            SSE_WORKER_PORT,
            WORKER_GRPC_PORT,
        ] {
            text = text.replace(
                &format!("\nport = {port}\n"),
                &format!("\nport = {}\n", port + BASELINE_OFFSET),
            );
        }
        std::fs::write(&conf, text)?;
        let w = spawn(
            "appproxy-worker (baseline)",
            &proxy_cpus,
            &bin.to_string_lossy(),
            &["--config", &conf.to_string_lossy()],
            &dir.path().join("worker-baseline.log"),
        )?;
        wait_port(WORKER_PORT + BASELINE_OFFSET, "appproxy-worker (baseline)")?;
        servers.insert(Target::WorkerBaseline, w);
    }
    // The same worker with request-ID handling off, for the request-ID scenario.
    let noids_conf = dir.path().join("worker-noids.toml");
    let text = std::fs::read_to_string(&worker_conf)?
        .replace("[worker]\n", "[worker]\nrequest_ids = false\n")
        .replace(
            &format!("port = {WORKER_PORT}\n"),
            &format!("port = {WORKER_NOIDS_PORT}\n"),
        )
        .replace(
            &format!("127.0.0.1:{WORKER_ADMIN}"),
            &format!("127.0.0.1:{WORKER_NOIDS_ADMIN}"),
        );
    let text = text
        .split("\n[[circuits]]")
        .take(2)
        .collect::<Vec<_>>()
        .join("\n[[circuits]]");
    std::fs::write(&noids_conf, text)?;
    let w = spawn(
        "appproxy-worker (IDs off)",
        &proxy_cpus,
        &worker_bin.to_string_lossy(),
        &["--config", &noids_conf.to_string_lossy()],
        &dir.path().join("worker-noids.log"),
    )?;
    wait_port(WORKER_NOIDS_PORT, "appproxy-worker (IDs off)")?;
    servers.insert(Target::WorkerNoIds, w);
    // The same worker with trace context off, for the trace scenario.
    let notrace_conf = dir.path().join("worker-notrace.toml");
    let text = std::fs::read_to_string(&noids_conf)?
        .replace("request_ids = false\n", "trace_context = false\n")
        .replace(
            &format!("port = {WORKER_NOIDS_PORT}\n"),
            &format!("port = {WORKER_NOTRACE_PORT}\n"),
        )
        .replace(
            &format!("127.0.0.1:{WORKER_NOIDS_ADMIN}"),
            &format!("127.0.0.1:{WORKER_NOTRACE_ADMIN}"),
        );
    std::fs::write(&notrace_conf, text)?;
    let w = spawn(
        "appproxy-worker (trace off)",
        &proxy_cpus,
        &worker_bin.to_string_lossy(),
        &["--config", &notrace_conf.to_string_lossy()],
        &dir.path().join("worker-notrace.log"),
    )?;
    wait_port(WORKER_NOTRACE_PORT, "appproxy-worker (trace off)")?;
    servers.insert(Target::WorkerNoTrace, w);
    // The same worker with latency histograms off, for the histograms scenario.
    let nohist_conf = dir.path().join("worker-nohist.toml");
    let text = std::fs::read_to_string(&worker_conf)?
        .replace("[admin]\n", "[admin]\nlatency_histograms = false\n")
        .replace(
            &format!("port = {WORKER_PORT}\n"),
            &format!("port = {WORKER_NOHIST_PORT}\n"),
        )
        .replace(
            &format!("127.0.0.1:{WORKER_ADMIN}"),
            &format!("127.0.0.1:{WORKER_NOHIST_ADMIN}"),
        );
    let text = text
        .split("\n[[circuits]]")
        .take(2)
        .collect::<Vec<_>>()
        .join("\n[[circuits]]");
    std::fs::write(&nohist_conf, text)?;
    let w = spawn(
        "appproxy-worker (histograms off)",
        &proxy_cpus,
        &worker_bin.to_string_lossy(),
        &["--config", &nohist_conf.to_string_lossy()],
        &dir.path().join("worker-nohist.log"),
    )?;
    wait_port(WORKER_NOHIST_PORT, "appproxy-worker (histograms off)")?;
    servers.insert(Target::WorkerNoHist, w);
    // TLS: one ECDSA P-256 certificate for the worker and nginx alike.
    let cert = dir.path().join("tls.pem");
    let key = dir.path().join("tls.key");
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if made {
        let tls_conf = dir.path().join("worker-tls.toml");
        let text = std::fs::read_to_string(&worker_conf)?
            .replace(
                "[worker]\n",
                &format!(
                    "[worker]\ntls_listen = true\ntls_cert = \"{}\"\ntls_privkey = \"{}\"\n",
                    cert.display(),
                    key.display()
                ),
            )
            .replace(
                &format!("port = {WORKER_PORT}\n"),
                &format!("port = {WORKER_TLS_PORT}\n"),
            )
            .replace(
                &format!("127.0.0.1:{WORKER_ADMIN}"),
                &format!("127.0.0.1:{WORKER_TLS_ADMIN}"),
            );
        let text = text
            .split("\n[[circuits]]")
            .take(2)
            .collect::<Vec<_>>()
            .join("\n[[circuits]]");
        std::fs::write(&tls_conf, text)?;
        let w = spawn(
            "appproxy-worker (TLS)",
            &proxy_cpus,
            &worker_bin.to_string_lossy(),
            &["--config", &tls_conf.to_string_lossy()],
            &dir.path().join("worker-tls.log"),
        )?;
        match wait_port(WORKER_TLS_PORT, "appproxy-worker (TLS)") {
            Ok(()) => {
                servers.insert(Target::WorkerTls, w);
            }
            // A worker built without TLS: the other rows still run.
            Err(e) => println!("{e:#}: the worker's TLS row is skipped"),
        }
    } else {
        println!("openssl could not make a certificate: the TLS rows are skipped");
    }
    // nginx as a reverse proxy with the same request-ID behaviour: keep a client ID,
    // else generate one; forward it and echo it.
    if have("nginx") {
        let tls_server = if made {
            format!(
                "\n  server {{\n    listen 127.0.0.1:{NGINX_TLS_PORT} ssl reuseport backlog=4096;\n    ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_session_cache shared:SSL:10m;\n    ssl_session_tickets on;\n    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header X-Forwarded-Proto https; proxy_set_header X-Backend-Request-ID $rid; add_header X-Backend-Request-ID $rid always; proxy_buffering on; }}\n  }}",
                cert.display(),
                key.display()
            )
        } else {
            String::new()
        };
        let body = format!(
            "  map $http_x_backend_request_id $rid {{ \"\" $request_id; default $http_x_backend_request_id; }}\n  upstream app {{ server 127.0.0.1:{UPSTREAM_PORT}; keepalive 256; }}\n  server {{\n    listen 127.0.0.1:{NGINX_PORT} reuseport backlog=4096;\n    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header X-Backend-Request-ID $rid; add_header X-Backend-Request-ID $rid always; proxy_buffering on; }}\n  }}\n  server {{\n    listen 127.0.0.1:{WS_NGINX_PORT} reuseport backlog=4096;\n    location / {{ proxy_pass http://127.0.0.1:{WS_APP_PORT}; proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\"; proxy_set_header X-Backend-Request-ID $rid; proxy_read_timeout 3600s; }}\n  }}\n  server {{\n    listen 127.0.0.1:{IDLE_NGINX_PORT} reuseport backlog=4096;\n    location / {{ proxy_pass http://127.0.0.1:{IDLE_APP_PORT}; proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\"; proxy_read_timeout 3600s; }}\n  }}\n  server {{\n    listen 127.0.0.1:{SSE_NGINX_PORT} reuseport backlog=4096;\n    location / {{ proxy_pass http://127.0.0.1:{SSE_APP_PORT}; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; proxy_set_header X-Backend-Request-ID $rid; }}\n  }}\n  server {{\n    listen 127.0.0.1:{NGINX_H2_PORT} http2 reuseport backlog=4096;\n    http2_max_concurrent_streams 128;\n    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header X-Backend-Request-ID $rid; add_header X-Backend-Request-ID $rid always; proxy_buffering on; }}\n  }}\n  upstream grpcapp {{ server 127.0.0.1:{GRPC_APP_PORT}; keepalive 256; keepalive_requests 10000000; }}\n  server {{\n    listen 127.0.0.1:{NGINX_GRPC_PORT} http2 reuseport backlog=4096;\n    http2_max_concurrent_streams 128;\n    location / {{ grpc_pass grpc://grpcapp; grpc_set_header X-Backend-Request-ID $rid; add_header X-Backend-Request-ID $rid always; }}\n  }}{tls_server}"
        );
        let access_log = if args.access_logs {
            format!(
                "{} rid buffer=64k flush=1s",
                dir.path().join("nginx-access.log").display()
            )
        } else {
            "off".to_string()
        };
        let conf = nginx_conf(dir.path(), "proxy", &body, proxy_cpus.len(), &access_log);
        let s = spawn(
            "nginx",
            &proxy_cpus,
            "nginx",
            &[
                "-c",
                &conf.to_string_lossy(),
                "-p",
                &dir.path().to_string_lossy(),
            ],
            &dir.path().join("nginx.log"),
        )?;
        wait_port(NGINX_PORT, "nginx")?;
        servers.insert(Target::Nginx, s);
        if made {
            wait_port(NGINX_TLS_PORT, "nginx (TLS)")?;
            // The same nginx process serves both; its CPU is measured on the plain row.
            servers.insert(
                Target::NginxTls,
                Server {
                    name: "nginx, TLS",
                    child: Command::new("sleep").arg("infinity").spawn()?,
                },
            );
        }
    }
    if have("haproxy") {
        let conf = dir.path().join("haproxy.cfg");
        std::fs::write(
            &conf,
            format!(
                "global\n  nbthread {n}\n  cpu-map auto:1/1-{n} {cpus}\n  maxconn 8000\n{global_log}defaults\n  mode http\n{defaults_log}  timeout connect 3s\n  timeout client 75s\n  timeout server 60s\n  http-reuse always\nfrontend fe\n  bind 127.0.0.1:{HAPROXY_PORT}\n  http-request set-header X-Backend-Request-ID %[uuid()] unless {{ req.hdr(x-backend-request-id) -m found }}\n  http-request set-var(txn.rid) req.hdr(x-backend-request-id)\n{capture}  http-response set-header X-Backend-Request-ID %[var(txn.rid)]\n  default_backend be\nbackend be\n  server app 127.0.0.1:{UPSTREAM_PORT}\nfrontend ws\n  bind 127.0.0.1:{WS_HAPROXY_PORT}\n  timeout tunnel 1h\n  default_backend ws\nbackend ws\n  timeout tunnel 1h\n  server app 127.0.0.1:{WS_APP_PORT}\nfrontend sse\n  bind 127.0.0.1:{SSE_HAPROXY_PORT}\n  default_backend sse\nbackend sse\n  server app 127.0.0.1:{SSE_APP_PORT}\n",
                n = proxy_cpus.len(),
                cpus = proxy_cpus.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "),
                capture = if args.access_logs {
                    "  http-request capture req.hdr(x-backend-request-id) len 36\n"
                } else {
                    ""
                },
                global_log = if args.access_logs { "  log stdout format raw local0\n" } else { "" },
                defaults_log = if args.access_logs {
                    "  log global\n  option httplog\n"
                } else {
                    ""
                },
            ),
        )?;
        let s = spawn(
            "haproxy",
            &proxy_cpus,
            "haproxy",
            &["-f", &conf.to_string_lossy()],
            &dir.path().join("haproxy.log"),
        )?;
        wait_port(HAPROXY_PORT, "haproxy")?;
        servers.insert(Target::Haproxy, s);
    }
    if args.relay_probe {
        let probe = worker_bin.with_file_name("appproxy-relay-probe");
        for mode in ProbeMode::ALL {
            let port = mode.port();
            let routes = [
                format!("{port}=127.0.0.1:{UPSTREAM_PORT}"),
                format!("{}=127.0.0.1:{WS_APP_PORT}", port + 1),
                format!("{}=127.0.0.1:{SSE_APP_PORT}", port + 2),
            ];
            let mut argv = vec!["--mode", mode.arg()];
            for r in &routes {
                argv.extend(["--route", r]);
            }
            let s = spawn(
                "relay probe",
                &proxy_cpus,
                &probe.to_string_lossy(),
                &argv,
                &dir.path().join(format!("probe-{}.log", mode.arg())),
            )?;
            wait_port(port + 2, "relay probe")?;
            servers.insert(Target::Probe(mode), s);
        }
    }
    Ok(Setup {
        dir,
        proxy_cpus,
        load_cpus,
        servers,
        _upstream: upstream,
        _apps: vec![ws_app, idle_app, sse_app, grpc_app],
    })
}

fn port_of(t: Target) -> u16 {
    match t {
        Target::Direct => UPSTREAM_PORT,
        Target::Worker => WORKER_PORT,
        Target::Nginx => NGINX_PORT,
        Target::Haproxy => HAPROXY_PORT,
        Target::WorkerNoIds => WORKER_NOIDS_PORT,
        Target::WorkerNoTrace => WORKER_NOTRACE_PORT,
        Target::WorkerNoHist => WORKER_NOHIST_PORT,
        Target::WorkerTls => WORKER_TLS_PORT,
        Target::NginxTls => NGINX_TLS_PORT,
        Target::WorkerBaseline => WORKER_PORT + BASELINE_OFFSET,
        Target::Probe(m) => m.port(),
    }
}

/// One scenario: what wrk sends.
struct Scenario {
    name: &'static str,
    title: &'static str,
    path: &'static str,
    headers: Vec<&'static str>,
    lua_prelude: &'static str,
    /// For the request-ID scenario: only the worker, with and without a client ID.
    reqid: bool,
    /// A CPU-bound process shares the proxy's CPUs during each measurement.
    hog: bool,
    /// Over TLS: only the TLS-terminating worker and nginx, on `https://`.
    tls: bool,
}

fn scenario(name: &str) -> Option<Scenario> {
    let s = |name, title, path, headers: Vec<&'static str>, lua_prelude, reqid| Scenario {
        name,
        title,
        path,
        headers,
        lua_prelude,
        reqid,
        hog: false,
        tls: false,
    };
    Some(match name {
        "contention" => Scenario {
            hog: true,
            ..s("contention", "small GET, keep-alive, a CPU-bound process on the proxy's CPUs", "/", vec![], "", false)
        },
        "small" => s("small", "small GET, keep-alive (64-byte body)", "/", vec![], "", false),
        "64k" => s("64k", "64 KiB responses, keep-alive", "/64k", vec![], "", false),
        "upload" => s("upload", "1 MiB uploads (POST), keep-alive", "/upload", vec![], "wrk.method = \"POST\"\nwrk.body = string.rep(\"u\", 1048576)\nwrk.headers[\"Content-Type\"] = \"application/octet-stream\"\n", false),
        "newconn" => s("newconn", "a new connection per request", "/", vec!["Connection: close"], "", false),
        "reqid" => s("reqid", "request ID: generated by the worker vs sent by the client", "/", vec![], "", true),
        "trace" => s("trace", "W3C trace context on vs off (small GET, keep-alive)", "/", vec![], "", true),
        "histograms" => s("histograms", "latency histograms on vs off (small GET, keep-alive)", "/", vec![], "", true),
        "tls" => Scenario {
            tls: true,
            ..s("tls", "small GET over TLS, keep-alive (same certificate, ECDSA P-256)", "/", vec![], "", false)
        },
        "tls-newconn" => Scenario {
            tls: true,
            ..s("tls-newconn", "a new TLS connection (full handshake) per request", "/", vec!["Connection: close"], "", false)
        },
        _ => return None,
    })
}

const LUA_DONE: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH requests=%d duration_us=%d errors=%d p50=%d p99=%d p999=%d\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

/// One wrk run's numbers.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    errors: u64,
    cpu_per_100k: Option<f64>,
}

fn run_wrk(
    setup: &Setup,
    args: &Args,
    sc: &Scenario,
    port: u16,
    extra_header: Option<&str>,
    secs: u64,
    pid: Option<u32>,
) -> anyhow::Result<Sample> {
    let script = setup.dir.path().join(format!("{}.lua", sc.name));
    std::fs::write(&script, format!("{}{}", sc.lua_prelude, LUA_DONE))?;
    let mut cmd = Command::new("taskset");
    cmd.arg("-c")
        .arg(cpu_list(&setup.load_cpus))
        .arg("wrk")
        .arg(format!("-t{}", setup.load_cpus.len().max(1)));
    cmd.arg(format!("-c{}", args.connections))
        .arg(format!("-d{secs}s"))
        .arg("-s")
        .arg(&script);
    for h in &sc.headers {
        cmd.arg("-H").arg(h);
    }
    if let Some(h) = extra_header {
        cmd.arg("-H").arg(h);
    }
    let scheme = if sc.tls { "https" } else { "http" };
    cmd.arg(format!("{scheme}://127.0.0.1:{port}{}", sc.path));
    let cpu0 = pid.map(cpu_seconds);
    let out = output_within(&mut cmd, secs, "wrk")?;
    let cpu1 = pid.map(cpu_seconds);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("BENCH "))
        .with_context(|| format!("wrk printed no result: {text}"))?;
    let mut kv = BTreeMap::new();
    for part in line.split_whitespace().skip(1) {
        if let Some((k, v)) = part.split_once('=') {
            kv.insert(k, v.parse::<f64>().unwrap_or(0.0));
        }
    }
    let requests = kv.get("requests").copied().unwrap_or(0.0);
    let duration = kv.get("duration_us").copied().unwrap_or(1.0) / 1e6;
    let cpu_per_100k = match (cpu0, cpu1) {
        (Some(a), Some(b)) if requests > 0.0 => Some((b - a) / requests * 100_000.0),
        _ => None,
    };
    Ok(Sample {
        rps: requests / duration,
        p50_us: kv.get("p50").copied().unwrap_or(0.0),
        p99_us: kv.get("p99").copied().unwrap_or(0.0),
        p999_us: kv.get("p999").copied().unwrap_or(0.0),
        errors: kv.get("errors").copied().unwrap_or(0.0) as u64,
        cpu_per_100k,
    })
}

/// Runs a load client for a `secs`-second run and collects its output, killing it if
/// it is still running well after the run should have ended: a target that stops
/// answering fails its round with a clear message instead of hanging the harness.
fn output_within(cmd: &mut Command, secs: u64, what: &str) -> anyhow::Result<std::process::Output> {
    use std::io::Read as _;
    let limit = Duration::from_secs(secs + 30);
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {what}"))?;
    // Drain the pipes on threads so a chatty client cannot block on a full pipe.
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "{what} was still running {}s after its {secs}s run: the target stopped answering",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(std::process::Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

fn ws_port_of(t: Target) -> u16 {
    match t {
        Target::Direct => WS_APP_PORT,
        Target::Worker => WS_WORKER_PORT,
        Target::Nginx => WS_NGINX_PORT,
        Target::Haproxy => WS_HAPROXY_PORT,
        Target::WorkerNoIds | Target::WorkerNoTrace | Target::WorkerNoHist => WS_WORKER_PORT,
        Target::WorkerBaseline => WS_WORKER_PORT + BASELINE_OFFSET,
        Target::Probe(m) => m.port() + 1,
        // Not measured here (the WebSocket scenarios skip the TLS targets).
        Target::WorkerTls | Target::NginxTls => 0,
    }
}

/// Runs one of the harness's own load clients (`ws-load`, `sse-load`), pinned to the
/// load CPUs.
fn run_tool_load(
    tool: &str,
    setup: &Setup,
    args: &Args,
    port: u16,
    secs: u64,
    pid: Option<u32>,
) -> anyhow::Result<Sample> {
    let me = std::env::current_exe()?;
    let cpu0 = pid.map(cpu_seconds);
    let mut cmd = Command::new("taskset");
    cmd.arg("-c")
        .arg(cpu_list(&setup.load_cpus))
        .arg(&me)
        .args([
            tool,
            &format!("127.0.0.1:{port}"),
            &args.connections.to_string(),
            &secs.to_string(),
        ]);
    let out = output_within(&mut cmd, secs, tool)?;
    let cpu1 = pid.map(cpu_seconds);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("BENCH "))
        .with_context(|| format!("the load client printed no result: {text}"))?;
    let kv: BTreeMap<&str, f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k, v.parse().unwrap_or(0.0)))
        .collect();
    let messages = kv.get("requests").copied().unwrap_or(0.0);
    let duration = kv.get("duration_us").copied().unwrap_or(1.0) / 1e6;
    Ok(Sample {
        rps: messages / duration,
        p50_us: kv.get("p50").copied().unwrap_or(0.0),
        p99_us: kv.get("p99").copied().unwrap_or(0.0),
        p999_us: kv.get("p999").copied().unwrap_or(0.0),
        errors: kv.get("errors").copied().unwrap_or(0.0) as u64,
        cpu_per_100k: match (cpu0, cpu1) {
            (Some(a), Some(b)) if messages > 0.0 => Some((b - a) / messages * 100_000.0),
            _ => None,
        },
    })
}

/// WebSocket echo messages/s (64-byte text, one in flight per session).
fn ws_echo_scenario(setup: &Setup, args: &Args) -> anyhow::Result<ScenarioResult> {
    tool_scenario(
        setup,
        args,
        (
            "ws",
            "WebSocket echo, messages/s (64-byte text, one in flight per session)",
        ),
        "ws-load",
        ws_port_of,
        true,
    )
}

/// Runs one of the harness's own load clients against every target, in interleaved
/// rounds (optionally after a warm-up run), and takes the medians.
fn tool_scenario(
    setup: &Setup,
    args: &Args,
    (name, title): (&str, &str),
    tool: &str,
    port_of: fn(Target) -> u16,
    warm_up: bool,
) -> anyhow::Result<ScenarioResult> {
    let mut targets = vec![Target::Direct];
    targets.extend(setup.servers.keys().copied().filter(|t| {
        !matches!(
            t,
            Target::WorkerNoIds | Target::WorkerNoTrace | Target::WorkerNoHist
        ) && !t.tls()
    }));
    let labels: Vec<String> = targets.iter().map(|t| t.name().to_owned()).collect();
    let rows = interleaved_rounds(args.rounds, name, &labels, "/s", |i| {
        let t = targets[i];
        let pid = setup.servers.get(&t).map(|s| s.child.id());
        if warm_up {
            run_tool_load(tool, setup, args, port_of(t), args.warmup, None)?;
        }
        run_tool_load(tool, setup, args, port_of(t), args.duration, pid)
    });
    Ok(ScenarioResult {
        name: name.into(),
        title: title.into(),
        rows,
    })
}

fn sse_port_of(t: Target) -> u16 {
    match t {
        Target::Direct => SSE_APP_PORT,
        Target::Worker | Target::WorkerNoIds | Target::WorkerNoTrace | Target::WorkerNoHist => {
            SSE_WORKER_PORT
        }
        Target::Nginx => SSE_NGINX_PORT,
        Target::Haproxy => SSE_HAPROXY_PORT,
        Target::WorkerBaseline => SSE_WORKER_PORT + BASELINE_OFFSET,
        Target::Probe(m) => m.port() + 2,
        // Not measured here (the SSE scenario skips the TLS targets).
        Target::WorkerTls | Target::NginxTls => 0,
    }
}

/// Server-sent events relayed per second (one endless stream per connection).
fn sse_scenario(setup: &Setup, args: &Args) -> anyhow::Result<ScenarioResult> {
    tool_scenario(
        setup,
        args,
        ("sse", "server-sent events relayed per second (100-byte events, one stream per connection; latency not measured)"),
        "sse-load",
        sse_port_of,
        false,
    )
}

/// HTTP/2 small GET with h2load (prior knowledge, `--connections` connections × 10
/// concurrent streams): the worker's plain port against nginx `listen … http2`, both
/// proxying to the same upstream over HTTP/1.1 keep-alive.
fn h2_scenario(setup: &Setup, args: &Args) -> anyhow::Result<ScenarioResult> {
    if !have("h2load") {
        anyhow::bail!("the h2 scenario needs h2load: apt-get install nghttp2-client");
    }
    let targets: Vec<(Target, u16)> = [
        (Target::Worker, WORKER_PORT),
        (Target::WorkerBaseline, WORKER_PORT + BASELINE_OFFSET),
        (Target::Nginx, NGINX_H2_PORT),
    ]
    .into_iter()
    .filter(|(t, _)| setup.servers.contains_key(t))
    .collect();
    let labels: Vec<String> = targets.iter().map(|(t, _)| t.name().to_owned()).collect();
    let load = H2Load {
        path: "/",
        body: None,
        headers: &[],
    };
    let rows = interleaved_rounds(args.rounds, "h2", &labels, "req/s", |i| {
        let (t, port) = targets[i];
        let pid = setup.servers.get(&t).map(|s| s.child.id());
        run_h2load(setup, args, &load, port, args.warmup, None)?;
        run_h2load(setup, args, &load, port, args.duration, pid)
    });
    Ok(ScenarioResult {
        name: "h2".into(),
        title: format!(
            "HTTP/2 small GET, h2load {} connections × 10 streams (prior knowledge)",
            args.connections
        ),
        rows,
    })
}

/// gRPC unary calls/s with h2load (`--connections` connections × 10 concurrent
/// streams, each a POST of one 64-byte gRPC message with `content-type:
/// application/grpc` and `te: trailers`): the harness's gRPC app directly, through the
/// worker's `grpc` circuit (HTTP/2 to the app, streams multiplexed on one connection
/// per core) and through nginx `grpc_pass` (keep-alive upstream connections).
fn grpc_scenario(setup: &Setup, args: &Args) -> anyhow::Result<ScenarioResult> {
    if !have("h2load") {
        anyhow::bail!("the grpc scenario needs h2load: apt-get install nghttp2-client");
    }
    let body = setup.dir.path().join("grpc-unary.bin");
    std::fs::write(&body, appproxy_benches::grpc::unary_request())?;
    let mut targets = vec![(Target::Direct, GRPC_APP_PORT)];
    targets.extend(
        [
            (Target::Worker, WORKER_GRPC_PORT),
            (Target::WorkerBaseline, WORKER_GRPC_PORT + BASELINE_OFFSET),
            (Target::Nginx, NGINX_GRPC_PORT),
        ]
        .into_iter()
        .filter(|(t, _)| setup.servers.contains_key(t)),
    );
    let labels: Vec<String> = targets.iter().map(|(t, _)| t.name().to_owned()).collect();
    let load = H2Load {
        path: "/bench.Svc/Unary",
        body: Some(&body),
        headers: &["content-type: application/grpc", "te: trailers"],
    };
    let rows = interleaved_rounds(args.rounds, "grpc", &labels, "calls/s", |i| {
        let (t, port) = targets[i];
        let pid = setup.servers.get(&t).map(|s| s.child.id());
        run_h2load(setup, args, &load, port, args.warmup, None)?;
        run_h2load(setup, args, &load, port, args.duration, pid)
    });
    Ok(ScenarioResult {
        name: "grpc".into(),
        title: format!(
            "gRPC unary calls/s, h2load {} connections × 10 streams (64-byte messages; nginx: grpc_pass)",
            args.connections
        ),
        rows,
    })
}

/// Runs `run(i)` for every variant `labels[i]` once per round, the order rotated by
/// one each round (no target always runs first or always after the same one), prints
/// each run, and takes each variant's medians. A failed run (the target stopped
/// answering) counts as a round with no throughput and one error.
fn interleaved_rounds(
    rounds: usize,
    name: &str,
    labels: &[String],
    unit: &str,
    mut run: impl FnMut(usize) -> anyhow::Result<Sample>,
) -> Vec<Row> {
    let mut samples: BTreeMap<usize, Vec<Sample>> = BTreeMap::new();
    for round in 0..rounds {
        for k in 0..labels.len() {
            let i = (k + round) % labels.len();
            let label = &labels[i];
            match run(i) {
                Ok(s) => {
                    println!(
                        "  {name:<8} round {} {label:<24} {:>10.0} {unit}  p99 {:>7.0} µs",
                        round + 1,
                        s.rps,
                        s.p99_us
                    );
                    samples.entry(i).or_default().push(s);
                }
                Err(e) => {
                    println!("  {name:<8} round {} {label:<24} FAILED: {e:#}", round + 1);
                    failed_round(&mut samples, i);
                }
            }
        }
    }
    labels
        .iter()
        .enumerate()
        .map(|(i, l)| row(l.clone(), samples.remove(&i).unwrap_or_default()))
        .collect()
}

/// What h2load requests: a GET of `path`, or a POST of `body` with `headers`.
struct H2Load<'a> {
    path: &'a str,
    body: Option<&'a Path>,
    headers: &'a [&'a str],
}

/// One h2load run of `secs` seconds: req/s from its summary, percentiles from its
/// per-request log, CPU of `pid` over the run.
fn run_h2load(
    setup: &Setup,
    args: &Args,
    load: &H2Load<'_>,
    port: u16,
    secs: u64,
    pid: Option<u32>,
) -> anyhow::Result<Sample> {
    let log = setup.dir.path().join("h2load.log");
    let _ = std::fs::remove_file(&log);
    let mut cmd = Command::new("taskset");
    cmd.arg("-c")
        .arg(cpu_list(&setup.load_cpus))
        .arg("h2load")
        .arg(format!("-t{}", setup.load_cpus.len().max(1)))
        .arg(format!("-c{}", args.connections))
        .arg("-m10")
        .arg(format!("-D{secs}"))
        .arg("--log-file")
        .arg(&log);
    if let Some(body) = load.body {
        cmd.arg("-d").arg(body);
    }
    for h in load.headers {
        cmd.arg("-H").arg(h);
    }
    cmd.arg(format!("http://127.0.0.1:{port}{}", load.path));
    let cpu0 = pid.map(cpu_seconds);
    let out = output_within(&mut cmd, secs, "h2load")?;
    let cpu1 = pid.map(cpu_seconds);
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.trim_end_matches(" req/s").parse::<f64>().ok())
        .with_context(|| format!("h2load printed no result: {text}"))?;
    let counts = text
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .unwrap_or_default();
    let field = |what: &str| -> u64 {
        counts
            .split(", ")
            .find_map(|p| p.strip_suffix(what))
            .and_then(|n| n.trim().split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let done = field(" succeeded");
    let errors = field(" failed") + field(" errored") + field(" timeout");
    let mut lat: Vec<u64> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split('\t').nth(2))
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() - 1) as f64 * p) as usize] as f64
        }
    };
    let cpu_per_100k = match (cpu0, cpu1) {
        (Some(a), Some(b)) if done > 0 => Some((b - a) / done as f64 * 100_000.0),
        _ => None,
    };
    Ok(Sample {
        rps,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        errors,
        cpu_per_100k,
    })
}

/// A CPU-bound process pinned to the proxy's CPUs; killed on drop.
struct CpuHog(Child);

impl CpuHog {
    fn start(setup: &Setup) -> anyhow::Result<Self> {
        let child = Command::new("taskset")
            .arg("-c")
            .arg(cpu_list(&setup.proxy_cpus))
            .arg(std::env::current_exe()?)
            .arg("cpu-hog")
            .spawn()
            .context("cannot start the CPU hog")?;
        Ok(Self(child))
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU seconds each proxy uses with no traffic at all, over the same window (at least
/// 10 s), scaled to 10 s: an idle proxy should not wake up periodically.
fn idle_scenario(setup: &Setup, args: &Args) -> String {
    let window = Duration::from_secs(args.duration.max(10));
    // Let any connection state from earlier scenarios expire first.
    std::thread::sleep(Duration::from_secs(2));
    let before: Vec<(Target, u32, f64)> = setup
        .servers
        .iter()
        // nginx's TLS row is the plain nginx process (its entry holds a placeholder).
        .filter(|(t, _)| **t != Target::NginxTls)
        .map(|(t, s)| (*t, s.child.id(), cpu_seconds(s.child.id())))
        .collect();
    std::thread::sleep(window);
    let mut out = format!(
        "### idle — CPU seconds per 10 s with no traffic ({} proxy CPUs, {} s window)\n\n| target | CPU s / 10 s |\n|---|---:|\n",
        setup.proxy_cpus.len(),
        window.as_secs()
    );
    for (t, pid, cpu0) in before {
        let used = (cpu_seconds(pid) - cpu0) * 10.0 / window.as_secs_f64();
        let _ = writeln!(out, "| {} | {used:.3} |", t.name());
    }
    out
}

/// Resident memory of a process and its children, KiB.
fn rss_kib(pid: u32) -> u64 {
    let mut pids = vec![pid];
    if let Ok(out) = Command::new("pgrep")
        .arg("-P")
        .arg(pid.to_string())
        .output()
    {
        pids.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.trim().parse::<u32>().ok()),
        );
    }
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|st| {
            st.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

/// Idle WebSocket sessions: proxy RSS per session.
fn ws_idle_scenario(setup: &Setup, args: &Args) -> anyhow::Result<Vec<report::MemoryRow>> {
    let me = std::env::current_exe()?;
    let mut rows = Vec::new();
    for (t, port) in [
        (Target::Worker, IDLE_WORKER_PORT),
        (Target::Nginx, IDLE_NGINX_PORT),
    ] {
        let Some(server) = setup.servers.get(&t) else {
            continue;
        };
        let pid = server.child.id();
        let before = rss_kib(pid);
        let mut client = Command::new("taskset")
            .arg("-c")
            .arg(cpu_list(&setup.load_cpus))
            .arg(&me)
            .args([
                "ws-idle-client",
                &format!("127.0.0.1:{port}"),
                &args.idle_sessions.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start the idle-session client")?;
        let mut line = String::new();
        if let Some(out) = client.stdout.as_mut() {
            use std::io::BufRead as _;
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        if !line.starts_with("READY") {
            let _ = client.kill();
            let _ = client.wait();
            println!(
                "  ws-idle  {:<24} could not open {} sessions; skipped",
                t.name(),
                args.idle_sessions
            );
            continue;
        }
        std::thread::sleep(Duration::from_secs(1));
        let after = rss_kib(pid);
        drop(client.stdin.take());
        let _ = client.wait();
        let per = (after.saturating_sub(before)) as f64 / args.idle_sessions as f64;
        println!(
            "  ws-idle  {:<24} RSS {before} KiB -> {after} KiB: {per:.2} KiB per session",
            t.name()
        );
        rows.push(report::MemoryRow {
            label: t.name().to_owned(),
            sessions: args.idle_sessions,
            rss_before_kib: before,
            rss_after_kib: after,
            kib_per_session: per,
        });
        // Let the sessions close before the next target.
        std::thread::sleep(Duration::from_secs(2));
    }
    Ok(rows)
}

/// Records a round that failed (the target stopped answering): no throughput, one
/// error, so the report shows it.
fn failed_round(samples: &mut BTreeMap<usize, Vec<Sample>>, i: usize) {
    samples.entry(i).or_default().push(Sample {
        rps: 0.0,
        p50_us: 0.0,
        p99_us: 0.0,
        p999_us: 0.0,
        errors: 1,
        cpu_per_100k: None,
    });
}

fn row(label: String, s: Vec<Sample>) -> Row {
    let cpu: Vec<f64> = s.iter().filter_map(|x| x.cpu_per_100k).collect();
    Row {
        label,
        rps: median(s.iter().map(|x| x.rps).collect()),
        p50_us: median(s.iter().map(|x| x.p50_us).collect()),
        p99_us: median(s.iter().map(|x| x.p99_us).collect()),
        p999_us: median(s.iter().map(|x| x.p999_us).collect()),
        cpu_s_per_100k: (!cpu.is_empty()).then(|| median(cpu)),
        errors: s.iter().map(|x| x.errors).sum(),
        rounds: s.iter().map(|x| x.rps).collect(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.tool {
        Some(Tool::WsEcho { port }) => return Ok(appproxy_benches::ws::echo_app(port)?),
        Some(Tool::WsIdleApp { port }) => return Ok(appproxy_benches::ws::idle_app(port)?),
        Some(Tool::WsLoad { addr, conns, secs }) => {
            return Ok(appproxy_benches::ws::echo_load(addr, conns, secs)?)
        }
        Some(Tool::WsIdleClient { addr, n }) => {
            return Ok(appproxy_benches::ws::idle_client(addr, n)?)
        }
        Some(Tool::SseApp { port }) => return Ok(appproxy_benches::ws::sse_app(port)?),
        Some(Tool::SseLoad { addr, conns, secs }) => {
            return Ok(appproxy_benches::ws::sse_load(addr, conns, secs)?)
        }
        Some(Tool::GrpcApp { port }) => return Ok(appproxy_benches::grpc::app(port)?),
        Some(Tool::ParkCost { cpu, waker_cpu }) => {
            let c = appproxy_benches::park_cost::measure(cpu, waker_cpu)?;
            println!(
                "empty epoll_wait (zero timeout): {:.0} ns CPU\n\
                 park and wake-up from CPU {waker_cpu}: {:.0} ns CPU on CPU {cpu} per wake-up, {:.0} ns per round trip\n\
                 spinning instead: {:.0} ns CPU per wake-up ({:.1} empty polls)\n\
                 break-even: a park costs as much CPU as {:.0} empty polls",
                c.empty_poll_ns,
                c.park_cpu_ns,
                c.park_round_trip_ns,
                c.spin_cpu_ns,
                c.spin_polls_per_wake,
                c.break_even_polls()
            );
            return Ok(());
        }
        Some(Tool::ArmCost {
            cpu,
            client_cpu,
            batches,
        }) => {
            let c = appproxy_benches::arm_cost::measure(cpu, client_cpu, batches, 100)?;
            println!(
                "accept4, recv, send, close: {:.0} ns CPU per connection\n\
                 the same with an epoll_ctl(ADD) after accept4: {:.0} ns ({:+.0} ns)\n\
                 {} connections each way, CPU {cpu} serving, clients on CPU {client_cpu}",
                c.unarmed_ns,
                c.armed_ns,
                c.armed_ns - c.unarmed_ns,
                c.per_side
            );
            return Ok(());
        }
        Some(Tool::CpuHog) => {
            let mut x = 0u64;
            loop {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        None => {}
    }
    appproxy_benches::ws::raise_nofile();
    let root = std::env::current_dir()?;
    if !args.skip_build {
        let status = Command::new("cargo")
            .args([
                "build",
                "--release",
                "-p",
                "appproxy-node",
                "--bin",
                "appproxy-worker",
                "-p",
                "appproxy-relay-probe",
            ])
            .status()
            .context("cannot run cargo build")?;
        if !status.success() {
            bail!("cargo build of appproxy-worker failed");
        }
    }
    let worker_bin = root.join("target/release/appproxy-worker");
    if !worker_bin.exists() {
        bail!(
            "{} not found: run from the workspace root",
            worker_bin.display()
        );
    }
    let mut missing = Vec::new();
    for tool in ["wrk", "nginx", "haproxy", "taskset"] {
        if !have(tool) {
            missing.push(tool);
        }
    }
    for tool in &missing {
        let pkg = if *tool == "taskset" {
            "util-linux"
        } else {
            tool
        };
        println!("missing: {tool} — install it with `apt-get install {pkg}`; its rows are skipped");
    }
    if missing.contains(&"wrk") || missing.contains(&"nginx") || missing.contains(&"taskset") {
        println!("wrk, nginx (the upstream app) and taskset are needed for any measurement; nothing to run");
        return Ok(());
    }
    for port in [
        UPSTREAM_PORT,
        WORKER_PORT,
        NGINX_PORT,
        HAPROXY_PORT,
        WORKER_ADMIN,
        WORKER_TLS_PORT,
        WORKER_TLS_ADMIN,
        NGINX_TLS_PORT,
        NGINX_H2_PORT,
        GRPC_APP_PORT,
        WORKER_GRPC_PORT,
        NGINX_GRPC_PORT,
    ] {
        ensure_free(port)?;
    }
    kill_children_on_signal()?;
    let setup = start(&args, &worker_bin)?;
    println!(
        "proxies on CPU {}, upstream and wrk on CPU {}; {} s per run after {} s warm-up, {} interleaved rounds, {} connections; access logs {}",
        cpu_list(&setup.proxy_cpus),
        cpu_list(&setup.load_cpus),
        args.duration,
        args.warmup,
        args.rounds,
        args.connections,
        if args.access_logs { "on (every proxy, to a file)" } else { "off" }
    );
    let mut results = Vec::new();
    let mut memory = Vec::new();
    let mut extra_tables: Vec<String> = Vec::new();
    for name in &args.scenarios {
        if name == "ws" {
            let result = ws_echo_scenario(&setup, &args)?;
            println!("\n{}", report::table(&result));
            results.push(result);
            continue;
        }
        if name == "sse" {
            let result = sse_scenario(&setup, &args)?;
            println!("\n{}", report::table(&result));
            results.push(result);
            continue;
        }
        if name == "h2" || name == "grpc" {
            let result = if name == "h2" {
                h2_scenario(&setup, &args)?
            } else {
                grpc_scenario(&setup, &args)?
            };
            println!("\n{}", report::table(&result));
            results.push(result);
            continue;
        }
        if name == "idle" {
            let table = idle_scenario(&setup, &args);
            println!("\n{table}");
            extra_tables.push(table);
            continue;
        }
        if name == "ws-idle" {
            let rows = ws_idle_scenario(&setup, &args)?;
            println!("\n{}", report::memory_table(&rows));
            memory = rows;
            continue;
        }
        let Some(sc) = scenario(name) else {
            println!("unknown scenario {name:?}: skipped");
            continue;
        };
        // (label, target, extra header)
        let variants: Vec<(String, Target, Option<&str>)> = if sc.reqid && sc.name == "histograms" {
            vec![
                ("worker, histograms on".into(), Target::Worker, None),
                ("worker, histograms off".into(), Target::WorkerNoHist, None),
            ]
        } else if sc.reqid && sc.name == "trace" {
            vec![
                ("worker, trace context on".into(), Target::Worker, None),
                (
                    "worker, traceparent from client".into(),
                    Target::Worker,
                    Some("traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                ),
                (
                    "worker, trace context off".into(),
                    Target::WorkerNoTrace,
                    None,
                ),
            ]
        } else if sc.reqid {
            vec![
                ("worker, ID generated".into(), Target::Worker, None),
                (
                    "worker, ID from client".into(),
                    Target::Worker,
                    Some("X-Backend-Request-ID: 0f8fad5b-d9cb-469f-a165-70867728950e"),
                ),
                ("worker, request IDs off".into(), Target::WorkerNoIds, None),
            ]
        } else if sc.tls {
            setup
                .servers
                .keys()
                .filter(|t| t.tls())
                .map(|t| (t.name().to_owned(), *t, None))
                .collect()
        } else {
            let mut v = vec![("direct".to_owned(), Target::Direct, None)];
            for t in setup.servers.keys().filter(|t| {
                !matches!(
                    t,
                    Target::WorkerNoIds | Target::WorkerNoTrace | Target::WorkerNoHist
                ) && !t.tls()
            }) {
                v.push((t.name().to_owned(), *t, None));
            }
            v
        };
        let labels: Vec<String> = variants.iter().map(|(l, _, _)| l.clone()).collect();
        let rows = interleaved_rounds(args.rounds, sc.name, &labels, "req/s", |i| {
            let (_, target, header) = &variants[i];
            let pid = match target {
                // nginx's TLS server is the plain row's process.
                Target::NginxTls => setup.servers.get(&Target::Nginx),
                t => setup.servers.get(t),
            }
            .map(|s| s.child.id());
            let run = || -> anyhow::Result<Sample> {
                run_wrk(
                    &setup,
                    &args,
                    &sc,
                    port_of(*target),
                    *header,
                    args.warmup,
                    None,
                )?;
                run_wrk(
                    &setup,
                    &args,
                    &sc,
                    port_of(*target),
                    *header,
                    args.duration,
                    pid,
                )
            };
            let hog = if sc.hog {
                Some(CpuHog::start(&setup)?)
            } else {
                None
            };
            let result = run();
            drop(hog);
            result
        });
        let result = ScenarioResult {
            name: sc.name.to_owned(),
            title: sc.title.to_owned(),
            rows,
        };
        println!("\n{}", report::table(&result));
        results.push(result);
    }
    let names: Vec<&str> = setup.servers.values().map(|s| s.name).collect();
    if args.access_logs {
        // Evidence that every proxy logged: the lines each one wrote.
        // Counted in 64 KiB reads: a full run's logs are hundreds of MB.
        let lines = |file: &str| {
            use std::io::Read as _;
            let Ok(mut f) = std::fs::File::open(setup.dir.path().join(file)) else {
                return 0;
            };
            let (mut buf, mut n) = (vec![0u8; 64 * 1024], 0);
            while let Ok(k @ 1..) = f.read(&mut buf) {
                n += buf[..k].iter().filter(|&&c| c == b'\n').count();
            }
            n
        };
        let summary = format!(
            "access-log lines written: appproxy-worker {} (worker.log, with its other lines), nginx {}, haproxy {}",
            lines("worker.log"),
            lines("nginx-access.log"),
            lines("haproxy.log")
        );
        println!("\n{summary}");
        extra_tables.push(summary);
    }
    drop(setup);
    let meta = format!(
        "cores per proxy: {}; duration {} s, warm-up {} s, rounds {}, connections {}; access logs {}; targets: direct, {}",
        args.cores,
        args.duration,
        args.warmup,
        args.rounds,
        args.connections,
        if args.access_logs { "on" } else { "off" },
        names.join(", ")
    );
    let dir = root.join(&args.out);
    report::write(&dir, &meta, &results, &memory)?;
    if !extra_tables.is_empty() {
        use std::io::Write as _;
        let mut md = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("report.md"))?;
        for t in &extra_tables {
            writeln!(md, "\n{t}")?;
        }
    }
    let mut done = String::new();
    let _ = write!(
        done,
        "report: {}/report.md, results.json and one SVG per scenario",
        dir.display()
    );
    println!("{done}");
    Ok(())
}
