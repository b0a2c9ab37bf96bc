//! `appproxy-test-support`: what the test trees of every crate share (a
//! dev-dependency only): a free loopback port, log capture, a raw HTTP/1.1 client, raw
//! HTTP/2 frames and HPACK, sockets that survive a stop of the process, throwaway PostgreSQL and Redis servers started from the
//! installed binaries, a strict reader of Prometheus text, and where a server a test
//! started listens.

pub mod config;
pub mod h2frames;
pub mod http;
pub mod logs;
pub mod net;
pub mod otlp;
pub mod pg;
pub mod prom;
pub mod python;
pub mod redis;
pub mod relay;
pub mod serving;
pub mod stalled_stdout;

/// Ports handed out by [`free_port`] and [`free_range`]: below the kernel's ephemeral
/// range (32768 and up on Linux), so neither an outgoing connection's source port nor
/// another `bind(0)` can take one between the test choosing it and its server binding
/// it.
const PORTS: std::ops::Range<u32> = 10_000..32_000;

/// The next candidate port of this process. Moving forward only, so two tests running
/// side by side never get the same port; it starts at a point that depends on the
/// process, so test binaries run one after another do not reuse each other's ports at
/// once either.
static CURSOR: std::sync::Mutex<Option<u32>> = std::sync::Mutex::new(None);

/// A free TCP port on 127.0.0.1: nothing listens on it now, and no other caller in this
/// process gets it.
pub fn free_port() -> u16 {
    free_range(1)
}

/// The first of `n` consecutive free TCP ports on 127.0.0.1 (see [`free_port`]).
pub fn free_range(n: u16) -> u16 {
    let n = u32::from(n.max(1));
    let mut cursor = CURSOR.lock().unwrap_or_else(|p| p.into_inner());
    let span = PORTS.end - PORTS.start;
    let next = cursor.get_or_insert_with(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        PORTS.start + (std::process::id().wrapping_mul(7919) ^ nanos) % span
    });
    for _ in 0..span {
        if *next + n > PORTS.end {
            *next = PORTS.start;
        }
        let base = *next;
        *next += n;
        let bindable = (base..base + n).all(|p| {
            u16::try_from(p).is_ok_and(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        });
        if bindable {
            return u16::try_from(base).expect("ports below 32000");
        }
    }
    panic!("no run of {n} free ports in {PORTS:?}");
}
