//! The manager-facing API (`X-BackendAI-Storage-Auth-Token`): volumes, vfolders,
//! files, and the session tokens of uploads and downloads.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State as Extract};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::volume::resolve;
use super::{ApiError, State};

/// The manager-facing router.
pub fn router(state: Arc<State>) -> Router {
    let authed = Router::new()
        .route("/volumes", get(volumes))
        .route("/folder/create", post(create))
        .route("/folder/delete", post(delete_folder))
        .route("/folder/clone", post(clone_folder))
        .route("/folder/usage", post(usage))
        .route("/folder/file/list", post(list))
        .route("/folder/file/mkdir", post(mkdir))
        .route("/folder/file/rename", post(rename))
        .route("/folder/file/move", post(move_file))
        .route("/folder/file/delete", post(delete_files))
        .route("/folder/file/delete-async", post(delete_files_async))
        .route(
            "/quota-scope",
            get(quota_get).post(quota_get).patch(quota_patch),
        )
        .route("/quota-scope/quota", axum::routing::delete(quota_delete))
        .route("/folder/file/upload", post(upload_token))
        .route("/folder/file/download", post(download_token))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/", get(status))
        .route("/status", get(status))
        .route("/health", get(status))
        .route("/livez", get(status))
        .route("/readyz", get(status))
        .merge(authed)
        .with_state(state)
}

async fn auth(Extract(state): Extract<Arc<State>>, req: Request, next: Next) -> Response {
    match req.headers().get("x-backendai-storage-auth-token") {
        None => ApiError::MissingToken.into_response(),
        Some(v)
            if v.as_bytes() != state.manager_token.as_bytes() || state.manager_token.is_empty() =>
        {
            ApiError::InvalidToken.into_response()
        }
        Some(_) => next.run(req).await,
    }
}

async fn status() -> Json<Value> {
    Json(
        json!({"status": "ok", "type": "manager-facing", "storage-proxy": env!("CARGO_PKG_VERSION")}),
    )
}

async fn volumes(Extract(state): Extract<Arc<State>>) -> Json<Value> {
    let list: Vec<Value> = state
        .volumes
        .names()
        .into_iter()
        .map(|n| json!({"name": n, "backend": "vfs", "capabilities": ["vfolder"]}))
        .collect();
    Json(json!({"volumes": list}))
}

#[derive(Deserialize)]
struct FolderReq {
    volume: String,
    vfid: String,
}

#[derive(Deserialize)]
struct CreateReq {
    volume: String,
    vfid: String,
    #[serde(default)]
    options: Option<CreateOptions>,
}

#[derive(Deserialize)]
struct CreateOptions {
    #[serde(default)]
    initial_max_size_for_quota_scope: Option<u64>,
}

async fn create(
    Extract(state): Extract<Arc<State>>,
    Json(r): Json<CreateReq>,
) -> Result<StatusCode, ApiError> {
    let dir = state.volumes.folder(&r.volume, &r.vfid)?;
    tokio::fs::create_dir_all(&dir).await?;
    if let Some(limit) = r.options.and_then(|o| o.initial_max_size_for_quota_scope) {
        let scope = state.volumes.scope_of(&r.volume, &r.vfid)?;
        if super::quota::limit(&scope).is_none() {
            super::quota::set_limit(&scope, Some(limit))?;
        }
    }
    tracing::info!(vfid = %r.vfid, "vfolder created");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct QuotaReq {
    volume: String,
    qsid: String,
    #[serde(default)]
    options: Option<QuotaOptions>,
}

#[derive(Deserialize)]
struct QuotaOptions {
    limit_bytes: u64,
}

async fn quota_get(
    Extract(state): Extract<Arc<State>>,
    Json(r): Json<QuotaReq>,
) -> Result<Json<Value>, ApiError> {
    let scope = state.volumes.scope(&r.volume, &r.qsid)?;
    let used = appproxy_shared::context::spawn_blocking({
        let scope = scope.clone();
        move || super::quota::usage(&scope)
    })
    .await
    .map_err(std::io::Error::other)?;
    Ok(Json(
        json!({"used_bytes": used, "limit_bytes": super::quota::limit(&scope)}),
    ))
}

async fn quota_patch(
    Extract(state): Extract<Arc<State>>,
    Json(r): Json<QuotaReq>,
) -> Result<StatusCode, ApiError> {
    let scope = state.volumes.scope(&r.volume, &r.qsid)?;
    let limit = r
        .options
        .ok_or_else(|| ApiError::Params("options.limit_bytes is required".into()))?
        .limit_bytes;
    super::quota::set_limit(&scope, Some(limit))?;
    tracing::info!(qsid = %r.qsid, limit, "quota set");
    Ok(StatusCode::NO_CONTENT)
}

async fn quota_delete(
    Extract(state): Extract<Arc<State>>,
    Json(r): Json<QuotaReq>,
) -> Result<StatusCode, ApiError> {
    let scope = state.volumes.scope(&r.volume, &r.qsid)?;
    super::quota::set_limit(&scope, None)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Starts a background job under the current request's ID; every task it spawns
/// inherits it, and its done/failed events carry it in their metadata.
fn bgtask<F>(state: &Arc<State>, name: &'static str, job: F) -> Json<Value>
where
    F: std::future::Future<Output = Result<u64, std::io::Error>> + Send + 'static,
{
    let id = uuid::Uuid::new_v4();
    let state = state.clone();
    appproxy_shared::context::spawn(async move {
        tracing::info!(bgtask_id = %id, task = name, "bgtask started");
        super::emit(
            &state,
            "bgtask_updated",
            json!({"task_id": id, "message": format!("{name} started")}),
        )
        .await;
        match job.await {
            Ok(n) => {
                tracing::info!(bgtask_id = %id, task = name, items = n, "bgtask done");
                super::emit(
                    &state,
                    "bgtask_done",
                    json!({"task_id": id, "message": format!("{name}: {n} items")}),
                )
                .await;
            }
            Err(e) => {
                tracing::warn!(bgtask_id = %id, task = name, error = %e, "bgtask failed");
                super::emit(
                    &state,
                    "bgtask_failed",
                    json!({"task_id": id, "message": e.to_string()}),
                )
                .await;
            }
        }
    });
    Json(json!({"bgtask_id": id}))
}

async fn delete_folder(
    Extract(state): Extract<Arc<State>>,
    Json(r): Json<FolderReq>,
) -> Result<Response, ApiError> {
    let dir = state.volumes.existing_folder(&r.volume, &r.vfid)?;
    let body = bgtask(&state, "delete_vfolder", async move {
        tokio::fs::remove_dir_all(&dir).await?;
        Ok(1)
    });
    Ok((StatusCode::ACCEPTED, body).into_response())
}

#[derive(Deserialize)]
struct CloneReq {
    src_volume: String,
    src_vfid: String,
    dst_volume: Option<String>,
    dst_vfid: String,
}

/// Copies a tree; each directory level is copied by a task of its own, all under the
/// initiating request's ID.
fn copy_tree(
    src: PathBuf,
    dst: PathBuf,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<u64>> + Send>> {
    Box::pin(async move {
        tokio::fs::create_dir_all(&dst).await?;
        let mut entries = tokio::fs::read_dir(&src).await?;
        let mut count = 0;
        let mut subdirs = Vec::new();
        while let Some(e) = entries.next_entry().await? {
            let ty = e.file_type().await?;
            let to = dst.join(e.file_name());
            if ty.is_dir() {
                subdirs.push(appproxy_shared::context::spawn(copy_tree(e.path(), to)));
            } else if ty.is_file() {
                tokio::fs::copy(e.path(), &to).await?;
                count += 1;
            }
            // Symlinks are not followed or copied: they could point anywhere.
        }
        for t in subdirs {
            count += t.await.map_err(std::io::Error::other)??;
        }
        tracing::debug!(dir = %dst.display(), "directory cloned");
        Ok(count)
    })
}

async fn clone_folder(
    Extract(state): Extract<Arc<State>>,
    Json(r): Json<CloneReq>,
) -> Result<Json<Value>, ApiError> {
    let dst_volume = r.dst_volume.unwrap_or_else(|| r.src_volume.clone());
    if dst_volume != r.src_volume {
        return Err(ApiError::Params(
            "cross-volume clone is not supported".into(),
        ));
    }
    let src = state.volumes.existing_folder(&r.src_volume, &r.src_vfid)?;
    let dst = state.volumes.folder(&dst_volume, &r.dst_vfid)?;
    if dst.exists() {
        return Err(ApiError::Params("destination vfolder exists".into()));
    }
    Ok(bgtask(&state, "clone_vfolder", copy_tree(src, dst)))
}

async fn usage(
    Extract(state): Extract<Arc<State>>,
    Json(r): Json<FolderReq>,
) -> Result<Json<Value>, ApiError> {
    let dir = state.volumes.existing_folder(&r.volume, &r.vfid)?;
    let (files, bytes) = appproxy_shared::context::spawn_blocking(move || du(&dir))
        .await
        .map_err(std::io::Error::other)?;
    Ok(Json(json!({"file_count": files, "used_bytes": bytes})))
}

fn du(dir: &Path) -> (u64, u64) {
    super::quota::walk(dir, |name| name != ".upload")
}

#[derive(Deserialize)]
struct PathReq {
    volume: String,
    vfid: String,
    #[serde(default = "dot")]
    relpath: String,
}

fn dot() -> String {
    ".".into()
}

fn iso(t: std::io::Result<std::time::SystemTime>) -> String {
    t.map(|t| appproxy_shared::telemetry::Rfc3339(t).to_string())
        .unwrap_or_default()
}

async fn list(
    Extract(state): Extract<Arc<State>>,
    Json(r): Json<PathReq>,
) -> Result<Json<Value>, ApiError> {
    let root = state.volumes.existing_folder(&r.volume, &r.vfid)?;
    let dir = resolve(&root, &r.relpath)?;
    let mut entries = tokio::fs::read_dir(&dir).await?;
    let mut items = Vec::new();
    while let Some(e) = entries.next_entry().await? {
        if dir == root && e.file_name() == ".upload" {
            continue;
        }
        let meta = tokio::fs::symlink_metadata(e.path()).await?;
        let (ty, target) = if meta.is_symlink() {
            (
                "SYMLINK",
                tokio::fs::read_link(e.path())
                    .await
                    .ok()
                    .map(|p| p.display().to_string()),
            )
        } else if meta.is_dir() {
            ("DIRECTORY", None)
        } else {
            ("FILE", None)
        };
        use std::os::unix::fs::MetadataExt as _;
        items.push(json!({
            "name": e.file_name().to_string_lossy(),
            "type": ty,
            "stat": {"mode": meta.mode(), "size": meta.len(), "created": iso(meta.created()), "modified": iso(meta.modified())},
            "symlink_target": target,
        }));
    }
    items.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Ok(Json(json!({"items": items})))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct MkdirReq {
    volume: String,
    vfid: String,
    relpath: OneOrMany,
    #[serde(default)]
    parents: bool,
    #[serde(default)]
    exist_ok: bool,
}

async fn mkdir(
    Extract(state): Extract<Arc<State>>,
    Json(r): Json<MkdirReq>,
) -> Result<Response, ApiError> {
    let root = state.volumes.existing_folder(&r.volume, &r.vfid)?;
    let paths = match r.relpath {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    };
    if paths.len() > 50 {
        return Err(ApiError::Params("at most 50 paths".into()));
    }
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    for p in paths {
        let result = match resolve(&root, &p) {
            Err(e) => Err(e.to_string()),
            Ok(path) => {
                let made = if r.parents {
                    tokio::fs::create_dir_all(&path).await
                } else {
                    tokio::fs::create_dir(&path).await
                };
                match made {
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && r.exist_ok => Ok(()),
                    other => other.map_err(|e| e.to_string()),
                }
            }
        };
        match result {
            Ok(()) => ok.push(json!({"msg": null, "item": p})),
            Err(msg) => failed.push(json!({"msg": msg, "item": p})),
        }
    }
    let status = match (ok.is_empty(), failed.is_empty()) {
        (_, true) => StatusCode::OK,
        (false, false) => StatusCode::MULTI_STATUS,
        (true, false) => StatusCode::UNPROCESSABLE_ENTITY,
    };
    Ok((
        status,
        Json(json!({"results": {"success": ok, "failed": failed}})).into_response(),
    )
        .into_response())
}

#[derive(Deserialize)]
struct RenameReq {
    volume: String,
    vfid: String,
    relpath: String,
    new_name: String,
}

async fn rename(
    Extract(state): Extract<Arc<State>>,
    Json(r): Json<RenameReq>,
) -> Result<StatusCode, ApiError> {
    if r.new_name.is_empty() || r.new_name.contains('/') || r.new_name == ".." || r.new_name == "."
    {
        return Err(ApiError::Params("new_name must be a plain name".into()));
    }
    let root = state.volumes.existing_folder(&r.volume, &r.vfid)?;
    let from = resolve(&root, &r.relpath)?;
    let to = from.with_file_name(&r.new_name);
    resolve(
        &root,
        to.strip_prefix(&root)
            .map_err(|_| ApiError::Params("bad path".into()))?
            .to_string_lossy()
            .as_ref(),
    )?;
    tokio::fs::rename(&from, &to).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct MoveReq {
    volume: String,
    vfid: String,
    src_relpath: String,
    dst_relpath: String,
}

async fn move_file(
    Extract(state): Extract<Arc<State>>,
    Json(r): Json<MoveReq>,
) -> Result<StatusCode, ApiError> {
    let root = state.volumes.existing_folder(&r.volume, &r.vfid)?;
    let from = resolve(&root, &r.src_relpath)?;
    let to = resolve(&root, &r.dst_relpath)?;
    tokio::fs::rename(&from, &to).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct DeleteReq {
    volume: String,
    vfid: String,
    relpaths: Vec<String>,
    #[serde(default)]
    recursive: bool,
}

/// Resolves every path of a delete first: one bad path and nothing is touched.
fn deletion_targets(state: &State, r: &DeleteReq) -> Result<Vec<PathBuf>, ApiError> {
    let root = state.volumes.existing_folder(&r.volume, &r.vfid)?;
    let paths = r
        .relpaths
        .iter()
        .map(|p| resolve(&root, p))
        .collect::<Result<Vec<_>, _>>()?;
    if paths.iter().any(|p| p == &root) {
        return Err(ApiError::Params(
            "refusing to delete the vfolder root".into(),
        ));
    }
    Ok(paths)
}

/// Deletes files and directories (a non-empty directory only when `recursive`).
async fn delete_paths(paths: Vec<PathBuf>, recursive: bool) -> std::io::Result<u64> {
    let mut n = 0;
    for p in paths {
        let meta = tokio::fs::symlink_metadata(&p).await?;
        if meta.is_dir() && recursive {
            tokio::fs::remove_dir_all(&p).await?;
        } else if meta.is_dir() {
            tokio::fs::remove_dir(&p).await?;
        } else {
            tokio::fs::remove_file(&p).await?;
        }
        tracing::debug!(path = %p.display(), "deleted");
        n += 1;
    }
    Ok(n)
}

async fn delete_files(
    Extract(state): Extract<Arc<State>>,
    Json(r): Json<DeleteReq>,
) -> Result<Json<Value>, ApiError> {
    let paths = deletion_targets(&state, &r)?;
    delete_paths(paths, r.recursive).await?;
    Ok(Json(json!({"status": "ok"})))
}

async fn delete_files_async(
    Extract(state): Extract<Arc<State>>,
    Json(r): Json<DeleteReq>,
) -> Result<Response, ApiError> {
    let paths = deletion_targets(&state, &r)?;
    let body = bgtask(&state, "delete_files", delete_paths(paths, r.recursive));
    Ok((StatusCode::ACCEPTED, body).into_response())
}

#[derive(Deserialize)]
struct UploadReq {
    volume: String,
    vfid: String,
    relpath: String,
    size: u64,
}

async fn upload_token(
    Extract(state): Extract<Arc<State>>,
    Json(r): Json<UploadReq>,
) -> Result<Json<Value>, ApiError> {
    if r.size > state.max_upload_size {
        return Err(ApiError::TooLarge);
    }
    let root = state.volumes.existing_folder(&r.volume, &r.vfid)?;
    resolve(&root, &r.relpath)?;
    let scope = state.volumes.scope_of(&r.volume, &r.vfid)?;
    let size = r.size;
    {
        let state = state.clone();
        appproxy_shared::context::spawn_blocking(move || super::quota::check(&state, &scope, size))
            .await
            .map_err(std::io::Error::other)??;
    }
    let session = uuid::Uuid::new_v4().simple().to_string();
    let staging = root.join(".upload");
    tokio::fs::create_dir_all(&staging).await?;
    tokio::fs::File::create(staging.join(&session)).await?;
    let exp = appproxy_shared::jwt::now_epoch() as u64 + state.session_expire.as_secs();
    let token = appproxy_shared::jwt::sign_hs256(
        &json!({"op": "upload", "volume": r.volume, "vfid": r.vfid, "relpath": r.relpath, "size": r.size, "session": session, "exp": exp}),
        &state.session_secret,
    );
    tracing::info!(session = %session, size = r.size, "upload session created");
    Ok(Json(json!({"token": token})))
}

async fn download_token(
    Extract(state): Extract<Arc<State>>,
    Json(r): Json<PathReq>,
) -> Result<Json<Value>, ApiError> {
    let root = state.volumes.existing_folder(&r.volume, &r.vfid)?;
    resolve(&root, &r.relpath)?;
    let exp = appproxy_shared::jwt::now_epoch() as u64 + state.session_expire.as_secs();
    let token = appproxy_shared::jwt::sign_hs256(
        &json!({"op": "download", "volume": r.volume, "vfid": r.vfid, "relpath": r.relpath, "exp": exp}),
        &state.session_secret,
    );
    Ok(Json(json!({"token": token})))
}
