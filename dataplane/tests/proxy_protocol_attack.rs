//! `[worker] proxy_protocol` attacked on real sockets by a hostile client and by a
//! misbehaving balancer: a header and its request trickled a byte per write; a v2
//! header announcing more than follows, then silence (bounded by the head timeout);
//! connections parked in the header wait at the connection cap (shed for new ones);
//! a header sent to a worker that does not speak the protocol (an HTTP 400, never
//! taken for a header); a header sent to the API port, which never expects one; and
//! HTTP/2 prior knowledge after a header.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use appproxy_test_support::h2frames::{
    client_hello, frame, read_frame, request, END_HEADERS, END_STREAM, GOAWAY, HEADERS,
};
use common::{eventually, metric, read_until_closed, Client, Upstream, Worker, WorkerOpts};

const REFUSED: &str = "appproxy_proxy_protocol_refused_total";

fn worker(up: &Upstream, worker_extra: &str, extra: &str) -> Worker {
    Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra: format!(
            "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\"]\n{worker_extra}"
        ),
        extra: extra.into(),
        ..Default::default()
    })
}

/// A version 2 `PROXY` header naming `client:port` over IPv4 (no TLV).
fn v2(client: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    h.extend(client);
    h.extend([127, 0, 0, 1]);
    h.extend(port.to_be_bytes());
    h.extend(80u16.to_be_bytes());
    h
}

/// Established connections to `port` that the worker has accepted (the kernel's
/// table: one still in the listen queue has no inode yet).
fn accepted_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.len() > 9
                && f[1].rsplit(':').next() == Some(format!("{port:04X}").as_str())
                && f[3] == "01"
                && f[9] != "0"
        })
        .count()
}

/// The header and the request behind it, one byte per write with nothing between
/// them: each header ends exactly where it should, the request is served whole.
#[test]
fn a_header_and_its_request_trickled_a_byte_per_write_are_served() {
    let up = Upstream::start();
    let w = worker(&up, "", "");
    let request = b"GET /trickle HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    for (header, client) in [
        (
            b"PROXY TCP4 192.0.2.1 127.0.0.1 1 80\r\n".to_vec(),
            "192.0.2.1",
        ),
        (
            b"PROXY TCP6 2001:db8::2 ::1 2 80\r\n".to_vec(),
            "2001:db8::2",
        ),
        (b"PROXY UNKNOWN\r\n".to_vec(), "127.0.0.1"),
        (v2([192, 0, 2, 3], 3), "192.0.2.3"),
    ] {
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        for b in header.iter().chain(request.iter()) {
            s.write_all(&[*b]).expect("write");
            std::thread::sleep(Duration::from_millis(1));
        }
        let got = String::from_utf8_lossy(&read_until_closed(&mut s)).into_owned();
        assert!(got.starts_with("HTTP/1.1 200"), "{client}: {got}");
        let seen = up.last();
        assert_eq!(seen.path, "/trickle");
        assert_eq!(seen.header("x-forwarded-for"), Some(client));
    }
    // Only the start-up check's connection (no header) was refused.
    eventually("the start-up check's refusal counted", || {
        metric(&w, REFUSED) == 1
    });
    assert_eq!(metric(&w, REFUSED), 1);
}

/// A v2 header announcing a longer block than is sent, then silence (the request
/// sent after it becomes part of the block): closed unanswered at the head timeout,
/// counted, nothing reaches the app; a block longer than the worker takes is refused
/// at once, before its bytes come.
#[test]
fn a_v2_header_announcing_more_than_follows_waits_only_the_head_timeout() {
    let up = Upstream::start();
    let w = worker(&up, "", "[timeouts]\nhead_secs = 1\n");
    eventually("the start-up check's connection refused", || {
        metric(&w, REFUSED) == 1
    });
    let mut short = v2([192, 0, 2, 4], 4);
    short[14..16].copy_from_slice(&1000u16.to_be_bytes());
    short.extend(b"GET /never HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.write_all(&short).expect("write");
    let got = read_until_closed(&mut s);
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    eventually("the timeout counted", || metric(&w, REFUSED) == 2);
    // The largest length the field can say: refused without waiting for it.
    let mut huge = v2([192, 0, 2, 5], 5);
    huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    s.write_all(&huge).expect("write");
    let got = read_until_closed(&mut s);
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    eventually("the refusal counted", || metric(&w, REFUSED) == 3);
    assert_eq!(up.count(), 0);
    eventually("no connection left open", || {
        metric(&w, "appproxy_connections_active") == 0
    });
}

/// At `[limits] max_connections_per_core`, connections still waiting for their
/// header (silent, or half a header) have nothing in hand: each new connection
/// closes one of them and is served, instead of being refused.
#[test]
fn connections_waiting_for_their_header_are_shed_at_the_cap() {
    let up = Upstream::start();
    let w = worker(
        &up,
        "",
        "[limits]\nmax_connections_per_core = 4\n[timeouts]\nhead_secs = 60\n",
    );
    // The start-up check's connection (no header) refused and closed.
    eventually("the start-up check's connection closed", || {
        metric(&w, REFUSED) == 1 && accepted_on(w.port) == 0
    });
    let mut parked: Vec<TcpStream> = (0..4)
        .map(|i| {
            let mut s = TcpStream::connect(w.addr()).expect("connect");
            if i % 2 == 1 {
                s.write_all(b"PROXY TCP4 192.0.2.").expect("half a header");
            }
            s
        })
        .collect();
    // Accepted and waiting for their headers (not yet counted as active: that is
    // for connections past their header).
    eventually("the parked connections accepted", || {
        accepted_on(w.port) == 4
    });
    // Eight new connections, each served and kept open (idle after its response):
    // each closes the connection that has waited longest with nothing in hand, the
    // parked ones first.
    let mut served = Vec::new();
    for i in 0..8u8 {
        let mut c = Client::connect(w.addr());
        c.send(
            format!(
                "PROXY TCP4 192.0.2.{i} 127.0.0.1 1 80\r\nGET /new{i} HTTP/1.1\r\nHost: t\r\n\r\n"
            )
            .as_bytes(),
        );
        assert_eq!(c.response().status, 200, "new connection {i}");
        assert_eq!(
            up.last().header("x-forwarded-for"),
            Some(format!("192.0.2.{i}").as_str())
        );
        served.push(c);
    }
    eventually("every new connection shed one", || {
        metric(&w, "appproxy_connections_shed_total") == 8
    });
    assert_eq!(metric(&w, "appproxy_connections_refused_total"), 0);
    // Every parked connection was closed, unanswered.
    for s in &mut parked {
        let got = read_until_closed(s);
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    }
}

/// A worker without `[worker] proxy_protocol` never takes a header: either version,
/// before a request, is a malformed request (400), and nothing reaches the app.
#[test]
fn a_header_sent_to_a_worker_without_the_protocol_is_a_bad_request() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        ..Default::default()
    });
    let request = b"GET /spoof HTTP/1.1\r\nHost: t\r\n\r\n";
    let mut local = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00".to_vec();
    local.extend(request);
    let mut v1 = b"PROXY TCP4 192.0.2.9 127.0.0.1 1 80\r\n".to_vec();
    v1.extend(request);
    let mut unknown = b"PROXY UNKNOWN\r\n".to_vec();
    unknown.extend(request);
    let mut proxied = v2([192, 0, 2, 9], 9);
    proxied.extend(request);
    for bytes in [v1, unknown, proxied, local] {
        let mut c = Client::connect(w.addr());
        c.send(&bytes);
        let r = c.response();
        assert_eq!(
            r.status,
            400,
            "{:?}: {}",
            String::from_utf8_lossy(&bytes),
            r.text()
        );
    }
    assert_eq!(up.count(), 0, "nothing reached the app");
    assert_eq!(metric(&w, REFUSED), 0);
}

/// The API port (`[worker] api_port`) never expects a header, even with the
/// protocol on and from an address that is not a trusted proxy: a plain request is
/// served, and one behind a header is a malformed request, its client never taken.
#[test]
fn the_api_port_never_expects_a_header() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra:
            "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.2\"]\napi_port = {AUX_PORT}\n"
                .into(),
        ..Default::default()
    });
    let api = SocketAddr::from(([127, 0, 0, 1], w.aux_port));
    eventually("the start-up check's connection refused", || {
        metric(&w, REFUSED) == 1
    });
    // A plain request from an address that is not trusted: answered by the API.
    let mut c = Client::connect(api);
    let r = c.get("/setup", "");
    assert!(
        (400..500).contains(&r.status) && r.status != 408,
        "{}: {}",
        r.status,
        r.text()
    );
    // From the trusted proxy too, without a header.
    let mut c = Client::connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), api);
    let plain = c.get("/setup", "");
    assert_eq!(plain.status, r.status, "{}", plain.text());
    // A header in front: not taken, the bytes are a bad request.
    for header in [
        b"PROXY TCP4 192.0.2.9 127.0.0.1 1 80\r\n".to_vec(),
        v2([192, 0, 2, 9], 9),
    ] {
        let mut c = Client::connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), api);
        let mut bytes = header.clone();
        bytes.extend(b"GET /setup HTTP/1.1\r\nHost: t\r\n\r\n");
        c.send(&bytes);
        let r = c.response();
        assert_eq!(r.status, 400, "{}", r.text());
    }
    assert_eq!(
        metric(&w, REFUSED),
        1,
        "the API port refuses nothing for it"
    );
    assert_eq!(up.count(), 0);
}

/// HTTP/2 with prior knowledge right after a header (v1 and v2): the preface is
/// found where the header ends, the stream is served as the named client.
#[test]
fn http2_prior_knowledge_after_a_header_is_served_as_the_named_client() {
    let up = Upstream::start();
    let w = worker(&up, "", "");
    for (header, client) in [
        (
            b"PROXY TCP4 192.0.2.21 127.0.0.1 1 80\r\n".to_vec(),
            "192.0.2.21",
        ),
        (v2([192, 0, 2, 22], 22), "192.0.2.22"),
    ] {
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut bytes = header;
        bytes.extend(client_hello());
        bytes.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &request("GET", "/h2", &[]),
        ));
        s.write_all(&bytes).expect("write");
        let mut status = None;
        while let Some((ty, _, id, p)) = read_frame(&mut s) {
            assert_ne!(ty, GOAWAY, "{:?}", p);
            if ty == HEADERS && id == 1 {
                status = p.first().copied();
                break;
            }
        }
        // 0x88: `:status: 200` from the static table.
        assert_eq!(status, Some(0x88), "{client}");
        let seen = up.last();
        assert_eq!(seen.path, "/h2");
        assert_eq!(seen.header("x-forwarded-for"), Some(client));
    }
}
