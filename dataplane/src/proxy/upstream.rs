//! The app's side of an exchange: opening connections (per-core cap, one alternative
//! upstream on a failed connect, TLS to an app that serves it), passive health, and
//! reading a response head. Shared with the HTTP/2 paths.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use appproxy_shared::model::UpstreamTls;

use super::retry::Retry;
use super::{Failure, Left};
use crate::core::{counter, Core, Route};
use crate::http::error::{ProxyError, ResponseError};
use crate::http::parse::{self, Method, ResponseHead};
use crate::io::TcpConn;
use crate::relay::{self, ReadBuf};

/// What an exchange's access line says of its app side however the exchange ends:
/// the app it went to last (connected to, or tried and not reached) and the request
/// body bytes handed to it. A 502 or 504 line thus names the app that failed and
/// counts what it was given, as nginx's `$upstream_addr` does, rather than only the
/// request head.
#[derive(Debug, Default)]
pub struct AppSide {
    /// The app tried last.
    pub(crate) addr: Cell<Option<SocketAddr>>,
    /// The request body's payload bytes the app was given.
    pub(crate) body_in: Cell<u64>,
    /// The interim heads (103 …) relayed to the client before a final one: the
    /// access line's `bytes_out` counts them however the exchange ends.
    pub(crate) interim_out: Cell<u64>,
}

impl AppSide {
    /// `addr` is tried next.
    pub(crate) fn tried(&self, addr: SocketAddr) {
        self.addr.set(Some(addr));
    }
}

/// Records an exchange's outcome in the route's passive health.
pub(crate) fn note_health(core: &Core, route: &Route, addr: SocketAddr, ok: bool) {
    let policy = core.health_policy();
    if route.record(addr, ok, core.reactor.now(), policy) {
        tracing::warn!(upstream = %addr, failures = policy.threshold, backoff_secs = policy.backoff.as_secs(), "upstream marked unhealthy");
    }
}

/// Connects to `addr`; when that fails, records it and tries one other upstream of
/// the route (connect failures are safe to retry: nothing was sent). An upstream at
/// its connection cap is skipped the same way, without counting against its health;
/// a local failure (out of descriptors …) is answered at once: it is nobody's health
/// and another upstream would fail the same way.
/// `side` is told each app tried.
pub(crate) async fn connect_route(
    core: &Core,
    route: &Route,
    addr: SocketAddr,
    side: &AppSide,
) -> Result<(TcpConn, SocketAddr), Failure> {
    side.tried(addr);
    match connect(core, route, addr).await {
        Ok(c) => Ok((c, addr)),
        Err(ConnectError::Local(e)) => Err(ConnectError::Local(e).into()),
        // A connect the drain's deadline cut: no other app is tried, and the app is
        // not held against its health.
        Err(first) if core.cut_off.get() => Err(first.into()),
        Err(first) => {
            if matches!(first, ConnectError::Upstream(_)) {
                note_health(core, route, addr, false);
            }
            match route.pick(core.draw(), core.reactor.now(), Some(addr)) {
                Some(alt) if alt != addr => {
                    side.tried(alt);
                    match connect(core, route, alt).await {
                        Ok(c) => Ok((c, alt)),
                        Err(e) => {
                            if matches!(e, ConnectError::Upstream(_)) {
                                note_health(core, route, alt, false);
                            }
                            Err(e.into())
                        }
                    }
                }
                _ => Err(first.into()),
            }
        }
    }
}

/// Why no upstream connection was opened.
pub(crate) enum ConnectError {
    /// The upstream already has the most connections this core may open to it.
    Busy,
    /// A local failure: descriptors, memory or ports of this host ran out.
    Local(io::Error),
    /// The upstream refused, was unreachable or did not answer in time.
    Upstream(io::Error),
}

impl ConnectError {
    /// The same failure again, for each of the streams that waited on one dial.
    pub(crate) fn again(&self) -> Self {
        let copy = |e: &io::Error| match e.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(e.kind(), e.to_string()),
        };
        match self {
            Self::Busy => Self::Busy,
            Self::Local(e) => Self::Local(copy(e)),
            Self::Upstream(e) => Self::Upstream(copy(e)),
        }
    }
}

impl From<ConnectError> for Failure {
    fn from(e: ConnectError) -> Self {
        let err = match e {
            ConnectError::Busy => ProxyError::UpstreamBusy,
            ConnectError::Local(e) => ProxyError::LocalResources(e),
            ConnectError::Upstream(e) => ProxyError::UpstreamConnect(e),
        };
        Failure::Answer(err, Left::Whole)
    }
}

/// Opens a new connection to `addr`, counted in its per-core cap until it closes.
pub(crate) async fn connect(
    core: &Core,
    route: &Route,
    addr: SocketAddr,
) -> Result<TcpConn, ConnectError> {
    connect_alpn(core, route, addr, false).await
}

/// How `route` connects to its app at `addr`: TLS mode and server name, or `None`
/// for plain TCP, and whether its HTTP/1.1 app connections are reused by client
/// (the circuit's `upstream_reuse`, else `[upstream] reuse`). Also what a pooled
/// connection must have been made with, and who may take it, to be reused for the
/// route ([`crate::core::pool`]).
pub(crate) fn kind_of(route: &Route, addr: SocketAddr) -> crate::core::pool::Kind<'_> {
    let circuit = &*route.circuit;
    crate::core::pool::Kind {
        tls: circuit
            .upstream_tls
            .iter()
            .find(|(a, _, _)| *a == addr)
            .map(|(_, mode, name)| (*mode, name.as_str())),
        private: circuit.reuse_by_client,
    }
}

/// [`connect`], offering ALPN `h2` instead of `http/1.1` to an app that serves TLS
/// (`http2` and `grpc` circuits).
pub(crate) async fn connect_alpn(
    core: &Core,
    route: &Route,
    addr: SocketAddr,
    h2: bool,
) -> Result<TcpConn, ConnectError> {
    connect_as(core, kind_of(route, addr).tls, addr, h2).await
}

/// [`connect_alpn`] to an app served as `tls` says (its mode and server name; `None`:
/// plain TCP), for a dial that outlives the route it was made for.
pub(crate) async fn connect_as(
    core: &Core,
    tls: Option<(UpstreamTls, &str)>,
    addr: SocketAddr,
    h2: bool,
) -> Result<TcpConn, ConnectError> {
    let Some(slot) = core.pool.reserve(addr) else {
        core.metrics.add(counter::UPSTREAM_LIMIT, 1);
        tracing::debug!(upstream = %addr, cap = core.rt.max_upstream_conns, "upstream connection limit reached on this core ([upstream] max_connections_per_route)");
        return Err(ConnectError::Busy);
    };
    let mut connected = TcpConn::connect(&core.reactor, addr, core.rt.connect_timeout).await;
    // Out of descriptors: idle app connections give theirs back, and the connect
    // is tried once more.
    if connected.as_ref().is_err_and(|e| core.shed_idle_for(e)) {
        connected = TcpConn::connect(&core.reactor, addr, core.rt.connect_timeout).await;
    }
    match connected {
        Ok(mut conn) => {
            conn.count_in(slot);
            core.connect_succeeded();
            // An app that serves HTTPS: the handshake is part of the connect.
            if let Some((mode, name)) = tls {
                let session = core
                    .rt
                    .upstream_tls
                    .session_alpn(mode, name, h2)
                    .map_err(|e| ConnectError::Upstream(io::Error::other(e)))?;
                conn.start_tls(session);
                conn.set_deadline(Some(Instant::now() + core.rt.connect_timeout));
                if let Err(e) = conn.handshake().await {
                    tracing::warn!(upstream = %addr, name = %name, error = %e, "upstream TLS handshake failed");
                    if e.kind() == io::ErrorKind::TimedOut {
                        core.metrics.add(counter::TIMEOUT_UPSTREAM_TLS_HANDSHAKE, 1);
                    }
                    return Err(ConnectError::Upstream(e));
                }
                conn.set_deadline(None);
            }
            Ok(conn)
        }
        Err(e) if crate::core::is_local_error(&e) => {
            core.local_connect_failure(addr, &e);
            Err(ConnectError::Local(e))
        }
        Err(e) => {
            tracing::warn!(upstream = %addr, error = %e, "upstream connect failed");
            if e.kind() == io::ErrorKind::TimedOut {
                core.metrics.add(counter::TIMEOUT_UPSTREAM_CONNECT, 1);
            }
            Err(ConnectError::Upstream(e))
        }
    }
}

/// Why no response head was read from the app.
pub(crate) enum HeadFailure {
    /// The connection closed or broke first (a dead pooled connection looks so).
    Closed(io::Error),
    /// No complete head within `[timeouts] upstream_head_secs`.
    Timeout,
    /// The head is malformed or too large.
    Invalid(ResponseError),
    /// The client watched during the wait is gone (reset or hung up, or closed
    /// with `[upstream] abort_on_client_close`): nobody to answer.
    ClientGone,
}

impl HeadFailure {
    /// Whether this failure may be retried: only a connection that died, and only
    /// when it was a reused one (the rule is [`super::retry::may_retry`]).
    pub(crate) fn retry(&self) -> Retry {
        match self {
            HeadFailure::Closed(_) => Retry::IfReused,
            HeadFailure::Timeout | HeadFailure::Invalid(_) | HeadFailure::ClientGone => {
                Retry::Never
            }
        }
    }

    /// The error answered for it.
    pub(crate) fn into_error(self) -> ProxyError {
        match self {
            HeadFailure::Closed(e) => ProxyError::UpstreamClosed(e),
            HeadFailure::Timeout => ProxyError::UpstreamTimeout,
            HeadFailure::Invalid(e) => ProxyError::UpstreamResponse(e),
            // Never answered (there is no one to answer): what the app's connection
            // was when the exchange was given up.
            HeadFailure::ClientGone => ProxyError::UpstreamClosed(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the client left before the app answered",
            )),
        }
    }
}

/// Most interim (1xx) responses accepted before a final one; past it the exchange is
/// ended and the upstream connection discarded.
pub(crate) const MAX_INTERIM: usize = 5;

/// Reads `upstream` into `ubuf` until a complete response head to `method` is there
/// (within `[timeouts] upstream_head_secs`). The head's field list takes `fields`'
/// allocation (recycled from the response before). `client`, when given, is watched
/// while the app is silent ([`relay::fill_watching`]): one gone as its
/// [`relay::Gone`] says (reset or hung up; or its end of stream too, with
/// `[upstream] abort_on_client_close`) ends the wait (`ClientGone`), rather than
/// holding both connections for as long as the app may take; otherwise one that
/// only ended its side still gets its answer.
pub(crate) async fn read_response_head(
    core: &Core,
    upstream: &TcpConn,
    ubuf: &mut ReadBuf,
    fields: &mut Vec<parse::HeaderField>,
    method: Method,
    client: Option<(&TcpConn, relay::Gone)>,
) -> Result<ResponseHead, HeadFailure> {
    upstream.set_timeout(core.rt.upstream_head_timeout);
    let max_head = core.rt.max_response_head;
    loop {
        if let Some(head) = parse::parse_response_reusing(ubuf.filled(), method, max_head, fields)
            .map_err(HeadFailure::Invalid)?
        {
            return Ok(head);
        }
        let limit = core.rt.max_response_head + 1024;
        let filled = match client {
            Some((client, gone)) => relay::fill_watching(ubuf, upstream, limit, client, gone)
                .await
                .ok_or(HeadFailure::ClientGone)?,
            None => ubuf.fill(upstream, limit).await,
        };
        match filled {
            Ok(0) => {
                return Err(HeadFailure::Closed(io::ErrorKind::UnexpectedEof.into()));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(HeadFailure::Timeout),
            Err(e) if e.kind() == io::ErrorKind::OutOfMemory => {
                return Err(HeadFailure::Invalid(ResponseError::HeadTooLarge))
            }
            Err(e) => return Err(HeadFailure::Closed(e)),
        }
    }
}
