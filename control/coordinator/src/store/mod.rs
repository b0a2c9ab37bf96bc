//! The circuit store: workers, circuits (with the nullable `origin_request_id` of the
//! request that created them, the W3C trace context of the request behind their
//! latest change, and the mark of a creation still under way, [`CreationMark`]), each worker's revision and change log (a removal's entry keeps
//! the removing request's ID and trace context) and count of circuits holding a
//! port, worker app filters and `/v2/conf`
//! tokens, behind one async interface over two engines:
//!
//! - [`postgres`]: PostgreSQL through a `deadpool-postgres` pool, on the original
//!   platform's schema (native enums, typed columns) plus `origin_request_id`;
//! - [`sqlite`]: embedded SQLite for single-node use, the default when no PostgreSQL URL
//!   is set; its calls run on tokio's blocking pool.
//!
//! Both apply versioned migrations at open; the store test suite runs against both.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use appproxy_shared::model::Circuit;
use appproxy_shared::wire::WorkerRegistration;
use serde::Deserialize;

/// A worker as stored: its ID, registration body (the wire's `WorkerRequestModel`
/// fields, `app_filters` included), status and times.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRow {
    /// The worker's ID.
    pub id: uuid::Uuid,
    /// The registration as stored (JSON in the wire's shape, keys this version does
    /// not know included): what the worker answers echo.
    pub body: serde_json::Value,
    /// The same registration, read once when the row is loaded: what placement,
    /// URLs and slot counts use.
    pub registration: WorkerRegistration,
    /// `ALIVE | LOST | TERMINATED`.
    pub status: String,
    /// HA node count: registrations minus deregistrations.
    pub nodes: i64,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339; the last registration or heartbeat.
    pub updated_at: String,
}

impl WorkerRow {
    /// A row from its stored parts; a registration that does not read is
    /// [`StoreError::Data`] naming the worker.
    pub fn new(
        id: uuid::Uuid,
        body: serde_json::Value,
        status: String,
        nodes: i64,
        created_at: String,
        updated_at: String,
    ) -> Result<Self, StoreError> {
        let registration = WorkerRegistration::deserialize(&body).map_err(|e| {
            StoreError::Data(format!(
                "worker {id} ({}): stored registration does not read: {e}",
                body.get("authority")
                    .and_then(|a| a.as_str())
                    .unwrap_or("?")
            ))
        })?;
        Ok(Self {
            id,
            body,
            registration,
            status,
            nodes,
            created_at,
            updated_at,
        })
    }
}

/// A slot in use: the worker, and the circuit's port or subdomain.
pub type UsedSlot = (uuid::Uuid, Option<u16>, Option<String>);

/// A slot held by a circuit: its worker, the circuit, and its port or subdomain.
pub type HeldSlot = (uuid::Uuid, uuid::Uuid, Option<u16>, Option<String>);

/// A circuit and what the store keeps of the requests behind it.
pub type CircuitRow = (Circuit, Origin);

/// What a stored circuit keeps of the requests behind it — or, for a removed
/// circuit, what its change-log entry keeps of the request that removed it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin {
    /// The ID of the request that created it (NULL when the manager sent none); of a
    /// removal, the ID of the removing request (none for entries logged before the
    /// store kept it).
    pub request_id: Option<String>,
    /// The W3C trace context of the request behind its latest change (its creation,
    /// a route update, its removal), when that request was traced; validated when
    /// read, so a stored value that is not valid reads as none.
    pub trace: Option<appproxy_shared::TraceContext>,
}

impl Origin {
    /// An origin as stored: the trace context is read by the carried-context rules
    /// ([`appproxy_shared::TraceContext::read`]): an invalid or oversized
    /// `traceparent` is none, a `tracestate` only with a valid one.
    pub(crate) fn stored(
        request_id: Option<String>,
        traceparent: Option<&str>,
        tracestate: Option<&str>,
    ) -> Self {
        Self {
            request_id,
            trace: appproxy_shared::TraceContext::read(traceparent, tracestate),
        }
    }
}

/// The stored columns of the request behind a removal: its ID, and its trace
/// context's ([`trace_columns`]).
pub(crate) type Behind = (Option<String>, (Option<String>, Option<String>));

/// A change-log entry as read: the circuit as it is now, or removed (with what the
/// entry keeps of the removing request).
#[derive(Debug)]
// Entries are built and folded one by one, in place of the `Option<CircuitRow>` of
// the same size they replace: boxing the row would cost an allocation per change.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Logged {
    /// Created or updated: the circuit's row.
    Present(CircuitRow),
    /// Removed, by the request the entry names (none: an entry from before the log
    /// recorded removals as such).
    Removed(Origin),
    /// A creation or update of a circuit since removed: a later entry, the removal's
    /// own, says so with its request. The entry still counts in the answer's
    /// revision.
    Superseded,
}

/// The columns a trace context is stored in: `traceparent`, `tracestate`.
pub(crate) fn trace_columns(
    trace: Option<&appproxy_shared::TraceContext>,
) -> (Option<String>, Option<String>) {
    match trace {
        Some(t) => (
            Some(t.traceparent_text()),
            t.tracestate_text().map(str::to_owned),
        ),
        None => (None, None),
    }
}

/// What changed in one worker's circuit set after a revision.
#[derive(Debug, Clone, PartialEq)]
pub enum Changes {
    /// The log no longer reaches back that far (or the revision is ahead of the
    /// store's, as after a store started afresh): read the whole set, then ask again
    /// from `revision`.
    Resync {
        /// The worker's revision now.
        revision: u64,
    },
    /// The circuits changed after the asked revision up to `revision`, each once.
    Since {
        /// The revision these changes bring the caller to (the worker's current one,
        /// or an earlier one when more changes follow: ask again from it).
        revision: u64,
        /// Circuits created or updated, as they are now.
        upserts: Vec<CircuitRow>,
        /// Circuits removed, each with what the store keeps of the request that
        /// removed it (its ID and trace context, when the entry has them).
        removed: Vec<(uuid::Uuid, Origin)>,
        /// More changes follow `revision`: ask again from it.
        more: bool,
    },
}

impl Changes {
    /// Folds log entries (revision, circuit, the circuit now or its removal) read
    /// after `since` into one change per circuit.
    ///
    /// The answer stays within [`ANSWER_BYTES`] of JSON: entries past the budget are
    /// left for the next answer (`more`, from the revision of the last entry taken),
    /// at least one entry always taken.
    pub(crate) fn from_log(since: u64, current: u64, log: Vec<(u64, uuid::Uuid, Logged)>) -> Self {
        Self::from_log_within(since, current, log, ANSWER_BYTES)
    }

    /// [`Changes::from_log`] within `budget` bytes of JSON.
    fn from_log_within(
        since: u64,
        current: u64,
        mut log: Vec<(u64, uuid::Uuid, Logged)>,
        budget: usize,
    ) -> Self {
        // One entry per revision: cutting the log after any entry leaves a revision
        // to ask again from. A circuit counts once however many entries it has (each
        // carries it as it is now, and the answer carries it once).
        let mut spent = ANSWER_ENVELOPE_BYTES;
        let mut counted: std::collections::HashSet<uuid::Uuid> = Default::default();
        let cut = log.iter().enumerate().position(|(i, (_, id, body))| {
            let cost = match body {
                Logged::Present(row) if counted.insert(*id) => encoded_row_len(row),
                Logged::Removed(by) if counted.insert(*id) => encoded_removal_len(by),
                _ => 0,
            };
            spent = spent.saturating_add(cost);
            i > 0 && spent > budget
        });
        if let Some(cut) = cut {
            log.truncate(cut);
        }
        let revision = log.last().map_or(current.max(since), |(r, _, _)| *r);
        let mut last: std::collections::HashMap<uuid::Uuid, usize> = Default::default();
        for (i, (_, id, _)) in log.iter().enumerate() {
            last.insert(*id, i);
        }
        let mut upserts = Vec::new();
        let mut removed = Vec::new();
        for (i, (_, id, body)) in log.into_iter().enumerate() {
            if last.get(&id) != Some(&i) {
                continue;
            }
            match body {
                Logged::Present(row) => upserts.push(row),
                Logged::Removed(by) => removed.push((id, by)),
                Logged::Superseded => {}
            }
        }
        Self::Since {
            revision,
            upserts,
            removed,
            more: revision < current,
        }
    }
}

/// The most bytes of JSON one page or change list of a worker's set carries (a
/// circuit alone larger than this still comes, alone): a quarter of the 16 MiB a
/// worker's agent reads of one answer, so answers of large circuits (long `args`
/// and app names, endpoints with many routes) come in more pages, never one the
/// agent cannot read. The agent follows `next` and `more` as it does for the
/// count limit ([`appproxy_shared::wire::MAX_CIRCUITS_PER_ANSWER`]).
pub const ANSWER_BYTES: usize = 4 << 20;

/// What an answer's fields besides its circuits take at most (`revision`, `next`,
/// `more`, keys and brackets).
const ANSWER_ENVELOPE_BYTES: usize = 256;

/// The JSON bytes `value` encodes to, counted without building the text.
fn encoded_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    // Serialising into a counter fails only for values JSON cannot hold (none
    // here): then it counts what was written.
    let _ = serde_json::to_writer(&mut n, value);
    n.0
}

/// What an `origins` entry and a `traces` entry keyed by a circuit ID take (the
/// key, quotes, colon, comma: 40 bytes each).
fn encoded_origin_len(o: &Origin) -> usize {
    let request = o.request_id.as_ref().map_or(0, |r| 40 + encoded_len(r));
    let trace = o.trace.as_ref().map_or(0, |t| {
        40 + encoded_len(&appproxy_shared::wire::ChangeTrace::from(t))
    });
    request + trace
}

/// The bytes a circuit adds to a page or change list: the circuit with its comma,
/// and its `origins` and `traces` entries.
pub fn encoded_row_len(row: &CircuitRow) -> usize {
    1 + encoded_len(&row.0) + encoded_origin_len(&row.1)
}

/// The bytes a removal adds to a change list: its ID in `removed`, and its
/// `removed_by` and `traces` entries.
fn encoded_removal_len(by: &Origin) -> usize {
    39 + encoded_origin_len(by)
}

/// How many of `rows`, from the first, a page carries within `budget` bytes of
/// JSON (at least one, when there is one).
pub fn rows_within(rows: &[CircuitRow], budget: usize) -> usize {
    let mut spent = ANSWER_ENVELOPE_BYTES;
    rows.iter()
        .position(|row| {
            spent = spent.saturating_add(encoded_row_len(row));
            spent > budget
        })
        .map_or(rows.len(), |i| i.max(1))
}

/// How long the change log keeps an entry: a worker that has not asked for that
/// long reads its whole set again.
pub const CHANGE_LOG_RETENTION_SECS: u64 = 600;

/// Where a stored circuit's creation stands (`circuits.creating_until`, on the
/// store's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreationMark {
    /// Settled (acknowledged and answered), or stored before creations were
    /// marked: a circuit to hand out.
    Settled,
    /// A creation still under way, on this coordinator or another: no answer to
    /// give anyone else before its outcome.
    UnderWay,
    /// Marked under way past its bound: the creation failed (or its coordinator
    /// stopped) and its circuit was not withdrawn. Never handed out; the sweep
    /// withdraws it.
    Overdue,
}

impl CreationMark {
    /// From whether the row is marked, and whether the mark is still ahead.
    pub(crate) fn of(marked: bool, ahead: bool) -> Self {
        match (marked, ahead) {
            (false, _) => Self::Settled,
            (true, true) => Self::UnderWay,
            (true, false) => Self::Overdue,
        }
    }
}

/// Whether idle collection applies to a circuit (interactive HTTP): only those get
/// an idle check scheduled.
pub(crate) fn idle_collectable(c: &Circuit) -> bool {
    c.app_mode == appproxy_shared::model::AppMode::Interactive
        && matches!(c.protocol, appproxy_shared::model::ProxyProtocol::Http)
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL said no: its SQLSTATE and message, which the driver's own text
    /// ("db error") leaves out.
    #[error("database: {}", postgres_text(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No PostgreSQL connection could be had from the pool.
    #[error("database pool: {0}")]
    Pool(String),
    /// A unique key is taken (a port or subdomain raced by another creation).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The session already holds its limit of live circuits
    /// (`[limits] max_circuits_per_session`, the value given): nothing stored.
    #[error("the session holds {0} circuits, its limit")]
    SessionLimit(u32),
    /// A stored value did not parse.
    #[error("stored data: {0}")]
    Data(String),
    /// The blocking task running a SQLite call died.
    #[error("database task failed")]
    Task,
    /// The database did not answer within the deadline, or no connection could be
    /// had: the caller answers 503 and may retry.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The store was migrated by a newer build than this one (`found` migrations
    /// applied, this build knows `known`): its tables may mean what this build does
    /// not know, so it is left untouched and the coordinator does not start.
    #[error(
        "the store's schema is at migration {found}, newer than this build knows \
         ({known}): run a build that knows it (a newer appproxy-coordinator)"
    )]
    SchemaNewer {
        /// Migrations the store records as applied.
        found: i64,
        /// Migrations this build has.
        known: usize,
    },
}

/// Whether a store that records `found` migrations as applied may be opened by a
/// build that has `known`: `found` above `known` is a newer build's schema.
pub(crate) fn schema_known(found: i64, known: usize) -> Result<(), StoreError> {
    if found > known as i64 {
        return Err(StoreError::SchemaNewer { found, known });
    }
    Ok(())
}

/// Every store call ends within this (a hung database costs a call at most this
/// long); PostgreSQL also cancels statements server-side after
/// [`STATEMENT_TIMEOUT`].
pub const CALL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// PostgreSQL's `statement_timeout`, set on every pooled connection.
pub const STATEMENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);

/// Runs a store call under [`CALL_DEADLINE`]. A call past it is dropped with its
/// PostgreSQL connection closed, never given back to the pool
/// ([`postgres::abandoning`]): the connection may be the reason it did not end.
async fn deadline<R>(
    call: impl std::future::Future<Output = Result<R, StoreError>>,
) -> Result<R, StoreError> {
    let mut call = Box::pin(call);
    match tokio::time::timeout(CALL_DEADLINE, call.as_mut()).await {
        Ok(result) => result,
        Err(_) => {
            postgres::abandoning(move || drop(call));
            Err(StoreError::Unavailable(format!(
                "no answer within {CALL_DEADLINE:?}"
            )))
        }
    }
}

/// When this process last found the store out of reach for heartbeats: a
/// heartbeat it could not store, or a worker-lost check that could not run.
static HEARTBEATS_UNSTORED: LastSeen = LastSeen::new();

/// Notes `e` when it says the store was out of reach ([`StoreError::is_unavailable`])
/// for a heartbeat or for the worker-lost check; other calls failing (a locked
/// table of their own) say nothing about heartbeats.
pub fn note_heartbeat_failure(e: &StoreError) {
    if e.is_unavailable() {
        HEARTBEATS_UNSTORED.note();
    }
}

/// How long ago heartbeats last could not be stored ([`note_heartbeat_failure`]);
/// `None`: never. A heartbeat refused then was not a heartbeat missed, so the
/// worker-lost check waits a heartbeat timeout past it.
pub fn heartbeats_unstored_ago() -> Option<std::time::Duration> {
    HEARTBEATS_UNSTORED.ago()
}

/// A moment noted by any thread, read as the time since (milliseconds from a
/// process-wide start; 0: never).
struct LastSeen(std::sync::atomic::AtomicU64);

/// The process-wide start [`LastSeen`] counts from.
static STARTED: std::sync::LazyLock<std::time::Instant> =
    std::sync::LazyLock::new(std::time::Instant::now);

impl LastSeen {
    const fn new() -> Self {
        Self(std::sync::atomic::AtomicU64::new(0))
    }

    fn note(&self) {
        // +1: a note in the very first millisecond is not "never".
        let at = STARTED.elapsed().as_millis() as u64 + 1;
        self.0.store(at, std::sync::atomic::Ordering::Relaxed);
    }

    fn ago(&self) -> Option<std::time::Duration> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            at => Some(
                STARTED
                    .elapsed()
                    .saturating_sub(std::time::Duration::from_millis(at - 1)),
            ),
        }
    }
}

/// A PostgreSQL error as the log needs it: the server's SQLSTATE, severity and
/// message (and detail) when the server answered, else the driver's text and its
/// cause (an I/O error).
fn postgres_text(e: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    match (e.as_db_error(), e.source()) {
        (Some(db), _) => {
            let mut text = format!("{} {}: {}", db.code().code(), db.severity(), db.message());
            if let Some(detail) = db.detail() {
                text.push_str(&format!(" ({detail})"));
            }
            text
        }
        (None, Some(cause)) => format!("{e}: {cause}"),
        (None, None) => e.to_string(),
    }
}

impl StoreError {
    /// Whether the database is out of reach or too slow (503), rather than refusing
    /// this call (500).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Unavailable(_) | Self::Pool(_) => true,
            // No server error: the connection itself failed. A cancelled statement
            // (`statement_timeout`) or a server going down has its own codes.
            Self::Postgres(e) => match e.code() {
                None => true,
                Some(code) => {
                    *code == tokio_postgres::error::SqlState::QUERY_CANCELED
                        || *code == tokio_postgres::error::SqlState::ADMIN_SHUTDOWN
                        || *code == tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW
                        // Another backend crashed: the server restarts its sessions.
                        || *code == tokio_postgres::error::SqlState::CRASH_SHUTDOWN
                        // The server takes no writes: a standby, or a primary demoted
                        // or set read-only (`default_transaction_read_only`) — no fault
                        // of the call, which succeeds again once writes are taken.
                        || *code == tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION
                        || code.code().starts_with("08")
                        // Insufficient resources: the server's disk full, out of memory.
                        || code.code().starts_with("53")
                }
            },
            Self::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) || self.is_storage_failure()
            }
            _ => false,
        }
    }

    /// Whether SQLite failed for want of storage — the disk full (`SQLITE_FULL`),
    /// an I/O error (`SQLITE_IOERR*`), the file read-only (`SQLITE_READONLY`) or not
    /// to be opened (`SQLITE_CANTOPEN`): no fault of the call, which may succeed
    /// once the operator makes room (503, and `/readyz` not ready meanwhile).
    pub fn is_storage_failure(&self) -> bool {
        matches!(
            self,
            Self::Sqlite(rusqlite::Error::SqliteFailure(e, _)) if matches!(
                e.code,
                rusqlite::ErrorCode::DiskFull
                    | rusqlite::ErrorCode::SystemIoFailure
                    | rusqlite::ErrorCode::ReadOnly
                    | rusqlite::ErrorCode::CannotOpen
            )
        )
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        Self::Data(e.to_string())
    }
}

/// A turn at route writes ([`Store::route_turn`]): on PostgreSQL, the pooled
/// connection holding the advisory lock. Ended with [`RouteTurn::end`], which
/// unlocks and gives the connection back; dropped otherwise (an error, a
/// cancelled request), the connection is taken out of the pool and closed, and the
/// server lets the lock go with it: a lock never stays with a pooled connection.
pub struct RouteTurn {
    pg: Option<deadpool_postgres::Object>,
}

impl RouteTurn {
    /// Gives the turn back, within [`CALL_DEADLINE`] (a silent path to the
    /// database must not hold the turn: past it, the connection is closed instead).
    pub async fn end(mut self) {
        let unlocked = match self.pg.as_ref() {
            Some(client) => tokio::time::timeout(
                CALL_DEADLINE,
                client.execute(
                    "SELECT pg_advisory_unlock($1)",
                    &[&postgres::ROUTE_WRITES_KEY],
                ),
            )
            .await
            .is_ok_and(|r| r.is_ok()),
            None => return,
        };
        if unlocked {
            // Unlocked: back to the pool.
            drop(self.pg.take());
        }
    }
}

impl Drop for RouteTurn {
    fn drop(&mut self) {
        if let Some(client) = self.pg.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// A turn at one `/v2/proxy/auth` reuse key across every coordinator on this
/// store ([`Store::reuse_turn`]): on PostgreSQL, the pooled connection holding the
/// key's advisory lock. Ended with [`ReuseTurn::end`], which unlocks and gives the
/// connection back; dropped otherwise (an error, a cancelled request), the
/// connection is taken out of the pool and closed, and the server lets the lock
/// go with it (as it does when the process stops).
pub struct ReuseTurn {
    pg: Option<deadpool_postgres::Object>,
    key: String,
    /// On PostgreSQL, one of the turns this process may hold at once; let go
    /// after the connection (dropped with the turn).
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl ReuseTurn {
    /// Gives the turn back, within [`CALL_DEADLINE`] (past it, the connection is
    /// closed instead).
    pub async fn end(mut self) {
        let unlocked = match self.pg.as_ref() {
            Some(client) => tokio::time::timeout(
                CALL_DEADLINE,
                client.execute(
                    "SELECT pg_advisory_unlock($1, hashtext($2))",
                    &[&postgres::REUSE_TURN_CLASS, &self.key],
                ),
            )
            .await
            .is_ok_and(|r| r.is_ok()),
            None => return,
        };
        if unlocked {
            drop(self.pg.take());
        }
    }
}

impl Drop for ReuseTurn {
    fn drop(&mut self) {
        if let Some(client) = self.pg.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// The store, whichever engine backs it. Cheap to clone.
#[derive(Clone)]
pub enum Store {
    /// Embedded SQLite.
    Sqlite(Arc<sqlite::SqliteStore>),
    /// PostgreSQL.
    Postgres(postgres::PgStore),
}

/// Runs a SQLite call on the blocking pool, keeping the caller's request ID; a call
/// that has not had the connection by [`CALL_DEADLINE`] does nothing.
async fn on_sqlite<R: Send + 'static>(
    store: &Arc<sqlite::SqliteStore>,
    f: impl FnOnce(&sqlite::SqliteStore) -> Result<R, StoreError> + Send + 'static,
) -> Result<R, StoreError> {
    let store = store.clone();
    let deadline = std::time::Instant::now() + CALL_DEADLINE;
    appproxy_shared::context::spawn_blocking(move || sqlite::by_deadline(deadline, || f(&store)))
        .await
        .map_err(|_| StoreError::Task)?
}

/// Store call durations per engine (`[0]` SQLite, `[1]` PostgreSQL), deadline
/// included, for `/metrics`.
pub static CALL_DURATIONS: std::sync::LazyLock<[crate::metrics::Histogram; 2]> =
    std::sync::LazyLock::new(Default::default);

macro_rules! dispatch {
    ($self:ident, |$s:ident| $sql:expr, |$p:ident| $pg:expr) => {{
        let started = std::time::Instant::now();
        let (engine, result) = match $self {
            Store::Sqlite(store) => (0, deadline(on_sqlite(store, move |$s| $sql)).await),
            Store::Postgres($p) => (1, deadline($pg).await),
        };
        CALL_DURATIONS[engine].observe(started.elapsed());
        result
    }};
}

impl Store {
    /// Opens the configured engine and migrates it: PostgreSQL when `url` is set,
    /// else SQLite at `sqlite_path`.
    pub async fn open(
        url: Option<&str>,
        sqlite_path: &std::path::Path,
    ) -> Result<Self, StoreError> {
        Self::open_with(url, sqlite_path, 16, 0).await
    }

    /// [`Store::open`] with a PostgreSQL pool of `pool_size` connections, and a
    /// SQLite file that grows no larger than `sqlite_max_bytes` (0: no limit).
    pub async fn open_with(
        url: Option<&str>,
        sqlite_path: &std::path::Path,
        pool_size: usize,
        sqlite_max_bytes: u64,
    ) -> Result<Self, StoreError> {
        match url {
            Some(url) => Ok(Self::Postgres(
                postgres::PgStore::open(url, pool_size).await?,
            )),
            None => {
                let path = sqlite_path.to_owned();
                let store = tokio::task::spawn_blocking(move || {
                    sqlite::SqliteStore::open(&path, sqlite_max_bytes)
                })
                .await
                .map_err(|_| StoreError::Task)??;
                Ok(Self::Sqlite(Arc::new(store)))
            }
        }
    }

    /// How far (seconds) the store's clock is ahead of this coordinator's: PostgreSQL's
    /// as last read (the clock every coordinator and worker shares); 0 for SQLite,
    /// which has no clock but this process's.
    pub async fn clock_ahead(&self) -> Result<f64, StoreError> {
        match self {
            Self::Sqlite(_) => Ok(0.0),
            Self::Postgres(p) => deadline(p.clock_ahead()).await,
        }
    }

    /// Which engine, for logs and `/status`.
    pub fn engine(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgresql",
        }
    }

    /// Inserts or updates a worker by authority (status back to `ALIVE`, one more HA
    /// node); its app filters become the registration's when it names them, `[]`
    /// included, and stay as they were when it does not (the original only ever
    /// added to them: a worker could grow the set every placement reads without
    /// bound, and an operator had no way to remove one). Returns its ID.
    pub async fn upsert_worker(&self, body: &serde_json::Value) -> Result<uuid::Uuid, StoreError> {
        let registration = WorkerRegistration::deserialize(body)
            .map_err(|e| StoreError::Data(format!("worker registration does not read: {e}")))?;
        let body = body.clone();
        dispatch!(self, |s| s.upsert_worker(&registration, &body), |p| p
            .upsert_worker(&registration))
    }

    /// Marks a heartbeat (status `ALIVE`); false when there is no such worker.
    pub async fn heartbeat(&self, id: uuid::Uuid) -> Result<bool, StoreError> {
        self.heartbeat_node(id, None).await
    }

    /// A heartbeat of one named HA node (`node_id` of its registration): that node
    /// is alive, `nodes` counts the distinct live ones. A node that deregistered is
    /// not counted again by a heartbeat (a late one, sent before it left): that is a
    /// conflict until it registers again.
    pub async fn heartbeat_node(
        &self,
        id: uuid::Uuid,
        node: Option<&str>,
    ) -> Result<bool, StoreError> {
        let node = node.map(str::to_owned);
        dispatch!(self, |s| s.heartbeat(&id, node.as_deref()), |p| p
            .heartbeat(&id, node.as_deref()))
    }

    /// One HA node fewer; at none the worker is `LOST`. False when there is no such worker.
    pub async fn deregister_worker(&self, id: uuid::Uuid) -> Result<bool, StoreError> {
        self.deregister_node(id, None).await
    }

    /// A named HA node leaves: `nodes` counts the live ones left; at none the worker
    /// is `LOST`. Without a name, one node fewer. False when there is no such worker.
    pub async fn deregister_node(
        &self,
        id: uuid::Uuid,
        node: Option<&str>,
    ) -> Result<bool, StoreError> {
        let node = node.map(str::to_owned);
        dispatch!(self, |s| s.deregister_worker(&id, node.as_deref()), |p| p
            .deregister_worker(&id, node.as_deref()))
    }

    /// Marks `ALIVE` workers whose last heartbeat is older than `timeout_secs` as
    /// `LOST`; returns their IDs and authorities. Nothing is marked after the call's
    /// deadline ([`CALL_DEADLINE`]): on PostgreSQL the statements carry it, so one
    /// sent to a server that was paused and runs when it resumes finds every
    /// heartbeat of the pause missing, and marks nobody.
    pub async fn mark_lost(
        &self,
        timeout_secs: u64,
    ) -> Result<Vec<(uuid::Uuid, String)>, StoreError> {
        // Taken before the call's own deadline starts.
        let deadline = std::time::SystemTime::now() + CALL_DEADLINE;
        // The config refuses longer ones; a longer interval PostgreSQL refuses, and
        // a time before the epoch SQLite's cutoff cannot be.
        let timeout_secs = timeout_secs.min(crate::config::MAX_DURATION_SECS);
        dispatch!(self, |s| s.mark_lost(timeout_secs, deadline), |p| p
            .mark_lost(timeout_secs, deadline))
    }

    /// Every worker, by authority.
    pub async fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        dispatch!(self, |s| s.workers(Which::All), |p| p.workers(Which::All))
    }

    /// The `ALIVE` workers, by authority: all placement can use. Worker rows are
    /// kept once `LOST` (the original's), so a long-running cluster's rows grow with
    /// every worker that ever registered; placement reads only these.
    pub async fn alive_workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        dispatch!(self, |s| s.workers(Which::Alive), |p| p
            .workers(Which::Alive))
    }

    /// One worker (its row and its app filters only).
    pub async fn worker(&self, id: uuid::Uuid) -> Result<Option<WorkerRow>, StoreError> {
        let rows = dispatch!(self, |s| s.workers(Which::One(id)), |p| p
            .workers(Which::One(id)))?;
        Ok(rows.into_iter().find(|w| w.id == id))
    }

    /// Stores a circuit with the ID of the request that created it (or none) and
    /// that request's trace context (or none).
    /// [`StoreError::Conflict`] when its port or subdomain on that worker is taken.
    ///
    /// Nothing is stored after the call's deadline ([`CALL_DEADLINE`], when its
    /// caller is answered 503): on PostgreSQL the statement carries the deadline and
    /// inserts nothing once it has passed on the server's clock (an insert held in
    /// transit arrives too late to store anything); on SQLite a call that has not had
    /// the connection by then does nothing.
    pub async fn insert_circuit(
        &self,
        circuit: &Circuit,
        origin_request_id: Option<&str>,
        trace: Option<&appproxy_shared::TraceContext>,
    ) -> Result<(), StoreError> {
        self.insert_session_circuit(circuit, origin_request_id, trace, None)
            .await
    }

    /// [`Store::insert_circuit`], and, with `limit = Some((session, n))` (n > 0),
    /// only while `session` holds fewer than `n` live interactive circuits (those
    /// listing it in `session_ids`, endpoint circuits not counted), else
    /// [`StoreError::SessionLimit`] and nothing stored. The store decides it in the
    /// insert itself, so simultaneous inserts for one session never overshoot — on
    /// PostgreSQL also across coordinators sharing the database: the statement takes
    /// a transaction-scoped advisory lock of the session, then counts under a fresh
    /// snapshot (a volatile function, `appproxy_circuit_may_insert`), and holds the
    /// lock until it commits; SQLite's one connection runs the count and the insert
    /// as one statement.
    pub async fn insert_session_circuit(
        &self,
        circuit: &Circuit,
        origin_request_id: Option<&str>,
        trace: Option<&appproxy_shared::TraceContext>,
        limit: Option<(uuid::Uuid, u32)>,
    ) -> Result<(), StoreError> {
        self.insert_marked(circuit, origin_request_id, trace, limit, None)
            .await
    }

    /// [`Store::insert_session_circuit`] of a circuit whose creation is under way:
    /// the row is marked so ([`CreationMark::UnderWay`]) until `under_way_for` past
    /// the insert on the store's clock, or until [`Store::settle_creation`] (or
    /// [`Store::upsert_endpoint_settling`]) clears the mark. Past it, still marked,
    /// the circuit is [`CreationMark::Overdue`]: its creation failed and nothing
    /// withdrew it (its coordinator stopped), and the sweep does
    /// ([`Store::overdue_creations`], [`Store::delete_overdue_creation`]).
    pub async fn insert_creating_circuit(
        &self,
        circuit: &Circuit,
        origin_request_id: Option<&str>,
        trace: Option<&appproxy_shared::TraceContext>,
        limit: Option<(uuid::Uuid, u32)>,
        under_way_for: std::time::Duration,
    ) -> Result<(), StoreError> {
        // At most a year: a bound any engine's time arithmetic holds.
        let bound = under_way_for.min(std::time::Duration::from_secs(366 * 86_400));
        self.insert_marked(circuit, origin_request_id, trace, limit, Some(bound))
            .await
    }

    async fn insert_marked(
        &self,
        circuit: &Circuit,
        origin_request_id: Option<&str>,
        trace: Option<&appproxy_shared::TraceContext>,
        limit: Option<(uuid::Uuid, u32)>,
        creating_for: Option<std::time::Duration>,
    ) -> Result<(), StoreError> {
        let limit = limit.filter(|(_, n)| *n > 0);
        let circuit = circuit.clone();
        let origin = origin_request_id.map(str::to_owned);
        let trace = trace_columns(trace);
        // Taken before the call's own deadline starts: never after the answer.
        let deadline = std::time::SystemTime::now() + CALL_DEADLINE;
        dispatch!(
            self,
            |s| s.insert_circuit(&circuit, origin.as_deref(), &trace, limit, creating_for),
            |p| p.insert_circuit(
                &circuit,
                origin.as_deref(),
                &trace,
                deadline,
                limit,
                creating_for.map(|d| d.as_secs_f64())
            )
        )
    }

    /// Settles a creation: the circuit's mark of a creation under way is cleared,
    /// so the sweep never withdraws it; false when there is no such circuit (it
    /// was removed meanwhile: the creation cannot be answered with it). Nothing
    /// changes after the call's deadline ([`CALL_DEADLINE`]), as with an insert.
    pub async fn settle_creation(&self, id: uuid::Uuid) -> Result<bool, StoreError> {
        // Taken before the call's own deadline starts: never after the answer.
        let deadline = std::time::SystemTime::now() + CALL_DEADLINE;
        dispatch!(self, |s| s.settle_creation(&id), |p| p
            .settle_creation(&id, deadline))
    }

    /// Renews the marks of creations still under way: each circuit of `ids` still
    /// marked, its mark not yet past, is marked again until `under_way_for` from
    /// now on the store's clock. A mark already past is left so (its creation is
    /// forfeit: the sweep may be withdrawing it). How many marks were renewed.
    pub async fn renew_creations(
        &self,
        ids: &[uuid::Uuid],
        under_way_for: std::time::Duration,
    ) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let bound = under_way_for.min(std::time::Duration::from_secs(366 * 86_400));
        let ids = ids.to_vec();
        dispatch!(self, |s| s.renew_creations(&ids, bound), |p| p
            .renew_creations(&ids, bound.as_secs_f64()))
    }

    /// Where the creation of a stored circuit stands (`None`: no such circuit), on
    /// the store's clock.
    pub async fn creation_mark(&self, id: uuid::Uuid) -> Result<Option<CreationMark>, StoreError> {
        dispatch!(self, |s| s.creation_mark(&id), |p| p.creation_mark(&id))
    }

    /// Circuits whose creation is [`CreationMark::Overdue`], the longest overdue
    /// first, at most `limit`.
    pub async fn overdue_creations(&self, limit: usize) -> Result<Vec<uuid::Uuid>, StoreError> {
        dispatch!(self, |s| s.overdue_creations(limit), |p| p
            .overdue_creations(limit))
    }

    /// A turn at route writes across every coordinator on this store: an endpoint's
    /// routes are read, changed and written back whole, so two coordinators doing
    /// so at once lost each other's routes (and overshot the routes limit). Within
    /// a coordinator the writes also take [`crate::health::ROUTE_WRITES`]; on
    /// PostgreSQL this adds an advisory lock for the others ([`RouteTurn::end`]
    /// gives it back). SQLite's store serves one coordinator: the turn is empty.
    pub async fn route_turn(&self) -> Result<RouteTurn, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(RouteTurn { pg: None }),
            Store::Postgres(p) => p.route_turn().await,
        }
    }

    /// A turn at the reuse key `key` of `/v2/proxy/auth` across every coordinator
    /// on this store, waited for at most `wait` (`None` past it). Taken by a call
    /// that found nothing settled to reuse (nothing at all, or another
    /// coordinator's creation for the key overdue or withdrawn), and held until
    /// its new circuit is stored, marked as a creation under way (and again while
    /// an unacknowledged attempt is replaced by another): of the calls on several
    /// coordinators that find nothing at once, or an orphaned creation, one
    /// creates (withdrawing the orphan), the others then find its circuit under
    /// way and wait for it without the turn. SQLite's store serves one
    /// coordinator, whose in-process lock of the key suffices: the turn is empty.
    pub async fn reuse_turn(
        &self,
        key: &str,
        wait: std::time::Duration,
    ) -> Result<Option<ReuseTurn>, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(Some(ReuseTurn {
                pg: None,
                key: key.to_owned(),
                slot: None,
            })),
            Store::Postgres(p) => p.reuse_turn(key, wait).await,
        }
    }

    /// Replaces a circuit's routes, keeping the trace context of the request that
    /// changed them (none: the change was not traced); false when there is no such
    /// circuit.
    pub async fn update_routes(
        &self,
        id: uuid::Uuid,
        routes: &[appproxy_shared::model::RouteInfo],
        trace: Option<&appproxy_shared::TraceContext>,
    ) -> Result<bool, StoreError> {
        let routes = routes.to_vec();
        let trace = trace_columns(trace);
        // Taken before the call's own deadline starts: never after the answer.
        let deadline = std::time::SystemTime::now() + CALL_DEADLINE;
        dispatch!(self, |s| s.update_routes(&id, &routes, &trace), |p| p
            .update_routes(&id, &routes, &trace, deadline))
    }

    /// A circuit and its origin request ID.
    pub async fn circuit(&self, id: uuid::Uuid) -> Result<Option<CircuitRow>, StoreError> {
        dispatch!(self, |s| s.circuit(&id), |p| p.circuit(&id))
    }

    /// The circuits of one worker (`Some`) or of all (`None`), oldest first.
    pub async fn circuits(
        &self,
        worker: Option<uuid::Uuid>,
    ) -> Result<Vec<CircuitRow>, StoreError> {
        dispatch!(self, |s| s.circuits(worker.as_ref()), |p| p
            .circuits(worker.as_ref()))
    }

    /// The circuits serving endpoints (inference), through the endpoint index — the
    /// health checker's targets, never every circuit.
    pub async fn endpoint_circuits(&self) -> Result<Vec<CircuitRow>, StoreError> {
        dispatch!(self, |s| s.endpoint_circuits(), |p| p.endpoint_circuits())
    }

    /// How many circuits are stored (counted, not read).
    pub async fn circuit_count(&self) -> Result<u64, StoreError> {
        dispatch!(self, |s| s.circuit_count(), |p| p.circuit_count())
    }

    /// How many circuits each worker holds (a worker with none is absent): one
    /// aggregate query (`count(*) … GROUP BY worker`), no circuit read.
    pub async fn circuit_counts(
        &self,
    ) -> Result<std::collections::HashMap<uuid::Uuid, u64>, StoreError> {
        dispatch!(self, |s| s.circuit_counts(), |p| p.circuit_counts())
    }

    /// The slots held by the circuits of one worker (`Some`) or of all (`None`),
    /// oldest first: only the worker, ID, port and subdomain columns, never the
    /// circuits' bodies.
    pub async fn held_slots(
        &self,
        worker: Option<uuid::Uuid>,
    ) -> Result<Vec<HeldSlot>, StoreError> {
        dispatch!(self, |s| s.held_slots(worker.as_ref()), |p| p
            .held_slots(worker.as_ref()))
    }

    /// Slots in use, by index: every port in use on the port workers `port_workers`
    /// and any circuit already holding `subdomain` — never a read of every circuit.
    /// Placement asks with no port workers, for whoever holds the wanted subdomain
    /// ([`Store::used_port_counts`] and [`Store::used_ports`] serve its ports).
    pub async fn used_slots(
        &self,
        port_workers: &[uuid::Uuid],
        subdomain: &str,
    ) -> Result<Vec<UsedSlot>, StoreError> {
        let port_workers = port_workers.to_vec();
        let subdomain = subdomain.to_owned();
        dispatch!(self, |s| s.used_slots(&port_workers, &subdomain), |p| p
            .used_slots(&port_workers, &subdomain))
    }

    /// How many ports each port worker of `ranges` (worker, lowest, highest port)
    /// has in use inside that range, for placement to rank them by free ports: one
    /// count per worker on the `(worker, port)` index, no circuit row read. A worker
    /// with none in use is absent.
    pub async fn used_port_counts(
        &self,
        ranges: &[(uuid::Uuid, u16, u16)],
    ) -> Result<std::collections::HashMap<uuid::Uuid, u64>, StoreError> {
        if ranges.is_empty() {
            return Ok(Default::default());
        }
        let ranges = ranges.to_vec();
        dispatch!(self, |s| s.used_port_counts(&ranges), |p| p
            .used_port_counts(&ranges))
    }

    /// The ports in use on `worker` from `lo` to `hi`, ascending: the `(worker,
    /// port)` index only, for the one worker placement chose.
    pub async fn used_ports(
        &self,
        worker: uuid::Uuid,
        lo: u16,
        hi: u16,
    ) -> Result<Vec<u16>, StoreError> {
        dispatch!(self, |s| s.used_ports(&worker, lo, hi), |p| p
            .used_ports(&worker, lo, hi))
    }

    /// A worker's revision: it goes up by one with every change to its circuits
    /// (`None`: no such worker).
    pub async fn revision(&self, worker: uuid::Uuid) -> Result<Option<u64>, StoreError> {
        dispatch!(self, |s| s.revision(&worker), |p| p.revision(&worker))
    }

    /// What changed in a worker's set after revision `since`, at most `limit` log
    /// entries at a time; costs what changed, not what exists.
    pub async fn changes_since(
        &self,
        worker: uuid::Uuid,
        since: u64,
        limit: usize,
    ) -> Result<Changes, StoreError> {
        dispatch!(self, |s| s.changes_since(&worker, since, limit), |p| p
            .changes_since(&worker, since, limit))
    }

    /// One page of a worker's circuits in ID order after `after`, with the worker's
    /// revision read in the same snapshot.
    pub async fn circuits_page(
        &self,
        worker: uuid::Uuid,
        after: Option<uuid::Uuid>,
        limit: usize,
    ) -> Result<(u64, Vec<CircuitRow>), StoreError> {
        dispatch!(
            self,
            |s| s.circuits_page(&worker, after.as_ref(), limit),
            |p| p.circuits_page(&worker, after.as_ref(), limit)
        )
    }

    /// The circuits whose idle check is due (interactive HTTP circuits created or
    /// last found active long enough ago), oldest due first — the idle pass reads
    /// only these, never every circuit.
    pub async fn idle_due(&self, limit: usize) -> Result<Vec<Circuit>, StoreError> {
        let now = now();
        dispatch!(self, |s| s.idle_due(&now, limit), |p| p.idle_due(limit))
    }

    /// Schedules the next idle check of each circuit at a Unix time (when it could
    /// be idle at the earliest).
    pub async fn defer_idle_checks(&self, checks: &[(uuid::Uuid, f64)]) -> Result<(), StoreError> {
        // A time both engines hold (SQLite's text from a `Duration`, which panics on
        // a non-finite or overflowing value; PostgreSQL's `timestamptz`): at most the
        // year 9999; one that is no time at all is not scheduled.
        let checks: Vec<(uuid::Uuid, f64)> = checks
            .iter()
            .filter(|(_, at)| at.is_finite())
            .map(|(id, at)| (*id, at.clamp(0.0, LATEST_IDLE_CHECK)))
            .collect();
        dispatch!(
            self,
            |s| {
                let text: Vec<(uuid::Uuid, String)> = checks
                    .iter()
                    .map(|(id, at)| {
                        (
                            *id,
                            appproxy_shared::telemetry::Rfc3339(
                                std::time::UNIX_EPOCH
                                    + std::time::Duration::from_secs_f64(at.max(0.0)),
                            )
                            .to_string(),
                        )
                    })
                    .collect();
                s.defer_idle_checks(&text)
            },
            |p| p.defer_idle_checks(&checks)
        )
    }

    /// Forgets change-log entries older than [`CHANGE_LOG_RETENTION_SECS`].
    pub async fn prune_changes(&self) -> Result<usize, StoreError> {
        let cutoff = appproxy_shared::telemetry::Rfc3339(
            std::time::SystemTime::now()
                - std::time::Duration::from_secs(CHANGE_LOG_RETENTION_SECS),
        )
        .to_string();
        dispatch!(self, |s| s.prune_changes(&cutoff), |p| p
            .prune_changes(CHANGE_LOG_RETENTION_SECS))
    }

    /// Deletes the setup tokens made more than `older_than_secs` ago.
    pub async fn prune_tokens(&self, older_than_secs: u64) -> Result<usize, StoreError> {
        let cutoff = appproxy_shared::telemetry::Rfc3339(
            std::time::SystemTime::now()
                .checked_sub(std::time::Duration::from_secs(older_than_secs))
                .unwrap_or(std::time::UNIX_EPOCH),
        )
        .to_string();
        dispatch!(self, |s| s.prune_tokens(&cutoff), |p| p
            .prune_tokens(older_than_secs))
    }

    /// The circuits routing to `session`, oldest first (for reuse).
    pub async fn circuits_of_session(
        &self,
        session: uuid::Uuid,
    ) -> Result<Vec<CircuitRow>, StoreError> {
        dispatch!(self, |s| s.circuits_of_session(&session), |p| p
            .circuits_of_session(&session))
    }

    /// Deletes a circuit, logging the removal with the ID of the request that made
    /// it (or none) and that request's trace context (or none): a worker that finds
    /// the removal by a fetch deploys it under them. False when there was none.
    ///
    /// Nothing is removed after the call's deadline ([`CALL_DEADLINE`], when its
    /// caller is answered 503), as nothing is inserted then
    /// ([`Store::insert_circuit`]).
    pub async fn delete_circuit(
        &self,
        id: uuid::Uuid,
        request_id: Option<&str>,
        trace: Option<&appproxy_shared::TraceContext>,
    ) -> Result<bool, StoreError> {
        // Taken before the call's own deadline starts: never after the answer.
        let deadline = std::time::SystemTime::now() + CALL_DEADLINE;
        self.delete_circuit_by(id, request_id, trace, deadline)
            .await
    }

    /// [`Store::delete_circuit`], nothing removed after `deadline` (or the call's
    /// own, whichever comes first): a removal decided on what was true at one
    /// moment (idle collection's last-access marks) is not made long after it.
    pub async fn delete_circuit_by(
        &self,
        id: uuid::Uuid,
        request_id: Option<&str>,
        trace: Option<&appproxy_shared::TraceContext>,
        deadline: std::time::SystemTime,
    ) -> Result<bool, StoreError> {
        self.delete_circuit_when(id, request_id, trace, deadline, false)
            .await
    }

    /// [`Store::delete_circuit`] of a circuit only while its creation is
    /// [`CreationMark::Overdue`] (on the store's clock, in the removal itself): a
    /// creation settled meanwhile keeps its circuit. False when nothing was removed.
    pub async fn delete_overdue_creation(
        &self,
        id: uuid::Uuid,
        request_id: Option<&str>,
        trace: Option<&appproxy_shared::TraceContext>,
    ) -> Result<bool, StoreError> {
        let deadline = std::time::SystemTime::now() + CALL_DEADLINE;
        self.delete_circuit_when(id, request_id, trace, deadline, true)
            .await
    }

    async fn delete_circuit_when(
        &self,
        id: uuid::Uuid,
        request_id: Option<&str>,
        trace: Option<&appproxy_shared::TraceContext>,
        deadline: std::time::SystemTime,
        only_overdue: bool,
    ) -> Result<bool, StoreError> {
        let by: Behind = (request_id.map(str::to_owned), trace_columns(trace));
        let deadline = deadline.min(std::time::SystemTime::now() + CALL_DEADLINE);
        dispatch!(
            self,
            |s| {
                if std::time::SystemTime::now() >= deadline {
                    return Err(StoreError::Unavailable(
                        "the removal's deadline passed before it had the database".into(),
                    ));
                }
                s.delete_circuit(&id, &by, only_overdue)
            },
            |p| p.delete_circuit(&id, &by, deadline, only_overdue)
        )
    }

    /// Creates or updates a model-serving endpoint's row.
    pub async fn upsert_endpoint(
        &self,
        id: uuid::Uuid,
        health_check_enabled: bool,
        health_check_config: Option<serde_json::Value>,
    ) -> Result<(), StoreError> {
        self.upsert_endpoint_with(id, health_check_enabled, health_check_config, None)
            .await
            .map(|_| ())
    }

    /// [`Store::upsert_endpoint`] together with [`Store::settle_creation`] of the
    /// endpoint's new circuit `settle`, in one write: both or neither. False (and
    /// nothing written) when that circuit is gone.
    pub async fn upsert_endpoint_settling(
        &self,
        id: uuid::Uuid,
        health_check_enabled: bool,
        health_check_config: Option<serde_json::Value>,
        settle: uuid::Uuid,
    ) -> Result<bool, StoreError> {
        self.upsert_endpoint_with(id, health_check_enabled, health_check_config, Some(settle))
            .await
    }

    async fn upsert_endpoint_with(
        &self,
        id: uuid::Uuid,
        health_check_enabled: bool,
        health_check_config: Option<serde_json::Value>,
        settle: Option<uuid::Uuid>,
    ) -> Result<bool, StoreError> {
        dispatch!(
            self,
            |s| s.upsert_endpoint(
                &id,
                health_check_enabled,
                health_check_config.as_ref(),
                settle.as_ref()
            ),
            |p| p.upsert_endpoint(
                &id,
                health_check_enabled,
                health_check_config.as_ref(),
                settle.as_ref()
            )
        )
    }

    /// An endpoint's health-check settings: (enabled, config); `None` when unknown.
    pub async fn endpoint(
        &self,
        id: uuid::Uuid,
    ) -> Result<Option<(bool, Option<serde_json::Value>)>, StoreError> {
        dispatch!(self, |s| s.endpoint(&id), |p| p.endpoint(&id))
    }

    /// Every endpoint with its health check enabled, and its settings.
    pub async fn health_checked_endpoints(
        &self,
    ) -> Result<Vec<(uuid::Uuid, serde_json::Value)>, StoreError> {
        dispatch!(self, |s| s.health_checked_endpoints(), |p| p
            .health_checked_endpoints())
    }

    /// Deletes an endpoint's row; false when there was none.
    pub async fn delete_endpoint(&self, id: uuid::Uuid) -> Result<bool, StoreError> {
        dispatch!(self, |s| s.delete_endpoint(&id), |p| p.delete_endpoint(&id))
    }

    /// The circuit serving an endpoint, if any.
    pub async fn circuit_of_endpoint(
        &self,
        endpoint: uuid::Uuid,
    ) -> Result<Option<CircuitRow>, StoreError> {
        dispatch!(self, |s| s.circuit_of_endpoint(&endpoint), |p| p
            .circuit_of_endpoint(&endpoint))
    }

    /// Stores a `/v2/conf` token.
    pub async fn insert_token(
        &self,
        id: uuid::Uuid,
        body: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let body = body.clone();
        dispatch!(self, |s| s.insert_token(&id, &body), |p| p
            .insert_token(&id, &body))
    }

    /// A `/v2/conf` token.
    ///
    /// One made more than `ttl_secs` ago (0: any age) is none: the leader's pass
    /// deletes such tokens only at its next turn (never without a leader), and
    /// until then `/v2/proxy/auth` accepted them.
    pub async fn token(
        &self,
        id: uuid::Uuid,
        ttl_secs: u64,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        let ttl_secs = ttl_secs.min(crate::config::MAX_DURATION_SECS);
        let made_since = (ttl_secs > 0).then(|| {
            appproxy_shared::telemetry::Rfc3339(
                std::time::SystemTime::now()
                    .checked_sub(std::time::Duration::from_secs(ttl_secs))
                    .unwrap_or(std::time::UNIX_EPOCH),
            )
            .to_string()
        });
        dispatch!(self, |s| s.token(&id, made_since.as_deref()), |p| p
            .token(&id, ttl_secs))
    }

    /// A cheap round trip, for `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, |s| s.ping(), |p| p.ping())
    }

    /// Whether this node may lead on the store: it answers, and on PostgreSQL takes
    /// writes (not a standby). On SQLite a round trip only: a store full to its cap
    /// is made room in by the leader's own pruning, which a write probe failing would
    /// hold off (the only coordinator of a SQLite store has no one to hand over to).
    pub async fn can_lead(&self) -> Result<(), StoreError> {
        dispatch!(self, |s| s.ping(), |p| p.writable())
    }

    /// Whether the store answers and takes writes, for `/readyz`: a round trip, and
    /// on SQLite, after a write failed for want of storage (disk full, read-only,
    /// I/O error) and none has succeeded since, a write that needs room — not ready
    /// while it fails too; on PostgreSQL, the round trip asks whether the server
    /// takes writes (not a standby, transactions not read-only). Readiness recovers
    /// by itself once room is made or writes are taken again, also when a balancer
    /// sends it nothing else.
    pub async fn ready(&self) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(s) => {
                self.ping().await?;
                if s.write_failure().is_some() {
                    dispatch!(self, |s| s.probe_write(), |p| p.ping())
                } else {
                    Ok(())
                }
            }
            Self::Postgres(_) => dispatch!(self, |s| s.ping(), |p| p.writable()),
        }
    }
}

/// The latest time an idle check is scheduled at (9999-12-31T23:59:59Z).
const LATEST_IDLE_CHECK: f64 = 253_402_300_799.0;

/// Which workers a read takes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Which {
    /// Every one.
    All,
    /// Those `ALIVE`.
    Alive,
    /// This one.
    One(uuid::Uuid),
}

/// A heartbeat of a node that deregistered: the worker's to fix, by registering
/// again (`PUT /api/worker`) before its heartbeats count.
pub(crate) fn node_left(node: &str) -> StoreError {
    StoreError::Conflict(format!(
        "node {node:?} deregistered; it must register again (PUT /api/worker) before its heartbeats count"
    ))
}

/// Now, as the wire writes times.
pub(crate) fn now() -> String {
    appproxy_shared::telemetry::Rfc3339(std::time::SystemTime::now()).to_string()
}

/// A filter value as the stored string (values compare as strings).
pub(crate) fn filter_value(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// A registration's app filters as stored: `[{key, value}]` with string values,
/// sorted, each once.
pub(crate) fn stored_filters(filters: &serde_json::Value) -> serde_json::Value {
    let mut all: Vec<(String, String)> = Vec::new();
    for f in filters.as_array().into_iter().flatten() {
        if let (Some(k), Some(v)) = (f["key"].as_str(), filter_value(&f["value"])) {
            all.push((k.to_owned(), v));
        }
    }
    all.sort();
    all.dedup();
    serde_json::Value::Array(
        all.into_iter()
            .map(|(k, v)| serde_json::json!({"key": k, "value": v}))
            .collect(),
    )
}
