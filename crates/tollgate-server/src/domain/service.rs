//! [`Tollgate`]: the domain facade. Every route of the API is one method here.

use crate::config::Config;
use crate::disk::DiskSpace;
use crate::domain::backends::{self, Backend};
use crate::domain::caches::{Cached, FinishedTasks, KeyCache};
use crate::domain::idempotency::{KEY_RETENTION, STALE_RESERVATION};
use crate::domain::ratelimit::{Admission, Limiter};
use crate::domain::secrets;
use crate::domain::sessions::SignInLimiter;
use crate::domain::webhooks;
use crate::error::{Error, Result};
use crate::images::ImageStore;
use crate::metrics::Metrics;
use crate::store::{
    now, AccountRecord, CancelOutcome, IdempotencyBegin, IdempotencyScope, KeyRecord, NewAccount,
    Store, StoredResponse, TaskRecord, WebhookDeliveryRecord,
};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{Notify, Semaphore};
use tollgate_contract::{
    Account, AddCreditsRequest, CreateAccountRequest, CreateGenerationRequest, CreatedAccount,
    CreatedKey, ErrorCode, ImageRef, KeyInfo, LedgerEntry, List, RateLimit, Task, TaskError,
    TaskStatus, TaskWebhook, UpdateAccountRequest, WebhookAttempt, WebhookSecret, WebhookState,
};

/// Who is calling, once their API key checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub account_id: String,
    pub key_id: String,
    /// The limit in force for this account.
    pub rate_limit: RateLimit,
}

/// The domain: accounts, keys, credits, limits and tasks.
pub struct Tollgate {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) images: Arc<dyn ImageStore>,
    pub(crate) metrics: Metrics,
    pub(crate) config: Config,
    limits: Limiter,
    admin_token_hash: String,
    /// Past key lookups; `None` when the store is shared with other instances (see caches.rs).
    key_cache: Option<KeyCache>,
    /// Finished tasks; `None` when the store is shared with other instances.
    finished_tasks: Option<FinishedTasks>,
    /// Dashboard sign-in attempts, per client address and per credential prefix.
    pub(crate) sign_in_limits: SignInLimiter,
    /// Wakes a worker when a task is queued.
    pub(crate) work_ready: Notify,
    /// What generates the images.
    pub(crate) backend: Arc<dyn Backend>,
    /// One permit per generation the backend may run at once; a worker claims a task only
    /// with a permit in hand.
    pub(crate) backend_slots: Arc<Semaphore>,
    /// Wakes the webhook sender when a finished task has a delivery waiting.
    pub(crate) webhooks_ready: Notify,
    /// Free space under the data directory, checked before writes that grow the data.
    pub(crate) disk: DiskSpace,
    /// Idempotency reservations (scope, key) whose release failed: their requests ended.
    abandoned_reservations: dashmap::DashSet<(String, String)>,
    /// The last readiness probe: when, and what it found (see [`Tollgate::readiness`]).
    last_probe: tokio::sync::Mutex<Option<(std::time::Instant, Result<(), &'static str>)>>,
}

/// Readiness is probed at most this often; callers in between get the last answer.
const PROBE_EVERY: Duration = Duration::from_secs(1);

const MAX_PROMPT_CHARS: usize = 4000;
const MAX_NAME_CHARS: usize = 200;
const MAX_LIST_LIMIT: u32 = 100;
/// Expired tasks purged per step (images, then tombstones).
const PURGE_BATCH: u32 = 200;

impl Tollgate {
    /// Builds the domain over a store. `admin_token_hash` is the hash the operator's token must match.
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        images: Arc<dyn ImageStore>,
        limits: Limiter,
        admin_token_hash: String,
    ) -> Self {
        let backend_slots = Arc::new(Semaphore::new(config.effective_backend_concurrency()));
        let key_cache = (!store.is_shared()).then(KeyCache::default);
        let finished_tasks = (!store.is_shared()).then(FinishedTasks::default);
        let disk = DiskSpace::new(config.data_dir.clone(), config.min_free_disk);
        Tollgate {
            disk,
            last_probe: tokio::sync::Mutex::new(None),
            abandoned_reservations: dashmap::DashSet::new(),
            key_cache,
            finished_tasks,
            store,
            images,
            metrics: Metrics::default(),
            config,
            limits,
            admin_token_hash,
            sign_in_limits: SignInLimiter::default(),
            work_ready: Notify::new(),
            backend: Arc::new(backends::builtin::Builtin),
            backend_slots,
            webhooks_ready: Notify::new(),
        }
    }

    /// Generates with `backend` instead of the built-in renderer.
    pub fn with_backend(mut self, backend: Arc<dyn Backend>) -> Self {
        self.backend = backend;
        self
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    // ---------------------------------------------------------------- authentication

    /// Checks an API key. A revocation takes effect on the very next request: on a store shared
    /// with other instances every call asks the store; on a store of this process alone the
    /// answer may come from the key cache, which every revocation here updates first.
    pub async fn authenticate(&self, api_key: Option<&str>) -> Result<Caller> {
        let key = api_key.ok_or(Error::MissingCredential { admin: false })?;
        if !key.starts_with(secrets::API_KEY_PREFIX) {
            return Err(Error::InvalidCredential { admin: false });
        }
        let digest = secrets::key_digest(key);
        let cached = match &self.key_cache {
            Some(cache) => cache.get(&digest),
            None => Cached::Miss,
        };
        let auth = match cached {
            Cached::Live(auth) => auth,
            Cached::Unknown => return Err(Error::InvalidCredential { admin: false }),
            Cached::Miss => {
                let epoch = self.key_cache.as_ref().map(KeyCache::epoch);
                let found = self.store.authenticate(&secrets::hex(&digest)).await?;
                if let (Some(cache), Some(epoch)) = (&self.key_cache, epoch) {
                    cache.remember(epoch, &digest, found.as_ref());
                }
                found.ok_or(Error::InvalidCredential { admin: false })?
            }
        };
        Ok(Caller {
            account_id: auth.account_id,
            key_id: auth.key_id,
            rate_limit: auth.rate_limit.unwrap_or(self.config.default_rate_limit),
        })
    }

    /// Counts one request against the caller's rate limit.
    pub async fn admit(&self, caller: &Caller) -> Result<Admission> {
        let admission = self
            .limits
            .check(&caller.account_id, caller.rate_limit)
            .await?;
        if !admission.admitted() {
            self.metrics.rate_limited.inc();
        }
        Ok(admission)
    }

    /// The hash the operator's token must match (dashboard sessions remember it).
    pub(crate) fn admin_token_hash(&self) -> &str {
        &self.admin_token_hash
    }

    /// Checks the operator's token.
    pub fn authenticate_admin(&self, token: Option<&str>) -> Result<()> {
        let token = token.ok_or(Error::MissingCredential { admin: true })?;
        if secrets::constant_time_eq(&secrets::hash_secret(token), &self.admin_token_hash) {
            Ok(())
        } else {
            Err(Error::InvalidCredential { admin: true })
        }
    }

    // ---------------------------------------------------------------- tasks

    /// Validates, prices, charges and queues a generation: one transaction with its charge
    /// (and with its idempotency record, when the request carried a key).
    pub async fn create_generation(
        &self,
        caller: &Caller,
        request: CreateGenerationRequest,
        idempotency: Option<&IdempotencyScope>,
    ) -> Result<Task> {
        let prompt_chars = request.prompt.chars().count();
        if request.prompt.trim().is_empty() || prompt_chars > MAX_PROMPT_CHARS {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "prompt",
                format!("`prompt` must be 1 to {MAX_PROMPT_CHARS} characters and not blank; it has {prompt_chars}."),
            ));
        }
        let n = request.n.unwrap_or(1);
        if !(1..=4).contains(&n) {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "n",
                format!("`n` must be 1 to 4, not {n}."),
            ));
        }
        let size = request.size.unwrap_or_default();
        let seed = match request.seed {
            Some(seed) => seed,
            None => i64::from(rand::random::<u32>()),
        };
        let webhook_url = match &request.webhook_url {
            Some(url) => Some(
                webhooks::check_url(url, self.config.allow_private_webhooks)
                    .await
                    .map_err(webhooks::invalid_url)?
                    .url
                    .to_string(),
            ),
            None => None,
        };
        let record = TaskRecord {
            id: secrets::new_id("task")?,
            account_id: caller.account_id.clone(),
            status: TaskStatus::Queued,
            prompt: request.prompt,
            n,
            size,
            seed,
            cost: self.config.prices.cost(size, n)?,
            created_at: now(),
            started_at: None,
            completed_at: None,
            error_code: None,
            error_message: None,
            purged: false,
            runs: 0,
            webhook_url,
        };
        self.disk.ensure_headroom()?;
        let task = self.task_view(&record);
        let stored = match idempotency {
            Some(scope) => {
                let body = serde_json::to_vec(&task).map_err(Error::internal)?;
                Some((scope, StoredResponse { status: 202, body }))
            }
            None => None,
        };
        self.store
            .create_task(
                &record,
                stored.as_ref().map(|(scope, response)| (*scope, response)),
            )
            .await?;
        self.metrics.credits_charged.inc_by(record.cost);
        self.work_ready.notify_one();
        Ok(task)
    }

    /// A task of the caller's account: 404 for another account's or an unknown id, 410 once expired.
    pub async fn get_task(&self, caller: &Caller, id: &str) -> Result<Task> {
        let record = self.live_task(caller, id).await?;
        Ok(self.views(&[record]).await?.remove(0))
    }

    /// [`Tollgate::get_task`] as JSON: what clients poll. A finished task without a webhook
    /// never changes again, so its JSON is made once and kept with it in the cache.
    pub async fn get_task_json(&self, caller: &Caller, id: &str) -> Result<Bytes> {
        if let Some(entry) = self.finished_tasks.as_ref().and_then(|cache| cache.get(id)) {
            let record = &entry.record;
            if record.webhook_url.is_none() {
                self.check_live(caller, id, record)?;
                if let Some(json) = entry.json.get() {
                    return Ok(json.clone());
                }
                let json = to_json(&self.task_view(record))?;
                return Ok(entry.json.get_or_init(|| json).clone());
            }
        }
        to_json(&self.get_task(caller, id).await?)
    }

    /// The caller's tasks, newest first, `limit` (1–100, default 20) after the task `after`.
    pub async fn list_tasks(
        &self,
        caller: &Caller,
        limit: Option<u32>,
        after: Option<&str>,
    ) -> Result<List<Task>> {
        let limit = limit.unwrap_or(20);
        if !(1..=MAX_LIST_LIMIT).contains(&limit) {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "limit",
                format!("`limit` must be 1 to {MAX_LIST_LIMIT}, not {limit}."),
            ));
        }
        let not_before = now() - self.config.retention;
        let mut records = self
            .store
            .list_tasks(&caller.account_id, limit + 1, after, not_before)
            .await?
            .ok_or_else(|| {
                Error::invalid(
                    ErrorCode::InvalidValue,
                    "after",
                    "`after` must be the id of one of your tasks.",
                )
            })?;
        let has_more = records.len() > limit as usize;
        records.truncate(limit as usize);
        Ok(List {
            object: "list".to_owned(),
            data: self.views(&records).await?,
            has_more,
        })
    }

    /// Cancels a queued task and refunds it; a cancelled task stays cancelled (no second refund).
    pub async fn cancel_task(&self, caller: &Caller, id: &str) -> Result<Task> {
        self.live_task(caller, id).await?;
        match self
            .store
            .cancel_task(&caller.account_id, id, now())
            .await?
        {
            CancelOutcome::Canceled(record) => {
                self.metrics.credits_refunded.inc_by(record.cost);
                self.metrics.task_finished(TaskStatus::Canceled.as_str());
                if record.webhook_url.is_some() {
                    self.webhooks_ready.notify_one();
                }
                Ok(self.views(&[record]).await?.remove(0))
            }
            CancelOutcome::AlreadyCanceled(record) => Ok(self.views(&[record]).await?.remove(0)),
            CancelOutcome::NotCancelable(record) => Err(Error::NotCancelable {
                id: record.id,
                status: record.status,
            }),
            CancelOutcome::NotFound => Err(Error::NotFound {
                what: "task",
                id: id.to_owned(),
            }),
        }
    }

    /// The PNG bytes of image `index` of a task.
    pub async fn task_image(&self, caller: &Caller, id: &str, index: &str) -> Result<Vec<u8>> {
        let record = self.live_task(caller, id).await?;
        let not_found = || Error::NotFound {
            what: "image",
            id: format!("{}/images/{}", record.id, shorten(index)),
        };
        let index: u8 = index.parse().map_err(|_| not_found())?;
        if record.status != TaskStatus::Succeeded || index >= record.n {
            return Err(not_found());
        }
        self.images
            .get(&record.id, index)
            .await?
            .ok_or_else(not_found)
    }

    async fn live_task(&self, caller: &Caller, id: &str) -> Result<TaskRecord> {
        let cached = self.finished_tasks.as_ref().and_then(|cache| cache.get(id));
        let found = match cached {
            Some(entry) => Some(entry.record.clone()),
            None => {
                let found = self.store.get_task(id).await?;
                if let (Some(cache), Some(record)) = (&self.finished_tasks, &found) {
                    cache.remember(record);
                }
                found
            }
        };
        let record = found.ok_or_else(|| Error::NotFound {
            what: "task",
            id: shorten(id),
        })?;
        self.check_live(caller, id, &record)?;
        Ok(record)
    }

    /// 404 for a task of another account (never 403), 410 once it is past the retention.
    fn check_live(&self, caller: &Caller, id: &str, record: &TaskRecord) -> Result<()> {
        if record.account_id != caller.account_id {
            return Err(Error::NotFound {
                what: "task",
                id: shorten(id),
            });
        }
        if record.purged || now() >= self.expires_at(record) {
            return Err(Error::Gone {
                what: "task",
                id: record.id.clone(),
                retention: self.config.retention,
            });
        }
        Ok(())
    }

    fn expires_at(&self, record: &TaskRecord) -> OffsetDateTime {
        record.created_at + self.config.retention
    }

    /// The wire form of tasks, with the deliveries of those that have a webhook.
    async fn views(&self, records: &[TaskRecord]) -> Result<Vec<Task>> {
        let with_webhook: Vec<String> = records
            .iter()
            .filter(|r| r.webhook_url.is_some())
            .map(|r| r.id.clone())
            .collect();
        let deliveries = if with_webhook.is_empty() {
            Vec::new()
        } else {
            self.store.webhook_deliveries(&with_webhook).await?
        };
        Ok(records
            .iter()
            .map(|r| {
                let delivery = deliveries.iter().find(|d| d.task_id == r.id);
                self.task_view_with(r, delivery)
            })
            .collect())
    }

    /// The wire form of a task whose webhook (if any) has not been attempted yet.
    pub(crate) fn task_view(&self, record: &TaskRecord) -> Task {
        self.task_view_with(record, None)
    }

    /// The wire form of a task, with its webhook's delivery as stored.
    pub(crate) fn task_view_with(
        &self,
        record: &TaskRecord,
        delivery: Option<&WebhookDeliveryRecord>,
    ) -> Task {
        let webhook = record.webhook_url.as_ref().map(|url| match delivery {
            Some(d) => TaskWebhook {
                url: url.clone(),
                state: d.state,
                delivered_at: d.delivered_at,
                next_attempt_at: d
                    .next_attempt_at
                    .filter(|_| d.state == WebhookState::Pending),
                attempts: d
                    .history
                    .iter()
                    .map(|a| WebhookAttempt {
                        at: a.at,
                        status: a.status,
                        error: a.error.clone(),
                    })
                    .collect(),
            },
            None => TaskWebhook {
                url: url.clone(),
                state: WebhookState::Pending,
                delivered_at: None,
                next_attempt_at: None,
                attempts: Vec::new(),
            },
        });
        let mut task = self.task_view_plain(record);
        task.webhook = webhook;
        task
    }

    fn task_view_plain(&self, record: &TaskRecord) -> Task {
        let images = if record.status == TaskStatus::Succeeded {
            (0..record.n)
                .map(|i| ImageRef {
                    url: format!("/v1/tasks/{}/images/{i}", record.id),
                })
                .collect()
        } else {
            Vec::new()
        };
        let error = match (&record.error_code, &record.error_message) {
            (Some(code), Some(message)) => Some(TaskError {
                code: code.clone(),
                message: message.clone(),
            }),
            _ => None,
        };
        Task {
            id: record.id.clone(),
            object: "task".to_owned(),
            status: record.status,
            prompt: record.prompt.clone(),
            n: record.n,
            size: record.size,
            seed: record.seed,
            cost: record.cost,
            created_at: record.created_at,
            completed_at: record.completed_at,
            expires_at: self.expires_at(record),
            images,
            error,
            webhook: None,
        }
    }

    // ---------------------------------------------------------------- accounts

    /// The caller's own account.
    pub async fn account(&self, account_id: &str) -> Result<Account> {
        let record = self
            .store
            .get_account(account_id)
            .await?
            .ok_or_else(|| Error::NotFound {
                what: "account",
                id: shorten(account_id),
            })?;
        Ok(self.account_view(&record))
    }

    pub(crate) fn account_view(&self, record: &AccountRecord) -> Account {
        Account {
            id: record.id.clone(),
            name: record.name.clone(),
            credits: record.credits,
            rate_limit: record.rate_limit.unwrap_or(self.config.default_rate_limit),
        }
    }

    fn validate_name(name: &str) -> Result<()> {
        let chars = name.chars().count();
        if name.trim().is_empty() || chars > MAX_NAME_CHARS {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "name",
                format!("`name` must be 1 to {MAX_NAME_CHARS} characters and not blank."),
            ));
        }
        Ok(())
    }

    fn validate_rate_limit(limit: Option<RateLimit>) -> Result<()> {
        if let Some(limit) = limit {
            if limit.requests_per_minute == 0 {
                return Err(Error::invalid(
                    ErrorCode::InvalidValue,
                    "rate_limit.requests_per_minute",
                    "`rate_limit.requests_per_minute` must be at least 1.",
                ));
            }
            if limit.burst == 0 {
                return Err(Error::invalid(
                    ErrorCode::InvalidValue,
                    "rate_limit.burst",
                    "`rate_limit.burst` must be at least 1.",
                ));
            }
        }
        Ok(())
    }

    fn new_key(account_id: &str) -> Result<(KeyRecord, String)> {
        let api_key = secrets::new_api_key()?;
        let record = KeyRecord {
            id: secrets::new_id("key")?,
            account_id: account_id.to_owned(),
            key_hash: secrets::hash_secret(&api_key),
            prefix: secrets::key_prefix(&api_key),
            created_at: now(),
            revoked_at: None,
        };
        Ok((record, api_key))
    }

    /// Operator: a new account with its first key (shown once).
    pub async fn create_account(&self, request: CreateAccountRequest) -> Result<CreatedAccount> {
        Self::validate_name(&request.name)?;
        Self::validate_rate_limit(request.rate_limit)?;
        if i64::try_from(request.credits).is_err() {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "credits",
                "`credits` is too large.",
            ));
        }
        let account = NewAccount {
            id: secrets::new_id("acct")?,
            name: request.name,
            credits: request.credits,
            rate_limit: request.rate_limit,
            created_at: now(),
            webhook_secret: Some(secrets::new_webhook_secret()?),
        };
        let (key, api_key) = Self::new_key(&account.id)?;
        self.disk.ensure_headroom()?;
        let record = self.store.create_account(&account, &key).await?;
        if let Some(cache) = &self.key_cache {
            cache.forget_unknown();
        }
        Ok(CreatedAccount {
            account: self.account_view(&record),
            api_key,
        })
    }

    pub async fn list_accounts(&self) -> Result<List<Account>> {
        let records = self.store.list_accounts().await?;
        Ok(List {
            object: "list".to_owned(),
            data: records.iter().map(|r| self.account_view(r)).collect(),
            has_more: false,
        })
    }

    pub async fn update_account(&self, id: &str, request: UpdateAccountRequest) -> Result<Account> {
        if let Some(name) = &request.name {
            Self::validate_name(name)?;
        }
        Self::validate_rate_limit(request.rate_limit)?;
        let record = self
            .store
            .update_account(id, request.name.as_deref(), request.rate_limit)
            .await?
            .ok_or_else(|| Error::NotFound {
                what: "account",
                id: shorten(id),
            })?;
        if let Some(cache) = &self.key_cache {
            cache.forget_account(id);
        }
        Ok(self.account_view(&record))
    }

    /// Operator: another key for an account (shown once).
    pub async fn create_key(&self, account_id: &str) -> Result<CreatedKey> {
        let (key, api_key) = Self::new_key(account_id)?;
        self.disk.ensure_headroom()?;
        if !self.store.create_key(&key).await? {
            return Err(Error::NotFound {
                what: "account",
                id: shorten(account_id),
            });
        }
        if let Some(cache) = &self.key_cache {
            cache.forget_unknown();
        }
        Ok(CreatedKey {
            id: key.id,
            api_key,
        })
    }

    /// The account's ledger, newest first (`limit` 1–100, default 100), after the entry with id
    /// `after` when given: a page of the whole ledger, as `GET /v1/tasks` pages the tasks.
    pub async fn ledger(
        &self,
        account_id: &str,
        limit: Option<u32>,
        after: Option<i64>,
    ) -> Result<List<LedgerEntry>> {
        let limit = limit.unwrap_or(MAX_LIST_LIMIT);
        if !(1..=MAX_LIST_LIMIT).contains(&limit) {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "limit",
                format!("`limit` must be 1 to {MAX_LIST_LIMIT}, not {limit}."),
            ));
        }
        self.account(account_id).await?;
        let mut entries = self.store.ledger(account_id, limit + 1, after).await?;
        let has_more = entries.len() > limit as usize;
        entries.truncate(limit as usize);
        let data = entries
            .into_iter()
            .map(|e| LedgerEntry {
                id: e.id,
                object: "ledger_entry".to_owned(),
                delta: e.delta,
                balance_after: e.balance_after,
                kind: e.kind,
                task_id: e.task_id,
                note: e.note,
                created_at: e.created_at,
            })
            .collect();
        Ok(List {
            object: "list".to_owned(),
            data,
            has_more,
        })
    }

    /// Operator: the account's keys (never the keys themselves).
    pub async fn list_keys(&self, account_id: &str) -> Result<List<KeyInfo>> {
        self.account(account_id).await?;
        let data = self
            .store
            .list_keys(account_id)
            .await?
            .into_iter()
            .map(|k| KeyInfo {
                id: k.id,
                prefix: k.prefix,
                created_at: k.created_at,
                revoked_at: k.revoked_at,
            })
            .collect();
        Ok(List {
            object: "list".to_owned(),
            data,
            has_more: false,
        })
    }

    /// Operator: revokes a key; the next request with it is refused.
    pub async fn revoke_key(&self, key_id: &str) -> Result<()> {
        if self.store.revoke_key(key_id).await? {
            if let Some(cache) = &self.key_cache {
                cache.forget_key(key_id);
            }
            Ok(())
        } else {
            Err(Error::NotFound {
                what: "key",
                id: shorten(key_id),
            })
        }
    }

    /// Revokes a key of this account (an account holder managing their own keys); another
    /// account's key is "not found", like its tasks.
    pub async fn revoke_account_key(&self, account_id: &str, key_id: &str) -> Result<()> {
        let owned = self
            .store
            .list_keys(account_id)
            .await?
            .iter()
            .any(|k| k.id == key_id && k.revoked_at.is_none());
        if !owned {
            return Err(Error::NotFound {
                what: "key",
                id: shorten(key_id),
            });
        }
        self.revoke_key(key_id).await
    }

    /// Operator: adds (or, negative, removes) credits, with a ledger entry.
    pub async fn add_credits(
        &self,
        account_id: &str,
        request: AddCreditsRequest,
    ) -> Result<Account> {
        if request.amount == 0 {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "amount",
                "`amount` must not be zero.",
            ));
        }
        if request
            .note
            .as_ref()
            .is_some_and(|n| n.chars().count() > 500)
        {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "note",
                "`note` must be at most 500 characters.",
            ));
        }
        self.disk.ensure_headroom()?;
        let record = self
            .store
            .add_credits(account_id, request.amount, request.note.as_deref())
            .await?
            .ok_or_else(|| Error::NotFound {
                what: "account",
                id: shorten(account_id),
            })?;
        Ok(self.account_view(&record))
    }

    // ---------------------------------------------------------------- webhooks

    /// The secret that signs the account's webhooks, made now for an account older than
    /// webhooks.
    pub(crate) async fn webhook_secret_of(&self, account_id: &str) -> Result<String> {
        let candidate = secrets::new_webhook_secret()?;
        self.store
            .webhook_secret(account_id, &candidate)
            .await?
            .ok_or_else(|| Error::NotFound {
                what: "account",
                id: shorten(account_id),
            })
    }

    /// `GET /v1/account/webhook-secret`: the caller's webhook secret.
    pub async fn webhook_secret(&self, caller: &Caller) -> Result<WebhookSecret> {
        Ok(WebhookSecret {
            object: "webhook_secret".to_owned(),
            secret: self.webhook_secret_of(&caller.account_id).await?,
        })
    }

    /// `POST /v1/account/webhook-secret`: a new secret; deliveries from now on are signed with it.
    pub async fn rotate_webhook_secret(&self, caller: &Caller) -> Result<WebhookSecret> {
        let secret = secrets::new_webhook_secret()?;
        if !self
            .store
            .set_webhook_secret(&caller.account_id, &secret)
            .await?
        {
            return Err(Error::NotFound {
                what: "account",
                id: shorten(&caller.account_id),
            });
        }
        tracing::info!(account_id = %caller.account_id, "webhook secret rotated");
        Ok(WebhookSecret {
            object: "webhook_secret".to_owned(),
            secret,
        })
    }

    // ---------------------------------------------------------------- idempotency

    pub async fn idempotency_begin(&self, scope: &IdempotencyScope) -> Result<IdempotencyBegin> {
        let now = now();
        // A reservation this process could not release (the store failed) belongs to a request
        // known to have ended without a response: its retry takes it over at once instead of
        // waiting for it to go stale. Taken out of the set first, so one retry alone does.
        let abandoned = self
            .abandoned_reservations
            .remove(&(scope.scope.clone(), scope.key.clone()))
            .is_some();
        let stale_before = if abandoned {
            now + Duration::from_millis(1)
        } else {
            now - STALE_RESERVATION
        };
        let begun = self.store.idempotency_begin(scope, now, stale_before).await;
        if abandoned && begun.is_err() {
            self.abandoned_reservations
                .insert((scope.scope.clone(), scope.key.clone()));
        }
        begun
    }

    pub async fn idempotency_complete(
        &self,
        scope: &IdempotencyScope,
        response: &StoredResponse,
    ) -> Result<()> {
        self.store.idempotency_complete(scope, response).await
    }

    /// Releases the reservation of a request that ended without a response to keep. When the
    /// store cannot (it is the store's fault that the request failed, often), the reservation
    /// is remembered as abandoned, for [`Tollgate::idempotency_begin`].
    pub async fn idempotency_release(&self, scope: &IdempotencyScope) -> Result<()> {
        let released = self.store.idempotency_release(scope).await;
        if released.is_err() {
            self.abandoned_reservations
                .insert((scope.scope.clone(), scope.key.clone()));
        }
        released
    }

    // ---------------------------------------------------------------- retention

    /// Purges the data of expired tasks (keeping tombstones) and forgets old idempotency keys.
    /// Returns how many tasks were purged.
    ///
    /// Batch by batch, images go first and the tombstones are marked after: a crash in between
    /// leaves those tasks unmarked, so the next run (on the next start) finds them again,
    /// deletes what is left (absent images are fine) and marks them. A purge resumes; it never
    /// leaves a tombstone whose images survive.
    pub async fn purge_expired(&self) -> Result<usize> {
        let mut purged = 0;
        loop {
            let cutoff = now() - self.config.retention;
            let ids = self.store.expired_tasks(cutoff, PURGE_BATCH).await?;
            if ids.is_empty() {
                break;
            }
            for id in &ids {
                self.images.delete_task(id).await?;
            }
            self.store.mark_purged(&ids).await?;
            if let Some(cache) = &self.finished_tasks {
                cache.forget(&ids);
            }
            purged += ids.len();
            tracing::info!(
                batch = ids.len(),
                purged_so_far = purged,
                "retention purge: a batch of expired tasks is now tombstones"
            );
        }
        self.store.idempotency_purge(now() - KEY_RETENTION).await?;
        self.store.delete_expired_sessions(now()).await?;
        self.sign_in_limits.forget_idle();
        Ok(purged)
    }

    /// Removes the images of tasks the store does not have, or has only as tombstones: left by a
    /// run whose task never committed (older versions could, after a full disk) or by
    /// a purge cut short. Run once at start, before the first purge.
    pub async fn collect_orphan_images(&self) -> Result<usize> {
        let mut removed = 0;
        for id in self.images.task_ids().await? {
            let orphan = match self.store.get_task(&id).await? {
                None => true,
                Some(task) => task.purged,
            };
            if orphan {
                self.images.delete_task(&id).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Refreshes gauges that are read from storage; called before metrics are rendered.
    pub async fn refresh_gauges(&self) -> Result<()> {
        let depth = self.store.queue_depth().await?;
        self.metrics
            .queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
        Ok(())
    }

    /// Whether this instance can carry out writes now (`GET /readyz`): the disk is above its
    /// floor (checked every time: one `statvfs`), the store commits a real write, and Redis
    /// answers when it keeps the limits. That probe writes (an fsync on SQLite), so it runs at
    /// most once per [`PROBE_EVERY`]; callers in between share its answer. Sets the
    /// `tollgate_ready` gauge.
    pub async fn readiness(&self) -> Result<()> {
        if let Err(e) = self.disk.ensure_headroom() {
            self.metrics.ready.set(0);
            tracing::warn!(error = %e, "not ready: low disk");
            return Err(Error::Unavailable {
                reason: "disk space below the floor",
                retry_after: Duration::from_secs(5),
            });
        }
        let mut last = self.last_probe.lock().await;
        let found = match &*last {
            Some((at, found)) if at.elapsed() < PROBE_EVERY => *found,
            _ => {
                let found = self.probe().await;
                *last = Some((std::time::Instant::now(), found));
                found
            }
        };
        self.metrics.ready.set(i64::from(found.is_ok()));
        found.map_err(|reason| Error::Unavailable {
            reason,
            retry_after: Duration::from_secs(1),
        })
    }

    async fn probe(&self) -> Result<(), &'static str> {
        if let Err(e) = self.store.probe_write().await {
            tracing::warn!(error = %e, "not ready: the store cannot commit");
            return Err("the store cannot commit");
        }
        self.limits
            .ping()
            .await
            .map_err(|_| "the rate limiter does not answer")
    }

    /// How long clients should wait before retrying during shutdown.
    pub fn shutdown_retry_after(&self) -> Duration {
        self.config.shutdown_retry_after
    }
}

/// Ids echoed in messages come from the client: keep them short.
fn shorten(id: &str) -> String {
    if id.chars().count() <= 64 {
        id.to_owned()
    } else {
        format!("{}…", id.chars().take(64).collect::<String>())
    }
}

fn to_json(task: &Task) -> Result<Bytes> {
    serde_json::to_vec(task)
        .map(Bytes::from)
        .map_err(Error::internal)
}
