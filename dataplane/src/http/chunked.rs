//! The chunked transfer coding (RFC 9112 §7.1): a strict decoder as a pure state
//! machine, and the encoder that writes what is forwarded.
//!
//! A chunked body is never relayed as received. The decoder yields payload runs and
//! collects the trailer section; the relay re-encodes the payload with canonical chunk
//! sizes (lowercase hex, no leading zeros, no extensions) and ends it with a last chunk
//! carrying only the trailer fields that are allowed to travel. The decoder accepts
//! CRLF only (a bare LF or CR, a NUL or any other control byte is an error), requires
//! `name: value` with a token name on every trailer line, refuses obs-fold, and bounds
//! the size line, the trailer section and the number of trailer fields. Fields that
//! must never be trailers (framing, routing, authentication, hop-by-hop, client-address
//! and request-ID fields) are refused in requests and dropped from responses; fields
//! that only should not be trailers (content metadata, conditionals, caching) are
//! dropped either way.

use std::ops::Range;

/// Longest chunk-size line accepted (size, extensions and CRLF).
const MAX_SIZE_LINE: usize = 4096;
/// Most chunk-extension bytes accepted over a whole body (they are dropped, but each
/// costs decoding work).
const MAX_EXTENSION_BYTES: usize = 4096;
/// Largest trailer section accepted, in bytes.
pub const MAX_TRAILER_BYTES: usize = 8 * 1024;
/// Most trailer fields accepted.
pub const MAX_TRAILER_FIELDS: usize = 32;

/// Why a chunked body was refused.
pub type ChunkError = &'static str;

/// Trailer fields refused in a request (400) and dropped from a response: framing,
/// routing, authentication, hop-by-hop and forwarding fields.
const REFUSED_TRAILERS: [&str; 22] = [
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "max-forwards",
    "authorization",
    "proxy-authorization",
    "proxy-authenticate",
    "www-authenticate",
    "cookie",
    "set-cookie",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
];

/// Trailer fields silently dropped (RFC 9110 §6.5.1: they describe or control the
/// message, so a recipient must not act on them after the content).
const DROPPED_TRAILERS: [&str; 18] = [
    "content-type",
    "content-encoding",
    "content-range",
    "content-language",
    "content-location",
    "range",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "if-range",
    "cache-control",
    "pragma",
    "age",
    "expires",
    "date",
    "location",
    "vary",
];

/// What happens to a trailer field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrailerVerdict {
    /// Forwarded.
    Keep,
    /// Silently left out.
    Drop,
    /// Must never be a trailer: refused in a request, dropped from a response.
    Forbidden,
}

/// Classifies a trailer field name.
pub fn trailer_verdict(name: &[u8]) -> TrailerVerdict {
    let is = |list: &[&str]| list.iter().any(|n| name.eq_ignore_ascii_case(n.as_bytes()));
    if is(&REFUSED_TRAILERS)
        || appproxy_shared::header::header_rank(name).is_some()
        || crate::http::encode::is_client_address_header(name)
    {
        TrailerVerdict::Forbidden
    } else if is(&DROPPED_TRAILERS)
        || crate::http::encode::is_underscored_managed_name(name)
        || crate::http::encode::is_proxy_claim(name)
        // An app's `Clear-Site-Data` is withheld from its client as a head field is.
        || crate::http::encode::is_withheld_response_field(name)
        // Nor after the content: the trace context (the worker's replaces the
        // client's in a head), `Proxy` (left out of every head) and method
        // overrides (a method cannot change once the content is in).
        || is(&["traceparent", "tracestate", crate::http::encode::HTTPOXY])
        || is(&crate::http::encode::METHOD_OVERRIDE)
    {
        TrailerVerdict::Drop
    } else {
        TrailerVerdict::Keep
    }
}

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
    /// Inside a trailer field name.
    TrailerName,
    /// After the colon of a trailer field.
    TrailerValue,
    /// Expecting the LF of a trailer line.
    TrailerLf,
    /// Expecting the LF of the final empty line.
    EndLf,
    /// The body is complete.
    Done,
}

/// Incremental, strict chunked decoder.
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
    /// Bytes of the trailer section so far (bounded by [`MAX_TRAILER_BYTES`]).
    trailer_len: usize,
    /// Chunk-extension bytes so far (bounded by [`MAX_EXTENSION_BYTES`]).
    extension_len: usize,
    /// Trailer fields seen (bounded by [`MAX_TRAILER_FIELDS`]).
    trailer_count: usize,
    /// Whether a forbidden trailer field is an error (requests) or dropped (responses).
    refuse_forbidden: bool,
    /// Kept trailer fields, each as `name: value` without the line end; empty (and
    /// unallocated) for the usual body without trailers.
    trailers: Vec<u8>,
    /// Where the field being read starts in `trailers`, and where its name ends.
    field_start: usize,
    name_end: usize,
    /// End of each kept field in `trailers`.
    field_ends: Vec<usize>,
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

/// `tchar` of RFC 9110 §5.6.2.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A byte allowed inside a field value: HTAB, visible ASCII, space, obs-text.
fn is_value_byte(b: u8) -> bool {
    b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80
}

impl ChunkedDecoder {
    /// A decoder for a response body: forbidden trailer fields are dropped.
    pub fn new() -> Self {
        Self {
            state: State::Size,
            remaining: 0,
            digits: 0,
            line_len: 0,
            trailer_len: 0,
            extension_len: 0,
            trailer_count: 0,
            refuse_forbidden: false,
            trailers: Vec::new(),
            field_start: 0,
            name_end: 0,
            field_ends: Vec::new(),
        }
    }

    /// A decoder for a request body: a forbidden trailer field is an error.
    pub fn for_request() -> Self {
        Self {
            refuse_forbidden: true,
            ..Self::new()
        }
    }

    /// Whether the body is complete.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The trailer fields kept so far, as `(name, value)`.
    pub fn trailers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut start = 0;
        self.field_ends.iter().map(move |&end| {
            let field = &self.trailers[start..end];
            start = end;
            let colon = field.iter().position(|b| *b == b':').unwrap_or(field.len());
            let value = field.get(colon + 1..).unwrap_or_default();
            (&field[..colon], value)
        })
    }

    /// Appends the last chunk with the kept trailer fields (canonical form).
    pub fn encode_last_chunk(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"0\r\n");
        for (name, value) in self.trailers() {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }

    /// A trailer line ended: check and keep or drop the field.
    fn end_field(&mut self) -> Result<(), ChunkError> {
        self.trailer_count += 1;
        if self.trailer_count > MAX_TRAILER_FIELDS {
            return Err("too many trailer fields");
        }
        // Trim the value's surrounding white space.
        let mut vstart = self.name_end + 1;
        let mut vend = self.trailers.len();
        while vstart < vend && matches!(self.trailers[vstart], b' ' | b'\t') {
            vstart += 1;
        }
        while vend > vstart && matches!(self.trailers[vend - 1], b' ' | b'\t') {
            vend -= 1;
        }
        let verdict = trailer_verdict(&self.trailers[self.field_start..self.name_end]);
        match verdict {
            TrailerVerdict::Forbidden if self.refuse_forbidden => {
                return Err("forbidden trailer field")
            }
            TrailerVerdict::Keep => {
                self.trailers.copy_within(vstart..vend, self.name_end + 1);
                let end = self.name_end + 1 + (vend - vstart);
                self.trailers.truncate(end);
                self.field_ends.push(end);
            }
            TrailerVerdict::Drop | TrailerVerdict::Forbidden => {
                self.trailers.truncate(self.field_start);
            }
        }
        Ok(())
    }

    /// Consumes framing from `input` up to and including at most one run of payload
    /// data. Call again with the rest of the input until `consumed` is 0 or `done`.
    pub fn decode(&mut self, input: &[u8]) -> Result<Step, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            // The usual framing whole in the input (the CRLF after a chunk's data,
            // then a size line of digits alone) is taken in one step; anything else
            // (extensions, a line split across reads, an error) goes byte by byte
            // below, with the same outcome (`fast_path_agrees_with_byte_by_byte`).
            if let Some(skip) = self.fast_framing(&input[i..]) {
                i += skip;
                continue;
            }
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
                    self.extension_len += 1;
                    if self.extension_len > MAX_EXTENSION_BYTES {
                        return Err("chunk extensions too large");
                    }
                    if b == b'\r' {
                        self.state = State::SizeLf;
                    } else if !is_value_byte(b) {
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
                    } else if is_tchar(b) {
                        self.trailer_len += 1;
                        self.field_start = self.trailers.len();
                        self.trailers.push(b);
                        self.state = State::TrailerName;
                    } else {
                        return Err("invalid trailer line");
                    }
                }
                State::TrailerName => {
                    self.trailer_len += 1;
                    if is_tchar(b) {
                        self.trailers.push(b);
                    } else if b == b':' {
                        self.name_end = self.trailers.len();
                        self.trailers.push(b);
                        self.state = State::TrailerValue;
                    } else if b == b'\r' || b == b'\n' {
                        return Err("trailer line without a colon");
                    } else {
                        return Err("invalid trailer field name");
                    }
                }
                State::TrailerValue => {
                    self.trailer_len += 1;
                    if b == b'\r' {
                        self.state = State::TrailerLf;
                    } else if is_value_byte(b) {
                        self.trailers.push(b);
                    } else {
                        return Err("invalid trailer field value");
                    }
                }
                State::TrailerLf => {
                    self.trailer_len += 1;
                    if b != b'\n' {
                        return Err("trailer line not ended by CRLF");
                    }
                    self.end_field()?;
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
            if self.trailer_len > MAX_TRAILER_BYTES {
                return Err("trailer section too large");
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

impl ChunkedDecoder {
    /// Takes the framing at the start of `rest` when it is the usual whole piece:
    /// the CRLF that ends a chunk's data, or a whole size line of 1 to 16 hex digits
    /// and CRLF (no extension). Returns the bytes taken, or `None` to leave `rest`
    /// to the byte-by-byte path (which also reports every error).
    #[inline]
    fn fast_framing(&mut self, rest: &[u8]) -> Option<usize> {
        match self.state {
            State::DataCr if rest.starts_with(b"\r\n") => {
                self.state = State::Size;
                Some(2)
            }
            State::Size if self.digits == 0 => {
                let mut size = 0u64;
                let mut n = 0;
                while n < 16 {
                    match rest.get(n).copied().and_then(hex_value) {
                        Some(d) => size = (size << 4) | u64::from(d),
                        None => break,
                    }
                    n += 1;
                }
                if n == 0 || rest.get(n..n + 2) != Some(b"\r\n") {
                    return None;
                }
                self.remaining = size;
                self.line_len = 0;
                self.state = if size == 0 {
                    State::TrailerStart
                } else {
                    State::Data
                };
                Some(n + 2)
            }
            _ => None,
        }
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

/// Appends `data` as one chunk with a canonical size line (nothing for empty data:
/// a zero-size chunk would end the body).
pub fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    encode_chunk_of(out, &[data]);
}

/// Appends `parts`, in order, as one chunk with a canonical size line (nothing when
/// they are all empty): payload runs decoded from one read leave as one chunk.
pub fn encode_chunk_of(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len == 0 {
        return;
    }
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len as u64;
    while n > 0 {
        i -= 1;
        digits[i] = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
    }
    out.reserve(16 + 4 + len);
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
    for part in parts {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(b"\r\n");
}

/// A whole chunked body decoded: the payload, the bytes the body occupied, and the
/// canonical re-encoding that would be forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The payload.
    pub payload: Vec<u8>,
    /// Bytes of the input the body occupied.
    pub len: usize,
    /// The body as the proxy forwards it (one chunk per payload run).
    pub encoded: Vec<u8>,
}

/// Runs `dec` over a whole buffer, for tests and fuzzing: the decoded body, or
/// `Ok(None)` if incomplete.
pub fn decode_with(mut dec: ChunkedDecoder, input: &[u8]) -> Result<Option<Decoded>, ChunkError> {
    let mut payload = Vec::new();
    let mut encoded = Vec::new();
    let mut pos = 0;
    loop {
        let step = dec.decode(&input[pos..])?;
        let data = &input[pos + step.data.start..pos + step.data.end];
        payload.extend_from_slice(data);
        encode_chunk(&mut encoded, data);
        pos += step.consumed;
        if step.done {
            dec.encode_last_chunk(&mut encoded);
            return Ok(Some(Decoded {
                payload,
                len: pos,
                encoded,
            }));
        }
        if step.consumed == 0 || pos == input.len() {
            return Ok(None);
        }
    }
}

/// Runs a response decoder over a whole buffer, for tests and fuzzing: returns the
/// payload and the number of bytes the body occupied, or `Ok(None)` if incomplete.
pub fn decode_all(input: &[u8]) -> Result<Option<(Vec<u8>, usize)>, ChunkError> {
    Ok(decode_with(ChunkedDecoder::new(), input)?.map(|d| (d.payload, d.len)))
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

    /// Every vector of the trailer-section smuggling class is refused.
    #[test]
    fn strict_trailer_section() {
        let refused: &[(&[u8], ChunkError)] = &[
            // The reported vector: a bare LF ends the trailer section for a lenient
            // app, so what follows would be a second request.
            (
                b"0\r\n\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
                "invalid trailer line",
            ),
            (
                b"0\r\nX: a\nGET /smuggled HTTP/1.1\r\n\r\n",
                "invalid trailer field value",
            ),
            (
                b"0\r\nGET /smuggled HTTP/1.1\r\n\r\n",
                "invalid trailer field name",
            ),
            (b"0\r\nNoColon\r\n\r\n", "trailer line without a colon"),
            (b"0\r\nX-A: a\0b\r\n\r\n", "invalid trailer field value"),
            (b"0\r\n\0\r\n\r\n", "invalid trailer line"),
            (b"0\r\nX-A: a\rb\r\n\r\n", "trailer line not ended by CRLF"),
            (b"0\r\n: v\r\n\r\n", "invalid trailer line"),
            (b"0\r\nX A: v\r\n\r\n", "invalid trailer field name"),
            (b"0\r\nX-A : v\r\n\r\n", "invalid trailer field name"),
            (b"0\r\n\n", "invalid trailer line"),
            (b"0\n\r\n", "invalid chunk size"),
            (b"5\r\nhello\n0\r\n\r\n", "chunk data not followed by CRLF"),
            (b"5\r\nhello\r0\r\n\r\n", "chunk data not followed by CRLF"),
            (b"5;a=\0\r\nhello\r\n", "invalid chunk extension"),
            (b"0\r\nContent-Length: 5\r\n\r\n", "forbidden trailer field"),
            (
                b"0\r\ntransfer-encoding: chunked\r\n\r\n",
                "forbidden trailer field",
            ),
            (b"0\r\nHost: evil\r\n\r\n", "forbidden trailer field"),
            (
                b"0\r\nAuthorization: Bearer x\r\n\r\n",
                "forbidden trailer field",
            ),
            (
                b"0\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
                "forbidden trailer field",
            ),
            (
                b"0\r\nX-Real-IP: 1.2.3.4\r\n\r\n",
                "forbidden trailer field",
            ),
            (
                b"0\r\nX-Backend-Request-ID: x\r\n\r\n",
                "forbidden trailer field",
            ),
        ];
        for (input, want) in refused {
            let got = decode_with(ChunkedDecoder::for_request(), input);
            assert_eq!(
                got,
                Err(*want),
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
        // A response decoder drops forbidden fields instead.
        let d = decode_with(
            ChunkedDecoder::new(),
            b"0\r\nContent-Length: 5\r\nX-Sum:  7 \r\nHost: h\r\nContent-Type: a\r\n\r\n",
        )
        .expect("valid")
        .expect("complete");
        assert_eq!(d.encoded, b"0\r\nX-Sum: 7\r\n\r\n");
    }

    /// Trailers the worker drops, as it drops or replaces the same fields in heads:
    /// a client's trace context, `Proxy`, method overrides, front-proxy claims.
    /// Others go on.
    #[test]
    fn trailers_of_fields_managed_in_heads_are_dropped() {
        let d = decode_with(
            ChunkedDecoder::for_request(),
            b"0\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\ntracestate: a=b\r\nProxy: http://evil:1\r\nX-HTTP-Method-Override: DELETE\r\nX-Method-Override: DELETE\r\nX-Remote-User: admin\r\nX-Sum: 7\r\n\r\n",
        )
        .expect("valid")
        .expect("complete");
        assert_eq!(d.encoded, b"0\r\nX-Sum: 7\r\n\r\n");
    }

    #[test]
    fn trailer_limits() {
        let mut many = b"0\r\n".to_vec();
        for i in 0..=MAX_TRAILER_FIELDS {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(decode_all(&many), Err("too many trailer fields"));
        let mut big = b"0\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_TRAILER_BYTES));
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(decode_all(&big), Err("trailer section too large"));
    }

    #[test]
    fn re_encoding_is_canonical() {
        let d = decode_with(
            ChunkedDecoder::for_request(),
            b"000005;ext=\"x\"\r\nhello\r\nA\r\n0123456789\r\n0;e\r\nX-Sum: 1\r\nX-B:2\r\n\r\nNEXT",
        )
        .expect("valid")
        .expect("complete");
        assert_eq!(d.payload, b"hello0123456789");
        assert_eq!(
            d.encoded,
            b"5\r\nhello\r\na\r\n0123456789\r\n0\r\nX-Sum: 1\r\nX-B: 2\r\n\r\n"
        );
        // The re-encoding decodes to the same payload and re-encodes to itself.
        let again = decode_with(ChunkedDecoder::for_request(), &d.encoded)
            .expect("valid")
            .expect("complete");
        assert_eq!(again.payload, d.payload);
        assert_eq!(again.len, d.encoded.len());
        assert_eq!(again.encoded, d.encoded);
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

        /// Whole buffers (where the fast path takes the usual framing) and single
        /// bytes (where it never can) decode alike: the same payload, length,
        /// trailers and re-encoding, or the same error, on bodies that are valid,
        /// spelled unusually (leading zeros, upper case, extensions, trailers) or
        /// broken at one byte.
        #[test]
        fn fast_path_agrees_with_byte_by_byte(
            chunks in proptest::collection::vec(
                (1usize..70, 0usize..16, proptest::bool::ANY, proptest::bool::ANY), 0..6),
            trailer in proptest::bool::ANY,
            flip in proptest::option::of((proptest::num::usize::ANY, proptest::num::u8::ANY)),
            request in proptest::bool::ANY,
        ) {
            let mut wire = Vec::new();
            for (i, (len, zeros, upper, ext)) in chunks.iter().enumerate() {
                let size = format!("{}{len:x}", "0".repeat(*zeros));
                wire.extend_from_slice(if *upper { size.to_uppercase() } else { size }.as_bytes());
                if *ext {
                    wire.extend_from_slice(b";name=value");
                }
                wire.extend_from_slice(b"\r\n");
                wire.extend((0..*len).map(|j| b'a' + ((i + j) % 26) as u8));
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n");
            if trailer {
                wire.extend_from_slice(b"X-Checksum: 42\r\n");
            }
            wire.extend_from_slice(b"\r\nNEXT");
            if let Some((at, byte)) = flip {
                let at = at % wire.len();
                wire[at] = byte;
            }
            let fresh = || if request { ChunkedDecoder::for_request() } else { ChunkedDecoder::new() };
            // Decodes `wire` fed `step` bytes at a time: the payload, the length of
            // the body and its kept trailers, or the error.
            let run = |step: usize| {
                let mut dec = fresh();
                let mut payload = Vec::new();
                let mut pos = 0;
                while pos < wire.len() {
                    let input = &wire[pos..(pos + step).min(wire.len())];
                    let mut at = 0;
                    while at < input.len() {
                        let got = dec.decode(&input[at..])?;
                        payload.extend_from_slice(&input[at..][got.data.clone()]);
                        at += got.consumed;
                        if got.done {
                            let trailers: Vec<(Vec<u8>, Vec<u8>)> = dec
                                .trailers()
                                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                                .collect();
                            return Ok(Some((payload, pos + at, trailers)));
                        }
                        if got.consumed == 0 {
                            break;
                        }
                    }
                    pos += input.len();
                }
                Ok::<_, ChunkError>(None)
            };
            proptest::prop_assert_eq!(run(wire.len()), run(1));
        }
    }
}
