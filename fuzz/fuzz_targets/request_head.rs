//! Fuzzes the request-head parser: no panic, offsets inside the input, and a parsed
//! head re-encodes for the upstream without panicking.
#![no_main]

use appproxy_dataplane::http::encode::{upstream_request, ClientHop};
use appproxy_dataplane::http::parse::{parse_request, HeadLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = HeadLimits::default();
    if let Ok(Some(head)) = parse_request(data, &limits) {
        assert!(head.head_len <= data.len());
        for h in &head.headers {
            assert!(h.name.end <= head.head_len && h.value.end <= head.head_len);
        }
        let id = appproxy_shared_id();
        let hop = ClientHop::new("127.0.0.1:1".parse().expect("addr"), 80, false);
        let mut out = Vec::new();
        upstream_request(
            &mut out,
            data,
            &head,
            Some(&id),
            &hop,
            "127.0.0.1:2".parse().expect("addr"),
        );
        assert!(out.ends_with(b"\r\n\r\n"));
    }
});

fn appproxy_shared_id() -> appproxy_dataplane::RequestId {
    "fuzz-request".parse().expect("valid id")
}
