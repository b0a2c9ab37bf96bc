//! The descriptor limit every component raises at start: each connection, file,
//! directory walk and store connection holds descriptors, and a soft limit of 1024
//! (systemd's default) runs out long before the hard limit that allows far more.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Raises the soft descriptor limit toward `want` and returns the soft limit in
/// force after (`None`: unlimited). With `past_hard` the hard limit is raised to
/// `want` too where the process may (privileged); otherwise, or when it may not,
/// the soft limit goes up to the hard one, at most `want`. A limit already at
/// `want` or above is left as it is.
pub fn raise(want: u64, past_hard: bool) -> Option<u64> {
    let files = getrlimit(Resource::Nofile);
    let current = files.current?;
    if current >= want {
        return Some(current);
    }
    if past_hard && files.maximum.is_some_and(|m| m < want) {
        let wide = Rlimit {
            current: Some(want),
            maximum: Some(want),
        };
        if setrlimit(Resource::Nofile, wide).is_ok() {
            tracing::debug!(from = current, to = want, "descriptor limit raised");
            return Some(want);
        }
    }
    let to = files.maximum.map_or(want, |m| m.min(want));
    if to <= current {
        return Some(current);
    }
    let raised = Rlimit {
        current: Some(to),
        maximum: files.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::debug!(from = current, to, "descriptor limit raised");
            Some(to)
        }
        Err(e) => {
            tracing::warn!(nofile = current, error = %e, "the descriptor limit could not be raised");
            Some(current)
        }
    }
}
