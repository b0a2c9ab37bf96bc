//! A service binary behind a stdout that stalls: its stdout is a pipe the test holds
//! and stops reading (a container's log driver that stalled), then closes (each write
//! fails with `EPIPE`). [`serving`] learns the address from the pipe, and
//! [`never_stalls`] checks that the service keeps answering through both, keeps its
//! lines whole and in order, and counts what it could not write.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::serving::{addrs_in, tail, DEADLINE};

/// Requests sent while nobody reads: each logs a line of some 350 bytes, so together
/// they are many times what a pipe holds (64 KiB) and well within what the writer
/// queues (8 MiB), so none is dropped.
pub const UNREAD_REQUESTS: usize = 3_000;

/// The request ID of the `i`-th request: the marker its log line carries.
pub fn request_id(i: usize) -> String {
    format!("5d6c8c1e-9a4d-4e6f-8b7a-{i:012}")
}

/// Reads `child`'s stdout (taken from it; it must have been spawned with
/// `Stdio::piped()`) until the JSON line whose `message` is `message`, at most
/// [`DEADLINE`], and returns the addresses in that line's `fields` and the pipe, not
/// read further. Panics with what the process wrote when it exits first.
pub fn serving(
    child: &mut Child,
    message: &str,
    fields: &[&str],
) -> (Vec<SocketAddr>, BufReader<ChildStdout>) {
    let stdout = child.stdout.take().expect("spawned with a piped stdout");
    let (message, fields): (String, Vec<String>) =
        (message.into(), fields.iter().map(|f| (*f).into()).collect());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut text = String::new();
        let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(n) if n > 0 => text.push_str(&line),
                _ => {
                    let _ = tx.send(Err(text));
                    return;
                }
            }
            if let Some(addrs) = addrs_in(&line, &message, &fields) {
                let _ = tx.send(Ok((addrs, reader)));
                return;
            }
        }
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(Ok(found)) => found,
        Ok(Err(text)) => panic!(
            "stdout ended before the serving line ({:?}); it had:\n{}",
            child.try_wait(),
            tail(&text)
        ),
        Err(_) => panic!("no serving line on stdout within {DEADLINE:?}"),
    }
}

/// With `stdout` held and not read, `ask(request_id(i))` is answered for each of
/// [`UNREAD_REQUESTS`] requests (it returns whether the answer came, bounded); read
/// again, the pipe gives whole JSON lines, in order, down to the last request's. Then
/// with the pipe closed, 200 more are answered and `dropped()` (the service's
/// `appproxy_log_lines_dropped_total`) counts lines it could not write.
pub fn never_stalls(
    stdout: BufReader<ChildStdout>,
    mut ask: impl FnMut(&str) -> bool,
    mut dropped: impl FnMut() -> u64,
) {
    for i in 0..UNREAD_REQUESTS {
        assert!(
            ask(&request_id(i)),
            "request {i} not answered behind a stdout nobody reads"
        );
    }
    assert_eq!(dropped(), 0, "lines dropped while the queue had room");
    // Read again: every line whole, the requests' lines in order, up to the last one.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut next = 0;
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                let _ = tx.send(Err(format!("not a whole JSON line: {line:?}")));
                return;
            };
            let id = v["request_id"].as_str().unwrap_or_default();
            if id == request_id(next) {
                next += 1;
            } else if (next..UNREAD_REQUESTS).any(|i| id == request_id(i)) {
                let _ = tx.send(Err(format!("request {next}'s line missing: {line}")));
                return;
            }
            if next == UNREAD_REQUESTS {
                let _ = tx.send(Ok(()));
                return;
            }
        }
        let _ = tx.send(Err(format!("stdout ended at request {next}")));
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e}"),
        Err(_) => panic!("the queued lines were not written within {DEADLINE:?}"),
    }
    // The reader thread returned and dropped the pipe: every write now fails.
    for i in UNREAD_REQUESTS..UNREAD_REQUESTS + 200 {
        assert!(
            ask(&request_id(i)),
            "request {i} not answered behind a closed stdout"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while dropped() == 0 {
        assert!(
            Instant::now() < deadline,
            "no line counted as dropped behind a closed stdout"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
