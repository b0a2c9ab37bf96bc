//! How an exchange fails, and the one rule for retrying it (after pingora's
//! `ErrorSource` and retry-on-reused).
//!
//! A failure says who is at fault ([`Fault`], from the [`ProxyError`]) and whether
//! retrying it could help at all ([`Retry`]): a connection that died — a write
//! refused, or closed before a response head — only if it was a *reused* pooled
//! connection, which may have been closed by the app while idle; and a request the
//! app says it never processed (an HTTP/2 stream it refused, or past its GOAWAY).
//! [`may_retry`] then decides with what the attempt knows: the request must still be
//! whole (without a body, and idempotent unless the app said it never processed it)
//! and no response byte may have arrived. A retry goes once, and is not counted
//! against the upstream's health.

use std::net::SocketAddr;

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
    /// No answer can be sent (the client is gone, or an interim head went out):
    /// close without answering.
    Abort(String),
    /// The app's answer was relayed part way, then broke off: close without the
    /// rest, the access line telling what went.
    Cut(Cut),
}

impl Failure {
    /// This failure as the drain's deadline leaves it: once a core cuts what is still
    /// open ([`crate::core::Core::cut_off`]), a failure is the deadline's, whatever
    /// wait it broke (the app's answer, the client's body). A request no app was
    /// given (`app_tried` false) is told 503 (another worker may serve it); one an
    /// app was given, or was being given, 504 (`drain_deadline`: the app may have
    /// acted on it, and a 503 invites sending a POST again); one cut part way says
    /// why.
    pub(crate) fn at_deadline(self, app_tried: bool) -> Self {
        match self {
            Failure::Answer(_, left) if app_tried => {
                Failure::Answer(ProxyError::CutAtDeadline, left)
            }
            Failure::Answer(_, left) => Failure::Answer(ProxyError::Draining, left),
            Failure::Abort(_) => Failure::Abort(DRAIN_DEADLINE.into()),
            Failure::Cut(cut) => Failure::Cut(Cut {
                reason: DRAIN_DEADLINE.into(),
                ..cut
            }),
        }
    }
}

impl Failure {
    /// This failure as the core leaves it: once the drain's deadline cut what is
    /// still open ([`crate::core::Core::cut_off`]), the deadline's
    /// ([`Failure::at_deadline`], an app tried or not as `side` says); unchanged
    /// before. Every way an exchange concludes (HTTP/1.1, the bridge to an HTTP/2
    /// app, an HTTP/2 stream) passes its failure through here.
    pub(crate) fn drained(self, core: &crate::core::Core, side: &super::upstream::AppSide) -> Self {
        if core.cut_off.get() {
            self.at_deadline(side.addr.get().is_some())
        } else {
            self
        }
    }
}

/// Why an exchange still open when the drain's deadline passed ended.
pub(crate) const DRAIN_DEADLINE: &str = "cut at the drain deadline";

/// What of an answer reached the client before it was cut.
pub struct Cut {
    /// Why it was cut.
    pub reason: String,
    /// The app's status, whose head went out.
    pub status: u16,
    /// The request bytes read from the client; the bytes written to it.
    pub bytes: (u64, u64),
    /// The app's address.
    pub upstream: SocketAddr,
}

/// What a failure itself says about retrying (pingora's `RetryType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Retrying cannot help or is not safe (a timeout: the app may be working on it).
    Never,
    /// The connection died: retry if it was a reused one.
    IfReused,
    /// The app says it never processed the request: an HTTP/2 stream reset with
    /// `REFUSED_STREAM`, or above the last stream of the app's GOAWAY (RFC 9113
    /// §8.7). Safe to send again whatever the method.
    Unprocessed,
}

/// What one attempt on an upstream connection knows when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attempt {
    /// The connection came from the pool (a fresh one that dies is the app's answer).
    pub reused: bool,
    /// The request is idempotent (RFC 9110 §9.2.2).
    pub idempotent: bool,
    /// It has no body: its head alone can be sent again (a body is streamed and
    /// gone).
    pub bodiless: bool,
    /// Some of the response arrived.
    pub response_started: bool,
    /// This attempt is already the retry.
    pub retried: bool,
}

impl Attempt {
    /// The first attempt of a `method` request, with a body or not, on a pooled
    /// (`reused`) connection or a fresh one.
    pub(crate) fn first(method: Method, has_body: bool, reused: bool) -> Self {
        Self {
            reused,
            idempotent: method.is_idempotent(),
            bodiless: !has_body,
            response_started: false,
            retried: false,
        }
    }

    /// Whether the request can be sent again after any failure: idempotent, and
    /// without a body (its head is kept until the response head arrived).
    pub(crate) fn replayable(&self) -> bool {
        self.idempotent && self.bodiless
    }

    /// The attempt that retries this one.
    pub(crate) fn again(self) -> Self {
        Self {
            reused: false,
            response_started: false,
            retried: true,
            ..self
        }
    }
}

/// The retry rule, once per request and never after a response byte: a failure on
/// a reused upstream connection that died, for a request that can be replayed; or
/// a request without a body that the app says it never processed.
pub(crate) fn may_retry(fault: Fault, retry: Retry, attempt: Attempt) -> bool {
    fault == Fault::Upstream
        && !attempt.retried
        && !attempt.response_started
        && match retry {
            Retry::Never => false,
            Retry::IfReused => attempt.reused && attempt.replayable(),
            Retry::Unprocessed => attempt.bodiless,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_rule_table() {
        use Fault::{Client, Internal, Upstream};
        use Method::{Delete, Get, Post, Put};
        use Retry::{IfReused, Never, Unprocessed};
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
            // Never processed by the app: any method, reused connection or not, as
            // long as there is no body to send again and nothing came back.
            (Upstream, Unprocessed, false, false, Post, false, true),
            (Upstream, Unprocessed, true,  false, Get,  false, true),
            (Upstream, Unprocessed, false, false, Post, true,  false),
            (Upstream, Unprocessed, false, true,  Get,  false, false),
            (Client,   Unprocessed, false, false, Get,  false, false),
        ];
        for (i, (fault, retry, reused, response_started, method, body, want)) in
            table.into_iter().enumerate()
        {
            let attempt = Attempt {
                response_started,
                ..Attempt::first(method, body, reused)
            };
            assert_eq!(may_retry(fault, retry, attempt), want, "row {i}");
            // Once only: the retry itself is never retried.
            assert!(!may_retry(fault, retry, attempt.again()), "row {i} again");
        }
    }

    /// At the drain's deadline a request no app was given is told 503 (another
    /// worker may serve it), one an app was given 504 (it may have acted on it);
    /// a cut says the deadline.
    #[test]
    fn a_failure_at_the_drain_deadline_says_whether_an_app_had_the_request() {
        let answer = |f: Failure| match f {
            Failure::Answer(e, _) => e.status_and_code(),
            _ => (0, "not an answer"),
        };
        let timeout = || Failure::Answer(ProxyError::UpstreamTimeout, Left::Nothing);
        assert_eq!(answer(timeout().at_deadline(false)), (503, "draining"));
        assert_eq!(answer(timeout().at_deadline(true)), (504, "drain_deadline"));
        let cut = Failure::Cut(Cut {
            reason: "the app closed".into(),
            status: 200,
            bytes: (10, 20),
            upstream: "127.0.0.1:1".parse().expect("addr"),
        });
        match cut.at_deadline(true) {
            Failure::Cut(c) => assert_eq!((c.reason.as_str(), c.status), (DRAIN_DEADLINE, 200)),
            _ => panic!("a cut stays a cut"),
        }
    }
}
