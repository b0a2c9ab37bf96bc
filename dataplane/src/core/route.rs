//! The route table of one core: circuits by frontend port or subdomain, and each
//! circuit's routes with their passive health and weighted choice.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use crate::config::{Frontend, ResolvedCircuit, Wildcard};

/// Passive health of one upstream of a route, on one core.
#[derive(Debug, Clone, Copy, Default)]
struct Health {
    /// Failures in a row (connect errors, broken or missing response heads).
    failures: u32,
    /// Excluded from choice until then.
    unhealthy_until: Option<Instant>,
}

/// How passive health judges upstreams.
#[derive(Debug, Clone, Copy)]
pub struct HealthPolicy {
    /// Consecutive failures that mark an upstream unhealthy.
    pub threshold: u32,
    /// How long it stays out of rotation (an active probe may bring it back sooner).
    pub backoff: std::time::Duration,
}

/// IDs of circuits with an upstream marked unhealthy since the active probe last
/// looked, shared by a core's route table and its routes: the probe visits these,
/// not every circuit of the core. A set of circuits in the table, so it stays
/// bounded by the table even when nothing takes from it (the probe turned off).
type Suspects = Rc<RefCell<HashSet<uuid::Uuid>>>;

/// A circuit's routes, ready for weighted choice among the healthy ones.
pub struct Route {
    /// The circuit, shared read-only by every core (one copy per worker, not per core).
    pub circuit: Arc<ResolvedCircuit>,
    /// Per-upstream passive health, indexed like `circuit.upstreams`; empty (no
    /// allocation) until an upstream first fails, as for most circuits it never does.
    health: RefCell<Vec<Health>>,
    /// Where this route reports itself when an upstream turns unhealthy: its table's
    /// list, `None` outside a table or once removed from it (a request still in
    /// flight on a removed circuit reports nothing).
    suspects: RefCell<Option<Suspects>>,
    /// Whether the circuit's app is an RStudio Server, read once per deployment
    /// rather than compared per request.
    rstudio: bool,
    /// For each entry of `circuit.upstreams`, the index of its address's first
    /// entry, whose health judges the address ([`Route::record`] keeps it there);
    /// empty (no allocation) when no address is listed twice, as for most circuits.
    first: Box<[usize]>,
}

impl Route {
    /// Whether the circuit's app is an RStudio Server (`app = "rstudio"`, as the
    /// original names it), told the URL the browser asked for.
    pub fn is_rstudio(&self) -> bool {
        self.rstudio
    }

    /// Prepares `circuit` for routing (outside any table: nobody is told of its
    /// unhealthy upstreams).
    pub fn new(circuit: Arc<ResolvedCircuit>) -> Self {
        let ups = &circuit.upstreams;
        let first_of = |i: usize| ups.iter().position(|(a, _)| *a == ups[i].0).unwrap_or(i);
        let listed_twice = (0..ups.len()).any(|i| first_of(i) != i);
        let first = if listed_twice {
            (0..ups.len()).map(first_of).collect()
        } else {
            Box::default()
        };
        Self {
            rstudio: circuit.circuit.app.as_deref() == Some("rstudio"),
            first,
            circuit,
            health: RefCell::new(Vec::new()),
            suspects: RefCell::new(None),
        }
    }

    /// The index of the first entry of entry `i`'s address, whose health judges it.
    fn first_entry(&self, i: usize) -> usize {
        self.first.get(i).copied().unwrap_or(i)
    }

    /// Picks an upstream by `traffic_ratio` among the healthy ones (all of them when
    /// none is healthy: better a try than a certain failure), skipping `exclude`.
    /// `draw` is uniform in [0, 1). An address listed twice is healthy or not by
    /// its first entry, every entry of it alike.
    pub fn pick(&self, draw: f64, now: Instant, exclude: Option<SocketAddr>) -> Option<SocketAddr> {
        let health = self.health.borrow();
        let ups = &self.circuit.upstreams;
        let usable = |i: usize| Some(ups[i].0) != exclude;
        let healthy = |i: usize| {
            usable(i)
                && health
                    .get(self.first_entry(i))
                    .is_none_or(|h| h.unhealthy_until.is_none_or(|t| t <= now))
        };
        let any_healthy = (0..ups.len()).any(healthy);
        let eligible = |i: usize| if any_healthy { healthy(i) } else { usable(i) };
        let total: f64 = (0..ups.len())
            .filter(|i| eligible(*i))
            .map(|i| ups[i].1)
            .sum();
        if total <= 0.0 {
            return None;
        }
        let mut target = draw * total;
        let mut last = None;
        for i in (0..ups.len()).filter(|i| eligible(*i)) {
            last = Some(ups[i].0);
            if target < ups[i].1 {
                return last;
            }
            target -= ups[i].1;
        }
        last
    }

    /// Records the outcome of an exchange with `addr`; returns true when this failure
    /// just marked it unhealthy.
    pub fn record(&self, addr: SocketAddr, ok: bool, now: Instant, policy: HealthPolicy) -> bool {
        let Some(i) = self.circuit.upstreams.iter().position(|(a, _)| *a == addr) else {
            return false;
        };
        let mut health = self.health.borrow_mut();
        if health.is_empty() {
            if ok {
                return false;
            }
            health.resize(self.circuit.upstreams.len(), Health::default());
        }
        let h = &mut health[i];
        if ok {
            if h.unhealthy_until.is_some() {
                crate::introspect::health_changed();
            }
            *h = Health::default();
            return false;
        }
        h.failures = h.failures.saturating_add(1);
        if h.failures >= policy.threshold && h.unhealthy_until.is_none_or(|t| t <= now) {
            h.unhealthy_until = Some(now + policy.backoff);
            crate::introspect::health_changed();
            if let Some(suspects) = self.suspects.borrow().as_ref() {
                suspects.borrow_mut().insert(self.circuit.circuit.id);
            }
            return true;
        }
        false
    }

    /// Takes over `previous`'s passive health for each app address both route to
    /// (the same circuit, changed); whether one is out of rotation.
    fn carry_health(&self, previous: &Route) -> bool {
        let old = previous.health.borrow();
        if old.is_empty() {
            return false;
        }
        // By the first entry of each address, as `record` keeps it (an address
        // listed twice is judged by its first entry).
        let carried: Vec<Health> = self
            .circuit
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, (addr, _))| {
                (self.first_entry(i) == i)
                    .then(|| {
                        let before = &previous.circuit.upstreams;
                        before.iter().position(|(a, _)| a == addr)
                    })
                    .flatten()
                    .and_then(|j| old.get(j).copied())
                    .unwrap_or_default()
            })
            .collect();
        let out = carried.iter().any(|h| h.unhealthy_until.is_some());
        *self.health.borrow_mut() = carried;
        out
    }

    /// Upstreams out of rotation with the time they come back.
    pub fn out_of_rotation(&self, now: Instant) -> Vec<(SocketAddr, Instant)> {
        let health = self.health.borrow();
        self.circuit
            .upstreams
            .iter()
            .zip(health.iter())
            .filter_map(|((a, _), h)| h.unhealthy_until.filter(|t| *t > now).map(|t| (*a, t)))
            .collect()
    }

    /// Upstreams currently out of rotation.
    pub fn unhealthy(&self, now: Instant) -> Vec<SocketAddr> {
        let health = self.health.borrow();
        self.circuit
            .upstreams
            .iter()
            .zip(health.iter())
            .filter(|(_, h)| h.unhealthy_until.is_some_and(|t| t > now))
            .map(|((a, _), _)| *a)
            .collect()
    }
}

/// The routes of one core, by frontend port or subdomain. A deployment changes only
/// the entries it names ([`RouteTable::apply`]): a request in flight keeps the
/// `Rc<Route>` it looked up, so it sees either the old circuit or the new one.
#[derive(Default)]
pub struct RouteTable {
    /// Port-mode circuits.
    pub by_port: super::FastMap<u16, Rc<Route>>,
    /// Wildcard-mode circuits, by lowercase subdomain.
    pub by_subdomain: HashMap<String, Rc<Route>>,
    /// Every circuit by ID (its frontend says where else it sits).
    by_id: super::FastMap<uuid::Uuid, Rc<Route>>,
    /// The wildcard frontend, in wildcard mode.
    pub wildcard: Option<Wildcard>,
    /// Circuits whose upstreams turned unhealthy since [`RouteTable::take_suspects`].
    suspects: Suspects,
}

impl RouteTable {
    /// Builds a table from resolved circuits.
    pub fn new(circuits: &[Arc<ResolvedCircuit>], wildcard: Option<Wildcard>) -> Self {
        let mut table = Self {
            wildcard,
            ..Self::default()
        };
        for c in circuits {
            table.insert(c.clone());
        }
        table
    }

    /// Applies a deployment: the whole set replaced, or only the circuits it names
    /// upserted and removed — O(changed), whatever the table's size.
    pub fn apply(&mut self, change: &Change) {
        if change.replace {
            // The circuits the new set does not name leave; the others are upserted
            // as any deployment's, so one that did not change keeps its route.
            let named: HashSet<uuid::Uuid> = change.upserts.iter().map(|c| c.circuit.id).collect();
            let gone: Vec<uuid::Uuid> = self
                .by_id
                .keys()
                .filter(|id| !named.contains(id))
                .copied()
                .collect();
            for id in &gone {
                self.remove(id);
            }
        }
        for id in &change.removes {
            self.remove(id);
        }
        for c in &change.upserts {
            self.insert(c.clone());
        }
    }

    /// Adds or replaces one circuit (a replaced one may have moved frontend). A
    /// circuit deployed again unchanged (a reload of the same file, a whole set read
    /// again) keeps its route; a changed one keeps the passive health of each app
    /// address it still routes to. Before, every deployment forgot both: an app
    /// just taken out of rotation took requests again at the next reload.
    fn insert(&mut self, c: Arc<ResolvedCircuit>) {
        let id = c.circuit.id;
        let previous = self.by_id.get(&id).cloned();
        if previous
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(&p.circuit, &c) || *p.circuit == *c)
        {
            return;
        }
        self.remove(&id);
        // Another circuit holding the same frontend loses it: the agent refuses such
        // sets, so this only keeps the table and its index consistent.
        let route = Rc::new(Route::new(c.clone()));
        route.suspects.replace(Some(self.suspects.clone()));
        if let Some(previous) = previous {
            if route.carry_health(&previous) {
                // Still out of rotation: the active probe looks at it again.
                self.suspects.borrow_mut().insert(id);
            }
        }
        let previous = match &c.frontend {
            Frontend::Port(p) => self.by_port.insert(*p, route.clone()),
            Frontend::Subdomain(s) => self.by_subdomain.insert(s.clone(), route.clone()),
        };
        if let Some(previous) = previous {
            self.by_id.remove(&previous.circuit.circuit.id);
            self.forget(&previous);
        }
        self.by_id.insert(id, route);
    }

    /// Removes one circuit, if present.
    fn remove(&mut self, id: &uuid::Uuid) {
        let Some(route) = self.by_id.remove(id) else {
            return;
        };
        match &route.circuit.frontend {
            Frontend::Port(p) => {
                self.by_port.remove(p);
            }
            Frontend::Subdomain(s) => {
                self.by_subdomain.remove(s);
            }
        }
        self.forget(&route);
    }

    /// A route leaving the table reports no more and is no longer a suspect.
    fn forget(&self, route: &Route) {
        route.suspects.take();
        self.suspects.borrow_mut().remove(&route.circuit.circuit.id);
    }

    /// The routes with an upstream out of rotation now, each once: those reported
    /// since the last call (by a failure that marked an upstream unhealthy, or by
    /// [`RouteTable::suspect_again`]) and still in the table. O(reported), whatever
    /// the table's size.
    pub fn take_suspects(&self, now: Instant) -> Vec<Rc<Route>> {
        let ids = std::mem::take(&mut *self.suspects.borrow_mut());
        ids.into_iter()
            .filter_map(|id| self.by_id.get(&id).cloned())
            .filter(|r| !r.unhealthy(now).is_empty())
            .collect()
    }

    /// Reports `route` again: it still has upstreams out of rotation after a probe.
    pub fn suspect_again(&self, route: &Route) {
        self.suspects.borrow_mut().insert(route.circuit.circuit.id);
    }

    /// The circuit with this ID.
    pub fn get(&self, id: &uuid::Uuid) -> Option<Rc<Route>> {
        self.by_id.get(id).cloned()
    }

    /// Every route.
    pub fn routes(&self) -> impl Iterator<Item = &Rc<Route>> {
        self.by_port.values().chain(self.by_subdomain.values())
    }

    /// The ports this table needs listeners on.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.by_port.keys().copied().collect();
        ports.extend(self.wildcard.as_ref().map(|w| w.port));
        ports
    }

    /// The circuit for a connection to `local_port` carrying `host`.
    pub fn lookup(&self, local_port: u16, host: Option<&[u8]>) -> Option<Rc<Route>> {
        match &self.wildcard {
            Some(w) if w.port == local_port => {
                let sub = w.subdomain(host?)?;
                self.by_subdomain.get(sub.as_ref()).cloned()
            }
            _ => self.by_port.get(&local_port).cloned(),
        }
    }

    /// Number of circuits.
    pub fn len(&self) -> usize {
        self.by_port.len() + self.by_subdomain.len()
    }

    /// Whether there are no circuits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One deployment, as every core applies it: the circuits created or changed (shared
/// by every core), the ones removed, or — `replace` — a whole new set.
#[derive(Debug, Default)]
pub struct Change {
    /// The set replaces the table (the config file, a reload); otherwise only the
    /// named circuits change.
    pub replace: bool,
    /// Circuits created or changed (the whole set with `replace`).
    pub upserts: Vec<Arc<ResolvedCircuit>>,
    /// Circuits removed.
    pub removes: Vec<uuid::Uuid>,
}

impl Change {
    /// The whole set `circuits`, replacing whatever was deployed.
    pub fn replace(circuits: Vec<ResolvedCircuit>) -> Self {
        Self {
            replace: true,
            upserts: circuits.into_iter().map(Arc::new).collect(),
            removes: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_choice_follows_traffic_ratio() {
        let text = r#"
[[circuits]]
id = "c0a8f5d2-1111-4222-8333-444455556666"
open_to_public = true
port = 10206
route_info = [
  { session_id = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b", kernel_host = "127.0.0.1", kernel_port = 1001, traffic_ratio = 1.0 },
  { session_id = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b", kernel_host = "127.0.0.1", kernel_port = 1002, traffic_ratio = 3.0 },
]
"#;
        let rt = crate::config::Config::parse(text)
            .expect("parse")
            .validate(&[0])
            .expect("valid");
        let route = Route::new(Arc::new(rt.circuits[0].clone()));
        let now = Instant::now();
        let mut counts = [0u32; 2];
        for i in 0..4000 {
            let draw = (i as f64 + 0.5) / 4000.0;
            let addr = route.pick(draw, now, None).expect("an upstream");
            counts[(addr.port() - 1001) as usize] += 1;
        }
        assert_eq!(counts, [1000, 3000]);
        assert_eq!(route.pick(0.0, now, None).map(|a| a.port()), Some(1001));
        assert_eq!(
            route.pick(0.999_999, now, None).map(|a| a.port()),
            Some(1002)
        );
        // Passive health: three failures take 1002 out of rotation for the back-off.
        let policy = HealthPolicy {
            threshold: 3,
            backoff: std::time::Duration::from_secs(10),
        };
        let b: SocketAddr = "127.0.0.1:1002".parse().expect("addr");
        assert!(!route.record(b, false, now, policy));
        assert!(!route.record(b, false, now, policy));
        assert!(route.record(b, false, now, policy));
        assert_eq!(route.unhealthy(now), vec![b]);
        for i in 0..100 {
            assert_eq!(
                route.pick(i as f64 / 100.0, now, None).map(|a| a.port()),
                Some(1001)
            );
        }
        let later = now + std::time::Duration::from_secs(11);
        assert!(route.unhealthy(later).is_empty());
        // Excluding the only healthy one still offers the other (fail open).
        assert_eq!(
            route.pick(0.5, now, Some("127.0.0.1:1001".parse().expect("addr"))),
            Some(b)
        );
        route.record(b, true, now, policy);
        assert!(route.unhealthy(now).is_empty());
    }

    /// A resolved circuit at a frontend, routing to `upstream`.
    fn resolved(id: u128, frontend: Frontend, upstream: u16) -> Arc<ResolvedCircuit> {
        let session = uuid::Uuid::from_u128(7);
        Arc::new(ResolvedCircuit {
            circuit: appproxy_shared::model::Circuit {
                id: uuid::Uuid::from_u128(id),
                app: None,
                protocol: appproxy_shared::model::ProxyProtocol::Http,
                worker: None,
                app_mode: appproxy_shared::model::AppMode::Interactive,
                frontend_mode: appproxy_shared::model::FrontendMode::Port,
                envs: Default::default(),
                arguments: None,
                open_to_public: true,
                allowed_client_ips: Vec::new(),
                port: None,
                subdomain: None,
                user_id: None,
                endpoint_id: None,
                runtime_variant: None,
                route_info: Vec::new(),
                session_ids: vec![session],
                created_at: None,
                updated_at: None,
                upstream_reuse: None,
            },
            frontend,
            upstreams: vec![(SocketAddr::from(([127, 0, 0, 1], upstream)), 1.0)],
            upstream_tls: Vec::new(),
            reuse_by_client: false,
            allowed: Vec::new(),
            restricted: false,
        })
    }

    #[test]
    fn the_probe_list_holds_just_the_circuits_that_turned_unhealthy() {
        let circuits: Vec<_> = (1..=1000u16)
            .map(|i| resolved(u128::from(i), Frontend::Port(20_000 + i), 30_000 + i))
            .collect();
        let mut table = RouteTable::new(&circuits, None);
        let now = Instant::now();
        let policy = HealthPolicy {
            threshold: 2,
            backoff: std::time::Duration::from_secs(10),
        };
        assert!(
            table.take_suspects(now).is_empty(),
            "a fresh table has none"
        );
        let sick = table.get(&uuid::Uuid::from_u128(500)).expect("present");
        let addr = sick.circuit.upstreams[0].0;
        assert!(
            !sick.record(addr, false, now, policy),
            "one failure is below the threshold"
        );
        assert!(table.take_suspects(now).is_empty());
        assert!(sick.record(addr, false, now, policy));
        sick.record(addr, false, now, policy);
        let found = table.take_suspects(now);
        assert_eq!(found.len(), 1, "reported once, listed once");
        assert_eq!(found[0].circuit.circuit.id, uuid::Uuid::from_u128(500));
        assert!(table.take_suspects(now).is_empty(), "taken means gone");

        // Still unhealthy after a probe: the caller reports it again.
        table.suspect_again(&found[0]);
        assert_eq!(table.take_suspects(now).len(), 1);
        // Back to health, or its back-off over: not listed.
        table.suspect_again(&found[0]);
        assert!(table.take_suspects(now + policy.backoff).is_empty());
        table.suspect_again(&found[0]);
        sick.record(addr, true, now, policy);
        assert!(table.take_suspects(now).is_empty());

        // A circuit removed after its report: not listed.
        let other = table.get(&uuid::Uuid::from_u128(7)).expect("present");
        let other_addr = other.circuit.upstreams[0].0;
        other.record(other_addr, false, now, policy);
        other.record(other_addr, false, now, policy);
        table.apply(&Change {
            removes: vec![uuid::Uuid::from_u128(7)],
            ..Change::default()
        });
        assert!(table.take_suspects(now).is_empty());

        // Nothing taking (the probe off): the list holds each circuit of the table at
        // most once, and nothing of removed circuits, however often they fail.
        let later = now + policy.backoff * 2;
        for _ in 0..5 {
            sick.record(addr, false, later, policy);
            sick.record(addr, false, later + policy.backoff, policy);
            other.record(other_addr, false, later, policy);
        }
        assert_eq!(table.suspects.borrow().len(), 1);
        table.apply(&Change {
            removes: vec![uuid::Uuid::from_u128(500)],
            ..Change::default()
        });
        assert!(
            table.suspects.borrow().is_empty(),
            "a removed circuit is forgotten"
        );
        sick.record(addr, false, later + policy.backoff * 3, policy);
        sick.record(addr, false, later + policy.backoff * 3, policy);
        assert!(
            table.suspects.borrow().is_empty(),
            "and reports nothing after"
        );
    }

    /// What a table routes: (frontend, circuit, upstream port), sorted.
    fn contents(t: &RouteTable) -> Vec<(String, uuid::Uuid, u16)> {
        let mut out: Vec<_> = t
            .by_port
            .iter()
            .map(|(p, r)| {
                (
                    format!("port {p}"),
                    r.circuit.circuit.id,
                    r.circuit.upstreams[0].0.port(),
                )
            })
            .chain(t.by_subdomain.iter().map(|(s, r)| {
                (
                    format!("sub {s}"),
                    r.circuit.circuit.id,
                    r.circuit.upstreams[0].0.port(),
                )
            }))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn changes_apply_in_place_as_a_rebuild_would() {
        use Frontend::{Port, Subdomain};
        let sub = |s: &str| Subdomain(s.to_owned());
        // Each step: a change, and the whole set it leaves (what a rebuild sees).
        let steps: Vec<(Change, Vec<Arc<ResolvedCircuit>>)> = vec![
            (
                Change {
                    upserts: vec![resolved(1, Port(1001), 9001), resolved(2, sub("a"), 9002)],
                    ..Change::default()
                },
                vec![resolved(1, Port(1001), 9001), resolved(2, sub("a"), 9002)],
            ),
            // An update in place (new upstream), one removal, one creation.
            (
                Change {
                    upserts: vec![resolved(1, Port(1001), 9011), resolved(3, sub("b"), 9003)],
                    removes: vec![uuid::Uuid::from_u128(2)],
                    ..Change::default()
                },
                vec![resolved(1, Port(1001), 9011), resolved(3, sub("b"), 9003)],
            ),
            // A circuit moving frontend leaves its old one free.
            (
                Change {
                    upserts: vec![resolved(3, sub("c"), 9003)],
                    ..Change::default()
                },
                vec![resolved(1, Port(1001), 9011), resolved(3, sub("c"), 9003)],
            ),
            // Removing what is not there changes nothing.
            (
                Change {
                    removes: vec![uuid::Uuid::from_u128(99)],
                    ..Change::default()
                },
                vec![resolved(1, Port(1001), 9011), resolved(3, sub("c"), 9003)],
            ),
            // A whole set replaces everything.
            (
                Change {
                    replace: true,
                    upserts: vec![resolved(4, Port(1004), 9004)],
                    removes: Vec::new(),
                },
                vec![resolved(4, Port(1004), 9004)],
            ),
            // One naming that circuit unchanged and another beside it.
            (
                Change {
                    replace: true,
                    upserts: vec![resolved(4, Port(1004), 9004), resolved(5, sub("e"), 9005)],
                    removes: Vec::new(),
                },
                vec![resolved(4, Port(1004), 9004), resolved(5, sub("e"), 9005)],
            ),
        ];
        let mut table = RouteTable::new(&[], None);
        for (i, (change, whole)) in steps.iter().enumerate() {
            table.apply(change);
            let rebuilt = RouteTable::new(whole, None);
            assert_eq!(contents(&table), contents(&rebuilt), "step {i}");
            assert_eq!(table.len(), whole.len(), "step {i}");
            for c in whole {
                let got = table.get(&c.circuit.id).expect("by ID");
                assert_eq!(got.circuit.frontend, c.frontend, "step {i}");
            }
        }
        assert!(table.get(&uuid::Uuid::from_u128(1)).is_none());
        assert_eq!(table.ports(), vec![1004]);
    }

    /// A deployment naming a circuit unchanged (a reload of the same file, a whole
    /// set read again) keeps its route, passive health and all; a changed one keeps
    /// the health of each app address it still routes to, and is the probe's
    /// suspect again while one is out of rotation. Before, every deployment of a
    /// circuit started its health afresh.
    #[test]
    fn a_circuit_deployed_again_keeps_what_passive_health_learnt() {
        let id = uuid::Uuid::from_u128(1);
        let policy = HealthPolicy {
            threshold: 1,
            backoff: std::time::Duration::from_secs(10),
        };
        let now = Instant::now();
        let mut table = RouteTable::new(&[resolved(1, Frontend::Port(1001), 9001)], None);
        let route = table.get(&id).expect("present");
        let addr = route.circuit.upstreams[0].0;
        assert!(route.record(addr, false, now, policy));
        assert_eq!(table.take_suspects(now).len(), 1);
        // The same circuit in another allocation, in a whole set and as an upsert.
        for replace in [true, false] {
            table.apply(&Change {
                replace,
                upserts: vec![resolved(1, Frontend::Port(1001), 9001)],
                removes: Vec::new(),
            });
            let kept = table.get(&id).expect("present");
            assert!(Rc::ptr_eq(&kept, &route), "replace: {replace}");
            assert_eq!(kept.unhealthy(now), vec![addr]);
        }
        // Changed (another app beside it): the address stays out of rotation.
        let mut changed = (*resolved(1, Frontend::Port(1001), 9001)).clone();
        let other = SocketAddr::from(([127, 0, 0, 1], 9002));
        changed.upstreams.push((other, 1.0));
        table.apply(&Change {
            replace: true,
            upserts: vec![Arc::new(changed)],
            removes: Vec::new(),
        });
        let now_route = table.get(&id).expect("present");
        assert!(!Rc::ptr_eq(&now_route, &route));
        assert_eq!(now_route.unhealthy(now), vec![addr]);
        for i in 0..100 {
            assert_eq!(now_route.pick(i as f64 / 100.0, now, None), Some(other));
        }
        let suspects = table.take_suspects(now);
        assert_eq!(suspects.len(), 1, "a suspect again");
        assert!(Rc::ptr_eq(&suspects[0], &now_route));
        // An address listed twice is judged by its first entry, as `record` keeps
        // it: the second does not inherit a back-off no success would clear.
        let mut twice = (*now_route.circuit).clone();
        twice.upstreams.push((addr, 1.0));
        table.apply(&Change {
            upserts: vec![Arc::new(twice)],
            ..Change::default()
        });
        let twice_route = table.get(&id).expect("present");
        assert_eq!(twice_route.unhealthy(now), vec![addr]);
        // Both of its entries are out of rotation: every draw goes to the other.
        for i in 0..100 {
            assert_eq!(twice_route.pick(i as f64 / 100.0, now, None), Some(other));
        }
        table.take_suspects(now);
        // Routed to another address only: nothing to carry.
        table.apply(&Change {
            upserts: vec![resolved(1, Frontend::Port(1001), 9003)],
            ..Change::default()
        });
        let elsewhere = table.get(&id).expect("present");
        assert!(elsewhere.unhealthy(now).is_empty());
        assert!(table.take_suspects(now).is_empty());
        // The old routes report nothing any more.
        route.record(addr, false, now + policy.backoff, policy);
        assert!(table.take_suspects(now).is_empty());
    }

    #[test]
    fn a_request_in_flight_keeps_the_circuit_it_looked_up() {
        let mut table = RouteTable::new(&[resolved(1, Frontend::Port(1001), 9001)], None);
        let held = table.lookup(1001, None).expect("routed");
        table.apply(&Change {
            upserts: vec![resolved(1, Frontend::Port(1001), 9002)],
            ..Change::default()
        });
        assert_eq!(held.circuit.upstreams[0].0.port(), 9001);
        let now = table.lookup(1001, None).expect("routed");
        assert_eq!(now.circuit.upstreams[0].0.port(), 9002);
    }
}
