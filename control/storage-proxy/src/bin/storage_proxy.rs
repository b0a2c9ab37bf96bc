//! `appproxy-storage-proxy`: the vfolder file API.

use appproxy_control_common::cli::ConfigArgs;
use appproxy_control_common::config::load;
use appproxy_storage_proxy::config::StorageConfig;
use clap::Parser;

/// The appproxy storage-proxy.
#[derive(Parser, Debug)]
#[command(name = "appproxy-storage-proxy", version, about)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

/// The shortest `session_secret` taken without a warning (bytes).
const SESSION_SECRET_ADVISED: usize = 16;

fn main() {
    appproxy_control_common::cli::main("appproxy-storage-proxy", run);
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let loaded = args.config.load(
        &StorageConfig::default_toml(),
        |path| {
            let config: StorageConfig = load(path)?;
            if config.volumes.is_empty() {
                anyhow::bail!(
                    "{}: no [[volumes]]: add at least one (name, path)",
                    path.display()
                );
            }
            // A blank key is no secret: a session token signed with " " can be made
            // by anyone.
            if config.secrets.manager_token.trim().is_empty()
                || config.secrets.session_secret.trim().is_empty()
            {
                anyhow::bail!(
                    "{}: [secrets] manager_token and session_secret must be set (not blank)",
                    path.display()
                );
            }
            config
                .storage
                .check_times()
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            // `[telemetry]` too, so --check-config catches a bad endpoint or CA file.
            appproxy_shared::otlp::Settings::from_config(&config.telemetry, "storage-proxy")?;
            Ok(config)
        },
        |config| format!("{} volumes", config.volumes.len()),
    )?;
    let Some((_, config)) = loaded else {
        return Ok(());
    };
    appproxy_shared::telemetry::init(&config.logging, "storage-proxy")?;
    appproxy_shared::otlp::install(&config.telemetry, "storage-proxy")?;
    // Every session token is an HMAC of this key, and a client holds one: a short
    // key is found offline by trying keys against it, and then any token can be
    // made. Said at start (the original took any key; a refusal would stop
    // deployments carried over).
    let key = config.secrets.session_secret.len();
    if key < SESSION_SECRET_ADVISED {
        tracing::warn!(
            bytes = key,
            "[secrets] session_secret is under 16 bytes: a client holding one token can search for it offline and then make any token; use 32 random bytes"
        );
    }
    appproxy_control_common::service::run(|shutdown| async move {
        appproxy_storage_proxy::serve(&config, shutdown).await
    })?;
    Ok(())
}
