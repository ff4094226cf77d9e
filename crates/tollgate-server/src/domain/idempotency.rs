//! The rules of `Idempotency-Key`: which keys are valid, what counts as "the same request",
//! and how long a key and a reservation live.

use crate::domain::secrets::sha256_hex;
use crate::error::{Error, Result};
use std::time::Duration;
use tollgate_contract::ErrorCode;

/// A response is kept for replay this long.
pub const KEY_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// A reservation whose request has not finished after this long is presumed dead (its process
/// crashed) and may be taken over by a retry.
pub const STALE_RESERVATION: Duration = Duration::from_secs(60);

/// Checks the header value: 1–255 printable ASCII characters.
pub fn validate_key(key: &[u8]) -> Result<String> {
    let ok = (1..=255).contains(&key.len()) && key.iter().all(|b| (0x20..=0x7e).contains(b));
    if !ok {
        return Err(Error::invalid(
            ErrorCode::InvalidValue,
            "Idempotency-Key",
            "Idempotency-Key must be 1 to 255 printable ASCII characters.",
        ));
    }
    String::from_utf8(key.to_vec()).map_err(|_| Error::internal("printable ASCII is UTF-8"))
}

/// What makes two requests "the same": method, path and body. A JSON body is compared by its
/// meaning, not its bytes, so a retry that reorders keys or spacing still matches.
pub fn fingerprint(method: &str, path: &str, body: &[u8]) -> String {
    let canonical = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|value| serde_json::to_vec(&value).ok());
    let body = canonical.as_deref().unwrap_or(body);
    let mut input = Vec::with_capacity(method.len() + path.len() + body.len() + 2);
    input.extend_from_slice(method.as_bytes());
    input.push(b' ');
    input.extend_from_slice(path.as_bytes());
    input.push(b'\n');
    input.extend_from_slice(body);
    sha256_hex(&input)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert!(validate_key(b"abc-123").is_ok());
        assert!(validate_key(b"").is_err());
        assert!(validate_key(&[b'a'; 256]).is_err());
        assert!(validate_key("caf\u{e9}".as_bytes()).is_err());
        assert!(validate_key(b"tab\there").is_err());
    }

    #[test]
    fn same_meaning_same_fingerprint() {
        let a = fingerprint("POST", "/v1/x", br#"{"a":1,"b":2}"#);
        let b = fingerprint("POST", "/v1/x", br#"{ "b": 2, "a": 1 }"#);
        let c = fingerprint("POST", "/v1/x", br#"{"a":1,"b":3}"#);
        let d = fingerprint("POST", "/v1/y", br#"{"a":1,"b":2}"#);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }
}
