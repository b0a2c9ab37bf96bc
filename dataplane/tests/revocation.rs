//! Tunnels a deployment no longer admits are closed: a WebSocket session, a raw
//! upgrade or a TCP connection opened before its circuit was removed, moved, made
//! private or given a narrower allowlist ends at once (WebSocket peers are told
//! 1001), counted in `appproxy_tunnels_revoked_total`; a change that still admits
//! the client leaves it open. Deployments arrive here as reloads of the worker's
//! file, which apply the same change to every core as the coordinator's do.
#![allow(clippy::result_large_err)]

mod common;

use appproxy_test_support::net::{ReadUninterrupted, Uninterrupted};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use std::time::{Duration, Instant};

use common::upgrade::{
    raw_upgrade, raw_upgrade_app, raw_upgrade_app_sending, raw_upgrade_request, switched, Gate,
};
use common::ws::echo_app;
use common::{Worker, WorkerOpts};
use tungstenite::Message;

type Ws = tungstenite::WebSocket<Uninterrupted<TcpStream>>;

fn session(w: &Worker) -> Ws {
    let stream = TcpStream::connect(w.addr()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let url = format!("ws://127.0.0.1:{}/ws", w.port);
    match tungstenite::client(url, Uninterrupted(stream)) {
        Ok((ws, _)) => ws,
        Err(e) => panic!("handshake: {e:?}"),
    }
}

/// One message there and back.
fn echoes<S: Read + Write>(ws: &mut tungstenite::WebSocket<S>, text: &str) {
    ws.send(Message::Text(text.into())).expect("send");
    loop {
        match ws.read().expect("echo") {
            Message::Text(t) => return assert_eq!(t.as_str(), text),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected the echo of {text:?}, got {other:?}"),
        }
    }
}

/// The close code the worker ends the session with (it must send one).
fn closed_with<S: Read + Write>(ws: &mut tungstenite::WebSocket<S>) -> u16 {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(f))) => return u16::from(f.code),
            Ok(Message::Close(None)) => return 1005,
            Ok(_) => {}
            Err(e) => panic!("the session ended without a close frame: {e}"),
        }
    }
}

/// Reloads the worker with `edit` applied to its original file and waits until
/// every core has applied it.
fn deploy(w: &Worker, original: &str, cores: usize, edit: impl FnOnce(&str) -> String) {
    let applied = || common::log_count(w, "deployment applied");
    let before = applied();
    let text = edit(original);
    assert_ne!(text, original, "the edit changes the file");
    w.reload(|_| text);
    common::eventually("every core applied the deployment", || {
        applied() >= before + cores
    });
}

/// Deploys the original circuit with an allowlist (10.0.0.0/8) that no longer
/// admits the test's loopback clients.
fn narrow_to_elsewhere(w: &Worker, original: &str) {
    deploy(w, original, 1, |t| {
        t.replace(
            "open_to_public = true",
            "open_to_public = true\nallowed_client_ips = \"10.0.0.0/8\"",
        )
    });
}

fn config(w: &Worker) -> String {
    std::fs::read_to_string(w.dir.path().join("worker.toml")).expect("config")
}

fn revoked(w: &Worker) -> u64 {
    common::metric_all_cores(w, "appproxy_tunnels_revoked_total")
}

/// The close line of the TCP connection `s` once it is the one tunnel revoked
/// (checked: it says so).
fn revoked_tcp_line(w: &Worker, s: &TcpStream) -> serde_json::Value {
    common::eventually("counted as revoked", || revoked(w) == 1);
    let peer = s.local_addr().expect("addr").to_string();
    let line = w.wait_log("the connection's line", |v| {
        v["message"] == "tcp connection closed" && v["peer"] == peer.as_str()
    });
    assert_eq!(line[0]["revoked"], true, "{line:?}");
    line[0].clone()
}

#[test]
fn sessions_stay_while_admitted_and_close_when_the_circuit_turns_private() {
    let app = echo_app();
    let w = Worker::start(WorkerOpts {
        cores: 2,
        upstreams: vec![app.addr],
        extra: "[secrets]\npermit_secret = \"permit-key\"\n".into(),
        ..Default::default()
    });
    let original = config(&w);
    let mut sessions: Vec<Ws> = (0..4).map(|_| session(&w)).collect();
    for (i, ws) in sessions.iter_mut().enumerate() {
        echoes(ws, &format!("before {i}"));
    }
    // An allowlist that still admits the client, and a new name: nothing closes.
    deploy(&w, &original, 2, |t| {
        t.replace(
            "open_to_public = true",
            "open_to_public = true\nallowed_client_ips = \"10.0.0.0/8, 127.0.0.1\"",
        )
        .replace("app = \"test\"", "app = \"renamed\"")
    });
    for (i, ws) in sessions.iter_mut().enumerate() {
        echoes(ws, &format!("still admitted {i}"));
    }
    assert_eq!(revoked(&w), 0);
    // The circuit turns private: none of these sessions presented a permit.
    deploy(&w, &original, 2, |t| t.replace("open_to_public = true", ""));
    for ws in &mut sessions {
        assert_eq!(closed_with(ws), 1001, "told the endpoint is going away");
    }
    common::eventually("every session counted as revoked", || revoked(&w) == 4);
    common::eventually("no tunnel left open", || {
        common::metric_all_cores(&w, "appproxy_tunnels_active") == 0
    });
    common::eventually("the app was told 1001 for each session", || {
        app.closes
            .lock()
            .expect("closes")
            .iter()
            .filter(|c| **c == 1001)
            .count()
            == 4
    });
    let lines = w.wait_log("why the sessions were closed", |v| {
        v["message"] == "closing tunnels a deployment no longer admits"
    });
    assert!(
        lines.iter().all(|v| v["reason"]
            .as_str()
            .is_some_and(|r| r.contains("credential"))),
        "{lines:?}"
    );
    // Each tunnel logs its end through the log's writer thread, after the line
    // waited for above: wait (bounded) for the four, then read them once (more
    // than four still fails).
    common::eventually("every session's end logged", || {
        common::log_count(&w, "websocket session closed") >= 4
    });
    let closed: Vec<_> = w
        .log_json()
        .into_iter()
        .filter(|v| v["message"] == "websocket session closed")
        .collect();
    assert_eq!(closed.len(), 4, "{closed:?}");
    assert!(closed.iter().all(|v| v["revoked"] == true), "{closed:?}");
    // And a new session needs the permit now.
    let stream = TcpStream::connect(w.addr()).expect("connect");
    let url = format!("ws://127.0.0.1:{}/ws", w.port);
    match tungstenite::client(url, Uninterrupted(stream)) {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            assert_eq!(r.status(), 401)
        }
        other => panic!("expected a 401, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_removed_circuit_closes_its_raw_upgrades_and_sessions() {
    let app = echo_app();
    let raw = raw_upgrade_app(None);
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        ..Default::default()
    });
    let original = config(&w);
    let mut ws = session(&w);
    echoes(&mut ws, "hello");
    // A second circuit on another port, for raw upgrades.
    let with_raw = format!(
        "{original}\n[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455550002\"\nport = {}\nopen_to_public = true\nroute_info = [{{ session_id = \"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\", kernel_host = \"127.0.0.1\", kernel_port = {} }}]\n",
        w.aux_port,
        raw.port()
    );
    deploy(&w, &original, 1, |_| with_raw.clone());
    echoes(&mut ws, "the other circuit came, this one stays");
    let mut upgraded = raw_upgrade(w.aux_port, "raw bytes");
    // The session's circuit is removed (another ID takes its port): the session
    // closes, the raw upgrade of the circuit that stays does not.
    deploy(&w, &with_raw, 1, |t| {
        t.replacen(
            "c0a8f5d2-1111-4222-8333-444455556666",
            "c0a8f5d2-1111-4222-8333-444455550003",
            1,
        )
    });
    assert_eq!(closed_with(&mut ws), 1001);
    upgraded.write_all(b"still here").expect("write");
    let mut echo = [0u8; 10];
    upgraded.read_exact(&mut echo).expect("echo");
    assert_eq!(&echo, b"still here");
    common::eventually("one tunnel revoked", || revoked(&w) == 1);
    // Now the raw upgrade's circuit goes: the client sees the end of the stream.
    deploy(&w, &with_raw, 1, |t| {
        let cut = t
            .find("\n[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455550002\"")
            .expect("second circuit");
        t[..cut].to_owned()
    });
    assert_eq!(common::read_until_closed(&mut upgraded), b"");
    common::eventually("both tunnels revoked", || revoked(&w) == 2);
    let lines = w.wait_log("a removal", |v| {
        v["message"] == "closing tunnels a deployment no longer admits"
            && v["reason"] == "circuit removed"
    });
    assert_eq!(lines.len(), 2, "{lines:?}");
}

/// A TCP circuit's app that streams without pause: the tunnel is never idle and
/// always has bytes ready, so only the revocation itself can end it.
fn firehose() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let chunk = [b'x'; 16 * 1024];
                while s.write_all(&chunk).is_ok() {}
            });
        }
    });
    addr
}

#[test]
fn a_busy_tcp_connection_is_closed_when_the_allowlist_no_longer_admits_it() {
    let app = firehose();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        circuit_extra: "protocol = \"tcp\"".into(),
        ..Default::default()
    });
    let original = config(&w);
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = vec![0u8; 64 * 1024];
    let mut read = |s: &mut TcpStream| s.read_uninterrupted(&mut buf).expect("read");
    assert!(read(&mut s) > 0);
    // Still admitted: the bytes keep coming.
    deploy(&w, &original, 1, |t| {
        t.replace(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\nallowed_client_ips = \"127.0.0.0/8\"",
        )
    });
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        assert!(read(&mut s) > 0, "the admitted connection stays open");
    }
    // Not admitted any more: the stream ends, while the app is still sending.
    deploy(&w, &original, 1, |t| {
        t.replace(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\nallowed_client_ips = \"10.0.0.0/8\"",
        )
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match s.read_uninterrupted(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => assert!(
                Instant::now() < deadline,
                "the revoked connection is still relaying"
            ),
        }
    }
    revoked_tcp_line(&w, &s);
    common::eventually("no tunnel left open", || {
        common::metric_all_cores(&w, "appproxy_tunnels_active") == 0
    });
}

/// The race: the request was admitted, then a deployment restricted the circuit
/// while the app took its time with the 101. The tunnel is checked against the
/// circuit as it is when it opens, and closed at once: nothing is relayed.
#[test]
fn a_tunnel_whose_101_comes_after_the_restriction_is_closed_at_once() {
    let gate = Arc::new(Gate::default());
    let app = raw_upgrade_app(Some(gate.clone()));
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        ..Default::default()
    });
    let original = config(&w);
    let mut s = raw_upgrade_request(w.port);
    gate.wait_arrived(1);
    narrow_to_elsewhere(&w, &original);
    gate.open();
    switched(&mut s);
    let _ = s.write_all(b"after the restriction");
    assert_eq!(
        common::read_until_closed(&mut s),
        b"",
        "nothing relayed once the circuit no longer admits the client"
    );
    common::eventually("counted as revoked", || revoked(&w) == 1);
    let line = w.wait_log("the tunnel's line", |v| {
        v["message"] == "upgraded connection closed"
    });
    assert_eq!(line[0]["revoked"], true, "{line:?}");
    assert_eq!(line[0]["bytes_to_app"], 0, "{line:?}");
}

/// The same race, with an app that sends bytes right behind its 101: an admitted
/// client gets them with the 101, a client the circuit no longer admits gets the
/// 101 and the end of the stream, nothing of the app's (as a WebSocket session
/// drops what came behind its handshake).
#[test]
fn a_raw_upgrade_revoked_as_it_opens_relays_nothing_of_the_app_either() {
    const BEHIND: &[u8] = b"for admitted clients only";
    let gate = Arc::new(Gate::default());
    gate.open();
    let app = raw_upgrade_app_sending(Some(gate.clone()), BEHIND);
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        ..Default::default()
    });
    let original = config(&w);
    // Admitted: the app's bytes come with the 101.
    let mut s = raw_upgrade_request(w.port);
    switched(&mut s);
    let mut got = vec![0u8; BEHIND.len()];
    s.read_exact(&mut got).expect("the app's bytes");
    assert_eq!(got, BEHIND);
    drop(s);
    // Restricted while the app holds its 101.
    gate.close();
    let mut s = raw_upgrade_request(w.port);
    gate.wait_arrived(2);
    narrow_to_elsewhere(&w, &original);
    gate.open();
    switched(&mut s);
    let rest = common::read_until_closed(&mut s);
    assert!(
        rest.is_empty(),
        "relayed to a client the circuit no longer admits: {:?}",
        String::from_utf8_lossy(&rest)
    );
    common::eventually("counted as revoked", || revoked(&w) == 1);
    let lines = w.wait_log("the tunnel's line", |v| {
        v["message"] == "upgraded connection closed" && v["revoked"] == true
    });
    assert_eq!(lines[0]["bytes_to_client"], 0, "{lines:?}");
}

#[path = "common/tls.rs"]
mod tls_support;

/// A TCP server answering every request with a 101 to `x-raw`, then reading and
/// dropping what comes; counts the bytes it got.
fn sink_upgrade_app() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::Ordering;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let got = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = got.clone();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let got = counted.clone();
            std::thread::spawn(move || {
                if !common::upgrade::read_request_head(&mut s) {
                    return;
                }
                let answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x-raw\r\nConnection: Upgrade\r\n\r\n";
                if s.write_all(answer).is_err() {
                    return;
                }
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n @ 1..) = s.read_uninterrupted(&mut buf) {
                    got.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (addr, got)
}

/// Over TLS too: a WebSocket session is told 1001, and a raw upgrade whose client
/// never stops sending (records always waiting to be decrypted) ends.
#[test]
fn tls_tunnels_close_when_the_allowlist_no_longer_admits_the_client() {
    use std::sync::atomic::Ordering;
    let pki = tls_support::Pki::new();
    let app = echo_app();
    let (sink, sunk) = sink_upgrade_app();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        worker_extra: pki.worker_lines(),
        extra: "[http2]\nenabled = false\n".into(),
        ..Default::default()
    });
    let original = config(&w);
    let with_raw = format!(
        "{original}\n[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455550002\"\nport = {}\nopen_to_public = true\nroute_info = [{{ session_id = \"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\", kernel_host = \"127.0.0.1\", kernel_port = {} }}]\n",
        w.aux_port,
        sink.port()
    );
    deploy(&w, &original, 1, |_| with_raw.clone());
    let client = pki.default_client();
    let tls = tls_support::connect(w.addr(), &client, "localhost").expect("tls");
    let url = format!("ws://localhost:{}/ws", w.port);
    let mut ws = match tungstenite::client(url, tls) {
        Ok((ws, _)) => ws,
        Err(e) => panic!("handshake: {e:?}"),
    };
    echoes(&mut ws, "over tls");
    let aux = std::net::SocketAddr::from(([127, 0, 0, 1], w.aux_port));
    let mut raw = tls_support::connect(aux, &client, "localhost").expect("tls");
    raw.sock
        .set_write_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    raw.write_all(
        b"GET /raw HTTP/1.1\r\nHost: localhost\r\nUpgrade: x-raw\r\nConnection: Upgrade\r\n\r\n",
    )
    .expect("upgrade");
    switched(&mut raw);
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'y'; 16 * 1024];
        let mut sent = 0u64;
        loop {
            match raw.write_all(&chunk) {
                Ok(()) => sent += chunk.len() as u64,
                Err(e) => return (sent, e),
            }
        }
    });
    common::eventually("the app gets the client's bytes", || {
        sunk.load(Ordering::Relaxed) > 0
    });
    deploy(&w, &with_raw, 1, |t| {
        t.replace(
            "open_to_public = true",
            "open_to_public = true\nallowed_client_ips = \"10.0.0.0/8\"",
        )
    });
    assert_eq!(closed_with(&mut ws), 1001);
    let (_, end) = writer.join().expect("writer");
    assert!(
        !matches!(
            end.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "the revoked tunnel still took bytes until the client's timeout: {end}"
    );
    common::eventually("both tunnels revoked", || revoked(&w) == 2);
    common::eventually("no tunnel left open", || {
        common::metric_all_cores(&w, "appproxy_tunnels_active") == 0
    });
}

/// Changes that still admit the clients leave every tunnel open: a whole-set reload
/// that changes nothing, the allowlist re-ordered, the routes changed. A revoked
/// tunnel leaves nothing behind (no descriptor, no tunnel counted), and the slots it
/// freed, taken by a tunnel of another circuit, are not revoked by a later change
/// of its circuit.
#[test]
fn changes_that_still_admit_close_nothing_and_revocation_leaves_nothing_behind() {
    let app = echo_app();
    let raw = raw_upgrade_app(None);
    let raw2 = raw_upgrade_app(None);
    let w = Worker::start(WorkerOpts {
        cores: 1,
        upstreams: vec![app.addr],
        circuit_extra: "open_to_public = true\nallowed_client_ips = \"10.0.0.0/8, 127.0.0.0/8\""
            .into(),
        ..Default::default()
    });
    let original = config(&w);
    let with_raw = format!(
        "{original}\n[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455550002\"\nport = {}\nopen_to_public = true\nallowed_client_ips = \"192.168.0.0/16, 127.0.0.1\"\nroute_info = [{{ session_id = \"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\", kernel_host = \"127.0.0.1\", kernel_port = {} }}]\n",
        w.aux_port,
        raw.port()
    );
    deploy(&w, &original, 1, |_| with_raw.clone());
    let at_rest = common::resting_fds(&w);
    let mut ws = session(&w);
    echoes(&mut ws, "opened");
    let mut upgraded = raw_upgrade(w.aux_port, "opened");
    let check = |ws: &mut Ws, upgraded: &mut TcpStream, what: &str| {
        echoes(ws, what);
        upgraded.write_all(what.as_bytes()).expect("write");
        let mut echo = vec![0u8; what.len()];
        upgraded.read_exact(&mut echo).expect("echo");
        assert_eq!(echo, what.as_bytes());
        assert_eq!(revoked(&w), 0, "{what}");
    };
    // The same set again (a comment changes the file).
    let same = format!("{with_raw}\n# touched\n");
    deploy(&w, &with_raw, 1, |_| same.clone());
    check(&mut ws, &mut upgraded, "the same set again");
    // Both allowlists re-ordered.
    let reordered = same
        .replace(
            "\"10.0.0.0/8, 127.0.0.0/8\"",
            "\" 127.0.0.0/8 ,10.0.0.0/8\"",
        )
        .replace(
            "\"192.168.0.0/16, 127.0.0.1\"",
            "\"127.0.0.1/32, 192.168.0.0/16\"",
        );
    deploy(&w, &same, 1, |_| reordered.clone());
    check(&mut ws, &mut upgraded, "allowlists re-ordered");
    // The raw circuit's route moved to another app, the session's renamed.
    let rerouted = reordered
        .replace(
            &format!("kernel_port = {} }}", raw.port()),
            &format!("kernel_port = {} }}", raw2.port()),
        )
        .replace("app = \"test\"", "app = \"renamed\"");
    deploy(&w, &reordered, 1, |_| rerouted.clone());
    check(&mut ws, &mut upgraded, "routes changed");
    // The session's circuit narrows past the client: only the session closes.
    let narrowed = rerouted.replace("\" 127.0.0.0/8 ,10.0.0.0/8\"", "\"10.0.0.0/8\"");
    deploy(&w, &rerouted, 1, |_| narrowed.clone());
    assert_eq!(closed_with(&mut ws), 1001);
    drop(ws);
    common::eventually("the session revoked", || revoked(&w) == 1);
    upgraded.write_all(b"still").expect("write");
    let mut echo = [0u8; 5];
    upgraded.read_exact(&mut echo).expect("echo");
    assert_eq!(&echo, b"still");
    // The revoked session's slots go to new tunnels of the other circuit; the
    // session's circuit is then removed: they stay.
    let mut more: Vec<TcpStream> = (0..4)
        .map(|i| raw_upgrade(w.aux_port, &format!("new {i}")))
        .collect();
    let cut = narrowed
        .find("\n[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455550002\"")
        .expect("second circuit");
    let head = &narrowed[..narrowed.find("[[circuits]]").expect("first circuit")];
    let only_raw = format!("{head}{}", &narrowed[cut..]);
    deploy(&w, &narrowed, 1, |_| only_raw.clone());
    for (i, s) in more
        .iter_mut()
        .chain(std::iter::once(&mut upgraded))
        .enumerate()
    {
        let what = format!("after the removal {i}");
        s.write_all(what.as_bytes()).expect("write");
        let mut echo = vec![0u8; what.len()];
        s.read_exact(&mut echo).expect("echo");
        assert_eq!(echo, what.as_bytes());
    }
    common::eventually("counted as revoked", || revoked(&w) == 1);
    // All closed by the clients: nothing left behind.
    drop(more);
    drop(upgraded);
    common::eventually("no tunnel left open", || {
        common::metric_all_cores(&w, "appproxy_tunnels_active") == 0
    });
    common::eventually("every descriptor of the tunnels closed", || {
        // The removed circuit's listener is gone too.
        common::open_fds(w.pid()).0 < at_rest
    });
}

/// A session admitted on its user's permit stays through changes that still admit
/// it (a wider allowlist, the circuit made public, then private again for the same
/// user) and closes when the circuit is given to another user.
#[test]
fn a_permit_session_stays_while_its_user_owns_the_circuit() {
    use appproxy_dataplane::auth::{permit_value, PermitDigest};
    use tungstenite::client::IntoClientRequest;
    const USER: &str = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
    const OTHER: &str = "0f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
    let app = echo_app();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        extra: "[secrets]\npermit_secret = \"permit-key\"\n".into(),
        circuit_extra: format!(
            "open_to_public = false\napp_mode = \"interactive\"\nuser_id = \"{USER}\""
        ),
        ..Default::default()
    });
    let original = config(&w);
    let stream = TcpStream::connect(w.addr()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut request = format!("ws://127.0.0.1:{}/ws", w.port)
        .into_client_request()
        .expect("request");
    let permit = permit_value(
        "permit-key",
        &USER.parse().expect("uuid"),
        PermitDigest::Sha256,
    );
    request.headers_mut().insert(
        "cookie",
        format!("appproxy_permit=\"{permit}\"")
            .parse()
            .expect("cookie"),
    );
    let mut ws = match tungstenite::client(request, Uninterrupted(stream)) {
        Ok((ws, _)) => ws,
        Err(e) => panic!("handshake: {e:?}"),
    };
    echoes(&mut ws, "admitted on the permit");
    let wider = original.replace(
        "user_id = ",
        "allowed_client_ips = \"127.0.0.1, 10.0.0.0/8\"\nuser_id = ",
    );
    deploy(&w, &original, 1, |_| wider.clone());
    echoes(&mut ws, "a wider allowlist");
    let public = wider.replace("open_to_public = false", "open_to_public = true");
    deploy(&w, &wider, 1, |_| public.clone());
    echoes(&mut ws, "made public");
    deploy(&w, &public, 1, |_| wider.clone());
    echoes(&mut ws, "private again, same user");
    assert_eq!(revoked(&w), 0);
    deploy(&w, &wider, 1, |t| t.replace(USER, OTHER));
    assert_eq!(closed_with(&mut ws), 1001);
    common::eventually("counted as revoked", || revoked(&w) == 1);
    let lines = w.wait_log("why", |v| {
        v["message"] == "closing tunnels a deployment no longer admits"
    });
    assert!(
        lines[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("credential")),
        "{lines:?}"
    );
}

/// A WebSocket app that sends without pause, to every session.
fn ws_firehose() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(mut ws) = tungstenite::accept(stream) else {
                    return;
                };
                let message = vec![b'z'; 8 * 1024];
                while ws.send(Message::Binary(message.clone().into())).is_ok() {}
            });
        }
    });
    addr
}

/// A session whose app never stops sending (and a client that keeps sending too)
/// still ends when its circuit is removed: every turn of the relay sees the
/// revocation.
#[test]
fn a_session_busy_both_ways_ends_when_its_circuit_is_removed() {
    let app = ws_firehose();
    let w = Worker::start(WorkerOpts {
        cores: 2,
        upstreams: vec![app],
        ..Default::default()
    });
    let original = config(&w);
    let mut sessions: Vec<Ws> = (0..4).map(|_| session(&w)).collect();
    for ws in &mut sessions {
        assert!(matches!(ws.read().expect("message"), Message::Binary(_)));
        ws.send(Message::Text("from the client".into()))
            .expect("send");
    }
    deploy(&w, &original, 2, |t| {
        t.replacen(
            "c0a8f5d2-1111-4222-8333-444455556666",
            "c0a8f5d2-1111-4222-8333-444455550003",
            1,
        )
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    for ws in &mut sessions {
        loop {
            let _ = ws.send(Message::Text("still sending".into()));
            match ws.read() {
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => assert!(
                    Instant::now() < deadline,
                    "the revoked session is still relaying"
                ),
            }
        }
    }
    common::eventually("every session revoked", || revoked(&w) == 4);
    common::eventually("no tunnel left open", || {
        common::metric_all_cores(&w, "appproxy_tunnels_active") == 0
    });
}

/// Whether some socket of the machine is connecting to 127.0.0.1:`port` (its SYN
/// unanswered: `SYN_SENT` in `/proc/net/tcp`).
fn connecting_to(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let remote = format!("0100007F:{port:04X}");
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(2) == Some(&remote.as_str()) && fields.get(3) == Some(&"02")
    })
}

/// A TCP circuit whose app connect hangs (the app's accept queue is full: its SYN is
/// dropped, then retried) while the circuit is removed: once the connect completes,
/// nothing passes either way (the app's banner, the client's early bytes), and the
/// tunnel ends, counted as revoked.
#[test]
fn a_tcp_connection_whose_app_connect_hangs_while_removed_passes_nothing() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = listener.local_addr().expect("addr");
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        circuit_extra: "protocol = \"tcp\"".into(),
        extra: "[timeouts]\nupstream_connect_secs = 60\n".into(),
        ..Default::default()
    });
    // The app's end of the worker's readiness connection, closed: the worker at rest.
    listener.set_nonblocking(true).expect("nonblocking");
    let mut probes = 0;
    common::eventually("the readiness connection's tunnel closed", || {
        while let Ok((c, _)) = listener.accept() {
            drop(c);
            probes += 1;
        }
        probes > 0 && common::metric_all_cores(&w, "appproxy_tunnels_active") == 0
    });
    listener.set_nonblocking(false).expect("blocking");
    let original = config(&w);
    // Fill the accept queue, then shrink it to nothing: the next SYN is dropped.
    let filler = TcpStream::connect(app).expect("filler");
    socket2::SockRef::from(&listener).listen(0).expect("listen");
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.write_all(b"sent before the removal")
        .expect("early bytes");
    common::eventually("the worker connecting to the app", || {
        connecting_to(app.port())
    });
    deploy(&w, &original, 1, |t| {
        t.replacen(
            "c0a8f5d2-1111-4222-8333-444455556666",
            "c0a8f5d2-1111-4222-8333-444455550003",
            1,
        )
    });
    // Room in the queue: the retried SYN gets through.
    drop(filler);
    let (app_got, app_side) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            let _ = c.write_all(b"banner of the app");
            c.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            let mut got = Vec::new();
            let _ = c.read_to_end(&mut got);
            let _ = app_got.send(got);
        }
    });
    assert_eq!(
        common::read_until_closed(&mut s),
        b"",
        "nothing of the app's reaches the client"
    );
    let line = revoked_tcp_line(&w, &s);
    assert_eq!(line["bytes_to_app"], 0, "{line}");
    // The filler and the worker's connection (some order): neither got a byte.
    for _ in 0..2 {
        let got = app_side
            .recv_timeout(Duration::from_secs(30))
            .expect("the app's connections end");
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    }
}

/// A gRPC app on raw frames: every stream is answered with a head at once and held
/// open, each DATA frame echoed back on its stream; the streams it saw reset are
/// counted.
fn grpc_echo_app() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use appproxy_test_support::h2frames::{
        block, frame, serve_raw_app, DATA, END_HEADERS, HEADERS, RST_STREAM,
    };
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let resets = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = resets.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let seen = seen.clone();
            std::thread::spawn(move || {
                serve_raw_app(s, |(ty, _, id, payload)| match *ty {
                    HEADERS => frame(
                        HEADERS,
                        END_HEADERS,
                        *id,
                        &block(&[(b":status", b"200"), (b"content-type", b"application/grpc")]),
                    ),
                    DATA if !payload.is_empty() => frame(DATA, 0, *id, payload),
                    RST_STREAM => {
                        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        Vec::new()
                    }
                    _ => Vec::new(),
                })
            });
        }
    });
    (addr, resets)
}

/// A gRPC stream lives as long as a WebSocket session, carrying input to its app
/// for hours: a deployment that no longer admits its client ends it as it does a
/// tunnel. An HTTP/2 client's stream is reset (the app's too) while a change that
/// still admits it leaves it echoing; a bridged HTTP/1.1 client's connection is
/// closed. Before, both streamed on after the circuit was narrowed or removed.
#[test]
fn grpc_streams_end_when_a_deployment_no_longer_admits_them() {
    use appproxy_test_support::h2frames::{
        self, frame, read_frame, request, DATA, END_HEADERS, HEADERS, RST_STREAM,
    };
    let (app, app_resets) = grpc_echo_app();
    let w = Worker::start(WorkerOpts {
        cores: 1,
        upstreams: vec![app],
        circuit_extra: "protocol = \"grpc\"\nopen_to_public = true\nallowed_client_ips = \"10.0.0.0/8, 127.0.0.0/8\""
            .into(),
        ..Default::default()
    });
    let original = config(&w);
    // An HTTP/2 client's stream: its head, then one message echoed.
    let mut h = h2frames::connect(w.addr());
    h.write_all(&frame(
        HEADERS,
        END_HEADERS,
        1,
        &request(
            "POST",
            "/pkg.Svc/Chat",
            &[(b"content-type", b"application/grpc"), (b"te", b"trailers")],
        ),
    ))
    .expect("headers");
    let echo = |h: &mut TcpStream, message: &[u8]| {
        h.write_all(&frame(DATA, 0, 1, message)).expect("data");
        loop {
            match read_frame(h) {
                Some((DATA, _, 1, p)) if !p.is_empty() => return p,
                Some((RST_STREAM, _, 1, _)) | None => panic!("the stream ended"),
                Some(_) => {}
            }
        }
    };
    assert_eq!(echo(&mut h, b"\0\0\0\0\x01a"), b"\0\0\0\0\x01a");
    // A bridged HTTP/1.1 client's call (its request whole, the app's answer held
    // open): its answer's head came.
    let mut c = common::Client::connect(w.addr());
    c.send(b"POST /pkg.Svc/Chat HTTP/1.1\r\nHost: t\r\nContent-Type: application/grpc\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n\0\0\0\0\x01b\r\n0\r\n\r\n");
    assert_eq!(c.head().0, 200);

    // A bridged upload still sending its body.
    let mut u = common::Client::connect(w.addr());
    u.send(b"POST /pkg.Svc/Upload HTTP/1.1\r\nHost: t\r\nContent-Type: application/grpc\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n\0\0\0\0\x01u\r\n");

    // A change that still admits both: the stream goes on.
    deploy(&w, &original, 1, |t| {
        t.replace("10.0.0.0/8, 127.0.0.0/8", "127.0.0.0/8")
    });
    assert_eq!(echo(&mut h, b"\0\0\0\0\x01c"), b"\0\0\0\0\x01c");
    assert_eq!(revoked(&w), 0);

    // The allowlist no longer admits the loopback clients.
    let narrowed = config(&w);
    deploy(&w, &narrowed, 1, |t| t.replace("127.0.0.0/8", "10.0.0.0/8"));
    let reset = loop {
        match read_frame(&mut h) {
            Some((RST_STREAM, _, 1, _)) => break true,
            Some(_) => {}
            None => break false,
        }
    };
    assert!(reset, "the HTTP/2 client's stream was not reset");
    common::eventually("the bridged client's connection closed", || c.is_closed());
    // The upload is cut without an answer: a revocation is no 408.
    let mut cut = Vec::new();
    let _ = u.reader.read_to_end(&mut cut);
    assert!(cut.is_empty(), "{:?}", String::from_utf8_lossy(&cut));
    common::eventually("the three app streams reset", || {
        app_resets.load(std::sync::atomic::Ordering::SeqCst) == 3
    });
    common::eventually("counted as revoked", || revoked(&w) == 3);
}

/// An HTTP/1.1 app streaming server-sent events on every request (chunked, never
/// ending); the connections it saw end (its write failed) are counted.
fn sse_app() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let ended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = ended.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let count = count.clone();
            std::thread::spawn(move || {
                let (mut head, mut byte) = (Vec::new(), [0u8; 1]);
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read_exact(&mut byte).is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let mut out = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                loop {
                    out.extend_from_slice(b"9\r\ndata: x\n\n\r\n");
                    if s.write_all(&out).is_err() {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        return;
                    }
                    out.clear();
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
    });
    (addr, ended)
}

/// A response of no set length (server-sent events, an inference token stream)
/// runs for as long as its app writes: a deployment that no longer admits its
/// client ends it as it does a tunnel, for an HTTP/1.1 client (its connection and
/// the app's closed) and an HTTP/2 one (its stream reset). Before, both streamed
/// on after the circuit was narrowed.
#[test]
fn event_streams_end_when_a_deployment_no_longer_admits_them() {
    use appproxy_test_support::h2frames::{
        self, frame, read_frame, request, END_HEADERS, END_STREAM, HEADERS, RST_STREAM,
    };
    let (app, app_ended) = sse_app();
    let w = Worker::start(WorkerOpts {
        cores: 1,
        upstreams: vec![app],
        circuit_extra: "open_to_public = true\nallowed_client_ips = \"127.0.0.0/8\"".into(),
        ..Default::default()
    });
    let original = config(&w);
    let mut c = common::Client::connect(w.addr());
    c.send(b"GET /events HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.head().0, 200);
    let mut h = h2frames::connect(w.addr());
    h.write_all(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &request("GET", "/events", &[]),
    ))
    .expect("headers");
    let mut answered = false;
    while !answered {
        match read_frame(&mut h) {
            Some((HEADERS, _, 1, _)) => answered = true,
            Some(_) => {}
            None => panic!("no answer on the HTTP/2 stream"),
        }
    }
    narrow_to_elsewhere_from(&w, &original, "127.0.0.0/8");
    let reset = loop {
        match read_frame(&mut h) {
            Some((RST_STREAM, _, 1, _)) => break true,
            Some(_) => {}
            None => break false,
        }
    };
    assert!(reset, "the HTTP/2 client's event stream was not reset");
    common::eventually("the HTTP/1.1 client's connection closed", || {
        let mut buf = [0u8; 4096];
        matches!(c.reader.read_uninterrupted(&mut buf), Ok(0) | Err(_))
    });
    common::eventually("both of the app's streams ended", || {
        app_ended.load(std::sync::atomic::Ordering::SeqCst) == 2
    });
    common::eventually("counted as revoked", || revoked(&w) == 2);
}

/// Deploys the original circuit with its allowlist `from` replaced by 10.0.0.0/8,
/// which no longer admits the test's loopback clients.
fn narrow_to_elsewhere_from(w: &Worker, original: &str, from: &str) {
    deploy(w, original, 1, |t| t.replace(from, "10.0.0.0/8"));
}
