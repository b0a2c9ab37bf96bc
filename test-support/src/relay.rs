//! A TCP relay between a process under test and a server (a coordinator,
//! PostgreSQL, Redis) that a test can freeze — a stopped peer or a stalled network
//! path without stopping anything — or have cut the server's answers short.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// A TCP relay that can be frozen: while it is, it forwards nothing either way and
/// holds every connection open, as a server stopped by SIGSTOP (or a network path
/// that drops packets) does. It counts the connections it took.
pub struct Relay {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Set: frozen.
    pub frozen: Arc<std::sync::atomic::AtomicBool>,
    /// Connections taken, frozen or not.
    pub taken: Arc<std::sync::atomic::AtomicUsize>,
    /// Set: each answer from the server is cut short (see [`Relay::cut`]).
    pub cutting: Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    /// A relay to `to`, not frozen.
    pub fn start(to: SocketAddr) -> Self {
        use std::io::Read;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let frozen = Arc::new(AtomicBool::new(false));
        let taken = Arc::new(AtomicUsize::new(0));
        let cutting = Arc::new(AtomicBool::new(false));
        let (flag, count, cut) = (frozen.clone(), taken.clone(), cutting.clone());
        std::thread::spawn(move || {
            for client in l.incoming().flatten() {
                count.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(to) else {
                    continue;
                };
                for (mut from, mut into, answers) in [
                    (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                        false,
                    ),
                    (server, client, true),
                ] {
                    let (flag, cut) = (flag.clone(), cut.clone());
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        loop {
                            let read = from.read(&mut buf);
                            // Frozen, nothing goes on, not even the end: a frozen
                            // process does not close its connections.
                            while flag.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            let n = match read {
                                // The end goes on too (the other copy holds the socket).
                                Ok(0) | Err(_) => {
                                    let _ = into.shutdown(std::net::Shutdown::Write);
                                    return;
                                }
                                Ok(n) => n,
                            };
                            if answers && cut.load(Ordering::SeqCst) {
                                // Half the answer, then the connection closed.
                                let _ = into.write_all(&buf[..n.div_ceil(2)]);
                                let _ = into.shutdown(std::net::Shutdown::Both);
                                let _ = from.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                            if into.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Self {
            addr,
            frozen,
            taken,
            cutting,
        }
    }

    /// Freezes it (`true`) or lets it forward again.
    pub fn freeze(&self, frozen: bool) {
        self.frozen
            .store(frozen, std::sync::atomic::Ordering::SeqCst);
    }

    /// Cuts each answer of the server short (`true`: half of what it sent, then
    /// the connection closed both ways, as a balancer resetting connections
    /// mid-answer does), or lets answers through whole again.
    pub fn cut(&self, cutting: bool) {
        self.cutting
            .store(cutting, std::sync::atomic::Ordering::SeqCst);
    }

    /// Connections taken so far.
    pub fn taken(&self) -> usize {
        self.taken.load(std::sync::atomic::Ordering::SeqCst)
    }
}
