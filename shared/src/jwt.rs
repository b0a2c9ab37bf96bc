//! HS256 JSON Web Tokens, the only kind the platform signs: `/setup` tokens,
//! inference bearer tokens and storage session tokens. The signature is checked in
//! constant time before any claim is read; `exp` and `nbf`, when present, are
//! enforced.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};

/// Claims of a verified token.
pub type Claims = serde_json::Map<String, serde_json::Value>;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts of JSON, or not HS256.
    #[error("malformed token")]
    Malformed,
    /// The signature does not match.
    #[error("bad token signature")]
    BadSignature,
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// `nbf` (not before) is in the future: the token is not valid yet.
    #[error("token not yet valid")]
    NotYetValid,
}

fn mac(secret: &str) -> Hmac<sha2::Sha256> {
    // HMAC takes keys of any length: this cannot fail.
    <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes any key length")
}

/// Seconds since the epoch, now.
pub fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Signs `claims` with HS256.
pub fn sign_hs256(claims: &serde_json::Value, secret: &str) -> String {
    let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let p = URL_SAFE_NO_PAD.encode(claims.to_string().as_bytes());
    let mut m = mac(secret);
    m.update(format!("{h}.{p}").as_bytes());
    let s = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
    format!("{h}.{p}.{s}")
}

/// Verifies an HS256 token and returns its claims.
pub fn verify_hs256(token: &[u8], secret: &str) -> Result<Claims, JwtError> {
    let token = std::str::from_utf8(token).map_err(|_| JwtError::Malformed)?;
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header: serde_json::Value = URL_SAFE_NO_PAD
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(JwtError::Malformed)?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
        return Err(JwtError::Malformed);
    }
    // RFC 7515 §4.1.11: extensions the token says must be understood are refused,
    // as none is.
    if header.get("crit").is_some() {
        return Err(JwtError::Malformed);
    }
    let signature = URL_SAFE_NO_PAD.decode(s).map_err(|_| JwtError::Malformed)?;
    let mut m = mac(secret);
    m.update(&token.as_bytes()[..h.len() + 1 + p.len()]);
    m.verify_slice(&signature)
        .map_err(|_| JwtError::BadSignature)?;
    let claims: Claims = URL_SAFE_NO_PAD
        .decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(JwtError::Malformed)?;
    if let Some(exp) = claims.get("exp") {
        let exp = exp.as_f64().ok_or(JwtError::Malformed)?;
        if now_epoch() >= exp {
            return Err(JwtError::Expired);
        }
    }
    // RFC 7519 §4.1.5: not accepted before `nbf`. No leeway, as `exp` has none: the
    // signer and the verifier read clocks kept in step.
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf.as_f64().ok_or(JwtError::Malformed)?;
        if now_epoch() < nbf {
            return Err(JwtError::NotYetValid);
        }
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header naming extensions that must be understood is refused, signed or
    /// not; one without `crit` is taken.
    #[test]
    fn a_critical_extension_is_refused() {
        let signed = |header: &str| {
            let input = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header),
                URL_SAFE_NO_PAD.encode("{}")
            );
            let mut m = mac("k");
            m.update(input.as_bytes());
            format!(
                "{input}.{}",
                URL_SAFE_NO_PAD.encode(m.finalize().into_bytes())
            )
        };
        let plain = signed(r#"{"alg":"HS256","x-ext":1}"#);
        assert!(verify_hs256(plain.as_bytes(), "k").is_ok());
        for crit in [r#"["x-ext"]"#, "[]", "null"] {
            let t = signed(&format!(r#"{{"alg":"HS256","crit":{crit},"x-ext":1}}"#));
            assert_eq!(
                verify_hs256(t.as_bytes(), "k"),
                Err(JwtError::Malformed),
                "{crit}"
            );
        }
    }

    #[test]
    fn round_trip_and_refusals() {
        let t = sign_hs256(&serde_json::json!({"a": 1}), "k");
        assert_eq!(verify_hs256(t.as_bytes(), "k").expect("valid")["a"], 1);
        assert_eq!(
            verify_hs256(t.as_bytes(), "other"),
            Err(JwtError::BadSignature)
        );
        assert_eq!(verify_hs256(b"a.b", "k"), Err(JwtError::Malformed));
        let old = sign_hs256(&serde_json::json!({"exp": 1}), "k");
        assert_eq!(verify_hs256(old.as_bytes(), "k"), Err(JwtError::Expired));
        let early = sign_hs256(&serde_json::json!({"nbf": 4_000_000_000u64}), "k");
        assert_eq!(
            verify_hs256(early.as_bytes(), "k"),
            Err(JwtError::NotYetValid)
        );
        let begun = sign_hs256(&serde_json::json!({"nbf": 1, "exp": 4e9}), "k");
        assert!(verify_hs256(begun.as_bytes(), "k").is_ok());
        let odd = sign_hs256(&serde_json::json!({"nbf": "soon"}), "k");
        assert_eq!(verify_hs256(odd.as_bytes(), "k"), Err(JwtError::Malformed));
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(b"{}")
        );
        assert_eq!(verify_hs256(none.as_bytes(), "k"), Err(JwtError::Malformed));
    }
}
