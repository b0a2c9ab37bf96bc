//! `appproxy-dataplane`: the worker.
//!
//! One glommio executor per core, each with its own listeners, route table, upstream
//! pool and readiness reactor; HTTP/1.1 handled by hand; every request carries its
//! request ID from the client to the app and into every log line.
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod api;
pub mod auth;
pub mod client_table;
pub mod config;
pub mod core;
pub mod http;
pub mod http2;
pub mod introspect;
pub mod io;
pub mod link;
pub mod liveness;
pub mod lookup;
pub mod metrics;
pub mod preflight;
pub mod proxy;
pub mod proxy_protocol;
pub mod reactor;
pub mod readiness;
pub mod relay;
pub mod request_rate;
pub mod signal;
pub mod tcp;
pub mod tls;
pub mod trace;
pub mod worker;
pub mod ws;

pub use appproxy_shared::RequestId;
