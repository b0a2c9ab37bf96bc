//! Reading the config files of the coordinator and the storage-proxy: TOML → typed
//! structs (`#[serde(default)]`, unknown keys refused) with errors naming the file,
//! paths relative to their file, and the `[redis]` section both have.

use std::path::{Path, PathBuf};

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

/// A path from a config file, taken relative to the file's directory when it is
/// relative (so a service reads the same files whatever its working directory).
pub fn relative_to(config: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_owned();
    }
    config.parent().unwrap_or(Path::new(".")).join(path)
}

/// `[redis]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSection {
    /// `redis://…`; absent → single node, no events.
    pub url: Option<String>,
}
