//! Dashboard sessions: signing in with an API key (an account holder) or the operator token.
//!
//! The browser holds a random 192-bit token in a cookie; the store keeps only its hash, the
//! principal and an absolute expiry (`Config::session_ttl`). Every page load looks the session
//! up again, and an account session only lives while the API key it was opened with does, so
//! revoking that key signs the browser out at once. An operator session ends when the operator
//! token changes. The CSRF token of a session is derived from its cookie token, so it is stable
//! for the session's life, differs between sessions, and cannot be computed from what is stored.
//!
//! Sign-in attempts are rate limited per client address (per /64 for IPv6) and per credential
//! prefix, whether or not they succeed.

use crate::config::Secret;
use crate::domain::secrets;
use crate::domain::service::{Caller, Tollgate};
use crate::error::{Error, Result};
use crate::store::{SessionPrincipal, SessionRecord};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;
use time::OffsetDateTime;

/// Sign-in attempts allowed per minute, per client address and per credential prefix.
pub const SIGN_IN_ATTEMPTS_PER_MINUTE: u32 = 10;

/// Who is looking at the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Viewer {
    /// An account holder, signed in with the API key `key_id`.
    Account { account_id: String, key_id: String },
    /// The operator.
    Operator,
}

/// A live dashboard session.
#[derive(Clone, PartialEq, Eq)]
pub struct DashboardSession {
    pub viewer: Viewer,
    /// What every form of this session must carry back.
    pub csrf_token: String,
    pub expires_at: OffsetDateTime,
}

impl fmt::Debug for DashboardSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DashboardSession")
            .field("viewer", &self.viewer)
            .field("csrf_token", &"(redacted)")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl DashboardSession {
    /// Whether `token` (from a submitted form) is this session's CSRF token; constant time.
    pub fn csrf_matches(&self, token: &str) -> bool {
        secrets::constant_time_eq(token, &self.csrf_token)
    }
}

/// A session just opened: the token goes into the cookie and nowhere else.
#[derive(Debug)]
pub struct SignedIn {
    pub token: Secret,
    pub session: DashboardSession,
}

/// Counts sign-in attempts (GCRA, in process) by client address and by credential prefix.
pub struct SignInLimiter {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl Default for SignInLimiter {
    fn default() -> Self {
        let per_minute = NonZeroU32::new(SIGN_IN_ATTEMPTS_PER_MINUTE).unwrap_or(NonZeroU32::MIN);
        SignInLimiter {
            limiter: governor::RateLimiter::keyed(Quota::per_minute(per_minute)),
            clock: DefaultClock::default(),
        }
    }
}

impl SignInLimiter {
    /// Counts one attempt; `Some(wait)` when it must be refused.
    fn check(&self, client: IpAddr, credential: &str) -> Option<Duration> {
        let client = match client {
            // One IPv6 user typically holds a whole /64.
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
            v4 => v4,
        };
        let prefix: String = credential
            .chars()
            .take(secrets::API_KEY_PREFIX.len() + 6)
            .collect();
        [format!("ip:{client}"), format!("credential:{prefix}")]
            .into_iter()
            .filter_map(|key| self.limiter.check_key(&key).err())
            .map(|not_until| not_until.wait_time_from(self.clock.now()))
            .max()
    }

    /// Drops the state of keys that are back to a full allowance (called by the periodic purge).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
    }
}

fn csrf_token_of(session_token: &str) -> String {
    secrets::sha256_hex(format!("tollgate-dashboard-csrf:{session_token}").as_bytes())
}

fn looks_like_session_token(token: &str) -> bool {
    token.len() == 48 && token.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Tollgate {
    /// Opens a dashboard session for whoever `credential` belongs to: the operator (the operator
    /// token) or an account holder (a live API key). `client` is the address the attempt came
    /// from. Refused attempts: `RateLimited` (too many attempts), `MissingCredential`,
    /// `InvalidCredential`.
    pub async fn sign_in(&self, credential: &str, client: IpAddr) -> Result<SignedIn> {
        let credential = credential.trim();
        if let Some(wait) = self.sign_in_limits.check(client, credential) {
            return Err(Error::RateLimited { retry_after: wait });
        }
        if credential.is_empty() {
            return Err(Error::MissingCredential { admin: false });
        }
        let (principal, viewer) = if self.authenticate_admin(Some(credential)).is_ok() {
            (
                SessionPrincipal::Operator {
                    admin_token_hash: self.admin_token_hash().to_owned(),
                },
                Viewer::Operator,
            )
        } else {
            let caller = self.authenticate(Some(credential)).await?;
            (
                SessionPrincipal::Account {
                    account_id: caller.account_id.clone(),
                    key_id: caller.key_id.clone(),
                },
                Viewer::Account {
                    account_id: caller.account_id,
                    key_id: caller.key_id,
                },
            )
        };
        let token = secrets::new_session_token()?;
        let created_at = self.now();
        let expires_at = created_at + self.config.session_ttl;
        self.store
            .create_session(&SessionRecord {
                token_hash: secrets::hash_secret(&token),
                principal,
                created_at,
                expires_at,
            })
            .await?;
        match &viewer {
            Viewer::Account { account_id, key_id } => {
                tracing::info!(account_id = %account_id, key_id = %key_id, "dashboard sign-in");
            }
            Viewer::Operator => tracing::info!("dashboard sign-in by the operator"),
        }
        Ok(SignedIn {
            session: DashboardSession {
                viewer,
                csrf_token: csrf_token_of(&token),
                expires_at,
            },
            token: Secret::new(token),
        })
    }

    /// The live session of a cookie token: `None` when it is unknown, expired, its API key was
    /// revoked, or (an operator session) the operator token changed since.
    pub async fn dashboard_session(&self, token: &str) -> Result<Option<DashboardSession>> {
        if !looks_like_session_token(token) {
            return Ok(None);
        }
        let Some(record) = self
            .store
            .get_session(&secrets::hash_secret(token), self.now())
            .await?
        else {
            return Ok(None);
        };
        let viewer = match record.principal {
            SessionPrincipal::Account { account_id, key_id } => {
                Viewer::Account { account_id, key_id }
            }
            SessionPrincipal::Operator { admin_token_hash } => {
                if !secrets::constant_time_eq(&admin_token_hash, self.admin_token_hash()) {
                    return Ok(None);
                }
                Viewer::Operator
            }
        };
        Ok(Some(DashboardSession {
            viewer,
            csrf_token: csrf_token_of(token),
            expires_at: record.expires_at,
        }))
    }

    /// Ends the session of a cookie token (nothing happens if there is none).
    pub async fn sign_out(&self, token: &str) -> Result<()> {
        if looks_like_session_token(token) {
            self.store
                .delete_session(&secrets::hash_secret(token))
                .await?;
        }
        Ok(())
    }

    /// The API caller an account session acts as (for the routes the dashboard shares with the
    /// API, such as task images); `None` for the operator.
    pub fn session_caller(&self, session: &DashboardSession) -> Option<Caller> {
        match &session.viewer {
            Viewer::Account { account_id, key_id } => Some(Caller {
                account_id: account_id.clone(),
                key_id: key_id.clone(),
                rate_limit: self.config.default_rate_limit,
                spend_limit: None,
            }),
            Viewer::Operator => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_in_limit_counts_per_address_and_per_credential() {
        let limits = SignInLimiter::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for i in 0..SIGN_IN_ATTEMPTS_PER_MINUTE {
            assert_eq!(limits.check(a, &format!("tg_{i:06}")), None);
        }
        // The address is spent, whatever the credential.
        assert!(limits.check(a, "tg_other").is_some());
        // Another address with a fresh credential is fine...
        assert_eq!(limits.check(b, "tg_fresh0"), None);
        // ...and one credential prefix is limited across addresses.
        for _ in 0..SIGN_IN_ATTEMPTS_PER_MINUTE {
            let _ = limits.check("10.0.1.1".parse().unwrap(), "tg_target");
        }
        let wait = limits.check("10.0.2.2".parse().unwrap(), "tg_target");
        assert!(
            wait.is_some_and(|w| w <= Duration::from_secs(6)),
            "{wait:?}"
        );
    }

    #[test]
    fn ipv6_counts_per_64() {
        let limits = SignInLimiter::default();
        for i in 0..SIGN_IN_ATTEMPTS_PER_MINUTE {
            let ip: IpAddr = format!("2001:db8::{i:x}").parse().unwrap();
            assert_eq!(limits.check(ip, &format!("tg_{i:06}")), None);
        }
        assert!(limits
            .check("2001:db8::ffff".parse().unwrap(), "tg_zzzzzz")
            .is_some());
    }

    #[test]
    fn csrf_tokens_differ_per_session_and_hide_the_cookie() {
        let a = secrets::new_session_token().unwrap();
        let b = secrets::new_session_token().unwrap();
        assert!(looks_like_session_token(&a));
        assert_ne!(csrf_token_of(&a), csrf_token_of(&b));
        assert_ne!(csrf_token_of(&a), secrets::hash_secret(&a));
        assert!(!csrf_token_of(&a).contains(&a));
    }
}
