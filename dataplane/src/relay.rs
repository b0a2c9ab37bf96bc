//! Moving bytes: the connection read buffer and body relaying in every framing.
//!
//! Bodies are streamed through one bounded buffer per side, never held whole: a read
//! is written out before the next read, so a slow reader slows the writer down
//! (backpressure) and memory stays constant whatever the body size.
//!
//! What is written is the relay's own framing: a chunked body is decoded strictly and
//! re-encoded with canonical chunk sizes and only the allowed trailers (nothing of the
//! sender's chunk framing is copied), so the receiver cannot find a message boundary
//! the proxy did not. A `Content-Length` body is copied as is: its framing is the
//! length the proxy wrote.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use crate::http::chunked::{encode_chunk, encode_chunk_of, ChunkedDecoder};
use crate::io::TcpConn;

/// Read buffers handed from closed connections to new ones on the same core.
///
/// A new connection's two 16 KiB buffers were allocated zeroed every time: on a new
/// connection per request that `memset` was about 4 % of the worker's CPU. A recycled
/// buffer keeps its old bytes, which is safe because a [`ReadBuf`] never shows a byte
/// it did not read itself: [`ReadBuf::filled`] is `start..end` of what was read or
/// pushed since it was taken, and the storage is not reachable otherwise. Only
/// buffers of the pool's size are kept (one that grew for a large head is dropped),
/// at most `cap` of them: the pool holds at most `cap × size` bytes per core. A
/// buffer's storage goes back to its pool when the buffer is dropped or released,
/// so [`BufPool::held`] is exactly the storage connections hold now (published as
/// `appproxy_read_buffers_held`).
///
/// A buffer is storage only while there are bytes to read into it: a [`ReadBuf`]
/// from [`BufPool::lazy`] takes its storage at its first read, and
/// [`ReadBuf::fill_idle`] gives it back while it waits (an accepted connection that
/// has sent nothing, one idle between keep-alive requests; part of a head waits
/// copied aside).
pub struct BufPool {
    shared: Rc<Shared>,
}

/// What a pool and the buffers it lends share.
struct Shared {
    free: RefCell<Vec<Vec<u8>>>,
    size: usize,
    cap: usize,
    /// Storages handed out and not given back yet.
    out: Cell<usize>,
}

impl Shared {
    /// Storage of the pool's size, recycled when some is free.
    fn storage(&self) -> Vec<u8> {
        self.out.set(self.out.get() + 1);
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0; self.size])
    }

    /// Takes `data` back (dropped when the pool is full or it is not of the pool's
    /// size: one that grew for a large head, whose length and capacity both changed).
    fn put(&self, data: Vec<u8>) {
        if data.capacity() == 0 {
            return;
        }
        self.out.set(self.out.get().saturating_sub(1));
        let mut free = self.free.borrow_mut();
        if data.len() == self.size && data.capacity() == self.size && free.len() < self.cap {
            free.push(data);
        }
    }
}

impl BufPool {
    /// A pool of buffers of `size` bytes, keeping at most `cap` of them.
    pub fn new(size: usize, cap: usize) -> Self {
        Self {
            shared: Rc::new(Shared {
                free: RefCell::new(Vec::new()),
                size,
                cap,
                out: Cell::new(0),
            }),
        }
    }

    /// An empty read buffer of the pool's size, recycled when one is free.
    pub fn take(&self) -> ReadBuf {
        ReadBuf {
            data: self.shared.storage(),
            start: 0,
            end: 0,
            pool: Some(self.shared.clone()),
            parked: false,
        }
    }

    /// An empty read buffer without storage yet: it takes the pool's at its first
    /// read ([`ReadBuf::fill`], [`ReadBuf::fill_idle`]), push or scratch use.
    pub fn lazy(&self) -> ReadBuf {
        ReadBuf {
            data: Vec::new(),
            start: 0,
            end: 0,
            pool: Some(self.shared.clone()),
            parked: false,
        }
    }

    /// Buffers waiting to be reused.
    pub fn len(&self) -> usize {
        self.shared.free.borrow().len()
    }

    /// Whether no buffer waits to be reused.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Storages taken from the pool and not given back: the read buffers held by
    /// connections and streams now.
    pub fn held(&self) -> usize {
        self.shared.out.get()
    }
}

/// A pool's buffer gives its storage back when dropped, on whatever path its holder
/// ends (an HTTP/2 stream reset, a connection task dropped at drain).
impl Drop for ReadBuf {
    fn drop(&mut self) {
        self.release();
    }
}

/// A read buffer with a consumed prefix.
pub struct ReadBuf {
    /// Storage; `data.len()` is the capacity in use (initialized bytes).
    data: Vec<u8>,
    /// First unconsumed byte.
    start: usize,
    /// End of the bytes read.
    end: usize,
    /// The pool its storage comes from and goes back to (none: its own storage).
    pool: Option<Rc<Shared>>,
    /// `data` is not storage but a copy of the bytes buffered (`start` 0), made
    /// when a read waited with part of a head ([`ReadBuf::fill_idle`]): the storage
    /// is back with the pool until the next read.
    parked: bool,
}

impl ReadBuf {
    /// A buffer of `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            data: vec![0; capacity],
            start: 0,
            end: 0,
            pool: None,
            parked: false,
        }
    }

    /// The unconsumed bytes.
    pub fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Whether it holds storage (a buffer from [`BufPool::lazy`] holds none until
    /// its first read, nor after [`ReadBuf::release`]).
    pub fn has_storage(&self) -> bool {
        self.data.capacity() > 0 && !self.parked
    }

    /// Takes storage from its pool when it has none (with the parked bytes, if
    /// any, at its start).
    #[inline]
    fn ensure_storage(&mut self) {
        if self.parked {
            self.unpark();
        } else if self.data.capacity() == 0 {
            if let Some(pool) = &self.pool {
                self.data = pool.storage();
            }
        }
    }

    /// Storage from the pool again, with the bytes parked in it.
    #[cold]
    fn unpark(&mut self) {
        let Some(pool) = &self.pool else { return };
        let bytes = std::mem::replace(&mut self.data, pool.storage());
        self.parked = false;
        self.data[..bytes.len()].copy_from_slice(&bytes);
        self.start = 0;
        self.end = bytes.len();
    }

    /// Copies the bytes buffered aside and gives the storage back to the pool (a
    /// read waits with part of a head: it holds as many bytes as it has).
    #[cold]
    fn park(&mut self) {
        let Some(pool) = &self.pool else { return };
        let bytes = self.filled().to_vec();
        pool.put(std::mem::replace(&mut self.data, bytes));
        self.end -= self.start;
        self.start = 0;
        self.parked = true;
    }

    /// Its storage, for the pool; it is left empty, without storage (parked bytes
    /// are dropped: they are no storage).
    fn storage_out(&mut self) -> Vec<u8> {
        self.start = 0;
        self.end = 0;
        let data = std::mem::take(&mut self.data);
        if std::mem::take(&mut self.parked) {
            Vec::new()
        } else {
            data
        }
    }

    /// Gives the storage back to its pool, dropping what is buffered; the next read
    /// takes storage again. Nothing for a buffer without a pool.
    pub fn release(&mut self) {
        if self.pool.is_some() {
            let data = self.storage_out();
            if let Some(pool) = &self.pool {
                pool.put(data);
            }
        }
    }

    /// Appends bytes read elsewhere (grows the buffer if needed).
    pub fn push(&mut self, bytes: &[u8]) {
        self.ensure_storage();
        if self.data.len() - self.end < bytes.len() {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.data.len() - self.end < bytes.len() {
                self.data.resize(self.end + bytes.len(), 0);
            }
        }
        self.data[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Marks `n` bytes consumed.
    pub fn consume(&mut self, n: usize) {
        self.start = self.start.saturating_add(n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Drops what is buffered and lends the whole storage, for bytes read only to be
    /// thrown away.
    pub fn scratch(&mut self) -> &mut [u8] {
        self.start = 0;
        self.end = 0;
        self.ensure_storage();
        &mut self.data
    }

    /// Reads more from `conn`, growing up to `limit` bytes of capacity. `Ok(0)` is end
    /// of stream; a full buffer at `limit` is an `OutOfMemory` error.
    pub async fn fill(&mut self, conn: &TcpConn, limit: usize) -> io::Result<usize> {
        self.make_room(limit)?;
        let n = conn.read(&mut self.data[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Room for a read behind the bytes buffered: storage, then compaction or
    /// growth up to `limit` (`OutOfMemory` beyond).
    #[inline]
    fn make_room(&mut self, limit: usize) -> io::Result<()> {
        self.ensure_storage();
        if self.end == self.data.len() {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.data.len() < limit {
                let new_len = (self.data.len() * 2).clamp(1024, limit);
                self.data.resize(new_len, 0);
            } else {
                return Err(io::ErrorKind::OutOfMemory.into());
            }
        }
        Ok(())
    }

    /// [`ReadBuf::fill`] for a wait that may be long (a new connection's first
    /// bytes, the next request on a kept-alive one, the rest of a head): the buffer
    /// holds no storage while it waits. The storage is taken from the pool for each
    /// try of the read and given back when the read would wait, as an idle tunnel
    /// borrows the core's scratch buffer only between a readiness edge and the end
    /// of its forward; bytes buffered (part of a head) are copied aside meanwhile,
    /// so they cost what they are, not the buffer. `on_wait` runs at each wait (for
    /// the caller's own storage). A buffer without a pool, or grown past its pool's
    /// size by part of a large head, reads as `fill` does (an empty one that grew
    /// is dropped at the wait).
    pub async fn fill_idle(
        &mut self,
        conn: &TcpConn,
        limit: usize,
        mut on_wait: impl FnMut(),
    ) -> io::Result<usize> {
        let Some(size) = self.pool.as_ref().map(|p| p.size) else {
            return self.fill(conn, limit).await;
        };
        if self.data.capacity() > size && !self.parked && !self.is_empty() {
            return self.fill(conn, limit).await;
        }
        std::future::poll_fn(|cx| {
            if let Err(e) = self.make_room(limit) {
                return Poll::Ready(Err(e));
            }
            match conn.poll_read(cx, &mut self.data[self.end..]) {
                Poll::Ready(Ok(n)) => {
                    self.end += n;
                    Poll::Ready(Ok(n))
                }
                Poll::Ready(Err(e)) => {
                    if self.is_empty() {
                        self.release();
                    }
                    Poll::Ready(Err(e))
                }
                Poll::Pending => {
                    if self.is_empty() {
                        self.release();
                    } else if self.data.capacity() == size {
                        self.park();
                    }
                    on_wait();
                    Poll::Pending
                }
            }
        })
        .await
    }
}

/// How a body is relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked in, chunked out: decoded strictly and re-encoded canonically.
    Chunked(Trailers),
    /// Chunked in, payload only out (delimited by close downstream).
    Dechunk,
    /// Until the source closes, re-chunked.
    Rechunk,
    /// Until the source closes, verbatim.
    UntilClose,
}

/// What a chunked body's forbidden trailer fields cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trailers {
    /// A framing error (request bodies: the client gets a 400).
    RefuseForbidden,
    /// Left out (response bodies).
    DropForbidden,
}

/// Why a relay stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Reading the source failed or it closed too early.
    #[error("source: {0}")]
    Source(io::Error),
    /// Writing the destination failed.
    #[error("destination: {0}")]
    Destination(io::Error),
    /// The chunked framing was malformed.
    #[error("chunked framing: {0}")]
    Framing(&'static str),
    /// The body exceeded the limit.
    #[error("body larger than the limit")]
    TooLarge,
    /// The destination, an app taking a request body, began an answer that ends the
    /// request ([`DstWatch::Refusal`]): its head is there to be read.
    #[error("the app answered before taking the whole body")]
    Answered,
}

/// Limits and timers of one relay.
#[derive(Debug, Clone, Copy)]
pub struct RelayOpts {
    /// Payload limit in bytes (0: none).
    pub max_payload: u64,
    /// Longest wait to write to the destination.
    pub idle: Duration,
    /// Longest silence of the source.
    pub source_idle: Duration,
    /// Buffer capacity limit for the source buffer.
    pub buf_limit: usize,
    /// What of the destination is watched while the relay waits.
    pub watch_dst: DstWatch,
}

/// What of a relay's destination is watched while the relay waits on it or on its
/// source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DstWatch {
    /// Nothing.
    None,
    /// Its being gone, as [`Gone`] says, during waits on the source
    /// ([`fill_watching`]): a client a response is relayed to.
    Gone(Gone),
    /// An answer that ends the request ([`app_refused`]), during every wait: an app
    /// a request body is relayed to, which may refuse the body (413, 401 …) without
    /// reading it, and keep its connection open. Its answer then goes to the client
    /// at once, as nginx and HAProxy relay it, rather than after the write to an
    /// app that no longer reads stalls out (a 502 a minute later, the answer lost).
    Refusal,
}

/// When a client watched while its app is silent ([`fill_watching`]) is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// Reset or hung up ([`TcpConn::hung_up`]): a client that only ended its side
    /// (a half-close: it may still read) keeps its answer, as HAProxy's default (no
    /// `abortonclose`) does.
    HungUp,
    /// Its end of stream too ([`TcpConn::peer_gone`], seen behind bytes it sent
    /// ahead and left unread): a client that closed, which cannot be told from one
    /// that half-closed, is not held (`[upstream] abort_on_client_close`, nginx's
    /// and Envoy's default). For a client whose request was read whole only: a
    /// request body's end of stream is no leaving.
    Ended,
}

impl Gone {
    /// The rule `[upstream] abort_on_client_close` sets.
    pub fn on_close(abort: bool) -> Self {
        if abort {
            Gone::Ended
        } else {
            Gone::HungUp
        }
    }
}

/// Payload runs of one read gathered into one chunk before it is written.
const RUNS: usize = 32;

/// Relays one body from `src` (with what is already in `sbuf`) to `dst`.
///
/// `prefix` holds bytes to send before the body (a head): it is sent together with
/// the first body bytes in one write, and emptied. Returns the bytes written to `dst`
/// (prefix included), and on failure how many had been written (0: nothing, not even
/// the prefix, so the receiver can still get an error response).
pub async fn relay_body_counted(
    src: &TcpConn,
    sbuf: &mut ReadBuf,
    dst: &TcpConn,
    prefix: &mut Vec<u8>,
    mode: Mode,
    opts: RelayOpts,
) -> Result<u64, (RelayError, u64)> {
    let mut written = 0u64;
    let mut payload = 0u64;
    let mut remaining = match mode {
        Mode::Length(n) => n,
        _ => u64::MAX,
    };
    let mut decoder = match mode {
        Mode::Chunked(Trailers::RefuseForbidden) => ChunkedDecoder::for_request(),
        _ => ChunkedDecoder::new(),
    };
    let mut out = std::mem::take(prefix);
    // Cleared once the app's first bytes turn out not to refuse the request.
    let mut refusal_watch = opts.watch_dst == DstWatch::Refusal;
    loop {
        let input = sbuf.filled();
        let mut done = false;
        let consumed = match mode {
            Mode::Length(_) => {
                let take = remaining.min(input.len() as u64) as usize;
                remaining -= take as u64;
                payload += take as u64;
                out.extend_from_slice(&input[..take]);
                done = remaining == 0;
                take
            }
            Mode::Chunked(_) | Mode::Dechunk => {
                // The payload runs of this read leave as one chunk (in groups of
                // `RUNS`): an app that writes each event as a chunk of its own costs
                // one size line per read, not one per event.
                let mut runs = [&input[..0]; RUNS];
                let mut held = 0;
                let mut pos = 0;
                while pos < input.len() {
                    let step = decoder
                        .decode(&input[pos..])
                        .map_err(|e| (RelayError::Framing(e), written))?;
                    let data = &input[pos + step.data.start..pos + step.data.end];
                    payload += data.len() as u64;
                    if mode == Mode::Dechunk {
                        out.extend_from_slice(data);
                    } else if !data.is_empty() {
                        if held == RUNS {
                            encode_chunk_of(&mut out, &runs);
                            held = 0;
                        }
                        runs[held] = data;
                        held += 1;
                    }
                    pos += step.consumed;
                    if step.done {
                        done = true;
                        break;
                    }
                    if step.consumed == 0 {
                        break;
                    }
                }
                if mode != Mode::Dechunk {
                    encode_chunk_of(&mut out, &runs[..held]);
                    if done {
                        decoder.encode_last_chunk(&mut out);
                    }
                }
                pos
            }
            Mode::Rechunk => {
                encode_chunk(&mut out, input);
                payload += input.len() as u64;
                input.len()
            }
            Mode::UntilClose => {
                out.extend_from_slice(input);
                payload += input.len() as u64;
                input.len()
            }
        };
        sbuf.consume(consumed);
        if opts.max_payload > 0 && payload > opts.max_payload {
            return Err((RelayError::TooLarge, written));
        }
        if !out.is_empty() {
            dst.set_timeout(opts.idle);
            let wrote = if refusal_watch {
                or_refusal(dst.write_all(&out), dst, &mut refusal_watch)
                    .await
                    .map_err(|e| (e, written))?
            } else {
                dst.write_all(&out).await
            };
            wrote.map_err(|e| (RelayError::Destination(e), written))?;
            written += out.len() as u64;
            out.clear();
        }
        if done {
            break;
        }
        src.set_timeout(opts.source_idle);
        let filled = if let DstWatch::Gone(gone) = opts.watch_dst {
            fill_watching(sbuf, src, opts.buf_limit, dst, gone).await
        } else if refusal_watch {
            let fill = sbuf.fill(src, opts.buf_limit);
            Some(
                or_refusal(fill, dst, &mut refusal_watch)
                    .await
                    .map_err(|e| (e, written))?,
            )
        } else {
            Some(sbuf.fill(src, opts.buf_limit).await)
        };
        let n = match filled {
            Some(n) => n.map_err(|e| (RelayError::Source(e), written))?,
            None => {
                let gone = io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    if dst.peer_ended() && !dst.peer_reset() {
                        "the client closed its connection while the app was silent"
                    } else {
                        "the client's connection was reset while the app was silent"
                    },
                );
                return Err((RelayError::Destination(gone), written));
            }
        };
        if n == 0 {
            match mode {
                Mode::Rechunk => {
                    dst.set_timeout(opts.idle);
                    dst.write_all(b"0\r\n\r\n")
                        .await
                        .map_err(|e| (RelayError::Destination(e), written))?;
                    written += 5;
                    break;
                }
                Mode::UntilClose => break,
                _ => {
                    return Err((
                        RelayError::Source(io::ErrorKind::UnexpectedEof.into()),
                        written,
                    ));
                }
            }
        }
    }
    // Hand the (now empty) allocation back for reuse.
    *prefix = out;
    Ok(written)
}

/// Polls `work` once; if it would wait, runs `on_wait`, then races it against
/// `watch`, which thus starts only when there is a wait to watch (most reads and
/// writes are done at once). `Err`: the watch ended first, `work` left unfinished
/// (pinned by the caller, which may go on with it).
pub async fn or_watch<F: Future, W: Future>(
    mut work: Pin<&mut F>,
    on_wait: impl FnOnce(),
    watch: W,
) -> Result<F::Output, W::Output> {
    let mut on_wait = Some(on_wait);
    let mut watch = std::pin::pin!(watch);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(done) = work.as_mut().poll(cx) {
            return Poll::Ready(Ok(done));
        }
        if let Some(on_wait) = on_wait.take() {
            on_wait();
        }
        watch.as_mut().poll(cx).map(Err)
    })
    .await
}

/// Awaits `work` (a write of a request body to `app`, or a read of more of it)
/// while `app` is watched for an answer that ends the request ([`app_refused`]):
/// `Err(Answered)` when one came first, `work` left unfinished (the relay ends
/// there). `watching` is cleared when the app's first bytes are no such answer:
/// the watch is not started again for them.
async fn or_refusal<F: Future>(
    work: F,
    app: &TcpConn,
    watching: &mut bool,
) -> Result<F::Output, RelayError> {
    futures_lite::pin!(work);
    match or_watch(work.as_mut(), || {}, app_refused(app)).await {
        Ok(done) => return Ok(done),
        Err(true) => return Err(RelayError::Answered),
        Err(false) => *watching = false,
    }
    Ok(work.await)
}

/// [`or_refusal`] while `watching`, else `work` alone: for relays of their own (an
/// HTTP/2 stream's body to an HTTP/1.1 app) that watch as [`relay_body_counted`] does.
pub(crate) async fn or_refusal_while<F: Future>(
    work: F,
    app: &TcpConn,
    watching: &mut bool,
) -> Result<F::Output, RelayError> {
    if *watching {
        or_refusal(work, app, watching).await
    } else {
        Ok(work.await)
    }
}

/// Waits for the first bytes `app` sends while it is given a request body, and says
/// whether they begin an answer that ends the request: past any interim heads (an
/// unsolicited 100, a 103), a final head that is no success (3xx–5xx: the app
/// refuses the body, 413 or 401, or sends the client elsewhere, and will not read
/// on), bytes that are no HTTP/1 response at all, a head the app's stream ended
/// in the middle of, or a successful head followed by the end of the app's stream
/// (waited for). `false`: a successful head whose stream did not end (the app may
/// read the body still: it goes on, and the answer is read after it), interim heads
/// past what is peeked at, the end of its stream before any byte, or an error (what
/// the relay meets next tells). Nothing is taken (a peek): the heads are read after, whole. Raw
/// bytes: for plaintext apps only.
pub async fn app_refused(app: &TcpConn) -> bool {
    // Room for the status line after a few interim heads.
    let mut seen = [0u8; 512];
    loop {
        let n = match app.peek(&mut seen).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        match refusal_in(&seen[..n]) {
            Some(true) => return true,
            // A success: the app may read on, unless it ends its stream — then its
            // answer is all it will say and the body can never reach it: it ends the
            // request as a refusal does. Its end is waited for on the read edges,
            // the socket's readiness left for the answer's read. Before, a client
            // that waited for the answer before sending more got nothing until the
            // body timeout, then a 408 (an outside tester's find).
            Some(false) => {
                app.gone(Gone::Ended).await;
                return app.peer_ended();
            }
            // A head the app ended its stream in the middle of is an answer that
            // ends the request too (a broken one: read, it is a 502). Checked
            // before peeking again: once the end is seen, a peek returns the same
            // bytes at once, for ever.
            None if app.peer_ended() => return true,
            None if n == seen.len() => return false,
            // The next peek waits for more bytes. A verdict leaves the socket
            // readable: its bytes are read next, and no edge comes again for them.
            None => app.await_more(),
        }
    }
}

/// What the bytes an app sent so far say ([`app_refused`]): `None` while they are
/// the start of a response that could go either way.
fn refusal_in(mut bytes: &[u8]) -> Option<bool> {
    // `HTTP/1.1 413`: the version and the status's first digit decide.
    const LINE: usize = 12;
    loop {
        if bytes.len() < LINE {
            let k = bytes.len().min(7);
            return (bytes[..k] != b"HTTP/1."[..k]).then_some(true);
        }
        if !bytes.starts_with(b"HTTP/1.") {
            return Some(true);
        }
        match &bytes[9..LINE] {
            b"101" => return Some(false),
            [b'1', ..] => {
                // An interim head: the answer that matters follows it.
                let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
                bytes = &bytes[end + 4..];
            }
            [digit, ..] => return Some(*digit >= b'3'),
            [] => return None,
        }
    }
}

/// [`ReadBuf::fill`] from `src` while `watched`, the peer this relay writes to (and
/// alone writes to), is watched: a client gone while the app is silent (`gone`:
/// reset or hung up, or its end of stream too) ends the wait (`None`), rather than
/// holding both connections and a slot of the core for as long as the app may stay
/// silent. With [`Gone::HungUp`] a client that only ended its side still reads,
/// and keeps its answer. `watched`'s deadline is lifted for the wait (it bounds
/// writes to it, set again before each). The watch's end of stream is seen on the
/// read side's edges: nobody reads `watched` meanwhile.
pub async fn fill_watching(
    sbuf: &mut ReadBuf,
    src: &TcpConn,
    limit: usize,
    watched: &TcpConn,
    gone: Gone,
) -> Option<io::Result<usize>> {
    unless_gone(sbuf.fill(src, limit), watched, gone).await
}

/// `work`'s outcome, unless `client` is gone first as `gone` says (`None`, `work`
/// dropped): a wait on an app (its connect, its answer) for its client. While it
/// waits the client's deadline is cleared: the wait is bounded by its own, and the
/// client's next read or write arms its own.
pub async fn unless_gone<F: Future>(work: F, client: &TcpConn, gone: Gone) -> Option<F::Output> {
    let work = std::pin::pin!(work);
    or_watch(work, || client.set_deadline(None), client.gone(gone))
        .await
        .ok()
}

/// `work`'s outcome (a connect to the app), unless the client leaves first
/// (`None`): reset or hung up, and for a request read whole (`read_whole`) its end
/// of stream too with `[upstream] abort_on_client_close` (`abort`), as while the
/// app is silent. With a body to come its end of stream is no leaving (the body's
/// reads see it), but a reset or a hang-up still is: the body cannot be read whole,
/// and no answer can reach it.
///
/// A plain function handing back [`unless_gone`]'s future, not an `async fn`
/// awaiting it: each `async fn` layer keeps its argument (`work`, a connect) in its
/// own state beside the future it awaits, and that layer made every HTTP/1.1
/// exchange's future larger by a connect and its watch — 7,700 more instructions
/// (copies) per new connection (`benches/callgrind.sh newconn`: 28,761 against
/// 21,026).
pub fn unless_client_left<'a, F: Future + 'a>(
    work: F,
    client: &'a TcpConn,
    read_whole: bool,
    abort: bool,
) -> impl Future<Output = Option<F::Output>> + 'a {
    let gone = if read_whole {
        Gone::on_close(abort)
    } else {
        Gone::HungUp
    };
    unless_gone(work, client, gone)
}

/// Writes all of `bytes` to `dst` while `src`, which this task alone reads, is
/// watched: a write blocked on a peer that does not read must not hide that the
/// other peer is gone. `src` reset or hung up (`EPOLLERR`, `EPOLLHUP`): the write
/// ends at once with `ConnectionReset`. `src` only ended its side (a half-close):
/// what it sent still goes out, and the watch stops (no further edge would come).
/// A timeout or revocation of `src` seen while watching ends the write as its own
/// would.
///
/// `stalled`: once the write would wait, how long it may go without `dst` taking a
/// byte (armed on `dst`'s deadline, again at each byte taken); `None` leaves the
/// deadline the caller armed. A peer that stops reading thus holds a tunnel that
/// long, not for its idle timeout (nginx's `proxy_send_timeout`): a client that
/// vanished behind a full window, whose end can never arrive, included. While the
/// write waits no deadline set on `dst` comes later than its bound
/// ([`TcpConn::bound_write`]): a connection has one deadline for both directions,
/// and the other direction of a tunnel re-arms its reads of `dst` at each byte
/// `dst`'s peer sends — a peer that never reads but sends a frame every few seconds
/// held the write for `tunnel_idle_secs` (an hour). Returns whether the deadline
/// was so changed, so the caller arms its own again once the write is done.
///
/// Nothing is lost or repeated when the watch wins: a write is polled only whole
/// (`poll_write` takes bytes or nothing), then flushed.
pub async fn write_watching(
    dst: &TcpConn,
    mut bytes: &[u8],
    src: &TcpConn,
    stalled: Option<Duration>,
) -> io::Result<bool> {
    let mut watching = !src.peer_ended();
    let mut bounded = false;
    // The bound ends with the write, however it ends (done, failed, or dropped).
    let _bound = WriteBound(dst);
    loop {
        let step = async {
            if bytes.is_empty() {
                std::future::poll_fn(|cx| dst.poll_flush(cx))
                    .await
                    .map(|()| 0)
            } else {
                std::future::poll_fn(|cx| dst.poll_write(cx, bytes)).await
            }
        };
        futures_lite::pin!(step);
        let on_wait = || {
            if let (false, Some(stalled)) = (bounded, stalled) {
                bounded = true;
                dst.bound_write(stalled);
            }
        };
        let watch = async {
            if watching {
                src.peer_gone().await
            } else {
                std::future::pending().await
            }
        };
        let done = match or_watch(step.as_mut(), on_wait, watch).await {
            Ok(r) => r,
            Err(()) if src.peer_reset() => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "the other peer is gone",
                ))
            }
            Err(()) if src.peer_ended() => {
                watching = false;
                step.await
            }
            Err(()) if src.was_revoked() => return Err(io::ErrorKind::ConnectionAborted.into()),
            Err(()) => return Err(io::ErrorKind::TimedOut.into()),
        }?;
        if bytes.is_empty() {
            return Ok(bounded);
        }
        if done == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[done..];
        if let (true, Some(stalled)) = (bounded, stalled) {
            dst.bound_write(stalled);
        }
    }
}

/// A write's bound on its connection, ended when the write is ([`write_watching`]).
struct WriteBound<'a>(&'a TcpConn);

impl Drop for WriteBound<'_> {
    fn drop(&mut self) {
        self.0.unbound_write();
    }
}

/// Copies `src` to `dst` until `src` closes, then half-closes `dst`; for tunnels.
/// Returns the bytes copied, and how the copy ended (an error, a timeout included,
/// ends it early: the bytes copied before still count). A revoked tunnel
/// ([`TcpConn::was_revoked`]) ends at its next read, with `ConnectionAborted`, even
/// while bytes keep flowing. A write to `dst` blocked on a peer that does not read
/// watches `src` ([`write_watching`]: `src` reset ends the copy) and may go
/// `stalled` without progress.
pub async fn pipe(
    src: &TcpConn,
    dst: &TcpConn,
    buf: &mut [u8],
    idle: Duration,
    stalled: Duration,
) -> (u64, io::Result<()>) {
    pipe_inspected(src, dst, buf, idle, stalled, |_| Ok(())).await
}

/// [`pipe`], each chunk read from `src` shown to `inspect` before it is written:
/// an error from it ends the copy (both connections shut, the chunk not written).
pub async fn pipe_inspected(
    src: &TcpConn,
    dst: &TcpConn,
    buf: &mut [u8],
    idle: Duration,
    stalled: Duration,
    mut inspect: impl FnMut(&[u8]) -> io::Result<()>,
) -> (u64, io::Result<()>) {
    let mut total = 0u64;
    let end = |e: io::Error| {
        src.shutdown_both();
        dst.shutdown_both();
        if revoked(src, dst) {
            io::ErrorKind::ConnectionAborted.into()
        } else {
            e
        }
    };
    loop {
        src.set_timeout(idle);
        let n = match src.read(buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return (total, Err(end(e))),
        };
        if let Err(e) = inspect(&buf[..n]) {
            return (total, Err(end(e)));
        }
        dst.set_timeout(idle);
        match write_watching(dst, &buf[..n], src, Some(stalled)).await {
            // The write's bound off `dst` (its other direction reads it).
            Ok(true) => dst.set_timeout(idle),
            Ok(false) => {}
            Err(e) => return (total, Err(end(e))),
        }
        total += n as u64;
    }
    dst.shutdown_write();
    (total, Ok(()))
}

/// Whether either end of a tunnel was revoked: its circuit was removed or no longer
/// admits the client ([`crate::core::Core::recheck_tunnels`]).
pub fn revoked(a: &TcpConn, b: &TcpConn) -> bool {
    a.was_revoked() || b.was_revoked()
}

/// How a tunnel ended, for its counters: revoked, idle (a timeout), or otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Its circuit was removed or no longer admits the client.
    Revoked,
    /// A side was silent for the idle timeout.
    Idled,
    /// Closed by a side, or failed.
    Closed,
}

impl TunnelEnd {
    /// How a raw tunnel whose two [`pipe`]s ended so ended.
    pub fn of_pipes(a: &io::Result<()>, b: &io::Result<()>) -> Self {
        let kind = |k| [a, b].iter().any(|r| matches!(r, Err(e) if e.kind() == k));
        if kind(io::ErrorKind::ConnectionAborted) {
            Self::Revoked
        } else if kind(io::ErrorKind::TimedOut) {
            Self::Idled
        } else {
            Self::Closed
        }
    }

    /// Counts the end in `metrics`: an idle timeout (a revocation is counted where
    /// it is decided, once per tunnel; an ordinary close is not counted).
    pub fn count(self, metrics: &crate::core::CoreMetrics) {
        if self == Self::Idled {
            metrics.add(crate::core::counter::TIMEOUT_TUNNEL_IDLE, 1);
        }
    }
}

/// State shared by the two directions of one WebSocket relay.
#[derive(Default)]
pub struct WsShared {
    /// The close code the proxy sends both ways once one direction ended abnormally.
    pub close: std::cell::Cell<Option<u16>>,
    /// Message sequence across both directions (for per-message IDs).
    pub seq: std::cell::Cell<u32>,
    /// Set when one direction ended cleanly (a close frame, then end of stream): the
    /// other relays until then at most ([`CLOSE_GRACE`] later), for its peer's answer.
    pub closing: std::cell::Cell<Option<std::time::Instant>>,
    /// The session's first close and who sent it: a peer's close frame relayed, or
    /// the proxy's own ([`WsShared::close`]), whichever came first. The session's
    /// close line reports it: a client that closed with 1000 to an app that never
    /// answered was logged with the proxy's 1001 at the end of the grace period.
    pub first_close: std::cell::Cell<Option<(u16, Closer)>>,
}

/// Who began a WebSocket session's closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closer {
    /// The client's close frame.
    Client,
    /// The app's close frame.
    App,
    /// The proxy's own close (a violation, the idle timeout, a drain, a revocation,
    /// a peer gone).
    Proxy,
}

impl Closer {
    /// As the close line names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::App => "app",
            Self::Proxy => "proxy",
        }
    }
}

impl WsShared {
    /// Records `code` from `by` as the session's first close, unless one came before.
    fn closed_first(&self, code: u16, by: Closer) {
        if self.first_close.get().is_none() {
            self.first_close.set(Some((code, by)));
        }
    }
}

/// How long a WebSocket session whose one side closed cleanly waits for the other
/// side's close frame and end of stream.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// One direction's totals.
#[derive(Debug, Default, Clone, Copy)]
pub struct WsStats {
    /// Complete messages relayed.
    pub messages: u64,
    /// Bytes relayed (frames, headers included).
    pub bytes: u64,
    /// The close code of a close frame that passed, if one did.
    pub close_seen: Option<u16>,
    /// Bytes the source sent after its close frame, dropped (RFC 6455 §5.5.1).
    pub dropped_after_close: u64,
    /// Whether this direction ended because its source was silent for the idle
    /// timeout.
    pub idled: bool,
}

/// Relays WebSocket frames from `src` to `dst`, inspecting them
/// ([`crate::ws::Inspector`]). Frames pass unchanged, up to the source's close frame;
/// what it sends after that is dropped (counted in [`WsStats::dropped_after_close`],
/// logged once per direction). A protocol violation, an idle
/// timeout or a drain ends the relay with a close frame to both peers (this
/// direction writes one to `dst`; the other direction is woken by shutting down the
/// read side of `dst` and writes one to its own destination), except to a peer that
/// is in the middle of a frame (the close would be taken for payload) or was already
/// sent a close frame: that peer sees the connection end.
///
/// A write to a peer that does not read may go `stalled` without progress (and
/// ends the session at once when its source resets: [`write_watching`]).
///
/// No buffer is held while the session is idle: bytes are read into the core's
/// `scratch` buffer, forwarded from there, and only what the destination does not
/// take at once (backpressure) or an incomplete frame header is copied aside.
#[allow(clippy::too_many_arguments)]
pub async fn ws_pipe(
    src: &TcpConn,
    dst: &TcpConn,
    initial: Vec<u8>,
    from_client: bool,
    allowed_rsv: u8,
    shared: &WsShared,
    idle: Duration,
    stalled: Duration,
    on_messages: &dyn Fn(u32),
    scratch: &std::cell::RefCell<Vec<u8>>,
) -> WsStats {
    let mut inspector = crate::ws::Inspector::new(from_client, allowed_rsv);
    let mut stats = WsStats::default();
    // Read but not yet forwardable: an incomplete header or control frame.
    let mut carry = Vec::new();
    // Read before the relay began (behind the handshake), not yet inspected: taken a
    // buffer's worth at a time, however much it is.
    let mut early = initial;
    // Whether what reached `dst` ends at a frame boundary (the inspector may have
    // read further, into bytes a violation kept back).
    let mut at_boundary = true;
    // Every wait, read or write, runs under the idle timeout, or once the session is
    // closing (one side closed cleanly) under the grace period's one deadline: a
    // peer that stops reading after its close frame cannot hold the session longer.
    let arm = |conn: &TcpConn| match shared.closing.get() {
        Some(deadline) => conn.set_deadline(Some(deadline)),
        None => conn.set_timeout(idle),
    };
    let end_code = 'relay: loop {
        // A revoked session relays nothing more: not even what came behind the
        // handshake (a revoked connection is never ready to read, so the read below
        // ends the relay at its next turn, busy or idle).
        if !early.is_empty() && revoked(src, dst) {
            break Some(crate::ws::close_code::GOING_AWAY);
        }
        if early.is_empty() {
            arm(src);
            if let Err(e) = src.readable().await {
                stats.idled = e.kind() == io::ErrorKind::TimedOut
                    && shared.closing.get().is_none()
                    && !revoked(src, dst);
                break Some(crate::ws::close_code::GOING_AWAY);
            }
        }
        let mut pending = Vec::new();
        let mut eof = false;
        // A protocol violation: the session ends with its close code once the
        // frames sent whole before it are forwarded.
        let mut violated = None;
        // Where what this turn forwards ends (at a frame boundary or not), taken
        // as `at_boundary` once all of it is written.
        let ends_at_boundary;
        {
            let Ok(mut scratch) = scratch.try_borrow_mut() else {
                break Some(crate::ws::close_code::GOING_AWAY);
            };
            let buf = &mut scratch[..];
            // The carried tail is at most a frame header or a control frame (the
            // inspector forwards data frames as they come), well within the buffer.
            // (Both copies are skipped when empty, the common case: an empty copy
            // is still a call into `memcpy`, twice per message.)
            let c = carry.len().min(buf.len());
            if c > 0 {
                buf[..c].copy_from_slice(&carry[..c]);
                carry.clear();
            }
            let e = early.len().min(buf.len() - c);
            if e > 0 {
                buf[c..c + e].copy_from_slice(&early[..e]);
                early.drain(..e);
            }
            // A read only into room that is left (a read into none would look like
            // the end of the stream), and only once the early bytes are all in.
            let n = if !early.is_empty() || c + e == buf.len() {
                0
            } else {
                match src.try_read(&mut buf[c + e..]) {
                    Ok(0) => {
                        eof = true;
                        0
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(_) => break 'relay Some(crate::ws::close_code::GOING_AWAY),
                }
            };
            let total = c + e + n;
            let feed = match inspector.feed(&buf[..total]) {
                Ok(f) => f,
                Err(v) => {
                    tracing::info!(
                        code = v.code,
                        reason = v.reason,
                        from_client,
                        "websocket protocol violation"
                    );
                    violated = Some(v.code);
                    // What came whole before the violating frame goes on, and
                    // the bytes from it on are dropped (not carried).
                    let before = inspector.before_violation().clone();
                    crate::ws::Feed {
                        dropped: total - before.consumed,
                        ..before
                    }
                }
            };
            ends_at_boundary = inspector.at_frame_boundary();
            if feed.consumed > 0 {
                // Bytes flowing either way keep the tunnel alive: the other
                // direction's wait on `dst` (its source) gets a new idle period, as
                // in `pipe` (a stream flowing one way is not idle).
                arm(dst);
            }
            let mut written = 0;
            while written < feed.consumed {
                match dst.try_write(&buf[written..feed.consumed]) {
                    Ok(k) => written += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        // Part of this turn's bytes went out: `dst` may be inside
                        // a frame, where no close frame may go.
                        at_boundary &= written == 0;
                        break 'relay Some(crate::ws::close_code::GOING_AWAY);
                    }
                }
            }
            if written == feed.consumed {
                at_boundary = ends_at_boundary;
            } else if written > 0 {
                at_boundary = false;
            }
            pending.extend_from_slice(&buf[written..feed.consumed]);
            carry.extend_from_slice(&buf[feed.consumed + feed.dropped..total]);
            if feed.dropped > 0 && violated.is_none() {
                if stats.dropped_after_close == 0 {
                    tracing::info!(from_client, "websocket data after a close frame dropped");
                }
                stats.dropped_after_close += feed.dropped as u64;
            }
            stats.bytes += feed.consumed as u64;
            stats.messages += u64::from(feed.messages);
            if feed.messages > 0 {
                on_messages(feed.messages);
            }
            if let Some(code) = feed.close {
                stats.close_seen = Some(code);
                let by = if from_client {
                    Closer::Client
                } else {
                    Closer::App
                };
                shared.closed_first(code, by);
            }
        }
        // A write blocked on a peer that does not read watches `src` (reset: the
        // session ends) and may go `stalled` without progress; once the session
        // is closing, its one deadline bounds it instead.
        if !pending.is_empty() || dst.is_tls() {
            // (Over TLS, with nothing pending: the records `try_write` encrypted
            // but the socket did not take yet.)
            arm(dst);
            let bound = shared.closing.get().is_none().then_some(stalled);
            match write_watching(dst, &pending, src, bound).await {
                // The write's bound off `dst` (the other direction reads it).
                Ok(true) => {
                    arm(dst);
                    at_boundary = ends_at_boundary;
                }
                Ok(false) => at_boundary = ends_at_boundary,
                // Some of it may have gone out: `dst` may be inside a frame.
                Err(_) if !pending.is_empty() => {
                    at_boundary = false;
                    break Some(crate::ws::close_code::GOING_AWAY);
                }
                Err(_) => break Some(crate::ws::close_code::GOING_AWAY),
            }
        }
        if violated.is_some() {
            break violated;
        }
        if eof {
            break None;
        }
        carry.shrink_to(256);
    };
    if let Some(code) = end_code {
        if shared.close.get().is_none() {
            shared.close.set(Some(code));
        }
        shared.closed_first(code, Closer::Proxy);
    }
    if end_code.is_none() && stats.close_seen.is_some() {
        // A clean close (a close frame, then end of stream): `dst` is told below
        // (end of stream) and its own close frame in answer still comes back, within
        // the grace period the other direction now waits at most: its read from
        // `dst` and its write to `src` (which may already be waiting, for a peer that
        // stopped reading) both get that deadline.
        let deadline = std::time::Instant::now() + CLOSE_GRACE.min(idle);
        shared.closing.set(Some(deadline));
        dst.set_deadline(Some(deadline));
        src.set_deadline(Some(deadline));
    } else {
        // Any other end ends the session with either of its connections: wake the
        // other direction, whose reads from our destination now see end of stream.
        // (Not after a clean close: on a socket whose both halves are shut, the
        // kernel answers the peer's late close frame with a reset.)
        dst.shutdown_read();
    }
    // The proxy's close frame goes only where it is a frame of its own, and only to a
    // peer that has not had a close frame already.
    let close = shared
        .close
        .get()
        .filter(|_| at_boundary && stats.close_seen.is_none());
    if let Some(code) = close {
        dst.set_timeout(Duration::from_secs(5));
        let _ = if from_client {
            let key = (uuid::Uuid::new_v4().as_u128() as u32).to_ne_bytes();
            dst.write_all(&crate::ws::close_frame_to_app(code, key))
                .await
        } else {
            dst.write_all(&crate::ws::close_frame_to_client(code)).await
        };
    }
    dst.shutdown_write();
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an app's first bytes during a request body say. Table: bytes, the
    /// verdict (`None`: undecided yet).
    #[test]
    fn an_apps_first_bytes_refuse_the_body_or_not() {
        #[rustfmt::skip]
        let table: &[(&[u8], Option<bool>)] = &[
            (b"HTTP/1.1 413 Payload Too Large\r\n", Some(true)),
            (b"HTTP/1.1 401", Some(true)),
            (b"HTTP/1.0 307 T", Some(true)),
            (b"HTTP/1.1 503", Some(true)),
            (b"HTTP/1.1 200 OK\r\n", Some(false)),
            (b"HTTP/1.1 204", Some(false)),
            (b"HTTP/1.1 101 Switching", Some(false)),
            // Interim heads are passed over, to the answer after them.
            (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 X\r\n", Some(true)),
            (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 E\r\nLink: <a>\r\n\r\nHTTP/1.1 401 ", Some(true)),
            (b"HTTP/1.1 103 E\r\n\r\nHTTP/1.1 200 OK", Some(false)),
            (b"HTTP/1.1 100 Continue\r\n\r\n", None),
            (b"HTTP/1.1 100 Continue\r\n", None),
            (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 4", None),
            // Undecided yet, or no HTTP/1 response at all.
            (b"H", None),
            (b"HTTP/1.1 4", None),
            (b"HTTP/1.", None),
            (b"X", Some(true)),
            (b"HTTP/2 200 OK", Some(true)),
            (b"ICY 200 OK\r\n", Some(true)),
        ];
        for (bytes, want) in table {
            assert_eq!(
                refusal_in(bytes),
                *want,
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn a_recycled_buffer_shows_nothing_of_its_previous_connection() {
        let pool = BufPool::new(64, 4);
        let mut first = pool.take();
        first.push(b"secret of the first connection");
        first.consume(3);
        first.release();
        assert!(first.is_empty(), "the giver keeps an empty buffer");
        assert_eq!(pool.len(), 1);

        let mut second = pool.take();
        assert!(pool.is_empty(), "the buffer was reused");
        assert!(second.filled().is_empty());
        second.push(b"new");
        assert_eq!(second.filled(), b"new");
        second.consume(usize::MAX);
        assert!(second.filled().is_empty());
    }

    /// Early bytes (read behind the handshake, before the relay began) larger than
    /// the relay's buffer are relayed whole, in order: before, what did not fit was
    /// dropped and the buffer's being full read as the end of the stream.
    #[test]
    fn early_bytes_larger_than_the_buffer_are_relayed_whole() {
        use crate::io::tests::{accepted, drive, reactor};
        use std::io::{Read as _, Write as _};
        let reactor = reactor();
        let (src, mut client) = accepted(&reactor);
        let (dst, mut app) = accepted(&reactor);
        // 40 masked binary frames of 4,000 bytes (160 KiB): more than two buffers.
        let mut early = Vec::new();
        for i in 0..40u32 {
            early.extend_from_slice(&[0x82, 0xfe, 0x0f, 0xa0, 1, 2, 3, 4]);
            early.extend((0..4000u32).map(|k| ((i + k) % 251) as u8));
        }
        // The client then sends one more frame and ends its stream.
        let mut late = vec![0x82, 0x83, 9, 9, 9, 9];
        late.extend_from_slice(b"end");
        client.write_all(&late).expect("send");
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let scratch = std::cell::RefCell::new(vec![0u8; 64 * 1024]);
        let shared = WsShared::default();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            app.read_to_end(&mut got).expect("read");
            got
        });
        let stats = drive(
            &reactor,
            ws_pipe(
                &src,
                &dst,
                early.clone(),
                true,
                0,
                &shared,
                Duration::from_secs(10),
                Duration::from_secs(10),
                &|_| {},
                &scratch,
            ),
        );
        drop((src, dst));
        let got = reader.join().expect("reader");
        let mut want = early;
        want.extend_from_slice(&late);
        assert_eq!(got.len(), want.len());
        assert!(got == want, "relayed whole and in order");
        assert_eq!(stats.messages, 41);
    }

    /// A revoked tunnel relays nothing more, even with bytes ready on both sides
    /// (no wait would fail then): each relay checks at every turn.
    #[test]
    fn a_revoked_tunnel_relays_nothing_more_though_bytes_are_ready() {
        use crate::io::tests::{accepted, drive, reactor};
        use std::io::Write as _;
        let reactor = reactor();
        let (src, mut client) = accepted(&reactor);
        let (dst, _app) = accepted(&reactor);
        client.write_all(&[7u8; 32 * 1024]).expect("send");
        let ws = [0x82, 0x84, 1, 2, 3, 4, 9, 9, 9, 9];
        client.write_all(&ws).expect("send");
        reactor.revoke(src.slot_key());
        let mut buf = vec![0u8; 4096];
        let (total, end) = drive(
            &reactor,
            pipe(
                &src,
                &dst,
                &mut buf,
                Duration::from_secs(10),
                Duration::from_secs(10),
            ),
        );
        assert_eq!(total, 0, "nothing relayed");
        let end = end.expect_err("ended early");
        assert_eq!(end.kind(), io::ErrorKind::ConnectionAborted);
        assert_eq!(TunnelEnd::of_pipes(&Err(end), &Ok(())), TunnelEnd::Revoked);

        let (src, mut client) = accepted(&reactor);
        let (dst, _app) = accepted(&reactor);
        client.write_all(&ws).expect("send");
        reactor.revoke(src.slot_key());
        reactor.revoke(dst.slot_key());
        let scratch = std::cell::RefCell::new(vec![0u8; 64 * 1024]);
        let shared = WsShared::default();
        let stats = drive(
            &reactor,
            ws_pipe(
                &src,
                &dst,
                Vec::new(),
                true,
                0,
                &shared,
                Duration::from_secs(10),
                Duration::from_secs(10),
                &|_| {},
                &scratch,
            ),
        );
        assert_eq!((stats.messages, stats.bytes), (0, 0), "nothing relayed");
        assert!(!stats.idled, "a revocation is no idle timeout");
        assert_eq!(shared.close.get(), Some(crate::ws::close_code::GOING_AWAY));
    }

    #[test]
    fn the_pool_keeps_at_most_its_cap_and_only_buffers_of_its_size() {
        let pool = BufPool::new(64, 2);
        let mut bufs: Vec<ReadBuf> = (0..5).map(|_| pool.take()).collect();
        assert_eq!(pool.held(), 5);
        for b in &mut bufs {
            b.release();
        }
        assert_eq!(pool.len(), 2, "the cap bounds what the pool holds");
        assert_eq!(pool.held(), 0, "every one counted back");

        let pool = BufPool::new(64, 8);
        let mut grown = pool.take();
        grown.push(&[7u8; 100]);
        grown.release();
        let mut small = ReadBuf::new(16);
        small.release();
        assert!(
            pool.is_empty(),
            "a buffer not of the pool's size is dropped"
        );
    }

    /// A lazy buffer holds storage only while it has bytes: none before its first
    /// read, none while `fill_idle` waits (the storage is back with the pool; part
    /// of a head waits copied aside).
    #[test]
    fn a_lazy_buffer_holds_storage_only_while_it_has_bytes() {
        use crate::io::tests::{accepted, drive, reactor};
        use std::io::Write as _;
        let reactor = reactor();
        let (conn, mut client) = accepted(&reactor);
        let pool = BufPool::new(16 * 1024, 4);
        let mut buf = pool.lazy();
        assert!(!buf.has_storage());
        assert_eq!(pool.held(), 0);

        // Nothing to read: the read waits without storage, and `on_wait` ran.
        let mut waited = 0;
        let polled = drive(&reactor, async {
            futures_lite::future::poll_once(buf.fill_idle(&conn, 64 * 1024, || waited += 1)).await
        });
        assert!(polled.is_none(), "nothing to read yet");
        assert_eq!(waited, 1);
        assert!(!buf.has_storage(), "no storage while waiting");
        assert_eq!((pool.held(), pool.len()), (0, 1), "back with the pool");

        // A small head: storage of the pool's.
        client.write_all(&[b'a'; 100]).expect("send");
        let n = drive(&reactor, buf.fill_idle(&conn, 64 * 1024, || {})).expect("read");
        assert_eq!(n, 100);
        assert_eq!(buf.filled(), &[b'a'; 100][..]);
        assert_eq!(pool.held(), 1);
        buf.consume(100);
        buf.release();
        assert_eq!((pool.held(), pool.len()), (0, 1));

        // Part of a head, then a wait: the bytes are copied aside, the storage is
        // back with the pool; the next read has them at its start.
        client.write_all(b"GET / HT").expect("send");
        drive(&reactor, buf.fill_idle(&conn, 64 * 1024, || {})).expect("read");
        let polled = drive(&reactor, async {
            futures_lite::future::poll_once(buf.fill_idle(&conn, 64 * 1024, || {})).await
        });
        assert!(polled.is_none(), "nothing more yet");
        assert!(!buf.has_storage(), "parked");
        assert_eq!(buf.filled(), b"GET / HT");
        assert_eq!((pool.held(), pool.len()), (0, 1));
        client.write_all(b"TP/1.1\r\n").expect("send");
        drive(&reactor, buf.fill_idle(&conn, 64 * 1024, || {})).expect("read");
        assert_eq!(buf.filled(), b"GET / HTTP/1.1\r\n");
        assert!(buf.has_storage());
        assert_eq!((pool.held(), pool.len()), (1, 0));
        buf.consume(3);
        drive(&reactor, async {
            futures_lite::future::poll_once(buf.fill_idle(&conn, 64 * 1024, || {})).await
        });
        assert_eq!(
            buf.filled(),
            b" / HTTP/1.1\r\n",
            "a consumed prefix stays consumed"
        );
        buf.release();
        assert!(buf.is_empty() && !buf.has_storage());
        assert_eq!((pool.held(), pool.len()), (0, 1));
    }

    #[test]
    fn a_buffer_goes_back_when_dropped_and_shows_nothing_of_its_last_use() {
        let pool = BufPool::new(64, 4);
        {
            let mut lent = pool.take();
            lent.push(b"unread bytes of a stream that ended early");
            assert!(pool.is_empty());
            assert_eq!(pool.held(), 1);
        }
        assert_eq!(pool.len(), 1, "back with the pool on drop");
        assert_eq!(pool.held(), 0, "counted back");
        let lent = pool.take();
        assert!(pool.is_empty(), "the buffer was reused");
        assert!(lent.filled().is_empty());
    }
}
