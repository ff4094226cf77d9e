//! The front of the server: every request passes here first, and the hot ones end here.
//!
//! In order: request id, tracing span and panic guard; the drain gate (during shutdown new
//! requests get 503 with `Retry-After`); with `--simulate-errors`, `Tollgate-Simulate`; then, for
//! the routes that take an API key ([`api_route`]), the key and the account's rate limit with the
//! `RateLimit` headers. A refusal (401, 429) and the read of a task are answered right here;
//! everything else goes on to the axum [`Router`](super::router). On the way out: any error
//! that is not in the envelope yet (axum's own 404/405/413) is put into it, the request id is
//! set, the request is counted and logged.
//!
//! Why not axum middleware: these steps run on every request of every customer, and as
//! `from_fn` layers behind the router each cost a boxed future, a clone of the inner service
//! and a route lookup. As one hand-written service in front of the router, a 429 or 401 never
//! reaches the router at all (bench/README.md has the figures).

use super::error::{envelope, internal_error, Enveloped, Origin, ORIGIN, REQUEST_ID};
use super::extract::{bearer, body_too_large, Credential};
use super::AppState;
use crate::domain::ratelimit::Admission;
use crate::domain::secrets;
use crate::domain::service::Caller;
use crate::error::Error;
use axum::body::Body;
use axum::extract::MatchedPath;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_contract::{headers as h, retry_after, ErrorCode};

use tower::ServiceExt;
use tracing::Instrument;

// Names made once: a `&str` name is parsed again on every insert.
const X_REQUEST_ID: HeaderName = HeaderName::from_static(h::REQUEST_ID);
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static(h::RATELIMIT_POLICY);
const RATELIMIT: HeaderName = HeaderName::from_static(h::RATELIMIT);

/// The route template of `GET /v1/tasks/{id}`, the read served without the router.
const TASK_ROUTE: &str = "/v1/tasks/{id}";
/// The route template of an image download (a file, streamed).
pub const IMAGE_ROUTE: &str = "/v1/tasks/{id}/images/{index}";

/// The routes that take an API key, by method and path: the template (as the router names it)
/// when `method path` is one of them. Anything else (an unknown path, a wrong method) goes to
/// the router unauthenticated, so that it answers 404 or 405 before asking for a key.
///
/// The router holds the same routes (`super::router`); a test checks the two against the
/// OpenAPI document, which a test in turn checks against the router.
pub fn api_route(method: &Method, path: &str) -> Option<&'static str> {
    let rest = path.strip_prefix("/v1/")?;
    let get = *method == Method::GET || *method == Method::HEAD;
    let post = *method == Method::POST;
    // Bytes, not `str::split`: the paths are short and this runs on every request.
    let mut segments = rest.as_bytes().split(|b| *b == b'/');
    let parts: [Option<&[u8]>; 5] = std::array::from_fn(|_| segments.next());
    if segments.next().is_some() || parts.iter().flatten().any(|s| s.is_empty()) {
        return None;
    }
    match parts {
        [Some(b"images"), Some(b"generations"), None, ..] if post => Some("/v1/images/generations"),
        [Some(b"tasks"), None, ..] if get => Some("/v1/tasks"),
        [Some(b"tasks"), Some(_), None, ..] if get => Some(TASK_ROUTE),
        [Some(b"tasks"), Some(_), Some(b"cancel"), None, ..] if post => {
            Some("/v1/tasks/{id}/cancel")
        }
        [Some(b"tasks"), Some(_), Some(b"images"), Some(_), None] if get => Some(IMAGE_ROUTE),
        [Some(b"account"), None, ..] if get => Some("/v1/account"),
        [Some(b"account"), Some(b"ledger"), None, ..] if get => Some("/v1/account/ledger"),
        [Some(b"account"), Some(b"webhook-secret"), None, ..] if get || post => {
            Some("/v1/account/webhook-secret")
        }
        [Some(b"vouchers"), Some(b"redeem"), None, ..] if post => Some("/v1/vouchers/redeem"),
        _ => None,
    }
}

/// The route a response was served by, set by the router (see `super::router`), for metrics.
#[derive(Debug, Clone)]
pub struct ServedBy(pub MatchedPath);

/// The front service. One per server, shared by every connection.
pub struct Gateway {
    state: Arc<AppState>,
    router: Router,
}

impl Gateway {
    pub fn new(state: Arc<AppState>) -> Gateway {
        let router = super::router(Arc::clone(&state));
        Gateway { state, router }
    }

    /// Serves one request, whatever happens: every response leaves through here.
    pub async fn serve(&self, req: Request<Body>) -> Response {
        let started = Instant::now();
        let request_id = req
            .headers()
            .get(&X_REQUEST_ID)
            .and_then(sane_request_id)
            .unwrap_or_else(new_request_id);
        let request_id_header = HeaderValue::from_str(&request_id).ok();
        let method = req.method().clone();
        // Reference-counted, not copied: this runs on every request.
        let uri = req.uri().clone();
        let path = uri.path();
        let route = api_route(&method, path);
        let span = tracing::info_span!("request", request_id = %request_id, method = %method, path = %path);

        // Only a charge can be refused for credits (the 402 whose message links to this server),
        // and no `GET` charges: the many reads skip the header lookups.
        let origin = if method == Method::GET || method == Method::HEAD {
            Origin::default()
        } else {
            Origin::of(req.headers())
        };
        let respond = async {
            let outcome = AssertUnwindSafe(self.dispatch(req, route))
                .catch_unwind()
                .await;
            match outcome {
                Ok(response) => ensure_envelope(response, &method, path),
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
        let label = match route {
            Some(route) => route,
            None => response
                .extensions()
                .get::<ServedBy>()
                .map_or("unmatched", |ServedBy(path)| path.as_str()),
        };
        self.state.app.metrics().observe_request(
            label,
            method.as_str(),
            status,
            elapsed.as_secs_f64(),
        );
        span.in_scope(|| tracing::info!(status, micros = elapsed.as_micros() as u64, "served"));
        response
    }

    async fn dispatch(&self, req: Request<Body>, route: Option<&'static str>) -> Response {
        let state = &self.state;
        if state.draining.load(Ordering::Acquire) {
            return Error::Unavailable {
                reason: "shutting down",
                retry_after: state.app.shutdown_retry_after(),
            }
            .into_response();
        }
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        // Decrements even if the request is cancelled or panics.
        let _in_flight = InFlight(state);
        if state.app.config().simulate_errors {
            if let Some(response) = simulated_failure(req.headers()) {
                return response;
            }
        }
        match route {
            Some(route) => self.api(req, route).await,
            None => self.route(req).await,
        }
    }

    async fn route(&self, req: Request<Body>) -> Response {
        match self.router.clone().oneshot(req).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }

    /// A route that takes an API key: the key, the rate limit, then the handler.
    async fn api(&self, mut req: Request<Body>, route: &'static str) -> Response {
        let app = &self.state.app;
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
        let task_id = (route == TASK_ROUTE && req.method() == Method::GET)
            .then(|| plain_segment(req.uri().path(), 2))
            .flatten();
        let mut response = match (admission.retry_after, task_id) {
            (Some(wait), _) => Error::RateLimited { retry_after: wait }.into_response(),
            (None, Some(id)) => self.read_task(&caller, id).await,
            (None, None) => {
                req.extensions_mut().insert(caller);
                self.route(req).await
            }
        };
        rate_limit_headers(response.headers_mut(), &admission);
        response
    }

    /// `GET /v1/tasks/{id}`, the route clients poll.
    async fn read_task(&self, caller: &Caller, id: &str) -> Response {
        match self.state.app.get_task_json(caller, id).await {
            Ok(json) => (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                json,
            )
                .into_response(),
            Err(e) => e.into_response(),
        }
    }
}

/// The `index`th segment of `path` (0: the one after the first `/`) when it needs no
/// percent-decoding; else `None`, and the router's `Path` extractor decodes it.
fn plain_segment(path: &str, index: usize) -> Option<&str> {
    let segment = path.as_bytes().split(|b| *b == b'/').nth(index + 1)?;
    let segment = std::str::from_utf8(segment).ok()?;
    (!segment.contains('%')).then_some(segment)
}

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

/// Turns any error response that did not come from [`envelope`] (axum's own 404/405/413/415 and
/// the like) into the envelope, keeping its status and headers such as `Allow`.
fn ensure_envelope(response: Response, method: &Method, path: &str) -> Response {
    let status = response.status();
    if status.as_u16() < 400 || response.extensions().get::<Enveloped>().is_some() {
        return response;
    }
    let allow = response.headers().get(header::ALLOW).cloned();
    let keep = allow.clone().map(|allow| (header::ALLOW, allow));
    let shown_path: String = path.chars().take(200).collect();
    match status {
        StatusCode::NOT_FOUND => envelope(
            ErrorCode::UnknownEndpoint,
            format!("There is no endpoint at {method} {shown_path}. Check the URL against /openapi.json."),
            None,
            keep,
        ),
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = allow.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("");
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

/// `Tollgate-Simulate` (only with `--simulate-errors`): the failure it asks for, if any.
fn simulated_failure(headers: &HeaderMap) -> Option<Response> {
    let value = headers.get(h::SIMULATE)?;
    let one_second = Duration::from_secs(1);
    Some(match value.as_bytes() {
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
    })
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
    let policy = rate_limit_value(
        b"\"default\";q=",
        admission.limit.burst.into(),
        b";w=",
        window,
    );
    let state = rate_limit_value(b"\"default\";r=", admission.remaining.into(), b";t=", reset);
    if let Some(v) = policy {
        headers.insert(RATELIMIT_POLICY, v);
    }
    if let Some(v) = state {
        headers.insert(RATELIMIT, v);
    }
}

/// `{a}{x}{b}{y}` as a header value, without `fmt` (this runs on every API request).
fn rate_limit_value(a: &[u8], x: u64, b: &[u8], y: u64) -> Option<HeaderValue> {
    let mut numbers = (itoa::Buffer::new(), itoa::Buffer::new());
    let (x, y) = (
        numbers.0.format(x).as_bytes(),
        numbers.1.format(y).as_bytes(),
    );
    let mut value = Vec::with_capacity(a.len() + x.len() + b.len() + y.len());
    for part in [a, x, b, y] {
        value.extend_from_slice(part);
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(value)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_routes_are_recognised_by_method_and_shape() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(api_route(&get, "/v1/tasks/task_1"), Some(TASK_ROUTE));
        assert_eq!(api_route(&Method::HEAD, "/v1/account"), Some("/v1/account"));
        assert_eq!(
            api_route(&get, "/v1/tasks/task_1/images/0"),
            Some("/v1/tasks/{id}/images/{index}")
        );
        // Not an API route: the router answers 404 or 405 without asking for a key.
        assert_eq!(api_route(&post, "/v1/tasks/task_1"), None);
        assert_eq!(api_route(&get, "/v1/tasks/"), None);
        assert_eq!(api_route(&get, "/v1/tasks//images/0"), None);
        assert_eq!(api_route(&get, "/v1/tasks/a/images/0/x"), None);
        assert_eq!(api_route(&get, "/v1/nothing"), None);
        assert_eq!(api_route(&get, "/admin/accounts"), None);
        assert_eq!(api_route(&Method::DELETE, "/v1/account"), None);
    }

    #[test]
    fn every_documented_api_route_is_recognised() {
        let doc = super::super::openapi::document();
        let mut seen = 0;
        for (path, item) in &doc.paths.paths {
            if !path.starts_with("/v1/") {
                continue;
            }
            let concrete = path.replace("{id}", "task_1").replace("{index}", "0");
            let methods = [
                (Method::GET, item.get.is_some()),
                (Method::POST, item.post.is_some()),
                (Method::PATCH, item.patch.is_some()),
                (Method::DELETE, item.delete.is_some()),
                (Method::PUT, item.put.is_some()),
            ];
            for (method, documented) in methods {
                let expected = documented.then_some(path.as_str());
                assert_eq!(api_route(&method, &concrete), expected, "{method} {path}");
                seen += usize::from(documented);
            }
        }
        assert!(seen >= 10, "only {seen} API operations documented");
    }

    #[test]
    fn plain_segments() {
        assert_eq!(plain_segment("/v1/tasks/task_1", 2), Some("task_1"));
        assert_eq!(plain_segment("/v1/tasks/task%5F1", 2), None);
    }
}
