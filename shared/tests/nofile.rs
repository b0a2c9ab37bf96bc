//! `nofile::raise` on this process's own limit (a test binary of its own: the
//! limit is the process's).

use appproxy_shared::nofile::raise;
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

fn set(current: u64, maximum: u64) -> bool {
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(current),
            maximum: Some(maximum),
        },
    )
    .is_ok()
}

/// Past the hard limit where the process may (privileged), up to it where it may
/// not; never lowered; the hard limit left alone without `past_hard`.
#[test]
fn the_soft_limit_goes_up_to_want_or_the_hard_limit() {
    let before = getrlimit(Resource::Nofile);
    let hard = before.maximum.unwrap_or(u64::MAX);
    assert!(
        hard >= 512,
        "a hard descriptor limit of {hard} is too low to run"
    );
    // Soft below hard, hard below what is wanted.
    let (low, cap) = (256, 512.min(hard));
    assert!(set(low, cap), "lower the limits");
    assert_eq!(raise(128, true), Some(low), "already above what is wanted");
    assert_eq!(getrlimit(Resource::Nofile).current, Some(low));
    assert_eq!(raise(4096, false), Some(cap), "up to the hard limit only");
    let after = getrlimit(Resource::Nofile);
    assert_eq!((after.current, after.maximum), (Some(cap), Some(cap)));
    assert!(set(low, cap), "lower the soft limit again");
    // Whether this process may raise its hard limit (root alone is not enough: it
    // takes CAP_SYS_RESOURCE), tried and undone.
    let privileged = set(low, cap + 1);
    assert!(set(low, cap), "lower the hard limit again");
    let got = raise(4096, true);
    let after = getrlimit(Resource::Nofile);
    if privileged {
        assert_eq!(got, Some(4096));
        assert_eq!((after.current, after.maximum), (Some(4096), Some(4096)));
    } else {
        assert_eq!(got, Some(cap));
        assert_eq!((after.current, after.maximum), (Some(cap), Some(cap)));
    }
    // Put back what the process had, where it may.
    let _ = setrlimit(Resource::Nofile, before);
}
