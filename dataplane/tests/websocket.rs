//! WebSocket through the worker, against an independent implementation
//! (tungstenite) on both ends: echo of text, binary, 1 MiB and fragmented messages,
//! ping/pong, close codes, subprotocols, refused upgrades, malformed frames,
//! per-message IDs, drain, and the idle timeout (counted as an open tunnel, then a
//! `tunnel_idle` timeout).
#![allow(clippy::result_large_err)]

mod common;

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

type Client = tungstenite::WebSocket<TcpStream>;

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
    tungstenite::client(req, stream).map_err(|e| match e {
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
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("101 head");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
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
