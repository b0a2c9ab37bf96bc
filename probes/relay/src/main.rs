//! A probe, not a product: one byte relay (accept a client, connect to its upstream,
//! copy bytes both ways until either side closes) driven two ways on one thread —
//! the worker's way, an edge-triggered epoll set with the syscall tried first, and an
//! io_uring ring created with `SINGLE_ISSUER | DEFER_TASKRUN` that submits a whole loop
//! turn's receives and sends in one `io_uring_enter`.
//!
//! A WebSocket session after its upgrade and a server-sent-events stream are exactly
//! this relay in the worker (`dataplane/src/relay.rs`), so the harness's `ws` and `sse`
//! scenarios run through the probe (`appproxy-bench --relay-probe`) tell, on the same
//! machine and in the same run as the worker, nginx and HAProxy, how much of the
//! per-message kernel work the ring saves. The answer decides whether the worker's
//! tunnels move to a ring (`docs/dataplane.md`, "io_uring probe").
//!
//! ```text
//! appproxy-relay-probe --mode uring --route 19130=127.0.0.1:19085
//! ```

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};

mod epoll;
mod uring;

/// How the relay waits for its sockets.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    /// Edge-triggered epoll, the syscall tried first (the worker's reactor).
    Epoll,
    /// An io_uring ring: one receive armed per direction, every completion's send and
    /// re-armed receive submitted together in the next loop turn's single enter.
    Uring,
    /// As `uring`, with multishot receives into a provided-buffer ring: a receive is
    /// armed once per connection instead of once per message.
    UringMultishot,
}

/// Command line.
#[derive(Parser, Debug)]
#[command(name = "appproxy-relay-probe", about)]
struct Args {
    /// How the relay waits for its sockets.
    #[arg(long, value_enum)]
    mode: Mode,
    /// `LISTEN_PORT=UPSTREAM_ADDR`: relay clients of 127.0.0.1:LISTEN_PORT to the
    /// upstream (repeatable; port 0 picks a free port, printed as `listening ADDR`).
    #[arg(long = "route", required = true)]
    routes: Vec<String>,
    /// Bytes read per receive (and held per direction of a connection).
    #[arg(long, default_value_t = 16 * 1024)]
    buffer: usize,
}

/// One listener and where its clients go.
pub(crate) struct Route {
    listener: TcpListener,
    upstream: SocketAddr,
}

/// Connects to `upstream` (blocking: on loopback the handshake completes inside the
/// call, in both modes alike) and returns the socket non-blocking, with `TCP_NODELAY`.
pub(crate) fn connect(upstream: SocketAddr) -> std::io::Result<OwnedFd> {
    let s = TcpStream::connect(upstream)?;
    s.set_nodelay(true)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Says where the probe listens, once the mode's set-up is done (the tests count the
/// probe's descriptors from here on).
pub(crate) fn serving(routes: &[Route]) -> anyhow::Result<()> {
    for r in routes {
        println!("listening {} -> {}", r.listener.local_addr()?, r.upstream);
    }
    println!("relay probe serving");
    Ok(())
}

fn parse_route(spec: &str) -> anyhow::Result<Route> {
    let (port, upstream) = spec
        .split_once('=')
        .with_context(|| format!("route {spec:?}: expected LISTEN_PORT=UPSTREAM_ADDR"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("route {spec:?}: bad port"))?;
    let upstream: SocketAddr = upstream
        .parse()
        .with_context(|| format!("route {spec:?}: bad upstream address"))?;
    let listener = TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("route {spec:?}: cannot listen on {port}"))?;
    listener.set_nonblocking(true)?;
    Ok(Route { listener, upstream })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        (1..=1 << 20).contains(&args.buffer),
        "--buffer must be between 1 and 1048576 bytes"
    );
    let routes = args
        .routes
        .iter()
        .map(|r| parse_route(r))
        .collect::<anyhow::Result<Vec<_>>>()?;
    match args.mode {
        Mode::Epoll => epoll::run(routes, args.buffer),
        Mode::Uring => uring::run(routes, args.buffer, false),
        Mode::UringMultishot => uring::run(routes, args.buffer, true),
    }
}
