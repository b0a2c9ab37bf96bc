//! Replays the fuzz seeds and every crash regression saved under `fuzz/regressions/`
//! through the parsers, so a fixed crash stays fixed without running a fuzzer.

use std::path::Path;

use appproxy_dataplane::http::chunked::{decode_all, ChunkedDecoder};
use appproxy_dataplane::http::encode::{upstream_request, ClientHop};
use appproxy_dataplane::http::parse::{parse_request, HeadLimits};
use appproxy_dataplane::http::stream::{decode_requests, decode_response};

fn inputs(target: &str) -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut out = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries.flatten() {
            if let Ok(bytes) = std::fs::read(e.path()) {
                out.push(bytes);
            }
        }
    }
    out
}

#[test]
fn request_head_inputs() {
    let inputs = inputs("request_head");
    assert!(
        !inputs.is_empty(),
        "the seed corpus is part of the repository"
    );
    let id: appproxy_dataplane::RequestId = "fuzz-replay".parse().expect("valid");
    for data in inputs {
        if let Ok(Some(head)) = parse_request(&data, &HeadLimits::default()) {
            let mut out = Vec::new();
            upstream_request(
                &mut out,
                &data,
                &head,
                Some(&id),
                &ClientHop::new("127.0.0.1:1".parse().expect("addr"), 80, false),
                "127.0.0.1:2".parse().expect("addr"),
            );
            assert!(out.ends_with(b"\r\n\r\n"));
        }
    }
}

#[test]
fn chunked_inputs() {
    let inputs = inputs("chunked");
    assert!(!inputs.is_empty());
    for data in inputs {
        let whole = decode_all(&data);
        let mut dec = ChunkedDecoder::new();
        let mut total = 0;
        for b in &data {
            match dec.decode(&[*b]) {
                Ok(step) => {
                    total += step.consumed;
                    if step.done {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        if let Ok(Some((_, n))) = whole {
            assert_eq!(n, total);
        }
    }
}

/// The request streams of the differential and round-trip targets: every request the
/// worker accepts is, re-read from the bytes it forwards, the same request, occupying
/// exactly those bytes, and the forwarded form is a fixed point. (The comparison with
/// hyper itself needs the fuzz crate.)
#[test]
fn request_stream_inputs() {
    let mut all = inputs("differential");
    all.extend(inputs("roundtrip"));
    assert!(!all.is_empty());
    let roomy = HeadLimits {
        max_request_line: 16 * 1024,
        max_header_bytes: 64 * 1024,
        max_headers: 128,
    };
    for data in all {
        if data.starts_with(b"HTTP/") {
            // An upstream response, relayed to an HTTP/1.1 client.
            if let Some(r) = decode_response(&data, 64 * 1024) {
                let again = decode_response(&r.forwarded, 65 * 1024).expect("relayed form");
                assert_eq!((again.status, &again.body), (r.status, &r.body));
                assert_eq!(again.end, r.forwarded.len());
                assert_eq!(again.forwarded, r.forwarded);
            }
            continue;
        }
        let (msgs, _) = decode_requests(&data, &HeadLimits::default());
        for m in msgs {
            let (again, _) = decode_requests(&m.forwarded, &roomy);
            assert_eq!(again.len(), 1);
            assert_eq!(again[0].end, m.forwarded.len());
            assert_eq!(
                (
                    &again[0].method,
                    &again[0].target,
                    &again[0].body,
                    &again[0].trailers
                ),
                (&m.method, &m.target, &m.body, &m.trailers)
            );
            // Bytes the app receives never hold a bare LF outside the body.
            let head_len = m
                .forwarded
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .expect("head end");
            assert!(!m.forwarded[..head_len]
                .iter()
                .enumerate()
                .any(|(i, b)| *b == b'\n' && (i == 0 || m.forwarded[i - 1] != b'\r')));
        }
    }
}
