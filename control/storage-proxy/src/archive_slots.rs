//! The archive downloads streaming at once: their slots (`[storage]
//! max_archive_streams`, shared fairly by client address) and, when every slot is
//! taken, room made by cutting the stream whose client has kept it waiting the
//! longest.
//!
//! A slot is held by the archive's writer, a blocking thread that waits while the
//! client takes no bytes (up to `stall_timeout_secs` per chunk, for as long as it
//! takes some). A client that takes a little now and then (256 KiB every 5 s)
//! would hold its slot for as long as the archive lasts — days for a large sparse
//! file — and a few addresses doing so refused every other user's archive. So when
//! no slot is free, a new archive ends the stream whose writer has been waiting on
//! its client longest now, among those waiting [`WAITING`] now or kept waiting
//! [`WAITED`] in all and at least half their life, and takes its slot. What is measured is the client's, never
//! the archive's: a stream slow because of its files (many small ones, a slow
//! filesystem) whose client takes every byte is never cut, nor is any while a slot
//! is free.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use appproxy_shared::fair_share::{FairShare, Refused, Slot};

/// A stream whose writer has waited on its client this long in all, and at least
/// half its life, may be cut to make room.
pub const WAITED: Duration = Duration::from_secs(30);

/// A stream whose writer has been waiting on its client this long now may be cut
/// to make room, whatever its age: a client that renews its streams every few
/// seconds without reading cannot keep them under [`WAITED`].
pub const WAITING: Duration = Duration::from_secs(10);

/// How long a new archive waits for the slot of the stream it had cut (its writer
/// gives it back once it sees the cut, at its next chunk).
const ROOM_WAIT: Duration = Duration::from_secs(2);

/// The slots, and the streams holding them.
pub struct ArchiveSlots {
    share: Arc<FairShare>,
    running: Mutex<BTreeMap<u64, Arc<Streaming>>>,
    next: AtomicU64,
    /// [`WAITED`] and [`WAITING`] (other values in tests).
    waited: Duration,
    waiting: Duration,
}

/// One archive stream, as its writer reports it.
pub struct Streaming {
    started: Instant,
    /// Nanoseconds its writer waited on its client in waits now over.
    waited: AtomicU64,
    /// When the wait going on began (nanoseconds from `started`, plus one), or 0.
    waiting_since: AtomicU64,
    cut: AtomicBool,
    /// Wakes a writer waiting for its client to take bytes.
    wake: tokio::sync::Notify,
}

impl Streaming {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            waited: AtomicU64::new(0),
            waiting_since: AtomicU64::new(0),
            cut: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.started).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Its writer begins to wait for its client to take a chunk.
    pub fn waiting(&self) {
        let now = self.nanos(Instant::now());
        self.waiting_since
            .store(now.saturating_add(1), Ordering::Relaxed);
    }

    /// The wait [`Streaming::waiting`] began is over.
    pub fn waited(&self) {
        let since = self.waiting_since.swap(0, Ordering::Relaxed);
        if since > 0 {
            let now = self.nanos(Instant::now());
            self.waited
                .fetch_add(now.saturating_sub(since - 1), Ordering::Relaxed);
        }
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

    /// How long its writer has been waiting on its client now, and in all (that
    /// wait included); and its age.
    fn kept_waiting(&self, now: Instant) -> Kept {
        let at = self.nanos(now);
        let since = self.waiting_since.load(Ordering::Relaxed);
        let going = if since > 0 {
            at.saturating_sub(since - 1)
        } else {
            0
        };
        let waited = self.waited.load(Ordering::Relaxed).saturating_add(going);
        Kept {
            now: Duration::from_nanos(going),
            waited: Duration::from_nanos(waited),
            age: Duration::from_nanos(at),
        }
    }
}

/// How long a stream's client has kept its writer waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Kept {
    /// The wait going on.
    now: Duration,
    /// In all.
    waited: Duration,
    /// The stream's age.
    age: Duration,
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
        Self::with_waits(max, per_address, WAITED, WAITING)
    }

    fn with_waits(
        max: usize,
        per_address: usize,
        waited: Duration,
        waiting: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            share: FairShare::new(max, per_address),
            running: Mutex::default(),
            next: AtomicU64::new(0),
            waited,
            waiting,
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

    /// A slot for a client at `ip`; with none free, one made by cutting the stream
    /// whose client has kept it waiting longest past [`WAITED`] (never for a client
    /// that holds its share, while shares are on), waited for up to [`ROOM_WAIT`].
    pub async fn take(self: &Arc<Self>, ip: IpAddr) -> Result<ArchivePermit, Refused> {
        let refused = match self.try_take(ip) {
            Ok(permit) => return Ok(permit),
            Err(refused) => refused,
        };
        // A share as large as the cap turns shares off (behind a reverse proxy every
        // client has its address): then anyone may make room.
        let shared = self.share.per_address() < self.share.max();
        if refused != Refused::Full
            || (shared && self.share.holds_share(ip))
            || !self.cut_longest_kept_waiting()
        {
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
        let streaming = Arc::new(Streaming::new());
        self.running().insert(id, streaming.clone());
        Ok(ArchivePermit {
            _slot: slot,
            streaming,
            slots: self.clone(),
            id,
        })
    }

    /// Cuts the stream whose client keeps its writer waiting longest now, among
    /// those waiting [`WAITING`] now or kept waiting [`WAITED`] in all and at least
    /// half their life, if one is: whether one was (it leaves the running set at
    /// once, so no two archives cut it).
    fn cut_longest_kept_waiting(&self) -> bool {
        let now = Instant::now();
        let mut running = self.running();
        let longest = running
            .iter()
            .map(|(id, s)| (s.kept_waiting(now), *id))
            .filter(|(k, _)| {
                k.now >= self.waiting || (k.waited >= self.waited && k.waited * 2 >= k.age)
            })
            .max_by_key(|(k, _)| (k.now, k.waited));
        let Some((kept, id)) = longest else {
            return false;
        };
        if let Some(s) = running.remove(&id) {
            s.cut.store(true, Ordering::Release);
            s.wake.notify_one();
            tracing::info!(
                waiting_secs = kept.now.as_secs(),
                waited_secs = kept.waited.as_secs(),
                age_secs = kept.age.as_secs(),
                "an archive stream whose client kept it waiting was cut to make room for another"
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

    /// With every slot taken, a new archive cuts the stream whose client kept it
    /// waiting longest (past the bound, and at least half its life) and takes its
    /// slot once the writer lets go; never one whose client takes its bytes, and
    /// never for a client that holds its share while shares are on.
    #[tokio::test]
    async fn a_full_set_of_slots_makes_room_by_cutting_the_stream_kept_waiting_longest() {
        let slots =
            ArchiveSlots::with_waits(2, 1, Duration::from_millis(50), Duration::from_secs(3600));
        let reading = slots.try_take(ip("10.0.0.1")).expect("first");
        let stalled = slots.try_take(ip("10.0.0.2")).expect("second");
        stalled.streaming.waiting();
        tokio::time::sleep(Duration::from_millis(120)).await;
        // A client holding its share makes no room.
        assert!(slots.share.holds_share(ip("10.0.0.2")));
        assert_eq!(slots.take(ip("10.0.0.2")).await.err(), Some(Refused::Full));
        assert!(!stalled.streaming.is_cut());
        // Another does: the stalled stream is cut, never the one whose client
        // reads; its writer lets go, and the slot is taken.
        let newcomer = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.take(ip("10.0.0.3")).await.map(|_| ()) })
        };
        stalled.streaming.cut_off().await;
        stalled.streaming.waited();
        drop(stalled);
        assert_eq!(newcomer.await.expect("joined"), Ok(()));
        assert!(!reading.streaming.is_cut());
        // Waits that were short, or less than half its life: nothing is cut.
        let third = slots.try_take(ip("10.0.0.4")).expect("the slot given back");
        for _ in 0..3 {
            third.streaming.waiting();
            tokio::time::sleep(Duration::from_millis(20)).await;
            third.streaming.waited();
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        assert_eq!(slots.take(ip("10.0.0.5")).await.err(), Some(Refused::Full));
        assert!(!reading.streaming.is_cut() && !third.streaming.is_cut());
        // A stream renewed before it has waited long in all is cut once its wait
        // going on is long enough.
        let renewed =
            ArchiveSlots::with_waits(1, 1, Duration::from_secs(3600), Duration::from_millis(50));
        cut_for_a_take(&renewed, ip("10.0.0.2")).await;
        // With shares off (a share as large as the cap), the address holding every
        // slot may make room too.
        let unshared =
            ArchiveSlots::with_waits(1, 1, Duration::from_millis(50), Duration::from_secs(3600));
        cut_for_a_take(&unshared, ip("10.0.0.1")).await;
    }

    /// The one slot of `slots`, taken from 10.0.0.1 by a stream whose writer then
    /// waits on its client for 120 ms, is cut for a take from `from`, which is
    /// served once the cut stream gives its slot back.
    async fn cut_for_a_take(slots: &Arc<ArchiveSlots>, from: IpAddr) {
        let held = slots.try_take(ip("10.0.0.1")).expect("first");
        held.streaming.waiting();
        tokio::time::sleep(Duration::from_millis(120)).await;
        let next = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.take(from).await.map(|_| ()) })
        };
        held.streaming.cut_off().await;
        drop(held);
        assert_eq!(next.await.expect("joined"), Ok(()));
    }
}
