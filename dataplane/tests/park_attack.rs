//! The stall detector against a core that was idle and has just been given work: its
//! last turn is old (it slept in `epoll_wait` for as long as nothing came), so the
//! age of that turn says nothing about how long the new work has waited. Such a core
//! is not stalled while its thread is still being scheduled; it is once the work has
//! waited longer than the bound with no turn. Driven through the liveness API with a
//! real epoll set and eventfd standing for the core's, the core's thread played by
//! the test (so that "not scheduled yet" is exact, not a race).
//!
//! And drain on `SIGTERM` against a raw TCP tunnel whose app never closes its side:
//! the tunnel is closed at once, like an idle keep-alive connection, instead of
//! holding the core (and the process) until the drain timeout.
//!
//! And a timeout too large to become a deadline on the core's clock is refused when
//! the config is read, instead of panicking the core at its first request.

mod common;

use appproxy_test_support::net::ReadUninterrupted;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use appproxy_dataplane::liveness::Liveness;
use common::{Worker, WorkerOpts};
use rustix::event::{epoll, eventfd, EventfdFlags};

/// An epoll set holding one eventfd, as a core's reactor has.
fn epoll_with_eventfd() -> (OwnedFd, OwnedFd) {
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC).expect("epoll");
    let ev = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).expect("eventfd");
    epoll::add(
        &ep,
        &ev,
        epoll::EventData::new_u64(1),
        epoll::EventFlags::IN | epoll::EventFlags::ET,
    )
    .expect("epoll add");
    (ep, ev)
}

/// What the core's reactor does on waking: take the events, then complete a turn.
fn core_turns(l: &Liveness, ep: &OwnedFd, ev: &OwnedFd) {
    let mut events: Vec<epoll::Event> = Vec::with_capacity(8);
    let _ = epoll::wait(
        ep,
        rustix::buffer::spare_capacity(&mut events),
        Some(&rustix::event::Timespec::default()),
    );
    let mut buf = [0u8; 8];
    let _ = rustix::io::read(ev, &mut buf);
    let now = Instant::now();
    l.cores[0].turned(now);
    l.cores[0].parking(now, None);
}

#[test]
fn an_idle_core_given_work_a_moment_ago_is_not_stalled_until_the_work_waited_past_the_bound() {
    let bound = Duration::from_millis(300);
    let l = Liveness::new(&[0], bound);
    let (ep, ev) = epoll_with_eventfd();
    l.cores[0].attach(
        ep.try_clone().expect("dup epoll"),
        ev.try_clone().expect("dup eventfd"),
    );
    // The core turns once and parks with no deadline: idle, for longer than the bound.
    core_turns(&l, &ep, &ev);
    std::thread::sleep(bound * 3);
    assert!(l.check().is_empty(), "an idle core is never stalled");
    assert_eq!(l.stalls(), 0);

    // A connection arrives: the epoll set is readable, and the core's thread has not
    // been scheduled yet (on a loaded machine that takes a while).
    rustix::io::write(&ev, &1u64.to_ne_bytes()).expect("wake");
    assert!(
        l.check().is_empty(),
        "work that arrived a moment ago is not a stall, however old the last turn"
    );
    assert!(
        l.check().is_empty(),
        "nor is it a moment later, well inside the bound"
    );
    assert_eq!(l.stalls(), 0);
    let mut metrics = String::new();
    l.render(&mut metrics);
    assert!(
        metrics.contains("appproxy_core_stalled{core=\"0\"} 0"),
        "{metrics}"
    );

    // The core turns: nothing waits any more.
    core_turns(&l, &ep, &ev);
    assert!(l.check().is_empty());

    // Work arrives again and the core never takes it: once it has waited longer than
    // the bound, the core is stalled, counted and kicked (hang guard, not a timing
    // assertion).
    std::thread::sleep(bound * 3);
    rustix::io::write(&ev, &1u64.to_ne_bytes()).expect("wake");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if l.check() == vec![0] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a core that never takes its work is never reported"
        );
        std::thread::sleep(bound / 3);
    }
    assert!(l.stalls() >= 1);

    // It turns: no longer stalled.
    core_turns(&l, &ep, &ev);
    assert!(l.check().is_empty());
}

#[test]
fn sigterm_closes_a_raw_tcp_tunnel_at_once_even_when_its_app_never_closes() {
    // An app that reads until end of stream, then keeps its side open, silent.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind app");
    let app = listener.local_addr().expect("addr");
    let (got_tx, got_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let got_tx = got_tx.clone();
            std::thread::spawn(move || {
                let mut s = stream;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read_uninterrupted(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let _ = got_tx.send(buf[..n].to_vec());
                }
                std::thread::sleep(Duration::from_secs(300));
                drop(s);
            });
        }
    });
    let mut w = Worker::start(WorkerOpts {
        upstreams: vec![app],
        circuit_extra: "protocol = \"tcp\"".into(),
        // Far longer than the hang guard of `terminate` (30 s).
        extra: "[timeouts]\ndrain_secs = 120\n".into(),
        ..Default::default()
    });
    let mut client = TcpStream::connect(w.addr()).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    client.write_all(b"hello").expect("send");
    let got = got_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the app got the bytes");
    assert_eq!(got, b"hello");
    let status = w.terminate();
    assert!(status.success(), "{status:?}");
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest);
    assert!(
        !w.log_text()
            .contains("drain timeout: closing connections still open"),
        "the tunnel was closed by drain, not by its timeout"
    );
}

#[test]
fn a_timeout_too_large_for_a_deadline_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    for key in [
        "[timeouts]\nkeepalive_secs",
        "[timeouts]\ndrain_secs",
        "[upstream]\nunhealthy_secs",
    ] {
        let path = dir.path().join("worker.toml");
        std::fs::write(
            &path,
            format!(
                "[worker]\ncores = 1\nbind_host = \"127.0.0.1\"\nport_range = [1024, 65535]\n{key} = 18446744073709551615\n"
            ),
        )
        .expect("write config");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_appproxy-worker"))
            .arg("--config")
            .arg(&path)
            .arg("--check-config")
            .output()
            .expect("run the worker");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key}: accepted");
        let name = key.rsplit('\n').next().unwrap_or(key);
        assert!(stderr.contains(name), "{key}: {stderr}");
    }
}
