//! The client's retry strategy of `CONTRACT.md` (from the seed), as plain data and arithmetic.
//!
//! [`RetryPolicy::decide`] classifies the outcome of one attempt and computes the wait before the
//! next. It does no I/O and reads no clock; jitter is passed in, so any HTTP stack can use it and
//! tests can pin it. Defaults are the seed's numbers: 5 retries, `min(1000·2^k, 30000)` ms plus a
//! uniform jitter in `[0, 1000)` ms, `Retry-After` as a floor, and a 60 s ceiling on how long a
//! `Retry-After` may ask us to sleep before the error is handed back instead.

use std::collections::HashMap;
use std::time::Duration;

/// What one attempt came to, as far as the retry decision is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// The server answered with an error status.
    Response {
        status: u16,
        /// The envelope's `error.type`, when the body had one.
        error_type: Option<&'a str>,
        /// The envelope's `error.code`, when the body had one.
        code: Option<&'a str>,
        /// The parsed `Retry-After`, when the response had one.
        retry_after: Option<Duration>,
        /// The server's `x-should-retry`, when it sent one: it outranks the contract's table
        /// (the server knows its own errors), not the caller's overrides.
        should_retry: Option<bool>,
    },
    /// No response: connection refused or reset, or a timeout.
    Transport,
}

/// Where a retry's delay came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelaySource {
    /// The server's `Retry-After` (the value it asked for), plus jitter.
    RetryAfter(Duration),
    /// Exponential backoff (the capped exponential part), plus jitter.
    Backoff(Duration),
}

/// Why the client stops and hands the error back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// The outcome is never retried (400, 401, 402, 404, 405, 410, 413, …).
    NotRetryable,
    /// `max_retries` retries were made already.
    AttemptsExhausted,
    /// The server asked for a wait longer than the client's limit.
    RetryAfterTooLong(Duration),
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Retry {
        delay: Duration,
        source: DelaySource,
    },
    GiveUp(GiveUp),
}

/// The retry strategy; [`RetryPolicy::default`] is the seed's.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (so at most `max_retries + 1` requests).
    pub max_retries: u32,
    /// Backoff of retry 0; retry `k` waits `base · 2^k`, capped.
    pub base: Duration,
    /// Upper bound of the exponential part.
    pub cap: Duration,
    /// Jitter is uniform in `[0, max_jitter)`.
    pub max_jitter: Duration,
    /// A `Retry-After` above this is not slept on: the error is returned at once.
    pub max_retry_after: Duration,
    /// Per-code overrides of retryability (`error.code` → retry or not), consulted first.
    pub code_overrides: HashMap<String, bool>,
    /// Per-type overrides (`error.type` → retry or not), consulted when no code override applies.
    pub type_overrides: HashMap<String, bool>,
    /// Per-status overrides, consulted when neither the code nor the type has one.
    pub status_overrides: HashMap<u16, bool>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 5,
            base: Duration::from_millis(1000),
            cap: Duration::from_millis(30_000),
            max_jitter: Duration::from_millis(1000),
            max_retry_after: Duration::from_secs(60),
            code_overrides: HashMap::new(),
            type_overrides: HashMap::new(),
            status_overrides: HashMap::new(),
        }
    }
}

impl RetryPolicy {
    /// Whether the outcome may be retried at all, whatever the attempt count.
    pub fn is_retryable(&self, outcome: &Outcome<'_>) -> bool {
        match *outcome {
            Outcome::Transport => true,
            Outcome::Response {
                status,
                error_type,
                code,
                should_retry,
                ..
            } => self
                .overridden(status, error_type, code)
                .or(should_retry)
                .unwrap_or_else(|| crate::error::is_retryable(status, code)),
        }
    }

    /// Whether an error response may be retried: the most specific entry of the override tables
    /// wins (code, then type, then status), and the contract's rule decides the rest.
    pub fn classify(&self, status: u16, error_type: Option<&str>, code: Option<&str>) -> bool {
        self.overridden(status, error_type, code)
            .unwrap_or_else(|| crate::error::is_retryable(status, code))
    }

    /// What the caller's override tables say of an error response, if anything.
    fn overridden(
        &self,
        status: u16,
        error_type: Option<&str>,
        code: Option<&str>,
    ) -> Option<bool> {
        code.and_then(|c| self.code_overrides.get(c))
            .or_else(|| error_type.and_then(|t| self.type_overrides.get(t)))
            .or_else(|| self.status_overrides.get(&status))
            .copied()
    }

    /// The capped exponential part of retry `k`'s wait: `min(base · 2^k, cap)`.
    pub fn backoff(&self, k: u32) -> Duration {
        let factor = 2u32.checked_pow(k).unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .map_or(self.cap, |d| d.min(self.cap))
    }

    /// A uniform jitter in `[0, max_jitter)` from a number in `[0, 1)`.
    pub fn jitter_from_unit(&self, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let jitter = self.max_jitter.mul_f64(unit);
        // `unit` < 1 keeps us below max_jitter; clamp anyway so a caller's 1.0 cannot reach it.
        if jitter >= self.max_jitter && !self.max_jitter.is_zero() {
            self.max_jitter - Duration::from_nanos(1)
        } else {
            jitter
        }
    }

    /// A random jitter in `[0, max_jitter)`.
    pub fn random_jitter(&self) -> Duration {
        self.jitter_from_unit(rand::random::<f64>())
    }

    /// Decides what follows attempt number `k` (0 for the first request) that came to `outcome`.
    ///
    /// `jitter` should come from [`RetryPolicy::random_jitter`]; tests pass a fixed one.
    pub fn decide(&self, k: u32, outcome: &Outcome<'_>, jitter: Duration) -> Decision {
        if !self.is_retryable(outcome) {
            return Decision::GiveUp(GiveUp::NotRetryable);
        }
        if k >= self.max_retries {
            return Decision::GiveUp(GiveUp::AttemptsExhausted);
        }
        if let Outcome::Response {
            retry_after: Some(wait),
            ..
        } = *outcome
        {
            if wait > self.max_retry_after {
                return Decision::GiveUp(GiveUp::RetryAfterTooLong(wait));
            }
            return Decision::Retry {
                delay: wait + jitter,
                source: DelaySource::RetryAfter(wait),
            };
        }
        let backoff = self.backoff(k);
        Decision::Retry {
            delay: backoff + jitter,
            source: DelaySource::Backoff(backoff),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: u16) -> Outcome<'static> {
        Outcome::Response {
            status: s,
            error_type: None,
            code: None,
            retry_after: None,
            should_retry: None,
        }
    }

    #[test]
    fn seed_backoff_schedule() {
        let p = RetryPolicy::default();
        let ms: Vec<u128> = (0..7).map(|k| p.backoff(k).as_millis()).collect();
        assert_eq!(ms, vec![1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        assert_eq!(p.backoff(200), Duration::from_millis(30_000));
    }

    #[test]
    fn never_retries_client_errors() {
        let p = RetryPolicy::default();
        for s in [400, 401, 402, 404, 405, 410, 413] {
            assert_eq!(
                p.decide(0, &status(s), Duration::ZERO),
                Decision::GiveUp(GiveUp::NotRetryable),
                "{s}"
            );
        }
    }

    #[test]
    fn retries_429_5xx_transport_up_to_five_times() {
        let p = RetryPolicy::default();
        for o in [status(429), status(500), status(503), Outcome::Transport] {
            for k in 0..5 {
                assert!(matches!(
                    p.decide(k, &o, Duration::ZERO),
                    Decision::Retry { .. }
                ));
            }
            assert_eq!(
                p.decide(5, &o, Duration::ZERO),
                Decision::GiveUp(GiveUp::AttemptsExhausted)
            );
        }
    }

    #[test]
    fn retry_after_is_a_floor_and_has_a_ceiling() {
        let p = RetryPolicy::default();
        let o = Outcome::Response {
            status: 429,
            error_type: None,
            code: None,
            retry_after: Some(Duration::from_secs(3)),
            should_retry: None,
        };
        assert_eq!(
            p.decide(4, &o, Duration::from_millis(250)),
            Decision::Retry {
                delay: Duration::from_millis(3250),
                source: DelaySource::RetryAfter(Duration::from_secs(3))
            }
        );
        let long = Outcome::Response {
            status: 503,
            error_type: None,
            code: None,
            retry_after: Some(Duration::from_secs(61)),
            should_retry: None,
        };
        assert_eq!(
            p.decide(0, &long, Duration::ZERO),
            Decision::GiveUp(GiveUp::RetryAfterTooLong(Duration::from_secs(61)))
        );
    }

    #[test]
    fn jitter_stays_in_range() {
        let p = RetryPolicy::default();
        assert_eq!(p.jitter_from_unit(0.0), Duration::ZERO);
        assert!(p.jitter_from_unit(1.0) < Duration::from_millis(1000));
        for _ in 0..1000 {
            assert!(p.random_jitter() < Duration::from_millis(1000));
        }
    }

    #[test]
    fn code_overrides_win() {
        let mut p = RetryPolicy::default();
        p.code_overrides.insert("insufficient_credits".into(), true);
        let o = Outcome::Response {
            status: 402,
            error_type: None,
            code: Some("insufficient_credits"),
            retry_after: None,
            should_retry: None,
        };
        assert!(p.is_retryable(&o));
        let in_use = Outcome::Response {
            status: 409,
            error_type: None,
            code: Some("idempotency_key_in_use"),
            retry_after: None,
            should_retry: None,
        };
        assert!(RetryPolicy::default().is_retryable(&in_use));
    }

    #[test]
    fn the_table_reads_code_then_type_then_status() {
        let mut p = RetryPolicy::default();
        p.type_overrides.insert("billing_error".into(), true);
        p.status_overrides.insert(402, false);
        p.status_overrides.insert(418, true);
        p.code_overrides.insert("internal_error".into(), false);
        assert!(p.classify(402, Some("billing_error"), Some("insufficient_credits")));
        assert!(!p.classify(402, None, None));
        assert!(p.classify(418, None, None));
        assert!(!p.classify(500, Some("server_error"), Some("internal_error")));
        assert!(p.classify(500, Some("server_error"), Some("something_new")));
        let o = Outcome::Response {
            status: 500,
            error_type: None,
            code: Some("internal_error"),
            retry_after: None,
            should_retry: None,
        };
        assert_eq!(
            p.decide(0, &o, Duration::ZERO),
            Decision::GiveUp(GiveUp::NotRetryable)
        );
    }

    #[test]
    fn the_servers_x_should_retry_outranks_the_table_and_the_callers_overrides_outrank_it() {
        let response = |code, should_retry| Outcome::Response {
            status: 409,
            error_type: Some("conflict_error"),
            code: Some(code),
            retry_after: None,
            should_retry,
        };
        let p = RetryPolicy::default();
        assert!(!p.is_retryable(&response("task_not_cancelable", None)));
        assert!(p.is_retryable(&response("task_not_cancelable", Some(true))));
        assert!(!p.is_retryable(&response("idempotency_key_in_use", Some(false))));
        let mut overridden = RetryPolicy::default();
        overridden
            .code_overrides
            .insert("task_not_cancelable".into(), false);
        assert!(!overridden.is_retryable(&response("task_not_cancelable", Some(true))));
    }
}
