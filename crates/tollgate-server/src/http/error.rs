//! The one place where an error becomes the contract's envelope.
//!
//! `From<Error> for` [`ErrorReply`] picks status, type, code, message and headers;
//! [`ErrorReply::write_body`] writes the body, with the request id of the current request.
//! Internal causes are logged here, inside the request's span, and never sent.

use crate::error::{Error, StoreFault, VoucherRefusal};
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::borrow::Cow;
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

const APPLICATION_JSON: &[u8] = b"application/json";

/// An error as the client gets it: the envelope's code, message and `param`, and the headers
/// that go with them (`Retry-After`, `WWW-Authenticate`, `Allow`, `Connection: close`).
///
/// `From<Error>` is the mapping, the only one. A reply is then rendered either as a [`Response`]
/// ([`ErrorReply::into_response`], for the router and hyper) or, for the refusals the gateway
/// makes from a request's head, written straight onto the connection by the fast lane from the
/// same [`ErrorReply::headers`] and [`ErrorReply::write_body`]: one set of headers, one body.
#[derive(Debug)]
pub struct ErrorReply {
    code: ErrorCode,
    message: Cow<'static, str>,
    param: Option<Cow<'static, str>>,
    /// `Retry-After`, in whole seconds.
    retry_after: Option<u64>,
    www_authenticate: bool,
    allow: Option<HeaderValue>,
    /// `Connection: close`: the server is going away.
    close: bool,
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
        self.retry_after = Some(retry_after::whole_seconds_ceil(wait));
        self
    }

    fn www_authenticate(mut self) -> ErrorReply {
        self.www_authenticate = true;
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

    /// The reply's headers, in the order they are sent: `Content-Type` first.
    pub fn headers(&self, mut header: impl FnMut(&HeaderName, &[u8])) {
        header(&header::CONTENT_TYPE, APPLICATION_JSON);
        if let Some(seconds) = self.retry_after {
            header(
                &header::RETRY_AFTER,
                itoa::Buffer::new().format(seconds).as_bytes(),
            );
        }
        if self.www_authenticate {
            header(&header::WWW_AUTHENTICATE, b"Bearer");
        }
        if let Some(allow) = &self.allow {
            header(&header::ALLOW, allow.as_bytes());
        }
        if self.close {
            header(&header::CONNECTION, b"close");
        }
    }

    /// Appends the envelope to `out`. Every error body of the server is written here.
    pub fn write_body(&self, out: &mut Vec<u8>, request_id: Option<&str>) {
        write_envelope(
            out,
            self.code,
            &self.message,
            self.param.as_deref(),
            request_id,
        );
    }

    /// The response, with the request id of the request being served (the gateway's task-local).
    pub fn into_response(self) -> Response {
        match REQUEST_ID.try_with(|id| self.response(Some(id))) {
            Ok(response) => response,
            Err(_) => self.response(None),
        }
    }

    /// The response, with `request_id` in its body.
    pub fn response(&self, request_id: Option<&str>) -> Response {
        let mut body = Vec::with_capacity(128 + self.message.len());
        self.write_body(&mut body, request_id);
        enveloped_response(self.status(), body, |header| self.headers(header))
    }
}

/// A response whose body is already the envelope, with the headers `each_header` lists (an
/// [`ErrorReply`]'s, or a gateway refusal's, which adds its own to the reply's).
pub fn enveloped_response(
    status: StatusCode,
    body: Vec<u8>,
    each_header: impl FnOnce(&mut dyn FnMut(&HeaderName, &[u8])),
) -> Response {
    let mut response = listed_response(status, Body::from(body), each_header);
    response.extensions_mut().insert(Enveloped);
    response
}

/// A response with `body` and the headers `each_header` lists, in that order.
pub fn listed_response(
    status: StatusCode,
    body: Body,
    each_header: impl FnOnce(&mut dyn FnMut(&HeaderName, &[u8])),
) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    // Room for what the gateway adds (rate limit, request id) without growing the map.
    headers.reserve(6);
    each_header(&mut |name, value| {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.insert(name.clone(), value);
        }
    });
    response
}

/// The body of every error: [`ErrorBody`](tollgate_contract::ErrorBody)'s JSON (a test holds
/// the two equal), written directly because a 401 and a 429 are answered thousands of times a
/// second and serde's path (owned strings, escaping byte by byte) was the largest part of their cost.
fn write_envelope(
    out: &mut Vec<u8>,
    code: ErrorCode,
    message: &str,
    param: Option<&str>,
    request_id: Option<&str>,
) {
    out.extend_from_slice(b"{\"error\":{\"message\":");
    json_string(out, message);
    out.extend_from_slice(b",\"type\":\"");
    // The contract's names need no escaping (a test holds every code to that).
    out.extend_from_slice(code.error_type().as_str().as_bytes());
    out.extend_from_slice(b"\",\"code\":\"");
    out.extend_from_slice(code.as_str().as_bytes());
    out.push(b'"');
    if let Some(param) = param {
        out.extend_from_slice(b",\"param\":");
        json_string(out, param);
    }
    if let Some(id) = request_id {
        out.extend_from_slice(b",\"request_id\":\"");
        // A request id is letters, digits and `-_.:` (the gateway keeps no other): no escaping.
        debug_assert!(plain_json(id.as_bytes()), "{id:?}");
        out.extend_from_slice(id.as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b"}}");
}

/// A JSON string: copied as is when nothing in it needs escaping (the usual case), else by serde.
fn json_string(out: &mut Vec<u8>, text: &str) {
    if plain_json(text.as_bytes()) {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else if serde_json::to_writer(&mut *out, text).is_err() {
        // Writing to a Vec cannot fail; an empty string keeps the JSON whole regardless.
        out.extend_from_slice(b"\"\"");
    }
}

/// Whether `bytes` can stand in a JSON string as they are: no control character, quote or
/// backslash. Eight bytes at a time (the classic "has a byte below / equal to" bit tricks), as
/// a message is checked on every error.
fn plain_json(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let mut words = bytes.chunks_exact(8);
    let mut special = 0;
    for word in &mut words {
        let mut eight = [0u8; 8];
        eight.copy_from_slice(word);
        let v = u64::from_ne_bytes(eight);
        // Below 0x20: a zero once the top three bits of bytes under 0x80 are cleared.
        let control = has_zero(v & u64::from_ne_bytes([0xe0; 8]));
        special |= control
            | has_zero(v ^ u64::from_ne_bytes([b'"'; 8]))
            | has_zero(v ^ u64::from_ne_bytes([b'\\'; 8]));
    }
    special == 0
        && words
            .remainder()
            .iter()
            .all(|&b| b >= 0x20 && b != b'"' && b != b'\\')
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
            Error::InsufficientCredits { cost, balance } => ErrorReply::new(
                code,
                format!(
                    "This request costs {cost} credits but the balance is {balance}. \
                     Top up credits in the Dashboard: {} (sign in with your API key).",
                    top_up_link()
                ),
            ),
            Error::NotFound { what, id } => {
                ErrorReply::new(code, format!("No {what} with id `{id}` was found. Check the id."))
            }
            Error::Gone { what, id, retention } => ErrorReply::new(
                code,
                format!("The {what} `{id}` has expired: it is kept for {} after creation.", human(retention)),
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
                format!("The task `{id}` is {status}; only a queued task can be cancelled."),
            ),
            Error::CsrfTokenInvalid => reply(
                "This form is out of date or did not come from the dashboard. Reload the page and submit it again.",
            ),
            Error::VoucherRefused(refusal) => {
                reply(voucher_refusal_message(refusal)).param(Some("code"))
            }
            Error::Unavailable { reason, retry_after } => {
                let mut unavailable = ErrorReply::new(
                    code,
                    with_seconds(&format!("The service is unavailable ({reason}). Retry after "), retry_after, "."),
                )
                .retry_after(retry_after);
                unavailable.close = reason == "shutting down";
                unavailable
            }
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
                let mut written = Vec::new();
                write_envelope(
                    &mut written,
                    ErrorCode::RateLimitExceeded,
                    message,
                    param,
                    id,
                );
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
    fn plain_json_is_exact() {
        let naive = |bytes: &[u8]| bytes.iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\');
        let base = *b"Rate limit exceeded, 17 s.";
        for at in 0..base.len() {
            for b in 0..=255u8 {
                let mut text = base;
                text[at] = b;
                assert_eq!(plain_json(&text), naive(&text), "byte {b:#x} at {at}");
            }
        }
        assert!(plain_json(b""));
        // The contract's names are written without the check.
        for code in ErrorCode::ALL {
            assert!(plain_json(code.as_str().as_bytes()));
            assert!(plain_json(code.error_type().as_str().as_bytes()));
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
