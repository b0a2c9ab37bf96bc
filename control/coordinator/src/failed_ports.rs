//! Ports a worker could not listen on, remembered per worker for a while so that
//! placement does not offer them again at once.
//!
//! A worker acknowledges a deployment with `failed: [{id, reason, listen}]` for the
//! circuits it could not deploy; `listen: true` marks those whose frontend could not
//! listen (another process holds the port, say). Only those are remembered here: a
//! circuit the worker refused (an app host it could not resolve, say; `listen`
//! absent, as from an older worker) says nothing about its port, and a tenant
//! creating such circuits would otherwise mark healthy ports. Within one creation
//! the port of any failure is avoided at once (`proxy::create_circuit`); this
//! memory carries a listen failure over to the creations that follow: for
//! `worker_failed_port_backoff_secs` such a port is offered to that worker only
//! when none of its other ports is free. Before, every creation's first attempt
//! took the lowest free port, the held one included: a deploy-and-acknowledge round
//! more per creation, an error on every core of the worker, and more creations
//! ending 503 `E10001` (cause `deploy`).
//!
//! Per process: coordinators sharing a store each learn from their own
//! creations. Bounded: at most [`MAX_WORKERS`] workers of at most
//! [`MAX_PORTS_PER_WORKER`] ports each, the oldest dropped first. A worker's ports
//! are forgotten when it deregisters or is marked `LOST` through this process, or
//! when placement finds it no longer `ALIVE`; a port is forgotten when its worker
//! deploys a circuit on it, or once its time has passed.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Workers remembered at most.
pub const MAX_WORKERS: usize = 1024;

/// Ports remembered per worker at most.
pub const MAX_PORTS_PER_WORKER: usize = 256;

/// The memory: worker → port → when it last failed.
#[derive(Debug)]
pub struct FailedPorts {
    hold: Duration,
    workers: Mutex<HashMap<uuid::Uuid, HashMap<u16, Instant>>>,
}

impl FailedPorts {
    /// Ports are avoided for `hold` after they failed; zero remembers nothing.
    pub fn new(hold: Duration) -> Self {
        Self {
            hold,
            workers: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<uuid::Uuid, HashMap<u16, Instant>>> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `worker` could not listen on `port`.
    pub fn failed(&self, worker: uuid::Uuid, port: u16) {
        self.failed_at(worker, port, Instant::now());
    }

    fn failed_at(&self, worker: uuid::Uuid, port: u16, now: Instant) {
        if self.hold.is_zero() {
            return;
        }
        let hold = self.hold;
        let live = |at: &Instant| now.saturating_duration_since(*at) < hold;
        let mut workers = self.lock();
        if !workers.contains_key(&worker) && workers.len() >= MAX_WORKERS {
            workers.retain(|_, ports| {
                ports.retain(|_, at| live(at));
                !ports.is_empty()
            });
            if workers.len() >= MAX_WORKERS {
                // The worker whose latest failure is the oldest.
                let stalest = workers
                    .iter()
                    .min_by_key(|(_, ports)| ports.values().max().copied())
                    .map(|(id, _)| *id);
                if let Some(id) = stalest {
                    workers.remove(&id);
                }
            }
        }
        let ports = workers.entry(worker).or_default();
        if !ports.contains_key(&port) && ports.len() >= MAX_PORTS_PER_WORKER {
            ports.retain(|_, at| live(at));
            if ports.len() >= MAX_PORTS_PER_WORKER {
                let oldest = ports.iter().min_by_key(|(_, at)| **at).map(|(p, _)| *p);
                if let Some(p) = oldest {
                    ports.remove(&p);
                }
            }
        }
        ports.insert(port, now);
    }

    /// `worker` deployed a circuit on `port`: it listens there again.
    pub fn deployed(&self, worker: uuid::Uuid, port: u16) {
        let mut workers = self.lock();
        if let Some(ports) = workers.get_mut(&worker) {
            ports.remove(&port);
            if ports.is_empty() {
                workers.remove(&worker);
            }
        }
    }

    /// Forgets `worker`'s ports (it deregistered, or was marked `LOST`).
    pub fn forget(&self, worker: uuid::Uuid) {
        self.lock().remove(&worker);
    }

    /// Forgets the workers `alive` says are gone.
    pub fn retain_workers(&self, alive: impl Fn(&uuid::Uuid) -> bool) {
        let mut workers = self.lock();
        if !workers.is_empty() {
            workers.retain(|id, _| alive(id));
        }
    }

    /// The ports of `worker` from `lo` to `hi` to avoid now, ascending (its entries
    /// past their time are dropped).
    pub fn avoided(&self, worker: uuid::Uuid, lo: u16, hi: u16) -> Vec<u16> {
        self.avoided_at(worker, lo, hi, Instant::now())
    }

    fn avoided_at(&self, worker: uuid::Uuid, lo: u16, hi: u16, now: Instant) -> Vec<u16> {
        let mut workers = self.lock();
        let Some(ports) = workers.get_mut(&worker) else {
            return Vec::new();
        };
        let hold = self.hold;
        ports.retain(|_, at| now.saturating_duration_since(*at) < hold);
        let mut out: Vec<u16> = ports
            .keys()
            .copied()
            .filter(|p| (lo..=hi).contains(p))
            .collect();
        if ports.is_empty() {
            workers.remove(&worker);
        }
        out.sort_unstable();
        out
    }

    /// How many workers are remembered.
    pub fn workers(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_port_is_avoided_for_its_time_then_forgotten() {
        let m = FailedPorts::new(Duration::from_secs(60));
        let (w, other) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let t0 = Instant::now();
        m.failed_at(w, 10, t0);
        m.failed_at(w, 30, t0);
        assert_eq!(
            m.avoided_at(w, 0, 20, t0),
            vec![10],
            "in the range asked only"
        );
        assert!(m.avoided_at(other, 0, 100, t0).is_empty());
        assert_eq!(
            m.avoided_at(w, 0, 100, t0 + Duration::from_secs(59)),
            vec![10, 30]
        );
        assert!(m
            .avoided_at(w, 0, 100, t0 + Duration::from_secs(60))
            .is_empty());
        assert_eq!(m.workers(), 0, "a worker with nothing left is dropped");
    }

    #[test]
    fn deployed_deregistered_and_gone_workers_are_forgotten() {
        let m = FailedPorts::new(Duration::from_secs(60));
        let (a, b, c) = (
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
        );
        for w in [a, b, c] {
            m.failed(w, 1);
            m.failed(w, 2);
        }
        m.deployed(a, 1);
        assert_eq!(m.avoided(a, 0, 9), vec![2]);
        m.forget(b);
        assert!(m.avoided(b, 0, 9).is_empty());
        m.retain_workers(|id| *id != c);
        assert!(m.avoided(c, 0, 9).is_empty());
        assert_eq!(m.avoided(a, 0, 9), vec![2]);
        let off = FailedPorts::new(Duration::ZERO);
        off.failed(a, 1);
        assert_eq!(off.workers(), 0, "zero remembers nothing");
    }

    #[test]
    fn the_memory_is_bounded() {
        let m = FailedPorts::new(Duration::from_secs(600));
        let t0 = Instant::now();
        let w = uuid::Uuid::new_v4();
        for p in 0..(MAX_PORTS_PER_WORKER as u16 + 10) {
            m.failed_at(w, p, t0 + Duration::from_millis(u64::from(p)));
        }
        let kept = m.avoided_at(w, 0, u16::MAX, t0);
        assert_eq!(kept.len(), MAX_PORTS_PER_WORKER);
        assert_eq!(kept[0], 10, "the oldest dropped first");
        let first = uuid::Uuid::new_v4();
        m.failed_at(first, 1, t0);
        for i in 0..MAX_WORKERS + 5 {
            m.failed_at(
                uuid::Uuid::new_v4(),
                1,
                t0 + Duration::from_millis(1000 + i as u64),
            );
        }
        assert_eq!(m.workers(), MAX_WORKERS);
        assert!(
            m.avoided_at(first, 0, 9, t0).is_empty(),
            "the stalest worker dropped first"
        );
    }
}
