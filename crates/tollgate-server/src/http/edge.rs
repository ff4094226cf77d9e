//! The edge: the tower layer every request passes through before the router, and every response
//! after it.
//!
//! On the way in: the request id (the caller's `X-Request-Id` when it is plain, else a new one),
//! the tracing span, the drain gate (during shutdown new requests get 503 with `Retry-After`)
//! and, with `--simulate-errors`, `Tollgate-Simulate`. Then the router, which runs the route's
//! own layers (the API key and rate limit, `middleware::api_key`; the operator token; the
//! `Idempotency-Key`). On the way out: a panic becomes the 500 envelope, any error that is not
//! in the envelope yet (axum's own 404/405/413) is put into it, `X-Request-Id` is set, and the
//! request is counted and logged.

use super::error::{internal_error, Enveloped, ErrorReply, Origin, ORIGIN, REQUEST_ID};
use super::extract::body_too_large;
use super::AppState;
use crate::domain::secrets;
use crate::error::Error;
use axum::body::Body;
use axum::extract::MatchedPath;
use axum::http::{header, HeaderName, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tollgate_contract::{headers as h, ErrorCode};
use tower::{Layer, Service, ServiceExt};
use tracing::Instrument;

const X_REQUEST_ID: HeaderName = HeaderName::from_static(h::REQUEST_ID);
const SIMULATE: HeaderName = HeaderName::from_static(h::SIMULATE);

/// The route a response was served by (set by `middleware::api_key` on API routes and by
/// `middleware::served_by` on the others), for the metrics.
#[derive(Debug, Clone)]
pub struct ServedBy(pub MatchedPath);

/// Wraps a service (the router) in [`Edge`].
#[derive(Clone)]
pub struct EdgeLayer {
    state: Arc<AppState>,
}

impl EdgeLayer {
    pub fn new(state: Arc<AppState>) -> EdgeLayer {
        EdgeLayer { state }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            state: Arc::clone(&self.state),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    state: Arc<AppState>,
}

impl<S> Service<Request<Body>> for Edge<S>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness is the inner service's, checked by `oneshot` for the clone that serves.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        let state = Arc::clone(&self.state);
        Box::pin(async move { Ok(serve(state, inner, req).await) })
    }
}

async fn serve<S>(state: Arc<AppState>, inner: S, req: Request<Body>) -> Response
where
    S: Service<Request<Body>, Response = Response, Error = Infallible>,
{
    let started = Instant::now();
    let request_id = req
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| sane_request_id(v.as_bytes()))
        .unwrap_or_else(new_request_id);
    // Every id kept or made is a valid header value (see `sane_request_id`).
    let request_id_header = HeaderValue::from_str(&request_id).ok();
    let method = req.method().clone();
    // Reference-counted, not copied.
    let uri = req.uri().clone();
    let span = tracing::info_span!("request", request_id = %request_id, method = %method, path = %uri.path());
    // Where the request was sent, for the links an answer carries back to this server (image
    // links, the 402's top-up page): a reference-counted header, not a copy.
    let origin = Origin::of(req.headers());
    let respond = async {
        match AssertUnwindSafe(admit(&state, inner, req))
            .catch_unwind()
            .await
        {
            Ok(response) => ensure_envelope(response, &method, uri.path()),
            Err(payload) => {
                tracing::error!(panic = %panic_message(payload.as_ref()), "handler panicked");
                internal_error()
            }
        }
    };
    let mut response = REQUEST_ID
        .scope(request_id, ORIGIN.scope(origin, respond))
        .instrument(span.clone())
        .await;
    if let Some(value) = request_id_header {
        response.headers_mut().insert(X_REQUEST_ID, value);
    }
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    let route = match response.extensions().get::<ServedBy>() {
        Some(ServedBy(path)) => path.as_str(),
        None => "unmatched",
    };
    state
        .app
        .metrics()
        .observe_request(route, method.as_str(), status, elapsed.as_secs_f64());
    span.in_scope(|| tracing::info!(status, micros = elapsed.as_micros() as u64, "served"));
    response
}

/// The drain gate and the simulated failures, then the router.
async fn admit<S>(state: &AppState, inner: S, req: Request<Body>) -> Response
where
    S: Service<Request<Body>, Response = Response, Error = Infallible>,
{
    let app = &state.app;
    if state.draining.load(Ordering::Acquire) {
        return Error::ShuttingDown {
            retry_after: app.shutdown_retry_after(),
        }
        .into_response();
    }
    state.in_flight.fetch_add(1, Ordering::AcqRel);
    // Decrements even if the request is cancelled, panics or is refused.
    let _in_flight = InFlight(state);
    if let Some(refusal) = nul_in_path(req.uri()) {
        return refusal.into_response();
    }
    if app.config().simulate_errors {
        if let Some(value) = req.headers().get(SIMULATE) {
            return simulated_failure(value.as_bytes()).into_response();
        }
    }
    match inner.oneshot(req).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// One request past the drain gate, until it is answered (the drain waits for none to be left).
struct InFlight<'a>(&'a AppState);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn new_request_id() -> String {
    let mut id = String::with_capacity(20);
    id.push_str("req_");
    secrets::push_hex(&mut id, &rand::random::<u64>().to_be_bytes());
    id
}

/// An incoming `X-Request-Id` is kept when it is short and plain, so a caller's trace id carries through.
fn sane_request_id(value: &[u8]) -> Option<String> {
    let ok = (1..=128).contains(&value.len())
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then(|| String::from_utf8_lossy(value).into_owned())
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// Turns any error response that is not in the envelope yet (axum's own 404/405/413/415 and
/// the like) into the envelope, keeping its status and headers such as `Allow`.
fn ensure_envelope(response: Response, method: &Method, path: &str) -> Response {
    let status = response.status();
    if status.as_u16() < 400 || response.extensions().get::<Enveloped>().is_some() {
        return response;
    }
    let allow = response.headers().get(header::ALLOW).cloned();
    let shown_path: String = path.chars().take(200).collect();
    let reply = match status {
        StatusCode::NOT_FOUND => ErrorReply::new(
            ErrorCode::UnknownEndpoint,
            format!("There is no endpoint at {method} {shown_path}. Check the URL against /openapi.json."),
        ),
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = allow.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("");
            ErrorReply::new(
                ErrorCode::MethodNotAllowed,
                format!("{method} is not allowed on {shown_path}; use {allowed}."),
            )
        }
        StatusCode::PAYLOAD_TOO_LARGE => return body_too_large().into_response(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorReply::new(
            ErrorCode::UnsupportedMediaType,
            "The request body must be JSON sent as `Content-Type: application/json`.",
        ),
        s if s.is_server_error() => return internal_error(),
        _ => ErrorReply::new(
            ErrorCode::InvalidValue,
            format!("The request could not be understood ({}).", status.canonical_reason().unwrap_or("bad request")),
        ),
    };
    reply.allow(allow).into_response()
}

/// A path with an encoded NUL (`%00`): no id the store keeps holds one, and PostgreSQL refuses
/// one in any text it is asked to compare, so every route answers it here: nothing is named so.
/// (A query's values are the routes' to read: numbers fail to parse, and `after` checks.)
fn nul_in_path(uri: &http::Uri) -> Option<Error> {
    uri.path().contains("%00").then(|| Error::InvalidRequest {
        code: ErrorCode::ResourceNotFound,
        message: "No resource has a NUL character (%00) in its name.".to_owned(),
        param: None,
    })
}

/// The failure `Tollgate-Simulate` asks for (only with `--simulate-errors`).
fn simulated_failure(value: &[u8]) -> Error {
    let one_second = Duration::from_secs(1);
    match value {
        b"429" => Error::RateLimited {
            retry_after: one_second,
        },
        b"500" => Error::Internal("simulated failure (Tollgate-Simulate: 500)".to_owned()),
        b"503" => Error::Unavailable {
            reason: "simulated outage",
            retry_after: one_second,
        },
        b"panic" => panic!("simulated panic (Tollgate-Simulate: panic)"),
        _ => Error::invalid(
            ErrorCode::InvalidValue,
            "Tollgate-Simulate",
            "Tollgate-Simulate must be 429, 500, 503 or panic.",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_only_when_plain() {
        assert_eq!(
            sane_request_id(b"trace-1.a:b_c").as_deref(),
            Some("trace-1.a:b_c")
        );
        assert_eq!(sane_request_id(b""), None);
        assert_eq!(sane_request_id(b"a b"), None);
        assert_eq!(sane_request_id(b"a\"b"), None);
        assert_eq!(sane_request_id(&[b'a'; 129]), None);
        let made = new_request_id();
        assert!(made.starts_with("req_") && made.len() == 20, "{made}");
        assert_eq!(sane_request_id(made.as_bytes()), Some(made));
    }
}
