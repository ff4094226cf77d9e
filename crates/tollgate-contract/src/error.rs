//! The error envelope and the table that ties each code to its status, type and retryability.
//!
//! The table is the one of `CONTRACT.md`; [`ErrorCode`] is its single source. The server builds
//! every error body from it, and the client classifies responses with it.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The body of every error response: `{"error": {...}}` and no other top-level key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong, for a person (`message`) and for a program (`type`, `code`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// One sentence that says what to fix.
    pub message: String,
    /// The broad class, e.g. `rate_limit_error`.
    #[serde(rename = "type")]
    pub error_type: String,
    /// The precise reason, e.g. `rate_limit_exceeded`.
    pub code: String,
    /// The offending field or header, for 400s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    /// The `X-Request-Id` of the response, to quote to support.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// The `type` of an error: its broad class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorType {
    InvalidRequest,
    Authentication,
    Billing,
    NotFound,
    Conflict,
    Gone,
    RateLimit,
    Server,
}

impl ErrorType {
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorType::InvalidRequest => "invalid_request_error",
            ErrorType::Authentication => "authentication_error",
            ErrorType::Billing => "billing_error",
            ErrorType::NotFound => "not_found_error",
            ErrorType::Conflict => "conflict_error",
            ErrorType::Gone => "gone_error",
            ErrorType::RateLimit => "rate_limit_error",
            ErrorType::Server => "server_error",
        }
    }
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident => ($code:literal, $status:literal, $ty:ident, $retryable:literal, $hint:expr), )*) => {
        /// Every `code` the server sends, with its status, type and retryability: the contract's table.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode { $( $(#[$doc])* $variant, )* }

        impl ErrorCode {
            /// All codes, in table order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The wire form, e.g. `"rate_limit_exceeded"`.
            pub const fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code,)* }
            }

            /// The HTTP status this code is sent with.
            pub const fn status(self) -> u16 {
                match self { $(ErrorCode::$variant => $status,)* }
            }

            /// The broad class of the code.
            pub const fn error_type(self) -> ErrorType {
                match self { $(ErrorCode::$variant => ErrorType::$ty,)* }
            }

            /// Whether the same request may succeed if sent again unchanged.
            pub const fn is_retryable(self) -> bool {
                match self { $(ErrorCode::$variant => $retryable,)* }
            }

            /// What a caller should do about it (the seed's "How to Fix" column), for people.
            pub const fn hint(self) -> &'static str {
                match self { $(ErrorCode::$variant => $hint,)* }
            }

            /// Parses the wire form; `None` for a code this version does not know.
            pub fn from_code(code: &str) -> Option<ErrorCode> {
                match code { $($code => Some(ErrorCode::$variant),)* _ => None }
            }
        }
    };
}

// The "How to Fix" texts several codes share, as the seed words them by status.
const BODY: &str = "Check the request body format and required fields.";
const AUTH: &str =
    "Check that your API key (or admin token) is valid and included in the Authorization header.";
const NOT_FOUND: &str = "Check the endpoint URL and any resource IDs.";
const CONFLICT: &str =
    "The resource's current state does not allow this; check it before trying again.";
const SLOW_DOWN: &str =
    "Slow down requests and implement backoff; wait for the Retry-After duration.";
const SERVER: &str =
    "Retry after a moment; contact the operator with the request id if the issue persists.";

// The table: code, status, type, retryable, how to fix.
error_codes! {
    /// The body is not JSON.
    InvalidJson => ("invalid_json", 400, InvalidRequest, false, BODY),
    /// A required field is absent.
    MissingField => ("missing_field", 400, InvalidRequest, false, BODY),
    /// A field, header or query parameter has a value outside what is accepted.
    InvalidValue => ("invalid_value", 400, InvalidRequest, false, BODY),
    /// The body names a field the route does not take (usually a typo).
    UnknownField => ("unknown_field", 400, InvalidRequest, false, BODY),
    /// The `Idempotency-Key` was used before with a different request.
    IdempotencyKeyReused => ("idempotency_key_reused", 400, InvalidRequest, false, "Use a new Idempotency-Key for a request that differs from the first one."),
    /// A Stripe webhook whose `Stripe-Signature` is missing, wrong or older than 5 minutes.
    InvalidSignature => ("invalid_signature", 400, InvalidRequest, false, "Sign the event with the endpoint's webhook secret and send it within 5 minutes."),
    /// No `Authorization: Bearer` header.
    MissingApiKey => ("missing_api_key", 401, Authentication, false, AUTH),
    /// The key (or admin token) is unknown or revoked.
    InvalidApiKey => ("invalid_api_key", 401, Authentication, false, AUTH),
    /// The balance does not cover the request's cost.
    InsufficientCredits => ("insufficient_credits", 402, Billing, false, "Add credits, then retry."),
    /// The key's spend limit for the period would be passed; nothing was created or charged.
    KeySpendLimitReached => ("key_spend_limit_reached", 402, Billing, false, "Wait for the key's spend period to reset, or ask the operator to raise its limit."),
    /// A dashboard form came without the token of the session that rendered it (extension).
    CsrfTokenInvalid => ("csrf_token_invalid", 403, InvalidRequest, false, "Check that the credential is allowed to do this."),
    /// No route at this path.
    UnknownEndpoint => ("unknown_endpoint", 404, NotFound, false, NOT_FOUND),
    /// No such resource for this account.
    ResourceNotFound => ("resource_not_found", 404, NotFound, false, NOT_FOUND),
    /// This server sells no credit packs (Stripe is not configured), or not this one (extension).
    BillingNotConfigured => ("billing_not_configured", 404, NotFound, false, "Ask the operator for credits; this server takes no payments."),
    /// No voucher has this code (extension).
    VoucherNotFound => ("voucher_not_found", 404, NotFound, false, NOT_FOUND),
    /// The route exists but not with this method.
    MethodNotAllowed => ("method_not_allowed", 405, InvalidRequest, false, "Use a method the route allows (see the Allow header)."),
    /// A request with the same `Idempotency-Key` is still running.
    IdempotencyKeyInUse => ("idempotency_key_in_use", 409, Conflict, true, "A request with the same Idempotency-Key is still running; retry once it has finished."),
    /// Only a queued task can be cancelled; this one is running or finished (extension).
    TaskNotCancelable => ("task_not_cancelable", 409, Conflict, false, CONFLICT),
    /// The voucher was redeemed already; each code works once (extension).
    VoucherAlreadyRedeemed => ("voucher_already_redeemed", 409, Conflict, false, CONFLICT),
    /// A grant or correction the balance cannot take: it would go below zero or above the
    /// largest balance. The request is well formed; the account's balance is what refuses it (extension).
    BalanceOutOfRange => ("balance_out_of_range", 409, Conflict, false, "Check the account's balance and send an amount it can take."),
    /// The resource is older than the retention.
    ResourceExpired => ("resource_expired", 410, Gone, false, "The resource has expired (older than the server's retention) and is permanently gone."),
    /// A signed image link past its expiry; ask for the task again for a fresh one.
    UrlExpired => ("url_expired", 410, Gone, false, "The link has expired; get the task again for a fresh link."),
    /// The voucher is past its expiry date (extension).
    VoucherExpired => ("voucher_expired", 410, Gone, false, "The resource is permanently gone."),
    /// The request body did not arrive within `--body-read-timeout`; nothing was done, and the
    /// connection is closed (extension).
    /// Not in the contract's retry rule ("retry only 429, 5xx and 409 in use"), so not
    /// retried by clients on their own; sending it again is safe.
    RequestTimeout => ("request_timeout", 408, InvalidRequest, false, "The request body arrived too slowly and nothing was done; send the request again."),
    /// The request body is above 1 MiB.
    BodyTooLarge => ("body_too_large", 413, InvalidRequest, false, "Send a request body under 1 MiB."),
    /// The body is sent as something other than JSON (`text/plain`, a form) (extension).
    UnsupportedMediaType => ("unsupported_media_type", 415, InvalidRequest, false, "Send the body as JSON, with `Content-Type: application/json`."),
    /// The provider refused to make the images (a content policy, say); the task was refunded.
    /// Only the OpenAI-compatible route, which waits for its task, answers with it (extension).
    GenerationRejected => ("generation_rejected", 400, InvalidRequest, false, "Change the prompt or the model; the credits were refunded."),
    /// Too many requests for the account's rate limit.
    RateLimitExceeded => ("rate_limit_exceeded", 429, RateLimit, true, SLOW_DOWN),
    /// Something broke on the server; the log has it under the request id.
    InternalError => ("internal_error", 500, Server, true, SERVER),
    /// The images could not be made (the provider failed or timed out); the task was refunded,
    /// so a retry is charged once. The OpenAI-compatible route only (extension).
    GenerationFailed => ("generation_failed", 502, Server, true, SERVER),
    /// Overload or shutdown.
    ServiceUnavailable => ("service_unavailable", 503, Server, true, SERVER),
    /// The OpenAI-compatible route stopped waiting for its task (`--sync-timeout`). Not
    /// retryable: the task goes on, and a retry would make and charge a second one; the message
    /// names the task to fetch instead.
    Timeout => ("timeout", 504, Server, false, "The task goes on: fetch it by the id in the message rather than retrying."),
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a response with this status and (optional) code may be retried unchanged.
///
/// The contract's rule: 429, every 5xx, and 409 `idempotency_key_in_use`; nothing else. The one
/// exception is the 504 `timeout` of the OpenAI-compatible route, whose task goes on: a retry
/// would make (and charge) a second one.
pub fn is_retryable(status: u16, code: Option<&str>) -> bool {
    match status {
        429 => true,
        504 if code == Some(ErrorCode::Timeout.as_str()) => false,
        500..=599 => true,
        409 => code == Some(ErrorCode::IdempotencyKeyInUse.as_str()),
        _ => false,
    }
}

impl ErrorBody {
    /// An envelope for `code` with a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                message: message.into(),
                error_type: code.error_type().as_str().to_owned(),
                code: code.as_str().to_owned(),
                param: None,
                request_id: None,
            },
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.error.param = Some(param.into());
        self
    }

    pub fn with_request_id(mut self, request_id: impl Into<String>) -> Self {
        self.error.request_id = Some(request_id.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_the_contract() {
        let rows: Vec<(u16, &str, &str, bool)> = ErrorCode::ALL
            .iter()
            .map(|c| {
                (
                    c.status(),
                    c.error_type().as_str(),
                    c.as_str(),
                    c.is_retryable(),
                )
            })
            .collect();
        assert!(rows.contains(&(429, "rate_limit_error", "rate_limit_exceeded", true)));
        assert!(rows.contains(&(402, "billing_error", "insufficient_credits", false)));
        assert!(rows.contains(&(410, "gone_error", "resource_expired", false)));
        assert!(rows.contains(&(409, "conflict_error", "idempotency_key_in_use", true)));
        assert!(rows.contains(&(503, "server_error", "service_unavailable", true)));
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(code.as_str()), Some(*code));
            assert_eq!(
                code.is_retryable(),
                is_retryable(code.status(), Some(code.as_str())),
                "{code}"
            );
        }
    }

    #[test]
    fn envelope_has_exactly_the_contract_shape() {
        let body = ErrorBody::new(
            ErrorCode::RateLimitExceeded,
            "Rate limit exceeded. Please slow down.",
        );
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {"message": "Rate limit exceeded. Please slow down.",
                "type": "rate_limit_error", "code": "rate_limit_exceeded"}})
        );
    }

    #[test]
    fn only_429_5xx_and_409_in_use_are_retryable() {
        for s in [400, 401, 402, 404, 405, 408, 410, 413] {
            assert!(!is_retryable(s, None), "{s}");
        }
        assert!(!is_retryable(409, Some("something_else")));
        assert!(is_retryable(409, Some("idempotency_key_in_use")));
        for s in [429, 500, 502, 503, 504] {
            assert!(is_retryable(s, None), "{s}");
        }
        assert!(!is_retryable(504, Some("timeout")));
    }
}
