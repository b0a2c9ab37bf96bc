//! The control agent (managed mode): a thread running a tokio current-thread runtime
//! that registers this worker with its coordinator, heartbeats, and keeps every core's
//! route table equal to the coordinator's circuit set for this worker:
//!
//! - it reads the whole set at start (page by page, no size ceiling), then only what
//!   changed: events carry their circuits, and every `poll_interval_ms` (and after
//!   every (re)subscription) it asks what changed since the revision it deployed —
//!   a few bytes when nothing did, so a dropped subscription loses nothing and an
//!   idle poll costs nothing however many circuits exist;
//! - only new, changed and removed circuits go to the cores, each checked on its own
//!   (one bad circuit is refused and reported, the rest deploy), under the request ID
//!   that caused it (the event's, or the creating request's `origin_request_id`), so
//!   one ID links the manager's call, the coordinator, Redis and every core's
//!   "deployment applied";
//! - once every core applied a set, the circuits an event announced are acknowledged
//!   (`appproxy_worker_circuit_added_event`), which the coordinator waits for;
//! - the cores' per-circuit request counts become last-access marks (Redis keys of
//!   the original), one batch per flush interval.
//!
//! The coordinator is either remote ([`Link::Remote`]: HTTP API, Redis events when
//! `[redis] url` is set) or in this process ([`Link::Embedded`], single-node mode: no
//! HTTP, no Redis — the coordinator's events feed the bridge directly).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use appproxy_control::coordinator::access::AccessMark;
use appproxy_control::coordinator::events::EventKind;
use appproxy_control::coordinator::State as Coordinator;
use appproxy_shared::model::Circuit;
use appproxy_shared::{IdVersion, RequestId};
use crossbeam_channel::Receiver;
use serde::Deserialize as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::config::{Config, Frontend, ResolvedCircuit};
use crate::worker::Deployer;

/// Why a coordinator call failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Not an `http://host:port` URL.
    #[error("[coordinator] url {0:?} must look like http://host:port")]
    Url(String),
    /// The connection failed.
    #[error("coordinator unreachable: {0}")]
    Io(#[from] std::io::Error),
    /// Not a valid HTTP response, or not JSON.
    #[error("coordinator answered something unreadable")]
    Response,
    /// A non-2xx status.
    #[error("coordinator answered {0}: {1}")]
    Status(u16, String),
    /// The embedded coordinator could not start.
    #[error("embedded coordinator: {0}")]
    Embedded(String),
    /// The embedded coordinator's store failed.
    #[error("embedded coordinator store: {0}")]
    Store(#[from] appproxy_control::coordinator::store::StoreError),
}

/// A minimal JSON-over-HTTP/1.1 client for the coordinator's API. With several
/// coordinators (an HA pair, or a name resolving to several addresses) it keeps using
/// the one that last answered and moves on to the next when it cannot connect.
pub struct Client {
    /// `host:port` of each coordinator, in the configured order.
    authorities: Vec<String>,
    /// The one that answered last.
    current: std::sync::atomic::AtomicUsize,
    /// The shared API secret.
    secret: String,
    /// This node's ID among the worker's HA nodes.
    node: String,
}

impl Client {
    /// `urls`: one URL, or several separated by commas.
    fn new(urls: &str, secret: String) -> Result<Self, AgentError> {
        let mut authorities = Vec::new();
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let rest = url
                .strip_prefix("http://")
                .ok_or_else(|| AgentError::Url(url.into()))?;
            let authority = rest.trim_end_matches('/').to_owned();
            if authority.is_empty() || authority.contains('/') {
                return Err(AgentError::Url(url.into()));
            }
            authorities.push(authority);
        }
        if authorities.is_empty() {
            return Err(AgentError::Url(urls.into()));
        }
        Ok(Self {
            authorities,
            current: Default::default(),
            secret,
            node: String::new(),
        })
    }

    /// A connection to a coordinator: the one that answered last first, then the
    /// others in order; each address a name resolves to is tried, each attempt
    /// bounded.
    async fn connect(&self) -> Result<(tokio::net::TcpStream, &str), AgentError> {
        use std::sync::atomic::Ordering;
        let n = self.authorities.len();
        let start = self.current.load(Ordering::Relaxed) % n;
        let mut last = None;
        for i in (0..n).map(|k| (start + k) % n) {
            let authority = &self.authorities[i];
            let addrs = match tokio::time::timeout(
                Duration::from_secs(3),
                tokio::net::lookup_host(authority.as_str()),
            )
            .await
            {
                Ok(Ok(a)) => a.collect::<Vec<_>>(),
                Ok(Err(e)) => {
                    last = Some(e);
                    continue;
                }
                Err(_) => {
                    last = Some(std::io::ErrorKind::TimedOut.into());
                    continue;
                }
            };
            for addr in addrs {
                match tokio::time::timeout(
                    Duration::from_secs(3),
                    tokio::net::TcpStream::connect(addr),
                )
                .await
                {
                    Ok(Ok(stream)) => {
                        if i != start {
                            tracing::info!(coordinator = %authority, "switched to another coordinator");
                        }
                        self.current.store(i, Ordering::Relaxed);
                        return Ok((stream, authority));
                    }
                    Ok(Err(e)) => last = Some(e),
                    Err(_) => last = Some(std::io::ErrorKind::TimedOut.into()),
                }
            }
        }
        Err(AgentError::Io(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no coordinator address")
        })))
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, AgentError> {
        let raw = self.call_raw(method, path, body).await?;
        serde_json::from_slice(&raw).map_err(|_| AgentError::Response)
    }

    /// One exchange; the body of a 2xx answer.
    async fn call_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Vec<u8>, AgentError> {
        let (mut stream, authority) = self.connect().await?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        // The coordinator records our calls under their own ID, as the original does.
        let id = RequestId::generate(IdVersion::V4);
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nX-BackendAI-Token: {}\r\nX-Backend-Request-ID: {id}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            authority,
            self.secret,
            body.len()
        );
        let mut raw = Vec::new();
        let exchanged = tokio::time::timeout(Duration::from_secs(10), async {
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(body.as_bytes()).await?;
            stream.take(16 << 20).read_to_end(&mut raw).await
        })
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
        if let Err(e) = exchanged {
            // Connected but silent (hung) or cut off: the next call starts with the
            // next coordinator.
            self.current
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(e.into());
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(n)) = resp.parse(&raw) else {
            return Err(AgentError::Response);
        };
        let status = resp.code.unwrap_or(0);
        if !(200..300).contains(&status) {
            let text = String::from_utf8_lossy(&raw[n..]);
            return Err(AgentError::Status(status, text.chars().take(300).collect()));
        }
        raw.drain(..n);
        Ok(raw)
    }
}

/// A page of this worker's set or what changed in it, as the coordinator answers
/// `GET /api/worker/{id}/circuits?since=…` and `?after=…`.
#[derive(Debug, Default, serde::Deserialize)]
struct SetAnswer {
    revision: u64,
    #[serde(default)]
    resync: bool,
    #[serde(default)]
    circuits: Vec<Circuit>,
    #[serde(default)]
    origins: HashMap<uuid::Uuid, String>,
    #[serde(default)]
    removed: Vec<uuid::Uuid>,
    #[serde(default)]
    more: bool,
    #[serde(default)]
    next: Option<uuid::Uuid>,
}

impl SetAnswer {
    /// Reads an answer straight into the model; when some circuit in it does not
    /// read, the others still do (that one is logged and left out).
    fn parse(raw: &[u8]) -> Result<Self, AgentError> {
        if let Ok(answer) = serde_json::from_slice::<Self>(raw) {
            return Ok(answer);
        }
        let v: serde_json::Value = serde_json::from_slice(raw).map_err(|_| AgentError::Response)?;
        let ids = |v: &serde_json::Value| -> Vec<uuid::Uuid> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().and_then(|s| uuid::Uuid::parse_str(s).ok()))
                .collect()
        };
        Ok(Self {
            revision: v["revision"].as_u64().ok_or(AgentError::Response)?,
            resync: v["resync"].as_bool().unwrap_or(false),
            circuits: read_circuits(&v["circuits"]),
            origins: v["origins"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, o)| Some((uuid::Uuid::parse_str(k).ok()?, o.as_str()?.to_owned())))
                .collect(),
            removed: ids(&v["removed"]),
            more: v["more"].as_bool().unwrap_or(false),
            next: v["next"]
                .as_str()
                .and_then(|s| uuid::Uuid::parse_str(s).ok()),
        })
    }

    /// The circuits with their creating requests.
    fn with_origins(&mut self) -> Vec<(Circuit, Option<RequestId>)> {
        let origins = std::mem::take(&mut self.origins);
        std::mem::take(&mut self.circuits)
            .into_iter()
            .map(|c| {
                let origin = origins
                    .get(&c.id)
                    .and_then(|o| RequestId::parse(o.as_bytes()).ok());
                (c, origin)
            })
            .collect()
    }
}

/// The coordinator this agent follows.
#[derive(Clone)]
pub enum Link {
    /// Over HTTP, with Redis events and acknowledgements when `[redis] url` is set.
    Remote(Arc<Client>),
    /// In this process (single-node mode).
    Embedded(Arc<Coordinator>),
}

/// One reason to look at the circuit set again.
#[derive(Debug, Default)]
struct Wake {
    /// The request that caused it (an event's metadata).
    request_id: Option<RequestId>,
    /// The deployment's span: a child of the coordinator's (the event's
    /// `traceparent`), else derived from `request_id`.
    span: Option<appproxy_shared::trace::SpanContext>,
    /// Circuits announced as created: acknowledged once every core has them.
    created: Vec<uuid::Uuid>,
    /// What the event changed, when it says (then no fetch is needed); `None` for a
    /// poll, a (re)subscription or a missed event: fetch the whole set.
    delta: Option<Delta>,
    /// A (re)subscription: events published meanwhile were lost, so once the set is
    /// deployed every circuit of it is acknowledged (a creation still waiting gets its
    /// answer) — an empty acknowledgement tells the coordinator the worker hears
    /// events again.
    resync: bool,
}

/// A change an event carries.
#[derive(Debug)]
enum Delta {
    /// Circuits created or updated, with the ID of the request that caused it.
    Upsert(Vec<Circuit>, Option<RequestId>),
    /// Circuits removed.
    Remove(Vec<uuid::Uuid>),
}

impl Delta {
    fn of(kind: &EventKind, circuits: Vec<Circuit>, request_id: Option<RequestId>) -> Self {
        match kind {
            EventKind::Removed => Delta::Remove(circuits.iter().map(|c| c.id).collect()),
            EventKind::Created | EventKind::RouteUpdated => Delta::Upsert(circuits, request_id),
        }
    }
}

/// Starts the agent thread when the worker is managed. With `embedded` (a
/// coordinator config), the coordinator is started inside it first; its address is
/// returned once it listens. Errors are configs or ports that cannot work.
pub fn spawn(
    config: Config,
    embedded: Option<appproxy_control::config::CoordinatorConfig>,
    deployer: Deployer,
    marks: Option<Receiver<Vec<(uuid::Uuid, u64)>>>,
) -> Result<Agent, AgentError> {
    let coordinator = config.coordinator.clone().unwrap_or_default();
    let remote = match (&coordinator.url, &embedded) {
        (Some(url), None) => Some(Client {
            node: node_id(&config),
            ..Client::new(url, config.secrets.api_secret.clone().unwrap_or_default())?
        }),
        (None, Some(_)) => None,
        (None, None) => {
            return Ok(Agent {
                coordinator: None,
                stop: None,
                done: None,
            })
        }
        (Some(_), Some(_)) => {
            return Err(AgentError::Embedded(
                "[coordinator] url and embedded are both set".into(),
            ))
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Option<SocketAddr>, AgentError>>();
    std::thread::Builder::new()
        .name("appproxy-agent".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(AgentError::Io(e)));
                    return;
                }
            };
            rt.block_on(async move {
                let (link, addr) = match (remote, embedded) {
                    (Some(client), _) => (Link::Remote(Arc::new(client)), None),
                    (None, Some(cc)) => {
                        match appproxy_control::coordinator::Coordinator::bind(&cc).await {
                            Ok(c) => {
                                let state = c.state.clone();
                                let addr = c.addr;
                                tokio::spawn(async move {
                                    if let Err(e) = c.run(std::future::pending()).await {
                                        tracing::error!(error = %e, "embedded coordinator stopped");
                                    }
                                });
                                (Link::Embedded(state), Some(addr))
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(AgentError::Embedded(format!("{e:#}"))));
                                return;
                            }
                        }
                    }
                    (None, None) => return,
                };
                let _ = ready_tx.send(Ok(addr));
                run(config, link, deployer, marks, stop_rx).await;
                let _ = done_tx.send(());
            });
        })?;
    let coordinator = ready_rx
        .recv()
        .map_err(|_| AgentError::Embedded("the agent thread exited during start-up".into()))??;
    Ok(Agent {
        coordinator,
        stop: Some(stop_tx),
        done: Some(done_rx),
    })
}

/// The running agent.
pub struct Agent {
    /// The embedded coordinator's API address (single-node mode).
    pub coordinator: Option<SocketAddr>,
    /// Asks the agent to deregister and stop (dropping it does not).
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Told once the agent has stopped.
    done: Option<std::sync::mpsc::Receiver<()>>,
}

impl Agent {
    /// Deregisters this worker from the coordinator (one HA node fewer; at none it is
    /// `LOST`, so no new circuit is placed here) and stops; waits at most 5 s.
    pub fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.recv_timeout(Duration::from_secs(5));
        }
    }
}

/// This node's name among the HA nodes of one worker authority: the machine (its
/// `/etc/machine-id`, else its host name) and the worker's listening addresses. Stable
/// across restarts, so a crashed and restarted process counts once; distinct for two
/// processes serving the same authority.
fn node_id(config: &Config) -> String {
    let machine = std::fs::read_to_string("/etc/machine-id")
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname"))
        .unwrap_or_default();
    let machine: String = machine
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(64)
        .collect();
    let w = &config.worker;
    format!(
        "{machine}-{}-{}",
        w.api_port.map_or(0, |p| p),
        w.port_range.map_or(0, |r| r[0])
    )
}

impl Link {
    /// This node's ID, as a query value (it is made of URL-safe characters).
    fn node(&self) -> &str {
        match self {
            Link::Remote(c) => &c.node,
            Link::Embedded(_) => "",
        }
    }

    async fn register(&self, body: &serde_json::Value) -> Result<String, AgentError> {
        match self {
            Link::Remote(c) => c.call("PUT", "/api/worker?brief=true", Some(body)).await?["id"]
                .as_str()
                .map(str::to_owned)
                .ok_or(AgentError::Response),
            Link::Embedded(state) => Ok(state.register_local_worker(body).await?.to_string()),
        }
    }

    async fn heartbeat(&self, id: &str) -> Result<(), AgentError> {
        match self {
            Link::Remote(c) => c
                .call(
                    "PATCH",
                    &format!("/api/worker/{id}?node={}&brief=true", self.node()),
                    None,
                )
                .await
                .map(|_| ()),
            Link::Embedded(state) => {
                let id = uuid::Uuid::parse_str(id).map_err(|_| AgentError::Response)?;
                state.local_heartbeat(id).await?;
                Ok(())
            }
        }
    }

    async fn deregister(&self, id: &str) -> Result<(), AgentError> {
        match self {
            Link::Remote(c) => c
                .call(
                    "DELETE",
                    &format!("/api/worker/{id}?node={}", self.node()),
                    None,
                )
                .await
                .map(|_| ()),
            Link::Embedded(state) => {
                let id = uuid::Uuid::parse_str(id).map_err(|_| AgentError::Response)?;
                state.store.deregister_worker(id).await?;
                Ok(())
            }
        }
    }

    /// What changed in this worker's set after revision `since`, or the whole set
    /// (read page by page: no size ceiling) when `since` is `None` or the coordinator
    /// no longer remembers that far back. Each circuit comes with the ID of the
    /// request that created it.
    async fn fetch(&self, id: &str, since: Option<u64>) -> Result<Fetched, AgentError> {
        if let Some(since) = since {
            let mut revision = since;
            let mut upserts = Vec::new();
            let mut removed = Vec::new();
            // A long absence is read in a few bounded answers, each from where the
            // last one stopped.
            for _ in 0..MAX_ANSWERS {
                match self.changes(id, revision).await? {
                    Answer::Resync => return self.whole(id).await,
                    Answer::Changes {
                        revision: r,
                        upserts: u,
                        removed: d,
                        more,
                    } => {
                        revision = r;
                        upserts.extend(u.into_iter().map(Some));
                        removed.extend(d);
                        if !more {
                            break;
                        }
                    }
                }
            }
            let mut changes: Vec<CircuitChange> = upserts
                .into_iter()
                .flatten()
                .map(|(c, o): (Circuit, Option<RequestId>)| (c.id, Some((c, o))))
                .collect();
            changes.extend(removed.into_iter().map(|id| (id, None)));
            return Ok(Fetched {
                revision: Some(revision),
                whole: false,
                changes,
            });
        }
        self.whole(id).await
    }

    /// The whole set, page by page, at the revision of its first page (what changes
    /// while the pages are read is asked for from that revision next time).
    async fn whole(&self, id: &str) -> Result<Fetched, AgentError> {
        let mut after: Option<uuid::Uuid> = None;
        let mut revision = None;
        let mut changes = Vec::new();
        for _ in 0..MAX_PAGES {
            let (r, page, next) = self.page(id, after).await?;
            revision.get_or_insert(r);
            changes.extend(page.into_iter().map(|(c, o)| (c.id, Some((c, o)))));
            match next {
                Some(n) if Some(n) != after => after = Some(n),
                _ => break,
            }
        }
        Ok(Fetched {
            revision: Some(revision.unwrap_or(0)),
            whole: true,
            changes,
        })
    }

    /// One answer to "what changed after `since`".
    async fn changes(&self, id: &str, since: u64) -> Result<Answer, AgentError> {
        let origin = |s: Option<&str>| s.and_then(|s| RequestId::parse(s.as_bytes()).ok());
        match self {
            Link::Remote(c) => {
                let raw = c
                    .call_raw(
                        "GET",
                        &format!("/api/worker/{id}/circuits?since={since}"),
                        None,
                    )
                    .await?;
                let mut answer = SetAnswer::parse(&raw)?;
                if answer.resync {
                    return Ok(Answer::Resync);
                }
                Ok(Answer::Changes {
                    revision: answer.revision,
                    upserts: answer.with_origins(),
                    removed: std::mem::take(&mut answer.removed),
                    more: answer.more,
                })
            }
            Link::Embedded(state) => {
                let id = uuid::Uuid::parse_str(id).map_err(|_| AgentError::Response)?;
                match state.local_changes(id, since).await? {
                    appproxy_control::coordinator::store::Changes::Resync { .. } => {
                        Ok(Answer::Resync)
                    }
                    appproxy_control::coordinator::store::Changes::Since {
                        revision,
                        upserts,
                        removed,
                        more,
                    } => Ok(Answer::Changes {
                        revision,
                        upserts: upserts
                            .into_iter()
                            .map(|(c, o)| (c, origin(o.as_deref())))
                            .collect(),
                        removed,
                        more,
                    }),
                }
            }
        }
    }

    /// One page of the whole set: its revision, its circuits, where the next starts.
    async fn page(
        &self,
        id: &str,
        after: Option<uuid::Uuid>,
    ) -> Result<(u64, Vec<(Circuit, Option<RequestId>)>, Option<uuid::Uuid>), AgentError> {
        let origin = |s: Option<&str>| s.and_then(|s| RequestId::parse(s.as_bytes()).ok());
        match self {
            Link::Remote(c) => {
                let after_text = after.map(|a| a.to_string()).unwrap_or_default();
                let raw = c
                    .call_raw(
                        "GET",
                        &format!("/api/worker/{id}/circuits?after={after_text}&limit=5000"),
                        None,
                    )
                    .await?;
                let mut answer = SetAnswer::parse(&raw)?;
                Ok((answer.revision, answer.with_origins(), answer.next))
            }
            Link::Embedded(state) => {
                let id = uuid::Uuid::parse_str(id).map_err(|_| AgentError::Response)?;
                let (revision, page) = state.local_circuits_page(id, after).await?;
                let next = (page.len() >= appproxy_control::coordinator::MAX_CIRCUITS_PER_ANSWER)
                    .then(|| page.last().map(|(c, _)| c.id))
                    .flatten();
                Ok((
                    revision,
                    page.into_iter()
                        .map(|(c, o)| (c, origin(o.as_deref())))
                        .collect(),
                    next,
                ))
            }
        }
    }
}

/// Most answers one change fetch reads before deploying what it has.
const MAX_ANSWERS: usize = 64;

/// Most pages one whole-set read takes (at 5,000 circuits a page).
const MAX_PAGES: usize = 10_000;

/// One answer of the coordinator to "what changed".
enum Answer {
    /// Only the whole set will do.
    Resync,
    /// What changed, up to `revision`; `more` when asking again gives more.
    Changes {
        revision: u64,
        upserts: Vec<(Circuit, Option<RequestId>)>,
        removed: Vec<uuid::Uuid>,
        more: bool,
    },
}

/// Circuits from a coordinator answer; unreadable ones are logged and left out.
fn read_circuits(list: &serde_json::Value) -> Vec<Circuit> {
    let list = list.as_array().map(Vec::as_slice).unwrap_or_default();
    let mut out = Vec::with_capacity(list.len());
    for c in list {
        match Circuit::deserialize(c) {
            Ok(circuit) => out.push(circuit),
            Err(e) => tracing::warn!(error = %e, "unreadable circuit skipped"),
        }
    }
    out
}

/// What a fetch brought: changes (`None`: removed) in order, and the revision they
/// bring the agent to; `whole` when it is the entire set (anything deployed and not
/// in it is gone).
struct Fetched {
    /// `None`: from events, which do not move the revision.
    revision: Option<u64>,
    whole: bool,
    changes: Vec<CircuitChange>,
}

/// One circuit's change: as it is now with its creating request, or `None` (removed).
type CircuitChange = (uuid::Uuid, Option<(Circuit, Option<RequestId>)>);

async fn run(
    config: Config,
    link: Link,
    deployer: Deployer,
    marks: Option<Receiver<Vec<(uuid::Uuid, u64)>>>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    // A dropped handle is not a stop request: only an explicit one is.
    let stopped = async {
        if stop.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(stopped);
    let coordinator = config.coordinator.clone().unwrap_or_default();
    let w = &config.worker;
    let registration = serde_json::json!({
        "authority": w.authority,
        "frontend_mode": w.frontend_mode,
        "protocol": "http",
        "hostname": w.hostname.clone().unwrap_or_else(|| w.bind_host.to_string()),
        "tls_listen": w.tls_listen,
        "tls_advertised": w.tls_advertised,
        "api_port": w.api_port,
        "port_range": w.port_range,
        "wildcard_domain": w.wildcard_domain,
        "wildcard_traffic_port": w.wildcard_traffic_port,
        "accepted_traffics": ["interactive", "inference"],
        "filtered_apps_only": false,
        "node_id": node_id(&config),
    });
    let worker_id = loop {
        match link.register(&registration).await {
            Ok(id) => break id,
            Err(e) => tracing::warn!(error = %e, "worker registration failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    tracing::info!(worker_id = %worker_id, "registered with the coordinator");
    let redis_url = config
        .redis
        .as_ref()
        .and_then(|t| t.get("url"))
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let (wake_tx, mut wake_rx) = tokio::sync::mpsc::unbounded_channel::<Wake>();
    match (&link, &redis_url) {
        (Link::Embedded(state), _) => {
            tokio::spawn(follow_local(state.clone(), w.authority.clone(), wake_tx));
        }
        (Link::Remote(_), Some(url)) => {
            tokio::spawn(subscribe(url.clone(), w.authority.clone(), wake_tx));
        }
        (Link::Remote(_), None) => {}
    }
    let mut redis = RedisLink::new(redis_url.as_deref());
    let mut poll =
        tokio::time::interval(Duration::from_millis(coordinator.poll_interval_ms.max(50)));
    let mut heartbeat =
        tokio::time::interval(Duration::from_secs(coordinator.heartbeat_secs.max(1)));
    let mut flush = tokio::time::interval(Duration::from_millis(
        coordinator.access_flush_ms.clamp(100, 60_000),
    ));
    // A tick missed while a deployment or a call ran is not made up at once: the
    // next one comes a whole period later.
    for t in [&mut poll, &mut heartbeat, &mut flush] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let apply_timeout = Duration::from_millis(coordinator.apply_timeout_ms.max(100));
    let mut state = Deployed::default();
    loop {
        let mut wake = tokio::select! {
            _ = &mut stopped => {
                match tokio::time::timeout(Duration::from_secs(3), link.deregister(&worker_id)).await {
                    Ok(Ok(())) => tracing::info!(worker_id = %worker_id, "deregistered from the coordinator"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "deregistration failed"),
                    Err(_) => tracing::warn!("deregistration timed out"),
                }
                return;
            }
            _ = poll.tick() => Wake::default(),
            Some(wake) = wake_rx.recv() => wake,
            _ = heartbeat.tick() => {
                if let Err(e) = link.heartbeat(&worker_id).await {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
                continue;
            }
            _ = flush.tick() => {
                if let Some(rx) = &marks {
                    write_marks(&link, &mut redis, &state, rx).await;
                }
                continue;
            }
        };
        // Events that queued up meanwhile are served by the same fetch and deployment:
        // under a burst of creations the agent deploys once per batch, not per event.
        let mut batched = 1;
        let mut deltas: Option<Vec<Delta>> = wake.delta.take().map(|d| vec![d]);
        while let Ok(more) = wake_rx.try_recv() {
            batched += 1;
            if more.request_id != wake.request_id {
                wake.request_id = None;
                wake.span = None;
            }
            wake.resync |= more.resync;
            wake.created.extend(more.created);
            deltas = match (deltas, more.delta) {
                (Some(mut list), Some(d)) => {
                    list.push(d);
                    Some(list)
                }
                _ => None,
            };
        }
        if batched > 1 {
            tracing::debug!(events = batched, "events batched into one deployment");
        }
        // Events that say what changed are applied as they are; anything else (poll,
        // resubscription, missed events) asks the coordinator what changed since the
        // revision deployed — a few bytes when nothing did.
        let fetched = match deltas {
            Some(deltas) => Fetched::of_deltas(deltas),
            // Once an hour the whole set is read again, whatever the revision says: a
            // store restored from a backup may reach the same revision with other
            // contents.
            None => match link
                .fetch(
                    &worker_id,
                    state.revision.filter(|_| {
                        state
                            .last_whole
                            .is_some_and(|at| at.elapsed() < WHOLE_SET_EVERY)
                    }),
                )
                .await
            {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(error = %e, "circuit fetch failed");
                    continue;
                }
            },
        };
        let applied = appproxy_shared::with_request_context(None, wake.span, || {
            apply(&config, &deployer, fetched, &mut state, wake.request_id)
        });
        state.forget_old();
        if wake.created.is_empty() && !wake.resync {
            continue;
        }
        // Acknowledge what the event announced once every core has it (it may have
        // arrived with an earlier poll: the acknowledgement is still owed), each
        // circuit as deployed or failed (its frontend could not listen, or this
        // worker refused it).
        let mut deployment = None;
        let mut failed = Vec::new();
        if let Some((applied, id)) = applied {
            let outcome = tokio::task::spawn_blocking(move || applied.outcome(apply_timeout))
                .await
                .ok()
                .flatten();
            match outcome {
                Some(f) => failed = f,
                None => {
                    appproxy_shared::with_request_id(Some(id), || {
                        tracing::warn!(
                            "not every core applied the deployment in time; not acknowledging"
                        );
                    });
                    continue;
                }
            }
            deployment = Some(id);
        }
        // After a resubscription, what was deployed lately may have been announced
        // while the events were lost: those creations still wait for an answer.
        let owed: Vec<uuid::Uuid> = if wake.resync {
            let mut ids = state.recent_ids();
            ids.extend(wake.created.iter().copied());
            ids
        } else {
            std::mem::take(&mut wake.created)
        };
        for id in &owed {
            if let Some(why) = state.refused.get(id) {
                if !failed.iter().any(|(f, _)| f == id) {
                    failed.push((*id, why.clone()));
                }
            }
        }
        let failed: Vec<(uuid::Uuid, String)> = failed
            .into_iter()
            .filter(|(id, _)| owed.contains(id))
            .collect();
        let present: Vec<Circuit> = owed
            .iter()
            .filter(|id| !failed.iter().any(|(f, _)| f == *id))
            .filter_map(|id| state.circuits.get(id).map(|c| c.circuit.clone()))
            .collect();
        if !present.is_empty() || !failed.is_empty() || wake.resync {
            // A batch has no single request: it is acknowledged under its deployment's
            // own ID, and each circuit's creating request travels with it.
            let id = wake
                .request_id
                .or(deployment)
                .unwrap_or_else(|| RequestId::generate(IdVersion::V4));
            appproxy_shared::scope_traced(
                Some(id),
                wake.span,
                acknowledge(
                    &link,
                    &mut redis,
                    &w.authority,
                    present,
                    failed,
                    &state.origins,
                ),
            )
            .await;
        }
    }
}

/// What this worker has deployed, indexed so that a change costs what it changes.
#[derive(Default)]
struct Deployed {
    /// The deployed circuits, resolved, by ID (shared with every core).
    circuits: HashMap<uuid::Uuid, Arc<ResolvedCircuit>>,
    /// Which circuit holds each frontend (a port or a subdomain).
    frontends: HashMap<Frontend, uuid::Uuid>,
    /// The request that created each recent circuit, when known (what an
    /// acknowledgement names; forgotten with [`Deployed::recent`]).
    origins: HashMap<uuid::Uuid, RequestId>,
    /// Circuits this worker could not take, with why (reported as failed).
    refused: HashMap<uuid::Uuid, String>,
    /// Circuits deployed lately, oldest first: acknowledged again after a
    /// resubscription (their announcement may have been lost).
    recent: std::collections::VecDeque<(uuid::Uuid, std::time::Instant)>,
    /// The coordinator's revision of the set deployed; `None` before the first fetch.
    revision: Option<u64>,
    /// When the whole set was last read.
    last_whole: Option<std::time::Instant>,
}

/// How long a deployed circuit counts as recent ([`Deployed::recent`]): longer than
/// any coordinator waits for an acknowledgement.
const RECENT: Duration = Duration::from_secs(60);

/// How often the whole set is read again although the revision says nothing
/// changed.
const WHOLE_SET_EVERY: Duration = Duration::from_secs(3600);

/// Most per-circuit "deployed in a batch" lines a whole-set read writes.
const MAX_BATCH_LINES: usize = 64;

/// Origins kept beyond the recent circuits' before they are swept.
const ORIGINS_SLACK: usize = 4_096;

impl Deployed {
    /// Forgets what is no longer recent: the circuits deployed more than [`RECENT`]
    /// ago and their creating requests (memory stays per recent creation, not per
    /// circuit).
    fn forget_old(&mut self) {
        let now = std::time::Instant::now();
        while let Some((id, at)) = self.recent.front().copied() {
            if now.duration_since(at) <= RECENT {
                break;
            }
            self.recent.pop_front();
            self.origins.remove(&id);
        }
        // Origins of circuits deployed before they were announced, or never
        // deployed, go at the same pace.
        if self.origins.len() > self.recent.len() + ORIGINS_SLACK {
            let keep: std::collections::HashSet<uuid::Uuid> =
                self.recent.iter().map(|(id, _)| *id).collect();
            self.origins.retain(|id, _| keep.contains(id));
        }
    }

    /// The circuits deployed within [`RECENT`] that are still deployed.
    fn recent_ids(&mut self) -> Vec<uuid::Uuid> {
        self.forget_old();
        self.recent
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| self.circuits.contains_key(id))
            .collect()
    }
}

/// A lazily (re)connected Redis connection for acknowledgements and marks.
struct RedisLink {
    url: Option<String>,
    conn: Option<redis::aio::MultiplexedConnection>,
}

impl RedisLink {
    fn new(url: Option<&str>) -> Self {
        Self {
            url: url.map(str::to_owned),
            conn: None,
        }
    }

    async fn get(&mut self) -> Option<&mut redis::aio::MultiplexedConnection> {
        if self.conn.is_none() {
            let url = self.url.as_deref()?;
            let connected = async {
                let client = redis::Client::open(url)?;
                client.get_multiplexed_async_connection().await
            };
            match tokio::time::timeout(Duration::from_secs(3), connected).await {
                Ok(Ok(c)) => self.conn = Some(c),
                Ok(Err(e)) => tracing::warn!(error = %e, "redis unreachable"),
                Err(_) => tracing::warn!("redis unreachable: timed out"),
            }
        }
        self.conn.as_mut()
    }

    /// Forgets a connection that failed, so the next use reconnects.
    fn failed(&mut self) {
        self.conn = None;
    }
}

/// Tells the coordinator that every core has `circuits` and that `failed` could not
/// be deployed, with the creating request of each.
async fn acknowledge(
    link: &Link,
    redis: &mut RedisLink,
    authority: &str,
    circuits: Vec<Circuit>,
    failed: Vec<(uuid::Uuid, String)>,
    origins: &HashMap<uuid::Uuid, RequestId>,
) {
    use appproxy_shared::model::{
        BroadcastMessage, CircuitsEvent, EventMetadata, FailedCircuit, BROADCAST_CHANNEL,
        EVENT_WORKER_CIRCUIT_ADDED,
    };
    let n = circuits.len();
    let n_failed = failed.len();
    let origin_request_ids: std::collections::BTreeMap<uuid::Uuid, String> = circuits
        .iter()
        .map(|c| c.id)
        .chain(failed.iter().map(|(id, _)| *id))
        .filter_map(|id| origins.get(&id).map(|o| (id, o.to_string())))
        .collect();
    for (circuit, why) in &failed {
        appproxy_shared::with_request_id(origins.get(circuit).copied(), || {
            tracing::warn!(%circuit, reason = %why, "circuit not deployed: reported as failed");
        });
    }
    match link {
        Link::Embedded(state) => {
            state.settle(appproxy_control::coordinator::events::Acknowledgement {
                authority: authority.to_owned(),
                deployed: circuits.iter().map(|c| c.id).collect(),
                failed,
                origins: origin_request_ids.into_iter().collect(),
            })
        }
        Link::Remote(_) => {
            let mut body = CircuitsEvent::new(authority, circuits);
            body.failed = failed
                .into_iter()
                .map(|(id, reason)| FailedCircuit { id, reason })
                .collect();
            body.origin_request_ids = origin_request_ids;
            let meta = EventMetadata {
                request_id: appproxy_shared::current_request_id().map(Into::into),
                traceparent: appproxy_shared::current_span().map(|s| s.traceparent().to_string()),
                ..Default::default()
            };
            let Ok(msg) = BroadcastMessage::encode(
                EVENT_WORKER_CIRCUIT_ADDED,
                "appproxy-worker",
                &body,
                &meta,
            ) else {
                return;
            };
            let Ok(text) = serde_json::to_string(&msg) else {
                return;
            };
            // A connection gone stale (Redis restarted: "broken pipe") fails once: the
            // acknowledgement is sent again on a fresh one.
            let mut tries = 0;
            loop {
                tries += 1;
                let Some(conn) = redis.get().await else {
                    tracing::warn!("acknowledgement not sent: redis unreachable");
                    return;
                };
                let sent: redis::RedisResult<i64> = appproxy_control::coordinator::bounded(
                    redis::cmd("PUBLISH")
                        .arg(BROADCAST_CHANNEL)
                        .arg(&text)
                        .query_async(conn),
                )
                .await;
                match sent {
                    Ok(_) => break,
                    Err(e) => {
                        redis.failed();
                        if tries >= 2 {
                            tracing::warn!(error = %e, "acknowledgement not sent");
                            return;
                        }
                        tracing::info!(error = %e, "acknowledgement not sent; retrying once on a fresh connection");
                    }
                }
            }
        }
    }
    tracing::info!(circuits = n, failed = n_failed, "deployment acknowledged");
}

/// Gathers the cores' counts and writes them as last-access marks.
async fn write_marks(
    link: &Link,
    redis: &mut RedisLink,
    state: &Deployed,
    rx: &Receiver<Vec<(uuid::Uuid, u64)>>,
) {
    let mut counts: HashMap<uuid::Uuid, u64> = HashMap::new();
    for batch in rx.try_iter() {
        for (id, n) in batch {
            *counts.entry(id).or_insert(0) += n;
        }
    }
    if counts.is_empty() {
        return;
    }
    let now = appproxy_shared::jwt::now_epoch();
    let marks: Vec<AccessMark> = counts
        .into_iter()
        .map(|(circuit, requests)| AccessMark {
            circuit,
            sessions: state
                .circuits
                .get(&circuit)
                .map(|c| c.circuit.session_ids.clone())
                .unwrap_or_default(),
            requests,
            last_access: now,
        })
        .collect();
    match link {
        Link::Embedded(coordinator) => coordinator.record_access(&marks).await,
        Link::Remote(_) => {
            let Some(conn) = redis.get().await else {
                return;
            };
            let mut pipe = redis::pipe();
            appproxy_control::coordinator::access::add_marks(&mut pipe, &marks);
            if let Err(e) =
                appproxy_control::coordinator::bounded(pipe.query_async::<()>(conn)).await
            {
                tracing::warn!(error = %e, "last-access marks not written");
                redis.failed();
            }
        }
    }
}

/// Follows the embedded coordinator's events for this worker.
async fn follow_local(
    state: Arc<Coordinator>,
    authority: String,
    tx: tokio::sync::mpsc::UnboundedSender<Wake>,
) {
    use tokio::sync::broadcast::error::RecvError;
    let mut events = state.subscribe();
    loop {
        let wake = match events.recv().await {
            Ok(e) if e.authority == authority => Wake {
                request_id: e.request_id,
                span: e.span.map(|s| s.child()),
                created: if e.kind == EventKind::Created {
                    e.circuits.iter().map(|c| c.id).collect()
                } else {
                    Vec::new()
                },
                delta: Some(Delta::of(&e.kind, e.circuits, e.request_id)),
                resync: false,
            },
            Ok(_) => continue,
            // Missed some: look at the whole set again.
            Err(RecvError::Lagged(_)) => Wake::default(),
            Err(RecvError::Closed) => return,
        };
        if tx.send(wake).is_err() {
            return;
        }
    }
}

/// Listens on the coordinator's broadcast channel; every circuit event for this
/// worker (and every (re)connection, which may have missed some) asks for a fetch.
async fn subscribe(url: String, authority: String, tx: tokio::sync::mpsc::UnboundedSender<Wake>) {
    use appproxy_shared::model::EVENT_CIRCUIT_CREATED;
    appproxy_control::coordinator::events::follow_broadcast(
        &url,
        || {
            tracing::info!("subscribed to circuit events");
            tx.send(Wake {
                resync: true,
                ..Default::default()
            })
            .is_ok()
        },
        |envelope| {
            if envelope.source != "appproxy-coordinator" {
                return true;
            }
            let Ok(body) = serde_json::from_str::<serde_json::Value>(&envelope.payload) else {
                return true;
            };
            if body["target_worker_authority"].as_str() != Some(authority.as_str()) {
                return true;
            }
            let meta = envelope.metadata();
            let request_id = meta.request_id.and_then(|r| r.validated());
            let tp = meta.traceparent.as_deref().map(str::as_bytes);
            let span = (tp.is_some() || request_id.is_some())
                .then(|| appproxy_shared::trace::SpanContext::from_header(tp, request_id.as_ref()));
            let delta = event_delta(&envelope.name, &body, request_id);
            let created = if envelope.name == EVENT_CIRCUIT_CREATED {
                body["circuits"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["id"].as_str().and_then(|s| uuid::Uuid::parse_str(s).ok()))
                    .collect()
            } else {
                Vec::new()
            };
            appproxy_shared::with_request_context(request_id, span, || {
                tracing::info!(event = %envelope.name, "circuit event received");
            });
            tx.send(Wake {
                request_id,
                span,
                created,
                delta,
                resync: false,
            })
            .is_ok()
        },
    )
    .await;
}

/// The change a Redis event's body describes; `None` when it cannot be read (the
/// agent then fetches the whole set).
fn event_delta(
    name: &str,
    body: &serde_json::Value,
    request_id: Option<RequestId>,
) -> Option<Delta> {
    use appproxy_shared::model::{
        EVENT_CIRCUIT_CREATED, EVENT_CIRCUIT_REMOVED, EVENT_CIRCUIT_ROUTE_UPDATED,
    };
    let kind = match name {
        EVENT_CIRCUIT_CREATED => EventKind::Created,
        EVENT_CIRCUIT_REMOVED => EventKind::Removed,
        EVENT_CIRCUIT_ROUTE_UPDATED => EventKind::RouteUpdated,
        _ => return None,
    };
    let circuits: Vec<Circuit> = if kind == EventKind::RouteUpdated {
        let mut circuit: Circuit = serde_json::from_value(body["circuit"].clone()).ok()?;
        circuit.route_info = serde_json::from_value(body["routes"].clone()).ok()?;
        circuit.session_ids = circuit.route_info.iter().map(|r| r.session_id).collect();
        vec![circuit]
    } else {
        serde_json::from_value(body["circuits"].clone()).ok()?
    };
    Some(Delta::of(&kind, circuits, request_id))
}

impl Fetched {
    /// The changes events carried, in order; the revision stays (the next poll
    /// brings it up to date).
    fn of_deltas(deltas: Vec<Delta>) -> Self {
        let mut changes = Vec::new();
        for d in deltas {
            match d {
                Delta::Upsert(circuits, origin) => {
                    changes.extend(circuits.into_iter().map(|c| (c.id, Some((c, origin)))))
                }
                Delta::Remove(ids) => changes.extend(ids.into_iter().map(|id| (id, None))),
            }
        }
        Self {
            revision: None,
            whole: false,
            changes,
        }
    }
}

/// Whether two copies of a circuit route the same: equal but for the times the
/// store stamps (an event's copy and the stored one differ there, and a circuit
/// heard of both ways must deploy once).
fn same_circuit(a: &Circuit, b: &Circuit) -> bool {
    let untimed = |c: &Circuit| Circuit {
        created_at: None,
        updated_at: None,
        ..c.clone()
    };
    a.id == b.id && untimed(a) == untimed(b)
}

/// Turns what was fetched into a change for the cores — only the circuits that are
/// new, different or gone, each checked and resolved on its own — and sends it
/// under `preferred` (an event's request ID) when given. Costs what changed, not
/// what exists. Returns the deployment in flight and its ID, if any.
fn apply(
    config: &Config,
    deployer: &Deployer,
    fetched: Fetched,
    state: &mut Deployed,
    preferred: Option<RequestId>,
) -> Option<(crate::worker::Applied, RequestId)> {
    let Fetched {
        revision,
        whole,
        changes,
    } = fetched;
    // The last word on each circuit wins.
    let mut last: HashMap<uuid::Uuid, Option<(Circuit, Option<RequestId>)>> =
        HashMap::with_capacity(changes.len());
    for (id, change) in changes {
        last.insert(id, change);
    }
    if whole {
        // Anything deployed that the whole set lacks is gone.
        for id in state.circuits.keys() {
            last.entry(*id).or_insert(None);
        }
        state.refused.retain(|id, _| last.contains_key(id));
    }
    if let Some(r) = revision {
        state.revision = Some(r);
    }
    if whole {
        state.last_whole = Some(std::time::Instant::now());
    }
    let mut removes = Vec::new();
    let mut upserts: Vec<(Circuit, Option<RequestId>)> = Vec::new();
    for (id, change) in last {
        match change {
            None => {
                state.refused.remove(&id);
                if let Some(old) = state.circuits.remove(&id) {
                    state.frontends.remove(&old.frontend);
                    state.origins.remove(&id);
                    removes.push(id);
                }
            }
            Some((circuit, origin)) => {
                if let Some(o) = origin {
                    state.origins.insert(id, o);
                }
                if state
                    .circuits
                    .get(&id)
                    .is_some_and(|d| same_circuit(&d.circuit, &circuit))
                {
                    continue;
                }
                upserts.push((circuit, origin));
            }
        }
    }
    // Circuits new to this worker, with the requests that created them.
    let mut new: Vec<(uuid::Uuid, RequestId)> = Vec::new();
    let mut resolved = Vec::with_capacity(upserts.len());
    for (circuit, origin) in upserts {
        let id = circuit.id;
        let checked = config
            .resolve_circuit(&circuit)
            .map_err(|e| e.to_string())
            .and_then(|r| match state.frontends.get(&r.frontend) {
                Some(holder) if *holder != id => Err(format!(
                    "{} is used by another circuit ({holder})",
                    match &r.frontend {
                        Frontend::Port(p) => format!("port {p}"),
                        Frontend::Subdomain(s) => format!("subdomain {s:?}"),
                    }
                )),
                _ => Ok(r),
            });
        match checked {
            Ok(r) => {
                let r = Arc::new(r);
                let was = state.circuits.insert(id, r.clone());
                match was {
                    Some(old) if old.frontend != r.frontend => {
                        state.frontends.remove(&old.frontend);
                    }
                    Some(_) => {}
                    None => {
                        if let Some(o) = origin {
                            new.push((id, o));
                        }
                        state.recent.push_back((id, std::time::Instant::now()));
                    }
                }
                state.frontends.insert(r.frontend.clone(), id);
                state.refused.remove(&id);
                resolved.push(r);
            }
            Err(why) => {
                appproxy_shared::with_request_id(origin.or(preferred), || {
                    tracing::error!(circuit = %id, error = %why, "circuit refused; the running circuits stay");
                });
                state.refused.insert(id, why);
            }
        }
    }
    if resolved.is_empty() && removes.is_empty() {
        return None;
    }
    // One new circuit: deploy under the ID of the request that created it, so the
    // manager's call, the coordinator and every core share one ID. Otherwise a fresh
    // ID for this deployment.
    let id = match (preferred, new.as_slice()) {
        (Some(id), _) => id,
        (None, [(_, origin)]) => *origin,
        _ => RequestId::generate(IdVersion::V4),
    };
    // A batch deploys under its own ID: each creating request's ID gets a line
    // naming it, so either ID finds the other — but not for every circuit of a whole
    // set read at start (those creations are long answered).
    if !whole || new.len() <= MAX_BATCH_LINES {
        for (circuit, origin) in new.iter().filter(|(_, o)| *o != id) {
            appproxy_shared::with_request_id(Some(*origin), || {
                tracing::info!(%circuit, deployment = %id, "circuit deployed in a batch");
            });
        }
    }
    appproxy_shared::with_request_context(Some(id), appproxy_shared::current_span(), || {
        tracing::info!(
            changed = resolved.len(),
            removed = removes.len(),
            circuits = state.circuits.len(),
            "deploying the coordinator's circuits"
        );
    });
    let change = crate::core::Change {
        replace: false,
        upserts: resolved,
        removes,
    };
    Some((deployer.change(change, id), id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn circuit() -> Circuit {
        serde_json::from_value(serde_json::json!({
            "id": "c0a8f5d2-1111-4222-8333-444455556666",
            "protocol": "http", "app_mode": "interactive", "frontend_mode": "wildcard",
            "subdomain": "app", "open_to_public": true,
            "route_info": [{"session_id": "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b",
                "kernel_host": "127.0.0.1", "kernel_port": 8000}],
            "session_ids": ["5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b"],
            "created_at": "2026-11-30T10:00:00.000001Z",
            "updated_at": "2026-11-30T10:00:00.000001Z"
        }))
        .expect("a circuit")
    }

    #[test]
    fn copies_differing_only_in_store_times_are_the_same_circuit() {
        let event_copy = circuit();
        let mut stored = circuit();
        stored.created_at = Some("2026-11-30T10:00:00.000917Z".into());
        stored.updated_at = None;
        assert!(same_circuit(&event_copy, &stored));
        let mut moved = circuit();
        moved.route_info[0].kernel_port = 8001;
        assert!(
            !same_circuit(&event_copy, &moved),
            "a route change is a change"
        );
        let mut renamed = circuit();
        renamed.subdomain = Some("other".into());
        assert!(!same_circuit(&event_copy, &renamed));
    }
}
