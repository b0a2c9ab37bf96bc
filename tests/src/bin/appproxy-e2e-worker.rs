//! A worker process for the end-to-end fault suite: the data plane's cores and its
//! control agent from one `--config FILE.toml`, as `appproxy-worker` runs them, built
//! with the test crate so the suite can start, freeze (SIGSTOP) and kill real worker
//! processes. SIGTERM or SIGINT deregisters and drains, as the product does.

use std::time::Duration;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = match (args.next().as_deref(), args.next()) {
        (Some("--config"), Some(p)) => p,
        _ => {
            eprintln!("usage: appproxy-e2e-worker --config FILE.toml");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&path) {
        eprintln!("appproxy-e2e-worker: {e}");
        std::process::exit(1);
    }
}

fn run(path: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let config = appproxy_dataplane::config::Config::parse(&text).map_err(|e| e.to_string())?;
    let sub = appproxy_shared::telemetry::subscriber(
        &appproxy_shared::telemetry::LoggingConfig {
            format: appproxy_shared::telemetry::LogFormat::Json,
            filter: "info".into(),
        },
        "worker",
        std::io::stderr,
    )
    .map_err(|e| e.to_string())?;
    tracing::subscriber::set_global_default(sub).map_err(|e| e.to_string())?;
    appproxy_shared::otlp::install(&config.telemetry, "worker").map_err(|e| e.to_string())?;
    let online: Vec<usize> =
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    let rt = config.validate(&online).map_err(|e| e.to_string())?;
    let worker = appproxy_dataplane::worker::Worker::start(rt).map_err(|e| e.to_string())?;
    let agent =
        appproxy_dataplane::agent::spawn_remote(config, worker.deployer(), worker.access_marks())
            .map_err(|e| e.to_string())?;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(|e| e.to_string())?;
    if signals.forever().next().is_some() {
        tracing::info!("draining");
    }
    agent.stop();
    worker.stop();
    std::thread::sleep(Duration::from_millis(10));
    Ok(())
}
