//! tokio's `AsyncRead` / `AsyncWrite` over the worker's own [`TcpConn`] (plain or
//! TLS), so the `h2` crate runs on the per-core epoll reactor: no tokio runtime,
//! only tokio's I/O traits. The connection is polled by one task (the one driving
//! the `h2` connection); readiness, deadlines and TLS stay the `TcpConn`'s own.

use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::core::{counter, Core};
use crate::io::TcpConn;

/// A [`TcpConn`] as tokio I/O, with bytes already read from it (the sniffed
/// HTTP/2 preface) served first.
pub struct H2Io {
    /// The socket (shared with the connection's bookkeeping, which sets deadlines).
    conn: Rc<TcpConn>,
    /// Bytes read before the `h2` crate took over, and how many it has had.
    prefix: Vec<u8>,
    taken: usize,
    /// Byte counters go here (`None`: upstream connections, not counted).
    core: Option<Rc<Core>>,
    /// How much of `h2`'s read buffer the next read offers the socket. `h2` hands
    /// over uninitialized spare capacity on every read, which (without unsafe code)
    /// must be zeroed first: zeroing all of it for a few hundred bytes of HEADERS
    /// cost more than the rest of a small request's parsing. The offer starts small,
    /// doubles while reads fill it (bulk DATA), and halves when they use little.
    read_size: usize,
}

/// The smallest and largest read offered to the socket.
const READ_MIN: usize = 2048;
const READ_MAX: usize = 64 * 1024;

impl H2Io {
    /// Wraps `conn`; `prefix` is what was read from it already.
    pub fn new(conn: Rc<TcpConn>, prefix: Vec<u8>, core: Option<Rc<Core>>) -> Self {
        Self {
            conn,
            prefix,
            taken: 0,
            core,
            read_size: READ_MIN,
        }
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.taken < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.taken);
            buf.put_slice(&this.prefix[this.taken..this.taken + n]);
            this.taken += n;
            if this.taken == this.prefix.len() {
                this.prefix = Vec::new();
                this.taken = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let offer = buf.remaining().min(this.read_size);
        let dst = buf.initialize_unfilled_to(offer);
        match this.conn.poll_read(cx, dst) {
            Poll::Ready(Ok(n)) => {
                if n == offer {
                    this.read_size = (this.read_size * 2).min(READ_MAX);
                } else if n < this.read_size / 4 {
                    this.read_size = (this.read_size / 2).max(READ_MIN);
                }
                buf.advance(n);
                if let Some(core) = &this.core {
                    core.metrics.add(counter::BYTES_IN, n as u64);
                }
                Poll::Ready(Ok(()))
            }
            other => other.map(|r| r.map(|_| ())),
        }
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = this.conn.poll_write(cx, buf);
        if let (Poll::Ready(Ok(n)), Some(core)) = (&r, &this.core) {
            core.metrics.add(counter::BYTES_OUT, *n as u64);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.conn.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.conn.poll_flush(cx) {
            Poll::Ready(_) => {
                self.conn.shutdown_write();
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
