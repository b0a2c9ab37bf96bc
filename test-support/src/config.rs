//! A table-driven check of config-file refusals: each mistake, written to a file of
//! its own, must be refused naming the file and carrying the expected fragments (key
//! path, line, expectation, "did you mean"); an absent file must be refused as
//! unreadable. The same for a binary at start-up.

use std::path::Path;
use std::process::Command;

/// One mistake: what it is, the file's text, and fragments the refusal must carry.
pub type Mistake = (&'static str, &'static str, &'static [&'static str]);

/// Writes each of `cases` to a file named after `file` and the case, asks `parse` (the
/// service's loader; `None` = accepted) and asserts the refusal names the file and
/// carries every wanted fragment; then checks that a missing file is refused as
/// unreadable.
pub fn assert_mistakes_refused(
    file: &str,
    cases: &[Mistake],
    parse: &dyn Fn(&Path) -> Option<String>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    for (what, text, wants) in cases {
        let path = dir
            .path()
            .join(format!("{file}-{}.toml", what.replace(' ', "-")));
        std::fs::write(&path, text).expect("write");
        let err = parse(&path).unwrap_or_else(|| panic!("{file}: {what} accepted"));
        assert!(
            err.starts_with(&format!("invalid config {}: ", path.display())),
            "{file}: {what}: {err:?} does not name the file"
        );
        for want in *wants {
            assert!(err.contains(want), "{file}: {what}: {err:?} lacks {want:?}");
        }
    }
    let missing = dir.path().join(format!("{file}-absent.toml"));
    let err = parse(&missing).expect("unreadable");
    assert!(
        err.contains(&format!("cannot read config {}", missing.display())),
        "{err}"
    );
}

/// Starts `bin --config <file with text>` and asserts it exits 2 naming the file and
/// carrying every wanted fragment on stderr; then the same with an absent file.
pub fn assert_binary_refuses(bin: &str, text: &str, wants: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).expect("write");
    let out = Command::new(bin)
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{bin}: {err}");
    assert!(err.contains(&path.display().to_string()), "{bin}: {err}");
    for want in wants {
        assert!(err.contains(want), "{bin}: {err:?} lacks {want:?}");
    }
    let out = Command::new(bin)
        .arg("--config")
        .arg(dir.path().join("absent.toml"))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{bin}: {err}");
    assert!(
        err.contains("cannot read config") && err.contains("absent.toml"),
        "{bin}: {err}"
    );
}

/// Each way a default config printed by `--print-default-config` can be used with
/// one of its commented keys (`# key = …`) turned on: that line uncommented, or,
/// under a commented section header (`# [section]`), the header and every key of
/// the section (a section's keys may need each other). The text as a reader would
/// edit it, one per commented key.
pub fn uncommented_one_by_one(text: &str) -> Vec<(String, String)> {
    let mut variants = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Some(key) = line.strip_prefix("# ") else {
            continue;
        };
        if key.starts_with('[') {
            continue;
        }
        let mut lines: Vec<&str> = text.lines().collect();
        lines[i] = key;
        let header = (0..i)
            .rev()
            .find(|&h| lines[h].starts_with('[') || lines[h].starts_with("# ["));
        if let Some(h) = header.filter(|&h| lines[h].starts_with("# [")) {
            lines[h] = lines[h].trim_start_matches("# ");
            for l in lines.iter_mut().skip(h + 1) {
                if l.starts_with('[') || l.starts_with("# [") {
                    break;
                }
                *l = l.trim_start_matches("# ");
            }
        }
        variants.push((key.to_owned(), lines.join("\n")));
    }
    variants
}

/// Each float setting of a default config (a `key = value` line whose value reads as
/// a float with a point or an exponent) with its value made `nan`: `(section.key,
/// text)`, one per setting, for checking that each is refused by name.
pub fn floats_made_nan(text: &str) -> Vec<(String, String)> {
    let mut variants = Vec::new();
    let mut section = String::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let Some((key, value)) = line.split_once(" = ") else {
            continue;
        };
        let value = value.trim();
        let float = value.contains(['.', 'e', 'E']) && value.parse::<f64>().is_ok();
        if !float || key.starts_with('#') {
            continue;
        }
        let mut lines: Vec<&str> = text.lines().collect();
        let made = format!("{key} = nan");
        lines[i] = &made;
        let path = if section.is_empty() {
            key.to_owned()
        } else {
            format!("{section}.{key}")
        };
        variants.push((path, lines.join("\n")));
    }
    variants
}

/// Asserts that a default config printed by `--print-default-config` shows every
/// key its service takes: for each section it prints (`[s]`, `[[s]]`, or commented
/// `# [s]`), an unknown key is written into that section alone and `parse`'s
/// refusal lists the keys the section takes (serde's "expected one of `a`, `b`";
/// a section that flattens another struct lists none and is passed over);
/// each must appear in the section's block of `text`, set or commented (`key =`,
/// `# key =`). A key added to a config struct and not to its printed default fails.
pub fn assert_every_key_shown(text: &str, parse: &dyn Fn(&str) -> Result<(), String>) {
    let header = |line: &str| -> Option<(String, bool)> {
        let l = line.strip_prefix("# ").unwrap_or(line).trim();
        let array = l.starts_with("[[");
        let name = l.trim_start_matches('[').trim_end_matches(']');
        (l.starts_with('[') && l.ends_with(']') && !name.contains(' ') && !name.is_empty())
            .then(|| (name.to_owned(), array))
    };
    let mut blocks: Vec<(String, bool, Vec<&str>)> = Vec::new();
    for line in text.lines() {
        if let Some((name, array)) = header(line) {
            blocks.push((name, array, Vec::new()));
        } else if let Some(block) = blocks.last_mut() {
            block.2.push(line);
        }
    }
    assert!(!blocks.is_empty(), "no section in:\n{text}");
    let mut checked = 0;
    for (name, array, lines) in &blocks {
        let probe = if *array {
            format!("[[{name}]]\nzz_not_a_key = 1\n")
        } else {
            format!("[{name}]\nzz_not_a_key = 1\n")
        };
        let err = parse(&probe).expect_err("an unknown key is refused");
        // serde lists them (`a`; `a` or `b`; one of `a`, `b`, …), except for a
        // section whose struct flattens another: those cannot be checked this way.
        let Some((_, expected)) = err.split_once("`, expected ") else {
            assert!(err.contains("unknown field"), "[{name}]: {err:?}");
            continue;
        };
        let keys: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        assert!(!keys.is_empty(), "[{name}]: {err:?}");
        checked += 1;
        for key in keys {
            let shown = lines.iter().any(|l| {
                let l = l.strip_prefix("# ").unwrap_or(l);
                l.strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            });
            assert!(shown, "[{name}] {key} is taken but not shown in:\n{text}");
        }
    }
    assert!(
        checked * 2 > blocks.len(),
        "most sections list their keys when refusing one ({checked} of {})",
        blocks.len()
    );
}
