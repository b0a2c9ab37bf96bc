//! The open tunnels of one core (WebSocket sessions, other upgrades, TCP circuits,
//! and the exchanges of `http2` and `grpc` circuits, whose streams live as long),
//! by circuit: what each was admitted on, so that a deployment that removes its
//! circuit, or changes it so that it no longer admits the tunnel's client, closes it.
//!
//! A request is checked against its circuit once, when it arrives; a tunnel lives on
//! for as long as its two peers keep it busy (hours for a terminal or a notebook
//! kernel). Without this, a circuit removed or restricted (an allowlist narrowed, a
//! public circuit made private, the circuit given to another user) kept serving every
//! session opened before the change, until it idled out. The tunnel is re-checked
//! only when a deployment names its circuit: O(tunnels of the changed circuits).

use std::cell::Cell;
use std::net::IpAddr;
use std::rc::Rc;

use appproxy_shared::model::{AppMode, ProxyProtocol};

use super::{counter, Core, FastMap, Route};
use crate::config::{Frontend, ResolvedCircuit};
use crate::io::TcpConn;
use crate::reactor::SlotKey;

/// The credential a circuit requires of its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Credential {
    /// None: a public circuit, or a TCP circuit (its allowlist is its only check).
    None,
    /// The permit cookie of this user (interactive circuits).
    Permit(Option<uuid::Uuid>),
    /// A bearer JWT for the circuit (inference circuits; the token names the
    /// circuit's ID, which a deployment never changes).
    Bearer,
}

impl Credential {
    /// What `c` requires: the same rule as the request path's credential check.
    fn required_by(c: &ResolvedCircuit) -> Self {
        let circuit = &c.circuit;
        if circuit.open_to_public || circuit.protocol == ProxyProtocol::Tcp {
            return Self::None;
        }
        match circuit.app_mode {
            AppMode::Interactive => Self::Permit(circuit.user_id),
            AppMode::Inference => Self::Bearer,
        }
    }
}

/// What a tunnel was admitted on: the circuit as it was then, as far as access goes.
#[derive(Debug)]
struct Admission {
    /// The client's address, as the allowlist saw it.
    client: IpAddr,
    /// Where the client reached the circuit.
    frontend: Frontend,
    /// The protocol the circuit spoke.
    protocol: ProxyProtocol,
    /// The credential it held (what the circuit required).
    credential: Credential,
}

impl Admission {
    fn of(circuit: &ResolvedCircuit, client: IpAddr) -> Self {
        Self {
            client,
            frontend: circuit.frontend.clone(),
            protocol: circuit.circuit.protocol,
            credential: Credential::required_by(circuit),
        }
    }

    /// Why the circuit as deployed now (`None`: removed) would not admit this tunnel,
    /// if it would not.
    fn refused_by(&self, now: Option<&ResolvedCircuit>) -> Option<&'static str> {
        let Some(now) = now else {
            return Some("circuit removed");
        };
        if now.frontend != self.frontend || now.circuit.protocol != self.protocol {
            return Some("circuit moved to another frontend or protocol");
        }
        if !now.admits(self.client) {
            return Some("client address no longer in the circuit's allowlist");
        }
        match Credential::required_by(now) {
            Credential::None => None,
            required if required == self.credential => None,
            _ => Some("the circuit now requires a credential the client did not present"),
        }
    }
}

/// One open tunnel.
struct Tunnel {
    admission: Admission,
    /// The client's and the app's connections (the app's once connected).
    conns: Vec<SlotKey>,
    /// Already revoked (counted and logged once).
    revoked: Cell<bool>,
    /// For a stream that owns no connection (an HTTP/2 stream): told when revoked.
    signal: Option<Rc<Signal>>,
}

/// A revocation told to a stream that owns no connection of its own (an HTTP/2
/// stream shares its client's connection with other streams, which go on): fired
/// when the stream is revoked.
pub use crate::signal::Signal;

/// The open tunnels of one core, by circuit, then by a sequence number of the core.
#[derive(Default)]
pub struct Tunnels {
    by_circuit: std::cell::RefCell<FastMap<uuid::Uuid, FastMap<u64, Tunnel>>>,
    next: Cell<u64>,
}

impl Tunnels {
    /// Circuits with an open tunnel.
    pub fn circuits(&self) -> Vec<uuid::Uuid> {
        self.by_circuit.borrow().keys().copied().collect()
    }

    /// Whether no tunnel is open.
    pub fn is_empty(&self) -> bool {
        self.by_circuit.borrow().is_empty()
    }
}

impl Core {
    /// Counts a tunnel of `route`'s circuit as open until the guard drops (metrics,
    /// and the last-access marks when somebody reads them), and watches it for
    /// deployments: `client` is the address the circuit's allowlist admitted,
    /// `client_conn` the client's connection. When a deployment already changed the
    /// circuit since the request was admitted against `route`, the tunnel is checked
    /// against the circuit as it is now, and revoked at once if refused.
    pub fn tunnel_open(
        self: &Rc<Self>,
        route: &Rc<Route>,
        client: IpAddr,
        client_conn: &TcpConn,
    ) -> TunnelGuard {
        self.metrics.add(counter::TUNNELS_ACTIVE, 1);
        self.metrics.add(counter::TUNNELS_OPENED, 1);
        self.watch_admitted(route, client, vec![client_conn.slot_key()], None, true)
    }

    /// Watches an exchange of an `http2` or `grpc` circuit while it lives (a gRPC
    /// stream carries input to its app for as long as a WebSocket session does),
    /// as [`Core::tunnel_open`] does a tunnel, without counting it as one: a
    /// deployment that no longer admits it closes `client_conn` (an HTTP/1.1
    /// client's connection, its own), or else fires the returned [`Signal`] (an
    /// HTTP/2 stream, whose connection carries others).
    pub fn stream_open(
        self: &Rc<Self>,
        route: &Rc<Route>,
        client: IpAddr,
        client_conn: Option<&TcpConn>,
    ) -> (TunnelGuard, Rc<Signal>) {
        let signal = Rc::new(Signal::default());
        let conns = client_conn.map(TcpConn::slot_key).into_iter().collect();
        let guard = self.watch_admitted(route, client, conns, Some(signal.clone()), false);
        (guard, signal)
    }

    fn watch_admitted(
        self: &Rc<Self>,
        route: &Rc<Route>,
        client: IpAddr,
        conns: Vec<SlotKey>,
        signal: Option<Rc<Signal>>,
        counted: bool,
    ) -> TunnelGuard {
        let circuit = route.circuit.circuit.id;
        let seq = self.tunnels.next.get() + 1;
        self.tunnels.next.set(seq);
        let tunnel = Tunnel {
            admission: Admission::of(&route.circuit, client),
            conns,
            revoked: Cell::new(false),
            signal,
        };
        let current = self.routes.borrow().get(&circuit);
        let changed = !current.as_ref().is_some_and(|c| Rc::ptr_eq(c, route));
        self.tunnels
            .by_circuit
            .borrow_mut()
            .entry(circuit)
            .or_default()
            .insert(seq, tunnel);
        let guard = TunnelGuard {
            core: self.clone(),
            circuit,
            seq,
            counted,
        };
        if changed {
            self.recheck_circuit_tunnels(circuit, current.as_deref());
        }
        guard
    }

    /// Re-checks the tunnels of the circuits `change` names against the route table
    /// (after the change was applied): those whose circuit is gone, or no longer
    /// admits them, are revoked. O(tunnels of the named circuits); a change that
    /// replaces the whole set checks every circuit with a tunnel.
    pub fn recheck_tunnels(&self, change: &super::Change) {
        if self.tunnels.is_empty() {
            return;
        }
        let named: Vec<uuid::Uuid> = if change.replace {
            self.tunnels.circuits()
        } else {
            let open = self.tunnels.by_circuit.borrow();
            change
                .removes
                .iter()
                .chain(change.upserts.iter().map(|c| &c.circuit.id))
                .filter(|id| open.contains_key(id))
                .copied()
                .collect()
        };
        for id in named {
            let current = self.routes.borrow().get(&id);
            self.recheck_circuit_tunnels(id, current.as_deref());
        }
    }

    /// Revokes the tunnels of `circuit` that `now` (the circuit as deployed now,
    /// `None`: removed) would not admit; logs once per reason.
    fn recheck_circuit_tunnels(&self, circuit: uuid::Uuid, now: Option<&Route>) {
        let open = self.tunnels.by_circuit.borrow();
        let Some(tunnels) = open.get(&circuit) else {
            return;
        };
        let mut closed: Vec<(&'static str, u64)> = Vec::new();
        for t in tunnels.values().filter(|t| !t.revoked.get()) {
            let Some(reason) = t.admission.refused_by(now.map(|r| &*r.circuit)) else {
                continue;
            };
            t.revoked.set(true);
            for key in &t.conns {
                self.reactor.revoke(*key);
            }
            if let Some(signal) = &t.signal {
                signal.fire();
            }
            self.metrics.add(counter::TUNNELS_REVOKED, 1);
            match closed.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, n)) => *n += 1,
                None => closed.push((reason, 1)),
            }
        }
        for (reason, tunnels) in closed {
            tracing::info!(core = self.cpu, %circuit, tunnels, reason, "closing tunnels a deployment no longer admits");
        }
    }
}

/// An open tunnel, counted and watched ([`Core::tunnel_open`]) while it lives.
pub struct TunnelGuard {
    /// The core counting it.
    core: Rc<Core>,
    /// The tunnel's circuit.
    circuit: uuid::Uuid,
    /// Its number on the core.
    seq: u64,
    /// Counted as an open tunnel (a stream is watched, not counted).
    counted: bool,
}

impl TunnelGuard {
    /// Watches the app's connection too, once it is open: a revocation closes both.
    /// When the tunnel was revoked already (while the app was being connected to),
    /// the app's connection is revoked at once.
    pub fn watch(&self, app: &TcpConn) {
        let key = app.slot_key();
        let mut open = self.core.tunnels.by_circuit.borrow_mut();
        if let Some(t) = open
            .get_mut(&self.circuit)
            .and_then(|m| m.get_mut(&self.seq))
        {
            t.conns.push(key);
            if t.revoked.get() {
                self.core.reactor.revoke(key);
            }
        }
    }
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        if self.counted {
            self.core.metrics.sub(counter::TUNNELS_ACTIVE, 1);
        }
        let mut open = self.core.tunnels.by_circuit.borrow_mut();
        if let Some(tunnels) = open.get_mut(&self.circuit) {
            tunnels.remove(&self.seq);
            if tunnels.is_empty() {
                open.remove(&self.circuit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn circuit(toml_extra: &str) -> ResolvedCircuit {
        let text = format!(
            "[secrets]\njwt_secret = \"j\"\npermit_secret = \"p\"\n\n[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455556666\"\nport = 10210\n{toml_extra}\nroute_info = []\n"
        );
        let config = crate::config::Config::parse(&text).expect("config");
        let mut circuits = config.resolve_circuits(&config.circuits).expect("resolve");
        circuits.pop().expect("one circuit")
    }

    #[test]
    fn a_tunnel_stays_admitted_exactly_while_the_circuit_would_admit_its_client() {
        let client: IpAddr = "10.1.2.3".parse().expect("ip");
        let user = "user_id = \"7f0c6a1e-2b3c-4d5e-8f90-a1b2c3d4e5f6\"";
        let other = "user_id = \"0f0c6a1e-2b3c-4d5e-8f90-a1b2c3d4e5f6\"";
        let cases: &[(&str, &str, Option<&str>)] = &[
            // (admitted on, deployed now, refused?)
            ("open_to_public = true", "open_to_public = true", None),
            (
                "open_to_public = true",
                "open_to_public = true\nallowed_client_ips = \"10.0.0.0/8\"",
                None,
            ),
            (
                "open_to_public = true",
                "open_to_public = true\nallowed_client_ips = \"192.168.0.0/16\"",
                Some("allowlist"),
            ),
            (
                "open_to_public = true",
                "open_to_public = true\nallowed_client_ips = \"not-an-ip\"",
                Some("allowlist"),
            ),
            ("open_to_public = true", user, Some("credential")),
            (user, user, None),
            (user, "open_to_public = true", None),
            (user, other, Some("credential")),
            (user, "app_mode = \"inference\"", Some("credential")),
            ("app_mode = \"inference\"", "app_mode = \"inference\"", None),
            ("protocol = \"tcp\"", "protocol = \"tcp\"", None),
            (
                "protocol = \"tcp\"",
                "protocol = \"tcp\"\nallowed_client_ips = \"10.1.2.3\"",
                None,
            ),
            (
                "protocol = \"tcp\"",
                "protocol = \"tcp\"\nallowed_client_ips = \"10.1.2.4\"",
                Some("allowlist"),
            ),
            ("protocol = \"tcp\"", user, Some("protocol")),
        ];
        for (then, now, refused) in cases {
            let admission = Admission::of(&circuit(then), client);
            let got = admission.refused_by(Some(&circuit(now)));
            match refused {
                None => assert_eq!(got, None, "{then} -> {now}"),
                Some(word) => assert!(
                    got.is_some_and(|r| r.contains(word)),
                    "{then} -> {now}: {got:?}"
                ),
            }
        }
        let admission = Admission::of(&circuit("open_to_public = true"), client);
        assert_eq!(admission.refused_by(None), Some("circuit removed"));
        let moved = circuit("open_to_public = true").frontend;
        let mut elsewhere = circuit("open_to_public = true");
        elsewhere.frontend = Frontend::Port(10211);
        assert_ne!(moved, elsewhere.frontend);
        assert!(admission
            .refused_by(Some(&elsewhere))
            .is_some_and(|r| r.contains("frontend")));
    }
}
