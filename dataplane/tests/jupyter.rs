//! A real interactive app end to end: `jupyter_server` (from PyPI, installed into a
//! virtualenv under the target directory on first run) behind the worker; its REST
//! API and a kernel WebSocket (`execute_request` → `execute_result`) driven through
//! the proxy; and the same over TLS terminated by the worker (`https://`, `wss://`).

mod common;
#[path = "common/tls.rs"]
mod tls_support;

use appproxy_test_support::net::Uninterrupted;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, Worker, WorkerOpts};
use tungstenite::Message;

const TOKEN: &str = "appproxy-e2e-token";

/// The virtualenv with jupyter_server, ipykernel, made once (`appproxy_test_support::python`).
fn jupyter_venv() -> PathBuf {
    appproxy_test_support::python::venv(
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        "jupyter-venv",
        &["jupyter_server", "ipykernel"],
    )
}

struct Jupyter {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Jupyter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_jupyter(venv: &Path) -> Jupyter {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = common::free_port();
    let log = std::fs::File::create(dir.path().join("jupyter.log")).expect("log");
    let mut child = Command::new(venv.join("bin/jupyter-server"))
        .arg("--no-browser")
        .arg(format!("--port={port}"))
        .arg("--ServerApp.ip=127.0.0.1")
        .arg(format!("--IdentityProvider.token={TOKEN}"))
        .arg(format!("--ServerApp.root_dir={}", dir.path().display()))
        .arg("--ServerApp.port_retries=0")
        .arg("--allow-root")
        .env("JUPYTER_RUNTIME_DIR", dir.path().join("runtime"))
        .env("JUPYTER_DATA_DIR", dir.path().join("data"))
        .env("JUPYTER_CONFIG_DIR", dir.path().join("config"))
        .env(
            "PATH",
            format!(
                "{}:{}",
                venv.join("bin").display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start jupyter_server");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(addr).is_err() {
        let exited = child.try_wait().ok().flatten().is_some();
        assert!(
            !exited && Instant::now() < deadline,
            "jupyter_server did not start: {}",
            std::fs::read_to_string(dir.path().join("jupyter.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Jupyter {
        child,
        addr,
        _dir: dir,
    }
}

#[test]
fn jupyter_rest_and_kernel_websocket_through_the_worker() {
    let venv = jupyter_venv();
    let jupyter = start_jupyter(&venv);
    let w = Worker::start(WorkerOpts {
        upstreams: vec![jupyter.addr],
        ..Default::default()
    });
    let auth = format!("Authorization: token {TOKEN}\r\n");
    let mut c = Client::connect(w.addr());
    // REST: version, then start a kernel.
    // jupyter_server refuses Host names that are not local: send the real one.
    c.send(
        format!(
            "GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nX-Backend-Request-ID: jupyter-rest-1\r\n{auth}\r\n",
            w.port
        )
        .as_bytes(),
    );
    let r = c.response();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["started"].is_string(), "{}", r.text());
    assert_eq!(r.header("x-backend-request-id"), Some("jupyter-rest-1"));
    let body = r#"{"name":"python3"}"#;
    c.send(
        format!(
            "POST /api/kernels HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            w.port,
            body.len()
        )
        .as_bytes(),
    );
    let r = c.response();
    assert_eq!(r.status, 201, "{}", r.text());
    let kernel = r.json()["id"].as_str().expect("kernel id").to_owned();

    // The kernel's WebSocket, through the worker.
    use tungstenite::client::IntoClientRequest;
    let mut req = format!(
        "ws://127.0.0.1:{}/api/kernels/{kernel}/channels?token={TOKEN}",
        w.port
    )
    .into_client_request()
    .expect("request");
    req.headers_mut().insert(
        "X-Backend-Request-ID",
        "jupyter-ws-1".parse().expect("value"),
    );
    let stream = TcpStream::connect(w.addr()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let (mut ws, resp) =
        tungstenite::client(req, Uninterrupted(stream)).expect("kernel websocket handshake");
    assert_eq!(resp.status(), 101);
    let msg_id = uuid::Uuid::new_v4().to_string();
    let execute = serde_json::json!({
        "header": {"msg_id": msg_id, "username": "e2e", "session": uuid::Uuid::new_v4().to_string(),
                   "msg_type": "execute_request", "version": "5.3", "date": "2026-11-22T00:00:00Z"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": "6 * 7", "silent": false, "store_history": false,
                    "user_expressions": {}, "allow_stdin": false, "stop_on_error": true}
    });
    ws.send(Message::Text(execute.to_string().into()))
        .expect("execute_request");
    let deadline = Instant::now() + Duration::from_secs(60);
    let result = loop {
        assert!(Instant::now() < deadline, "no execute_result");
        let Message::Text(text) = ws.read().expect("kernel message") else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        if v["msg_type"] == "execute_result" && v["parent_header"]["msg_id"] == msg_id.as_str() {
            break v;
        }
    };
    assert_eq!(result["content"]["data"]["text/plain"], "42");
    let _ = ws.close(None);
    // Shut the kernel down through the proxy as well.
    let mut c = Client::connect(w.addr());
    c.send(
        format!(
            "DELETE /api/kernels/{kernel} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n{auth}\r\n",
            w.port
        )
        .as_bytes(),
    );
    assert_eq!(c.response().status, 204);
    // The session was logged under the upgrade request's ID.
    let opened = w.wait_log("websocket open", |v| {
        v["message"] == "websocket session opened"
    });
    assert_eq!(opened[0]["request_id"], "jupyter-ws-1");
}

/// Runs `6 * 7` on the kernel over an established kernel-channel WebSocket.
fn execute_42<S: std::io::Read + std::io::Write>(ws: &mut tungstenite::WebSocket<S>) {
    let msg_id = uuid::Uuid::new_v4().to_string();
    let execute = serde_json::json!({
        "header": {"msg_id": msg_id, "username": "e2e", "session": uuid::Uuid::new_v4().to_string(),
                   "msg_type": "execute_request", "version": "5.3", "date": "2026-11-30T00:00:00Z"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": "6 * 7", "silent": false, "store_history": false,
                    "user_expressions": {}, "allow_stdin": false, "stop_on_error": true}
    });
    ws.send(Message::Text(execute.to_string().into()))
        .expect("execute_request");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "no execute_result");
        let Message::Text(text) = ws.read().expect("kernel message") else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        if v["msg_type"] == "execute_result" && v["parent_header"]["msg_id"] == msg_id.as_str() {
            assert_eq!(v["content"]["data"]["text/plain"], "42");
            return;
        }
    }
}

#[test]
fn jupyter_over_https_and_wss_through_the_worker() {
    let venv = jupyter_venv();
    let jupyter = start_jupyter(&venv);
    let pki = tls_support::Pki::new();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![jupyter.addr],
        worker_extra: pki.worker_lines(),
        ..Default::default()
    });
    let config = pki.default_client();
    let auth = format!("Authorization: token {TOKEN}\r\n");
    let host = format!("Host: 127.0.0.1:{}\r\n", w.port);
    let mut s =
        std::io::BufReader::new(tls_support::connect(w.addr(), &config, "localhost").expect("tls"));
    let r = tls_support::get(&mut s, "/api/status", &format!("{host}{auth}"));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let body = r#"{"name":"python3"}"#;
    std::io::Write::write_all(
        s.get_mut(),
        format!(
            "POST /api/kernels HTTP/1.1\r\n{host}{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .expect("post");
    let r = tls_support::read_response(&mut s);
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    let kernel = v["id"].as_str().expect("kernel id").to_owned();
    // The kernel channel over wss://.
    let stream = tls_support::connect(w.addr(), &config, "localhost").expect("tls");
    stream
        .sock
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let url = format!(
        "wss://127.0.0.1:{}/api/kernels/{kernel}/channels?token={TOKEN}",
        w.port
    );
    let (mut ws, resp) =
        tungstenite::client(url.as_str(), Uninterrupted(stream)).expect("wss handshake");
    assert_eq!(resp.status(), 101);
    execute_42(&mut ws);
    let _ = ws.close(None);
    std::io::Write::write_all(
        s.get_mut(),
        format!("DELETE /api/kernels/{kernel} HTTP/1.1\r\n{host}{auth}\r\n").as_bytes(),
    )
    .expect("delete");
    assert_eq!(tls_support::read_response(&mut s).status, 204);
}
