//! The circuit store's suite, run against both engines: embedded SQLite in a
//! temporary file and a throwaway PostgreSQL server started by the harness; on both,
//! a change-log entry written before the migration that keeps a removal's request
//! reads as none. Then checks of the PostgreSQL schema itself: the original's native
//! enums hold enum names, and rows written by older versions (routes as a JSON
//! string) still read. A creation's mark in the store (under way, settled, overdue)
//! on both engines, and circuits stored before the migration that adds it read as
//! settled.

use appproxy_coordinator::store::{Changes, CreationMark, Origin, Store, StoreError};
use appproxy_shared::model::{AppMode, Circuit, FrontendMode, ProxyProtocol, RouteInfo};
use appproxy_test_support::pg::Pg;
use serde_json::json;

fn worker_body(authority: &str) -> serde_json::Value {
    json!({"authority": authority, "frontend_mode": "port", "protocol": "http",
        "hostname": "proxy1.test", "tls_listen": false, "tls_advertised": true, "api_port": 10201,
        "port_range": [10205, 10300], "wildcard_domain": null, "wildcard_traffic_port": null,
        "accepted_traffics": ["interactive", "inference"], "filtered_apps_only": false,
        "traefik_last_used_marker_path": null,
        "app_filters": [{"key": "session.domain_name", "value": "default"}]})
}

fn circuit(worker: uuid::Uuid, port: u16) -> Circuit {
    let session = uuid::Uuid::new_v4();
    Circuit {
        id: uuid::Uuid::new_v4(),
        app: Some("jupyter".into()),
        protocol: ProxyProtocol::Http,
        worker: Some(worker),
        app_mode: AppMode::Interactive,
        frontend_mode: FrontendMode::Port,
        envs: [("A".to_owned(), json!("1"))].into_iter().collect(),
        arguments: Some("--x".into()),
        open_to_public: false,
        allowed_client_ips: vec!["10.0.0.0/8".into(), "192.168.1.1".into()],
        port: Some(port),
        subdomain: None,
        user_id: Some(uuid::Uuid::new_v4()),
        endpoint_id: None,
        runtime_variant: None,
        route_info: vec![RouteInfo {
            route_id: None,
            session_id: session,
            session_name: None,
            kernel_host: "10.0.1.7".into(),
            kernel_port: 30512,
            protocol: ProxyProtocol::Http,
            traffic_ratio: 1.0,
            health_status: None,
            upstream_tls: Default::default(),
        }],
        session_ids: vec![session],
        created_at: Some("2026-08-20T01:02:03.456789Z".into()),
        updated_at: Some("2026-08-20T01:02:03.456789Z".into()),
        // Stored and read back on both engines, set or not.
        upstream_reuse: (port % 2 == 0).then_some(appproxy_shared::model::Reuse::Client),
    }
}

/// A request's trace context as the coordinator stores it with a change.
fn trace(parent_span: &str, tracestate: Option<&str>) -> appproxy_shared::TraceContext {
    appproxy_shared::TraceContext::read(
        Some(&format!(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-{parent_span}-01"
        )),
        tracestate,
    )
    .expect("a valid trace context")
}

/// Equal but for the times, which the engine may stamp itself.
fn same(a: &Circuit, b: &Circuit) {
    let strip = |c: &Circuit| Circuit {
        created_at: None,
        updated_at: None,
        ..c.clone()
    };
    assert_eq!(strip(a), strip(b));
}

async fn suite(store: Store) {
    // Workers: upsert by authority, filters replaced by the registration's, HA node
    // count.
    let w = store
        .upsert_worker(&worker_body("worker-1"))
        .await
        .expect("register");
    let mut again = worker_body("worker-1");
    again["hostname"] = json!("proxy1b.test");
    again["accepted_traffics"] = json!(["inference"]);
    again["app_filters"] = json!([{"key": "session.access_key", "value": "AK"}]);
    assert_eq!(store.upsert_worker(&again).await.expect("re-register"), w);
    let row = store.worker(w).await.expect("read").expect("worker");
    assert_eq!(row.body["hostname"], "proxy1b.test");
    assert_eq!(row.body["port_range"], json!([10205, 10300]));
    assert_eq!(row.body["tls_advertised"], true);
    assert_eq!(row.nodes, 2);
    assert_eq!(row.status, "ALIVE");
    assert_eq!(
        row.body["app_filters"],
        json!([{"key": "session.access_key", "value": "AK"}])
    );
    let other = store
        .upsert_worker(&worker_body("worker-2"))
        .await
        .expect("register");
    assert_ne!(other, w);
    assert_eq!(store.workers().await.expect("list").len(), 2);
    // One worker read alone, with its own filters only; placement reads only the
    // ALIVE ones, each with its filters (grouped once per read).
    assert_eq!(
        store
            .worker(other)
            .await
            .expect("read")
            .expect("worker")
            .body["app_filters"],
        json!([{"key": "session.domain_name", "value": "default"}])
    );
    assert_eq!(
        store.worker(uuid::Uuid::new_v4()).await.expect("read"),
        None
    );
    assert!(store.deregister_worker(other).await.expect("leave"));
    let alive = store.alive_workers().await.expect("alive");
    assert_eq!(
        alive.iter().map(|w| w.id).collect::<Vec<_>>(),
        vec![w],
        "only ALIVE workers"
    );
    assert_eq!(
        alive[0].body["app_filters"],
        json!([{"key": "session.access_key", "value": "AK"}])
    );
    assert_eq!(store.workers().await.expect("list").len(), 2);
    assert_eq!(
        store
            .upsert_worker(&worker_body("worker-2"))
            .await
            .expect("back"),
        other
    );
    assert_eq!(store.alive_workers().await.expect("alive").len(), 2);
    // A registration naming an empty list of filters leaves the worker none.
    let mut bare = worker_body("worker-2");
    bare["app_filters"] = json!([]);
    assert_eq!(
        store.upsert_worker(&bare).await.expect("re-register"),
        other
    );
    let row = store.worker(other).await.expect("read").expect("worker");
    assert_eq!(row.body["app_filters"], json!([]));
    assert!(store
        .alive_workers()
        .await
        .expect("alive")
        .iter()
        .all(|a| a.id != other || a.body["app_filters"] == json!([])));
    // One naming filters has them; one that does not name the key keeps them.
    let mut named = worker_body("worker-2");
    named["app_filters"] = json!([{"key": "session.access_key", "value": "AK2"}]);
    store.upsert_worker(&named).await.expect("re-register");
    let mut silent = worker_body("worker-2");
    silent
        .as_object_mut()
        .expect("object")
        .remove("app_filters");
    store.upsert_worker(&silent).await.expect("re-register");
    assert_eq!(
        store
            .worker(other)
            .await
            .expect("read")
            .expect("worker")
            .body["app_filters"],
        json!([{"key": "session.access_key", "value": "AK2"}])
    );

    // Circuits round-trip whole, with the origin request ID or NULL, and the trace
    // context of the creating request (traceparent and tracestate) or none.
    let created = trace(
        "00f067aa0ba902b7",
        Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
    );
    let c1 = circuit(w, 10205);
    store
        .insert_circuit(&c1, Some("mgr-req-1"), Some(&created))
        .await
        .expect("insert");
    let c2 = circuit(w, 10206);
    store.insert_circuit(&c2, None, None).await.expect("insert");
    let (back, origin) = store.circuit(c1.id).await.expect("read").expect("circuit");
    same(&back, &c1);
    assert_eq!(
        origin,
        Origin {
            request_id: Some("mgr-req-1".into()),
            trace: Some(created.clone())
        }
    );
    assert!(back.created_at.is_some());
    assert_eq!(
        store
            .circuit(c2.id)
            .await
            .expect("read")
            .expect("circuit")
            .1,
        Origin::default()
    );
    let mine = store.circuits(Some(w)).await.expect("list");
    assert_eq!(
        mine.iter().map(|(c, _)| c.id).collect::<Vec<_>>(),
        vec![c1.id, c2.id]
    );
    assert!(store.circuits(Some(other)).await.expect("list").is_empty());
    assert_eq!(store.circuits(None).await.expect("list").len(), 2);

    // Slots in use (only the port workers asked about, and whoever holds the wanted
    // subdomain) and the circuits of one session.
    let mut slots = store.used_slots(&[w], "nobody").await.expect("slots");
    slots.sort();
    assert_eq!(slots, vec![(w, Some(10205), None), (w, Some(10206), None)]);
    assert!(store
        .used_slots(&[other], "nobody")
        .await
        .expect("slots")
        .is_empty());

    // Placement's reads: the ports in use counted per worker inside the range given
    // (a worker with none absent), and one worker's ports in a range, ascending.
    assert_eq!(
        store
            .used_port_counts(&[(w, 10205, 10300), (other, 10205, 10300)])
            .await
            .expect("counts"),
        [(w, 2)].into_iter().collect()
    );
    assert_eq!(
        store
            .used_port_counts(&[(w, 10206, 10206)])
            .await
            .expect("counts"),
        [(w, 1)].into_iter().collect()
    );
    assert!(store
        .used_port_counts(&[(w, 10207, 10300)])
        .await
        .expect("counts")
        .is_empty());
    assert_eq!(
        store.used_ports(w, 10200, 10300).await.expect("ports"),
        vec![10205, 10206]
    );
    assert_eq!(
        store.used_ports(w, 10206, 10210).await.expect("ports"),
        vec![10206]
    );
    assert!(store
        .used_ports(other, 1, 65535)
        .await
        .expect("ports")
        .is_empty());

    // Every change counts in the worker's revision; what changed after a revision is
    // read from the log, in bounded answers, and the whole set page by page.
    assert_eq!(store.revision(w).await.expect("revision"), Some(2));
    assert_eq!(store.revision(other).await.expect("revision"), Some(0));
    assert_eq!(
        store
            .revision(uuid::Uuid::new_v4())
            .await
            .expect("revision"),
        None
    );
    let ids = |rows: &[(Circuit, Origin)]| rows.iter().map(|(c, _)| c.id).collect::<Vec<_>>();
    match store.changes_since(w, 0, 100).await.expect("changes") {
        Changes::Since {
            revision,
            upserts,
            removed,
            more,
        } => {
            assert_eq!((revision, more), (2, false));
            assert_eq!(ids(&upserts), vec![c1.id, c2.id]);
            assert!(removed.is_empty());
            assert_eq!(upserts[0].1.request_id.as_deref(), Some("mgr-req-1"));
            assert_eq!(upserts[0].1.trace.as_ref(), Some(&created));
            assert_eq!(upserts[1].1, Origin::default());
        }
        got => panic!("changes expected, got {got:?}"),
    }
    match store.changes_since(w, 0, 1).await.expect("changes") {
        Changes::Since {
            revision,
            upserts,
            more,
            ..
        } => {
            assert_eq!((revision, more), (1, true));
            assert_eq!(ids(&upserts), vec![c1.id]);
        }
        got => panic!("changes expected, got {got:?}"),
    }
    assert_eq!(
        store.changes_since(w, 2, 100).await.expect("changes"),
        Changes::Since {
            revision: 2,
            upserts: Vec::new(),
            removed: Vec::new(),
            more: false
        },
        "nothing changed: an empty answer"
    );
    assert_eq!(
        store.changes_since(w, 7, 100).await.expect("changes"),
        Changes::Resync { revision: 2 },
        "a revision ahead of the store's (a store started afresh) asks for the whole set"
    );
    let mut by_id = [c1.id, c2.id];
    by_id.sort();
    let (revision, first) = store.circuits_page(w, None, 1).await.expect("page");
    assert_eq!((revision, ids(&first)), (2, vec![by_id[0]]));
    let (_, both) = store.circuits_page(w, None, 2).await.expect("page");
    for (c, origin) in &both {
        let want = (c.id == c1.id).then_some(&created);
        assert_eq!(origin.trace.as_ref(), want, "the page carries the trace");
    }
    let (_, second) = store
        .circuits_page(w, Some(by_id[0]), 1)
        .await
        .expect("page");
    assert_eq!(ids(&second), vec![by_id[1]]);
    let (_, rest) = store
        .circuits_page(w, Some(by_id[1]), 1)
        .await
        .expect("page");
    assert!(rest.is_empty());
    let of_session = store
        .circuits_of_session(c2.session_ids[0])
        .await
        .expect("by session");
    assert_eq!(
        of_session.iter().map(|(c, _)| c.id).collect::<Vec<_>>(),
        vec![c2.id]
    );
    assert!(store
        .circuits_of_session(uuid::Uuid::new_v4())
        .await
        .expect("by session")
        .is_empty());

    // A taken port on the same worker is a conflict and writes nothing; another
    // worker may use it.
    let clash = circuit(w, 10205);
    assert!(matches!(
        store.insert_circuit(&clash, None, Some(&created)).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(store.circuit(clash.id).await.expect("read").is_none());
    store
        .insert_circuit(&circuit(other, 10205), None, None)
        .await
        .expect("other worker");

    // Routes replaced; session IDs follow.
    let s = uuid::Uuid::new_v4();
    let routes = vec![
        RouteInfo {
            route_id: Some(uuid::Uuid::new_v4()),
            session_id: s,
            session_name: None,
            kernel_host: "10.0.0.2".into(),
            kernel_port: 8000,
            protocol: ProxyProtocol::Http,
            traffic_ratio: 0.5,
            health_status: None,
            upstream_tls: Default::default(),
        },
        RouteInfo {
            route_id: Some(uuid::Uuid::new_v4()),
            session_id: s,
            session_name: None,
            kernel_host: "10.0.0.3".into(),
            kernel_port: 8000,
            protocol: ProxyProtocol::Http,
            traffic_ratio: 0.5,
            health_status: None,
            upstream_tls: Default::default(),
        },
    ];
    // The change keeps the trace context of the request that made it (the creating
    // request's ID stays).
    let updated = trace("b7ad6b7169203331", None);
    assert!(store
        .update_routes(c1.id, &routes, Some(&updated))
        .await
        .expect("update"));
    let (back, origin) = store.circuit(c1.id).await.expect("read").expect("circuit");
    assert_eq!(back.route_info, routes);
    assert_eq!(back.session_ids, vec![s, s]);
    assert_eq!(
        origin,
        Origin {
            request_id: Some("mgr-req-1".into()),
            trace: Some(updated.clone())
        }
    );
    match store.changes_since(w, 2, 100).await.expect("changes") {
        Changes::Since { upserts, .. } => {
            assert_eq!(ids(&upserts), vec![c1.id]);
            assert_eq!(upserts[0].1.trace.as_ref(), Some(&updated));
        }
        got => panic!("changes expected, got {got:?}"),
    }
    assert!(!store
        .update_routes(uuid::Uuid::new_v4(), &routes, None)
        .await
        .expect("update"));
    // The session index follows the routes.
    assert_eq!(
        ids(&store.circuits_of_session(s).await.expect("by session")),
        vec![c1.id]
    );
    assert!(store
        .circuits_of_session(c1.session_ids[0])
        .await
        .expect("by session")
        .is_empty());

    // Route health survives the store; health-checked endpoints are listed.
    let mut sick = routes.clone();
    sick[1].health_status = Some(appproxy_shared::model::RouteHealth::Unhealthy);
    // An untraced change (a health check without a request) leaves no trace.
    assert!(store
        .update_routes(c1.id, &sick, None)
        .await
        .expect("update"));
    let (back, origin) = store.circuit(c1.id).await.expect("read").expect("circuit");
    assert_eq!(back.route_info, sick);
    assert_eq!(origin.trace, None);
    let (on, off) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let settings = json!({"enable": true, "path": "/h", "interval": 2.5});
    store
        .upsert_endpoint(on, true, Some(settings.clone()))
        .await
        .expect("endpoint");
    store
        .upsert_endpoint(off, false, None)
        .await
        .expect("endpoint");
    assert_eq!(
        store.health_checked_endpoints().await.expect("list"),
        vec![(on, settings)]
    );

    // Delete: the removal is logged with the removing request's ID and trace
    // context (the circuit's row, which held its creation's, is gone).
    let deleted = trace("53ce929d0e0e4736", Some("rojo=53ce929d0e0e4736"));
    assert!(store
        .delete_circuit(c2.id, Some("mgr-del-1"), Some(&deleted))
        .await
        .expect("delete"));
    assert!(!store
        .delete_circuit(c2.id, Some("mgr-del-2"), None)
        .await
        .expect("delete again"));
    assert!(store.circuit(c2.id).await.expect("read").is_none());
    // The worker's count of ports in use follows the removal (a second, refused,
    // removes nothing).
    assert_eq!(
        store
            .used_port_counts(&[(w, 10205, 10300)])
            .await
            .expect("counts"),
        [(w, 1)].into_iter().collect()
    );
    // The two route updates and the removal since revision 2, each circuit once,
    // as it is now.
    match store.changes_since(w, 2, 100).await.expect("changes") {
        Changes::Since {
            revision,
            upserts,
            removed,
            more,
        } => {
            assert_eq!((revision, more), (5, false));
            assert_eq!(ids(&upserts), vec![c1.id]);
            assert_eq!(upserts[0].0.route_info, sick);
            assert_eq!(upserts[0].1.trace, None);
            assert_eq!(
                removed,
                vec![(
                    c2.id,
                    Origin {
                        request_id: Some("mgr-del-1".into()),
                        trace: Some(deleted.clone())
                    }
                )]
            );
        }
        got => panic!("changes expected, got {got:?}"),
    }
    assert_eq!(store.prune_changes().await.expect("prune"), 0, "all recent");

    // The largest request ID and trace context the coordinator hands the store (a
    // request ID of `MAX_LEN` bytes, a `tracestate` of 32 members in 511 characters)
    // fit its columns: a creation and a removal never fail on their length.
    let longest_id = "R".repeat(appproxy_shared::request_id::MAX_LEN);
    let members: Vec<String> = (0..appproxy_shared::trace::TRACESTATE_MAX_MEMBERS)
        .map(|i| format!("k{i:02}={}", "v".repeat(11)))
        .collect();
    let longest_state = members.join(",");
    assert!(longest_state.len() <= appproxy_shared::trace::TRACESTATE_MAX_LEN);
    let widest = trace("6f0e1d2c3b4a5968", Some(&longest_state));
    assert_eq!(
        widest.tracestate_text(),
        Some(longest_state.as_str()),
        "kept whole"
    );
    let c3 = circuit(w, 10207);
    store
        .insert_circuit(&c3, Some(&longest_id), Some(&widest))
        .await
        .expect("the longest creating request fits");
    let (_, origin) = store.circuit(c3.id).await.expect("read").expect("circuit");
    assert_eq!(origin.request_id.as_deref(), Some(longest_id.as_str()));
    assert_eq!(origin.trace.as_ref(), Some(&widest));
    let before = store
        .revision(w)
        .await
        .expect("revision")
        .expect("the worker's revision");
    assert!(store
        .delete_circuit(c3.id, Some(&longest_id), Some(&widest))
        .await
        .expect("the longest removing request fits"));
    // An answer that ends between the creation and the removal says nothing of the
    // circuit (the creation is superseded), not "removed, by no one": the next
    // answer names the removing request.
    // (`before` is the creation's revision.)
    assert_eq!(
        store
            .changes_since(w, before - 1, 1)
            .await
            .expect("changes"),
        Changes::Since {
            revision: before,
            upserts: Vec::new(),
            removed: Vec::new(),
            more: true
        },
        "a superseded creation, read alone, is no removal"
    );
    match store.changes_since(w, before, 1).await.expect("changes") {
        Changes::Since { removed, more, .. } => {
            assert!(!more);
            assert_eq!(removed.len(), 1);
            assert_eq!(
                removed[0].1.request_id.as_deref(),
                Some(longest_id.as_str())
            );
        }
        got => panic!("changes expected, got {got:?}"),
    }
    match store.changes_since(w, before, 100).await.expect("changes") {
        Changes::Since { removed, .. } => assert_eq!(
            removed,
            vec![(
                c3.id,
                Origin {
                    request_id: Some(longest_id.clone()),
                    trace: Some(widest.clone())
                }
            )]
        ),
        got => panic!("changes expected, got {got:?}"),
    }

    // Tokens.
    let t = uuid::Uuid::new_v4();
    let body = json!({"login_session_token": null, "kernel_host": "10.0.1.7", "kernel_port": 30512,
        "session": {"id": uuid::Uuid::new_v4(), "user_uuid": uuid::Uuid::new_v4(), "group_id": uuid::Uuid::new_v4(),
            "access_key": "AKIA", "domain_name": "default"}});
    store.insert_token(t, &body).await.expect("token");
    assert_eq!(store.token(t, 0).await.expect("read"), Some(body.clone()));
    // A kernel serving HTTPS: the mode comes back with the token.
    let mut tls = body;
    tls["upstream_tls"] = json!("verify");
    let t2 = uuid::Uuid::new_v4();
    store.insert_token(t2, &tls).await.expect("token");
    assert_eq!(store.token(t2, 0).await.expect("read"), Some(tls));
    assert_eq!(
        store.token(uuid::Uuid::new_v4(), 0).await.expect("read"),
        None
    );
    // Tokens made a moment ago are within any age limit; past a limit of 0 (made
    // before now) they go.
    assert_eq!(store.prune_tokens(3600).await.expect("prune"), 0);
    assert!(store.token(t, 0).await.expect("read").is_some());

    // Heartbeats, deregistration and the lost check.
    assert!(store.heartbeat(w).await.expect("heartbeat"));
    assert!(!store
        .heartbeat(uuid::Uuid::new_v4())
        .await
        .expect("heartbeat"));
    assert!(store.mark_lost(3600).await.expect("check").is_empty());
    // A timeout reaching back before the epoch marks nobody (it panicked on SQLite,
    // and PostgreSQL refused its interval).
    assert!(store
        .mark_lost(u64::MAX)
        .await
        .expect("a timeout past the epoch")
        .is_empty());
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    store.heartbeat(w).await.expect("heartbeat");
    let lost = store.mark_lost(1).await.expect("check");
    assert_eq!(
        lost,
        vec![(other, "worker-2".to_owned())],
        "only the silent worker is lost"
    );
    assert_eq!(
        store
            .worker(other)
            .await
            .expect("read")
            .expect("worker")
            .status,
        "LOST"
    );
    assert!(store.heartbeat(other).await.expect("heartbeat"));
    assert_eq!(
        store
            .worker(other)
            .await
            .expect("read")
            .expect("worker")
            .status,
        "ALIVE"
    );
    assert!(store.deregister_worker(w).await.expect("deregister"));
    assert_eq!(
        store.worker(w).await.expect("read").expect("worker").status,
        "ALIVE",
        "one HA node left"
    );
    assert!(store.deregister_worker(w).await.expect("deregister"));
    let row = store.worker(w).await.expect("read").expect("worker");
    assert_eq!((row.status.as_str(), row.nodes), ("LOST", 0));
    store.ping().await.expect("ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_suite_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.sqlite3");
    suite(Store::open(None, &path).await.expect("open")).await;
    // Reopening migrates nothing and keeps the data.
    let store = Store::open(None, &path).await.expect("reopen");
    assert_eq!(store.workers().await.expect("list").len(), 2);
    // Trace contexts stored by someone else, hostile: they read as none (or without
    // their tracestate), the circuit itself still reads and answers.
    let huge = format!(
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-{}",
        "x".repeat(1 << 20)
    );
    let hostile: [(&str, Option<&str>); 5] = [
        ("00-zz", Some("rojo=1")),
        ("", None),
        (&huge, None),
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\u{0}",
            Some("rojo=1"),
        ),
        ("\u{1F600}", None),
    ];
    let db = rusqlite::Connection::open(&path).expect("open the file");
    for (traceparent, tracestate) in hostile {
        db.execute(
            "UPDATE circuits SET traceparent = ?1, tracestate = ?2",
            rusqlite::params![traceparent, tracestate],
        )
        .expect("write");
        stored_traces_that_do_not_read_are_none(&store, None).await;
    }
    db.execute(
        "UPDATE circuits SET traceparent = ?1, tracestate = ?2",
        rusqlite::params![
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "x".repeat(4096)
        ],
    )
    .expect("write");
    stored_traces_that_do_not_read_are_none(&store, Some(trace("00f067aa0ba902b7", None))).await;
}

/// Every circuit of the store reads, by every read a worker's fetch uses, with the
/// trace context `want` (the stored one did not read as more).
async fn stored_traces_that_do_not_read_are_none(
    store: &Store,
    want: Option<appproxy_shared::TraceContext>,
) {
    let all = store.circuits(None).await.expect("the circuits still read");
    assert!(!all.is_empty());
    for (c, origin) in &all {
        assert_eq!(origin.trace, want, "{}", c.id);
        let worker = c.worker.expect("a worker");
        let (_, page) = store
            .circuits_page(worker, None, 100)
            .await
            .expect("a page still reads");
        assert!(page.iter().all(|(_, o)| o.trace == want));
        match store
            .changes_since(worker, 0, 100)
            .await
            .expect("changes still read")
        {
            Changes::Since { upserts, .. } => {
                assert!(upserts.iter().all(|(_, o)| o.trace == want))
            }
            Changes::Resync { .. } => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_suite_on_postgresql() {
    let pg = Pg::start();
    let url = pg.url();
    suite(
        Store::open(Some(&url), std::path::Path::new("unused"))
            .await
            .expect("open"),
    )
    .await;
    let store = Store::open(Some(&url), std::path::Path::new("unused"))
        .await
        .expect("reopen");
    assert_eq!(store.workers().await.expect("list").len(), 2);
    assert_eq!(
        pg.psql(
            "appproxy",
            "SELECT count(*) FROM appproxy_schema_migrations"
        ),
        "15",
        "the schema, the endpoint index, the worker nodes, the scale indexes and change log, the tokens' upstream_tls, the changes' trace context, the removals' request, the removal marker, the tokens' creation time, the session limit's condition, the nodes that left, the deadline at commit, the creations under way, the workers' port counts, the circuits' upstream_reuse"
    );
    // Trace contexts stored by someone else, hostile: they read as none (or without
    // their tracestate), the circuit itself still reads and answers.
    let long = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x".repeat(9);
    let hostile: [(&str, Option<&str>); 3] = [
        ("00-zz", Some("rojo=1")),
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            None,
        ),
        (&long, None),
    ];
    for (traceparent, tracestate) in hostile {
        pg.psql(
            "appproxy",
            &format!(
                "UPDATE circuits SET traceparent = '{traceparent}', tracestate = {}",
                tracestate.map_or("NULL".to_owned(), |t| format!("'{t}'"))
            ),
        );
        stored_traces_that_do_not_read_are_none(&store, None).await;
    }
    pg.psql(
        "appproxy",
        "UPDATE circuits SET traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01', tracestate = 'Bad Key=1'",
    );
    stored_traces_that_do_not_read_are_none(&store, Some(trace("00f067aa0ba902b7", None))).await;
}

/// A worker with one circuit created and then removed by a traced request: the
/// worker and the circuit.
async fn removal_logged(store: &Store) -> (uuid::Uuid, uuid::Uuid) {
    let w = store
        .upsert_worker(&worker_body("worker-old"))
        .await
        .expect("register");
    let c = circuit(w, 10205);
    store
        .insert_circuit(&c, Some("mgr-req-0"), None)
        .await
        .expect("insert");
    assert!(store
        .delete_circuit(
            c.id,
            Some("mgr-del-0"),
            Some(&trace("00f067aa0ba902b7", None))
        )
        .await
        .expect("delete"));
    (w, c.id)
}

/// A setup token, stored.
async fn token_made(store: &Store) -> uuid::Uuid {
    let t = uuid::Uuid::new_v4();
    let body = json!({"login_session_token": null, "kernel_host": "10.0.1.7", "kernel_port": 30512,
        "session": {"id": uuid::Uuid::new_v4(), "user_uuid": uuid::Uuid::new_v4(), "group_id": uuid::Uuid::new_v4(),
            "access_key": "AKIA", "domain_name": "default"}});
    store.insert_token(t, &body).await.expect("token");
    t
}

/// A token made before the migration that stamps tokens counts from the migration:
/// kept by an age limit, and gone past a limit of 0 (it has a time, and it is past).
async fn tokens_count_from_the_migration(store: &Store, token: uuid::Uuid) {
    assert!(store.token(token, 0).await.expect("read").is_some());
    assert_eq!(store.prune_tokens(3600).await.expect("prune"), 0);
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert_eq!(store.prune_tokens(0).await.expect("prune"), 1);
    assert_eq!(store.token(token, 0).await.expect("read"), None);
}

/// The removals of what changed in `worker`'s set since revision 0.
async fn removals(store: &Store, worker: uuid::Uuid) -> Vec<(uuid::Uuid, Origin)> {
    match store.changes_since(worker, 0, 100).await.expect("changes") {
        Changes::Since { removed, .. } => removed,
        got => panic!("changes expected, got {got:?}"),
    }
}

/// After the migration that keeps the removing request: the entry logged before it
/// (its columns NULL) reads as no request, and a removal logged after it reads with
/// its request ID and trace context. Gives the later circuit.
async fn removals_across_the_migration(
    store: &Store,
    worker: uuid::Uuid,
    old: uuid::Uuid,
) -> uuid::Uuid {
    assert_eq!(
        removals(store, worker).await,
        vec![(old, Origin::default())],
        "an entry from before the migration has no request"
    );
    let c = circuit(worker, 10206);
    store.insert_circuit(&c, None, None).await.expect("insert");
    let deleted = trace("b7ad6b7169203331", Some("rojo=1"));
    assert!(store
        .delete_circuit(c.id, Some("mgr-del-3"), Some(&deleted))
        .await
        .expect("delete"));
    assert_eq!(
        removals(store, worker).await,
        vec![
            (old, Origin::default()),
            (
                c.id,
                Origin {
                    request_id: Some("mgr-del-3".into()),
                    trace: Some(deleted)
                }
            )
        ]
    );
    c.id
}

/// A circuit stored by the version before creations were marked (a settled insert,
/// its mark's column dropped below): the circuit.
async fn kept_circuit(store: &Store, worker: uuid::Uuid) -> uuid::Uuid {
    let c = circuit(worker, 10207);
    store.insert_circuit(&c, None, None).await.expect("insert");
    c.id
}

/// After the migration that keeps each worker's count of circuits holding a port:
/// the count is the circuits stored before it.
async fn port_counts_from_the_migration(store: &Store, worker: uuid::Uuid) {
    let held = store
        .held_slots(Some(worker))
        .await
        .expect("slots")
        .iter()
        .filter(|(_, _, port, _)| port.is_some())
        .count() as u64;
    assert!(held > 0, "a circuit holding a port before the migration");
    assert_eq!(
        store
            .used_port_counts(&[(worker, 1, 65535)])
            .await
            .expect("counts")
            .get(&worker)
            .copied(),
        Some(held)
    );
}

/// After the migration that marks creations under way: a circuit stored before it
/// is settled (never overdue, never swept), and a creation marked after it is
/// under way.
async fn settled_across_the_migration(store: &Store, worker: uuid::Uuid, kept: uuid::Uuid) {
    assert_eq!(
        store.creation_mark(kept).await.expect("mark"),
        Some(CreationMark::Settled)
    );
    assert!(store
        .overdue_creations(100)
        .await
        .expect("overdue")
        .is_empty());
    assert!(!store
        .delete_overdue_creation(kept, None, None)
        .await
        .expect("delete"));
    let c = circuit(worker, 10208);
    store
        .insert_creating_circuit(&c, None, None, None, std::time::Duration::from_secs(60))
        .await
        .expect("insert");
    assert_eq!(
        store.creation_mark(c.id).await.expect("mark"),
        Some(CreationMark::UnderWay)
    );
    assert!(store
        .delete_circuit(c.id, None, None)
        .await
        .expect("delete"));
}

/// A removal entry whose stored trace context does not read: the removal still
/// reads, with its request ID and no trace context.
async fn a_hostile_removal_trace_is_none(store: &Store, worker: uuid::Uuid, removed: uuid::Uuid) {
    let got = removals(store, worker).await;
    let (_, by) = got
        .iter()
        .find(|(id, _)| *id == removed)
        .expect("the removal still reads");
    assert_eq!(
        by,
        &Origin {
            request_id: Some("mgr-del-3".into()),
            trace: None
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_logged_before_the_migration_reads_as_none_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.sqlite3");
    let first = Store::open(None, &path).await.expect("open");
    let (worker, old) = removal_logged(&first).await;
    let token = token_made(&first).await;
    let kept = kept_circuit(&first, worker).await;
    drop(first);
    // Back to the schema before the migration, the entry kept: as a store of the
    // previous version left it.
    let db = rusqlite::Connection::open(&path).expect("open the file");
    db.execute_batch(
        "DROP INDEX circuits_creating_until;
         ALTER TABLE circuits DROP COLUMN creating_until;
         ALTER TABLE circuit_changes DROP COLUMN request_id;
         ALTER TABLE circuit_changes DROP COLUMN traceparent;
         ALTER TABLE circuit_changes DROP COLUMN tracestate;
         ALTER TABLE circuit_changes DROP COLUMN removal;
         DROP INDEX tokens_created_at;
         ALTER TABLE tokens DROP COLUMN created_at;
         ALTER TABLE worker_nodes DROP COLUMN left_at;
         DROP TRIGGER circuits_port_circuits_insert;
         DROP TRIGGER circuits_port_circuits_delete;
         DROP TRIGGER circuits_port_circuits_update;
         ALTER TABLE workers DROP COLUMN port_circuits;
         PRAGMA user_version = 6;",
    )
    .expect("downgrade");
    let store = Store::open(None, &path).await.expect("open and migrate");
    port_counts_from_the_migration(&store, worker).await;
    tokens_count_from_the_migration(&store, token).await;
    let later = removals_across_the_migration(&store, worker, old).await;
    db.execute(
        "UPDATE circuit_changes SET traceparent = '00-zz', tracestate = 'rojo=1' WHERE circuit = ?1",
        rusqlite::params![later.to_string()],
    )
    .expect("write");
    a_hostile_removal_trace_is_none(&store, worker, later).await;
    settled_across_the_migration(&store, worker, kept).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_logged_before_the_migration_reads_as_none_on_postgresql() {
    let pg = Pg::start();
    let url = pg.url();
    let open = || Store::open(Some(&url), std::path::Path::new("unused"));
    let first = open().await.expect("open");
    let (worker, old) = removal_logged(&first).await;
    let token = token_made(&first).await;
    let kept = kept_circuit(&first, worker).await;
    drop(first);
    // Back to the schema before the migration, the entry kept: as a store of the
    // previous version left it.
    pg.psql(
        "appproxy",
        "ALTER TABLE circuits DROP COLUMN upstream_reuse;
         DROP INDEX circuits_creating_until;
         ALTER TABLE circuits DROP COLUMN creating_until;
         ALTER TABLE circuit_changes DROP COLUMN request_id, DROP COLUMN traceparent,
            DROP COLUMN tracestate, DROP COLUMN removal;
         DROP INDEX tokens_created_at;
         ALTER TABLE tokens DROP COLUMN created_at;
         DROP FUNCTION appproxy_circuit_may_insert(uuid, integer, timestamptz);
         ALTER TABLE worker_nodes DROP COLUMN left_at;
         DROP TRIGGER circuits_commit_before_deadline ON circuits;
         DROP FUNCTION appproxy_commit_before_deadline();
         DROP TRIGGER circuits_port_circuits ON circuits;
         DROP FUNCTION appproxy_count_port_circuits();
         ALTER TABLE workers DROP COLUMN port_circuits;
         DELETE FROM appproxy_schema_migrations WHERE version IN (7, 8, 9, 10, 11, 12, 13, 14, 15);",
    );
    let store = open().await.expect("open and migrate");
    port_counts_from_the_migration(&store, worker).await;
    tokens_count_from_the_migration(&store, token).await;
    let later = removals_across_the_migration(&store, worker, old).await;
    pg.psql(
        "appproxy",
        &format!(
            "UPDATE circuit_changes SET traceparent = '00-zz', tracestate = 'rojo=1' WHERE circuit = '{later}'"
        ),
    );
    a_hostile_removal_trace_is_none(&store, worker, later).await;
    settled_across_the_migration(&store, worker, kept).await;
}

/// The pages of a worker's whole set as a worker reads them at start, in ID order
/// (`between_pages` names circuits to remove after each page but the last): the
/// IDs read, in order, and the revision of the first page.
async fn read_pages(
    store: &Store,
    worker: uuid::Uuid,
    limit: usize,
    mut between_pages: impl FnMut(&[uuid::Uuid]) -> Vec<uuid::Uuid>,
) -> (Vec<uuid::Uuid>, u64) {
    let mut read = Vec::new();
    let mut first_revision = None;
    let mut after = None;
    loop {
        let (revision, page) = store
            .circuits_page(worker, after, limit)
            .await
            .expect("page");
        first_revision.get_or_insert(revision);
        assert!(page.len() <= limit, "a page holds at most its limit");
        for (c, _) in &page {
            assert_eq!(c.worker, Some(worker), "another worker's circuit");
            assert!(
                read.last().is_none_or(|last| *last < c.id),
                "pages come in ascending ID order, each circuit once: {} after {:?}",
                c.id,
                read.last()
            );
            read.push(c.id);
        }
        if page.len() < limit {
            break;
        }
        after = page.last().map(|(c, _)| c.id);
        for id in between_pages(&read) {
            assert!(store.delete_circuit(id, None, None).await.expect("delete"));
        }
    }
    (read, first_revision.expect("a page"))
}

/// The set a worker comes to: the pages it read, then what changed after the first
/// page's revision (read now).
async fn caught_up(
    store: &Store,
    worker: uuid::Uuid,
    read: &[uuid::Uuid],
    mut since: u64,
) -> std::collections::BTreeSet<uuid::Uuid> {
    let mut set: std::collections::BTreeSet<uuid::Uuid> = read.iter().copied().collect();
    loop {
        match store
            .changes_since(worker, since, 1000)
            .await
            .expect("changes")
        {
            Changes::Since {
                revision,
                upserts,
                removed,
                more,
            } => {
                set.extend(upserts.iter().map(|(c, _)| c.id));
                for (id, _) in removed {
                    set.remove(&id);
                }
                since = revision;
                if !more {
                    return set;
                }
            }
            got => panic!("changes expected, got {got:?}"),
        }
    }
}

/// The IDs of a worker's stored circuits.
async fn stored_ids(store: &Store, worker: uuid::Uuid) -> std::collections::BTreeSet<uuid::Uuid> {
    store
        .circuits(Some(worker))
        .await
        .expect("circuits")
        .iter()
        .map(|(c, _)| c.id)
        .collect()
}

/// Paging a large set while it changes: each circuit that stays comes exactly once,
/// in ID order, a circuit removed before its page was read never comes, another
/// worker's never; and the pages plus what changed after the first page's revision
/// are exactly the stored set — what a worker's start relies on.
async fn pages_read_each_circuit_once_while_the_set_changes(store: Store) {
    let w = store
        .upsert_worker(&worker_body("paged-worker"))
        .await
        .expect("register");
    let other = store
        .upsert_worker(&worker_body("paged-other"))
        .await
        .expect("register");
    let mut ids = Vec::new();
    for i in 0..120u16 {
        let c = circuit(w, 20_000 + i);
        store.insert_circuit(&c, None, None).await.expect("insert");
        ids.push(c.id);
        if i % 4 == 0 {
            let c = circuit(other, 20_000 + i);
            store.insert_circuit(&c, None, None).await.expect("insert");
        }
    }
    // Gaps before the read: every fifth circuit is gone.
    for id in ids.iter().step_by(5) {
        assert!(store.delete_circuit(*id, None, None).await.expect("delete"));
    }
    let present: Vec<uuid::Uuid> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 5 != 0)
        .map(|(_, id)| *id)
        .collect();
    let mut sorted = present.clone();
    sorted.sort();

    // Nothing changes while reading: every page full but the last, each circuit once.
    let (read, revision) = read_pages(&store, w, 7, |_| Vec::new()).await;
    assert_eq!(read, sorted);
    assert_eq!(
        caught_up(&store, w, &read, revision).await,
        sorted.iter().copied().collect()
    );
    // A page size that divides the set: the last page is empty.
    let (read, _) = read_pages(&store, w, sorted.len() / 4, |_| Vec::new()).await;
    assert_eq!(read, sorted);

    // Between pages, one circuit already read and one not yet read are removed.
    let mut removed_behind = Vec::new();
    let mut removed_ahead = Vec::new();
    let (read, revision) = read_pages(&store, w, 9, |read| {
        let last = *read.last().expect("read some");
        let behind = sorted
            .iter()
            .find(|id| **id <= last && !removed_behind.contains(*id) && read.contains(*id));
        let ahead = sorted
            .iter()
            .rev()
            .find(|id| **id > last && !removed_ahead.contains(*id));
        let mut gone = Vec::new();
        if let Some(id) = behind {
            removed_behind.push(*id);
            gone.push(*id);
        }
        if let Some(id) = ahead {
            removed_ahead.push(*id);
            gone.push(*id);
        }
        gone
    })
    .await;
    assert!(!removed_behind.is_empty() && !removed_ahead.is_empty());
    let stays: Vec<uuid::Uuid> = sorted
        .iter()
        .filter(|id| !removed_behind.contains(id) && !removed_ahead.contains(id))
        .copied()
        .collect();
    for id in &stays {
        assert_eq!(
            read.iter().filter(|r| *r == id).count(),
            1,
            "{id} stayed and comes once"
        );
    }
    for id in &removed_ahead {
        assert!(!read.contains(id), "{id} was removed before its page");
    }
    let stored = stored_ids(&store, w).await;
    assert_eq!(stored, stays.iter().copied().collect());
    assert_eq!(
        caught_up(&store, w, &read, revision).await,
        stored,
        "pages and the changes after them are the set"
    );

    // Circuits created and removed by another writer while pages are read: each read
    // has every circuit at most once, in order, and comes to the stored set once the
    // changes after its first page's revision are read.
    let writer = {
        let store = store.clone();
        let existing = stays.clone();
        tokio::spawn(async move {
            for i in 0..60u16 {
                let c = circuit(w, 30_000 + i);
                store.insert_circuit(&c, None, None).await.expect("insert");
                if i % 2 == 0 {
                    store
                        .delete_circuit(c.id, None, None)
                        .await
                        .expect("delete");
                }
                if let Some(id) = existing.get(usize::from(i)) {
                    store.delete_circuit(*id, None, None).await.expect("delete");
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let mut reads = Vec::new();
    loop {
        let done = writer.is_finished();
        reads.push(read_pages(&store, w, 5, |_| Vec::new()).await);
        if done {
            break;
        }
    }
    writer.await.expect("writer");
    let stored = stored_ids(&store, w).await;
    assert_eq!(stored.len(), stays.len() - stays.len().min(60) + 30);
    for (read, revision) in &reads {
        assert_eq!(
            caught_up(&store, w, read, *revision).await,
            stored,
            "pages read while the set changed, and the changes after them, are the set"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_read_each_circuit_once_while_the_set_changes_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(None, &dir.path().join("store.sqlite3"))
        .await
        .expect("open");
    pages_read_each_circuit_once_while_the_set_changes(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_read_each_circuit_once_while_the_set_changes_on_postgresql() {
    let pg = Pg::start();
    let store = Store::open(Some(&pg.url()), std::path::Path::new("unused"))
        .await
        .expect("open");
    pages_read_each_circuit_once_while_the_set_changes(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_schema_is_the_originals() {
    let pg = Pg::start();
    let url = pg.url();
    let store = Store::open(Some(&url), std::path::Path::new("unused"))
        .await
        .expect("open");
    // Native enums with the original's labels.
    assert_eq!(pg.psql("appproxy", "SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder) FROM pg_enum JOIN pg_type t ON t.oid = enumtypid WHERE typname = 'proxyprotocol'"), "HTTP,GRPC,HTTP2,TCP");
    assert_eq!(pg.psql("appproxy", "SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder) FROM pg_enum JOIN pg_type t ON t.oid = enumtypid WHERE typname = 'frontendmode'"), "WILDCARD_DOMAIN,PORT");
    for table in [
        "circuits",
        "workers",
        "worker_app_filters",
        "tokens",
        "endpoints",
    ] {
        assert_eq!(
            pg.psql(
                "appproxy",
                &format!("SELECT to_regclass('{table}') IS NOT NULL")
            ),
            "t",
            "{table}"
        );
    }
    let w = store
        .upsert_worker(&worker_body("worker-1"))
        .await
        .expect("register");
    let mut c = circuit(w, 10210);
    c.protocol = ProxyProtocol::Preopen;
    store
        .insert_circuit(
            &c,
            Some("R-1"),
            Some(&trace("00f067aa0ba902b7", Some("rojo=1"))),
        )
        .await
        .expect("insert");
    assert_eq!(
        pg.psql("appproxy", &format!("SELECT protocol::text || ' ' || app_mode::text || ' ' || frontend_mode::text || ' ' || allowed_client_ips || ' ' || origin_request_id FROM circuits WHERE id = '{}'", c.id)),
        "HTTP INTERACTIVE PORT 10.0.0.0/8,192.168.1.1 R-1",
        "enum names, the comma-string allowlist and the origin request ID"
    );
    assert_eq!(
        pg.psql(
            "appproxy",
            &format!(
                "SELECT traceparent || ' ' || tracestate FROM circuits WHERE id = '{}'",
                c.id
            )
        ),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 rojo=1",
        "the trace context in columns of its own"
    );
    assert_eq!(
        pg.psql(
            "appproxy",
            &format!(
                "SELECT occupied_slots || ' ' || available_slots FROM workers WHERE id = '{w}'"
            )
        ),
        "1 95"
    );
    assert_eq!(
        pg.psql(
            "appproxy",
            "SELECT property_name || '=' || property_value FROM worker_app_filters"
        ),
        "session.domain_name=default"
    );
    // A row as an older writer left it: routes as a JSON *string*.
    let old = uuid::Uuid::new_v4();
    let s = uuid::Uuid::new_v4();
    pg.psql("appproxy", &format!(
        "INSERT INTO circuits (id, protocol, worker, app_mode, frontend_mode, port, open_to_public, session_ids, route_info)
         VALUES ('{old}', 'TCP', '{w}', 'INTERACTIVE', 'PORT', 10211, false, ARRAY['{s}'::uuid],
         to_jsonb('[{{\"session_id\":\"{s}\",\"kernel_host\":\"h\",\"kernel_port\":22,\"protocol\":\"tcp\",\"traffic_ratio\":1.0}}]'::text))"));
    let (back, origin) = store.circuit(old).await.expect("read").expect("row");
    assert_eq!(
        (back.protocol, back.route_info[0].kernel_port, origin),
        (ProxyProtocol::Tcp, 22, Origin::default())
    );
}

/// A stored registration this version cannot read (edited by hand, written by a
/// broken version) fails the worker listing with an error naming the worker; it is
/// never a panic and never read as a worker with defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_stored_registration_is_an_error_naming_the_worker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.sqlite3");
    let store = Store::open(None, &path).await.expect("open");
    let id = store
        .upsert_worker(&worker_body("worker-1"))
        .await
        .expect("register");
    assert_eq!(store.workers().await.expect("workers").len(), 1);
    drop(store);
    let db = rusqlite::Connection::open(&path).expect("open the file");
    db.execute(
        "UPDATE workers SET body = ?1 WHERE id = ?2",
        rusqlite::params![
            r#"{"authority":"worker-1","frontend_mode":"sideways"}"#,
            id.to_string()
        ],
    )
    .expect("corrupt the body");
    drop(db);
    let store = Store::open(None, &path).await.expect("reopen");
    let err = store
        .workers()
        .await
        .expect_err("an unreadable registration is an error");
    let text = err.to_string();
    assert!(text.contains(&id.to_string()), "{text}");
    assert!(text.contains("worker-1"), "{text}");
}

/// Another process holding SQLite's write lock (an operator's `sqlite3` shell, a
/// backup) keeps the one connection waiting; calls queue behind it. A queued write
/// used to get the connection just before its deadline, wait up to 5 s more for the
/// lock and commit after its caller had answered 503: a circuit stored that nobody
/// was told of. A call now waits for the lock only until its deadline: the write
/// fails, and nothing it asked for is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_write_never_commits_after_its_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.sqlite3");
    let store = Store::open(None, &path).await.expect("open");
    let w = store
        .upsert_worker(&worker_body("worker-1"))
        .await
        .expect("register");
    let held = rusqlite::Connection::open(&path).expect("second connection");
    held.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let (first, second) = (circuit(w, 10205), circuit(w, 10206));
    // The first holds the connection while it waits for the lock; the second
    // queues behind it from a second later.
    let holding = tokio::spawn({
        let (store, c) = (store.clone(), first.clone());
        async move { store.insert_circuit(&c, None, None).await }
    });
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let queued = tokio::spawn({
        let (store, c) = (store.clone(), second.clone());
        async move { store.insert_circuit(&c, None, None).await }
    });
    // Past the second's deadline (6 s from the start), the lock is let go.
    tokio::time::sleep(std::time::Duration::from_millis(6_500)).await;
    held.execute_batch("COMMIT").expect("let the lock go");
    for (what, call) in [("holding", holding), ("queued", queued)] {
        let result = call.await.expect("task");
        assert!(
            matches!(&result, Err(e) if e.is_unavailable()),
            "the {what} write: {result:?}"
        );
    }
    // Anything a late write could still commit has had the time to.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for c in [&first, &second] {
        assert!(
            store.circuit(c.id).await.expect("read").is_none(),
            "a write whose caller was told it failed was stored"
        );
    }
    store
        .insert_circuit(&first, None, None)
        .await
        .expect("the store serves once the lock is gone");
}

/// `/health/status`, `/api/worker` and `/api/slots` read every circuit whole (all
/// columns, bodies decoded) where counts per worker, or the slots held, suffice:
/// their cost grew with every circuit stored. The store answers both narrowly
/// (`count(*) … GROUP BY worker`; worker, ID, port and subdomain), and they agree
/// with the circuits stored, through creations and removals, on both engines.
async fn counts_and_slots_per_worker_match_the_circuits(store: Store) {
    let a = store
        .upsert_worker(&worker_body("count-a"))
        .await
        .expect("register");
    let b = store
        .upsert_worker(&worker_body("count-b"))
        .await
        .expect("register");
    let idle = store
        .upsert_worker(&worker_body("count-idle"))
        .await
        .expect("register");
    assert!(store.circuit_counts().await.expect("counts").is_empty());
    assert!(store.held_slots(None).await.expect("slots").is_empty());
    let mut on_a = Vec::new();
    for port in 10205..10212 {
        let c = circuit(a, port);
        store.insert_circuit(&c, None, None).await.expect("insert");
        on_a.push(c);
    }
    let mut on_b = Vec::new();
    for port in [10250, 10251, 10299] {
        let mut c = circuit(b, port);
        if port == 10299 {
            c.port = None;
            c.frontend_mode = FrontendMode::Wildcard;
            c.subdomain = Some("app-1".into());
        }
        store.insert_circuit(&c, None, None).await.expect("insert");
        on_b.push(c);
    }
    for gone in [&on_a[0], &on_a[3]] {
        assert!(store
            .delete_circuit(gone.id, None, None)
            .await
            .expect("delete"));
    }
    let left_a: Vec<&Circuit> = on_a
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 0 && *i != 3)
        .map(|(_, c)| c)
        .collect();
    let counts = store.circuit_counts().await.expect("counts");
    assert_eq!(counts.get(&a), Some(&5));
    assert_eq!(counts.get(&b), Some(&3));
    assert_eq!(counts.get(&idle), None, "a worker without circuits");
    assert_eq!(counts.len(), 2);
    assert_eq!(
        counts.values().sum::<u64>(),
        store.circuit_count().await.expect("count")
    );
    let as_slots = |cs: &[&Circuit]| {
        let mut v: Vec<_> = cs
            .iter()
            .map(|c| (c.worker.expect("worker"), c.id, c.port, c.subdomain.clone()))
            .collect();
        v.sort();
        v
    };
    let sorted = |mut v: Vec<appproxy_coordinator::store::HeldSlot>| {
        v.sort();
        v
    };
    assert_eq!(
        sorted(store.held_slots(Some(a)).await.expect("slots")),
        as_slots(&left_a)
    );
    assert_eq!(
        sorted(store.held_slots(Some(b)).await.expect("slots")),
        as_slots(&on_b.iter().collect::<Vec<_>>())
    );
    assert!(store
        .held_slots(Some(idle))
        .await
        .expect("slots")
        .is_empty());
    let all: Vec<&Circuit> = left_a.iter().copied().chain(on_b.iter()).collect();
    assert_eq!(
        sorted(store.held_slots(None).await.expect("slots")),
        as_slots(&all)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_and_slots_per_worker_match_the_circuits_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(None, &dir.path().join("store.sqlite3"))
        .await
        .expect("open");
    counts_and_slots_per_worker_match_the_circuits(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_and_slots_per_worker_match_the_circuits_on_postgresql() {
    let pg = Pg::start();
    let store = Store::open(Some(&pg.url()), std::path::Path::new("unused"))
        .await
        .expect("open");
    counts_and_slots_per_worker_match_the_circuits(store).await;
}

/// A session holds at most its limit of live interactive circuits, decided by the
/// store in the insert itself: simultaneous capped inserts for one session store
/// exactly the limit and refuse the rest with `SessionLimit`, nothing stored for
/// them; endpoint circuits listing the session and uncapped inserts do not count
/// against it or are not refused; another session is unaffected; a removal frees a
/// place. On PostgreSQL the inserts are first held on a lock of the worker row
/// until all of them have begun, so that they overlap for certain.
async fn circuits_per_session_are_capped(store: Store, pg: Option<&Pg>) {
    const LIMIT: u32 = 3;
    const INSERTS: u16 = 10;
    let w = store
        .upsert_worker(&worker_body("capped"))
        .await
        .expect("register");
    let session = uuid::Uuid::new_v4();
    let of_session = |port: u16, session: uuid::Uuid| {
        let mut c = circuit(w, port);
        c.route_info[0].session_id = session;
        c.session_ids = vec![session];
        c
    };
    // An endpoint's circuit that routes to the session: not the session's own.
    let mut endpoint = of_session(10299, session);
    endpoint.app_mode = AppMode::Inference;
    endpoint.endpoint_id = Some(uuid::Uuid::new_v4());
    store
        .insert_circuit(&endpoint, None, None)
        .await
        .expect("endpoint circuit");
    let held = pg.map(|pg| {
        pg.hold(
            "appproxy",
            "BEGIN; SELECT count(*) FROM (SELECT 1 FROM workers FOR UPDATE) locked",
        )
    });
    let tasks: Vec<_> = (0..INSERTS)
        .map(|i| {
            let store = store.clone();
            let c = of_session(10205 + i, session);
            tokio::spawn(async move {
                let r = store
                    .insert_session_circuit(&c, None, None, Some((session, LIMIT)))
                    .await;
                (c.id, r)
            })
        })
        .collect();
    if let (Some(pg), Some(held)) = (pg, held) {
        let waiting = || {
            pg.psql(
                "appproxy",
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'WITH created AS%'",
            )
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while waiting() != INSERTS.to_string() {
            assert!(
                std::time::Instant::now() < deadline,
                "the inserts never all waited: {}",
                waiting()
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        held.commit();
    }
    let mut stored = Vec::new();
    let mut refused = Vec::new();
    for t in tasks {
        match t.await.expect("insert task") {
            (id, Ok(())) => stored.push(id),
            (id, Err(StoreError::SessionLimit(n))) => {
                assert_eq!(n, LIMIT);
                refused.push(id);
            }
            (_, Err(e)) => panic!("insert: {e}"),
        }
    }
    assert_eq!(stored.len(), LIMIT as usize, "exactly the limit stored");
    assert_eq!(refused.len(), (INSERTS as usize) - LIMIT as usize);
    for id in &refused {
        assert!(store.circuit(*id).await.expect("read").is_none());
    }
    let mine = store
        .circuits_of_session(session)
        .await
        .expect("session's circuits");
    assert_eq!(
        mine.len(),
        LIMIT as usize + 1,
        "the limit and the endpoint's"
    );
    // One more is refused; another session is not; an uncapped insert is not.
    assert!(matches!(
        store
            .insert_session_circuit(
                &of_session(10250, session),
                None,
                None,
                Some((session, LIMIT))
            )
            .await,
        Err(StoreError::SessionLimit(LIMIT))
    ));
    let other = uuid::Uuid::new_v4();
    store
        .insert_session_circuit(&of_session(10251, other), None, None, Some((other, LIMIT)))
        .await
        .expect("another session");
    store
        .insert_session_circuit(&of_session(10252, session), None, None, Some((session, 0)))
        .await
        .expect("a limit of 0 is none");
    // A removal frees a place.
    for id in &stored {
        assert!(store.delete_circuit(*id, None, None).await.expect("delete"));
    }
    store
        .insert_session_circuit(
            &of_session(10253, session),
            None,
            None,
            Some((session, LIMIT)),
        )
        .await
        .expect("a place freed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuits_per_session_are_capped_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(None, &dir.path().join("store.sqlite3"))
        .await
        .expect("open");
    circuits_per_session_are_capped(store, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuits_per_session_are_capped_on_postgresql() {
    let pg = Pg::start();
    let store = Store::open(Some(&pg.url()), std::path::Path::new("unused"))
        .await
        .expect("open");
    circuits_per_session_are_capped(store, Some(&pg)).await;
}

/// A creation's mark in the store: under way until its bound (or settled before),
/// overdue past it; the sweep's read finds only the overdue ones, and its removal
/// takes only a circuit still overdue; an endpoint row written with the settling
/// of its circuit is written with it, or not at all when the circuit is gone.
async fn creations_are_marked_until_settled(store: Store) {
    let w = store
        .upsert_worker(&worker_body("worker-marks"))
        .await
        .expect("register");
    let long = std::time::Duration::from_secs(60);
    let short = std::time::Duration::from_millis(300);
    let settled = circuit(w, 10205);
    store
        .insert_creating_circuit(&settled, Some("r-1"), None, None, long)
        .await
        .expect("insert");
    let mark = |id| {
        let store = store.clone();
        async move { store.creation_mark(id).await.expect("mark") }
    };
    assert_eq!(mark(settled.id).await, Some(CreationMark::UnderWay));
    // Under way: read as any circuit (a worker deploys it), not yet overdue.
    assert!(store.circuit(settled.id).await.expect("read").is_some());
    assert!(store.settle_creation(settled.id).await.expect("settle"));
    assert_eq!(mark(settled.id).await, Some(CreationMark::Settled));
    // Settled twice is still settled; a circuit that is gone is not.
    assert!(store.settle_creation(settled.id).await.expect("settle"));
    assert!(!store
        .settle_creation(uuid::Uuid::new_v4())
        .await
        .expect("settle"));
    assert_eq!(mark(uuid::Uuid::new_v4()).await, None);

    let left = circuit(w, 10206);
    store
        .insert_creating_circuit(&left, None, None, None, short)
        .await
        .expect("insert");
    let late = circuit(w, 10207);
    store
        .insert_creating_circuit(&late, None, None, None, short)
        .await
        .expect("insert");
    let fresh = circuit(w, 10208);
    store
        .insert_creating_circuit(&fresh, None, None, None, long)
        .await
        .expect("insert");
    // A creation still under way renewed by its node: marked `long` ahead again.
    let renewed = circuit(w, 10210);
    let renewed_at = std::time::Instant::now();
    store
        .insert_creating_circuit(
            &renewed,
            None,
            None,
            None,
            std::time::Duration::from_secs(1),
        )
        .await
        .expect("insert");
    assert_eq!(
        store
            .renew_creations(&[renewed.id, settled.id, uuid::Uuid::new_v4()], long)
            .await
            .expect("renew"),
        1,
        "only the circuit still marked is renewed"
    );
    assert_eq!(store.renew_creations(&[], long).await.expect("renew"), 0);
    // Bounded wait until both short marks, and the renewed one's first, have
    // passed on the store's clock.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while mark(late.id).await != Some(CreationMark::Overdue)
        || mark(left.id).await != Some(CreationMark::Overdue)
        || renewed_at.elapsed() < std::time::Duration::from_millis(1_500)
    {
        assert!(std::time::Instant::now() < deadline, "a mark never passed");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(mark(renewed.id).await, Some(CreationMark::UnderWay));
    // A mark already past is not renewed (its creation is forfeit: the sweep
    // may be withdrawing it); a settled one stays settled.
    assert_eq!(
        store
            .renew_creations(&[left.id, settled.id], long)
            .await
            .expect("renew"),
        0
    );
    assert_eq!(mark(left.id).await, Some(CreationMark::Overdue));
    assert_eq!(mark(settled.id).await, Some(CreationMark::Settled));
    let mut overdue = store.overdue_creations(100).await.expect("overdue");
    overdue.sort();
    let mut want = vec![left.id, late.id];
    want.sort();
    assert_eq!(overdue, want, "only the overdue ones");
    assert_eq!(store.overdue_creations(1).await.expect("overdue").len(), 1);
    // Settled late, before the sweep removes it: kept.
    assert!(store.settle_creation(late.id).await.expect("settle"));
    assert!(!store
        .delete_overdue_creation(late.id, Some("sweep-1"), None)
        .await
        .expect("delete"));
    assert!(!store
        .delete_overdue_creation(settled.id, Some("sweep-1"), None)
        .await
        .expect("delete"));
    assert!(!store
        .delete_overdue_creation(fresh.id, Some("sweep-1"), None)
        .await
        .expect("delete"));
    assert!(store
        .delete_overdue_creation(left.id, Some("sweep-1"), None)
        .await
        .expect("delete"));
    assert!(store.circuit(left.id).await.expect("read").is_none());
    assert!(store
        .overdue_creations(100)
        .await
        .expect("overdue")
        .is_empty());
    // The removal is logged for the worker's fetch, under the sweep's ID.
    match store.changes_since(w, 0, 100).await.expect("changes") {
        Changes::Since { removed, .. } => assert_eq!(
            removed,
            vec![(
                left.id,
                Origin {
                    request_id: Some("sweep-1".into()),
                    trace: None
                }
            )]
        ),
        got => panic!("changes expected, got {got:?}"),
    }

    // An endpoint's row and its circuit's settling: together.
    let endpoint = uuid::Uuid::new_v4();
    let mut of_endpoint = circuit(w, 10209);
    of_endpoint.app_mode = AppMode::Inference;
    of_endpoint.endpoint_id = Some(endpoint);
    store
        .insert_creating_circuit(&of_endpoint, None, None, None, long)
        .await
        .expect("insert");
    assert!(store
        .upsert_endpoint_settling(endpoint, false, None, of_endpoint.id)
        .await
        .expect("write"));
    assert_eq!(mark(of_endpoint.id).await, Some(CreationMark::Settled));
    assert!(store.endpoint(endpoint).await.expect("read").is_some());
    let gone = uuid::Uuid::new_v4();
    assert!(!store
        .upsert_endpoint_settling(gone, false, None, uuid::Uuid::new_v4())
        .await
        .expect("write"));
    assert_eq!(
        store.endpoint(gone).await.expect("read"),
        None,
        "no row for a circuit that is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creations_are_marked_until_settled_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(None, &dir.path().join("store.sqlite3"))
        .await
        .expect("open");
    creations_are_marked_until_settled(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creations_are_marked_until_settled_on_postgresql() {
    let pg = Pg::start();
    let store = Store::open(Some(&pg.url()), std::path::Path::new("unused"))
        .await
        .expect("open");
    creations_are_marked_until_settled(store).await;
}

/// A node renews the marks of its creations under way in one write: with one of
/// their rows locked by another transaction (a settle or removal under way, an
/// operator's session), that write waited on the row until the statement timeout
/// and failed, renewing none of them, and once the marks passed the sweep took
/// creations still running. The rows locked are now skipped (renewed by the next
/// pass), the others renewed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_row_does_not_stall_the_renewal_of_other_marks() {
    let pg = Pg::start();
    let store = Store::open(Some(&pg.url()), std::path::Path::new("unused"))
        .await
        .expect("open");
    let w = store
        .upsert_worker(&worker_body("worker-renewal"))
        .await
        .expect("register");
    let short = std::time::Duration::from_secs(30);
    let long = std::time::Duration::from_secs(600);
    let ids: Vec<uuid::Uuid> = {
        let mut ids = Vec::new();
        for port in 10205..10208 {
            let c = circuit(w, port);
            store
                .insert_creating_circuit(&c, None, None, None, short)
                .await
                .expect("insert");
            ids.push(c.id);
        }
        ids
    };
    let held = pg.hold(
        "appproxy",
        &format!(
            "BEGIN; SELECT id FROM circuits WHERE id = '{}' FOR UPDATE",
            ids[0]
        ),
    );
    let renewed = store
        .renew_creations(&ids, long)
        .await
        .expect("the marks of the rows not locked are renewed");
    assert_eq!(renewed, 2);
    assert_eq!(
        pg.psql(
            "appproxy",
            "SELECT count(*) FROM circuits WHERE creating_until > now() + interval '500 s'"
        ),
        "2"
    );
    held.commit();
    // Once the row is free, the next renewal takes it.
    assert_eq!(store.renew_creations(&ids, long).await.expect("renew"), 3);
}

/// A circuit stored, the store then marked as migrated once more than this build
/// knows (as a newer build would leave it): opening it fails naming both counts,
/// and the store is left as it was (the circuit still there once the mark is gone).
async fn a_newer_schema_is_refused<F: std::future::Future<Output = Result<Store, StoreError>>>(
    open: impl Fn() -> F,
    mark_newer: impl Fn() -> i64,
    unmark: impl Fn(),
) {
    let store = open().await.expect("open");
    let worker = store
        .upsert_worker(&worker_body("proxy-newer"))
        .await
        .expect("register");
    let c = circuit(worker, 10210);
    store.insert_circuit(&c, None, None).await.expect("insert");
    drop(store);
    let known = mark_newer() - 1;
    match open().await {
        Err(e @ StoreError::SchemaNewer { found, known: k }) => {
            assert_eq!((found, k as i64), (known + 1, known));
            let text = e.to_string();
            assert!(
                text.contains(&format!("migration {}", known + 1))
                    && text.contains(&format!("({known})")),
                "{text}"
            );
        }
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("a store migrated by a newer build was opened"),
    }
    unmark();
    let store = open().await.expect("open once the mark is gone");
    let (kept, _) = store
        .circuit(c.id)
        .await
        .expect("read")
        .expect("the circuit is still there");
    same(&kept, &c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_migrated_by_a_newer_build_is_not_opened_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.sqlite3");
    let version = |db: &rusqlite::Connection| -> i64 {
        db.pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("user_version")
    };
    a_newer_schema_is_refused(
        || Store::open(None, &path),
        || {
            let db = rusqlite::Connection::open(&path).expect("open the file");
            let newer = version(&db) + 1;
            db.pragma_update(None, "user_version", newer).expect("mark");
            newer
        },
        || {
            let db = rusqlite::Connection::open(&path).expect("open the file");
            let known = version(&db) - 1;
            db.pragma_update(None, "user_version", known)
                .expect("unmark");
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_migrated_by_a_newer_build_is_not_opened_on_postgresql() {
    let pg = Pg::start();
    let url = pg.url();
    a_newer_schema_is_refused(
        || Store::open(Some(&url), std::path::Path::new("unused")),
        || {
            let out = pg.psql(
                "appproxy",
                "INSERT INTO appproxy_schema_migrations (version)
                   SELECT MAX(version) + 1 FROM appproxy_schema_migrations
                 RETURNING version",
            );
            out.lines()
                .find_map(|l| l.trim().parse().ok())
                .expect("the new version")
        },
        || {
            pg.psql(
                "appproxy",
                "DELETE FROM appproxy_schema_migrations
                   WHERE version = (SELECT MAX(version) FROM appproxy_schema_migrations)",
            );
        },
    )
    .await;
}
