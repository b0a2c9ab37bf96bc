//! The request-body rate floor's budget, one rule for every body the product reads
//! from a client: the worker's HTTP/1.1 reads (`TcpConn`'s read floor), its HTTP/2
//! streams' DATA frames, and the storage proxy's tus `PATCH` bodies.
//!
//! A budget of waiting time starts full (`cap`), is drained by the time spent
//! waiting for the body's next bytes and earned back by each byte (`1 / rate`
//! seconds, never past `cap`): the client must keep up `rate` bytes per second on
//! average, with `cap` of waiting banked. Pure arithmetic; each caller measures its
//! own waits on its own clock.

use std::time::Duration;

/// A body's rate-floor budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateFloor {
    /// Bytes per second the client must keep up on average.
    rate: u64,
    /// Largest budget (and the budget at the start).
    cap: Duration,
    /// Waiting time left.
    budget: Duration,
}

impl RateFloor {
    /// A full budget of `cap`, or `None` when `rate` is 0 (no floor).
    pub fn new(rate: u64, cap: Duration) -> Option<Self> {
        (rate > 0).then_some(Self {
            rate,
            cap,
            budget: cap,
        })
    }

    /// The longest the next wait may last, given the idle timeout `idle`: the
    /// budget when that is shorter. `true` when it is the budget that binds.
    pub fn bound(&self, idle: Duration) -> (Duration, bool) {
        if self.budget < idle {
            (self.budget, true)
        } else {
            (idle, false)
        }
    }

    /// Books a wait of `waited` that brought `bytes`.
    pub fn book(&mut self, waited: Duration, bytes: usize) {
        let earned = Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        self.budget = (self.budget.saturating_sub(waited) + earned).min(self.cap);
    }
}

#[cfg(test)]
mod tests {
    use super::RateFloor;
    use std::time::Duration;

    /// Drained by waiting, earned back by bytes up to its start, binding only once
    /// below the idle timeout; none at rate 0.
    #[test]
    fn the_budget_banks_cap_of_waiting() {
        let idle = Duration::from_secs(2);
        assert_eq!(RateFloor::new(0, idle), None, "no floor");
        let mut floor = RateFloor::new(1000, idle).expect("a floor");
        assert_eq!(floor.bound(idle), (idle, false), "a full budget");
        floor.book(Duration::from_millis(300), 0);
        assert_eq!(floor.bound(idle), (Duration::from_millis(1700), true));
        floor.book(Duration::ZERO, 200);
        assert_eq!(floor.bound(idle), (Duration::from_millis(1900), true));
        floor.book(Duration::from_millis(100), 1_000_000);
        assert_eq!(floor.bound(idle), (idle, false), "never past the start");
        floor.book(Duration::from_secs(5), 0);
        assert_eq!(floor.bound(idle), (Duration::ZERO, true), "ran out");
        // A shorter idle timeout binds first while the budget is above it.
        let floor = RateFloor::new(1000, idle).expect("a floor");
        assert_eq!(
            floor.bound(Duration::from_secs(1)),
            (Duration::from_secs(1), false)
        );
    }
}
