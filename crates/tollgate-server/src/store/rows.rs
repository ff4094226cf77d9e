//! Row → record mapping for both SQL engines: both store the same columns with the same
//! types (BIGINT for numbers and Unix-millisecond times, TEXT for the rest).

use super::*;
use crate::error::Error;
use sqlx::Row;

/// The column reads the mappers need, for any engine's row type.
pub trait Columns {
    fn int(&self, col: &str) -> Result<i64>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>>;
    fn text(&self, col: &str) -> Result<String>;
    fn opt_text(&self, col: &str) -> Result<Option<String>>;
    fn opt_bytes(&self, col: &str) -> Result<Option<Vec<u8>>>;
}

macro_rules! columns_for {
    ($row:ty) => {
        impl Columns for $row {
            fn int(&self, col: &str) -> Result<i64> {
                Ok(self.try_get(col)?)
            }
            fn opt_int(&self, col: &str) -> Result<Option<i64>> {
                Ok(self.try_get(col)?)
            }
            fn text(&self, col: &str) -> Result<String> {
                Ok(self.try_get(col)?)
            }
            fn opt_text(&self, col: &str) -> Result<Option<String>> {
                Ok(self.try_get(col)?)
            }
            fn opt_bytes(&self, col: &str) -> Result<Option<Vec<u8>>> {
                Ok(self.try_get(col)?)
            }
        }
    };
}

columns_for!(sqlx::sqlite::SqliteRow);
columns_for!(sqlx::postgres::PgRow);

// The columns each mapper reads, as macros so that statements are `concat!`ed at compile time.
macro_rules! account_columns {
    () => {
        "id, name, credits, rpm, burst, created_at, low_balance_threshold, low_balance_url"
    };
}
macro_rules! key_columns {
    () => {
        "id, account_id, key_hash, prefix, created_at, revoked_at, spend_limit, spend_period"
    };
}
macro_rules! task_columns {
    () => {
        "id, account_id, status, prompt, n, size, seed, cost, created_at, started_at, \
         completed_at, error_code, error_message, purged, runs, webhook_url, model, key_id"
    };
}
macro_rules! purchase_columns {
    () => {
        "session_id, account_id, credits, amount, currency, state, payment_intent, \
         refunded_amount, refunded_credits, shortfall, created_at, paid_at"
    };
}
macro_rules! account_event_columns {
    () => {
        "id, account_id, type, url, body, state, attempts, last_error, created_at"
    };
}
macro_rules! ledger_columns {
    () => {
        "id, account_id, delta, balance_after, kind, task_id, note, purchase_id, created_at"
    };
}
macro_rules! delivery_columns {
    () => {
        "task_id, account_id, url, state, attempts, next_attempt_at, delivered_at, created_at"
    };
}
macro_rules! attempt_columns {
    () => {
        "task_id, number, at, status, error"
    };
}
macro_rules! voucher_columns {
    () => {
        "id, code_hash, prefix, credits, note, created_at, expires_at, redeemed_at, redeemed_by"
    };
}
macro_rules! session_columns {
    () => {
        "token_hash, kind, account_id, key_id, admin_token_hash, created_at, expires_at"
    };
}
pub(crate) use {
    account_columns, account_event_columns, attempt_columns, delivery_columns, key_columns,
    ledger_columns, purchase_columns, session_columns, task_columns, voucher_columns,
};

pub(crate) fn unsigned(row: &impl Columns, col: &str) -> Result<u64> {
    u64::try_from(row.int(col)?).map_err(|_| Error::internal(format!("negative {col} in storage")))
}

pub(crate) fn signed(amount: u64) -> Result<i64> {
    i64::try_from(amount).map_err(|_| Error::internal("credit amount out of range"))
}

fn opt_time(row: &impl Columns, col: &str) -> Result<Option<OffsetDateTime>> {
    Ok(row.opt_int(col)?.map(from_millis))
}

pub(crate) fn rate_limit_of(row: &impl Columns) -> Result<Option<RateLimit>> {
    Ok(match (row.opt_int("rpm")?, row.opt_int("burst")?) {
        (Some(rpm), Some(burst)) => Some(RateLimit {
            requests_per_minute: u32::try_from(rpm).map_err(Error::internal)?,
            burst: u32::try_from(burst).map_err(Error::internal)?,
        }),
        _ => None,
    })
}

pub(crate) fn account(row: &impl Columns) -> Result<AccountRecord> {
    Ok(AccountRecord {
        id: row.text("id")?,
        name: row.text("name")?,
        credits: unsigned(row, "credits")?,
        rate_limit: rate_limit_of(row)?,
        created_at: from_millis(row.int("created_at")?),
        expiring: Vec::new(),
        low_balance: match (
            row.opt_int("low_balance_threshold")?,
            row.opt_text("low_balance_url")?,
        ) {
            (Some(threshold), Some(notify_url)) => Some(LowBalance {
                threshold: u64::try_from(threshold).map_err(Error::internal)?,
                notify_url,
            }),
            _ => None,
        },
    })
}

/// A key's spend limit from its columns.
pub(crate) fn spend_limit_of(row: &impl Columns) -> Result<Option<SpendLimit>> {
    Ok(
        match (row.opt_int("spend_limit")?, row.opt_text("spend_period")?) {
            (Some(credits), Some(period)) => Some(SpendLimit {
                credits: u64::try_from(credits).map_err(Error::internal)?,
                period: period.parse().map_err(Error::internal)?,
            }),
            _ => None,
        },
    )
}

pub(crate) fn purchase(row: &impl Columns) -> Result<PurchaseRecord> {
    Ok(PurchaseRecord {
        session_id: row.text("session_id")?,
        account_id: row.text("account_id")?,
        credits: unsigned(row, "credits")?,
        amount: unsigned(row, "amount")?,
        currency: row.text("currency")?,
        state: row.text("state")?,
        payment_intent: row.opt_text("payment_intent")?,
        refunded_amount: unsigned(row, "refunded_amount")?,
        refunded_credits: unsigned(row, "refunded_credits")?,
        shortfall: unsigned(row, "shortfall")?,
        created_at: from_millis(row.int("created_at")?),
        paid_at: opt_time(row, "paid_at")?,
    })
}

pub(crate) fn account_event(row: &impl Columns) -> Result<AccountEventRecord> {
    Ok(AccountEventRecord {
        id: row.text("id")?,
        account_id: row.text("account_id")?,
        event_type: row.text("type")?,
        url: row.text("url")?,
        body: row.text("body")?,
        state: webhook_state(&row.text("state")?)?,
        attempts: u32::try_from(row.int("attempts")?).map_err(Error::internal)?,
        last_error: row.opt_text("last_error")?,
        created_at: from_millis(row.int("created_at")?),
    })
}

pub(crate) fn key(row: &impl Columns) -> Result<KeyRecord> {
    Ok(KeyRecord {
        id: row.text("id")?,
        account_id: row.text("account_id")?,
        key_hash: row.text("key_hash")?,
        prefix: row.text("prefix")?,
        created_at: from_millis(row.int("created_at")?),
        revoked_at: opt_time(row, "revoked_at")?,
        spend_limit: spend_limit_of(row)?,
    })
}

pub(crate) fn task(row: &impl Columns) -> Result<TaskRecord> {
    Ok(TaskRecord {
        id: row.text("id")?,
        account_id: row.text("account_id")?,
        status: row.text("status")?.parse().map_err(Error::internal)?,
        prompt: row.text("prompt")?,
        n: u8::try_from(row.int("n")?).map_err(Error::internal)?,
        size: row.text("size")?.parse().map_err(Error::internal)?,
        seed: row.int("seed")?,
        cost: unsigned(row, "cost")?,
        created_at: from_millis(row.int("created_at")?),
        started_at: opt_time(row, "started_at")?,
        completed_at: opt_time(row, "completed_at")?,
        error_code: row.opt_text("error_code")?,
        error_message: row.opt_text("error_message")?,
        purged: row.int("purged")? != 0,
        runs: u32::try_from(row.int("runs")?).map_err(Error::internal)?,
        webhook_url: row.opt_text("webhook_url")?,
        model: row.text("model")?,
        key_id: row.opt_text("key_id")?,
        spend: None,
    })
}

fn webhook_state(text: &str) -> Result<WebhookState> {
    Ok(match text {
        "pending" => WebhookState::Pending,
        "delivered" => WebhookState::Delivered,
        "failed" => WebhookState::Failed,
        other => {
            return Err(Error::internal(format!(
                "webhook delivery in unknown state {other:?}"
            )))
        }
    })
}

/// A delivery row, without its attempts.
pub(crate) fn delivery(row: &impl Columns) -> Result<WebhookDeliveryRecord> {
    Ok(WebhookDeliveryRecord {
        task_id: row.text("task_id")?,
        account_id: row.text("account_id")?,
        url: row.text("url")?,
        state: webhook_state(&row.text("state")?)?,
        attempts: u32::try_from(row.int("attempts")?).map_err(Error::internal)?,
        next_attempt_at: opt_time(row, "next_attempt_at")?,
        delivered_at: opt_time(row, "delivered_at")?,
        created_at: from_millis(row.int("created_at")?),
        history: Vec::new(),
    })
}

/// An attempt row, with the task it belongs to.
pub(crate) fn attempt(row: &impl Columns) -> Result<(String, WebhookAttemptRecord)> {
    Ok((
        row.text("task_id")?,
        WebhookAttemptRecord {
            number: u32::try_from(row.int("number")?).map_err(Error::internal)?,
            at: from_millis(row.int("at")?),
            status: row
                .opt_int("status")?
                .map(u16::try_from)
                .transpose()
                .map_err(Error::internal)?,
            error: row.opt_text("error")?,
        },
    ))
}

/// Attaches attempts (ordered by task and number) to their deliveries.
pub(crate) fn with_history(
    mut deliveries: Vec<WebhookDeliveryRecord>,
    attempts: Vec<(String, WebhookAttemptRecord)>,
) -> Vec<WebhookDeliveryRecord> {
    for (task_id, attempt) in attempts {
        if let Some(d) = deliveries.iter_mut().find(|d| d.task_id == task_id) {
            d.history.push(attempt);
        }
    }
    deliveries
}

/// The columns `record_webhook_attempt` writes for what follows an attempt: state,
/// next_attempt_at, delivered_at.
pub(crate) fn next_columns(
    next: DeliveryNext,
    at: OffsetDateTime,
) -> (&'static str, Option<i64>, Option<i64>) {
    match next {
        DeliveryNext::Delivered => ("delivered", None, Some(to_millis(at))),
        DeliveryNext::RetryAt(when) => ("pending", Some(to_millis(when)), None),
        DeliveryNext::GiveUp => ("failed", None, None),
    }
}

pub(crate) fn ledger(row: &impl Columns) -> Result<LedgerEntry> {
    Ok(LedgerEntry {
        id: row.int("id")?,
        account_id: row.text("account_id")?,
        delta: row.int("delta")?,
        balance_after: unsigned(row, "balance_after")?,
        kind: row.text("kind")?,
        task_id: row.opt_text("task_id")?,
        note: row.opt_text("note")?,
        purchase_id: row.opt_text("purchase_id")?,
        created_at: from_millis(row.int("created_at")?),
    })
}

pub(crate) fn voucher(row: &impl Columns) -> Result<VoucherRecord> {
    Ok(VoucherRecord {
        id: row.text("id")?,
        code_hash: row.text("code_hash")?,
        prefix: row.text("prefix")?,
        credits: unsigned(row, "credits")?,
        note: row.opt_text("note")?,
        created_at: from_millis(row.int("created_at")?),
        expires_at: opt_time(row, "expires_at")?,
        redeemed_at: opt_time(row, "redeemed_at")?,
        redeemed_by: row.opt_text("redeemed_by")?,
    })
}

/// What a voucher that the guarded update did not mark is: unknown, used, expired, or (it is
/// fine) the account was missing.
pub(crate) fn refused_redemption(
    existing: Option<VoucherRecord>,
    now: OffsetDateTime,
) -> RedeemOutcome {
    match existing {
        None => RedeemOutcome::Unknown,
        Some(v) if v.redeemed_at.is_some() => RedeemOutcome::AlreadyRedeemed,
        Some(v) if v.expires_at.is_some_and(|at| at <= now) => RedeemOutcome::Expired,
        Some(_) => RedeemOutcome::NoAccount,
    }
}

/// The ledger note of a redemption: which code, by its prefix.
pub(crate) fn voucher_note(voucher: &VoucherRecord) -> String {
    format!("voucher {}…", voucher.prefix)
}

/// The columns a session is stored in: kind, account, key, operator-token hash.
pub(crate) fn session_fields(
    principal: &SessionPrincipal,
) -> (&'static str, Option<&str>, Option<&str>, Option<&str>) {
    match principal {
        SessionPrincipal::Account { account_id, key_id } => {
            ("account", Some(account_id), Some(key_id), None)
        }
        SessionPrincipal::Operator { admin_token_hash } => {
            ("operator", None, None, Some(admin_token_hash))
        }
    }
}

pub(crate) fn session(row: &impl Columns) -> Result<SessionRecord> {
    let principal = match row.text("kind")?.as_str() {
        "account" => SessionPrincipal::Account {
            account_id: row.text("account_id")?,
            key_id: row.text("key_id")?,
        },
        "operator" => SessionPrincipal::Operator {
            admin_token_hash: row.text("admin_token_hash")?,
        },
        other => {
            return Err(Error::internal(format!(
                "session of unknown kind {other:?}"
            )))
        }
    };
    Ok(SessionRecord {
        token_hash: row.text("token_hash")?,
        principal,
        created_at: from_millis(row.int("created_at")?),
        expires_at: from_millis(row.int("expires_at")?),
    })
}

/// A row of `(day, spent)`: the day as a number of days since 1970-01-01 (UTC).
pub(crate) fn daily_spend(row: &impl Columns) -> Result<DailySpend> {
    let julian = i32::try_from(row.int("day")? + 2_440_588).map_err(Error::internal)?;
    Ok(DailySpend {
        day: time::Date::from_julian_day(julian).map_err(Error::internal)?,
        credits: row.int("spent")?,
    })
}

/// The 400 of an adjustment that would take a balance below zero.
/// The 409 of a grant or correction the balance cannot take: below zero, or above
/// [`tollgate_contract::MAX_CREDITS`].
pub(crate) fn out_of_range(amount: i64, current: i64) -> Error {
    let (limit, side) = if amount < 0 {
        (0, "below zero")
    } else {
        (tollgate_contract::MAX_CREDITS, "above the largest balance")
    };
    Error::invalid(
        tollgate_contract::ErrorCode::BalanceOutOfRange,
        "amount",
        format!("An adjustment of {amount} would take the balance of {current} {side} ({limit})."),
    )
}
