//! The control plane's HTTP server loop (the coordinator's API, the storage-proxy's
//! manager and client APIs): every wait bounded and the connection count capped, so
//! idle or slow clients cannot exhaust a service's descriptors.
//!
//! - a request head must arrive within `header_read_timeout_secs`: the first from
//!   the accept, each later one from its first byte ([`HeadTimer`]; hyper's own
//!   header timer, which would also run while a kept-alive connection waits for its
//!   next request, is set to the idle timeout);
//! - a connection on which no byte moves either way for `idle_timeout_secs` while no
//!   request is in flight is closed (a creation waiting for acknowledgements is never
//!   cut; its own waits are bounded): a kept-alive connection waits that long for
//!   its next request, as clients that keep connections idle for 15-60 s expect;
//! - at most `max_connections` connections, clamped below the process's descriptor
//!   limit with a reserve for the store, Redis and logs; beyond it new connections are
//!   closed at once, counted, and logged once per burst;
//! - the connections are shared fairly by client address ([`FairShare`]): once half
//!   are open, an address (IPv4, or an IPv6 /64) that holds
//!   its share ([`default_share`]: one in [`CONNECTION_SHARE`] of the cap, at
//!   least [`MIN_CONNECTION_SHARE`], unless the service sets it) gets no more, its new ones closed at once and counted
//!   (as refusals, and apart as the address share's), so that one client keeping
//!   connections alive cannot take every slot; while fewer than half are open,
//!   one address (an office behind one NAT) gets as many as it asks for;
//! - accept errors (descriptors exhausted) back off instead of spinning;
//! - the answers hyper makes itself to a head it cannot take (431 too large, 414,
//!   400 malformed: an empty body) are sent as the service's own JSON error
//!   ([`Limits::problem`]: `type`, `title`, `error`, `code`, `request_id`, and the
//!   coordinator's `error_code` and `msg`), with the request ID the service's own rule
//!   ([`Limits::ids`], the one its request-ID layer follows) gives the head: the
//!   valid one it carried, else one generated (the storage-proxy) or none (the
//!   coordinator). Only the bytes of a head are scanned for it, never a body. An
//!   answer is taken for hyper's own only while hyper can be writing nothing else:
//!   every response of the connection so far has ended and been flushed, and no
//!   request has been handed to the service since ([`Exchanges`]). A response body
//!   that happens to hold such bytes (a file in a vfolder) goes out untouched;
//! - a request whose framing is in doubt never reaches a handler
//!   ([`framing_refusal`]): `Content-Length` beside `Transfer-Encoding`, or
//!   `Transfer-Encoding` in an HTTP/1.0 request, or codings other than one `chunked`
//!   (400, or 501 for codings before a final `chunked`, which would be passed on
//!   undecoded), answered as the service's JSON error and the connection closed;
//!   so is an HTTP/1.1 request without `Host` or with two ([`host_fault`]).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use appproxy_shared::fair_share::{FairShare, Refused};
use appproxy_shared::header::{self, IdPolicy};
use appproxy_shared::IdVersion;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Limits of the API server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A request head must be complete within this.
    pub header_read: Duration,
    /// No byte either way for this long closes the connection.
    pub idle: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// The largest request head (request line and fields) buffered; a longer one is
    /// answered 431 and the connection closed.
    pub max_head: usize,
    /// The service's request-ID rule (what its `RequestIdLayer` is given), for the
    /// answers the server writes itself to a head it cannot take.
    pub ids: (IdPolicy, IdVersion),
    /// How the service's JSON errors are shaped, for those same answers.
    pub problem: Problem,
}

/// How a service shapes its JSON errors, so that the answers the server writes
/// itself to a head it cannot take look like the service's own: every error has
/// `type` (`type_base` and the code), `title`, `error`, `code` and `request_id`;
/// with `error_code_prefix`, also `error_code` (the prefix and the code, `-` as
/// `_`) and `msg`, as the coordinator's do.
#[derive(Debug, Clone, Copy)]
pub struct Problem {
    /// The `type` URL before the code.
    pub type_base: &'static str,
    /// The `error_code` before the code, when the service's errors carry one.
    pub error_code_prefix: Option<&'static str>,
}

impl Default for Problem {
    fn default() -> Self {
        Self {
            type_base: "https://api.backend.ai/probs/",
            error_code_prefix: None,
        }
    }
}

impl Problem {
    /// The JSON error for `code` with the text `text`. Every value is ASCII without
    /// quotes or backslashes (static texts, a request ID's charset), so none needs
    /// escaping.
    fn body(&self, text: &str, code: &str, id: Option<&str>) -> String {
        let id = id.map_or_else(|| "null".to_owned(), |i| format!("\"{i}\""));
        let coded = match self.error_code_prefix {
            Some(prefix) => format!(
                r#""error_code":"{prefix}{}","msg":"{text}","#,
                code.replace('-', "_")
            ),
            None => String::new(),
        };
        format!(
            r#"{{"type":"{}{code}","title":"{text}",{coded}"error":"{text}","code":"{code}","request_id":{id}}}"#,
            self.type_base
        )
    }
}

/// The head limit of APIs whose heads are small (a token, a request ID). hyper's
/// own default is ~400 KiB, which lets a caller without credentials make the server
/// hold that much per connection for the head timeout. (hyper refuses a head still
/// incomplete once this much is buffered; one read may take a complete head up to
/// twice it.)
pub const MAX_HEAD: usize = 64 << 10;

/// An address's share of the connection cap, unless the service sets one: one in
/// this many (512 of 4096), as the storage-proxy's archive slots, and never fewer
/// than [`MIN_CONNECTION_SHARE`].
pub const CONNECTION_SHARE: usize = 8;

/// The least share of the connection cap an address gets by default: a client
/// (a browser, a manager making calls in parallel) may need a few connections at
/// once, and a cap this small (tests, a tight descriptor limit) is shared by no
/// more than a few clients anyway.
pub const MIN_CONNECTION_SHARE: usize = 16;

/// An address's share of a connection cap of `max_connections` by default: one in
/// [`CONNECTION_SHARE`], at least [`MIN_CONNECTION_SHARE`].
pub fn default_share(max_connections: usize) -> usize {
    (max_connections / CONNECTION_SHARE).max(MIN_CONNECTION_SHARE)
}

impl Limits {
    /// The limits from a service's configured keys, each clamped to a sane range
    /// (`header_read` 1 s to 1 h, `idle` 1 s to 1 day); the connection cap is fitted
    /// below the descriptor limit for `listeners` listeners of this cap
    /// ([`fitted_cap`], a descriptor each). `section` names the config section in
    /// the warning. The head limit is [`MAX_HEAD`].
    pub fn from_config(
        section: &str,
        ids: (IdPolicy, IdVersion),
        header_read_secs: u64,
        idle_secs: u64,
        max_connections: usize,
        listeners: usize,
    ) -> Self {
        Self::from_config_fitted(
            section,
            ids,
            (header_read_secs, idle_secs),
            max_connections,
            (listeners, 1, 0),
        )
    }

    /// [`Limits::from_config`] with the cap fitted by [`fitted_cap`]: `fit` is
    /// (listeners, descriptors per connection, descriptors set aside for other
    /// work); `(header_read_secs, idle_secs)` as there.
    pub fn from_config_fitted(
        section: &str,
        ids: (IdPolicy, IdVersion),
        (header_read_secs, idle_secs): (u64, u64),
        max_connections: usize,
        (listeners, per_connection, set_aside): (usize, u64, u64),
    ) -> Self {
        Self {
            header_read: Duration::from_secs(header_read_secs.clamp(1, 3600)),
            idle: Duration::from_secs(idle_secs.clamp(1, 86_400)),
            max_connections: fitted_cap(
                max_connections.max(1),
                &format!("[{section}] max_connections"),
                listeners,
                per_connection,
                set_aside,
            ),
            max_head: MAX_HEAD,
            ids,
            problem: Problem::default(),
        }
    }
}

/// Descriptors kept back from the connection cap (store pool, Redis, logs, accept).
pub const FD_RESERVE: u64 = 128;

/// The soft `RLIMIT_NOFILE` of this process (`None`: unlimited).
pub fn descriptor_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// `configured` (the config key `key`), clamped so that `listeners` listeners with
/// that cap each fit below the descriptor limit, with [`FD_RESERVE`] kept back,
/// each connection holding up to `per_connection` descriptors (a socket, and the
/// file it reads or writes), beside `set_aside` descriptors other work may hold at
/// once (archives' open directories).
pub fn fitted_cap(
    configured: usize,
    key: &str,
    listeners: usize,
    per_connection: u64,
    set_aside: u64,
) -> usize {
    match descriptor_limit() {
        Some(limit) => {
            let room = (limit.saturating_sub(FD_RESERVE).saturating_sub(set_aside)
                / (listeners.max(1) as u64 * per_connection.max(1)))
            .max(16) as usize;
            if room < configured {
                tracing::warn!(
                    configured,
                    nofile = limit,
                    cap = room,
                    "{key} lowered to fit the descriptor limit (raise LimitNOFILE)"
                );
            }
            configured.min(room)
        }
        None => configured,
    }
}

/// When the request head being read began, for the head timeout: the first head's
/// at the accept, each later one's at its first byte (empty lines before a request
/// line count past [`BLANK_ALLOWANCE`]: a client sending only those is slow all the
/// same).
#[derive(Default)]
struct HeadTimer {
    /// Milliseconds since the accept.
    since: AtomicU64,
    /// A head is being read: begun, not yet ended.
    running: std::sync::atomic::AtomicBool,
    /// A head began: the connection's loop looks at the deadline again.
    began: tokio::sync::Notify,
}

impl HeadTimer {
    /// When the head being read is overdue, if one is being read.
    fn deadline(&self, epoch: Instant, limit: Duration) -> Option<Instant> {
        self.running
            .load(Ordering::Relaxed)
            .then(|| epoch + Duration::from_millis(self.since.load(Ordering::Relaxed)) + limit)
    }
}

/// Counts the bytes' last movement on a connection.
struct Tracked {
    inner: TcpStream,
    /// Milliseconds since `epoch` of the last byte read or written.
    last: Arc<AtomicU64>,
    epoch: Instant,
    /// The request-ID lines of the head being read (for hyper's own error answers).
    ids: IdLines,
    /// An answer written in place of one of hyper's, and how much of it went out.
    pending: Option<(Vec<u8>, usize)>,
    /// See [`Limits::ids`].
    ids_rule: (IdPolicy, IdVersion),
    /// See [`Limits::problem`].
    problem: Problem,
    /// The requests handed to the service and the responses that ended.
    exchanges: Arc<Exchanges>,
    /// The count of requests handed to the service at the last flush that found
    /// every response ended (`None`: the last flush did not); all bytes of those
    /// responses had been written by then.
    settled: Option<u64>,
    /// The head timer, and the count of heads begun it was last set for.
    head_timer: Arc<HeadTimer>,
    heads_timed: u64,
}

/// What the service did on one connection, counted where hyper calls it: the
/// requests it was handed and the response bodies hyper is done with (dropped).
#[derive(Default)]
struct Exchanges {
    handed: AtomicU64,
    ended: AtomicU64,
    /// A response switched protocols: what follows is a tunnel's bytes.
    upgraded: std::sync::atomic::AtomicBool,
    /// The request heads the scan has read whole and hyper has not yet handed to
    /// the service, in order.
    heads: std::sync::Mutex<Heads>,
}

/// The heads read ahead of the service, each with what the scan found in it: for
/// the first, hyper's own error answer if it cannot take it, and for each, when it
/// is handed, whether it had a `Content-Length` line (hyper drops `Content-Length`
/// from a head that also has `Transfer-Encoding`, so the handler cannot see the
/// pair; the head's bytes can).
#[derive(Default)]
struct Heads {
    queue: std::collections::VecDeque<Head>,
    /// The heads read past the first [`HEADS_AHEAD`], in order behind `queue`: what
    /// was found in each but its request ID (one byte a head), at most
    /// [`CODES_AHEAD`].
    codes: std::collections::VecDeque<u8>,
    /// hyper handed a request the scan had not read whole (the two no longer agree
    /// on where heads start): every head from now on is unseen.
    lost: bool,
}

/// What the scan found in one request head.
#[derive(Clone, Copy)]
struct Head {
    /// [`HEAD_LENGTH`], [`HEAD_NO_LENGTH`], [`HEAD_BARE_LF`] or
    /// [`HEAD_LENGTH_UNREAD`].
    length: u8,
    /// Its request-ID lines, as [`header::extract`] reads them.
    id: header::Extracted,
}

/// The most heads read ahead of the service that the scan keeps whole, request IDs
/// included; past them (a client pipelining requests by the dozen) it keeps their
/// framing findings only ([`CODES_AHEAD`]).
const HEADS_AHEAD: usize = 16;

/// The most heads past [`HEADS_AHEAD`] whose framing findings the scan keeps (a
/// byte each): past them it falls out of step. Before, it did so past 16, and a
/// head with a bare LF behind 16 pipelined ones was served unjudged.
const CODES_AHEAD: usize = 4096;

impl Exchanges {
    fn heads(&self) -> std::sync::MutexGuard<'_, Heads> {
        self.heads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a head the scan read whole (its findings alone once [`HEADS_AHEAD`]
    /// are queued, behind them in order); `false` when the scan is to fall out of
    /// step instead (too many ahead, or hyper and the scan no longer agree).
    fn read_ahead(&self, head: Head) -> bool {
        let mut heads = self.heads();
        if heads.lost {
            return false;
        }
        if heads.codes.is_empty() && heads.queue.len() < HEADS_AHEAD {
            heads.queue.push_back(head);
        } else if heads.codes.len() < CODES_AHEAD {
            heads.codes.push_back(head.length);
        } else {
            return false;
        }
        true
    }

    /// What the scan found in the head hyper hands to the service now.
    fn handed_head(&self) -> u8 {
        let mut heads = self.heads();
        if !heads.lost {
            if let Some(head) = heads.queue.pop_front() {
                return head.length;
            }
            if let Some(code) = heads.codes.pop_front() {
                return code;
            }
        }
        heads.lost = true;
        heads.queue.clear();
        heads.codes.clear();
        HEAD_UNSEEN
    }

    /// The request-ID lines of the first head read whole and not yet handed (none
    /// kept for one past [`HEADS_AHEAD`]).
    fn next_head_id(&self) -> Option<header::Extracted> {
        let heads = self.heads();
        match heads.queue.front() {
            Some(head) => Some(head.id),
            None if !heads.codes.is_empty() => Some(header::Extracted::Absent),
            None => None,
        }
    }
}

/// What the scan found in the head of the request a handler is given
/// ([`HEAD_LENGTH`], [`HEAD_NO_LENGTH`], [`HEAD_UNSEEN`], [`HEAD_BARE_LF`] or
/// [`HEAD_LENGTH_UNREAD`]), for [`framing_fault`].
#[derive(Clone, Copy)]
struct HeadLength(u8);

/// The head scanned had a `Content-Length` line.
const HEAD_LENGTH: u8 = 1;
/// The head scanned had none.
const HEAD_NO_LENGTH: u8 = 0;
/// The head was not delimited by the scan: it came after a body whose end the scan
/// could not find, or too far ahead of the service.
const HEAD_UNSEEN: u8 = 2;
/// A line of the head scanned ended in a bare LF ([`framing_fault`]).
const HEAD_BARE_LF: u8 = 3;
/// The head scanned had a `Content-Length` line too long for the scan to read
/// ([`FRAMING_LINE_MAX`]).
const HEAD_LENGTH_UNREAD: u8 = 4;

impl Tracked {
    fn new(
        inner: TcpStream,
        last: Arc<AtomicU64>,
        epoch: Instant,
        (ids_rule, problem): ((IdPolicy, IdVersion), Problem),
        exchanges: Arc<Exchanges>,
        head_timer: Arc<HeadTimer>,
    ) -> Self {
        head_timer.running.store(true, Ordering::Relaxed);
        Self {
            inner,
            last,
            epoch,
            ids: IdLines::new(exchanges.clone()),
            pending: None,
            ids_rule,
            problem,
            exchanges,
            settled: Some(0),
            head_timer,
            heads_timed: 0,
        }
    }

    /// Sets the head timer after a scan: a head begun since runs from now (the
    /// first from the accept), one ended stops it.
    fn time_heads(&mut self) {
        let begun = self.ids.heads_begun;
        if begun != self.heads_timed {
            if self.heads_timed > 0 {
                self.head_timer
                    .since
                    .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            self.heads_timed = begun;
        }
        // The first head runs from the accept until it ends, empty lines or not.
        let running = self.ids.head_open || begun == 0;
        let was = self.head_timer.running.swap(running, Ordering::Relaxed);
        if running && !was {
            self.head_timer.began.notify_one();
        }
    }

    /// Whether what hyper writes now can only be its own answer to a head it could
    /// not take: hyper writes that only when the connection's responses are all
    /// written, and any other write would belong to a request handed to the service.
    /// Once every response has ended and a flush has followed, with nothing handed
    /// since, hyper has nothing else to write.
    fn only_hyper_writes(&self) -> bool {
        let handed = self.exchanges.handed.load(Ordering::SeqCst);
        !self.exchanges.upgraded.load(Ordering::SeqCst)
            && self.exchanges.ended.load(Ordering::SeqCst) == handed
            && self.settled == Some(handed)
    }

    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Writes what is left of a replaced answer.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while let Some((answer, at)) = &mut self.pending {
            match Pin::new(&mut self.inner).poll_write(cx, &answer[*at..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => {
                    *at += n;
                    if *at >= answer.len() {
                        self.pending = None;
                    }
                    self.touch();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The request-ID header lines of each request head: a short line at a time is
/// kept (an ID line is short), so this costs a scan of the head's bytes and a few
/// hundred bytes per connection (with [`HEADS_AHEAD`] findings at most, and a byte
/// for each of at most [`CODES_AHEAD`] heads read past them). A body is
/// not scanned: one of a known length is passed over.
///
/// The scan also notes whether each head has a `Content-Length` line, for
/// [`framing_fault`], and queues what it found per head ([`Heads`]), in the order
/// hyper hands the requests on, whether they come one at a time, pipelined, or
/// after an interim `100 Continue`. It knows where a head starts only while it can
/// follow the requests' boundaries (bodies of a known length, chunked bodies as
/// hyper's decoder reads them: [`Chunked`]): past framing hyper would refuse, a
/// length line it cannot read or [`HEADS_AHEAD`], it is out of step for the rest
/// of the connection, and says so ([`HEAD_UNSEEN`]: every request is then refused,
/// and its connection closed). Out of step, heads are still scanned for their request IDs
/// from each answer on, as far as their end.
struct IdLines {
    /// The current line, while it is short enough to be an ID line.
    line: Vec<u8>,
    /// The current line is too long to be one.
    skipping: bool,
    /// Request-ID lines found (name, value), a few at most.
    found: Vec<(Vec<u8>, Vec<u8>)>,
    /// A head is being read (not yet its empty line), or awaited: in step, once
    /// the last one's body has been passed over; out of step, once an answer went
    /// out.
    in_head: bool,
    /// The head being read has a line (its request line): empty lines before one
    /// are skipped, as the parser skips them, not taken for the head's end.
    started: bool,
    /// The head being read: whether it has a `Content-Length` line, and its value
    /// (`None`: not a plain number), and whether it has `Transfer-Encoding`.
    length_line: Option<Option<u64>>,
    coded: bool,
    /// A line of the head being read (an empty one before its request line too)
    /// ended in a bare LF.
    bare_lf: bool,
    /// The head being read has a `Content-Length` line too long to read.
    length_unread: bool,
    /// The last head byte scanned: the one before an LF that starts a read.
    last: u8,
    /// The last head's body still to come.
    body: Body,
    /// The scan no longer knows where heads start.
    out_of_step: bool,
    /// A head's first byte has been read and not yet its end (empty lines before
    /// its request line count past [`BLANK_ALLOWANCE`]).
    head_open: bool,
    /// CR and LF bytes read before the head being awaited.
    blank_before: usize,
    /// Heads whose first byte has been read.
    heads_begun: u64,
    /// Where each head's `Content-Length` finding goes.
    exchanges: Arc<Exchanges>,
}

/// What is left of a head's body, as the scan sees it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Body {
    /// This many bytes.
    Known(u64),
    /// A chunked body, followed as hyper's decoder reads it.
    Chunked(Chunked),
    /// An end the scan cannot find (a length it could not read, chunked framing
    /// hyper's decoder would read otherwise or refuse).
    Unknown,
}

/// Where in a chunked body the scan is: the states of hyper's decoder
/// (`proto/h1/decode.rs`), byte for byte, so that the scan ends the body where
/// hyper does. Whatever hyper would refuse puts the scan out of step (hyper then
/// closes the connection anyway).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Chunked {
    /// The first hex digit of a size.
    Start,
    /// More hex digits of `size`.
    Size(u64),
    /// White space after the size.
    SizeLws(u64),
    /// A chunk extension, to its CR.
    Extension(u64),
    /// The LF of a size line.
    SizeLf(u64),
    /// This many bytes of chunk data.
    Data(u64),
    /// The CRLF after chunk data.
    DataCr,
    DataLf,
    /// A trailer line, to its CR (anything else, LF included, is part of it).
    Trailer,
    TrailerLf,
    /// The CRLF that ends the body, or the first byte of a trailer.
    EndCr,
    EndLf,
}

impl Chunked {
    /// The state after `bytes` (data bytes are passed over whole), and how many of
    /// them it took: `Ok(None)` when the body ended there, `Err` when hyper's
    /// decoder would refuse them.
    fn step(mut self, bytes: &[u8]) -> Result<(Option<Self>, usize), ()> {
        let hex = |b: u8| (b as char).to_digit(16).map(u64::from);
        let mut at = 0;
        while at < bytes.len() {
            let b = bytes[at];
            if let Chunked::Data(left) = self {
                let taken = (bytes.len() - at).min(usize::try_from(left).unwrap_or(usize::MAX));
                at += taken;
                let left = left - taken as u64;
                self = if left == 0 {
                    Chunked::DataCr
                } else {
                    Chunked::Data(left)
                };
                continue;
            }
            at += 1;
            self = match (self, b) {
                (Chunked::Start, b) => Chunked::Size(hex(b).ok_or(())?),
                (Chunked::Size(n), b) if hex(b).is_some() => Chunked::Size(
                    n.checked_mul(16)
                        .and_then(|n| n.checked_add(hex(b).unwrap_or(0)))
                        .ok_or(())?,
                ),
                (Chunked::Size(n) | Chunked::SizeLws(n), b'\t' | b' ') => Chunked::SizeLws(n),
                (Chunked::Size(n) | Chunked::SizeLws(n), b';') => Chunked::Extension(n),
                (Chunked::Size(n) | Chunked::SizeLws(n) | Chunked::Extension(n), b'\r') => {
                    Chunked::SizeLf(n)
                }
                (Chunked::Extension(_), b'\n') => return Err(()),
                (Chunked::Extension(n), _) => Chunked::Extension(n),
                (Chunked::SizeLf(0), b'\n') => Chunked::EndCr,
                (Chunked::SizeLf(n), b'\n') => Chunked::Data(n),
                (Chunked::DataCr, b'\r') => Chunked::DataLf,
                (Chunked::DataLf, b'\n') => Chunked::Start,
                (Chunked::Trailer, b'\r') => Chunked::TrailerLf,
                (Chunked::Trailer, _) => Chunked::Trailer,
                (Chunked::TrailerLf, b'\n') => Chunked::EndCr,
                (Chunked::EndCr, b'\r') => Chunked::EndLf,
                (Chunked::EndCr, _) => Chunked::Trailer,
                (Chunked::EndLf, b'\n') => return Ok((None, at)),
                _ => return Err(()),
            };
        }
        Ok((Some(self), at))
    }
}

impl IdLines {
    fn new(exchanges: Arc<Exchanges>) -> Self {
        Self {
            line: Vec::new(),
            skipping: false,
            found: Vec::new(),
            in_head: true,
            started: false,
            length_line: None,
            coded: false,
            bare_lf: false,
            length_unread: false,
            last: 0,
            body: Body::Known(0),
            out_of_step: false,
            head_open: false,
            blank_before: 0,
            heads_begun: 0,
            exchanges,
        }
    }
}

/// The empty-line bytes (CR, LF) before a request line that do not yet start its
/// head's timer: the extra CRLF after a body, twice.
const BLANK_ALLOWANCE: usize = 4;

/// The longest line that can be a request-ID line (name, `: `, 128-byte value).
const ID_LINE_MAX: usize = 200;

/// The framing fields' names as a head line starts with them.
const CONTENT_LENGTH: &[u8] = b"content-length:";
const TRANSFER_ENCODING: &[u8] = b"transfer-encoding:";

/// What follows `name` (`content-length:`, say, in any case) when `line` starts
/// with it.
fn field_value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let (start, value) = line.split_at_checked(name.len())?;
    start.eq_ignore_ascii_case(name).then_some(value)
}

/// The longest `Content-Length` or `Transfer-Encoding` line whose value the scan
/// reads (white space may pad it): past it, the body's end is unknown to the scan,
/// which then falls out of step for the connection.
const FRAMING_LINE_MAX: usize = 8 << 10;

impl IdLines {
    fn scan(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            if self.out_of_step {
                // Heads are still scanned for their request IDs from each answer on,
                // as far as their end; their framing is not known.
                if self.in_head {
                    self.scan_head(rest);
                }
                return;
            }
            if self.in_head {
                rest = self.scan_head(rest);
                continue;
            }
            match self.body {
                // The last head's body, passed over; the next head follows it (empty
                // lines before its request line, such as the extra CRLF some clients
                // send after a POST, are skipped as the parser skips them).
                Body::Known(left) => {
                    let taken = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    rest = &rest[taken..];
                    self.body = Body::Known(left - taken as u64);
                    self.in_head = left == taken as u64;
                }
                Body::Chunked(state) => match state.step(rest) {
                    Ok((Some(state), _)) => {
                        self.body = Body::Chunked(state);
                        return;
                    }
                    Ok((None, taken)) => {
                        rest = &rest[taken..];
                        self.body = Body::Known(0);
                        self.in_head = true;
                    }
                    Err(()) => self.body = Body::Unknown,
                },
                // Bytes past a body whose end is unknown: what was found for the
                // heads before stands; those after are unseen.
                Body::Unknown => self.out_of_step = true,
            }
        }
    }

    /// Scans head bytes up to the head's end; returns what follows it.
    fn scan_head<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        if !self.head_open {
            // The CRLF some clients send after a body does not start the next head's
            // timer; a client sending nothing but empty lines is timed all the same.
            let blank = bytes
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
            self.blank_before += blank;
            if blank < bytes.len() || self.blank_before > BLANK_ALLOWANCE {
                self.head_open = true;
                self.heads_begun += 1;
            }
        }
        let mut rest = bytes;
        while !rest.is_empty() {
            let cut = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |i| i + 1);
            let (part, after) = rest.split_at(cut);
            rest = after;
            let ends = part.last() == Some(&b'\n');
            if ends {
                let before = part.len().checked_sub(2).map_or(self.last, |i| part[i]);
                self.bare_lf |= before != b'\r';
            }
            self.last = part.last().copied().unwrap_or(self.last);
            if !self.skipping {
                let long = self.line.len() + part.len();
                if long > ID_LINE_MAX + 2
                    && !(long <= FRAMING_LINE_MAX && self.framing_line_starts(part))
                {
                    // Too long for an ID line; a framing line padded past even
                    // `FRAMING_LINE_MAX` is still known by its start (its value is
                    // not read: its body's end is then unknown).
                    self.line.extend_from_slice(&part[..part.len().min(32)]);
                    self.note_framing(false);
                    self.skipping = true;
                    self.started = true;
                    self.line.clear();
                } else {
                    self.line.extend_from_slice(part);
                }
            }
            if ends {
                if !self.skipping {
                    if self.line.trim_ascii().is_empty() {
                        if self.started {
                            self.head_ended();
                            return rest;
                        }
                        // An empty line before the request line (RFC 9112 §2.2).
                        self.line.clear();
                        continue;
                    }
                    self.started = true;
                    self.note_framing(true);
                    self.take_line();
                }
                self.line.clear();
                self.skipping = false;
            }
        }
        rest
    }

    /// The head's end: in step, what was found queued for when hyper hands it on,
    /// and its body to be passed over.
    fn head_ended(&mut self) {
        self.line.clear();
        self.in_head = false;
        self.started = false;
        self.head_open = false;
        self.blank_before = 0;
        if !self.out_of_step {
            let head = Head {
                length: if self.bare_lf {
                    HEAD_BARE_LF
                } else if self.length_unread {
                    HEAD_LENGTH_UNREAD
                } else if self.length_line.is_some() {
                    HEAD_LENGTH
                } else {
                    HEAD_NO_LENGTH
                },
                id: self.extracted(),
            };
            self.found.clear();
            self.out_of_step = !self.exchanges.read_ahead(head);
            self.body = match (self.coded, self.length_line) {
                (false, None) => Body::Known(0),
                (false, Some(Some(n))) => Body::Known(n),
                // Codings other than one final `chunked`, or a length beside them,
                // are refused before a handler sees them, the connection closed.
                (true, None) => Body::Chunked(Chunked::Start),
                _ => Body::Unknown,
            };
            // A head without a body: the next one starts at once.
            self.in_head = self.body == Body::Known(0);
        }
        self.length_line = None;
        self.coded = false;
        self.bare_lf = false;
        self.length_unread = false;
        self.last = 0;
    }

    /// Whether the line being read, `part` added, starts with a framing field's
    /// name: such a line is kept whole, padded or not, for its value.
    fn framing_line_starts(&self, part: &[u8]) -> bool {
        let mut start = [0u8; TRANSFER_ENCODING.len()];
        let mut len = 0;
        for (to, from) in start.iter_mut().zip(self.line.iter().chain(part)) {
            *to = *from;
            len += 1;
        }
        [CONTENT_LENGTH, TRANSFER_ENCODING]
            .iter()
            .any(|name| field_value(&start[..len], name).is_some())
    }

    /// Notes a `Content-Length` or `Transfer-Encoding` line (the line kept so far
    /// starts with its name; `whole`: the line is all there, its value readable).
    fn note_framing(&mut self, whole: bool) {
        if let Some(value) = field_value(&self.line, CONTENT_LENGTH) {
            let value = value.trim_ascii();
            let n = (whole && !value.is_empty() && value.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(value).ok()?.parse().ok())
                .flatten();
            // A length line too long to read: hyper frames the body by it, the
            // scan cannot follow.
            self.length_unread |= !whole;
            // A second line with another value makes hyper refuse the head.
            self.length_line = Some(self.length_line.unwrap_or(n));
        } else if field_value(&self.line, TRANSFER_ENCODING).is_some() {
            self.coded = true;
        }
    }

    fn take_line(&mut self) {
        let line = self.line.trim_ascii_end();
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if self.found.len() < 8 && appproxy_shared::header::header_rank(name).is_some() {
            self.found
                .push((name.to_vec(), value.trim_ascii().to_vec()));
        }
    }

    /// Another answer went out. Out of step, the next head is taken to start now,
    /// and is read afresh for its request ID; in step, the scan knows where it
    /// starts.
    fn answered(&mut self) {
        if !self.out_of_step {
            return;
        }
        self.found.clear();
        self.line.clear();
        self.skipping = false;
        self.in_head = true;
        self.started = false;
        self.length_line = None;
        self.coded = false;
        // Bytes read ahead of this answer (a pipelined head, maybe partial) were
        // not scanned: the next head is timed from now, until the scan sees one end.
        if !self.head_open {
            self.head_open = true;
            self.heads_begun += 1;
        }
    }

    /// What the lines found in the head being read say of the request ID.
    fn extracted(&self) -> header::Extracted {
        header::extract(self.found.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
    }

    /// What the request ID is of the first head hyper has not yet handed on (the
    /// one its own error answer would be for).
    fn next_id(&self) -> header::Extracted {
        self.exchanges
            .next_head_id()
            .unwrap_or_else(|| self.extracted())
    }
}

/// The access line of a head hyper refused (`answer`, the product's JSON error sent
/// in its place), under the ID the answer names: the middleware never saw the
/// request, so without it the ID echoed to the client found nothing in the log.
/// Method and path are `-` (the head was not taken); `bytes` is the error's body.
fn log_refused_head(id: Option<appproxy_shared::RequestId>, answer: &[u8]) {
    let status = answer
        .get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(400);
    let bytes = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |end| answer.len() - end - 4);
    appproxy_shared::with_request_id(id, || {
        tracing::info!(
            target: "access",
            method = "-",
            path = "-",
            status,
            bytes,
            head_us = 0u64,
            duration_us = 0u64,
            complete = true,
            "request"
        )
    });
}

/// hyper's own answer to a head it could not take — its status line, then exactly
/// `connection: close`, `content-length: 0` and `date` — rewritten as the product's
/// JSON error, keeping the status and the date. `None` for any other bytes.
fn json_for_hyper_error(
    data: &[u8],
    id: Option<appproxy_shared::RequestId>,
    problem: &Problem,
) -> Option<Vec<u8>> {
    let head = data.strip_suffix(b"\r\n\r\n")?;
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let status = lines.next()?.strip_prefix("HTTP/1.1 ")?;
    let (error, code) = match status.get(..3)? {
        "431" => (
            "Request header fields too large",
            "request-header-fields-too-large",
        ),
        "414" => ("Request URI too long", "uri-too-long"),
        "400" => ("Malformed request head", "bad-request"),
        _ => return None,
    };
    let mut date = None;
    let mut others = 0;
    for line in lines {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("date: ") {
            // hyper's date is printable ASCII; anything else is not its answer.
            date = line.get("date: ".len()..);
            if !date.is_some_and(|d| d.bytes().all(|b| (b' '..=b'~').contains(&b))) {
                return None;
            }
        } else if lower != "connection: close" && lower != "content-length: 0" {
            return None;
        } else {
            others += 1;
        }
    }
    if others != 2 {
        return None;
    }
    let body = problem.body(error, code, id.as_ref().map(|i| i.as_str()));
    let mut out =
        format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n");
    if let Some(id) = &id {
        out.push_str(&format!(
            "{}: {id}\r\n",
            appproxy_shared::PRIMARY_HEADER.to_ascii_lowercase()
        ));
    }
    if let Some(date) = date {
        out.push_str(&format!("date: {date}\r\n"));
    }
    out.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    Some(out.into_bytes())
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
            let this = &mut *self;
            // A tunnel's bytes are no requests.
            if !this.exchanges.upgraded.load(Ordering::SeqCst) {
                this.ids.scan(&buf.filled()[before..]);
                this.time_heads();
            } else {
                this.head_timer.running.store(false, Ordering::Relaxed);
            }
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if let Poll::Ready(Err(e)) = this.drain(cx) {
            return Poll::Ready(Err(e));
        }
        if this.pending.is_some() {
            return Poll::Pending;
        }
        // hyper writes its own error answer whole, in one buffer; it is taken here
        // and the product's JSON error sent in its place. Bytes of a response (a
        // body chunk of the same shape) are never taken for it.
        if data.starts_with(b"HTTP/1.1 4") && data.len() < 512 && this.only_hyper_writes() {
            let (policy, version) = this.ids_rule;
            let id = header::resolve(policy, this.ids.next_id(), version).0;
            if let Some(answer) = json_for_hyper_error(data, id, &this.problem) {
                log_refused_head(id, &answer);
                this.pending = Some((answer, 0));
                this.ids.answered();
                if let Poll::Ready(Err(e)) = this.drain(cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(data.len()));
            }
        }
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
            // An interim `100 Continue` is no answer: the body follows it.
            if !data.starts_with(b"HTTP/1.1 1") {
                this.ids.answered();
                this.time_heads();
            }
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // hyper flushes once its buffer is written out: whatever the responses that
        // have ended wrote is all in by now.
        let handed = self.exchanges.handed.load(Ordering::SeqCst);
        let ended = self.exchanges.ended.load(Ordering::SeqCst);
        self.settled = (ended == handed).then_some(handed);
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The connection's service, counting into [`Exchanges`] each request handed to it
/// (before anything of its response exists) and each response body hyper is done
/// with.
struct Counted<S> {
    inner: S,
    exchanges: Arc<Exchanges>,
}

impl<S, B> hyper::service::Service<hyper::Request<hyper::body::Incoming>> for Counted<S>
where
    S: hyper::service::Service<
        hyper::Request<hyper::body::Incoming>,
        Response = hyper::Response<B>,
    >,
    S::Future: Send + 'static,
    B: hyper::body::Body,
{
    type Response = hyper::Response<EndCounted<B>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, mut req: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        self.exchanges.handed.fetch_add(1, Ordering::SeqCst);
        req.extensions_mut()
            .insert(HeadLength(self.exchanges.handed_head()));
        let http10_body =
            req.version() == hyper::Version::HTTP_10 && req.method() != hyper::Method::HEAD;
        let answered = self.inner.call(req);
        let exchanges = self.exchanges.clone();
        Box::pin(async move {
            let mut response = answered.await?;
            if response.status() == hyper::StatusCode::SWITCHING_PROTOCOLS {
                exchanges.upgraded.store(true, Ordering::SeqCst);
            }
            // A streamed body (no length known before it is sent) can reach an
            // HTTP/1.0 client only by closing the connection after it; hyper then
            // closes it, but to a client that asked to keep it, still adds
            // `keep-alive` to an HTTP/1.1 response (its `fix_keep_alive`), and the
            // client waits for more on a connection about to end. Answered as
            // HTTP/1.0, which it is anyway on the wire, hyper lets the connection
            // go; `close` says so.
            let status = response.status();
            if http10_body
                && response.body().size_hint().exact().is_none()
                && !response
                    .headers()
                    .contains_key(hyper::header::CONTENT_LENGTH)
                && !(status.is_informational()
                    || status == hyper::StatusCode::NO_CONTENT
                    || status == hyper::StatusCode::NOT_MODIFIED)
            {
                *response.version_mut() = hyper::Version::HTTP_10;
                response.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            Ok(response.map(|body| EndCounted {
                body,
                exchanges: Some(exchanges),
            }))
        })
    }
}

/// A response body that counts itself ended when hyper drops it (it has been read
/// to its end, or the exchange failed).
pub struct EndCounted<B> {
    body: B,
    exchanges: Option<Arc<Exchanges>>,
}

impl<B> Drop for EndCounted<B> {
    fn drop(&mut self) {
        if let Some(exchanges) = self.exchanges.take() {
            exchanges.ended.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for EndCounted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// One request in flight on a connection, however its handler ends.
struct Busy(Arc<AtomicU64>);

impl Busy {
    fn enter(counter: Arc<AtomicU64>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counters of the server, for `/metrics`.
#[derive(Default)]
pub struct ServerMetrics {
    /// Connections closed at once because the cap was reached, or the address's
    /// share of it (those also counted in `refused_address_share`).
    pub refused: AtomicU64,
    /// Connections closed at once because their address held its share of the cap
    /// while half of it or more was taken (also counted in `refused`).
    pub refused_address_share: AtomicU64,
    /// Connections closed for idleness or a slow head.
    pub timed_out: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
}

/// Serves `router` on `listener` until `shutdown` resolves; then stops accepting and
/// gives open connections up to 5 s to finish. An address's share of the connection
/// cap is [`default_share`]'s.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: Limits,
    metrics: Arc<ServerMetrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let per_address = default_share(limits.max_connections);
    serve_shared(listener, router, (limits, per_address), metrics, shutdown).await
}

/// [`serve`], an address's share of the connection cap `per_address` (once half
/// of `limits.max_connections` are open, an address holding that many gets no
/// more; the cap or more: no share).
pub async fn serve_shared(
    listener: tokio::net::TcpListener,
    router: Router,
    (limits, per_address): (Limits, usize),
    metrics: Arc<ServerMetrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let per_address = per_address.max(1);
    let cap = FairShare::new(limits.max_connections.max(1), per_address);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    let local = listener.local_addr().ok();
    let mut last_refusal_log: Option<Instant> = None;
    let mut last_share_log: Option<Instant> = None;
    let mut last_accept_error_log: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
            // Reap finished connection tasks as they end.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors (EMFILE/ENFILE) or memory: back off, do not spin.
                if last_accept_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    tracing::error!(error = %e, "accept failed; backing off");
                    last_accept_error_log = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let permit = match cap.take(peer.ip()) {
            Ok(permit) => permit,
            Err(why) => {
                metrics.refused.fetch_add(1, Ordering::Relaxed);
                let quiet = |last: &mut Option<Instant>| {
                    let due = last.is_none_or(|t| t.elapsed() > Duration::from_secs(5));
                    if due {
                        *last = Some(Instant::now());
                    }
                    !due
                };
                match why {
                    Refused::Full => {
                        if !quiet(&mut last_refusal_log) {
                            tracing::warn!(
                                listener = ?local,
                                cap = limits.max_connections,
                                "connection cap reached: new connections are closed"
                            );
                        }
                    }
                    Refused::AddressShare => {
                        metrics
                            .refused_address_share
                            .fetch_add(1, Ordering::Relaxed);
                        if !quiet(&mut last_share_log) {
                            tracing::warn!(
                                listener = ?local,
                                peer = %peer.ip(),
                                cap = limits.max_connections,
                                per_address,
                                "an address holds its share of the connections while half the cap or more is taken: its new connections are closed"
                            );
                        }
                    }
                }
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let limits = limits.clone();
        let metrics = metrics.clone();
        let mut stop = stop_rx.clone();
        connections.spawn(async move {
            let _permit = permit;
            metrics.open.fetch_add(1, Ordering::Relaxed);
            let epoch = Instant::now();
            let last = Arc::new(AtomicU64::new(0));
            let exchanges = Arc::new(Exchanges::default());
            let head_timer = Arc::new(HeadTimer::default());
            let io = TokioIo::new(Tracked::new(
                stream,
                last.clone(),
                epoch,
                (limits.ids, limits.problem),
                exchanges.clone(),
                head_timer.clone(),
            ));
            // Requests in flight on this connection: the idle timer never cuts one.
            let busy = Arc::new(AtomicU64::new(0));
            let in_flight = busy.clone();
            let (ids, problem) = (limits.ids, limits.problem);
            let routed = hyper_util::service::TowerToHyperService::new(router.layer(
                axum::middleware::from_fn(
                    move |mut req: axum::extract::Request, next: axum::middleware::Next| {
                        let in_flight = in_flight.clone();
                        req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                        let refused = framing_refusal(&req, ids, &problem);
                        async move {
                            if let Some(refusal) = refused {
                                return refusal;
                            }
                            let _busy = Busy::enter(in_flight);
                            next.run(req).await
                        }
                    },
                ),
            ));
            let answering = exchanges.clone();
            let service = Counted {
                inner: routed,
                exchanges,
            };
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                // The head timeout is the loop's (`HeadTimer`); hyper's would run
                // between requests too.
                .header_read_timeout(limits.idle.max(limits.header_read))
                .max_buf_size(limits.max_head.max(8192))
                .keep_alive(true);
            let conn = builder.serve_connection(io, service).with_upgrades();
            tokio::pin!(conn);
            let idle = limits.idle;
            let mut stopping = false;
            loop {
                let since = Duration::from_millis(last.load(Ordering::Relaxed));
                let idle_for = epoch.elapsed().saturating_sub(since);
                let mut wake_in = idle.saturating_sub(idle_for);
                // A head being read while no request is in flight and every
                // response has ended (hyper reads the next head only then) is due
                // within the head timeout; while one is, the loop looks again every
                // head timeout.
                let head_due = head_timer.deadline(epoch, limits.header_read);
                let answering_now = busy.load(Ordering::Relaxed) > 0
                    || answering.ended.load(Ordering::SeqCst)
                        < answering.handed.load(Ordering::SeqCst);
                if head_due.is_some() && answering_now {
                    wake_in = wake_in.min(limits.header_read);
                }
                if let Some(due) = head_due.filter(|_| !answering_now) {
                    let now = Instant::now();
                    if due <= now {
                        metrics.timed_out.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "request head not received in time");
                        break;
                    }
                    wake_in = wake_in.min(due - now);
                }
                tokio::select! {
                    () = head_timer.began.notified() => {}
                    served = conn.as_mut() => {
                        // hyper's header timer ends a slow head with a timeout error.
                        if served.is_err_and(|e| e.is_timeout()) {
                            metrics.timed_out.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%peer, "request head not received in time");
                        }
                        break;
                    }
                    _ = tokio::time::sleep(wake_in) => {
                        let since = Duration::from_millis(last.load(Ordering::Relaxed));
                        let working = busy.load(Ordering::Relaxed) > 0;
                        if working {
                            // Re-armed from now: a request's own waits are bounded.
                            last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                        } else if epoch.elapsed().saturating_sub(since) >= idle {
                            metrics.timed_out.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%peer, "idle connection closed");
                            break;
                        }
                    }
                    changed = stop.changed(), if !stopping => {
                        stopping = true;
                        if changed.is_ok() {
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
            metrics.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    // New connections are refused from now on, not left in the backlog to be reset
    // when the grace below ends: clients (workers with several coordinators) move on
    // to another coordinator at once.
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.abort_all();
    }
    Ok(())
}

/// Why a request body was not read whole.
#[derive(Debug)]
pub enum BodyFailure {
    /// It did not arrive whole within the deadline.
    Late,
    /// It is longer than the limit.
    TooLarge,
    /// It was cut off or malformed (the text says how).
    Cut(String),
}

/// Reads `req`'s body whole, within `limit` and at most `max` bytes, and gives the
/// request back with the buffered body; a request without a body passes as it is.
/// For APIs whose bodies are small JSON: the idle timer of [`serve`] does not run
/// while a request is in flight, so without this a body that stalls or trickles
/// holds its connection for ever. On failure the caller answers, with
/// `Connection: close` (the rest of the body is unread).
pub async fn read_body_within(
    req: axum::extract::Request,
    limit: Duration,
    max: usize,
) -> Result<axum::extract::Request, BodyFailure> {
    use axum::body::HttpBody as _;
    if req.body().is_end_stream() {
        return Ok(req);
    }
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(limit, axum::body::to_bytes(body, max)).await {
        Ok(Ok(bytes)) => Ok(axum::extract::Request::from_parts(parts, bytes.into())),
        Err(_) => Err(BodyFailure::Late),
        Ok(Err(e)) if is_length_limit(&e) => Err(BodyFailure::TooLarge),
        Ok(Err(e)) => Err(BodyFailure::Cut(e.to_string())),
    }
}

/// Whether a body error is the size limit's.
fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Whether a presented credential equals the configured `secret`, in time that
/// depends on neither where they first differ nor the secret's length (only on the
/// presented length). An empty secret
/// matches nothing: a service whose secret is unset admits no caller, whatever
/// header it sends.
pub fn secret_matches(presented: &[u8], secret: &[u8]) -> bool {
    if secret.is_empty() {
        return false;
    }
    // Every presented byte is compared (with the secret's bytes over again when it
    // is longer), so the time taken depends on the presented length only, never on
    // the secret's: its length does not show.
    let differs = presented
        .iter()
        .zip(secret.iter().cycle())
        .fold(u8::from(presented.len() != secret.len()), |acc, (a, b)| {
            acc | (a ^ b)
        });
    std::hint::black_box(differs) == 0
}

/// What is wrong with an HTTP/1.1 request's `Host`, if anything: RFC 9112 §3.2 asks
/// for a 400 to one without it or with more than one (which a peer in front may
/// read otherwise than the service).
fn host_fault(
    version: axum::http::Version,
    headers: &axum::http::HeaderMap,
) -> Option<(axum::http::StatusCode, &'static str, &'static str)> {
    let bad = |text| Some((axum::http::StatusCode::BAD_REQUEST, text, "bad-request"));
    let mut hosts = headers.get_all(axum::http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if version == axum::http::Version::HTTP_11 => {
            bad("an HTTP/1.1 request needs exactly one Host field")
        }
        (Some(_), Some(_)) => bad("a request has at most one Host field"),
        // A host and port, as a URI's authority has them (an empty one is allowed:
        // a target without an authority); no list, no user part.
        (Some(host), None)
            if !host.is_empty()
                && (host.as_bytes().contains(&b'@')
                    || axum::http::uri::Authority::try_from(host.as_bytes()).is_err()) =>
        {
            bad("the Host field is no host and port")
        }
        _ => None,
    }
}

/// What is wrong with a request's body framing, if anything: `(status, text, code)`.
/// hyper frames a body by `Transfer-Encoding` when it is there, and ignores
/// `Content-Length` then; a peer in front of the service (a balancer, a cache) may
/// frame the same bytes by `Content-Length`, and the two would disagree on where
/// the next request starts (RFC 9112 §6.1: such a request must be treated as an
/// error). Codings before a final `chunked` would be handed to the handler
/// undecoded, as if they were the body.
fn framing_fault(
    version: axum::http::Version,
    headers: &axum::http::HeaderMap,
    head_length: u8,
) -> Option<(axum::http::StatusCode, &'static str, &'static str)> {
    use axum::http::{header, StatusCode};
    // hyper ends a line at a bare LF (RFC 9112 §2.2 allows it); a peer in front
    // that keeps it inside a field's value reads `X: y\nContent-Length: 35` as one
    // field, and the body as a request of its own.
    if head_length == HEAD_BARE_LF {
        return Some((
            StatusCode::BAD_REQUEST,
            "a line of the request head ends in a bare LF",
            "bad-framing",
        ));
    }
    // A length line padded past the scan's reading: hyper frames the body by it,
    // but the scan would lose the heads' boundaries from here on, and the heads
    // after it would be served unjudged (a bare LF among them).
    if head_length == HEAD_LENGTH_UNREAD {
        return Some((
            StatusCode::BAD_REQUEST,
            "a Content-Length line too long to read",
            "bad-framing",
        ));
    }
    // A head the scan could not delimit (behind chunked framing hyper refuses, or
    // more than `HEADS_AHEAD` and `CODES_AHEAD` pipelined) may have had a bare LF
    // or a length line beside `Transfer-Encoding`: refused whatever it holds, not
    // served unjudged.
    if head_length == HEAD_UNSEEN {
        return Some((
            StatusCode::BAD_REQUEST,
            "a request the server could not delimit from the one before",
            "bad-framing",
        ));
    }
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        // Empty list elements are no coding (RFC 9110 §5.6.1), as hyper reads them.
        .filter(|c| !c.is_empty())
        .peekable();
    codings.peek()?;
    let bad = |text| Some((StatusCode::BAD_REQUEST, text, "bad-framing"));
    // hyper leaves `Content-Length` out of a head that has `Transfer-Encoding`:
    // the head's bytes tell. A head the scan could not delimit may have had one:
    // refused (behind a peer framing by `Content-Length`, its chunked body would
    // take in the requests that follow).
    if headers.contains_key(header::CONTENT_LENGTH) || head_length == HEAD_LENGTH {
        return bad("Content-Length and Transfer-Encoding together");
    }
    if version < axum::http::Version::HTTP_11 {
        return bad("Transfer-Encoding in an HTTP/1.0 request");
    }
    let codings: Vec<&[u8]> = codings.collect();
    let chunked = |c: &&[u8]| c.eq_ignore_ascii_case(b"chunked");
    match codings.split_last() {
        Some((last, [])) if chunked(last) => None,
        Some((last, before)) if chunked(last) && !before.iter().any(chunked) => Some((
            StatusCode::NOT_IMPLEMENTED,
            "Transfer-Encoding with codings other than chunked",
            "unsupported-transfer-coding",
        )),
        _ => bad("invalid Transfer-Encoding"),
    }
}

/// The answer to a request whose framing is in doubt ([`framing_fault`]): the
/// service's JSON error with the request ID its rule gives, the connection closed
/// after it (its body is never read, so where the next request starts is unknown).
fn framing_refusal(
    req: &axum::extract::Request,
    (policy, version): (IdPolicy, IdVersion),
    problem: &Problem,
) -> Option<axum::response::Response> {
    let head_length = req
        .extensions()
        .get::<HeadLength>()
        .map_or(HEAD_UNSEEN, |h| h.0);
    let (status, text, code) = host_fault(req.version(), req.headers())
        .or_else(|| framing_fault(req.version(), req.headers(), head_length))?;
    let id = header::resolve(
        policy,
        header::extract(
            req.headers()
                .iter()
                .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
        ),
        version,
    )
    .0;
    appproxy_shared::with_request_context(id, None, || {
        tracing::info!(status = status.as_u16(), "request refused: {text}");
    });
    let mut resp = axum::response::Response::new(axum::body::Body::from(problem.body(
        text,
        code,
        id.as_ref().map(|i| i.as_str()),
    )));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    if let Some(value) = id.and_then(|i| axum::http::HeaderValue::from_str(i.as_str()).ok()) {
        headers.insert(appproxy_shared::PRIMARY_HEADER, value);
    }
    Some(closing(resp))
}

/// Marks a refusal made before the body was read whole: the connection cannot be
/// reused.
pub fn closing(mut resp: axum::response::Response) -> axum::response::Response {
    resp.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::{
        framing_fault, header, json_for_hyper_error, secret_matches, Exchanges, IdLines, Problem,
        CODES_AHEAD, HEADS_AHEAD, HEAD_BARE_LF, HEAD_LENGTH, HEAD_LENGTH_UNREAD, HEAD_NO_LENGTH,
        HEAD_UNSEEN,
    };
    use std::sync::Arc;

    #[test]
    fn only_hypers_exact_answer_is_rewritten() {
        let ok = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Thu, 03 Dec 2026 12:00:00 GMT\r\n\r\n";
        let answer = json_for_hyper_error(ok, None, &Problem::default()).expect("hyper's answer");
        let text = String::from_utf8(answer).expect("text");
        assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
        assert!(
            text.contains("\r\ndate: Thu, 03 Dec 2026 12:00:00 GMT\r\n"),
            "{text}"
        );
        assert!(text.ends_with(r#""code":"request-header-fields-too-large","request_id":null}"#));
        // Shaped as the service's own errors.
        let coordinator = Problem {
            type_base: "https://api.backend.ai/probs/",
            error_code_prefix: Some("appproxy_coordinator_"),
        };
        let id = appproxy_shared::RequestId::parse(b"mgr-42").ok();
        let answer = json_for_hyper_error(ok, id, &coordinator).expect("hyper's answer");
        let text = String::from_utf8(answer).expect("text");
        let body = &text[text.find("\r\n\r\n").expect("head") + 4..];
        assert_eq!(
            body,
            r#"{"type":"https://api.backend.ai/probs/request-header-fields-too-large","title":"Request header fields too large","error_code":"appproxy_coordinator_request_header_fields_too_large","msg":"Request header fields too large","error":"Request header fields too large","code":"request-header-fields-too-large","request_id":"mgr-42"}"#
        );
        assert!(
            text.contains("\r\nx-backend-request-id: mgr-42\r\n"),
            "{text}"
        );
        for other in [
            // A bare LF in the date would carry lines of its own into the answer.
            &b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\nLocation: https://evil.example/\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: \x01\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 5\r\ndate: x\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\nx-other: 1\r\ndate: x\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\ntrailing",
        ] {
            assert!(
                json_for_hyper_error(other, None, &Problem::default()).is_none(),
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
    }

    /// What happens on a connection, as the scan sees it.
    #[derive(Clone, Copy)]
    enum Ev<'a> {
        /// Bytes read.
        R(&'a [u8]),
        /// An answer (interim or final) written.
        A,
        /// hyper hands the next request to the service.
        H,
    }
    use Ev::{A, H, R};

    /// What the scan found for each request handed, over `events`.
    fn handed(events: &[Ev<'_>]) -> Vec<u8> {
        let exchanges = Arc::new(Exchanges::default());
        let mut lines = IdLines::new(exchanges.clone());
        let mut found = Vec::new();
        for event in events {
            match event {
                R(bytes) => lines.scan(bytes),
                A => lines.answered(),
                H => found.push(exchanges.handed_head()),
            }
        }
        found
    }

    /// Whether each head has a `Content-Length` line (which hyper leaves out of a
    /// head that has `Transfer-Encoding`) is known while the scan can follow the
    /// requests' boundaries: bodies of a known length are passed over, however they
    /// are cut into reads, whether they come before or after the answer or an
    /// interim `100 Continue`, and whether the requests are pipelined. Once a
    /// chunked body is followed by more, the heads after are unseen.
    #[test]
    fn a_heads_length_line_is_known_while_the_scan_keeps_step() {
        let both: &[u8] =
            b"POST /a HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        let padded = format!(
            "POST /a HTTP/1.1\r\ncontent-LENGTH:{}5\r\nTransfer-Encoding: chunked\r\n\r\n",
            " ".repeat(300)
        );
        let coded: &[u8] = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let padded_sized = format!(
            "POST /a HTTP/1.1\r\nContent-Length:{}10\r\n\r\n",
            " ".repeat(300)
        );
        let overlong = format!(
            "POST /a HTTP/1.1\r\nContent-Length:{}10\r\n\r\n",
            " ".repeat(9000)
        );
        let sized: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\n";
        let expecting: &[u8] =
            b"POST /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n";
        let body_then_both = [b"0123456789".as_slice(), both].concat();
        let after_empty = [b"\r\n".as_slice(), both].concat();
        let sized_crlf = b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789\r\n".to_vec();
        let sized_crlf_both = [sized_crlf.as_slice(), both].concat();
        let pipelined = [b"GET /a HTTP/1.1\r\n\r\n".as_slice(), both].concat();
        let deep = [b"GET /a HTTP/1.1\r\n\r\n".repeat(20).as_slice(), both].concat();
        let deeper = b"GET /a HTTP/1.1\r\n\r\n".repeat(HEADS_AHEAD + CODES_AHEAD + 3);
        let (l, n, u, b, r) = (
            HEAD_LENGTH,
            HEAD_NO_LENGTH,
            HEAD_UNSEEN,
            HEAD_BARE_LF,
            HEAD_LENGTH_UNREAD,
        );
        let cases: &[(&str, Vec<Ev<'_>>, Vec<u8>)] = &[
            ("one head with both", vec![R(both), H], vec![l]),
            ("after empty lines, which the parser skips", vec![R(b"\r\n\r\n"), R(&after_empty), H], vec![l]),
            ("a bare LF ending a field", vec![R(b"POST /a HTTP/1.1\r\nX: y\nContent-Length: 3\r\n\r\nabc"), H], vec![b]),
            ("a bare LF ending the request line", vec![R(b"GET /a HTTP/1.1\nX: y\r\n\r\n"), H], vec![b]),
            ("a bare LF ending the head", vec![R(b"GET /a HTTP/1.1\r\nX: y\r\n\n"), H], vec![b]),
            ("a bare LF in an empty line before it", vec![R(b"\r\n\n"), R(&after_empty), H], vec![b]),
            ("a bare LF starting a read", vec![R(b"GET /a HTTP/1.1\r\nX: y"), R(b"\n\r\n"), H], vec![b]),
            ("a CRLF cut between reads", vec![R(b"GET /a HTTP/1.1\r"), R(b"\nX: y\r"), R(b"\n\r"), R(b"\n"), H], vec![n]),
            ("a bare LF behind a length given twice", vec![R(b"GET /a HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabcPOST /x HTTP/1.1\r\nX: y\nContent-Length: 3\r\n\r\nabc"), H, A, H], vec![l, b]),
            ("a bare LF in the head before, not this one", vec![R(b"GET /a HTTP/1.1\nX: y\r\n\r\nGET /b HTTP/1.1\r\n\r\n"), H, A, H], vec![b, n]),
            ("after a body and an extra CRLF", vec![R(&sized_crlf), H, A, R(both), H], vec![l, l]),
            ("pipelined after a body and an extra CRLF", vec![R(&sized_crlf_both), H, A, H], vec![l, l]),
            ("one head, its body in the same read", vec![R(b"POST /a HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), H], vec![l]),
            ("padded and in capitals", vec![R(padded.as_bytes()), H], vec![l]),
            ("after a body whose length line is padded", vec![R(padded_sized.as_bytes()), H, R(b"0123456789"), A, R(both), H], vec![l, l]),
            ("after a length line padded past reading", vec![R(overlong.as_bytes()), H, R(b"0123456789"), A, R(both), H], vec![r, u]),
            ("chunked alone", vec![R(coded), H], vec![n]),
            ("after a sized body in the same read", vec![R(b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789"), H, A, R(both), H], vec![l, l]),
            ("after a sized body cut into reads", vec![R(sized), H, R(b"0123"), R(b"456789"), A, R(coded), H], vec![l, n]),
            ("after a body read after its answer", vec![R(sized), H, A, R(b"0123456789"), R(both), H], vec![l, l]),
            ("a body and the next head in one read, after the answer", vec![R(sized), H, A, R(&body_then_both), H], vec![l, l]),
            ("pipelined before the answer", vec![R(&pipelined), H, A, H], vec![n, l]),
            ("after an interim 100, in the read of the body", vec![R(expecting), H, A, R(&body_then_both), A, H], vec![l, l]),
            ("after an interim 100 and the final answer", vec![R(expecting), H, A, A, R(&body_then_both), H], vec![l, l]),
            ("after a chunked body", vec![R(coded), H, R(b"0\r\n\r\n"), A, R(both), H], vec![n, l]),
            ("chunked bodies one after another", vec![R(coded), H, R(b"0\r\n\r\n"), A, R(coded), H, R(b"1\r\nx\r\n0\r\n\r\n"), A, R(b"GET / HTTP/1.1\r\n\r\n"), H], vec![n, n, n]),
            ("after extensions and trailers", vec![R(coded), H, R(b"5 ;a=b\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"), A, R(both), H], vec![n, l]),
            ("a trailer holding a bare LF, as hyper reads it", vec![R(coded), H, R(b"0\r\nX: 1\nGET /x HTTP/1.1\r\n\r\n"), A, R(both), H], vec![n, l]),
            ("after chunked framing hyper refuses", vec![R(coded), H, R(b"5\nhello\r\n0\r\n\r\n"), A, R(both), H], vec![n, u]),
            ("after a chunk size past 64 bits", vec![R(coded), H, R(b"10000000000000000\r\n"), A, R(both), H], vec![n, u]),
            ("out of step for good", vec![R(coded), H, R(b"0\r\n\n"), A, R(coded), H, A, R(b"GET / HTTP/1.1\r\n\r\n"), H], vec![n, u, u]),
            ("pipelined past the heads kept whole", [vec![R(&deep)], vec![H; 21]].concat(), [vec![n; 20], vec![l]].concat()),
            ("pipelined deeper than the scan keeps", [vec![R(&deeper)], vec![H; HEADS_AHEAD + CODES_AHEAD + 3]].concat(), [vec![n; HEADS_AHEAD + CODES_AHEAD], vec![u; 3]].concat()),
            ("a request the scan had not read whole", vec![R(b"GET / HTTP/1.1\r\n"), H, R(b"\r\n"), R(both), H, H], vec![u, u, u]),
        ];
        for (what, events, want) in cases {
            assert_eq!(&handed(events), want, "{what}");
        }
        // However the heads and bodies are cut into reads.
        let two = [expecting, b"0123456789", both].concat();
        for cut in 1..two.len() {
            assert_eq!(
                handed(&[R(&two[..cut]), R(&two[cut..]), H, H]),
                vec![l, l],
                "cut at {cut}"
            );
        }
        let chunked_then = [coded, b"3;x\r\nabc\r\n0\r\nT: 1\r\n\r\n", both].concat();
        for cut in 1..chunked_then.len() {
            assert_eq!(
                handed(&[R(&chunked_then[..cut]), R(&chunked_then[cut..]), H, H]),
                vec![n, l],
                "chunked, cut at {cut}"
            );
        }
    }

    /// Framing in doubt, refused before a handler sees it.
    #[test]
    fn framing_in_doubt_is_refused() {
        use axum::http::{HeaderMap, HeaderValue, StatusCode, Version};
        let headers = |fields: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in fields {
                map.append(*name, HeaderValue::from_static(value));
            }
            map
        };
        let te = |v| headers(&[("transfer-encoding", v)]);
        let code =
            |v: Version, h: &HeaderMap, length| framing_fault(v, h, length).map(|(s, _, c)| (s, c));
        let v11 = Version::HTTP_11;
        let bad = Some((StatusCode::BAD_REQUEST, "bad-framing"));
        assert_eq!(code(v11, &te("chunked"), HEAD_NO_LENGTH), None);
        // A line ending in a bare LF, whatever the framing.
        assert_eq!(code(v11, &headers(&[]), HEAD_BARE_LF), bad);
        assert_eq!(code(v11, &te("chunked"), HEAD_BARE_LF), bad);
        assert_eq!(code(v11, &te("Chunked"), HEAD_NO_LENGTH), None);
        assert_eq!(
            code(v11, &headers(&[("content-length", "5")]), HEAD_LENGTH),
            None,
            "no coding"
        );
        assert_eq!(
            code(v11, &te("chunked"), HEAD_LENGTH),
            bad,
            "the length line hyper left out"
        );
        assert_eq!(
            code(
                v11,
                &headers(&[("transfer-encoding", "chunked"), ("content-length", "5")]),
                HEAD_NO_LENGTH
            ),
            bad
        );
        assert_eq!(
            code(v11, &te("chunked"), HEAD_UNSEEN),
            bad,
            "a head the scan could not delimit may have had a length line"
        );
        assert_eq!(
            code(v11, &headers(&[]), HEAD_UNSEEN),
            bad,
            "or a bare LF: refused whatever it holds"
        );
        // A length line too long to read: refused, since the heads after it
        // would go unjudged.
        assert_eq!(code(v11, &headers(&[]), HEAD_LENGTH_UNREAD), bad);
        assert_eq!(code(Version::HTTP_10, &te("chunked"), HEAD_NO_LENGTH), bad);
        assert_eq!(
            code(v11, &te("gzip, chunked"), HEAD_NO_LENGTH),
            Some((StatusCode::NOT_IMPLEMENTED, "unsupported-transfer-coding"))
        );
        assert_eq!(code(v11, &te("chunked, chunked"), HEAD_NO_LENGTH), bad);
        assert_eq!(
            code(v11, &te(",chunked"), HEAD_NO_LENGTH),
            None,
            "empty elements"
        );
        assert_eq!(code(v11, &te(" , chunked ,"), HEAD_NO_LENGTH), None);
        assert_eq!(code(v11, &te(",chunked"), HEAD_LENGTH), bad);
        assert_eq!(
            code(
                v11,
                &headers(&[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked")
                ]),
                HEAD_NO_LENGTH
            ),
            bad
        );
        assert_eq!(code(v11, &te("gzip"), HEAD_NO_LENGTH), bad);
        // No coding at all: hyper refuses it before any handler (its last coding is
        // not `chunked`).
        assert_eq!(code(v11, &te(""), HEAD_NO_LENGTH), None);
    }

    fn id_of(lines: &IdLines) -> Option<String> {
        match lines.next_id() {
            header::Extracted::Valid(id) => Some(id.as_str().to_owned()),
            _ => None,
        }
    }

    /// Only a head's lines are scanned for the request ID, however its bytes are cut
    /// into reads; its body (a tus upload, say) is not. The ID given is that of the
    /// first head hyper has not handed on.
    #[test]
    fn request_id_lines_are_taken_from_heads_and_never_from_bodies() {
        let head = b"PATCH /upload HTTP/1.1\r\nHost: t\r\nX-Request-ID: in-head-1\r\nContent-Length: 40\r\n\r\n";
        let body = b"X-Backend-Request-ID: in-body-2\r\n\r\nmore";
        for cut in 1..head.len() {
            let mut lines = IdLines::new(Arc::default());
            lines.scan(&head[..cut]);
            lines.scan(&head[cut..]);
            lines.scan(body);
            assert_eq!(id_of(&lines).as_deref(), Some("in-head-1"), "cut at {cut}");
        }
        let exchanges = Arc::new(Exchanges::default());
        let mut lines = IdLines::new(exchanges.clone());
        lines.scan(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 40\r\n\r\n");
        lines.scan(body);
        assert_eq!(id_of(&lines), None, "a body's lines are not a head's");
        // Handed on, its body's last byte and the next head read.
        exchanges.handed_head();
        lines.scan(b"!GET / HTTP/1.1\r\nX-Request-ID: next-3\r\n");
        assert_eq!(
            id_of(&lines).as_deref(),
            Some("next-3"),
            "a head being read"
        );
        lines.scan(b"\r\nGET / HTTP/1.1\r\nX-Request-ID: next-4\r\n\r\n");
        assert_eq!(id_of(&lines).as_deref(), Some("next-3"), "pipelined");
        exchanges.handed_head();
        assert_eq!(id_of(&lines).as_deref(), Some("next-4"));
        exchanges.handed_head();
        assert_eq!(id_of(&lines), None, "none ahead");
    }

    #[test]
    fn a_secret_matches_only_itself_and_an_empty_one_matches_nothing() {
        for (presented, secret, expected) in [
            ("s3cret", "s3cret", true),
            ("s3cret", "s3creT", false),
            ("s3cre", "s3cret", false),
            ("s3crett", "s3cret", false),
            ("s3crets3cret", "s3cret", false),
            ("s3c", "s3cs3c", false),
            ("", "s3cret", false),
            ("", "", false),
            ("anything", "", false),
            ("\u{e9}", "\u{e9}", true),
        ] {
            assert_eq!(
                secret_matches(presented.as_bytes(), secret.as_bytes()),
                expected,
                "{presented:?} against {secret:?}"
            );
        }
    }
}
