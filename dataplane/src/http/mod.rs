//! Hand-written HTTP/1.1 for the data plane, split as hyper's `proto/h1` is: pure
//! decoding ([`parse`], [`chunked`]), encoding ([`encode`]) and typed errors mapped to
//! status codes in one place ([`error`]). Nothing here touches a socket.

pub mod chunked;
pub mod encode;
pub mod error;
pub mod parse;

#[cfg(test)]
mod tests;
