//! Storage behind one trait.
//!
//! [`Store`] is everything the domain asks of a database. [`sql::SqlStore`] implements it once,
//! in the SQL both engines share, over an [`engine::Engine`]: [`sqlite::SqliteStore`] (the
//! embedded default) or [`postgres::PostgresStore`]. Handlers and domain code never see SQL.
//!
//! Stores never read the clock: every time they write comes from the caller (the domain's
//! `Clock`), so expiry and retention are tested without sleeping.
//!
//! **Invariants every implementation keeps** (the storage test suite checks them):
//! - `create_task` charges and inserts in one transaction, with a guarded decrement
//!   (`credits >= cost`): the balance never goes negative and no accepted task is uncharged.
//! - Every balance change writes a ledger entry in the same transaction; a task is charged at
//!   most once and refunded at most once (unique indexes, not just code).
//! - `finish_task`/`cancel_task` move a task only from the state they expect, so a refund can
//!   never race a completion.
//! - The idempotency record of a task-creating request is written in the task's transaction.
//! - A task with a webhook gets its delivery row (the outbox) in the transaction that records its
//!   final state (`finish_task`, `cancel_task`), so no finished task misses its webhook; a
//!   delivery attempt is recorded only under the claim that made it.

pub mod changes;
pub mod engine;
mod group_commit;
mod migrations;
pub mod money;
pub mod postgres;
pub mod rows;
pub mod sql;
pub mod sqlite;

use crate::error::Result;
use async_trait::async_trait;
use time::OffsetDateTime;
use tollgate_contract::{ImageSize, LowBalance, RateLimit, SpendLimit, TaskStatus, WebhookState};

/// An account row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRecord {
    pub id: String,
    pub name: String,
    pub credits: u64,
    /// `None`: the server's default applies.
    pub rate_limit: Option<RateLimit>,
    pub created_at: OffsetDateTime,
    /// The credits of `credits` that expire (what is left, when), soonest first. Filled by
    /// `get_account` and `list_accounts`; empty where another statement returned the row.
    pub expiring: Vec<(u64, OffsetDateTime)>,
    pub low_balance: Option<LowBalance>,
}

/// A new account with its opening balance.
#[derive(Clone)]
pub struct NewAccount {
    pub id: String,
    pub name: String,
    pub credits: u64,
    pub rate_limit: Option<RateLimit>,
    pub created_at: OffsetDateTime,
    /// The key that signs the account's webhooks (`whsec_…`); `None` leaves it to be made on
    /// first use.
    pub webhook_secret: Option<String>,
}

// The webhook secret signs the account's webhooks: a Debug that printed it would leak it to logs.
impl std::fmt::Debug for NewAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewAccount")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("credits", &self.credits)
            .field("rate_limit", &self.rate_limit)
            .field("created_at", &self.created_at)
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "whsec_…(redacted)"),
            )
            .finish()
    }
}

/// An API key as stored: its hash, never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub account_id: String,
    pub key_hash: String,
    pub prefix: String,
    pub created_at: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
    pub spend_limit: Option<SpendLimit>,
}

/// What a valid key authenticates: its account, the account's limit and the key's spend limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyAuth {
    pub key_id: String,
    pub account_id: String,
    pub rate_limit: Option<RateLimit>,
    pub spend_limit: Option<SpendLimit>,
}

/// The spend limit a charge counts against: the key's limit and the period it falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpendCap {
    pub limit: SpendLimit,
    pub period_start: OffsetDateTime,
    /// When the period ends (`None` for `total`), for the refusal's message.
    pub resets_at: Option<OffsetDateTime>,
}

/// A task row; after the purge it is a tombstone (`purged`, prompt emptied).
///
/// `Default` is a queued task that never ran, for `..Default::default()` in constructions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    pub id: String,
    pub account_id: String,
    pub status: TaskStatus,
    pub prompt: String,
    pub n: u8,
    pub size: ImageSize,
    pub seed: i64,
    pub cost: u64,
    pub created_at: OffsetDateTime,
    pub started_at: Option<OffsetDateTime>,
    pub completed_at: Option<OffsetDateTime>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub purged: bool,
    /// How many times a worker claimed the task (0 while it waits for its first run).
    pub runs: u32,
    /// Where the task's outcome is POSTed once it is final.
    pub webhook_url: Option<String>,
    /// The catalogue's id of the model the task was sold as; its workers run it.
    pub model: String,
    /// The key the task was created with.
    pub key_id: Option<String>,
    /// At creation only: the key's spend limit the charge counts against.
    pub spend: Option<SpendCap>,
}

impl Default for TaskRecord {
    fn default() -> Self {
        TaskRecord {
            id: String::new(),
            account_id: String::new(),
            status: TaskStatus::Queued,
            prompt: String::new(),
            n: 1,
            size: ImageSize::default(),
            seed: 0,
            cost: 0,
            created_at: OffsetDateTime::UNIX_EPOCH,
            started_at: None,
            completed_at: None,
            error_code: None,
            error_message: None,
            purged: false,
            runs: 0,
            webhook_url: None,
            model: crate::domain::catalogue::DEFAULT_MODEL.to_owned(),
            key_id: None,
            spend: None,
        }
    }
}

/// How a running task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskOutcome {
    Succeeded,
    /// Failed: the task is refunded in the same transaction.
    Failed {
        code: String,
        message: String,
    },
}

/// What `finish_task` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishOutcome {
    /// Recorded.
    Finished,
    /// The claim was lost (the lease ran out and another worker took the task): nothing changed.
    Lost,
    /// The task was purged meanwhile: nothing changed, and its images must go.
    Purged,
}

/// What `cancel_task` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Was queued; now canceled and refunded.
    Canceled(TaskRecord),
    /// Already canceled: nothing to do.
    AlreadyCanceled(TaskRecord),
    /// Running or finished: left alone.
    NotCancelable(TaskRecord),
    /// No task with that id for that account.
    NotFound,
}

/// A task's webhook delivery as stored: the outbox row written with the task's final state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookDeliveryRecord {
    pub task_id: String,
    pub account_id: String,
    pub url: String,
    pub state: WebhookState,
    /// Attempts made so far.
    pub attempts: u32,
    /// While pending: when the next attempt is due (or, while claimed, when the claim lapses).
    pub next_attempt_at: Option<OffsetDateTime>,
    pub delivered_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
    /// The attempts, oldest first (filled by `webhook_deliveries`; empty from a claim).
    pub history: Vec<WebhookAttemptRecord>,
}

/// One attempt to deliver a webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookAttemptRecord {
    /// 1 for the first attempt.
    pub number: u32,
    pub at: OffsetDateTime,
    /// The receiver's HTTP status.
    pub status: Option<u16>,
    /// Why no status came back.
    pub error: Option<String>,
}

/// What follows a delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryNext {
    /// Answered with a 2xx: done.
    Delivered,
    /// Failed; try again at this instant.
    RetryAt(OffsetDateTime),
    /// Failed for the last time: no more attempts.
    GiveUp,
}

/// A paid Checkout Session, as Stripe's event tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaidSession {
    pub session_id: String,
    pub account_id: String,
    /// The credits to add when no checkout of this server's made the session (its own record
    /// of the pack wins otherwise).
    pub credits: u64,
    pub amount: u64,
    pub currency: String,
    pub payment_intent: Option<String>,
}

/// What crediting a paid session did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurchaseOutcome {
    /// Credited now: the account with its new balance.
    Credited(AccountRecord),
    /// Credited before (a repeated or concurrent delivery): nothing changed.
    AlreadyCredited,
    /// No such account: nothing changed.
    NoAccount,
}

/// What a refund took back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundOutcome {
    pub session_id: String,
    pub account_id: String,
    /// Credits taken back now.
    pub taken: u64,
    /// Credits the balance no longer had.
    pub shortfall: u64,
}

/// A purchase row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurchaseRecord {
    pub session_id: String,
    pub account_id: String,
    pub credits: u64,
    pub amount: u64,
    pub currency: String,
    /// `open` or `paid`.
    pub state: String,
    pub payment_intent: Option<String>,
    pub refunded_amount: u64,
    pub refunded_credits: u64,
    pub shortfall: u64,
    pub created_at: OffsetDateTime,
    pub paid_at: Option<OffsetDateTime>,
}

/// An account event waiting in the outbox, claimed for an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountEventRecord {
    pub id: String,
    pub account_id: String,
    pub event_type: String,
    pub url: String,
    pub body: String,
    pub state: WebhookState,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub created_at: OffsetDateTime,
}

/// One change of balance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub id: i64,
    pub account_id: String,
    pub delta: i64,
    pub balance_after: u64,
    /// `grant`, `charge`, `refund` or `adjust`.
    pub kind: String,
    pub task_id: Option<String>,
    pub note: Option<String>,
    pub purchase_id: Option<String>,
    pub created_at: OffsetDateTime,
}

/// A credit voucher as stored: the hash of its code, never the code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoucherRecord {
    pub id: String,
    pub code_hash: String,
    /// The first characters of the code, to recognise it in a list.
    pub prefix: String,
    pub credits: u64,
    pub note: Option<String>,
    pub created_at: OffsetDateTime,
    /// `None`: never expires.
    pub expires_at: Option<OffsetDateTime>,
    pub redeemed_at: Option<OffsetDateTime>,
    /// The account that redeemed it.
    pub redeemed_by: Option<String>,
}

/// What `redeem_voucher` did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // made once per redemption and consumed at once: a box buys nothing
pub enum RedeemOutcome {
    /// Marked redeemed and credited: the account with its new balance, the voucher as it is now.
    Redeemed {
        account: AccountRecord,
        voucher: VoucherRecord,
    },
    /// No voucher has this code hash.
    Unknown,
    /// Redeemed before; nothing changed.
    AlreadyRedeemed,
    /// Past its expiry; nothing changed.
    Expired,
    /// No such account; nothing changed.
    NoAccount,
}

/// Who a dashboard session belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionPrincipal {
    /// An account holder, signed in with one of the account's API keys.
    Account { account_id: String, key_id: String },
    /// The operator, signed in with the operator token whose hash this is.
    Operator { admin_token_hash: String },
}

/// A dashboard session as stored: the hash of its cookie's token, never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub token_hash: String,
    pub principal: SessionPrincipal,
    pub created_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
}

/// Credits spent on one UTC day: charges minus refunds of entries made that day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DailySpend {
    pub day: time::Date,
    pub credits: i64,
}

/// Names one idempotent request: whose (`scope`), which key, and what it asked (`fingerprint`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyScope {
    pub scope: String,
    pub key: String,
    pub fingerprint: String,
}

/// A response kept for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// What `idempotency_begin` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// First use (or a stale or abandoned reservation taken over): run the request. `at` is
    /// the reservation's time, which names it when it has to be given up.
    Started { at: OffsetDateTime },
    /// Done before with the same request: send this again.
    Replay(StoredResponse),
    /// Done or running with a different request.
    Mismatch,
    /// The first request is still running.
    InUse,
}

/// Everything the domain asks of a database.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Whether other processes may write to this store (several instances on one database).
    /// Caches of its answers are exact only when it is not.
    fn is_shared(&self) -> bool {
        false
    }

    /// Follows the changes committed to a shared store (see `changes.rs`), telling `sink`, until
    /// `stop`. A store of this process alone has nothing to follow and returns at once.
    async fn follow_changes(
        &self,
        _sink: std::sync::Arc<dyn changes::ChangeSink>,
        _stop: tokio::sync::watch::Receiver<bool>,
    ) {
    }

    /// Commits a small write (one settings row), as `/readyz` asks: `Ok` only when the store
    /// can commit now.
    async fn probe_write(&self, now: OffsetDateTime) -> Result<()>;

    // --- operator token ---
    async fn admin_token_hash(&self) -> Result<Option<String>>;
    async fn set_admin_token_hash(&self, hash: &str) -> Result<()>;
    /// The key image links are signed with: `candidate` when none was kept yet, else the one
    /// kept first (so every instance sharing the store signs and checks with the same key).
    async fn image_link_key(&self, candidate: &str) -> Result<String>;

    // --- accounts and keys ---
    /// Creates the account, its first key and (when credits > 0) a `grant` ledger entry.
    async fn create_account(&self, account: &NewAccount, key: &KeyRecord) -> Result<AccountRecord>;
    async fn get_account(&self, id: &str) -> Result<Option<AccountRecord>>;
    async fn list_accounts(&self) -> Result<Vec<AccountRecord>>;
    /// `None` when there is no such account.
    async fn update_account(
        &self,
        id: &str,
        name: Option<&str>,
        rate_limit: Option<RateLimit>,
        low_balance: Option<Option<&LowBalance>>,
    ) -> Result<Option<AccountRecord>>;
    /// Adds `amount` (may be negative, never below zero) with a ledger entry.
    /// `Ok(None)`: no such account; `Err(InvalidRequest)`: the balance would go negative.
    /// A grant with `expires_at` is a lot that lapses then.
    async fn add_credits(
        &self,
        id: &str,
        amount: i64,
        note: Option<&str>,
        expires_at: Option<OffsetDateTime>,
        now: OffsetDateTime,
    ) -> Result<Option<AccountRecord>>;
    /// `false` when the account does not exist.
    async fn create_key(&self, key: &KeyRecord) -> Result<bool>;
    /// `false` when there is no such live key.
    async fn revoke_key(&self, key_id: &str, now: OffsetDateTime) -> Result<bool>;
    async fn list_keys(&self, account_id: &str) -> Result<Vec<KeyRecord>>;
    /// The account of a live key, by the key's hash.
    async fn authenticate(&self, key_hash: &str) -> Result<Option<KeyAuth>>;

    // --- tasks ---
    /// Charges `task.cost` and inserts the task (and, if given, completes the idempotency record
    /// with `response`), all in one transaction. `Err(InsufficientCredits)` changes nothing.
    async fn create_task(
        &self,
        task: &TaskRecord,
        idempotency: Option<(&IdempotencyScope, &StoredResponse)>,
    ) -> Result<TaskRecord>;
    async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>>;
    /// The account's live tasks (created after `not_before`, not purged), newest first, strictly
    /// older than `after` (an id of the account). `Ok(None)`: `after` is not a task of this account.
    async fn list_tasks(
        &self,
        account_id: &str,
        limit: u32,
        after: Option<&str>,
        not_before: OffsetDateTime,
    ) -> Result<Option<Vec<TaskRecord>>>;
    /// Cancels a queued or running task and refunds its whole cost, in one transaction.
    async fn cancel_task(
        &self,
        account_id: &str,
        id: &str,
        now: OffsetDateTime,
    ) -> Result<CancelOutcome>;
    /// Takes the oldest queued task of `model` (or, failing that, a running one whose lease ran
    /// out) and marks it running under `claim` until `lease_until`. Never hands one task to two
    /// claimers.
    async fn claim_next_task(
        &self,
        model: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        claim: &str,
    ) -> Result<Option<TaskRecord>>;
    /// Extends the lease of a task still held under `claim`; `false` when it is not (any more).
    async fn renew_lease(&self, id: &str, claim: &str, lease_until: OffsetDateTime)
        -> Result<bool>;
    /// Ends a task held under `claim`; a failure is refunded in the same transaction.
    async fn finish_task(
        &self,
        id: &str,
        claim: &str,
        outcome: &TaskOutcome,
        now: OffsetDateTime,
    ) -> Result<FinishOutcome>;
    /// Puts a task held under `claim` back in the queue without counting the run (its images
    /// could not be stored: a fault of the disk, not of the task); `false` when the claim is
    /// no longer the task's.
    async fn release_task(&self, id: &str, claim: &str) -> Result<bool>;
    /// After a crash of the only instance: puts tasks left `running` back in the queue (their
    /// charge stands) and drops the idempotency reservations of requests that died with it (a
    /// reservation still `running` committed nothing), so their retries run at once instead of
    /// answering 409 until the reservation is stale. Engines shared by several instances do
    /// nothing here: leases and staleness run out instead.
    async fn requeue_running(&self) -> Result<u64>;
    async fn queue_depth(&self) -> Result<u64>;
    /// Ids of tasks created before `cutoff` whose data is not purged yet, oldest first.
    async fn expired_tasks(&self, cutoff: OffsetDateTime, limit: u32) -> Result<Vec<String>>;
    /// Turns the tasks into tombstones (data dropped, id kept: the prompt, the webhook URL and
    /// its deliveries go). A task still queued is cancelled and refunded on the way: it expired
    /// before it could run.
    async fn mark_purged(&self, ids: &[String], now: OffsetDateTime) -> Result<()>;

    // --- webhooks ---
    /// The account's webhook secret, set to `candidate` first when it has none (accounts made
    /// before webhooks existed), atomically. `None`: no such account.
    async fn webhook_secret(&self, account_id: &str, candidate: &str) -> Result<Option<String>>;
    /// Replaces the account's webhook secret; `false` when there is no such account.
    async fn set_webhook_secret(&self, account_id: &str, secret: &str) -> Result<bool>;
    /// Takes up to `limit` pending deliveries due at `now`, oldest due first, and holds them under
    /// `claim` until `lease_until` (their `next_attempt_at` moves there, so the deliveries of a
    /// sender that died are due again after it). Never hands one delivery to two claimers at once.
    async fn claim_webhook_deliveries(
        &self,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        claim: &str,
        limit: u32,
    ) -> Result<Vec<WebhookDeliveryRecord>>;
    /// Records attempt `attempt.number` of a delivery held under `claim`, and what follows it, in
    /// one transaction. `false` (nothing written) when the claim is no longer the delivery's, or
    /// the attempt is not the next one.
    async fn record_webhook_attempt(
        &self,
        task_id: &str,
        claim: &str,
        attempt: &WebhookAttemptRecord,
        next: DeliveryNext,
    ) -> Result<bool>;
    /// The deliveries of these tasks, with their attempts (tasks without one are left out).
    async fn webhook_deliveries(&self, task_ids: &[String]) -> Result<Vec<WebhookDeliveryRecord>>;

    // --- ledger ---
    /// The account's ledger, newest first; with `before`, only the entries older than the
    /// entry of that id (the next page after it).
    async fn ledger(
        &self,
        account_id: &str,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<LedgerEntry>>;

    // --- idempotency ---
    /// Looks the key up and, on first use, reserves it. A reservation older than `stale_before`
    /// is taken over (its request died without finishing), and so is one made at one of the
    /// `abandoned` times (this process knows its request ended without an answer to keep).
    async fn idempotency_begin(
        &self,
        scope: &IdempotencyScope,
        now: OffsetDateTime,
        stale_before: OffsetDateTime,
        abandoned: &[OffsetDateTime],
    ) -> Result<IdempotencyBegin>;
    async fn idempotency_complete(
        &self,
        scope: &IdempotencyScope,
        response: &StoredResponse,
    ) -> Result<()>;
    /// Drops a reservation whose request failed, so a retry runs again.
    async fn idempotency_release(&self, scope: &IdempotencyScope) -> Result<()>;
    /// Forgets keys created before `cutoff`.
    async fn idempotency_purge(&self, cutoff: OffsetDateTime) -> Result<u64>;

    // --- vouchers ---
    async fn create_voucher(&self, voucher: &VoucherRecord) -> Result<()>;
    /// Marks the voucher redeemed by `account_id` and adds its credits with a `voucher` ledger
    /// entry, in one transaction. The mark is a guarded update (`redeemed_at IS NULL` and not
    /// expired at `now`), so of concurrent redemptions of one code exactly one succeeds.
    async fn redeem_voucher(
        &self,
        code_hash: &str,
        account_id: &str,
        now: OffsetDateTime,
    ) -> Result<RedeemOutcome>;
    /// The most recent vouchers, newest first.
    async fn list_vouchers(&self, limit: u32) -> Result<Vec<VoucherRecord>>;

    // --- dashboard sessions ---
    async fn create_session(&self, session: &SessionRecord) -> Result<()>;
    /// The session with this token hash, if it has not expired at `now` and (for an account
    /// session) the API key it was opened with is still live: revoking the key ends the session.
    async fn get_session(
        &self,
        token_hash: &str,
        now: OffsetDateTime,
    ) -> Result<Option<SessionRecord>>;
    async fn delete_session(&self, token_hash: &str) -> Result<()>;
    /// Forgets sessions that expired before `now`.
    async fn delete_expired_sessions(&self, now: OffsetDateTime) -> Result<u64>;

    // --- usage ---
    /// The account's spend per UTC day from `since` on (charges minus refunds), oldest first;
    /// days without charges or refunds are left out.
    async fn daily_spend(&self, account_id: &str, since: OffsetDateTime)
        -> Result<Vec<DailySpend>>;
    /// Credits spent from `since` on (charges minus refunds) per account id; accounts that
    /// spent nothing may be left out.
    async fn spend_by_account(&self, since: OffsetDateTime) -> Result<Vec<(String, i64)>>;

    // --- money ---
    /// What the key spent in the period that starts at `period_start`.
    async fn key_spent(&self, key_id: &str, period_start: OffsetDateTime) -> Result<u64>;
    /// Expires the account's lots that are due by `now`; the credits expired.
    async fn expire_account_credits(&self, account_id: &str, now: OffsetDateTime) -> Result<u64>;
    /// Expires the due lots of up to `limit` accounts; how many accounts had some.
    async fn expire_credits(&self, now: OffsetDateTime, limit: u32) -> Result<u64>;
    /// Records a Checkout Session made for an account (not paid yet).
    async fn open_purchase(&self, purchase: &PurchaseRecord) -> Result<()>;
    /// Credits a paid session, exactly once however often it is reported.
    async fn complete_purchase(
        &self,
        paid: &PaidSession,
        now: OffsetDateTime,
    ) -> Result<PurchaseOutcome>;
    /// Takes back the credits of a refund of the payment (`refunded` of `amount`, cumulative,
    /// in the minor unit), as far as the balance allows. `None`: no paid purchase has this
    /// payment, or this much was refunded already.
    async fn refund_purchase(
        &self,
        payment_intent: &str,
        refunded: u64,
        amount: u64,
        now: OffsetDateTime,
    ) -> Result<Option<RefundOutcome>>;
    /// The purchases of an account (or of all), newest first.
    async fn list_purchases(
        &self,
        account_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<PurchaseRecord>>;
    /// Claims due account events, as `claim_webhook_deliveries` claims deliveries.
    async fn claim_account_events(
        &self,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        claim: &str,
        limit: u32,
    ) -> Result<Vec<AccountEventRecord>>;
    /// Records attempt `number` of a claimed event; false when the claim lapsed.
    async fn record_account_event_attempt(
        &self,
        id: &str,
        claim: &str,
        number: u32,
        error: Option<&str>,
        next: DeliveryNext,
        at: OffsetDateTime,
    ) -> Result<bool>;
    /// The account's events, newest first.
    async fn account_events(&self, account_id: &str, limit: u32)
        -> Result<Vec<AccountEventRecord>>;
}

/// Unix milliseconds, the storage form of time.
pub(crate) fn to_millis(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

pub(crate) fn from_millis(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}
