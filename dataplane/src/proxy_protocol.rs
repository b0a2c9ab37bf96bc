//! The PROXY protocol (HAProxy's, versions 1 and 2) on the worker's frontends: a TCP
//! load balancer in front of the worker (AWS NLB, HAProxy in `mode tcp`, …) opens
//! each connection with a header naming the client it relays, so the worker's client
//! address — `X-Forwarded-For`, the access log, `[limits] max_connections_per_client`
//! — is the client's, not the balancer's.
//!
//! This module owns the header: [`parse`], a pure parser (bytes in, typed result
//! out), and [`read`], which takes exactly the header's bytes off the socket (it
//! peeks first, so TLS or HTTP after it reads from the socket as if the header had
//! never been there). Version 2 extensions are checked for framing and, when the
//! balancer sends one, the header's CRC32C. Only `[worker] trusted_proxies` may send
//! one: with
//! `[worker] proxy_protocol` on, a connection from any other address, or one whose
//! header is malformed or not complete within the head timeout, is closed unserved.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::core::{counter, Core};
use crate::io::TcpConn;

/// The longest version 1 header, `\r\n` included (the specification's bound).
const V1_MAX: usize = 107;

/// The version 2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\x00\r\nQUIT\n";

/// The longest version 2 header accepted: its 16 fixed bytes, the addresses and
/// type-length-value extensions (a balancer's TLS facts, an endpoint ID). The
/// protocol allows 64 KiB; no balancer sends close to this.
pub const V2_MAX: usize = 16 + 2048;

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Its length in bytes: what is taken off the socket.
    pub len: usize,
    /// The client's address and port, when the header names one. `None`: v2
    /// `LOCAL` or v1 `UNKNOWN`, the balancer's own connection (a health check) or a
    /// client it cannot describe; the socket's peer stands (see [`Relayed`]).
    pub source: Option<SocketAddr>,
}

/// The result of [`parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A complete, valid header.
    Done(Header),
    /// Valid so far: more bytes are needed.
    Incomplete,
    /// Not a valid header (why, never echoing the peer's bytes).
    Invalid(&'static str),
}

/// Parses the header at the start of `buf` (either version).
pub fn parse(buf: &[u8]) -> Parsed {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() {
            Parsed::Incomplete
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return if n < 6 {
            Parsed::Incomplete
        } else {
            parse_v1(buf)
        };
    }
    Parsed::Invalid("the connection does not start with a PROXY protocol header")
}

/// `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\r\n` or `PROXY UNKNOWN …\r\n`.
fn parse_v1(buf: &[u8]) -> Parsed {
    let window = &buf[..buf.len().min(V1_MAX)];
    // "UNKNOWN": the receiver must ignore anything before the CRLF.
    let unknown = |line: &[u8]| line == b"UNKNOWN" || line.starts_with(b"UNKNOWN ");
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        // A bare LF, or a CR followed by anything but LF, can never end well, but in
        // the ignored rest of an UNKNOWN line (refusing it there would make the
        // verdict depend on how the line was split over segments).
        let stray = !unknown(&window[6..])
            && window
                .iter()
                .enumerate()
                .any(|(i, &b)| b == b'\n' || (b == b'\r' && i + 1 < window.len()));
        return if stray || buf.len() >= V1_MAX {
            Parsed::Invalid("PROXY v1 header without CRLF within 107 bytes")
        } else {
            Parsed::Incomplete
        };
    };
    let len = end + 2;
    if unknown(&buf[6..end]) {
        // The balancer could not say: the rest, whatever its bytes, is ignored.
        return Parsed::Done(Header { len, source: None });
    }
    let Ok(line) = std::str::from_utf8(&buf[6..end]) else {
        return Parsed::Invalid("PROXY v1 header is not ASCII");
    };
    let fields: Vec<&str> = line.split(' ').collect();
    let [proto, src, dst, sport, dport] = fields[..] else {
        return Parsed::Invalid("PROXY v1 header needs five fields, single spaces");
    };
    let (Some(sport), Some(_)) = (port(sport), port(dport)) else {
        return Parsed::Invalid("PROXY v1 header has a malformed port");
    };
    let ok = match proto {
        "TCP4" => src.parse::<Ipv4Addr>().is_ok() && dst.parse::<Ipv4Addr>().is_ok(),
        "TCP6" => src.parse::<Ipv6Addr>().is_ok() && dst.parse::<Ipv6Addr>().is_ok(),
        _ => return Parsed::Invalid("PROXY v1 header with an unknown protocol"),
    };
    match src.parse::<IpAddr>() {
        Ok(ip) if ok => Parsed::Done(Header {
            len,
            source: Some(SocketAddr::new(ip, sport)),
        }),
        _ => Parsed::Invalid("PROXY v1 header with a malformed address"),
    }
}

/// A decimal port, 0-65535, without sign or leading zeros.
fn port(s: &str) -> Option<u16> {
    let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

/// The binary header: signature, version and command, family, length, addresses.
fn parse_v2(buf: &[u8]) -> Parsed {
    if buf.len() < 16 {
        return Parsed::Incomplete;
    }
    let (ver_cmd, family) = (buf[12], buf[13]);
    let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 {
        return Parsed::Invalid("PROXY v2 header with an unknown version");
    }
    if len > V2_MAX {
        return Parsed::Invalid("PROXY v2 header longer than the worker accepts");
    }
    let command = ver_cmd & 0x0f;
    if command > 1 {
        return Parsed::Invalid("PROXY v2 header with an unknown command");
    }
    if buf.len() < len {
        return Parsed::Incomplete;
    }
    let body = &buf[16..len];
    if command == 0 {
        // LOCAL: the balancer's own connection (a health check).
        return Parsed::Done(Header { len, source: None });
    }
    let (source, addresses) = match family {
        // TCP over IPv4: source, destination, source port, destination port.
        0x11 if body.len() >= 12 => (
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(body[0], body[1], body[2], body[3])),
                u16::from_be_bytes([body[8], body[9]]),
            ),
            12,
        ),
        0x21 if body.len() >= 36 => {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&body[..16]);
            (
                SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::from(ip)),
                    u16::from_be_bytes([body[32], body[33]]),
                ),
                36,
            )
        }
        0x11 | 0x21 => return Parsed::Invalid("PROXY v2 header too short for its addresses"),
        // UNSPEC, UDP, UNIX: the specification lets the receiver use the socket's
        // own addresses, but that would pass a relayed client off as the trusted
        // balancer (its forwarding headers believed): refused instead.
        _ => {
            return Parsed::Invalid(
                "PROXY v2 header relaying a client that is not TCP over IPv4 or IPv6",
            )
        }
    };
    if let Err(why) = check_extensions(&buf[..len], 16 + addresses) {
        return Parsed::Invalid(why);
    }
    Parsed::Done(Header {
        len,
        source: Some(source),
    })
}

/// Type of the extension carrying a CRC32C of the whole header.
const PP2_TYPE_CRC32C: u8 = 0x03;
/// Type of the extension carrying the balancer's unique ID of the connection.
const PP2_TYPE_UNIQUE_ID: u8 = 0x05;
/// Type of the extension carrying the client's TLS facts, with extensions of its
/// own after a 5-byte preamble.
const PP2_TYPE_SSL: u8 = 0x20;
/// The longest unique ID the specification allows.
const UNIQUE_ID_MAX: usize = 128;

/// Checks the type-length-value extensions of `header` (a whole version 2 header)
/// that start at `from`, as HAProxy's receiver does: they fill the rest of the
/// header exactly, a unique ID is at most 128 bytes, TLS facts hold their preamble
/// and well-framed extensions of their own, and a CRC32C, when the balancer sends
/// one, is 4 bytes and matches the header (computed with the checksum's bytes as
/// zeros). A corrupted header is refused rather than its client believed.
fn check_extensions(header: &[u8], from: usize) -> Result<(), &'static str> {
    let mut crc_at = None;
    for Extension { at, kind, value } in extensions(header, from)? {
        match kind {
            PP2_TYPE_CRC32C if value.len() != 4 => {
                return Err("PROXY v2 header with a CRC32C extension that is not 4 bytes")
            }
            PP2_TYPE_CRC32C if crc_at.is_some() => {
                return Err("PROXY v2 header with two CRC32C extensions")
            }
            PP2_TYPE_CRC32C => crc_at = Some(at),
            PP2_TYPE_UNIQUE_ID if value.len() > UNIQUE_ID_MAX => {
                return Err("PROXY v2 header with a unique ID longer than 128 bytes")
            }
            PP2_TYPE_SSL if value.len() < 5 => {
                return Err("PROXY v2 header with a TLS extension shorter than its preamble")
            }
            PP2_TYPE_SSL => {
                extensions(&header[..at + value.len()], at + 5)?;
            }
            _ => {}
        }
    }
    if let Some(at) = crc_at {
        let sent = u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
        let computed = crc32c::update(
            crc32c::update(crc32c::update(crc32c::START, &header[..at]), &[0; 4]),
            &header[at + 4..],
        );
        if crc32c::finish(computed) != sent {
            return Err("PROXY v2 header whose CRC32C does not match");
        }
    }
    Ok(())
}

/// One type-length-value extension of a version 2 header.
struct Extension<'a> {
    /// Where its value starts in the header.
    at: usize,
    kind: u8,
    value: &'a [u8],
}

/// The extensions in `bytes[from..]`; `Err` unless they fill it exactly.
fn extensions(bytes: &[u8], from: usize) -> Result<Vec<Extension<'_>>, &'static str> {
    let mut found = Vec::new();
    let mut at = from;
    while at < bytes.len() {
        let Some(&[kind, hi, lo]) = bytes.get(at..at + 3) else {
            return Err("PROXY v2 header with a truncated extension");
        };
        let start = at + 3;
        let end = start + usize::from(u16::from_be_bytes([hi, lo]));
        let Some(value) = bytes.get(start..end) else {
            return Err("PROXY v2 header with an extension longer than the header");
        };
        found.push(Extension {
            at: start,
            kind,
            value,
        });
        at = end;
    }
    Ok(found)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as the PROXY protocol's
/// checksum extension uses it; a byte-at-a-time table, built at compile time (a
/// header is at most [`V2_MAX`] bytes and rarely carries one).
mod crc32c {
    const POLY: u32 = 0x82F6_3B78;

    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };

    /// The running value before any byte.
    pub const START: u32 = !0;

    /// The running value after `bytes`.
    pub fn update(mut crc: u32, bytes: &[u8]) -> u32 {
        for &b in bytes {
            crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
        }
        crc
    }

    /// The checksum of everything given to [`update`].
    pub fn finish(crc: u32) -> u32 {
        !crc
    }
}

/// Why a connection's header was not taken.
#[derive(Debug)]
pub enum Error {
    /// Not a valid header.
    Invalid(&'static str),
    /// The peer closed, or the socket failed (the head timeout included).
    Io(io::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(why) => f.write_str(why),
            Self::Io(e) if e.kind() == io::ErrorKind::TimedOut => {
                f.write_str("no complete PROXY protocol header within the head timeout")
            }
            Self::Io(e) => write!(f, "reading the PROXY protocol header: {e}"),
        }
    }
}

/// The client a connection serves once its header is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    /// The client's address: the one the header names (an IPv4-mapped IPv6 address
    /// as its IPv4 address), or else the balancer's own.
    pub addr: SocketAddr,
    /// Whether the header named it. One that names no client (v1 `UNKNOWN`, v2
    /// `LOCAL`) is a balancer's health check, but also what a balancer sends for a
    /// client it cannot describe (HAProxy does for one on a UNIX socket): served as
    /// the balancer's address, never as the trusted proxy, so the forwarding headers
    /// of its requests are not believed.
    pub named: bool,
}

/// Takes the header of a connection to `port` accepted from the trusted proxy `peer`
/// (within the head timeout) and admits the client it names under `[limits]
/// max_connections_per_client`: that client, or `None` when the connection is to be
/// closed unserved (counted and logged; shed at the cap while waiting).
pub async fn accept(
    core: &Core,
    conn: &mut TcpConn,
    port: u16,
    peer: SocketAddr,
) -> Option<Relayed> {
    // The head timeout from the accept: it goes on running through the TLS
    // handshake and the first request head that follow.
    conn.set_timeout_within(core.rt.head_timeout);
    // Nothing in hand yet: at the connection cap it may be closed for a new one.
    conn.set_reusable(true, false);
    core.metrics.add(counter::PROXY_PROTOCOL_WAITING, 1);
    let header = read(conn).await;
    core.metrics.sub(counter::PROXY_PROTOCOL_WAITING, 1);
    conn.set_reusable(false, false);
    if conn.was_shed() {
        return None;
    }
    let client = match header {
        // A balancer listening dual-stack relays an IPv4 client as an IPv4-mapped
        // IPv6 address (HAProxy on `[::]:443 v4v6`): it is the IPv4 client, for the
        // app and for IPv4 allowlists and limits alike.
        Ok(Some(source)) => Relayed {
            addr: SocketAddr::new(source.ip().to_canonical(), source.port()),
            named: true,
        },
        Ok(None) => Relayed {
            addr: peer,
            named: false,
        },
        Err(e) => {
            core.refuse_proxy_protocol(port, peer, &e);
            return None;
        }
    };
    core.admit_proxied_client(conn, port, client.addr.ip(), client.named)
        .then_some(client)
}

/// Reads the header at the start of `conn` (its deadline bounds the wait) and takes
/// exactly its bytes off the socket: the client address it names, if any.
pub async fn read(conn: &TcpConn) -> Result<Option<SocketAddr>, Error> {
    let mut buf = vec![0u8; V2_MAX];
    loop {
        let n = conn.peek(&mut buf).await.map_err(Error::Io)?;
        if n == 0 {
            return Err(Error::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        match parse(&buf[..n]) {
            Parsed::Done(h) => {
                conn.take_peeked(&mut buf[..h.len]).map_err(Error::Io)?;
                return Ok(h.source);
            }
            Parsed::Invalid(why) => return Err(Error::Invalid(why)),
            // The peer's end of stream was seen before this peek (the reactor
            // marks it between polls, never during one), so these bytes are all
            // there will be: a peek would show them again at once, forever.
            Parsed::Incomplete if conn.peer_closed() => {
                return Err(Error::Io(io::ErrorKind::UnexpectedEof.into()))
            }
            // The next peek waits for more bytes (the parser's bounds refuse a
            // header before it could fill the buffer).
            Parsed::Incomplete => conn.await_more(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(ver_cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.extend([ver_cmd, family]);
        b.extend((body.len() as u16).to_be_bytes());
        b.extend(body);
        b
    }

    fn done(len: usize, source: Option<&str>) -> Parsed {
        Parsed::Done(Header {
            len,
            source: source.map(|s| s.parse().expect("address")),
        })
    }

    #[test]
    fn version_1_headers_parse_strictly() {
        let cases: &[(&[u8], Parsed)] = &[
            (
                b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\nGET / HTTP/1.1\r\n",
                done(45, Some("192.0.2.7:56324")),
            ),
            (
                b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 443\r\n",
                done(46, Some("[2001:db8::7]:65535")),
            ),
            (b"PROXY UNKNOWN\r\n", done(15, None)),
            (
                b"PROXY UNKNOWN ffff:f...f:ffff 65535 65535\r\n",
                done(43, None),
            ),
            (
                b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 44",
                Parsed::Incomplete,
            ),
            (b"PROX", Parsed::Incomplete),
            (b"", Parsed::Incomplete),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input), *want, "{:?}", String::from_utf8_lossy(input));
        }
        let invalid: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\n",
            b"proxy TCP4 192.0.2.7 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\n",
            b"PROXY TCP4  192.0.2.7 198.51.100.1 56324 443\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443 \r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n",
            b"PROXY TCP4 2001:db8::7 198.51.100.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.7 2001:db8::1 1 2\r\n",
            b"PROXY TCP4 192.0.2.07 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 443\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 0443 443\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 +443 443\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 443\r\n",
            b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7\x00 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\rX\n",
        ];
        for input in invalid {
            assert!(
                matches!(parse(input), Parsed::Invalid(_)),
                "{:?}: {:?}",
                String::from_utf8_lossy(input),
                parse(input)
            );
        }
        // UNKNOWN: whatever comes before the CRLF is ignored, a bare LF or bytes
        // that are not ASCII included, and a prefix of it is only incomplete.
        assert_eq!(parse(b"PROXY UNKNOWN \xff\x00\n\rx\r\n"), done(21, None));
        assert_eq!(parse(b"PROXY UNKNOWN \xff\x00\n\rx"), Parsed::Incomplete);
        assert!(matches!(parse(b"PROXY UNKNOWN\n"), Parsed::Invalid(_)));
        assert!(matches!(parse(b"PROXY UNKNOWNX\r\n"), Parsed::Invalid(_)));
        // No CRLF within the bound: refused, not waited for.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX, b'a');
        assert!(matches!(parse(&long), Parsed::Invalid(_)));
        long.truncate(V1_MAX - 1);
        assert_eq!(parse(&long), Parsed::Incomplete);
    }

    #[test]
    fn version_2_headers_parse_strictly() {
        let mut v4 = vec![192, 0, 2, 7, 198, 51, 100, 1];
        v4.extend(56324u16.to_be_bytes());
        v4.extend(443u16.to_be_bytes());
        let mut v6 = "2001:db8::7"
            .parse::<Ipv6Addr>()
            .expect("ip")
            .octets()
            .to_vec();
        v6.extend("2001:db8::1".parse::<Ipv6Addr>().expect("ip").octets());
        v6.extend(8080u16.to_be_bytes());
        v6.extend(443u16.to_be_bytes());
        let mut with_tlv = v4.clone();
        with_tlv.extend([0x05, 0, 3, b'a', b'b', b'c']);
        let tcp4 = v2(0x21, 0x11, &v4);
        let mut tcp4_then_request = tcp4.clone();
        tcp4_then_request.extend(b"\x16\x03\x01");
        let cases: Vec<(Vec<u8>, Parsed)> = vec![
            (tcp4.clone(), done(28, Some("192.0.2.7:56324"))),
            (tcp4_then_request, done(28, Some("192.0.2.7:56324"))),
            (v2(0x21, 0x21, &v6), done(52, Some("[2001:db8::7]:8080"))),
            (v2(0x21, 0x11, &with_tlv), done(34, Some("192.0.2.7:56324"))),
            // LOCAL (the balancer's own connection, a health check): the socket's
            // own peer stands, whatever the family says.
            (v2(0x20, 0x00, &[]), done(16, None)),
            (v2(0x20, 0x11, &v4), done(28, None)),
            (v2(0x20, 0x31, &[0; 216]), done(232, None)),
            (tcp4[..27].to_vec(), Parsed::Incomplete),
            (tcp4[..13].to_vec(), Parsed::Incomplete),
            (V2_SIGNATURE[..5].to_vec(), Parsed::Incomplete),
        ];
        for (input, want) in &cases {
            assert_eq!(parse(input), *want, "{input:?}");
        }
        let mut too_long = v2(0x21, 0x11, &v4);
        too_long[14..16].copy_from_slice(&((V2_MAX - 16 + 1) as u16).to_be_bytes());
        let invalid: Vec<Vec<u8>> = vec![
            v2(0x11, 0x11, &v4),
            v2(0x22, 0x11, &v4),
            v2(0x21, 0x11, &v4[..11]),
            v2(0x21, 0x21, &v6[..35]),
            v2(0x21, 0x41, &v4),
            v2(0x21, 0x14, &v4),
            // A relayed client the worker cannot name: not passed off as the
            // balancer itself.
            v2(0x21, 0x00, &[]),
            v2(0x21, 0x12, &v4),
            v2(0x21, 0x31, &[0; 216]),
            too_long,
            b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x00".to_vec(),
        ];
        for input in &invalid {
            assert!(
                matches!(parse(input), Parsed::Invalid(_)),
                "{input:?}: {:?}",
                parse(input)
            );
        }
    }

    #[test]
    fn crc32c_is_castagnolis() {
        // The check value of the CRC catalogue, and RFC 3720's 32 bytes of zeros.
        let crc = |b: &[u8]| crc32c::finish(crc32c::update(crc32c::START, b));
        assert_eq!(crc(b"123456789"), 0xE306_9283);
        assert_eq!(crc(&[0; 32]), 0x8A91_36AA);
    }

    /// A TCP over IPv4 header with `tlvs` after its addresses.
    fn tcp4_with(tlvs: &[u8]) -> Vec<u8> {
        let mut body = vec![192, 0, 2, 7, 198, 51, 100, 1, 0xdc, 0x04, 0x01, 0xbb];
        body.extend(tlvs);
        v2(0x21, 0x11, &body)
    }

    fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
        let mut t = vec![kind];
        t.extend((value.len() as u16).to_be_bytes());
        t.extend(value);
        t
    }

    /// `header` with its CRC32C extension's value (at `at`) filled in.
    fn sealed(mut header: Vec<u8>, at: usize) -> Vec<u8> {
        let sum = crc32c::finish(crc32c::update(crc32c::START, &header));
        header[at..at + 4].copy_from_slice(&sum.to_be_bytes());
        header
    }

    #[test]
    fn version_2_extensions_are_checked() {
        let client = Some("192.0.2.7:56324");
        let crc_first = sealed(
            tcp4_with(&[tlv(0x03, &[0; 4]), tlv(0x01, b"h2")].concat()),
            31,
        );
        let crc_last = sealed(
            tcp4_with(&[tlv(0x04, &[9; 7]), tlv(0x03, &[0; 4])].concat()),
            41,
        );
        let mut ssl = vec![0x01, 0, 0, 0, 0];
        ssl.extend(tlv(0x21, b"TLSv1.3"));
        ssl.extend(tlv(0x22, b"client.example"));
        let valid: Vec<Vec<u8>> = vec![
            crc_first.clone(),
            crc_last.clone(),
            tcp4_with(&tlv(0x05, &[7; 128])),
            tcp4_with(&tlv(0x20, &ssl)),
            tcp4_with(&tlv(0x20, &ssl[..5])),
            tcp4_with(&[tlv(0xe0, &[]), tlv(0x30, b"netns")].concat()),
        ];
        for input in &valid {
            assert_eq!(parse(input), done(input.len(), client), "{input:?}");
        }
        let mut flipped = crc_first.clone();
        *flipped.last_mut().expect("a byte") ^= 1;
        let mut wrong_sum = crc_last.clone();
        wrong_sum[41] ^= 0x80;
        // The client's address itself altered in transit.
        let mut other_client = crc_first.clone();
        other_client[16] = 10;
        let invalid: Vec<Vec<u8>> = vec![
            flipped,
            wrong_sum,
            other_client,
            tcp4_with(&tlv(0x03, &[0; 3])),
            tcp4_with(&[tlv(0x03, &[0; 4]), tlv(0x03, &[0; 4])].concat()),
            tcp4_with(&tlv(0x05, &[7; 129])),
            tcp4_with(&[0x04, 0x00]),
            tcp4_with(&[0x04, 0x00, 0x05, 1, 2, 3, 4]),
            tcp4_with(&tlv(0x20, &ssl[..4])),
            tcp4_with(&tlv(0x20, &ssl[..ssl.len() - 1])),
        ];
        for input in &invalid {
            assert!(
                matches!(parse(input), Parsed::Invalid(_)),
                "{input:?}: {:?}",
                parse(input)
            );
        }
        // A checksum that would not match does not matter on LOCAL, whose
        // addresses and extensions are ignored whole.
        let mut local = crc_first;
        local[12] = 0x20;
        local[32] ^= 1;
        assert_eq!(parse(&local), done(local.len(), None));
    }

    proptest::proptest! {
        /// Any bytes: no panic, a length within the bytes given, and a verdict
        /// that does not depend on how the bytes were split over reads: every
        /// shorter prefix of a header is only incomplete (never refused, never a
        /// shorter header), and a refusal stands whatever follows.
        #[test]
        fn parse_is_total_and_split_independent(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), pick in 0usize..3, cut in 0usize..300) {
            let mut input = match pick {
                0 => b"PROXY ".to_vec(),
                1 => V2_SIGNATURE.to_vec(),
                _ => Vec::new(),
            };
            input.extend(bytes);
            match parse(&input) {
                Parsed::Done(h) => {
                    proptest::prop_assert!(h.len <= input.len());
                    proptest::prop_assert_eq!(parse(&input[..h.len]), Parsed::Done(h));
                    for k in 0..h.len {
                        proptest::prop_assert_eq!(parse(&input[..k]), Parsed::Incomplete, "prefix of {}", k);
                    }
                }
                Parsed::Invalid(_) => {}
                Parsed::Incomplete => {
                    // An incomplete input's prefixes are incomplete too (so no
                    // refusal is ever taken back by more bytes).
                    let k = cut.min(input.len());
                    proptest::prop_assert_eq!(parse(&input[..k]), Parsed::Incomplete);
                }
            }
        }
    }
}
