//! Replays the fuzz seeds and every crash regression saved under `fuzz/regressions/`
//! through the parsers, so a fixed crash stays fixed without running a fuzzer.

use std::path::Path;

use appproxy_dataplane::http::chunked::{decode_all, ChunkedDecoder};
use appproxy_dataplane::http::encode::{upstream_request, ClientHop};
use appproxy_dataplane::http::parse::{parse_request, HeadLimits};

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
                ClientHop::new("127.0.0.1:1".parse().expect("addr"), 80, false),
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
