//! The bound on every Redis command a component sends: an outage costs a call at
//! most [`REDIS_CALL_TIMEOUT`] (then the caller's fallback applies), never a hang.
//! The coordinator, the worker's control agent and the storage-proxy's events share
//! it.

use std::time::Duration;

/// How long one Redis call may take.
pub const REDIS_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs a Redis call under [`REDIS_CALL_TIMEOUT`]; past it, an I/O error ("redis
/// call timed out").
pub async fn bounded<T>(
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    tokio::time::timeout(REDIS_CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err((redis::ErrorKind::IoError, "redis call timed out").into()))
}
