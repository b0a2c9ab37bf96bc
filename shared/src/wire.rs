//! The worker ⇄ coordinator contract as typed serde structs, used by both sides: the
//! coordinator serializes what it answers and publishes, the worker's agent reads it
//! (and the other way round for registrations and acknowledgements). The JSON is the
//! original platform's where it has one; what the product adds (`revision`,
//! `origins`, `traces`, `removed`, `removed_by`, `more`, `resync`, `node_id`) is
//! summarised in `docs/wire.md`.
//!
//! - [`WorkerRegistration`] (`PUT /api/worker`), [`Registered`] and [`Heartbeat`]
//!   (its `?brief=true` answers) and [`Success`] (`DELETE /api/worker/{id}`);
//! - [`CircuitSet`]: a page of a worker's set or what changed in it
//!   (`GET /api/worker/{id}/circuits?after=…` / `?since=…`);
//! - [`EventKind`] and the event bodies of [`crate::model`] ([`CircuitsEvent`],
//!   [`RouteUpdatedEvent`]), read through [`EventTarget`] when the full body does not
//!   read;
//! - acknowledgements: a [`CircuitsEvent`] with `failed` and `origin_request_ids`
//!   (`appproxy_worker_circuit_added_event`);
//! - [`AccessMark`]: last-access marks and request counts, with the Redis commands
//!   that write them ([`MarkCommand`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{
    AppMode, Circuit, CircuitsEvent, FrontendMode, ProxyProtocol, RouteUpdatedEvent,
    EVENT_CIRCUIT_CREATED, EVENT_CIRCUIT_REMOVED, EVENT_CIRCUIT_ROUTE_UPDATED,
};

/// A worker's registration (`PUT /api/worker`), in the original's shape plus
/// `node_id` (which HA node of the authority registers). Keys a worker sends that
/// this struct does not name are kept in `extra`, so a registration reads and writes
/// back whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRegistration {
    /// The worker's unique name (1–255 characters).
    pub authority: String,
    /// Port or wildcard.
    pub frontend_mode: FrontendMode,
    /// The worker's protocol (`http`).
    #[serde(default)]
    pub protocol: ProxyProtocol,
    /// Where clients and the coordinator reach it.
    pub hostname: String,
    /// Whether the worker terminates TLS itself.
    #[serde(default)]
    pub tls_listen: bool,
    /// Whether clients reach it over HTTPS (its own TLS or a terminator in front).
    #[serde(default)]
    pub tls_advertised: bool,
    /// The worker's API port (`/setup`, wildcard traffic when it is the same).
    #[serde(default)]
    pub api_port: Option<u64>,
    /// A port worker's frontend ports, inclusive.
    #[serde(default)]
    pub port_range: Option<[u16; 2]>,
    /// A wildcard worker's domain (leading dot).
    #[serde(default)]
    pub wildcard_domain: Option<String>,
    /// A wildcard worker's traffic port.
    #[serde(default)]
    pub wildcard_traffic_port: Option<u16>,
    /// Which circuits it takes (absent or `null`: every kind).
    #[serde(default = "every_traffic", deserialize_with = "traffics_or_every")]
    pub accepted_traffics: Vec<AppMode>,
    /// Whether it takes only circuits its `app_filters` match.
    #[serde(default)]
    pub filtered_apps_only: bool,
    /// Placement filters (`{key, value}`), only ever added to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_filters: Option<Vec<AppFilter>>,
    /// A Traefik worker's marker socket path (kept, never used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traefik_last_used_marker_path: Option<String>,
    /// This node among the worker's HA nodes (stable across restarts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Keys not named above, kept as sent.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn every_traffic() -> Vec<AppMode> {
    vec![AppMode::Interactive, AppMode::Inference]
}

fn traffics_or_every<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<AppMode>, D::Error> {
    Ok(Option::<Vec<AppMode>>::deserialize(d)?.unwrap_or_else(every_traffic))
}

/// Whether `host` (a worker's `hostname`) can stand as the host of a URL as it is
/// (`http://{host}:{port}`): a name or an IPv4 address holds no `:`, and an IPv6
/// address is written in brackets (`[2001:db8::5]`). A bare one made
/// `http://2001:db8::5:26999/…`, a URL nobody can use. The one rule the worker's
/// configuration and the coordinator's registration check.
pub fn url_host_ok(host: &str) -> bool {
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(inner) => inner.parse::<std::net::Ipv6Addr>().is_ok(),
        None => !host.contains(':'),
    }
}

/// The host a URL names `addr` by: an IPv6 address in brackets.
pub fn url_host_of(addr: std::net::IpAddr) -> String {
    match addr {
        std::net::IpAddr::V6(a) => format!("[{a}]"),
        std::net::IpAddr::V4(a) => a.to_string(),
    }
}

impl WorkerRegistration {
    /// A port worker's frontend ports (`None` when absent or reversed).
    pub fn ports(&self) -> Option<(u16, u16)> {
        self.port_range
            .and_then(|[lo, hi]| (hi >= lo).then_some((lo, hi)))
    }

    /// Whether clients reach it over HTTPS (its own TLS or a terminator in front).
    pub fn https(&self) -> bool {
        self.tls_listen || self.tls_advertised
    }
}

/// One placement filter of a registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppFilter {
    /// What it looks at (`session.domain_name`, …).
    pub key: String,
    /// The value it wants (a string, or any JSON value compared as text).
    pub value: serde_json::Value,
}

/// The answer to a registration with `?brief=true` (a full answer, the
/// `WorkerResponseModel`, reads as this too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registered {
    /// The worker's ID: the path of its later calls.
    pub id: Uuid,
}

/// The answer to a heartbeat (`PATCH /api/worker/{id}?brief=true`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Always true (a refusal is an error answer).
    #[serde(default)]
    pub success: bool,
    /// The worker's ID.
    pub id: Uuid,
    /// The time on the clock idle collection compares last-access marks with (the
    /// store's: PostgreSQL's, or the coordinator's own over SQLite), Unix seconds,
    /// when the coordinator could read it. A worker writes its marks on this clock
    /// (its own, corrected by the offset it measures), so that a worker whose clock
    /// is behind does not have its circuits collected early by the lag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<f64>,
}

/// `{"success": true}` (deregistration, deletions).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Success {
    /// Always true (a refusal is an error answer).
    pub success: bool,
}

impl Success {
    /// `{"success": true}`.
    pub const YES: Self = Self { success: true };
}

/// How many circuits one page or change list carries at most.
pub const MAX_CIRCUITS_PER_ANSWER: usize = 5_000;

/// A page of a worker's set (`?after=<id>&limit=N`: `revision`, `circuits`,
/// `origins`, `traces`, `next`), what changed in it (`?since=R`: `revision`,
/// `circuits`, `origins`, `traces`, `removed`, `removed_by`, `more`), or "read the
/// whole set" (`revision`, `resync: true`). Circuits come in the wire shape with the
/// request that created each beside them in `origins`; removed circuits with the
/// request that removed each in `removed_by`.
///
/// `C` is the circuit type: [`Circuit`], or `serde_json::Value` to read an answer
/// circuit by circuit when one of them does not read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CircuitSet<C = Circuit> {
    /// The worker's revision the answer brings the reader to.
    pub revision: u64,
    /// Only the whole set will do (the change log no longer reaches `since`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resync: bool,
    /// New or changed circuits (absent in a resync answer).
    #[serde(default = "Option::default", skip_serializing_if = "Option::is_none")]
    pub circuits: Option<Vec<C>>,
    /// The creating request of each circuit that has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origins: Option<BTreeMap<Uuid, String>>,
    /// The W3C trace context of the request behind each circuit's latest change
    /// (its creation, a route update, or — for a circuit in `removed` — its
    /// removal), for those that have one; absent when none has. Read leniently: an
    /// entry that does not read is left out, never the answer.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "lenient_map"
    )]
    pub traces: BTreeMap<Uuid, ChangeTrace>,
    /// A page's: where the next page starts (`null` on the last page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<Option<Uuid>>,
    /// A change list's: circuits removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed: Option<Vec<Uuid>>,
    /// A change list's: the ID of the request that removed each circuit of
    /// `removed` that has one; absent when none has (and from coordinators that
    /// do not keep them). Read leniently, as `traces`: an entry that does not read
    /// is left out, never the answer.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "lenient_map"
    )]
    pub removed_by: BTreeMap<Uuid, String>,
    /// A change list's: asking again from `revision` gives more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub more: Option<bool>,
}

impl<C> CircuitSet<C> {
    /// "Read the whole set": `{"revision","resync":true}`.
    pub fn resync(revision: u64) -> Self {
        Self {
            revision,
            resync: true,
            circuits: None,
            origins: None,
            traces: BTreeMap::new(),
            next: None,
            removed: None,
            removed_by: BTreeMap::new(),
            more: None,
        }
    }

    /// One page of the set; `next` is where the following one starts.
    pub fn page(
        revision: u64,
        circuits: Vec<C>,
        origins: BTreeMap<Uuid, String>,
        next: Option<Uuid>,
    ) -> Self {
        Self {
            revision,
            resync: false,
            circuits: Some(circuits),
            origins: Some(origins),
            traces: BTreeMap::new(),
            next: Some(next),
            removed: None,
            removed_by: BTreeMap::new(),
            more: None,
        }
    }

    /// What changed after a revision.
    pub fn changes(
        revision: u64,
        circuits: Vec<C>,
        origins: BTreeMap<Uuid, String>,
        removed: Vec<Uuid>,
        more: bool,
    ) -> Self {
        Self {
            revision,
            resync: false,
            circuits: Some(circuits),
            origins: Some(origins),
            traces: BTreeMap::new(),
            next: None,
            removed: Some(removed),
            removed_by: BTreeMap::new(),
            more: Some(more),
        }
    }

    /// Where the next page starts, if there is one.
    pub fn next_page(&self) -> Option<Uuid> {
        self.next.flatten()
    }

    /// The answer with the trace context behind each circuit's latest change.
    pub fn with_traces(mut self, traces: BTreeMap<Uuid, ChangeTrace>) -> Self {
        self.traces = traces;
        self
    }

    /// The answer with the ID of the request behind each removal.
    pub fn with_removed_by(mut self, removed_by: BTreeMap<Uuid, String>) -> Self {
        self.removed_by = removed_by;
        self
    }

    /// The ID of the request that removed circuit `id`, when the answer names one
    /// that is a valid request ID ([`crate::RequestId::parse`]).
    pub fn remover_of(&self, id: &Uuid) -> Option<crate::RequestId> {
        crate::RequestId::parse(self.removed_by.get(id)?.as_bytes()).ok()
    }

    /// The validated trace context behind circuit `id`'s latest change, when the
    /// answer has one that reads ([`crate::trace::TraceContext::read`]: an invalid
    /// `traceparent` is none, a `tracestate` only with a valid one).
    pub fn trace_of(&self, id: &Uuid) -> Option<crate::trace::TraceContext> {
        let t = self.traces.get(id)?;
        crate::trace::TraceContext::read(Some(&t.traceparent), t.tracestate.as_deref())
    }
}

/// The trace context of the request behind a circuit's latest change, as a set
/// answer carries it (text, validated by the reader).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeTrace {
    /// W3C `traceparent` naming the coordinator's span of that request.
    pub traceparent: String,
    /// W3C `tracestate` that came with it; absent when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

impl From<&crate::trace::TraceContext> for ChangeTrace {
    fn from(t: &crate::trace::TraceContext) -> Self {
        Self {
            traceparent: t.traceparent_text(),
            tracestate: t.tracestate_text().map(str::to_owned),
        }
    }
}

/// A map of a set answer keyed by circuit ID, read leniently (`traces`,
/// `removed_by`): entries that do not read (a key that is not a UUID, a value not of
/// the shape) are left out, and anything but an object reads as none — what such a
/// map says is never worth the circuits it comes with. (`removed_by`'s IDs are then
/// validated by the reader, [`CircuitSet::remover_of`].)
fn lenient_map<'de, D, T>(d: D) -> Result<BTreeMap<Uuid, T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let serde_json::Value::Object(map) = serde_json::Value::deserialize(d)? else {
        return Ok(BTreeMap::new());
    };
    Ok(map
        .into_iter()
        .filter_map(|(k, v)| {
            Some((
                Uuid::parse_str(&k).ok()?,
                serde_json::from_value::<T>(v).ok()?,
            ))
        })
        .collect())
}

/// The whole set without a query (`GET /api/worker/{id}/circuits`, the original's
/// call): every circuit with the request that created it inline, and the worker's
/// `revision`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WholeSet {
    /// The circuits.
    pub circuits: Vec<CircuitWithOrigin>,
    /// The worker's revision.
    pub revision: u64,
}

/// A circuit in the wire shape plus the ID of the request that created it (other
/// readers ignore the extra field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CircuitWithOrigin {
    /// The circuit.
    #[serde(flatten)]
    pub circuit: Circuit,
    /// Its creating request, when known.
    pub origin_request_id: Option<String>,
}

/// What a circuit event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Circuits created on the worker.
    Created,
    /// Circuits removed from the worker.
    Removed,
    /// A circuit's routes replaced.
    RouteUpdated,
}

impl EventKind {
    /// The platform's event name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Created => EVENT_CIRCUIT_CREATED,
            Self::Removed => EVENT_CIRCUIT_REMOVED,
            Self::RouteUpdated => EVENT_CIRCUIT_ROUTE_UPDATED,
        }
    }

    /// The kind of the event named `name`, if it is a circuit event.
    pub fn of_name(name: &str) -> Option<Self> {
        match name {
            EVENT_CIRCUIT_CREATED => Some(Self::Created),
            EVENT_CIRCUIT_REMOVED => Some(Self::Removed),
            EVENT_CIRCUIT_ROUTE_UPDATED => Some(Self::RouteUpdated),
            _ => None,
        }
    }
}

/// A circuit event's body as the coordinator publishes it: [`CircuitsEvent`] for
/// creations and removals, [`RouteUpdatedEvent`] for route updates.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EventBody {
    /// `{"target_worker_authority","circuits"}`.
    Circuits(CircuitsEvent),
    /// `{"target_worker_authority","circuit","routes"}`.
    RouteUpdated(Box<RouteUpdatedEvent>),
}

impl EventBody {
    /// The body of a `kind` event about `circuits` for the worker `authority` (a
    /// route update names its first circuit; `None` when it has none).
    pub fn new(kind: EventKind, authority: &str, circuits: Vec<Circuit>) -> Option<Self> {
        Some(match kind {
            EventKind::RouteUpdated => {
                let circuit = circuits.into_iter().next()?;
                Self::RouteUpdated(Box::new(RouteUpdatedEvent {
                    target_worker_authority: authority.to_owned(),
                    routes: circuit.route_info.clone(),
                    circuit,
                }))
            }
            _ => Self::Circuits(CircuitsEvent::new(authority, circuits)),
        })
    }

    /// Reads the body of the event `kind` from its JSON text: the circuits it is
    /// about, as they are now (a route update's circuit carries its new routes).
    pub fn read(
        kind: EventKind,
        payload: &str,
    ) -> Result<(String, Vec<Circuit>), serde_json::Error> {
        Ok(match kind {
            EventKind::RouteUpdated => {
                let e: RouteUpdatedEvent = serde_json::from_str(payload)?;
                (e.target_worker_authority.clone(), vec![e.into_circuit()])
            }
            _ => {
                let e: CircuitsEvent = serde_json::from_str(payload)?;
                (e.target_worker_authority, e.circuits)
            }
        })
    }
}

impl RouteUpdatedEvent {
    /// The circuit with the event's routes (and the sessions behind them).
    pub fn into_circuit(self) -> Circuit {
        let mut circuit = self.circuit;
        circuit.session_ids = self.routes.iter().map(|r| r.session_id).collect();
        circuit.route_info = self.routes;
        circuit
    }
}

/// What every circuit event body says even when the rest does not read: whom it is
/// for and which circuits it names.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EventTarget {
    /// The worker the event is for.
    pub target_worker_authority: String,
    /// The circuits named (IDs only).
    #[serde(default)]
    pub circuits: Vec<CircuitRef>,
}

/// A circuit named by its ID only.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CircuitRef {
    /// The circuit.
    pub id: Uuid,
}

/// Marks of one circuit from one flush of a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessMark {
    /// The circuit.
    pub circuit: Uuid,
    /// Its sessions (their `last_access` keys are marked too).
    pub sessions: Vec<Uuid>,
    /// Requests (and WebSocket connections) since the last flush.
    pub requests: u64,
    /// Unix time of the newest, in seconds.
    pub last_access: f64,
}

/// Key TTL of last-access marks (2 days), as the original.
pub const LAST_ACCESS_TTL_SECS: u64 = 172_800;
/// Key TTL of request counters (1 hour), as the original.
pub const REQUESTS_TTL_SECS: u64 = 3_600;

/// One Redis command writing marks, with the original's keys.
#[derive(Debug, Clone, PartialEq)]
pub enum MarkCommand {
    /// `SET key value EX ttl`.
    Set {
        /// The key.
        key: String,
        /// The value (epoch seconds, six decimals).
        value: String,
        /// Seconds to live.
        ttl: u64,
    },
    /// `INCRBY key by` then `EXPIRE key ttl`.
    IncrBy {
        /// The key.
        key: String,
        /// The increment.
        by: u64,
        /// Seconds to live.
        ttl: u64,
    },
}

/// The Redis key of a circuit's last access.
pub fn circuit_last_access_key(circuit: Uuid) -> String {
    format!("circuit.{circuit}.last_access")
}

/// The Redis key of a circuit's request count.
pub fn circuit_requests_key(circuit: Uuid) -> String {
    format!("circuit.{circuit}.requests")
}

impl AccessMark {
    /// The commands writing this mark: `circuit.{id}.last_access` and
    /// `session.{id}.last_access` (epoch-float text, `EX 172800`), then
    /// `circuit.{id}.requests` (`INCRBY`, `EXPIRE 3600`) when it counts requests.
    pub fn commands(&self) -> Vec<MarkCommand> {
        let at = format!("{:.6}", self.last_access);
        let mut out = Vec::with_capacity(self.sessions.len() + 2);
        out.push(MarkCommand::Set {
            key: circuit_last_access_key(self.circuit),
            value: at.clone(),
            ttl: LAST_ACCESS_TTL_SECS,
        });
        for s in &self.sessions {
            out.push(MarkCommand::Set {
                key: format!("session.{s}.last_access"),
                value: at.clone(),
                ttl: LAST_ACCESS_TTL_SECS,
            });
        }
        if self.requests > 0 {
            out.push(MarkCommand::IncrBy {
                key: circuit_requests_key(self.circuit),
                by: self.requests,
                ttl: REQUESTS_TTL_SECS,
            });
        }
        out
    }
}

/// Adds the commands writing `marks` to `pipe` (results ignored): the one way both the
/// coordinator and a worker write them. The pipeline becomes one `MULTI`/`EXEC`: a
/// Redis that refuses a write (out of memory, read-only) refuses them all, so marks
/// kept to be written again are never counted twice.
#[cfg(feature = "redis")]
pub fn add_marks(pipe: &mut redis::Pipeline, marks: &[AccessMark]) {
    pipe.atomic();
    for command in marks.iter().flat_map(AccessMark::commands) {
        match command {
            MarkCommand::Set { key, value, ttl } => {
                pipe.cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("EX")
                    .arg(ttl)
                    .ignore();
            }
            MarkCommand::IncrBy { key, by, ttl } => {
                pipe.cmd("INCRBY").arg(&key).arg(by).ignore();
                pipe.cmd("EXPIRE").arg(&key).arg(ttl).ignore();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_hosts_are_names_v4_addresses_or_bracketed_v6_addresses() {
        for ok in [
            "proxy1.example.com",
            "192.0.2.7",
            "[2001:db8::5]",
            "[::1]",
            "localhost",
        ] {
            assert!(url_host_ok(ok), "{ok}");
        }
        for bad in [
            "2001:db8::5",
            "::",
            "host:8080",
            "[not-an-ip]",
            "[a:b]",
            "[2001:db8::5",
        ] {
            assert!(!url_host_ok(bad), "{bad}");
        }
        assert_eq!(url_host_of("::1".parse().expect("v6")), "[::1]");
        assert_eq!(url_host_of("10.0.0.1".parse().expect("v4")), "10.0.0.1");
    }

    #[test]
    fn a_registration_without_traffics_takes_every_kind_and_an_empty_list_none() {
        let read = |traffics: &str| {
            serde_json::from_str::<WorkerRegistration>(&format!(
                r#"{{"authority":"w","frontend_mode":"port","hostname":"h"{traffics}}}"#
            ))
            .expect("reads")
            .accepted_traffics
        };
        let every = vec![AppMode::Interactive, AppMode::Inference];
        assert_eq!(read(""), every);
        assert_eq!(read(r#","accepted_traffics":null"#), every);
        assert_eq!(read(r#","accepted_traffics":[]"#), vec![]);
        assert_eq!(
            read(r#","accepted_traffics":["inference"]"#),
            vec![AppMode::Inference]
        );
    }

    #[test]
    fn set_answers_keep_their_shapes() {
        let resync = serde_json::to_value(CircuitSet::<Circuit>::resync(4)).expect("json");
        assert_eq!(resync, serde_json::json!({"revision": 4, "resync": true}));
        let none = CircuitSet::<Circuit>::changes(3, vec![], BTreeMap::new(), vec![], false);
        assert_eq!(
            serde_json::to_value(&none).expect("json"),
            serde_json::json!({"revision": 3, "circuits": [], "origins": {}, "removed": [], "more": false})
        );
        let page = CircuitSet::<Circuit>::page(3, vec![], BTreeMap::new(), None);
        assert_eq!(
            serde_json::to_value(&page).expect("json"),
            serde_json::json!({"revision": 3, "circuits": [], "origins": {}, "next": null})
        );
        let back: CircuitSet =
            serde_json::from_str(r#"{"revision":4,"resync":true}"#).expect("read");
        assert!(back.resync && back.circuits.is_none());
    }

    #[test]
    fn set_answers_carry_trace_contexts_that_never_cost_the_answer() {
        const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let id: Uuid = "c0a8f5d2-1111-4222-8333-444455556666".parse().expect("id");
        let traced = CircuitSet::<Circuit>::changes(3, vec![], BTreeMap::new(), vec![], false)
            .with_traces(
                [(
                    id,
                    ChangeTrace {
                        traceparent: TP.into(),
                        tracestate: Some("rojo=1".into()),
                    },
                )]
                .into(),
            );
        let json = serde_json::to_value(&traced).expect("json");
        assert_eq!(
            json["traces"],
            serde_json::json!({id.to_string(): {"traceparent": TP, "tracestate": "rojo=1"}})
        );
        let back: CircuitSet = serde_json::from_value(json).expect("read");
        let ctx = back.trace_of(&id).expect("a trace");
        assert_eq!(ctx.traceparent_text(), TP);
        assert_eq!(ctx.tracestate_text(), Some("rojo=1"));
        // An answer without traces (an older coordinator) reads, with none.
        let old: CircuitSet = serde_json::from_str(
            r#"{"revision":3,"circuits":[],"origins":{},"removed":[],"more":false}"#,
        )
        .expect("read");
        assert!(old.traces.is_empty() && old.trace_of(&id).is_none());
        // Hostile traces: the answer still reads, the bad entries are none.
        let other = Uuid::new_v4();
        let third = Uuid::new_v4();
        let text = format!(
            r#"{{"revision":3,"circuits":[],"removed":[],"more":false,"traces":{{
                "not-a-uuid":{{"traceparent":"{TP}"}},
                "{id}":{{"traceparent":"00-zz","tracestate":"rojo=1"}},
                "{other}":{{"traceparent":7}},
                "{third}":{{"traceparent":"{TP}","tracestate":"Bad=1"}}}}}}"#
        );
        let back: CircuitSet = serde_json::from_str(&text).expect("read");
        assert_eq!(back.trace_of(&id), None, "an invalid traceparent is none");
        assert_eq!(
            back.trace_of(&other),
            None,
            "a value of the wrong type is left out"
        );
        let third_ctx = back.trace_of(&third).expect("a valid traceparent");
        assert_eq!(
            third_ctx.tracestate, None,
            "an invalid tracestate is dropped"
        );
        for odd in ["null", "[]", "\"x\"", "7"] {
            let back: CircuitSet =
                serde_json::from_str(&format!(r#"{{"revision":3,"circuits":[],"traces":{odd}}}"#))
                    .expect("read");
            assert!(back.traces.is_empty(), "{odd}");
        }
    }

    #[test]
    fn change_lists_name_the_request_behind_each_removal_and_never_cost_the_answer() {
        const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let gone: Uuid = "c0a8f5d2-1111-4222-8333-444455556666".parse().expect("id");
        let answer = CircuitSet::<Circuit>::changes(5, vec![], BTreeMap::new(), vec![gone], false)
            .with_traces(
                [(
                    gone,
                    ChangeTrace {
                        traceparent: TP.into(),
                        tracestate: None,
                    },
                )]
                .into(),
            )
            .with_removed_by([(gone, "manager-D-1".to_owned())].into());
        let json = serde_json::to_value(&answer).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"revision": 5, "circuits": [], "origins": {},
                "traces": {gone.to_string(): {"traceparent": TP}},
                "removed": [gone], "removed_by": {gone.to_string(): "manager-D-1"},
                "more": false})
        );
        let back: CircuitSet = serde_json::from_value(json).expect("read");
        assert_eq!(back, answer);
        assert_eq!(
            back.remover_of(&gone).map(|r| r.to_string()).as_deref(),
            Some("manager-D-1")
        );
        assert_eq!(
            back.trace_of(&gone)
                .map(|t| t.traceparent_text())
                .as_deref(),
            Some(TP)
        );
        // None to name: the field is left out (an older worker's answer shape).
        let plain = CircuitSet::<Circuit>::changes(5, vec![], BTreeMap::new(), vec![gone], false);
        assert!(serde_json::to_value(&plain)
            .expect("json")
            .get("removed_by")
            .is_none());
        // An answer without it (an older coordinator) reads, with none.
        let old: CircuitSet = serde_json::from_str(&format!(
            r#"{{"revision":5,"circuits":[],"origins":{{}},"removed":["{gone}"],"more":false}}"#
        ))
        .expect("read");
        assert!(old.removed_by.is_empty() && old.remover_of(&gone).is_none());
        assert_eq!(old.removed, Some(vec![gone]));
        // Hostile entries: the answer still reads, the bad entries are none.
        let (spaced, long, number, good) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        let text = format!(
            r#"{{"revision":5,"circuits":[],"removed":["{spaced}","{long}","{number}","{good}"],
                "more":false,"removed_by":{{
                "not-a-uuid":"R-1",
                "{spaced}":"not a request id",
                "{long}":"{}",
                "{number}":7,
                "{good}":"R-2"}}}}"#,
            "x".repeat(129)
        );
        let back: CircuitSet = serde_json::from_str(&text).expect("read");
        assert_eq!(back.removed.as_ref().map(Vec::len), Some(4));
        assert_eq!(back.remover_of(&spaced), None, "not a request ID");
        assert_eq!(back.remover_of(&long), None, "longer than a request ID");
        assert!(
            !back.removed_by.contains_key(&number),
            "a value of the wrong type is left out"
        );
        assert_eq!(
            back.remover_of(&good).map(|r| r.to_string()).as_deref(),
            Some("R-2")
        );
        assert_eq!(
            back.removed_by.len(),
            3,
            "the key that is not a UUID is left out"
        );
        for odd in ["null", "[]", "\"x\"", "7", "true"] {
            let back: CircuitSet = serde_json::from_str(&format!(
                r#"{{"revision":3,"removed":["{good}"],"removed_by":{odd}}}"#
            ))
            .expect("read");
            assert!(back.removed_by.is_empty(), "{odd}");
        }
    }

    #[test]
    fn a_whole_set_circuit_is_the_circuit_plus_its_origin() {
        let circuit: Circuit = serde_json::from_value(serde_json::json!({
            "id": "c0a8f5d2-1111-4222-8333-444455556666", "port": 10205,
            "allowed_client_ips": "10.0.0.0/8",
            "route_info": [{"session_id": "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b",
                "kernel_host": "h", "kernel_port": 1}]
        }))
        .expect("circuit");
        let mut expected = serde_json::to_value(&circuit).expect("json");
        expected["origin_request_id"] = serde_json::json!("R");
        let with = CircuitWithOrigin {
            circuit: circuit.clone(),
            origin_request_id: Some("R".into()),
        };
        assert_eq!(serde_json::to_value(&with).expect("json"), expected);
        let back: CircuitWithOrigin = serde_json::from_value(expected).expect("read");
        assert_eq!(back.circuit, circuit);
    }

    #[test]
    fn registrations_keep_unknown_keys() {
        let text = r#"{"authority":"w","frontend_mode":"port","hostname":"h","api_port":1,"port_range":[1,2],"future":7}"#;
        let r: WorkerRegistration = serde_json::from_str(text).expect("read");
        assert_eq!(r.port_range, Some([1, 2]));
        assert_eq!(r.extra["future"], 7);
        let again = serde_json::to_value(&r).expect("json");
        assert_eq!(again["future"], 7);
    }

    #[test]
    fn marks_write_the_originals_keys() {
        let c = Uuid::nil();
        let m = AccessMark {
            circuit: c,
            sessions: vec![c],
            requests: 2,
            last_access: 1.5,
        };
        let cmds = m.commands();
        assert_eq!(cmds.len(), 3);
        assert_eq!(
            cmds[0],
            MarkCommand::Set {
                key: format!("circuit.{c}.last_access"),
                value: "1.500000".into(),
                ttl: LAST_ACCESS_TTL_SECS
            }
        );
    }
}
