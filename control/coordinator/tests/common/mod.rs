//! The coordinator binary as the coordinator's black-box tests start it: a config
//! written into the test's directory, output appended to a log there, the address
//! learned from its "coordinator serving" line, killed when dropped.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use appproxy_test_support::serving;

/// A running coordinator, killed when dropped.
pub struct Coordinator {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `config` to `dir/coordinator.toml` and starts the binary on it, its
/// output appended to `dir/coordinator.log`. `bind` should be port 0: the address is
/// read from the log (a port chosen beforehand could be taken by another process
/// before the coordinator binds it), from where this run's lines begin, so a
/// restart in the same directory does not read the last run's line.
pub fn start(dir: &Path, config: &str) -> Coordinator {
    start_with_env(dir, config, &[])
}

/// [`start`] with `env` set for the process (libfaketime's, say).
pub fn start_with_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> Coordinator {
    std::fs::write(dir.join("coordinator.toml"), config).expect("config");
    let log_path = dir.join("coordinator.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .expect("log");
    let from = serving::log_end(&log_path);
    let mut child = Command::new(env!("CARGO_BIN_EXE_appproxy-coordinator"))
        .arg("--config")
        .arg(dir.join("coordinator.toml"))
        .envs(env.iter().copied())
        .stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start coordinator");
    let addr = serving::addr(&mut child, &log_path, from, "coordinator serving", "addr");
    Coordinator { child, addr }
}

/// Whether a blocking Redis read failed only for now: its read timeout ran out, or
/// a signal interrupted it. A socket read under `SO_RCVTIMEO` is never restarted
/// after a signal, even with `SA_RESTART` (signal(7)), and a test that starts and
/// stops coordinators gets `SIGCHLD`s: a stand-in worker that took that for a lost
/// connection stopped listening and missed the events after it.
#[allow(dead_code)]
pub fn read_again(e: &redis::RedisError) -> bool {
    let interrupted = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::Interrupted);
    e.is_timeout() || interrupted
}
