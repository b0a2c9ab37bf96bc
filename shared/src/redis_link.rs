//! The control plane's Redis command connection (the coordinator's commands, the
//! storage-proxy's events): a `ConnectionManager` that is replaced when a call
//! goes unanswered, or its answers cannot be read.
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
//!
//! A Redis that refuses connections (stopped, not hanging) costs a call one
//! refused attempt, a few milliseconds. Every call awaits the manager's
//! reconnection, and the manager's reconnection slept its back-off between
//! attempts (1-2 s whatever `max_delay`: the first delay is the back-off's
//! minimum, 1 s, plus up to as much again of jitter): a heartbeat took 1.5 s, a
//! removal (its publish and the publish's retry) 3 s, a failed creation (that, and
//! its withdrawal's) 6 s, for a refusal known at once. The manager now makes one
//! attempt per reconnection ([`connect`](RedisConn::connect) sets no retries).
//! Its failure stays in the manager until a call comes, and that call only
//! starts the next attempt: the first call once Redis is back met the refusal
//! left by the outage's last call and failed too. A call that meets a refusal is
//! sent once more, on the attempt its failure started — a refusal means the command
//! was never sent, so it is never run twice. Both are within [`ANSWER_WITHIN`], as
//! is an attempt that hangs (each is bounded by the connection timeout too).
//!
//! A Redis restarted (or failed over) leaves the manager's connection stale: the
//! first command after it fails with a broken pipe, a reset or an end of stream, and
//! the manager reconnects only then. Every caller but the circuit events took that
//! failure as final: the first event after a restart (a `worker_lost` entry, a
//! route-health broadcast) was lost, never sent again. A call that meets a dropped
//! connection is now sent once more, on the fresh one. Redis closed the stale
//! connection before the command reached it, so it did not run it. A command Redis
//! ran just before its connection broke (a crash or failover between running it and
//! answering) may run twice: a mark or a lease set again is the same, a request
//! count is added twice and an event (`XADD`, `PUBLISH`: a circuit event may go
//! out up to four times with its own retry) reaches the manager twice rather than
//! never — the trade this makes.
//!
//! The manager reconnects by itself only after an I/O error. A reconnection whose
//! handshake met an answer it could not read (cut short by a balancer resetting
//! connections mid-answer, not RESP, of an unexpected type) stayed its failure for
//! every call after it, however healthy Redis was again: no lease, no heartbeat
//! mark, every creation 503, until a restart (an outside tester's find: one second
//! of such answers was enough). A call whose answer is unreadable (a parse error:
//! the connection's framing is lost) now has a fresh manager opened as an
//! unanswered one does, and so does any call once every call has failed for
//! [`FAILING_FOR`] with errors that are no I/O error (which the manager answers
//! with a reconnection of its own): a handshake's failure the manager keeps may
//! read as a server's `ERR` ("refused to switch database"), so server replies
//! count too; a server refusing every call for that long (`OOM`) costs a fresh
//! connection per period.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use crate::redis_call::REDIS_CALL_TIMEOUT;

/// A call's answer must come within this, a little under the callers' own bound
/// ([`REDIS_CALL_TIMEOUT`]), so that it is this layer that sees the timeout.
pub const ANSWER_WITHIN: Duration = Duration::from_millis(1_800);

/// Every call failing this long (no I/O error: see the module's header) has a
/// fresh manager opened.
pub const FAILING_FOR: Duration = Duration::from_secs(3);

/// How long [`RedisConn::connect`] waits before its second attempt.
const FIRST_CONNECTION_RETRY: Duration = Duration::from_secs(1);

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
    /// Called as each replacement starts (a metric of the caller's).
    on_replace: fn(),
    /// Since when every call has failed (no I/O error; `None`: the last call was
    /// answered).
    failing_since: Mutex<Option<std::time::Instant>>,
}

impl RedisConn {
    /// Connects to `client` with `config`, its reconnections made of one attempt
    /// each (any number of retries in `config` is overridden: their back-off was
    /// awaited by every call while Redis refused). The first connection is
    /// attempted twice, [`FIRST_CONNECTION_RETRY`] apart, as the manager's own
    /// retry did: a Redis starting with the coordinator may be a moment late.
    /// `on_replace` is called as each replacement starts (to count them).
    pub async fn connect(
        client: redis::Client,
        config: ConnectionManagerConfig,
        on_replace: fn(),
    ) -> RedisResult<Self> {
        let config = config.set_number_of_retries(0);
        let manager = match ConnectionManager::new_with_config(client.clone(), config.clone()).await
        {
            Ok(manager) => manager,
            Err(_) => {
                tokio::time::sleep(FIRST_CONNECTION_RETRY).await;
                ConnectionManager::new_with_config(client.clone(), config.clone()).await?
            }
        };
        Ok(Self(Arc::new(Link {
            client,
            config,
            current: Mutex::new(manager),
            replacing: AtomicBool::new(false),
            on_replace,
            failing_since: Mutex::new(None),
        })))
    }

    fn current(&self) -> ConnectionManager {
        self.0
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A call went unanswered (`why`): open a fresh manager in the background
    /// (one at a time); the calls after it is connected use it.
    fn replace(&self, why: &str) {
        if self.0.replacing.swap(true, Ordering::AcqRel) {
            return;
        }
        (self.0.on_replace)();
        tracing::warn!("redis {why}; opening a fresh connection");
        let link = self.0.clone();
        tokio::spawn(async move {
            let opened = tokio::time::timeout(
                REDIS_CALL_TIMEOUT * 2,
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

    /// Runs one call (`send` on the current manager) within [`ANSWER_WITHIN`],
    /// sent once more if the connection it met was refused: that refusal may be
    /// an earlier call's (a failed reconnection stays in the manager until a call
    /// comes), and the manager started a fresh attempt on it.
    async fn call<T, F>(&self, send: impl Fn(ConnectionManager) -> F) -> RedisResult<T>
    where
        F: std::future::Future<Output = RedisResult<T>>,
    {
        let call = async {
            match send(self.current()).await {
                Err(e) if e.is_connection_refusal() || e.is_connection_dropped() => {
                    send(self.current()).await
                }
                other => other,
            }
        };
        let answered = tokio::time::timeout(ANSWER_WITHIN, call).await;
        let result = answered
            .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()));
        let mut since = self
            .0
            .failing_since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok(_) => *since = None,
            Err(e) if e.is_timeout() => self.replace("call unanswered"),
            Err(e) if e.kind() == redis::ErrorKind::ParseError => self.replace("answer unreadable"),
            // Refused, dropped, reset: the manager reconnects by itself.
            Err(e) if e.is_io_error() => {}
            // Anything else, for every call for `FAILING_FOR`: a failure the
            // manager may be keeping (a handshake's, which may read as a server's
            // `ERR`: "refused to switch database"), or the server's own for a
            // while (a fresh connection costs one per period then).
            Err(_) => {
                let now = std::time::Instant::now();
                let failing = *since.get_or_insert(now);
                if now.duration_since(failing) >= FAILING_FOR {
                    *since = Some(now);
                    self.replace(&format!("calls failing for {} s", FAILING_FOR.as_secs()));
                }
            }
        }
        result
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            self.call(|mut manager| async move { manager.req_packed_command(cmd).await })
                .await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.call(
                |mut manager| async move { manager.req_packed_commands(cmd, offset, count).await },
            )
            .await
        })
    }

    fn get_db(&self) -> i64 {
        self.current().get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first command after Redis restarted is carried out: it met the stale
    /// connection (a broken pipe or an end of stream) and was sent once more on a
    /// fresh one. Before, it failed, and an event sent then was lost.
    #[test]
    fn the_first_call_after_a_restart_is_carried_out() {
        let mut redis = appproxy_test_support::redis::Redis::start();
        let rt = runtime();
        rt.block_on(async {
            let client = redis::Client::open(redis.url()).expect("url");
            let mut conn = RedisConn::connect(client, ConnectionManagerConfig::new(), || {})
                .await
                .expect("connect");
            let _: () = redis::cmd("SET")
                .arg("before")
                .arg("1")
                .query_async(&mut conn)
                .await
                .expect("SET before the restart");
            redis.restart();
            let added: RedisResult<String> = redis::cmd("XADD")
                .arg("events")
                .arg("*")
                .arg("event")
                .arg("worker_lost")
                .query_async(&mut conn)
                .await;
            assert!(added.is_ok(), "{added:?}");
            let len: usize = redis::cmd("XLEN")
                .arg("events")
                .query_async(&mut conn)
                .await
                .expect("XLEN");
            assert_eq!(len, 1, "added once");
        });
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// `PING` on `conn`.
    async fn ping(mut conn: RedisConn) -> RedisResult<String> {
        redis::cmd("PING").query_async(&mut conn).await
    }

    /// Waits until a `PING` on `conn` is carried out again, `within` at most (else
    /// the test fails with the last error).
    async fn carried_out_again(conn: &RedisConn, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        let mut last = ping(conn.clone()).await;
        while last.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "never carried out again: {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            last = ping(conn.clone()).await;
        }
    }

    /// A fake Redis on `listener`: `+OK` to everything (`+PONG` to `PING`), but
    /// `-ERR` to `SELECT` while `refusing` is set; each connection is closed after
    /// `closing` is set (then cleared).
    fn fake_redis(
        listener: std::net::TcpListener,
        refusing: std::sync::Arc<AtomicBool>,
        closing: std::sync::Arc<AtomicBool>,
    ) {
        use std::io::{BufRead as _, Write as _};
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (refusing, closing) = (refusing.clone(), closing.clone());
                std::thread::spawn(move || {
                    let mut out = conn.try_clone().expect("clone");
                    let mut lines = std::io::BufReader::new(conn);
                    loop {
                        // `*N` then N bulk strings (`$len`, the text).
                        let mut line = String::new();
                        if lines.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let n: usize = line.trim().trim_start_matches('*').parse().unwrap_or(0);
                        let mut words = Vec::new();
                        for _ in 0..n * 2 {
                            let mut w = String::new();
                            if lines.read_line(&mut w).unwrap_or(0) == 0 {
                                return;
                            }
                            words.push(w.trim().to_owned());
                        }
                        if closing.swap(false, Ordering::SeqCst) {
                            return;
                        }
                        let command = words.get(1).map(|w| w.to_ascii_uppercase());
                        let answer: &[u8] = match command.as_deref() {
                            Some("SELECT") if refusing.load(Ordering::SeqCst) => {
                                b"-ERR not now\r\n"
                            }
                            Some("PING") => b"+PONG\r\n",
                            _ => b"+OK\r\n",
                        };
                        if out.write_all(answer).is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }

    /// A reconnection whose `SELECT` a server refused (an `ERR` reply, which the
    /// client library keeps as the manager's answer to every call after it) leaves
    /// no lasting failure once the server takes it again: every call failing for
    /// [`FAILING_FOR`] has a fresh connection opened. Before, a server's error
    /// reply reset that count, and the failure stayed until a restart (a
    /// reviewer's find).
    #[test]
    fn a_reconnection_whose_select_was_refused_leaves_no_lasting_failure() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let refusing = std::sync::Arc::new(AtomicBool::new(false));
        let closing = std::sync::Arc::new(AtomicBool::new(false));
        fake_redis(listener, refusing.clone(), closing.clone());
        let rt = runtime();
        rt.block_on(async {
            let client = redis::Client::open(format!("redis://{addr}/6")).expect("url");
            let conn = RedisConn::connect(client, ConnectionManagerConfig::new(), || {})
                .await
                .expect("connect");
            assert_eq!(ping(conn.clone()).await.expect("PING"), "PONG");
            // The connection dropped while SELECT is refused: the reconnection fails.
            refusing.store(true, Ordering::SeqCst);
            closing.store(true, Ordering::SeqCst);
            for _ in 0..3 {
                let _ = ping(conn.clone()).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            refusing.store(false, Ordering::SeqCst);
            carried_out_again(&conn, FAILING_FOR * 4).await;
        });
    }

    /// Answers cut short while the manager reconnects (a balancer resetting
    /// connections mid-answer) leave no lasting failure: once Redis answers
    /// whole again, calls are carried out. Before, the reconnection's failed
    /// handshake (a parse error, no I/O error) stayed the manager's answer to
    /// every call until the process was restarted.
    #[test]
    fn answers_cut_short_during_a_reconnection_leave_no_lasting_failure() {
        let redis = appproxy_test_support::redis::Redis::start();
        let relay = appproxy_test_support::relay::Relay::start(([127, 0, 0, 1], redis.port).into());
        let rt = runtime();
        rt.block_on(async {
            // A database other than 0, as the coordinator's: the handshake selects
            // it, and that answer cut short is what the manager kept.
            let client = redis::Client::open(format!("redis://{}/6", relay.addr)).expect("url");
            let mut conn = RedisConn::connect(client, ConnectionManagerConfig::new(), || {})
                .await
                .expect("connect");
            assert_eq!(ping(conn.clone()).await.expect("PING"), "PONG");
            relay.cut(true);
            // The answer cut short, and the reconnections it starts meet the same.
            for _ in 0..3 {
                assert!(ping(conn.clone()).await.is_err());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            relay.cut(false);
            carried_out_again(&conn, Duration::from_secs(20)).await;
            let _: () = redis::cmd("SET")
                .arg("after")
                .arg("1")
                .query_async(&mut conn)
                .await
                .expect("SET once answers are whole");
        });
    }
}
