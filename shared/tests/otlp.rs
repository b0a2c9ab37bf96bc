//! The OTLP exporter against a real receiver (an HTTP server decoding the protobuf
//! with the `opentelemetry-proto` types): spans arrive with their IDs, parent and
//! attributes under the resource's `service.name`, a refused batch is retried, and a
//! dead or hung collector never blocks the side that pushes spans: the queue stays
//! bounded and what does not fit is dropped and counted.
//!
//! Bodies are gzipped by default: the receiver checks every field of the gzip
//! member with code of its own (CRC-32 bit by bit), and the system's `gzip`
//! decompresses the exporter's output too. An `https://` collector (a rustls
//! server with a throwaway PKI made by the `openssl` CLI, the worker's TLS test
//! fixtures) gets the spans, trusted through `otlp_ca_file` or, without one, the
//! system bundle `SSL_CERT_FILE` names; a collector whose certificate does not chain to
//! `otlp_ca_file`, or does not name the host, or that does not speak TLS, or stalls
//! the handshake or the answer, fails the batch — counted, never hung.

use appproxy_test_support::otlp as otlp_receiver;

#[path = "../../dataplane/tests/common/tls.rs"]
mod tls_support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;

use appproxy_shared::otlp::{
    encode, gzip, tls_client_config, Endpoint, Exporter, Inline, Kind, Settings, SpanRecord,
};
use appproxy_shared::telemetry::{OtlpCompression, TelemetryConfig};
use appproxy_shared::trace::TraceParent;
use appproxy_shared::{RequestId, SpanContext};
use otlp_receiver::Receiver;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use tls_support::Pki;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";
const USER: &str = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";

fn settings(url: &str, queue: usize, timeout: Duration) -> Settings {
    Settings {
        endpoint: Endpoint::parse(url).expect("endpoint"),
        service_name: "appproxy-test".into(),
        queue,
        batch: 2,
        flush: Duration::from_millis(20),
        timeout,
        retries: 2,
        compression: OtlpCompression::Gzip,
        tls: None,
        ca_bundle: None,
    }
}

fn record(i: u16) -> SpanRecord {
    let incoming = TraceParent::parse(format!("00-{TRACE}-{CALLER}-01").as_bytes()).expect("tp");
    let id = RequestId::parse(format!("req-{i}").as_bytes()).expect("id");
    let mut r = SpanRecord::new(
        SpanContext::start(Some(&incoming), Some(&id)),
        Kind::Server,
        "request",
    );
    r.ended_now(Duration::from_micros(1500));
    r.request_id = Some(id);
    r.method = Inline::new("GET");
    r.path = Inline::new("/lab");
    r.status = if i == 2 { 502 } else { 200 };
    r.user_id = Some(USER.parse().expect("uuid"));
    r.access_key = Inline::new("AKIAEXAMPLE");
    r.core = Some(i);
    r
}

fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    // A hang guard only.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn spans_reach_the_collector_with_ids_parent_and_attributes() {
    // The first request is refused (503): the batch is retried, not lost.
    let rx = Receiver::start_refusing(1);
    let exporter =
        Exporter::start(settings(&rx.url(), 64, Duration::from_secs(10))).expect("exporter");
    let records: Vec<SpanRecord> = (0..3).map(record).collect();
    // A span of a trace the caller does not sample is not exported.
    let mut unsampled = record(9);
    unsampled.span.flags = 0;
    exporter.push(&unsampled);
    for r in &records {
        exporter.push(r);
    }
    eventually("three spans exported", || {
        exporter.stats().exported.load(Ordering::Relaxed) == 3
    });
    assert!(exporter.stats().request_errors.load(Ordering::Relaxed) >= 1);
    assert_eq!(exporter.stats().dropped.load(Ordering::Relaxed), 0);
    let spans = rx.spans();
    assert_eq!(spans.len(), 3, "only the sampled spans: {spans:#?}");
    let posts = rx.posts();
    assert!(!posts.is_empty());
    for post in posts {
        assert_eq!(post.path, "/v1/traces");
        assert_eq!(post.content_type, "application/x-protobuf");
        // gzip by default; the receiver checked header, CRC-32 and length.
        assert_eq!(post.content_encoding, "gzip");
        assert_eq!(post.error, None);
    }
    for (i, r) in records.iter().enumerate() {
        let got = spans
            .iter()
            .find(|g| g.span_id() == r.span.span_id.hex().as_str())
            .unwrap_or_else(|| panic!("span {i} not received: {spans:#?}"));
        assert_eq!(got.service, "appproxy-test");
        assert_eq!(got.trace_id(), TRACE);
        assert_eq!(got.parent_span_id(), CALLER);
        assert_eq!(got.span.name, "GET");
        assert_eq!(got.span.kind, 2, "SERVER");
        assert_eq!(got.span.flags & 0xff, 1);
        assert!(got.span.end_time_unix_nano - got.span.start_time_unix_nano >= 1_500_000);
        assert_eq!(
            got.str("request_id").as_deref(),
            Some(format!("req-{i}").as_str())
        );
        assert_eq!(got.str("http.request.method").as_deref(), Some("GET"));
        assert_eq!(got.str("url.path").as_deref(), Some("/lab"));
        assert_eq!(
            got.int("http.response.status_code"),
            Some(i64::from(r.status))
        );
        assert_eq!(got.str("user_id").as_deref(), Some(USER));
        assert_eq!(got.str("access_key").as_deref(), Some("AKIAEXAMPLE"));
        assert_eq!(got.int("core"), Some(i as i64));
        assert_eq!(got.str("session_id"), None, "unknown fields are left out");
        // A 5xx is an error span; the others have no status.
        let code = got.span.status.as_ref().map_or(0, |s| s.code);
        assert_eq!(code, if r.status >= 500 { 2 } else { 0 });
    }
}

/// Pushes until the queue has dropped a span; every push returns at once.
fn push_until_dropped(exporter: &Exporter, capacity: usize) {
    let r = record(0);
    eventually("a span dropped", || {
        for _ in 0..1000 {
            exporter.push(&r);
            assert!(exporter.queued() <= capacity, "the queue is bounded");
        }
        exporter.stats().dropped.load(Ordering::Relaxed) > 0
    });
}

#[test]
fn a_hung_collector_blocks_nothing_and_the_queue_stays_bounded() {
    let addr = otlp_receiver::hung_collector();
    // The collector accepts and never answers; the timeout is long so the exporter
    // thread is stuck in its first request for the whole test.
    let exporter = Exporter::start(settings(
        &format!("http://{addr}"),
        8,
        Duration::from_secs(600),
    ))
    .expect("exporter");
    push_until_dropped(&exporter, 8);
    assert_eq!(exporter.stats().exported.load(Ordering::Relaxed), 0);
}

#[test]
fn a_dead_collector_blocks_nothing_and_failed_batches_are_counted() {
    let addr = otlp_receiver::dead_collector();
    let exporter = Exporter::start(settings(
        &format!("http://{addr}"),
        8,
        Duration::from_secs(5),
    ))
    .expect("exporter");
    push_until_dropped(&exporter, 8);
    eventually("a batch given up after its retries", || {
        exporter.stats().failed.load(Ordering::Relaxed) > 0
    });
    assert!(exporter.stats().request_errors.load(Ordering::Relaxed) >= 3);
}

#[test]
fn without_compression_the_protobuf_is_sent_as_it_is() {
    let rx = Receiver::start();
    let mut s = settings(&rx.url(), 64, Duration::from_secs(10));
    s.compression = OtlpCompression::None;
    let exporter = Exporter::start(s).expect("exporter");
    exporter.push(&record(0));
    exporter.push(&record(1));
    eventually("two spans exported", || {
        exporter.stats().exported.load(Ordering::Relaxed) == 2
    });
    for post in rx.posts() {
        assert_eq!(post.content_encoding, "");
        assert_eq!(post.error, None);
        assert_eq!(post.wire_len, post.decoded_len);
    }
    assert_eq!(rx.spans().len(), 2);
}

#[test]
fn spans_made_for_another_component_are_exported_under_its_name() {
    // A coordinator embedded in the worker's process: its threads name their
    // component, and their spans go out as the coordinator's service, not the worker's.
    let rx = Receiver::start_refusing(0);
    let exporter =
        Exporter::start(settings(&rx.url(), 64, Duration::from_secs(10))).expect("exporter");
    let own = record(1);
    let other = std::thread::spawn(|| {
        appproxy_shared::telemetry::set_thread_component("coordinator");
        record(2)
    })
    .join()
    .expect("coordinator thread");
    assert_eq!(own.component, None);
    assert_eq!(other.component, Some("coordinator"));
    exporter.push(&own);
    exporter.push(&other);
    eventually("both spans exported", || {
        exporter.stats().exported.load(Ordering::Relaxed) == 2
    });
    let spans = rx.spans();
    let service_of = |r: &SpanRecord| {
        spans
            .iter()
            .find(|g| g.span_id() == r.span.span_id.hex().as_str())
            .map(|g| g.service.clone())
            .unwrap_or_else(|| panic!("span not received: {spans:#?}"))
    };
    assert_eq!(service_of(&own), "appproxy-test");
    assert_eq!(service_of(&other), "appproxy-coordinator");
}

#[test]
fn the_system_gzip_reads_the_exporters_gzip() {
    // A third implementation: gzip(1) checks the CRC-32 and length itself.
    let batch: Vec<SpanRecord> = (0..50).map(record).collect();
    let body = encode("appproxy-test", &batch);
    let mut child = std::process::Command::new("gzip")
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run gzip");
    let z = gzip(&body);
    // A batch of spans repeats keys, IDs and values: it compresses well.
    assert!(
        z.len() * 3 < body.len(),
        "50 spans: {} bytes gzipped, {} of protobuf",
        z.len(),
        body.len()
    );
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(&z));
    let out = child.wait_with_output().expect("gzip output");
    writer.join().expect("writer").expect("write to gzip");
    assert!(out.status.success(), "gzip -dc failed");
    assert_eq!(out.stdout, body);
}

/// A TLS server configuration serving `cert` (a chain, leaf first) with `key`.
fn tls_server(pki: &Pki, cert: &str, key: &str) -> Arc<ServerConfig> {
    let chain = CertificateDer::pem_file_iter(pki.path(cert))
        .expect("cert file")
        .collect::<Result<Vec<_>, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_file(pki.path(key)).expect("key");
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server cert");
    Arc::new(config)
}

/// An OTLP receiver behind TLS with `config`.
fn tls_receiver(config: Arc<ServerConfig>) -> Receiver {
    Receiver::start_over(0, move |tcp| {
        let conn = ServerConnection::new(config.clone()).map_err(std::io::Error::other)?;
        Ok(StreamOwned::new(conn, tcp))
    })
}

/// Settings sending over TLS to `url`, trusting the CA certificates in `ca`.
fn tls_settings(url: &str, ca: &Path, timeout: Duration, retries: u32) -> Settings {
    let mut s = settings(url, 64, timeout);
    s.tls = Some(tls_client_config(ca).expect("CA file"));
    s.ca_bundle = Some(ca.to_path_buf());
    s.retries = retries;
    s
}

#[test]
fn spans_reach_an_https_collector_gzipped() {
    let pki = Pki::new();
    // The ECDSA leaf for localhost and 127.0.0.1, served behind its intermediate.
    let rx = tls_receiver(tls_server(&pki, "ec-chain.pem", "ec.key"));
    // Through the config table, as a component reads it.
    let config = TelemetryConfig {
        otlp_endpoint: Some(rx.https_url()),
        otlp_ca_file: Some(pki.path("ca.pem")),
        otlp_batch: 2,
        otlp_flush_ms: 20,
        ..Default::default()
    };
    let s = Settings::from_config(&config, "test")
        .expect("settings")
        .expect("export on");
    assert!(s.endpoint.tls && s.tls.is_some());
    assert_eq!(s.ca_bundle, config.otlp_ca_file);
    all_reach(&rx, s, 3);
    for post in rx.posts() {
        assert_eq!(post.content_encoding, "gzip");
        assert_eq!(post.error, None);
    }
}

#[test]
fn without_a_ca_file_an_https_collector_is_trusted_through_ssl_cert_file() {
    let pki = Pki::new();
    let rx = tls_receiver(tls_server(&pki, "ec-chain.pem", "ec.key"));
    let config = TelemetryConfig {
        otlp_endpoint: Some(rx.https_url()),
        otlp_ca_file: None,
        otlp_batch: 2,
        otlp_flush_ms: 20,
        ..Default::default()
    };
    // The system bundle, as SSL_CERT_FILE names it: the test's CA (the environment
    // is handed in; the process's is left alone).
    let ca = pki.path("ca.pem").into_os_string();
    let env = |k: &str| (k == "SSL_CERT_FILE").then(|| ca.clone());
    let s = Settings::from_config_env(&config, "test", &env)
        .expect("settings")
        .expect("export on");
    assert!(s.endpoint.tls && s.tls.is_some());
    assert_eq!(
        s.ca_bundle.as_deref(),
        Some(pki.path("ca.pem").as_path()),
        "the bundle trusted is the one named at start"
    );
    all_reach(&rx, s, 2);
    // The bundle is what is trusted: one of another root fails the handshake.
    let other = Pki::new();
    let other_ca = other.path("ca.pem").into_os_string();
    let env = |k: &str| (k == "SSL_CERT_FILE").then(|| other_ca.clone());
    let mut s = Settings::from_config_env(&config, "test", &env)
        .expect("settings")
        .expect("export on");
    s.retries = 0;
    let posts = rx.posts().len();
    fails_and_is_counted(s);
    assert_eq!(rx.posts().len(), posts, "no request reached it");
}

/// Pushes `n` spans to an exporter with `settings`, waits until all are exported
/// with no failed request, and checks that each reached `rx` whole (its trace and
/// service).
fn all_reach(rx: &Receiver, settings: Settings, n: u16) {
    let exporter = Exporter::start(settings).expect("exporter");
    let records: Vec<SpanRecord> = (0..n).map(record).collect();
    for r in &records {
        exporter.push(r);
    }
    eventually(&format!("{n} spans exported over TLS"), || {
        exporter.stats().exported.load(Ordering::Relaxed) == u64::from(n)
    });
    assert_eq!(exporter.stats().request_errors.load(Ordering::Relaxed), 0);
    let spans = rx.spans();
    for r in &records {
        let got = spans
            .iter()
            .find(|g| g.span_id() == r.span.span_id.hex().as_str())
            .expect("span received");
        assert_eq!(got.trace_id(), TRACE);
        assert_eq!(got.service, "appproxy-test");
    }
}

/// Pushes two spans (one batch) to an exporter with `settings` and waits until the
/// batch is given up: both spans failed, one failed request per attempt, nothing
/// exported. A hang guard only; the tests that call this with a long timeout
/// would trip it (60 s) if the failure waited for a timeout.
fn fails_and_is_counted(settings: Settings) -> Exporter {
    let attempts = u64::from(settings.retries) + 1;
    let exporter = Exporter::start(settings).expect("exporter");
    exporter.push(&record(0));
    exporter.push(&record(1));
    eventually("the batch given up", || {
        exporter.stats().failed.load(Ordering::Relaxed) == 2
    });
    assert_eq!(
        exporter.stats().request_errors.load(Ordering::Relaxed),
        attempts
    );
    assert_eq!(exporter.stats().exported.load(Ordering::Relaxed), 0);
    exporter
}

// A long step timeout: these failures must come from the TLS checks, at once.
const NO_TIMEOUT: Duration = Duration::from_secs(600);

#[test]
fn a_collector_whose_certificate_does_not_chain_to_the_ca_file_fails() {
    let trusted = Pki::new();
    let other = Pki::new();
    // A valid chain for 127.0.0.1, but under another root.
    let rx = tls_receiver(tls_server(&other, "ec-chain.pem", "ec.key"));
    fails_and_is_counted(tls_settings(
        &rx.https_url(),
        &trusted.path("ca.pem"),
        NO_TIMEOUT,
        1,
    ));
    assert!(rx.posts().is_empty(), "no request reached it");
}

#[test]
fn a_collector_whose_certificate_names_another_host_fails() {
    let pki = Pki::new();
    // Under the trusted root, but for *.apps.test, not 127.0.0.1.
    let rx = tls_receiver(tls_server(&pki, "wild.pem", "wild.key"));
    fails_and_is_counted(tls_settings(
        &rx.https_url(),
        &pki.path("ca.pem"),
        NO_TIMEOUT,
        1,
    ));
    assert!(rx.posts().is_empty(), "no request reached it");
}

/// A plain HTTP server that answers anything it reads with 400, as an HTTP server
/// answers a TLS ClientHello.
fn plaintext_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    addr
}

#[test]
fn a_plaintext_collector_behind_an_https_endpoint_fails() {
    let pki = Pki::new();
    let addr = plaintext_server();
    fails_and_is_counted(tls_settings(
        &format!("https://{addr}"),
        &pki.path("ca.pem"),
        NO_TIMEOUT,
        1,
    ));
}

#[test]
fn a_stalled_handshake_or_answer_times_out_and_is_counted() {
    let pki = Pki::new();
    // Accepts TCP, never answers the ClientHello.
    let hung = otlp_receiver::hung_collector();
    fails_and_is_counted(tls_settings(
        &format!("https://{hung}"),
        &pki.path("ca.pem"),
        Duration::from_millis(300),
        0,
    ));
    // Completes the handshake, reads the request, never answers it.
    let server = tls_server(&pki, "ec-chain.pem", "ec.key");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut held: Vec<StreamOwned<ServerConnection, TcpStream>> = Vec::new();
        for tcp in listener.incoming().flatten() {
            let Ok(conn) = ServerConnection::new(server.clone()) else {
                continue;
            };
            let mut s = StreamOwned::new(conn, tcp);
            let mut buf = [0u8; 4096];
            if s.read(&mut buf).is_ok() {
                held.push(s);
            }
        }
    });
    fails_and_is_counted(tls_settings(
        &format!("https://{addr}"),
        &pki.path("ca.pem"),
        Duration::from_millis(300),
        0,
    ));
}
