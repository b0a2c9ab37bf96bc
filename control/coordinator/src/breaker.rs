//! The per-worker circuit breaker of placement: a worker that missed an
//! acknowledgement is not offered new circuits for a while (a back-off that doubles
//! with each further miss, up to a ceiling), so one sick worker costs one timeout,
//! not one per creation.
//!
//! States, per worker authority:
//! - **closed** (no entry, or zero misses): placed as usual;
//! - **open** (a miss, back-off running): skipped by placement;
//! - **half-open** (back-off over): one creation may try it (a trial, itself bounded by
//!   the acknowledgement timeout); the others still skip it until the trial ends.
//!
//! Any acknowledgement from a worker (for any circuit, or the one it sends after
//! (re)subscribing to events) closes its breaker: its event path works again. A miss
//! on an event published *before* the worker was last heard from is not the worker's
//! fault (the event was lost while it was not subscribed) and does not trip it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One worker's record.
#[derive(Debug, Clone, Default)]
struct Breaker {
    /// Consecutive misses.
    misses: u32,
    /// Skipped until then.
    open_until: Option<Instant>,
    /// A half-open trial runs until then; others skip the worker meanwhile.
    trial_until: Option<Instant>,
    /// The last time anything was heard from the worker on the event path.
    last_seen: Option<Instant>,
    /// When the breaker last opened, as seconds since the epoch (compared with the
    /// worker's last heartbeat).
    tripped_at: f64,
}

/// What a missed acknowledgement did ([`Breakers::missed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// It opened the worker's breaker, for this back-off.
    Tripped(Duration),
    /// The breaker was open already: the same outage.
    AlreadyOpen,
    /// Not the worker's fault (the event or its acknowledgement was lost).
    NotItsFault,
}

/// The most authorities whose breakers are kept (far more than the workers of any
/// cluster).
const MAX_TRACKED: usize = 4096;

/// Breakers of every worker, by authority.
pub struct Breakers {
    workers: Mutex<HashMap<String, Breaker>>,
    /// When this coordinator last (re)subscribed to acknowledgements: an
    /// acknowledgement sent before then may have been lost on this side.
    listening_since: Mutex<Option<Instant>>,
    /// The first back-off.
    base: Duration,
    /// The longest back-off.
    max: Duration,
}

impl Default for Breakers {
    fn default() -> Self {
        Self::new(Duration::from_secs(5), Duration::from_secs(60))
    }
}

impl Breakers {
    /// Back-off `base` after the first miss, doubled per further miss up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            workers: Mutex::default(),
            listening_since: Mutex::default(),
            base,
            max: max.max(base),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Breaker>> {
        // Plain data: a panic elsewhere cannot leave it inconsistent.
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether placement may offer `authority` a circuit now.
    pub fn admits(&self, authority: &str) -> bool {
        self.admits_after(authority, None)
    }

    /// [`Breakers::admits`], knowing the worker's last heartbeat (seconds since the
    /// epoch): a half-open worker gets its trial only once it has heartbeated since
    /// its breaker opened — a frozen or stopped worker stays skipped at no creation's
    /// expense.
    pub fn admits_after(&self, authority: &str, last_heartbeat: Option<f64>) -> bool {
        let now = Instant::now();
        self.lock().get(authority).is_none_or(|b| {
            b.open_until.is_none_or(|t| t <= now)
                && b.trial_until.is_none_or(|t| t <= now)
                && (b.misses == 0 || last_heartbeat.is_none_or(|h| h > b.tripped_at))
        })
    }

    /// Placement chose `authority`: if its breaker is half-open this creation is the
    /// trial, and others skip the worker for up to `wait`.
    pub fn begin(&self, authority: &str, wait: Duration) {
        if let Some(b) = self.lock().get_mut(authority) {
            if b.misses > 0 {
                b.trial_until = Some(Instant::now() + wait);
            }
        }
    }

    /// The worker was heard from on the event path (an acknowledgement): closed.
    /// An acknowledgement may name any authority (whoever can publish to Redis
    /// chooses it), so the closed breakers kept only for their `last_seen` are
    /// dropped when [`MAX_TRACKED`] are kept; one that is open or on trial is never
    /// dropped, and past the bound a new authority is not recorded (closed is what
    /// no entry means anyway).
    pub fn alive(&self, authority: &str) {
        let mut map = self.lock();
        if !map.contains_key(authority) && map.len() >= MAX_TRACKED {
            map.retain(|_, b| b.misses > 0 || b.trial_until.is_some());
            if map.len() >= MAX_TRACKED {
                return;
            }
        }
        let b = map.entry(authority.to_owned()).or_default();
        let was_open = b.misses > 0;
        *b = Breaker {
            last_seen: Some(Instant::now()),
            ..Default::default()
        };
        drop(map);
        if was_open {
            tracing::info!(worker = %authority, "worker acknowledges again: offered circuits again");
        }
    }

    /// This coordinator (re)subscribed to acknowledgements.
    pub fn listening(&self) {
        *self
            .listening_since
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// A creation's event published at `published` got no acknowledgement. Returns
    /// what that miss did: opened the breaker (with its back-off); nothing, since it
    /// was already open (another creation's miss of the same outage opened it: placed
    /// just before, it waited its own timeout); or nothing, since it was no fault of
    /// the worker's (heard from after the event went out: the event was lost; or this
    /// coordinator's own subscription was renewed since).
    pub fn missed(&self, authority: &str, published: Instant) -> Miss {
        let relistened = self
            .listening_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t > published);
        let mut map = self.lock();
        if relistened {
            if let Some(b) = map.get_mut(authority) {
                b.trial_until = None;
            }
            return Miss::NotItsFault;
        }
        let b = map.entry(authority.to_owned()).or_default();
        if b.last_seen.is_some_and(|seen| seen > published) {
            b.trial_until = None;
            return Miss::NotItsFault;
        }
        // Creations in flight when a worker froze each time out: one outage, one
        // trip. Counted each, the back-off doubled per creation (eight in flight: 2^7
        // times the base, up to the ceiling) for a worker that missed once.
        if b.open_until.is_some_and(|t| t > Instant::now()) {
            return Miss::AlreadyOpen;
        }
        b.misses = b.misses.saturating_add(1);
        let backoff = self
            .base
            .saturating_mul(1u32 << (b.misses - 1).min(16))
            .min(self.max);
        b.open_until = Some(Instant::now() + backoff);
        b.trial_until = None;
        b.tripped_at = appproxy_shared::jwt::now_epoch();
        Miss::Tripped(backoff)
    }

    /// A trial that ended without a verdict (the circuit failed for a reason of its
    /// own, or the caller left): others may try the worker again.
    pub fn end_trial(&self, authority: &str) {
        if let Some(b) = self.lock().get_mut(authority) {
            b.trial_until = None;
        }
    }

    /// Workers whose breaker is open now, with the time left (for health and logs).
    pub fn open(&self) -> Vec<(String, Duration)> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter_map(|(a, b)| {
                b.open_until
                    .filter(|t| *t > now)
                    .map(|t| (a.clone(), t - now))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_miss_opens_an_ack_closes_and_a_lost_event_does_not_count() {
        let b = Breakers::new(Duration::from_secs(60), Duration::from_secs(600));
        assert!(b.admits("w1"));
        let before = Instant::now();
        assert_eq!(
            b.missed("w1", before),
            Miss::Tripped(Duration::from_secs(60))
        );
        assert!(!b.admits("w1"));
        assert!(b.admits("w2"));
        assert_eq!(b.open().len(), 1);
        b.alive("w1");
        assert!(b.admits("w1"));
        // This side resubscribed after the event went out: not the worker's fault.
        let published = Instant::now();
        b.listening();
        assert_eq!(b.missed("w3", published), Miss::NotItsFault);
        // Heard from after the event went out: the event was lost, not the worker.
        assert_eq!(b.missed("w1", before), Miss::NotItsFault);
        assert!(b.admits("w1"));
    }

    #[test]
    fn acknowledgements_naming_endless_authorities_keep_the_map_bounded() {
        let b = Breakers::new(Duration::from_secs(60), Duration::from_secs(600));
        let before = Instant::now();
        assert_eq!(
            b.missed("sick", before),
            Miss::Tripped(Duration::from_secs(60))
        );
        for i in 0..3 * MAX_TRACKED {
            b.alive(&format!("made-up-{i}"));
        }
        assert!(b.lock().len() <= MAX_TRACKED);
        // The open breaker was never dropped, and a real worker is still heard.
        assert!(!b.admits("sick"));
        assert_eq!(b.open().len(), 1);
        b.alive("sick");
        assert!(b.admits("sick"));
    }

    #[test]
    fn back_off_doubles_up_to_the_ceiling_and_half_open_admits_one_trial() {
        let b = Breakers::new(Duration::ZERO, Duration::ZERO);
        let t = Instant::now();
        assert_eq!(b.missed("w", t), Miss::Tripped(Duration::ZERO));
        // Back-off over: half-open; the first creation is the trial.
        assert!(b.admits("w"));
        b.begin("w", Duration::from_secs(60));
        assert!(!b.admits("w"), "one trial at a time");
        b.end_trial("w");
        assert!(b.admits("w"));
        // No heartbeat since the breaker opened: still skipped; one after: admitted.
        let now = appproxy_shared::jwt::now_epoch();
        assert!(!b.admits_after("w", Some(now - 60.0)));
        assert!(b.admits_after("w", Some(now + 1.0)));
        // Each miss after a back-off ended (a failed trial) doubles the next.
        let b = Breakers::new(Duration::from_secs(2), Duration::from_secs(5));
        let over = |b: &Breakers| {
            if let Some(w) = b.lock().get_mut("w") {
                w.open_until = Some(Instant::now());
            }
        };
        assert_eq!(b.missed("w", t), Miss::Tripped(Duration::from_secs(2)));
        over(&b);
        assert_eq!(b.missed("w", t), Miss::Tripped(Duration::from_secs(4)));
        over(&b);
        assert_eq!(b.missed("w", t), Miss::Tripped(Duration::from_secs(5)));
    }

    /// The creations in flight when a worker froze each time out: the first miss
    /// opens the breaker, the others are the same outage and neither trip it again
    /// nor double its back-off.
    #[test]
    fn misses_while_open_are_one_outage() {
        let b = Breakers::new(Duration::from_secs(5), Duration::from_secs(60));
        let t = Instant::now();
        assert_eq!(b.missed("w", t), Miss::Tripped(Duration::from_secs(5)));
        for _ in 0..7 {
            assert_eq!(b.missed("w", t), Miss::AlreadyOpen);
        }
        let left = b.open();
        assert_eq!(left.len(), 1);
        assert!(left[0].1 <= Duration::from_secs(5), "{left:?}");
    }
}
