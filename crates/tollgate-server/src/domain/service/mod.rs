//! [`Tollgate`]: the domain facade. Every route of the API is one method here, in a file by
//! concern: [`auth`], [`tasks`], [`accounts`], [`idempotency`], [`retention`], [`health`].

mod accounts;
mod auth;
mod health;
mod idempotency;
mod retention;
mod tasks;

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
