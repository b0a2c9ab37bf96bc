//! Raw (non-WebSocket) upgrades: an app that switches to `x-raw` and echoes, its
//! 101 held back by a [`Gate`] when a test needs it late, and the client's side.

use appproxy_test_support::net::ReadUninterrupted;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Holds an app's 101 until opened; counts the requests that arrived.
#[derive(Default)]
pub struct Gate {
    /// (requests arrived, open)
    state: Mutex<(u32, bool)>,
    changed: Condvar,
}

impl Gate {
    pub fn pass(&self) {
        let mut state = self.state.lock().expect("gate");
        state.0 += 1;
        self.changed.notify_all();
        while !state.1 {
            state = self.changed.wait(state).expect("gate");
        }
    }

    pub fn wait_arrived(&self, n: u32) {
        let state = self.state.lock().expect("gate");
        let (_state, timeout) = self
            .changed
            .wait_timeout_while(state, Duration::from_secs(10), |s| s.0 < n)
            .expect("gate");
        assert!(!timeout.timed_out(), "the request never reached the app");
    }

    pub fn open(&self) {
        self.state.lock().expect("gate").1 = true;
        self.changed.notify_all();
    }

    pub fn close(&self) {
        self.state.lock().expect("gate").1 = false;
    }
}

/// An app answering every request with a 101 to `x-raw`, once `gate` (when given)
/// opens, then echoing bytes.
pub fn raw_upgrade_app(gate: Option<Arc<Gate>>) -> std::net::SocketAddr {
    raw_upgrade_app_sending(gate, b"")
}

/// [`raw_upgrade_app`], sending `behind` right behind its 101 (in the same write).
pub fn raw_upgrade_app_sending(
    gate: Option<Arc<Gate>>,
    behind: &'static [u8],
) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let gate = gate.clone();
            std::thread::spawn(move || {
                if !read_request_head(&mut s) {
                    return;
                }
                if let Some(gate) = gate {
                    gate.pass();
                }
                let mut answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x-raw\r\nConnection: Upgrade\r\n\r\n".to_vec();
                answer.extend_from_slice(behind);
                if s.write_all(&answer).is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read_uninterrupted(&mut buf) {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Sends a raw upgrade request to `port`.
pub fn raw_upgrade_request(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(b"GET /raw HTTP/1.1\r\nHost: t\r\nUpgrade: x-raw\r\nConnection: Upgrade\r\n\r\n")
        .expect("upgrade");
    s
}

/// The app's side: reads a request's head byte by byte (nothing behind it is
/// taken); false when the connection ends first.
pub fn read_request_head(s: &mut TcpStream) -> bool {
    let (mut head, mut byte) = (Vec::new(), [0u8; 1]);
    while !head.ends_with(b"\r\n\r\n") {
        if s.read_exact(&mut byte).is_err() {
            return false;
        }
        head.push(byte[0]);
    }
    true
}

/// Reads the 101's head (over TCP or TLS), byte by byte: what follows it stays
/// unread.
pub fn switched<S: Read>(s: &mut S) {
    let (mut head, mut byte) = (Vec::new(), [0u8; 1]);
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("101 head");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
}

/// Opens a raw upgrade through `port` and checks one echo.
pub fn raw_upgrade(port: u16, what: &str) -> TcpStream {
    let mut s = raw_upgrade_request(port);
    switched(&mut s);
    s.write_all(what.as_bytes()).expect("bytes");
    let mut echo = vec![0u8; what.len()];
    s.read_exact(&mut echo).expect("echo");
    assert_eq!(echo, what.as_bytes());
    s
}
