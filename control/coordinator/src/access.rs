//! Last-access marks and request counts of circuits, with the original's Redis keys:
//! `circuit.{id}.last_access` and `session.{id}.last_access` (epoch-float text,
//! `EX 172800`), `circuit.{id}.requests` (`INCRBY` then `EXPIRE 3600`).
//!
//! Workers write them (batched per core); the coordinator reads them for
//! `/api/circuit/{id}/statistics` and idle-circuit collection. Without Redis
//! (single node) the embedded worker hands its batches to [`Marks::Memory`].

use std::collections::HashMap;
use std::sync::Mutex;

use appproxy_shared::wire::{circuit_last_access_key, circuit_requests_key};
pub use appproxy_shared::wire::{AccessMark, LAST_ACCESS_TTL_SECS, REQUESTS_TTL_SECS};

pub use appproxy_shared::wire::add_marks;

/// Writes marks to Redis in one pipeline.
pub async fn write_redis(
    conn: &mut crate::redis_link::RedisConn,
    marks: &[AccessMark],
) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    add_marks(&mut pipe, marks);
    pipe.query_async::<()>(conn).await
}

/// Whether Redis takes writes: a short-lived key of this coordinator's set with
/// `SET … EX`, as workers write their marks. A Redis out of memory under
/// `noeviction` (or a read-only replica) still answers reads — the marks it holds
/// only grow stale — but refuses this.
pub async fn probe_write(
    conn: &mut crate::redis_link::RedisConn,
    node: uuid::Uuid,
) -> redis::RedisResult<()> {
    super::bounded(
        redis::cmd("SET")
            .arg(format!("appproxy.coordinator.{node}.write_probe"))
            .arg(appproxy_shared::jwt::now_epoch())
            .arg("EX")
            .arg(60)
            .query_async::<()>(conn),
    )
    .await
}

/// Where the coordinator reads marks.
pub enum Marks {
    /// The shared Redis.
    Redis(crate::redis_link::RedisConn),
    /// Single node: fed by the embedded worker.
    Memory(Mutex<HashMap<uuid::Uuid, (f64, u64)>>),
}

impl Marks {
    /// Records marks from an embedded worker (memory) or writes them (Redis); whether
    /// they were stored (a worker keeps those that were not, to write again).
    pub async fn record(&self, marks: &[AccessMark]) -> bool {
        match self {
            Self::Redis(conn) => {
                if let Err(e) = super::bounded(write_redis(&mut conn.clone(), marks)).await {
                    tracing::warn!(error = %e, "last-access marks not written");
                    return false;
                }
                true
            }
            Self::Memory(map) => {
                let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
                for m in marks {
                    let e = map.entry(m.circuit).or_insert((0.0, 0));
                    e.0 = e.0.max(m.last_access);
                    e.1 += m.requests;
                }
                true
            }
        }
    }

    /// A circuit's last access (Unix seconds) and request count, when known.
    pub async fn of(&self, circuit: uuid::Uuid) -> (Option<f64>, Option<u64>) {
        match self {
            Self::Redis(conn) => {
                let mut conn = conn.clone();
                let got: redis::RedisResult<(Option<String>, Option<u64>)> = super::bounded(
                    redis::pipe()
                        .cmd("GET")
                        .arg(circuit_last_access_key(circuit))
                        .cmd("GET")
                        .arg(circuit_requests_key(circuit))
                        .query_async(&mut conn),
                )
                .await;
                match got {
                    Ok((last, requests)) => (last.as_deref().and_then(read_mark), requests),
                    Err(e) => {
                        tracing::warn!(error = %e, "last-access marks not read");
                        (None, None)
                    }
                }
            }
            Self::Memory(map) => {
                let map = map.lock().unwrap_or_else(|p| p.into_inner());
                match map.get(&circuit) {
                    Some((last, n)) => (Some(*last), Some(*n)),
                    None => (None, None),
                }
            }
        }
    }

    /// The last access (Unix seconds) of each circuit, in order, in one call, a mark
    /// ahead of `now` (the caller's clock) counting as `now`; an error when the marks
    /// cannot be read — a caller deciding on idleness must not take "unreadable" for
    /// "never accessed".
    pub async fn last_access_of(
        &self,
        circuits: &[uuid::Uuid],
        now: f64,
    ) -> redis::RedisResult<Vec<Option<f64>>> {
        match self {
            Self::Redis(_) if circuits.is_empty() => Ok(Vec::new()),
            Self::Redis(conn) => {
                let mut conn = conn.clone();
                let keys: Vec<String> = circuits
                    .iter()
                    .map(|c| circuit_last_access_key(*c))
                    .collect();
                let got: Vec<Option<String>> =
                    super::bounded(redis::cmd("MGET").arg(keys).query_async(&mut conn)).await?;
                Ok(got
                    .into_iter()
                    .map(|v| v.as_deref().and_then(|t| read_mark_at(t, now)))
                    .collect())
            }
            Self::Memory(map) => {
                let map = map.lock().unwrap_or_else(|p| p.into_inner());
                Ok(circuits
                    .iter()
                    .map(|c| map.get(c).map(|(last, _)| last.min(now)))
                    .collect())
            }
        }
    }

    /// Whether new marks are being stored: with Redis, a probe write
    /// ([`probe_write`]); in memory, always.
    pub async fn writable(&self, node: uuid::Uuid) -> redis::RedisResult<()> {
        match self {
            Self::Redis(conn) => probe_write(&mut conn.clone(), node).await,
            Self::Memory(_) => Ok(()),
        }
    }

    /// Since when (epoch seconds, `now` on this coordinator's clock) the marks read
    /// are whole: with Redis, the time [`MARKS_KEPT_SINCE_KEY`] was last written —
    /// now, when it is missing (Redis lost its keys) or Redis evicted keys since the
    /// last call; a mark older than that may have been lost, so every circuit counts
    /// as used then. `None` in memory (see [`MarksGap::since`]). An error when Redis
    /// cannot tell: a caller deciding on idleness must not take it for "kept".
    pub async fn kept_since(&self, gap: &MarksGap, now: f64) -> redis::RedisResult<Option<f64>> {
        let Self::Redis(conn) = self else {
            return Ok(None);
        };
        let mut conn = conn.clone();
        // Eviction (`maxmemory` with an `allkeys-*` or `volatile-*` policy) takes
        // keys one by one, marks among them, and may leave this key. A Redis that
        // hides `INFO` still has the key checked.
        let evicted = match super::bounded(
            redis::cmd("INFO")
                .arg("stats")
                .query_async::<String>(&mut conn),
        )
        .await
        {
            Ok(info) => evicted_keys(&info).is_some_and(|n| gap.evicted(n)),
            Err(e) => {
                tracing::debug!(error = %e, "Redis INFO unreadable; evictions not checked");
                false
            }
        };
        let mut force = evicted;
        for _ in 0..2 {
            let (value, wrote): (String, i64) = super::bounded(
                redis::cmd("EVAL")
                    .arg(KEPT_SINCE_SCRIPT)
                    .arg(1)
                    .arg(MARKS_KEPT_SINCE_KEY)
                    .arg(format!("{now:.6}"))
                    .arg(if force { "1" } else { "0" })
                    .query_async(&mut conn),
            )
            .await?;
            // Anyone who can write the key can write anything: what is no time, or
            // a time far ahead, is written again.
            let ahead = value
                .trim()
                .parse::<f64>()
                .is_ok_and(|t| t > now + KEPT_SINCE_AHEAD_SECS);
            let Some(since) = read_mark_at(&value, now).filter(|_| !ahead) else {
                force = true;
                continue;
            };
            if wrote == 1 {
                tracing::warn!(
                    key = MARKS_KEPT_SINCE_KEY,
                    evicted,
                    "Redis may have lost last-access marks (its keys flushed, a restart \
                     without persistence, a failover to an empty replica, eviction — or \
                     this is its first use); every circuit counts as used now"
                );
            }
            return Ok(Some(since.max(0.0)));
        }
        Err(redis::RedisError::from((
            redis::ErrorKind::TypeError,
            "the marks' kept-since key holds no time after being written",
        )))
    }

    /// Forgets a removed circuit (memory only; Redis keys expire).
    pub fn forget(&self, circuit: uuid::Uuid) {
        if let Self::Memory(map) = self {
            map.lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&circuit);
        }
    }
}

/// The marks workers could not store while Redis refused writes are lost: a
/// circuit in constant use through such a gap has a mark as old as the gap. The
/// idle check takes every circuit as used when the gap ended ([`MarksGap::taken`]),
/// so none is collected before one whole timeout of marks could be written again.
/// Kept by the process that runs the check (a leader taking over meanwhile does
/// not know of a gap it did not see). Marks kept in memory (single node) are all
/// lost with the process: its start ends a gap ([`MarksGap::since`]). Marks Redis
/// lost are told by [`Marks::kept_since`].
#[derive(Debug, Default)]
pub struct MarksGap(Mutex<GapState>);

#[derive(Debug, Default)]
struct GapState {
    /// Redis refused the last probe write.
    open: bool,
    /// When the last gap ended (epoch seconds).
    end: Option<f64>,
    /// Redis' `evicted_keys` when last read.
    evicted: Option<u64>,
    /// The last idle pass's clock reading (epoch seconds, the store's clock) and
    /// the monotonic instant it was read at.
    last_pass: Option<(f64, std::time::Instant)>,
}

/// How far the clock the idle passes read may run ahead of the monotonic clock
/// between two passes before it is taken for a step (NTP, a VM resumed, the
/// database host's clock fixed), seconds: above the drift and the time a pass takes.
pub const CLOCK_STEP_SECS: f64 = 60.0;

impl MarksGap {
    /// A gap that ended at `start`: marks held in process memory are gone after a
    /// restart, so a circuit used until just before it has none.
    pub fn since(start: f64) -> Self {
        Self(Mutex::new(GapState {
            end: Some(start),
            ..GapState::default()
        }))
    }

    /// Redis refused the probe write: a gap is open.
    pub fn refused(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).open = true;
    }

    /// Redis took the probe write at `now` (epoch seconds): the end of the last
    /// gap, which is `now` when this write ends one; `None` when there was none.
    pub fn taken(&self, now: f64) -> Option<f64> {
        let mut gap = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if gap.open {
            gap.open = false;
            gap.end = Some(now);
        }
        gap.end
    }

    /// Notes a pass's clock reading `now` taken at the monotonic `at`. When the clock
    /// ran ahead of the monotonic one by more than [`CLOCK_STEP_SECS`] since the last
    /// pass, it stepped forward: every mark written before the step looks that much
    /// older, and circuits in use would be collected as idle; so a gap ends `now`
    /// (every circuit counts as used then), and the step's size is returned.
    pub fn clock_stepped(&self, now: f64, at: std::time::Instant) -> Option<f64> {
        let mut gap = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let step = gap
            .last_pass
            .map(|(then, mono)| (now - then) - at.saturating_duration_since(mono).as_secs_f64())
            .filter(|ahead| *ahead > CLOCK_STEP_SECS);
        gap.last_pass = Some((now, at));
        if step.is_some() {
            gap.end = Some(gap.end.map_or(now, |end| end.max(now)));
        }
        step
    }

    /// Redis' count of evicted keys now: whether it grew since the last count (the
    /// first count of a process, or one after a reset, tells nothing).
    fn evicted(&self, count: u64) -> bool {
        let mut gap = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let grew = gap.evicted.is_some_and(|before| count > before);
        gap.evicted = Some(count);
        grew
    }
}

/// The key that says since when Redis has kept the marks written to it: the time
/// (epoch seconds, this coordinator's clock) the coordinator leading idle
/// collection last found it missing, or found keys evicted, and wrote it — with
/// no TTL, so only a loss of keys removes it (`FLUSHALL`, a restart without
/// persistence, a failover to an empty replica, eviction).
pub const MARKS_KEPT_SINCE_KEY: &str = "appproxy.coordinator.marks_kept_since";

/// Returns the key's value, writing `ARGV[1]` first when it is missing or `ARGV[2]`
/// is `1`; and whether it wrote.
/// A key of another type (anyone who can write to Redis can make it one) is
/// replaced, never a lasting error.
const KEPT_SINCE_SCRIPT: &str = "local v = redis.pcall('GET', KEYS[1])
     if type(v) == 'table' and v.err then redis.call('DEL', KEYS[1]); v = false end
     if v and ARGV[2] ~= '1' then return {v, 0} end
     redis.call('SET', KEYS[1], ARGV[1])
     return {ARGV[1], 1}";

/// How far ahead of this coordinator's clock the kept-since time may be (another
/// coordinator's clock ahead of this one's) before it is taken for no time: a
/// time in the future would say "kept since now" at every pass, and idle
/// collection would never collect anything, with no warning.
const KEPT_SINCE_AHEAD_SECS: f64 = 300.0;

/// `evicted_keys` of an `INFO stats` answer.
fn evicted_keys(info: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix("evicted_keys:"))
        .and_then(|n| n.trim().parse().ok())
}

/// A last-access mark as read from Redis (epoch-float text, written by workers —
/// or by anyone else who can write the key): a finite, non-negative time, and a time
/// ahead of this coordinator's clock counts as now. `inf`, `1e300` or a clock far
/// ahead would otherwise keep a circuit from idle collection for ever, and the next
/// check scheduled from it is no time the store can hold (the pass failed to
/// reschedule every circuit it had looked at).
pub fn read_mark(text: &str) -> Option<f64> {
    read_mark_at(text, appproxy_shared::jwt::now_epoch())
}

/// [`read_mark`] against `now` on the caller's clock (the idle pass's: the store's).
pub fn read_mark_at(text: &str, now: f64) -> Option<f64> {
    let t: f64 = text.trim().parse().ok()?;
    (t.is_finite() && t >= 0.0).then(|| t.min(now))
}

/// Unix seconds of an RFC 3339 UTC time as the coordinator writes them
/// (`YYYY-MM-DDTHH:MM:SS[.frac]Z`); `None` for anything else.
pub fn parse_rfc3339(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let rest = s.get(19..)?.strip_suffix('Z')?;
    let frac = match rest.strip_prefix('.') {
        Some(f) if !f.is_empty() && f.bytes().all(|c| c.is_ascii_digit()) => {
            format!("0.{f}").parse::<f64>().ok()?
        }
        None if rest.is_empty() => 0.0,
        _ => return None,
    };
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from civil (H. Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60 + ss) as f64 + frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Evictions count from the second read of a process on, and only when the
    /// count grew (a reset or a new Redis tells nothing: its key is checked).
    #[test]
    fn evictions_are_told_by_a_growing_count() {
        let info = "# Stats\r\nexpired_keys:3\r\nevicted_keys:7\r\nkeyspace_hits:1\r\n";
        assert_eq!(evicted_keys(info), Some(7));
        assert_eq!(evicted_keys("# Stats\r\n"), None);
        let gap = MarksGap::default();
        assert!(!gap.evicted(7), "a first count tells nothing");
        assert!(!gap.evicted(7));
        assert!(gap.evicted(9));
        assert!(!gap.evicted(0), "a reset");
        assert!(gap.evicted(1));
    }

    /// A clock that runs ahead of the monotonic one between two passes by more than
    /// [`CLOCK_STEP_SECS`] stepped: a gap ends at the pass that saw it (marks written
    /// before the step would make circuits in use look idle); drift, a slow pass or
    /// a step back are no gap.
    #[test]
    fn a_forward_clock_step_ends_a_gap() {
        let gap = MarksGap::default();
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + std::time::Duration::from_secs(s);
        assert_eq!(gap.clock_stepped(1000.0, at(0)), None, "a first pass");
        assert_eq!(gap.clock_stepped(1010.0, at(10)), None);
        assert_eq!(gap.clock_stepped(1050.0, at(20)), None, "30 s ahead: drift");
        assert_eq!(gap.clock_stepped(900.0, at(30)), None, "a step back");
        assert_eq!(gap.taken(900.0), None);
        let step = gap.clock_stepped(8110.0, at(40)).expect("a step");
        assert!((step - 7200.0).abs() < 1.0, "{step}");
        assert_eq!(gap.taken(8120.0), Some(8110.0));
        assert_eq!(gap.clock_stepped(8130.0, at(60)), None);
    }

    /// Marks in memory: the start ends a gap; a refused write ends one later.
    #[test]
    fn a_gap_ends_at_the_start_or_when_writes_are_taken_again() {
        assert_eq!(MarksGap::default().taken(5.0), None);
        let gap = MarksGap::since(1.0);
        assert_eq!(gap.taken(5.0), Some(1.0));
        gap.refused();
        assert_eq!(gap.taken(7.0), Some(7.0));
        assert_eq!(gap.taken(9.0), Some(7.0));
    }

    #[test]
    fn rfc3339_round_trips_the_coordinators_format() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_755_650_000_123_456);
        let text = appproxy_shared::telemetry::Rfc3339(t).to_string();
        let back = parse_rfc3339(&text).expect("parses");
        assert!(
            (back - 1_755_650_000.123_456).abs() < 1e-5,
            "{text} → {back}"
        );
        assert_eq!(parse_rfc3339("2026-08-20T01:02:03Z"), Some(1_787_187_723.0));
        for bad in [
            "",
            "2026-08-20",
            "2026-13-20T01:02:03Z",
            "2026-08-20T01:02:03",
            "2026-08-20T01:02:03.Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
