//! The retry budget: a token bucket shared by every request of one client.
//!
//! Per-call retry limits alone multiply load in an outage: with 5 retries, every call becomes six
//! requests exactly when the server can least afford them. The budget caps retries as a share of
//! the client's own traffic, after gRPC's retry throttling, AWS's retry quota and reqwest's retry
//! budget:
//!
//! - every call (its first attempt) deposits [`RetryBudgetConfig::extra_load`] tokens;
//! - every retry withdraws one token, and is not made when less than one is left;
//! - the bucket holds at most [`RetryBudgetConfig::capacity`] tokens and starts full, and it also
//!   refills slowly with time ([`RetryBudgetConfig::refill_per_sec`]), so a client that calls
//!   rarely still gets full retries for an isolated failure.
//!
//! Over any stretch of time, retries ≤ `capacity + extra_load · calls + refill_per_sec · seconds`.
//! With the defaults (10, 0.1, 0.1) a sustained outage costs about 1.1 requests per call instead
//! of 6, while a lone failure (bucket full) still gets its 5 retries.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The budget's numbers; [`RetryBudgetConfig::default`] is 10 tokens, 10 % extra load, 0.1 token/s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudgetConfig {
    /// The most tokens the bucket holds, and what it starts with: the burst of retries allowed
    /// before the share applies. Keep it at or above `max_retries` so a lone failure gets them all.
    pub capacity: f64,
    /// Tokens each call deposits: the share of extra load retries may add (0.1 = 10 %).
    pub extra_load: f64,
    /// Tokens added per second of time, whatever the traffic.
    pub refill_per_sec: f64,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            capacity: 10.0,
            extra_load: 0.1,
            refill_per_sec: 0.1,
        }
    }
}

/// A token bucket for retries. Share it (in an `Arc`) between everything that should count as one
/// client; [`crate::Client`] does so across its clones.
#[derive(Debug)]
pub struct RetryBudget {
    config: RetryBudgetConfig,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: f64,
    refilled_at: Instant,
}

impl RetryBudget {
    pub fn new(config: RetryBudgetConfig) -> Self {
        let config = RetryBudgetConfig {
            capacity: finite_non_negative(config.capacity),
            extra_load: finite_non_negative(config.extra_load),
            refill_per_sec: finite_non_negative(config.refill_per_sec),
        };
        RetryBudget {
            config,
            state: Mutex::new(State {
                tokens: config.capacity,
                refilled_at: Instant::now(),
            }),
        }
    }

    pub fn config(&self) -> RetryBudgetConfig {
        self.config
    }

    /// Records a new call: deposits its share.
    pub fn deposit(&self) {
        self.with_state(|s, cap| s.tokens = (s.tokens + self.config.extra_load).min(cap));
    }

    /// Takes one token for a retry; `false` (and nothing taken) when less than one is left.
    pub fn try_withdraw(&self) -> bool {
        self.with_state(|s, _| {
            // Deposits are fractions (0.1 ten times is 0.999…); a hair of tolerance makes them add up.
            if s.tokens >= 1.0 - 1e-9 {
                s.tokens = (s.tokens - 1.0).max(0.0);
                true
            } else {
                false
            }
        })
    }

    /// Tokens available now.
    pub fn tokens(&self) -> f64 {
        self.with_state(|s, _| s.tokens)
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State, f64) -> T) -> T {
        // A panic while holding this lock cannot leave the numbers inconsistent, so a poisoned
        // lock is used as is.
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(state.refilled_at);
        state.tokens = refill(
            state.tokens,
            elapsed,
            self.config.refill_per_sec,
            self.config.capacity,
        );
        state.refilled_at = now;
        f(&mut state, self.config.capacity)
    }
}

fn refill(tokens: f64, elapsed: Duration, per_sec: f64, capacity: f64) -> f64 {
    (tokens + elapsed.as_secs_f64() * per_sec).min(capacity)
}

fn finite_non_negative(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 {
        x
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_bucket_allows_capacity_retries_then_refuses() {
        let b = RetryBudget::new(RetryBudgetConfig {
            capacity: 5.0,
            extra_load: 0.1,
            refill_per_sec: 0.0,
        });
        for _ in 0..5 {
            assert!(b.try_withdraw());
        }
        assert!(!b.try_withdraw());
        // Ten calls earn one retry.
        for _ in 0..10 {
            b.deposit();
        }
        assert!(b.try_withdraw());
        assert!(!b.try_withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn refills_with_time_up_to_capacity() {
        let b = RetryBudget::new(RetryBudgetConfig {
            capacity: 2.0,
            extra_load: 0.0,
            refill_per_sec: 0.5,
        });
        assert!(b.try_withdraw() && b.try_withdraw() && !b.try_withdraw());
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(!b.try_withdraw());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(b.try_withdraw());
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!((b.tokens() - 2.0).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_never_exceed_capacity_and_bad_numbers_are_zero() {
        let b = RetryBudget::new(RetryBudgetConfig {
            capacity: 1.0,
            extra_load: 5.0,
            refill_per_sec: f64::NAN,
        });
        b.deposit();
        assert!((b.tokens() - 1.0).abs() < 1e-9);
        let z = RetryBudget::new(RetryBudgetConfig {
            capacity: -3.0,
            extra_load: 0.1,
            refill_per_sec: 0.0,
        });
        assert!(!z.try_withdraw());
    }
}
