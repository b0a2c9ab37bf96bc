//! Handlers of the worker registry, circuits, slots, health and metrics.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use appproxy_shared::model::{AppMode, FrontendMode, ProxyProtocol};
use appproxy_shared::wire::{
    ChangeTrace, CircuitSet, CircuitWithOrigin, Heartbeat, Registered, Success, WholeSet,
    WorkerRegistration,
};
use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::placement::port_range;
use super::store::{HeldSlot, StoreError, WorkerRow};
use super::{access, ApiError, Body, Caller, Id, Params, State, WorkerParams};

pub(super) async fn status(Extract(state): Extract<Arc<State>>) -> Json<Value> {
    Json(json!({"api_version": "v2", "advertise_address": state.config.coordinator.advertised_url}))
}

pub(super) async fn live() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when the store and (if configured) Redis answer. The body says which is
/// not in fixed words (`"unavailable"`), never the error's text: `/readyz` answers
/// anyone, and a driver's error can name internal hosts, paths and users. The
/// text goes to the log, once per failing probe.
pub(super) async fn ready(Extract(state): Extract<Arc<State>>) -> Response {
    let store = state.store.ready().await;
    let redis = match &state.redis {
        Some(conn) => {
            let mut conn = conn.clone();
            // A write, not a PING: a Redis out of memory (`maxmemory`, `noeviction`)
            // still answers reads but stores no last-access mark and no event.
            Some(super::access::probe_write(&mut conn, state.node_id).await)
        }
        None => None,
    };
    if let Err(e) = &store {
        tracing::warn!(error = %e, "readyz: the store is not ready");
    }
    if let Some(Err(e)) = &redis {
        tracing::warn!(error = %e, "readyz: Redis is not ready");
    }
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let ok = store.is_ok() && redis.as_ref().is_none_or(|r| r.is_ok());
    let body = json!({
        "status": word(ok),
        "store": word(store.is_ok()),
        "redis": redis.map(|r| word(r.is_ok())),
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// How long `/metrics` waits for the store's gauges (workers by status, circuits)
/// before it answers without them: a scrape must not wait on, nor fail with, a
/// store that is down.
const METRICS_STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Prometheus text: counters, plus workers and circuits by state. The in-process
/// counters and histograms are always answered; the gauges read from the store are
/// left out when the store does not answer within [`METRICS_STORE_WAIT`], and
/// `appproxy_coordinator_store_up` says whether they are there.
pub(super) async fn metrics(
    Extract(state): Extract<Arc<State>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
) -> Result<Response, ApiError> {
    let ip = match peer.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4),
        v4 => Some(v4),
    };
    let allowed = ip.is_some_and(|ip| {
        state
            .config
            .coordinator
            .metric_access_allowed_hosts
            .iter()
            .filter_map(|h| appproxy_shared::model::IpNet::parse(h))
            .any(|net| net.contains(ip))
    });
    if !allowed {
        return Err(ApiError::Forbidden);
    }
    use std::fmt::Write as _;
    let m = &state.metrics;
    let from_store = tokio::time::timeout(METRICS_STORE_WAIT, async {
        let (workers, circuits) = tokio::join!(state.store.workers(), state.store.circuit_count());
        Ok::<_, StoreError>((workers?, circuits?))
    })
    .await;
    let from_store = match from_store {
        Ok(Ok(read)) => Some(read),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "metrics: store gauges left out");
            None
        }
        Err(_) => {
            tracing::warn!(wait = ?METRICS_STORE_WAIT, "metrics: store gauges left out: no answer in time");
            None
        }
    };
    let mut out = String::new();
    for (name, help, v) in [
        (
            "appproxy_coordinator_circuits_created_total",
            "Circuits created.",
            &m.circuits_created,
        ),
        (
            "appproxy_coordinator_circuits_removed_total",
            "Circuits removed.",
            &m.circuits_removed,
        ),
        (
            "appproxy_coordinator_worker_ack_timeouts_total",
            "Creations answered 503 for a missing acknowledgement.",
            &m.ack_timeouts,
        ),
        (
            "appproxy_coordinator_events_published_total",
            "Events published to Redis.",
            &m.events_published,
        ),
        (
            "appproxy_coordinator_events_failed_total",
            "Events Redis refused.",
            &m.events_failed,
        ),
        (
            "appproxy_coordinator_workers_lost_total",
            "Workers marked LOST by the heartbeat check.",
            &m.workers_lost,
        ),
        (
            "appproxy_coordinator_circuits_collected_total",
            "Idle circuits removed.",
            &m.circuits_collected,
        ),
        (
            "appproxy_coordinator_circuit_withdrawal_retries_total",
            "Tries at withdrawing a failed or abandoned creation's circuit that the store failed (each tried again, with a back-off, until made).",
            &m.withdrawal_retries,
        ),
        (
            "appproxy_coordinator_overdue_creations_withdrawn_total",
            "Circuits withdrawn by the leader's sweep because their creation was still marked under way past its bound (it failed, and its coordinator stopped before withdrawing it).",
            &m.overdue_creations_withdrawn,
        ),
        (
            "appproxy_coordinator_idle_passes_skipped_total",
            "Idle-collection passes skipped because Redis refused writes (last-access marks not stored).",
            &m.idle_passes_skipped,
        ),
        (
            "appproxy_coordinator_worker_breaker_trips_total",
            "Workers skipped by placement after a missed acknowledgement.",
            &m.breaker_trips,
        ),
        (
            "appproxy_coordinator_placement_retries_total",
            "Creations placed again on another worker or port within the same call.",
            &m.placement_retries,
        ),
        (
            "appproxy_coordinator_worker_deploy_failures_total",
            "Circuits a worker could not deploy (frontend not listening).",
            &m.deploy_failures,
        ),
        (
            "appproxy_coordinator_health_probes_total",
            "Health-check probes sent to inference routes.",
            &super::health::COUNTS[0],
        ),
        (
            "appproxy_coordinator_health_probe_failures_total",
            "Health-check probes that failed (status, timeout, connection).",
            &super::health::COUNTS[1],
        ),
        (
            "appproxy_coordinator_route_health_changes_total",
            "Route health states stored and deployed.",
            &super::health::COUNTS[2],
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
    for (name, help, kind, v) in [
        (
            "appproxy_coordinator_api_connections_refused_total",
            "API connections closed at once: at the connection cap, or past the address's share of it.",
            "counter",
            &state.server.refused,
        ),
        (
            "appproxy_coordinator_api_connections_refused_address_share_total",
            "API connections closed at once because their address held its share of the cap while half of it or more was open (also in appproxy_coordinator_api_connections_refused_total).",
            "counter",
            &state.server.refused_address_share,
        ),
        (
            "appproxy_coordinator_api_connections_timed_out_total",
            "API connections closed for idleness or a slow request head.",
            "counter",
            &state.server.timed_out,
        ),
        (
            "appproxy_coordinator_api_connections",
            "API connections open.",
            "gauge",
            &state.server.open,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP appproxy_coordinator_store_up Whether the store answered this scrape (0: the workers and circuits gauges are left out).\n# TYPE appproxy_coordinator_store_up gauge\nappproxy_coordinator_store_up {}",
        u8::from(from_store.is_some())
    );
    if let Some((workers, _)) = &from_store {
        let _ = writeln!(out, "# HELP appproxy_coordinator_workers Workers by status.\n# TYPE appproxy_coordinator_workers gauge");
        for status in ["ALIVE", "LOST", "TERMINATED"] {
            let n = workers.iter().filter(|w| w.status == status).count();
            let _ = writeln!(
                out,
                "appproxy_coordinator_workers{{status=\"{status}\"}} {n}"
            );
        }
    }
    render_observed(&state, &mut out);
    if let Some((_, circuits)) = from_store {
        let _ = writeln!(out, "# HELP appproxy_coordinator_circuits Circuits stored.\n# TYPE appproxy_coordinator_circuits gauge\nappproxy_coordinator_circuits {circuits}");
    }
    Ok(([("content-type", "text/plain; version=0.0.4")], out).into_response())
}

/// The histograms and labeled counters.
fn render_observed(state: &State, out: &mut String) {
    use crate::metrics::{header, sample};
    appproxy_shared::otlp::render_metrics(out);
    appproxy_shared::logout::render_metrics(out);
    let o = &state.metrics.observed;
    o.api_requests.render(
        out,
        "appproxy_coordinator_http_request_duration_seconds",
        "API request duration (request received to response head), by method and route template.",
    );
    o.creations.render(
        out,
        "appproxy_coordinator_circuit_creations_total",
        "counter",
        "Circuit creations by outcome (created, ack_timeout, worker_tripped, deploy_failed, event_not_published, removed).",
    );
    o.ack_latency.render(
        out,
        "appproxy_coordinator_worker_ack_duration_seconds",
        "Time from publishing a creation to the worker's acknowledgement, by worker authority.",
    );
    o.ack_timeouts.render(
        out,
        "appproxy_coordinator_worker_ack_timeouts_by_worker_total",
        "counter",
        "Creations without an acknowledgement in time, by worker authority.",
    );
    let family = "appproxy_coordinator_store_call_duration_seconds";
    header(
        out,
        family,
        "histogram",
        "Circuit store call duration (deadline included), by engine.",
    );
    let engine = state.store.engine();
    let index = usize::from(engine != "sqlite");
    super::store::CALL_DURATIONS[index].render(out, family, &format!("engine=\"{engine}\""));
    let family = "appproxy_coordinator_redis_reconnects_total";
    header(
        out,
        family,
        "counter",
        "Redis reconnections: subscriptions re-opened, commands retried on a fresh connection.",
    );
    for (i, kind) in ["subscription", "commands"].into_iter().enumerate() {
        sample(
            out,
            family,
            &format!("connection=\"{kind}\""),
            super::events::REDIS_RECONNECTS[i].load(Ordering::Relaxed),
        );
    }
    let family = "appproxy_coordinator_leader";
    header(
        out,
        family,
        "gauge",
        "1 while this node leads the jobs (worker-lost check, idle collection), else 0.",
    );
    let leads = state.redis.is_none() || o.leader.load(Ordering::Relaxed) == 1;
    sample(out, family, "", u8::from(leads));
}

/// `?brief=true` on a registration: answer `{"id"}` only, without the worker model
/// (whose slot list costs a read of every circuit of the worker).
#[derive(Deserialize, Default)]
pub(super) struct BriefQuery {
    #[serde(default)]
    brief: bool,
}

pub(super) async fn register_worker(
    Extract(state): Extract<Arc<State>>,
    Extension(caller): Extension<Caller>,
    WorkerParams(q): WorkerParams<BriefQuery>,
    Body(body): Body<Value>,
) -> Result<Response, ApiError> {
    // A worker's own credential first, for the authority the body names: a caller
    // without one learns nothing of what the registration checks.
    if let Caller::Worker(_) = caller {
        let named = body.get("authority").and_then(Value::as_str);
        caller.may_act_for(&state.config.secrets, named.unwrap_or_default())?;
    }
    let q = q?;
    let registration = validate_worker(&body)?;
    caller.may_act_for(&state.config.secrets, &registration.authority)?;
    // The registration is stored as read: keys this version does not know are
    // kept (bounded), each traffic kind once.
    let stored = serde_json::to_value(&registration)
        .map_err(|e| StoreError::Data(format!("registration: {e}")))?;
    let id = state.store.upsert_worker(&stored).await?;
    tracing::info!(worker = %id, authority = registration.authority, "worker registered");
    warn_of_shared_ports(&state, id, &registration).await;
    withdraw_unserved(&state, id, &registration).await?;
    if q.brief {
        return Ok(Json(Registered { id }).into_response());
    }
    worker_response(&state, id).await
}

/// Warns when another `ALIVE` port worker answers for the same host with ports in
/// common: placement then gives one host:port to two sessions, and two worker
/// processes listening on it with `SO_REUSEPORT` share its connections between
/// two users' apps. Not refused: a worker that replaces one not yet found lost,
/// under a new authority, registers so until the other is. A store failure costs
/// only the warning.
async fn warn_of_shared_ports(state: &State, id: uuid::Uuid, r: &WorkerRegistration) {
    let port_range = |r: &WorkerRegistration| {
        r.port_range
            .filter(|_| r.frontend_mode == appproxy_shared::model::FrontendMode::Port)
    };
    let Some([lo, hi]) = port_range(r) else {
        return;
    };
    let Ok(alive) = state.store.alive_workers().await else {
        return;
    };
    for w in alive {
        let other = &w.registration;
        if w.id == id || !other.hostname.eq_ignore_ascii_case(&r.hostname) {
            continue;
        }
        let Some([olo, ohi]) = port_range(other) else {
            continue;
        };
        if lo <= ohi && olo <= hi {
            tracing::warn!(
                worker = r.authority,
                other = other.authority,
                host = r.hostname,
                from = lo.max(olo),
                to = hi.min(ohi),
                "two workers answer for the same host with ports in common: one host:port may be given to two sessions"
            );
        }
    }
}

/// Withdraws a re-registered worker's circuits its new registration cannot serve
/// (a port outside a narrowed `port_range`, the other frontend mode): they would
/// be reused as links to a port nothing listens on, and count toward their
/// sessions' limit, until idle collection. Creations still under way are left to
/// their own outcome (a reuse checks again).
pub(super) async fn withdraw_unserved(
    state: &State,
    worker: uuid::Uuid,
    registration: &WorkerRegistration,
) -> Result<(), ApiError> {
    // While Redis is out of reach, one failed publish, not one per circuit.
    super::one_publishing_call(withdraw_each_unserved(state, worker, registration)).await
}

async fn withdraw_each_unserved(
    state: &State,
    worker: uuid::Uuid,
    registration: &WorkerRegistration,
) -> Result<(), ApiError> {
    for (_, circuit, port, subdomain) in state.store.held_slots(Some(worker)).await? {
        let Some(why) = super::placement::unserved(registration, port, subdomain.as_deref()) else {
            continue;
        };
        if state.is_creating(circuit) {
            continue;
        }
        tracing::warn!(
            %circuit,
            worker = registration.authority,
            "the re-registered worker no longer serves the circuit ({why}); withdrawn"
        );
        state.remove_circuit(circuit).await?;
    }
    Ok(())
}

/// The registration fields the coordinator relies on, checked before anything is written.
fn validate_worker(body: &Value) -> Result<WorkerRegistration, ApiError> {
    let bad = |m: &str| Err(ApiError::BadRequest(m.to_owned()));
    let mut r = match WorkerRegistration::deserialize(body) {
        Ok(r) => r,
        Err(e) => return bad(&format!("invalid worker registration: {e}")),
    };
    // Kept (on SQLite, which keeps the registration whole) and read back by every
    // placement: 2 MiB of them per worker cost each creation tens of milliseconds
    // on the store's one connection, every other call queued behind it. Past the
    // bound they are not kept, and the registration stands: a newer worker is not
    // refused for fields this coordinator does not use (PostgreSQL keeps none).
    let unknown = serde_json::to_string(&r.extra).map_or(usize::MAX, |s| s.len());
    if unknown > MAX_UNKNOWN_KEYS_BYTES {
        // Some of them, cut to 64 characters each (never within one).
        let keys: Vec<String> = r
            .extra
            .keys()
            .take(8)
            .map(|k| k.chars().take(64).collect())
            .collect();
        tracing::warn!(
            authority = %r.authority.chars().take(255).collect::<String>(),
            bytes = unknown,
            count = r.extra.len(),
            ?keys,
            "a worker registration's keys this coordinator does not know hold more than {MAX_UNKNOWN_KEYS_BYTES} bytes as JSON; they are not kept"
        );
        r.extra.clear();
    }
    // Each kind once: repeated, every placement read them all.
    let mut kinds = Vec::with_capacity(2);
    for kind in r.accepted_traffics.drain(..) {
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    r.accepted_traffics = kinds;
    // Characters, as the message and the store's column count them (not bytes).
    if r.authority.is_empty() || r.authority.chars().count() > 255 {
        return bad("authority is required (1-255 characters)");
    }
    match r.frontend_mode {
        FrontendMode::Port => {
            if r.port_range.is_none_or(|[lo, hi]| lo == 0 || lo > hi) {
                return bad("a port worker needs port_range [low, high] with 1 <= low <= high");
            }
        }
        FrontendMode::Wildcard => {
            if r.wildcard_domain.is_none() {
                return bad("a wildcard worker needs wildcard_domain");
            }
        }
    }
    if r.port_range.is_some_and(|[lo, _]| lo == 0) || r.wildcard_traffic_port == Some(0) {
        return bad("port 0 is no port: port_range and wildcard_traffic_port start at 1");
    }
    // What goes into the URLs the coordinator answers with (`/setup`, endpoints),
    // into the `Location` of a redirect and into logs and events: a CR/LF there
    // broke the answer of every creation placed on the worker (a redirect without
    // its `Location`, a URL with a line break in it), after the circuit was stored.
    for (name, value) in [
        ("authority", Some(r.authority.as_str())),
        ("hostname", Some(r.hostname.as_str())),
        ("wildcard_domain", r.wildcard_domain.as_deref()),
        (
            "traefik_last_used_marker_path",
            r.traefik_last_used_marker_path.as_deref(),
        ),
    ] {
        if value.is_some_and(super::proxy::has_control) {
            return bad(&format!("{name} may not hold control characters"));
        }
    }
    let not_in_a_host = |c: char| c.is_whitespace() || matches!(c, '/' | '\\' | '?' | '#' | '@');
    if r.hostname.is_empty() || r.hostname.chars().any(not_in_a_host) {
        return bad("hostname must be a host name or address (no spaces, '/', '?', '#', '@')");
    }
    // The host goes into URLs as it is (`http://{hostname}:{port}`).
    if !appproxy_shared::wire::url_host_ok(&r.hostname) {
        return bad("hostname must not hold ':': write an IPv6 address in brackets ([2001:db8::5]), and no port");
    }
    if r.wildcard_domain
        .as_deref()
        .is_some_and(|d| d.is_empty() || d.chars().any(not_in_a_host))
    {
        return bad("wildcard_domain must be a domain (no spaces, '/', '?', '#', '@')");
    }
    valid_node_id("node_id", r.node_id.as_deref())?;
    super::fits("hostname", Some(&r.hostname), 1024)?;
    super::fits("wildcard_domain", r.wildcard_domain.as_deref(), 1024)?;
    super::fits(
        "traefik_last_used_marker_path",
        r.traefik_last_used_marker_path.as_deref(),
        1024,
    )?;
    if r.api_port.is_none_or(|p| p == 0 || p > 65535) {
        return bad("api_port must be a port number");
    }
    // Counted as stored: each (key, value) once.
    let filters = r
        .app_filters
        .iter()
        .flatten()
        .map(|f| (&f.key, super::store::filter_value(&f.value)))
        .collect::<std::collections::HashSet<_>>()
        .len();
    if filters > MAX_APP_FILTERS {
        return bad(&format!(
            "app_filters has {filters} entries; a worker has at most {MAX_APP_FILTERS}"
        ));
    }
    for f in r.app_filters.iter().flatten() {
        if f.value.is_null() {
            return bad("app_filters entries need key and value");
        }
        super::fits("app_filters key", Some(&f.key), 96)?;
        super::fits(
            "app_filters value",
            super::store::filter_value(&f.value).as_deref(),
            1024,
        )?;
    }
    Ok(r)
}

/// The wire's `WorkerResponseModel`: registration fields, status, times, slot counts
/// and the slot list (the worker's slots only: no circuit body is read), written in
/// pieces ([`WorkerText`], [`answer_in_pieces`]): one piece with a Content-Length
/// for a worker of a few thousand slots, else streamed, never one buffer of the
/// whole text (some 6 MB for a range of 65,535 ports).
pub(super) async fn worker_response(state: &State, id: uuid::Uuid) -> Result<Response, ApiError> {
    let worker = state
        .store
        .worker(id)
        .await?
        .ok_or(ApiError::NotFound("No such worker."))?;
    let held = state.store.held_slots(Some(id)).await?;
    answer_in_pieces(WorkerText::new(&worker, held, false), "worker")
}

/// One slot of a worker answer (`/api/worker`, `/api/worker/{id}`, `/api/slots`).
/// Its fields in the order these answers have always had them (a `serde_json`
/// map's: sorted by key), written straight to the answer's text: a
/// `serde_json::Value` per slot cost several hundred bytes, for each of the 65,535
/// ports of a port worker.
#[derive(Serialize, Debug, PartialEq)]
struct Slot {
    circuit_id: Option<uuid::Uuid>,
    frontend_mode: &'static str,
    in_use: bool,
    port: Option<u16>,
    subdomain: Option<String>,
}

/// The slots of one worker in the order every answer lists them, made one at a
/// time as they are written: every port of a port worker's range with its first
/// occupant (free ones too unless `in_use_only`), or a wildcard worker's held
/// subdomains in the order held. The only place slots are defined, so the list,
/// the single worker and `/api/slots` cannot drift apart.
///
/// It holds a port worker's occupied ports as sorted `(port, circuit)` pairs (18
/// bytes each), and walks the range beside them: one pass over each, where
/// searching every occupant for every port cost 17 s for one worker answer with
/// 40,000 circuits on a range of 65,535 ports.
enum SlotCursor {
    /// A port worker's ports from `next` to `hi` (all of them, or with
    /// `in_use_only` those in `on` alone), `on` their first occupants, by port.
    Ports {
        next: u32,
        hi: u16,
        on: std::iter::Peekable<std::vec::IntoIter<(u16, uuid::Uuid)>>,
        in_use_only: bool,
    },
    /// A wildcard worker's held slots (those without a subdomain are passed over).
    Held(std::vec::IntoIter<HeldSlot>),
}

impl SlotCursor {
    /// The slots of `w`, whose held slots are `held` (the worker's own, in the
    /// store's order: the first on a port is the one listed).
    fn new(w: &WorkerRow, held: Vec<HeldSlot>, in_use_only: bool) -> Self {
        match (w.registration.frontend_mode, port_range(&w.registration)) {
            (FrontendMode::Port, Some((lo, hi))) => {
                let mut on: Vec<(u16, uuid::Uuid)> = held
                    .into_iter()
                    .filter_map(|(_, id, port, _)| {
                        port.filter(|p| (lo..=hi).contains(p)).map(|p| (p, id))
                    })
                    .collect();
                // Stable, then the first of each port kept: its first occupant.
                on.sort_by_key(|(port, _)| *port);
                on.dedup_by_key(|(port, _)| *port);
                SlotCursor::Ports {
                    next: u32::from(lo),
                    hi,
                    on: on.into_iter().peekable(),
                    in_use_only,
                }
            }
            // Registration refuses it; a row from elsewhere lists no slot.
            (FrontendMode::Port, None) => SlotCursor::Held(Vec::new().into_iter()),
            (FrontendMode::Wildcard, _) => SlotCursor::Held(held.into_iter()),
        }
    }
}

impl Iterator for SlotCursor {
    type Item = Slot;

    fn next(&mut self) -> Option<Slot> {
        let port_slot = |port: u16, circuit: Option<uuid::Uuid>| Slot {
            circuit_id: circuit,
            frontend_mode: "port",
            in_use: circuit.is_some(),
            port: Some(port),
            subdomain: None,
        };
        match self {
            SlotCursor::Ports {
                on,
                in_use_only: true,
                ..
            } => on.next().map(|(port, id)| port_slot(port, Some(id))),
            SlotCursor::Ports { next, hi, on, .. } => {
                let port = u16::try_from(*next).ok().filter(|p| p <= hi)?;
                *next += 1;
                // `on` is sorted and within the range: its next entry is this
                // port's occupant or a later port's.
                let circuit = on.next_if(|(p, _)| *p == port).map(|(_, id)| id);
                Some(port_slot(port, circuit))
            }
            SlotCursor::Held(held) => held.find_map(|(_, id, _, subdomain)| {
                subdomain.map(|subdomain| Slot {
                    circuit_id: Some(id),
                    frontend_mode: "wildcard",
                    in_use: true,
                    port: None,
                    subdomain: Some(subdomain),
                })
            }),
        }
    }
}

/// Slots per piece of a streamed answer ([`SlotText`]): about 200 KB of JSON.
const SLOTS_PER_PIECE: usize = 2048;

/// An answer (or a worker's part of one) around a list of slots, written in pieces
/// as the answer's body is polled for them: `head` and the list's opening, then
/// [`SLOTS_PER_PIECE`] slots at a time, then the list's end and `tail`. A reader
/// that stops reading holds one piece and what `slots` holds (a worker's occupied
/// ports), never the whole text.
struct SlotText<I> {
    /// The text before the list, or what failed to render it (answered in its
    /// place, once).
    head: serde_json::Result<Vec<u8>>,
    slots: I,
    tail: Vec<u8>,
    stage: Stage,
}

/// Where a [`SlotText`] is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Head,
    Slots { written: bool },
    Done,
}

impl<I: Iterator<Item = Slot>> SlotText<I> {
    /// `slots` as a list between `head` and `tail`.
    fn around(head: serde_json::Result<Vec<u8>>, slots: I, tail: Vec<u8>) -> Self {
        SlotText {
            head,
            slots,
            tail,
            stage: Stage::Head,
        }
    }

    /// Up to [`SLOTS_PER_PIECE`] slots into `out`, each but the list's first after
    /// a comma; the list's end and the tail once there are no more.
    fn some_slots(&mut self, out: &mut Vec<u8>, mut written: bool) -> serde_json::Result<()> {
        for _ in 0..SLOTS_PER_PIECE {
            let Some(slot) = self.slots.next() else {
                out.push(b']');
                out.append(&mut self.tail);
                self.stage = Stage::Done;
                return Ok(());
            };
            if written {
                out.push(b',');
            }
            serde_json::to_writer(&mut *out, &slot)?;
            written = true;
        }
        self.stage = Stage::Slots { written };
        Ok(())
    }
}

impl<I: Iterator<Item = Slot>> Iterator for SlotText<I> {
    type Item = serde_json::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut out = Vec::new();
        let wrote = match self.stage {
            Stage::Done => return None,
            Stage::Head => match std::mem::replace(&mut self.head, Ok(Vec::new())) {
                Ok(head) => {
                    out = head;
                    out.push(b'[');
                    self.stage = Stage::Slots { written: false };
                    Ok(())
                }
                Err(e) => Err(e),
            },
            Stage::Slots { written } => self.some_slots(&mut out, written),
        };
        if let Err(e) = wrote {
            self.stage = Stage::Done;
            return Some(Err(e));
        }
        Some(Ok(out))
    }
}

/// One worker's `WorkerResponseModel` in pieces ([`SlotText`]): the summary's keys
/// before `slots` (a registration's own `slots` key included: it is replaced, as
/// it always was, in its place among the others), the list, the keys after it. The
/// same bytes as the `serde_json::Value` it was once built as.
type WorkerText = SlotText<SlotCursor>;

impl WorkerText {
    /// `held`: the worker's held slots; `lead`: a comma before it (not the list's
    /// first worker).
    fn new(w: &WorkerRow, held: Vec<HeldSlot>, lead: bool) -> Self {
        let mut summary = summarise_worker(w, held.len() as u64);
        summary.insert("slots".to_owned(), Value::Null);
        let (mut head, mut tail) = (Vec::new(), Vec::new());
        if lead {
            head.push(b',');
        }
        head.push(b'{');
        let written: serde_json::Result<()> = (|| {
            let mut past = false;
            for (key, value) in &summary {
                if key == "slots" {
                    past = true;
                    continue;
                }
                let out = if past { &mut tail } else { &mut head };
                if past {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key)?;
                out.push(b':');
                serde_json::to_writer(&mut *out, value)?;
                if !past {
                    out.push(b',');
                }
            }
            head.extend_from_slice(br#""slots":"#);
            tail.push(b'}');
            Ok(())
        })();
        SlotText::around(
            written.map(|()| head),
            SlotCursor::new(w, held, false),
            tail,
        )
    }
}

/// Bytes of an answer rendered before its head is sent: an answer that ends
/// within them goes out whole, with a Content-Length, as a buffered answer did;
/// a longer one is streamed (chunked) from there, a piece at a time.
const WHOLE_ANSWER_BYTES: usize = 256 * 1024;

/// `pieces` as a JSON answer ([`WHOLE_ANSWER_BYTES`]). A piece that fails before
/// the head is sent is answered as an error; one that fails after cuts the body off
/// there (the client sees a body that ends early, never valid JSON short of
/// something), and is logged naming `what`.
fn answer_in_pieces<I>(mut pieces: I, what: &'static str) -> Result<Response, ApiError>
where
    I: Iterator<Item = serde_json::Result<Vec<u8>>> + Send + 'static,
{
    let json = [(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    )];
    let mut first = Vec::new();
    // An answer of exactly the limit still ends within it.
    while first.len() <= WHOLE_ANSWER_BYTES {
        match pieces.next() {
            None => return Ok((json, first).into_response()),
            Some(Ok(piece)) => first.extend(piece),
            Some(Err(e)) => return Err(StoreError::from(e).into()),
        }
    }
    let rest = pieces
        .map(move |piece| {
            piece.map_err(|e| {
                tracing::warn!(error = %e, "{what} answer cut off: not written");
                std::io::Error::other(e)
            })
        })
        .scan(false, |failed, piece| {
            if *failed {
                return None;
            }
            *failed = piece.is_err();
            Some(piece)
        });
    let text = std::iter::once(Ok(first)).chain(rest);
    Ok((
        json,
        axum::body::Body::from_stream(futures_util::stream::iter(text)),
    )
        .into_response())
}

/// The `WorkerResponseModel` without its slot list: what a count of the worker's
/// circuits (`occupied`) is enough for.
fn summarise_worker(w: &WorkerRow, occupied: u64) -> serde_json::Map<String, Value> {
    // A registration is stored only once it read as one, an object; anything else
    // (which indexing by key would panic on) leaves the registration's keys out.
    let mut out = w.body.as_object().cloned().unwrap_or_default();
    out.insert("id".to_owned(), json!(w.id));
    out.insert("status".to_owned(), json!(w.status));
    out.insert("nodes".to_owned(), json!(w.nodes));
    out.insert("created_at".to_owned(), json!(w.created_at));
    out.insert("updated_at".to_owned(), json!(w.updated_at));
    out.insert("occupied_slots".to_owned(), json!(occupied));
    out.insert(
        "available_slots".to_owned(),
        json!(match port_range(&w.registration) {
            Some((lo, hi)) if w.registration.frontend_mode == FrontendMode::Port =>
                i64::from(hi - lo) + 1 - occupied as i64,
            _ => -1,
        }),
    );
    out
}

/// `held` grouped by worker, each worker's in their order, in one pass (one
/// worker's among many would be a pass per worker).
fn held_by_worker(held: Vec<HeldSlot>) -> std::collections::HashMap<uuid::Uuid, Vec<HeldSlot>> {
    let mut by = std::collections::HashMap::<uuid::Uuid, Vec<HeldSlot>>::new();
    for slot in held {
        by.entry(slot.0).or_default().push(slot);
    }
    by
}

pub(super) async fn get_worker(
    Extract(state): Extract<Arc<State>>,
    Id(id): Id<uuid::Uuid>,
) -> Result<Response, ApiError> {
    worker_response(&state, id).await
}

/// The rule for an HA node's name, the same wherever one is given (`node_id` of a
/// registration, `?node=` of a heartbeat or deregistration): at most 1024
/// characters, no control characters (it goes into the store, logs and answers).
fn valid_node_id(name: &str, value: Option<&str>) -> Result<(), ApiError> {
    if value.is_some_and(super::proxy::has_control) {
        return Err(ApiError::BadRequest(format!(
            "{name} may not hold control characters"
        )));
    }
    super::fits(name, value, 1024)
}

/// `?node=<node_id>`: which HA node of the worker calls (heartbeat, deregistration);
/// `&brief=true`: answer without the worker model (whose slot list costs a read of
/// every circuit of the worker), as the product's agent asks on every heartbeat.
#[derive(Deserialize, Default)]
pub(super) struct NodeQuery {
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    brief: bool,
}

/// Whether `caller` may act for the worker `id` ([`Caller::may_act_for`]); the
/// store is read only for a worker's own credential. A worker unknown to the store
/// has no authority, and no worker credential acts for it: 401, as for another
/// worker's, so a credential does not tell which IDs exist.
async fn acting_for(state: &State, caller: &Caller, id: uuid::Uuid) -> Result<(), ApiError> {
    if let Caller::Manager = caller {
        return Ok(());
    }
    let authority = state.authority_of(Some(id)).await?;
    caller.may_act_for(&state.config.secrets, &authority)
}

pub(super) async fn heartbeat(
    Extract(state): Extract<Arc<State>>,
    Extension(caller): Extension<Caller>,
    Id(id): Id<uuid::Uuid>,
    WorkerParams(q): WorkerParams<NodeQuery>,
) -> Result<Response, ApiError> {
    acting_for(&state, &caller, id).await?;
    let q = q?;
    valid_node_id("node", q.node.as_deref())?;
    let heard = match state.store.heartbeat_node(id, q.node.as_deref()).await {
        Err(StoreError::Conflict(why)) => return Err(ApiError::NodeLeft(why)),
        Err(e) => {
            // Sent, not missed: the worker-lost check waits past it.
            crate::store::note_heartbeat_failure(&e);
            return Err(e.into());
        }
        Ok(heard) => heard,
    };
    if !heard {
        return Err(ApiError::NotFound("No such worker."));
    }
    if let Some(conn) = &state.redis {
        // As the original: `proxy-worker.last_seen` {authority: epoch}, 2-day TTL.
        let authority = state.authority_of(Some(id)).await?;
        let now = appproxy_shared::jwt::now_epoch();
        let mut conn = conn.clone();
        let written: redis::RedisResult<()> = super::bounded(
            redis::pipe()
                .cmd("HSET")
                .arg("proxy-worker.last_seen")
                .arg(authority)
                .arg(format!("{now:.6}"))
                .ignore()
                .cmd("EXPIRE")
                .arg("proxy-worker.last_seen")
                .arg(access::LAST_ACCESS_TTL_SECS)
                .ignore()
                .query_async(&mut conn),
        )
        .await;
        if let Err(e) = written {
            tracing::warn!(error = %e, "proxy-worker.last_seen not written");
        }
    }
    if q.brief {
        // The idle pass's clock, for the worker's marks (see `Heartbeat::clock`).
        let clock = state
            .store
            .clock_ahead()
            .await
            .ok()
            .map(|ahead| appproxy_shared::jwt::now_epoch() + ahead);
        return Ok(Json(Heartbeat {
            success: true,
            id,
            clock,
        })
        .into_response());
    }
    worker_response(&state, id).await
}

pub(super) async fn deregister_worker(
    Extract(state): Extract<Arc<State>>,
    Extension(caller): Extension<Caller>,
    Id(id): Id<uuid::Uuid>,
    WorkerParams(q): WorkerParams<NodeQuery>,
) -> Result<Json<Success>, ApiError> {
    acting_for(&state, &caller, id).await?;
    let q = q?;
    valid_node_id("node", q.node.as_deref())?;
    if !state.store.deregister_node(id, q.node.as_deref()).await? {
        return Err(ApiError::NotFound("No such worker."));
    }
    tracing::info!(worker = %id, "worker deregistered");
    state.failed_ports.forget(id);
    // Its last node gone, the worker deploys nothing more: creations waiting for its
    // acknowledgement stop waiting and are placed elsewhere (they waited out the
    // whole `worker_ack_timeout_secs` for a worker that had said it was leaving).
    if let Ok(Some(w)) = state.store.worker(id).await {
        if w.status != "ALIVE" {
            let stopped = state.acks.trip_with(
                &w.registration.authority,
                &crate::events::AckOutcome::WorkerLeft,
            );
            if stopped > 0 {
                tracing::info!(worker = %id, waiting = stopped, "creations waiting on the worker that left are placed elsewhere");
            }
        }
    }
    Ok(Json(Success::YES))
}

/// `GET /api/worker`: `{"workers":[...]}`, every worker's `WorkerResponseModel`
/// ([`WorkerText`]). The workers and the slots held are read before the head
/// (a store failure is answered with its status, as anywhere); the body is then
/// written a piece at a time ([`answer_in_pieces`]), each rendered when the body is
/// polled for it, so one answer holds one piece (about 200 KB) and the rows read,
/// never a worker's whole text (some 6 MB for a range of 65,535 ports), let alone
/// the whole answer (242 MB for 42 such workers, built as a `Value` tree, took
/// 5 GB).
pub(super) async fn list_workers(
    Extract(state): Extract<Arc<State>>,
) -> Result<Response, ApiError> {
    let workers = state.store.workers().await?;
    let mut by_worker = held_by_worker(state.store.held_slots(None).await?);
    let rendered = workers.into_iter().enumerate().flat_map(move |(i, w)| {
        let held = by_worker.remove(&w.id).unwrap_or_default();
        WorkerText::new(&w, held, i > 0)
    });
    let text = std::iter::once(Ok(br#"{"workers":["#.to_vec()))
        .chain(rendered)
        .chain(std::iter::once(Ok(b"]}".to_vec())));
    answer_in_pieces(text, "worker list")
}

/// How a worker reads its circuit set: the whole list (the original's call), one
/// page of it, or only what changed after a revision.
#[derive(Deserialize, Default)]
pub(super) struct CircuitsQuery {
    /// Only what changed after this revision.
    #[serde(default)]
    since: Option<u64>,
    /// A page: the circuits after this ID (empty: from the start).
    #[serde(default)]
    after: Option<String>,
    /// Entries per page or per change list.
    #[serde(default)]
    limit: Option<usize>,
}

use appproxy_shared::wire::MAX_CIRCUITS_PER_ANSWER;

/// `GET /api/worker/{id}/circuits`: without a query the whole set (the original's
/// answer, with the worker's `revision` added); with `?since=R` what changed after
/// revision `R` (`{"revision","changes","removed"}`, or `{"revision","resync":true}`
/// when only the whole set will do); with `?after=<id>&limit=N` one page in ID order
/// (`{"revision","circuits","next"}`). The last two carry `origins` and `traces`
/// (the trace context behind each circuit's latest change).
pub(super) async fn worker_circuits(
    Extract(state): Extract<Arc<State>>,
    Extension(caller): Extension<Caller>,
    Id(id): Id<uuid::Uuid>,
    WorkerParams(q): WorkerParams<CircuitsQuery>,
) -> Result<Response, ApiError> {
    acting_for(&state, &caller, id).await?;
    let q = q?;
    let limit = q
        .limit
        .unwrap_or(MAX_CIRCUITS_PER_ANSWER)
        .clamp(1, MAX_CIRCUITS_PER_ANSWER);
    if let Some(since) = q.since {
        return Ok(Json(worker_changes(&state, id, since, limit).await?).into_response());
    }
    if q.after.is_some() || q.limit.is_some() {
        let after = match q.after.as_deref().filter(|a| !a.is_empty()) {
            Some(a) => Some(uuid::Uuid::parse_str(a).map_err(|_| {
                ApiError::BadRequest("after must be a circuit ID (or empty)".into())
            })?),
            None => None,
        };
        return Ok(Json(worker_page(&state, id, after, limit).await?).into_response());
    }
    let revision = state.store.revision(id).await?.unwrap_or(0);
    let circuits = state.store.circuits(Some(id)).await?;
    let circuits = circuits
        .into_iter()
        .map(|(circuit, origin)| CircuitWithOrigin {
            circuit,
            origin_request_id: origin.request_id,
        })
        .collect();
    Ok(Json(WholeSet { circuits, revision }).into_response())
}

/// One page of a worker's set in ID order, after `after`, with its revision: what
/// `?after=…&limit=N` answers and what an embedded worker reads. At most `limit`
/// circuits and at most [`super::store::ANSWER_BYTES`] of JSON (at least one
/// circuit): a page cut short by either says where the next one starts.
pub(super) async fn worker_page(
    state: &State,
    id: uuid::Uuid,
    after: Option<uuid::Uuid>,
    limit: usize,
) -> Result<CircuitSet, StoreError> {
    let (revision, mut page) = state.store.circuits_page(id, after, limit).await?;
    let full = page.len() >= limit;
    let fits = super::store::rows_within(&page, super::store::ANSWER_BYTES);
    let cut = fits < page.len();
    page.truncate(fits);
    let next = (full || cut)
        .then(|| page.last().map(|(c, _)| c.id))
        .flatten();
    let (circuits, origins, traces) = split_origins(page);
    Ok(CircuitSet::page(revision, circuits, origins, next).with_traces(traces))
}

/// What changed in a worker's set after revision `since`: what `?since=R` answers
/// and what an embedded worker reads.
pub(super) async fn worker_changes(
    state: &State,
    id: uuid::Uuid,
    since: u64,
    limit: usize,
) -> Result<CircuitSet, StoreError> {
    Ok(match state.store.changes_since(id, since, limit).await? {
        super::store::Changes::Resync { revision } => CircuitSet::resync(revision),
        super::store::Changes::Since {
            revision,
            upserts,
            removed,
            more,
        } => {
            let (circuits, origins, mut traces) = split_origins(upserts);
            // A removal is the latest change of its circuit: its trace context goes
            // in `traces` under the circuit's ID, the removing request's ID in
            // `removed_by`.
            let mut removed_by = std::collections::BTreeMap::new();
            let removed = removed
                .into_iter()
                .map(|(id, by)| {
                    if let Some(request) = by.request_id {
                        removed_by.insert(id, request);
                    }
                    if let Some(t) = &by.trace {
                        traces.insert(id, ChangeTrace::from(t));
                    }
                    id
                })
                .collect();
            CircuitSet::changes(revision, circuits, origins, removed, more)
                .with_traces(traces)
                .with_removed_by(removed_by)
        }
    })
}

/// Circuits, the origin request IDs of those that have one, and the trace context
/// behind the latest change of those that have one (stored values that do not read
/// as one are none: [`super::store::Origin`]).
fn split_origins(
    rows: Vec<super::store::CircuitRow>,
) -> (
    Vec<appproxy_shared::model::Circuit>,
    std::collections::BTreeMap<uuid::Uuid, String>,
    std::collections::BTreeMap<uuid::Uuid, ChangeTrace>,
) {
    let mut origins = std::collections::BTreeMap::new();
    let mut traces = std::collections::BTreeMap::new();
    let circuits = rows
        .into_iter()
        .map(|(c, o)| {
            if let Some(id) = o.request_id {
                origins.insert(c.id, id);
            }
            if let Some(t) = &o.trace {
                traces.insert(c.id, ChangeTrace::from(t));
            }
            c
        })
        .collect();
    (circuits, origins, traces)
}

pub(super) async fn get_circuit(
    Extract(state): Extract<Arc<State>>,
    Id(id): Id<uuid::Uuid>,
) -> Result<Json<Value>, ApiError> {
    let (circuit, _) = state
        .store
        .circuit(id)
        .await?
        .ok_or(ApiError::NotFound("E00002: No such circuit."))?;
    Ok(Json(
        serde_json::to_value(circuit).map_err(StoreError::from)?,
    ))
}

/// The circuit plus `requests`, `last_access` (milliseconds; the creation time when
/// never accessed) and `ttl` (seconds left before idle collection; null for inference).
pub(super) async fn circuit_statistics(
    Extract(state): Extract<Arc<State>>,
    Id(id): Id<uuid::Uuid>,
) -> Result<Json<Value>, ApiError> {
    let (circuit, _) = state
        .store
        .circuit(id)
        .await?
        .ok_or(ApiError::NotFound("E00002: No such circuit."))?;
    let (last, requests) = state.marks.of(id).await;
    let created = circuit
        .created_at
        .as_deref()
        .and_then(access::parse_rfc3339)
        .unwrap_or(0.0);
    let last = last.unwrap_or(created);
    let now = appproxy_shared::jwt::now_epoch();
    let ttl = (circuit.app_mode == AppMode::Interactive).then(|| {
        state
            .config
            .coordinator
            .unused_circuit_collection_timeout_secs as i64
            - (now - last).max(0.0) as i64
    });
    let mut v = serde_json::to_value(&circuit).map_err(StoreError::from)?;
    v["requests"] = json!(requests.unwrap_or(0));
    v["last_access"] = json!((last * 1000.0) as i64);
    v["ttl"] = json!(ttl);
    Ok(Json(v))
}

pub(super) async fn delete_circuit(
    Extract(state): Extract<Arc<State>>,
    Id(id): Id<uuid::Uuid>,
) -> Result<Json<Value>, ApiError> {
    if !state.remove_circuit(id).await? {
        return Err(ApiError::NotFound("E00002: No such circuit."));
    }
    Ok(Json(json!({"success": true})))
}

#[derive(Deserialize, Default)]
pub(super) struct BulkQuery {
    #[serde(default)]
    circuit_ids: Option<String>,
}

/// The most circuits one bulk removal names: each costs a store call (about 1 ms on
/// PostgreSQL, unknown ones too), and the call has no deadline of its own. A session
/// holds at most 32 circuits, an endpoint's routes far fewer than this.
pub(super) const MAX_BULK_REMOVALS: usize = 4096;

/// The most app filters one worker registers: every placement reads the filters of
/// every ALIVE worker (a filter names a domain, a group or an access key: a worker
/// has a few).
pub(super) const MAX_APP_FILTERS: usize = 64;

/// The most bytes (as JSON) a worker's registration may carry in keys this
/// coordinator does not know: a newer worker's few fields, kept as sent.
const MAX_UNKNOWN_KEYS_BYTES: usize = 4096;

/// `DELETE /api/circuit/_/bulk`: `{"circuit_ids": [...]}`, or `?circuit_ids=a,b`.
/// Every ID is checked before anything is removed (at most [`MAX_BULK_REMOVALS`]
/// distinct ones, each removed once); unknown ones are skipped.
pub(super) async fn bulk_delete(
    Extract(state): Extract<Arc<State>>,
    Params(q): Params<BulkQuery>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let ids: Vec<uuid::Uuid> = if body.is_empty() {
        q.circuit_ids
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| uuid::Uuid::parse_str(s.trim()))
            .collect::<Result<_, _>>()
            .map_err(|e| ApiError::BadRequest(format!("circuit_ids: {e}")))?
    } else {
        #[derive(Deserialize)]
        struct B {
            circuit_ids: Vec<uuid::Uuid>,
        }
        serde_json::from_slice::<B>(&body)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?
            .circuit_ids
    };
    let mut seen = std::collections::HashSet::with_capacity(ids.len().min(MAX_BULK_REMOVALS));
    let ids: Vec<uuid::Uuid> = ids.into_iter().filter(|id| seen.insert(*id)).collect();
    if ids.len() > MAX_BULK_REMOVALS {
        return Err(ApiError::BadRequest(format!(
            "circuit_ids names {} circuits; one call removes at most {MAX_BULK_REMOVALS}",
            ids.len()
        )));
    }
    // While Redis is out of reach, one failed publish, not one per circuit.
    super::one_publishing_call(async {
        for id in ids {
            state.remove_circuit(id).await?;
        }
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok(Json(json!({"success": true})))
}

#[derive(Deserialize)]
pub(super) struct SlotsQuery {
    #[serde(default)]
    wsproxy_host: Option<String>,
    #[serde(default)]
    in_use: Option<String>,
}

/// `GET /api/slots?wsproxy_host=<authority>&in_use=true`: `{"slots":[...]}`, the
/// named worker's slots, or every worker's in turn ([`SlotCursor`]), written in
/// pieces ([`answer_in_pieces`]) as the worker list is.
pub(super) async fn slots(
    Extract(state): Extract<Arc<State>>,
    Params(q): Params<SlotsQuery>,
) -> Result<Response, ApiError> {
    let in_use_only = !matches!(q.in_use.as_deref(), Some("false" | "False" | "0"));
    let named: Vec<WorkerRow> = state
        .store
        .workers()
        .await?
        .into_iter()
        .filter(|w| {
            q.wsproxy_host
                .as_deref()
                .is_none_or(|h| w.registration.authority == h)
        })
        .collect();
    // One worker named: its slots alone (by index); else every worker's.
    let held = match (&q.wsproxy_host, named.as_slice()) {
        (Some(_), []) => Vec::new(),
        (Some(_), [one]) => state.store.held_slots(Some(one.id)).await?,
        _ => state.store.held_slots(None).await?,
    };
    let mut by_worker = held_by_worker(held);
    let slots = named.into_iter().flat_map(move |w| {
        let held = by_worker.remove(&w.id).unwrap_or_default();
        SlotCursor::new(&w, held, in_use_only)
    });
    let text = SlotText::around(Ok(br#"{"slots":"#.to_vec()), slots, b"}".to_vec());
    answer_in_pieces(text, "slots")
}

pub(super) async fn health_status(
    Extract(state): Extract<Arc<State>>,
) -> Result<Json<Value>, ApiError> {
    // Counts are all it says: one aggregate query, no circuit read.
    let workers = state.store.workers().await?;
    let counts = state.store.circuit_counts().await?;
    let list: Vec<Value> = workers
        .iter()
        .map(|w| {
            let d = summarise_worker(w, counts.get(&w.id).copied().unwrap_or(0));
            let key = |k: &str| d.get(k).cloned().unwrap_or(Value::Null);
            json!({"authority": key("authority"), "available_slots": key("available_slots"),
                "occupied_slots": key("occupied_slots"), "ha_setup": w.nodes > 1, "status": w.status})
        })
        .collect();
    Ok(Json(json!({
        "coordinator_version": env!("CARGO_PKG_VERSION"),
        "appproxy_api_version": "v2",
        "store": state.store.engine(),
        "workers": list,
    })))
}

/// The protocol of a new circuit and of its route, from the query's protocol.
pub(super) fn protocols(name: &str) -> Result<(ProxyProtocol, ProxyProtocol), ApiError> {
    Ok(match name {
        "http" => (ProxyProtocol::Http, ProxyProtocol::Http),
        "preopen" => (ProxyProtocol::Http, ProxyProtocol::Preopen),
        "grpc" => (ProxyProtocol::Grpc, ProxyProtocol::Grpc),
        "h2" | "http2" => (ProxyProtocol::Http2, ProxyProtocol::Http2),
        "tcp" | "vnc" | "rdp" => (ProxyProtocol::Tcp, ProxyProtocol::Tcp),
        other => {
            return Err(ApiError::BadRequest(format!(
                "unsupported protocol {other:?}"
            )))
        }
    })
}

/// `GET /v1/api/worker` (older managers): one summary per worker.
pub(super) async fn v1_workers(
    Extract(state): Extract<Arc<State>>,
) -> Result<Json<Value>, ApiError> {
    let workers = state.store.workers().await?;
    let counts = state.store.circuit_counts().await?;
    let out: Vec<Value> = workers
        .iter()
        .map(|w| {
            let b = &w.registration;
            let range = port_range(b);
            let api_port = b.api_port.map_or_else(|| "null".to_owned(), |p| p.to_string());
            json!({
                "authority": b.authority,
                "endpoint": format!("{}://{}:{api_port}", if b.https() { "https" } else { "http" }, b.hostname),
                "total_slots": range.map_or(-1, |(lo, hi)| i64::from(hi - lo) + 1),
                "ports_in_use": counts.get(&w.id).copied().unwrap_or(0),
                "min_range": range.map(|r| r.0),
                "max_range": range.map(|r| r.1),
                "wildcard_domain": b.wildcard_domain,
                "created": w.created_at,
                "updated": w.updated_at,
            })
        })
        .collect();
    Ok(Json(Value::Array(out)))
}

/// One row of `GET /v1/api/slots`, written straight to the answer's text — never a
/// `serde_json::Value` (the rows were built as a `Vec<Value>` and the whole answer
/// in memory: 40,000 circuits with 1,000-character `args` made a 257 MB answer and
/// a 628 MB peak). The keys in the order the answer always had them: sorted, as a
/// `Value`'s are.
#[derive(Serialize)]
struct V1Slot<'a> {
    #[serde(rename = "circuit__allowed_client_ips")]
    allowed_client_ips: Option<String>,
    #[serde(rename = "circuit__app")]
    app: &'a Option<String>,
    #[serde(rename = "circuit__arguments")]
    arguments: &'a Option<String>,
    #[serde(rename = "circuit__created")]
    created: &'a Option<String>,
    #[serde(rename = "circuit__envs")]
    envs: String,
    #[serde(rename = "circuit__modified")]
    modified: &'a Option<String>,
    #[serde(rename = "circuit__open_to_public")]
    open_to_public: bool,
    #[serde(rename = "circuit__session_id")]
    session_id: Option<&'a uuid::Uuid>,
    port: Option<u16>,
    rel: uuid::Uuid,
    subdomain: &'a Option<String>,
    #[serde(rename = "worker__authority")]
    worker_authority: Option<&'a str>,
    wsproxy_version: &'static str,
}

impl<'a> V1Slot<'a> {
    fn of(
        c: &'a appproxy_shared::model::Circuit,
        authorities: &'a std::collections::HashMap<uuid::Uuid, String>,
    ) -> Self {
        Self {
            allowed_client_ips: (!c.allowed_client_ips.is_empty())
                .then(|| c.allowed_client_ips.join(",")),
            app: &c.app,
            arguments: &c.arguments,
            created: &c.created_at,
            envs: serde_json::to_string(&c.envs).unwrap_or_else(|_| "{}".into()),
            modified: &c.updated_at,
            open_to_public: c.open_to_public,
            session_id: c.session_ids.first(),
            port: c.port,
            rel: c.id,
            subdomain: &c.subdomain,
            worker_authority: c
                .worker
                .and_then(|w| authorities.get(&w))
                .map(String::as_str),
            wsproxy_version: "v2",
        }
    }
}

/// Rows of `/v1/api/slots` rendered into one piece of its answer.
const V1_SLOTS_PER_PIECE: usize = 256;

/// `rows` as the text of `/v1/api/slots`' JSON array, [`V1_SLOTS_PER_PIECE`] rows a
/// piece, each rendered when it is asked for; a row is dropped once written.
fn v1_slot_pieces(
    rows: Vec<super::store::CircuitRow>,
    authorities: std::collections::HashMap<uuid::Uuid, String>,
) -> impl Iterator<Item = serde_json::Result<Vec<u8>>> + Send + 'static {
    let mut rows = rows.into_iter();
    let (mut written, mut ended) = (0usize, false);
    std::iter::from_fn(move || {
        if ended {
            return None;
        }
        let mut piece = Vec::new();
        if written == 0 {
            piece.push(b'[');
        }
        for (n, (c, _)) in rows.by_ref().enumerate() {
            if written > 0 {
                piece.push(b',');
            }
            written += 1;
            if let Err(e) = serde_json::to_writer(&mut piece, &V1Slot::of(&c, &authorities)) {
                ended = true;
                return Some(Err(e));
            }
            if n + 1 == V1_SLOTS_PER_PIECE {
                return Some(Ok(piece));
            }
        }
        piece.push(b']');
        ended = true;
        Some(Ok(piece))
    })
}

/// `GET /v1/api/slots` (older managers): one row per circuit, flattened, oldest
/// first. Written in pieces ([`answer_in_pieces`]) as `/api/slots` is: the rows are
/// read before the head (a store failure is still answered with its status), each
/// worker's authority found in a map (a linear search per circuit before), then
/// the text made a piece at a time — the answer is never whole in memory.
pub(super) async fn v1_slots(Extract(state): Extract<Arc<State>>) -> Result<Response, ApiError> {
    let authorities: std::collections::HashMap<uuid::Uuid, String> = state
        .store
        .workers()
        .await?
        .into_iter()
        .map(|w| (w.id, w.registration.authority))
        .collect();
    let circuits = state.store.circuits(None).await?;
    answer_in_pieces(v1_slot_pieces(circuits, authorities), "v1 slots")
}

#[cfg(test)]
mod tests {
    use super::{
        answer_in_pieces, held_by_worker, validate_worker, SlotCursor, SlotText, WorkerText,
        WHOLE_ANSWER_BYTES,
    };
    use crate::store::{HeldSlot, WorkerRow};
    use axum::body::HttpBody as _;
    use serde_json::json;

    /// `/v1/api/slots` as it was built before it was written in pieces: a `Value`
    /// per row, found its worker by a linear search.
    fn v1_as_values(
        rows: &[crate::store::CircuitRow],
        workers: &[(uuid::Uuid, String)],
    ) -> Vec<u8> {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|(c, _)| {
                let authority = workers
                    .iter()
                    .find(|w| Some(w.0) == c.worker)
                    .map(|w| serde_json::Value::from(w.1.as_str()))
                    .unwrap_or(serde_json::Value::Null);
                json!({
                    "rel": c.id,
                    "port": c.port,
                    "subdomain": c.subdomain,
                    "wsproxy_version": "v2",
                    "worker__authority": authority,
                    "circuit__app": c.app,
                    "circuit__session_id": c.session_ids.first(),
                    "circuit__open_to_public": c.open_to_public,
                    "circuit__allowed_client_ips": (!c.allowed_client_ips.is_empty()).then(|| c.allowed_client_ips.join(",")),
                    "circuit__envs": serde_json::to_string(&c.envs).unwrap_or_else(|_| "{}".into()),
                    "circuit__arguments": c.arguments,
                    "circuit__created": c.created_at,
                    "circuit__modified": c.updated_at,
                })
            })
            .collect();
        serde_json::to_vec(&serde_json::Value::Array(out)).expect("json")
    }

    /// The rows written in pieces make the bytes the `Value` array made, across
    /// piece boundaries, for circuits with and without a known worker, fields set
    /// and unset; no answer is one piece larger than its share of rows.
    #[test]
    fn v1_slots_are_written_as_their_value_trees_were() {
        let workers = vec![
            (uuid::Uuid::from_u128(1), "worker-1".to_owned()),
            (uuid::Uuid::from_u128(2), "worker-2".to_owned()),
        ];
        let row = |i: u128| -> crate::store::CircuitRow {
            let circuit = match i % 3 {
                0 => json!({"id": uuid::Uuid::from_u128(1000 + i)}),
                1 => json!({"id": uuid::Uuid::from_u128(1000 + i), "worker": workers[0].0,
                    "app": "jupyter", "port": 10205, "open_to_public": true,
                    "allowed_client_ips": ["10.0.0.1", "10.0.1.0/24"],
                    "envs": {"B": "2", "A": 1}, "arguments": "--x \"y\"\n",
                    "session_ids": [uuid::Uuid::from_u128(7)],
                    "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-02T00:00:00Z"}),
                _ => {
                    json!({"id": uuid::Uuid::from_u128(1000 + i), "worker": uuid::Uuid::from_u128(9),
                    "subdomain": "svc", "app_mode": "inference"})
                }
            };
            (
                serde_json::from_value(circuit).expect("circuit"),
                Default::default(),
            )
        };
        let map: std::collections::HashMap<uuid::Uuid, String> = workers.iter().cloned().collect();
        for n in [0u128, 1, 3, 255, 256, 257, 600] {
            let rows: Vec<_> = (0..n).map(row).collect();
            let before = v1_as_values(&rows, &workers);
            let pieces: Vec<Vec<u8>> = super::v1_slot_pieces(rows, map.clone())
                .collect::<Result<_, _>>()
                .expect("pieces");
            assert_eq!(
                pieces.len(),
                n as usize / super::V1_SLOTS_PER_PIECE + 1,
                "{n}"
            );
            let text: Vec<u8> = pieces.concat();
            assert_eq!(
                String::from_utf8_lossy(&text),
                String::from_utf8_lossy(&before),
                "{n}"
            );
        }
    }

    /// The worker answer as it was built before it was written slot by slot: a
    /// `serde_json::Value` per slot, in the summary's map. The text written now is
    /// byte for byte that one's.
    fn as_values(w: &WorkerRow, held: &[HeldSlot]) -> serde_json::Value {
        let mut out = w.body.clone();
        for (k, v) in [
            ("id", json!(w.id)),
            ("status", json!(w.status)),
            ("nodes", json!(w.nodes)),
            ("created_at", json!(w.created_at)),
            ("updated_at", json!(w.updated_at)),
            ("occupied_slots", json!(held.len())),
        ] {
            out[k] = v;
        }
        let mut slots = Vec::new();
        if w.registration.frontend_mode == appproxy_shared::model::FrontendMode::Port {
            let [lo, hi] = w.registration.port_range.expect("range");
            out["available_slots"] = json!(i64::from(hi - lo) + 1 - held.len() as i64);
            for port in lo..=hi {
                let circuit = held.iter().find(|h| h.2 == Some(port)).map(|h| h.1);
                slots.push(json!({"frontend_mode": "port", "in_use": circuit.is_some(),
                    "port": port, "subdomain": null, "circuit_id": circuit}));
            }
        } else {
            out["available_slots"] = json!(-1);
            for (_, id, _, subdomain) in held.iter().filter(|h| h.3.is_some()) {
                slots.push(
                    json!({"frontend_mode": "wildcard", "in_use": true, "port": null,
                    "subdomain": subdomain, "circuit_id": id}),
                );
            }
        }
        out["slots"] = json!(slots);
        out
    }

    /// A worker row of ID 7 with the registration `body`.
    fn row(body: serde_json::Value) -> WorkerRow {
        WorkerRow::new(
            uuid::Uuid::from_u128(7),
            body,
            "ALIVE".into(),
            2,
            "2026-01-01T00:00:00Z".into(),
            "2026-01-02T00:00:00Z".into(),
        )
        .expect("row")
    }

    /// A port worker of the range `[lo, hi]`.
    fn port_worker(lo: u16, hi: u16) -> WorkerRow {
        row(
            json!({"authority": "w", "frontend_mode": "port", "hostname": "h",
            "api_port": 1, "port_range": [lo, hi]}),
        )
    }

    /// The body of an answer made by [`answer_in_pieces`], and whether it went out
    /// whole with its length known (a Content-Length) rather than streamed.
    fn answered(
        pieces: impl Iterator<Item = serde_json::Result<Vec<u8>>> + Send + 'static,
    ) -> (String, bool) {
        let response = answer_in_pieces(pieces, "test").expect("answered");
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "as the buffered answers said"
        );
        let whole = response.body().size_hint().exact().is_some();
        let body = read_body(response).expect("body");
        (String::from_utf8(body.to_vec()).expect("utf-8"), whole)
    }

    /// An answer's body read to its end, or the error that cut it off.
    fn read_body(response: axum::response::Response) -> Result<axum::body::Bytes, axum::Error> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(axum::body::to_bytes(response.into_body(), usize::MAX))
    }

    #[test]
    fn worker_answers_are_written_as_their_value_trees_were() {
        let id = uuid::Uuid::from_u128(7);
        let c = |n: u128| uuid::Uuid::from_u128(100 + n);
        // A key of the registration's own (`zz_unknown`, and `slots`, replaced as it
        // always was) keeps its place among the others.
        let port = row(
            json!({"authority": "w", "frontend_mode": "port", "hostname": "h",
            "api_port": 1, "port_range": [20, 29], "slots": "theirs", "zz_unknown": [1]}),
        );
        let held: Vec<HeldSlot> = vec![
            (id, c(1), Some(22), None),
            (id, c(2), Some(29), None),
            (id, c(3), Some(99), None),
        ];
        let wildcard = row(json!({"authority": "w", "frontend_mode": "wildcard",
            "hostname": "h", "api_port": 1, "wildcard_domain": ".apps.test"}));
        let held_wildcard: Vec<HeldSlot> = vec![
            (id, c(4), None, Some("a".into())),
            (id, c(5), None, None),
            (id, c(6), None, Some("b\"c".into())),
        ];
        // A whole range, past one piece and past one answer's buffer; a range of
        // one port; no slot held.
        let whole = port_worker(1, 65535);
        let one = port_worker(65535, 65535);
        let held_whole: Vec<HeldSlot> = vec![
            (id, c(7), Some(1), None),
            (id, c(8), Some(4096), None),
            (id, c(9), Some(65535), None),
            (id, c(10), Some(4096), None),
        ];
        let cases = [
            (&port, held.clone()),
            (&wildcard, held_wildcard.clone()),
            (&whole, held_whole.clone()),
            (&one, held_whole.clone()),
            (&port, Vec::new()),
        ];
        for (w, held) in &cases {
            let before = serde_json::to_string(&as_values(w, held)).expect("before");
            // In pieces, as the list streams it (a comma before all but its first).
            for lead in [false, true] {
                let pieces: Vec<Vec<u8>> = WorkerText::new(w, held.clone(), lead)
                    .map(|p| p.expect("piece"))
                    .collect();
                assert!(pieces.iter().all(|p| p.len() < 300_000));
                let comma = if lead { "," } else { "" };
                assert_eq!(
                    String::from_utf8(pieces.concat()).expect("utf-8"),
                    format!("{comma}{before}")
                );
            }
            // `GET /api/worker/{id}` (and the answers of heartbeats and
            // registrations): whole when short, streamed when not, the same bytes.
            let (text, whole) = answered(WorkerText::new(w, held.clone(), false));
            assert_eq!(text, before);
            assert_eq!(whole, before.len() < WHOLE_ANSWER_BYTES, "{}", before.len());
        }
        // `/api/slots`: the workers' slots in one list, in turn, all or in use only.
        let workers = [
            (&port, held.clone()),
            (&wildcard, held_wildcard.clone()),
            (&whole, held_whole.clone()),
        ];
        for in_use_only in [true, false] {
            let mut expected: Vec<serde_json::Value> = Vec::new();
            for (w, held) in &workers {
                let all = as_values(w, held);
                let slots = all["slots"].as_array().expect("slots");
                expected.extend(
                    slots
                        .iter()
                        .filter(|s| !in_use_only || s["in_use"] == true)
                        .cloned(),
                );
            }
            let expected = serde_json::to_string(&json!({ "slots": expected })).expect("json");
            let cursors: Vec<SlotCursor> = workers
                .iter()
                .map(|(w, held)| SlotCursor::new(w, held.clone(), in_use_only))
                .collect();
            let (text, whole) = answered(SlotText::around(
                Ok(br#"{"slots":"#.to_vec()),
                cursors.into_iter().flatten(),
                b"}".to_vec(),
            ));
            assert_eq!(text, expected);
            assert_eq!(whole, in_use_only, "{} bytes", expected.len());
        }
        // No worker: an empty list.
        let (text, whole) = answered(SlotText::around(
            Ok(br#"{"slots":"#.to_vec()),
            std::iter::empty(),
            b"}".to_vec(),
        ));
        assert_eq!((text.as_str(), whole), (r#"{"slots":[]}"#, true));
    }

    /// A piece that cannot be written before the head is sent is answered as an
    /// error; after it, the body is cut off there, never closed as valid JSON.
    /// An answer that ends within [`WHOLE_ANSWER_BYTES`] goes out whole, one of
    /// exactly that size too; one byte more is streamed.
    #[test]
    fn an_answer_of_exactly_the_limit_goes_out_whole() {
        let of = |n: usize| {
            vec![Ok(b"[".to_vec()), Ok(vec![b' '; n - 2]), Ok(b"]".to_vec())].into_iter()
        };
        let (text, whole) = answered(of(WHOLE_ANSWER_BYTES));
        assert_eq!((text.len(), whole), (WHOLE_ANSWER_BYTES, true));
        let (text, whole) = answered(of(WHOLE_ANSWER_BYTES + 1));
        assert_eq!((text.len(), whole), (WHOLE_ANSWER_BYTES + 1, false));
    }

    #[test]
    fn a_piece_not_written_fails_the_answer_or_cuts_it_off() {
        let broken = || serde_json::from_str::<serde_json::Value>("{").expect_err("broken");
        let early = vec![Ok(b"{".to_vec()), Err(broken()), Ok(b"}".to_vec())];
        let e = answer_in_pieces(early.into_iter(), "test").expect_err("an error");
        assert!(matches!(e, crate::ApiError::Store(_)), "{e:?}");
        let big = vec![b' '; WHOLE_ANSWER_BYTES];
        let late = vec![
            Ok(b"[".to_vec()),
            Ok(big),
            Ok(b"1".to_vec()),
            Err(broken()),
            Ok(b"]".to_vec()),
        ];
        let response = answer_in_pieces(late.into_iter(), "test").expect("streamed");
        let body = read_body(response);
        assert!(body.is_err(), "the body ends with the failed piece");
    }

    /// Registration limits count characters, as their messages and the store's
    /// columns do, and a host goes into URLs only in a form a URL can carry.
    #[test]
    fn registrations_count_characters_and_refuse_hosts_no_url_can_carry() {
        let body = |authority: &str, hostname: &str| {
            serde_json::json!({"authority": authority, "frontend_mode": "port",
                "hostname": hostname, "api_port": 10201, "port_range": [21000, 21001]})
        };
        let fine = |b: serde_json::Value| validate_worker(&b).map(drop).map_err(|e| e.to_string());
        // 200 characters, 400 bytes: within the 255 characters.
        assert_eq!(fine(body(&"é".repeat(200), "w.example")), Ok(()));
        assert!(fine(body(&"é".repeat(256), "w.example")).is_err());
        assert_eq!(fine(body("w", "[2001:db8::5]")), Ok(()));
        assert_eq!(fine(body("w", "192.0.2.7")), Ok(()));
        for host in [
            "2001:db8::5",
            "w.example:8080",
            "[2001:db8::5",
            "[not-an-ip]",
        ] {
            let e = fine(body("w", host)).expect_err(host);
            assert!(e.contains("in brackets"), "{host}: {e}");
        }
    }

    #[test]
    fn held_slots_are_grouped_by_worker_in_their_order() {
        let (a, b) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
        let c = |n: u128| uuid::Uuid::from_u128(100 + n);
        let held: Vec<HeldSlot> = vec![
            (a, c(1), Some(10), None),
            (b, c(2), Some(20), None),
            (a, c(3), Some(11), Some("sub".to_owned())),
        ];
        let by = held_by_worker(held.clone());
        assert_eq!(by.len(), 2);
        assert_eq!(by[&a], vec![held[0].clone(), held[2].clone()]);
        assert_eq!(by[&b], vec![held[1].clone()]);
        assert!(!by.contains_key(&uuid::Uuid::from_u128(3)));
    }

    /// The slots as they are defined: every port of the range, with the first
    /// occupant on it.
    fn by_definition(
        lo: u16,
        hi: u16,
        occupants: &[(Option<u16>, u32)],
        in_use_only: bool,
    ) -> Vec<(u16, Option<u32>)> {
        (lo..=hi)
            .map(|p| {
                (
                    p,
                    occupants
                        .iter()
                        .find(|(q, _)| *q == Some(p))
                        .map(|(_, w)| *w),
                )
            })
            .filter(|(_, w)| !in_use_only || w.is_some())
            .collect()
    }

    /// The port slots a [`SlotCursor`] yields for a port worker of `[lo, hi]` on
    /// which circuit `n` holds its port, as `(port, n)`.
    fn cursor_slots(
        lo: u16,
        hi: u16,
        occupants: &[(Option<u16>, u32)],
        in_use_only: bool,
    ) -> Vec<(u16, Option<u32>)> {
        let held: Vec<HeldSlot> = occupants
            .iter()
            .map(|(port, n)| {
                (
                    uuid::Uuid::from_u128(7),
                    uuid::Uuid::from_u128(u128::from(*n)),
                    *port,
                    None,
                )
            })
            .collect();
        SlotCursor::new(&port_worker(lo, hi), held, in_use_only)
            .map(|s| {
                assert_eq!(
                    (s.frontend_mode, s.in_use),
                    ("port", s.circuit_id.is_some())
                );
                let n = s.circuit_id.map(|c| u32::try_from(c.as_u128()).expect("n"));
                (s.port.expect("a port"), n)
            })
            .collect()
    }

    proptest::proptest! {
        #[test]
        fn port_slots_are_the_slots_by_definition(
            lo in 1u16..200,
            len in 0u16..100,
            occupants in proptest::collection::vec((proptest::option::of(0u16..320), 0u32..1000), 0..60),
            in_use_only in proptest::bool::ANY,
        ) {
            let hi = lo.saturating_add(len);
            proptest::prop_assert_eq!(
                cursor_slots(lo, hi, &occupants, in_use_only),
                by_definition(lo, hi, &occupants, in_use_only)
            );
        }
    }

    #[test]
    fn the_whole_port_range_is_one_pass() {
        let occupants: Vec<(Option<u16>, u32)> =
            (0..40_000u32).map(|i| (Some(1 + i as u16), i)).collect();
        let all = cursor_slots(1, u16::MAX, &occupants, false);
        assert_eq!(all.len(), 65_535);
        assert_eq!(all[0], (1, Some(0)));
        assert_eq!(all[40_000], (40_001, None));
        assert_eq!(all[65_534], (65_535, None));
        let used = cursor_slots(1, u16::MAX, &occupants, true);
        assert_eq!(used.len(), 40_000);
        assert_eq!(used[39_999], (40_000, Some(39_999)));
    }
}
