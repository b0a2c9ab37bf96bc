//! The storage-proxy's config file: `[storage]`, `[secrets]`, `[[volumes]]`,
//! `[redis]`, `[logging]`.

use std::net::SocketAddr;
use std::path::PathBuf;

pub use appproxy_control_common::config::RedisSection;
use appproxy_shared::telemetry::{LoggingConfig, TelemetryConfig};
use serde::{Deserialize, Serialize};

impl StorageConfig {
    /// The full default config, the optional keys and a volume shown commented.
    pub fn default_toml() -> String {
        let text = toml::to_string_pretty(&Self::default()).unwrap_or_default();
        // No volume by default: the empty array would clash with the commented
        // `[[volumes]]` table below once uncommented.
        let text: String = text
            .lines()
            .filter(|l| *l != "volumes = []")
            .flat_map(|l| [l, "\n"])
            .collect();
        appproxy_shared::config::with_optional_keys(
            &text,
            &[
                (
                    "storage",
                    "max_connections_per_address = 512  # default: one in 8 of max_connections, at least 16",
                ),
                (
                    "storage",
                    "max_archive_streams_per_address = 8  # default: one in 8 of max_archive_streams, at least 1",
                ),
                (
                    "storage",
                    "max_walk_names_bytes_per_walk = 67108864  # no longer used: walks hold no names",
                ),
                (
                    "redis",
                    "url = \"redis://127.0.0.1:6379/8\"  # background-task events",
                ),
                ("[volumes]", "name = \"local\"  # at least one volume"),
                ("[volumes]", "path = \"/vfroot/local\""),
            ]
            .into_iter()
            .chain(appproxy_shared::telemetry::TelemetryConfig::OPTIONAL_KEYS)
            .collect::<Vec<_>>(),
        )
    }
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
    /// `[telemetry]`: OTLP span export (off by default).
    pub telemetry: TelemetryConfig,
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
    /// A transfer on which the client moves no byte for this long is cut off: an
    /// archive download (its writer holds a blocking thread while it waits) and a
    /// tus PATCH body (the session is locked while its PATCH runs).
    pub stall_timeout_secs: u64,
    /// A tus PATCH body must keep up this many bytes per second on average, with up
    /// to `stall_timeout_secs` of waiting banked (each byte earns back `1 /
    /// min_body_rate` s of it); below it the PATCH ends with 408, keeping what
    /// arrived. 0 turns the floor off (the stall timeout and the token's expiry
    /// still bound a PATCH).
    pub min_body_rate: u64,
    /// A request head must arrive within this (also a keep-alive connection's wait
    /// for its next request), on both APIs.
    pub header_read_timeout_secs: u64,
    /// A connection on which no byte moves either way for this long, while no request
    /// is in flight, is closed.
    pub idle_timeout_secs: u64,
    /// Connections open at most on each API (also kept below the descriptor limit).
    pub max_connections: usize,
    /// Once half of `max_connections` are open on an API, a client address (IPv4,
    /// or an IPv6 /64) holding this many of its connections gets no more: new ones
    /// are closed at once, so that one client keeping connections alive cannot take
    /// every slot. Unset: one in 8 of `max_connections` (512 of 4096), at least 16.
    /// Behind a reverse proxy, whose one address every client then has, set it to
    /// `max_connections` (no share).
    pub max_connections_per_address: Option<usize>,
    /// A manager API request's body (JSON) must arrive whole within this of its head.
    pub body_read_timeout_secs: u64,
    /// A quota check (session creation, every tus PATCH, a clone) uses the scope's
    /// measured committed bytes when the walk that measured them began at most this
    /// long ago, else it measures again (one walk per scope at a time, shared by the
    /// checks waiting for it). Bytes written behind the proxy's back count from then
    /// on; 0: every check measures.
    pub quota_usage_max_age_secs: u64,
    /// Archive downloads (a directory with `archive=true`, `/download-archive`)
    /// streaming at once, at most (1 to 256). Each is written on a blocking thread
    /// that waits while its client is slow to take bytes, and the blocking pool (512
    /// threads) serves every file operation of both APIs: past this many, an archive
    /// is answered 503 at once instead of taking another thread.
    pub max_archive_streams: usize,
    /// Once half of `max_archive_streams` are taken, a client address (IPv4, or an
    /// IPv6 /64) that streams this many archives gets 503 for more, so that one
    /// address cannot hold every slot. Unset: one in 8 of `max_archive_streams` (8
    /// of 64). Behind a reverse proxy, whose one address every client then has,
    /// set it to `max_archive_streams` (no share).
    pub max_archive_streams_per_address: Option<usize>,
    /// Paths one `/folder/file/delete` (or `delete-async`) request may name, at most:
    /// each is checked before anything is deleted and again when deleted, a climb
    /// of its parent directories each time, so a longer list is refused (400)
    /// instead of costing minutes of CPU.
    pub max_delete_paths: usize,
    /// Entries one `/folder/file/list` answer carries, at most (the original's
    /// `scandir-limit`, 1 to 1 000 000; a value out of that range is taken as the
    /// nearest end). The directory is read up to this many entries and no further,
    /// and an answer that stops there says so (`"truncated": true`): a user with a
    /// shell fills a directory with millions of empty files in seconds, and a
    /// listing of all of them held every name in memory (2 million: 300 MB and
    /// 24 s per request).
    pub scandir_limit: usize,
    /// No longer used, accepted so that config files that set it still load: walks
    /// (archives, usage and quota measurements, recursive deletes, clones) hold no
    /// names of subdirectories any more (see `fsx::walk`), so there is no budget of
    /// them to bound (it was 256 MiB by default).
    pub max_walk_names_bytes: u64,
    /// No longer used, accepted so that config files that set it still load (see
    /// `max_walk_names_bytes`).
    pub max_walk_names_bytes_per_walk: Option<u64>,
}

/// The longest any `[storage]` time may be: a year. Past it a time is a mistake,
/// and one near `u64::MAX` overflowed where it was added to the clock: upload
/// sessions answered with a panic's text after their reservation was kept, tokens
/// were issued already expired, every tus `PATCH` panicked (an outside tester's
/// find).
pub const MAX_SECS: u64 = 365 * 86_400;

impl StorageSection {
    /// Refuses a time past [`MAX_SECS`], naming the key.
    pub fn check_times(&self) -> Result<(), String> {
        for (key, secs) in [
            ("session_expire_secs", self.session_expire_secs),
            ("upload_expire_secs", self.upload_expire_secs),
            ("cleanup_interval_secs", self.cleanup_interval_secs),
            ("stall_timeout_secs", self.stall_timeout_secs),
            ("header_read_timeout_secs", self.header_read_timeout_secs),
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("body_read_timeout_secs", self.body_read_timeout_secs),
            ("quota_usage_max_age_secs", self.quota_usage_max_age_secs),
        ] {
            if secs > MAX_SECS {
                return Err(format!(
                    "[storage] {key} = {secs}: at most {MAX_SECS} (a year)"
                ));
            }
        }
        Ok(())
    }
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
            stall_timeout_secs: 60,
            min_body_rate: 500,
            header_read_timeout_secs: 10,
            idle_timeout_secs: 75,
            max_connections: 4096,
            max_connections_per_address: None,
            max_archive_streams: 64,
            max_archive_streams_per_address: None,
            max_delete_paths: 1000,
            scandir_limit: 1000,
            max_walk_names_bytes: 256 << 20,
            max_walk_names_bytes_per_walk: None,
            body_read_timeout_secs: 30,
            quota_usage_max_age_secs: 60,
        }
    }
}

/// `[secrets]` of the storage-proxy.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSecrets {
    /// Manager-facing auth token. Each secret here may be given inline, as `{ file
    /// = "/abs/path" }` or as `{ env = "VAR" }` ([`appproxy_shared::secret`]).
    #[serde(deserialize_with = "appproxy_shared::secret::deserialize")]
    pub manager_token: String,
    /// Key of client session JWTs.
    #[serde(deserialize_with = "appproxy_shared::secret::deserialize")]
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
    /// The secrets come from where operators keep them, as the other services'.
    #[test]
    fn the_secrets_come_from_files_and_the_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "manager-token\n").expect("write");
        std::env::set_var("APPPROXY_STORAGE_TEST_SESSION_SECRET", "session-from-env");
        let config: super::StorageConfig = appproxy_shared::config::from_toml(&format!(
            "[secrets]\nmanager_token = {{ file = {:?} }}\nsession_secret = {{ env = \"APPPROXY_STORAGE_TEST_SESSION_SECRET\" }}\n",
            token.display().to_string()
        ))
        .expect("parses");
        assert_eq!(config.secrets.manager_token, "manager-token");
        assert_eq!(config.secrets.session_secret, "session-from-env");
        let err = appproxy_shared::config::from_toml::<super::StorageConfig>(
            "[secrets]\nmanager_token = { env = \"APPPROXY_STORAGE_TEST_UNSET\" }\n",
        )
        .expect_err("unset");
        assert!(err.contains("secrets.manager_token"), "{err}");
    }

    /// `--print-default-config` shows every key the storage-proxy takes, set or
    /// commented (the OTLP keys and the archive share per address were taken but
    /// not shown).
    #[test]
    fn the_default_config_shows_every_key() {
        appproxy_test_support::config::assert_every_key_shown(
            &super::StorageConfig::default_toml(),
            &|text| appproxy_shared::config::from_toml::<super::StorageConfig>(text).map(drop),
        );
    }

    /// `--print-default-config` shows the keys without a default commented out;
    /// uncommenting any one of them (or an optional section, header and keys)
    /// gives a config that reads.
    #[test]
    fn every_commented_key_of_the_default_config_reads_once_uncommented() {
        let text = super::StorageConfig::default_toml();
        let variants = appproxy_test_support::config::uncommented_one_by_one(&text);
        for (key, one) in &variants {
            appproxy_shared::config::from_toml::<super::StorageConfig>(one)
                .unwrap_or_else(|e| panic!("{key} does not read: {e}\n{one}"));
        }
        assert!(variants.len() >= 4, "{text}");
    }

    use super::*;

    /// Every `[storage]` time is at most a year, named when it is not; a year is
    /// taken.
    #[test]
    fn storage_times_are_at_most_a_year() {
        for key in [
            "session_expire_secs",
            "upload_expire_secs",
            "cleanup_interval_secs",
            "stall_timeout_secs",
            "header_read_timeout_secs",
            "idle_timeout_secs",
            "body_read_timeout_secs",
            "quota_usage_max_age_secs",
        ] {
            for (secs, ok) in [(MAX_SECS, true), (MAX_SECS + 1, false), (u64::MAX, false)] {
                let config: StorageConfig =
                    appproxy_shared::config::from_toml(&format!("[storage]\n{key} = {secs}\n"))
                        .expect("reads");
                match config.storage.check_times() {
                    Ok(()) => assert!(ok, "{key} = {secs} taken"),
                    Err(e) => {
                        assert!(!ok, "{key} = {secs}: {e}");
                        assert!(e.contains(key) && e.contains("a year"), "{e}");
                    }
                }
            }
        }
    }

    /// The common mistakes, each refused with the file, the key path, what was
    /// expected and, for a misspelling, the fix.
    #[test]
    fn config_mistakes_name_the_file_the_key_and_the_fix() {
        let storage: &[appproxy_test_support::config::Mistake] = &[
            (
                "unknown key",
                "[storage]\nnode_idd = \"n\"\n",
                &[
                    "storage",
                    "unknown field `node_idd`",
                    "did you mean `node_id`?",
                ],
            ),
            (
                "missing required key",
                "[[volumes]]\nname = \"local\"\n",
                &["volumes[0]", "missing field `path`"],
            ),
            (
                "port outside the range",
                "[storage]\nclient_bind = \"0.0.0.0:99999\"\n",
                &["storage.client_bind", "line 2", "socket address"],
            ),
            (
                "negative size",
                "[storage]\nmax_upload_size = -1\n",
                &["storage.max_upload_size", "line 2"],
            ),
        ];
        appproxy_test_support::config::assert_mistakes_refused("storage", storage, &|p| {
            appproxy_control_common::config::load::<StorageConfig>(p)
                .err()
                .map(|e| e.to_string())
        });
    }

    #[test]
    fn defaults_round_trip() {
        let text = toml::to_string_pretty(&StorageConfig::default()).expect("toml");
        assert_eq!(
            toml::from_str::<StorageConfig>(&text).expect("parse"),
            StorageConfig::default()
        );
    }
}
