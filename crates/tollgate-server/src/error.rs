//! The server's one error type.
//!
//! Domain code, storage and the HTTP layer all return [`Error`]; `http::error` turns it into the
//! contract's envelope in exactly one place. Variants carry what the client needs to fix the
//! request (the cost and the balance of a 402, the wait of a 429) and nothing it must not see:
//! an [`Error::Internal`] keeps its cause for the log only.

use std::time::Duration;
use tollgate_contract::ErrorCode;

/// Anything that can stop a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or a value is out of range: 400 (or 413), `param` names the field.
    #[error("{message}")]
    InvalidRequest {
        code: ErrorCode,
        message: String,
        param: Option<String>,
    },
    /// No credential was sent (`admin`: the route wanted the operator's token).
    #[error("missing credential")]
    MissingCredential { admin: bool },
    /// The credential is unknown or revoked.
    #[error("invalid credential")]
    InvalidCredential { admin: bool },
    /// The balance does not cover the cost; nothing was created or charged.
    #[error("insufficient credits: cost {cost}, balance {balance}")]
    InsufficientCredits { cost: u64, balance: u64 },
    /// No such resource for the caller (another account's resource included).
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    /// The resource existed but is past the retention.
    #[error("{what} {id} expired")]
    Gone {
        what: &'static str,
        id: String,
        retention: Duration,
    },
    /// The account's rate limit is spent; `retry_after` is the exact wait until the next admission.
    #[error("rate limited for {retry_after:?}")]
    RateLimited { retry_after: Duration },
    /// The `Idempotency-Key` was used with another request.
    #[error("idempotency key reused with a different request")]
    IdempotencyKeyReused,
    /// The first request with this `Idempotency-Key` is still running.
    #[error("idempotency key in use")]
    IdempotencyKeyInUse,
    /// The task is running or finished and so cannot be cancelled.
    #[error("task {id} is {status} and cannot be cancelled")]
    NotCancelable {
        id: String,
        status: tollgate_contract::TaskStatus,
    },
    /// A dashboard form came without the CSRF token of the session that rendered it.
    #[error("CSRF token missing or wrong")]
    CsrfTokenInvalid,
    /// A voucher code that cannot be redeemed (unknown, used, or expired).
    #[error("voucher refused: {0:?}")]
    VoucherRefused(VoucherRefusal),
    /// Shutting down or overloaded.
    #[error("service unavailable: {reason}")]
    Unavailable {
        reason: &'static str,
        retry_after: Duration,
    },
    /// A bug or a broken dependency. The message goes to the log, never to the client.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a voucher code was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoucherRefusal {
    /// No voucher has this code.
    Unknown,
    /// Redeemed before (by this account or another): a code works once.
    AlreadyRedeemed,
    /// Past its expiry.
    Expired,
}

impl Error {
    /// A 400 with `param`.
    pub fn invalid(code: ErrorCode, param: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidRequest {
            code,
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// A 500 whose cause is logged, not shown.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        Error::Internal(cause.to_string())
    }

    /// The contract's code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidRequest { code, .. } => *code,
            Error::MissingCredential { .. } => ErrorCode::MissingApiKey,
            Error::InvalidCredential { .. } => ErrorCode::InvalidApiKey,
            Error::InsufficientCredits { .. } => ErrorCode::InsufficientCredits,
            Error::NotFound { .. } => ErrorCode::ResourceNotFound,
            Error::Gone { .. } => ErrorCode::ResourceExpired,
            Error::RateLimited { .. } => ErrorCode::RateLimitExceeded,
            Error::IdempotencyKeyReused => ErrorCode::IdempotencyKeyReused,
            Error::IdempotencyKeyInUse => ErrorCode::IdempotencyKeyInUse,
            Error::NotCancelable { .. } => ErrorCode::TaskNotCancelable,
            Error::CsrfTokenInvalid => ErrorCode::CsrfTokenInvalid,
            Error::VoucherRefused(VoucherRefusal::Unknown) => ErrorCode::VoucherNotFound,
            Error::VoucherRefused(VoucherRefusal::AlreadyRedeemed) => {
                ErrorCode::VoucherAlreadyRedeemed
            }
            Error::VoucherRefused(VoucherRefusal::Expired) => ErrorCode::VoucherExpired,
            Error::Unavailable { .. } => ErrorCode::ServiceUnavailable,
            Error::Internal(_) => ErrorCode::InternalError,
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match e {
            // A pool that cannot hand out a connection in time is overload, not a bug.
            sqlx::Error::PoolTimedOut => Error::Unavailable {
                reason: "database busy",
                retry_after: Duration::from_secs(1),
            },
            other => Error::Internal(format!("database: {other}")),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Error::Internal(format!("migration: {e}"))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Internal(format!("i/o: {e}"))
    }
}
