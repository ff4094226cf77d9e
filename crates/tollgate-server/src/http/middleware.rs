//! The router's layers. What every request goes through first (request id, drain gate) is the
//! [`edge`](super::edge); behind it, per route: [`api_key`] on the API's routes, [`admin_auth`]
//! on the operator's; then [`idempotency()`] on POSTs; then [`simulate_delay`] (only with
//! `--simulate-errors`). [`served_by`] names the route for the edge's metrics.

use super::edge::ServedBy;
use super::extract::{bearer, body_read_error, Credential, BODY_LIMIT};
use super::AppState;
use crate::domain::idempotency;
use crate::domain::ratelimit::Admission;
use crate::domain::service::Caller;
use crate::error::Error;
use crate::store::{IdempotencyBegin, IdempotencyScope, StoredResponse};
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tollgate_contract::{headers as h, retry_after, ErrorCode};

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static(h::RATELIMIT_POLICY);
const RATELIMIT: HeaderName = HeaderName::from_static(h::RATELIMIT);
const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Marks a response whose idempotency record the handler wrote in its own transaction.
#[derive(Debug, Clone, Copy)]
pub struct IdempotencyStored;

/// The reservation of an `Idempotency-Key`, handed to the handler.
#[derive(Debug, Clone)]
pub struct IdempotencyReservation(pub IdempotencyScope);

/// Names the route that served a response (for the edge's metrics), on the routes without an API
/// key ([`api_key`] does it for those).
pub async fn served_by(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().cloned();
    let mut response = next.run(req).await;
    if let Some(route) = route {
        response.extensions_mut().insert(ServedBy(route));
    }
    response
}

/// `Tollgate-Simulate-Delay-Ms`; the router installs this layer only with `--simulate-errors`.
pub async fn simulate_delay(req: Request, next: Next) -> Response {
    if let Some(value) = req.headers().get(h::SIMULATE_DELAY_MS) {
        match value
            .to_str()
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|ms| *ms <= 10_000)
        {
            Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            None => return Error::invalid(
                ErrorCode::InvalidValue,
                "Tollgate-Simulate-Delay-Ms",
                "Tollgate-Simulate-Delay-Ms must be a whole number of milliseconds up to 10000.",
            )
            .into_response(),
        }
    }
    next.run(req).await
}

/// The API key and the account's rate limit, on every API route (a route layer: an unknown path
/// or a wrong method answers 404 or 405 before a key is asked for). The handler finds the
/// [`Caller`] in the request; every response after the key was accepted, the 429 included,
/// carries the `RateLimit` headers.
pub async fn api_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    // The route's name for the edge's metrics, set here rather than by a layer of its own on
    // these, the busiest routes (see `served_by`).
    let served_by = req.extensions().get::<MatchedPath>().cloned().map(ServedBy);
    let mut response = admit(&state, req, next).await;
    if let Some(served_by) = served_by {
        response.extensions_mut().insert(served_by);
    }
    response
}

async fn admit(state: &AppState, mut req: Request, next: Next) -> Response {
    let app = &state.app;
    let credential = match bearer(req.headers()) {
        Credential::Missing => None,
        Credential::Bearer(key) => Some(key),
        Credential::Unsupported => {
            return Error::InvalidCredential { admin: false }.into_response()
        }
    };
    let caller = match app.authenticate(credential).await {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    let admission = match app.admit(&caller).await {
        Ok(admission) => admission,
        Err(e) => return e.into_response(),
    };
    let mut response = match admission.retry_after {
        Some(wait) => Error::RateLimited { retry_after: wait }.into_response(),
        None => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
    };
    rate_limit_headers(response.headers_mut(), &admission);
    if app.config().legacy_ratelimit_headers {
        legacy_rate_limit_headers(response.headers_mut(), &admission, app.now());
    }
    response
}

/// `RateLimit-Policy` and `RateLimit` of draft-ietf-httpapi-ratelimit-headers: the quota is the
/// burst, its window the time to refill it; `r` is what is left now, `t` the seconds until full.
fn rate_limit_headers(headers: &mut HeaderMap, admission: &Admission) {
    let window = retry_after::whole_seconds_ceil(admission.window());
    let reset = if admission.reset.is_zero() {
        0
    } else {
        retry_after::whole_seconds_ceil(admission.reset)
    };
    let fields = [
        (
            RATELIMIT_POLICY,
            "\"default\";q=",
            u64::from(admission.limit.burst),
            ";w=",
            window,
        ),
        (
            RATELIMIT,
            "\"default\";r=",
            u64::from(admission.remaining),
            ";t=",
            reset,
        ),
    ];
    for (name, a, x, b, y) in fields {
        // Without `format!`: this runs on every API response, and `fmt` is most of its cost.
        let mut value = String::with_capacity(48);
        value.push_str(a);
        value.push_str(itoa::Buffer::new().format(x));
        value.push_str(b);
        value.push_str(itoa::Buffer::new().format(y));
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.insert(name, value);
        }
    }
}

/// `--legacy-ratelimit-headers`: the same numbers as GitHub's `X-RateLimit-*` say them, for
/// clients that read only those: the burst, what is left, and the Unix time it is full again.
fn legacy_rate_limit_headers(headers: &mut HeaderMap, admission: &Admission, now: OffsetDateTime) {
    let until_full = retry_after::whole_seconds_ceil(admission.reset);
    let full_at = now.unix_timestamp() + i64::try_from(until_full).unwrap_or(i64::MAX / 2);
    let fields = [
        (X_RATELIMIT_LIMIT, i64::from(admission.limit.burst)),
        (X_RATELIMIT_REMAINING, i64::from(admission.remaining)),
        (X_RATELIMIT_RESET, full_at),
    ];
    for (name, value) in fields {
        if let Ok(value) = HeaderValue::try_from(itoa::Buffer::new().format(value)) {
            headers.insert(name, value);
        }
    }
}

pub async fn admin_auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let verdict = match bearer(req.headers()) {
        Credential::Missing => state.app.authenticate_admin(None),
        Credential::Bearer(token) => state.app.authenticate_admin(Some(token)),
        Credential::Unsupported => Err(Error::InvalidCredential { admin: true }),
    };
    match verdict {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Releases a reservation if the request ends without storing a response (error, panic, or a
/// client that went away), so a retry can run instead of waiting for the reservation to go stale.
struct ReservationGuard {
    state: Arc<AppState>,
    /// The reservation: its key, and the time that names it.
    scope: Option<(IdempotencyScope, OffsetDateTime)>,
}

impl ReservationGuard {
    fn disarm(&mut self) {
        self.scope = None;
    }
}

impl Drop for ReservationGuard {
    fn drop(&mut self) {
        if let Some((scope, at)) = self.scope.take() {
            let state = Arc::clone(&self.state);
            tokio::spawn(async move {
                if let Err(e) = state.app.idempotency_release(&scope, at).await {
                    tracing::warn!(error = %e, "could not release an idempotency reservation; it will go stale");
                }
            });
        }
    }
}

pub async fn idempotency(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    let Some(raw_key) = req.headers().get(h::IDEMPOTENCY_KEY) else {
        return next.run(req).await;
    };
    let key = match idempotency::validate_key(raw_key.as_bytes()) {
        Ok(key) => key,
        Err(e) => return e.into_response(),
    };
    let owner = req
        .extensions()
        .get::<Caller>()
        .map_or_else(|| "admin".to_owned(), |c| c.account_id.clone());
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(bytes) => bytes,
        Err(e) => return body_read_error(&e).into_response(),
    };
    let scope = IdempotencyScope {
        scope: owner,
        key,
        fingerprint: idempotency::fingerprint(parts.method.as_str(), parts.uri.path(), &bytes),
    };
    match state.app.idempotency_begin(&scope).await {
        Err(e) => e.into_response(),
        Ok(IdempotencyBegin::Mismatch) => Error::IdempotencyKeyReused.into_response(),
        Ok(IdempotencyBegin::InUse) => Error::IdempotencyKeyInUse.into_response(),
        Ok(IdempotencyBegin::Replay(stored)) => replay(stored),
        Ok(IdempotencyBegin::Started { at }) => {
            let mut guard = ReservationGuard {
                state: Arc::clone(&state),
                scope: Some((scope.clone(), at)),
            };
            let mut req = Request::from_parts(parts, Body::from(bytes));
            req.extensions_mut()
                .insert(IdempotencyReservation(scope.clone()));
            let response = next.run(req).await;
            if response.extensions().get::<IdempotencyStored>().is_some() {
                guard.disarm();
                return response;
            }
            if !response.status().is_success() {
                // Only successes are kept: a 4xx/5xx may go differently next time (after a
                // top-up, after an outage), so the key is released before the client can retry.
                if let Some((scope, at)) = guard.scope.take() {
                    if let Err(e) = state.app.idempotency_release(&scope, at).await {
                        tracing::warn!(error = %e, "could not release an idempotency reservation; it will go stale");
                    }
                }
                return response;
            }
            let (parts, body) = response.into_parts();
            let body = match axum::body::to_bytes(body, usize::MAX).await {
                Ok(body) => body,
                Err(e) => {
                    return Error::internal(format!("buffering a response: {e}")).into_response()
                }
            };
            let stored = StoredResponse {
                status: parts.status.as_u16(),
                body: body.to_vec(),
            };
            // What the response reports is committed: it is the answer, whatever happens to
            // the record of it. A record that could not be stored leaves the reservation held
            // (a retry gets 409, then runs again once it is stale), never released: a release
            // would let a retry do the work twice at once.
            if let Err(e) = state.app.idempotency_complete(&scope, &stored).await {
                tracing::warn!(error = %e, "could not store the response of an idempotent request; its key stays reserved");
            }
            guard.disarm();
            Response::from_parts(parts, Body::from(body))
        }
    }
}

fn replay(stored: StoredResponse) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let mut response = (status, stored.body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(h::IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    response
}
