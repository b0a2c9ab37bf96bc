//! Request-ID micro-benchmarks: generation (v4, v7), validation, header extraction.
//! Goals on the reference machine: generation ≤ 100 ns, validation ≤ 50 ns.
// `criterion_main!` defines an undocumented `pub fn main`.
#![allow(missing_docs)]

use std::hint::black_box;

use appproxy_shared::header::{extract, resolve, IdPolicy};
use appproxy_shared::{IdVersion, RequestId};
use criterion::{criterion_group, criterion_main, Criterion};

fn generation(c: &mut Criterion) {
    c.bench_function("request_id/generate_v4", |b| {
        b.iter(|| black_box(RequestId::generate(IdVersion::V4)))
    });
    c.bench_function("request_id/generate_v7", |b| {
        b.iter(|| black_box(RequestId::generate(IdVersion::V7)))
    });
}

fn validation(c: &mut Criterion) {
    let uuid = b"550e8400-e29b-41d4-a716-446655440000";
    c.bench_function("request_id/validate_uuid", |b| {
        b.iter(|| black_box(RequestId::parse(black_box(uuid))))
    });
    let long = [b'a'; 128];
    c.bench_function("request_id/validate_128_bytes", |b| {
        b.iter(|| black_box(RequestId::parse(black_box(&long))))
    });
    let bad = b"550e8400 e29b";
    c.bench_function("request_id/refuse_space", |b| {
        b.iter(|| black_box(RequestId::parse(black_box(bad))))
    });
}

fn extraction(c: &mut Criterion) {
    let headers: Vec<(&[u8], &[u8])> = vec![
        (b"Host", b"example.com"),
        (b"User-Agent", b"wrk"),
        (b"Accept", b"*/*"),
        (
            b"X-Backend-Request-ID",
            b"550e8400-e29b-41d4-a716-446655440000",
        ),
    ];
    c.bench_function("request_id/extract_and_resolve", |b| {
        b.iter(|| {
            let ex = extract(black_box(&headers).iter().copied());
            black_box(resolve(IdPolicy::GenerateIfMissing, ex, IdVersion::V4))
        })
    });
}

criterion_group!(benches, generation, validation, extraction);
criterion_main!(benches);
