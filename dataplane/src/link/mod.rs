//! The data plane's side of its one seam with the control plane: [`ControlLink`],
//! what the agent ([`crate::agent`]) needs from a coordinator — register, heartbeat,
//! read the worker's circuit set (by page or by change), hear circuit events,
//! acknowledge deployments, write last-access marks, deregister — in the typed wire
//! shapes of [`appproxy_shared::wire`], and [`Notice`], what it hears.
//!
//! Two implementations exist: [`RemoteLink`] here (the coordinator's HTTP API, Redis
//! events, acknowledgements and marks), and the single-node one, which calls a
//! coordinator running in the same process and lives with the binary that composes
//! both (`appproxy-node`), so this crate never depends on the control plane.

pub mod remote;

pub use remote::RemoteLink;

use appproxy_shared::model::{Circuit, CircuitsEvent};
use appproxy_shared::wire::{AccessMark, CircuitSet, EventKind, WorkerRegistration};
use appproxy_shared::RequestId;

/// Why a coordinator call failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
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
    /// The coordinator in this process failed (its start, or its store).
    #[error("embedded coordinator: {0}")]
    Embedded(String),
}

/// What the agent needs from its coordinator. The agent drives a link from one
/// current-thread runtime (its own thread), so the futures need not be `Send`; a link
/// itself moves to that thread.
#[allow(async_fn_in_trait)]
pub trait ControlLink: Send + 'static {
    /// Registers (or re-registers) this worker; its ID.
    async fn register(&self, registration: &WorkerRegistration) -> Result<uuid::Uuid, LinkError>;

    /// Tells the coordinator this worker (node) is alive; how far the clock idle
    /// collection compares marks with is ahead of this worker's (seconds, negative
    /// behind), when the answer says so and came quickly enough to tell.
    async fn heartbeat(&self, worker: uuid::Uuid) -> Result<Option<f64>, LinkError>;

    /// This node leaves (at no node left the worker is `LOST`: nothing new is placed
    /// on it).
    async fn deregister(&self, worker: uuid::Uuid) -> Result<(), LinkError>;

    /// What changed in the worker's set after revision `since` (or "resync").
    async fn changes(&self, worker: uuid::Uuid, since: u64) -> Result<CircuitSet, LinkError>;

    /// One page of the worker's set, from after `after` (`None`: the first).
    async fn page(
        &self,
        worker: uuid::Uuid,
        after: Option<uuid::Uuid>,
    ) -> Result<CircuitSet, LinkError>;

    /// Starts hearing circuit events for the worker `authority` (a task on the
    /// current runtime): every event, and every (re)subscription, is sent to `tx`.
    /// A link without events sends nothing (the agent polls).
    fn follow(&self, authority: &str, tx: tokio::sync::mpsc::UnboundedSender<Notice>);

    /// Acknowledges a deployment (`appproxy_worker_circuit_added_event`): the
    /// circuits every core has, those that failed and the creating requests, under the
    /// current request context, with the deployment's `tracestate`; whether it left.
    async fn acknowledge(
        &self,
        ack: CircuitsEvent,
        tracestate: Option<&appproxy_shared::TraceState>,
    ) -> bool;

    /// Writes last-access marks, all or none; whether they were written (the agent
    /// keeps those that were not and writes them with the next).
    async fn record_marks(&self, marks: &[AccessMark]) -> bool;
}

/// One reason for the agent to look at the circuit set again.
#[derive(Debug, Default)]
pub struct Notice {
    /// The request that caused it (an event's metadata).
    pub request_id: Option<RequestId>,
    /// The deployment's span: a child of the coordinator's (the event's
    /// `traceparent`), else derived from `request_id`.
    pub span: Option<appproxy_shared::trace::SpanContext>,
    /// The event's validated `tracestate` (with its `traceparent` only), sent on
    /// with the acknowledgement's `traceparent`.
    pub tracestate: Option<appproxy_shared::TraceState>,
    /// Circuits announced as created: acknowledged once every core has them.
    pub created: Vec<uuid::Uuid>,
    /// What the event changed, when it says (then no fetch is needed); `None` for a
    /// poll, a (re)subscription or an unreadable event: fetch what changed.
    pub delta: Option<Delta>,
    /// A (re)subscription: events published meanwhile were lost, so once the set is
    /// deployed every circuit of it is acknowledged (a creation still waiting gets its
    /// answer) — an empty acknowledgement tells the coordinator the worker hears
    /// events again.
    pub resync: bool,
}

impl Notice {
    /// Events were (re)subscribed to: some may have been lost.
    pub fn resubscribed() -> Self {
        Self {
            resync: true,
            ..Default::default()
        }
    }

    /// An event of `kind` about `circuits` (as they are now), caused by `request_id`.
    pub fn event(
        kind: EventKind,
        circuits: Vec<Circuit>,
        request_id: Option<RequestId>,
        span: Option<appproxy_shared::trace::SpanContext>,
    ) -> Self {
        Self {
            request_id,
            span,
            tracestate: None,
            created: if kind == EventKind::Created {
                circuits.iter().map(|c| c.id).collect()
            } else {
                Vec::new()
            },
            delta: Some(Delta::of(kind, circuits, request_id)),
            resync: false,
        }
    }
}

/// A change an event carries.
#[derive(Debug)]
pub enum Delta {
    /// Circuits created or updated, with the ID of the request that caused it.
    Upsert(Vec<Circuit>, Option<RequestId>),
    /// Circuits removed, with the ID of the request that removed them.
    Remove(Vec<uuid::Uuid>, Option<RequestId>),
}

impl Delta {
    /// The change an event of `kind` about `circuits` makes.
    pub fn of(kind: EventKind, circuits: Vec<Circuit>, request_id: Option<RequestId>) -> Self {
        match kind {
            EventKind::Removed => {
                Delta::Remove(circuits.iter().map(|c| c.id).collect(), request_id)
            }
            EventKind::Created | EventKind::RouteUpdated => Delta::Upsert(circuits, request_id),
        }
    }
}
