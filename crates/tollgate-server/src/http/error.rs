//! The one place where an error becomes the contract's envelope.
//!
//! `From<Error> for` [`ErrorReply`] picks status, type, code, message and headers;
//! [`ErrorReply::into_response`] renders it, with the request id of the current request.
//! Internal causes are logged here, inside the request's span, and never sent.

use crate::error::{Error, StoreFault, VoucherRefusal};
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use std::borrow::Cow;
use std::time::Duration;
use tollgate_contract::{headers, retry_after, ErrorCode};

/// Where the 402 message sends people to top up: the dashboard's credits page.
pub const TOP_UP_PATH: &str = "/dashboard/credits";

tokio::task_local! {
    /// The `X-Request-Id` of the request being served.
    pub static REQUEST_ID: String;
    /// Where the request was addressed, so that a message can carry a whole link back to this
    /// server (the 402's top-up page).
    pub static ORIGIN: Origin;
}

/// The `Host` a request named and whether it came over TLS. Kept as the raw header (a cheap
/// clone) and formatted only when a message needs the link: most requests never do.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    host: Option<HeaderValue>,
    https: bool,
}

impl Origin {
    pub fn of(headers: &HeaderMap) -> Origin {
        Origin {
            host: headers.get(header::HOST).cloned(),
            https: super::dashboard::session::is_https(headers),
        }
    }

    /// `http(s)://host[:port]`, when the `Host` header is a plain host name or address.
    fn base(&self) -> Option<String> {
        let host = self.host.as_ref()?.to_str().ok()?;
        let plain = (1..=255).contains(&host.len())
            && host.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
            });
        let scheme = if self.https { "https" } else { "http" };
        plain.then(|| format!("{scheme}://{host}"))
    }
}

/// `http(s)://host[:port]` of the request being served, when it named a plain host.
pub fn request_base() -> Option<String> {
    ORIGIN.try_with(Origin::base).ok().flatten()
}

/// The top-up page as a link: absolute when the request named its host, else the path.
pub fn top_up_link() -> String {
    match request_base() {
        Some(origin) => format!("{origin}{TOP_UP_PATH}"),
        None => TOP_UP_PATH.to_owned(),
    }
}

/// What a person is told when a voucher code is refused (API and dashboard alike).
pub fn voucher_refusal_message(refusal: VoucherRefusal) -> &'static str {
    match refusal {
        VoucherRefusal::Unknown => {
            "No voucher has this code. Check that it is complete (`tgv_` and 32 characters)."
        }
        VoucherRefusal::AlreadyRedeemed => {
            "This voucher was already redeemed; each code works once. Ask your operator for a new one."
        }
        VoucherRefusal::Expired => {
            "This voucher has expired. Ask your operator for a new one."
        }
    }
}

/// Marks a response whose body is already the envelope, so the edge leaves it alone.
#[derive(Debug, Clone, Copy)]
pub struct Enveloped;

/// An error as the client gets it: the envelope's code, message and `param`, and the headers
/// that go with them (`x-should-retry` always; `Retry-After` with `retry-after-ms`,
/// `WWW-Authenticate`, `Allow`, `Connection: close` where they apply).
/// `From<Error>` is the mapping, the only one; [`ErrorReply::into_response`] renders it.
#[derive(Debug)]
pub struct ErrorReply {
    code: ErrorCode,
    message: Cow<'static, str>,
    param: Option<Cow<'static, str>>,
    /// How long the client should wait: `Retry-After` in whole seconds rounded up, and
    /// `retry-after-ms` in milliseconds rounded up, so that neither is shorter than the wait.
    retry_after: Option<Duration>,
    www_authenticate: bool,
    allow: Option<HeaderValue>,
    /// `Connection: close`: the server is going away, or the connection is no longer usable.
    close: bool,
}

/// The envelope as it is sent: [`ErrorBody`](tollgate_contract::ErrorBody)'s JSON (a test holds
/// the two equal), borrowed from the reply rather than copied into owned strings.
#[derive(Serialize)]
struct Envelope<'a> {
    error: EnvelopeDetail<'a>,
}

#[derive(Serialize)]
struct EnvelopeDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    error_type: &'static str,
    code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    param: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

impl ErrorReply {
    /// A reply with `code` and `message`, and no headers of its own yet.
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> ErrorReply {
        ErrorReply {
            code,
            message: message.into(),
            param: None,
            retry_after: None,
            www_authenticate: false,
            allow: None,
            close: false,
        }
    }

    fn param(mut self, param: Option<impl Into<Cow<'static, str>>>) -> ErrorReply {
        self.param = param.map(Into::into);
        self
    }

    fn retry_after(mut self, wait: Duration) -> ErrorReply {
        self.retry_after = Some(wait);
        self
    }

    fn www_authenticate(mut self) -> ErrorReply {
        self.www_authenticate = true;
        self
    }

    fn close(mut self) -> ErrorReply {
        self.close = true;
        self
    }

    /// With the `Allow` header of a 405.
    pub fn allow(mut self, allow: Option<HeaderValue>) -> ErrorReply {
        self.allow = allow;
        self
    }

    /// The 500 a client sees, whatever the cause.
    pub fn internal() -> ErrorReply {
        ErrorReply::new(
            ErrorCode::InternalError,
            "The server failed to process the request. Retry after a moment; if it persists, contact support with the request id.",
        )
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The envelope's JSON, with `request_id` in it.
    fn body(&self, request_id: Option<&str>) -> Vec<u8> {
        let envelope = Envelope {
            error: EnvelopeDetail {
                message: &self.message,
                error_type: self.code.error_type().as_str(),
                code: self.code.as_str(),
                param: self.param.as_deref(),
                request_id,
            },
        };
        // Serialising borrowed strings into a `Vec` cannot fail.
        serde_json::to_vec(&envelope).unwrap_or_default()
    }

    /// The response, with the request id of the request being served (the edge's task-local).
    pub fn into_response(self) -> Response {
        let body = REQUEST_ID
            .try_with(|id| self.body(Some(id)))
            .unwrap_or_else(|_| self.body(None));
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        // The hint the OpenAI- and Stripe-style SDKs obey, from the table's "retryable" column.
        headers.insert(
            SHOULD_RETRY,
            HeaderValue::from_static(if self.code.is_retryable() {
                "true"
            } else {
                "false"
            }),
        );
        if let Some(wait) = self.retry_after {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after::whole_seconds_ceil(wait)),
            );
            headers.insert(RETRY_AFTER_MS, HeaderValue::from(millis_ceil(wait)));
        }
        if self.www_authenticate {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(allow) = self.allow {
            headers.insert(header::ALLOW, allow);
        }
        if self.close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response.extensions_mut().insert(Enveloped);
        response
    }
}

const SHOULD_RETRY: header::HeaderName = header::HeaderName::from_static(headers::SHOULD_RETRY);
const RETRY_AFTER_MS: header::HeaderName = header::HeaderName::from_static(headers::RETRY_AFTER_MS);

/// `wait` in whole milliseconds, rounded up.
fn millis_ceil(wait: Duration) -> u64 {
    let millis = wait.as_millis() + u128::from(!wait.subsec_nanos().is_multiple_of(1_000_000));
    u64::try_from(millis).unwrap_or(u64::MAX)
}

/// `{before}{wait}{after}`, the wait as "1 second", "3 seconds" and rounded the same way as the
/// `Retry-After` header: one allocation and no `fmt`, for the 429 an abusive client draws by the
/// thousand.
fn with_seconds(before: &str, wait: Duration, after: &str) -> String {
    let mut text = String::with_capacity(before.len() + after.len() + 16);
    text.push_str(before);
    push_human(
        &mut text,
        Duration::from_secs(retry_after::whole_seconds_ceil(wait)),
    );
    text.push_str(after);
    text
}

/// "30 days", "2 seconds": the retention in a message.
fn human(duration: Duration) -> String {
    let mut text = String::new();
    push_human(&mut text, duration);
    text
}

fn push_human(text: &mut String, duration: Duration) {
    let secs = duration.as_secs();
    let (n, unit) = match secs {
        s if s >= 86_400 && s % 86_400 == 0 => (s / 86_400, "day"),
        s if s >= 3600 && s % 3600 == 0 => (s / 3600, "hour"),
        s if s >= 60 && s % 60 == 0 => (s / 60, "minute"),
        s => (s, "second"),
    };
    text.push_str(itoa::Buffer::new().format(n));
    text.push(' ');
    text.push_str(unit);
    if n != 1 {
        text.push('s');
    }
}

impl From<Error> for ErrorReply {
    /// The mapping: status, type and code come from the error's [`ErrorCode`]; the message says
    /// what to fix. An internal cause is logged here, inside the request's span, and never sent.
    fn from(error: Error) -> ErrorReply {
        let code = error.code();
        let reply = |message: &'static str| ErrorReply::new(code, message);
        match error {
            // The body stopped half-way: what is left of it on the connection cannot be read
            // as the next request, so the connection closes after this answer.
            Error::InvalidRequest { message, param, .. } if code == ErrorCode::RequestTimeout => {
                ErrorReply::new(code, message).param(param).close()
            }
            Error::InvalidRequest { message, param, .. } => {
                ErrorReply::new(code, message).param(param)
            }
            Error::MissingCredential { admin: false } => {
                reply("No API key was sent. Include it in the Authorization header as `Bearer tg_…`.")
                    .www_authenticate()
            }
            Error::MissingCredential { admin: true } => {
                reply("This route needs the operator's token in the Authorization header as `Bearer <token>`.")
                    .www_authenticate()
            }
            Error::InvalidCredential { admin: false } => {
                reply("The API key is not valid. Check that it is typed correctly and has not been revoked.")
                    .www_authenticate()
            }
            Error::InvalidCredential { admin: true } => {
                reply("The operator token is not valid. Check TOLLGATE_ADMIN_TOKEN.").www_authenticate()
            }
            Error::InsufficientCredits {
                cost,
                balance,
                priced,
            } => ErrorReply::new(
                code,
                format!(
                    "This request costs {cost} {}{} but the balance is {balance}. \
                     Top up credits in the Dashboard: {} (sign in with your API key).",
                    if cost == 1 { "credit" } else { "credits" },
                    priced
                        .as_ref()
                        .map(|p| format!(" ({p})"))
                        .unwrap_or_default(),
                    top_up_link()
                ),
            ),
            Error::KeySpendLimitReached {
                limit,
                spent,
                resets_at,
            } => ErrorReply::new(
                code,
                format!(
                    "This API key may spend {} credits {}, and has spent {spent}; this request would pass that. {}",
                    limit.credits,
                    match limit.period {
                        tollgate_contract::SpendPeriod::Day => "a day",
                        tollgate_contract::SpendPeriod::Week => "a week",
                        tollgate_contract::SpendPeriod::Month => "a month",
                        tollgate_contract::SpendPeriod::Total => "in all",
                    },
                    match resets_at.and_then(|at| {
                        at.format(&time::format_description::well_known::Rfc3339).ok()
                    }) {
                        Some(at) => format!("The limit resets at {at}."),
                        None => "Ask the operator to raise the key's limit, or use another key.".to_owned(),
                    }
                ),
            ),
            Error::NotFound { what, id } => {
                ErrorReply::new(code, format!("No {what} with id `{id}` was found. Check the id."))
            }
            Error::Gone { what, id, retention } => ErrorReply::new(
                code,
                format!("The {what} `{id}` has expired: it is kept for {} after creation.", human(retention)),
            ),
            Error::LinkExpired => reply(
                "This image link has expired. Get the task again (`GET /v1/tasks/{id}`) for a fresh link.",
            ),
            Error::RateLimited { retry_after } => ErrorReply::new(
                code,
                with_seconds("Rate limit exceeded. Please slow down and retry after ", retry_after, "."),
            )
            .retry_after(retry_after),
            Error::IdempotencyKeyReused => reply(
                "This Idempotency-Key was already used with a different request. Use a new key for a new request.",
            )
            .param(Some("Idempotency-Key")),
            Error::IdempotencyKeyInUse => reply(
                "A request with this Idempotency-Key is still being processed. Retry in a moment.",
            ),
            Error::NotCancelable { id, status } => ErrorReply::new(
                code,
                format!("The task `{id}` is {status}; only a queued or running task can be cancelled."),
            ),
            Error::CsrfTokenInvalid => reply(
                "This form is out of date or did not come from the dashboard. Reload the page and submit it again.",
            ),
            Error::VoucherRefused(refusal) => {
                reply(voucher_refusal_message(refusal)).param(Some("code"))
            }
            // The connection closes after this answer: the server is going away.
            Error::ShuttingDown { retry_after } => ErrorReply::new(
                code,
                with_seconds("The service is unavailable (shutting down). Retry after ", retry_after, "."),
            )
            .retry_after(retry_after)
            .close(),
            Error::Unavailable { reason, retry_after } => ErrorReply::new(
                code,
                with_seconds(&format!("The service is unavailable ({reason}). Retry after "), retry_after, "."),
            )
            .retry_after(retry_after),
            Error::StoreUnavailable { fault, cause } => {
                // Not a bug: logged as a warning, with the cause the client never sees.
                tracing::warn!(fault = fault.as_str(), cause = %cause, "store unavailable; answered 503");
                let retry_after = fault.retry_after();
                let message = match fault {
                    StoreFault::DiskFull | StoreFault::LowDisk => with_seconds(
                        "The server is out of disk space, so nothing was stored or charged. Retry after ",
                        retry_after,
                        ".",
                    ),
                    _ => with_seconds(
                        "The server could not reach its database, so the request was not carried out. \
                         Retry after ",
                        retry_after,
                        "; a retry with the same Idempotency-Key is never charged twice.",
                    ),
                };
                ErrorReply::new(code, message).retry_after(retry_after)
            }
            Error::Internal(cause) => {
                tracing::error!(cause = %cause, "internal error");
                ErrorReply::internal()
            }
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        ErrorReply::from(self).into_response()
    }
}

/// The 500 a client sees, whatever the cause.
pub fn internal_error() -> Response {
    ErrorReply::internal().into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_contract::ErrorBody;

    #[test]
    fn retry_after_ms_is_never_shorter_than_the_wait() {
        assert_eq!(millis_ceil(Duration::from_millis(1500)), 1500);
        assert_eq!(millis_ceil(Duration::from_micros(1_500_001)), 1501);
        assert_eq!(millis_ceil(Duration::from_nanos(1)), 1);
        assert_eq!(millis_ceil(Duration::ZERO), 0);
    }

    #[test]
    fn the_envelope_is_the_contracts_error_body() {
        let messages = [
            "Rate limit exceeded. Please slow down and retry after 58 seconds.",
            "Include it as `Bearer tg_…`.",
            "quotes \" and \\ backslashes",
            "a\nnew line and a \u{1} control",
        ];
        for message in messages {
            for (param, id) in [
                (None, None),
                (Some("n"), Some("req_1")),
                (None, Some("trace-1.a:b_c")),
                (Some("a\"b"), None),
            ] {
                let mut expected = ErrorBody::new(ErrorCode::RateLimitExceeded, message);
                expected.error.param = param.map(str::to_owned);
                expected.error.request_id = id.map(str::to_owned);
                let reply = ErrorReply::new(ErrorCode::RateLimitExceeded, message)
                    .param(param.map(str::to_owned));
                let written = reply.body(id);
                assert_eq!(
                    written,
                    serde_json::to_vec(&expected).unwrap(),
                    "{message:?}"
                );
                let parsed: ErrorBody = serde_json::from_slice(&written).unwrap();
                assert_eq!(parsed, expected);
            }
        }
    }

    #[test]
    fn retention_reads_well() {
        assert_eq!(human(Duration::from_secs(30 * 86_400)), "30 days");
        assert_eq!(human(Duration::from_secs(2)), "2 seconds");
        assert_eq!(human(Duration::from_secs(3600)), "1 hour");
        let wait = Duration::from_millis(1500);
        assert_eq!(with_seconds("after ", wait, "."), "after 2 seconds.");
        assert_eq!(with_seconds("", Duration::from_millis(10), ""), "1 second");
    }
}
