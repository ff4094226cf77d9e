//! [`Tollgate`]: the domain facade. Every route of the API is one method here, in a file by
//! concern: [`auth`], [`tasks`], [`accounts`], [`idempotency`], [`retention`], [`health`].

mod accounts;
mod auth;
mod billing;
mod health;
mod idempotency;
mod retention;
mod tasks;

pub(crate) use tasks::task_view;

use crate::config::Config;
use crate::disk::DiskSpace;
use crate::domain::backends::{self, Backend};
use crate::domain::caches::{Cached, FinishedTasks, Freshness, KeyCache, SharedCaches};
use crate::domain::catalogue::{Catalogue, ModelSpec};
use crate::domain::clock::{Clock, SystemClock};
use crate::domain::idempotency::{KEY_RETENTION, STALE_RESERVATION};
use crate::domain::links::{ImageLinks, LinkRefusal};
use crate::domain::ratelimit::{Admission, Limiter};
use crate::domain::secrets;
use crate::domain::sessions::SignInLimiter;
use crate::domain::waiting::TaskWaiters;
use crate::domain::{webhooks, worker};
use crate::error::{Error, Result};
use crate::images::ImageStore;
use crate::metrics::Metrics;
use crate::store::{
    AccountRecord, CancelOutcome, IdempotencyBegin, IdempotencyScope, KeyRecord, NewAccount, Store,
    StoredResponse, TaskRecord, WebhookDeliveryRecord,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{Notify, Semaphore};
use tollgate_contract::{
    Account, AddCreditsRequest, CreateAccountRequest, CreateGenerationRequest, CreatedAccount,
    CreatedKey, ErrorCode, ImageRef, KeyInfo, LedgerEntry, List, Model, RateLimit, Task, TaskError,
    TaskStatus, TaskWebhook, UpdateAccountRequest, WebhookAttempt, WebhookSecret, WebhookState,
    MAX_CREDITS,
};

/// Who is calling, once their API key checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub account_id: String,
    pub key_id: String,
    /// The limit in force for this account.
    pub rate_limit: RateLimit,
    /// The key's spend limit, when it has one.
    pub spend_limit: Option<tollgate_contract::SpendLimit>,
}

/// The domain: accounts, keys, credits, limits and tasks.
pub struct Tollgate {
    /// What time it is (the system's; a `ManualClock` in tests).
    clock: Arc<dyn Clock>,
    pub(in crate::domain) store: Arc<dyn Store>,
    pub(in crate::domain) images: Arc<dyn ImageStore>,
    metrics: Arc<Metrics>,
    pub(in crate::domain) config: Config,
    limits: Limiter,
    admin_token_hash: String,
    /// Past key lookups (see caches.rs); on a shared store, used while its change feed is live.
    key_cache: Arc<KeyCache>,
    /// Finished tasks.
    finished_tasks: Arc<FinishedTasks>,
    /// A shared store's change feed: whether it is live (`None` on a store of this process alone).
    feed: Option<Arc<Freshness>>,
    /// Dashboard sign-in attempts, per client address and per credential prefix.
    pub(in crate::domain) sign_in_limits: SignInLimiter,
    /// What can be sold, by model id, each with its backend and its own share of the queue.
    models: BTreeMap<String, ServedModel>,
    /// The model of a create that names none.
    default_model: String,
    /// The tasks this process's workers run, for a cancel to stop them at once.
    running: worker::Running,
    /// Wakes the webhook sender when a finished task has a delivery waiting.
    webhooks_ready: Arc<Notify>,
    /// Wakes the long polls of a task when it finishes.
    waiters: Arc<TaskWaiters>,
    /// Signs the image links of task views and checks them when they are fetched.
    links: Arc<ImageLinks>,
    /// Free space under the data directory, checked before writes that grow the data.
    pub(in crate::domain) disk: DiskSpace,
    /// Idempotency reservations, by (scope, key), that this process may have made and whose
    /// requests ended without an answer to keep (the release failed, or the store failed while
    /// reserving and may have committed all the same): the times they were made at.
    abandoned_reservations: dashmap::DashMap<(String, String), Vec<OffsetDateTime>>,
    /// Stripe Checkout, when the operator sells credit packs.
    stripe: Option<crate::domain::stripe::Stripe>,
    /// The last readiness probe: when, and what it found (see [`Tollgate::readiness`]).
    last_probe: tokio::sync::Mutex<Option<(std::time::Instant, Result<(), &'static str>)>>,
}

/// A model as this process serves it: what the catalogue says, the backend that makes its
/// images, and its own share of the queue (slots, workers and a wake-up), so that a slow or
/// broken provider never holds the workers another model needs.
struct ServedModel {
    spec: ModelSpec,
    backend: Arc<dyn Backend>,
    /// One permit per generation of this model in flight; a worker claims a task only with a
    /// permit in hand.
    slots: Arc<Semaphore>,
    /// Wakes one of the model's workers when one of its tasks is queued.
    work_ready: Arc<Notify>,
    /// How its runs have gone in this process.
    health: Arc<worker::ModelHealth>,
}

impl ServedModel {
    fn start(spec: ModelSpec) -> Result<ServedModel> {
        Ok(ServedModel {
            backend: backends::for_model(&spec.backend)?,
            slots: Arc::new(Semaphore::new(spec.concurrency)),
            work_ready: Arc::new(Notify::new()),
            health: Arc::default(),
            spec,
        })
    }
}

/// Readiness is probed at most this often; callers in between get the last answer.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The bounds of what clients send; `/openapi.json` publishes each of them (`http::openapi`).
pub const MAX_PROMPT_CHARS: usize = 4000;
pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_LIST_LIMIT: u32 = 100;
/// The longest `note` of a grant or correction.
pub const MAX_CREDIT_NOTE_CHARS: usize = 500;
/// Expired tasks purged per step (images, then tombstones).
const PURGE_BATCH: u32 = 200;

impl Tollgate {
    /// Builds the domain over a store, selling the one built-in model ([`Tollgate::with_models`]
    /// sells a catalogue). `admin_token_hash` is the hash the operator's token must match.
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        images: Arc<dyn ImageStore>,
        limits: Limiter,
        admin_token_hash: String,
    ) -> Self {
        let builtin = Catalogue::builtin(&config);
        let metrics = Metrics::default();
        metrics.models(builtin.models.keys().cloned());
        let models = builtin
            .models
            .into_values()
            .map(|spec| {
                let served = ServedModel {
                    backend: Arc::new(backends::builtin::Builtin),
                    slots: Arc::new(Semaphore::new(spec.concurrency)),
                    work_ready: Arc::new(Notify::new()),
                    health: Arc::default(),
                    spec,
                };
                (served.spec.id.clone(), served)
            })
            .collect();
        let feed = store.is_shared().then(Arc::<Freshness>::default);
        let key_cache = Arc::new(match &feed {
            Some(feed) => KeyCache::following(Arc::clone(feed)),
            None => KeyCache::default(),
        });
        let finished_tasks = Arc::new(FinishedTasks::default());
        let waiters = Arc::new(TaskWaiters::new(store.is_shared()));
        // A key of this process alone until `with_image_link_key` gives the deployment's.
        let links = Arc::new(ImageLinks::new(
            &rand::random::<[u8; 32]>(),
            config.image_url_ttl,
        ));
        let disk = DiskSpace::new(config.data_dir.clone(), config.min_free_disk);
        let stripe = config.billing.clone().and_then(|billing| {
            crate::domain::stripe::Stripe::new(billing)
                .map_err(|e| tracing::error!(error = %e, "Stripe is configured wrongly; no payments are taken"))
                .ok()
        });
        Tollgate {
            stripe,
            clock: Arc::new(SystemClock),
            disk,
            last_probe: tokio::sync::Mutex::new(None),
            abandoned_reservations: dashmap::DashMap::new(),
            key_cache,
            finished_tasks,
            feed,
            store,
            images,
            metrics: Arc::new(metrics),
            config,
            limits,
            admin_token_hash,
            sign_in_limits: SignInLimiter::default(),
            models,
            default_model: builtin.default,
            running: worker::Running::default(),
            webhooks_ready: Arc::new(Notify::new()),
            waiters,
            links,
        }
    }

    /// Signs image links with `key`, the one every instance of the deployment shares.
    pub fn with_image_link_key(mut self, key: &str) -> Self {
        self.links = Arc::new(ImageLinks::new(key.as_bytes(), self.config.image_url_ttl));
        self
    }

    /// With another clock (tests move a `ManualClock` instead of sleeping).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Now, by the domain's clock.
    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    /// Sells the models of `catalogue`, each made by the backend it names. Fails when a
    /// backend cannot be set up (a provider URL that is no URL).
    pub fn with_models(mut self, catalogue: Catalogue) -> Result<Self> {
        self.models = catalogue
            .models
            .into_iter()
            .map(|(id, spec)| Ok((id, ServedModel::start(spec)?)))
            .collect::<Result<_>>()?;
        self.default_model = catalogue.default;
        self.metrics.models(self.models.keys().cloned());
        Ok(self)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Follows a shared store's change feed into the caches until `stop` (see caches.rs); `None`
    /// on a store of this process alone, whose changes all pass through here.
    pub fn follow_changes(
        &self,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let sink = Arc::new(SharedCaches {
            feed: Arc::clone(self.feed.as_ref()?),
            keys: Arc::clone(&self.key_cache),
            tasks: Arc::clone(&self.finished_tasks),
        });
        let store = Arc::clone(&self.store);
        Some(tokio::spawn(async move {
            store.follow_changes(sink, stop).await;
        }))
    }

    /// The workers' handles, one per model with how many workers it gets: the model's queue
    /// and backend, not the facade.
    pub fn runners(&self) -> Vec<(worker::Runner, usize)> {
        self.models
            .values()
            .map(|model| {
                let runner = worker::Runner {
                    model: model.spec.id.clone(),
                    store: Arc::clone(&self.store),
                    images: Arc::clone(&self.images),
                    backend: Arc::clone(&model.backend),
                    slots: Arc::clone(&model.slots),
                    disk: self.disk.clone(),
                    clock: Arc::clone(&self.clock),
                    metrics: Arc::clone(&self.metrics),
                    work_ready: Arc::clone(&model.work_ready),
                    webhooks_ready: Arc::clone(&self.webhooks_ready),
                    lease: self.config.task_lease,
                    timeout: model.spec.timeout,
                    health: Arc::clone(&model.health),
                    running: Arc::clone(&self.running),
                    waiters: Arc::clone(&self.waiters),
                };
                (runner, model.spec.workers)
            })
            .collect()
    }

    /// The models for sale, as `GET /v1/models` lists them.
    pub fn models(&self) -> List<Model> {
        List {
            object: "list".to_owned(),
            data: self.models.values().map(|m| m.spec.view()).collect(),
            has_more: false,
        }
    }

    /// Every model with its backend's name and how its runs have gone, for the operator.
    pub fn model_health(&self) -> Vec<(Model, &'static str, worker::HealthReport)> {
        self.models
            .values()
            .map(|m| (m.spec.view(), m.spec.backend.name(), m.health.report()))
            .collect()
    }

    /// The model `id` names (the default one for `None`); 400 with `param` `model` when none.
    fn model(&self, id: Option<&str>) -> Result<&ServedModel> {
        let id = id.unwrap_or(&self.default_model);
        self.models.get(id).ok_or_else(|| {
            let known: Vec<&str> = self.models.keys().map(String::as_str).collect();
            Error::invalid(
                ErrorCode::InvalidValue,
                "model",
                format!(
                    "There is no model `{}`; the models are {} (GET /v1/models lists them with their prices).",
                    shorten(id),
                    quoted_list(&known)
                ),
            )
        })
    }

    /// The webhook sender's handle: the outbox, not the facade.
    /// The webhook sender's handle; `listening`: the address this server took, for the image
    /// links of deliveries when no `--public-url` is set.
    pub fn outbox(&self, listening: std::net::SocketAddr) -> webhooks::Outbox {
        webhooks::Outbox {
            store: Arc::clone(&self.store),
            clock: Arc::clone(&self.clock),
            ready: Arc::clone(&self.webhooks_ready),
            timeout: self.config.webhook_timeout,
            attempts: self.config.webhook_attempts,
            allow_private: self.config.allow_private_webhooks,
            retention: self.config.retention,
            links: Arc::clone(&self.links),
            link_base: self
                .config
                .public_url
                .clone()
                .unwrap_or_else(|| format!("http://{listening}")),
        }
    }

    // ---------------------------------------------------------------- authentication
}

/// Ids echoed in messages come from the client: keep them short.
/// The 404 of an account id that names none.
fn no_account(id: &str) -> Error {
    Error::NotFound {
        what: "account",
        id: shorten(id),
    }
}

/// `a`, `b` and `c`.
/// Text the store keeps may not hold NUL: PostgreSQL's `text` cannot, and both engines keep the
/// same rules. Refused as the field's 400, like any other bad value.
pub(crate) fn refuse_nul(param: &str, text: &str) -> Result<()> {
    if text.contains('\0') {
        return Err(Error::invalid(
            ErrorCode::InvalidValue,
            param,
            format!("`{param}` contains a NUL character (\\u0000), which text here may not hold."),
        ));
    }
    Ok(())
}

fn quoted_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("`{i}`")).collect();
    match quoted.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

fn shorten(id: &str) -> String {
    if id.chars().count() <= 64 {
        id.to_owned()
    } else {
        format!("{}…", id.chars().take(64).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::domain::clock::ManualClock;
    use crate::domain::ratelimit::RateLimits;
    use crate::error::VoucherRefusal;
    use crate::images::DiskImageStore;
    use crate::store::sqlite::SqliteStore;
    use tollgate_contract::CreateVoucherRequest;

    /// The facade over a real SQLite store, its clock in the test's hands; retention one hour.
    async fn app(dir: &std::path::Path) -> (Tollgate, Arc<ManualClock>) {
        let config = Config {
            retention: Duration::from_secs(3600),
            ..Config::new(dir)
        };
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir).await.unwrap());
        let images = Arc::new(DiskImageStore::new(dir.join("images")).unwrap());
        let clock = Arc::new(ManualClock::new());
        let app = Tollgate::new(
            config,
            store,
            images,
            Limiter::Local(RateLimits::default()),
            "0".repeat(64),
        )
        .with_clock(Arc::clone(&clock) as Arc<dyn Clock>);
        (app, clock)
    }

    async fn caller(app: &Tollgate, credits: u64) -> Caller {
        let (caller, _) = account(app, credits).await;
        caller
    }

    /// A new account: its caller and its API key.
    async fn account(app: &Tollgate, credits: u64) -> (Caller, String) {
        let created = app
            .create_account(CreateAccountRequest {
                name: "clock".into(),
                credits,
                rate_limit: None,
            })
            .await
            .unwrap();
        let caller = app.authenticate(Some(&created.api_key)).await.unwrap();
        (caller, created.api_key)
    }

    #[tokio::test]
    async fn a_task_answers_gone_once_the_retention_has_passed() {
        let dir = tempfile::tempdir().unwrap();
        let (app, clock) = app(dir.path()).await;
        let caller = caller(&app, 10).await;
        let request =
            serde_json::from_value(serde_json::json!({"prompt": "a lighthouse"})).unwrap();
        let task = app.create_generation(&caller, request, None).await.unwrap();
        clock.advance(Duration::from_secs(3599));
        assert_eq!(app.get_task(&caller, &task.id).await.unwrap().id, task.id);
        clock.advance(Duration::from_secs(1));
        match app.get_task(&caller, &task.id).await {
            Err(Error::Gone { retention, .. }) => assert_eq!(retention, Duration::from_secs(3600)),
            other => panic!("{other:?}"),
        }
        // Expired tasks also leave the list.
        let listed = app.list_tasks(&caller, None, None).await.unwrap();
        assert!(listed.data.is_empty(), "{:?}", listed.data);
    }

    #[tokio::test]
    async fn a_voucher_is_refused_after_its_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let (app, clock) = app(dir.path()).await;
        let caller = caller(&app, 0).await;
        let voucher = app
            .create_voucher(CreateVoucherRequest {
                credits: 5,
                expires_at: Some(app.now() + Duration::from_secs(60)),
                note: None,
            })
            .await
            .unwrap();
        clock.advance(Duration::from_secs(61));
        match app.redeem_voucher(&caller.account_id, &voucher.code).await {
            Err(Error::VoucherRefused(VoucherRefusal::Expired)) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(app.account(&caller.account_id).await.unwrap().credits, 0);
    }

    #[tokio::test]
    async fn credits_lapse_at_their_expiry_on_the_clock_and_are_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let (app, clock) = app(dir.path()).await;
        let caller = caller(&app, 2).await;
        let grant = |amount, hours: u64| AddCreditsRequest {
            amount,
            note: None,
            expires_at: Some(app.now() + Duration::from_secs(hours * 3600)),
        };
        app.add_credits(&caller.account_id, grant(3, 1))
            .await
            .unwrap();
        app.add_credits(&caller.account_id, grant(4, 2))
            .await
            .unwrap();
        // 1 × 512x512 costs 2: from the credits that expire first.
        let request = serde_json::from_value(serde_json::json!({"prompt": "a dune"})).unwrap();
        app.create_generation(&caller, request, None).await.unwrap();
        let account = app.account(&caller.account_id).await.unwrap();
        assert_eq!(account.credits, 7);
        let left: Vec<u64> = account.expiring.iter().map(|e| e.credits).collect();
        assert_eq!(left, [1, 4]);
        // An hour on, the first lot's last credit lapses as the balance is read, before any
        // expiry round.
        clock.advance(Duration::from_secs(3600));
        assert_eq!(app.account(&caller.account_id).await.unwrap().credits, 6);
        clock.advance(Duration::from_secs(3600));
        assert_eq!(app.expire_credits().await.unwrap(), 1);
        let account = app.account(&caller.account_id).await.unwrap();
        assert_eq!((account.credits, account.expiring.len()), (2, 0));
        let ledger = app.ledger(&caller.account_id, None, None).await.unwrap();
        let expired: Vec<i64> = ledger
            .data
            .iter()
            .filter(|e| e.kind == "expiry")
            .map(|e| e.delta)
            .collect();
        assert_eq!(expired, [-4, -1]);
    }

    #[tokio::test]
    async fn a_dashboard_session_ends_at_its_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let (app, clock) = app(dir.path()).await;
        let (_, api_key) = account(&app, 0).await;
        let client = std::net::IpAddr::from([127, 0, 0, 1]);
        let signed_in = app.sign_in(&api_key, client).await.unwrap();
        let token = signed_in.token.expose().to_owned();
        let ttl = app.config().session_ttl;
        clock.advance(ttl - Duration::from_secs(1));
        assert!(app.dashboard_session(&token).await.unwrap().is_some());
        clock.advance(Duration::from_secs(1));
        assert!(app.dashboard_session(&token).await.unwrap().is_none());
    }
}
