//! Fuzzes the chunked decoder: whole-buffer and byte-at-a-time decoding agree, and
//! nothing panics.
#![no_main]

use appproxy_dataplane::http::chunked::{decode_all, ChunkedDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = decode_all(data);
    let mut dec = ChunkedDecoder::new();
    let mut payload = Vec::new();
    let mut consumed = 0usize;
    let mut result = Ok(None);
    for (i, b) in data.iter().enumerate() {
        let one = [*b];
        match dec.decode(&one) {
            Ok(step) => {
                payload.extend_from_slice(&one[step.data.clone()]);
                consumed += step.consumed;
                if step.done {
                    result = Ok(Some((payload.clone(), consumed)));
                    break;
                }
            }
            Err(e) => {
                result = Err(e);
                let _ = i;
                break;
            }
        }
    }
    match (&whole, &result) {
        (Ok(Some(a)), Ok(Some(b))) => assert_eq!(a, b),
        (Err(_), Err(_)) | (Ok(None), Ok(None)) => {}
        (a, b) => panic!("whole {a:?} vs byte-wise {b:?}"),
    }
});
