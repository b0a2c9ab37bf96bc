//! The client-facing API: `GET /download?token=…` (streamed, single `Range`) and tus
//! 1.0 resumable uploads at `/upload` (`OPTIONS`, `HEAD`, `PATCH`). Authority comes
//! from the session token alone. Bodies stream with constant memory; an upload is
//! written to a staging file and renamed into place when complete, so a partial upload
//! is never visible at its destination.
//!
//! A download opens its path once, by the kernel's resolution beneath the vfolder,
//! and serves that descriptor, with a strong `ETag` (inode, size, mtime),
//! `Last-Modified` (left out for a time an HTTP date cannot carry, whose date
//! preconditions are then ignored) and the RFC 9110 preconditions (`If-Match`,
//! `If-Unmodified-Since`, `If-None-Match`, `If-Modified-Since`, `If-Range`, whose
//! date form never matches: a date cannot tell apart two versions written within one
//! second). An
//! upload writes only through descriptors of `.upload` (never a symlink), checks the
//! quota reservation on every PATCH, and syncs the file and directories around the
//! completing `renameat`.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::Arc;

use appproxy_shared::rate_floor::RateFloor;

use axum::body::Body;
use axum::extract::{ConnectInfo, State as Extract};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt as _;
use serde_json::json;
use tokio::io::{AsyncSeekExt as _, AsyncWriteExt as _};

use rustix::fs::{AtFlags, FileType, OFlags};

use super::wirename::WirePath;
use super::{blocking, fsx, quota, ApiError, ApiQuery, State};

/// The longest request head the client API reads: the longest request target it
/// serves ([`MAX_TARGET`]: download tokens travel in the query, and an archive
/// token lists its paths) and [`HEAD_ROOM`] for the rest. A head still incomplete
/// once this many bytes are buffered is answered 431 and the connection closed, so
/// a caller without a token makes the proxy hold little more than this per
/// connection for the head timeout (hyper's default, ~408 KiB, let 4096
/// connections hold 1.7 GiB, though no head past this could be served: a longer
/// target is answered 414). One read may bring hyper a complete head somewhat past
/// it: [`bounded_head`] refuses that one too, so the limit holds to the byte.
pub const MAX_HEAD: usize = MAX_TARGET + HEAD_ROOM;

/// What a client API head has beside its request target: the method, the version
/// and every header field with their line ends (`Host`, `User-Agent`, `Accept…`,
/// `Range` and the preconditions, tus's fields, a browser's cookies) — some 1 KiB
/// from browsers and `curl`; 8 KiB, the line nginx takes by default.
pub const HEAD_ROOM: usize = 8 << 10;

/// The longest request target (path and query) the client API takes: hyper refuses
/// a longer one with 414, whatever room the head has (`http::Uri` holds at most
/// `u16::MAX - 1` bytes). Archive tokens whose URL would not fit are refused when
/// they are made (see [`ARCHIVE_TARGET`]).
pub const MAX_TARGET: usize = u16::MAX as usize - 1;

/// The request target of an archive download before its token.
pub const ARCHIVE_TARGET: &str = "/download-archive?token=";
/// The request target a download token is used in, before the token.
pub const DOWNLOAD_TARGET: &str = "/download?token=";
/// The request target a tus upload token is used in, before the token.
pub const UPLOAD_TARGET: &str = "/upload?token=";

/// The bytes of `req`'s head in its usual form: the request line, each header
/// field as `name: value` and its line end, and the blank line.
fn head_len(req: &axum::extract::Request) -> usize {
    let uri = req.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |pq| pq.as_str().len());
    let fields: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    // `GET <target> HTTP/1.1` and its line end; the blank line.
    req.method().as_str().len() + 1 + target + " HTTP/1.1\r\n".len() + fields + 2
}

/// The length of a head past [`MAX_HEAD`], as it came (measured before the
/// request-ID layer puts its own header fields in).
#[derive(Clone, Copy)]
struct OverlongHead(usize);

/// Measures the head as it came: the outermost layer of the client API. One past
/// [`MAX_HEAD`] (hyper took it whole in one read that passed its buffer limit) is
/// marked for [`bounded_head`] to refuse, so that the limit is the same however
/// the head's bytes arrived. The head is measured as hyper parsed it (see
/// [`head_len`]): whitespace around a value is not counted, and a field written
/// without the space after its colon counts one byte more than it came; what a
/// connection buffers stays bounded by hyper's read buffer either way.
pub async fn measure_head(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let len = head_len(&req);
    if len > MAX_HEAD {
        req.extensions_mut().insert(OverlongHead(len));
    }
    next.run(req).await
}

/// Refuses a head [`measure_head`] found too long: 431, the connection closed, as
/// hyper answers one it could not buffer (inside the request-ID layer, so that the
/// answer carries the request's ID as every other does).
pub async fn bounded_head(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if let Some(OverlongHead(len)) = req.extensions().get::<OverlongHead>().copied() {
        let mut resp = ApiError::Rejected {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            message: format!(
                "request head of {len} bytes, more than the {MAX_HEAD} the client API takes"
            ),
        }
        .into_response();
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            HeaderValue::from_static("close"),
        );
        return resp;
    }
    next.run(req).await
}

/// The client-facing router.
pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { axum::Json(json!({"status": "ok", "type": "client-facing", "storage-proxy": env!("CARGO_PKG_VERSION")})) }),
        )
        .route("/download", get(download))
        .route("/download-archive", get(download_archive))
        .route(
            "/upload",
            axum::routing::options(tus_options)
                .head(tus_head)
                .patch(tus_patch)
                .layer(axum::middleware::from_fn(tus_every_answer)),
        )
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

/// A path claim, in either form [`WirePath::to_claim`] gives it.
fn claim_path(
    c: &serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<WirePath, ApiError> {
    c.get(key)
        .and_then(WirePath::from_claim)
        .ok_or(ApiError::Session)
}

/// A range position: ASCII digits only (no sign), a value past `u64` taken as
/// `u64::MAX` (RFC 9110 §14.1.2: a last-byte-pos or a suffix-length past the end
/// means the end, however large; a first-byte-pos that large is past any end).
fn position(digits: &str) -> Result<u64, ()> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(());
    }
    Ok(digits.parse().unwrap_or(u64::MAX))
}

/// Parses a single `bytes=` range (the unit case-insensitive) against a length:
/// `Ok(None)` for no (or an unusable multi-) range, `Err(())` when unsatisfiable.
fn parse_range(value: &str, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let value = value.trim();
    let spec = match value.split_at_checked(6) {
        Some((unit, spec)) if unit.eq_ignore_ascii_case("bytes=") => spec,
        _ => return Ok(None),
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n = position(b)?;
        if n == 0 {
            return Err(());
        }
        (len.saturating_sub(n), len.checked_sub(1).ok_or(())?)
    } else {
        let start = position(a)?;
        let end = if b.is_empty() {
            len.saturating_sub(1)
        } else {
            position(b)?.min(len.saturating_sub(1))
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

/// The strong validator of a file: inode, size and modification time.
fn etag(st: &rustix::fs::Stat) -> String {
    format!(
        "\"{:x}-{:x}-{:x}.{:x}\"",
        st.st_ino, st.st_size, st.st_mtime, st.st_mtime_nsec
    )
}

/// What the conditional headers of a GET ask for (RFC 9110 §13.2.2).
#[derive(Debug, PartialEq, Eq)]
enum Conditional {
    /// Serve; `range` says whether a `Range` header may be honoured.
    Serve { range: bool },
    /// 304 Not Modified.
    NotModified,
    /// 412 Precondition Failed.
    Failed,
}

fn tags(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|t| !t.is_empty())
}

fn weak_eq(a: &str, b: &str) -> bool {
    a.trim_start_matches("W/") == b.trim_start_matches("W/")
}

fn strong_eq(a: &str, b: &str) -> bool {
    !a.starts_with("W/") && !b.starts_with("W/") && a == b
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Refuses a field that may be given once (`Range`, `Upload-Offset`, tus's own)
/// when the request has it twice: 400 naming it. Before, the first copy was taken,
/// and a front proxy, cache or log that reads the other saw another request than
/// the one served (and two `Upload-Offset`s answered 204 or 409 by their order).
pub(crate) fn once(h: &HeaderMap, name: &str) -> Result<(), ApiError> {
    if h.get_all(name).iter().nth(1).is_some() {
        return Err(ApiError::Rejected {
            status: StatusCode::BAD_REQUEST,
            message: format!("the {name} field is given more than once; it may be given once"),
        });
    }
    Ok(())
}

/// The one media type a tus PATCH body may have (tus 1.0).
const TUS_BODY: &str = "application/offset+octet-stream";

/// tus 1.0's version precondition, of every request but `OPTIONS`: a
/// `Tus-Resumable` of another version is 412 (with `Tus-Version`), one given twice
/// 400; none at all is served (the original checks none). Before, only a PATCH
/// was checked, and a HEAD of version 0.2.2 was answered 200 (an outside tester's
/// find).
fn tus_version_refusal(h: &HeaderMap) -> Option<Response> {
    if let Err(e) = once(h, "Tus-Resumable") {
        return Some(e.into_response());
    }
    if let Some(v) = h.get("tus-resumable") {
        if v.as_bytes().trim_ascii() != b"1.0.0" {
            let mut resp = ApiError::Rejected {
                status: StatusCode::PRECONDITION_FAILED,
                message: "Tus-Resumable names a protocol version this server does not speak: only 1.0.0 (Tus-Version)".into(),
            }
            .into_response();
            resp.headers_mut()
                .insert("tus-version", HeaderValue::from_static("1.0.0"));
            return Some(resp);
        }
    }
    None
}

/// Every answer at `/upload` carries tus's headers (`Tus-Resumable`, and the
/// CORS fields a browser's tus client needs to read it), its errors too (tus
/// 1.0 asks for `Tus-Resumable` on every response; a browser hides from its
/// script the status of an answer without `Access-Control-Allow-Origin`).
/// Before, a 404, 409, 415 or 401 carried none (an outside tester's find).
async fn tus_every_answer(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut resp = next.run(req).await;
    if !resp.headers().contains_key("tus-resumable") {
        tus_headers(resp.headers_mut());
    }
    resp
}

/// tus 1.0's preconditions of a PATCH, as far as the original's clients allow: a
/// `Tus-Resumable` of another version is 412 (with `Tus-Version`), a
/// `Content-Type` other than [`TUS_BODY`] is 415. The original checks neither, and
/// a client that sends no such field (a raw `curl -T`) is still served: only a
/// field that says something else is refused. Every tus client sends both.
/// The answer to a PATCH that fails them, `None` when it passes.
fn tus_refusal(h: &HeaderMap) -> Option<Response> {
    if let Some(refused) = tus_version_refusal(h) {
        return Some(refused);
    }
    if let Err(e) = once(h, "Content-Type") {
        return Some(e.into_response());
    }
    if let Some(v) = h.get(axum::http::header::CONTENT_TYPE) {
        let essence = v
            .to_str()
            .ok()
            .and_then(|v| v.split(';').next())
            .map(str::trim);
        if !essence.is_some_and(|e| e.eq_ignore_ascii_case(TUS_BODY)) {
            return Some(
                ApiError::Rejected {
                    status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    message: format!(
                        "a tus PATCH body is {TUS_BODY}; the request's Content-Type says otherwise"
                    ),
                }
                .into_response(),
            );
        }
    }
    None
}

fn date(v: &str) -> Option<i64> {
    let t = httpdate::parse_http_date(v.trim()).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64)
}

/// The first second HTTP dates cannot carry: 10000-01-01T00:00:00Z (`httpdate`
/// formats years up to 9999 and panics past them).
const HTTP_DATE_END: i64 = 253_402_300_800;

/// A file's modification time (seconds since the epoch) as an HTTP date can carry
/// it: `None` before 1970 or past year 9999, which a user sets on their files
/// (`touch -d @400000000000` on tmpfs, btrfs, XFS with big timestamps). Such a file
/// has no `Last-Modified`, and the date preconditions are ignored for it (RFC 9110
/// §13.1.3, §13.1.4: it has no modification date to compare with).
fn last_modified(mtime: i64) -> Option<i64> {
    (0..HTTP_DATE_END).contains(&mtime).then_some(mtime)
}

/// Evaluates the preconditions in RFC 9110's order against the current validators
/// (`mtime`: the last modification time, when it has one an HTTP date carries).
fn evaluate(h: &HeaderMap, tag: &str, mtime: Option<i64>) -> Conditional {
    if let Some(v) = header(h, "if-match") {
        if !(v.trim() == "*" || tags(v).any(|t| strong_eq(t, tag))) {
            return Conditional::Failed;
        }
    } else if let (Some(d), Some(m)) = (header(h, "if-unmodified-since").and_then(date), mtime) {
        if m > d {
            return Conditional::Failed;
        }
    }
    if let Some(v) = header(h, "if-none-match") {
        if v.trim() == "*" || tags(v).any(|t| weak_eq(t, tag)) {
            return Conditional::NotModified;
        }
    } else if let (Some(d), Some(m)) = (header(h, "if-modified-since").and_then(date), mtime) {
        if m <= d {
            return Conditional::NotModified;
        }
    }
    let range = match header(h, "if-range").map(str::trim) {
        None => true,
        Some(v) if v.starts_with('"') || v.starts_with("W/") => strong_eq(v, tag),
        // A date never matches: it has one-second resolution, and a file rewritten
        // within the second of the first response has the same one, so a range of
        // it would splice two versions (RFC 9110 §13.1.5 lets a date be strong only
        // when that cannot happen). The whole file is sent; the ETag form resumes.
        Some(_) => false,
    };
    Conditional::Serve { range }
}

/// `ETag`, and `Last-Modified` when the file has a modification time an HTTP date
/// carries (see [`last_modified`]; never formatted otherwise).
fn validators(h: &mut HeaderMap, tag: &str, mtime: Option<i64>) {
    if let Ok(v) = HeaderValue::from_str(tag) {
        h.insert("etag", v);
    }
    let Some(secs) = mtime.and_then(last_modified) else {
        return;
    };
    let modified = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.unsigned_abs());
    if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(modified)) {
        h.insert("last-modified", v);
    }
}

async fn download(
    Extract(state): Extract<Arc<State>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    ApiQuery(q): ApiQuery<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    once(&headers, "Range")?;
    let c = claims(&state, &q, "download")?;
    let (volume, vfid) = (
        claim(&c, "volume")?.to_owned(),
        claim(&c, "vfid")?.to_owned(),
    );
    let parts = fsx::components(claim_path(&c, "relpath")?)?;
    let name = parts
        .last()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "archive".into());
    // One resolution by the kernel; everything after works on this descriptor.
    let st = state.clone();
    let (fd, st, at_root) = blocking(move || {
        let root = st.volumes.open_folder(&volume, &vfid)?;
        let fd = super::open_for_reading(root.as_fd(), &parts)?;
        let (st, r) = (rustix::fs::fstat(&fd)?, rustix::fs::fstat(&root)?);
        let at_root = (st.st_dev, st.st_ino) == (r.st_dev, r.st_ino);
        Ok((fd, st, at_root))
    })
    .await?;
    super::Metrics::add(&state.metrics.downloads, 1);
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => {
            let archive = q.get("archive").is_some_and(|v| v == "true")
                || c.get("archive").and_then(|v| v.as_bool()) == Some(true);
            if !archive {
                return Err(ApiError::Params(
                    "a directory: add archive=true for a zip".into(),
                ));
            }
            let permit = archive_slot(&state, peer.ip()).await?;
            tracing::info!(dir = %name, "archive download");
            let archive =
                super::zip::first_bytes(super::zip::stream_dir(fd, at_root, state.stall, permit))
                    .await
                    .map_err(ApiError::archive)?;
            let mut resp = Response::new(Body::from_stream(Metered::new(&state, archive)));
            resp.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/zip"));
            if let Ok(v) = HeaderValue::from_str(&disposition(&format!("{name}.zip"))) {
                resp.headers_mut().insert("content-disposition", v);
            }
            return Ok(resp);
        }
        FileType::RegularFile => {}
        _ => return Err(ApiError::NotFound),
    }
    let len = st.st_size as u64;
    let tag = etag(&st);
    #[allow(clippy::unnecessary_cast)] // The field's type differs between targets.
    let modified = last_modified(st.st_mtime as i64);
    let range_ok = match evaluate(&headers, &tag, modified) {
        Conditional::Serve { range } => range,
        Conditional::NotModified => {
            let mut resp = StatusCode::NOT_MODIFIED.into_response();
            validators(resp.headers_mut(), &tag, modified);
            return Ok(resp);
        }
        Conditional::Failed => {
            let mut resp = ApiError::Rejected {
                status: StatusCode::PRECONDITION_FAILED,
                message: "a precondition (If-Match or If-Unmodified-Since) failed".into(),
            }
            .into_response();
            validators(resp.headers_mut(), &tag, modified);
            return Ok(resp);
        }
    };
    let range = match header(&headers, "range").filter(|_| range_ok) {
        Some(v) => match parse_range(v, len) {
            Ok(r) => r,
            Err(()) => {
                let mut resp = ApiError::Rejected {
                    status: StatusCode::RANGE_NOT_SATISFIABLE,
                    message: format!("range not satisfiable for {len} bytes"),
                }
                .into_response();
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    resp.headers_mut().insert("content-range", v);
                }
                return Ok(resp);
            }
        },
        None => None,
    };
    let mut file = tokio::fs::File::from_std(std::fs::File::from(fd));
    let (status, start, count) = match range {
        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        None => (StatusCode::OK, 0, len),
    };
    file.seek(SeekFrom::Start(start)).await?;
    let stream = tokio_util::io::ReaderStream::with_capacity(
        tokio::io::AsyncReadExt::take(file, count),
        64 * 1024,
    );
    let mut resp = Response::new(Body::from_stream(Metered::new(&state, stream)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert("accept-ranges", HeaderValue::from_static("bytes"));
    h.insert("content-length", HeaderValue::from(count));
    validators(h, &tag, modified);
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

/// A slot to stream an archive, held by its writer (a blocking thread) to its end:
/// past `[storage] max_archive_streams` archives at once the answer is 503 at once,
/// unless a stream whose client keeps it waiting is cut to make room
/// ([`super::archive_slots`]).
/// A client that takes an archive slowly holds its writer's thread while it waits
/// (up to `stall_timeout_secs` per chunk, for as long as it keeps taking some), and
/// the blocking pool serves every file operation of both APIs: without the cap, a
/// few hundred such downloads held every thread, and every upload, download and
/// manager call waited behind them. Once half the slots are taken, an address that
/// holds its share (`max_archive_streams_per_address`) gets 503 too: one client
/// could otherwise take every slot and refuse archives to everyone else.
async fn archive_slot(
    state: &State,
    peer: std::net::IpAddr,
) -> Result<super::archive_slots::ArchivePermit, ApiError> {
    use appproxy_shared::fair_share::Refused;
    let slots = &state.archives;
    slots.take(peer).await.map_err(|why| {
        ApiError::Busy(match why {
            Refused::Full => format!(
                "{} archive downloads are streaming, the most allowed at once ([storage] max_archive_streams): retry later",
                slots.max()
            ),
            Refused::AddressShare => format!(
                "this address streams {} archive downloads, its share while more than half of the {} allowed are taken ([storage] max_archive_streams_per_address): retry later",
                slots.per_address(),
                slots.max()
            ),
        })
    })
}

/// `GET /download-archive?token=…`: a zip of the files and directories the token
/// lists (from `/folder/file/archive-download-token`), each resolved beneath the
/// vfolder by the kernel.
async fn download_archive(
    Extract(state): Extract<Arc<State>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    ApiQuery(q): ApiQuery<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let token = q.get("token").ok_or(ApiError::Session)?;
    let c = appproxy_shared::jwt::verify_hs256(token.as_bytes(), &state.session_secret)
        .map_err(|_| ApiError::Session)?;
    if c.get("operation").and_then(|v| v.as_str()) != Some("download") {
        return Err(ApiError::Session);
    }
    let root = state
        .volumes
        .open_folder(claim(&c, "volume")?, claim(&c, "virtual_folder_id")?)?;
    let files: Vec<Vec<std::ffi::OsString>> = c
        .get("files")
        .and_then(|v| v.as_array())
        .ok_or(ApiError::Session)?
        .iter()
        .map(|f| {
            WirePath::from_claim(f)
                .ok_or(ApiError::Session)
                .and_then(|f| Ok(fsx::components(f)?))
        })
        .collect::<Result<_, _>>()?;
    // Refused as at issue: a token of another issuer sharing the secret (the
    // platform's own storage-proxy) listing the vfolder itself had every entry named
    // from the root (`/a.txt`), which the zip format forbids and a naive extractor
    // writes at the filesystem's root (an outside tester's find).
    if files.iter().any(Vec::is_empty) {
        return Err(ApiError::Params("files: the vfolder itself".into()));
    }
    let permit = archive_slot(&state, peer.ip()).await?;
    // Its last component only: a name holding `/` or `..` (a token another
    // issuer made) is never offered to a client that may keep the path (RFC 6266
    // §4.3 asks the sender not to).
    let filename = c
        .get("filename")
        .and_then(|v| v.as_str())
        .and_then(|n| n.rsplit(['/', '\\']).next())
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .map_or_else(|| "archive.zip".to_owned(), str::to_owned);
    // Every listed path must be a file or a directory now (404 before anything is
    // streamed), and none in the staging area (400, a token made before this rule
    // included); each is opened and checked again when its turn comes, so a long
    // list never holds a descriptor per entry. The check holds the archive's slot
    // until it ends, however the request ends, and stops at its next path once the
    // client is gone: before, a client that hung up gave its slot back at once while
    // its check ran on, so checks made costly by a user's links (seconds each) ran
    // as many at once as clients asked, past `max_archive_streams`.
    let (abandoned, _abandon) = super::Abandoned::new();
    let (items, permit) = blocking(move || {
        let root = Arc::new(root);
        let mut check = super::manager::StagingCheck::new(root.as_fd())?;
        let mut items = Vec::new();
        for parts in files {
            abandoned.check()?;
            drop(super::open_for_reading_checked(
                root.as_fd(),
                &parts,
                &mut check,
            )?);
            items.push(super::zip::Item::Beneath(root.clone(), parts));
        }
        Ok((items, permit))
    })
    .await?;
    super::Metrics::add(&state.metrics.downloads, 1);
    let archive =
        super::zip::first_bytes(super::zip::stream_items(items, false, state.stall, permit))
            .await
            .map_err(ApiError::archive)?;
    let mut resp = Response::new(Body::from_stream(Metered::new(&state, archive)));
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/zip"));
    if let Ok(v) = HeaderValue::from_str(&disposition(&filename)) {
        resp.headers_mut().insert("content-disposition", v);
    }
    Ok(resp)
}

/// A download body that counts what it sends: bytes as they go, and, when the body
/// ends or is dropped (client gone), its size and duration into the histograms.
struct Metered<S> {
    inner: std::pin::Pin<Box<S>>,
    state: Arc<State>,
    started: std::time::Instant,
    sent: u64,
}

impl<S> Metered<S> {
    fn new(state: &Arc<State>, inner: S) -> Self {
        state
            .metrics
            .observed
            .downloads_active
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            inner: Box::pin(inner),
            state: state.clone(),
            started: std::time::Instant::now(),
            sent: 0,
        }
    }
}

impl<S, B, E> futures_util::Stream for Metered<S>
where
    S: futures_util::Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
{
    type Item = Result<B, E>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let polled = self.inner.as_mut().poll_next(cx);
        if let std::task::Poll::Ready(Some(Ok(chunk))) = &polled {
            let n = chunk.as_ref().len() as u64;
            self.sent += n;
            super::Metrics::add(&self.state.metrics.observed.download_bytes, n);
        }
        polled
    }
}

impl<S> Drop for Metered<S> {
    fn drop(&mut self) {
        let o = &self.state.metrics.observed;
        o.downloads_active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        o.download_size.observe_raw(self.sent);
        o.download_duration.observe(self.started.elapsed());
    }
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

/// An upload session: the vfolder and its staging directory (both descriptors),
/// the destination's components, the size, and the quota scope.
struct Session {
    id: String,
    root: OwnedFd,
    staging: OwnedFd,
    destination: Vec<std::ffi::OsString>,
    size: u64,
    volume: String,
    /// `None` for an old-style vfolder: no quota scope (see `quota::reserve`).
    scope_name: Option<String>,
    scope_key: std::path::PathBuf,
    /// The vfolder's path (the key of its usage figure).
    folder_key: std::path::PathBuf,
    /// When the session's token expires (no PATCH after it).
    until: std::time::Instant,
}

fn session(state: &State, q: &HashMap<String, String>) -> Result<Session, ApiError> {
    let c = claims(state, q, "upload")?;
    let (volume, vfid) = (claim(&c, "volume")?, claim(&c, "vfid")?);
    let root = state.volumes.open_folder(volume, vfid)?;
    let id = claim(&c, "session")?.to_owned();
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::Session);
    }
    let relpath = claim_path(&c, "relpath")?;
    // An empty `dst_dir` is the vfolder's root, as the original's path join makes
    // it (joined as `/<relpath>` it would be absolute, refused as an escape).
    let relpath = match q.get("dst_dir").filter(|d| !d.is_empty()) {
        Some(d) => {
            let mut joined = std::ffi::OsString::from(d);
            joined.push("/");
            joined.push(relpath.as_os_str());
            joined
        }
        None => relpath.as_os_str().to_owned(),
    };
    let destination = fsx::to_make(fsx::components(&relpath)?)?;
    if destination.is_empty() {
        return Err(ApiError::Params("relpath names the vfolder itself".into()));
    }
    if destination[0] == super::manager::STAGING {
        return Err(super::manager::staging_refused());
    }
    // None (or not a directory: swapped meanwhile) is a 404, a `.upload` that is a
    // symlink an escape (400); one that cannot be opened (its mode taken away, a
    // failing volume) leaves the upload where it stands.
    let staging = super::manager::staging_dir(root.as_fd(), false).map_err(|e| {
        if fsx::is_escape(&e) {
            e.into()
        } else if fsx::is_gone(&e) {
            ApiError::NotFound
        } else {
            unreachable_staged(e)
        }
    })?;
    let size = c
        .get("size")
        .and_then(|v| v.as_u64())
        .ok_or(ApiError::Session)?;
    // Checked at use as at issue: a token of another issuer sharing the secret (or
    // one issued before `max_upload_size` was lowered) uploads no more than this
    // process takes. Before, such a token of 5,000 bytes (or 2^63) was written to
    // a proxy whose limit is 1,000 (an outside tester's find).
    if size > state.max_upload_size {
        return Err(ApiError::TooLarge);
    }
    Ok(Session {
        staging,
        root,
        destination,
        size,
        volume: volume.to_owned(),
        scope_name: super::volume::Vfid::parse(vfid)?.scope_name(),
        scope_key: state.volumes.scope_of(volume, vfid)?,
        folder_key: state.volumes.folder(volume, vfid)?,
        until: token_expiry(&c),
        id,
    })
}

/// When a verified token expires, as an instant (its `exp`, seconds since the
/// epoch; a token without one is good for as long as the proxy keeps anything).
fn token_expiry(c: &serde_json::Map<String, serde_json::Value>) -> std::time::Instant {
    let now = std::time::Instant::now();
    let left = c
        .get("exp")
        .and_then(|v| v.as_f64())
        .map_or(f64::MAX, |exp| exp - appproxy_shared::jwt::now_epoch());
    let far = std::time::Duration::from_secs(100 * 365 * 86_400);
    now + std::time::Duration::try_from_secs_f64(left.max(0.0)).map_or(far, |d| d.min(far))
}

/// The size of a session's staging file (a regular file, not followed): 404 when
/// there is none (or something else in its place), [`unreachable_staged`] when it
/// could not be looked at.
fn staged(s: &Session) -> Result<u64, ApiError> {
    match rustix::fs::statat(&s.staging, s.id.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => {
            Ok(st.st_size as u64)
        }
        Ok(_) | Err(rustix::io::Errno::NOENT) => Err(ApiError::NotFound),
        Err(e) => Err(unreachable_staged(e.into())),
    }
}

/// A staged file that could not be looked at or opened for a reason other than its
/// absence (a volume gone read-only or failing, descriptors spent, its mode changed
/// from a shell): 500 with the system's words, the upload kept, to be resumed from
/// HEAD's offset once it can be. Before, every such failure was a 404, which a tus
/// client takes for an upload that is gone for good: a volume read-only for a
/// while failed every upload in progress (an outside tester's find).
fn unreachable_staged(e: std::io::Error) -> ApiError {
    // Logged once, as every 5xx answer is ("request failed", with this text).
    ApiError::Rejected {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!(
            "the upload's staged file could not be reached ({e}): the upload is kept, nothing was written; try again, resuming from HEAD's offset"
        ),
    }
}

/// Whether opening a session's staged file failed because there is none of the
/// proxy's making: none at all, or something else in its place (a symlink, a
/// FIFO, a directory, a mount: [`fsx::reopen`] refuses all but a regular file).
fn no_staged_file(e: &std::io::Error) -> bool {
    fsx::is_gone(e) || fsx::is_escape(e)
}

/// The most tus sessions [`Completed`] remembers: some 100 bytes each, a few MiB
/// in all.
pub const MAX_COMPLETED: usize = 1 << 16;

/// The longest [`Completed`] remembers a session: the original's offset record
/// lived 24 h after its last change.
pub const COMPLETED_FOR: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// tus sessions completed lately: their size, until their token expires (at most
/// [`COMPLETED_FOR`]), the `max` latest at most (the oldest forgotten first). A
/// client whose last PATCH's answer was lost asks HEAD where its upload stands;
/// with the staged file renamed into place there was nothing to answer from (404,
/// and a tus client uploaded the file again). HEAD answers their offset as
/// complete, a PATCH at it 204 (see [`tus_head`], [`patch`]). Kept in memory: a
/// restart forgets them.
pub struct Completed {
    max: usize,
    sessions: std::sync::Mutex<CompletedSessions>,
}

#[derive(Default)]
struct CompletedSessions {
    /// Size and the instant the record lapses, by session ID (32 hex digits).
    by_id: HashMap<u128, (u64, std::time::Instant)>,
    /// The IDs in the order they completed, to forget the oldest first.
    order: std::collections::VecDeque<u128>,
}

impl Completed {
    /// An empty record of at most `max` sessions.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            sessions: std::sync::Mutex::default(),
        }
    }

    fn key(id: &str) -> Option<u128> {
        u128::from_str_radix(id, 16).ok()
    }

    /// Records session `id` completed with `size` bytes, its token valid `until`.
    pub fn record(&self, id: &str, size: u64, until: std::time::Instant) {
        let Some(key) = Self::key(id) else { return };
        let now = std::time::Instant::now();
        let until = until.min(now + COMPLETED_FOR);
        let mut c = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        // The oldest go while past the bound or lapsed (a later one may lapse
        // first: it waits its turn, the bound holding either way).
        while let Some(&old) = c.order.front() {
            let lapsed = c.by_id.get(&old).is_none_or(|&(_, u)| u <= now);
            if c.order.len() < self.max && !lapsed {
                break;
            }
            c.order.pop_front();
            c.by_id.remove(&old);
        }
        if self.max == 0 {
            return;
        }
        if c.by_id.insert(key, (size, until)).is_none() {
            c.order.push_back(key);
        }
    }

    /// The size session `id` completed with, while it is remembered.
    pub fn size_of(&self, id: &str) -> Option<u64> {
        let key = Self::key(id)?;
        let c = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        c.by_id
            .get(&key)
            .filter(|&&(_, until)| until > std::time::Instant::now())
            .map(|&(size, _)| size)
    }
}

/// `HEAD`: the upload's offset, the bytes staged. Every byte staged (`Upload-Offset`
/// would equal `Upload-Length`) while the file is not in place (its completion
/// failed, a full disk or an I/O error; the proxy stopped before it) completes it
/// first, as a PATCH at that offset does: a tus client takes that offset for a
/// finished upload and sends nothing more, and its upload was left staged, to be
/// cleaned up unseen. A session completed lately ([`Completed`]) answers its size.
async fn tus_head(
    Extract(state): Extract<Arc<State>>,
    ApiQuery(q): ApiQuery<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(refused) = tus_version_refusal(&headers) {
        return Ok(refused);
    }
    let st = state.clone();
    let query = q.clone();
    let (s, offset) = blocking(move || {
        let s = session(&st, &query)?;
        let offset = match staged(&s) {
            Ok(offset) => Some(offset),
            Err(ApiError::NotFound) => None,
            Err(e) => return Err(e),
        };
        Ok((s, offset))
    })
    .await?;
    // A PATCH in progress may be completing the upload (between its last write and
    // the rename, or between the rename and the record of it): where the answer
    // hangs on it, the client is told to ask again (423). The record is made before
    // the PATCH lets go, so once it has, the record says.
    const FINISHING: &str = "a PATCH to this upload is finishing; ask again";
    let leased = || {
        state
            .uploading
            .lock()
            .map_or(true, |set| set.contains(&s.id))
    };
    let offset = match offset {
        Some(offset) if offset == s.size => {
            if leased() {
                return Err(ApiError::Locked(FINISHING));
            }
            let mut headers = HeaderMap::new();
            headers.insert("upload-offset", HeaderValue::from(offset));
            match patch(&state, q, headers, Body::empty(), &mut None).await {
                Ok(_) => offset,
                // A PATCH that began meanwhile, here or in another process.
                Err(ApiError::Conflict(PATCH_RUNNING)) => {
                    return Err(ApiError::Locked(FINISHING));
                }
                Err(ApiError::Conflict(_)) if leased() => {
                    return Err(ApiError::Locked(FINISHING));
                }
                Err(e) => return Err(e),
            }
        }
        Some(offset) => offset,
        None if leased() => return Err(ApiError::Locked(FINISHING)),
        None => state.completed.size_of(&s.id).ok_or(ApiError::NotFound)?,
    };
    let mut resp = StatusCode::OK.into_response();
    let h = resp.headers_mut();
    tus_headers(h);
    h.insert("upload-offset", HeaderValue::from(offset));
    h.insert("upload-length", HeaderValue::from(s.size));
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// Why a PATCH (or the completion a HEAD makes) is refused while another runs.
const PATCH_RUNNING: &str = "another PATCH to this upload is in progress";

/// The directory of a quota scope's upload locks, in the scope's directory (beside
/// its `.quota`): outside every vfolder, so no vfolder user can open a lock file,
/// let alone hold one.
pub const UPLOAD_LOCKS: &str = ".appproxy-upload-locks";

/// The exclusive lock of one upload, held while a PATCH of it runs: one PATCH at a
/// time in every process sharing the volume, not only in this one
/// (`State::uploading`). Before, a tus client retrying through another process (a
/// second node behind one address) wrote beside a PATCH still running here: the
/// other put the file in place, and this one's bytes went on into it (3,000 bytes
/// for an upload of 2,000; an outside tester's find). A `flock` on the staged file
/// itself would let anyone who can read the vfolder (a read-only member of a
/// shared one) hold every upload into it: the lock is an empty file of the
/// proxy's own, `<scope>/.appproxy-upload-locks/<session>` (0600 in a 0700
/// directory; nothing is made at the volume's root, whose layout is the
/// platform's), removed as the PATCH ends. An old-style vfolder (no scope
/// directory) and a filesystem without `flock` keep the process's own exclusion
/// alone.
struct UploadLock(Option<Held>);

/// A lock file held: its directory, its descriptor, its name.
struct Held {
    dir: OwnedFd,
    file: OwnedFd,
    name: String,
}

impl UploadLock {
    /// Takes the lock of upload `session` of a vfolder of quota scope `scope` on
    /// `volume`; `None`: another holds it.
    fn take(
        state: &State,
        volume: &str,
        scope: Option<&str>,
        session: &str,
    ) -> Result<Option<Self>, ApiError> {
        use rustix::io::Errno;
        let Some(scope) = scope else {
            return Ok(Some(Self(None)));
        };
        let scope = state.volumes.open_scope(volume, scope)?;
        let name = std::ffi::OsStr::new(UPLOAD_LOCKS);
        let dir = match fsx::child_dir(scope.as_fd(), name) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mode = rustix::fs::Mode::from_raw_mode(0o700);
                match rustix::fs::mkdirat(&scope, UPLOAD_LOCKS, mode) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(std::io::Error::from(e).into()),
                }
                fsx::child_dir(scope.as_fd(), name)?
            }
            dir => dir?,
        };
        // A lock file is removed by its holder as it lets go: one opened just
        // before may then be locked with no name left, while a third process makes
        // and locks a new one. A lock counts only while its file still has the
        // name (the usual lock-file rule); else it is taken again.
        let flags = OFlags::CREATE | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        for _ in 0..8 {
            let file =
                rustix::fs::openat(&dir, session, flags, rustix::fs::Mode::from_raw_mode(0o600))
                    .map_err(std::io::Error::from)?;
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(Errno::WOULDBLOCK) => return Ok(None),
                Err(e @ (Errno::NOLCK | Errno::OPNOTSUPP | Errno::NOSYS)) => {
                    // Said once: an operator must know their volume keeps uploads
                    // apart within a process only.
                    static SAID: std::sync::atomic::AtomicBool =
                        std::sync::atomic::AtomicBool::new(false);
                    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(volume, error = %std::io::Error::from(e), "the volume takes no flock: uploads are kept apart within this process only, not from other processes sharing the volume");
                    }
                    return Ok(Some(Self(None)));
                }
                Err(e) => return Err(std::io::Error::from(e).into()),
            }
            let held = rustix::fs::fstat(&file).map_err(std::io::Error::from)?;
            let named = rustix::fs::statat(&dir, session, AtFlags::SYMLINK_NOFOLLOW);
            if named.is_ok_and(|n| n.st_dev == held.st_dev && n.st_ino == held.st_ino) {
                let name = session.to_owned();
                return Ok(Some(Self(Some(Held { dir, file, name }))));
            }
        }
        Ok(None)
    }
}

impl UploadLock {
    /// Lets the lock go now (on the blocking pool, where a completion runs): its
    /// file removed while still held, then closed. A PATCH that completes the
    /// upload lets go before it answers, so a client told 204 that asks again
    /// through another process is told the upload is gone, not held.
    fn release(mut self) {
        if let Some(Held { dir, file, name }) = self.0.take() {
            let _ = rustix::fs::unlinkat(&dir, name.as_str(), AtFlags::empty());
            drop(file);
        }
    }
}

impl Drop for UploadLock {
    fn drop(&mut self) {
        if self.0.is_none() {
            return;
        }
        let held = Self(self.0.take());
        // System calls a slow volume may hold: on the blocking pool.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || held.release())),
            Err(_) => held.release(),
        }
    }
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

/// The directory a complete staging file goes into, and its name there: the
/// destination's missing parents created beneath the vfolder, level by level, none
/// in the staging area. Path work, done before the scope's lock is taken: under
/// it only the rename runs ([`complete`]), so one upload's deep destination never
/// holds the scope's other uploads.
fn destination_dir(s: &Session) -> Result<(OwnedFd, &std::ffi::OsStr), ApiError> {
    let (name, dirs) = s
        .destination
        .split_last()
        .ok_or_else(|| ApiError::Params("empty relpath".into()))?;
    // A destination in the staging area (or any directory under it), or the staging
    // area itself, reached by a symlink the user made: the file would take another
    // session's place, and its missing parents are never created there either.
    let parent = super::manager::mkdirs_outside_staging(s.root.as_fd(), dirs)?;
    if name == super::manager::STAGING && super::manager::same_dir(parent.as_fd(), s.root.as_fd()) {
        return Err(super::manager::staging_refused());
    }
    Ok((parent, name.as_os_str()))
}

/// Whether a completion failed for a reason no retry of it can change: the
/// destination (or a directory on its way) is a directory, not a directory, out of
/// the vfolder, in the staging area, a name too long, on another filesystem.
/// (A full disk, an I/O error, a descriptor limit may pass: those keep the upload.)
fn final_failure(e: &ApiError) -> bool {
    use rustix::io::Errno;
    match e {
        ApiError::Path(_) | ApiError::Params(_) => true,
        ApiError::Io(e) => [
            Errno::ISDIR,
            Errno::NOTDIR,
            Errno::NAMETOOLONG,
            Errno::LOOP,
            Errno::XDEV,
        ]
        .iter()
        .any(|n| e.raw_os_error() == Some(n.raw_os_error())),
        _ => false,
    }
}

/// A complete upload that can never be put in place: its staged file is removed and
/// its reservation released at once (before, both stayed until the token expired,
/// an hour, and the scope's other uploads were refused for want of room). The
/// session is gone (a later PATCH gets 404); the error says so.
fn discard(state: &State, s: &Session, e: ApiError) -> ApiError {
    let _ = rustix::fs::unlinkat(&s.staging, s.id.as_str(), AtFlags::empty());
    state.reservations.release(&s.id);
    // Bytes no reservation held were counted as committed: measured again.
    state.reservations.removed(&s.scope_key);
    state.folders.changed(&s.folder_key);
    tracing::info!(session = %s.id, error = %e, "upload cannot be completed: discarded, its reservation released");
    // The refusal keeps its kind and gets the note: its message is not wrapped in
    // another refusal's, whose prefix it already carries ("Invalid API
    // parameters: Invalid API parameters: …", "filesystem error: filesystem
    // error: …").
    match e {
        ApiError::Io(io) => ApiError::Io(discarded_note(io)),
        ApiError::Params(why) => ApiError::Params(format!("{why}; {DISCARDED}")),
        e => ApiError::Params(format!("{e}; {DISCARDED}")),
    }
}

/// What is said of an upload discarded.
const DISCARDED: &str = "the upload was discarded and its reservation released";

/// `io` with the note that the upload was discarded, its kind, system error number
/// and words kept underneath (the answer's `errno` and `msg`).
pub(crate) fn discarded_note(io: std::io::Error) -> std::io::Error {
    std::io::Error::new(io.kind(), Noted(io))
}

/// An error given the note that its upload was discarded.
#[derive(Debug)]
struct Noted(std::io::Error);

impl std::fmt::Display for Noted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; {DISCARDED}", self.0)
    }
}

impl std::error::Error for Noted {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Moves a complete staging file into `name` of `parent` ([`destination_dir`]; the
/// caller synced the file and the staging directory, and syncs `parent` after it:
/// the syncs stay outside the scope's lock, under which this runs) with one
/// `renameat` between two descriptors. Answers whether it replaced an older file.
fn complete(
    s: &Session,
    parent: std::os::fd::BorrowedFd<'_>,
    name: &std::ffi::OsStr,
) -> Result<bool, ApiError> {
    Ok(fsx::rename_over(
        s.staging.as_fd(),
        s.id.as_ref(),
        parent,
        name,
    )?)
}

async fn tus_patch(
    Extract(state): Extract<Arc<State>>,
    ApiQuery(q): ApiQuery<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let mut written = None;
    let answer = patch(&state, q, headers, body, &mut written).await;
    let o = &state.metrics.observed;
    o.upload_duration.observe(started.elapsed());
    o.upload_size.observe_raw(written.unwrap_or(0));
    answer
}

/// However a PATCH ends, once it has let its session go: a staged file found gone
/// then (its vfolder deleted, or the file removed from a shell, while the PATCH
/// ran or before it), or something that is no file in its place (a directory, a
/// symlink, a FIFO put there from a shell), lets the session's reservation go, by the rule the expired-upload cleanup
/// follows ([`quota::release_staged`]: no PATCH of it running). Before, the
/// deletion's release passed over the session its PATCH held, the PATCH failed
/// (404), and the reservation held the scope's room until the token expired, an
/// hour, though nothing could use it: every other upload of the scope was refused
/// meanwhile (an outside tester's find).
struct GoneAfter<'a> {
    state: &'a Arc<State>,
    id: String,
    folder: std::path::PathBuf,
    scope: std::path::PathBuf,
    /// The session's staging directory (a descriptor of its own).
    staging: Option<OwnedFd>,
}

impl Drop for GoneAfter<'_> {
    fn drop(&mut self) {
        let Some(staging) = self.staging.take() else {
            return;
        };
        if !self.state.reservations.holding(&self.id)
            || self.state.completed.size_of(&self.id).is_some()
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (state, id) = (self.state.clone(), std::mem::take(&mut self.id));
        let (folder, scope) = (
            std::mem::take(&mut self.folder),
            std::mem::take(&mut self.scope),
        );
        // The look is a system call a slow volume may hold: on the blocking pool.
        runtime.spawn_blocking(move || {
            let look = rustix::fs::statat(&staging, id.as_str(), AtFlags::SYMLINK_NOFOLLOW);
            // Something that is no file in its place (a directory, a symlink, a
            // FIFO) ends the upload as its absence does: no PATCH opens it.
            let gone = match look {
                Err(e) => e == rustix::io::Errno::NOENT,
                Ok(st) => FileType::from_raw_mode(st.st_mode) != FileType::RegularFile,
            };
            // Completed meanwhile (its rename landed after the first look: the
            // request was dropped while its completion ran) is no upload gone.
            if !gone || state.completed.size_of(&id).is_some() {
                return;
            }
            quota::release_staged(&state, &folder, &id);
            if !state.reservations.holding(&id) {
                // Its bytes are gone with it: the scope is measured again.
                state.reservations.removed(&scope);
                tracing::info!(session = %id, "upload's staged file gone: its reservation released");
            }
        });
    }
}

/// A PATCH's bytes of the staged file that no reservation holds (see [`patch`]).
struct Unheld<'a> {
    state: &'a Arc<State>,
    id: String,
    folder: std::path::PathBuf,
    scope: std::path::PathBuf,
    /// Whether the session held a reservation before the PATCH's check.
    held: bool,
}

impl Unheld<'_> {
    /// After the check (`bytes` 0) and after writing `bytes`: when the session holds
    /// no reservation, the bytes count as committed at once and the folder's usage
    /// changed (as it did when the check let a reservation go).
    async fn wrote(&self, bytes: u64) {
        if (bytes == 0 && !self.held) || self.state.reservations.holding(&self.id) {
            return;
        }
        self.state.folders.changed(&self.folder);
        if bytes > 0 {
            let (st, scope, id) = (self.state.clone(), self.scope.clone(), self.id.clone());
            // The scope's lock is taken on the blocking pool only.
            let _ = blocking(move || {
                st.reservations.grew(&scope, &id, bytes);
                Ok(())
            })
            .await;
        }
    }
}

/// An `Upload-Offset` value: a non-negative integer (tus 1.0), digits only — no
/// sign, which Rust's integer parsing would take — around optional whitespace
/// (HTTP's own, which a field value never keeps).
fn tus_offset(v: &str) -> Result<u64, ApiError> {
    let v = v.trim_matches([' ', '\t']);
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::Params(
            "Upload-Offset must be a number of bytes in decimal digits".into(),
        ));
    }
    v.parse()
        .map_err(|_| ApiError::Params("Upload-Offset is out of range".into()))
}

/// The most bytes of a tus PATCH body gathered before they are written: one write
/// per this many bytes (or fewer, at the body's end), whatever the body's framing.
pub const UPLOAD_WRITE: usize = 64 << 10;

/// The longest bytes of a tus PATCH body wait, gathered, for more before they are
/// written: a body that is still arriving shows on disk (in HEAD's offset) this
/// long after its bytes came at most, and a client framing its body in tiny
/// chunks makes at most one write per this long (or per [`UPLOAD_WRITE`] bytes).
pub const UPLOAD_GATHER: std::time::Duration = std::time::Duration::from_millis(50);

/// Hands the bytes `gathered` from a PATCH body to one write (counted at `/metrics`)
/// and adds them to `written`, the bytes handed to the file's writes (see
/// [`land`]: before the write, so that a write cut short still bounds what may
/// have landed).
async fn write_gathered(
    state: &State,
    file: &mut tokio::fs::File,
    gathered: &mut Vec<u8>,
    written: &mut u64,
) -> std::io::Result<()> {
    if gathered.is_empty() {
        return Ok(());
    }
    *written += gathered.len() as u64;
    let wrote = file.write_all(gathered).await;
    gathered.clear();
    wrote?;
    super::Metrics::add(&state.metrics.upload_writes, 1);
    Ok(())
}

/// Ends a PATCH body's writes, however the body ended: writes what is still
/// `gathered` (unless a write failed already: `failed`) and flushes `file`, then
/// sets `written` to the bytes on disk. Those are the bytes handed to its writes
/// once every one succeeded. tokio's file hands each write to the blocking pool
/// and reports its failure at the next call or the flush, and a write cut short
/// (`ENOSPC` midway) landed part of its bytes: after a failure they are the
/// staged file's size, read again (between `offset` and the bytes handed; the
/// bytes handed when it cannot be read).
async fn land(
    state: &State,
    file: &mut tokio::fs::File,
    gathered: &mut Vec<u8>,
    offset: u64,
    written: &mut u64,
    failed: Option<std::io::Error>,
) -> std::io::Result<()> {
    let failed = match failed {
        Some(e) => e,
        None => match write_gathered(state, file, gathered, written).await {
            Ok(()) => match file.flush().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            },
            Err(e) => e,
        },
    };
    match file.metadata().await {
        Ok(m) => *written = m.len().clamp(offset, *written),
        Err(e) => {
            tracing::warn!(error = %e, "the staged file's size could not be read after a failed write")
        }
    }
    Err(failed)
}

/// The answer to a PATCH whose write failed after `kept` bytes landed (the upload
/// now at `at` of `size`): 413 `file-too-large` past the file's size limit
/// (`EFBIG`), 507 when the filesystem is full or its quota spent, 500 otherwise,
/// saying what was kept and where to resume.
fn write_failed(e: &std::io::Error, kept: u64, at: u64, size: u64) -> ApiError {
    use std::io::ErrorKind::{FileTooLarge, QuotaExceeded, StorageFull};
    if e.kind() == FileTooLarge {
        // The file's own limit (`EFBIG`): no retry of it passes, 413.
        return ApiError::FileTooLarge(format!(
            "{}: the {kept} bytes of this PATCH written before it are kept, the upload is at offset {at} of {size} and cannot go further here",
            super::file_too_large(e)
        ));
    }
    let (status, resume) = match e.kind() {
        StorageFull | QuotaExceeded => (
            StatusCode::INSUFFICIENT_STORAGE,
            "resume from HEAD's offset once there is room",
        ),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "resume from HEAD's offset",
        ),
    };
    ApiError::Rejected {
        status,
        message: format!(
            "the upload could not be written ({e}): the {kept} bytes of this PATCH written before it are kept, the upload is at offset {at} of {size}: {resume}"
        ),
    }
}

/// How a tus PATCH body ended (see [`patch`]).
enum BodyEnd {
    /// At its end.
    Done,
    /// Cut by the proxy (a stall, the rate floor, the token's expiry, a body past
    /// `Upload-Length`) or by its reader (a framing hyper refuses, the client gone
    /// mid-body): what arrived is kept, the PATCH answers the error (and completes
    /// the upload first when every byte of it is on disk).
    Cut(ApiError),
    /// A write of the staged file failed (`ENOSPC`, `EDQUOT`, `EIO`, `EFBIG`): what
    /// landed before it is kept.
    Failed(std::io::Error),
}

/// A tus PATCH; `received` gets the bytes written to the staging file by this call.
async fn patch(
    state: &Arc<State>,
    q: HashMap<String, String>,
    headers: HeaderMap,
    body: Body,
    received: &mut Option<u64>,
) -> Result<Response, ApiError> {
    if let Some(refused) = tus_refusal(&headers) {
        return Ok(refused);
    }
    once(&headers, "Upload-Offset")?;
    let s = {
        let st = state.clone();
        blocking(move || session(&st, &q)).await?
    };
    let offset: u64 = match headers.get("upload-offset") {
        None => return Err(ApiError::Params("Upload-Offset is required".into())),
        Some(v) => tus_offset(v.to_str().unwrap_or_default())?,
    };
    // A session completed lately takes nothing more: a PATCH at its end (a client
    // that lost the last answer, asking again) is answered as that one was; one
    // carrying bytes (`Content-Length`) gets 413, any other offset 409.
    if let Some(size) = state.completed.size_of(&s.id) {
        if offset != size {
            return Err(ApiError::Conflict(
                "the upload is complete: Upload-Offset does not match the server's offset",
            ));
        }
        let carries = headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0");
        if carries {
            return Err(ApiError::TooLarge);
        }
        return Ok(patched(size));
    }
    // Dropped after the lease (declared before it), armed once the lease is this
    // PATCH's: see `GoneAfter`.
    let mut gone = GoneAfter {
        state,
        id: s.id.clone(),
        folder: s.folder_key.clone(),
        scope: s.scope_key.clone(),
        staging: None,
    };
    let _lease = {
        let mut set = state
            .uploading
            .lock()
            .map_err(|_| ApiError::Conflict("upload state unavailable"))?;
        if !set.insert(s.id.clone()) {
            return Err(ApiError::Conflict(PATCH_RUNNING));
        }
        Lease {
            state,
            id: s.id.clone(),
        }
    };
    // And in every other process sharing the volume (see `UploadLock`), held
    // until the PATCH ends, past its completion.
    let locked = {
        let (st, volume, id) = (state.clone(), s.volume.clone(), s.id.clone());
        let scope = s.scope_name.clone();
        blocking(move || UploadLock::take(&st, &volume, scope.as_deref(), &id))
            .await?
            .ok_or(ApiError::Conflict(PATCH_RUNNING))?
    };
    gone.staging = s.staging.try_clone().ok();
    // Bytes of the staged file no reservation holds count in the folder's usage and
    // as the scope's committed bytes: a check that lets the reservation go (the
    // limit was removed) and bytes written without one (a scope without a limit)
    // change them, through the API.
    let unheld = Unheld {
        state,
        id: s.id.clone(),
        folder: s.folder_key.clone(),
        scope: s.scope_key.clone(),
        held: state.reservations.holding(&s.id),
    };
    // The staging file (never through a symlink), its offset, and the quota: the
    // session's reservation must still fit the scope's current limit. The user can
    // put anything in its place from a container: only a regular file is opened (a
    // FIFO or a device node never is, see `fsx::reopen`), and written only while it
    // has no other name.
    let checked = {
        let st = state.clone();
        blocking(move || {
            let write = OFlags::WRONLY | OFlags::APPEND | OFlags::NONBLOCK | OFlags::NOCTTY;
            let open = |flags| {
                fsx::openat2(
                    &s.staging,
                    s.id.as_str(),
                    flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                    fsx::STRICT,
                )
            };
            let fd = open(OFlags::PATH)
                .map_err(std::io::Error::from)
                .and_then(|path| fsx::reopen(path, write, false, || Ok(open(write)?)))
                .map_err(|e| {
                    if no_staged_file(&e) {
                        ApiError::NotFound
                    } else {
                        unreachable_staged(e)
                    }
                })?;
            let current = rustix::fs::fstat(&fd)?;
            if FileType::from_raw_mode(current.st_mode) != FileType::RegularFile {
                return Err(ApiError::NotFound);
            }
            // The proxy made the staged file with one name: another one means it was
            // replaced by a hard link to a file elsewhere (outside the vfolder, even),
            // which the upload's bytes must never be appended to.
            if current.st_nlink != 1 {
                return Err(ApiError::Conflict(
                    "the upload's staged file has more than one name (a hard link): nothing was written",
                ));
            }
            if current.st_size as u64 != offset {
                return Err(ApiError::Conflict(
                    "Upload-Offset does not match the server's offset",
                ));
            }
            let scope = s
                .scope_name
                .as_ref()
                .map(|n| st.volumes.open_scope(&s.volume, n))
                .transpose()?;
            let checked = quota::try_reserve(
                &st,
                &s.scope_key,
                scope.as_ref().map(|f| f.as_fd()),
                (&s.id, Some(&s.folder_key)),
                (s.size, offset),
            )
            .inspect_err(|_| st.folders.changed(&s.folder_key))?;
            Ok((s, std::fs::File::from(fd), checked))
        })
        .await?
    };
    let (s, file) = match checked {
        (s, file, true) => (s, file),
        // The scope's measurement is too old: one walk (shared with every check of
        // the scope that needs one meanwhile), then the check.
        (s, file, false) => {
            let sizes = (s.size, offset);
            let holder = (s.id.as_str(), Some(s.folder_key.as_path()));
            let name = s.scope_name.as_deref();
            quota::reserve(state, &s.scope_key, &s.volume, name, holder, sizes)
                .await
                // A reservation let go: the staged file counts in the folder's
                // usage from now on.
                .inspect_err(|_| state.folders.changed(&s.folder_key))?;
            (s, file)
        }
    };
    // A reservation held (re-made after a restart, too) is let go once the token
    // has expired and no PATCH runs.
    state.reservations.usable_until(&s.id, s.until);
    unheld.wrote(0).await;
    let mut file = tokio::fs::File::from_std(file);
    // Bytes handed to the file's writes (`written`; the bytes on disk once the body
    // ended, see `land`) and gathered, not yet written (`gathered`): the body's
    // frames are gathered into one buffer of up to `UPLOAD_WRITE` bytes, written in
    // one call, so that how the client frames the body (a chunked body of 1-byte
    // chunks) never multiplies the work per byte: no timer, no write, no trip
    // through the blocking pool per frame. Bytes gathered wait `UPLOAD_GATHER` at
    // most for more (one timer per buffer), so a body still arriving shows on disk
    // (HEAD's offset) as before; whatever ends the body writes what was gathered
    // first, so the offset answered is always the bytes on disk.
    let mut written = offset;
    let mut gathered: Vec<u8> = Vec::new();
    let mut stream = body.into_data_stream();
    // The request-body rate floor (`appproxy_shared::rate_floor`), with one stall
    // timeout of waiting banked.
    let mut floor = RateFloor::new(state.min_body_rate, state.stall);
    // An interrupted body keeps what arrived: the client resumes from HEAD's offset.
    // A body on which no byte comes for the stall timeout, or that comes slower than
    // the floor, ends the PATCH (408), so a stalled or trickling client never keeps
    // the session locked; nor does any PATCH outlive its token, whose reservation
    // is let go at its expiry.
    //
    // The wait for the next frame began at `waiting`; it may last `bound` (the stall
    // timeout, or the floor's budget when shorter). The deadline this gives only
    // moves later as frames come (a frame's bytes earn budget back), so one timer
    // serves every wait: when it fires, the deadline is worked out again and the
    // timer moved to it if it has not passed.
    let bound =
        |floor: &Option<RateFloor>| floor.map_or((state.stall, false), |f| f.bound(state.stall));
    let mut waiting = tokio::time::Instant::now();
    let stalled = tokio::time::sleep_until(waiting + bound(&floor).0);
    let expired = tokio::time::sleep_until(tokio::time::Instant::from_std(s.until));
    let gather = tokio::time::sleep(UPLOAD_GATHER);
    tokio::pin!(stalled, expired, gather);
    // Every way the body ends leaves this loop (no `?` in it), for the one exit
    // below that accounts for the bytes on disk.
    let end = loop {
        let next = tokio::select! {
            // In this order: a token that expired ends the body even while frames
            // keep coming; the stall timer matters only while none is waiting.
            biased;
            () = &mut expired => Err(ApiError::Session),
            next = stream.next() => Ok(next),
            () = &mut gather, if !gathered.is_empty() => {
                // The write's time is not the client's: the wait is that much longer.
                let began = tokio::time::Instant::now();
                let wrote = write_gathered(state, &mut file, &mut gathered, &mut written).await;
                if let Err(e) = wrote {
                    break BodyEnd::Failed(e);
                }
                waiting += began.elapsed();
                continue;
            }
            () = &mut stalled => {
                let (wait, floor_binds) = bound(&floor);
                let due = waiting + wait;
                if tokio::time::Instant::now() < due {
                    stalled.as_mut().reset(due);
                    continue;
                }
                Err(ApiError::TimedOut(if floor_binds {
                    format!(
                        "the body came slower than {} bytes/s: what arrived is kept, resume from HEAD's offset",
                        state.min_body_rate
                    )
                } else {
                    format!(
                        "no byte of the body came for {} s: what arrived is kept, resume from HEAD's offset",
                        state.stall.as_secs()
                    )
                }))
            }
        };
        let chunk = match next {
            Ok(Some(Ok(chunk))) => chunk,
            Ok(None) => break BodyEnd::Done,
            // A framing hyper refuses, or the client gone mid-body: what arrived
            // is kept, and the error answered (to a client still there).
            Ok(Some(Err(e))) => break BodyEnd::Cut(bad_body(&e)),
            Err(cut) => break BodyEnd::Cut(cut),
        };
        let now = tokio::time::Instant::now();
        if let Some(f) = floor.as_mut() {
            f.book(now - waiting, chunk.len());
        }
        if gathered.is_empty() {
            gather.as_mut().reset(now + UPLOAD_GATHER);
        }
        if written + gathered.len() as u64 + chunk.len() as u64 > s.size {
            break BodyEnd::Cut(ApiError::TooLarge);
        }
        let wrote = if gathered.is_empty() && chunk.len() >= UPLOAD_WRITE {
            // A frame as large as a buffer is written as it came, not copied.
            written += chunk.len() as u64;
            let wrote = file.write_all(&chunk).await;
            if wrote.is_ok() {
                super::Metrics::add(&state.metrics.upload_writes, 1);
            }
            wrote
        } else {
            gathered.extend_from_slice(&chunk);
            if gathered.len() >= UPLOAD_WRITE {
                write_gathered(state, &mut file, &mut gathered, &mut written).await
            } else {
                Ok(())
            }
        };
        if let Err(e) = wrote {
            break BodyEnd::Failed(e);
        }
        // The write's time (if any) is not the client's: the wait begins after it.
        waiting = tokio::time::Instant::now();
    };
    // The one exit of the body, however it ended: what was gathered is written, the
    // bytes on disk are accounted for (the quota's, when no reservation holds them,
    // the folder's usage, `/metrics`), and then the error, if any, is answered.
    let (cut, failed) = match end {
        BodyEnd::Done => (None, None),
        BodyEnd::Cut(cut) => (Some(cut), None),
        BodyEnd::Failed(e) => (None, Some(e)),
    };
    let landed = land(
        state,
        &mut file,
        &mut gathered,
        offset,
        &mut written,
        failed,
    )
    .await;
    let kept = written - offset;
    *received = Some(kept);
    unheld.wrote(kept).await;
    super::Metrics::add(&state.metrics.upload_bytes, kept);
    if let Err(e) = landed {
        tracing::warn!(bytes = kept, error = %e, "upload write failed: what landed is kept");
        return Err(write_failed(&e, kept, written, s.size));
    }
    match &cut {
        Some(ApiError::Session) => {
            tracing::info!(bytes = kept, "upload token expired during the body");
        }
        Some(cut @ ApiError::TimedOut(_)) => {
            tracing::info!(bytes = kept, reason = %cut, "upload body stalled");
        }
        Some(cut @ ApiError::BadBody(_)) => {
            tracing::info!(bytes = kept, reason = %cut, "upload body could not be read");
        }
        _ => {}
    }
    // Every byte on disk completes the upload, whatever ended the body: its end, or
    // a cut after the last byte (a frame past `Upload-Length`, a stall or a broken
    // framing before the body's end, the token's expiry). Before, a cut was answered
    // first and the upload left staged at its full offset: HEAD said it was done, a
    // tus client resuming sent nothing more, and it was never put in place.
    if written != s.size {
        // The lock let go before the answer: the client's next PATCH may go to
        // another process at once.
        let _ = blocking(move || {
            locked.release();
            Ok(())
        })
        .await;
        return match cut {
            Some(cut) => Err(cut),
            None => Ok(patched(written)),
        };
    }
    // The bytes are counted already; a flush to disk that fails (`EIO`, or a full
    // disk found at write-back, as NFS reports it) is answered as a write is: 507
    // or 500, the upload resumed (and completed) by a PATCH at its end, or a HEAD.
    if let Err(e) = file.sync_all().await {
        tracing::warn!(bytes = kept, error = %e, "upload could not be flushed to disk");
        return Err(write_failed(&e, kept, written, s.size));
    }
    let file = file.into_std().await;
    let size = s.size;
    let st = state.clone();
    let id = blocking(move || {
        fsx::sync(s.staging.as_fd())?;
        // The staged file must hold exactly the upload's bytes, by its descriptor,
        // just before it is put in place: its name is the session ID, and whoever
        // has a shell in the vfolder can append to it while a PATCH runs. Before, a
        // file of another size (10 MiB spliced in between two PATCH writes) was put
        // in place and answered 204, its declared size counted against the quota.
        let written = file.metadata()?;
        let on_disk = written.len();
        // And the file the PATCH wrote must still be the one under the session's
        // name: one replaced meanwhile (a directory, a symlink to `/etc`, another
        // file, from a shell in the vfolder) was renamed into place instead, answered
        // 204, the bytes written lost and counted (an outside verifier's find).
        // Looked at just before the rename; a swap in between is the user's own
        // upload, renamed within the vfolder.
        let named = rustix::fs::statat(&s.staging, s.id.as_str(), AtFlags::SYMLINK_NOFOLLOW);
        let same = named.as_ref().is_ok_and(|st| {
            use std::os::unix::fs::MetadataExt as _;
            st.st_dev == written.dev() && st.st_ino == written.ino()
        });
        if !same {
            tracing::warn!(session = %s.id, "staged file replaced during the upload");
            drop(discard(&st, &s, ApiError::Conflict("staged file replaced")));
            return Err(ApiError::Conflict(
                "the upload's staged file was replaced by someone else (a shell in the vfolder) while the upload ran; nothing was put in place, the upload was discarded and its reservation released",
            ));
        }
        if on_disk != s.size {
            tracing::warn!(session = %s.id, on_disk, declared = s.size, "staged file changed by someone else during the upload");
            drop(discard(&st, &s, ApiError::Conflict("staged file of another size")));
            return Err(ApiError::Conflict(
                "the upload's staged file is not its Upload-Length: it was changed by someone else (a shell in the vfolder) while the upload ran; nothing was put in place, the upload was discarded and its reservation released",
            ));
        }
        let placed = destination_dir(&s).and_then(|(parent, name)| {
            let replaced = st.reservations.commit(&s.scope_key, &s.id, s.size, || {
                let replaced = complete(&s, parent.as_fd(), name)?;
                // Remembered as soon as the file is in place (a HEAD that finds the
                // staged file gone asks this record), and before the directory's
                // sync, which may fail: the file is in place either way.
                st.completed.record(&s.id, s.size, s.until);
                Ok(replaced)
            })?;
            Ok((parent, replaced))
        });
        let (parent, replaced) = match placed {
            Ok(placed) => placed,
            Err(e) if final_failure(&e) => return Err(discard(&st, &s, e)),
            Err(e) => return Err(e),
        };
        // The older file it replaced is gone: the scope is measured again.
        if replaced {
            st.reservations.removed(&s.scope_key);
        }
        st.folders.changed(&s.folder_key);
        drop(file);
        locked.release();
        fsx::sync(parent.as_fd())?;
        Ok(s.id)
    })
    .await?;
    super::Metrics::add(&state.metrics.uploads_completed, 1);
    tracing::info!(session = %id, bytes = written, "upload complete");
    match cut {
        Some(cut) => Err(ApiError::CompletedDespite {
            cut: Box::new(cut),
            size,
        }),
        None => Ok(patched(written)),
    }
}

/// A PATCH's answer: 204 with the upload's offset.
fn patched(offset: u64) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    tus_headers(resp.headers_mut());
    resp.headers_mut()
        .insert("upload-offset", HeaderValue::from(offset));
    resp
}

/// The answer to a PATCH body its reader refused (`e`, with its causes: hyper's
/// "error reading a body from connection" says little, its cause what was wrong):
/// 400 `bad-framing`. Before, it was taken for the body's end and answered 204.
fn bad_body(e: &axum::Error) -> ApiError {
    let mut why = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !why.ends_with(&text) {
            why.push_str(": ");
            why.push_str(&text);
        }
        source = cause.source();
    }
    ApiError::BadBody(format!(
        "the request body could not be read ({why}): what arrived before it is kept, resume from HEAD's offset"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 9110 §14.1.2: a last-byte-pos past the end (past `u64` too) is the
    /// end, a suffix longer than the file is the whole file, the unit is
    /// case-insensitive; a first-byte-pos past the end is unsatisfiable.
    #[test]
    fn ranges() {
        type Parsed = Result<Option<(u64, u64)>, ()>;
        let cases: &[(&str, u64, Parsed)] = &[
            ("bytes=0-9", 100, Ok(Some((0, 9)))),
            ("bytes=90-", 100, Ok(Some((90, 99)))),
            ("bytes=-10", 100, Ok(Some((90, 99)))),
            ("bytes=50-500", 100, Ok(Some((50, 99)))),
            ("bytes=100-", 100, Err(())),
            ("bytes=5-2", 100, Err(())),
            ("bytes=0-1,5-6", 100, Ok(None)),
            ("items=0-1", 100, Ok(None)),
            ("bytes=x-1", 100, Err(())),
            // Past the end, past u64.
            ("bytes=0-99999999999999999999", 1000, Ok(Some((0, 999)))),
            ("bytes=10-18446744073709551616", 1000, Ok(Some((10, 999)))),
            ("bytes=0-18446744073709551615", 1000, Ok(Some((0, 999)))),
            ("bytes=-99999999999999999999", 1000, Ok(Some((0, 999)))),
            ("bytes=-18446744073709551615", 1000, Ok(Some((0, 999)))),
            ("bytes=-1001", 1000, Ok(Some((0, 999)))),
            ("bytes=99999999999999999999-", 1000, Err(())),
            (
                "bytes=99999999999999999999-99999999999999999999",
                1000,
                Err(()),
            ),
            // The unit, case-insensitive; nothing else is a unit.
            ("BYTES=0-1", 1000, Ok(Some((0, 1)))),
            ("Bytes=-5", 1000, Ok(Some((995, 999)))),
            ("bYtEs=998-", 1000, Ok(Some((998, 999)))),
            ("bytes =0-1", 1000, Ok(None)),
            ("byte=0-1", 1000, Ok(None)),
            ("bytes", 1000, Ok(None)),
            ("", 1000, Ok(None)),
            ("é=0-1", 1000, Ok(None)),
            ("byteé=0-1", 1000, Ok(None)),
            // Positions are digits only.
            ("bytes=+5-10", 1000, Err(())),
            ("bytes=5-+10", 1000, Err(())),
            ("bytes=--5", 1000, Err(())),
            ("bytes=-", 1000, Err(())),
            ("bytes=-0", 1000, Err(())),
            ("bytes=1e3-", 1000, Err(())),
            // An empty file has no satisfiable range.
            ("bytes=0-", 0, Err(())),
            ("bytes=-99999999999999999999", 0, Err(())),
        ];
        for (value, len, want) in cases {
            assert_eq!(parse_range(value, *len), *want, "{value:?} of {len}");
        }
    }

    /// Times an HTTP date cannot carry (before 1970, past year 9999) give no
    /// `Last-Modified` and are never formatted; the date preconditions are ignored.
    #[test]
    fn modification_times_past_http_dates_are_left_out() {
        for (mtime, carried) in [
            (-1, false),
            (i64::MIN, false),
            (0, true),
            (HTTP_DATE_END - 1, true),
            (HTTP_DATE_END, false),
            (400_000_000_000, false),
            (i64::MAX, false),
        ] {
            let mut h = HeaderMap::new();
            validators(&mut h, "\"t\"", Some(mtime));
            assert_eq!(h.contains_key("last-modified"), carried, "{mtime}");
            assert_eq!(h.get("etag").map(|v| v.as_bytes()), Some(&b"\"t\""[..]));
        }
        let mut h = HeaderMap::new();
        validators(&mut h, "\"t\"", Some(HTTP_DATE_END - 1));
        assert_eq!(
            h.get("last-modified").and_then(|v| v.to_str().ok()),
            Some("Fri, 31 Dec 9999 23:59:59 GMT")
        );
        for (name, value) in [
            ("if-modified-since", "Fri, 31 Dec 9999 23:59:59 GMT"),
            ("if-unmodified-since", "Thu, 01 Jan 1970 00:00:00 GMT"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static(value));
            assert_eq!(
                evaluate(&h, "\"t\"", last_modified(400_000_000_000)),
                Conditional::Serve { range: true },
                "{name}"
            );
        }
        let mut h = HeaderMap::new();
        h.insert(
            "if-range",
            HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"),
        );
        assert_eq!(
            evaluate(&h, "\"t\"", last_modified(-1)),
            Conditional::Serve { range: false }
        );
    }

    /// The record of completed sessions holds at most its bound, forgetting the
    /// oldest first, and never a session whose token has expired.
    #[test]
    fn completed_sessions_are_bounded_oldest_forgotten_first() {
        let c = Completed::new(3);
        let later = std::time::Instant::now() + std::time::Duration::from_secs(3600);
        let id = |n: u32| format!("{n:032x}");
        for n in 0..5 {
            c.record(&id(n), u64::from(n) * 10, later);
        }
        let known: Vec<Option<u64>> = (0..5).map(|n| c.size_of(&id(n))).collect();
        assert_eq!(known, [None, None, Some(20), Some(30), Some(40)]);
        let sessions = c.sessions.lock().expect("lock");
        assert_eq!((sessions.by_id.len(), sessions.order.len()), (3, 3));
        drop(sessions);
        c.record(&id(9), 1, std::time::Instant::now());
        assert_eq!(c.size_of(&id(9)), None, "its token expired");
        assert_eq!(c.size_of("not hex"), None);
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
