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
//!   that caused it (the event's; for a change found by a fetch, the creating
//!   request's `origin_request_id` or the removing request's `removed_by`) and, found
//!   by a fetch, a child of the coordinator's span of that request (`traces`), so one
//!   ID and one trace link the manager's call, the coordinator, Redis and every
//!   core's "deployment applied";
//! - once every core applied a set, the circuits an event announced are acknowledged
//!   (`appproxy_worker_circuit_added_event`), which the coordinator waits for, with
//!   the frontends no core could listen on as failed with `listen` — also when an
//!   earlier deployment (a poll's fetch, ahead of the event) carried the circuit —
//!   and the circuits this worker refused as failed without it (their port says
//!   nothing: the coordinator avoids only the ports of listen failures);
//! - the cores' per-circuit request counts become last-access marks (Redis keys of
//!   the original), one batch per flush interval;
//! - heartbeats run beside the deploying loop, and a poll's fetch gives way to an
//!   event that arrives meanwhile: a coordinator slow to answer (frozen, or waiting
//!   on its store) never holds the events and acknowledgements the others send.
//!
//! The coordinator is reached through a [`ControlLink`]: [`RemoteLink`] (HTTP API,
//! Redis events when `[redis] url` is set) from [`spawn_remote`], or one a binary
//! composes (single-node mode: a coordinator in the same process) given to [`spawn`].

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use appproxy_shared::model::{Circuit, CircuitsEvent, FailedCircuit};
use appproxy_shared::wire::{AccessMark, CircuitSet, WorkerRegistration};
use appproxy_shared::{IdVersion, RequestId, SpanContext, TraceContext};
use crossbeam_channel::Receiver;

use crate::config::{Config, Frontend, ResolvedCircuit};
pub use crate::link::LinkError as AgentError;
use crate::link::{ControlLink, Delta, LinkError, Notice as Wake, RemoteLink};
use crate::lookup::{Found, Lookups};
use crate::worker::Deployer;

/// Starts the agent thread following the coordinator of `[coordinator] url` (none:
/// an agent that does nothing). Errors are configs that cannot work.
pub fn spawn_remote(
    config: Config,
    deployer: Deployer,
    marks: Option<Receiver<Vec<(uuid::Uuid, u64)>>>,
) -> Result<Agent, AgentError> {
    let Some(url) = config.coordinator.as_ref().and_then(|c| c.url.clone()) else {
        return Ok(Agent {
            coordinator: None,
            stop: None,
            done: None,
            companion: None,
        });
    };
    let link = RemoteLink::new(
        &url,
        config.secrets.api_secret.clone().unwrap_or_default(),
        node_id(&config),
        redis_url(&config),
        config
            .redis
            .as_ref()
            .map(|r| r.circuits_from)
            .unwrap_or_default(),
    )?;
    spawn(config, link, deployer, marks)
}

/// `[redis] url`, when set.
fn redis_url(config: &Config) -> Option<String> {
    config.redis.as_ref().and_then(|r| r.url.clone())
}

/// Starts the agent thread following the coordinator behind `link`.
pub fn spawn<L: ControlLink>(
    config: Config,
    link: L,
    deployer: Deployer,
    marks: Option<Receiver<Vec<(uuid::Uuid, u64)>>>,
) -> Result<Agent, AgentError> {
    // Not ready until the coordinator's first circuit set is applied on every core.
    deployer.readiness().expect_sync();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), AgentError>>();
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
            let _ = ready_tx.send(Ok(()));
            rt.block_on(run(config, link, deployer, marks, stop_rx));
            let _ = done_tx.send(());
        })?;
    ready_rx
        .recv()
        .map_err(|_| AgentError::Embedded("the agent thread exited during start-up".into()))??;
    Ok(Agent {
        coordinator: None,
        stop: Some(stop_tx),
        done: Some(done_rx),
        companion: None,
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
    /// Stops what was composed with the agent (an embedded coordinator), after it.
    companion: Option<Box<dyn FnOnce() + Send>>,
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
        if let Some(stop) = self.companion.take() {
            stop();
        }
    }

    /// Names the coordinator composed with this agent (single-node mode): its API
    /// address, and how to stop it once the agent has deregistered.
    pub fn with_coordinator(
        mut self,
        addr: SocketAddr,
        stop: impl FnOnce() + Send + 'static,
    ) -> Self {
        self.coordinator = Some(addr);
        self.companion = Some(Box::new(stop));
        self
    }
}

/// This node's name among the HA nodes of one worker authority: the machine (its
/// `/etc/machine-id`, else its host name) and the worker's listening addresses. Stable
/// across restarts, so a crashed and restarted process counts once; distinct for two
/// processes serving the same authority.
pub fn node_id(config: &Config) -> String {
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

/// This worker's registration, in the wire shape.
pub fn registration(config: &Config) -> WorkerRegistration {
    let w = &config.worker;
    WorkerRegistration {
        authority: w.authority.clone(),
        frontend_mode: w.frontend_mode,
        protocol: appproxy_shared::model::ProxyProtocol::Http,
        hostname: w.advertised_host(),
        tls_listen: w.tls_listen,
        tls_advertised: w.tls_advertised,
        api_port: w.api_port.map(u64::from),
        port_range: w.port_range,
        wildcard_domain: w.wildcard_domain.clone(),
        wildcard_traffic_port: w.wildcard_traffic_port,
        accepted_traffics: vec![
            appproxy_shared::model::AppMode::Interactive,
            appproxy_shared::model::AppMode::Inference,
        ],
        filtered_apps_only: false,
        app_filters: None,
        traefik_last_used_marker_path: None,
        node_id: Some(node_id(config)),
        extra: Default::default(),
    }
}

/// One heartbeat (the caller binds its ID); a node the coordinator counts as left
/// registers again, under an ID of its own.
async fn beat<L: ControlLink>(
    link: &L,
    worker_id: uuid::Uuid,
    registration: &WorkerRegistration,
    clock: &MarkClock,
) {
    match link.heartbeat(worker_id).await {
        Ok(offset) => {
            if let Some(offset) = offset {
                clock.note(offset);
            }
        }
        // A deregistration of this node arrived after this process had
        // registered (its previous process's, answered late): its heartbeats
        // no longer count until it registers again.
        Err(e) if node_left(&e) => {
            tracing::warn!(error = %e, "the coordinator counts this node as left; registering again");
            // A call of its own, under its own ID.
            appproxy_shared::scope(Some(call_id()), async {
                match link.register(registration).await {
                    Ok(id) if id == worker_id => {
                        tracing::info!(worker_id = %id, "registered with the coordinator again")
                    }
                    Ok(id) => {
                        tracing::warn!(worker_id = %id, was = %worker_id, "registered again under another ID")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "registering again failed; trying at the next heartbeat")
                    }
                }
            })
            .await;
        }
        Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
    }
}

/// Offsets of the store's clock from this worker's within this are taken for the
/// measurement's noise: marks stay on the worker's own clock.
const CLOCK_TOLERANCE_SECS: f64 = 1.0;

/// An offset applied is dropped once measured within this (below the tolerance, so
/// that a lag near it does not switch on and off at every heartbeat).
const CLOCK_AGREES_SECS: f64 = 0.5;

/// An offset past this is no clock's lag but a broken answer (milliseconds taken
/// for seconds, a clock at 0): not applied, and said once.
const MAX_CLOCK_OFFSET_SECS: f64 = 86_400.0;

/// The clock last-access marks are written on: the one idle collection compares
/// them with (the store's), as heartbeats measure its offset from this worker's.
/// Marks on a clock 10 minutes behind looked 10 minutes old, and the coordinator
/// collected the worker's circuits that much early (circuits in use, once the lag
/// passed the idle timeout). Shared by the heartbeat task and the deploy loop.
#[derive(Debug, Default)]
pub(crate) struct MarkClock {
    /// The offset applied, in microseconds (0 while within the tolerance).
    offset_micros: std::sync::atomic::AtomicI64,
    /// An implausible offset was said (until a plausible one comes).
    implausible: std::sync::atomic::AtomicBool,
}

impl MarkClock {
    /// Takes a measured offset (seconds the store's clock is ahead of this
    /// worker's): applied once past the tolerance, dropped once within
    /// [`CLOCK_AGREES_SECS`]; said when it starts, changes by more than the
    /// tolerance, or ends. One past [`MAX_CLOCK_OFFSET_SECS`] is not taken.
    pub(crate) fn note(&self, measured: f64) {
        use std::sync::atomic::Ordering;
        if !measured.is_finite() || measured.abs() > MAX_CLOCK_OFFSET_SECS {
            if !self.implausible.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    store_ahead_secs = measured,
                    "the coordinator's clock differs from this worker's by more than a day: taken for a broken answer, not applied to last-access marks"
                );
            }
            return;
        }
        self.implausible.store(false, Ordering::Relaxed);
        let applied = self.offset();
        let bound = if applied == 0.0 {
            CLOCK_TOLERANCE_SECS
        } else {
            CLOCK_AGREES_SECS
        };
        let next = if measured.abs() > bound {
            measured
        } else {
            0.0
        };
        if next == 0.0 && applied != 0.0 {
            tracing::info!(
                store_ahead_secs = measured,
                "this worker's clock agrees with the store's again: last-access marks are written on its own"
            );
        } else if next != 0.0 && (next - applied).abs() > CLOCK_TOLERANCE_SECS {
            tracing::warn!(
                store_ahead_secs = next,
                "this worker's clock differs from the store's, which idle collection reads: last-access marks are written on the store's clock (keep the clocks in step)"
            );
        }
        self.offset_micros
            .store((next * 1e6) as i64, Ordering::Relaxed);
    }

    /// Seconds the store's clock is taken to be ahead of this worker's.
    fn offset(&self) -> f64 {
        self.offset_micros
            .load(std::sync::atomic::Ordering::Relaxed) as f64
            / 1e6
    }

    /// Now on the store's clock, as far as it is known.
    pub(crate) fn now(&self) -> f64 {
        appproxy_shared::jwt::now_epoch() + self.offset()
    }
}

/// A new ID for one call (or fetch) to the coordinator.
fn call_id() -> RequestId {
    RequestId::generate(IdVersion::V4)
}

/// What changed in this worker's set after revision `since`, or the whole set (read
/// page by page: no size ceiling) when `since` is `None` or the coordinator no longer
/// remembers that far back. Each circuit comes with the ID of the request that
/// created it, each removal with the request that removed it.
async fn fetch<L: ControlLink>(
    link: &L,
    id: uuid::Uuid,
    since: Option<u64>,
) -> Result<Fetched, LinkError> {
    let Some(since) = since else {
        return whole(link, id).await;
    };
    let mut revision = since;
    let mut changes: Vec<CircuitChange> = Vec::new();
    let mut removed: Vec<CircuitChange> = Vec::new();
    // A long absence is read in a few bounded answers, each from where the last one
    // stopped.
    for _ in 0..MAX_ANSWERS {
        let mut answer = link.changes(id, revision).await?;
        if answer.resync {
            return whole(link, id).await;
        }
        revision = answer.revision;
        removed.extend(removals(&mut answer));
        let more = answer.more.unwrap_or(false);
        changes.extend(
            with_origins(answer)
                .into_iter()
                .map(|c| (c.0.id, Change::Now(c))),
        );
        if !more {
            break;
        }
    }
    changes.extend(removed);
    Ok(Fetched {
        revision: Some(revision),
        whole: false,
        changes,
    })
}

/// The whole set, page by page, at the revision of its first page (what changes
/// while the pages are read is asked for from that revision next time).
async fn whole<L: ControlLink>(link: &L, id: uuid::Uuid) -> Result<Fetched, LinkError> {
    let mut after: Option<uuid::Uuid> = None;
    let mut revision = None;
    let mut changes = Vec::new();
    for _ in 0..MAX_PAGES {
        let page = link.page(id, after).await?;
        revision.get_or_insert(page.revision);
        let next = page.next_page();
        changes.extend(
            with_origins(page)
                .into_iter()
                .map(|c| (c.0.id, Change::Now(c))),
        );
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

/// The circuits of an answer with their creating requests and the trace context
/// behind their latest change (validated: one that does not read is none).
fn with_origins(answer: CircuitSet) -> Vec<Current> {
    let mut traces: HashMap<uuid::Uuid, TraceContext> = answer
        .traces
        .keys()
        .filter_map(|id| answer.trace_of(id).map(|t| (*id, t)))
        .collect();
    let origins = answer.origins.unwrap_or_default();
    answer
        .circuits
        .unwrap_or_default()
        .into_iter()
        .map(|c| {
            let origin = origins
                .get(&c.id)
                .and_then(|o| RequestId::parse(o.as_bytes()).ok());
            let trace = traces.remove(&c.id);
            (c, origin, trace)
        })
        .collect()
}

/// The circuits an answer removes (taken out of it), each with the request behind
/// its removal: the ID in `removed_by` and the trace context in `traces`, validated
/// (an ID or a trace context that does not read is none; an older coordinator's
/// answer has neither).
fn removals(answer: &mut CircuitSet) -> Vec<CircuitChange> {
    let ids = answer.removed.take().unwrap_or_default();
    ids.into_iter()
        .map(|id| {
            let by = (answer.remover_of(&id), answer.trace_of(&id));
            answer.traces.remove(&id);
            (id, Change::Removed(by))
        })
        .collect()
}

/// Most answers one change fetch reads before deploying what it has.
const MAX_ANSWERS: usize = 64;

/// Most pages one whole-set read takes (at 5,000 circuits a page).
const MAX_PAGES: usize = 10_000;

/// What a fetch brought: changes in order, and the revision they bring the agent
/// to; `whole` when it is the entire set (anything deployed and not in it is gone).
struct Fetched {
    /// `None`: from events, which do not move the revision.
    revision: Option<u64>,
    whole: bool,
    changes: Vec<CircuitChange>,
}

/// One circuit's change.
type CircuitChange = (uuid::Uuid, Change);

/// What became of a circuit.
#[derive(Debug)]
// As large as the `Option<Current>` it replaces: boxing would cost an allocation
// per circuit of a whole-set read.
#[allow(clippy::large_enum_variant)]
enum Change {
    /// It is as given now (created or changed).
    Now(Current),
    /// It was removed, by the request given when known.
    Removed(Behind),
}

/// The request behind a removal: its ID, and, when fetched, its trace context (an
/// event's is the event's span).
type Behind = (Option<RequestId>, Option<TraceContext>);

/// A circuit as it is now, with its creating request and, when fetched, the trace
/// context of the request behind its latest change (an event's is the event's span).
type Current = (Circuit, Option<RequestId>, Option<TraceContext>);

/// A fetched deployment's trace: its span (a child of the coordinator's span behind
/// the changes) and the `tracestate` that came with it.
type Traced = (SpanContext, Option<appproxy_shared::TraceState>);

async fn run<L: ControlLink>(
    config: Config,
    link: L,
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
    let registration = registration(&config);
    // Each call to the coordinator goes under an ID of its own, sent with it and on
    // the lines about it here, so the coordinator's lines and the worker's meet.
    let worker_id = loop {
        let registered = appproxy_shared::scope(Some(call_id()), async {
            match link.register(&registration).await {
                Ok(id) => {
                    tracing::info!(worker_id = %id, "registered with the coordinator");
                    Some(id)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "worker registration failed; retrying");
                    None
                }
            }
        })
        .await;
        if let Some(id) = registered {
            break id;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let (wake_tx, mut wake_rx) = tokio::sync::mpsc::unbounded_channel::<Wake>();
    link.follow(&w.authority, wake_tx);
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
    let lookups = Lookups::default();
    // Heartbeats go on their own, beside the loop that deploys: a coordinator slow
    // to answer one (frozen, or waiting on its store) holds neither the events
    // other coordinators publish nor their acknowledgements.
    let mark_clock = MarkClock::default();
    let beats = async {
        loop {
            heartbeat.tick().await;
            let beat = beat(&link, worker_id, &registration, &mark_clock);
            appproxy_shared::scope(Some(call_id()), beat).await;
        }
    };
    let mut state = Deployed::default();
    // The first whole set was handed to the cores: from then on, until the worker is
    // ready, any deployment every core applies makes it ready (the first one's
    // outcome may have come too late to count).
    let mut first_set_handed = false;
    // Marks a flush could not write (Redis out of memory, restarting): written with
    // the next, so no access is forgotten.
    let mut unwritten: HashMap<uuid::Uuid, AccessMark> = HashMap::new();
    // An event that arrived during a poll's fetch, which it cut short.
    let mut next: Option<Wake> = None;
    let deploys = async {
        loop {
            let mut polled = next.is_none();
            let mut wake = if let Some(wake) = next.take() {
                wake
            } else {
                tokio::select! {
                _ = &mut stopped => {
                    appproxy_shared::scope(Some(call_id()), async {
                        match tokio::time::timeout(Duration::from_secs(3), link.deregister(worker_id)).await {
                            Ok(Ok(())) => tracing::info!(worker_id = %worker_id, "deregistered from the coordinator"),
                            Ok(Err(e)) => tracing::warn!(error = %e, "deregistration failed"),
                            Err(_) => tracing::warn!("deregistration timed out"),
                        }
                    })
                    .await;
                    return;
                }
                _ = poll.tick() => Wake::default(),
                Some(wake) = wake_rx.recv() => {
                    polled = false;
                    wake
                }
                _ = flush.tick() => {
                    if let Some(rx) = &marks {
                        write_marks(&link, &state, rx, &mut unwritten, &mark_clock).await;
                    }
                    continue;
                }
                }
            };
            let started = std::time::Instant::now();
            // Events that queued up meanwhile are served by the same fetch and deployment:
            // under a burst of creations the agent deploys once per batch, not per event.
            let mut batched = 1;
            let mut deltas: Option<Vec<Delta>> = wake.delta.take().map(|d| vec![d]);
            while let Ok(more) = wake_rx.try_recv() {
                batched += 1;
                if more.request_id != wake.request_id {
                    wake.request_id = None;
                    wake.span = None;
                    wake.tracestate = None;
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
            // The first read of the whole set gets a line once it is handed to the cores:
            // from then on the worker follows the coordinator's set.
            let initial = state.revision.is_none() && deltas.is_none();
            // The ID a fetch goes under: the event's that asked for it, or its own.
            let mut fetch_id = None;
            let fetched = match deltas {
                Some(deltas) => Fetched::of_deltas(deltas),
                // Once an hour the whole set is read again, whatever the revision says: a
                // store restored from a backup may reach the same revision with other
                // contents.
                None => {
                    let since = state.revision.filter(|_| {
                        state
                            .last_whole
                            .is_some_and(|at| at.elapsed() < WHOLE_SET_EVERY)
                    });
                    let id = wake.request_id.unwrap_or_else(call_id);
                    fetch_id = Some(id);
                    let fetched = appproxy_shared::scope(Some(id), fetch(&link, worker_id, since));
                    // A poll's fetch (nothing owed to anyone) gives way to an event that
                    // arrives meanwhile: the event carries its circuits, and a
                    // coordinator slow to answer the poll must not hold it; the next
                    // poll asks again.
                    let fetched = if polled && batched == 1 {
                        tokio::select! {
                            f = fetched => f,
                            Some(event) = wake_rx.recv() => {
                                tracing::debug!("a poll's fetch gave way to an event");
                                next = Some(event);
                                continue;
                            }
                        }
                    } else {
                        fetched.await
                    };
                    match fetched {
                        Ok(f) => f,
                        Err(e) => {
                            appproxy_shared::with_request_id(Some(id), || {
                                tracing::warn!(error = %e, "circuit fetch failed");
                            });
                            continue;
                        }
                    }
                }
            };
            // Names are looked up off this thread, the whole deployment's at once
            // within one bound: heartbeats and acknowledgements go on meanwhile.
            let mut fetched = fetched;
            retry_due(&mut fetched, &mut state);
            let names = names_to_look_up(&fetched, &state);
            let found = if names.is_empty() {
                Found::new()
            } else {
                lookups.look_up(names).await
            };
            let applied = appproxy_shared::with_request_context(None, wake.span, || {
                apply(
                    &config,
                    &deployer,
                    fetched,
                    &mut state,
                    wake.request_id,
                    &found,
                )
            })
            .map(|(applied, id, traced)| {
                // Found by a fetch: the deployment is traced as an event's would be, and
                // its acknowledgement goes under the same span.
                if let Some((span, tracestate)) = traced {
                    wake.span = Some(span);
                    wake.tracestate = tracestate;
                }
                // The first set makes the worker ready once every core applied it.
                let readiness = deployer.readiness();
                match (initial || first_set_handed) && !readiness.is_synced() {
                    true => (applied.marking_ready(readiness.clone()), id),
                    false => (applied, id),
                }
            });
            if initial {
                first_set_handed = true;
                if applied.is_none() {
                    deployer.readiness().mark_synced();
                }
            }
            state.forget_old();
            if initial {
                appproxy_shared::with_request_id(fetch_id, || {
                    tracing::info!(
                        circuits = state.circuits.len(),
                        revision = state.revision,
                        "circuit set read from the coordinator"
                    );
                });
            }
            state.settle_finished().await;
            if wake.created.is_empty() && !wake.resync {
                // A deployment that owes no acknowledgement (a removal or an update an
                // event brought, or what a poll found, a creation among it maybe, its
                // event still on the way): its outcome is awaited off the agent's loop and
                // kept, so the acknowledgement owed later reports the frontends it could
                // not listen on. A traced one's span is exported once every core applied
                // it, as an acknowledged one's is.
                if let Some((applied, id)) = applied {
                    let span = wake.span.filter(|_| appproxy_shared::otlp::enabled());
                    state.unsettled.push(tokio::task::spawn_blocking(move || {
                        let outcome = applied.outcome(apply_timeout);
                        if let (Some(span), Some(_)) = (span, &outcome) {
                            crate::trace::export_deployment(span, id, started.elapsed());
                        }
                        outcome
                    }));
                }
                continue;
            }
            // The circuits an earlier deployment carried are acknowledged with what it
            // made of them: its outcome is in first.
            if !state.settle_all().await {
                tracing::warn!(
                    "not every core applied an earlier deployment in time; not acknowledging"
                );
                continue;
            }
            // Acknowledge what the event announced once every core has it (it may have
            // arrived with an earlier poll: the acknowledgement is still owed), each
            // circuit as deployed or failed (its frontend could not listen, flagged
            // `listen`, or this worker refused it, not flagged).
            let mut deployment = None;
            let mut listen_failed = Vec::new();
            if let Some((applied, id)) = applied {
                let outcome = tokio::task::spawn_blocking(move || applied.outcome(apply_timeout))
                    .await
                    .ok()
                    .flatten();
                match outcome {
                    Some(f) => listen_failed = f,
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
            let failed = state.failed_of(&owed, listen_failed);
            let present: Vec<Circuit> = owed
                .iter()
                .filter(|id| !failed.iter().any(|f| f.id == **id))
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
                        &w.authority,
                        present,
                        failed,
                        &state.origins,
                        wake.tracestate.as_ref(),
                    ),
                )
                .await;
                if let Some(span) = wake.span {
                    crate::trace::export_deployment(span, id, started.elapsed());
                }
            }
        }
    };
    // Only the deploying loop ends (on a stop); the heartbeats go on until then.
    tokio::select! {
        () = deploys => {}
        () = beats => {}
    }
}

/// The circuits whose frontend some core could not listen on, with why.
type ListenFailures = Vec<(uuid::Uuid, String)>;

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
    /// Circuits refused because a route host's name was not found (a lookup that
    /// timed out, no lookup slot free, a name not known yet): tried again when due
    /// ([`Retry`]), until they deploy, change or are removed.
    retry: HashMap<uuid::Uuid, Retry>,
    /// Deployments that owed no acknowledgement, until every core has applied them:
    /// the frontends each could not listen on (`None`: not applied in time).
    unsettled: Vec<tokio::task::JoinHandle<Option<ListenFailures>>>,
    /// Circuits a deployment that owed no acknowledgement could not listen for, with
    /// why and when: reported as failed by the acknowledgement owed for them, or
    /// forgotten after [`RECENT`].
    listen_failed: HashMap<uuid::Uuid, (String, std::time::Instant)>,
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

/// Most per-circuit "deployed/removed in a batch" lines one deployment writes (then
/// one line per request counts the rest); a whole-set read with more new circuits
/// than this writes none for them.
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

    /// Keeps the listen failures of the unsettled deployments that are done.
    async fn settle_finished(&mut self) {
        let mut i = 0;
        while i < self.unsettled.len() {
            if self.unsettled[i].is_finished() {
                let done = self.unsettled.swap_remove(i);
                if let Ok(Some(failed)) = done.await {
                    self.note_listen_failures(failed);
                }
            } else {
                i += 1;
            }
        }
        let now = std::time::Instant::now();
        self.listen_failed
            .retain(|_, (_, at)| now.duration_since(*at) <= RECENT);
    }

    /// Waits for every unsettled deployment (each bounded by the apply timeout) and
    /// keeps its listen failures; `false` when one was not applied in time.
    async fn settle_all(&mut self) -> bool {
        let mut all = true;
        for done in std::mem::take(&mut self.unsettled) {
            match done.await {
                Ok(Some(failed)) => self.note_listen_failures(failed),
                _ => all = false,
            }
        }
        all
    }

    fn note_listen_failures(&mut self, failed: ListenFailures) {
        let now = std::time::Instant::now();
        for (id, why) in failed {
            self.listen_failed.insert(id, (why, now));
        }
    }

    /// What the acknowledgement of `owed` reports as failed: those whose frontend
    /// could not listen — in `listen_failed` (the outcome of the deployment
    /// acknowledged) or kept from an earlier deployment — with `listen` set, and
    /// those this worker refused (an app host it could not resolve, a frontend
    /// another circuit holds) without it: a refusal says nothing about the port, and
    /// the coordinator avoids only the ports of listen failures. The listen failures
    /// kept for `owed` are forgotten (they are answered now).
    fn failed_of(
        &mut self,
        owed: &[uuid::Uuid],
        listen_failed: ListenFailures,
    ) -> Vec<FailedCircuit> {
        let mut failed: Vec<FailedCircuit> = listen_failed
            .into_iter()
            .map(|(id, reason)| FailedCircuit {
                id,
                reason,
                listen: true,
            })
            .collect();
        for id in owed {
            let why = match self.refused.get(id) {
                Some(why) => Some((why, false)),
                None => self.listen_failed.get(id).map(|(why, _)| (why, true)),
            };
            if let Some((why, listen)) = why {
                if !failed.iter().any(|f| f.id == *id) {
                    failed.push(FailedCircuit {
                        id: *id,
                        reason: why.clone(),
                        listen,
                    });
                }
            }
        }
        for id in owed {
            self.listen_failed.remove(id);
        }
        failed.retain(|f| owed.contains(&f.id));
        failed
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

/// Tells the coordinator that every core has `circuits` and that `failed` could not
/// be deployed, with the creating request of each.
async fn acknowledge<L: ControlLink>(
    link: &L,
    authority: &str,
    circuits: Vec<Circuit>,
    failed: Vec<FailedCircuit>,
    origins: &HashMap<uuid::Uuid, RequestId>,
    tracestate: Option<&appproxy_shared::TraceState>,
) {
    let n = circuits.len();
    let n_failed = failed.len();
    let origin_request_ids: std::collections::BTreeMap<uuid::Uuid, String> = circuits
        .iter()
        .map(|c| c.id)
        .chain(failed.iter().map(|f| f.id))
        .filter_map(|id| origins.get(&id).map(|o| (id, o.to_string())))
        .collect();
    for f in &failed {
        appproxy_shared::with_origin_request(origins.get(&f.id).copied(), || {
            tracing::warn!(circuit = %f.id, reason = %f.reason, listen = f.listen, "circuit not deployed: reported as failed");
        });
    }
    let mut body = CircuitsEvent::new(authority, circuits);
    body.failed = failed;
    body.origin_request_ids = origin_request_ids;
    if link.acknowledge(body, tracestate).await {
        tracing::info!(circuits = n, failed = n_failed, "deployment acknowledged");
    }
}

/// Whether a heartbeat was refused because the coordinator counts this node as
/// left (`409 node-left`): it must register again.
fn node_left(e: &LinkError) -> bool {
    matches!(e, LinkError::Status(409, body) if body.contains("node-left"))
}

/// Gathers the cores' counts and writes them as last-access marks, with the marks
/// of earlier flushes that could not be written (`unwritten`, one per circuit still
/// deployed: their counts added up, their last access the latest), at the time on
/// `clock` (the store's). Those that are not written now stay in `unwritten`.
async fn write_marks<L: ControlLink>(
    link: &L,
    state: &Deployed,
    rx: &Receiver<Vec<(uuid::Uuid, u64)>>,
    unwritten: &mut HashMap<uuid::Uuid, AccessMark>,
    clock: &MarkClock,
) {
    let now = clock.now();
    for batch in rx.try_iter() {
        for (circuit, n) in batch {
            let mark = unwritten.entry(circuit).or_insert_with(|| AccessMark {
                circuit,
                sessions: Vec::new(),
                requests: 0,
                last_access: now,
            });
            mark.requests += n;
            mark.last_access = now;
        }
    }
    // A circuit withdrawn meanwhile needs no mark: what is kept stays bounded by
    // what is deployed.
    unwritten.retain(|circuit, _| state.circuits.contains_key(circuit));
    if unwritten.is_empty() {
        return;
    }
    for (circuit, mark) in unwritten.iter_mut() {
        if let Some(c) = state.circuits.get(circuit) {
            mark.sessions.clone_from(&c.circuit.session_ids);
        }
    }
    let marks: Vec<AccessMark> = unwritten.values().cloned().collect();
    if link.record_marks(&marks).await {
        unwritten.clear();
    }
}

impl Fetched {
    /// The changes events carried, in order; the revision stays (the next poll
    /// brings it up to date).
    fn of_deltas(deltas: Vec<Delta>) -> Self {
        let mut changes = Vec::new();
        for d in deltas {
            match d {
                Delta::Upsert(circuits, origin) => changes.extend(
                    circuits
                        .into_iter()
                        .map(|c| (c.id, Change::Now((c, origin, None)))),
                ),
                Delta::Remove(ids, by) => {
                    changes.extend(ids.into_iter().map(|id| (id, Change::Removed((by, None)))))
                }
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

/// A circuit refused for a route host's name not found, to be tried again.
struct Retry {
    /// The circuit as last fetched, with its request and trace.
    circuit: Current,
    /// When it is due.
    at: std::time::Instant,
    /// The wait before this try (doubled after each refusal, up to [`Retry::MOST`]).
    after: Duration,
}

impl Retry {
    /// The wait before the first try again.
    const FIRST: Duration = Duration::from_secs(5);
    /// The longest wait between tries.
    const MOST: Duration = Duration::from_secs(60);

    fn new(circuit: Current, after: Duration) -> Self {
        let after = after.min(Self::MOST);
        Self {
            circuit,
            at: std::time::Instant::now() + after,
            after,
        }
    }
}

/// Adds the refused circuits whose names are due to be looked up again to what was
/// fetched (a circuit the fetch itself carries is left to it): a lookup that timed
/// out, or found no slot, during a DNS outage or a burst is tried again on later
/// deployments, every 5 s at first and at most every 60 s, without waiting for the
/// circuit to change or for the hourly read of the whole set.
fn retry_due(fetched: &mut Fetched, state: &mut Deployed) {
    let now = std::time::Instant::now();
    let due: Vec<uuid::Uuid> = state
        .retry
        .iter()
        .filter(|(id, r)| r.at <= now && !fetched.changes.iter().any(|(c, _)| c == *id))
        .map(|(id, _)| *id)
        .collect();
    for id in due {
        if let Some(r) = state.retry.get_mut(&id) {
            // Not due again before its next wait, whatever this try gives.
            r.at = now + r.after;
            fetched.changes.push((id, Change::Now(r.circuit.clone())));
        }
    }
}

/// The route hosts (and ports) of what was fetched that [`apply`] will resolve: the
/// routes in rotation of every circuit new or different from what is deployed.
fn names_to_look_up(fetched: &Fetched, state: &Deployed) -> HashSet<(String, u16)> {
    let mut names = HashSet::new();
    for (id, change) in &fetched.changes {
        let Change::Now((circuit, _, _)) = change else {
            continue;
        };
        if state
            .circuits
            .get(id)
            .is_some_and(|d| same_circuit(&d.circuit, circuit))
        {
            continue;
        }
        for r in circuit
            .route_info
            .iter()
            .filter(|r| crate::config::in_rotation(r))
        {
            names.insert((crate::config::route_host(r).to_string(), r.kernel_port));
        }
    }
    names
}

/// Turns what was fetched into a change for the cores — only the circuits that are
/// new, different or gone, each checked and resolved on its own — and sends it
/// under `preferred` (an event's request ID) when given, and under the current span
/// (an event's) when there is one. Costs what changed, not what exists. Returns the
/// deployment in flight and its ID, if any, and its trace when it was taken from
/// the fetched changes ([`fetched_span`]).
fn apply(
    config: &Config,
    deployer: &Deployer,
    fetched: Fetched,
    state: &mut Deployed,
    preferred: Option<RequestId>,
    found: &Found,
) -> Option<(crate::worker::Applied, RequestId, Option<Traced>)> {
    let Fetched {
        revision,
        whole,
        changes,
    } = fetched;
    // The last word on each circuit wins.
    let mut last: HashMap<uuid::Uuid, Change> = HashMap::with_capacity(changes.len());
    for (id, change) in changes {
        last.insert(id, change);
    }
    if whole {
        // Anything deployed that the whole set lacks is gone.
        for id in state.circuits.keys() {
            last.entry(*id).or_insert(Change::Removed((None, None)));
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
    // The request behind each removal deployed.
    let mut removers: Vec<Option<RequestId>> = Vec::new();
    // The request behind each change deployed, when known: a removal's remover, a
    // new circuit's creator; an update's is not known (the store keeps the creating
    // request's ID, not the updating one's).
    let mut behind: Vec<Option<RequestId>> = Vec::new();
    // The trace context behind each change deployed.
    let mut traces: Vec<Option<TraceContext>> = Vec::with_capacity(last.len());
    let mut upserts: Vec<Current> = Vec::new();
    for (id, change) in last {
        match change {
            Change::Removed((by, trace)) => {
                state.refused.remove(&id);
                state.retry.remove(&id);
                if let Some(old) = state.circuits.remove(&id) {
                    state.frontends.remove(&old.frontend);
                    state.origins.remove(&id);
                    removes.push(id);
                    removers.push(by);
                    behind.push(by);
                    traces.push(trace);
                }
            }
            Change::Now((circuit, origin, trace)) => {
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
                upserts.push((circuit, origin, trace));
            }
        }
    }
    // Circuits new to this worker, with the requests that created them.
    let mut new: Vec<(uuid::Uuid, RequestId)> = Vec::new();
    let mut resolved = Vec::with_capacity(upserts.len());
    for (circuit, origin, trace) in upserts {
        let id = circuit.id;
        // A name of its routes not found now may be found later.
        let unresolved = circuit
            .route_info
            .iter()
            .filter(|r| crate::config::in_rotation(r))
            .any(|r| {
                crate::lookup::address(found, crate::config::route_host(r), r.kernel_port).is_err()
            });
        let kept = (circuit.clone(), origin, trace.clone());
        let checked = config
            .resolve_circuit_with(&circuit, &mut |host, port| {
                crate::lookup::address(found, host, port)
            })
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
                    Some(old) => {
                        if old.frontend != r.frontend {
                            state.frontends.remove(&old.frontend);
                        }
                        behind.push(None);
                    }
                    None => {
                        if let Some(o) = origin {
                            new.push((id, o));
                        }
                        behind.push(origin);
                        state.recent.push_back((id, std::time::Instant::now()));
                    }
                }
                state.frontends.insert(r.frontend.clone(), id);
                state.refused.remove(&id);
                state.retry.remove(&id);
                resolved.push(r);
                traces.push(trace);
            }
            Err(why) => {
                appproxy_shared::with_request_id(origin.or(preferred), || {
                    tracing::error!(circuit = %id, error = %why, "circuit refused; the running circuits stay");
                });
                state.refused.insert(id, why);
                if unresolved {
                    let after = state.retry.get(&id).map_or(Retry::FIRST, |r| r.after * 2);
                    state.retry.insert(id, Retry::new(kept, after));
                } else {
                    state.retry.remove(&id);
                }
            }
        }
    }
    if resolved.is_empty() && removes.is_empty() {
        return None;
    }
    // Every change of one known request (a creation, a deletion, a bulk deletion):
    // deploy under that request's ID, so the manager's call, the coordinator and
    // every core share one ID. Otherwise a fresh ID for this deployment.
    let id = preferred
        .or_else(|| one_request(&behind))
        .unwrap_or_else(|| RequestId::generate(IdVersion::V4));
    // A batch deploys under its own ID: each creating or removing request's ID gets
    // lines naming it, so either ID finds the other — but not for the circuits of a
    // whole set read at start (those creations are long answered).
    let mut lines = BatchLines::new(id);
    if !whole || new.len() <= MAX_BATCH_LINES {
        for (circuit, origin) in &new {
            lines.add(*circuit, *origin, BatchKind::Deployed);
        }
    }
    for (circuit, by) in removes.iter().zip(&removers) {
        if let Some(by) = by {
            lines.add(*circuit, *by, BatchKind::Removed);
        }
    }
    lines.finish();
    // An event's deployment runs under the event's span; one found by a fetch under
    // a child of the coordinator's span behind the changes, as the event would have.
    let traced = match appproxy_shared::current_span() {
        Some(_) => None,
        None => fetched_span(&traces),
    };
    let span = traced
        .as_ref()
        .map(|(s, _)| *s)
        .or_else(appproxy_shared::current_span);
    appproxy_shared::with_request_context(Some(id), span, || {
        tracing::info!(
            changed = resolved.len(),
            removed = removes.len(),
            circuits = state.circuits.len(),
            "deploying the coordinator's circuits"
        );
        let change = crate::core::Change {
            replace: false,
            upserts: resolved,
            removes,
        };
        Some((deployer.change(change, id), id, traced))
    })
}

/// The request behind every change of a deployment, when it is one and the same
/// and known for each; `None` otherwise (and when there is no change).
fn one_request(behind: &[Option<RequestId>]) -> Option<RequestId> {
    let first = (*behind.first()?)?;
    behind.iter().all(|r| *r == Some(first)).then_some(first)
}

/// What a batch line says of a circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchKind {
    Deployed,
    Removed,
}

/// The lines that tie a batch's deployment ID to the requests behind its changes:
/// one per circuit (under the circuit's request's ID, naming the deployment) for
/// the first [`MAX_BATCH_LINES`], then one per request and kind counting the rest —
/// an idle pass that removed thousands of circuits batched with one other change
/// writes a bounded number of lines.
struct BatchLines {
    deployment: RequestId,
    left: usize,
    rest: Vec<(RequestId, BatchKind, usize)>,
}

impl BatchLines {
    fn new(deployment: RequestId) -> Self {
        Self {
            deployment,
            left: MAX_BATCH_LINES,
            rest: Vec::new(),
        }
    }

    /// Notes that `request` created or removed `circuit` (nothing when `request` is
    /// the deployment's own ID: its lines already say so).
    fn add(&mut self, circuit: uuid::Uuid, request: RequestId, kind: BatchKind) {
        let deployment = self.deployment;
        if request == deployment {
            return;
        }
        if self.left > 0 {
            self.left -= 1;
            appproxy_shared::with_request_id(Some(request), || match kind {
                BatchKind::Deployed => {
                    tracing::info!(%circuit, %deployment, "circuit deployed in a batch")
                }
                BatchKind::Removed => {
                    tracing::info!(%circuit, %deployment, "circuit removed in a batch")
                }
            });
            return;
        }
        match self
            .rest
            .iter_mut()
            .find(|(r, k, _)| *r == request && *k == kind)
        {
            Some((_, _, n)) => *n += 1,
            None => self.rest.push((request, kind, 1)),
        }
    }

    /// Writes the counts of the circuits past the per-circuit lines.
    fn finish(self) {
        let deployment = self.deployment;
        for (request, kind, circuits) in self.rest {
            appproxy_shared::with_request_id(Some(request), || match kind {
                BatchKind::Deployed => {
                    tracing::info!(circuits, %deployment, "more circuits deployed in a batch")
                }
                BatchKind::Removed => {
                    tracing::info!(circuits, %deployment, "more circuits removed in a batch")
                }
            });
        }
    }
}

/// The span of a deployment found by a fetch: a child of the coordinator's span
/// behind the changes deployed (creations, updates and removals), when they all have
/// the same one (a single creation or deletion, typically); changes of several
/// requests, or some untraced, have no single parent, as events of several requests
/// batched into one deployment have none.
fn fetched_span(traces: &[Option<TraceContext>]) -> Option<Traced> {
    let first = traces.first()?.as_ref()?;
    traces
        .iter()
        .all(|t| {
            t.as_ref()
                .is_some_and(|t| t.traceparent == first.traceparent)
        })
        .then(|| (first.span(), first.tracestate.clone()))
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
    fn a_fetched_deployment_is_traced_when_its_changes_share_one_parent() {
        let ctx = |span: &str, state: Option<&str>| {
            TraceContext::read(
                Some(&format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{span}-01")),
                state,
            )
        };
        let one = ctx("00f067aa0ba902b7", Some("rojo=1"));
        let (span, state) = fetched_span(std::slice::from_ref(&one)).expect("traced");
        assert_eq!(
            span.trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            span.parent_span_id.map(|s| s.to_string()).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert_eq!(state.as_ref().map(|t| t.as_str()), Some("rojo=1"));
        assert!(
            fetched_span(&[one.clone(), one.clone()]).is_some(),
            "one request"
        );
        let other = ctx("b7ad6b7169203331", None);
        assert!(
            fetched_span(&[one.clone(), other]).is_none(),
            "two requests"
        );
        assert!(fetched_span(&[one.clone(), None]).is_none(), "one untraced");
        assert!(fetched_span(&[None]).is_none());
        assert!(fetched_span(&[]).is_none(), "no change to go by");
    }

    #[test]
    fn fetched_circuits_carry_their_validated_trace() {
        let c = circuit();
        let answer: CircuitSet = serde_json::from_value(serde_json::json!({
            "revision": 1, "circuits": [c], "origins": {c.id.to_string(): "R-1"},
            "traces": {c.id.to_string(): {
                "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "tracestate": "Bad=1"}},
            "removed": [], "more": false
        }))
        .expect("answer");
        let got = with_origins(answer);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.map(|r| r.to_string()).as_deref(), Some("R-1"));
        let trace = got[0].2.as_ref().expect("a valid traceparent");
        assert_eq!(trace.tracestate, None, "the invalid tracestate is dropped");
        let untraced: CircuitSet = serde_json::from_value(serde_json::json!({
            "revision": 1, "circuits": [circuit()],
            "traces": {circuit().id.to_string(): {"traceparent": "00-zz"}}
        }))
        .expect("answer");
        assert!(with_origins(untraced)[0].2.is_none());
    }

    /// A trace context of the manager's trace naming the coordinator's span `span`.
    fn ctx(span: &str) -> Option<TraceContext> {
        TraceContext::read(
            Some(&format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{span}-01")),
            None,
        )
    }

    fn rid(text: &str) -> RequestId {
        RequestId::parse(text.as_bytes()).expect("a request ID")
    }

    /// The test circuit under another ID and subdomain.
    fn circuit_named(sub: &str) -> Circuit {
        Circuit {
            id: uuid::Uuid::new_v4(),
            subdomain: Some(sub.into()),
            ..circuit()
        }
    }

    #[test]
    fn removals_count_in_a_fetched_deployments_parent() {
        let (a, b) = (ctx("00f067aa0ba902b7"), ctx("b7ad6b7169203331"));
        let (span, _) = fetched_span(std::slice::from_ref(&b)).expect("one removal");
        assert_eq!(
            span.parent_span_id.map(|s| s.to_string()).as_deref(),
            Some("b7ad6b7169203331")
        );
        assert!(
            fetched_span(&[b.clone(), b.clone()]).is_some(),
            "a bulk deletion"
        );
        assert!(
            fetched_span(&[a.clone(), b.clone()]).is_none(),
            "a creation and a removal of two requests"
        );
        assert!(
            fetched_span(&[b.clone(), None]).is_none(),
            "an untraced removal"
        );
    }

    #[test]
    fn one_request_behind_a_deployment_names_it() {
        let (c, d) = (rid("manager-C-1"), rid("manager-D-1"));
        assert_eq!(one_request(&[Some(c)]), Some(c), "a creation");
        assert_eq!(one_request(&[Some(d)]), Some(d), "a removal");
        assert_eq!(one_request(&[Some(d), Some(d)]), Some(d), "a bulk deletion");
        assert_eq!(one_request(&[Some(c), Some(d)]), None, "two requests");
        assert_eq!(
            one_request(&[Some(d), None]),
            None,
            "one unknown (an update, a creation without an ID)"
        );
        assert_eq!(one_request(&[None, Some(d)]), None, "unknown first");
        assert_eq!(one_request(&[None]), None, "an unknown removal");
        assert_eq!(one_request(&[]), None);
    }

    #[test]
    fn fetched_removals_carry_their_validated_request_and_trace() {
        let [named, spaced, untraced, old] = [(); 4].map(|_| uuid::Uuid::new_v4());
        let c = circuit();
        let mut answer: CircuitSet = serde_json::from_value(serde_json::json!({
            "revision": 4, "circuits": [c], "origins": {c.id.to_string(): "R-1"},
            "traces": {
                c.id.to_string(): {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
                named.to_string(): {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01",
                    "tracestate": "rojo=1"},
                spaced.to_string(): {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01"},
                untraced.to_string(): {"traceparent": "00-zz"}},
            "removed": [named, spaced, untraced, old],
            "removed_by": {named.to_string(): "manager-D-1", spaced.to_string(): "not a request id",
                untraced.to_string(): "manager-D-2"},
            "more": false
        }))
        .expect("answer");
        let got: HashMap<uuid::Uuid, Behind> = removals(&mut answer)
            .into_iter()
            .map(|(id, change)| match change {
                Change::Removed(by) => (id, by),
                Change::Now(_) => panic!("a removal expected"),
            })
            .collect();
        assert_eq!(got.len(), 4);
        let (by, trace) = &got[&named];
        assert_eq!(*by, Some(rid("manager-D-1")));
        let trace = trace.as_ref().expect("a trace");
        assert_eq!(
            trace.traceparent_text(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01"
        );
        assert_eq!(trace.tracestate_text(), Some("rojo=1"));
        assert_eq!(got[&spaced].0, None, "not a request ID");
        assert!(got[&spaced].1.is_some(), "its trace still counts");
        assert_eq!(
            got[&untraced],
            (Some(rid("manager-D-2")), None),
            "a malformed traceparent"
        );
        assert_eq!(got[&old], (None, None), "an older coordinator's removal");
        // The circuits of the answer keep theirs.
        let now = with_origins(answer);
        assert_eq!(now.len(), 1);
        assert!(now[0].2.is_some());
    }

    /// The worker's JSON log lines at `info`, into `lines`.
    fn json_subscriber(
        lines: &appproxy_test_support::logs::Sink,
    ) -> impl tracing::Subscriber + Send + Sync {
        appproxy_shared::telemetry::subscriber(
            &appproxy_shared::telemetry::LoggingConfig {
                format: appproxy_shared::telemetry::LogFormat::Json,
                filter: "info".into(),
            },
            "worker",
            lines.clone(),
        )
        .expect("subscriber")
    }

    #[test]
    fn a_fetched_removal_deploys_under_its_request_and_a_child_of_its_span() {
        let config = Config::parse(
            "[worker]\nfrontend_mode = \"wildcard\"\nwildcard_domain = \".apps.test\"\n",
        )
        .expect("config");
        let deployer = Deployer::without_cores();
        let mut state = Deployed::default();
        let lines = appproxy_test_support::logs::Sink::default();
        let _log = tracing::subscriber::set_default(json_subscriber(&lines));
        let mut revision = 0;
        let mut fetched = |changes: Vec<CircuitChange>, state: &mut Deployed| {
            revision += 1;
            let fetched = Fetched {
                revision: Some(revision),
                whole: false,
                changes,
            };
            let (_, id, traced) = apply(&config, &deployer, fetched, state, None, &Found::new())
                .expect("a deployment");
            (id, traced.map(|(span, _)| span))
        };
        let (creator, remover) = (ctx("00f067aa0ba902b7"), ctx("b7ad6b7169203331"));
        let parent = |span: Option<SpanContext>| {
            let span = span.expect("a traced deployment");
            assert_eq!(
                span.trace_id.to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            span.parent_span_id.map(|s| s.to_string())
        };

        // A creation, then its removal, each found by a fetch: each under its own
        // request's ID and a child of its request's span.
        let one = circuit_named("one");
        let (id, span) = fetched(
            vec![(
                one.id,
                Change::Now((one.clone(), Some(rid("manager-C-1")), creator.clone())),
            )],
            &mut state,
        );
        assert_eq!(id, rid("manager-C-1"));
        assert_eq!(parent(span).as_deref(), Some("00f067aa0ba902b7"));
        let (id, span) = fetched(
            vec![(
                one.id,
                Change::Removed((Some(rid("manager-D-1")), remover.clone())),
            )],
            &mut state,
        );
        assert_eq!(id, rid("manager-D-1"), "the removing request's ID");
        assert_eq!(parent(span).as_deref(), Some("b7ad6b7169203331"));
        assert!(state.circuits.is_empty());

        // A bulk deletion: one request, one span.
        let (two, three) = (circuit_named("two"), circuit_named("three"));
        fetched(
            [&two, &three]
                .map(|c| (c.id, Change::Now(((*c).clone(), None, None))))
                .into(),
            &mut state,
        );
        let (id, span) = fetched(
            [&two, &three]
                .map(|c| {
                    (
                        c.id,
                        Change::Removed((Some(rid("manager-D-2")), remover.clone())),
                    )
                })
                .into(),
            &mut state,
        );
        assert_eq!(id, rid("manager-D-2"));
        assert_eq!(parent(span).as_deref(), Some("b7ad6b7169203331"));

        // A removal and a creation of two requests in one answer: no single parent,
        // a fresh ID, and a line under each request's ID naming the deployment.
        let (four, five) = (circuit_named("four"), circuit_named("five"));
        fetched(
            vec![(four.id, Change::Now((four.clone(), None, None)))],
            &mut state,
        );
        let (id, span) = fetched(
            vec![
                (
                    five.id,
                    Change::Now((five.clone(), Some(rid("manager-C-5")), creator.clone())),
                ),
                (
                    four.id,
                    Change::Removed((Some(rid("manager-D-4")), remover.clone())),
                ),
            ],
            &mut state,
        );
        assert!(
            id != rid("manager-C-5") && id != rid("manager-D-4"),
            "a fresh ID: {id}"
        );
        assert!(span.is_none(), "no single parent");
        let json = lines.json_lines();
        let line = |message: &str, request: &str| {
            json.iter()
                .find(|v| v["message"] == message && v["request_id"] == request)
                .unwrap_or_else(|| panic!("no {message:?} under {request}: {json:?}"))
                .clone()
        };
        assert_eq!(
            line("circuit removed in a batch", "manager-D-4")["deployment"],
            id.to_string()
        );
        assert_eq!(
            line("circuit deployed in a batch", "manager-C-5")["deployment"],
            id.to_string()
        );
        // Every deployment's own line is under its ID.
        let deploying: Vec<&serde_json::Value> = json
            .iter()
            .filter(|v| v["message"] == "deploying the coordinator's circuits")
            .collect();
        assert_eq!(deploying.len(), 6, "{json:?}");
        assert_eq!(deploying[1]["request_id"], "manager-D-1");
        assert_eq!(deploying[1]["removed"], 1);
        assert_eq!(deploying[1]["parent_span_id"], "b7ad6b7169203331");
        assert_eq!(deploying[3]["request_id"], "manager-D-2");
        assert_eq!(deploying[5]["request_id"], id.to_string());
        assert!(
            deploying[5].get("parent_span_id").is_none(),
            "{:?}",
            deploying[5]
        );
        // A removal without a request (an older coordinator's answer) is as before.
        let six = circuit_named("six");
        fetched(
            vec![(six.id, Change::Now((six.clone(), None, None)))],
            &mut state,
        );
        let before = lines.json_lines().len();
        let (id, span) = fetched(vec![(six.id, Change::Removed((None, None)))], &mut state);
        assert!(span.is_none());
        let json = lines.json_lines();
        let new_lines: Vec<&serde_json::Value> = json[before..].iter().collect();
        assert!(
            new_lines
                .iter()
                .all(|v| v["message"] != "circuit removed in a batch"),
            "no request to name: {new_lines:?}"
        );
        assert!(
            new_lines
                .iter()
                .any(|v| v["message"] == "deploying the coordinator's circuits"
                    && v["request_id"] == id.to_string()
                    && v["removed"] == 1),
            "{new_lines:?}"
        );

        // A removal batched with an update of another circuit (whose request is not
        // known: the store keeps the creator's ID, not the updater's): the removing
        // request does not speak for the update, so a fresh ID and a batch line.
        let (seven, eight) = (circuit_named("seven"), circuit_named("eight"));
        fetched(
            [&seven, &eight]
                .map(|c| {
                    (
                        c.id,
                        Change::Now(((*c).clone(), Some(rid("manager-C-7")), None)),
                    )
                })
                .into(),
            &mut state,
        );
        let mut moved = seven.clone();
        moved.subdomain = Some("seven-moved".into());
        let (id, _) = fetched(
            vec![
                (
                    seven.id,
                    Change::Now((moved, Some(rid("manager-C-7")), None)),
                ),
                (
                    eight.id,
                    Change::Removed((Some(rid("manager-D-8")), remover.clone())),
                ),
            ],
            &mut state,
        );
        assert!(
            id != rid("manager-D-8") && id != rid("manager-C-7"),
            "a fresh ID: {id}"
        );
        let json = lines.json_lines();
        assert!(
            json.iter()
                .any(|v| v["message"] == "circuit removed in a batch"
                    && v["request_id"] == "manager-D-8"
                    && v["deployment"] == id.to_string()),
            "{json:?}"
        );
    }

    #[test]
    fn batch_lines_are_bounded_per_circuit_then_counted_per_request() {
        let lines = appproxy_test_support::logs::Sink::default();
        let _log = tracing::subscriber::set_default(json_subscriber(&lines));
        let deployment = rid("batch-1");
        let mut batch = BatchLines::new(deployment);
        let (d, c) = (rid("idle-pass-1"), rid("manager-C-1"));
        for _ in 0..MAX_BATCH_LINES + 100 {
            batch.add(uuid::Uuid::new_v4(), d, BatchKind::Removed);
        }
        batch.add(uuid::Uuid::new_v4(), c, BatchKind::Deployed);
        batch.add(uuid::Uuid::new_v4(), c, BatchKind::Deployed);
        batch.add(uuid::Uuid::new_v4(), deployment, BatchKind::Removed);
        batch.finish();
        let json = lines.json_lines();
        let per_circuit = json
            .iter()
            .filter(|v| v["message"] == "circuit removed in a batch")
            .count();
        assert_eq!(per_circuit, MAX_BATCH_LINES);
        let counted: Vec<(String, String, u64)> = json
            .iter()
            .filter(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("more "))
            })
            .map(|v| {
                (
                    v["message"].as_str().unwrap_or_default().to_owned(),
                    v["request_id"].as_str().unwrap_or_default().to_owned(),
                    v["circuits"].as_u64().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            counted,
            vec![
                (
                    "more circuits removed in a batch".into(),
                    "idle-pass-1".into(),
                    100
                ),
                (
                    "more circuits deployed in a batch".into(),
                    "manager-C-1".into(),
                    2
                ),
            ]
        );
        assert!(
            json.iter().all(|v| v["deployment"] == "batch-1"),
            "every line names the deployment: {json:?}"
        );
        assert_eq!(
            json.len(),
            MAX_BATCH_LINES + 2,
            "nothing for the deployment's own ID"
        );
    }

    #[test]
    fn an_events_removal_names_its_request() {
        let id = uuid::Uuid::new_v4();
        let fetched = Fetched::of_deltas(vec![Delta::Remove(vec![id], Some(rid("manager-D-1")))]);
        match &fetched.changes[..] {
            [(got, Change::Removed((by, None)))] => {
                assert_eq!(*got, id);
                assert_eq!(*by, Some(rid("manager-D-1")));
            }
            other => panic!("one removal expected: {other:?}"),
        }
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

    /// Only the names a deployment will resolve are looked up: the routes in rotation
    /// of circuits new or changed, not those of a circuit already deployed as it is
    /// (a whole re-read of thousands of circuits looks up nothing), and a name
    /// looked up for a circuit reaches its resolution; one that was not found in
    /// time refuses its circuit with the reason, and the others deploy.
    /// The acknowledgement's failed circuits say which could not listen: those of the
    /// deployment's outcome and those kept from an earlier one, with `listen`; those
    /// this worker refused (an app host it could not resolve) without it, so the
    /// coordinator avoids no port for them. Before, both went out alike and a tenant
    /// creating circuits with a bad app host marked healthy ports as held.
    #[test]
    fn refused_circuits_are_acknowledged_failed_without_the_listen_flag() {
        let mut state = Deployed::default();
        let [refused, kept, listening, deployed, not_owed] =
            std::array::from_fn(|_| uuid::Uuid::new_v4());
        state
            .refused
            .insert(refused, "app host kernel.test: name not found".into());
        state.listen_failed.insert(
            kept,
            (
                "Address already in use (os error 98)".into(),
                std::time::Instant::now(),
            ),
        );
        let outcome = vec![
            (
                listening,
                "Address already in use (os error 98)".to_string(),
            ),
            (not_owed, "Address already in use (os error 98)".to_string()),
        ];
        let owed = [refused, kept, listening, deployed];
        let failed = state.failed_of(&owed, outcome);
        let got: Vec<(uuid::Uuid, bool)> = failed.iter().map(|f| (f.id, f.listen)).collect();
        assert_eq!(
            got,
            vec![(listening, true), (refused, false), (kept, true)],
            "{failed:?}"
        );
        assert!(failed[1].reason.contains("name not found"), "{failed:?}");
        assert!(state.listen_failed.is_empty(), "answered, so forgotten");
        // On the wire: `listen` only when set (an older coordinator ignores it).
        let mut body = CircuitsEvent::new("w", Vec::new());
        body.failed = failed;
        let wire = serde_json::to_value(&body).expect("json");
        assert_eq!(wire["failed"][0]["listen"], true, "{wire}");
        assert!(wire["failed"][1].get("listen").is_none(), "{wire}");
    }

    /// The offset marks are written with: applied past 1 s, kept until within
    /// 0.5 s (a lag near 1 s does not switch on and off at every heartbeat), and
    /// an answer more than a day off (a broken coordinator's) never taken.
    #[test]
    fn the_mark_clock_applies_a_lag_with_hysteresis_and_refuses_a_broken_answer() {
        let clock = MarkClock::default();
        clock.note(0.3);
        assert_eq!(clock.offset(), 0.0, "noise");
        clock.note(1.5);
        assert_eq!(clock.offset(), 1.5);
        clock.note(0.8);
        assert_eq!(clock.offset(), 0.8, "still lagging: kept");
        clock.note(0.3);
        assert_eq!(clock.offset(), 0.0, "agrees again");
        clock.note(0.9);
        assert_eq!(clock.offset(), 0.0, "not past the tolerance from agreement");
        clock.note(-600.0);
        assert_eq!(clock.offset(), -600.0);
        for broken in [1.7e12, -1.7e9, f64::NAN, f64::INFINITY] {
            clock.note(broken);
            assert_eq!(clock.offset(), -600.0, "{broken} taken");
        }
        let before = appproxy_shared::jwt::now_epoch();
        let now = clock.now();
        assert!((now - (before - 600.0)).abs() < 5.0, "{now} vs {before}");
    }

    #[test]
    fn a_deployment_looks_up_only_the_names_it_resolves() {
        // Its lines are captured as the other tests' are: a deployment logged here with
        // no subscriber at all could leave the log call sites it shares with them
        // marked as unwanted while they run in parallel (tracing caches interest).
        let lines = appproxy_test_support::logs::Sink::default();
        let _log = tracing::subscriber::set_default(json_subscriber(&lines));
        let config = Config::parse(
            "[worker]\nfrontend_mode = \"wildcard\"\nwildcard_domain = \".apps.test\"\n",
        )
        .expect("config");
        let deployer = Deployer::without_cores();
        let mut state = Deployed::default();
        let named = |sub: &str, host: &str| {
            let mut c = circuit_named(sub);
            c.route_info[0].kernel_host = host.into();
            let mut out = c.route_info[0].clone();
            out.kernel_host = format!("out.{host}");
            out.traffic_ratio = 0.0;
            c.route_info.push(out);
            c
        };
        let (a, b, ip) = (
            named("a", "kernel-a.test"),
            named("b", "kernel-b.test"),
            circuit_named("ip"),
        );
        let fetched = |cs: &[&Circuit]| Fetched {
            revision: None,
            whole: true,
            changes: cs
                .iter()
                .map(|c| (c.id, Change::Now(((*c).clone(), None, None))))
                .collect(),
        };
        let names = names_to_look_up(&fetched(&[&a, &b, &ip]), &state);
        let want: HashSet<(String, u16)> = [
            ("kernel-a.test".to_string(), 8000),
            ("kernel-b.test".to_string(), 8000),
            ("127.0.0.1".to_string(), 8000),
        ]
        .into_iter()
        .collect();
        assert_eq!(names, want, "out-of-rotation routes are not looked up");
        let mut found = Found::new();
        found.insert(
            ("kernel-a.test".into(), 8000),
            Ok("10.1.2.3:8000".parse().expect("addr")),
        );
        found.insert(
            ("kernel-b.test".into(), 8000),
            Err("name lookup timed out after 5 s".into()),
        );
        apply(
            &config,
            &deployer,
            fetched(&[&a, &b, &ip]),
            &mut state,
            None,
            &found,
        )
        .expect("a deployment");
        assert_eq!(
            state.circuits[&a.id].upstreams,
            vec![("10.1.2.3:8000".parse().expect("addr"), 1.0)]
        );
        assert!(state.circuits.contains_key(&ip.id));
        let why = &state.refused[&b.id];
        assert!(
            why.contains("kernel-b.test") && why.contains("timed out"),
            "{why}"
        );
        // The whole set again: only the refused circuit's name is looked up again.
        let names = names_to_look_up(&fetched(&[&a, &b, &ip]), &state);
        assert_eq!(
            names,
            [("kernel-b.test".to_string(), 8000)].into_iter().collect()
        );
        // The refused circuit is tried again once due, with no change fetched: its
        // name found this time, it deploys and is no longer refused or retried.
        let nothing = || Fetched {
            revision: None,
            whole: false,
            changes: Vec::new(),
        };
        let mut polled = nothing();
        retry_due(&mut polled, &mut state);
        assert!(polled.changes.is_empty(), "tried again before its wait");
        state.retry.get_mut(&b.id).expect("kept for a retry").at = std::time::Instant::now();
        let mut polled = nothing();
        retry_due(&mut polled, &mut state);
        assert_eq!(polled.changes.len(), 1);
        assert_eq!(
            names_to_look_up(&polled, &state),
            [("kernel-b.test".to_string(), 8000)].into_iter().collect()
        );
        found.insert(
            ("kernel-b.test".into(), 8000),
            Ok("10.1.2.4:8000".parse().expect("addr")),
        );
        apply(&config, &deployer, polled, &mut state, None, &found).expect("a deployment");
        assert!(state.circuits.contains_key(&b.id));
        assert!(!state.refused.contains_key(&b.id) && state.retry.is_empty());
        // A circuit refused for another reason (not a name) is not tried again.
        let mut taken = named("a", "kernel-c.test");
        taken.id = uuid::Uuid::new_v4();
        found.insert(
            ("kernel-c.test".into(), 8000),
            Ok("10.1.2.5:8000".parse().expect("addr")),
        );
        let mut change = nothing();
        change
            .changes
            .push((taken.id, Change::Now((taken.clone(), None, None))));
        let _ = apply(&config, &deployer, change, &mut state, None, &found);
        assert!(
            state.refused[&taken.id].contains("used by another circuit"),
            "{:?}",
            state.refused
        );
        assert!(state.retry.is_empty());
    }
}
