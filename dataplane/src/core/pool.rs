//! The per-core keep-alive pool of upstream connections, with its per-upstream cap
//! on open connections. A pooled connection is reused only by a route that would
//! have made the same one: same address, and same TLS (mode and server name), so
//! that a route that checks the app's certificate never gets a connection that
//! another route to the same address made without checking, or under another name.
//! Plain and TLS connections are kept apart: the plain ones (the usual case) go
//! in and out as they did before TLS was told apart, with no name to compare.
//!
//! A connection whose last response had no body by rule (an answer to `HEAD`, a
//! 204 or a 304) is held for its last client for [`SETTLE`] before another client
//! may have it: an app that sends such a response's body anyway, in a later write,
//! would otherwise have those bytes read as the next client's response (and every
//! answer after it shifted by one), since a connection taken a moment after it was
//! put back has nothing to show yet. Its own client reuses it at once, as it would
//! on a direct connection to the app, and the hold goes on through that reuse (the
//! bytes may still come after the own client's next answer, and shift it): it ends
//! [`SETTLE`] after the bodiless answer, whatever the connection carried since.
//!
//! A route whose circuit reuses app connections by client (`upstream_reuse =
//! "client"`, or the worker's `[upstream] reuse`: [`Kind::private`]) keeps its
//! connections apart from everyone else's, though the pool is keyed by address and
//! circuits of either kind may share an app's: such a route puts a connection back
//! held for its client for good (until the client connection closes,
//! [`Pool::release_owner`], or the connection expires), and takes only a
//! connection so held for its own client. A shared route takes no such connection,
//! not even its own client's, and a private route no shared one, even its own
//! client's (another client's request may have gone out on it before): so a
//! connection that ever carried a private route's request carries no other
//! client's, and one opened for a shared route is never held back by a private
//! one. A client connection using both kinds of circuit to one app has a
//! connection for each.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use appproxy_shared::model::UpstreamTls;

use super::FastMap;
use crate::io::{CountGuard, TcpConn};

/// What a pooled connection to an address must have been made with to serve a
/// route, and who may reuse it ([`crate::proxy::kind_of`] gives a route's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind<'a> {
    /// TLS mode and server name, `None` for plain TCP.
    pub tls: Option<(UpstreamTls, &'a str)>,
    /// Reused only by the client connection that opened it (the circuit reuses
    /// app connections by client).
    pub private: bool,
}

/// `held_ms` of a connection held for its client for good: one a private route
/// put back ([`Kind::private`]). Ordinary holds are far shorter ([`SETTLE`]).
const PRIVATE: u16 = u16::MAX;

/// An idle TLS connection, with the mode and server name it was made with.
struct TlsIdle {
    idle: Idle,
    mode: UpstreamTls,
    name: Box<str>,
}

/// An idle pooled connection.
struct Idle {
    /// The connection.
    conn: TcpConn,
    /// When it went idle.
    since: Instant,
    /// The client connection its last request came from.
    owner: u64,
    /// Only `owner` may take it until this many milliseconds after `since` (the
    /// rest of a hold: [`SETTLE`] from the last bodiless answer); [`PRIVATE`]: only
    /// `owner`, through a private route, ever.
    held_ms: u16,
}

/// How long a connection whose last response had no body by rule is kept for its
/// own client before another may take it: longer than a delayed ACK (40 ms to
/// 200 ms on Linux) that holds back an app's second small write.
pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(250);

/// Who put a connection back, and whether it is to be held for them ([`SETTLE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The client connection (a per-core number) the last request came from.
    pub owner: u64,
    /// The last response had no body by rule (`HEAD`, 204, 304).
    pub bodiless: bool,
}

impl Idle {
    /// Whether `owner` may take it now for a route that is `private` or not: a
    /// private route only its own private connection; a shared route any shared
    /// one not held for another client (the usual case, `held_ms == 0`, decided by
    /// the first two comparisons).
    #[inline]
    fn open_to(&self, owner: u64, now: Instant, private: bool) -> bool {
        if private {
            return self.owner == owner && self.held_ms == PRIVATE;
        }
        self.held_ms == 0
            || (self.held_ms != PRIVATE
                && (self.owner == owner
                    || now.saturating_duration_since(self.since).as_millis()
                        >= u128::from(self.held_ms)))
    }

    /// When its hold ends, if it is held for a while (not for good).
    fn hold_end(&self) -> Option<Instant> {
        (self.held_ms > 0 && self.held_ms != PRIVATE)
            .then(|| self.since + std::time::Duration::from_millis(u64::from(self.held_ms)))
    }
}

/// Per-core keep-alive pool of upstream connections.
pub struct Pool {
    /// Idle plain connections by upstream address, most recent last.
    idle: RefCell<FastMap<SocketAddr, Vec<Idle>>>,
    /// Idle TLS connections by upstream address, most recent last.
    idle_tls: RefCell<FastMap<SocketAddr, Vec<TlsIdle>>>,
    /// Cap per address.
    max_idle: usize,
    /// Idle lifetime.
    idle_timeout: std::time::Duration,
    /// Open connections (in use and idle) per upstream address; each connection
    /// holds one unit ([`CountGuard`]) until it closes.
    open: RefCell<FastMap<SocketAddr, Rc<Cell<usize>>>>,
    /// Cap on `open` per address.
    max_open: usize,
    /// Held connections their own client took during the hold (by descriptor), and
    /// when the hold ends: put back, they are held until then still. A few at most,
    /// each forgotten once its hold has ended.
    lent: RefCell<Vec<(std::os::fd::RawFd, Instant)>>,
    /// The addresses each client connection put private connections back for
    /// ([`Kind::private`]), so that its close looks at those lists only; empty
    /// while no circuit reuses by client.
    owned: RefCell<FastMap<u64, Vec<SocketAddr>>>,
}

impl Pool {
    /// An empty pool.
    pub fn new(max_idle: usize, idle_timeout: std::time::Duration, max_open: usize) -> Self {
        Self {
            idle: RefCell::new(FastMap::default()),
            idle_tls: RefCell::new(FastMap::default()),
            max_idle,
            idle_timeout,
            open: RefCell::new(FastMap::default()),
            max_open: max_open.max(1),
            lent: RefCell::new(Vec::new()),
            owned: RefCell::new(FastMap::default()),
        }
    }

    /// Closes the private idle connections ([`Kind::private`]) client connection
    /// `owner` put back, now that it has closed: nobody else may take them. Its
    /// shared ones stay for others. Nothing to do while no route is private.
    pub fn release_owner(&self, owner: u64) {
        let addrs = {
            let mut owned = self.owned.borrow_mut();
            if owned.is_empty() {
                return;
            }
            let Some(addrs) = owned.remove(&owner) else {
                return;
            };
            addrs
        };
        let own = |e: &Idle| e.owner == owner && e.held_ms == PRIVATE;
        for addr in addrs {
            if let Some(list) = self.idle.borrow_mut().get_mut(&addr) {
                list.retain(|e| !own(e));
            }
            if let Some(list) = self.idle_tls.borrow_mut().get_mut(&addr) {
                list.retain(|e| !own(&e.idle));
            }
        }
    }

    /// One unit of `addr`'s open-connection count for a new connection, or `None`
    /// when the upstream already has `max_open` connections on this core (pool
    /// misses only: a pooled connection already holds its unit). At the cap, an
    /// idle connection to `addr` that could not be taken (held for another client,
    /// or made with other TLS) is closed to make room.
    pub fn reserve(&self, addr: SocketAddr) -> Option<CountGuard> {
        let count = self.open.borrow_mut().entry(addr).or_default().clone();
        if let Some(unit) = CountGuard::take(&count, self.max_open) {
            return Some(unit);
        }
        // The oldest idle one closes (its unit goes back as it drops).
        let closed = match self.idle.borrow_mut().get_mut(&addr) {
            Some(list) if !list.is_empty() => Some(list.remove(0).conn),
            _ => None,
        }
        .or_else(|| match self.idle_tls.borrow_mut().get_mut(&addr) {
            Some(list) if !list.is_empty() => Some(list.remove(0).idle.conn),
            _ => None,
        });
        drop(closed?);
        CountGuard::take(&count, self.max_open)
    }

    /// A live idle connection to `addr` made as `kind` says that `owner` may take
    /// for a route of that kind, if one is pooled (`now`: the reactor's clock).
    pub fn take(
        &self,
        addr: SocketAddr,
        kind: Kind<'_>,
        now: Instant,
        owner: u64,
    ) -> Option<TcpConn> {
        let private = kind.private;
        let Some((mode, name)) = kind.tls else {
            let mut idle = self.idle.borrow_mut();
            let list = idle.get_mut(&addr)?;
            // Most recent first; dead ones are dropped on the way. The scan below
            // would do this too, but a `pop` loop is what keeps a keep-alive reuse
            // cheap: folded into the scan, `take` cost 77 more instructions a
            // request (`benches/callgrind.sh small`, 424 against 347).
            while list.last().is_some_and(|e| e.open_to(owner, now, private)) {
                let entry = list.pop()?;
                if self.usable(&entry, now) {
                    return Some(self.lend(entry, now));
                }
            }
            // The most recent is held for another client: an older one, if any.
            let mut i = list.len();
            while i > 0 {
                i -= 1;
                if !list[i].open_to(owner, now, private) {
                    continue;
                }
                let entry = list.remove(i);
                if self.usable(&entry, now) {
                    return Some(self.lend(entry, now));
                }
            }
            return None;
        };
        let mut idle = self.idle_tls.borrow_mut();
        let list = idle.get_mut(&addr)?;
        // Most recent first; dead ones are dropped on the way, and an expired one
        // with all older than it.
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            let e = &list[i];
            if now.saturating_duration_since(e.idle.since) > self.idle_timeout {
                list.drain(..=i);
                return None;
            }
            if e.mode != mode || &*e.name != name || !e.idle.open_to(owner, now, private) {
                continue;
            }
            let entry = list.remove(i);
            if self.usable(&entry.idle, now) {
                return Some(self.lend(entry.idle, now));
            }
        }
        None
    }

    /// The connection of `entry`, taken; one still held (by its own client) has its
    /// hold's end noted for when it is put back.
    #[inline]
    fn lend(&self, entry: Idle, now: Instant) -> TcpConn {
        if let Some(end) = entry.hold_end().filter(|end| *end > now) {
            let mut lent = self.lent.borrow_mut();
            lent.retain(|(_, e)| *e > now);
            lent.push((entry.conn.raw_fd(), end));
        }
        entry.conn
    }

    /// Whether an idle connection can serve again: not past its lifetime, and not
    /// closed (or sent something unasked) by the app meanwhile.
    #[inline]
    fn usable(&self, entry: &Idle, now: Instant) -> bool {
        if now.saturating_duration_since(entry.since) > self.idle_timeout {
            return false;
        }
        // An edge since the connection went idle means the app closed it or sent
        // something unasked: check with one read, else reuse without a syscall.
        !entry.conn.has_pending_input() || entry.conn.probe_idle()
    }

    /// Returns a connection made as `kind` says for reuse: a private one held for
    /// its client for good.
    pub fn put(&self, addr: SocketAddr, kind: Kind<'_>, conn: TcpConn, now: Instant, lease: Lease) {
        if kind.private {
            let idle = Idle {
                conn,
                since: now,
                owner: lease.owner,
                held_ms: PRIVATE,
            };
            if self.keep(addr, kind.tls, idle) {
                let mut owned = self.owned.borrow_mut();
                let addrs = owned.entry(lease.owner).or_default();
                if !addrs.contains(&addr) {
                    addrs.push(addr);
                }
            }
            return;
        }
        // Held from a bodiless answer now, or still from one before it.
        let mut hold_end = lease.bodiless.then(|| now + SETTLE);
        if hold_end.is_none() {
            let mut lent = self.lent.borrow_mut();
            if !lent.is_empty() {
                let fd = conn.raw_fd();
                if let Some(i) = lent.iter().position(|(f, _)| *f == fd) {
                    hold_end = Some(lent.swap_remove(i).1).filter(|end| *end > now);
                }
            }
        }
        let held_ms = hold_end.map_or(0, |end| {
            let ms = end.saturating_duration_since(now).as_millis();
            u16::try_from(ms.clamp(1, u128::from(PRIVATE - 1))).unwrap_or(PRIVATE - 1)
        });
        let idle = Idle {
            conn,
            since: now,
            owner: lease.owner,
            held_ms,
        };
        self.keep(addr, kind.tls, idle);
    }

    /// Pools `idle`, made with `tls`, unless `addr` has `max_idle` already (then it
    /// closes); whether it was kept.
    #[inline]
    fn keep(&self, addr: SocketAddr, tls: Option<(UpstreamTls, &str)>, idle: Idle) -> bool {
        let Some((mode, name)) = tls else {
            let mut all = self.idle.borrow_mut();
            let list = all.entry(addr).or_default();
            if list.len() < self.max_idle {
                list.push(idle);
                return true;
            }
            return false;
        };
        let mut all = self.idle_tls.borrow_mut();
        let list = all.entry(addr).or_default();
        if list.len() < self.max_idle {
            list.push(TlsIdle {
                idle,
                mode,
                name: name.into(),
            });
            return true;
        }
        false
    }

    /// Closes idle connections past their lifetime (run from the reactor tick).
    pub fn evict_expired(&self) {
        for list in self.idle.borrow_mut().values_mut() {
            list.retain(|e| e.since.elapsed() <= self.idle_timeout);
        }
        for list in self.idle_tls.borrow_mut().values_mut() {
            list.retain(|e| e.idle.since.elapsed() <= self.idle_timeout);
        }
        // Forget counts of upstreams with no connection left (routes come and go).
        self.open
            .borrow_mut()
            .retain(|_, n| n.get() > 0 || Rc::strong_count(n) > 1);
    }

    /// When the oldest idle connection outlives its lifetime (`None`: pool empty), so
    /// an idle core parks until then instead of ticking.
    pub fn next_expiry(&self) -> Option<Instant> {
        let plain = self.idle.borrow();
        let tls = self.idle_tls.borrow();
        let oldest = plain
            .values()
            .flat_map(|l| l.first())
            .map(|e| e.since)
            .chain(tls.values().flat_map(|l| l.first()).map(|e| e.idle.since))
            .min()?;
        Some(oldest + self.idle_timeout)
    }

    /// Closes every idle connection, plain and TLS, shared or private (a client's
    /// own: that client opens another when it needs one), and returns how many:
    /// the process ran out of file descriptors, and an idle connection is only a
    /// cache, while a client waits for a descriptor.
    pub fn shed_idle(&self) -> usize {
        let shed = self.idle_count();
        // Taken out first: the connections close with no borrow held.
        let plain = std::mem::take(&mut *self.idle.borrow_mut());
        let tls = std::mem::take(&mut *self.idle_tls.borrow_mut());
        drop((plain, tls));
        shed
    }

    /// Number of idle connections.
    pub fn idle_count(&self) -> usize {
        self.idle.borrow().values().map(Vec::len).sum::<usize>()
            + self.idle_tls.borrow().values().map(Vec::len).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::tests::{accepted, reactor};

    const APP: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

    /// Plain TCP, for a shared route.
    const SHARED: Kind<'static> = Kind {
        tls: None,
        private: false,
    };
    /// Plain TCP, for a route that reuses by client.
    const PRIVATE_PLAIN: Kind<'static> = Kind {
        tls: None,
        private: true,
    };

    fn lease(owner: u64) -> Lease {
        Lease {
            owner,
            bodiless: false,
        }
    }

    /// A private route's connection is taken again only by the client connection
    /// that put it back, plain or TLS, and its close closes them.
    #[test]
    fn with_reuse_by_client_only_its_owner_takes_a_connection() {
        let reactor = reactor();
        let now = Instant::now();
        let pool = Pool::new(8, std::time::Duration::from_secs(60), 2);
        let (conn, _peer) = accepted(&reactor);
        pool.put(APP, PRIVATE_PLAIN, conn, now, lease(1));
        assert!(
            pool.take(APP, PRIVATE_PLAIN, now, 2).is_none(),
            "another client"
        );
        let conn = pool.take(APP, PRIVATE_PLAIN, now, 1).expect("its owner");
        pool.put(APP, PRIVATE_PLAIN, conn, now, lease(1));
        let tls = Kind {
            tls: Some((UpstreamTls::Verify, "app.test")),
            private: true,
        };
        let (conn, _tls_peer) = accepted(&reactor);
        pool.put(APP, tls, conn, now, lease(1));
        assert!(pool.take(APP, tls, now, 2).is_none(), "another client, TLS");
        assert_eq!(pool.idle_count(), 2);
        // Another client's close leaves them; the owner's closes both.
        pool.release_owner(2);
        assert_eq!(pool.idle_count(), 2);
        pool.release_owner(1);
        assert_eq!(pool.idle_count(), 0);

        // Shared (the default): another client takes it, and a close releases
        // nothing.
        let pool = Pool::new(8, std::time::Duration::from_secs(60), 2);
        let (conn, _peer) = accepted(&reactor);
        pool.put(APP, SHARED, conn, now, lease(1));
        pool.release_owner(1);
        assert!(pool.take(APP, SHARED, now, 2).is_some(), "shared");
    }

    /// Two circuits, one reusing by client and one shared, on one app address (the
    /// pool's key): a private connection is never taken by another client, nor by
    /// a shared route even for its own client; a private route takes no shared
    /// connection, even its own client's; a shared connection is never held back;
    /// and a client's close closes its private connections only.
    #[test]
    fn private_and_shared_routes_to_one_address_keep_their_connections_apart() {
        let reactor = reactor();
        let now = Instant::now();
        let pool = Pool::new(8, std::time::Duration::from_secs(60), 8);
        let (private, _p) = accepted(&reactor);
        let private_fd = private.raw_fd();
        let (shared, _s) = accepted(&reactor);
        let shared_fd = shared.raw_fd();
        pool.put(APP, PRIVATE_PLAIN, private, now, lease(1));
        pool.put(APP, SHARED, shared, now, lease(1));
        // The private route of another client: nothing (the shared one is not its).
        assert!(pool.take(APP, PRIVATE_PLAIN, now, 2).is_none());
        // A shared route, its owner's client or another: the shared one only, the
        // most recent though the private one is older.
        let conn = pool.take(APP, SHARED, now, 1).expect("the shared one");
        assert_eq!(conn.raw_fd(), shared_fd);
        assert!(
            pool.take(APP, SHARED, now, 1).is_none(),
            "not the private one"
        );
        assert!(
            pool.take(APP, SHARED, now, 2).is_none(),
            "not the private one"
        );
        pool.put(APP, SHARED, conn, now, lease(1));
        let conn = pool
            .take(APP, SHARED, now, 2)
            .expect("another client, shared");
        assert_eq!(conn.raw_fd(), shared_fd);
        pool.put(APP, SHARED, conn, now, lease(2));
        // The private route of the owner: its private one, never the shared one,
        // which client 1's close leaves for others.
        let conn = pool.take(APP, PRIVATE_PLAIN, now, 1).expect("its own");
        assert_eq!(conn.raw_fd(), private_fd);
        assert!(
            pool.take(APP, PRIVATE_PLAIN, now, 1).is_none(),
            "not shared"
        );
        pool.put(APP, PRIVATE_PLAIN, conn, now, lease(1));
        // Past any hold a short one would have: still held.
        let later = now + std::time::Duration::from_secs(59);
        assert!(pool
            .take(APP, SHARED, later, 2)
            .is_some_and(|c| c.raw_fd() == shared_fd));
        assert!(pool.take(APP, SHARED, later, 2).is_none(), "held for good");
        let (shared, _s2) = accepted(&reactor);
        pool.put(APP, SHARED, shared, now, lease(1));
        pool.release_owner(1);
        assert_eq!(pool.idle_count(), 1, "its shared one stays");
        assert!(pool.take(APP, SHARED, now, 2).is_some());
        assert!(pool.take(APP, PRIVATE_PLAIN, now, 1).is_none(), "closed");
    }
}
