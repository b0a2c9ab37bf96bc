//! `appproxy-storage-proxy`: the vfolder file API.

use std::path::PathBuf;

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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_default_config {
        print!("{}", toml::to_string_pretty(&StorageConfig::default())?);
        return Ok(());
    }
    let path = args.config.unwrap_or_default();
    let _config: StorageConfig = load(&path)?;
    anyhow::bail!(
        "{}: config is valid, but the storage-proxy service is not available in this build",
        path.display()
    )
}
