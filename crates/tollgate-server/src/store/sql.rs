//! [`Store`] in SQL, once for both engines.
//!
//! Every statement is here, written in the SQL that SQLite and PostgreSQL share. What differs
//! between the engines is behind [`Engine`]: where connections come from (SQLite's one writer
//! and its readers; PostgreSQL's pool), how a transaction begins, the row locks of a claim
//! (`FOR UPDATE SKIP LOCKED`, which SQLite, with its one writer, needs not), and how a task
//! creation is committed (SQLite's group commit in `sqlite.rs`).

use super::engine::{placeholders, q, value_rows, Conn, ConnOf, Engine, Pooled, Stmt, Tx};
use super::group_commit::GroupCommit;
use super::money;
use super::rows::{
    self, account_columns, account_event_columns, attempt_columns, delivery_columns, key_columns,
    ledger_columns, out_of_range, purchase_columns, session_columns, signed, task_columns,
    voucher_columns, Columns,
};
use super::*;
use crate::error::Error;

/// A row of engine `E`.
pub(crate) type Row<E> = <ConnOf<E> as Conn>::Row;

/// The [`Store`] on an SQL engine.
pub struct SqlStore<E: Engine> {
    engine: E,
    /// Task creations go to the group commit's writers (`group_commit.rs`).
    creates: GroupCommit,
}

impl<E: Engine> SqlStore<E> {
    pub(crate) fn new(engine: E) -> Self {
        let creates = GroupCommit::spawn::<E>(engine.writers().clone(), E::CREATE_WRITERS);
        SqlStore { engine, creates }
    }

    async fn reader(&self) -> Result<Pooled<E>> {
        Ok(self.engine.readers().acquire().await?)
    }

    async fn writer(&self) -> Result<Pooled<E>> {
        Ok(self.engine.writers().acquire().await?)
    }

    async fn read_row(&self, stmt: Stmt<'_>) -> Result<Option<Row<E>>> {
        stmt.fetch_optional(&mut *self.reader().await?).await
    }

    async fn read_rows(&self, stmt: Stmt<'_>) -> Result<Vec<Row<E>>> {
        stmt.fetch_all(&mut *self.reader().await?).await
    }

    async fn write(&self, stmt: Stmt<'_>) -> Result<u64> {
        stmt.execute(&mut *self.writer().await?).await
    }

    async fn write_row(&self, stmt: Stmt<'_>) -> Result<Option<Row<E>>> {
        stmt.fetch_optional(&mut *self.writer().await?).await
    }

    async fn write_rows(&self, stmt: Stmt<'_>) -> Result<Vec<Row<E>>> {
        stmt.fetch_all(&mut *self.writer().await?).await
    }

    /// Commits a reservation made at `now`. A lost answer to COMMIT (the connection broke) may
    /// have committed all the same: settled by asking, on another connection, whether the key is
    /// held since `now`. Answering an error for a reservation that was made would leave the
    /// client's retry facing its own request's 409 until the reservation went stale.
    async fn commit_reservation(
        &self,
        tx: Tx<E>,
        scope: &IdempotencyScope,
        now: OffsetDateTime,
    ) -> Result<IdempotencyBegin> {
        let Err(e) = tx.commit().await else {
            return Ok(IdempotencyBegin::Started { at: now });
        };
        let held = self
            .read_row(
                q(
                    "SELECT locked_at FROM idempotency_keys WHERE scope = $1 AND key = $2 \
                   AND fingerprint = $3 AND state = 'running'",
                )
                .bind(&scope.scope)
                .bind(&scope.key)
                .bind(&scope.fingerprint),
            )
            .await
            .ok()
            .flatten()
            .and_then(|row| row.int("locked_at").ok());
        if held == Some(to_millis(now)) {
            Ok(IdempotencyBegin::Started { at: now })
        } else {
            Err(e)
        }
    }

    async fn begin(&self) -> Result<Tx<E>> {
        Tx::begin(self.writer().await?, E::BEGIN_WRITE).await
    }

    async fn snapshot(&self) -> Result<Tx<E>> {
        Tx::begin(self.reader().await?, E::BEGIN_SNAPSHOT).await
    }
}

/// A ledger entry to write.
pub(crate) struct Entry<'a> {
    pub account_id: &'a str,
    pub delta: i64,
    pub balance_after: i64,
    pub kind: &'a str,
    pub task_id: Option<&'a str>,
    pub note: Option<&'a str>,
    /// The Checkout Session of a purchase or its refund.
    pub purchase_id: Option<&'a str>,
    pub at: OffsetDateTime,
}

/// Writes the entry; its id.
pub(crate) async fn ledger_entry<C: Conn>(conn: &mut C, entry: Entry<'_>) -> Result<i64> {
    let row = q(
        "INSERT INTO ledger (account_id, delta, balance_after, kind, task_id, note, purchase_id, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
    )
    .bind(entry.account_id)
    .bind(entry.delta)
    .bind(entry.balance_after)
    .bind(entry.kind)
    .bind(entry.task_id)
    .bind(entry.note)
    .bind(entry.purchase_id)
    .bind(to_millis(entry.at))
    .fetch_optional(conn)
    .await?;
    row.ok_or_else(|| Error::internal("INSERT … RETURNING gave no row"))?
        .int("id")
}

async fn refund<C: Conn>(
    conn: &mut C,
    account_id: &str,
    task_id: &str,
    cost: i64,
    note: &str,
    at: OffsetDateTime,
) -> Result<()> {
    let balance = q("UPDATE accounts SET credits = credits + $1 WHERE id = $2 RETURNING credits")
        .bind(cost)
        .bind(account_id)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| Error::internal(format!("refund of task {task_id}: no account")))?
        .int("credits")?;
    money::uncount_task_spend(conn, task_id, cost).await?;
    ledger_entry(
        conn,
        Entry {
            account_id,
            delta: cost,
            balance_after: balance,
            kind: "refund",
            task_id: Some(task_id),
            note: Some(note),
            purchase_id: None,
            at,
        },
    )
    .await?;
    Ok(())
}

pub(crate) async fn complete_idempotency<C: Conn>(
    conn: &mut C,
    scope: &IdempotencyScope,
    response: &StoredResponse,
) -> Result<()> {
    q("UPDATE idempotency_keys SET state = 'done', status = $1, body = $2 WHERE scope = $3 AND key = $4")
        .bind(i64::from(response.status))
        .bind(response.body.as_slice())
        .bind(&scope.scope)
        .bind(&scope.key)
        .execute(conn)
        .await?;
    Ok(())
}

/// Puts the task's webhook in the outbox, when it has one: called in the transaction that records
/// the task's final state.
async fn enqueue_webhook<C: Conn>(conn: &mut C, task_id: &str, now: OffsetDateTime) -> Result<()> {
    q("INSERT INTO webhook_deliveries (task_id, account_id, url, state, attempts, next_attempt_at, created_at) \
       SELECT id, account_id, webhook_url, 'pending', 0, $1, $1 FROM tasks \
       WHERE id = $2 AND webhook_url IS NOT NULL AND purged = 0 \
       ON CONFLICT (task_id) DO NOTHING")
    .bind(to_millis(now))
    .bind(task_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// The guarded charge of `task`: its cost and the balance after it; or, when it changed
/// nothing, why (the balance does not cover it, the key's spend limit would be passed, or there
/// is no such account). The outer error is the database's. A refusal leaves everything as it
/// was (the batch of SQLite's group commit relies on it), apart from credits that expired.
pub(crate) async fn charge<C: Conn>(
    conn: &mut C,
    task: &TaskRecord,
) -> Result<std::result::Result<(i64, i64), Error>> {
    let cost = signed(task.cost)?;
    // The key's spend limit first, so that undoing it is one counter when the balance refuses.
    let counted = match (&task.key_id, &task.spend) {
        (Some(key_id), Some(cap)) => {
            if !money::count_spend(conn, key_id, cap, cost).await? {
                let spent = money::spent(conn, key_id, super::to_millis(cap.period_start)).await?;
                return Ok(Err(Error::KeySpendLimitReached {
                    limit: cap.limit,
                    spent,
                    resets_at: cap.resets_at,
                }));
            }
            Some((key_id, cap))
        }
        _ => None,
    };
    let charged = guarded_decrement(conn, task, cost).await?;
    let charged = match charged {
        Ok(charged) => charged,
        Err(refused) => {
            if let Some((key_id, cap)) = counted {
                money::uncount_spend(conn, key_id, super::to_millis(cap.period_start), cost)
                    .await?;
            }
            return Ok(Err(refused));
        }
    };
    money::alert_low_balance(conn, task, &charged, cost).await?;
    Ok(Ok((cost, charged.balance)))
}

/// The guarded charge of several tasks of one account at once, none under a key's spend limit:
/// one `UPDATE` takes their total when the balance covers it and no credits on the account
/// expire. Each task's cost and the balance after it, in order, as [`charge`] would have given
/// them one by one (and the low-balance alert of the one that crossed); `None`, with nothing
/// changed, when the balance does not cover them all or the account has lots: the caller then
/// charges them one by one, which decides which of them fit. Why: on PostgreSQL the account's
/// row is locked from the first charge to the commit, so a batch's statements on it are the
/// time every other writer of that account waits.
pub(crate) async fn charge_together<C: Conn>(
    conn: &mut C,
    tasks: &[&TaskRecord],
) -> Result<Option<Vec<(i64, i64)>>> {
    let costs = tasks
        .iter()
        .map(|task| signed(task.cost))
        .collect::<Result<Vec<i64>>>()?;
    let Some(total) = costs
        .iter()
        .try_fold(0i64, |sum, cost| sum.checked_add(*cost))
    else {
        return Ok(None);
    };
    let Some(first) = tasks.first() else {
        return Ok(Some(Vec::new()));
    };
    let row = q(
        "UPDATE accounts SET credits = credits - $1 WHERE id = $2 AND credits >= $1 \
         AND lot_credits = 0 RETURNING credits, low_balance_threshold, low_balance_url",
    )
    .bind(total)
    .bind(&first.account_id)
    .fetch_optional(conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let after_all = money::Charged::of(&row)?;
    // Balances after each charge: the last one's is what is left, each earlier one's is that
    // plus the costs charged after it.
    let mut balances = vec![0i64; tasks.len()];
    let mut running = after_all.balance;
    for (i, cost) in costs.iter().enumerate().rev() {
        balances[i] = running;
        running += cost;
    }
    for ((task, cost), balance) in tasks.iter().zip(&costs).zip(&balances) {
        let charged = money::Charged {
            balance: *balance,
            alert: after_all.alert.clone(),
        };
        money::alert_low_balance(conn, task, &charged, *cost).await?;
    }
    Ok(Some(costs.into_iter().zip(balances).collect()))
}

/// The decrement itself. The guarded `UPDATE` is the whole of the no-overdraft rule: it either
/// takes the cost from a balance that covers it, or changes nothing. On PostgreSQL it takes the
/// account's row lock: concurrent charges on one account queue and each re-checks the balance it
/// finds. An account with credits that expire takes the second way: what expired leaves first,
/// then the cost comes from the soonest-expiring credits.
async fn guarded_decrement<C: Conn>(
    conn: &mut C,
    task: &TaskRecord,
    cost: i64,
) -> Result<std::result::Result<money::Charged, Error>> {
    const RETURNS: &str = " RETURNING credits, low_balance_threshold, low_balance_url";
    let fast = q(format!(
        "UPDATE accounts SET credits = credits - $1 WHERE id = $2 AND credits >= $1 \
         AND lot_credits = 0{RETURNS}"
    ))
    .bind(cost)
    .bind(&task.account_id)
    .fetch_optional(conn)
    .await?;
    if let Some(row) = fast {
        return Ok(Ok(money::Charged::of(&row)?));
    }
    let current = q("SELECT credits, lot_credits FROM accounts WHERE id = $1")
        .bind(&task.account_id)
        .fetch_optional(conn)
        .await?;
    let Some((mut balance, lots)) = current
        .map(|row| Ok::<_, Error>((row.int("credits")?, row.int("lot_credits")?)))
        .transpose()?
    else {
        return Ok(Err(Error::NotFound {
            what: "account",
            id: task.account_id.clone(),
        }));
    };
    if lots > 0 {
        balance -= money::settle_expiry(conn, &task.account_id, task.created_at).await?;
        let slow = q(format!(
            "UPDATE accounts SET credits = credits - $1 WHERE id = $2 AND credits >= $1{RETURNS}"
        ))
        .bind(cost)
        .bind(&task.account_id)
        .fetch_optional(conn)
        .await?;
        if let Some(row) = slow {
            let charged = money::Charged::of(&row)?;
            money::draw_lots(conn, &task.account_id, cost).await?;
            return Ok(Ok(charged));
        }
    }
    Ok(Err(Error::InsufficientCredits {
        cost: task.cost,
        balance: u64::try_from(balance).unwrap_or(0),
        priced: None,
    }))
}

/// The columns a new task is inserted with, in [`task_values`]' order, and how many they are.
pub(crate) const NEW_TASK_COLUMNS: &str =
    "id, account_id, status, prompt, n, size, seed, cost, created_at, webhook_url, model, key_id, \
     spend_period_start";
pub(crate) const NEW_TASK_WIDTH: usize = 13;

/// Binds a new task's values in [`NEW_TASK_COLUMNS`]' order.
pub(crate) fn task_values<'a>(stmt: Stmt<'a>, task: &'a TaskRecord, cost: i64) -> Stmt<'a> {
    stmt.bind(&task.id)
        .bind(&task.account_id)
        .bind(task.status.as_str())
        .bind(&task.prompt)
        .bind(i64::from(task.n))
        .bind(task.size.as_str())
        .bind(task.seed)
        .bind(cost)
        .bind(to_millis(task.created_at))
        .bind(&task.webhook_url)
        .bind(&task.model)
        .bind(&task.key_id)
        .bind(task.spend.map(|cap| to_millis(cap.period_start)))
}

/// Charges and inserts one task (and completes its idempotency record) inside a transaction.
/// `Ok(Err(_))`: refused (402, no account), nothing written.
pub(crate) async fn create_one<C: Conn>(
    conn: &mut C,
    task: &TaskRecord,
    idempotency: Option<(&IdempotencyScope, &StoredResponse)>,
) -> Result<std::result::Result<(), Error>> {
    let (cost, balance) = match charge(conn, task).await? {
        Ok(charged) => charged,
        Err(refused) => return Ok(Err(refused)),
    };
    task_values(
        q(format!(
            "INSERT INTO tasks ({NEW_TASK_COLUMNS}) VALUES {}",
            value_rows(1, NEW_TASK_WIDTH)
        )),
        task,
        cost,
    )
    .execute(conn)
    .await?;
    ledger_entry(
        conn,
        Entry {
            account_id: &task.account_id,
            delta: -cost,
            balance_after: balance,
            kind: "charge",
            task_id: Some(&task.id),
            note: None,
            purchase_id: None,
            at: task.created_at,
        },
    )
    .await?;
    if let Some((scope, response)) = idempotency {
        complete_idempotency(conn, scope, response).await?;
    }
    Ok(Ok(()))
}

/// The task with this id, read on `conn`.
pub(crate) async fn get_task<C: Conn>(conn: &mut C, id: &str) -> Result<Option<TaskRecord>> {
    let row = q(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(rows::task).transpose()
}

/// What an outbox sender asks for: the rows due at `now`, at most `limit`, held for `claim`
/// until `lease_until`. Task deliveries and account events are claimed and recorded alike.
struct Due<'a> {
    now: OffsetDateTime,
    lease_until: OffsetDateTime,
    claim: &'a str,
    limit: u32,
}

impl<'a> Due<'a> {
    /// The claim of `table`'s due rows (keyed by `key`), returning `columns`. With SKIP LOCKED
    /// the senders of several instances take disjoint batches without waiting; on SQLite the
    /// one writer keeps the select and the update together.
    fn claim<E: Engine>(&self, table: &str, key: &str, columns: &str) -> Stmt<'a> {
        q(format!(
            "UPDATE {table} SET claim = $1, next_attempt_at = $2 WHERE {key} IN \
             (SELECT {key} FROM {table} WHERE state = 'pending' AND next_attempt_at <= $3 \
              ORDER BY next_attempt_at LIMIT $4{}) RETURNING {columns}",
            E::SKIP_LOCKED,
        ))
        .bind(self.claim)
        .bind(to_millis(self.lease_until))
        .bind(to_millis(self.now))
        .bind(i64::from(self.limit))
    }
}

/// Records an attempt on a claimed outbox row: binds state, attempt number, next attempt,
/// delivered at, key and claim (and what `extra_set` adds). Nothing changes when the claim
/// lapsed or another sender recorded this attempt first.
fn record_attempt(table: &str, key: &str, extra_set: &str) -> Stmt<'static> {
    q(format!(
        "UPDATE {table} SET state = $1, attempts = $2, next_attempt_at = $3, delivered_at = $4, \
         claim = NULL{extra_set} \
         WHERE {key} = $5 AND claim = $6 AND state = 'pending' AND attempts = $2 - 1"
    ))
}

fn rate_limit_args(rate_limit: Option<RateLimit>) -> (Option<i64>, Option<i64>) {
    (
        rate_limit.map(|r| i64::from(r.requests_per_minute)),
        rate_limit.map(|r| i64::from(r.burst)),
    )
}

#[async_trait]
impl<E: Engine> Store for SqlStore<E> {
    fn is_shared(&self) -> bool {
        E::SHARED
    }

    async fn follow_changes(
        &self,
        sink: std::sync::Arc<dyn super::changes::ChangeSink>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) {
        self.engine.follow_changes(sink, stop).await;
    }

    async fn probe_write(&self, now: OffsetDateTime) -> Result<()> {
        let mut tx = self.begin().await?;
        q(
            "INSERT INTO settings (name, value) VALUES ('ready_probe', $1) \
           ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(to_millis(now).to_string().as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    async fn admin_token_hash(&self) -> Result<Option<String>> {
        self.read_row(q(
            "SELECT value FROM settings WHERE name = 'admin_token_hash'",
        ))
        .await?
        .map(|row| row.text("value"))
        .transpose()
    }

    async fn set_admin_token_hash(&self, hash: &str) -> Result<()> {
        self.write(
            q(
                "INSERT INTO settings (name, value) VALUES ('admin_token_hash', $1) \
               ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            )
            .bind(hash),
        )
        .await?;
        Ok(())
    }

    async fn image_link_key(&self, candidate: &str) -> Result<String> {
        self.write(
            q(
                "INSERT INTO settings (name, value) VALUES ('image_link_key', $1) \
               ON CONFLICT (name) DO NOTHING",
            )
            .bind(candidate),
        )
        .await?;
        self.read_row(q(
            "SELECT value FROM settings WHERE name = 'image_link_key'",
        ))
        .await?
        .ok_or_else(|| Error::internal("the image link key was not kept"))?
        .text("value")
    }

    async fn create_account(&self, account: &NewAccount, key: &KeyRecord) -> Result<AccountRecord> {
        let credits = signed(account.credits)?;
        let (rpm, burst) = rate_limit_args(account.rate_limit);
        let mut tx = self.begin().await?;
        q(
            "INSERT INTO accounts (id, name, credits, rpm, burst, created_at, webhook_secret) \
           VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&account.id)
        .bind(&account.name)
        .bind(credits)
        .bind(rpm)
        .bind(burst)
        .bind(to_millis(account.created_at))
        .bind(&account.webhook_secret)
        .execute(&mut *tx)
        .await?;
        q("INSERT INTO api_keys (id, account_id, key_hash, prefix, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&key.id)
            .bind(&account.id)
            .bind(&key.key_hash)
            .bind(&key.prefix)
            .bind(to_millis(key.created_at))
            .execute(&mut *tx)
            .await?;
        if credits > 0 {
            ledger_entry(
                &mut *tx,
                Entry {
                    account_id: &account.id,
                    delta: credits,
                    balance_after: credits,
                    kind: "grant",
                    task_id: None,
                    note: Some("opening balance"),
                    purchase_id: None,
                    at: account.created_at,
                },
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
            expiring: Vec::new(),
            low_balance: None,
        })
    }

    async fn get_account(&self, id: &str) -> Result<Option<AccountRecord>> {
        let row = self
            .read_row(
                q(concat!(
                    "SELECT ",
                    account_columns!(),
                    " FROM accounts WHERE id = $1"
                ))
                .bind(id),
            )
            .await?;
        let Some(mut account) = row.as_ref().map(rows::account).transpose()? else {
            return Ok(None);
        };
        account.expiring = money::lots_of(&mut *self.reader().await?, id).await?;
        Ok(Some(account))
    }

    async fn list_accounts(&self) -> Result<Vec<AccountRecord>> {
        let mut accounts = self
            .read_rows(q(concat!(
                "SELECT ",
                account_columns!(),
                " FROM accounts ORDER BY created_at, id"
            )))
            .await?
            .iter()
            .map(rows::account)
            .collect::<Result<Vec<_>>>()?;
        let lots = self
            .read_rows(q(
                "SELECT account_id, credits, expires_at FROM credit_lots WHERE credits > 0 \
                 ORDER BY expires_at, id",
            ))
            .await?;
        for lot in &lots {
            let owner = lot.text("account_id")?;
            if let Some(account) = accounts.iter_mut().find(|a| a.id == owner) {
                account.expiring.push((
                    rows::unsigned(lot, "credits")?,
                    from_millis(lot.int("expires_at")?),
                ));
            }
        }
        Ok(accounts)
    }

    async fn update_account(
        &self,
        id: &str,
        name: Option<&str>,
        rate_limit: Option<RateLimit>,
        low_balance: Option<Option<&LowBalance>>,
    ) -> Result<Option<AccountRecord>> {
        let (rpm, burst) = rate_limit_args(rate_limit);
        // $5: whether to set the alert at all; then its threshold and URL (NULL: off).
        let alert = low_balance.flatten();
        let row = self
            .write_row(
                q(concat!(
                    "UPDATE accounts SET name = COALESCE($1, name), rpm = COALESCE($2, rpm), \
                     burst = COALESCE($3, burst), \
                     low_balance_threshold = CASE WHEN $5 = 1 THEN $6 ELSE low_balance_threshold END, \
                     low_balance_url = CASE WHEN $5 = 1 THEN $7 ELSE low_balance_url END \
                     WHERE id = $4 RETURNING ",
                    account_columns!()
                ))
                .bind(name)
                .bind(rpm)
                .bind(burst)
                .bind(id)
                .bind(i64::from(low_balance.is_some()))
                .bind(alert.map(|a| signed(a.threshold)).transpose()?)
                .bind(alert.map(|a| a.notify_url.as_str())),
            )
            .await?;
        let Some(mut account) = row.as_ref().map(rows::account).transpose()? else {
            return Ok(None);
        };
        account.expiring = money::lots_of(&mut *self.reader().await?, id).await?;
        Ok(Some(account))
    }

    async fn add_credits(
        &self,
        id: &str,
        amount: i64,
        note: Option<&str>,
        expires_at: Option<OffsetDateTime>,
        now: OffsetDateTime,
    ) -> Result<Option<AccountRecord>> {
        let mut tx = self.begin().await?;
        if amount < 0 {
            // What expired goes first, so a correction is judged on the balance as it is.
            money::settle_expiry(&mut *tx, id, now).await?;
        }
        let row = q(concat!(
            "UPDATE accounts SET credits = credits + $1 \
             WHERE id = $2 AND credits + $1 >= 0 AND credits + $1 <= $3 RETURNING ",
            account_columns!()
        ))
        .bind(amount)
        .bind(id)
        .bind(signed(tollgate_contract::MAX_CREDITS)?)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            let current = q("SELECT credits FROM accounts WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            tx.rollback().await?;
            return match current {
                None => Ok(None),
                Some(row) => Err(out_of_range(amount, row.int("credits")?)),
            };
        };
        let mut account = rows::account(&row)?;
        drop(row);
        match expires_at {
            Some(at) if amount > 0 => money::add_lot(&mut *tx, id, amount, at, now).await?,
            _ if amount < 0 => money::draw_lots(&mut *tx, id, -amount).await?,
            _ => {}
        }
        account.expiring = money::lots_of(&mut *tx, id).await?;
        let entry = ledger_entry(
            &mut *tx,
            Entry {
                account_id: id,
                delta: amount,
                balance_after: signed(account.credits)?,
                kind: if amount >= 0 { "grant" } else { "adjust" },
                task_id: None,
                note,
                purchase_id: None,
                at: now,
            },
        )
        .await?;
        if let Err(e) = tx.commit().await {
            // A lost answer to COMMIT (the connection broke) may have committed all the same:
            // settled by asking, on another connection, whether the entry, whose id is known, is
            // there. Answering an error for a top-up that happened would invite a second one.
            let committed = self
                .read_row(q("SELECT id FROM ledger WHERE id = $1").bind(entry))
                .await
                .ok()
                .flatten();
            if committed.is_none() {
                return Err(e);
            }
        }
        Ok(Some(account))
    }

    async fn create_key(&self, key: &KeyRecord) -> Result<bool> {
        let inserted = self
            .write(
                q(
                    "INSERT INTO api_keys (id, account_id, key_hash, prefix, created_at, spend_limit, spend_period) \
                   SELECT $1, id, $3, $4, $5, $6, $7 FROM accounts WHERE id = $2",
                )
                .bind(&key.id)
                .bind(&key.account_id)
                .bind(&key.key_hash)
                .bind(&key.prefix)
                .bind(to_millis(key.created_at))
                .bind(key.spend_limit.map(|l| signed(l.credits)).transpose()?)
                .bind(key.spend_limit.map(|l| l.period.as_str())),
            )
            .await?;
        Ok(inserted == 1)
    }

    async fn revoke_key(&self, key_id: &str, now: OffsetDateTime) -> Result<bool> {
        let revoked = self
            .write(
                q("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                    .bind(to_millis(now))
                    .bind(key_id),
            )
            .await?;
        Ok(revoked == 1)
    }

    async fn list_keys(&self, account_id: &str) -> Result<Vec<KeyRecord>> {
        self.read_rows(
            q(concat!(
                "SELECT ",
                key_columns!(),
                " FROM api_keys WHERE account_id = $1 ORDER BY created_at, id"
            ))
            .bind(account_id),
        )
        .await?
        .iter()
        .map(rows::key)
        .collect()
    }

    async fn authenticate(&self, key_hash: &str) -> Result<Option<KeyAuth>> {
        let row = self
            .read_row(
                q("SELECT k.id AS key_id, k.account_id, a.rpm, a.burst, k.spend_limit, k.spend_period FROM api_keys k \
                   JOIN accounts a ON a.id = k.account_id WHERE k.key_hash = $1 AND k.revoked_at IS NULL")
                .bind(key_hash),
            )
            .await?;
        row.map(|row| {
            Ok(KeyAuth {
                key_id: row.text("key_id")?,
                account_id: row.text("account_id")?,
                rate_limit: rows::rate_limit_of(&row)?,
                spend_limit: rows::spend_limit_of(&row)?,
            })
        })
        .transpose()
    }

    async fn create_task(
        &self,
        task: &TaskRecord,
        idempotency: Option<(&IdempotencyScope, &StoredResponse)>,
    ) -> Result<TaskRecord> {
        self.creates.create(task, idempotency).await
    }

    async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>> {
        get_task(&mut *self.reader().await?, id).await
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
                let seq = self
                    .read_row(
                        q("SELECT seq FROM tasks WHERE id = $1 AND account_id = $2")
                            .bind(after)
                            .bind(account_id),
                    )
                    .await?;
                match seq {
                    Some(row) => row.int("seq")?,
                    None => return Ok(None),
                }
            }
        };
        self.read_rows(
            q(concat!(
                "SELECT ",
                task_columns!(),
                " FROM tasks WHERE account_id = $1 AND seq < $2 AND purged = 0 AND created_at > $3 \
                 ORDER BY seq DESC LIMIT $4"
            ))
            .bind(account_id)
            .bind(before_seq)
            .bind(to_millis(not_before))
            .bind(i64::from(limit)),
        )
        .await?
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
        let mut tx = self.begin().await?;
        // A running task too: its worker sees the change (its lease renewal, its finish, both
        // guarded by `status = 'running'`) and stops the run; the provider is asked to stop.
        let canceled = q(concat!(
            "UPDATE tasks SET status = 'canceled', completed_at = $1 WHERE id = $2 AND account_id = $3 \
             AND status IN ('queued', 'running') RETURNING ",
            task_columns!()
        ))
        .bind(to_millis(now))
        .bind(id)
        .bind(account_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = canceled {
            let task = rows::task(&row)?;
            let cost = signed(task.cost)?;
            let note = if task.started_at.is_some() {
                "canceled while it ran"
            } else {
                "canceled before it ran"
            };
            refund(&mut *tx, account_id, id, cost, note, now).await?;
            enqueue_webhook(&mut *tx, id, now).await?;
            tx.commit().await?;
            return Ok(CancelOutcome::Canceled(task));
        }
        let row = q(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE id = $1 AND account_id = $2"
        ))
        .bind(id)
        .bind(account_id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.rollback().await?;
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
        model: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        claim: &str,
    ) -> Result<Option<TaskRecord>> {
        // The queue first (indexed), then tasks whose worker stopped renewing its lease.
        for pick in [
            "SELECT seq FROM tasks WHERE status = 'queued' AND model = $4 AND purged = 0 \
             ORDER BY seq LIMIT 1",
            "SELECT seq FROM tasks WHERE status = 'running' AND lease_until < $1 AND model = $4 \
             AND purged = 0 ORDER BY seq LIMIT 1",
        ] {
            let row = self
                .write_row(
                    q(format!(
                        "UPDATE tasks SET status = 'running', started_at = $1, lease_until = $2, \
                         claim = $3, runs = runs + 1 WHERE seq = ({pick}{}) RETURNING {}",
                        E::SKIP_LOCKED,
                        task_columns!()
                    ))
                    .bind(to_millis(now))
                    .bind(to_millis(lease_until))
                    .bind(claim)
                    .bind(model),
                )
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
        let renewed = self
            .write(
                q("UPDATE tasks SET lease_until = $1 WHERE id = $2 AND status = 'running' AND claim = $3")
                    .bind(to_millis(lease_until))
                    .bind(id)
                    .bind(claim),
            )
            .await?;
        Ok(renewed == 1)
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
        let mut tx = self.begin().await?;
        let row = q(
            "UPDATE tasks SET status = $1, completed_at = $2, error_code = $3, error_message = $4, \
             lease_until = NULL WHERE id = $5 AND status = 'running' AND claim = $6 AND purged = 0 \
             RETURNING account_id, cost",
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
            let purged = q("SELECT purged FROM tasks WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .map(|row| row.int("purged"))
                .transpose()?;
            tx.rollback().await?;
            return Ok(if purged == Some(1) {
                FinishOutcome::Purged
            } else {
                FinishOutcome::Lost
            });
        };
        if status == TaskStatus::Failed {
            let account_id = row.text("account_id")?;
            let cost = row.int("cost")?;
            refund(&mut *tx, &account_id, id, cost, "task failed", now).await?;
        }
        enqueue_webhook(&mut *tx, id, now).await?;
        tx.commit().await?;
        Ok(FinishOutcome::Finished)
    }

    async fn release_task(&self, id: &str, claim: &str) -> Result<bool> {
        let released = self
            .write(
                q("UPDATE tasks SET status = 'queued', started_at = NULL, lease_until = NULL, claim = NULL, \
                   runs = runs - 1 WHERE id = $1 AND claim = $2 AND status = 'running'")
                .bind(id)
                .bind(claim),
            )
            .await?;
        Ok(released == 1)
    }

    async fn requeue_running(&self) -> Result<u64> {
        if E::SHARED {
            // Other instances may be running these tasks right now: leases decide, not a restart.
            return Ok(0);
        }
        let mut tx = self.begin().await?;
        let requeued = q(
            "UPDATE tasks SET status = 'queued', started_at = NULL, lease_until = NULL, claim = NULL \
             WHERE status = 'running'",
        )
        .execute(&mut *tx)
        .await?;
        q("DELETE FROM idempotency_keys WHERE state = 'running'")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(requeued)
    }

    async fn queue_depth(&self) -> Result<u64> {
        let n = self
            .read_row(q(
                "SELECT COUNT(*) AS n FROM tasks WHERE status = 'queued' AND purged = 0",
            ))
            .await?
            .map(|row| row.int("n"))
            .transpose()?
            .unwrap_or(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn expired_tasks(&self, cutoff: OffsetDateTime, limit: u32) -> Result<Vec<String>> {
        self.read_rows(
            q("SELECT id FROM tasks WHERE purged = 0 AND created_at <= $1 ORDER BY created_at LIMIT $2")
                .bind(to_millis(cutoff))
                .bind(i64::from(limit)),
        )
        .await?
        .iter()
        .map(|row| row.text("id"))
        .collect()
    }

    async fn mark_purged(&self, ids: &[String], now: OffsetDateTime) -> Result<()> {
        let mut tx = self.begin().await?;
        for id in ids {
            let queued = q(
                "UPDATE tasks SET status = 'canceled', completed_at = $1, error_code = 'expired', \
                 error_message = 'The task expired before it could run.' \
                 WHERE id = $2 AND status = 'queued' RETURNING account_id, cost",
            )
            .bind(to_millis(now))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = queued {
                let account_id = row.text("account_id")?;
                let cost = row.int("cost")?;
                refund(
                    &mut *tx,
                    &account_id,
                    id,
                    cost,
                    "expired before it ran",
                    now,
                )
                .await?;
            }
            for delete in [
                "DELETE FROM webhook_attempts WHERE task_id = $1",
                "DELETE FROM webhook_deliveries WHERE task_id = $1",
            ] {
                q(delete).bind(id).execute(&mut *tx).await?;
            }
            q("UPDATE tasks SET purged = 1, prompt = '', webhook_url = NULL WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }

    async fn webhook_secret(&self, account_id: &str, candidate: &str) -> Result<Option<String>> {
        let current = self
            .read_row(q("SELECT webhook_secret FROM accounts WHERE id = $1").bind(account_id))
            .await?;
        match current {
            None => Ok(None),
            Some(row) => match row.opt_text("webhook_secret")? {
                Some(secret) => Ok(Some(secret)),
                // Made before webhooks existed: set one, unless a concurrent call just did
                // (COALESCE under the row's write lock: the first candidate stays).
                None => self
                    .write_row(
                        q(
                            "UPDATE accounts SET webhook_secret = COALESCE(webhook_secret, $1) \
                           WHERE id = $2 RETURNING webhook_secret",
                        )
                        .bind(candidate)
                        .bind(account_id),
                    )
                    .await?
                    .map(|row| row.text("webhook_secret"))
                    .transpose(),
            },
        }
    }

    async fn set_webhook_secret(&self, account_id: &str, secret: &str) -> Result<bool> {
        let set = self
            .write(
                q("UPDATE accounts SET webhook_secret = $1 WHERE id = $2")
                    .bind(secret)
                    .bind(account_id),
            )
            .await?;
        Ok(set == 1)
    }

    async fn claim_webhook_deliveries(
        &self,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        claim: &str,
        limit: u32,
    ) -> Result<Vec<WebhookDeliveryRecord>> {
        let due = Due {
            now,
            lease_until,
            claim,
            limit,
        };
        self.write_rows(due.claim::<E>("webhook_deliveries", "task_id", delivery_columns!()))
            .await?
            .iter()
            .map(rows::delivery)
            .collect()
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
        let mut tx = self.begin().await?;
        let recorded = record_attempt("webhook_deliveries", "task_id", "")
            .bind(state)
            .bind(number)
            .bind(next_at)
            .bind(delivered_at)
            .bind(task_id)
            .bind(claim)
            .execute(&mut *tx)
            .await?;
        if recorded != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        q(concat!(
            "INSERT INTO webhook_attempts (",
            attempt_columns!(),
            ") VALUES ($1, $2, $3, $4, $5)"
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
        let marks = placeholders(1, task_ids.len());
        let mut deliveries = q(format!(
            "SELECT {} FROM webhook_deliveries WHERE task_id IN ({marks})",
            delivery_columns!()
        ));
        let mut attempts = q(format!(
            "SELECT {} FROM webhook_attempts WHERE task_id IN ({marks}) ORDER BY task_id, number",
            attempt_columns!()
        ));
        for id in task_ids {
            deliveries = deliveries.bind(id);
            attempts = attempts.bind(id);
        }
        // One snapshot for both reads, so the attempts match the delivery's count.
        let mut tx = self.snapshot().await?;
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
        self.read_rows(
            q(concat!(
                "SELECT ",
                ledger_columns!(),
                " FROM ledger WHERE account_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
            ))
            .bind(account_id)
            .bind(before.unwrap_or(i64::MAX))
            .bind(i64::from(limit)),
        )
        .await?
        .iter()
        .map(rows::ledger)
        .collect()
    }

    async fn idempotency_begin(
        &self,
        scope: &IdempotencyScope,
        now: OffsetDateTime,
        stale_before: OffsetDateTime,
        abandoned: &[OffsetDateTime],
    ) -> Result<IdempotencyBegin> {
        let mut tx = self.begin().await?;
        let inserted = q(
            "INSERT INTO idempotency_keys (scope, key, fingerprint, state, created_at, locked_at) \
             VALUES ($1, $2, $3, 'running', $4, $4) ON CONFLICT (scope, key) DO NOTHING",
        )
        .bind(&scope.scope)
        .bind(&scope.key)
        .bind(&scope.fingerprint)
        .bind(to_millis(now))
        .execute(&mut *tx)
        .await?;
        if inserted == 1 {
            return self.commit_reservation(tx, scope, now).await;
        }
        let row = q(format!(
            "SELECT fingerprint, state, status, body, locked_at FROM idempotency_keys \
             WHERE scope = $1 AND key = $2{}",
            E::FOR_UPDATE
        ))
        .bind(&scope.scope)
        .bind(&scope.key)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| Error::internal("an idempotency key neither inserted nor found"))?;
        let locked_at = row.int("locked_at")?;
        let outcome = if row.text("fingerprint")? != scope.fingerprint {
            IdempotencyBegin::Mismatch
        } else if row.text("state")? == "done" {
            IdempotencyBegin::Replay(StoredResponse {
                status: u16::try_from(row.int("status")?).map_err(Error::internal)?,
                body: row.opt_bytes("body")?.unwrap_or_default(),
            })
        } else if locked_at < to_millis(stale_before)
            || abandoned.iter().any(|t| to_millis(*t) == locked_at)
        {
            q("UPDATE idempotency_keys SET locked_at = $1 WHERE scope = $2 AND key = $3")
                .bind(to_millis(now))
                .bind(&scope.scope)
                .bind(&scope.key)
                .execute(&mut *tx)
                .await?;
            return self.commit_reservation(tx, scope, now).await;
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
        complete_idempotency(&mut *self.writer().await?, scope, response).await
    }

    async fn idempotency_release(&self, scope: &IdempotencyScope) -> Result<()> {
        self.write(
            q("DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND state = 'running'")
                .bind(&scope.scope)
                .bind(&scope.key),
        )
        .await?;
        Ok(())
    }

    async fn idempotency_purge(&self, cutoff: OffsetDateTime) -> Result<u64> {
        self.write(q("DELETE FROM idempotency_keys WHERE created_at < $1").bind(to_millis(cutoff)))
            .await
    }

    async fn create_voucher(&self, voucher: &VoucherRecord) -> Result<()> {
        self.write(
            q(concat!(
                "INSERT INTO vouchers (",
                voucher_columns!(),
                ") VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, NULL)"
            ))
            .bind(&voucher.id)
            .bind(&voucher.code_hash)
            .bind(&voucher.prefix)
            .bind(signed(voucher.credits)?)
            .bind(&voucher.note)
            .bind(to_millis(voucher.created_at))
            .bind(voucher.expires_at.map(to_millis)),
        )
        .await?;
        Ok(())
    }

    async fn redeem_voucher(
        &self,
        code_hash: &str,
        account_id: &str,
        now: OffsetDateTime,
    ) -> Result<RedeemOutcome> {
        let mut tx = self.begin().await?;
        // The guarded update is the whole of the single-use rule: it marks a code that is unused
        // and unexpired, or changes nothing. On PostgreSQL concurrent redemptions of one code
        // queue on its row lock; each re-checks `redeemed_at IS NULL` after the one before it
        // commits, so exactly one marks it.
        let marked = q(concat!(
            "UPDATE vouchers SET redeemed_at = $1, redeemed_by = $2 \
             WHERE code_hash = $3 AND redeemed_at IS NULL AND (expires_at IS NULL OR expires_at > $1) \
             AND EXISTS (SELECT 1 FROM accounts WHERE id = $2) RETURNING ",
            voucher_columns!()
        ))
        .bind(to_millis(now))
        .bind(account_id)
        .bind(code_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(marked) = marked else {
            let existing = q(concat!(
                "SELECT ",
                voucher_columns!(),
                " FROM vouchers WHERE code_hash = $1"
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
        let row = q(concat!(
            "UPDATE accounts SET credits = credits + $1 WHERE id = $2 RETURNING ",
            account_columns!()
        ))
        .bind(credits)
        .bind(account_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| Error::internal("a redeemed voucher's account is gone"))?;
        let account = rows::account(&row)?;
        if let Some(expires_at) = voucher.expires_at {
            money::add_lot(&mut *tx, account_id, credits, expires_at, now).await?;
        }
        let note = rows::voucher_note(&voucher);
        ledger_entry(
            &mut *tx,
            Entry {
                account_id,
                delta: credits,
                balance_after: signed(account.credits)?,
                kind: "voucher",
                task_id: None,
                note: Some(&note),
                purchase_id: None,
                at: now,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(RedeemOutcome::Redeemed { account, voucher })
    }

    async fn list_vouchers(&self, limit: u32) -> Result<Vec<VoucherRecord>> {
        self.read_rows(
            q(concat!(
                "SELECT ",
                voucher_columns!(),
                " FROM vouchers ORDER BY created_at DESC, id DESC LIMIT $1"
            ))
            .bind(i64::from(limit)),
        )
        .await?
        .iter()
        .map(rows::voucher)
        .collect()
    }

    async fn create_session(&self, session: &SessionRecord) -> Result<()> {
        let (kind, account_id, key_id, admin_token_hash) = rows::session_fields(&session.principal);
        self.write(
            q(concat!(
                "INSERT INTO dashboard_sessions (",
                session_columns!(),
                ") VALUES ($1, $2, $3, $4, $5, $6, $7)"
            ))
            .bind(&session.token_hash)
            .bind(kind)
            .bind(account_id)
            .bind(key_id)
            .bind(admin_token_hash)
            .bind(to_millis(session.created_at))
            .bind(to_millis(session.expires_at)),
        )
        .await?;
        Ok(())
    }

    async fn get_session(
        &self,
        token_hash: &str,
        now: OffsetDateTime,
    ) -> Result<Option<SessionRecord>> {
        let row = self
            .read_row(
                q(concat!(
                    "SELECT ",
                    session_columns!(),
                    " FROM dashboard_sessions s WHERE token_hash = $1 AND expires_at > $2 \
                     AND (key_id IS NULL OR EXISTS \
                          (SELECT 1 FROM api_keys k WHERE k.id = s.key_id AND k.revoked_at IS NULL))"
                ))
                .bind(token_hash)
                .bind(to_millis(now)),
            )
            .await?;
        row.as_ref().map(rows::session).transpose()
    }

    async fn delete_session(&self, token_hash: &str) -> Result<()> {
        self.write(q("DELETE FROM dashboard_sessions WHERE token_hash = $1").bind(token_hash))
            .await?;
        Ok(())
    }

    async fn delete_expired_sessions(&self, now: OffsetDateTime) -> Result<u64> {
        self.write(q("DELETE FROM dashboard_sessions WHERE expires_at <= $1").bind(to_millis(now)))
            .await
    }

    async fn daily_spend(
        &self,
        account_id: &str,
        since: OffsetDateTime,
    ) -> Result<Vec<DailySpend>> {
        // The CAST: PostgreSQL sums BIGINT into NUMERIC; both engines decode a BIGINT.
        self.read_rows(
            q("SELECT created_at / 86400000 AS day, CAST(SUM(-delta) AS BIGINT) AS spent FROM ledger \
               WHERE account_id = $1 AND created_at >= $2 AND kind IN ('charge', 'refund') \
               GROUP BY day ORDER BY day")
            .bind(account_id)
            .bind(to_millis(since)),
        )
        .await?
        .iter()
        .map(rows::daily_spend)
        .collect()
    }

    async fn spend_by_account(&self, since: OffsetDateTime) -> Result<Vec<(String, i64)>> {
        self.read_rows(
            q(
                "SELECT account_id, CAST(SUM(-delta) AS BIGINT) AS spent FROM ledger \
               WHERE created_at >= $1 AND kind IN ('charge', 'refund') GROUP BY account_id",
            )
            .bind(to_millis(since)),
        )
        .await?
        .iter()
        .map(|row| Ok((row.text("account_id")?, row.int("spent")?)))
        .collect()
    }

    async fn key_spent(&self, key_id: &str, period_start: OffsetDateTime) -> Result<u64> {
        money::spent(&mut *self.reader().await?, key_id, to_millis(period_start)).await
    }

    async fn expire_account_credits(&self, account_id: &str, now: OffsetDateTime) -> Result<u64> {
        let mut tx = self.begin().await?;
        let expired = money::settle_expiry(&mut *tx, account_id, now).await?;
        tx.commit().await?;
        Ok(u64::try_from(expired).unwrap_or(0))
    }

    async fn expire_credits(&self, now: OffsetDateTime, limit: u32) -> Result<u64> {
        let due = self
            .read_rows(
                q("SELECT DISTINCT account_id FROM credit_lots WHERE credits > 0 AND expires_at <= $1 \
                   LIMIT $2")
                .bind(to_millis(now))
                .bind(i64::from(limit)),
            )
            .await?;
        let due = due
            .iter()
            .map(|row| row.text("account_id"))
            .collect::<Result<Vec<_>>>()?;
        let mut accounts = 0;
        for account_id in due {
            if self.expire_account_credits(&account_id, now).await? > 0 {
                accounts += 1;
            }
        }
        Ok(accounts)
    }

    async fn open_purchase(&self, purchase: &PurchaseRecord) -> Result<()> {
        self.write(
            q("INSERT INTO purchases (session_id, account_id, credits, amount, currency, state, created_at) \
               VALUES ($1, $2, $3, $4, $5, 'open', $6) ON CONFLICT (session_id) DO NOTHING")
            .bind(&purchase.session_id)
            .bind(&purchase.account_id)
            .bind(signed(purchase.credits)?)
            .bind(signed(purchase.amount)?)
            .bind(&purchase.currency)
            .bind(to_millis(purchase.created_at)),
        )
        .await?;
        Ok(())
    }

    async fn complete_purchase(
        &self,
        paid: &PaidSession,
        now: OffsetDateTime,
    ) -> Result<PurchaseOutcome> {
        let mut tx = self.begin().await?;
        // A session this server's checkout did not make (an operator's payment link, say) is
        // recorded from the event; one it made keeps the pack it was sold as.
        q("INSERT INTO purchases (session_id, account_id, credits, amount, currency, state, created_at) \
           SELECT $1, id, $3, $4, $5, 'open', $6 FROM accounts WHERE id = $2 \
           ON CONFLICT (session_id) DO NOTHING")
        .bind(&paid.session_id)
        .bind(&paid.account_id)
        .bind(signed(paid.credits)?)
        .bind(signed(paid.amount)?)
        .bind(&paid.currency)
        .bind(to_millis(now))
        .execute(&mut *tx)
        .await?;
        // The guarded update is the whole of the exactly-once rule: concurrent deliveries of
        // one session queue on its row, and only the first finds it open.
        let marked = q(
            "UPDATE purchases SET state = 'paid', paid_at = $1, payment_intent = COALESCE($2, payment_intent) \
             WHERE session_id = $3 AND state = 'open' RETURNING account_id, credits",
        )
        .bind(to_millis(now))
        .bind(paid.payment_intent.as_deref())
        .bind(&paid.session_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(marked) = marked else {
            let known = q("SELECT state FROM purchases WHERE session_id = $1")
                .bind(&paid.session_id)
                .fetch_optional(&mut *tx)
                .await?;
            tx.rollback().await?;
            return Ok(if known.is_some() {
                PurchaseOutcome::AlreadyCredited
            } else {
                PurchaseOutcome::NoAccount
            });
        };
        let account_id = marked.text("account_id")?;
        let credits = marked.int("credits")?;
        drop(marked);
        let row = q(concat!(
            "UPDATE accounts SET credits = credits + $1 WHERE id = $2 AND credits + $1 <= $3 RETURNING ",
            account_columns!()
        ))
        .bind(credits)
        .bind(account_id.as_str())
        .bind(signed(tollgate_contract::MAX_CREDITS)?)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Err(Error::internal(format!(
                "purchase {} would take account {account_id} above the largest balance",
                paid.session_id
            )));
        };
        let account = rows::account(&row)?;
        drop(row);
        let note = format!("Stripe Checkout {}", paid.session_id);
        ledger_entry(
            &mut *tx,
            Entry {
                account_id: &account_id,
                delta: credits,
                balance_after: signed(account.credits)?,
                kind: "purchase",
                task_id: None,
                note: Some(&note),
                purchase_id: Some(&paid.session_id),
                at: now,
            },
        )
        .await?;
        // A lost answer to this COMMIT is an error to Stripe, which delivers again: the
        // guarded update then finds the session paid, or credits it.
        tx.commit().await?;
        Ok(PurchaseOutcome::Credited(account))
    }

    async fn refund_purchase(
        &self,
        payment_intent: &str,
        refunded: u64,
        amount: u64,
        now: OffsetDateTime,
    ) -> Result<Option<RefundOutcome>> {
        let mut tx = self.begin().await?;
        // Cumulative, and guarded: a repeated or older event finds this much refunded already.
        let marked = q("UPDATE purchases SET refunded_amount = $1 \
             WHERE payment_intent = $2 AND state = 'paid' AND refunded_amount < $1 \
             RETURNING session_id, account_id, credits, amount, refunded_credits, shortfall")
        .bind(signed(refunded)?)
        .bind(payment_intent)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(marked) = marked else {
            tx.rollback().await?;
            return Ok(None);
        };
        let session_id = marked.text("session_id")?;
        let account_id = marked.text("account_id")?;
        let credits = u128::from(rows::unsigned(&marked, "credits")?);
        let paid = if amount > 0 {
            amount
        } else {
            rows::unsigned(&marked, "amount")?
        };
        // The share of the pack the refunded money bought, rounded down.
        let due = if paid == 0 {
            credits
        } else {
            credits * u128::from(refunded.min(paid)) / u128::from(paid)
        };
        let handled = u128::from(rows::unsigned(&marked, "refunded_credits")?)
            + u128::from(rows::unsigned(&marked, "shortfall")?);
        let owed = i64::try_from(due.saturating_sub(handled)).map_err(Error::internal)?;
        drop(marked);
        money::settle_expiry(&mut *tx, &account_id, now).await?;
        let balance = q("SELECT credits FROM accounts WHERE id = $1")
            .bind(account_id.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| Error::internal("a purchase's account is gone"))?
            .int("credits")?;
        let taken = owed.min(balance);
        let short = owed - taken;
        if taken > 0 {
            let after = q(
                "UPDATE accounts SET credits = credits - $1 WHERE id = $2 AND credits >= $1 \
                           RETURNING credits",
            )
            .bind(taken)
            .bind(account_id.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| Error::internal("a refund's balance moved under its lock"))?
            .int("credits")?;
            money::draw_lots(&mut *tx, &account_id, taken).await?;
            let note = if short > 0 {
                format!("Stripe refund of {session_id}; {short} credits short")
            } else {
                format!("Stripe refund of {session_id}")
            };
            ledger_entry(
                &mut *tx,
                Entry {
                    account_id: &account_id,
                    delta: -taken,
                    balance_after: after,
                    kind: "purchase_refund",
                    task_id: None,
                    note: Some(&note),
                    purchase_id: Some(&session_id),
                    at: now,
                },
            )
            .await?;
        }
        q("UPDATE purchases SET refunded_credits = refunded_credits + $1, shortfall = shortfall + $2 \
           WHERE session_id = $3")
        .bind(taken)
        .bind(short)
        .bind(session_id.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(RefundOutcome {
            session_id,
            account_id,
            taken: u64::try_from(taken).unwrap_or(0),
            shortfall: u64::try_from(short).unwrap_or(0),
        }))
    }

    async fn list_purchases(
        &self,
        account_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<PurchaseRecord>> {
        self.read_rows(
            q(concat!(
                "SELECT ",
                purchase_columns!(),
                " FROM purchases WHERE ($1 IS NULL OR account_id = $1) \
                 ORDER BY created_at DESC, session_id DESC LIMIT $2"
            ))
            .bind(account_id)
            .bind(i64::from(limit)),
        )
        .await?
        .iter()
        .map(rows::purchase)
        .collect()
    }

    async fn claim_account_events(
        &self,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        claim: &str,
        limit: u32,
    ) -> Result<Vec<AccountEventRecord>> {
        let due = Due {
            now,
            lease_until,
            claim,
            limit,
        };
        self.write_rows(due.claim::<E>("account_events", "id", account_event_columns!()))
            .await?
            .iter()
            .map(rows::account_event)
            .collect()
    }

    async fn record_account_event_attempt(
        &self,
        id: &str,
        claim: &str,
        number: u32,
        error: Option<&str>,
        next: DeliveryNext,
        at: OffsetDateTime,
    ) -> Result<bool> {
        let (state, next_at, delivered_at) = rows::next_columns(next, at);
        let number = i64::from(number);
        let recorded = self
            .write(
                record_attempt("account_events", "id", ", last_error = $7")
                    .bind(state)
                    .bind(number)
                    .bind(next_at)
                    .bind(delivered_at)
                    .bind(id)
                    .bind(claim)
                    .bind(error),
            )
            .await?;
        Ok(recorded == 1)
    }

    async fn account_events(
        &self,
        account_id: &str,
        limit: u32,
    ) -> Result<Vec<AccountEventRecord>> {
        self.read_rows(
            q(concat!(
                "SELECT ",
                account_event_columns!(),
                " FROM account_events WHERE account_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2"
            ))
            .bind(account_id)
            .bind(i64::from(limit)),
        )
        .await?
        .iter()
        .map(rows::account_event)
        .collect()
    }
}
