//! WebSocket frame inspection (the relay's per-read cost): many small masked frames,
//! and one large frame streamed through.
// `criterion_main!` defines an undocumented `pub fn main`.
#![allow(missing_docs)]

use std::hint::black_box;

use appproxy_dataplane::ws::Inspector;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x82];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&[1, 2, 3, 4]);
    f.extend(
        payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]),
    );
    f
}

fn inspect(c: &mut Criterion) {
    let mut small = Vec::new();
    for _ in 0..256 {
        small.extend(frame(&[b'x'; 64]));
    }
    let mut g = c.benchmark_group("ws");
    g.throughput(Throughput::Elements(256));
    g.bench_function("inspect_256_small_frames", |b| {
        b.iter(|| {
            let mut ins = Inspector::new(true, 0);
            black_box(ins.feed(black_box(&small)))
        })
    });
    let big = frame(&vec![7u8; 1 << 20]);
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.bench_function("inspect_1mib_frame_in_64k_reads", |b| {
        b.iter(|| {
            let mut ins = Inspector::new(true, 0);
            for chunk in big.chunks(64 * 1024) {
                black_box(ins.feed(black_box(chunk)).ok());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, inspect);
criterion_main!(benches);
