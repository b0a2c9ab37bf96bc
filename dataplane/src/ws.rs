//! WebSocket (RFC 6455) frame inspection for the relay: pure, bytes in, verdicts out.
//!
//! Frames pass through unchanged; the inspector only finds frame boundaries, counts
//! messages, and refuses what the RFC forbids: an unmasked client frame (or a masked
//! server frame), a reserved opcode, RSV bits no extension was negotiated for, a
//! fragmented or oversized control frame, a continuation with no message to continue
//! (or a new message inside a fragmented one), and an invalid close payload. What a
//! peer sends after its close frame is dropped, never forwarded (RFC 6455 §5.5.1: no
//! data frame follows a close; its peer might otherwise act on it). Payloads
//! are never held whole: a data frame's payload streams through as it arrives; only
//! control frames (at most 125 bytes) are kept until complete, to check them.

/// Close codes the proxy sends.
pub mod close_code {
    /// Going away (the proxy is draining or the tunnel idled out).
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Invalid payload data (a close reason that is not UTF-8).
    pub const INVALID_PAYLOAD: u16 = 1007;
}

/// Why a frame was refused: the close code to send both ways, and a reason for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    /// Close code for both peers.
    pub code: u16,
    /// What was wrong.
    pub reason: &'static str,
}

fn protocol(reason: &'static str) -> Violation {
    Violation {
        code: close_code::PROTOCOL_ERROR,
        reason,
    }
}

/// What one [`Inspector::feed`] call found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Feed {
    /// Bytes at the start of the input that are whole, valid frame data to forward.
    pub consumed: usize,
    /// Messages completed within `consumed`.
    pub messages: u32,
    /// Payload bytes within `consumed`.
    pub payload: u64,
    /// The close code of a close frame seen within `consumed` (1005 when it had none).
    pub close: Option<u16>,
    /// Bytes right after `consumed` that came after the peer's close frame: dropped,
    /// never forwarded (RFC 6455 §5.5.1: nothing follows a close frame).
    pub dropped: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for a frame header.
    Header,
    /// Inside a data frame's payload.
    Payload {
        /// Bytes left.
        remaining: u64,
        /// The frame ends a message.
        fin: bool,
    },
}

/// Frame inspector for one direction of a WebSocket relay.
#[derive(Debug, Clone)]
pub struct Inspector {
    /// Client-to-server frames must be masked; server-to-client must not be.
    from_client: bool,
    /// RSV bits an extension negotiated (RSV1 for permessage-deflate).
    allowed_rsv: u8,
    /// Where in the stream we are.
    state: State,
    /// A fragmented message is in progress.
    in_message: bool,
    /// The peer sent its close frame: whatever it sends after is dropped.
    closed: bool,
    /// What the last [`Inspector::feed`] that found a violation found whole and
    /// valid before it.
    before_violation: Feed,
}

impl Inspector {
    /// An inspector for frames sent by the client (`from_client`) or by the app.
    pub fn new(from_client: bool, allowed_rsv: u8) -> Self {
        Self {
            from_client,
            allowed_rsv,
            state: State::Header,
            in_message: false,
            closed: false,
            before_violation: Feed::default(),
        }
    }

    /// What the last [`Inspector::feed`] that returned a violation found whole and
    /// valid before the violating frame: frames the peer sent in full, which the
    /// relay forwards before it closes the session (they end at a frame boundary,
    /// so the close frame that follows them is a frame of its own). Before, they
    /// were lost whenever the violation came in the same read.
    pub fn before_violation(&self) -> &Feed {
        &self.before_violation
    }

    /// Whether the peer sent its close frame (everything after it is dropped).
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Whether everything fed so far ends at a frame boundary (not inside a data
    /// frame's payload).
    pub fn at_frame_boundary(&self) -> bool {
        self.state == State::Header
    }

    /// Inspects buffered bytes; returns how many may be forwarded now. Bytes after
    /// `consumed` belong to an incomplete header or control frame (feed them again
    /// with more data), unless they came after the close frame: those are `dropped`
    /// and must not be fed again. They are not inspected either: after its close
    /// frame a peer has nothing more to say, whatever the bytes are.
    pub fn feed(&mut self, input: &[u8]) -> Result<Feed, Violation> {
        let mut out = Feed::default();
        match self.scan(input, &mut out) {
            Ok(()) => Ok(out),
            Err(v) => {
                // `out` stops at the violating frame: its header is where the
                // last whole frame ended, and nothing of it was counted.
                self.before_violation = out;
                Err(v)
            }
        }
    }

    /// [`Inspector::feed`]'s scan: `out` holds what was found whole and valid so
    /// far (`consumed` up to the frame being looked at) when a violation is found.
    fn scan(&mut self, input: &[u8], out: &mut Feed) -> Result<(), Violation> {
        let mut pos = 0;
        while pos < input.len() {
            if self.closed {
                out.dropped = input.len() - pos;
                break;
            }
            match self.state {
                State::Payload { remaining, fin } => {
                    let take = remaining.min((input.len() - pos) as u64);
                    pos += take as usize;
                    out.payload += take;
                    let remaining = remaining - take;
                    if remaining == 0 {
                        self.state = State::Header;
                        if fin {
                            out.messages += 1;
                        }
                    } else {
                        self.state = State::Payload { remaining, fin };
                    }
                }
                State::Header => {
                    let Some(h) = parse_header(&input[pos..])? else {
                        break;
                    };
                    if h.masked != self.from_client {
                        return Err(protocol(if self.from_client {
                            "unmasked client frame"
                        } else {
                            "masked server frame"
                        }));
                    }
                    if h.rsv & !self.allowed_rsv != 0 {
                        return Err(protocol("RSV bits without a negotiated extension"));
                    }
                    // permessage-deflate marks a message's first frame only (RFC 7692
                    // §6.1): never a control frame or a continuation.
                    if h.rsv & 0x4 != 0 && (h.opcode == 0x0 || h.opcode >= 0x8) {
                        return Err(protocol("RSV1 on a control or continuation frame"));
                    }
                    match h.opcode {
                        0x8..=0xA => {
                            if !h.fin {
                                return Err(protocol("fragmented control frame"));
                            }
                            if h.len > 125 {
                                return Err(protocol("control frame longer than 125 bytes"));
                            }
                            let end = pos + h.header_len + h.len as usize;
                            if end > input.len() {
                                break; // wait for the whole control frame
                            }
                            if h.opcode == 0x8 {
                                let mut payload = input[pos + h.header_len..end].to_vec();
                                if let Some(key) = h.mask {
                                    for (i, b) in payload.iter_mut().enumerate() {
                                        *b ^= key[i % 4];
                                    }
                                }
                                out.close = Some(check_close(&payload)?);
                                self.closed = true;
                            }
                            out.payload += h.len;
                            pos = end;
                        }
                        0x0..=0x2 => {
                            let continuation = h.opcode == 0x0;
                            if continuation && !self.in_message {
                                return Err(protocol("continuation frame without a message"));
                            }
                            if !continuation && self.in_message {
                                return Err(protocol("new message inside a fragmented message"));
                            }
                            self.in_message = !h.fin;
                            pos += h.header_len;
                            if h.len == 0 {
                                if h.fin {
                                    out.messages += 1;
                                }
                            } else {
                                self.state = State::Payload {
                                    remaining: h.len,
                                    fin: h.fin,
                                };
                            }
                        }
                        _ => return Err(protocol("reserved opcode")),
                    }
                }
            }
            out.consumed = pos;
        }
        out.consumed = pos;
        Ok(())
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    fin: bool,
    rsv: u8,
    opcode: u8,
    masked: bool,
    mask: Option<[u8; 4]>,
    len: u64,
    header_len: usize,
}

fn parse_header(b: &[u8]) -> Result<Option<Header>, Violation> {
    if b.len() < 2 {
        return Ok(None);
    }
    let fin = b[0] & 0x80 != 0;
    let rsv = (b[0] >> 4) & 0x7;
    let opcode = b[0] & 0x0f;
    let masked = b[1] & 0x80 != 0;
    let (len, mut n) = match b[1] & 0x7f {
        126 => {
            if b.len() < 4 {
                return Ok(None);
            }
            let len = u64::from(u16::from_be_bytes([b[2], b[3]]));
            if len < 126 {
                return Err(protocol("non-minimal length encoding"));
            }
            (len, 4)
        }
        127 => {
            if b.len() < 10 {
                return Ok(None);
            }
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&b[2..10]);
            let len = u64::from_be_bytes(bytes);
            if len >> 63 != 0 {
                return Err(protocol("64-bit length with the top bit set"));
            }
            if len <= 0xffff {
                return Err(protocol("non-minimal length encoding"));
            }
            (len, 10)
        }
        l => (u64::from(l), 2),
    };
    let mask = if masked {
        if b.len() < n + 4 {
            return Ok(None);
        }
        let key = [b[n], b[n + 1], b[n + 2], b[n + 3]];
        n += 4;
        Some(key)
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        rsv,
        opcode,
        masked,
        mask,
        len,
        header_len: n,
    }))
}

/// Checks a close payload; returns its code (1005, "no status", when empty).
fn check_close(payload: &[u8]) -> Result<u16, Violation> {
    match payload.len() {
        0 => Ok(1005),
        1 => Err(protocol("close payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(protocol("invalid close code"));
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(Violation {
                    code: close_code::INVALID_PAYLOAD,
                    reason: "close reason is not UTF-8",
                });
            }
            Ok(code)
        }
    }
}

/// A close frame from the proxy towards the client (unmasked).
pub fn close_frame_to_client(code: u16) -> [u8; 4] {
    let c = code.to_be_bytes();
    [0x88, 0x02, c[0], c[1]]
}

/// A close frame from the proxy towards the app (masked, as a client must).
pub fn close_frame_to_app(code: u16, key: [u8; 4]) -> [u8; 8] {
    let c = code.to_be_bytes();
    [
        0x88,
        0x82,
        key[0],
        key[1],
        key[2],
        key[3],
        c[0] ^ key[0],
        c[1] ^ key[1],
    ]
}

/// The extension names of a `Sec-WebSocket-Extensions` list: each element's token,
/// without its parameters. Elements are split at commas outside quoted strings (a
/// parameter value may be one, RFC 6455 §9.1), so a quoted comma never makes an
/// element of its own.
fn extension_names(list: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = list;
    std::iter::from_fn(move || loop {
        if rest.is_empty() {
            return None;
        }
        let (mut quoted, mut escaped, mut end) = (false, false, rest.len());
        for (i, b) in rest.iter().enumerate() {
            match b {
                _ if escaped => escaped = false,
                b'\\' if quoted => escaped = true,
                b'"' => quoted = !quoted,
                b',' if !quoted => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        let element = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or_default();
        let name = element
            .split(|b| *b == b';')
            .next()
            .unwrap_or(element)
            .trim_ascii();
        if !name.is_empty() {
            return Some(name);
        }
    })
}

/// Whether every quoted string of `list` is closed (backslash escapes counted): an
/// open one would hide what follows it from [`extension_names`].
fn quotes_closed(list: &[u8]) -> bool {
    let (mut quoted, mut escaped) = (false, false);
    for b in list {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            _ => {}
        }
    }
    !quoted
}

/// Checks the extensions an app's 101 accepted (its `Sec-WebSocket-Extensions`
/// values, every field line) against those the client offered (its values, joined
/// with commas), and returns the RSV bits frames may then carry. A server must accept
/// only extensions the client offered (RFC 6455 §9.1): else a client that asked for
/// none would get, say, compressed frames it cannot read. `permessage-deflate`, by
/// exact name, allows RSV1 (RFC 7692); other extensions allow no RSV bit, so frames
/// that use one are refused.
pub fn negotiated_rsv<'a>(
    offered: &[u8],
    accepted: impl IntoIterator<Item = &'a [u8]>,
) -> Result<u8, &'static str> {
    let mut rsv = 0;
    let mut seen: Vec<&[u8]> = Vec::new();
    for list in accepted {
        if !quotes_closed(list) {
            return Err("101 with a malformed Sec-WebSocket-Extensions (a quote left open)");
        }
        for name in extension_names(list) {
            if !extension_names(offered).any(|o| o.eq_ignore_ascii_case(name)) {
                return Err("101 with a WebSocket extension the client did not offer");
            }
            if seen.iter().any(|s| s.eq_ignore_ascii_case(name)) {
                return Err("101 accepting a WebSocket extension twice");
            }
            seen.push(name);
            if name.eq_ignore_ascii_case(b"permessage-deflate") {
                rsv |= 0x4;
            }
        }
    }
    Ok(rsv)
}

/// The GUID a server appends to the client's key (RFC 6455 §1.3).
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The `Sec-WebSocket-Accept` value that answers the `Sec-WebSocket-Key` `key`
/// (RFC 6455 §4.2.2): base64 of the SHA-1 of the key and the GUID.
pub fn accept_for(key: &[u8]) -> String {
    use base64::Engine as _;
    use sha1::Digest as _;
    let mut h = sha1::Sha1::new();
    h.update(key);
    h.update(ACCEPT_GUID);
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Checks that an app's 101 to a WebSocket upgrade answers the client's handshake:
/// the request carried one `Sec-WebSocket-Key` (`keys`: its field values), and the 101
/// one `Sec-WebSocket-Accept` (`accepts`) derived from it (RFC 6455 §4.1, §4.2.2). A
/// 101 that does not is no WebSocket server's answer to this request: a client that
/// checks would fail the connection anyway, and one that does not (a script, a
/// hostile client working with an app that answers 101 to anything) would get a
/// tunnel to an app that never agreed to speak WebSocket, past the proxy's checks of
/// every later request on it.
pub fn check_accept<'a>(
    keys: impl IntoIterator<Item = &'a [u8]>,
    accepts: impl IntoIterator<Item = &'a [u8]>,
) -> Result<(), &'static str> {
    let mut keys = keys.into_iter();
    let (Some(key), None) = (keys.next(), keys.next()) else {
        return Err("101 to a WebSocket request without exactly one Sec-WebSocket-Key");
    };
    let mut accepts = accepts.into_iter();
    let (Some(accept), None) = (accepts.next(), accepts.next()) else {
        return Err("101 without exactly one Sec-WebSocket-Accept");
    };
    if accept != accept_for(key).as_bytes() {
        return Err("101 with a Sec-WebSocket-Accept that does not answer the request's key");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_value_is_the_rfcs_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_for(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn a_101_must_answer_the_one_key_the_request_sent() {
        let key: &[u8] = b"dGhlIHNhbXBsZSBub25jZQ==";
        let good: &[u8] = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
        let none: [&[u8]; 0] = [];
        type Case<'a> = (&'a [&'a [u8]], &'a [&'a [u8]], Result<(), &'a str>);
        let table: [Case; 7] = [
            (&[key], &[good], Ok(())),
            (
                &[key],
                &none,
                Err("101 without exactly one Sec-WebSocket-Accept"),
            ),
            (
                &[key],
                &[good, good],
                Err("101 without exactly one Sec-WebSocket-Accept"),
            ),
            (
                &[key],
                &[b"s3pPLMBiTxaQ9kYGzzhZRbK+xOA="],
                Err("101 with a Sec-WebSocket-Accept that does not answer the request's key"),
            ),
            (
                &[key],
                &[b"S3PPLMBITXAQ9KYGZZHZRBK+XOO="],
                Err("101 with a Sec-WebSocket-Accept that does not answer the request's key"),
            ),
            (
                &none,
                &[good],
                Err("101 to a WebSocket request without exactly one Sec-WebSocket-Key"),
            ),
            (
                &[key, key],
                &[good],
                Err("101 to a WebSocket request without exactly one Sec-WebSocket-Key"),
            ),
        ];
        for (keys, accepts, want) in table {
            assert_eq!(
                check_accept(keys.iter().copied(), accepts.iter().copied()),
                want,
                "keys {keys:?} accepts {accepts:?}"
            );
        }
    }

    /// Builds a frame; `mask` adds a masking key (and masks the payload).
    fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n <= 0xffff => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mut p = payload.to_vec();
        if let Some(k) = mask {
            f.extend_from_slice(&k);
            for (i, b) in p.iter_mut().enumerate() {
                *b ^= k[i % 4];
            }
        }
        f.extend_from_slice(&p);
        f
    }

    const K: Option<[u8; 4]> = Some([1, 2, 3, 4]);

    #[test]
    fn messages_and_streaming() {
        let mut ins = Inspector::new(true, 0);
        let mut wire = frame(true, 0x1, b"hello", K);
        wire.extend(frame(false, 0x2, b"part1", K));
        wire.extend(frame(true, 0x9, b"ping", K)); // control inside a fragmented message
        wire.extend(frame(true, 0x0, b"part2", K));
        let f = ins.feed(&wire).expect("valid");
        assert_eq!(f.consumed, wire.len());
        assert_eq!(f.messages, 2);
        // A big frame streams: consumed grows with the bytes, before the frame ends.
        let big = frame(true, 0x2, &vec![7u8; 100_000], K);
        let f = ins.feed(&big[..50_000]).expect("valid");
        assert_eq!((f.consumed, f.messages), (50_000, 0));
        let f = ins.feed(&big[50_000..]).expect("valid");
        assert_eq!((f.consumed, f.messages), (big.len() - 50_000, 1));
        // A partial header is held back.
        let f = ins.feed(&frame(true, 0x1, b"x", K)[..3]).expect("valid");
        assert_eq!(f.consumed, 0);
    }

    #[test]
    fn refusals() {
        let cases: Vec<(bool, Vec<u8>, u16)> = vec![
            (true, frame(true, 0x1, b"x", None), 1002),
            (false, frame(true, 0x1, b"x", K), 1002),
            (true, frame(true, 0x3, b"x", K), 1002),
            (true, frame(true, 0xB, b"x", K), 1002),
            (
                true,
                {
                    let mut f = frame(true, 0x1, b"x", K);
                    f[0] |= 0x40;
                    f
                },
                1002,
            ),
            (true, frame(false, 0x9, b"x", K), 1002),
            (true, frame(true, 0x9, &[0; 126], K), 1002),
            (true, frame(true, 0x0, b"x", K), 1002),
            (
                true,
                {
                    let mut f = frame(false, 0x1, b"a", K);
                    f.extend(frame(true, 0x1, b"b", K));
                    f
                },
                1002,
            ),
            (true, frame(true, 0x8, &[3], K), 1002),
            (true, frame(true, 0x8, &[0x03, 0xe8 + 4], K), 1002), // 1004
            (true, frame(true, 0x8, &[0x03, 0xe8, 0xff, 0xfe], K), 1007),
        ];
        for (from_client, wire, code) in cases {
            let err = Inspector::new(from_client, 0)
                .feed(&wire)
                .expect_err("refused");
            assert_eq!(err.code, code, "{err:?}");
        }
        // RSV1 is fine once permessage-deflate was negotiated, on a message's first
        // frame only.
        let deflate = negotiated_rsv(
            b"permessage-deflate; client_max_window_bits",
            [&b"permessage-deflate"[..]],
        )
        .expect("offered");
        let mut f = frame(true, 0x1, b"x", K);
        f[0] |= 0x40;
        assert!(Inspector::new(true, deflate).feed(&f).is_ok());
        let mut ping = frame(true, 0x9, b"x", K);
        ping[0] |= 0x40;
        let mut continued = frame(false, 0x1, b"a", K);
        continued.extend(frame(true, 0x0, b"b", K));
        let at = continued.len() - 7;
        continued[at] |= 0x40;
        for wire in [ping, continued] {
            let err = Inspector::new(true, deflate)
                .feed(&wire)
                .expect_err("refused");
            assert_eq!(err.code, 1002, "{err:?}");
        }
    }

    #[test]
    fn close_frames() {
        let mut ins = Inspector::new(false, 0);
        let f = ins
            .feed(&frame(true, 0x8, &[0x03, 0xe8, b'o', b'k'], None))
            .expect("valid");
        assert_eq!(f.close, Some(1000));
        let f = Inspector::new(false, 0)
            .feed(&frame(true, 0x8, &[], None))
            .expect("valid");
        assert_eq!(f.close, Some(1005));
        assert_eq!(close_frame_to_client(1001), [0x88, 2, 0x03, 0xe9]);
        let to_app = close_frame_to_app(1002, [9, 9, 9, 9]);
        assert!(
            Inspector::new(true, 0)
                .feed(&to_app)
                .expect("a valid masked close")
                .close
                == Some(1002)
        );
    }

    #[test]
    fn nothing_after_a_close_frame_is_forwarded() {
        let close = frame(true, 0x8, &[0x03, 0xe8], K);
        let after = [
            frame(true, 0x1, b"after", K),
            frame(true, 0x9, b"", K),
            frame(true, 0x8, &[0x03, 0xe8], K),
            b"not even a frame".to_vec(),
        ]
        .concat();
        let mut ins = Inspector::new(true, 0);
        let mut wire = frame(true, 0x1, b"before", K);
        wire.extend(&close);
        wire.extend(&after);
        let f = ins.feed(&wire).expect("valid up to the close");
        assert_eq!(f.consumed, wire.len() - after.len());
        assert_eq!(
            (f.dropped, f.messages, f.close),
            (after.len(), 1, Some(1000))
        );
        assert!(ins.closed() && ins.at_frame_boundary());
        // Later reads are dropped whole, uninspected (an unmasked frame is no
        // violation any more: it goes nowhere).
        let f = ins.feed(&frame(true, 0x1, b"x", None)).expect("dropped");
        assert_eq!((f.consumed, f.dropped, f.messages), (0, 3, 0));
        // A close frame split across reads: what follows its last byte is dropped.
        let mut ins = Inspector::new(false, 0);
        let server_close = frame(true, 0x8, &[0x03, 0xe8], None);
        let f = ins.feed(&server_close[..2]).expect("partial");
        assert_eq!((f.consumed, f.dropped), (0, 0));
        let mut rest = server_close.clone();
        rest.extend(frame(true, 0x2, b"late", None));
        let f = ins.feed(&rest).expect("valid");
        assert_eq!((f.consumed, f.dropped), (server_close.len(), 6));
    }

    /// One frame to build: what a peer, honest or not, could put on the wire.
    #[derive(Debug, Clone)]
    struct Spec {
        fin: bool,
        rsv: u8,
        opcode: u8,
        /// Masked as its direction requires (else the other way).
        proper_mask: bool,
        /// 0: the minimal length encoding; 1: 16 bits; 2: 64 bits.
        encoding: u8,
        payload: Vec<u8>,
        key: [u8; 4],
    }

    fn spec() -> impl proptest::strategy::Strategy<Value = Spec> {
        use proptest::prelude::*;
        let opcode = prop_oneof![
            6 => Just(0x1u8), 6 => Just(0x2), 4 => Just(0x0), 2 => Just(0x9), 2 => Just(0xA),
            2 => Just(0x8),
        ];
        let len = prop_oneof![8 => 0usize..40, 3 => 120usize..300, 1 => 65_530usize..65_560];
        let close = prop_oneof![
            2 => Just(None),
            4 => (prop::sample::select(vec![1000u16, 1001, 1002, 1003, 1007, 1008, 1011, 1012, 1014, 3000, 4999]), 0usize..3)
                .prop_map(Some),
            1 => (any::<u16>(), 0usize..3).prop_map(Some),
        ];
        (
            prop::bool::weighted(0.7),
            opcode,
            len,
            any::<u8>(),
            any::<[u8; 4]>(),
            close,
        )
            .prop_map(|(fin, opcode, len, fill, key, close)| {
                // Text is ASCII (UTF-8 is the endpoint's business, not the
                // framing's).
                let mut payload: Vec<u8> = (0..len)
                    .map(|i| b'a' + (fill.wrapping_add(i as u8) % 26))
                    .collect();
                if opcode >= 0x8 {
                    payload.truncate(20);
                }
                if opcode == 0x8 {
                    payload = close.map_or(Vec::new(), |(code, keep)| {
                        let mut p = code.to_be_bytes().to_vec();
                        p.extend(std::iter::repeat_n(b'r', keep));
                        p
                    });
                }
                Spec {
                    fin,
                    rsv: 0,
                    opcode,
                    proper_mask: true,
                    encoding: 0,
                    payload,
                    key,
                }
            })
    }

    /// Frames an honest peer sends: continuations only inside a message, a new
    /// message only outside one, control frames whole.
    fn honest(mut specs: Vec<Spec>) -> Vec<Spec> {
        let mut in_message = false;
        for s in &mut specs {
            if s.opcode >= 0x8 {
                s.fin = true;
                continue;
            }
            s.opcode = match (in_message, s.opcode) {
                (true, _) => 0x0,
                (false, 0x0) => 0x2,
                (false, op) => op,
            };
            in_message = !s.fin;
        }
        specs
    }

    /// One defect a hostile peer puts in frame `at % len`.
    fn spoil(specs: &mut [Spec], at: usize, kind: u8) {
        if specs.is_empty() {
            return;
        }
        let n = specs.len();
        let s = &mut specs[at % n];
        match kind % 8 {
            0 => s.rsv = 1 + (at % 7) as u8,
            1 => s.proper_mask = false,
            2 => s.encoding = 1 + (at % 2) as u8,
            3 => s.opcode = [0x3, 0x7, 0xB, 0xF][at % 4],
            4 => s.fin = !s.fin,
            5 => s.payload.resize(126 + at % 200, b'p'),
            6 => s.opcode = if s.opcode == 0 { 0x1 } else { 0x0 },
            _ => s.payload = vec![(at % 256) as u8],
        }
    }

    fn build(specs: &[Spec], from_client: bool) -> Vec<u8> {
        let mut wire = Vec::new();
        for s in specs {
            wire.push((if s.fin { 0x80 } else { 0 }) | (s.rsv << 4) | s.opcode);
            let masked = s.proper_mask == from_client;
            let m = if masked { 0x80 } else { 0 };
            let n = s.payload.len();
            match (s.encoding, n) {
                (0, n) if n < 126 => wire.push(m | n as u8),
                (0 | 1, n) if n <= 0xffff => {
                    wire.push(m | 126);
                    wire.extend_from_slice(&(n as u16).to_be_bytes());
                }
                _ => {
                    wire.push(m | 127);
                    wire.extend_from_slice(&(n as u64).to_be_bytes());
                }
            }
            if masked {
                wire.extend_from_slice(&s.key);
                wire.extend(s.payload.iter().enumerate().map(|(i, b)| b ^ s.key[i % 4]));
            } else {
                wire.extend_from_slice(&s.payload);
            }
        }
        wire
    }

    /// The wire bytes of `specs` made honest, then given one defect (`spoil`) and
    /// one flipped byte (`flip`: where, and the bits), when asked.
    fn hostile(
        specs: Vec<Spec>,
        from_client: bool,
        defect: Option<(usize, u8)>,
        flip: Option<(usize, u8)>,
    ) -> Vec<u8> {
        let mut specs = honest(specs);
        if let Some((at, kind)) = defect {
            spoil(&mut specs, at, kind);
        }
        let mut wire = build(&specs, from_client);
        if let (Some((at, x)), false) = (flip, wire.is_empty()) {
            let n = wire.len();
            wire[at % n] ^= x;
        }
        wire
    }

    /// What a relay makes of a stream read in `pieces`: it forwards what each feed
    /// consumed, drops what came after the close, and feeds the rest again with
    /// the next read; at a violation it forwards the frames whole before it.
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        forwarded: Vec<u8>,
        dropped: usize,
        held: usize,
        messages: u32,
        payload: u64,
        close: Option<u16>,
        boundary: bool,
        /// Ended inside a fragmented message.
        open_message: bool,
        error: Option<Violation>,
    }

    fn relay(wire: &[u8], cuts: &[usize], from_client: bool) -> Outcome {
        let mut ins = Inspector::new(from_client, 0);
        let mut out = Outcome {
            forwarded: Vec::new(),
            dropped: 0,
            held: 0,
            messages: 0,
            payload: 0,
            close: None,
            boundary: true,
            open_message: false,
            error: None,
        };
        let mut pending: Vec<u8> = Vec::new();
        let mut at = 0;
        let mut ends: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
        ends.push(wire.len());
        ends.sort_unstable();
        for end in ends {
            pending.extend_from_slice(&wire[at..end]);
            at = end;
            match ins.feed(&pending) {
                Ok(f) => {
                    out.forwarded.extend_from_slice(&pending[..f.consumed]);
                    out.dropped += f.dropped;
                    out.messages += f.messages;
                    out.payload += f.payload;
                    out.close = out.close.or(f.close);
                    pending.drain(..f.consumed + f.dropped);
                }
                Err(e) => {
                    // The frames whole before the violating one go on (the
                    // relay forwards them, then closes).
                    let f = ins.before_violation();
                    out.forwarded.extend_from_slice(&pending[..f.consumed]);
                    out.messages += f.messages;
                    out.payload += f.payload;
                    out.close = out.close.or(f.close);
                    out.error = Some(e);
                    break;
                }
            }
        }
        out.held = pending.len();
        out.boundary = ins.at_frame_boundary();
        out.open_message = ins.in_message;
        out
    }

    /// A reader and writer over bytes, for tungstenite (it answers pings).
    struct Wire {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl std::io::Read for Wire {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl std::io::Write for Wire {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    proptest::proptest! {
        // Streams the inspector refuses are no case for the second test: allow
        // for them however many cases are asked for (`PROPTEST_CASES`).
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 512,
            max_global_rejects: 1_000_000,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// However a stream is cut into reads, the relay forwards the same bytes,
        /// counts the same messages and close, or refuses it for the same reason.
        #[test]
        fn any_cut_into_reads_gives_the_same_outcome(
            specs in proptest::collection::vec(spec(), 0..8),
            from_client in proptest::bool::ANY,
            cuts in proptest::collection::vec(0usize..1_000_000, 0..12),
            defect in proptest::option::weighted(0.4, (0usize..1_000, proptest::num::u8::ANY)),
            flip in proptest::option::weighted(0.2, (0usize..1_000_000, 1u8..=255)),
            cut_short in proptest::option::weighted(0.2, 0usize..1_000_000),
        ) {
            let mut wire = hostile(specs, from_client, defect, flip);
            if let Some(keep) = cut_short {
                wire.truncate(keep % (wire.len() + 1));
            }
            let whole = relay(&wire, &[], from_client);
            let cut = relay(&wire, &cuts, from_client);
            let bytewise = relay(&wire, &(0..wire.len()).collect::<Vec<_>>(), from_client);
            match &whole.error {
                Some(e) => {
                    proptest::prop_assert_eq!(cut.error.as_ref(), Some(e));
                    proptest::prop_assert_eq!(bytewise.error.as_ref(), Some(e));
                    // What goes on before the violation (every frame before the
                    // violating one) is the same however the stream was read.
                    proptest::prop_assert_eq!(&cut.forwarded, &whole.forwarded);
                    proptest::prop_assert_eq!(&bytewise.forwarded, &whole.forwarded);
                    proptest::prop_assert_eq!(cut.messages, whole.messages);
                }
                None => {
                    proptest::prop_assert_eq!(&cut, &whole);
                    proptest::prop_assert_eq!(&bytewise, &whole);
                }
            }
        }

        /// A second implementation reading what the relay forwards: for every
        /// stream the inspector passes whole, tungstenite (as the endpoint the
        /// frames were for) sees the same frames: the same data messages, the same
        /// payload bytes, the same close, and no framing error. A stream the two
        /// cut differently could carry frames the inspector never saw, past its
        /// close rule.
        #[test]
        fn what_is_forwarded_reads_the_same_to_tungstenite(
            specs in proptest::collection::vec(spec(), 0..8),
            from_client in proptest::bool::ANY,
            defect in proptest::option::weighted(0.3, (0usize..1_000, proptest::num::u8::ANY)),
            flip in proptest::option::weighted(0.1, (0usize..1_000_000, 1u8..=255)),
        ) {
            use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
            use tungstenite::{Error, Message};
            let wire = hostile(specs, from_client, defect, flip);
            let seen = relay(&wire, &[], from_client);
            // Only streams the inspector passed whole, ending between frames.
            proptest::prop_assume!(seen.error.is_none() && seen.held == 0 && seen.boundary);
            let role = if from_client { Role::Server } else { Role::Client };
            let mut ws = WebSocket::from_raw_socket(
                Wire { input: std::io::Cursor::new(seen.forwarded.clone()), output: Vec::new() },
                role,
                Some(WebSocketConfig::default()),
            );
            let (mut messages, mut payload, mut close) = (0u32, 0u64, None);
            let end = loop {
                match ws.read() {
                    Ok(Message::Text(t)) => {
                        messages += 1;
                        payload += t.len() as u64;
                    }
                    Ok(Message::Binary(b)) => {
                        messages += 1;
                        payload += b.len() as u64;
                    }
                    Ok(Message::Ping(p) | Message::Pong(p)) => payload += p.len() as u64,
                    Ok(Message::Close(c)) => close = Some(c.map_or(1005, |c| u16::from(c.code))),
                    Ok(Message::Frame(_)) => {}
                    Err(e) => break e,
                }
            };
            match end {
                // Text that is not UTF-8 (only a flipped byte or a spoilt payload
                // makes it): the endpoint's check, not the framing's; nothing more
                // to compare.
                Error::Utf8(_) => {
                    proptest::prop_assert!(flip.is_some() || defect.is_some());
                    return Ok(());
                }
                Error::ConnectionClosed => proptest::prop_assert!(close.is_some()),
                Error::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake) => {
                    proptest::prop_assert!(close.is_none())
                }
                other => proptest::prop_assert!(false, "tungstenite refused what was forwarded: {other}"),
            }
            proptest::prop_assert_eq!(messages, seen.messages);
            proptest::prop_assert_eq!(close.is_some(), seen.close.is_some());
            if let (Some(theirs), Some(ours)) = (close, seen.close) {
                // tungstenite answers a code it does not allow as 1002 (1012-1014
                // are such): the frame is the same one either way.
                proptest::prop_assert!(theirs == ours || theirs == 1002, "{} vs {}", theirs, ours);
            }
            // The close frame's payload as sent (tungstenite replaces the reason
            // with the code it does not allow); tungstenite gives no fragments of
            // a message the stream left unfinished.
            let theirs = payload + close_payload_len(&seen.forwarded);
            if seen.open_message {
                proptest::prop_assert!(theirs <= seen.payload);
            } else {
                proptest::prop_assert_eq!(theirs, seen.payload);
            }
        }
    }

    /// The payload length of the close frame in a forwarded stream (0 without one).
    fn close_payload_len(forwarded: &[u8]) -> u64 {
        let mut pos = 0;
        let mut last_close = 0;
        while let Ok(Some(h)) = parse_header(&forwarded[pos..]) {
            if h.opcode == 0x8 {
                last_close = h.len;
            }
            pos += h.header_len + h.len as usize;
            if pos >= forwarded.len() {
                break;
            }
        }
        last_close
    }

    proptest::proptest! {
        #[test]
        fn never_panics(input in proptest::collection::vec(proptest::num::u8::ANY, 0..300), client in proptest::bool::ANY) {
            let mut ins = Inspector::new(client, 0);
            if let Ok(f) = ins.feed(&input) {
                proptest::prop_assert!(f.consumed <= input.len());
            }
        }
    }

    /// An app's 101 may accept only extensions the client offered; only
    /// `permessage-deflate`, by its exact name, allows RSV1.
    #[test]
    fn an_app_accepts_only_the_extensions_the_client_offered() {
        // Offered, accepted (field lines), the RSV bits allowed (`Err`: refused).
        type Case = (&'static [u8], &'static [&'static [u8]], Result<u8, ()>);
        let cases: &[Case] = &[
            (b"", &[], Ok(0)),
            (b"permessage-deflate", &[], Ok(0)),
            (
                b"permessage-deflate; client_max_window_bits",
                &[b"permessage-deflate"],
                Ok(0x4),
            ),
            (
                b"x-foo, Permessage-Deflate;server_no_context_takeover",
                &[b"permessage-deflate; server_no_context_takeover"],
                Ok(0x4),
            ),
            (b"x-foo", &[b"x-foo"], Ok(0)),
            (b"permessage-deflate", &[b"x-foo"], Err(())),
            (b"", &[b"permessage-deflate"], Err(())),
            (
                b"x-permessage-deflate-foo",
                &[b"permessage-deflate"],
                Err(()),
            ),
            (
                b"permessage-deflate",
                &[b"x-permessage-deflate-foo"],
                Err(()),
            ),
            (
                b"permessage-deflate, x-foo",
                &[b"x-foo", b"permessage-deflate"],
                Ok(0x4),
            ),
            (
                b"permessage-deflate",
                &[b"permessage-deflate, x-bar"],
                Err(()),
            ),
            (b"a", &[b" , ;x"], Ok(0)),
            // A quoted comma is part of a parameter, not a new element.
            (
                br#"x-foo; p=", permessage-deflate;""#,
                &[b"permessage-deflate"],
                Err(()),
            ),
            (
                br#"x-foo; p="a\",b", permessage-deflate"#,
                &[b"permessage-deflate"],
                Ok(0x4),
            ),
            (
                br#"x-foo; p="a\", permessage-deflate"#,
                &[b"permessage-deflate"],
                Err(()),
            ),
            // A quote the app left open would hide what follows it.
            (
                b"permessage-deflate",
                &[br#"permessage-deflate; x=", bogus"#],
                Err(()),
            ),
            (
                b"permessage-deflate",
                &[br#"permessage-deflate; x="a\"b""#],
                Ok(0x4),
            ),
            // One extension accepted twice (RFC 7692 §5), in one line or two.
            (
                b"permessage-deflate",
                &[b"permessage-deflate, permessage-deflate"],
                Err(()),
            ),
            (
                b"permessage-deflate",
                &[b"permessage-deflate", b"Permessage-Deflate"],
                Err(()),
            ),
        ];
        for (offered, accepted, want) in cases {
            let got = negotiated_rsv(offered, accepted.iter().copied()).map_err(|_| ());
            assert_eq!(
                got,
                *want,
                "offered {:?}, accepted {:?}",
                String::from_utf8_lossy(offered),
                accepted
            );
        }
    }
}
