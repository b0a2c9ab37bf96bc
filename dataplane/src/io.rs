//! Non-blocking sockets on the per-core reactor: accept, connect, read, write.
//!
//! Every operation tries the syscall first and waits on the reactor slot only when the
//! kernel says it would block, so a busy connection costs exactly the syscalls that move
//! bytes. A short read or write is taken as "drained" (edge-triggered epoll reports the
//! next arrival), which saves the `EAGAIN` round trip.
//!
//! A client connection may carry TLS ([`TcpConn::start_tls`]): the same methods then
//! move plaintext through a rustls session driven sans-IO over the same socket and
//! the same readiness flags. A plain connection pays one branch on an empty `Option`.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use appproxy_shared::rate_floor::RateFloor;
use rustix::net::SocketFlags;
use socket2::{Domain, Protocol, Socket, Type};

use crate::client_table::ClientUnit;
use crate::reactor::{Direction, Reactor, Registration};

/// One unit of a per-core count (open client connections, open connections to one
/// upstream): taken when the connection opens, given back when this guard drops.
pub struct CountGuard(Rc<Cell<usize>>);

impl CountGuard {
    /// Takes one unit of `count`, unless it is already at `cap`.
    pub fn take(count: &Rc<Cell<usize>>, cap: usize) -> Option<Self> {
        let n = count.get();
        if n >= cap {
            return None;
        }
        count.set(n + 1);
        Some(Self(count.clone()))
    }
}

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// A minimum average read rate (the slow-body guard), as a bucket of waiting time:
/// it starts full (`cap`), every byte read adds `1 / rate` seconds (up to `cap`), and
/// time spent waiting for the peer drains it; an empty bucket times the read out. Time
/// the proxy spends elsewhere (writing to the app) is not counted: each wait starts
/// at [`TcpConn::set_timeout`].
#[derive(Debug, Clone, Copy)]
struct ReadFloor {
    /// The budget of waiting time.
    budget: RateFloor,
    /// When the current wait started.
    since: Instant,
    /// Whether the current deadline is the floor's (the budget was shorter than the
    /// idle timeout), not the idle timeout's.
    binding: bool,
}

/// `recv` on a socket, straight to the kernel: rustix's raw system call, without the
/// C library's wrapper (which brackets every call with cancellation-point
/// bookkeeping: about 60 instructions, where a relayed WebSocket message makes four
/// such calls).
fn sys_recv(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    Ok(rustix::net::recv(stream, buf, rustix::net::RecvFlags::empty())?.0)
}

/// `send` on a socket, straight to the kernel (see [`sys_recv`]), with `MSG_NOSIGNAL`
/// as the standard library's: a peer that closed gives `EPIPE`, never `SIGPIPE`.
fn sys_send(stream: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    Ok(rustix::net::send(
        stream,
        buf,
        rustix::net::SendFlags::NOSIGNAL,
    )?)
}

/// A TCP connection registered with the core's reactor.
pub struct TcpConn {
    /// Dropped before `stream`, so the slot is released before the descriptor closes.
    reg: Registration,
    /// The socket, in non-blocking mode.
    stream: TcpStream,
    /// The read-rate floor, while a request body is read from this peer.
    floor: Cell<Option<ReadFloor>>,
    /// The count this connection is part of (route cap), released with it.
    counted: Option<CountGuard>,
    /// Its unit of its client address's count, released with it.
    client_unit: Option<ClientUnit>,
    /// The TLS session, when the client speaks TLS.
    tls: Option<Box<TlsState>>,
    /// Whether the close is abortive ([`TcpConn::reset_on_close`]).
    abortive: Cell<bool>,
    /// While a write to this connection waits for the peer to take bytes: when it
    /// may wait no longer ([`TcpConn::bound_write`]). No deadline set meanwhile
    /// comes later: the other direction of a tunnel re-arms its reads of the same
    /// connection, and a peer that never reads but sends a byte now and then must
    /// not stretch the write's bound to the read's idle timeout.
    write_bound: Cell<Option<Instant>>,
}

/// The TLS side of a connection: a rustls session (server side towards clients,
/// client side towards apps that serve HTTPS) whose records go over the
/// connection's own socket. Borrowed only inside a poll, never across an await.
struct TlsState {
    session: RefCell<rustls::Connection>,
}

/// The socket as rustls reads and writes it: the same readiness bookkeeping as the
/// plain path (no syscall while the slot is not ready; a short count or `EAGAIN`
/// clears the flag).
struct SockIo<'a> {
    stream: &'a TcpStream,
    reg: &'a Registration,
}

impl Read for SockIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        recv_when_ready(self.stream, self.reg, buf)
    }
}

/// One `recv` from the socket if its slot is ready (`WouldBlock`, without a syscall,
/// when it is not): a short count or `EAGAIN` clears the ready flag. Bytes as the
/// socket has them (ciphertext over TLS).
#[inline(always)]
fn recv_when_ready(stream: &TcpStream, reg: &Registration, buf: &mut [u8]) -> io::Result<usize> {
    if !reg.is_ready(Direction::Read) {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    loop {
        match sys_recv(stream, buf) {
            Ok(n) => {
                crate::reactor::read_bytes(n);
                if n > 0 && n < buf.len() {
                    reg.clear_ready(Direction::Read);
                }
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                reg.clear_ready(Direction::Read);
                return Err(e);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Largest first handshake message (a ClientHello) a TLS client may announce. Real
/// ones are a few kilobytes (about 1.8 KB with a post-quantum key share, a few more
/// with several shares and tickets); rustls would take up to 64 KiB, holding what
/// came of it until the handshake deadline: one address's unfinished 64 KiB
/// ClientHellos on thousands of connections cost the worker about 77 KiB each.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// Follows a TLS client's first bytes, through its records, to the header of its
/// first handshake message, and refuses a ClientHello announced past
/// [`MAX_CLIENT_HELLO`] before rustls buffers it. Pure: fed the bytes as read.
#[derive(Debug, Default)]
pub struct FirstHello {
    /// The record header being read, and how much of it came.
    record: [u8; 5],
    record_have: usize,
    /// Payload bytes of the current record still to pass.
    record_left: usize,
    /// The handshake message header (type, 24-bit length), and how much of it came.
    header: [u8; 4],
    header_have: usize,
}

impl FirstHello {
    /// Follows `bytes`, the next ones the client sent; an error once its first
    /// handshake message is a ClientHello announced past [`MAX_CLIENT_HELLO`].
    /// Anything else (another record type first, say) is left to rustls to judge.
    pub fn feed(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() && self.header_have < self.header.len() {
            if self.record_left == 0 {
                let take = (self.record.len() - self.record_have).min(bytes.len());
                self.record[self.record_have..self.record_have + take]
                    .copy_from_slice(&bytes[..take]);
                self.record_have += take;
                bytes = &bytes[take..];
                if self.record_have == self.record.len() {
                    self.record_have = 0;
                    if self.record[0] != 0x16 {
                        // Not a handshake record: not ours to judge.
                        self.header_have = self.header.len();
                        return Ok(());
                    }
                    self.record_left =
                        usize::from(u16::from_be_bytes([self.record[3], self.record[4]]));
                }
                continue;
            }
            let take = (self.header.len() - self.header_have)
                .min(bytes.len())
                .min(self.record_left);
            self.header[self.header_have..self.header_have + take].copy_from_slice(&bytes[..take]);
            self.header_have += take;
            self.record_left -= take;
            bytes = &bytes[take..];
        }
        if self.header_have == self.header.len() && self.header[0] == 0x01 {
            let announced = u32::from_be_bytes([0, self.header[1], self.header[2], self.header[3]]);
            if announced as usize > MAX_CLIENT_HELLO {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "TLS ClientHello announced at {announced} bytes, past {MAX_CLIENT_HELLO}"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The socket as the handshake reads it: its bytes followed by a [`FirstHello`].
struct HelloIo<'a> {
    sock: SockIo<'a>,
    hello: &'a mut FirstHello,
}

impl Read for HelloIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.sock.read(buf)?;
        self.hello.feed(&buf[..n])?;
        Ok(n)
    }
}

impl Write for SockIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if !self.reg.is_ready(Direction::Write) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut stream = self.stream;
        loop {
            match stream.write_vectored(bufs) {
                Ok(n) => {
                    if n < total {
                        self.reg.clear_ready(Direction::Write);
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.reg.clear_ready(Direction::Write);
                    return Err(e);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a TLS handshake settled, for logs.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    /// The protocol version.
    pub version: Option<rustls::ProtocolVersion>,
    /// The ALPN protocol, when one was agreed.
    pub alpn: Option<Vec<u8>>,
    /// The SNI name the client sent.
    pub sni: Option<String>,
}

/// A TLS protocol error (bad record, failed handshake) as an I/O error.
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TcpConn {
    /// Registers an already non-blocking stream.
    pub fn new(reactor: &Rc<Reactor>, stream: TcpStream) -> io::Result<Self> {
        let reg = reactor.register();
        Ok(Self {
            reg,
            stream,
            floor: Cell::new(None),
            counted: None,
            client_unit: None,
            tls: None,
            abortive: Cell::new(false),
            write_bound: Cell::new(None),
        })
    }

    /// Makes this connection speak TLS through `session` from now on (before any
    /// byte was read); [`TcpConn::handshake`] then completes the handshake.
    pub fn start_tls(&mut self, session: impl Into<rustls::Connection>) {
        self.tls = Some(Box::new(TlsState {
            session: RefCell::new(session.into()),
        }));
    }

    /// The socket itself (a refusal's one best-effort write at accept).
    pub(crate) fn socket(&self) -> &TcpStream {
        &self.stream
    }

    /// Whether the connection speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// What the TLS handshake settled (TLS connections, after the handshake).
    pub fn tls_info(&self) -> Option<TlsInfo> {
        let tls = self.tls.as_ref()?;
        let s = tls.session.try_borrow().ok()?;
        Some(TlsInfo {
            version: s.protocol_version(),
            alpn: s.alpn_protocol().map(<[u8]>::to_vec),
            sni: match &*s {
                rustls::Connection::Server(s) => s.server_name().map(str::to_owned),
                rustls::Connection::Client(_) => None,
            },
        })
    }

    /// Whether the TLS handshake resumed an earlier session.
    pub fn tls_resumed(&self) -> bool {
        self.tls.as_ref().is_some_and(|tls| {
            tls.session
                .try_borrow()
                .is_ok_and(|s| s.handshake_kind() == Some(rustls::HandshakeKind::Resumed))
        })
    }

    fn sock(&self) -> SockIo<'_> {
        SockIo {
            stream: &self.stream,
            reg: &self.reg,
        }
    }

    /// Writes out what rustls holds for the peer without waiting: `Ok(true)` once
    /// nothing is left, `Ok(false)` when the socket takes no more now.
    fn tls_flush_now(&self, s: &mut rustls::Connection) -> io::Result<bool> {
        while s.wants_write() {
            match s.write_tls(&mut self.sock()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Writes out what rustls holds for the peer, waiting for the socket as needed.
    fn poll_tls_flush(
        &self,
        cx: &mut Context<'_>,
        s: &mut rustls::Connection,
    ) -> Poll<io::Result<()>> {
        loop {
            match self.tls_flush_now(s) {
                Ok(true) => return Poll::Ready(Ok(())),
                Ok(false) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            ready!(self
                .reg
                .poll_ready(cx, Direction::Write, self.stream.as_fd()))?;
        }
    }

    /// One non-blocking read of plaintext: `Some(n)` (0 is end of stream: the
    /// peer's close_notify, or its FIN without one), `None` when the socket has
    /// nothing more now. Records are pulled from the socket until plaintext appears.
    fn tls_read_now(
        &self,
        s: &mut rustls::Connection,
        buf: &mut [u8],
    ) -> io::Result<Option<usize>> {
        loop {
            match s.reader().read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Some(0)),
                Err(e) => return Err(e),
            }
            // Alerts and key-update replies go out before more is read (best effort:
            // what the socket does not take now leaves with the next write).
            let _ = self.tls_flush_now(s);
            match s.read_tls(&mut self.sock()) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
            if let Err(e) = s.process_new_packets() {
                let _ = self.tls_flush_now(s);
                return Err(tls_error(e));
            }
        }
    }

    /// Completes the TLS handshake (a no-op on a plain connection), within the
    /// deadline set before. A peer that closes, sends garbage or fails the
    /// handshake gets an alert where TLS allows one and an error here.
    pub async fn handshake(&self) -> io::Result<()> {
        let Some(tls) = &self.tls else {
            return Ok(());
        };
        let mut started = false;
        let mut hello = FirstHello::default();
        poll_fn(|cx| loop {
            let mut s = tls.session.borrow_mut();
            if !s.is_handshaking() {
                // Complete once the last flight (a TLS 1.2 Finished, session tickets)
                // is out. A peer that left right after its own Finished (the write
                // fails) still completed it: that surfaces on the next I/O.
                return match self.poll_tls_flush(cx, &mut s) {
                    Poll::Ready(_) => Poll::Ready(Ok(())),
                    Poll::Pending => Poll::Pending,
                };
            }
            match self.poll_tls_flush(cx, &mut s) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            let mut io = HelloIo {
                sock: self.sock(),
                hello: &mut hello,
            };
            match s.read_tls(&mut io) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                // The peer's first bytes: a handshake under way may still be closed
                // for a new connection at the cap, as an unfinished request head
                // may, once no connection with nothing in hand is left.
                Ok(_) if !started => {
                    started = true;
                    self.reg.set_unfinished();
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drop(s);
                    match self
                        .reg
                        .poll_ready(cx, Direction::Read, self.stream.as_fd())
                    {
                        Poll::Ready(Ok(())) => continue,
                        other => return other,
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
            if let Err(e) = s.process_new_packets() {
                let _ = self.tls_flush_now(&mut s);
                return Poll::Ready(Err(tls_error(e)));
            }
        })
        .await
    }

    /// Encrypts some of `buf` and waits until every record is in the kernel, like a
    /// plain write: what it returns has left the process.
    async fn tls_write(&self, tls: &TlsState, buf: &[u8]) -> io::Result<usize> {
        let n = poll_fn(|cx| {
            let mut s = tls.session.borrow_mut();
            match self.poll_tls_flush(cx, &mut s) {
                Poll::Ready(Ok(())) => Poll::Ready(s.writer().write(buf)),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await?;
        self.flush().await?;
        Ok(n)
    }

    /// Waits until every byte written so far is in the kernel (TLS records held after
    /// a [`TcpConn::try_write`]); immediate on a plain connection.
    pub async fn flush(&self) -> io::Result<()> {
        match &self.tls {
            None => Ok(()),
            Some(tls) => poll_fn(|cx| self.poll_tls_flush(cx, &mut tls.session.borrow_mut())).await,
        }
    }

    /// Makes this connection count in `guard`'s count until it closes.
    pub fn count_in(&mut self, guard: CountGuard) {
        self.counted = Some(guard);
    }

    /// Makes this connection hold `unit` of its client address's count until it
    /// closes.
    pub fn count_client_in(&mut self, unit: ClientUnit) {
        self.client_unit = Some(unit);
    }

    /// Arms the read-rate floor: from now on, reads must keep up `rate` bytes per
    /// second on average, with at most `cap` of waiting banked ([`ReadFloor`]). A
    /// read it cuts fails with `TimedOut` and [`TcpConn::floor_cut`] is true.
    /// `rate` 0 leaves only the idle timeout.
    pub fn arm_read_floor(&self, rate: u64, cap: Duration) {
        self.floor
            .set(RateFloor::new(rate, cap).map(|budget| ReadFloor {
                budget,
                since: self.reg.reactor().now(),
                binding: false,
            }));
    }

    /// Disarms the read-rate floor.
    pub fn disarm_read_floor(&self) {
        self.floor.set(None);
    }

    /// Whether the last timeout was the read-rate floor's rather than the idle
    /// timeout's.
    pub fn floor_cut(&self) -> bool {
        self.floor.get().is_some_and(|f| f.binding)
    }

    /// Books a completed read of `n` bytes against the floor.
    fn book_read(&self, n: usize) {
        if let Some(mut f) = self.floor.get() {
            let now = self.reg.reactor().now();
            f.budget.book(now.saturating_duration_since(f.since), n);
            f.since = now;
            self.floor.set(Some(f));
        }
    }

    /// Connects to `addr`, failing after `timeout`.
    pub async fn connect(
        reactor: &Rc<Reactor>,
        addr: SocketAddr,
        timeout: Duration,
    ) -> io::Result<Self> {
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )?;
        socket.set_tcp_nodelay(true)?;
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INPROGRESS.raw_os_error()) => {}
            Err(e) => return Err(e),
        }
        let conn = Self::new(reactor, socket.into())?;
        conn.reg.clear_ready(Direction::Write);
        conn.reg.set_deadline(Some(Instant::now() + timeout));
        poll_fn(|cx| {
            conn.reg
                .poll_ready(cx, Direction::Write, conn.stream.as_fd())
        })
        .await?;
        conn.reg.set_deadline(None);
        // One syscall on success: a connected socket has a peer. Only when it has none
        // is the pending error fetched (an edge with neither error nor connection,
        // which should not happen, still fails cleanly here with `NotConnected`).
        if let Err(not_connected) = conn.stream.peer_addr() {
            return Err(conn.stream.take_error()?.unwrap_or(not_connected));
        }
        Ok(conn)
    }

    /// Reads into `buf`; `Ok(0)` is end of stream.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        poll_fn(|cx| self.poll_read(cx, buf)).await
    }

    /// Polls a read into `buf` (plaintext over TLS); `Ok(0)` is end of stream. For
    /// the async I/O traits ([`crate::h2::io`]): one task polls a connection.
    pub fn poll_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        ready!(crate::reactor::poll_read_turn(cx));
        if let Some(tls) = &self.tls {
            return loop {
                let r = self.tls_read_now(&mut tls.session.borrow_mut(), buf);
                match r {
                    Ok(Some(n)) => {
                        self.book_read(n);
                        break Poll::Ready(Ok(n));
                    }
                    Ok(None) => {
                        ready!(self
                            .reg
                            .poll_ready(cx, Direction::Read, self.stream.as_fd()))?
                    }
                    Err(e) => break Poll::Ready(Err(e)),
                }
            };
        }
        let r = ready!(self.poll_recv(cx, buf));
        if let Ok(n) = r {
            self.book_read(n);
        }
        Poll::Ready(r)
    }

    /// Polls one read straight from the socket: what it holds, ciphertext over TLS.
    // Inlined into `poll_read`, the hot path of every relay: a call of its own
    // measured ~150 instructions more per small GET (callgrind).
    #[inline(always)]
    fn poll_recv(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            match recv_when_ready(&self.stream, &self.reg, buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self
                        .reg
                        .poll_ready(cx, Direction::Read, self.stream.as_fd()))?;
                }
                r => return Poll::Ready(r),
            }
        }
    }

    /// Waits for bytes and copies what the socket holds without taking it
    /// (`MSG_PEEK`; raw bytes, before any TLS): `Ok(0)` is end of stream. The socket
    /// stays readable (its bytes are still there, and the reactor's edges do not come
    /// again for them): a caller that needs more than it saw says so with
    /// [`TcpConn::await_more`], so that the next peek waits for them.
    pub async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        poll_fn(|cx| loop {
            if self.reg.is_ready(Direction::Read) {
                match rustix::net::recv(&self.stream, &mut *buf, rustix::net::RecvFlags::PEEK) {
                    Ok((n, _)) => {
                        return Poll::Ready(Ok(n));
                    }
                    Err(rustix::io::Errno::AGAIN) => self.reg.clear_ready(Direction::Read),
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Poll::Ready(Err(e.into())),
                }
            }
            ready!(self
                .reg
                .poll_ready(cx, Direction::Read, self.stream.as_fd()))?;
        })
        .await
    }

    /// Waits until the reactor sees the peer's end of stream (`EPOLLRDHUP`, a
    /// hang-up or an error), however many bytes it sent before that still wait
    /// unread, or until the connection is revoked or times out: how a wait on
    /// something else (an app's answer) learns that its client is gone, as nginx's
    /// check for a broken connection does. Nothing is read.
    pub async fn peer_gone(&self) {
        self.until_seen(Direction::Read).await;
    }

    /// Waits on the edges of `dir` until the reactor has seen the peer's end there
    /// ([`Registration::poll_peer_end`]), or until the connection is revoked or
    /// times out. Any other edge (bytes to read, room to write) is looked at and
    /// waited past; `dir`'s readiness is left as it is, for its one user.
    async fn until_seen(&self, dir: Direction) {
        poll_fn(|cx| self.reg.poll_peer_end(cx, dir, self.stream.as_fd())).await;
    }

    /// Waits until the reactor sees the connection reset or hung up (`EPOLLERR`,
    /// `EPOLLHUP`), or until it is revoked or times out: how a wait on something
    /// else (an app's silent answer) learns that its client is gone, while a client
    /// that only ended its side (a half-close: it still reads) keeps its answer, as
    /// HAProxy's default (no `abortonclose`) does. It waits on the write side's
    /// edges: for the connection's one writer, while it is not writing.
    pub async fn hung_up(&self) {
        self.until_seen(Direction::Write).await;
    }

    /// [`TcpConn::hung_up`] or [`TcpConn::peer_gone`], as `gone` says.
    pub async fn gone(&self, gone: crate::relay::Gone) {
        let dir = match gone {
            crate::relay::Gone::HungUp => Direction::Write,
            crate::relay::Gone::Ended => Direction::Read,
        };
        self.until_seen(dir).await;
    }

    /// Whether the reactor has seen the peer's end of stream (or a hang-up, an error).
    pub fn peer_ended(&self) -> bool {
        self.reg.read_closed()
    }

    /// Whether the reactor has seen the connection reset or hung up (`EPOLLERR`,
    /// `EPOLLHUP`), not only the peer's end of stream: nothing written will arrive.
    pub fn peer_reset(&self) -> bool {
        self.reg.hung_up()
    }

    /// The bytes the last [`TcpConn::peek`] showed are not enough: the next one waits
    /// for more (the reactor's next edge). Only then: a peek that left the socket
    /// marked as not readable while its bytes wait would leave the next read waiting
    /// for an edge that never comes (edge-triggered epoll), when no more bytes follow.
    pub fn await_more(&self) {
        self.reg.clear_ready(Direction::Read);
    }

    /// Takes `buf.len()` bytes that a [`TcpConn::peek`] saw off the socket; what
    /// follows them is read next, as if they had never been there.
    pub fn take_peeked(&self, buf: &mut [u8]) -> io::Result<()> {
        let n = loop {
            match sys_recv(&self.stream, buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => break r?,
            }
        };
        self.reg.mark_ready(Direction::Read);
        if n == buf.len() {
            Ok(())
        } else {
            Err(io::Error::other(
                "the socket held fewer bytes than it showed",
            ))
        }
    }

    /// Reads what the peer sends to drop it (a lingering close): the socket's bytes as
    /// they are, without TLS; `Ok(0)` is end of stream.
    pub async fn discard(&self, buf: &mut [u8]) -> io::Result<usize> {
        poll_fn(|cx| {
            ready!(crate::reactor::poll_read_turn(cx));
            self.poll_recv(cx, buf)
        })
        .await
    }

    /// Writes some of `buf`.
    pub async fn write(&self, buf: &[u8]) -> io::Result<usize> {
        if let Some(tls) = &self.tls {
            return self.tls_write(tls, buf).await;
        }
        poll_fn(|cx| self.poll_write(cx, buf)).await
    }

    /// Polls a write of some of `buf`. Over TLS the plaintext is taken once earlier
    /// records are out, and what the socket does not take now stays encrypted for
    /// [`TcpConn::poll_flush`] (at most rustls' buffer limit).
    pub fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Some(tls) = &self.tls {
            let mut s = tls.session.borrow_mut();
            return match self.poll_tls_flush(cx, &mut s) {
                Poll::Ready(Ok(())) => {
                    let n = s.writer().write(buf)?;
                    self.tls_flush_now(&mut s)?;
                    Poll::Ready(Ok(n))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            };
        }
        loop {
            if !self.reg.is_ready(Direction::Write) {
                ready!(self
                    .reg
                    .poll_ready(cx, Direction::Write, self.stream.as_fd()))?;
            }
            match sys_send(&self.stream, buf) {
                Ok(n) => {
                    if n < buf.len() {
                        self.reg.clear_ready(Direction::Write);
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.reg.clear_ready(Direction::Write)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Polls until every byte written so far is in the kernel (immediate on a plain
    /// connection).
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.tls {
            None => Poll::Ready(Ok(())),
            Some(tls) => self.poll_tls_flush(cx, &mut tls.session.borrow_mut()),
        }
    }

    /// Waits until a read may make progress (data, end of stream or an error), without
    /// holding a buffer meanwhile: idle connections then cost no buffer memory.
    pub async fn readable(&self) -> io::Result<()> {
        poll_fn(crate::reactor::poll_read_turn).await;
        if let Some(tls) = &self.tls {
            // Plaintext (or an error) rustls already holds is ready without the socket.
            let buffered = match tls.session.borrow_mut().process_new_packets() {
                Ok(state) => state.plaintext_bytes_to_read() > 0 || state.peer_has_closed(),
                Err(_) => true,
            };
            if buffered {
                return Ok(());
            }
        }
        poll_fn(|cx| {
            self.reg
                .poll_ready(cx, Direction::Read, self.stream.as_fd())
        })
        .await
    }

    /// Reads what is there now; `WouldBlock` when nothing is.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(tls) = &self.tls {
            return match self.tls_read_now(&mut tls.session.borrow_mut(), buf)? {
                Some(n) => Ok(n),
                None => Err(io::ErrorKind::WouldBlock.into()),
            };
        }
        recv_when_ready(&self.stream, &self.reg, buf)
    }

    /// Writes what the socket takes now; `WouldBlock` when it takes nothing. Over TLS
    /// some records may stay behind: a [`TcpConn::flush`] (or the next write) sends
    /// them.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        if let Some(tls) = &self.tls {
            let mut s = tls.session.borrow_mut();
            if !self.tls_flush_now(&mut s)? {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = s.writer().write(buf)?;
            self.tls_flush_now(&mut s)?;
            return Ok(n);
        }
        if !self.reg.is_ready(Direction::Write) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        loop {
            match sys_send(&self.stream, buf) {
                Ok(n) => {
                    if n < buf.len() {
                        self.reg.clear_ready(Direction::Write);
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.reg.clear_ready(Direction::Write);
                    return Err(e);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes all of `buf`.
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.write(buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Whether the peer may have sent something (data or a close) since the last
    /// read that would block: for checking a pooled connection without a syscall.
    /// A connection no task ever waited on has no edges to go by, so it may have.
    pub fn has_pending_input(&self) -> bool {
        !self.reg.is_armed() || self.reg.is_ready(Direction::Read)
    }

    /// The socket's descriptor number, as an identity while the connection is open.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.stream.as_raw_fd()
    }

    /// Whether an answer from the peer may be waiting: `buffered`, the caller's
    /// buffer already holds bytes read from it; else whether the socket holds bytes
    /// not yet read, or the peer's end of stream (a peek: nothing is taken and
    /// nothing waited for), looked at on a plaintext connection only: a TLS one's
    /// socket may hold records that are no answer (a session ticket).
    pub fn answer_may_wait(&self, buffered: bool) -> bool {
        if buffered {
            return true;
        }
        let mut byte = [0u8; 1];
        !self.is_tls()
            && rustix::net::recv(&self.stream, &mut byte, rustix::net::RecvFlags::PEEK).is_ok()
    }

    /// Checks with one non-blocking read that an idle connection is still open and
    /// silent.
    pub fn probe_idle(&self) -> bool {
        let mut byte = [0u8; 1];
        if let Some(tls) = &self.tls {
            // Records that carry no data (session tickets, key updates) are taken in
            // stride; data or an end of stream means the connection is not reusable.
            return matches!(
                self.tls_read_now(&mut tls.session.borrow_mut(), &mut byte),
                Ok(None)
            );
        }
        match sys_recv(&self.stream, &mut byte) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.reg.clear_ready(Direction::Read);
                true
            }
            _ => false,
        }
    }

    /// Sets (or clears) the deadline of the operations that follow.
    pub fn set_deadline(&self, deadline: Option<Instant>) {
        let deadline = match self.write_bound.get() {
            Some(bound) => Some(deadline.map_or(bound, |d| d.min(bound))),
            None => deadline,
        };
        self.reg.set_deadline(deadline);
    }

    /// A write to this connection waits for its peer: it may wait `stalled` from
    /// now, and no deadline set meanwhile comes later (see `write_bound`); called
    /// again at each byte the peer takes. [`TcpConn::unbound_write`] ends it.
    pub fn bound_write(&self, stalled: Duration) {
        self.write_bound.set(None);
        self.set_timeout(stalled);
        self.write_bound
            .set(Some(self.reg.reactor().now() + stalled));
    }

    /// The write's wait is over (see [`TcpConn::bound_write`]).
    pub fn unbound_write(&self) {
        self.write_bound.set(None);
    }

    /// Sets the deadline `timeout` from now, unless the one already set comes
    /// sooner: a new connection's head timeout runs once from its accept, through its
    /// PROXY protocol header and TLS handshake to its first request head (nginx's
    /// `client_header_timeout`), not afresh at each step.
    pub fn set_timeout_within(&self, timeout: Duration) {
        let now = self.reg.reactor().now();
        if self.reg.deadline().is_some_and(|d| d <= now + timeout) {
            return;
        }
        self.set_timeout(timeout);
    }

    /// Sets the deadline `timeout` from now (the reactor's clock: coarse, no syscall),
    /// or sooner when the read-rate floor's budget is shorter.
    pub fn set_timeout(&self, timeout: Duration) {
        let now = self.reg.reactor().now();
        let mut timeout = timeout;
        if let Some(mut f) = self.floor.get() {
            f.since = now;
            (timeout, f.binding) = f.budget.bound(timeout);
            self.floor.set(Some(f));
        }
        let deadline = now + timeout;
        let deadline = self.write_bound.get().map_or(deadline, |b| deadline.min(b));
        self.reg.set_deadline(Some(deadline));
    }

    /// Marks the connection as idle (drain closes it at once): a tunnel.
    pub fn set_idle(&self, idle: bool) {
        self.reg.set_idle(idle);
    }

    /// Marks the connection as having nothing in hand (waiting for a request, or
    /// lingering), or clears that: the oldest such connection makes room for a new
    /// one at the connection cap. `idle`: drain closes it at once too.
    pub fn set_reusable(&self, reusable: bool, idle: bool) {
        self.reg.set_reusable(reusable, idle);
    }

    /// Marks the connection as having its request head (or TLS handshake) under way
    /// but unfinished: at the cap it is closed for a new one only once no connection
    /// with nothing in hand is left ([`Registration::set_unfinished`]).
    pub fn set_unfinished(&self) {
        self.reg.set_unfinished();
    }

    /// Whether the peer's end of stream has been seen (by the reactor, since the
    /// descriptor joined its set): what [`TcpConn::peek`] shows then is all that will
    /// ever come, and a peek no longer waits.
    pub fn peer_closed(&self) -> bool {
        self.reg.read_closed()
    }

    /// Whether the deadline passed (the next wait fails with `TimedOut`).
    pub fn timed_out(&self) -> bool {
        self.reg.timed_out()
    }

    /// Whether the connection was closed to admit a new one at the connection cap
    /// while it had nothing in hand: its task closes it, even if bytes of a request
    /// came in meanwhile (as nginx does with a reusable connection it reclaims).
    pub fn was_shed(&self) -> bool {
        self.reg.was_shed()
    }

    /// The connection's reactor slot, for revoking it ([`crate::reactor::Reactor::revoke`]).
    pub fn slot_key(&self) -> crate::reactor::SlotKey {
        self.reg.key()
    }

    /// Marks the connection as a client's: a drain's deadline cuts it after the
    /// apps' ([`crate::reactor::Reactor::revoke_apps`]).
    pub fn mark_client(&self) {
        self.reg.set_client()
    }

    /// Whether the connection was revoked: its tunnel's circuit was removed or no
    /// longer admits its client, or the drain's deadline passed.
    pub fn was_revoked(&self) -> bool {
        self.reg.was_revoked()
    }

    /// Shuts down the write half (sends FIN; over TLS a close_notify first).
    pub fn shutdown_write(&self) {
        self.tls_close_notify();
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// Shuts down the read half: pending and later reads see end of stream.
    pub fn shutdown_read(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Read);
    }

    /// Shuts down both halves: pending reads on either side see end of stream.
    pub fn shutdown_both(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Makes the close of this connection abortive: an RST (`SO_LINGER` 0, what is
    /// still unsent is discarded) and no TLS close_notify. For a response delimited by
    /// the close that could not be completed: a clean close would present its
    /// truncated body to the client as the whole one.
    pub fn reset_on_close(&self) {
        self.abortive.set(true);
        let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
    }

    /// The peer address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.stream.peer_addr()
    }

    /// Queues a close_notify and sends what the socket takes now (TLS only).
    fn tls_close_notify(&self) {
        if let Some(tls) = &self.tls {
            if let Ok(mut s) = tls.session.try_borrow_mut() {
                s.send_close_notify();
                let _ = self.tls_flush_now(&mut s);
            }
        }
    }
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        // A TLS peer is told the close was intended (best effort: never waits),
        // unless it was not.
        if !self.abortive.get() {
            self.tls_close_notify();
        }
    }
}

/// A listening socket registered with the core's reactor.
pub struct Listener {
    /// Dropped before `listener`.
    reg: Registration,
    /// The socket, in non-blocking mode, with `SO_REUSEPORT`.
    listener: TcpListener,
    /// The bound address (the real port when 0 was asked).
    local: SocketAddr,
    /// Its place among this process's listeners on the address ([`claimed`]).
    _claim: Option<Claim>,
}

/// The addresses this process listens on, with how many of its listeners (one
/// per core) each has.
static CLAIMED: std::sync::Mutex<Vec<(SocketAddr, usize)>> = std::sync::Mutex::new(Vec::new());

/// One of this process's listeners on an address, counted in [`CLAIMED`] while
/// it lives.
struct Claim(SocketAddr);

impl Drop for Claim {
    fn drop(&mut self) {
        let mut all = CLAIMED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = all.iter().position(|(a, _)| *a == self.0) {
            all[at].1 -= 1;
            if all[at].1 == 0 {
                all.swap_remove(at);
            }
        }
    }
}

/// Binds `bind` as one of this process's listeners on `addr`: the first of them
/// only once no other process listens there. `SO_REUSEPORT` lets every socket of
/// the same user with the option join a port and take a share of its new
/// connections, so a worker joining another worker's port (overlapping ranges)
/// would silently take some of a circuit's clients to its own circuit — another
/// user's app. A probe without the option binds the address first: it fails while
/// another socket listens there (or an outgoing connection holds it as its local
/// port); connections left from a listener that closed, and TIME-WAIT, do not stop
/// it. The probe and the bind happen under the lock, so this process's cores do
/// not race each other; another process binding between the probe and the bind is
/// not seen (a window of two system calls). This keeps a worker off another's
/// port; it cannot keep a process that joins without probing (any program of the
/// same user setting `SO_REUSEPORT`) off this one: workers of different users
/// are kept apart by the kernel itself.
fn claimed(
    addr: SocketAddr,
    bind: impl FnOnce() -> io::Result<Socket>,
) -> io::Result<(Socket, Option<Claim>)> {
    if addr.port() == 0 {
        return Ok((bind()?, None));
    }
    let mut all = CLAIMED.lock().unwrap_or_else(|p| p.into_inner());
    let at = all.iter().position(|(a, _)| *a == addr);
    if at.is_none() {
        let probe = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.cloexec(),
            Some(Protocol::TCP),
        )?;
        probe.set_reuse_address(true)?;
        if addr.is_ipv6() {
            probe.set_only_v6(true)?;
        }
        if let Err(e) = probe.bind(&addr.into()) {
            return Err(if e.kind() == io::ErrorKind::AddrInUse {
                io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another socket holds the address (a process listening on it, \
                     which SO_REUSEPORT would let share its connections, or a \
                     connection using it as its local port)",
                )
            } else {
                e
            });
        }
    }
    let socket = bind()?;
    match at {
        Some(at) => all[at].1 += 1,
        None => all.push((addr, 1)),
    }
    Ok((socket, Some(Claim(addr))))
}

impl Listener {
    /// Binds `addr` with `SO_REUSEPORT` (one listener per core on the same port: the
    /// kernel spreads connections over the cores), its connections probed by TCP
    /// `keepalive` when given. Another process's socket on the address is refused
    /// ([`claimed`]): the cores of this process share a port, no one else.
    pub fn bind(
        reactor: &Rc<Reactor>,
        addr: SocketAddr,
        backlog: i32,
        keepalive: Option<crate::config::TcpKeepalive>,
    ) -> io::Result<Self> {
        let (socket, claim) = claimed(addr, || Self::socket(addr, backlog, keepalive))?;
        let listener: TcpListener = socket.into();
        let local = listener.local_addr()?;
        let reg = reactor.register();
        Ok(Self {
            reg,
            listener,
            local,
            _claim: claim,
        })
    }

    /// A listening socket on `addr` with `SO_REUSEPORT`.
    fn socket(
        addr: SocketAddr,
        backlog: i32,
        keepalive: Option<crate::config::TcpKeepalive>,
    ) -> io::Result<Socket> {
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        // Accepted sockets inherit TCP_NODELAY from the listener (Linux copies the
        // listener's TCP state into each child): one setsockopt per connection saved.
        socket.set_tcp_nodelay(true)?;
        // Inherited likewise, the probes' timings with them: no cost per connection.
        if let Some(k) = keepalive {
            socket.set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(k.idle)
                    .with_interval(k.interval)
                    .with_retries(k.probes),
            )?;
        }
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.bind(&addr.into())?;
        socket.listen(backlog)?;
        Ok(socket)
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Accepts one connection (already non-blocking, close-on-exec, and no-delay
    /// inherited from the listener: no syscall besides `accept4`).
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        poll_fn(|cx| loop {
            if !self.reg.is_ready(Direction::Read) {
                ready!(self
                    .reg
                    .poll_ready(cx, Direction::Read, self.listener.as_fd()))?;
            }
            match rustix::net::acceptfrom_with(
                &self.listener,
                SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            ) {
                Ok((fd, addr)) => {
                    let stream = TcpStream::from(fd);
                    let peer = addr
                        .and_then(|a| SocketAddr::try_from(a).ok())
                        .or_else(|| stream.peer_addr().ok());
                    match peer {
                        Some(peer) => return Poll::Ready(Ok((stream, peer))),
                        // The peer vanished between accept and now: take the next one.
                        None => continue,
                    }
                }
                Err(rustix::io::Errno::AGAIN) => self.reg.clear_ready(Direction::Read),
                Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::CONNABORTED) => {}
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        })
        .await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::liveness::Liveness;

    pub(crate) fn reactor() -> Rc<Reactor> {
        let live = Liveness::new(&[0], Duration::from_secs(5));
        Reactor::new(Default::default(), live.cores[0].clone()).expect("reactor")
    }

    /// A handshake record carrying the start of a handshake message of type `kind`
    /// announced at `announced` bytes, with `body` after its header.
    fn hello_record(kind: u8, announced: u32, body: &[u8]) -> Vec<u8> {
        let len = (4 + body.len()) as u16;
        let a = announced.to_be_bytes();
        let mut r = vec![
            0x16,
            0x03,
            0x01,
            (len >> 8) as u8,
            len as u8,
            kind,
            a[1],
            a[2],
            a[3],
        ];
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn a_clienthello_announced_past_the_bound_is_refused_however_it_is_cut() {
        let table: [(&str, Vec<u8>, bool); 5] = [
            ("a real size", hello_record(1, 1800, &[0; 32]), true),
            (
                "at the bound",
                hello_record(1, MAX_CLIENT_HELLO as u32, &[]),
                true,
            ),
            (
                "past it",
                hello_record(1, MAX_CLIENT_HELLO as u32 + 1, &[]),
                false,
            ),
            ("64 KiB", hello_record(1, 65_000, &[0; 100]), false),
            // Not a ClientHello, or not a handshake record: rustls judges those.
            ("another message", hello_record(2, 65_000, &[]), true),
        ];
        for (what, bytes, ok) in table {
            // Whole, byte by byte, and in records of one byte each.
            let mut whole = FirstHello::default();
            assert_eq!(whole.feed(&bytes).is_ok(), ok, "{what}: whole");
            let mut bytewise = FirstHello::default();
            let fed = bytes.iter().try_for_each(|b| bytewise.feed(&[*b]));
            assert_eq!(fed.is_ok(), ok, "{what}: byte by byte");
            let mut split = FirstHello::default();
            let records: Vec<u8> = bytes[5..]
                .iter()
                .flat_map(|b| [0x16, 0x03, 0x01, 0x00, 0x01, *b])
                .collect();
            assert_eq!(split.feed(&records).is_ok(), ok, "{what}: one-byte records");
        }
        let mut alert = FirstHello::default();
        assert!(alert
            .feed(&[0x15, 0x03, 0x03, 0xff, 0xff, 0x01, 0xff, 0xff, 0xff])
            .is_ok());
        assert!(
            alert.feed(&hello_record(1, 65_000, &[])).is_ok(),
            "judged once, at the start"
        );
    }

    /// An accepted connection has TCP_NODELAY without a setsockopt of its own: the
    /// listener's setting is inherited (the accept path relies on it).
    #[test]
    fn accepted_connections_inherit_nodelay() {
        let reactor = reactor();
        let listener =
            Listener::bind(&reactor, "127.0.0.1:0".parse().expect("addr"), 16, None).expect("bind");
        let clients: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(listener.local_addr()).expect("connect"))
            .collect();
        for client in &clients {
            // The handshake is complete (connect returned), so accept does not wait.
            let (stream, peer) = futures_lite::future::block_on(listener.accept()).expect("accept");
            assert!(stream.nodelay().expect("getsockopt"), "no TCP_NODELAY");
            assert_eq!(peer, client.local_addr().expect("local addr"));
        }
    }

    /// Runs `fut` on this thread with the reactor polling beside it.
    pub(crate) fn drive<T>(reactor: &Rc<Reactor>, fut: impl std::future::Future<Output = T>) -> T {
        let run = async {
            reactor.clone().run().await;
            unreachable!("the reactor runs until stopped")
        };
        futures_lite::future::block_on(futures_lite::future::or(fut, run))
    }

    /// A connect that succeeds is checked with one syscall; one that fails still
    /// reports the socket's own error (refused), not a generic "not connected".
    #[test]
    fn connect_reports_success_and_the_pending_error() {
        let reactor = reactor();
        let open = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = open.local_addr().expect("addr");
        let conn = drive(
            &reactor,
            TcpConn::connect(&reactor, addr, Duration::from_secs(10)),
        )
        .expect("connect");
        assert_eq!(conn.peer_addr().expect("peer"), addr);
        drop(conn);

        let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
        let gone = closed.local_addr().expect("addr");
        drop(closed);
        let err = drive(
            &reactor,
            TcpConn::connect(&reactor, gone, Duration::from_secs(10)),
        )
        .err()
        .expect("a closed port refuses");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }

    /// Descriptors in the reactor's epoll set (one `tfd:` line each in the kernel's
    /// description of the set), the wake-up eventfd included.
    fn in_epoll_set(reactor: &Reactor) -> usize {
        use std::os::fd::AsRawFd as _;
        let fd = reactor.as_fd().as_raw_fd();
        std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
            .expect("fdinfo")
            .lines()
            .filter(|l| l.starts_with("tfd:"))
            .count()
    }

    /// An accepted connection, already connected to `client`, served by `TcpConn`.
    pub(crate) fn accepted(reactor: &Rc<Reactor>) -> (TcpConn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (stream, _) = listener.accept().expect("accept");
        stream.set_nonblocking(true).expect("nonblocking");
        (TcpConn::new(reactor, stream).expect("conn"), client)
    }

    /// A connection whose request is already there is read, answered and closed
    /// without an `epoll_ctl`: it joins the epoll set only once a task has to wait.
    #[test]
    fn a_connection_served_without_waiting_never_joins_the_epoll_set() {
        let reactor = reactor();
        let before = in_epoll_set(&reactor);
        let (conn, mut client) = accepted(&reactor);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("send");
        let mut buf = [0u8; 64];
        // The loopback delivery is synchronous: the bytes are there.
        let n = drive(&reactor, conn.read(&mut buf)).expect("read");
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
        drive(&reactor, conn.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")).expect("write");
        assert_eq!(
            in_epoll_set(&reactor),
            before,
            "served without a wait, yet added"
        );

        // The next read has to wait: now the socket joins the set, once.
        conn.set_timeout(Duration::from_secs(10));
        client.write_all(b"x").expect("send");
        let mut one = [0u8; 1];
        let n = drive(&reactor, async {
            let mut total = 0;
            // The first read drains what is there; the second finds nothing and waits.
            total += conn.read(&mut one).await?;
            let late = async {
                reactor.sleep(Duration::from_millis(20)).await;
                let _ = (&client).write_all(b"y");
            };
            let (r, ()) = futures_lite::future::zip(conn.read(&mut one), late).await;
            total += r?;
            io::Result::Ok(total)
        })
        .expect("reads");
        assert_eq!(n, 2);
        assert_eq!(in_epoll_set(&reactor), before + 1);
        drop(conn);
        assert_eq!(in_epoll_set(&reactor), before, "closing leaves the set");
    }

    /// A task whose reads always find bytes still lets the core's other tasks run:
    /// after [`crate::reactor::READS_PER_POLL`] reads in one poll its read yields,
    /// whether it reads through `read`, `readable` or `discard`. Before, a relay fed
    /// faster than it could empty its source ran in one poll for as long as the feed
    /// lasted. Here the reader is polled first and the bytes are all there: without
    /// the turn it would make every read before the other task ran once.
    #[test]
    fn a_read_that_always_finds_bytes_still_lets_other_tasks_run() {
        use crate::reactor::READS_PER_POLL;
        let reactor = reactor();
        let (conn, mut client) = accepted(&reactor);
        conn.set_timeout(Duration::from_secs(10));
        client.write_all(&[b'x'; 64 * 1024]).expect("send");
        for way in ["read", "readable", "discard"] {
            let other_ran = Cell::new(false);
            let reader = async {
                let mut buf = [0u8; 16];
                for i in 0..(4 * READS_PER_POLL) {
                    let n = match way {
                        "read" => conn.read(&mut buf).await,
                        "discard" => conn.discard(&mut buf).await,
                        _ => conn.readable().await.and_then(|()| conn.try_read(&mut buf)),
                    }
                    .expect("read");
                    assert_eq!(n, buf.len(), "{way}: the bytes are all there");
                    if other_ran.get() {
                        return Some(i);
                    }
                }
                None
            };
            let other = async { other_ran.set(true) };
            let (first_seen, ()) = drive(&reactor, futures_lite::future::zip(reader, other));
            // (The count goes on from the way before: this thread's polls are
            // not a counted task's, which starts each poll afresh.)
            assert!(
                first_seen.is_some_and(|i| i <= READS_PER_POLL),
                "{way}: the reader did not let the other task run within its turn: {first_seen:?}"
            );
        }
    }

    /// A task's turn also ends after [`crate::reactor::BYTES_PER_POLL`] bytes, however
    /// few reads carried them: a relay reading full buffers does what its bytes ask
    /// (a flood of 7-byte WebSocket frames is 9,000 frames to inspect a read), and
    /// held the core for 64 of them. Enough connections to hold more than the bound
    /// each hold 48 KiB, all there before the task starts; the task, counted as
    /// every connection task is, reads them one after the other, fewer reads than
    /// [`READS_PER_POLL`]: the other task runs once the bound is read, not after
    /// all of them.
    #[test]
    fn a_turn_ends_after_its_bytes_however_few_reads_carried_them() {
        use crate::reactor::{counted, BYTES_PER_POLL, READS_PER_POLL};
        const EACH: usize = 48 * 1024;
        let reactor = reactor();
        let conns: Vec<(TcpConn, TcpStream)> = (0..BYTES_PER_POLL / EACH + 2)
            .map(|_| {
                let (conn, mut client) = accepted(&reactor);
                conn.set_timeout(Duration::from_secs(10));
                client.write_all(&[b'x'; EACH]).expect("send");
                (conn, client)
            })
            .collect();
        let total = conns.len() * EACH;
        assert!(total > BYTES_PER_POLL + EACH && conns.len() < READS_PER_POLL as usize);
        // Every byte is in the reader's socket before the task starts, so no read
        // waits: only the turn can let the other task in.
        let deadline = Instant::now() + Duration::from_secs(10);
        for (conn, _) in &conns {
            while rustix::io::ioctl_fionread(&conn.stream).expect("FIONREAD") < EACH as u64 {
                assert!(Instant::now() < deadline, "the loopback never delivered");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let other_ran = Cell::new(false);
        let reader = async {
            let mut buf = vec![0u8; 64 * 1024];
            let (mut read, mut reads) = (0usize, 0u32);
            for (conn, _) in &conns {
                let mut left = EACH;
                while left > 0 {
                    let n = conn.read(&mut buf[..left]).await.expect("read");
                    assert!(n > 0, "the bytes are all there");
                    if other_ran.get() {
                        return Some((read, reads));
                    }
                    left -= n;
                    read += n;
                    reads += 1;
                }
            }
            None
        };
        let other = async { other_ran.set(true) };
        let (first_seen, ()) = drive(&reactor, counted(futures_lite::future::zip(reader, other)));
        let Some((read, reads)) = first_seen else {
            panic!("the reader read all {total} bytes before the other task ran");
        };
        assert!(
            (BYTES_PER_POLL..BYTES_PER_POLL + EACH).contains(&read) && reads < READS_PER_POLL,
            "the other task ran after {read} bytes in {reads} reads"
        );
    }

    /// Readiness that arrives after a syscall said `EAGAIN` and before the socket
    /// joins the epoll set is not lost: adding it reports its current state. Both
    /// directions; a lost edge would leave the wait to its 10 s deadline instead.
    #[test]
    fn readiness_arriving_before_the_socket_joins_the_set_is_not_lost() {
        let reactor = reactor();
        let (conn, mut client) = accepted(&reactor);
        conn.set_timeout(Duration::from_secs(10));

        // Read: nothing there (EAGAIN), then the peer writes, then the task waits.
        let mut buf = [0u8; 16];
        assert_eq!(
            conn.try_read(&mut buf).expect_err("nothing yet").kind(),
            io::ErrorKind::WouldBlock
        );
        client.write_all(b"late").expect("send");
        let n = drive(&reactor, conn.read(&mut buf)).expect("the data that came before arming");
        assert_eq!(&buf[..n], b"late");

        // Write: fill the socket until it takes nothing, let the peer drain it all,
        // then wait to write.
        let (conn, client) = accepted(&reactor);
        conn.set_timeout(Duration::from_secs(10));
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0usize;
        loop {
            match conn.try_write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("write: {e}"),
            }
        }
        let mut client = client;
        let mut drained = 0usize;
        let mut sink = vec![0u8; 64 * 1024];
        while drained < sent {
            drained += client.read(&mut sink).expect("drain");
        }
        let n = drive(&reactor, conn.write(&chunk)).expect("the room that came before arming");
        assert!(n > 0);
    }

    /// A pooled connection no task ever waited on has no edges to go by: it counts
    /// as possibly having input, so the pool probes it and sees the peer's close.
    #[test]
    fn an_unwaited_connection_is_probed_before_reuse() {
        let reactor = reactor();
        let (conn, client) = accepted(&reactor);
        assert!(conn.has_pending_input(), "unknown counts as pending");
        assert!(conn.probe_idle(), "open and silent");
        // Loopback delivers the FIN within `close`.
        drop(client);
        assert!(conn.has_pending_input());
        assert!(!conn.probe_idle(), "the close is seen");
    }
}
