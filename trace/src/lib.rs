//! `appproxy-trace`: reads the JSON log lines of any number of appproxy components and
//! reconstructs one request's or one trace's timeline hop by hop.
//!
//! - [`parse_line`] turns one line (a bare JSON object, or `journalctl -o cat` output
//!   with anything before the `{`) into an [`Entry`];
//! - [`select`] picks the entries of one request ID or one trace ID (a trace ID also
//!   finds the lines of the request whose UUID it was derived from, and a request ID
//!   finds every line of the traces it took part in);
//! - [`timeline`] groups them into [`Hop`]s (one per span), with start, duration (the
//!   access line's `duration_us`), parent, and the spans named as parents that have no
//!   line anywhere (missing hops);
//! - [`render_text`], [`render_svg`] and [`slowest`] print the results;
//! - [`read`] reads the logs line by line, a line at most [`read::MAX_LINE_BYTES`]
//!   long, and a second time for a query's second pass ([`Selection`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use appproxy_shared::telemetry::hides_text;
use serde_json::Value;

pub mod read;

/// One log line, reduced to what a timeline needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Microseconds since the Unix epoch.
    pub ts_us: i64,
    /// The timestamp as written.
    pub timestamp: String,
    /// `component` (`coordinator`, `storage-proxy`, `worker`, …).
    pub component: String,
    /// `target` (`access` for access lines).
    pub target: String,
    /// `level`.
    pub level: String,
    /// `message`.
    pub message: String,
    /// `request_id`, when the line has one.
    pub request_id: Option<String>,
    /// `trace_id`, when the line has one.
    pub trace_id: Option<String>,
    /// `span_id`, when the line has one.
    pub span_id: Option<String>,
    /// `parent_span_id`, when the line has one.
    pub parent_span_id: Option<String>,
    /// `duration_us` (access lines).
    pub duration_us: Option<u64>,
    /// `method` and `path` of an access line, joined.
    pub route: Option<String>,
    /// `status` of an access line.
    pub status: Option<String>,
    /// Where the line came from (`file:line`).
    pub source: String,
}

impl Entry {
    /// Whether this is a hop's access line (which ends the hop and has its duration).
    pub fn is_access(&self) -> bool {
        self.target == "access" && self.duration_us.is_some()
    }
}

/// Parses one log line; `None` for anything that is not a JSON object with a
/// timestamp (plain-text lines, journald headers, blank lines).
pub fn parse_line(line: &str, source: &str) -> Option<Entry> {
    let start = line.find('{')?;
    let value: Value = serde_json::from_str(line[start..].trim_end()).ok()?;
    let obj = value.as_object()?;
    let text = |k: &str| -> Option<String> {
        match obj.get(k)? {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    };
    let timestamp = text("timestamp").or_else(|| text("ts"))?;
    let ts_us = parse_rfc3339(&timestamp)?;
    let route = match (text("method"), text("path")) {
        (Some(m), Some(p)) => Some(format!("{m} {p}")),
        (None, Some(p)) => Some(p),
        _ => None,
    };
    Some(Entry {
        ts_us,
        timestamp,
        component: text("component").unwrap_or_else(|| "?".to_owned()),
        target: text("target").unwrap_or_default(),
        level: text("level").unwrap_or_default(),
        message: text("message").or_else(|| text("msg")).unwrap_or_default(),
        request_id: text("request_id"),
        trace_id: text("trace_id"),
        span_id: text("span_id"),
        parent_span_id: text("parent_span_id"),
        duration_us: obj
            .get("duration_us")
            .and_then(Value::as_u64)
            .map(|d| d.min(MAX_DURATION_US)),
        route,
        status: text("status"),
        source: source.to_owned(),
    })
}

/// The longest duration a line is taken to state (a century): a larger one is taken
/// as this. Every time the tool works out lies between the years 0 and 9999 (what
/// a timestamp can say) and this far before them, so no difference of two overflows.
pub const MAX_DURATION_US: u64 = 100 * 365 * 86_400 * 1_000_000;

/// Nesting shown by indentation, at most: a hop deeper than this is indented as far
/// and names its depth (`[depth N]`). Any client can nest its requests as deep as it
/// likes (each carrying the `traceparent` the last answer echoed), and an indentation
/// per level made the text grow with the square of the depth: a chain of 20,000
/// requests rendered 800 MB.
pub const MAX_INDENT: usize = 32;

/// Parses every line of `text`, tagging entries with `name:line`.
pub fn parse_text(text: &str, name: &str) -> Vec<Entry> {
    text.lines()
        .enumerate()
        .filter_map(|(i, l)| parse_line(l, &format!("{name}:{}", i + 1)))
        .collect()
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` into microseconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let mut digits = 0;
        while let Some(c) = b.get(i).filter(|c| c.is_ascii_digit()) {
            if digits < 6 {
                micros = micros * 10 + i64::from(c - b'0');
                digits += 1;
            }
            i += 1;
        }
        if digits == 0 {
            return None;
        }
        for _ in digits..6 {
            micros *= 10;
        }
    }
    let offset_s = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let v = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if *sign == b'+' {
                v
            } else {
                -v
            }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo as u32, d as u32);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    Some(secs * 1_000_000 + micros)
}

/// Days since 1970-01-01 of a civil date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// What to look for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// Every line of this request ID (and of the traces it took part in).
    Request(String),
    /// Every line of this trace ID (and of the requests it covers).
    Trace(String),
}

/// The 32 hex digits of a UUID request ID, which is the trace ID derived from it.
pub fn trace_id_of_request(request_id: &str) -> Option<String> {
    let hex: String = request_id.chars().filter(|c| *c != '-').collect();
    let shape_ok = match request_id.len() {
        36 => [8, 13, 18, 23]
            .iter()
            .all(|&i| request_id.as_bytes()[i] == b'-'),
        32 => true,
        _ => false,
    };
    (shape_ok && hex.len() == 32 && hex.bytes().all(|c| c.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

/// Which lines belong to a query, found in two passes over the same lines: every
/// line is first [`observe`](Selection::observe)d (a request ID's lines name its
/// traces, a trace's lines name its requests), then each is [`keeps`](Selection::keeps)
/// asked. Both [`select`] (entries in memory) and the command line's streaming read
/// (each pass a read of the logs, holding only what is kept) go through it, so the two
/// agree on every input.
#[derive(Debug, Clone)]
pub struct Selection {
    query: Query,
    traces: BTreeSet<String>,
    requests: BTreeSet<String>,
}

impl Selection {
    /// Nothing seen yet: the query's own ID only.
    pub fn new(query: &Query) -> Self {
        let (query, traces, requests) = match query {
            Query::Request(r) => (query.clone(), BTreeSet::new(), BTreeSet::from([r.clone()])),
            Query::Trace(t) => {
                let t = t.to_ascii_lowercase();
                (
                    Query::Trace(t.clone()),
                    BTreeSet::from([t]),
                    BTreeSet::new(),
                )
            }
        };
        Selection {
            query,
            traces,
            requests,
        }
    }

    /// First pass: notes the traces of the request (its lines' `trace_id`s), or the
    /// requests of the trace (the `request_id`s of its lines and of the lines whose
    /// UUID request ID it was derived from).
    pub fn observe(&mut self, e: &Entry) {
        match &self.query {
            Query::Request(r) => {
                if e.request_id.as_deref() == Some(r) {
                    if let Some(t) = &e.trace_id {
                        if !self.traces.contains(t) {
                            self.traces.insert(t.clone());
                        }
                    }
                }
            }
            Query::Trace(t) => {
                let Some(r) = &e.request_id else { return };
                if self.requests.contains(r) {
                    return;
                }
                if e.trace_id.as_deref() == Some(t) || trace_id_of_request(r).as_deref() == Some(t)
                {
                    self.requests.insert(r.clone());
                }
            }
        }
    }

    /// Second pass, after every line was observed: whether `e` belongs (a line with a
    /// trace by its trace, one without by its request ID).
    pub fn keeps(&self, e: &Entry) -> bool {
        match &e.trace_id {
            Some(t) => self.traces.contains(t),
            None => e
                .request_id
                .as_ref()
                .is_some_and(|r| self.requests.contains(r)),
        }
    }
}

/// Selected entries in time order; lines of the same microsecond keep the order they
/// were read in.
pub fn in_time_order(mut entries: Vec<Entry>) -> Vec<Entry> {
    entries.sort_by_key(|e| e.ts_us);
    entries
}

/// The entries of `query`, in time order.
pub fn select(entries: &[Entry], query: &Query) -> Vec<Entry> {
    let mut selection = Selection::new(query);
    for e in entries {
        selection.observe(e);
    }
    in_time_order(
        entries
            .iter()
            .filter(|e| selection.keeps(e))
            .cloned()
            .collect(),
    )
}

/// One hop: the lines of one span (or, for lines without a span, of one component).
#[derive(Debug, Clone, PartialEq)]
pub struct Hop {
    /// The span ID (`None` for the untraced lines of a component).
    pub span_id: Option<String>,
    /// The caller's span.
    pub parent_span_id: Option<String>,
    /// The component that logged it.
    pub component: String,
    /// What it did: the access line's route, else the first message.
    pub name: String,
    /// The access line's status, when there is one.
    pub status: Option<String>,
    /// Start (the access line's timestamp minus its duration, else the first line).
    pub start_us: i64,
    /// End (the access line's timestamp, else the last line).
    pub end_us: i64,
    /// Whether the duration comes from an access line's `duration_us` (else it is the
    /// spread of the hop's lines).
    pub measured: bool,
    /// Nesting depth under the hops present.
    pub depth: usize,
    /// The hop's lines, in time order.
    pub lines: Vec<Entry>,
}

impl Hop {
    /// Duration in microseconds.
    pub fn duration_us(&self) -> i64 {
        self.end_us - self.start_us
    }
}

/// A span named as a parent by some hop that has no line in the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingHop {
    /// The missing span.
    pub span_id: String,
    /// The hops (span IDs) that name it as parent.
    pub children: Vec<String>,
    /// The components of those hops.
    pub child_components: Vec<String>,
}

/// A reconstructed timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    /// The trace IDs seen (normally one).
    pub trace_ids: Vec<String>,
    /// The request IDs seen.
    pub request_ids: Vec<String>,
    /// Hops in display order (depth-first by start time).
    pub hops: Vec<Hop>,
    /// Spans that some hop names as its parent but that no line belongs to.
    pub missing: Vec<MissingHop>,
    /// Earliest start.
    pub start_us: i64,
    /// Latest end.
    pub end_us: i64,
}

/// Groups selected entries into hops.
pub fn timeline(entries: &[Entry]) -> Timeline {
    let mut groups: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    let mut untraced: BTreeMap<(&str, &str), Vec<&Entry>> = BTreeMap::new();
    for e in entries {
        match &e.span_id {
            Some(s) => groups.entry(format!("s:{s}")).or_default().push(e.clone()),
            None => untraced
                .entry((&e.component, e.request_id.as_deref().unwrap_or("")))
                .or_default()
                .push(e),
        }
    }
    // A component's lines without a span (trace context off) of one request ID are
    // cut into one hop per request, each ending at its access line: two requests of
    // one ID (a client may send any ID twice) are two hops, not one named after the
    // last of them. Lines after the last access line (a task the request left
    // running) are a hop of their own.
    for ((component, request), mut lines) in untraced {
        lines.sort_by_key(|e| e.ts_us);
        let mut hop = Vec::new();
        let mut n = 0usize;
        for e in lines {
            hop.push(e.clone());
            if e.is_access() {
                groups.insert(
                    format!("c:{component}:{request}:{n:010}"),
                    std::mem::take(&mut hop),
                );
                n += 1;
            }
        }
        if !hop.is_empty() {
            groups.insert(format!("c:{component}:{request}:{n:010}"), hop);
        }
    }
    let mut hops: Vec<Hop> = groups
        .into_values()
        .map(|mut lines| {
            lines.sort_by_key(|e| e.ts_us);
            let first = &lines[0];
            let access = lines.iter().rev().find(|e| e.is_access());
            let (start_us, end_us, measured) = match access {
                Some(a) => {
                    let d = a.duration_us.unwrap_or(0).min(MAX_DURATION_US) as i64;
                    let start = a.ts_us.saturating_sub(d).min(first.ts_us);
                    (start, a.ts_us, true)
                }
                None => (first.ts_us, lines[lines.len() - 1].ts_us, false),
            };
            let name = access
                .and_then(|a| a.route.clone())
                .unwrap_or_else(|| first.message.clone());
            Hop {
                span_id: first.span_id.clone(),
                parent_span_id: lines.iter().find_map(|e| e.parent_span_id.clone()),
                component: first.component.clone(),
                name,
                status: access.and_then(|a| a.status.clone()),
                start_us,
                end_us,
                measured,
                depth: 0,
                lines,
            }
        })
        .collect();
    hops.sort_by_key(|h| h.start_us);

    let present: BTreeSet<String> = hops.iter().filter_map(|h| h.span_id.clone()).collect();
    let mut missing: BTreeMap<String, MissingHop> = BTreeMap::new();
    for h in &hops {
        if let Some(p) = &h.parent_span_id {
            if !present.contains(p) {
                let m = missing.entry(p.clone()).or_insert_with(|| MissingHop {
                    span_id: p.clone(),
                    children: Vec::new(),
                    child_components: Vec::new(),
                });
                m.children.push(h.span_id.clone().unwrap_or_default());
                m.child_components.push(h.component.clone());
            }
        }
    }

    // Depth-first order: each hop right after its parent, siblings by start time.
    let index: HashMap<String, usize> = hops
        .iter()
        .enumerate()
        .filter_map(|(i, h)| h.span_id.clone().map(|s| (s, i)))
        .collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); hops.len()];
    let mut roots = Vec::new();
    for (i, h) in hops.iter().enumerate() {
        match h.parent_span_id.as_ref().and_then(|p| index.get(p)) {
            Some(&p) if p != i => children[p].push(i),
            _ => roots.push(i),
        }
    }
    let mut order = Vec::with_capacity(hops.len());
    let mut seen = vec![false; hops.len()];
    let mut stack: Vec<(usize, usize)> = roots.iter().rev().map(|&r| (r, 0)).collect();
    while let Some((i, depth)) = stack.pop() {
        if std::mem::replace(&mut seen[i], true) {
            continue;
        }
        order.push((i, depth));
        for &c in children[i].iter().rev() {
            stack.push((c, depth + 1));
        }
    }
    // Hops caught in a parent cycle (malformed logs) still get shown.
    for (i, s) in seen.iter().enumerate() {
        if !s {
            order.push((i, 0));
        }
    }
    let ordered: Vec<Hop> = order
        .into_iter()
        .map(|(i, depth)| Hop {
            depth,
            ..hops[i].clone()
        })
        .collect();

    let trace_ids: BTreeSet<String> = entries.iter().filter_map(|e| e.trace_id.clone()).collect();
    let request_ids: BTreeSet<String> = entries
        .iter()
        .filter_map(|e| e.request_id.clone())
        .collect();
    Timeline {
        trace_ids: trace_ids.into_iter().collect(),
        request_ids: request_ids.into_iter().collect(),
        start_us: ordered.iter().map(|h| h.start_us).min().unwrap_or(0),
        end_us: ordered.iter().map(|h| h.end_us).max().unwrap_or(0),
        hops: ordered,
        missing: missing.into_values().collect(),
    }
}

/// Microseconds as milliseconds with three decimals.
pub fn ms(us: i64) -> String {
    let sign = if us < 0 { "-" } else { "" };
    let a = us.unsigned_abs();
    format!("{sign}{}.{:03}ms", a / 1000, a % 1000)
}

/// The text timeline. `verbose` adds every line under its hop.
pub fn render_text(t: &Timeline, verbose: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "trace {}  request {}",
        join_or_dash(&t.trace_ids),
        join_or_dash(&t.request_ids)
    );
    let _ = writeln!(
        out,
        "{} hop(s), {} missing, total {}",
        t.hops.len(),
        t.missing.len(),
        ms(t.end_us - t.start_us)
    );
    let spans: HashMap<&str, &Hop> = t
        .hops
        .iter()
        .filter_map(|h| h.span_id.as_deref().map(|s| (s, h)))
        .collect();
    let mut previous_end: Option<i64> = None;
    for h in &t.hops {
        let indent = if h.depth > MAX_INDENT {
            format!("{}[depth {}] ", "  ".repeat(MAX_INDENT), h.depth)
        } else {
            "  ".repeat(h.depth)
        };
        let gap = match h.parent_span_id.as_deref().and_then(|p| spans.get(p)) {
            Some(parent) => format!("+{} after parent start", ms(h.start_us - parent.start_us)),
            None => match previous_end {
                Some(end) => format!("gap {} after previous hop", ms(h.start_us - end)),
                None => "first hop".to_owned(),
            },
        };
        let _ = writeln!(
            out,
            "{indent}+{:<12} {:<14} {}{}  dur {}{}  ({gap})",
            ms(h.start_us - t.start_us),
            h.component,
            h.name,
            h.status
                .as_deref()
                .map(|s| format!(" -> {s}"))
                .unwrap_or_default(),
            ms(h.duration_us()),
            if h.measured { "" } else { " (lines' spread)" },
        );
        let _ = writeln!(
            out,
            "{indent}    span {} parent {}{}",
            h.span_id.as_deref().unwrap_or("-"),
            h.parent_span_id.as_deref().unwrap_or("-"),
            match &h.parent_span_id {
                Some(p) if !spans.contains_key(p.as_str()) => "  [MISSING PARENT HOP]",
                _ => "",
            }
        );
        if verbose {
            for e in &h.lines {
                let _ = writeln!(
                    out,
                    "{indent}      +{:<12} {:<5} {} {}  [{}]",
                    ms(e.ts_us - t.start_us),
                    e.level,
                    e.target,
                    e.message,
                    e.source
                );
            }
        }
        previous_end = Some(previous_end.map_or(h.end_us, |p| p.max(h.end_us)));
    }
    for m in &t.missing {
        let _ = writeln!(
            out,
            "MISSING HOP: span {} is the parent of {} ({}) but has no line in these logs \
             (a component's log not given, or the external caller)",
            m.span_id,
            m.children.join(", "),
            m.child_components.join(", ")
        );
    }
    shown(&out)
}

/// `text` as it may be shown in a terminal: line breaks kept, every other control
/// and every character that changes how the text around it is shown written as
/// `\u{…}`. The logs write them escaped, and their JSON decodes them back; a
/// client's path holding a right-to-left override, a C1 control or a zero-width
/// space would otherwise disguise itself, or the rows around it, on the operator's
/// screen. (The set is the log writer's own: [`hides_text`].)
pub fn shown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if (c.is_control() && c != '\n') || hides_text(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

fn join_or_dash(v: &[String]) -> String {
    if v.is_empty() {
        "-".to_owned()
    } else {
        v.join(",")
    }
}

/// Escapes text for SVG (and [`shown`] as in a terminal: a browser honours a
/// right-to-left override as a terminal does).
fn xml(s: &str) -> String {
    shown(s)
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An SVG waterfall: one row per hop, bars placed by start and sized by duration;
/// missing hops as dashed rows at the end.
pub fn render_svg(t: &Timeline) -> String {
    const WIDTH: f64 = 1200.0;
    const LABEL: f64 = 420.0;
    const ROW: f64 = 24.0;
    let rows = t.hops.len() + t.missing.len();
    let height = 40.0 + ROW * rows as f64 + 20.0;
    let total = (t.end_us - t.start_us).max(1) as f64;
    let scale = (WIDTH - LABEL - 20.0) / total;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="monospace" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<text x="8" y="18">trace {} — {} hop(s), total {}</text>"#,
        xml(&join_or_dash(&t.trace_ids)),
        t.hops.len(),
        ms(t.end_us - t.start_us)
    );
    let colors = [
        "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1",
    ];
    let mut component_color: BTreeMap<&str, &str> = BTreeMap::new();
    for (i, h) in t.hops.iter().enumerate() {
        let n = component_color.len();
        let color = *component_color
            .entry(h.component.as_str())
            .or_insert(colors[n % colors.len()]);
        let y = 30.0 + ROW * i as f64;
        let x = LABEL + (h.start_us - t.start_us) as f64 * scale;
        let w = (h.duration_us() as f64 * scale).max(1.0);
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}">{}</text>"#,
            8.0 + 12.0 * h.depth.min(MAX_INDENT) as f64,
            y + 15.0,
            xml(&format!("{} {}", h.component, h.name))
        );
        let _ = writeln!(
            out,
            r#"<rect x="{x:.1}" y="{}" width="{w:.1}" height="{}" fill="{color}"><title>{}</title></rect>"#,
            y + 3.0,
            ROW - 6.0,
            xml(&format!(
                "{} span {} parent {} start +{} dur {}",
                h.component,
                h.span_id.as_deref().unwrap_or("-"),
                h.parent_span_id.as_deref().unwrap_or("-"),
                ms(h.start_us - t.start_us),
                ms(h.duration_us())
            ))
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" font-size="10">{}</text>"#,
            (x + w + 4.0).min(WIDTH - 60.0),
            y + 15.0,
            ms(h.duration_us())
        );
    }
    for (j, m) in t.missing.iter().enumerate() {
        let y = 30.0 + ROW * (t.hops.len() + j) as f64;
        let _ = writeln!(
            out,
            r##"<text x="8" y="{}" fill="#c00">{}</text>"##,
            y + 15.0,
            xml(&format!("missing hop: span {}", m.span_id))
        );
        let _ = writeln!(
            out,
            r##"<rect x="{LABEL}" y="{}" width="{}" height="{}" fill="none" stroke="#c00" stroke-dasharray="4 3"/>"##,
            y + 3.0,
            WIDTH - LABEL - 20.0,
            ROW - 6.0
        );
    }
    out.push_str("</svg>\n");
    out
}

/// One row of the `--slowest` list.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The trace ID, or `request:<id>` for lines without a trace.
    pub key: String,
    /// Request IDs seen in it.
    pub request_ids: Vec<String>,
    /// Components seen in it.
    pub components: Vec<String>,
    /// Number of hops.
    pub hops: usize,
    /// Earliest start to latest end.
    pub duration_us: i64,
}

/// The `n` slowest traces (lines without a trace are grouped by request ID).
pub fn slowest(entries: &[Entry], n: usize) -> Vec<Summary> {
    let mut all = Slowest::default();
    for e in entries {
        all.add(e);
    }
    all.finish(n)
}

/// The `--slowest` list gathered line by line, keeping per trace only what its row
/// needs instead of its lines: its request IDs and components, and per hop its first
/// and last time and its access line's time and duration. (Lines without a span are
/// kept as a time and a duration each: they are cut into hops in time order.) The
/// rows are those [`timeline`] would give each trace's lines.
#[derive(Debug, Default)]
pub struct Slowest {
    groups: BTreeMap<String, TraceSoFar>,
}

#[derive(Debug, Default)]
struct TraceSoFar {
    request_ids: BTreeSet<String>,
    components: BTreeSet<String>,
    spans: HashMap<String, SpanSoFar>,
    /// Lines without a span by component and request ID (`""` for none).
    untraced: BTreeMap<(String, String), Vec<UntracedLine>>,
}

/// A line without a span: its time and, for an access line, its duration.
type UntracedLine = (i64, Option<u64>);

#[derive(Debug)]
struct SpanSoFar {
    first_us: i64,
    last_us: i64,
    /// The access line that ends the hop: the latest (of one microsecond, the last
    /// read), as [`timeline`] takes the last in time order.
    access: Option<(i64, u64)>,
}

/// A hop's start and end from its first line's time and its access line (time and
/// duration), else its last line's time, as [`timeline`] works them out.
fn hop_bounds(first_us: i64, last_us: i64, access: Option<(i64, u64)>) -> (i64, i64) {
    match access {
        Some((ts, d)) => {
            let d = d.min(MAX_DURATION_US) as i64;
            (ts.saturating_sub(d).min(first_us), ts)
        }
        None => (first_us, last_us),
    }
}

impl Slowest {
    /// Adds one line.
    pub fn add(&mut self, e: &Entry) {
        let key = match (&e.trace_id, &e.request_id) {
            (Some(t), _) => t.clone(),
            (None, Some(r)) => format!("request:{r}"),
            (None, None) => return,
        };
        let g = self.groups.entry(key).or_default();
        if let Some(r) = &e.request_id {
            if !g.request_ids.contains(r) {
                g.request_ids.insert(r.clone());
            }
        }
        if !g.components.contains(&e.component) {
            g.components.insert(e.component.clone());
        }
        let access = e.is_access().then(|| e.duration_us.unwrap_or(0));
        match &e.span_id {
            Some(s) => {
                let span = g.spans.entry(s.clone()).or_insert(SpanSoFar {
                    first_us: e.ts_us,
                    last_us: e.ts_us,
                    access: None,
                });
                span.first_us = span.first_us.min(e.ts_us);
                span.last_us = span.last_us.max(e.ts_us);
                if let Some(d) = access {
                    if span.access.is_none_or(|(ts, _)| e.ts_us >= ts) {
                        span.access = Some((e.ts_us, d));
                    }
                }
            }
            None => g
                .untraced
                .entry((
                    e.component.clone(),
                    e.request_id.clone().unwrap_or_default(),
                ))
                .or_default()
                .push((e.ts_us, access)),
        }
    }

    /// The `n` slowest of the traces added.
    pub fn finish(self, n: usize) -> Vec<Summary> {
        let mut out: Vec<Summary> = self
            .groups
            .into_iter()
            .map(|(key, g)| {
                let mut bounds: Vec<(i64, i64)> = g
                    .spans
                    .values()
                    .map(|s| hop_bounds(s.first_us, s.last_us, s.access))
                    .collect();
                // As in `timeline`: one hop per access line in time order, the lines
                // after the last one a hop of their own; hops named alike (a component
                // or request ID holding `:`) are one, the later.
                let mut untraced_hops: BTreeMap<String, (i64, i64)> = BTreeMap::new();
                for ((component, request), mut lines) in g.untraced {
                    lines.sort_by_key(|&(ts, _)| ts);
                    let mut n = 0usize;
                    let mut first: Option<i64> = None;
                    let mut last = 0;
                    for (ts, access) in lines {
                        let start = *first.get_or_insert(ts);
                        last = ts;
                        if let Some(d) = access {
                            untraced_hops.insert(
                                format!("c:{component}:{request}:{n:010}"),
                                hop_bounds(start, ts, Some((ts, d))),
                            );
                            n += 1;
                            first = None;
                        }
                    }
                    if let Some(start) = first {
                        untraced_hops
                            .insert(format!("c:{component}:{request}:{n:010}"), (start, last));
                    }
                }
                bounds.extend(untraced_hops.into_values());
                let start_us = bounds.iter().map(|b| b.0).min().unwrap_or(0);
                let end_us = bounds.iter().map(|b| b.1).max().unwrap_or(0);
                Summary {
                    key,
                    request_ids: g.request_ids.into_iter().collect(),
                    components: g.components.into_iter().collect(),
                    hops: bounds.len(),
                    duration_us: end_us - start_us,
                }
            })
            .collect();
        out.sort_by(|a, b| b.duration_us.cmp(&a.duration_us).then(a.key.cmp(&b.key)));
        out.truncate(n);
        out
    }
}

/// The `--slowest` table.
pub fn render_slowest(rows: &[Summary]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12}  {:>4}  {:<32}  {:<24}  request",
        "duration", "hops", "trace", "components"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:>12}  {:>4}  {:<32}  {:<24}  {}",
            ms(r.duration_us),
            r.hops,
            r.key,
            r.components.join(","),
            join_or_dash(&r.request_ids)
        );
    }
    shown(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2025-08-20T00:33:20.123456Z"),
            Some(1_755_650_000_123_456)
        );
        assert_eq!(
            parse_rfc3339("2025-08-20T02:33:20.1+02:00"),
            Some(1_755_650_000_100_000)
        );
        assert_eq!(
            parse_rfc3339("2000-02-29T00:00:00.000000Z"),
            Some(951_782_400_000_000)
        );
        for bad in [
            "",
            "2025-08-20",
            "2025-13-01T00:00:00Z",
            "2025-08-20T00:00:00.Z",
            "x025-08-20T00:00:00Z",
            "2025-08-20T00:00:00",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn journald_prefix_and_garbage() {
        let line = r#"Nov 30 16:00:00 host appproxy[12]: {"timestamp":"2026-11-30T16:00:00.000001Z","level":"INFO","component":"worker","target":"access","request_id":"r1","duration_us":7}"#;
        let e = parse_line(line, "j:1").expect("parsed");
        assert_eq!(e.component, "worker");
        assert_eq!(e.duration_us, Some(7));
        assert!(e.is_access());
        assert_eq!(parse_line("plain text", "x"), None);
        assert_eq!(parse_line("{not json", "x"), None);
        assert_eq!(parse_line(r#"{"level":"INFO"}"#, "x"), None);
    }

    /// A line of `component` in trace `t`: span `span` under `parent`, at `ts`.
    fn hop_line(ts: &str, span: &str, parent: Option<&str>, duration_us: u64) -> String {
        let parent = parent.map_or(String::new(), |p| format!(r#","parent_span_id":"{p}""#));
        format!(
            r#"{{"timestamp":"{ts}","level":"INFO","component":"svc","target":"access","request_id":"r","trace_id":"t","span_id":"{span}"{parent},"method":"GET","path":"/","status":200,"duration_us":{duration_us}}}"#
        )
    }

    #[test]
    fn a_deep_chain_renders_in_bounded_width() {
        let depth = 2_000;
        let lines: Vec<String> = (0..depth)
            .map(|i| {
                let parent = (i > 0).then(|| format!("s{}", i - 1));
                hop_line(
                    &format!("2026-12-06T00:00:{:02}.{:06}Z", i / 1000, i % 1000),
                    &format!("s{i}"),
                    parent.as_deref(),
                    1,
                )
            })
            .collect();
        let entries = parse_text(&lines.join("\n"), "chain");
        let t = timeline(&select(&entries, &Query::Request("r".to_owned())));
        assert_eq!(t.hops.len(), depth);
        assert_eq!(t.hops.iter().map(|h| h.depth).max(), Some(depth - 1));
        let text = render_text(&t, false);
        let widest = text.lines().map(str::len).max().unwrap_or(0);
        assert!(widest < 2 * MAX_INDENT + 200, "{widest}");
        assert!(text.contains(&format!("[depth {}] ", depth - 1)), "{text}");
        assert!(!text.contains(&format!("[depth {MAX_INDENT}] ")));
        assert!(text.contains(&format!("[depth {}] ", MAX_INDENT + 1)));
    }

    #[test]
    fn extreme_durations_and_timestamps_do_not_wrap() {
        let lines = [
            hop_line("0000-01-01T00:00:00Z", "a", None, u64::MAX),
            hop_line("9999-12-31T23:59:59.999999Z", "b", Some("a"), u64::MAX),
        ];
        let entries = parse_text(&lines.join("\n"), "x");
        assert!(entries
            .iter()
            .all(|e| e.duration_us == Some(MAX_DURATION_US)));
        let t = timeline(&select(&entries, &Query::Request("r".to_owned())));
        assert!(t.end_us >= t.start_us);
        assert!(t.hops.iter().all(|h| h.duration_us() >= 0));
        let text = render_text(&t, true);
        assert!(!text.contains("total -"), "{text}");
        let _ = render_svg(&t);
        let worst = slowest(&entries, 2);
        assert!(worst.iter().all(|s| s.duration_us >= 0));
    }

    #[test]
    fn untraced_requests_of_one_id_are_hops_of_their_own() {
        let line = |ts: &str, target: &str, message: &str, path: &str| {
            format!(
                r#"{{"timestamp":"{ts}","level":"INFO","component":"worker","target":"{target}","request_id":"r","message":"{message}","method":"POST","path":"{path}","status":200,"duration_us":5}}"#
            )
        };
        let lines = [
            line("2026-12-06T00:00:00.000001Z", "app", "forwarding", "/a"),
            line(
                "2026-12-06T00:00:00.000010Z",
                "access",
                "",
                "/delete-everything",
            ),
            line("2026-12-06T00:00:01.000001Z", "app", "forwarding", "/b"),
            line("2026-12-06T00:00:01.000010Z", "access", "", "/harmless"),
        ];
        let entries = parse_text(&lines.join("\n"), "x");
        let t = timeline(&select(&entries, &Query::Request("r".to_owned())));
        let names: Vec<&str> = t.hops.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["POST /delete-everything", "POST /harmless"]);
        assert!(t.hops.iter().all(|h| h.lines.len() == 2));
    }

    #[test]
    fn text_hiding_characters_are_shown_escaped() {
        let line = r#"{"timestamp":"2026-12-06T00:00:00Z","level":"INFO","component":"worker","target":"access","request_id":"r","method":"GET","path":"/a\u202egpj.exe\u009b2J\u200bx\ufeff","status":200,"duration_us":1}"#;
        let entries = parse_text(line, "x");
        let t = timeline(&select(&entries, &Query::Request("r".to_owned())));
        for text in [render_text(&t, true), render_slowest(&slowest(&entries, 1))] {
            assert!(
                text.chars()
                    .all(|c| !hides_text(c) && (c == '\n' || !c.is_control())),
                "{text:?}"
            );
        }
        let text = render_text(&t, false);
        assert!(
            text.contains("GET /a\\u{202e}gpj.exe\\u{9b}2J\\u{200b}x\\u{feff}"),
            "{text}"
        );
        assert!(!render_svg(&t).contains('\u{202e}'));
    }

    #[test]
    fn derived_trace_ids() {
        assert_eq!(
            trace_id_of_request("4BF92F35-77B3-4DA6-A3CE-929D0E0E4736").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id_of_request("job-17"), None);
        assert_eq!(
            trace_id_of_request("4bf92f35-77b3-4da6-a3ce-929d0e0e473-"),
            None
        );
    }
}
