//! [`Store`] on PostgreSQL: for several `tollgate serve` instances sharing one ledger, one set
//! of keys and one queue.
//!
//! The same statements as SQLite (`sql.rs`), made safe for concurrent writers: balances change
//! through single guarded `UPDATE`s (the row lock orders concurrent charges on one account),
//! workers claim tasks with `FOR UPDATE SKIP LOCKED` (never the same task twice), and a task
//! whose worker died is taken again once its lease runs out. What is PostgreSQL's own is here:
//! connecting, the schema, and a task creation committed on its own.

use super::engine::{Engine, Tx};
use super::sql::{self, SqlStore};
use super::*;
use crate::error::Error;
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Postgres;
use std::str::FromStr;
use std::time::Duration;

/// PostgreSQL-backed storage.
pub type PostgresStore = SqlStore<PostgresEngine>;

/// PostgreSQL's connections: one pool for reads and writes.
pub struct PostgresEngine {
    pool: PgPool,
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

    fn readers(&self) -> &PgPool {
        &self.pool
    }

    fn writers(&self) -> &PgPool {
        &self.pool
    }

    async fn create_task(
        &self,
        task: &TaskRecord,
        idempotency: Option<(&IdempotencyScope, &StoredResponse)>,
    ) -> Result<TaskRecord> {
        let mut tx = Tx::<Self>::begin(self.pool.acquire().await?, Self::BEGIN_WRITE).await?;
        if let Err(refused) = sql::create_one(&mut *tx, task, idempotency).await? {
            tx.rollback().await?;
            return Err(refused);
        }
        if let Err(e) = tx.commit().await {
            // A COMMIT whose answer was lost (the connection broke) may have committed all the
            // same. The task's id is ours, so ask on another connection: a task that is there
            // was accepted and must be answered 202, or its retry would find a charge it never
            // heard of.
            let mut conn = self.pool.acquire().await?;
            return match sql::get_task(&mut *conn, &task.id).await {
                Ok(Some(_)) => Ok(task.clone()),
                _ => Err(e),
            };
        }
        Ok(task.clone())
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
        Ok(SqlStore::new(PostgresEngine { pool }))
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
