//! Start-up checks that fail with one clear sentence saying what to raise or change:
//! locked-memory and descriptor limits (raised when the hard limit allows); and a
//! warning for ports the worker listens on that the kernel may hand out to the
//! host's own connections.

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

/// A span of ports, first and last (inclusive).
type Ports = (u16, u16);

/// The ports of `ports` (inclusive) that lie in the kernel's range for the local
/// ports of outgoing connections (`ephemeral`, inclusive) and are not among its
/// `reserved` ones: how many, and the first and the last.
fn unreserved_ephemeral(
    ports: Ports,
    ephemeral: Ports,
    reserved: &[Ports],
) -> Option<(usize, u16, u16)> {
    let (lo, hi) = (ports.0.max(ephemeral.0), ports.1.min(ephemeral.1));
    let mut found: Option<(usize, u16, u16)> = None;
    for port in lo..=hi {
        if reserved.iter().any(|&(a, b)| (a..=b).contains(&port)) {
            continue;
        }
        found = Some(match found {
            None => (1, port, port),
            Some((n, first, _)) => (n + 1, first, port),
        });
    }
    found
}

/// `net.ipv4.ip_local_port_range` (two numbers) and `ip_local_reserved_ports` (a
/// comma-separated list of ports and ranges) as read from `/proc`.
fn parse_ephemeral(range: &str, reserved: &str) -> Option<(Ports, Vec<Ports>)> {
    let mut r = range.split_whitespace().map(|n| n.parse::<u16>().ok());
    let ephemeral = (r.next()??, r.next()??);
    let reserved = reserved
        .trim()
        .split(',')
        .filter(|p| !p.is_empty())
        .filter_map(|p| match p.split_once('-') {
            Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
            None => p.trim().parse().ok().map(|a| (a, a)),
        })
        .collect();
    Some((ephemeral, reserved))
}

/// Warns of each of `ports` (what it is, first and last, inclusive) that has
/// ports the kernel may give the host's outgoing connections as their local port
/// (`net.ipv4.ip_local_port_range`, less `ip_local_reserved_ports`). The worker's
/// own connections to apps take ports from that range, and a frontend port one of
/// them holds cannot listen: a circuit placed there fails to deploy, at random.
pub fn warn_of_ephemeral_ports(ports: &[(&str, u16, u16)]) {
    let read = |name: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"));
    let (Ok(range), reserved) = (read("ip_local_port_range"), read("ip_local_reserved_ports"))
    else {
        return;
    };
    let Some((ephemeral, reserved)) = parse_ephemeral(&range, &reserved.unwrap_or_default()) else {
        return;
    };
    for &(what, first, last) in ports {
        if let Some((count, from, to)) = unreserved_ephemeral((first, last), ephemeral, &reserved) {
            tracing::warn!(
                ports = %what,
                count,
                from,
                to,
                ephemeral = %format!("{}-{}", ephemeral.0, ephemeral.1),
                "ports the worker listens on lie in the kernel's range for outgoing connections' local ports: a port taken by one (the worker's own to apps included) cannot listen, and a circuit placed there fails to deploy; reserve them (sysctl net.ipv4.ip_local_reserved_ports={from}-{to}) or move them below the range"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_in_the_ephemeral_range_are_found_unless_reserved() {
        // The ports, the reserved ones, what is found.
        type Case = (Ports, &'static [Ports], Option<(usize, u16, u16)>);
        let cases: &[Case] = &[
            // The default range lies below the kernel's default one.
            ((10205, 10300), &[], None),
            ((40000, 40010), &[], Some((11, 40000, 40010))),
            // Straddling its start, and its end.
            ((32760, 32770), &[], Some((3, 32768, 32770))),
            ((60990, 61010), &[], Some((10, 60990, 60999))),
            // Reserved whole, and in part.
            ((40000, 40010), &[(39000, 41000)], None),
            (
                (40000, 40010),
                &[(40000, 40004), (40010, 40010)],
                Some((5, 40005, 40009)),
            ),
            // One port.
            ((50000, 50000), &[], Some((1, 50000, 50000))),
            ((0, 65535), &[(0, 65535)], None),
        ];
        for &(ports, reserved, want) in cases {
            assert_eq!(
                unreserved_ephemeral(ports, (32768, 60999), reserved),
                want,
                "{ports:?} {reserved:?}"
            );
        }
    }

    #[test]
    fn the_kernels_settings_are_read_as_written() {
        assert_eq!(
            parse_ephemeral("32768\t60999\n", "\n"),
            Some(((32768, 60999), vec![]))
        );
        assert_eq!(
            parse_ephemeral("1024 65535", "8080,40000-40100\n"),
            Some(((1024, 65535), vec![(8080, 8080), (40000, 40100)]))
        );
        assert_eq!(parse_ephemeral("nonsense", ""), None);
    }
}
