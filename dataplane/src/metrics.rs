//! The worker's metrics: what each core counts (plain cells, no locks, no atomics on
//! the hot path), what it publishes to the admin thread at its reactor tick, and the
//! Prometheus text the admin thread renders from that (`# HELP` and `# TYPE` on every
//! family, names per the Prometheus naming guide).
//!
//! - counters and gauges: one [`Counter`] enum, each with its name, kind, help and
//!   label, so names are never kept in step with indices by hand;
//! - histograms with fixed buckets: request duration (head complete → response sent)
//!   and upstream response-head duration, per core, merged (summed) at scrape;
//! - proxy-made errors by code;
//! - per circuit, when `[admin] per_circuit_metrics` opts in: requests by status class
//!   and a duration histogram, for at most `per_circuit_metrics_max` circuits per core
//!   (the rest are summed under `circuit="other"`), so cardinality stays bounded;
//! - worker-wide, outside the cores: circuits deployed, and the Redis event
//!   subscription's reconnections ([`note_redis_reconnect`], counted by the agent).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Counter {
    /// Responses with a 1xx status (final, i.e. 101).
    Requests1xx,
    /// Responses with a 2xx status.
    Requests2xx,
    /// Responses with a 3xx status.
    Requests3xx,
    /// Responses with a 4xx status.
    Requests4xx,
    /// Responses with a 5xx status.
    Requests5xx,
    /// Accepted client connections.
    Accepted,
    /// Open client connections (gauge).
    Active,
    /// Requests sent on a pooled upstream connection.
    PoolHit,
    /// Requests that needed a new upstream connection.
    PoolMiss,
    /// Bytes read from clients.
    BytesIn,
    /// Bytes written to clients.
    BytesOut,
    /// Responses the proxy made itself (errors).
    ProxyErrors,
    /// Connections closed at accept: the core was at its connection cap.
    ConnRefused,
    /// Connections with nothing in hand closed to admit new ones at the cap.
    ConnShed,
    /// Connections closed at accept: their client address was at its cap.
    ConnRefusedPerClient,
    /// Requests refused (429): their client address was past its request rate.
    RequestsRefusedPerClientRate,
    /// Connections closed without a valid PROXY protocol header.
    ProxyProtocolRefused,
    /// Connections waiting for their PROXY protocol header (gauge).
    ProxyProtocolWaiting,
    /// Failed accepts (out of descriptors or memory).
    AcceptErrors,
    /// Upstream connects that failed for a local reason.
    LocalErrors,
    /// Requests refused because their upstream was at its connection cap.
    UpstreamLimit,
    /// Open WebSocket and TCP tunnels (gauge).
    TunnelsActive,
    /// Tunnels opened.
    TunnelsOpened,
    /// Tunnels closed because their circuit was removed or no longer admits the
    /// client.
    TunnelsRevoked,
    /// TLS handshakes completed in full.
    TlsHandshakesFull,
    /// TLS handshakes completed by resuming a session (ticket or session ID).
    TlsHandshakesResumed,
    /// TLS handshakes that failed or were cut (timeout, garbage, close).
    TlsHandshakeFailures,
    /// TLS handshakes in progress (gauge).
    TlsHandshaking,
    /// HTTP/2 streams accepted from clients.
    Http2Streams,
    /// HTTP/2 streams being handled now (gauge).
    Http2StreamsActive,
    /// HTTP/2 connections closed for abuse (rapid reset, too many streams in flight).
    Http2Abuse,
    /// Streams to HTTP/2 apps refused: the core's `max_app_streams` budget, or the
    /// client address's share of it, was taken (503).
    Http2AppStreamLimit,
    /// Read buffers held by connections and streams now (gauge, set at the tick).
    ReadBuffersHeld,
    /// Read buffers kept by the core's pool for reuse (gauge, set at the tick).
    ReadBuffersPooled,
    /// Ports the core accepts on now: its accept loops still running (gauge).
    Listeners,
    /// A client's request head did not arrive in `[timeouts] head_secs` (408).
    TimeoutClientHead,
    /// A client's request body stalled past `[timeouts] body_idle_secs` (408).
    TimeoutClientBody,
    /// A client's request body came in below `[limits] min_body_rate` (408).
    TimeoutClientBodyRate,
    /// An upstream connect did not complete in `[timeouts] upstream_connect_secs`.
    TimeoutUpstreamConnect,
    /// An app sent no response head within `[timeouts] upstream_head_secs` (504).
    TimeoutUpstreamHead,
    /// A WebSocket or TCP tunnel closed after `[timeouts] tunnel_idle_secs` of silence.
    TimeoutTunnelIdle,
    /// A client's TLS handshake did not complete within the head timeout.
    TimeoutTlsHandshake,
    /// The TLS handshake to an app that serves HTTPS did not complete within
    /// `[timeouts] upstream_connect_secs` (502).
    TimeoutUpstreamTlsHandshake,
}

/// Number of counters.
pub const N_COUNTERS: usize = Counter::ALL.len();

impl Counter {
    /// Every counter, in index order (checked by a test: `ALL[i] as usize == i`).
    pub const ALL: [Counter; Counter::TimeoutUpstreamTlsHandshake as usize + 1] = [
        Counter::Requests1xx,
        Counter::Requests2xx,
        Counter::Requests3xx,
        Counter::Requests4xx,
        Counter::Requests5xx,
        Counter::Accepted,
        Counter::Active,
        Counter::PoolHit,
        Counter::PoolMiss,
        Counter::BytesIn,
        Counter::BytesOut,
        Counter::ProxyErrors,
        Counter::ConnRefused,
        Counter::ConnShed,
        Counter::ConnRefusedPerClient,
        Counter::RequestsRefusedPerClientRate,
        Counter::ProxyProtocolRefused,
        Counter::ProxyProtocolWaiting,
        Counter::AcceptErrors,
        Counter::LocalErrors,
        Counter::UpstreamLimit,
        Counter::TunnelsActive,
        Counter::TunnelsOpened,
        Counter::TunnelsRevoked,
        Counter::TlsHandshakesFull,
        Counter::TlsHandshakesResumed,
        Counter::TlsHandshakeFailures,
        Counter::TlsHandshaking,
        Counter::Http2Streams,
        Counter::Http2StreamsActive,
        Counter::Http2Abuse,
        Counter::Http2AppStreamLimit,
        Counter::ReadBuffersHeld,
        Counter::ReadBuffersPooled,
        Counter::Listeners,
        Counter::TimeoutClientHead,
        Counter::TimeoutClientBody,
        Counter::TimeoutClientBodyRate,
        Counter::TimeoutUpstreamConnect,
        Counter::TimeoutUpstreamHead,
        Counter::TimeoutTunnelIdle,
        Counter::TimeoutTlsHandshake,
        Counter::TimeoutUpstreamTlsHandshake,
    ];

    /// How this counter is exposed: the one place its name, kind and help are kept.
    const fn spec(self) -> Spec {
        match self {
            Counter::Requests1xx => spec_class("1xx"),
            Counter::Requests2xx => spec_class("2xx"),
            Counter::Requests3xx => spec_class("3xx"),
            Counter::Requests4xx => spec_class("4xx"),
            Counter::Requests5xx => spec_class("5xx"),
            Counter::Accepted => spec("appproxy_connections_accepted_total", Kind::Counter, "Client connections accepted."),
            Counter::Active => spec("appproxy_connections_active", Kind::Gauge, "Client connections open now."),
            Counter::PoolHit => spec("appproxy_upstream_pool_hits_total", Kind::Counter, "Requests sent on a pooled upstream connection."),
            Counter::PoolMiss => spec("appproxy_upstream_pool_misses_total", Kind::Counter, "Requests that needed a new upstream connection."),
            Counter::BytesIn => spec("appproxy_bytes_in_total", Kind::Counter, "Bytes read from clients."),
            Counter::BytesOut => spec("appproxy_bytes_out_total", Kind::Counter, "Bytes written to clients."),
            Counter::ProxyErrors => spec("appproxy_proxy_errors_total", Kind::Counter, "Responses the proxy made itself (see appproxy_proxy_errors_by_code_total)."),
            Counter::ConnRefusedPerClient => spec("appproxy_connections_refused_per_client_total", Kind::Counter, "Connections closed at accept because their client address was at [limits] max_connections_per_client."),
            Counter::RequestsRefusedPerClientRate => spec("appproxy_requests_refused_per_client_rate_total", Kind::Counter, "Requests refused (429) because their client address was past [limits] max_request_rate_per_client."),
            Counter::ProxyProtocolRefused => spec("appproxy_proxy_protocol_refused_total", Kind::Counter, "Connections closed unserved with [worker] proxy_protocol on: not from a trusted proxy, or no valid PROXY header within the head timeout."),
            Counter::ProxyProtocolWaiting => spec("appproxy_proxy_protocol_headers_waiting", Kind::Gauge, "Connections with [worker] proxy_protocol on still waiting for their PROXY header (not yet in appproxy_connections_active)."),
            Counter::ConnShed => spec("appproxy_connections_shed_total", Kind::Counter, "Connections with nothing in hand (waiting for a request, or lingering) closed to admit a new one at [limits] max_connections_per_core."),
            Counter::ConnRefused => spec("appproxy_connections_refused_total", Kind::Counter, "Connections closed at accept because the core was at [limits] max_connections_per_core."),
            Counter::AcceptErrors => spec("appproxy_accept_errors_total", Kind::Counter, "Failed accepts (out of descriptors or memory)."),
            Counter::LocalErrors => spec("appproxy_local_resource_errors_total", Kind::Counter, "Upstream connects that failed for a local reason (EMFILE, ENFILE, no memory or ports); never counted against the upstream."),
            Counter::UpstreamLimit => spec("appproxy_upstream_connection_limit_total", Kind::Counter, "Requests refused because their upstream was at [upstream] max_connections_per_route."),
            Counter::TunnelsActive => spec("appproxy_tunnels_active", Kind::Gauge, "WebSocket and TCP tunnels open now."),
            Counter::TunnelsOpened => spec("appproxy_tunnels_opened_total", Kind::Counter, "WebSocket and TCP tunnels opened."),
            Counter::TunnelsRevoked => spec("appproxy_tunnels_revoked_total", Kind::Counter, "Tunnels (and exchanges of http2 and grpc circuits) closed because a deployment removed their circuit or made it refuse their client."),
            Counter::TlsHandshakesFull => spec_tls("full"),
            Counter::TlsHandshakesResumed => spec_tls("resumed"),
            Counter::TlsHandshakeFailures => spec("appproxy_tls_handshake_failures_total", Kind::Counter, "TLS handshakes that failed, timed out or were closed before completing."),
            Counter::TlsHandshaking => spec("appproxy_tls_handshakes_in_progress", Kind::Gauge, "TLS handshakes in progress now."),
            Counter::Http2Streams => spec("appproxy_http2_streams_total", Kind::Counter, "HTTP/2 streams accepted from clients."),
            Counter::Http2StreamsActive => spec("appproxy_http2_streams_active", Kind::Gauge, "HTTP/2 streams being handled now."),
            Counter::Http2AppStreamLimit => spec("appproxy_http2_app_stream_limit_total", Kind::Counter, "Streams from HTTP/2 clients to apps refused (503 app_stream_limit): the core had [http2] max_app_streams open, or the client's address (an IPv6 client's /48) its share (max_app_streams_per_address) once half were taken."),
            Counter::Http2Abuse => spec("appproxy_http2_connections_cut_total", Kind::Counter, "HTTP/2 connections closed with ENHANCE_YOUR_CALM: the client kept more streams in flight than max_concurrent_streams by resetting them (rapid reset, CVE-2023-44487), or met one of h2's own ENHANCE_YOUR_CALM limits: streams reset before they were accepted, a CONTINUATION flood, a header list past the abuse limit, many small DATA frames, many streams reset for errors."),
            Counter::ReadBuffersHeld => spec("appproxy_read_buffers_held", Kind::Gauge, "Read buffers (16 KiB each, more for one grown for a large head) held by client connections, app connections and HTTP/2 streams now: a connection holds one only while it has bytes to read, none while it waits idle."),
            Counter::ReadBuffersPooled => spec("appproxy_read_buffers_pooled", Kind::Gauge, "Read buffers (16 KiB each) the core keeps for reuse, at most 8,192."),
            Counter::Listeners => spec("appproxy_listeners", Kind::Gauge, "Ports (frontends and the API port) the core accepts on now: one accept loop each, ended when its port's last circuit goes."),
            Counter::TimeoutClientHead => spec_timeout("client_head"),
            Counter::TimeoutClientBody => spec_timeout("client_body"),
            Counter::TimeoutClientBodyRate => spec_timeout("client_body_rate"),
            Counter::TimeoutUpstreamConnect => spec_timeout("upstream_connect"),
            Counter::TimeoutUpstreamHead => spec_timeout("upstream_head"),
            Counter::TimeoutTunnelIdle => spec_timeout("tunnel_idle"),
            Counter::TimeoutTlsHandshake => spec_timeout("tls_handshake"),
            Counter::TimeoutUpstreamTlsHandshake => spec_timeout("upstream_tls_handshake"),
        }
    }
}

/// Prometheus kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// How a counter is exposed: family name, kind, help, and an extra label.
struct Spec {
    family: &'static str,
    kind: Kind,
    help: &'static str,
    label: Option<(&'static str, &'static str)>,
}

const REQUESTS_HELP: &str = "Responses sent to clients, by status class.";

const fn spec_timeout(kind: &'static str) -> Spec {
    Spec {
        family: "appproxy_timeouts_total",
        kind: Kind::Counter,
        help: "Timeouts by kind: client_head, client_body (stalled), client_body_rate (below the minimum rate), upstream_connect, upstream_head, tunnel_idle, tls_handshake (client), upstream_tls_handshake (to an app serving HTTPS).",
        label: Some(("kind", kind)),
    }
}

const fn spec_tls(kind: &'static str) -> Spec {
    Spec {
        family: "appproxy_tls_handshakes_total",
        kind: Kind::Counter,
        help: "TLS handshakes completed, full or resumed (session ticket or ID).",
        label: Some(("kind", kind)),
    }
}

const fn spec(family: &'static str, kind: Kind, help: &'static str) -> Spec {
    Spec {
        family,
        kind,
        help,
        label: None,
    }
}

const fn spec_class(class: &'static str) -> Spec {
    Spec {
        family: "appproxy_requests_total",
        kind: Kind::Counter,
        help: REQUESTS_HELP,
        label: Some(("status", class)),
    }
}

/// Index constants, for code that addresses counters by number.
pub mod counter {
    use super::Counter;
    /// Accepted connections.
    pub const ACCEPTED: usize = Counter::Accepted as usize;
    /// Open client connections.
    pub const ACTIVE: usize = Counter::Active as usize;
    /// Requests sent on a pooled connection.
    pub const POOL_HIT: usize = Counter::PoolHit as usize;
    /// Requests that needed a new upstream connection.
    pub const POOL_MISS: usize = Counter::PoolMiss as usize;
    /// Bytes read from clients.
    pub const BYTES_IN: usize = Counter::BytesIn as usize;
    /// Bytes written to clients.
    pub const BYTES_OUT: usize = Counter::BytesOut as usize;
    /// Errors the proxy answered itself.
    pub const PROXY_ERRORS: usize = Counter::ProxyErrors as usize;
    /// Connections closed at accept because the core was at its connection cap.
    pub const CONN_REFUSED: usize = Counter::ConnRefused as usize;
    /// Connections with nothing in hand closed to admit new ones at the cap.
    pub const CONN_SHED: usize = Counter::ConnShed as usize;
    /// Connections closed at accept because their client address was at its cap.
    pub const CONN_REFUSED_PER_CLIENT: usize = Counter::ConnRefusedPerClient as usize;
    /// Requests refused because their client address was past its request rate.
    pub const REQUESTS_REFUSED_RATE: usize = Counter::RequestsRefusedPerClientRate as usize;
    /// Connections closed without a valid PROXY protocol header.
    pub const PROXY_PROTOCOL_REFUSED: usize = Counter::ProxyProtocolRefused as usize;
    /// Connections waiting for their PROXY protocol header.
    pub const PROXY_PROTOCOL_WAITING: usize = Counter::ProxyProtocolWaiting as usize;
    /// Failed accepts (out of descriptors or memory).
    pub const ACCEPT_ERRORS: usize = Counter::AcceptErrors as usize;
    /// Upstream connects that failed for a local reason.
    pub const LOCAL_ERRORS: usize = Counter::LocalErrors as usize;
    /// Requests refused because their upstream was at its connection cap.
    pub const UPSTREAM_LIMIT: usize = Counter::UpstreamLimit as usize;
    /// Ports the core accepts on (accept loops running).
    pub const LISTENERS: usize = Counter::Listeners as usize;
    /// Open tunnels.
    pub const TUNNELS_ACTIVE: usize = Counter::TunnelsActive as usize;
    /// Tunnels opened.
    pub const TUNNELS_OPENED: usize = Counter::TunnelsOpened as usize;
    /// Tunnels closed by a deployment that removed or restricted their circuit.
    pub const TUNNELS_REVOKED: usize = Counter::TunnelsRevoked as usize;
    /// Full TLS handshakes.
    pub const TLS_FULL: usize = Counter::TlsHandshakesFull as usize;
    /// Resumed TLS handshakes.
    pub const TLS_RESUMED: usize = Counter::TlsHandshakesResumed as usize;
    /// Failed TLS handshakes.
    pub const TLS_FAILED: usize = Counter::TlsHandshakeFailures as usize;
    /// TLS handshakes in progress.
    pub const TLS_HANDSHAKING: usize = Counter::TlsHandshaking as usize;
    /// HTTP/2 streams accepted.
    pub const H2_STREAMS: usize = Counter::Http2Streams as usize;
    /// HTTP/2 streams being handled.
    pub const H2_STREAMS_ACTIVE: usize = Counter::Http2StreamsActive as usize;
    /// HTTP/2 connections cut for abuse.
    pub const H2_ABUSE: usize = Counter::Http2Abuse as usize;
    /// Streams to HTTP/2 apps refused for the core's budget or an address's share.
    pub const H2_APP_STREAM_LIMIT: usize = Counter::Http2AppStreamLimit as usize;
    /// Upstream connects that timed out.
    pub const TIMEOUT_UPSTREAM_CONNECT: usize = Counter::TimeoutUpstreamConnect as usize;
    /// Tunnels closed for idleness.
    pub const TIMEOUT_TUNNEL_IDLE: usize = Counter::TimeoutTunnelIdle as usize;
    /// Client TLS handshakes that timed out.
    pub const TIMEOUT_TLS_HANDSHAKE: usize = Counter::TimeoutTlsHandshake as usize;
    /// Upstream TLS handshakes cut by the connect timeout.
    pub const TIMEOUT_UPSTREAM_TLS_HANDSHAKE: usize = Counter::TimeoutUpstreamTlsHandshake as usize;
}

/// Upper bounds of the histogram buckets, in microseconds (then `+Inf`).
pub const BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];
const N_BUCKETS: usize = BUCKETS_US.len() + 1;

/// A per-core histogram: plain cells.
#[derive(Clone)]
pub struct Histogram {
    /// Observations per bucket (not cumulative; the last is `+Inf`).
    buckets: [Cell<u64>; N_BUCKETS],
    /// Sum of observations, microseconds.
    sum_us: Cell<u64>,
    /// Whether observations are recorded (`[admin] latency_histograms`).
    on: bool,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: Default::default(),
            sum_us: Cell::new(0),
            on: true,
        }
    }
}

impl Histogram {
    /// Whether this histogram records (callers skip their clock reads when not).
    pub fn enabled(&self) -> bool {
        self.on
    }

    /// Records one observation (nothing when the histogram is off).
    pub fn observe(&self, d: Duration) {
        if !self.on {
            return;
        }
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let i = BUCKETS_US.partition_point(|b| *b < us);
        let c = &self.buckets[i];
        c.set(c.get().wrapping_add(1));
        self.sum_us.set(self.sum_us.get().wrapping_add(us));
    }

    fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].get()),
            sum_us: self.sum_us.get(),
        }
    }
}

/// A published histogram (copied at the tick; merged at scrape).
#[derive(Debug, Default, Clone, Copy)]
pub struct HistogramSnapshot {
    /// Observations per bucket (not cumulative).
    pub buckets: [u64; N_BUCKETS],
    /// Sum, microseconds.
    pub sum_us: u64,
}

impl HistogramSnapshot {
    fn merge(&mut self, other: &Self) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.sum_us += other.sum_us;
    }

    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    fn render(&self, out: &mut String, family: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            cumulative += n;
            let le = BUCKETS_US
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |us| format!("{}", *us as f64 / 1e6));
            let _ = writeln!(
                out,
                "{family}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{family}_sum{braces} {}", self.sum_us as f64 / 1e6);
        let _ = writeln!(out, "{family}_count{braces} {cumulative}");
    }
}

/// One circuit's numbers on one core.
#[derive(Default, Clone)]
struct CircuitStats {
    /// Responses by status class (1xx..5xx).
    classes: [u64; 5],
    /// Request durations.
    duration: HistogramSnapshot,
}

impl CircuitStats {
    fn record(&mut self, status: u16, d: Option<Duration>) {
        if status >= 100 {
            self.classes[status_class(status)] += 1;
        }
        let Some(d) = d else { return };
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let i = BUCKETS_US.partition_point(|b| *b < us);
        self.duration.buckets[i] += 1;
        self.duration.sum_us = self.duration.sum_us.wrapping_add(us);
    }

    fn merge(&mut self, other: &Self) {
        for (a, b) in self.classes.iter_mut().zip(other.classes.iter()) {
            *a += b;
        }
        self.duration.merge(&other.duration);
    }
}

fn status_class(status: u16) -> usize {
    (status / 100).clamp(1, 5) as usize - 1
}

/// The key of a circuit's row: its ID, or everything past the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum CircuitKey {
    Id(uuid::Uuid),
    Other,
}

/// Per-circuit metrics: off unless the operator opts in.
#[derive(Debug, Clone, Copy, Default)]
pub struct PerCircuit {
    /// On or off.
    pub enabled: bool,
    /// Most circuits with their own rows per core; the rest are summed as "other".
    pub max: usize,
}

/// One core's metrics: plain cells, touched only by that core.
pub struct CoreMetrics {
    /// Values, indexed like [`Counter`].
    pub counters: [Cell<u64>; N_COUNTERS],
    /// Request durations (head complete → response sent).
    pub request_duration: Histogram,
    /// Upstream response-head durations (request sent → head read).
    pub upstream_head: Histogram,
    /// Proxy-made errors by code.
    errors: RefCell<Vec<(&'static str, u64)>>,
    /// Per-circuit numbers (empty unless enabled).
    circuits: RefCell<HashMap<CircuitKey, CircuitStats>>,
    /// The per-circuit setting.
    per_circuit: PerCircuit,
    /// Whether the latency histograms record (`[admin] latency_histograms`).
    histograms: bool,
}

impl Default for CoreMetrics {
    fn default() -> Self {
        Self::new(PerCircuit::default())
    }
}

impl CoreMetrics {
    /// Zeroed metrics.
    pub fn new(per_circuit: PerCircuit) -> Self {
        Self {
            counters: std::array::from_fn(|_| Cell::new(0)),
            request_duration: Histogram::default(),
            upstream_head: Histogram::default(),
            errors: RefCell::new(Vec::new()),
            circuits: RefCell::new(HashMap::new()),
            per_circuit,
            histograms: true,
        }
    }

    /// Turns the latency histograms (overall, upstream head, per circuit) on or off.
    #[must_use]
    pub fn with_histograms(mut self, on: bool) -> Self {
        self.histograms = on;
        self.request_duration.on = on;
        self.upstream_head.on = on;
        self
    }

    /// Whether the latency histograms record.
    pub fn histograms(&self) -> bool {
        self.histograms
    }

    /// Adds `n` to counter `i`.
    pub fn add(&self, i: usize, n: u64) {
        let c = &self.counters[i];
        c.set(c.get().wrapping_add(n));
    }

    /// Sets counter `i` to `v` (gauges read from elsewhere at the tick).
    pub fn set(&self, i: usize, v: u64) {
        self.counters[i].set(v);
    }

    /// Subtracts `n` from counter `i` (gauges).
    pub fn sub(&self, i: usize, n: u64) {
        let c = &self.counters[i];
        c.set(c.get().saturating_sub(n));
    }

    /// Counts a response status.
    pub fn status(&self, status: u16) {
        self.add(status_class(status), 1);
    }

    /// Counts a proxy-made error by its code (and, for a timeout, by its kind).
    pub fn error_code(&self, code: &'static str) {
        let timeout = match code {
            "request_timeout" => Some(Counter::TimeoutClientHead),
            "request_body_timeout" => Some(Counter::TimeoutClientBody),
            "request_body_too_slow" => Some(Counter::TimeoutClientBodyRate),
            "upstream_timeout" => Some(Counter::TimeoutUpstreamHead),
            _ => None,
        };
        if let Some(t) = timeout {
            self.add(t as usize, 1);
        }
        let mut errors = self.errors.borrow_mut();
        match errors.iter_mut().find(|(c, _)| *c == code) {
            Some((_, n)) => *n += 1,
            None => errors.push((code, 1)),
        }
    }

    /// Records a finished request: its duration, and its circuit's row when
    /// per-circuit metrics are on (`status` 0: aborted, no class counted).
    pub fn request_done(&self, circuit: Option<&uuid::Uuid>, status: u16, d: Duration) {
        self.request_duration.observe(d);
        if !self.per_circuit.enabled {
            return;
        }
        let Some(id) = circuit else { return };
        let mut circuits = self.circuits.borrow_mut();
        let key = if circuits.contains_key(&CircuitKey::Id(*id))
            || circuits.len() < self.per_circuit.max
        {
            CircuitKey::Id(*id)
        } else {
            CircuitKey::Other
        };
        circuits
            .entry(key)
            .or_default()
            .record(status, self.histograms.then_some(d));
    }
}

/// What one core published.
struct CoreRow {
    cpu: usize,
    counters: [AtomicU64; N_COUNTERS],
    /// Histograms, error codes and circuits: copied at the tick, read at scrape.
    detail: Mutex<Detail>,
}

#[derive(Default, Clone)]
struct Detail {
    request_duration: HistogramSnapshot,
    upstream_head: HistogramSnapshot,
    errors: Vec<(&'static str, u64)>,
    circuits: HashMap<CircuitKey, CircuitStats>,
    /// Whether the core records latency histograms.
    histograms: bool,
}

/// The metrics of every core, readable from the admin thread.
pub struct SharedMetrics {
    /// One row per core.
    rows: Vec<CoreRow>,
    /// Circuits in the route tables now (every core has the same set; core 0 writes).
    pub circuits: AtomicU64,
}

impl SharedMetrics {
    /// Rows for `cpus`, all zero.
    pub fn new(cpus: &[usize]) -> Arc<Self> {
        Arc::new(Self {
            rows: cpus
                .iter()
                .map(|&cpu| CoreRow {
                    cpu,
                    counters: std::array::from_fn(|_| AtomicU64::new(0)),
                    detail: Mutex::new(Detail::default()),
                })
                .collect(),
            circuits: AtomicU64::new(0),
        })
    }

    /// Copies a core's metrics into its row (at the reactor tick).
    pub fn publish(&self, row: usize, m: &CoreMetrics) {
        let Some(r) = self.rows.get(row) else { return };
        for (dst, src) in r.counters.iter().zip(m.counters.iter()) {
            dst.store(src.get(), Ordering::Relaxed);
        }
        let mut d = lock(&r.detail);
        d.request_duration = m.request_duration.snapshot();
        d.upstream_head = m.upstream_head.snapshot();
        d.errors.clone_from(&m.errors.borrow());
        d.histograms = m.histograms;
        if m.per_circuit.enabled {
            d.circuits.clone_from(&m.circuits.borrow());
        }
    }

    /// A counter's value on core `row` (as last published).
    pub fn get(&self, row: usize, c: Counter) -> u64 {
        self.rows
            .get(row)
            .map_or(0, |r| r.counters[c as usize].load(Ordering::Relaxed))
    }

    /// A counter's value on every core, summed.
    pub fn total(&self, c: Counter) -> u64 {
        self.rows
            .iter()
            .map(|r| r.counters[c as usize].load(Ordering::Relaxed))
            .sum()
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        let mut last_family = "";
        for c in Counter::ALL {
            let (i, s) = (c as usize, c.spec());
            if s.family != last_family {
                let kind = match s.kind {
                    Kind::Counter => "counter",
                    Kind::Gauge => "gauge",
                };
                let _ = writeln!(out, "# HELP {} {}", s.family, s.help);
                let _ = writeln!(out, "# TYPE {} {kind}", s.family);
                last_family = s.family;
            }
            for r in &self.rows {
                let v = r.counters[i].load(Ordering::Relaxed);
                match s.label {
                    Some((k, val)) => {
                        let _ =
                            writeln!(out, "{}{{core=\"{}\",{k}=\"{val}\"}} {v}", s.family, r.cpu);
                    }
                    None => {
                        let _ = writeln!(out, "{}{{core=\"{}\"}} {v}", s.family, r.cpu);
                    }
                }
            }
        }
        let details: Vec<Detail> = self.rows.iter().map(|r| lock(&r.detail).clone()).collect();
        let mut merged = Detail::default();
        let mut errors: HashMap<&'static str, u64> = HashMap::new();
        for d in &details {
            merged.histograms |= d.histograms;
            merged.request_duration.merge(&d.request_duration);
            merged.upstream_head.merge(&d.upstream_head);
            for (code, n) in &d.errors {
                *errors.entry(code).or_default() += n;
            }
            for (k, c) in &d.circuits {
                merged.circuits.entry(*k).or_default().merge(c);
            }
        }
        // With `[admin] latency_histograms = false` nothing is recorded: the families
        // are left out rather than exported empty.
        if merged.histograms {
            out.push_str(
                "# HELP appproxy_request_duration_seconds Time from a request's complete head to its response sent, every core.\n\
                 # TYPE appproxy_request_duration_seconds histogram\n",
            );
            merged
                .request_duration
                .render(&mut out, "appproxy_request_duration_seconds", "");
            out.push_str(
                "# HELP appproxy_upstream_response_head_duration_seconds Time from a request sent to the app to its response head read, every core.\n\
                 # TYPE appproxy_upstream_response_head_duration_seconds histogram\n",
            );
            merged.upstream_head.render(
                &mut out,
                "appproxy_upstream_response_head_duration_seconds",
                "",
            );
        }
        out.push_str(
            "# HELP appproxy_proxy_errors_by_code_total Responses the proxy made itself, by error code.\n\
             # TYPE appproxy_proxy_errors_by_code_total counter\n",
        );
        let mut codes: Vec<_> = errors.into_iter().collect();
        codes.sort_unstable();
        for (code, n) in codes {
            let _ = writeln!(
                out,
                "appproxy_proxy_errors_by_code_total{{code=\"{code}\"}} {n}"
            );
        }
        if !merged.circuits.is_empty() {
            let mut rows: Vec<_> = merged.circuits.into_iter().collect();
            rows.sort_unstable_by_key(|(k, _)| *k);
            let label = |k: &CircuitKey| match k {
                CircuitKey::Id(id) => id.to_string(),
                CircuitKey::Other => "other".into(),
            };
            out.push_str(
                "# HELP appproxy_circuit_requests_total Responses per circuit and status class ([admin] per_circuit_metrics).\n\
                 # TYPE appproxy_circuit_requests_total counter\n",
            );
            for (k, c) in &rows {
                for (i, n) in c.classes.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "appproxy_circuit_requests_total{{circuit=\"{}\",status=\"{}xx\"}} {n}",
                        label(k),
                        i + 1
                    );
                }
            }
            if merged.histograms {
                out.push_str(
                    "# HELP appproxy_circuit_request_duration_seconds Request durations per circuit ([admin] per_circuit_metrics).\n\
                     # TYPE appproxy_circuit_request_duration_seconds histogram\n",
                );
                for (k, c) in &rows {
                    c.duration.render(
                        &mut out,
                        "appproxy_circuit_request_duration_seconds",
                        &format!("circuit=\"{}\"", label(k)),
                    );
                }
            }
        }
        let _ = write!(
            out,
            "# HELP appproxy_circuits Circuits deployed now.\n# TYPE appproxy_circuits gauge\nappproxy_circuits {}\n",
            self.circuits.load(Ordering::Relaxed)
        );
        let _ = write!(
            out,
            "# HELP appproxy_worker_redis_reconnects_total Reconnections of the Redis event subscription: failed tries and dropped subscriptions.\n# TYPE appproxy_worker_redis_reconnects_total counter\nappproxy_worker_redis_reconnects_total {}\n",
            REDIS_RECONNECTS.load(Ordering::Relaxed)
        );
        render_process(&mut out);
        out
    }
}

/// Reconnections of the worker's Redis event subscription (one per failed try or
/// dropped subscription), process-wide: the subscription runs on the agent's thread,
/// outside every core.
static REDIS_RECONNECTS: AtomicU64 = AtomicU64::new(0);

/// Counts one reconnection of the Redis event subscription.
pub fn note_redis_reconnect() {
    REDIS_RECONNECTS.fetch_add(1, Ordering::Relaxed);
}

/// Process metrics: resident memory and descriptors against their limit.
fn render_process(out: &mut String) {
    let page = 4096u64;
    if let Some(rss_pages) = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
    {
        let _ = write!(
            out,
            "# HELP appproxy_process_resident_memory_bytes Resident memory of the worker process.\n\
             # TYPE appproxy_process_resident_memory_bytes gauge\n\
             appproxy_process_resident_memory_bytes {}\n",
            rss_pages * page
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let _ = write!(
            out,
            "# HELP appproxy_process_open_fds Open descriptors of the worker process.\n\
             # TYPE appproxy_process_open_fds gauge\n\
             appproxy_process_open_fds {}\n",
            fds.count()
        );
    }
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if let Some(max) = limit.current {
        let _ = write!(
            out,
            "# HELP appproxy_process_max_fds The worker's descriptor limit (soft).\n\
             # TYPE appproxy_process_max_fds gauge\n\
             appproxy_process_max_fds {max}\n"
        );
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_is_listed_once_in_index_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{c:?}");
        }
        // Families that share a name (labelled series) sit next to each other, so
        // each gets one HELP/TYPE block.
        let mut seen: Vec<&str> = Vec::new();
        for c in Counter::ALL {
            let family = c.spec().family;
            if seen.last() != Some(&family) {
                assert!(!seen.contains(&family), "{family} split");
                seen.push(family);
            }
        }
    }

    #[test]
    fn every_family_has_help_and_type_and_histograms_add_up() {
        let shared = SharedMetrics::new(&[0, 1]);
        let a = CoreMetrics::new(PerCircuit {
            enabled: true,
            max: 1,
        });
        let b = CoreMetrics::default();
        let (c1, c2) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        for ms in [0u64, 1, 3, 70, 20_000] {
            a.request_done(Some(&c1), 200, Duration::from_millis(ms));
        }
        a.request_done(Some(&c2), 503, Duration::from_millis(2));
        b.request_done(None, 404, Duration::from_micros(10));
        a.error_code("upstream_unreachable");
        b.error_code("upstream_unreachable");
        shared.publish(0, &a);
        shared.publish(1, &b);
        let text = shared.render();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let family = line.split(['{', ' ']).next().unwrap_or("");
            let base = family
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# HELP {base} "))
                    && text.contains(&format!("# TYPE {base} ")),
                "{base} lacks HELP/TYPE"
            );
        }
        assert!(
            text.contains("appproxy_request_duration_seconds_count 7\n"),
            "{text}"
        );
        assert!(text.contains("appproxy_request_duration_seconds_bucket{le=\"+Inf\"} 7\n"));
        assert!(
            text.contains("appproxy_request_duration_seconds_bucket{le=\"0.0005\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("appproxy_proxy_errors_by_code_total{code=\"upstream_unreachable\"} 2")
        );
        // The cap of one circuit: the second is summed as "other".
        assert!(text.contains(&format!(
            "appproxy_circuit_requests_total{{circuit=\"{c1}\",status=\"2xx\"}} 5"
        )));
        assert!(
            text.contains("appproxy_circuit_requests_total{circuit=\"other\",status=\"5xx\"} 1")
        );
        assert!(!text.contains(&c2.to_string()));
    }
}
