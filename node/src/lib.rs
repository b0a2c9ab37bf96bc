//! `appproxy-node`: where the data plane and the control plane meet in one process.
//!
//! The worker binary (`appproxy-worker`, `src/bin/worker.rs`) is composed here, and so
//! is single-node mode: a coordinator ([`appproxy_coordinator`]) running on
//! its own thread and runtime in the worker's process, which the worker's agent
//! follows through [`EmbeddedLink`], the in-process [`ControlLink`] — the same calls
//! as the remote link's HTTP and Redis, in the same typed shapes
//! ([`appproxy_shared::wire`]). Neither library depends on the other; only this crate
//! depends on both.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use appproxy_coordinator::config::CoordinatorConfig;
use appproxy_coordinator::events::CircuitEvent;
use appproxy_coordinator::{Coordinator, State};
use appproxy_dataplane::agent::{self, Agent, AgentError};
use appproxy_dataplane::config::Config;
use appproxy_dataplane::link::{ControlLink, LinkError, Notice};
use appproxy_dataplane::worker::Deployer;
use appproxy_shared::model::CircuitsEvent;
use appproxy_shared::wire::{AccessMark, CircuitSet, WorkerRegistration};
use crossbeam_channel::Receiver;

/// The coordinator of this process, as the agent sees it: calls go straight to its
/// state (no HTTP), events come from its in-process bus (no Redis).
pub struct EmbeddedLink {
    state: Arc<State>,
}

impl EmbeddedLink {
    /// A link to the coordinator whose state is `state`.
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

fn store_error(e: impl std::fmt::Display) -> LinkError {
    LinkError::Embedded(format!("store: {e}"))
}

impl ControlLink for EmbeddedLink {
    async fn register(&self, registration: &WorkerRegistration) -> Result<uuid::Uuid, LinkError> {
        self.state
            .register_local_worker(registration)
            .await
            .map_err(store_error)
    }

    /// In process, over the embedded store: one clock.
    async fn heartbeat(&self, worker: uuid::Uuid) -> Result<Option<f64>, LinkError> {
        self.state
            .local_heartbeat(worker)
            .await
            .map(|_| None)
            .map_err(store_error)
    }

    async fn deregister(&self, worker: uuid::Uuid) -> Result<(), LinkError> {
        self.state
            .deregister_local_worker(worker)
            .await
            .map(|_| ())
            .map_err(store_error)
    }

    async fn changes(&self, worker: uuid::Uuid, since: u64) -> Result<CircuitSet, LinkError> {
        self.state
            .local_changes(worker, since)
            .await
            .map_err(store_error)
    }

    async fn page(
        &self,
        worker: uuid::Uuid,
        after: Option<uuid::Uuid>,
    ) -> Result<CircuitSet, LinkError> {
        self.state
            .local_circuits_page(worker, after)
            .await
            .map_err(store_error)
    }

    fn follow(&self, authority: &str, tx: tokio::sync::mpsc::UnboundedSender<Notice>) {
        tokio::spawn(follow_local(
            self.state.subscribe(),
            authority.to_owned(),
            tx,
        ));
    }

    async fn acknowledge(
        &self,
        ack: CircuitsEvent,
        _tracestate: Option<&appproxy_shared::TraceState>,
    ) -> bool {
        self.state.settle(ack);
        true
    }

    async fn record_marks(&self, marks: &[AccessMark]) -> bool {
        self.state.record_access(marks).await
    }
}

/// Follows the coordinator's in-process events for the worker `authority`.
async fn follow_local(
    mut events: tokio::sync::broadcast::Receiver<CircuitEvent>,
    authority: String,
    tx: tokio::sync::mpsc::UnboundedSender<Notice>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let notice = match events.recv().await {
            Ok(e) if e.authority == authority => {
                Notice::event(e.kind, e.circuits, e.request_id, e.span.map(|s| s.child()))
            }
            Ok(_) => continue,
            // Missed some: look at what changed.
            Err(RecvError::Lagged(_)) => Notice::default(),
            Err(RecvError::Closed) => return,
        };
        if tx.send(notice).is_err() {
            return;
        }
    }
}

/// A coordinator running on a thread of its own (`appproxy-coordinator`, with its own
/// runtime) in this process; its log lines say `component: coordinator`.
pub struct EmbeddedCoordinator {
    /// Its shared state: what [`EmbeddedLink`] calls.
    pub state: Arc<State>,
    /// Its API's address.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Told once the coordinator's thread is done.
    done: Option<std::sync::mpsc::Receiver<()>>,
}

impl EmbeddedCoordinator {
    /// Opens the store, binds the API port and serves on a new thread; returns once
    /// it listens. Errors are configs, stores or ports that cannot work.
    pub fn start(config: &CoordinatorConfig) -> Result<Self, AgentError> {
        let config = config.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<_, AgentError>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("appproxy-coordinator".into())
            .spawn(move || {
                // Its lines, and those of its blocking threads, are the coordinator's.
                appproxy_shared::telemetry::set_thread_component("coordinator");
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .on_thread_start(|| {
                        appproxy_shared::telemetry::set_thread_component("coordinator")
                    })
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(AgentError::Io(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let c = match Coordinator::bind(&config).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(AgentError::Embedded(format!("{e:#}"))));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok((c.state.clone(), c.addr)));
                    // A dropped handle is not a stop request: only an explicit one is.
                    let stopped = async {
                        if stop_rx.await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    };
                    if let Err(e) = c.run(stopped).await {
                        tracing::error!(error = %e, "embedded coordinator stopped");
                    }
                });
                let _ = done_tx.send(());
            })?;
        let (state, addr) = ready_rx.recv().map_err(|_| {
            AgentError::Embedded("the coordinator thread exited during start-up".into())
        })??;
        Ok(Self {
            state,
            addr,
            stop: Some(stop_tx),
            done: Some(done_rx),
        })
    }

    /// Stops serving and waits (5 s at most) for the thread to end (its jobs end
    /// with it); dropping the handle does not stop it.
    pub fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.recv_timeout(std::time::Duration::from_secs(5));
        }
    }
}

/// Starts the worker's agent: following the coordinator of `[coordinator] url`, or,
/// with `embedded` (a coordinator config), a coordinator started in this process
/// first — its address is the agent's [`Agent::coordinator`], and stopping the agent
/// (after it deregistered) stops it. Errors are configs or ports that cannot work.
pub fn spawn_agent(
    config: Config,
    embedded: Option<CoordinatorConfig>,
    deployer: Deployer,
    marks: Option<Receiver<Vec<(uuid::Uuid, u64)>>>,
) -> Result<Agent, AgentError> {
    let Some(cc) = embedded else {
        return agent::spawn_remote(config, deployer, marks);
    };
    if config.coordinator.as_ref().is_some_and(|c| c.url.is_some()) {
        return Err(AgentError::Embedded(
            "[coordinator] url and embedded are both set".into(),
        ));
    }
    let coordinator = EmbeddedCoordinator::start(&cc)?;
    let link = EmbeddedLink::new(coordinator.state.clone());
    let addr = coordinator.addr;
    let agent = agent::spawn(config, link, deployer, marks)?;
    Ok(agent.with_coordinator(addr, move || coordinator.stop()))
}
