//! The one place where an error becomes the contract's envelope.
//!
//! [`Error`]'s `IntoResponse` picks status, type, code, message and headers; [`envelope`] writes
//! the body, with the request id of the current request (a task-local set by the
//! gateway). Internal causes are logged here, inside the request's span, and never sent.

use crate::error::{Error, VoucherRefusal};
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::time::Duration;
use tollgate_contract::{retry_after, ErrorCode};

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
///
/// `extra` are headers of the error (`Retry-After`, `WWW-Authenticate`, `Allow`).
pub fn envelope(
    code: ErrorCode,
    message: impl AsRef<str>,
    param: Option<&str>,
    extra: impl IntoIterator<Item = (HeaderName, HeaderValue)>,
) -> Response {
    let body = REQUEST_ID
        .try_with(|id| envelope_json(code, message.as_ref(), param, Some(id)))
        .unwrap_or_else(|_| envelope_json(code, message.as_ref(), param, None));
    let mut response = Response::new(Body::from(body));
    *response.status_mut() =
        StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    // Room for what the gateway adds (rate limit, request id) without growing the map.
    headers.reserve(6);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.extend(extra);
    response.extensions_mut().insert(Enveloped);
    response
}

/// The body of [`envelope`]: [`ErrorBody`]'s JSON (a test holds the two equal), written
/// directly because a 401 and a 429 are answered thousands of times a second and serde's
/// path (owned strings, escaping byte by byte) was the largest part of their cost.
fn envelope_json(
    code: ErrorCode,
    message: &str,
    param: Option<&str>,
    request_id: Option<&str>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + message.len());
    out.extend_from_slice(b"{\"error\":{\"message\":");
    json_string(&mut out, message);
    out.extend_from_slice(b",\"type\":");
    json_string(&mut out, code.error_type().as_str());
    out.extend_from_slice(b",\"code\":");
    json_string(&mut out, code.as_str());
    if let Some(param) = param {
        out.extend_from_slice(b",\"param\":");
        json_string(&mut out, param);
    }
    if let Some(id) = request_id {
        out.extend_from_slice(b",\"request_id\":");
        json_string(&mut out, id);
    }
    out.extend_from_slice(b"}}");
    out
}

/// A JSON string: copied as is when nothing in it needs escaping (the usual case), else by serde.
fn json_string(out: &mut Vec<u8>, text: &str) {
    // Whole chunks without early exit, so the check compiles to vector instructions.
    let plain = text.as_bytes().chunks(16).all(|chunk| {
        chunk.iter().fold(true, |plain, &b| {
            plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
        })
    });
    if plain {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else if serde_json::to_writer(&mut *out, text).is_err() {
        // Writing to a Vec cannot fail; an empty string keeps the JSON whole regardless.
        out.extend_from_slice(b"\"\"");
    }
}

fn retry_after_header(wait: Duration) -> [(HeaderName, HeaderValue); 1] {
    let seconds = retry_after::whole_seconds_ceil(wait);
    [(header::RETRY_AFTER, HeaderValue::from(seconds))]
}

fn www_authenticate() -> [(HeaderName, HeaderValue); 1] {
    [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))]
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

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let code = self.code();
        let none = || None::<(HeaderName, HeaderValue)>;
        match self {
            Error::InvalidRequest { message, param, .. } => {
                envelope(code, message, param.as_deref(), none())
            }
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
                with_seconds("Rate limit exceeded. Please slow down and retry after ", retry_after, "."),
                None,
                retry_after_header(retry_after),
            ),
            Error::IdempotencyKeyReused => envelope(
                code,
                "This Idempotency-Key was already used with a different request. Use a new key for a new request.",
                Some("Idempotency-Key"),
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
                Some("code"),
                none(),
            ),
            Error::Unavailable { reason, retry_after } => {
                let close = (reason == "shutting down")
                    .then(|| (header::CONNECTION, HeaderValue::from_static("close")));
                let headers = retry_after_header(retry_after).into_iter().chain(close);
                envelope(
                    code,
                    with_seconds(&format!("The service is unavailable ({reason}). Retry after "), retry_after, "."),
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
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_contract::ErrorBody;

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
                (Some("a\"b"), None),
            ] {
                let mut expected = ErrorBody::new(ErrorCode::RateLimitExceeded, message);
                expected.error.param = param.map(str::to_owned);
                expected.error.request_id = id.map(str::to_owned);
                let written = envelope_json(ErrorCode::RateLimitExceeded, message, param, id);
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
