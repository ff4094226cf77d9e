//! Request and response bodies of the contract's routes.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use time::OffsetDateTime;

/// The sizes the generator renders. The wire form is `"256x256"` and so on.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ImageSize {
    #[serde(rename = "256x256")]
    S256,
    #[default]
    #[serde(rename = "512x512")]
    S512,
    #[serde(rename = "1024x1024")]
    S1024,
}

impl ImageSize {
    pub const ALL: [ImageSize; 3] = [ImageSize::S256, ImageSize::S512, ImageSize::S1024];

    pub const fn as_str(self) -> &'static str {
        match self {
            ImageSize::S256 => "256x256",
            ImageSize::S512 => "512x512",
            ImageSize::S1024 => "1024x1024",
        }
    }

    /// The edge length in pixels (images are square).
    pub const fn pixels(self) -> u32 {
        match self {
            ImageSize::S256 => 256,
            ImageSize::S512 => 512,
            ImageSize::S1024 => 1024,
        }
    }
}

impl fmt::Display for ImageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ImageSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageSize::ALL
            .into_iter()
            .find(|size| size.as_str() == s)
            .ok_or_else(|| format!("size must be one of 256x256, 512x512, 1024x1024, not {s:?}"))
    }
}

/// The largest balance an account may hold, and the largest grant or correction: 2^53 − 1, so
/// that every balance is exact as a JavaScript number (browsers, the TypeScript SDK).
pub const MAX_CREDITS: u64 = (1 << 53) - 1;

/// The JSON Schema `pattern` of a text: no NUL (`\u0000`), which PostgreSQL cannot store.
pub const TEXT_PATTERN: &str = "^[^\\u0000]*$";

/// The JSON Schema `pattern` of a text that must not be blank: no NUL, and at least one
/// character that is not whitespace, whitespace being exactly what Rust's `str::trim` removes
/// (Unicode `White_Space`), spelled out so that every regex engine (ECMA-262, Python's) agrees.
pub const NOT_BLANK_PATTERN: &str = "^[^\\u0000]*[^\\u0000\\t\\n\\u000b\\f\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000][^\\u0000]*$";

/// `POST /v1/images/generations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateGenerationRequest {
    /// 1–4000 characters.
    pub prompt: String,
    /// 1–4 images; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u8>,
    /// Default `512x512`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ImageSize>,
    /// Makes the image reproducible; the server picks one when absent and reports it on the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Extension: an `http://` or `https://` URL (at most 2048 characters, a public address)
    /// that receives the task, signed, once it has succeeded, failed or been cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// The model (`GET /v1/models`); default: the catalogue's default model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl CreateGenerationRequest {
    pub fn new(prompt: impl Into<String>) -> Self {
        CreateGenerationRequest {
            prompt: prompt.into(),
            n: None,
            size: None,
            seed: None,
            webhook_url: None,
            model: None,
        }
    }
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl TaskStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Canceled => "canceled",
        }
    }

    /// Whether the task will not change any more.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded | TaskStatus::Failed | TaskStatus::Canceled
        )
    }
}

impl FromStr for TaskStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "queued" => TaskStatus::Queued,
            "running" => TaskStatus::Running,
            "succeeded" => TaskStatus::Succeeded,
            "failed" => TaskStatus::Failed,
            "canceled" => TaskStatus::Canceled,
            other => return Err(format!("unknown task status {other:?}")),
        })
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One generated image of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageRef {
    /// Path of the PNG, relative to the server: `/v1/tasks/{id}/images/{index}`.
    pub url: String,
}

/// Why a task failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskError {
    pub code: String,
    pub message: String,
}

/// An image-generation task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Task {
    /// `task_…`
    pub id: String,
    /// Always `"task"`.
    pub object: String,
    pub status: TaskStatus,
    /// The model the task was sold as (`builtin` on a server without a catalogue).
    #[serde(default)]
    pub model: String,
    pub prompt: String,
    pub n: u8,
    pub size: ImageSize,
    pub seed: i64,
    /// Credits charged when the task was accepted.
    pub cost: u64,
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub completed_at: Option<OffsetDateTime>,
    /// After this instant every route that names the task answers 410.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub expires_at: OffsetDateTime,
    /// One entry per image once the task has succeeded; empty before.
    pub images: Vec<ImageRef>,
    pub error: Option<TaskError>,
    /// Extension, present only when the task was created with a `webhook_url`: where its
    /// outcome is sent, and every delivery attempt so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<TaskWebhook>,
}

/// A model clients can ask for, with its prices (`GET /v1/models`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Model {
    /// What `model` takes on a create.
    pub id: String,
    /// Always `"model"`.
    pub object: String,
    pub name: String,
    /// Credits per image, by size: the sizes the model accepts.
    #[cfg_attr(feature = "openapi", schema(value_type = std::collections::BTreeMap<String, u64>))]
    pub prices: std::collections::BTreeMap<ImageSize, u64>,
    /// The most images one task may ask for.
    pub max_n: u8,
}

/// Where a task's webhook stands (extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum WebhookState {
    /// Not delivered yet: the task is not finished, or a retry is scheduled.
    Pending,
    /// A delivery was answered with a 2xx.
    Delivered,
    /// Every attempt failed; no more are made.
    Failed,
}

/// The webhook of a task (extension): its URL and the delivery attempts so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskWebhook {
    pub url: String,
    pub state: WebhookState,
    /// When a delivery was answered with a 2xx.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub delivered_at: Option<OffsetDateTime>,
    /// When the next attempt is due, while one is scheduled.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub next_attempt_at: Option<OffsetDateTime>,
    /// Oldest first.
    pub attempts: Vec<WebhookAttempt>,
}

/// One delivery attempt of a webhook: the receiver's HTTP status, or why no status came back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WebhookAttempt {
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub at: OffsetDateTime,
    /// The receiver's status (2xx: delivered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why the attempt got no status (connection refused, timed out, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET|POST /v1/account/webhook-secret` (extension): the key that signs the account's webhooks.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WebhookSecret {
    /// Always `"webhook_secret"`.
    pub object: String,
    /// `whsec_…`: give it to `tollgate_client::webhook::verify` (or any HMAC-SHA256).
    pub secret: String,
}

// The secret signs deliveries: whoever has it can forge them. Keep it out of logs.
impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSecret")
            .field("object", &self.object)
            .field("secret", &"whsec_…(redacted)")
            .finish()
    }
}

/// A page of a list, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct List<T> {
    /// Always `"list"`.
    pub object: String,
    pub data: Vec<T>,
    /// Whether a next page exists: ask again with `after` set to the last item's id.
    pub has_more: bool,
}

/// A per-account rate limit: a sustained rate and a burst (GCRA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_minute: u32,
    pub burst: u32,
}

/// An account as its holder and the operator see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Account {
    /// `acct_…`
    pub id: String,
    pub name: String,
    pub credits: u64,
    /// The limit in force (the account's own, or the server's default).
    pub rate_limit: RateLimit,
    /// Credits of `credits` that expire, soonest first (charges use these first).
    #[serde(default)]
    pub expiring: Vec<ExpiringCredits>,
    /// The low-balance alert, when the operator set one (extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_balance: Option<LowBalance>,
}

/// Credits of the balance that lapse at `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExpiringCredits {
    pub credits: u64,
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub expires_at: OffsetDateTime,
}

/// A low-balance alert: when a charge takes the balance from at or above `threshold` to below
/// it, one signed `account.balance_low` event is POSTed to `notify_url`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LowBalance {
    /// At least 1.
    pub threshold: u64,
    /// `http(s)://…`, checked as task webhook URLs are.
    pub notify_url: String,
}

/// How often a key's spend limit starts again: calendar periods in UTC (weeks start on
/// Monday), or never (`total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum SpendPeriod {
    Day,
    Week,
    Month,
    Total,
}

impl SpendPeriod {
    pub const fn as_str(self) -> &'static str {
        match self {
            SpendPeriod::Day => "day",
            SpendPeriod::Week => "week",
            SpendPeriod::Month => "month",
            SpendPeriod::Total => "total",
        }
    }
}

impl FromStr for SpendPeriod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "day" => SpendPeriod::Day,
            "week" => SpendPeriod::Week,
            "month" => SpendPeriod::Month,
            "total" => SpendPeriod::Total,
            other => return Err(format!("unknown spend period {other:?}")),
        })
    }
}

/// The most a key may spend per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SpendLimit {
    /// At least 1.
    pub credits: u64,
    pub period: SpendPeriod,
}

/// `POST /admin/accounts/{id}/keys` (the body is optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_limit: Option<SpendLimit>,
}

/// `POST /v1/billing/checkout`: the credit pack to buy, by its credits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    pub pack: u64,
}

/// `201` answer of `POST /v1/billing/checkout`: where to send the buyer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CheckoutSession {
    /// Stripe's Checkout URL.
    pub url: String,
    /// Stripe's session id (`cs_…`).
    pub id: String,
}

/// A credit pack for sale (extension: `GET /v1/billing/packs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreditPack {
    pub credits: u64,
    /// In the currency's minor unit (cents).
    pub amount: u64,
    /// ISO 4217, lower case.
    pub currency: String,
}

/// A purchase through Stripe Checkout and what refunds did to it (extension: the operator's
/// `GET /admin/accounts/{id}/purchases`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Purchase {
    /// Stripe's Checkout Session id.
    pub id: String,
    pub account_id: String,
    pub credits: u64,
    pub amount: u64,
    pub currency: String,
    /// `open` (not paid yet) or `paid`.
    pub status: String,
    /// Money refunded so far, in the minor unit.
    pub refunded_amount: u64,
    /// Credits the refunds took back.
    pub refunded_credits: u64,
    /// Credits the refunds should have taken back but the balance no longer had.
    pub shortfall: u64,
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub paid_at: Option<OffsetDateTime>,
}

/// `POST /admin/accounts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateAccountRequest {
    /// 1–200 characters.
    pub name: String,
    /// Opening balance; default 0.
    #[serde(default)]
    pub credits: u64,
    /// Default: the server's default limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// `201` answer of `POST /admin/accounts`: the key is shown this once.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedAccount {
    pub account: Account,
    pub api_key: String,
}

/// `201` answer of `POST /admin/accounts/{id}/keys`: the key is shown this once.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedKey {
    /// `key_…`: what `DELETE /admin/keys/{key_id}` takes.
    pub id: String,
    pub api_key: String,
}

// Keys are secrets: a Debug that prints them would leak them into logs.
impl fmt::Debug for CreatedAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedAccount")
            .field("account", &self.account)
            .field("api_key", &"tg_…(redacted)")
            .finish()
    }
}

impl fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedKey")
            .field("id", &self.id)
            .field("api_key", &"tg_…(redacted)")
            .finish()
    }
}

/// `POST /admin/accounts/{id}/credits`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AddCreditsRequest {
    /// Credits to add; negative for a correction, which may not take the balance below zero.
    pub amount: i64,
    /// Kept on the ledger entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// When the granted credits lapse (a grant only); default: never.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub expires_at: Option<OffsetDateTime>,
}

/// `PATCH /admin/accounts/{id}` (extension): change the account's rate limit or name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UpdateAccountRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// The low-balance alert; `null` turns it off.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<LowBalance>))]
    pub low_balance: Option<Option<LowBalance>>,
}

/// A field that may be absent (outer `None`), `null` (`Some(None)`) or a value.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// One change of an account's balance (extension: `GET /v1/account/ledger`, `GET /admin/accounts/{id}/ledger`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LedgerEntry {
    pub id: i64,
    /// Always `"ledger_entry"`.
    pub object: String,
    /// Credits added (positive) or taken (negative).
    pub delta: i64,
    pub balance_after: u64,
    /// `grant`, `charge`, `refund`, `adjust`, `voucher`, `purchase`, `purchase_refund` or `expiry`.
    pub kind: String,
    pub task_id: Option<String>,
    pub note: Option<String>,
    /// The Checkout Session of a `purchase` or `purchase_refund` entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purchase_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub created_at: OffsetDateTime,
}

/// An API key as listed (extension: `GET /admin/accounts/{id}/keys`): never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyInfo {
    /// `key_…`
    pub id: String,
    /// The key's first characters, to recognise it.
    pub prefix: String,
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub revoked_at: Option<OffsetDateTime>,
    /// The key's spend limit, with what it spent in the current period and when that ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_limit: Option<KeySpend>,
}

/// A key's spend limit as it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeySpend {
    pub credits: u64,
    pub period: SpendPeriod,
    /// Spent in the current period.
    pub spent: u64,
    /// When the current period ends; `null` for `total`.
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub resets_at: Option<OffsetDateTime>,
}

/// `POST /admin/vouchers` (extension): a single-use code worth `credits`, for an account holder
/// to redeem (`POST /v1/vouchers/redeem`, or the dashboard's top-up page).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateVoucherRequest {
    /// Credits the code adds when redeemed: at least 1.
    pub credits: u64,
    /// After this instant the code is refused; default: it never expires.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub expires_at: Option<OffsetDateTime>,
    /// Kept with the voucher and on the ledger entry of its redemption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A voucher as listed (extension): never its code, which only its creator saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Voucher {
    /// `vch_…`
    pub id: String,
    /// Always `"voucher"`.
    pub object: String,
    /// The code's first characters, to recognise it.
    pub prefix: String,
    pub credits: u64,
    pub note: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub redeemed_at: Option<OffsetDateTime>,
    /// The account that redeemed it (`acct_…`).
    pub redeemed_by: Option<String>,
}

/// `201` answer of `POST /admin/vouchers`: the code is shown this once.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedVoucher {
    pub voucher: Voucher,
    /// `tgv_…`: what `POST /v1/vouchers/redeem` takes.
    pub code: String,
}

/// `POST /v1/vouchers/redeem` (extension).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RedeemVoucherRequest {
    /// The code, `tgv_…` (case and surrounding spaces do not matter).
    pub code: String,
}

// A voucher code is money until it is redeemed: keep it out of logs.
impl fmt::Debug for CreatedVoucher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedVoucher")
            .field("voucher", &self.voucher)
            .field("code", &"tgv_…(redacted)")
            .finish()
    }
}

impl fmt::Debug for RedeemVoucherRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedeemVoucherRequest")
            .field("code", &"tgv_…(redacted)")
            .finish()
    }
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    /// `ok`, or `draining` during shutdown.
    pub status: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_trip() {
        for size in ImageSize::ALL {
            let json = serde_json::to_string(&size).unwrap();
            assert_eq!(json, format!("\"{}\"", size.as_str()));
            assert_eq!(size.as_str().parse::<ImageSize>().unwrap(), size);
        }
        assert!("300x300".parse::<ImageSize>().is_err());
    }

    #[test]
    fn created_key_debug_hides_the_key() {
        let k = CreatedKey {
            id: "key_1".into(),
            api_key: "tg_secret".into(),
        };
        assert!(!format!("{k:?}").contains("secret"));
    }
}
