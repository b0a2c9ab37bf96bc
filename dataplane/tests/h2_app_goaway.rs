//! An HTTP/2 app that goes away or refuses streams, on raw frames, for both kinds of
//! client (HTTP/1.1 bridged, HTTP/2): once the app sent GOAWAY no new stream goes
//! on that connection, while the streams it still serves there run on; a stream
//! above the GOAWAY's last stream, or refused with `REFUSED_STREAM`, was never
//! processed and is sent again once when it has no body (whatever its method); one
//! with a body, or refused twice, is the client's 502.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{Client, Worker, WorkerOpts};

use appproxy_test_support::h2frames::{
    self, frame, read_frame, request as req, serve_raw_app, status, Frame, DATA, END_HEADERS,
    END_STREAM, GOAWAY, HEADERS, RST_STREAM,
};

/// `:status 200` from HPACK's static table.
const STATUS_200: u8 = 0x88;
/// RST_STREAM's REFUSED_STREAM (RFC 9113 §7).
const REFUSED_STREAM: u32 = 0x7;

/// What the app saw: every whole request stream, as (connection number, stream
/// id), in order.
type Seen = Arc<Mutex<Vec<(usize, u32)>>>;

/// An HTTP/2 app on raw frames: its connections are numbered from 0, and
/// `answer(connection, stream, seen before)` gives what to send for each request
/// stream once the request is whole (END_STREAM on its HEADERS or DATA).
fn raw_app(answer: fn(usize, u32, usize) -> Vec<u8>) -> (SocketAddr, Seen) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let conns = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let n = conns.fetch_add(1, Ordering::SeqCst);
            let log = log.clone();
            std::thread::spawn(move || {
                serve_raw_app(s, |&(ty, flags, id, _): &Frame| {
                    if (ty == HEADERS || ty == DATA) && flags & END_STREAM != 0 {
                        let before = {
                            let mut log = log.lock().expect("log");
                            log.push((n, id));
                            log.len() - 1
                        };
                        answer(n, id, before)
                    } else {
                        Vec::new()
                    }
                })
            });
        }
    });
    (addr, seen)
}

fn ok(id: u32) -> Vec<u8> {
    frame(HEADERS, END_HEADERS | END_STREAM, id, &[STATUS_200])
}

fn goaway(last: u32) -> Vec<u8> {
    let mut p = last.to_be_bytes().to_vec();
    p.extend_from_slice(&0u32.to_be_bytes());
    frame(GOAWAY, 0, 0, &p)
}

fn refuse(id: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, id, &REFUSED_STREAM.to_be_bytes())
}

fn worker(app: SocketAddr) -> Worker {
    Worker::start(WorkerOpts {
        upstreams: vec![app],
        circuit_extra: "protocol = \"http2\"".into(),
        // A stream left on a gone-away connection would fail in 5 s, not hang a minute.
        extra: "[timeouts]\nupstream_head_secs = 5\n".into(),
        ..Default::default()
    })
}

/// The `:status` of the answer to a bodiless `method` request from an HTTP/2 client.
fn h2_status(w: &Worker, method: &str) -> u16 {
    let mut h = h2frames::connect(w.addr());
    h.write_all(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &req(method, "/h2", &[]),
    ))
    .expect("write");
    loop {
        let (ty, _, id, p) = read_frame(&mut h).expect("an answer");
        if ty == HEADERS && id == 1 {
            return status(&p);
        }
    }
}

#[test]
fn after_an_apps_goaway_new_streams_go_on_a_new_connection() {
    // Connection 0 starts a long answer to its first stream, then says GOAWAY
    // naming it and ignores anything after, as a server going away gracefully does
    // while it finishes what it has (with no stream left open, the `h2` crate
    // closes such a connection by itself); the other connections answer all.
    let (app, seen) = raw_app(|conn, id, _| match (conn, id) {
        (0, 1) => [
            frame(HEADERS, END_HEADERS, 1, &[STATUS_200]),
            frame(DATA, 0, 1, b"tick"),
            goaway(1),
        ]
        .concat(),
        (0, _) => Vec::new(),
        _ => ok(id),
    });
    let w = worker(app);
    let mut long = Client::connect(w.addr());
    long.send(b"GET /events HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(long.head().0, 200);
    // The GOAWAY came in the same write as that head, before the client had it.
    let mut c = Client::connect(w.addr());
    assert_eq!(c.get("/second", "").status, 200);
    assert_eq!(h2_status(&w, "GET"), 200);
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen.first(), Some(&(0, 1)), "{seen:?}");
    assert!(
        seen[1..].iter().all(|(conn, _)| *conn == 1),
        "nothing more on the connection that went away: {seen:?}"
    );
}

#[test]
fn a_stream_above_the_goaways_last_is_sent_again_on_a_new_connection() {
    // Connection 0 answers stream 1; stream 3 it leaves unprocessed with a GOAWAY
    // naming stream 1 as its last.
    let (app, seen) = raw_app(|conn, id, _| match (conn, id) {
        (0, 1) => ok(1),
        (0, _) => goaway(1),
        _ => ok(id),
    });
    let w = worker(app);
    let mut c = Client::connect(w.addr());
    assert_eq!(c.get("/first", "").status, 200);
    // Not idempotent, but never processed: sent again.
    c.send(b"POST /second HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(c.response().status, 200);
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen, vec![(0, 1), (0, 3), (1, 1)]);
}

#[test]
fn refused_streams_are_sent_again_once_and_only_without_a_body() {
    // Every other stream the app sees is refused: each request is refused once,
    // then answered.
    let (app, seen) = raw_app(
        |_, id, before| {
            if before % 2 == 0 {
                refuse(id)
            } else {
                ok(id)
            }
        },
    );
    let w = worker(app);
    let mut c = Client::connect(w.addr());
    assert_eq!(c.get("/a", "").status, 200);
    c.send(b"DELETE /b HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(c.response().status, 200);
    assert_eq!(h2_status(&w, "POST"), 200);
    assert_eq!(seen.lock().expect("seen").len(), 6);
    // A body is streamed, not kept: its refusal is the client's answer.
    c.send(b"PUT /c HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(c.response().status, 502);
    assert_eq!(seen.lock().expect("seen").len(), 7);

    // An app that refuses everything is asked twice per request, not more.
    let (app, seen) = raw_app(|_, id, _| refuse(id));
    let w = worker(app);
    let mut c = Client::connect(w.addr());
    assert_eq!(c.get("/a", "").status, 502);
    assert_eq!(seen.lock().expect("seen").len(), 2);
    assert_eq!(h2_status(&w, "GET"), 502);
    assert_eq!(seen.lock().expect("seen").len(), 4);
}
