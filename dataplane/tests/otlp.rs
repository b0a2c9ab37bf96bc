//! OTLP export from the real worker binary to a real OTLP receiver started by the
//! test (an HTTP server decoding the protobuf): each request's hop arrives as a
//! server span of the client's trace, with the client's span as parent, the span the
//! app received as its `traceparent` parent, and the request's attributes and the
//! circuit's user context. A hung collector blocks no request: the export queue
//! stays bounded and the drops are counted in `/metrics`. Bodies are gzipped by
//! default (the receiver checks the member); an `https://` collector with
//! `otlp_ca_file` gets the spans over TLS, and an `https://` endpoint without a CA
//! file takes the system bundle (`SSL_CERT_FILE`): `--check-config` accepts one that
//! holds a certificate and refuses a missing or empty one.

mod common;
#[path = "common/tls.rs"]
mod tls_support;
use appproxy_test_support::otlp as otlp_receiver;

use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use tls_support::Pki;

use common::{Client, Upstream, Worker, WorkerOpts};
use otlp_receiver::Receiver;

const CIRCUIT: &str = "c0a8f5d2-1111-4222-8333-444455556666";
const USER: &str = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
const SESSION: &str = "7e0f6a55-2b1c-4d3e-8f9a-0b1c2d3e4f5a";
const ENDPOINT: &str = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d";
const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER: &str = "b7ad6b7169203331";

fn worker(up: &Upstream, telemetry: &str) -> Worker {
    Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        extra: format!("[telemetry]\n{telemetry}\n"),
        circuit_extra: format!(
            "user_id = \"{USER}\"\nsession_ids = [\"{SESSION}\"]\nendpoint_id = \"{ENDPOINT}\""
        ),
        ..Default::default()
    })
}

/// An unlabelled sample of the admin `/metrics`.
fn sample(w: &Worker, name: &str) -> u64 {
    let text = w.admin_get("/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

#[test]
fn each_request_hop_is_a_span_of_the_clients_trace() {
    let rx = Receiver::start();
    let up = Upstream::start();
    let w = worker(
        &up,
        &format!("otlp_endpoint = \"{}\"\notlp_flush_ms = 50", rx.url()),
    );
    let mut c = Client::connect(w.addr());
    let r = c.get(
        "/lab/tree?token=secret",
        &format!("X-Backend-Request-ID: otlp-w-1\r\ntraceparent: 00-{TRACE}-{CALLER}-01\r\n"),
    );
    assert_eq!(r.status, 200);
    let sent = up.last();
    let tp = sent.headers_named("traceparent");
    assert_eq!(tp.len(), 1, "{tp:?}");
    let worker_span = tp[0].split('-').nth(2).expect("span").to_owned();

    let got = rx.wait_for("of the request", |g| {
        g.str("request_id").as_deref() == Some("otlp-w-1")
    });
    assert_eq!(got.service, "appproxy-worker");
    assert_eq!(got.trace_id(), TRACE);
    assert_eq!(got.parent_span_id(), CALLER);
    assert_eq!(got.span_id(), worker_span, "the span the app got as parent");
    assert_eq!(got.span.kind, 2, "SERVER");
    assert_eq!(got.span.name, "GET");
    assert_eq!(got.str("http.request.method").as_deref(), Some("GET"));
    assert_eq!(
        got.str("url.path").as_deref(),
        Some("/lab/tree"),
        "no query"
    );
    assert_eq!(got.int("http.response.status_code"), Some(200));
    assert_eq!(got.str("circuit").as_deref(), Some(CIRCUIT));
    assert_eq!(got.str("user_id").as_deref(), Some(USER));
    assert_eq!(got.str("session_id").as_deref(), Some(SESSION));
    assert_eq!(got.str("endpoint_id").as_deref(), Some(ENDPOINT));
    assert_eq!(got.int("core"), Some(0));
    assert!(got.span.end_time_unix_nano >= got.span.start_time_unix_nano);
    let access = w.wait_access_line("otlp-w-1");
    assert_eq!(access["span_id"], worker_span.as_str());

    // No traceparent, a UUID request ID: a root span whose trace is the ID.
    let rid = "4bf92f35-77b3-4da6-a3ce-929d0e0e4736";
    let r = c.get("/x", &format!("X-Backend-Request-ID: {rid}\r\n"));
    assert_eq!(r.status, 200);
    let got = rx.wait_for("of the untraced request", |g| {
        g.str("request_id").as_deref() == Some(rid)
    });
    assert_eq!(got.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(got.parent_span_id(), "");

    for p in rx.posts() {
        assert_eq!(p.path, "/v1/traces");
        assert_eq!(p.content_type, "application/x-protobuf");
    }
    common::eventually("the exported counter", || {
        sample(&w, "appproxy_otlp_spans_exported_total") >= 2
    });
    assert_eq!(sample(&w, "appproxy_otlp_spans_dropped_total"), 0);
}

#[test]
fn a_hung_collector_blocks_no_request_and_the_queue_stays_bounded() {
    let hung = otlp_receiver::hung_collector();
    let up = Upstream::start();
    let w = worker(
        &up,
        &format!(
            "otlp_endpoint = \"http://{hung}\"\notlp_queue = 4\notlp_batch = 2\notlp_flush_ms = 10\notlp_timeout_ms = 600000"
        ),
    );
    let mut c = Client::connect(w.addr());
    let mut n = 0;
    // Every request is answered while the exporter waits on the collector; keep
    // going (bounded) until the queue has overflowed.
    common::eventually("a dropped span", || {
        for _ in 0..20 {
            let r = c.get("/", "");
            assert_eq!(r.status, 200);
            n += 1;
        }
        sample(&w, "appproxy_otlp_spans_dropped_total") > 0
    });
    assert!(n >= 20);
    assert!(sample(&w, "appproxy_otlp_queue_spans") <= 4);
    assert_eq!(sample(&w, "appproxy_otlp_spans_exported_total"), 0);
}

/// An OTLP receiver behind TLS serving the test PKI's chain for 127.0.0.1.
fn tls_receiver(pki: &Pki) -> Receiver {
    let chain = CertificateDer::pem_file_iter(pki.path("ec-chain.pem"))
        .expect("cert file")
        .collect::<Result<Vec<_>, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_file(pki.path("ec.key")).expect("key");
    let config = Arc::new(
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server cert"),
    );
    Receiver::start_over(0, move |tcp| {
        let conn = ServerConnection::new(config.clone()).map_err(std::io::Error::other)?;
        Ok(StreamOwned::new(conn, tcp))
    })
}

#[test]
fn spans_reach_an_https_collector_gzipped() {
    let pki = Pki::new();
    let rx = tls_receiver(&pki);
    let up = Upstream::start();
    let w = worker(
        &up,
        &format!(
            "otlp_endpoint = \"{}\"\notlp_ca_file = \"{}\"\notlp_flush_ms = 50",
            rx.https_url(),
            pki.path("ca.pem").display()
        ),
    );
    let mut c = Client::connect(w.addr());
    let r = c.get(
        "/tls",
        &format!("X-Backend-Request-ID: otlp-tls-1\r\ntraceparent: 00-{TRACE}-{CALLER}-01\r\n"),
    );
    assert_eq!(r.status, 200);
    let got = rx.wait_for("of the request", |g| {
        g.str("request_id").as_deref() == Some("otlp-tls-1")
    });
    assert_eq!(got.trace_id(), TRACE);
    assert_eq!(got.service, "appproxy-worker");
    for post in rx.posts() {
        assert_eq!(post.content_encoding, "gzip");
        assert_eq!(post.error, None);
    }
    assert_eq!(sample(&w, "appproxy_otlp_export_errors_total"), 0);
}

#[test]
fn an_https_endpoint_without_a_ca_file_takes_the_system_bundle() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("w.toml");
    std::fs::write(
        &path,
        "[worker]\ncores = 1\n[telemetry]\notlp_endpoint = \"https://collector.example.com:4318\"\n",
    )
    .expect("write");
    // `--check-config` with SSL_CERT_FILE naming `bundle`: success and its output.
    let check = |bundle: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_appproxy-worker"))
            .arg("--config")
            .arg(&path)
            .arg("--check-config")
            .env("SSL_CERT_FILE", bundle)
            .output()
            .expect("run");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let pki = Pki::new();
    let (ok, text) = check(&pki.path("ca.pem"));
    assert!(ok, "{text}");
    let (ok, text) = check(&dir.path().join("missing.pem"));
    assert!(!ok, "{text}");
    for part in [
        "system CA bundle (SSL_CERT_FILE)",
        "missing.pem",
        "set otlp_ca_file",
    ] {
        assert!(text.contains(part), "{part:?} in {text}");
    }
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").expect("write");
    let (ok, text) = check(&empty);
    assert!(!ok, "{text}");
    assert!(
        text.contains("empty.pem holds no CERTIFICATE block") && text.contains("set otlp_ca_file"),
        "{text}"
    );
}
