//! `appproxy-control`: the tokio control plane — the coordinator and the
//! storage-proxy.
//!
//! The storage-proxy ([`storage`]) and the coordinator ([`coordinator`]: PostgreSQL or
//! embedded SQLite, Redis events with worker acknowledgement, leader jobs; embeddable
//! in the worker process for single-node use).
#![forbid(unsafe_code)]

pub mod config;
pub mod coordinator;
pub mod metrics;
pub mod service;
pub mod storage;
