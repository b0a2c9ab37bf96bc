//! `appproxy-control`: the tokio control plane — the coordinator and the
//! storage-proxy.
//!
//! The storage-proxy ([`storage`]) serves; the coordinator is not in this build (its
//! binary validates its config and says so instead of pretending to serve).
#![forbid(unsafe_code)]

pub mod config;
pub mod storage;
