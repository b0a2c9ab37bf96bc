//! Admin introspection: what the worker serves and how its cores are doing, on the
//! admin port only (`GET /circuits`, `GET /connections`).
//!
//! The cores own their state; they publish to this board only what changes rarely:
//! the deployed circuit set with the request ID of the deployment that installed it
//! (core 0, at each deployment), and each core's unhealthy upstreams (at the tick
//! after a health change). The admin thread renders JSON from the board, and the
//! upstream health families of `/metrics`: `appproxy_upstream_routes{state}` (routes
//! per health state, always; bounded) and, with `[admin] per_circuit_metrics`,
//! `appproxy_upstream_healthy{circuit,route,upstream}` for at most
//! `per_circuit_metrics_max` circuits. A route's state joins both judges: the
//! coordinator's active health check (`RouteInfo.health_status`) and each core's
//! passive one (refused or failed connects).

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use appproxy_shared::RequestId;
use serde_json::{json, Value};

use crate::config::{Frontend, ResolvedCircuit};
use crate::core::Change;
use crate::liveness::Liveness;
use crate::metrics::{Counter, PerCircuit, SharedMetrics};

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
    /// Whether (and for how many circuits) route health has series of its own.
    per_circuit: PerCircuit,
}

/// A route's health as both judges see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteState {
    /// In rotation (or idle at ratio 0) and not out of rotation on any core.
    Healthy,
    /// Taken out of rotation by the passive check on at least one core.
    PassiveUnhealthy,
    /// Judged unhealthy by the coordinator's active health check.
    ActiveUnhealthy,
}

impl RouteState {
    /// Every state, in exposition order.
    pub const ALL: [Self; 3] = [Self::Healthy, Self::PassiveUnhealthy, Self::ActiveUnhealthy];

    /// The `state` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::PassiveUnhealthy => "passive_unhealthy",
            Self::ActiveUnhealthy => "active_unhealthy",
        }
    }
}

/// One route of a deployed circuit, as introspection shows it.
struct RouteView {
    /// The route's ID, or its position in `route_info` when it has none.
    route: String,
    /// The resolved address when in rotation, else the configured `host:port`.
    upstream: String,
    traffic_ratio: f64,
    state: RouteState,
    /// The coordinator's verdict (`null` when it has none).
    active: Option<&'static str>,
    /// Cores on which the passive check took it out of rotation.
    cores: Vec<usize>,
}

/// Out-of-rotation upstreams now: (circuit, address) → cores.
type OutOfRotation = BTreeMap<(uuid::Uuid, SocketAddr), Vec<usize>>;

/// Every route of `rc` with its state. The in-rotation routes are matched with
/// [`ResolvedCircuit::upstreams`] in order (see [`crate::config::in_rotation`]).
fn route_views(rc: &ResolvedCircuit, out: &OutOfRotation) -> Vec<RouteView> {
    let mut resolved = rc.upstreams.iter();
    rc.circuit
        .route_info
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let addr = crate::config::in_rotation(r)
                .then(|| resolved.next().map(|(a, _)| *a))
                .flatten();
            let cores = addr
                .and_then(|a| out.get(&(rc.circuit.id, a)))
                .cloned()
                .unwrap_or_default();
            let state = if r.health_status == Some(appproxy_shared::model::RouteHealth::Unhealthy) {
                RouteState::ActiveUnhealthy
            } else if !cores.is_empty() {
                RouteState::PassiveUnhealthy
            } else {
                RouteState::Healthy
            };
            RouteView {
                route: r
                    .route_id
                    .map_or_else(|| i.to_string(), |id| id.to_string()),
                upstream: addr.map_or_else(
                    || format!("{}:{}", r.kernel_host, r.kernel_port),
                    |a| a.to_string(),
                ),
                traffic_ratio: r.traffic_ratio,
                state,
                active: r.health_status.map(|h| h.as_str()),
                cores,
            }
        })
        .collect()
}

/// Escapes a label value (backslash, quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Board {
    /// A board for `cpus`, starting with the circuits of the config file.
    pub fn new(
        cpus: &[usize],
        circuits: Vec<ResolvedCircuit>,
        per_circuit: PerCircuit,
    ) -> Arc<Self> {
        Arc::new(Self {
            deployment: Mutex::new((
                circuits
                    .into_iter()
                    .map(|c| (c.circuit.id, Arc::new(c)))
                    .collect(),
                None,
            )),
            unhealthy: Mutex::new(cpus.iter().map(|c| (*c, Vec::new())).collect()),
            per_circuit,
        })
    }

    /// The deployed circuits (sorted by ID) and the last deployment's request ID.
    fn snapshot(&self) -> (Vec<Arc<ResolvedCircuit>>, Option<RequestId>) {
        let (mut circuits, request_id) = {
            let deployment = lock(&self.deployment);
            (
                deployment.0.values().cloned().collect::<Vec<_>>(),
                deployment.1,
            )
        };
        circuits.sort_by_key(|c| c.circuit.id);
        (circuits, request_id)
    }

    /// The upstreams out of rotation now, with the cores that took them out.
    fn out_of_rotation(&self) -> OutOfRotation {
        let now = Instant::now();
        let mut out: OutOfRotation = BTreeMap::new();
        for (cpu, list) in lock(&self.unhealthy).iter() {
            for (id, addr, until) in list {
                if *until > now {
                    out.entry((*id, *addr)).or_default().push(*cpu);
                }
            }
        }
        out
    }

    /// The upstream health families of `/metrics` (see the module docs).
    pub fn render_health(&self, out: &mut String) {
        let (circuits, _) = self.snapshot();
        let oor = self.out_of_rotation();
        let mut counts = [0u64; 3];
        let mut rows = String::new();
        for (n, rc) in circuits.iter().enumerate() {
            let itemised = self.per_circuit.enabled && n < self.per_circuit.max;
            for v in route_views(rc, &oor) {
                counts[v.state as usize] += 1;
                if itemised {
                    let _ = writeln!(
                        rows,
                        "appproxy_upstream_healthy{{circuit=\"{}\",route=\"{}\",upstream=\"{}\"}} {}",
                        rc.circuit.id,
                        escape(&v.route),
                        escape(&v.upstream),
                        u8::from(v.state == RouteState::Healthy)
                    );
                }
            }
        }
        out.push_str(
            "# HELP appproxy_upstream_routes Routes of the deployed circuits by health: healthy, passive_unhealthy (out of rotation on a core after failed connects), active_unhealthy (the coordinator's health check).\n\
             # TYPE appproxy_upstream_routes gauge\n",
        );
        for s in RouteState::ALL {
            let _ = writeln!(
                out,
                "appproxy_upstream_routes{{state=\"{}\"}} {}",
                s.as_str(),
                counts[s as usize]
            );
        }
        if self.per_circuit.enabled {
            out.push_str(
                "# HELP appproxy_upstream_healthy 1 while a route is healthy for both the coordinator's active check and every core's passive one, else 0 ([admin] per_circuit_metrics; at most per_circuit_metrics_max circuits).\n\
                 # TYPE appproxy_upstream_healthy gauge\n",
            );
            out.push_str(&rows);
        }
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
        let (circuits, request_id) = self.snapshot();
        let out_of_rotation = self.out_of_rotation();
        let list: Vec<Value> = circuits
            .iter()
            .map(|rc| {
                let c = &rc.circuit;
                let frontend = match &rc.frontend {
                    Frontend::Port(p) => json!({"port": p}),
                    Frontend::Subdomain(s) => json!({"subdomain": s}),
                };
                let routes: Vec<Value> = route_views(rc, &out_of_rotation)
                    .into_iter()
                    .map(|v| {
                        json!({
                            "route": v.route,
                            "upstream": v.upstream,
                            "traffic_ratio": v.traffic_ratio,
                            "health": if v.state == RouteState::Healthy { "healthy" } else { "unhealthy" },
                            "state": v.state.as_str(),
                            "active_health": v.active,
                            "unhealthy_on_cores": v.cores,
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
