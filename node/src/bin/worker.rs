//! `appproxy-worker`: the data plane binary — standalone, managed by a remote
//! coordinator, or with a coordinator in the same process (single-node mode).

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use appproxy_control_common::cli::ConfigArgs;
use appproxy_dataplane::config::Config;
use appproxy_dataplane::{admin, preflight, worker};
use clap::Parser;

/// The appproxy worker: per-core HTTP/1.1 proxy with end-to-end request IDs.
#[derive(Parser, Debug)]
#[command(name = "appproxy-worker", version, about)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() {
    appproxy_control_common::cli::main("appproxy-worker", run);
}

/// SIGHUP: re-reads the file under a fresh request ID, swaps in the TLS certificates
/// read anew (new handshakes get them) and, on a worker whose circuits come from its
/// file, deploys them to every core. On a managed worker the circuits are the
/// coordinator's: they stay as deployed (the file lists none, and replacing the
/// cores' tables with it took every app of the node down until a restart). Every
/// other setting needs a restart: each section that changed is named in a warning.
/// The file's circuits are checked against the running settings, which stay. A bad
/// file, one naming no `[worker]` (an empty one being written) or one listing no
/// circuits where some run (one cut short) is refused and everything running stays;
/// write the file whole and rename it into place.
fn reload(path: &std::path::Path, running: &mut Config, worker: &worker::Worker) {
    let id = appproxy_shared::RequestId::generate(appproxy_shared::IdVersion::V4);
    appproxy_shared::with_request_id(Some(id), || {
        let names_worker = |text: &str| {
            text.lines().map(str::trim_start).any(|l| {
                l.starts_with("[worker]") || l.starts_with("worker.") || l.starts_with("worker =")
            })
        };
        let read = match std::fs::read_to_string(path) {
            // Every key has a default, so an empty file, or one of comments only (a
            // file being written when the signal came), would read as a worker of
            // no circuits.
            Ok(text) if !names_worker(&text) => Err(format!(
                "{} names no [worker] (being written?): a reload takes a whole config",
                path.display()
            )),
            _ => Config::load(path)
                .and_then(|config| {
                    // What a reload applies, the file's circuits and TLS files, is
                    // checked against the settings that stay: the running ones.
                    let mut applied = running.clone();
                    applied.circuits.clone_from(&config.circuits);
                    applied.worker.tls_cert.clone_from(&config.worker.tls_cert);
                    applied
                        .worker
                        .tls_privkey
                        .clone_from(&config.worker.tls_privkey);
                    applied
                        .worker
                        .tls_sni_certs
                        .clone_from(&config.worker.tls_sni_certs);
                    applied.validate(&online_cpus()).map(|rt| (config, rt))
                })
                .map_err(|e| e.to_string())
                .and_then(|(config, rt)| {
                    // A file cut short while written (a header and nothing more) reads
                    // as a worker of no circuits: a reload never empties a worker.
                    let standalone = !running.managed() && !config.managed();
                    match standalone && rt.circuits.is_empty() && !running.circuits.is_empty() {
                        true => Err(format!(
                            "{} lists no circuits where {} run (being written?): a reload never \
                             empties a worker; restart it to run without circuits",
                            path.display(),
                            running.circuits.len()
                        )),
                        false => Ok((config, rt)),
                    }
                }),
        };
        let (config, rt) = match read {
            Ok(read) => read,
            Err(e) => {
                tracing::error!(error = %e, "reload refused; everything running stays");
                return;
            }
        };
        for section in sections_needing_a_restart(running, &config) {
            tracing::warn!(
                section,
                "reload: [{section}] changed, which needs a restart; its running settings stay"
            );
        }
        match (&worker.tls, &rt.tls) {
            (Some(serving), Some(loaded)) => {
                serving.adopt(loaded);
                tracing::info!("TLS certificates reloaded; open connections keep theirs");
            }
            (None, None) => {}
            _ => tracing::warn!("[worker] tls_listen changed: that needs a restart"),
        }
        if running.managed() || config.managed() {
            tracing::info!("reloaded; the circuits are the coordinator's and stay as deployed");
            return;
        }
        tracing::info!(circuits = rt.circuits.len(), "reloading circuits");
        worker.deploy(rt.circuits, id);
        running.circuits = config.circuits;
    });
}

/// The sections of `new` that differ from the running `old` and that a reload does
/// not apply: everything but the circuits and the TLS certificate files.
fn sections_needing_a_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut worker = new.worker.clone();
    worker.tls_cert.clone_from(&old.worker.tls_cert);
    worker.tls_privkey.clone_from(&old.worker.tls_privkey);
    worker.tls_sni_certs.clone_from(&old.worker.tls_sni_certs);
    [
        ("worker", old.worker != worker),
        ("limits", old.limits != new.limits),
        ("timeouts", old.timeouts != new.timeouts),
        ("upstream", old.upstream != new.upstream),
        ("reactor", old.reactor != new.reactor),
        ("http2", old.http2 != new.http2),
        ("admin", old.admin != new.admin),
        ("logging", old.logging != new.logging),
        ("telemetry", old.telemetry != new.telemetry),
        ("coordinator", old.coordinator != new.coordinator),
        ("secrets", old.secrets != new.secrets),
        ("redis", old.redis != new.redis),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

/// Writes what the stdout writer still holds when `run` ends, however it ends (at
/// most 5 s, for a stdout nobody reads any more).
struct DrainStdout;

impl Drop for DrainStdout {
    fn drop(&mut self) {
        appproxy_shared::logout::drain(std::time::Duration::from_secs(5));
    }
}

fn online_cpus() -> Vec<usize> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    (0..n).collect()
}

/// The worker's config with what it runs (cores, circuits) and, in single-node mode,
/// the embedded coordinator's config, checked with it.
type Loaded = (
    Config,
    appproxy_dataplane::config::Runtime,
    Option<appproxy_coordinator::config::CoordinatorConfig>,
);

fn load(path: &Path) -> anyhow::Result<Loaded> {
    let config = Config::load(path)?;
    let rt = config
        .validate(&online_cpus())
        .with_context(|| format!("invalid config {}", path.display()))?;
    // The embedded coordinator's config is checked with the worker's.
    let embedded = match config
        .coordinator
        .as_ref()
        .and_then(|c| c.embedded.as_ref())
    {
        Some(file) => {
            let file = path.parent().unwrap_or(Path::new(".")).join(file);
            let cc = appproxy_coordinator::config::CoordinatorConfig::load(&file)?;
            if cc.secrets.api_secret.trim().is_empty() || cc.secrets.jwt_secret.trim().is_empty() {
                anyhow::bail!(
                    "{}: [secrets] api_secret and jwt_secret must be set (not blank)",
                    file.display()
                );
            }
            cc.database
                .check_sqlite_writable()
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            // Its listener is this process's too: on a port of the range it holds
            // a port the coordinator itself may place a circuit on.
            if config.takes_from_the_range(cc.coordinator.bind) {
                anyhow::bail!(
                    "{} and {}: the embedded coordinator's [coordinator] bind port {} is inside [worker] port_range: it would place circuits on it, which cannot listen there; keep it outside the range",
                    path.display(),
                    file.display(),
                    cc.coordinator.bind.port()
                );
            }
            if config.secrets.jwt_secret.as_deref() != Some(cc.secrets.jwt_secret.as_str()) {
                anyhow::bail!(
                    "{} and {}: [secrets] jwt_secret must be the same in both (the worker checks the coordinator's /setup tokens)",
                    path.display(),
                    file.display()
                );
            }
            Some(cc)
        }
        None => None,
    };
    appproxy_shared::otlp::Settings::from_config(&config.telemetry, "worker")?;
    Ok((config, rt, embedded))
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let loaded = args
        .config
        .load(&Config::default_toml(), load, |(_, rt, embedded)| {
            format!(
                "{} cores, {} circuits{}",
                rt.cpus.len(),
                rt.circuits.len(),
                if embedded.is_some() {
                    ", embedded coordinator"
                } else {
                    ""
                }
            )
        })?;
    let Some((path, (mut config, rt, embedded))) = loaded else {
        return Ok(());
    };
    // The cores never write stdout themselves (`logout`): a log reader that stalls
    // must not stall them. Whatever was queued is written before the process ends.
    appproxy_shared::logout::start().context("cannot start the stdout writer")?;
    let _drain = DrainStdout;
    let subscriber = appproxy_shared::telemetry::subscriber(
        &config.logging.common,
        "worker",
        appproxy_shared::logout::QueuedStdout,
    )?;
    tracing::subscriber::set_global_default(subscriber)
        .map_err(|_| appproxy_shared::telemetry::TelemetryError::AlreadyInstalled)?;
    appproxy_shared::otlp::install(&config.telemetry, "worker")?;
    // The file's circuits were resolved before logging was set up.
    for c in &rt.circuits {
        c.log_allowlist_problems();
    }
    for key in published_secrets(&config) {
        tracing::warn!(
            key,
            bind = %config.worker.bind_host,
            "[secrets] {key} is a sample config's published one on an address others can reach: \
             anyone who knows it can sign tokens or permits for this worker; set your own"
        );
    }
    preflight::check(rt.cpus.len(), rt.io_memory)?;
    preflight::warn_of_ephemeral_ports(&listened_ports(&config, &rt));
    let cores = rt.cpus.len();
    let circuits = rt.circuits.len();
    // Signals are taken before the cores start so none is lost in between.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGQUIT,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGUSR1,
        signal_hook::consts::SIGUSR2,
    ])
    .context("cannot install signal handlers")?;
    let worker = worker::Worker::start(rt)?;
    let agent = appproxy_node::spawn_agent(
        config.clone(),
        embedded.clone(),
        worker.deployer(),
        worker.access_marks(),
    )?;
    if let (Some(addr), Some(cc)) = (agent.coordinator, &embedded) {
        tracing::info!(coordinator = %addr, store = %cc.database.sqlite_path.display(), "single node: coordinator running in this process");
        print_single_node_help(addr, &config, cc);
    }
    if let Some(bind) = config.admin.bind {
        let addr = admin::spawn(bind, worker.metrics.clone(), worker.health_info())
            .with_context(|| format!("cannot serve [admin] on {bind}"))?;
        tracing::info!(admin = %addr, "admin endpoint serving /health and /metrics");
        if !addr.ip().is_loopback() {
            // It has no credential: /circuits and /connections name apps' addresses,
            // sessions and clients.
            tracing::warn!(admin = %addr, "the admin endpoint is not on a loopback address and asks no credential: keep [admin] bind on a loopback or operator network");
        }
    }
    tracing::info!(cores, circuits, frontends = ?worker.bound, "worker started");
    for sig in signals.forever() {
        match Signal::of(sig) {
            Signal::Reload => {
                reload(&path, &mut config, &worker);
                continue;
            }
            Signal::Unused => {
                Signal::note_unused(sig);
                continue;
            }
            Signal::Stop => {}
        }
        worker.readiness.mark_stopping();
        let grace = Duration::from_secs(config.timeouts.stop_grace_secs);
        if !grace.is_zero() {
            tracing::info!(signal = sig, grace_secs = grace.as_secs(), "stopping: /readyz answers 503; serving on for [timeouts] stop_grace_secs (another stop signal ends it)");
            serve_through_grace(&mut signals, grace, &path, &mut config, &worker);
        }
        tracing::info!(signal = sig, "draining");
        break;
    }
    // Signals during the drain are said to have come: a stop signal does not cut it
    // (it ends at `drain_secs` at the latest), a SIGHUP reloads nothing now.
    let drain_secs = config.timeouts.drain_secs;
    std::thread::spawn(move || {
        for sig in signals.forever() {
            tracing::warn!(
                signal = sig,
                drain_secs,
                "a signal during the drain: the drain goes on and ends within [timeouts] drain_secs (SIGKILL ends it now)"
            );
        }
    });
    // Leave the coordinator first, so no new circuit is placed on a draining worker.
    agent.stop();
    worker.stop();
    tracing::info!("worker stopped");
    Ok(())
}

/// What a signal the worker takes asks of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// `SIGTERM`, `SIGINT`, `SIGQUIT` (nginx's graceful stop, and the stop signal of
    /// its container images): drain and exit.
    Stop,
    /// `SIGHUP`: re-read the file ([`reload`]).
    Reload,
    /// `SIGUSR1`, `SIGUSR2` (nginx's log reopening and binary upgrade, sent by
    /// logrotate scripts and habit): nothing to do, said in the log. Their default
    /// action ended the worker at once, without a drain or a line.
    Unused,
}

impl Signal {
    fn of(sig: i32) -> Self {
        match sig {
            signal_hook::consts::SIGHUP => Self::Reload,
            signal_hook::consts::SIGUSR1 | signal_hook::consts::SIGUSR2 => Self::Unused,
            _ => Self::Stop,
        }
    }

    fn note_unused(sig: i32) {
        tracing::warn!(
            signal = sig,
            "a signal the worker does not use (logs go to stdout; no binary upgrade): serving on"
        );
    }
}

/// The grace after a stop signal: the worker serves on (reloads included) until
/// `grace` has passed or another stop signal comes.
fn serve_through_grace(
    signals: &mut signal_hook::iterator::Signals,
    grace: Duration,
    path: &std::path::Path,
    running: &mut Config,
    worker: &worker::Worker,
) {
    let until = std::time::Instant::now() + grace;
    while std::time::Instant::now() < until {
        for sig in signals.pending() {
            match Signal::of(sig) {
                Signal::Reload => reload(path, running, worker),
                Signal::Unused => Signal::note_unused(sig),
                Signal::Stop => {
                    tracing::info!(signal = sig, "another stop signal: the grace ends");
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What to do next with a single node: create a circuit as the manager would and send
/// a traced request through it.
fn print_single_node_help(
    addr: std::net::SocketAddr,
    config: &appproxy_dataplane::config::Config,
    cc: &appproxy_coordinator::config::CoordinatorConfig,
) {
    let api = config.worker.api_port.unwrap_or(0);
    // The demo's app is the worker's own admin endpoint; without one, the script's
    // default (the sample's) is named, to be replaced by any HTTP app's address.
    let app = config.admin.bind.map_or_else(
        || "127.0.0.1:10202".to_owned(),
        // An admin endpoint on every address is reached on the loopback.
        |a| match a.ip().is_unspecified() {
            true => format!("127.0.0.1:{}", a.port()),
            false => a.to_string(),
        },
    );
    eprintln!(
        "\nappproxy single node: coordinator http://{addr} (SQLite {}), worker API port {api}.\n\
         Create a circuit and send a traced request (one ID, R, from the manager's call to the app):\n\n  \
         deploy/demo-circuit.sh http://{addr} {} {app}\n\n\
         (the script calls POST /v2/conf and GET /v2/proxy/auth with X-Backend-Request-ID: R, follows the\n\
         worker's /setup redirect and requests the app ({app}) with the same ID; grep R in this log.)\n",
        cc.database.sqlite_path.display(),
        // The sample files' secret is printed for a first run to copy; a real one
        // (perhaps kept in a file or the environment for that reason) never is.
        if cc.secrets.api_secret == SAMPLE_API_SECRET {
            SAMPLE_API_SECRET
        } else {
            "\"$API_SECRET\"  # your [secrets] api_secret"
        },
    );
}

/// The `[secrets]` keys that hold a sample config's published value (each begins
/// with `change-me-`) while the frontends listen on an address others can reach.
fn published_secrets(config: &Config) -> Vec<&'static str> {
    if config.worker.bind_host.is_loopback() {
        return Vec::new();
    }
    let s = &config.secrets;
    [
        ("api_secret", &s.api_secret),
        ("jwt_secret", &s.jwt_secret),
        ("permit_secret", &s.permit_secret),
    ]
    .into_iter()
    .filter(|(_, v)| v.as_deref().is_some_and(|v| v.starts_with("change-me-")))
    .map(|(key, _)| key)
    .collect()
}

/// The API secret of the sample configs in `deploy/` (no secret: it is public).
const SAMPLE_API_SECRET: &str = "change-me-api-secret";

/// The ports the worker listens on, as the ephemeral-port warning names them:
/// the range, the API and wildcard ports, and the first few of the file's
/// circuits on ports outside the range.
fn listened_ports(
    config: &appproxy_dataplane::config::Config,
    rt: &appproxy_dataplane::config::Runtime,
) -> Vec<(&'static str, u16, u16)> {
    let w = &config.worker;
    let mut ports = Vec::new();
    if let Some([first, last]) = w.port_range {
        ports.push(("[worker] port_range", first, last));
    }
    for (what, port) in [
        ("[worker] api_port", w.api_port),
        ("[worker] wildcard_traffic_port", w.wildcard_traffic_port),
    ] {
        if let Some(p) = port {
            ports.push((what, p, p));
        }
    }
    let range = w.port_range.map(|[first, last]| first..=last);
    let outside = rt.circuits.iter().filter_map(|c| match c.frontend {
        appproxy_dataplane::config::Frontend::Port(p)
            if !range.as_ref().is_some_and(|r| r.contains(&p)) =>
        {
            Some(("a [[circuits]] port", p, p))
        }
        _ => None,
    });
    ports.extend(outside.take(16));
    ports
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded coordinator's listener is the worker's too: on a port of the
    /// worker's range (on a shared address) the coordinator would place circuits
    /// on a port none can listen on, so the pair is refused; elsewhere it loads.
    #[test]
    fn an_embedded_coordinator_may_not_listen_on_a_port_of_the_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let worker = dir.path().join("worker.toml");
        std::fs::write(
            &worker,
            "[worker]\ncores = 1\nbind_host = \"127.0.0.1\"\napi_port = 10201\nport_range = [10205, 10300]\n[coordinator]\nembedded = \"c.toml\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\npermit_secret = \"permit\"\n",
        )
        .expect("worker config");
        for (bind, refused) in [("127.0.0.1:10250", true), ("127.0.0.1:10200", false)] {
            std::fs::write(
                dir.path().join("c.toml"),
                format!("[coordinator]\nbind = \"{bind}\"\n[secrets]\napi_secret = \"api\"\njwt_secret = \"jwt\"\n[database]\nsqlite_path = \"c.sqlite3\"\n"),
            )
            .expect("coordinator config");
            match load(&worker) {
                Ok(_) => assert!(!refused, "{bind} taken"),
                Err(e) => {
                    let e = format!("{e:#}");
                    assert!(refused, "{bind}: {e}");
                    assert!(
                        e.contains("embedded coordinator's [coordinator] bind port 10250 is inside [worker] port_range"),
                        "{e}"
                    );
                }
            }
        }
    }

    /// The published sample secrets are named when the worker listens where others
    /// reach it, and not on the loopback (the single-node sample's).
    #[test]
    fn published_sample_secrets_are_named_on_a_reachable_address() {
        let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let secured = Config::load(&deploy.join("worker.secured.toml")).expect("sample");
        assert_eq!(
            published_secrets(&secured),
            vec!["jwt_secret", "permit_secret"]
        );
        let single = Config::load(&deploy.join("single-node.toml")).expect("sample");
        assert!(published_secrets(&single).is_empty());
        let mut own = secured;
        own.secrets.jwt_secret = Some("a secret of its own".into());
        own.secrets.permit_secret = None;
        assert!(published_secrets(&own).is_empty());
    }
}
