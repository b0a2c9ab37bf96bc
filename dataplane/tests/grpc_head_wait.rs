//! An answer an HTTP/2 app never starts, on a `grpc` circuit (a watch that has not
//! fired, an app that sends its head with the first message, or one that hangs):
//! the wait for it ends when an HTTP/1.1 client hangs up, its app stream reset and
//! its connection closed, and for a client that stays it is bounded by the tunnel
//! idle timeout, for HTTP/1.1 and HTTP/2 clients alike. Before, a bridged call
//! waited with no bound and never noticed its client leave: calls whose clients
//! were gone held the core's app-stream budget (`[http2] max_app_streams`) for
//! good, and every `grpc` circuit on the core answered `app_stream_limit`.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

use appproxy_test_support::h2frames::{
    self, frame, read_frame, request as req, serve_raw_app, DATA, END_HEADERS, END_STREAM, HEADERS,
    RST_STREAM,
};
use common::{eventually, metric, Client, Worker, WorkerOpts};

/// What an app saw: the streams opened (HEADERS) and those reset.
#[derive(Default)]
struct Seen {
    opened: usize,
    resets: usize,
}

/// An HTTP/2 app on raw frames that takes every stream and never answers.
fn silent_app() -> (SocketAddr, Arc<Mutex<Seen>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let log = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let log = log.clone();
            std::thread::spawn(move || {
                serve_raw_app(s, |f| {
                    let mut log = log.lock().expect("seen");
                    match f.0 {
                        HEADERS => log.opened += 1,
                        RST_STREAM => log.resets += 1,
                        _ => {}
                    }
                    Vec::new()
                })
            });
        }
    });
    (addr, seen)
}

fn worker(app: SocketAddr, extra: &str) -> Worker {
    Worker::start(WorkerOpts {
        upstreams: vec![app],
        circuit_extra: "protocol = \"grpc\"".into(),
        extra: extra.into(),
        ..Default::default()
    })
}

/// A unary gRPC call from an HTTP/1.1 client: its head and 5-byte message.
const CALL: &[u8] = b"POST /pkg.Svc/Watch HTTP/1.1\r\nHost: test\r\nContent-Type: application/grpc\r\nTE: trailers\r\nContent-Length: 5\r\n\r\n\x00\x00\x00\x00\x00";

/// Three bridged calls to an app that never answers, each client sending `more`
/// once its call reached the app, then hanging up: every app stream is reset and
/// every client connection closed. The default tunnel idle timeout (an hour): only
/// the hang-up can end the wait.
fn three_calls_hang_up(more: &[u8]) {
    let (app, seen) = silent_app();
    let w = worker(app, "");
    for n in 1..=3 {
        let mut c = Client::connect(w.addr());
        c.send(CALL);
        // The call reached the app before the client goes.
        eventually("the call reached the app", || {
            seen.lock().expect("seen").opened == n
        });
        if !more.is_empty() {
            c.send(more);
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        drop(c);
    }
    eventually("every hung-up call's app stream reset", || {
        seen.lock().expect("seen").resets == 3
    });
    eventually("the hung-up clients' connections closed", || {
        metric(&w, "appproxy_connections_active") == 0
    });
}

#[test]
fn a_bridged_grpc_call_whose_client_hangs_up_has_its_app_stream_reset() {
    three_calls_hang_up(b"");
}

/// A client that sent a byte more (the start of a pipelined request) before it
/// hung up is seen to hang up all the same: its end of stream is taken from the
/// reactor, behind bytes nobody read. Before, the first byte stopped the watch and
/// the call was held for the tunnel idle timeout (an hour).
#[test]
fn a_client_that_sent_more_before_it_hung_up_has_its_app_stream_reset() {
    three_calls_hang_up(b"G");
}

/// A request pipelined behind a bridged call waits in the client's socket while
/// the call is awaited, and is served once the call is answered: watching for the
/// client's hang-up takes none of its bytes.
#[test]
fn a_request_pipelined_behind_a_bridged_call_is_served_after_it() {
    // The app answers every stream, the first one a moment late.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            std::thread::spawn(move || {
                serve_raw_app(s, |&(ty, flags, id, _)| {
                    if (ty == HEADERS || ty == DATA) && flags & END_STREAM != 0 {
                        if id == 1 {
                            std::thread::sleep(std::time::Duration::from_millis(400));
                        }
                        frame(HEADERS, END_HEADERS | END_STREAM, id, &[0x88])
                    } else {
                        Vec::new()
                    }
                })
            });
        }
    });
    let w = worker(app, "");
    let mut c = Client::connect(w.addr());
    c.send(CALL);
    // Sent while the call is awaited: it waits in the socket, not in the buffer.
    std::thread::sleep(std::time::Duration::from_millis(100));
    c.send(b"GET /second HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(c.response_to("POST").status, 200);
    assert_eq!(c.response().status, 200);
}

#[test]
fn a_grpc_answer_never_started_is_awaited_no_longer_than_the_tunnel_idle_timeout() {
    let (app, seen) = silent_app();
    let w = worker(app, "[timeouts]\ntunnel_idle_secs = 2\n");
    // An HTTP/1.1 client that stays: answered once the bound passed (the client's
    // read timeout, 20 s, is the hang guard).
    let mut c = Client::connect(w.addr());
    c.send(CALL);
    let r = c.response_to("POST");
    assert_eq!(r.status, 504, "{}", r.text());
    // An HTTP/2 client that stays.
    let mut h = h2frames::connect(w.addr());
    h.write_all(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &req(
            "POST",
            "/pkg.Svc/Watch",
            &[(b"content-type", b"application/grpc"), (b"te", b"trailers")],
        ),
    ))
    .expect("write");
    let answered = loop {
        match read_frame(&mut h) {
            Some((ty, _, 1, _)) if ty == HEADERS || ty == RST_STREAM => break true,
            Some(_) => continue,
            None => break false,
        }
    };
    assert!(
        answered,
        "the HTTP/2 client's stream was never answered nor reset"
    );
    eventually("both app streams reset", || {
        seen.lock().expect("seen").resets == 2
    });
}
