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
    InsufficientCredits {
        cost: u64,
        balance: u64,
        /// What was priced, for the message: `2 × 1024x1024 with `flux` at 3 credits each`.
        priced: Option<String>,
    },
    /// The key's spend limit for its period would be passed; nothing was created or charged.
    #[error("key spend limit reached: {spent} of {} credits", limit.credits)]
    KeySpendLimitReached {
        limit: tollgate_contract::SpendLimit,
        spent: u64,
        /// When the period ends; `None` for a `total` limit.
        resets_at: Option<time::OffsetDateTime>,
    },
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
    /// A signed image link past its expiry (an authentic one: a forged link is `NotFound`).
    #[error("image link expired")]
    LinkExpired,
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
    /// The server is shutting down: new requests are refused while those in flight finish.
    #[error("shutting down")]
    ShuttingDown { retry_after: Duration },
    /// Overloaded, or a part it needs (Redis) cannot be reached.
    #[error("service unavailable: {reason}")]
    Unavailable {
        reason: &'static str,
        retry_after: Duration,
    },
    /// The store (database or disk) cannot carry the request out now, and will again: a disk
    /// full, a connection lost, a lock held too long. The request's transaction did not commit
    /// (where a lost answer to a COMMIT leaves that open, the store checks for the row it made:
    /// tasks and top-ups). 503 with `Retry-After`; the cause goes to the log, never the client.
    #[error("store unavailable ({fault:?}): {cause}")]
    StoreUnavailable { fault: StoreFault, cause: String },
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
            Error::KeySpendLimitReached { .. } => ErrorCode::KeySpendLimitReached,
            Error::NotFound { .. } => ErrorCode::ResourceNotFound,
            Error::Gone { .. } => ErrorCode::ResourceExpired,
            Error::LinkExpired => ErrorCode::UrlExpired,
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
            Error::ShuttingDown { .. }
            | Error::Unavailable { .. }
            | Error::StoreUnavailable { .. } => ErrorCode::ServiceUnavailable,
            Error::Internal(_) => ErrorCode::InternalError,
        }
    }
}

impl From<sqlx::Error> for Error {
    /// A transient condition of the database is [`Error::StoreUnavailable`] (503); anything
    /// else (a constraint the code should have kept, a type mismatch) is a bug: 500.
    fn from(e: sqlx::Error) -> Self {
        match StoreFault::of(&e) {
            Some(fault) => Error::store_unavailable(fault, format!("database: {e}")),
            None => Error::Internal(format!("database: {e}")),
        }
    }
}

/// Which transient fault of the store stopped a request: the label of
/// `tollgate_store_faults_total` and what the 503's message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFault {
    /// The disk under the database or the images is full (`SQLITE_FULL`, PostgreSQL `53100`).
    DiskFull,
    /// Free space under the data directory is below `--min-free-disk`: refused before the wall.
    LowDisk,
    /// An I/O error from the disk (`SQLITE_IOERR`, `SQLITE_CANTOPEN`, a read-only file system).
    Io,
    /// A lock held past its timeout (`SQLITE_BUSY`/`SQLITE_LOCKED`), a lock or statement
    /// timeout on PostgreSQL.
    Busy,
    /// The connection broke, or the server ended it (`57P01` when a backend is terminated).
    ConnectionLost,
    /// No connection of the pool came free in time.
    PoolTimedOut,
    /// PostgreSQL gave up a transaction to keep others serialisable (`40001`, `40P01`).
    Serialization,
    /// The database is out of another resource (memory, connections: SQLSTATE class 53).
    Resources,
    /// The S3-compatible image store did not answer in time, or answered with an error.
    ObjectStore,
}

impl StoreFault {
    pub const ALL: [StoreFault; 9] = [
        StoreFault::DiskFull,
        StoreFault::LowDisk,
        StoreFault::Io,
        StoreFault::Busy,
        StoreFault::ConnectionLost,
        StoreFault::PoolTimedOut,
        StoreFault::Serialization,
        StoreFault::Resources,
        StoreFault::ObjectStore,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StoreFault::DiskFull => "disk_full",
            StoreFault::LowDisk => "low_disk",
            StoreFault::Io => "io",
            StoreFault::Busy => "busy",
            StoreFault::ConnectionLost => "connection_lost",
            StoreFault::PoolTimedOut => "pool_timed_out",
            StoreFault::Serialization => "serialization",
            StoreFault::Resources => "resources",
            StoreFault::ObjectStore => "object_store",
        }
    }

    /// How long a client should wait: a full disk needs someone to act, the rest passes.
    pub fn retry_after(self) -> Duration {
        match self {
            StoreFault::DiskFull | StoreFault::LowDisk => Duration::from_secs(5),
            _ => Duration::from_secs(1),
        }
    }

    /// The transient fault `e` is, or `None` when it is not one (a bug, a constraint).
    pub fn of(e: &sqlx::Error) -> Option<StoreFault> {
        match e {
            sqlx::Error::PoolTimedOut => Some(StoreFault::PoolTimedOut),
            sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::BeginFailed => Some(StoreFault::ConnectionLost),
            sqlx::Error::Database(db) => match db.code() {
                Some(code) => match code.parse::<i64>() {
                    // SQLite reports its result code (extended codes keep the primary one in
                    // the low byte); PostgreSQL an SQLSTATE, which is not always a number.
                    Ok(sqlite) if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() => {
                        Self::of_sqlite(sqlite)
                    }
                    _ => Self::of_sqlstate(&code),
                },
                None => None,
            },
            _ => None,
        }
    }

    fn of_sqlite(code: i64) -> Option<StoreFault> {
        match code & 0xff {
            13 => Some(StoreFault::DiskFull),    // SQLITE_FULL
            10 | 14 | 8 => Some(StoreFault::Io), // SQLITE_IOERR, SQLITE_CANTOPEN, SQLITE_READONLY
            5 | 6 => Some(StoreFault::Busy),     // SQLITE_BUSY, SQLITE_LOCKED
            7 => Some(StoreFault::Resources),    // SQLITE_NOMEM
            _ => None,
        }
    }

    fn of_sqlstate(state: &str) -> Option<StoreFault> {
        match state {
            "53100" => Some(StoreFault::DiskFull),
            "58030" => Some(StoreFault::Io),
            "40001" | "40P01" => Some(StoreFault::Serialization),
            "55P03" | "57014" => Some(StoreFault::Busy),
            // Shut down, crashed, starting up, or a standby that takes no writes (a failover).
            "57P01" | "57P02" | "57P03" | "25006" => Some(StoreFault::ConnectionLost),
            s if s.starts_with("08") => Some(StoreFault::ConnectionLost),
            s if s.starts_with("53") => Some(StoreFault::Resources),
            _ => None,
        }
    }
}

impl Error {
    /// A 503 for a transient fault of the store, counted for `/metrics`.
    pub fn store_unavailable(fault: StoreFault, cause: impl Into<String>) -> Self {
        crate::metrics::count_store_fault(fault);
        Error::StoreUnavailable {
            fault,
            cause: cause.into(),
        }
    }

    /// The same error again, for each of several requests one failure stopped (a batch of the
    /// group commit): a store fault stays that fault, anything else is a 500 with its cause.
    pub fn for_each_request(&self) -> Error {
        match self {
            Error::StoreUnavailable { fault, cause } => Error::StoreUnavailable {
                fault: *fault,
                cause: cause.clone(),
            },
            other => Error::Internal(other.to_string()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Error::Internal(format!("migration: {e}"))
    }
}

impl From<std::io::Error> for Error {
    /// A disk that is full, read-only or failing is a store fault (503); other I/O errors
    /// (a path that should exist) are bugs.
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind;
        let fault = match e.kind() {
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded => Some(StoreFault::DiskFull),
            ErrorKind::ReadOnlyFilesystem => Some(StoreFault::Io),
            _ if e.raw_os_error() == Some(5) => Some(StoreFault::Io), // EIO
            _ => None,
        };
        match fault {
            Some(fault) => Error::store_unavailable(fault, format!("i/o: {e}")),
            None => Error::Internal(format!("i/o: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_store_conditions_are_faults_and_the_rest_are_bugs() {
        // SQLite result codes, extended ones included (the primary code is the low byte).
        for (code, fault) in [
            (13, Some(StoreFault::DiskFull)),
            (10, Some(StoreFault::Io)),
            (778, Some(StoreFault::Io)), // SQLITE_IOERR_WRITE
            (5, Some(StoreFault::Busy)),
            (517, Some(StoreFault::Busy)), // SQLITE_BUSY_SNAPSHOT
            (2067, None),                  // SQLITE_CONSTRAINT_UNIQUE: a bug, 500
            (1, None),
        ] {
            assert_eq!(StoreFault::of_sqlite(code), fault, "{code}");
        }
        for (state, fault) in [
            ("57P01", Some(StoreFault::ConnectionLost)),
            ("08006", Some(StoreFault::ConnectionLost)),
            ("40001", Some(StoreFault::Serialization)),
            ("53100", Some(StoreFault::DiskFull)),
            ("53300", Some(StoreFault::Resources)),
            ("23505", None), // unique violation
            ("42P01", None), // undefined table
        ] {
            assert_eq!(StoreFault::of_sqlstate(state), fault, "{state}");
        }
        assert_eq!(
            StoreFault::of(&sqlx::Error::PoolTimedOut),
            Some(StoreFault::PoolTimedOut)
        );
        assert_eq!(StoreFault::of(&sqlx::Error::RowNotFound), None);
        let io = std::io::Error::from(std::io::ErrorKind::StorageFull);
        assert!(matches!(
            Error::from(io),
            Error::StoreUnavailable {
                fault: StoreFault::DiskFull,
                ..
            }
        ));
    }
}
