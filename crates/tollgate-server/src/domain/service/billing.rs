//! Money in and its rules: Stripe Checkout top-ups and their refunds, credits that expire, spend
//! limits per key, low-balance alerts.

use super::*;
use crate::domain::stripe::{Charge, Session};
use crate::store::{PaidSession, PurchaseOutcome, PurchaseRecord, SpendCap};
use tollgate_contract::{
    CheckoutRequest, CheckoutSession, CreditPack, KeySpend, LowBalance, Purchase, SpendLimit,
    SpendPeriod,
};

/// Accounts whose due credits one round of the expiry job settles.
const EXPIRY_BATCH: u32 = 200;

/// The period of a spend limit that `now` falls in: its start, and its end (`None` for `total`).
/// Calendar periods in UTC; weeks start on Monday.
pub fn spend_period(
    period: SpendPeriod,
    now: OffsetDateTime,
) -> (OffsetDateTime, Option<OffsetDateTime>) {
    let midnight = now.replace_time(time::Time::MIDNIGHT);
    match period {
        SpendPeriod::Day => (midnight, Some(midnight + time::Duration::DAY)),
        SpendPeriod::Week => {
            let start =
                midnight - time::Duration::days(i64::from(now.weekday().number_days_from_monday()));
            (start, Some(start + time::Duration::WEEK))
        }
        SpendPeriod::Month => {
            let start = midnight.replace_day(1).unwrap_or(midnight);
            let (year, month) = match start.month() {
                time::Month::December => (start.year() + 1, time::Month::January),
                month => (start.year(), month.next()),
            };
            let end = start
                .replace_day(1)
                .and_then(|d| d.replace_year(year))
                .and_then(|d| d.replace_month(month))
                .ok();
            (start, end)
        }
        SpendPeriod::Total => (OffsetDateTime::UNIX_EPOCH, None),
    }
}

/// The cap a charge at `now` counts against.
pub(crate) fn spend_cap(limit: SpendLimit, now: OffsetDateTime) -> SpendCap {
    let (period_start, resets_at) = spend_period(limit.period, now);
    SpendCap {
        limit,
        period_start,
        resets_at,
    }
}

pub(super) fn validate_spend_limit(limit: Option<SpendLimit>) -> Result<()> {
    if let Some(limit) = limit {
        if limit.credits == 0 || limit.credits > MAX_CREDITS {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "spend_limit.credits",
                format!("`spend_limit.credits` must be 1 to {MAX_CREDITS}."),
            ));
        }
    }
    Ok(())
}

fn not_configured() -> Error {
    Error::InvalidRequest {
        code: ErrorCode::BillingNotConfigured,
        message: "This server takes no payments: ask the operator for credits.".to_owned(),
        param: None,
    }
}

fn purchase_view(p: PurchaseRecord) -> Purchase {
    Purchase {
        id: p.session_id,
        account_id: p.account_id,
        credits: p.credits,
        amount: p.amount,
        currency: p.currency,
        status: p.state,
        refunded_amount: p.refunded_amount,
        refunded_credits: p.refunded_credits,
        shortfall: p.shortfall,
        created_at: p.created_at,
        paid_at: p.paid_at,
    }
}

impl Tollgate {
    /// The packs for sale; empty when Stripe is not configured.
    pub fn credit_packs(&self) -> &[CreditPack] {
        self.stripe.as_ref().map_or(&[], |s| s.packs())
    }

    /// Whether top-ups by card are on.
    pub fn sells_credits(&self) -> bool {
        self.stripe.is_some()
    }

    /// `POST /v1/billing/checkout`: a Stripe Checkout Session for one pack, paid back to the
    /// caller's account. `return_to` is the dashboard's Top up page, where Stripe sends the buyer
    /// back; `request_key` the caller's `Idempotency-Key`, which makes Stripe's one session of
    /// the caller's retries.
    pub async fn checkout(
        &self,
        caller: &Caller,
        request: CheckoutRequest,
        return_to: &str,
        request_key: Option<&str>,
    ) -> Result<CheckoutSession> {
        let stripe = self.stripe.as_ref().ok_or_else(not_configured)?;
        let pack = stripe.pack(request.pack)?.clone();
        self.disk.ensure_headroom()?;
        let idempotency_key = match request_key {
            Some(key) => format!(
                "tollgate-checkout-{}",
                &secrets::hash_secret(&format!("{}\n{}", caller.account_id, key))[..32]
            ),
            None => secrets::new_id("tollgate-checkout")?,
        };
        let (id, url) = stripe
            .create_session(
                &caller.account_id,
                &pack,
                &format!("{return_to}?checkout=success&session_id={{CHECKOUT_SESSION_ID}}"),
                &format!("{return_to}?checkout=canceled"),
                &idempotency_key,
            )
            .await?;
        self.store
            .open_purchase(&PurchaseRecord {
                session_id: id.clone(),
                account_id: caller.account_id.clone(),
                credits: pack.credits,
                amount: pack.amount,
                currency: pack.currency.clone(),
                state: "open".to_owned(),
                payment_intent: None,
                refunded_amount: 0,
                refunded_credits: 0,
                shortfall: 0,
                created_at: self.now(),
                paid_at: None,
            })
            .await?;
        tracing::info!(account_id = %caller.account_id, session_id = %id, credits = pack.credits, "checkout session created");
        Ok(CheckoutSession { url, id })
    }

    /// `POST /webhooks/stripe`: checks the signature on the raw body, then credits a paid
    /// session (once, however often it is delivered) or takes a refund back. Other events are
    /// acknowledged and ignored.
    pub async fn stripe_event(&self, signature: Option<&str>, body: &[u8]) -> Result<()> {
        let stripe = self.stripe.as_ref().ok_or_else(not_configured)?;
        let event = stripe.verify(signature, body)?;
        match event.event_type.as_str() {
            "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
                let session: Session = serde_json::from_value(event.data.object).map_err(|e| {
                    Error::invalid(
                        ErrorCode::InvalidValue,
                        "data.object",
                        format!("The event's Checkout Session cannot be read: {e}."),
                    )
                })?;
                self.session_paid(stripe, &event.id, session).await
            }
            "charge.refunded" => {
                let charge: Charge = serde_json::from_value(event.data.object).map_err(|e| {
                    Error::invalid(
                        ErrorCode::InvalidValue,
                        "data.object",
                        format!("The event's Charge cannot be read: {e}."),
                    )
                })?;
                self.charge_refunded(&event.id, charge).await
            }
            other => {
                tracing::debug!(event_id = %event.id, event_type = other, "Stripe event ignored");
                Ok(())
            }
        }
    }

    async fn session_paid(
        &self,
        stripe: &crate::domain::stripe::Stripe,
        event_id: &str,
        session: Session,
    ) -> Result<()> {
        if session.payment_status.as_deref() != Some("paid") {
            tracing::info!(event_id, session_id = %session.id, status = ?session.payment_status, "checkout session not paid yet");
            return Ok(());
        }
        let Some(account_id) = session.client_reference_id.clone() else {
            tracing::warn!(event_id, session_id = %session.id, "paid checkout session without client_reference_id: nothing credited");
            return Ok(());
        };
        let Some(credits) = stripe.credits_of(&session) else {
            tracing::warn!(event_id, session_id = %session.id, "paid checkout session for no known pack: nothing credited");
            return Ok(());
        };
        self.disk.ensure_headroom()?;
        let paid = PaidSession {
            session_id: session.id.clone(),
            account_id,
            credits,
            amount: session.amount_total.unwrap_or(0),
            currency: session
                .currency
                .as_deref()
                .unwrap_or("")
                .to_ascii_lowercase(),
            payment_intent: session.payment_intent_id(),
        };
        match self.store.complete_purchase(&paid, self.now()).await? {
            PurchaseOutcome::Credited(account) => {
                tracing::info!(event_id, session_id = %paid.session_id, account_id = %account.id, balance = account.credits, "purchase credited");
                self.metrics.credits_purchased.inc_by(credits);
            }
            PurchaseOutcome::AlreadyCredited => {
                tracing::info!(event_id, session_id = %paid.session_id, "purchase credited before; delivery acknowledged")
            }
            PurchaseOutcome::NoAccount => {
                tracing::warn!(event_id, session_id = %paid.session_id, account_id = %paid.account_id, "paid checkout session for no account: nothing credited")
            }
        }
        Ok(())
    }

    async fn charge_refunded(&self, event_id: &str, charge: Charge) -> Result<()> {
        let Some(payment_intent) = &charge.payment_intent else {
            tracing::info!(event_id, charge_id = %charge.id, "refund of a charge without a payment intent: not a purchase");
            return Ok(());
        };
        let refunded = self
            .store
            .refund_purchase(
                payment_intent,
                charge.amount_refunded,
                charge.amount,
                self.now(),
            )
            .await?;
        match refunded {
            Some(r) if r.shortfall > 0 => {
                tracing::warn!(event_id, session_id = %r.session_id, account_id = %r.account_id, taken = r.taken, shortfall = r.shortfall, "purchase refunded; the balance could not give everything back")
            }
            Some(r) => {
                tracing::info!(event_id, session_id = %r.session_id, account_id = %r.account_id, taken = r.taken, "purchase refunded")
            }
            None => {
                tracing::info!(event_id, charge_id = %charge.id, "refund of no purchase, or handled before")
            }
        }
        Ok(())
    }

    /// The account's purchases, newest first (operator).
    pub async fn purchases(&self, account_id: &str) -> Result<List<Purchase>> {
        self.account(account_id).await?;
        let data = self
            .store
            .list_purchases(Some(account_id), MAX_LIST_LIMIT)
            .await?
            .into_iter()
            .map(purchase_view)
            .collect();
        Ok(List {
            object: "list".to_owned(),
            data,
            has_more: false,
        })
    }

    /// Every account's purchases, newest first (the operator's overview).
    pub async fn all_purchases(&self, limit: u32) -> Result<Vec<Purchase>> {
        Ok(self
            .store
            .list_purchases(None, limit)
            .await?
            .into_iter()
            .map(purchase_view)
            .collect())
    }

    /// One round of the expiry job: what lapsed by now leaves the balances.
    pub async fn expire_credits(&self) -> Result<u64> {
        self.store.expire_credits(self.now(), EXPIRY_BATCH).await
    }

    /// The key's spend limit as it stands now.
    pub(super) async fn key_spend(
        &self,
        limit: Option<SpendLimit>,
        key_id: &str,
    ) -> Result<Option<KeySpend>> {
        let Some(limit) = limit else {
            return Ok(None);
        };
        let (start, resets_at) = spend_period(limit.period, self.now());
        Ok(Some(KeySpend {
            credits: limit.credits,
            period: limit.period,
            spent: self.store.key_spent(key_id, start).await?,
            resets_at,
        }))
    }

    pub(super) async fn validate_low_balance(&self, alert: Option<&LowBalance>) -> Result<()> {
        let Some(alert) = alert else {
            return Ok(());
        };
        if alert.threshold == 0 || alert.threshold > MAX_CREDITS {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "low_balance.threshold",
                format!("`low_balance.threshold` must be 1 to {MAX_CREDITS}."),
            ));
        }
        webhooks::check_url(&alert.notify_url, self.config.allow_private_webhooks)
            .await
            .map_err(|refusal| webhooks::invalid_url_of("low_balance.notify_url", refusal))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn periods_are_calendar_periods_in_utc() {
        let now = datetime!(2026-12-31 23:59:59.5 UTC); // a Thursday
        assert_eq!(
            spend_period(SpendPeriod::Day, now),
            (
                datetime!(2026-12-31 0:00 UTC),
                Some(datetime!(2027-01-01 0:00 UTC))
            )
        );
        assert_eq!(
            spend_period(SpendPeriod::Week, now),
            (
                datetime!(2026-12-28 0:00 UTC),
                Some(datetime!(2027-01-04 0:00 UTC))
            )
        );
        assert_eq!(
            spend_period(SpendPeriod::Month, now),
            (
                datetime!(2026-12-01 0:00 UTC),
                Some(datetime!(2027-01-01 0:00 UTC))
            )
        );
        assert_eq!(
            spend_period(SpendPeriod::Month, datetime!(2027-01-31 12:00 UTC)),
            (
                datetime!(2027-01-01 0:00 UTC),
                Some(datetime!(2027-02-01 0:00 UTC))
            )
        );
        assert_eq!(
            spend_period(SpendPeriod::Total, now),
            (OffsetDateTime::UNIX_EPOCH, None)
        );
    }
}
