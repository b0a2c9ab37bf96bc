//! WebSocket through the worker, against an independent implementation
//! (tungstenite) on both ends: echo of text, binary, 1 MiB and fragmented messages,
//! ping/pong, close codes, subprotocols, refused upgrades, malformed frames,
//! per-message IDs, drain, and the idle timeout (counted as an open tunnel, then a
//! `tunnel_idle` timeout), and that every way a tunnel ends (raw upgrades too) releases
//! both of its connections.
#![allow(clippy::result_large_err)]

mod common;

use appproxy_test_support::net::Uninterrupted;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::ws::{echo_app, EchoApp};
use common::{Worker, WorkerOpts};
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;

fn worker_for(app: &EchoApp, extra_worker: &str) -> Worker {
    Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        extra: extra_worker.into(),
        ..Default::default()
    })
}

type Client = tungstenite::WebSocket<Uninterrupted<TcpStream>>;

fn connect(
    w: &Worker,
    path: &str,
    protocols: Option<&str>,
) -> Result<(Client, tungstenite::handshake::client::Response), tungstenite::Error> {
    use tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://127.0.0.1:{}{path}", w.port)
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "X-Backend-Request-ID",
        "ws-session-1".parse().expect("value"),
    );
    if let Some(p) = protocols {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse().expect("value"));
    }
    let stream = TcpStream::connect(w.addr()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    tungstenite::client(req, Uninterrupted(stream)).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(e) => e,
        tungstenite::HandshakeError::Interrupted(_) => tungstenite::Error::ConnectionClosed,
    })
}

fn read_data(ws: &mut Client) -> Message {
    loop {
        let m = ws.read().expect("message");
        if matches!(
            m,
            Message::Text(_) | Message::Binary(_) | Message::Pong(_) | Message::Close(_)
        ) {
            return m;
        }
    }
}

#[test]
fn echo_through_the_worker() {
    let app = echo_app();
    let w = worker_for(&app, "");
    let (mut ws, resp) = connect(&w, "/ws", None).expect("handshake");
    assert_eq!(resp.status(), 101);
    assert_eq!(
        resp.headers()
            .get("x-backend-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("ws-session-1")
    );
    ws.send(Message::Text("hello".into())).expect("send");
    assert_eq!(read_data(&mut ws), Message::Text("hello".into()));
    ws.send(Message::Binary(vec![0u8, 1, 2, 255].into()))
        .expect("send");
    assert_eq!(
        read_data(&mut ws),
        Message::Binary(vec![0u8, 1, 2, 255].into())
    );
    let big: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    ws.send(Message::Binary(big.clone().into()))
        .expect("send 1 MiB");
    assert_eq!(read_data(&mut ws), Message::Binary(big.into()));
    // Fragmented: three frames, a ping in the middle.
    ws.write(Message::Frame(Frame::message(
        "frag",
        OpCode::Data(Data::Text),
        false,
    )))
    .expect("frame");
    ws.write(Message::Ping(b"mid".to_vec().into()))
        .expect("ping");
    ws.write(Message::Frame(Frame::message(
        "ment",
        OpCode::Data(Data::Continue),
        false,
    )))
    .expect("frame");
    ws.write(Message::Frame(Frame::message(
        "ed",
        OpCode::Data(Data::Continue),
        true,
    )))
    .expect("frame");
    ws.flush().expect("flush");
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(read_data(&mut ws));
    }
    assert!(
        got.contains(&Message::Pong(b"mid".to_vec().into())),
        "{got:?}"
    );
    assert!(got.contains(&Message::Text("fragmented".into())), "{got:?}");
    // A close code reaches the app unchanged.
    ws.close(Some(CloseFrame {
        code: 4000.into(),
        reason: "bye".into(),
    }))
    .expect("close");
    while ws.read().is_ok() {}
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while app.closes.lock().expect("closes").is_empty() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(app.closes.lock().expect("closes")[0], 4000);
    // The session's close line carries the upgrade request's ID and its counts.
    let closed = w.wait_log("session close line", |v| {
        v["message"] == "websocket session closed"
    });
    assert_eq!(closed[0]["request_id"], "ws-session-1");
    assert!(closed[0]["messages_to_app"].as_u64().expect("count") >= 4);
}

#[test]
fn subprotocols_and_refused_upgrades() {
    let app = echo_app();
    let w = worker_for(&app, "");
    let (_ws, resp) = connect(&w, "/ws", Some("superchat, chat")).expect("handshake");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("chat")
    );
    match connect(&w, "/refuse", None) {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected the app's 403, got {other:?}"),
    }
}

/// Opens a raw socket and performs the handshake by hand.
fn raw_session(w: &Worker) -> TcpStream {
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").expect("handshake");
    common::upgrade::switched(&mut s);
    s
}

fn read_close_code(s: &mut TcpStream) -> u16 {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).expect("frame header");
    assert_eq!(h[0], 0x88, "a close frame");
    let mut payload = vec![0u8; (h[1] & 0x7f) as usize];
    s.read_exact(&mut payload).expect("close payload");
    u16::from_be_bytes([payload[0], payload[1]])
}

#[test]
fn malformed_frames_close_both_sides_with_1002() {
    let app = echo_app();
    let w = worker_for(&app, "");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unmasked client frame", vec![0x81, 0x02, b'h', b'i']),
        ("reserved opcode", vec![0x83, 0x80, 1, 2, 3, 4]),
        (
            "RSV1 without extension",
            vec![0xC1, 0x81, 1, 2, 3, 4, b'x' ^ 1],
        ),
        ("fragmented ping", vec![0x09, 0x80, 1, 2, 3, 4]),
    ];
    for (i, (what, frame)) in cases.into_iter().enumerate() {
        let mut s = raw_session(&w);
        s.write_all(&frame).expect("frame");
        assert_eq!(read_close_code(&mut s), 1002, "{what}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while app.closes.lock().expect("closes").len() <= i {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: the app got no close"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(app.closes.lock().expect("closes")[i], 1002, "{what}");
    }
}

#[test]
fn per_message_ids_and_drain_with_1001() {
    let app = echo_app();
    let mut w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        extra: "[timeouts]\ndrain_secs = 5\n".into(),
        worker_extra: "ws_message_ids = \"per-message\"".into(),
        ..Default::default()
    });
    let (mut ws, _) = connect(&w, "/ws", None).expect("handshake");
    ws.send(Message::Text("one".into())).expect("send");
    assert_eq!(read_data(&mut ws), Message::Text("one".into()));
    let lines = w.wait_log("per-message line", |v| v["message"] == "websocket message");
    let ids: Vec<&str> = lines
        .iter()
        .filter_map(|v| v["request_id"].as_str())
        .collect();
    assert!(ids.contains(&"ws-session-1-msg-00000001"), "{ids:?}");
    // A message's line is in the session's span, so the trace tool finds each from
    // the other.
    let opened = w.wait_log("session line", |v| {
        v["message"] == "websocket session opened"
    });
    let session = &opened[0];
    assert!(session["trace_id"].is_string(), "{session}");
    for m in &lines {
        assert_eq!(m["trace_id"], session["trace_id"], "{m}");
        assert_eq!(m["span_id"], session["span_id"], "{m}");
    }
    // SIGTERM: the client is told 1001 (going away) and the worker exits 0.
    let status_thread = std::thread::spawn(move || {
        let status = w.terminate();
        (status, w)
    });
    let code = loop {
        match ws.read() {
            Ok(Message::Close(Some(f))) => break u16::from(f.code),
            Ok(Message::Close(None)) => break 1005,
            Ok(_) => {}
            Err(e) => panic!("no close frame before the socket ended: {e}"),
        }
    };
    assert_eq!(code, 1001);
    let (status, _w) = status_thread.join().expect("terminate");
    assert!(status.success());
}

/// A WebSocket session is an open tunnel at `/metrics` while it lasts; silent for
/// `[timeouts] tunnel_idle_secs`, it is closed with 1001 and counted as a
/// `tunnel_idle` timeout.
#[test]
fn an_idle_session_is_an_open_tunnel_then_a_tunnel_idle_timeout() {
    let app = echo_app();
    let w = worker_for(&app, "[timeouts]\ntunnel_idle_secs = 1");
    let (mut ws, _) = connect(&w, "/ws", None).expect("handshake");
    ws.send(Message::Text("hello".into())).expect("send");
    assert_eq!(read_data(&mut ws), Message::Text("hello".into()));
    common::eventually("the session shows as an open tunnel", || {
        common::metric(&w, "appproxy_tunnels_active") == 1
    });
    // Silence: the worker ends the session.
    match read_data(&mut ws) {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1001),
        other => panic!("expected a close frame, got {other:?}"),
    }
    common::eventually("the tunnel closed for idleness", || {
        let text = w.admin_get("/metrics").text();
        common::metric(&w, "appproxy_tunnels_active") == 0
            && text.contains("appproxy_timeouts_total{core=\"0\",kind=\"tunnel_idle\"} 1\n")
    });
}

/// A masked client text frame (the mask is fixed: the worker only checks there is one).
fn masked_text(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut f = vec![0x81, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Waits until no tunnel is open and the worker holds no more descriptors than it
/// did before the tunnels: both connections of every tunnel were released.
fn all_released(w: &Worker, before: u64, what: &str) {
    common::eventually(&format!("{what}: no tunnel left open"), || {
        common::metric(w, "appproxy_tunnels_active") == 0
    });
    common::eventually(&format!("{what}: descriptors back to {before}"), || {
        common::open_fds(w.pid()).0 <= before
    });
}

/// However a tunnel ends — the client closes it cleanly, vanishes with bytes in
/// flight, or goes silent until the idle timeout — each direction's relay stops and
/// both connections are released: no tunnel stays open, no descriptor stays held.
/// For WebSocket sessions and raw upgrades alike.
#[test]
fn every_way_a_tunnel_ends_releases_both_connections() {
    const EACH: usize = 12;
    let app = echo_app();
    let w = worker_for(&app, "[timeouts]\ntunnel_idle_secs = 1");
    let before = common::resting_fds(&w);
    let mut silent = Vec::new();
    for i in 0..EACH {
        // A clean close, answered.
        let (mut ws, _) = connect(&w, "/ws", None).expect("handshake");
        ws.send(Message::Text(format!("clean {i}").into()))
            .expect("send");
        assert_eq!(
            read_data(&mut ws),
            Message::Text(format!("clean {i}").into())
        );
        ws.close(None).expect("close");
        while ws.read().is_ok() {}
        // The client vanishes with its echo unread (the kernel resets).
        let mut s = raw_session(&w);
        s.write_all(&masked_text(b"gone")).expect("frame");
        drop(s);
        // Silence until the idle timeout ends it.
        silent.push(raw_session(&w));
    }
    all_released(&w, before, "websocket");
    for s in &mut silent {
        assert_eq!(read_close_code(s), 1001, "the idle session was told 1001");
    }
    drop(w);

    let app = common::upgrade::raw_upgrade_app(None);
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        extra: "[timeouts]\ntunnel_idle_secs = 1".into(),
        ..Default::default()
    });
    let before = common::resting_fds(&w);
    let mut silent = Vec::new();
    for i in 0..EACH {
        // The client half-closes; the app sees end of stream and closes too.
        let mut s = common::upgrade::raw_upgrade(w.port, &format!("clean {i}"));
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("end of stream");
        assert!(rest.is_empty(), "nothing after the echo: {rest:?}");
        // The client vanishes with bytes in flight.
        let mut s = common::upgrade::raw_upgrade(w.port, &format!("gone {i}"));
        s.write_all(b"unread echo").expect("bytes");
        drop(s);
        silent.push(common::upgrade::raw_upgrade(w.port, &format!("silent {i}")));
    }
    all_released(&w, before, "raw upgrade");
}

/// Once its 101 is out, a session is relayed by a task of its own and the
/// connection's task ends (an idle session no longer keeps the ~6 KiB a connection's
/// HTTP/1.1 future takes); what that task owed is kept whole. While the session is
/// open it counts as an open connection and tunnel and has no access line; when it
/// ends it has exactly one, in its request's context, with status 101 and the session's bytes beside the handshake's; the counts fall back.
/// For WebSocket sessions and raw upgrades alike.
#[test]
fn a_handed_off_session_is_counted_until_it_ends_and_logged_once_with_its_bytes() {
    let access_lines = |w: &Worker, id: &str| {
        w.log_json()
            .into_iter()
            .filter(|v| v["target"] == "access" && v["request_id"] == id)
            .collect::<Vec<_>>()
    };
    let open_counts = |w: &Worker| {
        (
            common::metric(w, "appproxy_connections_active"),
            common::metric(w, "appproxy_tunnels_active"),
        )
    };
    let app = echo_app();
    let w = worker_for(&app, "");
    let (mut ws, _) = connect(&w, "/ws", None).expect("handshake");
    let payload = vec![b'x'; 1000];
    ws.send(Message::Binary(payload.clone().into()))
        .expect("send");
    assert_eq!(read_data(&mut ws), Message::Binary(payload.into()));
    // (Gauges are published by the core's next tick.)
    common::eventually("the open session counted", || open_counts(&w) == (1, 1));
    assert!(
        access_lines(&w, "ws-session-1").is_empty(),
        "no access line while the session is open"
    );
    ws.close(None).expect("close");
    while ws.read().is_ok() {}
    let line = w.wait_access_line("ws-session-1");
    assert_eq!(line["status"], 101, "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    let closed = w.wait_log("session close line", |v| {
        v["message"] == "websocket session closed"
    });
    assert_eq!(
        (&closed[0]["request_id"], &closed[0]["span_id"]),
        (&line["request_id"], &line["span_id"]),
        "the session and its access line in the request's context: {line}"
    );
    assert!(line["span_id"].is_string(), "{line}");
    // The 1000-byte message (with its masked frame's 8-byte header) on top of the
    // handshake, each way.
    let (bytes_in, bytes_out) = (
        line["bytes_in"].as_u64().expect("bytes_in"),
        line["bytes_out"].as_u64().expect("bytes_out"),
    );
    assert!(bytes_in > 1008 + 100, "{line}");
    assert!(bytes_out > 1004 + 100, "{line}");
    common::eventually(
        "the session's connection and tunnel no longer counted",
        || open_counts(&w) == (0, 0),
    );
    assert_eq!(
        access_lines(&w, "ws-session-1").len(),
        1,
        "one line per session"
    );
    drop(w);

    let app = common::upgrade::raw_upgrade_app(None);
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        ..Default::default()
    });
    let mut s = common::upgrade::raw_upgrade(w.port, "raw 1");
    common::eventually("the open raw tunnel counted", || open_counts(&w) == (1, 1));
    let tunnel_lines = |w: &Worker| {
        w.log_json()
            .into_iter()
            .filter(|v| v["target"] == "access" && v["status"] == 101)
            .collect::<Vec<_>>()
    };
    assert!(
        tunnel_lines(&w).is_empty(),
        "no access line while the tunnel is open"
    );
    s.write_all(&[b'y'; 5000]).expect("bytes");
    let mut echoed = vec![0u8; 5000];
    s.read_exact(&mut echoed).expect("echo");
    assert_eq!(echoed, vec![b'y'; 5000]);
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("end of stream");
    common::eventually("the raw tunnel's access line", || {
        !tunnel_lines(&w).is_empty()
    });
    let lines = tunnel_lines(&w);
    assert_eq!(lines.len(), 1, "one line per tunnel: {lines:?}");
    let closed = w.wait_log("tunnel close line", |v| {
        v["message"] == "upgraded connection closed"
    });
    assert_eq!(
        closed[0]["request_id"], lines[0]["request_id"],
        "the tunnel and its access line in the request's context"
    );
    assert!(
        lines[0]["bytes_in"].as_u64().expect("bytes_in") > 5000,
        "{}",
        lines[0]
    );
    assert!(
        lines[0]["bytes_out"].as_u64().expect("bytes_out") > 5000,
        "{}",
        lines[0]
    );
    common::eventually("the raw tunnel no longer counted", || {
        open_counts(&w) == (0, 0)
    });
}

/// Every line of a session carries its own connection's fields (`conn`, `peer`), even
/// while other sessions on the same core relay in between: a connection's span is
/// entered around each poll of its tasks, never held across an await.
#[test]
fn interleaved_sessions_log_under_their_own_connection() {
    let app = echo_app();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app.addr],
        worker_extra: "ws_message_ids = \"per-message\"".into(),
        ..Default::default()
    });
    let open = |id: &str| {
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let head = format!("GET /ws HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: {id}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
        s.write_all(head.as_bytes()).expect("handshake");
        let (mut got, mut byte) = (Vec::new(), [0u8; 1]);
        while !got.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).expect("101 head");
            got.push(byte[0]);
        }
        assert!(got.starts_with(b"HTTP/1.1 101"), "{id}");
        let peer = s.local_addr().expect("addr").to_string();
        (s, peer)
    };
    let mut sessions = [open("log-a"), open("log-b"), open("log-c")];
    for round in 0..4 {
        for (s, _) in &mut sessions {
            let text = format!("round {round}");
            s.write_all(&masked_text(text.as_bytes())).expect("frame");
            let mut echo = vec![0u8; 2 + text.len()];
            s.read_exact(&mut echo).expect("echo");
            assert_eq!(&echo[2..], text.as_bytes());
        }
    }
    for (id, (_, peer)) in ["log-a", "log-b", "log-c"].iter().zip(&sessions) {
        let prefix = format!("{id}-msg-");
        let of_session = |v: &serde_json::Value| {
            v["message"] == "websocket message"
                && v["request_id"]
                    .as_str()
                    .is_some_and(|r| r.starts_with(&prefix))
        };
        // Four messages each way; lines are written in batches.
        let mut lines = Vec::new();
        common::eventually(&format!("{id}'s 8 message lines"), || {
            lines = w.log_json().into_iter().filter(of_session).collect();
            lines.len() >= 8
        });
        for v in lines {
            assert_eq!(v["peer"].as_str(), Some(peer.as_str()), "{id}: {v}");
        }
    }
}
