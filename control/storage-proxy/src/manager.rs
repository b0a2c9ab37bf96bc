//! The manager-facing API (`X-BackendAI-Storage-Auth-Token`): volumes, vfolders,
//! files, and the session tokens of uploads and downloads. Every path is resolved by
//! the kernel beneath the vfolder's descriptor and every change is an `*at` call on
//! a parent descriptor (see `fsx`).

use std::ffi::OsString;
use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::sync::Arc;

use appproxy_control_common::server;
use axum::extract::{Request, State as Extract};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use super::volume::{PathError, Vfid, Volumes};
use super::wirename::{self, OneOrMany, WirePath};
use super::{blocking, fsx, quota, ApiError, ApiJson, State};

/// The manager-facing router.
pub fn router(state: Arc<State>) -> Router {
    let authed = Router::new()
        .route("/volumes", get(volumes))
        .route("/folder/create", post(create))
        .route("/folder/delete", post(delete_folder))
        .route("/folder/clone", post(clone_folder))
        .route("/folder/usage", get(usage).post(usage))
        .route("/folder/used-bytes", get(used_bytes))
        .route("/folder/fs-usage", get(fs_usage))
        .route("/folder/mount", get(mount))
        .route("/folder/metadata", get(metadata).post(metadata))
        .route("/folder/file/fetch", post(fetch))
        .route(
            "/folder/file/archive-download-token",
            post(archive_download_token),
        )
        .route("/volume/hwinfo", get(hwinfo))
        .route("/volume/performance-metric", get(performance_metric))
        .route("/volume/quota", get(volume_quota).patch(volume_quota))
        .route("/folder/file/list", post(list))
        .route("/folder/file/mkdir", post(mkdir))
        .route("/folder/file/rename", post(rename))
        .route("/folder/file/move", post(move_file))
        .route("/folder/file/delete", post(delete_files))
        .route("/folder/file/delete-async", post(delete_files_async))
        .route(
            "/quota-scope",
            get(quota_get).post(quota_create).patch(quota_patch),
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
        .route("/metrics", get(metrics))
        .merge(authed)
        .with_state(state)
}

async fn auth(Extract(state): Extract<Arc<State>>, req: Request, next: Next) -> Response {
    // Given twice, the token is refused (400, naming the field) whatever either
    // copy holds: which copy a check read would be a guess, and a front proxy or
    // log reading the other sees another caller. Before, the first copy was taken
    // (the secret then a wrong value passed; an outside tester's find).
    if let Err(e) = super::client::once(req.headers(), "X-BackendAI-Storage-Auth-Token") {
        return e.into_response();
    }
    match req.headers().get("x-backendai-storage-auth-token") {
        None => ApiError::MissingToken.into_response(),
        Some(v) if !server::secret_matches(v.as_bytes(), state.manager_token.as_bytes()) => {
            ApiError::InvalidToken.into_response()
        }
        // Past the token: the body (small JSON) is read whole within its deadline, so
        // a body that stalls or trickles cannot hold the connection for ever.
        Some(_) => match server::read_body_within(req, state.body_read, MAX_BODY).await {
            Ok(req) => next.run(req).await,
            Err(failure) => server::closing(
                match failure {
                    server::BodyFailure::Late => {
                        ApiError::TimedOut("request body not received in time".into())
                    }
                    server::BodyFailure::TooLarge => ApiError::Rejected {
                        status: StatusCode::PAYLOAD_TOO_LARGE,
                        message: "request body too large".into(),
                    },
                    server::BodyFailure::Cut(e) => {
                        ApiError::Params(format!("request body not read: {e}"))
                    }
                }
                .into_response(),
            ),
        },
    }
}

/// The largest manager API body (JSON): axum's default limit, which its extractors
/// apply as well.
const MAX_BODY: usize = 2 << 20;

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
    /// Permission bits of the vfolder's directory (the original's default 0o755).
    #[serde(default)]
    mode: Option<u32>,
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
    ApiJson(r): ApiJson<CreateReq>,
) -> Result<StatusCode, ApiError> {
    let vfid = Vfid::parse(&r.vfid)?;
    let parts = vfid.parts();
    // An old-style vfid has no quota scope (it lies directly under the volume
    // root): a limit asked for it has nowhere to go, and is not set on the root.
    let scope_name = vfid.scope_name();
    state.volumes.root_fd(&r.volume)?;
    let limit = r.options.and_then(|o| o.initial_max_size_for_quota_scope);
    let mode = r.mode;
    let (st, key) = (state.clone(), state.volumes.scope_of(&r.volume, &r.vfid)?);
    blocking(move || {
        let root = st.volumes.root_fd(&r.volume)?;
        // The volume's own levels are never symlinks: STRICT all the way. The
        // vfolder itself is made with `mode` as the original's `makedirs(mode=…)`
        // makes it: through the process's umask (a service's 022: never writable by
        // others), with no set-user-ID or set-group-ID bit, which a directory's
        // `mkdir` never takes (the sticky bit it does take, as the original's), and
        // only when it is made; an existing one keeps its mode. (It was `fchmod`ed to `mode & 0o7777`, past the umask, each time:
        // `0o7777` gave a world-writable, set-ID, sticky vfolder.)
        let (name, parents) = parts
            .split_last()
            .ok_or_else(|| ApiError::Params("empty vfid".into()))?;
        let parent = fsx::mkdirs(root, parents, fsx::STRICT)?;
        // The scope's limit first: a limit that cannot be written (the volume
        // full) fails the creation before the vfolder is there. Before, the
        // vfolder was made first and stayed, unlimited, after the failure, and an
        // upload of any size into it was granted (an outside tester's find).
        if let (Some(limit), Some(name)) = (limit, scope_name) {
            let scope = fsx::child_dir(root, std::ffi::OsStr::new(&name))?;
            if quota::limit(scope.as_fd()).is_none() {
                quota::set_limit(scope.as_fd(), Some(limit))?;
                limit_set(&st, &key);
            }
        }
        let mode = Mode::from_raw_mode(mode.unwrap_or(0o755) & 0o7777);
        match rustix::fs::mkdirat(&parent, name.as_os_str(), mode) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        // A directory, reached without a symlink.
        fsx::mkdirs(root, &parts, fsx::STRICT)?;
        Ok(())
    })
    .await?;
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

/// The usage, limit and reservations of an existing scope (see `quota::report`:
/// the quota's measurement serves it while young enough, no walk per report).
async fn quota_state(
    state: &Arc<State>,
    volume: String,
    qsid: &str,
) -> Result<Json<Value>, ApiError> {
    let name = Volumes::scope_name(qsid)?;
    let key = state.volumes.scope(&volume, qsid)?;
    let limit = {
        let (st, volume, name, key) = (state.clone(), volume.clone(), name.clone(), key.clone());
        blocking(move || {
            let scope = match st.volumes.open_scope(&volume, &name) {
                Ok(fd) => fd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ApiError::NotFound)
                }
                Err(e) => return Err(e.into()),
            };
            let limit = quota::limit(scope.as_fd());
            quota::remember_limit(&st, &key, limit);
            Ok(limit)
        })
        .await?
    };
    let (used, reserved) = quota::report(state, &key, &volume, &name).await?;
    Ok(Json(json!({
        "used_bytes": used,
        "limit_bytes": limit,
        "reserved_bytes": reserved,
    })))
}

/// `GET /quota-scope`: 404 when the scope does not exist (as the original).
async fn quota_get(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<QuotaReq>,
) -> Result<Json<Value>, ApiError> {
    quota_state(&state, r.volume, &r.qsid).await
}

/// `POST /quota-scope`: creates the scope if missing, sets its limit when `options`
/// has one, and answers with its state.
async fn quota_create(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<QuotaReq>,
) -> Result<Json<Value>, ApiError> {
    let name = Volumes::scope_name(&r.qsid)?;
    let limit = r.options.map(|o| o.limit_bytes);
    let (st, volume) = (state.clone(), r.volume.clone());
    let key = state.volumes.scope(&r.volume, &r.qsid)?;
    blocking(move || {
        let root = st.volumes.root_fd(&volume)?;
        let scope = fsx::mkdirs(root, &[name.into()], fsx::STRICT)?;
        if limit.is_some() {
            quota::set_limit(scope.as_fd(), limit)?;
            limit_set(&st, &key);
        }
        Ok(())
    })
    .await?;
    if limit.is_some() {
        tracing::info!(qsid = %r.qsid, limit, "quota set");
    }
    quota_state(&state, r.volume, &r.qsid).await
}

/// A limit was set on a scope: its first check measures it again. While it had
/// none, uploads wrote staged bytes that no reservation held and that no
/// measurement saw; they count against the limit from its first check on
/// (blocking: takes the scope's lock).
fn limit_set(state: &State, scope: &std::path::Path) {
    state.reservations.removed(scope);
}

async fn quota_patch(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<QuotaReq>,
) -> Result<StatusCode, ApiError> {
    let name = Volumes::scope_name(&r.qsid)?;
    let limit = r
        .options
        .ok_or_else(|| ApiError::Params("options.limit_bytes is required".into()))?
        .limit_bytes;
    let st = state.clone();
    let (volume, qsid) = (r.volume.clone(), r.qsid.clone());
    blocking(move || {
        let root = st.volumes.root_fd(&volume)?;
        let scope = fsx::mkdirs(root, &[name.into()], fsx::STRICT)?;
        quota::set_limit(scope.as_fd(), Some(limit))?;
        if let Ok(key) = st.volumes.scope(&volume, &qsid) {
            quota::remember_limit(&st, &key, Some(limit));
            limit_set(&st, &key);
        }
        Ok(())
    })
    .await?;
    tracing::info!(qsid = %r.qsid, limit, "quota set");
    Ok(StatusCode::NO_CONTENT)
}

async fn quota_delete(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<QuotaReq>,
) -> Result<StatusCode, ApiError> {
    let name = Volumes::scope_name(&r.qsid)?;
    let st = state.clone();
    blocking(move || {
        match st.volumes.open_scope(&r.volume, &name) {
            Ok(scope) => {
                quota::set_limit(scope.as_fd(), None)?;
                if let Ok(key) = st.volumes.scope(&r.volume, &r.qsid) {
                    quota::remember_limit(&st, &key, None);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ApiError::NotFound),
            Err(e) => return Err(e.into()),
        }
        Ok(())
    })
    .await?;
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
    // Counted before it is spawned: a stop that comes between its answer and its
    // first poll waits for it too (it is told cancelled). Before, such a task was
    // dropped with the runtime unstarted: its ID answered, never an event (an
    // outside verifier's find).
    let running = Running::new(&state);
    appproxy_shared::context::spawn_child(async move {
        let _running = running;
        tracing::info!(bgtask_id = %id, task = name, "bgtask started");
        super::emit(
            &state,
            "bgtask_updated",
            json!({"task_id": id, "message": format!("{name} started")}),
        )
        .await;
        let mut job = std::pin::pin!(job);
        let outcome = tokio::select! {
            biased;
            r = job.as_mut() => Some(r),
            () = state.stopped() => tokio::time::timeout(BGTASK_STOP_GRACE, job).await.ok(),
        };
        // Work that met the stop and ended so is cancelled too.
        let outcome = outcome.filter(|r| {
            r.as_ref()
                .err()
                .is_none_or(|e| fsx::carried::<Stopping>(e).is_none())
        });
        // Stopped before it ended (given `BGTASK_STOP_GRACE` to end): told so, as
        // the original's task manager tells a task cancelled at its shutdown. A
        // delete left part way is finished by a delete again; a clone left part
        // way was never in place (see `start_clone`).
        let (outcome, message) = match outcome {
            None => {
                tracing::warn!(bgtask_id = %id, task = name, "bgtask cancelled: the storage-proxy is stopping");
                (
                    "cancelled",
                    format!("{name}: cancelled, the storage-proxy stopped before it ended"),
                )
            }
            Some(Ok(n)) => {
                tracing::info!(bgtask_id = %id, task = name, items = n, "bgtask done");
                ("done", format!("{name}: {n} items"))
            }
            Some(Err(e)) => {
                tracing::warn!(bgtask_id = %id, task = name, error = %e, "bgtask failed");
                ("failed", e.to_string())
            }
        };
        finished(&state, name, outcome);
        super::emit(
            &state,
            &format!("bgtask_{outcome}"),
            json!({"task_id": id, "message": message}),
        )
        .await;
    });
    Json(json!({"bgtask_id": id}))
}

/// A background task's work stopped because the proxy is stopping: told as
/// cancelled, not failed.
#[derive(Debug)]
struct Stopping;

impl std::fmt::Display for Stopping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the storage-proxy is stopping")
    }
}

impl std::error::Error for Stopping {}

/// How long a stop gives a background task's work to end before it is told
/// cancelled: work that was ending anyway (a clone putting its copy in place) is
/// told as it ended.
const BGTASK_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Counts a background task as running while it lives.
struct Running(Arc<State>);

impl Running {
    fn new(state: &Arc<State>) -> Self {
        let o = &state.metrics.observed;
        o.bgtasks_running
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(state.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let o = &self.0.metrics.observed;
        o.bgtasks_running
            .fetch_sub(1, std::sync::atomic::Ordering::Release);
        self.0.bgtask_ended.notify_waiters();
    }
}

fn finished(state: &State, task: &'static str, outcome: &'static str) {
    let key = format!("task=\"{task}\",state=\"{outcome}\"");
    state.metrics.observed.bgtasks_finished.add(&key, 1);
}

/// Runs blocking work for a background job (under the job's request ID).
async fn job<F>(f: F) -> std::io::Result<u64>
where
    F: FnOnce() -> std::io::Result<u64> + Send + 'static,
{
    appproxy_shared::context::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

async fn delete_folder(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<FolderReq>,
) -> Result<Response, ApiError> {
    let mut parts = Vfid::parse(&r.vfid)?.parts();
    // A vfolder that is not there (any more) is gone, as the original answers; one
    // that is there but cannot be opened is an error, never gone (the manager
    // would forget a vfolder whose data stays).
    match state.volumes.open_folder(&r.volume, &r.vfid) {
        Err(ApiError::Path(PathError::NoFolder)) => {
            return Err(ApiError::Rejected {
                status: StatusCode::GONE,
                message: "vfolder not found (already deleted)".into(),
            })
        }
        other => drop(other?),
    }
    let name = parts.pop().ok_or(PathError::NoFolder)?;
    let parent = fsx::open(
        state.volumes.root_fd(&r.volume)?,
        &parts,
        fsx::DIR,
        fsx::STRICT,
    )?;
    let (st, key) = (state.clone(), state.volumes.scope_of(&r.volume, &r.vfid)?);
    let folder = state.volumes.folder(&r.volume, &r.vfid)?;
    let body = bgtask(
        &state,
        "delete_vfolder",
        job(move || {
            let live = st.reservations.live(&key).into_keys().collect();
            let sessions = staged_sessions(parent.as_fd(), &name, live);
            let removed = fsx::remove_tree(parent.as_fd(), &name);
            // The uploads in progress there are gone with their staged files: what
            // their reservations held is free at once, not when they expire. Only
            // this vfolder's sessions whose PATCH is not running: a file there may
            // be named after any session (see `quota::release_staged`).
            let left = staged_sessions(parent.as_fd(), &name, sessions.clone());
            for s in sessions.iter().filter(|s| !left.contains(s)) {
                quota::release_staged(&st, &folder, s);
            }
            st.reservations.removed(&key);
            st.folders.changed(&folder);
            removed
        }),
    );
    Ok((StatusCode::ACCEPTED, body).into_response())
}

/// Which of `sessions` (upload sessions holding a reservation) have their staged
/// file in the vfolder `name` of `parent`: a regular file of that name directly in
/// its staging area. Looked up by name, never listed (a user with a shell can put
/// any number of names there).
fn staged_sessions(
    parent: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    sessions: Vec<String>,
) -> Vec<String> {
    let Ok(staging) = fsx::child_dir(parent, name).and_then(|dir| staging_dir(dir.as_fd(), false))
    else {
        return Vec::new();
    };
    sessions
        .into_iter()
        .filter(|s| {
            rustix::fs::statat(&staging, s.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile)
        })
        .collect()
}

#[derive(Deserialize)]
struct CloneReq {
    src_volume: String,
    src_vfid: String,
    dst_volume: Option<String>,
    dst_vfid: String,
}

/// `POST /folder/clone`. Runs as a task of its own, to its end even when the request
/// goes: a reservation made is either handed to the copy or released.
async fn clone_folder(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<CloneReq>,
) -> Result<Json<Value>, ApiError> {
    appproxy_shared::context::spawn(start_clone(state, r))
        .await
        .map_err(|e| ApiError::Io(std::io::Error::other(e)))?
}

async fn start_clone(state: Arc<State>, r: CloneReq) -> Result<Json<Value>, ApiError> {
    let dst_volume = r.dst_volume.unwrap_or_else(|| r.src_volume.clone());
    if dst_volume != r.src_volume {
        return Err(ApiError::Params(
            "cross-volume clone is not supported".into(),
        ));
    }
    let src = state.volumes.open_folder(&r.src_volume, &r.src_vfid)?;
    let dst_parts = Vfid::parse(&r.dst_vfid)?.parts();
    // Only a destination that is not there is free: one that cannot be opened
    // (unreadable, descriptors exhausted) may well exist.
    match state.volumes.open_folder(&dst_volume, &r.dst_vfid) {
        Ok(_) => return Err(ApiError::Params("destination vfolder exists".into())),
        Err(ApiError::Path(PathError::NoFolder)) => {}
        Err(e) => return Err(e),
    }
    // Claimed in this process at once: a second clone to it is refused, never left
    // to find the first's copy in place at its end.
    let claim = CloneClaim::take(&state, state.volumes.folder(&dst_volume, &r.dst_vfid)?)?;
    // The destination scope must have room for the source: reserved while copying.
    let key = state.volumes.scope_of(&dst_volume, &r.dst_vfid)?;
    let key2 = key.clone();
    let scope_name = Vfid::parse(&r.dst_vfid)?.scope_name();
    let holder = format!("clone-{}", uuid::Uuid::new_v4().simple());
    let (src, size) = {
        let (st, volume) = (state.clone(), dst_volume.clone());
        // No scope directory for an old-style vfid: its levels are made below.
        let scope: Vec<OsString> = scope_name.iter().map(OsString::from).collect();
        blocking(move || {
            // A source that cannot be measured whole is not cloned on a smaller
            // reservation.
            let size = quota::measured("the clone's source", || {
                fsx::usage(src.as_fd(), fsx::Links::PerName, &outside_staging)
            })?
            .1;
            if !scope.is_empty() {
                fsx::mkdirs(st.volumes.root_fd(&volume)?, &scope, fsx::STRICT)?;
            }
            Ok((src, size))
        })
        .await?
    };
    // Released if anything fails (or the request goes) before the copy starts.
    let hold = quota::Hold::new(&state, &holder);
    let clone = (holder.as_str(), None);
    quota::reserve(
        &state,
        &key,
        &dst_volume,
        scope_name.as_deref(),
        clone,
        (size, 0),
    )
    .await?;
    let dst = {
        let (st, volume, holder) = (state.clone(), dst_volume.clone(), holder.clone());
        blocking(move || {
            let root = st.volumes.root_fd(&volume)?;
            let (name, parents) = dst_parts.split_last().ok_or(PathError::NoFolder)?;
            let parent = fsx::mkdirs(root, parents, fsx::STRICT)?;
            match rustix::fs::statat(&parent, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(_) => return Err(ApiError::Params("destination vfolder exists".into())),
                Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(std::io::Error::from(e).into()),
            }
            // The copy is made under a name of its own beside the destination and
            // put in place whole (see `Made::place`): a clone cut off — the
            // process killed, the host down — leaves no vfolder half copied, only
            // that hidden directory, which the cleanup removes (`sweep_clone`).
            // Before, the copy was made in place: a clone killed part way left a
            // vfolder of part of the files, served and counted as any other, and a
            // clone to it again was refused (an outside tester's find).
            let temp = clone_temp_name(name, &holder);
            rustix::fs::mkdirat(&parent, temp.as_os_str(), Mode::from_raw_mode(0o755))
                .map_err(std::io::Error::from)?;
            let dst = fsx::child_dir(parent.as_fd(), &temp)?;
            // Its bytes are held by the reservation until the copy ends.
            let id = rustix::fs::fstat(&dst).map(|s| (s.st_dev, s.st_ino))?;
            st.reservations.pend(id);
            Ok((
                src,
                Made {
                    parent,
                    name: temp,
                    dest: name.clone(),
                    id,
                },
                dst,
            ))
        })
        .await?
    };
    hold.keep();
    let st = state.clone();
    Ok(bgtask(
        &state,
        "clone_vfolder",
        job(move || {
            let _claim = claim;
            let (src, made, dst) = dst;
            let mut touched = std::time::Instant::now();
            // No more than was measured and reserved is copied (see `fsx::copy_tree`).
            let copied = fsx::copy_tree(src.as_fd(), dst.as_fd(), &[STAGING], size, &mut |dir| {
                // A stop ends the copy at the next entry (the task is told
                // cancelled meanwhile, see `bgtask`).
                if st.stopping() {
                    return Err(std::io::Error::other(Stopping));
                }
                // Seen running by the cleanup of any process sharing the volume.
                if touched.elapsed() >= CLONE_TOUCH {
                    touched = std::time::Instant::now();
                    touch(dst.as_fd());
                }
                if dir {
                    tracing::debug!("directory cloned");
                }
                Ok(())
            });
            // A clone is whole or not there: put in place only whole, and only
            // where nothing is; a copy that stopped part way (or found its
            // destination made meanwhile) is removed, so no half vfolder is left
            // holding the scope's room.
            // A stop that came after the last entry is met here, before the copy is
            // put in place: once placed, the clone is done, whatever else follows.
            let copied = copied
                .and_then(|c| {
                    if st.stopping() {
                        Err(std::io::Error::other(Stopping))
                    } else {
                        Ok(c)
                    }
                })
                .and_then(|c| made.place().map(|()| c));
            if let Err(e) = &copied {
                made.remove(e);
            }
            // What was copied (not the size reserved: symlinks are not copied, and
            // the source may have changed meanwhile) counts as committed, and the
            // reservation is released, in one step under the scope's lock. A copy
            // that stopped part way has the scope measured again.
            let bytes = copied.as_ref().map_or(0, |c| c.1);
            let _ = st.reservations.commit(&key2, &holder, bytes, || {
                st.reservations.unpend(made.id);
                Ok(())
            });
            if copied.is_err() {
                st.reservations.removed(&key2);
            }
            folder_changed(&st, &dst_volume, &r.dst_vfid);
            copied.map(|c| c.0)
        }),
    ))
}

/// The directory a clone made for its copy: by name in its parent, the name it is
/// to have once whole, and which directory it is.
struct Made {
    parent: OwnedFd,
    /// Its name while the copy is made ([`clone_temp_name`]).
    name: OsString,
    /// The destination vfolder's name, in the same parent.
    dest: OsString,
    /// Its device and inode.
    id: (u64, u64),
}

/// How often a running clone touches its copy's directory: the cleanup of any
/// process sharing the volume takes a copy untouched for [`CLONE_LEFT`] for one
/// left by a clone cut off.
const CLONE_TOUCH: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a clone's copy may go untouched before the cleanup removes it as left
/// by a clone cut off (the process killed, the host down): far beyond
/// [`CLONE_TOUCH`], so that one clone's copy of a single huge directory is never
/// taken for it.
pub const CLONE_LEFT: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// The name a clone's copy has until it is whole: beside the destination, hidden,
/// with the clone's holder (`clone-<32 hex>`):
/// `.<destination>.clone-<32 hex>`.
fn clone_temp_name(dest: &std::ffi::OsStr, holder: &str) -> OsString {
    let mut name = OsString::from(".");
    name.push(dest);
    name.push(".");
    name.push(holder);
    name
}

/// Whether `name` is a clone's copy not yet whole ([`clone_temp_name`]).
pub fn is_clone_temp(name: &std::ffi::OsStr) -> bool {
    let b = name.as_bytes();
    let Some(at) = b.windows(7).rposition(|w| w == b".clone-") else {
        return false;
    };
    let hex = &b[at + 7..];
    b.first() == Some(&b'.') && at > 1 && hex.len() == 32 && hex.iter().all(u8::is_ascii_hexdigit)
}

/// Sets a directory's times to now (a failure only leaves them older).
fn touch(dir: BorrowedFd<'_>) {
    let now = rustix::fs::Timespec {
        tv_sec: 0,
        tv_nsec: rustix::fs::UTIME_NOW,
    };
    let _ = rustix::fs::futimens(
        dir,
        &rustix::fs::Timestamps {
            last_access: now,
            last_modification: now,
        },
    );
}

/// A clone's destination claimed in this process ([`State::cloning`]) while it
/// runs.
struct CloneClaim {
    state: Arc<State>,
    dest: std::path::PathBuf,
}

impl CloneClaim {
    fn take(state: &Arc<State>, dest: std::path::PathBuf) -> Result<Self, ApiError> {
        let mut cloning = state.cloning.lock().unwrap_or_else(|p| p.into_inner());
        if !cloning.insert(dest.clone()) {
            return Err(ApiError::Conflict(
                "a clone to the destination vfolder is under way",
            ));
        }
        Ok(Self {
            state: state.clone(),
            dest,
        })
    }
}

impl Drop for CloneClaim {
    fn drop(&mut self) {
        let mut cloning = self.state.cloning.lock().unwrap_or_else(|p| p.into_inner());
        cloning.remove(&self.dest);
    }
}

impl Made {
    /// Puts the whole copy in place under the destination's name, never over
    /// anything there (a vfolder made meanwhile, by another process sharing the
    /// volume: the clone fails).
    fn place(&self) -> std::io::Result<()> {
        use rustix::{fs::RenameFlags, io::Errno};
        let placed = match rustix::fs::renameat_with(
            &self.parent,
            self.name.as_os_str(),
            &self.parent,
            self.dest.as_os_str(),
            RenameFlags::NOREPLACE,
        ) {
            // A filesystem without `RENAME_NOREPLACE`: looked at, then renamed.
            Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
                match rustix::fs::statat(
                    &self.parent,
                    self.dest.as_os_str(),
                    AtFlags::SYMLINK_NOFOLLOW,
                ) {
                    // `renameat` itself: `renameat_with` calls `renameat2` even
                    // with no flags, which may be what was refused.
                    Err(Errno::NOENT) => rustix::fs::renameat(
                        &self.parent,
                        self.name.as_os_str(),
                        &self.parent,
                        self.dest.as_os_str(),
                    ),
                    Ok(_) => Err(Errno::EXIST),
                    Err(e) => Err(e),
                }
            }
            placed => placed,
        };
        placed.map_err(|e| match e {
            Errno::EXIST | Errno::NOTEMPTY => std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the destination vfolder was made while the clone ran",
            ),
            e => e.into(),
        })
    }

    /// Removes the copy that stopped with `cause`, when its name still holds the
    /// directory made for it; what cannot be removed is logged (the scope is
    /// measured again either way).
    fn remove(&self, cause: &std::io::Error) {
        let same = rustix::fs::statat(
            &self.parent,
            self.name.as_os_str(),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .is_ok_and(|s| (s.st_dev, s.st_ino) == self.id);
        if !same {
            tracing::warn!(error = %cause, "clone failed; its destination was moved, left as it is");
            return;
        }
        match fsx::remove_tree(self.parent.as_fd(), &self.name) {
            Ok(n) => {
                tracing::info!(error = %cause, removed = n, "clone failed; its partial copy removed")
            }
            Err(e) => {
                tracing::warn!(error = %cause, remove_error = %e, "clone failed; its partial copy not wholly removed")
            }
        }
    }
}

/// A clone's filter: everything but the vfolder's own staging area, which a clone
/// does not copy (a directory named `.upload` deeper down is the user's and is).
fn outside_staging(e: &fsx::Entry, depth: usize) -> bool {
    !(depth == 0 && e.name == STAGING)
}

/// Files and bytes of a vfolder as `/folder/usage` and `/folder/used-bytes` report
/// them (per name; of its staging area, what live upload sessions' reservations
/// hold of their staged files left out, as committed bytes do): one walk at a time
/// per vfolder,
/// its figure served again while young enough and nothing changed through the API
/// (see `usage`).
async fn folder_usage(state: &Arc<State>, r: &FolderReq) -> Result<(u64, u64), ApiError> {
    let dir = state.volumes.open_folder(&r.volume, &r.vfid)?;
    let key = state.volumes.folder(&r.volume, &r.vfid)?;
    let scope = state.volumes.scope_of(&r.volume, &r.vfid)?;
    let st = state.clone();
    state
        .folders
        .of(&key)
        .get(state.usage_max_age, move || {
            let began = std::time::Instant::now();
            let live = st.reservations.live(&scope);
            // Never a partial figure: a walk that did not see the whole vfolder is
            // tried again, then answered 503.
            let figures = quota::measured("the vfolder", || {
                super::Metrics::add(&st.metrics.usage_walks_folder, 1);
                quota::vfolder_usage(dir.as_fd(), &live)
            });
            st.metrics
                .observed
                .usage_walk_duration
                .observe(began.elapsed());
            figures
        })
        .await
}

/// A vfolder changed through the API: its next usage report walks again.
pub(crate) fn folder_changed(state: &State, volume: &str, vfid: &str) {
    if let Ok(key) = state.volumes.folder(volume, vfid) {
        state.folders.changed(&key);
    }
}

async fn usage(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<FolderReq>,
) -> Result<Json<Value>, ApiError> {
    let (files, bytes) = folder_usage(&state, &r).await?;
    Ok(Json(json!({"file_count": files, "used_bytes": bytes})))
}

#[derive(Deserialize)]
struct PathReq {
    volume: String,
    vfid: String,
    #[serde(default = "WirePath::dot")]
    relpath: WirePath,
}

fn dot() -> String {
    ".".into()
}

fn iso(sec: i64, nsec: u32) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::new(sec.max(0) as u64, nsec);
    appproxy_shared::telemetry::Rfc3339(t).to_string()
}

#[derive(serde::Serialize)]
struct ListStat {
    created: String,
    mode: u32,
    modified: String,
    size: i64,
}

/// `POST /folder/file/list`. A user with a shell can fill one directory with
/// hundreds of thousands of empty files in seconds (no quota counts them), and give
/// each a name (255 bytes) and, as a symlink, a target (4,095 bytes) of control
/// characters, which JSON writes as `\u00XX`, six bytes each: about 26 KB of answer
/// an entry. The directory is read and sorted before the head goes out (an error
/// there has its status); the answer is then streamed, written on a blocking thread
/// in chunks of [`LIST_CHUNK`] through a channel of a few, each symlink's target
/// read when its entry is written: what one listing holds is its sorted names and
/// a few chunks, whatever the names are, and a reader that takes bytes slowly
/// holds the writer back (for `stall_timeout_secs` at most per chunk, then the
/// answer is cut off). Before, the answer was built whole in one buffer: 20,000
/// such symlinks made a 525 MB answer and a 1.04 GB peak. The names held are at
/// most `[storage] scandir_limit` (the original's `scandir-limit`): the directory
/// is read no further, and the answer says `"truncated": true`. Before, every
/// entry was read, `stat`ed and held: 2 million empty files (32 s to make from a
/// shell) cost a listing 24 s and 300 MB of the proxy's memory.
async fn list(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<PathReq>,
) -> Result<Response, ApiError> {
    let root = state.volumes.open_folder(&r.volume, &r.vfid)?;
    let parts = fsx::components(&r.relpath)?;
    outside_staging_area(&parts)?;
    let limit = state.scandir_limit;
    let (dir, entries, truncated) = blocking(move || {
        // Never the staging area, reached through a symlink either: its entries
        // name other users' uploads in progress. What the path names is checked
        // (a staged file is refused as such, not as no directory), then the
        // directory opened.
        let mut check = StagingCheck::new(root.as_fd())?;
        check.refuse(&fsx::locate(root.as_fd(), &parts)?)?;
        let dir = fsx::open_dir(root.as_fd(), &parts)?;
        check.refuse_dir(dir.as_fd())?;
        let (a, b) = (rustix::fs::fstat(&root)?, rustix::fs::fstat(&dir)?);
        let at_root = (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino);
        // `.upload` at the root is hidden, and takes no place under the limit.
        let (entries, truncated) =
            fsx::first_entries(dir.as_fd(), limit, |name| at_root && name == STAGING)?;
        if truncated {
            tracing::info!(
                relpath = %r.relpath,
                limit,
                "listing truncated at [storage] scandir_limit"
            );
        }
        Ok((dir, entries, truncated))
    })
    .await?;
    let mut chunks = stream_listing(dir, entries, truncated, state.stall);
    // An answer of one chunk (most directories) goes out whole, with its length, as
    // it always did; a writer that fails before its first chunk gets a status.
    let body = match chunks.recv().await {
        Some((first, true)) => axum::body::Body::from(first),
        Some((first, false)) => {
            let rest = futures_util::stream::unfold(Some(chunks), |chunks| async move {
                let mut chunks = chunks?;
                match chunks.recv().await {
                    Some((chunk, false)) => Some((Ok(chunk), Some(chunks))),
                    Some((chunk, true)) => Some((Ok(chunk), None)),
                    // The writer stopped before the answer's end: an error, so the
                    // connection is cut rather than the answer ended as if whole.
                    None => Some((Err(std::io::Error::other("the listing ended early")), None)),
                }
            });
            axum::body::Body::from_stream(futures_util::StreamExt::chain(
                futures_util::stream::iter([Ok::<_, std::io::Error>(first)]),
                rest,
            ))
        }
        None => {
            return Err(ApiError::Io(std::io::Error::other(
                "the listing could not be written",
            )))
        }
    };
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

/// A listing's answer is handed to the response in chunks of about this many bytes
/// (one entry more at most: 26 KB).
const LIST_CHUNK: usize = 64 << 10;

/// Chunks a listing's writer may have written ahead of its reader.
const LIST_CHUNKS_AHEAD: usize = 4;

/// A listing's chunks as its writer hands them over, each with whether it is the
/// last.
type ListChunks = tokio::sync::mpsc::Receiver<(axum::body::Bytes, bool)>;

/// The answer of [`list`] for the sorted `entries` of `dir`, written on a blocking
/// thread, its last chunk marked. A writer that stops before the answer's end (its
/// reader took no chunk for `stall`, a write that failed, a panic) closes the
/// channel without that mark: the reader ends the body in an error, so the
/// connection is cut and the client sees a broken answer, never a well-formed
/// truncated one.
fn stream_listing(
    dir: OwnedFd,
    entries: Vec<fsx::Entry>,
    truncated: bool,
    stall: std::time::Duration,
) -> ListChunks {
    let (tx, rx) = tokio::sync::mpsc::channel(LIST_CHUNKS_AHEAD);
    appproxy_shared::context::spawn_blocking(move || {
        let written = write_listing(&dir, &entries, truncated, |chunk, last| {
            send_chunk(&tx, (chunk, last), stall)
        });
        if let Err(e) = written {
            tracing::warn!(error = %e, "listing stream failed");
        }
    });
    rx
}

/// Hands a chunk to the response body, waiting at most `stall` for room.
fn send_chunk(
    tx: &tokio::sync::mpsc::Sender<(axum::body::Bytes, bool)>,
    (chunk, last): (Vec<u8>, bool),
    stall: std::time::Duration,
) -> std::io::Result<()> {
    let chunk = (axum::body::Bytes::from(chunk), last);
    let sent = match tokio::runtime::Handle::try_current() {
        Ok(rt) => rt.block_on(tokio::time::timeout(stall, tx.send(chunk))),
        Err(_) => Ok(tx.blocking_send(chunk)),
    };
    match sent {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(std::io::Error::other("client went away")),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the client took no bytes for {} s", stall.as_secs()),
        )),
    }
}

/// Writes the listing's JSON (`{"items":[…]}`, the items as they always were,
/// then `"truncated":true` when the directory holds more than `entries`) in chunks
/// of about [`LIST_CHUNK`], each handed to `send` with whether it is the last.
fn write_listing(
    dir: &OwnedFd,
    entries: &[fsx::Entry],
    truncated: bool,
    mut send: impl FnMut(Vec<u8>, bool) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(LIST_CHUNK + (32 << 10));
    out.extend_from_slice(b"{\"items\":[");
    let mut first = true;
    for e in entries {
        let (kind, target) = match e.kind() {
            FileType::Symlink => (
                "SYMLINK",
                rustix::fs::readlinkat(dir, e.name.as_os_str(), Vec::new()).ok(),
            ),
            FileType::Directory => ("DIRECTORY", None),
            _ => ("FILE", None),
        };
        let created = rustix::fs::statx(
            dir,
            e.name.as_os_str(),
            AtFlags::SYMLINK_NOFOLLOW,
            rustix::fs::StatxFlags::BTIME,
        )
        .ok()
        .filter(|x| x.stx_mask & rustix::fs::StatxFlags::BTIME.bits() != 0)
        .map(|x| iso(x.stx_btime.tv_sec, x.stx_btime.tv_nsec))
        .unwrap_or_default();
        if !first {
            out.push(b',');
        }
        first = false;
        // Fields in the order the answer always had them (sorted by name).
        out.extend_from_slice(b"{\"name\":");
        wirename::write_json(&mut out, e.name.as_bytes());
        out.extend_from_slice(b",\"stat\":");
        let stat = ListStat {
            created,
            mode: e.stat.st_mode,
            modified: iso(e.stat.st_mtime, e.stat.st_mtime_nsec as u32),
            size: e.stat.st_size,
        };
        serde_json::to_writer(&mut out, &stat).map_err(std::io::Error::other)?;
        out.extend_from_slice(b",\"symlink_target\":");
        match &target {
            Some(t) => wirename::write_json(&mut out, t.as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"type\":\"");
        out.extend_from_slice(kind.as_bytes());
        out.extend_from_slice(b"\"}");
        if out.len() >= LIST_CHUNK {
            let full = std::mem::replace(&mut out, Vec::with_capacity(LIST_CHUNK + (32 << 10)));
            send(full, false)?;
        }
    }
    out.extend_from_slice(if truncated {
        b"],\"truncated\":true}"
    } else {
        b"]}"
    });
    send(out, true)
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

/// Makes one directory of a `mkdir`: never in the staging area, whether a path
/// names it or reaches it through a symlink (each level is checked on the very
/// descriptor the next one is created in, see [`mkdirs_outside_staging`]); an
/// existing directory there is not "made" either.
fn make_dir(
    root: BorrowedFd<'_>,
    p: &WirePath,
    parents: bool,
    exist_ok: bool,
) -> Result<(), String> {
    let parts = fsx::components(p)
        .and_then(fsx::to_make)
        .map_err(|e| e.to_string())?;
    outside_staging_area(&parts).map_err(|e| e.to_string())?;
    let exists = || ApiError::from(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
    // What is there already (a symlink to a directory of the staging area too).
    let existing = || match fsx::open_dir(root, &parts) {
        Ok(dir) => outside_staging_dir(root, dir.as_fd(), None).and(Err(exists())),
        Err(_) => Err(exists()),
    };
    let made = if parents {
        match fsx::open_dir(root, &parts) {
            Ok(_) => existing(),
            Err(_) => mkdirs_outside_staging(root, &parts).map(drop),
        }
    } else {
        fsx::parent(root, &parts)
            .map_err(ApiError::from)
            .and_then(|p| {
                guard(root, p.dir.as_fd(), &p.name, None)?;
                match rustix::fs::mkdirat(&p.dir, p.name.as_os_str(), Mode::from_raw_mode(0o755)) {
                    Err(rustix::io::Errno::EXIST) => existing(),
                    other => Ok(other?),
                }
            })
    };
    match made {
        Err(ApiError::Io(e)) if e.kind() == std::io::ErrorKind::AlreadyExists && exist_ok => Ok(()),
        Err(e) => Err(e.to_string()),
        Ok(()) => Ok(()),
    }
}

async fn mkdir(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<MkdirReq>,
) -> Result<Response, ApiError> {
    let root = state.volumes.open_folder(&r.volume, &r.vfid)?;
    let paths = r.relpath.into_vec();
    if paths.len() > 50 {
        return Err(ApiError::Params("at most 50 paths".into()));
    }
    let (parents, exist_ok) = (r.parents, r.exist_ok);
    let (ok, failed) = blocking(move || {
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        for p in paths {
            match make_dir(root.as_fd(), &p, parents, exist_ok) {
                Ok(()) => ok.push((None, p)),
                Err(msg) => failed.push((Some(msg), p)),
            }
        }
        Ok((ok, failed))
    })
    .await?;
    let status = match (ok.is_empty(), failed.is_empty()) {
        (_, true) => StatusCode::OK,
        (false, false) => StatusCode::MULTI_STATUS,
        (true, false) => StatusCode::UNPROCESSABLE_ENTITY,
    };
    let mut body = b"{\"results\":{\"success\":".to_vec();
    outcomes_json(&mut body, &ok);
    body.extend_from_slice(b",\"failed\":");
    outcomes_json(&mut body, &failed);
    body.extend_from_slice(b"}}");
    Ok((
        status,
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

/// `mkdir`'s outcomes as a JSON array of `{"msg": …, "item": path}`, each path as
/// the request named it (a name that is not UTF-8 with its `\udcXX` escapes, which
/// a `serde_json::Value` cannot hold).
fn outcomes_json(out: &mut Vec<u8>, outcomes: &[(Option<String>, WirePath)]) {
    out.push(b'[');
    for (i, (msg, item)) in outcomes.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"msg\":");
        // Serializing an optional string cannot fail.
        out.extend_from_slice(serde_json::to_string(msg).unwrap_or_default().as_bytes());
        out.extend_from_slice(b",\"item\":");
        wirename::write_json(out, item.as_os_str().as_bytes());
        out.push(b'}');
    }
    out.push(b']');
}

#[derive(Deserialize)]
struct RenameReq {
    volume: String,
    vfid: String,
    relpath: WirePath,
    new_name: WirePath,
}

async fn rename(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<RenameReq>,
) -> Result<StatusCode, ApiError> {
    let new_name = r.new_name.as_os_str().as_bytes();
    if new_name.is_empty()
        || new_name.contains(&b'/')
        || new_name.contains(&0)
        || new_name == b".."
        || new_name == b"."
    {
        return Err(ApiError::Params("new_name must be a plain name".into()));
    }
    // No longer than a file name may be (400, as any path component).
    fsx::components(&r.new_name)?;
    let root = state.volumes.open_folder(&r.volume, &r.vfid)?;
    let parts = fsx::components(&r.relpath)?;
    outside_staging_area(&parts)?;
    // The new path: the entry's parent and `new_name`.
    let mut renamed = parts.clone();
    if let Some(last) = renamed.last_mut() {
        *last = r.new_name.as_os_str().to_owned();
    }
    fsx::to_make(renamed)?;
    let (st, key) = (state.clone(), state.volumes.scope_of(&r.volume, &r.vfid)?);
    blocking(move || {
        let p = fsx::parent(root.as_fd(), &parts)?;
        guard(root.as_fd(), p.dir.as_fd(), &p.name, None)?;
        guard(root.as_fd(), p.dir.as_fd(), r.new_name.as_os_str(), None)?;
        let renamed = fsx::rename_over(
            p.dir.as_fd(),
            &p.name,
            p.dir.as_fd(),
            r.new_name.as_os_str(),
        );
        replaced(&st, &key, &renamed);
        folder_changed(&st, &r.volume, &r.vfid);
        Ok(renamed.map(drop)?)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A rename or move that replaced an entry freed what the entry held: the scope's
/// next check or report measures again (as after a delete), so the room shows at
/// once.
fn replaced(state: &State, scope: &std::path::Path, renamed: &std::io::Result<bool>) {
    if matches!(renamed, Ok(true)) {
        state.reservations.removed(scope);
    }
}

#[derive(Deserialize)]
struct MoveReq {
    volume: String,
    vfid: String,
    src_relpath: WirePath,
    dst_relpath: WirePath,
}

async fn move_file(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<MoveReq>,
) -> Result<StatusCode, ApiError> {
    let root = state.volumes.open_folder(&r.volume, &r.vfid)?;
    let (src, dst) = (
        fsx::components(&r.src_relpath)?,
        fsx::to_make(fsx::components(&r.dst_relpath)?)?,
    );
    outside_staging_area(&src)?;
    outside_staging_area(&dst)?;
    let (st, key) = (state.clone(), state.volumes.scope_of(&r.volume, &r.vfid)?);
    blocking(move || {
        let from = fsx::parent(root.as_fd(), &src)?;
        let to = fsx::parent(root.as_fd(), &dst)?;
        guard(root.as_fd(), from.dir.as_fd(), &from.name, None)?;
        guard(root.as_fd(), to.dir.as_fd(), &to.name, None)?;
        let moved = fsx::rename_over(from.dir.as_fd(), &from.name, to.dir.as_fd(), &to.name);
        replaced(&st, &key, &moved);
        folder_changed(&st, &r.volume, &r.vfid);
        Ok(moved.map(drop)?)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct DeleteReq {
    volume: String,
    vfid: String,
    relpaths: Vec<WirePath>,
    #[serde(default)]
    recursive: bool,
}

/// Parses every path of a delete first: one bad path (or more than `max` of them)
/// and nothing is touched.
fn deletion_targets(r: &DeleteReq, max: usize) -> Result<Vec<Vec<OsString>>, ApiError> {
    // Every path costs a climb of its parents, twice: a list is bounded.
    if r.relpaths.len() > max {
        return Err(ApiError::Params(format!(
            "{} paths to delete, more than the {max} one request may name ([storage] max_delete_paths)",
            r.relpaths.len()
        )));
    }
    let paths = r
        .relpaths
        .iter()
        .map(fsx::components)
        .collect::<Result<Vec<_>, _>>()?;
    if paths.iter().any(Vec::is_empty) {
        return Err(ApiError::Params(
            "refusing to delete the vfolder root".into(),
        ));
    }
    for parts in &paths {
        outside_staging_area(parts)?;
    }
    Ok(paths)
}

/// Refuses a delete as a whole, before anything is deleted, when one of its paths
/// reaches the staging area through a symlink (or leaves the vfolder): the paths
/// that resolve now are checked as [`delete_paths`] checks each again when its
/// turn comes (a path missing now fails then, as before).
/// The directories a climb found outside the staging area are not climbed again
/// for the next path (nor when each path's turn comes), and the climbs of the
/// request are bounded in all ([`fsx::CLIMB_BUDGET`]): a delete naming 1,000
/// paths at the bottom of a user's chain of directories deeper than a path can
/// name climbed it whole for each, 28 CPU-seconds, and failed.
fn deletable(root: BorrowedFd<'_>, paths: &[Vec<OsString>]) -> Result<(), ApiError> {
    let mut check = StagingCheck::new(root)?;
    for parts in paths {
        match fsx::parent(root, parts) {
            Ok(p) => guard(root, p.dir.as_fd(), &p.name, Some(&mut check))?,
            Err(e) if fsx::is_escape(&e) => return Err(e.into()),
            Err(_) => {}
        }
    }
    Ok(())
}

/// Deletes files and directories (a non-empty directory only when `recursive`);
/// each from its parent's descriptor, a symlink as the link itself.
fn delete_paths(root: OwnedFd, paths: Vec<Vec<OsString>>, recursive: bool) -> std::io::Result<u64> {
    let mut n = 0;
    let mut check = StagingCheck::new(root.as_fd())?;
    for parts in paths {
        let p = fsx::parent(root.as_fd(), &parts)?;
        guard(root.as_fd(), p.dir.as_fd(), &p.name, Some(&mut check)).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string())
        })?;
        let stat = rustix::fs::statat(&p.dir, p.name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
            if recursive {
                fsx::remove_tree(p.dir.as_fd(), &p.name)?;
            } else {
                rustix::fs::unlinkat(&p.dir, p.name.as_os_str(), AtFlags::REMOVEDIR)?;
            }
        } else {
            rustix::fs::unlinkat(&p.dir, p.name.as_os_str(), AtFlags::empty())?;
        }
        tracing::debug!(path = %fsx::join(&parts).display(), "deleted");
        n += 1;
    }
    Ok(n)
}

async fn delete_files(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<DeleteReq>,
) -> Result<Json<Value>, ApiError> {
    let paths = deletion_targets(&r, state.max_delete_paths)?;
    let root = state.volumes.open_folder(&r.volume, &r.vfid)?;
    let (st, key) = (state.clone(), state.volumes.scope_of(&r.volume, &r.vfid)?);
    blocking(move || {
        deletable(root.as_fd(), &paths)?;
        let removed = delete_paths(root, paths, r.recursive);
        st.reservations.removed(&key);
        folder_changed(&st, &r.volume, &r.vfid);
        Ok(removed?)
    })
    .await?;
    Ok(Json(json!({"status": "ok"})))
}

async fn delete_files_async(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<DeleteReq>,
) -> Result<Response, ApiError> {
    let paths = deletion_targets(&r, state.max_delete_paths)?;
    let root = state.volumes.open_folder(&r.volume, &r.vfid)?;
    let (root, paths) = blocking(move || {
        deletable(root.as_fd(), &paths)?;
        Ok((root, paths))
    })
    .await?;
    let recursive = r.recursive;
    let (st, key) = (state.clone(), state.volumes.scope_of(&r.volume, &r.vfid)?);
    let (volume, vfid) = (r.volume.clone(), r.vfid.clone());
    let body = bgtask(
        &state,
        "delete_files",
        job(move || {
            let removed = delete_paths(root, paths, recursive);
            st.reservations.removed(&key);
            folder_changed(&st, &volume, &vfid);
            removed
        }),
    );
    Ok((StatusCode::ACCEPTED, body).into_response())
}

#[derive(Deserialize)]
struct UploadReq {
    volume: String,
    vfid: String,
    relpath: WirePath,
    size: u64,
}

/// The name of a vfolder's staging area (at its root): the staged files of uploads
/// in progress, named after their sessions.
pub const STAGING: &str = ".upload";

/// The error for a request that names the staging area.
pub fn staging_refused() -> ApiError {
    ApiError::Params(format!(
        "{STAGING} at the vfolder's root is the staging area of uploads in progress: \
         it is neither a source nor a destination"
    ))
}

/// Refuses a path in the staging area (its first component is `.upload`).
pub(crate) fn outside_staging_area(parts: &[OsString]) -> Result<(), ApiError> {
    match parts.first() {
        Some(first) if first == STAGING => Err(staging_refused()),
        _ => Ok(()),
    }
}

/// Whether two descriptors are the same directory.
pub fn same_dir(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    match (rustix::fs::fstat(a), rustix::fs::fstat(b)) {
        (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino),
        _ => false,
    }
}

/// Refuses a mutation of `name` in `dir` (a parent resolved beneath `root`) that
/// would touch the staging area, which a path can reach through a symlink: an entry
/// of the staging area or of any directory under it, or the staging area itself.
/// `dir` is climbed with the request's [`StagingCheck`] when it has one (its memory
/// of directories found outside the staging area, and its bound on climbing), else
/// by [`outside_staging_dir`].
fn guard(
    root: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    check: Option<&mut StagingCheck>,
) -> Result<(), ApiError> {
    if name == STAGING && same_dir(root, dir) {
        return Err(staging_refused());
    }
    match check {
        Some(check) => check.refuse_dir(dir),
        None => outside_staging_dir(root, dir, None),
    }
}

/// Refuses `dir` (a directory resolved beneath the vfolder `root`) when it is the
/// staging area or lies anywhere under it, reached through symlinks or not: its
/// ancestors are climbed by `..` up to `root` (or up to `known`, a directory found
/// outside the staging area already), each compared with the staging area by
/// device and inode. A vfolder without a staging area (none yet, or a `.upload`
/// that is not a directory, never followed) has nothing to refuse. A directory the
/// climb does not lead back to `root` from (moved out of the vfolder meanwhile) is
/// refused as an escape.
pub fn outside_staging_dir(
    root: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
    known: Option<(u64, u64)>,
) -> Result<(), ApiError> {
    let Ok(staging) = staging_dir(root, false) else {
        return Ok(());
    };
    let (inside, top) = (
        fsx::dir_identity(staging.as_fd())?,
        fsx::dir_identity(root)?,
    );
    match fsx::beneath(dir, inside, top, known) {
        Ok(false) => Ok(()),
        Ok(true) => Err(staging_refused()),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Err(PathError::Escape.into()),
        Err(e) => Err(e.into()),
    }
}

/// What the read routes (listings, downloads, archives, `fetch`, `mount` and the
/// tokens of downloads) check a path against: the vfolder's staging area, where
/// other users' unfinished uploads are, and the directories found outside it
/// already. A path reaches it through a symlink as well as by name (`l ->
/// .upload`, `l -> .upload/<session>`, `d/l -> ../.upload`), so what the path
/// names is climbed from by `..` as the write routes' [`outside_staging_dir`] does:
/// a directory from itself, anything else from the directory it was found in
/// ([`fsx::locate`]). Before, every read route served it: a listing named the
/// sessions, a download or `fetch` sent a partial upload, an archive zipped them.
pub struct StagingCheck {
    /// The vfolder's identity: where a climb ends outside.
    top: (u64, u64),
    /// The staging area's identity; `None` when there is none (a `.upload` that is
    /// not a directory is never followed, so it holds no staged file).
    staging: Option<(u64, u64)>,
    /// Directories found outside the staging area (see [`fsx::beneath_known`]).
    outside: std::collections::HashSet<(u64, u64)>,
    /// What the request's climbs may still take.
    climbs: fsx::Climbs,
}

impl StagingCheck {
    /// The check for the vfolder `root`. The staging area is found with `statat`,
    /// not opened: a `.upload` its user made unreadable is still refused.
    pub fn new(root: BorrowedFd<'_>) -> std::io::Result<Self> {
        let staging = match rustix::fs::statat(root, STAGING, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                #[allow(clippy::unnecessary_cast)] // The field types differ between targets.
                Some((st.st_dev as u64, st.st_ino as u64))
            }
            Ok(_) | Err(rustix::io::Errno::NOENT) => None,
            Err(e) => return Err(e.into()),
        };
        Ok(Self {
            top: fsx::dir_identity(root)?,
            staging,
            outside: std::collections::HashSet::new(),
            climbs: fsx::Climbs::default(),
        })
    }

    /// The identity of the vfolder this check is for.
    pub fn top(&self) -> (u64, u64) {
        self.top
    }

    /// Whether what `located` names lies in the staging area (is it, or is under
    /// it). An error when the climb does not lead back to the vfolder
    /// (`InvalidInput`: moved out of it meanwhile) or a level cannot be opened.
    pub fn reaches_staging(&mut self, located: &fsx::Located) -> std::io::Result<bool> {
        let Some(inside) = self.staging else {
            return Ok(false);
        };
        let kind = FileType::from_raw_mode(rustix::fs::fstat(&located.path)?.st_mode);
        let from = match &located.parent {
            Some(p) if kind != FileType::Directory => p.dir.as_fd(),
            _ => located.path.as_fd(),
        };
        fsx::beneath_known(from, inside, self.top, &mut self.outside, &mut self.climbs)
    }

    /// [`Self::reaches_staging`] as the API answers it: 400 naming the staging
    /// area, as the write routes answer (an escape when the climb left the
    /// vfolder).
    pub fn refuse(&mut self, located: &fsx::Located) -> Result<(), ApiError> {
        staging_answer(self.reaches_staging(located))
    }

    /// [`Self::refuse`] for a directory opened already.
    pub fn refuse_dir(&mut self, dir: BorrowedFd<'_>) -> Result<(), ApiError> {
        let Some(inside) = self.staging else {
            return Ok(());
        };
        staging_answer(fsx::beneath_known(
            dir,
            inside,
            self.top,
            &mut self.outside,
            &mut self.climbs,
        ))
    }
}

/// A staging check's outcome as the API answers it.
fn staging_answer(reaches: std::io::Result<bool>) -> Result<(), ApiError> {
    match reaches {
        Ok(false) => Ok(()),
        Ok(true) => Err(staging_refused()),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Err(PathError::Escape.into()),
        Err(e) => Err(e.into()),
    }
}

/// [`fsx::mkdirs`] beneath a vfolder that never creates anything in its staging
/// area: every level is checked (see [`outside_staging_dir`]) on the descriptor the
/// next one is created in, and `.upload` is never created at the root, so a
/// directory swapped for a symlink to the staging area while this runs cannot lead
/// it there. Each check climbs only to the level checked before it.
pub fn mkdirs_outside_staging(
    root: BorrowedFd<'_>,
    parts: &[OsString],
) -> Result<OwnedFd, ApiError> {
    let mut known = None;
    fsx::mkdirs_checked(root, parts, fsx::BENEATH, |dir, name| {
        if name == Some(std::ffi::OsStr::new(STAGING)) && same_dir(root, dir) {
            return Err(staging_refused());
        }
        outside_staging_dir(root, dir, known)?;
        known = Some(fsx::dir_identity(dir)?);
        Ok(())
    })
}

/// Refuses, when an upload session is created, a destination that reaches the
/// staging area: its deepest directory that exists already must lie outside it and
/// must not get `.upload` made at the vfolder's root. A destination that is a
/// directory, or lies under something that is not one (a regular file, a symlink
/// to one), is refused too: no completion could put the file there, and before, such
/// a session reserved its size, took the whole body and failed at completion on
/// every try. What is missing, or changes meanwhile, is checked again, level by
/// level, when the upload completes.
fn destination_outside_staging(root: BorrowedFd<'_>, parts: &[OsString]) -> Result<(), ApiError> {
    let Some((_, dirs)) = parts.split_last() else {
        return Ok(());
    };
    match fsx::deepest_dir(root, dirs) {
        Ok((dir, k)) => {
            guard(root, dir.as_fd(), &parts[k], None)?;
            // The destination's own name (never followed: a symlink there is
            // replaced, as any file is).
            if k + 1 == parts.len() {
                if let Ok(st) =
                    rustix::fs::statat(&dir, parts[k].as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
                {
                    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                        return Err(ApiError::Params(
                            "the upload's destination is an existing directory".into(),
                        ));
                    }
                }
            }
            Ok(())
        }
        Err(e) if fsx::is_escape(&e) => Err(e.into()),
        Err(e) if fsx::is_not_dir(&e) => Err(ApiError::Params(
            "the upload's destination lies under something that is not a directory".into(),
        )),
        // Anything else: the completion refuses it.
        Err(_) => Ok(()),
    }
}

/// Opens (creating if missing) a vfolder's staging directory; a `.upload` that is a
/// symlink is refused, never followed.
pub fn staging_dir(root: BorrowedFd<'_>, create: bool) -> std::io::Result<OwnedFd> {
    match fsx::child_dir(root, std::ffi::OsStr::new(STAGING)) {
        Err(e) if create && e.kind() == std::io::ErrorKind::NotFound => {
            match rustix::fs::mkdirat(root, STAGING, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            fsx::child_dir(root, std::ffi::OsStr::new(STAGING))
        }
        other => other,
    }
}

/// `POST /folder/file/upload`. Runs as a task of its own, to its end even when the
/// request goes: a reservation made either has its staging file or is released.
async fn upload_token(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<UploadReq>,
) -> Result<Json<Value>, ApiError> {
    appproxy_shared::context::spawn(create_session(state, r))
        .await
        .map_err(|e| ApiError::Io(std::io::Error::other(e)))?
}

async fn create_session(state: Arc<State>, r: UploadReq) -> Result<Json<Value>, ApiError> {
    if r.size > state.max_upload_size {
        return Err(ApiError::TooLarge);
    }
    let root = state.volumes.open_folder(&r.volume, &r.vfid)?;
    let parts = fsx::to_make(fsx::components(&r.relpath)?)?;
    if parts.is_empty() {
        return Err(ApiError::Params("relpath names the vfolder itself".into()));
    }
    outside_staging_area(&parts)?;
    let root = blocking(move || {
        destination_outside_staging(root.as_fd(), &parts)?;
        Ok(root)
    })
    .await?;
    let key = state.volumes.scope_of(&r.volume, &r.vfid)?;
    let scope_name = Vfid::parse(&r.vfid)?.scope_name();
    let session = uuid::Uuid::new_v4().simple().to_string();
    // Made first: one too long to be used is refused before anything is reserved.
    let exp = appproxy_shared::jwt::now_epoch() as u64 + state.session_expire.as_secs();
    let token = appproxy_shared::jwt::sign_hs256(
        &json!({"op": "upload", "volume": r.volume, "vfid": r.vfid, "relpath": r.relpath.to_claim(), "size": r.size, "session": session, "exp": exp}),
        &state.session_secret,
    );
    fits_in_target(
        &token,
        super::client::UPLOAD_TARGET,
        "relpath",
        "name a shorter path",
    )?;
    // Released if anything fails (or the request goes) before the staging file is
    // there.
    let hold = quota::Hold::new(&state, &session);
    let folder = state.volumes.folder(&r.volume, &r.vfid)?;
    let holder = (session.as_str(), Some(folder.as_path()));
    quota::reserve(
        &state,
        &key,
        &r.volume,
        scope_name.as_deref(),
        holder,
        (r.size, 0),
    )
    .await?;
    {
        let session = session.clone();
        blocking(move || {
            let staging = staging_dir(root.as_fd(), true)?;
            fsx::openat2(
                &staging,
                session.as_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o644),
                fsx::STRICT,
            )?;
            Ok(())
        })
        .await?;
    }
    hold.keep();
    // No PATCH can use the reservation once the token has expired (the instant is
    // at or after `exp`, which is rounded down and was taken before it).
    state
        .reservations
        .usable_until(&session, std::time::Instant::now() + state.session_expire);
    tracing::info!(session = %session, size = r.size, "upload session created");
    Ok(Json(json!({"token": token})))
}

/// `POST /folder/file/download`'s body: a path in a vfolder, and the original's
/// `unmanaged_path`, which names a host path outside any vfolder.
#[derive(Deserialize)]
struct DownloadReq {
    volume: String,
    vfid: String,
    #[serde(default = "WirePath::dot")]
    relpath: WirePath,
    #[serde(default)]
    unmanaged_path: Option<String>,
}

async fn download_token(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<DownloadReq>,
) -> Result<Json<Value>, ApiError> {
    // A host path outside any vfolder is never served. Before, the field was
    // passed over and the token served `relpath` instead, with a 200: the caller
    // got other content than it asked for (an outside tester's find).
    if r.unmanaged_path.is_some() {
        return Err(ApiError::Params(
            "unmanaged_path is not served: a download names a file in its vfolder (relpath)".into(),
        ));
    }
    let root = state.volumes.open_folder(&r.volume, &r.vfid)?;
    let parts = fsx::components(&r.relpath)?;
    outside_staging_area(&parts)?;
    // Refused now when it resolves out of the vfolder or into the staging area; a
    // missing file is a 404 later. The download checks both again: what the path
    // names may change before it is used.
    blocking(move || match fsx::locate(root.as_fd(), &parts) {
        Err(e) if fsx::is_escape(&e) => Err(PathError::Escape.into()),
        Err(_) => Ok(()),
        Ok(located) => StagingCheck::new(root.as_fd())?.refuse(&located),
    })
    .await?;
    let exp = appproxy_shared::jwt::now_epoch() as u64 + state.session_expire.as_secs();
    let token = appproxy_shared::jwt::sign_hs256(
        &json!({"op": "download", "volume": r.volume, "vfid": r.vfid, "relpath": r.relpath.to_claim(), "exp": exp}),
        &state.session_secret,
    );
    fits_in_target(
        &token,
        super::client::DOWNLOAD_TARGET,
        "relpath",
        "name a shorter path",
    )?;
    Ok(Json(json!({"token": token})))
}

async fn used_bytes(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<FolderReq>,
) -> Result<Json<Value>, ApiError> {
    let (_, bytes) = folder_usage(&state, &r).await?;
    Ok(Json(json!({"used_bytes": bytes})))
}

#[derive(Deserialize)]
struct VolumeReq {
    volume: String,
}

/// Capacity and use of the filesystem holding the volume.
async fn fs_usage(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<VolumeReq>,
) -> Result<Json<Value>, ApiError> {
    let st = rustix::fs::fstatvfs(state.volumes.root_fd(&r.volume)?)?;
    let capacity = st.f_blocks.saturating_mul(st.f_frsize);
    let free = st.f_bfree.saturating_mul(st.f_frsize);
    Ok(Json(
        json!({"capacity_bytes": capacity, "used_bytes": capacity.saturating_sub(free)}),
    ))
}

#[derive(Deserialize)]
struct MountReq {
    volume: String,
    vfid: String,
    #[serde(default = "dot")]
    subpath: String,
}

/// The host path of a vfolder (or an existing directory beneath it), for mounting.
async fn mount(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<MountReq>,
) -> Result<Json<Value>, ApiError> {
    let root = state.volumes.open_folder(&r.volume, &r.vfid)?;
    let parts = fsx::components(&r.subpath)?;
    outside_staging_area(&parts)?;
    let check = parts.clone();
    // The subpath must be a directory beneath the vfolder with no symlink on the way:
    // the path handed out is followed by someone else later. Never in the staging
    // area: a container mounting it would read other users' uploads in progress.
    blocking(move || {
        let dir = fsx::open(root.as_fd(), &check, fsx::DIR, fsx::STRICT)?;
        StagingCheck::new(root.as_fd())?.refuse_dir(dir.as_fd())
    })
    .await?;
    let base = state.volumes.folder(&r.volume, &r.vfid)?;
    let path = if parts.is_empty() {
        base
    } else {
        base.join(fsx::join(&parts))
    };
    Ok(Json(json!({"path": path.display().to_string()})))
}

/// Folder metadata is accepted and acknowledged, as the original does.
async fn metadata(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<FolderReq>,
) -> Result<Json<Value>, ApiError> {
    state.volumes.open_folder(&r.volume, &r.vfid)?;
    Ok(Json(json!({"status": "ok"})))
}

/// Streams a file to the manager (internal use, e.g. task logs).
async fn fetch(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<PathReq>,
) -> Result<Response, ApiError> {
    let root = state.volumes.open_folder(&r.volume, &r.vfid)?;
    let parts = fsx::components(&r.relpath)?;
    let (file, len) = blocking(move || {
        let fd = super::open_for_reading(root.as_fd(), &parts)?;
        let stat = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(ApiError::NotFound);
        }
        Ok((std::fs::File::from(fd), stat.st_size as u64))
    })
    .await?;
    // The length measured at open, as `/download` sends: a file a user grows while it
    // is read (to 2^44 bytes, say) does not make the call endless, and one cut short
    // meanwhile ends the answer short of its `Content-Length`, which the connection's
    // close makes plain, instead of looking whole.
    let stream = tokio_util::io::ReaderStream::with_capacity(
        tokio::io::AsyncReadExt::take(tokio::fs::File::from_std(file), len),
        64 * 1024,
    );
    let mut resp = Response::new(axum::body::Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        axum::http::HeaderValue::from_static("application/octet-stream"),
    );
    h.insert("content-length", axum::http::HeaderValue::from(len));
    Ok(resp)
}

#[derive(Deserialize)]
struct ArchiveReq {
    volume: String,
    #[serde(alias = "vfid")]
    virtual_folder_id: String,
    files: Vec<WirePath>,
    #[serde(default)]
    filename: Option<String>,
}

/// A token for `GET /download-archive`: a zip of the listed files and directories.
async fn archive_download_token(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<ArchiveReq>,
) -> Result<Json<Value>, ApiError> {
    let root = state.volumes.open_folder(&r.volume, &r.virtual_folder_id)?;
    if r.files.is_empty() || r.files.len() > 10_000 {
        return Err(ApiError::Params("files: 1 to 10000 paths".into()));
    }
    let mut parts = Vec::with_capacity(r.files.len());
    for f in &r.files {
        let p = fsx::components(f)?;
        if p.is_empty() {
            return Err(ApiError::Params("files: the vfolder itself".into()));
        }
        outside_staging_area(&p)?;
        parts.push(p);
    }
    // Each path once, none inside another listed one: its tree would be archived as
    // many times as it is listed.
    let kept = fsx::outermost(&parts);
    // None in the staging area, through a symlink either (one missing now is a 404
    // when the archive is downloaded, where every path is checked again).
    let listed: Vec<Vec<OsString>> = kept.iter().filter_map(|&i| parts.get(i).cloned()).collect();
    blocking(move || {
        let mut check = StagingCheck::new(root.as_fd())?;
        for p in &listed {
            let located = match fsx::locate(root.as_fd(), p) {
                Ok(located) => Some(located),
                // Links too costly to resolve: refused now, not at every download.
                Err(e) if fsx::carried::<fsx::LinksTooCostly>(&e).is_some() => return Err(e.into()),
                Err(_) => None,
            };
            if let Some(located) = located {
                match check.reaches_staging(&located) {
                    Ok(true) => return Err(staging_refused()),
                    // The request's climbs spent: refused, not passed unchecked.
                    Err(e) if fsx::carried::<fsx::TooDeep>(&e).is_some() => return Err(e.into()),
                    Ok(false) | Err(_) => {}
                }
            }
        }
        Ok(())
    })
    .await?;
    let files: Vec<Value> = kept
        .into_iter()
        .filter_map(|i| r.files.get(i))
        .map(WirePath::to_claim)
        .collect();
    let exp = appproxy_shared::jwt::now_epoch() as u64 + state.session_expire.as_secs();
    let token = appproxy_shared::jwt::sign_hs256(
        &json!({"operation": "download", "volume": r.volume, "virtual_folder_id": r.virtual_folder_id, "files": files, "filename": r.filename, "exp": exp}),
        &state.session_secret,
    );
    fits_in_target(
        &token,
        super::client::ARCHIVE_TARGET,
        "files",
        "list fewer paths or their parent directory",
    )?;
    Ok(Json(json!({"token": token})))
}

/// A session token travels in the query of the client API's request: one whose
/// request target (`target`, then the token) would not fit what that API takes
/// ([`super::client::MAX_TARGET`]) is refused when asked for, with a reason, rather
/// than with a 414 when it is used. The paths it carries make its length (a name
/// that is not UTF-8 takes about four characters a byte, see
/// [`WirePath::to_claim`]); `field` names them, `instead` says what would fit.
fn fits_in_target(token: &str, target: &str, field: &str, instead: &str) -> Result<(), ApiError> {
    let room = super::client::MAX_TARGET.saturating_sub(target.len());
    if token.len() > room {
        return Err(ApiError::Params(format!(
            "{field}: the token would be {} bytes, more than the {room} its URL may carry (the client API takes request targets of up to {} bytes); {instead}",
            token.len(),
            super::client::MAX_TARGET
        )));
    }
    Ok(())
}

/// The vfs backend reports itself healthy, as the original's does.
async fn hwinfo(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<VolumeReq>,
) -> Result<Json<Value>, ApiError> {
    state.volumes.root_fd(&r.volume)?;
    Ok(Json(
        json!({"status": "healthy", "status_info": null, "metadata": {}}),
    ))
}

/// The vfs backend has no performance counters: every figure is -1 (unknown).
async fn performance_metric(
    Extract(state): Extract<Arc<State>>,
    ApiJson(r): ApiJson<VolumeReq>,
) -> Result<Json<Value>, ApiError> {
    state.volumes.root_fd(&r.volume)?;
    Ok(Json(json!({"metric": {
        "iops_read": -1, "iops_write": -1, "io_bytes_read": -1,
        "io_bytes_write": -1, "io_usec_read": -1, "io_usec_write": -1,
    }})))
}

/// Per-vfolder quota is deprecated in the original (quota scopes replace it).
async fn volume_quota() -> ApiError {
    ApiError::Params("per-vfolder quota is a deprecated API: use /quota-scope".into())
}

/// The transfer histograms, background tasks and quota usage per scope.
fn render_observed(state: &State, out: &mut String) {
    use crate::metrics::{escape, header, sample};
    use std::sync::atomic::Ordering::Relaxed;
    appproxy_shared::otlp::render_metrics(out);
    appproxy_shared::logout::render_metrics(out);
    let o = &state.metrics.observed;
    for (family, help, h) in [
        (
            "storage_proxy_upload_patch_size_bytes",
            "Bytes received per tus PATCH.",
            &o.upload_size,
        ),
        (
            "storage_proxy_upload_patch_duration_seconds",
            "Duration of each tus PATCH.",
            &o.upload_duration,
        ),
        (
            "storage_proxy_download_size_bytes",
            "Bytes sent per download (file, range or archive).",
            &o.download_size,
        ),
        (
            "storage_proxy_download_duration_seconds",
            "Duration of each download, until its body ended or the client left.",
            &o.download_duration,
        ),
        (
            "storage_proxy_quota_walk_duration_seconds",
            "Duration of each walk measuring a quota scope's committed bytes.",
            &o.quota_walk_duration,
        ),
        (
            "storage_proxy_usage_walk_duration_seconds",
            "Duration of each walk made for a usage report (a vfolder's files and bytes).",
            &o.usage_walk_duration,
        ),
    ] {
        header(out, family, "histogram", help);
        h.render(out, family, "");
    }
    for (family, kind, help, v) in [
        (
            "storage_proxy_download_bytes_total",
            "counter",
            "Bytes sent by downloads.",
            &o.download_bytes,
        ),
        (
            "storage_proxy_downloads_in_progress",
            "gauge",
            "Downloads whose body is streaming now.",
            &o.downloads_active,
        ),
        (
            "storage_proxy_bgtasks_running",
            "gauge",
            "Background tasks running now.",
            &o.bgtasks_running,
        ),
    ] {
        header(out, family, kind, help);
        sample(out, family, "", v.load(Relaxed));
    }
    o.bgtasks_finished.render(
        out,
        "storage_proxy_bgtasks_finished_total",
        "counter",
        "Background tasks finished, by task and state (done, failed, cancelled: the proxy stopped first).",
    );
    // Quota usage per scope, as last measured (sync job or a reservation).
    let roots: Vec<(String, std::path::PathBuf)> = state
        .volumes
        .names()
        .into_iter()
        .filter_map(|n| Some((n.to_owned(), state.volumes.root(n).ok()?.to_owned())))
        .collect();
    // (volume, scope) → (used, limit): scopes measured or with a limit read.
    let mut scopes: std::collections::BTreeMap<(String, String), (Option<u64>, Option<u64>)> =
        Default::default();
    let label_of = |path: &std::path::Path| {
        let volume = roots
            .iter()
            .find(|(_, root)| path.parent() == Some(root.as_path()))?;
        Some((
            volume.0.clone(),
            path.file_name()?.to_string_lossy().into_owned(),
        ))
    };
    for (path, used) in state.reservations.measurements() {
        if let Some(k) = label_of(&path) {
            scopes.entry(k).or_default().0 = Some(used);
        }
    }
    if let Ok(l) = state.quota_limits.lock() {
        for (path, limit) in l.iter() {
            if let Some(k) = label_of(path) {
                scopes.entry(k).or_default().1 = Some(*limit);
            }
        }
    }
    // The first MAX_SCOPE_LABELS scopes (by volume and name) have series of their
    // own, the same ones in both families; the rest are summed per volume.
    let mut used_rows = String::new();
    let mut limit_rows = String::new();
    let mut other: std::collections::BTreeMap<&str, (Option<u64>, Option<u64>)> =
        Default::default();
    let add = |a: &mut Option<u64>, b: Option<u64>| {
        if let Some(b) = b {
            *a = Some(a.unwrap_or(0).saturating_add(b));
        }
    };
    for (i, ((volume, scope), (used, limit))) in scopes.iter().enumerate() {
        if i < super::MAX_SCOPE_LABELS {
            let labels = format!("volume=\"{}\",scope=\"{}\"", escape(volume), escape(scope));
            if let Some(u) = used {
                sample(
                    &mut used_rows,
                    "storage_proxy_quota_scope_used_bytes",
                    &labels,
                    u,
                );
            }
            if let Some(l) = limit {
                sample(
                    &mut limit_rows,
                    "storage_proxy_quota_scope_limit_bytes",
                    &labels,
                    l,
                );
            }
        } else {
            let o = other.entry(volume.as_str()).or_default();
            add(&mut o.0, *used);
            add(&mut o.1, *limit);
        }
    }
    for (volume, (used, limit)) in other {
        let labels = format!("volume=\"{}\",scope=\"other\"", escape(volume));
        if let Some(u) = used {
            sample(
                &mut used_rows,
                "storage_proxy_quota_scope_used_bytes",
                &labels,
                u,
            );
        }
        if let Some(l) = limit {
            sample(
                &mut limit_rows,
                "storage_proxy_quota_scope_limit_bytes",
                &labels,
                l,
            );
        }
    }
    header(
        out,
        "storage_proxy_quota_scope_used_bytes",
        "gauge",
        "Bytes used per quota scope, as last measured (at most 500 scopes apart, the rest summed under scope=\"other\").",
    );
    out.push_str(&used_rows);
    header(
        out,
        "storage_proxy_quota_scope_limit_bytes",
        "gauge",
        "Byte limit per quota scope, as last read (scopes without a limit have no series; the same 500 scopes apart as the usage, the rest summed under scope=\"other\").",
    );
    out.push_str(&limit_rows);
}

/// Prometheus text exposition of the storage-proxy's counters.
async fn metrics(Extract(state): Extract<Arc<State>>) -> Response {
    use std::fmt::Write as _;
    use std::sync::atomic::Ordering::Relaxed;
    let m = &state.metrics;
    let mut out = String::new();
    for (name, help, kind, value) in [
        (
            "storage_proxy_upload_bytes_total",
            "Bytes written by tus PATCHes.",
            "counter",
            m.upload_bytes.load(Relaxed),
        ),
        (
            "storage_proxy_upload_writes_total",
            "Writes to staging files by tus PATCHes (a body's frames are gathered into buffers of up to 64 KiB, one write each).",
            "counter",
            m.upload_writes.load(Relaxed),
        ),
        (
            "storage_proxy_uploads_completed_total",
            "Uploads moved into place.",
            "counter",
            m.uploads_completed.load(Relaxed),
        ),
        (
            "storage_proxy_downloads_total",
            "File and archive downloads started.",
            "counter",
            m.downloads.load(Relaxed),
        ),
        (
            "storage_proxy_escapes_refused_total",
            "Requests refused for leaving their vfolder.",
            "counter",
            super::ESCAPES_REFUSED.load(Relaxed),
        ),
        (
            "storage_proxy_quota_refused_total",
            "Sessions, PATCHes and clones refused by a quota.",
            "counter",
            m.quota_refused.load(Relaxed),
        ),
        (
            "storage_proxy_quota_walks_total",
            "Walks of a quota scope measuring its committed bytes (checks and quota-scope reports whose measurement was too old, and the usage-sync pass).",
            "counter",
            m.quota_walks.load(Relaxed),
        ),
        (
            "storage_proxy_expired_uploads_removed_total",
            "Expired staging files removed by the cleanup (the first 16 of a pass logged one by one, each staging area's in one line).",
            "counter",
            m.expired_uploads_removed.load(Relaxed),
        ),
        (
            "storage_proxy_quota_reserved_bytes",
            "Bytes reserved by upload sessions and clones.",
            "gauge",
            state.reservations.all(),
        ),
        (
            "storage_proxy_uploads_in_progress",
            "PATCHes in progress.",
            "gauge",
            state.uploading.lock().map_or(0, |s| s.len() as u64),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    for (name, help, kind, of) in [
        (
            "storage_proxy_api_connections_refused_total",
            "API connections closed at once at the connection cap, or at their address's share of it (counted apart too).",
            "counter",
            (|m| &m.refused) as fn(&server::ServerMetrics) -> &std::sync::atomic::AtomicU64,
        ),
        (
            "storage_proxy_api_connections_refused_address_share_total",
            "API connections closed at once because their address held its share of the cap (max_connections_per_address) while half of it or more was taken.",
            "counter",
            |m| &m.refused_address_share,
        ),
        (
            "storage_proxy_api_connections_timed_out_total",
            "API connections closed for idleness or a slow request head.",
            "counter",
            |m| &m.timed_out,
        ),
        (
            "storage_proxy_api_connections",
            "API connections open.",
            "gauge",
            |m| &m.open,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (api, counters) in [("manager", &m.manager_api), ("client", &m.client_api)] {
            let _ = writeln!(
                out,
                "{name}{{api=\"{api}\"}} {}",
                of(counters).load(Relaxed)
            );
        }
    }
    let name = "storage_proxy_usage_walks_total";
    let _ = writeln!(
        out,
        "# HELP {name} Walks made for usage reports, by report: a vfolder's files and bytes (/folder/usage, /folder/used-bytes; GET /quota-scope reports the quota's measurement, walked in storage_proxy_quota_walks_total).\n# TYPE {name} counter\n{name}{{report=\"folder\"}} {}",
        m.usage_walks_folder.load(Relaxed),
    );
    render_observed(&state, &mut out);
    let mut resp = out.into_response();
    resp.headers_mut().insert(
        "content-type",
        axum::http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

#[cfg(test)]
mod clone_name_tests {
    use super::{clone_temp_name, is_clone_temp};
    use std::ffi::OsStr;

    #[test]
    fn clone_copies_are_told_by_their_whole_name() {
        let holder = format!("clone-{}", "0123456789abcdef".repeat(2));
        let name = clone_temp_name(OsStr::new("8c1e9a4d4e6f8b7a1c2d3e4f5a6b"), &holder);
        assert_eq!(
            name,
            OsStr::new(".8c1e9a4d4e6f8b7a1c2d3e4f5a6b.clone-0123456789abcdef0123456789abcdef")
        );
        assert!(is_clone_temp(&name));
        for not in [
            "8c1e9a4d4e6f8b7a1c2d3e4f5a6b",
            ".upload",
            "..clone-0123456789abcdef0123456789abcdef",
            ".x.clone-0123456789abcdef0123456789abcde",
            ".x.clone-0123456789abcdef0123456789abcdefa",
            ".x.clone-0123456789abcdef0123456789abcdeg",
            "x.clone-0123456789abcdef0123456789abcdef",
            ".x.clone-",
        ] {
            assert!(!is_clone_temp(OsStr::new(not)), "{not}");
        }
    }
}
