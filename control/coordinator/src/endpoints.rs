//! `/v2/endpoints`: model-serving endpoints (inference circuits) — create or sync,
//! delete, health-check settings, API tokens, and bulk route register / unregister /
//! replace, each route change announced to the worker with
//! `appproxy_circuit_route_updated_event`.
//!
//! Input accepts the aliases `endpoint_id` (for `deployment_id`) and `group_id` (for
//! `project_id`); bulk answers keep request order and report per item.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use appproxy_shared::model::{
    AppMode, Circuit, FrontendMode, ProxyProtocol, RouteInfo, UpstreamTls,
};
use appproxy_shared::wire::WorkerRegistration;
use axum::extract::State as Extract;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::events::{CircuitEvent, EventKind};
use super::placement;
use super::{ApiError, Body, Id, State, StoreError};

/// One endpoint to create or sync.
#[derive(Deserialize)]
pub(super) struct CreateEndpoint {
    #[serde(default, alias = "endpoint_id")]
    deployment_id: Option<uuid::Uuid>,
    service_name: String,
    tags: Tags,
    #[serde(default)]
    open_to_public: bool,
    #[serde(default)]
    health_check: Option<Value>,
}

#[derive(Deserialize)]
struct Tags {
    session: SessionTags,
    endpoint: EndpointTags,
}

#[derive(Deserialize)]
struct SessionTags {
    user_uuid: uuid::Uuid,
    #[serde(alias = "group_id")]
    project_id: uuid::Uuid,
    domain_name: String,
    #[serde(default)]
    id: Option<uuid::Uuid>,
    #[serde(default)]
    access_key: Option<String>,
}

#[derive(Deserialize)]
struct EndpointTags {
    #[serde(default)]
    id: Option<uuid::Uuid>,
    runtime_variant: String,
    existing_url: Option<String>,
}

/// The endpoint's public URL on its worker.
fn endpoint_url(worker: &WorkerRegistration, circuit: &Circuit) -> String {
    let tls = worker.https();
    let scheme = if tls { "https" } else { "http" };
    match (&circuit.subdomain, &worker.wildcard_domain) {
        (Some(sub), Some(domain)) => {
            let default = if tls { 443 } else { 80 };
            match worker.wildcard_traffic_port {
                Some(p) if p != default => format!("{scheme}://{sub}{domain}:{p}"),
                _ => format!("{scheme}://{sub}{domain}"),
            }
        }
        _ => format!(
            "{scheme}://{}:{}",
            worker.hostname,
            circuit.port.unwrap_or(0)
        ),
    }
}

fn health_enabled(h: &Option<Value>) -> bool {
    h.as_ref()
        .is_some_and(|h| h.is_object() && h["enable"].as_bool().unwrap_or(true))
}

/// Health-check settings as the manager sends them (the original's
/// `ModelHealthCheck`): `null`, or an object whose fields read as the prober reads
/// them. Anything else is a 400 before anything is stored — stored as it came, it
/// would be answered `health_check_enabled: true` and then never probed.
fn check_health_settings(h: &Option<Value>) -> Result<(), ApiError> {
    let Some(v) = h.as_ref().filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let bad = |why: String| ApiError::BadRequest(format!("health_check: {why}"));
    if !v.is_object() {
        return Err(bad("must be an object or null".into()));
    }
    if v.get("enable")
        .is_some_and(|e| !e.is_boolean() && !e.is_null())
    {
        return Err(bad("enable must be true or false".into()));
    }
    super::health::Settings::parse(v, std::time::Duration::ZERO)
        .map(|_| ())
        .map_err(bad)
}

/// The fields of an endpoint to create, checked before anything is created (in a
/// bulk call, every item's before the first is).
fn validate_endpoint(e: &CreateEndpoint) -> Result<(), ApiError> {
    super::fits("service_name", Some(&e.service_name), 255)?;
    super::fits(
        "tags.endpoint.runtime_variant",
        Some(&e.tags.endpoint.runtime_variant),
        64,
    )?;
    if e.service_name.trim().is_empty() || super::proxy::has_control(&e.service_name) {
        return Err(ApiError::BadRequest(
            "service_name must be a non-empty name without control characters".into(),
        ));
    }
    check_health_settings(&e.health_check)
}

/// An endpoint's circuit as one request found or made it.
struct Placed {
    circuit: Circuit,
    worker: WorkerRegistration,
    /// Made by this request: its creation is still under way until the answer is
    /// certain (settled), and withdrawn if anything after it fails.
    created: Option<super::proxy::Creating>,
}

impl Placed {
    /// The answer is certain: the circuit made by this request stays.
    fn settle(self) {
        if let Some(created) = self.created {
            created.settled();
        }
    }

    /// What followed failed: the circuit made by this request is withdrawn, a first
    /// try before this returns (and the answer goes out), then in the background,
    /// tried again until made; one the endpoint already had is kept.
    async fn undo(self, why: &str) {
        if let Some(created) = self.created {
            created
                .withdraw_now(format!(
                    "endpoint {} not created ({why}); its new circuit is withdrawn",
                    self.circuit.endpoint_id.unwrap_or_default()
                ))
                .await;
        }
    }
}

/// Withdraws what a bulk call made ([`Placed::undo`]), the first tries side by side.
async fn undo_all(placed: Vec<Placed>, why: String) {
    futures_util::future::join_all(placed.into_iter().map(|p| p.undo(&why))).await;
}

/// The worker and slot of each item's `existing_url` (`None` without one), read
/// before anything is created: a URL no registered worker serves is a 400 with
/// nothing created (named `endpoints[i]: …` when `numbered`, as in a bulk call).
async fn existing_slots(
    state: &State,
    items: &[&CreateEndpoint],
    numbered: bool,
) -> Result<Vec<Option<(uuid::Uuid, Slot)>>, ApiError> {
    if items.iter().all(|e| e.tags.endpoint.existing_url.is_none()) {
        return Ok(items.iter().map(|_| None).collect());
    }
    let workers = state.store.workers().await?;
    items
        .iter()
        .enumerate()
        .map(|(i, e)| match &e.tags.endpoint.existing_url {
            None => Ok(None),
            Some(url) => existing_slot(&workers, url).map(Some).ok_or_else(|| {
                let item = if numbered {
                    format!("endpoints[{i}]: ")
                } else {
                    String::new()
                };
                ApiError::BadRequest(format!(
                    "{item}existing_url {url:?} is not served by any registered worker"
                ))
            }),
        })
        .collect()
}

/// Finds or creates the endpoint's circuit. Nothing that can fail comes after the
/// creation: the worker's registration is the one it was placed on.
async fn place_one(
    state: &Arc<State>,
    id: uuid::Uuid,
    e: &CreateEndpoint,
    existing: Option<&(uuid::Uuid, Slot)>,
) -> Result<Placed, ApiError> {
    if let Some(ak) = &e.tags.session.access_key {
        appproxy_shared::middleware::note_access_key(ak);
    }
    // Another request for the endpoint may have made its circuit since the lookup
    // (the manager retries, and several of its nodes may ask at once): the insert
    // then collides on the endpoint's index, and that circuit is the answer.
    let mut collisions = 0;
    loop {
        match created_or_existing(state, id, e, existing).await {
            Err(ApiError::Store(StoreError::Conflict(why)))
                if collisions < super::proxy::PLACEMENT_ATTEMPTS =>
            {
                collisions += 1;
                tracing::debug!(%why, "the endpoint's circuit was made by another request meanwhile");
            }
            other => return other,
        }
    }
}

/// Writes the endpoint's row once its circuit stands (a refused creation leaves
/// no endpoint row); (URL, health check enabled). Failing, the circuit made for
/// it is withdrawn: a 503 leaves no circuit deployed without its endpoint. A
/// circuit made by this request is settled in the store by the same write (its
/// mark of a creation under way cleared with the row written, or neither); gone
/// meanwhile (removed, or swept once its mark was past), nothing is written: 409.
async fn write_endpoint(
    state: &State,
    id: uuid::Uuid,
    e: &CreateEndpoint,
    placed: &Placed,
) -> Result<(String, bool), ApiError> {
    let enabled = health_enabled(&e.health_check);
    if placed.created.is_some() {
        let written = state
            .store
            .upsert_endpoint_settling(id, enabled, e.health_check.clone(), placed.circuit.id)
            .await?;
        if !written {
            tracing::info!(circuit = %placed.circuit.id, endpoint = %id, "circuit removed before its creation was settled");
            return Err(ApiError::CircuitRemoved);
        }
    } else {
        state
            .store
            .upsert_endpoint(id, enabled, e.health_check.clone())
            .await?;
    }
    Ok((endpoint_url(&placed.worker, &placed.circuit), enabled))
}

/// The endpoint's circuit: the one it has (once any creation of it under way
/// settled), else a new one.
async fn created_or_existing(
    state: &Arc<State>,
    id: uuid::Uuid,
    e: &CreateEndpoint,
    existing_url: Option<&(uuid::Uuid, Slot)>,
) -> Result<Placed, ApiError> {
    // A circuit of this endpoint that another request is still creating (on this
    // coordinator or another: its mark in the store) is no answer yet: its outcome
    // is awaited (it may be withdrawn), then looked up again; still under way once
    // the wait is over, the answer is 503 (never that circuit: it may be withdrawn
    // the next moment). One still marked past its bound was left by a failed
    // creation: withdrawn (only while it still is: its node may have settled it
    // meanwhile, and then it is the answer) and placed again below.
    let deadline = tokio::time::Instant::now() + state.foreign_creation_wait();
    let mut carried = None;
    let mut looks = 0;
    'look: loop {
        looks += 1;
        let mut existing = state.store.circuit_of_endpoint(id).await?;
        let mut overdue = false;
        let mut decided = false;
        for _ in 0..super::proxy::PLACEMENT_ATTEMPTS {
            let Some((c, _)) = &existing else {
                decided = true;
                break;
            };
            match state.creation_of(c.id, deadline).await? {
                super::Found::Settled => {
                    decided = true;
                    break;
                }
                super::Found::Overdue => {
                    overdue = true;
                    decided = true;
                    break;
                }
                super::Found::LookAgain => existing = state.store.circuit_of_endpoint(id).await?,
            }
        }
        if let (false, Some((c, _))) = (decided, &existing) {
            tracing::warn!(
                circuit = %c.id,
                endpoint = %id,
                "the endpoint's circuit is still being created past the longest this request waits for it; not answered with it"
            );
            return Err(ApiError::CreationUnderWay);
        }
        // A circuit whose worker is gone (not `ALIVE`: lost, deregistered, its row
        // deleted) or no longer serves its slot ([`placement::unserved`]) would hand
        // the manager a URL nothing serves: it is withdrawn, as interactive reuse
        // does, and the endpoint placed again with its routes.
        if let Some((c, _)) = &existing {
            let worker = match c.worker {
                Some(w) => state.store.worker(w).await?,
                None => None,
            };
            let why = match &worker {
                _ if overdue => Some(
                    "its creation was never settled (it failed, and its coordinator stopped before withdrawing it)"
                        .to_owned(),
                ),
                Some(w) if w.status == "ALIVE" => {
                    placement::unserved(&w.registration, c.port, c.subdomain.as_deref())
                        .map(|why| format!("its worker no longer serves it ({why})"))
                }
                Some(w) => Some(format!("its worker is {}", w.status)),
                None => Some("its worker is not registered".to_owned()),
            };
            match (why, worker) {
                (None, Some(w)) => {
                    return Ok(Placed {
                        circuit: c.clone(),
                        worker: w.registration,
                        created: None,
                    })
                }
                (why, worker) => {
                    let why = why.unwrap_or_default();
                    tracing::warn!(
                        circuit = %c.id,
                        endpoint = %id,
                        worker = worker.as_ref().map(|w| w.registration.authority.as_str()).unwrap_or(""),
                        "the endpoint's circuit is withdrawn and placed again: {why}"
                    );
                    if overdue {
                        // Removed only while still overdue: settled meanwhile by
                        // its node (or removed by another), it is looked up again.
                        let (withdrawn, _) =
                            state.remove_overdue_creation_as_origin(c.id, || {}).await;
                        if !withdrawn? {
                            if looks < super::proxy::PLACEMENT_ATTEMPTS {
                                continue 'look;
                            }
                            return Err(ApiError::CreationUnderWay);
                        }
                    } else {
                        state.remove_circuit(c.id).await?;
                    }
                    carried = Some((c.route_info.clone(), c.session_ids.clone()));
                }
            }
        }
        break;
    }
    let (route_info, session_ids) = carried.unwrap_or_default();
    let s = &e.tags.session;
    let mut properties = vec![
        ("session.user_uuid".to_owned(), s.user_uuid.to_string()),
        ("session.project_id".to_owned(), s.project_id.to_string()),
        ("session.domain_name".to_owned(), s.domain_name.clone()),
        (
            "endpoint.id".to_owned(),
            e.tags.endpoint.id.unwrap_or(id).to_string(),
        ),
        (
            "endpoint.runtime_variant".to_owned(),
            e.tags.endpoint.runtime_variant.clone(),
        ),
    ];
    if let Some(v) = s.id {
        properties.push(("session.id".into(), v.to_string()));
    }
    if let Some(v) = &s.access_key {
        properties.push(("session.access_key".into(), v.clone()));
    }
    if let Some(v) = &e.tags.endpoint.existing_url {
        properties.push(("endpoint.existing_url".into(), v.clone()));
    }
    let mut label = placement::dns_label(&e.service_name);
    let mut preferred_port = None;
    let mut only_worker = None;
    if let Some((worker, slot)) = existing_url {
        only_worker = Some(*worker);
        match slot {
            Slot::Subdomain(s) => label = s.clone(),
            Slot::Port(p) => preferred_port = Some(*p),
        }
    }
    let request = placement::Request {
        app_mode: AppMode::Inference,
        protocol: ProxyProtocol::Http,
        properties: &properties,
        preferred_port,
        preferred_subdomain: Some(&label),
        default_subdomain: &label,
        spread: None,
        only_worker,
    };
    let template = Circuit {
        id: uuid::Uuid::nil(),
        app: Some(e.service_name.clone()),
        protocol: ProxyProtocol::Http,
        worker: None,
        app_mode: AppMode::Inference,
        frontend_mode: FrontendMode::Port,
        envs: Default::default(),
        arguments: None,
        open_to_public: e.open_to_public,
        allowed_client_ips: Vec::new(),
        port: None,
        subdomain: None,
        user_id: Some(s.user_uuid),
        endpoint_id: Some(id),
        runtime_variant: Some(e.tags.endpoint.runtime_variant.clone()),
        route_info,
        session_ids,
        created_at: None,
        updated_at: None,
        // `create_circuit` decides it.
        upstream_reuse: None,
    };
    let (circuit, worker, created) =
        super::proxy::create_circuit(state, template, &request, None, None).await?;
    Ok(Placed {
        circuit,
        worker,
        created: Some(created),
    })
}

/// Where an `existing_url` lives.
enum Slot {
    Subdomain(String),
    Port(u16),
}

/// The worker and slot of an endpoint's `existing_url`: a wildcard worker by its
/// domain (the subdomain kept), a port worker by hostname and a port in its range.
fn existing_slot(workers: &[super::store::WorkerRow], url: &str) -> Option<(uuid::Uuid, Slot)> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().ok()),
        None => (authority, None),
    };
    let host = host.to_ascii_lowercase();
    workers.iter().find_map(|w| {
        let b = &w.registration;
        if let Some(domain) = &b.wildcard_domain {
            let sub = host.strip_suffix(&domain.to_ascii_lowercase())?;
            return (!sub.is_empty() && !sub.contains('.'))
                .then(|| (w.id, Slot::Subdomain(sub.to_owned())));
        }
        let (lo, hi) = placement::port_range(b)?;
        let port = port?;
        // Host names are compared as DNS compares them: the URL's was lowercased,
        // a worker may have registered `Proxy1.Example.COM`.
        (b.hostname.eq_ignore_ascii_case(&host) && (lo..=hi).contains(&port))
            .then_some((w.id, Slot::Port(port)))
    })
}

/// Creates (or syncs) one endpoint: its circuit found or made, then its row
/// written; (URL, health check enabled). When the row cannot be written, the
/// circuit this call made is withdrawn: a failure leaves nothing deployed.
async fn create_one(
    state: &Arc<State>,
    id: uuid::Uuid,
    e: &CreateEndpoint,
) -> Result<(String, bool), ApiError> {
    validate_endpoint(e)?;
    let slot = existing_slots(state, &[e], false).await?.pop().flatten();
    let placed = place_one(state, id, e, slot.as_ref()).await?;
    match write_endpoint(state, id, e, &placed).await {
        Ok(written) => {
            placed.settle();
            Ok(written)
        }
        Err(err) => {
            placed
                .undo(&format!("its row was not written: {err}"))
                .await;
            Err(err)
        }
    }
}

pub(super) async fn create(
    Extract(state): Extract<Arc<State>>,
    Id(id): Id<uuid::Uuid>,
    Body(e): Body<CreateEndpoint>,
) -> Result<Json<Value>, ApiError> {
    let (url, enabled) = create_one(&state, id, &e).await?;
    Ok(Json(
        json!({"success": true, "endpoint": url, "health_check_enabled": enabled}),
    ))
}

/// The most endpoints one bulk route call (`/v2/endpoints/bulk/routes`, `…/register`,
/// `…/unregister`) names. The whole call holds the route turn — this process's and,
/// through the store, every coordinator's — and each item costs a few store calls
/// and an event (about 2 ms on PostgreSQL): 8,000 items held it 17 s, and other
/// coordinators' route calls gave up meanwhile with 503 after the store's 5 s
/// deadline. 1,024 items hold it about 2 s, well inside that deadline; the
/// endpoints whose routes change at one time are far fewer.
pub(super) const MAX_BULK_ROUTE_ITEMS: usize = 1024;

/// The most endpoints one bulk creation or removal (`/v2/endpoints/bulk`) names:
/// each item costs store calls and an event, and the call has no deadline of its
/// own (34,000 removals took 17 s). The same bound as a bulk removal of circuits
/// ([`super::api::MAX_BULK_REMOVALS`], about 2 s).
pub(super) const MAX_BULK_ENDPOINTS: usize = super::api::MAX_BULK_REMOVALS;

/// Refuses (400, before any work) a bulk body naming more than `max` endpoints.
fn within_bulk_cap(items: usize, max: usize) -> Result<(), ApiError> {
    if items > max {
        return Err(ApiError::BadRequest(format!(
            "the call names {items} endpoints; one call takes at most {max}"
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
pub(super) struct BulkCreate {
    endpoints: Vec<CreateEndpoint>,
}

/// All or nothing: every item is checked (its fields, its `existing_url`) before
/// any is created; then every item's circuit is found or made, then every row
/// written. Whatever fails on the way (no free slot, no acknowledgement, the store)
/// withdraws the circuits this call made before it answers the failure — as does a
/// caller that gives up meanwhile; circuits the endpoints already had are kept.
pub(super) async fn create_bulk(
    Extract(state): Extract<Arc<State>>,
    Body(b): Body<BulkCreate>,
) -> Result<Json<Value>, ApiError> {
    within_bulk_cap(b.endpoints.len(), MAX_BULK_ENDPOINTS)?;
    if b.endpoints.iter().any(|e| e.deployment_id.is_none()) {
        return Err(ApiError::BadRequest(
            "every bulk item needs deployment_id".into(),
        ));
    }
    let item = |i: usize| {
        move |err| match err {
            ApiError::BadRequest(why) => ApiError::BadRequest(format!("endpoints[{i}]: {why}")),
            other => other,
        }
    };
    for (i, e) in b.endpoints.iter().enumerate() {
        validate_endpoint(e).map_err(item(i))?;
    }
    let items: Vec<&CreateEndpoint> = b.endpoints.iter().collect();
    let slots = existing_slots(&state, &items, true).await?;
    let mut placed: Vec<Placed> = Vec::with_capacity(items.len());
    let why =
        |i: usize, err: &ApiError| format!("endpoints[{i}] of its bulk creation failed: {err}");
    for (i, (e, slot)) in items.iter().zip(&slots).enumerate() {
        let id = e.deployment_id.unwrap_or_default();
        // The same endpoint again in this call: the circuit found or made for it
        // (still under way, so it is not awaited) is the answer, as a sync.
        if let Some(earlier) = placed.iter().find(|p| p.circuit.endpoint_id == Some(id)) {
            let again = Placed {
                circuit: earlier.circuit.clone(),
                worker: earlier.worker.clone(),
                created: None,
            };
            placed.push(again);
            continue;
        }
        match place_one(&state, id, e, slot.as_ref()).await {
            Ok(p) => placed.push(p),
            Err(err) => {
                undo_all(placed, why(i, &err)).await;
                return Err(item(i)(err));
            }
        }
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, (e, p)) in items.iter().zip(&placed).enumerate() {
        let id = e.deployment_id.unwrap_or_default();
        match write_endpoint(&state, id, e, p).await {
            Ok((url, enabled)) => {
                out.push(json!({"deployment_id": id, "url": url, "health_check_enabled": enabled}))
            }
            Err(err) => {
                undo_all(placed, why(i, &err)).await;
                return Err(item(i)(err));
            }
        }
    }
    for p in placed {
        p.settle();
    }
    Ok(Json(json!({"endpoints": out})))
}

/// Removes the endpoint's circuit (telling its worker) and its row. Idempotent.
async fn delete_one(state: &State, id: uuid::Uuid) -> Result<(), ApiError> {
    if let Some((c, _)) = state.store.circuit_of_endpoint(id).await? {
        state.remove_circuit(c.id).await?;
    }
    state.store.delete_endpoint(id).await?;
    Ok(())
}

pub(super) async fn delete(
    Extract(state): Extract<Arc<State>>,
    Id(id): Id<uuid::Uuid>,
) -> Result<Json<Value>, ApiError> {
    delete_one(&state, id).await?;
    Ok(Json(json!({"success": true})))
}

#[derive(Deserialize)]
pub(super) struct BulkDelete {
    endpoints: Vec<DeploymentRef>,
}

#[derive(Deserialize)]
struct DeploymentRef {
    #[serde(alias = "endpoint_id")]
    deployment_id: uuid::Uuid,
}

pub(super) async fn delete_bulk(
    Extract(state): Extract<Arc<State>>,
    Body(b): Body<BulkDelete>,
) -> Result<Json<Value>, ApiError> {
    within_bulk_cap(b.endpoints.len(), MAX_BULK_ENDPOINTS)?;
    // While Redis is out of reach, one failed publish, not one per endpoint.
    let out = super::one_publishing_call(async {
        let mut out = Vec::with_capacity(b.endpoints.len());
        for e in b.endpoints {
            let result = delete_one(&state, e.deployment_id).await;
            out.push(
                json!({"deployment_id": e.deployment_id, "success": result.is_ok(),
                "error": result.err().map(|e| e.to_string())}),
            );
        }
        out
    })
    .await;
    Ok(Json(json!({"endpoints": out})))
}

#[derive(Deserialize)]
pub(super) struct HealthCheckBody {
    health_check: Option<Value>,
}

pub(super) async fn health_check(
    Extract(state): Extract<Arc<State>>,
    Id(id): Id<uuid::Uuid>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    // The key is required (null allowed): `{}` is refused.
    let raw: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    if raw.get("health_check").is_none() {
        return Err(ApiError::BadRequest(
            "health_check is required (null disables it)".into(),
        ));
    }
    let b: HealthCheckBody =
        serde_json::from_value(raw).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    check_health_settings(&b.health_check)?;
    let Some((circuit, _)) = state.store.circuit_of_endpoint(id).await? else {
        return Err(ApiError::NotFound("E00002: No such circuit."));
    };
    if circuit.app_mode != AppMode::Inference {
        return Err(ApiError::NotFound("E00002: No such inference-circuit."));
    }
    state
        .store
        .upsert_endpoint(id, health_enabled(&b.health_check), b.health_check)
        .await?;
    Ok(Json(json!({"success": true})))
}

#[derive(Deserialize)]
pub(super) struct TokenBody {
    user_uuid: uuid::Uuid,
    exp: Value,
}

/// `exp` as the original's model (pydantic, lax `datetime`) reads it: epoch
/// seconds (a number, or as text), or ISO-8601 — `T`, `t` or a space between date
/// and time, seconds optional, `Z`, `z`, an offset (`±HH:MM`, `±HHMM`, `±HH`) or
/// none (UTC), or a date alone (its midnight, UTC). Before, only UTC with `Z` or
/// `+00:00` was taken, and a manager sending `+09:00` was refused 400 (an
/// outside tester's find).
fn epoch_of(v: &Value) -> Option<i64> {
    let secs = match v {
        Value::Number(n) => n.as_f64().map(epoch_seconds),
        Value::String(s) => {
            let s = s.trim();
            s.parse::<f64>()
                .ok()
                .map(epoch_seconds)
                .or_else(|| iso8601_epoch(s))
        }
        _ => None,
    }?;
    (secs.is_finite() && secs.abs() < 1e15).then_some(secs as i64)
}

/// An epoch number as pydantic reads one: past 2×10^10 (the year 2603 in
/// seconds) it is milliseconds. Before, `Date.now()`'s milliseconds were taken as
/// seconds, a token valid for 60,000 years (an outside verifier's find).
fn epoch_seconds(n: f64) -> f64 {
    if n.abs() > 2e10 {
        n / 1000.0
    } else {
        n
    }
}

/// Unix seconds of an ISO-8601 time in the forms [`epoch_of`] names.
fn iso8601_epoch(s: &str) -> Option<f64> {
    use super::access::parse_rfc3339;
    if s.len() == 10 {
        return parse_rfc3339(&format!("{s}T00:00:00Z"));
    }
    if !matches!(s.as_bytes().get(10), Some(b'T' | b't' | b' ')) {
        return None;
    }
    let (date, rest) = (s.get(..10)?, s.get(11..)?);
    let (time, offset) = match rest.strip_suffix(['Z', 'z']) {
        Some(time) => (time, 0),
        None => match rest.rfind(['+', '-']) {
            Some(at) => (&rest[..at], offset_secs(&rest[at..])?),
            None => (rest, 0),
        },
    };
    // Seconds may be left out (`HH:MM`).
    let time = if time.len() == 5 {
        format!("{time}:00")
    } else {
        time.to_owned()
    };
    parse_rfc3339(&format!("{date}T{time}Z")).map(|t| t - offset as f64)
}

/// Seconds east of UTC of an ISO-8601 offset: `+09:00`, `-0530`, `+09`.
fn offset_secs(z: &str) -> Option<i64> {
    let sign = match z.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let d = &z[1..];
    let (h, m) = match d.len() {
        2 => (d, "00"),
        4 => (&d[..2], &d[2..]),
        5 if d.as_bytes()[2] == b':' => (&d[..2], &d[3..]),
        _ => return None,
    };
    if !(h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit())) {
        return None;
    }
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 23 && m <= 59).then_some(sign * (h * 3600 + m * 60))
}

pub(super) async fn token(
    Extract(state): Extract<Arc<State>>,
    Id(id): Id<uuid::Uuid>,
    Body(b): Body<TokenBody>,
) -> Result<Json<Value>, ApiError> {
    let exp = epoch_of(&b.exp).ok_or_else(|| {
        ApiError::BadRequest("exp must be an ISO-8601 UTC time or epoch seconds".into())
    })?;
    let (circuit, _) = state
        .store
        .circuit_of_endpoint(id)
        .await?
        .ok_or(ApiError::NotFound("E00002: No such circuit."))?;
    let worker = state
        .store
        .worker(circuit.worker.unwrap_or_default())
        .await?
        .ok_or(ApiError::NoWorker)?;
    let mut claims = serde_json::to_value(&circuit).map_err(super::store::StoreError::from)?;
    if let Some(map) = claims.as_object_mut() {
        map.remove("route_info");
    }
    let float = |t: &Option<String>| t.as_deref().and_then(super::access::parse_rfc3339);
    claims["created_at"] = json!(float(&circuit.created_at));
    claims["updated_at"] = json!(float(&circuit.updated_at));
    claims["app_url"] = json!(endpoint_url(&worker.registration, &circuit));
    claims["user"] = json!(b.user_uuid);
    claims["exp"] = json!(exp);
    Ok(Json(
        json!({"token": appproxy_shared::jwt::sign_hs256(&claims, &state.config.secrets.jwt_secret)}),
    ))
}

/// A route as the manager sends it.
#[derive(Deserialize, Clone)]
struct RouteEntry {
    session_id: uuid::Uuid,
    route_id: uuid::Uuid,
    #[serde(deserialize_with = "kernel_host")]
    kernel_host: String,
    #[serde(deserialize_with = "kernel_port")]
    kernel_port: u16,
    /// Whether the app serves HTTPS (`off`, `verify`, `insecure`; absent: off).
    #[serde(default, alias = "upstream-tls")]
    upstream_tls: UpstreamTls,
}

/// A kernel host: a host name or an IP address, as `/v2/conf` takes it
/// ([`super::proxy::valid_kernel_host`]).
fn kernel_host<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let host = String::deserialize(d)?;
    if !super::proxy::valid_kernel_host(&host) {
        return Err(serde::de::Error::custom(super::proxy::KERNEL_HOST_RULE));
    }
    Ok(host)
}

/// A kernel port: 1-65535 (port 0 reaches nothing; `/v2/conf` refuses it too).
fn kernel_port<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let port = u16::deserialize(d)?;
    if port == 0 {
        return Err(serde::de::Error::custom("kernel_port must be 1-65535"));
    }
    Ok(port)
}

impl RouteEntry {
    fn route(&self) -> RouteInfo {
        RouteInfo {
            route_id: Some(self.route_id),
            session_id: self.session_id,
            session_name: None,
            kernel_host: self.kernel_host.clone(),
            kernel_port: self.kernel_port,
            protocol: ProxyProtocol::Http,
            traffic_ratio: 1.0,
            health_status: None,
            upstream_tls: self.upstream_tls,
        }
    }
}

#[derive(Deserialize)]
pub(super) struct RoutesBody {
    endpoints: Vec<RoutesItem>,
}

#[derive(Deserialize)]
struct RoutesItem {
    #[serde(alias = "endpoint_id")]
    deployment_id: uuid::Uuid,
    #[serde(default)]
    routes: Vec<RouteEntry>,
    #[serde(default)]
    route_ids: Vec<uuid::Uuid>,
}

#[derive(Clone, Copy)]
enum RouteOp {
    Replace,
    Register,
    Unregister,
}

/// Applies one item's change: the new routes stored, the worker told. The caller
/// holds [`super::health::ROUTE_WRITES`].
async fn routes_one(state: &State, item: &RoutesItem, op: RouteOp) -> Result<Value, ApiError> {
    let Some((circuit, _)) = state.store.circuit_of_endpoint(item.deployment_id).await? else {
        return Ok(
            json!({"deployment_id": item.deployment_id, "success": false,
            "error": "No circuit registered for this endpoint yet."}),
        );
    };
    let mut routes = circuit.route_info.clone();
    let mut result = json!({"deployment_id": item.deployment_id, "success": true, "error": null});
    match op {
        RouteOp::Replace => {
            // A route kept across the replacement keeps its health-check state.
            let health = |id: uuid::Uuid| {
                routes
                    .iter()
                    .find(|x| x.route_id == Some(id))
                    .and_then(|x| x.health_status)
            };
            routes = item
                .routes
                .iter()
                .map(|r| RouteInfo {
                    health_status: health(r.route_id),
                    ..r.route()
                })
                .collect();
        }
        RouteOp::Register => {
            let (mut added, mut already) = (Vec::new(), Vec::new());
            let mut present: HashSet<uuid::Uuid> =
                routes.iter().filter_map(|x| x.route_id).collect();
            for r in &item.routes {
                if present.insert(r.route_id) {
                    routes.push(r.route());
                    added.push(r.route_id);
                } else {
                    already.push(r.route_id);
                }
            }
            result["registered_route_ids"] = json!(added);
            result["already_registered_route_ids"] = json!(already);
        }
        RouteOp::Unregister => {
            let (mut removed, mut absent) = (Vec::new(), Vec::new());
            let mut present: HashSet<uuid::Uuid> =
                routes.iter().filter_map(|x| x.route_id).collect();
            for id in &item.route_ids {
                if present.remove(id) {
                    removed.push(*id);
                } else {
                    absent.push(*id);
                }
            }
            routes.retain(|x| x.route_id.is_none_or(|id| present.contains(&id)));
            result["unregistered_route_ids"] = json!(removed);
            result["already_absent_route_ids"] = json!(absent);
        }
    }
    if routes != circuit.route_info {
        let trace = appproxy_shared::middleware::current_trace_context();
        // Read before the write: once it is made, no store call may fail the call
        // (a 503 for routes that were stored, and no event sent).
        let authority = state.authority_of(circuit.worker).await?;
        state
            .store
            .update_routes(circuit.id, &routes, trace.as_ref())
            .await?;
        let mut updated = circuit.clone();
        updated.session_ids = routes.iter().map(|r| r.session_id).collect();
        updated.route_info = routes;
        tracing::info!(circuit = %circuit.id, routes = updated.route_info.len(), "routes updated");
        let delivered = state
            .publish(CircuitEvent {
                kind: EventKind::RouteUpdated,
                authority,
                circuits: vec![updated],
                request_id: appproxy_shared::current_request_id(),
                span: appproxy_shared::current_span(),
            })
            .await;
        if !delivered && (state.redis.is_some() || state.local.receiver_count() > 0) {
            result["error"] = json!("Worker propagation failed: the event was not delivered (the worker's poll will pick the change up)");
        }
    }
    Ok(result)
}

async fn routes(state: &State, body: RoutesBody, op: RouteOp) -> Result<Json<Value>, ApiError> {
    // Before the route turn is taken: the cap is what bounds how long it is held.
    within_bulk_cap(body.endpoints.len(), MAX_BULK_ROUTE_ITEMS)?;
    // Checked whole before any item is applied: a route ID twice in one item's
    // list is ambiguous (which one keeps the health state, which one goes).
    for (i, item) in body.endpoints.iter().enumerate() {
        let mut seen = std::collections::HashSet::new();
        if let Some(twice) = item.routes.iter().find(|r| !seen.insert(r.route_id)) {
            return Err(ApiError::BadRequest(format!(
                "endpoints[{i}]: route_id {} appears twice",
                twice.route_id
            )));
        }
    }
    // Route writes are serialised with the health checker's and, through the store,
    // with every other coordinator's; the limit below is checked and the items
    // applied under the same turn: nothing changes between.
    let _writes = super::health::ROUTE_WRITES.lock().await;
    let turn = state.store.route_turn().await?;
    // The turn is held across each item's event: while Redis is out of reach, one
    // failed publish, not one per item.
    let applied = super::one_publishing_call(async {
        within_route_limit(state, &body, op).await?;
        let mut out = Vec::with_capacity(body.endpoints.len());
        for item in &body.endpoints {
            out.push(routes_one(state, item, op).await?);
        }
        Ok(Json(json!({"endpoints": out})))
    })
    .await;
    turn.end().await;
    applied
}

/// Refuses the whole body (400, nothing stored) when an item would leave its
/// endpoint's circuit with more than `[limits] max_routes_per_endpoint` routes. Each
/// route change is announced with the whole circuit (≈ 0.5 KiB a route): without a
/// bound one endpoint's event could outgrow Redis' pub/sub output buffer, which
/// disconnects every subscriber of the cluster. Items for the same endpoint are
/// counted in order, as they will be applied.
async fn within_route_limit(state: &State, body: &RoutesBody, op: RouteOp) -> Result<(), ApiError> {
    let limit = state.config.limits.max_routes_per_endpoint;
    if limit == 0 || matches!(op, RouteOp::Unregister) {
        return Ok(());
    }
    let mut after: HashMap<uuid::Uuid, HashSet<uuid::Uuid>> = HashMap::new();
    for (i, item) in body.endpoints.iter().enumerate() {
        let ids = match after.entry(item.deployment_id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                // An endpoint without a circuit gets its per-item error when applied.
                let Some((circuit, _)) =
                    state.store.circuit_of_endpoint(item.deployment_id).await?
                else {
                    continue;
                };
                e.insert(
                    circuit
                        .route_info
                        .iter()
                        .filter_map(|r| r.route_id)
                        .collect(),
                )
            }
        };
        if matches!(op, RouteOp::Replace) {
            ids.clear();
        }
        ids.extend(item.routes.iter().map(|r| r.route_id));
        if ids.len() > limit as usize {
            return Err(ApiError::BadRequest(format!(
                "endpoints[{i}]: endpoint {} would have {} routes, more than [limits] \
                 max_routes_per_endpoint ({limit}); nothing was changed",
                item.deployment_id,
                ids.len()
            )));
        }
    }
    Ok(())
}

pub(super) async fn replace_routes(
    Extract(state): Extract<Arc<State>>,
    Body(b): Body<RoutesBody>,
) -> Result<Json<Value>, ApiError> {
    routes(&state, b, RouteOp::Replace).await
}

pub(super) async fn register_routes(
    Extract(state): Extract<Arc<State>>,
    Body(b): Body<RoutesBody>,
) -> Result<Json<Value>, ApiError> {
    routes(&state, b, RouteOp::Register).await
}

pub(super) async fn unregister_routes(
    Extract(state): Extract<Arc<State>>,
    Body(b): Body<RoutesBody>,
) -> Result<Json<Value>, ApiError> {
    routes(&state, b, RouteOp::Unregister).await
}

#[cfg(test)]
mod tls_url_tests {
    use super::*;

    /// A URL names its worker by host name as DNS does, whatever the case the
    /// worker registered it in (found by a verifier: `Proxy1.Example.COM` never
    /// matched, and an endpoint synced with the URL it was given got 400).
    #[test]
    fn an_existing_url_finds_its_worker_whatever_the_case() {
        let registration: WorkerRegistration = serde_json::from_value(serde_json::json!({
            "authority": "w", "frontend_mode": "port", "hostname": "Proxy1.Example.COM",
            "port_range": [29100, 29110]
        }))
        .expect("registration");
        let row = crate::store::WorkerRow {
            id: uuid::Uuid::from_u128(7),
            body: serde_json::Value::Null,
            registration,
            status: "ALIVE".into(),
            nodes: 1,
            created_at: String::new(),
            updated_at: String::new(),
        };
        let workers = [row];
        for url in [
            "http://Proxy1.Example.COM:29100",
            "http://proxy1.example.com:29100/",
            "https://PROXY1.example.com:29110",
        ] {
            let found = existing_slot(&workers, url).map(|(id, _)| id);
            assert_eq!(found, Some(uuid::Uuid::from_u128(7)), "{url}");
        }
        assert!(existing_slot(&workers, "http://proxy2.example.com:29100").is_none());
        assert!(existing_slot(&workers, "http://proxy1.example.com:29111").is_none());
    }

    #[test]
    fn a_worker_listening_with_tls_gets_https_urls() {
        let circuit: Circuit = serde_json::from_value(serde_json::json!({
            "id": "c0a8f5d2-1111-4222-8333-444455556666", "port": 10205, "route_info": []
        }))
        .expect("circuit");
        let worker = |listen: bool, advertised: bool| -> WorkerRegistration {
            serde_json::from_value(
                serde_json::json!({"authority": "w", "frontend_mode": "port",
                "hostname": "w.example", "tls_listen": listen, "tls_advertised": advertised}),
            )
            .expect("registration")
        };
        assert_eq!(
            endpoint_url(&worker(false, false), &circuit),
            "http://w.example:10205"
        );
        assert_eq!(
            endpoint_url(&worker(true, false), &circuit),
            "https://w.example:10205"
        );
        assert_eq!(
            endpoint_url(&worker(false, true), &circuit),
            "https://w.example:10205"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::epoch_of;
    use serde_json::json;

    /// `exp` in every form the original's model takes, and none else.
    #[test]
    fn exp_is_read_as_the_originals_model_reads_it() {
        // 2026-08-20T01:02:03Z
        let t = 1_787_187_723;
        for v in [
            json!(t),
            json!(t as f64 + 0.5),
            json!(t.to_string()),
            json!("2026-08-20T01:02:03Z"),
            json!("2026-08-20T01:02:03z"),
            json!("2026-08-20t01:02:03Z"),
            json!("2026-08-20 01:02:03Z"),
            json!("2026-08-20T01:02:03"),
            json!("2026-08-20T01:02:03+00:00"),
            json!("2026-08-20T10:02:03+09:00"),
            json!("2026-08-20T10:02:03+0900"),
            json!("2026-08-20T10:02:03+09"),
            json!("2026-08-19T20:02:03-05:00"),
            json!("2026-08-20T01:02:03.25Z"),
            json!(" 2026-08-20T01:02:03Z "),
        ] {
            assert_eq!(epoch_of(&v), Some(t), "{v}");
        }
        assert_eq!(epoch_of(&json!("2026-08-20T01:02Z")), Some(t - 3));
        // Milliseconds, as pydantic reads numbers past 2×10^10.
        assert_eq!(epoch_of(&json!(t * 1000)), Some(t));
        assert_eq!(epoch_of(&json!((t * 1000).to_string())), Some(t));
        assert_eq!(epoch_of(&json!(20_000_000_000i64)), Some(20_000_000_000));
        assert_eq!(epoch_of(&json!("2026-08-20")), Some(t - 3723));
        for bad in [
            json!(null),
            json!(true),
            json!([t]),
            json!(""),
            json!("tomorrow"),
            json!("inf"),
            json!("NaN"),
            json!("1e300"),
            json!("2026-08-20X01:02:03Z"),
            json!("2026-08-20T01:02:03+24:00"),
            json!("2026-08-20T01:02:03+9"),
            json!("2026-13-20T01:02:03Z"),
        ] {
            assert_eq!(epoch_of(&bad), None, "{bad}");
        }
    }
}
