//! `appproxy-coordinator`: the manager-facing `/v2/conf` and `/v2/proxy/auth`, the worker
//! registry, circuits and slots, health and metrics; circuit events to workers (Redis
//! or, in single-node mode, an in-process bus) with acknowledgement; leader jobs.
//!
//! Request IDs follow the coordinator column of `docs/request-ids.md`: the manager's ID (or an alias) is
//! used and echoed when present, **never generated**; it is stored as the circuit's
//! `origin_request_id` (NULL when absent) or, for a removal, with its change-log
//! entry, put in the metadata of every event the request causes and is on every log
//! line of the request. Background jobs run each pass under an ID of their own.

#![forbid(unsafe_code)]

pub mod access;
pub mod anycast;
mod api;
pub mod breaker;
pub mod config;
mod endpoints;
pub mod events;
pub mod failed_ports;
pub mod health;
mod jobs;
pub mod placement;
mod proxy;
pub mod store;

/// The Redis command connection (shared with the storage-proxy's events).
pub use appproxy_shared::redis_link;

pub use appproxy_shared::wire::MAX_CIRCUITS_PER_ANSWER;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use appproxy_shared::header::IdPolicy;
use appproxy_shared::middleware::RequestIdLayer;
use appproxy_shared::model::CircuitsEvent;
use appproxy_shared::wire::{CircuitSet, WorkerRegistration};
use appproxy_shared::IdVersion;
use axum::extract::{FromRequest, FromRequestParts, Request, State as Extract};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;

use access::{AccessMark, Marks};
use appproxy_control_common::metrics::{self, Histogram, Labeled};
use appproxy_control_common::server;
use breaker::Breakers;
use config::{CoordinatorConfig, CoordinatorSecrets};
use events::{AckHub, CircuitEvent, EventKind, LocalBus};
use store::{CircuitRow, Store, StoreError};

/// The coordinator's request-ID rule: an ID is taken when valid, never generated (an
/// absent one is recorded as absent); its request-ID layer and its server's own
/// answers follow it.
const REQUEST_IDS: (IdPolicy, IdVersion) = (IdPolicy::ExtractOnly, IdVersion::V4);

/// How the coordinator's JSON errors are shaped; its server's own answers to heads
/// it cannot take are shaped the same.
const PROBLEM: server::Problem = server::Problem {
    type_base: "https://api.backend.ai/probs/",
    error_code_prefix: Some("appproxy_coordinator_"),
};

/// The coordinator's JSON error for `code`: `title` (also `msg`), the detail
/// `error`, and the request's ID.
fn problem_body(code: &str, title: &str, error: &str) -> serde_json::Value {
    json!({
        "type": format!("{}{code}", PROBLEM.type_base),
        "title": title,
        "error_code": format!(
            "{}{}",
            PROBLEM.error_code_prefix.unwrap_or_default(),
            code.replace('-', "_")
        ),
        "msg": title,
        "error": error,
        "code": code,
        "request_id": appproxy_shared::current_request_id().map(|r| r.to_string()),
    })
}

/// Every Redis call the coordinator makes is bounded (`bounded`): an outage costs a
/// call at most [`REDIS_CALL_TIMEOUT`] (then the caller's fallback applies), never a
/// hang.
pub use appproxy_shared::redis_call::{bounded, REDIS_CALL_TIMEOUT};

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    /// Circuits created.
    pub circuits_created: AtomicU64,
    /// Circuits removed (API, bulk, endpoint, idle collection, failed acknowledgement).
    pub circuits_removed: AtomicU64,
    /// Creations answered 503 because the worker did not acknowledge.
    pub ack_timeouts: AtomicU64,
    /// Events published to Redis.
    pub events_published: AtomicU64,
    /// Events Redis refused.
    pub events_failed: AtomicU64,
    /// Workers marked `LOST` by the heartbeat check.
    pub workers_lost: AtomicU64,
    /// Circuits removed for idleness.
    pub circuits_collected: AtomicU64,
    /// Idle-collection passes skipped because Redis refused writes (workers'
    /// last-access marks were not being stored: every circuit would look idle).
    pub idle_passes_skipped: AtomicU64,
    /// Workers' breakers opened by a missed acknowledgement.
    pub breaker_trips: AtomicU64,
    /// Creations placed again on another worker or port within the same call.
    pub placement_retries: AtomicU64,
    /// Circuits a worker reported it could not deploy (frontend not listening).
    pub deploy_failures: AtomicU64,
    /// Tries at withdrawing a failed or abandoned creation's circuit that the
    /// store failed (each is tried again, with a back-off, until it is made).
    pub withdrawal_retries: AtomicU64,
    /// Circuits withdrawn by the sweep because their creation was still marked
    /// under way past its bound (a creation that failed, its coordinator stopped
    /// before withdrawing it).
    pub overdue_creations_withdrawn: AtomicU64,
    /// Histograms and labeled counters.
    pub observed: Observed,
}

/// Bounded-cardinality histograms and labeled counters for `/metrics`.
pub struct Observed {
    /// API request durations by method and route template (never the raw path).
    pub api_requests: Labeled<Histogram>,
    /// Circuit creations by outcome.
    pub creations: Labeled<AtomicU64>,
    /// Publication-to-acknowledgement latency, by worker authority.
    pub ack_latency: Labeled<Histogram>,
    /// Acknowledgements not received in time, by worker authority.
    pub ack_timeouts: Labeled<AtomicU64>,
    /// 1 while this node leads the jobs, else 0.
    pub leader: AtomicU64,
}

/// At most this many workers are labeled apart (the rest under `other`).
pub const MAX_WORKER_LABELS: usize = 256;

impl Default for Observed {
    fn default() -> Self {
        Self {
            api_requests: Labeled::new("", 128, Histogram::default),
            creations: Labeled::new("outcome", 16, AtomicU64::default),
            ack_latency: Labeled::new("worker", MAX_WORKER_LABELS, Histogram::default),
            ack_timeouts: Labeled::new("worker", MAX_WORKER_LABELS, AtomicU64::default),
            leader: AtomicU64::new(0),
        }
    }
}

/// Shared state of the API, the jobs and an embedded worker.
pub struct State {
    /// The store.
    pub store: Store,
    /// This coordinator's own running, for the worker-lost check
    /// ([`jobs::Running`]).
    running: jobs::Running,
    /// Since when the store has failed the leadership's check without a success
    /// since (`jobs::lead`), and whether the step-down that half a lease of it
    /// brings was logged: a leader steps down once it has for half a lease.
    store_failing: std::sync::Mutex<Option<(std::time::Instant, bool)>>,
    /// Since when this node leads without a break (`jobs::lead`): the worker-lost
    /// check waits a heartbeat timeout from then.
    leading_since: std::sync::Mutex<Option<std::time::Instant>>,
    /// This coordinator's hold on its SQLite file (none on PostgreSQL): one
    /// coordinator per file ([`store::sqlite::OneProcess`]).
    _sqlite_owner: Option<store::sqlite::OneProcess>,
    /// The `[coordinator]` and `[secrets]` settings.
    pub config: CoordinatorConfig,
    /// Redis for events, leadership and last-access reads (`[redis] url`), if any.
    pub redis: Option<redis_link::RedisConn>,
    /// Where event streams are written (`XADD`): `[redis] stream_db` of the same
    /// server, else the same connection as `redis`.
    pub streams: Option<redis_link::RedisConn>,
    /// The in-process event bus (single-node mode).
    pub local: LocalBus,
    /// Waiters for workers' acknowledgements.
    pub acks: Arc<AckHub>,
    /// Per-worker circuit breakers of placement.
    pub breakers: Arc<Breakers>,
    /// Ports workers could not listen on lately, offered last by placement.
    pub failed_ports: failed_ports::FailedPorts,
    /// The API server's connection counters.
    pub server: Arc<server::ServerMetrics>,
    /// Last-access marks: Redis, or memory fed by an embedded worker.
    pub marks: Marks,
    /// When the marks last came back after Redis refused to store them.
    pub(crate) marks_gap: access::MarksGap,
    /// `/metrics` counters.
    pub metrics: Metrics,
    /// This process's node ID, for leadership.
    pub node_id: uuid::Uuid,
    /// Set once the coordinator stops: it no longer takes or renews the leadership
    /// lease (a pass still running, such as a health decision spawned before the
    /// stop, cannot take back the lease it gave up).
    pub(crate) stopping: std::sync::atomic::AtomicBool,
    /// Circuits stored by a creation still under way (announced, waiting for the
    /// acknowledgement, or being withdrawn): not yet an answer to give anyone else.
    creating: std::sync::Mutex<std::collections::HashSet<uuid::Uuid>>,
    /// One lock per reuse key (session, app, openness, allowlist, upstream TLS) of
    /// `/v2/proxy/auth`: concurrent calls for the same key wait for the first one's
    /// creation and then reuse its circuit instead of creating one each.
    reuse_locks: KeyedLocks,
}

/// How long a creation's mark lasts past its insert or last renewal when
/// `unsettled_creation_timeout_secs` is unset.
const DEFAULT_CREATION_BOUND: Duration = Duration::from_secs(20);

/// What a request that found a stored circuit learns of its creation
/// ([`State::creation_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// Settled: the circuit may be the answer.
    Settled,
    /// A creation that was under way (awaited), or the circuit is gone: look it up
    /// again.
    LookAgain,
    /// Still marked under way past its bound: never the answer; to withdraw.
    Overdue,
}

/// Async locks by key, each entry gone once nobody holds or awaits it.
#[derive(Default)]
pub(crate) struct KeyedLocks {
    locks: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A held [`KeyedLocks`] lock; released (and its entry dropped when nobody else
/// wants it) when dropped.
pub(crate) struct KeyedGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    fn map(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>
    {
        self.locks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the lock of `key`, waiting at most `wait` for whoever holds it; `None`
    /// when that did not end in time.
    pub(crate) async fn lock(&self, key: String, wait: Duration) -> Option<KeyedGuard<'_>> {
        // The guard exists before the wait (and outlives it), so a wait given up
        // (timed out or cancelled) also drops the entry when nobody else wants it.
        let mut held = KeyedGuard {
            locks: self,
            key: key.clone(),
            guard: None,
        };
        let waiting = self.map().entry(key).or_default().clone().lock_owned();
        held.guard = Some(tokio::time::timeout(wait, waiting).await.ok()?);
        Some(held)
    }

    /// How many keys have an entry (held or awaited).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map().len()
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        self.guard = None;
        let mut map = self.locks.map();
        // Only the map's own reference left: nobody holds or awaits it.
        if map
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            map.remove(&self.key);
        }
    }
}

tokio::task_local! {
    /// Whether a publish of the call running ([`one_publishing_call`]) failed on
    /// Redis.
    static CALL_PUBLISH_FAILED: std::cell::Cell<bool>;
}

/// Runs `call`, one API call that may publish an event per item (a bulk removal, a
/// bulk route change), so that once one of its publishes fails on Redis the rest
/// of the call does not try Redis again: each is counted as failed at once, and the
/// workers' periodic fetch repairs them, as it repairs any lost event. With Redis
/// out of reach a publish costs two calls' deadlines (its retry on a fresh
/// connection): a 5-item bulk removal took 18 s, and a 4-item route change held
/// the cluster's route turn 14.5 s, so that another coordinator's route change was
/// refused 503 (its store call's deadline passed waiting for the turn). Now such a
/// call pays one failed publish, whatever its size.
pub(crate) async fn one_publishing_call<F: std::future::Future>(call: F) -> F::Output {
    CALL_PUBLISH_FAILED
        .scope(std::cell::Cell::new(false), call)
        .await
}

impl State {
    /// Sends `event` to workers: on the in-process bus and on Redis. Returns whether
    /// anyone can acknowledge it (an embedded worker listens, or Redis took it).
    async fn publish(&self, event: CircuitEvent) -> bool {
        let local = self.local.send(event.clone()).is_ok();
        let remote = match &self.redis {
            Some(conn) => {
                let given_up = CALL_PUBLISH_FAILED.try_with(|f| f.get()).unwrap_or(false);
                let sent = if given_up {
                    tracing::warn!(
                        event = event.kind.name(),
                        "event not published: an earlier publish of this call failed on Redis (the worker's poll will pick the change up)"
                    );
                    Err(events::Unpublished::Redis)
                } else {
                    events::publish_redis(conn, &event).await
                };
                // Only Redis' own failure gives up on it for the rest of the call.
                if sent == Err(events::Unpublished::Redis) {
                    let _ = CALL_PUBLISH_FAILED.try_with(|f| f.set(true));
                }
                let ok = sent.is_ok();
                let counter = if ok {
                    &self.metrics.events_published
                } else {
                    &self.metrics.events_failed
                };
                counter.fetch_add(1, Ordering::Relaxed);
                ok
            }
            None => false,
        };
        local || remote
    }

    fn creating(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<uuid::Uuid>> {
        self.creating.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `circuit` belongs to a creation still under way.
    fn is_creating(&self, circuit: uuid::Uuid) -> bool {
        self.creating().contains(&circuit)
    }

    /// Waits (bounded by the longest a creation can take) until the creation that
    /// stored `circuit` has its outcome: acknowledged, or withdrawn. A request that
    /// finds that circuit meanwhile (an endpoint's sync, a session's reuse) must
    /// not answer with it before: it may be withdrawn the next moment.
    async fn settled(&self, circuit: uuid::Uuid) {
        let deadline = tokio::time::Instant::now() + self.longest_creation();
        while self.is_creating(circuit) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// The longest a creation can take: every placement waiting out its
    /// acknowledgement, and some for the store.
    fn longest_creation(&self) -> Duration {
        self.ack_timeout() * proxy::PLACEMENT_ATTEMPTS as u32 + Duration::from_secs(5)
    }

    /// How long a circuit stays marked as a creation under way in the store past
    /// its insert or its last renewal (`[coordinator]
    /// unsettled_creation_timeout_secs`; unset: [`DEFAULT_CREATION_BOUND`]). The
    /// node making it renews the mark every [`State::creation_renewal`] for as long
    /// as the creation runs ([`jobs::renew_creations`]), so the mark only passes
    /// once that node stopped renewing it (stopped, or cut off from the store for
    /// about this long).
    fn creation_bound(&self) -> Duration {
        match self.config.coordinator.unsettled_creation_timeout_secs {
            Some(secs) if secs.is_finite() => Duration::from_secs_f64(secs.clamp(0.1, 86_400.0)),
            _ => DEFAULT_CREATION_BOUND,
        }
    }

    /// How often a node renews the marks of its creations under way: a fifth of
    /// their bound, between 0.1 s and 5 s (4 s by default).
    fn creation_renewal(&self) -> Duration {
        (self.creation_bound() / 5).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// The longest a request waits, in all, for another coordinator's creation
    /// under way that it found (a session's reuse, an endpoint's sync): as long as
    /// a live creation can take, or until the mark of one whose node stopped has
    /// passed — whichever is longer.
    fn foreign_creation_wait(&self) -> Duration {
        self.longest_creation()
            .max(self.creation_bound() + self.creation_renewal() + Duration::from_secs(1))
    }

    /// The longest a `/v2/proxy/auth` call waits for its turn on its reuse key:
    /// the holder's wait for a creation under way ([`State::foreign_creation_wait`])
    /// and then its own creation. A call that stopped waiting sooner would go on
    /// alone and create a circuit of its own beside the holder's.
    fn reuse_turn_wait(&self) -> Duration {
        self.foreign_creation_wait() + self.longest_creation()
    }

    /// Whether a stored circuit that a request found (a session's reuse, an
    /// endpoint's sync) can be its answer, as far as its creation goes. A creation
    /// still under way is no answer yet: this node's own is awaited in memory
    /// ([`State::settled`]), another coordinator's through its mark in the store
    /// (looked at every 100 ms, until `deadline` at most), and the caller looks
    /// again ([`Found::LookAgain`]; the circuit may have been withdrawn meanwhile).
    /// A circuit still marked past its bound is [`Found::Overdue`]: its node
    /// stopped renewing it.
    async fn creation_of(
        &self,
        circuit: uuid::Uuid,
        deadline: tokio::time::Instant,
    ) -> Result<Found, ApiError> {
        if self.is_creating(circuit) {
            self.settled(circuit).await;
            return Ok(Found::LookAgain);
        }
        loop {
            match self.store.creation_mark(circuit).await? {
                None => return Ok(Found::LookAgain),
                Some(store::CreationMark::Settled) => return Ok(Found::Settled),
                Some(store::CreationMark::Overdue) => return Ok(Found::Overdue),
                Some(store::CreationMark::UnderWay) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Ok(Found::LookAgain);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Whether creations wait for an acknowledgement.
    fn acks_expected(&self) -> bool {
        self.config.coordinator.worker_ack_timeout_secs > 0.0
            && (self.redis.is_some() || self.local.receiver_count() > 0)
    }

    fn ack_timeout(&self) -> Duration {
        Duration::from_secs_f64(
            self.config
                .coordinator
                .worker_ack_timeout_secs
                .clamp(0.0, 3600.0),
        )
    }

    /// Removes a circuit and tells its worker, under the current request ID. The
    /// removal is logged with that ID and the request's trace context, as it goes
    /// with the event: a worker that finds it by a fetch deploys it under the same
    /// ID and a child of the same span. Every removal (API, bulk and endpoint
    /// deletes, idle collection, a withdrawn creation) comes through here.
    async fn remove_circuit(&self, id: uuid::Uuid) -> Result<bool, ApiError> {
        self.remove_circuit_when(id, None, false).await
    }

    /// [`State::remove_circuit`], the removal itself made before `deadline` or not at
    /// all ([`store::Store::delete_circuit_by`]).
    async fn remove_circuit_by(
        &self,
        id: uuid::Uuid,
        deadline: Option<std::time::SystemTime>,
    ) -> Result<bool, ApiError> {
        self.remove_circuit_when(id, deadline, false).await
    }

    /// The ID of the request that created circuit `id`, when it is stored and valid.
    async fn origin_of(&self, id: uuid::Uuid) -> Option<appproxy_shared::RequestId> {
        match self.store.circuit(id).await {
            Ok(Some((_, origin))) => origin
                .request_id
                .and_then(|r| appproxy_shared::RequestId::parse(r.as_bytes()).ok()),
            _ => None,
        }
    }

    /// [`State::remove_overdue_creation`] under the ID of the request that created
    /// the circuit (else the current one): its event, the worker's removal and the
    /// change log name that request, so the manager whose call was cut off finds
    /// where its circuit went by its own ID — whoever withdraws it (the leader's
    /// sweep, a later call for the same key). Before, the withdrawal carried only
    /// the withdrawing pass's or call's ID (outside testers' finds). `logged` runs
    /// under that ID once the circuit was withdrawn. Returns the outcome and the
    /// creating request's ID.
    async fn remove_overdue_creation_as_origin(
        &self,
        id: uuid::Uuid,
        logged: impl FnOnce(),
    ) -> (Result<bool, ApiError>, Option<appproxy_shared::RequestId>) {
        let origin = self.origin_of(id).await;
        let withdrawn =
            appproxy_shared::scope(origin.or(appproxy_shared::current_request_id()), async {
                let withdrawn = self.remove_overdue_creation(id).await;
                if matches!(withdrawn, Ok(true)) {
                    logged();
                }
                withdrawn
            })
            .await;
        (withdrawn, origin)
    }

    /// [`State::remove_circuit`] of a circuit whose creation is overdue
    /// ([`store::CreationMark::Overdue`]), made only while it still is (decided by
    /// the store in the removal itself): a creation settled meanwhile keeps it.
    /// Called through [`State::remove_overdue_creation_as_origin`].
    async fn remove_overdue_creation(&self, id: uuid::Uuid) -> Result<bool, ApiError> {
        self.remove_circuit_when(id, None, true).await
    }

    async fn remove_circuit_when(
        &self,
        id: uuid::Uuid,
        deadline: Option<std::time::SystemTime>,
        only_overdue: bool,
    ) -> Result<bool, ApiError> {
        let found = self.store.circuit(id).await?;
        // Read before the removal: once it is made, no store call may fail the call.
        // A lookup failing after it (a store at its deadline) answered 503 for a
        // removal that was made, and no event went out: the worker served the
        // circuit, and held its port, until its next poll.
        let authority = match &found {
            Some((circuit, _)) => self.authority_of(circuit.worker).await?,
            None => String::new(),
        };
        let request_id = appproxy_shared::current_request_id();
        let trace = appproxy_shared::middleware::current_trace_context();
        let by = request_id.as_ref().map(|r| r.as_str());
        let deleted = match deadline {
            _ if only_overdue => {
                self.store
                    .delete_overdue_creation(id, by, trace.as_ref())
                    .await?
            }
            Some(deadline) => {
                self.store
                    .delete_circuit_by(id, by, trace.as_ref(), deadline)
                    .await?
            }
            None => self.store.delete_circuit(id, by, trace.as_ref()).await?,
        };
        if !deleted {
            return Ok(false);
        }
        self.marks.forget(id);
        // A creation of this circuit still waiting for its acknowledgement ends now:
        // the worker drops what is no longer deployed and answers nothing.
        self.acks.removed([id]);
        self.metrics
            .circuits_removed
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(circuit = %id, "circuit deleted");
        if let Some((circuit, _)) = found {
            self.publish(CircuitEvent {
                kind: EventKind::Removed,
                authority,
                circuits: vec![circuit],
                request_id,
                span: appproxy_shared::current_span(),
            })
            .await;
        }
        Ok(true)
    }

    async fn authority_of(&self, worker: Option<uuid::Uuid>) -> Result<String, ApiError> {
        let Some(worker) = worker else {
            return Ok(String::new());
        };
        Ok(self
            .store
            .worker(worker)
            .await?
            .map(|w| w.registration.authority)
            .unwrap_or_default())
    }

    // ---- the embedded worker's side (single-node mode) ----

    /// Registers (or re-registers) an embedded worker, withdrawing the circuits the
    /// registration no longer serves, as `PUT /api/worker` does; returns its ID.
    pub async fn register_local_worker(
        &self,
        registration: &WorkerRegistration,
    ) -> Result<uuid::Uuid, StoreError> {
        let body = serde_json::to_value(registration)
            .map_err(|e| StoreError::Data(format!("registration: {e}")))?;
        let id = self.store.upsert_worker(&body).await?;
        api::withdraw_unserved(self, id, registration)
            .await
            .map_err(|e| match e {
                ApiError::Store(e) => e,
                other => StoreError::Data(format!("withdrawing unserved circuits: {other}")),
            })?;
        Ok(id)
    }

    /// An embedded worker's heartbeat.
    pub async fn local_heartbeat(&self, id: uuid::Uuid) -> Result<bool, StoreError> {
        self.store.heartbeat(id).await
    }

    /// An embedded worker leaves (at no node left it is `LOST`).
    pub async fn deregister_local_worker(&self, id: uuid::Uuid) -> Result<bool, StoreError> {
        self.store.deregister_worker(id).await
    }

    /// An embedded worker's circuit set.
    pub async fn local_circuits(&self, id: uuid::Uuid) -> Result<Vec<CircuitRow>, StoreError> {
        self.store.circuits(Some(id)).await
    }

    /// What changed in an embedded worker's set after revision `since`, as
    /// `GET /api/worker/{id}/circuits?since=…` answers it.
    pub async fn local_changes(
        &self,
        id: uuid::Uuid,
        since: u64,
    ) -> Result<CircuitSet, StoreError> {
        api::worker_changes(self, id, since, MAX_CIRCUITS_PER_ANSWER).await
    }

    /// One page of an embedded worker's set, as
    /// `GET /api/worker/{id}/circuits?after=…` answers it.
    pub async fn local_circuits_page(
        &self,
        id: uuid::Uuid,
        after: Option<uuid::Uuid>,
    ) -> Result<CircuitSet, StoreError> {
        api::worker_page(self, id, after, MAX_CIRCUITS_PER_ANSWER).await
    }

    /// The in-process events, for an embedded worker.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<CircuitEvent> {
        self.local.subscribe()
    }

    /// An embedded worker acknowledges deployed circuits.
    pub fn acknowledge(&self, circuits: impl IntoIterator<Item = uuid::Uuid>) {
        self.acks.resolve(circuits);
    }

    /// An embedded worker's acknowledgement with per-circuit outcomes, in the shape
    /// a remote worker publishes it.
    pub fn settle(&self, ack: CircuitsEvent) {
        events::settle(ack.into(), &self.acks, &self.breakers);
    }

    /// An embedded worker's last-access marks; whether they were stored.
    pub async fn record_access(&self, marks: &[AccessMark]) -> bool {
        self.marks.record(marks).await
    }
}

/// Refuses a text longer than its column (the original schema's sizes), so an
/// over-long value is a 400, never a database error.
pub(crate) fn fits(name: &str, value: Option<&str>, max: usize) -> Result<(), ApiError> {
    match value {
        Some(v) if v.chars().count() > max => Err(ApiError::BadRequest(format!(
            "{name} is longer than {max} characters"
        ))),
        _ => Ok(()),
    }
}

/// An API refusal; the variant decides the status and error code, in one place.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No or a wrong secret.
    #[error("Unauthorized access")]
    Unauthorized,
    /// A bad request: the caller's fault.
    #[error("{0}")]
    BadRequest(String),
    /// Nothing there.
    #[error("{0}")]
    NotFound(&'static str),
    /// The caller may not read this (metrics from a host not allowed).
    #[error("Forbidden")]
    Forbidden,
    /// `Authorization` with a scheme other than `Bearer` (the scheme, as
    /// [`shown_scheme`] shows it).
    #[error("Unsupported authorization method {0}")]
    UnsupportedAuthorization(String),
    /// `Authorization: Bearer` with a token that is not an HS256 JWT signed with
    /// the API secret, or one expired or not yet valid.
    #[error("Invalid API token: {0}")]
    BadApiToken(appproxy_shared::jwt::JwtError),
    /// The token's session is not this session.
    #[error("E20007: Session ID mismatch")]
    SessionMismatch,
    /// No worker can take the circuit.
    #[error("E10002: No proxy worker can serve this circuit")]
    NoWorker,
    /// The worker did not acknowledge the deployment in time, or the event never
    /// left (Redis refused it); `cause` says which.
    #[error("E10001: Proxy worker not responding")]
    WorkerNotResponding {
        /// The worker's authority.
        authority: String,
        /// `worker` (no acknowledgement in time), `redis` (the event could not be
        /// published) or `deploy` (the worker could not listen on the frontend).
        cause: &'static str,
    },
    /// The store did not answer in time or is unreachable: 503, retry later.
    #[error("E10003: Circuit store unavailable")]
    StoreUnavailable,
    /// The circuit being created was removed (a delete, its endpoint's removal)
    /// before its worker acknowledged it: 409, nobody's failure — a creation
    /// asked again makes a new one.
    #[error("The circuit was removed while being created")]
    CircuitRemoved,
    /// The coordinator is stopping (its drain): the creation was withdrawn; 503,
    /// retry (another coordinator, or this one once it is back).
    #[error("E10006: The coordinator is stopping; retry")]
    Stopping,
    /// The circuit found for the request is still being created (by another
    /// request, on this coordinator or another) past the longest this request
    /// waits for it: 503, retry later. Never answered with: it may yet be
    /// withdrawn.
    #[error("E10005: The circuit is still being created; retry later")]
    CreationUnderWay,
    /// A heartbeat of an HA node that deregistered: 409, the worker's to fix by
    /// registering again.
    #[error("{0}")]
    NodeLeft(String),
    /// The session already holds `[limits] max_circuits_per_session` live circuits
    /// (the value given): 429, nothing created. The caller's own quota, not the
    /// service's state: retrying helps only once one of its circuits is gone.
    #[error("E10004: Too many circuits for this session")]
    SessionCircuitLimit(u32),
    /// A body over the size limit.
    #[error("Request body too large")]
    TooLarge,
    /// The body did not arrive whole in time (`body_read_timeout_secs`).
    #[error("Request body not received in time")]
    BodyTimeout,
    /// The store failed: our fault.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Self::Unauthorized
            | Self::UnsupportedAuthorization(_)
            | Self::BadApiToken(_)
            | Self::SessionMismatch => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid-api-params"),
            Self::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "object-not-found"),
            Self::NoWorker => (StatusCode::SERVICE_UNAVAILABLE, "no-available-worker"),
            Self::WorkerNotResponding { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "worker-not-responding")
            }
            Self::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "request-too-large"),
            Self::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, "request-timeout"),
            Self::StoreUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "store-unavailable"),
            Self::CircuitRemoved => (StatusCode::CONFLICT, "circuit-removed"),
            Self::CreationUnderWay => (StatusCode::SERVICE_UNAVAILABLE, "creation-under-way"),
            Self::Stopping => (StatusCode::SERVICE_UNAVAILABLE, "coordinator-stopping"),
            Self::NodeLeft(_) => (StatusCode::CONFLICT, "node-left"),
            Self::SessionCircuitLimit(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "session-circuit-limit")
            }
            Self::Store(e) if e.is_unavailable() => {
                (StatusCode::SERVICE_UNAVAILABLE, "store-unavailable")
            }
            Self::Store(StoreError::Conflict(_)) => (StatusCode::CONFLICT, "conflict"),
            Self::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal-error"),
        };
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        } else {
            tracing::info!(error = %self, "request refused");
        }
        // A store failure's text (pool, driver) stays in the log, not in the answer.
        let text = match &self {
            Self::Store(e) if e.is_unavailable() => Self::StoreUnavailable.to_string(),
            Self::Store(_) => "Internal server error".to_owned(),
            other => other.to_string(),
        };
        // The product's `error` says which side failed when the wire's `msg` cannot.
        let detail = match &self {
            Self::WorkerNotResponding { cause, .. } => format!(
                "{text}: {}",
                match *cause {
                    "redis" => "the event could not be published (Redis unavailable)",
                    "deploy" => "the worker could not listen on the circuit's frontend",
                    _ => "the worker did not acknowledge in time",
                }
            ),
            Self::SessionCircuitLimit(limit) => format!(
                "{text}: the session holds {limit} circuits ([limits] max_circuits_per_session); \
                 an app already open is still reused, a new one needs one of its circuits closed"
            ),
            _ => text.clone(),
        };
        let mut body = problem_body(code, &text, &detail);
        if let Self::WorkerNotResponding { authority, cause } = &self {
            body["data"] = json!({"worker": authority, "cause": cause});
        }
        if let Self::SessionCircuitLimit(limit) = &self {
            body["data"] = json!({"limit": limit});
        }
        (status, Json(body)).into_response()
    }
}

/// A JSON body; anything unreadable is a 400 in the API's error shape.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let unproven = unproven(req.extensions());
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::TooLarge
                } else {
                    ApiError::BadRequest(format!("unreadable body: {e}"))
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| refusal(unproven, format!("invalid JSON body: {e}")))
    }
}

/// Whether the request comes with a worker's own credential not yet checked
/// against a worker ([`Caller::Worker`]): it is checked once the route knows the
/// worker (from its path or its body).
fn unproven(extensions: &axum::http::Extensions) -> bool {
    matches!(extensions.get::<Caller>(), Some(Caller::Worker(_)))
}

/// The refusal of a request whose query, path or body does not read: a 400 saying
/// why, or, for a credential not yet checked, the 401 the credential would get (a
/// request that names no worker cannot be the worker's, and a caller without a
/// credential learns nothing of what the route checks).
fn refusal(unproven: bool, why: String) -> ApiError {
    if unproven {
        tracing::debug!(
            reason = why,
            "unreadable request with an unchecked worker credential"
        );
        ApiError::Unauthorized
    } else {
        ApiError::BadRequest(why)
    }
}

/// Query parameters; bad ones are a 400 in the API's error shape.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| Params(q.0))
            .map_err(|e| {
                refusal(
                    unproven(&parts.extensions),
                    format!("invalid query: {}", e.body_text()),
                )
            })
    }
}

/// Query parameters of a route that names its worker in the path (`/api/worker/{id}`
/// …), read before the caller is known to act for that worker: what does not read
/// is kept as the 400 it is, for the route to answer once the caller may act for
/// the worker. Refused at once, as [`Params`] refuses for a credential not yet
/// checked, a worker with its own credential and a slightly wrong query
/// (`brief=1`) was told 401 "Unauthorized access", and an operator rotated keys
/// instead of mending the call (an outside tester's find); a caller whose
/// credential is not the worker's still learns nothing (401 first).
pub struct WorkerParams<T>(pub Result<T, ApiError>);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for WorkerParams<T> {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(WorkerParams(
            axum::extract::Query::<T>::try_from_uri(&parts.uri)
                .map(|q| q.0)
                .map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text()))),
        ))
    }
}

/// A path parameter; a malformed one (not a UUID) is a 400 in the API's error shape.
pub struct Id<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Id<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let unproven = unproven(&parts.extensions);
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Id(p.0))
            .map_err(|e| refusal(unproven, format!("invalid path: {}", e.body_text())))
    }
}

/// The API's check (§1.1 of the wire), in the platform's order:
///
/// 1. `X-BackendAI-Token` present: the secret as it is, or after `Bearer ` or
///    `BackendAI `; anything else is refused, whatever `Authorization` says.
/// 2. Else `Authorization` with the scheme `Bearer` (any case, RFC 9110 §11.1):
///    an HS256 JWT signed with the API secret (no claim required; `exp` and `nbf`
///    enforced when present). Another scheme is refused and named.
/// 3. Neither: refused.
///
/// Either secret is taken while `api_secret_previous` is set (a rotation). A field
/// given twice is refused: which one a check read would be a guess. An empty
/// secret accepts nothing (a token signed with an empty key would pass).
fn authorize(headers: &HeaderMap, secrets: &CoordinatorSecrets) -> Result<(), ApiError> {
    let mut tokens = headers.get_all("x-backendai-token").iter();
    if let Some(v) = tokens.next() {
        let v = token_credential(v.as_bytes());
        return if tokens.next().is_none()
            && secrets
                .api_secrets()
                .any(|s| server::secret_matches(v, s.as_bytes()))
        {
            Ok(())
        } else {
            Err(ApiError::Unauthorized)
        };
    }
    let mut fields = headers.get_all(axum::http::header::AUTHORIZATION).iter();
    let (Some(field), None) = (fields.next(), fields.next()) else {
        return Err(ApiError::Unauthorized);
    };
    let field = field.as_bytes();
    let (scheme, credential) = match field.iter().position(|&b| b == b' ') {
        Some(at) => (&field[..at], field[at + 1..].trim_ascii()),
        None => (field, &[][..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        // Named only when a credential follows it: a value without one may be a
        // credential itself (a raw secret sent as `Authorization`), never echoed.
        let shown = if credential.is_empty() {
            "?".to_owned()
        } else {
            shown_scheme(scheme)
        };
        return Err(ApiError::UnsupportedAuthorization(shown));
    }
    // Checked against each secret in turn: the current one's refusal is the one
    // told when neither takes it.
    let mut refusal = ApiError::Unauthorized;
    for (i, secret) in secrets.api_secrets().enumerate() {
        if secret.is_empty() {
            continue;
        }
        match appproxy_shared::jwt::verify_hs256(credential, secret) {
            Ok(_) => return Ok(()),
            Err(e) if i == 0 => refusal = ApiError::BadApiToken(e),
            Err(_) => {}
        }
    }
    Err(refusal)
}

/// The credential of an `X-BackendAI-Token` value: the value, or what follows a
/// `Bearer ` or `BackendAI ` prefix.
fn token_credential(value: &[u8]) -> &[u8] {
    value
        .strip_prefix(b"Bearer ")
        .or_else(|| value.strip_prefix(b"BackendAI "))
        .unwrap_or(value)
}

/// An `Authorization` scheme as a refusal names it: only a scheme of IANA's HTTP
/// authentication scheme registry (or the platform's `BackendAI` and the common
/// `Token`), as registered; anything else is `?`. Any word the client sent could be
/// a secret sent in the scheme's place (a short API secret followed by anything was
/// echoed, in the answer and the log).
fn shown_scheme(scheme: &[u8]) -> String {
    const KNOWN: &[&str] = &[
        "Basic",
        "Bearer",
        "Concealed",
        "Digest",
        "DPoP",
        "GNAP",
        "HOBA",
        "Mutual",
        "Negotiate",
        "OAuth",
        "PrivateToken",
        "SCRAM-SHA-1",
        "SCRAM-SHA-256",
        "vapid",
        "BackendAI",
        "Token",
    ];
    KNOWN
        .iter()
        .find(|k| k.as_bytes().eq_ignore_ascii_case(scheme))
        .map_or_else(|| "?".to_owned(), |k| (*k).to_owned())
}

/// `POST /v2/conf`'s own check (§2.1 of the wire: `X-BackendAI-Token` equal to the
/// secret, no `Bearer` forms), made before its body is read, so that a caller
/// without the secret never makes the coordinator buffer one; skipped only under
/// `allow_unauthorized_configure_request` (development).
async fn conf_auth(Extract(state): Extract<Arc<State>>, req: Request, next: Next) -> Response {
    // One field only, as on the other routes.
    let mut fields = req.headers().get_all("x-backendai-token").iter();
    let presented = match (fields.next(), fields.next()) {
        (Some(v), None) => v.as_bytes(),
        _ => &[][..],
    };
    if state
        .config
        .coordinator
        .allow_unauthorized_configure_request
        || state
            .config
            .secrets
            .api_secrets()
            .any(|s| server::secret_matches(presented, s.as_bytes()))
    {
        next.run(req).await
    } else {
        server::closing(ApiError::Unauthorized.into_response())
    }
}

/// Who a request on the authenticated API comes from, as [`auth`] found it (an
/// extension of the request, read by the routes a worker may call).
#[derive(Debug, Clone)]
pub(crate) enum Caller {
    /// The API secret: every route, for every worker.
    Manager,
    /// A credential presented on a worker route while `[secrets] worker_key` is set
    /// and not the API secret: the route takes it only for the worker it was
    /// derived for ([`Caller::may_act_for`]), once it knows that worker.
    Worker(Arc<[u8]>),
}

impl Caller {
    /// Whether this caller may act for the worker `authority`: the manager for any,
    /// a worker only with the credential derived for it (compared in constant time).
    pub(crate) fn may_act_for(
        &self,
        secrets: &CoordinatorSecrets,
        authority: &str,
    ) -> Result<(), ApiError> {
        match self {
            Self::Manager => Ok(()),
            Self::Worker(presented) => match secrets.worker_key() {
                Some(key) => {
                    // Derived and compared for an unknown worker (no authority) too,
                    // so that the refusal takes as long either way.
                    let matches = server::secret_matches(
                        presented,
                        appproxy_shared::secret::derived(key, authority).as_bytes(),
                    );
                    if matches && !authority.is_empty() {
                        Ok(())
                    } else {
                        Err(ApiError::Unauthorized)
                    }
                }
                None => Err(ApiError::Unauthorized),
            },
        }
    }
}

/// Whether `method` on the route `path` (its template) is one a worker calls:
/// register, heartbeat, leave, read its circuit set.
fn is_worker_route(method: &axum::http::Method, path: &str) -> bool {
    use axum::http::Method;
    matches!(
        (method, path),
        (&Method::PUT, "/api/worker")
            | (&Method::PATCH | &Method::DELETE, "/api/worker/{id}")
            | (&Method::GET, "/api/worker/{id}/circuits")
    )
}

async fn auth(Extract(state): Extract<Arc<State>>, mut req: Request, next: Next) -> Response {
    let secrets = &state.config.secrets;
    let caller = match authorize(req.headers(), secrets) {
        Ok(()) => Caller::Manager,
        Err(refused) => {
            // Not the API secret: on a worker route, with a worker key, the one token
            // is kept for the route to check against the worker it names.
            let worker_route = req
                .extensions()
                .get::<axum::extract::MatchedPath>()
                .is_some_and(|p| is_worker_route(req.method(), p.as_str()));
            let mut tokens = req.headers().get_all("x-backendai-token").iter();
            match (tokens.next(), tokens.next()) {
                (Some(token), None) if worker_route && secrets.worker_key().is_some() => {
                    Caller::Worker(Arc::from(token_credential(token.as_bytes())))
                }
                _ => return refused.into_response(),
            }
        }
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Builds the API router.
pub fn router(state: Arc<State>) -> Router {
    let observed = state.clone();
    let within = Duration::from_secs(
        state
            .config
            .coordinator
            .body_read_timeout_secs
            .clamp(1, 3600),
    );
    let body_rule = BodyRule {
        within,
        max: MAX_BODY,
    };
    let public_body = BodyRule {
        within,
        max: MAX_PUBLIC_BODY,
    };
    let authed = Router::new()
        .route(
            "/api/worker",
            get(api::list_workers).put(api::register_worker),
        )
        .route(
            "/api/worker/{id}",
            get(api::get_worker)
                .patch(api::heartbeat)
                .delete(api::deregister_worker),
        )
        .route("/api/worker/{id}/circuits", get(api::worker_circuits))
        .route("/api/circuit/_/bulk", delete(api::bulk_delete))
        .route(
            "/api/circuit/{id}",
            get(api::get_circuit).delete(api::delete_circuit),
        )
        .route("/api/circuit/{id}/statistics", get(api::circuit_statistics))
        .route("/api/slots", get(api::slots))
        .route("/v1/api/worker", get(api::v1_workers))
        .route("/v1/api/slots", get(api::v1_slots))
        .route("/v1/api/circuit/{id}", delete(api::delete_circuit))
        .route("/health/status", get(api::health_status))
        .route(
            "/v2/endpoints/bulk",
            post(endpoints::create_bulk).delete(endpoints::delete_bulk),
        )
        .route("/v2/endpoints/bulk/routes", post(endpoints::replace_routes))
        .route(
            "/v2/endpoints/bulk/routes/register",
            post(endpoints::register_routes),
        )
        .route(
            "/v2/endpoints/bulk/routes/unregister",
            post(endpoints::unregister_routes),
        )
        .route(
            "/v2/endpoints/{id}",
            post(endpoints::create).delete(endpoints::delete),
        )
        .route(
            "/v2/endpoints/{id}/health-check",
            axum::routing::put(endpoints::health_check),
        )
        .route("/v2/endpoints/{id}/token", post(endpoints::token))
        // The token is checked before the body is read: a caller without it never
        // makes the coordinator buffer a body.
        .route_layer(axum::middleware::from_fn_with_state(
            body_rule,
            body_in_time,
        ))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    // On the method's route, so that a wrong method still gets its 405.
    let conf = Router::new().route(
        "/v2/conf",
        post(proxy::conf)
            .route_layer(axum::middleware::from_fn_with_state(
                public_body,
                body_in_time,
            ))
            .route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                conf_auth,
            )),
    );
    Router::new()
        .route("/status", get(api::status))
        .route("/health", get(api::live))
        .route("/livez", get(api::live))
        .route("/health/livez", get(api::live))
        .route("/readyz", get(api::ready))
        .route("/health/readyz", get(api::ready))
        .route("/metrics", get(api::metrics))
        .route("/v2/proxy/{token}/{session_id}/add", get(proxy::proxy_add))
        .route(
            "/v2/proxy/auth",
            get(proxy::proxy_auth_get).post(proxy::proxy_auth_post),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            public_body,
            body_in_time,
        ))
        .merge(conf)
        .merge(authed)
        .with_state(state)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(announced_size))
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn_with_state(observed, observe_api))
        .layer(RequestIdLayer::new(REQUEST_IDS.0, REQUEST_IDS.1))
}

/// Times every API request under its method and route template (the pattern, never
/// the raw path; unmatched paths share `route="unmatched"`).
async fn observe_api(Extract(state): Extract<Arc<State>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = match req.method().as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS") => m,
        _ => "other",
    };
    let key = format!(
        "method=\"{method}\",route=\"{}\"",
        crate::metrics::escape(&route)
    );
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    state
        .metrics
        .observed
        .api_requests
        .get(&key)
        .observe(started.elapsed());
    resp
}

/// The largest request body the API reads (bulk calls included).
pub const MAX_BODY: usize = 2 << 20;

/// The largest body of the routes a caller reaches without the API secret
/// (`/v2/proxy/auth` by POST, and `/v2/conf`, whose bodies are a few hundred bytes):
/// with [`server::MAX_HEAD`] (which one read may take to twice itself) it bounds
/// what callers without credentials can make the coordinator hold to about
/// `max_connections` × 192 KiB.
pub const MAX_PUBLIC_BODY: usize = 64 << 10;

/// How a route's body is read: whole within `within` of its head, at most `max`
/// bytes.
#[derive(Clone, Copy)]
struct BodyRule {
    within: Duration,
    max: usize,
}

/// A body announced larger than [`MAX_BODY`] is refused before any of it is read.
async fn announced_size(req: Request, next: Next) -> Response {
    if announced_over(&req, MAX_BODY) {
        // The rest of the body is not read: the connection cannot be reused.
        return server::closing(ApiError::TooLarge.into_response());
    }
    next.run(req).await
}

/// Whether `req` announces (by its `Content-Length`) a body longer than `max`.
fn announced_over(req: &Request, max: usize) -> bool {
    use axum::body::HttpBody as _;
    req.body().size_hint().lower() > max as u64
}

/// A request's body is read whole, within `limit` of its head, before the handler
/// runs (`server::read_body_within`; on the authenticated routes once the token is
/// checked): a body that never comes, or trickles, would otherwise hold the
/// connection and its slot under `max_connections` for ever. Bodies are small JSON
/// (at most [`MAX_BODY`], [`MAX_PUBLIC_BODY`] where no secret is checked first);
/// handlers read the buffered copy. Late: 408; over the limit: 413; cut off: 400;
/// each closes the connection.
async fn body_in_time(Extract(rule): Extract<BodyRule>, req: Request, next: Next) -> Response {
    // A worker's own credential is checked by the route, once it knows the worker
    // (a registration names it in its body): until then the caller may hold no
    // credential at all, and gets no more than a public route's body.
    let rule = match req.extensions().get::<Caller>() {
        Some(Caller::Worker(_)) => BodyRule {
            max: rule.max.min(MAX_PUBLIC_BODY),
            ..rule
        },
        _ => rule,
    };
    // A body announced longer than the route's limit is refused before any of it is
    // read (as `announced_size` does for the API's largest).
    let refused = if announced_over(&req, rule.max) {
        Err(server::BodyFailure::TooLarge)
    } else {
        server::read_body_within(req, rule.within, rule.max).await
    };
    let refused = match refused {
        Ok(req) => {
            let (parts, body) = req.into_parts();
            // Buffered whole above: this takes what is there.
            let bytes = match axum::body::to_bytes(body, rule.max).await {
                Ok(b) => b,
                Err(e) => {
                    return server::closing(
                        ApiError::BadRequest(format!("request body not read: {e}")).into_response(),
                    )
                }
            };
            if holds_nul(parts.uri.query().unwrap_or_default().as_bytes(), &bytes) {
                return ApiError::BadRequest(
                    "values may not hold NUL characters (\\u0000, %00)".into(),
                )
                .into_response();
            }
            return next.run(Request::from_parts(parts, bytes.into())).await;
        }
        Err(server::BodyFailure::Late) => ApiError::BodyTimeout,
        Err(server::BodyFailure::TooLarge) => ApiError::TooLarge,
        Err(server::BodyFailure::Cut(e)) => {
            ApiError::BadRequest(format!("request body not read: {e}"))
        }
    };
    server::closing(refused.into_response())
}

/// Whether a query (`%00`) or a JSON body (the escape `\u0000`, or a raw NUL byte)
/// carries a NUL character. No value the API takes has a use for one, and
/// PostgreSQL can store none (neither in `text` nor in `jsonb`): on that engine it
/// was a 500 where SQLite stored it, so it is a 400 on both, before anything is
/// written. An escaped backslash followed by `u0000` is text, not a NUL.
fn holds_nul(query: &[u8], body: &[u8]) -> bool {
    if query.windows(3).any(|w| w == b"%00") || body.contains(&0) {
        return true;
    }
    let mut backslashes = 0usize;
    for (i, &b) in body.iter().enumerate() {
        if b == b'\\' {
            backslashes += 1;
            continue;
        }
        if b == b'u' && backslashes % 2 == 1 && body.get(i + 1..i + 5) == Some(b"0000") {
            return true;
        }
        backslashes = 0;
    }
    false
}

/// Refusals made outside the handlers (unknown route, wrong method, a body over the
/// limit, …) come with an empty or text body: they get the API's JSON error shape
/// too, with the same status.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (code, text) = match status {
        StatusCode::NOT_FOUND => ("object-not-found", "No such route"),
        StatusCode::METHOD_NOT_ALLOWED => ("method-not-allowed", "Method not allowed"),
        StatusCode::PAYLOAD_TOO_LARGE => ("request-too-large", "Request body too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("invalid-api-params", "Unsupported media type"),
        s if s.is_server_error() => ("internal-error", "Internal server error"),
        _ => ("invalid-api-params", "Bad request"),
    };
    let body = problem_body(code, text, text);
    let mut out = (status, Json(body)).into_response();
    // Keep what the refusal said about the method or the connection.
    for name in [axum::http::header::ALLOW, axum::http::header::CONNECTION] {
        if let Some(v) = resp.headers().get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

/// A coordinator bound to its port, not yet serving.
pub struct Coordinator {
    /// Shared state; an embedded worker talks to it directly.
    pub state: Arc<State>,
    /// The API's address.
    pub addr: SocketAddr,
    listener: tokio::net::TcpListener,
}

/// The secrets of the sample configs in `deploy/`: public, so a coordinator others
/// can reach warns when it runs with one.
pub const SAMPLE_SECRETS: [&str; 2] = ["change-me-api-secret", "change-me-jwt-secret"];

impl Coordinator {
    /// Opens the store (migrating it), connects to Redis when configured and binds
    /// the API port.
    pub async fn bind(config: &CoordinatorConfig) -> anyhow::Result<Self> {
        // One coordinator per SQLite file, held as long as its state.
        let sqlite_owner = match &config.database.url {
            Some(_) => None,
            None => Some(
                store::sqlite::OneProcess::take(&config.database.sqlite_path)
                    .map_err(|e| anyhow::anyhow!("cannot open the circuit store: {e}"))?,
            ),
        };
        let store = Store::open_with(
            config.database.url.as_deref(),
            &config.database.sqlite_path,
            config.database.pool_size,
            config.database.sqlite_max_size_mib.saturating_mul(1 << 20),
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the circuit store: {e}"))?;
        let (redis, streams) = match &config.redis.url {
            Some(url) => {
                let client = redis::Client::open(url.as_str()).map_err(|e| {
                    anyhow::anyhow!(
                        "[redis] url {:?}: {e}",
                        appproxy_control_common::config::shown_url(url)
                    )
                })?;
                // Each reconnection is one attempt, without back-off (`RedisConn::connect`):
                // every call awaits it, so a refused Redis costs a call milliseconds;
                // an attempt or a call that hangs is bounded.
                let cfg = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(REDIS_CALL_TIMEOUT)
                    .set_response_timeout(REDIS_CALL_TIMEOUT);
                // The streams' database, when `[redis] stream_db` names another one.
                let stream_client = match config.redis.stream_db.map(i64::from) {
                    Some(db) if db != client.get_connection_info().redis.db => {
                        let mut info = client.get_connection_info().clone();
                        info.redis.db = db;
                        Some((db, redis::Client::open(info)?))
                    }
                    _ => None,
                };
                let connect = |client, what: String| {
                    let cfg = cfg.clone();
                    async move {
                        redis_link::RedisConn::connect(client, cfg, events::count_command_reconnect)
                            .await
                            .map_err(|e| {
                                anyhow::anyhow!(
                                    "cannot connect to [redis] url {:?}{what}: {e}",
                                    appproxy_control_common::config::shown_url(url)
                                )
                            })
                    }
                };
                let conn = connect(client, String::new()).await?;
                let streams = match stream_client {
                    Some((db, client)) => {
                        connect(client, format!(", database {db} ([redis] stream_db)")).await?
                    }
                    None => conn.clone(),
                };
                (Some(conn), Some(streams))
            }
            None => (None, None),
        };
        let marks = match &redis {
            Some(conn) => Marks::Redis(conn.clone()),
            None => Marks::Memory(Default::default()),
        };
        let (local, _) = tokio::sync::broadcast::channel(1024);
        let state = Arc::new(State {
            store,
            running: jobs::Running::default(),
            store_failing: std::sync::Mutex::default(),
            leading_since: std::sync::Mutex::default(),
            _sqlite_owner: sqlite_owner,
            config: config.clone(),
            redis,
            streams,
            local,
            acks: Arc::default(),
            breakers: Arc::new(Breakers::new(
                Duration::from_secs_f64(
                    config
                        .coordinator
                        .worker_breaker_backoff_secs
                        .clamp(0.0, 3600.0),
                ),
                Duration::from_secs_f64(
                    config
                        .coordinator
                        .worker_breaker_max_backoff_secs
                        .clamp(0.0, 86400.0),
                ),
            )),
            failed_ports: failed_ports::FailedPorts::new(Duration::from_secs_f64(
                config
                    .coordinator
                    .worker_failed_port_backoff_secs
                    .clamp(0.0, 86400.0),
            )),
            // Marks in memory are gone with the previous process: circuits used
            // until it stopped count as used at this start.
            marks_gap: match marks {
                Marks::Memory(_) => access::MarksGap::since(appproxy_shared::jwt::now_epoch()),
                Marks::Redis(_) => access::MarksGap::default(),
            },
            marks,
            server: Arc::default(),
            metrics: Metrics::default(),
            node_id: uuid::Uuid::new_v4(),
            stopping: Default::default(),
            creating: Default::default(),
            reuse_locks: KeyedLocks::default(),
        });
        let listener = tokio::net::TcpListener::bind(config.coordinator.bind)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot bind [coordinator] bind {}: {e}",
                    config.coordinator.bind
                )
            })?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            for (key, value) in [
                ("api_secret", &config.secrets.api_secret),
                ("jwt_secret", &config.secrets.jwt_secret),
            ] {
                if SAMPLE_SECRETS.contains(&value.as_str()) {
                    tracing::warn!(
                        key,
                        bind = %addr,
                        "[secrets] {key} is the published sample's on an address others can reach: \
                         anyone who knows it can create circuits and sign tokens; set your own"
                    );
                }
            }
        }
        Ok(Self {
            state,
            addr,
            listener,
        })
    }

    /// Serves the API and runs the jobs until `shutdown` resolves.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            state,
            addr,
            listener,
        } = self;
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(url) = &state.config.redis.url {
            tasks.spawn(events::listen_acks(
                url.clone(),
                state.acks.clone(),
                state.breakers.clone(),
            ));
        }
        tasks.spawn(jobs::stall_watch(state.clone()));
        tasks.spawn(jobs::worker_lost(state.clone()));
        tasks.spawn(jobs::idle_circuits(state.clone()));
        tasks.spawn(jobs::overdue_creations(state.clone()));
        tasks.spawn(jobs::renew_creations(state.clone()));
        tasks.spawn(health::run(state.clone()));
        jobs::warn_if_lease_lapses(&state);
        let leader = state.clone();
        tracing::info!(%addr, store = state.store.engine(), events = if state.redis.is_some() { "redis" } else { "in-process" }, "coordinator serving");
        let c = &state.config.coordinator;
        let limits = server::Limits {
            problem: PROBLEM,
            ..server::Limits::from_config(
                "coordinator",
                REQUEST_IDS,
                c.header_read_timeout_secs,
                c.idle_timeout_secs,
                c.max_connections,
                1,
            )
        };
        // The cap shared by client address (one in 8 unless configured).
        let per_address = c
            .max_connections_per_address
            .unwrap_or_else(|| server::default_share(limits.max_connections));
        let metrics = state.server.clone();
        // As the drain begins, creations waiting for an acknowledgement stop waiting:
        // they withdraw their circuits and answer within it.
        let acks = state.acks.clone();
        let shutdown = async move {
            shutdown.await;
            let waiting = acks.stop();
            if waiting > 0 {
                tracing::info!(
                    waiting,
                    "stopping: creations waiting for their worker's acknowledgement withdraw their circuits and answer 503"
                );
            }
        };
        let served = server::serve_shared(
            listener,
            router(state),
            (limits, per_address),
            metrics,
            shutdown,
        )
        .await;
        // No pass takes or renews the lease from now on (one spawned outside the
        // jobs, a health decision, may still be running); the jobs end (an aborted
        // task ends at its next await); then the lease is given up.
        leader.stopping.store(true, Ordering::SeqCst);
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        jobs::step_down(&leader).await;
        served?;
        Ok(())
    }
}

/// Binds and serves until `shutdown` resolves.
pub async fn serve(
    config: &CoordinatorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<SocketAddr> {
    let coordinator = Coordinator::bind(config).await?;
    let addr = coordinator.addr;
    coordinator.run(shutdown).await?;
    Ok(addr)
}

#[cfg(test)]
mod tests {
    /// One holder per key at a time; other keys go on; a wait is bounded; entries
    /// go once nobody holds or awaits them (also after a wait given up).
    #[tokio::test]
    async fn keyed_locks_serialise_one_key_and_forget_it_after() {
        use std::time::Duration;
        let locks = super::KeyedLocks::default();
        let first = locks
            .lock("a".into(), Duration::from_secs(1))
            .await
            .expect("free");
        assert!(locks
            .lock("b".into(), Duration::from_millis(10))
            .await
            .is_some());
        assert!(
            locks
                .lock("a".into(), Duration::from_millis(50))
                .await
                .is_none(),
            "held: the wait ends unanswered"
        );
        // A wait cancelled midway leaves nothing behind either.
        let _ = tokio::time::timeout(
            Duration::from_millis(20),
            locks.lock("a".into(), Duration::from_secs(5)),
        )
        .await;
        assert_eq!(locks.len(), 1);
        let (second, ()) = tokio::join!(locks.lock("a".into(), Duration::from_secs(5)), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(first);
        });
        assert!(second.is_some(), "had once the first let go");
        drop(second);
        assert_eq!(locks.len(), 0);
    }

    #[test]
    fn nul_characters_are_found_in_queries_and_json_escapes_only() {
        for (query, body, nul) in [
            ("", r#"{"a":"b"}"#, false),
            ("args=%00", "", true),
            ("args=%2500", "", false),
            ("", r#"{"a":"x\u0000y"}"#, true),
            ("", r#"{"a\u0000":1}"#, true),
            ("", r#"{"a":"x\\u0000y"}"#, false),
            ("", r#"{"a":"x\\\u0000y"}"#, true),
            ("", r#"{"a":"\u00001"}"#, true),
            ("", r#"{"a":"\u0001"}"#, false),
            ("", "\0", true),
        ] {
            assert_eq!(
                super::holds_nul(query.as_bytes(), body.as_bytes()),
                nul,
                "{query:?} {body:?}"
            );
        }
    }
}
