//! Usage reports without a walk per request. `/folder/usage` and
//! `/folder/used-bytes` report the same figure (files and bytes of a vfolder, per
//! name, its staging area left out) and `GET /quota-scope` the bytes of a scope;
//! each is a walk of a tree a user with a shell can fill with a million entries,
//! and the manager polls them. So:
//!
//! - **One walk at a time per folder (single-flight).** A report that needs a walk
//!   waits (asynchronously, holding no thread) for the walk of that folder in
//!   progress, if any, and takes its result when nothing changed through the API
//!   since that walk began; otherwise it walks itself, on the blocking pool, holding
//!   no lock a commit or a delete needs.
//! - **A short-lived cache.** A vfolder's figure is served again while its walk
//!   began at most `[storage] quota_usage_max_age_secs` ago (the bound the quota
//!   checks already use for their measurement) and nothing changed through the API
//!   since: an upload completed, a delete, a rename, a move, a clone into it, and
//!   what changes how its staging area counts (a reservation let go, a PATCH's
//!   bytes no reservation holds, the cleanup removing a staged file). Those count
//!   as a change of the folder, so the next report walks again and sees them at
//!   once. What a container or the host writes behind the proxy's back shows at
//!   the latest when the figure is that old. With `quota_usage_max_age_secs = 0`
//!   every report walks (concurrent ones still share one walk).
//! - **Bounded.** At most [`MAX_FOLDERS`] folders are remembered; past that the
//!   figures not in use are forgotten, oldest first.
//! - **Never partial.** A walk that did not see the whole tree (see
//!   `quota::measured`) gives no figure: the reports that waited for it get its
//!   503 `usage-unmeasured`, and the next report walks again.
//!
//! Walks are counted at `/metrics` (`storage_proxy_usage_walks_total`, by report,
//! and `storage_proxy_usage_walk_duration_seconds`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::ApiError;

/// Folders whose last figure is remembered at most.
pub const MAX_FOLDERS: usize = 4096;

/// The last result of a walk, and the walk of one tree, one at a time.
pub struct Flight<T> {
    last: Mutex<Last<T>>,
    /// Held by the walk in progress; reports that need one wait here.
    running: Arc<tokio::sync::Mutex<()>>,
}

struct Last<T> {
    /// The figure, when its walk began, and the changes counted by then.
    value: Option<(T, Instant, u64)>,
    /// Changes made through the API so far.
    changes: u64,
    /// Walks finished so far.
    walks: u64,
    /// Walks that did not see the whole tree (answered
    /// [`ApiError::Unmeasured`]) so far, and the last one's reason: reports that
    /// waited for such a walk get its answer rather than walking again one after
    /// another.
    unmeasured: (u64, Option<String>),
}

impl<T> Default for Flight<T> {
    fn default() -> Self {
        Self {
            last: Mutex::new(Last {
                value: None,
                changes: 0,
                walks: 0,
                unmeasured: (0, None),
            }),
            running: Default::default(),
        }
    }
}

impl<T: Clone + Send + 'static> Flight<T> {
    fn last(&self) -> std::sync::MutexGuard<'_, Last<T>> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tree changed through the API: a figure from a walk that began before is
    /// not served again.
    pub fn changed(&self) {
        self.last().changes += 1;
    }

    /// Whether a walk is running or waited for (a folder so busy is not forgotten).
    fn busy(self: &Arc<Self>) -> bool {
        Arc::strong_count(self) > 1 || self.running.try_lock().is_err()
    }

    /// The figure: the last one while its walk began at most `max_age` ago and no
    /// change came since; else the result of the walk in progress when it ends, if
    /// no change came between its start and this call; else a walk of its own
    /// (`walk`, on the blocking pool). The walk runs to its end even when the caller
    /// goes, and its result serves the next report. A walk that could not measure
    /// the tree ([`ApiError::Unmeasured`]) serves nothing later, but answers the
    /// reports that waited for it.
    pub async fn get(
        self: Arc<Self>,
        max_age: Duration,
        walk: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let (asked, seen, failed) = {
            let last = self.last();
            match &last.value {
                Some((v, began, at)) if *at == last.changes && began.elapsed() <= max_age => {
                    return Ok(v.clone())
                }
                _ => (last.changes, last.walks, last.unmeasured.0),
            }
        };
        let running = self.running.clone().lock_owned().await;
        {
            let last = self.last();
            // A walk ended while this waited; it began after every change this saw.
            if let (Some((v, _, at)), true) = (&last.value, last.walks != seen) {
                if *at >= asked {
                    return Ok(v.clone());
                }
            }
            // The last walk that ended while this waited could not measure the tree.
            if let (Some(why), true) = (&last.unmeasured.1, last.unmeasured.0 != failed) {
                return Err(ApiError::Unmeasured(why.clone()));
            }
        }
        super::blocking(move || {
            let _running = running;
            let (began, at) = (Instant::now(), self.last().changes);
            let v = match walk() {
                Ok(v) => v,
                Err(e) => {
                    if let ApiError::Unmeasured(why) = &e {
                        let mut last = self.last();
                        last.unmeasured = (last.unmeasured.0 + 1, Some(why.clone()));
                    }
                    return Err(e);
                }
            };
            let mut last = self.last();
            last.unmeasured.1 = None;
            last.value = Some((v.clone(), began, at));
            last.walks += 1;
            Ok(v)
        })
        .await
    }
}

/// A vfolder's figure: files and bytes.
pub type FolderFlight = Flight<(u64, u64)>;

/// Files and bytes per vfolder, as `/folder/usage` reports them.
#[derive(Default)]
pub struct Folders {
    folders: Mutex<HashMap<PathBuf, Arc<FolderFlight>>>,
}

impl Folders {
    /// The flight of a folder (by its path), made if missing. At the bound, figures
    /// no report is using are forgotten, the oldest first, down to three quarters
    /// of it; when every one is in use the folder gets a flight of its own that is
    /// not remembered.
    pub fn of(&self, key: &Path) -> Arc<FolderFlight> {
        let mut folders = self.folders.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = folders.get(key) {
            return f.clone();
        }
        if folders.len() >= MAX_FOLDERS {
            let mut idle: Vec<(Option<Instant>, PathBuf)> = folders
                .iter()
                .filter(|(_, f)| !f.busy())
                .map(|(k, f)| (f.last().value.as_ref().map(|v| v.1), k.clone()))
                .collect();
            idle.sort();
            let excess = folders.len() - MAX_FOLDERS * 3 / 4;
            for (_, k) in idle.into_iter().take(excess) {
                folders.remove(&k);
            }
            if folders.len() >= MAX_FOLDERS {
                return Arc::default();
            }
        }
        folders.entry(key.to_path_buf()).or_default().clone()
    }

    /// A folder changed through the API (see [`Flight::changed`]).
    pub fn changed(&self, key: &Path) {
        let f = self
            .folders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned();
        if let Some(f) = f {
            f.changed();
        }
    }

    /// Every folder under `dir` changed (a scope whose sessions' reservations were
    /// let go: their staged files count in their folders' usage from then on).
    pub fn changed_under(&self, dir: &Path) {
        let under: Vec<Arc<FolderFlight>> = self
            .folders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(k, _)| k.starts_with(dir))
            .map(|(_, f)| f.clone())
            .collect();
        for f in under {
            f.changed();
        }
    }

    /// Folders remembered now.
    pub fn len(&self) -> usize {
        self.folders.lock().map_or(0, |f| f.len())
    }

    /// Whether no folder is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_remembered_are_bounded_and_one_in_use_is_kept() {
        let folders = Folders::default();
        let busy = folders.of(Path::new("/busy"));
        for i in 0..MAX_FOLDERS * 3 {
            drop(folders.of(&PathBuf::from(format!("/v/{i}"))));
            assert!(folders.len() <= MAX_FOLDERS);
        }
        assert!(Arc::ptr_eq(&busy, &folders.of(Path::new("/busy"))));
    }
}
