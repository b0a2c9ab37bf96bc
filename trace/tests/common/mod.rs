//! What `appproxy-trace` printed when it read every input whole, parsed every line and
//! then selected (`parse_text`, `select`, and `--slowest` as a `timeline` of each
//! trace's lines): the reference its streaming read is held to.

use std::collections::{BTreeMap, BTreeSet};

use appproxy_trace::{
    parse_text, render_slowest, render_svg, render_text, select, timeline, Entry, Query, Summary,
};

/// What to ask.
#[derive(Debug, Clone)]
pub enum Ask {
    /// `--request-id … -v`.
    Request(String),
    /// `--trace-id … -v`.
    Trace(String),
    /// `--slowest N`.
    Slowest(usize),
}

/// The output read whole: `None` when no line matches (exit 1), else the text and,
/// for a timeline, the SVG.
pub fn whole_input(inputs: &[(String, Vec<u8>)], ask: &Ask) -> Option<(String, String)> {
    let mut entries = Vec::new();
    for (name, bytes) in inputs {
        entries.extend(parse_text(&String::from_utf8_lossy(bytes), name));
    }
    let query = match ask {
        Ask::Request(r) => Query::Request(r.clone()),
        Ask::Trace(t) => Query::Trace(t.clone()),
        Ask::Slowest(n) => {
            return Some((
                render_slowest(&slowest_by_timeline(&entries, *n)),
                String::new(),
            ))
        }
    };
    let selected = select(&entries, &query);
    if selected.is_empty() {
        return None;
    }
    let t = timeline(&selected);
    Some((render_text(&t, true), render_svg(&t)))
}

/// `--slowest` as it was: each trace's lines grouped, and a [`timeline`] of each.
fn slowest_by_timeline(entries: &[Entry], n: usize) -> Vec<Summary> {
    let mut groups: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    for e in entries {
        let key = match (&e.trace_id, &e.request_id) {
            (Some(t), _) => t.clone(),
            (None, Some(r)) => format!("request:{r}"),
            (None, None) => continue,
        };
        groups.entry(key).or_default().push(e.clone());
    }
    let mut out: Vec<Summary> = groups
        .into_iter()
        .map(|(key, lines)| {
            let t = timeline(&lines);
            let components: BTreeSet<String> = lines.iter().map(|e| e.component.clone()).collect();
            Summary {
                key,
                request_ids: t.request_ids.clone(),
                components: components.into_iter().collect(),
                hops: t.hops.len(),
                duration_us: t.end_us - t.start_us,
            }
        })
        .collect();
    out.sort_by(|a, b| b.duration_us.cmp(&a.duration_us).then(a.key.cmp(&b.key)));
    out.truncate(n);
    out
}
