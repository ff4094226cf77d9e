//! Checking webhook deliveries: is this POST really from tollgate, about this body, and recent?
//!
//! tollgate signs every delivery with the account's webhook secret (`GET /v1/account/webhook-secret`,
//! [`crate::Client::webhook_secret`]): `Tollgate-Signature: t=<unix seconds>,v1=<hex>`, where the hex
//! is HMAC-SHA256 of `"<t>.<raw body>"`. A receiver checks it before trusting the body:
//!
//! ```
//! use std::time::SystemTime;
//! use tollgate_client::webhook::{self, DEFAULT_TOLERANCE};
//!
//! fn handle(secret: &str, signature_header: &str, raw_body: &[u8]) -> Result<(), webhook::WebhookError> {
//!     webhook::verify(secret, signature_header, raw_body, DEFAULT_TOLERANCE, SystemTime::now())?;
//!     // Trusted: parse raw_body as a `tollgate_client::Task`. Deliveries are at least once:
//!     // deduplicate by the task id (also in the `Tollgate-Webhook-Id` header).
//!     Ok(())
//! }
//! # let secret = "whsec_test";
//! # let body = br#"{"id":"task_1"}"#;
//! # let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
//! # let header = webhook::sign(secret, now, body);
//! # handle(secret, &header, body).unwrap();
//! ```
//!
//! The implementation lives in the contract crate (`tollgate_contract::webhook`), the one the server
//! signs with, so the two cannot drift apart.

pub use tollgate_contract::webhook::{
    sign, verify, WebhookError, DEFAULT_TOLERANCE, SECRET_PREFIX, SIGNATURE_HEADER,
};

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::{Duration, SystemTime};

    const SECRET: &str = "whsec_5f0c3a9e8d7b6a5f4e3d2c1b0a998877";

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn signed(body: &[u8]) -> String {
        sign(SECRET, 1_800_000_000, body)
    }

    #[test]
    fn accepts_what_the_server_signs() {
        let body = br#"{"id":"task_1","object":"task","status":"succeeded"}"#;
        assert_eq!(
            verify(SECRET, &signed(body), body, DEFAULT_TOLERANCE, now()),
            Ok(())
        );
    }

    #[test]
    fn refuses_a_tampered_body() {
        let body = br#"{"id":"task_1","status":"failed"}"#;
        let header = signed(body);
        let tampered = br#"{"id":"task_1","status":"succeeded"}"#;
        assert_eq!(
            verify(SECRET, &header, tampered, DEFAULT_TOLERANCE, now()),
            Err(WebhookError::Mismatch)
        );
        // Even one byte of whitespace counts: verify the raw bytes, not re-serialised JSON.
        let spaced = br#"{"id":"task_1", "status":"failed"}"#;
        assert_eq!(
            verify(SECRET, &header, spaced, DEFAULT_TOLERANCE, now()),
            Err(WebhookError::Mismatch)
        );
    }

    #[test]
    fn refuses_another_secret() {
        let body = b"{}";
        assert_eq!(
            verify(
                "whsec_not_this_accounts",
                &signed(body),
                body,
                DEFAULT_TOLERANCE,
                now()
            ),
            Err(WebhookError::Mismatch)
        );
    }

    #[test]
    fn refuses_a_stale_timestamp() {
        let body = b"{}";
        let header = signed(body);
        let later = now() + DEFAULT_TOLERANCE + Duration::from_secs(1);
        assert_eq!(
            verify(SECRET, &header, body, DEFAULT_TOLERANCE, later),
            Err(WebhookError::Stale)
        );
        // Within a custom tolerance it is fine.
        assert_eq!(
            verify(SECRET, &header, body, Duration::from_secs(3600), later),
            Ok(())
        );
    }

    #[test]
    fn refuses_a_malformed_header() {
        assert_eq!(
            verify(SECRET, "sha256=abc", b"{}", DEFAULT_TOLERANCE, now()),
            Err(WebhookError::Malformed)
        );
        assert!(WebhookError::Malformed
            .to_string()
            .contains("Tollgate-Signature"));
    }
}
