//! Typed errors of the HTTP layer and the one place where they become status codes,
//! and [`Refusal`]: one of the proxy's own answers (status, code, message), whatever
//! refused — an exchange on HTTP/1.1, a stream on HTTP/2, the connection cap — so
//! every answer is written by [`super::encode::refusal_response`] (HTTP/1.1) or with
//! its body ([`super::encode::error_body`], HTTP/2) and counted by
//! [`crate::core::Core::count_refusal`].
//!
//! Every error says who is at fault ([`Fault`]): a client error is a 4xx and closes
//! the connection when framing is in doubt; an upstream error is a 502/504 and discards
//! the upstream connection; an internal error is a 500.

/// Who caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The client sent something we refuse.
    Client,
    /// The app (upstream) failed or misbehaved.
    Upstream,
    /// The proxy itself.
    Internal,
}

/// Why a request head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The request line is longer than the limit.
    #[error("request line too long")]
    UriTooLong,
    /// The header block is larger than the limit.
    #[error("request header block too large")]
    HeadersTooLarge,
    /// More header fields than the limit.
    #[error("too many request headers")]
    TooManyHeaders,
    /// The head is not valid HTTP/1.x (bad token, bare CR, obs-fold, NUL …).
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
    /// Not HTTP/1.0 or HTTP/1.1.
    #[error("unsupported HTTP version")]
    UnsupportedVersion,
    /// A `Content-Length` that is not a number, or several that differ.
    #[error("invalid Content-Length")]
    InvalidContentLength,
    /// Both `Content-Length` and `Transfer-Encoding`.
    #[error("both Content-Length and Transfer-Encoding")]
    LengthAndTransferEncoding,
    /// `Transfer-Encoding` whose last coding is not `chunked` (or chunked twice, or on
    /// HTTP/1.0).
    #[error("Transfer-Encoding must end with chunked")]
    BadTransferEncoding,
    /// A transfer coding other than `chunked` (we do not decode them).
    #[error("unsupported transfer coding")]
    UnsupportedTransferCoding,
    /// An HTTP/1.1 request without `Host`, one with several, or a `Host` value that
    /// is not an authority.
    #[error("missing, repeated or invalid Host header")]
    BadHost,
    /// An `Expect` other than `100-continue`.
    #[error("unsupported expectation")]
    ExpectationFailed,
    /// A malformed chunked body.
    #[error("malformed chunked body: {0}")]
    BadChunk(&'static str),
    /// An HTTP/2 request trailer of a framing, routing, auth or forwarding field
    /// (the rule of `http::chunked`; over HTTP/1.1 the trailer is part of the
    /// chunked body, and such a field is a [`RequestError::BadChunk`]).
    #[error("forbidden trailer field")]
    ForbiddenTrailer,
    /// The body is larger than `max_body`.
    #[error("request body too large")]
    BodyTooLarge,
    /// The head did not arrive within the head timeout.
    #[error("request head timed out")]
    HeadTimeout,
    /// The request body stalled past the body idle timeout.
    #[error("request body timed out")]
    BodyTimeout,
    /// The request body arrived slower than the minimum rate.
    #[error("request body too slow")]
    BodyTooSlow,
}

/// Why an upstream response was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// The head is not valid HTTP/1.x.
    #[error("malformed response head: {0}")]
    Malformed(&'static str),
    /// The head is larger than the limit.
    #[error("response head too large")]
    HeadTooLarge,
    /// Bad or conflicting length information.
    #[error("invalid response framing")]
    BadFraming,
    /// A malformed chunked body.
    #[error("malformed chunked response body: {0}")]
    BadChunk(&'static str),
}

/// Everything that can end a proxied request with an error the proxy answers itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client's request was refused.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// No circuit serves this port or host.
    #[error("no circuit for this address")]
    UnknownCircuit,
    /// The circuit has no route to send the request to.
    #[error("circuit has no healthy route")]
    NoRoute,
    /// Every route of the circuit failed its active health check.
    #[error("every route of the endpoint is unhealthy")]
    NoHealthyRoute,
    /// Connecting to the app failed or timed out.
    #[error("upstream connect failed: {0}")]
    UpstreamConnect(std::io::Error),
    /// The app did not answer the head in time, or stopped taking the request body
    /// for `[timeouts] body_idle_secs` without answering.
    #[error("upstream response timed out")]
    UpstreamTimeout,
    /// The app's response was malformed or the connection broke before a response.
    #[error("upstream response invalid: {0}")]
    UpstreamResponse(#[from] ResponseError),
    /// The app closed or reset the connection before a complete response head.
    #[error("upstream closed the connection: {0}")]
    UpstreamClosed(std::io::Error),
    /// The worker is shutting down: the drain's deadline passed before any app was
    /// given the request (another worker may serve it).
    #[error("worker is draining")]
    Draining,
    /// The drain's deadline passed while an app had the request and had not
    /// answered: it may have acted on it, so the answer is no invitation to send it
    /// again (a 504, as for an app that did not answer in time).
    #[error("the worker stopped before the app answered (drain deadline)")]
    CutAtDeadline,
    /// The proxy itself is out of descriptors, memory or local ports (never the
    /// upstream's fault).
    #[error("the proxy is out of local resources: {0}")]
    LocalResources(std::io::Error),
    /// The upstream already has as many connections from this core as allowed.
    #[error("upstream connection limit reached")]
    UpstreamBusy,
    /// The core has `[http2] max_app_streams` streams open to HTTP/2 apps, or
    /// (half of them taken) the client's address its share of them.
    #[error("too many streams to apps on this worker, retry later")]
    AppStreamLimit,
    /// The core is at its cap of open client connections (`[limits]
    /// max_connections_per_core`): the connection is answered and closed.
    #[error("too many connections on this worker, retry later")]
    ConnectionLimit,
    /// The client's address has as many connections open on this core as `[limits]
    /// max_connections_per_client` allows: the connection is answered and closed.
    #[error("too many connections from this address, retry later")]
    ClientConnectionLimit,
    /// The client's address sent requests faster than `[limits]
    /// max_request_rate_per_client` allows: the request is refused before it is
    /// routed, `Retry-After` saying when the next one would be admitted (seconds).
    #[error("too many requests from this address, retry later")]
    RequestRateLimit(u32),
}

impl RequestError {
    /// The status code answered for this error.
    pub fn status(self) -> u16 {
        match self {
            Self::UriTooLong => 414,
            Self::HeadersTooLarge | Self::TooManyHeaders => 431,
            Self::UnsupportedVersion => 505,
            Self::UnsupportedTransferCoding => 501,
            Self::ExpectationFailed => 417,
            Self::BodyTooLarge => 413,
            Self::HeadTimeout | Self::BodyTimeout | Self::BodyTooSlow => 408,
            Self::Malformed(_)
            | Self::InvalidContentLength
            | Self::LengthAndTransferEncoding
            | Self::BadTransferEncoding
            | Self::BadHost
            | Self::BadChunk(_)
            | Self::ForbiddenTrailer => 400,
        }
    }

    /// The machine-readable `code` of the JSON error body.
    pub fn code(self) -> &'static str {
        match self {
            Self::UriTooLong => "uri_too_long",
            Self::HeadersTooLarge => "headers_too_large",
            Self::TooManyHeaders => "too_many_headers",
            Self::Malformed(_) => "malformed_request",
            Self::UnsupportedVersion => "unsupported_version",
            Self::InvalidContentLength => "invalid_content_length",
            Self::LengthAndTransferEncoding => "length_and_transfer_encoding",
            Self::BadTransferEncoding => "bad_transfer_encoding",
            Self::UnsupportedTransferCoding => "unsupported_transfer_coding",
            Self::BadHost => "bad_host",
            Self::ExpectationFailed => "expectation_failed",
            Self::BadChunk(_) => "bad_chunk",
            Self::ForbiddenTrailer => "forbidden_trailer",
            Self::BodyTooLarge => "body_too_large",
            Self::HeadTimeout => "request_timeout",
            Self::BodyTimeout => "request_body_timeout",
            Self::BodyTooSlow => "request_body_too_slow",
        }
    }
}

impl ProxyError {
    /// Who is at fault.
    pub fn fault(&self) -> Fault {
        match self {
            Self::Request(_)
            | Self::UnknownCircuit
            | Self::ClientConnectionLimit
            | Self::RequestRateLimit(_) => Fault::Client,
            Self::NoRoute
            | Self::NoHealthyRoute
            | Self::UpstreamConnect(_)
            | Self::UpstreamTimeout
            | Self::UpstreamResponse(_)
            | Self::UpstreamClosed(_) => Fault::Upstream,
            Self::Draining
            | Self::CutAtDeadline
            | Self::LocalResources(_)
            | Self::UpstreamBusy
            | Self::AppStreamLimit
            | Self::ConnectionLimit => Fault::Internal,
        }
    }

    /// Status code and machine-readable code: the one mapping from error to answer.
    pub fn status_and_code(&self) -> (u16, &'static str) {
        match self {
            Self::Request(e) => (e.status(), e.code()),
            Self::UnknownCircuit => (404, "unknown_circuit"),
            Self::NoRoute => (502, "no_route"),
            Self::NoHealthyRoute => (503, "no_healthy_route"),
            Self::UpstreamConnect(_) => (502, "upstream_connect_failed"),
            Self::UpstreamTimeout => (504, "upstream_timeout"),
            Self::UpstreamResponse(_) => (502, "upstream_invalid_response"),
            Self::UpstreamClosed(_) => (502, "upstream_closed"),
            Self::Draining => (503, "draining"),
            Self::CutAtDeadline => (504, "drain_deadline"),
            Self::LocalResources(e) if crate::core::is_out_of_descriptors(e) => {
                (503, "out_of_descriptors")
            }
            Self::LocalResources(_) => (503, "local_resources_exhausted"),
            Self::UpstreamBusy => (503, "upstream_connection_limit"),
            Self::AppStreamLimit => (503, "app_stream_limit"),
            Self::ConnectionLimit => (503, "connection_limit"),
            Self::ClientConnectionLimit => (429, "client_connection_limit"),
            Self::RequestRateLimit(_) => (429, "request_rate_limit"),
        }
    }

    /// Seconds after which the client may try again (`Retry-After`), when the
    /// refusal says so.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            Self::ConnectionLimit | Self::ClientConnectionLimit | Self::AppStreamLimit => Some(1),
            Self::RequestRateLimit(secs) => Some(*secs),
            _ => None,
        }
    }

    /// Whether the client connection must be closed after answering (framing is in
    /// doubt, or the body was not read).
    pub fn closes_connection(&self) -> bool {
        matches!(self, Self::Request(_))
    }
}

/// One of the proxy's own answers: what every refusal path writes and counts.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Status code.
    pub status: u16,
    /// Machine-readable code (the JSON body's `code`).
    pub code: &'static str,
    /// Human-readable reason (never includes client bytes).
    pub message: String,
    /// Whether the refusal leaves the request's framing in doubt (an HTTP/1.1
    /// connection closes after it).
    pub closes: bool,
    /// `Retry-After` seconds, when the client may simply try again.
    pub retry_after: Option<u32>,
}

impl From<&ProxyError> for Refusal {
    fn from(err: &ProxyError) -> Self {
        let (status, code) = err.status_and_code();
        Self {
            status,
            code,
            message: err.to_string(),
            closes: err.closes_connection(),
            retry_after: err.retry_after(),
        }
    }
}

impl From<ProxyError> for Refusal {
    fn from(err: ProxyError) -> Self {
        Self::from(&err)
    }
}

impl From<crate::auth::Refused> for Refusal {
    fn from(r: crate::auth::Refused) -> Self {
        Self {
            status: r.status,
            code: r.code,
            message: r.message.into(),
            closes: false,
            retry_after: None,
        }
    }
}

/// The reason phrase for a status: the proxy's own answers', then the registered
/// ones (an app's status relayed from HTTP/2, which has no phrase), then a neutral
/// one by class.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or(match status / 100 {
                1 => "Informational",
                2 => "Success",
                3 => "Redirection",
                4 => "Client Error",
                _ => "Server Error",
            }),
    }
}
