//! The request-ID value type: validation, generation and the per-message form.
//!
//! A [`RequestId`] is 1–128 bytes drawn from `A-Za-z0-9._:-`. It is stored inline
//! (no heap allocation) and is `Copy`, so binding it to a context, forwarding it in a
//! header or writing it to a log line never allocates.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The longest request ID accepted, in bytes.
pub const MAX_LEN: usize = 128;

/// Why a candidate request ID was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequestId {
    /// The value was empty.
    #[error("request id is empty")]
    Empty,
    /// The value was longer than [`MAX_LEN`] bytes.
    #[error("request id is {len} bytes, longer than the {MAX_LEN}-byte limit")]
    TooLong {
        /// Length of the refused value in bytes.
        len: usize,
    },
    /// The value held a byte outside `A-Za-z0-9._:-`.
    #[error("request id has a byte outside A-Za-z0-9._:- at offset {index}")]
    InvalidByte {
        /// Offset of the first offending byte.
        index: usize,
    },
}

/// Which UUID version freshly generated IDs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdVersion {
    /// Random (UUID v4): the default.
    #[default]
    V4,
    /// Time-ordered (UUID v7): sorts by creation time in logs and indexes.
    V7,
}

/// A validated request ID.
#[derive(Clone, Copy)]
pub struct RequestId {
    /// Number of meaningful bytes in `buf`; always 1..=MAX_LEN.
    len: u8,
    /// The bytes, inline so that copies are cheap and never allocate.
    buf: [u8; MAX_LEN],
}

/// Lookup table: `true` for every byte allowed in a request ID.
const ALLOWED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0usize;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b':' || c == b'-';
        b += 1;
    }
    table
};

impl RequestId {
    /// Validates `bytes` and, when valid, returns it as a request ID.
    pub fn parse(bytes: &[u8]) -> Result<Self, InvalidRequestId> {
        if bytes.is_empty() {
            return Err(InvalidRequestId::Empty);
        }
        if bytes.len() > MAX_LEN {
            return Err(InvalidRequestId::TooLong { len: bytes.len() });
        }
        if let Some(index) = bytes.iter().position(|&b| !ALLOWED[b as usize]) {
            return Err(InvalidRequestId::InvalidByte { index });
        }
        let mut buf = [0u8; MAX_LEN];
        buf[..bytes.len()].copy_from_slice(bytes);
        Ok(Self {
            len: bytes.len() as u8,
            buf,
        })
    }

    /// Generates a fresh ID of the given version.
    ///
    /// No system call is made per ID: `uuid`'s `fast-rng` draws from a per-thread
    /// generator seeded once, and v7 reads the clock through the vDSO. v7 IDs are
    /// ordered by millisecond; within one millisecond their order is random (RFC 9562
    /// allows this, and it avoids the shared counter `Uuid::now_v7` locks).
    pub fn generate(version: IdVersion) -> Self {
        // The random bits come from a per-thread wyrand (`fastrand`): a request ID
        // names a request for tracing, never guards anything (a client may send any
        // ID it likes), and `uuid`'s own generator (ChaCha) cost every request
        // without an ID about 160 instructions for its 16 bytes.
        let random = fastrand::u128(..).to_le_bytes();
        let uuid = match version {
            IdVersion::V4 => uuid::Builder::from_random_bytes(random).into_uuid(),
            IdVersion::V7 => {
                let millis = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let mut tail = [0u8; 10];
                tail.copy_from_slice(&random[6..]);
                uuid::Builder::from_unix_timestamp_millis(millis, &tail).into_uuid()
            }
        };
        Self::from_uuid(uuid)
    }

    /// The hyphenated lowercase form of `uuid` as a request ID.
    pub fn from_uuid(uuid: Uuid) -> Self {
        let mut buf = [0u8; MAX_LEN];
        let len = uuid.hyphenated().encode_lower(&mut buf[..36]).len();
        Self {
            len: len as u8,
            buf,
        }
    }

    /// The per-message form `{session}-msg-{8 hex}` used for WebSocket messages.
    ///
    /// When the session ID is too long for the suffix to fit, its tail is cut so the
    /// result stays within [`MAX_LEN`]; the suffix is never cut.
    pub fn message_id(&self, sequence: u32) -> Self {
        const SUFFIX_LEN: usize = "-msg-".len() + 8;
        let keep = self.as_bytes().len().min(MAX_LEN - SUFFIX_LEN);
        let mut buf = [0u8; MAX_LEN];
        buf[..keep].copy_from_slice(&self.as_bytes()[..keep]);
        buf[keep..keep + 5].copy_from_slice(b"-msg-");
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (i, slot) in buf[keep + 5..keep + SUFFIX_LEN].iter_mut().enumerate() {
            let shift = 28 - 4 * i as u32;
            *slot = HEX[((sequence >> shift) & 0xf) as usize];
        }
        Self {
            len: (keep + SUFFIX_LEN) as u8,
            buf,
        }
    }

    /// An ID from bytes already known to form a valid one (1..=[`MAX_LEN`] bytes of
    /// the alphabet), such as those the context slot copied out of an ID: no check.
    pub(crate) fn from_valid_bytes(bytes: &[u8]) -> Self {
        debug_assert!(Self::parse(bytes).is_ok());
        let mut buf = [0u8; MAX_LEN];
        let len = bytes.len().min(MAX_LEN);
        buf[..len].copy_from_slice(&bytes[..len]);
        Self {
            len: len as u8,
            buf,
        }
    }

    /// The ID's bytes (always ASCII).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    /// The ID as a string slice.
    pub fn as_str(&self) -> &str {
        // Every byte was checked against `ALLOWED` (or written from a UUID encoder), so
        // the bytes are ASCII; the fallback can never be taken.
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }
}

impl PartialEq for RequestId {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for RequestId {}

impl std::hash::Hash for RequestId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RequestId").field(&self.as_str()).finish()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AsRef<str> for RequestId {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl FromStr for RequestId {
    type Err = InvalidRequestId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s.as_bytes())
    }
}

impl Serialize for RequestId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RequestId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(s.as_bytes()).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_table() {
        let long_ok = "a".repeat(128);
        let too_long = "a".repeat(129);
        let cases: &[(&[u8], Result<(), InvalidRequestId>)] = &[
            (b"", Err(InvalidRequestId::Empty)),
            (
                too_long.as_bytes(),
                Err(InvalidRequestId::TooLong { len: 129 }),
            ),
            (long_ok.as_bytes(), Ok(())),
            (
                b"abc\r\ndef",
                Err(InvalidRequestId::InvalidByte { index: 3 }),
            ),
            (b"abc\n", Err(InvalidRequestId::InvalidByte { index: 3 })),
            (
                b"has space",
                Err(InvalidRequestId::InvalidByte { index: 3 }),
            ),
            (
                "caf\u{e9}".as_bytes(),
                Err(InvalidRequestId::InvalidByte { index: 3 }),
            ),
            (b"100%", Err(InvalidRequestId::InvalidByte { index: 3 })),
            (b"a\0b", Err(InvalidRequestId::InvalidByte { index: 1 })),
            (b"a/b", Err(InvalidRequestId::InvalidByte { index: 1 })),
            (
                b"\"quoted\"",
                Err(InvalidRequestId::InvalidByte { index: 0 }),
            ),
            (b"550e8400-e29b-41d4-a716-446655440000", Ok(())),
            (b"01ARZ3NDEKTSV4RRFFQ69G5FAV", Ok(())),
            (b"deadbeefcafebabe0123456789abcdef", Ok(())),
            (b"sess.1:part_2-msg-0000000a", Ok(())),
            (b"x", Ok(())),
        ];
        for (input, expected) in cases {
            let got = RequestId::parse(input).map(|id| {
                assert_eq!(id.as_bytes(), *input);
            });
            assert_eq!(&got, expected, "input {:?}", String::from_utf8_lossy(input));
        }
    }

    /// Generated IDs are UUIDs of the version asked for, of RFC 9562's variant,
    /// distinct across many and across threads (each thread has its own generator).
    #[test]
    fn generated_ids_are_valid_uuids() {
        for version in [IdVersion::V4, IdVersion::V7] {
            let want = match version {
                IdVersion::V4 => 4,
                IdVersion::V7 => 7,
            };
            let made = move || {
                (0..10_000)
                    .map(|_| RequestId::generate(version))
                    .collect::<Vec<_>>()
            };
            let other = std::thread::spawn(made).join().expect("thread");
            let mut seen = std::collections::HashSet::new();
            for a in made().into_iter().chain(other) {
                let parsed = Uuid::parse_str(a.as_str()).expect("uuid text");
                assert_eq!(parsed.get_version_num(), want, "{a}");
                assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122, "{a}");
                assert_eq!(RequestId::parse(a.as_bytes()), Ok(a));
                assert!(seen.insert(a), "{a} twice");
            }
        }
    }

    #[test]
    fn message_ids() {
        let session: RequestId = "sess".parse().expect("valid");
        assert_eq!(session.message_id(10).as_str(), "sess-msg-0000000a");
        assert_eq!(session.message_id(u32::MAX).as_str(), "sess-msg-ffffffff");
        let long: RequestId = "s".repeat(128).parse().expect("valid");
        let msg = long.message_id(1);
        assert_eq!(msg.as_bytes().len(), 128);
        assert!(msg.as_str().ends_with("-msg-00000001"));
        assert!(RequestId::parse(msg.as_bytes()).is_ok());
    }

    #[test]
    fn serde_round_trip_and_refusal() {
        let id = RequestId::generate(IdVersion::V4);
        let json = serde_json::to_string(&id).expect("serialize");
        let back: RequestId = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, id);
        assert!(serde_json::from_str::<RequestId>("\"bad value\"").is_err());
    }

    proptest::proptest! {
        #[test]
        fn parse_accepts_exactly_the_alphabet(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..160)) {
            let valid = !bytes.is_empty()
                && bytes.len() <= MAX_LEN
                && bytes.iter().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(b));
            let parsed = RequestId::parse(&bytes);
            proptest::prop_assert_eq!(parsed.is_ok(), valid);
            if let Ok(id) = parsed {
                proptest::prop_assert_eq!(id.as_bytes(), &bytes[..]);
            }
        }
    }
}
