//! Hand-written HTTP/1.1 for the data plane, split as hyper's `proto/h1` is: pure
//! decoding ([`parse`], [`chunked`]), encoding ([`encode`]) and typed errors mapped to
//! status codes in one place ([`error`]); [`stream`] strings them together into the
//! worker's view of a whole request stream, for tests and fuzzing. Nothing here
//! touches a socket.

pub mod chunked;
pub mod encode;
pub mod error;
pub mod parse;
pub mod stream;

#[cfg(test)]
mod tests;
