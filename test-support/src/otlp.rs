//! A real OTLP/HTTP trace receiver for tests: a small HTTP/1.1 server that takes
//! `POST /v1/traces` (`application/x-protobuf`, plain or `Content-Encoding: gzip`),
//! decodes the body as the collector does (a gzip member checked field by field:
//! header, raw deflate inflated by miniz_oxide, CRC-32 recomputed here bit by bit,
//! length; then `ExportTraceServiceRequest`, prost types of `opentelemetry-proto`),
//! records every span with its resource's `service.name`, and answers 200 with an
//! empty `ExportTraceServiceResponse` (400 for a body it cannot decode). It can
//! speak over any stream the test wraps the accepted socket in (TLS). Also a
//! collector that accepts and never answers. Used by the tests that export spans.

use crate::net::ReadUninterrupted;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// One span as received.
#[derive(Debug, Clone)]
pub struct Got {
    /// The resource's `service.name`.
    pub service: String,
    /// The span.
    pub span: Span,
}

impl Got {
    /// Lowercase hex of the trace ID.
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    /// Lowercase hex of the span ID.
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// Lowercase hex of the parent span ID ("" for a root).
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// A string attribute.
    pub fn str(&self, key: &str) -> Option<String> {
        self.attr(key).and_then(|v| match v {
            any_value::Value::StringValue(s) => Some(s),
            _ => None,
        })
    }

    /// An integer attribute.
    pub fn int(&self, key: &str) -> Option<i64> {
        self.attr(key).and_then(|v| match v {
            any_value::Value::IntValue(i) => Some(i),
            _ => None,
        })
    }

    fn attr(&self, key: &str) -> Option<any_value::Value> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone())
            .and_then(|v| v.value)
    }
}

/// Lowercase hex of `bytes` (trace and span IDs as they appear in headers).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What one export request looked like.
#[derive(Debug, Clone)]
pub struct Post {
    /// The request path.
    pub path: String,
    /// Its `Content-Type`.
    pub content_type: String,
    /// Its `Content-Encoding` ("" when none).
    pub content_encoding: String,
    /// Bytes of the body as sent.
    pub wire_len: usize,
    /// Bytes of the protobuf, once decompressed.
    pub decoded_len: usize,
    /// Why the body could not be decoded (answered 400), if it could not.
    pub error: Option<String>,
}

/// The receiver; its thread ends with the test process.
pub struct Receiver {
    /// Where it listens.
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<Got>>>,
    posts: Arc<Mutex<Vec<Post>>>,
}

impl Receiver {
    /// Starts the receiver; the first `refuse` requests are answered 503 (to see
    /// the exporter retry).
    pub fn start_refusing(refuse: usize) -> Self {
        Self::start_over(refuse, Ok)
    }

    /// Starts a receiver that speaks over `wrap(accepted socket)` (a TLS server
    /// stream, say; a connection whose `wrap` or handshake fails is closed); the
    /// first `refuse` requests are answered 503.
    pub fn start_over<S, F>(refuse: usize, wrap: F) -> Self
    where
        S: Read + Write,
        F: Fn(TcpStream) -> std::io::Result<S> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let spans: Arc<Mutex<Vec<Got>>> = Arc::default();
        let posts: Arc<Mutex<Vec<Post>>> = Arc::default();
        let (s, p) = (spans.clone(), posts.clone());
        std::thread::spawn(move || {
            let mut refused = 0;
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let Ok(stream) = wrap(stream) else { continue };
                let refuse_this = refused < refuse;
                if refuse_this {
                    refused += 1;
                }
                let _ = serve(stream, &s, &p, refuse_this);
            }
        });
        Self { addr, spans, posts }
    }

    /// Starts a receiver that accepts every export.
    pub fn start() -> Self {
        Self::start_refusing(0)
    }

    /// `http://addr`, for `[telemetry] otlp_endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `https://addr`, for a receiver started over TLS.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The spans received so far.
    pub fn spans(&self) -> Vec<Got> {
        self.spans.lock().expect("spans").clone()
    }

    /// The export requests received so far.
    pub fn posts(&self) -> Vec<Post> {
        self.posts.lock().expect("posts").clone()
    }

    /// Waits (bounded: a hang guard only) for a span matching `pred`.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&Got) -> bool) -> Got {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(g) = self.spans().into_iter().find(|g| pred(g)) {
                return g;
            }
            assert!(
                Instant::now() < deadline,
                "no span {what}; received: {:#?}",
                self.spans()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// CRC-32 (ISO-HDLC, gzip's), bit by bit: an implementation independent of the
/// exporter's.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The data of a body that must be exactly one gzip member (RFC 1952), every field
/// checked; the reason when it is not.
pub fn gunzip(z: &[u8]) -> Result<Vec<u8>, String> {
    if z.len() < 18 {
        return Err(format!("{} bytes: shorter than a gzip member", z.len()));
    }
    if z[..3] != [0x1f, 0x8b, 8] {
        return Err(format!("bad magic or method {:02x?}", &z[..3]));
    }
    // The exporter sets no flag (no name, comment, extra field or header CRC).
    if z[3] != 0 {
        return Err(format!("unexpected flags {:#04x}", z[3]));
    }
    let (deflated, trailer) = z[10..].split_at(z.len() - 18);
    let data =
        miniz_oxide::inflate::decompress_to_vec(deflated).map_err(|e| format!("inflate: {e:?}"))?;
    let crc = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    let size = u32::from_le_bytes([trailer[4], trailer[5], trailer[6], trailer[7]]);
    if crc != crc32(&data) {
        return Err(format!(
            "CRC-32 {crc:#010x} in the trailer, {:#010x} computed",
            crc32(&data)
        ));
    }
    if size != data.len() as u32 {
        return Err(format!(
            "ISIZE {size} in the trailer, {} inflated",
            data.len()
        ));
    }
    Ok(data)
}

/// Reads one request, records its spans, answers.
fn serve(
    mut s: impl Read + Write,
    spans: &Mutex<Vec<Got>>,
    posts: &Mutex<Vec<Post>>,
    refuse: bool,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read_uninterrupted(&mut chunk)?;
        if n == 0 || buf.len() > 64 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or_default()
        .to_owned();
    let mut length = 0usize;
    let mut content_type = String::new();
    let mut content_encoding = String::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("content-type") {
                content_type = value.trim().to_owned();
            } else if name.eq_ignore_ascii_case("content-encoding") {
                content_encoding = value.trim().to_owned();
            }
        }
    }
    while buf.len() < head_end + length {
        let n = s.read_uninterrupted(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if refuse {
        s.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    let wire = &buf[head_end..head_end + length];
    let body = match content_encoding.as_str() {
        "" => Ok(wire.to_vec()),
        "gzip" => gunzip(wire),
        other => Err(format!("unknown Content-Encoding {other:?}")),
    };
    let decoded = body.and_then(|b| {
        ExportTraceServiceRequest::decode(b.as_slice())
            .map(|r| (b.len(), r))
            .map_err(|e| format!("protobuf: {e}"))
    });
    let mut post = Post {
        path,
        content_type,
        content_encoding,
        wire_len: length,
        decoded_len: 0,
        error: None,
    };
    let request = match decoded {
        Ok((len, request)) => {
            post.decoded_len = len;
            posts.lock().expect("posts").push(post);
            request
        }
        Err(e) => {
            post.error = Some(e);
            posts.lock().expect("posts").push(post);
            s.write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
            return s.flush();
        }
    };
    {
        let mut spans = spans.lock().expect("spans");
        for rs in request.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.clone())
                .and_then(|v| v.value)
                .and_then(|v| match v {
                    any_value::Value::StringValue(s) => Some(s),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Got {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
    }
    let answer = ExportTraceServiceResponse::default().encode_to_vec();
    s.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            answer.len()
        )
        .as_bytes(),
    )?;
    s.write_all(&answer)?;
    s.flush()
}

/// A collector that accepts connections and never reads or answers; the
/// connections are held until the process ends.
pub fn hung_collector() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    addr
}

/// An address where nothing listens (connections are refused).
pub fn dead_collector() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], crate::free_port()))
}
