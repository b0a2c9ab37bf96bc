//! `appproxy-control`: the tokio control plane — the coordinator and the
//! storage-proxy.
//!
//! This build carries their configuration schemas (the keys operators rely on, with
//! defaults and validation) and the binaries' command lines; the services themselves
//! are not in this build, and the binaries say so instead of pretending to serve.
#![forbid(unsafe_code)]

pub mod config;
