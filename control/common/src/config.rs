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
    /// `redis://…`; absent → single node, no events. May be given as a secret is
    /// (`{ file = … }`, `{ env = … }`, [`appproxy_shared::secret`]): it may hold a
    /// password.
    #[serde(deserialize_with = "appproxy_shared::secret::deserialize_opt")]
    pub url: Option<String>,
}

/// `url` as it may be shown (an error, a log line): the credentials of its user
/// part (`redis://user:secret@host`, `redis://:secret@host`) and the values of
/// `password=` or `pass=` in its query replaced by `***`.
pub fn shown_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    // A password may hold `/`, `?` or `#` (base64): everything up to the last `@`
    // is taken for the user part, at worst hiding more than it must.
    let (authority, tail) = match rest.rsplit_once('@') {
        Some((_, after)) => {
            let end = after.find(['/', '?', '#']).unwrap_or(after.len());
            (format!("***@{}", &after[..end]), &after[end..])
        }
        None => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            (rest[..end].to_owned(), &rest[end..])
        }
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _))
                        if name.eq_ignore_ascii_case("password")
                            || name.eq_ignore_ascii_case("pass") =>
                    {
                        format!("{name}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    if url.contains("://") {
        format!("{scheme}://{authority}{tail}")
    } else {
        format!("{authority}{tail}")
    }
}

#[cfg(test)]
mod shown_url_tests {
    use super::shown_url;

    #[test]
    fn credentials_in_a_url_are_never_shown() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379/", "redis://127.0.0.1:6379/"),
            (
                "redis://:s3cret@127.0.0.1:6379/",
                "redis://***@127.0.0.1:6379/",
            ),
            ("redis://app:s3cret@h:6379/0", "redis://***@h:6379/0"),
            ("rediss://app:p@ss@h", "rediss://***@h"),
            (
                "redis://h?password=s3cret&db=1",
                "redis://h?password=***&db=1",
            ),
            (
                "redis+unix:///run/r.sock?db=2&pass=s3cret",
                "redis+unix:///run/r.sock?db=2&pass=***",
            ),
            ("redis://:ab/cd?e#f@h:6379/0", "redis://***@h:6379/0"),
            (
                "redis://:s3cret/x@h?password=s3cret",
                "redis://***@h?password=***",
            ),
        ] {
            assert_eq!(shown_url(url), shown, "{url}");
            assert!(!shown_url(url).contains("s3cret"));
        }
    }
}
