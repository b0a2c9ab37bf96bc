//! Hostile TLS clients: record garbage, plaintext HTTP on a TLS port, handshakes that
//! never finish (cut by the head timeout), oversized records before and after the
//! handshake, a handshake message claiming 16 MiB, renegotiation attempts, and a
//! client that never reads a large response. Each is refused or cut with bounded
//! memory, the connection is closed, and nothing is left behind: the handshake and
//! connection gauges return to zero and the descriptors to their count before.
//! Also: HTTP/2 over TLS lingers after its idle `GOAWAY` as in the clear.

mod common;
#[path = "common/tls.rs"]
mod tls_support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;

use common::{eventually, metric, open_fds, read_until_closed, Upstream, Worker, WorkerOpts};
use tls_support::{connect, get, Pki, SClient};

fn worker(pki: &Pki, up: &Upstream) -> Worker {
    Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra: pki.worker_lines(),
        extra: "[timeouts]\nhead_secs = 1\nbody_idle_secs = 2\n".into(),
        ..Default::default()
    })
}

/// Waits until no handshake or connection is open and the descriptors are back
/// to `fds`, then checks the worker still serves.
fn settled(w: &Worker, pki: &Pki, fds: u64) {
    eventually("no handshake in progress", || {
        metric(w, "appproxy_tls_handshakes_in_progress") == 0
    });
    eventually("no connection open", || {
        metric(w, "appproxy_connections_active") == 0
    });
    eventually("descriptors back to their count", || {
        open_fds(w.pid()).0 <= fds
    });
    let mut s = BufReader::new(connect(w.addr(), &pki.default_client(), "localhost").expect("tls"));
    assert_eq!(get(&mut s, "/still-serving", "").status, 200);
}

fn failures(w: &Worker) -> u64 {
    metric(w, "appproxy_tls_handshake_failures_total")
}

#[test]
fn garbage_plaintext_and_oversized_records_are_refused() {
    let pki = Pki::new();
    let up = Upstream::start();
    let w = worker(&pki, &up);
    let fds = common::resting_fds(&w);
    let cases: [(&str, &[u8]); 4] = [
        (
            "record garbage",
            b"\x16\x03\x01\x00\x08garbage!\x00\x01\x02",
        ),
        (
            "plaintext HTTP",
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        ),
        // Length 0x4801: past the largest record TLS allows (2^14 + 2048).
        ("oversized record", b"\x16\x03\x03\x48\x01"),
        // A ClientHello claiming 16 MiB.
        (
            "huge handshake message",
            b"\x16\x03\x03\x00\x04\x01\xff\xff\xff",
        ),
    ];
    for (what, bytes) in cases {
        let before = failures(&w);
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.write_all(bytes).expect("send");
        let got = read_until_closed(&mut s);
        // At most an alert came back (a 7-byte record), never HTTP.
        assert!(got.len() <= 7, "{what}: {got:?}");
        if let Some(first) = got.first() {
            assert_eq!(*first, 0x15, "{what}: an alert record, got {got:?}");
        }
        eventually(what, || failures(&w) > before);
    }
    // After the handshake: an application-data record header claiming 64 KiB.
    let mut s = connect(w.addr(), &pki.default_client(), "localhost").expect("tls");
    s.sock.write_all(b"\x17\x03\x03\xff\xff").expect("send");
    s.sock.write_all(&[0u8; 1024]).expect("send");
    read_until_closed(&mut s.sock);
    assert!(!w.log_text().contains("panicked"), "{}", w.log_text());
    settled(&w, &pki, fds);
}

#[test]
fn a_clienthello_announced_past_16_kib_is_refused_before_it_is_buffered() {
    let pki = Pki::new();
    let up = Upstream::start();
    let w = worker(&pki, &up);
    let fds = common::resting_fds(&w);
    let before = failures(&w);
    // A record of 16 KiB whose handshake message announces 65,000 bytes: rustls would
    // buffer up to 64 KiB of it until the handshake deadline; a few hundred bytes come.
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.write_all(b"\x16\x03\x01\x40\x00\x01\x00\xfd\xe8")
        .expect("send");
    s.write_all(&[0u8; 300]).expect("send");
    let got = read_until_closed(&mut s);
    assert!(got.len() <= 7, "at most an alert: {got:?}");
    eventually("the handshake counted as failed", || failures(&w) > before);
    // Refused for its announced size, not cut by the deadline (lines reach the log
    // a moment later).
    w.wait_log("the refusal for the ClientHello's size", |v| {
        v.to_string()
            .contains("TLS ClientHello announced at 65000 bytes, past 16384")
    });
    settled(&w, &pki, fds);
}

#[test]
fn handshakes_that_never_finish_are_cut_by_the_head_timeout() {
    let pki = Pki::new();
    let up = Upstream::start();
    let w = worker(&pki, &up);
    let fds = common::resting_fds(&w);
    let before = failures(&w);
    // Silent connections, and connections that stop half-way through a ClientHello.
    let mut held = Vec::new();
    for i in 0..40 {
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        if i % 2 == 1 {
            s.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
                .expect("partial hello");
        }
        held.push(s);
    }
    eventually("handshakes in progress", || {
        metric(&w, "appproxy_tls_handshakes_in_progress") > 0
    });
    for s in &mut held {
        read_until_closed(s);
    }
    eventually("every cut handshake counted", || {
        failures(&w) >= before + 40
    });
    drop(held);
    settled(&w, &pki, fds);
}

#[test]
fn renegotiation_is_refused_and_the_worker_keeps_serving() {
    let pki = Pki::new();
    let up = Upstream::start();
    let w = worker(&pki, &up);
    let fds = common::resting_fds(&w);
    // s_client's "R" command asks for a renegotiation on a TLS 1.2 session.
    let mut client = SClient::spawn(w.port, &["-tls1_2"]);
    // s_client reads its input only once the handshake is done and prints the
    // session first; each command must be read on its own, so each waits for the
    // answer to the one before.
    client.wait_for("the finished handshake", |out, _| {
        out.contains("SSL handshake has read")
    });
    let _ = client.write(b"R\n");
    client.wait_for("the renegotiation started", |_, err| {
        err.contains("RENEGOTIATING")
    });
    let _ =
        client.write(b"GET /after-reneg HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    // Refused (s_client reports it and gives up), or the session goes on, the
    // request is answered and the worker closes the connection.
    client.wait_for("the answer to the renegotiation", |out, err| {
        out.contains("HTTP/1.1 ") || format!("{out}{err}").contains("no renegotiation")
    });
    let (out, err) = client.finish();
    let out = out + &err;
    // The client asked; the worker answered no_renegotiation and the client gave up.
    assert!(out.contains("RENEGOTIATING"), "{out}");
    assert!(out.contains("no renegotiation"), "{out}");
    // No second handshake happened: either the session went on without one or it
    // ended; nothing was counted as a new handshake (the gauge as the core publishes
    // it at its next tick).
    eventually("no handshake in progress after the attempt", || {
        metric(&w, "appproxy_tls_handshakes_in_progress") == 0
    });
    settled(&w, &pki, fds);
}

#[test]
fn a_client_that_never_reads_is_cut_with_bounded_memory() {
    let pki = Pki::new();
    let up = Upstream::start();
    let w = worker(&pki, &up);
    let fds = common::resting_fds(&w);
    let rss_before = w.peak_rss_kib();
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut s = connect(w.addr(), &pki.default_client(), "localhost").expect("tls");
        // 256 MiB each, never read.
        s.write_all(b"GET /bytes?n=268435456 HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .expect("send");
        s.flush().expect("flush");
        streams.push(s);
    }
    // The worker stops at the socket's and its own bounded buffers, then the body
    // idle timeout closes each connection.
    eventually("connections cut", || {
        metric(&w, "appproxy_connections_active") == 0
    });
    let grown = w.peak_rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 32 * 1024,
        "peak RSS grew by {grown} KiB for 1 GiB of unread responses"
    );
    drop(streams);
    settled(&w, &pki, fds);
}

/// Makes a TLS connection busy with a request: an event stream whose first event
/// came, the rest held back by the app until `up.open_gate()`.
fn hold_busy(s: &mut BufReader<tls_support::TlsStream>) {
    s.get_mut()
        .write_all(b"GET /sse HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("send");
    s.get_mut().flush().expect("flush");
    let mut line = String::new();
    while !line.contains("data: first") {
        line.clear();
        assert!(s.read_line(&mut line).expect("event") > 0, "stream ended");
    }
}

#[test]
fn at_the_connection_cap_tls_clients_are_closed_without_plaintext() {
    let pki = Pki::new();
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra: pki.worker_lines(),
        extra: "[limits]\nmax_connections_per_core = 2\n".into(),
        ..Default::default()
    });
    let config = pki.default_client();
    // Two connections busy with a request (an event stream whose first event came,
    // the rest held back by the app) fill the cap: neither is closed for a new one.
    let held: Vec<_> = (0..2)
        .map(|_| {
            let mut s = BufReader::new(connect(w.addr(), &config, "localhost").expect("tls"));
            hold_busy(&mut s);
            s
        })
        .collect();
    let refused = metric(&w, "appproxy_connections_refused_total");
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    // A ClientHello's first bytes; the answer is a close, never a plaintext 503.
    s.write_all(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00")
        .expect("send");
    let got = read_until_closed(&mut s);
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    eventually("refusal counted", || {
        metric(&w, "appproxy_connections_refused_total") > refused
    });
    up.open_gate();
    drop(held);
}

/// On a TLS frontend too, a connection that never sent a byte (not even its
/// ClientHello) has nothing in hand: at the cap the oldest such one is closed to admit
/// a new client, which completes its handshake and is served. So is a handshake
/// under way (a ClientHello's first bytes in, then nothing), as an unfinished request
/// head is: before, it held its place until the head timeout, and one client's
/// unfinished handshakes held them all.
#[test]
fn at_the_cap_a_tls_connection_that_never_sent_a_byte_makes_room() {
    let pki = Pki::new();
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra: pki.worker_lines(),
        extra: "[limits]\nmax_connections_per_core = 2\n[timeouts]\nhead_secs = 600\n".into(),
        ..Default::default()
    });
    let config = pki.default_client();
    // Two silent connections fill the cap.
    let mut silent: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(w.addr()).expect("connect"))
        .collect();
    eventually("both in their handshake", || {
        metric(&w, "appproxy_tls_handshakes_in_progress") == 2
    });
    let mut s = BufReader::new(connect(w.addr(), &config, "localhost").expect("admitted"));
    assert_eq!(get(&mut s, "/new", "").status, 200);
    eventually("counted", || {
        metric(&w, "appproxy_connections_shed_total") == 1
    });
    assert_eq!(metric(&w, "appproxy_connections_refused_total"), 0);
    // The older silent one was closed: at most a TLS alert, never plaintext.
    let got = read_until_closed(&mut silent[0]);
    assert!(
        got.is_empty() || got[0] == 0x15,
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    // A handshake under way, stalled, makes room too: with the cap held by it and
    // by the served client, now busy with a request, the next client is served.
    // The first bytes of a ClientHello record of 200 bytes: rustls waits for the rest.
    silent[1]
        .write_all(b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03")
        .expect("a ClientHello's first bytes");
    hold_busy(&mut s);
    let mut next = BufReader::new(connect(w.addr(), &config, "localhost").expect("admitted"));
    assert_eq!(get(&mut next, "/next", "").status, 200);
    let got = read_until_closed(&mut silent[1]);
    assert!(
        got.is_empty() || got[0] == 0x15,
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    eventually("counted", || {
        metric(&w, "appproxy_connections_shed_total") == 2
    });
    assert_eq!(metric(&w, "appproxy_connections_refused_total"), 0);
    assert_eq!(metric(&w, "appproxy_tls_handshakes_in_progress"), 0);
    up.open_gate();
}

/// HTTP/2 over TLS (ALPN `h2`) gets the lingering close too: frames a client sends
/// after the worker's idle `GOAWAY` and close_notify are read and dropped while it
/// keeps sending (no reset that could destroy the `GOAWAY`), until `[timeouts]
/// lingering_secs` have passed; then everything is released.
#[test]
fn frames_after_an_idle_goaway_over_tls_meet_a_lingering_close() {
    use appproxy_test_support::h2frames::{
        client_hello, frame, goaway_code, literal, read_frame, END_HEADERS, END_STREAM, GOAWAY,
        HEADERS,
    };
    let pki = Pki::new();
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra: pki.worker_lines(),
        extra: "[upstream]\nidle_timeout_secs = 1\n[timeouts]\nkeepalive_secs = 1\nlingering_secs = 3\nlingering_idle_secs = 2\n".into(),
        ..Default::default()
    });
    let fds = common::resting_fds(&w);
    let h2 = pki.client(
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        &[b"h2"],
    );
    let mut s = connect(w.addr(), &h2, "localhost").expect("tls");
    assert_eq!(s.conn.alpn_protocol(), Some(&b"h2"[..]));
    let get = |id: u32, path: &str| {
        let mut b = Vec::new();
        literal(&mut b, b":method", b"GET");
        literal(&mut b, b":scheme", b"https");
        literal(&mut b, b":path", path.as_bytes());
        literal(&mut b, b":authority", b"localhost");
        frame(HEADERS, END_HEADERS | END_STREAM, id, &b)
    };
    s.write_all(&client_hello()).expect("preface");
    s.write_all(&get(1, "/first")).expect("request");
    // The answer, the idle GOAWAY naming stream 1, then the close_notify.
    let mut goaway = None;
    while let Some(f) = read_frame(&mut s) {
        if f.0 == GOAWAY {
            goaway = Some((
                f.3.get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
                goaway_code(&f.3),
            ));
        }
    }
    assert_eq!(goaway, Some((Some(1), Some(0))));
    let lingered_from = std::time::Instant::now();
    let mut id = 3;
    let mut writes = 0;
    loop {
        if s.write_all(&get(id, "/late")).is_err() {
            break;
        }
        writes += 1;
        id += 2;
        assert!(
            lingered_from.elapsed() < std::time::Duration::from_secs(20),
            "a client that never stops sending kept the lingering close open"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        writes >= 5,
        "the worker reset the connection after {writes} late frames"
    );
    assert_eq!(
        up.count(),
        1,
        "a stream opened after the GOAWAY reached the app"
    );
    drop(s);
    eventually("no connection open", || {
        metric(&w, "appproxy_connections_active") == 0
    });
    eventually("descriptors back to their count", || {
        open_fds(w.pid()).0 <= fds
    });
}

/// A TLS tunnel to a TCP circuit (SSH, VNC) has its session in hand from its
/// handshake on: at the cap it is never closed for a new connection, as a plain one
/// is not. Found by a verifier: once a handshake under way became sheddable, the
/// mark stayed on after it, and a tunnel was closed 460 ms in by bare connections
/// pushing the core to its cap.
#[test]
fn at_the_cap_a_tls_tunnel_is_never_closed_for_a_new_connection() {
    use std::io::Read;
    let pki = Pki::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        worker_extra: pki.worker_lines(),
        circuit_extra: "protocol = \"tcp\"".into(),
        extra: "[limits]\nmax_connections_per_core = 2\n".into(),
        ..Default::default()
    });
    let mut tunnel = connect(w.addr(), &pki.default_client(), "localhost").expect("tls");
    let mut round_trip = |what: &[u8]| {
        tunnel.write_all(what).expect("send");
        let mut got = vec![0u8; what.len()];
        tunnel.read_exact(&mut got).expect("echo");
        assert_eq!(got, what);
    };
    round_trip(b"first");
    // Bare connections, each sheddable until its handshake is done, push the core
    // past its cap again and again.
    let bare: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(w.addr()).expect("connect"))
        .collect();
    eventually("the bare connections made room for each other", || {
        metric(&w, "appproxy_connections_shed_total")
            + metric(&w, "appproxy_connections_refused_total")
            >= 3
    });
    round_trip(b"second");
    drop(bare);
}
