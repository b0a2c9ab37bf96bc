//! The API server loop over real sockets: what it writes in place of hyper's own
//! answers, and what it must leave alone.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use appproxy_control_common::server::{serve, Limits, ServerMetrics, MAX_HEAD};
use appproxy_shared::header::IdPolicy;
use appproxy_shared::IdVersion;
use axum::body::Bytes;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Exactly what hyper writes when it cannot take a head: a 400 with
/// `connection: close`, `content-length: 0` and a `date`.
const HYPER_400: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Thu, 03 Dec 2026 12:00:00 GMT\r\n\r\n";

/// A body sent frame by frame, each frame one write of hyper's; its length is known
/// (a file's download) or not (chunked).
struct Frames {
    frames: VecDeque<Bytes>,
    length: Option<u64>,
}

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        Poll::Ready(
            self.frames
                .pop_front()
                .map(|f| Ok(hyper::body::Frame::data(f))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self.length {
            Some(n) => hyper::body::SizeHint::with_exact(n),
            None => hyper::body::SizeHint::default(),
        }
    }
}

/// The file a vfolder user could plant: its end, past a first part that fills
/// hyper's write buffer (64 KiB, so that hyper writes it out before taking the
/// next), has the shape of hyper's own answer and is a write of its own.
fn planted() -> Vec<Bytes> {
    vec![
        Bytes::from(vec![b'a'; 70_000]),
        Bytes::from_static(HYPER_400),
    ]
}

fn planted_bytes() -> Vec<u8> {
    planted().concat()
}

async fn start() -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let router = axum::Router::new()
        .route(
            "/sized",
            axum::routing::get(|| async {
                axum::body::Body::new(Frames {
                    length: Some(planted_bytes().len() as u64),
                    frames: planted().into(),
                })
            }),
        )
        .route(
            "/chunked",
            axum::routing::get(|| async {
                axum::body::Body::new(Frames {
                    length: None,
                    frames: planted().into(),
                })
            }),
        )
        .route("/small", axum::routing::get(|| async { "small" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let limits = Limits {
        header_read: Duration::from_secs(10),
        idle: Duration::from_secs(30),
        max_connections: 16,
        max_head: MAX_HEAD,
        ids: (IdPolicy::GenerateIfMissing, IdVersion::V4),
        problem: Default::default(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        router,
        limits,
        Arc::new(ServerMetrics::default()),
        async {
            let _ = stopped.await;
        },
    ));
    (addr, stop)
}

/// Reads one response (head, then a body by `content-length` or chunked), giving
/// (head, body).
async fn response(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (String, Vec<u8>) {
    async fn more(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("the server answers within 10 s")
            .expect("read");
        assert!(
            n > 0,
            "closed mid-response: {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        more(s, buf).await;
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if lower.contains("transfer-encoding: chunked") {
        loop {
            let line_end = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                more(s, buf).await;
            };
            let size = usize::from_str_radix(
                std::str::from_utf8(&buf[..line_end])
                    .expect("chunk size")
                    .trim(),
                16,
            )
            .expect("chunk size");
            buf.drain(..line_end + 2);
            while buf.len() < size + 2 {
                more(s, buf).await;
            }
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
            if size == 0 {
                break;
            }
        }
    } else {
        let length: usize = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |n| n.trim().parse().expect("content-length"));
        while buf.len() < length {
            more(s, buf).await;
        }
        body = buf.drain(..length).collect();
    }
    (head, body)
}

/// A response body holding bytes shaped like hyper's own answer was rewritten in
/// transit into the JSON error: the body differed from the file, ran past its
/// `Content-Length`, and the surplus was read as the next request's answer. Bodies
/// go out as they are, and the next request gets its own answer.
#[tokio::test]
async fn a_body_shaped_like_hypers_own_answer_goes_out_untouched() {
    let (addr, _stop) = start().await;
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut buf = Vec::new();
    for path in ["/sized", "/chunked", "/sized"] {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await
            .expect("send");
        let (head, body) = response(&mut s, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        let tail =
            |b: &[u8]| String::from_utf8_lossy(&b[b.len().saturating_sub(120)..]).into_owned();
        assert!(
            body == planted_bytes(),
            "{path}: the body as it was made: {} bytes ending {:?}",
            body.len(),
            tail(&body)
        );
        assert!(
            buf.is_empty(),
            "{path}: nothing past the body: {:?}",
            String::from_utf8_lossy(&buf)
        );
    }
    s.write_all(b"GET /small HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("send");
    let (head, body) = response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"small");
}

/// hyper's own answer to a head it cannot take is still the product's JSON error,
/// on a fresh connection and after a response on a kept-alive one.
#[tokio::test]
async fn a_bad_head_gets_the_json_error_fresh_or_after_a_response() {
    let (addr, _stop) = start().await;
    for earlier in [None, Some("/small"), Some("/chunked")] {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut buf = Vec::new();
        if let Some(path) = earlier {
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
                .await
                .expect("send");
            let (head, _) = response(&mut s, &mut buf).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        }
        s.write_all(b"GET /small HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n")
            .await
            .expect("send");
        let (head, body) = response(&mut s, &mut buf).await;
        assert!(
            head.starts_with("HTTP/1.1 400"),
            "after {earlier:?}: {head}"
        );
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("content-type: application/json"), "{head}");
        assert!(lower.contains("x-backend-request-id: "), "{head}");
        let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(json["code"], "bad-request");
    }
}

/// A service starts with its soft descriptor limit raised to the hard one: a soft
/// limit of 1024 under a far higher hard one (systemd's default) left a service
/// with a thousand descriptors for connections, archives and uploads.
#[test]
fn the_descriptor_limit_is_raised_to_the_hard_one() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let before = getrlimit(Resource::Nofile);
    let hard = before.maximum.unwrap_or(u64::MAX);
    // Lowered below the hard limit, whatever the machine's is.
    let low = 1024.min(hard / 2);
    assert!(
        low >= 64,
        "a hard descriptor limit of {hard} is too low to run"
    );
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(low),
            maximum: before.maximum,
        },
    )
    .expect("lower the soft limit");
    let raised = appproxy_control_common::service::raise_nofile();
    let after = getrlimit(Resource::Nofile);
    assert_eq!(
        after.maximum, before.maximum,
        "the hard limit is left alone"
    );
    let want = hard.min(1 << 20);
    assert_eq!(after.current, Some(want));
    assert_eq!(raised, Some(want));
    // Already there: nothing changes.
    assert_eq!(appproxy_control_common::service::raise_nofile(), Some(want));
}
