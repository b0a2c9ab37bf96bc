//! Circuits created and deleted leave nothing behind in the cores: the accept loop
//! of a port whose circuit goes ends, and so does its task. Found from outside: a
//! worker's anonymous memory grew about 0.7 kB for every circuit created and deleted
//! (two cores, no traffic), for as long as it ran. Each port closed had its accept
//! loop's glommio task cancelled (its handle dropped), and glommio 0.9 never frees a
//! task cancelled while pending (its future is dropped, so the listener closed, but
//! the task's allocation stays). An accept loop is now told to return instead, and
//! the core counts the loops still running (`appproxy_listeners`): one a port, not
//! one for every port it ever listened on.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{eventually, free_port, metric_all_cores, Upstream, Worker, WorkerOpts};

/// Cores of the worker.
const CORES: usize = 2;

/// Circuits created and deleted (each on a new frontend port's listener).
const CHURNS: usize = 150;

/// The ID of the circuit the test worker starts with.
const FIRST_ID: &str = "c0a8f5d2-1111-4222-8333-444455556666";

fn accepts(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn accept_loops_end_with_their_ports_as_circuits_churn() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        cores: CORES,
        upstreams: vec![up.addr],
        ..Default::default()
    });
    eventually("one accept loop a core", || {
        metric_all_cores(&w, "appproxy_listeners") == CORES as u64
    });
    // Each reload deletes the deployed circuit and creates another, with a new ID, on
    // the other of two ports: every core closes one listener and opens one.
    let ports = [w.port, free_port()];
    let mut id = FIRST_ID.to_string();
    for i in 0..CHURNS {
        let (from, to) = (ports[i % 2], ports[(i + 1) % 2]);
        let next = uuid::Uuid::new_v4().to_string();
        w.reload(|text| {
            text.replace(&format!("\nport = {from}\n"), &format!("\nport = {to}\n"))
                .replace(&format!("id = \"{id}\""), &format!("id = \"{next}\""))
        });
        id = next;
        eventually("the new circuit's port accepts", || accepts(to));
    }
    let last = ports[CHURNS % 2];
    let gone = ports[(CHURNS + 1) % 2];
    eventually("the deleted circuit's port is closed", || !accepts(gone));
    assert!(accepts(last), "the deployed circuit's port accepts");
    // Every core applies the last reload in its own time: wait (bounded) for the count
    // to settle, then say what it is.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut loops = metric_all_cores(&w, "appproxy_listeners");
    while loops != CORES as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        loops = metric_all_cores(&w, "appproxy_listeners");
    }
    assert_eq!(
        loops, CORES as u64,
        "after {CHURNS} circuits created and deleted, each core runs one accept loop (its \
         port's), not one for every port it listened on"
    );
}
