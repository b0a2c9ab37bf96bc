//! The harness's gRPC app: a minimal HTTP/2 server (the `h2` crate on a tokio runtime,
//! independent of the worker's own HTTP/2 code) that answers gRPC calls without
//! decoding protobuf, so the app is never what a benchmark measures.
//!
//! - `/bench.Svc/Unary`: reads the request's messages, answers one 64-byte message
//!   and `grpc-status: 0` in trailers.
//! - `/bench.Svc/Stream`: server streaming; the request message is ASCII `COUNT:SIZE`,
//!   the answer COUNT messages of SIZE bytes, each sent within the stream's window.
//!
//! Also the 5-byte-prefixed request body h2load sends for unary calls.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};

/// A gRPC length-prefixed message (uncompressed).
#[must_use]
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 5);
    out.push(0);
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(payload);
    out
}

/// The unary request the benchmark sends: one 64-byte message.
#[must_use]
pub fn unary_request() -> Vec<u8> {
    frame(&[b'q'; 64])
}

/// Serves the gRPC app on 127.0.0.1:`port` until killed, with as many threads as the
/// process may use CPUs.
pub fn app(port: u16) -> std::io::Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        loop {
            let (sock, _) = listener.accept().await?;
            let _ = sock.set_nodelay(true);
            tokio::spawn(async move {
                let _ = serve(sock).await;
            });
        }
    })
}

async fn serve(sock: tokio::net::TcpStream) -> Result<(), h2::Error> {
    let mut conn = h2::server::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(8 << 20)
        .max_concurrent_streams(1024)
        .handshake(sock)
        .await?;
    while let Some(next) = conn.accept().await {
        let (req, respond) = next?;
        tokio::spawn(async move {
            let _ = call(req, respond).await;
        });
    }
    Ok(())
}

async fn call(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) -> Result<(), h2::Error> {
    let path = req.uri().path().to_owned();
    let mut body = req.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        // Only the first message matters (the stream method's COUNT:SIZE).
        if got.len() < 64 {
            got.extend_from_slice(&chunk[..chunk.len().min(64)]);
        }
    }
    let head = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/grpc")
        .body(())
        .unwrap_or_default();
    let mut send = respond.send_response(head, false)?;
    if path == "/bench.Svc/Stream" {
        let spec = std::str::from_utf8(got.get(5..).unwrap_or_default()).unwrap_or("");
        let (count, size) = spec.split_once(':').unwrap_or(("0", "0"));
        let count: usize = count.trim().parse().unwrap_or(0);
        let size: usize = size.trim().parse().unwrap_or(0).min(16 << 20);
        let message = Bytes::from(frame(&vec![b'z'; size]));
        for _ in 0..count {
            let mut left = message.clone();
            while !left.is_empty() {
                send.reserve_capacity(left.len());
                let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .ok_or_else(|| h2::Error::from(h2::Reason::CANCEL))??;
                let piece = left.split_to(granted.min(left.len()));
                send.send_data(piece, false)?;
            }
        }
    } else {
        send.send_data(Bytes::from(frame(&[b'r'; 64])), false)?;
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    send.send_trailers(trailers)
}
