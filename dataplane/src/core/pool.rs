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

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use appproxy_shared::model::UpstreamTls;

use super::FastMap;
use crate::io::{CountGuard, TcpConn};

/// How a connection to an app was made beyond its address: its TLS mode and
/// server name, `None` for plain TCP.
pub type Tls<'a> = Option<(UpstreamTls, &'a str)>;

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
    /// rest of a hold: [`SETTLE`] from the last bodiless answer).
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
    /// Whether `owner` may take it now (`private`: only its own client may).
    #[inline]
    fn open_to(&self, owner: u64, now: Instant, private: bool) -> bool {
        self.owner == owner
            || (!private
                && (self.held_ms == 0
                    || now.saturating_duration_since(self.since).as_millis()
                        >= u128::from(self.held_ms)))
    }

    /// When its hold ends, if it is held.
    fn hold_end(&self) -> Option<Instant> {
        (self.held_ms > 0)
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
    /// `[upstream] reuse = "client"`: a connection is reused only by the client
    /// connection that put it back, and closed when that one closes.
    private: bool,
    /// With `private`: the addresses each client connection put connections back
    /// for, so that its close looks at those lists only.
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
            private: false,
            owned: RefCell::new(FastMap::default()),
        }
    }

    /// The pool with `reuse` as its rule for who may take a connection.
    #[must_use]
    pub fn reused_by(mut self, reuse: crate::config::Reuse) -> Self {
        self.private = reuse == crate::config::Reuse::Client;
        self
    }

    /// Closes the idle connections client connection `owner` put back, now that it
    /// has closed: with `reuse = "client"` nobody else may take them. Nothing to do
    /// when connections are shared.
    pub fn release_owner(&self, owner: u64) {
        if !self.private {
            return;
        }
        let Some(addrs) = self.owned.borrow_mut().remove(&owner) else {
            return;
        };
        for addr in addrs {
            if let Some(list) = self.idle.borrow_mut().get_mut(&addr) {
                list.retain(|e| e.owner != owner);
            }
            if let Some(list) = self.idle_tls.borrow_mut().get_mut(&addr) {
                list.retain(|e| e.idle.owner != owner);
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

    /// A live idle connection to `addr` made with `tls` that `owner` may take, if
    /// one is pooled (`now`: the reactor's clock).
    pub fn take(
        &self,
        addr: SocketAddr,
        tls: Tls<'_>,
        now: Instant,
        owner: u64,
    ) -> Option<TcpConn> {
        let Some((mode, name)) = tls else {
            let mut idle = self.idle.borrow_mut();
            let list = idle.get_mut(&addr)?;
            // Most recent first; dead ones are dropped on the way. The scan below
            // would do this too, but a `pop` loop is what keeps a keep-alive reuse
            // cheap: folded into the scan, `take` cost 77 more instructions a
            // request (`benches/callgrind.sh small`, 424 against 347).
            while list
                .last()
                .is_some_and(|e| e.open_to(owner, now, self.private))
            {
                let entry = list.pop()?;
                if self.usable(&entry, now) {
                    return Some(self.lend(entry, now));
                }
            }
            // The most recent is held for another client: an older one, if any.
            let mut i = list.len();
            while i > 0 {
                i -= 1;
                if !list[i].open_to(owner, now, self.private) {
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
            if e.mode != mode || &*e.name != name || !e.idle.open_to(owner, now, self.private) {
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

    /// Returns a connection made with `tls` for reuse.
    pub fn put(&self, addr: SocketAddr, tls: Tls<'_>, conn: TcpConn, now: Instant, lease: Lease) {
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
            u16::try_from(end.saturating_duration_since(now).as_millis().max(1)).unwrap_or(u16::MAX)
        });
        if self.private {
            let mut owned = self.owned.borrow_mut();
            let addrs = owned.entry(lease.owner).or_default();
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        let idle = Idle {
            conn,
            since: now,
            owner: lease.owner,
            held_ms,
        };
        let Some((mode, name)) = tls else {
            let mut all = self.idle.borrow_mut();
            let list = all.entry(addr).or_default();
            if list.len() < self.max_idle {
                list.push(idle);
            }
            return;
        };
        let mut all = self.idle_tls.borrow_mut();
        let list = all.entry(addr).or_default();
        if list.len() < self.max_idle {
            list.push(TlsIdle {
                idle,
                mode,
                name: name.into(),
            });
        }
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

    fn lease(owner: u64) -> Lease {
        Lease {
            owner,
            bodiless: false,
        }
    }

    /// With `reuse = "client"` only the client connection that put a connection
    /// back takes it again, plain or TLS, and its close closes them.
    #[test]
    fn with_reuse_by_client_only_its_owner_takes_a_connection() {
        let reactor = reactor();
        let now = Instant::now();
        let pool = Pool::new(8, std::time::Duration::from_secs(60), 2)
            .reused_by(crate::config::Reuse::Client);
        let (conn, _peer) = accepted(&reactor);
        pool.put(APP, None, conn, now, lease(1));
        assert!(pool.take(APP, None, now, 2).is_none(), "another client");
        let conn = pool.take(APP, None, now, 1).expect("its owner");
        pool.put(APP, None, conn, now, lease(1));
        let tls = Some((UpstreamTls::Verify, "app.test"));
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
        pool.put(APP, None, conn, now, lease(1));
        pool.release_owner(1);
        assert!(pool.take(APP, None, now, 2).is_some(), "shared");
    }
}
