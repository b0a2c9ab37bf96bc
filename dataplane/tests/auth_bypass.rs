//! Hostile suite, class "unauthenticated side doors": on a private circuit (interactive
//! with the permit cookie, inference with a bearer JWT) no request reaches the app
//! without the credential — whatever its method, path, body or `Upgrade`. A genuine
//! CORS preflight (`Origin` + `Access-Control-Request-Method`, no body, no `Upgrade`)
//! is answered by the worker itself. The app here answers `101` to every upgrade, so
//! a request that slipped through would open a tunnel instead of getting the proxy's
//! 401.

mod common;

use appproxy_test_support::net::ReadUninterrupted;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use appproxy_dataplane::auth::{permit_value, sign_hs256, PermitDigest};
use common::{Client, Worker, WorkerOpts};

const CIRCUIT: &str = "c0a8f5d2-1111-4222-8333-444455556666";
const USER: &str = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
const SECRETS: &str =
    "[secrets]\njwt_secret = \"jwt-key\"\npermit_secret = \"PERMIT_HASH_SECRET\"\n";

/// An app that records every request line and answers `101` to any request with an
/// `Upgrade` header (then echoes), `200` to everything else.
struct App {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl App {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind app");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, s);
                });
            }
        });
        Self { addr, seen }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("seen").clone()
    }
}

fn serve(stream: TcpStream, seen: Arc<Mutex<Vec<String>>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut w = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let request_line = line.trim_end().to_owned();
        let (mut upgrade, mut length) = (None, 0u64);
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            if h.trim_end().is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("upgrade:") {
                upgrade = Some(v.trim().to_owned());
            }
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        std::io::copy(&mut (&mut reader).take(length), &mut std::io::sink())?;
        seen.lock().expect("seen").push(request_line.clone());
        if let Some(protocol) = upgrade {
            // Switches to the protocol asked for.
            write!(
                w,
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: {protocol}\r\nConnection: Upgrade\r\n\r\n"
            )?;
            // A raw echo tunnel from here on.
            let mut buf = [0u8; 4096];
            loop {
                let n = reader.read_uninterrupted(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                w.write_all(&buf[..n])?;
            }
        }
        let body = format!("app saw {request_line}");
        // `/plant` tries to set the worker's permit cookie beside one of its own.
        let cookies = if request_line.starts_with("GET /plant ") {
            "Set-Cookie: appproxy_permit=planted; Path=/api\r\nSet-Cookie: theme=dark\r\nset-cookie:  appproxy_permit =x\r\n"
        } else {
            ""
        };
        write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nAccess-Control-Allow-Origin: *\r\n{cookies}\r\n{body}",
            body.len()
        )?;
    }
}

/// A private circuit of each mode, with the header that opens it and the code a
/// request without it gets.
struct Private {
    worker: Worker,
    credential: String,
    missing_code: &'static str,
}

fn private(app: &App, mode: &str) -> Private {
    private_with(app, mode, "")
}

/// [`private`], with `worker_extra` in the worker's `[worker]` section.
fn private_with(app: &App, mode: &str, worker_extra: &str) -> Private {
    let circuit_extra = match mode {
        "interactive" => {
            format!("open_to_public = false\napp_mode = \"interactive\"\nuser_id = \"{USER}\"")
        }
        _ => "open_to_public = false\napp_mode = \"inference\"".to_owned(),
    };
    let worker = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        extra: SECRETS.into(),
        worker_extra: worker_extra.into(),
        circuit_extra,
        ..Default::default()
    });
    let (credential, missing_code) = match mode {
        "interactive" => (
            format!(
                "Cookie: appproxy_permit={}\r\n",
                permit_value(
                    "PERMIT_HASH_SECRET",
                    &USER.parse().expect("uuid"),
                    PermitDigest::Sha256
                )
            ),
            "E20004",
        ),
        _ => (
            format!(
                "Authorization: Bearer {}\r\n",
                sign_hs256(
                    &serde_json::json!({"id": CIRCUIT, "exp": 4_000_000_000u64}),
                    "jwt-key"
                )
            ),
            "E20006",
        ),
    };
    Private {
        worker,
        credential,
        missing_code,
    }
}

/// Sends `bytes` on a fresh connection and checks the proxy's own 401 came back;
/// then that the connection was closed (`closes`: a body was left unread) or still
/// parses requests where the refused one ended (another refusal on it).
fn assert_refused(p: &Private, what: &str, bytes: &[u8], closes: bool) {
    let mut c = Client::connect(p.worker.addr());
    c.send(bytes);
    let r = c.response();
    assert_eq!(r.status, 401, "{what}: {}", r.text());
    let body = r.json();
    assert_eq!(body["code"], p.missing_code, "{what}: {body}");
    assert_eq!(
        Some(body["request_id"].as_str().unwrap_or("")),
        r.header("x-backend-request-id"),
        "{what}"
    );
    if closes {
        assert!(
            c.is_closed(),
            "{what}: the unread body closes the connection"
        );
    } else {
        c.send(b"OPTIONS /next HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(c.response().status, 401, "{what}: the next request on it");
    }
}

/// Every `OPTIONS` that is not a genuine preflight, and every other method, from the
/// issue's list and beyond.
fn hostile_requests() -> Vec<(&'static str, Vec<u8>, bool)> {
    let pf = "Origin: https://evil.example\r\nAccess-Control-Request-Method: DELETE\r\n";
    let ws = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    // (what, bytes, whether the connection must close: a body was left unread)
    vec![
        ("bare OPTIONS", "OPTIONS / HTTP/1.1\r\nHost: t\r\n\r\n".into(), false),
        ("OPTIONS *", "OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n".into(), false),
        (
            "OPTIONS on any path",
            "OPTIONS /api/contents/secret.ipynb?x=1 HTTP/1.1\r\nHost: t\r\n\r\n".into(),
            false,
        ),
        (
            "OPTIONS with Origin only",
            "OPTIONS / HTTP/1.1\r\nHost: t\r\nOrigin: https://evil.example\r\n\r\n".into(),
            false,
        ),
        (
            "OPTIONS with Access-Control-Request-Method only",
            "OPTIONS / HTTP/1.1\r\nHost: t\r\nAccess-Control-Request-Method: GET\r\n\r\n".into(),
            false,
        ),
        (
            "OPTIONS with two Origins",
            format!("OPTIONS / HTTP/1.1\r\nHost: t\r\nOrigin: https://a.example\r\n{pf}\r\n"),
            false,
        ),
        (
            "preflight headers with a Content-Length body",
            format!("OPTIONS / HTTP/1.1\r\nHost: t\r\n{pf}Content-Length: 5\r\n\r\nhello"),
            true,
        ),
        (
            "preflight headers with a chunked body",
            format!(
                "OPTIONS / HTTP/1.1\r\nHost: t\r\n{pf}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            ),
            true,
        ),
        (
            "OPTIONS carrying a smuggled request in its chunked trailer",
            "OPTIONS / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            true,
        ),
        (
            "OPTIONS carrying a DELETE in its body",
            format!(
                "OPTIONS / HTTP/1.1\r\nHost: t\r\n{pf}Content-Length: 37\r\n\r\nDELETE /api/x HTTP/1.1\r\nHost: t\r\n\r\n"
            ),
            true,
        ),
        (
            "preflight headers with Upgrade: websocket",
            format!("OPTIONS /api/kernels/1/channels HTTP/1.1\r\nHost: t\r\n{pf}{ws}\r\n"),
            false,
        ),
        (
            "OPTIONS with Upgrade: websocket",
            format!("OPTIONS /api/kernels/1/channels HTTP/1.1\r\nHost: t\r\n{ws}\r\n"),
            false,
        ),
        (
            "preflight headers with an Upgrade but no Connection: upgrade",
            format!("OPTIONS / HTTP/1.1\r\nHost: t\r\n{pf}Upgrade: h2c\r\n\r\n"),
            false,
        ),
        (
            "preflight headers with Connection: upgrade",
            format!("OPTIONS / HTTP/1.1\r\nHost: t\r\n{pf}Connection: keep-alive, Upgrade\r\n\r\n"),
            false,
        ),
        (
            // The worker strips the fields `Connection` names: the app would see a
            // plain OPTIONS, without what made it a preflight here.
            "preflight headers named hop-by-hop in Connection",
            format!("OPTIONS /api/contents HTTP/1.1\r\nHost: t\r\n{pf}Connection: Origin, Access-Control-Request-Method\r\n\r\n"),
            false,
        ),
        (
            "preflight headers with Connection naming one of them",
            format!("OPTIONS /api/contents HTTP/1.1\r\nHost: t\r\n{pf}Connection: keep-alive, access-control-request-method\r\n\r\n"),
            false,
        ),
        (
            "preflight headers with a method override",
            format!("OPTIONS /api/x HTTP/1.1\r\nHost: t\r\n{pf}X-HTTP-Method-Override: DELETE\r\n\r\n"),
            false,
        ),
        (
            "HTTP/1.0 OPTIONS",
            "OPTIONS / HTTP/1.0\r\n\r\n".into(),
            true,
        ),
        (
            "lowercase options (another method)",
            format!("options / HTTP/1.1\r\nHost: t\r\n{pf}\r\n"),
            false,
        ),
        ("GET", "GET / HTTP/1.1\r\nHost: t\r\n\r\n".into(), false),
        (
            "GET with preflight headers",
            format!("GET / HTTP/1.1\r\nHost: t\r\n{pf}\r\n"),
            false,
        ),
        (
            "POST",
            "POST /api/x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}".into(),
            true,
        ),
        (
            "PUT",
            "PUT /api/x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}".into(),
            true,
        ),
        ("DELETE", "DELETE /api/x HTTP/1.1\r\nHost: t\r\n\r\n".into(), false),
        (
            "PATCH",
            "PATCH /api/x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}".into(),
            true,
        ),
        ("TRACE", "TRACE / HTTP/1.1\r\nHost: t\r\n\r\n".into(), false),
        ("extension method", "PROPFIND / HTTP/1.1\r\nHost: t\r\n\r\n".into(), false),
        (
            "GET with Upgrade: websocket",
            format!("GET /api/kernels/1/channels HTTP/1.1\r\nHost: t\r\n{ws}\r\n"),
            false,
        ),
    ]
    .into_iter()
    .map(|(what, text, closes): (&str, String, bool)| (what, text.into_bytes(), closes))
    .collect()
}

#[test]
fn nothing_but_a_genuine_preflight_passes_without_credentials() {
    for mode in ["interactive", "inference"] {
        let app = App::start();
        let p = private(&app, mode);
        for (what, bytes, closes) in hostile_requests() {
            assert_refused(&p, &format!("{mode}: {what}"), &bytes, closes);
        }
        assert!(
            app.seen().is_empty(),
            "{mode}: refused requests reached the app: {:?}",
            app.seen()
        );
        // With the credential, the same app answers: the refusals above were the
        // proxy's, not the app's.
        let mut c = Client::connect(p.worker.addr());
        let r = c.get("/after", &p.credential);
        assert_eq!(r.status, 200, "{mode}: {}", r.text());
        assert_eq!(app.seen(), vec!["GET /after HTTP/1.1".to_owned()], "{mode}");
    }
}

/// A genuine preflight is answered by the worker itself and never reaches the app:
/// it is the one request a private circuit takes without a credential, and an app
/// that answers `OPTIONS` as `GET` (Node's `http`, Express `app.all`, Go's
/// `HandleFunc`) handed its data to any client that sent a preflight's fields.
/// Before, the app's whole answer came back. A permit-cookie circuit answers a
/// listed origin (`allowed_origins`) only, as its guard admits only those
/// cross-origin; a bearer circuit answers any origin (no browser attaches the token on
/// its own). The next request on the connection is checked again.
#[test]
fn a_genuine_preflight_is_answered_by_the_worker_and_never_reaches_the_app() {
    for mode in ["interactive", "inference"] {
        let app = App::start();
        let p = private_with(&app, mode, "allowed_origins = [\"https://lab.example\"]");
        let mut c = Client::connect(p.worker.addr());
        c.send(
            b"OPTIONS /api/contents/secret.ipynb?content=1 HTTP/1.1\r\nHost: t\r\nOrigin: https://lab.example\r\nAccess-Control-Request-Method: PUT\r\nAccess-Control-Request-Headers: content-type, x-xsrftoken\r\nX-Backend-Request-ID: preflight-1\r\n\r\n",
        );
        let r = c.response();
        assert_eq!(r.status, 204, "{mode}: {}", r.text());
        assert_eq!(r.text(), "", "{mode}: nothing of the app's");
        // A bearer circuit allows any origin (`null` included), without credentials.
        let allowed = if mode == "interactive" {
            "https://lab.example"
        } else {
            "*"
        };
        assert_eq!(r.header("access-control-allow-origin"), Some(allowed));
        assert_eq!(r.header("access-control-allow-methods"), Some("PUT"));
        assert_eq!(
            r.header("access-control-allow-headers"),
            Some("content-type, x-xsrftoken")
        );
        let credentials = r.header("access-control-allow-credentials");
        assert_eq!(
            credentials,
            (mode == "interactive").then_some("true"),
            "{mode}"
        );
        assert_eq!(r.header("x-backend-request-id"), Some("preflight-1"));
        // Content-Length: 0 is no body: still a preflight.
        c.send(
            b"OPTIONS /api/contents HTTP/1.1\r\nHost: t\r\nOrigin: https://other.example\r\nAccess-Control-Request-Method: DELETE\r\nContent-Length: 0\r\n\r\n",
        );
        let r = c.response();
        if mode == "interactive" {
            // An origin the guard would refuse with the cookie: refused here too.
            assert_eq!(r.status, 403, "{mode}: {}", r.text());
            assert_eq!(r.json()["code"], "cross_origin");
        } else {
            assert_eq!(r.status, 204, "{mode}: {}", r.text());
            assert_eq!(r.header("access-control-allow-origin"), Some("*"));
        }
        // The keep-alive connection that carried a preflight carries no credential.
        let r = c.get("/api/contents", "");
        assert_eq!(r.status, 401, "{mode}: {}", r.text());
        assert_eq!(r.json()["code"], p.missing_code);
        assert!(app.seen().is_empty(), "{mode}: {:?}", app.seen());
        // Logged as the worker's own 204, under the circuit.
        let line = p.worker.wait_access_line("preflight-1");
        assert_eq!(line["status"], 204, "{line}");
        assert_eq!(line["method"], "OPTIONS", "{line}");
        // And counted with the other answers by class.
        let counted = if mode == "interactive" { 1 } else { 2 };
        common::eventually("the 204s are counted", || {
            p.worker.admin_get("/metrics").text().contains(&format!(
                "appproxy_requests_total{{core=\"0\",status=\"2xx\"}} {counted}"
            ))
        });
    }
}

/// The same over HTTP/2 (curl, prior knowledge): answered by the worker, nothing
/// reaches the app.
#[test]
fn a_preflight_over_http2_is_answered_by_the_worker() {
    for mode in ["interactive", "inference"] {
        let app = App::start();
        let p = private_with(&app, mode, "allowed_origins = [\"https://lab.example\"]");
        for (origin, answered) in [
            ("https://lab.example", true),
            ("https://other.example", mode == "inference"),
        ] {
            let out = std::process::Command::new("curl")
                .args([
                    "-s",
                    "-i",
                    "--max-time",
                    "20",
                    "--http2-prior-knowledge",
                    "-X",
                    "OPTIONS",
                ])
                .args(["-H", &format!("Origin: {origin}")])
                .args(["-H", "Access-Control-Request-Method: PUT"])
                .arg(format!(
                    "http://{}/api/contents/secret.ipynb?content=1",
                    p.worker.addr()
                ))
                .output()
                .expect("curl");
            let answer = String::from_utf8_lossy(&out.stdout).into_owned();
            let want = if answered { "HTTP/2 204" } else { "HTTP/2 403" };
            assert!(answer.starts_with(want), "{mode}, {origin}: {answer}");
            if answered {
                let allowed = if mode == "interactive" { origin } else { "*" };
                assert!(
                    answer.contains(&format!("access-control-allow-origin: {allowed}")),
                    "{mode}: {answer}"
                );
            }
        }
        assert!(app.seen().is_empty(), "{mode}: {:?}", app.seen());
    }
}

#[test]
fn upgrades_open_a_tunnel_only_with_the_credential() {
    for mode in ["interactive", "inference"] {
        let app = App::start();
        let p = private(&app, mode);
        let ws = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
        for method in ["OPTIONS", "GET"] {
            // A refused upgrade stays plain HTTP: the next request parses.
            assert_refused(
                &p,
                &format!("{mode}: {method} + Upgrade"),
                format!("{method} /tunnel HTTP/1.1\r\nHost: t\r\n{ws}\r\n").as_bytes(),
                false,
            );
        }
        assert!(app.seen().is_empty(), "{mode}: {:?}", app.seen());
        // With the credential, the app's 101 opens the tunnel (a raw one: this app
        // echoes bytes, it does not speak WebSocket frames).
        let mut c = Client::connect(p.worker.addr());
        c.send(
            format!(
                "GET /tunnel HTTP/1.1\r\nHost: t\r\nUpgrade: raw\r\nConnection: Upgrade\r\n{}\r\n",
                p.credential
            )
            .as_bytes(),
        );
        let (status, _) = c.head();
        assert_eq!(status, 101, "{mode}");
        c.send(b"ping");
        let mut echo = [0u8; 4];
        c.reader.read_exact(&mut echo).expect("echo");
        assert_eq!(&echo, b"ping");
    }
}

/// The permit cookie is the worker's credential: an app cannot set it (the field is
/// left out of the response), and one planted on the host anyway (a page's script,
/// another app's older response) does not lock the user out: every cookie of the
/// permit's name is tried.
#[test]
fn an_app_can_neither_set_the_permit_cookie_nor_lock_the_user_out_with_one() {
    let app = App::start();
    let p = private(&app, "interactive");
    let mut c = Client::connect(p.worker.addr());
    let r = c.get("/plant", &p.credential);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers_named("set-cookie"), vec!["theme=dark"]);
    let permit = p
        .credential
        .trim_end()
        .strip_prefix("Cookie: ")
        .expect("a cookie credential")
        .to_owned();
    // As a browser sends them: the planted cookie (longer path) first.
    for cookies in [
        format!("Cookie: appproxy_permit=planted; {permit}\r\n"),
        format!("Cookie: appproxy_permit=planted\r\nCookie: {permit}\r\n"),
    ] {
        let r = c.get("/api/contents", &cookies);
        assert_eq!(r.status, 200, "{cookies:?}: {}", r.text());
    }
    // Planted cookies alone are still no permit.
    let r = c.get(
        "/api/contents",
        "Cookie: appproxy_permit=planted; appproxy_permit=x\r\n",
    );
    assert_eq!(r.status, 401, "{}", r.text());
}
