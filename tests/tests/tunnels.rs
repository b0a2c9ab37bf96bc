//! A circuit with an open tunnel and no new requests is still in use: the cores mark
//! it accessed at every hand-off while the tunnel lives (the original marks an open
//! WebSocket every 1.5 s), so idle collection leaves it alone; once the manager
//! deletes the circuit, the worker closes the tunnel. Single node, a TCP circuit held
//! open.

mod common;

use appproxy_test_support::net::ReadUninterrupted;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::http;

fn stats(coord: SocketAddr, circuit: &str) -> serde_json::Value {
    let (status, _, body) = http(coord, &format!("GET /api/circuit/{circuit}/statistics HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n"));
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("json")
}

#[test]
fn open_tunnels_keep_marking_last_access() {
    let echo_port = common::tcp_echo_app();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = common::free_port();
    let (worker, _agent, coord) =
        common::start_node(&dir.path().join("c.sqlite3"), port, "access_flush_ms = 100");
    common::wait_registered(coord, "w1");
    let session = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
    let circuit = common::create_circuit(coord, echo_port, session, session, "ssh", "tcp");

    // One connection, held open: one request counted, last access moving on.
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    conn.write_all(b"ping").expect("write");
    let mut got = [0u8; 4];
    conn.read_exact(&mut got).expect("echo");
    assert_eq!(&got, b"ping");
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        let s = stats(coord, &circuit);
        if s["requests"] == 1 {
            break s["last_access"].as_i64().expect("ms");
        }
        assert!(Instant::now() < deadline, "no mark: {s}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = stats(coord, &circuit);
        if s["last_access"].as_i64().expect("ms") > first {
            assert_eq!(s["requests"], 1, "marks alone, no new requests");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "last access did not move while the tunnel was open: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The manager deletes the circuit: the worker closes the open connection (it
    // would otherwise relay on until it idled out, an hour later).
    let (status, _, body) = http(coord, &format!("DELETE /api/circuit/{circuit} HTTP/1.1\r\nHost: c\r\nX-BackendAI-Token: api\r\nConnection: close\r\n\r\n"));
    assert!((200..300).contains(&status), "{status} {body}");
    conn.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let mut rest = [0u8; 16];
    match conn.read_uninterrupted(&mut rest) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the tunnel of a deleted circuit stays open: {other:?}"),
    }
    worker.stop();
}
