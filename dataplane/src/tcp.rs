//! Raw TCP circuits (`protocol = "tcp"`: VNC, RDP, SSH): bytes relayed both ways with
//! half-close, the circuit's IP allowlist applied to the direct peer, and one log
//! line per connection (bytes each way, duration) under a generated request ID.
//!
//! One thing is looked at in the bytes: a browser's permit cookie ([`PermitGuard`]).
//! A TCP circuit shares its host name with the interactive circuits of every user,
//! and a browser sends a host's cookies to any of its ports: a page that sent a user
//! to `http://<worker>:<tcp port>/` handed the TCP circuit's app — anyone's, since
//! nothing credentials a TCP circuit — that user's permit to all their circuits.

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
    let mut first = TcpConn::connect(&core.reactor, addr, core.rt.connect_timeout).await;
    // Out of descriptors: idle app connections give theirs back, tried once more.
    if first.as_ref().is_err_and(|e| core.shed_idle_for(e)) {
        first = TcpConn::connect(&core.reactor, addr, core.rt.connect_timeout).await;
    }
    let upstream = match first {
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
    let stalled = core.rt.tunnel_stall_timeout;
    let mut up_buf = vec![0u8; 16 * 1024];
    let mut down_buf = vec![0u8; 16 * 1024];
    let mut guard = PermitGuard::default();
    let (up, down) = futures_lite::future::zip(
        relay::pipe_inspected(&client, &upstream, &mut up_buf, idle, stalled, |chunk| {
            guard.inspect(chunk)
        }),
        relay::pipe(&upstream, &client, &mut down_buf, idle, stalled),
    )
    .await;
    if guard.tripped {
        tracing::warn!(
            %circuit,
            peer = %peer,
            "tcp connection closed: an HTTP request carrying a permit cookie (a browser sent to a tcp circuit's port) never reaches its app"
        );
    }
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

/// Looks at what a client sends a TCP circuit for the worker's permit cookie: when
/// the stream opens as an HTTP/1 request (a method in capitals, then a space), every
/// chunk is searched for a permit cookie's name ([`PERMIT_COOKIE`], which every
/// user's starts with), across chunk boundaries, and the connection is closed before
/// the chunk that completes one is relayed: the name's first bytes may have gone on
/// in the chunk before (nothing is held back, or a request ending there would
/// wait), its value never. Other protocols (SSH, RDP, VNC, TLS) are never looked
/// into again after their first bytes.
///
/// [`PERMIT_COOKIE`]: crate::http::encode::PERMIT_COOKIE
#[derive(Default)]
pub struct PermitGuard {
    /// `None` until the first bytes say whether the stream is HTTP.
    http: Option<bool>,
    /// The last bytes of the previous chunk (a name split between two reads).
    tail: Vec<u8>,
    /// Whether a permit cookie was found (the connection was closed for it).
    pub tripped: bool,
}

impl PermitGuard {
    /// Checks one chunk before it is relayed.
    pub fn inspect(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        let name = crate::http::encode::PERMIT_COOKIE.as_bytes();
        let http = match self.http {
            Some(http) => http,
            None => {
                // Empty lines before a request line are skipped (RFC 9112 §2.2), as
                // the worker's own parser skips them: the first other byte decides.
                let Some(start) = chunk.iter().position(|b| !matches!(b, b'\r' | b'\n')) else {
                    return Ok(());
                };
                *self.http.insert(looks_like_http(&chunk[start..]))
            }
        };
        if !http {
            return Ok(());
        }
        // The tail and the chunk's first bytes hold any name split between reads;
        // the chunk itself any name within it.
        let mut seam = std::mem::take(&mut self.tail);
        let old = seam.len();
        seam.extend_from_slice(&chunk[..chunk.len().min(name.len() - 1)]);
        if contains(&seam, name) || contains(chunk, name) {
            self.tripped = true;
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "a permit cookie sent to a tcp circuit",
            ));
        }
        // The stream's last bytes, however short the chunks are.
        self.tail = if chunk.len() >= name.len() - 1 {
            chunk[chunk.len() - (name.len() - 1)..].to_vec()
        } else {
            seam.truncate(old + chunk.len());
            let from = seam.len().saturating_sub(name.len() - 1);
            seam.split_off(from)
        };
        Ok(())
    }
}

/// Whether a stream's first bytes open an HTTP/1 request: 3 to 10 capital letters
/// (a method), then a space. A request split before its space counts as HTTP too.
fn looks_like_http(first: &[u8]) -> bool {
    let method = first.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match first.get(method) {
        Some(b' ') => (3..=10).contains(&method),
        None => method > 0 && method <= 10,
        Some(_) => false,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::PermitGuard;

    /// Every way a permit cookie reaches a TCP circuit in an HTTP request is
    /// refused; other protocols, and HTTP without one, pass untouched.
    #[test]
    fn the_permit_guard_refuses_only_permit_cookies_in_http() {
        let run = |chunks: &[&[u8]]| {
            let mut g = PermitGuard::default();
            chunks.iter().all(|c| g.inspect(c).is_ok())
        };
        let cookie = b"GET / HTTP/1.1\r\nHost: h\r\nCookie: a=1; appproxy_permit_3f2b=x\r\n\r\n";
        assert!(!run(&[cookie]), "in one chunk");
        for split in 1..cookie.len() {
            let (a, b) = cookie.split_at(split);
            assert!(!run(&[a, b]), "split at {split}");
        }
        let bytes: Vec<&[u8]> = cookie.chunks(1).collect();
        assert!(!run(&bytes), "a byte at a time");
        assert!(
            !run(&[
                b"GET / HTTP/1.1\r\n\r\n",
                b"GET / HTTP/1.1\r\nCookie: appproxy_permit=x\r\n\r\n"
            ]),
            "a later request"
        );
        assert!(run(&[b"GET / HTTP/1.1\r\nHost: h\r\nCookie: a=1\r\n\r\n"]));
        assert!(
            run(&[b"SSH-2.0-OpenSSH_9.6\r\n", b"appproxy_permit"]),
            "not HTTP"
        );
        assert!(run(&[b"\x16\x03\x01\x02\x00appproxy_permit"]), "TLS");
        assert!(
            !run(&[b"PO", b"ST / HTTP/1.1\r\nCookie: appproxy_permit=x\r\n"]),
            "the method split"
        );
        // Empty lines before the request line (which HTTP servers skip) do not
        // hide it; before, a leading CRLF made the stream "not HTTP".
        assert!(
            !run(&[b"\r\n", &cookie[..]]),
            "after an empty line of its own"
        );
        assert!(
            !run(&[b"\r\n\n\r\n", b"\r\n", &[b"\n".as_slice(), cookie].concat()]),
            "after empty lines"
        );
        assert!(run(&[
            b"\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"appproxy_permit"
        ]));
    }
}
