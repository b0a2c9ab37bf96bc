//! Route host names looked up for the control agent, off its thread.
//!
//! The system resolver blocks its caller, and the agent runs on one thread with its
//! heartbeats, deployments and acknowledgements: a name lookup made there during a
//! DNS outage (a resolver that drops packets waits about 10 s a name) stopped all of
//! them, until the coordinator counted the worker lost. Here each lookup runs on the
//! runtime's blocking pool; at most [`LOOKUPS`] run at once, each holding its slot
//! until the resolver returns (even after nobody waits for it any more), so an
//! outage cannot pile up threads; and a deployment waits at most [`LOOKUP_WAIT`] for
//! all of its names together. A name not found in time refuses its circuit with the
//! reason, as an unknown name does; everything else goes on. A lookup that answers
//! after its wait ended leaves its answer for the next try (the agent tries such
//! circuits again), so a resolver that is slow but answers still gets its circuits
//! deployed; an answer is kept [`LATE_KEPT`] at most and taken once.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Lookups in flight at once.
pub const LOOKUPS: usize = 16;

/// The longest a deployment waits for its route hosts' names.
pub const LOOKUP_WAIT: Duration = Duration::from_secs(5);

/// How long an answer that came after its wait ended is kept for the next try.
pub const LATE_KEPT: Duration = Duration::from_secs(60);

/// Answers that came after their wait ended, by name, with when they came.
type Late = HashMap<(String, u16), (Result<SocketAddr, String>, std::time::Instant)>;

/// What was found for each (host, port): its address, or why there is none.
pub type Found = HashMap<(String, u16), Result<SocketAddr, String>>;

/// How one name is looked up (the system resolver; another in tests).
pub type Resolve = fn(&str, u16) -> Result<SocketAddr, String>;

/// The agent's lookups: a bounded number in flight on the blocking pool.
#[derive(Clone)]
pub struct Lookups {
    slots: Arc<tokio::sync::Semaphore>,
    late: Arc<std::sync::Mutex<Late>>,
    resolve: Resolve,
    wait: Duration,
}

impl Default for Lookups {
    fn default() -> Self {
        Self::with(crate::config::look_up_now, LOOKUPS, LOOKUP_WAIT)
    }
}

impl Lookups {
    /// Lookups made with `resolve`, at most `slots` at once, waited for `wait`.
    pub fn with(resolve: Resolve, slots: usize, wait: Duration) -> Self {
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(slots.max(1))),
            late: Arc::default(),
            resolve,
            wait,
        }
    }

    /// Looks up every name of `names` at once, within the wait. An address literal
    /// is taken as it is, with no lookup.
    pub async fn look_up(&self, names: HashSet<(String, u16)>) -> Found {
        let mut found = Found::with_capacity(names.len());
        let deadline = tokio::time::Instant::now() + self.wait;
        let mut pending = tokio::task::JoinSet::new();
        for (host, port) in names {
            if let Ok(ip) = host.parse::<IpAddr>() {
                found.insert((host, port), Ok(SocketAddr::new(ip, port)));
                continue;
            }
            let key = (host, port);
            if let Some(addr) = self.take_late(&key) {
                found.insert(key, Ok(addr));
                continue;
            }
            let (host, port) = key;
            let late = self.late.clone();
            let (slots, resolve, wait) = (self.slots.clone(), self.resolve, self.wait);
            pending.spawn(async move {
                let timed_out = || format!("name lookup timed out after {} s", wait.as_secs());
                let result = match tokio::time::timeout_at(deadline, slots.acquire_owned()).await {
                    Ok(Ok(slot)) => {
                        let name = host.clone();
                        let kept = late.clone();
                        let job = tokio::task::spawn_blocking(move || {
                            let _slot = slot;
                            let result = resolve(&name, port);
                            // Kept in case nobody waits any more; taken back below
                            // when somebody does.
                            if let Ok(mut late) = kept.lock() {
                                late.insert(
                                    (name, port),
                                    (result.clone(), std::time::Instant::now()),
                                );
                            }
                            result
                        });
                        match tokio::time::timeout_at(deadline, job).await {
                            Ok(Ok(result)) => {
                                if let Ok(mut late) = late.lock() {
                                    late.remove(&(host.clone(), port));
                                }
                                result
                            }
                            Ok(Err(_)) => Err("the name lookup failed".into()),
                            Err(_) => Err(timed_out()),
                        }
                    }
                    Ok(Err(_)) => Err("name lookups are closed".into()),
                    Err(_) => Err(format!(
                        "{} (every lookup slot held by a slower one)",
                        timed_out()
                    )),
                };
                ((host, port), result)
            });
        }
        while let Some(done) = pending.join_next().await {
            if let Ok((name, result)) = done {
                found.insert(name, result);
            }
        }
        found
    }
}

impl Lookups {
    /// An address a lookup found after its wait ended, if it came within
    /// [`LATE_KEPT`]; taken once. Older answers and failures are forgotten.
    fn take_late(&self, key: &(String, u16)) -> Option<SocketAddr> {
        let mut late = self.late.lock().ok()?;
        late.retain(|_, (_, at)| at.elapsed() < LATE_KEPT);
        match late.remove(key) {
            Some((Ok(addr), _)) => Some(addr),
            _ => None,
        }
    }
}

/// The address `found` holds for `host` (an address literal needs none).
pub fn address(found: &Found, host: &str, port: u16) -> Result<SocketAddr, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    match found.get(&(host.to_string(), port)) {
        Some(result) => result.clone(),
        None => Err("not looked up".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static RUNNING: AtomicUsize = AtomicUsize::new(0);
    static MOST: AtomicUsize = AtomicUsize::new(0);
    static CALLS: AtomicUsize = AtomicUsize::new(0);

    /// A resolver whose `*.hung` names never answer within a test (an outage), and
    /// whose other names answer at once; it records how many ran at the same time.
    fn outage(host: &str, port: u16) -> Result<SocketAddr, String> {
        CALLS.fetch_add(1, Ordering::SeqCst);
        let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
        MOST.fetch_max(now, Ordering::SeqCst);
        if host.ends_with(".hung") {
            std::thread::sleep(Duration::from_secs(3));
        }
        RUNNING.fetch_sub(1, Ordering::SeqCst);
        Ok(SocketAddr::from(([10, 0, 0, 1], port)))
    }

    /// During an outage, a deployment's wait ends at its bound with every hung name
    /// refused for a reason, names that answer and address literals are found, and
    /// no more lookups ever run at once than the slots allow, however many names
    /// hang.
    #[test]
    fn an_outage_costs_one_bounded_wait_and_a_bounded_number_of_threads() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let lookups = Lookups::with(outage, 4, Duration::from_millis(300));
        let mut names: HashSet<(String, u16)> =
            (0..20).map(|i| (format!("r{i}.hung"), 8000)).collect();
        names.insert(("fine.test".into(), 8001));
        names.insert(("192.0.2.7".into(), 8002));
        names.insert(("::1".into(), 8003));
        let started = std::time::Instant::now();
        let found = rt.block_on(lookups.look_up(names));
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(2), "waited {waited:?}");
        assert_eq!(found.len(), 23);
        for i in 0..20 {
            let why = found[&(format!("r{i}.hung"), 8000)]
                .clone()
                .expect_err("hung");
            assert!(why.contains("timed out"), "{why}");
        }
        assert_eq!(
            address(&found, "192.0.2.7", 8002),
            Ok("192.0.2.7:8002".parse().expect("addr"))
        );
        assert_eq!(
            address(&found, "::1", 8003),
            Ok("[::1]:8003".parse().expect("addr"))
        );
        assert_eq!(
            address(&found, "elsewhere.test", 1),
            Err("not looked up".into())
        );
        // The name that answers was found, unless every slot was taken by hung
        // names first (it then waited for the bound like them).
        match &found[&("fine.test".into(), 8001)] {
            Ok(a) => assert_eq!(*a, SocketAddr::from(([10, 0, 0, 1], 8001))),
            Err(why) => assert!(why.contains("slot"), "{why}"),
        }
        // A second deployment meanwhile: the hung lookups still hold their slots, so
        // it waits its own bound, and the threads stay bounded.
        let again: HashSet<(String, u16)> = (0..20).map(|i| (format!("s{i}.hung"), 8000)).collect();
        let found = rt.block_on(lookups.look_up(again));
        assert!(found.values().all(|r| r.is_err()));
        assert!(
            MOST.load(Ordering::SeqCst) <= 4,
            "{} at once",
            MOST.load(Ordering::SeqCst)
        );
        // A lookup that answers after its wait ended leaves its answer: the next try
        // finds it without a lookup of its own.
        let lookups = Lookups::with(outage, 4, Duration::from_millis(300));
        let name =
            || -> HashSet<(String, u16)> { [("z.hung".to_string(), 8000)].into_iter().collect() };
        let found = rt.block_on(lookups.look_up(name()));
        assert!(
            found[&("z.hung".to_string(), 8000)].is_err(),
            "answered in time?"
        );
        std::thread::sleep(Duration::from_secs(4));
        let before = CALLS.load(Ordering::SeqCst);
        let found = rt.block_on(lookups.look_up(name()));
        assert_eq!(
            found[&("z.hung".to_string(), 8000)],
            Ok(SocketAddr::from(([10, 0, 0, 1], 8000))),
            "the late answer"
        );
        assert_eq!(CALLS.load(Ordering::SeqCst), before, "looked up again");
        // Taken once: the try after that looks the name up again.
        let found = rt.block_on(lookups.look_up(name()));
        assert!(found[&("z.hung".to_string(), 8000)].is_err());
        assert_eq!(CALLS.load(Ordering::SeqCst), before + 1);
    }
}
