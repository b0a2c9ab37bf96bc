//! The `appproxy-trace` command line: reads log files (or stdin) and prints a request's
//! or a trace's timeline, an SVG waterfall, or the slowest traces.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use appproxy_trace::{
    parse_text, render_slowest, render_svg, render_text, select, slowest, timeline, Query,
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
    let mut entries = Vec::new();
    let stdin_only = args.files.is_empty();
    for path in &args.files {
        if path.as_os_str() == "-" {
            entries.extend(parse_text(&read_stdin()?, "stdin"));
            continue;
        }
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path.display().to_string();
        entries.extend(parse_text(&String::from_utf8_lossy(&bytes), &name));
    }
    if stdin_only {
        entries.extend(parse_text(&read_stdin()?, "stdin"));
    }
    if let Some(n) = args.slowest {
        out(&render_slowest(&slowest(&entries, n)))?;
        return Ok(ExitCode::SUCCESS);
    }
    let query = match (&args.request_id, &args.trace_id) {
        (Some(r), None) => Query::Request(r.clone()),
        (None, Some(t)) => Query::Trace(t.clone()),
        _ => anyhow::bail!("give --request-id, --trace-id or --slowest N"),
    };
    let selected = select(&entries, &query);
    if selected.is_empty() {
        eprintln!(
            "appproxy-trace: no line of {query:?} in {} parsed line(s)",
            entries.len()
        );
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

fn read_stdin() -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .context("reading stdin")?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
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
