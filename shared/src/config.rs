//! Reading TOML config files with errors that say what to fix: the key path
//! (`circuits[3].route_info[0].route_id`), the line and column, what was expected and,
//! for a misspelt key, the closest known one ("did you mean `bind`?").
//!
//! Every binary parses its file through [`from_toml`], so the coordinator, the
//! storage-proxy and the worker word their refusals the same way.

use serde::de::DeserializeOwned;

/// Parses `text` into `T`; the error names the key path, its position and the fix.
/// A float that is not a finite number (`nan`, `inf`) is refused whatever the key:
/// no setting takes one, and a duration made of it panics (`Duration::from_secs_f64`),
/// which a clamp does not prevent for `nan`.
pub fn from_toml<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let de = toml::Deserializer::parse(text).map_err(|e| describe(text, "", &e))?;
    let parsed = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        describe(text, &path, e.inner())
    })?;
    if let Some((path, value)) = text
        .parse::<toml::Table>()
        .ok()
        .and_then(|t| non_finite(&t))
    {
        return Err(format!(
            "{path}: {value} is not a value a setting takes; give a finite number"
        ));
    }
    Ok(parsed)
}

/// The first float of `table` that is not finite, with its key path.
fn non_finite(table: &toml::Table) -> Option<(String, f64)> {
    fn in_table(table: &toml::Table, path: &str) -> Option<(String, f64)> {
        table.iter().find_map(|(k, v)| {
            walk(
                v,
                if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                },
            )
        })
    }
    fn walk(value: &toml::Value, path: String) -> Option<(String, f64)> {
        match value {
            toml::Value::Float(f) if !f.is_finite() => Some((path, *f)),
            toml::Value::Table(t) => in_table(t, &path),
            toml::Value::Array(a) => a
                .iter()
                .enumerate()
                .find_map(|(i, v)| walk(v, format!("{path}[{i}]"))),
            _ => None,
        }
    }
    in_table(table, "")
}

/// Shows a default config's optional keys (those without a default, which a
/// serialized default leaves out) as commented lines: each `(section, line)` goes,
/// prefixed with `# `, under its `[section]` header — or under a commented header at
/// the end when the section itself is optional. Uncommenting a line gives a valid key.
pub fn with_optional_keys(text: &str, optional: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(text.len() + optional.len() * 48);
    let mut placed = vec![false; optional.len()];
    for line in text.lines() {
        out.push_str(line);
        out.push('\n');
        let header = line.trim();
        if let Some(name) = header.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            for (i, (section, key)) in optional.iter().enumerate() {
                if *section == name && !placed[i] {
                    out.push_str(&format!("# {key}\n"));
                    placed[i] = true;
                }
            }
        }
    }
    let mut open: Option<&str> = None;
    for (i, (section, key)) in optional.iter().enumerate() {
        if placed[i] {
            continue;
        }
        if open != Some(*section) {
            out.push_str(&format!("\n# [{section}]\n"));
            open = Some(section);
        }
        out.push_str(&format!("# {key}\n"));
    }
    out
}

/// One sentence (plus a suggestion) for a TOML error at `path`.
fn describe(text: &str, path: &str, e: &toml::de::Error) -> String {
    let mut out = String::new();
    if !path.is_empty() {
        out.push_str(path);
    }
    if let Some(span) = e.span() {
        let (line, col) = line_col(text, span.start);
        if out.is_empty() {
            out = format!("line {line}, column {col}");
        } else {
            out.push_str(&format!(" (line {line}, column {col})"));
        }
    }
    let message = e.message().trim();
    if out.is_empty() {
        out = message.to_owned();
    } else {
        out = format!("{out}: {message}");
    }
    if let Some(hint) = did_you_mean(message) {
        out.push_str(&format!("; did you mean `{hint}`?"));
    }
    out
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// For serde's "unknown field `x`, expected one of `a`, `b`" (or "unknown variant"),
/// the expected name closest to `x`, when it is close enough to be a typo.
fn did_you_mean(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))?;
    let (given, expected) = rest.split_once('`')?;
    let best = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|cand| (edit_distance(given, cand), cand))
        .min()?;
    (best.0 <= (given.len() / 3).max(2)).then(|| best.1.to_owned())
}

/// Levenshtein distance (names are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct File {
        server: Server,
        #[serde(default)]
        items: Vec<Item>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Server {
        bind: String,
        #[serde(default)]
        port: u16,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        id: uuid::Uuid,
    }

    /// `nan` and `inf` are TOML floats, and no setting takes one: a duration made of
    /// one panics, and a clamp keeps `nan`. Refused wherever they are, by key path.
    #[test]
    fn a_float_that_is_not_finite_is_refused_by_its_key() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Timing {
            every_secs: f64,
            #[serde(default)]
            steps: Vec<f64>,
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct File {
            timing: Timing,
        }
        for (text, path) in [
            ("[timing]\nevery_secs = nan\n", "timing.every_secs"),
            ("[timing]\nevery_secs = inf\n", "timing.every_secs"),
            ("[timing]\nevery_secs = -inf\n", "timing.every_secs"),
            (
                "[timing]\nevery_secs = 1.5\nsteps = [0.5, nan]\n",
                "timing.steps[1]",
            ),
        ] {
            let err = from_toml::<File>(text).expect_err(text);
            assert!(
                err.starts_with(path) && err.contains("finite"),
                "{text}: {err}"
            );
        }
        let ok =
            from_toml::<File>("[timing]\nevery_secs = 0.25\nsteps = [1e300]\n").expect("finite");
        assert_eq!(ok.timing.every_secs, 0.25);
    }

    #[test]
    fn errors_name_the_key_the_place_and_the_fix() {
        let id = "5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
        let cases: &[(&str, String, &[&str])] = &[
            (
                "misspelt key",
                "[server]\nbnd = \"x\"\n".into(),
                &["server", "unknown field `bnd`", "did you mean `bind`?"],
            ),
            (
                "wrong type",
                "[server]\nbind = \"x\"\nport = \"80\"\n".into(),
                &["server.port", "line 3", "u16"],
            ),
            (
                "out of range",
                "[server]\nbind = \"x\"\nport = 70000\n".into(),
                &["server.port", "line 3"],
            ),
            (
                "missing key",
                "[server]\nport = 1\n".into(),
                &["server", "missing field `bind`"],
            ),
            (
                "bad UUID in a list",
                format!(
                    "[server]\nbind = \"x\"\n[[items]]\nid = \"{id}\"\n[[items]]\nid = \"nope\"\n"
                ),
                &["items[1].id", "line 6", "UUID"],
            ),
            ("not TOML", "[server\nbind = 1\n".into(), &["line 1"]),
        ];
        for (what, text, wants) in cases {
            let err = from_toml::<File>(text).expect_err(what);
            for want in *wants {
                assert!(err.contains(want), "{what}: {err:?} lacks {want:?}");
            }
        }
    }

    #[test]
    fn no_suggestion_for_a_name_unlike_any_key() {
        let err = from_toml::<File>("[server]\nbind = \"x\"\nzzzzzzzz = 1\n").expect_err("unknown");
        assert!(!err.contains("did you mean"), "{err}");
    }
}
