//! HTTP/2 on the worker with real clients: `curl --http2-prior-knowledge` (h2c) and
//! `curl --http2` over TLS (ALPN `h2`), streams to HTTP/1.1 apps with the HTTP/1.1
//! treatment (request IDs, forwarding headers, cookies, access lines, the
//! connection's line naming its streams), access control per stream, `http2`
//! circuits proxied end to end over HTTP/2 (the app here is a second worker, which
//! serves h2c), the gRPC answer to a dead app (`grpc-status: 14`), and interim
//! responses (103s from HTTP/1.1 and HTTP/2 apps relayed, at most a few; `100
//! Continue` answered to `expect: 100-continue`).

mod common;
mod lenient;
#[path = "common/tls.rs"]
mod tls_support;

use std::process::{Command, Output};

use common::{Client, Upstream, Worker, WorkerOpts};
use tls_support::{connect, Pki};

/// Runs curl with `args`; panics (naming the tool) when it cannot start.
fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
        .expect("curl must be installed (.ci/run installs it)")
}

/// Runs curl with `args`, feeding `input` on stdin (`-T -` sends it without a
/// length).
fn curl_stdin(args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("curl must be installed (.ci/run installs it)");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().expect("curl output");
    let _ = feeder.join();
    out
}

/// A file holding `bytes`, for `--data-binary @file`.
fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
    use std::io::Write;
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(bytes).expect("write");
    f
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A port nobody listens on.
fn dead_port() -> u16 {
    appproxy_test_support::free_port()
}

/// An HTTP/2 stream from a trusted proxy names its client as an HTTP/1.1 request
/// does: `X-Forwarded-For` read from its right end past the trusted addresses (here
/// a CDN's), `X-Real-IP` and the access line that client, the whole list forwarded;
/// a list that names no client is refused before the app.
#[test]
fn an_http2_stream_from_a_trusted_proxy_names_the_client_its_chain_gives() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra: "trusted_proxies = [\"127.0.0.1/32\", \"192.0.2.0/24\"]".into(),
        ..Default::default()
    });
    let url = format!("http://127.0.0.1:{}/chain", w.port);
    let send = |id: &str, list: &str| {
        curl(&[
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("x-backend-request-id: {id}"),
            "-H",
            &format!("x-forwarded-for: {list}"),
            &url,
        ])
    };
    let out = send("h2-chain-1", "6.6.6.6, 7.7.7.7, 192.0.2.7");
    assert_eq!(
        text(&out),
        "200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = up.last();
    assert_eq!(seen.header("x-real-ip"), Some("7.7.7.7"));
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("6.6.6.6, 7.7.7.7, 192.0.2.7, 127.0.0.1")
    );
    assert_eq!(w.wait_access_line("h2-chain-1")["client"], "7.7.7.7");
    let before = up.count();
    let out = send("h2-chain-2", "7.7.7.7, unknown");
    assert_eq!(text(&out), "400");
    assert_eq!(up.count(), before, "nothing reaches the app");
}

#[test]
fn h2c_prior_knowledge_streams_get_the_http1_treatment() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        ..Default::default()
    });
    let given = "0b3c5a0e-8f4d-4c9b-a1e2-3f4a5b6c7d8e";
    let url = format!("http://127.0.0.1:{}/hello?a=1", w.port);
    let out = curl(&[
        "--http2-prior-knowledge",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-H",
        &format!("x-request-id: {given}"),
        "-H",
        "x-real-ip: 6.6.6.6",
        "-H",
        "x-forwarded-for: 7.7.7.7",
        "-H",
        "cookie: a=1",
        "-H",
        "cookie: b=2",
        &url,
    ]);
    let head = text(&out);
    assert!(
        out.status.success(),
        "{head} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(head.starts_with("HTTP/2 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("x-backend-request-id: {given}")),
        "{head}"
    );
    let seen = up.last();
    assert_eq!(seen.path, "/hello?a=1");
    assert_eq!(seen.header("x-backend-request-id"), Some(given));
    assert_eq!(seen.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.headers_named("cookie"), vec!["a=1; b=2"]);
    assert_eq!(seen.header("host"), Some(&*format!("127.0.0.1:{}", w.port)));
    let line = w.wait_access_line(given);
    assert_eq!(line["status"], 200);
    assert_eq!(line["path"], "/hello");
    assert_eq!(line["client"], "127.0.0.1", "{line}");

    // Two streams on one connection: one ID each, both named on the connection line.
    // (nghttp: curl 7.88 fails its second prior-knowledge transfer on a reused
    // connection against any server, nginx included.)
    let out = Command::new("nghttp")
        .args(["-n", "-t", "30"])
        .arg(format!("http://127.0.0.1:{}/one", w.port))
        .arg(format!("http://127.0.0.1:{}/two", w.port))
        .output()
        .expect("nghttp must be installed (.ci/run installs nghttp2-client)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::eventually("the connection line", || {
        w.log_json()
            .iter()
            .any(|v| v["message"] == "http2 connection closed" && v["streams"] == 2)
    });
    let conn_line = w
        .log_json()
        .into_iter()
        .find(|v| v["message"] == "http2 connection closed" && v["streams"] == 2)
        .expect("connection line");
    let ids: Vec<String> = conn_line["stream_ids"]
        .as_str()
        .expect("ids")
        .split(',')
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
    for id in &ids {
        w.wait_access_line(id);
    }

    // A body without a length (chunked to the app) and a large response.
    let out = curl_stdin(
        &[
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-T",
            "-",
            &format!("http://127.0.0.1:{}/upload", w.port),
        ],
        &vec![b'x'; 300_000],
    );
    assert_eq!(text(&out), "200");
    assert_eq!(up.last().body_len, 300_000);
    let out = curl(&[
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
        &format!("http://127.0.0.1:{}/bytes?n=20000000", w.port),
    ]);
    assert_eq!(text(&out), "200 20000000");
    // Chunked trailers become HTTP/2 trailers.
    let out = curl(&[
        "--http2-prior-knowledge",
        "-i",
        &format!("http://127.0.0.1:{}/chunked", w.port),
    ]);
    let t = text(&out);
    assert!(t.contains("hello world"), "{t}");
    assert!(t.to_ascii_lowercase().contains("x-checksum: 42"), "{t}");
    // HTTP/1.1 clients are served as before on the same port.
    let out = curl(&[
        "--http1.1",
        "-w",
        "%{http_version}",
        "-o",
        "/dev/null",
        &url,
    ]);
    assert_eq!(text(&out), "1.1");
}

#[test]
fn h2_over_tls_by_alpn() {
    let pki = Pki::new();
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra: pki.worker_lines(),
        ..Default::default()
    });
    // A browser-like client offers both: h2 is chosen.
    let config = pki.client(&[&rustls::version::TLS13], &[b"h2", b"http/1.1"]);
    let s = connect(w.addr(), &config, "localhost").expect("handshake");
    assert_eq!(s.conn.alpn_protocol(), Some(&b"h2"[..]));
    drop(s);
    let ca = pki.path("ca.pem");
    let url = format!("https://localhost:{}/tls", w.port);
    let out = curl(&[
        "--http2",
        "--cacert",
        ca.to_str().expect("path"),
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{http_code}",
        &url,
    ]);
    assert_eq!(
        text(&out),
        "2 200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = up.last();
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    // HTTP/1.1 over TLS still served.
    let out = curl(&[
        "--http1.1",
        "--cacert",
        ca.to_str().expect("path"),
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{http_code}",
        &url,
    ]);
    assert_eq!(text(&out), "1.1 200");
}

/// Over TLS, HTTP/2 is what ALPN agreed on, never a preface sent after it (RFC
/// 9113 §3.3, as nginx does): a connection that agreed on http/1.1, or on nothing,
/// is HTTP/1.1, and the preface is a request line naming version 2.0 (505).
#[test]
fn over_tls_a_preface_after_alpn_chose_http1_is_an_http1_request() {
    use std::io::{Read, Write};
    let pki = Pki::new();
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra: pki.worker_lines(),
        ..Default::default()
    });
    let offers: [&[&[u8]]; 2] = [&[b"http/1.1"], &[]];
    for alpn in offers {
        let config = pki.client(&[&rustls::version::TLS13], alpn);
        let mut s = connect(w.addr(), &config, "localhost").expect("handshake");
        let agreed = s.conn.alpn_protocol().map(<[u8]>::to_vec);
        assert_ne!(agreed.as_deref(), Some(&b"h2"[..]));
        // The preface and an empty SETTINGS frame, as an h2 client with prior
        // knowledge sends them.
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        s.write_all(&wire).expect("send");
        s.flush().expect("flush");
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        // Until the worker closes (it does after a 505), or a head is in hand.
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
        let head = String::from_utf8_lossy(&got[..got.len().min(200)]).into_owned();
        assert!(
            head.starts_with("HTTP/1.1 505"),
            "ALPN {agreed:?}: answered {head:?}"
        );
        assert_eq!(up.count(), 0, "nothing reaches the app");
    }
}

#[test]
fn access_control_applies_per_stream() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        circuit_extra: "allowed_client_ips = [\"10.1.2.0/24\"]".into(),
        ..Default::default()
    });
    let out = curl(&[
        "--http2-prior-knowledge",
        "-i",
        &format!("http://127.0.0.1:{}/secret", w.port),
    ]);
    let t = text(&out);
    assert!(t.starts_with("HTTP/2 403"), "{t}");
    let id = t
        .lines()
        .find_map(|l| l.strip_prefix("x-backend-request-id: "))
        .expect("request id header")
        .trim()
        .to_owned();
    let body: serde_json::Value =
        serde_json::from_str(t.rsplit("\r\n\r\n").next().expect("body")).expect("json");
    assert_eq!(body["code"], "forbidden");
    assert_eq!(body["request_id"], id.as_str());
    assert_eq!(up.count(), 0, "nothing reached the app");
    assert_eq!(w.wait_access_line(&id)["status"], 403);
}

#[test]
fn grpc_circuit_with_a_dead_app_answers_unavailable() {
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], dead_port()));
    let w = Worker::start(WorkerOpts {
        upstreams: vec![dead],
        circuit_extra: "protocol = \"grpc\"".into(),
        ..Default::default()
    });
    // No body: when the answer ends the stream before the request body arrived, the
    // rest of the request is reset (RFC 9113 §8.1), which curl 7.88 at times reports
    // as "Stream error in the HTTP/2 framing layer" (grpcio does not:
    // tests/grpc.rs sends a message to a dead app).
    let out = curl(&[
        "--http2-prior-knowledge",
        "-i",
        "-X",
        "POST",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        &format!("http://127.0.0.1:{}/pkg.Svc/Call", w.port),
    ]);
    let t = text(&out).to_ascii_lowercase();
    assert!(
        t.starts_with("http/2 200"),
        "{t} {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.log_text()
    );
    assert!(t.contains("content-type: application/grpc"), "{t}");
    assert!(t.contains("grpc-status: 14"), "{t}");
    let id = t
        .lines()
        .find_map(|l| l.strip_prefix("x-backend-request-id: "))
        .expect("request id header")
        .trim()
        .to_owned();
    let message = t
        .lines()
        .find_map(|l| l.strip_prefix("grpc-message: "))
        .expect("grpc-message");
    assert!(message.contains(&id), "{message}");
    assert!(!t.contains("{\"error\""), "no HTTP error page: {t}");
}

#[test]
fn http2_circuit_is_proxied_over_http2_end_to_end() {
    let up = Upstream::start();
    // The app speaks HTTP/2 only: a second worker serving h2c in front of `up`.
    let app = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        ..Default::default()
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr()],
        circuit_extra: "protocol = \"http2\"".into(),
        ..Default::default()
    });
    let given = "1b3c5a0e-8f4d-4c9b-a1e2-3f4a5b6c7d8e";
    let base = format!("http://127.0.0.1:{}", w.port);
    let out = curl(&[
        "--http2-prior-knowledge",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-H",
        &format!("x-request-id: {given}"),
        &format!("{base}/e2e"),
    ]);
    let head = text(&out);
    assert!(head.starts_with("HTTP/2 200"), "{head}");
    // The app (the second worker) got the request over HTTP/2, with the ID.
    let line = app.wait_access_line(given);
    assert_eq!(line["status"], 200);
    assert!(app
        .log_json()
        .iter()
        .any(|v| v["message"] == "http2 connection closed" || v["target"] == "access"));
    assert_eq!(up.last().header("x-backend-request-id"), Some(given));
    // HTTP/1.1 clients of an http2 circuit are bridged: the app gets HTTP/2 streams.
    let streams_before = common::metric(&app, "appproxy_http2_streams_total");
    let out = curl(&[
        "--http1.1",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
        &format!("{base}/bytes?n=5000000"),
    ]);
    assert_eq!(text(&out), "200 5000000");
    let upload = file_with(&vec![b'u'; 3_000_000]);
    let out = curl(&[
        "--http1.1",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--data-binary",
        &format!("@{}", upload.path().display()),
        &format!("{base}/upload1"),
    ]);
    assert_eq!(text(&out), "200");
    assert_eq!(up.last().body_len, 3_000_000);
    let out = curl_stdin(
        &[
            "--http1.1",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-T",
            "-",
            &format!("{base}/upload-chunked"),
        ],
        &vec![b'c'; 200_000],
    );
    assert_eq!(text(&out), "200");
    assert_eq!(up.last().body_len, 200_000);
    let out = curl(&["--http1.1", "-sS", &format!("{base}/chunked")]);
    assert_eq!(text(&out), "hello world");
    common::eventually("the app saw HTTP/2 streams", || {
        common::metric(&app, "appproxy_http2_streams_total") >= streams_before + 4
    });
    // Large bodies both ways, and trailers end to end.
    let out = curl(&[
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
        &format!("{base}/bytes?n=20000000"),
    ]);
    assert_eq!(text(&out), "200 20000000");
    let body = file_with(&vec![b'y'; 2_000_000]);
    let data = format!("@{}", body.path().display());
    let out = curl(&[
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--data-binary",
        &data,
        &format!("{base}/upload2"),
    ]);
    assert_eq!(text(&out), "200");
    assert_eq!(up.last().body_len, 2_000_000);
    let out = curl(&["--http2-prior-knowledge", "-i", &format!("{base}/chunked")]);
    let t = text(&out).to_ascii_lowercase();
    assert!(
        t.contains("hello world") && t.contains("x-checksum: 42"),
        "{t}"
    );
}

#[test]
fn h2load_many_streams_over_h2c_and_tls() {
    let pki = Pki::new();
    let up = Upstream::start();
    let plain = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        ..Default::default()
    });
    let tls = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra: pki.worker_lines(),
        ..Default::default()
    });
    for url in [
        format!("http://127.0.0.1:{}/load", plain.port),
        format!("https://127.0.0.1:{}/load", tls.port),
    ] {
        // 8 connections × 10 concurrent streams, 2,000 requests.
        let out = Command::new("h2load")
            .args(["-n", "2000", "-c", "8", "-m", "10", "-T", "30"])
            .arg(&url)
            .output()
            .expect("h2load must be installed (.ci/run installs nghttp2-client)");
        let t = text(&out);
        assert!(
            t.contains("2000 succeeded, 0 failed, 0 errored, 0 timeout"),
            "{url}: {t} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(t.contains("status codes: 2000 2xx"), "{url}: {t}");
    }
}

/// Runs `nghttp -v` with `args` and returns what it printed.
fn nghttp_verbose(args: &[&str]) -> String {
    let out = Command::new("nghttp")
        .args(["-v", "-t", "30"])
        .args(args)
        .output()
        .expect("nghttp must be installed (.ci/run installs nghttp2-client)");
    text(&out)
}

/// How many of the heads nghttp received name `id` as their request ID.
fn heads_naming(verbose: &str, id: &str) -> usize {
    verbose
        .lines()
        .filter(|l| l.contains("recv (stream_id="))
        .filter(|l| l.ends_with(&format!("x-backend-request-id: {id}")))
        .count()
}

/// The `:status` values of the response heads nghttp received, in order.
fn statuses(verbose: &str) -> Vec<String> {
    verbose
        .lines()
        .filter(|l| l.contains("recv (stream_id="))
        .filter_map(|l| l.split_once(":status: "))
        .map(|(_, v)| v.trim().to_owned())
        .collect()
}

/// Reads raw frames until stream `id` ends its answer (a DATA frame with
/// `END_STREAM`): the `:status` of its last head and its body. Panics when the
/// connection ends or nothing comes within the read timeout.
fn stream_answer(s: &mut std::net::TcpStream, id: u32) -> (Option<u16>, Vec<u8>) {
    use appproxy_test_support::h2frames::{read_frame, status, DATA, END_STREAM, HEADERS};
    let (mut head, mut body) = (None, Vec::new());
    loop {
        let (ty, flags, stream, payload) = read_frame(s).expect("the stream's answer");
        match ty {
            HEADERS if stream == id => head = Some(status(&payload)),
            DATA if stream == id => {
                body.extend_from_slice(&payload);
                if flags & END_STREAM != 0 {
                    return (head, body);
                }
            }
            _ => {}
        }
    }
}

/// An HTTP/2 app's interim heads reach HTTP/2 clients sanitized as its final
/// ones: its `Set-Cookie` of the worker's permit and its request IDs (under every
/// name of the ID) stay behind; so do the final head's, to HTTP/1.1 clients too.
#[test]
fn an_http2_apps_interim_heads_plant_no_permit_cookie() {
    use appproxy_test_support::h2frames::{
        block, frame, serve_raw_app, DATA, END_HEADERS, END_STREAM, HEADERS,
    };
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                serve_raw_app(s, |&(ty, flags, id, _)| {
                    if !((ty == HEADERS || ty == DATA) && flags & END_STREAM != 0) {
                        return Vec::new();
                    }
                    let early = block(&[
                        (b":status", b"103"),
                        (b"link", b"</style.css>; rel=preload"),
                        (b"set-cookie", b"appproxy_permit=planted; Path=/"),
                        (b"x-backend-request-id", b"spoofed-by-app"),
                        (b"x-request-id", b"spoofed-by-app"),
                        (b"x-backendai-requestid", b"spoofed-by-app"),
                    ]);
                    let last = block(&[
                        (b":status", b"200"),
                        (b"x-request-id", b"spoofed-by-app"),
                        (b"x-backendai-requestid", b"spoofed-by-app"),
                    ]);
                    [
                        frame(HEADERS, END_HEADERS, id, &early),
                        frame(HEADERS, END_HEADERS | END_STREAM, id, &last),
                    ]
                    .concat()
                })
            });
        }
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        circuit_extra: "protocol = \"http2\"".into(),
        ..Default::default()
    });
    let out = nghttp_verbose(&[&format!("http://127.0.0.1:{}/early", w.port)]);
    assert_eq!(statuses(&out), ["103", "200"], "{out}");
    assert!(out.contains("rel=preload"), "{out}");
    assert!(
        !out.contains("planted") && !out.contains("spoofed-by-app"),
        "{out}"
    );
    // An HTTP/1.1 client of the same app (the bridge): its final head carries the
    // worker's request ID only.
    let mut c = Client::connect(w.addr());
    let r = c.get("/early", "X-Backend-Request-ID: client-id-7\r\n");
    assert_eq!(r.status, 200);
    for name in ["x-request-id", "x-backendai-requestid"] {
        assert_eq!(r.header(name), None, "{name}: {:?}", r.headers);
    }
    assert_eq!(r.headers_named("x-backend-request-id"), vec!["client-id-7"]);
}

/// A 101 from an HTTP/2 app (HTTP/2 has none, RFC 9113 §8.6) is refused as one
/// from an HTTP/1.1 app is: the HTTP/2 client gets the relay's 502, never an
/// interim 101 it would take for a malformed answer (before, it was relayed, and
/// curl and nghttp failed the stream with PROTOCOL_ERROR).
#[test]
fn a_101_from_an_http2_app_is_refused() {
    use appproxy_test_support::h2frames::{
        block, frame, serve_raw_app, DATA, END_HEADERS, END_STREAM, HEADERS,
    };
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                serve_raw_app(s, |&(ty, flags, id, _)| {
                    if !((ty == HEADERS || ty == DATA) && flags & END_STREAM != 0) {
                        return Vec::new();
                    }
                    [
                        frame(HEADERS, END_HEADERS, id, &block(&[(b":status", b"101")])),
                        frame(
                            HEADERS,
                            END_HEADERS | END_STREAM,
                            id,
                            &block(&[(b":status", b"200")]),
                        ),
                    ]
                    .concat()
                })
            });
        }
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        circuit_extra: "protocol = \"http2\"".into(),
        ..Default::default()
    });
    let out = nghttp_verbose(&[&format!("http://127.0.0.1:{}/switch", w.port)]);
    assert_eq!(statuses(&out), ["502"], "{out}");
}

#[test]
fn interim_responses_reach_http2_clients() {
    let app = lenient::LenientApp::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        ..Default::default()
    });
    // Two 103 Early Hints from the HTTP/1.1 app, then the final answer: each under
    // the request's ID (a client that stops at an interim head has it to quote).
    let out = nghttp_verbose(&[
        "-H",
        "x-backend-request-id: h2-interim-1",
        &format!("http://127.0.0.1:{}/interim?n=2", w.port),
    ]);
    assert_eq!(statuses(&out), ["103", "103", "200"], "{out}");
    assert_eq!(heads_naming(&out, "h2-interim-1"), 3, "{out}");
    assert_eq!(
        out.matches("link: </style.css>; rel=preload").count(),
        2,
        "{out}"
    );
    assert!(out.contains("final"), "{out}");
    // Their permit cookie and request ID stay with the app.
    assert!(
        !out.contains("planted") && !out.contains("spoofed-by-app"),
        "{out}"
    );
    // A flood of them: a few relayed, then the exchange is refused.
    let out = nghttp_verbose(&[&format!("http://127.0.0.1:{}/interim?n=20000", w.port)]);
    let seen = statuses(&out);
    let interim = seen.iter().filter(|s| *s == "103").count();
    assert!((1..=5).contains(&interim), "{interim} relayed: {out}");
    assert_eq!(seen.last().map(String::as_str), Some("502"), "{out}");
    // Said as to an HTTP/1.1 client: HTTP/2 carries interim heads, the flood is
    // what is refused (it said "interim response not relayable over HTTP/2").
    assert!(out.contains("too many interim responses"), "{out}");
    // `expect: 100-continue`: the worker answers 100 once the request passed its
    // checks (nghttp holds its DATA until then), and the body reaches the app.
    let body = file_with(&[b'b'; 3000]);
    let path = body.path().to_string_lossy().into_owned();
    let out = nghttp_verbose(&[
        "--expect-continue",
        "-H",
        "x-backend-request-id: h2-continue-1",
        "-d",
        &path,
        &format!("http://127.0.0.1:{}/upload", w.port),
    ]);
    assert_eq!(statuses(&out), ["100", "200"], "{out}");
    assert_eq!(heads_naming(&out, "h2-continue-1"), 2, "{out}");
    assert_eq!(app.request("/upload").body.len(), 3000);
    assert!(out.contains("\"body_len\":3000"), "{out}");
    // From an HTTP/2 app (here the worker above, serving h2c and relaying the
    // lenient app's 103s) through an `http2` circuit: relayed as they come.
    let front = Worker::start(WorkerOpts {
        upstreams: vec![w.addr()],
        circuit_extra: "protocol = \"http2\"".into(),
        ..Default::default()
    });
    let out = nghttp_verbose(&[
        "-H",
        "x-backend-request-id: h2-front-1",
        &format!("http://127.0.0.1:{}/interim?n=2", front.port),
    ]);
    assert_eq!(statuses(&out), ["103", "103", "200"], "{out}");
    assert_eq!(heads_naming(&out, "h2-front-1"), 3, "{out}");
    assert_eq!(
        out.matches("link: </style.css>; rel=preload").count(),
        2,
        "{out}"
    );
    assert!(out.contains("final"), "{out}");
}

/// A stream refused before its head is rendered (two `host` fields and no
/// `:authority`, an HTTP/1.1 400) keeps the client's request ID and trace: on the
/// answer's access line and on the "refused" log line, as HTTP/1.1 refusals do
/// (the trace: before, none).
#[test]
fn a_stream_refused_early_keeps_the_clients_request_id() {
    use appproxy_test_support::h2frames::{
        block, connect, frame, END_HEADERS, END_STREAM, HEADERS,
    };
    use std::io::Write;
    let app = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        ..Default::default()
    });
    let mut s = connect(w.addr());
    let head = block(&[
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/two-hosts"),
        (b"host", b"a.test"),
        (b"host", b"b.test"),
        (b"x-backend-request-id", b"client-id-42"),
        (
            b"traceparent",
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
    ]);
    s.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &head))
        .expect("write");
    let line = w.wait_access_line("client-id-42");
    assert_eq!(line["status"], 400, "{line}");
    assert_eq!(
        line["trace_id"], "0af7651916cd43dd8448eb211c80319c",
        "{line}"
    );
    assert_eq!(line["parent_span_id"], "b7ad6b7169203331", "{line}");
    let refused: Vec<serde_json::Value> = w
        .log_json()
        .into_iter()
        .filter(|v| v["message"] == "HTTP/2 request refused")
        .collect();
    assert!(!refused.is_empty(), "{}", w.log_text());
    assert!(
        refused.iter().all(|v| v["request_id"] == "client-id-42"
            && v["trace_id"] == "0af7651916cd43dd8448eb211c80319c"),
        "{refused:?}"
    );
}

/// The worker's own answer to an HTTP/2 `HEAD` is a head that ends the stream,
/// with no DATA frame (RFC 9110 §9.3.2; a client such as python-h2 treats content
/// on a `HEAD` as a broken stream), `content-length` naming what a `GET` gets.
#[test]
fn a_refused_head_stream_gets_no_data() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        circuit_extra: "allowed_client_ips = [\"10.1.2.0/24\"]".into(),
        ..Default::default()
    });
    let url = format!("http://127.0.0.1:{}/secret", w.port);
    let head = nghttp_verbose(&["-H", ":method: HEAD", &url]);
    assert_eq!(statuses(&head), ["403"], "{head}");
    let frames = |v: &str, kind: &str| {
        v.lines()
            .filter(|l| l.contains(&format!("recv {kind} frame")) && l.contains("stream_id=13"))
            .count()
    };
    assert_eq!(frames(&head, "DATA"), 0, "{head}");
    assert!(
        head.lines()
            .skip_while(|l| !(l.contains("recv HEADERS frame") && l.contains("stream_id=13")))
            .nth(1)
            .is_some_and(|l| l.contains("END_STREAM")),
        "the head ends the stream: {head}"
    );
    let get = nghttp_verbose(&[&url]);
    assert_eq!(frames(&get, "DATA"), 1, "{get}");
    let length = |v: &str| {
        v.lines()
            .find_map(|l| l.split_once("content-length: "))
            .map(|(_, n)| n.trim().to_owned())
    };
    assert!(length(&head).is_some(), "{head}");
    assert_eq!(length(&head), length(&get), "{head}\n{get}");
    assert_eq!(up.count(), 0, "nothing reached the app");
}

/// A stream's `:scheme` is its target's scheme (RFC 9113 §8.3.1): one the worker
/// does not serve (`javascript`, `ftp`) is a malformed request, refused before the
/// app as an HTTP/1.1 absolute-form target of another scheme is; `http` and
/// `https` (a TLS front in between) pass. Before, any scheme was taken.
#[test]
fn a_stream_of_another_scheme_is_refused() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        ..Default::default()
    });
    let url = format!("http://127.0.0.1:{}/a", w.port);
    for (scheme, status) in [
        ("javascript", "400"),
        ("ftp", "400"),
        ("http", "200"),
        ("https", "200"),
        // Schemes are case-insensitive (RFC 3986 §3.1).
        ("Https", "200"),
    ] {
        let v = nghttp_verbose(&["-H", &format!(":scheme: {scheme}"), &url]);
        assert_eq!(statuses(&v), [status], "{scheme}: {v}");
    }
    assert_eq!(
        up.count(),
        3,
        "only the http and https streams reach the app"
    );
}

/// An HTTP/1.1 app that refuses a request body (413, 401 …) right after the head and
/// keeps its connection open, reading none of the body, behind an HTTP/2 client: its
/// answer reaches the client at once, whether the worker was writing the body to it
/// (blocked: the app no longer reads) or waiting for the client's next bytes, as on
/// the HTTP/1.1 path. Before, the answer sat unread in the socket: the stalled write
/// or the wait ended at the body timeout in a 502 (a minute later by default).
#[test]
fn an_http2_stream_refused_early_by_an_http1_app_is_answered_at_once() {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    let app = TcpListener::bind("127.0.0.1:0").expect("bind");
    let app_addr = app.local_addr().expect("addr");
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let kept = held.clone();
    std::thread::spawn(move || {
        for conn in app.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let answer: &[u8] = if line.contains("/early-401") {
                b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 8\r\n\r\nwho are?"
            } else if line.contains("/early-200") {
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsaved"
            } else if line.contains("/early-silent") {
                b""
            } else if line.contains("/early-close") {
                // Answered, then closed: the body can never reach it.
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly");
                continue;
            } else {
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!"
            };
            let _ = conn.write_all(answer);
            // Open, and not read from again.
            kept.lock().expect("lock").push(conn);
        }
    });
    // A short body timeout: before, each request below was a 502 after it.
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app_addr],
        extra: "[timeouts]\nbody_idle_secs = 5\n".into(),
        ..Default::default()
    });

    // The body's write blocks: more than the sockets hold, the app reading none.
    // (nghttp: curl 7.88 fails a stream its server ends, as RFC 9113 §8.1 allows,
    // with RST_STREAM(NO_ERROR) while it still uploads.)
    let big = file_with(&vec![b'x'; 64 << 20]);
    let out = nghttp_verbose(&[
        "-d",
        &big.path().display().to_string(),
        &format!("http://127.0.0.1:{}/early-413", w.port),
    ]);
    assert_eq!(statuses(&out), ["413"], "{out}");
    assert!(out.contains("too big!"), "{out}");

    // The worker waits for the client's next bytes; the client waits for an answer
    // before it sends more.
    use appproxy_test_support::h2frames::{connect, frame, request, DATA, END_HEADERS, HEADERS};
    let mut s = connect(w.addr());
    let block = request("POST", "/early-401", &[(b"content-length", b"100000")]);
    s.write_all(&frame(HEADERS, END_HEADERS, 1, &block))
        .expect("headers");
    s.write_all(&frame(DATA, 0, 1, &[b'u'; 10]))
        .expect("first bytes");
    let (head, body) = stream_answer(&mut s, 1);
    assert_eq!(head, Some(401));
    assert_eq!(body, b"who are?");

    let early = "the app answered before taking the whole request body";
    w.wait_log(early, |v| v["message"] == early && v["status"] == 401);
    assert_eq!(w.logged_statuses(early), [413, 401], "{}", w.log_text());
    assert_eq!(
        held.lock().expect("lock").len(),
        2,
        "one app connection each"
    );

    // A success, the app's connection then closed: its answer is all it will say,
    // relayed at once (before: a 408 at the body timeout).
    let block = request("POST", "/early-close", &[(b"content-length", b"100000")]);
    s.write_all(&frame(HEADERS, END_HEADERS, 3, &block))
        .expect("headers");
    s.write_all(&frame(DATA, 0, 3, &[b'u'; 10]))
        .expect("first bytes");
    let (head, body) = stream_answer(&mut s, 3);
    assert_eq!(head, Some(200));
    assert_eq!(body, b"early");

    // A success answered early by an app that then stops reading is relayed once
    // the body's write stalls for `body_idle_secs`; an app that stops reading
    // without answering is a 504. Before, both were a 502 `upstream_closed`.
    let out = nghttp_verbose(&[
        "-d",
        &big.path().display().to_string(),
        &format!("http://127.0.0.1:{}/early-200", w.port),
    ]);
    assert_eq!(statuses(&out), ["200"], "{out}");
    assert!(out.contains("saved"), "{out}");
    let out = nghttp_verbose(&[
        "-d",
        &big.path().display().to_string(),
        &format!("http://127.0.0.1:{}/early-silent", w.port),
    ]);
    assert_eq!(statuses(&out), ["504"], "{out}");
}

/// The HTTP/2 form of `app_attack.rs::a_short_success_seen_by_the_watch_is_read_after_the_body`:
/// a stream whose whole body came, its end (`END_STREAM`) not yet, while the app has
/// answered a short 200. The watch peeks at the answer while the worker waits for
/// the end; the answer is read after it. Before, the peek left the socket marked
/// unreadable with the answer in it: no edge came again, and the stream waited for
/// `upstream_head_secs` (a 504; in CI, under load, a two-worker end-to-end upload
/// whose `END_STREAM` came in a frame of its own hung so).
#[test]
fn an_http1_apps_short_answer_seen_before_the_streams_end_is_relayed() {
    use appproxy_test_support::h2frames::{
        connect, frame, request, DATA, END_HEADERS, END_STREAM, HEADERS,
    };
    use std::io::{Read, Write};
    use std::net::TcpListener;

    let app = TcpListener::bind("127.0.0.1:0").expect("bind");
    let app_addr = app.local_addr().expect("addr");
    let (kept_tx, kept_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = app.accept() else {
            return;
        };
        // The head and the 5 bytes of body, then the answer at once.
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !seen.ends_with(b"hello") {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        let _ = kept_tx.send(conn);
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app_addr],
        extra: "[timeouts]\nupstream_head_secs = 5\n".into(),
        ..Default::default()
    });
    let mut s = connect(w.addr());
    let block = request("POST", "/upload", &[(b"content-length", b"5")]);
    s.write_all(&frame(HEADERS, END_HEADERS, 1, &block))
        .expect("headers");
    s.write_all(&frame(DATA, 0, 1, b"hello")).expect("the body");
    // The app has the body and answers; the worker waits for the stream's end,
    // watching the app.
    let _app_conn = kept_rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the app got the body");
    std::thread::sleep(std::time::Duration::from_millis(300));
    s.write_all(&frame(DATA, END_STREAM, 1, b""))
        .expect("the end");
    let (head, body) = stream_answer(&mut s, 1);
    assert_eq!(head, Some(200));
    assert_eq!(body, b"ok");
}

/// An HTTP/2 app that refuses an HTTP/1.1 client's body (413 at once) and keeps its
/// stream open without granting window beyond the first 64 KiB: its answer reaches
/// the bridged client at once, whether the worker was waiting for the app's window
/// or for the client's next bytes; the client's connection closes after it, the rest
/// of the body unread. Before, the answer waited for the end of the body timeout
/// (here 300 s: past the client's 20 s guard). A success the app begins early is no
/// refusal: the whole body goes on, then its answer.
#[test]
fn an_http2_app_refusing_a_bridged_body_is_answered_at_once() {
    use appproxy_test_support::h2frames::{
        block, frame, serve_raw_app, DATA, END_HEADERS, END_STREAM, HEADERS, RST_STREAM,
        WINDOW_UPDATE,
    };
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = l.local_addr().expect("addr");
    // What the app took of the body it answered with success; whether it does.
    let ok_bytes = Arc::new(AtomicUsize::new(0));
    let took = ok_bytes.clone();
    let succeed = Arc::new(AtomicBool::new(false));
    let succeeds = succeed.clone();
    // Whether the app answers whole, then resets the stream (gRPC's trailers-only
    // answers, a handler that returns without reading the body).
    let then_reset = Arc::new(AtomicBool::new(false));
    let resets = then_reset.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let (took, succeeds, resets) = (took.clone(), succeeds.clone(), resets.clone());
            std::thread::spawn(move || {
                let mut ok_stream = None;
                serve_raw_app(s, |(ty, flags, id, payload)| {
                    if *ty == HEADERS && resets.load(Ordering::Relaxed) {
                        let head = block(&[(b":status", b"200"), (b"content-length", b"4")]);
                        return [
                            frame(HEADERS, END_HEADERS, *id, &head),
                            frame(DATA, END_STREAM, *id, b"done"),
                            frame(RST_STREAM, 0, *id, &0u32.to_be_bytes()),
                        ]
                        .concat();
                    }
                    let path_ok = *ty == HEADERS && succeeds.load(Ordering::Relaxed);
                    if *ty == HEADERS && !path_ok {
                        // Refused at once; the stream is left open, no window given.
                        let head = block(&[(b":status", b"413"), (b"content-length", b"8")]);
                        return [
                            frame(HEADERS, END_HEADERS, *id, &head),
                            frame(DATA, END_STREAM, *id, b"too big!"),
                        ]
                        .concat();
                    }
                    if path_ok {
                        // A success at once; the app reads on, granting window.
                        ok_stream = Some(*id);
                        let head = block(&[(b":status", b"200")]);
                        return frame(HEADERS, END_HEADERS, *id, &head);
                    }
                    let mut out = Vec::new();
                    if *ty == DATA && !payload.is_empty() {
                        // The connection's window is given back for every stream's
                        // DATA; a stream's own only to the stream read on.
                        let n = (payload.len() as u32).to_be_bytes();
                        out.extend(frame(WINDOW_UPDATE, 0, 0, &n));
                        if Some(*id) == ok_stream {
                            took.fetch_add(payload.len(), Ordering::Relaxed);
                            out.extend(frame(WINDOW_UPDATE, 0, *id, &n));
                        }
                    }
                    if *ty == DATA && Some(*id) == ok_stream && flags & END_STREAM != 0 {
                        out.extend(frame(DATA, END_STREAM, *id, b"ok"));
                    }
                    out
                })
            });
        }
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        circuit_extra: "protocol = \"http2\"".into(),
        extra: "[timeouts]\nbody_idle_secs = 300\n".into(),
        ..Default::default()
    });
    let answer_of = |s: &mut std::net::TcpStream| {
        let got = common::read_until_closed(s);
        String::from_utf8_lossy(&got).into_owned()
    };
    // The worker waits for the app's window: 1 MiB, all of it sent at once.
    let mut s = std::net::TcpStream::connect(w.addr()).expect("connect");
    let size = 1 << 20;
    s.write_all(
        format!("POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n").as_bytes(),
    )
    .expect("head");
    let mut writer = s.try_clone().expect("clone");
    let sender = std::thread::spawn(move || writer.write_all(&vec![b'x'; size]).is_ok());
    let got = answer_of(&mut s);
    assert!(got.starts_with("HTTP/1.1 413 "), "{got}");
    assert!(got.ends_with("\r\n\r\ntoo big!"), "{got}");
    assert!(
        got.to_ascii_lowercase().contains("connection: close"),
        "{got}"
    );
    let _ = sender.join();
    // The worker waits for the client's next bytes.
    let mut s = std::net::TcpStream::connect(w.addr()).expect("connect");
    s.write_all(b"POST /some HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\nuuuuuuuuuu")
        .expect("head and ten bytes");
    let got = answer_of(&mut s);
    assert!(got.starts_with("HTTP/1.1 413 "), "{got}");
    // A success begun early: the whole body goes to the app, then the answer.
    succeed.store(true, Ordering::Relaxed);
    let mut c = Client::connect(w.addr());
    c.send(format!("POST /ok HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n").as_bytes());
    let mut writer = c.stream.try_clone().expect("clone");
    let sender = std::thread::spawn(move || writer.write_all(&vec![b'y'; size]).is_ok());
    let r = c.response();
    assert!(sender.join().expect("sender"), "the whole body is taken");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"ok");
    assert_eq!(ok_bytes.load(Ordering::Relaxed), size);
    let mut rest = [0u8; 1];
    c.stream
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .expect("timeout");
    assert!(
        !matches!(c.stream.read(&mut rest), Ok(0)),
        "the connection stays open after a success"
    );
    // A whole success, then the app's reset, while the worker waits for the
    // client's next bytes: relayed at once (before, when the client next sent).
    then_reset.store(true, Ordering::Relaxed);
    let mut s = std::net::TcpStream::connect(w.addr()).expect("connect");
    s.write_all(b"POST /some HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\nuuuuuuuuuu")
        .expect("head and ten bytes");
    let got = answer_of(&mut s);
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
    assert!(got.ends_with("\r\n\r\ndone"), "{got}");
    let early = "the app answered before taking the whole request body";
    w.wait_log(early, |v| v["message"] == early);
}

/// An HTTP/2 app that sends all of the length it announced and then resets its
/// stream `NO_ERROR` in place of ending it (RFC 9113 §8.1 allows it once the answer
/// is complete) gave its whole answer: the bridge relays it as such, and the
/// HTTP/1.1 client's connection goes on. Before, the answer was logged cut and the
/// connection closed. A reset before the announced length is still a cut.
#[test]
fn an_http2_apps_whole_answer_then_a_reset_keeps_the_bridged_connection() {
    use appproxy_test_support::h2frames::{
        block, frame, serve_raw_app, DATA, END_HEADERS, HEADERS, RST_STREAM,
    };
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = l.local_addr().expect("addr");
    // Whether the app announces 8 bytes (and sends 4).
    let cut_short = Arc::new(AtomicBool::new(false));
    let shorts = cut_short.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let shorts = shorts.clone();
            std::thread::spawn(move || {
                serve_raw_app(s, |(ty, _, id, _)| {
                    if *ty != HEADERS {
                        return Vec::new();
                    }
                    let short = shorts.load(Ordering::SeqCst);
                    let length: &[u8] = if short { b"8" } else { b"4" };
                    let head = block(&[(b":status", b"200"), (b"content-length", length)]);
                    [
                        frame(HEADERS, END_HEADERS, *id, &head),
                        frame(DATA, 0, *id, b"done"),
                        frame(RST_STREAM, 0, *id, &0u32.to_be_bytes()),
                    ]
                    .concat()
                })
            });
        }
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        circuit_extra: "protocol = \"http2\"".into(),
        ..Default::default()
    });
    let mut c = Client::connect(w.addr());
    for n in 1..=2 {
        let r = c.get("/whole", &format!("X-Backend-Request-ID: whole-{n}\r\n"));
        assert_eq!((r.status, r.body.as_slice()), (200, &b"done"[..]), "{n}");
        assert_eq!(r.header("connection"), None, "{n}: kept alive");
        let access = w.wait_access_line(&format!("whole-{n}"));
        assert_eq!(access["status"], 200, "{access}");
        assert_eq!(access["bytes_out"], 4, "{access}");
    }
    assert!(w.logged_statuses("response cut").is_empty());
    cut_short.store(true, Ordering::SeqCst);
    c.send(b"GET /short HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: short-1\r\n\r\n");
    let mut got = Vec::new();
    let _ = c.stream.read_to_end(&mut got);
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
    assert!(
        got.ends_with("\r\n\r\ndone"),
        "four bytes of eight, then the close: {got}"
    );
    w.wait_log("response cut", |v| v["message"] == "response cut");
}
