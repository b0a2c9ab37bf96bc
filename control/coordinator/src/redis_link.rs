//! The coordinator's Redis command connection: a `ConnectionManager` that is
//! replaced when a call goes unanswered.
//!
//! The manager reconnects by itself when its connection breaks (a reset, a closed
//! socket), but not when a call merely times out — and a connection dropped on the
//! way without a reset (a NAT or firewall forgetting it, an address failed over to
//! another host) only ever times out: every publish, heartbeat mark, leadership
//! renewal and last-access read failed from then on, for as long as the kernel kept
//! retransmitting into the void (a quarter of an hour by default; for ever behind
//! a relay that keeps the connection open). A call without an answer within
//! [`ANSWER_WITHIN`] now has a fresh manager opened in the background, which
//! the following calls use once it is connected.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// A call's answer must come within this, a little under the callers' own bound
/// ([`crate::REDIS_CALL_TIMEOUT`]), so that it is this layer that sees the timeout.
pub const ANSWER_WITHIN: Duration = Duration::from_millis(1_800);

/// A Redis command connection, cheap to clone (every clone uses the current
/// manager).
#[derive(Clone)]
pub struct RedisConn(Arc<Link>);

struct Link {
    client: redis::Client,
    config: ConnectionManagerConfig,
    current: Mutex<ConnectionManager>,
    /// A replacement is being opened.
    replacing: AtomicBool,
}

impl RedisConn {
    /// Connects to `client` with `config`.
    pub async fn connect(
        client: redis::Client,
        config: ConnectionManagerConfig,
    ) -> RedisResult<Self> {
        let manager = ConnectionManager::new_with_config(client.clone(), config.clone()).await?;
        Ok(Self(Arc::new(Link {
            client,
            config,
            current: Mutex::new(manager),
            replacing: AtomicBool::new(false),
        })))
    }

    fn current(&self) -> ConnectionManager {
        self.0
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A call went unanswered: open a fresh manager in the background (one at a
    /// time); the calls after it is connected use it.
    fn replace(&self) {
        if self.0.replacing.swap(true, Ordering::AcqRel) {
            return;
        }
        crate::events::count_command_reconnect();
        tracing::warn!("redis call unanswered; opening a fresh connection");
        let link = self.0.clone();
        tokio::spawn(async move {
            let opened = tokio::time::timeout(
                crate::REDIS_CALL_TIMEOUT * 2,
                ConnectionManager::new_with_config(link.client.clone(), link.config.clone()),
            )
            .await;
            match opened {
                Ok(Ok(manager)) => {
                    *link.current.lock().unwrap_or_else(|p| p.into_inner()) = manager;
                    tracing::info!("redis command connection replaced");
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "fresh redis connection failed"),
                Err(_) => tracing::warn!("fresh redis connection not opened in time"),
            }
            link.replacing.store(false, Ordering::Release);
        });
    }

    /// Runs one call on the current manager within [`ANSWER_WITHIN`].
    async fn call<T>(
        &self,
        call: impl std::future::Future<Output = RedisResult<T>>,
    ) -> RedisResult<T> {
        let answered = tokio::time::timeout(ANSWER_WITHIN, call).await;
        let result = answered
            .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()));
        if result.as_ref().is_err_and(|e| e.is_timeout()) {
            self.replace();
        }
        result
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut manager = self.current();
            self.call(manager.req_packed_command(cmd)).await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let mut manager = self.current();
            self.call(manager.req_packed_commands(cmd, offset, count))
                .await
        })
    }

    fn get_db(&self) -> i64 {
        self.current().get_db()
    }
}
