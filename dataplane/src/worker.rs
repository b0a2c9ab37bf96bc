//! Starting and stopping the cores.
//!
//! One thread per configured CPU runs a pinned glommio executor with its own reactor,
//! route table, pool, listeners (`SO_REUSEPORT`, so the kernel spreads connections)
//! and access log. Commands reach a core over a crossbeam channel (the bridge) plus
//! an eventfd write that wakes its reactor; nothing else is shared between cores.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use appproxy_shared::model::ProxyProtocol;
use appproxy_shared::{scope_traced, RequestId};

use crate::client_table::ClientTable;
use crate::config::{ResolvedCircuit, Runtime};
use crate::core::{counter, Change, Core, SharedMetrics};
use crate::introspect::Board;
use crate::io::Listener;
use crate::liveness::{CoreLiveness, Liveness};
use crate::reactor::{counted, spawn, Reactor, RemoteWaker, DEADLINE_SCAN};
use crate::readiness::Readiness;
use crate::signal::Signal;

/// glommio's preemption timer, set so long that it never fires.
///
/// glommio 0.9's scheduler parks in its io_uring (`io_cqring_wait`) whenever
/// `run_task_queues` reports that it ran nothing, and it reports that not only when no
/// task is runnable but also when the preemption timer has already fired at the moment
/// it looks (the thread was descheduled for longer than the timer between arming it and
/// checking it, as on a loaded machine). That park arms neither the core's epoll set
/// nor any of its deadlines, so the runnable reactor task is left behind until a signal
/// or a foreign wake interrupts the ring wait: the lost wake-up behind the 14-minute
/// stall and the core that never drained. With this timer no completion ever lands in
/// glommio's latency ring (the core issues no I/O through glommio and receives no
/// foreign wakes except the watchdog's kick), so `run_task_queues` never returns
/// "nothing ran" while the reactor task exists, and glommio never parks; the core
/// sleeps only in the reactor's `epoll_wait`. Preemption itself is not needed: the
/// data plane's tasks are cooperative and there is one task queue.
pub const NO_PREEMPTION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A command for every core.
#[derive(Debug, Clone)]
pub enum Command {
    /// Change the route table (only the circuits named, or the whole set): listeners
    /// for new ports open, those of removed ports close; established connections are
    /// not cut.
    Deploy {
        /// What changes, shared by every core.
        change: Arc<Change>,
        /// The request that caused the deployment; every core logs under it.
        request_id: RequestId,
        /// The deployment's span when it is part of a trace: every core logs under it.
        span: Option<appproxy_shared::trace::SpanContext>,
        /// Told this core's row once the table is in place, with the circuits whose
        /// frontend could not listen (the agent's acknowledgement waits for every
        /// core and reports those as failed).
        applied: Sender<(usize, Vec<(uuid::Uuid, String)>)>,
    },
    /// Stop accepting; finish in-flight requests (up to the drain timeout); exit.
    Drain,
}

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A core failed to start (executor, reactor or listener).
    #[error("core {cpu}: {message}")]
    Core {
        /// The CPU.
        cpu: usize,
        /// What failed, with what to change.
        message: String,
    },
}

/// Sends deployments to every core; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Deployer {
    /// Bridge senders and wakers, one per core.
    cores: Arc<Vec<(Sender<Command>, RemoteWaker)>>,
    /// The worker's readiness: the control agent marks its first set applied.
    readiness: Arc<Readiness>,
}

impl Deployer {
    /// The worker's readiness (`/readyz`).
    pub fn readiness(&self) -> &Arc<Readiness> {
        &self.readiness
    }

    /// Sends a new circuit set to every core; the answer tells when all applied it.
    pub fn deploy(&self, circuits: Vec<ResolvedCircuit>, request_id: RequestId) -> Applied {
        self.change(Change::replace(circuits), request_id)
    }

    /// Sends a change to every core; the answer tells when all applied it. The span
    /// bound by the caller (if any: the agent binds the deployment's trace) goes with
    /// it, so every core's "deployment applied" line carries the trace.
    pub fn change(&self, change: Change, request_id: RequestId) -> Applied {
        let span = appproxy_shared::current_span();
        let change = Arc::new(change);
        let (applied, rx) = crossbeam_channel::unbounded();
        for (tx, waker) in self.cores.iter() {
            let _ = tx.send(Command::Deploy {
                change: change.clone(),
                request_id,
                span,
                applied: applied.clone(),
            });
            waker.wake();
        }
        Applied {
            rx,
            cores: self.cores.len(),
            ready: None,
            heard: std::cell::Cell::new(0),
        }
    }
}

#[cfg(test)]
impl Deployer {
    /// A deployer with no core to send to: unit tests of what the agent sends.
    pub(crate) fn without_cores() -> Self {
        Self {
            cores: Arc::new(Vec::new()),
            readiness: Arc::new(Readiness::new()),
        }
    }
}

/// A deployment on its way to the cores.
pub struct Applied {
    /// Each core sends its row once the new table is in place, with its failures.
    rx: Receiver<(usize, Vec<(uuid::Uuid, String)>)>,
    /// How many cores were sent the deployment.
    cores: usize,
    /// Marked ready once every core applied it (the first circuit set).
    ready: Option<Arc<Readiness>>,
    /// Cores whose answer was taken so far.
    heard: std::cell::Cell<usize>,
}

impl Drop for Applied {
    /// A first set whose outcome was not waited for whole (the wait's deadline passed,
    /// or the caller gave up on it) still makes the worker ready once every core
    /// applied it: a thread waits for the rest of the answers, with no deadline, and
    /// ends when they came or every core let go of its sender (a core that exited).
    /// Else a quiet cluster, with no later deployment, would leave it unready.
    fn drop(&mut self) {
        let Some(ready) = self.ready.take().filter(|r| !r.is_synced()) else {
            return;
        };
        let rx = self.rx.clone();
        let rest = self.cores.saturating_sub(self.heard.get());
        let waiter = std::thread::Builder::new()
            .name("appproxy-ready".into())
            .spawn(move || {
                if (0..rest).all(|_| rx.recv().is_ok()) {
                    ready.mark_synced();
                }
            });
        if let Err(e) = waiter {
            tracing::warn!(error = %e, "cannot wait for the first circuit set off the agent; readiness waits for the next deployment");
        }
    }
}

impl Applied {
    /// The worker is ready once every core applied this deployment (its first set).
    pub fn marking_ready(mut self, readiness: Arc<Readiness>) -> Self {
        self.ready = Some(readiness);
        self
    }

    /// Blocks until every core applied the deployment (true) or `timeout` passed.
    pub fn wait(&self, timeout: Duration) -> bool {
        self.outcome(timeout).is_some()
    }

    /// Blocks until every core applied the deployment, then gives the circuits whose
    /// frontend some core could not listen on (with why); `None` when `timeout` passed.
    pub fn outcome(&self, timeout: Duration) -> Option<Vec<(uuid::Uuid, String)>> {
        let deadline = Instant::now() + timeout;
        let mut failed: Vec<(uuid::Uuid, String)> = Vec::new();
        for _ in self.heard.get()..self.cores {
            let (_, list) = self.rx.recv_deadline(deadline).ok()?;
            self.heard.set(self.heard.get() + 1);
            for (id, why) in list {
                if !failed.iter().any(|(f, _)| *f == id) {
                    failed.push((id, why));
                }
            }
        }
        if let Some(ready) = &self.ready {
            ready.mark_synced();
        }
        Some(failed)
    }
}

/// The handle to a running worker.
pub struct Worker {
    /// Bridge senders and wakers, one per core.
    cores: Arc<Vec<(Sender<Command>, RemoteWaker)>>,
    /// Executor threads.
    threads: Vec<JoinHandle<()>>,
    /// Counters of every core.
    pub metrics: Arc<SharedMetrics>,
    /// Frontend addresses bound (for logs and tests).
    pub bound: Vec<SocketAddr>,
    /// Receiving end of the cores' request counts (managed mode).
    access_marks: Option<Receiver<Vec<(uuid::Uuid, u64)>>>,
    /// Every core's liveness (for `/health`, `/metrics` and the watchdog).
    pub liveness: Arc<Liveness>,
    /// What the cores publish for admin introspection (`/circuits`).
    pub board: Arc<Board>,
    /// Whether it should be sent new traffic (`/readyz`).
    pub readiness: Arc<Readiness>,
    /// Closed (every sender dropped) once every core thread has exited.
    exited: Receiver<()>,
    /// The drain timeout (how long `stop` waits, plus a margin).
    drain_timeout: Duration,
    /// The TLS settings every core serves with (`tls_listen`), for reload.
    pub tls: Option<crate::tls::Tls>,
}

/// What a core reports once it is serving (or why it is not).
type Ready = Result<(usize, RemoteWaker, Vec<SocketAddr>), StartError>;

impl Worker {
    /// Starts one executor per CPU of `rt` and waits until every core listens.
    pub fn start(rt: Runtime) -> Result<Self, StartError> {
        let rt = Arc::new(rt);
        let metrics = SharedMetrics::new(&rt.cpus);
        metrics.circuits.store(
            rt.circuits.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Ready>();
        let (marks_tx, marks_rx) = match rt.access_flush {
            Some(_) => {
                let (tx, rx) = crossbeam_channel::bounded(1024);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let liveness = Liveness::new(&rt.cpus, rt.core_stall);
        let board = Board::new(&rt.cpus, rt.circuits.clone(), rt.per_circuit_metrics);
        let clients = Arc::new(ClientTable::default());
        // Shared with the cores, which answer the API port's probes from it.
        let readiness = Arc::new(Readiness::new());
        let (exit_tx, exited) = crossbeam_channel::bounded::<()>(0);
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        for (row, &cpu) in rt.cpus.iter().enumerate() {
            let (tx, rx) = crossbeam_channel::unbounded();
            senders.push(tx);
            let rt = rt.clone();
            let metrics = metrics.clone();
            let ready = ready_tx.clone();
            let marks = marks_tx.clone();
            let live = liveness.cores[row].clone();
            let board = board.clone();
            let clients = clients.clone();
            let readiness = readiness.clone();
            let liveness = liveness.clone();
            let exit_tx = exit_tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("appproxy-core-{cpu}"))
                .spawn(move || {
                    run_core(
                        cpu, row, rt, metrics, rx, ready, marks, live, board, clients, readiness,
                        liveness,
                    );
                    drop(exit_tx);
                })
                .map_err(|e| StartError::Core {
                    cpu,
                    message: format!("cannot start thread: {e}"),
                })?;
            threads.push(thread);
        }
        drop(ready_tx);
        drop(exit_tx);
        let mut wakers: Vec<Option<RemoteWaker>> = (0..rt.cpus.len()).map(|_| None).collect();
        let mut bound = Vec::new();
        let mut failure = None;
        for _ in 0..rt.cpus.len() {
            match ready_rx.recv() {
                Ok(Ok((row, waker, addrs))) => {
                    wakers[row] = Some(waker);
                    if row == 0 {
                        bound = addrs;
                    }
                }
                Ok(Err(e)) => {
                    failure.get_or_insert(e);
                }
                Err(_) => {
                    failure.get_or_insert(StartError::Core {
                        cpu: 0,
                        message: "a core exited during start-up".into(),
                    });
                    break;
                }
            }
        }
        let cores: Arc<Vec<_>> = Arc::new(
            senders
                .into_iter()
                .zip(wakers)
                .filter_map(|(s, w)| w.map(|w| (s, w)))
                .collect(),
        );
        let worker = Self {
            cores,
            threads,
            metrics,
            bound,
            access_marks: marks_rx,
            liveness,
            board,
            readiness,
            exited,
            drain_timeout: rt.drain_timeout,
            tls: rt.tls.clone(),
        };
        if let Some(e) = failure {
            worker.stop();
            return Err(e);
        }
        if let Err(e) = worker.liveness.spawn_watchdog() {
            tracing::warn!(error = %e, "cannot start the core watchdog; /health still checks the cores");
        }
        Ok(worker)
    }

    /// Sends a new circuit set to every core.
    pub fn deploy(&self, circuits: Vec<ResolvedCircuit>, request_id: RequestId) -> Applied {
        self.deployer().deploy(circuits, request_id)
    }

    /// Per-core request counts by circuit, handed over every `access_flush`
    /// (managed mode; `None` otherwise). The control agent turns them into
    /// last-access marks.
    pub fn access_marks(&self) -> Option<Receiver<Vec<(uuid::Uuid, u64)>>> {
        self.access_marks.clone()
    }

    /// What the admin endpoint reports: health, readiness, circuits.
    pub fn health_info(&self) -> crate::admin::HealthInfo {
        crate::admin::HealthInfo {
            cores: self.liveness.cores.len(),
            liveness: self.liveness.clone(),
            board: self.board.clone(),
            readiness: self.readiness.clone(),
        }
    }

    /// A handle for deploying from other threads (the control agent).
    pub fn deployer(&self) -> Deployer {
        Deployer {
            cores: self.cores.clone(),
            readiness: self.readiness.clone(),
        }
    }

    /// Drains every core and waits for them to exit: at most the drain timeout plus
    /// a margin. A core still running then is kicked (in case it sleeps where it should
    /// not) and given one more margin; one that still has not exited is reported and
    /// left to the process exit.
    pub fn stop(self) {
        for (tx, waker) in self.cores.iter() {
            let _ = tx.send(Command::Drain);
            waker.wake();
        }
        let margin = Duration::from_secs(2);
        let deadline = Instant::now() + self.drain_timeout + margin;
        let all_exited = |until: Instant| {
            matches!(
                self.exited.recv_deadline(until),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected)
            )
        };
        if !all_exited(deadline) {
            for core in &self.liveness.cores {
                core.kick();
            }
            if !all_exited(Instant::now() + margin) {
                let running: Vec<usize> = self
                    .liveness
                    .cores
                    .iter()
                    .zip(&self.threads)
                    .filter(|(_, t)| !t.is_finished())
                    .map(|(c, _)| c.cpu)
                    .collect();
                tracing::error!(cores = ?running, "cores did not finish draining in time; exiting without them");
                return;
            }
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Asks the scheduler for a short time slice for this core's thread (`[reactor]
/// sched_slice_us`), and says what came of it: once for the whole worker where the
/// kernel cannot, for each core where the call fails.
fn ask_for_slice(cpu: usize, row: usize, slice: Duration) {
    match appproxy_sys::set_current_thread_slice(slice) {
        Ok(appproxy_sys::SliceOutcome::Set(got)) => {
            tracing::debug!(
                cpu,
                slice_us = got.as_micros() as u64,
                "core runs with a short scheduler slice"
            );
        }
        Ok(appproxy_sys::SliceOutcome::Unsupported) if row == 0 => {
            tracing::info!("the kernel keeps its own scheduler slice (custom slices need Linux 6.12): [reactor] sched_slice_us has no effect");
        }
        Ok(appproxy_sys::SliceOutcome::NotFair(policy)) if row == 0 => {
            tracing::info!(policy, "the cores run under a real-time scheduling policy: [reactor] sched_slice_us is left out");
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(cpu, error = %e, "cannot set the core's scheduler slice; it keeps the kernel's")
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_core(
    cpu: usize,
    row: usize,
    rt: Arc<Runtime>,
    metrics: Arc<SharedMetrics>,
    commands: Receiver<Command>,
    ready: std::sync::mpsc::Sender<Ready>,
    marks: Option<Sender<Vec<(uuid::Uuid, u64)>>>,
    live: Arc<CoreLiveness>,
    board: Arc<Board>,
    clients: Arc<ClientTable>,
    readiness: Arc<Readiness>,
    liveness: Arc<Liveness>,
) {
    let fail = |message: String| StartError::Core { cpu, message };
    let executor = match glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(cpu))
        .name(&format!("core-{cpu}"))
        .io_memory(rt.io_memory)
        .preempt_timer(rt.glommio_preempt.unwrap_or(NO_PREEMPTION))
        .make()
    {
        Ok(ex) => ex,
        Err(e) => {
            let _ = ready.send(Err(fail(explain_executor_error(
                &e.to_string(),
                rt.io_memory,
            ))));
            return;
        }
    };
    if let Some(slice) = rt.sched_slice {
        ask_for_slice(cpu, row, slice);
    }
    // The main task counts as work for the reactor's park decision, like every task.
    executor.run(counted(async move {
        let reactor = match Reactor::new(rt.park, live.clone()) {
            Ok(r) => r,
            Err(e) => {
                let _ = ready.send(Err(fail(format!("cannot create the epoll reactor: {e}"))));
                return;
            }
        };
        let core = Core::new(
            cpu,
            row,
            rt.clone(),
            reactor.clone(),
            clients,
            readiness,
            liveness,
        );
        let listeners: Listeners = RefCell::new(HashMap::new());
        if let Err(failures) = reconcile_listeners(&core, &listeners) {
            let first = failures.into_iter().next().map(|(_, e)| e);
            let _ = ready.send(Err(fail(first.unwrap_or_default())));
            return;
        }
        let addrs: Vec<SocketAddr> = listeners
            .borrow()
            .keys()
            .map(|p| SocketAddr::new(rt.bind_host, *p))
            .collect();
        {
            let core = core.clone();
            let metrics = metrics.clone();
            let flush_every = rt.access_flush;
            let last_flush = Cell::new(Instant::now());
            let board = board.clone();
            reactor.on_tick(Box::new(move |now| {
                core.note_read_buffers();
                metrics.publish(core.row, &core.metrics);
                if crate::introspect::take_health_changed() {
                    board.publish_unhealthy(core.row, core.out_of_rotation(now));
                }
                core.access.flush();
                core.pool.evict_expired();
                // Last-access marks: one hand-off per interval, never a call per request;
                // if the agent is behind (channel full) the counts wait for the next one.
                let mut next = core.pool.next_expiry();
                if let (Some(every), Some(tx)) = (flush_every, &marks) {
                    if core.has_access_marks() {
                        if now.duration_since(last_flush.get()) >= every && !tx.is_full() {
                            last_flush.set(now);
                            let _ = tx.try_send(core.take_access_marks());
                        } else {
                            // Counts are waiting: come back when the interval is over
                            // (or, with the agent behind, one interval from now).
                            let at = (last_flush.get() + every).max(now + DEADLINE_SCAN);
                            next = Some(next.map_or(at, |n: Instant| n.min(at)));
                        }
                    }
                }
                next
            }));
        }
        {
            // The kick task: parked forever; a foreign wake of it (the watchdog's kick)
            // interrupts glommio's ring sleep should the core ever get there.
            let live = live.clone();
            glommio::spawn_local(std::future::poll_fn(move |cx| {
                live.set_kick(cx.waker());
                std::task::Poll::<()>::Pending
            }))
            .detach();
        }
        let reactor_task = glommio::spawn_local(reactor.clone().run());
        let _probe_task = rt
            .probe_interval
            .map(|every| spawn(probe_loop(core.clone(), every)));
        let waking = match reactor.waking().remote() {
            Ok(w) => w,
            Err(e) => {
                let _ = ready.send(Err(fail(format!(
                    "cannot share the reactor's eventfd: {e}"
                ))));
                return;
            }
        };
        let _ = ready.send(Ok((row, waking, addrs)));
        tracing::info!(
            core = cpu,
            circuits = core.routes.borrow().len(),
            "core serving"
        );

        // The bridge: wait for a wake-up, then take every pending command.
        'bridge: loop {
            reactor.woken().await;
            for cmd in commands.try_iter() {
                match cmd {
                    Command::Deploy {
                        change,
                        request_id,
                        span,
                        applied,
                    } => {
                        // Counted before the "deployment applied" line, so whoever
                        // reads that line sees the count too.
                        if row == 0 {
                            let count = board.deployed(&change, request_id);
                            metrics
                                .circuits
                                .store(count as u64, std::sync::atomic::Ordering::Relaxed);
                        }
                        let failed = scope_traced(Some(request_id), span, async {
                            apply_deployment(&core, &listeners, &change)
                        })
                        .await;
                        let _ = applied.send((row, failed));
                    }
                    Command::Drain => break 'bridge,
                }
            }
        }
        // Drain: stop accepting, close idle connections, let in-flight ones finish.
        core.draining.set(true);
        listeners.borrow_mut().clear();
        reactor.expire_idle();
        reactor.wake_all();
        let deadline = Instant::now() + rt.drain_timeout;
        while core.metrics.counters[counter::ACTIVE].get() > 0 && Instant::now() < deadline {
            reactor.sleep(Duration::from_millis(5)).await;
            reactor.expire_idle();
        }
        let left = core.metrics.counters[counter::ACTIVE].get();
        if left > 0 {
            tracing::warn!(
                core = cpu,
                connections = left,
                "drain timeout: cutting the exchanges still open"
            );
            // Each ends through its own failure path, with its access line and ID (a
            // request its app had is told 504, one no app was given yet 503:
            // `Failure::at_deadline`): first every wait on an app
            // fails, so that a client can still be answered, then every wait at
            // all; what does not block still goes out. Bounded: a task that has not
            // ended by then is dropped with the core.
            core.cut_off.set(true);
            let active = || core.metrics.counters[counter::ACTIVE].get();
            for revoke in [Reactor::revoke_apps, Reactor::revoke_all] {
                revoke(&reactor);
                let deadline = Instant::now() + CUT_GRACE / 2;
                while active() > 0 && Instant::now() < deadline {
                    reactor.sleep(Duration::from_millis(5)).await;
                }
            }
            let left = active();
            if left > 0 {
                tracing::warn!(
                    core = cpu,
                    connections = left,
                    "connections closed without their exchanges' lines"
                );
            }
        }
        tracing::info!(core = cpu, "core stopped");
        // Its reactor turns no more: the watchdog and `/health` must not take that
        // for a stall while another core drains on.
        live.mark_stopped();
        core.note_read_buffers();
        metrics.publish(core.row, &core.metrics);
        core.access.flush();
        reactor.stop();
        let _ = reactor_task.await;
    }));
}

/// How long the exchanges a drain's deadline cuts have to end through their own
/// failure paths (they wait on nothing by then): well within the margin
/// [`Worker::stop`] gives a core past the drain timeout.
const CUT_GRACE: Duration = Duration::from_millis(500);

/// Applies the change to the route table, then opens and closes listeners to match
/// it. Returns the circuits whose frontend port could not listen, with why.
fn apply_deployment(
    core: &Rc<Core>,
    listeners: &Listeners,
    change: &Change,
) -> Vec<(uuid::Uuid, String)> {
    let count = {
        let mut table = core.routes.borrow_mut();
        table.apply(change);
        table.len()
    };
    core.recheck_tunnels(change);
    let ports_changed = change.replace
        || !change.removes.is_empty()
        || change
            .upserts
            .iter()
            .any(|c| matches!(c.frontend, crate::config::Frontend::Port(_)));
    if !ports_changed {
        tracing::info!(core = core.cpu, circuits = count, "deployment applied");
        return Vec::new();
    }
    match reconcile_listeners(core, listeners) {
        Ok(()) => {
            tracing::info!(core = core.cpu, circuits = count, "deployment applied");
            Vec::new()
        }
        Err(failures) => {
            let mut failed = Vec::new();
            for (port, e) in failures {
                tracing::error!(core = core.cpu, error = %e, "deployment applied, but a frontend could not listen");
                failed.extend(
                    change
                        .upserts
                        .iter()
                        .filter(|c| c.frontend == crate::config::Frontend::Port(port))
                        .map(|c| (c.circuit.id, e.clone())),
                );
            }
            failed
        }
    }
}

/// The accept loop of each port a core listens on, by port.
type Listeners = RefCell<HashMap<u16, AcceptLoop>>;

/// A port's accept loop, running as a task of its own: dropping this handle ends it
/// (the loop returns at its next poll, its listener closes and its task is freed).
///
/// The loop is told to return, never cancelled: a glommio 0.9 task cancelled while
/// pending (its `Task` handle dropped, or `cancel`) has its future dropped but its
/// own allocation never freed — `JoinHandle::cancel` and the handle's drop bump the
/// reference count before `schedule`, which bumps it again, and the run that drops
/// the future takes only one back. Every port closed that way kept its task (344
/// bytes a core in a release build): 0.7 kB per circuit created and deleted on a
/// two-core worker, for as long as the process lived.
struct AcceptLoop {
    /// Fired when the handle is dropped.
    stop: Rc<Signal>,
}

impl Drop for AcceptLoop {
    fn drop(&mut self) {
        self.stop.fire();
    }
}

impl AcceptLoop {
    /// Starts accepting on `listener` in a task of its own.
    fn spawn(core: Rc<Core>, listener: Listener) -> Self {
        let stop = Rc::new(Signal::default());
        spawn(accept_loop(core, listener, stop.clone())).detach();
        Self { stop }
    }
}

/// Makes the set of listening ports equal to the route table's ports.
fn reconcile_listeners(core: &Rc<Core>, listeners: &Listeners) -> Result<(), Vec<(u16, String)>> {
    let mut wanted: Vec<u16> = core.routes.borrow().ports();
    wanted.extend(core.rt.api_port);
    let mut map = listeners.borrow_mut();
    // Dropping an accept loop's handle ends it: its listener closes.
    map.retain(|port, _| wanted.contains(port));
    let mut errors = Vec::new();
    for port in wanted {
        if map.contains_key(&port) {
            continue;
        }
        let addr = SocketAddr::new(core.rt.bind_host, port);
        match Listener::bind(
            &core.reactor,
            addr,
            core.rt.backlog,
            core.rt.client_keepalive,
        ) {
            Ok(l) => {
                map.insert(port, AcceptLoop::spawn(core.clone(), l));
            }
            Err(e) => {
                errors.push((
                    port,
                    format!("cannot listen on {addr}: {e} (is another process using the port?)"),
                ));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Accepts on `listener` until `stop` says its port is gone; counted in
/// `appproxy_listeners` while it runs.
async fn accept_loop(core: Rc<Core>, listener: Listener, stop: Rc<Signal>) {
    core.metrics.add(counter::LISTENERS, 1);
    accept_until_stopped(&core, &listener, &stop).await;
    core.metrics.sub(counter::LISTENERS, 1);
}

async fn accept_until_stopped(core: &Rc<Core>, listener: &Listener, stop: &Signal) {
    let port = listener.local_addr().port();
    loop {
        let Some(accepted) = stop.unless_fired(listener.accept()).await else {
            return;
        };
        match accepted {
            Ok((stream, peer)) => match core.admit(stream, port, peer) {
                None => {}
                Some(Ok(mut conn)) => {
                    let kind = if Some(port) == core.rt.api_port {
                        Kind::Api
                    } else if core
                        .route_for_port(port)
                        .is_some_and(|r| r.circuit.circuit.protocol == ProxyProtocol::Tcp)
                    {
                        Kind::Tcp
                    } else {
                        Kind::Http
                    };
                    let proxied = core.speaks_proxy_protocol(port);
                    if let Some(tls) = &core.rt.tls {
                        match if kind == Kind::Http && core.rt.http2.enabled {
                            tls.session_h2()
                        } else {
                            tls.session(kind == Kind::Tcp)
                        } {
                            Ok(session) => conn.start_tls(session),
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot start a TLS session");
                                continue;
                            }
                        }
                    }
                    if !proxied && !conn.is_tls() {
                        // Boxed here, once: the connection future is several KiB,
                        // and spawning it unboxed copied it at every wrapper.
                        spawn(Box::pin(serve(core.clone(), conn, peer, port, kind, true))).detach();
                        continue;
                    }
                    let core = core.clone();
                    spawn(Box::pin(async move {
                        // The PROXY protocol header comes before everything, TLS
                        // included; the client it names is the peer from then on (a
                        // connection whose header names no client is never taken for
                        // the trusted proxy).
                        let (peer, trust_forwarding) = if proxied {
                            match crate::proxy_protocol::accept(&core, &mut conn, port, peer).await
                            {
                                Some(client) => (client.addr, client.named),
                                None => return,
                            }
                        } else {
                            (peer, true)
                        };
                        if conn.is_tls() && !crate::tls::handshake(&core, &conn, peer).await {
                            return;
                        }
                        serve(core, conn, peer, port, kind, trust_forwarding).await;
                    }))
                    .detach();
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "cannot register an accepted connection")
                }
            },
            Err(e) => {
                // Out of descriptors: idle app connections give theirs back first.
                if core.shed_idle_for(&e) {
                    continue;
                }
                // Out of descriptors or memory: back off instead of spinning.
                let pause = core.accept_failed(port, &e);
                if stop.unless_fired(core.reactor.sleep(pause)).await.is_none() {
                    return;
                }
            }
        }
    }
}

/// What an accepted connection is served as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The worker API port (`/setup`).
    Api,
    /// A raw TCP circuit.
    Tcp,
    /// An HTTP frontend.
    Http,
}

/// Serves one accepted (and, with TLS, handshaken) connection; `trust_forwarding`
/// false: the peer's forwarding headers are never believed, even when it is a
/// trusted proxy's address (a PROXY protocol header named no client).
async fn serve(
    core: Rc<Core>,
    conn: crate::io::TcpConn,
    peer: SocketAddr,
    port: u16,
    kind: Kind,
    trust_forwarding: bool,
) {
    match kind {
        Kind::Api => crate::api::serve(core, conn, peer).await,
        Kind::Tcp => crate::tcp::serve(core, conn, peer, port).await,
        Kind::Http => crate::proxy::serve(core, conn, peer, port, trust_forwarding).await,
    }
}

/// The active probe: brings unhealthy upstreams back as soon as they accept a TCP
/// connection again, instead of waiting out the whole back-off.
async fn probe_loop(core: Rc<Core>, every: Duration) {
    loop {
        core.reactor.sleep(every).await;
        // Only the circuits reported unhealthy: a core with 100k circuits and one
        // failing app probes one, not 100k.
        let routes = core.routes.borrow().take_suspects(core.reactor.now());
        for route in routes {
            for addr in route.unhealthy(core.reactor.now()) {
                if crate::io::TcpConn::connect(&core.reactor, addr, core.rt.connect_timeout)
                    .await
                    .is_ok()
                {
                    route.record(addr, true, core.reactor.now(), core.health_policy());
                    tracing::info!(upstream = %addr, "upstream answers the probe again: back in rotation");
                }
            }
            if !route.unhealthy(core.reactor.now()).is_empty() {
                core.routes.borrow().suspect_again(&route);
            }
        }
    }
}

/// Turns a glommio executor error into a sentence saying what to change.
fn explain_executor_error(error: &str, io_memory: usize) -> String {
    let lower = error.to_ascii_lowercase();
    if lower.contains("memlock")
        || lower.contains("lock")
        || lower.contains("cannot allocate memory")
    {
        format!(
            "cannot create the executor ({error}): each executor locks {} KiB; raise RLIMIT_MEMLOCK \
             (ulimit -l, or LimitMEMLOCK=infinity in the systemd unit) or lower [reactor] io_memory_kib",
            io_memory / 1024
        )
    } else if lower.contains("operation not permitted")
        || lower.contains("function not implemented")
    {
        format!(
            "cannot create the executor ({error}): io_uring is unavailable (Linux >= 5.8 is needed; \
             container seccomp profiles often block it)"
        )
    } else {
        format!("cannot create the executor: {error}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A first set whose answers came after the wait gave up still makes the worker
    /// ready once every core answered, and not before.
    #[test]
    fn a_first_set_applied_after_its_wait_gave_up_still_makes_the_worker_ready() {
        let readiness = Arc::new(Readiness::new());
        readiness.expect_sync();
        let (tx, rx) = crossbeam_channel::unbounded();
        let applied = Applied {
            rx,
            cores: 2,
            ready: None,
            heard: std::cell::Cell::new(0),
        }
        .marking_ready(readiness.clone());
        tx.send((0, Vec::new())).expect("send");
        assert!(
            applied.outcome(Duration::from_millis(20)).is_none(),
            "one core of two"
        );
        drop(applied);
        assert!(!readiness.is_synced(), "not before the last core");
        tx.send((1, Vec::new())).expect("send");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !readiness.is_synced() {
            assert!(Instant::now() < deadline, "never ready");
            std::thread::sleep(Duration::from_millis(5));
        }
        // A deployment whose cores went away (their senders dropped) leaves it as it is.
        let other = Arc::new(Readiness::new());
        other.expect_sync();
        let (tx, rx) = crossbeam_channel::unbounded::<(usize, Vec<(uuid::Uuid, String)>)>();
        drop(
            Applied {
                rx,
                cores: 1,
                ready: None,
                heard: std::cell::Cell::new(0),
            }
            .marking_ready(other.clone()),
        );
        drop(tx);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!other.is_synced());
    }
}
