//! The PostgreSQL store facing a faulty path to its server: a TCP relay in front
//! of a throwaway PostgreSQL can make a connection go silent (nothing forwarded
//! either way, nothing closed), as a dropped route or a frozen middlebox does. A
//! call on such a connection ends at its deadline and the connection is closed,
//! never drawn again; a transaction the silent client left open lets its row locks
//! go at the server's idle-in-transaction timeout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appproxy_coordinator::store::Store;
use appproxy_test_support::pg::Pg;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One relayed connection's state.
#[derive(Default)]
struct Link {
    /// Nothing is forwarded any more, either way; the sockets stay open.
    silent: AtomicBool,
    /// The client sent [`Relay::silence_after`]'s text: its next message is
    /// forwarded, then the link goes silent.
    after_next: AtomicBool,
}

/// A TCP relay to a local port whose connections can be made silent.
struct Relay {
    port: u16,
    links: Arc<Mutex<Vec<Arc<Link>>>>,
    /// Text in a client message after which (and one more message) its link goes
    /// silent.
    trigger: Arc<Mutex<Option<Vec<u8>>>>,
}

impl Relay {
    async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let port = listener.local_addr().expect("relay addr").port();
        let links: Arc<Mutex<Vec<Arc<Link>>>> = Default::default();
        let trigger: Arc<Mutex<Option<Vec<u8>>>> = Default::default();
        let (l, t) = (links.clone(), trigger.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let link = Arc::new(Link::default());
                l.lock().expect("links").push(link.clone());
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, link.clone(), Some(t.clone())));
                tokio::spawn(pump(sr, cw, link, None));
            }
        });
        Self {
            port,
            links,
            trigger,
        }
    }

    /// Every connection open now goes silent.
    fn silence_all(&self) {
        for link in self.links.lock().expect("links").iter() {
            link.silent.store(true, Ordering::SeqCst);
        }
    }

    /// The connection whose client next sends `text` goes silent after its
    /// following message (the statement's execution, once prepared).
    fn silence_after(&self, text: &str) {
        *self.trigger.lock().expect("trigger") = Some(text.as_bytes().to_vec());
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/appproxy", self.port)
    }
}

/// Forwards `from` to `to` until either ends or the link goes silent, when it holds
/// both open and forwards nothing more.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<Link>,
    trigger: Option<Arc<Mutex<Option<Vec<u8>>>>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let Ok(n) = from.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        if link.silent.load(Ordering::SeqCst) {
            break;
        }
        let chunk = &buf[..n];
        let mut then_silent = false;
        if let Some(trigger) = &trigger {
            if link.after_next.load(Ordering::SeqCst) {
                then_silent = true;
            } else {
                let mut armed = trigger.lock().expect("trigger");
                if let Some(text) = armed.as_ref() {
                    if chunk.windows(text.len()).any(|w| w == &text[..]) {
                        link.after_next.store(true, Ordering::SeqCst);
                        *armed = None;
                    }
                }
            }
        }
        if to.write_all(chunk).await.is_err() {
            return;
        }
        if then_silent {
            link.silent.store(true, Ordering::SeqCst);
            break;
        }
    }
    // Silent: both sockets held open, nothing read or written.
    std::future::pending::<()>().await;
    drop((from, to));
}

fn worker_body(authority: &str) -> serde_json::Value {
    json!({"authority": authority, "frontend_mode": "port", "protocol": "http",
        "hostname": "proxy1.test", "tls_listen": false, "tls_advertised": true, "api_port": 10201,
        "port_range": [10205, 10300], "wildcard_domain": null, "wildcard_traffic_port": null,
        "accepted_traffics": ["interactive"], "filtered_apps_only": false,
        "traefik_last_used_marker_path": null, "node_id": "node-a"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gone_silent_is_closed_not_drawn_again() {
    let pg = Pg::start();
    let relay = Relay::start(pg.port).await;
    let store = Store::open_with(Some(&relay.url()), std::path::Path::new("unused"), 2, 0)
        .await
        .expect("open through the relay");
    store.workers().await.expect("a call through the relay");
    relay.silence_all();
    let err = store
        .workers()
        .await
        .expect_err("no answer on a silent path");
    assert!(err.is_unavailable(), "{err}");
    // The silent connection is gone from the pool: every later call has a fresh one.
    for i in 0..4 {
        let started = Instant::now();
        store
            .workers()
            .await
            .unwrap_or_else(|e| panic!("call {i} after the silent one: {e}"));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "call {i} took {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_left_by_a_silent_client_lets_its_lock_go() {
    let pg = Pg::start();
    let relay = Relay::start(pg.port).await;
    let store = Store::open_with(Some(&relay.url()), std::path::Path::new("unused"), 2, 0)
        .await
        .expect("open through the relay");
    let worker = store
        .upsert_worker(&worker_body("worker-a"))
        .await
        .expect("worker");
    // The heartbeat's transaction locks the worker's row, then its client goes silent.
    relay.silence_after("FOR UPDATE");
    let err = store
        .heartbeat_node(worker, Some("node-a"))
        .await
        .expect_err("no answer on a silent path");
    assert!(err.is_unavailable(), "{err}");
    let held = |pg: &Pg| {
        pg.psql(
            "appproxy",
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
        )
    };
    assert_eq!(held(&pg), "1", "the silent client's transaction is open");
    // The server ends it within its idle-in-transaction timeout: the row is free.
    let until = Instant::now() + Duration::from_secs(30);
    while held(&pg) != "0" {
        assert!(
            Instant::now() < until,
            "the silent client's transaction still holds its lock"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    pg.psql(
        "appproxy",
        &format!(
            "SET lock_timeout = '2s'; UPDATE workers SET status = 'LOST' WHERE id = '{worker}'"
        ),
    );
    assert!(
        store
            .heartbeat_node(worker, Some("node-a"))
            .await
            .expect("a heartbeat on a fresh connection"),
        "the worker is known"
    );
}
