//! `[worker] proxy_protocol`: a TCP load balancer in front opens each connection with
//! a PROXY protocol header (v1 text or v2 binary) naming the client. The client it
//! names is the one the app is told of (`X-Forwarded-For`) and the one
//! `[limits] max_connections_per_client` counts; the request bytes after the header,
//! in the same segment or not, are served as usual. Attacks: a header from a peer
//! that is not a trusted proxy, no header, a malformed one, one that never ends, one
//! split over many writes; each is closed unserved and counted, without an answer.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use common::{eventually, metric, read_until_closed, Client, Upstream, Worker, WorkerOpts};

const REFUSED: &str = "appproxy_proxy_protocol_refused_total";
const WAITING: &str = "appproxy_proxy_protocol_headers_waiting";

fn worker(up: &Upstream, trusted: &str, extra: &str) -> Worker {
    Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra: format!("proxy_protocol = true\ntrusted_proxies = [\"{trusted}\"]\n"),
        extra: extra.into(),
        ..Default::default()
    })
}

/// A version 2 header naming `client:port` (TCP over IPv4), with one TLV.
fn v2(client: [u8; 4], port: u16) -> Vec<u8> {
    let mut body = client.to_vec();
    body.extend([127, 0, 0, 1]);
    body.extend(port.to_be_bytes());
    body.extend(443u16.to_be_bytes());
    body.extend([0x05, 0x00, 0x02, b'i', b'd']);
    let mut h = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11".to_vec();
    h.extend((body.len() as u16).to_be_bytes());
    h.extend(body);
    h
}

#[test]
fn the_client_named_by_the_header_is_the_one_forwarded() {
    let up = Upstream::start();
    let w = worker(&up, "127.0.0.1", "");
    // Version 1, the request in the same write.
    let mut c = Client::connect(w.addr());
    c.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 56324 443\r\nGET /v1 HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: pp-v1\r\n\r\n");
    assert_eq!(c.response().status, 200);
    let seen = up.last();
    assert_eq!(seen.path, "/v1");
    assert_eq!(seen.header("x-forwarded-for"), Some("192.0.2.7"));
    // The access line names the client the header named, not the balancer.
    assert_eq!(w.wait_access_line("pp-v1")["client"], "192.0.2.7");
    // The connection goes on: the next request is the same client's.
    assert_eq!(c.get("/again", "").status, 200);
    assert_eq!(up.last().header("x-forwarded-for"), Some("192.0.2.7"));
    // Version 2, TCP over IPv4 with a TLV, the request in the same write.
    let mut c = Client::connect(w.addr());
    let mut bytes = v2([198, 51, 100, 9], 40000);
    bytes.extend(b"GET /v2 HTTP/1.1\r\nHost: t\r\n\r\n");
    c.send(&bytes);
    assert_eq!(c.response().status, 200);
    assert_eq!(up.last().header("x-forwarded-for"), Some("198.51.100.9"));
    // Version 1 naming an IPv6 client.
    let mut c = Client::connect(w.addr());
    c.send(b"PROXY TCP6 2001:db8::7 ::1 56324 443\r\nGET /v6 HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.response().status, 200);
    assert_eq!(up.last().header("x-forwarded-for"), Some("2001:db8::7"));
    // A balancer's own connection (v2 LOCAL, a health check): the socket's peer.
    let mut c = Client::connect(w.addr());
    let mut local = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00".to_vec();
    local.extend(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    c.send(&local);
    assert_eq!(c.response().status, 200);
    assert_eq!(up.last().header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(up.count(), 5);
}

/// The header byte by byte, the request after a pause: nothing of it is lost or
/// taken for the header, and nothing waits for bytes already there.
#[test]
fn a_header_split_over_many_writes_is_read_whole_and_no_more() {
    let up = Upstream::start();
    let w = worker(&up, "127.0.0.1", "");
    for header in [
        b"PROXY TCP4 192.0.2.7 127.0.0.1 56324 443\r\n".to_vec(),
        v2([192, 0, 2, 8], 1),
    ] {
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let (last, head) = header.split_last().expect("a header");
        for b in head {
            s.write_all(&[*b]).expect("write");
            std::thread::sleep(Duration::from_millis(2));
        }
        // Waiting for the rest of its header: shown as such, not yet as a connection.
        eventually("the connection is seen waiting for its header", || {
            metric(&w, WAITING) == 1 && metric(&w, "appproxy_connections_active") == 0
        });
        s.write_all(&[*last]).expect("write");
        std::thread::sleep(Duration::from_millis(50));
        eventually("the header is taken", || metric(&w, WAITING) == 0);
        s.write_all(b"GET /split HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .expect("request");
        let got = String::from_utf8_lossy(&read_until_closed(&mut s)).into_owned();
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    }
    assert_eq!(up.last().header("x-forwarded-for"), Some("192.0.2.8"));
    assert_eq!(up.count(), 2);
}

/// Only a trusted proxy may name a client: a connection from any other address is
/// closed at once, unanswered, even with a well-formed header; and the header is
/// required of the trusted one too.
#[test]
fn headers_are_taken_from_trusted_proxies_only_and_required_of_them() {
    let up = Upstream::start();
    let w = worker(&up, "127.0.0.2", "[timeouts]\nhead_secs = 1\n");
    // The start-up check's connection came from 127.0.0.1.
    eventually("the start-up check's connection refused", || {
        metric(&w, REFUSED) == 1
    });
    // From 127.0.0.1, not trusted: closed without a byte, whatever it sends.
    let mut c = Client::connect(w.addr());
    let _ = c
        .stream
        .write_all(b"PROXY TCP4 10.0.0.1 127.0.0.1 1 2\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut got = Vec::new();
    let _ = c.reader.read_to_end(&mut got);
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    // From 127.0.0.2, trusted, with a header: served as the client it names.
    let mut served = Client::connect_from(Ipv4Addr::new(127, 0, 0, 2), w.addr());
    served.send(b"PROXY TCP4 10.0.0.1 127.0.0.1 1 2\r\nGET /ok HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(served.response().status, 200);
    assert_eq!(up.last().header("x-forwarded-for"), Some("10.0.0.1"));
    drop(served);
    // From the trusted proxy without a header, with a malformed one, with one that
    // never ends, and with nothing at all: closed unanswered (the last at the head
    // timeout).
    let bad: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
        b"PROXY TCP4 10.0.0.1 127.0.0.1 01 2\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n",
        b"PROXY TCP4 10.0.0.1 127.0.0.1 1 2",
        b"",
    ];
    for bytes in bad {
        let mut c = Client::connect_from(Ipv4Addr::new(127, 0, 0, 2), w.addr());
        let _ = c.stream.write_all(bytes);
        let got = read_until_closed(&mut c.stream);
        assert!(
            got.is_empty(),
            "{:?}: {:?}",
            String::from_utf8_lossy(bytes),
            String::from_utf8_lossy(&got)
        );
    }
    eventually("every refusal counted", || metric(&w, REFUSED) == 1 + 5);
    assert_eq!(up.count(), 1, "nothing else reached the app");
    eventually("no connection left open", || {
        metric(&w, "appproxy_connections_active") == 0
    });
}

/// `[limits] max_connections_per_client` counts the client the header names, not
/// the balancer every client shares.
#[test]
fn the_per_client_cap_counts_the_named_client() {
    let up = Upstream::start();
    let w = worker(
        &up,
        "127.0.0.1",
        "[limits]\nmax_connections_per_client = 1\n",
    );
    let mut first = Client::connect(w.addr());
    first.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 1 443\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(first.response().status, 200);
    // A second connection of the same client: 429.
    let mut second = Client::connect(w.addr());
    second.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 2 443\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = second.response();
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["code"], "client_connection_limit");
    // Another client behind the same balancer is served.
    let mut other = Client::connect(w.addr());
    other.send(b"PROXY TCP4 192.0.2.8 127.0.0.1 3 443\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(other.response().status, 200);
    eventually("the refusal counted", || {
        metric(&w, "appproxy_connections_refused_per_client_total") == 1
    });
    // The first client's unit comes back when its connection closes.
    drop(first);
    eventually("the first client's connection closed", || {
        metric(&w, "appproxy_connections_active") == 1
    });
    let mut again = Client::connect(w.addr());
    again.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 4 443\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(again.response().status, 200);
}

/// A header naming no client (v1 `UNKNOWN`, v2 `LOCAL`: what HAProxy sends for a
/// client on a UNIX socket) leaves the balancer's address, and the clients behind
/// such headers cannot be told apart: they share that address's
/// `max_connections_per_client` instead of the balancer's own exemption, which
/// would leave them none.
#[test]
fn clients_the_header_does_not_name_share_one_limit() {
    let up = Upstream::start();
    let w = worker(
        &up,
        "127.0.0.1",
        "[limits]\nmax_connections_per_client = 1\n",
    );
    let local = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00".to_vec();
    let request = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    let with = |header: &[u8]| {
        let mut bytes = header.to_vec();
        bytes.extend(request);
        bytes
    };
    let mut first = Client::connect(w.addr());
    first.send(&with(b"PROXY UNKNOWN\r\n"));
    assert_eq!(first.response().status, 200);
    for header in [b"PROXY UNKNOWN\r\n".to_vec(), local.clone()] {
        let mut c = Client::connect(w.addr());
        c.send(&with(&header));
        let r = c.response();
        assert_eq!(r.status, 429, "{header:?}: {}", r.text());
        assert_eq!(r.json()["code"], "client_connection_limit");
    }
    // Named clients behind the same balancer are counted apart, as before.
    let mut named = Client::connect(w.addr());
    named.send(&with(b"PROXY TCP4 192.0.2.7 127.0.0.1 1 443\r\n"));
    assert_eq!(named.response().status, 200);
    // The unit comes back when the first closes.
    drop(first);
    eventually("the first connection closed", || {
        metric(&w, "appproxy_connections_active") == 1
    });
    let mut again = Client::connect(w.addr());
    again.send(&with(&local));
    assert_eq!(again.response().status, 200);
}

/// A header cut short by the peer's end of stream (its write side shut, the
/// connection still open for reading): closed as a bad header at once — the bytes
/// already there never become a header, and the core does not spin on them — and
/// the core goes on serving.
#[test]
fn a_header_cut_short_by_end_of_stream_is_refused_and_the_core_goes_on() {
    let up = Upstream::start();
    let w = worker(&up, "127.0.0.1", "[timeouts]\nhead_secs = 60\n");
    // The start-up check's connection (no header) is refused too: counted first, or
    // a count published after it was read would be one more than the loop expects.
    eventually("the start-up check's connection refused", || {
        metric(&w, REFUSED) == 1
    });
    let before = 1;
    let partial: [&[u8]; 3] = [
        b"PROXY TCP4 192.0.2.7 127.0.0.1 1",
        b"PROX",
        &v2([192, 0, 2, 9], 7)[..20],
    ];
    for (i, bytes) in partial.iter().enumerate() {
        let mut s = TcpStream::connect(w.addr()).expect("connect");
        s.write_all(bytes).expect("write");
        // Seen waiting first, then the end of stream (an edge of its own).
        std::thread::sleep(Duration::from_millis(50));
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let got = read_until_closed(&mut s);
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
        // The same core serves the next connection (one core: a spinning one
        // would serve nothing more).
        let mut c = Client::connect(w.addr());
        c.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 1 2\r\nGET /next HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(c.response().status, 200);
        eventually("the cut-short header counted", || {
            metric(&w, REFUSED) == before + i as u64 + 1
        });
    }
}

/// A header that names no client (v1 `UNKNOWN`, v2 `LOCAL`) is what a balancer
/// sends for its own health checks, but also for a client it cannot describe
/// (HAProxy does so for one that came over a UNIX socket): the connection is served
/// as the balancer's address, never as a trusted proxy, so forwarding headers in
/// its requests are not believed. A header naming a client that is itself a trusted
/// proxy keeps them (a chain of proxies).
#[test]
fn a_header_naming_no_client_does_not_make_forwarding_headers_believed() {
    let up = Upstream::start();
    let w = worker(&up, "127.0.0.1", "");
    let request = b"GET /spoof HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 203.0.113.66\r\n\r\n";
    let local = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00".to_vec();
    for header in [b"PROXY UNKNOWN\r\n".to_vec(), local] {
        let mut c = Client::connect(w.addr());
        let mut bytes = header.clone();
        bytes.extend(request);
        c.send(&bytes);
        let r = c.response();
        assert_eq!(r.status, 200, "{}", r.text());
        let seen = up.last();
        assert_eq!(seen.path, "/spoof");
        assert_eq!(
            seen.header("x-forwarded-for"),
            Some("127.0.0.1"),
            "{header:?}: {seen:?}"
        );
        assert_eq!(seen.header("x-real-ip"), Some("127.0.0.1"), "{seen:?}");
    }
    // A named client in trusted_proxies: its forwarding headers stand.
    let mut c = Client::connect(w.addr());
    let mut bytes = b"PROXY TCP4 127.0.0.1 127.0.0.1 1 2\r\n".to_vec();
    bytes.extend(request);
    c.send(&bytes);
    assert_eq!(c.response().status, 200);
    let seen = up.last();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.66, 127.0.0.1")
    );
    assert_eq!(seen.header("x-real-ip"), Some("203.0.113.66"));
}

/// A balancer listening dual-stack (HAProxy's `bind [::]:443 v4v6`) relays an IPv4
/// client as an IPv4-mapped IPv6 address, in either version: the client is the IPv4
/// address (what the app is told, what IPv4 allowlists and limits see).
#[test]
fn an_ipv4_mapped_client_is_its_ipv4_address() {
    let up = Upstream::start();
    let w = worker(&up, "127.0.0.1", "");
    let mut c = Client::connect(w.addr());
    c.send(b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:127.0.0.1 56324 443\r\nGET /mapped HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.response().status, 200);
    let seen = up.last();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("192.0.2.7"),
        "{seen:?}"
    );
    assert_eq!(
        seen.header("forwarded")
            .map(|f| f.starts_with("for=192.0.2.7;")),
        Some(true),
        "{seen:?}"
    );
    let mut body = vec![0u8; 10];
    body.extend([0xff, 0xff, 198, 51, 100, 9]);
    body.extend([0u8; 10]);
    body.extend([0xff, 0xff, 127, 0, 0, 1]);
    body.extend(40000u16.to_be_bytes());
    body.extend(443u16.to_be_bytes());
    let mut bytes = b"\r\n\r\n\x00\r\nQUIT\n\x21\x21".to_vec();
    bytes.extend((body.len() as u16).to_be_bytes());
    bytes.extend(body);
    bytes.extend(b"GET /mapped2 HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut c = Client::connect(w.addr());
    c.send(&bytes);
    assert_eq!(c.response().status, 200);
    assert_eq!(up.last().header("x-forwarded-for"), Some("198.51.100.9"));
}

/// `[timeouts] head_secs` bounds a connection from its accept to its first request
/// head, the PROXY protocol header included (nginx's `client_header_timeout`): a
/// header sent late does not start the request's head timeout afresh. The header
/// at 1.2 s with part of a head: by 2.2 s (the timeout is 2 s) the 408 is there; a
/// new timeout from the header would have waited for the rest until 3.2 s.
#[test]
fn the_head_timeout_runs_from_the_accept_through_the_header() {
    let up = Upstream::start();
    let w = worker(&up, "127.0.0.1", "[timeouts]\nhead_secs = 2\n");
    let mut s = TcpStream::connect(w.addr()).expect("connect");
    let accepted = Instant::now();
    common::sleep_until(accepted + Duration::from_millis(1200));
    s.write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 56324 443\r\nGET /slow HTTP/1.1\r\n")
        .expect("the header, in time");
    common::sleep_until(accepted + Duration::from_millis(2200));
    if !common::answered_within(&s, Duration::from_millis(800)) {
        let _ = s.write_all(b"Host: t\r\n\r\n");
    }
    let got = read_until_closed(&mut s);
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    // (A header refused is closed without an answer: the 408 says it was taken.)
    assert_eq!(up.count(), 0);
}
