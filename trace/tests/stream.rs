//! `appproxy-trace` reading its inputs line by line: the same output as reading them
//! whole (on a generated log of many requests and traces spread over files and
//! stdin), over-long lines skipped and counted, a trace's lines found before the
//! request's own, and a file rotated or cut short between the passes.

mod common;

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{whole_input, Ask};

fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_appproxy-trace"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run appproxy-trace");
    let mut input = child.stdin.take().expect("stdin");
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        // The tool may stop reading (a usage error): a closed pipe is no failure.
        let _ = input.write_all(&stdin);
    });
    let out = child.wait_with_output().expect("output");
    writer.join().expect("stdin writer");
    out
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn hex(&mut self, digits: usize) -> String {
        (0..digits)
            .map(|_| char::from_digit(self.below(16) as u32, 16).expect("digit"))
            .collect()
    }
}

/// A log line as a component writes it (`null` fields left out).
fn json_line(fields: &[(&str, serde_json::Value)]) -> String {
    let mut v = serde_json::Map::new();
    for (k, value) in fields {
        if !value.is_null() {
            v.insert((*k).to_owned(), value.clone());
        }
    }
    serde_json::Value::Object(v).to_string()
}

/// A generated log: requests (UUID IDs and others, some IDs used twice), traced and
/// untraced, several hops each, apps' lines under other request IDs, traces shared by
/// requests, lines of one microsecond, components and IDs holding `:`, journald
/// prefixes, CRLF and garbage; shuffled, so a trace's lines often come before its
/// request's. Returns the lines, the request IDs and the trace IDs used.
fn generate(requests: usize) -> (Vec<String>, Vec<String>, Vec<String>) {
    use serde_json::{json, Value};
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let components = ["coordinator", "worker", "storage-proxy", "app", "a:b", "a"];
    let mut lines = Vec::new();
    let mut request_ids: Vec<String> = Vec::new();
    let mut trace_ids: Vec<String> = Vec::new();
    for i in 0..requests {
        let rid = if i % 17 == 16 {
            request_ids[rng.below(request_ids.len() as u64) as usize].clone()
        } else if i % 3 == 0 {
            let h = rng.hex(32);
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
        } else if i % 11 == 0 {
            format!("b:{i}")
        } else {
            format!("job-{i}")
        };
        request_ids.push(rid.clone());
        let traced = i % 5 != 0;
        let trace = if !traced {
            Value::Null
        } else if i % 7 == 0 && !trace_ids.is_empty() {
            json!(trace_ids[rng.below(trace_ids.len() as u64) as usize])
        } else if rid.len() == 36 {
            json!(rid.replace('-', ""))
        } else {
            json!(rng.hex(32))
        };
        if let Value::String(t) = &trace {
            trace_ids.push(t.clone());
        }
        // Coarse times, so many lines share a microsecond.
        let base = rng.below(60_000) * 1000;
        let mut parent = Value::Null;
        for hop in 0..1 + rng.below(4) {
            let component = components[rng.below(components.len() as u64) as usize];
            let hop_rid = if traced && hop > 0 && rng.below(4) == 0 {
                json!(format!("app-{i}-{hop}"))
            } else {
                json!(rid)
            };
            let span = if traced && rng.below(10) != 0 {
                json!(rng.hex(16))
            } else {
                Value::Null
            };
            let start = base + hop * 1000 + rng.below(3) * 500;
            for k in 0..1 + rng.below(3) {
                let ts = start + rng.below(4) * 250;
                let access = k % 2 == 1 || rng.below(3) == 0;
                let us = ts % 60_000_000;
                let mut line = json_line(&[
                    (
                        "timestamp",
                        json!(format!(
                            "2026-11-30T16:{:02}:{:02}.{:06}Z",
                            ts / 60_000_000 % 60,
                            us / 1_000_000,
                            us % 1_000_000
                        )),
                    ),
                    ("level", json!("INFO")),
                    ("component", json!(component)),
                    ("target", json!(if access { "access" } else { "app" })),
                    ("message", json!(format!("step {k} of {i}"))),
                    ("request_id", hop_rid.clone()),
                    ("trace_id", trace.clone()),
                    ("span_id", span.clone()),
                    ("parent_span_id", parent.clone()),
                    (
                        "duration_us",
                        if access {
                            json!(rng.below(5000))
                        } else {
                            Value::Null
                        },
                    ),
                    ("method", if access { json!("GET") } else { Value::Null }),
                    ("path", json!(format!("/{i}/{hop}"))),
                    ("status", if access { json!(200) } else { Value::Null }),
                ]);
                match rng.below(10) {
                    0 => line = format!("Nov 30 16:00:00 host appproxy[7]: {line}"),
                    1 => line.push('\r'),
                    _ => {}
                }
                lines.push(line);
            }
            if !span.is_null() {
                parent = span;
            }
        }
        if i % 13 == 0 {
            lines.push(format!("plain text line {i}"));
            lines.push(String::new());
        }
    }
    // Two requests of one trace whose untraced lines' hop names collide
    // (`c:a:b:c:…`): one hop, as the timeline makes it.
    for (component, request) in [("a:b", "c"), ("a", "b:c")] {
        lines.push(json_line(&[
            ("timestamp", json!("2026-11-30T16:00:30.000000Z")),
            ("component", json!(component)),
            ("target", json!("access")),
            ("request_id", json!(request)),
            ("trace_id", json!(trace_ids[0])),
            ("duration_us", json!(10)),
        ]));
    }
    for i in (1..lines.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        lines.swap(i, j);
    }
    (lines, request_ids, trace_ids)
}

/// Asks the tool and the whole-input reference the same, on `files` and `stdin`
/// (read in the order given, stdin where `-` is), and compares.
fn same_as_whole(dir: &Path, inputs: &[(String, Vec<u8>)], ask: &Ask) {
    let svg = dir.join("w.svg");
    let _ = std::fs::remove_file(&svg);
    let mut args: Vec<String> = Vec::new();
    let mut stdin = Vec::new();
    for (name, bytes) in inputs {
        if name == "stdin" {
            args.push("-".to_owned());
            stdin = bytes.clone();
        } else {
            args.push(name.clone());
        }
    }
    match ask {
        Ask::Request(r) => args.extend(["--request-id".to_owned(), r.clone(), "-v".to_owned()]),
        Ask::Trace(t) => args.extend(["--trace-id".to_owned(), t.clone(), "-v".to_owned()]),
        Ask::Slowest(n) => args.extend(["--slowest".to_owned(), n.to_string()]),
    }
    if !matches!(ask, Ask::Slowest(_)) {
        args.extend(["--svg".to_owned(), svg.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run(&args, &stdin);
    let stderr = String::from_utf8_lossy(&o.stderr);
    match whole_input(inputs, ask) {
        None => assert_eq!(o.status.code(), Some(1), "{ask:?}: {stderr}"),
        Some((text, want_svg)) => {
            assert!(o.status.success(), "{ask:?}: {stderr}");
            assert_eq!(String::from_utf8_lossy(&o.stdout), text, "{ask:?}");
            if !matches!(ask, Ask::Slowest(_)) {
                let got = std::fs::read_to_string(&svg).expect("svg written");
                assert_eq!(got, want_svg, "{ask:?}");
            }
        }
    }
}

#[test]
fn streaming_gives_what_reading_whole_gives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (lines, request_ids, trace_ids) = generate(600);
    let parts = 5;
    let mut inputs = Vec::new();
    for p in 0..parts {
        let chunk: Vec<&str> = lines
            .iter()
            .skip(p)
            .step_by(parts)
            .map(String::as_str)
            .collect();
        let mut text = chunk.join("\n");
        if p % 2 == 0 {
            // Some end with a line break, some do not.
            text.push('\n');
        }
        let name = if p == 2 {
            "stdin".to_owned()
        } else {
            let path = dir.path().join(format!("component-{p}.log"));
            std::fs::write(&path, &text).expect("write log");
            path.display().to_string()
        };
        inputs.push((name, text.into_bytes()));
    }
    let mut asks: Vec<Ask> = Vec::new();
    for r in request_ids.iter().step_by(23) {
        asks.push(Ask::Request(r.clone()));
    }
    for t in trace_ids.iter().step_by(19) {
        asks.push(Ask::Trace(t.clone()));
    }
    // UUID request IDs found by the trace derived from them, in capitals too.
    for r in request_ids.iter().filter(|r| r.len() == 36).step_by(31) {
        asks.push(Ask::Trace(r.replace('-', "").to_ascii_uppercase()));
    }
    asks.extend([
        Ask::Request("c".to_owned()),
        Ask::Request("no-such-request".to_owned()),
        Ask::Slowest(5),
        Ask::Slowest(100_000),
    ]);
    for ask in &asks {
        same_as_whole(dir.path(), &inputs, ask);
    }
    // Files only, and stdin alone.
    same_as_whole(dir.path(), &inputs[3..], &Ask::Slowest(50));
    same_as_whole(
        dir.path(),
        &inputs[2..3],
        &Ask::Request(request_ids[3].clone()),
    );
}

#[test]
fn an_over_long_line_is_skipped_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let line = |ts: &str, span: &str, message: &str| {
        json_line(&[
            ("timestamp", format!("2026-11-30T16:00:{ts}Z").into()),
            ("component", "worker".into()),
            ("target", "access".into()),
            ("message", message.into()),
            ("request_id", "req-long".into()),
            ("trace_id", "0123456789abcdef0123456789abcdef".into()),
            ("span_id", span.into()),
            ("duration_us", 5.into()),
        ])
    };
    let huge = "x".repeat(2 << 20);
    let log = dir.path().join("long.log");
    let text = [
        line("01.000000", "1111111111111111", "before"),
        line("02.000000", "2222222222222222", &huge),
        line("03.000000", "3333333333333333", "after"),
    ]
    .join("\n");
    std::fs::write(&log, text).expect("write log");
    // A file without a line break at all, longer than the bound.
    let tail = dir.path().join("tail.log");
    std::fs::write(&tail, "y".repeat(3 << 20)).expect("write log");
    let (log, tail) = (log.display().to_string(), tail.display().to_string());
    for ask in [
        &["--request-id", "req-long", "-v"][..],
        &["--slowest", "3"][..],
    ] {
        let mut args = vec![log.as_str(), tail.as_str()];
        args.extend(ask);
        let o = run(&args, b"");
        let out = String::from_utf8_lossy(&o.stdout);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "{log}: 1 line(s) longer than 1048576 bytes skipped"
            )),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!(
                "{tail}: 1 line(s) longer than 1048576 bytes skipped"
            )),
            "{stderr}"
        );
        if ask[0] == "--slowest" {
            assert!(out.contains("     2  0123456789abcdef"), "{out}");
        } else {
            assert!(out.contains("2 hop(s)"), "{out}");
            assert!(out.contains(&format!("[{log}:1]")), "{out}");
            assert!(out.contains(&format!("[{log}:3]")), "{out}");
            assert!(!out.contains("2222222222222222"), "{out}");
        }
    }
}

/// The trace's lines (the app's, under its own request ID) come before the request's
/// own line that names the trace: a single pass would have passed them by.
#[test]
fn a_trace_s_lines_before_the_request_s_are_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let line = |ts: &str, component: &str, request: &str, span: &str, parent: &str| {
        json_line(&[
            ("timestamp", format!("2026-11-30T16:00:{ts}Z").into()),
            ("component", component.into()),
            ("target", "access".into()),
            ("request_id", request.into()),
            ("trace_id", trace.into()),
            ("span_id", span.into()),
            ("parent_span_id", parent.into()),
            ("duration_us", 1000.into()),
            ("path", format!("/{component}").into()),
        ])
    };
    let app = dir.path().join("app.log");
    let worker = dir.path().join("worker.log");
    std::fs::write(
        &app,
        line(
            "01.500000",
            "app",
            "app-1",
            "2222222222222222",
            "1111111111111111",
        ) + "\n",
    )
    .expect("write log");
    std::fs::write(
        &worker,
        [
            line(
                "01.700000",
                "app",
                "app-2",
                "3333333333333333",
                "1111111111111111",
            ),
            line(
                "02.000000",
                "worker",
                "req-1",
                "1111111111111111",
                "0000000000000001",
            ),
        ]
        .join("\n"),
    )
    .expect("write log");
    let (app, worker) = (app.display().to_string(), worker.display().to_string());
    let o = run(&[&app, &worker, "--request-id", "req-1"], b"");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("request app-1,app-2,req-1"), "{out}");
    assert!(out.contains("3 hop(s), 1 missing"), "{out}");
    // The same from stdin, read once and held for the second pass.
    let text = std::fs::read_to_string(&app).expect("read")
        + &std::fs::read_to_string(&worker).expect("read");
    let o = run(&["--request-id", "req-1"], text.as_bytes());
    assert_eq!(String::from_utf8_lossy(&o.stdout), out);
    // And from a file that is a pipe (`<(zcat …)`): held as stdin is.
    let o = run(&["/dev/stdin", "--request-id", "req-1"], text.as_bytes());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        out,
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Between the two passes a file may be rotated (renamed, removed: the file read
/// first is read again, whole) or cut short (an error, exit 2: the first pass's
/// findings would not hold).
#[test]
fn a_file_rotated_between_passes_is_read_again_and_one_cut_short_is_an_error() {
    for cut in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("rotated.log");
        std::fs::write(
            &log,
            json_line(&[
                ("timestamp", "2026-11-30T16:00:00Z".into()),
                ("component", "worker".into()),
                ("request_id", "req-1".into()),
            ]) + "\n",
        )
        .expect("write log");
        let log_name = log.display().to_string();
        let mut child = Command::new(env!("CARGO_BIN_EXE_appproxy-trace"))
            .args([&log_name, "-", "--request-id", "req-1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run appproxy-trace");
        let mut input = child.stdin.take().expect("stdin");
        // The tool reads stdin after the file: once it has taken most of these 4 MiB
        // (far more than a pipe holds), its first pass is past the file.
        input
            .write_all("not a log line\n".repeat(4 << 16).as_bytes())
            .expect("write stdin");
        if cut {
            std::fs::File::create(&log).expect("truncate the log");
        } else {
            std::fs::rename(&log, dir.path().join("rotated.log.1")).expect("rotate");
        }
        drop(input);
        let o = child.wait_with_output().expect("output");
        let stderr = String::from_utf8_lossy(&o.stderr);
        if cut {
            assert_eq!(o.status.code(), Some(2), "{stderr}");
            assert!(
                stderr.contains(&format!("{log_name} is shorter on the second pass")),
                "{stderr}"
            );
        } else {
            assert_eq!(o.status.code(), Some(0), "{stderr}");
            assert!(String::from_utf8_lossy(&o.stdout).contains("req-1"));
        }
    }
}
