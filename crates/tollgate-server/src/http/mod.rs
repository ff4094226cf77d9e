//! The HTTP layer: routes, extractors, middleware and the mapping of errors to the envelope.
//!
//! **Invariant:** this is the only module that knows about HTTP. It parses requests into domain
//! calls and domain answers into JSON; the domain never sees a header or a status code.

pub mod dashboard;
pub mod edge;
pub mod error;
pub mod extract;
pub mod middleware;
pub mod openai;
pub mod openapi;
pub mod routes;
pub mod serve;
pub mod wire;

use crate::domain::service::Tollgate;
use axum::extract::DefaultBodyLimit;
use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{delete, get, post, MethodRouter};
use axum::Router;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

/// What every handler and middleware shares.
pub struct AppState {
    pub app: Arc<Tollgate>,
    /// Set on shutdown: new requests get 503.
    pub draining: AtomicBool,
    /// Requests past the drain gate and not finished yet.
    pub in_flight: AtomicUsize,
    /// The JSON of finished tasks, as polling clients read it again and again.
    pub task_json: wire::TaskJson,
    /// `/openapi.json`, made once: it depends on the catalogue, which does not change.
    pub openapi: bytes::Bytes,
}

impl AppState {
    pub fn new(app: Arc<Tollgate>) -> Self {
        AppState {
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            task_json: wire::TaskJson::default(),
            openapi: serde_json::to_vec(&openapi::document(&app))
                .unwrap_or_default()
                .into(),
            app,
        }
    }
}

/// Every route, behind the [`edge`] (see [`app`]).
pub fn router(state: Arc<AppState>) -> Router {
    use middleware as mw;
    use routes as r;
    // Per-method layers (not `Router::route_layer`), so a wrong method answers 405 before any
    // credential is asked for.
    // The simulation layers exist only when `--simulate-errors` asks for them: a production
    // request does not pay for them.
    let simulate = state.app.config().simulate_errors;
    let simulated = move |route: MethodRouter<Arc<AppState>>| {
        if simulate {
            route.route_layer(from_fn(mw::simulate_delay))
        } else {
            route
        }
    };
    // The API key and the account's rate limit come first: they put the `Caller` into the
    // request, which the idempotency layer scopes its keys by. `api_get` for routes without a
    // POST: no `Idempotency-Key` to look at, so no layer for it on the reads clients poll.
    let api_state = Arc::clone(&state);
    let api_get = move |route| {
        simulated(route).route_layer(from_fn_with_state(Arc::clone(&api_state), mw::api_key))
    };
    let api_state = Arc::clone(&state);
    let api = move |route| {
        simulated(route)
            .route_layer(from_fn_with_state(Arc::clone(&api_state), mw::idempotency))
            .route_layer(from_fn_with_state(Arc::clone(&api_state), mw::api_key))
    };
    let admin_state = Arc::clone(&state);
    let admin = move |route| {
        simulated(route)
            .route_layer(from_fn_with_state(
                Arc::clone(&admin_state),
                mw::idempotency,
            ))
            .route_layer(from_fn_with_state(Arc::clone(&admin_state), mw::admin_auth))
    };
    let api = Router::new()
        .route("/v1/images/generations", api(post(r::create_generation)))
        .route("/v1/tasks", api_get(get(r::list_tasks)))
        .route("/v1/tasks/{id}", api_get(get(r::get_task)))
        .route("/v1/tasks/{id}/cancel", api(post(r::cancel_task)))
        .route("/v1/tasks/{id}/images/{index}", api_get(get(r::task_image)))
        .route("/v1/account", api_get(get(r::account)))
        .route("/v1/models", api_get(get(r::models)))
        .route("/v1/account/ledger", api_get(get(r::account_ledger)))
        .route(
            "/v1/account/webhook-secret",
            api(get(r::webhook_secret).post(r::rotate_webhook_secret)),
        )
        .route("/v1/vouchers/redeem", api(post(r::redeem_voucher)))
        .route("/v1/billing/packs", api_get(get(r::credit_packs)))
        .route("/v1/billing/checkout", api(post(r::checkout)))
        // Stripe's signature on the raw body is the credential: no key, no account's limit.
        .route("/webhooks/stripe", post(r::stripe_webhook))
        // The signature is the credential: no API key, no account's rate limit.
        .route("/v1/links/{task_id}/{file}", get(r::linked_image))
        // OpenAI's API has no Idempotency-Key: no idempotency layer (see openai.rs).
        .route(
            "/openai/v1/images/generations",
            api_get(post(openai::create_image)),
        )
        .route("/openai/v1/models", api_get(get(openai::list_models)))
        .route("/openai/v1/models/{id}", api_get(get(openai::get_model)));
    let admin = Router::new()
        .route(
            "/admin/accounts",
            admin(post(r::create_account).get(r::list_accounts)),
        )
        .route(
            "/admin/accounts/{id}",
            admin(get(r::get_account).patch(r::update_account)),
        )
        .route(
            "/admin/accounts/{id}/keys",
            admin(post(r::create_key).get(r::list_keys)),
        )
        .route("/admin/accounts/{id}/credits", admin(post(r::add_credits)))
        .route("/admin/accounts/{id}/ledger", admin(get(r::admin_ledger)))
        .route(
            "/admin/accounts/{id}/purchases",
            admin(get(r::list_purchases)),
        )
        .route("/admin/keys/{key_id}", admin(delete(r::revoke_key)))
        .route(
            "/admin/vouchers",
            admin(post(r::create_voucher).get(r::list_vouchers)),
        )
        .route_layer(from_fn(mw::served_by));
    let ops = Router::new()
        .route("/healthz", get(r::healthz))
        .route("/readyz", get(r::readyz))
        .route("/metrics", get(r::metrics))
        .route("/openapi.json", get(r::openapi))
        .route_layer(from_fn(mw::served_by));
    Router::new()
        .merge(api)
        .merge(admin)
        .merge(ops)
        .merge(dashboard::router().route_layer(from_fn(mw::served_by)))
        .fallback(r::unknown_endpoint)
        .layer(DefaultBodyLimit::max(extract::BODY_LIMIT))
        .with_state(state)
}

/// What a connection serves: the router behind the edge (request id, drain gate, envelope,
/// metrics and log).
pub fn app(state: Arc<AppState>) -> serve::App {
    use tower::Layer;
    edge::EdgeLayer::new(Arc::clone(&state)).layer(router(state))
}
