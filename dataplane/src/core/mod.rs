//! Per-core state: everything one executor thread owns, split by concept — the route
//! table ([`route`]), the upstream pool ([`pool`]), the access log ([`access_log`]),
//! the connection gate ([`conn_gate`]) — and the [`Core`] that holds them.
//!
//! Everything here belongs to one executor thread and is `!Send` on purpose (`Rc`,
//! `Cell`, `RefCell`): no lock or atomic is touched on the per-request path. Counters
//! are published to the admin thread by the reactor tick, not per request.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use crate::config::Runtime;
use crate::reactor::Reactor;

pub mod access_log;
pub mod conn_gate;
pub mod pool;
pub mod route;
pub mod tunnels;

pub use access_log::{AccessEntry, AccessLog};
pub use conn_gate::{is_local_error, is_out_of_descriptors, ConnGate};
pub use pool::Pool;
pub use route::{Change, HealthPolicy, Route, RouteTable};
pub use tunnels::{TunnelGuard, Tunnels};

pub use crate::metrics::{counter, CoreMetrics, SharedMetrics};

/// A per-core map whose keys the operator or the platform chooses (ports, upstream
/// addresses, circuit IDs), never a client: hashed with foldhash (randomly seeded per
/// map), which costs a tenth of the standard SipHash on these small keys. Maps keyed
/// by what users choose (subdomains) keep the standard hasher.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Read buffers a core keeps for reuse: at most 8,192 (128 MiB at 16 KiB each).
/// A kept-alive connection gives its buffers back at each idle wait and takes them
/// again with its next request, so the pool must hold what the core's busiest
/// moment had out: with 128 kept, 512 kept-alive clients of one core allocated
/// (zeroed) and freed two buffers a request, 28,525 user-space instructions per
/// small GET instead of 17,943 (callgrind, 512 connections). It never holds more
/// than were out at once (what the old per-connection buffers held while their
/// connections lived); the ceiling bounds it past that.
const READ_BUFS_KEPT: usize = 8192;

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
    /// Set when the drain's deadline passes: every exchange still open is being cut
    /// ([`crate::reactor::Reactor::revoke_all`]), and says so
    /// ([`crate::proxy::retry::Failure::drained`]).
    pub cut_off: Cell<bool>,
    /// Read buffer shared by every tunnel on this core: a tunnel borrows it only
    /// between a readiness edge and the end of the synchronous forward, so idle
    /// sessions hold no buffer.
    pub scratch: RefCell<Vec<u8>>,
    /// Client and upstream read buffers of closed HTTP/1.1 connections, reused by
    /// new ones (no zeroed allocation per connection).
    pub read_bufs: crate::relay::BufPool,
    /// The other storage of closed HTTP/1.1 connections, reused by new ones.
    pub conn_storage: crate::proxy::StoragePool,
    /// Requests per circuit since the last hand-off to the control agent
    /// (managed mode only): the last-access marks, batched per core.
    pub access_marks: RefCell<FastMap<uuid::Uuid, u64>>,
    /// Open tunnels (WebSocket, TCP) per circuit, with what each was admitted on: a
    /// deployment that removes or restricts their circuit closes them. While one is
    /// open the circuit is marked accessed at every hand-off, as the original marks
    /// an open WebSocket every 1.5 s — an idle-looking circuit with a live session is
    /// not collected.
    pub tunnels: Tunnels,
    /// Open client connections on this core and their cap ([`Core::admit`]).
    pub conns: ConnGate,
    /// xorshift state for weighted route choice (no shared RNG, no syscall).
    rng: Cell<u64>,
    /// Connection IDs for log spans.
    next_conn: Cell<u64>,
    /// The worker's readiness, which the API port's probes answer with.
    pub readiness: Arc<crate::readiness::Readiness>,
    /// Every core's liveness, which they answer with too.
    pub liveness: Arc<crate::liveness::Liveness>,
}

impl Core {
    /// Sets the read-buffer gauges from the pool (at the tick, before publishing:
    /// the pool counts on its own cells, nothing per request here).
    pub fn note_read_buffers(&self) {
        use crate::metrics::Counter;
        let (held, pooled) = (self.read_bufs.held(), self.read_bufs.len());
        self.metrics
            .set(Counter::ReadBuffersHeld as usize, held as u64);
        self.metrics
            .set(Counter::ReadBuffersPooled as usize, pooled as u64);
    }

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
        for id in self.tunnels.circuits() {
            marks.entry(id).or_insert(0);
        }
        marks.drain().collect()
    }

    /// Whether a hand-off has anything to say.
    pub fn has_access_marks(&self) -> bool {
        !self.access_marks.borrow().is_empty() || !self.tunnels.is_empty()
    }

    /// Counts one of the proxy's own answers, whichever path sent it (HTTP/1.1
    /// exchange, HTTP/2 stream, connection cap): its status class, the proxy-error
    /// total and its code (a timeout code also by kind).
    pub fn count_refusal(&self, r: &crate::http::error::Refusal) {
        self.metrics.status(r.status);
        self.metrics.add(counter::PROXY_ERRORS, 1);
        self.metrics.error_code(r.code);
    }

    /// Admits one request of `client` (come through `hop`) under `[limits]
    /// max_request_rate_per_client` (the worker's one table, shared by its cores), or
    /// the refusal to answer, counted; nothing to do while the limit is off. A
    /// trusted proxy's own requests (it forwarded no address: its health checks, a
    /// balancer that adds none) are not limited, as its connections are not: every
    /// client behind it would share its address's rate.
    pub fn take_request(
        &self,
        hop: &crate::http::encode::ClientHop,
        client: std::net::IpAddr,
    ) -> Result<(), crate::http::error::ProxyError> {
        let Some(rates) = &self.rt.request_rates else {
            return Ok(());
        };
        if hop.trusted && client == hop.peer.ip() {
            return Ok(());
        }
        rates.take(client).map_err(|limited| {
            self.metrics.add(counter::REQUESTS_REFUSED_RATE, 1);
            tracing::debug!(client = %client, "request refused: its address is past its request rate");
            crate::http::error::ProxyError::RequestRateLimit(limited.retry_after_secs())
        })
    }

    /// Records a finished exchange: metrics (duration, per-circuit row) and the
    /// access line.
    pub fn record(&self, e: &AccessEntry<'_>) {
        // One clock read serves the histogram and the access line.
        let duration = e.started.elapsed();
        self.metrics
            .request_done(e.circuit.map(|c| &c.id), e.status, duration);
        self.access.record(e, duration);
        crate::trace::export(e, duration, self.cpu);
    }

    /// Builds the state of core `cpu`; `clients` is the worker's one count of open
    /// connections per client address, shared by its cores; `readiness` and
    /// `liveness`, the worker's.
    pub fn new(
        cpu: usize,
        row: usize,
        rt: Arc<Runtime>,
        reactor: Rc<Reactor>,
        clients: Arc<crate::client_table::ClientTable>,
        readiness: Arc<crate::readiness::Readiness>,
        liveness: Arc<crate::liveness::Liveness>,
    ) -> Rc<Self> {
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
            conns: ConnGate::new(
                rt.max_connections_per_core,
                (rt.http2.max_app_streams, rt.http2.enabled),
                rt.cpus.len(),
                cpu,
                clients,
            ),
            metrics: CoreMetrics::new(rt.per_circuit_metrics)
                .with_histograms(rt.latency_histograms),
            access: AccessLog::new(rt.log_format, rt.access_log, cpu),
            draining: Cell::new(false),
            cut_off: Cell::new(false),
            access_marks: RefCell::new(FastMap::default()),
            tunnels: Tunnels::default(),
            scratch: RefCell::new(vec![0; 64 * 1024]),
            read_bufs: crate::relay::BufPool::new(crate::proxy::BUF_SIZE, READ_BUFS_KEPT),
            conn_storage: crate::proxy::StoragePool::new(READ_BUFS_KEPT / 2),
            rng: Cell::new(seed),
            next_conn: Cell::new(0),
            readiness,
            liveness,
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

#[cfg(test)]
mod tests {
    use super::*;

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
