//! The control agent (managed mode): a thread running a tokio current-thread runtime
//! that registers this worker with the coordinator, heartbeats, and fetches its circuit
//! set — at start and every `poll_interval_ms` — deploying each change to every core
//! over the bridge under a fresh request ID, so one ID links the fetch and every core's
//! "deployment applied" line.
//!
//! Polling stands in for the Redis subscription of the full design: a fetch of the
//! whole set after each poll also covers what a dropped subscription would lose.

use std::time::Duration;

use appproxy_shared::{IdVersion, RequestId};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::config::Config;
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
}

/// A minimal JSON-over-HTTP/1.1 client for the coordinator's API.
struct Client {
    /// `host:port`.
    authority: String,
    /// The shared API secret.
    secret: String,
}

impl Client {
    fn new(url: &str, secret: String) -> Result<Self, AgentError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| AgentError::Url(url.into()))?;
        let authority = rest.trim_end_matches('/').to_owned();
        if authority.is_empty() || authority.contains('/') {
            return Err(AgentError::Url(url.into()));
        }
        Ok(Self { authority, secret })
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, AgentError> {
        let mut stream = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(&self.authority),
        )
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        // The coordinator records our calls under their own ID, as the original does.
        let id = RequestId::generate(IdVersion::V4);
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nX-BackendAI-Token: {}\r\nX-Backend-Request-ID: {id}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.authority,
            self.secret,
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        let mut raw = Vec::new();
        tokio::time::timeout(
            Duration::from_secs(10),
            stream.take(16 << 20).read_to_end(&mut raw),
        )
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(n)) = resp.parse(&raw) else {
            return Err(AgentError::Response);
        };
        let status = resp.code.unwrap_or(0);
        let text = String::from_utf8_lossy(&raw[n..]).into_owned();
        if !(200..300).contains(&status) {
            return Err(AgentError::Status(status, text.chars().take(300).collect()));
        }
        serde_json::from_str(&text).map_err(|_| AgentError::Response)
    }
}

/// Starts the agent thread. Returns an error only for a config that cannot work.
pub fn spawn(config: Config, deployer: Deployer) -> Result<(), AgentError> {
    let coordinator = config.coordinator.clone().unwrap_or_default();
    let Some(url) = coordinator.url.clone() else {
        return Ok(());
    };
    let client = Client::new(&url, config.secrets.api_secret.clone().unwrap_or_default())?;
    std::thread::Builder::new()
        .name("appproxy-agent".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "control agent cannot start its runtime");
                    return;
                }
            };
            rt.block_on(run(config, client, deployer));
        })?;
    Ok(())
}

async fn run(config: Config, client: Client, deployer: Deployer) {
    let coordinator = config.coordinator.clone().unwrap_or_default();
    let w = &config.worker;
    let registration = serde_json::json!({
        "authority": w.authority,
        "frontend_mode": w.frontend_mode,
        "protocol": "http",
        "hostname": w.hostname.clone().unwrap_or_else(|| w.bind_host.to_string()),
        "tls_listen": false,
        "tls_advertised": w.tls_advertised,
        "api_port": w.api_port,
        "port_range": w.port_range,
        "wildcard_domain": w.wildcard_domain,
        "wildcard_traffic_port": w.wildcard_traffic_port,
        "accepted_traffics": ["interactive", "inference"],
        "filtered_apps_only": false,
    });
    let worker_id = loop {
        match client.call("PUT", "/api/worker", Some(&registration)).await {
            Ok(v) => match v["id"].as_str() {
                Some(id) => break id.to_owned(),
                None => tracing::warn!("coordinator registration answer has no id"),
            },
            Err(e) => tracing::warn!(error = %e, "worker registration failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    tracing::info!(worker_id = %worker_id, "registered with the coordinator");
    let mut poll =
        tokio::time::interval(Duration::from_millis(coordinator.poll_interval_ms.max(50)));
    let mut heartbeat =
        tokio::time::interval(Duration::from_secs(coordinator.heartbeat_secs.max(1)));
    let mut last: Option<String> = None;
    // Redis events (when `[redis] url` is set) trigger a fetch at once, under the
    // event's request ID; the poll keeps running as the safety net.
    let (event_tx, mut event_rx) = tokio::sync::mpsc::unbounded_channel::<Option<RequestId>>();
    if let Some(url) = config
        .redis
        .as_ref()
        .and_then(|t| t.get("url"))
        .and_then(|v| v.as_str())
    {
        tokio::spawn(subscribe(url.to_owned(), w.authority.clone(), event_tx));
    }
    let circuits_path = format!("/api/worker/{worker_id}/circuits");
    loop {
        let preferred = tokio::select! {
            _ = poll.tick() => None,
            Some(event_id) = event_rx.recv() => Some(event_id),
            _ = heartbeat.tick() => {
                if let Err(e) = client.call("PATCH", &format!("/api/worker/{worker_id}"), None).await {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
                continue;
            }
        };
        match client.call("GET", &circuits_path, None).await {
            Ok(v) => apply(&config, &deployer, &v, &mut last, preferred.flatten()),
            Err(e) => tracing::warn!(error = %e, "circuit fetch failed"),
        }
    }
}

/// Listens on the coordinator's broadcast channel; every circuit event for this
/// worker (and every (re)connection, which may have missed some) asks for a fetch.
async fn subscribe(
    url: String,
    authority: String,
    tx: tokio::sync::mpsc::UnboundedSender<Option<RequestId>>,
) {
    use appproxy_shared::model::{BroadcastMessage, BROADCAST_CHANNEL};
    use futures_lite::StreamExt as _;
    loop {
        let subscribed = async {
            let client = redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(BROADCAST_CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        }
        .await;
        let mut pubsub = match subscribed {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "event subscription failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        tracing::info!("subscribed to circuit events");
        if tx.send(None).is_err() {
            return;
        }
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let Ok(text) = msg.get_payload::<String>() else {
                continue;
            };
            let Ok(envelope) = serde_json::from_str::<BroadcastMessage>(&text) else {
                continue;
            };
            let Ok(body) = serde_json::from_str::<serde_json::Value>(&envelope.payload) else {
                continue;
            };
            if body["target_worker_authority"].as_str() != Some(authority.as_str()) {
                continue;
            }
            let id = envelope.metadata().request_id.and_then(|r| r.validated());
            tracing::info!(event = %envelope.name, "circuit event received");
            if tx.send(id).is_err() {
                return;
            }
        }
        tracing::warn!("event subscription dropped; reconnecting");
    }
}

/// Deploys the fetched set when it differs from the last one deployed; under
/// `preferred` (an event's request ID) when given.
fn apply(
    config: &Config,
    deployer: &Deployer,
    answer: &serde_json::Value,
    last: &mut Option<String>,
    preferred: Option<RequestId>,
) {
    let Some(list) = answer["circuits"].as_array() else {
        tracing::warn!("circuit list answer has no circuits");
        return;
    };
    let mut circuits: Vec<appproxy_shared::model::Circuit> = Vec::with_capacity(list.len());
    let mut origins = Vec::new();
    for c in list {
        match serde_json::from_value::<appproxy_shared::model::Circuit>(c.clone()) {
            Ok(circuit) => {
                if let Some(origin) = c["origin_request_id"]
                    .as_str()
                    .and_then(|s| RequestId::parse(s.as_bytes()).ok())
                {
                    origins.push((circuit.id, origin));
                }
                circuits.push(circuit);
            }
            Err(e) => tracing::warn!(error = %e, "unreadable circuit skipped"),
        }
    }
    circuits.sort_by_key(|c| c.id);
    let key = serde_json::to_string(&circuits).unwrap_or_default();
    if last.as_deref() == Some(key.as_str()) {
        return;
    }
    // One new circuit: deploy under the ID of the request that created it, so the
    // manager's call, the coordinator and every core share one ID. Otherwise a fresh
    // ID for this deployment.
    let previous: Vec<uuid::Uuid> = last
        .as_deref()
        .and_then(|l| serde_json::from_str::<Vec<appproxy_shared::model::Circuit>>(l).ok())
        .map(|v| v.into_iter().map(|c| c.id).collect())
        .unwrap_or_default();
    let new: Vec<&(uuid::Uuid, RequestId)> = origins
        .iter()
        .filter(|(c, _)| !previous.contains(c))
        .collect();
    let id = match (preferred, new.as_slice()) {
        (Some(id), _) => id,
        (None, [(_, origin)]) => *origin,
        _ => RequestId::generate(IdVersion::V4),
    };
    appproxy_shared::with_request_id(Some(id), || match config.resolve_circuits(&circuits) {
        Ok(resolved) => {
            tracing::info!(
                circuits = resolved.len(),
                "deploying the coordinator's circuits"
            );
            deployer.deploy(resolved, id);
            *last = Some(key);
        }
        Err(e) => tracing::error!(error = %e, "circuit set refused; the running circuits stay"),
    });
}
