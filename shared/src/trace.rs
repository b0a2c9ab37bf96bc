//! W3C Trace Context: the `traceparent` and `tracestate` headers, trace and span IDs,
//! and the span context of one hop.
//!
//! Parsing follows the Trace Context recommendation (level 1, with the level 2 random
//! flag passed through untouched):
//!
//! - version `00`: exactly `00-<32 hex>-<16 hex>-<2 hex>` (55 bytes), lowercase hex only;
//! - version `ff` is invalid; an all-zero trace ID or parent ID is invalid;
//! - a higher version is parsed by the version-00 prefix rules: the first 55 bytes must
//!   have that shape and, if more follows, the next byte must be `-`;
//! - `tracestate`: at most 32 list members, each `key=value` with the spec's key and
//!   value grammar, at most 512 characters in all; an invalid header is dropped whole
//!   (it is never logged raw, only counted as dropped).
//!
//! A hop's [`SpanContext`] keeps the trace ID, its own fresh span ID and the caller's
//! span ID as parent; [`SpanContext::start`] derives one from the incoming header (or,
//! without a valid one, from the request ID when that is a UUID, so one ID finds both),
//! [`SpanContext::child`] makes the context of the next hop, and
//! [`SpanContext::traceparent`] formats the header for it without allocating.

use std::fmt;

use crate::request_id::RequestId;

/// The `traceparent` header name.
pub const TRACEPARENT: &str = "traceparent";
/// The `tracestate` header name.
pub const TRACESTATE: &str = "tracestate";

/// Length of a version-00 `traceparent`.
pub const TRACEPARENT_LEN: usize = 55;

/// Most list members a `tracestate` may have.
pub const TRACESTATE_MAX_MEMBERS: usize = 32;
/// Longest `tracestate` kept.
pub const TRACESTATE_MAX_LEN: usize = 512;

/// The `sampled` trace flag.
pub const FLAG_SAMPLED: u8 = 0x01;

/// A 16-byte trace ID, never all zeros.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId([u8; 16]);

/// An 8-byte span ID, never all zeros.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId([u8; 8]);

impl TraceId {
    /// The ID with these bytes, or `None` when they are all zero (invalid).
    pub fn from_bytes(bytes: [u8; 16]) -> Option<Self> {
        (bytes != [0; 16]).then_some(Self(bytes))
    }

    /// A random ID (from a per-thread wyrand, as request IDs' random bits are).
    pub fn random() -> Self {
        loop {
            if let Some(id) = Self::from_bytes(fastrand::u128(..).to_le_bytes()) {
                return id;
            }
        }
    }

    /// The ID derived from a request ID: the 16 bytes of the UUID when the request ID
    /// is one (any version, hyphenated or simple form, any case), else `None`.
    pub fn from_request_id(id: &RequestId) -> Option<Self> {
        let uuid = uuid::Uuid::try_parse_ascii(id.as_bytes()).ok()?;
        Self::from_bytes(uuid.into_bytes())
    }

    /// The raw bytes.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    /// Parses 32 lowercase hex digits (all zeros is invalid).
    pub fn parse_hex(s: &[u8]) -> Option<Self> {
        let mut out = [0u8; 16];
        (s.len() == 32 && decode_hex(s, &mut out)).then_some(())?;
        Self::from_bytes(out)
    }

    /// The 32 lowercase hex digits, without allocating.
    pub fn hex(&self) -> HexBuf<32> {
        HexBuf::encode(&self.0)
    }
}

impl SpanId {
    /// The ID with these bytes, or `None` when they are all zero (invalid).
    pub fn from_bytes(bytes: [u8; 8]) -> Option<Self> {
        (bytes != [0; 8]).then_some(Self(bytes))
    }

    /// A random, non-zero span ID.
    pub fn random() -> Self {
        loop {
            if let Some(id) = Self::from_bytes(fastrand::u64(..).to_le_bytes()) {
                return id;
            }
        }
    }

    /// The raw bytes.
    pub fn to_bytes(self) -> [u8; 8] {
        self.0
    }

    /// Parses 16 lowercase hex digits (all zeros is invalid).
    pub fn parse_hex(s: &[u8]) -> Option<Self> {
        let mut out = [0u8; 8];
        (s.len() == 16 && decode_hex(s, &mut out)).then_some(())?;
        Self::from_bytes(out)
    }

    /// The 16 lowercase hex digits, without allocating.
    pub fn hex(&self) -> HexBuf<16> {
        HexBuf::encode(&self.0)
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hex().as_str())
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceId({self})")
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hex().as_str())
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpanId({self})")
    }
}

/// `N` lowercase hex digits held inline.
#[derive(Clone, Copy)]
pub struct HexBuf<const N: usize>([u8; N]);

/// The two lowercase hex digits of every byte, in byte order: a byte's digits are
/// one look-up (every request writes three IDs in hex, for its `traceparent` and its
/// access line).
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0u8; 2]; 256];
    let mut b = 0;
    while b < 256 {
        pairs[b] = [DIGITS[b >> 4], DIGITS[b & 0xf]];
        b += 1;
    }
    pairs
};

impl<const N: usize> HexBuf<N> {
    fn encode(bytes: &[u8]) -> Self {
        let mut out = [b'0'; N];
        for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
            pair.copy_from_slice(&HEX_PAIRS[usize::from(*b)]);
        }
        Self(out)
    }

    /// The digits.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Decodes lowercase hex into `out` (whose length is half the input's).
fn decode_hex(s: &[u8], out: &mut [u8]) -> bool {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if s.len() != out.len() * 2 {
        return false;
    }
    for (i, pair) in s.chunks_exact(2).enumerate() {
        match (nibble(pair[0]), nibble(pair[1])) {
            (Some(h), Some(l)) => out[i] = (h << 4) | l,
            _ => return false,
        }
    }
    true
}

/// Why a `traceparent` was rejected (the value itself is never kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTraceParent {
    /// Wrong length or missing/misplaced `-` separators.
    #[error("traceparent has the wrong shape")]
    Shape,
    /// A field holds something other than lowercase hex.
    #[error("traceparent has a non-lowercase-hex field")]
    Hex,
    /// Version `ff`.
    #[error("traceparent version ff is invalid")]
    Version,
    /// All-zero trace ID.
    #[error("traceparent trace-id is all zeros")]
    ZeroTraceId,
    /// All-zero parent ID.
    #[error("traceparent parent-id is all zeros")]
    ZeroParentId,
}

/// A parsed, valid `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The version it came with (`0` for `00`).
    pub version: u8,
    /// The trace ID.
    pub trace_id: TraceId,
    /// The caller's span ID.
    pub parent_id: SpanId,
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Parses a header value by the spec's rules (surrounding spaces and tabs, which
    /// HTTP allows around a field value, are ignored).
    pub fn parse(value: &[u8]) -> Result<Self, InvalidTraceParent> {
        let value = trim_ows(value);
        if value.len() < 2 {
            return Err(InvalidTraceParent::Shape);
        }
        let mut version = [0u8; 1];
        if !decode_hex(&value[..2], &mut version) {
            return Err(InvalidTraceParent::Hex);
        }
        let version = version[0];
        if version == 0xff {
            return Err(InvalidTraceParent::Version);
        }
        let ok_len = if version == 0 {
            value.len() == TRACEPARENT_LEN
        } else {
            value.len() == TRACEPARENT_LEN
                || (value.len() > TRACEPARENT_LEN && value[TRACEPARENT_LEN] == b'-')
        };
        if !ok_len || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return Err(InvalidTraceParent::Shape);
        }
        let mut trace = [0u8; 16];
        let mut parent = [0u8; 8];
        let mut flags = [0u8; 1];
        if !decode_hex(&value[3..35], &mut trace)
            || !decode_hex(&value[36..52], &mut parent)
            || !decode_hex(&value[53..55], &mut flags)
        {
            return Err(InvalidTraceParent::Hex);
        }
        let trace_id = TraceId::from_bytes(trace).ok_or(InvalidTraceParent::ZeroTraceId)?;
        let parent_id = SpanId::from_bytes(parent).ok_or(InvalidTraceParent::ZeroParentId)?;
        Ok(Self {
            version,
            trace_id,
            parent_id,
            flags: flags[0],
        })
    }

    /// The version-00 header for this trace, parent and flags (a higher incoming
    /// version is sent on as 00, which is what a version-00 implementation must do).
    pub fn header(&self) -> TraceParentHeader {
        TraceParentHeader::new(self.trace_id, self.parent_id, self.flags)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.header().as_str())
    }
}

/// A formatted version-00 `traceparent`, held inline (no allocation).
#[derive(Clone, Copy)]
pub struct TraceParentHeader([u8; TRACEPARENT_LEN]);

impl TraceParentHeader {
    /// `00-{trace}-{span}-{flags}`.
    pub fn new(trace_id: TraceId, span_id: SpanId, flags: u8) -> Self {
        let mut out = [b'-'; TRACEPARENT_LEN];
        out[0] = b'0';
        out[1] = b'0';
        out[3..35].copy_from_slice(&trace_id.hex().0);
        out[36..52].copy_from_slice(&span_id.hex().0);
        out[53..55].copy_from_slice(&HexBuf::<2>::encode(&[flags]).0);
        Self(out)
    }

    /// The header value.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The header value's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for TraceParentHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for TraceParentHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParentHeader({})", self.as_str())
    }
}

/// Why a `tracestate` was dropped (the value itself is never kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTraceState {
    /// Longer than [`TRACESTATE_MAX_LEN`].
    #[error("tracestate is longer than 512 characters")]
    TooLong,
    /// More than [`TRACESTATE_MAX_MEMBERS`] list members.
    #[error("tracestate has more than 32 list members")]
    TooManyMembers,
    /// A member is not `key=value` by the grammar.
    #[error("tracestate has a malformed list member")]
    Member,
    /// The same key twice.
    #[error("tracestate has a duplicate key")]
    DuplicateKey,
}

/// A valid `tracestate`, normalised (empty members and optional whitespace removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceState(String);

impl TraceState {
    /// Validates a header value (several header lines are joined with `,` before).
    pub fn parse(value: &[u8]) -> Result<Self, InvalidTraceState> {
        if value.len() > TRACESTATE_MAX_LEN * 2 {
            // Not even whitespace could make this fit.
            return Err(InvalidTraceState::TooLong);
        }
        let mut out = String::with_capacity(value.len());
        let mut keys: Vec<&[u8]> = Vec::new();
        for member in value.split(|&b| b == b',') {
            let member = trim_ows(member);
            if member.is_empty() {
                continue;
            }
            if keys.len() == TRACESTATE_MAX_MEMBERS {
                return Err(InvalidTraceState::TooManyMembers);
            }
            let eq = member
                .iter()
                .position(|&b| b == b'=')
                .ok_or(InvalidTraceState::Member)?;
            let (key, val) = (&member[..eq], &member[eq + 1..]);
            if !valid_key(key) || !valid_value(val) {
                return Err(InvalidTraceState::Member);
            }
            if keys.contains(&key) {
                return Err(InvalidTraceState::DuplicateKey);
            }
            keys.push(key);
            if !out.is_empty() {
                out.push(',');
            }
            // Validated as printable ASCII above.
            out.push_str(std::str::from_utf8(member).map_err(|_| InvalidTraceState::Member)?);
        }
        if out.len() > TRACESTATE_MAX_LEN {
            return Err(InvalidTraceState::TooLong);
        }
        Ok(Self(out))
    }

    /// The normalised header value (empty when the header held only empty members).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether no member is left.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `key = simple-key / multi-tenant-key`:
/// `simple-key = lcalpha 0*255(lcalpha / DIGIT / "_" / "-" / "*" / "/")`,
/// `multi-tenant-key = tenant-id "@" system-id` with
/// `tenant-id = (lcalpha / DIGIT) 0*240(…)` and `system-id = lcalpha 0*13(…)`.
fn valid_key(key: &[u8]) -> bool {
    fn rest(c: u8) -> bool {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'*' | b'/')
    }
    match key.iter().position(|&b| b == b'@') {
        None => {
            !key.is_empty()
                && key.len() <= 256
                && key[0].is_ascii_lowercase()
                && key[1..].iter().all(|&c| rest(c))
        }
        Some(at) => {
            let (tenant, system) = (&key[..at], &key[at + 1..]);
            !tenant.is_empty()
                && tenant.len() <= 241
                && (tenant[0].is_ascii_lowercase() || tenant[0].is_ascii_digit())
                && tenant[1..].iter().all(|&c| rest(c))
                && !system.is_empty()
                && system.len() <= 14
                && system[0].is_ascii_lowercase()
                && system[1..].iter().all(|&c| rest(c))
        }
    }
}

/// `value = 0*255(chr) nblk-chr`, `chr = %x20 / nblk-chr`,
/// `nblk-chr = %x21-2B / %x2D-3C / %x3E-7E`.
fn valid_value(val: &[u8]) -> bool {
    fn nblk(c: u8) -> bool {
        matches!(c, 0x21..=0x2b | 0x2d..=0x3c | 0x3e..=0x7e)
    }
    !val.is_empty()
        && val.len() <= 256
        && nblk(val[val.len() - 1])
        && val.iter().all(|&c| c == 0x20 || nblk(c))
}

/// Strips HTTP optional whitespace (spaces and tabs) at both ends.
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// The trace position of one hop: the trace, this hop's span and the caller's span.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SpanContext {
    /// The trace every hop shares.
    pub trace_id: TraceId,
    /// This hop's span.
    pub span_id: SpanId,
    /// The caller's span, when there is one.
    pub parent_span_id: Option<SpanId>,
    /// Trace flags passed on to the next hop.
    pub flags: u8,
}

impl SpanContext {
    /// The context of a hop that received `incoming` (when valid) for a request with
    /// `request_id`: the incoming trace and flags with the caller's span as parent,
    /// or else a new root span whose trace ID is the request ID's UUID bytes when the
    /// request ID is a UUID, random otherwise (sampled, since every hop logs).
    pub fn start(incoming: Option<&TraceParent>, request_id: Option<&RequestId>) -> Self {
        match incoming {
            Some(tp) => Self {
                trace_id: tp.trace_id,
                span_id: SpanId::random(),
                parent_span_id: Some(tp.parent_id),
                flags: tp.flags,
            },
            None => Self::root(request_id),
        }
    }

    /// A root span (no parent) for a request with `request_id`.
    pub fn root(request_id: Option<&RequestId>) -> Self {
        Self {
            trace_id: request_id
                .and_then(TraceId::from_request_id)
                .unwrap_or_else(TraceId::random),
            span_id: SpanId::random(),
            parent_span_id: None,
            flags: FLAG_SAMPLED,
        }
    }

    /// Like [`SpanContext::start`] with the raw header value: an invalid or absent
    /// `traceparent` counts as none.
    pub fn from_header(traceparent: Option<&[u8]>, request_id: Option<&RequestId>) -> Self {
        let incoming = traceparent.and_then(|v| TraceParent::parse(v).ok());
        Self::start(incoming.as_ref(), request_id)
    }

    /// The context of the next hop (or of a sub-task): same trace and flags, a new
    /// span, this span as its parent.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id,
            span_id: SpanId::random(),
            parent_span_id: Some(self.span_id),
            flags: self.flags,
        }
    }

    /// The `traceparent` naming this span as the parent: what to send to the next hop
    /// when this span makes the call, and what to echo on this hop's response.
    pub fn traceparent(&self) -> TraceParentHeader {
        TraceParentHeader::new(self.trace_id, self.span_id, self.flags)
    }
}

/// Longest `traceparent` read from a carrier other than a header (event metadata, a
/// stored or fetched circuit change): a version-00 value is 55 bytes, so anything
/// longer than this is not one this side could use, and is dropped whole.
pub const CARRIED_TRACEPARENT_MAX_LEN: usize = TRACESTATE_MAX_LEN;

/// A hop's W3C trace context handed on other than in HTTP headers — a circuit
/// event's metadata, a stored circuit change and the worker's fetch of it: a valid
/// `traceparent` naming the hop's span, and the `tracestate` that came with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// The hop's trace, its span as the next hop's parent, and the flags.
    pub traceparent: TraceParent,
    /// The validated `tracestate` (never empty); only ever with a valid `traceparent`.
    pub tracestate: Option<TraceState>,
}

impl TraceContext {
    /// Reads a carried context by the header rules: `None` when the `traceparent` is
    /// absent, invalid or longer than [`CARRIED_TRACEPARENT_MAX_LEN`]; the
    /// `tracestate` is kept only with a valid `traceparent`, and dropped whole when
    /// invalid or empty. Never logs the values.
    pub fn read(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<Self> {
        let traceparent = traceparent
            .filter(|t| t.len() <= CARRIED_TRACEPARENT_MAX_LEN)
            .and_then(|t| TraceParent::parse(t.as_bytes()).ok())?;
        let tracestate = tracestate
            .and_then(|t| TraceState::parse(t.as_bytes()).ok())
            .filter(|t| !t.is_empty());
        Some(Self {
            traceparent,
            tracestate,
        })
    }

    /// The context naming `span` as the next hop's parent, with `tracestate` (an
    /// empty one counts as none).
    pub fn of_span(span: &SpanContext, tracestate: Option<TraceState>) -> Self {
        Self {
            traceparent: TraceParent {
                version: 0,
                trace_id: span.trace_id,
                parent_id: span.span_id,
                flags: span.flags,
            },
            tracestate: tracestate.filter(|t| !t.is_empty()),
        }
    }

    /// The next hop's span: the same trace and flags, a new span, the carried span
    /// as its parent.
    pub fn span(&self) -> SpanContext {
        SpanContext::start(Some(&self.traceparent), None)
    }

    /// The `traceparent` as carried (version 00, 55 bytes).
    pub fn traceparent_text(&self) -> String {
        self.traceparent.header().as_str().to_owned()
    }

    /// The `tracestate` as carried, when there is one.
    pub fn tracestate_text(&self) -> Option<&str> {
        self.tracestate.as_ref().map(TraceState::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn spec_examples() {
        let tp = TraceParent::parse(VALID.as_bytes()).expect("valid");
        assert_eq!(tp.version, 0);
        assert_eq!(tp.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
        assert_eq!(tp.to_string(), VALID);
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(
            TraceParent::parse(unsampled.as_bytes()).expect("ok").flags,
            0
        );
    }

    /// Every byte value, at every position, is written as `{:02x}` writes it.
    #[test]
    fn hex_digits_are_the_formatters_for_every_byte() {
        for b in 0..=255u8 {
            let trace = TraceId([b, 0x5a, b, b, b, b, b, b, b, b, b, b, b, b, b, b]);
            let want: String = trace.0.iter().map(|x| format!("{x:02x}")).collect();
            assert_eq!(trace.hex().as_str(), want, "{b:#04x}");
            let span = SpanId([1, b, b, b, b, b, b, b]);
            let want: String = span.0.iter().map(|x| format!("{x:02x}")).collect();
            assert_eq!(span.hex().as_str(), want, "{b:#04x}");
        }
        let flags: HexBuf<2> = HexBuf::encode(&[0xc3]);
        assert_eq!(flags.as_str(), "c3");
    }

    #[test]
    fn table() {
        use InvalidTraceParent::*;
        let cases: &[(&str, Result<(), InvalidTraceParent>)] = &[
            (VALID, Ok(())),
            (
                " \t00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ",
                Ok(()),
            ),
            // Uppercase hex is not allowed.
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                Err(Hex),
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
                Err(Hex),
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
                Err(Hex),
            ),
            (
                "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Err(Hex),
            ),
            // All-zero IDs.
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                Err(ZeroTraceId),
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                Err(ZeroParentId),
            ),
            // Version ff.
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Err(Version),
            ),
            // Version 00 must be exactly 55 bytes.
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
                Err(Shape),
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz",
                Err(Shape),
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
                Err(Shape),
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
                Err(Shape),
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Err(Shape),
            ),
            ("", Err(Shape)),
            ("0", Err(Shape)),
            ("zz", Err(Hex)),
            // Higher versions: the 00 prefix rules, then `-` and anything.
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Ok(()),
            ),
            (
                "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds",
                Ok(()),
            ),
            (
                "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01.what",
                Err(Shape),
            ),
            (
                "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
                Err(Shape),
            ),
        ];
        for (input, want) in cases {
            let got = TraceParent::parse(input.as_bytes()).map(|_| ());
            assert_eq!(&got, want, "{input:?}");
        }
        let future =
            TraceParent::parse(b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-extra")
                .expect("future version");
        assert_eq!(future.version, 0xcc);
        assert_eq!(future.flags, 9);
        assert_eq!(
            future.header().as_str(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09",
            "sent on as version 00"
        );
    }

    #[test]
    fn tracestate_table() {
        use InvalidTraceState::*;
        let ok: &[(&str, &str)] = &[
            ("rojo=00f067aa0ba902b7", "rojo=00f067aa0ba902b7"),
            (
                "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
                "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
            ),
            (
                " rojo=00f067aa0ba902b7 ,\t, congo=t61rcWkgMzE ",
                "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
            ),
            ("fw529a3039@dt=abc", "fw529a3039@dt=abc"),
            ("0tenant@sys=a b", "0tenant@sys=a b"),
            ("", ""),
            (",,", ""),
            // A trailing comma or space is list syntax, not part of the value.
            ("rojo=a,", "rojo=a"),
            ("rojo=a ", "rojo=a"),
        ];
        for (input, want) in ok {
            let got = TraceState::parse(input.as_bytes()).expect(input);
            assert_eq!(got.as_str(), *want, "{input:?}");
        }
        let bad: &[(&str, InvalidTraceState)] = &[
            ("Rojo=1", Member),
            ("rojo", Member),
            ("rojo=", Member),
            ("rojo=a=b", Member),
            ("1abc=x", Member),
            ("a@=x", Member),
            ("@b=x", Member),
            ("a@B=x", Member),
            ("a@bcdefghijklmnop=x", Member),
            ("a=\u{e9}", Member),
            ("a=1,a=2", DuplicateKey),
        ];
        for (input, want) in bad {
            assert_eq!(TraceState::parse(input.as_bytes()), Err(*want), "{input:?}");
        }
        let members: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert_eq!(
            TraceState::parse(members.join(",").as_bytes()),
            Err(TooManyMembers)
        );
        assert!(TraceState::parse(members[..32].join(",").as_bytes()).is_ok());
        let long = format!("a={},b={}", "x".repeat(255), "y".repeat(255));
        assert_eq!(TraceState::parse(long.as_bytes()), Err(TooLong));
        let fits = format!("a={},b={}", "x".repeat(250), "y".repeat(250));
        assert!(TraceState::parse(fits.as_bytes()).is_ok());
    }

    #[test]
    fn carried_contexts_keep_a_valid_traceparent_and_its_tracestate_only() {
        let ctx = TraceContext::read(Some(VALID), Some(" rojo=1 ,congo=2")).expect("valid");
        assert_eq!(ctx.traceparent_text(), VALID);
        assert_eq!(ctx.tracestate_text(), Some("rojo=1,congo=2"));
        let child = ctx.span();
        assert_eq!(child.trace_id, ctx.traceparent.trace_id);
        assert_eq!(child.parent_span_id, Some(ctx.traceparent.parent_id));
        assert_eq!(child.flags, 1);
        // No valid traceparent: nothing, whatever the tracestate.
        assert_eq!(TraceContext::read(None, Some("rojo=1")), None);
        assert_eq!(TraceContext::read(Some("00-zz"), Some("rojo=1")), None);
        let oversized = format!("01-{}-{}", &VALID[3..], "x".repeat(100_000));
        assert!(
            TraceParent::parse(oversized.as_bytes()).is_ok(),
            "by the spec"
        );
        assert_eq!(
            TraceContext::read(Some(&oversized), None),
            None,
            "too long to carry"
        );
        // An invalid or empty tracestate is dropped whole; the traceparent stays.
        for bad in ["Rojo=1", ",,", "", &"a=b,".repeat(600)] {
            let ctx = TraceContext::read(Some(VALID), Some(bad)).expect("valid traceparent");
            assert_eq!(ctx.tracestate, None, "{bad:?}");
        }
        // Written from a span: that span is the parent, the text reads back the same.
        let rid = RequestId::parse(b"job-17").expect("rid");
        let span = SpanContext::root(Some(&rid));
        let state = TraceState::parse(b"rojo=1").ok();
        let ctx = TraceContext::of_span(&span, state.clone());
        assert_eq!(ctx.traceparent_text(), span.traceparent().as_str());
        assert_eq!(
            TraceContext::read(Some(&ctx.traceparent_text()), ctx.tracestate_text()),
            Some(TraceContext::of_span(&span, state))
        );
        assert_eq!(
            TraceContext::of_span(&span, TraceState::parse(b"").ok()).tracestate,
            None
        );
    }

    #[test]
    fn span_context_derivation() {
        let rid = RequestId::parse(b"4bf92f35-77b3-4da6-a3ce-929d0e0e4736").expect("rid");
        let root = SpanContext::from_header(None, Some(&rid));
        assert_eq!(
            root.trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(root.parent_span_id, None);
        assert_eq!(root.flags, FLAG_SAMPLED);
        // An invalid header counts as absent.
        let bad = SpanContext::from_header(Some(b"00-zz"), Some(&rid));
        assert_eq!(bad.trace_id, root.trace_id);
        assert_ne!(bad.span_id, root.span_id);
        // A non-UUID request ID gets a random trace.
        let other = RequestId::parse(b"job-17").expect("rid");
        let a = SpanContext::from_header(None, Some(&other));
        let b = SpanContext::from_header(None, Some(&other));
        assert_ne!(a.trace_id, b.trace_id);
        // A valid header wins over the request ID.
        let hop = SpanContext::from_header(Some(VALID.as_bytes()), Some(&rid));
        assert_eq!(hop.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            hop.parent_span_id.map(|s| s.to_string()).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert_ne!(hop.span_id.to_string(), "00f067aa0ba902b7");
        let next = hop.child();
        assert_eq!(next.trace_id, hop.trace_id);
        assert_eq!(next.parent_span_id, Some(hop.span_id));
        let header = hop.traceparent();
        let parsed = TraceParent::parse(header.as_bytes()).expect("own header");
        assert_eq!(parsed.parent_id, hop.span_id);
        assert_eq!(parsed.trace_id, hop.trace_id);
    }
}
