//! Parsing request and response heads: bytes in, typed head out, no socket.
//!
//! httparse does the tokenizing (it refuses obs-fold, bare CR, NUL and other invalid
//! bytes); this module adds the limits of `docs/limits.md` and the message-framing rules of
//! RFC 9112 §6 that decide where a body ends. Header names and values are kept as
//! offsets into the caller's buffer, so a parsed head owns no copies of the bytes.

use std::mem::MaybeUninit;
use std::ops::Range;

use super::error::{RequestError, ResponseError};

/// Limits on request heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// Longest request line, in bytes (414 past it).
    pub max_request_line: usize,
    /// Largest header block after the request line, in bytes (431 past it).
    pub max_header_bytes: usize,
    /// Most header fields (431 past it).
    pub max_headers: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        Self {
            max_request_line: 8 * 1024,
            max_header_bytes: 16 * 1024,
            max_headers: 100,
        }
    }
}

/// HTTP version of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0: close by default, no chunked.
    Http10,
    /// HTTP/1.1.
    Http11,
}

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// Exactly this many bytes (0: no body).
    Length(u64),
    /// Chunked transfer coding, ending with the last chunk and trailers.
    Chunked,
    /// Until the connection closes (responses only).
    Eof,
}

/// One header field, as offsets into the head buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderField {
    /// The name, case as sent.
    pub name: Range<usize>,
    /// The value, without surrounding white space.
    pub value: Range<usize>,
}

/// Request methods the proxy treats specially; everything else is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET
    Get,
    /// HEAD: the response has no body.
    Head,
    /// POST
    Post,
    /// PUT
    Put,
    /// DELETE
    Delete,
    /// OPTIONS
    Options,
    /// CONNECT: refused (not a forward proxy).
    Connect,
    /// Any other token.
    Other,
}

impl Method {
    fn from_token(token: &str) -> Self {
        match token {
            "GET" => Self::Get,
            "HEAD" => Self::Head,
            "POST" => Self::Post,
            "PUT" => Self::Put,
            "DELETE" => Self::Delete,
            "OPTIONS" => Self::Options,
            "CONNECT" => Self::Connect,
            _ => Self::Other,
        }
    }

    /// Whether a request may be retried safely (RFC 9110 §9.2.2).
    pub fn is_idempotent(self) -> bool {
        matches!(
            self,
            Self::Get | Self::Head | Self::Put | Self::Delete | Self::Options
        )
    }
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The method.
    pub method: Method,
    /// The method token.
    pub method_raw: Range<usize>,
    /// The request target (path and query, or absolute form).
    pub target: Range<usize>,
    /// The version.
    pub version: Version,
    /// Every header field, in order, repeats included.
    pub headers: Vec<HeaderField>,
    /// Length of the head including the final empty line.
    pub head_len: usize,
    /// How the body is delimited.
    pub framing: BodyFraming,
    /// Whether the client wants the connection kept open after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// The `Upgrade` value when the request asks for a protocol upgrade.
    pub upgrade: Option<Range<usize>>,
    /// The `Host` value.
    pub host: Option<Range<usize>>,
    /// Header names listed in `Connection` (hop-by-hop for this message).
    pub connection_tokens: Vec<Range<usize>>,
    /// Whether a `Content-Length` header was present.
    pub has_content_length: bool,
}

impl RequestHead {
    /// The values of every field named `name` (case aside), in order; `buf` is the
    /// buffer the head was parsed from.
    pub fn values<'h, 'b: 'h>(
        &'h self,
        buf: &'b [u8],
        name: &'h str,
    ) -> impl Iterator<Item = &'b [u8]> + 'h {
        self.headers
            .iter()
            .filter(move |h| name_is(&buf[h.name.clone()], name))
            .map(|h| &buf[h.value.clone()])
    }
}

/// A parsed upstream response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// Reason phrase.
    pub reason: Range<usize>,
    /// Version.
    pub version: Version,
    /// Every header field, in order.
    pub headers: Vec<HeaderField>,
    /// Length of the head including the final empty line.
    pub head_len: usize,
    /// How the body is delimited.
    pub framing: BodyFraming,
    /// Whether the upstream connection may be reused after this response: never
    /// when its framing is in doubt (see [`parse_response`]).
    pub keep_alive: bool,
    /// The `Content-Length` value when the head has one valid length (a list of
    /// equal values counts as one): the only length the proxy ever writes on, for
    /// a bodiless response (HEAD, 304), the representation's length.
    pub content_length: Option<u64>,
    /// Header names listed in `Connection`.
    pub connection_tokens: Vec<Range<usize>>,
    /// The `Upgrade` value (on 101).
    pub upgrade: Option<Range<usize>>,
}

/// Offset of `part` inside `buf` (both from the same allocation).
fn offset(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

/// The request target as the app gets it (RFC 9112 §3.2): origin-form as it is; `*`
/// for `OPTIONS`; absolute-form (`http://host/path`, which a server must accept)
/// narrowed to its path and query, when its authority is the `Host` field's value
/// (case aside) — the worker routes and checks access by `Host`, so a target naming
/// another authority would reach an app that reads it as a request for something
/// else than what was routed; and a path must follow the authority. A target with a
/// fragment (`#`) is a 400 in every form. Anything else
/// (a bare or authority-form target) is a 400. `CONNECT` passes here and is refused
/// by the caller with its own reason. An HTTP/2 `:path` is checked the same way
/// before its head is rendered (origin-form only).
fn request_target(
    buf: &[u8],
    target: Range<usize>,
    method: &str,
    host: Option<&Range<usize>>,
) -> Result<Range<usize>, RequestError> {
    let t = &buf[target.clone()];
    if method == "CONNECT" {
        return Ok(target);
    }
    // A fragment is the client's own (RFC 9112 §3.2: no request-target form has one);
    // one sent anyway would be read by apps as part of the path or the query.
    if t.contains(&b'#') {
        return Err(RequestError::Malformed("request target with a fragment"));
    }
    if t.first() == Some(&b'/') || (t == b"*" && method == "OPTIONS") {
        return Ok(target);
    }
    let (scheme_len, default_port) = if t.len() > 7 && t[..7].eq_ignore_ascii_case(b"http://") {
        (7, 80)
    } else if t.len() > 8 && t[..8].eq_ignore_ascii_case(b"https://") {
        (8, 443)
    } else {
        return Err(RequestError::Malformed("request target"));
    };
    let rest = &t[scheme_len..];
    let authority_len = rest
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let named = Authority::parse(authority);
    let addressed = host.and_then(|h| Authority::parse(buf[h.clone()].trim_ascii()));
    let same_host = matches!((named, addressed), (Some(a), Some(b)) if a.same(&b, default_port));
    if !same_host {
        return Err(RequestError::Malformed(
            "request target names another host than Host",
        ));
    }
    if rest.get(authority_len) != Some(&b'/') {
        return Err(RequestError::Malformed("request target"));
    }
    Ok(target.start + scheme_len + authority_len..target.end)
}

/// A `host[:port]` authority (RFC 3986 §3.2.2-3) of a `Host` value, an
/// absolute-form request target or an origin: the one reading of every comparison
/// of authorities the worker makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authority<'a> {
    /// The host without a trailing dot (`[v6]` kept in its brackets); compare it
    /// without regard to case.
    pub host: &'a [u8],
    /// The port, when one is written (an empty one is none).
    pub port: Option<u16>,
}

impl<'a> Authority<'a> {
    /// `None` when `text` is not of that shape: the host a name of letters, digits,
    /// `-`, `.` and `_` or a bracketed IPv6 literal (no user information, no
    /// percent-encoding), the port at most five digits within 16 bits.
    pub fn parse(text: &'a [u8]) -> Option<Self> {
        let (host, port) = match text.strip_prefix(b"[") {
            Some(rest) => {
                let end = rest.iter().position(|b| *b == b']')?;
                let v6 = &rest[..end];
                if v6.is_empty()
                    || !v6
                        .iter()
                        .all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.')
                {
                    return None;
                }
                let port = match &rest[end + 1..] {
                    [] => None,
                    after => Some(after.strip_prefix(b":")?),
                };
                (&text[..end + 2], port)
            }
            None => match text.iter().position(|b| *b == b':') {
                Some(colon) => (&text[..colon], Some(&text[colon + 1..])),
                None => (text, None),
            },
        };
        let port = match port {
            None | Some([]) => None,
            Some(p) if p.len() <= 5 && p.iter().all(u8::is_ascii_digit) => {
                Some(u16::try_from(p.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'))).ok()?)
            }
            Some(_) => return None,
        };
        let host = host.strip_suffix(b".").unwrap_or(host);
        let name_ok = host.starts_with(b"[")
            || host
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if host.is_empty() || !name_ok {
            return None;
        }
        Some(Self { host, port })
    }

    /// Whether both name one host (case aside) and one port, a missing port read as
    /// `default_port` (`http://a:80/` addresses `Host: a`).
    pub fn same(&self, other: &Authority<'_>, default_port: u16) -> bool {
        self.host.eq_ignore_ascii_case(other.host)
            && self.port.unwrap_or(default_port) == other.port.unwrap_or(default_port)
    }
}

/// Case-insensitive comparison of an ASCII header name.
pub fn name_is(name: &[u8], want: &str) -> bool {
    name.eq_ignore_ascii_case(want.as_bytes())
}

/// Splits a comma-separated list value into trimmed, non-empty elements.
pub fn list_elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|b| *b == b',').filter_map(|e| {
        let e = e.trim_ascii();
        (!e.is_empty()).then_some(e)
    })
}

/// The protocols an `Upgrade` value offers that the worker passes on: all but `h2c`.
/// An HTTP/2 switch over cleartext (deprecated, RFC 9113 §3.1) would turn the
/// connection into one the app reads as HTTP/2 while the worker relays it as bytes:
/// every later request on it would reach the app with no field rule applied (client
/// addresses, request IDs, permit cookies), and none would be logged. HTTP/2 clients
/// reach apps through the worker's own HTTP/2 instead.
pub fn upgrade_offers(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    list_elements(value).filter(|protocol| {
        let name = protocol.split(|b| *b == b'/').next().unwrap_or(protocol);
        !name.eq_ignore_ascii_case(b"h2c")
    })
}

/// Parses a `Content-Length` value (a list of equal decimal numbers allowed).
fn parse_content_length(value: &[u8], current: Option<u64>) -> Option<u64> {
    let mut result = current;
    let mut any = false;
    for element in value.split(|b| *b == b',') {
        let element = element.trim_ascii();
        if element.is_empty() || element.len() > 19 || !element.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = element
            .iter()
            .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
        match result {
            Some(prev) if prev != n => return None,
            _ => result = Some(n),
        }
        any = true;
    }
    any.then_some(result).flatten()
}

/// The header fields every head keeps track of while scanning.
#[derive(Default)]
struct Scan {
    content_length: Option<u64>,
    bad_content_length: bool,
    has_content_length: bool,
    /// Transfer codings in order, across every `Transfer-Encoding` field.
    te_codings: Vec<Range<usize>>,
    has_te: bool,
    conn_close: bool,
    conn_keep_alive: bool,
    conn_upgrade: bool,
    connection_tokens: Vec<Range<usize>>,
    upgrade: Option<Range<usize>>,
}

impl Scan {
    fn header(&mut self, buf: &[u8], field: &HeaderField) {
        let name = &buf[field.name.clone()];
        let value = &buf[field.value.clone()];
        if name_is(name, "content-length") {
            self.has_content_length = true;
            match parse_content_length(value, self.content_length) {
                Some(n) => self.content_length = Some(n),
                None => self.bad_content_length = true,
            }
        } else if name_is(name, "transfer-encoding") {
            self.has_te = true;
            for coding in list_elements(value) {
                self.te_codings.push(offset(buf, coding));
            }
        } else if name_is(name, "connection") {
            for token in list_elements(value) {
                if token.eq_ignore_ascii_case(b"close") {
                    self.conn_close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.conn_keep_alive = true;
                } else {
                    if token.eq_ignore_ascii_case(b"upgrade") {
                        self.conn_upgrade = true;
                    }
                    self.connection_tokens.push(offset(buf, token));
                }
            }
        } else if name_is(name, "upgrade") {
            self.upgrade = Some(field.value.clone());
        }
    }

    /// Whether the codings are exactly one final `chunked` (after any others).
    fn te_state(&self, buf: &[u8]) -> TeState {
        let Some(last) = self.te_codings.last() else {
            return TeState::NotChunked;
        };
        let is_chunked = |r: &Range<usize>| buf[r.clone()].eq_ignore_ascii_case(b"chunked");
        if !is_chunked(last) {
            return TeState::NotChunked;
        }
        let earlier = &self.te_codings[..self.te_codings.len() - 1];
        if earlier.iter().any(is_chunked) {
            TeState::ChunkedTwice
        } else if earlier.is_empty() {
            TeState::Chunked
        } else {
            TeState::ChunkedAfterOthers
        }
    }
}

enum TeState {
    NotChunked,
    Chunked,
    ChunkedTwice,
    ChunkedAfterOthers,
}

fn fields(buf: &[u8], parsed: &[httparse::Header<'_>], out: &mut Vec<HeaderField>) {
    out.clear();
    out.extend(parsed.iter().map(|h| HeaderField {
        name: offset(buf, h.name.as_bytes()),
        value: offset(buf, h.value.trim_ascii()),
    }));
}

/// Parses a request head at the start of `buf`.
///
/// `Ok(None)` means the head is not complete yet (read more); errors are final and
/// answer with [`RequestError::status`].
pub fn parse_request(buf: &[u8], limits: &HeadLimits) -> Result<Option<RequestHead>, RequestError> {
    parse_request_reusing(buf, limits, &mut Vec::new())
}

/// `buf` from its request line on: the empty lines a client may send before it,
/// which the parser skips (RFC 9112 §2.2), left out.
fn after_empty_lines(buf: &[u8]) -> &[u8] {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    &buf[start..]
}

/// Whether `buf`, the start of a request head that may be cut short or refused
/// before it was parsed whole, is a `HEAD` request: the refusal then carries no
/// body (read as far as the method, past the empty lines the parser skips).
pub fn is_head_request(buf: &[u8]) -> bool {
    after_empty_lines(buf).starts_with(b"HEAD ")
}

/// What a refused request head says of itself, read from its bytes as far as they
/// go (`buf`: a head cut short, too large, or malformed, which the parser gave up
/// on): its field lines up to the first empty line, each split at its first colon.
/// So the client finds its refusal under its own ID and in its own trace, as it
/// would any other answer.
#[derive(Debug, Default, Clone, Copy)]
pub struct RefusedHead {
    /// The request ID, taken as [`appproxy_shared::header::extract`] takes it from
    /// parsed fields (a valid one only: the value is never echoed unchecked).
    pub id: Option<appproxy_shared::RequestId>,
    /// The client's `traceparent`, by the rule of parsed fields: one line only,
    /// valid.
    pub traceparent: Option<appproxy_shared::trace::TraceParent>,
}

impl RefusedHead {
    /// Reads the head's whole field lines from `buf`.
    pub fn read(buf: &[u8]) -> Self {
        let rest = after_empty_lines(buf);
        // Whole lines only: the last one of a head cut short may end inside a value.
        let whole = &rest[..rest.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)];
        let fields = || {
            whole
                .split(|&b| b == b'\n')
                .skip(1)
                .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
                .take_while(|line| !line.is_empty())
                .filter_map(|line| {
                    let colon = line.iter().position(|&b| b == b':')?;
                    let (name, value) = (&line[..colon], &line[colon + 1..]);
                    (!name.is_empty() && name.iter().all(|&b| super::chunked::is_tchar(b)))
                        .then_some((name, value))
                })
        };
        let id = match appproxy_shared::header::extract(fields()) {
            appproxy_shared::header::Extracted::Valid(id) => Some(id),
            _ => None,
        };
        let mut lines =
            fields().filter(|(name, _)| name_is(name, appproxy_shared::trace::TRACEPARENT));
        let traceparent = match (lines.next(), lines.next()) {
            (Some((_, value)), None) => appproxy_shared::trace::TraceParent::parse(value).ok(),
            _ => None,
        };
        Self { id, traceparent }
    }

    /// The ID the refusal goes under: the client's, else a fresh one.
    pub fn id_or(&self, version: appproxy_shared::IdVersion) -> appproxy_shared::RequestId {
        self.id
            .unwrap_or_else(|| appproxy_shared::RequestId::generate(version))
    }

    /// The refusal's span under `id`, with `[tracing] trace_context` (`traced`):
    /// the child of the client's `traceparent`, else a root derived from the ID.
    pub fn span(
        &self,
        traced: bool,
        id: &appproxy_shared::RequestId,
    ) -> Option<appproxy_shared::trace::SpanContext> {
        traced.then(|| {
            appproxy_shared::trace::SpanContext::start(self.traceparent.as_ref(), Some(id))
        })
    }
}

/// Whether a request head httparse refused for its version starts (after the empty
/// lines it skips) with method, target and a well-formed `HTTP/x.y` of another
/// version (505), rather than with no request line at all (400).
fn names_a_version(buf: &[u8]) -> bool {
    let rest = after_empty_lines(buf);
    let line = &rest[..rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len())];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(_), Some(_), Some(v), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    matches!(v, [b'H', b'T', b'T', b'P', b'/', major, b'.', minor] if major.is_ascii_digit() && minor.is_ascii_digit())
}

/// Whether every line of the request head `buf[..head_len]` ends in CRLF. httparse
/// also ends a line at a bare LF (RFC 9112 §2.2 allows either), but a peer in front
/// of the worker that keeps a bare LF inside a field's value reads
/// `X: y\nContent-Length: 35` as one field: it frames the request without a body,
/// and the body as a request of its own, which the worker would then take in as
/// this one's body — a request smuggled past that peer (strict parsers, llhttp
/// among them, refuse such a head). So a bare LF anywhere in a request head is
/// refused (400, close), as it is in a chunked body.
///
/// Each line's end is looked at where httparse found it, not byte by byte (which
/// cost some 360 instructions a small request): the request line's (its first LF,
/// `line_end`), each field line's (the two bytes before the next field's name), and
/// the last field line's with the empty line's (the head ends in CRLF CRLF). Empty
/// lines before the request line, which httparse skips, are rare: such a head has
/// its CRs and LFs counted (httparse takes a CR only as the start of a CRLF, so
/// as many of each means no bare LF).
fn lines_end_in_crlf(buf: &[u8], head_len: usize, line_end: usize, fields: &[HeaderField]) -> bool {
    let head = &buf[..head_len];
    if matches!(head.first(), Some(b'\r' | b'\n')) {
        let (cr, lf) = head.iter().fold((0usize, 0usize), |(cr, lf), &b| {
            (cr + usize::from(b == b'\r'), lf + usize::from(b == b'\n'))
        });
        return cr == lf;
    }
    let crlf_before = |at: usize| at >= 2 && head.get(at - 2) == Some(&b'\r');
    crlf_before(line_end)
        && fields.iter().all(|f| crlf_before(f.name.start))
        && head.ends_with(b"\r\n\r\n")
}

/// [`parse_request`] storing the header fields in `spare`'s allocation (the
/// previous request's, recycled): a complete head takes it, anything else leaves
/// it for the next try.
pub fn parse_request_reusing(
    buf: &[u8],
    limits: &HeadLimits,
    spare: &mut Vec<HeaderField>,
) -> Result<Option<RequestHead>, RequestError> {
    // The request line: its end must come within the limit (the line itself, its
    // CRLF not counted: a line of exactly `max_request_line` bytes is taken).
    let line_end = match buf
        .iter()
        .take(limits.max_request_line + 2)
        .position(|b| *b == b'\n')
    {
        Some(i) => i + 1,
        None if buf.len() > limits.max_request_line + 1 => return Err(RequestError::UriTooLong),
        None => return Ok(None),
    };
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
    let max = limits.max_headers.min(storage.len());
    let mut req = httparse::Request::new(&mut []);
    let status = req
        .parse_with_uninit_headers(buf, &mut storage[..max])
        .map_err(|e| match e {
            httparse::Error::TooManyHeaders => RequestError::TooManyHeaders,
            httparse::Error::Version if names_a_version(buf) => RequestError::UnsupportedVersion,
            // Not a request line at all (a PROXY protocol header sent to a worker
            // without `[worker] proxy_protocol`, say).
            httparse::Error::Version => RequestError::Malformed("invalid request line"),
            httparse::Error::HeaderName => RequestError::Malformed("invalid header name"),
            httparse::Error::HeaderValue => RequestError::Malformed("invalid header value"),
            httparse::Error::NewLine => RequestError::Malformed("invalid line ending"),
            httparse::Error::Token => RequestError::Malformed("invalid method or target"),
            httparse::Error::Status => RequestError::Malformed("invalid status"),
        })?;
    let head_len = match status {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => {
            if buf.len() - line_end > limits.max_header_bytes {
                return Err(RequestError::HeadersTooLarge);
            }
            return Ok(None);
        }
    };
    if head_len - line_end > limits.max_header_bytes {
        return Err(RequestError::HeadersTooLarge);
    }
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Err(RequestError::Malformed("incomplete request line"));
    };
    let version = if version == 1 {
        Version::Http11
    } else {
        Version::Http10
    };
    let mut headers = std::mem::take(spare);
    fields(buf, req.headers, &mut headers);
    if !lines_end_in_crlf(buf, head_len, line_end, &headers) {
        *spare = headers;
        return Err(RequestError::Malformed("a line ending in a bare LF"));
    }

    let mut scan = Scan::default();
    let mut host = None;
    let mut host_count = 0;
    let mut expect_continue = false;
    for field in &headers {
        scan.header(buf, field);
        let name = &buf[field.name.clone()];
        if name_is(name, "host") {
            host_count += 1;
            host = Some(field.value.clone());
        } else if name_is(name, "expect") {
            if buf[field.value.clone()].eq_ignore_ascii_case(b"100-continue") {
                expect_continue = true;
            } else {
                return Err(RequestError::ExpectationFailed);
            }
        }
    }
    if host_count > 1 || (version == Version::Http11 && host_count == 0) {
        return Err(RequestError::BadHost);
    }
    // RFC 9112 §3.2: a `Host` value that is not an authority is a 400 (an empty one
    // stands for a target without authority). It is copied to the app and into
    // `X-Forwarded-Host`, and routes wildcard circuits.
    if let Some(h) = &host {
        let value = buf[h.clone()].trim_ascii();
        if !value.is_empty() && Authority::parse(value).is_none() {
            return Err(RequestError::BadHost);
        }
    }
    let target = request_target(buf, offset(buf, path.as_bytes()), method, host.as_ref())?;
    if scan.bad_content_length {
        return Err(RequestError::InvalidContentLength);
    }
    let framing = if scan.has_te {
        if scan.has_content_length {
            return Err(RequestError::LengthAndTransferEncoding);
        }
        if version == Version::Http10 {
            return Err(RequestError::BadTransferEncoding);
        }
        match scan.te_state(buf) {
            TeState::Chunked => BodyFraming::Chunked,
            TeState::ChunkedAfterOthers => return Err(RequestError::UnsupportedTransferCoding),
            TeState::NotChunked | TeState::ChunkedTwice => {
                return Err(RequestError::BadTransferEncoding)
            }
        }
    } else {
        BodyFraming::Length(scan.content_length.unwrap_or(0))
    };
    let keep_alive = match version {
        Version::Http11 => !scan.conn_close,
        Version::Http10 => scan.conn_keep_alive && !scan.conn_close,
    };
    // A server ignores `Upgrade` in an HTTP/1.0 request (RFC 9110 §7.8): forwarded as
    // HTTP/1.1, it would ask the app for a switch the client cannot make.
    // Nor is one that offers nothing the worker passes on ([`upgrade_offers`]).
    let upgrade = if scan.conn_upgrade && version == Version::Http11 {
        scan.upgrade
            .filter(|u| upgrade_offers(&buf[u.clone()]).next().is_some())
    } else {
        None
    };
    Ok(Some(RequestHead {
        method: Method::from_token(method),
        method_raw: offset(buf, method.as_bytes()),
        target,
        version,
        headers,
        head_len,
        framing,
        keep_alive,
        // RFC 9110 §10.1.1: a 100-continue expectation in an HTTP/1.0 request is
        // ignored (no 1xx may go to an HTTP/1.0 client).
        expect_continue: expect_continue && version == Version::Http11,
        upgrade,
        host,
        connection_tokens: scan.connection_tokens,
        has_content_length: scan.has_content_length,
    }))
}

/// Parses an upstream response head at the start of `buf`, for a request made with
/// `method`. `Ok(None)`: not complete yet.
///
/// A head whose framing is in doubt, though it can still be relayed, is marked not
/// to be kept alive, so the app connection is closed after it rather than reused for
/// another client's request with bytes of this response possibly still to come: an
/// HTTP/1.0 head with `Transfer-Encoding` (RFC 9112 §6.1: the framing is faulty,
/// close after the message), a bodiless response (HEAD, 304) whose length fields
/// conflict (`Content-Length` values that differ or are invalid, or one beside
/// `Transfer-Encoding`), and a 204 that announces a body (RFC 9110 §8.6 and RFC 9112
/// §6.1: a server must not send either field in a 204).
pub fn parse_response(
    buf: &[u8],
    method: Method,
    max_head: usize,
) -> Result<Option<ResponseHead>, ResponseError> {
    parse_response_reusing(buf, method, max_head, &mut Vec::new())
}

/// [`parse_response`] storing the header fields in `spare`'s allocation (as
/// [`parse_request_reusing`] does).
pub fn parse_response_reusing(
    buf: &[u8],
    method: Method,
    max_head: usize,
    spare: &mut Vec<HeaderField>,
) -> Result<Option<ResponseHead>, ResponseError> {
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
    let mut resp = httparse::Response::new(&mut []);
    let status = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut storage)
        .map_err(|e| match e {
            httparse::Error::TooManyHeaders => ResponseError::HeadTooLarge,
            _ => ResponseError::Malformed("invalid response head"),
        })?;
    let head_len = match status {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial if buf.len() > max_head => {
            return Err(ResponseError::HeadTooLarge)
        }
        httparse::Status::Partial => return Ok(None),
    };
    if head_len > max_head {
        return Err(ResponseError::HeadTooLarge);
    }
    let (Some(code), Some(version)) = (resp.code, resp.version) else {
        return Err(ResponseError::Malformed("incomplete status line"));
    };
    // RFC 9110 §15: a status outside 100..=599 is invalid, and a client is to read
    // it as a 5xx; the relay says so itself (502) rather than pass on a code that
    // some clients and front proxies refuse and others take for success.
    if !(100..=599).contains(&code) {
        return Err(ResponseError::Malformed("status code out of range"));
    }
    let version = if version == 1 {
        Version::Http11
    } else {
        Version::Http10
    };
    // httparse gives a reason phrase with obs-text (or none) as a `""` that is not
    // inside `buf`: the reason is then left out rather than offset from elsewhere.
    let reason = resp
        .reason
        .map(str::as_bytes)
        .filter(|r| {
            let (start, end) = (buf.as_ptr() as usize, buf.as_ptr() as usize + buf.len());
            (start..=end).contains(&(r.as_ptr() as usize)) && r.as_ptr() as usize + r.len() <= end
        })
        .map_or(0..0, |r| offset(buf, r));
    let mut headers = std::mem::take(spare);
    fields(buf, resp.headers, &mut headers);
    let mut scan = Scan::default();
    for field in &headers {
        scan.header(buf, field);
    }
    let bodiless =
        (100..200).contains(&code) || code == 204 || code == 304 || method == Method::Head;
    let framing = if bodiless {
        BodyFraming::Length(0)
    } else if scan.has_te {
        if scan.has_content_length {
            return Err(ResponseError::BadFraming);
        }
        match scan.te_state(buf) {
            TeState::Chunked => BodyFraming::Chunked,
            // Codings other than a single final `chunked` are not relayed: the proxy
            // strips `Transfer-Encoding` as hop-by-hop and could not describe them.
            TeState::ChunkedTwice | TeState::NotChunked | TeState::ChunkedAfterOthers => {
                return Err(ResponseError::BadFraming)
            }
        }
    } else if scan.bad_content_length {
        return Err(ResponseError::BadFraming);
    } else {
        match scan.content_length {
            Some(n) => BodyFraming::Length(n),
            None => BodyFraming::Eof,
        }
    };
    let content_length = scan.content_length.filter(|_| !scan.bad_content_length);
    let framing_in_doubt = (scan.has_te && version == Version::Http10)
        || (bodiless && (scan.bad_content_length || (scan.has_te && scan.has_content_length)))
        || (code == 204 && (scan.has_te || content_length.is_some_and(|n| n > 0)));
    let keep_alive = framing != BodyFraming::Eof
        && !framing_in_doubt
        && match version {
            Version::Http11 => !scan.conn_close,
            Version::Http10 => scan.conn_keep_alive && !scan.conn_close,
        };
    Ok(Some(ResponseHead {
        status: code,
        reason,
        version,
        headers,
        head_len,
        framing,
        keep_alive,
        content_length,
        connection_tokens: scan.connection_tokens,
        upgrade: scan.upgrade,
    }))
}
