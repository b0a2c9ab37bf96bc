//! Raw TCP circuits: bytes both ways, half-close, the allowlist, and the per-connection
//! log line.

mod common;

use appproxy_test_support::net::ReadUninterrupted;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

use common::{Worker, WorkerOpts};

/// Sends `sent` (in one write) and reads `echoed` back from the echo app, then
/// half-closes: the client stops sending and still gets the app's last words.
fn relays_with_half_close(s: &mut TcpStream, sent: &[u8], echoed: &[u8]) {
    s.write_all(sent).expect("send");
    let mut got = vec![0u8; echoed.len()];
    s.read_exact(&mut got).expect("echo");
    assert_eq!(got, echoed);
    s.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("rest");
    assert_eq!(rest, b"bye");
}

/// Echoes until the client half-closes, then says "bye" and closes.
fn echo_then_bye() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = stream;
                let mut buf = [0u8; 4096];
                loop {
                    match s.read_uninterrupted(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.write_all(b"bye");
            });
        }
    });
    addr
}

#[test]
fn tcp_relay_with_half_close() {
    let app = echo_then_bye();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        circuit_extra: "protocol = \"tcp\"".into(),
        ..Default::default()
    });
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // Not HTTP: any bytes, both ways.
    relays_with_half_close(
        &mut s,
        b"\x00SSH-2.0-raw bytes\xff",
        b"\x00SSH-2.0-raw bytes\xff",
    );
    // (The harness's readiness probe made an empty connection first.)
    let line = w.wait_log("tcp close line", |v| {
        v["message"] == "tcp connection closed" && v["bytes_to_app"] != 0
    });
    assert_eq!(line[0]["bytes_to_app"], 19);
    assert_eq!(line[0]["bytes_to_client"], 22);
    assert!(line[0]["request_id"].is_string());
}

/// A TCP circuit shares its host name with every user's interactive circuits, and a
/// browser sends a host's cookies to all of its ports: a page that sent a user to
/// `http://<worker>:<tcp port>/` handed the app behind that TCP circuit (anyone's:
/// nothing credentials a TCP circuit) the user's permit to all their circuits, raw.
/// Now the connection closes before a chunk of an HTTP request that names a permit
/// cookie is relayed, so its value never reaches the app. HTTP without one, and
/// other protocols, pass unchanged.
#[test]
fn a_permit_cookie_never_reaches_a_tcp_circuits_app() {
    let app = echo_then_bye();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        circuit_extra: "protocol = \"tcp\"".into(),
        ..Default::default()
    });
    let closed_unechoed = |chunks: &[&[u8]]| {
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        for c in chunks {
            if s.write_all(c).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    };
    let request = b"GET / HTTP/1.1\r\nHost: proxy.test\r\nCookie: a=1; appproxy_permit_3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b=\"c2VjcmV0\"\r\n\r\n";
    assert_eq!(
        closed_unechoed(&[request]),
        b"",
        "the permit reached the app"
    );
    // Split inside the cookie's name, across two writes: the first part went on
    // before the rest came (it names no permit yet); the value never does.
    let (a, b) = request.split_at(60);
    let got = closed_unechoed(&[a, b]);
    assert!(
        request.starts_with(&got) && got.len() <= 60,
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    // The next request on a connection that began without one.
    let plain = b"GET / HTTP/1.1\r\nHost: proxy.test\r\n\r\n";
    let got = closed_unechoed(&[
        plain,
        b"GET /2 HTTP/1.1\r\nCookie: appproxy_permit=x\r\n\r\n",
    ]);
    assert_eq!(got, plain, "only the request without a permit is relayed");
    w.wait_log("the refusal line", |v| {
        v["message"].as_str().is_some_and(|m| {
            m.starts_with("tcp connection closed: an HTTP request carrying a permit cookie")
        })
    });
    // HTTP without a permit, and another protocol that names one, pass unchanged.
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    relays_with_half_close(&mut s, plain, plain);
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    relays_with_half_close(
        &mut s,
        b"SSH-2.0-x appproxy_permit",
        b"SSH-2.0-x appproxy_permit",
    );
}

#[test]
fn tcp_allowlist_refuses_other_peers() {
    let w = refused_by_allowlist("\"10.0.0.0/8\"");
    assert_eq!(
        common::log_count(
            &w,
            "no valid allowed_client_ips entry: the circuit admits no client"
        ),
        0
    );
}

/// An allowlist with no valid entry closes every TCP client instead of admitting
/// all of them, and the worker says so as it starts (the file's circuits are
/// resolved before logging is set up: the warnings were lost).
#[test]
fn tcp_allowlist_of_invalid_entries_admits_nobody() {
    let w = refused_by_allowlist("[\"localhost\"]");
    let left_out = w.wait_log("the entry left out", |v| {
        v["message"] == "allowed_client_ips entry is not an address or network: left out"
    });
    assert_eq!(left_out[0]["entry"], "localhost", "{left_out:?}");
    w.wait_log("the circuit admits nobody", |v| {
        v["message"] == "no valid allowed_client_ips entry: the circuit admits no client"
    });
}

/// A TCP circuit with `allowed_client_ips = <allowlist>` closes this (loopback)
/// client unserved, and logs why.
fn refused_by_allowlist(allowlist: &str) -> Worker {
    let app = echo_then_bye();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        circuit_extra: format!("protocol = \"tcp\"\nallowed_client_ips = {allowlist}"),
        ..Default::default()
    });
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // Said and half-closed: relayed, the echo app would answer "hellobye".
    let _ = s.write_all(b"hello");
    let _ = s.shutdown(Shutdown::Write);
    let mut buf = Vec::new();
    // Closed unread: a reset is a close too.
    let end = s.read_to_end(&mut buf);
    assert!(
        buf.is_empty()
            && end.as_ref().map_or_else(
                |e| e.kind() == std::io::ErrorKind::ConnectionReset,
                |_| true
            ),
        "a refused peer gets nothing and is closed: {buf:?} {end:?}"
    );
    w.wait_log("refusal line", |v| {
        v["message"] == "tcp peer not in the circuit's allowlist: closed"
    });
    w
}

/// Behind a TCP balancer sending the PROXY protocol, the allowlist is checked against
/// the client the header names; the app gets the bytes after the header, not the
/// header.
#[test]
fn tcp_allowlist_checks_the_client_a_proxy_protocol_header_names() {
    let app = echo_then_bye();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        worker_extra: "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\"]\n".into(),
        circuit_extra: "protocol = \"tcp\"\nallowed_client_ips = \"10.0.0.0/8\"".into(),
        ..Default::default()
    });
    // A client inside the allowlist: relayed, the header left out.
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    relays_with_half_close(
        &mut s,
        b"PROXY TCP4 10.1.2.3 127.0.0.1 5000 22\r\nSSH-2.0-raw",
        b"SSH-2.0-raw",
    );
    // A client outside it, from the same balancer: refused.
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = s.write_all(b"PROXY TCP4 192.0.2.1 127.0.0.1 5000 22\r\nhello");
    let mut buf = Vec::new();
    let n = s.read_to_end(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "a refused client gets nothing and is closed");
    let line = w.wait_log("refusal line", |v| {
        v["message"] == "tcp peer not in the circuit's allowlist: closed"
    });
    assert_eq!(line[0]["peer"], "192.0.2.1");
}

/// The head timeout runs from the accept through a PROXY protocol header, and is
/// not cleared after it any more: it must not cut a TCP circuit's relay. A client
/// silent past `[timeouts] head_secs` after its header (an SSH client waiting for
/// the server's banner, say) is relayed on.
#[test]
fn a_tcp_circuit_behind_proxy_protocol_outlives_the_head_timeout() {
    let app = echo_then_bye();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        worker_extra: "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\"]\n".into(),
        circuit_extra: "protocol = \"tcp\"".into(),
        extra: "[timeouts]\nhead_secs = 1\n".into(),
        ..Default::default()
    });
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"PROXY TCP4 10.1.2.3 127.0.0.1 5000 22\r\n")
        .expect("the header");
    // Past the head timeout from the accept, with nothing sent after the header.
    std::thread::sleep(Duration::from_millis(2500));
    relays_with_half_close(&mut s, b"SSH-2.0-late", b"SSH-2.0-late");
}
