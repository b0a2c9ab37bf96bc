//! Circuit events leaving the coordinator and acknowledgements coming back.
//!
//! An event goes to two places: Redis (`PUBLISH events_all-appproxy`, the platform's
//! envelope, the causing request's ID in `metadata.request_id`) when `[redis] url` is
//! set, and the in-process [`LocalBus`] that a worker embedded in the same process
//! (single-node mode) listens on — that path feeds the worker's bridge directly.
//!
//! Acknowledgements (`appproxy_worker_circuit_added_event`) resolve waiters in the
//! [`AckHub`]; they arrive from Redis (a listener task) or straight from an embedded
//! worker.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use appproxy_shared::model::{
    BroadcastMessage, Circuit, CircuitsEvent, EventMetadata, FailedCircuit, RequestIdText,
    BROADCAST_CHANNEL, EVENT_CIRCUIT_REMOVED, EVENT_WORKER_CIRCUIT_ADDED,
};
use appproxy_shared::wire::EventBody;
use appproxy_shared::RequestId;
use tokio::sync::{broadcast, oneshot};

pub use appproxy_shared::wire::EventKind;

/// One circuit event, as both transports carry it.
#[derive(Debug, Clone)]
pub struct CircuitEvent {
    /// What happened.
    pub kind: EventKind,
    /// The worker it is for.
    pub authority: String,
    /// The circuits concerned (one for a route update).
    pub circuits: Vec<Circuit>,
    /// The request that caused it, if any.
    pub request_id: Option<RequestId>,
    /// The span of that request on the coordinator, if traced: sent as the event's
    /// `traceparent`, so the worker's deployment is its child.
    pub span: Option<appproxy_shared::trace::SpanContext>,
}

impl CircuitEvent {
    /// The event body in the wire's shape (`None`: a route update without its
    /// circuit, which has nothing to say).
    pub fn body(&self) -> Option<EventBody> {
        EventBody::new(self.kind, &self.authority, self.circuits.clone())
    }
}

/// The in-process event channel of single-node mode. Lagging receivers re-fetch.
pub type LocalBus = broadcast::Sender<CircuitEvent>;

/// How a creation's wait for its acknowledgement ended.
#[derive(Debug, Clone, PartialEq)]
pub enum AckOutcome {
    /// Every core of the worker has the circuit and its frontend listens.
    Deployed,
    /// The worker could not deploy it, and why.
    Failed {
        /// What failed, in the worker's words.
        reason: String,
        /// Its frontend could not listen (the port is held by another process, say),
        /// rather than the worker refusing the circuit (an app host it could not
        /// resolve): only then is the port remembered as failed
        /// ([`crate::failed_ports`]). False when an older worker does not say.
        listen: bool,
    },
    /// Another creation found the worker unresponsive meanwhile: stop waiting.
    WorkerTripped,
    /// The worker's last node deregistered meanwhile: it deploys nothing more.
    WorkerLeft,
    /// The circuit was removed meanwhile (a delete, an endpoint's removal): its
    /// worker, told to drop it, owes no acknowledgement.
    Removed,
    /// No answer in time.
    TimedOut,
    /// The coordinator is stopping: the caller is answered (and the circuit
    /// withdrawn) within the drain, not cut off when it ends.
    Stopping,
}

/// One registered waiter.
struct Entry {
    /// The worker the circuit was sent to.
    worker: String,
    tx: oneshot::Sender<AckOutcome>,
}

/// Waiters for workers' acknowledgements, by circuit ID.
#[derive(Default)]
pub struct AckHub {
    /// Every waiter of a circuit is told once; entries leave on ack or timeout.
    waiters: Mutex<HashMap<uuid::Uuid, Vec<Entry>>>,
    /// Set (under the waiters' lock) once the coordinator stops: a waiter is told
    /// [`AckOutcome::Stopping`] at once.
    stopping: std::sync::atomic::AtomicBool,
}

impl AckHub {
    /// Registers interest in `circuit`'s acknowledgement by `worker`. Call before
    /// publishing. The waiter leaves the hub when dropped, however the request ends
    /// (acknowledged, timed out, or the caller gone): no entry outlives its request.
    pub fn expect(&self, circuit: uuid::Uuid, worker: &str) -> Waiter<'_> {
        let (tx, rx) = oneshot::channel();
        let mut waiters = self.lock();
        if self.stopping.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = tx.send(AckOutcome::Stopping);
        } else {
            waiters.entry(circuit).or_default().push(Entry {
                worker: worker.to_owned(),
                tx,
            });
        }
        drop(waiters);
        Waiter {
            hub: self,
            circuit,
            rx,
        }
    }

    /// The coordinator is stopping: every creation waiting, and every one that
    /// begins to wait from now on, stops waiting ([`AckOutcome::Stopping`]), so it
    /// withdraws its circuit and answers its caller while the server drains (a wait
    /// of `worker_ack_timeout_secs`, 15 s, outlasted the 5 s drain: the caller's
    /// connection was cut without an answer and the circuit stayed deployed until
    /// another coordinator's sweep). Returns how many were waiting.
    pub fn stop(&self) -> usize {
        let mut waiters = self.lock();
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut told = 0;
        for (_, list) in waiters.drain() {
            for e in list {
                told += 1;
                let _ = e.tx.send(AckOutcome::Stopping);
            }
        }
        told
    }

    /// A worker acknowledged these circuits (the embedded worker: whoever waits).
    pub fn resolve(&self, circuits: impl IntoIterator<Item = uuid::Uuid>) {
        self.tell(
            None,
            circuits.into_iter().map(|id| (id, AckOutcome::Deployed)),
        );
    }

    /// The worker `authority` acknowledged these circuits: only creations that
    /// sent their circuit to it are answered.
    pub fn resolve_from(&self, authority: &str, circuits: impl IntoIterator<Item = uuid::Uuid>) {
        self.tell(
            Some(authority),
            circuits.into_iter().map(|id| (id, AckOutcome::Deployed)),
        );
    }

    /// The worker `authority` could not deploy these circuits: only creations that
    /// sent their circuit to it are answered.
    pub fn reject_from(&self, authority: &str, circuits: impl IntoIterator<Item = FailedCircuit>) {
        self.tell(
            Some(authority),
            circuits.into_iter().map(|f| {
                (
                    f.id,
                    AckOutcome::Failed {
                        reason: f.reason,
                        listen: f.listen,
                    },
                )
            }),
        );
    }

    /// Tells the waiters of each circuit its outcome — with `from`, only those that
    /// sent it to that worker: another worker's word on a circuit (a stale or
    /// misconfigured process, or one publishing what it likes) neither answers a
    /// creation whose worker never deployed it nor withdraws one it did.
    fn tell(&self, from: Option<&str>, outcomes: impl Iterator<Item = (uuid::Uuid, AckOutcome)>) {
        let mut waiters = self.lock();
        for (id, outcome) in outcomes {
            let Some(list) = waiters.remove(&id) else {
                continue;
            };
            let (told, kept): (Vec<Entry>, Vec<Entry>) = list
                .into_iter()
                .partition(|e| from.is_none_or(|w| e.worker == w));
            for e in told {
                let _ = e.tx.send(outcome.clone());
            }
            if !kept.is_empty() {
                if let Some(worker) = from {
                    tracing::warn!(circuit = %id, %worker, "acknowledgement from a worker the circuit was not sent to: ignored");
                }
                waiters.insert(id, kept);
            }
        }
    }

    /// These circuits were removed: whoever waits for them stops waiting (their
    /// worker sends nothing for a circuit no longer deployed).
    pub fn removed(&self, circuits: impl IntoIterator<Item = uuid::Uuid>) {
        self.tell(
            None,
            circuits.into_iter().map(|id| (id, AckOutcome::Removed)),
        );
    }

    /// The worker's breaker opened: every creation still waiting on it stops
    /// waiting (and goes elsewhere) instead of serving out its own timeout.
    pub fn trip(&self, worker: &str) -> usize {
        self.trip_with(worker, &AckOutcome::WorkerTripped)
    }

    /// Every creation still waiting on `worker` stops waiting with `outcome`.
    pub fn trip_with(&self, worker: &str, outcome: &AckOutcome) -> usize {
        let mut waiters = self.lock();
        let ids: Vec<uuid::Uuid> = waiters
            .iter()
            .filter(|(_, list)| list.iter().any(|e| e.worker == worker))
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            for e in waiters.remove(id).unwrap_or_default() {
                let _ = e.tx.send(outcome.clone());
            }
        }
        ids.len()
    }

    /// Whether the coordinator is stopping ([`AckHub::stop`]).
    pub fn is_stopping(&self) -> bool {
        let _waiters = self.lock();
        self.stopping.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<uuid::Uuid, Vec<Entry>>> {
        // Senders only: a panic elsewhere cannot leave the map inconsistent.
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waiters not yet answered (for tests and metrics).
    pub fn pending(&self) -> usize {
        self.lock().len()
    }
}

/// How much later than its timeout an acknowledgement's timer may fire before the
/// process is taken to have been paused or starved meanwhile.
const ACK_LATE: Duration = Duration::from_millis(100);

/// How long an acknowledgement whose timer fired late ([`ACK_LATE`]) is still
/// waited for: one that came meanwhile is read within it.
const ACK_GRACE: Duration = Duration::from_millis(250);

/// One creation waiting for its acknowledgement.
pub struct Waiter<'a> {
    /// Where the waiter is registered.
    hub: &'a AckHub,
    /// The circuit awaited.
    circuit: uuid::Uuid,
    /// Told by [`AckHub::resolve`], [`AckHub::reject_from`], [`AckHub::removed`] or
    /// [`AckHub::trip`].
    rx: oneshot::Receiver<AckOutcome>,
}

impl Waiter<'_> {
    /// Waits up to `timeout`. A timer that fired late (the process was paused or
    /// starved past the timeout) may fire before an acknowledgement that came
    /// meanwhile, waiting in its socket, is read: the acknowledgement then gets
    /// [`ACK_GRACE`] more to be read before the wait is a timeout.
    pub async fn wait(mut self, timeout: Duration) -> AckOutcome {
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(timeout, &mut self.rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => AckOutcome::TimedOut,
            Err(_) => {
                let late = started.elapsed() > timeout + ACK_LATE;
                let grace = if late { ACK_GRACE } else { Duration::ZERO };
                match tokio::time::timeout(grace, &mut self.rx).await {
                    Ok(Ok(outcome)) => outcome,
                    _ => AckOutcome::TimedOut,
                }
            }
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.hub.lock().remove(&self.circuit);
    }
}

/// Redis reconnections: `[0]` pub/sub subscriptions re-opened after a failure or a
/// drop, `[1]` commands retried on a fresh connection after an error.
pub static REDIS_RECONNECTS: [std::sync::atomic::AtomicU64; 2] = [
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
];

fn reconnected(i: usize) {
    REDIS_RECONNECTS[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// A command connection was replaced after a call went unanswered.
pub(crate) fn count_command_reconnect() {
    reconnected(1);
}

/// Why an event was not published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpublished {
    /// It has nothing to send or could not be encoded: Redis was not asked.
    Unencodable,
    /// Redis did not take it (after a retry on a fresh connection).
    Redis,
}

/// Publishes `event` on Redis in the broadcast envelope. Errors are logged: the
/// worker's periodic fetch repairs a lost event.
pub async fn publish_redis(
    conn: &crate::redis_link::RedisConn,
    event: &CircuitEvent,
) -> Result<(), Unpublished> {
    // The request's tracestate goes with its traceparent (published from the
    // request's own task; an event of another span gets none).
    let trace = event
        .span
        .map(appproxy_shared::middleware::trace_context_of);
    let meta = EventMetadata {
        request_id: event.request_id.map(RequestIdText::from),
        traceparent: trace.as_ref().map(|t| t.traceparent_text()),
        tracestate: trace
            .as_ref()
            .and_then(|t| t.tracestate_text())
            .map(str::to_owned),
        ..Default::default()
    };
    let Some(body) = event.body() else {
        return Err(Unpublished::Unencodable);
    };
    let Ok(msg) = BroadcastMessage::encode(event.kind.name(), "appproxy-coordinator", &body, &meta)
    else {
        return Err(Unpublished::Unencodable);
    };
    let Ok(text) = serde_json::to_string(&msg) else {
        return Err(Unpublished::Unencodable);
    };
    let mut conn = conn.clone();
    let mut sent = super::bounded(
        redis::cmd("PUBLISH")
            .arg(BROADCAST_CHANNEL)
            .arg(&text)
            .query_async::<i64>(&mut conn),
    )
    .await;
    if let Err(e) = &sent {
        // A connection that went stale (Redis restarted: "broken pipe") fails once;
        // the manager reconnects on that error, so one more try goes out fresh.
        tracing::info!(event = event.kind.name(), error = %e, "event not published; retrying once on a fresh connection");
        reconnected(1);
        sent = super::bounded(
            redis::cmd("PUBLISH")
                .arg(BROADCAST_CHANNEL)
                .arg(&text)
                .query_async::<i64>(&mut conn),
        )
        .await;
    }
    match sent {
        Ok(_) => {
            tracing::info!(event = event.kind.name(), worker = %event.authority, "event published");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(event = event.kind.name(), error = %e, "event not published");
            Err(Unpublished::Redis)
        }
    }
}

/// Follows the broadcast channel `events_all-appproxy` on Redis, reconnecting forever
/// (capped backoff, [`appproxy_shared::pubsub`]; each reconnection counted in
/// [`REDIS_RECONNECTS`]): `on_subscribed` runs after every (re)subscription — what
/// was published meanwhile is lost to pub/sub, so callers resynchronise there — and
/// `on_message` gets every readable envelope. Either returning false ends it.
pub async fn follow_broadcast(
    url: &str,
    on_subscribed: impl FnMut() -> bool,
    mut on_message: impl FnMut(BroadcastMessage) -> bool,
) {
    appproxy_shared::pubsub::Follow::new(url, &[BROADCAST_CHANNEL], "worker acknowledgements")
        .run(
            on_subscribed,
            |_, text| match serde_json::from_str::<BroadcastMessage>(&text) {
                Ok(envelope) => on_message(envelope),
                Err(_) => true,
            },
            || reconnected(0),
        )
        .await;
}

/// What a worker's acknowledgement says.
#[derive(Debug, Default, PartialEq)]
pub struct Acknowledgement {
    /// The worker.
    pub authority: String,
    /// Deployed circuits.
    pub deployed: Vec<uuid::Uuid>,
    /// Circuits it could not deploy, why, and whether their frontend could not
    /// listen.
    pub failed: Vec<FailedCircuit>,
    /// The creating request of each circuit, when the worker says.
    pub origins: Vec<(uuid::Uuid, String)>,
}

impl From<CircuitsEvent> for Acknowledgement {
    fn from(body: CircuitsEvent) -> Self {
        Self {
            authority: body.target_worker_authority,
            deployed: body.circuits.iter().map(|c| c.id).collect(),
            failed: body.failed,
            origins: body.origin_request_ids.into_iter().collect(),
        }
    }
}

impl Acknowledgement {
    /// Reads an `appproxy_worker_circuit_added_event` body (its JSON text); `None`
    /// when it does not read.
    pub fn parse(payload: &str) -> Option<Self> {
        serde_json::from_str::<CircuitsEvent>(payload)
            .ok()
            .map(Self::from)
    }
}

/// Hands an acknowledgement to the waiters and the worker's breaker, logging each
/// circuit under the request that created it (traced when the acknowledgement, the
/// context this runs in, is that request's).
pub fn settle(ack: Acknowledgement, acks: &AckHub, breakers: &super::breaker::Breakers) {
    if !ack.authority.is_empty() {
        breakers.alive(&ack.authority);
    }
    // Looked up by circuit: a worker's acknowledgement may name every circuit it
    // serves (after a resubscription) and a worker may publish what it likes. A
    // scan of `failed` per origin made one message of 100,000 of each cost every
    // coordinator 13 s of its listener's time (cost ∝ origins × failed).
    let failed: std::collections::HashMap<&uuid::Uuid, &str> = if ack.origins.is_empty() {
        std::collections::HashMap::new()
    } else {
        ack.failed
            .iter()
            .map(|f| (&f.id, f.reason.as_str()))
            .collect()
    };
    for (circuit, origin) in &ack.origins {
        let origin = appproxy_shared::RequestId::parse(origin.as_bytes()).ok();
        appproxy_shared::with_origin_request(origin, || match failed.get(circuit) {
            Some(why) => {
                tracing::warn!(%circuit, worker = %ack.authority, reason = %why, "worker could not deploy the circuit")
            }
            None => {
                tracing::debug!(%circuit, worker = %ack.authority, "worker acknowledged the circuit")
            }
        });
    }
    acks.reject_from(&ack.authority, ack.failed);
    acks.resolve_from(&ack.authority, ack.deployed);
}

/// The circuits a removal event names (by `id` alone: nothing else of them is
/// needed); none when it does not read.
fn removed_ids(payload: &str) -> Vec<uuid::Uuid> {
    #[derive(serde::Deserialize)]
    struct Named {
        id: uuid::Uuid,
    }
    #[derive(serde::Deserialize)]
    struct Removal {
        circuits: Vec<Named>,
    }
    serde_json::from_str::<Removal>(payload)
        .map(|r| r.circuits.into_iter().map(|c| c.id).collect())
        .unwrap_or_default()
}

/// Listens for workers' acknowledgements on Redis, reconnecting forever.
pub async fn listen_acks(
    url: String,
    acks: std::sync::Arc<AckHub>,
    breakers: std::sync::Arc<super::breaker::Breakers>,
) {
    follow_broadcast(
        &url,
        || {
            tracing::info!("listening for acknowledgements");
            breakers.listening();
            true
        },
        |envelope| {
            // A removal published by any coordinator (this one's own included) ends
            // the creations of those circuits waiting here: their worker, told to
            // drop them, owes no acknowledgement.
            if envelope.name == EVENT_CIRCUIT_REMOVED {
                acks.removed(removed_ids(&envelope.payload));
                return true;
            }
            if envelope.name != EVENT_WORKER_CIRCUIT_ADDED {
                return true;
            }
            let Some(ack) = Acknowledgement::parse(&envelope.payload) else {
                return true;
            };
            let meta = envelope.metadata();
            let request_id = meta.request_id.and_then(|r| r.validated());
            let span = meta.traceparent.map(|tp| {
                appproxy_shared::trace::SpanContext::from_header(
                    Some(tp.as_bytes()),
                    request_id.as_ref(),
                )
            });
            appproxy_shared::with_request_context(request_id, span, || {
                tracing::debug!(
                    worker = %ack.authority,
                    circuits = ack.deployed.len(),
                    failed = ack.failed.len(),
                    "worker acknowledged"
                );
                settle(ack, &acks, &breakers);
            });
            true
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_leave_on_ack_timeout_and_cancellation() {
        let hub = AckHub::default();
        let (a, b, c) = (
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
        );
        let waiter = hub.expect(a, "w");
        hub.resolve([a]);
        assert_eq!(
            waiter.wait(Duration::from_secs(5)).await,
            AckOutcome::Deployed
        );
        assert_eq!(
            hub.expect(b, "w").wait(Duration::from_millis(1)).await,
            AckOutcome::TimedOut
        );
        let waiting = hub.expect(c, "w").wait(Duration::from_secs(60));
        // The caller gives up: the future is dropped before it completes.
        assert!(tokio::time::timeout(Duration::from_millis(1), waiting)
            .await
            .is_err());
        // Or before it ever ran.
        drop(hub.expect(a, "w").wait(Duration::from_secs(60)));
        assert_eq!(hub.pending(), 0);
    }

    /// One acknowledgement naming many circuits, failed and deployed, each with
    /// its creating request: every waiter gets its own outcome. (Its cost is
    /// linear: before, a scan of `failed` per origin made 100,000 of each cost
    /// 13 s of the listener's time; see `settle`.)
    #[tokio::test]
    async fn a_large_acknowledgement_answers_each_waiter_with_its_outcome() {
        let hub = AckHub::default();
        let breakers = crate::breaker::Breakers::default();
        let n = 20_000;
        let ids: Vec<uuid::Uuid> = (0..n).map(|_| uuid::Uuid::new_v4()).collect();
        let (failed, deployed) = ids.split_at(n / 2);
        let (f0, d0) = (failed[7], deployed[7]);
        let (wf, wd) = (hub.expect(f0, "w"), hub.expect(d0, "w"));
        let ack = Acknowledgement {
            authority: "w".into(),
            deployed: deployed.to_vec(),
            failed: failed
                .iter()
                .map(|id| FailedCircuit {
                    id: *id,
                    reason: format!("port of {id} held"),
                    listen: true,
                })
                .collect(),
            origins: ids
                .iter()
                .map(|id| (*id, uuid::Uuid::new_v4().to_string()))
                .collect(),
        };
        settle(ack, &hub, &breakers);
        assert_eq!(
            wf.wait(Duration::from_secs(5)).await,
            AckOutcome::Failed {
                reason: format!("port of {f0} held"),
                listen: true
            }
        );
        assert_eq!(wd.wait(Duration::from_secs(5)).await, AckOutcome::Deployed);
        assert_eq!(hub.pending(), 0);
    }

    #[tokio::test]
    async fn failures_and_trips_reach_the_right_waiters() {
        let hub = AckHub::default();
        let (a, b, c) = (
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
        );
        let wa = hub.expect(a, "sick");
        let wb = hub.expect(b, "sick");
        let wc = hub.expect(c, "fine");
        assert_eq!(hub.trip("sick"), 2);
        // Another worker's word on a circuit answers none of its waiters.
        let held = || FailedCircuit {
            id: c,
            reason: "port held".into(),
            listen: true,
        };
        hub.reject_from("sick", [held()]);
        hub.resolve_from("sick", [c]);
        assert_eq!(hub.pending(), 1);
        hub.reject_from("fine", [held()]);
        assert_eq!(
            wa.wait(Duration::from_secs(5)).await,
            AckOutcome::WorkerTripped
        );
        assert_eq!(
            wb.wait(Duration::from_secs(5)).await,
            AckOutcome::WorkerTripped
        );
        assert_eq!(
            wc.wait(Duration::from_secs(5)).await,
            AckOutcome::Failed {
                reason: "port held".into(),
                listen: true
            }
        );
        // `listen` is read when the worker says so; an older worker's failure (no
        // `listen`) is not taken as one to listen.
        let body = serde_json::json!({"target_worker_authority": "w1",
            "circuits": [{"id": a.to_string()}],
            "failed": [{"id": b.to_string(), "reason": "x"},
                       {"id": c.to_string(), "reason": "y", "listen": true}],
            "origin_request_ids": {a.to_string(): "R1"}});
        assert_eq!(
            Acknowledgement::parse(&body.to_string()),
            Some(Acknowledgement {
                authority: "w1".into(),
                deployed: vec![a],
                failed: vec![
                    FailedCircuit {
                        id: b,
                        reason: "x".into(),
                        listen: false
                    },
                    FailedCircuit {
                        id: c,
                        reason: "y".into(),
                        listen: true
                    }
                ],
                origins: vec![(a, "R1".into())],
            })
        );
    }
}
