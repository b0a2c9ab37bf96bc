//! What joining the epoll set costs a short-lived connection: the worker adds a
//! socket to its core's epoll set only when a task first has to wait on it, so a
//! connection whose request is already there when it is accepted (the usual case of a
//! connection per request) is read, answered and closed without an `epoll_ctl`, and
//! its `close` has no epoll item to remove. This measures that saving on this machine
//! as CPU time of the serving thread, which another process's load does not move the
//! way it moves a rate.
//!
//! A client thread on another CPU opens a batch of connections and sends each one
//! request; the serving thread then accepts, reads, answers and closes them, in one
//! batch adding each to an edge-triggered epoll set first (as the reactor did for
//! every connection) and in the next not. Batches alternate, so drift in the
//! machine's state falls on both sides alike.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;

use rustix::event::epoll;
use rustix::net::{RecvFlags, SendFlags, SocketFlags};

use crate::park_cost::{pin, thread_cpu_ns};

/// The measured costs, CPU ns of the serving thread per connection.
#[derive(Debug, Clone, Copy)]
pub struct ArmCost {
    /// accept4, recv, send, close.
    pub unarmed_ns: f64,
    /// The same with an `epoll_ctl(ADD)` after the accept (removed by the close).
    pub armed_ns: f64,
    /// Connections served each way.
    pub per_side: u32,
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";

/// Serves `n` connections already queued on `listener`; returns the CPU ns spent.
fn serve_batch(
    listener: &TcpListener,
    ep: Option<&rustix::fd::OwnedFd>,
    n: usize,
) -> anyhow::Result<f64> {
    let mut buf = [0u8; 1024];
    let cpu0 = thread_cpu_ns();
    let mut served = 0;
    while served < n {
        // Loopback completes the handshake within `connect`: the whole batch is
        // queued before it starts, so an accept never finds the queue empty.
        let fd = rustix::net::accept_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)?;
        if let Some(ep) = ep {
            let flags = epoll::EventFlags::IN
                | epoll::EventFlags::OUT
                | epoll::EventFlags::RDHUP
                | epoll::EventFlags::ET;
            epoll::add(ep, &fd, epoll::EventData::new_u64(served as u64), flags)?;
        }
        // The request was sent (and, on loopback, delivered) before the batch
        // started.
        let (n, _) = rustix::net::recv(&fd, &mut buf, RecvFlags::empty())?;
        if n != REQUEST.len() {
            anyhow::bail!("a request arrived in part ({n} bytes)");
        }
        rustix::net::send(&fd, RESPONSE, SendFlags::NOSIGNAL)?;
        drop(fd);
        served += 1;
    }
    Ok(thread_cpu_ns() - cpu0)
}

/// Serves on CPU `here`, with the clients on CPU `there`, `batches` batches of
/// `batch` connections (alternating armed and not; at most 128, the listener's
/// backlog).
pub fn measure(here: usize, there: usize, batches: u32, batch: usize) -> anyhow::Result<ArmCost> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (go, wait_go) = mpsc::channel::<()>();
    let (sent, wait_sent) = mpsc::channel::<Vec<TcpStream>>();
    let client = std::thread::spawn(move || -> anyhow::Result<()> {
        pin(there)?;
        while wait_go.recv().is_ok() {
            let mut conns = Vec::with_capacity(batch);
            for _ in 0..batch {
                let mut c = TcpStream::connect(addr)?;
                c.write_all(REQUEST)?;
                conns.push(c);
            }
            if sent.send(conns).is_err() {
                break;
            }
        }
        Ok(())
    });
    pin(here)?;
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    let (mut armed, mut unarmed) = (0.0, 0.0);
    let mut done = Vec::new();
    for i in 0..batches {
        go.send(())
            .map_err(|_| anyhow::anyhow!("the client thread stopped"))?;
        let conns = wait_sent
            .recv()
            .map_err(|_| anyhow::anyhow!("the client thread stopped"))?;
        if i % 2 == 0 {
            armed += serve_batch(&listener, Some(&ep), batch)?;
        } else {
            unarmed += serve_batch(&listener, None, batch)?;
        }
        // The answers are read off-clock; the client's ends close with the batch.
        for mut c in conns {
            let mut sink = Vec::new();
            let _ = c.read_to_end(&mut sink);
            done.push(sink.len());
        }
    }
    drop(go);
    client
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
    if done.iter().any(|&n| n != RESPONSE.len()) {
        anyhow::bail!("a connection was not answered in full");
    }
    let per_side = batch as u32 * (batches / 2);
    Ok(ArmCost {
        unarmed_ns: unarmed / f64::from(per_side),
        armed_ns: armed / f64::from(per_side),
        per_side,
    })
}
