//! The command line every appproxy binary shares (`--config`, `--print-default-config`,
//! `--check-config`) and the preamble around it: print the default config, load and
//! check the file, report a refusal on stderr with exit code 2.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// The config options, flattened into each binary's `clap::Parser`.
#[derive(clap::Args, Debug, Clone)]
pub struct ConfigArgs {
    /// The TOML config file.
    #[arg(long, short = 'c', required_unless_present = "print_default_config")]
    pub config: Option<PathBuf>,
    /// Print the full default config and exit.
    #[arg(long)]
    pub print_default_config: bool,
    /// Validate the config and exit.
    #[arg(long)]
    pub check_config: bool,
}

impl ConfigArgs {
    /// The preamble: with `--print-default-config` prints `default_toml` and returns
    /// `None`; otherwise loads the file with `load` (which also refuses what the
    /// binary cannot run with); with `--check-config` prints `config ok: <summary>`
    /// and returns `None`. `Some((path, config))`: go on and serve.
    pub fn load<T>(
        &self,
        default_toml: &str,
        load: impl FnOnce(&Path) -> anyhow::Result<T>,
        summary: impl FnOnce(&T) -> String,
    ) -> anyhow::Result<Option<(PathBuf, T)>> {
        if self.print_default_config {
            print!("{default_toml}");
            return Ok(None);
        }
        let path = self.config.clone().context("--config is required")?;
        let config = load(&path)?;
        if self.check_config {
            println!("config ok: {}", summary(&config));
            return Ok(None);
        }
        Ok(Some((path, config)))
    }
}

/// Runs a binary's `run`, and on an error prints `<name>: <error and its causes>`
/// on stderr and exits with code 2. `SIGXFSZ` is caught first
/// (`appproxy_shared::fsize`): a write past the file-size limit fails, it does
/// not end the service.
pub fn main(name: &str, run: impl FnOnce() -> anyhow::Result<()>) {
    if let Err(e) = appproxy_shared::fsize::catch_limit_signal() {
        eprintln!("{name}: warning: cannot catch SIGXFSZ ({e}): a write past RLIMIT_FSIZE ends the process");
    }
    if let Err(e) = run() {
        eprintln!("{name}: {e:#}");
        std::process::exit(2);
    }
}
