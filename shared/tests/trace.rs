//! Property tests of the W3C Trace Context parsing and formatting: formatting then
//! parsing gives back the same IDs, and no input makes the parsers panic.

use appproxy_shared::trace::{SpanContext, SpanId, TraceId, TraceParent, TraceState};
use proptest::prelude::*;

proptest! {
    #[test]
    fn format_then_parse_is_identity(
        trace in any::<[u8; 16]>(),
        span in any::<[u8; 8]>(),
        flags in any::<u8>(),
    ) {
        let (Some(trace_id), Some(span_id)) = (TraceId::from_bytes(trace), SpanId::from_bytes(span)) else {
            return Ok(());
        };
        let ctx = SpanContext { trace_id, span_id, parent_span_id: None, flags };
        let header = ctx.traceparent();
        let parsed = TraceParent::parse(header.as_bytes()).expect("own output parses");
        prop_assert_eq!(parsed.version, 0);
        prop_assert_eq!(parsed.trace_id, trace_id);
        prop_assert_eq!(parsed.parent_id, span_id);
        prop_assert_eq!(parsed.flags, flags);
        prop_assert_eq!(parsed.to_string(), header.to_string());
        prop_assert_eq!(TraceId::parse_hex(trace_id.to_string().as_bytes()), Some(trace_id));
        prop_assert_eq!(SpanId::parse_hex(span_id.to_string().as_bytes()), Some(span_id));
        let child = ctx.child();
        prop_assert_eq!(child.trace_id, trace_id);
        prop_assert_eq!(child.parent_span_id, Some(span_id));
    }

    #[test]
    fn traceparent_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        if let Ok(tp) = TraceParent::parse(&bytes) {
            // Whatever parsed re-formats to a valid version-00 header.
            prop_assert!(TraceParent::parse(tp.header().as_bytes()).is_ok());
        }
    }

    #[test]
    fn near_valid_traceparent_never_panics(s in "[0-9a-fA-F-]{0,70}") {
        let _ = TraceParent::parse(s.as_bytes());
    }

    #[test]
    fn tracestate_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
        if let Ok(ts) = TraceState::parse(&bytes) {
            prop_assert!(ts.as_str().len() <= 512);
            prop_assert_eq!(TraceState::parse(ts.as_str().as_bytes()), Ok(ts.clone()));
        }
    }

    #[test]
    fn tracestate_grammar_roundtrip(
        members in proptest::collection::vec(("[a-z][a-z0-9_*/-]{0,8}", "[!-+\\--<>-~]{1,8}"), 0..40),
    ) {
        let joined = members.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        let mut keys: Vec<&String> = members.iter().map(|(k, _)| k).collect();
        keys.sort();
        keys.dedup();
        let result = TraceState::parse(joined.as_bytes());
        if members.len() <= 32 && keys.len() == members.len() && joined.len() <= 512 {
            prop_assert_eq!(result.map(|t| t.as_str().to_owned()), Ok(joined));
        } else {
            prop_assert!(result.is_err());
        }
    }
}

#[test]
fn random_ids_are_nonzero_and_distinct() {
    let a = SpanId::random();
    let b = SpanId::random();
    assert_ne!(a, b);
    assert_ne!(a.to_bytes(), [0; 8]);
    assert_ne!(TraceId::random(), TraceId::random());
}
