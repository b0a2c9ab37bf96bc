//! Sockets for test clients that survive a stop and continue of the test process.
//!
//! A blocking socket call with a timeout (`SO_RCVTIMEO`, `SO_SNDTIMEO`) is not
//! restarted after the process was stopped and continued: it fails with `EINTR`
//! (signal(7)), even with no signal handler installed. A machine that freezes and
//! thaws the test's sandbox does exactly that. `std`'s `read_exact`, `write_all` and
//! `read_line` retry on it; a bare `read` — what a WebSocket library or a frame
//! reader calls — does not, and a client would take the interruption for a failure
//! of the server under test.

use std::io::{self, ErrorKind, Read, Write};
use std::ops::{Deref, DerefMut};

/// A stream whose reads and writes are retried when a stop of the process
/// interrupted them (each retry waits the socket's whole timeout again: a hang guard
/// only grows).
#[derive(Debug)]
pub struct Uninterrupted<S>(pub S);

impl<S: Read> Read for Uninterrupted<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_uninterrupted(buf)
    }
}

impl<S: Write> Write for Uninterrupted<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        loop {
            match self.0.flush() {
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

impl<S> Deref for Uninterrupted<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.0
    }
}

impl<S> DerefMut for Uninterrupted<S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.0
    }
}

/// `read` that is retried when a stop of the process interrupted it, for a test's
/// own read loops (`while let Ok(n @ 1..) = s.read_uninterrupted(&mut buf)`), where
/// the interruption would end the loop as if the peer had closed.
pub trait ReadUninterrupted: Read {
    /// [`Read::read`], retried on `Interrupted`.
    fn read_uninterrupted(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.read(buf) {
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

impl<R: Read + ?Sized> ReadUninterrupted for R {}

/// A TCP connection from `from` (another loopback address, say: a client of its own
/// to per-address limits) to `to`.
pub fn connect_from(
    from: std::net::Ipv4Addr,
    to: std::net::SocketAddr,
) -> io::Result<std::net::TcpStream> {
    use rustix::net::{bind, connect, socket, AddressFamily, SocketAddrV4, SocketType};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None)?;
    bind(&fd, &SocketAddrV4::new(from, 0))?;
    connect(&fd, &to)?;
    Ok(std::net::TcpStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails with `Interrupted` `n` times, then reads one byte.
    struct Flaky(usize);

    impl Read for Flaky {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 > 0 {
                self.0 -= 1;
                return Err(ErrorKind::Interrupted.into());
            }
            buf[0] = b'x';
            Ok(1)
        }
    }

    #[test]
    fn an_interrupted_read_is_retried_and_other_errors_are_not() {
        let mut buf = [0u8; 4];
        assert_eq!(Uninterrupted(Flaky(3)).read(&mut buf).expect("read"), 1);
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(ErrorKind::TimedOut.into())
            }
        }
        let e = Uninterrupted(Broken).read(&mut buf).expect_err("timed out");
        assert_eq!(e.kind(), ErrorKind::TimedOut);
        assert_eq!(Flaky(2).read_uninterrupted(&mut buf).expect("read"), 1);
        let e = Broken.read_uninterrupted(&mut buf).expect_err("timed out");
        assert_eq!(e.kind(), ErrorKind::TimedOut);
    }
}
