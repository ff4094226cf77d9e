//! Ids, API keys and the admin token: made from the OS's random source, stored only as hashes.

use crate::error::{Error, Result};
use rand::TryRngCore;
use sha2::{Digest, Sha256};

/// The prefix every API key starts with.
pub const API_KEY_PREFIX: &str = "tg_";

/// The prefix every credit voucher code starts with.
pub const VOUCHER_CODE_PREFIX: &str = "tgv_";

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| Error::internal(format!("OS random source: {e}")))?;
    Ok(bytes)
}

pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

/// Appends `bytes` in lower-case hex.
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

/// A new API key: `tg_` and 192 random bits in hex.
pub fn new_api_key() -> Result<String> {
    Ok(format!("{API_KEY_PREFIX}{}", hex(&random_bytes::<24>()?)))
}

/// A new operator token: `tga_` and 192 random bits in hex.
pub fn new_admin_token() -> Result<String> {
    Ok(format!("tga_{}", hex(&random_bytes::<24>()?)))
}

/// A new credit voucher code: `tgv_` and 128 random bits in hex.
pub fn new_voucher_code() -> Result<String> {
    Ok(format!(
        "{VOUCHER_CODE_PREFIX}{}",
        hex(&random_bytes::<16>()?)
    ))
}

/// A new webhook signing secret: `whsec_` and 256 random bits in hex.
pub fn new_webhook_secret() -> Result<String> {
    Ok(format!(
        "{}{}",
        tollgate_contract::webhook::SECRET_PREFIX,
        hex(&random_bytes::<32>()?)
    ))
}

/// A new key for signing image links: 256 random bits in hex.
pub fn new_link_key() -> Result<String> {
    Ok(hex(&random_bytes::<32>()?))
}

/// A new dashboard session token (the cookie's value): 192 random bits in hex.
pub fn new_session_token() -> Result<String> {
    Ok(hex(&random_bytes::<24>()?))
}

/// A new id with a type prefix, e.g. `task_3f…` (96 random bits: unguessable across accounts).
pub fn new_id(prefix: &str) -> Result<String> {
    Ok(format!("{prefix}_{}", hex(&random_bytes::<12>()?)))
}

/// The stored form of a secret. Keys carry ≥128 random bits, so a fast hash is enough: nothing
/// can be brute-forced from it, and lookups by hash compare no secret byte by byte.
pub fn hash_secret(secret: &str) -> String {
    hex(&key_digest(secret))
}

/// The SHA-256 of a secret, as bytes: what [`hash_secret`] writes in hex.
pub fn key_digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Hex SHA-256 of arbitrary bytes (request fingerprints).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The first characters of a key, safe to show in lists.
pub fn key_prefix(key: &str) -> String {
    key.chars().take(API_KEY_PREFIX.len() + 6).collect()
}

/// Compares two hashes without an early exit, so timing says nothing about how much matched.
/// (Hand-rolled: five lines do not earn a dependency.)
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_random_and_prefixed() {
        let a = new_api_key().unwrap();
        let b = new_api_key().unwrap();
        assert!(a.starts_with("tg_"));
        assert_eq!(a.len(), 3 + 48);
        assert_ne!(a, b);
        assert_eq!(hash_secret(&a).len(), 64);
        assert_ne!(hash_secret(&a), hash_secret(&b));
        assert!(new_id("task").unwrap().starts_with("task_"));
    }

    #[test]
    fn constant_time_eq_works() {
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "ab"));
    }
}
