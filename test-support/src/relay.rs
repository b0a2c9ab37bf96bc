//! A TCP relay between a process under test and a server (a coordinator,
//! PostgreSQL) that a test can freeze: a stopped peer or a stalled network path
//! without stopping anything.

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
        let (flag, count) = (frozen.clone(), taken.clone());
        std::thread::spawn(move || {
            for client in l.incoming().flatten() {
                count.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(to) else {
                    continue;
                };
                for (mut from, mut into) in [
                    (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                    ),
                    (server, client),
                ] {
                    let flag = flag.clone();
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
        }
    }

    /// Freezes it (`true`) or lets it forward again.
    pub fn freeze(&self, frozen: bool) {
        self.frozen
            .store(frozen, std::sync::atomic::Ordering::SeqCst);
    }

    /// Connections taken so far.
    pub fn taken(&self) -> usize {
        self.taken.load(std::sync::atomic::Ordering::SeqCst)
    }
}
