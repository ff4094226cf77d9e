//! The one place where an error becomes the contract's envelope.
//!
//! [`Error`]'s `IntoResponse` picks status, type, code, message and headers; [`envelope`] writes
//! the body, with the request id of the current request (a task-local set by the
//! gateway). Internal causes are logged here, inside the request's span, and never sent.

use crate::error::{Error, VoucherRefusal};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::time::Duration;
use tollgate_contract::{retry_after, ErrorBody, ErrorCode};

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

/// The top-up page as a link: absolute when the request named its host, else the path.
pub fn top_up_link() -> String {
    match ORIGIN.try_with(Origin::base) {
        Ok(Some(origin)) => format!("{origin}{TOP_UP_PATH}"),
        _ => TOP_UP_PATH.to_owned(),
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

/// Marks a response whose body is already the envelope, so the gateway leaves it alone.
#[derive(Debug, Clone, Copy)]
pub struct Enveloped;

/// Builds an error response in the envelope. Every error body of the server comes from here.
pub fn envelope(
    code: ErrorCode,
    message: impl Into<String>,
    param: Option<String>,
    extra: HeaderMap,
) -> Response {
    let mut body = ErrorBody::new(code, message);
    body.error.param = param;
    body.error.request_id = REQUEST_ID.try_with(Clone::clone).ok();
    let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{\"error\":{}}".to_vec());
    let mut response = (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        bytes,
    )
        .into_response();
    response.headers_mut().extend(extra);
    response.extensions_mut().insert(Enveloped);
    response
}

fn retry_after_header(wait: Duration) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(value) = header_value(format_args!("{}", retry_after::whole_seconds_ceil(wait))) {
        headers.insert(header::RETRY_AFTER, value);
    }
    headers
}

/// A header value formatted on the stack: one allocation (the value's own) instead of three.
pub fn header_value(args: std::fmt::Arguments<'_>) -> Option<HeaderValue> {
    struct Buf {
        bytes: [u8; 96],
        len: usize,
    }
    impl std::fmt::Write for Buf {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let end = self.len + s.len();
            let slot = self.bytes.get_mut(self.len..end).ok_or(std::fmt::Error)?;
            slot.copy_from_slice(s.as_bytes());
            self.len = end;
            Ok(())
        }
    }
    let mut buf = Buf {
        bytes: [0; 96],
        len: 0,
    };
    std::fmt::write(&mut buf, args).ok()?;
    HeaderValue::from_bytes(&buf.bytes[..buf.len]).ok()
}

fn www_authenticate() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    headers
}

/// "1 second", "3 seconds": a `Retry-After` in a message, rounded the same way as the header.
fn seconds(wait: Duration) -> String {
    human(Duration::from_secs(retry_after::whole_seconds_ceil(wait)))
}

/// "30 days", "2 seconds": the retention in a message.
fn human(duration: Duration) -> String {
    let secs = duration.as_secs();
    let (n, unit) = match secs {
        s if s >= 86_400 && s % 86_400 == 0 => (s / 86_400, "day"),
        s if s >= 3600 && s % 3600 == 0 => (s / 3600, "hour"),
        s if s >= 60 && s % 60 == 0 => (s / 60, "minute"),
        s => (s, "second"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let code = self.code();
        let none = HeaderMap::new;
        match self {
            Error::InvalidRequest { message, param, .. } => envelope(code, message, param, none()),
            Error::MissingCredential { admin: false } => envelope(
                code,
                "No API key was sent. Include it in the Authorization header as `Bearer tg_…`.",
                None,
                www_authenticate(),
            ),
            Error::MissingCredential { admin: true } => envelope(
                code,
                "This route needs the operator's token in the Authorization header as `Bearer <token>`.",
                None,
                www_authenticate(),
            ),
            Error::InvalidCredential { admin: false } => envelope(
                code,
                "The API key is not valid. Check that it is typed correctly and has not been revoked.",
                None,
                www_authenticate(),
            ),
            Error::InvalidCredential { admin: true } => {
                envelope(code, "The operator token is not valid. Check TOLLGATE_ADMIN_TOKEN.", None, www_authenticate())
            }
            Error::InsufficientCredits { cost, balance } => envelope(
                code,
                format!(
                    "This request costs {cost} credits but the balance is {balance}. \
                     Top up credits in the Dashboard: {} (sign in with your API key).",
                    top_up_link()
                ),
                None,
                none(),
            ),
            Error::NotFound { what, id } => {
                envelope(code, format!("No {what} with id `{id}` was found. Check the id."), None, none())
            }
            Error::Gone { what, id, retention } => envelope(
                code,
                format!("The {what} `{id}` has expired: it is kept for {} after creation.", human(retention)),
                None,
                none(),
            ),
            Error::RateLimited { retry_after } => envelope(
                code,
                format!("Rate limit exceeded. Please slow down and retry after {}.", seconds(retry_after)),
                None,
                retry_after_header(retry_after),
            ),
            Error::IdempotencyKeyReused => envelope(
                code,
                "This Idempotency-Key was already used with a different request. Use a new key for a new request.",
                Some("Idempotency-Key".to_owned()),
                none(),
            ),
            Error::IdempotencyKeyInUse => envelope(
                code,
                "A request with this Idempotency-Key is still being processed. Retry in a moment.",
                None,
                none(),
            ),
            Error::NotCancelable { id, status } => envelope(
                code,
                format!("The task `{id}` is {status}; only a queued task can be cancelled."),
                None,
                none(),
            ),
            Error::CsrfTokenInvalid => envelope(
                code,
                "This form is out of date or did not come from the dashboard. Reload the page and submit it again.",
                None,
                none(),
            ),
            Error::VoucherRefused(refusal) => envelope(
                code,
                voucher_refusal_message(refusal),
                Some("code".to_owned()),
                none(),
            ),
            Error::Unavailable { reason, retry_after } => {
                let mut headers = retry_after_header(retry_after);
                if reason == "shutting down" {
                    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                envelope(
                    code,
                    format!("The service is unavailable ({reason}). Retry after {}.", seconds(retry_after)),
                    None,
                    headers,
                )
            }
            Error::Internal(cause) => {
                tracing::error!(cause = %cause, "internal error");
                internal_error()
            }
        }
    }
}

/// The 500 a client sees, whatever the cause.
pub fn internal_error() -> Response {
    envelope(
        ErrorCode::InternalError,
        "The server failed to process the request. Retry after a moment; if it persists, contact support with the request id.",
        None,
        HeaderMap::new(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_reads_well() {
        assert_eq!(human(Duration::from_secs(30 * 86_400)), "30 days");
        assert_eq!(human(Duration::from_secs(2)), "2 seconds");
        assert_eq!(human(Duration::from_secs(3600)), "1 hour");
    }
}
