//! [`Store`] on PostgreSQL: for several `tollgate serve` instances sharing one ledger, one set
//! of keys and one queue.
//!
//! The same rules as SQLite, made safe for concurrent writers: balances change through single
//! guarded `UPDATE`s (the row lock orders concurrent charges on one account), workers claim
//! tasks with `FOR UPDATE SKIP LOCKED` (never the same task twice), and a task whose worker died
//! is taken again once its lease runs out.

use super::rows::{
    self, signed, would_overdraw, ACCOUNT_COLUMNS, ATTEMPT_COLUMNS, DELIVERY_COLUMNS, KEY_COLUMNS,
    LEDGER_COLUMNS, TASK_COLUMNS,
};
use super::*;
use crate::error::Error;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};
use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

pub(crate) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "dashboard",
        include_str!("../../migrations/postgres/0002_dashboard.sql"),
    ),
    (
        3,
        "backends_webhooks",
        include_str!("../../migrations/postgres/0003_backends_webhooks.sql"),
    ),
];

/// PostgreSQL-backed storage.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
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
        migrator.run(&pool).await?;
        Ok(PostgresStore { pool })
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

async fn ledger_entry(
    tx: &mut Transaction<'_, Postgres>,
    account_id: &str,
    delta: i64,
    balance_after: i64,
    kind: &str,
    task_id: Option<&str>,
    note: Option<&str>,
) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO ledger (account_id, delta, balance_after, kind, task_id, note, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
    )
    .bind(account_id)
    .bind(delta)
    .bind(balance_after)
    .bind(kind)
    .bind(task_id)
    .bind(note)
    .bind(to_millis(now()))
    .fetch_one(&mut **tx)
    .await?)
}

async fn refund(
    tx: &mut Transaction<'_, Postgres>,
    account_id: &str,
    task_id: &str,
    cost: i64,
    note: &str,
) -> Result<()> {
    let balance: i64 = sqlx::query_scalar(
        "UPDATE accounts SET credits = credits + $1 WHERE id = $2 RETURNING credits",
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
    .await?;
    Ok(())
}

async fn complete_idempotency(
    tx: &mut Transaction<'_, Postgres>,
    scope: &IdempotencyScope,
    response: &StoredResponse,
) -> Result<()> {
    sqlx::query("UPDATE idempotency_keys SET state = 'done', status = $1, body = $2 WHERE scope = $3 AND key = $4")
        .bind(i64::from(response.status))
        .bind(&response.body)
        .bind(&scope.scope)
        .bind(&scope.key)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Puts the task's webhook in the outbox, when it has one: called in the transaction that records
/// the task's final state.
async fn enqueue_webhook(
    tx: &mut Transaction<'_, Postgres>,
    task_id: &str,
    now: OffsetDateTime,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO webhook_deliveries (task_id, account_id, url, state, attempts, next_attempt_at, created_at) \
         SELECT id, account_id, webhook_url, 'pending', 0, $1, $1 FROM tasks \
         WHERE id = $2 AND webhook_url IS NOT NULL AND purged = 0 \
         ON CONFLICT (task_id) DO NOTHING",
    )
    .bind(to_millis(now))
    .bind(task_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl Store for PostgresStore {
    fn is_shared(&self) -> bool {
        true
    }

    async fn probe_write(&self) -> Result<()> {
        sqlx::query(
            "INSERT INTO settings (name, value) VALUES ('ready_probe', $1) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(to_millis(now()).to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn admin_token_hash(&self) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE name = 'admin_token_hash'")
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn set_admin_token_hash(&self, hash: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO settings (name, value) VALUES ('admin_token_hash', $1) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(hash)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn create_account(&self, account: &NewAccount, key: &KeyRecord) -> Result<AccountRecord> {
        let mut tx = self.pool.begin().await?;
        let credits = signed(account.credits)?;
        sqlx::query("INSERT INTO accounts (id, name, credits, rpm, burst, created_at, webhook_secret) VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(&account.id)
            .bind(&account.name)
            .bind(credits)
            .bind(account.rate_limit.map(|r| i64::from(r.requests_per_minute)))
            .bind(account.rate_limit.map(|r| i64::from(r.burst)))
            .bind(to_millis(account.created_at))
            .bind(&account.webhook_secret)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO api_keys (id, account_id, key_hash, prefix, created_at) VALUES ($1, $2, $3, $4, $5)")
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
        let row = sqlx::query(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(rows::account).transpose()
    }

    async fn list_accounts(&self) -> Result<Vec<AccountRecord>> {
        let found = sqlx::query(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        found.iter().map(rows::account).collect()
    }

    async fn update_account(
        &self,
        id: &str,
        name: Option<&str>,
        rate_limit: Option<RateLimit>,
    ) -> Result<Option<AccountRecord>> {
        let row = sqlx::query(&format!(
            "UPDATE accounts SET name = COALESCE($1, name), rpm = COALESCE($2, rpm), burst = COALESCE($3, burst) \
             WHERE id = $4 RETURNING {ACCOUNT_COLUMNS}"
        ))
        .bind(name)
        .bind(rate_limit.map(|r| i64::from(r.requests_per_minute)))
        .bind(rate_limit.map(|r| i64::from(r.burst)))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(rows::account).transpose()
    }

    async fn add_credits(
        &self,
        id: &str,
        amount: i64,
        note: Option<&str>,
    ) -> Result<Option<AccountRecord>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE accounts SET credits = credits + $1 WHERE id = $2 AND credits + $1 >= 0 RETURNING {ACCOUNT_COLUMNS}"
        ))
        .bind(amount)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            let current: Option<i64> =
                sqlx::query_scalar("SELECT credits FROM accounts WHERE id = $1")
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
        let entry = ledger_entry(
            &mut tx,
            id,
            amount,
            signed(account.credits)?,
            kind,
            None,
            note,
        )
        .await?;
        if let Err(e) = tx.commit().await {
            // As in `create_task`: a lost answer to COMMIT is settled by asking whether the
            // ledger entry, whose id is known, is there.
            let committed: Option<i64> = sqlx::query_scalar("SELECT id FROM ledger WHERE id = $1")
                .bind(entry)
                .fetch_optional(&self.pool)
                .await
                .ok()
                .flatten();
            if committed.is_none() {
                return Err(e.into());
            }
        }
        Ok(Some(account))
    }

    async fn create_key(&self, key: &KeyRecord) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO api_keys (id, account_id, key_hash, prefix, created_at) \
             SELECT $1, id, $3, $4, $5 FROM accounts WHERE id = $2",
        )
        .bind(&key.id)
        .bind(&key.account_id)
        .bind(&key.key_hash)
        .bind(&key.prefix)
        .bind(to_millis(key.created_at))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn revoke_key(&self, key_id: &str) -> Result<bool> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(to_millis(now()))
                .bind(key_id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn list_keys(&self, account_id: &str) -> Result<Vec<KeyRecord>> {
        let found = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE account_id = $1 ORDER BY created_at, id"
        ))
        .bind(account_id)
        .fetch_all(&self.pool)
        .await?;
        found.iter().map(rows::key).collect()
    }

    async fn authenticate(&self, key_hash: &str) -> Result<Option<KeyAuth>> {
        let row = sqlx::query(
            "SELECT k.id AS key_id, k.account_id, a.rpm, a.burst FROM api_keys k \
             JOIN accounts a ON a.id = k.account_id WHERE k.key_hash = $1 AND k.revoked_at IS NULL",
        )
        .bind(key_hash)
        .fetch_optional(&self.pool)
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
        let cost = signed(task.cost)?;
        let mut tx = self.pool.begin().await?;
        // The guarded decrement takes the account's row lock: concurrent charges on one account
        // queue behind each other and each re-checks the balance it finds.
        let balance: Option<i64> = sqlx::query_scalar(
            "UPDATE accounts SET credits = credits - $1 WHERE id = $2 AND credits >= $1 RETURNING credits",
        )
        .bind(cost)
        .bind(&task.account_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(balance) = balance else {
            let current: Option<i64> =
                sqlx::query_scalar("SELECT credits FROM accounts WHERE id = $1")
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
            "INSERT INTO tasks (id, account_id, status, prompt, n, size, seed, cost, created_at, webhook_url) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
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
        if let Err(e) = tx.commit().await {
            // A COMMIT whose answer was lost (the connection broke) may have committed all the
            // same. The task's id is ours, so ask on another connection: a task that is there
            // was accepted and must be answered 202, or its retry would find a charge it never
            // heard of.
            return match self.get_task(&task.id).await {
                Ok(Some(_)) => Ok(task.clone()),
                _ => Err(e.into()),
            };
        }
        Ok(task.clone())
    }

    async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>> {
        let row = sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
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
                    sqlx::query_scalar("SELECT seq FROM tasks WHERE id = $1 AND account_id = $2")
                        .bind(after)
                        .bind(account_id)
                        .fetch_optional(&self.pool)
                        .await?;
                match seq {
                    Some(seq) => seq,
                    None => return Ok(None),
                }
            }
        };
        let found = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE account_id = $1 AND seq < $2 AND purged = 0 AND created_at > $3 \
             ORDER BY seq DESC LIMIT $4"
        ))
        .bind(account_id)
        .bind(before_seq)
        .bind(to_millis(not_before))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        found
            .iter()
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
        let mut tx = self.pool.begin().await?;
        let canceled = sqlx::query(&format!(
            "UPDATE tasks SET status = 'canceled', completed_at = $1 WHERE id = $2 AND account_id = $3 \
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
            "SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1 AND account_id = $2"
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
        for pick in [
            "SELECT seq FROM tasks WHERE status = 'queued' AND purged = 0 ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED",
            "SELECT seq FROM tasks WHERE status = 'running' AND lease_until < $1 AND purged = 0 \
             ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED",
        ] {
            let row = sqlx::query(&format!(
                "UPDATE tasks SET status = 'running', started_at = $1, lease_until = $2, claim = $3, runs = runs + 1 \
                 WHERE seq = ({pick}) RETURNING {TASK_COLUMNS}"
            ))
            .bind(to_millis(now))
            .bind(to_millis(lease_until))
            .bind(claim)
            .fetch_optional(&self.pool)
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
            "UPDATE tasks SET lease_until = $1 WHERE id = $2 AND status = 'running' AND claim = $3",
        )
        .bind(to_millis(lease_until))
        .bind(id)
        .bind(claim)
        .execute(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "UPDATE tasks SET status = $1, completed_at = $2, error_code = $3, error_message = $4, lease_until = NULL \
             WHERE id = $5 AND status = 'running' AND claim = $6 AND purged = 0 RETURNING account_id, cost",
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
            let purged: Option<i64> = sqlx::query_scalar("SELECT purged FROM tasks WHERE id = $1")
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
             runs = runs - 1 WHERE id = $1 AND claim = $2 AND status = 'running'",
        )
        .bind(id)
        .bind(claim)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn requeue_running(&self) -> Result<u64> {
        // Other instances may be running these tasks right now: leases decide, not a restart.
        Ok(0)
    }

    async fn queue_depth(&self) -> Result<u64> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE status = 'queued' AND purged = 0")
                .fetch_one(&self.pool)
                .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn expired_tasks(&self, cutoff: OffsetDateTime, limit: u32) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT id FROM tasks WHERE purged = 0 AND created_at <= $1 ORDER BY created_at LIMIT $2")
            .bind(to_millis(cutoff))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?)
    }

    async fn mark_purged(&self, ids: &[String]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let now = to_millis(now());
        for id in ids {
            let queued = sqlx::query(
                "UPDATE tasks SET status = 'canceled', completed_at = $1, error_code = 'expired', \
                 error_message = 'The task expired before it could run.' WHERE id = $2 AND status = 'queued' \
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
                sqlx::query(&format!("DELETE FROM {table} WHERE task_id = $1"))
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(
                "UPDATE tasks SET purged = 1, prompt = '', webhook_url = NULL WHERE id = $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn webhook_secret(&self, account_id: &str, candidate: &str) -> Result<Option<String>> {
        // COALESCE under the row lock: of concurrent first uses, the first one's candidate stays.
        Ok(sqlx::query_scalar(
            "UPDATE accounts SET webhook_secret = COALESCE(webhook_secret, $1) WHERE id = $2 \
             RETURNING webhook_secret",
        )
        .bind(candidate)
        .bind(account_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn set_webhook_secret(&self, account_id: &str, secret: &str) -> Result<bool> {
        let done = sqlx::query("UPDATE accounts SET webhook_secret = $1 WHERE id = $2")
            .bind(secret)
            .bind(account_id)
            .execute(&self.pool)
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
        // SKIP LOCKED: senders of several instances take disjoint batches without waiting.
        let found = sqlx::query(&format!(
            "UPDATE webhook_deliveries SET claim = $1, next_attempt_at = $2 WHERE task_id IN \
             (SELECT task_id FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_at <= $3 \
              ORDER BY next_attempt_at LIMIT $4 FOR UPDATE SKIP LOCKED) RETURNING {DELIVERY_COLUMNS}"
        ))
        .bind(claim)
        .bind(to_millis(lease_until))
        .bind(to_millis(now))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE webhook_deliveries SET state = $1, attempts = $2, next_attempt_at = $3, delivered_at = $4, \
             claim = NULL WHERE task_id = $5 AND claim = $6 AND state = 'pending' AND attempts = $2 - 1",
        )
        .bind(state)
        .bind(number)
        .bind(next_at)
        .bind(delivered_at)
        .bind(task_id)
        .bind(claim)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(&format!(
            "INSERT INTO webhook_attempts ({ATTEMPT_COLUMNS}) VALUES ($1, $2, $3, $4, $5)"
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
        // One snapshot for both reads, so the attempts match the delivery's count.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let deliveries = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE task_id = ANY($1)"
        ))
        .bind(task_ids)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(rows::delivery)
        .collect::<Result<Vec<_>>>()?;
        let attempts = sqlx::query(&format!(
            "SELECT {ATTEMPT_COLUMNS} FROM webhook_attempts WHERE task_id = ANY($1) ORDER BY task_id, number"
        ))
        .bind(task_ids)
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
        let found = sqlx::query(&format!(
            "SELECT {LEDGER_COLUMNS} FROM ledger WHERE account_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
        ))
        .bind(account_id)
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        found.iter().map(rows::ledger).collect()
    }

    async fn idempotency_begin(
        &self,
        scope: &IdempotencyScope,
        now: OffsetDateTime,
        stale_before: OffsetDateTime,
    ) -> Result<IdempotencyBegin> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (scope, key, fingerprint, state, created_at, locked_at) \
             VALUES ($1, $2, $3, 'running', $4, $4) ON CONFLICT (scope, key) DO NOTHING",
        )
        .bind(&scope.scope)
        .bind(&scope.key)
        .bind(&scope.fingerprint)
        .bind(to_millis(now))
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 1 {
            tx.commit().await?;
            return Ok(IdempotencyBegin::Started);
        }
        let row = sqlx::query(
            "SELECT fingerprint, state, status, body, locked_at FROM idempotency_keys \
             WHERE scope = $1 AND key = $2 FOR UPDATE",
        )
        .bind(&scope.scope)
        .bind(&scope.key)
        .fetch_one(&mut *tx)
        .await?;
        let fingerprint: String = row.try_get("fingerprint")?;
        let state: String = row.try_get("state")?;
        let outcome = if fingerprint != scope.fingerprint {
            IdempotencyBegin::Mismatch
        } else if state == "done" {
            let status: i64 = row.try_get("status")?;
            IdempotencyBegin::Replay(StoredResponse {
                status: u16::try_from(status).map_err(Error::internal)?,
                body: row.try_get("body")?,
            })
        } else if row.try_get::<i64, _>("locked_at")? < to_millis(stale_before) {
            sqlx::query("UPDATE idempotency_keys SET locked_at = $1 WHERE scope = $2 AND key = $3")
                .bind(to_millis(now))
                .bind(&scope.scope)
                .bind(&scope.key)
                .execute(&mut *tx)
                .await?;
            IdempotencyBegin::Started
        } else {
            IdempotencyBegin::InUse
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn idempotency_complete(
        &self,
        scope: &IdempotencyScope,
        response: &StoredResponse,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        complete_idempotency(&mut tx, scope, response).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn idempotency_release(&self, scope: &IdempotencyScope) -> Result<()> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND state = 'running'",
        )
        .bind(&scope.scope)
        .bind(&scope.key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn idempotency_purge(&self, cutoff: OffsetDateTime) -> Result<u64> {
        let done = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
            .bind(to_millis(cutoff))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn create_voucher(&self, voucher: &VoucherRecord) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO vouchers ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, NULL)",
            rows::VOUCHER_COLUMNS
        ))
        .bind(&voucher.id)
        .bind(&voucher.code_hash)
        .bind(&voucher.prefix)
        .bind(signed(voucher.credits)?)
        .bind(&voucher.note)
        .bind(to_millis(voucher.created_at))
        .bind(voucher.expires_at.map(to_millis))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn redeem_voucher(
        &self,
        code_hash: &str,
        account_id: &str,
        now: OffsetDateTime,
    ) -> Result<RedeemOutcome> {
        let mut tx = self.pool.begin().await?;
        // The guarded update is the whole of the single-use rule. Concurrent redemptions of one
        // code queue on its row lock; each re-checks `redeemed_at IS NULL` after the one before
        // it commits, so exactly one marks it.
        let marked = sqlx::query(&format!(
            "UPDATE vouchers SET redeemed_at = $1, redeemed_by = $2 \
             WHERE code_hash = $3 AND redeemed_at IS NULL AND (expires_at IS NULL OR expires_at > $1) \
             AND EXISTS (SELECT 1 FROM accounts WHERE id = $2) RETURNING {}",
            rows::VOUCHER_COLUMNS
        ))
        .bind(to_millis(now))
        .bind(account_id)
        .bind(code_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(marked) = marked else {
            let existing = sqlx::query(&format!(
                "SELECT {} FROM vouchers WHERE code_hash = $1",
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
            "UPDATE accounts SET credits = credits + $1 WHERE id = $2 RETURNING {}",
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
            "SELECT {} FROM vouchers ORDER BY created_at DESC, id DESC LIMIT $1",
            rows::VOUCHER_COLUMNS
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::voucher).collect()
    }

    async fn create_session(&self, session: &SessionRecord) -> Result<()> {
        let (kind, account_id, key_id, admin_token_hash) =
            rows::session_columns(&session.principal);
        sqlx::query(&format!(
            "INSERT INTO dashboard_sessions ({}) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            rows::SESSION_COLUMNS
        ))
        .bind(&session.token_hash)
        .bind(kind)
        .bind(account_id)
        .bind(key_id)
        .bind(admin_token_hash)
        .bind(to_millis(session.created_at))
        .bind(to_millis(session.expires_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_session(
        &self,
        token_hash: &str,
        now: OffsetDateTime,
    ) -> Result<Option<SessionRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {} FROM dashboard_sessions s WHERE token_hash = $1 AND expires_at > $2 \
             AND (key_id IS NULL OR EXISTS \
                  (SELECT 1 FROM api_keys k WHERE k.id = s.key_id AND k.revoked_at IS NULL))",
            rows::SESSION_COLUMNS
        ))
        .bind(token_hash)
        .bind(to_millis(now))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(rows::session).transpose()
    }

    async fn delete_session(&self, token_hash: &str) -> Result<()> {
        sqlx::query("DELETE FROM dashboard_sessions WHERE token_hash = $1")
            .bind(token_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn delete_expired_sessions(&self, now: OffsetDateTime) -> Result<u64> {
        let done = sqlx::query("DELETE FROM dashboard_sessions WHERE expires_at <= $1")
            .bind(to_millis(now))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn daily_spend(
        &self,
        account_id: &str,
        since: OffsetDateTime,
    ) -> Result<Vec<DailySpend>> {
        // SUM of BIGINT is NUMERIC in PostgreSQL: cast back, as both engines decode i64.
        let rows = sqlx::query(
            "SELECT created_at / 86400000 AS day, SUM(-delta)::BIGINT AS spent FROM ledger \
             WHERE account_id = $1 AND created_at >= $2 AND kind IN ('charge', 'refund') \
             GROUP BY day ORDER BY day",
        )
        .bind(account_id)
        .bind(to_millis(since))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::daily_spend).collect()
    }

    async fn spend_by_account(&self, since: OffsetDateTime) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT account_id, SUM(-delta)::BIGINT AS spent FROM ledger \
             WHERE created_at >= $1 AND kind IN ('charge', 'refund') GROUP BY account_id",
        )
        .bind(to_millis(since))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("account_id")?, row.try_get("spent")?)))
            .collect()
    }
}
