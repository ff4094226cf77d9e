//! [`Store`] on SQLite: the embedded default, one file under the data directory.
//!
//! WAL mode with `synchronous = FULL`: a commit is on disk before the call returns, so a 202 is
//! never sent for a task a crash could lose. All writes go through a pool of one connection:
//! SQLite admits one writer at a time anyway, and serialising in-process avoids `SQLITE_BUSY`
//! when a read transaction would upgrade to a write. Reads use a separate pool and run in parallel.

use super::*;
use crate::error::Error;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use std::borrow::Cow;
use std::path::Path;
use std::time::Duration;
use tollgate_contract::ErrorCode;

const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "init",
    include_str!("../../migrations/sqlite/0001_init.sql"),
)];

const TASK_COLUMNS: &str =
    "id, account_id, status, prompt, n, size, seed, cost, created_at, started_at, \
                            completed_at, error_code, error_message, purged";

/// SQLite-backed storage.
#[derive(Clone)]
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) `tollgate.db` in `dir` and brings its schema up to date.
    pub async fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let options = SqliteConnectOptions::new()
            .filename(dir.join("tollgate.db"))
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
        Ok(SqliteStore { write, read })
    }
}

fn u64_col(row: &SqliteRow, col: &str) -> Result<u64> {
    let v: i64 = row.try_get(col)?;
    u64::try_from(v).map_err(|_| Error::internal(format!("negative {col} in storage")))
}

fn opt_time(row: &SqliteRow, col: &str) -> Result<Option<OffsetDateTime>> {
    Ok(row.try_get::<Option<i64>, _>(col)?.map(from_millis))
}

fn rate_limit_of(row: &SqliteRow) -> Result<Option<RateLimit>> {
    let rpm: Option<i64> = row.try_get("rpm")?;
    let burst: Option<i64> = row.try_get("burst")?;
    Ok(match (rpm, burst) {
        (Some(rpm), Some(burst)) => Some(RateLimit {
            requests_per_minute: u32::try_from(rpm).map_err(Error::internal)?,
            burst: u32::try_from(burst).map_err(Error::internal)?,
        }),
        _ => None,
    })
}

fn account_from_row(row: &SqliteRow) -> Result<AccountRecord> {
    Ok(AccountRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        credits: u64_col(row, "credits")?,
        rate_limit: rate_limit_of(row)?,
        created_at: from_millis(row.try_get("created_at")?),
    })
}

fn key_from_row(row: &SqliteRow) -> Result<KeyRecord> {
    Ok(KeyRecord {
        id: row.try_get("id")?,
        account_id: row.try_get("account_id")?,
        key_hash: row.try_get("key_hash")?,
        prefix: row.try_get("prefix")?,
        created_at: from_millis(row.try_get("created_at")?),
        revoked_at: opt_time(row, "revoked_at")?,
    })
}

fn task_from_row(row: &SqliteRow) -> Result<TaskRecord> {
    let status: String = row.try_get("status")?;
    let size: String = row.try_get("size")?;
    let n: i64 = row.try_get("n")?;
    Ok(TaskRecord {
        id: row.try_get("id")?,
        account_id: row.try_get("account_id")?,
        status: status.parse().map_err(Error::internal)?,
        prompt: row.try_get("prompt")?,
        n: u8::try_from(n).map_err(Error::internal)?,
        size: size.parse().map_err(Error::internal)?,
        seed: row.try_get("seed")?,
        cost: u64_col(row, "cost")?,
        created_at: from_millis(row.try_get("created_at")?),
        started_at: opt_time(row, "started_at")?,
        completed_at: opt_time(row, "completed_at")?,
        error_code: row.try_get("error_code")?,
        error_message: row.try_get("error_message")?,
        purged: row.try_get::<i64, _>("purged")? != 0,
    })
}

fn ledger_from_row(row: &SqliteRow) -> Result<LedgerEntry> {
    Ok(LedgerEntry {
        id: row.try_get("id")?,
        account_id: row.try_get("account_id")?,
        delta: row.try_get("delta")?,
        balance_after: u64_col(row, "balance_after")?,
        kind: row.try_get("kind")?,
        task_id: row.try_get("task_id")?,
        note: row.try_get("note")?,
        created_at: from_millis(row.try_get("created_at")?),
    })
}

fn signed(amount: u64) -> Result<i64> {
    i64::try_from(amount).map_err(|_| Error::internal("credit amount out of range"))
}

async fn ledger_entry(
    tx: &mut Transaction<'_, Sqlite>,
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
    tx: &mut Transaction<'_, Sqlite>,
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

#[async_trait]
impl Store for SqliteStore {
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
        let mut tx = self.write.begin().await?;
        let credits = signed(account.credits)?;
        sqlx::query("INSERT INTO accounts (id, name, credits, rpm, burst, created_at) VALUES (?, ?, ?, ?, ?, ?)")
            .bind(&account.id)
            .bind(&account.name)
            .bind(credits)
            .bind(account.rate_limit.map(|r| i64::from(r.requests_per_minute)))
            .bind(account.rate_limit.map(|r| i64::from(r.burst)))
            .bind(to_millis(account.created_at))
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
        row.as_ref().map(account_from_row).transpose()
    }

    async fn list_accounts(&self) -> Result<Vec<AccountRecord>> {
        let rows = sqlx::query("SELECT id, name, credits, rpm, burst, created_at FROM accounts ORDER BY created_at, id")
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(account_from_row).collect()
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
        row.as_ref().map(account_from_row).transpose()
    }

    async fn add_credits(
        &self,
        id: &str,
        amount: i64,
        note: Option<&str>,
    ) -> Result<Option<AccountRecord>> {
        let mut tx = self.write.begin().await?;
        let Some(current) =
            sqlx::query_scalar::<_, i64>("SELECT credits FROM accounts WHERE id = ?")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
        else {
            return Ok(None);
        };
        let balance = current
            .checked_add(amount)
            .filter(|b| *b >= 0)
            .ok_or_else(|| {
                Error::invalid(
                    ErrorCode::InvalidValue,
                    "amount",
                    format!(
                        "An adjustment of {amount} would take the balance of {current} below zero."
                    ),
                )
            })?;
        sqlx::query("UPDATE accounts SET credits = ? WHERE id = ?")
            .bind(balance)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let kind = if amount >= 0 { "grant" } else { "adjust" };
        ledger_entry(&mut tx, id, amount, balance, kind, None, note).await?;
        let row = sqlx::query(
            "SELECT id, name, credits, rpm, burst, created_at FROM accounts WHERE id = ?",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        account_from_row(&row).map(Some)
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
        rows.iter().map(key_from_row).collect()
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
                rate_limit: rate_limit_of(&row)?,
            })
        })
        .transpose()
    }

    async fn create_task(
        &self,
        task: &TaskRecord,
        idempotency: Option<(&IdempotencyScope, &StoredResponse)>,
    ) -> Result<TaskRecord> {
        let cost = signed(task.cost)?;
        let mut tx = self.write.begin().await?;
        // The guarded decrement is the whole of the no-overdraft rule: it either takes the
        // cost from a balance that covers it, or changes nothing.
        let balance: Option<i64> =
            sqlx::query_scalar("UPDATE accounts SET credits = credits - ?1 WHERE id = ?2 AND credits >= ?1 RETURNING credits")
                .bind(cost)
                .bind(&task.account_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(balance) = balance else {
            let current: Option<i64> =
                sqlx::query_scalar("SELECT credits FROM accounts WHERE id = ?")
                    .bind(&task.account_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            tx.rollback().await?;
            return Err(match current {
                Some(current) => Error::InsufficientCredits {
                    cost: task.cost,
                    balance: u64::try_from(current).unwrap_or(0),
                },
                None => Error::NotFound {
                    what: "account",
                    id: task.account_id.clone(),
                },
            });
        };
        sqlx::query(
            "INSERT INTO tasks (id, account_id, status, prompt, n, size, seed, cost, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        .execute(&mut *tx)
        .await?;
        ledger_entry(
            &mut tx,
            &task.account_id,
            -cost,
            balance,
            "charge",
            Some(&task.id),
            None,
        )
        .await?;
        if let Some((scope, response)) = idempotency {
            complete_idempotency(&mut tx, scope, response).await?;
        }
        tx.commit().await?;
        Ok(task.clone())
    }

    async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>> {
        let row = sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(task_from_row).transpose()
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
            .map(task_from_row)
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    async fn cancel_task(
        &self,
        account_id: &str,
        id: &str,
        now: OffsetDateTime,
    ) -> Result<CancelOutcome> {
        let mut tx = self.write.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE id = ? AND account_id = ?"
        ))
        .bind(id)
        .bind(account_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(task) = row.as_ref().map(task_from_row).transpose()? else {
            return Ok(CancelOutcome::NotFound);
        };
        match task.status {
            TaskStatus::Canceled => return Ok(CancelOutcome::AlreadyCanceled(task)),
            TaskStatus::Queued => {}
            _ => return Ok(CancelOutcome::NotCancelable(task)),
        }
        sqlx::query("UPDATE tasks SET status = 'canceled', completed_at = ? WHERE id = ? AND status = 'queued'")
            .bind(to_millis(now))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        refund(
            &mut tx,
            account_id,
            id,
            signed(task.cost)?,
            "canceled before it ran",
        )
        .await?;
        tx.commit().await?;
        Ok(CancelOutcome::Canceled(TaskRecord {
            status: TaskStatus::Canceled,
            completed_at: Some(now),
            ..task
        }))
    }

    async fn claim_next_task(&self, now: OffsetDateTime) -> Result<Option<TaskRecord>> {
        let row = sqlx::query(&format!(
            "UPDATE tasks SET status = 'running', started_at = ? \
             WHERE seq = (SELECT seq FROM tasks WHERE status = 'queued' AND purged = 0 ORDER BY seq LIMIT 1) \
             AND status = 'queued' RETURNING {TASK_COLUMNS}"
        ))
        .bind(to_millis(now))
        .fetch_optional(&self.write)
        .await?;
        row.as_ref().map(task_from_row).transpose()
    }

    async fn finish_task(
        &self,
        id: &str,
        outcome: &TaskOutcome,
        now: OffsetDateTime,
    ) -> Result<bool> {
        let (status, code, message) = match outcome {
            TaskOutcome::Succeeded => (TaskStatus::Succeeded, None, None),
            TaskOutcome::Failed { code, message } => (
                TaskStatus::Failed,
                Some(code.as_str()),
                Some(message.as_str()),
            ),
        };
        let mut tx = self.write.begin().await?;
        let row = sqlx::query(
            "UPDATE tasks SET status = ?, completed_at = ?, error_code = ?, error_message = ? \
             WHERE id = ? AND status = 'running' AND purged = 0 RETURNING account_id, cost",
        )
        .bind(status.as_str())
        .bind(to_millis(now))
        .bind(code)
        .bind(message)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        if status == TaskStatus::Failed {
            let account_id: String = row.try_get("account_id")?;
            let cost: i64 = row.try_get("cost")?;
            refund(&mut tx, &account_id, id, cost, "task failed").await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn requeue_running(&self) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE tasks SET status = 'queued', started_at = NULL WHERE status = 'running'",
        )
        .execute(&self.write)
        .await?;
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
        let mut tx = self.write.begin().await?;
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
            sqlx::query("UPDATE tasks SET purged = 1, prompt = '' WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn ledger(&self, account_id: &str, limit: u32) -> Result<Vec<LedgerEntry>> {
        let rows = sqlx::query(
            "SELECT id, account_id, delta, balance_after, kind, task_id, note, created_at FROM ledger \
             WHERE account_id = ? ORDER BY id DESC LIMIT ?",
        )
        .bind(account_id)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(ledger_from_row).collect()
    }

    async fn idempotency_begin(
        &self,
        scope: &IdempotencyScope,
        now: OffsetDateTime,
        stale_before: OffsetDateTime,
    ) -> Result<IdempotencyBegin> {
        let mut tx = self.write.begin().await?;
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
        let mut tx = self.write.begin().await?;
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
}

async fn complete_idempotency(
    tx: &mut Transaction<'_, Sqlite>,
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
