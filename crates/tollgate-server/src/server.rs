//! Assembles storage, the domain, the workers and the HTTP layer, and runs them until shutdown.

use crate::config::{Config, ImageStoreConfig, Secret};
use crate::domain::catalogue::Catalogue;
use crate::domain::ratelimit::{Limiter, RateLimits, RedisLimits};
use crate::domain::service::Tollgate;
use crate::domain::{purge, secrets, webhooks, worker};
use crate::error::Error;
use crate::error::Result;
use crate::http::{self, AppState};
use crate::images::{DiskImageStore, ImageStore, S3ImageStore};
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::store::Store;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A server whose storage is open and whose operator token is settled, ready to run.
pub struct Server {
    app: Arc<Tollgate>,
    generated_admin_token: Option<Secret>,
}

impl Server {
    /// Opens the data directory (SQLite, migrations, images) and settles the operator token:
    /// `config.admin_token` if set; else the hash kept from an earlier start; else a new token,
    /// of which only the hash is kept (see [`Server::generated_admin_token`]). Sells the models
    /// of `catalogue` (`Catalogue::from_config`, checked before anything is opened).
    pub async fn open(config: Config, catalogue: Catalogue) -> Result<Server> {
        // First: the store's pool, Redis and every connection need descriptors.
        http::serve::raise_descriptor_limit();
        // The free-space floor is measured here, whatever keeps the data (PostgreSQL, S3).
        std::fs::create_dir_all(&config.data_dir)?;
        let store = open_store(&config).await?;
        let images: Arc<dyn ImageStore> = match &config.image_store {
            ImageStoreConfig::DataDir => {
                Arc::new(DiskImageStore::new(config.data_dir.join("images"))?)
            }
            ImageStoreConfig::Directory(dir) => Arc::new(DiskImageStore::new(dir)?),
            ImageStoreConfig::S3(s3) => {
                tracing::info!(bucket = %s3.bucket, prefix = %s3.prefix, "images are kept in S3");
                Arc::new(S3ImageStore::new(s3)?)
            }
        };
        let limits = match &config.redis_url {
            Some(url) => {
                Limiter::Redis(RedisLimits::connect(url.expose(), config.redis_failure).await?)
            }
            None => Limiter::Local(RateLimits::default()),
        };
        let (admin_hash, generated_admin_token) = match &config.admin_token {
            Some(token) => (secrets::hash_secret(token.expose()), None),
            None => match store.admin_token_hash().await? {
                Some(hash) => (hash, None),
                None => {
                    let token = secrets::new_admin_token()?;
                    let hash = secrets::hash_secret(&token);
                    store.set_admin_token_hash(&hash).await?;
                    (hash, Some(Secret::new(token)))
                }
            },
        };
        let link_key = store.image_link_key(&secrets::new_link_key()?).await?;
        let requeued = store.requeue_running().await?;
        if requeued > 0 {
            tracing::warn!(
                tasks = requeued,
                "tasks left running by an earlier run are queued again"
            );
        }
        for model in catalogue.models.values() {
            tracing::info!(
                model = %model.id,
                backend = model.backend.name(),
                concurrency = model.concurrency,
                workers = model.workers,
                task_timeout_secs = model.timeout.as_secs(),
                "model ready"
            );
        }
        let app = Arc::new(
            Tollgate::new(config, store, images, limits, admin_hash)
                .with_image_link_key(&link_key)
                .with_models(catalogue)?,
        );
        Ok(Server {
            app,
            generated_admin_token,
        })
    }

    /// The operator token made on this first start, to be shown once. `None` when it was
    /// configured or made on an earlier start.
    pub fn generated_admin_token(&self) -> Option<&Secret> {
        self.generated_admin_token.as_ref()
    }

    /// The domain, for embedding and tests.
    pub fn app(&self) -> &Arc<Tollgate> {
        &self.app
    }

    /// Serves on `listener` until `shutdown` resolves. Then: new requests get 503 with
    /// `Retry-After` while in-flight ones finish (up to `shutdown_grace`), the listener closes,
    /// and workers stop after their current task, the webhook sender after its attempts in
    /// flight. Queued tasks and pending deliveries stay for the next start.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let config = self.app.config().clone();
        let (stop_tx, stop_rx) = watch::channel(false);
        let workers: Vec<_> = self
            .app
            .runners()
            .into_iter()
            .flat_map(|(runner, count)| worker::spawn(Arc::new(runner), count, stop_rx.clone()))
            .collect();
        let purger = purge::spawn(Arc::clone(&self.app), stop_rx.clone());
        let expiry = purge::spawn_credit_expiry(Arc::clone(&self.app), stop_rx.clone());
        let changes = self.app.follow_changes(stop_rx.clone());
        let sender = webhooks::spawn(self.app.outbox(listener.local_addr()?), stop_rx);

        let state = Arc::new(AppState::new(Arc::clone(&self.app)));
        let app = http::app(Arc::clone(&state));
        let drain_state = Arc::clone(&state);
        let grace = config.shutdown_grace;
        let drained = async move {
            shutdown.await;
            drain_state.draining.store(true, Ordering::Release);
            drain_state.app.stop_waiting();
            tracing::info!("shutting down: new requests get 503; waiting for in-flight requests");
            let deadline = Instant::now() + grace;
            while drain_state.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        http::serve::serve(listener, app, config.connections.clone(), drained).await?;

        let _ = stop_tx.send(true);
        for handle in workers {
            let _ = handle.await;
        }
        let _ = purger.await;
        let _ = expiry.await;
        if let Some(changes) = changes {
            let _ = changes.await;
        }
        let _ = sender.await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The store the configuration names: PostgreSQL, a SQLite file, or SQLite in the data dir.
async fn open_store(config: &Config) -> Result<Arc<dyn Store>> {
    let Some(url) = &config.database_url else {
        return Ok(Arc::new(SqliteStore::open(&config.data_dir).await?));
    };
    let url = url.expose();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(
            PostgresStore::connect(url, config.database_schema.as_deref()).await?,
        ))
    } else if let Some(path) = url.strip_prefix("sqlite://") {
        Ok(Arc::new(
            SqliteStore::open_file(std::path::Path::new(path)).await?,
        ))
    } else {
        Err(Error::internal(
            "the database URL must start with postgres://, postgresql:// or sqlite://",
        ))
    }
}
