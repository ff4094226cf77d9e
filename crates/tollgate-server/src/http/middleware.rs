//! The request pipeline, outermost first:
//!
//! 1. [`edge`]: request id, tracing span, panic → 500 envelope, any non-envelope error → envelope,
//!    metrics. Every response leaves through it.
//! 2. [`drain_gate`]: during shutdown new requests get 503 with `Retry-After`; counts in-flight ones.
//! 3. [`simulate`]: with `--simulate-errors`, `Tollgate-Simulate` asks for a failure.
//! 4. Per route group: [`api_auth`] (API key, then the account's rate limit and the `RateLimit`
//!    headers) or [`admin_auth`]; then [`idempotency`] on POSTs; then [`simulate_delay`].

use super::error::{envelope, internal_error, Enveloped, Origin, ORIGIN, REQUEST_ID};
use super::extract::{bearer, body_too_large, Credential, BODY_LIMIT};
use super::AppState;
use crate::domain::idempotency;
use crate::domain::ratelimit::Admission;
use crate::domain::service::Caller;
use crate::error::Error;
use crate::store::{IdempotencyBegin, IdempotencyScope, StoredResponse};
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_contract::{headers as h, retry_after, ErrorCode};
use tracing::Instrument;

/// Marks a response whose idempotency record the handler wrote in its own transaction.
#[derive(Debug, Clone, Copy)]
pub struct IdempotencyStored;

/// The reservation of an `Idempotency-Key`, handed to the handler.
#[derive(Debug, Clone)]
pub struct IdempotencyReservation(pub IdempotencyScope);

fn new_request_id() -> String {
    format!("req_{:016x}", rand::random::<u64>())
}

/// An incoming `X-Request-Id` is kept when it is short and plain, so a caller's trace id carries through.
fn sane_request_id(value: &HeaderValue) -> Option<String> {
    let text = value.to_str().ok()?;
    let ok = (1..=128).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then(|| text.to_owned())
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

pub async fn edge(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = req
        .headers()
        .get(h::REQUEST_ID)
        .and_then(sane_request_id)
        .unwrap_or_else(new_request_id);
    let method = req.method().clone();
    // Cheap clones (reference-counted), not copies: this runs on every request.
    let uri = req.uri().clone();
    let path = uri.path();
    let route = req.extensions().get::<MatchedPath>().cloned();
    let span =
        tracing::info_span!("request", request_id = %request_id, method = %method, path = %path);

    let origin = Origin::of(req.headers());
    let outcome = REQUEST_ID
        .scope(
            request_id.clone(),
            ORIGIN.scope(origin, AssertUnwindSafe(next.run(req)).catch_unwind()),
        )
        .instrument(span.clone())
        .await;

    let mut response = REQUEST_ID.sync_scope(request_id.clone(), || {
        let _entered = span.enter();
        match outcome {
            Ok(response) => ensure_envelope(response, &method, path),
            Err(payload) => {
                tracing::error!(panic = %panic_message(payload.as_ref()), "handler panicked");
                internal_error()
            }
        }
    });
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(h::REQUEST_ID, value);
    }
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    state.app.metrics().observe_request(
        route.as_ref().map_or("unmatched", MatchedPath::as_str),
        method.as_str(),
        status,
        elapsed.as_secs_f64(),
    );
    span.in_scope(|| tracing::info!(status, micros = elapsed.as_micros() as u64, "served"));
    response
}

/// Turns any error response that did not come from [`envelope`] (axum's own 404/405/413/415 and
/// the like) into the envelope, keeping its status and headers such as `Allow`.
fn ensure_envelope(response: Response, method: &Method, path: &str) -> Response {
    let status = response.status();
    if status.as_u16() < 400 || response.extensions().get::<Enveloped>().is_some() {
        return response;
    }
    let mut keep = HeaderMap::new();
    if let Some(allow) = response.headers().get(header::ALLOW) {
        keep.insert(header::ALLOW, allow.clone());
    }
    let shown_path: String = path.chars().take(200).collect();
    match status {
        StatusCode::NOT_FOUND => envelope(
            ErrorCode::UnknownEndpoint,
            format!("There is no endpoint at {method} {shown_path}. Check the URL against /openapi.json."),
            None,
            keep,
        ),
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = keep.get(header::ALLOW).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            envelope(
                ErrorCode::MethodNotAllowed,
                format!("{method} is not allowed on {shown_path}; use {allowed}."),
                None,
                keep,
            )
        }
        StatusCode::PAYLOAD_TOO_LARGE => body_too_large().into_response(),
        s if s.is_server_error() => internal_error(),
        _ => envelope(
            ErrorCode::InvalidValue,
            format!("The request could not be understood ({}).", status.canonical_reason().unwrap_or("bad request")),
            None,
            keep,
        ),
    }
}

pub async fn drain_gate(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.draining.load(Ordering::Acquire) {
        return Error::Unavailable {
            reason: "shutting down",
            retry_after: state.app.shutdown_retry_after(),
        }
        .into_response();
    }
    state.in_flight.fetch_add(1, Ordering::AcqRel);
    // Decrements even if the request is cancelled or panics.
    let _guard = InFlight(Arc::clone(&state));
    next.run(req).await
}

struct InFlight(Arc<AppState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `Tollgate-Simulate`; the router installs this layer only with `--simulate-errors`.
pub async fn simulate(req: Request, next: Next) -> Response {
    let Some(value) = req.headers().get(h::SIMULATE) else {
        return next.run(req).await;
    };
    let one_second = Duration::from_secs(1);
    match value.as_bytes() {
        b"429" => Error::RateLimited {
            retry_after: one_second,
        }
        .into_response(),
        b"500" => {
            Error::Internal("simulated failure (Tollgate-Simulate: 500)".to_owned()).into_response()
        }
        b"503" => Error::Unavailable {
            reason: "simulated outage",
            retry_after: one_second,
        }
        .into_response(),
        b"panic" => panic!("simulated panic (Tollgate-Simulate: panic)"),
        _ => Error::invalid(
            ErrorCode::InvalidValue,
            "Tollgate-Simulate",
            "Tollgate-Simulate must be 429, 500, 503 or panic.",
        )
        .into_response(),
    }
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

pub async fn api_auth(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let credential = match bearer(req.headers()) {
        Credential::Missing => None,
        Credential::Bearer(key) => Some(key),
        Credential::Unsupported => {
            return Error::InvalidCredential { admin: false }.into_response()
        }
    };
    let caller = match state.app.authenticate(credential).await {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    let admission = match state.app.admit(&caller).await {
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
    let policy = format!("\"default\";q={};w={window}", admission.limit.burst);
    let state = format!("\"default\";r={};t={reset}", admission.remaining);
    if let Ok(v) = HeaderValue::from_str(&policy) {
        headers.insert(h::RATELIMIT_POLICY, v);
    }
    if let Ok(v) = HeaderValue::from_str(&state) {
        headers.insert(h::RATELIMIT, v);
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
    scope: Option<IdempotencyScope>,
}

impl ReservationGuard {
    fn disarm(&mut self) {
        self.scope = None;
    }
}

impl Drop for ReservationGuard {
    fn drop(&mut self) {
        if let Some(scope) = self.scope.take() {
            let state = Arc::clone(&self.state);
            tokio::spawn(async move {
                if let Err(e) = state.app.idempotency_release(&scope).await {
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
        Err(_) => return body_too_large().into_response(),
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
        Ok(IdempotencyBegin::Started) => {
            let mut guard = ReservationGuard {
                state: Arc::clone(&state),
                scope: Some(scope.clone()),
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
                if let Some(scope) = guard.scope.take() {
                    if let Err(e) = state.app.idempotency_release(&scope).await {
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
            if let Err(e) = state.app.idempotency_complete(&scope, &stored).await {
                return e.into_response();
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
