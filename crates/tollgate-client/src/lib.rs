//! tollgate's Rust SDK: typed async calls for every route, and the contract's retry strategy
//! applied exactly.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tollgate_client::Error> {
//! use tollgate_client::{Client, CreateGenerationRequest};
//!
//! let client = Client::builder("http://127.0.0.1:8080").api_key("tg_…").build()?;
//! let task = client.create_generation(&CreateGenerationRequest::new("a lighthouse at dusk")).await?;
//! let done = client.wait_for_task(&task.id, std::time::Duration::from_millis(500), |_| {}).await?;
//! let png = client.get_image(&done.id, 0).await?;
//! # let _ = png; Ok(()) }
//! ```
//!
//! What a call does on failure (`CONTRACT.md`, "The client's retry strategy"):
//!
//! - retries 429, 5xx, 409 `idempotency_key_in_use` and transport failures; never 400, 401, 402,
//!   404, 405, 410, 413 — the decision reads the envelope's `code` and `type` as well as the status,
//!   through override tables of [`RetryPolicy`];
//! - waits `min(1000·2^k, 30000)` ms plus a uniform jitter in `[0, 1000)` ms, or the response's
//!   `Retry-After` (seconds or HTTP-date) as a floor plus jitter; a `Retry-After` above 60 s returns
//!   the error at once with [`Error::retry_at`];
//! - at most 5 retries; every POST carries an `Idempotency-Key`, the same on every retry;
//! - retries draw on a [`RetryBudget`] shared by the client, so an outage does not multiply load;
//! - one 429 with `Retry-After` pauses the client's other requests to that host ([`HostPause`]);
//! - an overall deadline per call ([`ClientBuilder::deadline`], [`Client::with_deadline`]): a wait
//!   that would not fit fails at once; dropping the future cancels the call;
//! - the final [`Error`] keeps the envelope, the number of attempts and their history.
//!
//! Module map: [`client`] (API-key routes and the HTTP plumbing), [`admin`] (operator routes),
//! [`error`], [`retry`] (the loop), [`budget`], [`pause`], [`secret`], [`webhook`] (checking a
//! delivery's signature). The policy itself —
//! classification and delays, no I/O — is [`tollgate_contract::retry`], re-exported here.
//!
//! **Invariant:** credentials live in [`Secret`]s and in sensitive header values only; no `Debug`,
//! `Display` or tracing event of this crate contains one.

pub mod admin;
pub mod budget;
pub mod client;
pub mod error;
pub mod pause;
pub mod retry;
pub mod webhook;

pub use admin::AdminClient;
pub use budget::{RetryBudget, RetryBudgetConfig};
pub use client::{
    Client, ClientBuilder, ListParams, DEFAULT_BASE_URL, ENV_ADMIN_TOKEN, ENV_API_KEY, ENV_BASE_URL,
};
pub use error::{
    ApiError, AttemptRecord, DecodeError, Delay, DelaySource, Error, ErrorKind, Result, StopReason,
    TransportError, TransportKind,
};
pub use pause::HostPause;
pub use retry::{CallInfo, RawResponse, Retrier, TransportFailure};
pub use tollgate_contract::retry::{Decision, GiveUp, Outcome, RetryPolicy};
pub use tollgate_contract::types::{
    Account, AddCreditsRequest, CreateAccountRequest, CreateGenerationRequest, CreatedAccount,
    CreatedKey, Health, ImageRef, ImageSize, KeyInfo, LedgerEntry, List, RateLimit, Task,
    TaskError, TaskStatus, TaskWebhook, UpdateAccountRequest, WebhookAttempt, WebhookSecret,
    WebhookState,
};
pub use tollgate_contract::Secret;
pub use tollgate_contract::{ErrorBody, ErrorCode, ErrorDetail};
