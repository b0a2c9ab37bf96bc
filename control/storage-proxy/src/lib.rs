//! `appproxy-storage-proxy`: a manager-facing API (secret header) for vfolders and files, and
//! a client-facing API for token downloads and tus uploads, on tokio + axum.
//!
//! Every request goes through the request-ID middleware (extract or generate, echo);
//! background jobs (clone, recursive delete) keep the initiating request's ID across
//! the tasks they spawn; the periodic upload cleanup runs each pass under its own ID.

#![forbid(unsafe_code)]

pub mod archive_slots;
pub mod client;
pub mod config;
pub mod fsx;
pub mod manager;
pub mod quota;
pub mod usage;
pub mod volume;
pub mod wirename;
pub mod zip;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use appproxy_control_common::server;
use appproxy_shared::header::IdPolicy;
use appproxy_shared::middleware::RequestIdLayer;
use appproxy_shared::redis_link::RedisConn;
use appproxy_shared::IdVersion;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use appproxy_control_common::metrics;
use config::StorageConfig;
use volume::{PathError, Volumes};

/// The storage-proxy's request-ID rule: a valid ID is kept, an absent or invalid one
/// replaced by a generated UUID v4; both APIs' request-ID layers and their servers'
/// own answers follow it.
const REQUEST_IDS: (IdPolicy, IdVersion) = (IdPolicy::GenerateIfMissing, IdVersion::V4);

/// How the storage-proxy's JSON errors are shaped; its servers' own answers to heads
/// they cannot take are shaped the same.
const PROBLEM: server::Problem = server::Problem {
    type_base: "https://api.backend.ai/probs/storage/",
    error_code_prefix: None,
};

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
    /// How long a transfer waits for a client that moves no byte (an archive
    /// download, a tus PATCH body).
    pub stall: Duration,
    /// Bytes per second a tus PATCH body must keep up on average (`[storage]
    /// min_body_rate`; 0: no floor).
    pub min_body_rate: u64,
    /// A manager API body must arrive whole within this.
    pub body_read: Duration,
    /// Archive downloads streaming now hold a slot each (`[storage]
    /// max_archive_streams`): each holds a blocking thread while it waits for its
    /// client, and the blocking pool serves every file operation. Once half are
    /// taken, a client address holds at most its share ([`ARCHIVE_SHARE`]).
    pub archives: Arc<archive_slots::ArchiveSlots>,
    /// tus sessions with a PATCH in progress (a second one gets 409).
    pub uploading: Mutex<HashSet<String>>,
    /// tus sessions completed lately, so that a client which lost the last answer
    /// learns from HEAD that its upload is in place (see [`client::Completed`]).
    pub completed: client::Completed,
    /// Where bgtask events go (`[redis] url`), if anywhere.
    pub events: Option<Events>,
    /// How old a quota scope's measurement of committed bytes may be for a check to
    /// use it (`[storage] quota_usage_max_age_secs`; see `quota`).
    pub usage_max_age: Duration,
    /// Paths one delete request may name (`[storage] max_delete_paths`).
    pub max_delete_paths: usize,
    /// Entries one listing carries at most (`[storage] scandir_limit`).
    pub scandir_limit: usize,
    /// Last read limit per quota scope directory (scopes without one are absent).
    pub quota_limits: Mutex<std::collections::HashMap<PathBuf, u64>>,
    /// Quota reservations of upload sessions and clones.
    pub reservations: quota::Reservations,
    /// The last usage figure of each vfolder reported, and its walk (see `usage`).
    pub folders: usage::Folders,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    /// Set once the proxy is stopping: background tasks end as cancelled (their
    /// event published) and a clone's copy stops ([`State::stopping`]).
    pub stop: tokio::sync::watch::Sender<bool>,
    /// Destinations of clones running in this process (their vfolder paths): a
    /// second clone to one is refused at once.
    pub cloning: Mutex<HashSet<PathBuf>>,
    /// Woken as each background task ends: a stop waits on it for the last.
    pub bgtask_ended: tokio::sync::Notify,
}

impl State {
    /// Whether the proxy is stopping.
    pub fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Resolves once the proxy is stopping.
    pub async fn stopped(&self) {
        let mut rx = self.stop.subscribe();
        if rx.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The most archive downloads that may stream at once, whatever the config says:
/// half of tokio's blocking pool (512 threads), so that clients slow to take an
/// archive never hold the threads every file operation needs.
pub const MAX_ARCHIVE_STREAMS: usize = 256;

/// Descriptors an archive download holds at most: the levels its walk keeps open
/// ([`fsx::HELD`]), the walk's top and the level it is in, the file being read, the
/// temporary file and the client's socket.
pub const ARCHIVE_DESCRIPTORS: u64 = fsx::HELD as u64 + 5;

/// Descriptors one API connection may hold: its socket and what its request holds
/// open (a download: the file; a tus `PATCH`: the staging file and the directories
/// it is reached through, four in all, measured).
const CONNECTION_DESCRIPTORS: u64 = 4;

/// The most `[storage] scandir_limit` may be: a listing holds each entry it
/// carries until its answer is sorted, up to some 350 bytes each (a 255-byte name
/// and its status), so 350 MB at this many.
pub const MAX_SCANDIR_LIMIT: usize = 1_000_000;

/// `[storage] max_archive_streams` (`configured`) fitted to the descriptor limit:
/// archives hold at most half of what [`server::FD_RESERVE`] leaves, at
/// [`ARCHIVE_DESCRIPTORS`] each, so that slow archive clients never take the
/// descriptors listings, downloads and uploads need (with a soft limit of 1024,
/// thirty of them did).
fn archive_slots(configured: usize) -> usize {
    let max = configured.clamp(1, MAX_ARCHIVE_STREAMS);
    let Some(limit) = server::descriptor_limit() else {
        return max;
    };
    let room = (limit.saturating_sub(server::FD_RESERVE) / 2 / ARCHIVE_DESCRIPTORS).max(1);
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    if room < max {
        tracing::warn!(
            configured = max,
            nofile = limit,
            cap = room,
            "[storage] max_archive_streams lowered to fit the descriptor limit (raise LimitNOFILE)"
        );
    }
    max.min(room)
}

/// Once half the archive slots are taken, a client address (IPv4, or an IPv6 /64)
/// holds at most one in this many of them (at least one) unless `[storage]
/// max_archive_streams_per_address` says otherwise: one address takes at most half
/// the slots, and it takes several more to hold the rest.
pub const ARCHIVE_SHARE: usize = 8;

/// Requests refused because a path left (or tried to leave) its vfolder (counted
/// where the refusal becomes a response).
pub static ESCAPES_REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counters exported at `/metrics` (Prometheus text format).
#[derive(Default)]
pub struct Metrics {
    /// Bytes written to staging files by tus PATCHes.
    pub upload_bytes: std::sync::atomic::AtomicU64,
    /// Writes to staging files by tus PATCHes: one per gathered buffer (up to
    /// `client::UPLOAD_WRITE` bytes), however the client framed the body.
    pub upload_writes: std::sync::atomic::AtomicU64,
    /// Uploads moved into place.
    pub uploads_completed: std::sync::atomic::AtomicU64,
    /// File downloads started (whole or ranged) and archives streamed.
    pub downloads: std::sync::atomic::AtomicU64,
    /// Sessions, PATCHes and clones refused by a quota.
    pub quota_refused: std::sync::atomic::AtomicU64,
    /// Walks of a quota scope measuring its committed bytes (checks and the sync
    /// pass).
    pub quota_walks: std::sync::atomic::AtomicU64,
    /// Walks of a vfolder for `/folder/usage` and `/folder/used-bytes`.
    pub usage_walks_folder: std::sync::atomic::AtomicU64,
    /// Expired staging files removed by the cleanup.
    pub expired_uploads_removed: std::sync::atomic::AtomicU64,
    /// Histograms, gauges and labeled counters.
    pub observed: Observed,
    /// The manager API server's connection counters.
    pub manager_api: Arc<appproxy_control_common::server::ServerMetrics>,
    /// The client API server's connection counters.
    pub client_api: Arc<appproxy_control_common::server::ServerMetrics>,
}

/// At most this many quota scopes are labeled apart at `/metrics` (the rest are
/// summed under `scope="other"`).
pub const MAX_SCOPE_LABELS: usize = 500;

/// Transfer histograms and background-task counts for `/metrics`.
pub struct Observed {
    /// Bytes per tus PATCH.
    pub upload_size: crate::metrics::Histogram,
    /// Duration of each tus PATCH (request to response).
    pub upload_duration: crate::metrics::Histogram,
    /// Bytes sent per download (file, range or archive), counted as the body streams.
    pub download_size: crate::metrics::Histogram,
    /// Duration of each download, until its body ended or was dropped.
    pub download_duration: crate::metrics::Histogram,
    /// Bytes sent by downloads.
    pub download_bytes: std::sync::atomic::AtomicU64,
    /// Downloads whose body is streaming now.
    pub downloads_active: std::sync::atomic::AtomicU64,
    /// Background tasks running now.
    pub bgtasks_running: std::sync::atomic::AtomicU64,
    /// Background tasks finished, by task and state (`done`, `failed`).
    pub bgtasks_finished: crate::metrics::Labeled<std::sync::atomic::AtomicU64>,
    /// Duration of each walk measuring a quota scope's committed bytes.
    pub quota_walk_duration: crate::metrics::Histogram,
    /// Duration of each walk made for a usage report.
    pub usage_walk_duration: crate::metrics::Histogram,
}

impl Default for Observed {
    fn default() -> Self {
        use crate::metrics::Histogram;
        Self {
            upload_size: Histogram::bytes(),
            upload_duration: Histogram::default(),
            download_size: Histogram::bytes(),
            download_duration: Histogram::default(),
            download_bytes: Default::default(),
            downloads_active: Default::default(),
            bgtasks_running: Default::default(),
            bgtasks_finished: crate::metrics::Labeled::new("", 64, Default::default),
            quota_walk_duration: Histogram::default(),
            usage_walk_duration: Histogram::default(),
        }
    }
}

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &std::sync::atomic::AtomicU64, n: u64) {
        counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Opens a regular file or a directory under a vfolder for reading
/// (`RESOLVE_BENEATH`; special files are never opened, see `fsx::readable`): a
/// missing entry or one of another type is the API's 404, one in the vfolder's
/// staging area (`.upload`, by name or through a symlink: other users' uploads in
/// progress, see `manager::StagingCheck`) the staging area's 400, any other failure
/// its mapped error.
pub fn open_for_reading(
    root: std::os::fd::BorrowedFd<'_>,
    parts: &[std::ffi::OsString],
) -> Result<std::os::fd::OwnedFd, ApiError> {
    let mut check = manager::StagingCheck::new(root)?;
    open_for_reading_checked(root, parts, &mut check)
}

/// [`open_for_reading`] with a staging check made for `root` already, which
/// remembers the directories it found outside the staging area: an archive checks
/// each of its listed paths with one.
pub fn open_for_reading_checked(
    root: std::os::fd::BorrowedFd<'_>,
    parts: &[std::ffi::OsString],
    check: &mut manager::StagingCheck,
) -> Result<std::os::fd::OwnedFd, ApiError> {
    let not_found = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidInput => ApiError::NotFound,
        _ => e.into(),
    };
    manager::outside_staging_area(parts)?;
    let located = fsx::locate(root, parts).map_err(not_found)?;
    check.refuse(&located)?;
    fsx::open_located(root, located).map_err(not_found)
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
    /// A tus `HEAD` while a `PATCH` to the upload is finishing: 423 `locked` with
    /// `Retry-After` (tus clients retry a locked upload; any other 4xx makes them
    /// forget it and begin again).
    #[error("locked: {0}")]
    Locked(&'static str),
    /// Too large.
    #[error("upload larger than the limit")]
    TooLarge,
    /// A request body whose framing is broken (a chunk size that is not hex, a
    /// chunk line ended by a bare LF, chunk data past its size, a chunk extension
    /// past hyper's limit) or that ended before its `Content-Length`: 400
    /// `bad-framing`, the message naming what the body's reader met.
    #[error("{0}")]
    BadBody(String),
    /// A tus PATCH whose body was cut (`cut`: a stall, the token's expiry, a body
    /// past `Upload-Length`, a broken framing) after every byte of the upload had
    /// arrived: the upload was completed and is in place all the same. Answered as
    /// `cut` is, the message saying so.
    #[error("{cut}; yet all {size} bytes of the upload had arrived: it is complete and in place")]
    CompletedDespite {
        /// What cut the body.
        cut: Box<ApiError>,
        /// The upload's size.
        size: u64,
    },
    /// A request body that did not come in time (a tus PATCH body on which no byte
    /// came for the stall timeout, a manager API body not whole within its
    /// deadline): 408 `request-timeout`, the message saying which.
    #[error("{0}")]
    TimedOut(String),
    /// Too many transfers of this kind at once (archive downloads past `[storage]
    /// max_archive_streams`), or a recursive delete of a directory refilled as
    /// fast as it is emptied (`fsx::StillFilled`): 503 `busy` with `Retry-After`,
    /// the message saying which.
    #[error("{0}")]
    Busy(String),
    /// A usage (a quota scope's committed bytes, a vfolder's or a clone source's
    /// size) could not be measured: its walk did not see the whole tree (a
    /// directory it cannot open, one moved while it was walked, again on every try).
    /// Nothing is admitted on, or reported as, a partial count: 503
    /// `usage-unmeasured`, the message saying what the walk met.
    #[error("the usage could not be measured: {0}")]
    Unmeasured(String),
    /// The quota scope would pass its limit.
    #[error("quota exceeded: {used} of {limit} bytes used")]
    QuotaExceeded {
        /// Bytes used now.
        used: u64,
        /// The limit.
        limit: u64,
    },
    /// A request the extractors refused (bad JSON, wrong type, too large, no route).
    #[error("{message}")]
    Rejected {
        /// The status the rejection carries.
        status: StatusCode,
        /// What was wrong.
        message: String,
    },
    /// A write past the largest size a file may have (`EFBIG`: the filesystem's
    /// limit, or the proxy's `RLIMIT_FSIZE`): 413 `file-too-large`, the message
    /// naming the limit (see [`file_too_large`]). Before, 500.
    #[error("{0}")]
    FileTooLarge(String),
    /// A filesystem error.
    #[error("filesystem error: {0}")]
    Io(std::io::Error),
    /// A vfolder that is there but could not be opened (its user made it
    /// unreadable to the proxy, descriptors or memory ran out, an I/O error): 500
    /// `vfolder-unavailable`, never the 404 or 410 of a vfolder that is gone.
    #[error("the vfolder could not be opened: {0}")]
    FolderUnavailable(std::io::Error),
    /// An archive that failed before its first byte (the proxy's own fault: its
    /// temporary space, say): 500 `archive-failed`.
    #[error("the archive could not be made: {0}")]
    Archive(std::io::Error),
}

impl From<std::io::Error> for ApiError {
    /// The kernel refusing to resolve beneath a vfolder is an escape (400), not a
    /// filesystem fault.
    fn from(e: std::io::Error) -> Self {
        if fsx::is_escape(&e) {
            Self::Path(PathError::Escape)
        } else if e.kind() == std::io::ErrorKind::FileTooLarge {
            Self::FileTooLarge(file_too_large(&e))
        } else if let Some(itself) = fsx::carried::<fsx::VfolderItself>(&e) {
            Self::Params(itself.to_string())
        } else if fsx::carried::<fsx::StillFilled>(&e).is_some() {
            // A recursive delete of a directory refilled as fast as it is emptied
            // (see `fsx::StillFilled`): 503 `busy`, worth another try later.
            Self::Busy(e.to_string())
        } else {
            Self::Io(e)
        }
    }
}

/// What a write that failed with `EFBIG` (`e`) reached: the proxy's
/// `RLIMIT_FSIZE` when one is set (named with its bytes), else the largest file
/// the filesystem allows.
pub fn file_too_large(e: &std::io::Error) -> String {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Fsize).current;
    match limit {
        Some(bytes) => format!(
            "the file would pass the largest size a file may have here: the proxy's file size limit (RLIMIT_FSIZE = {bytes} bytes) or the filesystem's ({e})"
        ),
        None => format!(
            "the file would pass the largest size the filesystem allows for a file ({e})"
        ),
    }
}

impl From<rustix::io::Errno> for ApiError {
    fn from(e: rustix::io::Errno) -> Self {
        std::io::Error::from(e).into()
    }
}

impl ApiError {
    /// An archive that failed before its first byte: 500 `archive-failed`.
    pub fn archive(e: std::io::Error) -> Self {
        Self::Archive(e)
    }

    /// The filesystem error this is, or carries (a completion despite a cut: the
    /// cut's).
    fn io(&self) -> Option<&std::io::Error> {
        match self {
            Self::Io(e) => Some(e),
            Self::CompletedDespite { cut, .. } => cut.io(),
            _ => None,
        }
    }

    fn status_and_kind(&self) -> (StatusCode, &'static str) {
        match self {
            Self::MissingToken | Self::InvalidToken => (StatusCode::FORBIDDEN, "forbidden"),
            Self::Path(PathError::NoFolder) | Self::NotFound => {
                (StatusCode::NOT_FOUND, "file-not-found")
            }
            Self::Path(_) | Self::Params(_) => (StatusCode::BAD_REQUEST, "invalid-api-params"),
            Self::Session => (StatusCode::UNAUTHORIZED, "invalid-token"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::Locked(_) => (StatusCode::LOCKED, "locked"),
            Self::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too-large"),
            Self::FileTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "file-too-large"),
            Self::TimedOut(_) => (StatusCode::REQUEST_TIMEOUT, "request-timeout"),
            Self::BadBody(_) => (StatusCode::BAD_REQUEST, "bad-framing"),
            Self::CompletedDespite { cut, .. } => cut.status_and_kind(),
            Self::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            Self::Unmeasured(_) => (StatusCode::SERVICE_UNAVAILABLE, "usage-unmeasured"),
            Self::QuotaExceeded { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "quota-exceeded"),
            Self::Rejected { status, .. } if *status == StatusCode::PAYLOAD_TOO_LARGE => {
                (*status, "too-large")
            }
            Self::Rejected { status, .. } if *status == StatusCode::NOT_FOUND => {
                (*status, "not-found")
            }
            Self::Rejected { status, .. } if *status == StatusCode::METHOD_NOT_ALLOWED => {
                (*status, "method-not-allowed")
            }
            Self::Rejected { status, .. } if *status == StatusCode::PRECONDITION_FAILED => {
                (*status, "precondition-failed")
            }
            Self::Rejected { status, .. } if *status == StatusCode::RANGE_NOT_SATISFIABLE => {
                (*status, "range-not-satisfiable")
            }
            Self::Rejected { status, .. } if *status == StatusCode::GONE => {
                (*status, "vfolder-not-found")
            }
            Self::Rejected { status, .. }
                if *status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE =>
            {
                (*status, "request-header-fields-too-large")
            }
            Self::Rejected { status, .. } if *status == StatusCode::INSUFFICIENT_STORAGE => {
                (*status, "insufficient-storage")
            }
            Self::Rejected { status, .. } if status.is_server_error() => (*status, "server-error"),
            Self::Rejected { status, .. } => (*status, "invalid-api-params"),
            Self::Io(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (StatusCode::NOT_FOUND, "file-not-found")
            }
            Self::Io(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                (StatusCode::CONFLICT, "conflict")
            }
            // A resolution that met a rename or mount on every try (`fsx::openat2`),
            // a file busy: worth another try in a moment, not the caller's error.
            Self::Io(e) if transient(e) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            // The volume full or its quota spent, whatever the request wrote (a
            // limit's file, a directory, a copy): no fault of the caller's, worth
            // another try once there is room — as an upload's write says it. Before,
            // every request but an upload was told 400, as if it were wrong.
            Self::Io(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                ) =>
            {
                (StatusCode::INSUFFICIENT_STORAGE, "insufficient-storage")
            }
            Self::Io(_) => (StatusCode::BAD_REQUEST, "filesystem-error"),
            Self::Archive(_) => (StatusCode::INTERNAL_SERVER_ERROR, "archive-failed"),
            Self::FolderUnavailable(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "vfolder-unavailable")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = self.status_and_kind();
        if matches!(self, Self::Path(PathError::Escape)) {
            Metrics::add(&ESCAPES_REFUSED, 1);
        }
        if status.is_server_error() || matches!(self, Self::Io(_)) {
            tracing::warn!(error = %self, "request failed");
        } else {
            tracing::info!(error = %self, "request refused");
        }
        let title = self.to_string();
        let mut body = serde_json::json!({
            "type": format!("{}{kind}", PROBLEM.type_base),
            "title": title,
            "error": title,
            "code": kind,
            "request_id": appproxy_shared::current_request_id().map(|i| i.to_string()),
        });
        // The original's fields for a filesystem error, beside the problem's:
        // `msg` (the system's words), `errno`, and `paths`, which stays empty here:
        // the original named host paths, which are never told.
        if let (Some(e), Some(fields)) = (self.io(), body.as_object_mut()) {
            fields.insert("msg".into(), strerror(e).into());
            fields.insert("errno".into(), os_error(e).into());
            fields.insert("paths".into(), serde_json::json!([]));
        }
        let mut resp = (status, axum::Json(body)).into_response();
        if matches!(self, Self::Busy(_)) {
            resp.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("5"));
        }
        if matches!(&self, Self::Locked(_)) || self.io().is_some_and(transient) {
            resp.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        resp
    }
}

/// An error that passes on its own: the kernel's `EAGAIN` from a resolution
/// through `..` that met a rename or mount anywhere on the host on each of its
/// tries ([`fsx::openat2`]). (`EBUSY` does not: a mount point or a file in use stays
/// so.)
fn transient(e: &std::io::Error) -> bool {
    os_error(e) == Some(rustix::io::Errno::AGAIN.raw_os_error())
}

/// The system's error number of `e`, or of the error it carries (one given a note,
/// as a discarded upload's is).
fn os_error(e: &std::io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        let mut inner: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|r| r as _);
        while let Some(err) = inner {
            if let Some(n) = err
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::raw_os_error)
            {
                return Some(n);
            }
            inner = err.source();
        }
        None
    })
}

/// What the system says of `e` (of the error it carries), without the " (os error
/// N)" std adds; the text itself for an error of the proxy's own.
fn strerror(e: &std::io::Error) -> String {
    match os_error(e) {
        Some(n) => {
            let text = std::io::Error::from_raw_os_error(n).to_string();
            text.strip_suffix(&format!(" (os error {n})"))
                .map_or(text.clone(), str::to_owned)
        }
        None => e.to_string(),
    }
}

/// A JSON body whose rejections (bad JSON, wrong type, missing content type, too
/// large) are the product's JSON error with the request ID.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let rejected = |status, message| ApiError::Rejected { status, message };
        // The content type first, as `axum::Json` checks it: a body of another
        // kind is not read.
        if !json_content_type(req.headers()) {
            return Err(rejected(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Expected request with `Content-Type: application/json`".into(),
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| rejected(e.status(), e.body_text()))?;
        // Paths are read as bytes (`wirename`), where serde_json takes a string's
        // raw bytes as they are: a raw control character, a byte that is not UTF-8
        // or a raw surrogate's bytes would pass for what only an escape may carry.
        // So the body is held to strict JSON whole before it is read into `T`: the
        // syntax as `axum::Json` checks it (control characters in strings refused;
        // lone surrogate escapes, which names need, let through), and UTF-8 (RFC
        // 8259 §8.1).
        let axum::Json(serde::de::IgnoredAny) =
            axum::Json::<serde::de::IgnoredAny>::from_bytes(&bytes)
                .map_err(|e| rejected(e.status(), e.body_text()))?;
        if std::str::from_utf8(&bytes).is_err() {
            return Err(rejected(
                StatusCode::BAD_REQUEST,
                "the body is not UTF-8, as JSON must be".into(),
            ));
        }
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(e) => Err(rejected(e.status(), e.body_text())),
        }
    }
}

/// Whether `headers` say the body is JSON (`application/json`, or
/// `application/…+json`), as `axum::Json` decides it.
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Query parameters whose rejections are the product's JSON error.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S>
    for ApiQuery<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        if let Some(query) = parts.uri.query() {
            if !query_is_utf8(query) {
                // Decoded lossily, `%FF` would name `U+FFFD` (another entry, made
                // if missing) rather than the byte: refused, as a body naming one is.
                return Err(ApiError::Rejected {
                    status: StatusCode::BAD_REQUEST,
                    message: "the query string decodes to bytes that are not UTF-8".into(),
                });
            }
        }
        // A parameter given twice (`?token=a&token=b`) is refused, 400 naming it:
        // before, the last copy was taken, and a front proxy or log reading the
        // first saw another request than the one served.
        if let Ok(axum::extract::Query(pairs)) =
            axum::extract::Query::<Vec<(String, String)>>::from_request_parts(parts, state).await
        {
            let mut seen = HashSet::new();
            if let Some((name, _)) = pairs.iter().find(|(k, _)| !seen.insert(k.as_str())) {
                return Err(ApiError::Rejected {
                    status: StatusCode::BAD_REQUEST,
                    message: format!(
                        "the query parameter {name:?} is given more than once; it may be given once"
                    ),
                });
            }
        }
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Self(v)),
            Err(e) => Err(ApiError::Rejected {
                status: e.status(),
                message: e.body_text(),
            }),
        }
    }
}

/// Whether every name and value of a query string (`+` a space, `%XX` a byte)
/// decodes to UTF-8. axum's `Query` decodes lossily, so without this a query
/// naming a byte that is not UTF-8 (`dst_dir=%FF`, a name made from a shell)
/// would name another path, `U+FFFD` in its place.
fn query_is_utf8(query: &str) -> bool {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    query.split(['&', '=']).all(|part| {
        let raw = part.as_bytes();
        let mut bytes = Vec::with_capacity(raw.len());
        let mut i = 0;
        while i < raw.len() {
            match raw[i] {
                b'%' => match (
                    raw.get(i + 1).copied().and_then(hex),
                    raw.get(i + 2).copied().and_then(hex),
                ) {
                    (Some(h), Some(l)) => {
                        bytes.push(h << 4 | l);
                        i += 3;
                        continue;
                    }
                    // Not an escape: kept as it is, as the decoder keeps it.
                    _ => bytes.push(b'%'),
                },
                b => bytes.push(b),
            }
            i += 1;
        }
        std::str::from_utf8(&bytes).is_ok()
    })
}

/// The answer to a route that does not exist.
pub async fn no_route() -> ApiError {
    ApiError::Rejected {
        status: StatusCode::NOT_FOUND,
        message: "no such route".into(),
    }
}

/// The answer to a method a route does not take.
pub async fn no_method() -> ApiError {
    ApiError::Rejected {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: "method not allowed".into(),
    }
}

/// Runs blocking filesystem work on the blocking pool under the caller's request ID,
/// its resolutions through symlinks within one `fsx::RESOLVE_BUDGET`.
pub async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    appproxy_shared::context::spawn_blocking(move || fsx::resolving(f))
        .await
        .map_err(|e| ApiError::Io(std::io::Error::other(e)))?
}

/// Set when the request that started blocking work is gone (its handler's future
/// dropped: the client hung up), for the work to stop at its next step rather than
/// run to its end for nobody ([`Abandoned::new`]).
#[derive(Clone)]
pub struct Abandoned(Arc<std::sync::atomic::AtomicBool>);

/// Sets its [`Abandoned`] when dropped: held by the request's future across the
/// blocking work.
pub struct AbandonOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Abandoned {
    /// A flag and the guard that sets it.
    pub fn new() -> (Self, AbandonOnDrop) {
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        (Self(flag.clone()), AbandonOnDrop(flag))
    }

    /// `Err` once the request is gone.
    pub fn check(&self) -> Result<(), ApiError> {
        if self.0.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(ApiError::Io(std::io::Error::other(
                "the request is gone; its work stopped",
            )));
        }
        Ok(())
    }
}

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The channel bgtask events are broadcast on.
pub const EVENT_CHANNEL: &str = "events_all";

/// The event bus (`[redis] url`), whose connection is opened in the background:
/// a Redis out of reach or frozen at start keeps neither the APIs from serving nor
/// a stop from stopping. Before, the proxy waited for it before its listeners,
/// writing nothing and deaf to `SIGTERM` — for ever with a frozen Redis, 473 s with
/// none — and every vfolder operation was down for events that are optional (an
/// outside tester's find). Events emitted before it is open are not sent, and
/// logged so; once open, the connection reconnects by itself, and is replaced
/// when a call goes unanswered or its answer cannot be read (the coordinator's
/// [`appproxy_shared::redis_link`]: before, a reconnection whose handshake met an
/// answer cut short kept that failure, and no event went out until a restart).
#[derive(Clone, Default)]
pub struct Events(Arc<std::sync::OnceLock<RedisConn>>);

/// The bound of one attempt to open the event bus's connection.
const EVENTS_CONNECT: Duration = appproxy_shared::redis_call::REDIS_CALL_TIMEOUT;

/// The longest wait between two attempts to open it.
const EVENTS_RETRY_MAX: Duration = Duration::from_secs(30);

impl Events {
    /// Opens the connection to `client` in the background, each attempt bounded,
    /// trying again after 1 s, then twice as long each time up to
    /// [`EVENTS_RETRY_MAX`]; `shown` names the URL in the log. Called within a
    /// Tokio runtime (its task is spawned there).
    pub fn open(client: redis::Client, shown: String) -> Self {
        let events = Self::default();
        let slot = events.0.clone();
        tokio::spawn(async move {
            // Each reconnection (once open) is one attempt, and a call that meets
            // a refused or dropped connection is sent once more on the next
            // (`RedisConn`): an event sent as Redis restarts goes out on the fresh
            // connection.
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(EVENTS_CONNECT)
                .set_response_timeout(EVENTS_CONNECT);
            let mut wait = Duration::from_secs(1);
            loop {
                let opening = RedisConn::connect(client.clone(), config.clone(), || {});
                // Two attempts, a second apart (`RedisConn::connect`).
                let error = match tokio::time::timeout(EVENTS_CONNECT * 3, opening).await {
                    Ok(Ok(conn)) => {
                        let _ = slot.set(conn);
                        tracing::info!(url = %shown, "event bus connected");
                        return;
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {:?}", EVENTS_CONNECT * 3),
                };
                tracing::warn!(url = %shown, error, retry_in_secs = wait.as_secs(), "cannot connect to the event bus ([redis] url); bgtask events are not sent until it answers");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(EVENTS_RETRY_MAX);
            }
        });
        events
    }
}

/// Broadcasts an event in the platform's envelope, with the current request ID in
/// its metadata. Without `[redis]` there is no event bus and nothing is sent.
pub async fn emit(state: &State, name: &str, payload: serde_json::Value) {
    use appproxy_shared::model::{BroadcastMessage, EventMetadata};
    let Some(events) = &state.events else { return };
    let Some(conn) = events.0.get() else {
        tracing::warn!(
            event = name,
            "event not published: the event bus ([redis] url) is not connected yet"
        );
        return;
    };
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
    let mut cmd = redis::cmd("PUBLISH");
    cmd.arg(EVENT_CHANNEL).arg(&text);
    // A Redis that hangs costs a task's progress no more than the bound per event.
    // A Redis restarted since the last call left the connection stale: the first
    // command fails (a broken pipe), never having reached it, and is sent once
    // more on the fresh connection (`RedisConn`); before, the event was lost.
    let sent = appproxy_shared::redis_call::bounded(cmd.query_async::<i64>(&mut conn)).await;
    if let Err(e) = sent {
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
    events: Option<Events>,
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
        stall: Duration::from_secs(config.storage.stall_timeout_secs.max(1)),
        min_body_rate: config.storage.min_body_rate,
        body_read: Duration::from_secs(config.storage.body_read_timeout_secs.clamp(1, 3600)),
        archives: {
            let max = archive_slots(config.storage.max_archive_streams);
            let per_address = config
                .storage
                .max_archive_streams_per_address
                .unwrap_or(max / ARCHIVE_SHARE);
            archive_slots::ArchiveSlots::new(max, per_address)
        },
        uploading: Mutex::new(HashSet::new()),
        completed: client::Completed::new(client::MAX_COMPLETED),
        events,
        usage_max_age: Duration::from_secs(config.storage.quota_usage_max_age_secs),
        max_delete_paths: config.storage.max_delete_paths,
        scandir_limit: config.storage.scandir_limit.clamp(1, MAX_SCANDIR_LIMIT),
        quota_limits: Mutex::new(std::collections::HashMap::new()),
        reservations: quota::Reservations::default(),
        folders: usage::Folders::default(),
        metrics: Metrics::default(),
        stop: tokio::sync::watch::Sender::new(false),
        cloning: Mutex::new(HashSet::new()),
        bgtask_ended: tokio::sync::Notify::new(),
    }))
}

/// Serves both APIs until `shutdown` resolves; runs the cleanup job meanwhile.
pub async fn serve(
    config: &StorageConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    config.storage.check_times().map_err(anyhow::Error::msg)?;
    let events = match &config.redis.url {
        Some(url) => {
            let client = redis::Client::open(url.as_str()).map_err(|e| {
                anyhow::anyhow!(
                    "[redis] url {:?}: {e}",
                    appproxy_control_common::config::shown_url(url)
                )
            })?;
            let shown = appproxy_control_common::config::shown_url(url);
            Some(Events::open(client, shown))
        }
        None => None,
    };
    let state = state_with_events(config, events)?;
    let layer = RequestIdLayer::new(REQUEST_IDS.0, REQUEST_IDS.1);
    let manager_app = manager::router(state.clone())
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .layer(layer);
    let client_app = client::router(state.clone())
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .layer(axum::middleware::from_fn(client::bounded_head))
        .layer(layer)
        .layer(axum::middleware::from_fn(client::measure_head));
    let manager = tokio::net::TcpListener::bind(config.storage.manager_bind).await?;
    let client = tokio::net::TcpListener::bind(config.storage.client_bind).await?;
    let addrs = (manager.local_addr()?, client.local_addr()?);
    tracing::info!(manager = %addrs.0, client = %addrs.1, "storage-proxy serving");
    let (tx, rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let (rx_m, rx_c) = (rx.clone(), rx.clone());
    // Both APIs: heads and idle connections timed, connections capped (each API
    // its own cap; together, each holding up to four descriptors, beside every
    // archive slot's descriptors, they stay below the descriptor limit).
    let s = &config.storage;
    let mut limits = server::Limits::from_config_fitted(
        "storage",
        REQUEST_IDS,
        (s.header_read_timeout_secs, s.idle_timeout_secs),
        s.max_connections,
        (
            2,
            CONNECTION_DESCRIPTORS,
            state.archives.max() as u64 * ARCHIVE_DESCRIPTORS,
        ),
    );
    limits.problem = PROBLEM;
    // Each API's cap shared by client address (one in 8 unless configured).
    let per_address = s
        .max_connections_per_address
        .unwrap_or_else(|| server::default_share(limits.max_connections));
    // Client heads carry download tokens in the query, and an archive token lists
    // its files: they may be as long as the longest request target served, and a
    // little more (see `client::MAX_HEAD`).
    let limits_c = server::Limits {
        max_head: client::MAX_HEAD,
        ..limits.clone()
    };
    let metrics_m = state.metrics.manager_api.clone();
    let m = tokio::spawn(async move {
        server::serve_shared(
            manager,
            manager_app,
            (limits, per_address),
            metrics_m,
            wait(rx_m),
        )
        .await
    });
    let metrics_c = state.metrics.client_api.clone();
    let c = tokio::spawn(async move {
        server::serve_shared(
            client,
            client_app,
            (limits_c, per_address),
            metrics_c,
            wait(rx_c),
        )
        .await
    });
    let cleanup = tokio::spawn(cleanup_loop(
        state.clone(),
        Duration::from_secs(config.storage.cleanup_interval_secs.max(1)),
    ));
    shutdown.await;
    // Background tasks end as cancelled, their events published while the APIs
    // drain; a clone's copy stops at its next directory.
    state.stop.send_replace(true);
    let _ = tx.send(true);
    cleanup.abort();
    let _ = m.await;
    let _ = c.await;
    // Each task's event goes out within Redis's bound (two tries): waited for, no
    // longer than that.
    let reported = tokio::time::Instant::now() + BGTASKS_REPORT;
    loop {
        // Asked for before the count is read: an end between the two still wakes it.
        let ended = state.bgtask_ended.notified();
        let running = state
            .metrics
            .observed
            .bgtasks_running
            .load(std::sync::atomic::Ordering::Acquire);
        if running == 0 || tokio::time::timeout_at(reported, ended).await.is_err() {
            break;
        }
    }
    Ok(addrs)
}

/// How long a stop waits for background tasks to report their cancellation.
const BGTASKS_REPORT: Duration = Duration::from_secs(5);

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

/// One cleanup pass (blocking); returns how many staging files were removed. The
/// walk goes by descriptor from each volume root and never follows a symlink: a
/// `.upload` replaced by a link is skipped, not entered.
pub fn remove_expired_uploads(state: &State) -> usize {
    use rustix::fs::FileType;
    use std::os::fd::AsFd as _;
    let mut removed = 0;
    // Removals logged one by one so far in this pass (see `LOGGED_REMOVALS`).
    let mut logged = 0;
    for name in state.volumes.names() {
        let (Ok(root), Ok(path)) = (state.volumes.root_fd(name), state.volumes.root(name)) else {
            continue;
        };
        // Staging lives in `<scope>/<xx>/<yy>/<rest>/.upload/<session>` (the scope's
        // directory the scope UUID's 32 hex digits) and, for old-style vfolders, in
        // `<xx>/<yy>/<rest>/.upload/<session>` directly under the root, as the
        // platform lays them out (see `volume::Vfid::parts`); `key` is the scope's
        // path (the root's for old-style vfolders, as `Volumes::scope_of` has it),
        // `at` the directory's. `depth` counts the levels below the root as a
        // scoped vfolder has them: an old-style `<xx>` starts at 2.
        let mut stack = vec![(
            fsx::open(root, &[], fsx::DIR, fsx::STRICT),
            0,
            path.to_path_buf(),
            path.to_path_buf(),
        )];
        while let Some((dir, depth, key, at)) = stack.pop() {
            let Ok(dir) = dir else { continue };
            let Ok(list) = fsx::entries(dir.as_fd()) else {
                continue;
            };
            for e in list {
                if e.kind() != FileType::Directory {
                    continue;
                }
                let (key, next) = if depth != 0 {
                    (key.clone(), depth + 1)
                } else if volume::is_scope_dir(&e.name) {
                    (key.join(&e.name), 1)
                } else if volume::is_unscoped_level(&e.name) {
                    (key.clone(), 2)
                } else {
                    // Neither a scope nor an old-style level: no vfolder there.
                    continue;
                };
                let at = at.join(&e.name);
                if depth == 3 && manager::is_clone_temp(&e.name) {
                    sweep_clone(state, dir.as_fd(), &e.name, &key);
                } else if depth == 3 {
                    // A vfolder: its staging area is opened beneath it by name, no
                    // symlink on the way. The vfolder's own entries (as many as its
                    // user makes, each held in memory by a listing at every pass)
                    // are never listed.
                    let parts = [e.name.clone(), manager::STAGING.into()];
                    let staging = fsx::open(dir.as_fd(), &parts, fsx::DIR, fsx::STRICT);
                    removed += remove_expired_in(state, staging, &key, &at, &mut logged);
                } else {
                    stack.push((fsx::child_dir(dir.as_fd(), &e.name), next, key, at));
                }
            }
        }
    }
    // A clone releases its own reservation when it ends; a session mid-PATCH is busy.
    let (idle, scopes) = state.reservations.expire(state.upload_expire, |holder| {
        holder.starts_with("clone-") || state.uploading.lock().is_ok_and(|set| set.contains(holder))
    });
    // The staged files those sessions left count in their folders' usage now.
    for scope in scopes {
        state.folders.changed_under(&scope);
    }
    if idle > 0 {
        tracing::info!(released = idle, "idle quota reservations released");
    }
    removed
}

/// Removals of one cleanup pass logged one by one (as an archive logs its first 16
/// entries renamed or left out); each staging area's removals are summed in one
/// line, and all of them counted in `storage_proxy_expired_uploads_removed_total`.
/// A user fills their own staging area with 100,000 empty files named as sessions
/// and dated back (`touch -d 2000-01-01`), at no cost in quota, before every pass:
/// a line each wrote some 25 MB of log per pass.
pub const LOGGED_REMOVALS: usize = 16;

/// Removes a clone's copy (`name` in `parent`, see `manager::is_clone_temp`) left
/// by a clone cut off — the process killed, the host down: one no clone of this
/// process copies into, untouched for `manager::CLONE_LEFT` (a running clone of any
/// process sharing the volume touches its copy every minute). The scope `key` is
/// measured again.
fn sweep_clone(
    state: &State,
    parent: std::os::fd::BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    key: &std::path::Path,
) {
    use rustix::fs::{AtFlags, FileType};
    let Ok(st) = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) else {
        return;
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory
        || state.reservations.is_pending((st.st_dev, st.st_ino))
    {
        return;
    }
    let mtime =
        std::time::UNIX_EPOCH + Duration::new(st.st_mtime.max(0) as u64, st.st_mtime_nsec as u32);
    if !mtime.elapsed().is_ok_and(|age| age > manager::CLONE_LEFT) {
        return;
    }
    match fsx::remove_tree(parent, name) {
        Ok(entries) => tracing::info!(
            copy = %name.to_string_lossy(),
            entries,
            "a clone's copy left by a clone cut off removed"
        ),
        Err(e) => tracing::warn!(
            copy = %name.to_string_lossy(),
            error = %e,
            "a clone's copy left by a clone cut off not wholly removed"
        ),
    }
    state.reservations.removed(key);
}

/// Removes the expired staging files of the vfolder at `at` (in the quota scope
/// `key`), given its staging area as opened; returns how many. The staging area
/// is writable by the vfolder's user, who can put a million names there at no
/// cost in quota: it is read as a stream, never held or sorted, and only a
/// session's name (32 hex digits, see `quota::session_name`) is looked at
/// further; any other name is passed over without a `stat`, and never removed.
/// A pass holds one directory buffer, however many entries there are. `logged`
/// counts the removals of the pass logged one by one, at most
/// [`LOGGED_REMOVALS`]; the rest are in the staging area's summary line.
fn remove_expired_in(
    state: &State,
    staging: std::io::Result<std::os::fd::OwnedFd>,
    key: &std::path::Path,
    at: &std::path::Path,
    logged: &mut usize,
) -> usize {
    use rustix::fs::{AtFlags, FileType};
    use std::os::fd::AsFd as _;
    use std::os::unix::ffi::OsStrExt as _;
    let staging = match staging {
        Ok(fd) => fd,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return 0,
        Err(err) if fsx::is_not_dir(&err) => {
            tracing::warn!(error = %err, "staging area is not a directory: skipped");
            return 0;
        }
        Err(err) => {
            tracing::warn!(error = %err, "staging area could not be opened: skipped");
            return 0;
        }
    };
    let Ok(names) = rustix::fs::Dir::read_from(staging.as_fd()) else {
        return 0;
    };
    let (mut removed, mut bytes) = (0, 0u64);
    for e in names {
        // A directory that cannot be read on is left for the next pass.
        let Ok(e) = e else { break };
        let name = std::ffi::OsStr::from_bytes(e.file_name().to_bytes());
        let Some(session) = name.to_str().filter(|_| quota::session_name(name)) else {
            continue;
        };
        let Ok(stat) = rustix::fs::statat(staging.as_fd(), session, AtFlags::SYMLINK_NOFOLLOW)
        else {
            continue;
        };
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            continue;
        }
        let mtime = std::time::UNIX_EPOCH
            + Duration::new(stat.st_mtime.max(0) as u64, stat.st_mtime_nsec as u32);
        let old = mtime.elapsed().is_ok_and(|age| age > state.upload_expire);
        // A session whose PATCH runs keeps its file and its reservation (as an idle
        // reservation does, below): the file may be the one the PATCH writes to (it
        // has waited for a quota walk), or a file of that name a user put in another
        // vfolder's staging area.
        if old
            && !quota::patching(state, session)
            && rustix::fs::unlinkat(staging.as_fd(), session, AtFlags::empty()).is_ok()
        {
            // Only a reservation of a session of this vfolder: a user can name a
            // file in any staging area they write to after any session (the ID is
            // in its token).
            quota::release_staged(state, at, session);
            if *logged < LOGGED_REMOVALS {
                *logged += 1;
                tracing::info!(session = %session, "expired upload removed");
            }
            removed += 1;
            bytes = bytes.saturating_add(u64::try_from(stat.st_size).unwrap_or(0));
        }
    }
    if removed > 0 {
        // Counted as committed (and in the folder's usage) unless a reservation
        // held them: the scope is measured again and the folder's figure walked
        // again, once for all (each only marks them so; a measurement or a figure
        // taken during the pass may count a file removed since, the safe side).
        state.reservations.removed(key);
        state.folders.changed(at);
        Metrics::add(&state.metrics.expired_uploads_removed, removed as u64);
        tracing::info!(
            folder = %at.display(),
            removed,
            bytes,
            "expired uploads removed from a staging area"
        );
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `EAGAIN` (a resolution through `..` that met a rename or mount on each of
    /// its tries) passes on its own: 503 `busy` with a `Retry-After`, where it was
    /// a 400 that told the caller its request was wrong; `EBUSY` does not.
    #[test]
    fn a_transient_filesystem_error_is_busy_not_the_callers_fault() {
        let again = || std::io::Error::from_raw_os_error(rustix::io::Errno::AGAIN.raw_os_error());
        let e = ApiError::from(again());
        assert_eq!(
            e.status_and_kind(),
            (StatusCode::SERVICE_UNAVAILABLE, "busy")
        );
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(resp.headers().contains_key("retry-after"));
        // An upload complete despite such a cut: its status, and the note to retry.
        let resp = ApiError::CompletedDespite {
            cut: Box::new(ApiError::from(again())),
            size: 1,
        }
        .into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(resp.headers().contains_key("retry-after"));
        // A mount point or a file in use stays so: not busy.
        for errno in [rustix::io::Errno::NOTDIR, rustix::io::Errno::BUSY] {
            let e = ApiError::from(std::io::Error::from_raw_os_error(errno.raw_os_error()));
            assert_eq!(
                e.status_and_kind(),
                (StatusCode::BAD_REQUEST, "filesystem-error")
            );
        }
        assert_eq!(
            strerror(&std::io::Error::from_raw_os_error(20)),
            "Not a directory"
        );
        // A note given to an OS error keeps its number and words underneath.
        let noted = client::discarded_note(std::io::Error::from_raw_os_error(21));
        assert_eq!(
            (os_error(&noted), strerror(&noted).as_str()),
            (Some(21), "Is a directory")
        );
        assert!(noted.to_string().contains("discarded"), "{noted}");
        let own = std::io::Error::other("too costly to resolve");
        assert_eq!(
            (os_error(&own), strerror(&own).as_str()),
            (None, "too costly to resolve")
        );
    }
}
