//! Signing in and out. One form takes an API key (an account holder) or the operator token; a
//! key is posted once, exchanged for a session cookie, and never appears in a URL.
//!
//! The sign-in form has no session yet, so its CSRF token is a double-submit one: a random value
//! in a `SameSite=Strict` cookie that the form must repeat. A failed attempt re-renders the form
//! (200) with what went wrong; the contract keeps 4xx statuses for JSON envelopes.

use super::layout::{bare_page, brand, csrf_field, flash_box, html_response};
use super::session::{
    cookie, is_https, read_flash, safe_next, see_other, set_cookie, take_flash, with_cookie,
    AnyPage, ClientIp, CsrfForm, Flash, SESSION_COOKIE, SIGN_IN_COOKIE,
};
use crate::domain::secrets;
use crate::domain::sessions::Viewer;
use crate::error::Error;
use crate::http::AppState;
use axum::extract::rejection::FormRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use maud::html;
use serde::Deserialize;
use std::sync::Arc;
use tollgate_contract::{retry_after, ErrorCode};

#[derive(Debug, Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

/// `GET /dashboard`: the home of whoever is signed in, or the sign-in page.
pub async fn home(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let token = cookie(&headers, SESSION_COOKIE).unwrap_or("");
    match state.app.dashboard_session(token).await {
        Ok(Some(session)) => match session.viewer {
            Viewer::Operator => see_other("/dashboard/admin"),
            Viewer::Account { .. } => see_other("/dashboard/overview"),
        },
        Ok(None) => see_other("/dashboard/sign-in"),
        Err(e) => e.into_response(),
    }
}

fn sign_in_page(csrf: &str, next: Option<&str>, message: Option<Flash>, https: bool) -> Response {
    let markup = bare_page(
        "Sign in",
        html! {
            div.signin {
                (brand(None))
                div.card {
                    h1 { "Sign in to your dashboard" }
                    p.lead { "Balance, usage, images and keys in one place." }
                    @if let Some(message) = &message { (flash_box(message)) }
                    form method="post" action="/dashboard/sign-in" {
                        (csrf_field(csrf))
                        @if let Some(next) = next { input type="hidden" name="next" value=(next); }
                        div.field {
                            label for="credential" { "API key" }
                            input #credential type="password" name="credential" required
                                autocomplete="current-password" spellcheck="false" autofocus
                                placeholder="tg_…" aria-describedby="credential-hint";
                            div.hint #credential-hint {
                                "One of your account's API keys. Operators: the operator token."
                            }
                        }
                        button.wide type="submit" { "Sign in" }
                    }
                }
                p.muted.small {
                    "The key is exchanged for a session cookie and is not kept in the browser. "
                    "Sessions end when you sign out, when they expire, or when the key is revoked."
                }
            }
        },
    );
    with_cookie(
        html_response(markup),
        set_cookie(SIGN_IN_COOKIE, csrf, None, https),
    )
}

/// The sign-in form's token: the one already in the browser's cookie, or a new one.
fn sign_in_token(headers: &HeaderMap) -> Result<String, Error> {
    match cookie(headers, SIGN_IN_COOKIE) {
        Some(token) if token.len() == 48 && token.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(token.to_owned())
        }
        _ => secrets::new_session_token(),
    }
}

/// `GET /dashboard/sign-in`
pub async fn sign_in_form(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<NextQuery>,
) -> Response {
    // Already signed in: straight on.
    let token = cookie(&headers, SESSION_COOKIE).unwrap_or("");
    if let Ok(Some(session)) = state.app.dashboard_session(token).await {
        let home = match session.viewer {
            Viewer::Operator => "/dashboard/admin".to_owned(),
            Viewer::Account { .. } => "/dashboard/overview".to_owned(),
        };
        return see_other(&safe_next(query.next.as_deref()).unwrap_or(home));
    }
    match sign_in_token(&headers) {
        Ok(csrf) => take_flash(
            sign_in_page(
                &csrf,
                safe_next(query.next.as_deref()).as_deref(),
                read_flash(&headers),
                is_https(&headers),
            ),
            &headers,
        ),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
pub struct SignInForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    credential: String,
    next: Option<String>,
}

/// `POST /dashboard/sign-in`
pub async fn sign_in(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    form: Result<axum::Form<SignInForm>, FormRejection>,
) -> Response {
    let https = is_https(&headers);
    let Ok(axum::Form(form)) = form else {
        return Error::InvalidRequest {
            code: ErrorCode::InvalidValue,
            message: "The sign-in form could not be read; reload the page and try again."
                .to_owned(),
            param: None,
        }
        .into_response();
    };
    let next = safe_next(form.next.as_deref());
    let Ok(fresh) = sign_in_token(&HeaderMap::new()) else {
        return Error::internal("no random source").into_response();
    };
    let expected = cookie(&headers, SIGN_IN_COOKIE).unwrap_or("");
    if expected.is_empty() || !secrets::constant_time_eq(expected, &form.csrf) {
        // A stale or forged form: nothing is checked, a fresh form is shown.
        return sign_in_page(
            &fresh,
            next.as_deref(),
            Some(Flash::error(
                "This sign-in form expired. Please enter your key again.",
            )),
            https,
        );
    }
    match state.app.sign_in(&form.credential, client).await {
        Ok(signed_in) => {
            let home = match signed_in.session.viewer {
                Viewer::Operator => "/dashboard/admin",
                Viewer::Account { .. } => "/dashboard/overview",
            };
            let target = next.unwrap_or_else(|| home.to_owned());
            let ttl = state.app.config().session_ttl.as_secs();
            let response = with_cookie(
                see_other(&target),
                set_cookie(SESSION_COOKIE, signed_in.token.expose(), Some(ttl), https),
            );
            // The sign-in token has done its job.
            with_cookie(response, set_cookie(SIGN_IN_COOKIE, "", Some(0), https))
        }
        Err(e) => {
            let message = match e {
                Error::RateLimited { retry_after } => format!(
                    "Too many sign-in attempts. Wait {} seconds and try again.",
                    retry_after::whole_seconds_ceil(retry_after)
                ),
                Error::MissingCredential { .. } => "Enter your API key.".to_owned(),
                Error::InvalidCredential { .. } => {
                    "That key is not valid: check it is complete and has not been revoked."
                        .to_owned()
                }
                other => return other.into_response(),
            };
            sign_in_page(&fresh, next.as_deref(), Some(Flash::error(message)), https)
        }
    }
}

/// `POST /dashboard/sign-out`: ends the session and forgets the cookie.
pub async fn sign_out(
    State(state): State<Arc<AppState>>,
    _page: AnyPage,
    headers: HeaderMap,
    CsrfForm(_form): CsrfForm<Empty>,
) -> Response {
    let token = cookie(&headers, SESSION_COOKIE).unwrap_or("");
    if let Err(e) = state.app.sign_out(token).await {
        return e.into_response();
    }
    with_cookie(
        see_other("/dashboard/sign-in"),
        set_cookie(SESSION_COOKIE, "", Some(0), is_https(&headers)),
    )
}

/// A form with nothing but its CSRF token.
#[derive(Debug, Deserialize)]
pub struct Empty {}
