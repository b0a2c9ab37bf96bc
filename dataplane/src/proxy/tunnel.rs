//! Tunnels after a `101 Switching Protocols`: a WebSocket session relayed frame by
//! frame (inspected, never changed, message IDs logged), or any other upgrade relayed
//! as raw bytes, until both sides close or the tunnel idles out.
//!
//! Once the 101 is out, a tunnel is handed to a task of its own ([`Handoff`]) and the
//! connection's task ends: that task's future is sized for every way an HTTP/1.1
//! exchange can go (about 6 KiB), and an idle session kept it for hours. The
//! handed-off task keeps only what the tunnel needs and the exchange's access entry,
//! written when the tunnel ends.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use appproxy_shared::{scope_traced, RequestId};
use tracing::Instrument;

use super::exchange::{Done, Exchange};
use super::{Client, Failure, Next};
use crate::config::ResolvedCircuit;
use crate::core::{counter, Core, TunnelGuard};
use crate::io::TcpConn;
use crate::relay;

/// What a tunnel starts with.
pub(super) struct TunnelEnds {
    /// The app's connection, after its 101.
    pub(super) upstream: TcpConn,
    /// The app's address.
    pub(super) addr: SocketAddr,
    /// Bytes read from the client so far.
    pub(super) bytes_in: u64,
    /// Bytes written to the client so far.
    pub(super) bytes_out: u64,
    /// `Some(allowed RSV bits)` for a WebSocket session; `None` relays raw bytes.
    pub(super) ws_rsv: Option<u8>,
    /// The upgrade request's ID: it names the session.
    pub(super) session: RequestId,
    /// The circuit (its user context goes on the session line).
    pub(super) circuit: Arc<ResolvedCircuit>,
}

/// A tunnel whose 101 is out, to be relayed by a task of its own
/// ([`Handoff::spawn`]).
pub(super) struct Handoff {
    core: Rc<Core>,
    /// The client's connection.
    conn: Rc<TcpConn>,
    ends: TunnelEnds,
    /// What the client and the app sent right behind the handshake.
    early: (Vec<u8>, Vec<u8>),
    /// Watches the tunnel for deployments that revoke it, while it lives.
    open: TunnelGuard,
}

impl Client {
    /// After a 101: sends it (with what the app sent behind it, for a raw tunnel)
    /// and leaves the tunnel in `self.handoff`, for the connection's task to hand to
    /// a task of its own ([`Next::Tunnel`]).
    pub(super) async fn tunnel(
        &mut self,
        ends: TunnelEnds,
        open: TunnelGuard,
    ) -> Result<Done, Failure> {
        let core = self.core.clone();
        let Client {
            conn,
            buf,
            ubuf,
            out,
            ..
        } = self;
        let idle = core.rt.tunnel_idle_timeout;
        // What each side sent right behind the handshake.
        let mut from_app = ubuf.filled().to_vec();
        ubuf.consume(usize::MAX);
        let from_client = buf.filled().to_vec();
        buf.consume(usize::MAX);
        if ends.ws_rsv.is_none() {
            // Nothing of the app's is the client's if the tunnel was revoked as it
            // opened (a WebSocket session drops it the same way).
            if relay::revoked(conn, &ends.upstream) {
                from_app.clear();
            }
            out.extend_from_slice(&from_app);
        }
        // The HTTP buffers are done with: a long-lived tunnel should not keep them.
        ubuf.release();
        buf.release();
        conn.set_timeout(idle);
        conn.write_all(out)
            .await
            .map_err(|e| Failure::Abort(format!("client write: {e}")))?;
        let bytes_out = ends.bytes_out + out.len() as u64;
        // (Kept for the next connection: this one's task ends with the hand-off.)
        out.clear();
        // Drain closes tunnels like idle keep-alive connections.
        conn.set_idle(true);
        let done = Done {
            status: 101,
            bytes_in: ends.bytes_in,
            bytes_out,
            upstream: ends.addr,
            next: Next::Tunnel,
        };
        self.handoff = Some(Handoff {
            core,
            conn: self.conn.clone(),
            ends: TunnelEnds { bytes_out, ..ends },
            early: (from_client, from_app),
            open,
        });
        Ok(done)
    }
}

impl Handoff {
    /// Relays the tunnel in a task of its own, in the exchange's request context and
    /// the connection's span, then counts the exchange and writes its access line
    /// (status 101, the tunnel's bytes with the handshake's). `x`: the upgrade's
    /// exchange, kept for that line. The connection counts as active until then.
    pub(super) fn spawn(self, x: Exchange) {
        let (id, trace) = (x.id, x.trace.map(|t| t.span));
        let task = async move {
            let Handoff {
                core,
                conn,
                ends,
                early,
                open,
            } = self;
            let (bytes_in, bytes_out, addr) = (ends.bytes_in, ends.bytes_out, ends.addr);
            let relayed = match ends.ws_rsv {
                Some(rsv) => Ok(ends.websocket(&core, &conn, rsv, early).await),
                None => {
                    let (from_client, from_app) = early;
                    ends.raw(&core, &conn, &from_client, from_app.len() as u64)
                        .await
                }
            };
            drop(open);
            match relayed {
                Ok((up, down)) => {
                    let done = Done {
                        status: 101,
                        bytes_in: bytes_in + up,
                        bytes_out: bytes_out + down,
                        upstream: addr,
                        next: Next::Close,
                    };
                    Client::finished(&core, &x, &done);
                }
                Err(Failure::Abort(reason)) => Client::aborted(&core, &x, &reason),
                Err(_) => Client::aborted(&core, &x, "tunnel failed"),
            }
            core.metrics.sub(counter::ACTIVE, 1);
        };
        let scoped = scope_traced(Some(id), trace, task);
        crate::reactor::spawn(scoped.instrument(tracing::Span::current())).detach();
    }
}

impl TunnelEnds {
    /// Relays a WebSocket session frame by frame until both sides close or it idles
    /// out; `early`: what the client and the app sent right behind the handshake.
    /// Returns the bytes to the app and to the client.
    async fn websocket(
        self,
        core: &Rc<Core>,
        conn: &Rc<TcpConn>,
        rsv: u8,
        early: (Vec<u8>, Vec<u8>),
    ) -> (u64, u64) {
        let (from_client, from_app) = early;
        let session = self.session;
        let circuit = &self.circuit.circuit;
        let idle = core.rt.tunnel_idle_timeout;
        let stalled = core.rt.tunnel_stall_timeout;
        let started = Instant::now();
        tracing::info!(upstream = %self.addr, "websocket session opened");
        let upstream = Rc::new(self.upstream);
        let shared = Rc::new(relay::WsShared::default());
        let per_message = core.rt.ws_message_ids == crate::config::WsMessageIds::PerMessage;
        let mut early = [Some(from_client), Some(from_app)];
        let (up, down) = both_ways(conn, &upstream, |src, dst, from_client| {
            let (core, shared) = (core.clone(), shared.clone());
            let initial = early[usize::from(!from_client)].take().unwrap_or_default();
            let direction = if from_client { "to_app" } else { "to_client" };
            async move {
                let log = |count: u32| {
                    let last = shared.seq.get();
                    shared.seq.set(last.wrapping_add(count));
                    // The per-message lines are debug lines: with debug off, counting
                    // is all.
                    if !tracing::enabled!(tracing::Level::DEBUG) {
                        return;
                    }
                    for i in 1..=count {
                        let seq = last.wrapping_add(i);
                        if per_message {
                            // The message's own ID, in the session's span: a query
                            // by either ID finds the other through the trace.
                            let id = session.message_id(seq);
                            let span = appproxy_shared::current_span();
                            appproxy_shared::with_request_context(Some(id), span, || {
                                tracing::debug!(direction, seq, "websocket message")
                            });
                        } else {
                            tracing::debug!(direction, seq, "websocket message");
                        }
                    }
                };
                relay::ws_pipe(
                    &src,
                    &dst,
                    initial,
                    from_client,
                    rsv,
                    &shared,
                    idle,
                    stalled,
                    &log,
                    &core.scratch,
                )
                .await
            }
        })
        .await;
        let end = if relay::revoked(conn, &upstream) {
            relay::TunnelEnd::Revoked
        } else if up.idled || down.idled {
            relay::TunnelEnd::Idled
        } else {
            relay::TunnelEnd::Closed
        };
        end.count(&core.metrics);
        // The close that began the session's end, and who sent it (1006: none).
        let (close_code, closed_by) = shared
            .first_close
            .get()
            .map_or((1006, "none"), |(code, by)| (code, by.as_str()));
        tracing::info!(
            duration_ms = started.elapsed().as_millis() as u64,
            messages_to_app = up.messages,
            messages_to_client = down.messages,
            bytes_to_app = up.bytes,
            bytes_to_client = down.bytes,
            dropped_after_close_from_client = up.dropped_after_close,
            dropped_after_close_from_app = down.dropped_after_close,
            close_code,
            closed_by,
            user_id = circuit.user_id.map(tracing::field::display),
            session_id = circuit.session_ids.first().map(tracing::field::display),
            endpoint_id = circuit.endpoint_id.map(tracing::field::display),
            revoked = end == relay::TunnelEnd::Revoked,
            "websocket session closed"
        );
        (up.bytes, down.bytes)
    }

    /// Relays raw bytes both ways until both sides close or the tunnel idles out;
    /// `from_client`: what the client sent right behind the handshake; `early_app`:
    /// how many bytes the app sent right behind its 101 (they went out with it, and
    /// are counted with it). Returns the bytes to the app and to the client, the
    /// client's early bytes included.
    async fn raw(
        self,
        core: &Core,
        conn: &Rc<TcpConn>,
        from_client: &[u8],
        early_app: u64,
    ) -> Result<(u64, u64), Failure> {
        let upstream = Rc::new(self.upstream);
        let idle = core.rt.tunnel_idle_timeout;
        let started = Instant::now();
        // What the client sent behind its request is not the app's if the tunnel was
        // revoked as it opened.
        if !from_client.is_empty() && !relay::revoked(conn, &upstream) {
            upstream.set_timeout(idle);
            upstream
                .write_all(from_client)
                .await
                .map_err(|e| Failure::Abort(format!("upstream write: {e}")))?;
        }
        tracing::info!(upstream = %self.addr, "upgraded connection established");
        let stalled = core.rt.tunnel_stall_timeout;
        let (up, down) = both_ways(conn, &upstream, |src, dst, _| async move {
            let mut buf = vec![0u8; 16 * 1024];
            relay::pipe(&src, &dst, &mut buf, idle, stalled).await
        })
        .await;
        let end = relay::TunnelEnd::of_pipes(&up.1, &down.1);
        end.count(&core.metrics);
        let (up, down) = (from_client.len() as u64 + up.0, down.0);
        tracing::info!(
            duration_ms = started.elapsed().as_millis() as u64,
            revoked = end == relay::TunnelEnd::Revoked,
            bytes_to_app = up,
            bytes_to_client = early_app + down,
            "upgraded connection closed"
        );
        Ok((up, down))
    }
}

/// Runs the two directions of a tunnel, `direction(src, dst, from_client)`, as tasks of
/// their own (in the request's context and the connection's span) and waits for both: a message wakes only the
/// direction it travels, and the task it wakes is that direction's relay alone, not
/// the tunnel's task with the other direction beside it. Dropping the returned future
/// (the tunnel's task cancelled) cancels both.
async fn both_ways<F>(
    client: &Rc<TcpConn>,
    app: &Rc<TcpConn>,
    mut direction: impl FnMut(Rc<TcpConn>, Rc<TcpConn>, bool) -> F,
) -> (F::Output, F::Output)
where
    F: std::future::Future + 'static,
    F::Output: 'static,
{
    let mut spawn = |src: &Rc<TcpConn>, dst: &Rc<TcpConn>, from_client: bool| {
        let relay = direction(src.clone(), dst.clone(), from_client);
        let span = tracing::Span::current();
        crate::reactor::spawn(appproxy_shared::inherit(relay).instrument(span))
    };
    let up = spawn(client, app, true);
    let down = spawn(app, client, false);
    futures_lite::future::zip(up, down).await
}
