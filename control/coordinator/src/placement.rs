//! Choosing a worker and a slot for a new circuit — pure functions over stored rows.
//!
//! Eligible workers are `ALIVE`, accept the circuit's traffic (`accepted_traffics`),
//! can carry its protocol (TCP needs a port of its own) and, when
//! `filtered_apps_only`, have an app filter matching the session or endpoint. Among
//! them: a matching filter first, then wildcard workers, then the most free ports.
//!
//! In two steps, so that a creation reads little: [`choose`] ranks the workers from
//! a count of free ports per port worker (no port read), then [`slot`] picks the
//! port or subdomain from the slots in use on the one worker chosen. [`place`] is
//! the two together over the slots of every worker.

use appproxy_shared::model::{AppMode, FrontendMode, ProxyProtocol};
use appproxy_shared::wire::WorkerRegistration;

use super::store::WorkerRow;

/// What the new circuit needs.
#[derive(Clone)]
pub struct Request<'a> {
    /// Interactive or inference.
    pub app_mode: AppMode,
    /// The circuit's protocol.
    pub protocol: ProxyProtocol,
    /// Properties filters compare against: `session.id`, `session.user_uuid`,
    /// `session.project_id`, `session.access_key`, `session.domain_name`,
    /// `endpoint.id`, `endpoint.runtime_variant`, `endpoint.existing_url`.
    pub properties: &'a [(String, String)],
    /// A port the caller would like (port workers).
    pub preferred_port: Option<u16>,
    /// A subdomain the caller would like (wildcard workers), already one DNS label.
    pub preferred_subdomain: Option<&'a str>,
    /// The subdomain to use when none is preferred.
    pub default_subdomain: &'a str,
    /// `None`: the lowest free port. `Some(n)`: the free port at `n` modulo their
    /// count — a creation that lost a race for a port spreads out on its retry
    /// instead of colliding with the other creations again.
    pub spread: Option<u64>,
    /// Only this worker (an endpoint keeping its `existing_url`).
    pub only_worker: Option<uuid::Uuid>,
}

/// Where a circuit goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// The worker.
    pub worker: uuid::Uuid,
    /// Its port (port workers).
    pub port: Option<u16>,
    /// Its subdomain (wildcard workers).
    pub subdomain: Option<String>,
}

/// Slots in use on one worker.
#[derive(Debug, Default, Clone)]
pub struct Used {
    /// Ports taken.
    pub ports: Vec<u16>,
    /// Subdomains taken.
    pub subdomains: Vec<String>,
    /// Free ports to offer only when no other port is free (the worker could not
    /// listen on them lately, [`crate::failed_ports`]); a preferred port is still
    /// taken if it is one of them.
    pub avoid: Vec<u16>,
}

fn filter_matches(worker: &WorkerRegistration, properties: &[(String, String)]) -> bool {
    worker.app_filters.iter().flatten().any(|f| {
        let value = super::store::filter_value(&f.value);
        properties
            .iter()
            .any(|(k, v)| f.key == *k && value.as_deref() == Some(v.as_str()))
    })
}

/// The port range of a port worker.
pub fn port_range(worker: &WorkerRegistration) -> Option<(u16, u16)> {
    worker.ports()
}

/// Why a worker, as registered now, cannot serve a circuit holding `port` or
/// `subdomain` on it (`None`: it can): a port worker listens only on its
/// `port_range`, a wildcard worker serves subdomains. A worker re-registered with a
/// narrower range (or the other frontend mode) leaves its circuits outside it
/// pointing at nothing: they are withdrawn, never reused or counted.
pub fn unserved(
    worker: &WorkerRegistration,
    port: Option<u16>,
    subdomain: Option<&str>,
) -> Option<String> {
    match worker.frontend_mode {
        FrontendMode::Port => match (port, port_range(worker)) {
            (Some(p), Some((lo, hi))) if (lo..=hi).contains(&p) => None,
            (Some(p), Some((lo, hi))) => {
                Some(format!("port {p} is outside its port range {lo}-{hi}"))
            }
            (Some(p), None) => Some(format!("port {p}, and it has no port range")),
            (None, _) => Some("a circuit without a port, on a port worker".into()),
        },
        FrontendMode::Wildcard => match subdomain {
            Some(_) => None,
            None => Some("a circuit without a subdomain, on a wildcard worker".into()),
        },
    }
}

/// Picks a worker and a slot, or `None` when no worker can take the circuit.
/// `used` gives the slots in use on a worker; `suffix` makes collision suffixes.
/// [`choose`] then [`slot`], with the free ports counted from `used`: what the
/// coordinator does with a count per worker from the store and the used ports of
/// the chosen worker alone.
pub fn place(
    workers: &[WorkerRow],
    used: impl Fn(&uuid::Uuid) -> Used,
    req: &Request<'_>,
    suffix: impl FnMut() -> String,
) -> Option<Placement> {
    let chosen = choose(
        workers,
        |w, lo, hi| free_ports(lo, hi, &used(&w.id).ports),
        req,
    )?;
    slot(chosen, &used(&chosen.id), req, suffix)
}

/// How many ports from `lo` to `hi` are not in `taken` (repeats and ports outside
/// the range in `taken` count for nothing).
pub fn free_ports(lo: u16, hi: u16, taken: &[u16]) -> u64 {
    let mut inside: Vec<u16> = taken
        .iter()
        .copied()
        .filter(|p| (lo..=hi).contains(p))
        .collect();
    inside.sort_unstable();
    inside.dedup();
    (u64::from(hi) - u64::from(lo) + 1).saturating_sub(inside.len() as u64)
}

/// Whether `w` may take the circuit whatever its room: alive, for the app's mode,
/// the one asked for (if any), its app filters passed (when it takes filtered apps
/// only), and, as a wildcard worker, with a domain and the circuit not TCP. `Some`
/// says whether its filters matched, the first of the ranking's keys.
fn eligible(w: &WorkerRow, req: &Request<'_>) -> Option<bool> {
    let body = &w.registration;
    if w.status != "ALIVE"
        || !body.accepted_traffics.contains(&req.app_mode)
        || req.only_worker.is_some_and(|only| only != w.id)
    {
        return None;
    }
    let matched = filter_matches(body, req.properties);
    if body.filtered_apps_only && !matched {
        return None;
    }
    if body.frontend_mode == FrontendMode::Wildcard
        && (req.protocol == ProxyProtocol::Tcp || body.wildcard_domain.is_none())
    {
        return None;
    }
    Some(matched)
}

/// The worker a circuit goes to, or `None` when no worker can take it: the
/// eligible worker ranking highest by (filter match, wildcard, free ports), the
/// first of equals in `workers`' order. `free(worker, lo, hi)` is how many ports
/// of a port worker's range `lo..=hi` are free (ports to avoid count as taken); a
/// port worker with none is not eligible. Needs no worker's used slots: only
/// [`slot`] does, for the worker chosen.
pub fn choose<'w>(
    workers: &'w [WorkerRow],
    free: impl Fn(&WorkerRow, u16, u16) -> u64,
    req: &Request<'_>,
) -> Option<&'w WorkerRow> {
    // (filter match, wildcard, free ports) — larger is better.
    let mut best: Option<((bool, bool, u64), &WorkerRow)> = None;
    for w in workers {
        let Some(matched) = eligible(w, req) else {
            continue;
        };
        let body = &w.registration;
        let rank = if body.frontend_mode == FrontendMode::Wildcard {
            (matched, true, u64::MAX)
        } else {
            let Some((lo, hi)) = port_range(body) else {
                continue;
            };
            let count = free(w, lo, hi);
            if count == 0 {
                continue;
            }
            (matched, false, count)
        };
        if best.as_ref().is_none_or(|(r, _)| rank > *r) {
            best = Some((rank, w));
        }
    }
    best.map(|(_, w)| w)
}

/// The slot on `worker` (as [`choose`] chose it): on a port worker, the preferred
/// port if it is in the range and free, else the first free port, or with `spread
/// = Some(n)` the free port at `n` modulo their count — first among the free ports
/// not in `taken.avoid`, and among those only when there is none other; on a
/// wildcard worker, the preferred or default subdomain, suffixed while it collides.
/// `taken` gives the worker's slots in use (ports to avoid among its ports).
/// `None`: no port is free (taken meanwhile), or the worker cannot take the circuit
/// at all.
pub fn slot(
    worker: &WorkerRow,
    taken: &Used,
    req: &Request<'_>,
    mut suffix: impl FnMut() -> String,
) -> Option<Placement> {
    let body = &worker.registration;
    if body.frontend_mode == FrontendMode::Wildcard {
        if req.protocol == ProxyProtocol::Tcp || body.wildcard_domain.is_none() {
            return None;
        }
        let base = req.preferred_subdomain.unwrap_or(req.default_subdomain);
        let mut subdomain = base.to_owned();
        while taken.subdomains.contains(&subdomain) {
            subdomain = with_suffix(base, &suffix());
        }
        return Some(Placement {
            worker: worker.id,
            port: None,
            subdomain: Some(subdomain),
        });
    }
    let (lo, hi) = port_range(body)?;
    let taken_ports: std::collections::HashSet<u16> = taken.ports.iter().copied().collect();
    let avoid: std::collections::HashSet<u16> = taken.avoid.iter().copied().collect();
    let pick = |shunned: &std::collections::HashSet<u16>| {
        let free = (lo..=hi).filter(|p| !taken_ports.contains(p) && !shunned.contains(p));
        let count = free.clone().count() as u64;
        match req.spread {
            Some(n) if count > 0 => free.clone().nth((n % count) as usize),
            _ => free.clone().next(),
        }
    };
    let port = req
        .preferred_port
        .filter(|p| (lo..=hi).contains(p) && !taken_ports.contains(p))
        .or_else(|| pick(&avoid))
        .or_else(|| {
            (!avoid.is_empty())
                .then(|| pick(&Default::default()))
                .flatten()
        })?;
    Some(Placement {
        worker: worker.id,
        port: Some(port),
        subdomain: None,
    })
}

/// `name` as one DNS label: lowercase, characters outside `[a-z0-9-]` become `-`,
/// no leading or trailing `-`, at most 63 characters; empty becomes `app`. A name
/// with letters beyond ASCII keeps them, punycoded (IDNA, UTS 46: `münchen` is
/// `xn--mnchen-3ya`), as the original's labels are; where that gives no label
/// (a character IDNA refuses, a label past 63 characters) they become `-` too.
/// Before, they always did: `münchen` was `m-nchen`, and names that differ only
/// in such letters (`日本語`, `中文模型`) made one label (an outside tester's find).
pub fn dns_label(name: &str) -> String {
    if !name.is_ascii() {
        let kept: String = name
            .chars()
            .map(|c| {
                if c.is_ascii() && !(c.is_ascii_alphanumeric() || c == '-') {
                    '-'
                } else {
                    c
                }
            })
            .collect();
        if let Ok(label) = idna::domain_to_ascii(kept.trim_matches('-')) {
            let one_label = label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if one_label
                && (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
            {
                return unreserved(label);
            }
        }
    }
    let mut out: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    out.truncate(63);
    let trimmed = out.trim_matches('-');
    if trimmed.is_empty() {
        "app".to_owned()
    } else {
        unreserved(trimmed.to_owned())
    }
}

/// `label`, unless it has hyphens in its third and fourth places: that form is
/// reserved for encodings (RFC 5891 §4.2.3.1, "R-LDH"), and only an `xn--` label
/// that is the punycode of a name (decoded and encoded again, the same) is kept;
/// any other has the two folded into one (`xn--zz` is `xn-zz`, `ab--c` is `ab-c`).
/// Before, a service name such as `xn--zz` became a subdomain no IDNA-aware client
/// takes and no certificate authority issues for.
fn unreserved(mut label: String) -> String {
    if label.get(2..4) != Some("--") {
        return label;
    }
    if label.starts_with("xn--") {
        let (unicode, decoded) = idna::domain_to_unicode(&label);
        if decoded.is_ok() && idna::domain_to_ascii(&unicode).is_ok_and(|a| a == label) {
            return label;
        }
    }
    while label.get(2..4) == Some("--") {
        label.remove(3);
    }
    label
}

/// `base-xxxxxxxx`, still one label of at most 63 characters. A punycoded base
/// (`xn--…`) is suffixed in its own letters and punycoded again: a suffix appended
/// to the encoding (or the encoding cut) is no encoding of anything.
pub fn with_suffix(base: &str, suffix: &str) -> String {
    if base.starts_with("xn--") {
        let (unicode, decoded) = idna::domain_to_unicode(base);
        if decoded.is_ok() {
            let mut letters: Vec<char> = unicode.chars().collect();
            // Letters dropped from the end until the label fits.
            while !letters.is_empty() {
                let name: String = letters.iter().collect();
                let label = dns_label(&format!("{name}-{suffix}"));
                if label.starts_with("xn--") {
                    return label;
                }
                letters.pop();
            }
        }
    }
    let keep = 63usize.saturating_sub(suffix.len() + 1);
    let head: String = base.chars().take(keep).collect();
    format!("{}-{suffix}", head.trim_end_matches('-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn worker(authority: &str, body: Value) -> WorkerRow {
        let mut b = body;
        b["authority"] = json!(authority);
        b["hostname"] = json!("127.0.0.1");
        WorkerRow::new(
            uuid::Uuid::new_v4(),
            b,
            "ALIVE".into(),
            1,
            String::new(),
            String::new(),
        )
        .expect("a registration that reads")
    }

    fn req<'a>(props: &'a [(String, String)]) -> Request<'a> {
        Request {
            app_mode: AppMode::Interactive,
            protocol: ProxyProtocol::Http,
            properties: props,
            preferred_port: None,
            preferred_subdomain: None,
            default_subdomain: "jupyter-5d6c",
            spread: None,
            only_worker: None,
        }
    }

    #[test]
    fn most_free_ports_wins_and_preferred_port_is_honoured() {
        let a = worker(
            "a",
            json!({"frontend_mode": "port", "port_range": [10, 11]}),
        );
        let b = worker(
            "b",
            json!({"frontend_mode": "port", "port_range": [20, 29]}),
        );
        let ws = [a, b.clone()];
        let p = place(&ws, |_| Used::default(), &req(&[]), || "x".into()).expect("placed");
        assert_eq!((p.worker, p.port), (b.id, Some(20)));
        let mut r = req(&[]);
        r.preferred_port = Some(25);
        let used = |w: &uuid::Uuid| Used {
            ports: if *w == b.id { vec![20, 21] } else { vec![] },
            ..Default::default()
        };
        assert_eq!(
            place(&ws, used, &r, || "x".into()).expect("placed").port,
            Some(25)
        );
    }

    /// Ports to avoid are offered last: the first (or `spread`th) free port among
    /// the others, one of them only when no other is free; a preferred port is
    /// taken all the same.
    #[test]
    fn ports_to_avoid_are_taken_only_when_no_other_is_free() {
        let w = worker(
            "w",
            json!({"frontend_mode": "port", "port_range": [20, 23]}),
        );
        let at = |ports: Vec<u16>, avoid: Vec<u16>, r: &Request<'_>| {
            let taken = Used {
                ports,
                avoid,
                ..Default::default()
            };
            slot(&w, &taken, r, || "x".into()).and_then(|p| p.port)
        };
        let r = req(&[]);
        assert_eq!(at(vec![], vec![20], &r), Some(21));
        assert_eq!(at(vec![21], vec![20, 22], &r), Some(23));
        assert_eq!(at(vec![21, 23], vec![20, 22], &r), Some(20), "the fallback");
        assert_eq!(at(vec![20, 21, 22, 23], vec![20], &r), None);
        let mut spread = req(&[]);
        spread.spread = Some(1);
        assert_eq!(at(vec![], vec![20], &spread), Some(22));
        let mut preferred = req(&[]);
        preferred.preferred_port = Some(20);
        assert_eq!(at(vec![], vec![20], &preferred), Some(20));
    }

    #[test]
    fn wildcard_first_with_collision_suffix_and_never_for_tcp() {
        let p = worker(
            "p",
            json!({"frontend_mode": "port", "port_range": [20, 29]}),
        );
        let w = worker(
            "w",
            json!({"frontend_mode": "wildcard", "wildcard_domain": ".apps.test"}),
        );
        let ws = [p.clone(), w.clone()];
        let used = |_: &uuid::Uuid| Used {
            subdomains: vec!["jupyter-5d6c".into()],
            ..Default::default()
        };
        let got = place(&ws, used, &req(&[]), || "0a1b2c3d".into()).expect("placed");
        assert_eq!(
            (got.worker, got.subdomain.as_deref()),
            (w.id, Some("jupyter-5d6c-0a1b2c3d"))
        );
        let mut tcp = req(&[]);
        tcp.protocol = ProxyProtocol::Tcp;
        assert_eq!(
            place(&ws, |_| Used::default(), &tcp, || "x".into())
                .expect("placed")
                .worker,
            p.id
        );
    }

    #[test]
    fn filters_restrict_and_prefer() {
        let only = worker(
            "only",
            json!({"frontend_mode": "port", "port_range": [1, 100], "filtered_apps_only": true,
            "app_filters": [{"key": "session.domain_name", "value": "research"}]}),
        );
        let pref = worker(
            "pref",
            json!({"frontend_mode": "port", "port_range": [200, 201],
            "app_filters": [{"key": "session.access_key", "value": "AK"}]}),
        );
        let plain = worker(
            "plain",
            json!({"frontend_mode": "port", "port_range": [300, 350]}),
        );
        let ws = [only.clone(), pref.clone(), plain.clone()];
        let none: Vec<(String, String)> = vec![];
        assert_eq!(
            place(&ws, |_| Used::default(), &req(&none), || "x".into())
                .expect("placed")
                .worker,
            plain.id
        );
        let ak = vec![("session.access_key".to_owned(), "AK".to_owned())];
        assert_eq!(
            place(&ws, |_| Used::default(), &req(&ak), || "x".into())
                .expect("placed")
                .worker,
            pref.id
        );
        let research = vec![("session.domain_name".to_owned(), "research".to_owned())];
        assert_eq!(
            place(&ws, |_| Used::default(), &req(&research), || "x".into())
                .expect("placed")
                .worker,
            only.id
        );
    }

    #[test]
    fn traffic_status_and_full_workers_are_skipped() {
        let mut lost = worker(
            "lost",
            json!({"frontend_mode": "port", "port_range": [1, 9]}),
        );
        lost.status = "LOST".into();
        let inference_only = worker(
            "inf",
            json!({"frontend_mode": "port", "port_range": [1, 9], "accepted_traffics": ["inference"]}),
        );
        let full = worker(
            "full",
            json!({"frontend_mode": "port", "port_range": [5, 5]}),
        );
        let ws = [lost, inference_only, full];
        assert_eq!(
            place(
                &ws,
                |_| Used {
                    ports: vec![5],
                    ..Default::default()
                },
                &req(&[]),
                || "x".into()
            ),
            None
        );
    }

    #[test]
    fn dns_labels() {
        assert_eq!(dns_label("Llama_Svc v2"), "llama-svc-v2");
        assert_eq!(dns_label("--"), "app");
        assert_eq!(dns_label(&"a".repeat(80)).len(), 63);
        // Letters beyond ASCII are punycoded, as the original's labels are.
        for (name, label) in [
            ("münchen", "xn--mnchen-3ya"),
            ("Ünicode-Svc", "xn--nicode-svc-8db"),
            ("日本語", "xn--wgv71a119e"),
            ("Llama Müller_v2", "xn--llama-mller-v2-msb"),
        ] {
            assert_eq!(dns_label(name), label, "{name}");
        }
        assert_ne!(dns_label("日本語"), dns_label("中文模型"));
        // Hyphens in the third and fourth places only for a genuine encoding.
        for (name, label) in [
            ("xn--mnchen-3ya", "xn--mnchen-3ya"),
            ("XN--MNCHEN-3YA", "xn--mnchen-3ya"),
            ("xn--zz", "xn-zz"),
            ("xn--", "xn"),
            ("ab--cd", "ab-cd"),
            ("ab---cd", "ab-cd"),
            ("ab_-cd", "ab-cd"),
            ("a--b", "a--b"),
            ("abc--d", "abc--d"),
            // A character UTS 46 ignores leaves the plain letters to judge.
            ("ab\u{ad}--cd", "ab-cd"),
        ] {
            assert_eq!(dns_label(name), label, "{name}");
        }
        // Suffixed in its letters, punycoded again, within 63 characters.
        assert_eq!(
            with_suffix("xn--mnchen-3ya", "1a2b3c4d"),
            dns_label("münchen-1a2b3c4d")
        );
        let long = dns_label(&"ü".repeat(20));
        assert!(long.starts_with("xn--"), "{long}");
        let suffixed = with_suffix(&long, "1a2b3c4d");
        assert!(
            suffixed.starts_with("xn--") && suffixed.len() <= 63,
            "{suffixed}"
        );
        assert!(
            idna::domain_to_unicode(&suffixed).0.ends_with("-1a2b3c4d"),
            "{suffixed}"
        );
        // Where IDNA gives no one label, they become `-` as before.
        assert_eq!(dns_label("a\u{3002}b"), "a-b", "an ideographic full stop");
        assert_eq!(dns_label(&"ü".repeat(60)), "app", "past 63 characters");
        assert_eq!(with_suffix(&"b".repeat(63), "12345678").len(), 63);
    }

    /// The rule by definition, as placement read it when it saw every worker's
    /// used slots: every eligible worker's slot worked out, the best-ranked kept.
    fn place_by_definition(
        workers: &[WorkerRow],
        used: impl Fn(&uuid::Uuid) -> Used,
        req: &Request<'_>,
        mut suffix: impl FnMut() -> String,
    ) -> Option<Placement> {
        let mut best: Option<((bool, bool, i64), Placement)> = None;
        for w in workers {
            // Which workers may take it is not what this reference checks: the
            // rule's own test (`eligible`) is shared.
            let Some(matched) = super::eligible(w, req) else {
                continue;
            };
            let body = &w.registration;
            let taken = used(&w.id);
            let (rank, placement) = if body.frontend_mode == FrontendMode::Wildcard {
                let base = req.preferred_subdomain.unwrap_or(req.default_subdomain);
                let mut subdomain = base.to_owned();
                while taken.subdomains.contains(&subdomain) {
                    subdomain = with_suffix(base, &suffix());
                }
                let p = Placement {
                    worker: w.id,
                    port: None,
                    subdomain: Some(subdomain),
                };
                ((matched, true, i64::MAX), p)
            } else {
                let Some((lo, hi)) = port_range(body) else {
                    continue;
                };
                let taken_ports: std::collections::HashSet<u16> =
                    taken.ports.iter().copied().collect();
                let free = (lo..=hi).filter(|p| !taken_ports.contains(p));
                let count = free.clone().count() as i64;
                let port = req
                    .preferred_port
                    .filter(|p| (lo..=hi).contains(p) && !taken_ports.contains(p))
                    .or_else(|| match req.spread {
                        Some(n) if count > 0 => free.clone().nth((n % count as u64) as usize),
                        _ => free.clone().next(),
                    });
                let Some(port) = port else { continue };
                let p = Placement {
                    worker: w.id,
                    port: Some(port),
                    subdomain: None,
                };
                ((matched, false, count), p)
            };
            if best.as_ref().is_none_or(|(r, _)| rank > *r) {
                best = Some((rank, placement));
            }
        }
        best.map(|(_, p)| p)
    }

    proptest::proptest! {
        /// Choosing by free-port counts, then reading the chosen worker's slots
        /// alone, places exactly where the rule by definition does — counts taken
        /// as the coordinator takes them (ports in use inside the range, plus ports
        /// to avoid there that are not in use), whatever the workers, their slots
        /// (some outside the range), filters, preferred port and spread.
        #[test]
        fn choosing_by_counts_places_as_the_rule_does(
            specs in proptest::collection::vec((0u16..40, 0u16..8, 0u8..4, 0u8..3), 1..6),
            used_ports in proptest::collection::vec((0usize..6, 0u16..50), 0..60),
            avoid in proptest::collection::vec((0usize..6, 0u16..50), 0..4),
            preferred in proptest::option::of(0u16..50),
            spread in proptest::option::of(proptest::num::u64::ANY),
            keyed in proptest::bool::ANY,
        ) {
            let workers: Vec<WorkerRow> = specs
                .iter()
                .enumerate()
                .map(|(i, (lo, width, kind, filter))| {
                    let mut body = match kind {
                        0 => json!({"frontend_mode": "wildcard", "wildcard_domain": ".apps.test"}),
                        _ => json!({"frontend_mode": "port", "port_range": [lo, lo + width]}),
                    };
                    match filter {
                        1 => body["app_filters"] = json!([{"key": "session.access_key", "value": "AK"}]),
                        2 => {
                            body["app_filters"] = json!([{"key": "session.access_key", "value": "AK"}]);
                            body["filtered_apps_only"] = json!(true);
                        }
                        _ => {}
                    }
                    let mut w = worker(&format!("w{i}"), body);
                    if *kind == 3 {
                        w.status = "LOST".into();
                    }
                    w
                })
                .collect();
            let index = |id: &uuid::Uuid| workers.iter().position(|w| w.id == *id).unwrap_or(usize::MAX);
            // What the store holds: distinct ports per worker (its unique index).
            let mut stored: Vec<(usize, u16)> = used_ports.clone();
            stored.sort_unstable();
            stored.dedup();
            let used = |id: &uuid::Uuid| {
                let i = index(id);
                let ports = stored
                    .iter()
                    .chain(avoid.iter())
                    .filter(|(w, _)| *w == i)
                    .map(|(_, p)| *p)
                    .collect();
                Used { ports, subdomains: vec!["jupyter-5d6c".to_owned(), "jupyter-5d6c-x".to_owned()], avoid: vec![] }
            };
            let props = if keyed { vec![("session.access_key".to_owned(), "AK".to_owned())] } else { vec![] };
            let mut r = req(&props);
            r.preferred_port = preferred;
            r.spread = spread;
            let expected = place_by_definition(&workers, used, &r, || "y".into());
            proptest::prop_assert_eq!(&place(&workers, used, &r, || "y".into()), &expected);
            // As the coordinator counts: in use inside the range, plus the ports to
            // avoid there not in use.
            let free = |w: &WorkerRow, lo: u16, hi: u16| {
                let i = index(&w.id);
                let in_use = stored.iter().filter(|(x, p)| *x == i && (lo..=hi).contains(p)).count() as u64;
                let mut extra: Vec<u16> = avoid
                    .iter()
                    .filter(|(x, p)| *x == i && (lo..=hi).contains(p) && !stored.contains(&(i, *p)))
                    .map(|(_, p)| *p)
                    .collect();
                extra.sort_unstable();
                extra.dedup();
                (u64::from(hi) - u64::from(lo) + 1).saturating_sub(in_use + extra.len() as u64)
            };
            let placed = choose(&workers, free, &r).and_then(|w| slot(w, &used(&w.id), &r, || "y".into()));
            proptest::prop_assert_eq!(placed, expected);
        }
    }

    proptest::proptest! {
        /// Whatever the workers and their slots: a placement is on an eligible worker,
        /// inside its range, on a free port or subdomain — never a double booking.
        #[test]
        fn placements_are_free_and_eligible(
            specs in proptest::collection::vec((0u16..40, 0u16..6, proptest::bool::ANY, proptest::bool::ANY), 1..5),
            taken in proptest::collection::vec((0usize..5, 0u16..50), 0..40),
            preferred in proptest::option::of(0u16..50),
            spread in proptest::option::of(proptest::num::u64::ANY),
        ) {
            let workers: Vec<WorkerRow> = specs
                .iter()
                .enumerate()
                .map(|(i, (lo, width, alive, wildcard))| {
                    let mut w = if *wildcard {
                        worker(&format!("w{i}"), json!({"frontend_mode": "wildcard", "wildcard_domain": ".apps.test"}))
                    } else {
                        worker(&format!("w{i}"), json!({"frontend_mode": "port", "port_range": [lo, lo + width]}))
                    };
                    if !alive {
                        w.status = "LOST".into();
                    }
                    w
                })
                .collect();
            let used = |id: &uuid::Uuid| {
                let i = workers.iter().position(|w| w.id == *id).unwrap_or(usize::MAX);
                let ports: Vec<u16> = taken.iter().filter(|(w, _)| *w == i).map(|(_, p)| *p).collect();
                Used { subdomains: ports.iter().map(|p| format!("jupyter-5d6c-{p}")).chain(["jupyter-5d6c".to_owned()]).collect(), ports, avoid: vec![] }
            };
            let mut r = req(&[]);
            r.preferred_port = preferred;
            r.spread = spread;
            let mut n = 0;
            let placed = place(&workers, used, &r, || { n += 1; format!("s{n}") });
            if let Some(p) = placed {
                let w = workers.iter().find(|w| w.id == p.worker).expect("a known worker");
                proptest::prop_assert_eq!(&w.status, "ALIVE");
                let u = used(&w.id);
                match (p.port, &p.subdomain) {
                    (Some(port), None) => {
                        let (lo, hi) = port_range(&w.registration).expect("a port worker");
                        proptest::prop_assert!((lo..=hi).contains(&port));
                        proptest::prop_assert!(!u.ports.contains(&port));
                    }
                    (None, Some(sub)) => proptest::prop_assert!(!u.subdomains.contains(sub)),
                    other => proptest::prop_assert!(false, "a port xor a subdomain: {other:?}"),
                }
            } else {
                // Nothing placed: no alive wildcard worker and no alive port worker with a free port.
                for w in workers.iter().filter(|w| w.status == "ALIVE") {
                    proptest::prop_assert!(w.registration.frontend_mode != FrontendMode::Wildcard);
                    let (lo, hi) = port_range(&w.registration).expect("a port worker");
                    let u = used(&w.id);
                    proptest::prop_assert!((lo..=hi).all(|p| u.ports.contains(&p)));
                }
            }
        }
    }
}
