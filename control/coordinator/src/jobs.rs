//! Leader jobs: worker-lost detection, idle-circuit collection (with the pruning
//! of the change log and of expired setup tokens) and the sweep of creations left
//! unsettled past their bound; and, on every node, the renewal of the marks of
//! its own creations under way ([`renew_creations`]). Each pass runs
//! under a request ID of its own, so everything a pass does (status changes, removals,
//! the events it publishes) is found by one ID.
//!
//! With Redis, one coordinator of a cluster leads at a time: the key
//! `leader:appproxy:coordinator` holds the leader's lease for 30 s — its node ID,
//! the lease's length and a signature under the API secret ([`LeaseValue`]) — and
//! is renewed each pass by a leader that can reach the store. Without Redis the
//! coordinator is alone and leads.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use appproxy_shared::{IdVersion, RequestId};

use super::{access, State};

const LEADER_KEY: &str = "leader:appproxy:coordinator";

/// A Lua script run on the leader key, atomically; its arguments follow.
fn on_leader_key(script: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(1).arg(LEADER_KEY);
    cmd
}

/// The leadership lease, as configured (`[coordinator] leader_lease_secs`, at least
/// 2 s, at most a day).
fn lease(state: &State) -> Duration {
    Duration::from_secs(state.config.coordinator.leader_lease_secs.clamp(2, 86_400))
}

/// Warns at start when the lease lapses between the leader's passes: no longer
/// than the shortest period of the jobs that renew it.
pub(super) fn warn_if_lease_lapses(state: &State) {
    if state.redis.is_none() {
        return;
    }
    let c = &state.config.coordinator;
    // The health check's refresh renews it too (`health::run`).
    let refresh = state
        .config
        .health_check
        .refresh_every()
        .as_secs_f64()
        .ceil() as u64;
    let shortest = [
        c.check_worker_lost_interval_secs,
        c.check_unused_circuit_interval_secs,
        c.check_unsettled_creation_interval_secs,
        refresh,
    ]
    .into_iter()
    .map(|s| s.max(1))
    .min()
    .unwrap_or(1);
    if lease(state) <= Duration::from_secs(shortest) {
        tracing::warn!(
            leader_lease_secs = lease(state).as_secs(),
            shortest_job_interval_secs = shortest,
            "leader_lease_secs is no longer than the shortest job interval: the lease \
             lapses between passes, and leadership may pass from node to node"
        );
    }
}

/// Gives the lease up if this node holds it (a node that stops gracefully, or one
/// that cannot reach the store): the next node to run a pass leads at once, not
/// once the lease has run out. Bounded like every Redis call; a failure only
/// leaves the lease to run out.
pub(super) async fn step_down(state: &State) {
    let Some(conn) = &state.redis else {
        return;
    };
    // Ours: the value begins with this node's ID and a dot.
    const SCRIPT: &str = "local v = redis.pcall('GET', KEYS[1])
         if type(v) == 'string' and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
             return redis.call('DEL', KEYS[1]) end
         return 0";
    let mut conn = conn.clone();
    let mut cmd = on_leader_key(SCRIPT);
    cmd.arg(format!("{}.", state.node_id));
    let released = super::bounded(cmd.query_async::<i64>(&mut conn)).await;
    state.metrics.observed.leader.store(0, Ordering::Relaxed);
    match released {
        Ok(1) => tracing::info!(key = LEADER_KEY, "leadership given up"),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "leadership could not be given up; it runs out by itself")
        }
    }
}

/// A lease as the leader key holds it: `{node}.{lease}.{signature}` — the leading
/// node's ID, the lease it is held for (milliseconds), and HMAC-SHA256 of the two
/// under a key derived from the API secret. Every worker host may write to this
/// Redis (last-access marks), also with `[secrets] worker_key`, which takes the
/// manager's rights away from it: a value it wrote under the key (any text, for
/// days) was taken for a coordinator's lease, and no coordinator led — no
/// worker-lost check, no idle collection, no health checks — with nothing saying
/// why (an outside tester's find). A value no coordinator of this cluster signed, or
/// one that outlives the lease it was signed for (a lease copied back with a longer
/// expiry), is no lease: it is replaced, with a warning. No clock but Redis's
/// expiry is read, so coordinators whose clocks differ agree on what is a lease,
/// and a leader renews by moving the expiry alone (which a Redis refusing writes
/// for want of memory still takes). A writer that keeps writing can still disturb
/// the lease (rewrite it, delete it, copy a stopped leader's back every lease):
/// worker hosts should reach Redis as an ACL user limited to their keys.
struct LeaseValue;

/// The longest value of the leader key read back (a lease is some 120 bytes): a
/// longer one is no lease, replaced without being read, so a huge value costs no
/// pass its transfer.
const MAX_LEASE_LEN: usize = 192;

impl LeaseValue {
    /// The lease of `node` held for `lease`, signed with `secret`.
    fn make(secret: &str, node: uuid::Uuid, lease: Duration) -> String {
        let signed = format!("{node}.{}", lease.as_millis());
        let signature = Self::signature(secret, &signed);
        format!("{signed}.{signature}")
    }

    fn signature(secret: &str, signed: &str) -> String {
        // A key of its own for leases: a lease's signature is never another
        // credential's (a JWT's, a worker's).
        let key = appproxy_shared::secret::derived(secret, "appproxy coordinator leader lease");
        appproxy_shared::secret::derived(&key, signed)
    }

    /// Whether `value`, which expires in `pttl_ms` (Redis's `PTTL`: -1 none), is a
    /// lease signed with one of `secrets` (a rotation's previous one too) that does
    /// not outlive the lease it was signed for. An older coordinator's lease (its
    /// bare ID, during a rolling upgrade) counts while it expires within `own`, this
    /// node's lease: the older node leads on until it is upgraded.
    fn genuine<'a>(
        value: &[u8],
        pttl_ms: i64,
        secrets: impl Iterator<Item = &'a str>,
        own: Duration,
    ) -> bool {
        let Ok(value) = std::str::from_utf8(value) else {
            return false;
        };
        let expires = |within: u128| u128::try_from(pttl_ms).is_ok_and(|t| t <= within + 1_000);
        if value.parse::<uuid::Uuid>().is_ok() {
            return expires(own.as_millis());
        }
        let Some((signed, signature)) = value.rsplit_once('.') else {
            return false;
        };
        let Some((node, lease)) = signed.split_once('.') else {
            return false;
        };
        let (Ok(_), Ok(lease)) = (node.parse::<uuid::Uuid>(), lease.parse::<u128>()) else {
            return false;
        };
        if !expires(lease) {
            return false;
        }
        let mut genuine = false;
        for secret in secrets {
            // Each compared in constant time, and all of them.
            genuine |= appproxy_control_common::server::secret_matches(
                signature.as_bytes(),
                Self::signature(secret, signed).as_bytes(),
            );
        }
        genuine
    }
}

/// Takes or renews the lease; true when this node leads.
pub(super) async fn lead(state: &State) -> bool {
    let leads = lead_once(state).await;
    let led = state
        .metrics
        .observed
        .leader
        .swap(u64::from(leads), Ordering::Relaxed);
    // When this node began to lead (see `worker_lost_pass`).
    if let Ok(mut since) = state.leading_since.lock() {
        match (led, leads) {
            (0, true) => *since = Some(std::time::Instant::now()),
            (_, false) => *since = None,
            _ => {}
        }
    }
    leads
}

async fn lead_once(state: &State) -> bool {
    let Some(conn) = &state.redis else {
        return true;
    };
    if state.stopping.load(Ordering::SeqCst) {
        return false;
    }
    let lease = lease(state);
    // A node that cannot reach the store can do none of a leader's jobs: it does
    // not take the lease, and gives up one it holds, to a node that can, once the
    // store has failed it for half a lease (one slow call moves nothing). Before, a
    // leader cut off from the store (Redis still in reach) renewed its lease at
    // every pass, each failing: no worker-lost check, no idle collection, no health
    // checks in the whole cluster while other nodes stood by (an outside tester's
    // find). When no node reaches the store, none leads; nothing could be done.
    let asked = std::time::Instant::now();
    // Each change is logged once (a warning per pass of each job was some twenty
    // a minute while the store stayed away); the passes between, at debug.
    let may_take = match state.store.can_lead().await {
        Ok(()) => {
            let failing = state.store_failing.lock().map(|mut f| f.take());
            if let Ok(Some((since, _))) = failing {
                tracing::info!(
                    failing_secs = since.elapsed().as_secs(),
                    "the store is in reach and takes writes again: this node may lead"
                );
            }
            true
        }
        Err(e) => {
            let (first, half, tell) = {
                let mut failing = state
                    .store_failing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let first = failing.is_none();
                let (since, told) = failing.get_or_insert((asked, false));
                let half = since.elapsed() >= lease / 2;
                let tell = half && !std::mem::replace(told, half);
                (first, half, tell)
            };
            if half {
                if tell {
                    tracing::warn!(error = %e, "the store has been out of reach (or taking no writes) for half a lease: this node does not lead, and gives the lease up if it holds it");
                } else {
                    tracing::debug!(error = %e, "the store is still out of reach or takes no writes: this node does not lead");
                }
                step_down(state).await;
                return false;
            }
            if first {
                tracing::warn!(error = %e, "the store is out of reach or takes no writes: this node renews a lease it holds, and takes none");
            } else {
                tracing::debug!(error = %e, "the store is still out of reach or takes no writes");
            }
            false
        }
    };
    let ours = LeaseValue::make(&state.config.secrets.api_secret, state.node_id, lease);
    // One atomic script: renew if ours (the expiry moved), else take it if free (and
    // `ARGV[4]`), or if it holds `ARGV[3]` (a value found no lease) — otherwise
    // answer what it holds and when it expires. A key of another type (a hash another
    // client wrote on a shared Redis) is no lease: replaced (2: taken so), never a
    // lasting WRONGTYPE; nor is a value too long to be one (3), never read.
    const SCRIPT: &str = "local t = redis.call('TYPE', KEYS[1])['ok']
         local code = 1
         if t ~= 'none' and t ~= 'string' then redis.call('UNLINK', KEYS[1]); t = 'none'; code = 2 end
         if t == 'string' and redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[5]) then
             if ARGV[4] ~= '1' then return {0, '', -1} end
             redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return {3, '', 0} end
         local v = redis.call('GET', KEYS[1])
         if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return {1, '', 0} end
         if ARGV[4] ~= '1' then return {0, '', 0} end
         if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return {code, '', 0} end
         if ARGV[6] == '1' and v == ARGV[3] then
             redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return {3, '', 0} end
         return {4, v, redis.call('PTTL', KEYS[1])}";
    // `judged`: a value found no lease, to replace while the key still holds it (an
    // empty one too: an empty value is no lease either, and was never judged).
    let run = |judged: Option<&[u8]>| {
        let mut conn = conn.clone();
        let mut cmd = on_leader_key(SCRIPT);
        cmd.arg(&ours)
            .arg(lease.as_millis() as u64)
            .arg(judged.unwrap_or_default())
            .arg(if may_take { "1" } else { "0" })
            .arg(MAX_LEASE_LEN)
            .arg(if judged.is_some() { "1" } else { "0" });
        async move { super::bounded(cmd.query_async::<(i64, Vec<u8>, i64)>(&mut conn)).await }
    };
    let mut led = run(None).await;
    // 4: held by another; judged here (the signature is checked in this process).
    if let Ok((4, held, pttl)) = &led {
        if !LeaseValue::genuine(held, *pttl, state.config.secrets.api_secrets(), lease) {
            // Taken only while it still holds what was judged.
            led = run(Some(held)).await;
        }
    }
    match led {
        Ok((2, ..)) => {
            tracing::warn!(
                key = LEADER_KEY,
                "the leader key held a value of another type (written by another client of this Redis); replaced, and this node leads"
            );
            true
        }
        Ok((3, ..)) => {
            tracing::warn!(
                key = LEADER_KEY,
                "the leader key held no coordinator's lease (a value no coordinator of this cluster signed, or one kept past its lease: written by another client of this Redis); replaced, and this node leads"
            );
            true
        }
        Ok((v, ..)) => v == 1,
        Err(e) => {
            tracing::warn!(error = %e, "leadership check failed; skipping this pass");
            false
        }
    }
}

fn ticker(period_secs: u64) -> tokio::time::Interval {
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(period_secs.max(1)),
        Duration::from_secs(period_secs.max(1)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// How long this process may go without running before it counts as stalled
/// ([`Running`]).
const STALL: Duration = Duration::from_secs(5);

/// This coordinator's own running, read on two clocks: a stop (`SIGSTOP`, a
/// debugger, a starved runtime) shows on the monotonic clock, a host suspended or a
/// VM paused on the wall clock (the monotonic one may stand still meanwhile). While
/// it did not run, heartbeats could not reach it; they were not missed, and the
/// worker-lost check gives workers that much longer ([`Running::excused`]).
#[derive(Default)]
pub(crate) struct Running(std::sync::Mutex<Looks>);

/// What [`Running`] saw: one lock for all of it, since the stall watch and the
/// worker-lost check may look at the same moment (on two threads, both due as the
/// process resumes), and the one that looks second must see the first's look and
/// the stall it found.
#[derive(Default)]
struct Looks {
    /// The last look, on the monotonic and on the wall clock.
    last: Option<(std::time::Instant, std::time::SystemTime)>,
    /// The stalls found lately: when each ended (monotonic) and how long it was,
    /// the latest last; at most [`STALLS_KEPT`].
    stalls: std::collections::VecDeque<(std::time::Instant, Duration)>,
}

/// The most stalls [`Running`] keeps (a process stalling every few seconds for
/// hours keeps no more).
const STALLS_KEPT: usize = 64;

impl Running {
    /// Looks at the clocks: the length of the stall that ended now, when either
    /// moved more than [`STALL`] since the last look. Looked at each second
    /// ([`stall_watch`]) and before each worker-lost pass.
    fn look(&self) -> Option<Duration> {
        let now = (std::time::Instant::now(), std::time::SystemTime::now());
        let mut looks = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (mono, wall) = looks.last.replace(now)?;
        let gap = now
            .0
            .saturating_duration_since(mono)
            .max(now.1.duration_since(wall).unwrap_or_default());
        if gap <= STALL {
            return None;
        }
        if looks.stalls.len() == STALLS_KEPT {
            looks.stalls.pop_front();
        }
        looks.stalls.push_back((now.0, gap));
        Some(gap)
    }

    /// How much longer than `timeout` a worker's last heartbeat may be old now
    /// and the worker not be lost ([`excused`]).
    fn excused(&self, timeout: Duration) -> Duration {
        let looks = self.0.lock().unwrap_or_else(|p| p.into_inner());
        excused(&looks.stalls, std::time::Instant::now(), timeout)
    }
}

/// Of `stalls` (when each ended, how long it was; the latest last), the time this
/// process did not run within the reach of a heartbeat timeout from `now`, at most:
/// each stall that ended within `timeout` plus the stalls counted after it (a
/// stall that ended a timeout ago or more excuses nothing: a live worker has been
/// heard since). A worker whose last heartbeat is that much older than `timeout`
/// was not heard for `timeout` of this process's running. Only what was
/// stalled is excused: stalls of a few seconds again and again (a host that keeps
/// freezing) stretch the timeout by those seconds, where waiting a whole timeout
/// after each kept a dead worker alive for as long as they went on (an outside
/// verifier's find).
fn excused(
    stalls: &std::collections::VecDeque<(std::time::Instant, Duration)>,
    now: std::time::Instant,
    timeout: Duration,
) -> Duration {
    let mut excused = Duration::ZERO;
    for &(ended, gap) in stalls.iter().rev() {
        if now.saturating_duration_since(ended) >= timeout + excused {
            break;
        }
        excused += gap;
    }
    excused
}

/// Logs a stall [`Running::look`] found.
fn note_stall(stalled: Option<Duration>, timeout_secs: u64) {
    if let Some(gap) = stalled {
        tracing::warn!(
            stalled_secs = gap.as_secs(),
            heartbeat_timeout_secs = timeout_secs,
            "this coordinator did not run for a while (stopped, its host suspended, or its runtime starved); its worker-lost check gives workers as much longer"
        );
    }
}

/// Looks at this process's own running each second ([`Running`]).
pub(super) async fn stall_watch(state: Arc<State>) {
    let timeout = state.config.coordinator.worker_heartbeat_timeout_secs;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        note_stall(state.running.look(), timeout);
    }
}

/// Marks workers whose heartbeat is older than the timeout as `LOST`.
pub(super) async fn worker_lost(state: Arc<State>) {
    let mut tick = ticker(state.config.coordinator.check_worker_lost_interval_secs);
    loop {
        tick.tick().await;
        let id = RequestId::generate(IdVersion::V4);
        appproxy_shared::scope(Some(id), worker_lost_pass(&state)).await;
    }
}

async fn worker_lost_pass(state: &State) {
    if !lead(state).await {
        return;
    }
    // Heartbeats the store refused (out of reach, at its deadline) were sent, not
    // missed: after an outage longer than the timeout every worker would look lost
    // — its circuits withdrawn on reuse, the manager told, placement refused — while
    // all of them ran. The check waits until heartbeats (and this check) have been
    // stored for a whole timeout, so every worker has had its turn again.
    let timeout = state.config.coordinator.worker_heartbeat_timeout_secs;
    // Likewise the time this process did not run: the only coordinator stopped for
    // longer than the timeout marked every live worker lost as it resumed (an
    // outside tester's find). Heartbeats are judged as if that time had not
    // passed.
    note_stall(state.running.look(), timeout);
    let excused = state.running.excused(Duration::from_secs(timeout));
    if !excused.is_zero() {
        tracing::info!(
            excused_secs = excused.as_secs(),
            heartbeat_timeout_secs = timeout,
            "this coordinator did not run for part of the heartbeat timeout; the worker-lost check gives workers that much longer"
        );
    }
    // A node that began to lead within the timeout has not seen the heartbeats of a
    // whole timeout: the store may have been out of reach for the node that led
    // before (which then stepped down, its note of the outage with it), and every
    // live worker would look lost to the new one (an outside verifier's find: after
    // a PostgreSQL outage longer than the timeout, the node that took the lease as
    // the store came back marked every worker lost). It waits the timeout first.
    let leading = state
        .leading_since
        .lock()
        .ok()
        .and_then(|since| *since)
        .map(|since| since.elapsed());
    if leading.is_some_and(|l| l < Duration::from_secs(timeout)) {
        tracing::debug!(
            heartbeat_timeout_secs = timeout,
            "this node began to lead within the heartbeat timeout; worker-lost check waits"
        );
        return;
    }
    let judged = timeout.saturating_add(excused.as_secs() + u64::from(excused.subsec_nanos() > 0));
    if let Some(ago) = crate::store::heartbeats_unstored_ago() {
        if ago < Duration::from_secs(timeout) {
            tracing::info!(
                store_unreachable_secs_ago = ago.as_secs(),
                heartbeat_timeout_secs = timeout,
                "heartbeats could not be stored within the heartbeat timeout; worker-lost check waits"
            );
            return;
        }
    }
    match state.store.mark_lost(judged).await {
        Ok(lost) => {
            for (id, authority) in &lost {
                state.metrics.workers_lost.fetch_add(1, Ordering::Relaxed);
                state.failed_ports.forget(*id);
                tracing::warn!(worker = %id, %authority, reason = "heartbeat timeout", "worker lost");
                if let Some(conn) = &state.streams {
                    // The original's anycast form, for a manager or coordinator that listens.
                    let event = super::anycast::worker_lost(authority, "heartbeat timeout");
                    let envelope = state.config.health_check.event_envelope;
                    super::anycast::xadd(conn, super::anycast::APPPROXY_STREAM, &event, envelope)
                        .await;
                }
            }
        }
        Err(e) => {
            crate::store::note_heartbeat_failure(&e);
            tracing::warn!(error = %e, "worker-lost check failed")
        }
    }
}

/// Removes interactive HTTP circuits not accessed for the collection timeout.
pub(super) async fn idle_circuits(state: Arc<State>) {
    let mut tick = ticker(state.config.coordinator.check_unused_circuit_interval_secs);
    loop {
        tick.tick().await;
        let id = RequestId::generate(IdVersion::V4);
        appproxy_shared::scope(Some(id), idle_pass(&state)).await;
    }
}

async fn idle_pass(state: &State) {
    if !lead(state).await {
        return;
    }
    match state.store.prune_changes().await {
        Ok(0) => {}
        Ok(n) => tracing::debug!(entries = n, "old change-log entries pruned"),
        Err(e) => tracing::warn!(error = %e, "change log not pruned"),
    }
    let token_ttl = state.config.coordinator.token_ttl_secs;
    if token_ttl > 0 {
        match state.store.prune_tokens(token_ttl).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                tokens = n,
                ttl_secs = token_ttl,
                "expired setup tokens deleted"
            ),
            Err(e) => tracing::warn!(error = %e, "expired setup tokens not deleted"),
        }
    }
    // Workers' marks land in the same Redis: while it refuses writes (out of memory
    // under `noeviction`) the marks read are stale, and circuits in constant use
    // would be collected as idle. No pass until it takes writes again.
    if let Err(e) = state.marks.writable(state.node_id).await {
        state.marks_gap.refused();
        state
            .metrics
            .idle_passes_skipped
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            error = %e,
            "Redis refuses writes, so last-access marks are not being stored; \
             idle-circuit collection skipped"
        );
        return;
    }
    // Marks lost in a gap (see `MarksGap`): every circuit counts as used when it
    // ended.
    // One clock for every time compared: the store's (PostgreSQL's, which workers
    // and every coordinator share through NTP), not this leader's own — a leader
    // whose clock runs ahead would take circuits in use for idle.
    let ahead = match state.store.clock_ahead().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "the store's clock unreadable; idle-circuit check skipped");
            return;
        }
    };
    let clock = || appproxy_shared::jwt::now_epoch() + ahead;
    let noticed = clock();
    if let Some(step) = state
        .marks_gap
        .clock_stepped(noticed, std::time::Instant::now())
    {
        tracing::warn!(
            step_secs = step as u64,
            "the clock stepped forward since the last idle pass: every circuit counts as used now"
        );
    }
    let mut gap_end = state.marks_gap.taken(noticed);
    // Marks Redis lost (see `Marks::kept_since`): every circuit counts as used
    // when the loss was noticed.
    match state.marks.kept_since(&state.marks_gap, noticed).await {
        Ok(since) => gap_end = gap_end.into_iter().chain(since).reduce(f64::max),
        Err(e) => {
            state
                .metrics
                .idle_passes_skipped
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                error = %e,
                "whether Redis kept the last-access marks is unknown; idle-circuit collection skipped"
            );
            return;
        }
    }
    let timeout = state
        .config
        .coordinator
        .unused_circuit_collection_timeout_secs as f64;
    let retry_in = state.config.coordinator.check_unused_circuit_interval_secs as f64;
    // Only the circuits whose check is due are read: each is looked at once after
    // its creation and then once per timeout while it stays in use.
    for _ in 0..IDLE_BATCHES_PER_PASS {
        let due = match state.store.idle_due(IDLE_BATCH).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "idle-circuit check failed");
                return;
            }
        };
        let full = due.len() == IDLE_BATCH;
        let ids: Vec<uuid::Uuid> = due.iter().map(|c| c.id).collect();
        // One read for every candidate; unreadable marks skip the pass rather than
        // make every circuit look idle.
        let now = clock();
        let marks = match state.marks.last_access_of(&ids, now).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "last-access marks unreadable; idle-circuit check skipped");
                return;
            }
        };
        let read_at = tokio::time::Instant::now();
        let read_at_wall = std::time::SystemTime::now();
        let mut next_checks = Vec::with_capacity(due.len());
        for (c, mark) in due.into_iter().zip(marks) {
            let created = c
                .created_at
                .as_deref()
                .and_then(access::parse_rfc3339)
                .unwrap_or(now);
            let last_of = |mark: Option<f64>| {
                mark.unwrap_or(created)
                    .max(created)
                    .max(gap_end.unwrap_or(0.0))
            };
            let (mut now, mut last) = (now, last_of(mark));
            let mut decided_at = read_at_wall;
            if now - last > timeout && read_at.elapsed() > FRESH_DECISION {
                // The marks were read a while ago: removals before this one were
                // slow (a store at its deadline), or this process was paused. The
                // circuit may have been used since, and another coordinator may
                // lead by now: both are asked again before it is removed.
                if !lead(state).await {
                    // The next leader checks what is left (still due).
                    tracing::info!("no longer leading: the idle pass stops");
                    return;
                }
                now = clock();
                decided_at = std::time::SystemTime::now();
                match state.marks.last_access_of(&[c.id], now).await {
                    Ok(fresh) => last = last_of(fresh.into_iter().next().flatten()),
                    Err(e) => {
                        tracing::warn!(circuit = %c.id, error = %e, "last-access mark unreadable; not collected");
                        next_checks.push((c.id, now + retry_in));
                        continue;
                    }
                }
            }
            if now - last <= timeout {
                // In use: idle at the earliest one timeout after its last access.
                next_checks.push((c.id, last + timeout + 1.0));
                continue;
            }
            tracing::info!(circuit = %c.id, idle_secs = (now - last) as u64, "idle circuit collected");
            // Made within a moment of the mark it was decided on, or not at all
            // (a removal that waits on the circuit's row, meanwhile used, is not
            // made once the wait ends; it is looked at again next pass).
            let removal = state.remove_circuit_by(c.id, Some(decided_at + FRESH_DECISION * 2));
            match removal.await {
                Ok(true) => {
                    state
                        .metrics
                        .circuits_collected
                        .fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(circuit = %c.id, error = %e, "idle circuit not removed");
                    next_checks.push((c.id, now + retry_in));
                }
            }
        }
        if let Err(e) = state.store.defer_idle_checks(&next_checks).await {
            tracing::warn!(error = %e, "next idle checks not scheduled");
            return;
        }
        if !full {
            return;
        }
    }
}

/// How long marks read for an idle check decide a removal: past this, a circuit
/// found idle has its mark read again (and the lease checked) before it is removed,
/// and the removal is made within twice this of the read, or not at all.
const FRESH_DECISION: Duration = Duration::from_secs(1);

/// Circuits one idle-check read takes.
const IDLE_BATCH: usize = 2_000;
/// Reads one idle pass makes at most (a backlog is worked off over several passes).
const IDLE_BATCHES_PER_PASS: usize = 5;

/// Withdraws the circuits whose creation is still marked under way past its bound
/// ([`crate::store::CreationMark::Overdue`]): a creation that failed and whose
/// withdrawal was not made before its coordinator stopped (a deploy, a crash while
/// the store was out of reach), or a coordinator that died mid-creation. Nobody was
/// answered with such a circuit, and left stored it would be deployed for ever
/// (endpoint circuits are never collected as idle). The in-process withdrawal
/// ([`crate::proxy`]'s background one) stays the fast path; this is its durable
/// backstop.
pub(super) async fn overdue_creations(state: Arc<State>) {
    let (bound, renewal) = (state.creation_bound(), state.creation_renewal());
    if bound < renewal + crate::store::CALL_DEADLINE {
        tracing::warn!(
            unsettled_creation_timeout_secs = bound.as_secs_f64(),
            renewal_interval_secs = renewal.as_secs_f64(),
            store_call_deadline_secs = crate::store::CALL_DEADLINE.as_secs_f64(),
            "unsettled_creation_timeout_secs is shorter than a renewal of its marks may take: \
             a creation under way may be withdrawn by another leader after one slow store call, \
             and answered 409"
        );
    }
    let mut tick = ticker(
        state
            .config
            .coordinator
            .check_unsettled_creation_interval_secs,
    );
    loop {
        tick.tick().await;
        let id = RequestId::generate(IdVersion::V4);
        appproxy_shared::scope(Some(id), overdue_pass(&state)).await;
    }
}

async fn overdue_pass(state: &State) {
    if !lead(state).await {
        return;
    }
    let due = match state.store.overdue_creations(OVERDUE_BATCH).await {
        Ok(due) => due,
        Err(e) => {
            tracing::warn!(error = %e, "creations left unsettled not looked for");
            return;
        }
    };
    // One circuit's failure (its row locked past the statement timeout) does not
    // end the pass: the others are withdrawn all the same. A store out of reach
    // fails every one: the pass ends after a few.
    let mut failures = 0;
    for id in due {
        // This node's own creation: it settles it or withdraws it itself (its
        // mark, renewed, passed only because the store was out of reach a while;
        // a withdrawal that the store failed is being tried again).
        if state.is_creating(id) {
            continue;
        }
        // Under the ID of the request that created the circuit (see
        // `State::remove_overdue_creation_as_origin`); the pass names it under its
        // own.
        let pass = appproxy_shared::current_request_id();
        let (withdrawn, origin) = state
            .remove_overdue_creation_as_origin(id, || {
                tracing::warn!(
                    circuit = %id,
                    sweep_request_id = pass.as_ref().map(|p| p.as_str()).unwrap_or(""),
                    "circuit of a creation never settled withdrawn (its coordinator stopped before withdrawing it)"
                );
            })
            .await;
        match withdrawn {
            Ok(true) => {
                state
                    .metrics
                    .overdue_creations_withdrawn
                    .fetch_add(1, Ordering::Relaxed);
                if origin.is_some() {
                    tracing::info!(
                        circuit = %id,
                        origin_request_id = origin.as_ref().map(|o| o.as_str()).unwrap_or(""),
                        "withdrawal of a creation never settled logged under its creating request's ID"
                    );
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(
                    circuit = %id, error = %e,
                    "circuit of a creation never settled not withdrawn; tried again next pass"
                );
                failures += 1;
                if failures >= OVERDUE_FAILURES_PER_PASS {
                    return;
                }
            }
        }
    }
}

/// Circuits one sweep of unsettled creations withdraws at most (a backlog is
/// worked off over several passes).
const OVERDUE_BATCH: usize = 500;

/// Failed withdrawals after which a sweep pass ends (the store is likely out of
/// reach; the next pass tries again).
const OVERDUE_FAILURES_PER_PASS: usize = 3;

/// Keeps the marks of this node's creations under way fresh in the store, on
/// every node (leading or not): every [`State::creation_renewal`], one bounded
/// write per [`RENEW_CHUNK`] circuits sets each still-marked one's mark
/// `unsettled_creation_timeout_secs` ahead on the database's clock. A creation
/// may then take as long as it takes (a bulk endpoint creation of many slowly
/// acknowledged items, a withdrawal the store keeps failing): its mark passes,
/// and the sweep withdraws its circuit, only once its node stops renewing it —
/// stopped, or cut off from the store for about the bound, in which case the
/// node's own settle then finds the circuit gone (409) or the store out of reach
/// (503), never a 200 with a removed circuit.
pub(super) async fn renew_creations(state: Arc<State>) {
    let period = state.creation_renewal();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ids: Vec<uuid::Uuid> = state.creating().iter().copied().collect();
        // One write's failure does not end the pass: the later writes renew their
        // marks all the same. Ending it there, as before, left every creation
        // past the first thousand unrenewed for as long as one write kept failing,
        // and their marks passed (the sweep withdrew circuits still being made).
        // A store out of reach fails every write, each after a call's deadline:
        // the pass ends after a few, so that it still ends well within the marks'
        // bound and the next pass comes on time.
        let mut failures = 0;
        for chunk in ids.chunks(RENEW_CHUNK) {
            if let Err(e) = state
                .store
                .renew_creations(chunk, state.creation_bound())
                .await
            {
                failures += 1;
                let ending = failures >= RENEW_FAILURES_PER_PASS;
                tracing::warn!(
                    error = %e, circuits = chunk.len(), under_way = ids.len(), pass_ended = ending,
                    "marks of creations under way not renewed (the store failed the write); tried again next pass"
                );
                if ending {
                    break;
                }
            }
        }
    }
}

/// Circuits one renewal write covers at most.
const RENEW_CHUNK: usize = 1_000;

/// Failed renewal writes after which a pass ends (the store is likely out of
/// reach; the next pass tries again). Two: a pass against a store out of reach
/// takes at most two calls' deadlines (10 s), half the marks' default bound.
const RENEW_FAILURES_PER_PASS: usize = 2;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::time::Instant;

    /// The stalls of `(seconds ago they ended, seconds long)`, the latest last.
    fn stalls(now: Instant, list: &[(u64, u64)]) -> VecDeque<(Instant, Duration)> {
        list.iter()
            .map(|&(ago, secs)| (now - Duration::from_secs(ago), Duration::from_secs(secs)))
            .collect()
    }

    /// A stall excuses its length for a heartbeat timeout after it ended (a live
    /// worker has been heard again by then), then nothing.
    #[test]
    fn a_stall_excuses_its_length_while_it_is_within_reach() {
        let now = Instant::now() + Duration::from_secs(1_000);
        let timeout = Duration::from_secs(30);
        for (ago, excused_secs) in [(0, 40), (29, 40), (30, 0), (500, 0)] {
            assert_eq!(
                excused(&stalls(now, &[(ago, 40)]), now, timeout),
                Duration::from_secs(excused_secs),
                "a 40 s stall that ended {ago} s ago"
            );
        }
        assert_eq!(excused(&VecDeque::new(), now, timeout), Duration::ZERO);
    }

    /// Short stalls again and again stretch the timeout by what was stalled within
    /// its reach, not for as long as they go on: 6 s every 20 s excuse 12-18 s, so
    /// a dead worker is still found (before, each stall held the check a whole
    /// timeout, and a dead worker was never found while they went on).
    #[test]
    fn repeated_short_stalls_excuse_only_what_was_stalled() {
        let now = Instant::now() + Duration::from_secs(10_000);
        let timeout = Duration::from_secs(30);
        let every_20s: Vec<(u64, u64)> = (0..200).rev().map(|i| (i * 20 + 5, 6)).collect();
        let e = excused(&stalls(now, &every_20s), now, timeout);
        assert!(
            e >= Duration::from_secs(12) && e <= Duration::from_secs(18),
            "{e:?}"
        );
    }

    /// A look finds a stall on either clock, and none when the process ran.
    #[test]
    fn a_look_finds_a_gap_longer_than_the_stall_bound() {
        let running = Running::default();
        assert_eq!(running.look(), None, "a first look has nothing to compare");
        assert_eq!(running.look(), None);
        let earlier = (
            Instant::now() - Duration::from_secs(7),
            std::time::SystemTime::now(),
        );
        running.0.lock().expect("lock").last = Some(earlier);
        let gap = running.look().expect("a stall on the monotonic clock");
        assert!(gap >= Duration::from_secs(7), "{gap:?}");
        let earlier = (
            Instant::now(),
            std::time::SystemTime::now() - Duration::from_secs(9),
        );
        running.0.lock().expect("lock").last = Some(earlier);
        let gap = running.look().expect("a stall on the wall clock");
        assert!(gap >= Duration::from_secs(9), "{gap:?}");
        assert!(running.excused(Duration::from_secs(30)) >= Duration::from_secs(16));
    }
}
