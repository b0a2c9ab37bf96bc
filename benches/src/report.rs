//! The benchmark report: a terminal table, `results.json`, `report.md` and one SVG
//! bar chart per scenario under the output folder.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

/// One target's medians in a scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Target name.
    pub label: String,
    /// Requests per second (median over rounds).
    pub rps: f64,
    /// Latency percentiles in microseconds (medians over rounds).
    pub p50_us: f64,
    /// p99.
    pub p99_us: f64,
    /// p99.9.
    pub p999_us: f64,
    /// CPU seconds of the proxy process per 100k requests (none for direct).
    pub cpu_s_per_100k: Option<f64>,
    /// Socket and status errors wrk counted, summed over rounds.
    pub errors: u64,
    /// Requests per second of each round, for judging noise.
    pub rounds: Vec<f64>,
}

/// One scenario's rows.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// Short name.
    pub name: String,
    /// What it measures.
    pub title: String,
    /// One row per target.
    pub rows: Vec<Row>,
}

/// Proxy memory with idle WebSocket sessions.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryRow {
    /// Target name.
    pub label: String,
    /// Sessions held open.
    pub sessions: usize,
    /// Proxy RSS before, KiB.
    pub rss_before_kib: u64,
    /// Proxy RSS with the sessions open, KiB.
    pub rss_after_kib: u64,
    /// (after − before) / sessions.
    pub kib_per_session: f64,
}

/// The idle-session memory table.
pub fn memory_table(rows: &[MemoryRow]) -> String {
    let mut out = String::from("### ws-idle — proxy memory per idle WebSocket session\n\n| target | sessions | RSS before | RSS with sessions | KiB per session |\n|---|---:|---:|---:|---:|\n");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} KiB | {} KiB | {:.2} |",
            r.label, r.sessions, r.rss_before_kib, r.rss_after_kib, r.kib_per_session
        );
    }
    out
}

fn ratio(row: &Row, base: Option<&Row>) -> String {
    match base {
        Some(b) if b.rps > 0.0 => format!("{:.2}×", row.rps / b.rps),
        _ => "—".into(),
    }
}

/// Requests per CPU-second of `row` against `base`'s: the comparison that holds when
/// the load side, not the proxy, limits req/s (and when outside load swings the
/// rates between rounds). A proxy that spins while waiting pays for it here.
fn cpu_ratio(row: &Row, base: Option<&Row>) -> String {
    match (row.cpu_s_per_100k, base.and_then(|b| b.cpu_s_per_100k)) {
        (Some(mine), Some(theirs)) if mine > 0.0 => format!("{:.2}×", theirs / mine),
        _ => "—".into(),
    }
}

/// The scenario as a Markdown table (also readable in a terminal).
pub fn table(r: &ScenarioResult) -> String {
    let nginx = r.rows.iter().find(|x| x.label == "nginx");
    let direct = r.rows.iter().find(|x| x.label == "direct");
    let mut out = String::new();
    let _ = writeln!(out, "### {} — {}\n", r.name, r.title);
    let _ = writeln!(out, "| target | req/s | p50 | p99 | p99.9 | CPU s / 100k req | vs nginx | per CPU vs nginx | vs direct | errors | rounds (req/s) |");
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for row in &r.rows {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms | {} | {} | {} | {} | {} | {} |",
            row.label,
            row.rps,
            row.p50_us / 1000.0,
            row.p99_us / 1000.0,
            row.p999_us / 1000.0,
            row.cpu_s_per_100k.map_or("—".into(), |c| format!("{c:.2}")),
            ratio(row, nginx),
            cpu_ratio(row, nginx),
            ratio(row, direct),
            row.errors,
            row.rounds
                .iter()
                .map(|v| format!("{v:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    out
}

/// A horizontal bar chart of req/s, one bar per target.
pub fn svg(r: &ScenarioResult) -> String {
    let width = 720.0;
    let bar_h = 28.0;
    let left = 190.0;
    let top = 40.0;
    let max = r.rows.iter().map(|x| x.rps).fold(1.0, f64::max);
    let height = top + r.rows.len() as f64 * (bar_h + 12.0) + 20.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"13\">"
    );
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">{} — req/s (median)</text>",
        escape(&r.title)
    );
    for (i, row) in r.rows.iter().enumerate() {
        let y = top + i as f64 * (bar_h + 12.0);
        let w = (width - left - 110.0) * row.rps / max;
        let color = if row.label.starts_with("appproxy") || row.label.starts_with("worker") {
            "#2b7bb9"
        } else {
            "#9aa5b1"
        };
        let _ = writeln!(
            s,
            "<text x=\"10\" y=\"{:.0}\">{}</text>",
            y + bar_h * 0.65,
            escape(&row.label)
        );
        let _ = writeln!(s, "<rect x=\"{left}\" y=\"{y:.0}\" width=\"{w:.1}\" height=\"{bar_h}\" fill=\"{color}\"/>");
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.0}\">{:.0}</text>",
            left + w + 6.0,
            y + bar_h * 0.65,
            row.rps
        );
    }
    s.push_str("</svg>\n");
    s
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Writes `results.json`, `report.md` and `<scenario>.svg` into `dir`.
pub fn write(
    dir: &Path,
    meta: &str,
    results: &[ScenarioResult],
    memory: &[MemoryRow],
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json =
        serde_json::json!({ "meta": meta, "scenarios": results, "idle_websocket_memory": memory });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    )?;
    let mut md = format!("# appproxy benchmark report\n\n{meta}\n\n");
    for r in results {
        md.push_str(&table(r));
        let _ = writeln!(md, "\n![{}]({}.svg)\n", r.name, r.name);
        std::fs::write(dir.join(format!("{}.svg", r.name)), svg(r))?;
    }
    if !memory.is_empty() {
        md.push_str(&memory_table(memory));
    }
    std::fs::write(dir.join("report.md"), md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ScenarioResult {
        let row = |label: &str, rps: f64| Row {
            label: label.into(),
            rps,
            p50_us: 500.0,
            p99_us: 1500.0,
            p999_us: 3000.0,
            cpu_s_per_100k: (label != "direct").then_some(150.0 / rps),
            errors: 0,
            rounds: vec![rps],
        };
        ScenarioResult {
            name: "small".into(),
            title: "small GET".into(),
            rows: vec![
                row("direct", 100.0),
                row("appproxy-worker", 65.0),
                row("nginx", 50.0),
            ],
        }
    }

    #[test]
    fn table_has_ratios() {
        let t = table(&sample());
        // 2.31 CPU-s per 100k against nginx's 3.00: 1.30× the requests per CPU-second.
        assert!(t.contains("| appproxy-worker | 65 | 0.50 ms | 1.50 ms | 3.00 ms | 2.31 | 1.30× | 1.30× | 0.65× | 0 | 65 |"), "{t}");
        assert!(
            t.contains(
                "| direct | 100 | 0.50 ms | 1.50 ms | 3.00 ms | — | 2.00× | — | 1.00× | 0 | 100 |"
            ),
            "{t}"
        );
    }

    #[test]
    fn writes_every_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mem = MemoryRow {
            label: "appproxy-worker".into(),
            sessions: 10,
            rss_before_kib: 100,
            rss_after_kib: 150,
            kib_per_session: 5.0,
        };
        write(dir.path(), "meta", &[sample()], &[mem]).expect("write");
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("results.json")).expect("json"),
        )
        .expect("parse");
        assert_eq!(json["scenarios"][0]["rows"][1]["label"], "appproxy-worker");
        let svg = std::fs::read_to_string(dir.path().join("small.svg")).expect("svg");
        assert!(svg.starts_with("<svg") && svg.contains("appproxy-worker"));
        assert!(std::fs::read_to_string(dir.path().join("report.md"))
            .expect("md")
            .contains("![small](small.svg)"));
    }
}
