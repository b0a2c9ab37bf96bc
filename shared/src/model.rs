//! The circuit / route / worker model and the event envelope, with the serde shapes of
//! the original platform's wire format (`SerializableCircuit`, `RouteInfo`, the Redis
//! broadcast envelope). Unknown fields are ignored everywhere; route keys are accepted
//! in snake_case and kebab-case.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::request_id::RequestId;

/// How a circuit's traffic is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// HTTP/1.1 (and WebSocket upgrades).
    #[default]
    Http,
    /// gRPC (HTTP/2 upstream).
    Grpc,
    /// HTTP/2: `h2` on the wire, as the original's `ProxyProtocol.HTTP2`
    /// (`"http2"`, which this model wrote before, is read too: rows stored then,
    /// worker files that say it). Written as `http2`, an original worker failed
    /// to read the event and every circuit list holding one (an outside tester's
    /// find).
    #[serde(rename = "h2", alias = "http2")]
    Http2,
    /// Raw TCP relay.
    Tcp,
    /// A pre-opened port inside the session.
    Preopen,
}

/// Who the circuit serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppMode {
    /// A person's interactive app (Jupyter, VS Code …): permit cookie.
    #[default]
    Interactive,
    /// A model-serving endpoint: bearer JWT.
    Inference,
}

/// How clients reach a circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrontendMode {
    /// A port of its own.
    #[default]
    Port,
    /// `Host: <subdomain>.<wildcard_domain>` on shared ports.
    Wildcard,
}

/// How the worker connects to a route's app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    /// Plain TCP.
    #[default]
    Off,
    /// TLS; the app's certificate is checked for `kernel_host` against the system
    /// roots or the worker's `[upstream] tls_ca`.
    Verify,
    /// TLS without checking the app's certificate (a self-signed one): only when
    /// the circuit says so.
    Insecure,
}

/// Who may reuse a pooled HTTP/1.1 app connection: a worker's `[upstream] reuse`,
/// or a circuit's own [`Circuit::upstream_reuse`], which overrides it for that
/// circuit. Any other value is refused where it is read (`unknown variant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reuse {
    /// Any client connection of the core (nginx's and HAProxy's default).
    #[default]
    Shared,
    /// Only the client connection whose request opened it (HAProxy's
    /// `http-reuse never`); closed when that connection closes. An app that
    /// answers a request twice, or late, shifts only its own client's answers.
    Client,
}

impl Reuse {
    /// The wire and config value (`shared` / `client`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::Client => "client",
        }
    }

    /// Reads a wire or config value; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "shared" => Some(Self::Shared),
            "client" => Some(Self::Client),
            _ => None,
        }
    }
}

impl UpstreamTls {
    /// Plain TCP (left out when serialized).
    pub fn is_off(&self) -> bool {
        *self == Self::Off
    }
}

/// One upstream of a circuit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteInfo {
    /// The model-serving route's ID, when there is one.
    #[serde(default, alias = "route-id")]
    pub route_id: Option<Uuid>,
    /// The session that runs the app.
    #[serde(alias = "session-id")]
    pub session_id: Uuid,
    /// The session's name, when known.
    #[serde(default, alias = "session-name")]
    pub session_name: Option<String>,
    /// Where the app listens.
    #[serde(alias = "kernel-host")]
    pub kernel_host: String,
    /// Where the app listens.
    #[serde(alias = "kernel-port")]
    pub kernel_port: u16,
    /// The app's protocol.
    #[serde(default)]
    pub protocol: ProxyProtocol,
    /// Relative share of traffic among the circuit's routes.
    #[serde(default = "one", alias = "traffic-ratio")]
    pub traffic_ratio: f64,
    /// What the coordinator's active health check last decided (`null` until a
    /// check decides, or when the endpoint has none). Workers send no traffic to an
    /// `unhealthy` route while another route is not unhealthy.
    #[serde(default, alias = "health-status")]
    pub health_status: Option<RouteHealth>,
    /// Whether the app serves HTTPS on `kernel_port` (HTTP circuits).
    #[serde(
        default,
        alias = "upstream-tls",
        skip_serializing_if = "UpstreamTls::is_off"
    )]
    pub upstream_tls: UpstreamTls,
}

/// A route's state as the active health check judges it (the original's
/// `ModelServiceStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteHealth {
    /// Answered the health path with the expected status.
    Healthy,
    /// Failed `max_retries` checks in a row.
    Unhealthy,
}

impl RouteHealth {
    /// The wire value (`healthy` / `unhealthy`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
        }
    }
}

fn one() -> f64 {
    1.0
}

/// A circuit: one app of one session exposed through one worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Circuit {
    /// Unique circuit ID.
    pub id: Uuid,
    /// App name (`jupyter`, `vscode`, …).
    #[serde(default)]
    pub app: Option<String>,
    /// Traffic protocol.
    #[serde(default)]
    pub protocol: ProxyProtocol,
    /// The worker that serves the circuit (absent in standalone configs).
    #[serde(default)]
    pub worker: Option<Uuid>,
    /// Interactive or inference.
    #[serde(default)]
    pub app_mode: AppMode,
    /// Port or wildcard.
    #[serde(default)]
    pub frontend_mode: FrontendMode,
    /// Environment handed to the app.
    #[serde(default)]
    pub envs: BTreeMap<String, serde_json::Value>,
    /// App arguments.
    #[serde(default)]
    pub arguments: Option<String>,
    /// Skip credentials when true.
    #[serde(default)]
    pub open_to_public: bool,
    /// Client IP allowlist (CIDRs or bare IPs); on the wire a comma-separated string
    /// or null, in config files a string or a list.
    #[serde(
        default,
        serialize_with = "ser_ip_list",
        deserialize_with = "de_ip_list"
    )]
    pub allowed_client_ips: Vec<String>,
    /// Port-mode frontend port.
    #[serde(default)]
    pub port: Option<u16>,
    /// Wildcard-mode subdomain.
    #[serde(default)]
    pub subdomain: Option<String>,
    /// The owner; keys the permit cookie.
    #[serde(default)]
    pub user_id: Option<Uuid>,
    /// The model-serving endpoint, for inference circuits.
    #[serde(default)]
    pub endpoint_id: Option<Uuid>,
    /// Runtime variant of an inference endpoint.
    #[serde(default)]
    pub runtime_variant: Option<String>,
    /// Upstreams.
    #[serde(default, deserialize_with = "de_routes")]
    pub route_info: Vec<RouteInfo>,
    /// Sessions behind the routes.
    #[serde(default)]
    pub session_ids: Vec<Uuid>,
    /// RFC 3339 creation time, as the coordinator wrote it.
    #[serde(default)]
    pub created_at: Option<String>,
    /// RFC 3339 update time, as the coordinator wrote it.
    #[serde(default)]
    pub updated_at: Option<String>,
    /// Who may reuse the circuit's pooled HTTP/1.1 app connections: overrides the
    /// worker's `[upstream] reuse` for this circuit (absent or `null`: the
    /// worker's). Left out of the JSON when unset, so a circuit without it reads
    /// as it always did to peers that do not know the field; a value other than
    /// `shared` or `client` is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_reuse: Option<Reuse>,
}

fn ser_ip_list<S: Serializer>(list: &[String], s: S) -> Result<S::Ok, S::Error> {
    if list.is_empty() {
        s.serialize_none()
    } else {
        s.serialize_str(&list.join(","))
    }
}

fn de_ip_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Text(String),
        List(Vec<String>),
    }
    Ok(match Option::<Form>::deserialize(d)? {
        None => Vec::new(),
        Some(Form::Text(s)) => split_ip_list(&s),
        Some(Form::List(items)) => items.iter().flat_map(|s| split_ip_list(s)).collect(),
    })
}

fn split_ip_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Older rows hold `route_info` as a JSON *string*; accept both forms. A visitor, not
/// an untagged enum, so an error inside a route keeps its message and its path
/// (`route_info[0].route_id: invalid UUID …`).
fn de_routes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<RouteInfo>, D::Error> {
    struct Routes;
    impl<'de> serde::de::Visitor<'de> for Routes {
        type Value = Vec<RouteInfo>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of routes, or a JSON string holding one")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            Vec::<RouteInfo>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            serde_json::from_str(text).map_err(E::custom)
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }

        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(Routes)
        }
    }
    d.deserialize_option(Routes)
}

/// A parsed allowlist entry: a network and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length in bits.
    pub prefix: u8,
}

impl IpNet {
    /// Parses `a.b.c.d/n`, `x::y/n` or a bare address (a host route), non-strictly:
    /// host bits may be set.
    pub fn parse(s: &str) -> Option<Self> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (
                a.trim().parse::<IpAddr>().ok()?,
                Some(p.trim().parse::<u8>().ok()?),
            ),
            None => (s.trim().parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return None;
        }
        // An IPv4-mapped network (`::ffff:10.0.0.0/104`) is the IPv4 network it maps:
        // `contains` compares mapped clients as IPv4, so it must too.
        if let IpAddr::V6(v6) = addr {
            if let (Some(v4), true) = (v6.to_ipv4_mapped(), prefix >= 96) {
                return Some(Self {
                    addr: IpAddr::V4(v4),
                    prefix: prefix - 96,
                });
            }
        }
        Some(Self { addr, prefix })
    }

    /// Whether `ip` is inside this network (IPv4-mapped IPv6 matches IPv4 networks).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Metadata of every event: who caused it and under which request.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EventMetadata {
    /// The request that caused the event.
    #[serde(default)]
    pub request_id: Option<RequestIdText>,
    /// The user, when known (kept opaque).
    #[serde(default)]
    pub user: Option<serde_json::Value>,
    /// The user that triggered the event, when known (kept opaque).
    #[serde(default)]
    pub triggered_user: Option<serde_json::Value>,
    /// W3C `traceparent` of the hop that published the event (its span is the
    /// receiver's parent); absent from the wire when there is none. Validated like a
    /// header when read ([`crate::trace::SpanContext::from_header`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// W3C `tracestate` that came with that hop's `traceparent` (vendors' entries,
    /// forwarded unchanged); absent when there is none. Validated when read
    /// ([`crate::trace::TraceState::parse`]; an invalid one is dropped whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// A request ID as it appears in event metadata: any string a peer sent. It is
/// validated when restored into a context ([`RequestIdText::validated`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestIdText(pub String);

impl RequestIdText {
    /// The ID, when it is valid.
    pub fn validated(&self) -> Option<RequestId> {
        RequestId::parse(self.0.as_bytes()).ok()
    }
}

impl From<RequestId> for RequestIdText {
    fn from(id: RequestId) -> Self {
        Self(id.as_str().to_owned())
    }
}

/// The broadcast envelope on `events_all-appproxy`: `payload` and `metadata` are JSON
/// text inside JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BroadcastMessage {
    /// Event name.
    pub name: String,
    /// `appproxy-coordinator` or `appproxy-worker`.
    pub source: String,
    /// JSON text of the event body.
    pub payload: String,
    /// JSON text of [`EventMetadata`].
    pub metadata: String,
}

/// The broadcast channel name.
pub const BROADCAST_CHANNEL: &str = "events_all-appproxy";
/// Event: circuits created on a worker.
pub const EVENT_CIRCUIT_CREATED: &str = "appproxy_circuit_created_event";
/// Event: circuits removed from a worker.
pub const EVENT_CIRCUIT_REMOVED: &str = "appproxy_circuit_removed_event";
/// Event: a worker's acknowledgement of created circuits.
pub const EVENT_WORKER_CIRCUIT_ADDED: &str = "appproxy_worker_circuit_added_event";
/// Event: a circuit's routes changed.
pub const EVENT_CIRCUIT_ROUTE_UPDATED: &str = "appproxy_circuit_route_updated_event";

/// Body of the circuit created / removed / added events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CircuitsEvent {
    /// The worker the event is for; others drop it.
    pub target_worker_authority: String,
    /// The circuits concerned.
    pub circuits: Vec<Circuit>,
    /// In a worker's acknowledgement: circuits it could not deploy (their frontend
    /// could not listen), which are therefore not in `circuits`. Absent elsewhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<FailedCircuit>,
    /// In a worker's acknowledgement: the ID of the request that created each circuit
    /// (acknowledged or failed), so a batch deployed under its own ID stays traceable
    /// to every creating request. Absent elsewhere.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub origin_request_ids: std::collections::BTreeMap<uuid::Uuid, String>,
}

impl CircuitsEvent {
    /// An event about `circuits` for the worker `authority`.
    pub fn new(authority: impl Into<String>, circuits: Vec<Circuit>) -> Self {
        Self {
            target_worker_authority: authority.into(),
            circuits,
            failed: Vec::new(),
            origin_request_ids: Default::default(),
        }
    }
}

/// A circuit a worker could not deploy, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedCircuit {
    /// The circuit.
    pub id: uuid::Uuid,
    /// What failed (e.g. the frontend port is held by another process).
    #[serde(default = "not_deployed")]
    pub reason: String,
    /// Whether it failed because its frontend could not listen (the port is held by
    /// another process, say), not because the worker refused the circuit (an app
    /// host it could not resolve, a frontend another circuit holds): only such a
    /// failure says anything about the port. Absent (false) from an older worker,
    /// whose failures therefore mark no port.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub listen: bool,
}

fn not_deployed() -> String {
    "not deployed".to_owned()
}

/// Body of the route-updated event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteUpdatedEvent {
    /// The worker the event is for; others drop it.
    pub target_worker_authority: String,
    /// The circuit, as it is now.
    pub circuit: Circuit,
    /// Its new routes.
    pub routes: Vec<RouteInfo>,
}

/// Why an envelope could not be built or read.
#[derive(Debug, thiserror::Error)]
#[error("event envelope: {0}")]
pub struct EnvelopeError(#[from] serde_json::Error);

impl BroadcastMessage {
    /// Wraps `body` and `metadata` in the broadcast envelope.
    pub fn encode<T: Serialize>(
        name: &str,
        source: &str,
        body: &T,
        metadata: &EventMetadata,
    ) -> Result<Self, EnvelopeError> {
        Ok(Self {
            name: name.to_owned(),
            source: source.to_owned(),
            payload: serde_json::to_string(body)?,
            metadata: serde_json::to_string(metadata)?,
        })
    }

    /// Reads the body as `T`.
    pub fn body<T: for<'de> Deserialize<'de>>(&self) -> Result<T, EnvelopeError> {
        Ok(serde_json::from_str(&self.payload)?)
    }

    /// Reads the metadata; a missing or unreadable one is empty metadata.
    pub fn metadata(&self) -> EventMetadata {
        serde_json::from_str(&self.metadata).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WIRE_CIRCUIT: &str = r#"{"id":"c0a8f5d2-1111-4222-8333-444455556666","app":"jupyter","protocol":"http",
 "worker":"a4d1f5d2-1111-4222-8333-444455556666","app_mode":"interactive",
 "frontend_mode":"port","envs":{},"arguments":null,"open_to_public":false,"allowed_client_ips":null,
 "port":10205,"subdomain":null,"user_id":"3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b","endpoint_id":null,"runtime_variant":null,
 "route_info":[{"route_id":null,"session_id":"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b","session_name":null,"kernel_host":"10.0.1.7",
                "kernel_port":30512,"protocol":"http","traffic_ratio":1.0}],
 "session_ids":["5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b"],"created_at":"2026-08-20T01:02:03.456789Z",
 "updated_at":"2026-08-20T01:02:03.456789Z","some_future_field":42}"#;

    #[test]
    fn wire_circuit_round_trip() {
        let c: Circuit = serde_json::from_str(WIRE_CIRCUIT).expect("wire circuit");
        assert_eq!(c.port, Some(10205));
        assert_eq!(c.route_info.len(), 1);
        assert_eq!(c.route_info[0].kernel_port, 30512);
        assert!(c.allowed_client_ips.is_empty());
        let json = serde_json::to_value(&c).expect("serialize");
        assert_eq!(json["allowed_client_ips"], serde_json::Value::Null);
        assert_eq!(json["frontend_mode"], "port");
        let back: Circuit = serde_json::from_value(json).expect("again");
        assert_eq!(back, c);
    }

    /// Protocols by the original's wire values (`ProxyProtocol` in its
    /// `common/types.py`): HTTP/2 is `h2`; `http2`, written before, is read too.
    #[test]
    fn protocols_use_the_originals_wire_values() {
        for (p, wire) in [
            (ProxyProtocol::Http, "http"),
            (ProxyProtocol::Grpc, "grpc"),
            (ProxyProtocol::Http2, "h2"),
            (ProxyProtocol::Tcp, "tcp"),
            (ProxyProtocol::Preopen, "preopen"),
        ] {
            assert_eq!(serde_json::to_value(p).expect("write"), wire);
            assert_eq!(
                serde_json::from_value::<ProxyProtocol>(wire.into()).expect("read"),
                p
            );
        }
        assert_eq!(
            serde_json::from_str::<ProxyProtocol>("\"http2\"").expect("the older name"),
            ProxyProtocol::Http2
        );
        let c: Circuit = serde_json::from_str(&WIRE_CIRCUIT.replace(
            "\"protocol\":\"http\",\n \"worker\"",
            "\"protocol\":\"h2\",\n \"worker\"",
        ))
        .expect("an h2 circuit");
        assert_eq!(c.protocol, ProxyProtocol::Http2);
        assert_eq!(serde_json::to_value(&c).expect("write")["protocol"], "h2");
    }

    /// `upstream_reuse` is left out when unset (the circuit reads as before to an
    /// older peer), round-trips when set, and refuses unknown values by name.
    #[test]
    fn upstream_reuse_is_on_the_wire_only_when_set() {
        let c: Circuit = serde_json::from_str(WIRE_CIRCUIT).expect("wire circuit");
        assert_eq!(c.upstream_reuse, None);
        let json = serde_json::to_value(&c).expect("serialize");
        assert!(json.get("upstream_reuse").is_none(), "{json}");
        for (reuse, text) in [(Reuse::Client, "client"), (Reuse::Shared, "shared")] {
            let set = Circuit {
                upstream_reuse: Some(reuse),
                ..c.clone()
            };
            let json = serde_json::to_value(&set).expect("serialize");
            assert_eq!(json["upstream_reuse"], text);
            assert_eq!(Reuse::parse(text), Some(reuse));
            assert_eq!(reuse.as_str(), text);
            let back: Circuit = serde_json::from_value(json).expect("again");
            assert_eq!(back, set);
        }
        let mut json = serde_json::to_value(&c).expect("serialize");
        json["upstream_reuse"] = serde_json::Value::Null;
        let null: Circuit = serde_json::from_value(json.clone()).expect("null");
        assert_eq!(null.upstream_reuse, None);
        for bad in ["never", "Client", ""] {
            json["upstream_reuse"] = bad.into();
            let err = serde_json::from_value::<Circuit>(json.clone())
                .expect_err("an unknown value")
                .to_string();
            assert!(
                err.contains("unknown variant")
                    && err.contains("`shared`")
                    && err.contains("`client`"),
                "{bad}: {err}"
            );
        }
        json["upstream_reuse"] = 1.into();
        assert!(serde_json::from_value::<Circuit>(json).is_err());
        assert_eq!(Reuse::parse("never"), None);
    }

    #[test]
    fn kebab_case_routes_and_string_routes() {
        let kebab = r#"{"route-id":null,"session-id":"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b",
            "kernel-host":"h","kernel-port":1,"traffic-ratio":0.5,"extra":1}"#;
        let r: RouteInfo = serde_json::from_str(kebab).expect("kebab");
        assert_eq!((r.kernel_port, r.traffic_ratio), (1, 0.5));
        let as_text = serde_json::json!({
            "id": "c0a8f5d2-1111-4222-8333-444455556666",
            "route_info": serde_json::to_string(&vec![r.clone()]).expect("text"),
        });
        let c: Circuit = serde_json::from_value(as_text).expect("string route_info");
        assert_eq!(c.route_info, vec![r]);
    }

    #[test]
    fn ip_lists() {
        let c: Circuit = serde_json::from_value(serde_json::json!({
            "id": "c0a8f5d2-1111-4222-8333-444455556666",
            "allowed_client_ips": "10.0.0.0/8, 192.168.1.1",
        }))
        .expect("string form");
        assert_eq!(c.allowed_client_ips, vec!["10.0.0.0/8", "192.168.1.1"]);
        let net = IpNet::parse("10.0.0.0/8").expect("cidr");
        assert!(net.contains("10.2.3.4".parse().expect("ip")));
        assert!(net.contains("::ffff:10.2.3.4".parse().expect("ip")));
        assert!(!net.contains("11.0.0.1".parse().expect("ip")));
        let host = IpNet::parse("192.168.1.1").expect("host");
        assert!(host.contains("192.168.1.1".parse().expect("ip")));
        assert!(!host.contains("192.168.1.2".parse().expect("ip")));
        assert!(IpNet::parse("0.0.0.0/0")
            .expect("all")
            .contains("8.8.8.8".parse().expect("ip")));
        assert!(IpNet::parse("10.0.0.0/33").is_none());
        assert!(IpNet::parse("nonsense").is_none());
        let v6 = IpNet::parse("fd00::/8").expect("v6");
        assert!(v6.contains("fd12::1".parse().expect("ip")));
        // An IPv4-mapped network is the IPv4 network it maps, for IPv4 clients and
        // IPv4-mapped ones alike.
        let mapped = IpNet::parse("::ffff:10.1.0.0/112").expect("mapped");
        assert_eq!(mapped, IpNet::parse("10.1.0.0/16").expect("v4"));
        assert!(mapped.contains("10.1.2.3".parse().expect("ip")));
        assert!(mapped.contains("::ffff:10.1.2.3".parse().expect("ip")));
        assert!(!mapped.contains("10.2.0.1".parse().expect("ip")));
        assert!(IpNet::parse("::ffff:10.1.0.0/129").is_none());
    }

    #[test]
    fn broadcast_envelope_is_json_in_json() {
        let c: Circuit = serde_json::from_str(WIRE_CIRCUIT).expect("wire circuit");
        let body = CircuitsEvent::new("worker-1", vec![c]);
        let meta = EventMetadata {
            request_id: Some(RequestIdText("req-1".into())),
            ..Default::default()
        };
        let msg =
            BroadcastMessage::encode(EVENT_CIRCUIT_CREATED, "appproxy-coordinator", &body, &meta)
                .expect("encode");
        let wire = serde_json::to_value(&msg).expect("wire");
        assert!(wire["payload"].is_string());
        assert!(wire["metadata"].is_string());
        let back: BroadcastMessage = serde_json::from_value(wire).expect("decode");
        assert_eq!(back.body::<CircuitsEvent>().expect("body"), body);
        assert_eq!(
            back.metadata()
                .request_id
                .and_then(|r| r.validated())
                .map(|r| r.to_string()),
            Some("req-1".to_owned())
        );
    }
}
