//! Start-up checks that fail with one clear sentence saying what to raise or change:
//! locked-memory and descriptor limits (raised when the hard limit allows).

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Why the worker cannot start on this machine as configured.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// Not enough lockable memory for the executors.
    #[error(
        "RLIMIT_MEMLOCK is {have_kib} KiB but {cores} executors need {need_kib} KiB of locked memory: \
         raise it (ulimit -l {need_kib}, or LimitMEMLOCK=infinity in the systemd unit) \
         or lower [reactor] io_memory_kib"
    )]
    Memlock {
        /// The current soft limit.
        have_kib: u64,
        /// What is needed.
        need_kib: u64,
        /// Executors.
        cores: usize,
    },
}

/// What preflight found and did.
#[derive(Debug)]
pub struct Report {
    /// The descriptor limit in force after raising it.
    pub nofile: Option<u64>,
}

/// Raises soft limits towards the hard ones where needed and checks what must hold.
pub fn check(cores: usize, io_memory: usize) -> Result<Report, PreflightError> {
    // glommio registers io_memory plus its rings per executor; leave headroom.
    let need = (cores as u64) * (io_memory as u64 + 2 * 1024 * 1024);
    let lim = getrlimit(Resource::Memlock);
    let have = lim.current.unwrap_or(u64::MAX);
    if have < need {
        let raised = setrlimit(
            Resource::Memlock,
            Rlimit {
                current: Some(need),
                maximum: lim.maximum.map(|m| m.max(need)),
            },
        );
        if raised.is_err() {
            return Err(PreflightError::Memlock {
                have_kib: have / 1024,
                need_kib: need / 1024,
                cores,
            });
        }
    }
    // Two descriptors per proxied connection: raise the limit as far as allowed
    // (privileged: to 1M; otherwise the soft limit up to the hard one).
    let nofile = appproxy_shared::nofile::raise(1 << 20, true);
    if let Some(n) = nofile {
        if n < 4096 {
            tracing::warn!(nofile = n, "RLIMIT_NOFILE is low: each proxied connection uses two descriptors; raise it (LimitNOFILE=1048576)");
        }
    }
    Ok(Report { nofile })
}
