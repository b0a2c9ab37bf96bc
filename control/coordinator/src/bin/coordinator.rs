//! `appproxy-coordinator`: the circuit and worker registry.

use appproxy_control_common::cli::ConfigArgs;
use appproxy_coordinator::config::CoordinatorConfig;
use clap::Parser;

/// The appproxy coordinator.
#[derive(Parser, Debug)]
#[command(name = "appproxy-coordinator", version, about)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() {
    appproxy_control_common::cli::main("appproxy-coordinator", run);
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let loaded = args.config.load(
        &CoordinatorConfig::default_toml(),
        |path| {
            let config = CoordinatorConfig::load(path)?;
            // A blank key is no secret: a /setup token signed with " " can be made
            // by anyone.
            if config.secrets.api_secret.trim().is_empty()
                || config.secrets.jwt_secret.trim().is_empty()
            {
                anyhow::bail!(
                    "{}: [secrets] api_secret and jwt_secret must be set (not blank)",
                    path.display()
                );
            }
            config
                .database
                .check_sqlite_writable()
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            // `[telemetry]` too, so --check-config catches a bad endpoint or CA file.
            appproxy_shared::otlp::Settings::from_config(&config.telemetry, "coordinator")?;
            Ok(config)
        },
        |config| {
            format!(
                "store {}, events {}",
                match &config.database.url {
                    Some(_) => "PostgreSQL".to_owned(),
                    None => format!("SQLite {}", config.database.sqlite_path.display()),
                },
                if config.redis.url.is_some() {
                    "on Redis"
                } else {
                    "in-process only"
                }
            )
        },
    )?;
    let Some((_, config)) = loaded else {
        return Ok(());
    };
    appproxy_shared::telemetry::init(&config.logging, "coordinator")?;
    appproxy_shared::otlp::install(&config.telemetry, "coordinator")?;
    appproxy_control_common::service::run(|shutdown| async move {
        appproxy_coordinator::serve(&config, shutdown).await
    })?;
    Ok(())
}
