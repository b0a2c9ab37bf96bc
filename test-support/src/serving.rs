//! Where a server started by a test listens, learned instead of chosen: the server
//! binds port 0 and logs the address it actually bound on its "serving" line; [`addr`]
//! waits (bounded) for that line in the part of the log this run wrote and fails at
//! once, with the log, when the process exits first. A port chosen beforehand can be
//! taken by another process before the server binds it, and a connect loop cannot
//! tell that other listener from the server. [`assert_running`] is the same
//! fail-fast check for harnesses that must wait some other way (a worker's circuit
//! ports are fixed by its config), and [`logged`] the same wait for a server running
//! in the test process, its lines in a [`Sink`].

use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::logs::Sink;

/// How long a server may take to log that it serves: a hang guard only (the machine
/// may be shared, and a store may be migrated first).
pub const DEADLINE: Duration = Duration::from_secs(60);

/// How many of the last log lines a failure shows.
const TAIL_LINES: usize = 200;

/// The length of the log at `path` now (0 when there is none yet): taken before a
/// process that appends to it starts, it is where that run's lines begin.
pub fn log_end(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The log at `path` from byte `from` on: what the run that started there wrote.
pub fn log_since(path: &Path, from: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(from).unwrap_or(usize::MAX);
    String::from_utf8_lossy(bytes.get(start..).unwrap_or_default()).into_owned()
}

/// The last lines of `text`, for a failure message.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let skipped = lines.len().saturating_sub(TAIL_LINES);
    let shown = lines[skipped..].join("\n");
    if skipped == 0 {
        shown
    } else {
        format!("[{skipped} earlier lines]\n{shown}")
    }
}

/// The addresses in `fields` of the first JSON line of `text` whose `message` is
/// `message`; `None` until that line is there. Panics when the line is there but a
/// field does not hold an address: waiting longer would not change it.
pub fn addrs_in(text: &str, message: &str, fields: &[&str]) -> Option<Vec<SocketAddr>> {
    let line = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == message)?;
    let addrs = fields
        .iter()
        .map(|field| {
            line[*field]
                .as_str()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| {
                    panic!("the {message:?} line has no address in {field:?}: {line}")
                })
        })
        .collect();
    Some(addrs)
}

/// The address in `field` of the JSON line whose `message` is `message`, in the part
/// of the log at `log` from byte `from` on (see [`log_end`]): what this run of `child`
/// wrote. Waits for the line, at most [`DEADLINE`]; panics with the tail of that log
/// when `child` exits first or the deadline passes.
pub fn addr(child: &mut Child, log: &Path, from: u64, message: &str, field: &str) -> SocketAddr {
    let addrs = addrs(child, log, from, message, &[field]);
    addrs[0]
}

/// [`addr`] for several fields of the same line, in the order of `fields`.
pub fn addrs(
    child: &mut Child,
    log: &Path,
    from: u64,
    message: &str,
    fields: &[&str],
) -> Vec<SocketAddr> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        // Read before asking whether it exited: a line written just before the exit
        // is still seen, and an exit is reported with everything the run wrote.
        let text = log_since(log, from);
        if let Some(addrs) = addrs_in(&text, message, fields) {
            return addrs;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let text = log_since(log, from);
            panic!(
                "the process exited ({status}) before logging {message:?}; its log:\n{}",
                tail(&text)
            );
        }
        assert!(
            Instant::now() < deadline,
            "no {message:?} line within {DEADLINE:?}; the log:\n{}",
            tail(&text)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Panics, with the tail of the log at `log` from byte `from` on, when `child` has
/// exited: called on each turn of a wait for something else, it makes a harness fail
/// at once with the reason instead of at its deadline with none. `what` names the
/// process in the message.
pub fn assert_running(child: &mut Child, what: &str, log: &Path, from: u64) {
    if let Ok(Some(status)) = child.try_wait() {
        panic!(
            "the {what} exited ({status}); its log:\n{}",
            tail(&log_since(log, from))
        );
    }
}

/// The address in `field` of the JSON line whose `message` is `message` among the
/// lines `sink` got from byte `from` on (its buffer's length before the server
/// started): a server running in the test process. Waits
/// for the line, at most [`DEADLINE`]; panics with the tail of those lines when it
/// does not come.
pub fn logged(sink: &Sink, from: usize, message: &str, field: &str) -> SocketAddr {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = {
            let bytes = sink.0.lock().unwrap_or_else(|p| p.into_inner());
            String::from_utf8_lossy(bytes.get(from..).unwrap_or_default()).into_owned()
        };
        if let Some(addrs) = addrs_in(&text, message, &[field]) {
            return addrs[0];
        }
        assert!(
            Instant::now() < deadline,
            "no {message:?} line within {DEADLINE:?}; the log:\n{}",
            tail(&text)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
