//! `appproxy-control-common`: what the two control-plane services share and nothing
//! else — reading their config files ([`config`]), the metric primitives of their
//! `/metrics` ([`metrics`]), the process runner with signal handling ([`service`]),
//! the API server loop with its time and connection bounds ([`server`]) and the
//! config command line (shared with the worker binary, [`cli`]). The
//! coordinator is `appproxy-coordinator`, the storage-proxy `appproxy-storage-proxy`.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod metrics;
pub mod server;
pub mod service;
