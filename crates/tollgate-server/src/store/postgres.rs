//! [`Store`] on PostgreSQL: for several `tollgate serve` instances sharing one ledger, one set
//! of keys and one queue.
//!
//! The same statements as SQLite (`sql.rs`), made safe for concurrent writers: balances change
//! through single guarded `UPDATE`s (the row lock orders concurrent charges on one account),
//! workers claim tasks with `FOR UPDATE SKIP LOCKED` (never the same task twice), and a task
//! whose worker died is taken again once its lease runs out. What is PostgreSQL's own is here:
//! connecting, the schema's change feed, and how many group-commit writers take task creations.

use super::changes;
use super::engine::Engine;
use super::sql::SqlStore;
use super::*;
use crate::error::Error;
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::Postgres;
use std::str::FromStr;
use std::time::Duration;

/// PostgreSQL-backed storage.
pub type PostgresStore = SqlStore<PostgresEngine>;

/// PostgreSQL's connections: one pool for reads and writes.
pub struct PostgresEngine {
    pool: PgPool,
}

/// The change feed's triggers (see `changes.rs`): each notifies, in the transaction of its
/// change, on the channel of the schema it is in. They fire only for what a lookup returns: a
/// key inserted or updated, an account's `rpm`/`burst` really changed (not the balance of every
/// charge), a task marked purged. Installed at every start (idempotent), not as a migration:
/// SQLite has no such thing and needs none.
const CHANGE_FEED: &str = r#"
CREATE OR REPLACE FUNCTION tollgate_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    channel text := 'tollgate_' || substr(md5(TG_TABLE_SCHEMA), 1, 16);
BEGIN
    IF TG_TABLE_NAME = 'api_keys' AND TG_OP = 'INSERT' THEN
        PERFORM pg_notify(channel, 'key_created');
    ELSIF TG_TABLE_NAME = 'api_keys' THEN
        PERFORM pg_notify(channel, 'key:' || NEW.id);
    ELSIF TG_TABLE_NAME = 'accounts' THEN
        PERFORM pg_notify(channel, 'account:' || NEW.id);
    ELSIF TG_TABLE_NAME = 'tasks' THEN
        PERFORM pg_notify(channel, 'purged:' || NEW.id);
    END IF;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS tollgate_key_changed ON api_keys;
CREATE TRIGGER tollgate_key_changed AFTER INSERT OR UPDATE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION tollgate_notify_change();
DROP TRIGGER IF EXISTS tollgate_limit_changed ON accounts;
CREATE TRIGGER tollgate_limit_changed AFTER UPDATE OF rpm, burst ON accounts
    FOR EACH ROW WHEN (OLD.rpm IS DISTINCT FROM NEW.rpm OR OLD.burst IS DISTINCT FROM NEW.burst)
    EXECUTE FUNCTION tollgate_notify_change();
DROP TRIGGER IF EXISTS tollgate_task_purged ON tasks;
CREATE TRIGGER tollgate_task_purged AFTER UPDATE OF purged ON tasks
    FOR EACH ROW WHEN (NEW.purged <> OLD.purged) EXECUTE FUNCTION tollgate_notify_change();
"#;

/// The schema's notification channel, as the triggers name it.
const CHANNEL: &str = "SELECT 'tollgate_' || substr(md5(current_schema()), 1, 16)";

impl PostgresEngine {
    /// Installs the change feed's triggers; instances starting together take turns.
    async fn install_change_feed(&self) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tollgate change feed'))")
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql(CHANGE_FEED).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Sends a heartbeat every [`changes::HEARTBEAT`] until `stop`. A heartbeat that cannot be
    /// sent (the database is away) is simply not heard, which is what the listeners must know.
    async fn beat(pool: PgPool, channel: String, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let ping = sqlx::query("SELECT pg_notify($1, 'ping')")
                .bind(&channel)
                .execute(&pool);
            if let Ok(Err(e)) = tokio::time::timeout(changes::HEARTBEAT, ping).await {
                tracing::debug!(error = %e, "change feed: heartbeat not sent");
            }
            tokio::select! {
                _ = tokio::time::sleep(changes::HEARTBEAT) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Listens on `channel` until it breaks or goes silent, telling `sink`; returns to be
    /// started again (or when `stop` changes, with `true`).
    async fn listen(
        &self,
        channel: &str,
        sink: &dyn changes::ChangeSink,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> std::result::Result<bool, String> {
        // A connection of its own, named so that an operator (or a test) can find it.
        let options = (*self.pool.connect_options())
            .clone()
            .application_name(&format!("tollgate changes {}", std::process::id()));
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        let mut listener = PgListener::connect_with(&pool)
            .await
            .map_err(|e| e.to_string())?;
        // Each error is final for this listener: a new one is made, never one half reconnected.
        listener.ignore_pool_close_event(true);
        listener.listen(channel).await.map_err(|e| e.to_string())?;
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(changes::SILENCE, listener.try_recv()) => next,
                _ = stop.changed() => return Ok(true),
            };
            match next {
                Ok(Ok(Some(notification))) => {
                    sink.heard();
                    if let Some(change) = changes::Change::parse(notification.payload()) {
                        sink.changed(change);
                    }
                }
                Ok(Ok(None)) => return Err("the connection was lost".to_owned()),
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err(format!("nothing heard for {:?}", changes::SILENCE)),
            }
        }
    }
}

#[async_trait]
impl Engine for PostgresEngine {
    type Db = Postgres;

    const SHARED: bool = true;
    const BEGIN_WRITE: &'static str = "BEGIN";
    const BEGIN_SNAPSHOT: &'static str = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY";
    // Claimers of several instances take disjoint rows without waiting for each other.
    const SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";
    const FOR_UPDATE: &'static str = " FOR UPDATE";
    // Group-commit writers of one instance: batches written side by side, each on a connection
    // of the pool (see `group_commit.rs`). Two: while one commits, the other fills its batch.
    // More writers make smaller batches, which queue on a busy account's row lock one commit each
    // (bench/run, three instances on one account: 4 writers 3,802 writes/s, 2 writers 5,563).
    const CREATE_WRITERS: usize = 2;

    fn readers(&self) -> &PgPool {
        &self.pool
    }

    fn writers(&self) -> &PgPool {
        &self.pool
    }

    async fn follow_changes(
        &self,
        sink: std::sync::Arc<dyn changes::ChangeSink>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut heartbeat = None;
        loop {
            let outcome = match sqlx::query_scalar::<_, String>(CHANNEL)
                .fetch_one(&self.pool)
                .await
            {
                Ok(channel) => {
                    if heartbeat.is_none() {
                        heartbeat = Some(tokio::spawn(Self::beat(
                            self.pool.clone(),
                            channel.clone(),
                            stop.clone(),
                        )));
                    }
                    self.listen(&channel, &*sink, &mut stop).await
                }
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(_) => return,
                Err(cause) => {
                    sink.lost();
                    tracing::warn!(
                        cause,
                        "change feed lost: caches of keys are not used until it is back"
                    );
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(changes::HEARTBEAT) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://…`), optionally inside `schema` (created if missing), and
    /// brings the schema up to date. Instances starting together serialise their migrations.
    pub async fn connect(url: &str, schema: Option<&str>) -> Result<Self> {
        let mut options = PgConnectOptions::from_str(url)
            .map_err(|e| Error::internal(format!("database URL: {e}")))?;
        if let Some(schema) = schema {
            let admin = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(options.clone())
                .await?;
            sqlx::query(&format!(
                "CREATE SCHEMA IF NOT EXISTS \"{}\"",
                schema.replace('"', "")
            ))
            .execute(&admin)
            .await?;
            admin.close().await;
            options = options.options([("search_path", schema)]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        migrations::postgres().run(&pool).await?;
        let engine = PostgresEngine { pool };
        engine.install_change_feed().await?;
        Ok(SqlStore::new(engine))
    }

    /// Drops `schema` and everything in it (tests clean up with this).
    pub async fn drop_schema(url: &str, schema: &str) -> Result<()> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| Error::internal(format!("database URL: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        sqlx::query(&format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            schema.replace('"', "")
        ))
        .execute(&pool)
        .await?;
        pool.close().await;
        Ok(())
    }
}
