//! The client-facing API: `GET /download?token=…` (streamed, single `Range`) and tus
//! 1.0 resumable uploads at `/upload` (`OPTIONS`, `HEAD`, `PATCH`). Authority comes
//! from the session token alone. Bodies stream with constant memory; an upload is
//! written to a staging file and renamed into place when complete, so a partial upload
//! is never visible at its destination.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State as Extract};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt as _;
use serde_json::json;
use tokio::io::{AsyncSeekExt as _, AsyncWriteExt as _};

use super::volume::resolve;
use super::{ApiError, State};

/// The client-facing router.
pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { axum::Json(json!({"status": "ok", "type": "client-facing", "storage-proxy": env!("CARGO_PKG_VERSION")})) }),
        )
        .route("/download", get(download))
        .route("/upload", axum::routing::options(tus_options).head(tus_head).patch(tus_patch))
        .with_state(state)
}

/// Verified claims of a session token for `op`.
fn claims(
    state: &State,
    q: &HashMap<String, String>,
    op: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    let token = q.get("token").ok_or(ApiError::Session)?;
    let claims = appproxy_shared::jwt::verify_hs256(token.as_bytes(), &state.session_secret)
        .map_err(|_| ApiError::Session)?;
    if claims.get("op").and_then(|v| v.as_str()) != Some(op) {
        return Err(ApiError::Session);
    }
    Ok(claims)
}

fn claim<'a>(
    c: &'a serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<&'a str, ApiError> {
    c.get(key).and_then(|v| v.as_str()).ok_or(ApiError::Session)
}

/// Parses a single `bytes=` range against a length: `Ok(None)` for no (or an unusable
/// multi-) range, `Err(())` when unsatisfiable.
fn parse_range(value: &str, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        (len.saturating_sub(n), len.checked_sub(1).ok_or(())?)
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            len.saturating_sub(1)
        } else {
            b.parse::<u64>().map_err(|_| ())?.min(len.saturating_sub(1))
        };
        (start, end)
    };
    if range.0 >= len || range.0 > range.1 {
        return Err(());
    }
    Ok(Some(range))
}

/// `Content-Disposition` with an ASCII fallback and the UTF-8 name percent-encoded.
fn disposition(name: &str) -> String {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut pct = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            pct.push(b as char);
        } else {
            pct.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment;filename=\"{ascii}\"; filename*=UTF-8''{pct}")
}

async fn download(
    Extract(state): Extract<Arc<State>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let c = claims(&state, &q, "download")?;
    let root = state
        .volumes
        .existing_folder(claim(&c, "volume")?, claim(&c, "vfid")?)?;
    let path = resolve(&root, claim(&c, "relpath")?)?;
    let meta = tokio::fs::metadata(&path)
        .await
        .map_err(|_| ApiError::NotFound)?;
    if meta.is_dir() {
        let archive = q.get("archive").is_some_and(|v| v == "true")
            || c.get("archive").and_then(|v| v.as_bool()) == Some(true);
        if !archive {
            return Err(ApiError::Params(
                "a directory: add archive=true for a zip".into(),
            ));
        }
        let name = format!(
            "{}.zip",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "archive".into())
        );
        tracing::info!(dir = %path.display(), "archive download");
        let mut resp = Response::new(Body::from_stream(super::zip::stream_dir(path)));
        resp.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/zip"));
        if let Ok(v) = HeaderValue::from_str(&disposition(&name)) {
            resp.headers_mut().insert("content-disposition", v);
        }
        return Ok(resp);
    }
    let len = meta.len();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let range = match headers.get("range").and_then(|v| v.to_str().ok()) {
        Some(v) => match parse_range(v, len) {
            Ok(r) => r,
            Err(()) => {
                let mut resp = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    resp.headers_mut().insert("content-range", v);
                }
                return Ok(resp);
            }
        },
        None => None,
    };
    let mut file = tokio::fs::File::open(&path).await?;
    let (status, start, count) = match range {
        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        None => (StatusCode::OK, 0, len),
    };
    file.seek(SeekFrom::Start(start)).await?;
    let stream = tokio_util::io::ReaderStream::with_capacity(
        tokio::io::AsyncReadExt::take(file, count),
        64 * 1024,
    );
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert("accept-ranges", HeaderValue::from_static("bytes"));
    h.insert("content-length", HeaderValue::from(count));
    if let Ok(v) = HeaderValue::from_str(&disposition(&name)) {
        h.insert("content-disposition", v);
    }
    if let Some((a, b)) = range {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{b}/{len}")) {
            h.insert("content-range", v);
        }
    }
    if q.get("no_cache").is_some_and(|v| v == "true") {
        h.insert("cache-control", HeaderValue::from_static("no-store"));
    }
    tracing::info!(bytes = count, partial = range.is_some(), "download");
    Ok(resp)
}

fn tus_headers(h: &mut HeaderMap) {
    h.insert("tus-resumable", HeaderValue::from_static("1.0.0"));
    h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    h.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("*"),
    );
    let names = HeaderValue::from_static(
        "Tus-Resumable, Upload-Length, Upload-Metadata, Upload-Offset, Content-Type",
    );
    h.insert("access-control-allow-headers", names.clone());
    h.insert("access-control-expose-headers", names);
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
}

async fn tus_options(Extract(state): Extract<Arc<State>>) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    tus_headers(resp.headers_mut());
    resp.headers_mut()
        .insert("tus-version", HeaderValue::from_static("1.0.0"));
    resp.headers_mut()
        .insert("tus-max-size", HeaderValue::from(state.max_upload_size));
    resp
}

/// The staging file, destination and size of an upload session.
struct Session {
    id: String,
    staging: std::path::PathBuf,
    destination: std::path::PathBuf,
    size: u64,
}

fn session(state: &State, q: &HashMap<String, String>) -> Result<Session, ApiError> {
    let c = claims(state, q, "upload")?;
    let root = state
        .volumes
        .existing_folder(claim(&c, "volume")?, claim(&c, "vfid")?)?;
    let id = claim(&c, "session")?.to_owned();
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::Session);
    }
    let relpath = claim(&c, "relpath")?;
    let relpath = match q.get("dst_dir") {
        Some(d) => format!("{d}/{relpath}"),
        None => relpath.to_owned(),
    };
    Ok(Session {
        staging: root.join(".upload").join(&id),
        destination: resolve(&root, &relpath)?,
        size: c
            .get("size")
            .and_then(|v| v.as_u64())
            .ok_or(ApiError::Session)?,
        id,
    })
}

async fn tus_head(
    Extract(state): Extract<Arc<State>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let s = session(&state, &q)?;
    let offset = tokio::fs::metadata(&s.staging)
        .await
        .map_err(|_| ApiError::NotFound)?
        .len();
    let mut resp = StatusCode::OK.into_response();
    let h = resp.headers_mut();
    tus_headers(h);
    h.insert("upload-offset", HeaderValue::from(offset));
    h.insert("upload-length", HeaderValue::from(s.size));
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// Removes a session from the in-progress set when the PATCH ends, however it ends.
struct Lease<'a> {
    state: &'a State,
    id: String,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.state.uploading.lock() {
            set.remove(&self.id);
        }
    }
}

async fn tus_patch(
    Extract(state): Extract<Arc<State>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let s = session(&state, &q)?;
    let offset: u64 = headers
        .get("upload-offset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| ApiError::Params("Upload-Offset is required".into()))?;
    let _lease = {
        let mut set = state
            .uploading
            .lock()
            .map_err(|_| ApiError::Conflict("upload state unavailable"))?;
        if !set.insert(s.id.clone()) {
            return Err(ApiError::Conflict(
                "another PATCH to this upload is in progress",
            ));
        }
        Lease {
            state: &state,
            id: s.id.clone(),
        }
    };
    let current = tokio::fs::metadata(&s.staging)
        .await
        .map_err(|_| ApiError::NotFound)?
        .len();
    if current != offset {
        return Err(ApiError::Conflict(
            "Upload-Offset does not match the server's offset",
        ));
    }
    let mut file = tokio::fs::OpenOptions::new()
        .append(true)
        .open(&s.staging)
        .await?;
    let mut written = offset;
    let mut stream = body.into_data_stream();
    // An interrupted body keeps what arrived: the client resumes from HEAD's offset.
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else { break };
        if written + chunk.len() as u64 > s.size {
            file.flush().await?;
            return Err(ApiError::TooLarge);
        }
        file.write_all(&chunk).await?;
        written += chunk.len() as u64;
    }
    file.flush().await?;
    drop(file);
    if written == s.size {
        if let Some(parent) = s.destination.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::rename(&s.staging, &s.destination).await?;
        tracing::info!(session = %s.id, bytes = written, "upload complete");
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    tus_headers(resp.headers_mut());
    resp.headers_mut()
        .insert("upload-offset", HeaderValue::from(written));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=50-500", 100), Ok(Some((50, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Err(()));
        assert_eq!(parse_range("bytes=5-2", 100), Err(()));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(parse_range("items=0-1", 100), Ok(None));
        assert_eq!(parse_range("bytes=x-1", 100), Err(()));
    }

    #[test]
    fn dispositions() {
        assert_eq!(
            disposition("a b.txt"),
            "attachment;filename=\"a_b.txt\"; filename*=UTF-8''a%20b.txt"
        );
        assert_eq!(
            disposition("é.bin"),
            "attachment;filename=\"_.bin\"; filename*=UTF-8''%C3%A9.bin"
        );
    }
}
