//! Vfolder paths on the wire. Linux names are bytes; the original reads them with
//! Python's `surrogateescape` (PEP 383): each byte that is not part of valid UTF-8
//! is the lone surrogate `U+DC80`-`U+DCFF` of that byte, and the rest is the name's
//! text. A listing writes names so ([`write_json`]), and a request names an entry
//! the same way ([`WirePath`]): a name a user made from a shell (`printf 'a\xff'`)
//! is listed, and can then be downloaded, renamed, moved or deleted by the name
//! listed. JSON carries such a surrogate only as an escape (`\udcff`); strict
//! parsers refuse it, so a [`WirePath`] is read as bytes (serde_json gives a lone
//! surrogate as its WTF-8 form) and decoded here.
//!
//! A session token carries a path as its text when it is UTF-8, and otherwise as
//! the array of its bytes ([`WirePath::to_claim`]): only this proxy reads its
//! tokens, and a `serde_json::Value` cannot hold a lone surrogate.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde_json::Value;

/// A path (or a single name) of a request, as the bytes it names.
#[derive(Clone, PartialEq, Eq)]
pub struct WirePath(OsString);

impl WirePath {
    /// The vfolder itself (`.`), the default of a listing's `relpath`.
    pub fn dot() -> Self {
        Self(".".into())
    }

    /// The bytes this path names.
    pub fn as_os_str(&self) -> &OsStr {
        &self.0
    }

    /// The path as a token's claim: its text when it is UTF-8 (every token made
    /// before non-UTF-8 names could be requested has that form), or else the array
    /// of its bytes.
    pub fn to_claim(&self) -> Value {
        match self.0.to_str() {
            Some(text) => Value::String(text.to_owned()),
            None => Value::Array(self.0.as_bytes().iter().map(|&b| b.into()).collect()),
        }
    }

    /// A path read back from a token's claim ([`WirePath::to_claim`]'s forms).
    pub fn from_claim(v: &Value) -> Option<Self> {
        match v {
            Value::String(text) => Some(Self(text.into())),
            Value::Array(bytes) => bytes
                .iter()
                .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect::<Option<Vec<u8>>>()
                .map(|b| Self(OsString::from_vec(b))),
            _ => None,
        }
    }
}

impl AsRef<OsStr> for WirePath {
    fn as_ref(&self) -> &OsStr {
        &self.0
    }
}

impl From<&str> for WirePath {
    fn from(text: &str) -> Self {
        Self(text.into())
    }
}

/// The path as a listing writes it, without the quotes: a log line names it
/// losslessly.
impl fmt::Display for WirePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = Vec::with_capacity(self.0.len() + 2);
        write_json(&mut out, self.0.as_bytes());
        let inner = out.get(1..out.len().saturating_sub(1)).unwrap_or(&[]);
        f.write_str(&String::from_utf8_lossy(inner))
    }
}

impl fmt::Debug for WirePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

impl<'de> serde::Deserialize<'de> for WirePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // As bytes: serde_json then hands over a lone surrogate (as WTF-8) where
        // reading a `String` refuses the whole request.
        d.deserialize_bytes(PathVisitor)
    }
}

struct PathVisitor;

impl Visitor<'_> for PathVisitor {
    type Value = WirePath;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a path (a JSON string)")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<WirePath, E> {
        Ok(WirePath(text.into()))
    }

    fn visit_bytes<E: de::Error>(self, wtf8: &[u8]) -> Result<WirePath, E> {
        decode(wtf8).map(WirePath).map_err(E::custom)
    }
}

/// One path or a list of them (`mkdir`'s `relpath` takes both).
pub enum OneOrMany {
    /// A single path.
    One(WirePath),
    /// A list of paths.
    Many(Vec<WirePath>),
}

impl OneOrMany {
    /// The paths, one or many.
    pub fn into_vec(self) -> Vec<WirePath> {
        match self {
            Self::One(p) => vec![p],
            Self::Many(v) => v,
        }
    }
}

impl<'de> serde::Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // serde_json reads a string as bytes and an array as a sequence here.
        d.deserialize_bytes(OneOrManyVisitor)
    }
}

struct OneOrManyVisitor;

impl<'de> Visitor<'de> for OneOrManyVisitor {
    type Value = OneOrMany;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a path or a list of paths")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<OneOrMany, E> {
        PathVisitor.visit_str(text).map(OneOrMany::One)
    }

    fn visit_bytes<E: de::Error>(self, wtf8: &[u8]) -> Result<OneOrMany, E> {
        PathVisitor.visit_bytes(wtf8).map(OneOrMany::One)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
        let mut all = Vec::new();
        while let Some(p) = seq.next_element::<WirePath>()? {
            all.push(p);
        }
        Ok(OneOrMany::Many(all))
    }
}

/// Why a request's string does not name bytes.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A raw byte that is not UTF-8 inside the JSON text (JSON is UTF-8).
    #[error("a path is not UTF-8 JSON text")]
    NotText,
    /// A lone surrogate outside `\udc80`-`\udcff`: it stands for no byte
    /// (Python's `os.fsencode` refuses it too).
    #[error(
        "a path holds the lone surrogate \\u{0:04x}, which names no byte (only \\udc80-\\udcff do)"
    )]
    Surrogate(u32),
}

/// The bytes a string names: `wtf8` is the string as serde_json gives it when read
/// as bytes (its text as UTF-8, each lone surrogate escape as the three bytes of
/// WTF-8). `\udc80`-`\udcff` become the bytes `0x80`-`0xff`.
pub fn decode(wtf8: &[u8]) -> Result<OsString, DecodeError> {
    let mut out = Vec::with_capacity(wtf8.len());
    let mut rest = wtf8;
    loop {
        // A surrogate's three bytes (`ED A0..BF 80..BF`) never occur in UTF-8.
        let at = rest.windows(3).position(|w| {
            w[0] == 0xED && (0xA0..=0xBF).contains(&w[1]) && (0x80..=0xBF).contains(&w[2])
        });
        let text = rest.get(..at.unwrap_or(rest.len())).unwrap_or(rest);
        std::str::from_utf8(text).map_err(|_| DecodeError::NotText)?;
        out.extend_from_slice(text);
        let Some((&[a, b, c], next)) = at
            .and_then(|i| rest.get(i..))
            .and_then(|s| s.split_first_chunk::<3>())
        else {
            break;
        };
        let unit = (u32::from(a & 0x0F) << 12) | (u32::from(b & 0x3F) << 6) | u32::from(c & 0x3F);
        match unit {
            0xDC80..=0xDCFF => out.push((unit - 0xDC00) as u8),
            _ => return Err(DecodeError::Surrogate(unit)),
        }
        rest = next;
    }
    Ok(OsString::from_vec(out))
}

/// Writes a name (or a symlink's target) as a JSON string the way the original's
/// answer has it: each byte that is not part of valid UTF-8 is `\udcXX`, and the
/// rest is the name's text, escaped as serde_json escapes it. JSON parsers of
/// Python and JavaScript read these escapes (the manager and the web UI); strict
/// ones refuse them.
pub fn write_json(out: &mut Vec<u8>, name: &[u8]) {
    use std::io::Write as _;
    out.push(b'"');
    for chunk in name.utf8_chunks() {
        let text = chunk.valid();
        if !text.is_empty() {
            // serde_json's escaping of the text, its quotes left off (serializing a
            // `str` cannot fail).
            let quoted = serde_json::to_string(text).unwrap_or_default();
            out.extend_from_slice(
                quoted
                    .as_bytes()
                    .get(1..quoted.len().saturating_sub(1))
                    .unwrap_or(&[]),
            );
        }
        for b in chunk.invalid() {
            // Writing to a `Vec` cannot fail.
            let _ = write!(out, "\\udc{b:02x}");
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Result<WirePath, String> {
        serde_json::from_str::<WirePath>(json).map_err(|e| e.to_string())
    }

    fn bytes(p: &WirePath) -> &[u8] {
        p.as_os_str().as_bytes()
    }

    #[test]
    fn escapes_name_the_bytes_a_listing_wrote() {
        // Each case: the JSON a client sends, the bytes it names.
        let cases: &[(&str, &[u8])] = &[
            (r#""plain.txt""#, b"plain.txt"),
            (r#""a\udcff.txt""#, b"a\xff.txt"),
            (r#""\udc80\udcff""#, b"\x80\xff"),
            (r#""d\u00e9j\u00e0/\udcfe""#, b"d\xc3\xa9j\xc3\xa0/\xfe"),
            // Escaped bytes that happen to make UTF-8 name that text (as fsencode).
            (r#""\udcc3\udca9""#, "é".as_bytes()),
            // A surrogate pair is one character, not two bytes.
            (r#""\ud83d\ude00""#, "😀".as_bytes()),
            (r#""a\\udcff""#, br"a\udcff"),
        ];
        for (json, want) in cases {
            let got = read(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(bytes(&got), *want, "{json}");
        }
    }

    #[test]
    fn what_names_no_byte_is_refused() {
        for json in [
            r#""\udc41""#, // ASCII is never escaped
            r#""\udc00""#,
            r#""a\ud800b""#, // a lone high surrogate
            r#""\ud83d""#,
            r#""\ude00""#,
            r#"42"#,
            r#"null"#,
            r#"["a"]"#,
            r#"{"a":1}"#,
        ] {
            assert!(read(json).is_err(), "{json} was taken");
        }
        // Raw bytes that are not UTF-8 inside the JSON text.
        assert!(serde_json::from_slice::<WirePath>(b"\"a\xff\"").is_err());
        assert_eq!(decode(b"a\xff"), Err(DecodeError::NotText));
    }

    #[test]
    fn a_listed_name_reads_back_as_itself() {
        let names: &[&[u8]] = &[
            b"a\xff.txt",
            b"\xfe\xff",
            "é\x01\"\\".as_bytes(),
            b"\xc3",
            b"x\xed\xa0\x80",
        ];
        for name in names {
            let mut json = Vec::new();
            write_json(&mut json, name);
            let back: WirePath = serde_json::from_slice(&json).expect("reads");
            assert_eq!(bytes(&back), *name, "{}", String::from_utf8_lossy(&json));
            let claim = back.to_claim();
            assert_eq!(WirePath::from_claim(&claim).as_ref(), Some(&back));
        }
        assert_eq!(WirePath::from("a").to_claim(), Value::String("a".into()));
        assert!(WirePath::from_claim(&serde_json::json!([256])).is_none());
        assert!(WirePath::from_claim(&serde_json::json!(1)).is_none());
        assert_eq!(
            WirePath(OsString::from_vec(b"a\xff".to_vec())).to_string(),
            "a\\udcff"
        );
    }

    #[test]
    fn one_or_many_reads_either() {
        let one: OneOrMany = serde_json::from_str(r#""a\udcff""#).expect("one");
        assert_eq!(one.into_vec().len(), 1);
        let many: OneOrMany = serde_json::from_str(r#"["a", "b\udcfe"]"#).expect("many");
        let v = many.into_vec();
        assert_eq!(bytes(&v[1]), b"b\xfe");
        assert!(serde_json::from_str::<OneOrMany>(r#"["\udc01"]"#).is_err());
        assert!(serde_json::from_str::<OneOrMany>("3").is_err());
    }
}
