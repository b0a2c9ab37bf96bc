//! Configuration files of the coordinator and the storage-proxy: TOML → typed,
//! validated structs with `#[serde(default)]` and unknown keys refused.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use appproxy_shared::telemetry::LoggingConfig;
use serde::{Deserialize, Serialize};

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {cause}")]
    Read {
        /// The path given.
        path: String,
        /// Why.
        cause: std::io::Error,
    },
    /// The TOML did not parse into the schema.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The path given.
        path: String,
        /// The parser's message.
        message: String,
    },
}

/// Reads and parses a TOML config file.
pub fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
        path: path.display().to_string(),
        cause,
    })?;
    appproxy_shared::config::from_toml(&text).map_err(|message| ConfigError::Parse {
        path: path.display().to_string(),
        message,
    })
}

/// The coordinator's config file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// `[coordinator]`.
    pub coordinator: CoordinatorSection,
    /// `[secrets]`.
    pub secrets: CoordinatorSecrets,
    /// `[database]`.
    pub database: DatabaseSection,
    /// `[redis]`.
    pub redis: RedisSection,
    /// `[logging]`.
    pub logging: LoggingConfig,
    /// `[health_check]`: the active health check of inference routes.
    pub health_check: HealthCheckSection,
}

/// `[health_check]`: how the coordinator runs the endpoints' health checks (the
/// per-endpoint settings — path, interval, retries — come from `/v2/endpoints`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckSection {
    /// Probes in flight at most; more wait their turn.
    pub max_concurrency: usize,
    /// How often the set of checked routes is re-read from the store.
    pub refresh_interval_secs: f64,
    /// Each probe's time is moved by up to this fraction of its interval, at random,
    /// so routes added together do not stay in step.
    pub jitter: f64,
    /// Intervals and timeouts shorter than this are raised to it.
    pub min_interval_secs: f64,
    /// Form of the anycast events sent to the manager (`model_service_status_updated`,
    /// `worker_lost`): `"json"` (the current envelope), `"legacy"` (msgpack `args`, for
    /// managers released before the JSON envelope) or `"both"` (both fields in one
    /// stream entry).
    pub event_envelope: EventEnvelope,
}

impl Default for HealthCheckSection {
    fn default() -> Self {
        Self {
            max_concurrency: 256,
            refresh_interval_secs: 5.0,
            jitter: 0.1,
            min_interval_secs: 0.1,
            event_envelope: EventEnvelope::Json,
        }
    }
}

/// Which envelope anycast events are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventEnvelope {
    /// `payload` (JSON text) and `metadata`.
    Json,
    /// `args` (msgpack of the positional array).
    Legacy,
    /// Both.
    Both,
}

/// `[coordinator]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorSection {
    /// Address of the HTTP API.
    pub bind: SocketAddr,
    /// URL workers and managers use to reach it.
    pub advertised_url: String,
    /// Accept unauthenticated `/v2/conf` (development only).
    pub allow_unauthorized_configure_request: bool,
    /// How long a circuit creation waits for the worker's acknowledgement before
    /// answering 503 `E10001` (the original's 15 s); 0 = do not wait. Only when events
    /// flow (Redis, or a worker embedded in this process).
    pub worker_ack_timeout_secs: f64,
    /// A worker that missed an acknowledgement is skipped by placement for this long
    /// (its circuit breaker is open), doubling with each further miss.
    pub worker_breaker_backoff_secs: f64,
    /// The longest such back-off.
    pub worker_breaker_max_backoff_secs: f64,
    /// An API request head must arrive within this (also bounds a keep-alive
    /// connection's wait for its next request).
    pub header_read_timeout_secs: u64,
    /// An API connection on which no byte moves for this long is closed.
    pub idle_timeout_secs: u64,
    /// API connections open at most (also kept below the descriptor limit).
    pub max_connections: usize,
    /// A worker without a heartbeat for this long is marked `LOST`.
    pub worker_heartbeat_timeout_secs: u64,
    /// Interactive HTTP circuits idle (no request) for this long are removed.
    pub unused_circuit_collection_timeout_secs: u64,
    /// Period of the worker-lost check.
    pub check_worker_lost_interval_secs: u64,
    /// Period of the idle-circuit collection.
    pub check_unused_circuit_interval_secs: u64,
    /// Who may read `/metrics`: IPv4 addresses or CIDRs (others get 403), as the
    /// original.
    pub metric_access_allowed_hosts: Vec<String>,
}

impl Default for CoordinatorSection {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 10200)),
            advertised_url: "http://127.0.0.1:10200".into(),
            allow_unauthorized_configure_request: false,
            worker_ack_timeout_secs: 15.0,
            worker_breaker_backoff_secs: 5.0,
            worker_breaker_max_backoff_secs: 60.0,
            header_read_timeout_secs: 10,
            idle_timeout_secs: 75,
            max_connections: 4096,
            worker_heartbeat_timeout_secs: 30,
            unused_circuit_collection_timeout_secs: 3600,
            check_worker_lost_interval_secs: 15,
            check_unused_circuit_interval_secs: 10,
            metric_access_allowed_hosts: vec!["127.0.0.1".into()],
        }
    }
}

/// `[secrets]` of the coordinator.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorSecrets {
    /// Shared secret of the API (`X-BackendAI-Token`).
    pub api_secret: String,
    /// HS256 key of circuit JWTs.
    pub jwt_secret: String,
}

/// `[database]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSection {
    /// A `postgres://…` URL; absent → embedded SQLite at `sqlite_path`.
    pub url: Option<String>,
    /// The embedded database file.
    pub sqlite_path: PathBuf,
    /// PostgreSQL connections kept by the pool.
    pub pool_size: usize,
}

impl Default for DatabaseSection {
    fn default() -> Self {
        Self {
            url: None,
            sqlite_path: PathBuf::from("appproxy-coordinator.sqlite3"),
            pool_size: 16,
        }
    }
}

/// `[redis]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSection {
    /// `redis://…`; absent → single node, no events.
    pub url: Option<String>,
}

/// The storage-proxy's config file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `[storage]`.
    pub storage: StorageSection,
    /// `[secrets]`.
    pub secrets: StorageSecrets,
    /// `[[volumes]]`.
    pub volumes: Vec<Volume>,
    /// `[redis]` (optional: background-task events).
    pub redis: RedisSection,
    /// `[logging]`.
    pub logging: LoggingConfig,
}

/// `[storage]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSection {
    /// Client-facing API (downloads, tus uploads).
    pub client_bind: SocketAddr,
    /// Manager-facing API.
    pub manager_bind: SocketAddr,
    /// This node's ID.
    pub node_id: String,
    /// Lifetime of upload and download session tokens.
    pub session_expire_secs: u64,
    /// Largest upload accepted, bytes.
    pub max_upload_size: u64,
    /// Staging files untouched this long are removed by the cleanup job.
    pub upload_expire_secs: u64,
    /// How often the cleanup job runs.
    pub cleanup_interval_secs: u64,
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            client_bind: SocketAddr::from(([127, 0, 0, 1], 6021)),
            manager_bind: SocketAddr::from(([127, 0, 0, 1], 6022)),
            node_id: "storage-1".into(),
            session_expire_secs: 3600,
            max_upload_size: 1 << 30,
            upload_expire_secs: 24 * 3600,
            cleanup_interval_secs: 300,
        }
    }
}

/// `[secrets]` of the storage-proxy.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSecrets {
    /// Manager-facing auth token.
    pub manager_token: String,
    /// Key of client session JWTs.
    pub session_secret: String,
}

/// One `[[volumes]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// Volume name.
    pub name: String,
    /// Mount path.
    pub path: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip() {
        let text = toml::to_string_pretty(&CoordinatorConfig::default()).expect("toml");
        assert_eq!(
            toml::from_str::<CoordinatorConfig>(&text).expect("parse"),
            CoordinatorConfig::default()
        );
        let text = toml::to_string_pretty(&StorageConfig::default()).expect("toml");
        assert_eq!(
            toml::from_str::<StorageConfig>(&text).expect("parse"),
            StorageConfig::default()
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err =
            toml::from_str::<CoordinatorConfig>("[coordinator]\nbnd = \"x\"\n").expect_err("typo");
        assert!(err.to_string().contains("unknown field"), "{err}");
        let ok: CoordinatorConfig = toml::from_str(
            "[database]\nurl = \"postgres://u@h/db\"\n[redis]\nurl = \"redis://h\"\n",
        )
        .expect("keys");
        assert_eq!(ok.database.url.as_deref(), Some("postgres://u@h/db"));
    }
}
