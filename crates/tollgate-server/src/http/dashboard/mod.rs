//! The dashboard: server-rendered HTML for account holders and the operator, under `/dashboard`.
//!
//! - [`sign_in`]: the sign-in form (an API key or the operator token → a session cookie), sign-out.
//! - [`account`]: an account holder's overview, top-up (voucher), gallery and keys.
//! - [`admin`]: the operator's accounts, one account, vouchers.
//! - [`session`]: cookies, session extractors, CSRF-checked forms, flash messages.
//! - [`layout`], [`chart`]: the page shell and the server-drawn SVG chart; `style.css` is the one
//!   stylesheet, embedded in the binary. There is no JavaScript.
//!
//! **Invariant:** a dashboard page never answers HTML with a 4xx/5xx status, because the contract
//! keeps error statuses for the JSON envelope: a refused form re-renders (200) or redirects (303)
//! with a message, a missing session redirects to the sign-in page, and what is not the visitor's
//! to fix (a forged CSRF token, a broken database) is the envelope like anywhere else.

pub mod account;
pub mod admin;
pub mod chart;
pub mod layout;
pub mod session;
pub mod sign_in;

use super::error::voucher_refusal_message;
use super::AppState;
use crate::error::Error;
use axum::extract::Query;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use std::sync::Arc;

/// The window of "spent per day" and "usage", in days.
pub const SPEND_DAYS: u16 = 30;

/// What to tell the person who submitted a form, or (`Err`) the error itself when it is not
/// theirs to fix (it then answers as the JSON envelope, like anywhere else).
pub fn user_message(e: Error) -> Result<String, Error> {
    match e {
        Error::InvalidRequest { message, .. } => Ok(message),
        Error::VoucherRefused(refusal) => Ok(voucher_refusal_message(refusal).to_owned()),
        Error::NotFound { what, .. } => Ok(format!("There is no such {what}.")),
        other => Err(other),
    }
}

#[derive(Debug, Deserialize)]
struct StyleQuery {
    v: Option<String>,
}

/// `GET /dashboard/style.css`: cached for a year when asked for by its version (the pages do),
/// for five minutes otherwise.
async fn stylesheet(Query(query): Query<StyleQuery>) -> Response {
    let cache = if query.v.as_deref() == Some(layout::STYLESHEET_VERSION.as_str()) {
        "public, max-age=31536000, immutable"
    } else {
        "public, max-age=300"
    };
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/css; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
        ],
        layout::STYLESHEET,
    )
        .into_response()
}

/// Headers every dashboard response carries: no scripts at all, no framing, no sniffing, and
/// no dashboard URL in the `Referer` of another site.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// The dashboard's routes.
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/dashboard", get(sign_in::home))
        .route("/dashboard/style.css", get(stylesheet))
        .route(
            "/dashboard/sign-in",
            get(sign_in::sign_in_form).post(sign_in::sign_in),
        )
        .route("/dashboard/sign-out", post(sign_in::sign_out))
        .route("/dashboard/overview", get(account::overview))
        .route("/dashboard/credits", get(account::credits_form))
        .route("/dashboard/credits/redeem", post(account::redeem))
        .route("/dashboard/credits/checkout", post(account::checkout))
        .route("/dashboard/tasks", get(account::gallery))
        .route(
            "/dashboard/tasks/{id}/images/{index}",
            get(account::task_image),
        )
        .route(
            "/dashboard/keys",
            get(account::keys).post(account::create_key),
        )
        .route("/dashboard/keys/{key_id}/revoke", post(account::revoke_key))
        .route("/dashboard/admin", get(admin::accounts))
        .route("/dashboard/admin/accounts", post(admin::create_account))
        .route("/dashboard/admin/accounts/{id}", get(admin::account))
        .route("/dashboard/admin/accounts/{id}/credits", post(admin::grant))
        .route(
            "/dashboard/admin/accounts/{id}/low-balance",
            post(admin::low_balance),
        )
        .route(
            "/dashboard/admin/accounts/{id}/keys",
            post(admin::create_key),
        )
        .route(
            "/dashboard/admin/accounts/{id}/keys/{key_id}/revoke",
            post(admin::revoke_key),
        )
        .route(
            "/dashboard/admin/vouchers",
            get(admin::vouchers).post(admin::issue_voucher),
        )
        .layer(axum::middleware::map_response(security_headers))
}
