//! `appproxy-shared`: what every appproxy component agrees on.
//!
//! - [`config`]: TOML config files read with errors that name the key path and the fix;
//! - [`request_id`]: the validated request-ID value type and its generation;
//! - [`header`]: which headers carry the ID and the absent/invalid policy;
//! - [`context`]: the current request ID, bound around futures on any runtime;
//! - [`trace`]: W3C Trace Context (`traceparent`, `tracestate`) and span contexts;
//! - [`telemetry`]: JSON-lines / logfmt logging that stamps `request_id` on every event;
//! - [`middleware`] (feature `tower`): the request-ID + access-log layer for axum services;
//! - [`otlp`] (feature `otlp`): OTLP/HTTP export of finished spans, off the request path;
//! - [`tls_roots`] (feature `tls-roots`): TLS trust anchors from a PEM bundle or the
//!   system's CA bundle;
//! - [`jwt`]: HS256 tokens (setup, inference, storage sessions);
//! - [`nofile`]: the descriptor limit raised at start, as far as allowed;
//! - [`model`]: circuits, routes and the event envelope in the platform's wire shapes;
//! - [`wire`]: the worker ⇄ coordinator contract (registration, circuit sets, events,
//!   acknowledgements, last-access marks) as typed structs both sides use;
//! - [`pubsub`] (feature `redis`): a Redis subscription that reconnects with capped
//!   backoff, used by the coordinator and the worker alike.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod context;
pub mod fair_share;
pub mod fsize;
pub mod header;
pub mod jwt;
pub mod logout;
#[cfg(feature = "tower")]
pub mod middleware;
pub mod model;
pub mod nofile;
#[cfg(feature = "otlp")]
pub mod otlp;
#[cfg(feature = "redis")]
pub mod pubsub;
pub mod rate_floor;
#[cfg(feature = "redis")]
pub mod redis_call;
#[cfg(feature = "redis")]
pub mod redis_link;
pub mod request_id;
pub mod secret;
pub mod telemetry;
#[cfg(feature = "tls-roots")]
pub mod tls_roots;
pub mod trace;
pub mod wire;

pub use context::{
    current_request_id, current_span, inherit, inherit_child, scope, scope_traced,
    with_origin_request, with_request_context, with_request_id, RequestScope,
};
pub use header::{IdPolicy, PRIMARY_HEADER};
pub use request_id::{IdVersion, InvalidRequestId, RequestId};
pub use trace::{SpanContext, TraceContext, TraceParent, TraceState};
