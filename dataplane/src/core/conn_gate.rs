//! The per-core connection gate: the cap on open client connections and, through the
//! worker's one table (`client_table.rs`), the one per client address; the refusals
//! at them (a best-effort 503 or 429 on HTTP frontends,
//! the proxy's usual JSON refusal, written and counted by the common refusal path),
//! the shedding of connections with nothing in hand at the cap, and the
//! once-per-burst accounting of refused connections, failed accepts and local connect
//! failures.

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;

use appproxy_shared::RequestId;

use super::access_log::AccessEntry;
use super::{counter, Core};
use crate::client_table::{ClientTable, ClientUnit};
use crate::http::encode;
use crate::http::error::{ProxyError, Refusal};
use crate::io::{CountGuard, TcpConn};

/// The per-core connection cap: how many client connections are open, how many may
/// be, and the state of the current refusal or accept-failure burst (one log line
/// per burst, not per connection).
pub struct ConnGate {
    /// Open client connections (every frontend and the API port).
    open: Rc<Cell<usize>>,
    /// The cap.
    pub cap: usize,
    /// Streams from HTTP/2 clients to apps the core may have open at once
    /// (`[http2] max_app_streams`, held within the descriptor limit when the cap is
    /// derived from it): a stream to an HTTP/1.1 app holds an app connection of its
    /// own, which no client connection's place in the cap counts.
    pub app_streams: usize,
    /// Connections refused since the cap was last left.
    refused_in_burst: Cell<u64>,
    /// Open connections per client address on every core of the worker, with
    /// `[limits] max_connections_per_client`.
    clients: Arc<ClientTable>,
    /// Connections refused for their client address since the last log line.
    client_refusals: Cell<u64>,
    /// Connections refused for their PROXY protocol header since the last log line.
    proxy_protocol_refusals: Cell<u64>,
    /// Connections with nothing in hand closed to admit new ones since the cap was
    /// last left.
    shed_in_burst: Cell<u64>,
    /// Failed accepts since the last successful one.
    failed_in_burst: Cell<u64>,
    /// Upstream connects that failed for a local reason since the last one that
    /// worked.
    local_in_burst: Cell<u64>,
}

/// Connections admitted over the cap while those closed to make room for them have
/// not yet run their close (a burst of accepts within one turn of the core): each may
/// hold an app connection too, so twice this stays within [`DESCRIPTOR_HEADROOM`].
const SHED_SLACK: usize = 32;

/// Descriptors left aside for everything that is not a client connection or its
/// upstream connection (listeners, pooled connections, the admin thread, logs).
const DESCRIPTOR_HEADROOM: u64 = 128;

impl ConnGate {
    /// The gate of one of `cores` cores; `cap` 0 derives the cap from the descriptor
    /// limit: the limit is shared by every core, [`DESCRIPTOR_HEADROOM`] stays free,
    /// each proxied connection costs two descriptors, and with HTTP/2 on (`h2`) the
    /// streams from HTTP/2 clients to apps (`app_streams`, one app connection each at
    /// most) take their place first, at most a quarter of the core's share. `clients`
    /// is the worker's one count per client address.
    pub(super) fn new(
        cap: usize,
        (app_streams, h2): (usize, bool),
        cores: usize,
        cpu: usize,
        clients: Arc<ClientTable>,
    ) -> Self {
        let (cap, app_streams) = if cap > 0 {
            (cap, app_streams)
        } else {
            let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .unwrap_or(1 << 20);
            let (cap, app_streams) = derived_cap(nofile, cores, app_streams, h2);
            tracing::info!(
                core = cpu,
                cap,
                app_streams,
                nofile,
                "connection cap per core derived from the descriptor limit ([limits] max_connections_per_core = 0)"
            );
            (cap, app_streams)
        };
        Self {
            open: Rc::new(Cell::new(0)),
            cap,
            app_streams,
            refused_in_burst: Cell::new(0),
            shed_in_burst: Cell::new(0),
            clients,
            client_refusals: Cell::new(0),
            proxy_protocol_refusals: Cell::new(0),
            failed_in_burst: Cell::new(0),
            local_in_burst: Cell::new(0),
        }
    }

    /// Open client connections now.
    pub fn open(&self) -> usize {
        self.open.get()
    }
}

/// The connection cap and the budget of streams to apps of one of `cores` cores under
/// the descriptor limit `nofile` ([`ConnGate::new`]): `app_streams` as configured,
/// within a quarter of the core's share when HTTP/2 is on (`h2`), the rest of the
/// share at two descriptors a connection. Together they never pass the share: a few
/// HTTP/2 clients' streams to a silent app once took the descriptors the cap had
/// promised to client connections.
fn derived_cap(nofile: u64, cores: usize, app_streams: usize, h2: bool) -> (usize, usize) {
    let share = nofile.saturating_sub(DESCRIPTOR_HEADROOM) / cores.max(1) as u64;
    let streams = match h2 {
        true => (app_streams as u64).min(share / 4).max(1),
        false => app_streams as u64,
    };
    let for_connections = match h2 {
        true => share.saturating_sub(streams),
        false => share,
    };
    let cap = (for_connections / 2).clamp(16, 1 << 20) as usize;
    (cap, streams as usize)
}

/// Counts one more event in `count` (modulo 1024): whether it is the first of a run
/// of 1024, the one that is logged.
fn first_of_1024(count: &Cell<u64>) -> bool {
    let n = (count.get() + 1) % 1024;
    count.set(n);
    n == 1
}

impl Core {
    /// Decides whether a just-accepted connection on `port` may be served: below the
    /// cap it is registered with the reactor and holds a unit of the open count for
    /// its life. At the cap, the connection that has had nothing in hand the longest
    /// (waiting for a request, or lingering: nginx's reusable connections) is closed
    /// to make room, and the new one is served; the core is over its cap until that
    /// one's task has run (by at most [`SHED_SLACK`]). With none to close, it is
    /// refused — counted, logged once per burst, sent a best-effort 503 JSON when the
    /// frontend speaks HTTP — and closed (`None`). Busy connections (a request in hand, a tunnel) are never
    /// closed for a new one.
    ///
    /// Before the cap, a client address that has `[limits]
    /// max_connections_per_client` open on the worker's cores together (untrusted
    /// peers only) is refused the same way, with a 429: it is not served by shedding
    /// others.
    pub fn admit(
        &self,
        stream: std::net::TcpStream,
        port: u16,
        peer: SocketAddr,
    ) -> Option<std::io::Result<TcpConn>> {
        if self.speaks_proxy_protocol(port) && !self.is_trusted(peer.ip()) {
            // Anyone else could name any client address.
            self.refuse_proxy_protocol(port, peer, &"the peer is not in [worker] trusted_proxies");
            return None;
        }
        let per_client = match self.client_admission(peer.ip(), true) {
            Ok(guard) => guard,
            Err(()) => {
                self.refuse_client(&stream, port, peer.ip());
                return None;
            }
        };
        let guard = self.admission(&stream, port, peer.ip())?;
        Some(TcpConn::new(&self.reactor, stream).map(|mut conn| {
            conn.mark_client();
            conn.count_in(guard);
            if let Some(unit) = per_client {
                conn.count_client_in(unit);
            }
            conn
        }))
    }

    /// Whether connections to `port` start with a PROXY protocol header (`[worker]
    /// proxy_protocol`: every frontend, not the `/setup` API port).
    pub fn speaks_proxy_protocol(&self, port: u16) -> bool {
        self.rt.proxy_protocol && Some(port) != self.rt.api_port
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.rt.trusted_proxies.iter().any(|n| n.contains(ip))
    }

    /// Admits the client a PROXY protocol header named on `conn` (accepted from a
    /// trusted proxy, so not counted yet) under `[limits]
    /// max_connections_per_client`; `false`: refused as [`Core::admit`] refuses,
    /// and the connection is to be closed. `named` false: the header named no client
    /// (v1 `UNKNOWN`, v2 `LOCAL`) and `client` is the balancer's own address,
    /// counted like any client's rather than exempt as the trusted proxy's: such
    /// clients (HAProxy's on a UNIX socket) cannot be told apart, so they share one
    /// address's limit instead of having none.
    pub fn admit_proxied_client(
        &self,
        conn: &mut TcpConn,
        port: u16,
        client: IpAddr,
        named: bool,
    ) -> bool {
        match self.client_admission(client, named) {
            Ok(Some(unit)) => {
                conn.count_client_in(unit);
                true
            }
            Ok(None) => true,
            Err(()) => {
                self.refuse_client(conn.socket(), port, client);
                false
            }
        }
    }

    /// Counts, logs (once per 1024) and answers a connection whose client address
    /// is at `[limits] max_connections_per_client`.
    fn refuse_client(&self, stream: &std::net::TcpStream, port: u16, client: IpAddr) {
        self.metrics.add(counter::CONN_REFUSED_PER_CLIENT, 1);
        if first_of_1024(&self.conns.client_refusals) {
            tracing::warn!(
                core = self.cpu,
                port,
                client = %client,
                limit = self.rt.max_connections_per_client,
                "a client address is at its connection limit: refusing its new connections ([limits] max_connections_per_client; logged once per 1024 refusals)"
            );
        }
        self.answer_at_accept(stream, port, client, ProxyError::ClientConnectionLimit);
    }

    /// Counts and logs (once per 1024) a connection closed unserved for its PROXY
    /// protocol header: `why` says what was wrong.
    pub fn refuse_proxy_protocol(&self, port: u16, peer: SocketAddr, why: &dyn std::fmt::Display) {
        self.metrics.add(counter::PROXY_PROTOCOL_REFUSED, 1);
        if first_of_1024(&self.conns.proxy_protocol_refusals) {
            tracing::warn!(
                core = self.cpu,
                port,
                peer = %peer,
                reason = %why,
                "connection closed without a valid PROXY protocol header ([worker] proxy_protocol; logged once per 1024)"
            );
        }
    }

    /// A unit of the count of `ip`'s connections (`None` when the limit is off, or
    /// the peer is a trusted proxy and `trusted_exempt`), or `Err` when the address
    /// is at its limit.
    fn client_admission(&self, ip: IpAddr, trusted_exempt: bool) -> Result<Option<ClientUnit>, ()> {
        let limit = self.rt.max_connections_per_client;
        if limit == 0 || (trusted_exempt && self.is_trusted(ip)) {
            return Ok(None);
        }
        self.conns.clients.take(ip, limit).map(Some).ok_or(())
    }

    fn admission(
        &self,
        stream: &std::net::TcpStream,
        port: u16,
        client: IpAddr,
    ) -> Option<CountGuard> {
        let gate = &self.conns;
        let failed = gate.failed_in_burst.replace(0);
        if failed > 0 {
            tracing::info!(core = self.cpu, port, failed, "accepting again");
        }
        let open = gate.open.get();
        if let Some(guard) = CountGuard::take(&gate.open, gate.cap) {
            // The burst ends once the core is clearly below the cap again (a tenth of
            // it free), not at every connection that slips in between refusals.
            if open + gate.cap / 10 < gate.cap {
                let refused = gate.refused_in_burst.replace(0);
                let shed = gate.shed_in_burst.replace(0);
                if refused > 0 || shed > 0 {
                    tracing::info!(
                        core = self.cpu,
                        refused,
                        shed,
                        cap = gate.cap,
                        "connection cap: accepting again after refusing connections"
                    );
                }
            }
            return Some(guard);
        }
        if open < gate.cap + SHED_SLACK && self.reactor.shed_reusable() {
            self.metrics.add(counter::CONN_SHED, 1);
            let shed = gate.shed_in_burst.get() + 1;
            gate.shed_in_burst.set(shed);
            if shed == 1 {
                tracing::warn!(
                    core = self.cpu,
                    port,
                    cap = gate.cap,
                    "connection cap reached: closing connections with nothing in hand to admit new ones ([limits] max_connections_per_core)"
                );
            }
            return CountGuard::take(&gate.open, gate.cap + SHED_SLACK);
        }
        self.metrics.add(counter::CONN_REFUSED, 1);
        let refused = gate.refused_in_burst.get() + 1;
        gate.refused_in_burst.set(refused);
        if refused == 1 {
            tracing::warn!(
                core = self.cpu,
                port,
                cap = gate.cap,
                "connection cap reached: refusing new connections until some close ([limits] max_connections_per_core)"
            );
        }
        self.answer_at_accept(stream, port, client, ProxyError::ConnectionLimit);
        None
    }

    /// The answer of a connection of `client` refused at accept: the proxy's own JSON
    /// refusal on a plain HTTP frontend (one non-blocking write into an empty send
    /// buffer, never waited on), nothing on a TLS or TCP one, where plaintext would
    /// be garbage to the client; it is then closed. An answer names a request ID, so
    /// it gets the access line that ID finds (method and path `-`: no byte of the
    /// request was read), as a refused head does; the warning above it is logged
    /// once per burst.
    fn answer_at_accept(
        &self,
        stream: &std::net::TcpStream,
        port: u16,
        client: IpAddr,
        err: ProxyError,
    ) {
        let route = self.route_for_port(port);
        let raw_tcp = route.as_ref().is_some_and(|r| {
            r.circuit.circuit.protocol == appproxy_shared::model::ProxyProtocol::Tcp
        });
        if raw_tcp || self.rt.tls.is_some() {
            return;
        }
        let id = RequestId::generate(self.rt.id_version);
        let r = Refusal::from(err);
        let mut answer = Vec::with_capacity(256);
        encode::refusal_response(&mut answer, &r, &id, encode::Keep::Close, false);
        let sent = std::io::Write::write(&mut &*stream, &answer).unwrap_or(0);
        self.count_refusal(&r);
        self.metrics.add(counter::BYTES_OUT, sent as u64);
        self.record(&AccessEntry {
            // A port frontend's circuit; a wildcard frontend's is in the unread head.
            circuit: route.as_deref().map(|r| &r.circuit.circuit),
            ..AccessEntry::unread(&id, client, r.status, sent as u64)
        });
    }

    /// Records an upstream connect that failed for a local reason (counted, logged
    /// once per burst).
    pub fn local_connect_failure(&self, upstream: SocketAddr, error: &std::io::Error) {
        self.metrics.add(counter::LOCAL_ERRORS, 1);
        let n = self.conns.local_in_burst.get() + 1;
        self.conns.local_in_burst.set(n);
        if n == 1 {
            tracing::error!(
                core = self.cpu,
                upstream = %upstream,
                error = %error,
                "cannot connect upstream: the proxy is out of local resources (answered 503, not counted against the upstream)"
            );
        }
    }

    /// Records an upstream connect that worked (ends a burst of local failures).
    pub fn connect_succeeded(&self) {
        let n = self.conns.local_in_burst.replace(0);
        if n > 0 {
            tracing::info!(
                core = self.cpu,
                failed = n,
                "upstream connects work again after local resource failures"
            );
        }
    }

    /// Out of file descriptors (`error`): closes the core's idle app connections
    /// to free some, logged with their count. Whether any was closed (then what
    /// failed is worth trying again at once). Before, the pool's idle connections
    /// (up to 128 per app address, counted in no cap) held their descriptors while
    /// a new client waited in the listen backlog for one, unanswered, and
    /// requests were refused 503 (an outside tester's find).
    pub fn shed_idle_for(&self, error: &std::io::Error) -> bool {
        if !is_out_of_descriptors(error) {
            return false;
        }
        let shed = self.pool.shed_idle();
        if shed > 0 {
            tracing::warn!(
                core = self.cpu,
                closed = shed,
                "out of file descriptors: idle app connections closed to free them"
            );
        }
        shed > 0
    }

    /// Records a failed accept on `port` (counted, logged once per burst) and
    /// returns how long the accept loop backs off before trying again.
    pub fn accept_failed(&self, port: u16, error: &std::io::Error) -> std::time::Duration {
        self.metrics.add(counter::ACCEPT_ERRORS, 1);
        let failed = self.conns.failed_in_burst.get() + 1;
        self.conns.failed_in_burst.set(failed);
        if failed == 1 {
            let hint = if is_out_of_descriptors(error) {
                "out of file descriptors: raise LimitNOFILE or lower [limits] max_connections_per_core"
            } else {
                "backing off"
            };
            tracing::error!(core = self.cpu, port, error = %error, hint, "accept failed");
        }
        std::time::Duration::from_millis(50)
    }
}

/// Whether an error is the process (`EMFILE`) or the system (`ENFILE`) running out
/// of file descriptors.
pub fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    let code = e.raw_os_error();
    code == Some(rustix::io::Errno::MFILE.raw_os_error())
        || code == Some(rustix::io::Errno::NFILE.raw_os_error())
}

/// Whether a failed connect was this host's fault rather than the upstream's:
/// descriptors, memory or local ports exhausted. Such failures are never counted
/// against the upstream's health.
pub fn is_local_error(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    is_out_of_descriptors(e)
        || [
            Errno::NOBUFS,
            Errno::NOMEM,
            Errno::ADDRNOTAVAIL,
            Errno::NOSPC,
        ]
        .iter()
        .any(|c| e.raw_os_error() == Some(c.raw_os_error()))
}

#[cfg(test)]
mod tests {
    use super::derived_cap;

    #[test]
    fn the_derived_cap_and_app_streams_stay_within_the_descriptor_limit() {
        // (nofile, cores, max_app_streams, h2) → (cap, app streams)
        let table = [
            // HTTP/2 off: two descriptors a connection, streams as configured.
            (4096, 2, 2048, false, (992, 2048)),
            // On, a small limit: streams within a quarter of the core's share.
            (4096, 2, 2048, true, (744, 496)),
            // On, a large limit: streams as configured, the rest for connections.
            (1 << 20, 2, 2048, true, (261_088, 2048)),
            (1 << 20, 1, 2048, true, (523_200, 2048)),
            // Tiny: the floors.
            (130, 1, 2048, true, (16, 1)),
        ];
        for (nofile, cores, streams, h2, want) in table {
            let (cap, app) = derived_cap(nofile, cores, streams, h2);
            assert_eq!((cap, app), want, "nofile {nofile}, {cores} cores, h2 {h2}");
            if h2 && cap > 16 {
                let used = (cap as u64 * 2 + app as u64) * cores as u64;
                assert!(used + 128 <= nofile, "{used} descriptors of {nofile}");
            }
        }
    }
}
