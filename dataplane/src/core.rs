//! Per-core state: route table, upstream pool, metrics and access log.
//!
//! Everything here belongs to one executor thread and is `!Send` on purpose (`Rc`,
//! `Cell`, `RefCell`): no lock or atomic is touched on the per-request path. Counters
//! are published to the admin thread by the reactor tick, not per request.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use appproxy_shared::telemetry::{push_json_escaped, push_logfmt_pair, LogFormat, Rfc3339};
use appproxy_shared::RequestId;

use crate::config::{Frontend, ResolvedCircuit, Runtime, Wildcard};
use crate::io::{CountGuard, TcpConn};
use crate::reactor::Reactor;

/// Passive health of one upstream of a route, on one core.
#[derive(Debug, Clone, Copy, Default)]
struct Health {
    /// Failures in a row (connect errors, broken or missing response heads).
    failures: u32,
    /// Excluded from choice until then.
    unhealthy_until: Option<Instant>,
}

/// How passive health judges upstreams.
#[derive(Debug, Clone, Copy)]
pub struct HealthPolicy {
    /// Consecutive failures that mark an upstream unhealthy.
    pub threshold: u32,
    /// How long it stays out of rotation (an active probe may bring it back sooner).
    pub backoff: std::time::Duration,
}

/// A circuit's routes, ready for weighted choice among the healthy ones.
pub struct Route {
    /// The circuit, shared read-only by every core (one copy per worker, not per core).
    pub circuit: Arc<ResolvedCircuit>,
    /// Per-upstream passive health, indexed like `circuit.upstreams`; empty (no
    /// allocation) until an upstream first fails, as for most circuits it never does.
    health: RefCell<Vec<Health>>,
}

impl Route {
    /// Prepares `circuit` for routing.
    pub fn new(circuit: Arc<ResolvedCircuit>) -> Self {
        Self {
            circuit,
            health: RefCell::new(Vec::new()),
        }
    }

    /// Picks an upstream by `traffic_ratio` among the healthy ones (all of them when
    /// none is healthy: better a try than a certain failure), skipping `exclude`.
    /// `draw` is uniform in [0, 1).
    pub fn pick(&self, draw: f64, now: Instant, exclude: Option<SocketAddr>) -> Option<SocketAddr> {
        let health = self.health.borrow();
        let ups = &self.circuit.upstreams;
        let usable = |i: usize| Some(ups[i].0) != exclude;
        let healthy = |i: usize| {
            usable(i)
                && health
                    .get(i)
                    .is_none_or(|h| h.unhealthy_until.is_none_or(|t| t <= now))
        };
        let any_healthy = (0..ups.len()).any(healthy);
        let eligible = |i: usize| if any_healthy { healthy(i) } else { usable(i) };
        let total: f64 = (0..ups.len())
            .filter(|i| eligible(*i))
            .map(|i| ups[i].1)
            .sum();
        if total <= 0.0 {
            return None;
        }
        let mut target = draw * total;
        let mut last = None;
        for i in (0..ups.len()).filter(|i| eligible(*i)) {
            last = Some(ups[i].0);
            if target < ups[i].1 {
                return last;
            }
            target -= ups[i].1;
        }
        last
    }

    /// Records the outcome of an exchange with `addr`; returns true when this failure
    /// just marked it unhealthy.
    pub fn record(&self, addr: SocketAddr, ok: bool, now: Instant, policy: HealthPolicy) -> bool {
        let Some(i) = self.circuit.upstreams.iter().position(|(a, _)| *a == addr) else {
            return false;
        };
        let mut health = self.health.borrow_mut();
        if health.is_empty() {
            if ok {
                return false;
            }
            health.resize(self.circuit.upstreams.len(), Health::default());
        }
        let h = &mut health[i];
        if ok {
            if h.unhealthy_until.is_some() {
                crate::introspect::health_changed();
            }
            *h = Health::default();
            return false;
        }
        h.failures = h.failures.saturating_add(1);
        if h.failures >= policy.threshold && h.unhealthy_until.is_none_or(|t| t <= now) {
            h.unhealthy_until = Some(now + policy.backoff);
            crate::introspect::health_changed();
            return true;
        }
        false
    }

    /// Upstreams out of rotation with the time they come back.
    pub fn out_of_rotation(&self, now: Instant) -> Vec<(SocketAddr, Instant)> {
        let health = self.health.borrow();
        self.circuit
            .upstreams
            .iter()
            .zip(health.iter())
            .filter_map(|((a, _), h)| h.unhealthy_until.filter(|t| *t > now).map(|t| (*a, t)))
            .collect()
    }

    /// Upstreams currently out of rotation.
    pub fn unhealthy(&self, now: Instant) -> Vec<SocketAddr> {
        let health = self.health.borrow();
        self.circuit
            .upstreams
            .iter()
            .zip(health.iter())
            .filter(|(_, h)| h.unhealthy_until.is_some_and(|t| t > now))
            .map(|((a, _), _)| *a)
            .collect()
    }
}

/// The routes of one core, by frontend port or subdomain. A deployment changes only
/// the entries it names ([`RouteTable::apply`]): a request in flight keeps the
/// `Rc<Route>` it looked up, so it sees either the old circuit or the new one.
#[derive(Default)]
pub struct RouteTable {
    /// Port-mode circuits.
    pub by_port: HashMap<u16, Rc<Route>>,
    /// Wildcard-mode circuits, by lowercase subdomain.
    pub by_subdomain: HashMap<String, Rc<Route>>,
    /// Every circuit by ID (its frontend says where else it sits).
    by_id: HashMap<uuid::Uuid, Rc<Route>>,
    /// The wildcard frontend, in wildcard mode.
    pub wildcard: Option<Wildcard>,
}

impl RouteTable {
    /// Builds a table from resolved circuits.
    pub fn new(circuits: &[Arc<ResolvedCircuit>], wildcard: Option<Wildcard>) -> Self {
        let mut table = Self {
            wildcard,
            ..Self::default()
        };
        for c in circuits {
            table.insert(c.clone());
        }
        table
    }

    /// Applies a deployment: the whole set replaced, or only the circuits it names
    /// upserted and removed — O(changed), whatever the table's size.
    pub fn apply(&mut self, change: &Change) {
        if change.replace {
            self.by_port.clear();
            self.by_subdomain.clear();
            self.by_id.clear();
        }
        for id in &change.removes {
            self.remove(id);
        }
        for c in &change.upserts {
            self.insert(c.clone());
        }
    }

    /// Adds or replaces one circuit (a replaced one may have moved frontend).
    fn insert(&mut self, c: Arc<ResolvedCircuit>) {
        let id = c.circuit.id;
        self.remove(&id);
        // Another circuit holding the same frontend loses it: the agent refuses such
        // sets, so this only keeps the table and its index consistent.
        let route = Rc::new(Route::new(c.clone()));
        let previous = match &c.frontend {
            Frontend::Port(p) => self.by_port.insert(*p, route.clone()),
            Frontend::Subdomain(s) => self.by_subdomain.insert(s.clone(), route.clone()),
        };
        if let Some(previous) = previous {
            self.by_id.remove(&previous.circuit.circuit.id);
        }
        self.by_id.insert(id, route);
    }

    /// Removes one circuit, if present.
    fn remove(&mut self, id: &uuid::Uuid) {
        let Some(route) = self.by_id.remove(id) else {
            return;
        };
        match &route.circuit.frontend {
            Frontend::Port(p) => {
                self.by_port.remove(p);
            }
            Frontend::Subdomain(s) => {
                self.by_subdomain.remove(s);
            }
        }
    }

    /// The circuit with this ID.
    pub fn get(&self, id: &uuid::Uuid) -> Option<Rc<Route>> {
        self.by_id.get(id).cloned()
    }

    /// Every route.
    pub fn routes(&self) -> impl Iterator<Item = &Rc<Route>> {
        self.by_port.values().chain(self.by_subdomain.values())
    }

    /// The ports this table needs listeners on.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.by_port.keys().copied().collect();
        ports.extend(self.wildcard.as_ref().map(|w| w.port));
        ports
    }

    /// The circuit for a connection to `local_port` carrying `host`.
    pub fn lookup(&self, local_port: u16, host: Option<&[u8]>) -> Option<Rc<Route>> {
        match &self.wildcard {
            Some(w) if w.port == local_port => {
                let sub = w.subdomain(host?)?;
                self.by_subdomain.get(sub.as_ref()).cloned()
            }
            _ => self.by_port.get(&local_port).cloned(),
        }
    }

    /// Number of circuits.
    pub fn len(&self) -> usize {
        self.by_port.len() + self.by_subdomain.len()
    }

    /// Whether there are no circuits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One deployment, as every core applies it: the circuits created or changed (shared
/// by every core), the ones removed, or — `replace` — a whole new set.
#[derive(Debug, Default)]
pub struct Change {
    /// The set replaces the table (the config file, a reload); otherwise only the
    /// named circuits change.
    pub replace: bool,
    /// Circuits created or changed (the whole set with `replace`).
    pub upserts: Vec<Arc<ResolvedCircuit>>,
    /// Circuits removed.
    pub removes: Vec<uuid::Uuid>,
}

impl Change {
    /// The whole set `circuits`, replacing whatever was deployed.
    pub fn replace(circuits: Vec<ResolvedCircuit>) -> Self {
        Self {
            replace: true,
            upserts: circuits.into_iter().map(Arc::new).collect(),
            removes: Vec::new(),
        }
    }
}

/// An idle pooled connection.
struct Idle {
    /// The connection.
    conn: TcpConn,
    /// When it went idle.
    since: Instant,
}

/// Per-core keep-alive pool of upstream connections.
pub struct Pool {
    /// Idle connections by upstream address, most recent last.
    idle: RefCell<HashMap<SocketAddr, Vec<Idle>>>,
    /// Cap per address.
    max_idle: usize,
    /// Idle lifetime.
    idle_timeout: std::time::Duration,
    /// Open connections (in use and idle) per upstream address; each connection
    /// holds one unit ([`CountGuard`]) until it closes.
    open: RefCell<HashMap<SocketAddr, Rc<Cell<usize>>>>,
    /// Cap on `open` per address.
    max_open: usize,
}

impl Pool {
    /// An empty pool.
    pub fn new(max_idle: usize, idle_timeout: std::time::Duration, max_open: usize) -> Self {
        Self {
            idle: RefCell::new(HashMap::new()),
            max_idle,
            idle_timeout,
            open: RefCell::new(HashMap::new()),
            max_open: max_open.max(1),
        }
    }

    /// One unit of `addr`'s open-connection count for a new connection, or `None`
    /// when the upstream already has `max_open` connections on this core (pool
    /// misses only: a pooled connection already holds its unit).
    pub fn reserve(&self, addr: SocketAddr) -> Option<CountGuard> {
        let mut open = self.open.borrow_mut();
        CountGuard::take(open.entry(addr).or_default(), self.max_open)
    }

    /// A live idle connection to `addr`, if one is pooled (`now`: the reactor's clock).
    pub fn take(&self, addr: SocketAddr, now: Instant) -> Option<TcpConn> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        while let Some(entry) = list.pop() {
            if now.saturating_duration_since(entry.since) > self.idle_timeout {
                continue;
            }
            // An edge since the connection went idle means the app closed it or sent
            // something unasked: check with one read, else reuse without a syscall.
            if entry.conn.has_pending_input() && !entry.conn.probe_idle() {
                continue;
            }
            return Some(entry.conn);
        }
        None
    }

    /// Returns a connection for reuse.
    pub fn put(&self, addr: SocketAddr, conn: TcpConn, now: Instant) {
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(addr).or_default();
        if list.len() < self.max_idle {
            list.push(Idle { conn, since: now });
        }
    }

    /// Closes idle connections past their lifetime (run from the reactor tick).
    pub fn evict_expired(&self) {
        let mut idle = self.idle.borrow_mut();
        for list in idle.values_mut() {
            list.retain(|e| e.since.elapsed() <= self.idle_timeout);
        }
        // Forget counts of upstreams with no connection left (routes come and go).
        self.open
            .borrow_mut()
            .retain(|_, n| n.get() > 0 || Rc::strong_count(n) > 1);
    }

    /// When the oldest idle connection outlives its lifetime (`None`: pool empty), so
    /// an idle core parks until then instead of ticking.
    pub fn next_expiry(&self) -> Option<Instant> {
        let idle = self.idle.borrow();
        let oldest = idle
            .values()
            .flat_map(|l| l.first())
            .map(|e| e.since)
            .min()?;
        Some(oldest + self.idle_timeout)
    }

    /// Number of idle connections.
    pub fn idle_count(&self) -> usize {
        self.idle.borrow().values().map(Vec::len).sum()
    }
}

pub use crate::metrics::{counter, CoreMetrics, SharedMetrics};

/// One access-log entry.
pub struct AccessEntry<'a> {
    /// The request's ID.
    pub request_id: &'a RequestId,
    /// The circuit served (absent for errors before routing): its ID and user
    /// context (`user_id`, first `session_id`, `endpoint_id`) go on the line.
    pub circuit: Option<&'a appproxy_shared::model::Circuit>,
    /// Method token.
    pub method: &'a [u8],
    /// Path (query left out: it may hold tokens).
    pub path: &'a [u8],
    /// Status sent.
    pub status: u16,
    /// Request bytes from the client (head and body).
    pub bytes_in: u64,
    /// Response bytes to the client (head and body).
    pub bytes_out: u64,
    /// The app's address.
    pub upstream: Option<SocketAddr>,
    /// When the request head was complete.
    pub started: Instant,
}

/// The per-core access log: lines are formatted into a buffer and written in batches
/// (at 32 KiB or every reactor tick), so logging stays off the hot path's syscalls.
pub struct AccessLog {
    /// Pending lines.
    buf: RefCell<String>,
    /// Line format.
    format: LogFormat,
    /// Off: nothing is formatted.
    enabled: bool,
    /// This core's CPU, on every line.
    core: usize,
}

const FLUSH_AT: usize = 32 * 1024;

impl AccessLog {
    /// A log for core `core`.
    pub fn new(format: LogFormat, enabled: bool, core: usize) -> Self {
        Self {
            buf: RefCell::new(String::with_capacity(FLUSH_AT + 1024)),
            format,
            enabled,
            core,
        }
    }

    /// Appends one line; inside a traced request (the span bound by the proxy) the
    /// line carries the span's `trace_id`, `span_id` and `parent_span_id`.
    pub fn record(&self, e: &AccessEntry<'_>, duration: Duration) {
        if !self.enabled {
            return;
        }
        let span = appproxy_shared::current_span();
        let trace = span.map(|s| (s.trace_id.hex(), s.span_id.hex()));
        let parent = span.and_then(|s| s.parent_span_id).map(|p| p.hex());
        let user = e.circuit.and_then(|c| c.user_id);
        let session = e.circuit.and_then(|c| c.session_ids.first());
        let endpoint = e.circuit.and_then(|c| c.endpoint_id);
        let duration_us = duration.as_micros() as u64;
        let ts = Rfc3339(SystemTime::now());
        let method = String::from_utf8_lossy(e.method);
        let path = String::from_utf8_lossy(e.path);
        let path = path.split('?').next().unwrap_or("");
        let circuit = e.circuit.map(|c| c.id.to_string());
        let upstream = e.upstream.map(|a| a.to_string());
        let mut buf = self.buf.borrow_mut();
        use std::fmt::Write as _;
        match self.format {
            LogFormat::Json => {
                let _ = write!(
                    buf,
                    "{{\"timestamp\":\"{ts}\",\"level\":\"INFO\",\"component\":\"worker\",\"target\":\"access\",\"request_id\":\"{}\",\"core\":{},",
                    e.request_id, self.core
                );
                if let Some((t, s)) = &trace {
                    let _ = write!(
                        buf,
                        "\"trace_id\":\"{}\",\"span_id\":\"{}\",",
                        t.as_str(),
                        s.as_str()
                    );
                }
                if let Some(p) = &parent {
                    let _ = write!(buf, "\"parent_span_id\":\"{}\",", p.as_str());
                }
                if let Some(c) = &circuit {
                    let _ = write!(buf, "\"circuit\":\"{c}\",");
                }
                if let Some(u) = user {
                    let _ = write!(buf, "\"user_id\":\"{u}\",");
                }
                if let Some(s) = session {
                    let _ = write!(buf, "\"session_id\":\"{s}\",");
                }
                if let Some(ep) = endpoint {
                    let _ = write!(buf, "\"endpoint_id\":\"{ep}\",");
                }
                buf.push_str("\"method\":\"");
                push_json_escaped(&mut buf, &method);
                buf.push_str("\",\"path\":\"");
                push_json_escaped(&mut buf, path);
                let _ = write!(
                    buf,
                    "\",\"status\":{},\"bytes_in\":{},\"bytes_out\":{},",
                    e.status, e.bytes_in, e.bytes_out
                );
                if let Some(u) = &upstream {
                    let _ = write!(buf, "\"upstream\":\"{u}\",");
                }
                let _ = writeln!(buf, "\"duration_us\":{duration_us}}}");
            }
            LogFormat::Logfmt => {
                let _ = write!(
                    buf,
                    "ts={ts} level=info component=worker target=access request_id={} core={}",
                    e.request_id, self.core
                );
                if let Some((t, s)) = &trace {
                    let _ = write!(buf, " trace_id={} span_id={}", t.as_str(), s.as_str());
                }
                if let Some(p) = &parent {
                    let _ = write!(buf, " parent_span_id={}", p.as_str());
                }
                if let Some(c) = &circuit {
                    let _ = write!(buf, " circuit={c}");
                }
                if let Some(u) = user {
                    let _ = write!(buf, " user_id={u}");
                }
                if let Some(s) = session {
                    let _ = write!(buf, " session_id={s}");
                }
                if let Some(ep) = endpoint {
                    let _ = write!(buf, " endpoint_id={ep}");
                }
                push_logfmt_pair(&mut buf, "method", &method);
                push_logfmt_pair(&mut buf, "path", path);
                let _ = write!(
                    buf,
                    " status={} bytes_in={} bytes_out={}",
                    e.status, e.bytes_in, e.bytes_out
                );
                if let Some(u) = &upstream {
                    let _ = write!(buf, " upstream={u}");
                }
                let _ = writeln!(buf, " duration_us={duration_us}");
            }
        }
        if buf.len() >= FLUSH_AT {
            drop(buf);
            self.flush();
        }
    }

    /// Writes the pending lines.
    pub fn flush(&self) {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            return;
        }
        let _ = std::io::stdout().lock().write_all(buf.as_bytes());
        buf.clear();
    }
}

/// Everything one core owns.
pub struct Core {
    /// The CPU this executor is pinned to.
    pub cpu: usize,
    /// Row in [`SharedMetrics`].
    pub row: usize,
    /// The validated configuration.
    pub rt: Arc<Runtime>,
    /// The readiness reactor.
    pub reactor: Rc<Reactor>,
    /// The current route table (changed in place by deployments; borrowed only for a
    /// lookup, never across an await).
    pub routes: RefCell<RouteTable>,
    /// Upstream keep-alive pool.
    pub pool: Pool,
    /// Counters.
    pub metrics: CoreMetrics,
    /// Access log.
    pub access: AccessLog,
    /// Set on SIGTERM: stop accepting, close after the current request.
    pub draining: Cell<bool>,
    /// Read buffer shared by every tunnel on this core: a tunnel borrows it only
    /// between a readiness edge and the end of the synchronous forward, so idle
    /// sessions hold no buffer.
    pub scratch: RefCell<Vec<u8>>,
    /// Requests per circuit since the last hand-off to the control agent
    /// (managed mode only): the last-access marks, batched per core.
    pub access_marks: RefCell<HashMap<uuid::Uuid, u64>>,
    /// Open tunnels (WebSocket, TCP) per circuit: while one is open the circuit is
    /// marked accessed at every hand-off, as the original marks an open WebSocket
    /// every 1.5 s — an idle-looking circuit with a live session is not collected.
    pub open_tunnels: RefCell<HashMap<uuid::Uuid, u32>>,
    /// Open client connections on this core and their cap ([`Core::admit`]).
    pub conns: ConnGate,
    /// xorshift state for weighted route choice (no shared RNG, no syscall).
    rng: Cell<u64>,
    /// Connection IDs for log spans.
    next_conn: Cell<u64>,
}

impl Core {
    /// Counts a request (or a tunnel) for `circuit`'s last-access marks; nothing
    /// when nobody reads them.
    pub fn mark_access(&self, circuit: uuid::Uuid) {
        if self.rt.access_flush.is_some() {
            *self.access_marks.borrow_mut().entry(circuit).or_insert(0) += 1;
        }
    }

    /// Takes the counts gathered since the last call, plus a zero count (a last-access
    /// mark alone) for every circuit with an open tunnel.
    pub fn take_access_marks(&self) -> Vec<(uuid::Uuid, u64)> {
        let mut marks = self.access_marks.borrow_mut();
        for id in self.open_tunnels.borrow().keys() {
            marks.entry(*id).or_insert(0);
        }
        marks.drain().collect()
    }

    /// Whether a hand-off has anything to say.
    pub fn has_access_marks(&self) -> bool {
        !self.access_marks.borrow().is_empty() || !self.open_tunnels.borrow().is_empty()
    }

    /// Counts a tunnel of `circuit` as open until the guard drops (metrics, and the
    /// last-access marks when somebody reads them).
    pub fn tunnel_open(self: &Rc<Self>, circuit: uuid::Uuid) -> TunnelGuard {
        self.metrics.add(counter::TUNNELS_ACTIVE, 1);
        self.metrics.add(counter::TUNNELS_OPENED, 1);
        let marks = self.rt.access_flush.is_some();
        if marks {
            *self.open_tunnels.borrow_mut().entry(circuit).or_insert(0) += 1;
        }
        TunnelGuard {
            core: self.clone(),
            marks,
            circuit,
        }
    }

    /// Records a finished exchange: metrics (duration, per-circuit row) and the
    /// access line.
    pub fn record(&self, e: &AccessEntry<'_>) {
        // One clock read serves the histogram and the access line.
        let duration = e.started.elapsed();
        self.metrics
            .request_done(e.circuit.map(|c| &c.id), e.status, duration);
        self.access.record(e, duration);
    }

    /// Builds the state of core `cpu`.
    pub fn new(cpu: usize, row: usize, rt: Arc<Runtime>, reactor: Rc<Reactor>) -> Rc<Self> {
        let seed = (uuid::Uuid::new_v4().as_u128() as u64) | 1;
        Rc::new(Self {
            cpu,
            row,
            routes: RefCell::new(RouteTable::new(
                &rt.circuits
                    .iter()
                    .cloned()
                    .map(Arc::new)
                    .collect::<Vec<_>>(),
                rt.wildcard.clone(),
            )),
            pool: Pool::new(
                rt.max_idle_per_route,
                rt.pool_idle_timeout,
                rt.max_upstream_conns,
            ),
            conns: ConnGate::new(rt.max_connections_per_core, rt.cpus.len(), cpu),
            metrics: CoreMetrics::new(rt.per_circuit_metrics),
            access: AccessLog::new(rt.log_format, rt.access_log, cpu),
            draining: Cell::new(false),
            access_marks: RefCell::new(HashMap::new()),
            open_tunnels: RefCell::new(HashMap::new()),
            scratch: RefCell::new(vec![0; 64 * 1024]),
            rng: Cell::new(seed),
            next_conn: Cell::new(0),
            rt,
            reactor,
        })
    }

    /// A uniform draw in [0, 1).
    pub fn draw(&self) -> f64 {
        let mut x = self.rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next connection ID on this core.
    pub fn next_conn_id(&self) -> u64 {
        let id = self.next_conn.get() + 1;
        self.next_conn.set(id);
        id
    }

    /// Every upstream out of rotation on this core: circuit, address, until when.
    pub fn out_of_rotation(&self, now: Instant) -> Vec<crate::introspect::Unhealthy> {
        let table = self.routes.borrow();
        table
            .routes()
            .flat_map(|r| {
                let id = r.circuit.circuit.id;
                r.out_of_rotation(now)
                    .into_iter()
                    .map(move |(addr, until)| (id, addr, until))
            })
            .collect()
    }

    /// How passive health judges upstreams.
    pub fn health_policy(&self) -> HealthPolicy {
        HealthPolicy {
            threshold: self.rt.failure_threshold,
            backoff: self.rt.unhealthy_backoff,
        }
    }

    /// Looks up the circuit of a frontend port (port mode).
    pub fn route_for_port(&self, port: u16) -> Option<Rc<Route>> {
        self.routes.borrow().by_port.get(&port).cloned()
    }

    /// Looks up the circuit of an HTTP request by port or `Host`.
    pub fn route_for(&self, port: u16, host: Option<&[u8]>) -> Option<Rc<Route>> {
        self.routes.borrow().lookup(port, host)
    }
}

/// The per-core connection cap: how many client connections are open, how many may
/// be, and the state of the current refusal or accept-failure burst (one log line
/// per burst, not per connection).
pub struct ConnGate {
    /// Open client connections (every frontend and the API port).
    open: Rc<Cell<usize>>,
    /// The cap.
    pub cap: usize,
    /// Connections refused since the cap was last left.
    refused_in_burst: Cell<u64>,
    /// Failed accepts since the last successful one.
    failed_in_burst: Cell<u64>,
    /// Upstream connects that failed for a local reason since the last one that
    /// worked.
    local_in_burst: Cell<u64>,
}

/// Descriptors left aside for everything that is not a client connection or its
/// upstream connection (listeners, pooled connections, the admin thread, logs).
const DESCRIPTOR_HEADROOM: u64 = 128;

impl ConnGate {
    /// The gate of one of `cores` cores; `cap` 0 derives the cap from the descriptor
    /// limit: each proxied connection costs two descriptors, the limit is shared by
    /// every core, and [`DESCRIPTOR_HEADROOM`] stays free.
    fn new(cap: usize, cores: usize, cpu: usize) -> Self {
        let cap = if cap > 0 {
            cap
        } else {
            let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .unwrap_or(1 << 20);
            let per_core = nofile.saturating_sub(DESCRIPTOR_HEADROOM) / 2 / cores.max(1) as u64;
            let cap = per_core.clamp(16, 1 << 20) as usize;
            tracing::info!(
                core = cpu,
                cap,
                nofile,
                "connection cap per core derived from the descriptor limit ([limits] max_connections_per_core = 0)"
            );
            cap
        };
        Self {
            open: Rc::new(Cell::new(0)),
            cap,
            refused_in_burst: Cell::new(0),
            failed_in_burst: Cell::new(0),
            local_in_burst: Cell::new(0),
        }
    }

    /// Open client connections now.
    pub fn open(&self) -> usize {
        self.open.get()
    }
}

/// The proxy's answer to a connection refused at the cap (HTTP frontends only).
const REFUSED_HEAD: &str = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\nRetry-After: 1\r\n";

impl Core {
    /// Decides whether a just-accepted connection on `port` may be served: below the
    /// cap it is registered with the reactor and holds a unit of the open count for
    /// its life; at the cap it is refused — counted, logged once per burst, sent a
    /// best-effort 503 JSON when the frontend speaks HTTP — and closed (`None`).
    pub fn admit(
        &self,
        stream: std::net::TcpStream,
        port: u16,
    ) -> Option<std::io::Result<TcpConn>> {
        let guard = self.admission(&stream, port)?;
        Some(TcpConn::new(&self.reactor, stream).map(|mut conn| {
            conn.count_in(guard);
            conn
        }))
    }

    fn admission(&self, stream: &std::net::TcpStream, port: u16) -> Option<CountGuard> {
        let gate = &self.conns;
        let failed = gate.failed_in_burst.replace(0);
        if failed > 0 {
            tracing::info!(core = self.cpu, port, failed, "accepting again");
        }
        let open = gate.open.get();
        if let Some(guard) = CountGuard::take(&gate.open, gate.cap) {
            // The burst ends once the core is clearly below the cap again (a tenth of
            // it free), not at every connection that slips in between refusals.
            let refused = gate.refused_in_burst.get();
            if refused > 0 && open + gate.cap / 10 < gate.cap {
                gate.refused_in_burst.set(0);
                tracing::info!(
                    core = self.cpu,
                    refused,
                    cap = gate.cap,
                    "connection cap: accepting again after refusing connections"
                );
            }
            return Some(guard);
        }
        self.metrics.add(counter::CONN_REFUSED, 1);
        let refused = gate.refused_in_burst.get() + 1;
        gate.refused_in_burst.set(refused);
        if refused == 1 {
            tracing::warn!(
                core = self.cpu,
                port,
                cap = gate.cap,
                "connection cap reached: refusing new connections until some close ([limits] max_connections_per_core)"
            );
        }
        let raw_tcp = self.route_for_port(port).is_some_and(|r| {
            r.circuit.circuit.protocol == appproxy_shared::model::ProxyProtocol::Tcp
        });
        // Over TLS a plaintext answer would be garbage to the client: it is just closed.
        if !raw_tcp && self.rt.tls.is_none() {
            let id = RequestId::generate(self.rt.id_version);
            let body = format!(
                "{{\"error\":\"too many connections on this worker, retry later\",\"code\":\"connection_limit\",\"request_id\":\"{id}\"}}"
            );
            let answer = format!(
                "{REFUSED_HEAD}{}: {id}\r\nContent-Length: {}\r\n\r\n{body}",
                appproxy_shared::header::PRIMARY_HEADER,
                body.len()
            );
            // One non-blocking write into an empty send buffer; never waited on.
            let _ = std::io::Write::write(&mut &*stream, answer.as_bytes());
        }
        None
    }

    /// Records an upstream connect that failed for a local reason (counted, logged
    /// once per burst).
    pub fn local_connect_failure(&self, upstream: SocketAddr, error: &std::io::Error) {
        self.metrics.add(counter::LOCAL_ERRORS, 1);
        let n = self.conns.local_in_burst.get() + 1;
        self.conns.local_in_burst.set(n);
        if n == 1 {
            tracing::error!(
                core = self.cpu,
                upstream = %upstream,
                error = %error,
                "cannot connect upstream: the proxy is out of local resources (answered 503, not counted against the upstream)"
            );
        }
    }

    /// Records an upstream connect that worked (ends a burst of local failures).
    pub fn connect_succeeded(&self) {
        let n = self.conns.local_in_burst.replace(0);
        if n > 0 {
            tracing::info!(
                core = self.cpu,
                failed = n,
                "upstream connects work again after local resource failures"
            );
        }
    }

    /// Records a failed accept on `port` (counted, logged once per burst) and
    /// returns how long the accept loop backs off before trying again.
    pub fn accept_failed(&self, port: u16, error: &std::io::Error) -> std::time::Duration {
        self.metrics.add(counter::ACCEPT_ERRORS, 1);
        let failed = self.conns.failed_in_burst.get() + 1;
        self.conns.failed_in_burst.set(failed);
        if failed == 1 {
            let hint = if is_out_of_descriptors(error) {
                "out of file descriptors: raise LimitNOFILE or lower [limits] max_connections_per_core"
            } else {
                "backing off"
            };
            tracing::error!(core = self.cpu, port, error = %error, hint, "accept failed");
        }
        std::time::Duration::from_millis(50)
    }
}

/// Whether an error is the process (`EMFILE`) or the system (`ENFILE`) running out
/// of file descriptors.
pub fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    let code = e.raw_os_error();
    code == Some(rustix::io::Errno::MFILE.raw_os_error())
        || code == Some(rustix::io::Errno::NFILE.raw_os_error())
}

/// Whether a failed connect was this host's fault rather than the upstream's:
/// descriptors, memory or local ports exhausted. Such failures are never counted
/// against the upstream's health.
pub fn is_local_error(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    is_out_of_descriptors(e)
        || [
            Errno::NOBUFS,
            Errno::NOMEM,
            Errno::ADDRNOTAVAIL,
            Errno::NOSPC,
        ]
        .iter()
        .any(|c| e.raw_os_error() == Some(c.raw_os_error()))
}

/// An open tunnel, counted in [`Core::open_tunnels`] while it lives.
pub struct TunnelGuard {
    /// The core counting it.
    core: Rc<Core>,
    /// Whether it counts for last-access marks.
    marks: bool,
    /// The tunnel's circuit.
    circuit: uuid::Uuid,
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.core.metrics.sub(counter::TUNNELS_ACTIVE, 1);
        if self.marks {
            let core = &self.core;
            let mut open = core.open_tunnels.borrow_mut();
            if let Some(n) = open.get_mut(&self.circuit) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&self.circuit);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_choice_follows_traffic_ratio() {
        let text = r#"
[[circuits]]
id = "c0a8f5d2-1111-4222-8333-444455556666"
open_to_public = true
port = 10206
route_info = [
  { session_id = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b", kernel_host = "127.0.0.1", kernel_port = 1001, traffic_ratio = 1.0 },
  { session_id = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b", kernel_host = "127.0.0.1", kernel_port = 1002, traffic_ratio = 3.0 },
]
"#;
        let rt = crate::config::Config::parse(text)
            .expect("parse")
            .validate(&[0])
            .expect("valid");
        let route = Route::new(Arc::new(rt.circuits[0].clone()));
        let now = Instant::now();
        let mut counts = [0u32; 2];
        for i in 0..4000 {
            let draw = (i as f64 + 0.5) / 4000.0;
            let addr = route.pick(draw, now, None).expect("an upstream");
            counts[(addr.port() - 1001) as usize] += 1;
        }
        assert_eq!(counts, [1000, 3000]);
        assert_eq!(route.pick(0.0, now, None).map(|a| a.port()), Some(1001));
        assert_eq!(
            route.pick(0.999_999, now, None).map(|a| a.port()),
            Some(1002)
        );
        // Passive health: three failures take 1002 out of rotation for the back-off.
        let policy = HealthPolicy {
            threshold: 3,
            backoff: std::time::Duration::from_secs(10),
        };
        let b: SocketAddr = "127.0.0.1:1002".parse().expect("addr");
        assert!(!route.record(b, false, now, policy));
        assert!(!route.record(b, false, now, policy));
        assert!(route.record(b, false, now, policy));
        assert_eq!(route.unhealthy(now), vec![b]);
        for i in 0..100 {
            assert_eq!(
                route.pick(i as f64 / 100.0, now, None).map(|a| a.port()),
                Some(1001)
            );
        }
        let later = now + std::time::Duration::from_secs(11);
        assert!(route.unhealthy(later).is_empty());
        // Excluding the only healthy one still offers the other (fail open).
        assert_eq!(
            route.pick(0.5, now, Some("127.0.0.1:1001".parse().expect("addr"))),
            Some(b)
        );
        route.record(b, true, now, policy);
        assert!(route.unhealthy(now).is_empty());
    }

    /// A resolved circuit at a frontend, routing to `upstream`.
    fn resolved(id: u128, frontend: Frontend, upstream: u16) -> Arc<ResolvedCircuit> {
        let session = uuid::Uuid::from_u128(7);
        Arc::new(ResolvedCircuit {
            circuit: appproxy_shared::model::Circuit {
                id: uuid::Uuid::from_u128(id),
                app: None,
                protocol: appproxy_shared::model::ProxyProtocol::Http,
                worker: None,
                app_mode: appproxy_shared::model::AppMode::Interactive,
                frontend_mode: appproxy_shared::model::FrontendMode::Port,
                envs: Default::default(),
                arguments: None,
                open_to_public: true,
                allowed_client_ips: Vec::new(),
                port: None,
                subdomain: None,
                user_id: None,
                endpoint_id: None,
                runtime_variant: None,
                route_info: Vec::new(),
                session_ids: vec![session],
                created_at: None,
                updated_at: None,
            },
            frontend,
            upstreams: vec![(SocketAddr::from(([127, 0, 0, 1], upstream)), 1.0)],
            upstream_tls: Vec::new(),
            allowed: Vec::new(),
        })
    }

    /// What a table routes: (frontend, circuit, upstream port), sorted.
    fn contents(t: &RouteTable) -> Vec<(String, uuid::Uuid, u16)> {
        let mut out: Vec<_> = t
            .by_port
            .iter()
            .map(|(p, r)| {
                (
                    format!("port {p}"),
                    r.circuit.circuit.id,
                    r.circuit.upstreams[0].0.port(),
                )
            })
            .chain(t.by_subdomain.iter().map(|(s, r)| {
                (
                    format!("sub {s}"),
                    r.circuit.circuit.id,
                    r.circuit.upstreams[0].0.port(),
                )
            }))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn changes_apply_in_place_as_a_rebuild_would() {
        use Frontend::{Port, Subdomain};
        let sub = |s: &str| Subdomain(s.to_owned());
        // Each step: a change, and the whole set it leaves (what a rebuild sees).
        let steps: Vec<(Change, Vec<Arc<ResolvedCircuit>>)> = vec![
            (
                Change {
                    upserts: vec![resolved(1, Port(1001), 9001), resolved(2, sub("a"), 9002)],
                    ..Change::default()
                },
                vec![resolved(1, Port(1001), 9001), resolved(2, sub("a"), 9002)],
            ),
            // An update in place (new upstream), one removal, one creation.
            (
                Change {
                    upserts: vec![resolved(1, Port(1001), 9011), resolved(3, sub("b"), 9003)],
                    removes: vec![uuid::Uuid::from_u128(2)],
                    ..Change::default()
                },
                vec![resolved(1, Port(1001), 9011), resolved(3, sub("b"), 9003)],
            ),
            // A circuit moving frontend leaves its old one free.
            (
                Change {
                    upserts: vec![resolved(3, sub("c"), 9003)],
                    ..Change::default()
                },
                vec![resolved(1, Port(1001), 9011), resolved(3, sub("c"), 9003)],
            ),
            // Removing what is not there changes nothing.
            (
                Change {
                    removes: vec![uuid::Uuid::from_u128(99)],
                    ..Change::default()
                },
                vec![resolved(1, Port(1001), 9011), resolved(3, sub("c"), 9003)],
            ),
            // A whole set replaces everything.
            (
                Change {
                    replace: true,
                    upserts: vec![resolved(4, Port(1004), 9004)],
                    removes: Vec::new(),
                },
                vec![resolved(4, Port(1004), 9004)],
            ),
        ];
        let mut table = RouteTable::new(&[], None);
        for (i, (change, whole)) in steps.iter().enumerate() {
            table.apply(change);
            let rebuilt = RouteTable::new(whole, None);
            assert_eq!(contents(&table), contents(&rebuilt), "step {i}");
            assert_eq!(table.len(), whole.len(), "step {i}");
            for c in whole {
                let got = table.get(&c.circuit.id).expect("by ID");
                assert_eq!(got.circuit.frontend, c.frontend, "step {i}");
            }
        }
        assert!(table.get(&uuid::Uuid::from_u128(1)).is_none());
        assert_eq!(table.ports(), vec![1004]);
    }

    #[test]
    fn a_request_in_flight_keeps_the_circuit_it_looked_up() {
        let mut table = RouteTable::new(&[resolved(1, Frontend::Port(1001), 9001)], None);
        let held = table.lookup(1001, None).expect("routed");
        table.apply(&Change {
            upserts: vec![resolved(1, Frontend::Port(1001), 9002)],
            ..Change::default()
        });
        assert_eq!(held.circuit.upstreams[0].0.port(), 9001);
        let now = table.lookup(1001, None).expect("routed");
        assert_eq!(now.circuit.upstreams[0].0.port(), 9002);
    }

    #[test]
    fn metrics_render_prometheus_text() {
        let shared = SharedMetrics::new(&[0, 1]);
        let m = CoreMetrics::default();
        m.status(200);
        m.status(502);
        m.add(counter::ACCEPTED, 3);
        shared.publish(1, &m);
        let text = shared.render();
        assert!(
            text.contains("appproxy_requests_total{core=\"1\",status=\"2xx\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("appproxy_requests_total{core=\"1\",status=\"5xx\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("appproxy_connections_accepted_total{core=\"1\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("appproxy_requests_total{core=\"0\",status=\"2xx\"} 0\n"),
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE appproxy_requests_total counter")
                .count(),
            1
        );
    }
}
