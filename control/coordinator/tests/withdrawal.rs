//! A failed creation leaves nothing stored, whatever the store does meanwhile: the
//! circuit of a creation that was not acknowledged, that its caller gave up on, or
//! whose endpoint row could not be written is withdrawn — tried again until the
//! store takes the removal — and a bulk endpoint creation is all or nothing. A
//! creation under way is marked in the store: a withdrawal a stopped process left
//! undone is made by the sweep of the next leader, another coordinator never hands
//! out a circuit still being created, and a settled circuit is never swept. Each
//! against the coordinator binary on a throwaway PostgreSQL (and Redis where
//! acknowledgements are awaited).

#[path = "common/api.rs"]
mod api;
mod common;

use api::{endpoint_body, log_lines, AUTH, INFERENCE_WORKER, SESSION};
use common::Coordinator;

use appproxy_test_support::http::Resp;
use appproxy_test_support::pg::Pg;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The longest a test waits for what should happen (bounded waits only).
const PATIENCE: Duration = Duration::from_secs(90);

/// Starts the coordinator on `pg`; `extra`: more `[coordinator]` keys, then any
/// further tables.
fn start_with(dir: &std::path::Path, pg: &Pg, extra: &str) -> Coordinator {
    common::start(dir, &api::config(extra, &format!("url = \"{}\"", pg.url())))
}

/// A JSON request to the coordinator.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Resp {
    let mut all = headers.to_vec();
    all.push(("Content-Type", "application/json"));
    appproxy_test_support::http::request_within(addr, method, path, &all, body.as_bytes(), PATIENCE)
        .expect("a response")
}

/// Waits (bounded) until `done`; panics with `what` otherwise.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`api::setup`]: the interactive port worker `worker-1` registered and a
/// `/v2/conf` token, each answer awaited [`PATIENCE`] at most (as [`request`]'s).
fn setup(c: &Coordinator) -> String {
    api::setup(c, PATIENCE, |_| {})
}

fn register(c: &Coordinator, worker: &str) {
    let r = request(c.addr, "PUT", "/api/worker", &[AUTH], worker);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

fn count(pg: &Pg, sql: &str) -> u64 {
    pg.psql("appproxy", sql).parse().expect("a count")
}

/// Waits until the coordinator listens for acknowledgements on Redis.
fn listening(dir: &std::path::Path) {
    wait_for("never listened for acknowledgements", || {
        log_lines(dir)
            .iter()
            .any(|l| l["message"] == "listening for acknowledgements")
    });
}

/// A coordinator (a node) on `pg` with `extra` in its config, in a directory of
/// its own, once it listens.
fn node(pg: &Pg, extra: &str) -> (tempfile::TempDir, Coordinator) {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start_with(dir.path(), pg, extra);
    listening(dir.path());
    (dir, c)
}

/// `N` coordinators (nodes) on `pg` with `extra` in their config, started one after
/// another as [`node`] starts them (each in a directory of its own, once it
/// listens), then the interactive worker and a `/v2/conf` token set up through the
/// first ([`setup`]): the nodes, and the `/v2/proxy/auth` path of [`SESSION`]'s
/// `jupyter` app with that token.
fn nodes_with_token<const N: usize>(
    pg: &Pg,
    extra: &str,
) -> ([(tempfile::TempDir, Coordinator); N], String) {
    let nodes: [(tempfile::TempDir, Coordinator); N] = std::array::from_fn(|_| node(pg, extra));
    let token = setup(&nodes[0].1);
    let path =
        format!("/v2/proxy/auth?token={token}&session_id={SESSION}&app=jupyter&protocol=http");
    (nodes, path)
}

/// A `GET` of `path` on the coordinator at `addr` (asking for JSON) under the
/// request ID `id`, sent from a thread of its own: its answer when joined.
fn ask(addr: SocketAddr, path: &str, id: &str) -> std::thread::JoinHandle<Resp> {
    let (path, id) = (path.to_owned(), id.to_owned());
    std::thread::spawn(move || {
        request(
            addr,
            "GET",
            &path,
            &[
                ("Accept", "application/json"),
                ("X-Backend-Request-ID", id.as_str()),
            ],
            "",
        )
    })
}

fn logged(dir: &std::path::Path, message: &str, request_id: &str) -> bool {
    log_lines(dir)
        .iter()
        .any(|l| l["message"] == message && l["request_id"] == request_id)
}

/// A creation the worker did not acknowledge, with PostgreSQL frozen when its
/// withdrawal ran: the API answered 503, yet the circuit stayed stored (and the
/// worker deployed it from its next fetch) — the withdrawal was one removal whose
/// failure became the answer, and nothing tried again. The answer is still 503,
/// and the withdrawal goes on in the background until the store takes it, under
/// the creating request's ID.
#[test]
fn an_unacknowledged_creation_is_withdrawn_once_the_store_answers_again() {
    let pg = Pg::start();
    let redis = appproxy_test_support::redis::Redis::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start_with(
        dir.path(),
        &pg,
        &format!(
            "worker_ack_timeout_secs = 2\n[redis]\nurl = \"{}\"",
            redis.url()
        ),
    );
    listening(dir.path());
    let token = setup(&c);
    let circuits = || count(&pg, "SELECT count(*) FROM circuits");
    let (addr, path) = (
        c.addr,
        format!("/v2/proxy/auth?token={token}&session_id={SESSION}&app=jupyter&protocol=http"),
    );
    // No worker acknowledges.
    let creation = std::thread::spawn(move || {
        request(
            addr,
            "GET",
            &path,
            &[
                ("Accept", "application/json"),
                ("X-Backend-Request-ID", "withdraw-fails-1"),
            ],
            "",
        )
    });
    wait_for("the circuit was never stored", || circuits() == 1);
    let frozen = pg.freeze();
    let r = creation.join().expect("creation thread");
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    drop(frozen);
    wait_for(
        "the circuit of a creation answered 503 is still stored after the store came back",
        || circuits() == 0,
    );
    assert!(
        logged(
            dir.path(),
            "circuit not withdrawn: the store failed; withdrawing it in the background",
            "withdraw-fails-1"
        ),
        "the failed withdrawal is logged under the request's ID"
    );
    wait_for(
        "the late withdrawal is logged under the request's ID",
        || {
            logged(
                dir.path(),
                "circuit withdrawn after the store failed",
                "withdraw-fails-1",
            )
        },
    );
    // Its removal is in the change log workers poll: the insert, then the removal.
    assert_eq!(count(&pg, "SELECT count(*) FROM circuit_changes"), 2);
    // The tries the store failed are counted.
    let m = request(c.addr, "GET", "/metrics", &[], "");
    let text = String::from_utf8_lossy(&m.body).into_owned();
    let retries = text
        .lines()
        .find_map(|l| l.strip_prefix("appproxy_coordinator_circuit_withdrawal_retries_total "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(retries.is_some_and(|n| n >= 1), "{text}");
}

/// A caller that gave up while its creation waited for the acknowledgement, with
/// PostgreSQL frozen for 20 s: the withdrawal made two tries about 11 s apart and
/// then only logged "abandoned circuit not withdrawn"; after the thaw the circuit
/// was stored and deployed. The withdrawal now tries again, with a back-off, until
/// the store takes it.
#[test]
fn an_abandoned_creation_is_withdrawn_once_the_store_answers_again() {
    use std::io::Write as _;
    let pg = Pg::start();
    let redis = appproxy_test_support::redis::Redis::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start_with(
        dir.path(),
        &pg,
        &format!(
            "worker_ack_timeout_secs = 60\n[redis]\nurl = \"{}\"",
            redis.url()
        ),
    );
    listening(dir.path());
    let token = setup(&c);
    let circuits = || count(&pg, "SELECT count(*) FROM circuits");
    let mut s = TcpStream::connect(c.addr).expect("connect");
    s.write_all(
        format!("GET /v2/proxy/auth?token={token}&session_id={SESSION}&app=jupyter&protocol=http HTTP/1.1\r\nHost: t\r\nAccept: application/json\r\nX-Backend-Request-ID: abandoned-1\r\n\r\n")
            .as_bytes(),
    )
    .expect("send");
    wait_for("the circuit was never stored", || circuits() == 1);
    let frozen = pg.freeze();
    drop(s);
    let retried = || {
        log_lines(dir.path())
            .iter()
            .filter(|l| {
                l["message"] == "circuit not withdrawn yet; trying again"
                    && l["request_id"] == "abandoned-1"
            })
            .count()
    };
    // Frozen past the two tries the withdrawal used to make (about 15 s), or
    // until it tried three times.
    let deadline = Instant::now() + Duration::from_secs(20);
    while retried() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(frozen);
    wait_for(
        "an abandoned creation's circuit is still stored after the store came back",
        || circuits() == 0,
    );
    assert!(logged(
        dir.path(),
        "creation abandoned by its caller; circuit withdrawn",
        "abandoned-1"
    ));
    wait_for(
        "the late withdrawal is logged under the request's ID",
        || {
            logged(
                dir.path(),
                "circuit withdrawn after the store failed",
                "abandoned-1",
            )
        },
    );
}

/// `POST /v2/endpoints/{id}` answered 503 when the store failed after the circuit
/// was created (and acknowledged) — the endpoint row not written — yet left the
/// circuit stored and deployed with no endpoint row. The circuit this call made is
/// now withdrawn when its row cannot be written; an endpoint's existing circuit
/// (a sync) is kept.
#[test]
fn an_endpoint_whose_row_cannot_be_written_leaves_no_circuit() {
    let pg = Pg::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start_with(dir.path(), &pg, "");
    register(&c, INFERENCE_WORKER);
    let (kept, fresh) = (
        "e7c08c1e-9a4d-4e6f-8b7a-1c2d3e4f5ab1",
        "e7c08c1e-9a4d-4e6f-8b7a-1c2d3e4f5ab2",
    );
    let create = |id: &str, name: &str| {
        request(
            c.addr,
            "POST",
            &format!("/v2/endpoints/{id}"),
            &[AUTH, ("X-Backend-Request-ID", "ep-row-1")],
            &endpoint_body(name, None),
        )
    };
    let r = create(kept, "kept");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let circuits_of = |id: &str| {
        count(
            &pg,
            &format!("SELECT count(*) FROM circuits WHERE endpoint_id = '{id}'"),
        )
    };
    let rows_of = |id: &str| {
        count(
            &pg,
            &format!("SELECT count(*) FROM endpoints WHERE id = '{id}'"),
        )
    };
    // The endpoint rows cannot be written: the circuit is placed (and announced),
    // then the row's write fails at its deadline.
    let held = pg.hold(
        "appproxy",
        "BEGIN; LOCK TABLE endpoints IN ACCESS EXCLUSIVE MODE",
    );
    let r = create(fresh, "fresh");
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    let r = create(kept, "kept");
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    drop(held);
    wait_for(
        "an endpoint answered 503 left its circuit stored without an endpoint row",
        || circuits_of(fresh) == 0,
    );
    assert_eq!(rows_of(fresh), 0);
    assert_eq!(circuits_of(kept), 1, "a sync's existing circuit is kept");
    assert_eq!(rows_of(kept), 1);
    // Lines reach the log file through a writer thread: waited for (bounded).
    wait_for("the withdrawal is logged under the request's ID", || {
        log_lines(dir.path()).iter().any(|l| {
            l["request_id"] == "ep-row-1"
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(&format!("endpoint {fresh} not created")))
        })
    });
    // Once the store takes writes, the endpoint is created whole.
    let r = create(fresh, "fresh");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!((circuits_of(fresh), rows_of(fresh)), (1, 1));
}

/// `POST /v2/endpoints/bulk` with a good item and one whose `existing_url` no
/// worker serves answered 400 after creating the first (its circuit and row
/// stored, deployed): the URL was looked up only when its item's turn came. Every
/// item's URL is now checked before any is created; and what can only fail
/// mid-list (no free slot, the store) withdraws the circuits the call made before
/// it answers: all or nothing. Circuits the endpoints already had are kept.
#[test]
fn a_bulk_endpoint_creation_is_all_or_nothing() {
    let pg = Pg::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start_with(dir.path(), &pg, "");
    register(&c, INFERENCE_WORKER);
    // One port for inference: a second item wanting it finds no slot.
    register(
        &c,
        r#"{"authority":"inference-p","frontend_mode":"port","protocol":"http","hostname":"proxy3.test","api_port":10201,"port_range":[10301,10301],"accepted_traffics":["inference"]}"#,
    );
    let item = |id: &str, name: &str, url: Option<&str>| {
        let body = endpoint_body(name, Some(id));
        match url {
            Some(u) => body.replace(
                r#""existing_url":null"#,
                &format!(r#""existing_url":"{u}""#),
            ),
            None => body,
        }
    };
    let bulk = |items: &[String]| {
        request(
            c.addr,
            "POST",
            "/v2/endpoints/bulk",
            &[AUTH, ("X-Backend-Request-ID", "bulk-1")],
            &format!(r#"{{"endpoints":[{}]}}"#, items.join(",")),
        )
    };
    let circuits = || count(&pg, "SELECT count(*) FROM circuits");
    let rows = || count(&pg, "SELECT count(*) FROM endpoints");
    let id = |n: u8| format!("e7c08c1e-9a4d-4e6f-8b7a-1c2d3e4f5c{n:02}");

    // An item whose URL no worker serves: nothing created.
    let r = bulk(&[
        item(&id(1), "first", None),
        item(&id(2), "second", Some("http://nowhere.invalid:1")),
    ]);
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        (circuits(), rows()),
        (0, 0),
        "a bulk call answered 400 created its earlier items"
    );
    assert!(
        r.json()["msg"]
            .as_str()
            .is_some_and(|m| m.starts_with("endpoints[1]: existing_url")),
        "the error names the item: {}",
        String::from_utf8_lossy(&r.body)
    );

    // The second item finds no free slot (the one port is the first's): the
    // first's circuit is withdrawn before the answer.
    let one_port = "http://proxy3.test:10301";
    let r = bulk(&[
        item(&id(3), "third", Some(one_port)),
        item(&id(4), "fourth", Some(one_port)),
    ]);
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        circuits(),
        0,
        "a bulk call answered 503 left its first item's circuit"
    );
    assert_eq!(rows(), 0);

    // An endpoint that already had its circuit (a sync) keeps it.
    let r = request(
        c.addr,
        "POST",
        &format!("/v2/endpoints/{}", id(5)),
        &[AUTH],
        &item(&id(5), "fifth", None),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = bulk(&[
        item(&id(5), "fifth", None),
        item(&id(6), "sixth", Some(one_port)),
        item(&id(7), "seventh", Some(one_port)),
    ]);
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    wait_for("a bulk call answered 503 left a circuit it made", || {
        circuits() == 1
    });
    assert_eq!(
        count(
            &pg,
            &format!(
                "SELECT count(*) FROM circuits WHERE endpoint_id = '{}'",
                id(5)
            )
        ),
        1,
        "the synced endpoint keeps its circuit"
    );

    // The store fails writing the rows: the circuits made are withdrawn.
    let held = pg.hold(
        "appproxy",
        "BEGIN; LOCK TABLE endpoints IN ACCESS EXCLUSIVE MODE",
    );
    let r = bulk(&[item(&id(8), "eighth", None), item(&id(9), "ninth", None)]);
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    drop(held);
    wait_for(
        "a bulk call whose rows were not written left its circuits",
        || circuits() == 1,
    );
    assert_eq!(rows(), 1);

    // The same endpoint twice in one call: one circuit, one answer for both.
    let r = bulk(&[item(&id(10), "tenth", None), item(&id(10), "tenth", None)]);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let urls = r.json()["endpoints"].clone();
    assert_eq!(urls[0]["url"], urls[1]["url"], "{urls}");
    assert_eq!(circuits(), 2);
    // And a good list is created whole.
    let r = bulk(&[
        item(&id(3), "third", Some(one_port)),
        item(&id(4), "fourth", None),
    ]);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!((circuits(), rows()), (4, 4));
}

/// An event a stand-in worker saw on the broadcast channel: its name, the IDs of
/// its circuits and the request ID of its metadata.
#[derive(Debug, Clone)]
struct Seen {
    name: String,
    circuits: Vec<String>,
    request_id: Option<String>,
}

/// A stand-in worker on Redis: records every circuit event and acknowledges the
/// creations, in the name of the worker each is for, but for the first `skip`
/// (never acknowledged). Stopped when dropped.
struct StandIn {
    seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    /// Why it stopped listening before it was dropped (a Redis error), if it did:
    /// events published after that are not seen.
    lost: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StandIn {
    fn start(url: &str, skip: usize) -> Self {
        Self::start_slow(url, skip, Duration::ZERO)
    }

    /// [`StandIn::start`], each acknowledgement sent `delay` after its creation's
    /// event was seen (one after another).
    fn start_slow(url: &str, skip: usize, delay: Duration) -> Self {
        Self::start_acking(url, skip, delay, usize::MAX)
    }

    /// [`StandIn::start_slow`], acknowledging at most `acks` creations (those after
    /// them never).
    fn start_acking(url: &str, skip: usize, delay: Duration, acks: usize) -> Self {
        Self::start_with(url, skip, delay, acks, None, None)
    }

    /// [`StandIn::start`], never acknowledging a creation for the worker `hung`
    /// (one that takes the deployment and then hangs).
    fn start_hung_for(url: &str, hung: &'static str) -> Self {
        Self::start_with(url, 0, Duration::ZERO, usize::MAX, None, Some(hung))
    }

    /// [`StandIn::start`], stopping the process `pid` (SIGSTOP) when a creation's
    /// event comes, acknowledging it meanwhile, and letting the process go on
    /// (SIGCONT) `pause` later: the acknowledgement waits in its socket.
    fn start_pausing(url: &str, pid: u32, pause: Duration) -> Self {
        Self::start_with(url, 0, Duration::ZERO, usize::MAX, Some((pid, pause)), None)
    }

    fn start_with(
        url: &str,
        skip: usize,
        delay: Duration,
        acks: usize,
        pausing: Option<(u32, Duration)>,
        hung: Option<&'static str>,
    ) -> Self {
        use appproxy_shared::model::{
            BroadcastMessage, EventMetadata, BROADCAST_CHANNEL, EVENT_CIRCUIT_CREATED,
            EVENT_WORKER_CIRCUIT_ADDED,
        };
        let client = redis::Client::open(url).expect("client");
        let mut sub = client.get_connection().expect("connection");
        let mut publish = client.get_connection().expect("connection");
        sub.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let lost = std::sync::Arc::new(std::sync::Mutex::new(None));
        let (stopping, log, losing) = (stop.clone(), seen.clone(), lost.clone());
        let thread = std::thread::spawn(move || {
            let lose = |why: String| {
                if let Ok(mut l) = losing.lock() {
                    *l = Some(why);
                }
            };
            let mut pubsub = sub.as_pubsub();
            if let Err(e) = pubsub.subscribe(BROADCAST_CHANNEL) {
                lose(format!("subscribe: {e}"));
                return;
            }
            let _ = ready_tx.send(());
            let (mut skipped, mut acked) = (0, 0);
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                let msg = match pubsub.get_message() {
                    Ok(m) => m,
                    Err(e) if common::read_again(&e) => continue,
                    Err(e) => {
                        lose(format!("read: {e} ({:?})", e.kind()));
                        return;
                    }
                };
                let Ok(text) = msg.get_payload::<String>() else {
                    continue;
                };
                let Ok(event) = serde_json::from_str::<BroadcastMessage>(&text) else {
                    continue;
                };
                let Ok(body) = serde_json::from_str::<serde_json::Value>(&event.payload) else {
                    continue;
                };
                let metadata: serde_json::Value =
                    serde_json::from_str(&event.metadata).unwrap_or_default();
                let circuits = body["circuits"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|c| c["id"].as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                if let Ok(mut seen) = log.lock() {
                    seen.push(Seen {
                        name: event.name.clone(),
                        circuits,
                        request_id: metadata["request_id"].as_str().map(str::to_owned),
                    });
                }
                if event.name != EVENT_CIRCUIT_CREATED {
                    continue;
                }
                if hung.is_some() && body["target_worker_authority"].as_str() == hung {
                    continue;
                }
                if skipped < skip {
                    skipped += 1;
                    continue;
                }
                if acked >= acks {
                    continue;
                }
                acked += 1;
                let signal = |sig: &str, pid: u32| {
                    let _ = std::process::Command::new("kill")
                        .arg(sig)
                        .arg(pid.to_string())
                        .status();
                };
                if let Some((pid, _)) = pausing {
                    signal("-STOP", pid);
                }
                std::thread::sleep(delay);
                let ack = serde_json::json!({
                    "target_worker_authority": body["target_worker_authority"],
                    "circuits": body["circuits"],
                });
                let Ok(envelope) = BroadcastMessage::encode(
                    EVENT_WORKER_CIRCUIT_ADDED,
                    "appproxy-worker",
                    &ack,
                    &EventMetadata::default(),
                ) else {
                    continue;
                };
                let Ok(text) = serde_json::to_string(&envelope) else {
                    continue;
                };
                let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                    .arg(BROADCAST_CHANNEL)
                    .arg(text)
                    .query(&mut publish);
                if let Some((pid, pause)) = pausing {
                    std::thread::sleep(pause);
                    signal("-CONT", pid);
                }
                if let Err(e) = sent {
                    lose(format!("acknowledgement: {e}"));
                    return;
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the stand-in worker subscribed");
        Self {
            seen,
            lost,
            stop,
            thread: Some(thread),
        }
    }

    /// The events seen so far.
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Why it stopped listening, if it did (see [`StandIn::lost`]).
    fn lost(&self) -> Option<String> {
        self.lost.lock().ok().and_then(|l| l.clone())
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A setup token's claims, read without checking its signature or `exp`.
fn claims_of(redirect_url: &str) -> serde_json::Value {
    let token = redirect_url
        .split("token=")
        .nth(1)
        .expect("a setup token in the URL");
    let payload = token.split('.').nth(1).expect("payload");
    serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
            .expect("base64"),
    )
    .expect("claims")
}

/// The circuit a `/v2/proxy/auth` answer hands out: its redirect token's claim.
fn handed_circuit(answer: &serde_json::Value) -> String {
    claims_of(answer["redirect_url"].as_str().expect("redirect_url"))["circuit"]
        .as_str()
        .expect("circuit")
        .to_owned()
}

/// A counter's value in `/metrics`.
fn metric(c: &Coordinator, name: &str) -> Option<u64> {
    let m = request(c.addr, "GET", "/metrics", &[], "");
    String::from_utf8_lossy(&m.body)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
}

/// The sweep's log line for a circuit it withdrew.
const SWEPT: &str =
    "circuit of a creation never settled withdrawn (its coordinator stopped before withdrawing it)";

/// A creation the worker did not acknowledge, with PostgreSQL frozen so that its
/// withdrawal could not be made, and the coordinator stopped (killed) before the
/// store came back: the in-process withdrawal died with it, and the circuit stayed
/// stored — and deployed by the worker's next fetch — for ever, though its creation
/// was answered 503. It was stored marked as a creation under way; a fresh
/// coordinator on the same store, leading, sweeps it once the mark is past: removed
/// and announced to the worker under the ID of the request that created it (so
/// the manager whose call was cut off finds it by its own ID; before, under the
/// sweep's alone), the sweep's pass naming it under its own, and counted.
#[test]
fn a_withdrawal_a_stopped_coordinator_left_undone_is_made_by_the_next_leader() {
    let pg = Pg::start();
    let redis = appproxy_test_support::redis::Redis::start();
    let worker = StandIn::start(&redis.url(), usize::MAX);
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!(
        "worker_ack_timeout_secs = 2\nunsettled_creation_timeout_secs = 5\ncheck_unsettled_creation_interval_secs = 1\nleader_lease_secs = 3\n[redis]\nurl = \"{}\"",
        redis.url()
    );
    let c = start_with(dir.path(), &pg, &extra);
    listening(dir.path());
    let token = setup(&c);
    let circuits = || count(&pg, "SELECT count(*) FROM circuits");
    let (addr, path) = (
        c.addr,
        format!("/v2/proxy/auth?token={token}&session_id={SESSION}&app=jupyter&protocol=http"),
    );
    let creation = std::thread::spawn(move || {
        request(
            addr,
            "GET",
            &path,
            &[
                ("Accept", "application/json"),
                ("X-Backend-Request-ID", "left-undone-1"),
            ],
            "",
        )
    });
    wait_for("the circuit was never stored", || circuits() == 1);
    let circuit = pg.psql("appproxy", "SELECT id FROM circuits");
    let frozen = pg.freeze();
    let r = creation.join().expect("creation thread");
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    wait_for("the withdrawal never failed", || {
        logged(
            dir.path(),
            "circuit not withdrawn: the store failed; withdrawing it in the background",
            "left-undone-1",
        )
    });
    // The process stops with its withdrawal pending (a deploy, a crash).
    drop(c);
    // Statements it sent before it stopped wait in the frozen server's sockets:
    // each carries its call's 5 s deadline, passed before the server runs them.
    std::thread::sleep(Duration::from_secs(6));
    drop(frozen);
    assert_eq!(
        circuits(),
        1,
        "the stopped coordinator's withdrawal was made after all (the test shows nothing)"
    );
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM circuits WHERE creating_until IS NOT NULL"
        ),
        1,
        "the circuit is stored marked as a creation under way"
    );
    // A fresh coordinator on the same store: once it leads (the stopped one's
    // lease runs out) and the mark is past, its sweep withdraws the circuit.
    let fresh = start_with(dir.path(), &pg, &extra);
    wait_for(
        "a circuit whose creation was answered 503 is still stored after a fresh coordinator started",
        || circuits() == 0,
    );
    // The sweep logs its withdrawal once the removal has been announced, after
    // the store's delete this test saw: its line is waited for (bounded).
    let swept = || -> Vec<serde_json::Value> {
        log_lines(dir.path())
            .into_iter()
            .filter(|l| l["message"] == SWEPT && l["circuit"] == circuit.as_str())
            .collect()
    };
    wait_for("the sweep never logged its withdrawal", || {
        !swept().is_empty()
    });
    let swept = swept();
    assert_eq!(swept.len(), 1, "the sweep logs its withdrawal once");
    assert_eq!(
        swept[0]["request_id"], "left-undone-1",
        "the withdrawal runs under the creating request's ID"
    );
    let pass = swept[0]["sweep_request_id"]
        .as_str()
        .expect("the sweep's pass is named")
        .to_owned();
    assert!(!pass.is_empty() && pass != "left-undone-1", "{pass}");
    // The pass says so under its own ID.
    wait_for("the pass never named the creating request", || {
        log_lines(dir.path()).into_iter().any(|l| {
            l["request_id"] == pass.as_str()
                && l["circuit"] == circuit.as_str()
                && l["origin_request_id"] == "left-undone-1"
        })
    });
    // The worker is told, on the channel and in the change log it fetches, under
    // the creating request's ID.
    let told = || {
        worker.seen().iter().any(|e| {
            e.name == appproxy_shared::model::EVENT_CIRCUIT_REMOVED
                && e.circuits == [circuit.clone()]
                && e.request_id.as_deref() == Some("left-undone-1")
        })
    };
    let deadline = Instant::now() + PATIENCE;
    while !told() {
        // Said on failure: whether the coordinator published the event (its
        // lines about events and Redis), and what the stand-in saw.
        assert!(
            Instant::now() < deadline,
            "the worker was never told of the removal; stand-in stopped listening: {:?}; \
             it saw {:?}; the coordinators said {:#?}",
            worker.lost(),
            worker.seen(),
            log_lines(dir.path())
                .into_iter()
                .filter(
                    |l| l["message"].as_str().is_some_and(|m| m.contains("event")
                        || m.contains("redis")
                        || m.contains("never settled"))
                )
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        pg.psql(
            "appproxy",
            &format!(
                "SELECT request_id FROM circuit_changes WHERE circuit = '{circuit}' AND removal"
            )
        ),
        "left-undone-1"
    );
    assert_eq!(
        metric(
            &fresh,
            "appproxy_coordinator_overdue_creations_withdrawn_total"
        ),
        Some(1)
    );
}

/// Two coordinators on one PostgreSQL: while node A's creation of a session's
/// circuit waits for the worker's acknowledgement (which never comes), node B asked
/// for the same session and app reused that circuit at once — "a creation under
/// way" was known only in A's memory — and answered with a circuit A withdrew a
/// moment later. B now sees the creation under way in the store, waits for its
/// outcome, and creates a circuit of its own once A's is withdrawn.
#[test]
fn another_coordinator_does_not_hand_out_a_circuit_still_being_created() {
    let pg = Pg::start();
    let redis = appproxy_test_support::redis::Redis::start();
    // Node A's creation (the first) is never acknowledged; B's is.
    let _worker = StandIn::start(&redis.url(), 1);
    let extra = format!(
        "worker_ack_timeout_secs = 6\n[redis]\nurl = \"{}\"",
        redis.url()
    );
    let ([(_dir_a, a), (_dir_b, b)], path) = nodes_with_token(&pg, &extra);
    let circuits = || count(&pg, "SELECT count(*) FROM circuits");
    let on_a = ask(a.addr, &path, "node-a-1");
    wait_for("node A's circuit was never stored", || circuits() == 1);
    let of_a = pg.psql("appproxy", "SELECT id FROM circuits");
    // Asked while A's creation waits for its acknowledgement (6 s).
    let on_b = ask(b.addr, &path, "node-b-1");
    let r = on_a.join().expect("node A's request");
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    let r = on_b.join().expect("node B's request");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let answer = r.json();
    let claims = claims_of(answer["redirect_url"].as_str().expect("redirect_url"));
    assert_ne!(
        claims["circuit"].as_str(),
        Some(of_a.as_str()),
        "node B handed out the circuit node A was still creating (and then withdrew)"
    );
    assert_eq!(answer["reuse"], false, "{answer}");
    assert_eq!(
        count(
            &pg,
            &format!("SELECT count(*) FROM circuits WHERE id = '{of_a}'")
        ),
        0,
        "node A's circuit is withdrawn"
    );
    // B's own circuit stands, settled.
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM circuits WHERE creating_until IS NULL"
        ),
        1
    );
}

/// A settled creation is never swept: a session's circuit and an endpoint's,
/// each acknowledged and answered, outlive their creation's bound (2 s here) and
/// any number of sweeps, and a reuse, on another coordinator too, hands the
/// session's out. The sweep ran meanwhile: a circuit stored marked with a bound
/// already past (as a coordinator that died mid-creation leaves it) was withdrawn
/// by the same passes.
#[test]
fn a_settled_creation_is_never_swept() {
    let pg = Pg::start();
    let redis = appproxy_test_support::redis::Redis::start();
    let _worker = StandIn::start(&redis.url(), 0);
    let extra = format!(
        "worker_ack_timeout_secs = 1\nunsettled_creation_timeout_secs = 2\ncheck_unsettled_creation_interval_secs = 1\n[redis]\nurl = \"{}\"",
        redis.url()
    );
    let ([(dir, c), (other_dir, other)], path) = nodes_with_token(&pg, &extra);
    register(&c, INFERENCE_WORKER);
    let r = request(c.addr, "GET", &path, &[("Accept", "application/json")], "");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let session_circuit = handed_circuit(&r.json());
    let endpoint = "e7c08c1e-9a4d-4e6f-8b7a-1c2d3e4f5d01";
    let r = request(
        c.addr,
        "POST",
        &format!("/v2/endpoints/{endpoint}"),
        &[AUTH],
        &endpoint_body("settled", None),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM circuits WHERE creating_until IS NULL"
        ),
        2,
        "both creations settled in the store"
    );
    // Both are past their bound on the database's clock ...
    wait_for("the bound never passed", || {
        count(
            &pg,
            "SELECT count(*) FROM circuits WHERE created_at + interval '2 s' < now()",
        ) == 2
    });
    // ... and a circuit left marked past its bound is swept by the same passes.
    pg.psql(
        "appproxy",
        "INSERT INTO circuits (id, app, protocol, worker, app_mode, frontend_mode, port,
            open_to_public, session_ids, route_info, creating_until)
         SELECT gen_random_uuid(), 'left', protocol, worker, app_mode, frontend_mode, port + 1,
            open_to_public, ARRAY[gen_random_uuid()], route_info, now()
         FROM circuits WHERE endpoint_id IS NULL",
    );
    // The pass that withdrew it read every overdue creation (after the bound of
    // the settled two had passed).
    wait_for("the circuit left marked was never swept", || {
        count(&pg, "SELECT count(*) FROM circuits WHERE app = 'left'") == 0
    });
    // The sweep's line follows the delete seen above (bounded wait), once.
    let swept = || {
        log_lines(dir.path())
            .iter()
            .chain(log_lines(other_dir.path()).iter())
            .filter(|l| l["message"] == SWEPT)
            .count()
    };
    wait_for("the sweep never logged its withdrawal", || swept() > 0);
    assert_eq!(swept(), 1);
    assert_eq!(
        count(&pg, "SELECT count(*) FROM circuits"),
        2,
        "a settled circuit was swept"
    );
    // Reused, by either coordinator.
    for node in [&c, &other] {
        let r = request(
            node.addr,
            "GET",
            &path,
            &[("Accept", "application/json")],
            "",
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["reuse"], true);
        assert_eq!(handed_circuit(&r.json()), session_circuit);
    }
    let swept = metric(&c, "appproxy_coordinator_overdue_creations_withdrawn_total")
        .unwrap_or_default()
        + metric(
            &other,
            "appproxy_coordinator_overdue_creations_withdrawn_total",
        )
        .unwrap_or_default();
    assert_eq!(swept, 1, "only the circuit left marked");
}

/// Waits until `node` leads the jobs (its leader gauge at 1).
fn leads(node: &Coordinator) -> bool {
    metric(node, "appproxy_coordinator_leader") == Some(1)
}

/// A bulk endpoint creation on a coordinator that does not lead, its items
/// acknowledged one after another so slowly that the whole call outlasts the
/// bound of a creation's mark (2 s here): its circuits stay marked until every row
/// is written, and the leader's sweep withdrew the first ones as left by a stopped
/// coordinator — the call was answered 409 `circuit-removed`, though every
/// acknowledgement came in time. The node making a creation now renews its marks
/// while the creation runs: the call succeeds, every circuit stored and settled,
/// and nothing is swept.
#[test]
fn a_slow_bulk_creation_on_another_node_is_not_swept() {
    let pg = Pg::start();
    let redis = appproxy_test_support::redis::Redis::start();
    let _worker = StandIn::start_slow(&redis.url(), 0, Duration::from_millis(700));
    let extra = format!(
        "worker_ack_timeout_secs = 2\nunsettled_creation_timeout_secs = 2\ncheck_unsettled_creation_interval_secs = 1\n[redis]\nurl = \"{}\"",
        redis.url()
    );
    let (dir_a, a) = node(&pg, &extra);
    wait_for("node A never led", || leads(&a));
    let (_dir_b, b) = node(&pg, &extra);
    register(&a, INFERENCE_WORKER);
    const ITEMS: u8 = 8;
    let items: Vec<String> = (1..=ITEMS)
        .map(|n| {
            endpoint_body(
                &format!("slow{n}"),
                Some(&format!("e7c08c1e-9a4d-4e6f-8b7a-1c2d3e4f5e{n:02}")),
            )
        })
        .collect();
    let started = Instant::now();
    let r = request(
        b.addr,
        "POST",
        "/v2/endpoints/bulk",
        &[AUTH, ("X-Backend-Request-ID", "slow-bulk-1")],
        &format!(r#"{{"endpoints":[{}]}}"#, items.join(",")),
    );
    let took = started.elapsed();
    assert!(!leads(&b), "node B led: the test shows nothing");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        took > Duration::from_secs(3),
        "the bulk call did not outlast the bound ({took:?}): the test shows nothing"
    );
    assert_eq!(
        r.json()["endpoints"].as_array().map(Vec::len),
        Some(usize::from(ITEMS))
    );
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM circuits WHERE creating_until IS NULL AND endpoint_id IS NOT NULL"
        ),
        u64::from(ITEMS),
        "every circuit stored and settled"
    );
    assert_eq!(
        count(&pg, "SELECT count(*) FROM circuits"),
        u64::from(ITEMS)
    );
    assert_eq!(
        count(&pg, "SELECT count(*) FROM endpoints"),
        u64::from(ITEMS)
    );
    // A few more sweeps: nothing of it is withdrawn.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        count(&pg, "SELECT count(*) FROM circuits"),
        u64::from(ITEMS)
    );
    for node in [&a, &b] {
        assert_eq!(
            metric(
                node,
                "appproxy_coordinator_overdue_creations_withdrawn_total"
            ),
            Some(0)
        );
    }
    assert!(
        !log_lines(dir_a.path())
            .iter()
            .any(|l| l["message"] == SWEPT),
        "the leader swept a circuit of a creation still under way"
    );
}

/// Node A's creation of a session's circuit never acknowledged, and A killed
/// meanwhile (its circuit left marked under way); several calls for the same
/// session and app to node B. Each waited out the mark (its bound and 1 s more)
/// while the reuse key's turn was waited for only as long as a creation takes:
/// the calls queued behind the first went on alone, all found the mark passed
/// at once, and each created a circuit of its own (8 for one session) — after
/// about 93 s each with the defaults. The turn now outlasts the holder's wait:
/// the first call withdraws A's circuit and creates one, the others reuse it; and
/// the mark, no longer renewed once A stopped, passes one bound after.
#[test]
fn calls_after_an_orphaned_creation_share_one_new_circuit() {
    let pg = Pg::start();
    let redis = appproxy_test_support::redis::Redis::start();
    // Node A's creation (the first) is never acknowledged; B's are.
    let _worker = StandIn::start(&redis.url(), 1);
    // A creation takes at most 4 × 2 + 5 = 13 s; the mark lasts 14 s.
    let extra = format!(
        "worker_ack_timeout_secs = 2\nunsettled_creation_timeout_secs = 14\n[redis]\nurl = \"{}\"",
        redis.url()
    );
    let ([(_dir_a, a), (_dir_b, b)], path) = nodes_with_token(&pg, &extra);
    let circuits = || count(&pg, "SELECT count(*) FROM circuits");
    /// Generous: a client gives up after this long.
    const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
    let ask = |addr: SocketAddr, id: String| {
        let path = path.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let r = appproxy_test_support::http::request_within(
                addr,
                "GET",
                &path,
                &[
                    ("Accept", "application/json"),
                    ("X-Backend-Request-ID", id.as_str()),
                    ("Content-Type", "application/json"),
                ],
                b"",
                CLIENT_TIMEOUT,
            );
            (r, started.elapsed())
        })
    };
    let _on_a = ask(a.addr, "orphan-a-1".to_owned());
    wait_for("node A's circuit was never stored", || circuits() == 1);
    let of_a = pg.psql("appproxy", "SELECT id FROM circuits");
    // Killed while its creation waits for the acknowledgement: nothing withdraws
    // its circuit but another node.
    drop(a);
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM circuits WHERE creating_until IS NOT NULL"
        ),
        1,
        "node A withdrew its circuit before it was killed: the test shows nothing"
    );
    let calls: Vec<_> = (0..6)
        .map(|n| {
            if n > 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
            ask(b.addr, format!("orphan-b-{n}"))
        })
        .collect();
    let mut handed = Vec::new();
    for call in calls {
        let (r, took) = call.join().expect("node B's request");
        let r = r.expect("an answer before the client's timeout");
        assert!(took < CLIENT_TIMEOUT, "{took:?}");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        handed.push(handed_circuit(&r.json()));
    }
    assert!(
        handed.iter().all(|c| *c != of_a),
        "node A's orphaned circuit handed out"
    );
    // Withdrawn under the ID of the call that created it, whoever withdrew it (a
    // call for the key, the sweep): the manager finds it by its own ID (before,
    // under the withdrawing call's).
    assert_eq!(
        pg.psql(
            "appproxy",
            &format!("SELECT request_id FROM circuit_changes WHERE circuit = '{of_a}' AND removal")
        ),
        "orphan-a-1"
    );
    assert!(
        handed.iter().all(|c| *c == handed[0]),
        "the calls were answered with several circuits: {handed:?}"
    );
    assert_eq!(
        pg.psql("appproxy", "SELECT string_agg(id::text, ',') FROM circuits"),
        handed[0],
        "exactly the one circuit handed out is stored for the session"
    );
}

/// Node A runs a bulk endpoint creation whose items are acknowledged one after
/// another, the last one never; meanwhile node B is asked to sync the bulk's first
/// endpoint. B waited for A's creation under way up to its bound, then answered
/// 200 with A's circuit all the same (its mark still ahead); A's bulk then failed
/// and withdrew that circuit: B's caller held a URL nothing served. B now answers
/// 503 `creation-under-way` when the creation is still running past its wait, and
/// never with a circuit whose creation has not settled.
#[test]
fn a_sync_never_answers_with_a_creation_still_under_way_on_another_node() {
    let pg = Pg::start();
    let redis = appproxy_test_support::redis::Redis::start();
    // 19 acknowledgements, 0.7 s apart: the bulk's 20th item is never acknowledged.
    let _worker = StandIn::start_acking(&redis.url(), 0, Duration::from_millis(700), 19);
    // B waits at most max(4 × 1 + 5, 2 + 0.4 + 1) = 9 s for A's creation; A's bulk
    // runs about 19 × 0.7 + 1 = 14.3 s.
    let extra = format!(
        "worker_ack_timeout_secs = 1\nunsettled_creation_timeout_secs = 2\ncheck_unsettled_creation_interval_secs = 1\n[redis]\nurl = \"{}\"",
        redis.url()
    );
    let (_dir_a, a) = node(&pg, &extra);
    let (_dir_b, b) = node(&pg, &extra);
    register(&a, INFERENCE_WORKER);
    let first = "e7c08c1e-9a4d-4e6f-8b7a-1c2d3e4f5f01";
    let items: Vec<String> = (1..=20u8)
        .map(|n| {
            endpoint_body(
                &format!("bulk{n}"),
                Some(&format!("e7c08c1e-9a4d-4e6f-8b7a-1c2d3e4f5f{n:02}")),
            )
        })
        .collect();
    let body = format!(r#"{{"endpoints":[{}]}}"#, items.join(","));
    let addr = a.addr;
    let bulk = std::thread::spawn(move || {
        request(
            addr,
            "POST",
            "/v2/endpoints/bulk",
            &[AUTH, ("X-Backend-Request-ID", "under-way-bulk")],
            &body,
        )
    });
    let of_first = format!("SELECT count(*) FROM circuits WHERE endpoint_id = '{first}'");
    wait_for("the bulk's first circuit was never stored", || {
        count(&pg, &of_first) == 1
    });
    let sync = request(
        b.addr,
        "POST",
        &format!("/v2/endpoints/{first}"),
        &[AUTH, ("X-Backend-Request-ID", "under-way-sync")],
        &endpoint_body("bulk1", None),
    );
    let r = bulk.join().expect("the bulk call");
    assert_eq!(
        r.status,
        503,
        "the bulk did not fail: the test shows nothing: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        count(&pg, &of_first),
        0,
        "the failed bulk withdrew its circuits"
    );
    assert_eq!(
        sync.status,
        503,
        "node B answered with node A's circuit still being created (withdrawn since): {}",
        String::from_utf8_lossy(&sync.body)
    );
    assert_eq!(
        sync.json()["code"],
        "creation-under-way",
        "{}",
        String::from_utf8_lossy(&sync.body)
    );
}

/// Node A stopped (killed) mid-creation of an endpoint's circuit, its mark past;
/// node B syncs the endpoint and reads the circuit as overdue, and A's creation
/// settles it (here: a transaction standing in for A, holding the row) before B's
/// removal runs. B removed the circuit all the same, settled or not, and placed a
/// new one. B's removal is now made only while the circuit is still overdue; kept,
/// the settled circuit is looked up again and is the answer.
#[test]
fn an_endpoint_sync_keeps_an_overdue_circuit_settled_meanwhile() {
    let pg = Pg::start();
    let redis = appproxy_test_support::redis::Redis::start();
    // Node A's creation (the first) is never acknowledged.
    let _worker = StandIn::start(&redis.url(), 1);
    let extra = format!(
        "worker_ack_timeout_secs = 30\nunsettled_creation_timeout_secs = 1\ncheck_unsettled_creation_interval_secs = 3600\n[redis]\nurl = \"{}\"",
        redis.url()
    );
    let (_dir_a, a) = node(&pg, &extra);
    let (_dir_b, b) = node(&pg, &extra);
    register(&a, INFERENCE_WORKER);
    let endpoint = "e7c08c1e-9a4d-4e6f-8b7a-1c2d3e4f5f41";
    let path = format!("/v2/endpoints/{endpoint}");
    let (addr, on_a_path) = (a.addr, path.clone());
    let _on_a = std::thread::spawn(move || {
        appproxy_test_support::http::request_within(
            addr,
            "POST",
            &on_a_path,
            &[AUTH, ("Content-Type", "application/json")],
            endpoint_body("overdue", None).as_bytes(),
            PATIENCE,
        )
    });
    let circuits = || count(&pg, "SELECT count(*) FROM circuits");
    wait_for("node A's circuit was never stored", || circuits() == 1);
    let of_a = pg.psql("appproxy", "SELECT id FROM circuits");
    drop(a);
    wait_for("node A's mark never passed", || {
        count(
            &pg,
            "SELECT count(*) FROM circuits WHERE creating_until <= now()",
        ) == 1
    });
    // A's settling of the row, not committed yet: B reads the row as overdue.
    let settling = pg.hold(
        "appproxy",
        &format!("BEGIN; UPDATE circuits SET creating_until = NULL WHERE id = '{of_a}'"),
    );
    let (addr, on_b_path) = (b.addr, path.clone());
    let on_b = std::thread::spawn(move || {
        request(
            addr,
            "POST",
            &on_b_path,
            &[AUTH, ("X-Backend-Request-ID", "overdue-sync")],
            &endpoint_body("overdue", None),
        )
    });
    wait_for("node B's removal never waited on the row", || {
        count(
            &pg,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'WITH gone AS%'",
        ) == 1
    });
    settling.commit();
    let r = on_b.join().expect("node B's request");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        count(
            &pg,
            &format!("SELECT count(*) FROM circuits WHERE id = '{of_a}'")
        ),
        1,
        "node B removed the circuit its node had settled meanwhile"
    );
    assert_eq!(
        circuits(),
        1,
        "node B placed a circuit of its own beside it"
    );
}

/// Node A killed mid-creation of a session's circuit; calls for the same session
/// and app reach nodes B and C. Each node's first call polls A's mark, both see it
/// pass at the same moment, and each withdrew it and created a replacement: two
/// circuits for one session, both handed out. Here the removal of A's circuit is
/// held up (the worker's row locked) so that both calls surely found it overdue
/// first. The replacement is now decided under the reuse key's turn in the store:
/// one node withdraws A's circuit and creates the replacement, the other waits for
/// the turn and reuses it.
#[test]
fn calls_on_two_nodes_after_an_orphaned_creation_share_one_new_circuit() {
    let pg = Pg::start();
    let redis = appproxy_test_support::redis::Redis::start();
    // Node A's creation (the first) is never acknowledged; the others are.
    let _worker = StandIn::start(&redis.url(), 1);
    let extra = format!(
        "worker_ack_timeout_secs = 2\nunsettled_creation_timeout_secs = 2\ncheck_unsettled_creation_interval_secs = 3600\n[redis]\nurl = \"{}\"",
        redis.url()
    );
    let ([(_dir_a, a), (_dir_b, b), (_dir_c, c)], path) = nodes_with_token(&pg, &extra);
    let circuits = || count(&pg, "SELECT count(*) FROM circuits");
    let (addr, on_a_path) = (a.addr, path.clone());
    // Killed mid-call: no answer.
    let _on_a = std::thread::spawn(move || {
        appproxy_test_support::http::request_within(
            addr,
            "GET",
            &on_a_path,
            &[("Accept", "application/json")],
            b"",
            PATIENCE,
        )
    });
    wait_for("node A's circuit was never stored", || circuits() == 1);
    let of_a = pg.psql("appproxy", "SELECT id FROM circuits");
    drop(a);
    // A removal of A's circuit waits on the worker's row (its slot count).
    let held = pg.hold("appproxy", "BEGIN; SELECT id FROM workers FOR UPDATE");
    let calls: Vec<_> = (0..3)
        .flat_map(|n| {
            std::thread::sleep(Duration::from_millis(100));
            [
                ask(b.addr, &path, &format!("orphan2-b-{n}")),
                ask(c.addr, &path, &format!("orphan2-c-{n}")),
            ]
        })
        .collect();
    let removals = || {
        count(
            &pg,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'WITH gone AS%'",
        )
    };
    wait_for("no removal of node A's circuit ever came", || {
        removals() >= 1
    });
    // Both nodes poll the mark every 100 ms: a second removal, if any, comes within
    // this.
    std::thread::sleep(Duration::from_secs(1));
    held.commit();
    let mut handed = Vec::new();
    for call in calls {
        let r = call.join().expect("a call");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        handed.push(handed_circuit(&r.json()));
    }
    assert!(
        handed.iter().all(|c| *c != of_a),
        "node A's orphaned circuit handed out"
    );
    assert!(
        handed.iter().all(|c| *c == handed[0]),
        "the calls on two nodes were answered with several circuits: {handed:?}"
    );
    assert_eq!(
        pg.psql("appproxy", "SELECT string_agg(id::text, ',') FROM circuits"),
        handed[0],
        "exactly the one circuit handed out is stored for the session"
    );
}

/// Calls for one session and app reaching two coordinators at the same moment,
/// with no creation for that key before: each found nothing to reuse, and each
/// created a circuit of its own — two circuits for one session, both handed out.
/// Here both calls are surely past their look before either circuit is stored:
/// the worker's row (whose slot count every insert changes) is held locked until
/// a first insert waits on it, and a moment longer. A call that finds nothing now
/// takes the key's turn in the store and looks once more under it: one node
/// creates, the other waits for the turn and reuses that circuit.
#[test]
fn calls_on_two_nodes_at_the_same_moment_share_one_circuit() {
    let pg = Pg::start();
    let redis = appproxy_test_support::redis::Redis::start();
    let _worker = StandIn::start(&redis.url(), 0);
    let extra = format!(
        "worker_ack_timeout_secs = 6\n[redis]\nurl = \"{}\"",
        redis.url()
    );
    let ([(_dir_a, a), (_dir_b, b)], path) = nodes_with_token(&pg, &extra);
    let held = pg.hold("appproxy", "BEGIN; SELECT id FROM workers FOR UPDATE");
    let calls = [
        ask(a.addr, &path, "same-moment-a"),
        ask(b.addr, &path, "same-moment-b"),
    ];
    let inserts = || {
        count(
            &pg,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'WITH created AS%'",
        )
    };
    wait_for("no insert of a circuit ever came", || inserts() >= 1);
    // The other node's call, sent at the same moment, reaches its own insert (or
    // the key's turn) within this; well under the insert's statement timeout (4 s).
    std::thread::sleep(Duration::from_secs(1));
    held.commit();
    let mut handed = Vec::new();
    let mut reused = Vec::new();
    for call in calls {
        let r = call.join().expect("a call");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let answer = r.json();
        handed.push(handed_circuit(&answer));
        reused.push(answer["reuse"].as_bool().expect("reuse"));
    }
    assert_eq!(
        handed[0], handed[1],
        "the calls on two nodes were answered with two circuits"
    );
    assert_eq!(
        pg.psql("appproxy", "SELECT string_agg(id::text, ',') FROM circuits"),
        handed[0],
        "exactly the one circuit handed out is stored for the session"
    );
    reused.sort();
    assert_eq!(reused, [false, true], "one call created, the other reused");
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM circuits WHERE creating_until IS NULL"
        ),
        1,
        "the circuit is settled"
    );
}

/// A node with more creations under way than one renewal write covers (1,000),
/// and the first write of every renewal pass failing (a trigger on the renewal
/// refuses the first statement after a pause): the pass ended at that failure,
/// so no mark was renewed, every one passed, and the sweep would withdraw
/// circuits still being created. A pass now goes on past a failed write: the
/// marks of the other write stay ahead.
#[test]
fn one_failed_renewal_write_does_not_leave_the_other_marks_unrenewed() {
    let pg = Pg::start();
    let redis = appproxy_test_support::redis::Redis::start();
    // 1,002 items: the first 1,001 acknowledged, the last never, so the bulk
    // creation keeps all 1,002 under way (its items settle together) for the
    // acknowledgement's wait.
    const ITEMS: usize = 1_002;
    let _worker = StandIn::start_acking(&redis.url(), 0, Duration::ZERO, ITEMS - 1);
    let extra = format!(
        "worker_ack_timeout_secs = 20\nunsettled_creation_timeout_secs = 5\n[redis]\nurl = \"{}\"",
        redis.url()
    );
    let (_dir, c) = node(&pg, &extra);
    register(&c, INFERENCE_WORKER);
    let items: Vec<String> = (0..ITEMS)
        .map(|n| {
            endpoint_body(
                &format!("renewed-{n}"),
                Some(&format!("e7c08c1e-9a4d-4e6f-8b7a-{n:012}")),
            )
        })
        .collect();
    let (addr, body) = (c.addr, format!(r#"{{"endpoints":[{}]}}"#, items.join(",")));
    let bulk = std::thread::spawn(move || {
        request(
            addr,
            "POST",
            "/v2/endpoints/bulk",
            &[AUTH, ("X-Backend-Request-ID", "renewed-bulk")],
            &body,
        )
    });
    let circuits = || count(&pg, "SELECT count(*) FROM circuits");
    wait_for("the bulk creation never stored all its circuits", || {
        circuits() == ITEMS as u64
    });
    // From now on the first renewal write after a pause of over 0.5 s fails (its
    // time kept in a sequence, which the failure does not roll back); the
    // writes of one pass follow each other within milliseconds, the passes 1 s
    // apart.
    pg.psql(
        "appproxy",
        "CREATE SEQUENCE renewal_seen;
         CREATE FUNCTION fail_first_renewal() RETURNS trigger LANGUAGE plpgsql AS $$
         DECLARE
             now_ms bigint := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
             last_ms bigint := (SELECT last_value FROM renewal_seen);
         BEGIN
             PERFORM setval('renewal_seen', now_ms);
             IF now_ms - last_ms > 500 THEN
                 RAISE EXCEPTION 'the first renewal write of a pass fails';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER fail_first_renewal BEFORE UPDATE ON circuits FOR EACH ROW
             WHEN (OLD.creating_until IS NOT NULL AND NEW.creating_until IS NOT NULL)
             EXECUTE FUNCTION fail_first_renewal();",
    );
    // Past the bound (5 s) of every mark renewed before the trigger, with passes
    // every second meanwhile.
    std::thread::sleep(Duration::from_secs(8));
    let ahead = count(
        &pg,
        "SELECT count(*) FROM circuits WHERE creating_until > now()",
    );
    let passed = count(
        &pg,
        "SELECT count(*) FROM circuits WHERE creating_until <= now()",
    );
    assert!(
        passed > 0,
        "no renewal write failed (the test shows nothing): {ahead} marks ahead"
    );
    assert!(
        ahead > 0,
        "every mark passed: the renewal pass ended at its first failed write ({passed} passed)"
    );
    assert_eq!(ahead + passed, ITEMS as u64, "every circuit still marked");
    let r = bulk.join().expect("the bulk creation");
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
}

/// A worker that takes deployments and never acknowledges them (hung) does not
/// stall the coordinator's other creations. Every creation for a reuse key held
/// the key's turn in the store (a pooled connection) until its acknowledgement,
/// and a coordinator holds at most half its pool (8 of 16) in such turns: ten
/// creations for ten sessions placed on the hung worker held all eight for the
/// whole acknowledgement wait, and a creation for another session, bound for a
/// healthy worker, waited for a turn until the hung worker's timed out. The turn
/// is now held only until the new circuit's row is stored: the other session's
/// creation is answered while the hung ones still wait.
#[test]
fn a_hung_worker_does_not_stall_creations_for_other_sessions() {
    const HUNG: usize = 10;
    let pg = Pg::start();
    let redis = appproxy_test_support::redis::Redis::start();
    let _workers = StandIn::start_hung_for(&redis.url(), "worker-1");
    // Long enough for the other session's creation to be answered well before it.
    let extra = format!(
        "worker_ack_timeout_secs = 30\n[redis]\nurl = \"{}\"",
        redis.url()
    );
    let (_dir, c) = node(&pg, &extra);
    // Each worker takes only the sessions of its own domain: the hung one,
    // `worker-1`, those of `hung`; the healthy one, `worker-2`, those of `healthy`.
    let worker = |authority: &str, host: &str, domain: &str| {
        format!(
            r#"{{"authority":"{authority}","frontend_mode":"port","protocol":"http","hostname":"{host}","api_port":10201,"port_range":[10205,10300],"accepted_traffics":["interactive"],"filtered_apps_only":true,"app_filters":[{{"key":"session.domain_name","value":"{domain}"}}]}}"#
        )
    };
    register(&c, &worker("worker-1", "proxy1.test", "hung"));
    register(&c, &worker("worker-2", "proxy2.test", "healthy"));
    let path_for = |domain: &str| {
        let session = uuid::Uuid::new_v4();
        let body = format!(
            r#"{{"login_session_token":null,"kernel_host":"10.0.1.7","kernel_port":30512,"session":{{"id":"{session}","user_uuid":"3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b","group_id":"9a1e8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b","access_key":"AKIA","domain_name":"{domain}"}}}}"#
        );
        let r = request(c.addr, "POST", "/v2/conf", &[AUTH], &body);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let token = r.json()["token"].as_str().expect("token").to_owned();
        format!("/v2/proxy/auth?token={token}&session_id={session}&app=jupyter&protocol=http")
    };
    let ask = |path: String| {
        let addr = c.addr;
        std::thread::spawn(move || {
            request(addr, "GET", &path, &[("Accept", "application/json")], "")
        })
    };
    let hung: Vec<_> = (0..HUNG).map(|_| ask(path_for("hung"))).collect();
    let on_hung = || {
        count(
            &pg,
            "SELECT count(*) FROM circuits c JOIN workers w ON w.id = c.worker WHERE w.authority = 'worker-1'",
        )
    };
    // As many as the turns a coordinator may hold (half its pool of 16) are stored,
    // each waiting for the hung worker's acknowledgement.
    wait_for("the creations on the hung worker were never stored", || {
        on_hung() >= 8
    });
    let healthy = ask(path_for("healthy"));
    let r = healthy.join().expect("the other session's call");
    let pending = hung.iter().filter(|h| !h.is_finished()).count();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        pending, HUNG,
        "the other session's creation, on a healthy worker, waited for the hung worker's acknowledgements to time out"
    );
    let answer = r.json();
    let circuit = handed_circuit(&answer);
    assert_eq!(
        pg.psql(
            "appproxy",
            &format!(
                "SELECT w.authority FROM circuits c JOIN workers w ON w.id = c.worker WHERE c.id = '{circuit}' AND c.creating_until IS NULL"
            )
        ),
        "worker-2",
        "the other session's circuit is settled on the healthy worker"
    );
    // All ten were under way at once, none waiting for a turn.
    wait_for(
        "the creations on the hung worker were not all under way at once",
        || on_hung() == HUNG as u64,
    );
    // The hung worker's creations end as before: not acknowledged, withdrawn, and
    // nowhere else to go (503).
    for h in hung {
        let r = h.join().expect("a call for the hung worker");
        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    }
    assert_eq!(on_hung(), 0, "the unacknowledged circuits are withdrawn");
}

/// A creation's turn at its reuse key ends once its circuit is stored, not at its
/// acknowledgement; a creation whose worker does not acknowledge replaces the
/// circuit with another on another worker. Between that withdrawal and the
/// replacement's insert, a call for the same key on another node found nothing and
/// created a circuit of its own. Here node A's first circuit is on a worker that
/// never acknowledges, and the insert of its replacement waits (the healthy
/// worker's row held locked) while node B's call, asked meanwhile, looks: A takes
/// the key's turn again before it withdraws, so B, waiting for it, finds the
/// replacement and reuses it.
#[test]
fn a_call_on_another_node_reuses_the_circuit_that_replaces_an_unacknowledged_one() {
    let pg = Pg::start();
    let redis = appproxy_test_support::redis::Redis::start();
    let _workers = StandIn::start_hung_for(&redis.url(), "worker-1");
    let extra = format!(
        "worker_ack_timeout_secs = 6\n[redis]\nurl = \"{}\"",
        redis.url()
    );
    let (_dir_a, a) = node(&pg, &extra);
    let (_dir_b, b) = node(&pg, &extra);
    // The hung worker has the more free ports: placement tries it first.
    register(
        &a,
        r#"{"authority":"worker-1","frontend_mode":"port","protocol":"http","hostname":"proxy1.test","api_port":10201,"port_range":[10205,10300],"accepted_traffics":["interactive"]}"#,
    );
    register(
        &a,
        r#"{"authority":"worker-2","frontend_mode":"port","protocol":"http","hostname":"proxy2.test","api_port":10201,"port_range":[10305,10310],"accepted_traffics":["interactive"]}"#,
    );
    let r = request(a.addr, "POST", "/v2/conf", &[AUTH], &api::conf_body());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let token = r.json()["token"].as_str().expect("token").to_owned();
    let path =
        format!("/v2/proxy/auth?token={token}&session_id={SESSION}&app=jupyter&protocol=http");
    let on = |authority: &str| {
        count(
            &pg,
            &format!("SELECT count(*) FROM circuits c JOIN workers w ON w.id = c.worker WHERE w.authority = '{authority}'"),
        )
    };
    let on_a = ask(a.addr, &path, "replaced-a");
    wait_for("node A's first circuit was never stored", || {
        on("worker-1") == 1
    });
    let held = pg.hold(
        "appproxy",
        "BEGIN; SELECT id FROM workers WHERE authority = 'worker-2' FOR UPDATE",
    );
    // Asked while A's creation waits for its acknowledgement (6 s): B waits for it.
    let on_b = ask(b.addr, &path, "replaced-b");
    wait_for("node A's replacement was never inserted", || {
        count(
            &pg,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'WITH created AS%'",
        ) >= 1
    });
    // A's first circuit is withdrawn; B, polling its mark every 100 ms, looks again
    // within this (well under the insert's statement timeout, 4 s).
    std::thread::sleep(Duration::from_secs(1));
    held.commit();
    let mut handed = Vec::new();
    let mut reused = Vec::new();
    for call in [on_a, on_b] {
        let r = call.join().expect("a call");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let answer = r.json();
        handed.push(handed_circuit(&answer));
        reused.push(answer["reuse"].as_bool().expect("reuse"));
    }
    assert_eq!(
        handed[0], handed[1],
        "the calls on two nodes were answered with two circuits"
    );
    assert_eq!(reused, [false, true], "A created, B reused");
    assert_eq!(
        pg.psql("appproxy", "SELECT string_agg(id::text, ',') FROM circuits"),
        handed[0],
        "exactly the one circuit handed out is stored for the session"
    );
    assert_eq!(
        on("worker-2"),
        1,
        "the replacement is on the healthy worker"
    );
}

/// Two circuits left marked past their bound (as coordinators that died
/// mid-creation leave them), the one overdue longest held locked by another
/// transaction: the leader's sweep took them in order, its removal of the locked
/// one failed at the statement timeout, and the pass ended there, every pass:
/// one locked row kept every later one deployed. The sweep now goes on past one
/// circuit's failure (and leaves rows locked at its read to the next pass).
#[test]
fn one_locked_overdue_circuit_does_not_block_the_sweep_of_the_others() {
    let pg = Pg::start();
    let extra = "check_unsettled_creation_interval_secs = 1";
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start_with(dir.path(), &pg, extra);
    wait_for("the node never led", || leads(&c));
    let token = setup(&c);
    let r = request(
        c.addr,
        "GET",
        &format!("/v2/proxy/auth?token={token}&session_id={SESSION}&app=jupyter&protocol=http"),
        &[("Accept", "application/json")],
        "",
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // The first left longest ago: the sweep reads it first.
    for (app, port, ago) in [("left-first", 1, 120), ("left-second", 2, 60)] {
        pg.psql(
            "appproxy",
            &format!(
                "INSERT INTO circuits (id, app, protocol, worker, app_mode, frontend_mode, port,
                    open_to_public, session_ids, route_info, creating_until)
                 SELECT gen_random_uuid(), '{app}', protocol, worker, app_mode, frontend_mode,
                    port + {port}, open_to_public, ARRAY[gen_random_uuid()], route_info,
                    now() - interval '{ago} s'
                 FROM circuits WHERE app = 'jupyter'"
            ),
        );
    }
    let held = pg.hold(
        "appproxy",
        "BEGIN; SELECT id FROM circuits WHERE app = 'left-first' FOR UPDATE",
    );
    // Bounded: several passes, each at most one statement timeout (4 s) per
    // locked row.
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(
        &pg,
        "SELECT count(*) FROM circuits WHERE app = 'left-second'",
    ) != 0
    {
        assert!(
            Instant::now() < deadline,
            "the circuit after the locked one was never swept"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    held.commit();
    wait_for("the locked circuit was never swept once free", || {
        count(
            &pg,
            "SELECT count(*) FROM circuits WHERE app = 'left-first'",
        ) == 0
    });
    assert_eq!(
        count(&pg, "SELECT count(*) FROM circuits WHERE app = 'jupyter'"),
        1,
        "the settled circuit is kept"
    );
}

/// A coordinator stopped (SIGSTOP) while its creation waited for the worker's
/// acknowledgement, for longer than the acknowledgement's timeout; the
/// acknowledgement came during the pause and waited in its socket. On resuming,
/// the timer fired before the acknowledgement was read: the creation was
/// answered 503 and withdrawn though it had been acknowledged. A timer that fires
/// late now gives the acknowledgement a short grace to be read first.
#[test]
fn an_acknowledgement_that_came_during_a_pause_is_not_a_timeout() {
    let pg = Pg::start();
    let redis = appproxy_test_support::redis::Redis::start();
    let extra = format!(
        "worker_ack_timeout_secs = 2\n[redis]\nurl = \"{}\"",
        redis.url()
    );
    let (_dir, c) = node(&pg, &extra);
    let _worker = StandIn::start_pausing(&redis.url(), c.child.id(), Duration::from_secs(3));
    let token = setup(&c);
    let r = request(
        c.addr,
        "GET",
        &format!("/v2/proxy/auth?token={token}&session_id={SESSION}&app=jupyter&protocol=http"),
        &[("Accept", "application/json")],
        "",
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM circuits WHERE creating_until IS NULL"
        ),
        1
    );
}

/// The leadership lease (`leader_lease_secs`): a coordinator that stops gracefully
/// (SIGTERM) gives it up as it stops, and the other node leads at its next pass;
/// one killed keeps it until it runs out, at most the configured lease later.
#[test]
fn a_stopping_coordinator_gives_up_its_lease_and_a_killed_ones_runs_out() {
    let pg = Pg::start();
    let redis = appproxy_test_support::redis::Redis::start();
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut conn = client.get_connection().expect("redis connection");
    // The node a lease names (`{node}.{until}.{signature}`: the rest changes at
    // every renewal).
    let holder = |conn: &mut redis::Connection| -> Option<String> {
        let lease: Option<String> = redis::cmd("GET")
            .arg("leader:appproxy:coordinator")
            .query(conn)
            .expect("GET");
        lease.map(|l| l.split('.').next().unwrap_or_default().to_owned())
    };
    let extra = format!(
        "leader_lease_secs = 7\ncheck_unsettled_creation_interval_secs = 1\n[redis]\nurl = \"{}\"",
        redis.url()
    );
    let (dir, mut first) = node(&pg, &extra);
    let mut led = None;
    wait_for("the first coordinator never took the lease", || {
        led = holder(&mut conn);
        led.is_some()
    });
    let first_id = led.expect("the first node's lease");
    let (_second_dir, second) = node(&pg, &extra);
    // Stopped gracefully: the lease is given up, and the second node takes it.
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(first.child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + PATIENCE;
    while first.child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "the coordinator never stopped");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_ne!(
        holder(&mut conn).as_deref(),
        Some(first_id.as_str()),
        "a coordinator that stopped gracefully still holds the lease"
    );
    assert!(
        log_lines(dir.path())
            .iter()
            .any(|l| l["message"] == "leadership given up"),
        "the coordinator did not say it gave up the lease"
    );
    let mut next = None;
    wait_for("the second coordinator never took the lease", || {
        next = holder(&mut conn);
        next.is_some()
    });
    assert_ne!(next.as_deref(), Some(first_id.as_str()));
    // Killed: the lease stays, for at most the lease configured.
    drop(second);
    assert_eq!(
        holder(&mut conn),
        next,
        "a killed coordinator gave up its lease"
    );
    let left: i64 = redis::cmd("PTTL")
        .arg("leader:appproxy:coordinator")
        .query(&mut conn)
        .expect("PTTL");
    assert!(
        (0..=7_000).contains(&left),
        "the lease lasts {left} ms, not the 7 s configured"
    );
}
