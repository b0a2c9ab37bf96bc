//! One client connection: read a request head, route it, forward it to the app over a
//! pooled connection, relay the response, repeat (keep-alive and pipelining, in order).
//!
//! The connection is one object, [`Client`] (after hyper's `proto::h1::Conn`): its
//! socket, its read buffer, the upstream read buffer and the write buffer it reuses
//! for every request. Each request is an [`exchange::Exchange`] it owns while the
//! request lasts: head, route, request ID and trace context, access-log line, timing.
//! The pieces:
//!
//! - [`exchange`]: one request from routing to its access line, and [`Client::refuse`],
//!   the one place where the proxy's own answers are built and sent;
//! - [`retry`]: how an exchange fails ([`Failure`], [`Left`]) and the one rule that
//!   says when a failed attempt is retried on a fresh upstream connection;
//! - [`upstream`]: connecting to the app, passive health, reading response heads;
//! - [`tunnel`]: WebSocket and raw byte tunnels after a `101`.
//!
//! The request ID is resolved from the head (or generated) and bound with
//! [`appproxy_shared::scope`] around the handling of that request, so every log line
//! written meanwhile carries it; it is forwarded to the app and echoed on every
//! response, the proxy's own errors included.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use appproxy_shared::scope_traced;
use tracing::Instrument;

use crate::core::{counter, Core, Route};
use crate::http::encode::ClientHop;
use crate::http::error::RequestError;
use crate::http::parse::{self, Authority, BodyFraming, HeaderField, Method, RequestHead};
use crate::io::TcpConn;
use crate::relay::ReadBuf;

pub mod exchange;
pub mod retry;
pub mod tunnel;
pub mod upstream;

pub(crate) use retry::{Failure, Left};
pub(crate) use upstream::{
    connect, connect_as, connect_route, kind_of, note_health, read_response_head, AppSide,
    ConnectError, MAX_INTERIM,
};

/// Initial size of each read buffer; heads grow it up to the head limit.
pub(crate) const BUF_SIZE: usize = 16 * 1024;
/// Largest body buffer.
const BODY_BUF_LIMIT: usize = 64 * 1024;

/// What happens after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Read the next request.
    KeepAlive,
    /// Close the client connection.
    Close,
    /// Close it after an answer while the client may still be sending (the request
    /// body unread, or a head refused mid-way): [`Client::linger`] first.
    Linger,
    /// A 101 is out: hand the tunnel in [`Client::handoff`] to a task of its own
    /// and end the connection's task, without closing the connection.
    Tunnel,
}

/// What a client connection reuses from request to request besides its read
/// buffers: the bytes being written and the storage of its heads' field lists and
/// access line. Handed from closed connections to new ones on the same core
/// ([`StoragePool`]), as read buffers are ([`crate::relay::BufPool`]).
#[derive(Default)]
pub struct ConnStorage {
    out: Vec<u8>,
    line: Vec<u8>,
    fields: Vec<HeaderField>,
    resp_fields: Vec<HeaderField>,
}

impl ConnStorage {
    /// The bytes this storage holds allocated.
    fn bytes(&self) -> usize {
        self.out.capacity()
            + self.line.capacity()
            + (self.fields.capacity() + self.resp_fields.capacity())
                * std::mem::size_of::<HeaderField>()
    }
}

/// [`ConnStorage`] of closed connections, waiting for new ones on the same core.
/// With a new connection per request, a connection's storage was allocated, grown
/// and freed for each request: five allocations and their frees, some through
/// `realloc`'s copies. Kept storage is empty (each vector cleared: nothing of a
/// closed connection's request is visible to the next), at most `cap` of them, and
/// none that grew past [`StoragePool::KEPT_BYTES`] for a large head: the pool holds
/// at most `cap` × 16 KiB per core.
pub struct StoragePool {
    free: std::cell::RefCell<Vec<ConnStorage>>,
    cap: usize,
}

impl StoragePool {
    /// The most bytes a kept storage may hold allocated.
    const KEPT_BYTES: usize = 16 << 10;

    /// A pool keeping at most `cap` storages.
    pub fn new(cap: usize) -> Self {
        Self {
            free: std::cell::RefCell::new(Vec::new()),
            cap,
        }
    }

    /// Empty storage, recycled when some is free.
    fn take(&self) -> ConnStorage {
        self.free.borrow_mut().pop().unwrap_or_else(|| ConnStorage {
            out: Vec::with_capacity(4096),
            ..ConnStorage::default()
        })
    }

    /// Hands `kept` back for another connection, emptied (dropped when the pool is
    /// full or it grew too large).
    fn give(&self, mut kept: ConnStorage) {
        let mut free = self.free.borrow_mut();
        if free.len() < self.cap && kept.bytes() <= Self::KEPT_BYTES {
            kept.out.clear();
            kept.line.clear();
            kept.fields.clear();
            kept.resp_fields.clear();
            free.push(kept);
        }
    }

    /// Storages waiting to be reused.
    pub fn len(&self) -> usize {
        self.free.borrow().len()
    }

    /// Whether none waits to be reused.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One client connection and what it reuses from request to request.
pub(crate) struct Client {
    /// The core serving it.
    core: Rc<Core>,
    /// The socket (shared with the tasks of a tunnel it becomes).
    conn: Rc<TcpConn>,
    /// Bytes read and not yet consumed (the next pipelined request may be here).
    buf: ReadBuf,
    /// The hop facts forwarded to the app.
    hop: ClientHop,
    /// Largest head, in bytes.
    head_limit: usize,
    /// Bytes read from the app and not yet relayed.
    ubuf: ReadBuf,
    /// What is being written (to the app or the client), reused by every request.
    out: Vec<u8>,
    /// Storage for each request's method and path copies (its access line), reused.
    line: Vec<u8>,
    /// Storage for each request head's field list, reused.
    fields: Vec<HeaderField>,
    /// Storage for each response head's field list, reused.
    resp_fields: Vec<HeaderField>,
    /// Whether `out`, `line`, `fields` and `resp_fields` are a [`ConnStorage`]
    /// taken from the core's pool: from the connection's first bytes until it waits
    /// idle again (a silent connection holds none).
    stored: bool,
    /// The connection's per-core number (the pool holds some app connections for
    /// the client they last served).
    conn_id: u64,
    /// A tunnel whose 101 is out, for [`Next::Tunnel`].
    handoff: Option<tunnel::Handoff>,
}

/// Serves one accepted connection until it closes. `trust_forwarding` false: the
/// peer's `X-Forwarded-*` headers are not believed even when it is in `[worker]
/// trusted_proxies` (a PROXY protocol header that named no client left the
/// balancer's address as the peer).
pub async fn serve(
    core: Rc<Core>,
    conn: TcpConn,
    peer: SocketAddr,
    local_port: u16,
    trust_forwarding: bool,
) {
    let conn_id = core.next_conn_id();
    let span = tracing::debug_span!("conn", core = core.cpu, conn = conn_id, peer = %peer);
    // Entered around each poll of the connection's task, never held across an await:
    // other connections' tasks run in between.
    serve_conn(core, conn, peer, local_port, trust_forwarding, conn_id)
        .instrument(span)
        .await
}

/// Closes, when dropped, the pooled app connections only client connection `owner`
/// may reuse: those of circuits that reuse app connections by client
/// ([`crate::core::Pool::release_owner`]).
struct OwnedUpstreams<'a> {
    core: &'a Core,
    owner: u64,
}

impl Drop for OwnedUpstreams<'_> {
    fn drop(&mut self) {
        self.core.pool.release_owner(self.owner);
    }
}

async fn serve_conn(
    core: Rc<Core>,
    conn: TcpConn,
    peer: SocketAddr,
    local_port: u16,
    trust_forwarding: bool,
    conn_id: u64,
) {
    core.metrics.add(counter::ACCEPTED, 1);
    core.metrics.add(counter::ACTIVE, 1);
    // However the connection ends (its task dropped at drain too): app connections
    // only it may reuse (a circuit's `upstream_reuse = "client"`, or the worker's
    // `[upstream] reuse`) are closed with it.
    let _owned = OwnedUpstreams {
        core: &core,
        owner: conn_id,
    };
    let trusted = trust_forwarding
        && core
            .rt
            .trusted_proxies
            .iter()
            .any(|n| n.contains(peer.ip()));
    let limits = core.rt.head_limits;
    let tls = conn.is_tls();
    // No buffer and no storage until the client sends something: the read buffer
    // is taken for each try of a read and given back while the read waits
    // (`ReadBuf::fill_idle`), the app's read buffer at the first read from an app,
    // the storage with the first bytes (`Client::read_head`).
    let mut client = Client {
        core: core.clone(),
        conn: Rc::new(conn),
        buf: core.read_bufs.lazy(),
        hop: ClientHop::new(peer, local_port, trusted).over_tls(tls),
        head_limit: limits.max_request_line + limits.max_header_bytes + 4,
        ubuf: core.read_bufs.lazy(),
        out: Vec::new(),
        line: Vec::new(),
        fields: Vec::new(),
        resp_fields: Vec::new(),
        stored: false,
        conn_id,
        handoff: None,
    };
    // The head timeout from the accept (a PROXY protocol header or a TLS handshake
    // took part of it).
    client.conn.set_timeout_within(core.rt.head_timeout);
    // Nothing in hand until the first bytes: the cap may close it for a new one.
    client.conn.set_reusable(true, false);
    if core.rt.http2.enabled {
        // HTTP/2: agreed by ALPN over TLS, or the client's prior-knowledge preface
        // over cleartext only (RFC 9113 §3.3; nginx sniffs no preface over TLS
        // either): a TLS connection that agreed on http/1.1, or on nothing, is
        // HTTP/1.1 whatever it sends.
        let h2 = if tls {
            client
                .conn
                .tls_info()
                .and_then(|i| i.alpn)
                .is_some_and(|a| a == b"h2")
        } else {
            client.sniff_preface().await
        };
        if h2 {
            if client.conn.was_shed() {
                // Closed for a new connection before it asked anything.
                client.give_back();
                core.metrics.sub(counter::ACTIVE, 1);
                return;
            }
            let prefix = client.buf.filled().to_vec();
            client.give_back();
            let hop = client.hop;
            crate::http2::serve(core.clone(), client.conn, hop, prefix, conn_id).await;
            core.metrics.sub(counter::ACTIVE, 1);
            return;
        }
    }
    let handed_off = client.run().await;
    client.give_back();
    // A tunnel's task counts the connection until the tunnel ends.
    if !handed_off {
        core.metrics.sub(counter::ACTIVE, 1);
    }
}

impl Client {
    /// Hands the connection's buffers and storage back to the core for new
    /// connections, leaving it empty ones.
    fn give_back(&mut self) {
        self.buf.release();
        self.ubuf.release();
        park_storage(
            &self.core,
            &mut self.stored,
            [&mut self.out, &mut self.line],
            [&mut self.fields, &mut self.resp_fields],
        );
    }

    /// Serves HTTP/1.x requests in order until the connection closes, or becomes a
    /// tunnel handed to a task of its own (then true).
    async fn run(&mut self) -> bool {
        let mut first = true;
        let last = loop {
            let head = match self.read_head(first).await {
                Ok(Some(head)) => head,
                Ok(None) => break Next::Close,
                Err(e) => break self.refuse_head(e).await,
            };
            let started = Instant::now();
            first = false;
            let line = std::mem::take(&mut self.line);
            let mut x = exchange::Exchange::new(
                &self.core,
                self.buf.filled(),
                head,
                started,
                line,
                self.hop.peer.ip(),
            );
            // The request's ID and span are bound around each poll of the exchange
            // (every line names the request), without a tracing span of its own:
            // wrapping the exchange's large future once more costs a copy of it per
            // request.
            let (id, trace) = (x.id, x.trace.map(|t| t.span));
            let next = scope_traced(Some(id), trace, self.exchange(&mut x)).await;
            // `finish` answers `Tunnel` only with a tunnel to hand; one left by an
            // exchange that ended otherwise goes (its guard, the app's connection).
            match (next, self.handoff.take()) {
                (Next::Tunnel, Some(tunnel)) => {
                    self.fields = x.take_fields();
                    tunnel.spawn(x);
                    return true;
                }
                (Next::Tunnel, None) => break Next::Close,
                (_, _) => {}
            }
            (self.line, self.fields) = x.into_storage();
            // The app's read buffer goes back until the next request reads from an
            // app (its bytes are done with: each exchange starts it empty).
            self.ubuf.release();
            if next != Next::KeepAlive || self.core.draining.get() {
                break next;
            }
        };
        if last == Next::Linger {
            self.linger().await;
        }
        false
    }

    /// The lingering close ([`lingering_close`]) after an answer that closes the
    /// connection while the client may still be sending (a 413 before the body, an
    /// app's early 401, a head refused mid-way).
    async fn linger(&mut self) {
        lingering_close(&self.core, &self.conn, self.buf.scratch(), true).await;
    }

    /// Reads the connection's first bytes until they either are the HTTP/2 connection
    /// preface (true) or cannot be (false: HTTP/1.1 goes on with what was read).
    async fn sniff_preface(&mut self) -> bool {
        let preface = crate::http2::PREFACE;
        loop {
            let got = self.buf.filled();
            let n = got.len().min(preface.len());
            if got[..n] != preface[..n] {
                return false;
            }
            if n == preface.len() {
                return true;
            }
            match self.buf.fill_idle(&self.conn, self.head_limit, || ()).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => self.core.metrics.add(counter::BYTES_IN, n as u64),
            }
        }
    }

    /// Reads until a complete head is buffered. `Ok(None)`: the client went away (or
    /// stayed idle past the keep-alive timeout) with nothing to answer.
    async fn read_head(&mut self, first: bool) -> Result<Option<RequestHead>, RequestError> {
        let core = &self.core;
        // Until its head is complete, nothing is in hand: the cap may close the
        // connection for a new one (nginx's reusable connections; a head that
        // trickles in is no more, or an attacker's unfinished heads would hold every
        // place until the head timeout); drain closes one kept alive at once. A new
        // connection has been so since its accept (`serve_conn`).
        let mut waiting = self.buf.is_empty();
        // Whether it is in the cap's queue of unfinished heads.
        let mut unfinished = false;
        if !(first && waiting) {
            if !waiting && self.conn.was_shed() {
                // Closed for a new connection while its first bytes came in (sniffed
                // for the HTTP/2 preface).
                return Ok(None);
            }
            if waiting {
                self.conn.set_reusable(true, !first);
            }
            if !first {
                // A later request: the keep-alive timeout until its first byte, or,
                // when its first bytes came behind the request before (pipelined),
                // its head timeout from now.
                self.conn.set_timeout(if waiting {
                    core.rt.keepalive_timeout
                } else {
                    core.rt.head_timeout
                });
            }
        }
        loop {
            let limits = &core.rt.head_limits;
            if !self.stored && !self.buf.is_empty() {
                // Its first bytes: the storage their head is parsed into.
                let kept = core.conn_storage.take();
                (self.out, self.line) = (kept.out, kept.line);
                (self.fields, self.resp_fields) = (kept.fields, kept.resp_fields);
                self.stored = true;
            }
            let parsed = parse::parse_request_reusing(self.buf.filled(), limits, &mut self.fields);
            if !matches!(parsed, Ok(None)) {
                // A head in hand (or refused): no longer closed for a new connection.
                self.conn.set_reusable(false, false);
            }
            if let Some(head) = parsed? {
                return Ok(Some(head));
            }
            if !unfinished && !self.buf.is_empty() {
                // Part of a head: after connections with nothing in hand at all.
                unfinished = true;
                self.conn.set_unfinished();
            }
            // Waiting with nothing buffered holds neither the read buffer nor the
            // storage (a new connection's first bytes, a kept-alive one's next
            // request).
            let filled = self.buf.fill_idle(&self.conn, self.head_limit, || {
                park_storage(
                    core,
                    &mut self.stored,
                    [&mut self.out, &mut self.line],
                    [&mut self.fields, &mut self.resp_fields],
                )
            });
            match filled.await {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    core.metrics.add(counter::BYTES_IN, n as u64);
                    if waiting {
                        waiting = false;
                        if self.conn.was_shed() {
                            // Closed for a new connection as these bytes came in: the
                            // new one was admitted on the promise that this one
                            // closes (nginx closes it too; clients retry a request
                            // on a kept-alive connection closed before any answer).
                            return Ok(None);
                        }
                        if !first {
                            // A new connection's head deadline runs from its accept.
                            self.conn.set_timeout(core.rt.head_timeout);
                        }
                    }
                }
                // Closed for a new connection with its head unfinished: as above.
                Err(e) if e.kind() == io::ErrorKind::TimedOut && self.conn.was_shed() => {
                    return Ok(None);
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return if self.buf.is_empty() {
                        Ok(None)
                    } else {
                        Err(RequestError::HeadTimeout)
                    };
                }
                Err(e) if e.kind() == io::ErrorKind::OutOfMemory => {
                    return Err(RequestError::HeadersTooLarge)
                }
                Err(_) => return Ok(None),
            }
        }
    }

    /// After a failed exchange: whether the connection can go on, consuming the head
    /// of a bodiless request the exchange left in the buffer. `closes`: the failure
    /// leaves the framing in doubt. A draining worker closes it (its answer says so).
    fn settle(&mut self, head: &RequestHead, left: Left, closes: bool) -> Next {
        let bodiless = head.framing == BodyFraming::Length(0);
        // Part of the request is still unread (or its framing is in doubt): the
        // client may still be sending.
        let unread = closes || left == Left::Partial || (left == Left::Whole && !bodiless);
        if unread {
            return Next::Linger;
        }
        if !head.keep_alive || self.core.draining.get() {
            return Next::Close;
        }
        match left {
            Left::Whole => self.consume_head(head),
            _ => Next::KeepAlive,
        }
    }

    /// Drops a bodiless request's head from the buffer.
    fn consume_head(&mut self, head: &RequestHead) -> Next {
        self.buf.consume(head.head_len);
        if head.keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        }
    }

    /// The client's address ([`client_ip_of`] for this connection).
    fn client_ip(&self, head: &RequestHead) -> Result<std::net::IpAddr, ()> {
        client_ip_of(
            &self.hop,
            &self.core.rt.trusted_proxies,
            self.buf.filled(),
            head,
        )
    }
}

/// Gives a connection's storage back to the core's pool (when it holds it: `stored`),
/// leaving it empty vectors that hold nothing.
fn park_storage(
    core: &Core,
    stored: &mut bool,
    [out, line]: [&mut Vec<u8>; 2],
    [fields, resp_fields]: [&mut Vec<HeaderField>; 2],
) {
    if std::mem::take(stored) {
        core.conn_storage.give(ConnStorage {
            out: std::mem::take(out),
            line: std::mem::take(line),
            fields: std::mem::take(fields),
            resp_fields: std::mem::take(resp_fields),
        });
    }
}

/// The ID to forward and echo: always, unless request IDs are turned off for
/// measuring their cost (`[worker] request_ids = false`).
pub(crate) fn forwarded_id<'a>(
    core: &Core,
    id: &'a appproxy_shared::RequestId,
) -> Option<&'a appproxy_shared::RequestId> {
    core.rt.request_ids.then_some(id)
}

/// How many `X-Forwarded-For` entries are read from a trusted proxy's list, from its
/// right end, to find the client: a chain of more trusted proxies than this is
/// refused as a list that names no client.
pub(crate) const MAX_FORWARDED_HOPS: usize = 16;

/// Why a trusted proxy's `X-Forwarded-For` named no client (400).
pub(crate) const UNREAD_FORWARDED_FOR: &str =
    "X-Forwarded-For from a trusted proxy must end in the client's address";

/// The client's address: the TCP peer, or, when the peer is a trusted proxy, the
/// address its `X-Forwarded-For` names, read from the right end (the address the
/// nearest proxy saw) past every address that is itself in `trusted` (a chain of
/// trusted proxies), as nginx's `real_ip_recursive` reads it; when every address is a
/// trusted proxy's, the leftmost. Entries left of the client are the client's own
/// words and are never read. Refused (`Err`): an entry read on the way that is not a
/// bare address (`unknown`, a port, an empty entry), or more than
/// [`MAX_FORWARDED_HOPS`] trusted addresses. A trusted proxy that sends no
/// `X-Forwarded-For` is the client. `head` lies in `buf` (HTTP/2 streams use this too).
pub(crate) fn client_ip_of(
    hop: &ClientHop,
    trusted: &[appproxy_shared::model::IpNet],
    buf: &[u8],
    head: &RequestHead,
) -> Result<std::net::IpAddr, ()> {
    let peer = hop.peer.ip();
    if !hop.trusted {
        return Ok(peer);
    }
    let lines = head
        .headers
        .iter()
        .rev()
        .filter(|h| parse::name_is(&buf[h.name.clone()], "x-forwarded-for"))
        .map(|h| &buf[h.value.clone()]);
    let mut client = peer;
    let mut proxies = 0;
    for entry in lines.flat_map(|line| line.rsplit(|&b| b == b',')) {
        client = std::str::from_utf8(entry.trim_ascii())
            .ok()
            .and_then(|s| s.parse::<std::net::IpAddr>().ok())
            .ok_or(())?
            .to_canonical();
        if !trusted.iter().any(|n| n.contains(client)) {
            return Ok(client);
        }
        proxies += 1;
        if proxies > MAX_FORWARDED_HOPS {
            return Err(());
        }
    }
    Ok(client)
}

/// How a request was admitted by [`check_credentials`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admitted {
    /// Without a credential: an `open_to_public` circuit.
    Freely,
    /// A genuine CORS preflight to a private circuit: answered by the worker.
    Preflight,
    /// By the permit cookie (interactive circuits).
    Permit,
    /// By a bearer JWT (inference circuits).
    Bearer,
}

/// What [`admit`] decided for a request it let in.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// On to the app.
    Forward,
    /// A CORS preflight to a private circuit, answered by the worker (204) with
    /// these fields ([`crate::auth::answer_preflight`]); nothing reaches the app.
    Preflight(Vec<crate::auth::PreflightField>),
}

/// Whether a request may reach the app, once the circuit's allowlist let its client
/// in: the credential ([`check_credentials`]), then, for a request the permit cookie
/// admitted, the cross-origin guard ([`crate::auth::check_origin`] against the
/// address the request was sent to and `[worker] allowed_origins`). The cookie goes
/// with every request a same-site page makes, and every app on the worker is
/// same-site to every other (sibling subdomains, or one host on other ports): without
/// the guard, a page of any app could open a WebSocket to a user's terminal or
/// kernel, or post to it, with that user's permit. Bearer tokens are not attached by
/// browsers, and public circuits hold nothing a credential protects, so neither is
/// checked. A CORS preflight to a private circuit is answered by the worker (for a
/// permit-cookie circuit, to a listed origin only). Each refusal is logged here; the
/// caller answers it.
pub(crate) fn admit(
    core: &Core,
    hop: &ClientHop,
    buf: &[u8],
    head: &RequestHead,
    route: &Route,
) -> Result<Admit, crate::auth::Refused> {
    let admitted = check_credentials(core, buf, head, route).inspect_err(|r| {
        tracing::info!(code = r.code, reason = r.message, "credentials refused")
    })?;
    let values = |name| head.values(buf, name);
    match admitted {
        Admitted::Freely | Admitted::Bearer => return Ok(Admit::Forward),
        Admitted::Preflight => {
            let credentialed =
                route.circuit.circuit.app_mode == appproxy_shared::model::AppMode::Interactive;
            let fields = head
                .headers
                .iter()
                .map(|h| (&buf[h.name.clone()], &buf[h.value.clone()]));
            return crate::auth::answer_preflight(fields, credentialed, &core.rt.allowed_origins)
                .map(Admit::Preflight)
                .inspect_err(|_| {
                    let shown =
                        |v: &[u8]| String::from_utf8_lossy(&v[..v.len().min(256)]).into_owned();
                    tracing::info!(
                        origin = %values("origin").next().map(shown).unwrap_or_default(),
                        "cross-origin preflight refused"
                    )
                });
        }
        Admitted::Permit => {}
    }
    let host = addressed_host(hop, buf, head);
    let host = host.as_deref();
    let fetch_site = single_value(buf, head, "sec-fetch-site");
    let allowed = &core.rt.allowed_origins;
    crate::auth::check_origin(values("origin"), host, fetch_site, allowed)
        .map(|()| Admit::Forward)
        .inspect_err(|_| {
            // Bounded: these are the client's bytes.
            let shown = |v: &[u8]| String::from_utf8_lossy(&v[..v.len().min(256)]).into_owned();
            tracing::info!(
                origin = %values("origin").next().map(shown).unwrap_or_default(),
                origin_fields = values("origin").count(),
                host = %host.map(shown).unwrap_or_default(),
                "cross-origin request refused"
            )
        })
}

/// The authority the client addressed: `Host` (`:authority` over HTTP/2), or, from a
/// trusted proxy, its one `X-Forwarded-Host` (a proxy that rewrites `Host` says there
/// what the browser asked for, and the app is told the same). A forwarded host
/// without a port takes the trusted proxy's one `X-Forwarded-Port` when it sends
/// one: nginx's `$host` never carries the port, and a browser on a non-default port
/// (port-mode circuits) names it in its `Origin`.
fn addressed_host<'a>(
    hop: &ClientHop,
    buf: &'a [u8],
    head: &RequestHead,
) -> Option<std::borrow::Cow<'a, [u8]>> {
    use std::borrow::Cow;
    if hop.trusted {
        if let Some(host) = single_value(buf, head, "x-forwarded-host") {
            // A malformed host is passed on as it is (and refused by the guard).
            let has_port = Authority::parse(host).is_none_or(|a| a.port.is_some());
            let port = single_value(buf, head, "x-forwarded-port")
                .filter(|p| !p.is_empty() && p.len() <= 5 && p.iter().all(u8::is_ascii_digit));
            return Some(match (has_port, port) {
                (false, Some(port)) => {
                    let mut joined = Vec::with_capacity(host.len() + 1 + port.len());
                    joined.extend_from_slice(host);
                    joined.push(b':');
                    joined.extend_from_slice(port);
                    Cow::Owned(joined)
                }
                _ => Cow::Borrowed(host),
            });
        }
    }
    head.host.clone().map(|h| Cow::Borrowed(&buf[h]))
}

/// The value of the one field named `name`, trimmed; `None` when there is none,
/// more than one, or a list (a proxy chain's appended values say nothing single).
fn single_value<'b>(buf: &'b [u8], head: &RequestHead, name: &str) -> Option<&'b [u8]> {
    let mut values = head.values(buf, name).map(<[u8]>::trim_ascii);
    match (values.next(), values.next()) {
        (Some(v), None) if !v.contains(&b',') => Some(v),
        _ => None,
    }
}

/// The circuit's credential check: the permit cookie for interactive apps, a bearer
/// JWT for inference. Skipped only for `open_to_public` circuits and for a genuine
/// CORS preflight ([`crate::auth::is_cors_preflight`], which the worker answers
/// itself); every other request, whatever its method, path or `Upgrade`, needs the
/// credential before any byte of it reaches the app.
fn check_credentials(
    core: &Core,
    buf: &[u8],
    head: &RequestHead,
    route: &Route,
) -> Result<Admitted, crate::auth::Refused> {
    let circuit = &route.circuit.circuit;
    if circuit.open_to_public {
        return Ok(Admitted::Freely);
    }
    if head.method == Method::Options
        && head.framing == BodyFraming::Length(0)
        && head.upgrade.is_none()
        && crate::auth::is_cors_preflight(
            head.headers
                .iter()
                .map(|h| (&buf[h.name.clone()], &buf[h.value.clone()])),
        )
    {
        return Ok(Admitted::Preflight);
    }
    let secrets = &core.rt.secrets;
    // Validation refuses non-public circuits without their key; be safe anyway.
    const NO_KEY: crate::auth::Refused = crate::auth::Refused {
        status: 401,
        code: "E20006",
        message: "no key configured for this circuit",
    };
    let values = |name| head.values(buf, name);
    match circuit.app_mode {
        appproxy_shared::model::AppMode::Interactive => {
            let key = secrets.permit_secret.as_deref().ok_or(NO_KEY)?;
            let cookies: Vec<&[u8]> = values("cookie").collect();
            crate::auth::check_permit(
                &cookies,
                key,
                circuit.user_id.as_ref(),
                secrets.permit_digest,
            )
            .map(|()| Admitted::Permit)
        }
        appproxy_shared::model::AppMode::Inference => {
            let key = secrets.jwt_secret.as_deref().ok_or(NO_KEY)?;
            crate::auth::check_bearer(values("authorization"), key, &circuit.id)
                .map(|()| Admitted::Bearer)
        }
    }
}

/// nginx's lingering close, for a connection the worker closes while the client may
/// still be sending (an HTTP/1 answer that closes early, an HTTP/2 `GOAWAY`): the
/// write half is shut (what was written, then FIN) and what the client sends is read
/// into `scratch` and dropped until it closes, stays silent for `[timeouts]
/// lingering_idle_secs`, or `lingering_secs` have passed. Closing at once with bytes
/// unread makes the kernel answer them with an RST, which can destroy the answer or
/// the `GOAWAY` before the client reads it (RFC 9112 §9.6, RFC 9113 §6.8). Not while
/// the core drains, nor for a connection the cap shed; `lingering_secs = 0` turns it
/// off. `sheddable`: the connection may be closed to admit a new one at the cap
/// meanwhile (false while something else still holds its descriptor: closing it
/// would free nothing); drain closes it at once either way.
pub(crate) async fn lingering_close(
    core: &Core,
    conn: &TcpConn,
    scratch: &mut [u8],
    sheddable: bool,
) {
    let rt = &core.rt;
    if rt.lingering_time.is_zero() || core.draining.get() || conn.was_shed() {
        return;
    }
    conn.disarm_read_floor();
    conn.shutdown_write();
    // Nothing in hand: drain closes it at once, and (unless something else holds
    // its descriptor) it makes room for a new connection at the cap.
    conn.set_reusable(sheddable, true);
    let until = core.reactor.now() + rt.lingering_time;
    let mut dropped = 0u64;
    loop {
        let now = core.reactor.now();
        if now >= until || core.draining.get() {
            break;
        }
        conn.set_deadline(Some((now + rt.lingering_idle).min(until)));
        match conn.discard(scratch).await {
            Ok(0) | Err(_) => break,
            Ok(n) => dropped += n as u64,
        }
        // Closed to admit a new connection while the client was still sending:
        // the next deadline must not undo that.
        if conn.was_shed() {
            break;
        }
    }
    // Over: no longer one to close for a new connection at the cap. Its descriptor
    // may outlive this (an HTTP/2 stream still being handled holds it until its
    // task sees the connection's end): shedding it would admit a new connection
    // over the cap and close nothing.
    conn.set_reusable(false, false);
    core.metrics.add(counter::BYTES_IN, dropped);
    tracing::debug!(dropped, "lingering close");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `client_ip_of` over a table: the fields a peer sends, whether the peer is
    /// trusted, the client read (`None`: refused). Trusted: 10.0.0.0/8, 192.0.2.0/24.
    #[test]
    fn the_client_is_read_from_the_right_end_of_a_trusted_chain() {
        let trusted: Vec<_> = ["10.0.0.0/8", "192.0.2.0/24"]
            .into_iter()
            .map(|n| appproxy_shared::model::IpNet::parse(n).expect("net"))
            .collect();
        let many = |n: usize| vec!["10.0.0.9"; n].join(", ");
        #[rustfmt::skip]
        let table: Vec<(String, bool, Option<&str>)> = vec![
            ("".into(), true, Some("10.1.2.3")),
            ("X-Forwarded-For: 7.7.7.7\r\n".into(), false, Some("10.1.2.3")),
            ("X-Forwarded-For: 7.7.7.7\r\n".into(), true, Some("7.7.7.7")),
            ("X-Forwarded-For:  7.7.7.7 \r\n".into(), true, Some("7.7.7.7")),
            ("X-Forwarded-For: 6.6.6.6, 7.7.7.7\r\n".into(), true, Some("7.7.7.7")),
            ("X-Forwarded-For: 7.7.7.7,10.0.0.5 ,\t192.0.2.1\r\n".into(), true, Some("7.7.7.7")),
            ("x-forwarded-for: 7.7.7.7\r\nX-Forwarded-For: 10.0.0.5\r\n".into(), true, Some("7.7.7.7")),
            ("X-Forwarded-For: 10.0.0.5\r\nX-Forwarded-For: 7.7.7.7\r\n".into(), true, Some("7.7.7.7")),
            ("X-Forwarded-For: not read, [::1]:1, 7.7.7.7\r\n".into(), true, Some("7.7.7.7")),
            ("X-Forwarded-For: 10.0.0.1, 10.0.0.2\r\n".into(), true, Some("10.0.0.1")),
            ("X-Forwarded-For: ::ffff:7.7.7.7\r\n".into(), true, Some("7.7.7.7")),
            ("X-Forwarded-For: 2001:db8::7\r\n".into(), true, Some("2001:db8::7")),
            (format!("X-Forwarded-For: {}\r\n", many(16)), true, Some("10.0.0.9")),
            (format!("X-Forwarded-For: {}\r\n", many(17)), true, None),
            (format!("X-Forwarded-For: 7.7.7.7, {}\r\n", many(16)), true, Some("7.7.7.7")),
            (format!("X-Forwarded-For: 7.7.7.7, {}\r\n", many(17)), true, None),
            ("X-Forwarded-For: 7.7.7.7, unknown\r\n".into(), true, None),
            ("X-Forwarded-For: 7.7.7.7:80\r\n".into(), true, None),
            ("X-Forwarded-For: [2001:db8::7]\r\n".into(), true, None),
            ("X-Forwarded-For: 7.7.7.7,\r\n".into(), true, None),
            ("X-Forwarded-For: 7.7.7.7, ,10.0.0.5\r\n".into(), true, None),
            ("X-Forwarded-For: 7.7.7.7\r\nX-Forwarded-For: \r\n".into(), true, None),
            ("X-Forwarded-For: 07.7.7.7\r\n".into(), true, None),
        ];
        for (fields, is_trusted, want) in table {
            let input = format!("GET / HTTP/1.1\r\nHost: h\r\n{fields}\r\n");
            let limits = parse::HeadLimits::default();
            let head = parse::parse_request(input.as_bytes(), &limits)
                .expect("valid")
                .expect("complete");
            let hop = ClientHop::new("10.1.2.3:5555".parse().expect("addr"), 80, is_trusted);
            let got = client_ip_of(&hop, &trusted, input.as_bytes(), &head).ok();
            assert_eq!(got, want.map(|w| w.parse().expect("ip")), "{fields:?}");
        }
    }

    #[test]
    fn kept_storage_is_handed_on_empty_and_bounded() {
        let pool = StoragePool::new(2);
        let mut used = pool.take();
        used.out.extend_from_slice(b"secret of a closed connection");
        used.line.extend_from_slice(b"GET /secret");
        used.fields.push(HeaderField {
            name: 0..1,
            value: 2..3,
        });
        used.resp_fields.push(HeaderField {
            name: 0..1,
            value: 2..3,
        });
        pool.give(used);
        assert_eq!(pool.len(), 1);
        // The next connection gets the allocations, not what they held.
        let next = pool.take();
        assert!(next.out.capacity() >= 4096 && next.line.capacity() >= 11);
        assert!(next.out.is_empty() && next.line.is_empty());
        assert!(next.fields.is_empty() && next.resp_fields.is_empty());
        assert!(pool.is_empty());
        // Storage that grew for a large head is dropped, not kept.
        let mut grown = next;
        grown.out.reserve(StoragePool::KEPT_BYTES + 1);
        pool.give(grown);
        assert!(pool.is_empty());
        // At most `cap` are kept.
        for _ in 0..5 {
            pool.give(ConnStorage::default());
        }
        assert_eq!(pool.len(), 2);
    }
}
