//! Secrets in config files, given where an operator keeps them: inline (`key =
//! "…"`), in a file (`key = { file = "/run/secrets/api" }`, a Kubernetes or Docker
//! secret, a file only its owner reads) or in an environment variable (`key = { env
//! = "APPPROXY_API_SECRET" }`). Read once, when the file is parsed: the field holds
//! the secret itself, so nothing downstream knows where it came from.
//!
//! Used with serde's `deserialize_with` on the secret fields of every binary's
//! config (API and JWT keys, permit and session keys, database and Redis URLs with
//! passwords in them). A file must be named by an absolute path (a secret read from
//! wherever the service happened to start would be a surprise), be a regular file
//! (a FIFO or a device would block the start or never end) of at most
//! [`MAX_SECRET_FILE`] bytes, and hold UTF-8; one trailing line break (`echo`'s,
//! an editor's) is not part of the secret. A variable must be set and hold UTF-8.

use std::fmt;
use std::io::Read as _;
use std::path::Path;

use serde::de::{self, Deserializer, MapAccess, Visitor};

/// The longest secret file read: keys and URLs are far shorter, and a path naming
/// something large by mistake must not be read whole.
pub const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Reads a secret given inline, as `{ file = "…" }` or as `{ env = "…" }`.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_any(SecretVisitor)
}

/// [`deserialize`] for an optional setting (with `#[serde(default)]`: absent is
/// `None`).
pub fn deserialize_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    d.deserialize_any(SecretVisitor).map(Some)
}

struct SecretVisitor;

impl<'de> Visitor<'de> for SecretVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"a string, { file = "/absolute/path" } or { env = "VARIABLE" }"#)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<String, A::Error> {
        let mut source: Option<(String, String)> = None;
        while let Some(key) = map.next_key::<String>()? {
            if key != "file" && key != "env" {
                return Err(de::Error::unknown_field(&key, &["file", "env"]));
            }
            let value: String = map.next_value()?;
            if source.is_some() {
                return Err(de::Error::custom("give one of `file` and `env`, not both"));
            }
            source = Some((key, value));
        }
        match source {
            Some((kind, file)) if kind == "file" => from_file(Path::new(&file)),
            Some((_, var)) => from_env(&var),
            None => {
                Err("an empty table: give `file` or `env`, or the secret as a string".to_owned())
            }
        }
        .map_err(de::Error::custom)
    }
}

/// The secret held in the file at `path` (rules in the module's header).
pub fn from_file(path: &Path) -> Result<String, String> {
    let shown = path.display();
    if !path.is_absolute() {
        return Err(format!(
            "secret file {shown}: give an absolute path (a relative one would be read \
             from wherever the service started)"
        ));
    }
    // Opened without waiting (a FIFO put there opens at once instead of blocking
    // the start until a writer comes), then checked as opened: what the path named
    // a moment before does not count. Symlinks are followed: a Kubernetes secret
    // volume is made of them.
    let file = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(path)
    }
    .map_err(|e| format!("secret file {shown}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("secret file {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("secret file {shown}: not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("secret file {shown}: {e}"))?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(format!(
            "secret file {shown}: longer than {MAX_SECRET_FILE} bytes; no key or URL is"
        ));
    }
    let text =
        String::from_utf8(bytes).map_err(|_| format!("secret file {shown}: not UTF-8 text"))?;
    Ok(without_line_break(text))
}

/// The secret held in the environment variable `var`.
pub fn from_env(var: &str) -> Result<String, String> {
    match std::env::var(var) {
        Ok(v) => Ok(v),
        Err(std::env::VarError::NotPresent) => {
            Err(format!("environment variable {var} is not set"))
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(format!("environment variable {var} is not UTF-8 text"))
        }
    }
}

/// A credential derived from `key` for `name`: the lowercase hex of
/// HMAC-SHA256(`key`, `name`), as `printf %s NAME | openssl dgst -sha256 -hmac KEY`
/// prints it. The coordinator derives each worker's own credential from its
/// `[secrets] worker_key` and the worker's authority, so it holds one key for a
/// fleet and a worker's credential is good for that worker only.
pub fn derived(key: &str, name: &str) -> String {
    use hmac::Mac as _;
    use std::fmt::Write as _;
    // HMAC takes keys of any length: this cannot fail.
    let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(key.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(name.as_bytes());
    let mut hex = String::with_capacity(64);
    for b in mac.finalize().into_bytes() {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// `text` without one trailing `\n` or `\r\n`.
fn without_line_break(mut text: String) -> String {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Secrets {
        #[serde(deserialize_with = "super::deserialize")]
        key: String,
        #[serde(default, deserialize_with = "super::deserialize_opt")]
        other: Option<String>,
    }

    fn parse(text: &str) -> Result<Secrets, String> {
        crate::config::from_toml(text)
    }

    #[test]
    fn a_secret_is_read_inline_from_a_file_or_from_the_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cases = [
            ("plain", "plain"),
            ("with newline\n", "with newline"),
            ("crlf\r\n", "crlf"),
            ("two\n\n", "two\n"),
            (" spaced ", " spaced "),
        ];
        for (i, (content, want)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("s{i}"));
            std::fs::write(&path, content).expect("write");
            let got = parse(&format!(
                "key = {{ file = {:?} }}",
                path.display().to_string()
            ))
            .expect("file");
            assert_eq!(got.key, *want, "{content:?}");
            assert_eq!(got.other, None);
        }
        assert_eq!(parse(r#"key = "inline""#).expect("inline").key, "inline");
        // A variable only this test sets.
        std::env::set_var("APPPROXY_SECRET_TEST_A", "from-env");
        let got = parse(
            r#"key = { env = "APPPROXY_SECRET_TEST_A" }
other = "o""#,
        )
        .expect("env");
        assert_eq!(
            (got.key.as_str(), got.other.as_deref()),
            ("from-env", Some("o"))
        );
    }

    #[test]
    fn a_derived_credential_is_hmac_sha256_in_lowercase_hex() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            super::derived("Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_ne!(
            super::derived("k", "worker-1"),
            super::derived("k", "worker-2")
        );
    }

    #[test]
    fn a_secret_that_cannot_be_read_is_refused_naming_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; super::MAX_SECRET_FILE as usize + 1]).expect("write");
        let not_utf8 = dir.path().join("bin");
        std::fs::write(&not_utf8, [0xff, 0xfe]).expect("write");
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo")
            .success());
        let missing = dir.path().join("missing");
        for (text, want) in [
            (
                format!("key = {{ file = {:?} }}", big.display().to_string()),
                "longer than 65536 bytes",
            ),
            (
                format!("key = {{ file = {:?} }}", not_utf8.display().to_string()),
                "not UTF-8",
            ),
            (
                format!("key = {{ file = {:?} }}", fifo.display().to_string()),
                "not a regular file",
            ),
            (
                format!("key = {{ file = {:?} }}", dir.path().display().to_string()),
                "not a regular file",
            ),
            (
                format!("key = {{ file = {:?} }}", missing.display().to_string()),
                "No such file",
            ),
            (
                r#"key = { file = "relative/key" }"#.to_owned(),
                "absolute path",
            ),
            (
                r#"key = { env = "APPPROXY_SECRET_TEST_UNSET" }"#.to_owned(),
                "is not set",
            ),
            (r#"key = { file = "/a", env = "B" }"#.to_owned(), "not both"),
            (
                r#"key = { path = "/a" }"#.to_owned(),
                "unknown field `path`",
            ),
            ("key = {}".to_owned(), "an empty table"),
            ("key = 3".to_owned(), "a string, { file"),
        ] {
            let err = parse(&text).expect_err(&text);
            assert!(err.contains(want), "{text}: {err}");
            assert!(err.contains("key"), "{text}: the key is named: {err}");
        }
    }
}
