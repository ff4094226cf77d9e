//! The OpenAPI 3.1 document, generated from the handlers' annotations (utoipa).

use super::routes;
use crate::domain::service::{Tollgate, MAX_CREDIT_NOTE_CHARS, MAX_NAME_CHARS, MAX_PROMPT_CHARS};
use crate::domain::{vouchers, webhooks};
use serde_json::{json, Value};
use tollgate_contract::{MAX_CREDITS, NOT_BLANK_PATTERN, TEXT_PATTERN};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(title = "tollgate", description = "Paid, asynchronous image generation. Every error is `{\"error\": {\"message\", \"type\", \"code\"}}`."),
    paths(
        routes::create_generation, routes::get_task, routes::list_tasks, routes::cancel_task, routes::task_image, routes::linked_image,
        routes::account, routes::models, routes::create_account, routes::list_accounts, routes::get_account, routes::update_account,
        routes::create_key, routes::list_keys, routes::revoke_key, routes::add_credits, routes::account_ledger,
        routes::admin_ledger, routes::create_voucher, routes::list_vouchers, routes::redeem_voucher,
        routes::webhook_secret, routes::rotate_webhook_secret,
        routes::credit_packs, routes::checkout, routes::stripe_webhook, routes::list_purchases,
        routes::healthz, routes::readyz, routes::metrics, routes::openapi,
    ),
    modifiers(&Security),
)]
struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for name in ["api_key", "admin_token"] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// The document served at `/openapi.json`: the annotations, with every bound the domain checks
/// written into its schemas from the same constants, and this server's models as the enum of
/// `model`, so that what a client generates from the document is what the server accepts.
pub fn document(app: &Tollgate) -> serde_json::Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    let models = app.models().data;
    let max_n = models.iter().map(|m| m.max_n).max().unwrap_or(1);
    let mut model_ids: Vec<Value> = models.into_iter().map(|m| Value::from(m.id)).collect();
    model_ids.push(Value::Null);
    let not_blank =
        |max: usize| json!({"minLength": 1, "maxLength": max, "pattern": NOT_BLANK_PATTERN});
    let count = json!({"type": "integer", "format": "int64", "minimum": 1, "maximum": u32::MAX});
    let bounds = [
        (
            "CreateGenerationRequest",
            "prompt",
            not_blank(MAX_PROMPT_CHARS),
        ),
        (
            "CreateGenerationRequest",
            "n",
            json!({"minimum": 1, "maximum": max_n}),
        ),
        (
            "CreateGenerationRequest",
            "model",
            json!({"enum": model_ids}),
        ),
        (
            "CreateGenerationRequest",
            "webhook_url",
            json!({"maxLength": webhooks::MAX_URL_CHARS, "pattern": webhooks::URL_PATTERN}),
        ),
        ("CreateAccountRequest", "name", not_blank(MAX_NAME_CHARS)),
        (
            "CreateAccountRequest",
            "credits",
            json!({"maximum": MAX_CREDITS}),
        ),
        ("UpdateAccountRequest", "name", not_blank(MAX_NAME_CHARS)),
        ("RateLimit", "requests_per_minute", count.clone()),
        ("RateLimit", "burst", count),
        (
            "AddCreditsRequest",
            "amount",
            json!({"minimum": -(MAX_CREDITS as i64), "maximum": MAX_CREDITS, "not": {"const": 0}}),
        ),
        (
            "AddCreditsRequest",
            "note",
            json!({"maxLength": MAX_CREDIT_NOTE_CHARS, "pattern": TEXT_PATTERN}),
        ),
        (
            "CreateVoucherRequest",
            "credits",
            json!({"minimum": 1, "maximum": vouchers::MAX_VOUCHER_CREDITS}),
        ),
        (
            "CreateVoucherRequest",
            "note",
            json!({"maxLength": vouchers::MAX_NOTE_CHARS, "pattern": TEXT_PATTERN}),
        ),
        (
            "RedeemVoucherRequest",
            "code",
            json!({"minLength": 1, "pattern": NOT_BLANK_PATTERN}),
        ),
        (
            "LowBalance",
            "threshold",
            json!({"minimum": 1, "maximum": MAX_CREDITS}),
        ),
        (
            "LowBalance",
            "notify_url",
            json!({"maxLength": webhooks::MAX_URL_CHARS, "pattern": webhooks::URL_PATTERN}),
        ),
        (
            "SpendLimit",
            "credits",
            json!({"minimum": 1, "maximum": MAX_CREDITS}),
        ),
        (
            "CheckoutRequest",
            "pack",
            json!({"minimum": 1, "maximum": MAX_CREDITS}),
        ),
    ];
    // An expiry is for a grant: a correction (a negative amount) takes none.
    if let Some(credits) = doc
        .pointer_mut("/components/schemas/AddCreditsRequest")
        .and_then(Value::as_object_mut)
    {
        credits.insert(
            "if".into(),
            json!({"properties": {"amount": {"maximum": -1}}, "required": ["amount"]}),
        );
        credits.insert(
            "then".into(),
            json!({"properties": {"expires_at": {"type": "null"}}}),
        );
    }
    for (schema, field, bound) in bounds {
        let property = doc
            .pointer_mut(&format!("/components/schemas/{schema}/properties/{field}"))
            .and_then(Value::as_object_mut);
        // A renamed field would silently lose its bounds: every server start in the tests checks.
        debug_assert!(property.is_some(), "no {schema}.{field} in the document");
        if let (Some(property), Value::Object(bound)) = (property, bound) {
            property.extend(bound);
        }
    }
    doc
}
