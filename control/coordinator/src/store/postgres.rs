//! The PostgreSQL engine: a `deadpool-postgres` pool over tokio-postgres, on the
//! original platform's schema — native enums holding enum *names*
//! (`proxyprotocol`, `appmode`, `frontendmode`), typed columns, `uuid[]` session IDs,
//! `jsonb` routes — plus the nullable `circuits.origin_request_id` and the trace
//! context of the request behind each circuit's latest change
//! (`circuits.traceparent`, `circuits.tracestate`); each worker's change log keeps
//! the request behind a removal (`circuit_changes.request_id`, `traceparent`,
//! `tracestate`) and which entries are removals (`circuit_changes.removal`); each
//! worker counts the circuits holding a port on it (`workers.port_circuits`, kept
//! by a trigger).
//!
//! Migrations are numbered, recorded in `appproxy_schema_migrations` and applied at
//! open inside one transaction holding an advisory lock, so coordinators starting
//! together migrate once.

use std::time::SystemTime;

use appproxy_shared::model::{AppMode, Circuit, FrontendMode, ProxyProtocol, Reuse, RouteInfo};
use appproxy_shared::telemetry::Rfc3339;
use appproxy_shared::wire::WorkerRegistration;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde_json::{json, Value};
use tokio_postgres::types::Json;
use tokio_postgres::{NoTls, Row};

use super::{Behind, Changes, CircuitRow, Logged, Origin, StoreError, UsedSlot, WorkerRow};

/// Migrations, applied in order.
const MIGRATIONS: &[&str] = &[
    "
CREATE TYPE proxyprotocol AS ENUM ('HTTP', 'GRPC', 'HTTP2', 'TCP');
CREATE TYPE appmode AS ENUM ('INTERACTIVE', 'INFERENCE');
CREATE TYPE frontendmode AS ENUM ('WILDCARD_DOMAIN', 'PORT');
CREATE TABLE tokens (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    login_session_token varchar(127) NULL,
    kernel_host varchar(255) NOT NULL,
    kernel_port integer NOT NULL,
    session_id uuid NOT NULL,
    user_uuid uuid NOT NULL,
    group_id uuid NOT NULL,
    access_key text NOT NULL,
    domain_name text NOT NULL
);
CREATE TABLE workers (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    authority varchar(255) NOT NULL CONSTRAINT uq_workers_authority UNIQUE,
    frontend_mode frontendmode NOT NULL,
    protocol proxyprotocol NOT NULL,
    hostname varchar(1024) NOT NULL,
    tls_listen boolean NOT NULL DEFAULT false,
    tls_advertised boolean NOT NULL DEFAULT false,
    api_port integer NOT NULL,
    available_slots integer NOT NULL,
    occupied_slots integer NOT NULL,
    nodes integer NOT NULL,
    port_range integer[] NULL,
    wildcard_domain varchar(1024) NULL,
    wildcard_traffic_port integer NULL,
    accepted_traffics appmode[] NOT NULL,
    filtered_apps_only boolean NOT NULL,
    traefik_last_used_marker_path varchar(1024) NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    status varchar(64) NOT NULL DEFAULT 'ALIVE'
);
CREATE TABLE worker_app_filters (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    property_name varchar(96) NOT NULL,
    property_value varchar(1024) NOT NULL,
    worker uuid NOT NULL REFERENCES workers(id),
    UNIQUE (worker, property_name, property_value)
);
CREATE TABLE circuits (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    app varchar(255) NULL,
    protocol proxyprotocol NOT NULL,
    worker uuid NOT NULL REFERENCES workers(id),
    app_mode appmode NOT NULL,
    frontend_mode frontendmode NOT NULL,
    port integer NULL,
    subdomain varchar(255) NULL,
    envs jsonb NULL,
    arguments varchar(1000) NULL,
    open_to_public boolean NOT NULL,
    allowed_client_ips varchar(255) NULL,
    user_id uuid NULL,
    endpoint_id uuid NULL,
    runtime_variant varchar(64) NULL,
    session_ids uuid[] NOT NULL,
    route_info jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    origin_request_id varchar(128) NULL
);
CREATE UNIQUE INDEX circuits_worker_port ON circuits(worker, port) WHERE port IS NOT NULL;
CREATE UNIQUE INDEX circuits_worker_subdomain ON circuits(worker, subdomain) WHERE subdomain IS NOT NULL;
CREATE INDEX circuits_worker ON circuits(worker);
CREATE TABLE endpoints (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    health_check_enabled boolean NOT NULL DEFAULT false,
    health_check_config jsonb NULL,
    created_at timestamptz NULL DEFAULT now(),
    updated_at timestamptz NULL DEFAULT now()
);
",
    "
CREATE UNIQUE INDEX circuits_endpoint ON circuits(endpoint_id) WHERE endpoint_id IS NOT NULL;
",
    "
CREATE TABLE worker_nodes (
    worker uuid NOT NULL REFERENCES workers(id) ON DELETE CASCADE,
    node varchar(1024) NOT NULL,
    seen_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (worker, node)
);
",
    // Scale: reuse by session through a GIN index, placement by subdomain through
    // its own index, and a revision per worker with a log of what changed
    // (conditional polls and deltas). The revision is bumped on the worker's row in
    // the transaction that changes the circuit, so revisions commit in order.
    "
CREATE INDEX circuits_session_ids ON circuits USING GIN (session_ids);
CREATE INDEX circuits_subdomain ON circuits(subdomain) WHERE subdomain IS NOT NULL;
CREATE INDEX circuits_worker_id ON circuits(worker, id);
ALTER TABLE workers ADD COLUMN revision bigint NOT NULL DEFAULT 0;
CREATE TABLE circuit_changes (
    worker uuid NOT NULL,
    revision bigint NOT NULL,
    circuit uuid NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (worker, revision)
);
CREATE INDEX circuit_changes_at ON circuit_changes(at);
ALTER TABLE circuits ADD COLUMN idle_check_at timestamptz NULL;
UPDATE circuits SET idle_check_at = created_at WHERE app_mode = 'INTERACTIVE' AND protocol = 'HTTP';
CREATE INDEX circuits_idle_check_at ON circuits(idle_check_at) WHERE idle_check_at IS NOT NULL;
",
    // A kernel that serves HTTPS (`/v2/conf`'s `upstream_tls`); null: plain TCP.
    "
ALTER TABLE tokens ADD COLUMN upstream_tls varchar(16) NULL;
",
    // The W3C trace context of the request behind each circuit's latest change, for
    // a worker that finds the change by a fetch rather than an event.
    "
ALTER TABLE circuits ADD COLUMN traceparent varchar(512) NULL,
    ADD COLUMN tracestate varchar(512) NULL;
",
    // The request behind a removal (its ID and W3C trace context), kept with the
    // change-log entry: the circuit's row is gone, and a worker that finds the
    // removal by a fetch deploys it under that request. Earlier entries have NULLs.
    "
ALTER TABLE circuit_changes ADD COLUMN request_id varchar(128) NULL,
    ADD COLUMN traceparent varchar(512) NULL,
    ADD COLUMN tracestate varchar(512) NULL;
",
    // Whether an entry records a removal. An entry of a circuit that is gone and
    // that is not the removal is superseded by the removal's own, later entry, and is
    // skipped: read alone (a bounded answer ending between the two), it would read
    // as a removal with no request. Earlier entries are NULL: kind unknown.
    "
ALTER TABLE circuit_changes ADD COLUMN removal boolean NULL;
",
    // When each setup token was made, so that old ones are deleted (`[coordinator]
    // token_ttl_secs`). Tokens made before count from this migration.
    "
ALTER TABLE tokens ADD COLUMN created_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX tokens_created_at ON tokens(created_at);
",
    // Whether a circuit may be inserted now: before its caller's deadline and, with a
    // session and a limit, while the session holds fewer live interactive circuits
    // than the limit (else SQLSTATE AP429, nothing inserted). The session's
    // advisory lock is held until the inserting statement commits, so simultaneous
    // inserts for one session (from any coordinator) count one after the other;
    // being VOLATILE, the function counts under a snapshot taken after the lock,
    // which sees every insert that held it before. The deadline is read last, after
    // any wait for the lock.
    "
CREATE FUNCTION appproxy_circuit_may_insert(p_session uuid, p_limit integer, p_deadline timestamptz)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF p_session IS NOT NULL AND p_limit > 0 THEN
        PERFORM pg_advisory_xact_lock(1634758770, hashtext(p_session::text));
        IF (SELECT count(*) FROM circuits
            WHERE session_ids @> ARRAY[p_session] AND endpoint_id IS NULL) >= p_limit THEN
            RAISE EXCEPTION 'session % holds % circuits, its limit', p_session, p_limit
                USING ERRCODE = 'AP429';
        END IF;
    END IF;
    RETURN clock_timestamp() < p_deadline;
END
$$;
",
    // A node that deregistered is kept, marked as left, until it registers again:
    // a heartbeat of it arriving late (sent just before it left, answered by a
    // slow or another coordinator) does not count it again.
    "
ALTER TABLE worker_nodes ADD COLUMN left_at timestamptz NULL;
",
    // A circuit's insert, removal or route update takes effect only if its transaction commits
    // before its caller's deadline (`appproxy.deadline`, seconds since the epoch
    // as text, set for the transaction with `set_config(..., true)`; unset: no
    // deadline). Checked at commit, after every lock wait: a check made in the
    // statement alone passed before a wait for the worker's row (another
    // coordinator's heartbeat holding it), and the removal committed after its
    // caller was answered 503; a `COMMIT` held in transit is refused too (SQLSTATE
    // AP504, the transaction rolled back). Seconds, not a timestamp's text: that
    // text follows the session's DateStyle and TimeZone, whose zone abbreviations
    // PostgreSQL may not read back (CAT, WIB) or read as another zone's (CST).
    "
CREATE FUNCTION appproxy_commit_before_deadline() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    d text := current_setting('appproxy.deadline', true);
BEGIN
    IF d IS NOT NULL AND d <> '' AND clock_timestamp() >= to_timestamp(d::double precision) THEN
        RAISE EXCEPTION 'the caller''s deadline (%) passed before the commit', d
            USING ERRCODE = 'AP504';
    END IF;
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER circuits_commit_before_deadline
    AFTER INSERT OR DELETE OR UPDATE OF route_info, session_ids ON circuits
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION appproxy_commit_before_deadline();
CREATE OR REPLACE FUNCTION appproxy_circuit_may_insert(p_session uuid, p_limit integer, p_deadline timestamptz)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM set_config('appproxy.deadline', extract(epoch FROM p_deadline)::text, true);
    IF p_session IS NOT NULL AND p_limit > 0 THEN
        PERFORM pg_advisory_xact_lock(1634758770, hashtext(p_session::text));
        IF (SELECT count(*) FROM circuits
            WHERE session_ids @> ARRAY[p_session] AND endpoint_id IS NULL) >= p_limit THEN
            RAISE EXCEPTION 'session % holds % circuits, its limit', p_session, p_limit
                USING ERRCODE = 'AP429';
        END IF;
    END IF;
    RETURN clock_timestamp() < p_deadline;
END
$$;
",
    // A creation under way, in the store: until when (the database's clock) the
    // circuit's creation may still be settled by the coordinator making it. Set by
    // the creation's insert, cleared once the creation is acknowledged and its
    // caller about to be answered; a circuit still marked past it was left by a
    // creation that failed and whose withdrawal has not been made (a process that
    // stopped meanwhile), and the leader's sweep withdraws it. NULL: settled (every
    // row written before this migration).
    "
ALTER TABLE circuits ADD COLUMN creating_until timestamptz NULL;
CREATE INDEX circuits_creating_until ON circuits(creating_until) WHERE creating_until IS NOT NULL;
",
    // Placement ranks port workers by their free ports: each worker keeps the count
    // of the circuits holding a port on it, kept by a trigger on every insert,
    // removal or move of a circuit (whoever writes it), so a creation reads a
    // count, not every port in use (the few ports outside a worker's range are
    // subtracted, by index). `occupied_slots`, the original's, counts every circuit
    // and is kept only by this program's writes. The circuits are locked first, as
    // a creation locks them (circuits, then workers): the count and the trigger see
    // every circuit write, and an older node's creation in flight during a rolling
    // upgrade is waited for rather than deadlocked with.
    "
LOCK TABLE circuits IN SHARE ROW EXCLUSIVE MODE;
ALTER TABLE workers ADD COLUMN port_circuits bigint NOT NULL DEFAULT 0;
UPDATE workers SET port_circuits =
    (SELECT count(*) FROM circuits WHERE circuits.worker = workers.id AND circuits.port IS NOT NULL);
CREATE FUNCTION appproxy_count_port_circuits() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' OR TG_OP = 'UPDATE' THEN
        IF OLD.port IS NOT NULL THEN
            UPDATE workers SET port_circuits = port_circuits - 1 WHERE id = OLD.worker;
        END IF;
    END IF;
    IF TG_OP = 'INSERT' OR TG_OP = 'UPDATE' THEN
        IF NEW.port IS NOT NULL THEN
            UPDATE workers SET port_circuits = port_circuits + 1 WHERE id = NEW.worker;
        END IF;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER circuits_port_circuits AFTER INSERT OR DELETE OR UPDATE OF worker, port
    ON circuits FOR EACH ROW EXECUTE FUNCTION appproxy_count_port_circuits();
",
    // Who may reuse a circuit's HTTP/1.1 app connections (`shared` / `client`),
    // decided at its creation from `[circuits]`; NULL: the workers' own setting
    // (every row written before this migration). SQLite keeps it in the circuit's
    // JSON body, which needs no migration.
    "
ALTER TABLE circuits ADD COLUMN upstream_reuse varchar(16) NULL;
",
];

/// The advisory lock route writes take turns under across coordinators ("routes"
/// in ASCII).
pub(super) const ROUTE_WRITES_KEY: i64 = 0x726f_7574_6573;

/// The class of the advisory locks `/v2/proxy/auth` reuse keys take turns under
/// across coordinators ("reus" in ASCII), the key's `hashtext` the other half.
pub(super) const REUSE_TURN_CLASS: i32 = 0x7265_7573;

/// The SQLSTATE `appproxy_circuit_may_insert` refuses a session's circuit with.
const SESSION_LIMIT: &str = "AP429";

/// The SQLSTATE of a circuit write whose transaction reached its commit after its
/// caller's deadline (`appproxy_commit_before_deadline`): rolled back.
const PAST_DEADLINE: &str = "AP504";

/// Whether `e` is a commit refused for its caller's deadline ([`PAST_DEADLINE`]).
fn past_deadline(e: &tokio_postgres::Error) -> bool {
    e.code().map(|c| c.code()) == Some(PAST_DEADLINE)
}

/// [`CIRCUIT_COLUMNS`] of the table aliased `c` (the change log's join), built once.
static CIRCUIT_COLUMNS_OF_C: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    CIRCUIT_COLUMNS
        .split(", ")
        .map(|c| format!("c.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
});

/// A page of worker `$1`'s circuits (at most `$2`) in ID order — after the ID `$3` in
/// [`PAGE_AFTER`] — beside the worker's revision, in one statement (one snapshot).
/// One row with the revision and NULL circuit columns when the page is empty, none
/// when the worker does not exist.
fn page_statement(after: &str) -> String {
    format!(
        "SELECT w.revision, c.* FROM workers w LEFT JOIN LATERAL (
            SELECT {CIRCUIT_COLUMNS} FROM circuits WHERE worker = $1 {after} ORDER BY id LIMIT $2
         ) c ON true WHERE w.id = $1"
    )
}

/// The first page ([`page_statement`]).
static PAGE_FIRST: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| page_statement(""));

/// A page after an ID ([`page_statement`]).
static PAGE_AFTER: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| page_statement("AND id > $3"));

/// Bumps the revision of the worker `$1` and logs circuit `$2` as changed: `$3`
/// whether the change is its removal, and for a removal the removing request's ID
/// `$4` and trace context (`$5` traceparent, `$6` tracestate); NULLs otherwise.
const LOG_CHANGE: &str = "WITH bumped AS (
        UPDATE workers SET revision = revision + 1 WHERE id = $1 RETURNING id, revision)
     INSERT INTO circuit_changes (worker, revision, circuit, removal, request_id, traceparent, tracestate)
        SELECT id, revision, $2, $3, $4, $5, $6 FROM bumped";

/// Sets a worker's `nodes` to its live node count, its status (`ALIVE`, or `LOST` at
/// none) and `updated_at`. Returns whether the worker exists.
const RECOUNT: &str = "UPDATE workers SET nodes = n.count,
        status = CASE WHEN n.count = 0 THEN 'LOST' ELSE 'ALIVE' END, updated_at = now()
     FROM (SELECT count(*)::integer AS count FROM worker_nodes
        WHERE worker = $1 AND left_at IS NULL) n
     WHERE id = $1";

/// Records that `node` of worker `id` registered: it counts again if it had left.
const NODE_SEEN: &str = "INSERT INTO worker_nodes (worker, node) VALUES ($1, $2)
     ON CONFLICT (worker, node) DO UPDATE SET seen_at = now(), left_at = NULL";

/// Records that `node` of worker `id` heartbeated; no row when the node left (it
/// must register again before its heartbeats count).
const NODE_HEARD: &str = "INSERT INTO worker_nodes (worker, node) VALUES ($1, $2)
     ON CONFLICT (worker, node) DO UPDATE SET seen_at = now()
        WHERE worker_nodes.left_at IS NULL";

/// Tombstones of nodes that left are dropped after this long.
const LEFT_NODES_KEPT_SECS: f64 = 86_400.0;

/// PostgreSQL's `idle_in_transaction_session_timeout`, set on every session, and the
/// client socket's `tcp_user_timeout`: a few store deadlines, so that a transaction
/// of a client gone silent lets its locks go soon after the call gave up on it.
pub const IDLE_IN_TRANSACTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

std::thread_local! {
    /// Set while a store call that passed its deadline is dropped
    /// ([`abandoning`]): the connections it holds go out of the pool.
    static ABANDONING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `drop_call` (dropping a store call that passed its deadline) so that a
/// pooled connection the call holds is closed, not given back: its socket may be
/// silent (the reason the call did not end), or mid-statement, and a connection
/// given back would cost every later call that draws it the whole deadline.
pub(super) fn abandoning(drop_call: impl FnOnce()) {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            ABANDONING.with(|a| a.set(false));
        }
    }
    ABANDONING.with(|a| a.set(true));
    let _reset = Reset;
    drop_call();
}

/// A pooled connection in use by one store call: back to the pool when the call
/// ends, closed instead when the call is abandoned at its deadline ([`abandoning`])
/// or the connection is closed already.
pub(super) struct Conn(Option<deadpool_postgres::Object>);

impl Conn {
    /// The pooled connection itself, whose drop gives it back.
    pub(super) fn detach(mut self) -> deadpool_postgres::Object {
        self.0.take().expect("a connection until dropped")
    }
}

impl std::ops::Deref for Conn {
    type Target = deadpool_postgres::Object;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("a connection until dropped")
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_mut().expect("a connection until dropped")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            if ABANDONING.with(std::cell::Cell::get) || client.is_closed() {
                // Out of the pool: its slot is free for a fresh connection, and the
                // dropped client ends the session (or the socket's timeouts do).
                drop(deadpool_postgres::Object::take(client));
            }
        }
    }
}

/// The PostgreSQL store.
#[derive(Clone)]
pub struct PgStore {
    /// Connections, created on demand and recycled; `Pool` is an `Arc` inside.
    pool: Pool,
    /// How far the server's clock is ahead of ours, for the deadlines it checks.
    clock: std::sync::Arc<std::sync::Mutex<ServerClock>>,
    /// Turns at reuse keys held at once ([`PgStore::reuse_turn`]): each holds a
    /// pooled connection while its creation decides and stores its circuit (never
    /// through the worker's acknowledgement), and every creation takes one. At
    /// most half the pool, so the store calls of the creations holding them (each
    /// needs another connection while it holds its own), and a route write's turn,
    /// always find a connection; past it, calls wait for a turn to end (a matter
    /// of a few store calls).
    reuse_turns: std::sync::Arc<tokio::sync::Semaphore>,
}

/// How often the server's clock is read again (a clock may be stepped).
const CLOCK_REREAD: std::time::Duration = std::time::Duration::from_secs(60);

/// A reading of the server's clock that took longer than this tells too little.
const CLOCK_SAMPLE_MAX: std::time::Duration = std::time::Duration::from_millis(500);

/// A difference past which the clocks are said to disagree (logged at `warn`).
const CLOCK_WARN_MICROS: i64 = 1_000_000;

/// The server's clock as this process last read it.
#[derive(Debug, Default)]
struct ServerClock {
    /// Microseconds the server's clock is ahead of ours (negative: behind), read so
    /// that it never exceeds the true difference: a deadline moved by it is on time
    /// or early on the server, never late.
    ahead_micros: i64,
    /// When it was last read (`None`: never; the clocks are taken to agree).
    read_at: Option<std::time::Instant>,
}

/// Microseconds since the Unix epoch, negative before it.
fn unix_micros(t: SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// `t` moved by `micros` (either way), saturating at the epoch and far future.
fn shifted(t: SystemTime, micros: i64) -> SystemTime {
    let by = std::time::Duration::from_micros(micros.unsigned_abs());
    if micros >= 0 {
        t.checked_add(by).unwrap_or(t)
    } else {
        t.checked_sub(by)
            .filter(|t| *t >= std::time::UNIX_EPOCH)
            .unwrap_or(std::time::UNIX_EPOCH)
    }
}

/// How far a server that read `theirs` is ahead of us, from a reading sent at
/// `sent` and answered at `back` on our clock (`None`: the reading took too long to
/// tell). The server read its clock at some instant of ours between the two; taking
/// the latest makes the difference the smallest it can be, so a deadline moved by
/// it falls early on the server rather than late.
fn server_ahead(sent: SystemTime, theirs: SystemTime, back: SystemTime) -> Option<i64> {
    let took = back.duration_since(sent).ok()?;
    (took <= CLOCK_SAMPLE_MAX).then(|| unix_micros(theirs).saturating_sub(unix_micros(back)))
}

fn protocol_name(p: ProxyProtocol) -> &'static str {
    match p {
        // The schema has no PREOPEN label: a pre-opened port is carried as HTTP.
        ProxyProtocol::Http | ProxyProtocol::Preopen => "HTTP",
        ProxyProtocol::Grpc => "GRPC",
        ProxyProtocol::Http2 => "HTTP2",
        ProxyProtocol::Tcp => "TCP",
    }
}

fn protocol_of(name: &str) -> Result<ProxyProtocol, StoreError> {
    Ok(match name {
        "HTTP" => ProxyProtocol::Http,
        "GRPC" => ProxyProtocol::Grpc,
        "HTTP2" => ProxyProtocol::Http2,
        "TCP" => ProxyProtocol::Tcp,
        other => return Err(StoreError::Data(format!("proxyprotocol {other:?}"))),
    })
}

fn app_mode_name(m: AppMode) -> &'static str {
    match m {
        AppMode::Interactive => "INTERACTIVE",
        AppMode::Inference => "INFERENCE",
    }
}

fn app_mode_of(name: &str) -> Result<AppMode, StoreError> {
    match name {
        "INTERACTIVE" => Ok(AppMode::Interactive),
        "INFERENCE" => Ok(AppMode::Inference),
        other => Err(StoreError::Data(format!("appmode {other:?}"))),
    }
}

fn frontend_name(m: FrontendMode) -> &'static str {
    match m {
        FrontendMode::Port => "PORT",
        FrontendMode::Wildcard => "WILDCARD_DOMAIN",
    }
}

fn frontend_of(name: &str) -> Result<FrontendMode, StoreError> {
    match name {
        "PORT" => Ok(FrontendMode::Port),
        "WILDCARD_DOMAIN" => Ok(FrontendMode::Wildcard),
        other => Err(StoreError::Data(format!("frontendmode {other:?}"))),
    }
}

/// The wire value of a stored enum name (`PORT` → `port`).
fn wire<T: serde::Serialize>(v: T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn conflict_or(e: tokio_postgres::Error) -> StoreError {
    if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
        StoreError::Conflict(
            e.as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_else(|| "unique key taken".into()),
        )
    } else {
        StoreError::Postgres(e)
    }
}

fn time(t: SystemTime) -> String {
    Rfc3339(t).to_string()
}

fn as_i32(v: &Value) -> Option<i32> {
    v.as_i64().and_then(|n| i32::try_from(n).ok())
}

const CIRCUIT_COLUMNS: &str = "id, app, protocol::text, worker, app_mode::text, frontend_mode::text, port, subdomain, envs, arguments, open_to_public, allowed_client_ips, user_id, endpoint_id, runtime_variant, session_ids, route_info, created_at, updated_at, origin_request_id, traceparent, tracestate, upstream_reuse";

/// A circuit's `route_info` column read straight into its routes, in one pass over
/// the column's bytes (no intermediate `Value`). Older rows hold the routes as a JSON
/// string, which reads too.
struct Routes(Vec<RouteInfo>);

impl<'de> serde::Deserialize<'de> for Routes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Vec<RouteInfo>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of routes, or a JSON string holding one")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Self::Value, A::Error> {
                serde::Deserialize::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
                serde_json::from_str(text).map_err(E::custom)
            }
        }
        d.deserialize_any(Visit).map(Routes)
    }
}

fn circuit_of(row: &Row) -> Result<CircuitRow, StoreError> {
    circuit_of_at(row, 0)
}

/// A circuit whose [`CIRCUIT_COLUMNS`] start at column `at` of `row`.
fn circuit_of_at(row: &Row, at: usize) -> Result<CircuitRow, StoreError> {
    let envs: Option<Value> = row.try_get(at + 8)?;
    let Json(Routes(routes)) = row.try_get(at + 16)?;
    let allowed: Option<String> = row.try_get(at + 11)?;
    let port: Option<i32> = row.try_get(at + 6)?;
    let reuse: Option<&str> = row.try_get(at + 22)?;
    let upstream_reuse = reuse
        .map(|r| Reuse::parse(r).ok_or_else(|| StoreError::Data(format!("upstream_reuse {r:?}"))))
        .transpose()?;
    let circuit = Circuit {
        id: row.try_get(at)?,
        app: row.try_get(at + 1)?,
        protocol: protocol_of(row.try_get(at + 2)?)?,
        worker: Some(row.try_get(at + 3)?),
        app_mode: app_mode_of(row.try_get(at + 4)?)?,
        frontend_mode: frontend_of(row.try_get(at + 5)?)?,
        port: port.and_then(|p| u16::try_from(p).ok()),
        subdomain: row.try_get(at + 7)?,
        envs: match envs {
            Some(v @ Value::Object(_)) => serde_json::from_value(v)?,
            _ => Default::default(),
        },
        arguments: row.try_get(at + 9)?,
        open_to_public: row.try_get(at + 10)?,
        allowed_client_ips: allowed
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
        user_id: row.try_get(at + 12)?,
        endpoint_id: row.try_get(at + 13)?,
        runtime_variant: row.try_get(at + 14)?,
        session_ids: row.try_get(at + 15)?,
        route_info: routes,
        created_at: Some(time(row.try_get(at + 17)?)),
        updated_at: Some(time(row.try_get(at + 18)?)),
        upstream_reuse,
    };
    let traceparent: Option<&str> = row.try_get(at + 20)?;
    let tracestate: Option<&str> = row.try_get(at + 21)?;
    Ok((
        circuit,
        Origin::stored(row.try_get(at + 19)?, traceparent, tracestate),
    ))
}

impl PgStore {
    /// Connects to `url` (`postgres://user:pass@host:port/db`) and migrates.
    pub async fn open(url: &str, pool_size: usize) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Pool(format!("[database] url: {e}")))?;
        // Bounded on the server too: a statement stuck behind a lock or a hung disk is
        // cancelled there, and a connection attempt to a silent host gives up.
        // A transaction whose client went silent (a path to us that stopped carrying
        // packets) would hold its row locks for ever: the server ends such a session
        // after `idle_in_transaction_session_timeout`.
        let options = format!(
            "{} -c statement_timeout={} -c idle_in_transaction_session_timeout={}",
            config.get_options().unwrap_or_default(),
            super::STATEMENT_TIMEOUT.as_millis(),
            IDLE_IN_TRANSACTION_TIMEOUT.as_millis()
        );
        config.options(options.trim());
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(std::time::Duration::from_secs(3));
        }
        // A silent socket is found dead by the kernel in seconds, not hours: data
        // unacknowledged for `tcp_user_timeout`, or keepalive probes unanswered (the
        // defaults, two hours idle, unless the URL sets its own).
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(IDLE_IN_TRANSACTION_TIMEOUT);
        }
        if config.get_keepalives_idle() == std::time::Duration::from_secs(2 * 60 * 60) {
            config
                .keepalives(true)
                .keepalives_idle(std::time::Duration::from_secs(10))
                .keepalives_interval(std::time::Duration::from_secs(5))
                .keepalives_retries(3);
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        // At least three: a route write holds one connection for its turn
        // ([`PgStore::route_turn`]) and a creation one for its reuse key's
        // ([`PgStore::reuse_turn`]) while their reads and writes take another.
        let max_size = pool_size.clamp(3, 1024);
        let pool = Pool::builder(manager)
            .max_size(max_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(std::time::Duration::from_secs(10)))
            .create_timeout(Some(std::time::Duration::from_secs(10)))
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        let store = Self {
            pool,
            clock: Default::default(),
            reuse_turns: std::sync::Arc::new(tokio::sync::Semaphore::new((max_size / 2).max(1))),
        };
        store.migrate().await?;
        let client = store.client().await?;
        store.read_clock(&client).await;
        Ok(store)
    }

    /// A turn at route writes, across every coordinator on this database: a
    /// connection holding the session advisory lock [`ROUTE_WRITES_KEY`]. It is
    /// tried without waiting on the server (a lock wait cancelled by our deadline
    /// could still be granted later, to a connection back in the pool), again
    /// every 20 ms until [`super::CALL_DEADLINE`]; the connection is in the turn
    /// from the first try, so a turn dropped anywhere closes it, and the server
    /// lets the lock go with it.
    /// The whole of it, the pool's wait for a connection included, is bounded by
    /// the call's deadline.
    pub(super) async fn route_turn(&self) -> Result<super::RouteTurn, StoreError> {
        tokio::time::timeout(super::CALL_DEADLINE, self.take_route_turn())
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(format!(
                    "no turn at route writes within {:?}",
                    super::CALL_DEADLINE
                )))
            })
    }

    async fn take_route_turn(&self) -> Result<super::RouteTurn, StoreError> {
        let turn = super::RouteTurn {
            pg: Some(self.client().await?.detach()),
        };
        loop {
            let Some(client) = turn.pg.as_ref() else {
                return Err(StoreError::Unavailable("no connection".into()));
            };
            let got: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&ROUTE_WRITES_KEY])
                .await?
                .try_get(0)?;
            if got {
                return Ok(turn);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// A turn at a reuse key ([`super::Store::reuse_turn`]): a connection holding
    /// the session advisory lock ([`REUSE_TURN_CLASS`], `hashtext(key)`), tried
    /// without waiting on the server (a lock wait cancelled by our deadline could
    /// still be granted later, to a connection back in the pool) every 50 ms until
    /// `wait`, each try bounded by [`super::CALL_DEADLINE`]. Between tries the
    /// connection goes back to the pool (a call waiting for its turn holds none);
    /// during a try it is in the turn, so a try dropped anywhere closes it.
    /// A try first waits for one of this process's [`PgStore::reuse_turns`]
    /// (within `wait` too), held by the turn it yields and let go between tries.
    pub(super) async fn reuse_turn(
        &self,
        key: &str,
        wait: std::time::Duration,
    ) -> Result<Option<super::ReuseTurn>, StoreError> {
        let until = tokio::time::Instant::now() + wait;
        let unavailable = || {
            StoreError::Unavailable(format!(
                "no reuse turn tried within {:?}",
                super::CALL_DEADLINE
            ))
        };
        loop {
            let slot = match tokio::time::timeout_at(
                until,
                self.reuse_turns.clone().acquire_owned(),
            )
            .await
            {
                Ok(Ok(slot)) => slot,
                // Never closed.
                Ok(Err(_)) => return Err(StoreError::Unavailable("no reuse turns".into())),
                Err(_) => {
                    tracing::warn!(
                        "every turn at a reuse key this coordinator may hold is held (as many creations under way as half the database pool); not waiting longer"
                    );
                    return Ok(None);
                }
            };
            let client = tokio::time::timeout(super::CALL_DEADLINE, self.client())
                .await
                .map_err(|_| unavailable())??;
            let mut turn = super::ReuseTurn {
                pg: Some(client.detach()),
                key: key.to_owned(),
                slot: Some(slot),
            };
            let Some(client) = turn.pg.as_ref() else {
                return Err(StoreError::Unavailable("no connection".into()));
            };
            let got: bool = tokio::time::timeout(
                super::CALL_DEADLINE,
                client.query_one(
                    "SELECT pg_try_advisory_lock($1, hashtext($2))",
                    &[&REUSE_TURN_CLASS, &key],
                ),
            )
            .await
            .map_err(|_| unavailable())??
            .try_get(0)?;
            if got {
                return Ok(Some(turn));
            }
            // Not taken: the connection holds nothing, back to the pool, and the
            // slot to the calls waiting for one.
            drop(turn.pg.take());
            drop(turn.slot.take());
            if tokio::time::Instant::now() >= until {
                return Ok(None);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Reads the server's clock on `client` and keeps how far it is ahead of ours.
    /// A reading that fails or takes too long leaves the last one standing.
    async fn read_clock(&self, client: &tokio_postgres::Client) {
        let sent = SystemTime::now();
        let Ok(row) = client.query_one("SELECT clock_timestamp()", &[]).await else {
            return;
        };
        let back = SystemTime::now();
        let Ok(theirs) = row.try_get::<_, SystemTime>(0) else {
            return;
        };
        let Some(ahead) = server_ahead(sent, theirs, back) else {
            return;
        };
        if ahead.unsigned_abs() > CLOCK_WARN_MICROS.unsigned_abs() {
            tracing::warn!(
                engine = "postgresql",
                server_ahead_ms = ahead / 1000,
                "the database's clock differs from this coordinator's; the deadlines \
                 the database checks are moved by the difference (keep clocks synchronised)"
            );
        }
        if let Ok(mut clock) = self.clock.lock() {
            clock.ahead_micros = ahead;
            clock.read_at = Some(std::time::Instant::now());
        }
    }

    /// A write was refused past its deadline on the server's clock: the reading of
    /// that clock may be stale (our clock stepped since, or the server's), and the
    /// next call that moves a deadline reads it again rather than up to
    /// [`CLOCK_REREAD`] later. Else a clock stepped back failed every creation
    /// until then.
    fn doubt_clock(&self) {
        if let Ok(mut clock) = self.clock.lock() {
            clock.read_at = None;
        }
    }

    /// `deadline` (a time on our clock) as a time on the server's, reading the
    /// server's clock first on `client` when the last reading is old.
    async fn on_server_clock(
        &self,
        client: &tokio_postgres::Client,
        deadline: SystemTime,
    ) -> SystemTime {
        let stale = self
            .clock
            .lock()
            .map(|c| c.read_at.is_none_or(|at| at.elapsed() >= CLOCK_REREAD))
            .unwrap_or(true);
        if stale {
            self.read_clock(client).await;
        }
        let ahead = self.clock.lock().map(|c| c.ahead_micros).unwrap_or(0);
        shifted(deadline, ahead)
    }

    /// How far (seconds) the server's clock is ahead of ours, reading it first when
    /// the last reading is old.
    pub(super) async fn clock_ahead(&self) -> Result<f64, StoreError> {
        let stale = self
            .clock
            .lock()
            .map(|c| c.read_at.is_none_or(|at| at.elapsed() >= CLOCK_REREAD))
            .unwrap_or(true);
        if stale {
            let client = self.client().await?;
            self.read_clock(&client).await;
        }
        Ok(self.clock.lock().map(|c| c.ahead_micros).unwrap_or(0) as f64 / 1e6)
    }

    async fn client(&self) -> Result<Conn, StoreError> {
        self.pool
            .get()
            .await
            .map(|c| Conn(Some(c)))
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    /// Applies the migrations not yet applied, in one transaction; one that
    /// deadlocks with another node's writes (PostgreSQL aborts one of the two) is
    /// tried again, a few times.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.migrate_once().await {
                Err(StoreError::Postgres(e))
                    if tries < 5
                        && e.code()
                            == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED) =>
                {
                    tracing::warn!(error = %e, tries, "store migration deadlocked; trying again");
                    tokio::time::sleep(std::time::Duration::from_millis(100 * tries)).await;
                }
                done => return done,
            }
        }
    }

    async fn migrate_once(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // One migrator at a time across coordinators (key: "appproxy" in ASCII).
        tx.execute("SELECT pg_advisory_xact_lock(6170706272)", &[])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS appproxy_schema_migrations (
                version integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
        let done: i32 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM appproxy_schema_migrations",
                &[],
            )
            .await?
            .try_get(0)?;
        super::schema_known(i64::from(done), MIGRATIONS.len())?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(done.max(0) as usize) {
            tx.batch_execute(m).await?;
            let version = (i + 1) as i32;
            tx.execute(
                "INSERT INTO appproxy_schema_migrations (version) VALUES ($1)",
                &[&version],
            )
            .await?;
            tracing::info!(engine = "postgresql", migration = version, "store migrated");
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// A round trip that also asks whether the server takes writes: a standby (in
    /// recovery) or a server whose transactions are read-only
    /// (`default_transaction_read_only`, as a demoted primary is set) refuses every
    /// creation, so it is [`StoreError::Unavailable`].
    pub(super) async fn writable(&self) -> Result<(), StoreError> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'",
                &[],
            )
            .await?;
        let (recovery, read_only): (bool, bool) = (row.try_get(0)?, row.try_get(1)?);
        if recovery {
            return Err(StoreError::Unavailable(
                "the database is a standby in recovery: it takes no writes".into(),
            ));
        }
        if read_only {
            return Err(StoreError::Unavailable(
                "the database's transactions are read-only (default_transaction_read_only): \
                 it takes no writes"
                    .into(),
            ));
        }
        Ok(())
    }

    pub(super) async fn upsert_worker(
        &self,
        registration: &WorkerRegistration,
    ) -> Result<uuid::Uuid, StoreError> {
        let r = registration;
        let authority = r.authority.as_str();
        let frontend = match r.frontend_mode {
            FrontendMode::Wildcard => "WILDCARD_DOMAIN",
            FrontendMode::Port => "PORT",
        };
        let protocol = match r.protocol {
            ProxyProtocol::Tcp => "TCP",
            ProxyProtocol::Grpc => "GRPC",
            ProxyProtocol::Http2 => "HTTP2",
            ProxyProtocol::Http | ProxyProtocol::Preopen => "HTTP",
        };
        let port_range: Option<Vec<i32>> = r
            .port_range
            .map(|range| range.iter().map(|p| i32::from(*p)).collect());
        let total = match port_range.as_deref() {
            Some([lo, hi]) if hi >= lo => hi - lo + 1,
            _ => -1,
        };
        let traffics: Vec<String> = r
            .accepted_traffics
            .iter()
            .map(|t| match t {
                AppMode::Interactive => "INTERACTIVE".to_owned(),
                AppMode::Inference => "INFERENCE".to_owned(),
            })
            .collect();
        let api_port = r.api_port.and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        let wildcard_traffic_port = r.wildcard_traffic_port.map(i32::from);
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_one(
                "INSERT INTO workers (authority, frontend_mode, protocol, hostname, tls_listen,
                    tls_advertised, api_port, available_slots, occupied_slots, nodes, port_range,
                    wildcard_domain, wildcard_traffic_port, accepted_traffics, filtered_apps_only,
                    traefik_last_used_marker_path)
                 VALUES ($1, $2::text::frontendmode, $3::text::proxyprotocol, $4, $5, $6, $7, $8, 0, 1,
                    $9, $10, $11, $12::text[]::appmode[], $13, $14)
                 ON CONFLICT (authority) DO UPDATE SET
                    frontend_mode = EXCLUDED.frontend_mode, protocol = EXCLUDED.protocol,
                    hostname = EXCLUDED.hostname, tls_listen = EXCLUDED.tls_listen,
                    tls_advertised = EXCLUDED.tls_advertised, api_port = EXCLUDED.api_port,
                    available_slots = EXCLUDED.available_slots - workers.occupied_slots,
                    nodes = workers.nodes + 1, port_range = EXCLUDED.port_range,
                    wildcard_domain = EXCLUDED.wildcard_domain,
                    wildcard_traffic_port = EXCLUDED.wildcard_traffic_port,
                    filtered_apps_only = EXCLUDED.filtered_apps_only,
                    traefik_last_used_marker_path = EXCLUDED.traefik_last_used_marker_path,
                    status = 'ALIVE', updated_at = now()
                 RETURNING id",
                &[
                    &authority,
                    &frontend,
                    &protocol,
                    &r.hostname,
                    &r.tls_listen,
                    &r.tls_advertised,
                    &api_port,
                    &total,
                    &port_range,
                    &r.wildcard_domain,
                    &wildcard_traffic_port,
                    &traffics,
                    &r.filtered_apps_only,
                    &r.traefik_last_used_marker_path,
                ],
            )
            .await?;
        let id: uuid::Uuid = row.try_get(0)?;
        // The registration's filters replace the worker's (its config is the truth;
        // accumulated, a worker's filters grew without bound, and every placement
        // reads them all); a registration without the key keeps them.
        if r.app_filters.is_some() {
            tx.execute("DELETE FROM worker_app_filters WHERE worker = $1", &[&id])
                .await?;
        }
        for f in r.app_filters.iter().flatten() {
            let (k, Some(v)) = (&f.key, super::filter_value(&f.value)) else {
                continue;
            };
            tx.execute(
                "INSERT INTO worker_app_filters (property_name, property_value, worker)
                 VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&k, &v, &id],
            )
            .await?;
        }
        // A node that names itself counts once however often it registers (a crashed
        // and restarted process is the same node).
        if let Some(node) = &r.node_id {
            tx.execute(NODE_SEEN, &[&id, node]).await?;
            tx.execute(RECOUNT, &[&id]).await?;
        }
        tx.commit().await?;
        Ok(id)
    }

    pub(super) async fn heartbeat(
        &self,
        id: &uuid::Uuid,
        node: Option<&str>,
    ) -> Result<bool, StoreError> {
        if let Some(node) = node {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            if tx
                .query_opt("SELECT 1 FROM workers WHERE id = $1 FOR UPDATE", &[id])
                .await?
                .is_none()
            {
                return Ok(false);
            }
            if tx.execute(NODE_HEARD, &[id, &node]).await? == 0 {
                return Err(super::node_left(node));
            }
            tx.execute(RECOUNT, &[id]).await?;
            tx.commit().await?;
            return Ok(true);
        }
        // Without node names, a worker whose nodes all deregistered (none left) is
        // not made `ALIVE` by a heartbeat: only a registration does that.
        Ok(self
            .client()
            .await?
            .execute(
                "UPDATE workers SET updated_at = now(),
                    status = CASE WHEN nodes > 0 THEN 'ALIVE' ELSE status END WHERE id = $1",
                &[id],
            )
            .await?
            == 1)
    }

    pub(super) async fn deregister_worker(
        &self,
        id: &uuid::Uuid,
        node: Option<&str>,
    ) -> Result<bool, StoreError> {
        if let Some(node) = node {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            tx.execute(
                "UPDATE worker_nodes SET left_at = now()
                 WHERE worker = $1 AND node = $2 AND left_at IS NULL",
                &[id, &node],
            )
            .await?;
            let found = tx.execute(RECOUNT, &[id]).await? == 1;
            tx.commit().await?;
            return Ok(found);
        }
        Ok(self
            .client()
            .await?
            .execute(
                "UPDATE workers SET nodes = GREATEST(nodes - 1, 0),
                    status = CASE WHEN nodes - 1 <= 0 THEN 'LOST' ELSE status END,
                    updated_at = now() WHERE id = $1",
                &[id],
            )
            .await?
            == 1)
    }

    pub(super) async fn mark_lost(
        &self,
        timeout_secs: u64,
        deadline: SystemTime,
    ) -> Result<Vec<(uuid::Uuid, String)>, StoreError> {
        let secs = timeout_secs as f64;
        let client = self.client().await?;
        // Each statement does nothing past the call's deadline (`$3`, `$2`): sent
        // to a paused server, it would run when the server resumes, and every
        // heartbeat the pause held back would look missed.
        let deadline = self.on_server_clock(&client, deadline).await;
        // A stamp ahead of the server's clock was taken before that clock stepped
        // back (an NTP step, a host's clock set right): judged from it, a worker
        // that fell silent meanwhile would be found lost the step later. It is
        // brought back to now, and judged from there.
        client
            .execute(
                "WITH w AS (
                    UPDATE workers SET updated_at = now()
                    WHERE status = 'ALIVE' AND updated_at > now() AND clock_timestamp() < $1),
                 n AS (
                    UPDATE worker_nodes SET seen_at = now()
                    WHERE left_at IS NULL AND seen_at > now() AND clock_timestamp() < $1)
                 UPDATE worker_nodes SET left_at = now()
                 WHERE left_at > now() AND clock_timestamp() < $1",
                &[&deadline],
            )
            .await?;
        // Nodes that stopped heartbeating (crashed) no longer count.
        client
            .execute(
                "WITH stale AS (
                    DELETE FROM worker_nodes
                    WHERE ((left_at IS NULL AND seen_at < now() - make_interval(secs => $1))
                       OR left_at < now() - make_interval(secs => $2))
                       AND clock_timestamp() < $3
                    RETURNING worker)
                 UPDATE workers w SET nodes = (SELECT count(*) FROM worker_nodes n
                    WHERE n.worker = w.id AND n.left_at IS NULL
                        AND n.seen_at >= now() - make_interval(secs => $1))
                 WHERE w.id IN (SELECT worker FROM stale)",
                &[&secs, &LEFT_NODES_KEPT_SECS, &deadline],
            )
            .await?;
        let rows = client
            .query(
                "UPDATE workers SET status = 'LOST'
                 WHERE status = 'ALIVE' AND updated_at < now() - make_interval(secs => $1)
                   AND clock_timestamp() < $2
                 RETURNING id, authority",
                &[&secs, &deadline],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    pub(super) async fn workers(&self, which: super::Which) -> Result<Vec<WorkerRow>, StoreError> {
        let client = self.client().await?;
        // `$1`: one worker's ID, or NULL; `$2`: only `ALIVE` ones.
        let (one, alive) = match which {
            super::Which::All => (None, false),
            super::Which::Alive => (None, true),
            super::Which::One(id) => (Some(id), false),
        };
        const WHICH: &str = "($1::uuid IS NULL OR w.id = $1) AND (NOT $2 OR w.status = 'ALIVE')";
        let rows = client
            .query(
                &format!(
                    "SELECT id, authority, frontend_mode::text, protocol::text, hostname, tls_listen,
                        tls_advertised, api_port, port_range, wildcard_domain, wildcard_traffic_port,
                        accepted_traffics::text[], filtered_apps_only, traefik_last_used_marker_path,
                        status, nodes, created_at, updated_at
                     FROM workers w WHERE {WHICH} ORDER BY authority"
                ),
                &[&one, &alive],
            )
            .await?;
        let filters = client
            .query(
                &format!(
                    "SELECT f.worker, f.property_name, f.property_value
                     FROM worker_app_filters f JOIN workers w ON w.id = f.worker
                     WHERE {WHICH} ORDER BY f.property_name, f.property_value"
                ),
                &[&one, &alive],
            )
            .await?;
        // Each worker's filters, grouped in one pass (not every filter row read again
        // per worker).
        let mut by_worker: std::collections::HashMap<uuid::Uuid, Vec<Value>> =
            std::collections::HashMap::new();
        for f in &filters {
            by_worker.entry(f.try_get(0)?).or_default().push(
                json!({"key": f.try_get::<_, String>(1)?, "value": f.try_get::<_, String>(2)?}),
            );
        }
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: uuid::Uuid = r.try_get(0)?;
            let app_filters: Vec<Value> = by_worker.remove(&id).unwrap_or_default();
            let traffics: Vec<String> = r.try_get(11)?;
            let traffics: Vec<Value> = traffics
                .iter()
                .map(|t| app_mode_of(t).map(wire))
                .collect::<Result<_, _>>()?;
            let nodes: i32 = r.try_get(15)?;
            let body = json!({
                "authority": r.try_get::<_, String>(1)?,
                "frontend_mode": wire(frontend_of(r.try_get(2)?)?),
                "protocol": wire(protocol_of(r.try_get(3)?)?),
                "hostname": r.try_get::<_, String>(4)?,
                "tls_listen": r.try_get::<_, bool>(5)?,
                "tls_advertised": r.try_get::<_, bool>(6)?,
                "api_port": r.try_get::<_, i32>(7)?,
                "port_range": r.try_get::<_, Option<Vec<i32>>>(8)?,
                "wildcard_domain": r.try_get::<_, Option<String>>(9)?,
                "wildcard_traffic_port": r.try_get::<_, Option<i32>>(10)?,
                "accepted_traffics": traffics,
                "filtered_apps_only": r.try_get::<_, bool>(12)?,
                "traefik_last_used_marker_path": r.try_get::<_, Option<String>>(13)?,
                "app_filters": app_filters,
            });
            out.push(WorkerRow::new(
                id,
                body,
                r.try_get(14)?,
                i64::from(nodes),
                time(r.try_get(16)?),
                time(r.try_get(17)?),
            )?);
        }
        Ok(out)
    }

    pub(super) async fn insert_circuit(
        &self,
        circuit: &Circuit,
        origin_request_id: Option<&str>,
        (traceparent, tracestate): &(Option<String>, Option<String>),
        deadline: SystemTime,
        limit: Option<(uuid::Uuid, u32)>,
        creating_for: Option<f64>,
    ) -> Result<(), StoreError> {
        let worker = circuit
            .worker
            .ok_or_else(|| StoreError::Data("a stored circuit needs a worker".into()))?;
        let envs = serde_json::to_value(&circuit.envs)?;
        let routes = serde_json::to_value(&circuit.route_info)?;
        let allowed =
            (!circuit.allowed_client_ips.is_empty()).then(|| circuit.allowed_client_ips.join(","));
        let port = circuit.port.map(i32::from);
        // One statement, one round trip: the row and the worker's slot count (the
        // original keeps one on the worker row) change together or not at all. It
        // carries its caller's deadline (`$22`) and inserts nothing once that has
        // passed on the server's clock: a statement held in transit (a stalled
        // network path; `statement_timeout` only runs once the server starts it)
        // can arrive after its caller was answered 503, and must not then store a
        // circuit nobody was told of. With a session limit (`$23`, `$24`) it counts
        // the session's circuits under the session's lock first, and refuses past
        // the limit (`appproxy_circuit_may_insert`, SQLSTATE AP429).
        let (limit_session, limit_n) = match limit {
            Some((session, n)) => (Some(session), i32::try_from(n).unwrap_or(i32::MAX)),
            None => (None, 0),
        };
        let client = self.client().await?;
        // The server compares the deadline with its own clock.
        let deadline = self.on_server_clock(&client, deadline).await;
        let inserted = client
            .execute(
                "WITH created AS (
                    INSERT INTO circuits (id, app, protocol, worker, app_mode, frontend_mode, port,
                        subdomain, envs, arguments, open_to_public, allowed_client_ips, user_id,
                        endpoint_id, runtime_variant, session_ids, route_info, origin_request_id,
                        idle_check_at, traceparent, tracestate, creating_until, upstream_reuse)
                    SELECT $1, $2, $3::text::proxyprotocol, $4, $5::text::appmode,
                        $6::text::frontendmode, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,
                        CASE WHEN $19 THEN now() END, $20, $21,
                        now() + make_interval(secs => $25::float8), $26
                    WHERE appproxy_circuit_may_insert($23, $24, $22)
                    RETURNING worker)
                 , bumped AS (
                    UPDATE workers SET occupied_slots = occupied_slots + 1,
                        available_slots = CASE WHEN available_slots < 0 THEN -1 ELSE available_slots - 1 END,
                        revision = revision + 1
                    FROM created WHERE workers.id = created.worker
                    RETURNING workers.id, workers.revision)
                 INSERT INTO circuit_changes (worker, revision, circuit, removal)
                    SELECT id, revision, $1, false FROM bumped",
                &[
                    &circuit.id,
                    &circuit.app,
                    &protocol_name(circuit.protocol),
                    &worker,
                    &app_mode_name(circuit.app_mode),
                    &frontend_name(circuit.frontend_mode),
                    &port,
                    &circuit.subdomain,
                    &envs,
                    &circuit.arguments,
                    &circuit.open_to_public,
                    &allowed,
                    &circuit.user_id,
                    &circuit.endpoint_id,
                    &circuit.runtime_variant,
                    &circuit.session_ids,
                    &routes,
                    &origin_request_id,
                    &super::idle_collectable(circuit),
                    traceparent,
                    tracestate,
                    &deadline,
                    &limit_session,
                    &limit_n,
                    &creating_for,
                    &circuit.upstream_reuse.map(Reuse::as_str),
                ],
            )
            .await
            .map_err(|e| {
                if e.code().map(|c| c.code()) == Some(SESSION_LIMIT) {
                    StoreError::SessionLimit(limit.map(|(_, n)| n).unwrap_or_default())
                } else if past_deadline(&e) {
                    self.doubt_clock();
                    StoreError::Unavailable(
                        "the insert reached its commit after its deadline; nothing stored".into(),
                    )
                } else {
                    conflict_or(e)
                }
            })?;
        if inserted == 0 {
            self.doubt_clock();
            return Err(StoreError::Unavailable(
                "the insert reached the database after its deadline; nothing stored".into(),
            ));
        }
        Ok(())
    }

    pub(super) async fn update_routes(
        &self,
        id: &uuid::Uuid,
        routes: &[RouteInfo],
        (traceparent, tracestate): &(Option<String>, Option<String>),
        deadline: SystemTime,
    ) -> Result<bool, StoreError> {
        let value = serde_json::to_value(routes)?;
        let sessions: Vec<uuid::Uuid> = routes.iter().map(|r| r.session_id).collect();
        let mut client = self.client().await?;
        // Nothing is changed past the caller's deadline, checked at commit
        // (`appproxy_commit_before_deadline`): a `COMMIT` held in transit past a
        // 503 stored the routes, and no event went out.
        let deadline = self.on_server_clock(&client, deadline).await;
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT set_config('appproxy.deadline', extract(epoch FROM $1::timestamptz)::text, true)",
            &[&deadline],
        )
        .await?;
        let worker: Option<uuid::Uuid> = tx
            .query_opt(
                "UPDATE circuits SET route_info = $1, session_ids = $2, updated_at = now(),
                    traceparent = $4, tracestate = $5
                 WHERE id = $3 RETURNING worker",
                &[&value, &sessions, id, traceparent, tracestate],
            )
            .await?
            .map(|r| r.try_get(0))
            .transpose()?;
        if let Some(worker) = worker {
            let none: Option<&str> = None;
            tx.execute(LOG_CHANGE, &[&worker, id, &false, &none, &none, &none])
                .await?;
        }
        match tx.commit().await {
            Err(e) if past_deadline(&e) => {
                self.doubt_clock();
                return Err(StoreError::Unavailable(
                    "the route update reached its commit after its deadline; nothing changed"
                        .into(),
                ));
            }
            other => other?,
        }
        Ok(worker.is_some())
    }

    pub(super) async fn circuit(&self, id: &uuid::Uuid) -> Result<Option<CircuitRow>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {CIRCUIT_COLUMNS} FROM circuits WHERE id = $1"),
                &[id],
            )
            .await?;
        row.as_ref().map(circuit_of).transpose()
    }

    pub(super) async fn circuits(
        &self,
        worker: Option<&uuid::Uuid>,
    ) -> Result<Vec<CircuitRow>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {CIRCUIT_COLUMNS} FROM circuits
                     WHERE $1::uuid IS NULL OR worker = $1 ORDER BY created_at, id"
                ),
                &[&worker],
            )
            .await?;
        rows.iter().map(circuit_of).collect()
    }

    pub(super) async fn used_slots(
        &self,
        port_workers: &[uuid::Uuid],
        subdomain: &str,
    ) -> Result<Vec<UsedSlot>, StoreError> {
        let client = self.client().await?;
        // Two statements, each on its index; the port one only when there are port
        // workers (an empty `= ANY` must not cost a scan of every circuit).
        let mut rows = client
            .query(
                "SELECT worker, port, subdomain FROM circuits WHERE subdomain = $1",
                &[&subdomain],
            )
            .await?;
        if !port_workers.is_empty() {
            rows.extend(
                client
                    .query(
                        "SELECT worker, port, subdomain FROM circuits
                         WHERE worker = ANY($1) AND port IS NOT NULL",
                        &[&port_workers],
                    )
                    .await?,
            );
        }
        rows.iter()
            .map(|r| {
                let port: Option<i32> = r.try_get(1)?;
                Ok((
                    r.try_get(0)?,
                    port.and_then(|p| u16::try_from(p).ok()),
                    r.try_get(2)?,
                ))
            })
            .collect()
    }

    pub(super) async fn used_port_counts(
        &self,
        ranges: &[(uuid::Uuid, u16, u16)],
    ) -> Result<std::collections::HashMap<uuid::Uuid, u64>, StoreError> {
        let workers: Vec<uuid::Uuid> = ranges.iter().map(|r| r.0).collect();
        let lows: Vec<i32> = ranges.iter().map(|r| i32::from(r.1)).collect();
        let highs: Vec<i32> = ranges.iter().map(|r| i32::from(r.2)).collect();
        // Each worker's kept count, less its ports outside the range (two range
        // reads of the `(worker, port)` index, empty but for a worker whose range
        // changed): no read of the ports inside it.
        let rows = self
            .client()
            .await?
            .query(
                "SELECT r.worker, w.port_circuits
                     - (SELECT count(*) FROM circuits c WHERE c.worker = r.worker AND c.port < r.lo)
                     - (SELECT count(*) FROM circuits c WHERE c.worker = r.worker AND c.port > r.hi)
                 FROM unnest($1::uuid[], $2::int4[], $3::int4[]) AS r(worker, lo, hi)
                 JOIN workers w ON w.id = r.worker",
                &[&workers, &lows, &highs],
            )
            .await?;
        let mut out = std::collections::HashMap::new();
        for r in &rows {
            let n: i64 = r.try_get(1)?;
            if n > 0 {
                out.insert(r.try_get(0)?, n as u64);
            }
        }
        Ok(out)
    }

    pub(super) async fn used_ports(
        &self,
        worker: &uuid::Uuid,
        lo: u16,
        hi: u16,
    ) -> Result<Vec<u16>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT port FROM circuits WHERE worker = $1 AND port BETWEEN $2 AND $3
                 ORDER BY port",
                &[worker, &i32::from(lo), &i32::from(hi)],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let port: i32 = r.try_get(0)?;
            out.extend(u16::try_from(port).ok());
        }
        Ok(out)
    }

    pub(super) async fn circuits_of_session(
        &self,
        session: &uuid::Uuid,
    ) -> Result<Vec<CircuitRow>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!("SELECT {CIRCUIT_COLUMNS} FROM circuits WHERE session_ids @> ARRAY[$1]::uuid[] ORDER BY created_at, id"),
                &[session],
            )
            .await?;
        rows.iter().map(circuit_of).collect()
    }

    pub(super) async fn upsert_endpoint(
        &self,
        id: &uuid::Uuid,
        enabled: bool,
        config: Option<&Value>,
        settle: Option<&uuid::Uuid>,
    ) -> Result<bool, StoreError> {
        // With `settle`, one statement: the creation of that circuit is settled and
        // the row written together, or neither when the circuit is gone.
        let written = self
            .client()
            .await?
            .execute(
                "WITH settled AS (
                    UPDATE circuits SET creating_until = NULL WHERE id = $4 RETURNING id)
                 INSERT INTO endpoints (id, health_check_enabled, health_check_config)
                    SELECT $1, $2, $3 WHERE $4::uuid IS NULL OR EXISTS (SELECT 1 FROM settled)
                 ON CONFLICT (id) DO UPDATE SET health_check_enabled = $2, health_check_config = $3, updated_at = now()",
                &[id, &enabled, &config, &settle],
            )
            .await?;
        Ok(written == 1)
    }

    pub(super) async fn settle_creation(
        &self,
        id: &uuid::Uuid,
        deadline: SystemTime,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        // Nothing changes past the caller's deadline on the server's clock: a
        // clearing held in transit past the caller's 503 would leave settled a
        // circuit whose withdrawal (and sweep) is then due.
        let deadline = self.on_server_clock(&client, deadline).await;
        let row = client
            .query_one(
                "WITH settled AS (
                    UPDATE circuits SET creating_until = NULL
                    WHERE id = $1 AND clock_timestamp() < $2 RETURNING id)
                 SELECT (SELECT count(*) FROM settled), clock_timestamp() < $2",
                &[id, &deadline],
            )
            .await?;
        let settled: i64 = row.try_get(0)?;
        let in_time: bool = row.try_get(1)?;
        if settled == 0 && !in_time {
            self.doubt_clock();
            return Err(StoreError::Unavailable(
                "the creation's settling reached the database after its deadline; nothing changed"
                    .into(),
            ));
        }
        Ok(settled > 0)
    }

    pub(super) async fn renew_creations(
        &self,
        ids: &[uuid::Uuid],
        secs: f64,
    ) -> Result<u64, StoreError> {
        Ok(self
            .client()
            .await?
            .execute(
                // A row locked by another transaction (a settling or a removal
                // under way, an operator's session) is skipped, renewed by the
                // next pass: waited for, it held up every other mark's renewal
                // until the statement timeout, and failed them all.
                "UPDATE circuits SET creating_until = now() + make_interval(secs => $2::float8)
                 WHERE id IN (SELECT id FROM circuits WHERE id = ANY($1) AND creating_until > now()
                    FOR UPDATE SKIP LOCKED)",
                &[&ids, &secs],
            )
            .await?)
    }

    pub(super) async fn creation_mark(
        &self,
        id: &uuid::Uuid,
    ) -> Result<Option<super::CreationMark>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT creating_until IS NOT NULL, creating_until > now() FROM circuits WHERE id = $1",
                &[id],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let marked: bool = row.try_get(0)?;
        let ahead: Option<bool> = row.try_get(1)?;
        Ok(Some(super::CreationMark::of(
            marked,
            ahead.unwrap_or(false),
        )))
    }

    pub(super) async fn overdue_creations(
        &self,
        limit: usize,
    ) -> Result<Vec<uuid::Uuid>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                // Rows locked at the read are left to the next pass: their
                // removal would wait on the lock.
                "SELECT id FROM circuits WHERE creating_until IS NOT NULL AND creating_until <= now()
                 ORDER BY creating_until LIMIT $1 FOR UPDATE SKIP LOCKED",
                &[&(limit as i64)],
            )
            .await?;
        rows.iter()
            .map(|r| r.try_get(0).map_err(StoreError::from))
            .collect()
    }

    pub(super) async fn endpoint(
        &self,
        id: &uuid::Uuid,
    ) -> Result<Option<(bool, Option<Value>)>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT health_check_enabled, health_check_config FROM endpoints WHERE id = $1",
                &[id],
            )
            .await?;
        let Some(r) = row else { return Ok(None) };
        // The original may have written the config as a JSON string inside JSONB.
        let config: Option<Value> = match r.try_get::<_, Option<Value>>(1)? {
            Some(Value::String(text)) => Some(serde_json::from_str(&text)?),
            other => other,
        };
        Ok(Some((r.try_get(0)?, config)))
    }

    pub(super) async fn health_checked_endpoints(
        &self,
    ) -> Result<Vec<(uuid::Uuid, Value)>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, health_check_config FROM endpoints
                 WHERE health_check_enabled AND health_check_config IS NOT NULL",
                &[],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let config: Value = match r.try_get::<_, Value>(1)? {
                Value::String(text) => serde_json::from_str(&text)?,
                other => other,
            };
            out.push((r.try_get(0)?, config));
        }
        Ok(out)
    }

    pub(super) async fn delete_endpoint(&self, id: &uuid::Uuid) -> Result<bool, StoreError> {
        Ok(self
            .client()
            .await?
            .execute("DELETE FROM endpoints WHERE id = $1", &[id])
            .await?
            == 1)
    }

    pub(super) async fn circuit_of_endpoint(
        &self,
        endpoint: &uuid::Uuid,
    ) -> Result<Option<CircuitRow>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {CIRCUIT_COLUMNS} FROM circuits WHERE endpoint_id = $1"),
                &[endpoint],
            )
            .await?;
        row.as_ref().map(circuit_of).transpose()
    }

    pub(super) async fn delete_circuit(
        &self,
        id: &uuid::Uuid,
        (request_id, (traceparent, tracestate)): &Behind,
        deadline: SystemTime,
        only_overdue: bool,
    ) -> Result<bool, StoreError> {
        // One statement, as an insert: the row, the worker's slot count and the
        // change-log entry go together or not at all, and nothing is removed once
        // the caller's deadline (`$5`) has passed on the server's clock, whether
        // at the statement or at its commit (`appproxy.deadline`, checked by
        // `appproxy_commit_before_deadline` after every lock wait). As a
        // transaction of several statements with no deadline, a `COMMIT` held in
        // transit (a paused server, a stalled path) committed the removal after its
        // caller had been answered 503: no removal event went out, and the worker
        // went on serving the circuit and holding its port until its next poll.
        let mut client = self.client().await?;
        let deadline = self.on_server_clock(&client, deadline).await;
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT set_config('appproxy.deadline', extract(epoch FROM $1::timestamptz)::text, true)",
            &[&deadline],
        )
        .await?;
        let row = tx
            .query_one(
                "WITH gone AS (
                    DELETE FROM circuits WHERE id = $1 AND clock_timestamp() < $5
                        AND (NOT $6 OR creating_until <= now())
                    RETURNING worker)
                 , bumped AS (
                    UPDATE workers SET occupied_slots = GREATEST(occupied_slots - 1, 0),
                        available_slots = CASE WHEN available_slots < 0 THEN -1 ELSE available_slots + 1 END,
                        revision = revision + 1
                    FROM gone WHERE workers.id = gone.worker
                    RETURNING workers.id, workers.revision)
                 , logged AS (
                    INSERT INTO circuit_changes (worker, revision, circuit, removal, request_id,
                        traceparent, tracestate)
                    SELECT id, revision, $1, true, $2, $3, $4 FROM bumped)
                 SELECT (SELECT count(*) FROM gone), clock_timestamp() < $5",
                &[
                    id,
                    request_id,
                    traceparent,
                    tracestate,
                    &deadline,
                    &only_overdue,
                ],
            )
            .await?;
        let late = || {
            self.doubt_clock();
            StoreError::Unavailable(
                "the removal reached the database after its deadline; nothing removed".into(),
            )
        };
        match tx.commit().await {
            Err(e) if past_deadline(&e) => return Err(late()),
            other => other?,
        }
        let removed: i64 = row.try_get(0)?;
        let in_time: bool = row.try_get(1)?;
        if removed == 0 && !in_time {
            return Err(late());
        }
        Ok(removed > 0)
    }

    pub(super) async fn endpoint_circuits(&self) -> Result<Vec<CircuitRow>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!("SELECT {CIRCUIT_COLUMNS} FROM circuits WHERE endpoint_id IS NOT NULL"),
                &[],
            )
            .await?;
        rows.iter().map(circuit_of).collect()
    }

    pub(super) async fn circuit_count(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .client()
            .await?
            .query_one("SELECT count(*) FROM circuits", &[])
            .await?
            .try_get(0)?;
        Ok(n.max(0) as u64)
    }

    pub(super) async fn circuit_counts(
        &self,
    ) -> Result<std::collections::HashMap<uuid::Uuid, u64>, StoreError> {
        let rows = self
            .client()
            .await?
            .query("SELECT worker, count(*) FROM circuits GROUP BY worker", &[])
            .await?;
        rows.iter()
            .map(|r| {
                let n: i64 = r.try_get(1)?;
                Ok((r.try_get(0)?, n.max(0) as u64))
            })
            .collect()
    }

    pub(super) async fn held_slots(
        &self,
        worker: Option<&uuid::Uuid>,
    ) -> Result<Vec<super::HeldSlot>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT worker, id, port, subdomain FROM circuits
                 WHERE $1::uuid IS NULL OR worker = $1 ORDER BY created_at, id",
                &[&worker],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let port: Option<i32> = r.try_get(2)?;
                Ok((
                    r.try_get(0)?,
                    r.try_get(1)?,
                    port.and_then(|p| u16::try_from(p).ok()),
                    r.try_get(3)?,
                ))
            })
            .collect()
    }

    pub(super) async fn revision(&self, worker: &uuid::Uuid) -> Result<Option<u64>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT revision FROM workers WHERE id = $1", &[worker])
            .await?;
        row.map(|r| r.try_get::<_, i64>(0).map(|v| v.max(0) as u64))
            .transpose()
            .map_err(Into::into)
    }

    pub(super) async fn changes_since(
        &self,
        worker: &uuid::Uuid,
        since: u64,
        limit: usize,
    ) -> Result<Changes, StoreError> {
        let mut client = self.client().await?;
        // One snapshot for the revision, the log's floor and the log itself.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let row = tx
            .query_opt(
                "SELECT revision, (SELECT min(revision) FROM circuit_changes WHERE worker = $1)
                 FROM workers WHERE id = $1",
                &[worker],
            )
            .await?;
        let Some(row) = row else {
            return Ok(Changes::Resync { revision: 0 });
        };
        let current = row.try_get::<_, i64>(0)?.max(0) as u64;
        let oldest: Option<i64> = row.try_get(1)?;
        if since == current {
            return Ok(Changes::Since {
                revision: current,
                upserts: Vec::new(),
                removed: Vec::new(),
                more: false,
            });
        }
        if since > current || oldest.is_none_or(|o| (o.max(1) as u64) > since + 1) {
            return Ok(Changes::Resync { revision: current });
        }
        let rows = tx
            .query(
                &format!(
                    "SELECT l.revision, l.circuit, c.id IS NOT NULL,
                        l.request_id, l.traceparent, l.tracestate, l.removal, {}
                     FROM circuit_changes l LEFT JOIN circuits c ON c.id = l.circuit AND c.worker = l.worker
                     WHERE l.worker = $1 AND l.revision > $2 ORDER BY l.revision LIMIT $3",
                    *CIRCUIT_COLUMNS_OF_C
                ),
                &[worker, &(since as i64), &(limit as i64)],
            )
            .await?;
        let mut log = Vec::with_capacity(rows.len());
        for r in &rows {
            let revision = r.try_get::<_, i64>(0)?.max(0) as u64;
            let circuit: uuid::Uuid = r.try_get(1)?;
            let present: bool = r.try_get(2)?;
            let body = if present {
                Logged::Present(circuit_of_at(r, 7)?)
            } else if r.try_get::<_, Option<bool>>(6)? == Some(false) {
                Logged::Superseded
            } else {
                Logged::Removed(Origin::stored(
                    r.try_get(3)?,
                    r.try_get::<_, Option<&str>>(4)?,
                    r.try_get::<_, Option<&str>>(5)?,
                ))
            };
            log.push((revision, circuit, body));
        }
        tx.commit().await?;
        Ok(Changes::from_log(since, current, log))
    }

    /// One page of a worker's circuits in ID order after `after`, with the worker's
    /// revision, in one statement: its one snapshot holds the revision and the page
    /// together (what a repeatable-read transaction around two statements gave, in
    /// one round trip instead of five), and the statement is prepared once per
    /// connection. The page walks the `(worker, id)` index from `after`.
    pub(super) async fn circuits_page(
        &self,
        worker: &uuid::Uuid,
        after: Option<&uuid::Uuid>,
        limit: usize,
    ) -> Result<(u64, Vec<CircuitRow>), StoreError> {
        let client = self.client().await?;
        let limit = limit as i64;
        let rows = match after {
            None => {
                let st = client.prepare_cached(&PAGE_FIRST).await?;
                client.query(&st, &[worker, &limit]).await?
            }
            Some(after) => {
                let st = client.prepare_cached(&PAGE_AFTER).await?;
                client.query(&st, &[worker, &limit, after]).await?
            }
        };
        // No row: no such worker (revision 0, nothing). A row without a circuit: the
        // worker has none after `after`.
        let revision = match rows.first() {
            Some(r) => r.try_get::<_, i64>(0)?.max(0) as u64,
            None => 0,
        };
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            if r.try_get::<_, Option<uuid::Uuid>>(1)?.is_some() {
                out.push(circuit_of_at(r, 1)?);
            }
        }
        Ok((revision, out))
    }

    pub(super) async fn idle_due(&self, limit: usize) -> Result<Vec<Circuit>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {CIRCUIT_COLUMNS} FROM circuits
                     WHERE idle_check_at IS NOT NULL AND idle_check_at <= now()
                     ORDER BY idle_check_at LIMIT $1"
                ),
                &[&(limit as i64)],
            )
            .await?;
        rows.iter().map(|r| circuit_of(r).map(|(c, _)| c)).collect()
    }

    pub(super) async fn defer_idle_checks(
        &self,
        checks: &[(uuid::Uuid, f64)],
    ) -> Result<(), StoreError> {
        let ids: Vec<uuid::Uuid> = checks.iter().map(|(id, _)| *id).collect();
        let at: Vec<f64> = checks.iter().map(|(_, t)| *t).collect();
        self.client()
            .await?
            .execute(
                "UPDATE circuits SET idle_check_at = to_timestamp(c.at)
                 FROM unnest($1::uuid[], $2::float8[]) AS c(id, at) WHERE circuits.id = c.id",
                &[&ids, &at],
            )
            .await?;
        Ok(())
    }

    pub(super) async fn prune_changes(&self, older_than_secs: u64) -> Result<usize, StoreError> {
        let n = self
            .client()
            .await?
            .execute(
                "DELETE FROM circuit_changes WHERE at < now() - make_interval(secs => $1)",
                &[&(older_than_secs as f64)],
            )
            .await?;
        Ok(n as usize)
    }

    pub(super) async fn prune_tokens(&self, older_than_secs: u64) -> Result<usize, StoreError> {
        let n = self
            .client()
            .await?
            .execute(
                "DELETE FROM tokens WHERE created_at < now() - make_interval(secs => $1)",
                &[&(older_than_secs as f64)],
            )
            .await?;
        Ok(n as usize)
    }

    pub(super) async fn insert_token(
        &self,
        id: &uuid::Uuid,
        body: &Value,
    ) -> Result<(), StoreError> {
        let s = &body["session"];
        let uuid_of = |v: &Value, name: &str| {
            v.as_str()
                .and_then(|s| uuid::Uuid::parse_str(s).ok())
                .ok_or_else(|| StoreError::Data(format!("token field {name} is not a UUID")))
        };
        let group = if s["group_id"].is_null() {
            &s["project_id"]
        } else {
            &s["group_id"]
        };
        self.client()
            .await?
            .execute(
                "INSERT INTO tokens (id, login_session_token, kernel_host, kernel_port, session_id,
                    user_uuid, group_id, access_key, domain_name, upstream_tls)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                &[
                    id,
                    &body["login_session_token"].as_str(),
                    &body["kernel_host"].as_str().unwrap_or_default(),
                    &as_i32(&body["kernel_port"]).unwrap_or(0),
                    &uuid_of(&s["id"], "session.id")?,
                    &uuid_of(&s["user_uuid"], "session.user_uuid")?,
                    &uuid_of(group, "session.group_id")?,
                    &s["access_key"].as_str().unwrap_or_default(),
                    &s["domain_name"].as_str().unwrap_or_default(),
                    &body["upstream_tls"].as_str(),
                ],
            )
            .await
            .map_err(conflict_or)?;
        Ok(())
    }

    /// The token `id`, unless it was made more than `ttl_secs` ago (on the
    /// database's clock; 0: any age).
    pub(super) async fn token(
        &self,
        id: &uuid::Uuid,
        ttl_secs: u64,
    ) -> Result<Option<Value>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT login_session_token, kernel_host, kernel_port, session_id, user_uuid,
                    group_id, access_key, domain_name, upstream_tls FROM tokens WHERE id = $1
                    AND ($2::float8 = 0 OR created_at >= now() - make_interval(secs => $2))",
                &[id, &(ttl_secs as f64)],
            )
            .await?;
        let Some(r) = row else { return Ok(None) };
        let mut token = json!({
            "login_session_token": r.try_get::<_, Option<String>>(0)?,
            "kernel_host": r.try_get::<_, String>(1)?,
            "kernel_port": r.try_get::<_, i32>(2)?,
            "session": {
                "id": r.try_get::<_, uuid::Uuid>(3)?,
                "user_uuid": r.try_get::<_, uuid::Uuid>(4)?,
                "group_id": r.try_get::<_, uuid::Uuid>(5)?,
                "access_key": r.try_get::<_, String>(6)?,
                "domain_name": r.try_get::<_, String>(7)?,
            }
        });
        // As it came in: absent unless the manager said it.
        if let Some(tls) = r.try_get::<_, Option<String>>(8)? {
            token["upstream_tls"] = Value::String(tls);
        }
        Ok(Some(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn at(secs: u64, micros: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros)
    }

    #[test]
    fn the_server_clock_is_read_as_far_ahead_as_it_surely_is_and_no_further() {
        let sent = at(1_000, 0);
        let back = at(1_000, 200_000);
        // The server read 1030.1 s somewhere between our 1000.0 and 1000.2: it is
        // 29.9 to 30.1 s ahead; the reading keeps the least of these.
        assert_eq!(
            server_ahead(sent, at(1_030, 100_000), back),
            Some(29_900_000)
        );
        // Behind: read 970.1 s, so 29.9 to 30.1 s behind; the reading keeps the most.
        assert_eq!(
            server_ahead(sent, at(970, 100_000), back),
            Some(-30_100_000)
        );
        // Either way, a deadline moved by the reading is never later on the server
        // than the instant of ours it stands for.
        for theirs in [at(1_030, 100_000), at(970, 100_000), at(1_000, 100_000)] {
            let ahead = server_ahead(sent, theirs, back).expect("a quick reading");
            for true_offset_at in [sent, back, at(1_000, 100_000)] {
                let true_ahead = unix_micros(theirs) - unix_micros(true_offset_at);
                assert!(ahead <= true_ahead, "{ahead} > {true_ahead}");
            }
        }
    }

    #[test]
    fn a_slow_or_backwards_reading_tells_nothing() {
        let sent = at(1_000, 0);
        assert_eq!(server_ahead(sent, at(1_000, 0), at(1_001, 0)), None);
        assert_eq!(
            server_ahead(sent, at(1_000, 0), sent + CLOCK_SAMPLE_MAX),
            Some(-500_000)
        );
        // Our clock stepped back between sending and the answer.
        assert_eq!(server_ahead(sent, at(1_000, 0), at(999, 0)), None);
    }

    #[test]
    fn deadlines_move_either_way_and_saturate() {
        let t = at(1_000, 0);
        assert_eq!(shifted(t, 1_500_000), at(1_001, 500_000));
        assert_eq!(shifted(t, -1_500_000), at(998, 500_000));
        assert_eq!(shifted(t, 0), t);
        assert_eq!(shifted(t, i64::MIN), UNIX_EPOCH);
        assert_eq!(unix_micros(UNIX_EPOCH - Duration::from_secs(1)), -1_000_000);
        assert_eq!(unix_micros(t), 1_000_000_000);
    }
}
