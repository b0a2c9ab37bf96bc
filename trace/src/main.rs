//! The `appproxy-trace` command line: reads log files (or stdin) and prints a request's
//! or a trace's timeline, an SVG waterfall, or the slowest traces, reading the logs
//! line by line (twice for a timeline) and holding only what it shows.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use appproxy_trace::read::{Found, Input, MAX_LINE_BYTES};
use appproxy_trace::{
    in_time_order, render_slowest, render_svg, render_text, timeline, Query, Selection, Slowest,
};
use clap::Parser;

/// Prints one request's or one trace's timeline across the JSON logs of appproxy
/// components (files, `-` or nothing for stdin; `journalctl -o cat` output works).
#[derive(Debug, Parser)]
#[command(name = "appproxy-trace", version)]
struct Args {
    /// Log files; none or `-` reads stdin.
    files: Vec<PathBuf>,
    /// Show the timeline of this request ID.
    #[arg(long, conflicts_with_all = ["trace_id", "slowest"])]
    request_id: Option<String>,
    /// Show the timeline of this trace ID (32 hex digits).
    #[arg(long, conflicts_with = "slowest")]
    trace_id: Option<String>,
    /// List the N slowest traces (lines without a trace are grouped by request ID).
    #[arg(long, value_name = "N")]
    slowest: Option<usize>,
    /// Also write the timeline as an SVG waterfall to this file.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Print every log line under its hop.
    #[arg(short, long)]
    verbose: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("appproxy-trace: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let mut inputs = Input::list(&args.files);
    if let Some(n) = args.slowest {
        // One pass, each line added as read: what a row needs is kept, not the line.
        let mut all = Slowest::default();
        for input in &mut inputs {
            let found = input.read(false, &mut |e, _| all.add(&e))?;
            report_too_long(input, found);
        }
        out(&render_slowest(&all.finish(n)))?;
        return Ok(ExitCode::SUCCESS);
    }
    let query = match (&args.request_id, &args.trace_id) {
        (Some(r), None) => Query::Request(r.clone()),
        (None, Some(t)) if t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Query::Trace(t.clone())
        }
        // A typo is a usage error (2), not a trace that left no line (1).
        (None, Some(t)) => anyhow::bail!("--trace-id takes 32 hex digits, not {t:?}"),
        _ => anyhow::bail!("give --request-id, --trace-id or --slowest N"),
    };
    // Two passes, as `select` makes over entries in memory: the first finds the
    // request's traces (or the trace's requests) wherever their lines are, the
    // second keeps the lines that belong. Only those are held.
    let mut selection = Selection::new(&query);
    let (mut parsed, mut other) = (0, 0);
    for input in &mut inputs {
        let found = input.read(true, &mut |e, _| selection.observe(&e))?;
        report_too_long(input, found);
        parsed += found.parsed;
        other += found.other;
    }
    let mut selected = Vec::new();
    for input in &mut inputs {
        let name = input.name().to_owned();
        input.read(true, &mut |mut e, line| {
            if selection.keeps(&e) {
                e.source = format!("{name}:{line}");
                selected.push(e);
            }
        })?;
    }
    let selected = in_time_order(selected);
    if selected.is_empty() {
        eprintln!("appproxy-trace: no line of {query:?} in {parsed} parsed line(s)");
        // Lines there, none of them a log entry: most likely logfmt, which this
        // reads not (said so; before, only "0 parsed line(s)", an outside tester's
        // note).
        if parsed == 0 && other > 0 {
            eprintln!(
                "appproxy-trace: none of the {other} line(s) read is a JSON log line: it reads the services' JSON logs only ([logging] format = \"json\", the default)"
            );
        }
        return Ok(ExitCode::from(1));
    }
    let t = timeline(&selected);
    out(&render_text(&t, args.verbose))?;
    if let Some(path) = &args.svg {
        std::fs::write(path, render_svg(&t))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Says on stderr how many lines of `input` were too long to read.
fn report_too_long(input: &Input, found: Found) {
    if found.too_long > 0 {
        eprintln!(
            "appproxy-trace: {}: {} line(s) longer than {MAX_LINE_BYTES} bytes skipped",
            input.name(),
            found.too_long
        );
    }
}

/// Writes `text` to stdout. A reader that stopped reading (`| head`) ends the
/// output quietly, as for any filter: `print!` panicked on the closed pipe.
fn out(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
