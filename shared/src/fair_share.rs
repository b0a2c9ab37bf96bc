//! Client addresses as per-client limits count them, and a set of slots shared fairly
//! among them: once half the slots are taken, an address that holds its share gets
//! no more.
//!
//! A cap on how many clients are served at once (the worker's admin endpoint, the
//! storage-proxy's archive streams) keeps a server's threads for everyone else, but
//! one client that opens connections up to the cap holds every slot, and everyone
//! waits or is refused. With the share, one address takes at most half the slots
//! before it is held to its share, and it takes several more addresses to take the
//! rest. While the slots are mostly free, one address (an office behind one NAT)
//! still gets as many as it asks for.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// A client address as per-client limits count it: an IPv4 address (IPv4-mapped
/// IPv6 included), or an IPv6 address's /64, which one host is commonly given whole
/// ([`ClientKey::of`]); or, for a share that only one site's clients together may
/// hold, its /48 ([`ClientKey::site_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClientKey {
    /// An IPv4 client.
    V4(Ipv4Addr),
    /// The upper 64 bits of an IPv6 client's address.
    V6Prefix(u64),
    /// The upper 48 bits of an IPv6 client's address, in the upper bits of the
    /// value (its low 16 bits zero).
    V6Site(u64),
}

/// The bits of an IPv6 address's upper 64 that name its /48.
const SITE_MASK: u64 = !0xffff;

impl ClientKey {
    /// The key `ip` is counted under: the subscriber, an IPv4 address or an IPv6
    /// /64 (what a limit set per client counts, as the request rate does).
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(a) => Self::V4(a),
            IpAddr::V6(a) => Self::V6Prefix((u128::from(a) >> 64) as u64),
        }
    }

    /// The site `ip` belongs to: an IPv4 address, or an IPv6 address's /48 (what
    /// one end site is given at most: a home's /56 or /48, a business's /48, a
    /// tunnel broker's free /48). For a share of a resource every client needs
    /// that an attacker must not be able to hold with addresses it has for free:
    /// one /48 holds 65,536 /64s, and 128 of them (half a home's /56) held
    /// what 128 IPv4 addresses would. The cost: the clients of one /48 share one
    /// share, as the clients behind one IPv4 NAT do.
    pub fn site_of(ip: IpAddr) -> Self {
        match Self::of(ip) {
            Self::V6Prefix(p) => Self::V6Site(p & SITE_MASK),
            key => key,
        }
    }
}

/// Why a slot was not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every slot is taken.
    Full,
    /// Half the slots or more are taken, and the address holds its share.
    AddressShare,
}

/// The share's one rule: whether an address holding `mine` slots is at its share,
/// `total` of `max` being taken: half of them or more are, and it holds
/// `per_address`. For [`FairShare`] and for slots kept otherwise (a core's budget
/// of streams to apps).
pub fn at_share(total: usize, max: usize, per_address: usize, mine: usize) -> bool {
    total >= max / 2 && mine >= per_address
}

/// Slots, held by client addresses: at most `max`, and once half are taken at most
/// `per_address` for an address (an address leaves the map with its last slot, so
/// the map holds at most `max` entries).
pub struct FairShare {
    max: usize,
    per_address: usize,
    held: Mutex<Held>,
    freed: Condvar,
}

#[derive(Default)]
struct Held {
    total: usize,
    by_address: HashMap<ClientKey, usize>,
}

impl FairShare {
    /// `max` slots (at least 1), `per_address` (at least 1) for an address once half
    /// are taken.
    pub fn new(max: usize, per_address: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            per_address: per_address.max(1),
            held: Mutex::default(),
            freed: Condvar::new(),
        })
    }

    /// A slot for a client at `ip`, given back when the [`Slot`] is dropped.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        let key = ClientKey::of(ip);
        let mut held = self.held();
        if held.total >= self.max {
            return Err(Refused::Full);
        }
        let mine = held.by_address.get(&key).copied().unwrap_or(0);
        if at_share(held.total, self.max, self.per_address, mine) {
            return Err(Refused::AddressShare);
        }
        held.by_address.insert(key, mine + 1);
        held.total += 1;
        Ok(Slot {
            share: self.clone(),
            key,
        })
    }

    /// Blocks (in steps of at most 100 ms, so a missed wake-up costs no more) until
    /// a slot is free.
    pub fn wait_for_one(&self) {
        let mut held = self.held();
        while held.total >= self.max {
            held = self
                .freed
                .wait_timeout(held, Duration::from_millis(100))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Whether a client at `ip` holds its share now (half the slots or more are
    /// taken, and it holds `per_address`): it would be refused a slot even if one
    /// were free.
    pub fn holds_share(&self, ip: IpAddr) -> bool {
        let held = self.held();
        let mine = held.by_address.get(&ClientKey::of(ip)).copied();
        at_share(held.total, self.max, self.per_address, mine.unwrap_or(0))
    }

    /// Slots taken now.
    pub fn taken(&self) -> usize {
        self.held().total
    }

    /// The most slots there are.
    pub fn max(&self) -> usize {
        self.max
    }

    /// An address's share once half the slots are taken.
    pub fn per_address(&self) -> usize {
        self.per_address
    }

    /// Every change is one complete statement: a thread that panicked while
    /// holding the lock left no half-made change.
    fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One slot of a [`FairShare`], given back when dropped.
pub struct Slot {
    share: Arc<FairShare>,
    key: ClientKey,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.share.held();
        if let Some(mine) = held.by_address.get_mut(&self.key) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                held.by_address.remove(&self.key);
            }
        }
        held.total = held.total.saturating_sub(1);
        drop(held);
        self.share.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn one_address_takes_half_then_its_share_and_others_the_rest() {
        let share = FairShare::new(8, 1);
        let a = ip("10.0.0.1");
        // Uncrowded, one address gets what it asks for: half the slots.
        let mut held: Vec<Slot> = (0..4).map(|_| share.take(a).expect("uncrowded")).collect();
        assert_eq!(share.take(a).err(), Some(Refused::AddressShare));
        // Every other address still gets its share.
        for other in ["10.0.0.2", "10.0.0.3", "10.0.0.4"] {
            held.push(share.take(ip(other)).expect("another address's share"));
            assert_eq!(share.take(ip(other)).err(), Some(Refused::AddressShare));
        }
        held.push(share.take(ip("10.0.0.5")).expect("the last slot"));
        assert_eq!(share.taken(), 8);
        assert_eq!(share.take(ip("10.0.0.6")).err(), Some(Refused::Full));
        // Full, `a` would be refused for its share even with a slot free; an
        // address holding none would not.
        assert!(share.holds_share(a) && share.holds_share(ip("10.0.0.2")));
        assert!(!share.holds_share(ip("10.0.0.6")));
        // Slots come back when dropped, and the address with them.
        held.clear();
        assert_eq!(share.taken(), 0);
        assert!(share.held().by_address.is_empty());
        let _again: Vec<Slot> = (0..4).map(|_| share.take(a).expect("freed")).collect();
    }

    #[test]
    fn ipv6_clients_count_by_their_slash_64_and_mapped_ipv4_as_ipv4() {
        let share = FairShare::new(4, 1);
        let _a = share.take(ip("2001:db8:1:2::1")).expect("first");
        let _b = share
            .take(ip("2001:db8:1:2::2"))
            .expect("second, uncrowded");
        assert_eq!(
            share.take(ip("2001:db8:1:2:ffff::9")).err(),
            Some(Refused::AddressShare),
            "the same /64"
        );
        let _c = share.take(ip("2001:db8:1:3::1")).expect("another /64");
        assert_eq!(
            ClientKey::of(ip("::ffff:10.0.0.1")),
            ClientKey::of(ip("10.0.0.1"))
        );
    }

    #[test]
    fn a_site_is_an_ipv4_address_or_an_ipv6_slash_48() {
        let site = |s| ClientKey::site_of(ip(s));
        assert_eq!(site("2001:db8:1:2::1"), site("2001:db8:1:ffff:9::1"));
        assert_eq!(
            site("2001:db8:1::"),
            ClientKey::V6Site(0x2001_0db8_0001_0000)
        );
        assert_ne!(site("2001:db8:1::1"), site("2001:db8:2::1"));
        assert_ne!(site("2001:db8:1::1"), ClientKey::of(ip("2001:db8:1::1")));
        assert_eq!(site("10.0.0.1"), ClientKey::of(ip("10.0.0.1")));
        assert_eq!(site("::ffff:10.0.0.1"), site("10.0.0.1"));
        assert_ne!(site("10.0.0.1"), site("10.0.0.2"));
    }

    #[test]
    fn a_waiter_wakes_when_a_slot_is_given_back() {
        let share = FairShare::new(1, 1);
        let slot = share.take(ip("10.0.0.1")).expect("the one slot");
        let waiter = {
            let share = share.clone();
            std::thread::spawn(move || {
                share.wait_for_one();
                share.take(ip("10.0.0.2")).is_ok()
            })
        };
        drop(slot);
        assert!(waiter.join().expect("waiter"), "a slot after the wait");
    }
}
