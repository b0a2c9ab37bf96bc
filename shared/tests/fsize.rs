//! `fsize::catch_limit_signal` on this process (a test binary of its own: the limit
//! and the signal's action are the process's). Without the catch, the write past
//! the limit ends this process with `SIGXFSZ`, and the test fails.

use std::io::Write as _;

use appproxy_shared::fsize::{catch_limit_signal, limit_reached};
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

#[test]
fn a_write_past_the_file_size_limit_fails_and_the_process_lives() {
    catch_limit_signal().expect("catch SIGXFSZ");
    catch_limit_signal().expect("a second call does nothing");
    assert!(!limit_reached());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log");
    let mut file = std::fs::File::create(&path).expect("create");
    let before = getrlimit(Resource::Fsize);
    setrlimit(
        Resource::Fsize,
        Rlimit {
            current: Some(4096),
            maximum: before.maximum,
        },
    )
    .expect("lower the file-size limit");
    let written = file.write_all(&[b'x'; 8192]);
    let reached = limit_reached();
    setrlimit(Resource::Fsize, before).expect("restore the limit");
    let e = written.expect_err("a write past the limit fails");
    assert_eq!(
        e.raw_os_error(),
        Some(rustix::io::Errno::FBIG.raw_os_error()),
        "{e}"
    );
    assert!(reached, "the handler noted the limit");
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), 4096);
}
