//! Quota scopes (`user:<uuid>`, `project:<uuid>`): a byte limit per scope, kept in
//! `<scope>/.quota`, enforced as a reservation. An upload session reserves its whole
//! size when it is created (refused with 413 when committed bytes plus every
//! reservation of the scope would pass the limit); every PATCH checks again against
//! the current limit; completion (the rename and the release in one step under the
//! scope's lock) and expiry release it. A clone reserves the source's size in the
//! destination scope while it copies; its destination directory is left out of
//! committed bytes until the copy ends and the reservation is released, in one step.
//! Check-and-reserve runs under the scope's lock, so concurrent sessions never
//! oversubscribe the limit. Scope directories are opened by descriptor from the
//! volume root (no symlink followed); usage walks never follow a symlink.
//!
//! A scope's directory is `<volume root>/<scope UUID, 32 hex>`, as the platform's
//! vfs backend names it (see `volume::Vfid::scope_name`). An old-style vfolder (a
//! vfid with no scope) lies directly under the volume root, as on the platform, and
//! belongs to no scope: no limit, nothing reserved, nothing measured (unlimited, as
//! the platform has it). The volume root is never opened, limited or walked as a
//! scope: that would walk every scope of the volume.
//!
//! **Committed bytes are measured, not walked per check.** A walk of the scope costs
//! one `stat` per entry, and a user with a shell can put a million empty files in a
//! scope; walking on every PATCH would make every upload of the scope pay for them,
//! serialized under the scope's lock. So each scope keeps one measurement: the
//! bytes a walk found, stamped with when the walk began, and adjusted under the
//! scope's lock by every commit the proxy makes (the bytes of a completed upload or
//! a finished clone are added in the same step that releases its reservation). A
//! check (session creation, every PATCH, a clone) uses the measurement when it began
//! at most `[storage] quota_usage_max_age_secs` ago (default 60 s); otherwise it
//! waits for a walk: at most one walk of a scope runs at a time, on the blocking
//! pool and outside the scope's lock, and checks that need one meanwhile wait for
//! it (asynchronously, holding no thread) and take its result. The usage-sync pass
//! (every `cleanup_interval_secs`) measures the scopes no check did. The number of
//! walks is at most one per scope per `quota_usage_max_age_secs` plus one per sync
//! pass, however many PATCHes there are (`storage_proxy_quota_walks_total`).
//!
//! What may be stale, and by how much: only what the proxy did not do itself.
//! Reservations are in memory and exact, and bytes the proxy puts in place (and
//! what a PATCH writes that no reservation holds, [`Reservations::grew`]) are
//! added to the measurement at once (a walk in progress adds those put in place
//! while it ran, so it may count them twice until the next walk: the safe side). A
//! delete through the manager API, and a rename, a move or an upload's completion
//! that replaces a file, has the next check measure again ([`Reservations::removed`]),
//! so the room it frees shows at once. Bytes written, removed or replaced behind the
//! proxy's back (from a container, on the host) show in the next walk: a check sees them at the
//! latest when they are `quota_usage_max_age_secs` old, or, when it joined a walk
//! that was running, when they predate that walk's start. Until then writes from a
//! container may pass the limit by what they add (they are never held by a
//! reservation anyway: the vfs backend has no kernel quota), and removals free
//! room that late. With `quota_usage_max_age_secs = 0` every check measures
//! (concurrent checks still share one walk).
//!
//! A walk that did not see the whole scope (a directory it could not open, one
//! moved while it was below it, a tree deeper than a walk goes
//! (`fsx::WALK_LEVELS`): a user can cause each from a shell) counts for nothing
//! (one that only saw the tree change under it, where a file renamed back and
//! forth could hide from it, is walked again and the largest count taken,
//! `fsx::Unsettled`): it is made again, at most `WALK_TRIES` times in all ([`measured`]),
//! and when no try saw everything nothing is stored, and the check (and the checks
//! that waited for that walk) answers 503 `usage-unmeasured` rather than admitting
//! anything on a partial count. The usage reports follow the same rule.
//!
//! `GET /quota-scope` reports from the same measurement (see [`report`]): no walk
//! of the scope per report, and the same figures the check adds up.
//!
//! What counts: the apparent size (`st_size`) of every entry that is not a
//! directory, each inode once however many hard links it has inside the scope (by
//! device and inode, as `du` does; only inodes with more than one link are
//! remembered during a walk, and each is forgotten once all its links were seen).
//! Apparent size, not allocated blocks: reservations and the upload sizes they hold
//! are apparent sizes, a clone or a download turns a sparse file into its apparent
//! size, it is what the original counts, and it is the same figure on every
//! filesystem (allocated blocks vary with block size, compression, deduplication,
//! copy-on-write and delayed allocation). A sparse 1 TB file counts 1 TB; space
//! preallocated past the end of a file (`fallocate` with `KEEP_SIZE`) counts
//! nothing. Left out: what live upload sessions' reservations hold of their staged
//! files (below), the `.quota` file, and clone destinations being filled.
//!
//! **The staging area counts, but for what live uploads hold.** A vfolder's
//! `.upload` is in the vfolder: a user with a shell can write there, so it counts
//! like any other directory, except that of a regular file directly in it named
//! after a session holding a reservation of the scope in this proxy ([`Live`]), its
//! first bytes up to the reservation's size are left out (each session once per
//! scope: the reservation holds them). Everything else there counts: what a user
//! put there, what a staged file holds past its reservation, and the staged files
//! of sessions holding none (a scope without a limit, after a restart, after a
//! refused check, once idle). A session that reserves again has what the walk
//! counted of its staged file taken off the measurement (`Measured::unheld`), and a
//! check that lets a reservation go adds what it held of the staged file, both in
//! the same step under the scope's lock: never counted twice, never left out.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd as _, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
            let fd = fsx::openat2(
                scope,
                tmp.as_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o644),
                fsx::STRICT,
            )?;
            let mut f = std::fs::File::from(fd);
            let written = std::io::Write::write_all(
                &mut f,
                serde_json::json!({"limit_bytes": l}).to_string().as_bytes(),
            )
            .and_then(|()| f.sync_all())
            .and_then(|()| {
                Ok(rustix::fs::renameat(
                    scope,
                    tmp.as_str(),
                    scope,
                    QUOTA_FILE,
                )?)
            });
            if written.is_err() {
                // Not left behind to be counted in the scope's usage (the disk full,
                // say, or the rename refused).
                let _ = rustix::fs::unlinkat(scope, tmp.as_str(), rustix::fs::AtFlags::empty());
            }
            written
        }
        None => match rustix::fs::unlinkat(scope, QUOTA_FILE, rustix::fs::AtFlags::empty()) {
            Err(e) if e != rustix::io::Errno::NOENT => Err(e.into()),
            _ => Ok(()),
        },
    }
}

/// Depth below a scope directory of a vfolder's staging area
/// (`<scope>/<xx>/<yy>/<rest>/.upload`).
const STAGING_DEPTH: usize = 3;

/// Whether `name` may be an upload session's staged file: 32 hex digits, as the
/// proxy names them (an upload token's `session`).
pub fn session_name(name: &std::ffi::OsStr) -> bool {
    name.len() == 32 && name.as_encoded_bytes().iter().all(u8::is_ascii_hexdigit)
}

/// Upload sessions of a scope that hold a reservation in this proxy (live), by
/// session: the bytes held, which cover as much of the session's staged file.
pub type Live = HashMap<String, u64>;

/// How much of a staging area's file the live sessions cover, each session once
/// (a file of the same name in another vfolder of the scope counts whole).
struct Cover<'a> {
    live: &'a Live,
    used: HashSet<String>,
}

impl<'a> Cover<'a> {
    fn new(live: &'a Live) -> Self {
        Self {
            live,
            used: HashSet::new(),
        }
    }

    /// Bytes of `e` (an entry of a staging area) a live session's reservation holds:
    /// its first `n` bytes when it is a regular file named after a live session
    /// not seen yet; `None` for anything else.
    fn file(&mut self, e: &fsx::Entry) -> Option<u64> {
        if e.kind() != rustix::fs::FileType::RegularFile {
            return None;
        }
        let name = e.name.to_str()?;
        let held = *self.live.get(name)?;
        self.used.insert(name.to_owned()).then_some(held)
    }
}

/// Files and bytes of a vfolder, per name (what `/folder/usage` reports), by the
/// rule committed bytes follow: its staging area counts but for what live upload
/// sessions' reservations hold of their staged files (see [`committed`]).
pub fn vfolder_usage(vfolder: BorrowedFd<'_>, live: &Live) -> std::io::Result<(u64, u64)> {
    let mut cover = Cover::new(live);
    let mut file = |e: &fsx::Entry| cover.file(e);
    fsx::usage_covered(
        vfolder,
        fsx::Links::PerName,
        &|_, _| true,
        fsx::Covered {
            dir: &|e, depth| depth == 0 && e.name == STAGING,
            file: &mut file,
            settled: false,
        },
    )
}

/// Session-named staged files a walk counted whole (no reservation held them when
/// it looked) and the bytes it counted: a session that reserves later (a PATCH
/// after a restart, or after its reservation was let go) has them taken off the
/// measurement. Remembered for at most this many sessions per scope (a user with a
/// shell can make any number of such names, and the memory must not be theirs to
/// choose); past that they stay counted (the safe side).
const MAX_UNHELD: usize = 1_000;

/// Bytes committed under the scope: everything but `.quota`, the directories in
/// `pending` (`(dev, ino)` of clone destinations being filled, whose bytes their
/// reservation already holds) and, of each live upload session's staged file
/// (`<vfolder>/.upload/<session>`, a regular file, with `live` holding a
/// reservation for it), as many bytes as the reservation holds. Everything else in
/// a staging area counts: files a user put there, sessions of no reservation (made
/// before a restart, expired, let go) and what a staged file holds past its
/// reservation. A file with several hard links in the scope counts once (by device
/// and inode, as `du` does); sizes are apparent sizes (`st_size`). Also returns the
/// session-named staged files counted whole, with the bytes counted (at most
/// `MAX_UNHELD`). A walk that did not see the whole scope is an error (see
/// [`fsx::usage`]).
pub fn committed(
    scope: BorrowedFd<'_>,
    pending: &HashSet<(u64, u64)>,
    live: &Live,
) -> std::io::Result<(u64, HashMap<String, u64>)> {
    let own = rustix::fs::statat(scope, QUOTA_FILE, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
        .map_or(0, |s| s.st_size as u64);
    // A walk that saw the tree change under it may have missed a file moved back
    // and forth between two directories as it read them (`fsx::Unsettled`): it is
    // made again, and the largest count of the tries is taken. A busy scope (jobs
    // writing there, other uploads committing) is still measured, never refused
    // for being written; a file moved to hide is missed only if every try misses
    // it.
    let mut most: Option<(u64, HashMap<String, u64>)> = None;
    for _ in 0..WALK_TRIES {
        let (bytes, unheld, settled) = committed_once(scope, pending, live)?;
        if settled {
            return Ok((bytes.saturating_sub(own), unheld));
        }
        if most.as_ref().is_none_or(|(b, _)| bytes > *b) {
            most = Some((bytes, unheld));
        }
    }
    let (bytes, unheld) = most.unwrap_or_default();
    tracing::debug!(
        bytes,
        tries = WALK_TRIES,
        "the quota scope changed under every walk: the largest count taken"
    );
    Ok((bytes.saturating_sub(own), unheld))
}

/// One settled walk of `scope` for [`committed`]: the bytes, the session-named
/// staged files counted whole, and whether nothing changed under the walk.
fn committed_once(
    scope: BorrowedFd<'_>,
    pending: &HashSet<(u64, u64)>,
    live: &Live,
) -> std::io::Result<(u64, HashMap<String, u64>, bool)> {
    let mut cover = Cover::new(live);
    let mut unheld = HashMap::new();
    let mut file = |e: &fsx::Entry| {
        let held = cover.file(e);
        let name = e.name.to_string_lossy();
        if held.is_none()
            && e.kind() == rustix::fs::FileType::RegularFile
            && session_name(&e.name)
            && !live.contains_key(name.as_ref())
            && unheld.len() < MAX_UNHELD
        {
            unheld
                .entry(name.into_owned())
                .or_insert(e.stat.st_size as u64);
        }
        held
    };
    let walked = fsx::usage_covered(
        scope,
        fsx::Links::Once,
        // A clone's copy not yet in place is the clone's (held by its reservation
        // while it runs, `pending`) or garbage a clone cut off left for the sweep:
        // never the scope's committed bytes. Before, one left by a stop or a
        // restart counted until the sweep removed it, hours later, and the
        // scope's uploads could be refused meanwhile (a reviewer's find).
        &|e, depth| {
            let clone_copy = depth == STAGING_DEPTH - 1 && super::manager::is_clone_temp(&e.name);
            !clone_copy && !pending.contains(&(e.stat.st_dev, e.stat.st_ino))
        },
        fsx::Covered {
            dir: &|e, depth| depth == STAGING_DEPTH && e.name == STAGING,
            file: &mut file,
            // A rename back and forth during the walk must not hide a file
            // from the quota: told, as `fsx::Unsettled` (see `committed`).
            settled: true,
        },
    );
    match walked {
        Ok((_, bytes)) => Ok((bytes, unheld, true)),
        Err(e) => match fsx::unsettled_count(&e) {
            Some((_, bytes)) => Ok((bytes, unheld, false)),
            None => Err(e),
        },
    }
}

/// Tries a usage walk gets in all: one stopped by a directory moved (or swapped)
/// while it ran is made again, at most this many times; one refused by file
/// permissions, or stopped by a tree deeper than a walk goes, is not (it would be
/// refused again). A quota measurement's walk that saw a directory change while it
/// ran (`fsx::Unsettled`) is made again as often, and the largest count taken
/// ([`committed`]).
const WALK_TRIES: usize = 3;

/// Runs `walk`, a usage walk of `what`, until it sees the whole tree, at most
/// `WALK_TRIES` times. A walk that never did is logged and answered
/// [`ApiError::Unmeasured`]: nothing is ever admitted on, stored as or reported as
/// the partial count of a walk that missed part of the tree (a directory made
/// unreadable, one a user keeps moving from a shell).
pub fn measured<T>(
    what: &str,
    mut walk: impl FnMut() -> std::io::Result<T>,
) -> Result<T, ApiError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match walk() {
            Ok(v) => return Ok(v),
            // Refused by file permissions, or a tree deeper than a walk goes
            // (`fsx::WALK_LEVELS`): it would be refused again.
            Err(e)
                if tries < WALK_TRIES
                    && e.kind() != std::io::ErrorKind::PermissionDenied
                    && crate::fsx::carried::<crate::fsx::WalkTooDeep>(&e).is_none() =>
            {
                tracing::debug!(error = %e, what, tries, "usage walk incomplete: walked again");
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    what,
                    tries,
                    "usage could not be measured: the walk did not see the whole tree"
                );
                return Err(ApiError::Unmeasured(format!("{what}: {e}")));
            }
        }
    }
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
    /// The vfolder of an upload session (`None` for a clone): the one whose
    /// staged file the reservation holds, the only one whose cleanup or deletion
    /// may let it go (see [`release_staged`]).
    folder: Option<PathBuf>,
    bytes: u64,
    touched: Instant,
    /// An upload session's token expires then: no PATCH can use the reservation
    /// after it (see [`Reservations::usable_until`]).
    until: Option<Instant>,
}

/// A scope's committed bytes as measured by a walk, adjusted since by what the
/// proxy itself put in place.
#[derive(Clone)]
struct Measured {
    bytes: u64,
    /// When the walk began: nothing written behind the proxy's back after this is in
    /// `bytes`.
    began: Instant,
    /// The proxy removed files since (a delete through the manager API): too high,
    /// so the next check measures again whatever its age.
    stale: bool,
    /// Staged files of sessions that held no reservation, counted in `bytes` (by
    /// the walk, or when their reservation was let go): taken off when the session
    /// reserves (its reservation then holds them) or completes.
    unheld: HashMap<String, u64>,
}

/// What check-and-reserve reads and commits write, under the scope's lock.
#[derive(Default)]
struct Ledger {
    measured: Option<Measured>,
    /// Bytes the proxy put in place in the scope since it started (completed
    /// uploads, finished clones, PATCH bytes no reservation holds): a walk adds
    /// what was put in place while it ran.
    put_in_place: u64,
    /// Walks ended, whether they measured the scope or not (see [`measured`]).
    tries: u64,
    /// The last walk that did not measure the scope: its number in `tries` and
    /// why. Checks that waited for it get the same answer rather than walking
    /// again one after another.
    failed: Option<(u64, String)>,
    /// Deletes through the manager API since the start (a walk that ran meanwhile
    /// may have counted what they removed: its result is stale at once).
    removals: u64,
}

/// One scope: its lock (the ledger) and its walk, one at a time.
#[derive(Default)]
struct Scope {
    /// The scope's lock: check-and-reserve, commit and a measurement's update run
    /// under it; a walk never does. Taken on the blocking pool only.
    ledger: Mutex<Ledger>,
    /// The measurement's bytes plus one (0: none yet), written under the ledger's
    /// lock and read without it by `/metrics`, which must not wait for a commit.
    shown: std::sync::atomic::AtomicU64,
    /// Held by the walk of the scope in progress; checks that need a measurement
    /// wait here (asynchronously) and take that walk's result instead of walking.
    walk: Arc<tokio::sync::Mutex<()>>,
}

impl Scope {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the scope needs a walk (its measurement is missing, stale or older than
    /// `max_age`): the number of walks ended so far, so that whoever then waits for
    /// the walk lock can tell whether another walk ended meanwhile (a measurement
    /// only becomes fresh by a walk) and take its result.
    fn due(&self, max_age: Duration) -> Option<u64> {
        let ledger = self.ledger();
        (!fresh(&ledger, max_age)).then_some(ledger.tries)
    }

    /// The result of the walks since the `seen`-th: `None` when none ended, else
    /// whether the last one measured the scope.
    fn walked_since(&self, seen: u64) -> Option<Result<(), ApiError>> {
        let ledger = self.ledger();
        if ledger.tries == seen {
            return None;
        }
        Some(match &ledger.failed {
            Some((n, why)) if *n == ledger.tries => Err(ApiError::Unmeasured(why.clone())),
            _ => Ok(()),
        })
    }

    /// Publishes the ledger's measurement for `/metrics` (call under the lock).
    fn show(&self, ledger: &Ledger) {
        let v = ledger
            .measured
            .as_ref()
            .map_or(0, |m| m.bytes.saturating_add(1));
        self.shown.store(v, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Reservations of every scope, by holder (an upload session or a clone), and each
/// scope's measurement of committed bytes.
#[derive(Default)]
pub struct Reservations {
    held: Mutex<HashMap<String, Held>>,
    scopes: Mutex<HashMap<PathBuf, Arc<Scope>>>,
    /// Clone destinations being filled (`(dev, ino)`), left out of committed bytes
    /// while their reservation holds them.
    pending: Mutex<HashSet<(u64, u64)>>,
}

impl Reservations {
    fn scope(&self, key: &Path) -> Arc<Scope> {
        let mut scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        scopes.entry(key.to_path_buf()).or_default().clone()
    }

    /// The live upload sessions of a scope (see [`Live`]).
    pub fn live(&self, scope: &Path) -> Live {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.iter()
            .filter(|(k, h)| h.scope == scope && session_name(std::ffi::OsStr::new(k.as_str())))
            .map(|(k, h)| (k.clone(), h.bytes))
            .collect()
    }

    /// Whether `holder` holds a reservation now.
    pub fn holding(&self, holder: &str) -> bool {
        self.holds(holder).is_some()
    }

    /// The bytes `holder` holds, if it holds a reservation.
    fn holds(&self, holder: &str) -> Option<u64> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(holder).map(|h| h.bytes)
    }

    fn reserved(&self, scope: &Path, except: &str) -> u64 {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.iter()
            .filter(|(k, h)| h.scope == scope && k.as_str() != except)
            .map(|(_, h)| h.bytes)
            .sum()
    }

    /// Runs `commit` (the rename that puts `bytes` of a holder in place) and
    /// releases the holder's reservation in the same step under the scope's lock, so
    /// a concurrent check never counts those bytes twice (as committed and reserved)
    /// nor not at all: they are added to the scope's measurement at once.
    pub fn commit<T>(
        &self,
        scope: &Path,
        holder: &str,
        bytes: u64,
        commit: impl FnOnce() -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let s = self.scope(scope);
        let mut ledger = s.ledger();
        let done = commit()?;
        self.release(holder);
        ledger.put_in_place = ledger.put_in_place.saturating_add(bytes);
        if let Some(m) = &mut ledger.measured {
            // A staged file no reservation held (a scope without a limit) was
            // counted by the walk: it is now among the bytes put in place.
            let counted = m.unheld.remove(holder).unwrap_or(0);
            m.bytes = m.bytes.saturating_add(bytes).saturating_sub(counted);
        }
        s.show(&ledger);
        Ok(done)
    }

    /// `bytes` more written by the proxy to `holder`'s staged file while no
    /// reservation holds it (a PATCH in a scope without a limit): committed at once,
    /// as a walk would count them, and remembered with what the walk counted of the
    /// file, so that a later reservation of the session (or its completion) takes
    /// them off again. Blocking: takes the scope's lock.
    pub fn grew(&self, scope: &Path, holder: &str, bytes: u64) {
        let s = self.scope(scope);
        let mut ledger = s.ledger();
        // A walk running now adds them too (it may have seen them already).
        ledger.put_in_place = ledger.put_in_place.saturating_add(bytes);
        if let Some(m) = &mut ledger.measured {
            m.bytes = m.bytes.saturating_add(bytes);
            let room = m.unheld.len() < MAX_UNHELD;
            match m.unheld.get_mut(holder) {
                Some(counted) => *counted = counted.saturating_add(bytes),
                // Past the bound they stay counted (the safe side).
                None if room => {
                    m.unheld.insert(holder.to_owned(), bytes);
                }
                None => {}
            }
        }
        s.show(&ledger);
    }

    /// Leaves a directory (a clone destination being filled) out of committed bytes
    /// until `unpend`.
    pub fn pend(&self, dir: (u64, u64)) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.insert(dir);
    }

    /// Whether a directory's bytes are held by a reservation (a clone of this
    /// process copies into it).
    pub fn is_pending(&self, dir: (u64, u64)) -> bool {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.contains(&dir)
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

    /// Releases a holder's reservation when it is an upload session of the
    /// vfolder `folder` (see [`release_staged`], the rule that calls this).
    fn release_of(&self, folder: &Path, holder: &str) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held
            .get(holder)
            .is_some_and(|h| h.folder.as_deref() == Some(folder))
        {
            held.remove(holder);
            tracing::debug!(holder, "quota reservation released");
        }
    }

    /// Records when `holder`'s reservation stops being usable: the upload token of
    /// its session expires then, and no PATCH can come after it (a session's token
    /// is never made again). [`Reservations::expire`] lets it go from then on,
    /// rather than holding the scope's room until it has been idle for
    /// `upload_expire_secs` (a day by default, the token's lifetime an hour).
    pub fn usable_until(&self, holder: &str, until: Instant) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = held.get_mut(holder) {
            h.until = Some(until);
        }
    }

    /// Releases reservations not used for longer than `idle`, or whose session's
    /// token expired, except those `busy` says are in use (a PATCH in progress);
    /// returns how many, and the scopes they were in. The scopes of sessions let go are measured again (their staged
    /// files, if still there, count as committed now).
    pub fn expire(
        &self,
        idle: std::time::Duration,
        busy: impl Fn(&str) -> bool,
    ) -> (usize, HashSet<PathBuf>) {
        let mut scopes = HashSet::new();
        let released = {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let before = held.len();
            held.retain(|k, h| {
                let usable = h.until.is_none_or(|u| Instant::now() < u);
                let keep = (usable && h.touched.elapsed() <= idle) || busy(k);
                if !keep {
                    scopes.insert(h.scope.clone());
                }
                keep
            });
            before - held.len()
        };
        for scope in &scopes {
            self.removed(scope);
        }
        (released, scopes)
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

    /// Has the next check of a scope measure it again: the proxy removed files
    /// there, and a check should see the room at once.
    pub fn removed(&self, scope: &Path) {
        let s = self.scope(scope);
        let mut ledger = s.ledger();
        ledger.removals += 1;
        if let Some(m) = &mut ledger.measured {
            m.stale = true;
        }
    }

    /// Committed bytes of every measured scope, as last measured and adjusted.
    pub fn measurements(&self) -> Vec<(PathBuf, u64)> {
        let scopes: Vec<(PathBuf, Arc<Scope>)> = self
            .scopes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        scopes
            .into_iter()
            .filter_map(|(k, s)| {
                let shown = s.shown.load(std::sync::atomic::Ordering::Relaxed);
                Some((k, shown.checked_sub(1)?))
            })
            .collect()
    }
}

/// One walk of a scope (tried again a few times when it did not see the whole
/// scope, see [`measured`]), its result stored as the scope's measurement. The
/// caller holds the scope's `walk`; the scope's lock is taken only to read where
/// commits stand before the walk and to store the result after it. A walk that
/// never saw the whole scope stores nothing: the measurement stays what it was
/// (too old or stale for a check, which then gets the error).
fn walk_scope(
    state: &State,
    key: &Path,
    s: &Scope,
    scope: BorrowedFd<'_>,
) -> Result<u64, ApiError> {
    // Read before the first try: a later try's result is stamped as older, and
    // adds more of what was put in place meanwhile, than it is (the safe side).
    let (began, before, removals) = {
        let ledger = s.ledger();
        (Instant::now(), ledger.put_in_place, ledger.removals)
    };
    let r = &state.reservations;
    let before_live = r.live(key);
    let pending = r.pending();
    let walked = measured("the quota scope", || {
        let t = Instant::now();
        let walked = committed(scope, &pending, &before_live);
        super::Metrics::add(&state.metrics.quota_walks, 1);
        state
            .metrics
            .observed
            .quota_walk_duration
            .observe(t.elapsed());
        walked
    });
    let (walked, mut unheld) = match walked {
        Ok(walked) => walked,
        Err(e) => {
            let mut ledger = s.ledger();
            ledger.tries += 1;
            if let ApiError::Unmeasured(why) = &e {
                ledger.failed = Some((ledger.tries, why.clone()));
            }
            return Err(e);
        }
    };
    let mut ledger = s.ledger();
    // Bytes put in place while the walk ran may or may not have been seen by it:
    // added, so a measurement never misses them (it may count them twice until the
    // next walk, the safe side).
    let mut bytes = walked.saturating_add(ledger.put_in_place.saturating_sub(before));
    // A session that reserved while the walk ran (its staged file counted whole):
    // its reservation holds that file now, counted once. Reservations are made
    // under the scope's lock, held here.
    let live = r.live(key);
    unheld.retain(|name, counted| match live.get(name) {
        Some(held) => {
            bytes = bytes.saturating_sub((*counted).min(*held));
            false
        }
        None => true,
    });
    // A session let go while the walk ran (the walk left its staged file out; the
    // bytes came in with what was put in place meanwhile): still taken off when it
    // reserves again.
    if let Some(m) = &ledger.measured {
        for (name, counted) in &m.unheld {
            if before_live.contains_key(name)
                && !live.contains_key(name)
                && unheld.len() < MAX_UNHELD
            {
                unheld.entry(name.clone()).or_insert(*counted);
            }
        }
    }
    ledger.measured = Some(Measured {
        bytes,
        began,
        stale: ledger.removals != removals,
        unheld,
    });
    ledger.tries += 1;
    s.show(&ledger);
    Ok(bytes)
}

fn fresh(ledger: &Ledger, max_age: Duration) -> bool {
    ledger
        .measured
        .as_ref()
        .is_some_and(|m| !m.stale && m.began.elapsed() <= max_age)
}

/// Makes sure the scope has a measurement of its committed bytes that began at most
/// `[storage] quota_usage_max_age_secs` ago, or is the result of a walk that was
/// running when this was asked. At most one walk of a scope runs at a time (on the
/// blocking pool); the others wait for it without holding a thread and take its
/// result.
pub async fn measure(
    state: &Arc<State>,
    key: &Path,
    volume: &str,
    scope_name: &str,
) -> Result<(), ApiError> {
    let s = state.reservations.scope(key);
    // The scope's lock is a blocking one, held by commits while they rename and
    // sync: it is only ever taken on the blocking pool, never on a runtime thread.
    let seen = {
        let (s, max_age) = (s.clone(), state.usage_max_age);
        super::blocking(move || Ok(s.due(max_age))).await?
    };
    let Some(seen) = seen else {
        return Ok(());
    };
    let walking = s.walk.clone().lock_owned().await;
    let (st, key, volume, name) = (
        state.clone(),
        key.to_path_buf(),
        volume.to_owned(),
        scope_name.to_owned(),
    );
    // The walk holds `walking` to its end, even when the request that started it is
    // gone meanwhile.
    super::blocking(move || {
        let _walking = walking;
        // A walk that ended while this waited answers for it, one that did not
        // measure the scope too (it was just tried).
        if let Some(walked) = s.walked_since(seen) {
            return walked;
        }
        let scope = st.volumes.open_scope(&volume, &name)?;
        walk_scope(&st, &key, &s, scope.as_fd()).map(drop)
    })
    .await
}

/// What `GET /quota-scope` reports of a scope that exists: `(used, reserved)`,
/// the two figures the quota's check adds up: `used` is the scope's measurement of
/// committed bytes (see [`measure`]; no walk while it is young enough and no
/// delete came since), `reserved` what the reservations hold. An upload's bytes
/// count once, in `reserved` until it completes and in `used` from then on, and a
/// clone's likewise: the measurement leaves out what reservations hold (live
/// sessions' staged files, clone destinations being filled). Both are read
/// together under the scope's lock, where a commit moves bytes from one to the
/// other. Before, `used` also added those staged files and destinations, which
/// `reserved` held already: counted twice.
pub async fn report(
    state: &Arc<State>,
    key: &Path,
    volume: &str,
    scope_name: &str,
) -> Result<(u64, u64), ApiError> {
    measure(state, key, volume, scope_name).await?;
    let (st, k) = (state.clone(), key.to_path_buf());
    super::blocking(move || {
        let s = st.reservations.scope(&k);
        let ledger = s.ledger();
        let used = ledger.measured.as_ref().map(|m| m.bytes).ok_or_else(|| {
            ApiError::Io(std::io::Error::other("the quota scope has no measurement"))
        })?;
        Ok((used, st.reservations.reserved(&k, "")))
    })
    .await
}

/// Lets `holder`'s reservation go under the scope's lock (`ledger`): what it held of
/// its staged file (`staged` bytes now) counts as committed from then on, and a
/// later reservation of the session takes it off again.
fn let_go(r: &Reservations, s: &Scope, ledger: &mut Ledger, holder: &str, staged: u64) {
    let held = {
        let mut held = r.held.lock().unwrap_or_else(|e| e.into_inner());
        held.remove(holder).map(|h| h.bytes)
    };
    let Some(held) = held else {
        return;
    };
    tracing::debug!(holder, "quota reservation released");
    let counted = staged.min(held);
    if counted == 0 {
        return;
    }
    // A walk running now adds them too (it may have seen the file covered).
    ledger.put_in_place = ledger.put_in_place.saturating_add(counted);
    if let Some(m) = &mut ledger.measured {
        m.bytes = m.bytes.saturating_add(counted);
        if m.unheld.len() < MAX_UNHELD {
            m.unheld.insert(holder.to_owned(), counted);
        }
    }
    s.show(ledger);
}

/// Check-and-reserve against the scope's measurement under the scope's lock
/// (blocking: reads the limit). `staged` is what the holder's staged file holds now
/// (0 for a new session or a clone): when the check lets an existing reservation
/// go, those bytes count as committed from then on. `Ok(false)`: no measurement
/// young enough (or, with `any_age`, none at all); nothing was reserved or released.
/// `folder` is the vfolder of an upload session (see [`Held`]). `scope` is `None`
/// for an old-style vfolder, which has no quota scope: no limit, as on the platform.
fn check(
    state: &State,
    key: &Path,
    scope: Option<BorrowedFd<'_>>,
    (holder, folder): (&str, Option<&Path>),
    (bytes, staged): (u64, u64),
    any_age: bool,
) -> Result<bool, ApiError> {
    let r = &state.reservations;
    let s = r.scope(key);
    let mut ledger = s.ledger();
    let limit = scope.and_then(limit);
    remember_limit(state, key, limit);
    let Some(limit) = limit else {
        let_go(r, &s, &mut ledger, holder, staged);
        return Ok(true);
    };
    let fresh = fresh(&ledger, state.usage_max_age);
    let was = r.holds(holder);
    let (committed, credit) = match &ledger.measured {
        Some(m) if any_age || fresh => {
            // A session reserving again (after a restart, or once its reservation
            // was let go): the walk counted its staged file, which the new
            // reservation holds.
            let credit = match was {
                None => m.unheld.get(holder).map_or(0, |c| (*c).min(bytes)),
                Some(_) => 0,
            };
            (m.bytes.saturating_sub(credit), credit)
        }
        _ => return Ok(false),
    };
    let used = committed.saturating_add(r.reserved(key, holder));
    if used.saturating_add(bytes) > limit {
        let_go(r, &s, &mut ledger, holder, staged);
        super::Metrics::add(&state.metrics.quota_refused, 1);
        return Err(ApiError::QuotaExceeded { used, limit });
    }
    if was.is_none() {
        if let Some(m) = &mut ledger.measured {
            if m.unheld.remove(holder).is_some() {
                m.bytes = m.bytes.saturating_sub(credit);
                s.show(&ledger);
            }
        }
    }
    let mut held = r.held.lock().unwrap_or_else(|e| e.into_inner());
    let until = held.get(holder).and_then(|h| h.until);
    held.insert(
        holder.to_owned(),
        Held {
            scope: key.to_path_buf(),
            folder: folder.map(Path::to_path_buf),
            bytes,
            touched: Instant::now(),
            until,
        },
    );
    Ok(true)
}

/// Reserves (or, when `holder` already holds one, re-checks) `bytes` in the scope
/// for `holder` when the scope's measurement is young enough: refused when committed
/// bytes plus every reservation would pass the scope's current limit. Without a
/// limit nothing is held. `sizes` is `(bytes, staged)`, `staged` what the holder's
/// staged file holds now (0 for a new session or a clone): when the check lets the
/// holder's reservation go (refused, or no limit any more), what it held of those
/// bytes counts as committed from then on. Blocking, but never walks: `Ok(false)`
/// says a measurement is needed first, which [`reserve`] makes. `holder` is
/// `(name, vfolder)`, the vfolder an upload session's (`None` for a clone).
/// `scope` is `None` for an old-style vfolder (no quota scope: nothing is held).
pub fn try_reserve(
    state: &State,
    key: &Path,
    scope: Option<BorrowedFd<'_>>,
    holder: (&str, Option<&Path>),
    sizes: (u64, u64),
) -> Result<bool, ApiError> {
    check(state, key, scope, holder, sizes, false)
}

/// Reserves (or re-checks) `bytes` in the scope named `scope_name` of `volume` for
/// `holder` (`(name, vfolder)` as for [`try_reserve`]; its staged file holds
/// `staged` bytes now), measuring the scope first when its measurement is too old
/// (see [`measure`]). `scope_name` is `None` for an old-style vfolder: it has no
/// quota scope (as on the platform, where it lies directly under the volume root),
/// so no limit, nothing held and nothing measured; the volume root is never opened
/// or walked as a scope.
pub async fn reserve(
    state: &Arc<State>,
    key: &Path,
    volume: &str,
    scope_name: Option<&str>,
    (holder, folder): (&str, Option<&Path>),
    (bytes, staged): (u64, u64),
) -> Result<(), ApiError> {
    for any_age in [false, true] {
        let (st, k, v, n, h, f) = (
            state.clone(),
            key.to_path_buf(),
            volume.to_owned(),
            scope_name.map(str::to_owned),
            holder.to_owned(),
            folder.map(Path::to_path_buf),
        );
        let done = super::blocking(move || {
            let scope = n.map(|n| st.volumes.open_scope(&v, &n)).transpose()?;
            check(
                &st,
                &k,
                scope.as_ref().map(|s| s.as_fd()),
                (&h, f.as_deref()),
                (bytes, staged),
                any_age,
            )
        })
        .await?;
        if done {
            return Ok(());
        }
        // Without a scope the check never asks for a measurement (no limit).
        if let (false, Some(name)) = (any_age, scope_name) {
            measure(state, key, volume, name).await?;
        }
    }
    // A measurement, once made, is only ever replaced: the second check has one.
    Err(ApiError::Io(std::io::Error::other(
        "the quota scope has no measurement",
    )))
}

/// One usage-sync pass over every scope of every volume (blocking); returns how
/// many scopes were walked. A scope whose measurement is still young enough, or
/// whose walk (for a check) ends while the pass waits for it, is not walked again.
/// Only scope directories (32 hex digits, see `Vfid::scope_name`) are walked: the
/// old-style vfolders' levels (`<root>/<xx>`) and anything else at the volume root
/// belong to no scope, and the root itself is never walked.
pub fn sync(state: &State) -> usize {
    let mut walked = 0;
    for name in state.volumes.names() {
        let (Ok(root), Ok(path)) = (state.volumes.root_fd(name), state.volumes.root(name)) else {
            continue;
        };
        let Ok(scopes) = fsx::entries(root) else {
            continue;
        };
        for e in scopes {
            if e.kind() != rustix::fs::FileType::Directory || !super::volume::is_scope_dir(&e.name)
            {
                continue;
            }
            let Ok(fd) = fsx::child_dir(root, &e.name) else {
                continue;
            };
            let key = path.join(&e.name);
            let limit = limit(fd.as_fd());
            remember_limit(state, &key, limit);
            let s = state.reservations.scope(&key);
            let Some(seen) = s.due(state.usage_max_age) else {
                continue;
            };
            let _walking = s.walk.blocking_lock();
            if s.walked_since(seen).is_some() {
                continue;
            }
            // A walk that did not see the whole scope is logged (by `measured`)
            // and stores nothing: the next check tries again.
            if let Ok(used) = walk_scope(state, &key, &s, fd.as_fd()) {
                tracing::debug!(scope = %e.name.to_string_lossy(), used, limit, "quota scope measured");
                walked += 1;
            }
        }
    }
    walked
}

/// The staged file named after the upload session `session` in the vfolder
/// `folder` is gone (removed by the expired-upload cleanup, or with its vfolder):
/// lets the session's reservation go, by the one rule both follow. Files there are
/// found by name, and a session's ID is in the token its user holds, so a user who
/// can write in a staging area can name a file there after any session: only a
/// session of that very vfolder is let go (never one of another vfolder, of the
/// scope or not), and only while no PATCH of it runs (a running PATCH has passed
/// its check and writes on its reservation).
pub fn release_staged(state: &State, folder: &Path, session: &str) {
    if !patching(state, session) {
        state.reservations.release_of(folder, session);
    }
}

/// Whether a PATCH of `session` runs now (yes, when that cannot be told: a
/// poisoned lock).
pub fn patching(state: &State, session: &str) -> bool {
    state
        .uploading
        .lock()
        .map_or(true, |set| set.contains(session))
}

/// Releases a holder's reservation when dropped, unless kept: for setups that
/// reserve first and can fail after.
pub struct Hold<'a> {
    state: &'a State,
    holder: Option<String>,
}

impl<'a> Hold<'a> {
    /// Guards `holder`'s reservation (made or to be made).
    pub fn new(state: &'a State, holder: &str) -> Self {
        Self {
            state,
            holder: Some(holder.to_owned()),
        }
    }

    /// The setup succeeded: the reservation stays.
    pub fn keep(mut self) {
        self.holder = None;
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        if let Some(h) = &self.holder {
            self.state.reservations.release(h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scope written while it is measured (a job writing there, other uploads
    /// committing) is still measured, never refused for being written; and a file
    /// moved back and forth between two directories to hide from the walk is
    /// counted: of the tries, the largest count is taken.
    #[test]
    fn a_scope_changing_under_its_measurement_is_measured_and_a_flipped_file_counted() {
        use crate::fsx::flipping::{Flipping, FLIPPED_BYTES as big};
        use std::os::fd::AsFd as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let t = dir.path();
        // And a writer beside it, making and removing a file.
        let flipping = Flipping::start(t, true);
        let scope = std::fs::File::open(t).expect("open");
        let mut low = 0;
        for _ in 0..200 {
            let (bytes, _) =
                super::committed(scope.as_fd(), &HashSet::new(), &Live::new()).expect("measured");
            if bytes < big {
                low += 1;
            }
        }
        drop(flipping);
        assert_eq!(low, 0, "the flipped file was missed by every try");
    }

    /// A limit that cannot be put in place (here the rename onto a directory named
    /// `.quota` is refused) fails and leaves no temporary file behind; one that can
    /// reads back.
    #[test]
    fn a_limit_not_set_leaves_no_temporary_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let scope = rustix::fs::open(
            d.path(),
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .expect("open");
        std::fs::create_dir_all(d.path().join(QUOTA_FILE).join("x")).expect("a directory");
        assert!(set_limit(scope.as_fd(), Some(1_000)).is_err());
        let names = |p: &std::path::Path| -> Vec<String> {
            let mut n: Vec<String> = std::fs::read_dir(p)
                .expect("read_dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            n.sort();
            n
        };
        assert_eq!(names(d.path()), [QUOTA_FILE]);
        std::fs::remove_dir_all(d.path().join(QUOTA_FILE)).expect("remove");
        set_limit(scope.as_fd(), Some(1_000)).expect("set");
        assert_eq!(names(d.path()), [QUOTA_FILE]);
        assert_eq!(limit(scope.as_fd()), Some(1_000));
    }
}
