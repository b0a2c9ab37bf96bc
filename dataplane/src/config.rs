//! The worker's configuration: TOML file → typed, validated [`Config`].
//!
//! Every table has defaults (`#[serde(default)]`), unknown keys are refused (a typo
//! must not silently become a default), and [`Config::validate`] turns the file into
//! the resolved form the cores run with, or one clear error naming the key to fix.

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use appproxy_shared::model::{Circuit, FrontendMode, IpNet, ProxyProtocol};
use appproxy_shared::telemetry::LoggingConfig;
use appproxy_shared::IdVersion;
use serde::{Deserialize, Serialize};

use crate::http::parse::HeadLimits;

/// The whole worker config file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[worker]`: identity, cores and frontends.
    pub worker: WorkerSection,
    /// `[limits]`: bounds on what clients may send.
    pub limits: LimitsSection,
    /// `[timeouts]`: every timer, in seconds.
    pub timeouts: TimeoutsSection,
    /// `[upstream]`: the per-core keep-alive pools.
    pub upstream: UpstreamSection,
    /// `[reactor]`: the per-core readiness loop.
    pub reactor: ReactorSection,
    /// `[http2]`: HTTP/2 on the frontends and towards `http2`/`grpc` apps.
    pub http2: Http2Section,
    /// `[admin]`: `/health` and `/metrics`.
    pub admin: AdminSection,
    /// `[logging]`: format and filter, plus the access log switch.
    pub logging: WorkerLogging,
    /// `[telemetry]`: OTLP span export (off by default).
    pub telemetry: appproxy_shared::telemetry::TelemetryConfig,
    /// `[coordinator]`: present when the worker is managed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<CoordinatorSection>,
    /// `[secrets]`: JWT and permit keys.
    pub secrets: SecretsSection,
    /// `[redis]`: used when managed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSection>,
    /// `[[circuits]]`: standalone circuits.
    pub circuits: Vec<Circuit>,
}

/// `[worker]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSection {
    /// This worker's name towards the coordinator.
    pub authority: String,
    /// Advertised host name.
    pub hostname: Option<String>,
    /// Port serving `/setup`.
    pub api_port: Option<u16>,
    /// Clients reach the worker over TLS (a terminator in front): `https` redirects
    /// and `Secure` cookies.
    pub tls_advertised: bool,
    /// Terminate TLS on every frontend and the API port (needs `tls_cert` and
    /// `tls_privkey`); implies `https` redirects and `Secure` cookies.
    pub tls_listen: bool,
    /// PEM certificate chain, leaf first (with `tls_listen`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`: RSA, ECDSA or Ed25519.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_privkey: Option<PathBuf>,
    /// More pairs, served to clients whose SNI name the pair's certificate covers
    /// (wildcards included): the first listed whose key signs with a scheme the
    /// client offers (an RSA and an ECDSA pair for one name), else the first for
    /// the name; `tls_cert` is served otherwise.
    pub tls_sni_certs: Vec<crate::tls::CertPaths>,
    /// `"all"`, a count (`2`) or a CPU list (`"0-3,6"`).
    pub cores: CoreSpec,
    /// Address frontends listen on. An IPv6 address listens on IPv6 only
    /// (`IPV6_V6ONLY`, as nginx's `listen [::]:80` does): `"::"` takes no IPv4
    /// client; serving both takes two workers or a balancer in front.
    pub bind_host: IpAddr,
    /// `port` or `wildcard`.
    pub frontend_mode: FrontendMode,
    /// Ports circuits may use, inclusive (a managed port-mode worker's: `1 <= low
    /// <= high`, holding neither `api_port` nor the admin endpoint's port).
    pub port_range: Option<[u16; 2]>,
    /// Wildcard domain (wildcard mode), such as `.apps.example.com`.
    pub wildcard_domain: Option<String>,
    /// The shared port wildcard-mode circuits are served on.
    pub wildcard_traffic_port: Option<u16>,
    /// Peers (CIDRs) whose `X-Forwarded-*` headers are trusted.
    pub trusted_proxies: Vec<String>,
    /// Every connection to a frontend (not the `/setup` API port) starts with a
    /// PROXY protocol header (v1 or v2) naming the client: a TCP load balancer in
    /// front. Only `trusted_proxies` may connect; anything else is closed unserved.
    pub proxy_protocol: bool,
    /// Origins (`https://console.example.com`, exact) whose pages may send requests
    /// with the permit cookie to any interactive circuit, besides the circuit's own
    /// origin (the cross-origin guard, docs/dataplane.md "Access control").
    pub allowed_origins: Vec<String>,
    /// UUID version of generated request IDs.
    pub request_id_version: IdVersion,
    /// Listen backlog of every frontend socket.
    pub backlog: i32,
    /// Under which ID WebSocket messages are logged.
    pub ws_message_ids: WsMessageIds,
    /// Request-ID handling (extract or generate, forward, echo). Turning it off
    /// exists only to measure its cost: proxy errors then carry the ID `-`.
    pub request_ids: bool,
    /// W3C trace context on each request: accept or start a trace, give the worker's
    /// hop its own span, forward `traceparent` to the app and put the span on the
    /// access line (see docs/tracing.md).
    pub trace_context: bool,
}

/// Under which ID WebSocket messages are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WsMessageIds {
    /// The upgrade request's ID (the session ID).
    #[default]
    Session,
    /// `{session_id}-msg-{8 hex}`, one per message.
    PerMessage,
}

impl WorkerSection {
    /// The host clients and the coordinator are told this worker is at, as URLs
    /// carry it: `hostname`, or else `bind_host` (an IPv6 address in brackets: a
    /// worker bound to `::` registered `"::"`, which the coordinator refuses).
    pub fn advertised_host(&self) -> String {
        self.hostname
            .clone()
            .unwrap_or_else(|| appproxy_shared::wire::url_host_of(self.bind_host))
    }
}

impl Default for WorkerSection {
    fn default() -> Self {
        Self {
            authority: "worker-1".into(),
            hostname: None,
            api_port: None,
            tls_advertised: false,
            tls_listen: false,
            tls_cert: None,
            tls_privkey: None,
            tls_sni_certs: Vec::new(),
            cores: CoreSpec::All,
            bind_host: IpAddr::from([0, 0, 0, 0]),
            frontend_mode: FrontendMode::Port,
            port_range: Some([10205, 10300]),
            wildcard_domain: None,
            wildcard_traffic_port: None,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            allowed_origins: Vec::new(),
            request_id_version: IdVersion::V4,
            backlog: 1024,
            ws_message_ids: WsMessageIds::Session,
            request_ids: true,
            trace_context: true,
        }
    }
}

/// Which cores run executors.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CoreSpec {
    /// Every online CPU.
    #[default]
    All,
    /// The first N online CPUs.
    Count(usize),
    /// Exactly these CPUs.
    List(Vec<usize>),
}

impl Serialize for CoreSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::All => s.serialize_str("all"),
            Self::Count(n) => s.serialize_u64(*n as u64),
            Self::List(cpus) => s.serialize_str(
                &cpus
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        }
    }
}

impl<'de> Deserialize<'de> for CoreSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => Ok(Self::Count(n as usize)),
            Raw::Text(t) => CoreSpec::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

impl CoreSpec {
    /// Parses `all`, a count, or a list like `0-3,6`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("all") {
            return Ok(Self::All);
        }
        let mut cpus = BTreeSet::new();
        for part in text.split(',') {
            let part = part.trim();
            let bad = || {
                format!("invalid core list {text:?}: expected \"all\", a count or ranges like \"0-3,6\"")
            };
            if let Some((lo, hi)) = part.split_once('-') {
                let lo: usize = lo.trim().parse().map_err(|_| bad())?;
                let hi: usize = hi.trim().parse().map_err(|_| bad())?;
                if lo > hi {
                    return Err(bad());
                }
                cpus.extend(lo..=hi);
            } else {
                cpus.insert(part.parse::<usize>().map_err(|_| bad())?);
            }
        }
        Ok(Self::List(cpus.into_iter().collect()))
    }

    /// The CPUs to pin executors to, given the online CPUs.
    pub fn resolve(&self, online: &[usize]) -> Result<Vec<usize>, ConfigError> {
        match self {
            Self::All => Ok(online.to_vec()),
            Self::Count(0) => Err(ConfigError::Cores("cores must be at least 1".into())),
            Self::Count(n) if *n > online.len() => Err(ConfigError::Cores(format!(
                "cores = {n} but only {} CPUs are available to this process",
                online.len()
            ))),
            Self::Count(n) => Ok(online[..*n].to_vec()),
            Self::List(list) if list.is_empty() => {
                Err(ConfigError::Cores("the core list is empty".into()))
            }
            Self::List(list) => {
                if let Some(bad) = list.iter().find(|c| !online.contains(c)) {
                    return Err(ConfigError::Cores(format!(
                        "CPU {bad} is not available to this process (available: {online:?})"
                    )));
                }
                Ok(list.clone())
            }
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Longest request line (414 past it).
    pub max_request_line: usize,
    /// Largest header block (431 past it).
    pub max_header_bytes: usize,
    /// Most header fields (431 past it).
    pub max_headers: usize,
    /// Largest request body in bytes; 0 is unlimited (413 past it).
    pub max_body: u64,
    /// Largest upstream response head (502 past it).
    pub max_response_head: usize,
    /// Client connections one core serves at once (every frontend and the API
    /// port); past it new connections are refused (closed, with a 503 on HTTP
    /// frontends), counted in `appproxy_connections_refused_total`. 0 derives it
    /// from the descriptor limit: (RLIMIT_NOFILE - 128) / 2 / cores.
    pub max_connections_per_core: usize,
    /// Client connections the worker serves at once from one client address (an
    /// IPv6 client's whole /64, which one host can fill), counted over all its cores
    /// together; past it new ones from that
    /// address are refused (closed, with a 429 on HTTP frontends), counted in
    /// `appproxy_connections_refused_per_client_total`. Peers in
    /// `[worker] trusted_proxies` are not limited (every client behind them shares
    /// their address). 0 (the default) turns the limit off.
    pub max_connections_per_client: usize,
    /// Requests per second the worker takes from one client address (counted as
    /// `max_connections_per_client` counts addresses, over all cores together; from
    /// behind a trusted proxy, the address it forwards), HTTP/1.x requests and
    /// HTTP/2 streams alike, a request for no circuit included; a request past it
    /// is refused with 429 and `Retry-After` before it is routed, counted in
    /// `appproxy_requests_refused_per_client_rate_total`. Fractions are allowed
    /// (0.5: one every two seconds). 0 (the default) turns the limit off.
    pub max_request_rate_per_client: f64,
    /// Requests one client address may send at once past its rate after a quiet
    /// while (a page loading its assets): the bucket's size. 0 (the default) takes
    /// one second's worth of the rate, at least 1.
    pub max_request_burst_per_client: u32,
    /// Lowest average rate, in bytes per second, at which a client must send a
    /// request body; a body that falls below it (after the first `body_idle_secs`
    /// of waiting are used up) gets 408. 0 turns the floor off.
    pub min_body_rate: u64,
}

/// The worker's one table of request rates per client address, when `[limits]
/// max_request_rate_per_client` turns it on (a rate that is no number, or below 0,
/// is refused naming the key).
fn request_rates(
    l: &LimitsSection,
) -> Result<Option<Arc<crate::request_rate::RequestRates>>, ConfigError> {
    let rate = l.max_request_rate_per_client;
    if !(rate.is_finite() && rate >= 0.0) {
        return Err(ConfigError::Invalid(format!(
            "[limits] max_request_rate_per_client = {rate}: requests per second, 0 or more (0: no limit)"
        )));
    }
    let burst = match l.max_request_burst_per_client {
        0 => rate.ceil().clamp(1.0, f64::from(u32::MAX)) as u32,
        n => n,
    };
    Ok(crate::request_rate::RequestRates::new(rate, burst).map(Arc::new))
}

impl Default for LimitsSection {
    fn default() -> Self {
        let h = HeadLimits::default();
        Self {
            max_request_line: h.max_request_line,
            max_header_bytes: h.max_header_bytes,
            max_headers: h.max_headers,
            max_body: 0,
            max_response_head: 64 * 1024,
            max_connections_per_core: 0,
            max_connections_per_client: 0,
            max_request_rate_per_client: 0.0,
            max_request_burst_per_client: 0,
            min_body_rate: 500,
        }
    }
}

/// The longest duration any `*_secs` key may set (one year).
pub const MAX_DURATION_SECS: u64 = 365 * 24 * 3600;

/// `[timeouts]`, in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutsSection {
    /// A request head must be complete within this (408): a connection's first
    /// within this of its accept (a PROXY protocol header and the TLS handshake
    /// included), a later one within this of its first byte.
    pub head_secs: u64,
    /// An idle keep-alive client is closed after this.
    pub keepalive_secs: u64,
    /// Connecting to an app (502 past it).
    pub upstream_connect_secs: u64,
    /// The app's response head must arrive within this (504).
    pub upstream_head_secs: u64,
    /// Longest silence inside a body transfer, either way (a stalled request body
    /// gets 408), except the app's side of a response body (below).
    pub body_idle_secs: u64,
    /// Longest silence of the app inside a response body: streams (server-sent
    /// events, token streams of inference servers) may pause far longer than a client
    /// uploading a body should. A client that stops reading is still cut after
    /// `body_idle_secs`.
    pub response_idle_secs: u64,
    /// Idle WebSocket / TCP tunnels are closed after this.
    pub tunnel_idle_secs: u64,
    /// How long SIGTERM waits for in-flight requests.
    pub drain_secs: u64,
    /// After a stop signal, how long the worker goes on accepting and serving while
    /// `/readyz` answers 503 (HAProxy's `grace`): time for a load balancer or an
    /// orchestrator to stop sending it clients before its listeners close. A second
    /// stop signal ends it at once. 0: the drain begins at once.
    pub stop_grace_secs: u64,
    /// After an answer that closes the connection while the client may still be
    /// sending (a 413 before the body, an app's early answer, a refused head), what
    /// it sends is read and dropped for at most this long, so that the kernel does
    /// not answer it with a reset that can destroy the answer (nginx's lingering
    /// close). 0 closes at once.
    pub lingering_secs: u64,
    /// Longest silence of the client during that lingering close.
    pub lingering_idle_secs: u64,
    /// A client connection silent this long is probed by TCP keepalive (0: never),
    /// again every `client_tcp_keepalive_interval_secs`, and dropped after
    /// `client_tcp_keepalive_probes` unanswered probes: a client whose host vanished
    /// (no reset ever comes), or that closed while the worker waits on a silent app
    /// or an idle tunnel, is then seen gone within minutes instead of after
    /// `response_idle_secs` or `tunnel_idle_secs`. Set on the listeners, inherited
    /// by every accepted connection (nginx's `so_keepalive`, HAProxy's `clitcpka`).
    pub client_tcp_keepalive_secs: u64,
    /// Between two keepalive probes.
    pub client_tcp_keepalive_interval_secs: u64,
    /// Unanswered keepalive probes before the connection is dropped.
    pub client_tcp_keepalive_probes: u32,
}

impl Default for TimeoutsSection {
    fn default() -> Self {
        Self {
            head_secs: 10,
            keepalive_secs: 75,
            upstream_connect_secs: 3,
            upstream_head_secs: 60,
            body_idle_secs: 60,
            response_idle_secs: 3600,
            tunnel_idle_secs: 3600,
            drain_secs: 30,
            stop_grace_secs: 0,
            lingering_secs: 30,
            lingering_idle_secs: 5,
            client_tcp_keepalive_secs: 60,
            client_tcp_keepalive_interval_secs: 10,
            client_tcp_keepalive_probes: 6,
        }
    }
}

/// `[upstream]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSection {
    /// Idle connections kept per upstream address, per core.
    pub max_idle_per_route: usize,
    /// An idle pooled connection older than this is closed instead of reused.
    pub idle_timeout_secs: u64,
    /// Consecutive failures that take an upstream out of rotation (passive health).
    pub failure_threshold: u32,
    /// How long an unhealthy upstream stays out.
    pub unhealthy_secs: u64,
    /// Active probe: every this many seconds, each core tries a TCP connect to its
    /// unhealthy upstreams and brings back those that answer; 0 turns it off.
    pub probe_interval_secs: u64,
    /// Connections (in use and pooled) one core keeps open to one upstream address;
    /// a request that would need another gets 503 `upstream_connection_limit`.
    pub max_connections_per_route: usize,
    /// PEM file of the CAs that sign apps' certificates (routes with
    /// `upstream_tls = "verify"`); the system roots when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// Who may reuse a pooled app connection, for circuits that do not say
    /// (a circuit's `upstream_reuse` overrides it).
    pub reuse: Reuse,
    /// An HTTP/1.x client's end of stream (a FIN, after its whole request) while
    /// the worker waits for the app's response head, or for a silent app's next
    /// response body bytes, ends the exchange: the app's connection is closed, so
    /// the app sees the client leave (nginx's and Envoy's default). `false` keeps a
    /// half-closed client's answer coming (HAProxy's default, no `abortonclose`).
    pub abort_on_client_close: bool,
}

/// Who may reuse a pooled app connection (`[upstream] reuse`, and a circuit's own
/// `upstream_reuse`, which overrides it for that circuit): the wire's type.
pub use appproxy_shared::model::Reuse;

impl Default for UpstreamSection {
    fn default() -> Self {
        Self {
            max_idle_per_route: 128,
            idle_timeout_secs: 60,
            failure_threshold: 3,
            unhealthy_secs: 10,
            probe_interval_secs: 2,
            max_connections_per_route: 10_240,
            tls_ca: None,
            reuse: Reuse::Shared,
            abort_on_client_close: true,
        }
    }
}

/// `[reactor]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReactorSection {
    /// Longest single park in `epoll_wait` when idle, in microseconds; 0 (the default)
    /// parks until the next deadline or I/O, so an idle worker makes no wake-ups.
    pub park_max_us: u64,
    /// The most empty zero-timeout polls in a row (with every other task run in
    /// between) before the reactor parks; the reactor lowers its budget below this
    /// while parks show spinning would not have paid (see `reactor::Spin`). 0 (the
    /// default) never spins: a core that spins takes each stream's bytes as they
    /// trickle in, a read and its ACK at a time, where a parked one wakes to a batch
    /// (SSE relayed at 0.13 against 0.21 CPU-s per 100k events; docs/dataplane.md,
    /// "Never spin by default").
    pub spin_polls: u32,
    /// glommio's preemption timer in microseconds; 0 (the default) means never. Any
    /// other value brings back glommio's park hazard (a core asleep with work
    /// waiting, until the watchdog kicks it): for diagnosis and tests only.
    pub glommio_preempt_us: u64,
    /// io_uring buffer memory each executor registers (needs `RLIMIT_MEMLOCK`), KiB.
    pub io_memory_kib: usize,
    /// The time slice each core's thread asks the kernel's scheduler for, in
    /// microseconds (100 to 100,000; 0 keeps the kernel's own, about 3 ms on a
    /// 2-CPU machine). A short slice has a core that shares its CPU with a busy
    /// process run soon after a request wakes it, instead of after the other
    /// process's slice: the tail latency under contention, at the same share of the
    /// CPU (Linux 6.12 and later; earlier kernels keep their own and the worker says
    /// so at start). docs/dataplane.md, "A short scheduler slice".
    pub sched_slice_us: u64,
}

impl Default for ReactorSection {
    fn default() -> Self {
        Self {
            park_max_us: 0,
            // One default for the worker and the reactor's own tests.
            spin_polls: crate::reactor::ParkPolicy::default().spin_polls,
            glommio_preempt_us: 0,
            io_memory_kib: 512,
            sched_slice_us: 200,
        }
    }
}

/// `[http2]`: HTTP/2 frontends (ALPN `h2` over TLS, prior-knowledge `h2c` in the
/// clear) and the bounds every HTTP/2 connection is held to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Http2Section {
    /// Serve HTTP/2 to clients (`h2` in the TLS ALPN list, the `h2c` preface in the
    /// clear). `http2` and `grpc` circuits need it.
    pub enabled: bool,
    /// Streams a client may have open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Flow-control window per stream, bytes: the most a stream buffers towards a
    /// destination that does not read.
    pub initial_stream_window: u32,
    /// Flow-control window per connection, bytes (all streams together).
    pub initial_connection_window: u32,
    /// Largest decoded header list (HPACK-expanded names and values plus 32 bytes
    /// per field), bytes; past it the stream is refused.
    pub max_header_list_size: u32,
    /// Largest frame payload accepted, bytes (16,384 to 16,777,215).
    pub max_frame_size: u32,
    /// Bytes queued for sending per stream before the stream waits.
    pub max_send_buffer: usize,
    /// Streams reset by the client before the worker accepted them that are held
    /// at once; past it the connection is closed (rapid reset, CVE-2023-44487).
    pub max_pending_accept_reset_streams: usize,
    /// Streams the worker resets because the client broke the protocol, per
    /// connection; past it the connection is closed with `ENHANCE_YOUR_CALM`.
    pub max_local_error_reset_streams: usize,
    /// Streams a client may open (and reset) on one connection over its lifetime
    /// before it is asked to go away (`GOAWAY`, then closed once its streams end);
    /// 0: no limit.
    pub max_streams_per_connection: u64,
    /// Flow-control window per stream on connections to HTTP/2 apps (`http2`,
    /// `grpc` circuits), bytes: the most the worker buffers for a stream whose
    /// client does not read. Smaller than `initial_stream_window`: an app on the
    /// same LAN needs little window for full speed, and a connection's window is
    /// this times its streams.
    pub app_stream_window: u32,
    /// Streams open to apps at once, per core: from HTTP/2 clients to HTTP/2 apps
    /// and, from their start, to HTTP/1.1 apps; from HTTP/1.1 clients bridged to
    /// HTTP/2 apps. When it is full, an address holding fewer than another (by two
    /// or more) takes the place of that address's stream idle longest (2 s at
    /// least while the address holds no more than a sixteenth of its share), which
    /// is ended. With
    /// `app_stream_window` it bounds what clients that do not read make the core
    /// buffer (2048 × 64 KiB = 128 MiB), and it keeps a few client connections from
    /// holding a route's app connections. A stream past it is answered 503
    /// `app_stream_limit`.
    pub max_app_streams: usize,
    /// Once half of `max_app_streams` are taken, the most of them one client
    /// address (IPv4; IPv6 by /48, its site; behind a trusted proxy, the address
    /// it names) holds; past it its streams are answered 503 `app_stream_limit`.
    pub max_app_streams_per_address: usize,
}

impl Default for Http2Section {
    fn default() -> Self {
        Self {
            enabled: true,
            max_concurrent_streams: 128,
            initial_stream_window: 256 * 1024,
            initial_connection_window: 1024 * 1024,
            max_header_list_size: 64 * 1024,
            max_frame_size: 16 * 1024,
            max_send_buffer: 64 * 1024,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 128,
            max_streams_per_connection: 0,
            app_stream_window: 64 * 1024,
            max_app_streams: 2048,
            max_app_streams_per_address: 256,
        }
    }
}

impl Http2Section {
    /// Refuses values the protocol does not allow.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError::Invalid(format!("[http2] {key}: {why}")));
        if self.max_concurrent_streams == 0 {
            return bad("max_concurrent_streams", "must be at least 1");
        }
        if !(16_384..=16_777_215).contains(&self.max_frame_size) {
            return bad("max_frame_size", "must be between 16384 and 16777215");
        }
        for (key, v) in [
            ("initial_stream_window", self.initial_stream_window),
            ("initial_connection_window", self.initial_connection_window),
            ("app_stream_window", self.app_stream_window),
        ] {
            if !(65_535..=0x7fff_ffff).contains(&v) {
                return bad(key, "must be between 65535 and 2147483647");
            }
        }
        if self.max_header_list_size < 1024 {
            return bad("max_header_list_size", "must be at least 1024");
        }
        if self.max_send_buffer < 1024 {
            return bad("max_send_buffer", "must be at least 1024");
        }
        if self.max_app_streams == 0 {
            return bad("max_app_streams", "must be at least 1");
        }
        if self.max_app_streams_per_address == 0 {
            return bad("max_app_streams_per_address", "must be at least 1");
        }
        Ok(())
    }
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// `host:port` serving `/health` and `/metrics`; absent: no admin endpoint.
    pub bind: Option<SocketAddr>,
    /// A core holding waiting work without a reactor turn for longer than this is
    /// stalled: `/health` answers 503, `/metrics` shows it, and the watchdog (which
    /// checks this often) logs it and kicks the core awake. Milliseconds.
    pub core_stall_ms: u64,
    /// Per-circuit request counts and duration histograms on `/metrics` (opt-in: a
    /// label per circuit).
    pub per_circuit_metrics: bool,
    /// Most circuits with their own series per core; busier ones past this are
    /// summed under `circuit="other"`, so the series count stays bounded.
    pub per_circuit_metrics_max: usize,
    /// Record the request-duration and upstream response-head histograms (on by
    /// default; off leaves their families out of `/metrics`).
    pub latency_histograms: bool,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            bind: Some(SocketAddr::from(([127, 0, 0, 1], 10202))),
            core_stall_ms: 2000,
            per_circuit_metrics: false,
            per_circuit_metrics_max: 200,
            latency_histograms: true,
        }
    }
}

/// `[logging]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerLogging {
    /// Format and filter of every log line.
    #[serde(flatten)]
    pub common: LoggingConfig,
    /// One line per request (buffered per core).
    pub access_log: bool,
}

impl Default for WorkerLogging {
    fn default() -> Self {
        Self {
            common: LoggingConfig::default(),
            access_log: true,
        }
    }
}

/// `[redis]` of a managed worker.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSection {
    /// `redis://…`: circuit events, acknowledgements, last-access marks. May be
    /// given as a secret is (`{ file = … }`, `{ env = … }`): it may hold a
    /// password.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "appproxy_shared::secret::deserialize_opt"
    )]
    pub url: Option<String>,
    /// Where the circuits a circuit event names are read from (`circuits_from`).
    pub circuits_from: CircuitsFrom,
}

/// Where the agent reads the circuits a circuit event names (`[redis] circuits_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CircuitsFrom {
    /// The circuits the event carries are deployed as they are (the original's
    /// behaviour, the default): a deployment needs nothing but the event, so a
    /// worker whose coordinator is frozen still deploys what another coordinator
    /// publishes. Anything that can publish on the Redis can deploy, reroute and
    /// remove circuits: for a Redis only the coordinators can publish on.
    #[default]
    Event,
    /// The event only wakes the agent, which reads what changed from the
    /// coordinator's API, authenticated: an event forged on Redis (by anything else
    /// that can publish there: another service sharing it, a compromised host)
    /// deploys, reroutes and removes nothing. It costs a read of what changed per
    /// event, and deployments wait for the worker's coordinator (list every
    /// coordinator in `[coordinator] url`).
    Coordinator,
}

/// `[secrets]`. Each key may be given inline, as `{ file = "/abs/path" }` or as
/// `{ env = "VAR" }` ([`appproxy_shared::secret`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsSection {
    /// Secret towards the coordinator (managed mode): the API secret, or this
    /// worker's own credential (the coordinator's `worker_key`).
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "appproxy_shared::secret::deserialize_opt"
    )]
    pub api_secret: Option<String>,
    /// HS256 key of `/setup` tokens and inference bearer tokens.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "appproxy_shared::secret::deserialize_opt"
    )]
    pub jwt_secret: Option<String>,
    /// HMAC key of the `appproxy_permit` cookie.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "appproxy_shared::secret::deserialize_opt"
    )]
    pub permit_secret: Option<String>,
    /// Digest of the permit HMAC.
    pub permit_digest: crate::auth::PermitDigest,
}

/// `[coordinator]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorSection {
    /// The coordinator's base URL (`http://host:port`); set: managed mode. A list
    /// (`["http://a:10200", "http://b:10200"]`) names the coordinators of an HA pair:
    /// the agent uses the first that answers. Kept as one comma-separated string.
    #[serde(deserialize_with = "one_or_more_urls")]
    pub url: Option<String>,
    /// How often the control agent fetches this worker's circuits.
    pub poll_interval_ms: u64,
    /// How often it heartbeats.
    pub heartbeat_secs: u64,
    /// Single-node mode: a coordinator config file (relative to this file's folder)
    /// run inside this process; the agent then talks to it directly, without HTTP or
    /// Redis, and `url` is not needed.
    pub embedded: Option<PathBuf>,
    /// How long the agent waits for every core to apply a deployment before it
    /// stops waiting (and does not acknowledge).
    pub apply_timeout_ms: u64,
    /// How often cores hand their per-circuit request counts to the agent, which
    /// writes them as last-access marks (Redis, or the embedded coordinator).
    pub access_flush_ms: u64,
}

/// `url = "http://a"` or `url = ["http://a", "http://b"]`, as `"http://a, http://b"`.
fn one_or_more_urls<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Urls {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<Urls>::deserialize(d)? {
        None => None,
        Some(Urls::One(u)) => Some(u),
        Some(Urls::Many(list)) if list.is_empty() => None,
        Some(Urls::Many(list)) => Some(list.join(", ")),
    })
}

impl Default for CoordinatorSection {
    fn default() -> Self {
        Self {
            url: None,
            poll_interval_ms: 500,
            heartbeat_secs: 10,
            embedded: None,
            apply_timeout_ms: 5_000,
            access_flush_ms: 1_000,
        }
    }
}

/// How a circuit error names its circuit: the key path when the position is known.
fn circuit_key(index: Option<usize>, id: &str) -> String {
    match index {
        Some(i) => format!("circuits[{i}] (id {id})"),
        None => format!("circuit {id}"),
    }
}

/// A config that cannot run, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {cause}")]
    Read {
        /// The path given.
        path: String,
        /// Why.
        cause: std::io::Error,
    },
    /// The TOML did not parse into the schema.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The path given.
        path: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The core selection is not possible here.
    #[error("[worker] cores: {0}")]
    Cores(String),
    /// A circuit is unusable.
    #[error("{}: {message}", circuit_key(*.index, .id))]
    Circuit {
        /// The circuit's position in the list it came in (`circuits[i]`), if known.
        index: Option<usize>,
        /// The circuit's ID.
        id: String,
        /// What is wrong.
        message: String,
    },
    /// Anything else, with the key to fix.
    #[error("{0}")]
    Invalid(String),
}

/// A circuit ready to serve: validated, with upstreams resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedCircuit {
    /// The circuit as configured or deployed.
    pub circuit: Circuit,
    /// Where clients reach it.
    pub frontend: Frontend,
    /// Upstream addresses with their weights (zero-weight routes left out).
    pub upstreams: Vec<(SocketAddr, f64)>,
    /// The upstreams that serve HTTPS: how to check them and the name to check.
    pub upstream_tls: Vec<(SocketAddr, appproxy_shared::model::UpstreamTls, String)>,
    /// Its HTTP/1.1 app connections are reused only by the client connection that
    /// opened them, and closed with it: the circuit's `upstream_reuse`, else the
    /// worker's `[upstream] reuse`, is `"client"` ([`crate::core::pool`]).
    pub reuse_by_client: bool,
    /// Parsed allowlist (invalid entries left out); see [`Self::admits`].
    pub allowed: Vec<IpNet>,
    /// The circuit names an allowlist (`allowed_client_ips` holds an entry): only
    /// addresses in `allowed` are admitted, none when every entry was invalid.
    pub restricted: bool,
}

impl ResolvedCircuit {
    /// Whether a client at `ip` may use the circuit: always when it names no
    /// allowlist, else when `ip` is in one of its valid networks. An allowlist whose
    /// every entry is invalid admits nobody: a typo never opens a circuit to all.
    pub fn admits(&self, ip: IpAddr) -> bool {
        !self.restricted || self.allowed.iter().any(|n| n.contains(ip))
    }

    /// Logs each `allowed_client_ips` entry left out (not an address or network),
    /// and that the circuit admits nobody when none is left. Done as each circuit is
    /// resolved; the worker's start logs its file's circuits again once logging is
    /// set up (they were resolved before).
    pub fn log_allowlist_problems(&self) {
        let c = &self.circuit;
        for entry in c.allowed_client_ips.iter().map(|s| s.trim()) {
            if !entry.is_empty() && IpNet::parse(entry).is_none() {
                tracing::warn!(
                    circuit = %c.id,
                    entry = %entry,
                    "allowed_client_ips entry is not an address or network: left out"
                );
            }
        }
        if self.restricted && self.allowed.is_empty() {
            tracing::warn!(
                circuit = %c.id,
                "no valid allowed_client_ips entry: the circuit admits no client"
            );
        }
    }
}

/// The host a route's app is reached at (`localhost` when none is given).
pub fn route_host(r: &appproxy_shared::model::RouteInfo) -> &str {
    if r.kernel_host.is_empty() {
        "localhost"
    } else {
        r.kernel_host.as_str()
    }
}

/// Looks `host` up now, on the calling thread (the system resolver: `/etc/hosts`,
/// then DNS), and takes its first address. An address literal needs no lookup.
pub fn look_up_now(host: &str, port: u16) -> Result<SocketAddr, String> {
    match (host, port).to_socket_addrs() {
        Ok(mut found) => found.next().ok_or_else(|| "no address".to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Whether a route gets traffic: a non-zero ratio and not judged unhealthy by the
/// coordinator's active health check (out of rotation until it answers again; the
/// circuit is redeployed then). [`ResolvedCircuit::upstreams`] holds exactly these
/// routes, in `route_info` order.
pub fn in_rotation(r: &appproxy_shared::model::RouteInfo) -> bool {
    r.traffic_ratio != 0.0
        && r.health_status != Some(appproxy_shared::model::RouteHealth::Unhealthy)
}

/// Where clients reach a circuit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Frontend {
    /// A port of its own.
    Port(u16),
    /// `Host: <subdomain><wildcard domain>` on the wildcard port.
    Subdomain(String),
}

/// The wildcard frontend of a wildcard-mode worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wildcard {
    /// The domain with its leading dot, lowercase (`.apps.example.com`).
    pub domain: String,
    /// The shared port.
    pub port: u16,
}

impl Wildcard {
    /// The subdomain named by a `Host` value, if it is under this domain.
    pub fn subdomain<'h>(&self, host: &'h [u8]) -> Option<std::borrow::Cow<'h, str>> {
        let host = std::str::from_utf8(host).ok()?;
        if host.starts_with('[') {
            return None;
        }
        let name = match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.len() <= self.domain.len() {
            return None;
        }
        let (sub, dom) = name.split_at(name.len() - self.domain.len());
        if !dom.eq_ignore_ascii_case(&self.domain) {
            return None;
        }
        Some(if sub.bytes().any(|b| b.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(sub.to_ascii_lowercase())
        } else {
            std::borrow::Cow::Borrowed(sub)
        })
    }
}

/// TCP keepalive of a listener's connections (`[timeouts] client_tcp_keepalive_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpKeepalive {
    /// Silence before the first probe.
    pub idle: Duration,
    /// Between probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub probes: u32,
}

/// Everything the cores need, validated.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// The CPUs to run on.
    pub cpus: Vec<usize>,
    /// Address frontends listen on.
    pub bind_host: IpAddr,
    /// Listen backlog.
    pub backlog: i32,
    /// Request head limits.
    pub head_limits: HeadLimits,
    /// 0 = unlimited.
    pub max_body: u64,
    /// Largest upstream response head.
    pub max_response_head: usize,
    /// Timers.
    pub head_timeout: Duration,
    /// Idle keep-alive.
    pub keepalive_timeout: Duration,
    /// Upstream connect.
    pub connect_timeout: Duration,
    /// Upstream response head.
    pub upstream_head_timeout: Duration,
    /// Silence inside a body transfer.
    pub body_idle_timeout: Duration,
    /// The app's silence inside a response body.
    pub response_idle_timeout: Duration,
    /// Lowest average request-body rate, bytes per second (0: off).
    pub min_body_rate: u64,
    /// Client connections per core (0: derived from the descriptor limit).
    pub max_connections_per_core: usize,
    /// Client connections per client address, per core (0: no limit).
    pub max_connections_per_client: usize,
    /// Requests per second per client address, shared by every core (`None`: no
    /// limit).
    pub request_rates: Option<Arc<crate::request_rate::RequestRates>>,
    /// Open connections per upstream address, per core.
    pub max_upstream_conns: usize,
    /// TCP keepalive of client connections (`None`: off).
    pub client_keepalive: Option<TcpKeepalive>,
    /// Idle tunnels.
    pub tunnel_idle_timeout: Duration,
    /// How long a tunnel's write to a peer that does not read may go without
    /// progress: a response body's bound (nginx's `proxy_send_timeout`), never more
    /// than the tunnel's idle timeout. Derived, not configured.
    pub tunnel_stall_timeout: Duration,
    /// Drain on SIGTERM.
    pub drain_timeout: Duration,
    /// Longest lingering close (zero: off).
    pub lingering_time: Duration,
    /// Longest client silence in a lingering close.
    pub lingering_idle: Duration,
    /// Pool size per upstream, per core.
    pub max_idle_per_route: usize,
    /// Pooled connection idle lifetime.
    pub pool_idle_timeout: Duration,
    /// An HTTP/1.x client's end of stream ends a wait on its app
    /// (`[upstream] abort_on_client_close`).
    pub abort_on_client_close: bool,
    /// Passive health threshold.
    pub failure_threshold: u32,
    /// Passive health back-off.
    pub unhealthy_backoff: Duration,
    /// Active probe interval (`None`: off).
    pub probe_interval: Option<Duration>,
    /// How the reactor spins and parks.
    pub park: crate::reactor::ParkPolicy,
    /// How long a core may hold waiting work without a turn before it is stalled.
    pub core_stall: Duration,
    /// Per-circuit metrics (opt-in, bounded).
    pub per_circuit_metrics: crate::metrics::PerCircuit,
    /// Latency histograms recorded (`[admin] latency_histograms`).
    pub latency_histograms: bool,
    /// glommio's preemption timer (`None`: never; see `worker::NO_PREEMPTION`).
    pub glommio_preempt: Option<Duration>,
    /// The scheduler slice each core's thread asks for (`None`: the kernel's own).
    pub sched_slice: Option<Duration>,
    /// glommio io memory per executor, bytes.
    pub io_memory: usize,
    /// Trusted proxy networks.
    pub trusted_proxies: Vec<IpNet>,
    /// Frontend connections start with a PROXY protocol header (from trusted
    /// proxies only).
    pub proxy_protocol: bool,
    /// Origins admitted by the cross-origin guard besides each circuit's own.
    pub allowed_origins: Vec<crate::auth::Origin>,
    /// UUID version of generated IDs.
    pub id_version: IdVersion,
    /// Access log on/off.
    pub access_log: bool,
    /// WebSocket message log IDs.
    pub ws_message_ids: WsMessageIds,
    /// Request-ID handling on (off only for measurement).
    pub request_ids: bool,
    /// W3C trace context on each request.
    pub trace_context: bool,
    /// `[http2]`.
    pub http2: Http2Section,
    /// Log format (the access log follows it).
    pub log_format: appproxy_shared::telemetry::LogFormat,
    /// The wildcard frontend (wildcard mode).
    pub wildcard: Option<Wildcard>,
    /// Keys for access control.
    pub secrets: SecretsSection,
    /// Port serving `/setup` (absent: no API port).
    pub api_port: Option<u16>,
    /// Host name put in `/setup` redirects.
    pub advertised_host: String,
    /// Whether clients reach the worker over TLS (a terminator in front, or this
    /// worker's own `tls_listen`).
    pub tls_advertised: bool,
    /// TLS termination (`tls_listen`): the certificates and the shared session state.
    pub tls: Option<crate::tls::Tls>,
    /// TLS to apps that serve HTTPS (routes with `upstream_tls`).
    pub upstream_tls: crate::tls::Upstream,
    /// The circuits.
    pub circuits: Vec<ResolvedCircuit>,
    /// Count requests per circuit and hand them to the control agent every
    /// this often (managed mode); `None`: nobody reads them, so nothing is counted.
    pub access_flush: Option<Duration>,
}

impl Config {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.display().to_string(),
            cause,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Self, String> {
        appproxy_shared::config::from_toml(text)
    }

    /// The default config as TOML, for `--print-default-config`.
    pub fn default_toml() -> String {
        let mut text = String::from(
            "# appproxy-worker configuration (defaults).\n# Circuits are added as [[circuits]] tables; see deploy/worker.standalone.toml.\n\n",
        );
        text.push_str(&toml::to_string_pretty(&Self::default()).unwrap_or_default());
        let coordinator = CoordinatorSection::default();
        let managed = [
            "url = \"http://127.0.0.1:10200\"  # a remote coordinator (several: comma-separated)".to_owned(),
            "embedded = \"coordinator.toml\"  # or one in this process (its config, relative to this file)".to_owned(),
            format!("poll_interval_ms = {}", coordinator.poll_interval_ms),
            format!("heartbeat_secs = {}", coordinator.heartbeat_secs),
            format!("apply_timeout_ms = {}", coordinator.apply_timeout_ms),
            format!("access_flush_ms = {}", coordinator.access_flush_ms),
        ];
        let mut optional: Vec<(&str, &str)> = vec![
            ("worker", "hostname = \"proxy1.example.com\"  # advertised in /setup links (default: bind_host)"),
            ("worker", "api_port = 10201  # serves /setup (and wildcard traffic on it)"),
            ("worker", "tls_cert = \"/etc/appproxy/tls/cert.pem\"  # with tls_listen"),
            ("worker", "tls_privkey = \"/etc/appproxy/tls/key.pem\"  # with tls_listen"),
            ("worker", "wildcard_domain = \".apps.example.com\"  # frontend_mode = \"wildcard\""),
            ("worker", "wildcard_traffic_port = 10250  # frontend_mode = \"wildcard\""),
            ("upstream", "tls_ca = \"/etc/appproxy/upstream-ca.pem\"  # roots for upstream_tls = \"verify\""),
            ("secrets", "api_secret = \"…\"  # the coordinator's API secret (managed mode)"),
            ("secrets", "jwt_secret = \"…\"  # checks the coordinator's /setup tokens"),
            ("secrets", "permit_secret = \"…\"  # signs the permit cookie"),
        ];
        optional.extend(managed.iter().map(|l| ("coordinator", l.as_str())));
        optional.push((
            "redis",
            "url = \"redis://127.0.0.1:6379/\"  # events, acknowledgements, last-access marks",
        ));
        optional.push((
            "redis",
            "circuits_from = \"coordinator\"  # an event is a sign to read the change from the coordinator (default \"event\": deploy what it carries)",
        ));
        optional.extend(appproxy_shared::telemetry::TelemetryConfig::OPTIONAL_KEYS);
        appproxy_shared::config::with_optional_keys(&text, &optional)
    }

    /// Validates circuits (from the file or from the coordinator) against this
    /// worker's settings and resolves their upstreams.
    pub fn resolve_circuits(&self, list: &[Circuit]) -> Result<Vec<ResolvedCircuit>, ConfigError> {
        let mut ids = HashSet::new();
        let mut ports = HashSet::new();
        let mut subdomains = HashSet::new();
        let mut circuits = Vec::with_capacity(list.len());
        for (i, c) in list.iter().enumerate() {
            let err = |message: String| ConfigError::Circuit {
                index: Some(i),
                id: c.id.to_string(),
                message,
            };
            if !ids.insert(c.id) {
                return Err(err("duplicate circuit id".into()));
            }
            let resolved = self.resolve_circuit(c).map_err(|e| match e {
                ConfigError::Circuit { id, message, .. } => ConfigError::Circuit {
                    index: Some(i),
                    id,
                    message,
                },
                other => other,
            })?;
            match &resolved.frontend {
                Frontend::Port(port) => {
                    if !ports.insert(*port) {
                        return Err(err(format!("port {port} is used by another circuit")));
                    }
                }
                Frontend::Subdomain(sub) => {
                    if !subdomains.insert(sub.clone()) {
                        return Err(err(format!("subdomain {sub:?} is used by another circuit")));
                    }
                }
            }
            circuits.push(resolved);
        }
        Ok(circuits)
    }

    /// Checks one circuit against this worker (protocol, frontend mode, port range,
    /// subdomain, secrets) and resolves its routes. Uniqueness of ports and
    /// subdomains among circuits is the caller's: [`Config::resolve_circuits`] for a
    /// whole set, the control agent for a deployment's changes.
    pub fn resolve_circuit(&self, c: &Circuit) -> Result<ResolvedCircuit, ConfigError> {
        self.resolve_circuit_with(c, &mut look_up_now)
    }

    /// [`Config::resolve_circuit`] with the route hosts' addresses from `look_up`
    /// (host, port → the address, or why there is none): the control agent looks
    /// names up off its thread first, and passes what it found.
    pub fn resolve_circuit_with(
        &self,
        c: &Circuit,
        look_up: &mut dyn FnMut(&str, u16) -> Result<SocketAddr, String>,
    ) -> Result<ResolvedCircuit, ConfigError> {
        {
            let err = |message: String| ConfigError::Circuit {
                index: None,
                id: c.id.to_string(),
                message,
            };
            if matches!(c.protocol, ProxyProtocol::Http2 | ProxyProtocol::Grpc)
                && !self.http2.enabled
            {
                return Err(err(format!(
                    "protocol {:?} needs HTTP/2: set [http2] enabled = true",
                    c.protocol
                )));
            }
            if c.frontend_mode != self.worker.frontend_mode {
                return Err(err(format!(
                    "frontend_mode {:?} differs from the worker's ([worker] frontend_mode = {:?})",
                    c.frontend_mode, self.worker.frontend_mode
                )));
            }
            let frontend = match c.frontend_mode {
                FrontendMode::Port => {
                    let port = c
                        .port
                        .ok_or_else(|| err("port-mode circuit without a port".into()))?;
                    if port == 0 {
                        return Err(err(
                            "port 0 is no port a client can reach (the kernel would pick one)"
                                .into(),
                        ));
                    }
                    // The API port's listener takes every connection to it: a circuit
                    // there would be reported deployed and never reached.
                    if Some(port) == self.worker.api_port {
                        return Err(err(format!(
                            "port {port} is the worker's [worker] api_port (serving /setup)"
                        )));
                    }
                    if let Some([lo, hi]) = self.worker.port_range {
                        if port < lo || port > hi {
                            return Err(err(format!(
                                "port {port} is outside [worker] port_range [{lo}, {hi}]"
                            )));
                        }
                    }
                    Frontend::Port(port)
                }
                FrontendMode::Wildcard => {
                    if c.protocol == ProxyProtocol::Tcp {
                        return Err(err(
                            "tcp circuits need a port of their own (port mode)".into()
                        ));
                    }
                    let sub = c
                        .subdomain
                        .as_deref()
                        .map(|s| s.trim().to_ascii_lowercase())
                        .filter(|s| {
                            !s.is_empty()
                                && s.bytes()
                                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                        })
                        .ok_or_else(|| {
                            err("wildcard-mode circuit without a valid subdomain".into())
                        })?;
                    Frontend::Subdomain(sub)
                }
            };
            if !c.open_to_public {
                let (key, what) = match c.app_mode {
                    appproxy_shared::model::AppMode::Interactive => {
                        (&self.secrets.permit_secret, "permit_secret")
                    }
                    appproxy_shared::model::AppMode::Inference => {
                        (&self.secrets.jwt_secret, "jwt_secret")
                    }
                };
                if c.protocol != ProxyProtocol::Tcp && key.is_none() {
                    return Err(err(format!(
                        "not open_to_public, but [secrets] {what} is not set: set it, or open_to_public = true"
                    )));
                }
            }
            let mut upstreams = Vec::new();
            let mut upstream_tls = Vec::new();
            for r in &c.route_info {
                if !r.traffic_ratio.is_finite() || r.traffic_ratio < 0.0 {
                    return Err(err(format!(
                        "route to {}:{} has an invalid traffic_ratio",
                        r.kernel_host, r.kernel_port
                    )));
                }
                if !in_rotation(r) {
                    // Unhealthy: out of rotation until the coordinator's health check
                    // sees it answer again (the circuit is redeployed then).
                    continue;
                }
                let host = route_host(r);
                let addr = look_up(host, r.kernel_port)
                    .map_err(|why| err(format!("cannot resolve route host {host:?}: {why}")))?;
                upstreams.push((addr, r.traffic_ratio));
                if !r.upstream_tls.is_off() {
                    upstream_tls.push((addr, r.upstream_tls, host.to_owned()));
                }
            }
            let entries: Vec<&str> = c
                .allowed_client_ips
                .iter()
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .collect();
            let allowed = entries.iter().filter_map(|e| IpNet::parse(e)).collect();
            let resolved = ResolvedCircuit {
                circuit: c.clone(),
                frontend,
                upstreams,
                upstream_tls,
                reuse_by_client: c.upstream_reuse.unwrap_or(self.upstream.reuse) == Reuse::Client,
                allowed,
                restricted: !entries.is_empty(),
            };
            resolved.log_allowlist_problems();
            Ok(resolved)
        }
    }

    /// Whether another listener of this process at `at` (the admin endpoint, an
    /// embedded coordinator) holds a port a coordinator may place circuits on: in
    /// a managed port-mode worker's range, on an address the circuits' listeners
    /// share. Circuits listen on `bind_host` (`::` for IPv6 only); the others are
    /// plain listeners (`::` for both families); an IPv4-mapped address is its
    /// IPv4 one.
    pub fn takes_from_the_range(&self, at: SocketAddr) -> bool {
        let in_range = self
            .worker
            .port_range
            .is_some_and(|[lo, hi]| (lo..=hi).contains(&at.port()));
        let circuits = self.worker.bind_host.to_canonical();
        let other = at.ip().to_canonical();
        let shared = match (circuits, other) {
            (_, IpAddr::V6(o)) if o.is_unspecified() => true,
            (IpAddr::V4(c), IpAddr::V4(o)) => c == o || c.is_unspecified() || o.is_unspecified(),
            (IpAddr::V6(c), IpAddr::V6(o)) => c == o || c.is_unspecified(),
            _ => false,
        };
        self.managed() && self.worker.frontend_mode == FrontendMode::Port && in_range && shared
    }

    /// Whether circuits come from a coordinator (remote or embedded).
    pub fn managed(&self) -> bool {
        self.coordinator
            .as_ref()
            .is_some_and(|c| c.url.is_some() || c.embedded.is_some())
    }

    /// Loads the TLS pairs when `tls_listen` is on: a missing, unreadable or
    /// mismatched file is an error naming it.
    fn tls(&self) -> Result<Option<crate::tls::Tls>, ConfigError> {
        let w = &self.worker;
        if !w.tls_listen {
            return Ok(None);
        }
        let (Some(cert), Some(privkey)) = (&w.tls_cert, &w.tls_privkey) else {
            return Err(ConfigError::Invalid(
                "[worker] tls_listen = true needs tls_cert and tls_privkey (PEM files)".into(),
            ));
        };
        let default = crate::tls::CertPaths {
            cert: cert.clone(),
            privkey: privkey.clone(),
        };
        crate::tls::Tls::load(&default, &w.tls_sni_certs)
            .map(Some)
            .map_err(|e| ConfigError::Invalid(e.0))
    }

    /// Validates the config against this machine's CPUs and resolves the circuits.
    pub fn validate(&self, online_cpus: &[usize]) -> Result<Runtime, ConfigError> {
        let slice = self.reactor.sched_slice_us;
        if slice != 0 && !(100..=100_000).contains(&slice) {
            return Err(ConfigError::Invalid(format!(
                "[reactor] sched_slice_us = {slice}: the kernel takes slices of 100 to 100000 microseconds (0 keeps its own)"
            )));
        }
        // An empty key is no secret: anyone can compute a permit or a token with it
        // (the coordinator refuses empty secrets the same way).
        for (key, value) in [
            ("api_secret", &self.secrets.api_secret),
            ("jwt_secret", &self.secrets.jwt_secret),
            ("permit_secret", &self.secrets.permit_secret),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(ConfigError::Invalid(format!(
                    "[secrets] {key} is empty: anyone could sign with it; set a secret, or leave {key} out"
                )));
            }
        }
        if let Some(host) = self
            .worker
            .hostname
            .as_deref()
            .filter(|h| !appproxy_shared::wire::url_host_ok(h))
        {
            return Err(ConfigError::Invalid(format!(
                "[worker] hostname = {host:?} goes into URLs as it is: no ':' in it, and an IPv6 address in brackets ([2001:db8::5])"
            )));
        }
        if self.managed() && !self.circuits.is_empty() {
            return Err(ConfigError::Invalid(
                "[coordinator] url or embedded is set (managed mode: circuits come from the coordinator) and [[circuits]] are listed too: keep one".into(),
            ));
        }
        if self
            .coordinator
            .as_ref()
            .is_some_and(|c| c.url.is_some() && c.embedded.is_some())
        {
            return Err(ConfigError::Invalid(
                "[coordinator] url (a remote coordinator) and embedded (one in this process) are both set: keep one".into(),
            ));
        }
        // A coordinator places circuits on every port of the range: one the
        // worker's API listener holds is refused by the worker each time
        // (`resolve_circuit_with`), and one its admin endpoint holds on the same
        // address cannot be listened on; either is offered again, and once it is the
        // last free one every creation fails (an outside tester's find). Alone, the
        // worker deploys only the circuits its file lists, each on its own port.
        if let (true, FrontendMode::Port, Some([lo, hi])) = (
            self.managed(),
            self.worker.frontend_mode,
            self.worker.port_range,
        ) {
            if lo == 0 || lo > hi {
                return Err(ConfigError::Invalid(format!(
                    "[worker] port_range = [{lo}, {hi}] is no range of ports: [low, high] with 1 <= low <= high"
                )));
            }
            // The API listens where the circuits do, the admin endpoint where its
            // own address says: one rule for both.
            let api = self
                .worker
                .api_port
                .map(|p| SocketAddr::new(self.worker.bind_host, p));
            for (name, at) in [
                ("[worker] api_port", api),
                ("[admin] bind", self.admin.bind),
            ] {
                if let Some(port) = at
                    .filter(|a| self.takes_from_the_range(*a))
                    .map(|a| a.port())
                {
                    return Err(ConfigError::Invalid(format!(
                        "{name} port {port} is inside [worker] port_range [{lo}, {hi}]: the coordinator would place circuits on it, which cannot listen there; keep it outside the range"
                    )));
                }
            }
        }
        let wildcard = match self.worker.frontend_mode {
            FrontendMode::Port => None,
            FrontendMode::Wildcard => {
                let (Some(domain), Some(port)) = (
                    &self.worker.wildcard_domain,
                    self.worker.wildcard_traffic_port,
                ) else {
                    return Err(ConfigError::Invalid(
                        "[worker] frontend_mode = \"wildcard\" needs wildcard_domain (like \".apps.example.com\") and wildcard_traffic_port".into(),
                    ));
                };
                let domain = domain.trim().trim_start_matches('.').to_ascii_lowercase();
                if domain.is_empty()
                    || !domain
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
                {
                    return Err(ConfigError::Invalid(format!(
                        "[worker] wildcard_domain {domain:?} is not a domain name"
                    )));
                }
                if Some(port) == self.worker.api_port {
                    return Err(ConfigError::Invalid(format!(
                        "[worker] wildcard_traffic_port {port} is the api_port too: the API listener would take the wildcard traffic; give each its own port"
                    )));
                }
                Some(Wildcard {
                    domain: format!(".{domain}"),
                    port,
                })
            }
        };
        let cpus = self.worker.cores.resolve(online_cpus)?;
        let l = &self.limits;
        if l.max_request_line < 64
            || l.max_header_bytes < 64
            || l.max_headers == 0
            || l.max_headers > 128
        {
            return Err(ConfigError::Invalid(
                "[limits]: max_request_line and max_header_bytes must be at least 64, max_headers 1..=128".into(),
            ));
        }
        if self.upstream.max_connections_per_route == 0 {
            return Err(ConfigError::Invalid(
                "[upstream] max_connections_per_route must be at least 1".into(),
            ));
        }
        let t = &self.timeouts;
        for (name, v) in [
            ("head_secs", t.head_secs),
            ("keepalive_secs", t.keepalive_secs),
            ("upstream_connect_secs", t.upstream_connect_secs),
            ("upstream_head_secs", t.upstream_head_secs),
            ("body_idle_secs", t.body_idle_secs),
            ("response_idle_secs", t.response_idle_secs),
            ("tunnel_idle_secs", t.tunnel_idle_secs),
            ("lingering_idle_secs", t.lingering_idle_secs),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid(format!(
                    "[timeouts] {name} must be at least 1"
                )));
            }
        }
        // Linux's bounds for TCP_KEEPIDLE, TCP_KEEPINTVL (32,767 s) and TCP_KEEPCNT.
        if t.client_tcp_keepalive_secs > 0
            && (t.client_tcp_keepalive_secs > 32_767
                || !(1..=32_767).contains(&t.client_tcp_keepalive_interval_secs)
                || !(1..=127).contains(&t.client_tcp_keepalive_probes))
        {
            return Err(ConfigError::Invalid(
                "[timeouts] client_tcp_keepalive_secs must be 0 (off) to 32767, client_tcp_keepalive_interval_secs 1 to 32767 and client_tcp_keepalive_probes 1 to 127".into(),
            ));
        }
        // Every duration becomes a deadline (now + it) on a core: one too large for the
        // clock would panic the core at its first use instead of failing here.
        for (name, v) in [
            ("[timeouts] head_secs", t.head_secs),
            ("[timeouts] keepalive_secs", t.keepalive_secs),
            ("[timeouts] upstream_connect_secs", t.upstream_connect_secs),
            ("[timeouts] upstream_head_secs", t.upstream_head_secs),
            ("[timeouts] body_idle_secs", t.body_idle_secs),
            ("[timeouts] response_idle_secs", t.response_idle_secs),
            ("[timeouts] tunnel_idle_secs", t.tunnel_idle_secs),
            ("[timeouts] drain_secs", t.drain_secs),
            ("[timeouts] stop_grace_secs", t.stop_grace_secs),
            ("[timeouts] lingering_secs", t.lingering_secs),
            ("[timeouts] lingering_idle_secs", t.lingering_idle_secs),
            (
                "[upstream] idle_timeout_secs",
                self.upstream.idle_timeout_secs,
            ),
            ("[upstream] unhealthy_secs", self.upstream.unhealthy_secs),
            (
                "[upstream] probe_interval_secs",
                self.upstream.probe_interval_secs,
            ),
        ] {
            if v > MAX_DURATION_SECS {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be at most {MAX_DURATION_SECS} (one year)"
                )));
            }
        }
        let trusted_proxies = self
            .worker
            .trusted_proxies
            .iter()
            .map(|s| {
                IpNet::parse(s).ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "[worker] trusted_proxies: {s:?} is not an IP or CIDR"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if self.worker.proxy_protocol && trusted_proxies.is_empty() {
            return Err(ConfigError::Invalid(
                "[worker] proxy_protocol takes headers only from [worker] trusted_proxies: list the load balancer's addresses there".into(),
            ));
        }
        let allowed_origins = self
            .worker
            .allowed_origins
            .iter()
            .map(|s| {
                crate::auth::Origin::parse(s.as_bytes()).ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "[worker] allowed_origins: {s:?} is not an origin: write scheme://host or scheme://host:port, without a path (\"null\" is not accepted: every sandboxed page sends it)"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let circuits = self.resolve_circuits(&self.circuits)?;
        let tls = self.tls()?;
        let upstream_tls = crate::tls::Upstream::load(self.upstream.tls_ca.as_deref())
            .map_err(|e| ConfigError::Invalid(e.0))?;
        let secs = Duration::from_secs;
        Ok(Runtime {
            cpus,
            bind_host: self.worker.bind_host,
            backlog: self.worker.backlog,
            head_limits: HeadLimits {
                max_request_line: l.max_request_line,
                max_header_bytes: l.max_header_bytes,
                max_headers: l.max_headers,
            },
            max_body: l.max_body,
            max_response_head: l.max_response_head.max(1024),
            head_timeout: secs(t.head_secs),
            keepalive_timeout: secs(t.keepalive_secs),
            connect_timeout: secs(t.upstream_connect_secs),
            upstream_head_timeout: secs(t.upstream_head_secs),
            body_idle_timeout: secs(t.body_idle_secs),
            response_idle_timeout: secs(t.response_idle_secs),
            min_body_rate: l.min_body_rate,
            max_connections_per_core: l.max_connections_per_core,
            max_connections_per_client: l.max_connections_per_client,
            request_rates: request_rates(l)?,
            max_upstream_conns: self.upstream.max_connections_per_route,
            client_keepalive: (t.client_tcp_keepalive_secs > 0).then(|| TcpKeepalive {
                idle: secs(t.client_tcp_keepalive_secs),
                interval: secs(t.client_tcp_keepalive_interval_secs),
                probes: t.client_tcp_keepalive_probes,
            }),
            tunnel_idle_timeout: secs(t.tunnel_idle_secs),
            tunnel_stall_timeout: secs(t.body_idle_secs).min(secs(t.tunnel_idle_secs)),
            drain_timeout: secs(t.drain_secs),
            lingering_time: secs(t.lingering_secs),
            lingering_idle: secs(t.lingering_idle_secs),
            max_idle_per_route: self.upstream.max_idle_per_route,
            pool_idle_timeout: secs(self.upstream.idle_timeout_secs),
            abort_on_client_close: self.upstream.abort_on_client_close,
            failure_threshold: self.upstream.failure_threshold.max(1),
            unhealthy_backoff: secs(self.upstream.unhealthy_secs),
            probe_interval: (self.upstream.probe_interval_secs > 0)
                .then(|| secs(self.upstream.probe_interval_secs)),
            park: crate::reactor::ParkPolicy {
                spin_polls: self.reactor.spin_polls.min(100_000),
                park_max: (self.reactor.park_max_us > 0)
                    .then(|| Duration::from_micros(self.reactor.park_max_us.max(50))),
            },
            core_stall: Duration::from_millis(self.admin.core_stall_ms.max(100)),
            per_circuit_metrics: crate::metrics::PerCircuit {
                enabled: self.admin.per_circuit_metrics,
                max: self.admin.per_circuit_metrics_max.min(10_000),
            },
            latency_histograms: self.admin.latency_histograms,
            glommio_preempt: (self.reactor.glommio_preempt_us > 0)
                .then(|| Duration::from_micros(self.reactor.glommio_preempt_us)),
            sched_slice: (self.reactor.sched_slice_us > 0)
                .then(|| Duration::from_micros(self.reactor.sched_slice_us)),
            io_memory: self.reactor.io_memory_kib.max(64) * 1024,
            trusted_proxies,
            proxy_protocol: self.worker.proxy_protocol,
            allowed_origins,
            id_version: self.worker.request_id_version,
            access_log: self.logging.access_log,
            ws_message_ids: self.worker.ws_message_ids,
            request_ids: self.worker.request_ids,
            trace_context: self.worker.trace_context,
            http2: {
                self.http2.validate()?;
                self.http2.clone()
            },
            wildcard,
            secrets: self.secrets.clone(),
            api_port: self.worker.api_port,
            advertised_host: self.worker.advertised_host(),
            tls_advertised: self.worker.tls_advertised || self.worker.tls_listen,
            tls,
            upstream_tls,
            log_format: self.logging.common.format,
            circuits,
            access_flush: self.managed().then(|| {
                Duration::from_millis(
                    self.coordinator
                        .as_ref()
                        .map_or(1_000, |c| c.access_flush_ms)
                        .clamp(100, 60_000),
                )
            }),
        })
    }
}

#[cfg(test)]
mod default_config_tests {
    use super::*;

    /// `--print-default-config` shows every key the worker takes, set or commented
    /// (the OTLP keys were taken but not shown).
    #[test]
    fn the_default_config_shows_every_key() {
        appproxy_test_support::config::assert_every_key_shown(&Config::default_toml(), &|text| {
            Config::parse(text).map(drop)
        });
    }

    #[test]
    fn every_optional_key_of_the_default_config_reads_once_uncommented() {
        let text = Config::default_toml();
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if rest.starts_with('[') || rest.contains(" = ") => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let config = Config::parse(&uncommented).expect("uncommented default config");
        assert_eq!(config.worker.api_port, Some(10201));
        assert!(config.coordinator.is_some_and(|c| c.url.is_some()));
        assert!(config.redis.is_some());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worker's secrets and its Redis URL are read where operators keep them:
    /// a file, the environment; `[redis]` takes only `url` (before, it was any
    /// table, and a `url` given as a table was no URL: the worker ran without Redis
    /// and said nothing).
    #[test]
    fn secrets_and_the_redis_url_come_from_files_and_the_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("permit");
        std::fs::write(&key, "permit-from-file\n").expect("write");
        std::env::set_var("APPPROXY_WORKER_TEST_API_SECRET", "api-from-env");
        std::env::set_var("APPPROXY_WORKER_TEST_REDIS", "redis://:pw@127.0.0.1:6390/2");
        let config = Config::parse(&format!(
            "[worker]\ncores = 1\n[secrets]\napi_secret = {{ env = \"APPPROXY_WORKER_TEST_API_SECRET\" }}\n\
             jwt_secret = \"inline\"\npermit_secret = {{ file = {:?} }}\n\
             [redis]\nurl = {{ env = \"APPPROXY_WORKER_TEST_REDIS\" }}\n",
            key.display().to_string()
        ))
        .expect("parses");
        assert_eq!(config.secrets.api_secret.as_deref(), Some("api-from-env"));
        assert_eq!(config.secrets.jwt_secret.as_deref(), Some("inline"));
        assert_eq!(
            config.secrets.permit_secret.as_deref(),
            Some("permit-from-file")
        );
        assert_eq!(
            config.redis.and_then(|r| r.url).as_deref(),
            Some("redis://:pw@127.0.0.1:6390/2")
        );
        for (text, named) in [
            (
                "[secrets]\njwt_secret = { env = \"APPPROXY_WORKER_TEST_UNSET\" }\n",
                "secrets.jwt_secret",
            ),
            ("[redis]\nurl = { file = \"relative\" }\n", "redis.url"),
            ("[redis]\nurl = \"redis://h\"\nhost = \"h\"\n", "redis.host"),
        ] {
            let err = Config::parse(&format!("[worker]\ncores = 1\n{text}")).expect_err(text);
            assert!(err.to_string().contains(named), "{text}: {err}");
        }
    }

    /// An event's circuits are deployed as it carries them unless `circuits_from`
    /// says `coordinator`; another value is refused naming the key.
    #[test]
    fn circuits_from_defaults_to_the_event() {
        let from = |text: &str| {
            Config::parse(&format!(
                "[worker]\ncores = 1\n[redis]\nurl = \"redis://h\"\n{text}"
            ))
            .map(|c| c.redis.map(|r| r.circuits_from))
        };
        assert_eq!(from("").expect("parses"), Some(CircuitsFrom::Event));
        assert_eq!(
            from("circuits_from = \"coordinator\"").expect("parses"),
            Some(CircuitsFrom::Coordinator)
        );
        assert_eq!(
            from("circuits_from = \"event\"").expect("parses"),
            Some(CircuitsFrom::Event)
        );
        let err = from("circuits_from = \"carried\"").expect_err("refused");
        assert!(err.to_string().contains("redis.circuits_from"), "{err}");
    }

    /// A request rate that is no number of requests per second is refused, naming
    /// the key; 0 (the default) turns the limit off; a burst of 0 is a second's
    /// worth of the rate.
    #[test]
    fn a_request_rate_that_is_no_rate_is_refused() {
        let validated = |limits: &str| {
            Config::parse(&format!("[worker]\ncores = 1\n[limits]\n{limits}\n"))
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate(&[0]).map_err(|e| e.to_string()))
        };
        for rate in ["-1.0", "nan", "inf"] {
            let err = validated(&format!("max_request_rate_per_client = {rate}")).expect_err(rate);
            assert!(err.contains("max_request_rate_per_client"), "{rate}: {err}");
        }
        let off = validated("max_request_rate_per_client = 0").expect("off");
        assert!(off.request_rates.is_none());
        let on = validated("max_request_rate_per_client = 2.5").expect("on");
        let rates = on.request_rates.expect("a table");
        // A burst of a second's worth (3): two intervals of 400 ms ahead allowed.
        let shown = format!("{rates:?}");
        assert!(shown.contains("interval_ns: 400000000"), "{shown}");
        assert!(shown.contains("tolerance_ns: 800000000"), "{shown}");
    }

    /// Another listener of the worker takes a port of a managed worker's range
    /// only on an address the circuits share: the same, an unspecified one of its
    /// family (`::` of a plain listener: both families; the circuits' `::`: IPv6
    /// only), an IPv4-mapped one as IPv4. An admin endpoint on another address may
    /// use such a port (the worker starts).
    #[test]
    fn another_listener_takes_from_the_range_only_on_a_shared_address() {
        let config = |bind: &str| {
            Config::parse(&format!("[coordinator]\nurl = \"http://127.0.0.1:1\"\n[worker]\ncores = 1\nbind_host = \"{bind}\"\nport_range = [10205, 10300]\n")).expect("parses")
        };
        for (bind, at, takes) in [
            ("10.0.0.5", "127.0.0.1:10250", false),
            ("10.0.0.5", "10.0.0.5:10250", true),
            ("10.0.0.5", "0.0.0.0:10250", true),
            ("10.0.0.5", "[::]:10250", true),
            ("10.0.0.5", "[::ffff:10.0.0.5]:10250", true),
            ("10.0.0.5", "10.0.0.5:10301", false),
            ("0.0.0.0", "127.0.0.1:10250", true),
            ("0.0.0.0", "[::1]:10250", false),
            ("::", "127.0.0.1:10250", false),
            ("::", "[::1]:10250", true),
            ("::1", "[::2]:10250", false),
        ] {
            let c = config(bind);
            let at: SocketAddr = at.parse().expect("addr");
            assert_eq!(c.takes_from_the_range(at), takes, "{bind} and {at}");
        }
        let text = "[coordinator]\nurl = \"http://127.0.0.1:1\"\n[worker]\ncores = 1\nbind_host = \"10.0.0.5\"\nport_range = [10205, 10300]\n[admin]\nbind = \"127.0.0.1:10250\"\n";
        let config = Config::parse(text).expect("parses");
        config.validate(&[0]).expect("taken");
    }

    /// The common mistakes, each refused with the file, the key path and the fix.
    #[test]
    fn config_mistakes_name_the_file_the_key_and_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let circuit = |extra: &str| {
            format!(
                "[worker]\ncores = 1\nport_range = [10205, 10300]\n\n[[circuits]]\nid = \"00000000-0000-4000-8000-000000000001\"\napp = \"demo\"\nport = 10205\nroute_info = [{{ session_id = \"00000000-0000-4000-8000-0000000000aa\", kernel_host = \"127.0.0.1\", kernel_port = 8080 }}]\n{extra}"
            )
        };
        // Managed by a coordinator (which places circuits on its port range).
        let managed = |worker: &str| {
            format!("[coordinator]\nurl = \"http://127.0.0.1:1\"\n[worker]\ncores = 1\n{worker}")
        };
        let cases: Vec<(&str, String, Vec<&str>)> = vec![
            (
                "unknown key",
                "[worker]\nbnd_host = \"0.0.0.0\"\n".into(),
                vec!["worker.bnd_host", "line 2", "did you mean `bind_host`?"],
            ),
            (
                "wrong type",
                "[timeouts]\nhead_secs = \"ten\"\n".into(),
                vec!["timeouts.head_secs", "line 2", "expected"],
            ),
            (
                "bad route UUID",
                circuit("").replace("{ session_id", "{ route_id = \"not-a-uuid\", session_id"),
                vec!["circuits[0].route_info[0].route_id", "UUID"],
            ),
            (
                "a route weight that is not a number",
                circuit("").replace(
                    "kernel_port = 8080",
                    "kernel_port = 8080, traffic_ratio = nan",
                ),
                vec!["circuits[0].route_info[0].traffic_ratio", "finite number"],
            ),
            (
                "missing required key",
                "[[circuits]]\napp = \"demo\"\n".into(),
                vec!["circuits[0]", "missing field `id`"],
            ),
            (
                "port outside the range",
                circuit("").replace("port = 10205", "port = 9000"),
                vec![
                    "circuits[0]",
                    "port 9000 is outside [worker] port_range [10205, 10300]",
                ],
            ),
            (
                "the API port inside a managed worker's port range",
                managed("api_port = 10250\nport_range = [10205, 10300]\n"),
                vec![
                    "[worker] api_port port 10250 is inside [worker] port_range [10205, 10300]",
                    "keep it outside the range",
                ],
            ),
            (
                "the admin endpoint's port inside a managed worker's port range",
                managed("port_range = [10205, 10300]\n[admin]\nbind = \"127.0.0.1:10300\"\n"),
                vec!["[admin] bind port 10300 is inside [worker] port_range [10205, 10300]"],
            ),
            (
                "the admin endpoint's port inside a managed worker's port range, on all addresses",
                managed("bind_host = \"10.0.0.5\"\nport_range = [10205, 10300]\n[admin]\nbind = \"0.0.0.0:10250\"\n"),
                vec!["[admin] bind port 10250 is inside [worker] port_range [10205, 10300]"],
            ),
            (
                "a managed worker's port range upside down",
                managed("port_range = [10300, 10205]\n"),
                vec!["[worker] port_range = [10300, 10205] is no range of ports"],
            ),
            (
                "scheduler slice below the kernel's range",
                circuit("[reactor]\nsched_slice_us = 50\n"),
                vec!["[reactor] sched_slice_us = 50", "100 to 100000"],
            ),
            (
                "scheduler slice above the kernel's range",
                circuit("[reactor]\nsched_slice_us = 100001\n"),
                vec!["[reactor] sched_slice_us = 100001", "0 keeps its own"],
            ),
            (
                "unknown app-connection reuse of a circuit",
                circuit("upstream_reuse = \"never\"\n"),
                vec![
                    "circuits[0].upstream_reuse",
                    "unknown variant `never`",
                    "`shared`",
                    "`client`",
                ],
            ),
            (
                "bare IPv6 host name",
                "[worker]\nhostname = \"2001:db8::5\"\n".into(),
                vec!["[worker] hostname = \"2001:db8::5\"", "in brackets"],
            ),
        ];
        for (what, text, wants) in cases {
            let path = dir.path().join(format!("{}.toml", what.replace(' ', "-")));
            std::fs::write(&path, text).expect("write");
            let err = Config::load(&path)
                .and_then(|c| c.validate(&[0]).map(|_| c))
                .expect_err(what)
                .to_string();
            for want in wants {
                assert!(err.contains(want), "{what}: {err:?} lacks {want:?}");
            }
        }
        let missing = dir.path().join("absent.toml");
        let err = Config::load(&missing).expect_err("unreadable").to_string();
        assert!(
            err.contains("absent.toml") && err.contains("cannot read"),
            "{err}"
        );
    }

    /// A worker bound to an IPv6 address and given no `hostname` advertises the
    /// address in brackets, as URLs carry it: it registered `"::"`, which the
    /// coordinator refuses, and retried forever.
    #[test]
    fn the_advertised_host_defaults_to_the_bind_address_as_urls_carry_it() {
        let c = Config::parse("[worker]\nbind_host = \"::\"\n").expect("v6");
        assert_eq!(c.worker.advertised_host(), "[::]");
        assert!(c.validate(&[0]).is_ok());
        let c = Config::parse("[worker]\nbind_host = \"127.0.0.1\"\n").expect("v4");
        assert_eq!(c.worker.advertised_host(), "127.0.0.1");
        let c = Config::parse("[worker]\nhostname = \"[2001:db8::5]\"\n").expect("bracketed");
        assert_eq!(c.worker.advertised_host(), "[2001:db8::5]");
        assert!(c.validate(&[0]).is_ok());
    }

    /// A circuit's `upstream_reuse` decides for its own app connections, whatever
    /// `[upstream] reuse` says; a circuit without one follows `[upstream] reuse`.
    #[test]
    fn a_circuits_upstream_reuse_overrides_the_workers() {
        let text = |worker: &str, first: &str| {
            format!(
                "[secrets]\njwt_secret = \"j\"\npermit_secret = \"p\"\n[upstream]\n{worker}\n\n\
                 [[circuits]]\nid = \"00000000-0000-4000-8000-000000000001\"\nport = 10205\n{first}\nroute_info = []\n\n\
                 [[circuits]]\nid = \"00000000-0000-4000-8000-000000000002\"\nport = 10206\nroute_info = []\n"
            )
        };
        let reuse_by_client = |worker: &str, first: &str| {
            let c = Config::parse(&text(worker, first)).expect("config");
            let r = c.resolve_circuits(&c.circuits).expect("resolve");
            (r[0].reuse_by_client, r[1].reuse_by_client)
        };
        assert_eq!(reuse_by_client("", ""), (false, false));
        assert_eq!(
            reuse_by_client("", "upstream_reuse = \"client\""),
            (true, false)
        );
        assert_eq!(
            reuse_by_client("", "upstream_reuse = \"shared\""),
            (false, false)
        );
        assert_eq!(reuse_by_client("reuse = \"client\"", ""), (true, true));
        assert_eq!(
            reuse_by_client("reuse = \"client\"", "upstream_reuse = \"shared\""),
            (false, true)
        );
        let c = Config::parse(&text("", "upstream_reuse = \"client\"")).expect("config");
        assert_eq!(c.circuits[0].upstream_reuse, Some(Reuse::Client));
        assert_eq!(c.circuits[1].upstream_reuse, None);
    }

    #[test]
    fn a_tunnel_write_stalls_no_longer_than_the_tunnel_may_idle() {
        let c = Config::parse("[timeouts]\nbody_idle_secs = 30\ntunnel_idle_secs = 5\n")
            .expect("short tunnel idle");
        let rt = c.validate(&[0]).expect("valid");
        assert_eq!(rt.tunnel_stall_timeout, Duration::from_secs(5));
        let c = Config::parse("[timeouts]\nbody_idle_secs = 30\n").expect("default idle");
        let rt = c.validate(&[0]).expect("valid");
        assert_eq!(rt.tunnel_stall_timeout, Duration::from_secs(30));
    }

    #[test]
    fn default_config_round_trips_and_validates() {
        let text = Config::default_toml();
        let parsed = Config::parse(&text).expect("default parses");
        assert_eq!(parsed, Config::default());
        let rt = parsed.validate(&[0, 1]).expect("valid");
        assert_eq!(rt.cpus, vec![0, 1]);
        assert_eq!(rt.head_timeout, Duration::from_secs(10));
        assert_eq!(rt.keepalive_timeout, Duration::from_secs(75));
        // The resource bounds are on by default and shown by --print-default-config.
        assert!(rt.body_idle_timeout <= Duration::from_secs(60));
        assert_eq!(rt.tunnel_stall_timeout, rt.body_idle_timeout);
        assert_eq!(
            rt.client_keepalive,
            Some(TcpKeepalive {
                idle: Duration::from_secs(60),
                interval: Duration::from_secs(10),
                probes: 6
            })
        );
        assert!(rt.min_body_rate > 0);
        assert!(rt.allowed_origins.is_empty());
        for key in [
            "allowed_origins = []",
            "max_connections_per_core = 0",
            "min_body_rate = 500",
            "max_connections_per_route = 10240",
            "body_idle_secs = 60",
        ] {
            assert!(text.contains(key), "{key} missing from:\n{text}");
        }
    }

    #[test]
    fn core_specs() {
        assert_eq!(CoreSpec::parse("all"), Ok(CoreSpec::All));
        assert_eq!(
            CoreSpec::parse("0-2,5"),
            Ok(CoreSpec::List(vec![0, 1, 2, 5]))
        );
        assert!(CoreSpec::parse("3-1").is_err());
        assert!(CoreSpec::parse("x").is_err());
        let online = [0, 1];
        assert_eq!(CoreSpec::Count(1).resolve(&online).expect("one"), vec![0]);
        assert!(CoreSpec::Count(3).resolve(&online).is_err());
        assert!(CoreSpec::Count(0).resolve(&online).is_err());
        assert!(CoreSpec::List(vec![4]).resolve(&online).is_err());
        let c: Config = Config::parse("[worker]\ncores = 1\n").expect("count");
        assert_eq!(c.worker.cores, CoreSpec::Count(1));
        let c: Config = Config::parse("[worker]\ncores = \"0-1\"\n").expect("list");
        assert_eq!(c.worker.cores, CoreSpec::List(vec![0, 1]));
    }

    #[test]
    fn refusals_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("[worker]\nnope = 1\n", "unknown field"),
            ("[timeouts]\nhead_secs = 0\n", "head_secs"),
            ("[timeouts]\nclient_tcp_keepalive_secs = 40000\n", "client_tcp_keepalive_secs"),
            ("[timeouts]\nclient_tcp_keepalive_probes = 0\n", "client_tcp_keepalive_probes"),
            ("[timeouts]\nclient_tcp_keepalive_interval_secs = 0\n", "client_tcp_keepalive_interval_secs"),
            ("[worker]\ntrusted_proxies = [\"bogus\"]\n", "trusted_proxies"),
            ("[worker]\nproxy_protocol = true\n", "trusted_proxies"),
            (
                "[worker]\nallowed_origins = [\"https://console.example.com/\"]\n",
                "[worker] allowed_origins: \"https://console.example.com/\" is not an origin",
            ),
            ("[worker]\nallowed_origins = [\"null\"]\n", "allowed_origins"),
            (
                "[worker]\nallowed_origins = [\"console.example.com\"]\n",
                "allowed_origins",
            ),
            (
                "[coordinator]\nurl = \"http://c\"\n[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455556666\"\nport = 10205\nopen_to_public = true\n",
                "managed mode",
            ),
            (
                "[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455556666\"\nport = 10205\n",
                "[secrets] permit_secret is not set",
            ),
            (
                "[secrets]\npermit_secret = \"\"\n[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455556666\"\nport = 10205\n",
                "[secrets] permit_secret is empty",
            ),
            (
                "[secrets]\njwt_secret = \" \"\n[coordinator]\nurl = \"http://c\"\n",
                "[secrets] jwt_secret is empty",
            ),
            (
                "[secrets]\napi_secret = \"\"\n[coordinator]\nurl = \"http://c\"\n",
                "[secrets] api_secret is empty",
            ),
            (
                "[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455556666\"\nopen_to_public = true\n",
                "without a port",
            ),
            (
                "[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455556666\"\nopen_to_public = true\nport = 80\n",
                "outside [worker] port_range",
            ),
            (
                "[http2]\nenabled = false\n[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455556666\"\nopen_to_public = true\nport = 10205\nprotocol = \"grpc\"\n",
                "needs HTTP/2: set [http2] enabled = true",
            ),
            ("[http2]\nmax_frame_size = 1024\n", "[http2] max_frame_size"),
            ("[http2]\ninitial_stream_window = 10\n", "[http2] initial_stream_window"),
            (
                "[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455556666\"\nopen_to_public = true\nport = 10205\n[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455556667\"\nopen_to_public = true\nport = 10205\n",
                "used by another circuit",
            ),
        ];
        for (text, want) in cases {
            let msg = match Config::parse(text) {
                Err(e) => e,
                Ok(c) => c
                    .validate(&[0])
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
            };
            assert!(msg.contains(want), "{text:?} gave {msg:?}");
        }
    }

    #[test]
    fn wildcard_hosts() {
        let w = Wildcard {
            domain: ".apps.example.com".into(),
            port: 443,
        };
        let cases: &[(&str, Option<&str>)] = &[
            ("jupyter-1.apps.example.com", Some("jupyter-1")),
            ("Jupyter-1.Apps.Example.com:8443", Some("jupyter-1")),
            ("a.b.apps.example.com.", Some("a.b")),
            ("apps.example.com", None),
            (".apps.example.com", None),
            ("jupyter.other.com", None),
            ("[::1]:443", None),
            ("x.apps.example.com:notaport", None),
        ];
        for (host, want) in cases {
            assert_eq!(w.subdomain(host.as_bytes()).as_deref(), *want, "{host}");
        }
        let c = Config::parse("[worker]\nfrontend_mode = \"wildcard\"\n").expect("parse");
        assert!(c
            .validate(&[0])
            .expect_err("needs domain")
            .to_string()
            .contains("wildcard_domain"));
    }

    #[test]
    fn circuits_resolve() {
        let text = r#"
[[circuits]]
id = "c0a8f5d2-1111-4222-8333-444455556666"
open_to_public = true
app = "jupyter"
port = 10206
allowed_client_ips = ["127.0.0.0/8", "not-an-ip"]
route_info = [
  { session_id = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b", kernel_host = "127.0.0.1", kernel_port = 8888, traffic_ratio = 3.0 },
  { session_id = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b", kernel_host = "127.0.0.1", kernel_port = 8889, traffic_ratio = 0.0 },
  { session_id = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b", kernel_host = "127.0.0.1", kernel_port = 8890, health_status = "unhealthy" },
  { session_id = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b", kernel_host = "127.0.0.1", kernel_port = 8891, health_status = "healthy", traffic_ratio = 0.5 },
]
"#;
        let rt = Config::parse(text)
            .expect("parse")
            .validate(&[0])
            .expect("valid");
        let c = &rt.circuits[0];
        assert_eq!(c.frontend, Frontend::Port(10206));
        assert_eq!(
            c.upstreams,
            vec![
                ("127.0.0.1:8888".parse().expect("addr"), 3.0),
                ("127.0.0.1:8891".parse().expect("addr"), 0.5)
            ],
            "zero-weight and unhealthy routes are left out"
        );
        assert_eq!(
            c.allowed.len(),
            1,
            "invalid entries are skipped, as the original does"
        );
        assert!(c.admits("127.0.0.2".parse().expect("ip")));
        assert!(!c.admits("10.0.0.1".parse().expect("ip")));
    }
}
