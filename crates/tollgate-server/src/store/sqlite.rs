//! [`Store`] on SQLite: the embedded default, one file under the data directory.
//!
//! WAL mode with `synchronous = FULL`: a commit is on disk before the call returns, so a 202 is
//! never sent for a task a crash could lose. All writes go through a pool of one connection:
//! SQLite admits one writer at a time anyway, and serialising in-process avoids `SQLITE_BUSY`
//! when a read transaction would upgrade to a write. Reads use a separate pool and run in parallel.

use super::rows::{self, signed, would_overdraw, ATTEMPT_COLUMNS, DELIVERY_COLUMNS, TASK_COLUMNS};
use super::*;
use crate::error::Error;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, SqliteConnection};
use std::borrow::Cow;
use std::path::Path;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

pub(crate) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "dashboard",
        include_str!("../../migrations/sqlite/0002_dashboard.sql"),
    ),
    (
        3,
        "backends_webhooks",
        include_str!("../../migrations/sqlite/0003_backends_webhooks.sql"),
    ),
];

/// A write transaction on the writer connection (`BEGIN IMMEDIATE` … `COMMIT`).
///
/// **The rule:** the connection goes back to the pool only after a `COMMIT` or `ROLLBACK` that
/// succeeded. After any error, and when the transaction is dropped unfinished (its request was
/// cancelled), the connection is closed instead, which rolls back whatever it still holds, and
/// the pool opens a fresh one. Why: SQLite ends a transaction by itself on some errors
/// (`SQLITE_FULL`, `SQLITE_IOERR`, `SQLITE_BUSY`), and a connection whose state is not known
/// must not carry the next request's writes: once, after a full disk, it held them in a
/// transaction that never committed while every write was answered as done (issue 16). sqlx's
/// own `Transaction` is not used here for the same reason: its count of open transactions was
/// what drifted from SQLite's, turning every later `BEGIN`/`COMMIT` into a savepoint inside that
/// dead transaction. The savepoints of [`create_batch`] are ours alone, under this rule.
pub(crate) struct WriteTx {
    conn: PoolConnection<Sqlite>,
    ended: bool,
}

impl WriteTx {
    async fn begin(pool: &SqlitePool) -> Result<WriteTx> {
        let mut tx = WriteTx {
            conn: pool.acquire().await?,
            ended: false,
        };
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *tx).await?;
        Ok(tx)
    }

    async fn commit(mut self) -> Result<()> {
        sqlx::query("COMMIT").execute(&mut *self).await?;
        self.ended = true;
        Ok(())
    }

    async fn rollback(mut self) -> Result<()> {
        sqlx::query("ROLLBACK").execute(&mut *self).await?;
        self.ended = true;
        Ok(())
    }
}

impl std::ops::Deref for WriteTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if !self.ended {
            self.conn.close_on_drop();
        }
    }
}

/// SQLite-backed storage.
#[derive(Clone)]
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
    /// Task creations go to the group-commit writer (see [`write_creates`]).
    creates: mpsc::Sender<CreateJob>,
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
    let mut tx = WriteTx::begin(pool).await?;
    // Per task: charged (its task is answered) or why not; and the charged ones with their
    // cost and the balance after their charge.
    let mut results = Vec::with_capacity(batch.len());
    let mut charged: Vec<(&CreateJob, i64, i64)> = Vec::with_capacity(batch.len());
    for job in batch {
        match charge(&mut tx, &job.task).await? {
            Ok((cost, balance)) => {
                results.push(Ok(job.task.clone()));
                charged.push((job, cost, balance));
            }
            Err(refused) => results.push(Err(refused)),
        }
    }
    if !charged.is_empty() {
        let mut tasks = sqlx::QueryBuilder::<Sqlite>::new(
            "INSERT INTO tasks (id, account_id, status, prompt, n, size, seed, cost, created_at, webhook_url) ",
        );
        tasks.push_values(&charged, |mut row, (job, cost, _)| {
            let task = &job.task;
            row.push_bind(&task.id)
                .push_bind(&task.account_id)
                .push_bind(task.status.as_str())
                .push_bind(&task.prompt)
                .push_bind(i64::from(task.n))
                .push_bind(task.size.as_str())
                .push_bind(task.seed)
                .push_bind(*cost)
                .push_bind(to_millis(task.created_at))
                .push_bind(&task.webhook_url);
        });
        tasks.build().execute(&mut *tx).await?;
        let at = to_millis(now());
        let mut ledger = sqlx::QueryBuilder::<Sqlite>::new(
            "INSERT INTO ledger (account_id, delta, balance_after, kind, task_id, note, created_at) ",
        );
        ledger.push_values(&charged, |mut row, (job, cost, balance)| {
            let task = &job.task;
            row.push_bind(&task.account_id)
                .push_bind(-*cost)
                .push_bind(*balance)
                .push_bind("charge")
                .push_bind(&task.id)
                .push_bind(None::<&str>)
                .push_bind(at);
        });
        ledger.build().execute(&mut *tx).await?;
        for (job, _, _) in &charged {
            if let Some((scope, response)) = &job.idempotency {
                complete_idempotency(&mut tx, scope, response).await?;
            }
        }
    }
    tx.commit().await?;
    Ok(results)
}

/// Task by task, each in a savepoint of one transaction (so a 402, or a task that cannot be
/// written, undoes only its own statements).
async fn create_batch(pool: &SqlitePool, batch: &[CreateJob]) -> Result<Vec<Result<TaskRecord>>> {
    let mut tx = WriteTx::begin(pool).await?;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        sqlx::query("SAVEPOINT create_task")
            .execute(&mut *tx)
            .await?;
        let idempotency = job
            .idempotency
            .as_ref()
            .map(|(scope, response)| (scope, response));
        match create_one(&mut tx, &job.task, idempotency).await {
            Ok(()) => results.push(Ok(job.task.clone())),
            Err(e) => {
                sqlx::query("ROLLBACK TO create_task")
                    .execute(&mut *tx)
                    .await?;
                results.push(Err(e));
            }
        }
        sqlx::query("RELEASE create_task").execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(results)
}

/// Charges and inserts one task inside the batch's transaction.
async fn create_one(
    tx: &mut WriteTx,
    task: &TaskRecord,
    idempotency: Option<(&IdempotencyScope, &StoredResponse)>,
) -> Result<()> {
    let (cost, balance) = charge(tx, task).await??;
    sqlx::query(
        "INSERT INTO tasks (id, account_id, status, prompt, n, size, seed, cost, created_at, webhook_url) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&task.id)
    .bind(&task.account_id)
    .bind(task.status.as_str())
    .bind(&task.prompt)
    .bind(i64::from(task.n))
    .bind(task.size.as_str())
    .bind(task.seed)
    .bind(cost)
    .bind(to_millis(task.created_at))
    .bind(&task.webhook_url)
    .execute(&mut **tx)
    .await?;
    ledger_entry(
        tx,
        &task.account_id,
        -cost,
        balance,
        "charge",
        Some(&task.id),
        None,
    )
    .await?;
    if let Some((scope, response)) = idempotency {
        complete_idempotency(tx, scope, response).await?;
    }
    Ok(())
}

/// The guarded charge of `task`: its cost and the balance after it; or, when it changed
/// nothing, why (the balance does not cover it, or there is no such account). The outer error
/// is the database's.
async fn charge(
    tx: &mut WriteTx,
    task: &TaskRecord,
) -> Result<std::result::Result<(i64, i64), Error>> {
    let cost = signed(task.cost)?;
    // The guarded decrement is the whole of the no-overdraft rule: it either takes the
    // cost from a balance that covers it, or changes nothing.
    let balance: Option<i64> = sqlx::query_scalar(
        "UPDATE accounts SET credits = credits - ?1 WHERE id = ?2 AND credits >= ?1 RETURNING credits",
    )
    .bind(cost)
    .bind(&task.account_id)
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(balance) = balance {
        return Ok(Ok((cost, balance)));
    }
    let current: Option<i64> = sqlx::query_scalar("SELECT credits FROM accounts WHERE id = ?")
        .bind(&task.account_id)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(Err(match current {
        Some(current) => Error::InsufficientCredits {
            cost: task.cost,
            balance: u64::try_from(current).unwrap_or(0),
        },
        None => Error::NotFound {
            what: "account",
            id: task.account_id.clone(),
        },
    }))
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
        let migrations: Vec<Migration> = MIGRATIONS
            .iter()
            .map(|(version, name, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*name),
                    MigrationType::Simple,
                    Cow::Borrowed(*sql),
                    false,
                )
            })
            .collect();
        let migrator = Migrator {
            migrations: Cow::Owned(migrations),
            ..Migrator::DEFAULT
        };
        migrator.run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.read_only(true))
            .await?;
        let (creates, jobs) = mpsc::channel(MAX_BATCH * 4);
        tokio::spawn(write_creates(write.clone(), jobs));
        Ok(SqliteStore {
            write,
            read,
            creates,
        })
    }
}

async fn ledger_entry(
    tx: &mut WriteTx,
    account_id: &str,
    delta: i64,
    balance_after: i64,
    kind: &str,
    task_id: Option<&str>,
    note: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO ledger (account_id, delta, balance_after, kind, task_id, note, created_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(account_id)
    .bind(delta)
    .bind(balance_after)
    .bind(kind)
    .bind(task_id)
    .bind(note)
    .bind(to_millis(now()))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn refund(
    tx: &mut WriteTx,
    account_id: &str,
    task_id: &str,
    cost: i64,
    note: &str,
) -> Result<()> {
    let balance: i64 = sqlx::query_scalar(
        "UPDATE accounts SET credits = credits + ? WHERE id = ? RETURNING credits",
    )
    .bind(cost)
    .bind(account_id)
    .fetch_one(&mut **tx)
    .await?;
    ledger_entry(
        tx,
        account_id,
        cost,
        balance,
        "refund",
        Some(task_id),
        Some(note),
    )
    .await
}

/// Puts the task's webhook in the outbox, when it has one: called in the transaction that records
/// the task's final state.
async fn enqueue_webhook(tx: &mut WriteTx, task_id: &str, now: OffsetDateTime) -> Result<()> {
    sqlx::query(
        "INSERT INTO webhook_deliveries (task_id, account_id, url, state, attempts, next_attempt_at, created_at) \
         SELECT id, account_id, webhook_url, 'pending', 0, ?1, ?1 FROM tasks \
         WHERE id = ?2 AND webhook_url IS NOT NULL AND purged = 0 \
         ON CONFLICT (task_id) DO NOTHING",
    )
    .bind(to_millis(now))
    .bind(task_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn probe_write(&self) -> Result<()> {
        let mut tx = WriteTx::begin(&self.write).await?;
        sqlx::query(
            "INSERT INTO settings (name, value) VALUES ('ready_probe', ?) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(to_millis(now()).to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    async fn admin_token_hash(&self) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE name = 'admin_token_hash'")
                .fetch_optional(&self.read)
                .await?,
        )
    }

    async fn set_admin_token_hash(&self, hash: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO settings (name, value) VALUES ('admin_token_hash', ?) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(hash)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn create_account(&self, account: &NewAccount, key: &KeyRecord) -> Result<AccountRecord> {
        let mut tx = WriteTx::begin(&self.write).await?;
        let credits = signed(account.credits)?;
        sqlx::query("INSERT INTO accounts (id, name, credits, rpm, burst, created_at, webhook_secret) VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(&account.id)
            .bind(&account.name)
            .bind(credits)
            .bind(account.rate_limit.map(|r| i64::from(r.requests_per_minute)))
            .bind(account.rate_limit.map(|r| i64::from(r.burst)))
            .bind(to_millis(account.created_at))
            .bind(&account.webhook_secret)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO api_keys (id, account_id, key_hash, prefix, created_at) VALUES (?, ?, ?, ?, ?)")
            .bind(&key.id)
            .bind(&account.id)
            .bind(&key.key_hash)
            .bind(&key.prefix)
            .bind(to_millis(key.created_at))
            .execute(&mut *tx)
            .await?;
        if credits > 0 {
            ledger_entry(
                &mut tx,
                &account.id,
                credits,
                credits,
                "grant",
                None,
                Some("opening balance"),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(AccountRecord {
            id: account.id.clone(),
            name: account.name.clone(),
            credits: account.credits,
            rate_limit: account.rate_limit,
            created_at: account.created_at,
        })
    }

    async fn get_account(&self, id: &str) -> Result<Option<AccountRecord>> {
        let row = sqlx::query(
            "SELECT id, name, credits, rpm, burst, created_at FROM accounts WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.read)
        .await?;
        row.as_ref().map(rows::account).transpose()
    }

    async fn list_accounts(&self) -> Result<Vec<AccountRecord>> {
        let rows = sqlx::query("SELECT id, name, credits, rpm, burst, created_at FROM accounts ORDER BY created_at, id")
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(rows::account).collect()
    }

    async fn update_account(
        &self,
        id: &str,
        name: Option<&str>,
        rate_limit: Option<RateLimit>,
    ) -> Result<Option<AccountRecord>> {
        let row = sqlx::query(
            "UPDATE accounts SET name = COALESCE(?, name), rpm = COALESCE(?, rpm), burst = COALESCE(?, burst) \
             WHERE id = ? RETURNING id, name, credits, rpm, burst, created_at",
        )
        .bind(name)
        .bind(rate_limit.map(|r| i64::from(r.requests_per_minute)))
        .bind(rate_limit.map(|r| i64::from(r.burst)))
        .bind(id)
        .fetch_optional(&self.write)
        .await?;
        row.as_ref().map(rows::account).transpose()
    }

    async fn add_credits(
        &self,
        id: &str,
        amount: i64,
        note: Option<&str>,
    ) -> Result<Option<AccountRecord>> {
        let mut tx = WriteTx::begin(&self.write).await?;
        let row = sqlx::query(
            "UPDATE accounts SET credits = credits + ?1 WHERE id = ?2 AND credits + ?1 >= 0 \
             RETURNING id, name, credits, rpm, burst, created_at",
        )
        .bind(amount)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            let current: Option<i64> =
                sqlx::query_scalar("SELECT credits FROM accounts WHERE id = ?")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            return match current {
                None => Ok(None),
                Some(current) => Err(would_overdraw(amount, current)),
            };
        };
        let account = rows::account(&row)?;
        let kind = if amount >= 0 { "grant" } else { "adjust" };
        ledger_entry(
            &mut tx,
            id,
            amount,
            signed(account.credits)?,
            kind,
            None,
            note,
        )
        .await?;
        tx.commit().await?;
        Ok(Some(account))
    }

    async fn create_key(&self, key: &KeyRecord) -> Result<bool> {
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM accounts WHERE id = ?")
            .bind(&key.account_id)
            .fetch_optional(&self.write)
            .await?;
        if exists.is_none() {
            return Ok(false);
        }
        sqlx::query("INSERT INTO api_keys (id, account_id, key_hash, prefix, created_at) VALUES (?, ?, ?, ?, ?)")
            .bind(&key.id)
            .bind(&key.account_id)
            .bind(&key.key_hash)
            .bind(&key.prefix)
            .bind(to_millis(key.created_at))
            .execute(&self.write)
            .await?;
        Ok(true)
    }

    async fn revoke_key(&self, key_id: &str) -> Result<bool> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                .bind(to_millis(now()))
                .bind(key_id)
                .execute(&self.write)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn list_keys(&self, account_id: &str) -> Result<Vec<KeyRecord>> {
        let rows = sqlx::query(
            "SELECT id, account_id, key_hash, prefix, created_at, revoked_at FROM api_keys \
             WHERE account_id = ? ORDER BY created_at, id",
        )
        .bind(account_id)
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(rows::key).collect()
    }

    async fn authenticate(&self, key_hash: &str) -> Result<Option<KeyAuth>> {
        let row = sqlx::query(
            "SELECT k.id AS key_id, k.account_id, a.rpm, a.burst FROM api_keys k \
             JOIN accounts a ON a.id = k.account_id WHERE k.key_hash = ? AND k.revoked_at IS NULL",
        )
        .bind(key_hash)
        .fetch_optional(&self.read)
        .await?;
        row.map(|row| {
            Ok(KeyAuth {
                key_id: row.try_get("key_id")?,
                account_id: row.try_get("account_id")?,
                rate_limit: rows::rate_limit_of(&row)?,
            })
        })
        .transpose()
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

    async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>> {
        let row = sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(rows::task).transpose()
    }

    async fn list_tasks(
        &self,
        account_id: &str,
        limit: u32,
        after: Option<&str>,
        not_before: OffsetDateTime,
    ) -> Result<Option<Vec<TaskRecord>>> {
        let before_seq = match after {
            None => i64::MAX,
            Some(after) => {
                let seq: Option<i64> =
                    sqlx::query_scalar("SELECT seq FROM tasks WHERE id = ? AND account_id = ?")
                        .bind(after)
                        .bind(account_id)
                        .fetch_optional(&self.read)
                        .await?;
                match seq {
                    Some(seq) => seq,
                    None => return Ok(None),
                }
            }
        };
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE account_id = ? AND seq < ? AND purged = 0 AND created_at > ? \
             ORDER BY seq DESC LIMIT ?"
        ))
        .bind(account_id)
        .bind(before_seq)
        .bind(to_millis(not_before))
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(rows::task)
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    async fn cancel_task(
        &self,
        account_id: &str,
        id: &str,
        now: OffsetDateTime,
    ) -> Result<CancelOutcome> {
        let mut tx = WriteTx::begin(&self.write).await?;
        let canceled = sqlx::query(&format!(
            "UPDATE tasks SET status = 'canceled', completed_at = ? WHERE id = ? AND account_id = ? \
             AND status = 'queued' RETURNING {TASK_COLUMNS}"
        ))
        .bind(to_millis(now))
        .bind(id)
        .bind(account_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = canceled {
            let task = rows::task(&row)?;
            refund(
                &mut tx,
                account_id,
                id,
                signed(task.cost)?,
                "canceled before it ran",
            )
            .await?;
            enqueue_webhook(&mut tx, id, now).await?;
            tx.commit().await?;
            return Ok(CancelOutcome::Canceled(task));
        }
        let row = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE id = ? AND account_id = ?"
        ))
        .bind(id)
        .bind(account_id)
        .fetch_optional(&mut *tx)
        .await?;
        Ok(match row.as_ref().map(rows::task).transpose()? {
            None => CancelOutcome::NotFound,
            Some(task) if task.status == TaskStatus::Canceled => {
                CancelOutcome::AlreadyCanceled(task)
            }
            Some(task) => CancelOutcome::NotCancelable(task),
        })
    }

    async fn claim_next_task(
        &self,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        claim: &str,
    ) -> Result<Option<TaskRecord>> {
        // The queue first (indexed), then tasks whose worker stopped renewing its lease.
        for pick in [
            "SELECT seq FROM tasks WHERE status = 'queued' AND purged = 0 ORDER BY seq LIMIT 1",
            "SELECT seq FROM tasks WHERE status = 'running' AND lease_until < ?1 AND purged = 0 ORDER BY seq LIMIT 1",
        ] {
            let row = sqlx::query(&format!(
                "UPDATE tasks SET status = 'running', started_at = ?1, lease_until = ?2, claim = ?3, runs = runs + 1 \
                 WHERE seq = ({pick}) RETURNING {TASK_COLUMNS}"
            ))
            .bind(to_millis(now))
            .bind(to_millis(lease_until))
            .bind(claim)
            .fetch_optional(&self.write)
            .await?;
            if let Some(row) = row {
                return rows::task(&row).map(Some);
            }
        }
        Ok(None)
    }

    async fn renew_lease(
        &self,
        id: &str,
        claim: &str,
        lease_until: OffsetDateTime,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tasks SET lease_until = ? WHERE id = ? AND status = 'running' AND claim = ?",
        )
        .bind(to_millis(lease_until))
        .bind(id)
        .bind(claim)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn finish_task(
        &self,
        id: &str,
        claim: &str,
        outcome: &TaskOutcome,
        now: OffsetDateTime,
    ) -> Result<FinishOutcome> {
        let (status, code, message) = match outcome {
            TaskOutcome::Succeeded => (TaskStatus::Succeeded, None, None),
            TaskOutcome::Failed { code, message } => (
                TaskStatus::Failed,
                Some(code.as_str()),
                Some(message.as_str()),
            ),
        };
        let mut tx = WriteTx::begin(&self.write).await?;
        let row = sqlx::query(
            "UPDATE tasks SET status = ?, completed_at = ?, error_code = ?, error_message = ?, lease_until = NULL \
             WHERE id = ? AND status = 'running' AND claim = ? AND purged = 0 RETURNING account_id, cost",
        )
        .bind(status.as_str())
        .bind(to_millis(now))
        .bind(code)
        .bind(message)
        .bind(id)
        .bind(claim)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            let purged: Option<i64> = sqlx::query_scalar("SELECT purged FROM tasks WHERE id = ?")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            return Ok(if purged == Some(1) {
                FinishOutcome::Purged
            } else {
                FinishOutcome::Lost
            });
        };
        if status == TaskStatus::Failed {
            let account_id: String = row.try_get("account_id")?;
            let cost: i64 = row.try_get("cost")?;
            refund(&mut tx, &account_id, id, cost, "task failed").await?;
        }
        enqueue_webhook(&mut tx, id, now).await?;
        tx.commit().await?;
        Ok(FinishOutcome::Finished)
    }

    async fn release_task(&self, id: &str, claim: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tasks SET status = 'queued', started_at = NULL, lease_until = NULL, claim = NULL, \
             runs = runs - 1 WHERE id = ? AND claim = ? AND status = 'running'",
        )
        .bind(id)
        .bind(claim)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn requeue_running(&self) -> Result<u64> {
        let mut tx = WriteTx::begin(&self.write).await?;
        let done = sqlx::query(
            "UPDATE tasks SET status = 'queued', started_at = NULL, lease_until = NULL, claim = NULL \
             WHERE status = 'running'",
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM idempotency_keys WHERE state = 'running'")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn queue_depth(&self) -> Result<u64> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE status = 'queued' AND purged = 0")
                .fetch_one(&self.read)
                .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn expired_tasks(&self, cutoff: OffsetDateTime, limit: u32) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM tasks WHERE purged = 0 AND created_at <= ? ORDER BY created_at LIMIT ?",
        )
        .bind(to_millis(cutoff))
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?)
    }

    async fn mark_purged(&self, ids: &[String]) -> Result<()> {
        let mut tx = WriteTx::begin(&self.write).await?;
        let now = to_millis(now());
        for id in ids {
            let queued = sqlx::query(
                "UPDATE tasks SET status = 'canceled', completed_at = ?, error_code = 'expired', \
                 error_message = 'The task expired before it could run.' WHERE id = ? AND status = 'queued' \
                 RETURNING account_id, cost",
            )
            .bind(now)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = queued {
                let account_id: String = row.try_get("account_id")?;
                refund(
                    &mut tx,
                    &account_id,
                    id,
                    row.try_get("cost")?,
                    "expired before it ran",
                )
                .await?;
            }
            for table in ["webhook_attempts", "webhook_deliveries"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE task_id = ?"))
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(
                "UPDATE tasks SET purged = 1, prompt = '', webhook_url = NULL WHERE id = ?",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn webhook_secret(&self, account_id: &str, candidate: &str) -> Result<Option<String>> {
        let current: Option<Option<String>> =
            sqlx::query_scalar("SELECT webhook_secret FROM accounts WHERE id = ?")
                .bind(account_id)
                .fetch_optional(&self.read)
                .await?;
        match current {
            None => Ok(None),
            Some(Some(secret)) => Ok(Some(secret)),
            // Made before webhooks existed: set one, unless a concurrent call just did.
            Some(None) => Ok(sqlx::query_scalar(
                "UPDATE accounts SET webhook_secret = COALESCE(webhook_secret, ?) WHERE id = ? \
                 RETURNING webhook_secret",
            )
            .bind(candidate)
            .bind(account_id)
            .fetch_optional(&self.write)
            .await?),
        }
    }

    async fn set_webhook_secret(&self, account_id: &str, secret: &str) -> Result<bool> {
        let done = sqlx::query("UPDATE accounts SET webhook_secret = ? WHERE id = ?")
            .bind(secret)
            .bind(account_id)
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn claim_webhook_deliveries(
        &self,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        claim: &str,
        limit: u32,
    ) -> Result<Vec<WebhookDeliveryRecord>> {
        // One writer at a time on SQLite: the select and the update cannot interleave with
        // another claim.
        let found = sqlx::query(&format!(
            "UPDATE webhook_deliveries SET claim = ?1, next_attempt_at = ?2 WHERE task_id IN \
             (SELECT task_id FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_at <= ?3 \
              ORDER BY next_attempt_at LIMIT ?4) RETURNING {DELIVERY_COLUMNS}"
        ))
        .bind(claim)
        .bind(to_millis(lease_until))
        .bind(to_millis(now))
        .bind(i64::from(limit))
        .fetch_all(&self.write)
        .await?;
        found.iter().map(rows::delivery).collect()
    }

    async fn record_webhook_attempt(
        &self,
        task_id: &str,
        claim: &str,
        attempt: &WebhookAttemptRecord,
        next: DeliveryNext,
    ) -> Result<bool> {
        let (state, next_at, delivered_at) = rows::next_columns(next, attempt.at);
        let number = i64::from(attempt.number);
        let mut tx = WriteTx::begin(&self.write).await?;
        let done = sqlx::query(
            "UPDATE webhook_deliveries SET state = ?, attempts = ?, next_attempt_at = ?, delivered_at = ?, \
             claim = NULL WHERE task_id = ? AND claim = ? AND state = 'pending' AND attempts = ? - 1",
        )
        .bind(state)
        .bind(number)
        .bind(next_at)
        .bind(delivered_at)
        .bind(task_id)
        .bind(claim)
        .bind(number)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(&format!(
            "INSERT INTO webhook_attempts ({ATTEMPT_COLUMNS}) VALUES (?, ?, ?, ?, ?)"
        ))
        .bind(task_id)
        .bind(number)
        .bind(to_millis(attempt.at))
        .bind(attempt.status.map(i64::from))
        .bind(&attempt.error)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn webhook_deliveries(&self, task_ids: &[String]) -> Result<Vec<WebhookDeliveryRecord>> {
        if task_ids.is_empty() {
            return Ok(Vec::new());
        }
        let marks = vec!["?"; task_ids.len()].join(", ");
        let delivery_sql =
            format!("SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE task_id IN ({marks})");
        let attempt_sql = format!(
            "SELECT {ATTEMPT_COLUMNS} FROM webhook_attempts WHERE task_id IN ({marks}) ORDER BY task_id, number"
        );
        let mut deliveries = sqlx::query(&delivery_sql);
        let mut attempts = sqlx::query(&attempt_sql);
        for id in task_ids {
            deliveries = deliveries.bind(id);
            attempts = attempts.bind(id);
        }
        // One read transaction: one snapshot (WAL), so the attempts match the delivery's count.
        let mut tx = self.read.begin().await?;
        let deliveries = deliveries
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(rows::delivery)
            .collect::<Result<Vec<_>>>()?;
        let attempts = attempts
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(rows::attempt)
            .collect::<Result<Vec<_>>>()?;
        tx.commit().await?;
        Ok(rows::with_history(deliveries, attempts))
    }

    async fn ledger(
        &self,
        account_id: &str,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<LedgerEntry>> {
        let rows = sqlx::query(
            "SELECT id, account_id, delta, balance_after, kind, task_id, note, created_at FROM ledger \
             WHERE account_id = ? AND id < ? ORDER BY id DESC LIMIT ?",
        )
        .bind(account_id)
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(rows::ledger).collect()
    }

    async fn idempotency_begin(
        &self,
        scope: &IdempotencyScope,
        now: OffsetDateTime,
        stale_before: OffsetDateTime,
    ) -> Result<IdempotencyBegin> {
        let mut tx = WriteTx::begin(&self.write).await?;
        let row = sqlx::query(
            "SELECT fingerprint, state, status, body, locked_at FROM idempotency_keys WHERE scope = ? AND key = ?",
        )
        .bind(&scope.scope)
        .bind(&scope.key)
        .fetch_optional(&mut *tx)
        .await?;
        let outcome = match row {
            None => {
                sqlx::query(
                    "INSERT INTO idempotency_keys (scope, key, fingerprint, state, created_at, locked_at) \
                     VALUES (?, ?, ?, 'running', ?, ?)",
                )
                .bind(&scope.scope)
                .bind(&scope.key)
                .bind(&scope.fingerprint)
                .bind(to_millis(now))
                .bind(to_millis(now))
                .execute(&mut *tx)
                .await?;
                IdempotencyBegin::Started
            }
            Some(row) => {
                let fingerprint: String = row.try_get("fingerprint")?;
                let state: String = row.try_get("state")?;
                if fingerprint != scope.fingerprint {
                    IdempotencyBegin::Mismatch
                } else if state == "done" {
                    let status: i64 = row.try_get("status")?;
                    IdempotencyBegin::Replay(StoredResponse {
                        status: u16::try_from(status).map_err(Error::internal)?,
                        body: row.try_get("body")?,
                    })
                } else if row.try_get::<i64, _>("locked_at")? < to_millis(stale_before) {
                    sqlx::query(
                        "UPDATE idempotency_keys SET locked_at = ? WHERE scope = ? AND key = ?",
                    )
                    .bind(to_millis(now))
                    .bind(&scope.scope)
                    .bind(&scope.key)
                    .execute(&mut *tx)
                    .await?;
                    IdempotencyBegin::Started
                } else {
                    IdempotencyBegin::InUse
                }
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn idempotency_complete(
        &self,
        scope: &IdempotencyScope,
        response: &StoredResponse,
    ) -> Result<()> {
        let mut tx = WriteTx::begin(&self.write).await?;
        complete_idempotency(&mut tx, scope, response).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn idempotency_release(&self, scope: &IdempotencyScope) -> Result<()> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE scope = ? AND key = ? AND state = 'running'",
        )
        .bind(&scope.scope)
        .bind(&scope.key)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn idempotency_purge(&self, cutoff: OffsetDateTime) -> Result<u64> {
        let done = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < ?")
            .bind(to_millis(cutoff))
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected())
    }

    async fn create_voucher(&self, voucher: &VoucherRecord) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO vouchers ({}) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
            rows::VOUCHER_COLUMNS
        ))
        .bind(&voucher.id)
        .bind(&voucher.code_hash)
        .bind(&voucher.prefix)
        .bind(signed(voucher.credits)?)
        .bind(&voucher.note)
        .bind(to_millis(voucher.created_at))
        .bind(voucher.expires_at.map(to_millis))
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn redeem_voucher(
        &self,
        code_hash: &str,
        account_id: &str,
        now: OffsetDateTime,
    ) -> Result<RedeemOutcome> {
        let mut tx = WriteTx::begin(&self.write).await?;
        // The guarded update is the whole of the single-use rule: it marks a code that is
        // unused and unexpired, or changes nothing.
        let marked = sqlx::query(&format!(
            "UPDATE vouchers SET redeemed_at = ?1, redeemed_by = ?2 \
             WHERE code_hash = ?3 AND redeemed_at IS NULL AND (expires_at IS NULL OR expires_at > ?1) \
             AND EXISTS (SELECT 1 FROM accounts WHERE id = ?2) RETURNING {}",
            rows::VOUCHER_COLUMNS
        ))
        .bind(to_millis(now))
        .bind(account_id)
        .bind(code_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(marked) = marked else {
            let existing = sqlx::query(&format!(
                "SELECT {} FROM vouchers WHERE code_hash = ?",
                rows::VOUCHER_COLUMNS
            ))
            .bind(code_hash)
            .fetch_optional(&mut *tx)
            .await?;
            tx.rollback().await?;
            let existing = existing.as_ref().map(rows::voucher).transpose()?;
            return Ok(rows::refused_redemption(existing, now));
        };
        let voucher = rows::voucher(&marked)?;
        let credits = signed(voucher.credits)?;
        let row = sqlx::query(&format!(
            "UPDATE accounts SET credits = credits + ? WHERE id = ? RETURNING {}",
            rows::ACCOUNT_COLUMNS
        ))
        .bind(credits)
        .bind(account_id)
        .fetch_one(&mut *tx)
        .await?;
        let account = rows::account(&row)?;
        let note = rows::voucher_note(&voucher);
        ledger_entry(
            &mut tx,
            account_id,
            credits,
            signed(account.credits)?,
            "voucher",
            None,
            Some(&note),
        )
        .await?;
        tx.commit().await?;
        Ok(RedeemOutcome::Redeemed { account, voucher })
    }

    async fn list_vouchers(&self, limit: u32) -> Result<Vec<VoucherRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {} FROM vouchers ORDER BY created_at DESC, id DESC LIMIT ?",
            rows::VOUCHER_COLUMNS
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(rows::voucher).collect()
    }

    async fn create_session(&self, session: &SessionRecord) -> Result<()> {
        let (kind, account_id, key_id, admin_token_hash) =
            rows::session_columns(&session.principal);
        sqlx::query(&format!(
            "INSERT INTO dashboard_sessions ({}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows::SESSION_COLUMNS
        ))
        .bind(&session.token_hash)
        .bind(kind)
        .bind(account_id)
        .bind(key_id)
        .bind(admin_token_hash)
        .bind(to_millis(session.created_at))
        .bind(to_millis(session.expires_at))
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn get_session(
        &self,
        token_hash: &str,
        now: OffsetDateTime,
    ) -> Result<Option<SessionRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {} FROM dashboard_sessions s WHERE token_hash = ? AND expires_at > ? \
             AND (key_id IS NULL OR EXISTS \
                  (SELECT 1 FROM api_keys k WHERE k.id = s.key_id AND k.revoked_at IS NULL))",
            rows::SESSION_COLUMNS
        ))
        .bind(token_hash)
        .bind(to_millis(now))
        .fetch_optional(&self.read)
        .await?;
        row.as_ref().map(rows::session).transpose()
    }

    async fn delete_session(&self, token_hash: &str) -> Result<()> {
        sqlx::query("DELETE FROM dashboard_sessions WHERE token_hash = ?")
            .bind(token_hash)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    async fn delete_expired_sessions(&self, now: OffsetDateTime) -> Result<u64> {
        let done = sqlx::query("DELETE FROM dashboard_sessions WHERE expires_at <= ?")
            .bind(to_millis(now))
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected())
    }

    async fn daily_spend(
        &self,
        account_id: &str,
        since: OffsetDateTime,
    ) -> Result<Vec<DailySpend>> {
        let rows = sqlx::query(
            "SELECT created_at / 86400000 AS day, SUM(-delta) AS spent FROM ledger \
             WHERE account_id = ? AND created_at >= ? AND kind IN ('charge', 'refund') \
             GROUP BY day ORDER BY day",
        )
        .bind(account_id)
        .bind(to_millis(since))
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(rows::daily_spend).collect()
    }

    async fn spend_by_account(&self, since: OffsetDateTime) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT account_id, SUM(-delta) AS spent FROM ledger \
             WHERE created_at >= ? AND kind IN ('charge', 'refund') GROUP BY account_id",
        )
        .bind(to_millis(since))
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("account_id")?, row.try_get("spent")?)))
            .collect()
    }
}

async fn complete_idempotency(
    tx: &mut WriteTx,
    scope: &IdempotencyScope,
    response: &StoredResponse,
) -> Result<()> {
    sqlx::query("UPDATE idempotency_keys SET state = 'done', status = ?, body = ? WHERE scope = ? AND key = ?")
        .bind(i64::from(response.status))
        .bind(&response.body)
        .bind(&scope.scope)
        .bind(&scope.key)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
