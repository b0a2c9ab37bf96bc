//! Fuzzes decode → encode → decode: every request the worker accepts, re-read from
//! the bytes the worker forwards for it, is the same request (method, target, body,
//! trailers), occupies exactly those bytes, and encodes to them again (the canonical
//! form is a fixed point). Input starting with `HTTP/` is an upstream response
//! instead, checked the same way as it is relayed to an HTTP/1.1 client.
#![no_main]

use appproxy_dataplane::http::parse::HeadLimits;
use appproxy_dataplane::http::stream::{decode_requests, decode_response};
use libfuzzer_sys::fuzz_target;

fn response(data: &[u8]) {
    let Some(r) = decode_response(data, 64 * 1024) else {
        return;
    };
    let again = decode_response(&r.forwarded, 64 * 1024 + 1024).unwrap_or_else(|| {
        panic!(
            "relayed response refused: {:?}",
            String::from_utf8_lossy(&r.forwarded)
        )
    });
    assert_eq!(again.status, r.status);
    assert_eq!(again.body, r.body);
    assert_eq!(again.trailers, r.trailers);
    assert_eq!(
        again.end,
        r.forwarded.len(),
        "the relayed response is exactly its bytes"
    );
    assert_eq!(
        again.forwarded, r.forwarded,
        "canonical form is a fixed point"
    );
}

fuzz_target!(|data: &[u8]| {
    if data.starts_with(b"HTTP/") {
        response(data);
        return;
    }
    let (msgs, _) = decode_requests(data, &HeadLimits::default());
    // The forwarded head adds a few fields: room for them on the second read.
    let roomy = HeadLimits {
        max_request_line: 16 * 1024,
        max_header_bytes: 64 * 1024,
        max_headers: 128,
    };
    for m in msgs {
        let (again, _) = decode_requests(&m.forwarded, &roomy);
        assert_eq!(
            again.len(),
            1,
            "forwarded {:?}",
            String::from_utf8_lossy(&m.forwarded)
        );
        let a = &again[0];
        assert_eq!(
            a.end,
            m.forwarded.len(),
            "the forwarded request is exactly its bytes"
        );
        assert_eq!(a.method, m.method);
        assert_eq!(a.target, m.target);
        assert_eq!(a.body, m.body);
        assert_eq!(a.trailers, m.trailers);
        if m.has_host {
            assert_eq!(a.forwarded, m.forwarded, "canonical form is a fixed point");
        } else {
            // The first pass adds Host; from then on the form is fixed.
            let (third, _) = decode_requests(&a.forwarded, &roomy);
            assert_eq!(third.len(), 1);
            assert_eq!(
                third[0].forwarded, a.forwarded,
                "canonical form is a fixed point"
            );
        }
    }
});
