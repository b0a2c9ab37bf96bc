//! Quota scopes (`user:<uuid>`, `project:<uuid>`): a byte limit per scope, kept in
//! `<scope>/.quota`, checked when an upload session is created; usage is measured by
//! walking the scope (the periodic sync keeps a cached figure fresh).

use std::path::Path;

use super::{ApiError, State};

const QUOTA_FILE: &str = ".quota";

/// The scope's byte limit, if one is set.
pub fn limit(scope: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(scope.join(QUOTA_FILE)).ok()?;
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()?
        .get("limit_bytes")?
        .as_u64()
}

/// Sets (or, with `None`, removes) the scope's byte limit.
pub fn set_limit(scope: &Path, limit: Option<u64>) -> std::io::Result<()> {
    std::fs::create_dir_all(scope)?;
    match limit {
        Some(l) => std::fs::write(
            scope.join(QUOTA_FILE),
            serde_json::json!({"limit_bytes": l}).to_string(),
        ),
        None => match std::fs::remove_file(scope.join(QUOTA_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// Files and bytes under `dir` (symlinks not followed), descending only into
/// directories whose name `descend` accepts.
pub fn walk(dir: &Path, descend: impl Fn(&std::ffi::OsStr) -> bool) -> (u64, u64) {
    let mut stack = vec![dir.to_path_buf()];
    let (mut files, mut bytes) = (0, 0);
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                if descend(&e.file_name()) {
                    stack.push(e.path());
                }
            } else {
                files += 1;
                bytes += meta.len();
            }
        }
    }
    (files, bytes)
}

/// Bytes used under the scope (staging files of uploads in progress included; the
/// `.quota` file itself not).
pub fn usage(scope: &Path) -> u64 {
    let own = std::fs::metadata(scope.join(QUOTA_FILE)).map_or(0, |m| m.len());
    walk(scope, |_| true).1.saturating_sub(own)
}

/// Refuses `add` more bytes in the scope when that would pass its limit.
pub fn check(state: &State, scope: &Path, add: u64) -> Result<(), ApiError> {
    let Some(limit) = limit(scope) else {
        return Ok(());
    };
    let used = usage(scope);
    if let Ok(mut cache) = state.usage.lock() {
        cache.insert(scope.to_path_buf(), used);
    }
    if used.saturating_add(add) > limit {
        return Err(ApiError::QuotaExceeded { used, limit });
    }
    Ok(())
}

/// One usage-sync pass over every scope of every volume (blocking); returns how
/// many scopes were measured.
pub fn sync(state: &State) -> usize {
    let mut measured = 0;
    for name in state.volumes.names() {
        let Ok(root) = state.volumes.root(name) else {
            continue;
        };
        let Ok(scopes) = std::fs::read_dir(root) else {
            continue;
        };
        for s in scopes.flatten() {
            if !s.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let used = usage(&s.path());
            if let Ok(mut cache) = state.usage.lock() {
                cache.insert(s.path(), used);
            }
            tracing::debug!(scope = %s.file_name().to_string_lossy(), used, limit = limit(&s.path()), "quota scope measured");
            measured += 1;
        }
    }
    measured
}
