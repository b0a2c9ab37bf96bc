//! Python virtualenvs for tests that drive real Python apps and clients (Jupyter,
//! grpcio): made once per target directory under an exclusive file lock (the tests of
//! a binary run in parallel, and other test processes may share the directory), and
//! marked complete only once pip finished, so a half-made one is made again.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The virtualenv `<tmp>/<name>` with `packages` installed, made on first use.
/// `tmp` is the test crate's `CARGO_TARGET_TMPDIR`. Fails the test, saying what is
/// missing, without Python's venv module or without PyPI.
pub fn venv(tmp: &Path, name: &str, packages: &[&str]) -> PathBuf {
    static IN_PROCESS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _in_process = IN_PROCESS.lock().unwrap_or_else(|p| p.into_inner());
    let venv = tmp.join(name);
    let made = tmp.join(format!("{name}.complete"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(tmp.join(format!("{name}.lock")))
        .expect("the venv lock file");
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("lock the venv");
    if made.exists() {
        return venv;
    }
    let _ = std::fs::remove_dir_all(&venv);
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 -m venv failed: this test needs Python 3 with venv (apt-get install python3-venv)"
    );
    let ok = Command::new(venv.join("bin/pip"))
        // A registry hiccup is retried rather than failing the run.
        .args(["install", "-q", "--retries", "10", "--timeout", "60"])
        .args(packages)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "pip install {} failed (PyPI must be reachable)",
        packages.join(" ")
    );
    std::fs::write(&made, b"").expect("mark the venv made");
    venv
}
