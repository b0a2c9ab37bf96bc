//! Raw HTTP/2 on the wire for tests that must misbehave more than an HTTP/2 library
//! allows: the connection preface, frame and flag constants, a frame writer and
//! reader, and a minimal HPACK encoder (integers, plain strings and literal fields
//! that never touch the dynamic table, so the bytes go out exactly as given).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame type DATA.
pub const DATA: u8 = 0x0;
/// Frame type HEADERS.
pub const HEADERS: u8 = 0x1;
/// Frame type RST_STREAM.
pub const RST_STREAM: u8 = 0x3;
/// Frame type SETTINGS.
pub const SETTINGS: u8 = 0x4;
/// Frame type PING.
pub const PING: u8 = 0x6;
/// Frame type GOAWAY.
pub const GOAWAY: u8 = 0x7;
/// Frame type WINDOW_UPDATE.
pub const WINDOW_UPDATE: u8 = 0x8;
/// Frame type CONTINUATION.
pub const CONTINUATION: u8 = 0x9;

/// Flag END_STREAM (DATA, HEADERS).
pub const END_STREAM: u8 = 0x1;
/// Flag ACK (SETTINGS, PING).
pub const ACK: u8 = 0x1;
/// Flag END_HEADERS (HEADERS, CONTINUATION).
pub const END_HEADERS: u8 = 0x4;

/// A frame as read: (type, flags, stream, payload).
pub type Frame = (u8, u8, u32, Vec<u8>);

/// A header field as raw bytes: (name, value).
pub type Field<'a> = (&'a [u8], &'a [u8]);

/// One frame on the wire: the 9-byte header (24-bit length, type, flags, stream id)
/// and `payload`.
pub fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let n = u32::try_from(payload.len())
        .ok()
        .filter(|n| *n < 1 << 24)
        .expect("a frame payload below 16 MiB");
    let mut f = n.to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[ty, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The preface followed by an empty SETTINGS: what a client sends first.
pub fn client_hello() -> Vec<u8> {
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    hello
}

/// A connection to `addr` that has sent [`client_hello`], reads timing out after
/// 20 s (so a silent peer fails a test instead of hanging it).
pub fn connect(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(&client_hello()).expect("preface");
    s
}

/// The next frame on `s`; `None` at end of stream, on a reset or when nothing came
/// within the read timeout.
pub fn read_frame(s: &mut impl Read) -> Option<Frame> {
    let mut h = [0u8; 9];
    s.read_exact(&mut h).ok()?;
    let n = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
    let mut p = vec![0u8; n];
    s.read_exact(&mut p).ok()?;
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    Some((h[3], h[4], stream, p))
}

/// Serves one connection as an HTTP/2 app on raw frames: reads the client preface,
/// sends empty SETTINGS, acknowledges SETTINGS and PING, and sends back whatever
/// `answer` makes of each frame read (nothing: an empty `Vec`). Returns when the
/// peer closes, a write fails or no frame comes for 60 s.
pub fn serve_raw_app(mut s: TcpStream, mut answer: impl FnMut(&Frame) -> Vec<u8>) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let mut preface = [0u8; 24];
    if s.read_exact(&mut preface).is_err() || s.write_all(&frame(SETTINGS, 0, 0, &[])).is_err() {
        return;
    }
    while let Some(f) = read_frame(&mut s) {
        let (ty, flags) = (f.0, f.1);
        let mut out = Vec::new();
        if ty == SETTINGS && flags & ACK == 0 {
            out.extend(frame(SETTINGS, ACK, 0, &[]));
        }
        if ty == PING && flags & ACK == 0 {
            out.extend(frame(PING, ACK, 0, &f.3));
        }
        out.extend(answer(&f));
        if !out.is_empty() && s.write_all(&out).is_err() {
            return;
        }
    }
}

/// The error code of a GOAWAY payload, if it is long enough to carry one.
pub fn goaway_code(payload: &[u8]) -> Option<u32> {
    let code = payload.get(4..8)?;
    Some(u32::from_be_bytes([code[0], code[1], code[2], code[3]]))
}

/// An HPACK integer with an `n`-bit prefix, the first byte's high bits `flags`.
pub fn hpack_int(out: &mut Vec<u8>, n: u32, flags: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(flags | low_byte(v));
        return;
    }
    out.push(flags | low_byte(max));
    v -= max;
    while v >= 128 {
        out.push(low_byte(v % 128 + 128));
        v /= 128;
    }
    out.push(low_byte(v));
}

/// The low 8 bits of `v` (every caller passes a value below 256).
fn low_byte(v: usize) -> u8 {
    v.to_le_bytes()[0]
}

/// An HPACK string literal, not Huffman-coded: its length, then the bytes as given.
pub fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 7, 0, s.len());
    out.extend_from_slice(s);
}

/// A literal field without indexing, new name (first byte `0x00`).
pub fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_str(out, name);
    hpack_str(out, value);
}

/// A literal field never indexed, new name (first byte `0x10`): no hop may index or
/// rewrite it, so the bytes go on the wire as given.
pub fn literal_never_indexed(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x10);
    hpack_str(out, name);
    hpack_str(out, value);
}

/// A header block of `fields`, each a [`literal_never_indexed`] field, in order.
pub fn block(fields: &[Field]) -> Vec<u8> {
    let mut b = Vec::new();
    for (n, v) in fields {
        literal_never_indexed(&mut b, n, v);
    }
    b
}

/// A request block (see [`block`]): the usual pseudo-headers for `method path` on
/// `http://127.0.0.1`, then `extra`.
pub fn request(method: &str, path: &str, extra: &[Field]) -> Vec<u8> {
    let mut f: Vec<Field> = vec![
        (b":method", method.as_bytes()),
        (b":scheme", b"http"),
        (b":path", path.as_bytes()),
        (b":authority", b"127.0.0.1"),
    ];
    f.extend_from_slice(extra);
    block(&f)
}

/// The `:status` of a response block the worker encoded (static-table entries, or a
/// literal with the indexed name `:status`, plain or Huffman-coded digits).
pub fn status(mut p: &[u8]) -> u16 {
    // A dynamic table size update (`001xxxxx`, a 5-bit prefix integer) may come
    // first.
    if p.first().is_some_and(|b| b & 0xe0 == 0x20) {
        let mut at = 1;
        if p[0] & 0x1f == 0x1f {
            while p.get(at).is_some_and(|b| b & 0x80 != 0) {
                at += 1;
            }
            at += 1;
        }
        p = p.get(at..).unwrap_or_default();
    }
    match p.first() {
        Some(0x88) => 200,
        Some(0x89) => 204,
        Some(0x8a) => 206,
        Some(0x8b) => 304,
        Some(0x8c) => 400,
        Some(0x8d) => 404,
        Some(0x8e) => 500,
        Some(&b) if b & 0x0f == 8 && p.len() >= 5 && p[1] == 3 => std::str::from_utf8(&p[2..5])
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        Some(&b) if b & 0x0f == 8 && p.len() >= 2 && p[1] & 0x80 != 0 => {
            let n = usize::from(p[1] & 0x7f);
            p.get(2..2 + n).and_then(huffman_digits).unwrap_or(0)
        }
        _ => 0,
    }
}

/// Decodes a Huffman-coded (RFC 7541 Appendix B) run of decimal digits: `0`–`2` are
/// the 5-bit codes `00000`–`00010`, `3`–`9` the 6-bit `011001`–`011111`; the rest
/// is padding (all ones).
fn huffman_digits(bytes: &[u8]) -> Option<u16> {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let value = |from: usize, n: usize| {
        bits.get(from..from + n)
            .map(|b| b.iter().fold(0u8, |v, &x| (v << 1) | x))
    };
    let (mut at, mut out) = (0, 0u16);
    while at < bits.len() {
        if bits[at..].iter().all(|&b| b == 1) {
            break;
        }
        match value(at, 5)? {
            d @ 0..=2 => {
                out = out * 10 + u16::from(d);
                at += 5;
            }
            _ => match value(at, 6)? {
                d @ 25..=31 => {
                    out = out * 10 + u16::from(d - 22);
                    at += 6;
                }
                _ => return None,
            },
        }
    }
    Some(out)
}
