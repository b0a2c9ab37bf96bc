//! The coordinator (single node, embedded SQLite): the manager-facing `/v2/conf` and
//! `/v2/proxy/auth`, the worker registry, and circuit reads and deletes.
//!
//! Request IDs follow DESIGN.md's coordinator column: the manager's ID (or an alias) is
//! used and echoed when present, **never generated**; it is stored as the circuit's
//! `origin_request_id` (NULL when absent) and is on every log line of the request.

pub mod store;

use std::sync::Arc;

use appproxy_shared::header::IdPolicy;
use appproxy_shared::middleware::RequestIdLayer;
use appproxy_shared::model::{AppMode, Circuit, FrontendMode, ProxyProtocol, RouteInfo};
use appproxy_shared::IdVersion;
use axum::extract::{Path, Query, Request, State as Extract};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::CoordinatorConfig;
use store::{Store, StoreError};

/// Shared state of the API.
pub struct State {
    /// The store.
    pub store: Store,
    /// The shared API secret.
    pub api_secret: String,
    /// Key of `/setup` tokens.
    pub jwt_secret: String,
    /// Accept `/v2/conf` without a token.
    pub allow_unauthorized_configure_request: bool,
    /// Our URL, for `/status`.
    pub advertised_url: String,
    /// Where circuit events go (`[redis] url`), if anywhere.
    pub events: Option<redis::aio::ConnectionManager>,
}

/// Broadcasts a circuit event on `events_all-appproxy` in the platform's envelope,
/// with the request ID that caused it in the metadata.
async fn publish(state: &State, name: &str, body: Value, request_id: Option<String>) {
    use appproxy_shared::model::{
        BroadcastMessage, EventMetadata, RequestIdText, BROADCAST_CHANNEL,
    };
    let Some(conn) = &state.events else { return };
    let meta = EventMetadata {
        request_id: request_id.map(RequestIdText),
        ..Default::default()
    };
    let Ok(msg) = BroadcastMessage::encode(name, "appproxy-coordinator", &body, &meta) else {
        return;
    };
    let Ok(text) = serde_json::to_string(&msg) else {
        return;
    };
    let mut conn = conn.clone();
    match redis::cmd("PUBLISH")
        .arg(BROADCAST_CHANNEL)
        .arg(text)
        .query_async::<i64>(&mut conn)
        .await
    {
        Ok(_) => tracing::info!(event = name, "event published"),
        Err(e) => tracing::warn!(event = name, error = %e, "event not published"),
    }
}

/// An API refusal.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No or a wrong secret.
    #[error("Unauthorized access")]
    Unauthorized,
    /// A bad request.
    #[error("{0}")]
    BadRequest(String),
    /// Nothing there.
    #[error("{0}")]
    NotFound(&'static str),
    /// The token's session is not this session.
    #[error("E20007: Session ID mismatch")]
    SessionMismatch,
    /// No worker can take the circuit.
    #[error("no worker with a free slot for this circuit")]
    NoWorker,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Self::Unauthorized | Self::SessionMismatch => {
                (StatusCode::UNAUTHORIZED, "unauthorized")
            }
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid-api-params"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "object-not-found"),
            Self::NoWorker => (StatusCode::SERVICE_UNAVAILABLE, "no-available-worker"),
            Self::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal-error"),
        };
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        } else {
            tracing::info!(error = %self, "request refused");
        }
        let body = json!({
            "type": format!("https://api.backend.ai/probs/{code}"),
            "title": self.to_string(),
            "error_code": format!("appproxy_coordinator_{code}"),
            "msg": self.to_string(),
        });
        (status, Json(body)).into_response()
    }
}

fn now() -> String {
    appproxy_shared::telemetry::Rfc3339(std::time::SystemTime::now()).to_string()
}

async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, StoreError> + Send + 'static,
) -> Result<R, ApiError> {
    appproxy_shared::context::spawn_blocking(f)
        .await
        .map_err(|_| ApiError::BadRequest("internal task failed".into()))?
        .map_err(ApiError::from)
}

/// Builds the API router.
pub fn router(state: Arc<State>) -> Router {
    let authed = Router::new()
        .route("/api/worker", get(list_workers).put(register_worker))
        .route("/api/worker/{id}", axum::routing::patch(heartbeat))
        .route("/api/worker/{id}/circuits", get(worker_circuits))
        .route("/api/circuit/{id}", get(get_circuit).delete(delete_circuit))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/status", get(status))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v2/conf", post(conf))
        .route("/v2/proxy/auth", get(proxy_auth))
        .merge(authed)
        .with_state(state)
        .layer(RequestIdLayer::new(IdPolicy::ExtractOnly, IdVersion::V4))
}

fn secret_ok(headers: &HeaderMap, secret: &str) -> bool {
    let Some(v) = headers
        .get("x-backendai-token")
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    !secret.is_empty()
        && (v == secret
            || v.strip_prefix("Bearer ") == Some(secret)
            || v.strip_prefix("BackendAI ") == Some(secret))
}

async fn auth(Extract(state): Extract<Arc<State>>, req: Request, next: Next) -> Response {
    if secret_ok(req.headers(), &state.api_secret) {
        next.run(req).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

async fn status(Extract(state): Extract<Arc<State>>) -> Json<Value> {
    Json(json!({"api_version": "v2", "advertise_address": state.advertised_url}))
}

async fn conf(
    Extract(state): Extract<Arc<State>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Json<Value>, ApiError> {
    if !state.allow_unauthorized_configure_request
        && headers
            .get("x-backendai-token")
            .and_then(|v| v.to_str().ok())
            != Some(state.api_secret.as_str())
    {
        return Err(ApiError::Unauthorized);
    }
    let session = &body["session"];
    if session["id"].as_str().is_none() || session["access_key"].as_str().is_none() {
        return Err(ApiError::BadRequest("Not meant for inference apps".into()));
    }
    if body["kernel_host"].as_str().is_none() || body["kernel_port"].as_u64().is_none() {
        return Err(ApiError::BadRequest(
            "kernel_host and kernel_port are required".into(),
        ));
    }
    let id = uuid::Uuid::new_v4();
    let st = state.clone();
    blocking(move || st.store.insert_token(&id, &body)).await?;
    Ok(Json(json!({"token": id})))
}

#[derive(Deserialize)]
struct AuthQuery {
    token: uuid::Uuid,
    session_id: uuid::Uuid,
    app: String,
    protocol: String,
    #[serde(default)]
    open_to_public: Option<String>,
    #[serde(default)]
    allowed_client_ips: Option<String>,
    #[serde(default)]
    redirect: String,
    #[serde(default)]
    port: Option<u16>,
}

/// The worker with the most free ports that serves this protocol, and a port on it.
fn place(
    workers: &[store::WorkerRow],
    used: impl Fn(&uuid::Uuid) -> Vec<u16>,
    preferred: Option<u16>,
) -> Option<(uuid::Uuid, Value, u16)> {
    let mut best: Option<(usize, uuid::Uuid, Value, u16)> = None;
    for (id, body, status, _, _) in workers {
        if status != "ALIVE" || body["frontend_mode"] != "port" {
            continue;
        }
        let (Some(lo), Some(hi)) = (
            body["port_range"][0].as_u64(),
            body["port_range"][1].as_u64(),
        ) else {
            continue;
        };
        let taken = used(id);
        let free: Vec<u16> = (lo as u16..=hi as u16)
            .filter(|p| !taken.contains(p))
            .collect();
        let Some(first) = free.first().copied() else {
            continue;
        };
        let port = preferred.filter(|p| free.contains(p)).unwrap_or(first);
        if best.as_ref().is_none_or(|b| free.len() > b.0) {
            best = Some((free.len(), *id, body.clone(), port));
        }
    }
    best.map(|(_, id, body, port)| (id, body, port))
}

async fn proxy_auth(
    Extract(state): Extract<Arc<State>>,
    headers: HeaderMap,
    Query(q): Query<AuthQuery>,
) -> Result<Response, ApiError> {
    let st = state.clone();
    let token = blocking(move || st.store.token(&q.token))
        .await?
        .ok_or(ApiError::NotFound("no such token"))?;
    if token["session"]["id"].as_str() != Some(q.session_id.to_string().as_str()) {
        return Err(ApiError::SessionMismatch);
    }
    let protocol = match q.protocol.as_str() {
        "http" | "preopen" => ProxyProtocol::Http,
        "tcp" | "vnc" | "rdp" => ProxyProtocol::Tcp,
        other => {
            return Err(ApiError::BadRequest(format!(
                "unsupported protocol {other:?}"
            )))
        }
    };
    let st = state.clone();
    let workers = blocking(move || st.store.workers()).await?;
    let st = state.clone();
    let preferred = q.port;
    let placed = blocking(move || {
        let used = |w: &uuid::Uuid| st.store.used_ports(w).unwrap_or_default();
        Ok(place(&workers, used, preferred))
    })
    .await?
    .ok_or(ApiError::NoWorker)?;
    let (worker_id, worker, port) = placed;
    let now = now();
    let circuit = Circuit {
        id: uuid::Uuid::new_v4(),
        app: Some(q.app.clone()),
        protocol,
        worker: Some(worker_id),
        app_mode: AppMode::Interactive,
        frontend_mode: FrontendMode::Port,
        envs: Default::default(),
        arguments: None,
        open_to_public: q
            .open_to_public
            .as_deref()
            .is_some_and(|v| v.eq_ignore_ascii_case("true")),
        allowed_client_ips: q
            .allowed_client_ips
            .as_deref()
            .map(|s| {
                s.split(',')
                    .map(|p| p.trim().to_owned())
                    .filter(|p| !p.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
        port: Some(port),
        subdomain: None,
        user_id: token["session"]["user_uuid"]
            .as_str()
            .and_then(|s| uuid::Uuid::parse_str(s).ok()),
        endpoint_id: None,
        runtime_variant: None,
        route_info: vec![RouteInfo {
            route_id: None,
            session_id: q.session_id,
            session_name: None,
            kernel_host: token["kernel_host"].as_str().unwrap_or_default().to_owned(),
            kernel_port: token["kernel_port"].as_u64().unwrap_or(0) as u16,
            protocol,
            traffic_ratio: 1.0,
        }],
        session_ids: vec![q.session_id],
        created_at: Some(now.clone()),
        updated_at: Some(now.clone()),
    };
    // The manager's ID, or NULL: the coordinator never makes one up.
    let origin = appproxy_shared::current_request_id().map(|id| id.to_string());
    let st = state.clone();
    let stored = circuit.clone();
    let origin2 = origin.clone();
    blocking(move || st.store.insert_circuit(&stored, origin2.as_deref(), &now)).await?;
    tracing::info!(circuit = %circuit.id, worker = %worker_id, port, origin_request_id = origin.as_deref().unwrap_or(""), "circuit created");
    publish(
        &state,
        appproxy_shared::model::EVENT_CIRCUIT_CREATED,
        json!({"target_worker_authority": worker["authority"], "circuits": [circuit]}),
        origin.clone(),
    )
    .await;
    let setup = appproxy_shared::jwt::sign_hs256(
        &json!({"id": q.token, "version": "v2", "redirect": q.redirect, "circuit": circuit.id}),
        &state.jwt_secret,
    );
    let host = worker["hostname"].as_str().unwrap_or("localhost");
    let api_port = worker["api_port"].as_u64().unwrap_or(80);
    let url = format!("http://{host}:{api_port}/setup?token={setup}");
    let wants_json = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"));
    if wants_json {
        Ok((
            StatusCode::OK,
            Json(json!({"redirect_url": url, "reuse": false})),
        )
            .into_response())
    } else {
        Ok((StatusCode::PERMANENT_REDIRECT, [("location", url)]).into_response())
    }
}

async fn register_worker(
    Extract(state): Extract<Arc<State>>,
    Json(body): Json<Value>,
) -> Result<Json<Value>, ApiError> {
    let authority = body["authority"]
        .as_str()
        .ok_or_else(|| ApiError::BadRequest("authority is required".into()))?
        .to_owned();
    if body["frontend_mode"] != "port" && body["frontend_mode"] != "wildcard" {
        return Err(ApiError::BadRequest(
            "frontend_mode must be port or wildcard".into(),
        ));
    }
    let st = state.clone();
    let b = body.clone();
    let id = blocking(move || st.store.upsert_worker(&authority, &b, &now())).await?;
    tracing::info!(worker = %id, authority = body["authority"].as_str().unwrap_or(""), "worker registered");
    worker_response(&state, id).await
}

async fn worker_response(state: &Arc<State>, id: uuid::Uuid) -> Result<Json<Value>, ApiError> {
    let st = state.clone();
    let workers = blocking(move || st.store.workers()).await?;
    let (_, body, status, created, updated) = workers
        .into_iter()
        .find(|w| w.0 == id)
        .ok_or(ApiError::NotFound("no such worker"))?;
    let st = state.clone();
    let used = blocking(move || st.store.used_ports(&id)).await?;
    let total = match (
        body["port_range"][0].as_u64(),
        body["port_range"][1].as_u64(),
    ) {
        (Some(lo), Some(hi)) if hi >= lo => (hi - lo + 1) as i64,
        _ => -1,
    };
    let mut out = body;
    out["id"] = json!(id);
    out["status"] = json!(status);
    out["created_at"] = json!(created);
    out["updated_at"] = json!(updated);
    out["occupied_slots"] = json!(used.len());
    out["available_slots"] = json!(if total < 0 {
        -1
    } else {
        total - used.len() as i64
    });
    Ok(Json(out))
}

async fn heartbeat(
    Extract(state): Extract<Arc<State>>,
    Path(id): Path<uuid::Uuid>,
) -> Result<Json<Value>, ApiError> {
    let st = state.clone();
    if !blocking(move || st.store.heartbeat(&id, &now())).await? {
        return Err(ApiError::NotFound("no such worker"));
    }
    worker_response(&state, id).await
}

async fn list_workers(Extract(state): Extract<Arc<State>>) -> Result<Json<Value>, ApiError> {
    let st = state.clone();
    let workers = blocking(move || st.store.workers()).await?;
    let mut out = Vec::new();
    for (id, ..) in workers {
        out.push(worker_response(&state, id).await?.0);
    }
    Ok(Json(json!({"workers": out})))
}

async fn worker_circuits(
    Extract(state): Extract<Arc<State>>,
    Path(id): Path<uuid::Uuid>,
) -> Result<Json<Value>, ApiError> {
    let st = state.clone();
    let circuits = blocking(move || st.store.circuits_of(&id)).await?;
    // Each circuit in the wire shape, plus the ID of the request that created it so the
    // worker can deploy it under that ID (other consumers ignore the extra field).
    let list: Vec<Value> = circuits
        .into_iter()
        .map(|(c, origin)| {
            let mut v = serde_json::to_value(c).unwrap_or(Value::Null);
            v["origin_request_id"] = json!(origin);
            v
        })
        .collect();
    Ok(Json(json!({"circuits": list})))
}

async fn get_circuit(
    Extract(state): Extract<Arc<State>>,
    Path(id): Path<uuid::Uuid>,
) -> Result<Json<Value>, ApiError> {
    let st = state.clone();
    let (circuit, _) = blocking(move || st.store.circuit(&id))
        .await?
        .ok_or(ApiError::NotFound("No such circuit."))?;
    Ok(Json(
        serde_json::to_value(circuit).map_err(StoreError::from)?,
    ))
}

async fn delete_circuit(
    Extract(state): Extract<Arc<State>>,
    Path(id): Path<uuid::Uuid>,
) -> Result<Json<Value>, ApiError> {
    let st = state.clone();
    let found = blocking(move || st.store.circuit(&id)).await?;
    let st = state.clone();
    if !blocking(move || st.store.delete_circuit(&id)).await? {
        return Err(ApiError::NotFound("No such circuit."));
    }
    tracing::info!(circuit = %id, "circuit deleted");
    if let Some((circuit, _)) = found {
        let st = state.clone();
        let workers = blocking(move || st.store.workers()).await?;
        let authority = workers
            .iter()
            .find(|w| Some(w.0) == circuit.worker)
            .map(|w| w.1["authority"].clone())
            .unwrap_or(Value::Null);
        publish(
            &state,
            appproxy_shared::model::EVENT_CIRCUIT_REMOVED,
            json!({"target_worker_authority": authority, "circuits": [circuit]}),
            appproxy_shared::current_request_id().map(|i| i.to_string()),
        )
        .await;
    }
    Ok(Json(json!({"success": true})))
}

/// Serves the API until `shutdown` resolves.
pub async fn serve(
    config: &CoordinatorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<std::net::SocketAddr> {
    if config.database.url.is_some() {
        anyhow::bail!("[database] url (PostgreSQL) is not available in this build; remove it to use the embedded SQLite store");
    }
    let path = config.database.sqlite_path.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&path)).await??;
    let events = match &config.redis.url {
        Some(url) => {
            let client = redis::Client::open(url.as_str())
                .map_err(|e| anyhow::anyhow!("[redis] url {url:?}: {e}"))?;
            Some(
                redis::aio::ConnectionManager::new(client)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot connect to [redis] url {url:?}: {e}"))?,
            )
        }
        None => None,
    };
    let state = Arc::new(State {
        store,
        api_secret: config.secrets.api_secret.clone(),
        jwt_secret: config.secrets.jwt_secret.clone(),
        allow_unauthorized_configure_request: config
            .coordinator
            .allow_unauthorized_configure_request,
        advertised_url: config.coordinator.advertised_url.clone(),
        events,
    });
    let listener = tokio::net::TcpListener::bind(config.coordinator.bind).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "coordinator serving");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(addr)
}
