//! Telemetry: one `init` for every binary, JSON-lines or logfmt output, and the layer
//! that stamps the current request ID (and, inside a traced request, `trace_id`,
//! `span_id` and `parent_span_id`) on every event.
//!
//! The formatting layer is written here rather than configured from
//! `tracing_subscriber::fmt` because the request ID must appear on events that have no
//! span of their own: it is read from the context ([`crate::context`]) at the moment
//! the event is emitted, and falls back to a `request_id` field of an enclosing span.

use std::cell::{Cell, RefCell};
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::context::{current_request_id, current_span};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (`jq 'select(.request_id=="…")'`).
    #[default]
    Json,
    /// `key=value` text (`grep request_id=…`).
    Logfmt,
}

/// The `[logging]` table of every component's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// Output format.
    pub format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `info,appproxy_dataplane=debug`.
    pub filter: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            filter: "info".to_owned(),
        }
    }
}

/// The `[telemetry]` table of every component's config: span export over OTLP/HTTP
/// (off unless `otlp_endpoint` is set; see docs/tracing.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP address, `http://host:4318` or `https://host:4318`
    /// (spans are POSTed to `/v1/traces` unless the URL has a path of its own).
    /// Absent: no export.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// The resource's `service.name`; absent: `appproxy-<component>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// Finished spans waiting for the exporter at most; more are dropped and counted
    /// (`appproxy_otlp_spans_dropped_total`), never waited for.
    pub otlp_queue: usize,
    /// Spans per export request at most.
    pub otlp_batch: usize,
    /// A batch is sent this long after its first span at the latest.
    pub otlp_flush_ms: u64,
    /// Time for one export request (connect, send, response head).
    pub otlp_timeout_ms: u64,
    /// Retries of a batch after a failed or refused (429, 502-504) request; then it
    /// is dropped and counted.
    pub otlp_retries: u32,
    /// How export request bodies are compressed (`gzip`, the default, or `none`).
    pub otlp_compression: OtlpCompression,
    /// PEM file of the CA certificates that an `https://` collector's certificate
    /// must chain to (refused with `http://`; without it an `https://` collector is
    /// checked against the system bundle: `SSL_CERT_FILE`, else the usual places).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_ca_file: Option<PathBuf>,
}

impl TelemetryConfig {
    /// The keys without a default, as `--print-default-config` shows them commented
    /// (section, line) under `[telemetry]`.
    pub const OPTIONAL_KEYS: [(&'static str, &'static str); 3] = [
        (
            "telemetry",
            "otlp_endpoint = \"http://127.0.0.1:4318\"  # export spans over OTLP/HTTP (docs/tracing.md); absent: none",
        ),
        (
            "telemetry",
            "service_name = \"appproxy\"  # the resource's service.name (default: appproxy-<component>)",
        ),
        (
            "telemetry",
            "otlp_ca_file = \"/etc/appproxy/otlp-ca.pem\"  # roots for an https:// collector (default: the system bundle)",
        ),
    ];
}

/// `[telemetry] otlp_compression`: the body encoding of OTLP export requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpCompression {
    /// `Content-Encoding: gzip` (every OTLP/HTTP receiver accepts it).
    #[default]
    Gzip,
    /// The protobuf as it is.
    None,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: None,
            otlp_queue: 4096,
            otlp_batch: 512,
            otlp_flush_ms: 1000,
            otlp_timeout_ms: 2000,
            otlp_retries: 2,
            otlp_compression: OtlpCompression::Gzip,
            otlp_ca_file: None,
        }
    }
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The filter directive did not parse.
    #[error("invalid log filter {filter:?}: {reason}")]
    Filter {
        /// The directive as configured.
        filter: String,
        /// What the parser said.
        reason: String,
    },
    /// A global subscriber was already installed.
    #[error("a global log subscriber is already installed")]
    AlreadyInstalled,
    /// The stdout writer thread ([`crate::logout`]) could not be started.
    #[error("cannot start the stdout writer: {0}")]
    Writer(#[from] std::io::Error),
}

/// Installs the global subscriber writing to stdout. A pipe, a socket or a terminal
/// stops taking writes when its reader stalls (a container's log driver): lines go
/// through the writer thread of [`crate::logout`] (started here), so a stalled
/// reader never holds the thread that logs. A regular file takes writes whoever
/// reads it: lines are written at once, each before the answer that follows it.
/// Call [`crate::logout::drain`] before the process exits.
pub fn init(config: &LoggingConfig, component: &'static str) -> Result<(), TelemetryError> {
    let installed = if stdout_is_a_file() {
        tracing::subscriber::set_global_default(subscriber(config, component, std::io::stdout)?)
    } else {
        crate::logout::start()?;
        tracing::subscriber::set_global_default(subscriber(
            config,
            component,
            crate::logout::QueuedStdout,
        )?)
    };
    installed.map_err(|_| TelemetryError::AlreadyInstalled)
}

/// Whether stdout is a regular file (not a pipe, socket, terminal or device).
fn stdout_is_a_file() -> bool {
    rustix::fs::fstat(std::io::stdout()).is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
    })
}

/// Builds a subscriber writing to `writer`; tests use it with
/// `tracing::subscriber::with_default` and an in-memory writer.
pub fn subscriber<W>(
    config: &LoggingConfig,
    component: &'static str,
    writer: W,
) -> Result<impl Subscriber + Send + Sync + 'static, TelemetryError>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(&config.filter).map_err(|e| TelemetryError::Filter {
        filter: config.filter.clone(),
        reason: e.to_string(),
    })?;
    Ok(Registry::default()
        .with(filter)
        .with(LineLayer::new(config.format, component, writer)))
}

/// A field value kept from a span or an event.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// Text (also `Debug`-formatted values).
    Str(String),
    /// A signed integer.
    I64(i64),
    /// An unsigned integer.
    U64(u64),
    /// A float.
    F64(f64),
    /// A boolean.
    Bool(bool),
}

/// The fields recorded on a span, stored in its extensions.
#[derive(Debug, Default)]
struct SpanFields(Vec<(&'static str, FieldValue)>);

/// Collects fields into a list, replacing earlier values of the same name.
struct Collector<'a>(&'a mut Vec<(&'static str, FieldValue)>);

impl Collector<'_> {
    fn put(&mut self, name: &'static str, value: FieldValue) {
        if let Some(slot) = self.0.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = value;
        } else {
            self.0.push((name, value));
        }
    }
}

impl Visit for Collector<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field.name(), FieldValue::Str(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field.name(), FieldValue::Str(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field.name(), FieldValue::I64(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field.name(), FieldValue::U64(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field.name(), FieldValue::F64(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field.name(), FieldValue::Bool(value));
    }
}

/// The layer that formats and writes one line per event.
pub struct LineLayer<W> {
    /// Output format.
    format: LogFormat,
    /// The `component` field on every line (`worker`, `coordinator`, …) unless the
    /// thread names its own ([`set_thread_component`]).
    component: &'static str,
    /// Where lines go.
    writer: W,
}

impl<W> LineLayer<W> {
    /// A layer writing `format` lines tagged with `component` to `writer`.
    pub fn new(format: LogFormat, component: &'static str, writer: W) -> Self {
        Self {
            format,
            component,
            writer,
        }
    }
}

thread_local! {
    /// Reused line buffer, so formatting an event does not allocate a fresh string.
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
    /// The component this thread works for, when it is not the process's own.
    static THREAD_COMPONENT: Cell<Option<&'static str>> = const { Cell::new(None) };
}

/// Names the component the calling thread works for: its lines say `component`
/// instead of the process's (a coordinator embedded in the worker's process runs on
/// threads of its own, and its lines are the coordinator's, not the worker's: the
/// trace tool tells hops apart by component). Lasts for the thread's life.
pub fn set_thread_component(component: &'static str) {
    THREAD_COMPONENT.with(|c| c.set(Some(component)));
}

/// The component the calling thread works for, if it named one
/// ([`set_thread_component`]); `None`: the process's own.
pub fn thread_component() -> Option<&'static str> {
    THREAD_COMPONENT.with(Cell::get)
}

/// The component the calling thread's lines name: its own or `process`.
fn line_component(process: &'static str) -> &'static str {
    thread_component().unwrap_or(process)
}

impl<S, W> Layer<S> for LineLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'a> MakeWriter<'a> + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = SpanFields::default();
        attrs.record(&mut Collector(&mut fields.0));
        span.extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(fields) = ext.get_mut::<SpanFields>() {
            values.record(&mut Collector(&mut fields.0));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Vec::with_capacity(8);
        // Span fields, root first, so the innermost span and the event win on clashes.
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(sf) = span.extensions().get::<SpanFields>() {
                    let mut c = Collector(&mut fields);
                    for (name, value) in &sf.0 {
                        c.put(name, value.clone());
                    }
                }
            }
        }
        event.record(&mut Collector(&mut fields));
        let span_request_id = take_field(&mut fields, "request_id");
        let request_id = current_request_id()
            .map(|id| id.as_str().to_owned())
            .or(span_request_id.map(|v| match v {
                FieldValue::Str(s) => s,
                other => plain(&other),
            }));
        let message = take_field(&mut fields, "message");
        let span = current_span();
        if span.is_some() {
            // The bound span is the truth; same-named fields would only duplicate keys.
            for name in ["trace_id", "span_id", "parent_span_id"] {
                take_field(&mut fields, name);
            }
        }
        let meta = event.metadata();

        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return;
            };
            line.clear();
            let level = meta.level().as_str();
            let ts = Rfc3339(SystemTime::now());
            let component = line_component(self.component);
            match self.format {
                LogFormat::Json => {
                    let _ = write!(line, "{{\"timestamp\":\"{ts}\",\"level\":\"{level}\"");
                    push_json_pair(&mut line, "component", component);
                    push_json_pair(&mut line, "target", meta.target());
                    if let Some(rid) = &request_id {
                        push_json_pair(&mut line, "request_id", rid);
                    }
                    if let Some(sp) = &span {
                        push_json_pair(&mut line, "trace_id", sp.trace_id.hex().as_str());
                        push_json_pair(&mut line, "span_id", sp.span_id.hex().as_str());
                        if let Some(parent) = &sp.parent_span_id {
                            push_json_pair(&mut line, "parent_span_id", parent.hex().as_str());
                        }
                    }
                    if let Some(m) = &message {
                        push_json_pair(&mut line, "message", &plain(m));
                    }
                    for (name, value) in &fields {
                        line.push_str(",\"");
                        push_json_escaped(&mut line, name);
                        line.push_str("\":");
                        push_json_value(&mut line, value);
                    }
                    line.push_str("}\n");
                }
                LogFormat::Logfmt => {
                    let _ = write!(
                        line,
                        "ts={ts} level={} component={}",
                        level.to_ascii_lowercase(),
                        component
                    );
                    push_logfmt_pair(&mut line, "target", meta.target());
                    if let Some(rid) = &request_id {
                        push_logfmt_pair(&mut line, "request_id", rid);
                    }
                    if let Some(sp) = &span {
                        push_logfmt_pair(&mut line, "trace_id", sp.trace_id.hex().as_str());
                        push_logfmt_pair(&mut line, "span_id", sp.span_id.hex().as_str());
                        if let Some(parent) = &sp.parent_span_id {
                            push_logfmt_pair(&mut line, "parent_span_id", parent.hex().as_str());
                        }
                    }
                    if let Some(m) = &message {
                        push_logfmt_pair(&mut line, "msg", &plain(m));
                    }
                    for (name, value) in &fields {
                        push_logfmt_pair(&mut line, name, &plain(value));
                    }
                    line.push('\n');
                }
            }
            let mut w = self.writer.make_writer_for(meta);
            let _ = w.write_all(line.as_bytes());
        });
    }
}

/// Removes and returns the field called `name`.
fn take_field(fields: &mut Vec<(&'static str, FieldValue)>, name: &str) -> Option<FieldValue> {
    let pos = fields.iter().position(|(n, _)| *n == name)?;
    Some(fields.remove(pos).1)
}

/// A value as plain text.
fn plain(value: &FieldValue) -> String {
    match value {
        FieldValue::Str(s) => s.clone(),
        FieldValue::I64(v) => v.to_string(),
        FieldValue::U64(v) => v.to_string(),
        FieldValue::F64(v) => v.to_string(),
        FieldValue::Bool(v) => v.to_string(),
    }
}

fn push_json_pair(line: &mut String, key: &str, value: &str) {
    line.push_str(",\"");
    push_json_escaped(line, key);
    line.push_str("\":\"");
    push_json_escaped(line, value);
    line.push('"');
}

fn push_json_value(line: &mut String, value: &FieldValue) {
    match value {
        FieldValue::Str(s) => {
            line.push('"');
            push_json_escaped(line, s);
            line.push('"');
        }
        FieldValue::I64(v) => {
            let _ = write!(line, "{v}");
        }
        FieldValue::U64(v) => {
            let _ = write!(line, "{v}");
        }
        FieldValue::F64(v) if v.is_finite() => {
            let _ = write!(line, "{v}");
        }
        FieldValue::F64(v) => {
            let _ = write!(line, "\"{v}\"");
        }
        FieldValue::Bool(v) => {
            let _ = write!(line, "{v}");
        }
    }
}

/// Whether `c` changes how the text around it is shown: DEL and the C1 controls,
/// the characters that show as nothing (zero-width spaces and joiners, the soft
/// hyphen, fillers, variation selectors, invisible operators, the tags that can
/// carry a whole hidden text: two paths that differ by one look the same), the line
/// and paragraph separators, and the bidirectional marks, embeddings, overrides and
/// isolates. A log line writes them escaped (`\uXXXX`, which a JSON
/// reader decodes back), so that a client's path or header cannot disguise itself,
/// or the rest of its line, in an operator's terminal or editor (a right-to-left
/// override reverses what follows it; a C1 CSI begins a terminal command).
pub fn hides_text(c: char) -> bool {
    matches!(
        c,
        '\u{7f}'..='\u{9f}'
            | '\u{ad}'
            | '\u{34f}'
            | '\u{61c}'
            | '\u{115f}'..='\u{1160}'
            | '\u{17b4}'..='\u{17b5}'
            | '\u{180b}'..='\u{180f}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}'
            | '\u{3164}'
            | '\u{fe00}'..='\u{fe0f}'
            | '\u{feff}'
            | '\u{ffa0}'
            | '\u{fff0}'..='\u{fffb}'
            | '\u{e0000}'..='\u{e007f}'
    )
}

/// The bytes where [`push_json_escaped`] stops to look: `"`, `\`, the C0 controls,
/// DEL, and the lead bytes of every character [`hides_text`] names (0xC2: U+0080 to
/// U+00BF, 0xCD: U+0340 to U+037F, 0xD8: U+0600 to U+063F, 0xE1: U+1000 to U+1FFF,
/// 0xE2: U+2000 to U+2FFF, 0xE3: U+3000 to U+3FFF, 0xEF: U+F000 to U+FFFF, 0xF3:
/// U+C0000 to U+FFFFF). Lead bytes and ASCII are never inside a character, so every
/// stop is at a character's start.
const JSON_STOPS: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = true;
        b += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t[0x7f] = true;
    t[0xc2] = true;
    t[0xcd] = true;
    t[0xd8] = true;
    t[0xe1] = true;
    t[0xe2] = true;
    t[0xe3] = true;
    t[0xef] = true;
    t[0xf3] = true;
    t
};

/// Appends `s` escaped for a JSON string body: `"` and `\`, the controls, and the
/// characters that [hide text](hides_text).
pub fn push_json_escaped(line: &mut String, s: &str) {
    // Runs that need no escape go in whole; the scan stops only at a character's
    // first byte (`JSON_STOPS`), and most stops of non-ASCII text are kept as they are.
    let mut rest = s;
    while let Some(at) = rest.bytes().position(|b| JSON_STOPS[usize::from(b)]) {
        line.push_str(&rest[..at]);
        let Some(c) = rest[at..].chars().next() else {
            break;
        };
        push_escaped_char(line, c);
        rest = &rest[at + c.len_utf8()..];
    }
    line.push_str(rest);
}

/// Appends `c` as a JSON string (and a quoted logfmt value) holds it: `"` and `\`
/// escaped, the controls and the characters that [hide text](hides_text) as
/// `\uXXXX` (a tag, past the Basic Multilingual Plane, as its UTF-16 surrogate
/// pair, as JSON writes it), others as they are.
fn push_escaped_char(line: &mut String, c: char) {
    fn push_u16(line: &mut String, v: u32) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        line.push_str("\\u");
        for shift in [12, 8, 4, 0] {
            line.push(char::from(HEX[((v >> shift) & 0xf) as usize]));
        }
    }
    match c {
        '"' => line.push_str("\\\""),
        '\\' => line.push_str("\\\\"),
        '\n' => line.push_str("\\n"),
        '\r' => line.push_str("\\r"),
        '\t' => line.push_str("\\t"),
        c if c.is_control() || hides_text(c) => {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                push_u16(line, u32::from(*unit));
            }
        }
        c => line.push(c),
    }
}

/// Appends ` key=value`, quoting the value when it needs it: empty, or holding a
/// space of any kind (a no-break or ideographic one too: left bare, a client's
/// path `/login\u{a0}ok\u{a0}200` read as `path=/login` and loose words, to a
/// reader and to a parser splitting on Unicode whitespace; an outside tester's
/// find), `=`, `"`, `\`, a control or a character that [hides text](hides_text).
pub fn push_logfmt_pair(line: &mut String, key: &str, value: &str) {
    line.push(' ');
    line.push_str(key);
    line.push('=');
    let needs_quotes = value.is_empty()
        || value.chars().any(|c| {
            c.is_whitespace()
                || c == '='
                || c == '"'
                || c == '\\'
                || c.is_control()
                || hides_text(c)
        });
    if !needs_quotes {
        line.push_str(value);
        return;
    }
    line.push('"');
    for c in value.chars() {
        push_escaped_char(line, c);
    }
    line.push('"');
}

/// A UTC timestamp printed as RFC 3339 with microseconds.
#[derive(Clone, Copy)]
pub struct Rfc3339(pub SystemTime);

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let micros = since.subsec_micros();
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
            rem / 3600,
            (rem % 3600) / 60,
            rem % 60
        )
    }
}

/// Converts days since 1970-01-01 to a (year, month, day) civil date (H. Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy as _;
    use std::time::Duration;

    proptest::proptest! {
        /// Escaping by runs writes what escaping character by character wrote.
        #[test]
        fn json_escaping_by_runs_matches_by_characters(
            chars in proptest::collection::vec(
                proptest::prop_oneof![
                    (0u8..0x80).prop_map(char::from),
                    proptest::arbitrary::any::<char>(),
                    // Each lead byte the scan stops at, harmful or not.
                    proptest::sample::select(vec![
                        '\u{7f}', '\u{80}', '\u{9b}', '\u{9f}', '\u{a0}', '\u{e9}', '\u{61c}',
                        '\u{600}', '\u{200b}', '\u{200e}', '\u{200f}', '\u{2014}', '\u{2028}',
                        '\u{2029}', '\u{202a}', '\u{202e}', '\u{202f}', '\u{2066}', '\u{2069}',
                        '\u{206a}', '\u{2fff}', '\u{200a}', '\u{200b}', '\u{2060}', '\u{2064}',
                        '\u{2065}', '\u{feff}', '\u{fefe}', '\u{f000}', '\u{ffff}', '\u{ff21}',
                        '\u{ad}', '\u{34f}', '\u{350}', '\u{115f}', '\u{17b4}', '\u{180e}',
                        '\u{3164}', '\u{3042}', '\u{fe0f}', '\u{ffa0}', '\u{fff9}', '\u{fffc}',
                        '\u{e0001}', '\u{e0041}', '\u{e007f}', '\u{e0080}', '\u{f0000}',
                        '\u{1f600}',
                    ]),
                ],
                0..40,
            )
        ) {
            let s: String = chars.into_iter().collect();
            let mut by_chars = String::new();
            for c in s.chars() {
                match c {
                    '"' => by_chars.push_str("\\\""),
                    '\\' => by_chars.push_str("\\\\"),
                    '\n' => by_chars.push_str("\\n"),
                    '\r' => by_chars.push_str("\\r"),
                    '\t' => by_chars.push_str("\\t"),
                    c if (c as u32) < 0x20 || hides_text(c) => {
                        let mut units = [0u16; 2];
                        for unit in c.encode_utf16(&mut units) {
                            by_chars.push_str(&format!("\\u{unit:04x}"));
                        }
                    }
                    c => by_chars.push(c),
                }
            }
            let mut by_runs = String::from("kept ");
            push_json_escaped(&mut by_runs, &s);
            proptest::prop_assert_eq!(by_runs, format!("kept {by_chars}"));
        }
    }

    #[test]
    fn timestamps() {
        let t = UNIX_EPOCH + Duration::from_micros(1_755_650_000_123_456);
        assert_eq!(Rfc3339(t).to_string(), "2025-08-20T00:33:20.123456Z");
        assert_eq!(
            Rfc3339(UNIX_EPOCH).to_string(),
            "1970-01-01T00:00:00.000000Z"
        );
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(Rfc3339(leap).to_string(), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn logfmt_quoting() {
        let mut s = String::new();
        push_logfmt_pair(&mut s, "a", "plain");
        push_logfmt_pair(&mut s, "b", "has space");
        push_logfmt_pair(&mut s, "c", "");
        push_logfmt_pair(&mut s, "d", "q\"uote\nline");
        assert_eq!(s, " a=plain b=\"has space\" c=\"\" d=\"q\\\"uote\\nline\"");
        let mut s = String::new();
        push_logfmt_pair(&mut s, "path", "/a\u{202e}txt.exe\u{9b}31m\u{2028}é");
        assert_eq!(s, " path=\"/a\\u202etxt.exe\\u009b31m\\u2028é\"");
        // Every kind of space is quoted, not only the ASCII one.
        for space in [
            '\u{a0}', '\u{1680}', '\u{2003}', '\u{202f}', '\u{205f}', '\u{3000}',
        ] {
            let mut s = String::new();
            push_logfmt_pair(&mut s, "path", &format!("/login{space}ok{space}200"));
            assert_eq!(
                s,
                format!(" path=\"/login{space}ok{space}200\""),
                "{space:?}"
            );
        }
    }

    #[test]
    fn text_hiding_characters_are_escaped_and_read_back() {
        let raw = "/a\u{202e}gpj.exe\u{9b}2J\u{2028}\u{2066}x\u{2069}\u{7f}\u{200b}\u{feff} — é ｆ/ad\u{ad}min\u{e0041}あ";
        let mut line = String::from("{\"path\":\"");
        push_json_escaped(&mut line, raw);
        line.push_str("\"}");
        assert_eq!(
            line,
            "{\"path\":\"/a\\u202egpj.exe\\u009b2J\\u2028\\u2066x\\u2069\\u007f\\u200b\\ufeff — é ｆ/ad\\u00admin\\udb40\\udc41あ\"}"
        );
        assert!(line.chars().all(|c| !hides_text(c)));
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(v["path"], raw);
    }
}
