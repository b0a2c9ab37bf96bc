//! How an exchange fails, and the one rule for retrying it (after pingora's
//! `ErrorSource` and retry-on-reused).
//!
//! A failure says who is at fault ([`Fault`], from the [`ProxyError`]) and whether
//! retrying it could help at all ([`Retry`]): only a connection that died — a write
//! refused, or closed before a response head — and only if it was a *reused* pooled
//! connection, which may have been closed by the app while idle. [`may_retry`] then
//! decides with what the attempt knows: the request must still be whole in the client
//! buffer (an idempotent request without a body, [`replayable`]) and no response byte
//! may have arrived. A retry goes once, on a fresh connection to the same upstream,
//! and is not counted against that upstream's health.

use crate::http::error::{Fault, ProxyError};
use crate::http::parse::Method;

/// How much of the request the client buffer still holds after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Left {
    /// The head (and any body) is untouched.
    Whole,
    /// Head and body were consumed.
    Nothing,
    /// Part of the body was read: the stream position is lost.
    Partial,
}

/// How an exchange failed.
pub(crate) enum Failure {
    /// Nothing was sent to the client yet: answer with this error.
    Answer(ProxyError, Left),
    /// The response had started (or the client is gone): close without answering.
    Abort(String),
}

/// What a failure itself says about retrying (pingora's `RetryType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Retrying cannot help or is not safe (a timeout: the app may be working on it).
    Never,
    /// The connection died: retry if it was a reused one.
    IfReused,
}

/// What one attempt on an upstream connection knows when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attempt {
    /// The connection came from the pool (a fresh one that dies is the app's answer).
    pub reused: bool,
    /// The whole request can be sent again ([`replayable`]).
    pub replayable: bool,
    /// Some of the response arrived.
    pub response_started: bool,
}

/// Whether a request can be sent again after a failed attempt: idempotent, and
/// without a body (its head is kept in the client buffer until the response head
/// arrived; a body is streamed and gone).
pub(crate) fn replayable(method: Method, has_body: bool) -> bool {
    method.is_idempotent() && !has_body
}

/// The retry rule: a failure on a reused upstream connection that died before any
/// response byte, for a request that can be sent again, is retried (once: the new
/// attempt is on a fresh connection, which the rule never retries).
pub(crate) fn may_retry(fault: Fault, retry: Retry, attempt: Attempt) -> bool {
    fault == Fault::Upstream
        && retry == Retry::IfReused
        && attempt.reused
        && attempt.replayable
        && !attempt.response_started
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_rule_table() {
        use Fault::{Client, Internal, Upstream};
        use Method::{Delete, Get, Post, Put};
        use Retry::{IfReused, Never};
        // (fault, what the failure says, reused, response bytes, method, body) → retry
        #[rustfmt::skip]
        let table = [
            // A dead pooled connection, nothing answered: replay what can be replayed.
            (Upstream, IfReused, true,  false, Get,    false, true),
            (Upstream, IfReused, true,  false, Put,    false, true),
            (Upstream, IfReused, true,  false, Delete, false, true),
            (Upstream, IfReused, true,  false, Post,   false, false),
            (Upstream, IfReused, true,  false, Get,    true,  false),
            (Upstream, IfReused, true,  false, Put,    true,  false),
            // A fresh connection that dies is the app's answer.
            (Upstream, IfReused, false, false, Get,    false, false),
            (Upstream, IfReused, false, false, Post,   false, false),
            // Part of a response arrived: never sent twice.
            (Upstream, IfReused, true,  true,  Get,    false, false),
            (Upstream, IfReused, false, true,  Get,    false, false),
            // Timeouts and malformed responses are never retried.
            (Upstream, Never,    true,  false, Get,    false, false),
            (Upstream, Never,    false, false, Get,    false, false),
            // Not the upstream's doing: a retry would fail the same way.
            (Client,   IfReused, true,  false, Get,    false, false),
            (Internal, IfReused, true,  false, Get,    false, false),
            (Client,   Never,    true,  false, Get,    false, false),
        ];
        for (i, (fault, retry, reused, response_started, method, body, want)) in
            table.into_iter().enumerate()
        {
            let attempt = Attempt {
                reused,
                replayable: replayable(method, body),
                response_started,
            };
            assert_eq!(may_retry(fault, retry, attempt), want, "row {i}");
        }
    }
}
