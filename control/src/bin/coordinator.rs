//! `appproxy-coordinator`: the circuit and worker registry.

use std::path::PathBuf;

use anyhow::Context as _;
use appproxy_control::config::{load, CoordinatorConfig};
use clap::Parser;

/// The appproxy coordinator.
#[derive(Parser, Debug)]
#[command(name = "appproxy-coordinator", version, about)]
struct Args {
    /// The TOML config file.
    #[arg(long, short = 'c', required_unless_present = "print_default_config")]
    config: Option<PathBuf>,
    /// Print the full default config and exit.
    #[arg(long)]
    print_default_config: bool,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("appproxy-coordinator: {e:#}");
        std::process::exit(2);
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_default_config {
        print!("{}", toml::to_string_pretty(&CoordinatorConfig::default())?);
        return Ok(());
    }
    let path = args.config.context("--config is required")?;
    let config: CoordinatorConfig = load(&path)?;
    if config.secrets.api_secret.is_empty() || config.secrets.jwt_secret.is_empty() {
        anyhow::bail!(
            "{}: [secrets] api_secret and jwt_secret must be set",
            path.display()
        );
    }
    appproxy_shared::telemetry::init(&config.logging, "coordinator")?;
    appproxy_control::service::run(|shutdown| async move {
        appproxy_control::coordinator::serve(&config, shutdown).await
    })?;
    Ok(())
}
