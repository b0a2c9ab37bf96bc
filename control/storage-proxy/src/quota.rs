//! Quota scopes (`user:<uuid>`, `project:<uuid>`): a byte limit per scope, kept in
//! `<scope>/.quota`, enforced as a reservation. An upload session reserves its whole
//! size when it is created (refused with 413 when committed bytes plus every
//! reservation of the scope would pass the limit); every PATCH checks again against
//! the current limit; completion (the rename and the release in one step under the
//! scope's lock) and expiry release it. A clone reserves the source's size in the
//! destination scope while it copies; its destination directory is left out of
//! committed bytes until the copy ends and the reservation is released, in one step. Check-and-reserve runs
//! under the scope's lock, so concurrent sessions never oversubscribe the limit.
//! Scope directories are opened by descriptor from the volume root (no symlink
//! followed); usage walks never follow a symlink.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd as _, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rustix::fs::{Mode, OFlags};

use super::{fsx, ApiError, State};

const QUOTA_FILE: &str = ".quota";
const STAGING: &str = ".upload";

/// The scope's byte limit, if one is set.
pub fn limit(scope: BorrowedFd<'_>) -> Option<u64> {
    let fd = fsx::open(
        scope,
        &[QUOTA_FILE.into()],
        OFlags::RDONLY | OFlags::NOFOLLOW,
        fsx::STRICT,
    )
    .ok()?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut text).ok()?;
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()?
        .get("limit_bytes")?
        .as_u64()
}

/// Sets (or, with `None`, removes) the scope's byte limit; the file is replaced
/// atomically.
pub fn set_limit(scope: BorrowedFd<'_>, limit: Option<u64>) -> std::io::Result<()> {
    match limit {
        Some(l) => {
            let tmp = format!("{QUOTA_FILE}.{}", uuid::Uuid::new_v4().simple());
            let fd = rustix::fs::openat2(
                scope,
                tmp.as_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o644),
                fsx::STRICT,
            )?;
            let mut f = std::fs::File::from(fd);
            std::io::Write::write_all(
                &mut f,
                serde_json::json!({"limit_bytes": l}).to_string().as_bytes(),
            )?;
            f.sync_all()?;
            rustix::fs::renameat(scope, tmp.as_str(), scope, QUOTA_FILE)?;
            Ok(())
        }
        None => match rustix::fs::unlinkat(scope, QUOTA_FILE, rustix::fs::AtFlags::empty()) {
            Err(e) if e != rustix::io::Errno::NOENT => Err(e.into()),
            _ => Ok(()),
        },
    }
}

/// Bytes under the scope (staging files of uploads in progress included; the
/// `.quota` file itself not).
pub fn usage(scope: BorrowedFd<'_>) -> u64 {
    let own = rustix::fs::statat(scope, QUOTA_FILE, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
        .map_or(0, |s| s.st_size as u64);
    fsx::usage(scope, &|_| true).1.saturating_sub(own)
}

/// Bytes committed under the scope: everything but staging areas, `.quota`, and
/// the directories in `pending` (`(dev, ino)` of clone destinations being filled,
/// whose bytes their reservation already holds).
pub fn committed(scope: BorrowedFd<'_>, pending: &HashSet<(u64, u64)>) -> u64 {
    let own = rustix::fs::statat(scope, QUOTA_FILE, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
        .map_or(0, |s| s.st_size as u64);
    fsx::usage(scope, &|e| {
        e.name != STAGING && !pending.contains(&(e.stat.st_dev, e.stat.st_ino))
    })
    .1
    .saturating_sub(own)
}

/// Records a scope's limit as last read, for `/metrics` (`None`: no limit).
pub fn remember_limit(state: &State, key: &Path, limit: Option<u64>) {
    if let Ok(mut limits) = state.quota_limits.lock() {
        match limit {
            Some(l) => {
                limits.insert(key.to_path_buf(), l);
            }
            None => {
                limits.remove(key);
            }
        }
    }
}

/// One reservation.
struct Held {
    scope: PathBuf,
    bytes: u64,
    touched: Instant,
}

/// Reservations of every scope, by holder (an upload session or a clone).
#[derive(Default)]
pub struct Reservations {
    held: Mutex<HashMap<String, Held>>,
    locks: Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>,
    /// Clone destinations being filled (`(dev, ino)`), left out of committed bytes
    /// while their reservation holds them.
    pending: Mutex<HashSet<(u64, u64)>>,
}

impl Reservations {
    fn lock_of(&self, scope: &Path) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(scope.to_path_buf()).or_default().clone()
    }

    fn reserved(&self, scope: &Path, except: &str) -> u64 {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.iter()
            .filter(|(k, h)| h.scope == scope && k.as_str() != except)
            .map(|(_, h)| h.bytes)
            .sum()
    }

    /// Runs `commit` (the rename that puts a holder's bytes in place) and releases
    /// the holder's reservation in the same step under the scope's lock, so a
    /// concurrent check never counts those bytes twice (as committed and reserved).
    pub fn commit<T>(
        &self,
        scope: &Path,
        holder: &str,
        commit: impl FnOnce() -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let lock = self.lock_of(scope);
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let done = commit()?;
        self.release(holder);
        Ok(done)
    }

    /// Runs `measure` and reads the scope's reservations under the scope's lock, so
    /// the two agree: no holder's bytes move from reserved to committed in between.
    pub fn consistent<T>(&self, scope: &Path, measure: impl FnOnce() -> T) -> (T, u64) {
        let lock = self.lock_of(scope);
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let measured = measure();
        (measured, self.reserved(scope, ""))
    }

    /// Leaves a directory (a clone destination being filled) out of committed bytes
    /// until `unpend`.
    pub fn pend(&self, dir: (u64, u64)) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.insert(dir);
    }

    /// Counts a directory's bytes as committed again.
    pub fn unpend(&self, dir: (u64, u64)) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.remove(&dir);
    }

    fn pending(&self) -> HashSet<(u64, u64)> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Releases a holder's reservation.
    pub fn release(&self, holder: &str) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.remove(holder).is_some() {
            tracing::debug!(holder, "quota reservation released");
        }
    }

    /// Releases reservations not used for longer than `idle`, except those `busy`
    /// says are in use (a PATCH in progress); returns how many.
    pub fn expire(&self, idle: std::time::Duration, busy: impl Fn(&str) -> bool) -> usize {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let before = held.len();
        held.retain(|k, h| h.touched.elapsed() <= idle || busy(k));
        before - held.len()
    }

    /// Bytes reserved in every scope now.
    pub fn all(&self) -> u64 {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.values().map(|h| h.bytes).sum()
    }

    /// Bytes reserved in a scope now.
    pub fn total(&self, scope: &Path) -> u64 {
        self.reserved(scope, "")
    }
}

/// Reserves (or, when `holder` already holds one, re-checks) `bytes` in the scope
/// for `holder`: refused when committed bytes plus every reservation would pass the
/// scope's current limit. Without a limit nothing is held. Blocking (walks the scope).
pub fn reserve(
    state: &State,
    key: &Path,
    scope: BorrowedFd<'_>,
    holder: &str,
    bytes: u64,
) -> Result<(), ApiError> {
    let r = &state.reservations;
    let lock = r.lock_of(key);
    let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    let limit = limit(scope);
    remember_limit(state, key, limit);
    let Some(limit) = limit else {
        r.release(holder);
        return Ok(());
    };
    let committed = committed(scope, &r.pending());
    if let Ok(mut cache) = state.usage.lock() {
        cache.insert(key.to_path_buf(), committed);
    }
    let used = committed.saturating_add(r.reserved(key, holder));
    if used.saturating_add(bytes) > limit {
        r.release(holder);
        super::Metrics::add(&state.metrics.quota_refused, 1);
        return Err(ApiError::QuotaExceeded { used, limit });
    }
    let mut held = r.held.lock().unwrap_or_else(|e| e.into_inner());
    held.insert(
        holder.to_owned(),
        Held {
            scope: key.to_path_buf(),
            bytes,
            touched: Instant::now(),
        },
    );
    Ok(())
}

/// One usage-sync pass over every scope of every volume (blocking); returns how
/// many scopes were measured.
pub fn sync(state: &State) -> usize {
    let mut measured = 0;
    for name in state.volumes.names() {
        let (Ok(root), Ok(path)) = (state.volumes.root_fd(name), state.volumes.root(name)) else {
            continue;
        };
        let Ok(scopes) = fsx::entries(root) else {
            continue;
        };
        for s in scopes {
            if s.kind() != rustix::fs::FileType::Directory {
                continue;
            }
            let Ok(fd) = fsx::child_dir(root, &s.name) else {
                continue;
            };
            let used = committed(fd.as_fd(), &state.reservations.pending());
            if let Ok(mut cache) = state.usage.lock() {
                cache.insert(path.join(&s.name), used);
            }
            let limit = limit(fd.as_fd());
            remember_limit(state, &path.join(&s.name), limit);
            tracing::debug!(scope = %s.name.to_string_lossy(), used, limit, "quota scope measured");
            measured += 1;
        }
    }
    measured
}
