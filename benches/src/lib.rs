//! `appproxy-benches`: the throughput harness's report (tables, JSON, Markdown, SVG)
//! and the criterion micro-benchmarks under `benches/`.
#![forbid(unsafe_code)]

pub mod arm_cost;
pub mod grpc;
pub mod park_cost;
pub mod report;
pub mod ws;
