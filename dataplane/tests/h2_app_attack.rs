//! What one client can do to the others through the HTTP/2 paths, on raw sockets:
//! an HTTP/2 app's DATA after a bodiless answer (204, 304) never reaches the
//! client as a body (on a kept-alive HTTP/1.1 connection it would be read as the
//! next response).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{Worker, WorkerOpts};

use appproxy_test_support::h2frames::{
    frame, read_frame, request as req, ACK, DATA, END_HEADERS, END_STREAM, HEADERS, PING,
    RST_STREAM, SETTINGS,
};
use appproxy_test_support::net::ReadUninterrupted;

/// The response an HTTP/1.1 app would have to make for a client to take it as the
/// next answer on its connection.
const INJECTED: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nX-Injected: yes\r\n\r\nINJECTED-BODY";

/// An HTTP/2 app on raw frames that answers every stream with the static-table
/// `:status` byte `status` (0x89: 204, 0x8b: 304), then DATA [`INJECTED`] with
/// END_STREAM: a body a bodiless answer must not have.
fn bodiless_app(status: u8) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
                let mut preface = [0u8; 24];
                if s.read_exact(&mut preface).is_err()
                    || s.write_all(&frame(SETTINGS, 0, 0, &[])).is_err()
                {
                    return;
                }
                while let Some((ty, flags, id, p)) = read_frame(&mut s) {
                    let mut out = Vec::new();
                    if ty == SETTINGS && flags & ACK == 0 {
                        out.extend(frame(SETTINGS, ACK, 0, &[]));
                    }
                    if ty == PING && flags & ACK == 0 {
                        out.extend(frame(PING, ACK, 0, &p));
                    }
                    if (ty == HEADERS || ty == DATA) && flags & END_STREAM != 0 {
                        out.extend(frame(HEADERS, END_HEADERS, id, &[status]));
                        out.extend(frame(DATA, END_STREAM, id, INJECTED));
                    }
                    if !out.is_empty() && s.write_all(&out).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Reads from `s` until `heads` response heads are in; returns everything read.
fn read_heads(s: &mut TcpStream, heads: usize) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.windows(4).filter(|w| w == b"\r\n\r\n").count() < heads {
        assert!(Instant::now() < deadline, "no answer: {got:?}");
        match s.read_uninterrupted(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read: {e}; got {:?}", String::from_utf8_lossy(&got)),
        }
    }
    got
}

#[test]
fn data_after_a_bodiless_answer_of_an_http2_app_never_reaches_the_client() {
    for (status, code) in [(0x89u8, "204 No Content"), (0x8b, "304 Not Modified")] {
        let app = bodiless_app(status);
        let w = Worker::start(WorkerOpts {
            upstreams: vec![app],
            circuit_extra: "protocol = \"http2\"".into(),
            ..Default::default()
        });
        // HTTP/1.1 client, kept alive: the second answer is the app's second answer,
        // never the DATA that followed the first.
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        s.write_all(get("/first").as_bytes()).expect("write");
        let first = read_heads(&mut s, 1);
        let text = String::from_utf8_lossy(&first).into_owned();
        assert!(text.starts_with(&format!("HTTP/1.1 {code}\r\n")), "{text}");
        s.write_all(get("/second").as_bytes()).expect("write");
        let both = [first, read_heads(&mut s, 1)].concat();
        let text = String::from_utf8_lossy(&both).into_owned();
        let second = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        assert!(
            second.starts_with(&format!("HTTP/1.1 {code}\r\n")),
            "{text}"
        );
        assert!(
            !text.contains("INJECTED") && !text.contains("X-Injected"),
            "{text}"
        );
        // HTTP/2 client: the answer's stream carries no DATA payload.
        let mut h = appproxy_test_support::h2frames::connect(w.addr());
        h.write_all(&frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &req("GET", "/h2", &[]),
        ))
        .expect("write");
        let mut data = Vec::new();
        let mut status_seen = false;
        loop {
            let (ty, flags, id, p) = read_frame(&mut h).expect("the stream ends");
            if id != 1 {
                continue;
            }
            match ty {
                HEADERS => status_seen = true,
                DATA => data.extend_from_slice(&p),
                RST_STREAM => break,
                _ => {}
            }
            if flags & END_STREAM != 0 {
                break;
            }
        }
        assert!(status_seen);
        assert!(data.is_empty(), "{:?}", String::from_utf8_lossy(&data));
    }
}
