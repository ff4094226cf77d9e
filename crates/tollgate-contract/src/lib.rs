//! tollgate's wire contract, shared by the server and the client.
//!
//! Everything a request or a response carries is defined here once: the error envelope and the
//! status/type/code table of `CONTRACT.md` ([`error`]), the header names ([`headers`]), `Retry-After`
//! in both of its forms ([`retry_after`]), the task and account bodies ([`types`]) and the client's
//! retry policy ([`retry`]), which is plain data and arithmetic so any HTTP stack can use it, and the
//! signature of webhook deliveries ([`webhook`]).
//!
//! **Invariant:** nothing in this crate does I/O. The server and the client agree because they
//! compile against the same definitions, not because they were written to match.

pub mod error;
pub mod headers;
pub mod retry;
pub mod retry_after;
pub mod secret;
pub mod types;
pub mod webhook;

pub use error::{ErrorBody, ErrorCode, ErrorDetail, ErrorType};
pub use secret::Secret;
pub use types::*;
