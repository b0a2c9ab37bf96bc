//! `appproxy-storage-proxy`: the vfolder file API.

use std::path::PathBuf;

use anyhow::Context as _;
use appproxy_control::config::{load, StorageConfig};
use clap::Parser;

/// The appproxy storage-proxy.
#[derive(Parser, Debug)]
#[command(name = "appproxy-storage-proxy", version, about)]
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
        eprintln!("appproxy-storage-proxy: {e:#}");
        std::process::exit(2);
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_default_config {
        print!("{}", toml::to_string_pretty(&StorageConfig::default())?);
        return Ok(());
    }
    let path = args.config.context("--config is required")?;
    let config: StorageConfig = load(&path)?;
    if config.volumes.is_empty() {
        anyhow::bail!(
            "{}: no [[volumes]]: add at least one (name, path)",
            path.display()
        );
    }
    if config.secrets.manager_token.is_empty() || config.secrets.session_secret.is_empty() {
        anyhow::bail!(
            "{}: [secrets] manager_token and session_secret must be set",
            path.display()
        );
    }
    appproxy_shared::telemetry::init(&config.logging, "storage-proxy")?;
    appproxy_control::service::run(|shutdown| async move {
        appproxy_control::storage::serve(&config, shutdown).await
    })?;
    Ok(())
}
