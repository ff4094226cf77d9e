//! Header names of the contract, in the lower-case form HTTP/2 and `http::HeaderName` use.

/// Every response carries it; a sane incoming value is echoed, otherwise the server makes one.
pub const REQUEST_ID: &str = "x-request-id";
/// On a POST: the client's key for safe retries (1–255 printable ASCII).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// `true` on a response replayed from the idempotency store.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
/// With `--simulate-errors`: `429`, `500`, `503` (and the extension `panic`) ask for a failure.
pub const SIMULATE: &str = "tollgate-simulate";
/// With `--simulate-errors` (extension): milliseconds to hold the request inside its handler.
pub const SIMULATE_DELAY_MS: &str = "tollgate-simulate-delay-ms";
/// IETF draft-ietf-httpapi-ratelimit-headers: the quota policy.
pub const RATELIMIT_POLICY: &str = "ratelimit-policy";
/// IETF draft-ietf-httpapi-ratelimit-headers: what is left of the quota now.
pub const RATELIMIT: &str = "ratelimit";
/// Seconds (or an HTTP-date) before a retry may succeed.
pub const RETRY_AFTER: &str = "retry-after";
/// The same wait as `Retry-After`, in milliseconds (rounded up): exact where seconds round.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";
/// `true` or `false`: whether the server says the request may be retried (OpenAI's SDKs obey it).
pub const SHOULD_RETRY: &str = "x-should-retry";
/// On a webhook delivery: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` (see [`crate::webhook`]).
pub const WEBHOOK_SIGNATURE: &str = "tollgate-signature";
/// On a webhook delivery: the id of the task it reports, the same on every attempt (for deduplication).
pub const WEBHOOK_ID: &str = "tollgate-webhook-id";
/// On a webhook delivery: which attempt this is, from 1.
pub const WEBHOOK_ATTEMPT: &str = "tollgate-webhook-attempt";
