//! OTLP/HTTP export of finished spans, off the request path.
//!
//! A component that finishes a span (the worker's request hop, a tokio service's
//! request) fills a fixed-size [`SpanRecord`] and hands it to [`export`]: one
//! `try_send` into a bounded queue whose slots are allocated once, at start. A full
//! queue drops the record and counts it (`appproxy_otlp_spans_dropped_total`);
//! nothing on the request path ever waits for the collector.
//!
//! One exporter thread per process takes records off the queue, batches them (up to
//! `otlp_batch` spans, or `otlp_flush_ms` after the first), encodes an OTLP
//! `ExportTraceServiceRequest` (protobuf, the `opentelemetry-proto` types), gzips it
//! (unless `otlp_compression = "none"`) and POSTs it to `<endpoint>/v1/traces` as
//! `application/x-protobuf` over HTTP/1.1 — plain for `http://`, TLS (rustls, the
//! collector's certificate checked against `otlp_ca_file`, else the system CA
//! bundle, and its name) for `https://` — with a timeout on every step and a
//! bounded number of retries; a batch that still fails is dropped and counted.
//! Memory is bounded by the queue and one batch.
//!
//! The exporter is installed once per process ([`install`]); [`Exporter`] instances
//! can also be used directly (tests).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use prost::Message as _;
use rustls::pki_types::ServerName;

use crate::request_id::RequestId;
use crate::telemetry::{OtlpCompression, TelemetryConfig};
use crate::tls_roots::{self, Anchors};
use crate::trace::{SpanContext, FLAG_SAMPLED};

/// Text kept inline in a [`SpanRecord`], truncated to `N` bytes (at a character
/// boundary), so a record never owns heap memory.
#[derive(Clone, Copy)]
pub struct Inline<const N: usize> {
    /// Meaningful bytes of `buf`.
    len: u8,
    /// The text.
    buf: [u8; N],
}

impl<const N: usize> Inline<N> {
    /// No text.
    pub const EMPTY: Self = Self {
        len: 0,
        buf: [0; N],
    };

    /// `s`, cut to at most `N` (and 255) bytes at a character boundary.
    pub fn new(s: &str) -> Self {
        let max = N.min(255);
        let mut end = s.len().min(max);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut buf = [0; N];
        buf[..end].copy_from_slice(&s.as_bytes()[..end]);
        Self {
            len: end as u8,
            buf,
        }
    }

    /// `bytes` as text (invalid UTF-8 is cut at the first bad byte).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let valid = match std::str::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
        };
        Self::new(valid)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or("")
    }

    /// Whether there is no text.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<const N: usize> std::fmt::Debug for Inline<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// What a span stands for (OTLP `SpanKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The handling of an incoming request.
    Server,
    /// Work inside a component (a deployment, a background job).
    Internal,
}

/// One finished span: fixed size, `Copy`, no heap memory.
#[derive(Debug, Clone, Copy)]
pub struct SpanRecord {
    /// Trace, span and parent span IDs, flags.
    pub span: SpanContext,
    /// Server or internal.
    pub kind: Kind,
    /// The span's name when the record has no method (a request span is named by its
    /// method, as OpenTelemetry's HTTP conventions say without a route template).
    pub name: &'static str,
    /// Start, nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// End, nanoseconds since the Unix epoch.
    pub end_unix_nanos: u64,
    /// The request ID (`request_id`).
    pub request_id: Option<RequestId>,
    /// HTTP method (`http.request.method`).
    pub method: Inline<16>,
    /// Path without the query (`url.path`).
    pub path: Inline<128>,
    /// Status sent (`http.response.status_code`); 0: none.
    pub status: u16,
    /// The circuit served (`circuit`).
    pub circuit: Option<uuid::Uuid>,
    /// The circuit's owner (`user_id`).
    pub user_id: Option<uuid::Uuid>,
    /// The circuit's first session (`session_id`).
    pub session_id: Option<uuid::Uuid>,
    /// The circuit's endpoint (`endpoint_id`).
    pub endpoint_id: Option<uuid::Uuid>,
    /// The access key of the manager's token (`access_key`).
    pub access_key: Inline<64>,
    /// The worker core that served the request (`core`).
    pub core: Option<u16>,
    /// The component whose thread made the record, when not the process's own (a
    /// coordinator embedded in the worker: [`crate::telemetry::set_thread_component`]);
    /// its spans are exported under `appproxy-<component>`.
    pub component: Option<&'static str>,
}

impl SpanRecord {
    /// A record of `span` with nothing else known yet.
    pub fn new(span: SpanContext, kind: Kind, name: &'static str) -> Self {
        Self {
            span,
            kind,
            name,
            start_unix_nanos: 0,
            end_unix_nanos: 0,
            request_id: None,
            method: Inline::EMPTY,
            path: Inline::EMPTY,
            status: 0,
            circuit: None,
            user_id: None,
            session_id: None,
            endpoint_id: None,
            access_key: Inline::EMPTY,
            core: None,
            component: crate::telemetry::thread_component(),
        }
    }

    /// Sets start and end from a span that ended now after `duration`.
    pub fn ended_now(&mut self, duration: Duration) {
        let end = unix_nanos(SystemTime::now());
        self.end_unix_nanos = end;
        self.start_unix_nanos = end.saturating_sub(duration.as_nanos() as u64);
    }
}

/// Nanoseconds since the Unix epoch.
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The exporter's counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Spans accepted by a collector (2xx).
    pub exported: AtomicU64,
    /// Spans dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Spans of batches that failed after every retry (or were refused).
    pub failed: AtomicU64,
    /// Export requests that failed (each attempt).
    pub request_errors: AtomicU64,
}

/// Why the exporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The endpoint is not an `http(s)://host[:port][/path]` URL.
    #[error("[telemetry] otlp_endpoint {0:?}: {1}")]
    Endpoint(String, &'static str),
    /// TLS towards the collector cannot be set up as configured.
    #[error("[telemetry] {0}")]
    Tls(String),
    /// A size or time is zero.
    #[error("[telemetry] {0} must be at least 1")]
    Zero(&'static str),
    /// The thread could not be started.
    #[error("cannot start the OTLP exporter thread: {0}")]
    Thread(std::io::Error),
}

/// Where batches go: host and port (resolved at each request, so a collector that
/// moves is followed), the request path, and whether TLS is spoken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `https://`: TLS, the certificate checked for `host`.
    pub tls: bool,
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port (4318 when the URL has none).
    pub port: u16,
    /// Request path (`/v1/traces` when the URL has none).
    pub path: String,
}

impl Endpoint {
    /// Parses `http://host[:port][/path]` or `https://host[:port][/path]`.
    pub fn parse(url: &str) -> Result<Self, OtlpError> {
        let bad = |why| OtlpError::Endpoint(url.to_owned(), why);
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(bad("must start with http:// or https://"));
        };
        if rest.chars().any(|c| c.is_control() || c == ' ' || c == '@') {
            return Err(bad("has spaces, control characters or credentials"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        if tls && ServerName::try_from(host).is_err() {
            return Err(bad("the host is neither a DNS name nor an IP address"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad("bad port"))?,
            None => 4318,
        };
        let path = if path.is_empty() || path == "/" {
            "/v1/traces".to_owned()
        } else {
            path.to_owned()
        };
        Ok(Self {
            tls,
            host: host.to_owned(),
            port,
            path,
        })
    }
}

/// The settings of one exporter, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where batches go.
    pub endpoint: Endpoint,
    /// The resource's `service.name`.
    pub service_name: String,
    /// Queue slots.
    pub queue: usize,
    /// Spans per request at most.
    pub batch: usize,
    /// Longest wait of a span in a batch.
    pub flush: Duration,
    /// Time for one request.
    pub timeout: Duration,
    /// Retries of a failed batch.
    pub retries: u32,
    /// How bodies are compressed.
    pub compression: OtlpCompression,
    /// TLS towards the collector: present exactly when the endpoint is `https://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The PEM file whose CA certificates the collector's must chain to
    /// (`otlp_ca_file`, or the system bundle found), named in the start-up line.
    pub ca_bundle: Option<PathBuf>,
}

impl Settings {
    /// The settings of `config`, or `None` when export is off (no endpoint).
    /// `component` names the service when `service_name` is not set. An `https://`
    /// endpoint without `otlp_ca_file` trusts the system CA bundle
    /// (`SSL_CERT_FILE`, else the usual places: [`crate::tls_roots`]).
    pub fn from_config(
        config: &TelemetryConfig,
        component: &str,
    ) -> Result<Option<Self>, OtlpError> {
        Self::from_config_env(config, component, &|k| std::env::var_os(k))
    }

    /// [`Settings::from_config`] with the environment (`SSL_CERT_FILE`) read
    /// through `env` rather than from the process.
    pub fn from_config_env(
        config: &TelemetryConfig,
        component: &str,
        env: &dyn Fn(&str) -> Option<OsString>,
    ) -> Result<Option<Self>, OtlpError> {
        let Some(url) = &config.otlp_endpoint else {
            return Ok(None);
        };
        for (name, v) in [
            ("otlp_queue", config.otlp_queue as u64),
            ("otlp_batch", config.otlp_batch as u64),
            ("otlp_flush_ms", config.otlp_flush_ms),
            ("otlp_timeout_ms", config.otlp_timeout_ms),
        ] {
            if v == 0 {
                return Err(OtlpError::Zero(name));
            }
        }
        let endpoint = Endpoint::parse(url)?;
        let (tls, ca_bundle) = match (endpoint.tls, &config.otlp_ca_file) {
            (true, Some(ca)) => (Some(tls_client_config(ca)?), Some(ca.clone())),
            (true, None) => {
                let (bundle, roots) = tls_roots::load_system_bundle(
                    env,
                    &format!("otlp_endpoint {url:?} without otlp_ca_file uses the system CA bundle"),
                )
                .map_err(|e| {
                    OtlpError::Tls(format!(
                        "{e}; set otlp_ca_file to the PEM file of the CA certificates the collector's certificate chains to"
                    ))
                })?;
                (Some(client_config(roots)?), Some(bundle))
            }
            (false, Some(ca)) => {
                return Err(OtlpError::Tls(format!(
                    "otlp_ca_file {} is set but otlp_endpoint {url:?} is plain http://: use https:// to send over TLS, or remove otlp_ca_file",
                    ca.display()
                )))
            }
            (false, None) => (None, None),
        };
        Ok(Some(Self {
            endpoint,
            service_name: config
                .service_name
                .clone()
                .unwrap_or_else(|| format!("appproxy-{component}")),
            queue: config.otlp_queue,
            batch: config.otlp_batch,
            flush: Duration::from_millis(config.otlp_flush_ms),
            timeout: Duration::from_millis(config.otlp_timeout_ms),
            retries: config.otlp_retries,
            compression: config.otlp_compression,
            tls,
            ca_bundle,
        }))
    }
}

/// The TLS client configuration for a collector whose certificate must chain to one
/// of the CA certificates in the PEM file `ca_file` (and name the endpoint's host).
/// TLS 1.3 and 1.2, ALPN `http/1.1`, the same crypto provider as the worker's TLS.
pub fn tls_client_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, OtlpError> {
    let roots = tls_roots::load_pem_bundle(ca_file, "otlp_ca_file", Anchors::Every)
        .map_err(|e| OtlpError::Tls(e.0))?;
    client_config(roots)
}

/// The TLS client configuration trusting `roots`.
fn client_config(roots: rustls::RootCertStore) -> Result<Arc<rustls::ClientConfig>, OtlpError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| OtlpError::Tls(format!("TLS configuration: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A running exporter: the queue's sending side and the counters.
#[derive(Debug, Clone)]
pub struct Exporter {
    /// Bounded queue to the exporter thread.
    tx: Sender<SpanRecord>,
    /// Counters, shared with the thread.
    stats: Arc<Stats>,
}

impl Exporter {
    /// Starts the exporter thread.
    pub fn start(settings: Settings) -> Result<Self, OtlpError> {
        let (tx, rx) = crossbeam_channel::bounded(settings.queue);
        let stats = Arc::new(Stats::default());
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("otlp-exporter".into())
            .spawn(move || run(&settings, &rx, &thread_stats))
            .map_err(OtlpError::Thread)?;
        Ok(Self { tx, stats })
    }

    /// Queues `record` without waiting: a full queue drops it (counted). Allocates
    /// nothing (the queue's slots exist from the start). A span whose trace flags
    /// say "not sampled" (the caller does not record this trace) is not exported.
    pub fn push(&self, record: &SpanRecord) {
        if record.span.flags & FLAG_SAMPLED == 0 {
            return;
        }
        match self.tx.try_send(*record) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Records waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }
}

/// The process's exporter, once installed.
static GLOBAL: OnceLock<Exporter> = OnceLock::new();

/// Starts the process's exporter when `config` has an endpoint (logging where spans
/// go); a second call keeps the first exporter. `component` names the service by
/// default (`appproxy-<component>`).
pub fn install(config: &TelemetryConfig, component: &str) -> Result<bool, OtlpError> {
    let Some(settings) = Settings::from_config(config, component)? else {
        return Ok(false);
    };
    if GLOBAL.get().is_some() {
        return Ok(true);
    }
    let endpoint = settings.endpoint.clone();
    let service = settings.service_name.clone();
    let compression = settings.compression;
    let ca_bundle = settings.ca_bundle.clone();
    let exporter = Exporter::start(settings)?;
    let _ = GLOBAL.set(exporter);
    tracing::info!(
        host = %endpoint.host,
        port = endpoint.port,
        path = %endpoint.path,
        tls = endpoint.tls,
        ca_bundle = ca_bundle.as_deref().map(|p| p.display().to_string()),
        compression = ?compression,
        service = %service,
        "exporting spans over OTLP/HTTP"
    );
    Ok(true)
}

/// Whether spans are exported (an exporter is installed).
#[inline]
pub fn enabled() -> bool {
    GLOBAL.get().is_some()
}

/// Hands `record` to the process's exporter, if any (see [`Exporter::push`]).
#[inline]
pub fn export(record: &SpanRecord) {
    if let Some(e) = GLOBAL.get() {
        e.push(record);
    }
}

/// Appends the exporter's counters in Prometheus text (nothing when export is off).
pub fn render_metrics(out: &mut String) {
    let Some(e) = GLOBAL.get() else { return };
    let s = e.stats();
    for (family, help, v) in [
        (
            "appproxy_otlp_spans_exported_total",
            "Spans accepted by the OTLP collector.",
            s.exported.load(Ordering::Relaxed),
        ),
        (
            "appproxy_otlp_spans_dropped_total",
            "Spans dropped because the export queue was full (collector down or slow).",
            s.dropped.load(Ordering::Relaxed),
        ),
        (
            "appproxy_otlp_spans_failed_total",
            "Spans of export batches that failed after every retry, or were refused.",
            s.failed.load(Ordering::Relaxed),
        ),
        (
            "appproxy_otlp_export_errors_total",
            "OTLP export requests that failed (each attempt).",
            s.request_errors.load(Ordering::Relaxed),
        ),
    ] {
        out.push_str(&format!(
            "# HELP {family} {help}\n# TYPE {family} counter\n{family} {v}\n"
        ));
    }
    out.push_str(&format!(
        "# HELP appproxy_otlp_queue_spans Spans waiting for the OTLP exporter.\n# TYPE appproxy_otlp_queue_spans gauge\nappproxy_otlp_queue_spans {}\n",
        e.queued()
    ));
}

/// The exporter thread: batch, send, repeat; ends when every sender is gone (after
/// sending what is left).
fn run(settings: &Settings, rx: &Receiver<SpanRecord>, stats: &Stats) {
    let mut batch: Vec<SpanRecord> = Vec::with_capacity(settings.batch);
    // Whether the last batch failed: a failure is logged when it starts and when
    // it ends, not for every batch of an outage (the counters tell the rest).
    let mut failing = false;
    loop {
        let first = match rx.recv() {
            Ok(r) => r,
            Err(_) => return,
        };
        batch.push(first);
        let deadline = Instant::now() + settings.flush;
        let mut closed = false;
        while batch.len() < settings.batch {
            match rx.recv_deadline(deadline) {
                Ok(r) => batch.push(r),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let ok = send_batch(settings, &batch, stats, failing);
        if ok && failing {
            tracing::info!("OTLP export works again");
        }
        failing = !ok;
        batch.clear();
        if closed {
            return;
        }
    }
}

/// Encodes and sends one batch, retrying transient failures a bounded number of
/// times with a short backoff; `false` when the batch was dropped. The first
/// failure of a run of them is logged (`failing`: the previous batch failed too).
fn send_batch(settings: &Settings, batch: &[SpanRecord], stats: &Stats, failing: bool) -> bool {
    let mut body = encode(&settings.service_name, batch);
    if settings.compression == OtlpCompression::Gzip {
        body = gzip(&body);
    }
    let n = batch.len() as u64;
    let mut backoff = Duration::from_millis(100);
    for attempt in 0..=settings.retries {
        match post(settings, &body) {
            Ok(status) if (200..300).contains(&status) => {
                stats.exported.fetch_add(n, Ordering::Relaxed);
                return true;
            }
            Ok(status) => {
                stats.request_errors.fetch_add(1, Ordering::Relaxed);
                let retryable = matches!(status, 429 | 502 | 503 | 504);
                if !retryable || attempt == settings.retries {
                    if !failing {
                        tracing::warn!(
                            status,
                            spans = n,
                            "OTLP collector refused a batch; dropped (appproxy_otlp_spans_failed_total counts the next ones)"
                        );
                    }
                    break;
                }
            }
            Err(e) => {
                stats.request_errors.fetch_add(1, Ordering::Relaxed);
                if attempt == settings.retries {
                    if !failing {
                        tracing::warn!(
                            error = %e,
                            spans = n,
                            "OTLP export failed; batch dropped (appproxy_otlp_spans_failed_total counts the next ones)"
                        );
                    }
                    break;
                }
            }
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    stats.failed.fetch_add(n, Ordering::Relaxed);
    false
}

/// A string attribute.
fn kv_str(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..Default::default()
    }
}

/// An integer attribute.
fn kv_int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

/// The OTLP span of a record.
pub fn to_otlp(r: &SpanRecord) -> Span {
    let mut attributes = Vec::with_capacity(12);
    if let Some(id) = &r.request_id {
        attributes.push(kv_str("request_id", id.as_str()));
    }
    if !r.method.is_empty() {
        attributes.push(kv_str("http.request.method", r.method.as_str()));
    }
    if !r.path.is_empty() {
        attributes.push(kv_str("url.path", r.path.as_str()));
    }
    if r.status != 0 {
        attributes.push(kv_int("http.response.status_code", i64::from(r.status)));
    }
    for (key, v) in [
        ("circuit", r.circuit),
        ("user_id", r.user_id),
        ("session_id", r.session_id),
        ("endpoint_id", r.endpoint_id),
    ] {
        if let Some(v) = v {
            attributes.push(kv_str(key, &v.hyphenated().to_string()));
        }
    }
    if !r.access_key.is_empty() {
        attributes.push(kv_str("access_key", r.access_key.as_str()));
    }
    if let Some(core) = r.core {
        attributes.push(kv_int("core", i64::from(core)));
    }
    let name = if r.method.is_empty() {
        r.name
    } else {
        r.method.as_str()
    };
    // Server spans are errors from 5xx on (a 4xx is the client's).
    let status = (r.status >= 500).then(|| Status {
        code: status::StatusCode::Error as i32,
        ..Default::default()
    });
    Span {
        trace_id: r.span.trace_id.to_bytes().to_vec(),
        span_id: r.span.span_id.to_bytes().to_vec(),
        parent_span_id: r
            .span
            .parent_span_id
            .map(|p| p.to_bytes().to_vec())
            .unwrap_or_default(),
        flags: u32::from(r.span.flags),
        name: name.to_owned(),
        kind: match r.kind {
            Kind::Server => span::SpanKind::Server,
            Kind::Internal => span::SpanKind::Internal,
        } as i32,
        start_time_unix_nano: r.start_unix_nanos,
        end_time_unix_nano: r.end_unix_nanos,
        attributes,
        status,
        ..Default::default()
    }
}

/// The protobuf body of one export request: the spans of the process's own component
/// under `service_name`, those a thread made for another component (an embedded
/// coordinator) under `appproxy-<component>`, one resource each.
pub fn encode(service_name: &str, batch: &[SpanRecord]) -> Vec<u8> {
    let mut components: Vec<Option<&'static str>> = Vec::new();
    for r in batch {
        if !components.contains(&r.component) {
            components.push(r.component);
        }
    }
    let resource_spans = components
        .into_iter()
        .map(|component| {
            let service =
                component.map_or_else(|| service_name.to_owned(), |c| format!("appproxy-{c}"));
            ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv_str("service.name", &service)],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "appproxy".to_owned(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        ..Default::default()
                    }),
                    spans: batch
                        .iter()
                        .filter(|r| r.component == component)
                        .map(to_otlp)
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }.encode_to_vec()
}

/// `data` as one gzip member (RFC 1952): a 10-byte header without optional fields,
/// the raw deflate stream (miniz_oxide, its fast level), the CRC-32 of `data` and
/// its length modulo 2^32, both little-endian.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    /// ID1 ID2, CM = deflate, FLG = none, MTIME = none, XFL = fastest, OS = unknown.
    const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, 0xff];
    let deflated = miniz_oxide::deflate::compress_to_vec(data, 1);
    let mut out = Vec::with_capacity(HEADER.len() + deflated.len() + 8);
    out.extend_from_slice(&HEADER);
    out.extend_from_slice(&deflated);
    out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// Why one export request failed.
#[derive(Debug, thiserror::Error)]
enum PostError {
    /// Name resolution found nothing.
    #[error("cannot resolve the collector's host")]
    Resolve,
    /// Connect, write or read failed or timed out.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The TLS handshake failed: not TLS, a certificate that does not chain to
    /// `otlp_ca_file` or does not name the host, or no answer in time.
    #[error("TLS handshake with the collector failed: {0}")]
    Handshake(std::io::Error),
    /// The response head did not come in time or was not HTTP.
    #[error("no valid response from the collector in time")]
    Response,
}

/// A socket whose every read and write waits at most `step`, and none past
/// `deadline`: the bound of the whole exchange, TLS handshake included.
struct Bounded {
    sock: TcpStream,
    deadline: Instant,
    step: Duration,
}

impl Bounded {
    /// The time the next read or write may take; an error once the deadline passed.
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        Ok(left.min(self.step))
    }
}

/// The error of a step that took too long.
fn timed_out() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "timed out waiting for the collector (otlp_timeout_ms)",
    )
}

/// A socket timeout as `TimedOut` (Unix reports it as `WouldBlock`).
fn timeout_kind(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::WouldBlock {
        timed_out()
    } else {
        e
    }
}

// A call with a socket timeout fails with `Interrupted` after the process was
// stopped and continued (signal(7)); it is tried again for the time left, so a
// stopped and resumed process does not lose the batch in flight.
impl Read for Bounded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            self.sock.set_read_timeout(Some(self.left()?))?;
            match self.sock.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                r => return r.map_err(timeout_kind),
            }
        }
    }
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            self.sock.set_write_timeout(Some(self.left()?))?;
            match self.sock.write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                r => return r.map_err(timeout_kind),
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

/// POSTs `body` and returns the response status. Every step is bounded by
/// `timeout` (connect, TLS handshake reads and writes, each write and read) and the
/// whole request by twice that; the connection is closed after the response head.
fn post(settings: &Settings, body: &[u8]) -> Result<u16, PostError> {
    let endpoint = &settings.endpoint;
    let timeout = settings.timeout;
    let deadline = Instant::now() + timeout * 2;
    let addrs: Vec<SocketAddr> = (endpoint.host.as_str(), endpoint.port)
        .to_socket_addrs()
        .map_err(|_| PostError::Resolve)?
        .collect();
    let addr = addrs.first().ok_or(PostError::Resolve)?;
    let sock = TcpStream::connect_timeout(addr, timeout)?;
    let _ = sock.set_nodelay(true);
    let mut stream = Bounded {
        sock,
        deadline,
        step: timeout,
    };
    let host = if endpoint.host.contains(':') {
        format!("[{}]:{}", endpoint.host, endpoint.port)
    } else {
        format!("{}:{}", endpoint.host, endpoint.port)
    };
    let encoding = match settings.compression {
        OtlpCompression::Gzip => "Content-Encoding: gzip\r\n",
        OtlpCompression::None => "",
    };
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-protobuf\r\n{encoding}Content-Length: {}\r\nUser-Agent: appproxy/{}\r\nConnection: close\r\n\r\n",
        endpoint.path,
        body.len(),
        env!("CARGO_PKG_VERSION"),
    );
    match (&settings.tls, endpoint.tls) {
        (Some(config), true) => {
            let name = ServerName::try_from(endpoint.host.clone())
                .map_err(|e| PostError::Handshake(std::io::Error::other(e)))?;
            let mut conn = rustls::ClientConnection::new(config.clone(), name)
                .map_err(|e| PostError::Handshake(std::io::Error::other(e)))?;
            // The handshake completes (certificate and name checked) before a byte
            // of the request is written; each of its reads and writes is bounded.
            while conn.is_handshaking() {
                conn.complete_io(&mut stream)
                    .map_err(PostError::Handshake)?;
            }
            exchange(
                &mut rustls::Stream::new(&mut conn, &mut stream),
                &head,
                body,
            )
        }
        (None, false) => exchange(&mut stream, &head, body),
        // Settings::from_config never builds these; refuse rather than fall back.
        _ => Err(PostError::Handshake(std::io::Error::other(
            "an https endpoint needs a TLS configuration (and http none)",
        ))),
    }
}

/// Writes the request and reads the status line of the response.
fn exchange(stream: &mut impl ReadWrite, head: &str, body: &[u8]) -> Result<u16, PostError> {
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()?;
    // Only the status line matters; read until it is complete, bounded in size (and,
    // by the stream, in time).
    let mut buf = [0u8; 1024];
    let mut filled = 0;
    loop {
        if let Some(end) = buf[..filled].windows(2).position(|w| w == b"\r\n") {
            return parse_status(&buf[..end]).ok_or(PostError::Response);
        }
        if filled == buf.len() {
            return Err(PostError::Response);
        }
        let n = match stream.read(&mut buf[filled..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(PostError::Response),
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(PostError::Response);
        }
        filled += n;
    }
}

/// A byte stream both ways (the plain socket or the TLS stream over it).
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// The status of an `HTTP/1.x NNN …` line.
fn parse_status(line: &[u8]) -> Option<u16> {
    let rest = line
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| line.strip_prefix(b"HTTP/1.0 "))?;
    let code = rest.get(..3)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("http://collector:4318").expect("ok");
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("collector", 4318, "/v1/traces")
        );
        let e = Endpoint::parse("http://127.0.0.1/").expect("ok");
        assert_eq!((e.port, e.path.as_str()), (4318, "/v1/traces"));
        let e = Endpoint::parse("http://[::1]:9000/otlp/v1/traces").expect("ok");
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("::1", 9000, "/otlp/v1/traces")
        );
        assert!(!e.tls);
        let e = Endpoint::parse("https://collector.example.com").expect("ok");
        assert_eq!(
            (e.tls, e.host.as_str(), e.port, e.path.as_str()),
            (true, "collector.example.com", 4318, "/v1/traces")
        );
        let e = Endpoint::parse("https://[::1]:4318").expect("ok");
        assert!(e.tls && e.host == "::1");
        for bad in [
            "ftp://c:4318",
            "HTTPS//c",
            "https://bad..name:4318",
            "c:4318",
            "http://:1",
            "http://c:0",
            "http://u:p@c",
            "http://c:x",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    fn config(endpoint: &str, ca: Option<&Path>) -> TelemetryConfig {
        TelemetryConfig {
            otlp_endpoint: Some(endpoint.to_owned()),
            otlp_ca_file: ca.map(Path::to_path_buf),
            ..Default::default()
        }
    }

    #[test]
    fn https_without_a_ca_file_needs_the_system_bundle_and_http_refuses_one() {
        // No silent plaintext; without otlp_ca_file the system bundle, which must be
        // there and hold a certificate. The environment is given, not the process's.
        let dir = tempfile::tempdir().expect("dir");
        let missing = dir.path().join("missing.pem");
        let env = |k: &str| (k == "SSL_CERT_FILE").then(|| missing.clone().into_os_string());
        let e = Settings::from_config_env(&config("https://c:4318", None), "t", &env)
            .expect_err("https with an unreadable system bundle");
        let e = e.to_string();
        for part in [
            "otlp_endpoint \"https://c:4318\" without otlp_ca_file uses the system CA bundle (SSL_CERT_FILE): cannot read ",
            "missing.pem",
            "; set otlp_ca_file to the PEM file",
        ] {
            assert!(e.contains(part), "{part:?} in {e}");
        }
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let env = |k: &str| (k == "SSL_CERT_FILE").then(|| empty.clone().into_os_string());
        let e = Settings::from_config_env(&config("https://c:4318", None), "t", &env)
            .expect_err("https with a system bundle without certificates");
        let e = e.to_string();
        assert!(
            e.contains("empty.pem holds no CERTIFICATE block") && e.contains("set otlp_ca_file"),
            "{e}"
        );
        // An http endpoint reads no bundle at all.
        let plain = Settings::from_config_env(&config("http://c", None), "t", &env)
            .expect("ok")
            .expect("on");
        assert!(plain.tls.is_none() && plain.ca_bundle.is_none());
        assert_eq!(plain.compression, OtlpCompression::Gzip, "the default");
        let e = Settings::from_config(&config("http://c:4318", Some(Path::new("/x.pem"))), "t")
            .expect_err("http with a CA file");
        assert!(e.to_string().contains("plain http://"), "{e}");
        // A named CA file is never replaced by the system bundle.
        let e = Settings::from_config(&config("https://c", Some(&missing)), "t")
            .expect_err("unreadable CA file");
        assert!(
            e.to_string().contains("] otlp_ca_file: cannot read ")
                && e.to_string().contains("missing.pem"),
            "{e}"
        );
        let e = Settings::from_config(&config("https://c", Some(&empty)), "t")
            .expect_err("no certificate");
        assert!(e.to_string().contains("no CERTIFICATE block"), "{e}");
    }

    #[test]
    fn crc32_known_vectors() {
        // CRC-32/ISO-HDLC, the checksum of gzip's trailer.
        assert_eq!(crc32fast::hash(b""), 0);
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(
            crc32fast::hash(b"The quick brown fox jumps over the lazy dog"),
            0x414F_A339
        );
    }

    #[test]
    fn gzip_members() {
        // The empty input: header, the empty final fixed-Huffman block, CRC 0, size 0.
        assert_eq!(
            gzip(b""),
            [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, 0xff, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let z = gzip(&data);
        assert!(z.len() < data.len() / 4, "compressed: {}", z.len());
        assert_eq!(&z[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, 0xff]);
        let (deflated, trailer) = z[10..].split_at(z.len() - 18);
        assert_eq!(
            miniz_oxide::inflate::decompress_to_vec(deflated).expect("inflate"),
            data
        );
        assert_eq!(trailer[..4], crc32fast::hash(&data).to_le_bytes());
        assert_eq!(trailer[4..], (data.len() as u32).to_le_bytes());
    }

    #[test]
    fn inline_text_is_cut_at_a_character_boundary() {
        assert_eq!(Inline::<4>::new("abcdef").as_str(), "abcd");
        assert_eq!(Inline::<4>::new("abcé").as_str(), "abc");
        assert_eq!(Inline::<8>::from_bytes(b"ab\xffcd").as_str(), "ab");
    }

    #[test]
    fn a_record_stays_small() {
        // The queue holds otlp_queue of these from the start (docs/tracing.md).
        assert!(
            std::mem::size_of::<SpanRecord>() <= 512,
            "{}",
            std::mem::size_of::<SpanRecord>()
        );
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.0 503"), Some(503));
        assert_eq!(parse_status(b"SSH-2.0"), None);
    }
}
