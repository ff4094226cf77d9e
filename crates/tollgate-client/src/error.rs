//! The SDK's one error type: what went wrong, what the caller can do about it, and how we got there.
//!
//! [`Error`] answers the questions a caller asks of a failure — [`Error::is_retryable`],
//! [`Error::retry_after`], [`Error::retry_at`], [`Error::code`], [`Error::status`],
//! [`Error::request_id`] — and keeps the attempt history of the call ([`Error::history`]). Its
//! [`ErrorKind`] keeps the server's envelope ([`ApiError`]) apart from transport failures (no
//! response at all) and decode failures (a response this client cannot read), because they call
//! for different fixes.
//!
//! `Display` is one line that says what happened and what to do, after the seed's "How to Fix"
//! column. Neither `Display` nor `Debug` contains a credential: the error never holds a header,
//! and transport causes are taken from reqwest without the URL.

use std::fmt;
use std::time::{Duration, SystemTime};

use tollgate_contract::ErrorCode;

const PAUSED: &str =
    "requests to the server are paused by its rate limit for longer than this call may wait";

/// `Result` with the SDK's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Any failure of an SDK call. Cheap to move (one box).
pub struct Error {
    inner: Box<Inner>,
}

#[derive(Debug, Clone)]
struct Inner {
    kind: ErrorKind,
    retryable: bool,
    stop: StopReason,
    retry_at: Option<SystemTime>,
    history: Vec<AttemptRecord>,
}

/// What kind of failure it was.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The server answered with its error envelope.
    Api(ApiError),
    /// No (complete) response: connection refused or reset, or a timeout.
    Transport(TransportError),
    /// A response this client cannot read: not the envelope on an error status, or a success body
    /// that does not match the contract.
    Decode(DecodeError),
    /// Nothing was sent: requests to the host are paused (another request of this client got a 429
    /// with `Retry-After`) for longer than this call may wait. [`Error::retry_at`] says until when.
    Paused,
    /// The call could not be made as asked: a bad base URL, a missing credential, an invalid
    /// `Idempotency-Key`. Nothing was sent.
    Config(String),
}

/// The server's error envelope, with the response facts around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// The envelope's `type`, e.g. `rate_limit_error`.
    pub error_type: String,
    /// The envelope's `code`, e.g. `rate_limit_exceeded`.
    pub code: String,
    /// The server's sentence about what to fix.
    pub message: String,
    /// The offending field, for 400s.
    pub param: Option<String>,
    /// The envelope's `request_id`, or else the `X-Request-Id` header.
    pub request_id: Option<String>,
    /// The response's `Retry-After`, parsed (both forms).
    pub retry_after: Option<Duration>,
}

impl ApiError {
    /// The code as a known [`ErrorCode`]; `None` for a code newer than this SDK.
    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_code(&self.code)
    }
}

/// A failure to get a response at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportError {
    pub kind: TransportKind,
    /// The cause chain, without URL or headers.
    pub message: String,
}

/// The broad cause of a [`TransportError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportKind {
    /// Could not connect (refused, unreachable, DNS).
    Connect,
    /// No answer in time (per-attempt timeout or the call's deadline).
    Timeout,
    /// The connection broke while sending or receiving.
    Other,
}

/// A response this client cannot read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub status: u16,
    pub request_id: Option<String>,
    /// What did not match.
    pub message: String,
}

/// Why the SDK stopped retrying and handed the error back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// The outcome is never retried (400, 401, 402, 404, 405, 410, 413, a decode failure, …).
    NotRetryable,
    /// The policy's `max_retries` retries were made.
    RetriesExhausted,
    /// The server asked for a wait longer than the policy's `max_retry_after`.
    RetryAfterTooLong(Duration),
    /// The client's retry budget had no token left: the service looks degraded, so this call did
    /// not add retries to its load.
    BudgetExhausted,
    /// The next wait would not fit in the call's deadline (or the deadline passed mid-request).
    Deadline,
}

impl StopReason {
    fn describe(self) -> Option<String> {
        match self {
            StopReason::NotRetryable => None,
            StopReason::RetriesExhausted => Some("retries exhausted".to_owned()),
            StopReason::RetryAfterTooLong(wait) => Some(format!(
                "the server asked to wait {} s, longer than this client waits",
                tollgate_contract::retry_after::whole_seconds_ceil(wait)
            )),
            StopReason::BudgetExhausted => {
                Some("retry budget exhausted: too many recent failures".to_owned())
            }
            StopReason::Deadline => {
                Some("the call's deadline leaves no time for another attempt".to_owned())
            }
        }
    }
}

/// One request of a call, as the final error remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// 1 for the first request, 2 for the first retry, …
    pub number: u32,
    /// What was waited before this request was sent, and why; `None` when it went at once.
    pub waited: Option<Delay>,
    /// The response's status; `None` for a transport failure.
    pub status: Option<u16>,
    /// The envelope's code, when there was one.
    pub code: Option<String>,
    /// The response's request id, when there was one.
    pub request_id: Option<String>,
    /// The transport failure, when there was no response.
    pub cause: Option<String>,
}

/// A wait before an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delay {
    /// The whole wait, jitter included.
    pub duration: Duration,
    pub source: DelaySource,
}

/// Where a wait came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelaySource {
    /// The previous response's `Retry-After` (the value asked for), as a floor, plus jitter.
    RetryAfter(Duration),
    /// Exponential backoff (the capped exponential part), plus jitter.
    Backoff(Duration),
    /// Another request of this client got a 429 with `Retry-After`: the host was paused until then.
    HostPause,
}

impl fmt::Display for DelaySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DelaySource::RetryAfter(d) => write!(f, "retry-after {} ms", d.as_millis()),
            DelaySource::Backoff(d) => write!(f, "backoff {} ms", d.as_millis()),
            DelaySource::HostPause => f.write_str("host paused by a 429"),
        }
    }
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, retryable: bool, stop: StopReason) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                retryable,
                stop,
                retry_at: None,
                history: Vec::new(),
            }),
        }
    }

    /// A call that could not be made as asked; nothing was sent.
    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::new(
            ErrorKind::Config(message.into()),
            false,
            StopReason::NotRetryable,
        )
    }

    /// A success response whose body does not match the contract.
    pub(crate) fn decode(
        status: u16,
        request_id: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::new(
            ErrorKind::Decode(DecodeError {
                status,
                request_id,
                message: message.into(),
            }),
            false,
            StopReason::NotRetryable,
        )
    }

    pub(crate) fn with_history(mut self, history: Vec<AttemptRecord>) -> Self {
        self.inner.history = history;
        self
    }

    pub(crate) fn with_retry_at(mut self, at: Option<SystemTime>) -> Self {
        self.inner.retry_at = at;
        self
    }

    pub fn kind(&self) -> &ErrorKind {
        &self.inner.kind
    }

    /// The server's envelope, when the failure was an error response.
    pub fn api(&self) -> Option<&ApiError> {
        match &self.inner.kind {
            ErrorKind::Api(e) => Some(e),
            _ => None,
        }
    }

    /// The HTTP status of the last response, if there was one.
    pub fn status(&self) -> Option<u16> {
        match &self.inner.kind {
            ErrorKind::Api(e) => Some(e.status),
            ErrorKind::Decode(e) => Some(e.status),
            _ => None,
        }
    }

    /// The envelope's `code`, e.g. `"insufficient_credits"`.
    pub fn code(&self) -> Option<&str> {
        self.api().map(|e| e.code.as_str())
    }

    /// The envelope's code as a known [`ErrorCode`].
    pub fn error_code(&self) -> Option<ErrorCode> {
        self.api().and_then(ApiError::error_code)
    }

    /// The envelope's `type`, e.g. `"billing_error"`.
    pub fn error_type(&self) -> Option<&str> {
        self.api().map(|e| e.error_type.as_str())
    }

    /// The server's message, or the SDK's description of a failure without one.
    pub fn message(&self) -> String {
        match &self.inner.kind {
            ErrorKind::Api(e) => e.message.clone(),
            ErrorKind::Transport(e) => e.message.clone(),
            ErrorKind::Decode(e) => e.message.clone(),
            ErrorKind::Paused => PAUSED.to_owned(),
            ErrorKind::Config(m) => m.clone(),
        }
    }

    /// The offending field of a 400.
    pub fn param(&self) -> Option<&str> {
        self.api().and_then(|e| e.param.as_deref())
    }

    /// The request id of the last response, to quote to the operator.
    pub fn request_id(&self) -> Option<&str> {
        match &self.inner.kind {
            ErrorKind::Api(e) => e.request_id.as_deref(),
            ErrorKind::Decode(e) => e.request_id.as_deref(),
            _ => None,
        }
    }

    /// Whether sending the same request again later may succeed, by the client's retry table
    /// (429, 5xx, 409 `idempotency_key_in_use`, transport failures and the caller's overrides).
    pub fn is_retryable(&self) -> bool {
        self.inner.retryable
    }

    /// The last response's `Retry-After`, parsed (seconds or HTTP-date).
    pub fn retry_after(&self) -> Option<Duration> {
        self.api().and_then(|e| e.retry_after)
    }

    /// When the caller could try again: set when the SDK gave up because a wait was too long for
    /// its limit or for the call's deadline.
    pub fn retry_at(&self) -> Option<SystemTime> {
        self.inner.retry_at
    }

    /// How many requests the call sent (0 when it could not be made).
    pub fn attempts(&self) -> u32 {
        u32::try_from(self.inner.history.len()).unwrap_or(u32::MAX)
    }

    /// Every request of the call, in order.
    pub fn history(&self) -> &[AttemptRecord] {
        &self.inner.history
    }

    /// Why the SDK stopped retrying.
    pub fn stop_reason(&self) -> StopReason {
        self.inner.stop
    }

    /// No response at all (connect, reset, timeout).
    pub fn is_transport(&self) -> bool {
        matches!(self.inner.kind, ErrorKind::Transport(_))
    }

    /// A timeout: of an attempt, or of the call's deadline.
    pub fn is_timeout(&self) -> bool {
        matches!(&self.inner.kind, ErrorKind::Transport(t) if t.kind == TransportKind::Timeout)
    }

    /// A response this client could not read.
    pub fn is_decode(&self) -> bool {
        matches!(self.inner.kind, ErrorKind::Decode(_))
    }

    /// What the caller should do, after the seed's "How to Fix" column.
    pub fn hint(&self) -> &'static str {
        match &self.inner.kind {
            ErrorKind::Api(e) => hint_for(e.status, &e.code),
            ErrorKind::Transport(_) => {
                "Check the base URL and that the server is running and reachable, then retry."
            }
            ErrorKind::Decode(e) if e.status >= 500 => {
                "Retry after a moment; contact the operator if the issue persists."
            }
            ErrorKind::Decode(_) => {
                "Check that the base URL points at a tollgate server of a compatible version."
            }
            ErrorKind::Paused => {
                "Slow down requests; retry at the time given, or allow the call a longer deadline."
            }
            ErrorKind::Config(_) => "Fix the client's configuration or arguments.",
        }
    }
}

/// The seed's "How to Fix" column: the error table's hint for a known code, else by status.
fn hint_for(status: u16, code: &str) -> &'static str {
    match ErrorCode::from_code(code) {
        Some(code) => code.hint(),
        None => match status {
            400 | 422 => "Check the request body format and required fields.",
            401 => "Check that your API key is valid and included in the Authorization header.",
            402 => "Add credits, then retry.",
            403 => "Check that the credential is allowed to do this.",
            404 => "Check the endpoint URL and any resource IDs.",
            409 => "The resource's current state does not allow this; check it before trying again.",
            410 => "The resource is permanently gone.",
            429 => "Slow down requests and implement backoff; wait for the Retry-After duration.",
            500..=599 => "Retry after a moment; contact the operator with the request id if the issue persists.",
            _ => "Check the request against the API contract.",
        },
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn format_time(at: SystemTime) -> String {
    time::OffsetDateTime::from(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "an unrepresentable time".to_owned())
}

impl fmt::Display for Error {
    /// One line: the message, the facts in brackets, then what to do.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut facts: Vec<String> = Vec::new();
        match &self.inner.kind {
            ErrorKind::Api(e) => {
                f.write_str(e.message.trim_end())?;
                facts.push(format!("{} {}", e.status, e.code));
                if let Some(p) = &e.param {
                    facts.push(format!("param {p}"));
                }
            }
            ErrorKind::Transport(e) => {
                match e.kind {
                    TransportKind::Connect => f.write_str("could not connect to the server")?,
                    TransportKind::Timeout => f.write_str("the server did not answer in time")?,
                    TransportKind::Other => f.write_str("the connection to the server failed")?,
                }
                if !e.message.is_empty() {
                    write!(f, ": {}", e.message)?;
                }
            }
            ErrorKind::Decode(e) => {
                write!(f, "unexpected response from the server: {}", e.message)?;
                facts.push(format!("HTTP {}", e.status));
            }
            ErrorKind::Paused => f.write_str(PAUSED)?,
            ErrorKind::Config(m) => f.write_str(m)?,
        }
        if let Some(id) = self.request_id() {
            facts.push(format!("request id {id}"));
        }
        let attempts = self.attempts();
        if attempts > 0 {
            let mut a = format!("{attempts} attempt{}", plural(attempts));
            if let Some(why) = self.inner.stop.describe() {
                a.push_str(": ");
                a.push_str(&why);
            }
            facts.push(a);
        }
        if let Some(at) = self.inner.retry_at {
            facts.push(format!("retry at {}", format_time(at)));
        }
        if !facts.is_empty() {
            write!(f, " [{}]", facts.join(", "))?;
        }
        write!(f, " {}", self.hint())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.inner.kind)
            .field("retryable", &self.inner.retryable)
            .field("stop", &self.inner.stop)
            .field("retry_at", &self.inner.retry_at)
            .field("history", &self.inner.history)
            .finish()
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, code: &str) -> ApiError {
        ApiError {
            status,
            error_type: ErrorCode::from_code(code)
                .map_or("x", |c| c.error_type().as_str())
                .to_owned(),
            code: code.to_owned(),
            message: "The balance does not cover the cost.".to_owned(),
            param: None,
            request_id: Some("req_123".to_owned()),
            retry_after: None,
        }
    }

    fn record(n: u32) -> AttemptRecord {
        AttemptRecord {
            number: n,
            waited: None,
            status: Some(402),
            code: None,
            request_id: None,
            cause: None,
        }
    }

    #[test]
    fn display_is_one_line_with_message_code_request_id_attempts_and_fix() {
        let e = Error::new(
            ErrorKind::Api(api(402, "insufficient_credits")),
            false,
            StopReason::NotRetryable,
        )
        .with_history(vec![record(1)]);
        let s = e.to_string();
        assert!(!s.contains('\n'));
        assert_eq!(
            s,
            "The balance does not cover the cost. [402 insufficient_credits, request id req_123, 1 attempt] \
             Add credits, then retry."
        );
        assert_eq!(e.code(), Some("insufficient_credits"));
        assert_eq!(e.error_code(), Some(ErrorCode::InsufficientCredits));
        assert_eq!(e.error_type(), Some("billing_error"));
        assert_eq!(e.status(), Some(402));
        assert_eq!(e.request_id(), Some("req_123"));
        assert!(!e.is_retryable());
    }

    #[test]
    fn display_says_why_retries_stopped_and_when_to_come_back() {
        let mut a = api(429, "rate_limit_exceeded");
        a.message = "Rate limit exceeded. Please slow down.".to_owned();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let e = Error::new(
            ErrorKind::Api(a),
            true,
            StopReason::RetryAfterTooLong(Duration::from_secs(120)),
        )
        .with_history(vec![record(1), record(2)])
        .with_retry_at(Some(at));
        let s = e.to_string();
        assert!(
            s.contains("2 attempts: the server asked to wait 120 s"),
            "{s}"
        );
        assert!(s.contains("retry at 2023-11-14T22:13:20Z"), "{s}");
        assert!(s.contains("wait for the Retry-After duration"), "{s}");
        assert_eq!(e.retry_at(), Some(at));
    }

    #[test]
    fn every_contract_code_has_a_fix() {
        for code in ErrorCode::ALL {
            let hint = hint_for(code.status(), code.as_str());
            assert!(hint.ends_with('.'), "{code}: {hint}");
        }
        assert_eq!(
            hint_for(410, "resource_expired"),
            hint_for(410, "resource_expired")
        );
        assert!(hint_for(503, "something_new").starts_with("Retry after a moment"));
    }

    #[test]
    fn transport_and_decode_are_apart() {
        let t = Error::new(
            ErrorKind::Transport(TransportError {
                kind: TransportKind::Connect,
                message: "refused".into(),
            }),
            true,
            StopReason::BudgetExhausted,
        )
        .with_history(vec![record(1)]);
        assert!(t.is_transport() && !t.is_decode() && !t.is_timeout());
        assert_eq!(t.status(), None);
        assert!(
            t.to_string()
                .starts_with("could not connect to the server: refused ["),
            "{t}"
        );
        assert!(t.to_string().contains("retry budget exhausted"), "{t}");
        let d = Error::decode(200, Some("req_1".into()), "missing field `id`");
        assert!(d.is_decode() && !d.is_retryable());
        assert_eq!(d.status(), Some(200));
        assert_eq!(d.attempts(), 0);
    }
}
