//! A process's stdout, written by a thread of its own: what the process logs (the
//! worker's access-log batches, every component's log lines) is handed over and
//! never written by the thread that made it.
//!
//! A write to stdout blocks its caller while the reader does not keep up: in a
//! container, stdout is a pipe drained by the runtime's log driver, and a driver
//! that stalls fills the pipe's 64 KiB. A worker core that wrote there itself stopped
//! at the next batch, with every connection it held (measured: 166 requests, then
//! none, behind a pipe nobody read); the coordinator, whose runtime threads wrote
//! their log lines there, stopped answering after 186 requests. Here a thread only
//! queues its bytes, and a thread (`appproxy-stdout`) writes them in order. The
//! queue holds at most [`QUEUE_BYTES`]: past that, what is handed over is dropped
//! and counted (`appproxy_log_lines_dropped_total`, which also counts what a failed
//! write lost, as to a closed stdout), and once stdout takes writes again a warning
//! says how many lines were lost. Lines are never split: a chunk is whole lines, and
//! chunks are written whole, in the order they were queued.
//!
//! Until [`start`] runs (and in the libraries' own tests), writes go to stdout
//! directly. [`crate::telemetry::init`] starts it for the control-plane services
//! when their stdout is not a regular file (a file takes writes whoever reads it,
//! and its lines then stay in order with the answers); the worker starts it
//! itself, before its cores, always.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Bytes queued at most; what would go past is dropped.
pub const QUEUE_BYTES: usize = 8 << 20;

struct Out {
    tx: std::sync::mpsc::Sender<Vec<u8>>,
    /// Bytes queued and not yet written.
    queued: AtomicUsize,
}

static OUT: OnceLock<Out> = OnceLock::new();
/// The lines dropped.
static TALLY: Tally = Tally::new();

/// Lines dropped: since the start, and those no warning has told yet.
struct Tally {
    dropped: AtomicU64,
    unreported: AtomicU64,
}

impl Tally {
    const fn new() -> Self {
        Self {
            dropped: AtomicU64::new(0),
            unreported: AtomicU64::new(0),
        }
    }

    /// `lines` were dropped: refused at a full queue, or a write that failed.
    fn lost(&self, lines: u64) {
        self.dropped.fetch_add(lines, Ordering::Relaxed);
        self.unreported.fetch_add(lines, Ordering::Relaxed);
    }

    /// A write went out: the lines lost since the last one told, to be told now
    /// (taken only once stdout takes writes again, so that a warning about lines
    /// a closed stdout refused is not itself refused, and told again, for ever).
    fn written(&self) -> Option<u64> {
        Some(self.unreported.swap(0, Ordering::AcqRel)).filter(|n| *n > 0)
    }
}

/// Starts the writer thread (once; later calls do nothing). From here on, [`write`]
/// never blocks.
pub fn start() -> std::io::Result<()> {
    start_with(|chunk| std::io::stdout().lock().write_all(chunk))
}

/// [`start`] with another sink (tests).
fn start_with(
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()> + Send + 'static,
) -> std::io::Result<()> {
    if OUT.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    if OUT
        .set(Out {
            tx,
            queued: AtomicUsize::new(0),
        })
        .is_err()
    {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("appproxy-stdout".into())
        .spawn(move || {
            let out = OUT.get().expect("set before the thread starts");
            for chunk in rx {
                // A write that fails (stdout closed: EPIPE; a file at its size
                // limit) drops the chunk, counted: nothing else can be done with it,
                // and the writers must not wait. Told once stdout takes writes again
                // (before, only the lines a full queue refused were).
                let written = sink(&chunk).is_ok();
                if !written {
                    TALLY.lost(chunk_lines(&chunk));
                }
                out.queued.fetch_sub(chunk.len(), Ordering::AcqRel);
                if let Some(lost) = written.then(|| TALLY.written()).flatten() {
                    tracing::warn!(
                        lines = lost,
                        "log lines dropped: stdout did not take them (not as fast as they came, or not at all)"
                    );
                }
            }
        })?;
    Ok(())
}

/// Hands `chunk` (whole lines) to the writer thread, or drops it when the queue is
/// full. Never blocks once [`start`] ran; before, writes it to stdout at once.
pub fn write(chunk: Vec<u8>) {
    if chunk.is_empty() {
        return;
    }
    let Some(out) = OUT.get() else {
        let _ = std::io::stdout().lock().write_all(&chunk);
        return;
    };
    let len = chunk.len();
    let before = out.queued.fetch_add(len, Ordering::AcqRel);
    let refused = if before + len > QUEUE_BYTES {
        Some(chunk)
    } else {
        out.tx.send(chunk).err().map(|e| e.0)
    };
    if let Some(chunk) = refused {
        out.queued.fetch_sub(len, Ordering::AcqRel);
        TALLY.lost(chunk_lines(&chunk));
    }
}

/// Lines dropped since the start.
pub fn dropped_lines() -> u64 {
    TALLY.dropped.load(Ordering::Relaxed)
}

/// Waits, at most `limit`, until everything queued is written (before the process
/// exits). Returns whether it all was.
pub fn drain(limit: Duration) -> bool {
    let Some(out) = OUT.get() else {
        return true;
    };
    let until = Instant::now() + limit;
    while out.queued.load(Ordering::Acquire) > 0 {
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

/// The `appproxy_log_lines_dropped_total` family.
pub fn render_metrics(out: &mut String) {
    use std::fmt::Write as _;
    let _ = write!(
        out,
        "# HELP appproxy_log_lines_dropped_total Log and access-log lines dropped because stdout did not take them: not as fast as they came ({QUEUE_BYTES} bytes queued at most), or not at all (closed, a file at its size limit).\n# TYPE appproxy_log_lines_dropped_total counter\nappproxy_log_lines_dropped_total {}\n",
        dropped_lines()
    );
}

fn chunk_lines(chunk: &[u8]) -> u64 {
    chunk.iter().filter(|b| **b == b'\n').count().max(1) as u64
}

/// The `MakeWriter` of a process's log lines: each line is one [`write`].
#[derive(Clone, Copy, Default)]
pub struct QueuedStdout;

impl std::io::Write for QueuedStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        write(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for QueuedStdout {
    type Writer = QueuedStdout;

    fn make_writer(&'a self) -> Self::Writer {
        QueuedStdout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines a failed write lost are told, as a full queue's are, but only once a
    /// write goes out again: a warning about a closed stdout would be refused too,
    /// and told again, for ever. Before, a failed write's lines were counted and
    /// never told.
    #[test]
    fn lines_lost_are_told_once_a_write_goes_out() {
        let tally = Tally::new();
        tally.lost(3);
        tally.lost(2);
        assert_eq!(tally.dropped.load(Ordering::Relaxed), 5);
        assert_eq!(tally.written(), Some(5));
        assert_eq!(tally.written(), None, "told once");
        tally.lost(1);
        assert_eq!(tally.dropped.load(Ordering::Relaxed), 6);
        assert_eq!(tally.written(), Some(1));
    }
    use std::sync::{Arc, Condvar, Mutex};

    /// Behind a sink that takes nothing (a log reader that stalled), writers never
    /// wait: what fits the queue waits in it, the rest is dropped and counted, and
    /// once the sink takes writes again everything queued comes out whole, in order.
    #[test]
    fn a_stalled_stdout_never_holds_a_writer_and_loses_only_what_overflows() {
        let written: Arc<Mutex<Vec<u8>>> = Arc::default();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        {
            let (written, gate) = (written.clone(), gate.clone());
            start_with(move |chunk| {
                let (open, turn) = &*gate;
                let mut open = open.lock().expect("gate");
                while !*open {
                    open = turn.wait(open).expect("gate");
                }
                written.lock().expect("written").extend_from_slice(chunk);
                Ok(())
            })
            .expect("writer thread");
        }
        // 1 KiB lines, numbered; 3 times what the queue holds.
        let line = |i: usize| format!("{i:08} {}\n", "x".repeat(1014)).into_bytes();
        let n = 3 * QUEUE_BYTES / 1024;
        let started = Instant::now();
        for i in 0..n {
            write(line(i));
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a writer waited"
        );
        let dropped = dropped_lines();
        assert!(
            dropped as usize >= n - QUEUE_BYTES / 1024 - 1,
            "dropped {dropped} of {n}"
        );
        assert!((dropped as usize) < n, "everything dropped");
        *gate.0.lock().expect("gate") = true;
        gate.1.notify_all();
        assert!(drain(Duration::from_secs(30)), "the queue never drained");
        let written = written.lock().expect("written").clone();
        let lines: Vec<&[u8]> = written.split_inclusive(|b| *b == b'\n').collect();
        assert_eq!(lines.len() + dropped as usize, n);
        let mut last = None;
        for l in lines {
            assert_eq!(l.len(), 1024, "a line cut");
            let i: usize = std::str::from_utf8(&l[..8])
                .expect("digits")
                .parse()
                .expect("number");
            assert!(last.is_none_or(|p| i > p), "out of order");
            last = Some(i);
        }
        let mut text = String::new();
        render_metrics(&mut text);
        assert!(
            text.contains(&format!("appproxy_log_lines_dropped_total {dropped}")),
            "{text}"
        );
    }
}
