//! Access control compatible with the original platform: the `appproxy_permit` cookie
//! of interactive circuits, bearer JWTs of inference circuits, and the `/setup` token.
//!
//! JWTs are HS256 only (the platform signs nothing else); the signature is checked in
//! constant time before any claim is read.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};

use crate::http::parse::Authority;

/// Digest of the permit HMAC (`permit_digest`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PermitDigest {
    /// SHA-224.
    Sha224,
    /// SHA-256 (the default).
    #[default]
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

/// An access refusal, with the original platform's error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refused {
    /// HTTP status (401, 403 or 400).
    pub status: u16,
    /// `E2000x` code.
    pub code: &'static str,
    /// What was wrong (never echoes the credential).
    pub message: &'static str,
}

const fn refused(status: u16, code: &'static str, message: &'static str) -> Refused {
    Refused {
        status,
        code,
        message,
    }
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 0xf) as usize] as char);
    }
    s
}

/// HMAC of `msg` under `secret` with digest `$d`, as lowercase hex. (HMAC accepts
/// keys of any length, so key setup cannot fail.)
macro_rules! hmac_hex {
    ($d:ty, $secret:expr, $msg:expr) => {{
        let mut mac =
            <Hmac<$d> as Mac>::new_from_slice($secret).expect("HMAC takes any key length");
        mac.update($msg);
        hex(&mac.finalize().into_bytes())
    }};
}

/// The permit cookie value of `user_id`: standard base64 of the lowercase hex HMAC.
pub fn permit_value(secret: &str, user_id: &uuid::Uuid, digest: PermitDigest) -> String {
    let user = user_id.hyphenated().to_string();
    let hex = match digest {
        PermitDigest::Sha224 => hmac_hex!(sha2::Sha224, secret.as_bytes(), user.as_bytes()),
        PermitDigest::Sha256 => hmac_hex!(sha2::Sha256, secret.as_bytes(), user.as_bytes()),
        PermitDigest::Sha384 => hmac_hex!(sha2::Sha384, secret.as_bytes(), user.as_bytes()),
        PermitDigest::Sha512 => hmac_hex!(sha2::Sha512, secret.as_bytes(), user.as_bytes()),
    };
    STANDARD.encode(hex.as_bytes())
}

/// The value of cookie `name` in a `Cookie` header value, unquoted.
pub fn cookie<'a>(header: &'a [u8], name: &'a str) -> Option<&'a [u8]> {
    cookies(header, name).next()
}

/// Every value of cookie `name` in a `Cookie` header value, unquoted, in order (a
/// browser sends each cookie of that name its jar holds for the request's path).
pub fn cookies<'a>(header: &'a [u8], name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    cookie_pairs(header)
        .filter(move |(k, _)| *k == name.as_bytes())
        .map(|(_, v)| v)
}

/// Every `(name, value)` pair of a `Cookie` header value, the value unquoted, in
/// order; a pair without `=` is none.
fn cookie_pairs(header: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    header.split(|b| *b == b';').filter_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|b| *b == b'=')?;
        let (k, v) = (pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii());
        Some((
            k,
            match v {
                [b'"', inner @ .., b'"'] => inner,
                v => v,
            },
        ))
    })
}

/// Checks the permit cookie of an interactive circuit owned by `user_id`: the
/// owner's own cookie ([`crate::http::encode::permit_cookie_name`]) or the
/// original's one name ([`crate::http::encode::PERMIT_COOKIE`]). Every cookie of
/// those names counts: the request is the user's when any of them is the user's
/// permit. A page on the same host (cookies ignore ports) can plant a cookie of such
/// a name under a longer path, which browsers send first; were only the first tried,
/// it would lock the user out of their own circuits. Another user's permit cookie
/// (the browser went through that user's `/setup` link) is not the owner's and is
/// not tried.
pub fn check_permit(
    cookie_headers: &[&[u8]],
    secret: &str,
    user_id: Option<&uuid::Uuid>,
    digest: PermitDigest,
) -> Result<(), Refused> {
    use crate::http::encode::{is_permit_cookie_name, permit_cookie_name, PERMIT_COOKIE};
    let pairs = || cookie_headers.iter().flat_map(|h| cookie_pairs(h));
    if !pairs().any(|(name, _)| is_permit_cookie_name(name)) {
        return Err(refused(401, "E20004", "permit cookie missing"));
    }
    let user = user_id.ok_or(refused(401, "E20005", "permit does not match"))?;
    let own = permit_cookie_name(user);
    let want = permit_value(secret, user, digest);
    if pairs()
        .filter(|(name, _)| *name == own.as_bytes() || *name == PERMIT_COOKIE.as_bytes())
        .any(|(_, v)| constant_time_eq(v, want.as_bytes()))
    {
        Ok(())
    } else {
        Err(refused(401, "E20005", "permit does not match"))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Verifies an HS256 JWT and returns its claims; `exp` and `nbf`, when present, are
/// enforced.
pub fn verify_hs256(
    token: &[u8],
    secret: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, Refused> {
    use appproxy_shared::jwt::JwtError;
    appproxy_shared::jwt::verify_hs256(token, secret).map_err(|e| match e {
        JwtError::Expired => refused(401, "E20008", "token expired"),
        JwtError::NotYetValid => refused(401, "E20008", "token not yet valid"),
        JwtError::Malformed | JwtError::BadSignature => refused(401, "E20008", "invalid token"),
    })
}

pub use appproxy_shared::jwt::sign_hs256;

/// Checks the bearer JWT of an inference circuit: `Authorization: Bearer <jwt>` or
/// `BackendAI <jwt>` (the scheme in any case, RFC 9110 §11.1), whose `id` claim
/// names the circuit. `authorization` is every `Authorization` field of the
/// request: more than one is refused, since the app would get them all and might
/// read one the worker never checked.
pub fn check_bearer<'a>(
    mut authorization: impl Iterator<Item = &'a [u8]>,
    secret: &str,
    circuit: &uuid::Uuid,
) -> Result<(), Refused> {
    let value = authorization
        .next()
        .ok_or(refused(401, "E20006", "authorization missing"))?;
    if authorization.next().is_some() {
        return Err(refused(401, "E20006", "more than one Authorization field"));
    }
    let scheme = |name: &[u8]| {
        value
            .split_at_checked(name.len() + 1)
            .filter(|(s, _)| s[..name.len()].eq_ignore_ascii_case(name) && s[name.len()] == b' ')
            .map(|(_, token)| token)
    };
    let token = scheme(b"Bearer")
        .or_else(|| scheme(b"BackendAI"))
        .ok_or(refused(401, "E20007", "unsupported authorization scheme"))?;
    let claims = verify_hs256(token.trim_ascii(), secret)?;
    let id = claims.get("id").and_then(|v| v.as_str()).unwrap_or("");
    if uuid::Uuid::parse_str(id).ok().as_ref() == Some(circuit) {
        Ok(())
    } else {
        Err(refused(401, "E20009", "token is not for this circuit"))
    }
}

/// A browser origin as the cross-origin guard compares it: scheme and host in lower
/// case, the host without a trailing dot, the port explicit when the scheme has a
/// default (`http` 80, `https` 443).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

impl Origin {
    /// Parses a serialized origin, `scheme://host[:port]` (RFC 6454 §6.2): no
    /// userinfo, path, query or fragment. `null` (the origin of sandboxed frames,
    /// `data:` pages, some redirects) is no origin: `None`, as is anything malformed.
    pub fn parse(text: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(text.trim_ascii()).ok()?;
        let (scheme, rest) = text.split_once("://")?;
        let valid_scheme = scheme.as_bytes().first()?.is_ascii_alphabetic()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
        if !valid_scheme {
            return None;
        }
        let scheme = scheme.to_ascii_lowercase();
        let authority = Authority::parse(rest.as_bytes())?;
        Some(Self {
            port: authority.port.or(default_port(&scheme)),
            scheme,
            // ASCII by `Authority::parse`.
            host: String::from_utf8_lossy(authority.host).to_ascii_lowercase(),
        })
    }
}

/// The default port of a web scheme.
fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", self.scheme, self.host)?;
        match self.port {
            Some(p) => write!(f, ":{p}"),
            None => Ok(()),
        }
    }
}

/// The refusal of a cross-origin request.
pub const CROSS_ORIGIN: Refused = refused(403, "cross_origin", "cross-origin request refused");

/// The cross-site request guard of a request the permit cookie admitted: the
/// browser attaches the cookie to requests any same-site page makes (every app of the
/// worker is same-site to every other), so the `Origin` it sends says whose page
/// asked. No `Origin` (non-browser clients, navigations, plain subresource loads):
/// admitted. Exactly one `Origin` that is one of `allowed`, or an `http`/`https`
/// origin naming the host and port the request is addressed to (`host`: its `Host`
/// or `:authority`; a `host` without a port names the default port of the origin's
/// scheme, as browsers leave it out of both): admitted. The scheme is not compared
/// otherwise (behind a TLS-terminating balancer the worker cannot tell which one the
/// browser spoke; one host and port is one frontend). `Origin: null` is admitted
/// only when the browser's own `Sec-Fetch-Site` (`fetch_site`, which no script can
/// set) says `same-origin`: a page with `Referrer-Policy: no-referrer` sends `null`
/// on its own form posts. Anything else — another host or port, any other `null`, a
/// malformed value, two `Origin` fields, no `host` — is refused.
pub fn check_origin<'a>(
    mut origins: impl Iterator<Item = &'a [u8]>,
    host: Option<&[u8]>,
    fetch_site: Option<&[u8]>,
    allowed: &[Origin],
) -> Result<(), Refused> {
    let Some(first) = origins.next() else {
        return Ok(());
    };
    if origins.next().is_some() {
        return Err(CROSS_ORIGIN);
    }
    if first.trim_ascii() == b"null" && fetch_site.map(<[u8]>::trim_ascii) == Some(b"same-origin") {
        return Ok(());
    }
    let origin = Origin::parse(first).ok_or(CROSS_ORIGIN)?;
    if allowed.contains(&origin) {
        return Ok(());
    }
    let Some(default) = default_port(&origin.scheme) else {
        return Err(CROSS_ORIGIN);
    };
    let own = host.and_then(|h| Authority::parse(h.trim_ascii()));
    match own {
        Some(own)
            if own.host.eq_ignore_ascii_case(origin.host.as_bytes())
                && Some(own.port.unwrap_or(default)) == origin.port =>
        {
            Ok(())
        }
        _ => Err(CROSS_ORIGIN),
    }
}

/// Whether the header fields of an `OPTIONS` request make it a genuine CORS
/// preflight, the one request a private circuit lets through without credentials
/// (browsers send preflights without cookies or `Authorization`): exactly one
/// non-empty `Origin`, exactly one `Access-Control-Request-Method` naming a method
/// token, and nothing that could carry more than a head: no `Upgrade`, no
/// `Connection` naming anything but `keep-alive` or `close` (an `upgrade`, or a
/// field the worker would strip as hop-by-hop: the app must see the preflight this
/// check saw), no `Transfer-Encoding`, no `Content-Length` other than 0,
/// and no method override (`X-HTTP-Method-Override` and kin, which some frameworks
/// honour and no browser sends on a preflight).
/// The caller also checks the method and that the parsed framing has no body.
pub fn is_cors_preflight<'a>(headers: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> bool {
    let is = |name: &[u8], want: &str| name.eq_ignore_ascii_case(want.as_bytes());
    let token = |v: &[u8]| {
        !v.is_empty()
            && v.iter()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
    };
    let (mut origins, mut methods) = (0u32, 0u32);
    for (name, value) in headers {
        let value = value.trim_ascii();
        if is(name, "origin") {
            if value.is_empty() {
                return false;
            }
            origins += 1;
        } else if is(name, "access-control-request-method") {
            if !token(value) {
                return false;
            }
            methods += 1;
        } else if is(name, "upgrade")
            || is(name, "transfer-encoding")
            || crate::http::encode::METHOD_OVERRIDE
                .iter()
                .any(|m| is(name, m))
        {
            return false;
        } else if is(name, "content-length") {
            if value != b"0" {
                return false;
            }
        } else if is(name, "connection")
            && value.split(|b| *b == b',').any(|t| {
                let t = t.trim_ascii();
                !t.is_empty()
                    && !t.eq_ignore_ascii_case(b"keep-alive")
                    && !t.eq_ignore_ascii_case(b"close")
            })
        {
            // `upgrade`, or a field named hop-by-hop: the worker strips the fields
            // `Connection` lists, so `Connection: Origin` would reach the app as a
            // plain `OPTIONS` without the fields that made it a preflight here.
            return false;
        }
    }
    origins == 1 && methods == 1
}

/// A response field of the worker's own answer to a CORS preflight (its name in
/// lower case, as HTTP/2 writes it; HTTP/1.1 names are case-insensitive).
pub type PreflightField = (&'static str, Vec<u8>);

/// The longest `Access-Control-Request-Headers` echoed (the list a browser sends
/// names the request's non-safelisted fields: short).
const MAX_REQUEST_HEADERS: usize = 1024;

/// The worker's answer (204) to a genuine CORS preflight ([`is_cors_preflight`]) on a
/// private circuit. A preflight is the one request such a circuit takes without a
/// credential, so it never reaches the app: forwarded, an app that does not tell
/// `OPTIONS` from `GET` (Node's `http`, Express `app.all`, Go's `HandleFunc`) answered
/// a preflight-shaped request from any client with the data its credential protects.
///
/// `credentialed`: the circuit's credential is the permit cookie, so the request the
/// browser asks about carries it, and only an origin of `allowed` may make it (the
/// guard refuses every other cross-origin request with the cookie: the preflight of
/// one gets the same 403 now). Otherwise (a bearer token, which no browser attaches
/// on its own) any origin may ask (`*`, `null` included). The answer lets the browser send the request it
/// asked about — the method, the fields it named — and nothing more; whether the
/// page may read the answer is still the app's to say, on that answer.
pub fn answer_preflight<'a>(
    headers: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    credentialed: bool,
    allowed: &[Origin],
) -> Result<Vec<PreflightField>, Refused> {
    let is = |name: &[u8], want: &str| name.eq_ignore_ascii_case(want.as_bytes());
    let (mut origin, mut method) = (None, None);
    let mut requested: Vec<u8> = Vec::new();
    let mut requested_ok = true;
    for (name, value) in headers {
        let value = value.trim_ascii();
        if is(name, "origin") {
            origin = Some(value);
        } else if is(name, "access-control-request-method") {
            method = Some(value);
        } else if is(name, "access-control-request-headers") {
            // A list of field names (token chars, commas, blanks), joined; anything
            // else is not echoed (the browser then refuses its request).
            requested_ok &= value
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~, \t".contains(b));
            if !value.is_empty() {
                if !requested.is_empty() {
                    requested.extend_from_slice(b", ");
                }
                requested.extend_from_slice(value);
            }
        }
    }
    // Both are there, one each ([`is_cors_preflight`]); be safe anyway.
    let (Some(origin), Some(method)) = (origin, method) else {
        return Err(CROSS_ORIGIN);
    };
    let mut fields: Vec<PreflightField> = Vec::with_capacity(6);
    if credentialed {
        let parsed = Origin::parse(origin).ok_or(CROSS_ORIGIN)?;
        if !allowed.contains(&parsed) {
            return Err(CROSS_ORIGIN);
        }
        fields.push(("access-control-allow-origin", origin.to_vec()));
        fields.push(("access-control-allow-credentials", b"true".to_vec()));
    } else {
        // Any origin, `null` (a sandboxed frame, a `file:` page) included: a
        // request without credentials, which `*` allows.
        fields.push(("access-control-allow-origin", b"*".to_vec()));
    }
    fields.push(("access-control-allow-methods", method.to_vec()));
    if requested_ok && !requested.is_empty() && requested.len() <= MAX_REQUEST_HEADERS {
        fields.push(("access-control-allow-headers", requested));
    }
    fields.push(("access-control-max-age", b"600".to_vec()));
    fields.push((
        "vary",
        b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers".to_vec(),
    ));
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    #[test]
    fn permit_matches_the_reference_example() {
        let user = uuid::Uuid::parse_str("3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b").expect("uuid");
        assert_eq!(
            permit_value("PERMIT_HASH_SECRET", &user, PermitDigest::Sha256),
            "YmZkY2NmYTQ5ZWNjODMwYmIyZTBmOTRiYTFjNGEzYzdkYzAwOGUyZjY3ODY4NTQzNDA5MTlkNzE1YjlmZTg1YQ=="
        );
        assert_ne!(
            permit_value("PERMIT_HASH_SECRET", &user, PermitDigest::Sha512),
            permit_value("PERMIT_HASH_SECRET", &user, PermitDigest::Sha256)
        );
    }

    #[test]
    fn cookies_quoted_and_plain() {
        assert_eq!(
            cookie(b"a=1; appproxy_permit=\"abc==\"; b=2", "appproxy_permit"),
            Some(&b"abc=="[..])
        );
        assert_eq!(
            cookie(b"appproxy_permit=abc==", "appproxy_permit"),
            Some(&b"abc=="[..])
        );
        assert_eq!(cookie(b"xappproxy_permit=abc", "appproxy_permit"), None);
        let user = uuid::Uuid::new_v4();
        let good = format!(
            "appproxy_permit=\"{}\"",
            permit_value("s", &user, PermitDigest::Sha256)
        );
        assert_eq!(
            check_permit(&[good.as_bytes()], "s", Some(&user), PermitDigest::Sha256),
            Ok(())
        );
        assert_eq!(
            check_permit(&[], "s", Some(&user), PermitDigest::Sha256)
                .expect_err("missing")
                .code,
            "E20004"
        );
        assert_eq!(
            check_permit(
                &[b"appproxy_permit=nope"],
                "s",
                Some(&user),
                PermitDigest::Sha256
            )
            .expect_err("bad")
            .code,
            "E20005"
        );
        // A cookie of the permit's name planted by a page on the same host (sent
        // first, for its longer path) does not hide the user's own, in one `Cookie`
        // field or across several.
        let planted_first = format!("appproxy_permit=planted; {good}");
        assert_eq!(
            check_permit(
                &[planted_first.as_bytes()],
                "s",
                Some(&user),
                PermitDigest::Sha256
            ),
            Ok(())
        );
        assert_eq!(
            check_permit(
                &[b"appproxy_permit=planted", good.as_bytes()],
                "s",
                Some(&user),
                PermitDigest::Sha256
            ),
            Ok(())
        );
        assert_eq!(
            check_permit(
                &[b"appproxy_permit=planted; appproxy_permit=\"other\""],
                "s",
                Some(&user),
                PermitDigest::Sha256
            )
            .expect_err("none is the user's")
            .code,
            "E20005"
        );
    }

    /// Each user's permit has a cookie of its own (`/setup` sets it): the owner's
    /// is taken beside the original's one name, another user's is not the owner's.
    #[test]
    fn permit_cookies_are_per_user() {
        let owner = uuid::Uuid::new_v4();
        let other = uuid::Uuid::new_v4();
        let name = |u: &uuid::Uuid| crate::http::encode::permit_cookie_name(u);
        let value = |u: &uuid::Uuid| permit_value("s", u, PermitDigest::Sha256);
        let check = |cookies: &str| {
            check_permit(
                &[cookies.as_bytes()],
                "s",
                Some(&owner),
                PermitDigest::Sha256,
            )
            .map_err(|r| r.code)
        };
        assert_eq!(name(&owner), format!("appproxy_permit_{}", owner.simple()));
        // The owner's own cookie, beside another user's (the browser went through
        // that user's /setup link after the owner's), in either order.
        let own = format!("{}=\"{}\"", name(&owner), value(&owner));
        let others = format!("{}=\"{}\"", name(&other), value(&other));
        assert_eq!(check(&format!("{others}; {own}")), Ok(()));
        assert_eq!(check(&format!("{own}; {others}")), Ok(()));
        // Another user's permit alone, or the owner's value under another user's
        // name, is not the owner's.
        assert_eq!(check(&others), Err("E20005"));
        assert_eq!(
            check(&format!("{}={}", name(&other), value(&owner))),
            Err("E20005")
        );
        // The original's one name still carries a permit.
        assert_eq!(check(&format!("appproxy_permit={}", value(&owner))), Ok(()));
        // Names that only contain the permit's are no permit.
        assert_eq!(
            check(&format!("appproxy_permitx={}", value(&owner))),
            Err("E20004")
        );
    }

    #[test]
    fn jwt_checks() {
        let circuit = uuid::Uuid::new_v4();
        let good = sign_hs256(&serde_json::json!({"id": circuit.to_string()}), "k");
        assert_eq!(
            check_bearer(
                std::iter::once(format!("Bearer {good}").as_bytes()),
                "k",
                &circuit
            ),
            Ok(())
        );
        assert_eq!(
            check_bearer(
                std::iter::once(format!("BackendAI {good}").as_bytes()),
                "k",
                &circuit
            ),
            Ok(())
        );
        let code = |auth: Option<&str>| {
            check_bearer(auth.map(str::as_bytes).into_iter(), "k", &circuit)
                .expect_err("refused")
                .code
        };
        // The original's codes: E20006 no `Authorization`, E20007 a scheme it does
        // not take, E20008 a token that is not valid, E20009 one for another circuit.
        assert_eq!(code(None), "E20006");
        // The scheme in any case (RFC 9110 §11.1; the original took only `Bearer`
        // and `BackendAI` as written).
        for scheme in ["bearer", "BEARER", "backendai", "BackendAi"] {
            assert_eq!(
                check_bearer(
                    std::iter::once(format!("{scheme} {good}").as_bytes()),
                    "k",
                    &circuit
                ),
                Ok(()),
                "{scheme}"
            );
        }
        assert_eq!(code(Some("Bearer")), "E20007", "no token");
        for other in ["Bearerx", "Basic", "Bear", ""] {
            assert_eq!(code(Some(&format!("{other} {good}"))), "E20007", "{other}");
        }
        assert_eq!(code(Some(&format!("Bearer{good}"))), "E20007", "no space");
        // A second field, checked or not, refuses the request: the app would get
        // both, and might read the one the worker did not check.
        let two = |a: &str, b: &str| {
            check_bearer([a.as_bytes(), b.as_bytes()].into_iter(), "k", &circuit)
                .expect_err("refused")
                .message
        };
        let checked = format!("Bearer {good}");
        assert_eq!(
            two(&checked, "Basic YWRtaW46YWRtaW4="),
            "more than one Authorization field"
        );
        assert_eq!(
            two("Basic YWRtaW46YWRtaW4=", &checked),
            "more than one Authorization field"
        );
        assert_eq!(two(&checked, &checked), "more than one Authorization field");
        assert_eq!(
            code(Some(&format!(
                "Bearer {}",
                sign_hs256(&serde_json::json!({"id": circuit.to_string()}), "other")
            ))),
            "E20008"
        );
        assert_eq!(
            code(Some(&format!(
                "Bearer {}",
                sign_hs256(
                    &serde_json::json!({"id": uuid::Uuid::new_v4().to_string()}),
                    "k"
                )
            ))),
            "E20009"
        );
        assert_eq!(
            code(Some(&format!(
                "Bearer {}",
                sign_hs256(
                    &serde_json::json!({"id": circuit.to_string(), "exp": 1}),
                    "k"
                )
            ))),
            "E20008"
        );
        assert_eq!(code(Some("Bearer not.a.jwt")), "E20008");
        // alg=none is refused even with a valid-looking body.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(format!("{{\"id\":\"{circuit}\"}}").as_bytes())
        );
        assert_eq!(code(Some(&format!("Bearer {none}"))), "E20008");
    }

    #[test]
    fn origins_parse_and_normalise() {
        let show = |t: &str| Origin::parse(t.as_bytes()).map(|o| o.to_string());
        assert_eq!(
            show("https://A.Example.COM").as_deref(),
            Some("https://a.example.com:443")
        );
        assert_eq!(
            show("HTTP://a.example:80").as_deref(),
            Some("http://a.example:80")
        );
        assert_eq!(
            show("http://a.example.:8080").as_deref(),
            Some("http://a.example:8080")
        );
        assert_eq!(
            show("http://[::1]:8888").as_deref(),
            Some("http://[::1]:8888")
        );
        assert_eq!(
            show("chrome-extension://abc").as_deref(),
            Some("chrome-extension://abc")
        );
        for bad in [
            "null",
            "",
            "a.example",
            "https://",
            "https://a.example/",
            "https://a.example/path",
            "https://user@a.example",
            "https://a.example:99999",
            "https://a.example:+80",
            "https://a.example:x",
            "https://a example",
            "https://[zz]:1",
            "1http://a.example",
            "https://a.example?x",
        ] {
            assert_eq!(show(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_origin_must_be_the_addressed_host_and_port() {
        let check = |origins: &[&str], host: Option<&str>, allowed: &[&str]| {
            let allowed: Vec<Origin> = allowed
                .iter()
                .map(|a| Origin::parse(a.as_bytes()).expect("allowed origin"))
                .collect();
            check_origin(
                origins.iter().map(|o| o.as_bytes()),
                host.map(str::as_bytes),
                None,
                &allowed,
            )
            .is_ok()
        };
        let h = Some("jupyter.apps.example.com");
        assert!(check(&[], h, &[]));
        assert!(check(&[], None, &[]));
        assert!(check(&["https://jupyter.apps.example.com"], h, &[]));
        assert!(check(&["http://jupyter.apps.example.com"], h, &[]));
        assert!(check(&["https://jupyter.apps.example.com:443"], h, &[]));
        assert!(check(
            &["https://JUPYTER.apps.example.com"],
            Some("Jupyter.Apps.Example.Com:443"),
            &[]
        ));
        assert!(check(
            &["https://jupyter.apps.example.com"],
            Some("jupyter.apps.example.com.:443"),
            &[]
        ));
        assert!(check(&["http://proxy:10205"], Some("proxy:10205"), &[]));
        assert!(check(&["https://proxy:10205"], Some("proxy:10205"), &[]));
        assert!(check(&["http://[::1]:10205"], Some("[::1]:10205"), &[]));
        assert!(!check(&["https://evil.apps.example.com"], h, &[]));
        assert!(!check(&["https://jupyter.apps.example.com:8443"], h, &[]));
        assert!(!check(&["http://jupyter.apps.example.com:443"], h, &[]));
        assert!(!check(&["http://proxy:10206"], Some("proxy:10205"), &[]));
        assert!(!check(&["http://proxy"], Some("proxy:10205"), &[]));
        assert!(!check(&["http://proxy:10205"], Some("proxy"), &[]));
        assert!(!check(&["null"], h, &[]));
        assert!(!check(&[""], h, &[]));
        assert!(!check(&["jupyter.apps.example.com"], h, &[]));
        assert!(!check(&["https://jupyter.apps.example.com"], None, &[]));
        assert!(!check(
            &["https://jupyter.apps.example.com"],
            Some("bad host"),
            &[]
        ));
        assert!(!check(&["ftp://jupyter.apps.example.com"], h, &[]));
        assert!(!check(
            &[
                "https://jupyter.apps.example.com",
                "https://jupyter.apps.example.com"
            ],
            h,
            &[]
        ));
        // `null` only with the browser's word that the page is the same origin.
        let null = |site: Option<&str>| {
            check_origin(
                [&b"null"[..]].into_iter(),
                h.map(str::as_bytes),
                site.map(str::as_bytes),
                &[],
            )
            .is_ok()
        };
        assert!(null(Some("same-origin")));
        assert!(!null(Some("same-site")));
        assert!(!null(Some("cross-site")));
        assert!(!null(Some("none")));
        assert!(!null(None));
        // Extra origins, compared whole (scheme included, default port normalised).
        let console = &["https://console.example.com"];
        assert!(check(&["https://console.example.com:443"], h, console));
        assert!(check(&["https://Console.example.com"], h, console));
        assert!(!check(&["http://console.example.com"], h, console));
        assert!(!check(&["https://console.example.com:8443"], h, console));
        assert!(!check(&["null"], h, console));
    }

    #[test]
    fn only_genuine_preflights() {
        let check = |fields: &[(&str, &str)]| {
            is_cors_preflight(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
        };
        let o = ("Origin", "https://a.example");
        let m = ("Access-Control-Request-Method", "PUT");
        assert!(check(&[o, m]));
        assert!(check(&[
            o,
            m,
            ("Content-Length", "0"),
            ("Access-Control-Request-Headers", "x-a")
        ]));
        assert!(!check(&[]));
        assert!(!check(&[o]));
        assert!(!check(&[m]));
        assert!(!check(&[("Origin", ""), m]));
        assert!(!check(&[o, ("Access-Control-Request-Method", "")]));
        assert!(!check(&[o, ("Access-Control-Request-Method", "P T")]));
        assert!(!check(&[o, o, m]));
        assert!(!check(&[o, m, m]));
        assert!(!check(&[o, m, ("Upgrade", "websocket")]));
        assert!(!check(&[o, m, ("Connection", "keep-alive, Upgrade")]));
        assert!(check(&[o, m, ("Connection", "keep-alive")]));
        assert!(check(&[o, m, ("Connection", "Close")]));
        assert!(check(&[o, m, ("Connection", "keep-alive, ,")]));
        // The fields that make it a preflight, or any other, named hop-by-hop: the
        // worker would strip them and the app see a plain OPTIONS.
        assert!(!check(&[o, m, ("Connection", "Origin")]));
        assert!(!check(&[
            o,
            m,
            ("Connection", "keep-alive, Access-Control-Request-Method")
        ]));
        assert!(!check(&[o, m, ("Connection", "x-anything")]));
        assert!(!check(&[o, m, ("Transfer-Encoding", "chunked")]));
        assert!(!check(&[o, m, ("Content-Length", "5")]));
        assert!(!check(&[o, m, ("Content-Length", "00")]));
        assert!(!check(&[o, m, ("X-HTTP-Method-Override", "DELETE")]));
        assert!(!check(&[o, m, ("X-Method-Override", "DELETE")]));
    }

    /// The worker's answers to preflights, by the circuit's credential.
    #[test]
    fn preflights_are_answered_by_the_worker() {
        let allowed = [Origin::parse(b"https://console.example").expect("origin")];
        let answer = |fields: &[(&str, &str)], credentialed: bool| {
            answer_preflight(
                fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())),
                credentialed,
                &allowed,
            )
            .map(|f| {
                f.into_iter()
                    .map(|(n, v)| (n, String::from_utf8(v).expect("ascii")))
                    .collect::<Vec<_>>()
            })
        };
        let get = |f: &[(&str, String)], name: &str| {
            f.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone())
        };
        // Permit-cookie circuits: listed origins only, with credentials.
        let f = answer(
            &[
                ("Origin", "https://console.example"),
                ("Access-Control-Request-Method", "PUT"),
                (
                    "Access-Control-Request-Headers",
                    "content-type, x-xsrftoken",
                ),
            ],
            true,
        )
        .expect("a listed origin");
        assert_eq!(
            get(&f, "access-control-allow-origin").as_deref(),
            Some("https://console.example")
        );
        assert_eq!(
            get(&f, "access-control-allow-credentials").as_deref(),
            Some("true")
        );
        assert_eq!(
            get(&f, "access-control-allow-methods").as_deref(),
            Some("PUT")
        );
        assert_eq!(
            get(&f, "access-control-allow-headers").as_deref(),
            Some("content-type, x-xsrftoken")
        );
        for origin in [
            "https://evil.example",
            "null",
            "https://console.example.evil",
            "http://console.example",
        ] {
            let refused = answer(
                &[("Origin", origin), ("Access-Control-Request-Method", "PUT")],
                true,
            );
            assert_eq!(
                refused.err().map(|r| r.code),
                Some("cross_origin"),
                "{origin}"
            );
        }
        // Bearer circuits: any origin, never with credentials.
        let f = answer(
            &[
                ("origin", "https://chat.example"),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", "authorization"),
                ("access-control-request-headers", "content-type"),
            ],
            false,
        )
        .expect("any origin");
        assert_eq!(get(&f, "access-control-allow-origin").as_deref(), Some("*"));
        assert_eq!(get(&f, "access-control-allow-credentials"), None);
        assert_eq!(
            get(&f, "access-control-allow-headers").as_deref(),
            Some("authorization, content-type")
        );
        // `null` (a sandboxed frame, a `file:` page) too.
        let f = answer(
            &[
                ("Origin", "null"),
                ("Access-Control-Request-Method", "POST"),
            ],
            false,
        )
        .expect("null");
        assert_eq!(get(&f, "access-control-allow-origin").as_deref(), Some("*"));
        // A requested-fields list that is not one is not echoed.
        let f = answer(
            &[
                ("Origin", "https://chat.example"),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "x-a; x-b"),
            ],
            false,
        )
        .expect("answered");
        assert_eq!(get(&f, "access-control-allow-headers"), None);
    }
}
