//! A strict reader of Prometheus text for the metrics tests: every sample belongs to
//! a family announced by `# HELP` and `# TYPE`, and every histogram's buckets are
//! cumulative with `+Inf` equal to `_count`.

use std::collections::{BTreeMap, HashMap};

/// One sample: family-level name (as written), labels as written, value.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The sample's name as written (a histogram's `_bucket`, `_sum`, `_count` too).
    pub name: String,
    /// Its labels as written, without the braces.
    pub labels: String,
    /// Its value.
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    /// Family → kind.
    pub kinds: HashMap<String, String>,
    /// Families with a `# HELP` line.
    pub helps: HashMap<String, String>,
    /// Every sample, in order.
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Parses `text`, panicking on anything malformed.
    pub fn parse(text: &str) -> Self {
        let mut e = Self::default();
        for line in text.lines().filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP text");
                assert!(!help.trim().is_empty(), "empty HELP: {line}");
                assert!(
                    e.helps.insert(name.into(), help.into()).is_none(),
                    "HELP twice: {name}"
                );
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE kind");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(
                    e.kinds.insert(name.into(), kind.into()).is_none(),
                    "TYPE twice: {name}"
                );
            } else {
                assert!(!line.starts_with('#'), "unknown comment: {line}");
                let (series, value) = line.rsplit_once(' ').expect("sample value");
                let (name, labels) = match series.split_once('{') {
                    Some((n, l)) => (n, l.strip_suffix('}').expect("closing brace")),
                    None => (series, ""),
                };
                let value: f64 = value.parse().unwrap_or_else(|_| panic!("value: {line}"));
                e.samples.push(Sample {
                    name: name.into(),
                    labels: labels.into(),
                    value,
                });
            }
        }
        e
    }

    /// The family a sample name belongs to (histogram suffixes removed when the
    /// base is a histogram).
    pub fn family_of(&self, name: &str) -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if self.kinds.get(base).map(String::as_str) == Some("histogram") {
                    return base.into();
                }
            }
        }
        name.into()
    }

    /// Checks HELP and TYPE on every family, naming rules, and every histogram's
    /// consistency. Returns histogram counts by (family, labels).
    pub fn check(&self) -> BTreeMap<(String, String), u64> {
        for s in &self.samples {
            let family = self.family_of(&s.name);
            assert!(self.kinds.contains_key(&family), "no TYPE for {}", s.name);
            assert!(self.helps.contains_key(&family), "no HELP for {}", s.name);
            let kind = &self.kinds[&family];
            assert!(
                family
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "name {family}"
            );
            match kind.as_str() {
                "counter" => assert!(family.ends_with("_total"), "counter {family}"),
                _ => assert!(!family.ends_with("_total"), "{kind} {family}"),
            }
        }
        for (family, kind) in &self.kinds {
            assert!(
                self.helps.contains_key(family),
                "TYPE without HELP: {family}"
            );
            if kind == "histogram" {
                assert!(
                    family.ends_with("_seconds") || family.ends_with("_bytes"),
                    "histogram unit: {family}"
                );
            }
        }
        let mut counts = BTreeMap::new();
        let mut buckets: BTreeMap<(String, String), Vec<(f64, f64)>> = BTreeMap::new();
        for s in &self.samples {
            let family = self.family_of(&s.name);
            if self.kinds[&family] != "histogram" {
                continue;
            }
            if s.name.ends_with("_bucket") {
                let (rest, le) = match s.labels.rsplit_once("le=\"") {
                    Some((rest, le)) => (rest.trim_end_matches(','), le.trim_end_matches('"')),
                    None => panic!("bucket without le: {s:?}"),
                };
                let le: f64 = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("le")
                };
                buckets
                    .entry((family, rest.to_owned()))
                    .or_default()
                    .push((le, s.value));
            } else if s.name.ends_with("_count") {
                counts.insert((family, s.labels.clone()), s.value as u64);
            }
        }
        assert_eq!(
            buckets.keys().collect::<Vec<_>>(),
            counts.keys().collect::<Vec<_>>(),
            "every histogram has buckets and a count"
        );
        for (key, b) in &buckets {
            assert!(
                b.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                "buckets of {key:?} ascend and are cumulative: {b:?}"
            );
            let last = b.last().expect("a bucket");
            assert!(last.0.is_infinite(), "{key:?} ends with +Inf");
            assert_eq!(last.1 as u64, counts[key], "+Inf equals _count for {key:?}");
        }
        counts
    }

    /// The value of `name{labels}` (labels as written).
    pub fn value(&self, name: &str, labels: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == labels)
            .map(|s| s.value)
    }

    /// Sum of a histogram's `_count` over all its label sets.
    pub fn total_count(counts: &BTreeMap<(String, String), u64>, family: &str) -> u64 {
        counts
            .iter()
            .filter(|((f, _), _)| f == family)
            .map(|(_, n)| n)
            .sum()
    }
}

/// The metric families the control-plane dashboard
/// (`deploy/grafana/appproxy-control.json`) queries whose names start with `prefix`
/// (histogram suffixes removed).
pub fn dashboard_families(prefix: &str) -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/appproxy-control.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard file"))
            .expect("dashboard JSON");
    let mut families = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|t| t.starts_with(prefix))
            {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                families.push(family.to_owned());
            }
        }
    }
    families.sort();
    families.dedup();
    families
}
