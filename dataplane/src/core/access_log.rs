//! The per-core access log: one line per finished exchange (JSON or logfmt), batched
//! into a buffer and written at 32 KiB or every reactor tick.

use std::cell::RefCell;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use appproxy_shared::telemetry::{push_json_escaped, push_logfmt_pair, LogFormat, Rfc3339};
use appproxy_shared::RequestId;

/// One access-log entry.
pub struct AccessEntry<'a> {
    /// The request's ID.
    pub request_id: &'a RequestId,
    /// The circuit served (absent for errors before routing): its ID and user
    /// context (`user_id`, first `session_id`, `endpoint_id`) go on the line.
    pub circuit: Option<&'a appproxy_shared::model::Circuit>,
    /// Method token.
    pub method: &'a [u8],
    /// Path (query left out: it may hold tokens).
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
        }
    }

    /// Appends one line; inside a traced request (the span bound by the proxy) the
    /// line carries the span's `trace_id`, `span_id` and `parent_span_id`.
    pub fn record(&self, e: &AccessEntry<'_>, duration: Duration) {
        if !self.enabled {
            return;
        }
        let span = appproxy_shared::current_span();
        let trace = span.map(|s| (s.trace_id.hex(), s.span_id.hex()));
        let parent = span.and_then(|s| s.parent_span_id).map(|p| p.hex());
        let user = e.circuit.and_then(|c| c.user_id);
        let session = e.circuit.and_then(|c| c.session_ids.first());
        let endpoint = e.circuit.and_then(|c| c.endpoint_id);
        let duration_us = duration.as_micros() as u64;
        let ts = Rfc3339(SystemTime::now());
        let method = String::from_utf8_lossy(e.method);
        let path = String::from_utf8_lossy(e.path);
        let path = path.split('?').next().unwrap_or("");
        let circuit = e.circuit.map(|c| c.id.to_string());
        let upstream = e.upstream.map(|a| a.to_string());
        let mut buf = self.buf.borrow_mut();
        use std::fmt::Write as _;
        match self.format {
            LogFormat::Json => {
                let _ = write!(
                    buf,
                    "{{\"timestamp\":\"{ts}\",\"level\":\"INFO\",\"component\":\"worker\",\"target\":\"access\",\"request_id\":\"{}\",\"core\":{},",
                    e.request_id, self.core
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
                    e.request_id, self.core
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
        if buf.len() >= FLUSH_AT {
            drop(buf);
            self.flush();
        }
    }

    /// Writes the pending lines.
    pub fn flush(&self) {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            return;
        }
        let _ = std::io::stdout().lock().write_all(buf.as_bytes());
        buf.clear();
    }
}
