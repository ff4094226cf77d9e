//! The money statements, once for both engines: credit lots that expire, spend counters per key,
//! low-balance events, and Stripe purchases with their refunds.
//!
//! **Lots.** Credits granted with an expiry are a lot; `accounts.lot_credits` is the sum of what
//! is left of them and never exceeds `credits`, because every decrease of the balance takes from
//! the lots first ([`draw_lots`]). So a charge on an account without lots stays one statement,
//! and expiry ([`settle_expiry`]) can always take what is left of a lot from the balance.
//! Whatever touches an account's lots first writes the account's row (PostgreSQL's row lock),
//! so two instances never expire or draw the same lot twice.

use super::engine::{q, Conn};
use super::rows::{signed, Columns};
use super::sql::{ledger_entry, Entry};
use super::{from_millis, to_millis, SpendCap, TaskRecord};
use crate::error::{Error, Result};
use time::OffsetDateTime;

/// Adds a lot of `credits` that lapse at `expires_at` (the balance itself was raised by the caller).
pub(crate) async fn add_lot<C: Conn>(
    conn: &mut C,
    account_id: &str,
    credits: i64,
    expires_at: OffsetDateTime,
    now: OffsetDateTime,
) -> Result<()> {
    q("INSERT INTO credit_lots (account_id, credits, expires_at, created_at) VALUES ($1, $2, $3, $4)")
        .bind(account_id)
        .bind(credits)
        .bind(to_millis(expires_at))
        .bind(to_millis(now))
        .execute(conn)
        .await?;
    q("UPDATE accounts SET lot_credits = lot_credits + $1 WHERE id = $2")
        .bind(credits)
        .bind(account_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Takes `amount` credits, which the caller just took from the balance, from the account's
/// lots, soonest-expiring first; what the lots do not hold came from credits that never expire.
pub(crate) async fn draw_lots<C: Conn>(conn: &mut C, account_id: &str, amount: i64) -> Result<()> {
    let held = q("SELECT lot_credits FROM accounts WHERE id = $1")
        .bind(account_id)
        .fetch_optional(conn)
        .await?
        .map(|row| row.int("lot_credits"))
        .transpose()?
        .unwrap_or(0);
    let mut left = amount.min(held);
    if left <= 0 {
        return Ok(());
    }
    q("UPDATE accounts SET lot_credits = lot_credits - $1 WHERE id = $2")
        .bind(left)
        .bind(account_id)
        .execute(conn)
        .await?;
    let lots = q(
        "SELECT id, credits FROM credit_lots WHERE account_id = $1 AND credits > 0 \
                  ORDER BY expires_at, id",
    )
    .bind(account_id)
    .fetch_all(conn)
    .await?
    .iter()
    .map(|lot| Ok((lot.int("id")?, lot.int("credits")?)))
    .collect::<Result<Vec<_>>>()?;
    for (id, credits) in lots {
        let take = left.min(credits);
        q("UPDATE credit_lots SET credits = credits - $1 WHERE id = $2")
            .bind(take)
            .bind(id)
            .execute(conn)
            .await?;
        left -= take;
        if left == 0 {
            break;
        }
    }
    Ok(())
}

/// Takes what is left of the account's lots that expired by `now` from its balance, with an
/// `expiry` ledger entry; the credits expired (0 when none were due).
pub(crate) async fn settle_expiry<C: Conn>(
    conn: &mut C,
    account_id: &str,
    now: OffsetDateTime,
) -> Result<i64> {
    // The account's row first: on PostgreSQL its lock orders this against every charge and
    // every other instance's expiry of the same lots.
    let holds = q(
        "UPDATE accounts SET lot_credits = lot_credits WHERE id = $1 AND lot_credits > 0 \
                   RETURNING lot_credits",
    )
    .bind(account_id)
    .fetch_optional(conn)
    .await?;
    if holds.is_none() {
        return Ok(0);
    }
    let due = q(
        "SELECT id, credits FROM credit_lots WHERE account_id = $1 AND credits > 0 \
                 AND expires_at <= $2",
    )
    .bind(account_id)
    .bind(to_millis(now))
    .fetch_all(conn)
    .await?
    .iter()
    .map(|lot| Ok((lot.int("id")?, lot.int("credits")?)))
    .collect::<Result<Vec<_>>>()?;
    let mut expired = 0;
    for (id, credits) in due {
        expired += credits;
        q("UPDATE credit_lots SET credits = 0 WHERE id = $1")
            .bind(id)
            .execute(conn)
            .await?;
    }
    if expired == 0 {
        return Ok(0);
    }
    let balance = q(
        "UPDATE accounts SET credits = credits - $1, lot_credits = lot_credits - $1 \
                     WHERE id = $2 RETURNING credits",
    )
    .bind(expired)
    .bind(account_id)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| Error::internal("expiring credits of an account that is gone"))?
    .int("credits")?;
    let note = format!(
        "{expired} credit{} expired",
        if expired == 1 { "" } else { "s" }
    );
    ledger_entry(
        conn,
        Entry {
            account_id,
            delta: -expired,
            balance_after: balance,
            kind: "expiry",
            task_id: None,
            note: Some(&note),
            purchase_id: None,
            at: now,
        },
    )
    .await?;
    Ok(expired)
}

/// Counts `cost` against the key's spend in the period, if that stays within its limit; false
/// (nothing changed) when it would pass it. The upsert's guard is evaluated against the latest
/// row under its lock, so concurrent charges of one key cannot pass the limit together.
pub(crate) async fn count_spend<C: Conn>(
    conn: &mut C,
    key_id: &str,
    cap: &SpendCap,
    cost: i64,
) -> Result<bool> {
    let counted = q(
        "INSERT INTO key_spend (key_id, period_start, spent) SELECT $1, $2, $3 WHERE $3 <= $4 \
         ON CONFLICT (key_id, period_start) DO UPDATE SET spent = key_spend.spent + excluded.spent \
         WHERE key_spend.spent + excluded.spent <= $4",
    )
    .bind(key_id)
    .bind(to_millis(cap.period_start))
    .bind(cost)
    .bind(signed(cap.limit.credits)?)
    .execute(conn)
    .await?;
    Ok(counted == 1)
}

/// Gives `cost` back to the spend the task counted in (a refund or an undone charge).
pub(crate) async fn uncount_spend<C: Conn>(
    conn: &mut C,
    key_id: &str,
    period_start: i64,
    cost: i64,
) -> Result<()> {
    q("UPDATE key_spend SET spent = spent - $1 WHERE key_id = $2 AND period_start = $3 AND spent >= $1")
        .bind(cost)
        .bind(key_id)
        .bind(period_start)
        .execute(conn)
        .await?;
    Ok(())
}

/// Gives a refunded task's cost back to its key's spend, when it counted in one.
pub(crate) async fn uncount_task_spend<C: Conn>(
    conn: &mut C,
    task_id: &str,
    cost: i64,
) -> Result<()> {
    let row = q("SELECT key_id, spend_period_start FROM tasks WHERE id = $1")
        .bind(task_id)
        .fetch_optional(conn)
        .await?;
    if let Some(row) = row {
        if let (Some(key_id), Some(start)) =
            (row.opt_text("key_id")?, row.opt_int("spend_period_start")?)
        {
            uncount_spend(conn, &key_id, start, cost).await?;
        }
    }
    Ok(())
}

/// What a key has spent in the period that starts at `period_start`.
pub(crate) async fn spent<C: Conn>(conn: &mut C, key_id: &str, period_start: i64) -> Result<u64> {
    let row = q("SELECT spent FROM key_spend WHERE key_id = $1 AND period_start = $2")
        .bind(key_id)
        .bind(period_start)
        .fetch_optional(conn)
        .await?;
    row.map(|r| r.int("spent"))
        .transpose()
        .map(|s| u64::try_from(s.unwrap_or(0)).unwrap_or(0))
}

/// The balance after a charge, and the account's low-balance alert (threshold, URL).
pub(crate) struct Charged {
    pub balance: i64,
    pub alert: Option<(i64, String)>,
}

impl Charged {
    /// From the charge's `RETURNING credits, low_balance_threshold, low_balance_url`.
    pub(crate) fn of(row: &impl Columns) -> Result<Charged> {
        Ok(Charged {
            balance: row.int("credits")?,
            alert: match (
                row.opt_int("low_balance_threshold")?,
                row.opt_text("low_balance_url")?,
            ) {
                (Some(threshold), Some(url)) => Some((threshold, url)),
                _ => None,
            },
        })
    }
}

/// Puts one `account.balance_low` event in the outbox when this charge took the balance from at
/// or above the account's threshold to below it.
pub(crate) async fn alert_low_balance<C: Conn>(
    conn: &mut C,
    task: &TaskRecord,
    charged: &Charged,
    cost: i64,
) -> Result<()> {
    let Some((threshold, url)) = &charged.alert else {
        return Ok(());
    };
    let (balance, threshold) = (charged.balance, *threshold);
    if !(balance < threshold && balance + cost >= threshold) {
        return Ok(());
    }
    // One crossing per charge: the event is named after the task that crossed.
    let id = format!("evt_{}", task.id.trim_start_matches("task_"));
    let created = task
        .created_at
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(Error::internal)?;
    let body = serde_json::json!({
        "id": id,
        "object": "event",
        "type": "account.balance_low",
        "created_at": created,
        "data": {
            "account_id": task.account_id,
            "credits": balance,
            "threshold": threshold,
            "task_id": task.id,
        }
    })
    .to_string();
    let at = to_millis(task.created_at);
    q("INSERT INTO account_events (id, account_id, type, url, body, state, attempts, next_attempt_at, created_at) \
       VALUES ($1, $2, 'account.balance_low', $3, $4, 'pending', 0, $5, $5) ON CONFLICT (id) DO NOTHING")
    .bind(id.as_str())
    .bind(&task.account_id)
    .bind(url.as_str())
    .bind(body.as_str())
    .bind(at)
    .execute(conn)
    .await?;
    Ok(())
}

/// The account's live lots (credits left, expiry), soonest first.
pub(crate) async fn lots_of<C: Conn>(
    conn: &mut C,
    account_id: &str,
) -> Result<Vec<(u64, OffsetDateTime)>> {
    q(
        "SELECT credits, expires_at FROM credit_lots WHERE account_id = $1 AND credits > 0 \
       ORDER BY expires_at, id",
    )
    .bind(account_id)
    .fetch_all(conn)
    .await?
    .iter()
    .map(|row| {
        Ok((
            u64::try_from(row.int("credits")?).map_err(Error::internal)?,
            from_millis(row.int("expires_at")?),
        ))
    })
    .collect()
}
