//! `[limits] max_request_rate_per_client`: requests per second a client address may
//! send, with a burst, counted once for all cores (the client's address: a trusted
//! proxy's forwarded one, an IPv6 client's /64, as the connection limit counts them).
//! A request past it is refused with 429 and `Retry-After` before it is routed to an
//! app; the client's other requests, once the rate allows, go on as before.
//!
//! Each address holds one number: the generic cell rate algorithm's theoretical
//! arrival time (GCRA, a token bucket kept as a time). A request at `now` is admitted
//! when that time is at most `tolerance` (the burst less one, times the interval)
//! ahead of `now`, and moves it on by one interval. An entry whose time has passed
//! says what no entry says (a full bucket), so it may go at any moment: the table
//! drops those when a shard is full, then, if it is still full, the eighth of the
//! entries closest to passing (those clients' debts are forgiven: memory stays
//! bounded whatever the number of addresses, and no address is ever refused for want
//! of room).
//!
//! The table is shared by the cores like [`crate::client_table`]'s, in the same
//! shards: one short lock per request, and only while the limit is on.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use appproxy_shared::fair_share::ClientKey;

use crate::client_table::{lock, shard_of, SHARDS};

/// Addresses one shard holds at most (`SHARDS` times this in all: about 10 MiB).
pub const SHARD_ENTRIES: usize = 4096;

/// The refusal of a request past its client's rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// How long until the client's next request would be admitted.
    pub retry_after: Duration,
}

impl Limited {
    /// [`Limited::retry_after`] in whole seconds for `Retry-After`: rounded up, at
    /// least 1.
    pub fn retry_after_secs(&self) -> u32 {
        let secs = self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0);
        u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
    }
}

/// Every client address's theoretical arrival time, in nanoseconds since `epoch`.
pub struct RequestRates {
    /// Nanoseconds between two requests at the rate.
    interval: u64,
    /// How far ahead of now a client's time may be and its request still admitted.
    tolerance: u64,
    /// Entries per shard at most.
    shard_entries: usize,
    epoch: Instant,
    shards: Vec<Mutex<HashMap<ClientKey, u64>>>,
}

impl std::fmt::Debug for RequestRates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestRates")
            .field("interval_ns", &self.interval)
            .field("tolerance_ns", &self.tolerance)
            .finish_non_exhaustive()
    }
}

impl RequestRates {
    /// A table admitting `rate` requests per second per address, `burst` at once
    /// (at least 1); `None` when `rate` is not above 0 (the limit is off).
    pub fn new(rate: f64, burst: u32) -> Option<Self> {
        Self::with_shard_entries(rate, burst, SHARD_ENTRIES)
    }

    fn with_shard_entries(rate: f64, burst: u32, shard_entries: usize) -> Option<Self> {
        if !(rate.is_finite() && rate > 0.0) {
            return None;
        }
        // At least one nanosecond apart; a rate below one a year is one a year.
        let interval = (1e9 / rate).clamp(1.0, 365.0 * 24.0 * 3600.0 * 1e9) as u64;
        let tolerance = interval.saturating_mul(u64::from(burst.max(1) - 1));
        Some(Self {
            interval,
            tolerance,
            shard_entries: shard_entries.max(1),
            epoch: Instant::now(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        })
    }

    /// Admits one request of `ip` now, or says when its next one would be.
    pub fn take(&self, ip: IpAddr) -> Result<(), Limited> {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.take_at(ClientKey::of(ip), now)
    }

    /// [`RequestRates::take`] at `now` (nanoseconds since the table's epoch).
    fn take_at(&self, key: ClientKey, now: u64) -> Result<(), Limited> {
        let mut shard = lock(&self.shards[shard_of(key)]);
        let known = shard.get(&key).copied();
        let tat = known.unwrap_or(0).max(now);
        let ahead = tat - now;
        if ahead > self.tolerance {
            return Err(Limited {
                retry_after: Duration::from_nanos(ahead - self.tolerance),
            });
        }
        if known.is_none() && shard.len() >= self.shard_entries {
            make_room(&mut shard, now, self.shard_entries);
        }
        shard.insert(key, tat.saturating_add(self.interval));
        Ok(())
    }

    /// Addresses the table holds now (passed ones included until they are dropped).
    pub fn addresses(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}

/// Drops the entries whose time has passed, then, down to seven eighths of the
/// shard (at least one below full), those closest to passing: each pass over the
/// shard makes room for an eighth of it, however few entries had passed (an outside
/// tester measured 20 µs a new address with one pass per new address, and a
/// reviewer saw that freeing only what had passed since the last pass, often one
/// entry, brings that back).
fn make_room(shard: &mut HashMap<ClientKey, u64>, now: u64, entries: usize) {
    shard.retain(|_, tat| *tat > now);
    let low = entries - (entries / 8).max(1);
    if shard.len() <= low {
        return;
    }
    let evict = shard.len() - low;
    let mut times: Vec<u64> = shard.values().copied().collect();
    let (_, &mut cut, _) = times.select_nth_unstable(evict - 1);
    // Those at or before the cut: at least `evict` of them (ties go together).
    shard.retain(|_, tat| *tat > cut);
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn key(s: &str) -> ClientKey {
        ClientKey::of(s.parse().expect("an address"))
    }

    /// (rate, burst, requests as (at seconds, expected: `None` admitted, else the
    /// wait in milliseconds)).
    type Case = (f64, u32, &'static [(f64, Option<u64>)]);

    #[test]
    fn requests_are_admitted_at_the_rate_after_the_burst() {
        let cases: &[Case] = &[
            // One a second, no burst: the second at once waits a second.
            (
                1.0,
                1,
                &[
                    (0.0, None),
                    (0.0, Some(1000)),
                    (0.5, Some(500)),
                    (1.0, None),
                ],
            ),
            // Ten a second, a burst of three.
            (
                10.0,
                3,
                &[
                    (0.0, None),
                    (0.0, None),
                    (0.0, None),
                    (0.0, Some(100)),
                    (0.1, None),
                    (0.1, Some(100)),
                    (10.0, None),
                    (10.0, None),
                    (10.0, None),
                    (10.0, Some(100)),
                ],
            ),
            // A refused request costs nothing: the wait does not grow.
            (
                2.0,
                1,
                &[(0.0, None), (0.1, Some(400)), (0.2, Some(300)), (0.5, None)],
            ),
            // Burst 0 is taken as 1.
            (1.0, 0, &[(0.0, None), (0.0, Some(1000))]),
            // Far apart: every request admitted.
            (1.0, 1, &[(0.0, None), (5.0, None), (10.0, None)]),
        ];
        for (rate, burst, requests) in cases {
            let t = RequestRates::new(*rate, *burst).expect("on");
            for (i, (at, want)) in requests.iter().enumerate() {
                let got = t
                    .take_at(key("10.0.0.1"), (at * SEC as f64) as u64)
                    .err()
                    .map(|l| l.retry_after.as_millis() as u64);
                assert_eq!(
                    got, *want,
                    "rate {rate} burst {burst}, request {i} at {at} s"
                );
            }
        }
    }

    #[test]
    fn addresses_are_counted_apart_and_an_ipv6_64_as_one() {
        let t = RequestRates::new(1.0, 1).expect("on");
        assert!(t.take_at(key("10.0.0.1"), 0).is_ok());
        assert!(t.take_at(key("10.0.0.1"), 0).is_err());
        assert!(t.take_at(key("10.0.0.2"), 0).is_ok(), "another address");
        assert!(
            t.take_at(key("::ffff:10.0.0.1"), 0).is_err(),
            "the mapped one"
        );
        assert!(t.take_at(key("2001:db8:1:2::1"), 0).is_ok());
        assert!(
            t.take_at(key("2001:db8:1:2:ffff::9"), 0).is_err(),
            "same /64"
        );
        assert!(t.take_at(key("2001:db8:1:3::1"), 0).is_ok(), "another /64");
    }

    #[test]
    fn off_unless_the_rate_is_above_zero() {
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(RequestRates::new(rate, 10).is_none(), "{rate}");
        }
        let slow = RequestRates::new(1e-12, 1).expect("a tiny rate is on");
        assert!(slow.take_at(key("10.0.0.1"), 0).is_ok());
        let l = slow.take_at(key("10.0.0.1"), 0).expect_err("limited");
        assert_eq!(l.retry_after.as_secs(), 365 * 24 * 3600, "at most a year");
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        for (nanos, secs) in [(1, 1), (SEC, 1), (SEC + 1, 2), (30 * SEC, 30)] {
            let l = Limited {
                retry_after: Duration::from_nanos(nanos),
            };
            assert_eq!(l.retry_after_secs(), secs, "{nanos} ns");
        }
    }

    /// However many addresses come, a shard holds at most its entries: passed ones
    /// go first, then the eighth closest to passing; a new address is always admitted.
    #[test]
    fn the_table_stays_bounded_and_never_refuses_for_room() {
        let t = RequestRates::with_shard_entries(1.0, 1, 4).expect("on");
        for i in 0..10_000u32 {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            assert!(
                t.take_at(ClientKey::of(ip.into()), u64::from(i)).is_ok(),
                "{ip}: a new address"
            );
        }
        assert!(t.addresses() <= SHARDS * 4, "{}", t.addresses());
        // A full shard of live entries gives up its eighth closest to passing, and
        // keeps the rest.
        let t = RequestRates::with_shard_entries(1.0, 1, 16).expect("on");
        let keys: Vec<ClientKey> = (0..u32::MAX)
            .map(|i| ClientKey::of(std::net::Ipv4Addr::from(i).into()))
            .filter(|k| shard_of(*k) == 0)
            .take(17)
            .collect();
        for (i, k) in keys.iter().take(16).enumerate() {
            assert!(t.take_at(*k, i as u64).is_ok());
        }
        assert!(
            t.take_at(keys[16], 16).is_ok(),
            "a new address in a full shard"
        );
        assert_eq!(t.addresses(), 16 - 2 + 1, "two of sixteen made room");
        assert!(t.take_at(keys[0], 17).is_ok(), "the first, forgiven");
        assert!(t.take_at(keys[2], 17).is_err(), "the third, still limited");
        // One entry passed: the pass still frees down to seven eighths, not one.
        let t = RequestRates::with_shard_entries(1.0, 1, 16).expect("on");
        for (i, k) in keys.iter().take(16).enumerate() {
            assert!(t.take_at(*k, i as u64).is_ok());
        }
        assert!(t.take_at(keys[16], SEC).is_ok(), "keys[0] passed at 1 s");
        assert_eq!(t.addresses(), 16 - 2 + 1, "the passed one and one more");
        assert!(t.take_at(keys[2], SEC).is_err(), "the third, still limited");
        // Entries that passed make room without forgiving anyone still limited.
        let t = RequestRates::with_shard_entries(1.0, 1, 2).expect("on");
        let shard = shard_of(key("10.0.0.1"));
        let same: Vec<ClientKey> = (0..u32::MAX)
            .map(|i| ClientKey::of(std::net::Ipv4Addr::from(i).into()))
            .filter(|k| shard_of(*k) == shard)
            .take(3)
            .collect();
        assert!(t.take_at(same[0], 0).is_ok());
        assert!(t.take_at(same[1], 2 * SEC).is_ok());
        // At 1.5 s the first has passed (its time was 1 s): it goes, the second stays.
        assert!(t.take_at(same[2], 2 * SEC + SEC / 2).is_ok());
        assert!(
            t.take_at(same[1], 2 * SEC + SEC / 2).is_err(),
            "still limited"
        );
    }

    #[test]
    fn cores_on_other_threads_share_one_rate() {
        let t = RequestRates::new(1e-3, 3).expect("on");
        let admitted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| t.take("10.9.9.9".parse().expect("ip")).is_ok()))
                .collect();
            handles
                .into_iter()
                .map(|h| usize::from(h.join().expect("no panic")))
                .sum()
        });
        assert_eq!(admitted, 3);
    }
}
