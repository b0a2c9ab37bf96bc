//! The worker's hop of a distributed trace (W3C Trace Context): per request, the
//! span resolved from the client's `traceparent` (or from the request ID when that is
//! a UUID and no valid `traceparent` came), without allocating.
//!
//! The proxy binds the span around the request (so every line logged meanwhile and the
//! access line carry `trace_id`, `span_id`, `parent_span_id`), sends
//! `traceparent: 00-<trace>-<worker span>-<flags>` to the app in place of the
//! client's, and keeps the client's `tracestate` lines unchanged when its
//! `traceparent` was valid. Rules and the relation to request IDs: docs/tracing.md.
//!
//! With OTLP export on (`[telemetry] otlp_endpoint`), [`export`] hands each finished
//! hop to the exporter thread as a fixed-size record (a bounded queue slot, dropped
//! and counted when full; no allocation on the core).

use appproxy_shared::trace::{InvalidTraceParent, SpanContext, TraceParent, TRACEPARENT};
use appproxy_shared::RequestId;

use crate::http::parse::{name_is, HeaderField};

/// The trace position of one request on the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    /// The worker's span: the client's trace and span as parent, or a new root.
    pub span: SpanContext,
    /// Whether the client's `tracestate` goes on to the app (only with a valid
    /// `traceparent`; a restarted trace drops it).
    pub keep_tracestate: bool,
    /// Why the client's `traceparent` was ignored, for [`Hop::log_rejection`].
    pub rejected: Option<Rejected>,
}

/// Why a client's `traceparent` was ignored (never its value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// The one line broke the spec's rules.
    Invalid(InvalidTraceParent),
    /// More than one `traceparent` line.
    Repeated,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejected::Invalid(e) => e.fmt(f),
            Rejected::Repeated => f.write_str("more than one traceparent"),
        }
    }
}

impl Hop {
    /// Resolves the hop of a request whose header fields index into `buf`. Exactly one
    /// `traceparent` line is accepted when valid by the spec's rules; two lines, or an
    /// invalid value, count as none ([`Hop::log_rejection`] says why, never the value).
    pub fn resolve(buf: &[u8], headers: &[HeaderField], id: &RequestId) -> Self {
        let mut found: Option<&[u8]> = None;
        let mut lines = 0u32;
        for h in headers {
            if name_is(&buf[h.name.clone()], TRACEPARENT) {
                lines += 1;
                found = Some(&buf[h.value.clone()]);
            }
        }
        let (incoming, rejected) = match (lines, found) {
            (1, Some(value)) => match TraceParent::parse(value) {
                Ok(tp) => (Some(tp), None),
                Err(e) => (None, Some(Rejected::Invalid(e))),
            },
            (0, _) => (None, None),
            _ => (None, Some(Rejected::Repeated)),
        };
        Self {
            span: SpanContext::start(incoming.as_ref(), Some(id)),
            keep_tracestate: incoming.is_some(),
            rejected,
        }
    }

    /// Logs (at debug, by reason only) why the client's `traceparent` was ignored;
    /// called inside the request's scope so the line carries the hop's trace.
    pub fn log_rejection(&self) {
        if let Some(reason) = self.rejected {
            tracing::debug!(reason = %reason, "invalid traceparent ignored");
        }
    }
}

/// Hands the finished hop of the request bound now (its span, the access entry's
/// method, path, status and the circuit's user context) to the OTLP exporter, when
/// one is installed and the request is traced. Allocates nothing.
pub fn export(e: &crate::core::AccessEntry<'_>, duration: std::time::Duration, core: usize) {
    use appproxy_shared::otlp::{self, Inline, Kind, SpanRecord};
    if !otlp::enabled() {
        return;
    }
    let Some(span) = appproxy_shared::current_span() else {
        return;
    };
    let mut r = SpanRecord::new(span, Kind::Server, "request");
    r.ended_now(duration);
    r.request_id = Some(*e.request_id);
    r.method = Inline::from_bytes(e.method);
    let path = e.path.split(|b| *b == b'?').next().unwrap_or_default();
    r.path = Inline::from_bytes(path);
    r.status = e.status;
    r.core = u16::try_from(core).ok();
    if let Some(c) = e.circuit {
        r.circuit = Some(c.id);
        r.user_id = c.user_id;
        r.session_id = c.session_ids.first().copied();
        r.endpoint_id = c.endpoint_id;
    }
    otlp::export(&r);
}

/// Hands a finished deployment (an event's circuits fetched, applied on every core and
/// acknowledged, `took` from the event's arrival) to the OTLP exporter as an internal
/// span, a child of the coordinator's. Runs on the agent's thread.
pub fn export_deployment(
    span: appproxy_shared::trace::SpanContext,
    request_id: appproxy_shared::RequestId,
    took: std::time::Duration,
) {
    use appproxy_shared::otlp::{self, Kind, SpanRecord};
    if !otlp::enabled() {
        return;
    }
    let mut r = SpanRecord::new(span, Kind::Internal, "deployment");
    r.ended_now(took);
    r.request_id = Some(request_id);
    otlp::export(&r);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::parse::{parse_request, HeadLimits};

    fn hop(raw: &[u8], id: &str) -> Hop {
        let head = parse_request(raw, &HeadLimits::default())
            .expect("valid head")
            .expect("complete head");
        let id = RequestId::parse(id.as_bytes()).expect("id");
        Hop::resolve(raw, &head.headers, &id)
    }

    const RID: &str = "4bf92f35-77b3-4da6-a3ce-929d0e0e4736";

    #[test]
    fn valid_traceparent_is_the_parent() {
        let h = hop(
            b"GET / HTTP/1.1\r\nHost: a\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\ntracestate: rojo=1\r\n\r\n",
            RID,
        );
        assert_eq!(
            h.span.trace_id.to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(
            h.span.parent_span_id.map(|s| s.to_string()).as_deref(),
            Some("b7ad6b7169203331")
        );
        assert_ne!(h.span.span_id.to_string(), "b7ad6b7169203331");
        assert!(h.keep_tracestate);
    }

    #[test]
    fn invalid_or_repeated_traceparent_falls_back_to_the_request_id() {
        for raw in [
            &b"GET / HTTP/1.1\r\nHost: a\r\ntraceparent: 00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\ntraceparent: 00-00000000000000000000000000000000-b7ad6b7169203331-01\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            let h = hop(raw, RID);
            assert_eq!(h.span.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(h.span.parent_span_id, None);
            assert!(!h.keep_tracestate);
        }
    }
}
