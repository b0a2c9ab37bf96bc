//! tokio's `AsyncRead` / `AsyncWrite` over the worker's own [`TcpConn`] (plain or
//! TLS), so the `h2` crate runs on the per-core epoll reactor: no tokio runtime,
//! only tokio's I/O traits. The connection is polled by one task (the one driving
//! the `h2` connection); readiness, deadlines and TLS stay the `TcpConn`'s own.
//! On a client connection it also follows the frames going in ([`Frames`]), so a
//! request head begun while no stream is open has the head timeout ([`Between`]).

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

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
    /// The connection's state between requests (client connections).
    between: Option<Rc<Between>>,
}

/// Frame types and the flag [`Frames`] follows (RFC 9113 §6).
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// Where a client's byte stream stands in HTTP/2 framing (RFC 9113 §4.1, §6.10):
/// frame boundaries and header blocks only; the `h2` crate does the parsing and
/// judges the frames. Fed every byte handed to `h2`, the preface first.
#[derive(Debug, Clone, Copy)]
pub struct Frames {
    /// Bytes of the client preface still to pass.
    preface: usize,
    /// The frame header being read, and how much of it came.
    head: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    payload: usize,
    /// A header block is open: a HEADERS or PUSH_PROMISE without END_HEADERS, until
    /// the CONTINUATION that ends it.
    in_block: bool,
    /// Bytes of the current (or last) header block's frames, as their headers
    /// announce them.
    block: usize,
}

impl Default for Frames {
    fn default() -> Self {
        Self {
            preface: super::PREFACE.len(),
            head: [0; 9],
            have: 0,
            payload: 0,
            in_block: false,
            block: 0,
        }
    }
}

impl Frames {
    /// Follows `bytes`, the next ones the client sent.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        let skip = self.preface.min(bytes.len());
        self.preface -= skip;
        bytes = &bytes[skip..];
        while !bytes.is_empty() {
            if self.payload > 0 {
                let take = self.payload.min(bytes.len());
                self.payload -= take;
                bytes = &bytes[take..];
                continue;
            }
            let take = (self.head.len() - self.have).min(bytes.len());
            self.head[self.have..self.have + take].copy_from_slice(&bytes[..take]);
            self.have += take;
            bytes = &bytes[take..];
            if self.have == self.head.len() {
                self.have = 0;
                let h = self.head;
                let (kind, flags) = (h[3], h[4]);
                self.payload = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                match kind {
                    HEADERS | PUSH_PROMISE => {
                        self.in_block = flags & END_HEADERS == 0;
                        self.block = self.payload;
                    }
                    CONTINUATION => {
                        self.in_block &= flags & END_HEADERS == 0;
                        self.block = self.block.saturating_add(self.payload);
                    }
                    _ => {}
                }
            }
        }
    }

    /// Bytes the last header block's frames announced so far (HEADERS and its
    /// CONTINUATIONs, padding and priority fields included).
    pub fn block(&self) -> usize {
        self.block
    }

    /// Whether the client stopped inside something: the preface, a frame, or a
    /// header block.
    pub fn pending(&self) -> bool {
        self.preface > 0 || self.have > 0 || self.payload > 0 || self.in_block
    }
}

/// A client connection between requests, shared by the connection's bookkeeping
/// (which knows when no stream is open) and its [`H2Io`] (which sees the bytes).
/// While no stream is open the keep-alive timeout runs; once the client has begun
/// a frame or a header block that it has not finished, the head timeout runs
/// instead (HTTP/1.1's rule for a later request head: within `head_secs` of its
/// first byte), and a frame finished afterwards puts the keep-alive timeout back.
#[derive(Debug, Default)]
pub struct Between {
    /// Where the client's bytes stand in the framing.
    frames: Cell<Frames>,
    phase: Cell<Phase>,
    /// Largest header block the connection takes, in bytes as sent (0: no bound).
    max_block: usize,
}

/// Which timeout the connection is under between requests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A stream is open (or the connection is draining, or over): none of these.
    #[default]
    Busy,
    /// No stream is open: the keep-alive timeout.
    Idle,
    /// No stream is open and the client stopped inside a frame: the head timeout.
    Head,
}

impl Between {
    /// A connection whose header blocks may take at most `max_block` bytes as sent.
    pub fn new(max_block: usize) -> Self {
        Self {
            max_block,
            ..Self::default()
        }
    }

    /// A header block past the bound, in bytes as sent: the connection is closed
    /// before `h2` buffers more of it.
    fn block_past_bound(&self) -> Option<usize> {
        let block = self.frames.get().block();
        (self.max_block > 0 && block > self.max_block).then_some(block)
    }

    /// The last stream ended: the keep-alive timeout runs from now, or, when the
    /// client is already inside its next frame, the head timeout.
    pub fn now_idle(&self, conn: &TcpConn, keepalive: Duration, head: Duration) {
        conn.set_timeout(keepalive);
        self.phase.set(Phase::Idle);
        self.apply(conn, keepalive, head);
    }

    /// A stream opened (or the connection is draining, or over): the idle rules
    /// are off.
    pub fn busy(&self) {
        self.phase.set(Phase::Busy);
    }

    /// Follows `bytes`, the next ones the client sent, and applies the rules.
    fn took(&self, conn: &TcpConn, bytes: &[u8], keepalive: Duration, head: Duration) {
        let mut frames = self.frames.get();
        frames.feed(bytes);
        self.frames.set(frames);
        self.apply(conn, keepalive, head);
    }

    /// While idle: arms the head timeout for a frame begun, or puts the keep-alive
    /// timeout back once it is finished.
    fn apply(&self, conn: &TcpConn, keepalive: Duration, head: Duration) {
        match (self.phase.get(), self.frames.get().pending()) {
            (Phase::Idle, true) => {
                conn.set_timeout_within(head);
                self.phase.set(Phase::Head);
            }
            (Phase::Head, false) => {
                conn.set_timeout(keepalive);
                self.phase.set(Phase::Idle);
            }
            _ => {}
        }
    }
}

/// The largest header block a client connection takes, as its frames announce it:
/// `[http2] max_header_list_size`, and what a HEADERS frame may add around its
/// fragment (a pad length, 255 bytes of padding, 5 of priority). A block's HPACK encoding, as clients write it
/// (a string Huffman-coded only where that is shorter), is no longer than the list
/// it decodes to as HTTP/2 counts it (each field's name and value and 32), so a
/// larger block is a list past that bound too, refused either way (by `h2` with a
/// 431 once the whole block is in, and buffered until then: `h2` holds up to several
/// times the bound of one block, across its CONTINUATIONs, with the head timeout
/// as the only limit of how long). Past it the connection is closed at once.
pub fn max_block(cfg: &crate::config::Http2Section) -> usize {
    cfg.max_header_list_size as usize + 1 + 255 + 5
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
            between: None,
        }
    }

    /// Follows the client's frames for `between` (client connections).
    pub fn between(mut self, between: Rc<Between>) -> Self {
        self.between = Some(between);
        self
    }
}

/// Bytes `h2` got from the client: followed in the framing, and the
/// between-requests timeouts applied (client connections only). A header block
/// announced past its bound is an error: `h2` sees the connection fail before it
/// buffers the block (which it would up to several times `max_header_list_size`).
fn took(
    between: Option<&Rc<Between>>,
    core: Option<&Rc<Core>>,
    conn: &TcpConn,
    bytes: &[u8],
) -> io::Result<()> {
    if let (Some(between), Some(core)) = (between, core) {
        between.took(conn, bytes, core.rt.keepalive_timeout, core.rt.head_timeout);
        if let Some(block) = between.block_past_bound() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "HTTP/2 header block of {block} bytes as sent, past {} ([http2] max_header_list_size and framing)",
                    between.max_block
                ),
            ));
        }
    }
    Ok(())
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
            let given = &this.prefix[this.taken..this.taken + n];
            buf.put_slice(given);
            let took = took(this.between.as_ref(), this.core.as_ref(), &this.conn, given);
            this.taken += n;
            if this.taken == this.prefix.len() {
                this.prefix = Vec::new();
                this.taken = 0;
            }
            return Poll::Ready(took);
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
                let filled = buf.filled();
                Poll::Ready(took(
                    this.between.as_ref(),
                    this.core.as_ref(),
                    &this.conn,
                    &filled[filled.len() - n..],
                ))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 1];
        f.extend_from_slice(payload);
        f
    }

    const PING: u8 = 0x6;
    const DATA: u8 = 0x0;

    /// Whether the client stands inside something after each step.
    #[test]
    fn frames_and_header_blocks_are_followed() {
        let steps: Vec<(&str, Vec<u8>, bool)> = vec![
            (
                "half the preface",
                super::super::PREFACE[..10].to_vec(),
                true,
            ),
            (
                "the rest of it",
                super::super::PREFACE[10..].to_vec(),
                false,
            ),
            ("a PING", frame(PING, 0, &[0; 8]), false),
            (
                "a frame header's first bytes",
                frame(PING, 0, &[0; 8])[..4].to_vec(),
                true,
            ),
            (
                "the rest of that PING",
                frame(PING, 0, &[0; 8])[4..].to_vec(),
                false,
            ),
            (
                "HEADERS without END_HEADERS",
                frame(HEADERS, 0, b"abc"),
                true,
            ),
            (
                "a PING inside the block (h2's to refuse)",
                frame(PING, 0, &[0; 8]),
                true,
            ),
            (
                "CONTINUATION without END_HEADERS",
                frame(CONTINUATION, 0, b"d"),
                true,
            ),
            (
                "CONTINUATION with END_HEADERS",
                frame(CONTINUATION, END_HEADERS, b"e"),
                false,
            ),
            ("whole HEADERS", frame(HEADERS, END_HEADERS, b"abc"), false),
            (
                "DATA cut short",
                frame(DATA, 0, &[7; 100])[..50].to_vec(),
                true,
            ),
            ("its rest", frame(DATA, 0, &[7; 100])[50..].to_vec(), false),
            ("an empty frame", frame(PING, 0, &[]), false),
        ];
        let mut f = Frames::default();
        assert!(f.pending(), "before the preface");
        for (what, bytes, pending) in steps {
            f.feed(&bytes);
            assert_eq!(f.pending(), pending, "after {what}");
        }
    }

    proptest::proptest! {
        /// However the bytes are cut into reads, the same place is reached.
        #[test]
        fn any_cut_into_reads_ends_in_the_same_place(
            frames in proptest::collection::vec(
                (proptest::sample::select(vec![HEADERS, CONTINUATION, PING, DATA, 0x4, 0x8]),
                 proptest::num::u8::ANY, 0usize..40),
                0..10,
            ),
            cut_short in 0usize..64,
            cuts in proptest::collection::vec(1usize..20, 1..40),
        ) {
            let mut wire = super::super::PREFACE.to_vec();
            for (kind, flags, len) in frames {
                wire.extend(frame(kind, flags, &vec![0; len]));
            }
            wire.truncate(wire.len().saturating_sub(cut_short));
            let mut whole = Frames::default();
            whole.feed(&wire);
            let mut pieces = Frames::default();
            let mut rest = &wire[..];
            for c in cuts.iter().cycle().take(wire.len() + 1) {
                if rest.is_empty() {
                    break;
                }
                let n = (*c).min(rest.len());
                pieces.feed(&rest[..n]);
                rest = &rest[n..];
            }
            proptest::prop_assert!(rest.is_empty());
            proptest::prop_assert_eq!(
                (whole.preface, whole.have, whole.payload, whole.in_block, whole.pending()),
                (pieces.preface, pieces.have, pieces.payload, pieces.in_block, pieces.pending())
            );
        }
    }
}
