//! [`Store`] on SQLite: the embedded default, one file under the data directory.
//!
//! WAL mode with `synchronous = FULL`: a commit is on disk before the call returns, so a 202 is
//! never sent for a task a crash could lose. All writes go through a pool of one connection:
//! SQLite admits one writer at a time anyway, and serialising in-process avoids `SQLITE_BUSY`
//! when a read transaction would upgrade to a write. Reads use a separate pool and run in parallel.
//!
//! The statements are `sql.rs`'s; what is SQLite's own is here: connecting, pragmas, and the
//! group commit of task creations.

use super::engine::{q, value_rows, Engine, Tx};
use super::sql::{self, charge, complete_idempotency, SqlStore, NEW_TASK_COLUMNS, NEW_TASK_WIDTH};
use super::*;
use crate::error::Error;
use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Sqlite;
use std::path::Path;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// SQLite-backed storage.
pub type SqliteStore = SqlStore<SqliteEngine>;

/// SQLite's connections: one writer, several readers, and the group-commit writer's queue.
pub struct SqliteEngine {
    write: SqlitePool,
    read: SqlitePool,
    /// Task creations go to the group-commit writer (see [`write_creates`]).
    creates: mpsc::Sender<CreateJob>,
}

#[async_trait]
impl Engine for SqliteEngine {
    type Db = Sqlite;

    const SHARED: bool = false;
    // IMMEDIATE: the write lock is taken at BEGIN, so a transaction never fails halfway on
    // upgrading a read lock.
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
    // In WAL mode a read transaction sees one snapshot from its first read on.
    const BEGIN_SNAPSHOT: &'static str = "BEGIN";
    const SKIP_LOCKED: &'static str = "";
    const FOR_UPDATE: &'static str = "";

    fn readers(&self) -> &SqlitePool {
        &self.read
    }

    fn writers(&self) -> &SqlitePool {
        &self.write
    }

    async fn create_task(
        &self,
        task: &TaskRecord,
        idempotency: Option<(&IdempotencyScope, &StoredResponse)>,
    ) -> Result<TaskRecord> {
        let (reply, answer) = oneshot::channel();
        let job = CreateJob {
            task: task.clone(),
            idempotency: idempotency.map(|(scope, response)| (scope.clone(), response.clone())),
            reply,
        };
        self.creates
            .send(job)
            .await
            .map_err(|_| Error::internal("the task writer has stopped"))?;
        answer
            .await
            .map_err(|_| Error::internal("the task writer dropped a request"))?
    }
}

impl SqliteStore {
    /// Opens (creating if needed) `tollgate.db` in `dir` and brings its schema up to date.
    pub async fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        Self::open_file(&dir.join("tollgate.db")).await
    }

    /// Opens (creating if needed) the database file at `path`.
    pub async fn open_file(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        migrations::sqlite().run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.read_only(true))
            .await?;
        let (creates, jobs) = mpsc::channel(MAX_BATCH * 4);
        tokio::spawn(write_creates(write.clone(), jobs));
        Ok(SqlStore::new(SqliteEngine {
            write,
            read,
            creates,
        }))
    }
}

/// One task creation waiting for the group-commit writer.
struct CreateJob {
    task: TaskRecord,
    idempotency: Option<(IdempotencyScope, StoredResponse)>,
    reply: oneshot::Sender<Result<TaskRecord>>,
}

/// The most creations one transaction takes.
const MAX_BATCH: usize = 256;

/// Group commit: takes every creation waiting, writes them in one transaction, commits once,
/// and only then answers them all. With `synchronous = FULL` the commit is the fsync: one per
/// batch instead of one per task, and no caller hears "accepted" before its task is on disk.
///
/// A batch is first written grouped ([`create_batch_grouped`]: a few statements for the whole
/// batch). Should that fail, it is written again task by task, each in its savepoint
/// ([`create_batch`]), so that a task that cannot be written fails alone. Nothing is answered
/// before its COMMIT; a failed batch is refused whole, each request with the batch's error (a
/// store fault stays a 503).
async fn write_creates(pool: SqlitePool, mut jobs: mpsc::Receiver<CreateJob>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let written = match create_batch_grouped(&pool, &batch).await {
            Ok(results) => Ok(results),
            // A full disk or a lost connection fails the batch as a whole: writing it again
            // task by task would meet the same fault.
            Err(e @ Error::StoreUnavailable { .. }) => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, tasks = batch.len(), "a grouped batch of task creations failed; writing them one by one");
                create_batch(&pool, &batch).await
            }
        };
        match written {
            Ok(results) => {
                for (job, result) in batch.drain(..).zip(results) {
                    let _ = job.reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, tasks = batch.len(), "a batch of task creations failed; none was accepted");
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(e.for_each_request()));
                }
            }
        }
    }
}

async fn begin(pool: &SqlitePool) -> Result<Tx<SqliteEngine>> {
    Tx::begin(pool.acquire().await?, SqliteEngine::BEGIN_WRITE).await
}

/// The batch in a handful of statements, whatever its size: the guarded charge of each task
/// (one `UPDATE … RETURNING` each: it decides the 402s and gives each ledger entry its balance,
/// in order, also when one account has several tasks in the batch), then one multi-row `INSERT`
/// of the charged tasks and one of their ledger entries, and the idempotency records. Why: on
/// SQLite every statement is a round trip to sqlx's connection thread, and the task-by-task
/// writer's six per task took more of the core than SQLite's own work (bench/README.md).
/// A refused charge changes nothing, so no savepoint is needed; any error fails the whole
/// transaction, and [`write_creates`] writes the batch again task by task.
async fn create_batch_grouped(
    pool: &SqlitePool,
    batch: &[CreateJob],
) -> Result<Vec<Result<TaskRecord>>> {
    let mut tx = begin(pool).await?;
    // Per task: charged (its task is answered) or why not; and the charged ones with their
    // cost and the balance after their charge.
    let mut results = Vec::with_capacity(batch.len());
    let mut charged: Vec<(&CreateJob, i64, i64)> = Vec::with_capacity(batch.len());
    for job in batch {
        match charge(&mut *tx, &job.task).await? {
            Ok((cost, balance)) => {
                results.push(Ok(job.task.clone()));
                charged.push((job, cost, balance));
            }
            Err(refused) => results.push(Err(refused)),
        }
    }
    if !charged.is_empty() {
        let mut tasks = q(format!(
            "INSERT INTO tasks ({NEW_TASK_COLUMNS}) VALUES {}",
            value_rows(charged.len(), NEW_TASK_WIDTH)
        ));
        for (job, cost, _) in &charged {
            tasks = sql::task_values(tasks, &job.task, *cost);
        }
        tasks.execute(&mut *tx).await?;
        let mut ledger = q(format!(
            "INSERT INTO ledger (account_id, delta, balance_after, kind, task_id, created_at) VALUES {}",
            value_rows(charged.len(), 6)
        ));
        for (job, cost, balance) in &charged {
            let task = &job.task;
            ledger = ledger
                .bind(&task.account_id)
                .bind(-*cost)
                .bind(*balance)
                .bind("charge")
                .bind(&task.id)
                .bind(to_millis(task.created_at));
        }
        ledger.execute(&mut *tx).await?;
        for (job, _, _) in &charged {
            if let Some((scope, response)) = &job.idempotency {
                complete_idempotency(&mut *tx, scope, response).await?;
            }
        }
    }
    tx.commit().await?;
    Ok(results)
}

/// Task by task, each in a savepoint of one transaction (so a 402, or a task that cannot be
/// written, undoes only its own statements).
async fn create_batch(pool: &SqlitePool, batch: &[CreateJob]) -> Result<Vec<Result<TaskRecord>>> {
    let mut tx = begin(pool).await?;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        q("SAVEPOINT create_task").execute(&mut *tx).await?;
        let idempotency = job
            .idempotency
            .as_ref()
            .map(|(scope, response)| (scope, response));
        let created = match sql::create_one(&mut *tx, &job.task, idempotency).await {
            Ok(Ok(())) => Ok(job.task.clone()),
            Ok(Err(refused)) => Err(refused),
            Err(e) => Err(e),
        };
        if created.is_err() {
            q("ROLLBACK TO create_task").execute(&mut *tx).await?;
        }
        q("RELEASE create_task").execute(&mut *tx).await?;
        results.push(created);
    }
    tx.commit().await?;
    Ok(results)
}
