//! Parser micro-benchmarks: a typical browser request head, an upstream response
//! head, head encoding towards the app, and a chunked body scan.
// `criterion_main!` defines an undocumented `pub fn main`.
#![allow(missing_docs)]

use std::hint::black_box;

use appproxy_dataplane::http::chunked::decode_all;
use appproxy_dataplane::http::encode::{upstream_request, ClientHop};
use appproxy_dataplane::http::parse::{parse_request, parse_response, HeadLimits, Method};
use appproxy_dataplane::RequestId;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const REQUEST: &[u8] = b"GET /user/lab/tree/notebooks?token=abc HTTP/1.1\r\nHost: proxy.example.com:10205\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36\r\nAccept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\nConnection: keep-alive\r\nCookie: appproxy_permit=YmZkY2NmYTQ5ZWNjODMwYmIyZTBmOTRiYTFjNGEzYzdkYzAwOGUyZjY3ODY4NTQzNDA5MTlkNzE1YjlmZTg1YQ==; _xsrf=2|abc\r\nX-Backend-Request-ID: 550e8400-e29b-41d4-a716-446655440000\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: TornadoServer/6.4\r\nContent-Type: text/html; charset=UTF-8\r\nDate: Thu, 20 Aug 2026 01:02:03 GMT\r\nContent-Length: 1234\r\nSet-Cookie: _xsrf=2|abc; Path=/\r\nX-Content-Type-Options: nosniff\r\n\r\n";

fn parsing(c: &mut Criterion) {
    let limits = HeadLimits::default();
    let mut g = c.benchmark_group("http");
    g.throughput(Throughput::Bytes(REQUEST.len() as u64));
    g.bench_function("parse_request_head", |b| {
        b.iter(|| black_box(parse_request(black_box(REQUEST), &limits)))
    });
    g.throughput(Throughput::Bytes(RESPONSE.len() as u64));
    g.bench_function("parse_response_head", |b| {
        b.iter(|| black_box(parse_response(black_box(RESPONSE), Method::Get, 64 * 1024)))
    });
    let head = parse_request(REQUEST, &limits)
        .expect("valid")
        .expect("complete");
    let id: RequestId = "550e8400-e29b-41d4-a716-446655440000"
        .parse()
        .expect("valid");
    let hop = ClientHop::new("10.0.0.1:40000".parse().expect("addr"), 10205, false);
    let mut out = Vec::with_capacity(2048);
    g.throughput(Throughput::Bytes(REQUEST.len() as u64));
    g.bench_function("encode_upstream_request", |b| {
        b.iter(|| {
            out.clear();
            upstream_request(
                &mut out,
                REQUEST,
                &head,
                Some(&id),
                &hop,
                "10.0.0.2:8080".parse().expect("addr"),
            );
            black_box(out.len())
        })
    });
    let mut chunked = Vec::new();
    for _ in 0..64 {
        chunked.extend_from_slice(b"400\r\n");
        chunked.extend_from_slice(&[b'x'; 1024]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    g.throughput(Throughput::Bytes(chunked.len() as u64));
    g.bench_function("chunked_decode_64k", |b| {
        b.iter(|| black_box(decode_all(black_box(&chunked))))
    });
    g.finish();
}

criterion_group!(benches, parsing);
criterion_main!(benches);
