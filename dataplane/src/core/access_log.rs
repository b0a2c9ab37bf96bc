//! The per-core access log: one line per finished exchange (JSON or logfmt), batched
//! into a buffer and written at 32 KiB or every reactor tick.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use appproxy_shared::telemetry::{push_json_escaped, push_logfmt_pair, LogFormat, Rfc3339};

use crate::http::encode::{socket_addr_text, DIGIT_PAIRS};
use appproxy_shared::RequestId;

/// The most of a request's method an access line keeps: the longest registered
/// method is 17 bytes (`UPDATEREDIRECTREF`). An HTTP/2 client names a method once in
/// its HPACK table and then with one byte a stream, so a line holding the whole of a
/// 4,000-byte method made the log ~220 times what the client sent.
pub const METHOD_MAX: usize = 32;

/// The most of a request's target an access line keeps (the query is left out too).
pub const PATH_MAX: usize = 512;

/// One access-log entry.
pub struct AccessEntry<'a> {
    /// The request's ID.
    pub request_id: &'a RequestId,
    /// The circuit served (absent for errors before routing): its ID and user
    /// context (`user_id`, first `session_id`, `endpoint_id`) go on the line.
    pub circuit: Option<&'a appproxy_shared::model::Circuit>,
    /// The client's address: the one a trusted proxy or load balancer named (its
    /// `X-Forwarded-For`, a PROXY protocol header), else the connection's peer.
    pub client: Option<std::net::IpAddr>,
    /// Method token (the line keeps its first [`METHOD_MAX`] bytes).
    pub method: &'a [u8],
    /// Path (query left out: it may hold tokens; the line keeps at most the target's
    /// first [`PATH_MAX`] bytes).
    pub path: &'a [u8],
    /// Status sent.
    pub status: u16,
    /// Request bytes from the client (head and body).
    pub bytes_in: u64,
    /// Response bytes to the client (head and body).
    pub bytes_out: u64,
    /// The app's address.
    pub upstream: Option<SocketAddr>,
    /// When the request head was complete.
    pub started: Instant,
}

impl<'a> AccessEntry<'a> {
    /// The entry of a refusal answered under `request_id` to `client` before any
    /// request head was taken (a head that could not be read, a connection refused
    /// at accept): method and path `-`, no circuit, nothing read, the answer's
    /// `bytes_out`, timed from now.
    pub fn unread(
        request_id: &'a RequestId,
        client: std::net::IpAddr,
        status: u16,
        bytes_out: u64,
    ) -> Self {
        Self {
            request_id,
            circuit: None,
            client: Some(client),
            method: b"-",
            path: b"-",
            status,
            bytes_in: 0,
            bytes_out,
            upstream: None,
            started: Instant::now(),
        }
    }
}

/// The per-core access log: lines are formatted into a buffer and written in batches
/// (at 32 KiB or every reactor tick), so logging stays off the hot path's syscalls.
pub struct AccessLog {
    /// Pending lines.
    buf: RefCell<String>,
    /// Line format.
    format: LogFormat,
    /// Off: nothing is formatted.
    enabled: bool,
    /// This core's CPU, on every line.
    core: usize,
    /// The timestamp's text to the second.
    clock: RefCell<Clock>,
    /// The text of the circuit and the app address the last line named.
    names: RefCell<Names>,
}

const FLUSH_AT: usize = 32 * 1024;

impl AccessLog {
    /// A log for core `core`.
    pub fn new(format: LogFormat, enabled: bool, core: usize) -> Self {
        Self {
            buf: RefCell::new(String::with_capacity(FLUSH_AT + 1024)),
            format,
            enabled,
            core,
            clock: RefCell::default(),
            names: RefCell::default(),
        }
    }

    /// Appends one line; inside a traced request (the span bound by the proxy) the
    /// line carries the span's `trace_id`, `span_id` and `parent_span_id`.
    pub fn record(&self, e: &AccessEntry<'_>, duration: Duration) {
        if !self.enabled {
            return;
        }
        let mut buf = self.buf.borrow_mut();
        self.write_line(&mut buf, e, duration, SystemTime::now());
        if buf.len() >= FLUSH_AT {
            drop(buf);
            self.flush();
        }
    }

    /// Appends the line of `e`, finished at `now`, to `buf`: by hand, field by
    /// field, the text `write!` would give (the tests hold it to that), without the
    /// formatter machinery, which cost a small GET about a third of the worker's own
    /// instructions.
    fn write_line(
        &self,
        buf: &mut String,
        e: &AccessEntry<'_>,
        duration: Duration,
        now: SystemTime,
    ) {
        let span = appproxy_shared::current_span();
        let json = self.format == LogFormat::Json;
        if json {
            buf.push_str("{\"timestamp\":\"");
            self.clock.borrow_mut().push(buf, now);
            buf.push_str("\",\"level\":\"INFO\",\"component\":\"worker\",\"target\":\"access\",\"request_id\":\"");
            buf.push_str(e.request_id.as_str());
            buf.push_str("\",\"core\":");
            push_u64(buf, self.core as u64);
            buf.push(',');
        } else {
            buf.push_str("ts=");
            self.clock.borrow_mut().push(buf, now);
            buf.push_str(" level=info component=worker target=access request_id=");
            buf.push_str(e.request_id.as_str());
            buf.push_str(" core=");
            push_u64(buf, self.core as u64);
        }
        if let Some(s) = span {
            push_text(buf, json, "trace_id", s.trace_id.hex().as_str());
            push_text(buf, json, "span_id", s.span_id.hex().as_str());
            if let Some(p) = s.parent_span_id {
                push_text(buf, json, "parent_span_id", p.hex().as_str());
            }
        }
        let mut names = self.names.borrow_mut();
        if let Some(c) = e.circuit {
            buf.push_str(names.circuit(c, json));
        }
        if let Some(ip) = e.client {
            buf.push_str(names.client(ip, json));
        }
        let method = lossy(&e.method[..e.method.len().min(METHOD_MAX)]);
        let path = lossy(&e.path[..e.path.len().min(PATH_MAX)]);
        let path = path.split('?').next().unwrap_or("");
        if json {
            buf.push_str("\"method\":\"");
            push_json_escaped(buf, &method);
            buf.push_str("\",\"path\":\"");
            push_json_escaped(buf, path);
            buf.push_str("\",\"status\":");
            push_u64(buf, u64::from(e.status));
            buf.push_str(",\"bytes_in\":");
            push_u64(buf, e.bytes_in);
            buf.push_str(",\"bytes_out\":");
            push_u64(buf, e.bytes_out);
            buf.push(',');
        } else {
            push_logfmt_pair(buf, "method", &method);
            push_logfmt_pair(buf, "path", path);
            buf.push_str(" status=");
            push_u64(buf, u64::from(e.status));
            buf.push_str(" bytes_in=");
            push_u64(buf, e.bytes_in);
            buf.push_str(" bytes_out=");
            push_u64(buf, e.bytes_out);
        }
        if let Some(u) = e.upstream {
            buf.push_str(names.upstream(u, json));
        }
        let duration_us = duration.as_micros() as u64;
        if json {
            buf.push_str("\"duration_us\":");
            push_u64(buf, duration_us);
            buf.push_str("}\n");
        } else {
            buf.push_str(" duration_us=");
            push_u64(buf, duration_us);
            buf.push('\n');
        }
    }

    /// Writes the pending lines.
    pub fn flush(&self) {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            return;
        }
        // Handed to the stdout writer, never written here: a stalled reader must not
        // stall the core (`logout`).
        let lines = std::mem::replace(&mut *buf, String::with_capacity(FLUSH_AT + 1024));
        appproxy_shared::logout::write(lines.into_bytes());
    }
}

/// Appends `key` and its `value` (which needs no escape) as a field of the line.
fn push_text(buf: &mut String, json: bool, key: &str, value: &str) {
    if json {
        buf.push('"');
        buf.push_str(key);
        buf.push_str("\":\"");
        buf.push_str(value);
        buf.push_str("\",");
    } else {
        buf.push(' ');
        buf.push_str(key);
        buf.push('=');
        buf.push_str(value);
    }
}

/// `bytes` as text, borrowed when they are UTF-8 (a method and a path nearly always
/// are: ASCII), each invalid sequence replaced by U+FFFD otherwise: what
/// `String::from_utf8_lossy` gives, with `from_utf8`'s check first, about half the
/// instructions of its chunk-by-chunk walk on a line's short ASCII texts.
fn lossy(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// The fields the last line wrote for its circuit and for its app's address, kept
/// with what they were written from: a core's lines mostly name the same few
/// circuits and apps, and formatting their UUIDs and address for every line cost a
/// small GET about 500 of its 17,300 instructions. A line whose circuit or address
/// differs in anything written writes its fields anew.
#[derive(Default)]
struct Names {
    /// The circuit's ID, user, first session and endpoint, and their fields.
    circuit: Option<(CircuitKey, String)>,
    /// The app's address and its field.
    upstream: Option<(SocketAddr, String)>,
    /// The client's address and its field.
    client: Option<(std::net::IpAddr, String)>,
}

/// What a circuit's fields on a line are written from.
type CircuitKey = (
    uuid::Uuid,
    Option<uuid::Uuid>,
    Option<uuid::Uuid>,
    Option<uuid::Uuid>,
);

impl Names {
    /// The fields naming `c` (`circuit`, and `user_id`, `session_id`, `endpoint_id`
    /// when it has them).
    fn circuit(&mut self, c: &appproxy_shared::model::Circuit, json: bool) -> &str {
        let key = (
            c.id,
            c.user_id,
            c.session_ids.first().copied(),
            c.endpoint_id,
        );
        kept(&mut self.circuit, key, |text| {
            let mut uuid = uuid::Uuid::encode_buffer();
            let (id, user, session, endpoint) = key;
            push_text(
                text,
                json,
                "circuit",
                id.hyphenated().encode_lower(&mut uuid),
            );
            for (name, id) in [
                ("user_id", user),
                ("session_id", session),
                ("endpoint_id", endpoint),
            ] {
                if let Some(id) = id {
                    push_text(text, json, name, id.hyphenated().encode_lower(&mut uuid));
                }
            }
        })
    }

    /// The `client` field naming `ip`.
    fn client(&mut self, ip: std::net::IpAddr, json: bool) -> &str {
        kept(&mut self.client, ip, |text| {
            let (at, len) = crate::http::encode::ip_text(ip);
            let ip = std::str::from_utf8(&at[..usize::from(len)]).unwrap_or("");
            push_text(text, json, "client", ip);
        })
    }

    /// The `upstream` field naming `addr`.
    fn upstream(&mut self, addr: SocketAddr, json: bool) -> &str {
        kept(&mut self.upstream, addr, |text| {
            let (at, len) = socket_addr_text(addr);
            let addr = std::str::from_utf8(&at[..len]).unwrap_or("");
            push_text(text, json, "upstream", addr);
        })
    }
}

/// The text `slot` keeps for `key`, written anew by `write` when the slot kept
/// another key's (or none).
fn kept<K: PartialEq>(
    slot: &mut Option<(K, String)>,
    key: K,
    write: impl FnOnce(&mut String),
) -> &str {
    if slot.as_ref().is_none_or(|(k, _)| *k != key) {
        let mut text = String::new();
        write(&mut text);
        *slot = Some((key, text));
    }
    slot.as_ref().map_or("", |(_, text)| text)
}

/// The timestamp's text up to its second, kept for the second it names: the lines of
/// one second share it, and each adds only its microseconds (RFC 3339, as
/// [`Rfc3339`] writes it).
#[derive(Default)]
struct Clock {
    /// The second `text` names, in seconds since the epoch.
    second: Option<u64>,
    /// `YYYY-MM-DDTHH:MM:SS`.
    text: String,
}

impl Clock {
    /// Appends `now` as [`Rfc3339`] writes it.
    fn push(&mut self, buf: &mut String, now: SystemTime) {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let second = since.as_secs();
        if self.second != Some(second) {
            use std::fmt::Write as _;
            self.text.clear();
            let _ = write!(
                self.text,
                "{}",
                Rfc3339(UNIX_EPOCH + Duration::from_secs(second))
            );
            if let Some(dot) = self.text.rfind('.') {
                self.text.truncate(dot);
            }
            self.second = Some(second);
        }
        buf.push_str(&self.text);
        buf.push('.');
        let micros = since.subsec_micros() as usize;
        push_pair(buf, micros / 10_000);
        push_pair(buf, micros / 100 % 100);
        push_pair(buf, micros % 100);
        buf.push('Z');
    }
}

/// [`DIGIT_PAIRS`] as text: a line takes its digits from it whole, two at a time,
/// with no check or conversion per digit.
const PAIRS: &str = match std::str::from_utf8(&DIGIT_PAIRS) {
    Ok(text) => text,
    Err(_) => panic!("digits are ASCII"),
};

/// Appends the two digits of `pair` (below 100), a leading zero kept.
fn push_pair(buf: &mut String, pair: usize) {
    let at = pair % 100 * 2;
    buf.push_str(&PAIRS[at..at + 2]);
}

/// Appends the decimal form of `n`, two digits per division.
fn push_u64(buf: &mut String, mut n: u64) {
    let mut pairs = [0u8; 10];
    let mut k = 0;
    while n >= 100 {
        pairs[k] = (n % 100) as u8;
        n /= 100;
        k += 1;
    }
    if n >= 10 {
        push_pair(buf, n as usize);
    } else {
        buf.push(char::from(b'0' + n as u8));
    }
    while k > 0 {
        k -= 1;
        push_pair(buf, usize::from(pairs[k]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use appproxy_shared::model::Circuit;
    use appproxy_shared::{IdVersion, SpanContext};
    use proptest::prelude::*;
    use std::net::{Ipv6Addr, SocketAddrV6};

    /// The line as the formatter wrote it before the line was written by hand: the
    /// oracle `write_line` must equal, byte for byte.
    fn oracle(log: &AccessLog, e: &AccessEntry<'_>, duration: Duration, now: SystemTime) -> String {
        use std::fmt::Write as _;
        let mut buf = String::new();
        let span = appproxy_shared::current_span();
        let trace = span.map(|s| (s.trace_id.hex(), s.span_id.hex()));
        let parent = span.and_then(|s| s.parent_span_id).map(|p| p.hex());
        let user = e.circuit.and_then(|c| c.user_id);
        let session = e.circuit.and_then(|c| c.session_ids.first());
        let endpoint = e.circuit.and_then(|c| c.endpoint_id);
        let duration_us = duration.as_micros() as u64;
        let ts = Rfc3339(now);
        // What a line keeps of each: the first bytes, as the writer's cut.
        let method = String::from_utf8_lossy(e.method.get(..METHOD_MAX).unwrap_or(e.method));
        let path = String::from_utf8_lossy(e.path.get(..PATH_MAX).unwrap_or(e.path));
        let path = path.split('?').next().unwrap_or("");
        let circuit = e.circuit.map(|c| c.id.to_string());
        let upstream = e.upstream.map(|a| a.to_string());
        let client = e.client.map(|ip| ip.to_string());
        match log.format {
            LogFormat::Json => {
                let _ = write!(
                    buf,
                    "{{\"timestamp\":\"{ts}\",\"level\":\"INFO\",\"component\":\"worker\",\"target\":\"access\",\"request_id\":\"{}\",\"core\":{},",
                    e.request_id, log.core
                );
                if let Some((t, s)) = &trace {
                    let _ = write!(
                        buf,
                        "\"trace_id\":\"{}\",\"span_id\":\"{}\",",
                        t.as_str(),
                        s.as_str()
                    );
                }
                if let Some(p) = &parent {
                    let _ = write!(buf, "\"parent_span_id\":\"{}\",", p.as_str());
                }
                if let Some(c) = &circuit {
                    let _ = write!(buf, "\"circuit\":\"{c}\",");
                }
                if let Some(u) = user {
                    let _ = write!(buf, "\"user_id\":\"{u}\",");
                }
                if let Some(s) = session {
                    let _ = write!(buf, "\"session_id\":\"{s}\",");
                }
                if let Some(ep) = endpoint {
                    let _ = write!(buf, "\"endpoint_id\":\"{ep}\",");
                }
                if let Some(c) = &client {
                    let _ = write!(buf, "\"client\":\"{c}\",");
                }
                buf.push_str("\"method\":\"");
                push_json_escaped(&mut buf, &method);
                buf.push_str("\",\"path\":\"");
                push_json_escaped(&mut buf, path);
                let _ = write!(
                    buf,
                    "\",\"status\":{},\"bytes_in\":{},\"bytes_out\":{},",
                    e.status, e.bytes_in, e.bytes_out
                );
                if let Some(u) = &upstream {
                    let _ = write!(buf, "\"upstream\":\"{u}\",");
                }
                let _ = writeln!(buf, "\"duration_us\":{duration_us}}}");
            }
            LogFormat::Logfmt => {
                let _ = write!(
                    buf,
                    "ts={ts} level=info component=worker target=access request_id={} core={}",
                    e.request_id, log.core
                );
                if let Some((t, s)) = &trace {
                    let _ = write!(buf, " trace_id={} span_id={}", t.as_str(), s.as_str());
                }
                if let Some(p) = &parent {
                    let _ = write!(buf, " parent_span_id={}", p.as_str());
                }
                if let Some(c) = &circuit {
                    let _ = write!(buf, " circuit={c}");
                }
                if let Some(u) = user {
                    let _ = write!(buf, " user_id={u}");
                }
                if let Some(s) = session {
                    let _ = write!(buf, " session_id={s}");
                }
                if let Some(ep) = endpoint {
                    let _ = write!(buf, " endpoint_id={ep}");
                }
                if let Some(c) = &client {
                    let _ = write!(buf, " client={c}");
                }
                push_logfmt_pair(&mut buf, "method", &method);
                push_logfmt_pair(&mut buf, "path", path);
                let _ = write!(
                    buf,
                    " status={} bytes_in={} bytes_out={}",
                    e.status, e.bytes_in, e.bytes_out
                );
                if let Some(u) = &upstream {
                    let _ = write!(buf, " upstream={u}");
                }
                let _ = writeln!(buf, " duration_us={duration_us}");
            }
        }
        buf
    }

    fn circuit(user: bool, session: bool, endpoint: bool) -> Circuit {
        let mut c: Circuit = serde_json::from_value(serde_json::json!({
            "id": uuid::Uuid::new_v4(),
        }))
        .expect("a circuit");
        c.user_id = user.then(uuid::Uuid::new_v4);
        c.session_ids = if session {
            vec![uuid::Uuid::new_v4(), uuid::Uuid::new_v4()]
        } else {
            vec![]
        };
        c.endpoint_id = endpoint.then(uuid::Uuid::new_v4);
        c
    }

    fn upstream() -> impl Strategy<Value = Option<SocketAddr>> {
        prop_oneof![
            Just(None),
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| Some(SocketAddr::from((ip, port)))),
            (any::<[u16; 8]>(), any::<u16>(), 0..3u32).prop_map(|(ip, port, scope)| Some(
                SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, scope))
            )),
        ]
    }

    /// Bytes with what a path may hold and what needs escaping or replacing.
    fn text() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            prop_oneof![
                Just(b'"'),
                Just(b'\\'),
                Just(b'?'),
                Just(b' '),
                Just(b'='),
                0u8..0x20,
                Just(0x7f),
                0x80u8..=0xff,
                Just(0xc2),
                b'a'..=b'z',
                Just(b'/'),
            ],
            0..40,
        )
    }

    fn decimal_text(n: u64) -> String {
        let mut buf = String::new();
        push_u64(&mut buf, n);
        buf
    }

    /// Every width, and each side of every change of width, as `Display` writes it.
    #[test]
    fn numbers_are_their_display_form_at_every_width() {
        for n in crate::http::encode::width_edges() {
            assert_eq!(decimal_text(n), n.to_string());
        }
        for pair in 0..100 {
            let mut buf = String::new();
            push_pair(&mut buf, pair);
            assert_eq!(buf, format!("{pair:02}"));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        /// Numbers against the standard library's `Display`, at every magnitude.
        #[test]
        fn numbers_match_the_standard_library(n in any::<u64>(), shift in 0..64u32) {
            let n = n >> shift;
            prop_assert_eq!(decimal_text(n), n.to_string());
        }

        /// Every line, in both formats, equals the formatter's, whatever the entry,
        /// the span bound and the time (seconds kept across calls: the same second
        /// again, the next one, or any).
        #[test]
        fn each_line_is_the_formatters(
            json in any::<bool>(),
            core in 0usize..300,
            method in text(),
            path in text(),
            status in any::<u16>(),
            bytes_in in any::<u64>(),
            bytes_out in any::<u64>(),
            upstream in upstream(),
            client in upstream(),
            other_client in upstream(),
            with_circuit in any::<bool>(),
            parts in any::<(bool, bool, bool)>(),
            span in 0..3u8,
            duration_us in any::<u32>(),
            other_upstream in upstream(),
            times in prop::collection::vec(
                (0u64..4_000_000_000, 0u32..1_000_000_000, 0..3u8, any::<(bool, bool)>()),
                1..6,
            ),
        ) {
            let format = if json { LogFormat::Json } else { LogFormat::Logfmt };
            let log = AccessLog::new(format, true, core);
            let id = RequestId::generate(IdVersion::V4);
            let c = circuit(parts.0, parts.1, parts.2);
            // The same circuit with its session changed, as a route change makes it.
            let mut moved = c.clone();
            moved.session_ids.insert(0, uuid::Uuid::new_v4());
            let mut e = AccessEntry {
                request_id: &id,
                circuit: with_circuit.then_some(&c),
                client: client.map(|a| a.ip()),
                method: &method,
                path: &path,
                status,
                bytes_in,
                bytes_out,
                upstream,
                started: Instant::now(),
            };
            let root = SpanContext::root(Some(&id));
            let span = match span {
                0 => None,
                1 => Some(root),
                _ => Some(root.child()),
            };
            let duration = Duration::from_micros(u64::from(duration_us));
            let mut last = UNIX_EPOCH;
            // Lines of one log name the circuit and the app, or others: each line
            // writes the fields of its own.
            for (secs, nanos, how, (other_circuit, other_app)) in times {
                e.circuit = with_circuit.then_some(if other_circuit { &moved } else { &c });
                e.upstream = if other_app { other_upstream } else { upstream };
                e.client = if other_app { other_client } else { client }.map(|a| a.ip());
                let now = match how {
                    0 => last + Duration::from_nanos(u64::from(nanos % 1_000)),
                    1 => last + Duration::from_secs(1),
                    _ => UNIX_EPOCH + Duration::new(secs, nanos),
                };
                last = now;
                let (mine, theirs) = appproxy_shared::with_request_context(Some(id), span, || {
                    let mut mine = String::new();
                    log.write_line(&mut mine, &e, duration, now);
                    (mine, oracle(&log, &e, duration, now))
                });
                prop_assert_eq!(mine, theirs);
            }
        }
    }

    /// A time before the epoch is written as the epoch, as `Rfc3339` does.
    #[test]
    fn a_clock_before_the_epoch_writes_the_epoch() {
        let mut buf = String::new();
        Clock::default().push(&mut buf, UNIX_EPOCH - Duration::from_secs(5));
        assert_eq!(buf, "1970-01-01T00:00:00.000000Z");
    }
}
