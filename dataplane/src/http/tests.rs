//! Table-driven tests of request and response parsing and of head encoding.

use super::error::{RequestError, ResponseError};
use super::parse::{parse_request, parse_response, BodyFraming, HeadLimits, Method, Version};

fn req(input: &[u8]) -> Result<Option<super::parse::RequestHead>, RequestError> {
    parse_request(input, &HeadLimits::default())
}

/// What a refusal of an unparsed head takes for a `HEAD` (its answer then has no
/// body): the method as the parser would read it, past the empty lines it skips.
#[test]
fn head_requests_are_known_before_their_head_is_parsed() {
    use super::parse::is_head_request;
    let table: &[(&[u8], bool)] = &[
        (b"HEAD / HTTP/1.1\r\n", true),
        (b"HEAD /", true),
        (b"\r\nHEAD / HTTP/1.1\r\nBad Name: x\r\n\r\n", true),
        (b"\n\r\n\nHEAD /", true),
        (b"HEAD", false),
        (b"HEADER / HTTP/1.1\r\n", false),
        (b"head / HTTP/1.1\r\n", false),
        (b" HEAD / HTTP/1.1\r\n", false),
        (b"GET / HTTP/1.1\r\n", false),
        (b"\r\n\r\n", false),
        (b"", false),
    ];
    for (input, head) in table {
        assert_eq!(
            is_head_request(input),
            *head,
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

/// The ID a refusal of an unparsed head answers under: the client's own, when a
/// valid one is among the field lines read, by the rules of parsed fields.
#[test]
fn a_refused_heads_request_id_is_read_from_its_bytes() {
    let table: &[(&[u8], Option<&str>)] = &[
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\nX-Backend-Request-ID: id-clte\r\n\r\n",
            Some("id-clte"),
        ),
        // Cut short (too large), the field read whole before the cut.
        (b"GET / HTTP/1.1\r\nx-request-id:  id-cut \r\nX-Pad: aaaa", Some("id-cut")),
        // Cut inside the ID's own line: not taken (it may be another ID's start).
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Backend-Request-ID: id-cu", None),
        // The primary header wins over an alias, as for parsed fields.
        (
            b"GET / HTTP/1.1\r\nX-Request-ID: alias\r\nX-Backend-Request-ID: primary\r\n\r\n",
            Some("primary"),
        ),
        // Bare LF lines and empty lines before the request line.
        (b"\r\nGET / HTTP/1.1\nX-BackendAI-RequestID: id-lf\nBad\0: x\n\n", Some("id-lf")),
        // Not a valid ID, in the body, on the request line, or in a malformed name.
        (b"GET / HTTP/1.1\r\nX-Backend-Request-ID: a b\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\n\r\nX-Backend-Request-ID: body\r\n", None),
        (b"GET /X-Backend-Request-ID:x HTTP/1.1\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nX-Backend-Request-ID : sp\r\n\r\n", None),
        (b"", None),
    ];
    for (input, want) in table {
        assert_eq!(
            super::parse::RefusedHead::read(input)
                .id
                .map(|id| id.as_str().to_owned()),
            want.map(str::to_owned),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

/// The `traceparent` a refusal of an unparsed head is traced under: one valid
/// line among the whole field lines read, by the rules of parsed fields.
#[test]
fn a_refused_heads_traceparent_is_read_from_its_bytes() {
    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let table: &[(String, bool)] = &[
        (format!("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\ntraceparent: {TP}\r\n\r\n"), true),
        (format!("GET / HTTP/1.1\r\nTraceParent:\t{TP} \r\nX-Pad: aaa"), true),
        // Cut inside its own line, two lines, invalid, in the body, malformed name.
        (format!("GET / HTTP/1.1\r\ntraceparent: {TP}"), false),
        (format!("GET / HTTP/1.1\r\ntraceparent: {TP}\r\ntraceparent: {TP}\r\n\r\n"), false),
        ("GET / HTTP/1.1\r\ntraceparent: 00-00000000000000000000000000000000-b7ad6b7169203331-01\r\n\r\n".to_owned(), false),
        (format!("GET / HTTP/1.1\r\n\r\ntraceparent: {TP}\r\n"), false),
        (format!("GET / HTTP/1.1\r\ntraceparent : {TP}\r\n\r\n"), false),
    ];
    for (input, valid) in table {
        let read = super::parse::RefusedHead::read(input.as_bytes()).traceparent;
        assert_eq!(read.is_some(), *valid, "{input:?}");
        if let Some(tp) = read {
            assert_eq!(
                tp.trace_id.hex().as_str(),
                "0af7651916cd43dd8448eb211c80319c"
            );
        }
    }
}

#[test]
fn request_framing_table() {
    use BodyFraming::*;
    let ok: &[(&[u8], BodyFraming, bool)] = &[
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Length(0), true),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            Length(5),
            true,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
            Length(5),
            true,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            Length(5),
            true,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            Chunked,
            true,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n",
            Chunked,
            true,
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            Length(0),
            false,
        ),
        (b"GET / HTTP/1.0\r\n\r\n", Length(0), false),
        (
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            Length(0),
            true,
        ),
    ];
    for (input, framing, keep_alive) in ok {
        let head = req(input)
            .unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(input)))
            .expect("complete");
        assert_eq!(
            head.framing,
            *framing,
            "{:?}",
            String::from_utf8_lossy(input)
        );
        assert_eq!(
            head.keep_alive,
            *keep_alive,
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

/// The request line's limit is the line's own length, its CRLF not counted: 8 KiB
/// is served, a byte more is 414, however the bytes arrive.
#[test]
fn the_request_line_limit_is_exact() {
    let limits = HeadLimits::default();
    assert_eq!(limits.max_request_line, 8192);
    let line = |len: usize| {
        let target = "a".repeat(len - "GET / HTTP/1.1".len());
        format!("GET /{target} HTTP/1.1\r\nHost: a\r\n\r\n")
    };
    let at = line(8192);
    assert_eq!(at.find("\r\n"), Some(8192));
    assert!(matches!(req(at.as_bytes()), Ok(Some(_))));
    let over = line(8193);
    assert_eq!(req(over.as_bytes()).err(), Some(RequestError::UriTooLong));
    // Without its end yet: incomplete at the limit, refused past it.
    assert!(matches!(req(&at.as_bytes()[..8193]), Ok(None)));
    assert_eq!(
        req(&over.as_bytes()[..8194]).err(),
        Some(RequestError::UriTooLong)
    );
}

#[test]
fn request_refusal_table() {
    let long_line = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(8 * 1024));
    let long_headers = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "b".repeat(16 * 1024)
    );
    let many_headers = format!(
        "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
        "X-A: 1\r\n".repeat(100)
    );
    let cases: Vec<(&[u8], RequestError, u16)> = vec![
        (long_line.as_bytes(), RequestError::UriTooLong, 414),
        (long_headers.as_bytes(), RequestError::HeadersTooLarge, 431),
        (many_headers.as_bytes(), RequestError::TooManyHeaders, 431),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            RequestError::LengthAndTransferEncoding, 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            RequestError::InvalidContentLength, 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n", RequestError::InvalidContentLength, 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", RequestError::InvalidContentLength, 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n", RequestError::InvalidContentLength, 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
            RequestError::InvalidContentLength, 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", RequestError::BadTransferEncoding, 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            RequestError::BadTransferEncoding, 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            RequestError::BadTransferEncoding, 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            RequestError::UnsupportedTransferCoding, 501),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", RequestError::BadTransferEncoding, 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n  b\r\n\r\n", RequestError::Malformed("invalid header name"), 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Bare: a\rb\r\n\r\n", RequestError::Malformed("invalid header value"), 400),
        (b"GET / HTTP/1.1\nHost: a\n\n", RequestError::Malformed("a line ending in a bare LF"), 400),
        (b"GET / HTTP/1.1\nHost: a\r\n\r\n", RequestError::Malformed("a line ending in a bare LF"), 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\n", RequestError::Malformed("a line ending in a bare LF"), 400),
        (b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", RequestError::Malformed("a line ending in a bare LF"), 400),
        (b"POST /a HTTP/1.1\r\nHost: a\r\nX: y\nContent-Length: 35\r\n\r\n", RequestError::Malformed("a line ending in a bare LF"), 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\nY: b\r\n\r\n", RequestError::Malformed("a line ending in a bare LF"), 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Nul: a\0b\r\n\r\n", RequestError::Malformed("invalid header value"), 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: v\r\n\r\n", RequestError::Malformed("invalid header name"), 400),
        (b"GET / HTTP/1.1\r\n\r\n", RequestError::BadHost, 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", RequestError::BadHost, 400),
        // A Host that is not an authority (RFC 9112 §3.2).
        (b"GET / HTTP/1.1\r\nHost: a b@c/d\r\n\r\n", RequestError::BadHost, 400),
        (b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n", RequestError::BadHost, 400),
        (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", RequestError::BadHost, 400),
        (b"GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n", RequestError::BadHost, 400),
        (b"GET / HTTP/1.1\r\nHost: a:8x\r\n\r\n", RequestError::BadHost, 400),
        (b"GET / HTTP/1.0\r\nHost: a%2fb\r\n\r\n", RequestError::BadHost, 400),
        (b"GET / HTTP/1.1\r\nHost: [zz]\r\n\r\n", RequestError::BadHost, 400),
        // A fragment in any form of target.
        (b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n", RequestError::Malformed("request target with a fragment"), 400),
        (b"GET /a?q=1#b HTTP/1.1\r\nHost: a\r\n\r\n", RequestError::Malformed("request target with a fragment"), 400),
        (b"GET http://a/x#y HTTP/1.1\r\nHost: a\r\n\r\n", RequestError::Malformed("request target with a fragment"), 400),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", RequestError::UnsupportedVersion, 505),
        (b"\r\nGET / HTTP/3.0\r\nHost: a\r\n\r\n", RequestError::UnsupportedVersion, 505),
        // No version at all: not a request line (a PROXY protocol header, say).
        (b"PROXY TCP4 192.0.2.9 127.0.0.1 1 80\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            RequestError::Malformed("invalid request line"), 400),
        (b"GET / HTTP/11\r\nHost: a\r\n\r\n", RequestError::Malformed("invalid request line"), 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: something\r\n\r\n", RequestError::ExpectationFailed, 417),
        (b"G\0T / HTTP/1.1\r\nHost: a\r\n\r\n", RequestError::Malformed("invalid method or target"), 400),
        // Targets: bare, authority-form, `*` other than for OPTIONS, absolute-form
        // naming another host, with no path, with userinfo, or of another scheme.
        (b"GET x HTTP/1.1\r\nHost: a\r\n\r\n", RequestError::Malformed("request target"), 400),
        (b"GET a:80 HTTP/1.1\r\nHost: a\r\n\r\n", RequestError::Malformed("request target"), 400),
        (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", RequestError::Malformed("request target"), 400),
        (b"GET http://b/x HTTP/1.1\r\nHost: a\r\n\r\n",
            RequestError::Malformed("request target names another host than Host"), 400),
        (b"GET http://a:8080/x HTTP/1.1\r\nHost: a\r\n\r\n",
            RequestError::Malformed("request target names another host than Host"), 400),
        (b"GET https://a/x HTTP/1.1\r\nHost: a:80\r\n\r\n",
            RequestError::Malformed("request target names another host than Host"), 400),
        (b"GET http://[::1]:81/x HTTP/1.1\r\nHost: [::1]\r\n\r\n",
            RequestError::Malformed("request target names another host than Host"), 400),
        (b"GET http://u@a/x HTTP/1.1\r\nHost: a\r\n\r\n",
            RequestError::Malformed("request target names another host than Host"), 400),
        (b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n",
            RequestError::Malformed("request target names another host than Host"), 400),
        (b"GET http://a/x HTTP/1.0\r\n\r\n",
            RequestError::Malformed("request target names another host than Host"), 400),
        (b"GET http://a HTTP/1.1\r\nHost: a\r\n\r\n", RequestError::Malformed("request target"), 400),
        (b"GET http://a?q HTTP/1.1\r\nHost: a\r\n\r\n", RequestError::Malformed("request target"), 400),
        (b"GET ftp://a/x HTTP/1.1\r\nHost: a\r\n\r\n", RequestError::Malformed("request target"), 400),
    ];
    for (input, want, status) in cases {
        let got = req(input).err();
        assert_eq!(
            got,
            Some(want),
            "{:?}",
            String::from_utf8_lossy(&input[..input.len().min(80)])
        );
        assert_eq!(want.status(), status);
    }
}

/// Absolute-form targets whose authority is the `Host` reach the app in
/// origin-form; `*` for OPTIONS and origin-form as they are.
#[test]
fn request_targets_reach_the_app_in_origin_form() {
    for (input, want) in [
        (
            &b"GET http://a/x?q=1 HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            &b"/x?q=1"[..],
        ),
        (
            b"GET HTTPS://App.Example:8443/ HTTP/1.1\r\nHost: app.example:8443\r\n\r\n",
            b"/",
        ),
        (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", b"*"),
        // The default port of the target's scheme, written on either side.
        (b"GET http://a:80/x HTTP/1.1\r\nHost: a\r\n\r\n", b"/x"),
        (b"GET https://a/x HTTP/1.1\r\nHost: A:443\r\n\r\n", b"/x"),
        (
            b"GET http://[::1]/x HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
            b"/x",
        ),
        (b"GET /http://b/ HTTP/1.1\r\nHost: a\r\n\r\n", b"/http://b/"),
    ] {
        let head = req(input).expect("valid").expect("complete");
        assert_eq!(
            &input[head.target.clone()],
            want,
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

/// `Host` values that are authorities pass: names (with `_`, a trailing dot, any
/// case), IPv4, bracketed IPv6, an empty port, surrounding blanks, and the empty
/// value of a target without authority.
#[test]
fn host_values_that_are_authorities_pass() {
    for host in [
        "a",
        "App.Example:8443",
        "my_host.local.",
        "127.0.0.1:80",
        "[::1]",
        "[fe80::1]:8080",
        "a:",
        " a ",
        "",
    ] {
        let input = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        assert!(
            matches!(req(input.as_bytes()), Ok(Some(_))),
            "Host: {host:?} was refused"
        );
    }
}

#[test]
fn partial_heads_ask_for_more() {
    for input in [
        &b"GET / HTTP/1.1\r\nHost: a\r\n"[..],
        b"GET / HT",
        b"",
        b"GET / HTTP/1.1\r\nHost: a\r\n\r",
    ] {
        assert_eq!(req(input), Ok(None), "{:?}", String::from_utf8_lossy(input));
    }
}

/// RFC 9110 §10.1.1: an HTTP/1.0 request's `100-continue` is ignored, so the worker
/// never answers an HTTP/1.0 client with its own `100 Continue`.
#[test]
fn an_http10_expectation_of_100_continue_is_ignored() {
    let head = req(b"POST /p HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        .expect("valid")
        .expect("complete");
    assert!(!head.expect_continue);
    let head =
        req(b"POST /p HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
            .expect("valid")
            .expect("complete");
    assert!(head.expect_continue);
}

#[test]
fn request_fields() {
    let input = b"POST /p?q=1 HTTP/1.1\r\nHost: example\r\nConnection: keep-alive, X-Custom, Upgrade\r\nUpgrade: websocket\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc";
    let head = req(input).expect("valid").expect("complete");
    assert_eq!(head.method, Method::Post);
    assert_eq!(&input[head.target.clone()], b"/p?q=1");
    assert_eq!(head.version, Version::Http11);
    assert_eq!(&input[head.host.clone().expect("host")], b"example");
    assert!(head.expect_continue);
    assert_eq!(&input[head.upgrade.clone().expect("upgrade")], b"websocket");
    let tokens: Vec<&[u8]> = head
        .connection_tokens
        .iter()
        .map(|r| &input[r.clone()])
        .collect();
    assert_eq!(tokens, vec![&b"X-Custom"[..], b"Upgrade"]);
    assert_eq!(head.head_len, input.len() - 3);
}

#[test]
fn response_framing_table() {
    use BodyFraming::*;
    type Case<'a> = (
        &'a [u8],
        Method,
        Result<(u16, BodyFraming, bool), ResponseError>,
    );
    let cases: &[Case<'_>] = &[
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
            Method::Get,
            Ok((200, Length(2), true)),
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            Method::Get,
            Ok((200, Chunked, true)),
        ),
        (
            b"HTTP/1.1 200 OK\r\n\r\n",
            Method::Get,
            Ok((200, Eof, false)),
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
            Method::Head,
            Ok((200, Length(0), true)),
        ),
        (
            b"HTTP/1.1 204 No Content\r\n\r\n",
            Method::Get,
            Ok((204, Length(0), true)),
        ),
        (
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
            Method::Get,
            Ok((304, Length(0), true)),
        ),
        (
            b"HTTP/1.1 100 Continue\r\n\r\n",
            Method::Post,
            Ok((100, Length(0), true)),
        ),
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            Method::Get,
            Ok((200, Length(1), false)),
        ),
        (
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
            Method::Get,
            Ok((200, Length(1), false)),
        ),
        // Framing in doubt: relayed, the connection not kept.
        (
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
            Method::Get,
            Ok((200, Chunked, false)),
        ),
        (
            b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n",
            Method::Get,
            Ok((204, Length(0), false)),
        ),
        (
            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
            Method::Get,
            Ok((204, Length(0), true)),
        ),
        (
            b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
            Method::Get,
            Ok((204, Length(0), false)),
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            Method::Head,
            Ok((200, Length(0), false)),
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            Method::Head,
            Ok((200, Length(0), false)),
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            Method::Head,
            Ok((200, Length(0), true)),
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            Method::Get,
            Err(ResponseError::BadFraming),
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            Method::Get,
            Err(ResponseError::BadFraming),
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            Method::Get,
            Err(ResponseError::BadFraming),
        ),
        (
            b"NOT HTTP\r\n\r\n",
            Method::Get,
            Err(ResponseError::Malformed("invalid response head")),
        ),
        (
            b"HTTP/1.1 abc OK\r\n\r\n",
            Method::Get,
            Err(ResponseError::Malformed("invalid response head")),
        ),
        (
            b"HTTP/1.1 599 Last\r\nContent-Length: 0\r\n\r\n",
            Method::Get,
            Ok((599, Length(0), true)),
        ),
        (
            b"HTTP/1.1 600 Internal\r\nContent-Length: 0\r\n\r\n",
            Method::Get,
            Err(ResponseError::Malformed("status code out of range")),
        ),
        (
            b"HTTP/1.1 999 Internal\r\n\r\n",
            Method::Get,
            Err(ResponseError::Malformed("status code out of range")),
        ),
        (
            b"HTTP/1.1 099 Low\r\n\r\n",
            Method::Get,
            Err(ResponseError::Malformed("status code out of range")),
        ),
    ];
    for (input, method, want) in cases {
        let got = parse_response(input, *method, 64 * 1024)
            .map(|h| h.expect("complete"))
            .map(|h| (h.status, h.framing, h.keep_alive));
        assert_eq!(&got, want, "{:?}", String::from_utf8_lossy(input));
    }
    assert_eq!(
        parse_response(b"HTTP/1.1 200 OK\r\n", Method::Get, 1024),
        Ok(None)
    );
    let big = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "a".repeat(2000));
    assert_eq!(
        parse_response(big.as_bytes(), Method::Get, 1024),
        Err(ResponseError::HeadTooLarge)
    );
}

mod encoding {
    use super::super::encode::{
        client_response, error_response, upstream_request, ClientFraming, ClientHop, Keep,
    };
    use super::*;
    use appproxy_shared::RequestId;

    fn hop(trusted: bool) -> ClientHop {
        ClientHop::new("10.1.2.3:5555".parse().expect("addr"), 8080, trusted)
    }

    fn app() -> std::net::SocketAddr {
        "10.9.9.9:8888".parse().expect("addr")
    }

    #[test]
    fn client_address_headers_are_replaced() {
        let input = b"GET / HTTP/1.1\r\nHost: h\r\nX-Real-IP: 6.6.6.6\r\nx-client-ip: 6.6.6.6\r\nTrue-Client-IP: 6.6.6.6\r\nCF-Connecting-IP: 6.6.6.6\r\nClient-IP: 6.6.6.6\r\nX-Cluster-Client-IP: 6.6.6.6\r\nFastly-Client-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Forwarded-Port: 1\r\n\r\n";
        let head = req(input).expect("valid").expect("complete");
        let id: RequestId = "rid-1".parse().expect("valid");
        for trusted in [false, true] {
            let mut out = Vec::new();
            upstream_request(&mut out, input, &head, Some(&id), &hop(trusted), app());
            let text = String::from_utf8(out).expect("ascii");
            assert!(!text.contains("6.6.6.6"), "{text}");
            assert_eq!(text.matches("X-Real-IP: 10.1.2.3\r\n").count(), 1, "{text}");
        }
        // From a trusted proxy, `X-Real-IP` is the client its list named (read by
        // the handler), the list goes on whole (its lines joined), then the peer.
        let input = b"GET / HTTP/1.1\r\nHost: h\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-For:  5.5.5.5 , 7.7.7.7 \r\nX-Forwarded-For: 10.0.0.5\r\n\r\n";
        let head = req(input).expect("valid").expect("complete");
        let mut from = hop(true);
        from.admitted("7.7.7.7".parse().expect("ip"), false);
        let mut out = Vec::new();
        upstream_request(&mut out, input, &head, Some(&id), &from, app());
        let text = String::from_utf8(out).expect("ascii");
        assert!(text.contains("X-Real-IP: 7.7.7.7\r\n"), "{text}");
        assert!(
            text.contains("X-Forwarded-For: 5.5.5.5 , 7.7.7.7, 10.0.0.5, 10.1.2.3\r\n"),
            "{text}"
        );
        assert_eq!(text.matches("X-Forwarded-For").count(), 1, "{text}");
        assert!(!text.contains("6.6.6.6"), "{text}");
        // From an untrusted peer nothing of its list goes on.
        let mut out = Vec::new();
        upstream_request(&mut out, input, &head, Some(&id), &hop(false), app());
        let text = String::from_utf8(out).expect("ascii");
        assert!(
            text.contains("X-Forwarded-For: 10.1.2.3\r\nX-Real-IP: 10.1.2.3\r\n"),
            "{text}"
        );
    }

    /// An RStudio Server is told the URL the browser asked for, as the original does
    /// for `app = "rstudio"` (it builds its redirects and its origin check from it):
    /// the worker's own fields, one each, whatever a client sent; a trusted proxy's
    /// scheme and host are the URL's. Other apps get no such field from a client.
    #[test]
    fn an_rstudio_server_is_told_the_url_the_browser_asked_for() {
        // The head `input` forwarded from a peer (`trusted` or not) to an app that is
        // an RStudio Server (`rstudio`) or not.
        let forwarded = |input: &[u8], trusted: bool, rstudio: bool| {
            let head = req(input).expect("valid").expect("complete");
            let mut to = hop(trusted);
            to.admitted(to.peer.ip(), rstudio);
            let mut out = Vec::new();
            upstream_request(&mut out, input, &head, None, &to, app());
            String::from_utf8(out).expect("ascii")
        };
        let input = b"GET /auth-sign-in?appUri=%2F HTTP/1.1\r\nHost: rs.example:8787\r\nX-RStudio-Request: http://evil/\r\nx-rstudio-proto: gopher\r\nX-RStudio-Root-Path: /evil\r\n\r\n";
        let text = forwarded(input, false, true);
        assert_eq!(
            text.matches("X-RStudio-Request: http://rs.example:8787/auth-sign-in\r\n")
                .count(),
            1,
            "{text}"
        );
        assert_eq!(
            text.matches("X-RStudio-Proto: http\r\n").count(),
            1,
            "{text}"
        );
        assert!(!text.to_ascii_lowercase().contains("evil"), "{text}");
        assert!(!text.contains("gopher"), "{text}");
        // Another app: nothing of the kind from a client, and none added.
        let text = forwarded(input, false, false);
        assert!(!text.to_ascii_lowercase().contains("x-rstudio"), "{text}");
        // Through a trusted proxy: its scheme and host; its root path stands.
        let input = b"GET /s/1/ HTTP/1.1\r\nHost: internal\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: apps.example.com\r\nX-RStudio-Root-Path: /rstudio\r\nX-RStudio-Request: http://evil/\r\n\r\n";
        let text = forwarded(input, true, true);
        assert!(
            text.contains("X-RStudio-Request: https://apps.example.com/s/1/\r\n"),
            "{text}"
        );
        assert!(text.contains("X-RStudio-Proto: https\r\n"), "{text}");
        assert!(text.contains("X-RStudio-Root-Path: /rstudio\r\n"), "{text}");
        assert!(!text.contains("evil"), "{text}");
        // A trusted proxy's scheme that is no word, or a host that is more than a
        // host, makes no URL of it: the connection's scheme, and no request field.
        let input = b"GET /a HTTP/1.1\r\nHost: internal\r\nX-Forwarded-Proto: javascript:alert(1)//\r\nX-Forwarded-Host: front.example/evil?x=\r\n\r\n";
        let text = forwarded(input, true, true);
        assert!(text.contains("X-RStudio-Proto: http\r\n"), "{text}");
        assert!(!text.contains("X-RStudio-Request"), "{text}");
        // Nor of a target that is no path (`OPTIONS *`).
        let text = forwarded(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", false, true);
        assert!(!text.contains("X-RStudio-Request"), "{text}");
    }

    /// What a front proxy tells an app it saw (the scheme, a prefix, the original
    /// URL, any `X-Forwarded-*` beyond the four the worker decides on) reaches the
    /// app only from a trusted proxy; from a client the app would take it as the
    /// worker's word. Table: field, whether a client's reaches the app.
    #[test]
    fn proxy_claims_pass_only_from_trusted_proxies() {
        #[rustfmt::skip]
        let table = [
            ("X-Forwarded-Ssl: on", false),
            ("X-Forwarded-Scheme: https", false),
            ("x-forwarded-prefix: /admin", false),
            ("X-Forwarded-Server: evil", false),
            ("X-FORWARDED-URI: /x", false),
            ("Front-End-Https: on", false),
            ("X-Url-Scheme: https", false),
            ("X-Scheme: https", false),
            ("X-Original-URL: /admin", false),
            ("X-Original-URI: /admin", false),
            ("X-Rewrite-URL: /admin", false),
            ("X_Forwarded_Prefix: /admin", false),
            ("SCRIPT_NAME: /admin", false),
            ("Script-Name: /admin", false),
            ("X-Script-Name: /admin", false),
            ("X-Original-Host: a", false),
            ("X-Envoy-Original-Path: /admin", false),
            ("X-Arr-Ssl: on", false),
            ("X-Real-Scheme: https", false),
            ("X-SSL-Client-Verify: SUCCESS", false),
            ("Ssl-Client-Verify: SUCCESS", false),
            ("X-Client-Verify: SUCCESS", false),
            ("X-Client-Cert: a", false),
            ("X-Forwarded-Prefixes: a", false),
            ("X-ARR-ClientCert: MIIB", false),
            ("Remote-User: admin", false),
            ("REMOTE_USER: admin", false),
            ("X-Remote-User: admin", false),
            ("X-WEBAUTH-USER: admin", false),
            ("X-Auth-Request-User: admin", false),
            ("X-Auth-Request-Email: admin@example.com", false),
            ("X-Auth-Request-Preferred-Username: admin", false),
            ("X-Auth-Request-Groups: admins", false),
            ("X-Auth-Request-Access-Token: t", false),
            ("X-Host: evil", false),
            ("X-HTTP-Host-Override: evil", false),
            ("X-Original-Method: DELETE", false),
            ("X-Real-Port: 443", false),
            // Look-alikes and ordinary fields go on.
            ("Remote-Users: a", true),
            ("X-Auth-Request: a", true),
            ("Referer: http://a/", true),
            ("X-Forwarded-: a", true),
            ("X-Forwardedx: a", true),
            ("X-Schemes: a", true),
            ("X-Original: a", true),
            ("Via: 1.1 front", true),
            ("X-Custom: a", true),
        ];
        for (field, from_clients) in table {
            for trusted in [false, true] {
                let text = forwarded_with(field, trusted);
                // Underscored spellings are dropped from everyone (CGI folding).
                let kept = if field.contains('_') {
                    false
                } else {
                    trusted || from_clients
                };
                assert_eq!(
                    text.contains(&format!("\r\n{field}\r\n")),
                    kept,
                    "{field}, trusted {trusted}: {text}"
                );
            }
        }
    }

    /// The head the app gets for a `GET /` carrying `field`, from a client that is a
    /// trusted proxy or not.
    fn forwarded_with(field: &str, trusted: bool) -> String {
        let id: RequestId = "rid-1".parse().expect("valid");
        let input = format!("GET / HTTP/1.1\r\nHost: h\r\n{field}\r\n\r\n");
        let head = req(input.as_bytes()).expect("valid").expect("complete");
        let mut out = Vec::new();
        upstream_request(
            &mut out,
            input.as_bytes(),
            &head,
            Some(&id),
            &hop(trusted),
            app(),
        );
        String::from_utf8(out).expect("ascii")
    }

    /// `Proxy` never reaches an app, from any client, trusted proxies included: CGI
    /// servers read it as `HTTP_PROXY`, the proxy of the app's own requests
    /// (httpoxy). Look-alikes go on.
    #[test]
    fn the_proxy_field_never_reaches_the_app() {
        for (field, kept) in [
            ("Proxy: http://evil:1", false),
            ("PROXY: http://evil:1", false),
            ("Proxy_: x", true),
            ("Proxy-Status: a", true),
            ("Proxyx: a", true),
        ] {
            for trusted in [false, true] {
                let text = forwarded_with(field, trusted);
                assert_eq!(
                    text.contains(&format!("\r\n{field}\r\n")),
                    kept,
                    "{field}: {text}"
                );
            }
        }
    }

    /// A field named with `_` where a name the worker strips, replaces or decides on
    /// has `-` never reaches the app (CGI-style servers read `X_Real_IP` as
    /// `X-Real-IP`); other names with `_` go on, as sent.
    #[test]
    fn underscored_spellings_of_managed_names_are_dropped() {
        for (field, dropped) in [
            ("X_Real_IP", true),
            ("x_forwarded_for", true),
            ("X_Forwarded-Proto", true),
            ("X-Forwarded_Host", true),
            ("Forwarded_For", true),
            ("True_Client_IP", true),
            ("CF_Connecting_IP", true),
            ("X_HTTP_Method_Override", true),
            ("X_Method_Override", true),
            ("X_HTTP_Method", true),
            ("X_Backend_Request_ID", true),
            ("X_Request_ID", true),
            ("Content_Length", true),
            ("Transfer_Encoding", true),
            ("Keep_Alive", true),
            ("Proxy_Authorization", true),
            ("HTTP2_Settings", true),
            ("X_Original_Forwarded_For", true),
            ("X_Envoy_External_Address", true),
            ("X.Real.IP", true),
            ("X.Forwarded_For", true),
            ("x.http.method.override", true),
            ("my.field", false),
            ("access_token", false),
            ("X_Custom_Thing", false),
            ("X_Real_IP_Extra", false),
            ("_", false),
            ("x_", false),
            (
                "X_Forwarded_For_and_then_a_name_longer_than_any_managed_one",
                false,
            ),
        ] {
            let input = format!("GET / HTTP/1.1\r\nHost: h\r\n{field}: 6.6.6.6\r\n\r\n");
            let head = req(input.as_bytes()).expect("valid").expect("complete");
            let mut out = Vec::new();
            upstream_request(&mut out, input.as_bytes(), &head, None, &hop(false), app());
            let text = String::from_utf8(out).expect("ascii");
            assert_eq!(
                !text.contains(&format!("{field}: 6.6.6.6\r\n")),
                dropped,
                "{field}: {text}"
            );
            assert_eq!(!text.contains("6.6.6.6"), dropped, "{field}: {text}");
        }
    }

    /// The proxy's permit cookie never reaches the app (a cookie goes to every port
    /// and subdomain of its domain, so every app a user visits would get the user's
    /// permit); the app's own cookies go on, the field's name and the pairs' order
    /// kept.
    #[test]
    fn the_permit_cookie_is_not_forwarded() {
        for (cookies, want) in [
            (
                "Cookie: a=1; appproxy_permit=\"p==\"; b=2\r\n",
                "Cookie: a=1; b=2\r\n",
            ),
            ("Cookie: appproxy_permit=p\r\n", ""),
            (
                "COOKIE: appproxy_permit = p ;a=1;;b\r\n",
                "COOKIE: a=1; b\r\n",
            ),
            (
                "Cookie: appproxy_permit=p\r\nCookie: s=1\r\n",
                "Cookie: s=1\r\n",
            ),
            (
                "Cookie: s=1; appproxy_permit=p; appproxy_permit=q\r\n",
                "Cookie: s=1\r\n",
            ),
            // Every user's permit (a browser holds one per user whose /setup it
            // went through), not only the circuit owner's.
            (
                "Cookie: appproxy_permit_3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b=\"p\"; s=1; appproxy_permit_0000=q\r\n",
                "Cookie: s=1\r\n",
            ),
            // Other names that contain the permit's are other cookies.
            (
                "Cookie: xappproxy_permit=1; appproxy_permitx=2\r\n",
                "Cookie: xappproxy_permit=1; appproxy_permitx=2\r\n",
            ),
            ("Cookie: a=1;b=2\r\n", "Cookie: a=1;b=2\r\n"),
        ] {
            let input = format!("GET / HTTP/1.1\r\nHost: h\r\n{cookies}X-After: 1\r\n\r\n");
            let head = req(input.as_bytes()).expect("valid").expect("complete");
            let mut out = Vec::new();
            upstream_request(&mut out, input.as_bytes(), &head, None, &hop(false), app());
            let text = String::from_utf8(out).expect("ascii");
            assert!(
                text.starts_with(&format!(
                    "GET / HTTP/1.1\r\nHost: h\r\n{want}X-After: 1\r\n"
                )),
                "{cookies:?}: {text}"
            );
        }
    }

    /// Found by the round-trip fuzz target: `Connection: Host` made the app get an
    /// HTTP/1.1 request without Host.
    #[test]
    fn host_listed_in_connection_is_kept() {
        let input = b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Host, X-Drop\r\nX-Drop: 1\r\n\r\n";
        let head = req(input).expect("valid").expect("complete");
        let mut out = Vec::new();
        upstream_request(&mut out, input, &head, None, &hop(false), app());
        let text = String::from_utf8(out).expect("ascii");
        assert!(text.contains("\r\nHost: h\r\n"), "{text}");
        assert!(!text.contains("X-Drop"), "{text}");
    }

    #[test]
    fn http10_without_host_gets_the_apps_address() {
        let input = b"GET /x HTTP/1.0\r\n\r\n";
        let head = req(input).expect("valid").expect("complete");
        let mut out = Vec::new();
        upstream_request(&mut out, input, &head, None, &hop(false), app());
        let text = String::from_utf8(out).expect("ascii");
        assert!(
            text.starts_with("GET /x HTTP/1.1\r\nHost: 10.9.9.9:8888\r\n"),
            "{text}"
        );
        let input = b"GET /x HTTP/1.0\r\nHost: given\r\n\r\n";
        let head = req(input).expect("valid").expect("complete");
        let mut out = Vec::new();
        upstream_request(&mut out, input, &head, None, &hop(false), app());
        let text = String::from_utf8(out).expect("ascii");
        assert_eq!(text.matches("\r\nHost: ").count(), 1, "{text}");
        assert!(text.contains("Host: given\r\n"), "{text}");
    }

    #[test]
    fn upstream_request_rewrites_hop_headers() {
        let input = b"POST /x HTTP/1.1\r\nHost: app.local\r\nconnection: keep-alive, X-Drop\r\nX-Drop: 1\r\nkeep-alive: 5\r\nTE: trailers\r\nX-Keep: a\r\nx-keep: b\r\nX-Request-ID: client-id\r\nX-Forwarded-For: 6.6.6.6\r\nContent-Length: 3, 3\r\nExpect: 100-continue\r\n\r\n";
        let head = req(input).expect("valid").expect("complete");
        let id: RequestId = "rid-1".parse().expect("valid");
        let mut out = Vec::new();
        upstream_request(&mut out, input, &head, Some(&id), &hop(false), app());
        let text = String::from_utf8(out).expect("ascii");
        let want = "POST /x HTTP/1.1\r\nHost: app.local\r\nX-Keep: a\r\nx-keep: b\r\nContent-Length: 3\r\nX-Backend-Request-ID: rid-1\r\nX-Forwarded-For: 10.1.2.3\r\nX-Real-IP: 10.1.2.3\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: app.local\r\nX-Forwarded-Port: 8080\r\nForwarded: for=10.1.2.3;host=\"app.local\";proto=http\r\n\r\n";
        assert_eq!(text, want);
        // From a trusted proxy the chain is extended and its proto kept.
        let input = b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Proto: https\r\n\r\n";
        let head = req(input).expect("valid").expect("complete");
        let mut out = Vec::new();
        upstream_request(&mut out, input, &head, Some(&id), &hop(true), app());
        let text = String::from_utf8(out).expect("ascii");
        assert!(
            text.contains("X-Forwarded-For: 1.1.1.1, 10.1.2.3\r\n"),
            "{text}"
        );
        assert!(text.contains("X-Forwarded-Proto: https\r\n"), "{text}");
        assert!(text.contains(";proto=https\r\n"), "{text}");
    }

    /// A reason phrase with obs-text, or none at all, is relayed without one (it used
    /// to be taken from outside the buffer and panic).
    #[test]
    fn odd_reason_phrases_are_left_out() {
        for input in [
            &b"HTTP/1.0 200 O\xfbK\r\nContent-Length: 0\r\n\r\n"[..],
            &b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n"[..],
        ] {
            let head = parse_response(input, Method::Get, 4096)
                .expect("valid")
                .expect("complete");
            assert!(head.reason.end <= input.len());
            let mut out = Vec::new();
            client_response(
                &mut out,
                input,
                &head,
                ClientFraming::Empty,
                None,
                Version::Http11,
                false,
            );
            assert!(out.starts_with(b"HTTP/1.1 200 \r\n"), "{out:?}");
        }
        let input = b"HTTP/1.1 404 Not Found\r\n\r\n";
        let head = parse_response(input, Method::Get, 4096)
            .expect("valid")
            .expect("complete");
        assert_eq!(&input[head.reason], b"Not Found");
    }

    /// An app's `Set-Cookie` of a permit cookie (the original's name, a user's own,
    /// or a nameless cookie a browser sends back as one) is left out, whatever its
    /// spacing or attributes; its other cookies pass.
    #[test]
    fn client_response_leaves_out_the_permit_cookie() {
        let input = b"HTTP/1.1 200 OK\r\nSet-Cookie: appproxy_permit=planted; Path=/api\r\nSet-Cookie: a=1\r\nset-cookie:  appproxy_permit =x\r\nSet-Cookie: appproxy_permit_3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b=y\r\nSet-Cookie: =appproxy_permit=z\r\nSet-Cookie: = appproxy_permit_x =z; Path=/\r\nSet-Cookie: appproxy_permitx=2\r\nSet-Cookie: xappproxy_permit=3\r\nContent-Length: 0\r\n\r\n";
        let head = parse_response(input, Method::Get, 4096)
            .expect("valid")
            .expect("complete");
        let mut out = Vec::new();
        client_response(
            &mut out,
            input,
            &head,
            ClientFraming::Length(0),
            None,
            Version::Http11,
            false,
        );
        assert_eq!(
            String::from_utf8(out).expect("ascii"),
            "HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: appproxy_permitx=2\r\nSet-Cookie: xappproxy_permit=3\r\nContent-Length: 0\r\n\r\n"
        );
        // `Domain` is left out too; a permit cookie with `Domain` is still left
        // out whole.
        let input = b"HTTP/1.1 200 OK\r\nSet-Cookie: appproxy_permit=p; Domain=apps.test\r\nSet-Cookie: a=1; Domain=apps.test; Path=/\r\nContent-Length: 0\r\n\r\n";
        let head = parse_response(input, Method::Get, 4096)
            .expect("valid")
            .expect("complete");
        let mut out = Vec::new();
        client_response(
            &mut out,
            input,
            &head,
            ClientFraming::Length(0),
            None,
            Version::Http11,
            false,
        );
        assert_eq!(
            String::from_utf8(out).expect("ascii"),
            "HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Path=/\r\nContent-Length: 0\r\n\r\n"
        );
    }

    #[test]
    fn client_response_rewrites_framing() {
        let input = b"HTTP/1.1 200 OK\r\nServer: app\r\nConnection: X-Secret\r\nX-Secret: 1\r\nX-Backend-Request-ID: app-said\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n";
        let head = parse_response(input, Method::Get, 4096)
            .expect("valid")
            .expect("complete");
        let id: RequestId = "rid-2".parse().expect("valid");
        let framing = ClientFraming::choose(head.framing, Version::Http11);
        assert_eq!(framing, ClientFraming::Rechunk);
        let mut out = Vec::new();
        client_response(
            &mut out,
            input,
            &head,
            framing,
            Some(&id),
            Version::Http11,
            false,
        );
        assert_eq!(
            String::from_utf8(out).expect("ascii"),
            "HTTP/1.1 200 OK\r\nServer: app\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nTransfer-Encoding: chunked\r\nX-Backend-Request-ID: rid-2\r\n\r\n"
        );
        assert_eq!(
            ClientFraming::choose(head.framing, Version::Http10),
            ClientFraming::UntilClose
        );
        assert_eq!(
            ClientFraming::choose(BodyFraming::Chunked, Version::Http10),
            ClientFraming::Dechunk
        );
    }

    #[test]
    fn error_bodies_are_json_with_the_id() {
        let id: RequestId = "rid-3".parse().expect("valid");
        let mut out = Vec::new();
        error_response(
            &mut out,
            502,
            "upstream_connect_failed",
            "say \"no\"",
            &id,
            Keep::Close,
            false,
        );
        let text = String::from_utf8(out).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("head");
        assert!(head.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(head.contains("X-Backend-Request-ID: rid-3"));
        assert!(head.contains("Connection: close"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["error"], "say \"no\"");
        assert_eq!(v["code"], "upstream_connect_failed");
        assert_eq!(v["request_id"], "rid-3");

        // To a HEAD: the same head, no body.
        let mut bare = Vec::new();
        error_response(
            &mut bare,
            502,
            "upstream_connect_failed",
            "say \"no\"",
            &id,
            Keep::Close,
            true,
        );
        assert_eq!(bare, format!("{head}\r\n\r\n").into_bytes());
    }
}

proptest::proptest! {
    /// Any input: no panic, and a complete head's offsets lie inside the input.
    #[test]
    fn parse_request_never_panics(input in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
        if let Ok(Some(head)) = req(&input) {
            proptest::prop_assert!(head.head_len <= input.len());
            for h in &head.headers {
                proptest::prop_assert!(h.name.end <= head.head_len && h.value.end <= head.head_len);
            }
        }
    }

    /// A well-formed request built from random parts parses back to the same parts.
    #[test]
    fn request_round_trip(
        path in "/[a-zA-Z0-9/_.-]{0,64}",
        headers in proptest::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,20}", "[ -~]{0,40}"), 0..20),
        len in proptest::option::of(0u64..1_000_000),
    ) {
        let mut text = format!("GET {path} HTTP/1.1\r\nHost: h\r\n");
        let mut sent = vec![];
        for (n, v) in &headers {
            let lower = n.to_ascii_lowercase();
            if ["host", "content-length", "transfer-encoding", "expect", "connection", "upgrade"].contains(&lower.as_str()) {
                continue;
            }
            let v = v.trim();
            text.push_str(&format!("{n}: {v}\r\n"));
            sent.push((n.clone(), v.to_owned()));
        }
        if let Some(len) = len {
            text.push_str(&format!("Content-Length: {len}\r\n"));
        }
        text.push_str("\r\n");
        let head = req(text.as_bytes()).expect("valid").expect("complete");
        let buf = text.as_bytes();
        proptest::prop_assert_eq!(&buf[head.target.clone()], path.as_bytes());
        proptest::prop_assert_eq!(head.framing, BodyFraming::Length(len.unwrap_or(0)));
        let got: Vec<(String, String)> = head.headers.iter().skip(1)
            .filter(|h| !buf[h.name.clone()].eq_ignore_ascii_case(b"content-length"))
            .map(|h| (String::from_utf8_lossy(&buf[h.name.clone()]).into_owned(), String::from_utf8_lossy(&buf[h.value.clone()]).into_owned()))
            .collect();
        proptest::prop_assert_eq!(got, sent);
    }

    /// The line ends are checked where httparse found the lines, not byte by byte:
    /// a head is refused for a bare LF exactly when, counted byte by byte, it has
    /// one (as many CRs as LFs, httparse taking a CR only before an LF), whichever
    /// lines end so: empty ones before the request line, the request line, field
    /// lines with values that end in white space, the empty line.
    #[test]
    fn a_head_is_refused_for_a_bare_lf_exactly_when_it_has_one(
        lead in proptest::collection::vec(proptest::bool::ANY, 0..3),
        fields in proptest::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,8}", "[ -~]{0,12}", proptest::bool::ANY), 0..6),
        line_crlf in proptest::bool::ANY,
        empty_crlf in proptest::bool::ANY,
    ) {
        let end = |crlf: bool| if crlf { "\r\n" } else { "\n" };
        let mut text: String = lead.iter().map(|&crlf| end(crlf)).collect();
        text.push_str("GET / HTTP/1.1");
        text.push_str(end(line_crlf));
        text.push_str("Host: h\r\n");
        for (n, v, crlf) in &fields {
            if ["host", "content-length", "transfer-encoding", "expect"].contains(&n.to_ascii_lowercase().as_str()) {
                continue;
            }
            text.push_str(&format!("{n}: {v}{}", end(*crlf)));
        }
        text.push_str(end(empty_crlf));
        let bytes = text.as_bytes();
        let bare = bytes.iter().filter(|&&b| b == b'\r').count() != bytes.iter().filter(|&&b| b == b'\n').count();
        match req(bytes) {
            Err(RequestError::Malformed("a line ending in a bare LF")) => proptest::prop_assert!(bare, "{text:?}"),
            Ok(Some(head)) => {
                proptest::prop_assert!(!bare, "{text:?}");
                proptest::prop_assert_eq!(head.head_len, bytes.len());
            }
            other => proptest::prop_assert!(false, "{text:?}: {other:?}"),
        }
    }
}

/// One reading of `host[:port]` for `Host`, absolute-form targets and origins.
#[test]
fn authorities_parse_strictly() {
    use super::parse::Authority;
    let some = |host: &'static [u8], port| Some(Authority { host, port });
    #[rustfmt::skip]
    let table: &[(&[u8], Option<Authority<'static>>)] = &[
        (b"a", some(b"a", None)),
        (b"App.Example:8443", some(b"App.Example", Some(8443))),
        (b"a.", some(b"a", None)),
        (b"a:", some(b"a", None)),
        (b"a_b-c.d:0", some(b"a_b-c.d", Some(0))),
        (b"[::1]", some(b"[::1]", None)),
        (b"[::ffff:1.2.3.4]:65535", some(b"[::ffff:1.2.3.4]", Some(65535))),
        (b"", None),
        (b":80", None),
        (b".", None),
        (b"a:65536", None),
        (b"a:123456", None),
        (b"a:8x", None),
        (b"a:+80", None),
        (b"a:80:80", None),
        (b"u@a", None),
        (b"a%2e", None),
        (b"a b", None),
        (b"[]", None),
        (b"[::1", None),
        (b"[::1]x", None),
        (b"[::1]:", some(b"[::1]", None)),
        (b"[g::1]", None),
        (b"\xc3\xa9", None),
    ];
    for (text, want) in table {
        assert_eq!(
            Authority::parse(text),
            *want,
            "{:?}",
            String::from_utf8_lossy(text)
        );
    }
    let a = Authority::parse(b"A:80").expect("valid");
    assert!(a.same(&Authority::parse(b"a").expect("valid"), 80));
    assert!(!a.same(&Authority::parse(b"a").expect("valid"), 443));
    assert!(!a.same(&Authority::parse(b"b:80").expect("valid"), 80));
}

/// A relayed status gets its registered reason phrase, or a neutral one by class;
/// never "Error" for a success (`HTTP/1.1 204 Error`).
#[test]
fn every_status_gets_a_fitting_reason_phrase() {
    use super::error::reason;
    assert_eq!(reason(204), "No Content");
    assert_eq!(reason(304), "Not Modified");
    assert_eq!(reason(413), "Content Too Large");
    assert_eq!(reason(299), "Success");
    assert_eq!(reason(599), "Server Error");
}
