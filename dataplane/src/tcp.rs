//! Raw TCP circuits (`protocol = "tcp"`: VNC, RDP, SSH): bytes relayed both ways with
//! half-close, the circuit's IP allowlist applied to the direct peer, and one log
//! line per connection (bytes each way, duration) under a generated request ID.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use appproxy_shared::{scope, RequestId};

use crate::core::{counter, Core, Route};
use crate::io::TcpConn;
use crate::relay;

/// Serves one accepted connection of a TCP circuit.
pub async fn serve(core: Rc<Core>, client: TcpConn, peer: SocketAddr, local_port: u16) {
    core.metrics.add(counter::ACCEPTED, 1);
    core.metrics.add(counter::ACTIVE, 1);
    let id = RequestId::generate(core.rt.id_version);
    scope(Some(id), relay_connection(&core, client, peer, local_port)).await;
    core.metrics.sub(counter::ACTIVE, 1);
}

async fn relay_connection(core: &Rc<Core>, client: TcpConn, peer: SocketAddr, local_port: u16) {
    let Some(route) = core.route_for_port(local_port) else {
        tracing::info!(
            port = local_port,
            "tcp connection for a removed circuit: closed"
        );
        return;
    };
    let circuit = route.circuit.circuit.id;
    if !route.circuit.admits(peer.ip()) {
        tracing::info!(%circuit, peer = %peer.ip(), "tcp peer not in the circuit's allowlist: closed");
        return;
    }
    core.mark_access(circuit);
    // Watched from here: a deployment that removes the circuit, or narrows its
    // allowlist past this client, closes the connection.
    let open = core.tunnel_open(&route, peer.ip(), &client);
    let Some(mut addr) = route.pick(core.draw(), core.reactor.now(), None) else {
        tracing::warn!(%circuit, "tcp circuit has no route: closed");
        return;
    };
    let upstream = match TcpConn::connect(&core.reactor, addr, core.rt.connect_timeout).await {
        Ok(c) => c,
        Err(e) => {
            if !connect_failed(core, &route, addr, &e) {
                return;
            }
            let alt = route.pick(core.draw(), core.reactor.now(), Some(addr));
            match alt {
                Some(alt) if alt != addr => {
                    match TcpConn::connect(&core.reactor, alt, core.rt.connect_timeout).await {
                        Ok(c) => {
                            addr = alt;
                            c
                        }
                        Err(e) => {
                            connect_failed(core, &route, alt, &e);
                            return;
                        }
                    }
                }
                _ => return,
            }
        }
    };
    core.connect_succeeded();
    open.watch(&upstream);
    route.record(addr, true, core.reactor.now(), core.health_policy());
    // Drain closes a tunnel at once, like an idle keep-alive connection: both sides,
    // so that neither direction waits for an app that never closes its side.
    client.set_idle(true);
    upstream.set_idle(true);
    let started = Instant::now();
    let idle = core.rt.tunnel_idle_timeout;
    let mut up_buf = vec![0u8; 16 * 1024];
    let mut down_buf = vec![0u8; 16 * 1024];
    let (up, down) = futures_lite::future::zip(
        relay::pipe(&client, &upstream, &mut up_buf, idle),
        relay::pipe(&upstream, &client, &mut down_buf, idle),
    )
    .await;
    let end = relay::TunnelEnd::of_pipes(&up.1, &down.1);
    end.count(&core.metrics);
    let (up, down) = (up.0, down.0);
    core.metrics.add(counter::BYTES_IN, up);
    core.metrics.add(counter::BYTES_OUT, down);
    tracing::info!(
        %circuit,
        peer = %peer,
        upstream = %addr,
        bytes_to_app = up,
        bytes_to_client = down,
        duration_ms = started.elapsed().as_millis() as u64,
        revoked = end == relay::TunnelEnd::Revoked,
        "tcp connection closed"
    );
}

/// Books a failed upstream connect: a local failure (out of descriptors …) is counted
/// and logged once per burst, never against the upstream's health, and is not worth
/// another upstream (it would fail the same way); any other failure counts against
/// `addr`. Returns whether another upstream may be tried.
fn connect_failed(core: &Core, route: &Route, addr: SocketAddr, e: &std::io::Error) -> bool {
    if crate::core::is_local_error(e) {
        core.local_connect_failure(addr, e);
        return false;
    }
    tracing::warn!(circuit = %route.circuit.circuit.id, upstream = %addr, error = %e, "tcp upstream connect failed");
    let policy = core.health_policy();
    if route.record(addr, false, core.reactor.now(), policy) {
        tracing::warn!(upstream = %addr, failures = policy.threshold, backoff_secs = policy.backoff.as_secs(), "upstream marked unhealthy");
    }
    true
}
