//! Handlers: each takes what the route names, calls one domain method, and shapes the answer.

use super::error::Enveloped;
use super::extract::{JsonBody, OptionalJsonBody};
use super::middleware::{IdempotencyReservation, IdempotencyStored};
use super::{wire, AppState};
use crate::domain::links;
use crate::domain::service::Caller;
use crate::error::Error;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tollgate_contract::{
    Account, AddCreditsRequest, CheckoutRequest, CheckoutSession, CreateAccountRequest,
    CreateGenerationRequest, CreateKeyRequest, CreateVoucherRequest, CreatedAccount, CreatedKey,
    CreatedVoucher, CreditPack, ErrorBody, ErrorCode, Health, KeyInfo, LedgerEntry, List, Model,
    Purchase, RedeemVoucherRequest, Task, UpdateAccountRequest, Voucher, WebhookSecret,
};

type AppResult<T> = Result<T, Error>;

/// Query of `GET /v1/tasks`; parsed by hand so a bad `limit` names itself.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// 1–100, default 20.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    limit: Option<String>,
    /// The id of the last task of the previous page.
    after: Option<String>,
}

#[utoipa::path(post, path = "/v1/images/generations", tag = "tasks",
    request_body = CreateGenerationRequest,
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255,
        // Printable ASCII, not starting or ending with a space (HTTP trims those off a header).
        pattern = "^[!-~]([ -~]*[!-~])?$",
        description = "1–255 printable ASCII; a retry with the same key and body replays the first answer")),
    responses(
        (status = 202, description = "Accepted, charged and queued", body = Task),
        (status = 400, description = "Malformed or invalid request; `param` names the field", body = ErrorBody),
        (status = 415, description = "The body is not sent as JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 402, description = "The balance does not cover the cost; nothing created or charged", body = ErrorBody),
        (status = 409, description = "The first request with this Idempotency-Key is still running", body = ErrorBody),
        (status = 413, description = "Body above 1 MiB", body = ErrorBody),
        (status = 429, description = "Rate limited; see Retry-After", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
        (status = 503, description = "Shutting down or overloaded; see Retry-After", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn create_generation(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    reservation: Option<Extension<IdempotencyReservation>>,
    JsonBody(request): JsonBody<CreateGenerationRequest>,
) -> AppResult<Response> {
    let scope = reservation
        .as_ref()
        .map(|Extension(IdempotencyReservation(scope))| scope);
    let task = state.app.create_generation(&caller, request, scope).await?;
    let task = wire::for_client(task, state.app.config());
    let mut response = (StatusCode::ACCEPTED, Json(task)).into_response();
    if scope.is_some() {
        response.extensions_mut().insert(IdempotencyStored);
    }
    Ok(response)
}

/// Query of `GET /v1/tasks/{id}`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Seconds (0–60, fractions allowed) to hold the answer while the task is queued or
    /// running: it comes as soon as the task finishes, else at the end with its state then.
    #[param(value_type = Option<f64>, minimum = 0, maximum = 60)]
    wait: Option<String>,
}

/// The longest `?wait=` a client may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);

fn parse_wait(wait: Option<&str>) -> AppResult<Option<Duration>> {
    let Some(text) = wait else {
        return Ok(None);
    };
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && (0.0..=MAX_WAIT.as_secs_f64()).contains(s))
        .map(|s| Some(Duration::from_secs_f64(s)))
        .ok_or_else(|| {
            Error::invalid(
                ErrorCode::InvalidValue,
                "wait",
                format!(
                    "`wait` must be a number of seconds from 0 to {}, not `{}`.",
                    MAX_WAIT.as_secs(),
                    text.chars().take(40).collect::<String>()
                ),
            )
        })
}

#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks",
    params(("id" = String, Path, description = "task_…"), WaitQuery),
    responses(
        (status = 200, description = "The task", body = Task),
        (status = 400, description = "Bad `wait`", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such task for this account", body = ErrorBody),
        (status = 410, description = "The task is older than the retention", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn get_task(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(query): Query<WaitQuery>,
) -> AppResult<Response> {
    let task = match parse_wait(query.wait.as_deref())? {
        Some(wait) => state.app.wait_task(&caller, &id, wait).await?,
        None => state.app.get_task_shared(&caller, &id).await?,
    };
    let json = state
        .task_json
        .of(&task, &wire::link_base(state.app.config()))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        json,
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/tasks", tag = "tasks", params(ListQuery),
    responses(
        (status = 200, description = "The account's tasks, newest first", body = List<Task>),
        (status = 400, description = "Bad `limit`", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "`after` names no task of this account", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn list_tasks(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<ListQuery>,
) -> AppResult<Json<List<Task>>> {
    let limit = parse_limit(query.limit.as_deref())?;
    let mut list = state
        .app
        .list_tasks(&caller, limit, query.after.as_deref())
        .await?;
    let base = wire::link_base(state.app.config());
    for task in &mut list.data {
        links::absolute(task, &base);
    }
    Ok(Json(list))
}

fn parse_limit(limit: Option<&str>) -> AppResult<Option<u32>> {
    limit
        .map(|text| {
            text.parse::<u32>().map_err(|_| {
                Error::invalid(
                    ErrorCode::InvalidValue,
                    "limit",
                    "`limit` must be a whole number from 1 to 100.",
                )
            })
        })
        .transpose()
}

/// A `limit` alone.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LimitQuery {
    /// 1–100, default 100.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    limit: Option<String>,
}

/// Query of the ledger routes.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LedgerQuery {
    /// 1–100, default 100.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    limit: Option<String>,
    /// The `id` of the last entry of the previous page: the entries older than it.
    #[param(value_type = Option<i64>)]
    after: Option<String>,
}

impl LedgerQuery {
    fn page(&self) -> AppResult<(Option<u32>, Option<i64>)> {
        let after = self
            .after
            .as_deref()
            .map(|after| {
                after.parse::<i64>().map_err(|_| {
                    Error::invalid(
                        ErrorCode::InvalidValue,
                        "after",
                        "`after` must be the `id` of a ledger entry (a whole number).",
                    )
                })
            })
            .transpose()?;
        Ok((parse_limit(self.limit.as_deref())?, after))
    }
}

#[utoipa::path(get, path = "/v1/account/ledger", tag = "account", params(LedgerQuery),
    responses(
        (status = 200, description = "The caller's ledger, newest first (extension)", body = List<LedgerEntry>),
        (status = 400, description = "Bad `limit`", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn account_ledger(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<LedgerQuery>,
) -> AppResult<Json<List<LedgerEntry>>> {
    let (limit, after) = query.page()?;
    Ok(Json(
        state.app.ledger(&caller.account_id, limit, after).await?,
    ))
}

#[utoipa::path(get, path = "/v1/account/webhook-secret", tag = "account",
    responses(
        (status = 200, description = "The secret that signs this account's webhook deliveries (extension)", body = WebhookSecret),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn webhook_secret(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> AppResult<Json<WebhookSecret>> {
    Ok(Json(state.app.webhook_secret(&caller).await?))
}

#[utoipa::path(post, path = "/v1/account/webhook-secret", tag = "account",
    responses(
        (status = 200, description = "A new webhook secret; deliveries are signed with it from now on (extension)", body = WebhookSecret),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 409, description = "A request with this Idempotency-Key is still running", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn rotate_webhook_secret(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> AppResult<Json<WebhookSecret>> {
    Ok(Json(state.app.rotate_webhook_secret(&caller).await?))
}

#[utoipa::path(get, path = "/admin/accounts/{id}/ledger", tag = "admin",
    params(("id" = String, Path, description = "acct_…"), LedgerQuery),
    responses(
        (status = 200, description = "The account's ledger, newest first (extension)", body = List<LedgerEntry>),
        (status = 400, description = "Bad `limit`", body = ErrorBody),
        (status = 401, description = "Missing or invalid admin token", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn admin_ledger(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(query): Query<LedgerQuery>,
) -> AppResult<Json<List<LedgerEntry>>> {
    let (limit, after) = query.page()?;
    Ok(Json(state.app.ledger(&id, limit, after).await?))
}

#[utoipa::path(get, path = "/admin/accounts/{id}/keys", tag = "admin",
    params(("id" = String, Path, description = "acct_…")),
    responses(
        (status = 200, description = "The account's keys, without the secrets (extension)", body = List<KeyInfo>),
        (status = 401, description = "Missing or invalid admin token", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn list_keys(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> AppResult<Json<List<KeyInfo>>> {
    Ok(Json(state.app.list_keys(&id).await?))
}

#[utoipa::path(post, path = "/v1/tasks/{id}/cancel", tag = "tasks",
    params(("id" = String, Path, description = "task_…")),
    responses(
        (status = 200, description = "Cancelled and refunded (or already cancelled)", body = Task),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such task for this account", body = ErrorBody),
        (status = 409, description = "Running or finished: cannot be cancelled", body = ErrorBody),
        (status = 410, description = "The task is older than the retention", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn cancel_task(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> AppResult<Json<Task>> {
    let task = state.app.cancel_task(&caller, &id).await?;
    Ok(Json(wire::for_client(task, state.app.config())))
}

/// Query of a signed image link.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LinkQuery {
    /// When the link stops working, in Unix seconds.
    expires: Option<String>,
    /// The link's signature (hex).
    signature: Option<String>,
}

#[utoipa::path(get, path = "/v1/links/{task_id}/{file}", tag = "tasks",
    params(
        ("task_id" = String, Path, description = "task_…"),
        ("file" = String, Path, description = "`{index}.png`"),
        LinkQuery,
    ),
    responses(
        (status = 200, description = "PNG bytes, cacheable until the link expires", content_type = "image/png", body = Vec<u8>),
        (status = 404, description = "Not a link this server made (forged or altered), or no such image", body = ErrorBody),
        (status = 410, description = "The link expired (`url_expired`), or the task is older than the retention", body = ErrorBody),
    ))]
/// An image by its signed link, as `images[].url` gives it: no API key.
pub async fn linked_image(
    State(state): State<Arc<AppState>>,
    Path((task_id, file)): Path<(String, String)>,
    Query(query): Query<LinkQuery>,
) -> AppResult<Response> {
    let (png, left) = state
        .app
        .linked_image(
            &task_id,
            &file,
            query.expires.as_deref().unwrap_or_default(),
            query.signature.as_deref().unwrap_or_default(),
        )
        .await?;
    // The bytes behind a link never change: a browser or CDN may keep them while it is valid.
    let cache = format!("public, max-age={left}, immutable");
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("image/png")),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_str(&cache).map_err(Error::internal)?,
            ),
            (
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        png,
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/tasks/{id}/images/{index}", tag = "tasks",
    params(("id" = String, Path, description = "task_…"), ("index" = u8, Path, description = "0-based image index")),
    responses(
        (status = 200, description = "PNG bytes", content_type = "image/png", body = Vec<u8>),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such task or image (yet)", body = ErrorBody),
        (status = 410, description = "The task is older than the retention", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn task_image(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, index)): Path<(String, String)>,
) -> AppResult<Response> {
    let png = state.app.task_image(&caller, &id, &index).await?;
    Ok(png_response(png))
}

/// A task's image as a response: it never changes, but it is the account's.
pub(crate) fn png_response(png: impl IntoResponse) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("image/png")),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, max-age=86400, immutable"),
            ),
        ],
        png,
    )
        .into_response()
}

#[utoipa::path(get, path = "/v1/account", tag = "account",
    responses(
        (status = 200, description = "The caller's account", body = Account),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn account(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> AppResult<Json<Account>> {
    Ok(Json(state.app.account(&caller.account_id).await?))
}

#[utoipa::path(get, path = "/v1/models", tag = "models",
    responses(
        (status = 200, description = "The models for sale, with their prices per size and max_n", body = List<Model>),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn models(State(state): State<Arc<AppState>>) -> Json<List<Model>> {
    Json(state.app.models())
}

#[utoipa::path(post, path = "/admin/accounts", tag = "admin", request_body = CreateAccountRequest,
    responses(
        (status = 201, description = "Created; the API key is shown this once", body = CreatedAccount),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 415, description = "The body is not sent as JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid admin token", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn create_account(
    State(state): State<Arc<AppState>>,
    JsonBody(request): JsonBody<CreateAccountRequest>,
) -> AppResult<(StatusCode, Json<CreatedAccount>)> {
    Ok((
        StatusCode::CREATED,
        Json(state.app.create_account(request).await?),
    ))
}

#[utoipa::path(get, path = "/admin/accounts", tag = "admin",
    responses(
        (status = 200, description = "Every account", body = List<Account>),
        (status = 401, description = "Missing or invalid admin token", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn list_accounts(State(state): State<Arc<AppState>>) -> AppResult<Json<List<Account>>> {
    Ok(Json(state.app.list_accounts().await?))
}

#[utoipa::path(get, path = "/admin/accounts/{id}", tag = "admin",
    params(("id" = String, Path, description = "acct_…")),
    responses(
        (status = 200, description = "The account", body = Account),
        (status = 401, description = "Missing or invalid admin token", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn get_account(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> AppResult<Json<Account>> {
    Ok(Json(state.app.account(&id).await?))
}

#[utoipa::path(patch, path = "/admin/accounts/{id}", tag = "admin", request_body = UpdateAccountRequest,
    params(("id" = String, Path, description = "acct_…")),
    responses(
        (status = 200, description = "The updated account", body = Account),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 415, description = "The body is not sent as JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid admin token", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn update_account(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<UpdateAccountRequest>,
) -> AppResult<Json<Account>> {
    Ok(Json(state.app.update_account(&id, request).await?))
}

#[utoipa::path(post, path = "/admin/accounts/{id}/keys", tag = "admin",
    request_body(content = Option<CreateKeyRequest>, description = "Optional: the key's spend limit"),
    params(("id" = String, Path, description = "acct_…")),
    responses(
        (status = 201, description = "A new key, shown this once", body = CreatedKey),
        (status = 400, description = "Invalid spend limit", body = ErrorBody),
        (status = 415, description = "The body is not sent as JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid admin token", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn create_key(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    OptionalJsonBody(request): OptionalJsonBody<CreateKeyRequest>,
) -> AppResult<(StatusCode, Json<CreatedKey>)> {
    Ok((
        StatusCode::CREATED,
        Json(state.app.create_key(&id, request).await?),
    ))
}

#[utoipa::path(get, path = "/admin/accounts/{id}/purchases", tag = "admin",
    params(("id" = String, Path, description = "acct_…")),
    responses(
        (status = 200, description = "The account's Stripe purchases, refunds and shortfalls, newest first (extension)", body = List<Purchase>),
        (status = 401, description = "Missing or invalid admin token", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn list_purchases(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> AppResult<Json<List<Purchase>>> {
    Ok(Json(state.app.purchases(&id).await?))
}

#[utoipa::path(get, path = "/v1/billing/packs", tag = "account",
    responses(
        (status = 200, description = "The credit packs for sale; empty when the server takes no payments (extension)", body = List<CreditPack>),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn credit_packs(State(state): State<Arc<AppState>>) -> Json<List<CreditPack>> {
    Json(List {
        object: "list".to_owned(),
        data: state.app.credit_packs().to_vec(),
        has_more: false,
    })
}

#[utoipa::path(post, path = "/v1/billing/checkout", tag = "account", request_body = CheckoutRequest,
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255,
        pattern = "^[!-~]([ -~]*[!-~])?$",
        description = "A retry with the same key and body gets the same Checkout Session")),
    responses(
        (status = 201, description = "A Stripe Checkout Session: send the buyer to `url`", body = CheckoutSession),
        (status = 400, description = "No such pack", body = ErrorBody),
        (status = 415, description = "The body is not sent as JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "`billing_not_configured`: this server takes no payments", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Stripe cannot be reached; retry", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn checkout(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    reservation: Option<Extension<IdempotencyReservation>>,
    JsonBody(request): JsonBody<CheckoutRequest>,
) -> AppResult<(StatusCode, Json<CheckoutSession>)> {
    let return_to = format!(
        "{}{}",
        wire::link_base(state.app.config()),
        super::error::TOP_UP_PATH
    );
    let key = reservation.as_ref().map(|Extension(r)| r.0.key.as_str());
    let session = state
        .app
        .checkout(&caller, request, &return_to, key)
        .await?;
    Ok((StatusCode::CREATED, Json(session)))
}

#[utoipa::path(post, path = "/webhooks/stripe", tag = "billing",
    request_body(content = String, description = "A Stripe event, exactly as Stripe signed it"),
    // Optional in the document: without Stripe configured the route is 404 whatever is sent.
    params(("Stripe-Signature" = Option<String>, Header, description = "t=<unix seconds>,v1=<hex HMAC-SHA256 of \"<t>.<body>\">; required when Stripe is configured")),
    responses(
        (status = 200, description = "Received (a paid session is credited once, a refund taken back)"),
        (status = 400, description = "`invalid_signature`: missing, wrong or older than 5 minutes; nothing was done", body = ErrorBody),
        (status = 404, description = "`billing_not_configured`", body = ErrorBody),
        (status = 503, description = "The store cannot record it now; Stripe delivers again", body = ErrorBody),
    ))]
pub async fn stripe_webhook(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> AppResult<Json<serde_json::Value>> {
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    state.app.stripe_event(signature, &body).await?;
    Ok(Json(serde_json::json!({"received": true})))
}

#[utoipa::path(delete, path = "/admin/keys/{key_id}", tag = "admin",
    params(("key_id" = String, Path, description = "key_…")),
    responses(
        (status = 204, description = "Revoked; refused from the next request on"),
        (status = 401, description = "Missing or invalid admin token", body = ErrorBody),
        (status = 404, description = "No such live key", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn revoke_key(
    State(state): State<Arc<AppState>>,
    Path(key_id): Path<String>,
) -> AppResult<StatusCode> {
    state.app.revoke_key(&key_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/admin/accounts/{id}/credits", tag = "admin", request_body = AddCreditsRequest,
    params(("id" = String, Path, description = "acct_…")),
    responses(
        (status = 200, description = "The account with its new balance", body = Account),
        (status = 400, description = "Invalid amount", body = ErrorBody),
        (status = 415, description = "The body is not sent as JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid admin token", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
        (status = 409, description = "The balance would go below zero or above the largest balance", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn add_credits(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<AddCreditsRequest>,
) -> AppResult<Json<Account>> {
    Ok(Json(state.app.add_credits(&id, request).await?))
}

#[utoipa::path(post, path = "/admin/vouchers", tag = "admin", request_body = CreateVoucherRequest,
    responses(
        (status = 201, description = "A single-use voucher; the code is shown this once (extension)", body = CreatedVoucher),
        (status = 400, description = "Invalid credits, expiry or note", body = ErrorBody),
        (status = 415, description = "The body is not sent as JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid admin token", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn create_voucher(
    State(state): State<Arc<AppState>>,
    JsonBody(request): JsonBody<CreateVoucherRequest>,
) -> AppResult<(StatusCode, Json<CreatedVoucher>)> {
    Ok((
        StatusCode::CREATED,
        Json(state.app.create_voucher(request).await?),
    ))
}

#[utoipa::path(get, path = "/admin/vouchers", tag = "admin", params(LimitQuery),
    responses(
        (status = 200, description = "The latest vouchers, newest first, without their codes (extension)", body = List<Voucher>),
        (status = 400, description = "Bad `limit`", body = ErrorBody),
        (status = 401, description = "Missing or invalid admin token", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn list_vouchers(
    State(state): State<Arc<AppState>>,
    Query(query): Query<LimitQuery>,
) -> AppResult<Json<List<Voucher>>> {
    let limit = parse_limit(query.limit.as_deref())?.unwrap_or(100);
    if !(1..=100).contains(&limit) {
        return Err(Error::invalid(
            ErrorCode::InvalidValue,
            "limit",
            "`limit` must be a whole number from 1 to 100.",
        ));
    }
    Ok(Json(state.app.list_vouchers(limit).await?))
}

#[utoipa::path(post, path = "/v1/vouchers/redeem", tag = "account", request_body = RedeemVoucherRequest,
    responses(
        (status = 200, description = "Redeemed: the account with its new balance (extension)", body = Account),
        (status = 400, description = "Missing or malformed `code`", body = ErrorBody),
        (status = 415, description = "The body is not sent as JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "`voucher_not_found`: no voucher has this code", body = ErrorBody),
        (status = 409, description = "`voucher_already_redeemed`: each code works once", body = ErrorBody),
        (status = 410, description = "`voucher_expired`: past its expiry", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn redeem_voucher(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    JsonBody(request): JsonBody<RedeemVoucherRequest>,
) -> AppResult<Json<Account>> {
    Ok(Json(
        state
            .app
            .redeem_voucher(&caller.account_id, &request.code)
            .await?
            .account,
    ))
}

#[utoipa::path(get, path = "/healthz", tag = "ops",
    responses(
        (status = 200, description = "Serving", body = Health),
        (status = 503, description = "Shutting down", body = ErrorBody),
    ))]
pub async fn healthz(State(state): State<Arc<AppState>>) -> Json<Health> {
    let status = if state.draining.load(Ordering::Acquire) {
        "draining"
    } else {
        "ok"
    };
    Json(Health {
        status: status.to_owned(),
    })
}

#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses(
        (status = 200, description = "Ready: the store commits a write, the disk is above its floor, Redis answers (when configured)", body = Health),
        (status = 503, description = "Not ready; the message says why", body = ErrorBody),
    ))]
pub async fn readyz(State(state): State<Arc<AppState>>) -> AppResult<Json<Health>> {
    state.app.readiness().await?;
    Ok(Json(Health {
        status: "ready".to_owned(),
    }))
}

#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> AppResult<Response> {
    // The metrics of a store that is down are what an operator most needs: render without
    // the gauges the store gives, rather than not at all.
    if let Err(e) = state.app.refresh_gauges().await {
        tracing::warn!(error = %e, "metrics: gauges from the store not refreshed");
    }
    let text = state.app.metrics().render();
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response())
}

#[utoipa::path(get, path = "/openapi.json", tag = "ops",
    responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json")))]
pub async fn openapi(State(state): State<Arc<AppState>>) -> Response {
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        state.openapi.clone(),
    )
        .into_response();
    response.extensions_mut().insert(Enveloped);
    response
}

/// Any path no route matches.
pub async fn unknown_endpoint() -> StatusCode {
    // The edge turns a bare 404 into the envelope, naming the method and path.
    StatusCode::NOT_FOUND
}
