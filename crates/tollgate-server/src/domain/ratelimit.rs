//! Per-account rate limits: GCRA, either in process (`governor`, one limiter per account) or
//! shared by every instance through Redis (one Lua script, one round trip, Redis's own clock).
//!
//! An admission reports what the IETF `RateLimit` headers need (the quota, what is left, when it
//! refills) and, when refused, the exact wait until the next request would be admitted: the
//! `Retry-After` the client gets is that wait rounded up, never earlier.

use super::caches::FastHash;
use crate::config::RedisFailure;
use crate::error::{Error, Result};
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::Quota;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_contract::RateLimit;

type Gcra =
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
#[derive(Default)]
pub struct RateLimits {
    limiters: DashMap<String, (RateLimit, Arc<Gcra>), FastHash>,
    clock: DefaultClock,
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

    fn limiter(&self, account_id: &str, limit: RateLimit) -> Arc<Gcra> {
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

/// Where the limits are kept.
pub enum Limiter {
    /// In this process: exact for one instance.
    Local(RateLimits),
    /// In Redis: one limit per account across every instance.
    Redis(RedisLimits),
}

impl Limiter {
    /// Whether the limiter can answer now (`/readyz`): always in process; Redis must answer.
    pub async fn ping(&self) -> Result<()> {
        match self {
            Limiter::Local(_) => Ok(()),
            Limiter::Redis(limits) => limits.ping().await,
        }
    }

    /// Counts one request of `account_id` against `limit`.
    pub async fn check(&self, account_id: &str, limit: RateLimit) -> Result<Admission> {
        match self {
            Limiter::Local(limits) => Ok(limits.check(account_id, limit)),
            // Boxed: the Redis call's future is large, and every request's future (local
            // limits included) would otherwise carry and move it. A round trip dwarfs the box.
            Limiter::Redis(limits) => Box::pin(limits.check(account_id, limit)).await,
        }
    }
}

/// GCRA over Redis. The script reads Redis's `TIME`, so instances whose clocks disagree still
/// share one schedule; it stores one number per account (the theoretical arrival time, in µs)
/// and returns what the headers need, so a request costs exactly one round trip.
///
/// A refusal is also remembered here, until the moment Redis said the next request would be
/// admitted: the account's stored arrival time only moves forward (admissions on any instance
/// push it on, refusals leave it), so until then every request of that account is certainly
/// refused too, and is answered without a round trip, with the exact wait that is left.
/// Admissions always go to Redis, so the limit stays exact across instances.
pub struct RedisLimits {
    connection: redis::aio::ConnectionManager,
    script: redis::Script,
    failure: RedisFailure,
    refused: DashMap<String, Refusal, FastHash>,
}

/// What Redis said of an account's last refused request: under which limit, and until when.
#[derive(Clone, Copy)]
struct Refusal {
    limit: RateLimit,
    /// When the next request would be admitted (measured from when the refused one was sent,
    /// so never later than Redis's own answer).
    until: Instant,
    /// When the burst is whole again, on the same clock.
    reset_at: Instant,
}

/// KEYS[1]: the account's key. ARGV[1]: emission interval (µs). ARGV[2]: burst.
/// Returns {admitted (0|1), remaining, wait µs (when refused), reset µs (until the burst is whole)}.
const GCRA_SCRIPT: &str = r#"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now < allow_at then
  return {0, 0, allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
local remaining = math.floor((now - allow_at) / interval)
return {1, remaining, 0, new_tat - now}
"#;

/// Refusals remembered before the lapsed ones are swept out.
const MAX_REFUSALS: usize = 10_000;

/// How long a Redis call may take before the failure mode applies.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

/// How long one attempt to connect to Redis may take (a paused or unreachable host).
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl RedisLimits {
    /// Connects to `url`; the connection reconnects by itself after Redis comes back.
    ///
    /// How it comes back: a reconnection is one attempt of at most [`REDIS_CONNECT_TIMEOUT`],
    /// started by the first command after the connection broke; while it fails, each later
    /// command (one at a time: they share the attempt) starts the next. So the limiter is
    /// back with the first request after Redis is, not after a backoff: the crate's default
    /// waits up to a minute between attempts, and a 5-second Redis restart once cost 86 s
    /// of 503s. Meanwhile [`RedisFailure`] decides what requests get.
    pub async fn connect(url: &str, failure: RedisFailure) -> Result<Self> {
        let client =
            redis::Client::open(url).map_err(|e| Error::internal(format!("redis URL: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(REDIS_CONNECT_TIMEOUT)
            .set_response_timeout(REDIS_TIMEOUT);
        let connection = tokio::time::timeout(
            REDIS_TIMEOUT * 10,
            redis::aio::ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| Error::internal("redis: connection timed out"))?
        .map_err(|e| Error::internal(format!("redis: {e}")))?;
        Ok(RedisLimits {
            connection,
            script: redis::Script::new(GCRA_SCRIPT),
            failure,
            refused: DashMap::default(),
        })
    }

    /// `PING`, within the limiter's timeout: whether Redis answers now.
    pub async fn ping(&self) -> Result<()> {
        let mut connection = self.connection.clone();
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut connection);
        let cause = match tokio::time::timeout(REDIS_TIMEOUT, ping).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        tracing::warn!(cause, "readiness: Redis did not answer");
        Err(Error::Unavailable {
            reason: "rate limiter unreachable",
            retry_after: Duration::from_secs(1),
        })
    }

    async fn check(&self, account_id: &str, limit: RateLimit) -> Result<Admission> {
        let sent = Instant::now();
        if let Some(refusal) = self.refused.get(account_id).map(|r| *r) {
            // A changed limit is a new schedule: ask Redis.
            if refusal.limit == limit && sent < refusal.until {
                return Ok(Admission {
                    limit,
                    remaining: 0,
                    reset: refusal.reset_at.saturating_duration_since(sent),
                    retry_after: Some(refusal.until - sent),
                });
            }
            self.refused.remove(account_id);
        }
        let interval_us = u64::try_from(interval(limit).as_micros()).unwrap_or(u64::MAX);
        let mut connection = self.connection.clone();
        let mut invocation = self.script.key(format!("tollgate:ratelimit:{account_id}"));
        invocation.arg(interval_us).arg(limit.burst);
        let answer: std::result::Result<redis::RedisResult<Vec<i64>>, _> =
            tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut connection)).await;
        let values = match answer {
            Ok(Ok(values)) if values.len() == 4 => values,
            Ok(Ok(values)) => {
                return self.unreachable(limit, &format!("unexpected script answer {values:?}"))
            }
            Ok(Err(e)) => return self.unreachable(limit, &e.to_string()),
            Err(_) => return self.unreachable(limit, "timed out"),
        };
        let micros = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        let admission = Admission {
            limit,
            remaining: u32::try_from(values[1]).unwrap_or(0),
            reset: micros(values[3]),
            retry_after: (values[0] == 0).then(|| micros(values[2])),
        };
        if let Some(wait) = admission.retry_after {
            if self.refused.len() >= MAX_REFUSALS {
                self.refused.retain(|_, r| r.until > sent);
                if self.refused.len() >= MAX_REFUSALS {
                    // All still running: forgetting them only costs their next Redis round trip,
                    // where sweeping again at every refusal would cost a scan each.
                    self.refused.clear();
                }
            }
            let refusal = Refusal {
                limit,
                until: sent + wait,
                reset_at: sent + admission.reset,
            };
            self.refused.insert(account_id.to_owned(), refusal);
        }
        Ok(admission)
    }

    fn unreachable(&self, limit: RateLimit, cause: &str) -> Result<Admission> {
        match self.failure {
            RedisFailure::FailClosed => {
                tracing::error!(
                    cause,
                    "rate limiter unreachable: refusing requests (fail closed)"
                );
                Err(Error::Unavailable {
                    reason: "rate limiter unreachable",
                    retry_after: Duration::from_secs(1),
                })
            }
            RedisFailure::FailOpen => {
                tracing::warn!(
                    cause,
                    "rate limiter unreachable: letting requests through (fail open)"
                );
                Ok(Admission {
                    limit,
                    remaining: limit.burst,
                    reset: Duration::ZERO,
                    retry_after: None,
                })
            }
        }
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
