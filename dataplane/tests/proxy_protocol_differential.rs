//! The worker's PROXY protocol parser (`appproxy_dataplane::proxy_protocol::parse`)
//! against a second one written here from HAProxy's specification
//! (proxy-protocol.txt, sections 2.1 and 2.2), over generated headers: valid ones of
//! every kind, the same mutated byte by byte, cut short, and followed by what comes
//! after a header. The two must agree on every input the reference can decide
//! (complete, valid header with its length and client; or not a header), and a
//! prefix of a valid header must never be refused (it is only incomplete).
//!
//! The reference takes the worker's documented choices where the specification
//! leaves one to the receiver: a version 2 `PROXY` command relaying anything but TCP
//! over IPv4 or IPv6 is refused (the specification lets the receiver refuse or fall
//! back to the socket's addresses), and a version 2 header longer than
//! `proxy_protocol::V2_MAX` is refused (an implementation bound).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use appproxy_dataplane::proxy_protocol::{parse, Parsed, V2_MAX};
use proptest::prelude::*;

const SIG: &[u8; 12] = b"\r\n\r\n\x00\r\nQUIT\n";

/// The reference's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// A complete, valid header: its length and the client it names (`None`: the
    /// socket's peer stands).
    Done(usize, Option<SocketAddr>),
    /// Not terminated yet (v1: no CRLF within the first 107 bytes seen so far; v2:
    /// fewer bytes than its length says). Whether some continuation would be valid
    /// is not decided here.
    Open,
    /// Not a valid header, decided.
    Invalid,
}

/// The specification's parser, written from its text alone.
fn reference(buf: &[u8]) -> Verdict {
    if buf.len() < SIG.len() && SIG.starts_with(buf) {
        return Verdict::Open;
    }
    if buf.starts_with(SIG) {
        return reference_v2(buf);
    }
    if buf.len() < 6 && b"PROXY ".starts_with(buf) {
        return Verdict::Open;
    }
    if buf.starts_with(b"PROXY ") {
        return reference_v1(buf);
    }
    Verdict::Invalid
}

/// Section 2.1: one line of US-ASCII, at most 107 bytes with its CRLF.
fn reference_v1(buf: &[u8]) -> Verdict {
    let mut end = None;
    for i in 0..buf.len().saturating_sub(1) {
        if buf[i] == b'\r' && buf[i + 1] == b'\n' {
            end = Some(i);
            break;
        }
    }
    let end = match end {
        Some(e) if e + 2 <= 107 => e,
        Some(_) => return Verdict::Invalid,
        None if buf.len() >= 107 => return Verdict::Invalid,
        None => return Verdict::Open,
    };
    let len = end + 2;
    let line = &buf[6..end];
    // "UNKNOWN": the receiver must ignore anything before the CRLF.
    if line == b"UNKNOWN" || line.starts_with(b"UNKNOWN ") {
        return Verdict::Done(len, None);
    }
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    if fields.len() != 5 {
        return Verdict::Invalid;
    }
    let (proto, src, dst, sport, dport) = (fields[0], fields[1], fields[2], fields[3], fields[4]);
    let (Some(sport), Some(_)) = (ref_port(sport), ref_port(dport)) else {
        return Verdict::Invalid;
    };
    let src = match proto {
        b"TCP4" => match (ref_v4(src), ref_v4(dst)) {
            (Some(s), Some(_)) => IpAddr::V4(s),
            _ => return Verdict::Invalid,
        },
        b"TCP6" => match (ref_v6(src), ref_v6(dst)) {
            (Some(s), Some(_)) => IpAddr::V6(s),
            _ => return Verdict::Invalid,
        },
        _ => return Verdict::Invalid,
    };
    Verdict::Done(len, Some(SocketAddr::new(src, sport)))
}

/// A decimal number of at most `max`, without heading zeroes.
fn ref_decimal(s: &[u8], max: u32) -> Option<u32> {
    if s.is_empty() || s.len() > 5 || (s.len() > 1 && s[0] == b'0') {
        return None;
    }
    let mut n: u32 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u32::from(b - b'0');
    }
    (n <= max).then_some(n)
}

fn ref_port(s: &[u8]) -> Option<u16> {
    ref_decimal(s, 65535).map(|n| n as u16)
}

/// Exactly four decimal integers 0-255, one dot between each, no heading zeroes.
fn ref_v4(s: &[u8]) -> Option<Ipv4Addr> {
    let parts: Vec<&[u8]> = s.split(|&b| b == b'.').collect();
    if parts.len() != 4 {
        return None;
    }
    let mut o = [0u8; 4];
    for (i, p) in parts.iter().enumerate() {
        o[i] = ref_decimal(p, 255)? as u8;
    }
    Some(Ipv4Addr::from(o))
}

/// Groups of one to four hexadecimal digits (either case) separated by colons, with
/// at most one `::` standing for one or more zero groups, 128 bits in all; the last
/// 32 bits may be written as an IPv4 address (what `inet_ntop` prints for a mapped
/// address, so what a balancer sends for one).
fn ref_v6(s: &[u8]) -> Option<Ipv6Addr> {
    fn groups(s: &[u8], allow_v4_tail: bool) -> Option<Vec<u16>> {
        if s.is_empty() {
            return Some(Vec::new());
        }
        let parts: Vec<&[u8]> = s.split(|&b| b == b':').collect();
        let mut out = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            if allow_v4_tail && i == parts.len() - 1 && p.contains(&b'.') {
                let v4 = ref_v4(p)?.octets();
                out.push(u16::from_be_bytes([v4[0], v4[1]]));
                out.push(u16::from_be_bytes([v4[2], v4[3]]));
                continue;
            }
            if p.is_empty() || p.len() > 4 || !p.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            let text = std::str::from_utf8(p).ok()?;
            out.push(u16::from_str_radix(text, 16).ok()?);
        }
        Some(out)
    }
    let split = s.windows(2).position(|w| w == b"::");
    let words = match split {
        None => {
            let g = groups(s, true)?;
            (g.len() == 8).then_some(g)?
        }
        Some(at) => {
            let (head, tail) = (&s[..at], &s[at + 2..]);
            if tail.windows(2).any(|w| w == b"::") {
                return None;
            }
            let h = groups(head, false)?;
            let t = groups(tail, true)?;
            if h.len() + t.len() > 7 {
                return None;
            }
            let mut g = h;
            g.resize(8 - t.len(), 0);
            g.extend(t);
            g
        }
    };
    let mut w = [0u16; 8];
    w.copy_from_slice(&words);
    Some(Ipv6Addr::from(w))
}

/// Section 2.2: the signature, version and command, family and protocol, length.
fn reference_v2(buf: &[u8]) -> Verdict {
    if buf.len() < 16 {
        // Version and command can already be wrong.
        if buf.len() > 12 && (buf[12] >> 4 != 2 || buf[12] & 0x0f > 1) {
            return Verdict::Invalid;
        }
        return Verdict::Open;
    }
    let (ver, cmd, fam, proto) = (buf[12] >> 4, buf[12] & 0x0f, buf[13] >> 4, buf[13] & 0x0f);
    let total = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver != 2 || cmd > 1 || total > V2_MAX {
        return Verdict::Invalid;
    }
    if buf.len() < total {
        return Verdict::Open;
    }
    let block = &buf[16..total];
    if cmd == 0 {
        // LOCAL: the family is ignored, the length still skipped.
        return Verdict::Done(total, None);
    }
    if fam > 3 || proto > 2 {
        return Verdict::Invalid;
    }
    let (client, addresses) = match (fam, proto) {
        (1, 1) if block.len() >= 12 => {
            let ip = Ipv4Addr::new(block[0], block[1], block[2], block[3]);
            let port = u16::from_be_bytes([block[8], block[9]]);
            (SocketAddr::new(IpAddr::V4(ip), port), 12)
        }
        (2, 1) if block.len() >= 36 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&block[..16]);
            let port = u16::from_be_bytes([block[32], block[33]]);
            (SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port), 36)
        }
        // Too short for its addresses, or relayed over something the worker chose
        // not to take (UNSPEC, UDP, UNIX).
        _ => return Verdict::Invalid,
    };
    if ref_tlvs_valid(&buf[..total], 16 + addresses) {
        Verdict::Done(total, Some(client))
    } else {
        Verdict::Invalid
    }
}

/// Section 2.2.7: the TLVs after the addresses fill the header exactly;
/// PP2_TYPE_CRC32C (0x03) is 32 bits and, when present, the CRC32c of the whole
/// header with its own value zeroed (the worker's choice, as HAProxy's receiver: it
/// is checked); PP2_TYPE_UNIQUE_ID (0x05) is at most 128 bytes; PP2_TYPE_SSL (0x20)
/// is a 1-byte `client`, a 4-byte `verify` and sub-TLVs filling the rest.
fn ref_tlvs_valid(header: &[u8], start: usize) -> bool {
    let Some(tlvs) = ref_tlv_list(header, start, header.len()) else {
        return false;
    };
    let mut crcs = 0;
    for &(kind, off, len) in &tlvs {
        let ok = match kind {
            0x03 => {
                crcs += 1;
                let mut zeroed = header.to_vec();
                zeroed[off..off + len].fill(0);
                len == 4 && ref_crc32c(&zeroed).to_be_bytes()[..] == header[off..off + 4]
            }
            0x05 => len <= 128,
            0x20 => len >= 5 && ref_tlv_list(header, off + 5, off + len).is_some(),
            _ => true,
        };
        if !ok {
            return false;
        }
    }
    crcs <= 1
}

/// The TLVs in `header[from..to]` as (type, value offset, value length), when they
/// fill it exactly.
fn ref_tlv_list(header: &[u8], from: usize, to: usize) -> Option<Vec<(u8, usize, usize)>> {
    let mut list = Vec::new();
    let mut i = from;
    while i != to {
        if to - i < 3 {
            return None;
        }
        let len = usize::from(header[i + 1]) << 8 | usize::from(header[i + 2]);
        if to - (i + 3) < len {
            return None;
        }
        list.push((header[i], i + 3, len));
        i += 3 + len;
    }
    Some(list)
}

/// CRC-32C bit by bit, from the polynomial (reflected 0x82F63B78), init and final
/// XOR all ones.
fn ref_crc32c(bytes: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0x82F6_3B78 & mask);
        }
    }
    !crc
}

/// The client a TCP `PROXY` header names, read straight from its addresses.
fn reference_client(h: &[u8]) -> Option<SocketAddr> {
    let b = &h[16..];
    Some(if h[13] == 0x21 {
        let mut o = [0u8; 16];
        o.copy_from_slice(&b[..16]);
        SocketAddr::new(
            IpAddr::V6(Ipv6Addr::from(o)),
            u16::from_be_bytes([b[32], b[33]]),
        )
    } else {
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
            u16::from_be_bytes([b[8], b[9]]),
        )
    })
}

/// Compares the two on `input`; a description of the disagreement, if any.
fn disagreement(input: &[u8]) -> Option<String> {
    let (theirs, ours) = (parse(input), reference(input));
    let agree = match (theirs, ours) {
        (Parsed::Done(h), Verdict::Done(len, source)) => h.len == len && h.source == source,
        (Parsed::Invalid(_), Verdict::Invalid) => true,
        (Parsed::Incomplete, Verdict::Open) => true,
        // Not terminated yet: the worker may refuse early what cannot become valid
        // (checked on prefixes of valid headers below), and the reference refuses
        // early only a bad version or command, which the worker may wait on.
        (Parsed::Invalid(_), Verdict::Open) => true,
        (Parsed::Incomplete, Verdict::Invalid) => {
            // Only acceptable while the header could still be unterminated.
            !terminated(input)
        }
        _ => false,
    };
    (!agree).then(|| {
        format!(
            "{:?}: worker {theirs:?}, reference {ours:?}",
            String::from_utf8_lossy(input)
        )
    })
}

/// Whether the reference had all of the header it needed to decide (a CRLF within
/// the bound, or v2's whole length).
fn terminated(input: &[u8]) -> bool {
    if input.starts_with(SIG) {
        input.len() >= 16
            && input.len() >= 16 + usize::from(u16::from_be_bytes([input[14], input[15]]))
    } else {
        input.len() >= 107
            || input[..input.len().min(107)]
                .windows(2)
                .any(|w| w == b"\r\n")
    }
}

// Generators.

fn v4_text(o: [u8; 4]) -> String {
    Ipv4Addr::from(o).to_string()
}

/// An IPv6 address in one of its valid text forms.
fn v6_text(words: [u16; 8], style: u8) -> String {
    let ip = Ipv6Addr::from(words);
    match style % 4 {
        0 => ip.to_string(),
        1 => words
            .iter()
            .map(|w| format!("{w:x}"))
            .collect::<Vec<_>>()
            .join(":"),
        2 => words
            .iter()
            .map(|w| format!("{w:04X}"))
            .collect::<Vec<_>>()
            .join(":"),
        _ => {
            // The last 32 bits as an IPv4 address.
            let o = ip.octets();
            let head: Vec<String> = words[..6].iter().map(|w| format!("{w:x}")).collect();
            format!("{}:{}.{}.{}.{}", head.join(":"), o[12], o[13], o[14], o[15])
        }
    }
}

fn v1_header() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (
            any::<[u8; 4]>(),
            any::<[u8; 4]>(),
            any::<u16>(),
            any::<u16>()
        )
            .prop_map(|(s, d, sp, dp)| format!(
                "PROXY TCP4 {} {} {sp} {dp}\r\n",
                v4_text(s),
                v4_text(d)
            )
            .into_bytes()),
        (
            prop_oneof![
                any::<[u16; 8]>(),
                Just([0u16; 8]),
                Just([0, 0, 0, 0, 0, 0xffff, 0xc000, 0x0207])
            ],
            any::<[u16; 8]>(),
            any::<u8>(),
            any::<u16>(),
            any::<u16>()
        )
            .prop_map(|(s, d, style, sp, dp)| format!(
                "PROXY TCP6 {} {} {sp} {dp}\r\n",
                v6_text(s, style),
                v6_text(d, style / 4)
            )
            .into_bytes()),
        Just(b"PROXY UNKNOWN\r\n".to_vec()),
        "[ -~]{0,90}".prop_map(|junk| format!("PROXY UNKNOWN {junk}\r\n").into_bytes()),
        // Anything at all before the CRLF, bare CRs and LFs and bytes that are not
        // ASCII included: ignored.
        proptest::collection::vec(any::<u8>(), 0..90).prop_map(|junk| {
            let mut h = b"PROXY UNKNOWN ".to_vec();
            for b in junk {
                if !(b == b'\n' && h.last() == Some(&b'\r')) {
                    h.push(b);
                }
            }
            if h.last() == Some(&b'\r') {
                h.pop();
            }
            h.extend(b"\r\n");
            h
        }),
    ]
}

fn v2_header() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(0x21u8), Just(0x20), any::<u8>()],
        prop_oneof![
            Just(0x11u8),
            Just(0x21),
            Just(0x00),
            Just(0x12),
            Just(0x22),
            Just(0x31),
            any::<u8>()
        ],
        proptest::collection::vec(any::<u8>(), 0..80),
        prop_oneof![
            Just(None),
            Just(Some(0usize)),
            (0usize..3000).prop_map(Some)
        ],
    )
        .prop_map(|(ver_cmd, fam, mut block, pad)| {
            // The address block its family needs (mostly), then TLV-like bytes.
            let need = match fam {
                0x11 | 0x12 => 12,
                0x21 | 0x22 => 36,
                0x31 | 0x32 => 216,
                _ => 0,
            };
            if let Some(p) = pad {
                block.resize(block.len().max(need) + p % 64, 0xa5);
                if p > 2000 {
                    block.resize(p, 0);
                }
            }
            let mut h = SIG.to_vec();
            h.extend([ver_cmd, fam]);
            h.extend((block.len() as u16).to_be_bytes());
            h.extend(block);
            h
        })
}

/// A byte a mutation puts in: mostly one that means something in a header.
fn interesting() -> impl Strategy<Value = u8> {
    prop_oneof![
        proptest::sample::select(b" .:0123456789abcdefABCDEF\r\nPROXYTCUNK46-+\x00\xff".to_vec()),
        any::<u8>(),
    ]
}

#[derive(Debug, Clone)]
enum Edit {
    Replace(usize, u8),
    Insert(usize, u8),
    Delete(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), interesting()).prop_map(|(i, b)| Edit::Replace(i, b)),
        (any::<usize>(), interesting()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Delete),
    ]
}

fn apply(mut v: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        match *e {
            Edit::Replace(i, b) if !v.is_empty() => {
                let i = i % v.len();
                v[i] = b;
            }
            Edit::Insert(i, b) => {
                let i = i % (v.len() + 1);
                v.insert(i, b);
            }
            Edit::Delete(i) if !v.is_empty() => {
                let i = i % v.len();
                v.remove(i);
            }
            _ => {}
        }
    }
    v
}

/// One TLV of a kind balancers send (with a value of the size its type allows).
fn tlv() -> impl Strategy<Value = (u8, Vec<u8>)> {
    let sub = (
        proptest::sample::select(vec![0x21u8, 0x22, 0x23, 0x24, 0x25]),
        proptest::collection::vec(any::<u8>(), 0..20),
    );
    prop_oneof![
        (
            proptest::sample::select(vec![0x01u8, 0x02, 0x04, 0x30, 0xe0, 0xee]),
            proptest::collection::vec(any::<u8>(), 0..40)
        ),
        // Up to 130 bytes: one or two past the specification's bound of 128.
        proptest::collection::vec(any::<u8>(), 0..=130).prop_map(|v| (0x05, v)),
        (any::<u8>(), proptest::collection::vec(sub, 0..3)).prop_map(|(client, subs)| {
            let mut v = vec![client, 0, 0, 0, 0];
            for (kind, value) in subs {
                v.extend(tlv_bytes(kind, &value));
            }
            (0x20, v)
        }),
    ]
}

fn tlv_bytes(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut t = vec![kind];
    t.extend((value.len() as u16).to_be_bytes());
    t.extend(value);
    t
}

/// A `PROXY` header over TCP (IPv4 or IPv6) with well-formed TLVs, sealed with a
/// CRC32C at a random place among them or not.
fn v2_with_tlvs() -> impl Strategy<Value = Vec<u8>> {
    v2_with_tlvs_told().prop_map(|(h, _)| h)
}

/// [`v2_with_tlvs`], and whether the header is valid: it is, unless a unique ID is
/// longer than 128 bytes.
fn v2_with_tlvs_told() -> impl Strategy<Value = (Vec<u8>, bool)> {
    (
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 36),
        proptest::collection::vec(tlv(), 0..5),
        proptest::option::of(0usize..6),
    )
        .prop_map(|(v6, addrs, tlvs, crc)| {
            let (fam, addrs) = if v6 {
                (0x21, &addrs[..36])
            } else {
                (0x11, &addrs[..12])
            };
            let mut body = addrs.to_vec();
            let mut crc_at = None;
            for (i, (kind, value)) in tlvs.iter().enumerate() {
                if crc == Some(i) {
                    crc_at = Some(16 + body.len() + 3);
                    body.extend(tlv_bytes(0x03, &[0; 4]));
                }
                body.extend(tlv_bytes(*kind, value));
            }
            if crc.is_some_and(|c| c >= tlvs.len()) {
                crc_at = Some(16 + body.len() + 3);
                body.extend(tlv_bytes(0x03, &[0; 4]));
            }
            let mut h = SIG.to_vec();
            h.extend([0x21, fam]);
            h.extend((body.len() as u16).to_be_bytes());
            h.extend(body);
            if let Some(at) = crc_at {
                let sum = ref_crc32c(&h);
                h[at..at + 4].copy_from_slice(&sum.to_be_bytes());
            }
            let valid = tlvs.iter().all(|(kind, v)| *kind != 0x05 || v.len() <= 128);
            (h, valid)
        })
}

fn header() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![v1_header(), v2_header(), v2_with_tlvs()]
}

/// What may follow a header: nothing, an HTTP request, a TLS record, more CRLFs.
fn after() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        Just(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n".to_vec()),
        Just(b"\x16\x03\x01\x02\x00\x01".to_vec()),
        Just(b"\r\n\r\n".to_vec()),
        Just(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..200),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    /// A valid header (of the kinds a balancer sends) and what follows it: both say
    /// the same, and the worker waits on every prefix of it.
    #[test]
    fn valid_headers_agree_and_their_prefixes_are_incomplete(h in header(), rest in after()) {
        let mut input = h.clone();
        input.extend(&rest);
        if let Some(d) = disagreement(&input) {
            prop_assert!(false, "{}", d);
        }
        if let Verdict::Done(len, _) = reference(&input) {
            for cut in 0..len {
                let theirs = parse(&input[..cut]);
                prop_assert_eq!(
                    theirs,
                    Parsed::Incomplete,
                    "a prefix of a valid header refused: {:?} of {:?}",
                    String::from_utf8_lossy(&input[..cut]),
                    String::from_utf8_lossy(&input)
                );
            }
        }
    }

    /// Headers mutated byte by byte: the two agree wherever the reference decides,
    /// and one that is still valid is waited on at every prefix (the verdict does
    /// not depend on how the bytes were split over segments).
    #[test]
    fn mutated_headers_agree(h in header(), edits in proptest::collection::vec(edit(), 1..4), rest in after()) {
        let mut input = apply(h, &edits);
        input.extend(&rest);
        if let Some(d) = disagreement(&input) {
            prop_assert!(false, "{}", d);
        }
        if let Verdict::Done(len, _) = reference(&input) {
            for cut in 0..len {
                prop_assert_eq!(
                    parse(&input[..cut]),
                    Parsed::Incomplete,
                    "a prefix of a valid header refused: {:?} of {:?}",
                    String::from_utf8_lossy(&input[..cut]),
                    String::from_utf8_lossy(&input)
                );
            }
        }
    }

    /// Headers with well-formed TLVs (and a CRC32C that matches, when there is one)
    /// are accepted whole by both, unless a unique ID is too long; any one byte of one changed after the addresses
    /// (where every byte is framing, a value or the checksum) and the two still
    /// agree.
    #[test]
    fn headers_with_extensions_are_accepted_and_checked_alike((h, valid) in v2_with_tlvs_told(), flip in any::<prop::sample::Index>(), bit in 0u8..8) {
        let len = h.len();
        let want = if valid { Verdict::Done(len, reference_client(&h)) } else { Verdict::Invalid };
        prop_assert_eq!(reference(&h), want);
        if let Some(d) = disagreement(&h) {
            prop_assert!(false, "{}", d);
        }
        let first = if h[13] == 0x21 { 52 } else { 28 };
        if len > first {
            let mut bent = h.clone();
            bent[first + flip.index(len - first)] ^= 1 << bit;
            if let Some(d) = disagreement(&bent) {
                prop_assert!(false, "{}", d);
            }
        }
    }

    /// Anything after either start: the two agree wherever the reference decides.
    #[test]
    fn arbitrary_bytes_agree(start in 0u8..3, bytes in proptest::collection::vec(interesting(), 0..120)) {
        let mut input = match start {
            0 => b"PROXY ".to_vec(),
            1 => SIG.to_vec(),
            _ => Vec::new(),
        };
        input.extend(bytes);
        if let Some(d) = disagreement(&input) {
            prop_assert!(false, "{}", d);
        }
    }
}

/// The reference itself, on the specification's own examples and edges.
#[test]
fn the_reference_reads_the_specification_examples() {
    let v4 = |s: &str| Some(s.parse::<SocketAddr>().expect("addr"));
    let cases: &[(&[u8], Verdict)] = &[
        (
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n",
            Verdict::Done(47, v4("192.168.0.1:56324")),
        ),
        (b"PROXY UNKNOWN\r\n", Verdict::Done(15, None)),
        (
            b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 2\r\n",
            Verdict::Done(37, v4("[::ffff:192.0.2.7]:1")),
        ),
        (b"PROXY TCP4 1.2.3.04 1.2.3.4 1 2\r\n", Verdict::Invalid),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", Verdict::Invalid),
        (
            b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n",
            Verdict::Invalid,
        ),
        (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", Verdict::Invalid),
        (b"PROXY TCP6 1:2:3:4:5:6:7::8 ::1 1 2\r\n", Verdict::Invalid),
        (b"PROXY TCP6 12345::1 ::1 1 2\r\n", Verdict::Invalid),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", Verdict::Open),
        (
            b"\r\n\r\n\x00\r\nQUIT\n\x20\x44\x00\x00",
            Verdict::Done(16, None),
        ),
        (b"\r\n\r\n\x00\r\nQUIT\n\x21\x41\x00\x00", Verdict::Invalid),
        (b"\r\n\r\n\x00\r\nQUIT\n\x31", Verdict::Invalid),
    ];
    for (input, want) in cases {
        assert_eq!(
            reference(input),
            *want,
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}
