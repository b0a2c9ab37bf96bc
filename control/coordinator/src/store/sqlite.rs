//! The embedded SQLite engine: one connection behind a mutex (SQLite serialises
//! writers anyway), WAL journal, foreign keys on, migrations counted in
//! `PRAGMA user_version`. Workers and circuits keep their wire JSON in `body`, with
//! the columns that queries and unique keys need beside it; each worker's change log
//! marks its removals and keeps the request behind each (its ID and trace context);
//! each worker counts the circuits holding a port on it (`workers.port_circuits`,
//! kept by triggers). Calls are synchronous;
//! [`super::Store`] runs them on tokio's blocking pool.

use std::path::Path;
use std::sync::Mutex;

use appproxy_shared::model::{Circuit, RouteInfo};
use rusqlite::{params, Connection, OptionalExtension};

use super::{now, Behind, Changes, CircuitRow, Logged, Origin, StoreError, UsedSlot, WorkerRow};
use appproxy_shared::wire::WorkerRegistration;

/// Migrations, applied in order; the database records how many ran.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    authority TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'ALIVE',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE circuits (
    id TEXT PRIMARY KEY,
    worker TEXT NOT NULL REFERENCES workers(id),
    port INTEGER,
    subdomain TEXT,
    body TEXT NOT NULL,
    origin_request_id TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE UNIQUE INDEX circuits_worker_port ON circuits(worker, port) WHERE port IS NOT NULL;
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
",
    "
ALTER TABLE workers ADD COLUMN nodes INTEGER NOT NULL DEFAULT 1;
CREATE UNIQUE INDEX circuits_worker_subdomain ON circuits(worker, subdomain) WHERE subdomain IS NOT NULL;
",
    "
CREATE TABLE endpoints (
    id TEXT PRIMARY KEY,
    health_check_enabled INTEGER NOT NULL DEFAULT 0,
    health_check_config TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
ALTER TABLE circuits ADD COLUMN endpoint_id TEXT;
UPDATE circuits SET endpoint_id = json_extract(body, '$.endpoint_id');
CREATE UNIQUE INDEX circuits_endpoint ON circuits(endpoint_id) WHERE endpoint_id IS NOT NULL;
",
    "
CREATE TABLE worker_nodes (
    worker TEXT NOT NULL REFERENCES workers(id) ON DELETE CASCADE,
    node TEXT NOT NULL,
    seen_at TEXT NOT NULL,
    PRIMARY KEY (worker, node)
);
",
    // Scale: every per-creation and per-poll read is an index lookup. Sessions get a
    // table of their own (reuse by session), circuits an index by worker and by
    // subdomain (placement), and each worker a revision with a log of what changed
    // (conditional polls and deltas).
    "
CREATE TABLE circuit_sessions (
    session TEXT NOT NULL,
    circuit TEXT NOT NULL REFERENCES circuits(id) ON DELETE CASCADE,
    PRIMARY KEY (session, circuit)
);
CREATE INDEX circuit_sessions_circuit ON circuit_sessions(circuit);
INSERT OR IGNORE INTO circuit_sessions (session, circuit)
    SELECT value, circuits.id FROM circuits, json_each(circuits.body, '$.session_ids');
CREATE INDEX circuits_worker_id ON circuits(worker, id);
CREATE INDEX circuits_subdomain ON circuits(subdomain) WHERE subdomain IS NOT NULL;
ALTER TABLE workers ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
CREATE TABLE circuit_changes (
    worker TEXT NOT NULL,
    revision INTEGER NOT NULL,
    circuit TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (worker, revision)
);
CREATE INDEX circuit_changes_at ON circuit_changes(at);
ALTER TABLE circuits ADD COLUMN idle_check_at TEXT;
UPDATE circuits SET idle_check_at = created_at
    WHERE json_extract(body, '$.app_mode') = 'interactive' AND json_extract(body, '$.protocol') = 'http';
CREATE INDEX circuits_idle_check_at ON circuits(idle_check_at) WHERE idle_check_at IS NOT NULL;
",
    // The W3C trace context of the request behind each circuit's latest change, for
    // a worker that finds the change by a fetch rather than an event.
    "
ALTER TABLE circuits ADD COLUMN traceparent TEXT;
ALTER TABLE circuits ADD COLUMN tracestate TEXT;
",
    // The request behind a removal (its ID and W3C trace context), kept with the
    // change-log entry: the circuit's row is gone, and a worker that finds the
    // removal by a fetch deploys it under that request. Earlier entries have NULLs.
    "
ALTER TABLE circuit_changes ADD COLUMN request_id TEXT;
ALTER TABLE circuit_changes ADD COLUMN traceparent TEXT;
ALTER TABLE circuit_changes ADD COLUMN tracestate TEXT;
",
    // Whether an entry records a removal (1) or a creation or update (0). An entry of
    // a circuit that is gone and that is not the removal is superseded by the
    // removal's own, later entry, and is skipped: read alone (a bounded answer ending
    // between the two), it would read as a removal with no request. Earlier entries
    // are NULL: kind unknown.
    "
ALTER TABLE circuit_changes ADD COLUMN removal INTEGER;
",
    // When each setup token was made, so that old ones are deleted (`[coordinator]
    // token_ttl_secs`). Tokens made before count from this migration.
    "
ALTER TABLE tokens ADD COLUMN created_at TEXT NOT NULL DEFAULT '';
UPDATE tokens SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now');
CREATE INDEX tokens_created_at ON tokens(created_at);
",
    // A node that deregistered is kept, marked as left, until it registers again:
    // a late heartbeat of it does not count it again.
    "
ALTER TABLE worker_nodes ADD COLUMN left_at TEXT;
",
    // A creation under way, in the store: until when the circuit's creation may
    // still be settled by the coordinator making it (set by the creation's insert,
    // cleared once the creation is acknowledged and its caller about to be
    // answered). A circuit still marked past it was left by a creation whose
    // withdrawal was not made (the process stopped meanwhile): the sweep withdraws
    // it. NULL: settled (every row written before this migration).
    "
ALTER TABLE circuits ADD COLUMN creating_until TEXT;
CREATE INDEX circuits_creating_until ON circuits(creating_until) WHERE creating_until IS NOT NULL;
",
    // Placement ranks port workers by their free ports: each worker keeps the count
    // of the circuits holding a port on it, kept by triggers on every insert,
    // removal or move of a circuit, so a creation reads a count, not every port in
    // use (the few ports outside a worker's range are subtracted, by index).
    "
ALTER TABLE workers ADD COLUMN port_circuits INTEGER NOT NULL DEFAULT 0;
UPDATE workers SET port_circuits =
    (SELECT count(*) FROM circuits WHERE circuits.worker = workers.id AND circuits.port IS NOT NULL);
CREATE TRIGGER circuits_port_circuits_insert AFTER INSERT ON circuits WHEN NEW.port IS NOT NULL
BEGIN
    UPDATE workers SET port_circuits = port_circuits + 1 WHERE id = NEW.worker;
END;
CREATE TRIGGER circuits_port_circuits_delete AFTER DELETE ON circuits WHEN OLD.port IS NOT NULL
BEGIN
    UPDATE workers SET port_circuits = port_circuits - 1 WHERE id = OLD.worker;
END;
CREATE TRIGGER circuits_port_circuits_update AFTER UPDATE OF worker, port ON circuits
BEGIN
    UPDATE workers SET port_circuits = port_circuits - 1
        WHERE id = OLD.worker AND OLD.port IS NOT NULL;
    UPDATE workers SET port_circuits = port_circuits + 1
        WHERE id = NEW.worker AND NEW.port IS NOT NULL;
END;
",
];

/// Records that `circuit` of `worker` changed (created, updated or removed): the
/// worker's revision goes up by one, in the caller's transaction, and the log says
/// which circuit it was and whether this is its removal — `removal`, the request
/// behind it (its ID and trace context columns; the circuit's row no longer says).
fn log_change(
    tx: &Connection,
    worker: &str,
    circuit: &str,
    now: &str,
    removal: Option<&Behind>,
) -> Result<(), StoreError> {
    let revision: Option<i64> = tx
        .query_row(
            "UPDATE workers SET revision = revision + 1 WHERE id = ?1 RETURNING revision",
            params![worker],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(revision) = revision {
        let (request_id, (traceparent, tracestate)) = match removal {
            Some((id, trace)) => (id.as_deref(), (trace.0.as_deref(), trace.1.as_deref())),
            None => (None, (None, None)),
        };
        tx.execute(
            "INSERT INTO circuit_changes
                (worker, revision, circuit, at, removal, request_id, traceparent, tracestate)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                worker,
                revision,
                circuit,
                now,
                removal.is_some(),
                request_id,
                traceparent,
                tracestate
            ],
        )?;
    }
    Ok(())
}

/// A worker's revision (`None`: no such worker).
fn revision_of(c: &Connection, worker: &str) -> Result<Option<u64>, StoreError> {
    let r: Option<i64> = c
        .query_row(
            "SELECT revision FROM workers WHERE id = ?1",
            params![worker],
            |r| r.get(0),
        )
        .optional()?;
    Ok(r.map(|r| r.max(0) as u64))
}

/// The columns a circuit row is read from, in [`circuit_row`]'s order.
const CIRCUIT_COLUMNS: &str = "body, origin_request_id, traceparent, tracestate";

/// The stored columns of one circuit ([`CIRCUIT_COLUMNS`] from column `at`).
type RawCircuit = (String, Option<String>, Option<String>, Option<String>);

fn raw_circuit(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<RawCircuit> {
    Ok((r.get(at)?, r.get(at + 1)?, r.get(at + 2)?, r.get(at + 3)?))
}

/// A circuit from its stored columns.
fn circuit_row(
    (body, origin, traceparent, tracestate): RawCircuit,
) -> Result<CircuitRow, StoreError> {
    Ok((
        serde_json::from_str(&body)?,
        Origin::stored(origin, traceparent.as_deref(), tracestate.as_deref()),
    ))
}

/// The [`CIRCUIT_COLUMNS`] rows a statement selects, as circuits.
fn circuit_rows(
    st: &mut rusqlite::Statement<'_>,
    params: impl rusqlite::Params,
) -> Result<Vec<CircuitRow>, StoreError> {
    let rows = st.query_map(params, |r| raw_circuit(r, 0))?;
    let mut out = Vec::new();
    for row in rows {
        out.push(circuit_row(row?)?);
    }
    Ok(out)
}

/// Replaces the session index of one circuit.
fn index_sessions(tx: &Connection, circuit: &Circuit) -> Result<(), StoreError> {
    let id = circuit.id.to_string();
    tx.execute(
        "DELETE FROM circuit_sessions WHERE circuit = ?1",
        params![id],
    )?;
    for session in &circuit.session_ids {
        tx.execute(
            "INSERT OR IGNORE INTO circuit_sessions (session, circuit) VALUES (?1, ?2)",
            params![session.to_string(), id],
        )?;
    }
    Ok(())
}

/// Sets a worker's `nodes` to its live node count; with `touch`, also its status
/// (`ALIVE`, or `LOST` at none) and `updated_at`.
fn recount(
    tx: &rusqlite::Connection,
    id: &str,
    touch: Option<&str>,
) -> Result<usize, rusqlite::Error> {
    match touch {
        Some(now) => tx.execute(
            "UPDATE workers SET nodes = (SELECT count(*) FROM worker_nodes WHERE worker = ?1 AND left_at IS NULL),
                status = CASE WHEN (SELECT count(*) FROM worker_nodes WHERE worker = ?1 AND left_at IS NULL) = 0
                    THEN 'LOST' ELSE 'ALIVE' END,
                updated_at = ?2 WHERE id = ?1",
            params![id, now],
        ),
        None => tx.execute(
            "UPDATE workers SET nodes = (SELECT count(*) FROM worker_nodes WHERE worker = ?1 AND left_at IS NULL) WHERE id = ?1",
            params![id],
        ),
    }
}

/// The embedded store.
pub struct SqliteStore {
    /// One connection; SQLite serialises writers anyway.
    conn: Mutex<Connection>,
    /// Why the last write failed for want of storage (disk full, read-only, I/O
    /// error), until a write succeeds again: reads still answer then, so `/readyz`
    /// would otherwise call ready a store that refuses every change.
    write_failure: Mutex<Option<String>>,
}

/// A coordinator's hold on its SQLite file: an exclusive `flock` on `<file>.lock`,
/// taken before the store is opened and held as long as the coordinator's state
/// (`State`), the holder's PID written in it. (The store itself takes none: a tool
/// or a test opening it beside a running coordinator, as `sqlite3` does, is not
/// kept out.) A second coordinator on the same file (an embedded single node and a
/// coordinator started with the same `sqlite_path`, two single nodes in one
/// directory) is refused at start, naming the file and the holder. Before, both
/// started and ran: each took the other's workers for its own (their heartbeats in
/// the shared file) and placed circuits on a worker that was never told, each
/// creation waiting out the acknowledgement timeout and many answered 503 (an
/// outside tester's find). The lock file lies beside the file's real path, so a
/// symlink or another relative path to the same file meets the same lock (a hard
/// link under another name does not). Tools reading the file (`sqlite3`) take
/// SQLite's own locks only, and are not kept out. The lock goes with the process,
/// however it ends.
pub struct OneProcess {
    /// Held open: its lock lasts as long.
    _held: std::fs::File,
}

impl OneProcess {
    /// Takes the hold on the SQLite file at `path`, or says which process has it.
    pub fn take(path: &Path) -> Result<Self, StoreError> {
        use std::io::{Read as _, Seek as _, Write as _};
        use std::os::unix::fs::OpenOptionsExt as _;
        // Beside the file itself, whatever path names it (a symlink, another
        // relative path): two paths to one file take one lock. A file not made yet
        // is named through its directory's real path.
        let real = std::fs::canonicalize(path)
            .or_else(|_| {
                let dir = path
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                std::fs::canonicalize(dir).map(|d| d.join(path.file_name().unwrap_or_default()))
            })
            .unwrap_or_else(|_| path.to_owned());
        let mut name = real.into_os_string();
        name.push(".lock");
        let lock = std::path::PathBuf::from(name);
        // Never through a symlink (one put in its place would have the PID
        // written over whatever it names), and only a regular file.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&lock)
            .and_then(|f| {
                if f.metadata()?.is_file() {
                    Ok(f)
                } else {
                    Err(std::io::Error::other("not a regular file"))
                }
            })
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "the SQLite store's lock file {} could not be opened: {e}",
                    lock.display()
                ))
            })?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                // Who holds it, for the message of the next one (best effort).
                let _ = file
                    .set_len(0)
                    .and_then(|()| file.rewind())
                    .and_then(|()| writeln!(file, "{}", std::process::id()));
                Ok(Self { _held: file })
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if !holder.is_empty() && holder.bytes().all(|b| b.is_ascii_digit()) {
                    format!(" (PID {holder})")
                } else {
                    String::new()
                };
                Err(StoreError::Unavailable(format!(
                    "the SQLite store {} is in use by another coordinator process{holder}, which holds {}: one process per SQLite file — give each its own sqlite_path, or share PostgreSQL",
                    path.display(),
                    lock.display()
                )))
            }
            Err(e) => Err(StoreError::Unavailable(format!(
                "the SQLite store's lock file {} could not be locked: {e}",
                lock.display()
            ))),
        }
    }
}

fn conflict_or(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, msg)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
        {
            StoreError::Conflict(msg.clone().unwrap_or_else(|| "unique key taken".into()))
        }
        _ => StoreError::Sqlite(e),
    }
}

fn parse_id(s: &str) -> Result<uuid::Uuid, StoreError> {
    uuid::Uuid::parse_str(s).map_err(|e| StoreError::Data(format!("id {s:?}: {e}")))
}

/// The size of the readiness probe's row: more than a page (4 KiB by default), so
/// that it needs pages of its own.
const PROBE_BYTES: usize = 8192;

/// The longest a call waits for a lock another process holds on the file.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

thread_local! {
    /// When the store call running on this blocking thread stops being waited for.
    static CALL_DEADLINE: std::cell::Cell<Option<std::time::Instant>> =
        const { std::cell::Cell::new(None) };
}

/// Runs one store call on this (blocking) thread under `deadline`: if the call has
/// not had the connection by then, it does nothing and fails, and it waits for a
/// lock on the file only until then. Its caller stopped waiting at the deadline and
/// answered 503; a write made afterwards would take effect unseen (a circuit nobody
/// was told of), and a backlog of such calls would keep the one connection busy
/// with work nobody waits for.
pub(super) fn by_deadline<R>(deadline: std::time::Instant, call: impl FnOnce() -> R) -> R {
    struct Unset;
    impl Drop for Unset {
        fn drop(&mut self) {
            CALL_DEADLINE.set(None);
        }
    }
    CALL_DEADLINE.set(Some(deadline));
    let _unset = Unset;
    call()
}

impl SqliteStore {
    /// Opens (creating) the database at `path` and migrates it; with `max_bytes`
    /// (not 0) the file grows no larger (SQLite's `max_page_count`): a write past it
    /// fails as on a full disk.
    pub fn open(path: &Path, max_bytes: u64) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        // A newer build's store is left as it is: checked before anything is set.
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        super::schema_known(version, MIGRATIONS.len())?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        if max_bytes > 0 {
            let page: u64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
            let pages = (max_bytes / page.max(512)).max(1);
            conn.pragma_update(None, "max_page_count", pages as i64)?;
        }
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
            tracing::info!(engine = "sqlite", migration = i + 1, "store migrated");
        }
        Ok(Self {
            conn: Mutex::new(conn),
            write_failure: Mutex::new(None),
        })
    }

    /// Why the last write failed for want of storage, while no write has succeeded
    /// since.
    pub(super) fn write_failure(&self) -> Option<String> {
        self.write_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A write that needs room (a row over two pages, inserted and deleted in one
    /// committed transaction): whether the store takes writes again after one
    /// failed for want of storage. Its success clears the failure.
    pub(super) fn probe_write(&self) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            tx.execute(
                "INSERT INTO tokens (id, body, created_at) VALUES ('readiness-probe', ?1, '')",
                params!["0".repeat(PROBE_BYTES)],
            )?;
            tx.execute("DELETE FROM tokens WHERE id = 'readiness-probe'", [])?;
            tx.commit()?;
            Ok(())
        })
    }

    fn with<R>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        // A panic while holding the lock cannot leave SQLite inconsistent (its own
        // transactions roll back), so a poisoned lock is taken over.
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        // A lock another process holds on the file is waited for until the call's
        // deadline at most, never past it.
        let wait = match CALL_DEADLINE.get() {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(StoreError::Unavailable(
                        "the connection was busy past the call's deadline".into(),
                    ));
                }
                left.min(BUSY_TIMEOUT)
            }
            None => BUSY_TIMEOUT,
        };
        conn.busy_timeout(wait)?;
        let changes = conn.total_changes();
        let result = f(&conn);
        match &result {
            Err(e) if e.is_storage_failure() => {
                *self.write_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
            Ok(_) if conn.total_changes() != changes => {
                *self.write_failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            _ => {}
        }
        result
    }

    pub(super) fn ping(&self) -> Result<(), StoreError> {
        self.with(|c| Ok(c.query_row("SELECT 1", [], |_| Ok(()))?))
    }

    pub(super) fn upsert_worker(
        &self,
        registration: &WorkerRegistration,
        body: &serde_json::Value,
    ) -> Result<uuid::Uuid, StoreError> {
        let authority = registration.authority.clone();
        let now = now();
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let existing: Option<(String, String)> = tx
                .query_row(
                    "SELECT id, body FROM workers WHERE authority = ?1",
                    params![authority],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let id = match existing {
                Some((id, old)) => {
                    // As the original: every field updated but `accepted_traffics`;
                    // the app filters are the registration's (not accumulated: see
                    // `Store::upsert_worker`), kept when it names none.
                    let old: serde_json::Value = serde_json::from_str(&old)?;
                    let mut new = body.clone();
                    new["accepted_traffics"] = old["accepted_traffics"].clone();
                    new["app_filters"] = if body["app_filters"].is_null() {
                        old["app_filters"].clone()
                    } else {
                        super::stored_filters(&body["app_filters"])
                    };
                    tx.execute(
                        "UPDATE workers SET body = ?1, status = 'ALIVE', nodes = nodes + 1, updated_at = ?2 WHERE id = ?3",
                        params![new.to_string(), now, id],
                    )?;
                    id
                }
                None => {
                    let id = uuid::Uuid::new_v4().to_string();
                    let mut new = body.clone();
                    new["app_filters"] = super::stored_filters(&body["app_filters"]);
                    tx.execute(
                        "INSERT INTO workers (id, authority, body, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)",
                        params![id, authority, new.to_string(), now],
                    )?;
                    id
                }
            };
            // A node that names itself counts once however often it registers (a
            // crashed and restarted process is the same node).
            if let Some(node) = &registration.node_id {
                tx.execute(
                    "INSERT INTO worker_nodes (worker, node, seen_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (worker, node) DO UPDATE SET seen_at = excluded.seen_at, left_at = NULL",
                    params![id, node, now],
                )?;
                recount(&tx, &id, Some(&now))?;
            }
            tx.commit()?;
            parse_id(&id)
        })
    }

    pub(super) fn heartbeat(
        &self,
        id: &uuid::Uuid,
        node: Option<&str>,
    ) -> Result<bool, StoreError> {
        let now = now();
        self.with(|c| {
            if let Some(node) = node {
                let tx = c.unchecked_transaction()?;
                let id = id.to_string();
                let known: Option<String> = tx
                    .query_row("SELECT id FROM workers WHERE id = ?1", params![id], |r| {
                        r.get(0)
                    })
                    .optional()?;
                if known.is_none() {
                    return Ok(false);
                }
                // A node that left must register again before its heartbeats count.
                if tx.execute(
                    "INSERT INTO worker_nodes (worker, node, seen_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (worker, node) DO UPDATE SET seen_at = excluded.seen_at
                        WHERE worker_nodes.left_at IS NULL",
                    params![id, node, now],
                )? == 0
                {
                    return Err(super::node_left(node));
                }
                recount(&tx, &id, Some(&now))?;
                tx.commit()?;
                return Ok(true);
            }
            // Without node names, a worker whose nodes all deregistered (none left)
            // is not made `ALIVE` by a heartbeat: only a registration does that.
            Ok(c.execute(
                "UPDATE workers SET updated_at = ?1,
                    status = CASE WHEN nodes > 0 THEN 'ALIVE' ELSE status END WHERE id = ?2",
                params![now, id.to_string()],
            )? == 1)
        })
    }

    pub(super) fn deregister_worker(
        &self,
        id: &uuid::Uuid,
        node: Option<&str>,
    ) -> Result<bool, StoreError> {
        let now = now();
        self.with(|c| {
            if let Some(node) = node {
                let tx = c.unchecked_transaction()?;
                let id = id.to_string();
                tx.execute(
                    "UPDATE worker_nodes SET left_at = ?3 WHERE worker = ?1 AND node = ?2 AND left_at IS NULL",
                    params![id, node, now],
                )?;
                let found = recount(&tx, &id, Some(&now))? == 1;
                tx.commit()?;
                return Ok(found);
            }
            Ok(c.execute(
                "UPDATE workers SET nodes = MAX(nodes - 1, 0),
                    status = CASE WHEN nodes - 1 <= 0 THEN 'LOST' ELSE status END,
                    updated_at = ?1 WHERE id = ?2",
                params![now, id.to_string()],
            )? == 1)
        })
    }

    pub(super) fn mark_lost(
        &self,
        timeout_secs: u64,
        deadline: std::time::SystemTime,
    ) -> Result<Vec<(uuid::Uuid, String)>, StoreError> {
        self.with(|c| {
            // Judged on the wall clock once the connection is this call's, and only
            // within the call's deadline on that clock: a host suspended while the
            // call waited for the connection (the call's own deadline is on the
            // monotonic clock, which may stand still meanwhile) would have its
            // workers' heartbeats look old, though they had no one to reach, as
            // PostgreSQL's statements do nothing past it.
            let now = std::time::SystemTime::now();
            if now > deadline {
                return Err(StoreError::Unavailable(
                    "the worker-lost check ran past its deadline".into(),
                ));
            }
            // Checked: a timeout reaching back before the epoch (u64::MAX panicked
            // here every pass) finds no heartbeat older.
            let cutoff = appproxy_shared::telemetry::Rfc3339(
                now.checked_sub(std::time::Duration::from_secs(timeout_secs))
                    .unwrap_or(std::time::UNIX_EPOCH),
            )
            .to_string();
            // Nodes that left are forgotten a day later.
            let left_cutoff = appproxy_shared::telemetry::Rfc3339(
                now.checked_sub(std::time::Duration::from_secs(86_400))
                    .unwrap_or(std::time::UNIX_EPOCH),
            )
            .to_string();
            let tx = c.unchecked_transaction()?;
            // A stamp ahead of the clock was taken before the clock stepped back (an
            // NTP step, a host's clock set right): judged from it, a worker that
            // fell silent meanwhile would be found lost the step later. It is
            // brought back to now, and judged from there.
            let now = appproxy_shared::telemetry::Rfc3339(now).to_string();
            tx.execute(
                "UPDATE workers SET updated_at = ?1 WHERE status = 'ALIVE' AND updated_at > ?1",
                params![now],
            )?;
            tx.execute(
                "UPDATE worker_nodes SET seen_at = ?1 WHERE left_at IS NULL AND seen_at > ?1",
                params![now],
            )?;
            tx.execute(
                "UPDATE worker_nodes SET left_at = ?1 WHERE left_at > ?1",
                params![now],
            )?;
            // Nodes that stopped heartbeating (crashed) no longer count.
            let stale: Vec<String> = {
                let mut st =
                    tx.prepare("DELETE FROM worker_nodes WHERE (left_at IS NULL AND seen_at < ?1) OR left_at < ?2 RETURNING worker")?;
                let rows = st.query_map(params![cutoff, left_cutoff], |r| r.get::<_, String>(0))?;
                rows.collect::<Result<_, _>>()?
            };
            for id in &stale {
                recount(&tx, id, None)?;
            }
            let mut lost = Vec::new();
            {
                let mut st = tx.prepare(
                    "SELECT id, authority FROM workers WHERE status = 'ALIVE' AND updated_at < ?1",
                )?;
                let rows = st.query_map(params![cutoff], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })?;
                for row in rows {
                    let (id, authority) = row?;
                    lost.push((parse_id(&id)?, authority));
                }
            }
            for (id, _) in &lost {
                tx.execute(
                    "UPDATE workers SET status = 'LOST' WHERE id = ?1",
                    params![id.to_string()],
                )?;
            }
            tx.commit()?;
            Ok(lost)
        })
    }

    pub(super) fn workers(&self, which: super::Which) -> Result<Vec<WorkerRow>, StoreError> {
        // `?1`: one worker's ID, or NULL; `?2`: only `ALIVE` ones. Only the rows taken
        // have their registration parsed.
        let (one, alive) = match which {
            super::Which::All => (None, false),
            super::Which::Alive => (None, true),
            super::Which::One(id) => (Some(id.to_string()), false),
        };
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT id, body, status, nodes, created_at, updated_at FROM workers
                 WHERE (?1 IS NULL OR id = ?1) AND (NOT ?2 OR status = 'ALIVE') ORDER BY authority",
            )?;
            let rows = st.query_map(params![one, alive], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, body, status, nodes, created_at, updated_at) = row?;
                let id = parse_id(&id)?;
                let body = serde_json::from_str(&body).map_err(|e| {
                    StoreError::Data(format!("worker {id}: stored registration is not JSON: {e}"))
                })?;
                out.push(WorkerRow::new(
                    id, body, status, nodes, created_at, updated_at,
                )?);
            }
            Ok(out)
        })
    }

    pub(super) fn insert_circuit(
        &self,
        circuit: &Circuit,
        origin_request_id: Option<&str>,
        (traceparent, tracestate): &(Option<String>, Option<String>),
        limit: Option<(uuid::Uuid, u32)>,
        creating_for: Option<std::time::Duration>,
    ) -> Result<(), StoreError> {
        // The store stamps the times, as PostgreSQL's `now()` does.
        let now = now();
        let creating_until = creating_for.map(|d| {
            appproxy_shared::telemetry::Rfc3339(std::time::SystemTime::now() + d).to_string()
        });
        let mut circuit = circuit.clone();
        circuit.created_at = Some(now.clone());
        circuit.updated_at = Some(now.clone());
        let circuit = &circuit;
        let body = serde_json::to_string(circuit)?;
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let worker = circuit.worker.map(|w| w.to_string()).unwrap_or_default();
            // With a session limit, the count is the insert's own condition (one
            // statement on the one connection: nothing runs between them).
            let (limit_session, limit_n) = match limit {
                Some((session, n)) => (Some(session.to_string()), i64::from(n)),
                None => (None, 0),
            };
            let inserted = tx
                .execute(
                    "INSERT INTO circuits (id, worker, port, subdomain, body, origin_request_id, created_at, updated_at, endpoint_id, idle_check_at, traceparent, tracestate, creating_until)
                     SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8, ?9, ?10, ?11, ?14
                     WHERE ?12 IS NULL OR (SELECT count(*) FROM circuit_sessions s
                         JOIN circuits c ON c.id = s.circuit
                         WHERE s.session = ?12 AND c.endpoint_id IS NULL) < ?13",
                    params![
                        circuit.id.to_string(),
                        worker,
                        circuit.port.map(i64::from),
                        circuit.subdomain,
                        body,
                        origin_request_id,
                        now,
                        circuit.endpoint_id.map(|e| e.to_string()),
                        super::idle_collectable(circuit).then_some(&now),
                        traceparent,
                        tracestate,
                        limit_session,
                        limit_n,
                        creating_until
                    ],
                )
                .map_err(conflict_or)?;
            if inserted == 0 {
                return Err(StoreError::SessionLimit(
                    limit.map(|(_, n)| n).unwrap_or_default(),
                ));
            }
            index_sessions(&tx, circuit)?;
            log_change(&tx, &worker, &circuit.id.to_string(), &now, None)?;
            tx.commit()?;
            Ok(())
        })
    }

    pub(super) fn update_routes(
        &self,
        id: &uuid::Uuid,
        routes: &[RouteInfo],
        (traceparent, tracestate): &(Option<String>, Option<String>),
    ) -> Result<bool, StoreError> {
        let Some((mut circuit, _)) = self.circuit(id)? else {
            return Ok(false);
        };
        let now = now();
        circuit.route_info = routes.to_vec();
        circuit.session_ids = routes.iter().map(|r| r.session_id).collect();
        circuit.updated_at = Some(now.clone());
        let body = serde_json::to_string(&circuit)?;
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let worker: Option<String> = tx
                .query_row(
                    "UPDATE circuits SET body = ?1, updated_at = ?2, traceparent = ?4, tracestate = ?5
                     WHERE id = ?3 RETURNING worker",
                    params![body, now, id.to_string(), traceparent, tracestate],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(worker) = worker else {
                return Ok(false);
            };
            index_sessions(&tx, &circuit)?;
            log_change(&tx, &worker, &id.to_string(), &now, None)?;
            tx.commit()?;
            Ok(true)
        })
    }

    pub(super) fn circuit(&self, id: &uuid::Uuid) -> Result<Option<CircuitRow>, StoreError> {
        self.one_circuit("id", id)
    }

    /// The circuit whose `column` (a unique key) is `key`.
    fn one_circuit(
        &self,
        column: &str,
        key: &uuid::Uuid,
    ) -> Result<Option<CircuitRow>, StoreError> {
        self.with(|c| {
            let row = c
                .query_row(
                    &format!("SELECT {CIRCUIT_COLUMNS} FROM circuits WHERE {column} = ?1"),
                    params![key.to_string()],
                    |r| raw_circuit(r, 0),
                )
                .optional()?;
            row.map(circuit_row).transpose()
        })
    }

    pub(super) fn circuits(
        &self,
        worker: Option<&uuid::Uuid>,
    ) -> Result<Vec<CircuitRow>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {CIRCUIT_COLUMNS} FROM circuits
                 WHERE ?1 IS NULL OR worker = ?1 ORDER BY created_at, rowid"
            ))?;
            let out = circuit_rows(&mut st, params![worker.map(|w| w.to_string())])?;
            Ok(out)
        })
    }

    pub(super) fn used_slots(
        &self,
        port_workers: &[uuid::Uuid],
        subdomain: &str,
    ) -> Result<Vec<UsedSlot>, StoreError> {
        self.with(|c| {
            let mut out = Vec::new();
            let mut push = |rows: rusqlite::MappedRows<'_, _>| -> Result<(), StoreError> {
                for row in rows {
                    let (w, port, sub): (String, Option<i64>, Option<String>) = row?;
                    out.push((parse_id(&w)?, port.and_then(|p| u16::try_from(p).ok()), sub));
                }
                Ok(())
            };
            let columns = |r: &rusqlite::Row<'_>| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                ))
            };
            let mut st = c.prepare_cached(
                "SELECT worker, port, subdomain FROM circuits WHERE worker = ?1 AND port IS NOT NULL",
            )?;
            for w in port_workers {
                push(st.query_map(params![w.to_string()], columns)?)?;
            }
            let mut st = c.prepare_cached(
                "SELECT worker, port, subdomain FROM circuits WHERE subdomain = ?1",
            )?;
            push(st.query_map(params![subdomain], columns)?)?;
            Ok(out)
        })
    }

    pub(super) fn used_port_counts(
        &self,
        ranges: &[(uuid::Uuid, u16, u16)],
    ) -> Result<std::collections::HashMap<uuid::Uuid, u64>, StoreError> {
        self.with(|c| {
            // The worker's kept count, less its ports outside the range (two range
            // reads of the `(worker, port)` index, empty but for a worker whose
            // range changed): no read of the ports inside it.
            let mut st = c.prepare_cached(
                "SELECT port_circuits
                     - (SELECT count(*) FROM circuits WHERE worker = ?1 AND port < ?2)
                     - (SELECT count(*) FROM circuits WHERE worker = ?1 AND port > ?3)
                 FROM workers WHERE id = ?1",
            )?;
            let mut out = std::collections::HashMap::new();
            for (w, lo, hi) in ranges {
                let n: i64 = st
                    .query_row(params![w.to_string(), lo, hi], |r| r.get(0))
                    .optional()?
                    .unwrap_or(0);
                if n > 0 {
                    out.insert(*w, n as u64);
                }
            }
            Ok(out)
        })
    }

    pub(super) fn used_ports(
        &self,
        worker: &uuid::Uuid,
        lo: u16,
        hi: u16,
    ) -> Result<Vec<u16>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT port FROM circuits WHERE worker = ?1 AND port BETWEEN ?2 AND ?3
                 ORDER BY port",
            )?;
            let rows = st.query_map(params![worker.to_string(), lo, hi], |r| r.get::<_, i64>(0))?;
            let mut out = Vec::new();
            for port in rows {
                out.extend(u16::try_from(port?).ok());
            }
            Ok(out)
        })
    }

    pub(super) fn circuits_of_session(
        &self,
        session: &uuid::Uuid,
    ) -> Result<Vec<CircuitRow>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT body, origin_request_id, traceparent, tracestate
                 FROM circuit_sessions s JOIN circuits ON circuits.id = s.circuit
                 WHERE s.session = ?1 ORDER BY circuits.created_at, circuits.rowid",
            )?;
            let out = circuit_rows(&mut st, params![session.to_string()])?;
            Ok(out)
        })
    }

    pub(super) fn upsert_endpoint(
        &self,
        id: &uuid::Uuid,
        enabled: bool,
        config: Option<&serde_json::Value>,
        settle: Option<&uuid::Uuid>,
    ) -> Result<bool, StoreError> {
        let now = now();
        self.with(|c| {
            // With `settle`, one transaction: the creation of that circuit settled
            // and the row written together, or neither when the circuit is gone.
            let tx = c.unchecked_transaction()?;
            if let Some(circuit) = settle {
                let settled = tx.execute(
                    "UPDATE circuits SET creating_until = NULL WHERE id = ?1",
                    params![circuit.to_string()],
                )?;
                if settled == 0 {
                    return Ok(false);
                }
            }
            tx.execute(
                "INSERT INTO endpoints (id, health_check_enabled, health_check_config, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT (id) DO UPDATE SET health_check_enabled = ?2, health_check_config = ?3, updated_at = ?4",
                params![id.to_string(), enabled, config.map(|v| v.to_string()), now],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    pub(super) fn settle_creation(&self, id: &uuid::Uuid) -> Result<bool, StoreError> {
        self.with(|c| {
            Ok(c.execute(
                "UPDATE circuits SET creating_until = NULL WHERE id = ?1",
                params![id.to_string()],
            )? == 1)
        })
    }

    pub(super) fn renew_creations(
        &self,
        ids: &[uuid::Uuid],
        under_way_for: std::time::Duration,
    ) -> Result<u64, StoreError> {
        let now = now();
        let until =
            appproxy_shared::telemetry::Rfc3339(std::time::SystemTime::now() + under_way_for)
                .to_string();
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let mut renewed = 0;
            {
                let mut st = tx.prepare_cached(
                    "UPDATE circuits SET creating_until = ?2 WHERE id = ?1 AND creating_until > ?3",
                )?;
                for id in ids {
                    renewed += st.execute(params![id.to_string(), until, now])? as u64;
                }
            }
            tx.commit()?;
            Ok(renewed)
        })
    }

    pub(super) fn creation_mark(
        &self,
        id: &uuid::Uuid,
    ) -> Result<Option<super::CreationMark>, StoreError> {
        let now = now();
        self.with(|c| {
            let row: Option<Option<String>> = c
                .query_row(
                    "SELECT creating_until FROM circuits WHERE id = ?1",
                    params![id.to_string()],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(row.map(|until| {
                super::CreationMark::of(until.is_some(), until.is_some_and(|u| u > now))
            }))
        })
    }

    pub(super) fn overdue_creations(&self, limit: usize) -> Result<Vec<uuid::Uuid>, StoreError> {
        let now = now();
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT id FROM circuits WHERE creating_until IS NOT NULL AND creating_until <= ?1
                 ORDER BY creating_until LIMIT ?2",
            )?;
            let rows = st.query_map(params![now, limit as i64], |r| r.get::<_, String>(0))?;
            let mut out = Vec::new();
            for row in rows {
                out.push(parse_id(&row?)?);
            }
            Ok(out)
        })
    }

    pub(super) fn endpoint(
        &self,
        id: &uuid::Uuid,
    ) -> Result<Option<(bool, Option<serde_json::Value>)>, StoreError> {
        self.with(|c| {
            let row: Option<(bool, Option<String>)> = c
                .query_row(
                    "SELECT health_check_enabled, health_check_config FROM endpoints WHERE id = ?1",
                    params![id.to_string()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            match row {
                Some((enabled, config)) => Ok(Some((
                    enabled,
                    config.map(|t| serde_json::from_str(&t)).transpose()?,
                ))),
                None => Ok(None),
            }
        })
    }

    pub(super) fn health_checked_endpoints(
        &self,
    ) -> Result<Vec<(uuid::Uuid, serde_json::Value)>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, health_check_config FROM endpoints
                 WHERE health_check_enabled AND health_check_config IS NOT NULL",
            )?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (id, config) = row?;
                let id = uuid::Uuid::parse_str(&id).map_err(|e| StoreError::Data(e.to_string()))?;
                out.push((id, serde_json::from_str(&config)?));
            }
            Ok(out)
        })
    }

    pub(super) fn delete_endpoint(&self, id: &uuid::Uuid) -> Result<bool, StoreError> {
        self.with(|c| {
            Ok(c.execute(
                "DELETE FROM endpoints WHERE id = ?1",
                params![id.to_string()],
            )? == 1)
        })
    }

    pub(super) fn circuit_of_endpoint(
        &self,
        endpoint: &uuid::Uuid,
    ) -> Result<Option<CircuitRow>, StoreError> {
        self.one_circuit("endpoint_id", endpoint)
    }

    pub(super) fn delete_circuit(
        &self,
        id: &uuid::Uuid,
        by: &Behind,
        only_overdue: bool,
    ) -> Result<bool, StoreError> {
        let now = now();
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let worker: Option<String> = tx
                .query_row(
                    "DELETE FROM circuits WHERE id = ?1 AND (NOT ?2 OR creating_until <= ?3)
                     RETURNING worker",
                    params![id.to_string(), only_overdue, now],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(worker) = worker else {
                return Ok(false);
            };
            log_change(&tx, &worker, &id.to_string(), &now, Some(by))?;
            tx.commit()?;
            Ok(true)
        })
    }

    pub(super) fn endpoint_circuits(&self) -> Result<Vec<CircuitRow>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {CIRCUIT_COLUMNS} FROM circuits WHERE endpoint_id IS NOT NULL"
            ))?;
            let out = circuit_rows(&mut st, [])?;
            Ok(out)
        })
    }

    pub(super) fn circuit_count(&self) -> Result<u64, StoreError> {
        self.with(|c| {
            let n: i64 = c.query_row("SELECT count(*) FROM circuits", [], |r| r.get(0))?;
            Ok(n.max(0) as u64)
        })
    }

    pub(super) fn circuit_counts(
        &self,
    ) -> Result<std::collections::HashMap<uuid::Uuid, u64>, StoreError> {
        self.with(|c| {
            let mut st =
                c.prepare_cached("SELECT worker, count(*) FROM circuits GROUP BY worker")?;
            let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            let mut out = std::collections::HashMap::new();
            for row in rows {
                let (w, n) = row?;
                out.insert(parse_id(&w)?, n.max(0) as u64);
            }
            Ok(out)
        })
    }

    pub(super) fn held_slots(
        &self,
        worker: Option<&uuid::Uuid>,
    ) -> Result<Vec<super::HeldSlot>, StoreError> {
        self.with(|c| {
            // One worker's by its index (`?1 IS NULL OR worker = ?1` scans the
            // table), or all.
            let mut st = c.prepare_cached(if worker.is_some() {
                "SELECT worker, id, port, subdomain FROM circuits
                 WHERE worker = ?1 ORDER BY created_at, rowid"
            } else {
                "SELECT worker, id, port, subdomain FROM circuits ORDER BY created_at, rowid"
            })?;
            let one = worker.map(|w| w.to_string());
            let rows = st.query_map(rusqlite::params_from_iter(one.iter()), |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (w, id, port, sub) = row?;
                out.push((
                    parse_id(&w)?,
                    parse_id(&id)?,
                    port.and_then(|p| u16::try_from(p).ok()),
                    sub,
                ));
            }
            Ok(out)
        })
    }

    pub(super) fn revision(&self, worker: &uuid::Uuid) -> Result<Option<u64>, StoreError> {
        self.with(|c| revision_of(c, &worker.to_string()))
    }

    pub(super) fn changes_since(
        &self,
        worker: &uuid::Uuid,
        since: u64,
        limit: usize,
    ) -> Result<Changes, StoreError> {
        let w = worker.to_string();
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let Some(current) = revision_of(&tx, &w)? else {
                return Ok(Changes::Resync { revision: 0 });
            };
            if since == current {
                return Ok(Changes::Since {
                    revision: current,
                    upserts: Vec::new(),
                    removed: Vec::new(),
                    more: false,
                });
            }
            let oldest: Option<i64> = tx.query_row(
                "SELECT min(revision) FROM circuit_changes WHERE worker = ?1",
                params![w],
                |r| r.get(0),
            )?;
            // Ahead of the store (a store started afresh) or behind what the log
            // still holds: only the whole set will do.
            if since > current || oldest.is_none_or(|o| (o.max(1) as u64) > since + 1) {
                return Ok(Changes::Resync { revision: current });
            }
            let mut st = tx.prepare(
                "SELECT l.revision, l.circuit, c.body, c.origin_request_id, c.traceparent, c.tracestate,
                    l.request_id, l.traceparent, l.tracestate, l.removal
                 FROM circuit_changes l LEFT JOIN circuits c ON c.id = l.circuit AND c.worker = l.worker
                 WHERE l.worker = ?1 AND l.revision > ?2 ORDER BY l.revision LIMIT ?3",
            )?;
            let rows = st.query_map(params![w, since as i64, limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    (r.get(3)?, r.get(4)?, r.get(5)?),
                    (
                        r.get::<_, Option<String>>(6)?,
                        r.get::<_, Option<String>>(7)?,
                        r.get::<_, Option<String>>(8)?,
                    ),
                    r.get::<_, Option<bool>>(9)?,
                ))
            })?;
            let mut log = Vec::new();
            for row in rows {
                let (revision, circuit, body, (origin, traceparent, tracestate), removal, kind) =
                    row?;
                let circuit = parse_id(&circuit)?;
                let body = match body {
                    Some(b) => Logged::Present(circuit_row((b, origin, traceparent, tracestate))?),
                    None if kind == Some(false) => Logged::Superseded,
                    None => Logged::Removed(Origin::stored(
                        removal.0,
                        removal.1.as_deref(),
                        removal.2.as_deref(),
                    )),
                };
                log.push((revision.max(0) as u64, circuit, body));
            }
            Ok(Changes::from_log(since, current, log))
        })
    }

    pub(super) fn circuits_page(
        &self,
        worker: &uuid::Uuid,
        after: Option<&uuid::Uuid>,
        limit: usize,
    ) -> Result<(u64, Vec<CircuitRow>), StoreError> {
        let w = worker.to_string();
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let revision = revision_of(&tx, &w)?.unwrap_or(0);
            let mut st = tx.prepare(&format!(
                "SELECT {CIRCUIT_COLUMNS} FROM circuits
                 WHERE worker = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
            ))?;
            let out = circuit_rows(
                &mut st,
                params![
                    w,
                    after.map(|a| a.to_string()).unwrap_or_default(),
                    limit as i64
                ],
            )?;
            Ok((revision, out))
        })
    }

    pub(super) fn idle_due(&self, now: &str, limit: usize) -> Result<Vec<Circuit>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT body FROM circuits WHERE idle_check_at IS NOT NULL AND idle_check_at <= ?1
                 ORDER BY idle_check_at LIMIT ?2",
            )?;
            let rows = st.query_map(params![now, limit as i64], |r| r.get::<_, String>(0))?;
            let mut out = Vec::new();
            for row in rows {
                out.push(serde_json::from_str(&row?)?);
            }
            Ok(out)
        })
    }

    pub(super) fn defer_idle_checks(
        &self,
        checks: &[(uuid::Uuid, String)],
    ) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            {
                let mut st =
                    tx.prepare_cached("UPDATE circuits SET idle_check_at = ?1 WHERE id = ?2")?;
                for (id, at) in checks {
                    st.execute(params![at, id.to_string()])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    pub(super) fn prune_changes(&self, before: &str) -> Result<usize, StoreError> {
        self.with(|c| Ok(c.execute("DELETE FROM circuit_changes WHERE at < ?1", params![before])?))
    }

    pub(super) fn prune_tokens(&self, before: &str) -> Result<usize, StoreError> {
        self.with(|c| Ok(c.execute("DELETE FROM tokens WHERE created_at < ?1", params![before])?))
    }

    pub(super) fn insert_token(
        &self,
        id: &uuid::Uuid,
        body: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO tokens (id, body, created_at) VALUES (?1, ?2, ?3)",
                params![id.to_string(), body.to_string(), now()],
            )
            .map_err(conflict_or)?;
            Ok(())
        })
    }

    /// The token `id`, unless it was made before `made_since` (`None`: any age).
    pub(super) fn token(
        &self,
        id: &uuid::Uuid,
        made_since: Option<&str>,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        self.with(|c| {
            let body: Option<String> = c
                .query_row(
                    "SELECT body FROM tokens WHERE id = ?1 AND (?2 IS NULL OR created_at >= ?2)",
                    params![id.to_string(), made_since],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(match body {
                Some(b) => Some(serde_json::from_str(&b)?),
                None => None,
            })
        })
    }
}
