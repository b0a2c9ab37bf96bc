//! The WebSocket and HTTP Upgrade path under a hostile client and a hostile app, on
//! real sockets: the protocol a 101 names decides the tunnel, an upgrade request never
//! carries a body nor upgrades HTTP/1.0, a stream flowing one way is not idle, the
//! proxy's close frame never lands inside a frame it relays nor after a close the
//! peer already got, a clean close gets its answer (within a bounded wait), nothing
//! a peer sends after its close frame is relayed, RSV1
//! marks only a message's first frame, and a raw tunnel's close line counts the
//! bytes sent right behind the handshake.

mod common;

use appproxy_test_support::net::ReadUninterrupted;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Worker, WorkerOpts};

/// What a scripted app received on each connection: its request head, every byte
/// after it, and whether the connection has ended (the worker closed it, or it
/// failed): until then more bytes may come.
type Received = Arc<Mutex<Vec<(String, Vec<u8>, bool)>>>;

/// An app whose every connection reads one request head and hands it to `script`
/// with the stream; whatever the script leaves unread is read to the end and
/// recorded after the head.
fn scripted_app(
    script: impl Fn(&str, &mut TcpStream) + Send + Sync + 'static,
) -> (SocketAddr, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let received: Received = Arc::default();
    let (got, script) = (received.clone(), Arc::new(script));
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let (got, script) = (got.clone(), script.clone());
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(30)))
                    .expect("timeout");
                let (mut head, mut byte) = (Vec::new(), [0u8; 1]);
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read_exact(&mut byte).is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let i = {
                    let mut g = got.lock().expect("received");
                    g.push((head.clone(), Vec::new(), false));
                    g.len() - 1
                };
                script(&head, &mut s);
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read_uninterrupted(&mut buf) {
                    got.lock().expect("received")[i]
                        .1
                        .extend_from_slice(&buf[..n]);
                }
                got.lock().expect("received")[i].2 = true;
            });
        }
    });
    (addr, received)
}

fn worker(app: SocketAddr, extra: &str) -> Worker {
    Worker::start(WorkerOpts {
        upstreams: vec![app],
        extra: extra.into(),
        ..Default::default()
    })
}

const WS_HEADERS: &str =
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

const SWITCH_TO_WS: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

fn connect(w: &Worker) -> TcpStream {
    let s = TcpStream::connect(w.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s
}

/// Reads one response head.
fn read_head(s: &mut TcpStream) -> String {
    let (mut head, mut byte) = (Vec::new(), [0u8; 1]);
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Reads until the worker closes the connection (a reset counts as the end too).
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = s.read_uninterrupted(&mut buf) {
        all.extend_from_slice(&buf[..n]);
    }
    all
}

/// Waits until the app's `i`-th connection was closed by the worker (its reader
/// thread reached the end of the stream) and returns what it received after its
/// head.
fn app_got(received: &Received, i: usize) -> Vec<u8> {
    common::eventually("the app's connection ends", || {
        received
            .lock()
            .expect("received")
            .get(i)
            .is_some_and(|(_, _, ended)| *ended)
    });
    received.lock().expect("received")[i].1.clone()
}

/// A close frame's code, if `bytes` start with a close frame.
fn close_code(bytes: &[u8]) -> Option<u16> {
    match bytes {
        [0x88, 2, a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
        [0x88, 0x82, k0, k1, _, _, a, b, ..] => Some(u16::from_be_bytes([a ^ k0, b ^ k1])),
        _ => None,
    }
}

/// The handshake of a WebSocket session through `w` offering `upgrade`, with the
/// request ID `id`; returns the socket and the response head.
fn handshake(w: &Worker, upgrade: &str, id: &str) -> (TcpStream, String) {
    handshake_with(w, upgrade, id, "")
}

/// [`handshake`] with `extra` header lines (each ending in CRLF).
fn handshake_with(w: &Worker, upgrade: &str, id: &str, extra: &str) -> (TcpStream, String) {
    let mut c = connect(w);
    let head = format!(
        "GET /ws HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: {id}\r\nUpgrade: {upgrade}\r\n{WS_HEADERS}{extra}\r\n"
    );
    c.write_all(head.as_bytes()).expect("handshake");
    let head = read_head(&mut c);
    (c, head)
}

/// An unmasked client frame: a violation the worker must stop.
const UNMASKED: [u8; 4] = [0x81, 0x02, b'h', b'i'];

/// Whatever protocols the request lists, the tunnel is the one the app's 101 names:
/// a WebSocket session is inspected frame by frame even when the client offered
/// another protocol first (an app may pick `websocket` from a list), and a 101 to a
/// protocol the client did not offer is refused (502) instead of tunnelled. The
/// upgrade request's ID reaches the app and names the session's access line.
#[test]
fn the_protocol_the_101_names_decides_the_tunnel() {
    let (app, got) = scripted_app(|_, s| {
        let _ = s.write_all(SWITCH_TO_WS);
    });
    let w = worker(app, "");
    let (mut c, head) = handshake(&w, "x-raw, websocket", "ws-offer-list");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("Upgrade: websocket\r\n"), "{head}");
    c.write_all(&UNMASKED).expect("frame");
    let to_client = read_to_close(&mut c);
    assert_eq!(close_code(&to_client), Some(1002), "{to_client:x?}");
    let to_app = app_got(&got, 0);
    assert_eq!(
        close_code(&to_app),
        Some(1002),
        "the app gets a close, never the unmasked frame: {to_app:x?}"
    );
    assert_eq!(to_app.len(), 8, "{to_app:x?}");
    let sent = got.lock().expect("received")[0].0.clone();
    assert!(
        sent.contains("X-Backend-Request-ID: ws-offer-list\r\n"),
        "{sent}"
    );
    let access = w.wait_access_line("ws-offer-list");
    assert_eq!(access["status"], 101, "{access}");

    // Offered `x-raw` only: the app's switch to WebSocket is not relayed.
    let (mut c, head) = handshake(&w, "x-raw", "ws-not-offered");
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(
        head.contains("X-Backend-Request-ID: ws-not-offered\r\n"),
        "{head}"
    );
    let _ = c.write_all(&UNMASKED);
    // Nothing of the client's reaches the app's connection, which is dropped.
    assert!(app_got(&got, 1).is_empty());
}

/// A 101 that does not answer the client's WebSocket handshake (no
/// `Sec-WebSocket-Accept`, one for another key, two) is no WebSocket server's
/// answer: an app that answers 101 to anything would otherwise open a tunnel whose
/// later bytes it reads as it pleases, past the proxy's checks of each request. It
/// is refused (502 with the request ID), the app's connection dropped with nothing
/// of the client's; the same request without a key never gets a tunnel either, and
/// the right answer still does.
#[test]
fn a_101_that_does_not_answer_the_websocket_key_is_refused() {
    let (app, got) = scripted_app(|head, s| {
        let accept = if head.contains("/no-accept") {
            ""
        } else if head.contains("/other-key") {
            "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOA=\r\n"
        } else if head.contains("/twice") {
            "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        } else {
            "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        };
        let _ = s.write_all(
            format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{accept}\r\n").as_bytes(),
        );
    });
    let w = worker(app, "");
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let cases = [
        ("/no-accept", key, 502),
        ("/other-key", key, 502),
        ("/twice", key, 502),
        ("/no-key", "", 502),
        ("/right", key, 101),
    ];
    for (i, (path, key, status)) in cases.into_iter().enumerate() {
        let id = format!("ws-accept-{i}");
        let mut c = connect(&w);
        c.write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: {id}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{key}Sec-WebSocket-Version: 13\r\n\r\n"
            )
            .as_bytes(),
        )
        .expect("handshake");
        let head = read_head(&mut c);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{path}: {head}"
        );
        assert!(
            head.contains(&format!("X-Backend-Request-ID: {id}\r\n")),
            "{path}: {head}"
        );
        if status == 502 {
            // What the client sends next never reaches the app, whose connection goes.
            let _ = c.write_all(b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n");
            assert!(app_got(&got, i).is_empty(), "{path}");
            w.wait_log("the refusal of this 101", |v| {
                v["message"] == "app's 101 refused" && v["request_id"] == id.as_str()
            });
        }
    }
}

/// A 101 naming `websocket` on one `Upgrade` line and another offered protocol on
/// the next is refused: taken by its last line, it was relayed as the other
/// protocol's raw tunnel, the app's frames uninspected. On one line it was always
/// refused (two protocols); a 101 naming one on one line still switches.
#[test]
fn a_101_whose_upgrade_is_split_over_two_lines_is_refused() {
    let (app, got) = scripted_app(|head, s| {
        let upgrade = if head.contains("/split") {
            "Upgrade: websocket\r\nUpgrade: x-raw\r\n"
        } else {
            "Upgrade: websocket\r\n"
        };
        let _ = s.write_all(
            format!("HTTP/1.1 101 Switching Protocols\r\n{upgrade}Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n").as_bytes(),
        );
    });
    let w = worker(app, "");
    let mut c = connect(&w);
    c.write_all(format!("GET /split HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: ws-split\r\nUpgrade: websocket, x-raw\r\n{WS_HEADERS}\r\n").as_bytes())
        .expect("handshake");
    let head = read_head(&mut c);
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    let _ = c.write_all(&UNMASKED);
    assert!(app_got(&got, 0).is_empty());
    w.wait_log("the refusal", |v| {
        v["message"] == "app's 101 refused"
            && v["request_id"] == "ws-split"
            && v["error"] == "101 with more than one Upgrade field line"
    });
    let (_, head) = handshake(&w, "websocket, x-raw", "ws-one-line");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

/// An `h2c` switch is never passed on (deprecated by RFC 9113 §3.1): through a byte
/// tunnel, every later request on the connection would reach an app that accepts it
/// as HTTP/2 with no field rule applied (client addresses, request IDs, permit
/// cookies) and no access line. `h2c` is struck from what a request offers, with
/// its `HTTP2-Settings`; a request offering nothing else goes on as a plain one,
/// and an app that switches to `h2c` anyway gets a 502.
#[test]
fn an_h2c_upgrade_is_never_passed_on() {
    const SWITCH_TO_H2C: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";
    // The app switches to h2c whenever anything is offered, else answers.
    let (app, got) = scripted_app(|head, s| {
        let answer: &[u8] = if head.to_ascii_lowercase().contains("\r\nupgrade:") {
            SWITCH_TO_H2C
        } else {
            // One request per connection: this app reads one head on each.
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        };
        let _ = s.write_all(answer);
    });
    let w = worker(app, "");
    let offer = |upgrade: &str| {
        let mut c = common::Client::connect(w.addr());
        c.send(
            format!(
                "GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {upgrade}\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
            )
            .as_bytes(),
        );
        c.response()
    };
    // `h2c` alone: a plain request, answered as one.
    let r = offer("h2c");
    assert_eq!(r.status, 200, "{}", r.text());
    // `h2c` among others: only the others are offered, and a switch to `h2c` is
    // refused.
    let r = offer("h2c, x-raw");
    assert_eq!(r.status, 502, "{}", r.text());
    let seen = got.lock().expect("received").clone();
    assert_eq!(seen.len(), 2);
    let plain = seen[0].0.to_ascii_lowercase();
    assert!(!plain.contains("upgrade"), "{plain}");
    assert!(!plain.contains("http2-settings"), "{plain}");
    let offered = seen[1].0.to_ascii_lowercase();
    assert!(offered.contains("\r\nupgrade: x-raw\r\n"), "{offered}");
    assert!(!offered.contains("h2c"), "{offered}");
    assert!(!offered.contains("http2-settings"), "{offered}");
}

/// An upgrade offered on a request carrying a body (by length or chunked) is
/// ignored: the app gets a plain request, its body as a body, and no tunnel opens
/// (an app could take the body for the first bytes of the new protocol, bytes the
/// tunnel never inspected). An app that switches anyway gets a 502.
#[test]
fn an_upgrade_offered_with_a_body_is_ignored() {
    // The app reads the body before it switches, so the body is on record by the
    // time the client has its answer.
    let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let on_record = bodies.clone();
    let (app, got) = scripted_app(move |head, s| {
        let lower = head.to_ascii_lowercase();
        let end: &[u8] = if lower.contains("transfer-encoding: chunked\r\n") {
            b"0\r\n\r\n"
        } else if lower.contains("content-length: 4\r\n") {
            b"\x01\x02hi"
        } else {
            b""
        };
        let (mut body, mut byte) = (Vec::new(), [0u8; 1]);
        while !body.ends_with(end) && s.read_exact(&mut byte).is_ok() {
            body.push(byte[0]);
        }
        if !end.is_empty() {
            on_record.lock().expect("bodies").push(body);
        }
        let _ = s.write_all(SWITCH_TO_WS);
    });
    let w = worker(app, "");
    for framing in [
        "Content-Length: 4\r\n\r\n\x01\x02hi",
        "Transfer-Encoding: chunked\r\n\r\n4\r\n\x01\x02hi\r\n0\r\n\r\n",
    ] {
        let mut c = common::Client::connect(w.addr());
        c.send(
            format!("POST /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n{WS_HEADERS}{framing}")
                .as_bytes(),
        );
        let r = c.response();
        assert_eq!(r.status, 502, "{framing:?}: {}", r.text());
        assert_eq!(r.json()["code"], "upstream_invalid_response", "{framing:?}");
    }
    let seen = got.lock().expect("received").clone();
    let bodies = bodies.lock().expect("bodies").clone();
    assert_eq!((seen.len(), bodies.len()), (2, 2));
    for ((head, _, _), body) in seen.iter().zip(&bodies) {
        let lower = head.to_ascii_lowercase();
        assert!(!lower.contains("upgrade"), "a plain request: {head}");
        assert!(
            lower.contains("content-length: 4\r\n")
                || lower.contains("transfer-encoding: chunked\r\n"),
            "{head}"
        );
        assert!(
            body.windows(4).any(|w| w == b"\x01\x02hi"),
            "the body as a body: {body:?}"
        );
    }
    // Without a body (an explicit zero length included) the upgrade goes ahead.
    let (_c, head) = handshake(&w, "websocket\r\nContent-Length: 0", "ws-no-body");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

/// A tunnel is idle only when neither direction carried a byte for
/// `tunnel_idle_secs`: the app pushing messages to a silent WebSocket client for
/// several idle periods is relayed to its end.
#[test]
fn a_one_way_websocket_stream_is_not_idle() {
    let (app, _) = scripted_app(move |_, s| {
        let _ = s.write_all(SWITCH_TO_WS);
        for i in 0..EACH {
            std::thread::sleep(PACE);
            if s.write_all(&[0x81, 1, b'a' + i]).is_err() {
                return;
            }
        }
        let _ = s.write_all(&[0x88, 2, 0x03, 0xe8]);
    });
    let w = worker(app, "[timeouts]\ntunnel_idle_secs = 1");
    let (mut c, head) = handshake(&w, "websocket", "ws-one-way");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let got = read_to_close(&mut c);
    let mut want: Vec<u8> = (0..EACH).flat_map(|i| [0x81, 1, b'a' + i]).collect();
    want.extend([0x88, 2, 0x03, 0xe8]);
    assert_eq!(got, want, "every message, then the app's own close (1000)");
}

/// Messages of a one-way stream, one per [`PACE`]: 3 s, three idle periods of 1 s.
const EACH: u8 = 12;
const PACE: Duration = Duration::from_millis(250);

/// The same for a raw upgrade: a client sending to a silent app for several idle
/// periods is relayed to its end.
#[test]
fn a_one_way_raw_stream_is_not_idle() {
    let (app, received) = scripted_app(|_, s| {
        let _ = s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x-raw\r\nConnection: Upgrade\r\n\r\n",
        );
    });
    let w = worker(app, "[timeouts]\ntunnel_idle_secs = 1");
    let mut c = connect(&w);
    c.write_all(b"GET /raw HTTP/1.1\r\nHost: t\r\nUpgrade: x-raw\r\nConnection: Upgrade\r\n\r\n")
        .expect("upgrade");
    let head = read_head(&mut c);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for i in 0..EACH {
        std::thread::sleep(PACE);
        if c.write_all(&[b'a' + i]).is_err() {
            break;
        }
    }
    let _ = c.shutdown(std::net::Shutdown::Write);
    let want: Vec<u8> = (0..EACH).map(|i| b'a' + i).collect();
    assert_eq!(app_got(&received, 0), want, "every byte reached the app");
}
/// When one direction breaks the protocol while the other is in the middle of
/// relaying a frame, the proxy's close frame is not written into that frame's
/// payload (where it would be taken for message bytes): that peer sees the
/// connection end instead.
#[test]
fn the_proxys_close_never_lands_inside_a_frame() {
    let (app, got) = scripted_app(|_, s| {
        // A 1,000-byte binary frame, only half of it sent.
        let mut f = SWITCH_TO_WS.to_vec();
        f.extend([0x82, 126, 0x03, 0xe8]);
        f.extend([7u8; 500]);
        let _ = s.write_all(&f);
    });
    let w = worker(app, "");
    let before = common::resting_fds(&w);
    let (mut c, head) = handshake(&w, "websocket", "ws-mid-frame");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut half = vec![0u8; 504];
    c.read_exact(&mut half).expect("half a frame");
    c.write_all(&UNMASKED).expect("frame");
    let rest = read_to_close(&mut c);
    assert!(rest.is_empty(), "bytes injected into the frame: {rest:x?}");
    let to_app = app_got(&got, 0);
    assert_eq!(close_code(&to_app), Some(1002), "{to_app:x?}");
    released(&w, before);
}

/// Waits until no tunnel is open and the worker holds no more descriptors than
/// `before`: both connections of every tunnel were released.
fn released(w: &Worker, before: u64) {
    common::eventually("no tunnel left open", || {
        common::metric(w, "appproxy_tunnels_active") == 0
    });
    common::eventually("descriptors back at rest", || {
        common::open_fds(w.pid()).0 <= before
    });
}

/// A peer that was already relayed a close frame gets no second one from the proxy:
/// the app closes with 1000 and then neither side says more, so the session idles
/// out; the client is told nothing after the app's close (the connection ends), and
/// the app, which got no close yet, is told 1001.
#[test]
fn a_peer_gets_one_close_frame() {
    let (app, got) = scripted_app(|_, s| {
        let mut f = SWITCH_TO_WS.to_vec();
        f.extend([0x88, 2, 0x03, 0xe8]);
        let _ = s.write_all(&f);
    });
    let w = worker(app, "[timeouts]\ntunnel_idle_secs = 1");
    let before = common::resting_fds(&w);
    let (mut c, head) = handshake(&w, "websocket", "ws-one-close");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(read_to_close(&mut c), [0x88, 2, 0x03, 0xe8]);
    let to_app = app_got(&got, 0);
    assert_eq!(close_code(&to_app), Some(1001), "{to_app:x?}");
    assert_eq!(to_app.len(), 8, "{to_app:x?}");
    released(&w, before);
}

/// `Upgrade` in an HTTP/1.0 request is ignored (RFC 9110 §7.8): the app gets a plain
/// request, and its 101 is refused (502) instead of opening a tunnel the client
/// never could have asked for.
#[test]
fn an_http10_request_does_not_upgrade() {
    let (app, got) = scripted_app(|_, s| {
        let _ = s.write_all(SWITCH_TO_WS);
    });
    let w = worker(app, "");
    let mut c = connect(&w);
    let request = format!("GET /ws HTTP/1.0\r\nHost: t\r\nUpgrade: websocket\r\n{WS_HEADERS}\r\n");
    c.write_all(request.as_bytes()).expect("request");
    let head = read_head(&mut c);
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    let sent = got.lock().expect("received")[0].0.to_ascii_lowercase();
    assert!(!sent.contains("upgrade"), "{sent}");
}

/// The close line of a raw upgrade counts every byte each way, those each side sent
/// right behind the handshake included (they travel outside the relay loops).
#[test]
fn a_raw_tunnels_close_line_counts_its_early_bytes() {
    let (app, got) = scripted_app(|_, s| {
        let _ = s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x-raw\r\nConnection: Upgrade\r\n\r\nEARLY-APP",
        );
    });
    let w = worker(app, "");
    let mut c = connect(&w);
    c.write_all(b"GET /raw HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: raw-early\r\nUpgrade: x-raw\r\nConnection: Upgrade\r\n\r\nEARLY-CLIENT")
        .expect("upgrade");
    let head = read_head(&mut c);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut early = [0u8; 9];
    c.read_exact(&mut early).expect("the app's early bytes");
    assert_eq!(&early, b"EARLY-APP");
    c.write_all(b"LATER").expect("bytes");
    let _ = c.shutdown(std::net::Shutdown::Write);
    assert_eq!(app_got(&got, 0), b"EARLY-CLIENTLATER");
    drop(c);
    let closed = w.wait_log("the tunnel's close line", |v| {
        v["message"] == "upgraded connection closed" && v["request_id"] == "raw-early"
    });
    assert_eq!(closed[0]["bytes_to_app"], 17, "{}", closed[0]);
    assert_eq!(closed[0]["bytes_to_client"], 9, "{}", closed[0]);
}

/// With permessage-deflate negotiated, RSV1 marks a compressed message's first frame
/// and passes there; on a control frame or a continuation it is a protocol error
/// (RFC 7692 §6.1): both peers are told 1002, and the frame never reaches the app.
#[test]
fn rsv1_only_on_a_messages_first_frame() {
    let (app, got) = scripted_app(|_, s| {
        let _ = s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n");
    });
    let w = worker(app, "");
    // Masked frames with empty payloads: the mask key is all after each header.
    let compressed = [0xC1, 0x80, 1, 2, 3, 4];
    let close = [0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8];
    let deflate = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
    let (mut c, head) = handshake_with(&w, "websocket", "rsv1-first", deflate);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    c.write_all(&[&compressed[..], &close].concat())
        .expect("frames");
    let _ = c.shutdown(std::net::Shutdown::Write);
    assert_eq!(app_got(&got, 0), [&compressed[..], &close].concat());

    let first_fragment = [0x41, 0x80, 1, 2, 3, 4];
    let cases: [(&str, Vec<u8>); 2] = [
        ("ping with RSV1", vec![0xC9, 0x80, 1, 2, 3, 4]),
        (
            "continuation with RSV1",
            [&first_fragment[..], &[0xC0, 0x80, 1, 2, 3, 4]].concat(),
        ),
    ];
    for (i, (what, frames)) in cases.into_iter().enumerate() {
        let (mut c, head) = handshake_with(&w, "websocket", &format!("rsv1-{i}"), deflate);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        c.write_all(&frames).expect("frames");
        let to_client = read_to_close(&mut c);
        assert_eq!(close_code(&to_client), Some(1002), "{what}: {to_client:x?}");
        let to_app = app_got(&got, i + 1);
        // The valid first fragment passes, even in the same read as the
        // violation; the offending frame never does.
        let close_at = if what.starts_with("continuation") {
            to_app.strip_prefix(&first_fragment[..]).unwrap_or_else(|| {
                panic!("{what}: the whole fragment before it was lost: {to_app:x?}")
            })
        } else {
            &to_app[..]
        };
        assert_eq!(close_code(close_at), Some(1002), "{what}: {to_app:x?}");
        assert_eq!(close_at.len(), 8, "{what}: {to_app:x?}");
    }
}

/// An app's 101 may accept only the extensions the client offered (RFC 6455 §9.1):
/// `permessage-deflate` accepted for a client that offered none, or another one, is
/// a 502, never a session whose compressed frames the client cannot read. An
/// extension whose name only contains `permessage-deflate` allows no RSV bit.
#[test]
fn an_extension_the_client_did_not_offer_is_refused() {
    // The app accepts whatever `X-Accept-Extensions` tells it to.
    let (app, _got) = scripted_app(|head, s| {
        let accept = head
            .lines()
            .find_map(|l| l.strip_prefix("X-Accept-Extensions: "))
            .unwrap_or("");
        let _ = s.write_all(
            format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Extensions: {accept}\r\n\r\n")
                .as_bytes(),
        );
    });
    let w = worker(app, "");
    let cases = [
        ("", "permessage-deflate", "502"),
        ("x-foo", "permessage-deflate", "502"),
        ("permessage-deflate", "permessage-deflate, x-foo", "502"),
        ("permessage-deflate", "x-permessage-deflate-foo", "502"),
        (
            "permessage-deflate; client_max_window_bits, x-foo",
            "permessage-deflate; server_no_context_takeover",
            "101",
        ),
        (
            "x-permessage-deflate-foo",
            "x-permessage-deflate-foo",
            "101",
        ),
    ];
    for (i, (offer, accept, want)) in cases.iter().enumerate() {
        let mut extra = format!("X-Accept-Extensions: {accept}\r\n");
        if !offer.is_empty() {
            extra.push_str(&format!("Sec-WebSocket-Extensions: {offer}\r\n"));
        }
        let (mut c, head) = handshake_with(&w, "websocket", &format!("ext-{i}"), &extra);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {want}")),
            "offered {offer:?}, accepted {accept:?}: {head}"
        );
        if *want == "101" && accept.starts_with('x') {
            // A compressed frame under an extension that is not permessage-deflate.
            c.write_all(&[0xC1, 0x80, 1, 2, 3, 4]).expect("frame");
            assert_eq!(
                close_code(&read_to_close(&mut c)),
                Some(1002),
                "RSV1 under {accept:?}"
            );
        }
    }
}

/// A client that sends its close frame and then ends its side of the stream (a
/// half-close) still gets the app's close frame in answer: the clean close is
/// passed on (end of stream) and the app's answer relayed, not cut off by the proxy
/// (nor turned into a reset and a 1001 of its own).
#[test]
fn a_half_closing_client_gets_the_apps_close_frame() {
    let app = common::ws::echo_app();
    let w = worker(app.addr, "");
    let before = common::resting_fds(&w);
    for i in 0..20 {
        let (mut c, head) = handshake(&w, "websocket", &format!("half-close-{i}"));
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        c.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8])
            .expect("close frame");
        c.shutdown(std::net::Shutdown::Write).expect("half-close");
        assert_eq!(read_to_close(&mut c), [0x88, 2, 0x03, 0xe8], "session {i}");
    }
    released(&w, before);
}

/// The wait for the answer to a clean close is bounded: an app that neither answers
/// the client's close frame nor closes its connection is cut after the grace period
/// (5 s), and the client is told 1001 on its behalf.
#[test]
fn an_unanswered_close_is_bounded() {
    let (app, _) = scripted_app(|_, s| {
        let _ = s.write_all(SWITCH_TO_WS);
        // Holds the connection, reading nothing, well past the grace period.
        std::thread::sleep(Duration::from_secs(15));
    });
    let w = worker(app, "");
    let (mut c, head) = handshake(&w, "websocket", "ws-unanswered");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    c.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8])
        .expect("close frame");
    c.shutdown(std::net::Shutdown::Write).expect("half-close");
    assert_eq!(read_to_close(&mut c), [0x88, 2, 0x03, 0xe9]);
}

/// The session's close line names the close that began its end and who sent it: a
/// client's 1000 to an app that never answers is the client's 1000 (the line named
/// the proxy's 1001, sent at the end of the grace period), an app's 1000 the app's,
/// an unmasked client frame the proxy's 1002.
#[test]
fn the_close_line_names_the_first_close_and_who_sent_it() {
    let (app, _) = scripted_app(|head, s| {
        let _ = s.write_all(SWITCH_TO_WS);
        if head.contains("ws-app-closes") {
            let _ = s.write_all(&[0x88, 2, 0x03, 0xe8]);
        }
    });
    let w = worker(app, "[timeouts]\ntunnel_idle_secs = 1");
    let (mut c, head) = handshake(&w, "websocket", "ws-client-closes");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    c.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8])
        .expect("close frame");
    assert_eq!(
        read_to_close(&mut c),
        [0x88, 2, 0x03, 0xe9],
        "told 1001 at the end"
    );
    let (mut c, head) = handshake(&w, "websocket", "ws-app-closes");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        read_to_close(&mut c),
        [0x88, 2, 0x03, 0xe8],
        "the app's close"
    );
    let (mut c, head) = handshake(&w, "websocket", "ws-violation");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    c.write_all(&UNMASKED).expect("frame");
    assert_eq!(close_code(&read_to_close(&mut c)), Some(1002));
    for (id, code, by) in [
        ("ws-client-closes", 1000, "client"),
        ("ws-app-closes", 1000, "app"),
        ("ws-violation", 1002, "proxy"),
    ] {
        let line = w.wait_log(&format!("{id}'s close line"), |v| {
            v["message"] == "websocket session closed" && v["request_id"] == id
        });
        assert_eq!(
            (
                line[0]["close_code"].as_u64(),
                line[0]["closed_by"].as_str()
            ),
            (Some(code), Some(by)),
            "{id}: {}",
            line[0]
        );
    }
}

/// The grace period after a clean close is one deadline: an app that goes on sending
/// after the client's close frame and end of stream is cut when it ends (the client
/// told 1001), not kept on by every message.
#[test]
fn an_app_talking_past_a_close_is_cut_at_the_grace_period() {
    let (app, _) = scripted_app(|_, s| {
        let _ = s.write_all(SWITCH_TO_WS);
        for _ in 0..75 {
            std::thread::sleep(Duration::from_millis(200));
            if s.write_all(&[0x81, 1, b'm']).is_err() {
                return;
            }
        }
    });
    let w = worker(app, "");
    let (mut c, head) = handshake(&w, "websocket", "ws-talks-past-close");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    c.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8])
        .expect("close frame");
    c.shutdown(std::net::Shutdown::Write).expect("half-close");
    let got = read_to_close(&mut c);
    assert!(got.ends_with(&[0x88, 2, 0x03, 0xe9]), "{got:x?}");
    let messages = &got[..got.len() - 4];
    assert!(messages.chunks(3).all(|m| m == [0x81, 1, b'm']), "{got:x?}");
}

/// The grace period bounds writes too: a client that sends its close frame, ends its
/// stream and then reads nothing, while the app floods it, is cut at the grace
/// period (the app's connection closed), not held until the tunnel's idle timeout.
#[test]
fn a_client_that_stops_reading_after_its_close_is_cut_at_the_grace_period() {
    let cut = Arc::new(AtomicBool::new(false));
    let flag = cut.clone();
    let (app, _) = scripted_app(move |_, s| {
        let _ = s.write_all(SWITCH_TO_WS);
        let mut frame = vec![0x82, 127];
        frame.extend_from_slice(&65_536u64.to_be_bytes());
        frame.resize(frame.len() + 65_536, b'x');
        let _ = s.set_write_timeout(Some(Duration::from_secs(120)));
        // Until the worker closes this connection (or the hang guard's 120 s).
        while s.write_all(&frame).is_ok() {}
        flag.store(true, Ordering::SeqCst);
    });
    let w = worker(app, "[timeouts]\ntunnel_idle_secs = 600");
    let (mut c, head) = handshake(&w, "websocket", "ws-stops-reading");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    c.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8])
        .expect("close frame");
    c.shutdown(std::net::Shutdown::Write).expect("half-close");
    // The client reads nothing; the worker's writes to it stall. The hang guard is
    // far past the grace period (5 s) and far short of the idle timeout (600 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cut.load(Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "the session is held past its grace period"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(c);
}

/// RFC 6455 §5.5.1: no data frame follows a close frame. What a peer sends after its
/// own close frame is dropped, each way: the app's late message never reaches the
/// client, the client's never reaches the app (whose next read would otherwise act
/// on it); the closes themselves pass, and the drops are logged and counted on the
/// session's line.
#[test]
fn nothing_a_peer_sends_after_its_close_frame_is_relayed() {
    let (app, got) = scripted_app(|_, s| {
        let mut f = SWITCH_TO_WS.to_vec();
        f.extend([0x81, 1, b'a']);
        f.extend([0x88, 2, 0x03, 0xe8]);
        f.extend([0x81, 4, b'l', b'a', b't', b'e']);
        f.extend([0x89, 0]);
        let _ = s.write_all(&f);
    });
    let w = worker(app, "");
    let before = common::resting_fds(&w);
    let (mut c, head) = handshake(&w, "websocket", "ws-after-close");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut first = [0u8; 7];
    c.read_exact(&mut first).expect("the message and the close");
    assert_eq!(first, [0x81, 1, b'a', 0x88, 2, 0x03, 0xe8]);
    // The client answers the close, then sends a message anyway.
    let close = [0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8];
    let mut late = close.to_vec();
    late.extend([0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]);
    c.write_all(&late).expect("close and a late frame");
    c.shutdown(std::net::Shutdown::Write).expect("half-close");
    let rest = read_to_close(&mut c);
    assert!(rest.is_empty(), "relayed after the app's close: {rest:x?}");
    assert_eq!(
        app_got(&got, 0),
        close,
        "the app got only the client's close"
    );
    let lines = w.wait_log("the session's line", |v| {
        v["message"] == "websocket session closed" && v["request_id"] == "ws-after-close"
    });
    assert_eq!(lines[0]["dropped_after_close_from_app"], 8, "{}", lines[0]);
    assert_eq!(
        lines[0]["dropped_after_close_from_client"], 8,
        "{}",
        lines[0]
    );
    assert_eq!(
        common::log_count(&w, "websocket data after a close frame dropped"),
        2
    );
    released(&w, before);
}

/// Frames a peer sent whole before a violating one reach the other peer, then the
/// close (1002), whichever side sent them and however the bytes were read: before,
/// a valid frame that came in the same read as the violation was lost (a small one
/// whole; a large one cut short, with no close frame after it).
#[test]
fn whole_frames_before_a_violation_are_forwarded_first() {
    // App to client: a 1 MiB binary frame and a masked (server) frame, one write.
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| i as u8).collect();
    let mut from_app = vec![0x82, 127];
    from_app.extend((big.len() as u64).to_be_bytes());
    from_app.extend(&big);
    let valid_len = from_app.len();
    from_app.extend([0x81, 0x81, 1, 2, 3, 4, b'x' ^ 1]);
    let sent = from_app.clone();
    let (app, got) = scripted_app(move |_, s| {
        let _ = s.write_all(&[SWITCH_TO_WS, &sent[..]].concat());
    });
    let w = worker(app, "");
    let before = common::resting_fds(&w);
    let (mut c, head) = handshake(&w, "websocket", "ws-before-violation-app");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let to_client = read_to_close(&mut c);
    assert!(
        to_client.len() >= valid_len && to_client[..valid_len] == from_app[..valid_len],
        "the whole frame before the violation did not reach the client: {} of {valid_len} bytes",
        to_client.len()
    );
    let after = &to_client[valid_len..];
    assert_eq!(
        close_code(after),
        Some(1002),
        "{} bytes after the frame, starting {:x?}",
        after.len(),
        &after[..after.len().min(16)]
    );
    assert_eq!(close_code(&app_got(&got, 0)), Some(1002));
    drop(c);
    released(&w, before);

    // Client to app: a masked text frame and an unmasked one, one write (an app
    // that only answers the handshake).
    let (app, got) = scripted_app(|_, s| {
        let _ = s.write_all(SWITCH_TO_WS);
    });
    let w = worker(app, "");
    let before = common::resting_fds(&w);
    let hello = [
        0x81,
        0x85,
        1,
        2,
        3,
        4,
        b'h' ^ 1,
        b'e' ^ 2,
        b'l' ^ 3,
        b'l' ^ 4,
        b'o' ^ 1,
    ];
    let (mut c, head) = handshake(&w, "websocket", "ws-before-violation-client");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    c.write_all(&[&hello[..], &UNMASKED].concat())
        .expect("frames");
    let to_client = read_to_close(&mut c);
    assert_eq!(close_code(&to_client), Some(1002), "{to_client:x?}");
    let to_app = app_got(&got, 0);
    let close_at = to_app
        .strip_prefix(&hello[..])
        .unwrap_or_else(|| panic!("the whole frame before the violation was lost: {to_app:x?}"));
    assert_eq!(close_code(close_at), Some(1002), "{to_app:x?}");
    assert_eq!(close_at.len(), 8, "{to_app:x?}");
    released(&w, before);
}
