//! Per-account rate limits: GCRA through `governor`, one limiter per account, in process.
//!
//! An admission reports what the IETF `RateLimit` headers need (the quota, what is left, when it
//! refills) and, when refused, the exact wait until the next request would be admitted: the
//! `Retry-After` the client gets is that wait rounded up, never earlier.

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::Quota;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use tollgate_contract::RateLimit;

type Limiter =
    governor::RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// The verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// The limit that was applied.
    pub limit: RateLimit,
    /// Requests that could be sent right now without waiting.
    pub remaining: u32,
    /// Until the burst is whole again.
    pub reset: Duration,
    /// `Some(wait)` when the request is refused: the exact wait until one would be admitted.
    pub retry_after: Option<Duration>,
}

impl Admission {
    pub fn admitted(&self) -> bool {
        self.retry_after.is_none()
    }

    /// The time to refill the whole burst: the window of the `RateLimit-Policy` header.
    pub fn window(&self) -> Duration {
        interval(self.limit) * self.limit.burst
    }
}

fn interval(limit: RateLimit) -> Duration {
    Duration::from_secs(60) / limit.requests_per_minute.max(1)
}

/// The limiters of every account that has sent a request.
pub struct RateLimits {
    limiters: DashMap<String, (RateLimit, Arc<Limiter>)>,
    clock: DefaultClock,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            limiters: DashMap::new(),
            clock: DefaultClock::default(),
        }
    }
}

impl RateLimits {
    /// Counts one request of `account_id` against `limit`.
    ///
    /// A changed limit (set through the operator API) replaces the account's limiter, so it
    /// applies from the next request on.
    pub fn check(&self, account_id: &str, limit: RateLimit) -> Admission {
        let limiter = self.limiter(account_id, limit);
        let per = interval(limit);
        match limiter.check() {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Admission {
                    limit,
                    remaining,
                    reset: per * limit.burst.saturating_sub(remaining),
                    retry_after: None,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Admission {
                    limit,
                    remaining: 0,
                    reset: wait + per * limit.burst.saturating_sub(1),
                    retry_after: Some(wait),
                }
            }
        }
    }

    fn limiter(&self, account_id: &str, limit: RateLimit) -> Arc<Limiter> {
        if let Some(entry) = self.limiters.get(account_id) {
            if entry.0 == limit {
                return Arc::clone(&entry.1);
            }
        }
        let quota = Quota::per_minute(
            NonZeroU32::new(limit.requests_per_minute).unwrap_or(NonZeroU32::MIN),
        )
        .allow_burst(NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN));
        let limiter = Arc::new(
            governor::RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>(),
        );
        self.limiters
            .insert(account_id.to_owned(), (limit, Arc::clone(&limiter)));
        limiter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_exact_wait() {
        let limits = RateLimits::default();
        let limit = RateLimit {
            requests_per_minute: 60,
            burst: 3,
        };
        for expected in [2, 1, 0] {
            let a = limits.check("acct", limit);
            assert!(a.admitted());
            assert_eq!(a.remaining, expected);
        }
        let refused = limits.check("acct", limit);
        let wait = refused.retry_after.unwrap();
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another account is not affected.
        assert!(limits.check("other", limit).admitted());
        // A new limit applies at once.
        assert!(limits
            .check(
                "acct",
                RateLimit {
                    requests_per_minute: 60,
                    burst: 10
                }
            )
            .admitted());
    }
}
