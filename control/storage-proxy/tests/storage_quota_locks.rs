//! A quota check that needs a measurement (`quota::measure`, called from async code
//! for session creation, a PATCH whose scope's measurement is old, a clone) must not
//! take the scope's lock — a blocking one, held by a commit while it puts an upload
//! in place — on the async runtime's thread: a runtime thread would stall for as
//! long as the commit runs, and with it every request that thread serves.
//!
//! Rather than timing a stall, the commit here waits for a task of the very runtime
//! whose thread the check runs on: if the check blocked the thread, that task would
//! never run and the two would wait on each other until the watchdog. (Without the
//! change, the watchdog fired.)

use std::sync::mpsc;
use std::time::Duration;

use appproxy_storage_proxy::config::{StorageConfig, Volume};
use appproxy_storage_proxy::{quota, state};

#[test]
fn a_check_needing_a_measurement_does_not_block_the_runtime_during_a_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let scope_name = uuid::Uuid::new_v4().simple().to_string();
    std::fs::create_dir(dir.path().join(&scope_name)).expect("scope");
    let config = StorageConfig {
        volumes: vec![Volume {
            name: "local".into(),
            path: dir.path().to_path_buf(),
        }],
        ..Default::default()
    };
    let st = state(&config).expect("state");
    let key = dir.path().join(&scope_name);

    // A commit of the scope (an upload put in place) that ends when `go` is sent.
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (st2, key2) = (st.clone(), key.clone());
    let committer = std::thread::spawn(move || {
        st2.reservations.commit(&key2, "upload-1", 0, || {
            let _ = entered_tx.send(());
            let _ = go_rx.recv();
            Ok(())
        })
    });
    entered_rx
        .recv()
        .expect("the commit holds the scope's lock");

    // One runtime thread: a check that needs a measurement, and a task that lets
    // the commit end (standing for anything else the runtime has to do meanwhile).
    let (done_tx, done_rx) = mpsc::channel::<bool>();
    let runner = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let other = tokio::spawn(async move {
                let _ = go_tx.send(());
            });
            let measured = quota::measure(&st, &key, "local", &scope_name).await;
            let _ = other.await;
            let _ = done_tx.send(measured.is_ok());
        });
    });
    let outcome = done_rx.recv_timeout(Duration::from_secs(30));
    assert!(
        outcome.is_ok(),
        "the async check blocked the runtime thread on the scope's lock while a commit held it: no other task of the runtime could run"
    );
    assert_eq!(outcome, Ok(true), "the measurement was made");
    assert!(committer.join().expect("committer").is_ok());
    runner.join().expect("runner");
}
