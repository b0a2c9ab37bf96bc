//! A failed creation leaves nothing stored, whatever the store does meanwhile: the
//! circuit of a creation that was not acknowledged, that its caller gave up on, or
//! whose endpoint row could not be written is withdrawn — tried again until the
//! store takes the removal — and a bulk endpoint creation is all or nothing. Each
//! against the coordinator binary on a throwaway PostgreSQL (and Redis where
//! acknowledgements are awaited).

mod common;

use common::Coordinator;

use appproxy_test_support::http::Resp;
use appproxy_test_support::pg::Pg;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The longest a test waits for what should happen (bounded waits only).
const PATIENCE: Duration = Duration::from_secs(90);

const SECRET: &str = "api-secret";
const AUTH: (&str, &str) = ("X-BackendAI-Token", SECRET);
const SESSION: &str = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";

/// Starts the coordinator on `pg`; `extra`: more `[coordinator]` keys, then any
/// further tables.
fn start_with(dir: &std::path::Path, pg: &Pg, extra: &str) -> Coordinator {
    let config = format!(
        "[coordinator]\nbind = \"127.0.0.1:0\"\n{extra}\n[secrets]\napi_secret = \"{SECRET}\"\njwt_secret = \"jwt-key\"\n[database]\nurl = \"{}\"\n[logging]\nfilter = \"info\"\n",
        pg.url()
    );
    common::start(dir, &config)
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

fn log_lines(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("coordinator.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits (bounded) until `done`; panics with `what` otherwise.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Registers the interactive port worker `worker-1` and a `/v2/conf` token.
fn setup(c: &Coordinator) -> String {
    let worker = r#"{"authority":"worker-1","frontend_mode":"port","protocol":"http","hostname":"proxy1.test","api_port":10201,"port_range":[10205,10208],"accepted_traffics":["interactive"]}"#;
    let r = request(c.addr, "PUT", "/api/worker", &[AUTH], worker);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let conf = format!(
        r#"{{"login_session_token":null,"kernel_host":"10.0.1.7","kernel_port":30512,"session":{{"id":"{SESSION}","user_uuid":"3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b","group_id":"9a1e8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b","access_key":"AKIA","domain_name":"default"}}}}"#
    );
    let r = request(c.addr, "POST", "/v2/conf", &[AUTH], &conf);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["token"].as_str().expect("token").to_owned()
}

fn register(c: &Coordinator, worker: &str) {
    let r = request(c.addr, "PUT", "/api/worker", &[AUTH], worker);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// A wildcard worker for inference traffic, `inference-1`.
const INFERENCE_WORKER: &str = r#"{"authority":"inference-1","frontend_mode":"wildcard","protocol":"http","hostname":"proxy2.test","api_port":10201,"wildcard_domain":".apps.test","wildcard_traffic_port":80,"accepted_traffics":["inference"]}"#;

fn endpoint_body(name: &str, deployment: Option<&str>) -> String {
    let id = deployment
        .map(|d| format!(r#""deployment_id":"{d}","#))
        .unwrap_or_default();
    format!(
        r#"{{{id}"version":"v2","service_name":"{name}","tags":{{"session":{{"user_uuid":"3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b","project_id":"9a1e8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b","domain_name":"default"}},"endpoint":{{"id":null,"runtime_variant":"vllm","existing_url":null}}}},"open_to_public":false,"health_check":{{"enable":true,"interval":10.0,"path":"/health","max_retries":10,"max_wait_time":15.0,"expected_status_code":200,"initial_delay":60.0}}}}"#
    )
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
    assert!(
        log_lines(dir.path())
            .iter()
            .any(|l| l["request_id"] == "ep-row-1"
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(&format!("endpoint {fresh} not created")))),
        "the withdrawal is logged under the request's ID"
    );
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
