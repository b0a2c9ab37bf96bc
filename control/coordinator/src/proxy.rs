//! `/v2/conf` (the manager registers a kernel's address and gets a token) and
//! `/v2/proxy/auth` (GET as the original, POST as the proposals draw it): reuse or
//! create a circuit, tell its worker, wait for the acknowledgement, and answer with the
//! worker's `/setup` URL (JSON or a 308 redirect).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use appproxy_shared::model::{AppMode, Circuit, FrontendMode, RouteInfo, UpstreamTls};
use appproxy_shared::wire::WorkerRegistration;
use axum::extract::State as Extract;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::events::{AckOutcome, CircuitEvent, EventKind};
use super::placement::{self, Placement, Used};
use super::store::{StoreError, STATEMENT_TIMEOUT};
use super::{api, ApiError, Body, Params, State};

/// The longest a `/setup` link lives ([`crate::config::CoordinatorSection::setup_link_ttl_secs`]
/// is capped to it).
pub const MAX_SETUP_LINK_TTL_SECS: u64 = 366 * 24 * 3600;

/// What a refused kernel host is told.
pub(super) const KERNEL_HOST_RULE: &str =
    "kernel_host must be a host name (labels of letters, digits, '-' and '_') or an IP address";

/// Whether `host` is a kernel host the worker can connect to and nothing else: an
/// IP address (v4, or v6 without brackets), or a host name of RFC 1123 labels (1-63
/// letters, digits and hyphens, not starting or ending with a hyphen; 253
/// characters at most, a trailing dot allowed), underscores allowed as resolvers
/// allow them (container names on user-defined networks, `my_project_kernel_1`).
/// A URL's parts (`/`, `?`, `#`, `@`, `:`), spaces, control and non-ASCII
/// characters are none of these.
pub(super) fn valid_kernel_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Whether `s` holds a control character (CR, LF, NUL, …): such a value would split
/// a log line or a header wherever it is written.
pub(super) fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// The optional `upstream_tls` of a `/v2/conf` body: absent or `null` is plain TCP,
/// else `off`, `verify` or `insecure` (the app serves HTTPS on `kernel_port`).
fn conf_upstream_tls(body: &Value) -> Result<UpstreamTls, ApiError> {
    match &body["upstream_tls"] {
        Value::Null => Ok(UpstreamTls::Off),
        v => serde_json::from_value(v.clone()).map_err(|_| {
            ApiError::BadRequest("upstream_tls must be \"off\", \"verify\" or \"insecure\"".into())
        }),
    }
}

/// A port as pydantic's lax `int` reads one: a whole number, as JSON or as
/// decimal text, or a float with no fraction. Before, `"80"` and `80.0`, which
/// the original takes, were refused 400 (an outside tester's find).
pub(super) fn lax_port(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= 65_535.0)
                .map(|f| f as u64)
        }),
        Value::String(s) => {
            let s = s.trim();
            (!s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        }
        _ => None,
    }
}

/// The `/v2/conf` body, checked whole before anything is stored.
fn validate_conf(body: &Value) -> Result<(), ApiError> {
    let session = &body["session"];
    if session["id"].as_str().is_none() || session["access_key"].as_str().is_none() {
        return Err(ApiError::BadRequest("Not meant for inference apps".into()));
    }
    let is_uuid = |v: &Value| v.as_str().is_some_and(|s| uuid::Uuid::parse_str(s).is_ok());
    let group = if session["group_id"].is_null() {
        &session["project_id"]
    } else {
        &session["group_id"]
    };
    if !is_uuid(&session["id"]) || !is_uuid(&session["user_uuid"]) || !is_uuid(group) {
        return Err(ApiError::BadRequest(
            "session.id, session.user_uuid and session.group_id (or project_id) must be UUIDs"
                .into(),
        ));
    }
    if session["domain_name"].as_str().is_none() {
        return Err(ApiError::BadRequest(
            "session.domain_name is required".into(),
        ));
    }
    if body["kernel_host"].as_str().is_none()
        || body["kernel_port"]
            .as_u64()
            .is_none_or(|p| p == 0 || p > 65535)
    {
        return Err(ApiError::BadRequest(
            "kernel_host and kernel_port (1-65535) are required".into(),
        ));
    }
    if !body["kernel_host"].as_str().is_some_and(valid_kernel_host) {
        return Err(ApiError::BadRequest(KERNEL_HOST_RULE.into()));
    }
    if !(body["login_session_token"].is_null()
        || body["login_session_token"]
            .as_str()
            .is_some_and(|t| t.chars().count() <= 127))
    {
        return Err(ApiError::BadRequest(
            "login_session_token must be null or a string of at most 127 characters".into(),
        ));
    }
    conf_upstream_tls(body)?;
    Ok(())
}

/// The caller's secret was checked before the body was read (`conf_auth`).
pub(super) async fn conf(
    Extract(state): Extract<Arc<State>>,
    Body(mut body): Body<Value>,
) -> Result<Json<Value>, ApiError> {
    // A port given as text or as a whole float (`"80"`, `80.0`) is taken, as the
    // original's model (pydantic, lax) takes it, and stored as the number.
    if let Some(port) = lax_port(&body["kernel_port"]) {
        body["kernel_port"] = json!(port);
    }
    validate_conf(&body)?;
    appproxy_shared::middleware::note_access_key(
        body["session"]["access_key"].as_str().unwrap_or_default(),
    );
    let id = uuid::Uuid::new_v4();
    state.store.insert_token(id, &body).await?;
    Ok(Json(json!({"token": id})))
}

/// The parameters of `/v2/proxy/auth`.
#[derive(Deserialize)]
pub(super) struct AuthQuery {
    token: uuid::Uuid,
    session_id: uuid::Uuid,
    app: String,
    protocol: String,
    #[serde(default)]
    open_to_public: Option<Flag>,
    #[serde(default)]
    allowed_client_ips: Option<String>,
    #[serde(default)]
    redirect: String,
    #[serde(default)]
    no_reuse: Option<Flag>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    subdomain: Option<String>,
    #[serde(default)]
    args: Option<String>,
}

/// A boolean from a query string or a JSON body, read as the original's pydantic
/// reads one: `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`, `t`/`f`, `y`/`n` in
/// any case (or a JSON boolean, 0 or 1); anything else is refused (400 naming the
/// parameter). Before, only `true`, `1` and `yes` were true and any other text
/// silently false: `no_reuse=on` (a checkbox's value) reused the old circuit (an
/// outside tester's find).
#[derive(Clone, Copy)]
struct Flag(bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Flag;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a boolean (true/false, 1/0, yes/no, on/off, t/f, y/n)")
            }

            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Flag, E> {
                Ok(Flag(v))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Flag, E> {
                match v {
                    0 | 1 => Ok(Flag(v == 1)),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Unsigned(v), &self)),
                }
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Flag, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(v), &self)),
                }
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Flag, E> {
                if v == 0.0 || v == 1.0 {
                    Ok(Flag(v == 1.0))
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
                }
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Flag, E> {
                match v.to_ascii_lowercase().as_str() {
                    "1" | "on" | "t" | "true" | "y" | "yes" => Ok(Flag(true)),
                    "0" | "off" | "f" | "false" | "n" | "no" => Ok(Flag(false)),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Flag {
    fn get(f: Option<Flag>) -> bool {
        f.is_some_and(|f| f.0)
    }
}

pub(super) async fn proxy_auth_get(
    state: Extract<Arc<State>>,
    headers: HeaderMap,
    Params(q): Params<AuthQuery>,
) -> Result<Response, ApiError> {
    proxy_auth(state, headers, q).await
}

/// POST takes the same fields as a JSON body, or as the query when there is no body.
pub(super) async fn proxy_auth_post(
    state: Extract<Arc<State>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let q: AuthQuery = if body.is_empty() {
        axum::extract::Query::try_from_uri(&uri)
            .map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))?
            .0
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?
    };
    proxy_auth(state, headers, q).await
}

fn split_ips(s: Option<&str>) -> Vec<String> {
    s.map(|s| {
        s.split(',')
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect()
    })
    .unwrap_or_default()
}

async fn proxy_auth(
    Extract(state): Extract<Arc<State>>,
    headers: HeaderMap,
    q: AuthQuery,
) -> Result<Response, ApiError> {
    // A token past `token_ttl_secs` is answered as an unknown one, whether or not
    // the leader's pass has deleted it yet.
    let token = state
        .store
        .token(q.token, state.config.coordinator.token_ttl_secs)
        .await?
        .ok_or(ApiError::NotFound("E00001: No such token."))?;
    appproxy_shared::middleware::note_access_key(
        token["session"]["access_key"].as_str().unwrap_or_default(),
    );
    if token["session"]["id"].as_str() != Some(q.session_id.to_string().as_str()) {
        return Err(ApiError::SessionMismatch);
    }
    let (protocol, route_protocol) = api::protocols(&q.protocol)?;
    let allowed = split_ips(q.allowed_client_ips.as_deref());
    for ip in &allowed {
        if appproxy_shared::model::IpNet::parse(ip).is_none() {
            return Err(ApiError::BadRequest(format!(
                "allowed_client_ips: {ip:?} is not an IP or CIDR"
            )));
        }
    }
    super::fits("app", Some(&q.app), 255)?;
    if q.app.is_empty() || has_control(&q.app) {
        return Err(ApiError::BadRequest(
            "app must be a non-empty name without control characters".into(),
        ));
    }
    super::fits("args", q.args.as_deref(), 1000)?;
    super::fits("allowed_client_ips", Some(&allowed.join(",")), 255)?;
    super::fits("redirect", Some(&q.redirect), 2048)?;
    let open_to_public = Flag::get(q.open_to_public);
    let subdomain = q.subdomain.as_deref().map(placement::dns_label);
    // Stored tokens were checked when registered; one from before the field existed
    // has none (plain TCP).
    let upstream_tls = conf_upstream_tls(&token).unwrap_or_default();
    // The user the token was issued for: its circuit is theirs.
    let user = token["session"]["user_uuid"]
        .as_str()
        .and_then(|s| uuid::Uuid::parse_str(s).ok());
    // Reuse, as the original: the same session, app, openness and allowlist, and
    // (not in the original) the same way to reach the app and the same user: a
    // token issued for another user of the session is never handed the first one's
    // circuit, whose `/setup` sets a permit for that first user's other circuits.
    let reusable = || async {
        Ok::<_, ApiError>(
            state
                .store
                .circuits_of_session(q.session_id)
                .await?
                .into_iter()
                .map(|(c, _)| c)
                .find(|c| {
                    c.app.as_deref() == Some(q.app.as_str())
                        && c.open_to_public == open_to_public
                        && c.allowed_client_ips == allowed
                        && c.app_mode == AppMode::Interactive
                        && c.route_info.iter().all(|r| r.upstream_tls == upstream_tls)
                        && c.user_id == user
                }),
        )
    };
    // Concurrent calls for the same reuse key (a double click, a browser retry,
    // several tabs) take turns: the first creates, the others then find its
    // circuit and reuse it. Held until this call's creation has its outcome; the
    // wait is bounded by the longest the holder can take (its wait for a creation
    // under way on another coordinator, then its own creation), past which the
    // call goes on alone. Shorter, the calls queued behind a holder waiting out an
    // orphaned creation went on alone and each made a circuit of its own.
    let key = format!(
        "{}\n{}\n{open_to_public}\n{}\n{upstream_tls:?}\n{user:?}",
        q.session_id,
        q.app,
        allowed.join(",")
    );
    let _turn = if Flag::get(q.no_reuse) {
        None
    } else {
        let turn = state
            .reuse_locks
            .lock(key.clone(), state.reuse_turn_wait())
            .await;
        if turn.is_none() {
            tracing::warn!(session = %q.session_id, "a creation for the same session and app still runs; not waiting longer");
        }
        turn
    };
    // A call that found nothing settled to reuse also takes the key's turn in the
    // store, held until its new circuit is stored (marked as a creation under way,
    // which the other coordinators' calls then wait on) and again while an
    // unacknowledged attempt is replaced ([`KeyTurn`]): across coordinators, calls
    // for one key create one circuit.
    let (reused, mut store_turn) = if Flag::get(q.no_reuse) {
        (None, None)
    } else {
        let (reused, turn) = reuse_on_alive_worker(&state, reusable, &key).await?;
        (reused, Some(turn))
    };
    let outcome = async {
        Ok::<_, ApiError>(match reused {
            Some((c, worker)) => {
                tracing::info!(circuit = %c.id, "circuit reused");
                (c, true, worker)
            }
            None => {
                let session = &token["session"];
                let mut properties: Vec<(String, String)> = Vec::new();
                for (key, field) in [
                    ("id", "id"),
                    ("user_uuid", "user_uuid"),
                    ("project_id", "group_id"),
                    ("project_id", "project_id"),
                    ("access_key", "access_key"),
                    ("domain_name", "domain_name"),
                ] {
                    if let Some(v) = session[field].as_str() {
                        properties.push((format!("session.{key}"), v.to_owned()));
                    }
                }
                let default_subdomain = placement::dns_label(&format!(
                    "{}-{}",
                    q.app,
                    &q.session_id.simple().to_string()[..8]
                ));
                let request = placement::Request {
                    app_mode: AppMode::Interactive,
                    protocol,
                    properties: &properties,
                    preferred_port: q.port,
                    preferred_subdomain: subdomain.as_deref(),
                    default_subdomain: &default_subdomain,
                    spread: None,
                    only_worker: None,
                };
                let route = RouteInfo {
                    route_id: None,
                    session_id: q.session_id,
                    session_name: None,
                    kernel_host: token["kernel_host"].as_str().unwrap_or_default().to_owned(),
                    kernel_port: token["kernel_port"]
                        .as_u64()
                        .and_then(|p| u16::try_from(p).ok())
                        .unwrap_or(0),
                    protocol: route_protocol,
                    traffic_ratio: 1.0,
                    health_status: None,
                    upstream_tls,
                };
                let template = Circuit {
                    id: uuid::Uuid::nil(),
                    app: Some(q.app.clone()),
                    protocol,
                    worker: None,
                    app_mode: AppMode::Interactive,
                    frontend_mode: FrontendMode::Port,
                    envs: Default::default(),
                    arguments: q.args.clone(),
                    open_to_public,
                    allowed_client_ips: allowed,
                    port: None,
                    subdomain: None,
                    user_id: user,
                    endpoint_id: None,
                    runtime_variant: None,
                    route_info: vec![route],
                    session_ids: vec![q.session_id],
                    created_at: None,
                    updated_at: None,
                    // `create_circuit` decides it.
                    upstream_reuse: None,
                };
                // At most `[limits] max_circuits_per_session` live circuits per session,
                // decided by the store in the insert itself (a reuse above never counts).
                let limit = Some((q.session_id, state.config.limits.max_circuits_per_session));
                let (circuit, worker, under_way) = match create_circuit(
                    &state,
                    template.clone(),
                    &request,
                    limit,
                    store_turn.as_mut(),
                )
                .await
                {
                    // Circuits on workers that are gone serve nobody: they are
                    // withdrawn rather than counted, and the creation tried again
                    // (still under the key's turn: nothing was stored).
                    Err(ApiError::SessionCircuitLimit(_))
                        if withdraw_dead_circuits(&state, q.session_id).await? > 0 =>
                    {
                        create_circuit(&state, template, &request, limit, store_turn.as_mut())
                            .await?
                    }
                    created => created?,
                };
                // Acknowledged: settled in the store (its mark of a creation under way
                // cleared) before the caller is answered with it; nothing after this
                // can fail the answer. That write failing fails the creation: the
                // circuit is withdrawn.
                under_way.settle_stored().await?;
                (circuit, false, worker)
            }
        })
    }
    .await;
    // Given back whatever the outcome, if still held (a creation gives it back as
    // soon as its circuit is stored; a failure before that, such as no worker or
    // the session's limit, leaves it held): a turn dropped would close its
    // connection rather than give it back to the pool.
    if let Some(turn) = store_turn.as_mut() {
        turn.give_back().await;
    }
    let (circuit, reuse, worker) = outcome?;
    let mut claims =
        json!({"id": q.token, "version": "v2", "redirect": q.redirect, "circuit": circuit.id});
    // At most a year (a larger value, up to u64::MAX, wrapped into the past), on
    // the store's clock: the one the workers that check `exp` share (NTP), not this
    // coordinator's, which may run behind or ahead of them by more than the ttl.
    let ttl = state
        .config
        .coordinator
        .setup_link_ttl_secs
        .min(MAX_SETUP_LINK_TTL_SECS);
    if ttl > 0 {
        let ahead = state.store.clock_ahead().await.unwrap_or(0.0);
        let now = (appproxy_shared::jwt::now_epoch() + ahead).max(0.0) as u64;
        claims["exp"] = json!(now.saturating_add(ttl));
    }
    let setup = appproxy_shared::jwt::sign_hs256(&claims, &state.config.secrets.jwt_secret);
    let tls = worker.https();
    let scheme = if tls { "https" } else { "http" };
    let host = &worker.hostname;
    let url = match worker.api_port.unwrap_or(80) {
        80 if !tls => format!("{scheme}://{host}/setup?token={setup}"),
        443 if tls => format!("{scheme}://{host}/setup?token={setup}"),
        port => format!("{scheme}://{host}:{port}/setup?token={setup}"),
    };
    let wants_json = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"));
    if wants_json {
        // As the original: `reuse` is reported false for TCP circuits.
        let reuse = reuse && circuit.protocol != appproxy_shared::model::ProxyProtocol::Tcp;
        Ok((
            StatusCode::OK,
            [
                ("access-control-allow-origin", "*"),
                ("access-control-expose-headers", "*"),
            ],
            Json(json!({"redirect_url": url, "reuse": reuse})),
        )
            .into_response())
    } else {
        Ok((StatusCode::PERMANENT_REDIRECT, [("location", url)]).into_response())
    }
}

/// `GET /v2/proxy/{token}/{session_id}/add` (deprecated): where to call
/// `/v2/proxy/auth` with the same query.
/// The token is a bearer capability: the logged path never shows it
/// (`appproxy_shared::middleware::shown_path`), and a path whose token or session
/// ID is no UUID is refused without repeating either.
pub(super) async fn proxy_add(
    Extract(state): Extract<Arc<State>>,
    path: Result<axum::extract::Path<(String, String)>, axum::extract::rejection::PathRejection>,
    uri: axum::http::Uri,
) -> Response {
    let ids = path.ok().and_then(|axum::extract::Path((token, session))| {
        Some((
            uuid::Uuid::parse_str(&token).ok()?,
            uuid::Uuid::parse_str(&session).ok()?,
        ))
    });
    let Some((token, session_id)) = ids else {
        return ApiError::BadRequest(
            "invalid path: the token and the session ID must be UUIDs".into(),
        )
        .into_response();
    };
    let query = uri.query().map(|q| format!("{q}&")).unwrap_or_default();
    let base = state
        .config
        .coordinator
        .advertised_url
        .trim_end_matches('/');
    (
        [
            ("access-control-allow-origin", "*"),
            ("access-control-expose-headers", "*"),
        ],
        Json(json!({"code": 200, "url": format!("{base}/v2/proxy/auth?{query}token={token}&session_id={session_id}")})),
    )
        .into_response()
}

/// How many workers (or ports) one creation tries before it gives up.
pub(super) const PLACEMENT_ATTEMPTS: usize = 4;

/// Marks a circuit as a creation under way from just before it is stored until it
/// has its outcome (acknowledged and answered, or withdrawn). Dropped before that —
/// the caller gave up and its request was cancelled mid-wait, the store did not
/// answer in time, or what the caller had to do after the acknowledgement failed
/// ([`Creating::withdraw`]) — it withdraws the circuit in a task of its own, under
/// the request's ID, through [`withdraw_until_done`]: nobody got an answer with
/// it, and left stored it would be reused, deployed by a fetch or held for ever
/// without any acknowledgement. Taken before the insert, it also covers an insert
/// still in flight: one the database commits after its caller stopped waiting.
///
/// This is the process's own record; the store keeps one too (the circuit's row
/// is marked under way by its insert until [`Creating::settle_stored`] clears it),
/// which other coordinators read before they hand the circuit out, and by which
/// the leader's sweep withdraws what a process that stopped left undone.
pub(super) struct Creating {
    state: Arc<State>,
    circuit: uuid::Uuid,
    settled: bool,
    /// Whether the insert came back stored (else it may still commit).
    stored: bool,
    /// Whether a withdrawal was tried here and failed (the task waits before it
    /// tries again).
    failed_once: bool,
    /// What the withdrawal logs.
    why: String,
    /// The creating request's ID (a drop happens outside its polls).
    request_id: Option<appproxy_shared::RequestId>,
}

impl Creating {
    fn new(state: &Arc<State>, circuit: uuid::Uuid) -> Self {
        state.creating().insert(circuit);
        Self {
            state: state.clone(),
            circuit,
            settled: false,
            stored: false,
            failed_once: false,
            why: "creation abandoned by its caller; circuit withdrawn".to_owned(),
            request_id: appproxy_shared::current_request_id(),
        }
    }

    /// The creation has its outcome (its announcement acknowledged and its caller
    /// answered, the circuit withdrawn, or its insert refused: nothing stored).
    /// A success is settled in the store first ([`Creating::settle_stored`], or
    /// the endpoint row's write that clears the mark too).
    pub(super) fn settled(mut self) {
        self.settled = true;
    }

    /// The creation succeeded (acknowledged; its caller is answered next): its
    /// mark of a creation under way is cleared in the store, then it is settled.
    /// The circuit gone meanwhile (removed by a call, or by the sweep once its
    /// mark was past): 409, as a removal during the acknowledgement's wait. The
    /// store failing the write: the creation fails as any other after its
    /// acknowledgement (the circuit withdrawn, a first try before the answer).
    pub(super) async fn settle_stored(self) -> Result<(), ApiError> {
        match self.state.store.settle_creation(self.circuit).await {
            Ok(true) => {
                self.settled();
                Ok(())
            }
            Ok(false) => {
                tracing::info!(circuit = %self.circuit, "circuit removed before its creation was settled");
                self.state.metrics.observed.creations.add("removed", 1);
                self.settled();
                Err(ApiError::CircuitRemoved)
            }
            Err(e) => {
                self.withdraw_now(format!(
                    "creation not settled (the store failed: {e}); its circuit is withdrawn"
                ))
                .await;
                Err(e.into())
            }
        }
    }

    /// The insert's outcome is unknown (the store did not answer in time): whatever
    /// it may still commit is withdrawn.
    fn withdraw_unknown(mut self) {
        self.why =
            "circuit store did not answer in time; whatever it commits is withdrawn".to_owned();
    }

    /// The circuit is withdrawn (it was stored, and acknowledged or not): what had
    /// to follow its creation failed. The withdrawal runs in a task of its own and
    /// tries again until it is made; the circuit stays a creation under way (no
    /// answer to another request) until then.
    pub(super) fn withdraw(mut self, why: impl Into<String>) {
        self.why = why.into();
    }

    /// [`Creating::withdraw`] after a try the store failed (counted): the background
    /// withdrawal waits its back-off before its first try.
    fn withdraw_after_a_failed_try(mut self, why: impl Into<String>) {
        self.state
            .metrics
            .withdrawal_retries
            .fetch_add(1, Ordering::Relaxed);
        self.failed_once = true;
        self.withdraw(why);
    }

    /// [`Creating::withdraw`], its first try made before this returns: the caller,
    /// answered after, leaves the circuit gone unless the store failed that try
    /// (the withdrawal then goes on in the background, as with `withdraw`).
    pub(super) async fn withdraw_now(self, why: String) {
        let (state, circuit) = (self.state.clone(), self.circuit);
        match state.remove_circuit(circuit).await {
            Ok(_) => {
                tracing::warn!(%circuit, "{why}");
                self.settled();
            }
            Err(e) => {
                tracing::warn!(
                    %circuit, error = %e,
                    "circuit not withdrawn: the store failed; withdrawing it in the background"
                );
                self.withdraw_after_a_failed_try(why);
            }
        }
    }
}

impl Drop for Creating {
    fn drop(&mut self) {
        if self.settled {
            self.state.creating().remove(&self.circuit);
            return;
        }
        // (No runtime: the process is going down; nothing to withdraw with.)
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (state, circuit) = (self.state.clone(), self.circuit);
        let why = std::mem::take(&mut self.why);
        let (in_flight, failed_once) = (!self.stored, self.failed_once);
        runtime.spawn(appproxy_shared::scope(self.request_id, async move {
            tracing::warn!(%circuit, "{why}");
            withdraw_until_done(&state, circuit, in_flight, failed_once).await;
            state.creating().remove(&circuit);
        }));
    }
}

/// The first wait before a failed withdrawal is tried again; each next one is
/// twice as long, up to [`WITHDRAWAL_BACKOFF_MAX`].
const WITHDRAWAL_BACKOFF_FIRST: std::time::Duration = std::time::Duration::from_secs(1);

/// The longest wait between two tries of a withdrawal.
const WITHDRAWAL_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// Removes a circuit whose creation failed or was given up (and tells its worker),
/// trying again — after 1 s, then twice as long each time up to 30 s — for as long
/// as the process runs, until the removal is made or the circuit is found gone.
/// Each try is one [`State::remove_circuit`], whose store calls are each bounded by
/// the store's deadline and whose event by Redis' call timeout. With
/// `insert_in_flight` the circuit's insert may still commit: a first "not stored"
/// is looked at again once PostgreSQL's statement timeout has ended that insert
/// (an insert the server started before its deadline ends within it, counted
/// from when the store answers again; SQLite's one connection runs it before
/// this removal). `failed_once`: a try was just made
/// and failed; the first one here waits its back-off. Logged under the caller's
/// request ID (the task runs in its scope).
async fn withdraw_until_done(
    state: &State,
    circuit: uuid::Uuid,
    insert_in_flight: bool,
    failed_once: bool,
) {
    let mut backoff = WITHDRAWAL_BACKOFF_FIRST;
    // Counted from the first "not stored": a store that was down (or frozen) may
    // run the insert only once it is back.
    let mut look_again =
        insert_in_flight.then_some(STATEMENT_TIMEOUT + std::time::Duration::from_secs(1));
    let mut tries: u64 = 0;
    if failed_once {
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(WITHDRAWAL_BACKOFF_MAX);
    }
    loop {
        tries += 1;
        match state.remove_circuit(circuit).await {
            Ok(true) => {
                if tries > 1 || failed_once {
                    tracing::info!(%circuit, tries, "circuit withdrawn after the store failed");
                }
                return;
            }
            Ok(false) => match look_again.take() {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return,
            },
            Err(e) => {
                state
                    .metrics
                    .withdrawal_retries
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    %circuit, error = %e, tries, retry_in_ms = backoff.as_millis() as u64,
                    "circuit not withdrawn yet; trying again"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(WITHDRAWAL_BACKOFF_MAX);
            }
        }
    }
}

/// The session's circuit to reuse, found by `reusable`, with its worker: only one
/// whose worker is `ALIVE`. A circuit another request is still creating is no
/// answer yet, on this coordinator or another (its mark in the store,
/// [`State::creation_of`]): its outcome is awaited (it may be withdrawn), then
/// looked up again; one still marked past its bound is withdrawn, never reused.
/// A circuit on a worker that is gone (`LOST` by the heartbeat check, deregistered,
/// `TERMINATED`, its row deleted) would send the user to a dead address until idle
/// collection: it is withdrawn under this request's ID (its removal logged and
/// announced as any other) and the next candidate looked at; with none, the caller
/// creates a new circuit under the same reuse-key turn. So is a circuit its worker,
/// as registered now, no longer serves ([`placement::unserved`]: a port outside a
/// narrowed port range). Before anything is created or an orphaned creation
/// withdrawn in its place, the reuse key's turn in the store is taken and the
/// circuits looked at once more under it; it is returned with the outcome, for the
/// caller's creation to give back once its circuit is stored ([`KeyTurn`]). A
/// creation under way found under the turn is waited for without it. A reuse of
/// a settled circuit takes no turn.
async fn reuse_on_alive_worker<F, Fut>(
    state: &Arc<State>,
    reusable: F,
    key: &str,
) -> Result<(Option<(Circuit, WorkerRegistration)>, KeyTurn), ApiError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Option<Circuit>, ApiError>>,
{
    // Each turn either waits out a creation or withdraws a circuit; bounded all
    // the same, past which a new circuit is created. The waits for another
    // coordinator's creations share one deadline, within the reuse key's turn.
    let deadline = tokio::time::Instant::now() + state.foreign_creation_wait();
    // A call that is about to create (it found nothing, or a creation under way
    // that then went: withdrawn, or past its mark) decides what is created under
    // the key's turn in the store, held until its new circuit is stored, and
    // looks once more under it: of the calls on several coordinators that found
    // nothing at the same moment, or met the same orphaned creation (each polling
    // its mark, each seeing it pass at the same moment), one creates (and
    // withdraws the orphan), the others wait for the turn and then find its
    // circuit under way — and wait, as for any creation, until it is settled,
    // having given the turn back. Before, only the second case took the turn, and
    // two nodes asked for a new key at once each created a circuit. A reuse of a
    // settled circuit never takes it.
    let mut turn = KeyTurn::new(key);
    for _ in 0..REUSE_LOOKS {
        let Some(c) = reusable().await? else {
            if !turn.decided() {
                turn.take(state).await?;
                continue;
            }
            return Ok((None, turn));
        };
        // A creation under way is waited for without the turn: its creator may
        // need it again (to replace an unacknowledged attempt), and a pooled
        // connection held for a whole acknowledgement's wait would let a hung
        // worker stall other creations. Taken again should it come to nothing.
        if turn.is_held() && under_way(state, c.id).await? {
            turn.give_back().await;
        }
        match state.creation_of(c.id, deadline).await? {
            super::Found::Settled => {}
            super::Found::LookAgain => continue,
            super::Found::Overdue => {
                if !turn.decided() {
                    turn.take(state).await?;
                    continue;
                }
                let caller = appproxy_shared::current_request_id();
                let (withdrawn, origin) = state
                    .remove_overdue_creation_as_origin(c.id, || {
                        tracing::info!(
                            circuit = %c.id,
                            withdrawn_by_request_id = caller.as_ref().map(|r| r.as_str()).unwrap_or(""),
                            "circuit of a creation never settled withdrawn by a later call for its key"
                        );
                    })
                    .await;
                tracing::warn!(
                    circuit = %c.id,
                    origin_request_id = origin.as_ref().map(|r| r.as_str()).unwrap_or(""),
                    "the circuit's creation was never settled (it failed, and its coordinator stopped before withdrawing it); withdrawn instead of reused"
                );
                withdrawn?;
                continue;
            }
        }
        let worker = match c.worker {
            Some(w) => state.store.worker(w).await?,
            None => None,
        };
        match worker {
            Some(w) if w.status == "ALIVE" => {
                let Some(why) =
                    placement::unserved(&w.registration, c.port, c.subdomain.as_deref())
                else {
                    return Ok((Some((c, w.registration)), turn));
                };
                tracing::warn!(
                    circuit = %c.id,
                    worker = w.registration.authority.as_str(),
                    "the circuit's worker no longer serves it ({why}); withdrawn instead of reused"
                );
                state.remove_circuit(c.id).await?;
            }
            gone => {
                tracing::warn!(
                    circuit = %c.id,
                    worker = gone.as_ref().map(|w| w.registration.authority.as_str()).unwrap_or(""),
                    status = gone.as_ref().map(|w| w.status.as_str()).unwrap_or("absent"),
                    "the circuit's worker is gone; withdrawn instead of reused"
                );
                state.remove_circuit(c.id).await?;
            }
        }
    }
    Ok((None, turn))
}

/// Whether `circuit` is a creation still under way, on this coordinator or another
/// (its mark in the store), as of now.
async fn under_way(state: &State, circuit: uuid::Uuid) -> Result<bool, ApiError> {
    Ok(state.is_creating(circuit)
        || matches!(
            state.store.creation_mark(circuit).await?,
            Some(super::store::CreationMark::UnderWay)
        ))
}

/// A `/v2/proxy/auth` call's turn at its reuse key in the store, across every
/// coordinator ([`store::Store::reuse_turn`]). Held only while the call changes
/// what the key's circuits are: from its look that found nothing to reuse (or an
/// orphaned creation to withdraw) until its new circuit's row, marked as a
/// creation under way, is stored; and again from the withdrawal of an attempt its
/// worker did not acknowledge until the next attempt's row is stored (or the
/// creation gives up). A call on another coordinator that takes the turn and looks
/// again thus always finds the circuit under way, never the moment between two,
/// and waits for it without the turn. Never held through an acknowledgement's
/// wait: a worker that hangs would hold every turn a coordinator may have for that
/// long, and stall its other creations.
pub(super) struct KeyTurn {
    key: String,
    held: Option<super::store::ReuseTurn>,
    /// Not had in time once: the call went on alone, and takes it no more.
    alone: bool,
}

impl KeyTurn {
    fn new(key: &str) -> Self {
        Self {
            key: key.to_owned(),
            held: None,
            alone: false,
        }
    }

    fn is_held(&self) -> bool {
        self.held.is_some()
    }

    /// Whether the call may create: it holds the turn, or went on alone.
    fn decided(&self) -> bool {
        self.held.is_some() || self.alone
    }

    /// Takes the turn unless held or given up on, waited for as long as its holder
    /// may take; past it, the call goes on alone (logged).
    async fn take(&mut self, state: &State) -> Result<(), ApiError> {
        if self.decided() {
            return Ok(());
        }
        self.held = state
            .store
            .reuse_turn(&self.key, state.reuse_turn_wait())
            .await?;
        if self.held.is_none() {
            self.alone = true;
            tracing::warn!("no turn at the reuse key in the store in time (a creation for the same session and app on another coordinator still runs, or this one has as many under way as it may); going on alone");
        }
        Ok(())
    }

    /// Gives the turn back, if held (it can be taken again).
    pub(super) async fn give_back(&mut self) {
        if let Some(turn) = self.held.take() {
            turn.end().await;
        }
    }
}

/// How many candidates a reuse looks at before creating anew.
const REUSE_LOOKS: usize = 16;

/// Withdraws the session's interactive circuits whose worker is not `ALIVE`, or
/// no longer serves them ([`placement::unserved`]) (the ones `[limits]
/// max_circuits_per_session` counts), under this request's ID; returns how many
/// were withdrawn. Called when a creation met the limit: a session whose worker
/// died or shrank must not be refused new apps until idle collection.
async fn withdraw_dead_circuits(
    state: &Arc<State>,
    session: uuid::Uuid,
) -> Result<usize, ApiError> {
    let alive: std::collections::HashMap<uuid::Uuid, WorkerRegistration> = state
        .store
        .workers()
        .await?
        .into_iter()
        .filter(|w| w.status == "ALIVE")
        .map(|w| (w.id, w.registration))
        .collect();
    let mut withdrawn = 0;
    for (c, _) in state.store.circuits_of_session(session).await? {
        // What the store's limit counts: every circuit of the session not made for
        // an endpoint, whatever its mode.
        let counted = c.endpoint_id.is_none();
        let served = c
            .worker
            .and_then(|w| alive.get(&w))
            .is_some_and(|w| placement::unserved(w, c.port, c.subdomain.as_deref()).is_none());
        if !counted || served || state.is_creating(c.id) {
            continue;
        }
        tracing::warn!(
            circuit = %c.id,
            "the circuit's worker is gone or no longer serves it; withdrawn to make room"
        );
        if state.remove_circuit(c.id).await? {
            withdrawn += 1;
        }
    }
    Ok(withdrawn)
}

/// Places, stores and announces a circuit built from `template`, then waits for the
/// worker's acknowledgement when events flow. A slot raced by a concurrent creation
/// is placed again. A worker that does not acknowledge in time has its breaker opened
/// (placement skips it for a back-off; creations still waiting on it stop waiting)
/// and the creation is placed again on another eligible worker, within this call; a
/// circuit the worker could not listen for is placed again on another port. Every
/// circuit that is not acknowledged is removed again (nothing is left half-done); when
/// no attempt succeeds the answer is 503 `E10001` naming the cause. With
/// `session_limit = Some((session, n))` (n > 0) the store refuses the insert once the
/// session holds `n` live circuits: 429 `E10004`, nothing stored. A `turn` held
/// (a reuse key's, [`KeyTurn`]) is given back as soon as a circuit is stored, and
/// taken again before an unacknowledged attempt is withdrawn for another; on a
/// failure it may be left held, for the caller to give back.
pub(super) async fn create_circuit(
    state: &Arc<State>,
    mut template: Circuit,
    request: &placement::Request<'_>,
    session_limit: Option<(uuid::Uuid, u32)>,
    mut turn: Option<&mut KeyTurn>,
) -> Result<(Circuit, WorkerRegistration, Creating), ApiError> {
    // Who may reuse its app connections, decided here for every creation
    // (interactive and endpoint) and stored with it: workers follow the circuit's
    // value over their own `[upstream] reuse`.
    if template.upstream_reuse.is_none() {
        template.upstream_reuse = state
            .config
            .circuits
            .upstream_reuse_for(template.app.as_deref());
    }
    // Workers that failed this creation, and (worker, port) slots that could not listen.
    let mut avoid_workers: Vec<uuid::Uuid> = Vec::new();
    let mut avoid_ports: Vec<(uuid::Uuid, u16)> = Vec::new();
    let mut last_error = None;
    for attempt in 0..PLACEMENT_ATTEMPTS {
        // A coordinator stopping places nothing more: a circuit stored and
        // announced now would only be withdrawn again within the drain.
        if state.acks.is_stopping() {
            return Err(ApiError::Stopping);
        }
        if attempt > 0 {
            state
                .metrics
                .placement_retries
                .fetch_add(1, Ordering::Relaxed);
        }
        let (circuit, worker_body, under_way) = match place_and_store(
            state,
            &template,
            request,
            &avoid_workers,
            &avoid_ports,
            session_limit,
        )
        .await
        {
            Ok(placed) => placed,
            // Nowhere left to go after a failure: the failure is the answer.
            Err(ApiError::NoWorker) if last_error.is_some() => break,
            Err(e) => return Err(e),
        };
        // Stored, marked under way: a call on another coordinator now finds it and
        // waits for it. The turn is not held through the acknowledgement's wait.
        if let Some(turn) = turn.as_deref_mut() {
            turn.give_back().await;
        }
        match announce(
            state,
            &circuit,
            &worker_body,
            under_way,
            turn.as_deref_mut(),
        )
        .await
        {
            Ok(under_way) => return Ok((circuit, worker_body, under_way)),
            Err(Retry::Elsewhere(e)) => {
                avoid_workers.extend(circuit.worker);
                last_error = Some(e);
            }
            Err(Retry::OtherPort(e)) => {
                if let (Some(w), Some(p)) = (circuit.worker, circuit.port) {
                    avoid_ports.push((w, p));
                } else {
                    avoid_workers.extend(circuit.worker);
                }
                last_error = Some(e);
            }
            Err(Retry::No(e)) => return Err(e),
        }
    }
    Err(last_error.unwrap_or(ApiError::NoWorker))
}

/// Why an announced circuit was withdrawn, and whether another placement may work.
enum Retry {
    /// The worker is unresponsive: try another worker.
    Elsewhere(ApiError),
    /// The worker could not listen on the port: try another port (or worker).
    OtherPort(ApiError),
    /// Retrying cannot help (the event bus is down, the store failed).
    No(ApiError),
}

/// Places the circuit on an eligible worker (breaker closed or half-open, not in
/// `avoid_workers`) and stores it; a slot raced by a concurrent creation is placed
/// again. The stored circuit comes with its creation marked as under way.
async fn place_and_store(
    state: &Arc<State>,
    template: &Circuit,
    request: &placement::Request<'_>,
    avoid_workers: &[uuid::Uuid],
    avoid_ports: &[(uuid::Uuid, u16)],
    session_limit: Option<(uuid::Uuid, u32)>,
) -> Result<(Circuit, WorkerRegistration, Creating), ApiError> {
    // The manager's ID, or NULL: the coordinator never makes one up.
    let origin = appproxy_shared::current_request_id();
    let mut attempt = 0;
    // Workers found full by their port read though their count said otherwise
    // (filled meanwhile, or a count an outside write put wrong): not chosen again
    // for this creation, so the next best is.
    let mut found_full: Vec<uuid::Uuid> = Vec::new();
    loop {
        attempt += 1;
        let mut attempt_request = request.clone();
        if attempt > 1 || !avoid_ports.is_empty() {
            attempt_request.spread = Some(uuid::Uuid::new_v4().as_u64_pair().0);
        }
        // Only `ALIVE` workers can take a circuit: the rows of workers long gone are
        // not read.
        let mut workers = state.store.alive_workers().await?;
        // Workers no longer `ALIVE` (deregistered, lost, through any coordinator):
        // the ports they could not listen on are forgotten.
        if state.failed_ports.workers() > 0 {
            let alive: std::collections::HashSet<uuid::Uuid> =
                workers.iter().map(|w| w.id).collect();
            state.failed_ports.retain_workers(|id| alive.contains(id));
        }
        let before = workers.len();
        workers.retain(|w| {
            !avoid_workers.contains(&w.id)
                && !found_full.contains(&w.id)
                && state.breakers.admits_after(
                    &w.registration.authority,
                    super::access::parse_rfc3339(&w.updated_at),
                )
        });
        if workers.len() < before {
            tracing::debug!(
                skipped = before - workers.len(),
                "workers skipped by placement (breaker open or failed this creation)"
            );
        }
        // Only what placement can use, by index and bounded by the port ranges:
        // how many ports each port worker has in use (a count, no port read), to
        // rank them; then the slots of the one worker chosen — its used ports, or
        // whoever holds the wanted subdomain. A slot taken meanwhile is caught by
        // the unique indexes and placed again.
        let ranges: Vec<(uuid::Uuid, u16, u16)> = workers
            .iter()
            .filter(|w| w.registration.frontend_mode != FrontendMode::Wildcard)
            .filter_map(|w| placement::port_range(&w.registration).map(|(lo, hi)| (w.id, lo, hi)))
            .collect();
        let in_use = state.store.used_port_counts(&ranges).await?;
        // Ports to avoid count as taken: those inside their worker's range and not
        // in use already (each a lookup on the index; a few at most, after a worker
        // could not listen).
        let mut avoided: std::collections::HashMap<uuid::Uuid, Vec<u16>> = Default::default();
        for &(w, p) in avoid_ports {
            let inside = ranges
                .iter()
                .any(|&(id, lo, hi)| id == w && (lo..=hi).contains(&p));
            let counted = avoided.get(&w).is_some_and(|ports| ports.contains(&p));
            if inside && !counted && state.store.used_ports(w, p, p).await?.is_empty() {
                avoided.entry(w).or_default().push(p);
            }
        }
        let free = |w: &super::store::WorkerRow, lo: u16, hi: u16| {
            let taken = in_use.get(&w.id).copied().unwrap_or(0)
                + avoided.get(&w.id).map_or(0, |ports| ports.len() as u64);
            (u64::from(hi) - u64::from(lo) + 1).saturating_sub(taken)
        };
        // Ports a worker could not listen on lately (an earlier creation's
        // acknowledgement, remembered by this process) are offered last: ranked
        // first as if taken (no index read: one also in use counts twice, which
        // can only rank its worker lower), and when that leaves no worker, as they
        // are. The chosen worker's slot takes one of them only when no other port
        // of it is free.
        let recent: std::collections::HashMap<uuid::Uuid, Vec<u16>> = ranges
            .iter()
            .map(|&(w, lo, hi)| (w, state.failed_ports.avoided(w, lo, hi)))
            .filter(|(_, ports)| !ports.is_empty())
            .collect();
        let free_of_recent = |w: &super::store::WorkerRow, lo: u16, hi: u16| {
            let shunned = recent.get(&w.id).map_or(0, |ports| {
                let hard = avoided.get(&w.id);
                ports
                    .iter()
                    .filter(|p| hard.is_none_or(|h| !h.contains(p)))
                    .count() as u64
            });
            free(w, lo, hi).saturating_sub(shunned)
        };
        let chosen = if recent.is_empty() {
            None
        } else {
            placement::choose(&workers, free_of_recent, &attempt_request)
        };
        let chosen = match chosen {
            Some(w) => w,
            None => {
                placement::choose(&workers, free, &attempt_request).ok_or(ApiError::NoWorker)?
            }
        };
        let mut taken = Used::default();
        if chosen.registration.frontend_mode == FrontendMode::Wildcard {
            let wanted_subdomain = request
                .preferred_subdomain
                .unwrap_or(request.default_subdomain);
            taken.subdomains = state
                .store
                .used_slots(&[], wanted_subdomain)
                .await?
                .into_iter()
                .filter(|(w, _, _)| *w == chosen.id)
                .filter_map(|(_, _, sub)| sub)
                .collect();
        } else if let Some((lo, hi)) = placement::port_range(&chosen.registration) {
            taken.ports = state.store.used_ports(chosen.id, lo, hi).await?;
            taken.ports.extend(
                avoid_ports
                    .iter()
                    .filter(|(w, _)| *w == chosen.id)
                    .map(|(_, p)| *p),
            );
            taken.avoid = recent.get(&chosen.id).cloned().unwrap_or_default();
            if !taken.avoid.is_empty() {
                tracing::debug!(
                    worker = %chosen.registration.authority, ports = ?taken.avoid,
                    "ports the worker could not listen on lately: offered only if no other is free"
                );
            }
        }
        let Some(Placement {
            worker,
            port,
            subdomain,
        }) = placement::slot(chosen, &taken, &attempt_request, || {
            uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
        })
        else {
            // Its free ports were taken between the count and the read: placed again,
            // elsewhere.
            found_full.push(chosen.id);
            if attempt < 16 {
                tracing::debug!(attempt, "the chosen worker filled meanwhile; placing again");
                continue;
            }
            return Err(ApiError::NoWorker);
        };
        let registration = chosen.registration.clone();
        let now = super::store::now();
        let mut circuit = template.clone();
        circuit.id = uuid::Uuid::new_v4();
        circuit.worker = Some(worker);
        circuit.port = port;
        circuit.frontend_mode = if subdomain.is_some() {
            FrontendMode::Wildcard
        } else {
            FrontendMode::Port
        };
        circuit.subdomain = subdomain;
        circuit.created_at = Some(now.clone());
        circuit.updated_at = Some(now);
        // The request's trace context goes with the stored circuit, as it goes with
        // the event: a worker that finds the circuit by a fetch deploys it under a
        // child of the same span.
        let trace = appproxy_shared::middleware::current_trace_context();
        let under_way = Creating::new(state, circuit.id);
        // Marked in the store as a creation under way (renewed by this node while
        // it runs, `jobs::renew_creations`): no other coordinator hands it out
        // before its outcome, and should this process stop before it settles or
        // withdraws it, the leader's sweep withdraws it once the mark is past.
        let inserted = state
            .store
            .insert_creating_circuit(
                &circuit,
                origin.as_ref().map(|i| i.as_str()),
                trace.as_ref(),
                session_limit,
                state.creation_bound(),
            )
            .await;
        match inserted {
            Ok(()) => {
                let mut under_way = under_way;
                under_way.stored = true;
                return Ok((circuit, registration, under_way));
            }
            Err(StoreError::SessionLimit(limit)) => {
                // Refused by the store: nothing was stored.
                under_way.settled();
                tracing::info!(
                    session = ?session_limit.map(|(s, _)| s), limit,
                    "session at its circuit limit; nothing created"
                );
                return Err(ApiError::SessionCircuitLimit(limit));
            }
            Err(e) if e.is_unavailable() => {
                under_way.withdraw_unknown();
                return Err(e.into());
            }
            Err(StoreError::Conflict(why)) if attempt < 16 => {
                under_way.settled();
                // An endpoint has one circuit: another request made it meanwhile,
                // and no other slot would be free of that. The caller answers with
                // that circuit.
                if let Some(endpoint) = template.endpoint_id {
                    if state.store.circuit_of_endpoint(endpoint).await?.is_some() {
                        return Err(StoreError::Conflict(why).into());
                    }
                }
                tracing::debug!(%why, attempt, "slot taken meanwhile; placing again");
            }
            Err(e) => {
                under_way.settled();
                return Err(e.into());
            }
        }
    }
}

/// Tells the circuit's worker and waits for its acknowledgement (when events flow).
/// Anything but an acknowledgement withdraws the circuit.
///
/// Acknowledged, the creation is still under way until its caller settles it
/// (`under_way` comes back); withdrawn, it is settled here, or left to a withdrawal
/// that tries again when the store failed it. Withdrawn for another attempt, the
/// reuse key's `turn` is taken first ([`KeyTurn`]): between the withdrawal and
/// the next attempt's insert, a call on another coordinator would find nothing
/// and create a circuit of its own.
async fn announce(
    state: &State,
    circuit: &Circuit,
    worker: &WorkerRegistration,
    under_way: Creating,
    turn: Option<&mut KeyTurn>,
) -> Result<Creating, Retry> {
    let origin = appproxy_shared::current_request_id();
    let authority = worker.authority.clone();
    state
        .metrics
        .circuits_created
        .fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        circuit = %circuit.id, worker = %authority, port = circuit.port, subdomain = circuit.subdomain.as_deref(),
        origin_request_id = origin.as_ref().map(|i| i.as_str()).unwrap_or(""), "circuit created"
    );
    let wait = state.ack_timeout();
    let ack = state.acks_expected().then(|| {
        state.breakers.begin(&authority, wait);
        state.acks.expect(circuit.id, &authority)
    });
    let published = std::time::Instant::now();
    let delivered = state
        .publish(CircuitEvent {
            kind: EventKind::Created,
            authority: authority.clone(),
            circuits: vec![circuit.clone()],
            request_id: origin,
            span: appproxy_shared::current_span(),
        })
        .await;
    let observed = &state.metrics.observed;
    let Some(waiter) = ack else {
        observed.creations.add("created", 1);
        return Ok(under_way);
    };
    // Nobody got the event, so nobody will answer: no wait (the waiter leaves).
    let outcome = if delivered {
        waiter.wait(wait).await
    } else {
        drop(waiter);
        observed.creations.add("event_not_published", 1);
        state.breakers.end_trial(&authority);
        withdraw(
            state,
            circuit,
            &authority,
            "the event could not be published",
            under_way,
        )
        .await?;
        return Err(Retry::No(ApiError::WorkerNotResponding {
            authority,
            cause: "redis",
        }));
    };
    let retry = match outcome {
        AckOutcome::Deployed => {
            if let (Some(w), Some(p)) = (circuit.worker, circuit.port) {
                state.failed_ports.deployed(w, p);
            }
            observed.creations.add("created", 1);
            observed
                .ack_latency
                .get(&authority)
                .observe(published.elapsed());
            tracing::info!(circuit = %circuit.id, worker = %authority, "worker acknowledged");
            return Ok(under_way);
        }
        AckOutcome::Removed => {
            under_way.settled();
            return Err(removed_meanwhile(state, circuit, &authority));
        }
        // Removed through another coordinator (whose hub this creation is not in):
        // the worker owed nothing, so nothing is held against it.
        AckOutcome::TimedOut if matches!(state.store.circuit(circuit.id).await, Ok(None)) => {
            under_way.settled();
            return Err(removed_meanwhile(state, circuit, &authority));
        }
        AckOutcome::TimedOut => {
            state.metrics.ack_timeouts.fetch_add(1, Ordering::Relaxed);
            observed.creations.add("ack_timeout", 1);
            observed.ack_timeouts.add(&authority, 1);
            match state.breakers.missed(&authority, published) {
                crate::breaker::Miss::Tripped(backoff) => {
                    state.metrics.breaker_trips.fetch_add(1, Ordering::Relaxed);
                    let stopped = state.acks.trip(&authority);
                    tracing::warn!(
                        worker = %authority, backoff_ms = backoff.as_millis() as u64, waiting = stopped,
                        "worker did not acknowledge: skipped by placement for the back-off"
                    );
                }
                crate::breaker::Miss::AlreadyOpen => {
                    tracing::info!(worker = %authority, "worker did not acknowledge: already skipped by placement (the same outage)")
                }
                crate::breaker::Miss::NotItsFault => {
                    tracing::info!(worker = %authority, "the event was lost while the worker resubscribed")
                }
            }
            tracing::warn!(circuit = %circuit.id, worker = %authority, "worker did not acknowledge; circuit withdrawn");
            retake(state, turn).await;
            withdraw(
                state,
                circuit,
                &authority,
                "no acknowledgement in time",
                under_way,
            )
            .await?;
            Retry::Elsewhere(ApiError::WorkerNotResponding {
                authority,
                cause: "worker",
            })
        }
        AckOutcome::Stopping => {
            observed.creations.add("stopping", 1);
            state.breakers.end_trial(&authority);
            withdraw(
                state,
                circuit,
                &authority,
                "the coordinator is stopping",
                under_way,
            )
            .await?;
            Retry::No(ApiError::Stopping)
        }
        // Its last node deregistered: no timeout of the worker's, nothing held
        // against it; placed elsewhere.
        AckOutcome::WorkerLeft => {
            observed.creations.add("worker_left", 1);
            state.breakers.end_trial(&authority);
            retake(state, turn).await;
            withdraw(state, circuit, &authority, "the worker left", under_way).await?;
            Retry::Elsewhere(ApiError::WorkerNotResponding {
                authority,
                cause: "worker",
            })
        }
        AckOutcome::WorkerTripped => {
            state.metrics.ack_timeouts.fetch_add(1, Ordering::Relaxed);
            observed.creations.add("worker_tripped", 1);
            observed.ack_timeouts.add(&authority, 1);
            retake(state, turn).await;
            withdraw(
                state,
                circuit,
                &authority,
                "the worker stopped acknowledging",
                under_way,
            )
            .await?;
            Retry::Elsewhere(ApiError::WorkerNotResponding {
                authority,
                cause: "worker",
            })
        }
        AckOutcome::Failed {
            reason: why,
            listen,
        } => {
            observed.creations.add("deploy_failed", 1);
            state
                .metrics
                .deploy_failures
                .fetch_add(1, Ordering::Relaxed);
            state.breakers.end_trial(&authority);
            tracing::warn!(circuit = %circuit.id, worker = %authority, reason = %why, listen, "worker could not deploy the circuit");
            // A port the worker could not listen on is not offered to it again for a
            // while, unless no other port of it is free: the next creations do not try
            // it first. A circuit the worker refused (an app host it could not
            // resolve, say) marks no port: its port is as good as any.
            if let (true, Some(w), Some(p)) = (listen, circuit.worker, circuit.port) {
                state.failed_ports.failed(w, p);
            }
            retake(state, turn).await;
            withdraw(
                state,
                circuit,
                &authority,
                "the worker could not deploy it",
                under_way,
            )
            .await?;
            Retry::OtherPort(ApiError::WorkerNotResponding {
                authority,
                cause: "deploy",
            })
        }
    };
    Err(retry)
}

/// Takes the reuse key's turn again, if the creation has one, before an attempt is
/// withdrawn for another ([`announce`]). Not had (in time, or the store failing),
/// the withdrawal goes on all the same.
async fn retake(state: &State, turn: Option<&mut KeyTurn>) {
    if let Some(turn) = turn {
        if let Err(e) = turn.take(state).await {
            tracing::warn!(error = %e, "no turn at the reuse key in the store to replace an attempt; going on alone");
        }
    }
}

/// The circuit was removed while its creation waited for the acknowledgement: the
/// creation ends, answered 409, and the worker is not blamed (its breaker's trial,
/// if any, ends as if it had answered nothing yet).
fn removed_meanwhile(state: &State, circuit: &Circuit, authority: &str) -> Retry {
    state.metrics.observed.creations.add("removed", 1);
    state.breakers.end_trial(authority);
    tracing::info!(circuit = %circuit.id, worker = %authority, "circuit removed while its creation awaited the acknowledgement");
    Retry::No(ApiError::CircuitRemoved)
}

/// Removes an unacknowledged circuit and tells its worker. When the store fails
/// the removal, the creation's answer stays that failure (503), and the circuit is
/// left to a withdrawal of its own that tries again until it is made
/// ([`withdraw_until_done`]): the answer does not wait for the store to come back,
/// and the circuit is not left stored (to be deployed by a worker's fetch) once it
/// does.
async fn withdraw(
    state: &State,
    circuit: &Circuit,
    authority: &str,
    why: &str,
    under_way: Creating,
) -> Result<(), Retry> {
    match state.remove_circuit(circuit.id).await {
        Ok(_) => {
            tracing::warn!(circuit = %circuit.id, worker = %authority, reason = why, "circuit withdrawn");
            under_way.settled();
            Ok(())
        }
        Err(e) => {
            tracing::warn!(
                circuit = %circuit.id, worker = %authority, reason = why, error = %e,
                "circuit not withdrawn: the store failed; withdrawing it in the background"
            );
            under_way.withdraw_after_a_failed_try(format!(
                "withdrawing the circuit of a failed creation ({why}) once the store answers"
            ));
            Err(Retry::No(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lax_port;
    use serde_json::json;

    /// Ports as pydantic's lax `int` takes them; the range is checked after.
    #[test]
    fn ports_are_read_as_the_originals_model_reads_them() {
        for (v, want) in [
            (json!(80), Some(80)),
            (json!("80"), Some(80)),
            (json!(" 8080 "), Some(8080)),
            (json!(80.0), Some(80)),
            (json!(0), Some(0)),
            (json!(70000), Some(70000)),
            (json!(80.5), None),
            (json!(-1), None),
            (json!(-1.0), None),
            (json!("80a"), None),
            (json!("-80"), None),
            (json!("+80"), None),
            (json!(""), None),
            (json!("123456"), None),
            (json!(null), None),
            (json!([80]), None),
        ] {
            assert_eq!(lax_port(&v), want, "{v}");
        }
    }
}
