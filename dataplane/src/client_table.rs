//! `[limits] max_connections_per_client` across the whole worker: the open client
//! connections of every client address, counted once for all cores.
//!
//! `SO_REUSEPORT` spreads one client's connections over every core by their port, so
//! a count per core would let a client hold the limit times the number of cores
//! (nginx's `limit_conn` and HAProxy's stick tables are process-wide for the same
//! reason). The table is the one piece of per-connection state the cores share: it
//! is touched at accept and at close only, and only while the limit is on; it is
//! split into [`SHARDS`] locks, so cores admitting different clients rarely meet.
//! An address's entry goes when its last connection closes, so the table holds no
//! more entries than there are open connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Locks the table is split into (a power of two; `request_rate`'s table uses the
/// same split).
pub(crate) const SHARDS: usize = 64;

pub use appproxy_shared::fair_share::ClientKey;

/// The shard `key` lives in. Clients choose their addresses and so can crowd one
/// shard; that costs them lock waits of their own cores, never a wrong count (each
/// shard's map hashes with SipHash).
pub(crate) fn shard_of(key: ClientKey) -> usize {
    let bits = match key {
        ClientKey::V4(a) => u64::from(u32::from(a)),
        ClientKey::V6Prefix(p) | ClientKey::V6Site(p) => p,
    };
    // Fibonacci hashing: the top bits of the product spread nearby addresses.
    (bits.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SHARDS.trailing_zeros())) as usize
}

/// Open connections per client address, for every core of the worker.
pub struct ClientTable {
    shards: Vec<Mutex<HashMap<ClientKey, usize>>>,
}

impl Default for ClientTable {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl ClientTable {
    /// A unit of `ip`'s count, or `None` when it already has `limit` connections
    /// open.
    pub fn take(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<ClientUnit> {
        let key = ClientKey::of(ip);
        let mut shard = self.shard(key);
        let count = shard.entry(key).or_insert(0);
        if *count >= limit {
            if *count == 0 {
                shard.remove(&key);
            }
            return None;
        }
        *count += 1;
        Some(ClientUnit(Box::new((self.clone(), key))))
    }

    /// Connections `ip` has open now.
    pub fn open(&self, ip: IpAddr) -> usize {
        let key = ClientKey::of(ip);
        self.shard(key).get(&key).copied().unwrap_or(0)
    }

    /// Addresses with connections open now.
    pub fn addresses(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    fn shard(&self, key: ClientKey) -> MutexGuard<'_, HashMap<ClientKey, usize>> {
        lock(&self.shards[shard_of(key)])
    }
}

/// A map whose every change is one complete statement: a core that panicked while
/// holding the lock left no half-made change, so the poison is not worth a second
/// panic. (`request_rate`'s table's shards are such maps too.)
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One open connection of a client address, given back when dropped (with the
/// connection). Boxed: every connection, pooled upstream ones included, carries an
/// `Option` of it, and one pointer keeps that as small as it was before the table
/// (a larger connection is moved with `memcpy` in and out of the upstream pool).
pub struct ClientUnit(Box<(Arc<ClientTable>, ClientKey)>);

impl Drop for ClientUnit {
    fn drop(&mut self) {
        let (table, key) = &*self.0;
        let mut shard = table.shard(*key);
        if let Some(count) = shard.get_mut(key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                shard.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn an_address_gets_its_limit_and_its_units_back() {
        let t = Arc::new(ClientTable::default());
        let a = t.take(ip("10.0.0.1"), 2).expect("first");
        let b = t.take(ip("10.0.0.1"), 2).expect("second");
        assert!(t.take(ip("10.0.0.1"), 2).is_none(), "third refused");
        assert_eq!(t.open(ip("10.0.0.1")), 2);
        // Another address has its own count.
        let other = t.take(ip("10.0.0.2"), 2).expect("another address");
        drop(a);
        let c = t.take(ip("10.0.0.1"), 2).expect("a unit given back");
        drop((b, c, other));
        assert_eq!(t.addresses(), 0, "entries go with their last connection");
    }

    #[test]
    fn mapped_ipv4_and_an_ipv6_slash_64_count_as_one_client() {
        let t = Arc::new(ClientTable::default());
        let _v4 = t.take(ip("192.0.2.7"), 1).expect("first");
        assert!(t.take(ip("::ffff:192.0.2.7"), 1).is_none());
        let _v6 = t.take(ip("2001:db8:1:2::1"), 1).expect("first of the /64");
        assert!(t.take(ip("2001:db8:1:2:ffff::9"), 1).is_none());
        assert!(t.take(ip("2001:db8:1:3::1"), 1).is_some(), "another /64");
    }

    #[test]
    fn a_connection_pays_one_pointer_for_its_unit() {
        assert_eq!(
            std::mem::size_of::<Option<ClientUnit>>(),
            std::mem::size_of::<usize>()
        );
    }

    #[test]
    fn a_refusal_at_limit_zero_leaves_no_entry() {
        let t = Arc::new(ClientTable::default());
        assert!(t.take(ip("10.0.0.1"), 0).is_none());
        assert_eq!(t.addresses(), 0);
    }

    #[test]
    fn cores_on_other_threads_share_one_count() {
        let t = Arc::new(ClientTable::default());
        let units: Vec<Option<ClientUnit>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let t = t.clone();
                    s.spawn(move || t.take(ip("10.9.9.9"), 3))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("no panic"))
                .collect()
        });
        assert_eq!(units.iter().filter(|u| u.is_some()).count(), 3);
        drop(units);
        assert_eq!(t.addresses(), 0);
    }
}
