//! The request-ID header policy: which headers carry the ID and what to do when it is
//! absent or invalid.
//!
//! The functions here work on plain `(name, value)` byte pairs so the hand-written
//! HTTP parser of the data plane and the `http` crate types of the tokio services share
//! one implementation.

use serde::{Deserialize, Serialize};

use crate::request_id::{IdVersion, RequestId};

/// The primary header, forwarded and echoed under this name.
pub const PRIMARY_HEADER: &str = "X-Backend-Request-ID";

/// Headers accepted on input, in order of preference (the primary one first).
pub const INPUT_HEADERS: [&str; 3] = [PRIMARY_HEADER, "X-BackendAI-RequestID", "X-Request-ID"];

/// What a component does when a request arrives without a usable ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdPolicy {
    /// Use the ID when a valid one is present; otherwise the request has none (the
    /// coordinator: the manager's ID, or NULL).
    ExtractOnly,
    /// Use the ID when a valid one is present; otherwise generate one (worker and
    /// storage-proxy).
    #[default]
    GenerateIfMissing,
}

/// What the request carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extracted {
    /// A valid ID in one of [`INPUT_HEADERS`].
    Valid(RequestId),
    /// A header was present but its value is not a valid ID. The raw value is
    /// deliberately not kept: it is never logged or forwarded.
    Invalid,
    /// None of the headers was present.
    Absent,
}

/// Where the ID of a request came from, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client sent a valid ID.
    Preserved,
    /// No ID was sent; one was generated.
    Generated,
    /// An invalid ID was sent; a generated one replaced it.
    Replaced,
    /// No usable ID and the policy does not generate.
    None,
}

/// Finds the request ID among `headers` (names compared case-insensitively).
///
/// The primary header wins over the aliases. When the preferred header holds an invalid
/// value, a valid value in a later alias is still used.
pub fn extract<'a, I>(headers: I) -> Extracted
where
    I: IntoIterator<Item = (&'a [u8], &'a [u8])>,
{
    // Best valid candidate per header rank, plus whether any candidate was invalid.
    let mut best: [Option<RequestId>; 3] = [None; 3];
    let mut saw_any = false;
    for (name, value) in headers {
        let Some(rank) = header_rank(name) else {
            continue;
        };
        saw_any = true;
        if best[rank].is_none() {
            if let Ok(id) = RequestId::parse(trim_ows(value)) {
                best[rank] = Some(id);
            }
        }
    }
    match best.into_iter().flatten().next() {
        Some(id) => Extracted::Valid(id),
        None if saw_any => Extracted::Invalid,
        None => Extracted::Absent,
    }
}

/// The rank of `name` among [`INPUT_HEADERS`], if it is one of them.
pub fn header_rank(name: &[u8]) -> Option<usize> {
    INPUT_HEADERS
        .iter()
        .position(|h| h.as_bytes().eq_ignore_ascii_case(name))
}

/// Applies `policy` to what was extracted.
pub fn resolve(
    policy: IdPolicy,
    extracted: Extracted,
    version: IdVersion,
) -> (Option<RequestId>, Origin) {
    match (extracted, policy) {
        (Extracted::Valid(id), _) => (Some(id), Origin::Preserved),
        (Extracted::Absent, IdPolicy::GenerateIfMissing) => {
            (Some(RequestId::generate(version)), Origin::Generated)
        }
        (Extracted::Invalid, IdPolicy::GenerateIfMissing) => {
            (Some(RequestId::generate(version)), Origin::Replaced)
        }
        (_, IdPolicy::ExtractOnly) => (None, Origin::None),
    }
}

/// Trims HTTP optional white space (SP / HTAB) from both ends.
fn trim_ows(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |i| i + 1);
    &value[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(headers: &[(&str, &str)]) -> Extracted {
        extract(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    #[test]
    fn extraction_table() {
        let id = |s: &str| Extracted::Valid(s.parse().expect("valid"));
        let cases: &[(&[(&str, &str)], Extracted)] = &[
            (&[], Extracted::Absent),
            (&[("host", "x")], Extracted::Absent),
            (&[("x-backend-request-id", "abc")], id("abc")),
            (&[("X-BACKEND-REQUEST-ID", " abc ")], id("abc")),
            (&[("x-backendai-requestid", "alias1")], id("alias1")),
            (&[("x-request-id", "alias2")], id("alias2")),
            (
                &[
                    ("x-request-id", "alias2"),
                    ("x-backend-request-id", "primary"),
                ],
                id("primary"),
            ),
            (&[("x-backend-request-id", "bad value")], Extracted::Invalid),
            (&[("x-backend-request-id", "")], Extracted::Invalid),
            (
                &[("x-backend-request-id", "bad%"), ("x-request-id", "good")],
                id("good"),
            ),
        ];
        for (headers, want) in cases {
            assert_eq!(ex(headers), *want, "{headers:?}");
        }
    }

    #[test]
    fn policy_table() {
        let v = IdVersion::V4;
        let valid: RequestId = "keep-me".parse().expect("valid");
        let (id, origin) = resolve(IdPolicy::GenerateIfMissing, Extracted::Valid(valid), v);
        assert_eq!((id, origin), (Some(valid), Origin::Preserved));
        let (id, origin) = resolve(IdPolicy::ExtractOnly, Extracted::Valid(valid), v);
        assert_eq!((id, origin), (Some(valid), Origin::Preserved));
        let (id, origin) = resolve(IdPolicy::GenerateIfMissing, Extracted::Absent, v);
        assert!(id.is_some());
        assert_eq!(origin, Origin::Generated);
        let (id, origin) = resolve(IdPolicy::GenerateIfMissing, Extracted::Invalid, v);
        assert!(id.is_some());
        assert_eq!(origin, Origin::Replaced);
        assert_eq!(
            resolve(IdPolicy::ExtractOnly, Extracted::Absent, v),
            (None, Origin::None)
        );
        assert_eq!(
            resolve(IdPolicy::ExtractOnly, Extracted::Invalid, v),
            (None, Origin::None)
        );
    }
}
