//! Metric primitives of the control plane (coordinator and storage-proxy), rendered
//! as Prometheus text in the worker's style: `# HELP` and `# TYPE` on every family,
//! fixed-bucket histograms (the worker's bucket bounds, so dashboards share them).
//!
//! - [`Histogram`]: lock-free (relaxed atomics per bucket); the count rendered is the
//!   sum of the buckets read, so `_count` always equals the `+Inf` bucket;
//! - [`Labeled`]: one value (histogram or counter) per label value, created on first
//!   use under a short lock, at most `max` distinct values (the rest are summed under
//!   `other`), so cardinality stays bounded whatever peers send.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds of the histogram buckets, in microseconds (then `+Inf`).
pub const BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// Upper bounds of the byte-size histogram buckets (then `+Inf`).
pub const BUCKETS_BYTES: [u64; 14] = [
    1 << 10,
    4 << 10,
    16 << 10,
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
    16 << 20,
    64 << 20,
    256 << 20,
    1 << 30,
    4 << 30,
    16 << 30,
    64 << 30,
];

const N_BUCKETS: usize = BUCKETS_US.len() + 1;

/// Writes a family's `# HELP` and `# TYPE` lines.
pub fn header(out: &mut String, family: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} {kind}");
}

/// Writes one sample: `family{labels} value` (no braces when `labels` is empty).
pub fn sample(out: &mut String, family: &str, labels: &str, value: impl std::fmt::Display) {
    if labels.is_empty() {
        let _ = writeln!(out, "{family} {value}");
    } else {
        let _ = writeln!(out, "{family}{{{labels}}} {value}");
    }
}

/// Escapes a label value (backslash, quote, newline).
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What a histogram measures: durations (seconds) or sizes (bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Unit {
    /// Observations in microseconds, rendered in seconds.
    #[default]
    Seconds,
    /// Observations in bytes.
    Bytes,
}

/// A fixed-bucket histogram of relaxed atomics.
#[derive(Default)]
pub struct Histogram {
    unit: Unit,
    buckets: [AtomicU64; N_BUCKETS],
    sum: AtomicU64,
}

impl Histogram {
    /// A histogram of sizes in bytes.
    pub fn bytes() -> Self {
        Self {
            unit: Unit::Bytes,
            ..Self::default()
        }
    }

    fn bounds(&self) -> &'static [u64; N_BUCKETS - 1] {
        match self.unit {
            Unit::Seconds => &BUCKETS_US,
            Unit::Bytes => &BUCKETS_BYTES,
        }
    }

    /// Records a duration.
    pub fn observe(&self, d: Duration) {
        self.observe_raw(d.as_micros().min(u128::from(u64::MAX)) as u64);
    }

    /// Records a raw value (microseconds or bytes, per the unit).
    pub fn observe_raw(&self, v: u64) {
        let i = self.bounds().partition_point(|b| *b < v);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
    }

    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Writes the `_bucket`, `_sum` and `_count` samples (no header).
    pub fn render(&self, out: &mut String, family: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = self.bounds().get(i).map_or_else(
                || "+Inf".to_owned(),
                |v| match self.unit {
                    Unit::Seconds => format!("{}", *v as f64 / 1e6),
                    Unit::Bytes => v.to_string(),
                },
            );
            let _ = writeln!(
                out,
                "{family}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum.load(Ordering::Relaxed);
        match self.unit {
            Unit::Seconds => sample(out, &format!("{family}_sum"), labels, sum as f64 / 1e6),
            Unit::Bytes => sample(out, &format!("{family}_sum"), labels, sum),
        }
        sample(out, &format!("{family}_count"), labels, cumulative);
    }
}

/// One value per label value, bounded: past `max` distinct values, new ones are
/// recorded under `other`.
pub struct Labeled<T> {
    label: &'static str,
    max: usize,
    make: fn() -> T,
    values: Mutex<BTreeMap<String, Arc<T>>>,
}

impl<T> Labeled<T> {
    /// A set labeled `label`, of at most `max` values (plus `other`).
    pub fn new(label: &'static str, max: usize, make: fn() -> T) -> Self {
        Self {
            label,
            max,
            make,
            values: Mutex::default(),
        }
    }

    /// The value for `key`, created on first use.
    pub fn get(&self, key: &str) -> Arc<T> {
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = values.get(key) {
            return v.clone();
        }
        let key = if values.len() >= self.max {
            "other"
        } else {
            key
        };
        values
            .entry(key.to_owned())
            .or_insert_with(|| Arc::new((self.make)()))
            .clone()
    }

    /// Every (label pairs, value), in label order. With an empty label name the
    /// keys are label pairs already (`method="GET",route="/x"`), the overflow one
    /// being `other="true"`.
    pub fn each(&self) -> Vec<(String, Arc<T>)> {
        let values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        values
            .iter()
            .map(|(k, v)| {
                let labels = match (self.label, k.as_str()) {
                    ("", "other") => "other=\"true\"".to_owned(),
                    ("", pairs) => pairs.to_owned(),
                    (label, k) => format!("{label}=\"{}\"", escape(k)),
                };
                (labels, v.clone())
            })
            .collect()
    }
}

impl Labeled<Histogram> {
    /// Writes the family (header and every labeled histogram).
    pub fn render(&self, out: &mut String, family: &str, help: &str) {
        header(out, family, "histogram", help);
        for (labels, h) in self.each() {
            h.render(out, family, &labels);
        }
    }
}

impl Labeled<AtomicU64> {
    /// Adds `n` to `key`'s counter.
    pub fn add(&self, key: &str, n: u64) {
        self.get(key).fetch_add(n, Ordering::Relaxed);
    }

    /// Writes the family (header and every labeled value).
    pub fn render(&self, out: &mut String, family: &str, kind: &str, help: &str) {
        header(out, family, kind, help);
        for (labels, v) in self.each() {
            sample(out, family, &labels, v.load(Ordering::Relaxed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_count_matches() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "a=\"b\"");
        assert!(
            out.contains("x_seconds_bucket{a=\"b\",le=\"0.0005\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{a=\"b\",le=\"0.005\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{a=\"b\",le=\"+Inf\"} 3"),
            "{out}"
        );
        assert!(out.contains("x_seconds_count{a=\"b\"} 3"), "{out}");
    }

    #[test]
    fn labels_are_bounded() {
        let l: Labeled<AtomicU64> = Labeled::new("worker", 2, AtomicU64::default);
        for k in ["a", "b", "c", "d\"x"] {
            l.add(k, 1);
        }
        let keys: Vec<_> = l.each().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["worker=\"a\"", "worker=\"b\"", "worker=\"other\""]);
        assert_eq!(l.get("other").load(Ordering::Relaxed), 2);
    }
}
