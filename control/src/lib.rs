//! `appproxy-control`: the tokio control plane — the coordinator and the
//! storage-proxy.
//!
//! The storage-proxy ([`storage`]) and a single-node coordinator ([`coordinator`],
//! embedded SQLite; no PostgreSQL, Redis events or worker control agent yet).
#![forbid(unsafe_code)]

pub mod config;
pub mod coordinator;
pub mod service;
pub mod storage;
