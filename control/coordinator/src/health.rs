//! Active health checks of inference routes, run by the leading coordinator as in the
//! original platform (its `HealthCheckEngine` lives in the coordinator).
//!
//! Every route (with a `route_id`) of an endpoint whose health check is enabled is
//! probed with `GET <path>` at the endpoint's `interval`, each probe bounded by
//! `max_wait_time`; the first probe of a new route waits `initial_delay` (models still
//! loading). `max_retries` failures in a row make a route `unhealthy`; one answer with
//! the expected status makes it `healthy` again. Probe times carry random jitter so
//! thousands of routes do not probe in step, and at most
//! `[health_check] max_concurrency` probes are in flight — one endpoint at most its
//! share of them ([`share_of`]), probes of routes whose last probe failed at most
//! half of them ([`failing_cap`]), probes of routes not seen to answer (failing or
//! new) at most three quarters ([`unproven_cap`]), and no probe waits longer than
//! [`MAX_PROBE_WAIT`], so neither an endpoint whose replicas hang nor many such
//! endpoints, failing or new, can hold every slot and starve the others' probes.
//!
//! Each probe runs under a request ID of its own (sent to the model server in
//! `X-Backend-Request-ID`); a state change is logged under it with the route, the
//! endpoint and the reason, and then, under the same ID:
//! - stored in the circuit's `route_info[].health_status` and deployed to the worker
//!   like any route change (`appproxy_circuit_route_updated_event`), whose cores stop
//!   choosing an unhealthy route at once;
//! - reported to the manager as the original does: `model_service_status_updated`
//!   (`{session_id, new_status}`, plus `route_id`, `endpoint_id`, `circuit_id` and
//!   `reason`) on the manager's stream `events` and channel `events_all`.
//!
//! One scheduler task owns all state (no locks); probes are tasks that report back.
//! Endpoints whose health check is turned off get their routes' stored states cleared.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use appproxy_shared::model::{AppMode, RouteHealth};
use appproxy_shared::{IdVersion, RequestId};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use super::anycast;
use super::events::{CircuitEvent, EventKind};
use super::State;

/// Serialises read-modify-write of a circuit's routes between the route API and the
/// health check, so neither overwrites the other's change.
pub static ROUTE_WRITES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Counters: probes sent, probes failed, state changes applied.
pub static COUNTS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

/// The longest one probe waits for an answer, whatever `max_wait_time` says: a
/// probe holds one of the `max_concurrency` slots while it waits.
pub const MAX_PROBE_WAIT: Duration = Duration::from_secs(60);

/// Of `max_concurrency` slots, how many probes of routes whose last probe failed
/// may hold: half (at least one). The rest is kept for routes that answer and new
/// ones, so however many routes hang (each holding its slot up to
/// [`MAX_PROBE_WAIT`]), a route that answers finds a slot (from 2 slots on).
pub fn failing_cap(max_concurrency: usize) -> usize {
    (max_concurrency / 2).max(1)
}

/// Of `max_concurrency` slots, how many probes of routes not seen to answer may
/// hold: routes whose last probe failed, and routes never seen to answer at their
/// address (new, moved, or not stored healthy when a leader starts). All but a
/// quarter (at least one left, from 2 slots on): replicas that accept connections
/// and hang from their very first probe (a model server still loading) would
/// otherwise take every slot for [`MAX_PROBE_WAIT`] before they count as failing,
/// and no route that answers would be probed meanwhile. New endpoints that answer
/// still find the rest of these slots beside failing routes ([`failing_cap`]).
pub fn unproven_cap(max_concurrency: usize) -> usize {
    max_concurrency
        .saturating_sub((max_concurrency / 4).max(1))
        .max(1)
}

/// Probes one endpoint may have in flight when `endpoints` endpoints are checked:
/// an equal share of `max_concurrency` with one share left over, so an endpoint
/// whose replicas all hang holds at most its share, and an endpoint added meanwhile
/// finds slots free. At least one.
pub fn share_of(max_concurrency: usize, endpoints: usize) -> usize {
    (max_concurrency / endpoints.saturating_add(1)).max(1)
}

/// An endpoint's health-check settings (the original's `ModelHealthCheck`).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Time between probes of one route.
    pub interval: Duration,
    /// The path probed.
    pub path: String,
    /// Failures in a row that make a route unhealthy.
    pub max_retries: u32,
    /// One probe's time limit.
    pub timeout: Duration,
    /// The status a healthy route answers.
    pub expected_status: u16,
    /// Wait before a new route's first probe.
    pub initial_delay: Duration,
}

impl Settings {
    /// Reads the stored settings (snake_case or kebab-case keys; the original's
    /// defaults for missing ones); `None` when disabled or unusable.
    pub fn parse(v: &Value, floor: Duration) -> Result<Option<Self>, String> {
        let get = |name: &str| {
            v.get(name)
                .or_else(|| v.get(name.replace('_', "-").as_str()))
                .filter(|x| !x.is_null())
        };
        if get("enable").and_then(Value::as_bool) == Some(false) {
            return Ok(None);
        }
        let secs = |name: &str, default: f64| -> Result<Duration, String> {
            let s = match get(name) {
                None => default,
                Some(x) => x
                    .as_f64()
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .ok_or_else(|| format!("{name} must be a non-negative number"))?,
            };
            Ok(Duration::from_secs_f64(s.min(86_400.0)))
        };
        let path = match get("path") {
            None => "/health".to_owned(),
            Some(p) => p.as_str().ok_or("path must be a string")?.to_owned(),
        };
        if !path.starts_with('/')
            || path.len() > 2048
            || path.bytes().any(|b| b <= b' ' || b == 0x7f)
        {
            return Err("path must start with '/' and hold no spaces or control characters".into());
        }
        let int = |name: &str, default: u64| -> Result<u64, String> {
            match get(name) {
                None => Ok(default),
                Some(x) => x
                    .as_u64()
                    .or_else(|| {
                        x.as_f64()
                            .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                            .map(|f| f as u64)
                    })
                    .ok_or_else(|| format!("{name} must be a non-negative integer")),
            }
        };
        let expected = int("expected_status_code", 200)?;
        if !(100..=599).contains(&expected) {
            return Err("expected_status_code must be within 100-599".into());
        }
        Ok(Some(Self {
            interval: secs("interval", 10.0)?.max(floor),
            path,
            max_retries: int("max_retries", 10)?.clamp(1, 1_000) as u32,
            timeout: secs("max_wait_time", 15.0)?.min(MAX_PROBE_WAIT).max(floor),
            expected_status: expected as u16,
            initial_delay: secs("initial_delay", 60.0)?,
        }))
    }
}

/// One probed route.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    endpoint: uuid::Uuid,
    circuit: uuid::Uuid,
    route: uuid::Uuid,
    session: uuid::Uuid,
    host: String,
    port: u16,
    settings: Arc<Settings>,
}

/// A route's probing state, owned by the scheduler.
struct Tracked {
    target: Target,
    /// Failures in a row.
    failures: u32,
    /// Seen to answer at its current address (or stored healthy when first seen).
    proven: bool,
    /// The state last decided (and stored, or being stored).
    status: Option<RouteHealth>,
    /// Bumped whenever the route is rescheduled from outside, so stale heap entries
    /// are skipped.
    generation: u64,
    /// A probe is out.
    in_flight: bool,
}

/// A decided state change on its way to the store.
#[derive(Debug, Clone)]
struct Change {
    route: uuid::Uuid,
    session: uuid::Uuid,
    /// The new state (`None`: cleared, the check is off).
    new: Option<RouteHealth>,
    /// The state before, restored in memory when the change cannot be stored.
    previous: Option<RouteHealth>,
    reason: String,
    /// The probe (or refresh pass) that decided it.
    id: Option<RequestId>,
}

/// The changes of one circuit: stored one batch at a time, so a burst of changes
/// (a node with many replicas gone) costs one write and one deployment per batch,
/// not one per route.
#[derive(Default)]
struct Pending {
    endpoint: uuid::Uuid,
    changes: Vec<Change>,
    busy: bool,
}

/// What comes back to the scheduler.
enum Report {
    /// A probe ended: `Ok` or why it failed.
    Probed {
        endpoint: uuid::Uuid,
        key: uuid::Uuid,
        generation: u64,
        id: RequestId,
        outcome: Result<(), String>,
    },
    /// A batch was stored (`failed` empty) or not.
    Applied {
        circuit: uuid::Uuid,
        failed: Vec<Change>,
    },
}

/// All prober state, owned by one task.
struct Scheduler {
    state: Arc<State>,
    tx: mpsc::UnboundedSender<Report>,
    tracked: HashMap<uuid::Uuid, Tracked>,
    heap: BinaryHeap<Reverse<(Instant, uuid::Uuid, u64)>>,
    pending: HashMap<uuid::Uuid, Pending>,
    rng: Rng,
    invalid: HashSet<uuid::Uuid>,
    floor: Duration,
    jitter: f64,
    permits: Arc<Semaphore>,
    /// Slots probes of failing routes take first ([`failing_cap`]).
    failing_permits: Arc<Semaphore>,
    /// Slots probes of routes not seen to answer take next ([`unproven_cap`]).
    unproven_permits: Arc<Semaphore>,
    /// `[health_check] max_concurrency`.
    max_concurrency: usize,
    /// Probes one endpoint may have in flight ([`share_of`]).
    share: usize,
    /// Probes in flight per endpoint.
    busy: HashMap<uuid::Uuid, usize>,
    /// Due probes of endpoints at their share, in the order they fell due.
    waiting: HashMap<uuid::Uuid, VecDeque<(uuid::Uuid, u64)>>,
}

/// The prober's scheduler: runs until the coordinator stops.
pub(super) async fn run(state: Arc<State>) {
    let cfg = state.config.health_check.clone();
    let refresh_every = cfg.refresh_every();
    let (tx, mut rx) = mpsc::unbounded_channel::<Report>();
    let mut s = Scheduler {
        state,
        tx,
        tracked: HashMap::new(),
        heap: BinaryHeap::new(),
        pending: HashMap::new(),
        rng: Rng::seeded(),
        invalid: HashSet::new(),
        floor: Duration::from_secs_f64(cfg.min_interval_secs.clamp(0.001, 3600.0)),
        jitter: cfg.jitter.clamp(0.0, 0.5),
        permits: Arc::new(Semaphore::new(cfg.max_concurrency.clamp(1, 100_000))),
        failing_permits: Arc::new(Semaphore::new(failing_cap(
            cfg.max_concurrency.clamp(1, 100_000),
        ))),
        unproven_permits: Arc::new(Semaphore::new(unproven_cap(
            cfg.max_concurrency.clamp(1, 100_000),
        ))),
        max_concurrency: cfg.max_concurrency.clamp(1, 100_000),
        share: cfg.max_concurrency.clamp(1, 100_000),
        busy: HashMap::new(),
        waiting: HashMap::new(),
    };
    let mut next_refresh = Instant::now();
    loop {
        let next_due = s.heap.peek().map(|Reverse((t, _, _))| *t);
        let wake = next_due.map_or(next_refresh, |t| t.min(next_refresh));
        tokio::select! {
            report = rx.recv() => {
                let Some(report) = report else { return };
                s.on_report(report);
            }
            _ = tokio::time::sleep_until(wake) => {
                if Instant::now() >= next_refresh {
                    let id = RequestId::generate(IdVersion::V4);
                    appproxy_shared::scope(Some(id), s.refresh()).await;
                    next_refresh = Instant::now() + refresh_every;
                }
                s.launch_due();
            }
        }
    }
}

impl Scheduler {
    /// Sends the probes whose time has come.
    fn launch_due(&mut self) {
        let now = Instant::now();
        let endpoints: Vec<uuid::Uuid> = self.waiting.keys().copied().collect();
        for endpoint in endpoints {
            self.launch_waiting(endpoint);
        }
        while let Some(Reverse((t, key, generation))) = self.heap.peek().copied() {
            if t > now {
                break;
            }
            self.heap.pop();
            let Some(t) = self.tracked.get_mut(&key) else {
                continue;
            };
            if t.generation != generation {
                continue;
            }
            if t.in_flight {
                // The probe of an earlier schedule is still out: look again soon.
                self.heap
                    .push(Reverse((now + Duration::from_millis(50), key, generation)));
                continue;
            }
            let endpoint = t.target.endpoint;
            if self.busy.get(&endpoint).copied().unwrap_or(0) >= self.share {
                // The endpoint holds its share: its next probe ends lets this go.
                self.waiting
                    .entry(endpoint)
                    .or_default()
                    .push_back((key, generation));
                continue;
            }
            self.launch(key, generation);
        }
    }

    /// Sends the probe of `key` (scheduled as `generation`) if it is still tracked
    /// under that schedule and none is out.
    fn launch(&mut self, key: uuid::Uuid, generation: u64) {
        let Some(t) = self.tracked.get_mut(&key) else {
            return;
        };
        if t.generation != generation || t.in_flight {
            return;
        }
        t.in_flight = true;
        *self.busy.entry(t.target.endpoint).or_default() += 1;
        // A route whose last probe failed (it may hang again) waits for one of the
        // slots kept for such probes first; it, and a route never seen to answer
        // (it may hang from the first), then for one of the slots routes that
        // answer do not need. Always in this order, so no two probes wait on each
        // other's slots.
        let failing = (t.failures > 0).then(|| self.failing_permits.clone());
        let unproven = (t.failures > 0 || !t.proven).then(|| self.unproven_permits.clone());
        spawn_probe(
            t.target.clone(),
            generation,
            self.permits.clone(),
            [failing, unproven],
            self.tx.clone(),
        );
    }

    /// Sends the waiting probes of `endpoint` while it is below its share.
    fn launch_waiting(&mut self, endpoint: uuid::Uuid) {
        while self.busy.get(&endpoint).copied().unwrap_or(0) < self.share {
            let Some((key, generation)) = self
                .waiting
                .get_mut(&endpoint)
                .and_then(VecDeque::pop_front)
            else {
                break;
            };
            self.launch(key, generation);
        }
        if self.waiting.get(&endpoint).is_some_and(VecDeque::is_empty) {
            self.waiting.remove(&endpoint);
        }
    }

    /// Re-reads the checked routes (only while this node leads; a follower probes
    /// nothing) and clears stored states of endpoints no longer checked.
    async fn refresh(&mut self) {
        if !super::jobs::lead(&self.state).await {
            if !self.tracked.is_empty() {
                tracing::info!(
                    routes = self.tracked.len(),
                    "not leading: health checks paused"
                );
                self.tracked.clear();
                self.heap.clear();
                self.waiting.clear();
            }
            return;
        }
        let (endpoints, circuits) = match tokio::try_join!(
            self.state.store.health_checked_endpoints(),
            self.state.store.endpoint_circuits()
        ) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "health-check targets unreadable; keeping the current set");
                return;
            }
        };
        let mut settings: HashMap<uuid::Uuid, Arc<Settings>> = HashMap::new();
        for (id, raw) in endpoints {
            match Settings::parse(&raw, self.floor) {
                Ok(Some(s)) => {
                    self.invalid.remove(&id);
                    settings.insert(id, Arc::new(s));
                }
                Ok(None) => {}
                Err(why) => {
                    if self.invalid.insert(id) {
                        tracing::warn!(endpoint = %id, reason = %why, "health check settings unusable; endpoint not checked");
                    }
                }
            }
        }
        let now = Instant::now();
        let mut seen = HashSet::new();
        for (c, _) in circuits {
            let (AppMode::Inference, Some(endpoint)) = (c.app_mode, c.endpoint_id) else {
                continue;
            };
            let Some(s) = settings.get(&endpoint) else {
                // Not checked (any more): stored states go, so nothing stays out of
                // rotation.
                let stale: Vec<_> = c
                    .route_info
                    .iter()
                    .filter(|r| r.health_status.is_some())
                    .filter_map(|r| {
                        Some(Change {
                            route: r.route_id?,
                            session: r.session_id,
                            new: None,
                            previous: r.health_status,
                            reason: "health check disabled".into(),
                            id: appproxy_shared::current_request_id(),
                        })
                    })
                    .collect();
                if !stale.is_empty() && !self.pending.contains_key(&c.id) {
                    tracing::info!(endpoint = %endpoint, circuit = %c.id, routes = stale.len(), reason = "health check disabled", "route health cleared");
                    for change in stale {
                        self.queue(endpoint, c.id, change);
                    }
                }
                continue;
            };
            for r in &c.route_info {
                let Some(route) = r.route_id else { continue };
                seen.insert(route);
                let target = Target {
                    endpoint,
                    circuit: c.id,
                    route,
                    session: r.session_id,
                    host: if r.kernel_host.is_empty() {
                        "localhost".into()
                    } else {
                        r.kernel_host.clone()
                    },
                    port: r.kernel_port,
                    settings: s.clone(),
                };
                match self.tracked.get_mut(&route) {
                    Some(t) => {
                        if t.target != target {
                            // Moved or re-configured: probe on the new terms.
                            if (t.target.host.as_str(), t.target.port)
                                != (target.host.as_str(), target.port)
                            {
                                t.failures = 0;
                                t.proven = false;
                            }
                            t.generation += 1;
                            let first = self.rng.within(target.settings.interval);
                            t.target = target;
                            self.heap.push(Reverse((now + first, route, t.generation)));
                        }
                        // A stored state that is not the one last decided, with no
                        // change of the circuit queued or being stored: the route
                        // was written meanwhile (unregistered and registered again,
                        // its endpoint deleted and created again with the same route
                        // IDs — its state reset — or written by another leader). The
                        // stored state is the one to decide from, or a route still
                        // failing would stay in rotation: its next decision equals
                        // the one last made and would never be stored.
                        if t.status != r.health_status && !self.pending.contains_key(&c.id) {
                            tracing::debug!(route = %route, endpoint = %endpoint, circuit = %c.id, decided = t.status.map_or("none", RouteHealth::as_str), stored = r.health_status.map_or("none", RouteHealth::as_str), "stored route health differs from the last decision; deciding from the stored one");
                            t.status = r.health_status;
                        }
                    }
                    None => {
                        // A route with a stored state was checked before (another
                        // leader, a restart): no initial delay again.
                        let delay = if r.health_status.is_some() {
                            Duration::ZERO
                        } else {
                            target.settings.initial_delay
                        };
                        let first = delay + self.rng.within(target.settings.interval);
                        self.heap.push(Reverse((now + first, route, 0)));
                        self.tracked.insert(
                            route,
                            Tracked {
                                target,
                                failures: 0,
                                proven: r.health_status == Some(RouteHealth::Healthy),
                                status: r.health_status,
                                generation: 0,
                                in_flight: false,
                            },
                        );
                    }
                }
            }
        }
        self.tracked.retain(|k, _| seen.contains(k));
        let checked: HashSet<uuid::Uuid> =
            self.tracked.values().map(|t| t.target.endpoint).collect();
        self.share = share_of(self.max_concurrency, checked.len());
        if self.heap.len() > self.tracked.len().saturating_mul(4) + 64 {
            // Drop stale entries left by rescheduling.
            let tracked = &self.tracked;
            let live: Vec<_> = self
                .heap
                .drain()
                .filter(|Reverse((_, k, g))| tracked.get(k).is_some_and(|t| t.generation == *g))
                .collect();
            self.heap.extend(live);
        }
        tracing::debug!(
            routes = self.tracked.len(),
            endpoints = settings.len(),
            "health-check targets refreshed"
        );
    }

    fn on_report(&mut self, report: Report) {
        match report {
            Report::Applied { circuit, failed } => {
                for change in failed {
                    // Not stored: forget the decision so the next probe makes it again.
                    if let Some(t) = self.tracked.get_mut(&change.route) {
                        if t.status == change.new {
                            t.status = change.previous;
                        }
                    }
                }
                let more = self.pending.get_mut(&circuit).is_some_and(|p| {
                    p.busy = false;
                    !p.changes.is_empty()
                });
                if more {
                    self.start(circuit);
                } else {
                    self.pending.remove(&circuit);
                }
            }
            Report::Probed {
                endpoint,
                key,
                generation,
                id,
                outcome,
            } => {
                if let Some(n) = self.busy.get_mut(&endpoint) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.busy.remove(&endpoint);
                    }
                }
                self.launch_waiting(endpoint);
                let Some(t) = self.tracked.get_mut(&key) else {
                    return;
                };
                t.in_flight = false;
                if t.generation != generation {
                    return; // rescheduled meanwhile; its new entry is in the heap
                }
                let s = t.target.settings.clone();
                let previous = t.status;
                let decided = match &outcome {
                    Ok(()) => {
                        t.failures = 0;
                        t.proven = true;
                        Some(RouteHealth::Healthy)
                    }
                    Err(why) => {
                        t.failures = t.failures.saturating_add(1);
                        appproxy_shared::with_request_id(Some(id), || {
                            tracing::debug!(route = %key, endpoint = %t.target.endpoint, failures = t.failures, max_retries = s.max_retries, reason = %why, "health probe failed");
                        });
                        (t.failures >= s.max_retries).then_some(RouteHealth::Unhealthy)
                    }
                };
                let period = s.interval.as_secs_f64();
                let spread = period * self.jitter * (self.rng.unit() * 2.0 - 1.0);
                let next = Instant::now() + Duration::from_secs_f64((period + spread).max(0.001));
                self.heap.push(Reverse((next, key, generation)));
                let Some(new) = decided.filter(|n| Some(*n) != previous) else {
                    return;
                };
                t.status = Some(new);
                let reason = match &outcome {
                    Ok(()) => format!("answered {} on {}", s.expected_status, s.path),
                    Err(why) => format!("{} failures in a row, last: {why}", t.failures),
                };
                let target = t.target.clone();
                let from = previous.map_or("unknown", RouteHealth::as_str);
                appproxy_shared::with_request_id(Some(id), || match new {
                    RouteHealth::Unhealthy => {
                        tracing::warn!(route = %key, endpoint = %target.endpoint, circuit = %target.circuit, from, to = new.as_str(), %reason, "route health changed")
                    }
                    RouteHealth::Healthy => {
                        tracing::info!(route = %key, endpoint = %target.endpoint, circuit = %target.circuit, from, to = new.as_str(), %reason, "route health changed")
                    }
                });
                self.queue(
                    target.endpoint,
                    target.circuit,
                    Change {
                        route: key,
                        session: target.session,
                        new: Some(new),
                        previous,
                        reason,
                        id: Some(id),
                    },
                );
            }
        }
    }

    /// Adds a change to its circuit's batch (a later change of the same route
    /// replaces an earlier one) and starts storing when no batch is under way.
    fn queue(&mut self, endpoint: uuid::Uuid, circuit: uuid::Uuid, change: Change) {
        let p = self.pending.entry(circuit).or_default();
        p.endpoint = endpoint;
        match p.changes.iter_mut().find(|c| c.route == change.route) {
            Some(c) => {
                let previous = c.previous;
                *c = Change { previous, ..change };
            }
            None => p.changes.push(change),
        }
        if !p.busy {
            self.start(circuit);
        }
    }

    fn start(&mut self, circuit: uuid::Uuid) {
        let Some(p) = self.pending.get_mut(&circuit) else {
            return;
        };
        p.busy = true;
        let changes = std::mem::take(&mut p.changes);
        let id = changes.first().and_then(|c| c.id);
        tokio::spawn(appproxy_shared::scope(
            id,
            apply(
                self.state.clone(),
                self.tx.clone(),
                p.endpoint,
                circuit,
                changes,
            ),
        ));
    }
}

fn spawn_probe(
    target: Target,
    generation: u64,
    permits: Arc<Semaphore>,
    classes: [Option<Arc<Semaphore>>; 2],
    tx: mpsc::UnboundedSender<Report>,
) {
    let id = RequestId::generate(IdVersion::V4);
    tokio::spawn(appproxy_shared::scope(Some(id), async move {
        let mut _class_slots = Vec::with_capacity(2);
        for class in classes.into_iter().flatten() {
            match class.acquire_owned().await {
                Ok(slot) => _class_slots.push(slot),
                Err(_) => return,
            }
        }
        let outcome = match permits.acquire_owned().await {
            Ok(_permit) => probe(&target, id).await,
            Err(_) => return,
        };
        let _ = tx.send(Report::Probed {
            endpoint: target.endpoint,
            key: target.route,
            generation,
            id,
            outcome,
        });
    }));
}

/// Name lookups of probed hosts in flight at most, over all probes.
pub const MAX_LOOKUPS: usize = 16;

/// The slots of [`MAX_LOOKUPS`]: each held by a lookup until `getaddrinfo` really
/// returns, whether or not its probe still waits for it.
static LOOKUPS: Semaphore = Semaphore::const_new(MAX_LOOKUPS);

/// The addresses of a probed host by `deadline`: an IP literal as it is, a name
/// looked up (`getaddrinfo`, the system's resolver) on a thread of its own — never
/// on tokio's blocking pool, where SQLite store calls run: a lookup cannot be
/// cancelled, and while DNS does not answer each one holds its thread for the
/// resolver's own timeouts (tens of seconds), long after its probe gave up. At most
/// [`MAX_LOOKUPS`] are under way; a probe that finds none free by its deadline fails
/// without starting one.
async fn addresses(
    host: &str,
    port: u16,
    deadline: Instant,
) -> Result<Vec<std::net::SocketAddr>, String> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![std::net::SocketAddr::new(ip, port)]);
    }
    let Ok(Ok(slot)) = tokio::time::timeout_at(deadline, LOOKUPS.acquire()).await else {
        return Err(format!(
            "name lookup of {host} not started: {MAX_LOOKUPS} lookups already under way (DNS slow or not answering)"
        ));
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let name = host.to_owned();
    std::thread::Builder::new()
        .name("probe-lookup".into())
        .spawn(move || {
            use std::net::ToSocketAddrs as _;
            let found = (name.as_str(), port)
                .to_socket_addrs()
                .map(Iterator::collect::<Vec<_>>);
            drop(slot);
            let _ = tx.send(found);
        })
        .map_err(|e| format!("name lookup of {host} not started: {e}"))?;
    match tokio::time::timeout_at(deadline, rx).await {
        Err(_) => Err(format!("name lookup of {host} timed out")),
        Ok(Err(_)) => Err(format!("name lookup of {host} ended without an answer")),
        Ok(Ok(Err(e))) => Err(format!("name lookup of {host}: {e}")),
        Ok(Ok(Ok(found))) if found.is_empty() => {
            Err(format!("name lookup of {host} found no address"))
        }
        Ok(Ok(Ok(found))) => Ok(found),
    }
}

/// One probe: `GET path` with the expected status within the timeout (the host
/// name's lookup included).
async fn probe(t: &Target, id: RequestId) -> Result<(), String> {
    COUNTS[0].fetch_add(1, Ordering::Relaxed);
    let s = &t.settings;
    let deadline = Instant::now() + s.timeout;
    let exchange = async {
        let found = addresses(&t.host, t.port, deadline).await?;
        let mut conn = tokio::net::TcpStream::connect(&found[..])
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = conn.set_nodelay(true);
        let host = if t.host.contains(':') {
            format!("[{}]:{}", t.host, t.port)
        } else {
            format!("{}:{}", t.host, t.port)
        };
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: appproxy-health-check\r\nAccept: */*\r\n{}: {}\r\nConnection: close\r\n\r\n",
            s.path,
            appproxy_shared::PRIMARY_HEADER,
            id.as_str()
        );
        conn.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        // Only the status line matters.
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            let got = conn
                .read(&mut buf[n..])
                .await
                .map_err(|e| format!("receive: {e}"))?;
            if got == 0 {
                return Err("closed before a status line".to_owned());
            }
            n += got;
        }
        let line = &buf[..n];
        let status = (line.starts_with(b"HTTP/1.") && line[8] == b' ')
            .then(|| std::str::from_utf8(&line[9..12]).ok()?.parse::<u16>().ok())
            .flatten()
            .ok_or_else(|| "not an HTTP/1 response".to_owned())?;
        if status == s.expected_status {
            Ok(())
        } else {
            Err(format!("status {status}, expected {}", s.expected_status))
        }
    };
    let outcome = match tokio::time::timeout_at(deadline, exchange).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:.1}s", s.timeout.as_secs_f64())),
    };
    if outcome.is_err() {
        COUNTS[1].fetch_add(1, Ordering::Relaxed);
    }
    outcome
}

/// Stores a circuit's batch of new states in its routes, deploys the circuit to its
/// worker (under the first deciding probe's request ID), then tells the manager of
/// each decision under the ID of the probe that made it; reports back either way.
async fn apply(
    state: Arc<State>,
    tx: mpsc::UnboundedSender<Report>,
    endpoint: uuid::Uuid,
    circuit_id: uuid::Uuid,
    changes: Vec<Change>,
) {
    // Route writes take turns within this coordinator and, through the store, with
    // every other one (an endpoint's routes are read, changed and written whole).
    let writes = ROUTE_WRITES.lock().await;
    let turn = state.store.route_turn().await;
    // Decided by a node that may no longer lead: its lease taken over while the
    // probe ran or the turn was awaited (this process paused, Redis slow). It
    // stores nothing and tells the manager nothing; the leader probes and decides.
    if turn.is_ok() && !super::jobs::lead(&state).await {
        if let Ok(turn) = turn {
            turn.end().await;
        }
        drop(writes);
        tracing::info!(endpoint = %endpoint, circuit = %circuit_id, "no longer leading: route health not stored");
        let _ = tx.send(Report::Applied {
            circuit: circuit_id,
            failed: changes,
        });
        return;
    }
    let stored = async {
        if let Err(e) = &turn {
            return Err(super::ApiError::Store(crate::StoreError::Unavailable(
                e.to_string(),
            )));
        }
        let Some((circuit, _)) = state.store.circuit(circuit_id).await? else {
            return Ok::<bool, super::ApiError>(false);
        };
        let mut routes = circuit.route_info.clone();
        for r in routes.iter_mut() {
            if let Some(c) = changes.iter().find(|c| r.route_id == Some(c.route)) {
                r.health_status = c.new;
            }
        }
        if routes == circuit.route_info {
            return Ok(true);
        }
        let trace =
            appproxy_shared::middleware::current_trace_context();
        // Read before the write: once it is made, no store call may fail it.
        let authority = state.authority_of(circuit.worker).await?;
        state
            .store
            .update_routes(circuit.id, &routes, trace.as_ref())
            .await?;
        COUNTS[2].fetch_add(changes.len() as u64, Ordering::Relaxed);
        let mut updated = circuit.clone();
        updated.route_info = routes;
        tracing::info!(endpoint = %endpoint, circuit = %circuit_id, routes = changes.len(), "route health stored and deployed");
        state
            .publish(CircuitEvent {
                kind: EventKind::RouteUpdated,
                authority,
                circuits: vec![updated],
                request_id: appproxy_shared::current_request_id(),
                span: appproxy_shared::current_span(),
            })
            .await;
        Ok(true)
    }
    .await;
    if let Ok(turn) = turn {
        turn.end().await;
    }
    drop(writes);
    let stored = match stored {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(endpoint = %endpoint, circuit = %circuit_id, error = %e, "route health not stored; the next probe decides again");
            let _ = tx.send(Report::Applied {
                circuit: circuit_id,
                failed: changes,
            });
            return;
        }
    };
    let _ = tx.send(Report::Applied {
        circuit: circuit_id,
        failed: Vec::new(),
    });
    // A circuit gone meanwhile has nothing to report; the next refresh forgets it.
    let (Some(conn), Some(streams)) = (state.redis.as_ref(), state.streams.as_ref()) else {
        return;
    };
    if !stored {
        return;
    }
    let envelope = state.config.health_check.event_envelope;
    for c in changes {
        let Some(new) = c.new.filter(|n| c.previous != Some(*n)) else {
            continue; // cleared, or flapped back within the batch
        };
        let event = status_event(c.session, new, c.route, endpoint, circuit_id, &c.reason);
        appproxy_shared::scope(c.id, async {
            anycast::xadd(streams, anycast::MANAGER_STREAM, &event, envelope).await;
            anycast::publish(conn, anycast::MANAGER_CHANNEL, &event, envelope).await;
        })
        .await;
    }
}

/// The original's `model_service_status_updated` (anycast and broadcast), with the
/// route, endpoint and circuit added to the JSON body.
pub fn status_event(
    session: uuid::Uuid,
    new: RouteHealth,
    route: uuid::Uuid,
    endpoint: uuid::Uuid,
    circuit: uuid::Uuid,
    reason: &str,
) -> anycast::Event {
    anycast::Event {
        name: "model_service_status_updated",
        body: serde_json::json!({
            "session_id": session,
            "new_status": new.as_str(),
            "route_id": route,
            "endpoint_id": endpoint,
            "circuit_id": circuit,
            "reason": reason,
        }),
        args: vec![Some(session.to_string()), Some(new.as_str().to_owned())],
    }
}

/// A small xorshift generator for jitter (no shared RNG, no syscall per draw).
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64);
        Self(nanos | 1)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, d).
    fn within(&mut self, d: Duration) -> Duration {
        d.mul_f64(self.unit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_defaults_kebab_and_refusals() {
        let floor = Duration::from_millis(100);
        let s = Settings::parse(&serde_json::json!({}), floor)
            .expect("ok")
            .expect("on");
        assert_eq!(s.interval, Duration::from_secs(10));
        assert_eq!((s.max_retries, s.expected_status), (10, 200));
        assert_eq!(s.path, "/health");
        let k = Settings::parse(
            &serde_json::json!({"max-retries": 3, "max-wait-time": 0.01, "initial-delay": 0, "interval": 2.5, "expected-status-code": 204}),
            floor,
        )
        .expect("ok")
        .expect("on");
        assert_eq!((k.max_retries, k.expected_status), (3, 204));
        assert_eq!(k.timeout, floor, "raised to the floor");
        assert_eq!(k.initial_delay, Duration::ZERO);
        assert_eq!(k.interval, Duration::from_millis(2500));
        assert!(
            Settings::parse(&serde_json::json!({"enable": false}), floor)
                .expect("ok")
                .is_none()
        );
        for bad in [
            serde_json::json!({"path": "health"}),
            serde_json::json!({"path": "/a b"}),
            serde_json::json!({"path": "/a\r\nX: y"}),
            serde_json::json!({"interval": -1}),
            serde_json::json!({"expected_status_code": 42}),
            serde_json::json!({"max_retries": "x"}),
        ] {
            assert!(Settings::parse(&bad, floor).is_err(), "{bad}");
        }
    }

    #[test]
    fn jitter_stays_in_range() {
        let mut r = Rng::seeded();
        for _ in 0..10_000 {
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn status_event_carries_ids_in_both_envelopes() {
        let (s, r, e, c) = (
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
        );
        let ev = status_event(s, RouteHealth::Unhealthy, r, e, c, "why");
        assert_eq!(ev.body["session_id"], s.to_string());
        assert_eq!(ev.body["new_status"], "unhealthy");
        assert_eq!(ev.body["route_id"], r.to_string());
        assert_eq!(ev.body["endpoint_id"], e.to_string());
        assert_eq!(ev.args[1].as_deref(), Some("unhealthy"));
    }
}
