//! The worker's request-stream decoding as one pure function: where each request of a
//! client byte stream begins and ends, and the exact bytes the worker forwards for it.
//!
//! It is built from the pieces the proxy uses on sockets ([`parse_request`],
//! [`ChunkedDecoder::for_request`], [`upstream_request`], [`encode_chunk`]) and takes
//! the same framing decisions as the connection loop in `proxy.rs` (a request that
//! closes the connection, asks for an upgrade or is a `CONNECT` ends the stream), so
//! tests and the fuzz targets can compare the worker's view of message boundaries with
//! another HTTP/1.1 implementation's, and check that what is forwarded decodes to the
//! same messages.

use std::net::SocketAddr;

use super::chunked::{encode_chunk, ChunkedDecoder};
use super::encode::{upstream_request, ClientHop};
use super::error::RequestError;
use super::parse::{parse_request, BodyFraming, HeadLimits, Method};

/// One request as the worker decoded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedRequest {
    /// Method token.
    pub method: Vec<u8>,
    /// Request target.
    pub target: Vec<u8>,
    /// The body payload.
    pub body: Vec<u8>,
    /// Kept trailer fields.
    pub trailers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Where the request ends in the input.
    pub end: usize,
    /// Whether the client sent `Host` (an HTTP/1.0 request may not; one is added).
    pub has_host: bool,
    /// The bytes forwarded to the app (head and re-encoded body).
    pub forwarded: Vec<u8>,
}

/// Why decoding stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// The input ended inside a request (or exactly between two).
    Incomplete,
    /// A request the worker refuses with this error (the connection closes).
    Refused(RequestError),
    /// A request after which the connection does not carry further requests.
    Closes,
}

/// The client hop and app address used for the forwarded bytes.
pub fn sample_hop() -> (ClientHop, SocketAddr) {
    (
        ClientHop::new(SocketAddr::from(([192, 0, 2, 1], 40000)), 8080, false),
        SocketAddr::from(([192, 0, 2, 2], 8000)),
    )
}

/// Decodes every request of `input`, as the worker would on one connection.
pub fn decode_requests(input: &[u8], limits: &HeadLimits) -> (Vec<DecodedRequest>, StreamEnd) {
    let (hop, app) = sample_hop();
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &input[pos..];
        if rest.is_empty() {
            return (out, StreamEnd::Incomplete);
        }
        let head = match parse_request(rest, limits) {
            Ok(Some(h)) => h,
            Ok(None) => return (out, StreamEnd::Incomplete),
            Err(e) => return (out, StreamEnd::Refused(e)),
        };
        if head.method == Method::Connect {
            return (
                out,
                StreamEnd::Refused(RequestError::Malformed("CONNECT is not supported")),
            );
        }
        let mut forwarded = Vec::new();
        upstream_request(&mut forwarded, rest, &head, None, &hop, app);
        let body_start = head.head_len;
        let (body, trailers, body_len) = match head.framing {
            BodyFraming::Length(n) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if rest.len() - body_start < n {
                    return (out, StreamEnd::Incomplete);
                }
                let body = rest[body_start..body_start + n].to_vec();
                forwarded.extend_from_slice(&body);
                (body, Vec::new(), n)
            }
            BodyFraming::Chunked => {
                let mut dec = ChunkedDecoder::for_request();
                let mut body = Vec::new();
                let mut at = body_start;
                loop {
                    let step = match dec.decode(&rest[at..]) {
                        Ok(s) => s,
                        Err(e) => return (out, StreamEnd::Refused(RequestError::BadChunk(e))),
                    };
                    let data = &rest[at + step.data.start..at + step.data.end];
                    body.extend_from_slice(data);
                    encode_chunk(&mut forwarded, data);
                    at += step.consumed;
                    if step.done {
                        break;
                    }
                    if step.consumed == 0 || at == rest.len() {
                        return (out, StreamEnd::Incomplete);
                    }
                }
                dec.encode_last_chunk(&mut forwarded);
                let trailers = dec
                    .trailers()
                    .map(|(n, v)| (n.to_vec(), v.to_vec()))
                    .collect();
                (body, trailers, at - body_start)
            }
            BodyFraming::Eof => return (out, StreamEnd::Closes),
        };
        pos += body_start + body_len;
        out.push(DecodedRequest {
            method: rest[head.method_raw.clone()].to_vec(),
            target: rest[head.target.clone()].to_vec(),
            body,
            trailers,
            end: pos,
            has_host: head.host.is_some(),
            forwarded,
        });
        if !head.keep_alive || head.upgrade.is_some() {
            return (out, StreamEnd::Closes);
        }
    }
}

/// One upstream response as the worker decoded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedResponse {
    /// Status code.
    pub status: u16,
    /// The body payload.
    pub body: Vec<u8>,
    /// Kept trailer fields.
    pub trailers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Where the response ends in the input (the input's end when delimited by close).
    pub end: usize,
    /// The bytes relayed to an HTTP/1.1 client (head and re-encoded body).
    pub forwarded: Vec<u8>,
}

/// Decodes the final response at the start of `input` (to a `GET`), as the worker
/// relays it to an HTTP/1.1 client; `input` ending is the upstream closing. `None`:
/// refused, incomplete, or not a final response.
pub fn decode_response(input: &[u8], max_head: usize) -> Option<DecodedResponse> {
    use super::encode::{client_response, ClientFraming};
    use super::parse::{parse_response, Version};
    let head = parse_response(input, Method::Get, max_head).ok()??;
    if head.status < 200 {
        return None;
    }
    let framing = ClientFraming::choose(head.framing, Version::Http11);
    let mut forwarded = Vec::new();
    client_response(
        &mut forwarded,
        input,
        &head,
        framing,
        None,
        Version::Http11,
        false,
    );
    let rest = &input[head.head_len..];
    let (body, trailers, body_len) = match head.framing {
        BodyFraming::Length(n) => {
            let n = usize::try_from(n).ok().filter(|n| *n <= rest.len())?;
            forwarded.extend_from_slice(&rest[..n]);
            (rest[..n].to_vec(), Vec::new(), n)
        }
        BodyFraming::Chunked => {
            let mut dec = ChunkedDecoder::new();
            let mut body = Vec::new();
            let mut at = 0;
            loop {
                let step = dec.decode(&rest[at..]).ok()?;
                let data = &rest[at + step.data.start..at + step.data.end];
                body.extend_from_slice(data);
                encode_chunk(&mut forwarded, data);
                at += step.consumed;
                if step.done {
                    break;
                }
                if step.consumed == 0 || at == rest.len() {
                    return None;
                }
            }
            dec.encode_last_chunk(&mut forwarded);
            let trailers = dec
                .trailers()
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect();
            (body, trailers, at)
        }
        BodyFraming::Eof => {
            encode_chunk(&mut forwarded, rest);
            forwarded.extend_from_slice(b"0\r\n\r\n");
            (rest.to_vec(), Vec::new(), rest.len())
        }
    };
    Some(DecodedResponse {
        status: head.status,
        body,
        trailers,
        end: head.head_len + body_len,
        forwarded,
    })
}
