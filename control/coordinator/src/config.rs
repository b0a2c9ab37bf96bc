//! The coordinator's config file: `[coordinator]`, `[secrets]`, `[database]`,
//! `[redis]`, `[logging]`, `[health_check]`, `[limits]`, `[circuits]`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use appproxy_control_common::config::{load, relative_to, ConfigError};
use appproxy_shared::model::Reuse;
use appproxy_shared::telemetry::{LoggingConfig, TelemetryConfig};
use serde::{Deserialize, Serialize};

/// `[redis]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSection {
    /// `redis://…`; absent → single node, no events. Its database (the URL's path,
    /// `/2` as the platform has it) holds the keys: last-access marks, workers' last
    /// heartbeats, leadership. May be given as a secret is (`{ file = … }`, `{ env =
    /// … }`): it may hold a password.
    #[serde(deserialize_with = "appproxy_shared::secret::deserialize_opt")]
    pub url: Option<String>,
    /// The database the event streams are written to (`XADD`: `events-appproxy`'s
    /// `worker_lost`, the manager's `events`), when not the URL's: the platform
    /// keeps its keys in database 2 and its streams in database 4, on one server,
    /// and the manager reads each where it keeps it. Channels (`PUBLISH`) reach every
    /// database's subscribers.
    pub stream_db: Option<u8>,
}

impl CoordinatorConfig {
    /// Reads the coordinator's config file; a relative `[database] sqlite_path` (the
    /// default one too) is taken relative to the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = load(path)?;
        config.check().map_err(|message| ConfigError::Parse {
            path: path.display().to_string(),
            message,
        })?;
        config.database.sqlite_path = relative_to(path, &config.database.sqlite_path);
        Ok(config)
    }

    /// Refuses, naming the key, a `[coordinator]` duration in whole seconds that is
    /// used as it is (not clamped) and is longer than [`MAX_DURATION_SECS`]: the
    /// worker-lost pass subtracted `worker_heartbeat_timeout_secs` from the clock
    /// (u64::MAX panicked every pass on SQLite, and was an interval PostgreSQL
    /// refuses every pass), a job's period is added to the clock, and the idle
    /// timeout and the token TTL become intervals and signed seconds. The settings
    /// that are clamped (`leader_lease_secs`, `setup_link_ttl_secs`, the connection
    /// timeouts, the float ones) keep their documented caps.
    pub fn check(&self) -> Result<(), String> {
        let c = &self.coordinator;
        for (key, secs) in [
            (
                "worker_heartbeat_timeout_secs",
                c.worker_heartbeat_timeout_secs,
            ),
            (
                "unused_circuit_collection_timeout_secs",
                c.unused_circuit_collection_timeout_secs,
            ),
            (
                "check_worker_lost_interval_secs",
                c.check_worker_lost_interval_secs,
            ),
            (
                "check_unused_circuit_interval_secs",
                c.check_unused_circuit_interval_secs,
            ),
            (
                "check_unsettled_creation_interval_secs",
                c.check_unsettled_creation_interval_secs,
            ),
            ("token_ttl_secs", c.token_ttl_secs),
        ] {
            if secs > MAX_DURATION_SECS {
                return Err(format!(
                    "coordinator.{key}: {secs} s is longer than the longest duration \
                     a setting takes, {MAX_DURATION_SECS} s (366 days)"
                ));
            }
        }
        self.secrets.check()
    }

    /// The full default config, the optional keys shown commented.
    pub fn default_toml() -> String {
        let text = toml::to_string_pretty(&Self::default()).unwrap_or_default();
        let optional = [
                (
                    "coordinator",
                    "max_connections_per_address = 512  # default: one in 8 of max_connections, at least 16",
                ),
                (
                    "coordinator",
                    "unsettled_creation_timeout_secs = 20  # renewed every fifth of it (0.1-5 s) while the creation runs",
                ),
                (
                    "secrets",
                    "api_secret_previous = \"…\"  # the secret being replaced, taken too during a rotation",
                ),
                (
                    "secrets",
                    "worker_key = \"…\"  # or { file = \"/run/secrets/worker-key\" }: workers' own credentials, HMAC-SHA256(key, authority) in hex",
                ),
                (
                    "database",
                    "url = \"postgres://appproxy@127.0.0.1/appproxy\"  # instead of SQLite",
                ),
                (
                    "redis",
                    "url = \"redis://127.0.0.1:6379/2\"  # events to remote workers, marks, leadership (the platform's keys: database 2)",
                ),
                (
                    "redis",
                    "stream_db = 4  # event streams (XADD) to this database, the keys staying in the URL's (the platform: keys 2, streams 4)",
                ),
                (
                    "circuits",
                    "upstream_reuse = \"shared\"  # or \"client\"; default: unset, each worker's [upstream] reuse",
                ),
                (
                    "circuits",
                    "upstream_reuse_by_app = { jupyter = \"client\" }  # by app name, over upstream_reuse",
                ),
            ];
        let optional: Vec<_> = optional
            .into_iter()
            .chain(appproxy_shared::telemetry::TelemetryConfig::OPTIONAL_KEYS)
            .collect();
        appproxy_shared::config::with_optional_keys(&text, &optional)
    }
}

/// The longest a `[coordinator]` duration in whole seconds may be (366 days):
/// longer than any timeout, period or TTL a deployment needs, and far from where
/// the clock arithmetic made of it overflows (a `SystemTime` or `Instant` moved
/// by it, a PostgreSQL interval, signed seconds).
pub const MAX_DURATION_SECS: u64 = 366 * 24 * 3600;

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
    /// `[telemetry]`: OTLP span export (off by default).
    pub telemetry: TelemetryConfig,
    /// `[health_check]`: the active health check of inference routes.
    pub health_check: HealthCheckSection,
    /// `[limits]`: what one session or endpoint may hold.
    pub limits: LimitsSection,
    /// `[circuits]`: what the coordinator decides for the circuits it creates.
    pub circuits: CircuitsSection,
}

/// `[circuits]`: settings the coordinator writes into each circuit it creates (and
/// stores), which workers then follow for it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitsSection {
    /// Who may reuse a new circuit's pooled HTTP/1.1 app connections (`"shared"`
    /// or `"client"`), written into the circuit as its `upstream_reuse`, which
    /// overrides the worker's `[upstream] reuse`. Unset (the default): circuits
    /// carry none, and each worker's own setting decides.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_reuse: Option<Reuse>,
    /// The same by app name (a circuit's `app`: the app of `/v2/proxy/auth`, an
    /// endpoint's service name), over `upstream_reuse`: e.g. `{ jupyter =
    /// "client" }` for the interactive apps of individual users.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub upstream_reuse_by_app: BTreeMap<String, Reuse>,
}

impl CircuitsSection {
    /// The `upstream_reuse` of a new circuit of `app` (`None`: the workers').
    pub fn upstream_reuse_for(&self, app: Option<&str>) -> Option<Reuse> {
        app.and_then(|a| self.upstream_reuse_by_app.get(a).copied())
            .or(self.upstream_reuse)
    }
}

/// `[limits]`: what one session, or one endpoint, may hold of the coordinator's
/// resources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Live interactive circuits one session may hold (each `/v2/proxy/auth` with a
    /// new app, or with `no_reuse`, creates one; a reused circuit is never refused).
    /// A creation past it is answered 429 `E10004` and stores nothing. Endpoint
    /// (inference) circuits do not count. 0: no limit. A session runs a handful of
    /// apps (notebooks, editors, terminals, a few custom ports): 32 is ample, and
    /// one setup token cannot take every port of a small cluster.
    pub max_circuits_per_session: u32,
    /// Routes (replicas) one model-serving endpoint's circuit may hold: a route
    /// registration or replacement past it is answered 400 and changes nothing.
    /// Every route change is announced with the whole circuit (≈ 0.5 KiB a route), so
    /// this bounds each event — 1024 routes ≈ 0.5 MiB, far below Redis' pub/sub
    /// output buffer limits (8 MiB soft, 32 MiB hard), past which Redis disconnects
    /// every subscriber. An endpoint's replicas are sessions with their own GPUs:
    /// tens, rarely hundreds. 0: no limit.
    pub max_routes_per_endpoint: u32,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_circuits_per_session: 32,
            max_routes_per_endpoint: 1024,
        }
    }
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

impl HealthCheckSection {
    /// How often the checked routes are re-read (and the leadership lease renewed
    /// with them): `refresh_interval_secs`, between 50 ms and an hour.
    pub fn refresh_every(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.refresh_interval_secs.clamp(0.05, 3600.0))
    }
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
    /// A port a worker reported it could not listen on (its acknowledgement's
    /// `failed`, another process holding the port, say) is offered to that worker
    /// again only when none of its other ports is free, for this long after the
    /// failure (remembered by this coordinator process only); 0 = not remembered.
    /// At most a day.
    pub worker_failed_port_backoff_secs: f64,
    /// An API request head must arrive within this (also bounds a keep-alive
    /// connection's wait for its next request).
    pub header_read_timeout_secs: u64,
    /// An API connection on which no byte moves for this long is closed.
    pub idle_timeout_secs: u64,
    /// An API request's body must arrive whole within this of its head (else 408 and
    /// the connection closed): a body that stalls or trickles cannot hold a connection.
    pub body_read_timeout_secs: u64,
    /// API connections open at most (also kept below the descriptor limit).
    pub max_connections: usize,
    /// Once half of `max_connections` are open, a client address (IPv4, or an IPv6
    /// /64) holding this many of its connections gets no more: new ones are closed
    /// at once, so that one client keeping connections alive cannot take every
    /// slot from the manager and the workers. Unset: one in 8 of `max_connections`
    /// (512 of 4096), at least 16. Behind a reverse proxy or a NAT, whose one
    /// address every caller then has, set it to `max_connections` (no share).
    pub max_connections_per_address: Option<usize>,
    /// A worker without a heartbeat for this long is marked `LOST`.
    pub worker_heartbeat_timeout_secs: u64,
    /// Interactive HTTP circuits idle (no request) for this long are removed.
    pub unused_circuit_collection_timeout_secs: u64,
    /// With Redis: how long the leadership lease lasts unrenewed. Every pass of the
    /// leader's jobs renews it; the leader runs the worker-lost check, the idle
    /// collection, the unsettled-creation sweep and the health check. A node that
    /// stops gracefully gives the lease up as it stops; one killed or cut off from
    /// Redis is succeeded once this has run out. 2 s to a day; a lease no longer
    /// than the shortest of those jobs' periods lapses between passes (warned at
    /// start).
    pub leader_lease_secs: u64,
    /// Period of the worker-lost check.
    pub check_worker_lost_interval_secs: u64,
    /// Period of the idle-circuit collection.
    pub check_unused_circuit_interval_secs: u64,
    /// A circuit is stored marked as a creation under way until this long after its
    /// insert (on the database's clock); the coordinator making it renews the mark
    /// (this long ahead again) every fifth of it, between 0.1 s and 5 s, for as
    /// long as the creation runs, and its creation, acknowledged, clears the mark
    /// before its caller is answered. A circuit still marked past it was left by a
    /// coordinator that stopped renewing it (stopped, or cut off from the store
    /// this long): the leader's sweep withdraws it, and no reuse hands it out; a
    /// reuse on another coordinator waits for it at most until then. It need not
    /// cover the longest creation, only a few renewals and a store call's 5 s
    /// deadline (a warning at start says when it is shorter than a renewal may
    /// take). Unset: 20 s (renewed every 4 s).
    pub unsettled_creation_timeout_secs: Option<f64>,
    /// Period of the sweep of creations left unsettled past
    /// `unsettled_creation_timeout_secs`.
    pub check_unsettled_creation_interval_secs: u64,
    /// Setup tokens (`POST /v2/conf`, spent by `/v2/proxy/auth` moments later) are
    /// deleted this long after they were made, by the idle-circuit pass; 0 keeps
    /// them for ever, as the original did (one row per app launch, for ever). One
    /// past it is refused by `/v2/proxy/auth` as an unknown one at once, deleted or
    /// not. At most 366 days ([`MAX_DURATION_SECS`], as the other durations used
    /// unclamped: [`CoordinatorConfig::check`]).
    pub token_ttl_secs: u64,
    /// The `/setup` link `/v2/proxy/auth` answers (a token the worker turns into the
    /// owner's permit cookie, followed by the browser at once) expires this long
    /// after it was made (its `exp`): a link left in a history, a log or a
    /// `Referer` no longer hands out the permit for ever. 0: no expiry, as the
    /// original.
    pub setup_link_ttl_secs: u64,
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
            worker_failed_port_backoff_secs: 300.0,
            header_read_timeout_secs: 10,
            idle_timeout_secs: 75,
            body_read_timeout_secs: 30,
            max_connections: 4096,
            max_connections_per_address: None,
            worker_heartbeat_timeout_secs: 30,
            unused_circuit_collection_timeout_secs: 3600,
            leader_lease_secs: 30,
            check_worker_lost_interval_secs: 15,
            check_unused_circuit_interval_secs: 10,
            unsettled_creation_timeout_secs: None,
            check_unsettled_creation_interval_secs: 10,
            token_ttl_secs: 7 * 24 * 3600,
            setup_link_ttl_secs: 600,
            metric_access_allowed_hosts: vec!["127.0.0.1".into()],
        }
    }
}

/// `[secrets]` of the coordinator.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorSecrets {
    /// Shared secret of the API (`X-BackendAI-Token`, or the key of an
    /// `Authorization: Bearer` JWT). Each secret here may be given inline, as `{ file
    /// = "/abs/path" }` or as `{ env = "VAR" }` ([`appproxy_shared::secret`]).
    #[serde(deserialize_with = "appproxy_shared::secret::deserialize")]
    pub api_secret: String,
    /// The API secret before the current one, still accepted while callers move to
    /// the new one: set it to the old secret, restart, move the manager and the
    /// workers to `api_secret`, then remove it. Absent: only `api_secret`.
    #[serde(default, deserialize_with = "appproxy_shared::secret::deserialize_opt")]
    pub api_secret_previous: Option<String>,
    /// HS256 key of circuit JWTs.
    #[serde(deserialize_with = "appproxy_shared::secret::deserialize")]
    pub jwt_secret: String,
    /// The key each worker's own credential is derived from
    /// ([`appproxy_shared::secret::derived`] of the worker's authority). A worker
    /// whose `[secrets] api_secret` is its derived credential reaches only the
    /// worker routes (register, heartbeat, leave, its circuit set), each only for its
    /// own authority: a worker host no longer holds the manager's rights. Absent:
    /// workers use `api_secret`, as in the original (still taken when set).
    #[serde(default, deserialize_with = "appproxy_shared::secret::deserialize_opt")]
    pub worker_key: Option<String>,
}

impl CoordinatorSecrets {
    /// Refuses secrets that would open more than they should: the API secret (or
    /// the previous one) equal to the JWT key makes every token the coordinator
    /// signs — a `/setup` link in a browser's history, a user's inference token — a
    /// key to the whole API (a bearer JWT signed with the API secret is one); the
    /// worker key equal to either; a previous secret that is blank or the current
    /// one (a mistake that would read as a rotation under way); an API secret with
    /// white space at an end or a control character, which no header can carry
    /// (every caller would be refused with no hint why). Blank current secrets are
    /// the binary's to refuse (`--check-config` of a file without them still
    /// parses).
    pub fn check(&self) -> Result<(), String> {
        let set = |s: &str| !s.trim().is_empty();
        for (key, value) in [
            ("api_secret", Some(self.api_secret.as_str())),
            ("api_secret_previous", self.api_secret_previous.as_deref()),
        ] {
            let Some(value) = value else { continue };
            if key == "api_secret_previous" && !set(value) {
                return Err(format!(
                    "secrets.{key}: blank; remove it when no rotation is under way"
                ));
            }
            if value.trim() != value || value.chars().any(char::is_control) {
                return Err(format!(
                    "secrets.{key}: white space at an end or a control character, \
                     which no X-BackendAI-Token field can carry"
                ));
            }
            if set(value) && value == self.jwt_secret {
                return Err(format!(
                    "secrets.{key} equals secrets.jwt_secret: every token signed with \
                     the JWT key would open the API; give them different values"
                ));
            }
        }
        if self.api_secret_previous.as_deref() == Some(self.api_secret.as_str()) {
            return Err(
                "secrets.api_secret_previous equals secrets.api_secret: set it to the \
                 secret being replaced, or remove it"
                    .to_owned(),
            );
        }
        if let Some(key) = &self.worker_key {
            if !set(key) {
                return Err("secrets.worker_key: blank; remove it or give a key".to_owned());
            }
            let others = [
                Some(self.api_secret.as_str()),
                self.api_secret_previous.as_deref(),
                Some(self.jwt_secret.as_str()),
            ];
            if others.contains(&Some(key.as_str())) {
                return Err(
                    "secrets.worker_key equals another secret: give it a value of its own"
                        .to_owned(),
                );
            }
        }
        Ok(())
    }

    /// The worker key, when set and not blank.
    pub fn worker_key(&self) -> Option<&str> {
        self.worker_key.as_deref().filter(|k| !k.trim().is_empty())
    }

    /// The API secrets a caller may present: the current one, then the previous one
    /// while it is set and not blank.
    pub fn api_secrets(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.api_secret.as_str())
            .chain(self.api_secret_previous.as_deref())
            .filter(|s| !s.trim().is_empty())
    }
}

impl DatabaseSection {
    /// With the embedded store: that its file can be written, and its directory,
    /// where SQLite makes the journal (`-wal`, `-shm`) and the coordinator its lock
    /// (`.lock`). Checked by `--check-config` and at start; before, `--check-config`
    /// said "config ok" for a read-only directory, and the start then failed with
    /// SQLite's "unable to open database file", naming neither the file's directory
    /// nor its mode (an outside tester's find).
    pub fn check_sqlite_writable(&self) -> Result<(), String> {
        use rustix::fs::Access;
        if self.url.is_some() {
            return Ok(());
        }
        let file = &self.sqlite_path;
        let dir = match file.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let unusable = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
            format!(
                "[database] sqlite_path {}: {what} {} {e}: the coordinator makes the store, its journal and its lock there (or give [database] url for PostgreSQL)",
                file.display(),
                path.display()
            )
        };
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(unusable("its directory", dir, &"is not a directory")),
            Err(e) => {
                return Err(unusable(
                    "its directory",
                    dir,
                    &format!("cannot be used ({e})"),
                ))
            }
        }
        rustix::fs::access(dir, Access::WRITE_OK | Access::EXEC_OK).map_err(|e| {
            unusable(
                "its directory",
                dir,
                &format!("is not writable ({})", std::io::Error::from(e)),
            )
        })?;
        if std::fs::symlink_metadata(file).is_ok_and(|m| m.is_dir()) {
            return Err(unusable("the file", file, &"is a directory"));
        }
        match rustix::fs::access(file, Access::READ_OK | Access::WRITE_OK) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(unusable(
                "the file",
                file,
                &format!("is not writable ({})", std::io::Error::from(e)),
            )),
        }
    }
}

/// `[database]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSection {
    /// A `postgres://…` URL; absent → embedded SQLite at `sqlite_path`. May be
    /// given as a secret is (`{ file = … }`, `{ env = … }`): it holds the password.
    #[serde(deserialize_with = "appproxy_shared::secret::deserialize_opt")]
    pub url: Option<String>,
    /// The embedded database file.
    pub sqlite_path: PathBuf,
    /// PostgreSQL connections kept by the pool (3 to 1024; half of them at most
    /// held by creations' turns at their reuse keys).
    pub pool_size: usize,
    /// The embedded database file grows no larger than this (MiB; 0: no limit):
    /// a write past it is refused as on a full disk (503 `E10003`, `/readyz` not
    /// ready until room is made), before the disk it shares with logs and apps
    /// fills up.
    pub sqlite_max_size_mib: u64,
}

impl Default for DatabaseSection {
    fn default() -> Self {
        Self {
            url: None,
            sqlite_path: PathBuf::from("appproxy-coordinator.sqlite3"),
            pool_size: 16,
            sqlite_max_size_mib: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    /// Secrets that would open more than they should are refused at load, naming
    /// the key; the usual ones read.
    #[test]
    fn secrets_that_open_too_much_are_refused() {
        let parse = |secrets: &str| {
            let text = format!("[secrets]\n{secrets}\n");
            let config: super::CoordinatorConfig =
                appproxy_shared::config::from_toml(&text).expect("parses");
            config.check()
        };
        for ok in [
            "api_secret = \"a\"\njwt_secret = \"j\"",
            "api_secret = \"a\"\njwt_secret = \"j\"\napi_secret_previous = \"old\"\nworker_key = \"w\"",
            // Blank current secrets are the binary's to refuse.
            "",
        ] {
            assert_eq!(parse(ok), Ok(()), "{ok}");
        }
        for (bad, named) in [
            (
                "api_secret = \"same\"\njwt_secret = \"same\"",
                "secrets.api_secret equals secrets.jwt_secret",
            ),
            (
                "api_secret = \"a\"\njwt_secret = \"j\"\napi_secret_previous = \"j\"",
                "secrets.api_secret_previous equals secrets.jwt_secret",
            ),
            (
                "api_secret = \"a\"\njwt_secret = \"j\"\napi_secret_previous = \"a\"",
                "secrets.api_secret_previous equals secrets.api_secret",
            ),
            (
                "api_secret = \"a\"\njwt_secret = \"j\"\napi_secret_previous = \" \"",
                "secrets.api_secret_previous: blank",
            ),
            (
                "api_secret = \"a \"\njwt_secret = \"j\"",
                "secrets.api_secret: white space",
            ),
            (
                "api_secret = \"a\\nb\"\njwt_secret = \"j\"",
                "secrets.api_secret: white space at an end or a control",
            ),
            (
                "api_secret = \"a\"\njwt_secret = \"j\"\nworker_key = \"a\"",
                "secrets.worker_key equals another secret",
            ),
            (
                "api_secret = \"a\"\njwt_secret = \"j\"\nworker_key = \"j\"",
                "secrets.worker_key equals another secret",
            ),
            (
                "api_secret = \"a\"\njwt_secret = \"j\"\nworker_key = \"\"",
                "secrets.worker_key: blank",
            ),
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(err.starts_with(named), "{bad}: {err}");
        }
    }

    /// `--print-default-config` shows the keys without a default commented out;
    /// uncommenting any one of them (or an optional section, header and keys)
    /// gives a config that reads.
    #[test]
    fn every_commented_key_of_the_default_config_reads_once_uncommented() {
        let text = super::CoordinatorConfig::default_toml();
        let variants = appproxy_test_support::config::uncommented_one_by_one(&text);
        for (key, one) in &variants {
            appproxy_shared::config::from_toml::<super::CoordinatorConfig>(one)
                .unwrap_or_else(|e| panic!("{key} does not read: {e}\n{one}"));
        }
        assert!(variants.len() >= 3, "{text}");
    }

    /// `--print-default-config` shows every key the coordinator takes, set or
    /// commented (the OTLP keys were taken but not shown).
    #[test]
    fn the_default_config_shows_every_key() {
        appproxy_test_support::config::assert_every_key_shown(
            &super::CoordinatorConfig::default_toml(),
            &|text| appproxy_shared::config::from_toml::<super::CoordinatorConfig>(text).map(drop),
        );
    }

    /// Every float setting set to `nan` is refused, naming it: a clamp keeps `nan`,
    /// and the durations made of these panicked at start (or at the first ack).
    #[test]
    fn every_float_setting_refuses_nan_by_name() {
        let text = super::CoordinatorConfig::default_toml();
        let variants = appproxy_test_support::config::floats_made_nan(&text);
        for (key, one) in &variants {
            let err =
                appproxy_shared::config::from_toml::<super::CoordinatorConfig>(one).expect_err(key);
            assert!(err.starts_with(key.as_str()), "{key}: {err}");
        }
        assert!(variants.len() >= 5, "{text}");
    }

    #[test]
    fn a_relative_sqlite_path_is_relative_to_its_config_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("coordinator.toml");
        std::fs::write(&file, "[database]\nsqlite_path = \"state/c.sqlite3\"\n").expect("write");
        let c = super::CoordinatorConfig::load(&file).expect("load");
        assert_eq!(c.database.sqlite_path, dir.path().join("state/c.sqlite3"));
        std::fs::write(&file, "[database]\nsqlite_path = \"/var/lib/c.sqlite3\"\n").expect("write");
        let c = super::CoordinatorConfig::load(&file).expect("load");
        assert_eq!(
            c.database.sqlite_path,
            std::path::Path::new("/var/lib/c.sqlite3")
        );
    }

    use super::*;

    /// A duration past [`MAX_DURATION_SECS`] is refused at load, naming its key:
    /// `worker_heartbeat_timeout_secs = 18446744073709551615` was accepted, then
    /// every worker-lost pass panicked (SQLite) or failed (PostgreSQL). The bound
    /// itself is accepted, and so is the default config.
    #[test]
    fn every_unclamped_duration_refuses_more_than_a_year_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("coordinator.toml");
        for key in [
            "worker_heartbeat_timeout_secs",
            "unused_circuit_collection_timeout_secs",
            "check_worker_lost_interval_secs",
            "check_unused_circuit_interval_secs",
            "check_unsettled_creation_interval_secs",
            "token_ttl_secs",
        ] {
            for huge in [u64::MAX, MAX_DURATION_SECS + 1] {
                std::fs::write(&file, format!("[coordinator]\n{key} = {huge}\n")).expect("write");
                let err = CoordinatorConfig::load(&file).expect_err(key).to_string();
                assert!(
                    err.contains(&format!("coordinator.{key}: {huge} s")),
                    "{err}"
                );
                assert!(err.contains("coordinator.toml"), "{err}");
            }
            std::fs::write(
                &file,
                format!("[coordinator]\n{key} = {MAX_DURATION_SECS}\n"),
            )
            .expect("write");
            CoordinatorConfig::load(&file).unwrap_or_else(|e| panic!("{key}: {e}"));
        }
        std::fs::write(&file, CoordinatorConfig::default_toml()).expect("write");
        CoordinatorConfig::load(&file).expect("the default config");
    }

    #[test]
    fn defaults_round_trip() {
        let text = toml::to_string_pretty(&CoordinatorConfig::default()).expect("toml");
        assert_eq!(
            toml::from_str::<CoordinatorConfig>(&text).expect("parse"),
            CoordinatorConfig::default()
        );
    }

    /// `--print-default-config` shows the session limit with its default, and the
    /// printed file reads back to it.
    #[test]
    fn the_default_config_prints_the_session_circuit_limit() {
        let text = CoordinatorConfig::default_toml();
        assert!(text.contains("[limits]"), "{text}");
        assert!(text.contains("max_circuits_per_session = 32"), "{text}");
        let read: CoordinatorConfig = toml::from_str(&text).expect("parse");
        assert_eq!(read.limits.max_circuits_per_session, 32);
        let off: CoordinatorConfig =
            toml::from_str("[limits]\nmax_circuits_per_session = 0\n").expect("parse");
        assert_eq!(off.limits.max_circuits_per_session, 0);
        assert!(text.contains("max_routes_per_endpoint = 1024"), "{text}");
        assert_eq!(read.limits.max_routes_per_endpoint, 1024);
    }

    /// `[circuits]`: nothing by default (each worker decides), shown commented by
    /// `--print-default-config`, each line valid uncommented; an app's own value
    /// over the default one.
    #[test]
    fn circuits_upstream_reuse_by_default_and_by_app() {
        let text = CoordinatorConfig::default_toml();
        assert!(text.contains("# upstream_reuse = \"shared\""), "{text}");
        assert!(
            text.contains("# upstream_reuse_by_app = { jupyter = \"client\" }"),
            "{text}"
        );
        let read: CoordinatorConfig = toml::from_str(&text).expect("parse");
        assert_eq!(read.circuits, CircuitsSection::default());
        assert_eq!(read.circuits.upstream_reuse_for(Some("jupyter")), None);
        let uncommented = text
            .replace("# upstream_reuse = ", "upstream_reuse = ")
            .replace("# upstream_reuse_by_app", "upstream_reuse_by_app")
            .replace("# [circuits]", "[circuits]");
        let read: CoordinatorConfig = toml::from_str(&uncommented).expect(&uncommented);
        let c = &read.circuits;
        assert_eq!(c.upstream_reuse_for(Some("jupyter")), Some(Reuse::Client));
        assert_eq!(c.upstream_reuse_for(Some("vscode")), Some(Reuse::Shared));
        assert_eq!(c.upstream_reuse_for(None), Some(Reuse::Shared));
        let again = toml::to_string_pretty(&read).expect("toml");
        assert_eq!(
            toml::from_str::<CoordinatorConfig>(&again).expect("parse"),
            read
        );
        let by_app: CoordinatorConfig =
            toml::from_str("[circuits]\nupstream_reuse_by_app = { jupyter = \"client\" }\n")
                .expect("parse");
        assert_eq!(
            by_app.circuits.upstream_reuse_for(Some("jupyter")),
            Some(Reuse::Client)
        );
        assert_eq!(by_app.circuits.upstream_reuse_for(Some("vscode")), None);
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

    /// The common mistakes, each refused with the file, the key path, what was
    /// expected and, for a misspelling, the fix. (The file has no UUID-typed key; the
    /// worker's table covers that case.)
    #[test]
    fn config_mistakes_name_the_file_the_key_and_the_fix() {
        let coordinator: &[appproxy_test_support::config::Mistake] = &[
            (
                "unknown key",
                "[coordinator]\nbnd = \"127.0.0.1:1\"\n",
                &["coordinator", "unknown field `bnd`", "did you mean `bind`?"],
            ),
            (
                "wrong type",
                "[coordinator]\nworker_ack_timeout_secs = \"soon\"\n",
                &["coordinator.worker_ack_timeout_secs", "line 2", "expected"],
            ),
            (
                "port outside the range",
                "[coordinator]\nbind = \"127.0.0.1:70000\"\n",
                &["coordinator.bind", "line 2", "socket address"],
            ),
            (
                "misspelt value",
                "[health_check]\nevent_envelope = \"jsn\"\n",
                &["health_check.event_envelope", "did you mean `json`?"],
            ),
            (
                "a negative circuit limit",
                "[limits]\nmax_circuits_per_session = -1\n",
                &["limits.max_circuits_per_session", "line 2", "expected"],
            ),
            (
                "an unknown app-connection reuse",
                "[circuits]\nupstream_reuse_by_app = { jupyter = \"never\" }\n",
                &[
                    "circuits.upstream_reuse_by_app.jupyter",
                    "unknown variant `never`",
                    "`client`",
                ],
            ),
            (
                "wrong table type",
                "coordinator = 1\n",
                &["coordinator", "line 1", "expected"],
            ),
            ("not TOML", "[coordinator\n", &["line 1"]),
        ];
        appproxy_test_support::config::assert_mistakes_refused("coordinator", coordinator, &|p| {
            load::<CoordinatorConfig>(p).err().map(|e| e.to_string())
        });
    }
}
