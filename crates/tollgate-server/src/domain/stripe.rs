//! Stripe's side of the money: the Checkout Session request, the signature on its events, and
//! the shapes of the events read (what Stripe's API reference documents; nothing else is read).
//!
//! Stripe signs an event as tollgate signs its webhooks: `Stripe-Signature: t=<unix seconds>,
//! v1=<hex HMAC-SHA256 of "<t>.<raw body>">`, so the check is `tollgate_contract::webhook::verify`.

use crate::config::BillingConfig;
use crate::domain::backends::upstream::Upstream;
use crate::domain::backends::BackendError;
use crate::error::{Error, Result};
use serde::Deserialize;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tollgate_contract::retry::RetryPolicy;
use tollgate_contract::{webhook, CreditPack, ErrorCode};

/// How long creating a Checkout Session may take, Stripe's retries included.
const CHECKOUT_DEADLINE: Duration = Duration::from_secs(20);
/// How old a signed event may be (Stripe's libraries use the same five minutes).
pub const TOLERANCE: Duration = Duration::from_secs(300);

/// Stripe's API under the operator's secret key.
pub struct Stripe {
    config: BillingConfig,
    api: Upstream,
}

impl std::fmt::Debug for Stripe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stripe")
            .field("api_base", &self.config.api_base)
            .finish_non_exhaustive()
    }
}

/// What a Checkout Session's creation answers, as far as it is read.
#[derive(Debug, Deserialize)]
struct SessionCreated {
    id: String,
    url: Option<String>,
}

/// An event: `{"id", "type", "data": {"object": {...}}}`.
#[derive(Debug, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub data: EventData,
}

#[derive(Debug, Deserialize)]
pub struct EventData {
    pub object: serde_json::Value,
}

/// A Checkout Session, as `checkout.session.*` events carry it.
#[derive(Debug, Deserialize)]
pub struct Session {
    pub id: String,
    pub client_reference_id: Option<String>,
    pub payment_status: Option<String>,
    pub amount_total: Option<u64>,
    pub currency: Option<String>,
    /// An id, or the expanded object.
    pub payment_intent: Option<serde_json::Value>,
    #[serde(default)]
    pub metadata: std::collections::HashMap<String, String>,
}

impl Session {
    pub fn payment_intent_id(&self) -> Option<String> {
        match &self.payment_intent {
            Some(serde_json::Value::String(id)) => Some(id.clone()),
            Some(serde_json::Value::Object(object)) => object
                .get("id")
                .and_then(|id| id.as_str())
                .map(str::to_owned),
            _ => None,
        }
    }
}

/// A Charge, as `charge.refunded` carries it.
#[derive(Debug, Deserialize)]
pub struct Charge {
    pub id: String,
    pub payment_intent: Option<String>,
    pub amount: u64,
    pub amount_refunded: u64,
}

impl Stripe {
    pub fn new(config: BillingConfig) -> Result<Stripe> {
        let api = Upstream::new(
            &config.api_base,
            config.secret_key.clone(),
            "Bearer",
            RetryPolicy::default(),
        )?;
        Ok(Stripe { config, api })
    }

    pub fn packs(&self) -> &[CreditPack] {
        &self.config.packs
    }

    /// The pack of `credits`, or a 400 that lists those for sale.
    pub fn pack(&self, credits: u64) -> Result<&CreditPack> {
        self.config
            .packs
            .iter()
            .find(|p| p.credits == credits)
            .ok_or_else(|| {
                let sold: Vec<String> =
                    self.packs().iter().map(|p| p.credits.to_string()).collect();
                Error::invalid(
                    ErrorCode::InvalidValue,
                    "pack",
                    format!(
                        "There is no pack of {credits} credits; `pack` is one of {}.",
                        sold.join(", ")
                    ),
                )
            })
    }

    /// Creates a Checkout Session for one `pack` bought by `account_id`: its id and URL.
    /// `idempotency_key` makes a repeated request (ours, or the caller's retry) one session.
    pub async fn create_session(
        &self,
        account_id: &str,
        pack: &CreditPack,
        success_url: &str,
        cancel_url: &str,
        idempotency_key: &str,
    ) -> Result<(String, String)> {
        let credits = pack.credits.to_string();
        let form: Vec<(String, String)> = [
            ("mode", "payment"),
            ("client_reference_id", account_id),
            ("success_url", success_url),
            ("cancel_url", cancel_url),
            ("line_items[0][quantity]", "1"),
            ("line_items[0][price_data][currency]", &pack.currency),
            (
                "line_items[0][price_data][unit_amount]",
                &pack.amount.to_string(),
            ),
            (
                "line_items[0][price_data][product_data][name]",
                &format!("{credits} credits"),
            ),
            ("metadata[account_id]", account_id),
            ("metadata[credits]", &credits),
            ("payment_intent_data[metadata][account_id]", account_id),
            ("payment_intent_data[metadata][credits]", &credits),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let deadline = Instant::now() + CHECKOUT_DEADLINE;
        let body = self
            .api
            .post_form(
                &self.api.url("/v1/checkout/sessions"),
                &form,
                idempotency_key,
                "stripe checkout",
                deadline,
            )
            .await
            .map_err(|e| match e {
                // Stripe down, slow or limiting us: the buyer can try again shortly.
                BackendError::Exhausted { .. } | BackendError::Timeout => Error::Unavailable {
                    reason: "the payment provider cannot be reached",
                    retry_after: Duration::from_secs(5),
                },
                // Stripe refused what we sent: the operator's configuration (a bad key, an
                // unknown currency). The log has Stripe's reason, the buyer a 500.
                BackendError::Rejected { reason } | BackendError::Internal(reason) => {
                    Error::internal(format!("Stripe refused the Checkout Session: {reason}"))
                }
            })?;
        let created: SessionCreated = serde_json::from_slice(&body)
            .map_err(|e| Error::internal(format!("Stripe's Checkout Session answer: {e}")))?;
        let url = created
            .url
            .ok_or_else(|| Error::internal("Stripe's Checkout Session has no url"))?;
        Ok((created.id, url))
    }

    /// The event of a delivery whose `Stripe-Signature` checks out under the webhook secret.
    pub fn verify(&self, signature: Option<&str>, body: &[u8]) -> Result<Event> {
        let refuse = |why: &str| {
            Error::invalid(
                ErrorCode::InvalidSignature,
                "Stripe-Signature",
                format!("The Stripe-Signature header {why}; the event was not processed."),
            )
        };
        let header = signature.ok_or_else(|| refuse("is missing"))?;
        webhook::verify(
            self.config.webhook_secret.expose(),
            header,
            body,
            TOLERANCE,
            SystemTime::now(),
        )
        .map_err(|e| match e {
            webhook::WebhookError::Malformed => refuse("is not of the form t=<seconds>,v1=<hex>"),
            webhook::WebhookError::Stale => refuse("is older than 5 minutes"),
            webhook::WebhookError::Mismatch => {
                refuse("does not match the body under this endpoint's secret")
            }
        })?;
        serde_json::from_slice(body).map_err(|e| {
            Error::invalid(
                ErrorCode::InvalidJson,
                "body",
                format!("The event is not a Stripe event: {e}."),
            )
        })
    }

    /// The credits a paid session buys: the pack named in its metadata, else the pack of its
    /// price and currency.
    pub fn credits_of(&self, session: &Session) -> Option<u64> {
        if let Some(credits) = session
            .metadata
            .get("credits")
            .and_then(|c| c.parse::<u64>().ok())
            .filter(|c| *c > 0 && *c <= tollgate_contract::MAX_CREDITS)
        {
            return Some(credits);
        }
        let currency = session.currency.as_deref()?.to_ascii_lowercase();
        let amount = session.amount_total?;
        self.packs()
            .iter()
            .find(|p| p.amount == amount && p.currency == currency)
            .map(|p| p.credits)
    }
}
