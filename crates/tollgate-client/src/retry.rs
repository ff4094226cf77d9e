//! The retry loop: the contract's policy, applied to real attempts with a budget, a host pause,
//! a deadline and a history.
//!
//! [`RetryPolicy`] (in the contract crate) is pure arithmetic: given one outcome it says "retry
//! after this long" or "give up". [`Retrier`] is the loop around it, and the only place in the SDK
//! that sleeps:
//!
//! 1. before every attempt, the first included, it waits out a pause of the host set by another
//!    request's 429 with `Retry-After` ([`HostPause`]), plus its own jitter;
//! 2. it sends the attempt under the per-attempt timeout and the call's deadline;
//! 3. a 2xx is returned; anything else is read (status, envelope `type`/`code`, the wait of
//!    `retry-after-ms` or else `Retry-After`, `x-should-retry`, request id), recorded in the
//!    history, and handed to the policy;
//! 4. a retry happens only if its wait fits in the call's deadline and the client's
//!    [`RetryBudget`] has a token; each retry is a `tracing` event (attempt, status or cause,
//!    delay and its source).
//!
//! The loop knows nothing of reqwest: an attempt is any future that yields a [`RawResponse`] or a
//! [`TransportFailure`], so another HTTP stack can drive it. Dropping the future returned by
//! [`Retrier::run`] cancels the call, sleeps included; nothing is spawned.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use tokio::time::Instant;
use tollgate_contract::error::ErrorBody;
use tollgate_contract::headers;
use tollgate_contract::retry::{
    Decision, DelaySource as PolicySource, GiveUp, Outcome, RetryPolicy,
};

use crate::budget::{RetryBudget, RetryBudgetConfig};
use crate::error::{
    ApiError, AttemptRecord, DecodeError, Delay, DelaySource, Error, ErrorKind, StopReason,
    TransportError, TransportKind,
};
use crate::pause::HostPause;

/// A complete HTTP response, as the loop needs it.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl RawResponse {
    /// The `X-Request-Id` header.
    pub fn request_id(&self) -> Option<String> {
        self.headers
            .get(headers::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

/// An attempt that got no (complete) response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportFailure {
    pub kind: TransportKind,
    /// The cause, without URL or headers.
    pub message: String,
}

/// What the loop needs to know about a call besides its attempts.
#[derive(Debug, Clone, Copy)]
pub struct CallInfo<'a> {
    /// The host the call goes to (`host:port`): the key of the host pause.
    pub host: &'a str,
    /// For the tracing events: e.g. `"POST /v1/images/generations"`. Never a credential.
    pub label: &'a str,
    /// The instant after which the call must have returned.
    pub deadline: Option<Instant>,
}

/// The retry loop with its shared state: policy, budget, host pause. Clones share the budget and
/// the pause.
#[derive(Debug, Clone)]
pub struct Retrier {
    policy: Arc<RetryPolicy>,
    budget: Option<Arc<RetryBudget>>,
    pause: Arc<HostPause>,
    attempt_timeout: Option<Duration>,
}

impl Default for Retrier {
    fn default() -> Self {
        Retrier::new(RetryPolicy::default())
    }
}

/// The state of the call between attempts: what it will hand back if it stops now.
struct Failure {
    kind: ErrorKind,
    retryable: bool,
}

impl Retrier {
    /// A loop with `policy`, the default budget, a fresh host pause and a 30 s per-attempt timeout.
    pub fn new(policy: RetryPolicy) -> Self {
        Retrier {
            policy: Arc::new(policy),
            budget: Some(Arc::new(RetryBudget::new(RetryBudgetConfig::default()))),
            pause: Arc::new(HostPause::new()),
            attempt_timeout: Some(Duration::from_secs(30)),
        }
    }

    /// Uses `budget` (shared with whoever else holds it); `None` retries without a budget.
    pub fn with_budget(mut self, budget: Option<Arc<RetryBudget>>) -> Self {
        self.budget = budget;
        self
    }

    /// Shares `pause` (e.g. between several clients of the same account).
    pub fn with_host_pause(mut self, pause: Arc<HostPause>) -> Self {
        self.pause = pause;
        self
    }

    /// The longest one attempt may take before it counts as a (retryable) timeout.
    pub fn with_attempt_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    pub fn budget(&self) -> Option<&RetryBudget> {
        self.budget.as_deref()
    }

    pub fn host_pause(&self) -> &HostPause {
        &self.pause
    }

    /// Runs a call: `send(n)` makes attempt `n` (1 for the first) and must send the same request
    /// every time (the same `Idempotency-Key` included). Returns the first 2xx response, or the
    /// error of the last attempt with the whole history.
    pub async fn run<F, Fut>(&self, call: CallInfo<'_>, send: F) -> Result<RawResponse, Error>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<RawResponse, TransportFailure>>,
    {
        self.run_with_history(call, send)
            .await
            .map(|(response, _)| response)
    }

    /// [`Retrier::run`], with the history of the attempts that led to the 2xx (the 2xx is its
    /// last entry), for an error about the response found after the loop (e.g. its body).
    pub async fn run_with_history<F, Fut>(
        &self,
        call: CallInfo<'_>,
        mut send: F,
    ) -> Result<(RawResponse, Vec<AttemptRecord>), Error>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<RawResponse, TransportFailure>>,
    {
        if let Some(budget) = &self.budget {
            budget.deposit();
        }
        let policy = &*self.policy;
        let mut history: Vec<AttemptRecord> = Vec::new();
        let mut last: Option<Failure> = None;
        let mut next_wait: Option<Delay> = None;
        let mut k: u32 = 0;
        loop {
            let number = k + 1;
            let mut waited = next_wait.take();
            if let Some(delay) = waited {
                tokio::time::sleep(delay.duration).await;
            }
            // Another request may have paused the host while we slept: wait that out too.
            while let Some(until) = self.pause.paused_until(call.host) {
                let now = Instant::now();
                let remaining = until.saturating_duration_since(now);
                let wake = until + policy.random_jitter();
                let wait = wake.saturating_duration_since(now);
                let stop = if remaining > policy.max_retry_after {
                    Some(StopReason::RetryAfterTooLong(remaining))
                } else if call.deadline.is_some_and(|d| wake > d) {
                    Some(StopReason::Deadline)
                } else {
                    None
                };
                if let Some(stop) = stop {
                    let failure = last.take().unwrap_or(Failure {
                        kind: ErrorKind::Paused,
                        retryable: true,
                    });
                    return Err(Error::new(failure.kind, failure.retryable, stop)
                        .with_history(history)
                        .with_retry_at(Some(SystemTime::now() + wait)));
                }
                waited = Some(Delay {
                    duration: waited.map_or(Duration::ZERO, |d| d.duration) + wait,
                    source: DelaySource::HostPause,
                });
                tokio::time::sleep_until(wake).await;
            }

            let (result, deadline_hit) = self.attempt(call.deadline, send(number)).await;
            let (record, outcome_failure, (retry_after, should_retry)) = match result {
                Ok(response) if (200..300).contains(&response.status) => {
                    history.push(AttemptRecord {
                        number,
                        waited,
                        status: Some(response.status),
                        code: None,
                        request_id: response.request_id(),
                        cause: None,
                    });
                    return Ok((response, history));
                }
                Ok(response) => read_error_response(number, waited, &response),
                Err(failure) => {
                    let record = AttemptRecord {
                        number,
                        waited,
                        status: None,
                        code: None,
                        request_id: None,
                        cause: Some(failure.message.clone()),
                    };
                    let kind = ErrorKind::Transport(TransportError {
                        kind: failure.kind,
                        message: failure.message,
                    });
                    (record, kind, (None, None))
                }
            };
            let outcome = match &outcome_failure {
                ErrorKind::Api(e) => Outcome::Response {
                    status: e.status,
                    error_type: Some(&e.error_type),
                    code: Some(&e.code),
                    retry_after,
                    should_retry,
                },
                ErrorKind::Decode(e) => Outcome::Response {
                    status: e.status,
                    error_type: None,
                    code: None,
                    retry_after,
                    should_retry,
                },
                _ => Outcome::Transport,
            };
            let retryable = policy.is_retryable(&outcome);
            let status = record.status;
            let jitter = policy.random_jitter();
            let decision = policy.decide(k, &outcome, jitter);
            let attempt_now = Instant::now();
            if let (Some(429), Some(wait)) = (status, retry_after) {
                // The limit is the account's: every request of this client would meet it.
                self.pause.pause(call.host, attempt_now + wait);
            }
            let code = record.code.clone();
            let cause = record.cause.clone();
            history.push(record);
            let stop =
                |stop: StopReason, retry_at: Option<SystemTime>, history: Vec<AttemptRecord>| {
                    Err(Error::new(outcome_failure.clone(), retryable, stop)
                        .with_history(history)
                        .with_retry_at(retry_at))
                };
            if deadline_hit {
                return stop(StopReason::Deadline, None, history);
            }
            let (delay, source) = match decision {
                Decision::GiveUp(GiveUp::NotRetryable) => {
                    return stop(StopReason::NotRetryable, None, history)
                }
                Decision::GiveUp(GiveUp::AttemptsExhausted) => {
                    return stop(StopReason::RetriesExhausted, None, history)
                }
                Decision::GiveUp(GiveUp::RetryAfterTooLong(wait)) => {
                    return stop(
                        StopReason::RetryAfterTooLong(wait),
                        Some(SystemTime::now() + wait),
                        history,
                    )
                }
                Decision::Retry { delay, source } => (delay, source),
            };
            if call.deadline.is_some_and(|d| attempt_now + delay > d) {
                return stop(
                    StopReason::Deadline,
                    Some(SystemTime::now() + delay),
                    history,
                );
            }
            if let Some(budget) = &self.budget {
                if !budget.try_withdraw() {
                    tracing::info!(
                        target: "tollgate_client::retry",
                        call = call.label,
                        attempt = number,
                        status,
                        code,
                        cause,
                        "retry budget exhausted; not retrying"
                    );
                    return stop(StopReason::BudgetExhausted, None, history);
                }
            }
            let source = match source {
                PolicySource::RetryAfter(d) => DelaySource::RetryAfter(d),
                PolicySource::Backoff(d) => DelaySource::Backoff(d),
            };
            tracing::info!(
                target: "tollgate_client::retry",
                call = call.label,
                attempt = number,
                status,
                code,
                cause,
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                source = %source,
                "retrying"
            );
            last = Some(Failure {
                kind: outcome_failure,
                retryable,
            });
            next_wait = Some(Delay {
                duration: delay,
                source,
            });
            k += 1;
        }
    }

    /// Sends one attempt under the per-attempt timeout and the call's deadline. The flag says
    /// whether it was the call's deadline that cut it.
    async fn attempt<Fut>(
        &self,
        deadline: Option<Instant>,
        fut: Fut,
    ) -> (Result<RawResponse, TransportFailure>, bool)
    where
        Fut: Future<Output = Result<RawResponse, TransportFailure>>,
    {
        let per_attempt = self.attempt_timeout.map(|t| Instant::now() + t);
        let limit = match (per_attempt, deadline) {
            (Some(a), Some(d)) => Some(a.min(d)),
            (a, d) => a.or(d),
        };
        let Some(limit) = limit else {
            return (fut.await, false);
        };
        match tokio::time::timeout_at(limit, fut).await {
            Ok(result) => (result, false),
            Err(_) => {
                let by_deadline = deadline.is_some_and(|d| d <= limit);
                let message = if by_deadline {
                    "the call's deadline passed while waiting for the response".to_owned()
                } else {
                    let ms = self.attempt_timeout.map_or(0, |t| t.as_millis());
                    format!("no response within {ms} ms")
                };
                (
                    Err(TransportFailure {
                        kind: TransportKind::Timeout,
                        message,
                    }),
                    by_deadline,
                )
            }
        }
    }
}

/// Reads a non-2xx response: the envelope if it is one, else a decode failure with the status.
fn read_error_response(
    number: u32,
    waited: Option<Delay>,
    response: &RawResponse,
) -> (AttemptRecord, ErrorKind, (Option<Duration>, Option<bool>)) {
    let header_id = response.request_id();
    // `retry-after-ms` when the server sent it (exact), else `Retry-After` (whole seconds or
    // an HTTP-date, so rounded up to a second).
    let header = |name: &str| response.headers.get(name).and_then(|v| v.to_str().ok());
    let retry_after = header(headers::RETRY_AFTER_MS)
        .and_then(|ms| ms.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .or_else(|| {
            header(headers::RETRY_AFTER)
                .and_then(|v| tollgate_contract::retry_after::parse(v, SystemTime::now()))
        });
    let should_retry = match header(headers::SHOULD_RETRY) {
        Some("true") => Some(true),
        Some("false") => Some(false),
        _ => None,
    };
    let kind = match serde_json::from_slice::<ErrorBody>(&response.body) {
        Ok(body) => {
            let e = body.error;
            ErrorKind::Api(ApiError {
                status: response.status,
                error_type: e.error_type,
                code: e.code,
                message: e.message,
                param: e.param,
                request_id: e.request_id.or(header_id),
                retry_after,
            })
        }
        Err(err) => ErrorKind::Decode(DecodeError {
            status: response.status,
            request_id: header_id,
            message: format!(
                "HTTP {} without the error envelope ({err})",
                response.status
            ),
        }),
    };
    let (code, request_id) = match &kind {
        ErrorKind::Api(e) => (Some(e.code.clone()), e.request_id.clone()),
        ErrorKind::Decode(e) => (None, e.request_id.clone()),
        _ => (None, None),
    };
    let record = AttemptRecord {
        number,
        waited,
        status: Some(response.status),
        code,
        request_id,
        cause: None,
    };
    (record, kind, (retry_after, should_retry))
}

#[cfg(test)]
mod tests {
    //! The loop under tokio's paused clock: attempts are scripted futures, delays are measured on
    //! the virtual clock, so every number is exact.

    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use tollgate_contract::ErrorCode;

    #[derive(Clone)]
    enum Step {
        Status(u16, Option<&'static str>, Vec<(&'static str, String)>),
        Drop,
        Hang,
    }

    fn err(status: u16) -> Step {
        let code = match status {
            400 => Some("invalid_value"),
            401 => Some("invalid_api_key"),
            402 => Some("insufficient_credits"),
            404 => Some("resource_not_found"),
            405 => Some("method_not_allowed"),
            409 => Some("idempotency_key_in_use"),
            410 => Some("resource_expired"),
            413 => Some("body_too_large"),
            429 => Some("rate_limit_exceeded"),
            500 => Some("internal_error"),
            503 => Some("service_unavailable"),
            _ => None,
        };
        Step::Status(status, code, Vec::new())
    }

    fn with_retry_after(status: u16, value: impl Into<String>) -> Step {
        match err(status) {
            Step::Status(s, c, _) => Step::Status(s, c, vec![("retry-after", value.into())]),
            other => other,
        }
    }

    fn ok() -> Step {
        Step::Status(200, None, Vec::new())
    }

    /// A scripted "server": answers steps in order and records the virtual time of each attempt.
    #[derive(Clone)]
    struct Script {
        steps: Arc<Mutex<VecDeque<Step>>>,
        times: Arc<Mutex<Vec<Instant>>>,
    }

    impl Script {
        fn new(steps: Vec<Step>) -> Self {
            Script {
                steps: Arc::new(Mutex::new(steps.into())),
                times: Arc::new(Mutex::new(Vec::new())),
            }
        }

        async fn send(&self) -> Result<RawResponse, TransportFailure> {
            self.times.lock().unwrap().push(Instant::now());
            let step = self
                .steps
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| err(503));
            match step {
                Step::Status(status, code, hdrs) => {
                    let mut headers = HeaderMap::new();
                    headers.insert(
                        "x-request-id",
                        format!("req_{}", self.count()).parse().unwrap(),
                    );
                    for (name, value) in hdrs {
                        headers.insert(name, value.parse().unwrap());
                    }
                    let body = match code {
                        Some(code) => {
                            let c = ErrorCode::from_code(code).unwrap();
                            serde_json::to_vec(&ErrorBody::new(c, "Scripted failure.")).unwrap()
                        }
                        None if status < 300 => b"{}".to_vec(),
                        None => b"<html>bad gateway</html>".to_vec(),
                    };
                    Ok(RawResponse {
                        status,
                        headers,
                        body: body.into(),
                    })
                }
                Step::Drop => Err(TransportFailure {
                    kind: TransportKind::Other,
                    message: "connection reset".into(),
                }),
                Step::Hang => std::future::pending().await,
            }
        }

        fn count(&self) -> usize {
            self.times.lock().unwrap().len()
        }

        /// Gaps between consecutive attempts.
        fn gaps(&self) -> Vec<Duration> {
            let t = self.times.lock().unwrap();
            t.windows(2).map(|w| w[1] - w[0]).collect()
        }
    }

    fn no_jitter() -> RetryPolicy {
        RetryPolicy {
            max_jitter: Duration::ZERO,
            ..RetryPolicy::default()
        }
    }

    fn retrier(policy: RetryPolicy) -> Retrier {
        Retrier::new(policy).with_budget(None)
    }

    const CALL: CallInfo<'static> = CallInfo {
        host: "h:1",
        label: "GET /v1/account",
        deadline: None,
    };

    async fn run(r: &Retrier, script: &Script, call: CallInfo<'_>) -> Result<RawResponse, Error> {
        r.run(call, |_| script.send()).await
    }

    fn secs(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|s| Duration::from_secs(*s)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn exact_seed_backoff_then_gives_up_after_five_retries() {
        let s = Script::new(vec![]);
        let e = run(&retrier(no_jitter()), &s, CALL).await.unwrap_err();
        assert_eq!(s.count(), 6);
        assert_eq!(s.gaps(), secs(&[1, 2, 4, 8, 16]));
        assert_eq!(e.attempts(), 6);
        assert_eq!(e.stop_reason(), StopReason::RetriesExhausted);
        assert!(e.is_retryable());
        let waits: Vec<_> = e.history().iter().map(|r| r.waited).collect();
        assert_eq!(waits[0], None);
        assert_eq!(
            waits[3],
            Some(Delay {
                duration: Duration::from_secs(4),
                source: DelaySource::Backoff(Duration::from_secs(4))
            })
        );
        assert!(
            e.to_string().contains("6 attempts: retries exhausted"),
            "{e}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn succeeds_on_the_attempt_that_succeeds() {
        let s = Script::new(vec![err(500), Step::Drop, err(409), ok()]);
        let r = run(&retrier(no_jitter()), &s, CALL).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(s.count(), 4);
        assert_eq!(s.gaps(), secs(&[1, 2, 4]));
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_stays_within_its_bounds() {
        for _ in 0..20 {
            let s = Script::new(vec![]);
            let e = run(&retrier(RetryPolicy::default()), &s, CALL)
                .await
                .unwrap_err();
            let delays: Vec<Duration> = e.history()[1..]
                .iter()
                .map(|r| r.waited.unwrap().duration)
                .collect();
            for (k, (delay, gap)) in delays.iter().zip(s.gaps()).enumerate() {
                let base = Duration::from_secs(1 << k);
                assert!(
                    *delay >= base && *delay < base + Duration::from_millis(1000),
                    "retry {k}: {delay:?}"
                );
                // tokio's timer has millisecond resolution and never fires early.
                assert!(
                    gap >= *delay && gap <= *delay + Duration::from_millis(1),
                    "retry {k}: slept {gap:?} for {delay:?}"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_capped() {
        let policy = RetryPolicy {
            base: Duration::from_secs(10),
            max_retries: 6,
            ..no_jitter()
        };
        let s = Script::new(vec![]);
        let _ = run(&retrier(policy), &s, CALL).await.unwrap_err();
        assert_eq!(s.gaps(), secs(&[10, 20, 30, 30, 30, 30]));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_in_seconds_is_a_floor_plus_jitter() {
        for _ in 0..20 {
            let s = Script::new(vec![with_retry_after(503, "7"), with_retry_after(503, "7")]);
            let policy = RetryPolicy {
                max_retries: 1,
                ..RetryPolicy::default()
            };
            let e = run(&retrier(policy), &s, CALL).await.unwrap_err();
            let waited = e.history()[1].waited.unwrap();
            assert_eq!(
                waited.source,
                DelaySource::RetryAfter(Duration::from_secs(7))
            );
            assert!(
                waited.duration >= Duration::from_secs(7)
                    && waited.duration < Duration::from_secs(8),
                "{waited:?}"
            );
            // tokio's timer has millisecond resolution and never fires early.
            let gap = s.gaps()[0];
            assert!(gap >= waited.duration && gap <= waited.duration + Duration::from_millis(1));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_ms_is_preferred_for_its_exactness() {
        let hinted = |status| match err(status) {
            Step::Status(s, c, _) => Step::Status(
                s,
                c,
                vec![
                    ("retry-after", "2".into()),
                    ("retry-after-ms", "1234".into()),
                ],
            ),
            other => other,
        };
        let s = Script::new(vec![hinted(429), ok()]);
        run(&retrier(RetryPolicy::default()), &s, CALL)
            .await
            .unwrap();
        // The floor is 1,234 ms, not the 2 s `Retry-After` rounds to; plus a jitter under 1 s.
        let gap = s.gaps()[0];
        assert!(
            gap >= Duration::from_millis(1234) && gap < Duration::from_millis(2235),
            "{gap:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_servers_x_should_retry_is_obeyed_both_ways() {
        let hinted = |status, value: &str| match err(status) {
            Step::Status(s, c, _) => Step::Status(s, c, vec![("x-should-retry", value.into())]),
            other => other,
        };
        // A 503 the server says not to retry: one attempt.
        let s = Script::new(vec![hinted(503, "false"), ok()]);
        let e = run(&retrier(RetryPolicy::default()), &s, CALL)
            .await
            .unwrap_err();
        assert!(!e.is_retryable());
        assert_eq!(s.count(), 1);
        // A 400 it says to retry: retried.
        let s = Script::new(vec![hinted(400, "true"), ok()]);
        run(&retrier(RetryPolicy::default()), &s, CALL)
            .await
            .unwrap();
        assert_eq!(s.count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_as_an_http_date() {
        // HTTP-dates have whole seconds: 5 s ahead means between 4 and 5 s from now.
        let at = httpdate_in(5);
        let s = Script::new(vec![with_retry_after(429, at), ok()]);
        run(&retrier(no_jitter()), &s, CALL).await.unwrap();
        let gap = s.gaps()[0];
        assert!(
            gap > Duration::from_secs(3) && gap <= Duration::from_secs(5),
            "{gap:?}"
        );
    }

    fn httpdate_in(secs: u64) -> String {
        let t = time::OffsetDateTime::from(SystemTime::now() + Duration::from_secs(secs));
        let fmt = time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        );
        t.format(&fmt).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_beyond_the_limit_returns_at_once_with_the_time_to_come_back() {
        let s = Script::new(vec![with_retry_after(429, "120")]);
        let before = Instant::now();
        let e = run(&retrier(RetryPolicy::default()), &s, CALL)
            .await
            .unwrap_err();
        assert_eq!(Instant::now(), before);
        assert_eq!(s.count(), 1);
        assert_eq!(
            e.stop_reason(),
            StopReason::RetryAfterTooLong(Duration::from_secs(120))
        );
        assert_eq!(e.retry_after(), Some(Duration::from_secs(120)));
        let at = e
            .retry_at()
            .unwrap()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(
            at > Duration::from_secs(118) && at <= Duration::from_secs(120),
            "{at:?}"
        );
        assert_eq!(e.code(), Some("rate_limit_exceeded"));
    }

    #[tokio::test(start_paused = true)]
    async fn never_retries_what_the_contract_says_is_final() {
        for status in [400, 401, 402, 404, 405, 410, 413] {
            let s = Script::new(vec![err(status), ok()]);
            let before = Instant::now();
            let e = run(&retrier(RetryPolicy::default()), &s, CALL)
                .await
                .unwrap_err();
            assert_eq!(s.count(), 1, "{status}");
            assert_eq!(Instant::now(), before, "{status}");
            assert_eq!(e.status(), Some(status));
            assert_eq!(e.stop_reason(), StopReason::NotRetryable);
            assert!(!e.is_retryable());
            assert_eq!(e.attempts(), 1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_409_other_than_key_in_use_is_final() {
        let s = Script::new(vec![Step::Status(
            409,
            Some("idempotency_key_reused"),
            vec![],
        )]);
        let e = run(&retrier(RetryPolicy::default()), &s, CALL)
            .await
            .unwrap_err();
        assert_eq!(s.count(), 1);
        assert_eq!(e.stop_reason(), StopReason::NotRetryable);
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_can_be_overridden_by_type() {
        let mut policy = no_jitter();
        policy.type_overrides.insert("billing_error".into(), true);
        policy
            .code_overrides
            .insert("service_unavailable".into(), false);
        let s = Script::new(vec![err(402), err(503), ok()]);
        let e = run(&retrier(policy), &s, CALL).await.unwrap_err();
        assert_eq!(s.count(), 2);
        assert_eq!(e.code(), Some("service_unavailable"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_5xx_without_envelope_is_retried_and_reported_as_a_decode_failure() {
        let s = Script::new(vec![
            Step::Status(502, None, vec![]),
            Step::Status(502, None, vec![]),
        ]);
        let policy = RetryPolicy {
            max_retries: 1,
            ..no_jitter()
        };
        let e = run(&retrier(policy), &s, CALL).await.unwrap_err();
        assert_eq!(s.count(), 2);
        assert!(e.is_decode() && e.is_retryable());
        assert_eq!(e.status(), Some(502));
        assert_eq!(e.request_id(), Some("req_2"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_beyond_the_deadline_fails_at_once_with_the_time_to_retry() {
        let s = Script::new(vec![]);
        let start = Instant::now();
        let call = CallInfo {
            deadline: Some(start + Duration::from_secs(5)),
            ..CALL
        };
        let e = run(&retrier(no_jitter()), &s, call).await.unwrap_err();
        // Attempts at 0 s, 1 s, 3 s; the next wait (4 s) would end at 7 s > 5 s.
        assert_eq!(s.count(), 3);
        assert_eq!(Instant::now() - start, Duration::from_secs(3));
        assert_eq!(e.stop_reason(), StopReason::Deadline);
        let at = e
            .retry_at()
            .unwrap()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(
            at > Duration::from_millis(3900) && at <= Duration::from_secs(4),
            "{at:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_cuts_a_hanging_attempt() {
        let s = Script::new(vec![Step::Hang]);
        let start = Instant::now();
        let call = CallInfo {
            deadline: Some(start + Duration::from_secs(2)),
            ..CALL
        };
        let e = run(&retrier(no_jitter()), &s, call).await.unwrap_err();
        assert_eq!(Instant::now() - start, Duration::from_secs(2));
        assert!(e.is_timeout());
        assert_eq!(e.stop_reason(), StopReason::Deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_attempt_times_out_and_is_retried() {
        let s = Script::new(vec![Step::Hang, ok()]);
        let r = retrier(no_jitter()).with_attempt_timeout(Some(Duration::from_secs(3)));
        run(&r, &s, CALL).await.unwrap();
        assert_eq!(s.gaps(), secs(&[4])); // 3 s timeout + 1 s backoff
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_stops_retries_when_empty_but_a_lone_failure_gets_them_all() {
        let budget = Arc::new(RetryBudget::new(RetryBudgetConfig {
            capacity: 7.0,
            extra_load: 0.0,
            refill_per_sec: 0.0,
        }));
        let r = Retrier::new(no_jitter()).with_budget(Some(budget.clone()));
        let s = Script::new(vec![]);
        let e = run(&r, &s, CALL).await.unwrap_err();
        assert_eq!(s.count(), 6);
        assert_eq!(e.stop_reason(), StopReason::RetriesExhausted);
        let s = Script::new(vec![]);
        let e = run(&r, &s, CALL).await.unwrap_err();
        assert_eq!(s.count(), 3); // two tokens were left
        assert_eq!(e.stop_reason(), StopReason::BudgetExhausted);
        let s = Script::new(vec![]);
        let e = run(&r, &s, CALL).await.unwrap_err();
        assert_eq!(s.count(), 1);
        assert!(e.to_string().contains("retry budget exhausted"), "{e}");
        assert!(budget.tokens() < 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_the_other_requests_to_the_host() {
        let r = retrier(no_jitter());
        let limited = Script::new(vec![with_retry_after(429, "10"), ok()]);
        let other = Script::new(vec![ok()]);
        let start = Instant::now();
        run(&r, &limited, CALL)
            .await
            .map(|_| ())
            .unwrap_or_else(|e| panic!("{e}"));
        // The first call slept its 10 s; a call starting during a fresh pause waits for it.
        let s2 = Script::new(vec![with_retry_after(429, "10"), ok()]);
        let r2 = r.clone();
        let first = tokio::spawn(async move { run(&r2, &s2, CALL).await.map(|_| s2) });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t1 = Instant::now();
        run(&r, &other, CALL).await.unwrap();
        let waited = other.times.lock().unwrap()[0] - t1;
        assert_eq!(waited, Duration::from_secs(9));
        assert!(first.await.unwrap().is_ok());
        assert_eq!(limited.gaps(), secs(&[10]));
        assert_eq!(Instant::now() - start, Duration::from_secs(20));
        // A different host is not paused.
        r.host_pause()
            .pause("h:1", Instant::now() + Duration::from_secs(30));
        let elsewhere = Script::new(vec![ok()]);
        let before = Instant::now();
        run(
            &r,
            &elsewhere,
            CallInfo {
                host: "other:2",
                ..CALL
            },
        )
        .await
        .unwrap();
        assert_eq!(Instant::now(), before);
    }

    #[tokio::test(start_paused = true)]
    async fn a_host_pause_that_outlasts_the_deadline_fails_at_once() {
        let r = retrier(no_jitter());
        r.host_pause()
            .pause("h:1", Instant::now() + Duration::from_secs(10));
        let s = Script::new(vec![ok()]);
        let call = CallInfo {
            deadline: Some(Instant::now() + Duration::from_secs(3)),
            ..CALL
        };
        let e = run(&r, &s, call).await.unwrap_err();
        assert_eq!(s.count(), 0);
        assert_eq!(e.kind(), &ErrorKind::Paused);
        assert_eq!(e.stop_reason(), StopReason::Deadline);
        assert_eq!(e.attempts(), 0);
        assert!(e.retry_at().is_some());
        assert!(e.is_retryable());
    }

    #[tokio::test(start_paused = true)]
    async fn history_records_status_code_request_id_and_each_delay_source() {
        let s = Script::new(vec![err(500), with_retry_after(429, "3"), Step::Drop, ok()]);
        let policy = RetryPolicy {
            max_retries: 2,
            ..no_jitter()
        };
        let e = run(&retrier(policy), &s, CALL).await.unwrap_err();
        let h = e.history();
        assert_eq!(h.len(), 3);
        assert_eq!(
            (
                h[0].status,
                h[0].code.as_deref(),
                h[0].request_id.as_deref()
            ),
            (Some(500), Some("internal_error"), Some("req_1"))
        );
        assert_eq!(
            h[1].waited,
            Some(Delay {
                duration: Duration::from_secs(1),
                source: DelaySource::Backoff(Duration::from_secs(1))
            })
        );
        assert_eq!(h[1].code.as_deref(), Some("rate_limit_exceeded"));
        // The 429 paused the host too; the retry's own Retry-After wait covers that pause.
        assert_eq!(
            h[2].waited,
            Some(Delay {
                duration: Duration::from_secs(3),
                source: DelaySource::RetryAfter(Duration::from_secs(3))
            })
        );
        assert_eq!(h[2].cause.as_deref(), Some("connection reset"));
        assert!(e.is_transport());
        assert_eq!(e.stop_reason(), StopReason::RetriesExhausted);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_call_cancels_it() {
        let s = Script::new(vec![]);
        let r = retrier(no_jitter());
        let res = tokio::time::timeout(Duration::from_millis(3500), run(&r, &s, CALL)).await;
        assert!(res.is_err());
        let n = s.count();
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(s.count(), n);
        assert_eq!(n, 3);
    }
}
