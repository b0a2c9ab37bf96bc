//! The storage-proxy: a manager-facing API (secret header) for vfolders and files, and
//! a client-facing API for token downloads and tus uploads, on tokio + axum.
//!
//! Every request goes through the request-ID middleware (extract or generate, echo);
//! background jobs (clone, recursive delete) keep the initiating request's ID across
//! the tasks they spawn; the periodic upload cleanup runs each pass under its own ID.

pub mod client;
pub mod manager;
pub mod quota;
pub mod volume;
pub mod zip;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use appproxy_shared::header::IdPolicy;
use appproxy_shared::middleware::RequestIdLayer;
use appproxy_shared::IdVersion;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::config::StorageConfig;
use volume::{PathError, Volumes};

/// Shared state of both APIs.
pub struct State {
    /// The volumes.
    pub volumes: Volumes,
    /// Manager API token.
    pub manager_token: String,
    /// Session-token key.
    pub session_secret: String,
    /// Session token lifetime.
    pub session_expire: Duration,
    /// Largest upload accepted.
    pub max_upload_size: u64,
    /// Staging files older than this are removed by the cleanup job.
    pub upload_expire: Duration,
    /// tus sessions with a PATCH in progress (a second one gets 409).
    pub uploading: Mutex<HashSet<String>>,
    /// Where bgtask events go (`[redis] url`), if anywhere.
    pub events: Option<redis::aio::ConnectionManager>,
    /// Last measured usage per quota scope directory (refreshed by the sync job).
    pub usage: Mutex<std::collections::HashMap<PathBuf, u64>>,
}

/// An API refusal, mapped to a status in one place.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Missing manager token.
    #[error("Forbidden (missing auth token)")]
    MissingToken,
    /// Wrong manager token.
    #[error("Forbidden (invalid auth token)")]
    InvalidToken,
    /// A bad path or ID.
    #[error(transparent)]
    Path(#[from] PathError),
    /// Bad request parameters.
    #[error("Invalid API parameters: {0}")]
    Params(String),
    /// A session token that is invalid or expired.
    #[error("invalid or expired token")]
    Session,
    /// Nothing there.
    #[error("File not found")]
    NotFound,
    /// A tus offset mismatch or a concurrent PATCH.
    #[error("conflict: {0}")]
    Conflict(&'static str),
    /// Too large.
    #[error("upload larger than the limit")]
    TooLarge,
    /// The quota scope would pass its limit.
    #[error("quota exceeded: {used} of {limit} bytes used")]
    QuotaExceeded {
        /// Bytes used now.
        used: u64,
        /// The limit.
        limit: u64,
    },
    /// A filesystem error.
    #[error("filesystem error: {0}")]
    Io(#[from] std::io::Error),
}

impl ApiError {
    fn status_and_kind(&self) -> (StatusCode, &'static str) {
        match self {
            Self::MissingToken | Self::InvalidToken => (StatusCode::FORBIDDEN, "forbidden"),
            Self::Path(PathError::NoFolder) | Self::NotFound => {
                (StatusCode::NOT_FOUND, "file-not-found")
            }
            Self::Path(_) | Self::Params(_) => (StatusCode::BAD_REQUEST, "invalid-api-params"),
            Self::Session => (StatusCode::UNAUTHORIZED, "invalid-token"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too-large"),
            Self::QuotaExceeded { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "quota-exceeded"),
            Self::Io(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (StatusCode::NOT_FOUND, "file-not-found")
            }
            Self::Io(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                (StatusCode::CONFLICT, "conflict")
            }
            Self::Io(_) => (StatusCode::BAD_REQUEST, "filesystem-error"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = self.status_and_kind();
        if status.is_server_error() || matches!(self, Self::Io(_)) {
            tracing::warn!(error = %self, "request failed");
        } else {
            tracing::info!(error = %self, "request refused");
        }
        let body = serde_json::json!({
            "type": format!("https://api.backend.ai/probs/storage/{kind}"),
            "title": self.to_string(),
            "request_id": appproxy_shared::current_request_id().map(|i| i.to_string()),
        });
        (status, axum::Json(body)).into_response()
    }
}

/// The channel bgtask events are broadcast on.
pub const EVENT_CHANNEL: &str = "events_all";

/// Broadcasts an event in the platform's envelope, with the current request ID in
/// its metadata. Without `[redis]` there is no event bus and nothing is sent.
pub async fn emit(state: &State, name: &str, payload: serde_json::Value) {
    use appproxy_shared::model::{BroadcastMessage, EventMetadata};
    let Some(conn) = &state.events else { return };
    let meta = EventMetadata {
        request_id: appproxy_shared::current_request_id().map(Into::into),
        ..Default::default()
    };
    let Ok(msg) = BroadcastMessage::encode(name, "storage-proxy", &payload, &meta) else {
        return;
    };
    let Ok(text) = serde_json::to_string(&msg) else {
        return;
    };
    let mut conn = conn.clone();
    if let Err(e) = redis::cmd("PUBLISH")
        .arg(EVENT_CHANNEL)
        .arg(text)
        .query_async::<i64>(&mut conn)
        .await
    {
        tracing::warn!(event = name, error = %e, "event not published");
    }
}

/// Builds the state from the config (without an event bus).
pub fn state(config: &StorageConfig) -> std::io::Result<Arc<State>> {
    state_with_events(config, None)
}

/// Builds the state from the config and an event-bus connection.
pub fn state_with_events(
    config: &StorageConfig,
    events: Option<redis::aio::ConnectionManager>,
) -> std::io::Result<Arc<State>> {
    let volumes: Vec<(String, PathBuf)> = config
        .volumes
        .iter()
        .map(|v| (v.name.clone(), v.path.clone()))
        .collect();
    Ok(Arc::new(State {
        volumes: Volumes::new(&volumes)?,
        manager_token: config.secrets.manager_token.clone(),
        session_secret: config.secrets.session_secret.clone(),
        session_expire: Duration::from_secs(config.storage.session_expire_secs),
        max_upload_size: config.storage.max_upload_size,
        upload_expire: Duration::from_secs(config.storage.upload_expire_secs),
        uploading: Mutex::new(HashSet::new()),
        events,
        usage: Mutex::new(std::collections::HashMap::new()),
    }))
}

/// Serves both APIs until `shutdown` resolves; runs the cleanup job meanwhile.
pub async fn serve(
    config: &StorageConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let events = match &config.redis.url {
        Some(url) => {
            let client = redis::Client::open(url.as_str())
                .map_err(|e| anyhow::anyhow!("[redis] url {url:?}: {e}"))?;
            let conn = redis::aio::ConnectionManager::new(client)
                .await
                .map_err(|e| anyhow::anyhow!("cannot connect to [redis] url {url:?}: {e}"))?;
            Some(conn)
        }
        None => None,
    };
    let state = state_with_events(config, events)?;
    let layer = RequestIdLayer::new(IdPolicy::GenerateIfMissing, IdVersion::V4);
    let manager_app = manager::router(state.clone()).layer(layer);
    let client_app = client::router(state.clone()).layer(layer);
    let manager = tokio::net::TcpListener::bind(config.storage.manager_bind).await?;
    let client = tokio::net::TcpListener::bind(config.storage.client_bind).await?;
    let addrs = (manager.local_addr()?, client.local_addr()?);
    tracing::info!(manager = %addrs.0, client = %addrs.1, "storage-proxy serving");
    let (tx, rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let (rx_m, rx_c) = (rx.clone(), rx.clone());
    let m = tokio::spawn(async move {
        axum::serve(manager, manager_app)
            .with_graceful_shutdown(wait(rx_m))
            .await
    });
    let c = tokio::spawn(async move {
        axum::serve(client, client_app)
            .with_graceful_shutdown(wait(rx_c))
            .await
    });
    let cleanup = tokio::spawn(cleanup_loop(
        state.clone(),
        Duration::from_secs(config.storage.cleanup_interval_secs.max(1)),
    ));
    shutdown.await;
    let _ = tx.send(true);
    cleanup.abort();
    let _ = m.await;
    let _ = c.await;
    Ok(addrs)
}

/// Removes staging files of uploads idle past their lifetime; each pass under its own
/// request ID.
async fn cleanup_loop(state: Arc<State>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let st = state.clone();
        appproxy_shared::context::spawn_background(IdVersion::V4, async move {
            let removed = appproxy_shared::context::spawn_blocking({
                let st = st.clone();
                move || remove_expired_uploads(&st)
            })
            .await
            .unwrap_or(0);
            tracing::info!(removed, "expired-upload cleanup pass");
        })
        .await
        .ok();
        let st = state.clone();
        appproxy_shared::context::spawn_background(IdVersion::V4, async move {
            let scopes = appproxy_shared::context::spawn_blocking({
                let st = st.clone();
                move || quota::sync(&st)
            })
            .await
            .unwrap_or(0);
            tracing::info!(scopes, "quota usage sync pass");
        })
        .await
        .ok();
    }
}

/// One cleanup pass (blocking); returns how many staging files were removed.
pub fn remove_expired_uploads(state: &State) -> usize {
    let mut removed = 0;
    for name in state.volumes.names() {
        let Ok(root) = state.volumes.root(name) else {
            continue;
        };
        // Staging lives in `<folder>/.upload/<session>`; walk the scope/xx/yy/rest levels.
        let mut stack = vec![(root.to_path_buf(), 0)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                if depth == 4 && e.file_name() == ".upload" {
                    let Ok(files) = std::fs::read_dir(&path) else {
                        continue;
                    };
                    for f in files.flatten() {
                        let old = f
                            .metadata()
                            .and_then(|m| m.modified())
                            .ok()
                            .and_then(|t| t.elapsed().ok())
                            .is_some_and(|age| age > state.upload_expire);
                        if old && std::fs::remove_file(f.path()).is_ok() {
                            tracing::info!(session = %f.file_name().to_string_lossy(), "expired upload removed");
                            removed += 1;
                        }
                    }
                } else if depth < 4 && e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((path, depth + 1));
                }
            }
        }
    }
    removed
}
