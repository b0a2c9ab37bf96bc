//! Every wait of the storage-proxy's two servers is bounded, against a real process:
//! a silent connection and a half head are closed after `header_read_timeout_secs`,
//! the connection cap closes the connection past it and the API serves again once
//! connections leave, one address gets only its share of the cap once half of it
//! is taken, a manager body that stalls is answered 408, and a delete
//! naming more paths than `max_delete_paths` is refused whole. (A tus PATCH whose
//! body stalls: `storage_attack.rs`.)

mod storage_common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use appproxy_test_support::http::closed_by_server;

/// How long a test waits for a server to close a connection it should close.
const HANG_GUARD: Duration = Duration::from_secs(30);

use storage_common::{Proxy, TOKEN, VFID};

/// The client API's head limit (docs/limits.md): the longest request target it
/// serves, 65 534 bytes, and 8 KiB for the method, the version and the header
/// fields.
const CLIENT_HEAD: usize = 65_534 + 8_192;

/// A `GET` head of exactly `total` bytes for `target`, padded with one header field.
fn head_of(target: &str, total: usize) -> String {
    let bare = format!("GET {target} HTTP/1.1\r\nHost: t\r\nX-Pad: \r\nConnection: close\r\n\r\n");
    let pad = total
        .checked_sub(bare.len())
        .unwrap_or_else(|| panic!("a head of {total} bytes cannot carry {target}"));
    let head = format!(
        "GET {target} HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(pad)
    );
    assert_eq!(head.len(), total);
    head
}

/// Sends `head` to `addr` and reads the answer until the server closes: its
/// status line, or nothing when the server closed with the head unread (a reset
/// that took any answer with it). Fails when the server has not closed within
/// [`HANG_GUARD`].
fn status_of(addr: std::net::SocketAddr, head: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    // A refused head may be answered before it is all sent.
    let _ = s.write_all(head);
    s.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!(
            "{addr}: a head of {} bytes: not closed by the server ({e})",
            head.len()
        ),
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    text.lines().next().unwrap_or_default().to_owned()
}

/// Refused: 431, or, when the server closed with the rest of the head unread, a
/// reset that took the 431 with it; either way closed long before the head timer.
fn head_refused(status: &str) -> bool {
    status.is_empty() || status.starts_with("HTTP/1.1 431")
}

/// All that the server sends on `s` until it closes (30 s at most), as text.
fn answer(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw).into_owned()
}

/// A metric's value for one API from `/metrics`.
fn metric(p: &Proxy, name: &str, api: &str) -> u64 {
    let r = appproxy_test_support::http::request(p.manager, "GET", "/metrics", &[], b"");
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let key = format!("{name}{{api=\"{api}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} in {text}"))
}

#[test]
fn silent_connections_and_half_heads_are_closed_and_the_cap_holds() {
    let p =
        Proxy::start("header_read_timeout_secs = 1\nidle_timeout_secs = 2\nmax_connections = 3");
    for addr in [p.manager, p.client] {
        let mut silent = TcpStream::connect(addr).expect("connect");
        let mut half = TcpStream::connect(addr).expect("connect");
        half.write_all(b"GET /status HTTP/1.1\r\nHost: t\r\n")
            .expect("send");
        assert!(
            closed_by_server(&mut silent, HANG_GUARD),
            "{addr}: a silent connection is closed"
        );
        assert!(
            closed_by_server(&mut half, HANG_GUARD),
            "{addr}: a half head is closed"
        );
    }
    // Both closures are counted as timed out.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(
        &p,
        "storage_proxy_api_connections_timed_out_total",
        "client",
    ) < 2
    {
        assert!(Instant::now() < deadline, "the closures are counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(p);

    // The client API's cap: three held connections (their heads given time, so the
    // header timer cannot close one first), the fourth closed at once.
    let p = Proxy::start("header_read_timeout_secs = 60\nmax_connections = 3");
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(p.client).expect("connect"))
        .collect();
    for s in &mut held {
        s.write_all(b"G").expect("send");
    }
    // Held connections are accepted and counted before the fourth arrives.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&p, "storage_proxy_api_connections", "client") < 3 {
        assert!(
            Instant::now() < deadline,
            "the held connections are counted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut fourth = TcpStream::connect(p.client).expect("connect");
    assert!(
        closed_by_server(&mut fourth, HANG_GUARD),
        "over the cap: closed"
    );
    assert!(metric(&p, "storage_proxy_api_connections_refused_total", "client") >= 1);
    assert_eq!(
        metric(&p, "storage_proxy_api_connections_refused_total", "manager"),
        0,
        "each API has its own cap"
    );
    drop(held);
    // Once the server has seen them go, the client API serves again.
    let deadline = Instant::now() + Duration::from_secs(30);
    // Until the server has seen the held connections close, a new one may still be
    // over the cap and closed: an attempt to repeat, not a failure.
    let attempt = || -> std::io::Result<String> {
        let mut s = TcpStream::connect(p.client)?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
        Ok(answer(&mut s))
    };
    loop {
        if attempt().is_ok_and(|text| text.starts_with("HTTP/1.1 200")) {
            break;
        }
        assert!(Instant::now() < deadline, "the client API serves again");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An HTTP/1.1 request without `Host`, any request with two or with one that is no
/// host and port (a list, a user part), is refused 400 on both APIs (RFC 9112
/// §3.2), as the service's JSON error with its request ID, the connection closed;
/// an HTTP/1.0 request needs none.
#[test]
fn an_http11_request_needs_exactly_one_host() {
    let p = Proxy::start("");
    for addr in [p.manager, p.client] {
        for head in [
            "GET /status HTTP/1.1\r\nX-Backend-Request-ID: no-host-1\r\n\r\n",
            "GET /status HTTP/1.1\r\nHost: a\r\nHost: b\r\nX-Backend-Request-ID: no-host-1\r\n\r\n",
            "GET /status HTTP/1.1\r\nHost: a, b\r\nX-Backend-Request-ID: no-host-1\r\n\r\n",
            "GET /status HTTP/1.1\r\nHost: u@h\r\nX-Backend-Request-ID: no-host-1\r\n\r\n",
            "GET /status HTTP/1.0\r\nHost: a\r\nHost: b\r\nX-Backend-Request-ID: no-host-1\r\n\r\n",
        ] {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(format!("{head}GET /status HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
                .expect("send");
            let text = answer(&mut s);
            assert_eq!(text.get(8..13), Some(" 400 "), "{head:?}: {text}");
            assert!(
                text.contains(r#""code":"bad-request""#)
                    && text.contains(r#""request_id":"no-host-1""#)
                    && text.to_ascii_lowercase().contains("connection: close"),
                "{text}"
            );
            let heads = text.lines().filter(|l| l.starts_with("HTTP/1.")).count();
            assert_eq!(heads, 1, "the request behind is not answered: {text}");
        }
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(b"GET /status HTTP/1.0\r\n\r\n").expect("send");
        let text = answer(&mut s);
        assert!(!text.starts_with("HTTP/1.1 400 "), "{text}");
    }
}

/// A kept-alive connection waits for its next request for `idle_timeout_secs`, not
/// for the head timeout: hyper's header timer, which also ran between requests,
/// closed it after `header_read_timeout_secs` (10 s), and a client reusing a
/// connection it had kept for 15 s (aiohttp's default) found it closed under a
/// request it may not repeat. A later head still has the head timeout from its
/// first byte, empty lines before it included.
#[test]
fn a_kept_alive_connection_waits_for_the_idle_timeout_and_a_later_head_for_the_head_timeout() {
    let p = Proxy::start("header_read_timeout_secs = 1\nidle_timeout_secs = 3600");
    let get = b"GET /status HTTP/1.1\r\nHost: t\r\n\r\n";
    let read_answer = |s: &mut TcpStream| {
        s.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
            let n = s.read(&mut buf).expect("an answer");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    for addr in [p.manager, p.client] {
        let mut kept = TcpStream::connect(addr).expect("connect");
        // An extra CRLF after the request (as some clients send after a body)
        // does not start the next head's timer.
        kept.write_all(&[get.as_slice(), b"\r\n"].concat())
            .expect("send");
        let first = read_answer(&mut kept);
        assert!(first.starts_with("HTTP/1.1 "), "{first}");
        // Three head timeouts of waiting between requests.
        std::thread::sleep(Duration::from_millis(3000));
        kept.write_all(get).expect("send again");
        let second = read_answer(&mut kept);
        assert!(second.starts_with("HTTP/1.1 "), "{addr}: {second}");
        // A later head that never ends (empty lines, then part of a request line)
        // is cut at the head timeout, not held for the idle one.
        // (The idle timeout is an hour: only the head timeout can close it.)
        kept.write_all(b"\r\nGET /sta").expect("send part");
        assert!(
            closed_by_server(&mut kept, HANG_GUARD),
            "{addr}: a half head is closed"
        );
        // A first head of one CR runs from the accept all the same.
        let mut blank = TcpStream::connect(addr).expect("connect");
        blank.write_all(b"\r").expect("send");
        assert!(
            closed_by_server(&mut blank, HANG_GUARD),
            "{addr}: a first head of empty lines is closed"
        );
        // Pipelined past the heads the scan keeps whole (their framing findings
        // are kept past them), a partial head behind: every whole request
        // answered, the partial head cut at the head timeout.
        let mut deep = TcpStream::connect(addr).expect("connect");
        deep.write_all(&[get.repeat(18).as_slice(), b"GET /sta"].concat())
            .expect("send");
        deep.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
        let mut got = Vec::new();
        // An end or a reset; a timeout is the hang guard's.
        let closed = deep.read_to_end(&mut got).map_or_else(
            |e| {
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            },
            |_| true,
        );
        let got = String::from_utf8_lossy(&got);
        assert!(closed, "{addr}: the partial head is closed: {got}");
        assert_eq!(
            got.matches("HTTP/1.1 ").count(),
            18,
            "{addr}: every whole request answered, then closed: {got}"
        );
    }
}

/// A keep-alive connection from `from` to the client API that was served: one
/// `GET /` answered 200, the connection left open. `None` when the server closed it
/// with no answer (refused at accept).
fn served_from(p: &Proxy, from: std::net::Ipv4Addr) -> Option<TcpStream> {
    let mut s = appproxy_test_support::net::connect_from(from, p.client).expect("connect");
    s.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
    if s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").is_err() {
        return None;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The status answer is small JSON with a Content-Length: its head and body.
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("from {from}: neither served nor closed ({e})"),
        }
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("a content-length");
            if got.len() >= end + 4 + len {
                break;
            }
        }
    }
    if got.is_empty() {
        return None;
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    Some(s)
}

/// Found in the third attack round: one tokenless client opened every connection the
/// client API takes (2,188 under the descriptor limit there) and kept each alive
/// with a `GET /` every 8 s; every legitimate download was refused meanwhile. The
/// cap is shared by address now: below half of it one address gets what it asks
/// for (more than its share); from half on, an address holding its share gets no
/// more (closed at once, counted), while other addresses still connect and are
/// served, up to their own share, and the cap still holds for everyone.
#[test]
fn one_address_cannot_take_every_client_connection() {
    use std::net::Ipv4Addr;
    // The default share: one in 8 of the cap, 16 of 128.
    const CAP: usize = 128;
    const SHARE: usize = 16;
    let p = Proxy::start(&format!(
        "header_read_timeout_secs = 60\nidle_timeout_secs = 600\nmax_connections = {CAP}"
    ));
    let a = Ipv4Addr::new(127, 0, 0, 1);
    // Below half the cap: `a` gets 64, four times its share (an office behind one
    // NAT).
    let mut held: Vec<TcpStream> = (0..CAP / 2)
        .map(|i| served_from(&p, a).unwrap_or_else(|| panic!("a's connection {i}: below half")))
        .collect();
    // Half the cap is taken and `a` holds its share: its next is closed at once,
    // though half the slots are free.
    assert!(
        served_from(&p, a).is_none(),
        "one address holding its share took a slot past half the cap"
    );
    assert_eq!(
        metric(
            &p,
            "storage_proxy_api_connections_refused_address_share_total",
            "client"
        ),
        1
    );
    assert_eq!(
        metric(&p, "storage_proxy_api_connections_refused_total", "client"),
        1
    );
    // Other addresses connect and are served, each up to its share, until the cap.
    for n in 0..(CAP / 2) / SHARE {
        let other = Ipv4Addr::new(127, 0, 0, 2 + n as u8);
        for i in 0..SHARE {
            held.push(served_from(&p, other).unwrap_or_else(|| panic!("{other}'s connection {i}")));
        }
        if n == 0 {
            assert!(served_from(&p, other).is_none(), "{other} past its share");
        }
    }
    assert_eq!(held.len(), CAP);
    assert!(
        served_from(&p, Ipv4Addr::new(127, 0, 0, 99)).is_none(),
        "past the cap"
    );
    assert_eq!(
        metric(&p, "storage_proxy_api_connections", "client"),
        CAP as u64
    );
    assert_eq!(
        metric(
            &p,
            "storage_proxy_api_connections_refused_address_share_total",
            "client"
        ),
        2
    );
    assert_eq!(
        metric(&p, "storage_proxy_api_connections_refused_total", "client"),
        3
    );
    // The held connections are still served (keep-alive).
    for s in &mut held {
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .expect("send");
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).expect("an answer");
        assert_eq!(&buf, b"HTTP/1.1 200");
    }
    drop((held, p));
    // The share is configured by `max_connections_per_address`.
    let p = Proxy::start("max_connections = 4\nmax_connections_per_address = 1");
    let _held: Vec<TcpStream> = (0..2)
        .map(|i| served_from(&p, a).unwrap_or_else(|| panic!("connection {i}: below half")))
        .collect();
    assert!(served_from(&p, a).is_none(), "past the configured share");
    assert!(served_from(&p, Ipv4Addr::new(127, 0, 0, 2)).is_some());
}

/// The last answer in `text` refuses its request, of request ID `id`, for a bare LF.
fn last_refused_for_a_bare_lf(text: &str, id: &str) {
    let last = &text[text.rfind("HTTP/1.1 ").expect("an answer")..];
    assert!(
        last.starts_with("HTTP/1.1 400 ")
            && last.contains(r#""code":"bad-framing""#)
            && last.contains("bare LF")
            && last.contains(&format!(r#""request_id":"{id}""#)),
        "{text}"
    );
}

/// A vfolder made on `p`, a token for a 3-byte upload of `f.bin` into it, and the
/// body of a listing of it.
fn upload_and_listing(p: &Proxy) -> (String, String) {
    storage_common::create_folder(p);
    let token = p.token(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "f.bin", "size": 3}),
    );
    let list = serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "."}).to_string();
    (token, list)
}

/// A request whose body framing is in doubt — `Content-Length` beside
/// `Transfer-Encoding`, or a coding the server would pass on undecoded — is refused
/// on both APIs before a handler sees it (DESIGN's limits table: 400, or 501, and
/// the connection closed), with the request ID. Before, hyper framed the body by
/// `Transfer-Encoding` and ignored `Content-Length`: the PATCH wrote `abc` (204),
/// the listing answered 200, and `gzip, chunked` stored the bytes as they came.
#[test]
fn bodies_framed_two_ways_are_refused_on_both_apis() {
    let p = Proxy::start("");
    let (token, list) = upload_and_listing(&p);
    let chunked_list = format!("{:x}\r\n{list}\r\n0\r\n\r\n", list.len());
    for (framing, status, code) in [
        (
            "Content-Length: 50\r\nTransfer-Encoding: chunked\r\n",
            "400",
            "bad-framing",
        ),
        (
            "Transfer-Encoding: gzip, chunked\r\n",
            "501",
            "unsupported-transfer-coding",
        ),
        (
            "Transfer-Encoding: chunked, chunked\r\n",
            "400",
            "bad-framing",
        ),
        // No coding at all: hyper's own refusal, as the service's JSON error.
        ("Transfer-Encoding: \r\n", "400", "bad-request"),
    ] {
        for (addr, head, body) in [
            (
                p.client,
                format!("PATCH /upload?token={token} HTTP/1.1\r\nHost: t\r\nUpload-Offset: 0\r\nTus-Resumable: 1.0.0\r\n"),
                "3\r\nabc\r\n0\r\n\r\n".to_owned(),
            ),
            (
                p.manager,
                format!("POST /folder/file/list HTTP/1.1\r\nHost: t\r\nX-BackendAI-Storage-Auth-Token: {TOKEN}\r\nContent-Type: application/json\r\n"),
                chunked_list.clone(),
            ),
        ] {
            let mut s = TcpStream::connect(addr).expect("connect");
            // A second request behind the body: never answered.
            s.write_all(
                format!("{head}X-Backend-Request-ID: framing-2\r\n{framing}\r\n{body}GET /status HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
            )
            .expect("send");
            let text = answer(&mut s);
            assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{framing:?}: {text}");
            assert!(
                text.contains(&format!(r#""code":"{code}""#))
                    && text.contains(r#""request_id":"framing-2""#),
                "{text}"
            );
            let lower = text.to_ascii_lowercase();
            assert!(lower.contains("connection: close"), "{text}");
            assert!(lower.contains("x-backend-request-id: framing-2"), "{text}");
            assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "one answer only: {text}");
        }
    }
    assert!(!p.vfolder_path().join("f.bin").exists(), "nothing written");
    assert_eq!(p.tus_head(&token).header("upload-offset"), Some("0"));
    // A body framed one way passes as before.
    let r = p.tus_patch(&token, "0", b"abc");
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
}

/// A line of a request head that ends in a bare LF is refused on both APIs, before
/// a handler sees it (400 `bad-framing`, the connection closed): hyper ends the
/// line there, but a peer in front of the service that keeps the LF inside a
/// field's value reads `X: y\nContent-Length: N` as one field, frames the request
/// without a body, and sends the body on as a request of its own. Before, the
/// upload below wrote `abc` (204).
#[test]
fn a_bare_lf_in_a_request_head_is_refused_on_both_apis() {
    let p = Proxy::start("");
    let (token, list) = upload_and_listing(&p);
    for (addr, head, body) in [
        (
            p.client,
            format!("PATCH /upload?token={token} HTTP/1.1\r\nHost: t\r\nUpload-Offset: 0\r\nTus-Resumable: 1.0.0\r\nX: y\nContent-Length: 3\r\n"),
            "abc".to_owned(),
        ),
        (
            p.manager,
            format!("POST /folder/file/list HTTP/1.1\nHost: t\r\nX-BackendAI-Storage-Auth-Token: {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", list.len()),
            list.clone(),
        ),
        (
            p.manager,
            format!("POST /folder/file/list HTTP/1.1\r\nHost: t\r\nX-BackendAI-Storage-Auth-Token: {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", list.len()),
            // The head's last line: an empty line that is a bare LF.
            format!("\n{list}"),
        ),
    ] {
        let mut s = TcpStream::connect(addr).expect("connect");
        let head = head.replacen("Host: t\r\n", "Host: t\r\nX-Backend-Request-ID: bare-lf\r\n", 1);
        let end = if body.starts_with('\n') { "" } else { "\r\n" };
        s.write_all(format!("{head}{end}{body}GET /status HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .expect("send");
        let text = answer(&mut s);
        assert!(text.starts_with("HTTP/1.1 400 "), "{head:?}: {text}");
        assert!(
            text.contains(r#""code":"bad-framing""#) && text.contains("bare LF"),
            "{text}"
        );
        assert!(text.to_ascii_lowercase().contains("connection: close"), "{text}");
        assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "one answer only: {text}");
    }
    assert!(!p.vfolder_path().join("f.bin").exists(), "nothing written");
    assert_eq!(p.tus_head(&token).header("upload-offset"), Some("0"));
    let r = p.tus_patch(&token, "0", b"abc");
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    // Behind a request whose length is given twice (hyper serves it), the next
    // head is judged: refused for its bare LF.
    let mut s = TcpStream::connect(p.manager).expect("connect");
    s.write_all(
        b"GET /status HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n\
          GET /status HTTP/1.1\nHost: t\r\nX-Backend-Request-ID: behind\r\n\r\n",
    )
    .expect("send");
    let text = answer(&mut s);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 2, "{text}");
    last_refused_for_a_bare_lf(&text, "behind");
    // Behind 20 pipelined requests (past the 16 heads the scan keeps whole), the
    // next head is judged all the same.
    let mut s = TcpStream::connect(p.manager).expect("connect");
    s.write_all(
        [
            b"GET /status HTTP/1.1\r\nHost: t\r\n\r\n".repeat(20),
            b"GET /status HTTP/1.1\nHost: t\r\nX-Backend-Request-ID: deep\r\n\r\n".to_vec(),
        ]
        .concat()
        .as_slice(),
    )
    .expect("send");
    let text = answer(&mut s);
    assert_eq!(text.matches("HTTP/1.1 200 ").count(), 20, "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 21, "{text}");
    last_refused_for_a_bare_lf(&text, "deep");
    // A length line padded past the scan's reading would put it out of step, and
    // the heads after it would go unjudged: it is refused itself.
    let mut s = TcpStream::connect(p.manager).expect("connect");
    s.write_all(
        format!(
            "GET /status HTTP/1.1\r\nHost: t\r\nX-Backend-Request-ID: padded\r\nContent-Length:{}0\r\n\r\n\
             GET /status HTTP/1.1\nHost: t\r\n\r\n",
            " ".repeat(9000)
        )
        .as_bytes(),
    )
    .expect("send");
    let text = answer(&mut s);
    assert!(
        text.starts_with("HTTP/1.1 400 ")
            && text.contains(r#""code":"bad-framing""#)
            && text.contains("too long to read")
            && text.contains(r#""request_id":"padded""#),
        "{text}"
    );
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
}

/// A request whose framing is in doubt is refused however it comes: pipelined
/// behind a request the service has not answered yet, in the same write as the
/// body of a request answered `100 Continue`, or behind a chunked body (which the
/// scan follows as hyper's decoder reads it). The server keeps what it found per
/// head in order; before, such a request was judged by hyper's rule alone (framed
/// by `Transfer-Encoding`) and reached the handler.
#[test]
fn framing_in_doubt_is_refused_behind_a_pipelined_or_continued_request() {
    let p = Proxy::start("");
    storage_common::create_folder(&p);
    let list = serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "."}).to_string();
    let chunked_list = format!("{:x}\r\n{list}\r\n0\r\n\r\n", list.len());
    let head = |id: &str, extra: &str| {
        format!("POST /folder/file/list HTTP/1.1\r\nHost: t\r\nX-BackendAI-Storage-Auth-Token: {TOKEN}\r\nContent-Type: application/json\r\nX-Backend-Request-ID: {id}\r\n{extra}\r\n")
    };
    let first = head(
        "framing-first",
        &format!("Content-Length: {}\r\n", list.len()),
    );
    let continued = head(
        "framing-first",
        &format!("Expect: 100-continue\r\nContent-Length: {}\r\n", list.len()),
    );
    let smuggled = format!(
        "{}{chunked_list}GET /status HTTP/1.1\r\nHost: t\r\n\r\n",
        head(
            "framing-second",
            "Content-Length: 50\r\nTransfer-Encoding: chunked\r\n"
        )
    );
    let chunked_first = format!(
        "{}{chunked_list}",
        head("framing-first", "Transfer-Encoding: chunked\r\n")
    );
    for (what, continue_first) in [
        ("pipelined", false),
        ("after 100", true),
        ("behind a chunked body", false),
    ] {
        let mut s = TcpStream::connect(p.manager).expect("connect");
        if what == "behind a chunked body" {
            s.write_all(format!("{chunked_first}{smuggled}").as_bytes())
                .expect("send");
        } else if continue_first {
            s.write_all(continued.as_bytes()).expect("send");
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            let mut interim = [0u8; 25];
            s.read_exact(&mut interim).expect("interim answer");
            assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
            s.write_all(format!("{list}{smuggled}").as_bytes())
                .expect("send");
        } else {
            s.write_all(format!("{first}{list}{smuggled}").as_bytes())
                .expect("send");
        }
        let text = answer(&mut s);
        assert!(text.starts_with("HTTP/1.1 200 "), "{what}: {text}");
        assert_eq!(text.matches("HTTP/1.1 ").count(), 2, "{what}: {text}");
        let second = &text[text.rfind("HTTP/1.1 ").expect("second")..];
        assert!(second.starts_with("HTTP/1.1 400 "), "{what}: {text}");
        assert!(
            second.contains(r#""code":"bad-framing""#)
                && second.contains(r#""request_id":"framing-second""#),
            "{what}: {text}"
        );
        assert!(
            second.to_ascii_lowercase().contains("connection: close"),
            "{what}: {text}"
        );
    }
}

#[test]
fn a_manager_body_that_stalls_is_answered_408_and_closed() {
    let p = Proxy::start("body_read_timeout_secs = 1\nidle_timeout_secs = 600");
    let mut s = TcpStream::connect(p.manager).expect("connect");
    s.write_all(
        format!(
            "POST /folder/create HTTP/1.1\r\nHost: t\r\nX-BackendAI-Storage-Auth-Token: {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .expect("send");
    let text = answer(&mut s);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains(r#""code":"request-timeout""#)
            && text.contains(r#""type":"https://api.backend.ai/probs/storage/request-timeout""#)
            && text.contains(r#""title":"request body not received in time""#),
        "{text}"
    );
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    // A body in two pieces well within the deadline is read whole.
    let body = serde_json::json!({"volume": "local", "vfid": VFID}).to_string();
    let mut s = TcpStream::connect(p.manager).expect("connect");
    s.write_all(
        format!(
            "POST /folder/create HTTP/1.1\r\nHost: t\r\nX-BackendAI-Storage-Auth-Token: {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .expect("send");
    let (a, b) = body.split_at(body.len() / 2);
    s.write_all(a.as_bytes()).expect("send");
    std::thread::sleep(Duration::from_millis(200));
    s.write_all(b.as_bytes()).expect("send");
    let text = answer(&mut s);
    assert!(text.starts_with("HTTP/1.1 204"), "{text}");
    assert!(p.vfolder_path().is_dir(), "the folder was created");
}

/// Heads are bounded per API: the manager API's (a token, a request ID) at 64 KiB,
/// the client API's at the longest request target it serves (65 534 bytes: download
/// tokens travel in the query) and 8 KiB, to the byte: a head of that size is
/// served, one byte more answered 431. An unfinished head is closed once it passes
/// the limit, not held to the head timer: hyper's default (~408 KiB) let callers
/// without a token make the proxy hold 400 KiB per connection (1000 connections
/// took it from 6.5 MB to 427 MB), for heads that could never be served. An archive
/// token too long for its URL (see `the_longest_archive_token_issued_downloads`) is
/// refused when it is made, with a reason, rather than with a 431 or 414 when the
/// browser follows it.
#[test]
fn heads_are_bounded_per_api_and_archive_tokens_fit_their_url() {
    // The head timer far away: a connection closed before it is the limit's doing.
    let p = Proxy::start("header_read_timeout_secs = 600");
    storage_common::create_folder(&p);
    let status = |addr, path: &str, total: usize| status_of(addr, head_of(path, total).as_bytes());
    assert!(status(p.manager, "/status", 48 << 10).starts_with("HTTP/1.1 200"));
    let s = status(p.manager, "/status", 200 << 10);
    assert!(head_refused(&s), "{s}");
    // The client API: served up to its limit, refused one byte past it.
    let s = status(p.client, "/", CLIENT_HEAD);
    assert!(s.starts_with("HTTP/1.1 200"), "{s}");
    let s = status(p.client, "/", CLIENT_HEAD + 1);
    assert!(head_refused(&s), "{s}");
    let s = status(p.client, "/", 300 << 10);
    assert!(head_refused(&s), "{s}");
    // A head that never ends (no blank line) is closed once past the limit, long
    // before the head timer.
    let mut unfinished = TcpStream::connect(p.client).expect("connect");
    let start = Instant::now();
    let _ = unfinished.write_all(
        format!(
            "GET /download?token={} HTTP/1.1\r\nHost: t\r\n",
            "a".repeat(100 << 10)
        )
        .as_bytes(),
    );
    assert!(
        closed_by_server(&mut unfinished, HANG_GUARD),
        "an unfinished head past the limit is closed"
    );
    assert!(start.elapsed() < HANG_GUARD, "{:?}", start.elapsed());
    // 3,000 paths of 150 bytes: a token of ~600 KiB, which no download URL carries.
    let long: Vec<String> = (0..3000).map(|i| format!("{i:0>150}")).collect();
    let r = p.manager(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "vfid": VFID, "files": long}),
        None,
    );
    let text = String::from_utf8_lossy(&r.body[..r.body.len().min(300)]);
    assert_eq!(r.status, 400, "{text}");
    assert!(text.contains("list fewer paths"), "{text}");
    // 200 such paths (~40 KiB) make a token whose URL is served.
    for name in &long[..200] {
        std::fs::write(p.vfolder_path().join(name), b"x").expect("file");
    }
    let token = p.token(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "vfid": VFID, "files": &long[..200]}),
    );
    assert!(token.len() > 40_000, "{}", token.len());
    let r = p.download_archive(&token);
    assert_eq!(r.status, 200);
}

/// The storage-proxy's rule for a request without an ID is to generate one and echo
/// it on every answer: also on the answer the HTTP layer makes itself to a head it
/// cannot take (a malformed head, 400), on both APIs. A valid ID the head carried is
/// echoed instead.
#[test]
fn heads_the_server_cannot_take_get_a_request_id_all_the_same() {
    let p = Proxy::start("");
    let exchange = |addr, bytes: &[u8]| -> String {
        let mut s = TcpStream::connect(addr).expect("connect");
        let _ = s.write_all(bytes);
        s.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("an answer, then the close");
        String::from_utf8_lossy(&got).into_owned()
    };
    for addr in [p.manager, p.client] {
        let generated = exchange(
            addr,
            b"GET /status HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n",
        );
        let echoed = exchange(
            addr,
            b"GET /status HTTP/1.1\r\nHost: t\r\nX-Request-ID: bad-head-7\r\nno colon here\r\n\r\n",
        );
        for (text, want) in [(&generated, None), (&echoed, Some("bad-head-7"))] {
            assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
            let (head, body) = text.split_once("\r\n\r\n").expect("a head");
            let v: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
            assert_eq!(v["code"], "bad-request", "{text}");
            // Shaped as every other storage-proxy error.
            assert_eq!(
                v["type"], "https://api.backend.ai/probs/storage/bad-request",
                "{text}"
            );
            assert_eq!(v["title"], v["error"], "{text}");
            let id = v["request_id"]
                .as_str()
                .expect("an ID in the body")
                .to_owned();
            match want {
                Some(want) => assert_eq!(id, want, "{text}"),
                None => assert!(uuid::Uuid::parse_str(&id).is_ok(), "generated: {text}"),
            }
            assert!(
                head.to_ascii_lowercase().contains(&format!(
                    "\r\nx-backend-request-id: {}",
                    id.to_ascii_lowercase()
                )),
                "{text}"
            );
        }
    }
}

/// A delete names at most `max_delete_paths` paths (1000 by default): each costs a
/// climb of its parent directories, so one more is refused 400 with the setting
/// named and nothing deleted, on both delete routes; the cap itself is served.
#[test]
fn a_delete_of_more_paths_than_the_cap_is_refused_whole() {
    let p = Proxy::start("");
    storage_common::create_folder(&p);
    let vf = p.vfolder_path();
    let names: Vec<String> = (0..1_001).map(|i| format!("f{i}")).collect();
    for n in &names {
        std::fs::write(vf.join(n), b"x").expect("file");
    }
    for route in ["/folder/file/delete", "/folder/file/delete-async"] {
        let r = p.manager(
            route,
            serde_json::json!({"volume": "local", "vfid": VFID, "relpaths": names}),
            None,
        );
        assert_eq!(
            r.status,
            400,
            "{route}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let body = String::from_utf8_lossy(&r.body);
        assert!(body.contains("max_delete_paths"), "{route}: {body}");
        assert!(
            names.iter().all(|n| vf.join(n).exists()),
            "{route}: nothing deleted"
        );
    }
    let r = p.manager(
        "/folder/file/delete",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpaths": names[..1_000]}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(names[..1_000].iter().all(|n| !vf.join(n).exists()));
    assert!(vf.join(&names[1_000]).exists());
}

/// An archive token is issued only when its download URL fits what the client API
/// takes: hyper answers 414 to a request target past 65 534 bytes, however much
/// room the head has. At the edge, the longest token issued downloads (200) and one
/// byte of request more is refused when the token is asked for (400, saying why).
/// Before, tokens up to ~400 KiB were issued and every one past 64 KiB got 414.
#[test]
fn the_longest_archive_token_issued_downloads() {
    let p = Proxy::start("");
    storage_common::create_folder(&p);
    std::fs::write(p.vfolder_path().join("a.txt"), b"a").expect("file");
    // The token grows with the archive's file name, byte by byte.
    let ask = |len: usize| {
        p.manager(
            "/folder/file/archive-download-token",
            serde_json::json!({"volume": "local", "vfid": VFID, "files": ["a.txt"], "filename": "x".repeat(len)}),
            None,
        )
    };
    let (mut ok, mut refused) = (0usize, 120_000usize);
    assert_eq!(ask(ok).status, 200);
    assert_eq!(ask(refused).status, 400);
    while refused - ok > 1 {
        let mid = (ok + refused) / 2;
        match ask(mid).status {
            200 => ok = mid,
            400 => refused = mid,
            s => panic!("{mid}: {s}"),
        }
    }
    let token = ask(ok).json()["token"].as_str().expect("token").to_owned();
    let target = format!("/download-archive?token={token}");
    assert!(
        (65_533..=65_534).contains(&target.len()),
        "the longest token issued makes a request target of {} bytes",
        target.len()
    );
    let r = p.download_archive(&token);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("application/zip"));
    // With header fields filling the head to the client API's limit, it still
    // downloads; one byte more and the head is refused.
    let head = head_of(&target, CLIENT_HEAD);
    let s = status_of(p.client, head.as_bytes());
    assert!(s.starts_with("HTTP/1.1 200"), "{s}");
    let s = status_of(p.client, head_of(&target, CLIENT_HEAD + 1).as_bytes());
    assert!(head_refused(&s), "{s}");
    let r = ask(refused);
    let text = String::from_utf8_lossy(&r.body);
    assert_eq!(r.status, 400, "{text}");
    assert!(
        text.contains("65534") && text.contains("list fewer paths"),
        "{text}"
    );
}

/// The names of a listing's items, and whether it says it was cut short.
fn listed(p: &Proxy, relpath: &str) -> (Vec<String>, bool) {
    let r = p.manager(
        "/folder/file/list",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": relpath}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let names = v["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["name"].as_str().expect("a name").to_owned())
        .collect();
    let truncated = match v.get("truncated") {
        None => false,
        Some(t) => t.as_bool().expect("truncated is a boolean"),
    };
    (names, truncated)
}

/// A user with a shell fills a directory with millions of empty files in seconds
/// (no quota counts them). A listing read and held all of them: 2 million took a
/// request 24 s and 300 MB of the proxy's memory, four at once 66 s and 1.2 GB.
/// A listing now carries at most `scandir_limit` entries (1000 by default, the
/// original's `scandir-limit`), reads the directory no further than one past
/// them, and says `"truncated": true` when it stopped there; an answer that
/// holds the whole directory is as it always was. The staging area, hidden at the
/// root, takes no place under the limit.
#[test]
fn a_listing_carries_at_most_scandir_limit_entries_and_says_it_was_cut() {
    let p = Proxy::start("");
    storage_common::create_folder(&p);
    let vf = p.vfolder_path();
    for (dir, n) in [("wide", 1500), ("full", 1000)] {
        std::fs::create_dir(vf.join(dir)).expect("dir");
        for i in 0..n {
            std::fs::File::create(vf.join(format!("{dir}/f{i:05}"))).expect("file");
        }
    }
    let (names, truncated) = listed(&p, "wide");
    assert_eq!(names.len(), 1000, "the default limit");
    assert!(truncated, "a listing cut short says so");
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, names, "sorted, each once");
    assert!(names.iter().all(|n| n.starts_with('f') && n.len() == 6));
    let (names, truncated) = listed(&p, "full");
    assert_eq!(names.len(), 1000);
    assert!(!truncated, "a whole directory is not cut");
    assert_eq!(names.first().map(String::as_str), Some("f00000"));
    assert_eq!(names.last().map(String::as_str), Some("f00999"));

    let p = Proxy::start("scandir_limit = 3");
    storage_common::create_folder(&p);
    let vf = p.vfolder_path();
    std::fs::create_dir(vf.join(".upload")).expect("staging");
    for name in ["a", "b", "c"] {
        std::fs::File::create(vf.join(name)).expect("file");
    }
    assert_eq!(
        listed(&p, "."),
        (vec!["a".into(), "b".into(), "c".into()], false)
    );
    std::fs::File::create(vf.join("d")).expect("file");
    let (names, truncated) = listed(&p, ".");
    assert_eq!(names.len(), 3);
    assert!(truncated);
    assert!(!names.iter().any(|n| n == ".upload"));
}
