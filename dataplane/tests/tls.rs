//! TLS termination on the worker with real clients: rustls, `curl` and
//! `openssl s_client` against a PKI the test makes; HTTP/1.1, WebSocket (wss) and
//! raw TCP circuits over TLS; TLS 1.2 and 1.3, ALPN, SNI, session resumption shared
//! by the cores, certificate reload on SIGHUP; start-up errors naming the file; TLS to
//! apps serving HTTPS (checked or not, a stalled handshake counted as a timeout).

mod common;
#[path = "common/tls.rs"]
mod tls_support;

use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appproxy_test_support::net::{ReadUninterrupted, Uninterrupted};
use common::{metric, Upstream, Worker, WorkerOpts};
use tls_support::{connect, get, Pki, SClient};

fn tls_worker(pki: &Pki, up: &Upstream, extra_worker: &str) -> Worker {
    Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra: format!("{}{extra_worker}", pki.worker_lines()),
        ..Default::default()
    })
}

#[test]
fn https_requests_over_tls12_and_tls13_with_alpn() {
    let pki = Pki::new();
    let up = Upstream::start();
    // The HTTP/1.1-only frontend (HTTP/2 off); with it on, see tests/http2.rs.
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra: pki.worker_lines(),
        extra: "[http2]\nenabled = false\n".into(),
        ..Default::default()
    });
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let config = pki.client(&[version], &[b"h2", b"http/1.1"]);
        let s = connect(w.addr(), &config, "localhost").expect("handshake");
        assert_eq!(s.conn.protocol_version(), Some(version.version));
        // h2 is not offered back while HTTP/2 is not served.
        assert_eq!(s.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
        // The chain (leaf and intermediate) is served.
        assert_eq!(s.conn.peer_certificates().map(|c| c.len()), Some(2));
        let mut s = BufReader::new(s);
        // Keep-alive: several requests on one TLS connection.
        for i in 0..3 {
            let r = get(&mut s, &format!("/hello?{i}"), "");
            assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
            assert!(r.header("x-backend-request-id").is_some());
        }
        let seen = up.last();
        assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
        assert!(seen
            .header("forwarded")
            .is_some_and(|f| f.contains("proto=https")));
    }
    // A larger body crosses many records both ways.
    let mut s = BufReader::new(connect(w.addr(), &pki.default_client(), "localhost").expect("tls"));
    let r = get(&mut s, "/bytes?n=3000000", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 3_000_000);
    assert!(r.body.iter().all(|b| *b == b'x'));
    let body = vec![b'y'; 1_000_000];
    s.get_mut()
        .write_all(
            format!(
                "POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .expect("head");
    s.get_mut().write_all(&body).expect("body");
    let r = tls_support::read_response(&mut s);
    assert_eq!(r.status, 200);
    assert_eq!(up.last().body_len, 1_000_000);
    // Every handshake ended (the harness's readiness probe, closed at once, may be
    // taken by a loaded core only now: its failed handshake ends soon after).
    common::eventually("no handshake left in progress", || {
        metric(&w, "appproxy_tls_handshakes_in_progress") == 0
    });
}

/// `[worker] proxy_protocol` with TLS: the balancer's header comes before the
/// ClientHello, here in the same segment; the handshake reads on from the byte
/// after it, and the app is told of the client the header names.
#[test]
fn the_proxy_protocol_header_comes_before_the_tls_handshake() {
    let pki = Pki::new();
    let up = Upstream::start();
    let w = tls_worker(
        &pki,
        &up,
        "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\"]\n",
    );
    let tcp = std::net::TcpStream::connect(w.addr()).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut conn = rustls::ClientConnection::new(pki.default_client(), name).expect("client");
    let mut first = b"PROXY TCP4 203.0.113.5 127.0.0.1 50000 443\r\n".to_vec();
    conn.write_tls(&mut first).expect("ClientHello");
    (&tcp).write_all(&first).expect("header and ClientHello");
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).expect("handshake");
    }
    let mut s = BufReader::new(s);
    let r = get(&mut s, "/behind-a-balancer", "");
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let seen = up.last();
    assert_eq!(seen.path, "/behind-a-balancer");
    assert_eq!(seen.header("x-forwarded-for"), Some("203.0.113.5"));
    // Without the header, the ClientHello is not a header: closed, unanswered.
    assert!(connect(w.addr(), &pki.default_client(), "localhost").is_err());
}

#[test]
fn curl_over_https_with_the_test_ca() {
    let pki = Pki::new();
    let up = Upstream::start();
    let w = tls_worker(&pki, &up, "");
    let url = format!("https://localhost:{}/curl", w.port);
    let out = Command::new("curl")
        .args(["-sS", "--http1.1", "--max-time", "20", "--cacert"])
        .arg(pki.path("ca.pem"))
        .args(["-o", "/dev/null", "-o", "/dev/null"])
        .args(["-w", "%{http_code} %{ssl_verify_result} %{num_connects}\n"])
        .arg(&url)
        .arg(&url)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Two requests on one connection (curl reuses it: no second connect).
    assert_eq!(text, "200 0 1\n200 0 0\n", "{text}");
    assert_eq!(up.last().header("x-forwarded-proto"), Some("https"));
    // Without the CA, curl refuses the certificate: it is the test CA's.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-o", "/dev/null"])
        .arg(&url)
        .output()
        .expect("curl");
    assert!(!out.status.success());
}

/// Runs `openssl s_client` with `args`, feeding `input`; returns its stdout. With
/// `-ign_eof` the end of `input` does not end the session: s_client runs until the
/// worker closes the connection (every request sent here says `Connection: close`)
/// or the handshake fails, so the response and any TLS 1.3 tickets, which arrive
/// after the handshake, are always read.
fn s_client(port: u16, args: &[&str], input: &[u8]) -> String {
    let mut client = SClient::spawn(port, &[&["-ign_eof"], args].concat());
    // A failed handshake may end s_client before it reads its input.
    let _ = client.write(input);
    client.finish().0
}

const REQ: &[u8] = b"GET /s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

/// An RSA and an ECDSA pair for the same name (`tls_sni_certs`, RSA first): each
/// client gets the one it can verify, by the signature schemes it offers, over
/// TLS 1.3 and 1.2 (schemes TLS 1.3 allows weighed first); a client offering both
/// gets the first listed. Before, the
/// first pair valid for the name was served whatever the client offered: the
/// ECDSA pair was never served, and a client verifying only ECDSA failed its
/// handshake (nginx serves either of its `ssl_certificate`s so).
#[test]
fn an_rsa_and_an_ecdsa_pair_for_one_name_each_serve_the_clients_that_verify_them() {
    let pki = Pki::new();
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra: format!(
            "tls_listen = true\ntls_cert = \"{}\"\ntls_privkey = \"{}\"\ntls_sni_certs = [{{ cert = \"{}\", privkey = \"{}\" }}, {{ cert = \"{}\", privkey = \"{}\" }}]\n",
            pki.path("wild.pem").display(),
            pki.path("wild.key").display(),
            pki.path("rsa.pem").display(),
            pki.path("rsa.key").display(),
            pki.path("ec-chain.pem").display(),
            pki.path("ec.key").display(),
        ),
        extra: "[http2]\nenabled = false\n".into(),
        ..Default::default()
    });
    let ca = pki.path("ca.pem");
    let ca = ca.to_str().expect("path");
    for version in ["-tls1_3", "-tls1_2"] {
        for (sigalgs, bits) in [
            (Some("ECDSA+SHA256"), 256),
            (Some("RSA-PSS+SHA256:RSA+SHA256"), 2048),
            // PKCS#1 RSA is no TLS 1.3 handshake signature: the ECDSA pair, which
            // this client can verify over either version.
            (Some("RSA+SHA256:ECDSA+SHA256"), 256),
            (None, 2048),
        ] {
            let mut args = vec![version, "-CAfile", ca, "-servername", "localhost"];
            if let Some(sigalgs) = sigalgs {
                args.extend(["-sigalgs", sigalgs]);
            }
            let out = s_client(w.port, &args, REQ);
            let case = format!("{version} {sigalgs:?}");
            assert!(
                out.contains(&format!("Server public key is {bits} bit")),
                "{case}: {out}"
            );
            assert!(out.contains("Verify return code: 0 (ok)"), "{case}: {out}");
            assert!(out.contains("HTTP/1.1 200"), "{case}: {out}");
        }
    }
}

#[test]
fn openssl_handshake_matrix_alpn_sni_and_resumption() {
    let pki = Pki::new();
    let up = Upstream::start();
    // Two cores: resumption must work whichever core the second connection lands on.
    // The HTTP/1.1-only frontend (HTTP/2 off); with it on, see tests/http2.rs.
    let w = Worker::start(WorkerOpts {
        cores: 2,
        upstreams: vec![up.addr],
        worker_extra: pki.worker_lines(),
        extra: "[http2]\nenabled = false\n".into(),
        ..Default::default()
    });
    let ca = pki.path("ca.pem");
    let ca = ca.to_str().expect("path");
    for (flag, want) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let out = s_client(
            w.port,
            &[
                flag,
                "-CAfile",
                ca,
                "-servername",
                "localhost",
                "-alpn",
                "h2,http/1.1",
            ],
            REQ,
        );
        assert!(
            out.contains(&format!("Protocol  : {want}")) || out.contains(&format!(", {want},")),
            "{flag}: {out}"
        );
        assert!(out.contains("ALPN protocol: http/1.1"), "{out}");
        assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
        assert!(out.contains("HTTP/1.1 200"), "{out}");
    }
    // Only h2 offered: refused (no_application_protocol), nothing served.
    let out = s_client(w.port, &["-tls1_3", "-alpn", "h2"], REQ);
    assert!(!out.contains("HTTP/1.1 200"), "{out}");
    // SNI picks the wildcard pair; other names get the default certificate.
    let out = s_client(
        w.port,
        &["-servername", "lab.apps.test", "-CAfile", ca],
        REQ,
    );
    assert!(
        out.contains("CN = *.apps.test") || out.contains("CN=*.apps.test"),
        "{out}"
    );
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    let out = s_client(
        w.port,
        &["-servername", "other.example", "-CAfile", ca],
        REQ,
    );
    assert!(
        out.contains("CN = localhost") || out.contains("CN=localhost"),
        "{out}"
    );
    // Resumption, TLS 1.2 and 1.3: a saved session is reused on a new connection,
    // across many connections (the kernel spreads them over both cores).
    for flag in ["-tls1_2", "-tls1_3"] {
        let sess = pki.path(&format!("sess{flag}"));
        let sess = sess.to_str().expect("path");
        let first = s_client(w.port, &[flag, "-CAfile", ca, "-sess_out", sess], REQ);
        assert!(first.contains("New, "), "{first}");
        for _ in 0..4 {
            let again = s_client(w.port, &[flag, "-CAfile", ca, "-sess_in", sess], REQ);
            assert!(again.contains("Reused, "), "{flag}: {again}");
            assert!(again.contains("HTTP/1.1 200"), "{again}");
        }
    }
    // Each core publishes its counters at its next reactor tick: wait (bounded) for
    // the last resumed handshakes to show.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = w.admin_get("/metrics").text();
        let resumed: u64 = text
            .lines()
            .filter(|l| {
                l.starts_with("appproxy_tls_handshakes_total{") && l.contains("kind=\"resumed\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        if resumed >= 8 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{resumed} resumed handshakes counted: {text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn websocket_over_wss() {
    let pki = Pki::new();
    let app = common::ws::echo_app();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        worker_extra: pki.worker_lines(),
        ..Default::default()
    });
    let s = connect(w.addr(), &pki.default_client(), "localhost").expect("tls");
    let url = format!("wss://localhost:{}/ws", w.port);
    let (mut ws, resp) =
        tungstenite::client(url.as_str(), Uninterrupted(s)).expect("wss handshake");
    assert_eq!(resp.status(), 101);
    for i in 0..20 {
        let text = format!("message {i}");
        ws.send(tungstenite::Message::Text(text.clone().into()))
            .expect("send");
        match ws.read().expect("echo") {
            tungstenite::Message::Text(t) => assert_eq!(t.as_str(), text),
            other => panic!("unexpected {other:?}"),
        }
    }
    let big = vec![7u8; 1 << 20];
    ws.send(tungstenite::Message::Binary(big.clone().into()))
        .expect("send big");
    match ws.read().expect("echo big") {
        tungstenite::Message::Binary(b) => assert_eq!(b.len(), big.len()),
        other => panic!("unexpected {other:?}"),
    }
    ws.close(None).expect("close");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ws.read().is_ok() {
        assert!(std::time::Instant::now() < deadline, "close not answered");
    }
    common::eventually("tunnel closed", || {
        metric(&w, "appproxy_tunnels_active") == 0
    });
}

#[test]
fn raw_tcp_circuit_over_tls() {
    let pki = Pki::new();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                // Speaks first, like SSH.
                let _ = s.write_all(b"BANNER\n");
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read_uninterrupted(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                // After the client's half-close: last words, then close.
                let _ = s.write_all(b"bye");
            });
        }
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        worker_extra: pki.worker_lines(),
        circuit_extra: "protocol = \"tcp\"".into(),
        ..Default::default()
    });
    // No ALPN is imposed on TCP circuits: a client offering only h2 is served.
    let config = pki.client(&[&rustls::version::TLS13], &[b"h2"]);
    let mut s = connect(w.addr(), &config, "localhost").expect("tls");
    let mut banner = [0u8; 7];
    s.read_exact(&mut banner).expect("banner");
    assert_eq!(&banner, b"BANNER\n");
    s.write_all(b"\x00raw\xff bytes").expect("send");
    let mut got = [0u8; 11];
    s.read_exact(&mut got).expect("echo");
    assert_eq!(&got, b"\x00raw\xff bytes");
    // Half-close over TLS: the client's close_notify half-closes the app's side; the
    // app's last words still arrive, then the worker's close_notify (a clean end of
    // stream, not a truncation).
    s.conn.send_close_notify();
    s.conn.complete_io(&mut s.sock).expect("close_notify out");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("clean close");
    assert_eq!(rest, b"bye");
}

#[test]
fn setup_over_https_sets_a_secure_cookie_and_https_redirect() {
    let pki = Pki::new();
    let up = Upstream::start();
    let circuit = "c0a8f5d2-1111-4222-8333-444455556666";
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        extra: "[secrets]\njwt_secret = \"jwt-key\"\npermit_secret = \"PERMIT_HASH_SECRET\"\n".into(),
        worker_extra: format!("{}hostname = \"localhost\"\napi_port = {{AUX_PORT}}\n", pki.worker_lines()),
        circuit_extra: "open_to_public = false\napp_mode = \"interactive\"\nuser_id = \"3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\"".into(),
        ..Default::default()
    });
    let token = appproxy_dataplane::auth::sign_hs256(
        &serde_json::json!({"id": "t", "version": "v2", "redirect": "lab", "circuit": circuit}),
        "jwt-key",
    );
    let api = std::net::SocketAddr::from(([127, 0, 0, 1], w.aux_port));
    let mut s = BufReader::new(connect(api, &pki.default_client(), "localhost").expect("tls"));
    let r = get(&mut s, &format!("/setup?token={token}"), "");
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location").map(str::to_owned),
        Some(format!("https://localhost:{}/lab", w.port))
    );
    let cookie = r.header("set-cookie").expect("cookie");
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    // The cookie opens the circuit over TLS.
    let pair = cookie.split(';').next().expect("pair");
    let mut s = BufReader::new(connect(w.addr(), &pki.default_client(), "localhost").expect("tls"));
    let r = get(&mut s, "/lab", &format!("Cookie: {pair}\r\n"));
    assert_eq!(r.status, 200);
}

#[test]
fn sighup_reloads_certificates_without_dropping_connections() {
    let pki = Pki::new();
    let up = Upstream::start();
    let live = pki.path("live.pem");
    let live_key = pki.path("live.key");
    std::fs::copy(pki.path("ec-chain.pem"), &live).expect("copy");
    std::fs::copy(pki.path("ec.key"), &live_key).expect("copy");
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra: format!(
            "tls_listen = true\ntls_cert = \"{}\"\ntls_privkey = \"{}\"\n",
            live.display(),
            live_key.display()
        ),
        ..Default::default()
    });
    let config = pki.default_client();
    let mut before = BufReader::new(connect(w.addr(), &config, "localhost").expect("tls"));
    assert_eq!(get(&mut before, "/a", "").status, 200);
    let leaf_of = |s: &BufReader<tls_support::TlsStream>| {
        s.get_ref().conn.peer_certificates().expect("certs")[0].to_vec()
    };
    let old_leaf = leaf_of(&before);
    // A broken pair on reload is refused; the served pair stays.
    std::fs::write(&live_key, "not a key").expect("write");
    w.reload(|t| t);
    w.wait_log("refused reload", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("reload refused"))
    });
    let s = connect(w.addr(), &config, "localhost").expect("still serving");
    assert_eq!(
        s.conn.peer_certificates().expect("certs")[0].to_vec(),
        old_leaf
    );
    // Now the RSA pair: new handshakes get it; the open connection keeps working.
    std::fs::copy(pki.path("rsa.pem"), &live).expect("copy");
    std::fs::copy(pki.path("rsa-pkcs1.key"), &live_key).expect("copy");
    w.reload(|t| t);
    w.wait_log("certificates reloaded", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("TLS certificates reloaded"))
    });
    // A fresh client (a resumed session would not carry the certificate again).
    let after = BufReader::new(connect(w.addr(), &pki.default_client(), "localhost").expect("tls"));
    assert_ne!(leaf_of(&after), old_leaf);
    assert_eq!(
        get(&mut before, "/b", "").status,
        200,
        "the open connection survived"
    );
}

/// Runs the worker with `--check-config` on a config with these `[worker]` lines.
fn check_config(worker_lines: &str) -> (bool, String) {
    check_config_with(&format!("[worker]\ncores = 1\n{worker_lines}"))
}

/// Runs the worker with `--check-config` on this config text.
fn check_config_with(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("w.toml");
    std::fs::write(&path, text).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_appproxy-worker"))
        .arg("--config")
        .arg(&path)
        .arg("--check-config")
        .output()
        .expect("run");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn startup_errors_name_the_file() {
    let pki = Pki::new();
    let pair = |cert: &str, key: &str| {
        format!(
            "tls_listen = true\ntls_cert = \"{}\"\ntls_privkey = \"{}\"\n",
            pki.path(cert).display(),
            pki.path(key).display()
        )
    };
    // Every key form loads: PKCS#8 and SEC1 ECDSA, PKCS#8 and PKCS#1 RSA.
    for (cert, key) in [
        ("ec-chain.pem", "ec.key"),
        ("ec-chain.pem", "ec-sec1.key"),
        ("rsa.pem", "rsa.key"),
        ("rsa.pem", "rsa-pkcs1.key"),
    ] {
        let (ok, out) = check_config(&pair(cert, key));
        assert!(ok, "{cert} {key}: {out}");
    }
    // A key that is not the certificate's.
    let (ok, out) = check_config(&pair("rsa.pem", "ec.key"));
    assert!(!ok);
    assert!(
        out.contains("does not match") && out.contains("ec.key") && out.contains("rsa.pem"),
        "{out}"
    );
    // A missing file.
    let (ok, out) = check_config(&pair("missing.pem", "ec.key"));
    assert!(!ok);
    assert!(
        out.contains("missing.pem") && out.contains("cannot read"),
        "{out}"
    );
    // A file that holds no key.
    let (ok, out) = check_config(&pair("ec.pem", "ec.pem"));
    assert!(!ok);
    assert!(
        out.contains("no usable private key") && out.contains("ec.pem"),
        "{out}"
    );
    // A certificate file without certificates.
    let (ok, out) = check_config(&pair("ec.key", "ec.key"));
    assert!(!ok);
    assert!(
        out.contains("no CERTIFICATE") && out.contains("ec.key"),
        "{out}"
    );
    // tls_listen without the files.
    let (ok, out) = check_config("tls_listen = true\n");
    assert!(!ok);
    assert!(out.contains("tls_cert"), "{out}");
}

/// An app serving HTTPS (rustls, blocking) with the test chain: answers every GET
/// with `ok`; counts its connections.
fn https_app(pki: &Pki) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(pki.path("ec-chain.pem"))
        .expect("chain")
        .collect::<Result<Vec<_>, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_file(pki.path("ec.key")).expect("key");
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("config"),
    );
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            counted.fetch_add(1, Ordering::Relaxed);
            let config = config.clone();
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).expect("session");
                let mut s = rustls::StreamOwned::new(conn, stream);
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match s.read_uninterrupted(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        head.drain(..end + 4);
                        if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .and_then(|()| s.flush())
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, conns)
}

/// Turns the harness circuit's route into an HTTPS one (`mode`) by SIGHUP.
fn route_tls(w: &Worker, mode: &str) {
    let before = common::log_count(w, "deployment applied");
    w.reload(|t| {
        let t = t
            .replace(", upstream_tls = \"verify\" }", " }")
            .replace(", upstream_tls = \"insecure\" }", " }");
        t.replace(
            "traffic_ratio = 1.0 }",
            &format!("traffic_ratio = 1.0, upstream_tls = \"{mode}\" }}"),
        )
    });
    common::eventually("deployment applied", || {
        common::log_count(w, "deployment applied") > before
    });
}

#[test]
fn upstream_https_checked_against_the_ca_or_not_when_the_circuit_says_so() {
    let pki = Pki::new();
    let (app, conns) = https_app(&pki);
    // Checked against [upstream] tls_ca (the app's certificate names 127.0.0.1).
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        extra: format!(
            "[upstream]\ntls_ca = \"{}\"\n",
            pki.path("ca.pem").display()
        ),
        ..Default::default()
    });
    route_tls(&w, "verify");
    let mut c = common::Client::connect(w.addr());
    for _ in 0..3 {
        let r = c.get("/over-https", "");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "ok");
    }
    assert_eq!(
        conns.load(Ordering::Relaxed),
        1,
        "the TLS connection to the app is pooled and reused"
    );
    // Checked against the system roots: the test CA is not among them, refused.
    let w2 = Worker::start(WorkerOpts {
        upstreams: vec![app],
        ..Default::default()
    });
    route_tls(&w2, "verify");
    let mut c = common::Client::connect(w2.addr());
    let r = c.get("/unknown-ca", "");
    assert_eq!(r.status, 502, "{}", r.text());
    // Logged by the core's writer, which may come after the answer.
    w2.wait_log("the failed handshake", |v| {
        v["message"] == "upstream TLS handshake failed"
    });
    // The circuit says not to check: served.
    route_tls(&w2, "insecure");
    let mut c = common::Client::connect(w2.addr());
    let r = c.get("/insecure", "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "ok");
    // An unreadable tls_ca fails start-up with the file named.
    let (ok, out) = check_config_with("[upstream]\ntls_ca = \"/nonexistent/ca.pem\"\n");
    assert!(!ok);
    assert!(
        out.contains("/nonexistent/ca.pem") && out.contains("tls_ca"),
        "{out}"
    );
}

/// Two circuits to the same app address, one not checking its certificate and one
/// checking it: a connection the first made is never reused by the second (the
/// pool's key is the address with the TLS mode and server name), so the check
/// holds whatever the other circuit left in the pool.
#[test]
fn a_pooled_app_connection_serves_only_routes_with_the_same_tls() {
    let pki = Pki::new();
    let (app, conns) = https_app(&pki);
    // No [upstream] tls_ca: the system roots, which do not hold the test CA, so
    // "verify" refuses this app.
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        worker_extra: "frontend_mode = \"wildcard\"\nwildcard_domain = \".apps.test\"\nwildcard_traffic_port = {PORT}".into(),
        circuit_extra: format!(
            "open_to_public = true\nfrontend_mode = \"wildcard\"\nsubdomain = \"lax\"\n\n[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455550002\"\nfrontend_mode = \"wildcard\"\nsubdomain = \"strict\"\nopen_to_public = true\nroute_info = [{{ upstream_tls = \"verify\", session_id = \"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\", kernel_host = \"127.0.0.1\", kernel_port = {} }}]\n",
            app.port()
        ),
        ..Default::default()
    });
    // The first circuit's route becomes "insecure" (the second's is written so
    // that this rewrite leaves it alone).
    route_tls(&w, "insecure");
    let mut c = common::Client::connect(w.addr());
    let mut get = |host: &str| {
        c.send(format!("GET /{host} HTTP/1.1\r\nHost: {host}.apps.test\r\n\r\n").as_bytes());
        c.response()
    };
    assert_eq!(
        get("strict").status,
        502,
        "the app's certificate is not trusted"
    );
    assert_eq!(get("lax").status, 200);
    // The lax circuit's connection is pooled now; the strict one must not take it.
    let r = get("strict");
    assert_eq!(
        r.status,
        502,
        "served over an unchecked connection: {}",
        r.text()
    );
    assert_eq!(get("lax").status, 200);
    assert_eq!(
        conns.load(Ordering::Relaxed),
        3,
        "two refused handshakes and one connection the lax circuit reused"
    );
}

#[test]
fn a_stalled_upstream_tls_handshake_is_counted_as_a_timeout() {
    // The app accepts TCP and never answers the worker's ClientHello.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = silent.local_addr().expect("addr");
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in silent.incoming().flatten() {
            if held_tx.send(s).is_err() {
                return;
            }
        }
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        extra: "[timeouts]\nupstream_connect_secs = 1\n".into(),
        ..Default::default()
    });
    route_tls(&w, "insecure");
    let r = common::Client::connect(w.addr()).get("/stalled", "");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["code"], "upstream_connect_failed");
    // The app did get the connection (and the ClientHello) and said nothing.
    let mut held = held_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the worker connected to the app");
    let mut hello = [0u8; 1];
    held.read_exact(&mut hello).expect("a ClientHello arrived");
    assert_eq!(hello[0], 0x16, "a TLS handshake record");
    // Logged by the core's writer, which may come after the answer.
    w.wait_log("the failed handshake", |v| {
        v["message"] == "upstream TLS handshake failed"
    });
    // Counted by kind: the TLS handshake to the app, not the TCP connect.
    let line = |kind: &str| format!("appproxy_timeouts_total{{core=\"0\",kind=\"{kind}\"}} ");
    let value = |text: &str, kind: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(&line(kind)))
            .and_then(|v| v.trim().parse().ok())
    };
    common::eventually("the upstream TLS handshake timeout is counted", || {
        value(&w.admin_get("/metrics").text(), "upstream_tls_handshake") == Some(1)
    });
    let text = w.admin_get("/metrics").text();
    assert_eq!(value(&text, "upstream_connect"), Some(0), "{text}");
    assert_eq!(value(&text, "tls_handshake"), Some(0), "{text}");
}

#[test]
fn websocket_with_tls_on_both_sides() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pki = Pki::new();
    // A WebSocket echo app that serves wss itself.
    let chain = CertificateDer::pem_file_iter(pki.path("ec-chain.pem"))
        .expect("chain")
        .collect::<Result<Vec<_>, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_file(pki.path("ec.key")).expect("key");
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("config"),
    );
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).expect("session");
                let Ok(mut ws) = tungstenite::accept(rustls::StreamOwned::new(conn, stream)) else {
                    return;
                };
                while let Ok(m) = ws.read() {
                    if (m.is_text() || m.is_binary()) && ws.send(m).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        worker_extra: pki.worker_lines(),
        extra: format!(
            "[upstream]\ntls_ca = \"{}\"\n",
            pki.path("ca.pem").display()
        ),
        ..Default::default()
    });
    route_tls(&w, "verify");
    let s = connect(w.addr(), &pki.default_client(), "localhost").expect("tls");
    let url = format!("wss://localhost:{}/ws", w.port);
    let (mut ws, resp) =
        tungstenite::client(url.as_str(), Uninterrupted(s)).expect("wss handshake");
    assert_eq!(resp.status(), 101);
    for i in 0..20 {
        let text = format!("both sides {i}");
        ws.send(tungstenite::Message::Text(text.clone().into()))
            .expect("send");
        match ws.read().expect("echo") {
            tungstenite::Message::Text(t) => assert_eq!(t.as_str(), text),
            other => panic!("unexpected {other:?}"),
        }
    }
    let big = vec![9u8; 1 << 20];
    ws.send(tungstenite::Message::Binary(big.clone().into()))
        .expect("send big");
    match ws.read().expect("echo big") {
        tungstenite::Message::Binary(b) => assert_eq!(b, big),
        other => panic!("unexpected {other:?}"),
    }
    ws.close(None).expect("close");
}

/// `[timeouts] head_secs` bounds a connection from its accept to its first request
/// head, the TLS handshake included (nginx's `client_header_timeout`): a handshake
/// completed late does not start the request's head timeout afresh. The handshake
/// at 1.2 s and part of a head: by 2.2 s (the timeout is 2 s) the 408 is there;
/// a new timeout from the handshake would have waited for the rest until 3.2 s.
#[test]
fn the_head_timeout_runs_from_the_accept_through_the_handshake() {
    let pki = Pki::new();
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra: pki.worker_lines(),
        extra: "[timeouts]\nhead_secs = 2\n".into(),
        ..Default::default()
    });
    let tcp = TcpStream::connect(w.addr()).expect("connect");
    let accepted = Instant::now();
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    common::sleep_until(accepted + Duration::from_millis(1200));
    let mut s = tls_support::handshake(tcp, &pki.default_client(), "localhost")
        .expect("a handshake within the head timeout");
    s.write_all(b"GET /slow HTTP/1.1\r\n")
        .expect("part of a head");
    common::sleep_until(accepted + Duration::from_millis(2200));
    // The rest of the head only when nothing came by then.
    let got = match sent_within(&mut s, Duration::from_millis(800)) {
        Some(early) => early,
        None => {
            let _ = s.write_all(b"Host: t\r\n\r\n");
            read_to_close(&mut s)
        }
    };
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert_eq!(up.count(), 0);
}

/// The API port (`/setup`) over TLS has the frontends' one head timeout from the
/// accept too: a client that finished its handshake late does not get a whole new
/// `[timeouts] head_secs` for its head. The handshake at 3 s and part of a head
/// (the timeout is 4 s): by 5.6 s the worker has closed the connection (the API port
/// closes a late head without an answer); a new timeout from the handshake would
/// have waited for the rest until 7 s and answered it.
#[test]
fn the_api_port_head_timeout_runs_from_the_accept_through_the_handshake() {
    let pki = Pki::new();
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra: format!(
            "{}hostname = \"localhost\"\napi_port = {{AUX_PORT}}\n",
            pki.worker_lines()
        ),
        extra: "[timeouts]\nhead_secs = 4\n".into(),
        ..Default::default()
    });
    let api = std::net::SocketAddr::from(([127, 0, 0, 1], w.aux_port));
    let tcp = TcpStream::connect(api).expect("connect");
    let accepted = Instant::now();
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    common::sleep_until(accepted + Duration::from_millis(3000));
    let mut s = tls_support::handshake(tcp, &pki.default_client(), "localhost")
        .expect("a handshake within the head timeout");
    s.write_all(b"GET /status HTTP/1.1\r\n")
        .expect("part of a head");
    common::sleep_until(accepted + Duration::from_millis(5600));
    // The rest of the head only when the connection is still open.
    let early = sent_within(&mut s, Duration::from_millis(400));
    let closed = early.as_ref().is_some_and(Vec::is_empty);
    let mut got = early.unwrap_or_default();
    if !closed {
        let _ = s.write_all(b"Host: localhost\r\n\r\n");
        got.extend(read_to_close(&mut s));
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        closed && got.is_empty(),
        "the head completed after the head timeout from the accept was served: {text}"
    );
}

/// What the worker sent through TLS within `wait` (its session tickets are not an
/// answer, so the raw socket cannot be peeked): the bytes of the first read, empty
/// when it closed the connection (or the read failed), `None` when nothing came.
fn sent_within(s: &mut tls_support::TlsStream, wait: Duration) -> Option<Vec<u8>> {
    s.sock.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = vec![0u8; 4096];
    let sent = match s.read_uninterrupted(&mut buf) {
        Ok(n) => {
            buf.truncate(n);
            Some(buf)
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(_) => Some(Vec::new()),
    };
    s.sock
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    sent
}

/// Reads through TLS until the worker closes (or the 20 s read timeout).
fn read_to_close(s: &mut tls_support::TlsStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = s.read_uninterrupted(&mut buf) {
        got.extend_from_slice(&buf[..n]);
    }
    got
}
