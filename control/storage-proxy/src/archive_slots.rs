//! The archive downloads streaming at once: their slots (`[storage]
//! max_archive_streams`, shared fairly by client address) and, when every slot is
//! taken, room made by cutting the slowest stream that has run past a grace below
//! a floor rate.
//!
//! A slot is held by the archive's writer, a blocking thread that waits while the
//! client takes no bytes (up to `stall_timeout_secs` per chunk, for as long as it
//! takes some). A client that takes a little now and then (256 KiB every 5 s)
//! would hold its slot for as long as the archive lasts — days for a large sparse
//! file — and a few addresses doing so refused every other user's archive. So when
//! no slot is free, a new archive ends the stream that has sent least per second
//! among those past [`GRACE`] and below [`MIN_RATE`], and takes its slot; a stream
//! as fast as that is never cut, nor is any while slots are free.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use appproxy_shared::fair_share::{FairShare, Refused, Slot};

/// A stream younger than this is never cut to make room.
pub const GRACE: Duration = Duration::from_secs(30);

/// A stream that has sent at least this many bytes per second over its life is
/// never cut to make room.
pub const MIN_RATE: u64 = 1 << 20;

/// How long a new archive waits for the slot of the stream it had cut (its writer
/// gives it back once it sees the cut, at its next chunk).
const ROOM_WAIT: Duration = Duration::from_secs(2);

/// The slots, and the streams holding them.
pub struct ArchiveSlots {
    share: Arc<FairShare>,
    running: Mutex<BTreeMap<u64, Arc<Streaming>>>,
    next: AtomicU64,
    /// [`GRACE`] and [`MIN_RATE`] (other values in tests).
    grace: Duration,
    min_rate: u64,
}

/// One archive stream, as its writer reports it.
pub struct Streaming {
    started: Instant,
    sent: AtomicU64,
    cut: AtomicBool,
    /// Wakes a writer waiting for its client to take bytes.
    wake: tokio::sync::Notify,
}

impl Streaming {
    /// `n` more bytes handed to the client.
    pub fn sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Whether it was cut to make room.
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    /// Resolves once it is cut.
    pub async fn cut_off(&self) {
        loop {
            let woken = self.wake.notified();
            if self.is_cut() {
                return;
            }
            woken.await;
        }
    }

    /// Bytes per second over its life so far.
    fn rate(&self, now: Instant) -> u64 {
        let secs = now.saturating_duration_since(self.started).as_secs_f64();
        (self.sent.load(Ordering::Relaxed) as f64 / secs.max(0.001)) as u64
    }
}

/// A slot, held for an archive's life; the stream leaves the running set with it.
pub struct ArchivePermit {
    _slot: Slot,
    /// What the writer reports to, and is cut through.
    pub streaming: Arc<Streaming>,
    slots: Arc<ArchiveSlots>,
    id: u64,
}

impl Drop for ArchivePermit {
    fn drop(&mut self) {
        self.slots.running().remove(&self.id);
    }
}

impl ArchiveSlots {
    /// `max` slots, `per_address` for an address once half are taken.
    pub fn new(max: usize, per_address: usize) -> Arc<Self> {
        Self::with_floor(max, per_address, GRACE, MIN_RATE)
    }

    fn with_floor(max: usize, per_address: usize, grace: Duration, min_rate: u64) -> Arc<Self> {
        Arc::new(Self {
            share: FairShare::new(max, per_address),
            running: Mutex::default(),
            next: AtomicU64::new(0),
            grace,
            min_rate,
        })
    }

    /// The most archives at once.
    pub fn max(&self) -> usize {
        self.share.max()
    }

    /// An address's share once half the slots are taken.
    pub fn per_address(&self) -> usize {
        self.share.per_address()
    }

    /// A slot for a client at `ip`; with none free, one made by cutting the slowest
    /// stream past [`GRACE`] below [`MIN_RATE`] (never for a client that holds its
    /// share), waited for up to [`ROOM_WAIT`].
    pub async fn take(self: &Arc<Self>, ip: IpAddr) -> Result<ArchivePermit, Refused> {
        let refused = match self.try_take(ip) {
            Ok(permit) => return Ok(permit),
            Err(refused) => refused,
        };
        if refused != Refused::Full || self.share.holds_share(ip) || !self.cut_slowest() {
            return Err(refused);
        }
        let until = Instant::now() + ROOM_WAIT;
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            match self.try_take(ip) {
                Ok(permit) => return Ok(permit),
                Err(refused) if Instant::now() >= until => return Err(refused),
                Err(_) => {}
            }
        }
    }

    fn try_take(self: &Arc<Self>, ip: IpAddr) -> Result<ArchivePermit, Refused> {
        let slot = self.share.take(ip)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let streaming = Arc::new(Streaming {
            started: Instant::now(),
            sent: AtomicU64::new(0),
            cut: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        });
        self.running().insert(id, streaming.clone());
        Ok(ArchivePermit {
            _slot: slot,
            streaming,
            slots: self.clone(),
            id,
        })
    }

    /// Cuts the slowest stream past the grace below the floor, if one is: whether
    /// one was (it leaves the running set at once, so no two archives cut it).
    fn cut_slowest(&self) -> bool {
        let now = Instant::now();
        let mut running = self.running();
        let slowest = running
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.started) >= self.grace)
            .map(|(id, s)| (s.rate(now), *id))
            .filter(|(rate, _)| *rate < self.min_rate)
            .min();
        let Some((rate, id)) = slowest else {
            return false;
        };
        if let Some(s) = running.remove(&id) {
            s.cut.store(true, Ordering::Release);
            s.wake.notify_one();
            tracing::info!(
                bytes_per_sec = rate,
                "an archive stream below the floor rate was cut to make room for another"
            );
        }
        true
    }

    fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Streaming>>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    /// With every slot taken, a new archive cuts the slowest stream past the grace
    /// below the floor and takes its slot once the writer lets go; never one past
    /// the floor or within the grace, and never for a client that holds its share.
    #[tokio::test]
    async fn a_full_set_of_slots_makes_room_by_cutting_the_slowest_stream() {
        let slots = ArchiveSlots::with_floor(2, 1, Duration::ZERO, 1 << 20);
        let fast = slots.try_take(ip("10.0.0.1")).expect("first");
        fast.streaming.sent(1 << 40);
        let slow = slots.try_take(ip("10.0.0.2")).expect("second");
        // A client holding its share makes no room.
        assert!(slots.share.holds_share(ip("10.0.0.2")));
        assert_eq!(slots.take(ip("10.0.0.2")).await.err(), Some(Refused::Full));
        assert!(!slow.streaming.is_cut());
        // Another does: the slow stream is cut, never the fast one; its writer lets
        // go, and the slot is taken.
        let newcomer = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.take(ip("10.0.0.3")).await.map(|_| ()) })
        };
        slow.streaming.cut_off().await;
        drop(slow);
        assert_eq!(newcomer.await.expect("joined"), Ok(()));
        assert!(!fast.streaming.is_cut());
        // Only fast ones left: nothing is cut, the next is refused.
        let third = slots.try_take(ip("10.0.0.4")).expect("the slot given back");
        third.streaming.sent(1 << 40);
        assert_eq!(slots.take(ip("10.0.0.5")).await.err(), Some(Refused::Full));
        assert!(!fast.streaming.is_cut() && !third.streaming.is_cut());
        // Within the grace, nothing is cut.
        let young = ArchiveSlots::with_floor(1, 1, Duration::from_secs(3600), 1 << 20);
        let held = young.try_take(ip("10.0.0.1")).expect("first");
        assert_eq!(young.take(ip("10.0.0.2")).await.err(), Some(Refused::Full));
        assert!(!held.streaming.is_cut());
    }
}
