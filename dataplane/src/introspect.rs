//! Admin introspection: what the worker serves and how its cores are doing, on the
//! admin port only (`GET /circuits`, `GET /connections`).
//!
//! The cores own their state; they publish to this board only what changes rarely:
//! the deployed circuit set with the request ID of the deployment that installed it
//! (core 0, at each deployment), and each core's unhealthy upstreams (at the tick
//! after a health change). The admin thread renders JSON from the board.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use appproxy_shared::RequestId;
use serde_json::{json, Value};

use crate::config::{Frontend, ResolvedCircuit};
use crate::core::Change;
use crate::liveness::Liveness;
use crate::metrics::{Counter, SharedMetrics};

thread_local! {
    /// Set on this core's thread when an upstream's passive health changed.
    static HEALTH_CHANGED: Cell<bool> = const { Cell::new(false) };
}

/// Notes that an upstream's health changed on this core (published at the next tick).
pub fn health_changed() {
    HEALTH_CHANGED.with(|c| c.set(true));
}

/// Takes this core's health-changed flag.
pub fn take_health_changed() -> bool {
    HEALTH_CHANGED.with(|c| c.replace(false))
}

/// An upstream out of rotation on one core: circuit, address, until when.
pub type Unhealthy = (uuid::Uuid, SocketAddr, Instant);

/// The deployed circuits by ID.
type Deployed = HashMap<uuid::Uuid, Arc<ResolvedCircuit>>;

/// What the cores publish for the admin thread.
pub struct Board {
    /// The deployed circuits by ID and the last deployment's request ID (`None`: from
    /// the file).
    deployment: Mutex<(Deployed, Option<RequestId>)>,
    /// Per core (by row): its CPU and its unhealthy upstreams.
    unhealthy: Mutex<Vec<(usize, Vec<Unhealthy>)>>,
}

impl Board {
    /// A board for `cpus`, starting with the circuits of the config file.
    pub fn new(cpus: &[usize], circuits: Vec<ResolvedCircuit>) -> Arc<Self> {
        Arc::new(Self {
            deployment: Mutex::new((
                circuits
                    .into_iter()
                    .map(|c| (c.circuit.id, Arc::new(c)))
                    .collect(),
                None,
            )),
            unhealthy: Mutex::new(cpus.iter().map(|c| (*c, Vec::new())).collect()),
        })
    }

    /// Records a deployment (called by one core); returns how many circuits are
    /// deployed now.
    pub fn deployed(&self, change: &Change, request_id: RequestId) -> usize {
        let mut deployment = lock(&self.deployment);
        let (circuits, id) = &mut *deployment;
        if change.replace {
            circuits.clear();
        }
        for removed in &change.removes {
            circuits.remove(removed);
        }
        for c in &change.upserts {
            circuits.insert(c.circuit.id, c.clone());
        }
        *id = Some(request_id);
        circuits.len()
    }

    /// Replaces core `row`'s unhealthy upstreams.
    pub fn publish_unhealthy(&self, row: usize, list: Vec<Unhealthy>) {
        if let Some(entry) = lock(&self.unhealthy).get_mut(row) {
            entry.1 = list;
        }
    }

    /// `GET /circuits`: every deployed circuit, its frontend and its routes' health.
    pub fn circuits(&self) -> Value {
        let (mut circuits, request_id) = {
            let deployment = lock(&self.deployment);
            (
                deployment.0.values().cloned().collect::<Vec<_>>(),
                deployment.1,
            )
        };
        circuits.sort_by_key(|c| c.circuit.id);
        let now = Instant::now();
        let mut out_of_rotation: BTreeMap<(uuid::Uuid, SocketAddr), Vec<usize>> = BTreeMap::new();
        for (cpu, list) in lock(&self.unhealthy).iter() {
            for (id, addr, until) in list {
                if *until > now {
                    out_of_rotation.entry((*id, *addr)).or_default().push(*cpu);
                }
            }
        }
        let list: Vec<Value> = circuits
            .iter()
            .map(|rc| {
                let c = &rc.circuit;
                let frontend = match &rc.frontend {
                    Frontend::Port(p) => json!({"port": p}),
                    Frontend::Subdomain(s) => json!({"subdomain": s}),
                };
                let routes: Vec<Value> = rc
                    .upstreams
                    .iter()
                    .map(|(addr, ratio)| {
                        let cores = out_of_rotation.get(&(c.id, *addr));
                        json!({
                            "upstream": addr.to_string(),
                            "traffic_ratio": ratio,
                            "health": if cores.is_some() { "unhealthy" } else { "healthy" },
                            "unhealthy_on_cores": cores.cloned().unwrap_or_default(),
                        })
                    })
                    .collect();
                json!({
                    "id": c.id,
                    "app": c.app,
                    "protocol": c.protocol,
                    "app_mode": c.app_mode,
                    "open_to_public": c.open_to_public,
                    "frontend": frontend,
                    "routes": routes,
                })
            })
            .collect();
        json!({
            "deployment_request_id": request_id.map(|r| r.to_string()),
            "count": list.len(),
            "circuits": list,
        })
    }
}

/// `GET /connections`: a summary per core.
pub fn connections(metrics: &SharedMetrics, liveness: &Liveness) -> Value {
    let now = Instant::now();
    let cores: Vec<Value> = liveness
        .cores
        .iter()
        .enumerate()
        .map(|(row, c)| {
            json!({
                "core": c.cpu,
                "connections_active": metrics.get(row, Counter::Active),
                "connections_accepted": metrics.get(row, Counter::Accepted),
                "tunnels_active": metrics.get(row, Counter::TunnelsActive),
                "turns": c.turns(),
                "last_turn_age_ms": c.since_last_turn(now).as_millis() as u64,
                "stalled": c.stalled(now, liveness.bound),
            })
        })
        .collect();
    json!({
        "connections_active": metrics.total(Counter::Active),
        "tunnels_active": metrics.total(Counter::TunnelsActive),
        "cores": cores,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
