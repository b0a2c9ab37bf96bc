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
        }
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
        Ok(out)
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

/// The RSV bits an extension response header allows (`permessage-deflate` → RSV1).
pub fn allowed_rsv(extensions: Option<&[u8]>) -> u8 {
    match extensions {
        Some(v)
            if v.windows(18)
                .any(|w| w.eq_ignore_ascii_case(b"permessage-deflate")) =>
        {
            0x4
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let deflate = allowed_rsv(Some(b"permessage-deflate; client_max_window_bits"));
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

    proptest::proptest! {
        #[test]
        fn never_panics(input in proptest::collection::vec(proptest::num::u8::ANY, 0..300), client in proptest::bool::ANY) {
            let mut ins = Inspector::new(client, 0);
            if let Ok(f) = ins.feed(&input) {
                proptest::prop_assert!(f.consumed <= input.len());
            }
        }
    }
}
