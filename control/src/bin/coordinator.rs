//! `appproxy-coordinator`: the circuit and worker registry.

use std::path::PathBuf;

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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_default_config {
        print!("{}", toml::to_string_pretty(&CoordinatorConfig::default())?);
        return Ok(());
    }
    let path = args.config.unwrap_or_default();
    let _config: CoordinatorConfig = load(&path)?;
    anyhow::bail!(
        "{}: config is valid, but the coordinator service is not available in this build; \
         run appproxy-worker standalone with [[circuits]]",
        path.display()
    )
}
