//! The per-core keep-alive pool of upstream connections, with its per-upstream cap
//! on open connections. A pooled connection is reused only by a route that would
//! have made the same one: same address, and same TLS (mode and server name), so
//! that a route that checks the app's certificate never gets a connection that
//! another route to the same address made without checking, or under another name.

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

/// An idle pooled connection.
struct Idle {
    /// The connection.
    conn: TcpConn,
    /// When it went idle.
    since: Instant,
    /// Its TLS mode and server name (plain TCP: `None`, nothing allocated).
    tls: Option<(UpstreamTls, Box<str>)>,
}

impl Idle {
    fn made_as(&self, tls: Tls<'_>) -> bool {
        self.tls.as_ref().map(|(m, n)| (*m, &**n)) == tls
    }
}

/// Per-core keep-alive pool of upstream connections.
pub struct Pool {
    /// Idle connections by upstream address, most recent last.
    idle: RefCell<FastMap<SocketAddr, Vec<Idle>>>,
    /// Cap per address.
    max_idle: usize,
    /// Idle lifetime.
    idle_timeout: std::time::Duration,
    /// Open connections (in use and idle) per upstream address; each connection
    /// holds one unit ([`CountGuard`]) until it closes.
    open: RefCell<FastMap<SocketAddr, Rc<Cell<usize>>>>,
    /// Cap on `open` per address.
    max_open: usize,
}

impl Pool {
    /// An empty pool.
    pub fn new(max_idle: usize, idle_timeout: std::time::Duration, max_open: usize) -> Self {
        Self {
            idle: RefCell::new(FastMap::default()),
            max_idle,
            idle_timeout,
            open: RefCell::new(FastMap::default()),
            max_open: max_open.max(1),
        }
    }

    /// One unit of `addr`'s open-connection count for a new connection, or `None`
    /// when the upstream already has `max_open` connections on this core (pool
    /// misses only: a pooled connection already holds its unit).
    pub fn reserve(&self, addr: SocketAddr) -> Option<CountGuard> {
        let mut open = self.open.borrow_mut();
        CountGuard::take(open.entry(addr).or_default(), self.max_open)
    }

    /// A live idle connection to `addr` made with `tls`, if one is pooled (`now`:
    /// the reactor's clock).
    pub fn take(&self, addr: SocketAddr, tls: Tls<'_>, now: Instant) -> Option<TcpConn> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        // Most recent first; expired and dead ones are dropped on the way.
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            if now.saturating_duration_since(list[i].since) > self.idle_timeout {
                list.remove(i);
                continue;
            }
            if !list[i].made_as(tls) {
                continue;
            }
            let entry = list.remove(i);
            // An edge since the connection went idle means the app closed it or sent
            // something unasked: check with one read, else reuse without a syscall.
            if entry.conn.has_pending_input() && !entry.conn.probe_idle() {
                continue;
            }
            return Some(entry.conn);
        }
        None
    }

    /// Returns a connection made with `tls` for reuse.
    pub fn put(&self, addr: SocketAddr, tls: Tls<'_>, conn: TcpConn, now: Instant) {
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(addr).or_default();
        if list.len() < self.max_idle {
            list.push(Idle {
                conn,
                since: now,
                tls: tls.map(|(m, n)| (m, n.into())),
            });
        }
    }

    /// Closes idle connections past their lifetime (run from the reactor tick).
    pub fn evict_expired(&self) {
        let mut idle = self.idle.borrow_mut();
        for list in idle.values_mut() {
            list.retain(|e| e.since.elapsed() <= self.idle_timeout);
        }
        // Forget counts of upstreams with no connection left (routes come and go).
        self.open
            .borrow_mut()
            .retain(|_, n| n.get() > 0 || Rc::strong_count(n) > 1);
    }

    /// When the oldest idle connection outlives its lifetime (`None`: pool empty), so
    /// an idle core parks until then instead of ticking.
    pub fn next_expiry(&self) -> Option<Instant> {
        let idle = self.idle.borrow();
        let oldest = idle
            .values()
            .flat_map(|l| l.first())
            .map(|e| e.since)
            .min()?;
        Some(oldest + self.idle_timeout)
    }

    /// Number of idle connections.
    pub fn idle_count(&self) -> usize {
        self.idle.borrow().values().map(Vec::len).sum()
    }
}
