//! Webhook signatures: how the server signs a delivery and how a receiver checks it.
//!
//! A delivery carries `Tollgate-Signature: t=<unix seconds>,v1=<hex>`, where `<hex>` is
//! HMAC-SHA256, under the account's webhook secret, of the timestamp, a `.`, and the raw body
//! bytes exactly as received. Signing the timestamp with the body lets a receiver refuse an old
//! delivery replayed later ([`verify`]'s `tolerance`). Several `v1=` entries may appear; one
//! matching is enough (room for a secret rotation with overlap).
//!
//! Pure computation, no I/O: the server signs with [`sign`], the SDK re-exports [`verify`]
//! (`tollgate_client::webhook`), and both compile against this one definition.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use std::time::{Duration, SystemTime};

type HmacSha256 = Hmac<Sha256>;

/// The header that carries the signature (the canonical spelling; header names are case-blind).
pub const SIGNATURE_HEADER: &str = "Tollgate-Signature";

/// What a receiver should accept by default: five minutes between signing and checking.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

/// The prefix of every webhook secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// Why a delivery was refused by [`verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookError {
    /// The header is not `t=<digits>,v1=<hex>[,v1=<hex>…]`.
    Malformed,
    /// The timestamp is further from `now` than the tolerance (an old delivery replayed, or a
    /// clock far off).
    Stale,
    /// No `v1` signature matches: the body was changed, or the secret is not this account's.
    Mismatch,
}

impl fmt::Display for WebhookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WebhookError::Malformed => {
                "the Tollgate-Signature header is not of the form t=<seconds>,v1=<hex>"
            }
            WebhookError::Stale => "the signature's timestamp is outside the tolerance",
            WebhookError::Mismatch => "no signature matches the body under this secret",
        })
    }
}

impl std::error::Error for WebhookError {}

fn mac(secret: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length (long ones are hashed first), so this never falls back.
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| <HmacSha256 as hmac::digest::KeyInit>::new(&Default::default()));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Lower-case hex of `bytes` (signatures, digests).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// The bytes of a hex string (either case); `None` when it is not hex.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    let pairs = text.as_bytes().chunks_exact(2);
    if !pairs.remainder().is_empty() {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    pairs
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// The `Tollgate-Signature` value for `body` sent at `timestamp` (Unix seconds).
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let digest = mac(secret, timestamp, body).finalize().into_bytes();
    format!("t={timestamp},v1={}", hex(&digest))
}

/// Checks a delivery: `header` is the `Tollgate-Signature` value, `body` the raw bytes received
/// (before any JSON parsing), `tolerance` how far the signed timestamp may be from `now`
/// ([`DEFAULT_TOLERANCE`] is a good choice). The comparison runs in constant time.
pub fn verify(
    secret: &str,
    header: &str,
    body: &[u8],
    tolerance: Duration,
    now: SystemTime,
) -> Result<(), WebhookError> {
    let mut timestamp: Option<i64> = None;
    let mut signatures: Vec<Vec<u8>> = Vec::new();
    for part in header.split(',') {
        let (name, value) = part.trim().split_once('=').ok_or(WebhookError::Malformed)?;
        match name {
            "t" if timestamp.is_none() && value.bytes().all(|b| b.is_ascii_digit()) => {
                timestamp = Some(value.parse().map_err(|_| WebhookError::Malformed)?);
            }
            "v1" => signatures.push(unhex(value).ok_or(WebhookError::Malformed)?),
            // Schemes this version does not know are skipped, so the server can add one.
            _ if name != "t" => {}
            _ => return Err(WebhookError::Malformed),
        }
    }
    let timestamp = timestamp.ok_or(WebhookError::Malformed)?;
    if signatures.is_empty() {
        return Err(WebhookError::Malformed);
    }
    let now_secs = match now.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i128::from(d.as_secs()),
        Err(e) => -i128::from(e.duration().as_secs()),
    };
    if (now_secs - i128::from(timestamp)).unsigned_abs() > u128::from(tolerance.as_secs()) {
        return Err(WebhookError::Stale);
    }
    let expected = mac(secret, timestamp, body);
    if signatures
        .iter()
        .any(|candidate| expected.clone().verify_slice(candidate).is_ok())
    {
        Ok(())
    } else {
        Err(WebhookError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_0123456789abcdef0123456789abcdef";

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_known_vector() {
        // Python: hmac.new(SECRET, b'1700000000.{"id":"task_1"}', hashlib.sha256).hexdigest()
        assert_eq!(
            sign(SECRET, 1_700_000_000, br#"{"id":"task_1"}"#),
            "t=1700000000,v1=9b775d95cb3671abdb5b9e3198d3426d961bac5e419c09a18aea7fea41f3a61d"
        );
    }

    #[test]
    fn round_trip_and_refusals() {
        let body = br#"{"id":"task_1","status":"succeeded"}"#;
        let header = sign(SECRET, 1_700_000_000, body);
        let now = at(1_700_000_030);
        assert_eq!(
            verify(SECRET, &header, body, DEFAULT_TOLERANCE, now),
            Ok(())
        );
        // Tampered body.
        let tampered = br#"{"id":"task_1","status":"failed"}"#;
        assert_eq!(
            verify(SECRET, &header, tampered, DEFAULT_TOLERANCE, now),
            Err(WebhookError::Mismatch)
        );
        // Wrong secret.
        assert_eq!(
            verify("whsec_other", &header, body, DEFAULT_TOLERANCE, now),
            Err(WebhookError::Mismatch)
        );
        // Stale, and too far in the future.
        assert_eq!(
            verify(SECRET, &header, body, DEFAULT_TOLERANCE, at(1_700_000_301)),
            Err(WebhookError::Stale)
        );
        assert_eq!(
            verify(SECRET, &header, body, DEFAULT_TOLERANCE, at(1_699_999_000)),
            Err(WebhookError::Stale)
        );
        // A changed timestamp breaks the signature.
        let moved = header.replace("t=1700000000", "t=1700000020");
        assert_eq!(
            verify(SECRET, &moved, body, DEFAULT_TOLERANCE, now),
            Err(WebhookError::Mismatch)
        );
    }

    #[test]
    fn several_signatures_and_unknown_schemes() {
        let body = b"{}";
        let good = sign(SECRET, 1_700_000_000, body);
        let v1 = good.split_once(",v1=").map(|(_, s)| s).unwrap_or_default();
        let header = format!("t=1700000000,v0=abc,v1={},v1={v1}", "00".repeat(32));
        assert_eq!(
            verify(SECRET, &header, body, DEFAULT_TOLERANCE, at(1_700_000_000)),
            Ok(())
        );
    }

    #[test]
    fn malformed_headers() {
        let now = at(1_700_000_000);
        for header in [
            "",
            "v1=00",
            "t=1700000000",
            "t=abc,v1=00",
            "t=1700000000,v1=zz",
            "t=1700000000,v1=0",
            "t=1,t=2,v1=00",
            "nonsense",
        ] {
            assert_eq!(
                verify(SECRET, header, b"{}", DEFAULT_TOLERANCE, now),
                Err(WebhookError::Malformed),
                "{header:?}"
            );
        }
    }
}
