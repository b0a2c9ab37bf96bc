//! The remote [`ControlLink`]: the coordinator's HTTP API (a minimal JSON-over-HTTP/1.1
//! client that moves to the next coordinator of an HA pair when one cannot be
//! reached), and Redis when `[redis] url` is set — circuit events heard on the
//! broadcast channel (with `[redis] circuits_from = "coordinator"` only as a sign to
//! read what changed from the coordinator), acknowledgements published there,
//! last-access marks written with the original's keys.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use appproxy_shared::model::{
    BroadcastMessage, Circuit, CircuitsEvent, EventMetadata, BROADCAST_CHANNEL,
    EVENT_WORKER_CIRCUIT_ADDED,
};
use appproxy_shared::wire::{
    AccessMark, CircuitSet, EventBody, EventKind, EventTarget, Heartbeat, Registered,
    WorkerRegistration, MAX_CIRCUITS_PER_ANSWER,
};
// Every Redis call the worker makes is bounded: an outage costs a call at most
// `REDIS_CALL_TIMEOUT`, never a hang.
use appproxy_shared::redis_call::bounded;
use appproxy_shared::{IdVersion, RequestId};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{ControlLink, LinkError, Notice};
use crate::config::CircuitsFrom;

/// A heartbeat slower than this says nothing of the clocks' offset (it is known to
/// within half the round trip).
const MAX_CLOCK_ROUND_TRIP: Duration = Duration::from_millis(500);

/// A coordinator reached over HTTP, with Redis for events, acknowledgements and
/// marks when configured.
pub struct RemoteLink {
    client: Client,
    /// `[redis] url`, when set.
    redis_url: Option<String>,
    /// The connection acknowledgements and marks use (one caller at a time).
    redis: tokio::sync::Mutex<RedisLink>,
    /// Where an event's circuits are read from.
    circuits_from: CircuitsFrom,
}

impl RemoteLink {
    /// A link to the coordinators of `urls` (one URL, or several separated by
    /// commas) with the shared API `secret`; `node` names this process among the
    /// worker's HA nodes; `redis_url` enables events, acknowledgements and marks;
    /// `circuits_from` says whether an event's circuits are deployed as it carries
    /// them or read from the coordinator.
    pub fn new(
        urls: &str,
        secret: String,
        node: String,
        redis_url: Option<String>,
        circuits_from: CircuitsFrom,
    ) -> Result<Self, LinkError> {
        Ok(Self {
            client: Client::new(urls, secret, node)?,
            redis: tokio::sync::Mutex::new(RedisLink::new(redis_url.as_deref())),
            redis_url,
            circuits_from,
        })
    }
}

impl ControlLink for RemoteLink {
    async fn register(&self, registration: &WorkerRegistration) -> Result<uuid::Uuid, LinkError> {
        let body = serde_json::to_vec(registration).map_err(|_| LinkError::Response)?;
        let raw = self
            .client
            .call("PUT", "/api/worker?brief=true", &body)
            .await?;
        let answer: Registered = serde_json::from_slice(&raw).map_err(|_| LinkError::Response)?;
        Ok(answer.id)
    }

    async fn heartbeat(&self, worker: uuid::Uuid) -> Result<Option<f64>, LinkError> {
        let path = format!("/api/worker/{worker}?node={}&brief=true", self.client.node);
        let sent = appproxy_shared::jwt::now_epoch();
        let took = std::time::Instant::now();
        let raw = self.client.call("PATCH", &path, &[]).await?;
        let took = took.elapsed();
        let answer: Heartbeat = serde_json::from_slice(&raw).map_err(|_| LinkError::Response)?;
        // The coordinator read its clock between the call's start and end: taken as
        // the middle, an offset is known to within half the round trip.
        Ok(answer
            .clock
            .filter(|c| c.is_finite() && took < MAX_CLOCK_ROUND_TRIP)
            .map(|clock| clock - (sent + took.as_secs_f64() / 2.0)))
    }

    async fn deregister(&self, worker: uuid::Uuid) -> Result<(), LinkError> {
        let path = format!("/api/worker/{worker}?node={}", self.client.node);
        let raw = self.client.call("DELETE", &path, &[]).await?;
        serde_json::from_slice::<serde::de::IgnoredAny>(&raw).map_err(|_| LinkError::Response)?;
        Ok(())
    }

    async fn changes(&self, worker: uuid::Uuid, since: u64) -> Result<CircuitSet, LinkError> {
        let path = format!("/api/worker/{worker}/circuits?since={since}");
        read_set(&self.client.call("GET", &path, &[]).await?)
    }

    async fn page(
        &self,
        worker: uuid::Uuid,
        after: Option<uuid::Uuid>,
    ) -> Result<CircuitSet, LinkError> {
        let after = after.map(|a| a.to_string()).unwrap_or_default();
        let path =
            format!("/api/worker/{worker}/circuits?after={after}&limit={MAX_CIRCUITS_PER_ANSWER}");
        read_set(&self.client.call("GET", &path, &[]).await?)
    }

    fn follow(&self, authority: &str, tx: tokio::sync::mpsc::UnboundedSender<Notice>) {
        if let Some(url) = &self.redis_url {
            tokio::spawn(subscribe(
                url.clone(),
                authority.to_owned(),
                self.circuits_from,
                tx,
            ));
        }
    }

    async fn acknowledge(
        &self,
        ack: CircuitsEvent,
        tracestate: Option<&appproxy_shared::TraceState>,
    ) -> bool {
        let meta = EventMetadata {
            request_id: appproxy_shared::current_request_id().map(Into::into),
            traceparent: appproxy_shared::current_span().map(|s| s.traceparent().to_string()),
            tracestate: tracestate.map(|t| t.as_str().to_owned()),
            ..Default::default()
        };
        let Ok(msg) =
            BroadcastMessage::encode(EVENT_WORKER_CIRCUIT_ADDED, "appproxy-worker", &ack, &meta)
        else {
            return false;
        };
        let Ok(text) = serde_json::to_string(&msg) else {
            return false;
        };
        let mut redis = self.redis.lock().await;
        // A connection gone stale (Redis restarted: "broken pipe") fails once: the
        // acknowledgement is sent again on a fresh one.
        let mut tries = 0;
        loop {
            tries += 1;
            let Some(conn) = redis.get().await else {
                tracing::warn!("acknowledgement not sent: redis unreachable");
                return false;
            };
            let sent: redis::RedisResult<i64> = bounded(
                redis::cmd("PUBLISH")
                    .arg(BROADCAST_CHANNEL)
                    .arg(&text)
                    .query_async(conn),
            )
            .await;
            match sent {
                Ok(_) => return true,
                Err(e) => {
                    redis.failed();
                    if tries >= 2 {
                        tracing::warn!(error = %e, "acknowledgement not sent");
                        return false;
                    }
                    tracing::info!(error = %e, "acknowledgement not sent; retrying once on a fresh connection");
                }
            }
        }
    }

    async fn record_marks(&self, marks: &[AccessMark]) -> bool {
        let mut redis = self.redis.lock().await;
        let Some(conn) = redis.get().await else {
            return false;
        };
        let mut pipe = redis::pipe();
        appproxy_shared::wire::add_marks(&mut pipe, marks);
        if let Err(e) = bounded(pipe.query_async::<()>(conn)).await {
            tracing::warn!(error = %e, "last-access marks not written");
            redis.failed();
            return false;
        }
        true
    }
}

/// Reads a set answer straight into the model; when some circuit in it does not
/// read, the others still do (that one is logged and left out).
fn read_set(raw: &[u8]) -> Result<CircuitSet, LinkError> {
    if let Ok(answer) = serde_json::from_slice::<CircuitSet>(raw) {
        return Ok(answer);
    }
    let loose: CircuitSet<serde_json::Value> =
        serde_json::from_slice(raw).map_err(|_| LinkError::Response)?;
    let circuits = loose.circuits.map(|list| {
        list.into_iter()
            .filter_map(|c| match serde_json::from_value::<Circuit>(c) {
                Ok(circuit) => Some(circuit),
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable circuit skipped");
                    None
                }
            })
            .collect()
    });
    Ok(CircuitSet {
        revision: loose.revision,
        resync: loose.resync,
        circuits,
        origins: loose.origins,
        traces: loose.traces,
        next: loose.next,
        removed: loose.removed,
        removed_by: loose.removed_by,
        more: loose.more,
    })
}

/// A minimal JSON-over-HTTP/1.1 client for the coordinator's API. With several
/// coordinators (an HA pair, or a name resolving to several addresses) it keeps using
/// the one that last answered and moves on to the next when it cannot connect.
struct Client {
    /// `host:port` of each coordinator, in the configured order.
    authorities: Vec<String>,
    /// The one that answered last.
    current: AtomicUsize,
    /// The coordinator connected to last (the first one until a call is made): a
    /// connection to another one is a switch, whichever way it came about (a refused
    /// connect, or a call cut off that moved `current` on).
    connected: AtomicUsize,
    /// The shared API secret.
    secret: String,
    /// This node's ID among the worker's HA nodes (URL-safe characters only).
    node: String,
}

impl Client {
    /// `urls`: one URL, or several separated by commas.
    fn new(urls: &str, secret: String, node: String) -> Result<Self, LinkError> {
        let mut authorities = Vec::new();
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let rest = url
                .strip_prefix("http://")
                .ok_or_else(|| LinkError::Url(url.into()))?;
            let authority = rest.trim_end_matches('/').to_owned();
            if authority.is_empty() || authority.contains('/') {
                return Err(LinkError::Url(url.into()));
            }
            authorities.push(authority);
        }
        if authorities.is_empty() {
            return Err(LinkError::Url(urls.into()));
        }
        Ok(Self {
            authorities,
            current: Default::default(),
            connected: Default::default(),
            secret,
            node,
        })
    }

    /// A connection to a coordinator: the one that answered last first, then the
    /// others in order; each address a name resolves to is tried, each attempt
    /// bounded. With the coordinator's index.
    async fn connect(&self) -> Result<(tokio::net::TcpStream, usize, &str), LinkError> {
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
                        if self.connected.swap(i, Ordering::Relaxed) != i {
                            tracing::info!(coordinator = %authority, "switched to another coordinator");
                        }
                        self.current.store(i, Ordering::Relaxed);
                        return Ok((stream, i, authority));
                    }
                    Ok(Err(e)) => last = Some(e),
                    Err(_) => last = Some(std::io::ErrorKind::TimedOut.into()),
                }
            }
        }
        Err(LinkError::Io(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no coordinator address")
        })))
    }

    /// One call; the body of a 2xx answer. A coordinator that takes the connection
    /// but does not answer (hung, frozen), cuts it off, or answers a server error (a
    /// 5xx: its store out of its reach, say) is passed over: the call is made again
    /// on the next one at once, each at most once. Before, a coordinator answering
    /// 503 held the worker to it while another could have served it, until the
    /// worker was taken for lost. Every call the agent
    /// makes may be made twice (a registration is an upsert, a heartbeat and a
    /// deregistration name their node, the others read).
    async fn call(&self, method: &str, path: &str, body: &[u8]) -> Result<Vec<u8>, LinkError> {
        let n = self.authorities.len();
        let mut tries = 0;
        loop {
            let (stream, i, authority) = self.connect().await?;
            match self.exchange(stream, authority, method, path, body).await {
                Err(Exchanged::Unserved(e)) => {
                    // The next call starts with the next coordinator, unless another
                    // call has moved on already: two calls that hung on the same one
                    // moved twice, back onto it with two coordinators, and a late
                    // failure moved off one that answered.
                    let _ = self.current.compare_exchange(
                        i,
                        (i + 1) % n,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    tries += 1;
                    if tries >= n {
                        return Err(e);
                    }
                    tracing::warn!(coordinator = %authority, error = %e, "the coordinator did not serve the call; calling the next one");
                }
                Err(Exchanged::Failed(e)) => return Err(e),
                Ok(body) => return Ok(body),
            }
        }
    }

    /// One exchange on `stream` with the coordinator at `authority`.
    async fn exchange(
        &self,
        mut stream: tokio::net::TcpStream,
        authority: &str,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<Vec<u8>, Exchanged> {
        // The coordinator records our calls under the ID the caller's lines carry
        // (each call's own, see `agent`), else one of their own.
        let id = appproxy_shared::current_request_id()
            .unwrap_or_else(|| RequestId::generate(IdVersion::V4));
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nX-BackendAI-Token: {}\r\nX-Backend-Request-ID: {id}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            authority,
            self.secret,
            body.len()
        );
        let mut raw = Vec::new();
        let exchanged = tokio::time::timeout(Duration::from_secs(10), async {
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(body).await?;
            stream.take(MAX_ANSWER).read_to_end(&mut raw).await
        })
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
        // Connected but silent (hung) or cut off.
        exchanged.map_err(|e| Exchanged::Unserved(e.into()))?;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(&raw) {
            Ok(httparse::Status::Complete(n)) => n,
            // The connection closed before a whole head (nothing at all, say): the
            // coordinator was stopped or killed mid-call, or gave up waiting for the
            // request; another may serve it. Before, this failed the call where a
            // reset moved on.
            Ok(httparse::Status::Partial) => return Err(cut_short()),
            Err(_) => return Err(Exchanged::Failed(LinkError::Response)),
        };
        let status = resp.code.unwrap_or(0);
        // The coordinator's answers have a plain length (never chunked, never a
        // list): anything else is not read as one.
        let mut framing = resp.headers.iter().filter(|h| {
            h.name.eq_ignore_ascii_case("content-length")
                || h.name.eq_ignore_ascii_case("transfer-encoding")
        });
        let announced = match (framing.next(), framing.next()) {
            (None, _) => None,
            (Some(h), None) if h.name.eq_ignore_ascii_case("content-length") => {
                match std::str::from_utf8(h.value).map(str::trim) {
                    Ok(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                        v.parse::<usize>().ok()
                    }
                    _ => return Err(Exchanged::Failed(LinkError::Response)),
                }
            }
            _ => return Err(Exchanged::Failed(LinkError::Response)),
        };
        // A body shorter than the head announced was cut off the same way, when
        // another coordinator may serve the call: a success (the call is made again:
        // every call the agent makes may be) or a server error. Any other status is
        // the call's own answer however much of its text came.
        let short =
            announced.is_some_and(|len| raw.len() - n < len) && raw.len() < MAX_ANSWER as usize;
        if short && ((200..300).contains(&status) || status >= 500) {
            return Err(cut_short());
        }
        if !(200..300).contains(&status) {
            let text = String::from_utf8_lossy(&raw[n..]);
            let e = LinkError::Status(status, text.chars().take(300).collect());
            // A server error is this coordinator's trouble, and so is a 408 (it gave
            // up waiting for the request, which it never ran): another may serve the
            // call. Any other answer is the call's own (a 409 `node-left`, a 404).
            return Err(if status >= 500 || status == 408 {
                Exchanged::Unserved(e)
            } else {
                Exchanged::Failed(e)
            });
        }
        raw.drain(..n);
        Ok(raw)
    }
}

/// The most of an answer read (the largest, a page of circuits, is far smaller).
const MAX_ANSWER: u64 = 16 << 20;

/// An answer the coordinator's connection closed in the middle of.
fn cut_short() -> Exchanged {
    Exchanged::Unserved(LinkError::Io(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the connection closed before the whole answer",
    )))
}

/// How an exchange with a coordinator failed.
enum Exchanged {
    /// It took the connection but gave no whole answer in time, cut it off, or
    /// answered a server error: the next coordinator may serve the call.
    Unserved(LinkError),
    /// It answered, with an error of the call's own or something that does not
    /// read.
    Failed(LinkError),
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

/// Listens on the coordinator's broadcast channel, reconnecting forever (capped
/// backoff, [`appproxy_shared::pubsub`]); every circuit event for this worker, and
/// every (re)subscription (which may have missed some), becomes a [`Notice`]; every
/// reconnection is counted (`appproxy_worker_redis_reconnects_total`).
async fn subscribe(
    url: String,
    authority: String,
    circuits_from: CircuitsFrom,
    tx: tokio::sync::mpsc::UnboundedSender<Notice>,
) {
    appproxy_shared::pubsub::Follow::new(&url, &[BROADCAST_CHANNEL], "circuit events")
        .run(
            || {
                tracing::info!("subscribed to circuit events");
                tx.send(Notice::resubscribed()).is_ok()
            },
            |_, text| {
                let Ok(envelope) = serde_json::from_str::<BroadcastMessage>(&text) else {
                    return true;
                };
                match heard(&envelope, &authority, circuits_from) {
                    Some(notice) => tx.send(notice).is_ok(),
                    None => true,
                }
            },
            crate::metrics::note_redis_reconnect,
        )
        .await;
}

/// The notice a coordinator's event for this worker gives; `None` for anything else.
/// With `circuits_from` the coordinator, the notice carries no circuits: the agent
/// reads what changed from the coordinator's API, and an event anyone could have
/// published on Redis decides only when it does. An event whose body does not read
/// asks for that read too.
fn heard(
    envelope: &BroadcastMessage,
    authority: &str,
    circuits_from: CircuitsFrom,
) -> Option<Notice> {
    if envelope.source != "appproxy-coordinator" {
        return None;
    }
    let target: EventTarget = serde_json::from_str(&envelope.payload).ok()?;
    if target.target_worker_authority != authority {
        return None;
    }
    let meta = envelope.metadata();
    let request_id = meta.request_id.and_then(|r| r.validated());
    // The carried context's rules: a valid traceparent, its tracestate only with it.
    let trace = appproxy_shared::TraceContext::read(
        meta.traceparent.as_deref(),
        meta.tracestate.as_deref(),
    );
    let span = (meta.traceparent.is_some() || request_id.is_some()).then(|| {
        appproxy_shared::trace::SpanContext::start(
            trace.as_ref().map(|t| &t.traceparent),
            request_id.as_ref(),
        )
    });
    let tracestate = trace.and_then(|t| t.tracestate);
    appproxy_shared::with_request_context(request_id, span, || {
        tracing::info!(event = %envelope.name, "circuit event received");
    });
    let kind = EventKind::of_name(&envelope.name);
    let read = kind
        .filter(|_| circuits_from == CircuitsFrom::Event)
        .and_then(|k| {
            EventBody::read(k, &envelope.payload)
                .ok()
                .map(|(_, circuits)| (k, circuits))
        });
    let mut notice = match read {
        Some((kind, circuits)) => Notice::event(kind, circuits, request_id, span),
        None => Notice {
            request_id,
            span,
            tracestate: None,
            created: if kind == Some(EventKind::Created) {
                target.circuits.iter().map(|c| c.id).collect()
            } else {
                Vec::new()
            },
            delta: None,
            resync: false,
        },
    };
    notice.tracestate = tracestate;
    Some(notice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// A coordinator that takes the request and resets the connection (a coordinator
    /// going down mid-call).
    fn resetting() -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let mut buf = [0u8; 1024];
                let _ = (&s).read(&mut buf);
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            }
        });
        addr
    }

    /// A coordinator that takes the request and closes the connection after
    /// `answer` (a coordinator stopped mid-call, or giving up on the request).
    fn closing_after(answer: impl Into<Vec<u8>>) -> std::net::SocketAddr {
        let answer = answer.into();
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(&answer);
            }
        });
        addr
    }

    /// A coordinator that answers every call with `status` and a short body.
    fn answering_with(status: &'static str) -> std::net::SocketAddr {
        closing_after(format!(
            "HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        ))
    }

    /// A coordinator whose store is out of its reach.
    fn unavailable() -> std::net::SocketAddr {
        answering_with("503 Service Unavailable")
    }

    /// A coordinator that counts this node as left.
    fn refusing() -> std::net::SocketAddr {
        answering_with("409 Conflict")
    }

    /// A coordinator that answers every call with `{}`.
    fn answering() -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                );
            }
        });
        addr
    }

    /// An event's trace context by the carried-context rules: the deployment is the
    /// child of a valid `traceparent`, whose `tracestate` goes on with it; without a
    /// valid one the span derives from the request ID and no `tracestate` is kept.
    #[test]
    fn an_events_tracestate_goes_on_only_with_a_valid_traceparent() {
        const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let event = |traceparent: &str| {
            let meta = EventMetadata {
                request_id: Some(appproxy_shared::model::RequestIdText("R-1".into())),
                traceparent: Some(traceparent.to_owned()),
                tracestate: Some("rojo=1".into()),
                ..Default::default()
            };
            let body = CircuitsEvent::new("w1", Vec::new());
            BroadcastMessage::encode(
                appproxy_shared::model::EVENT_CIRCUIT_CREATED,
                "appproxy-coordinator",
                &body,
                &meta,
            )
            .expect("envelope")
        };
        let notice = heard(&event(TP), "w1", CircuitsFrom::Coordinator).expect("for this worker");
        let span = notice.span.expect("a span");
        assert_eq!(
            span.trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            span.parent_span_id.map(|s| s.to_string()).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert_eq!(
            notice.tracestate.as_ref().map(|t| t.as_str()),
            Some("rojo=1")
        );
        for bad in ["00-zz", &format!("01{}-{}", &TP[2..], "x".repeat(600))] {
            let notice =
                heard(&event(bad), "w1", CircuitsFrom::Coordinator).expect("for this worker");
            let span = notice.span.expect("derived from the request ID");
            assert_eq!(span.parent_span_id, None, "{bad}");
            assert_eq!(notice.tracestate, None, "{bad}");
        }
    }

    /// With `circuits_from = "coordinator"` an event's circuits are never deployed
    /// as it carries them: its notice asks the agent to read what changed from the
    /// coordinator, keeping what the event says of its request, its trace and the
    /// creations owed an acknowledgement; with `"event"` the notice carries the
    /// change.
    #[test]
    fn an_events_circuits_are_read_from_the_coordinator_when_configured() {
        let circuit: Circuit = serde_json::from_value(serde_json::json!({
            "id": "c0a8f5d2-1111-4222-8333-444455556666",
            "protocol": "http", "app_mode": "interactive", "frontend_mode": "port",
            "port": 10250, "open_to_public": true,
            "route_info": [{"session_id": "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b",
                "kernel_host": "203.0.113.9", "kernel_port": 8000}],
        }))
        .expect("a circuit");
        let meta = EventMetadata {
            request_id: Some(appproxy_shared::model::RequestIdText("R-7".into())),
            ..Default::default()
        };
        for kind in [
            EventKind::Created,
            EventKind::Removed,
            EventKind::RouteUpdated,
        ] {
            let body = EventBody::new(kind, "w1", vec![circuit.clone()]).expect("a body");
            let event = BroadcastMessage::encode(kind.name(), "appproxy-coordinator", &body, &meta)
                .expect("envelope");
            let notice = heard(&event, "w1", CircuitsFrom::Coordinator).expect("for this worker");
            assert!(notice.delta.is_none(), "{kind:?}: carried a change");
            assert_eq!(
                notice.request_id.map(|r| r.to_string()).as_deref(),
                Some("R-7")
            );
            assert!(notice.span.is_some(), "{kind:?}");
            let owed = if kind == EventKind::Created {
                vec![circuit.id]
            } else {
                Vec::new()
            };
            assert_eq!(notice.created, owed, "{kind:?}");
            let notice = heard(&event, "w1", CircuitsFrom::Event).expect("for this worker");
            assert!(notice.delta.is_some(), "{kind:?}: the carried change");
            assert_eq!(notice.created, owed, "{kind:?}");
            assert!(heard(&event, "w2", CircuitsFrom::Coordinator).is_none());
        }
    }

    /// A set answer whose `traces` are hostile still reads whole; only the bad
    /// entries are lost.
    #[test]
    fn a_set_answer_with_unreadable_traces_still_deploys() {
        let id = uuid::Uuid::new_v4();
        let raw = format!(
            r#"{{"revision":2,"circuits":[],"origins":{{"{id}":"R-1"}},"removed":[],"more":false,
                "traces":{{"{id}":{{"traceparent":["no"]}},"x":1}}}}"#
        );
        let answer = read_set(raw.as_bytes()).expect("the answer reads");
        assert_eq!(answer.revision, 2);
        assert_eq!(answer.origins.expect("origins")[&id], "R-1");
        assert!(answer.traces.is_empty());
    }

    /// A change list whose `removed_by` is hostile still reads whole, and one read
    /// circuit by circuit (one of them does not read) keeps the removals' requests.
    #[test]
    fn a_change_list_keeps_the_removals_requests_whatever_else_does_not_read() {
        let (gone, odd) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let raw = format!(
            r#"{{"revision":3,"circuits":[],"removed":["{gone}","{odd}"],"more":false,
                "removed_by":{{"{gone}":"R-9","{odd}":["no"],"x":"R-1"}}}}"#
        );
        let answer = read_set(raw.as_bytes()).expect("the answer reads");
        assert_eq!(
            answer.remover_of(&gone).map(|r| r.to_string()).as_deref(),
            Some("R-9")
        );
        assert_eq!(answer.removed_by.len(), 1);
        let raw = format!(
            r#"{{"revision":3,"circuits":[{{"id":"not a circuit"}}],"removed":["{gone}"],
                "more":false,"removed_by":{{"{gone}":"R-9"}}}}"#
        );
        let answer = read_set(raw.as_bytes()).expect("the answer reads");
        assert_eq!(answer.circuits.as_ref().map(Vec::len), Some(0));
        assert_eq!(
            answer.remover_of(&gone).map(|r| r.to_string()).as_deref(),
            Some("R-9")
        );
    }

    /// A coordinator that answers 503 (its store out of its reach) is passed over as
    /// a silent one is: the call is made again on the next, and the calls after it
    /// stay there. Before, the worker kept calling the one answering 503 until it
    /// was taken for lost.
    #[test]
    fn a_coordinator_answering_server_errors_is_passed_over() {
        let (a, b) = (unavailable(), answering());
        let client =
            Client::new(&format!("http://{a}, http://{b}"), "s".into(), "n".into()).expect("urls");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (first, second) = rt.block_on(async {
            let first = client.call("GET", "/api/x", b"").await;
            (first, client.call("GET", "/api/x", b"").await)
        });
        assert_eq!(first.expect("made again on the next coordinator"), b"{}");
        assert_eq!(second.expect("the next coordinator answers"), b"{}");
        // A 4xx is the call's own answer: not passed over.
        let c =
            Client::new(&format!("http://{}", refusing()), "s".into(), "n".into()).expect("url");
        match rt.block_on(c.call("GET", "/api/x", b"")) {
            Err(LinkError::Status(409, _)) => {}
            other => panic!("{other:?}"),
        }
    }

    /// A connection closed before the whole answer (no answer at all, half a
    /// head, a body shorter than announced) is a call cut off, made again on the
    /// next coordinator. Before, it failed the call without moving on (a reset
    /// moved on): a coordinator stopped mid-call, or one that gave up waiting for
    /// the request, held the worker to it.
    #[test]
    fn an_answer_cut_short_moves_on_to_the_next_coordinator() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        for answer in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\nContent-Le",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}",
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 10\r\n\r\n{}",
            // It gave up waiting for the request (never ran it).
            b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 2\r\n\r\n{}",
        ] {
            let (a, b) = (closing_after(answer), answering());
            let client = Client::new(&format!("http://{a}, http://{b}"), "s".into(), "n".into())
                .expect("urls");
            let (first, second) = rt.block_on(async {
                let first = client.call("GET", "/api/x", b"").await;
                (first, client.call("GET", "/api/x", b"").await)
            });
            let shown = String::from_utf8_lossy(answer);
            assert_eq!(first.expect(&shown), b"{}", "{shown}");
            assert_eq!(second.expect(&shown), b"{}", "{shown}");
            assert_eq!(client.current.load(Ordering::Relaxed), 1, "{shown}");
        }
        // The call's own answer, however much of its text came, and an answer that
        // does not read (another framing than a plain length included): not passed
        // over.
        let own = |answer: &'static [u8]| {
            let c = Client::new(
                &format!("http://{}, http://{}", closing_after(answer), answering()),
                "s".into(),
                "n".into(),
            )
            .expect("urls");
            rt.block_on(c.call("GET", "/api/x", b""))
        };
        assert!(matches!(
            own(b"HTTP/1.1 409 Conflict\r\nContent-Length: 50\r\n\r\n{\"error\""),
            Err(LinkError::Status(409, _))
        ));
        for answer in [
            &b"HTTP/9 x\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
        ] {
            let shown = String::from_utf8_lossy(answer);
            assert!(matches!(own(answer), Err(LinkError::Response)), "{shown}");
        }
    }

    /// A call cut off by the coordinator it went to is made again on the next
    /// coordinator at once, and the calls after it stay there; the switch is logged
    /// like one after a refused connect.
    #[test]
    fn a_call_cut_off_moves_on_to_the_next_coordinator_and_says_so() {
        let (a, b) = (resetting(), answering());
        let client =
            Client::new(&format!("http://{a}, http://{b}"), "s".into(), "n".into()).expect("urls");
        let lines = appproxy_test_support::logs::Sink::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(lines.clone())
            .with_ansi(false)
            .finish();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (first, second) = tracing::subscriber::with_default(subscriber, || {
            rt.block_on(async {
                let first = client.call("GET", "/api/x", b"").await;
                (first, client.call("GET", "/api/x", b"").await)
            })
        });
        assert_eq!(first.expect("made again on the next coordinator"), b"{}");
        assert_eq!(second.expect("the next coordinator answers"), b"{}");
        let text = lines.text();
        assert!(
            text.contains("the coordinator did not serve the call; calling the next one")
                && text.contains("switched to another coordinator")
                && text.contains(&b.to_string()),
            "{text}"
        );
        assert_eq!(
            text.matches("the coordinator did not serve the call")
                .count(),
            1,
            "the second call went to the coordinator that answers: {text}"
        );
    }
}
