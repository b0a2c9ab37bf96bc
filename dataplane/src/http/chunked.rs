//! The chunked transfer-coding decoder (RFC 9112 §7.1), as a pure state machine.
//!
//! The proxy usually relays a chunked body verbatim: the decoder only finds where the
//! body ends and refuses malformed framing. When the receiver cannot take chunked
//! (an HTTP/1.0 client) the same decoder yields the payload runs to forward instead.

use std::ops::Range;

/// Longest chunk-size line accepted (size, extensions and CRLF).
const MAX_SIZE_LINE: usize = 4096;
/// Largest trailer section accepted.
const MAX_TRAILERS: usize = 16 * 1024;

/// Why a chunked body was refused.
pub type ChunkError = &'static str;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size.
    Size,
    /// After the digits: extensions until CR.
    Extension,
    /// Expecting the LF of the size line.
    SizeLf,
    /// Inside chunk data; `remaining` bytes left.
    Data,
    /// Expecting the CR after chunk data.
    DataCr,
    /// Expecting the LF after chunk data.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer field line.
    Trailer,
    /// Expecting the LF of a trailer line.
    TrailerLf,
    /// Expecting the LF of the final empty line.
    EndLf,
    /// The body is complete.
    Done,
}

/// Incremental chunked decoder.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    /// Where in the framing we are.
    state: State,
    /// Chunk size being read, then bytes of data left in the chunk.
    remaining: u64,
    /// Digits read for the current size.
    digits: u32,
    /// Bytes of the current size line (bounded by [`MAX_SIZE_LINE`]).
    line_len: usize,
    /// Bytes of trailers so far (bounded by [`MAX_TRAILERS`]).
    trailer_len: usize,
    /// Whether the chunk being sized is the last (size 0).
    last: bool,
}

/// The result of one [`ChunkedDecoder::decode`] step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Bytes of the input that belong to the body (framing and data).
    pub consumed: usize,
    /// Payload bytes within `input[..consumed]` (empty when none).
    pub data: Range<usize>,
    /// Whether the body ended within `consumed`.
    pub done: bool,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        Self {
            state: State::Size,
            remaining: 0,
            digits: 0,
            line_len: 0,
            trailer_len: 0,
            last: false,
        }
    }

    /// Whether the body is complete.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes framing from `input` up to and including at most one run of payload
    /// data. Call again with the rest of the input until `consumed` is 0 or `done`.
    pub fn decode(&mut self, input: &[u8]) -> Result<Step, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Done => break,
                State::Size => {
                    self.line_len += 1;
                    if let Some(d) = hex_value(b) {
                        self.digits += 1;
                        if self.digits > 16 {
                            return Err("chunk size too large");
                        }
                        self.remaining = (self.remaining << 4) | u64::from(d);
                    } else if self.digits == 0 {
                        return Err("chunk size missing");
                    } else if b == b';' {
                        self.state = State::Extension;
                    } else if b == b'\r' {
                        self.state = State::SizeLf;
                    } else {
                        return Err("invalid chunk size");
                    }
                }
                State::Extension => {
                    self.line_len += 1;
                    if b == b'\r' {
                        self.state = State::SizeLf;
                    } else if b == b'\n' || (b < 0x20 && b != b'\t') || b == 0x7f {
                        return Err("invalid chunk extension");
                    }
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err("chunk size line not ended by CRLF");
                    }
                    self.line_len = 0;
                    self.digits = 0;
                    if self.remaining == 0 {
                        self.last = true;
                        self.state = State::TrailerStart;
                    } else {
                        self.state = State::Data;
                    }
                }
                State::Data => {
                    let take = (self.remaining.min((input.len() - i) as u64)) as usize;
                    self.remaining -= take as u64;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                    return Ok(Step {
                        consumed: i + take,
                        data: i..i + take,
                        done: false,
                    });
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err("chunk data not followed by CRLF");
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err("chunk data not followed by CRLF");
                    }
                    self.state = State::Size;
                }
                State::TrailerStart => {
                    if b == b'\r' {
                        self.state = State::EndLf;
                    } else if b == b' ' || b == b'\t' {
                        return Err("obs-fold in trailers");
                    } else {
                        self.trailer_len += 1;
                        self.state = State::Trailer;
                    }
                }
                State::Trailer => {
                    self.trailer_len += 1;
                    if self.trailer_len > MAX_TRAILERS {
                        return Err("trailers too large");
                    }
                    if b == b'\r' {
                        self.state = State::TrailerLf;
                    } else if b == b'\n' || b == 0 {
                        return Err("invalid trailer line");
                    }
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err("trailer line not ended by CRLF");
                    }
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err("chunked body not ended by CRLF");
                    }
                    self.state = State::Done;
                    return Ok(Step {
                        consumed: i + 1,
                        data: 0..0,
                        done: true,
                    });
                }
            }
            if self.line_len > MAX_SIZE_LINE {
                return Err("chunk size line too long");
            }
            i += 1;
        }
        Ok(Step {
            consumed: i,
            data: 0..0,
            done: self.state == State::Done,
        })
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Runs the decoder over a whole buffer, for tests and fuzzing: returns the payload
/// and the number of bytes the body occupied, or `Ok(None)` if incomplete.
pub fn decode_all(input: &[u8]) -> Result<Option<(Vec<u8>, usize)>, ChunkError> {
    let mut dec = ChunkedDecoder::new();
    let mut payload = Vec::new();
    let mut pos = 0;
    loop {
        let step = dec.decode(&input[pos..])?;
        payload.extend_from_slice(&input[pos + step.data.start..pos + step.data.end]);
        pos += step.consumed;
        if step.done {
            return Ok(Some((payload, pos)));
        }
        if step.consumed == 0 || pos == input.len() {
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        type Case<'a> = (&'a [u8], Result<Option<(&'a [u8], usize)>, ChunkError>);
        let cases: &[Case<'_>] = &[
            (b"0\r\n\r\n", Ok(Some((b"", 5)))),
            (b"5\r\nhello\r\n0\r\n\r\nNEXT", Ok(Some((b"hello", 15)))),
            (b"5;ext=1\r\nhello\r\n0\r\n\r\n", Ok(Some((b"hello", 21)))),
            (
                b"A\r\n0123456789\r\n0\r\n\r\n",
                Ok(Some((b"0123456789", 20))),
            ),
            (
                b"3\r\nabc\r\n0\r\nX-Trailer: v\r\n\r\n",
                Ok(Some((b"abc", 27))),
            ),
            (b"5\r\nhel", Ok(None)),
            (b"", Ok(None)),
            (b"x\r\n", Err("chunk size missing")),
            (b"5 \r\nhello\r\n", Err("invalid chunk size")),
            (b"5\nhello\r\n", Err("invalid chunk size")),
            (b"-1\r\n", Err("chunk size missing")),
            (b"11111111111111111\r\n", Err("chunk size too large")),
            (b"5\r\nhelloXX", Err("chunk data not followed by CRLF")),
            (b"0\r\n\r\r", Err("chunked body not ended by CRLF")),
            (b"0\r\n folded\r\n\r\n", Err("obs-fold in trailers")),
            (b"5;a\nb\r\n", Err("invalid chunk extension")),
        ];
        for (input, want) in cases {
            let got = decode_all(input);
            let want = want.map(|o| o.map(|(p, n)| (p.to_vec(), n)));
            assert_eq!(got, want, "input {:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn byte_at_a_time_matches_whole() {
        let body = b"4\r\nWiki\r\n6;x=y\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nT: 1\r\n\r\n";
        let whole = decode_all(body).expect("valid").expect("complete");
        let mut dec = ChunkedDecoder::new();
        let mut payload = Vec::new();
        let mut total = 0;
        for b in body.iter() {
            let one = [*b];
            let step = dec.decode(&one).expect("valid");
            payload.extend_from_slice(&one[step.data]);
            total += step.consumed;
            if step.done {
                break;
            }
        }
        assert_eq!((payload.as_slice(), total), (whole.0.as_slice(), whole.1));
        assert_eq!(whole.0, b"Wikipedia in \r\n\r\nchunks.");
    }

    proptest::proptest! {
        #[test]
        fn round_trip(chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..300), 0..8),
                      split in 0usize..2000) {
            let mut wire = Vec::new();
            let mut payload = Vec::new();
            for c in &chunks {
                wire.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                wire.extend_from_slice(c);
                wire.extend_from_slice(b"\r\n");
                payload.extend_from_slice(c);
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            // Feed in two pieces split anywhere: same result as whole.
            let split = split.min(wire.len());
            let mut dec = ChunkedDecoder::new();
            let mut got = Vec::new();
            let mut consumed = 0;
            for part in [&wire[..split], &wire[split..]] {
                let mut pos = 0;
                while pos < part.len() {
                    let step = dec.decode(&part[pos..]).expect("valid");
                    got.extend_from_slice(&part[pos + step.data.start..pos + step.data.end]);
                    pos += step.consumed;
                    consumed += step.consumed;
                    if step.done || step.consumed == 0 { break; }
                }
            }
            proptest::prop_assert!(dec.is_done());
            proptest::prop_assert_eq!(consumed, wire.len());
            proptest::prop_assert_eq!(got, payload);
        }

        #[test]
        fn never_panics(input in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode_all(&input);
        }
    }
}
