//! Differential fuzzing of request framing: the worker's decoder against hyper, an
//! independent HTTP/1.1 implementation, run as a server over an in-memory duplex.
//!
//! Two properties, for any byte stream a client could send:
//! 1. Every request the worker accepts (with its body) is one hyper also sees at the
//!    same place in the stream, with the same method, target and body. Where hyper
//!    stops earlier, it must be for the head's content (for example a target the
//!    `http` crate refuses), which shows as hyper refusing the same request even in
//!    the worker's canonical framing; otherwise the two disagree on a boundary.
//! 2. The bytes the worker forwards for those requests, read by hyper as the app,
//!    are exactly those requests (same bodies and trailers) and nothing more: no
//!    request can be smuggled to the app.
#![no_main]

use std::cell::RefCell;
use std::convert::Infallible;
use std::rc::Rc;

use appproxy_dataplane::http::parse::{parse_request, HeadLimits};
use appproxy_dataplane::http::stream::{decode_requests, DecodedRequest};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as hyper delivered it.
#[derive(Debug)]
struct Seen {
    method: Vec<u8>,
    /// Path and query of an origin-form target.
    path: Option<Vec<u8>>,
    /// Payload and trailers (lowercase names, sorted), or the body error.
    body: Result<(Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>), String>,
}

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
}

/// Feeds `input` to a hyper HTTP/1.1 server and returns the requests it delivered.
fn hyper_view(input: &[u8]) -> Vec<Seen> {
    RT.with(|rt| {
        rt.block_on(async {
            let (client, server) = tokio::io::duplex(input.len() + 64 * 1024);
            let seen = Rc::new(RefCell::new(Vec::new()));
            let log = seen.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let log = log.clone();
                async move {
                    let method = req.method().as_str().as_bytes().to_vec();
                    let path = req
                        .uri()
                        .scheme()
                        .is_none()
                        .then(|| {
                            req.uri()
                                .path_and_query()
                                .map(|p| p.as_str().as_bytes().to_vec())
                        })
                        .flatten();
                    let body = match req.into_body().collect().await {
                        Ok(c) => {
                            let mut trailers: Vec<(Vec<u8>, Vec<u8>)> = c
                                .trailers()
                                .map(|t| {
                                    t.iter()
                                        .map(|(n, v)| {
                                            (n.as_str().as_bytes().to_vec(), v.as_bytes().to_vec())
                                        })
                                        .collect()
                                })
                                .unwrap_or_default();
                            trailers.sort();
                            Ok((c.to_bytes().to_vec(), trailers))
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    log.borrow_mut().push(Seen { method, path, body });
                    Ok::<_, Infallible>(
                        Response::new(http_body_util::Empty::<&'static [u8]>::new()),
                    )
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.half_close(true).max_headers(256);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(server), svc);
            let (mut rd, mut wr) = tokio::io::split(client);
            let writer = async {
                let _ = wr.write_all(input).await;
                let _ = wr.shutdown().await;
            };
            let reader = async {
                let mut sink = Vec::new();
                let _ = rd.read_to_end(&mut sink).await;
            };
            let _ = tokio::join!(writer, reader, conn);
            seen.take()
        })
    })
}

/// Whether hyper refuses `req` even in the worker's canonical framing.
fn hyper_refuses_alone(req: &DecodedRequest) -> bool {
    hyper_view(&req.forwarded)
        .first()
        .is_none_or(|s| s.body.is_err())
}

fn lower(trailers: &[(Vec<u8>, Vec<u8>)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut t: Vec<_> = trailers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
        .collect();
    t.sort();
    t
}

/// Whether the request at the start of `raw` is one of the known, intended
/// differences: a `Content-Length` list of equal values (`5, 5`, RFC 9110 §8.6, taken
/// as HAProxy does), or a `Transfer-Encoding` list with empty elements (`chunked,`,
/// which RFC 9110 §5.6.1 says to accept; hyper reads the empty last element as the
/// final coding). The worker forwards both in canonical form, where hyper takes them.
/// Also a `Connection` value with obs-text: hyper ignores the whole field (so an
/// HTTP/1.0 `keep-alive` in it is lost and hyper closes), the worker reads its tokens.
fn known_difference(raw: &[u8]) -> bool {
    let Ok(Some(head)) = parse_request(raw, &HeadLimits::default()) else {
        return false;
    };
    head.headers.iter().any(|h| {
        let name = &raw[h.name.clone()];
        let value = &raw[h.value.clone()];
        (name.eq_ignore_ascii_case(b"content-length") && value.contains(&b','))
            || (name.eq_ignore_ascii_case(b"connection") && !value.is_ascii())
            || (name.eq_ignore_ascii_case(b"transfer-encoding")
                && value
                    .split(|b| *b == b',')
                    .any(|e| e.trim_ascii().is_empty()))
    })
}

/// Whether hyper's view of request `i` is the worker's.
fn same(seen: &[Seen], i: usize, w: &DecodedRequest, exact: bool) -> bool {
    let Some(Seen {
        method,
        path,
        body: Ok((body, trailers)),
    }) = seen.get(i)
    else {
        return false;
    };
    assert_eq!(method, &w.method, "request {i}: method (exact={exact})");
    if let Some(path) = path {
        if w.target.starts_with(b"/") {
            // The `http` crate leaves out a fragment.
            let target = w.target.split(|b| *b == b'#').next().unwrap_or_default();
            assert_eq!(path, target, "request {i}: target (exact={exact})");
        }
    }
    assert_eq!(body, &w.body, "request {i}: body (exact={exact})");
    if exact {
        assert_eq!(trailers, &lower(&w.trailers), "request {i}: trailers");
    }
    true
}

/// Checks that hyper, reading `stream` (which ends where the worker's last request
/// ends: `ends[i]` is where request `i` ends in it), sees the worker's requests in
/// order and nothing more. `exact`: `stream` is what the worker forwards, so the
/// trailers must match too.
fn agree(stream: &[u8], ends: &[usize], worker: &[DecodedRequest], exact: bool) {
    let mut seen = hyper_view(stream);
    assert!(
        seen.len() <= worker.len(),
        "hyper saw {} requests where the worker saw {} (exact={exact}): {seen:?}",
        seen.len(),
        worker.len()
    );
    for (i, w) in worker.iter().enumerate() {
        if same(&seen, i, w, exact) {
            continue;
        }
        // hyper drops a request in flight when a later one fails: look again at the
        // stream up to this request only.
        seen = hyper_view(&stream[..ends[i]]);
        if same(&seen, i, w, exact) {
            continue;
        }
        // The known differences of this request, or of the one before (whose
        // connection handling decides whether hyper reads this one at all).
        let start_of = |k: usize| if k == 0 { 0 } else { ends[k - 1] };
        if !exact
            && (known_difference(&stream[start_of(i)..ends[i]])
                || (i > 0 && known_difference(&stream[start_of(i - 1)..ends[i - 1]])))
        {
            return;
        }
        // Still refused: fine only if hyper refuses this request's content in the
        // worker's canonical framing too; otherwise the two disagree on a boundary.
        assert!(
            hyper_refuses_alone(w),
            "worker accepted request {i} ({:?}) where hyper did not (exact={exact}); hyper saw {seen:?}",
            String::from_utf8_lossy(&w.forwarded)
        );
        return;
    }
}

fuzz_target!(|data: &[u8]| {
    let (worker, _end) = decode_requests(data, &HeadLimits::default());
    let Some(last) = worker.last() else {
        return;
    };
    let ends: Vec<usize> = worker.iter().map(|w| w.end).collect();
    agree(&data[..last.end], &ends, &worker, false);
    let mut forwarded = Vec::new();
    let mut ends = Vec::new();
    for w in &worker {
        forwarded.extend_from_slice(&w.forwarded);
        ends.push(forwarded.len());
    }
    agree(&forwarded, &ends, &worker, true);
});
