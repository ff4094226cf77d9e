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

use super::error::{
    enveloped_response, internal_error, listed_response, Enveloped, ErrorReply, Origin, ORIGIN,
    REQUEST_ID,
};
use super::extract::{bearer_value, body_too_large, Credential};
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
use bytes::Bytes;
use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_contract::{headers as h, retry_after, ErrorCode};

use tower::ServiceExt;
use tracing::{Instrument, Span};

// Names made once: a `&str` name is parsed again on every insert.
const X_REQUEST_ID: HeaderName = HeaderName::from_static(h::REQUEST_ID);
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static(h::RATELIMIT_POLICY);
const RATELIMIT: HeaderName = HeaderName::from_static(h::RATELIMIT);
const SIMULATE: HeaderName = HeaderName::from_static(h::SIMULATE);

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

/// What the gateway reads of a request before anything else: its method, its path and three
/// headers (the first of each). A request from hyper lends them from its `Request`
/// ([`Head::of`]); the fast lane lends them from the bytes it parsed, before any `Request` exists.
pub struct Head<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    /// [`api_route`] of the method and path.
    pub route: Option<&'static str>,
    pub authorization: Option<&'a [u8]>,
    pub request_id: Option<&'a [u8]>,
    /// `Tollgate-Simulate` (read only with `--simulate-errors`).
    pub simulate: Option<&'a [u8]>,
}

impl<'a> Head<'a> {
    pub fn of<B>(req: &'a Request<B>) -> Head<'a> {
        let headers = req.headers();
        let value = |name: &HeaderName| headers.get(name).map(HeaderValue::as_bytes);
        Head {
            method: req.method(),
            path: req.uri().path(),
            route: api_route(req.method(), req.uri().path()),
            authorization: value(&header::AUTHORIZATION),
            request_id: value(&X_REQUEST_ID),
            simulate: value(&SIMULATE),
        }
    }
}

/// What the gateway made of a request's [`Head`].
pub enum Screened<'g> {
    /// Refused from the head alone (401, 429, the drain's 503, a simulated failure): counted and
    /// logged already; only the bytes are left to send.
    Refused(Answer),
    /// Let through: serve it with [`Gateway::serve_passed`] (or, for the task read, with
    /// [`Gateway::read_task`], see [`Pass::onward`]).
    Passed(Pass<'g>),
}

/// A response the gateway made without a `Request` or the router: a refusal from the head, or
/// the task read. Its body (an error's envelope, or the domain's JSON), then the `RateLimit`
/// headers (when the account's limit was checked) and `X-Request-Id`.
/// [`Answer::into_response`] renders it for hyper; the fast lane writes the same
/// [`Answer::headers`] and [`Answer::body`].
pub struct Answer {
    body: AnswerBody,
    admission: Option<Admission>,
    request_id: String,
}

enum AnswerBody {
    /// An error, in the envelope (with the request id).
    Error(ErrorReply),
    /// A `200` with JSON made by the domain.
    Json(Bytes),
}

impl Answer {
    pub fn status(&self) -> StatusCode {
        match &self.body {
            AnswerBody::Error(reply) => reply.status(),
            AnswerBody::Json(_) => StatusCode::OK,
        }
    }

    /// Every header of the response, in the order sent (hyper adds `content-length` and `date`).
    pub fn headers(&self, mut header: impl FnMut(&HeaderName, &[u8])) {
        match &self.body {
            AnswerBody::Error(reply) => reply.headers(&mut header),
            AnswerBody::Json(_) => header(&header::CONTENT_TYPE, b"application/json"),
        }
        if let Some(admission) = &self.admission {
            rate_limit_fields(admission, &mut header);
        }
        // Every id the gateway keeps or makes is a valid header value (see `sane_request_id`).
        header(&X_REQUEST_ID, self.request_id.as_bytes());
    }

    /// The body: the JSON as it is, or the envelope written into `scratch`.
    pub fn body<'a>(&'a self, scratch: &'a mut Vec<u8>) -> &'a [u8] {
        match &self.body {
            AnswerBody::Json(json) => json,
            AnswerBody::Error(reply) => {
                scratch.clear();
                reply.write_body(scratch, Some(&self.request_id));
                scratch
            }
        }
    }

    /// The response hyper sends: the same [`Answer::headers`] and body the lane writes.
    pub fn into_response(self) -> Response {
        match &self.body {
            AnswerBody::Error(reply) => {
                let mut body = Vec::with_capacity(256);
                reply.write_body(&mut body, Some(&self.request_id));
                enveloped_response(reply.status(), body, |header| self.headers(header))
            }
            AnswerBody::Json(json) => {
                listed_response(StatusCode::OK, Body::from(json.clone()), |header| {
                    self.headers(header)
                })
            }
        }
    }
}

/// A request the gateway let through, with what it learnt: the caller and its admission (on an
/// API route), the request id, the span, and its place among the requests in flight.
pub struct Pass<'g> {
    started: Instant,
    request_id: String,
    span: Span,
    route: Option<&'static str>,
    access: Option<(Caller, Admission)>,
    _in_flight: InFlight<'g>,
}

impl<'g> Pass<'g> {
    /// Where the request goes on, from its method and path: `GET /v1/tasks/{id}`, the route
    /// clients poll, to [`Gateway::read_task`], which answers it without a `Request` or the
    /// router; anything else to [`Gateway::serve_passed`].
    pub fn onward<'p>(self, method: &Method, path: &'p str) -> Onward<'g, 'p> {
        let id = (self.route == Some(TASK_ROUTE) && *method == Method::GET)
            .then(|| plain_segment(path, 2))
            .flatten();
        match (id, self.access) {
            (Some(id), Some((caller, admission))) => Onward::TaskRead(TaskRead {
                id,
                caller,
                admission,
                pass: Pass {
                    access: None,
                    ..self
                },
            }),
            (_, access) => Onward::Serve(Pass { access, ..self }),
        }
    }
}

/// See [`Pass::onward`].
pub enum Onward<'g, 'p> {
    TaskRead(TaskRead<'g, 'p>),
    Serve(Pass<'g>),
}

/// A task read let through (see [`Pass::onward`]): the id, who asks, their admission.
pub struct TaskRead<'g, 'p> {
    id: &'p str,
    caller: Caller,
    admission: Admission,
    pass: Pass<'g>,
}

/// Why the head was refused, and the admission when the refusal is a 429.
type Stop = (Error, Option<Admission>);

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

    /// Serves one request, whatever happens: every response hyper sends comes from here.
    pub async fn serve(&self, req: Request<Body>) -> Response {
        let screened = self.screen(&Head::of(&req)).await;
        match screened {
            Screened::Refused(refusal) => refusal.into_response(),
            Screened::Passed(pass) => self.serve_passed(req, pass).await,
        }
    }

    /// The checks that need only the head, in order: request id and span; the drain gate;
    /// with `--simulate-errors`, `Tollgate-Simulate`; on an API route ([`api_route`]), the key
    /// and the account's rate limit. A refusal is counted and logged here.
    pub async fn screen(&self, head: &Head<'_>) -> Screened<'_> {
        let started = Instant::now();
        let request_id = head
            .request_id
            .and_then(sane_request_id)
            .unwrap_or_else(new_request_id);
        let route = head.route;
        let span = tracing::info_span!("request", request_id = %request_id, method = %head.method, path = %head.path);
        let checked = AssertUnwindSafe(self.check(head, route))
            .catch_unwind()
            .instrument(span.clone())
            .await;
        let (reply, admission) = match checked {
            Ok(Ok((access, in_flight))) => {
                return Screened::Passed(Pass {
                    started,
                    request_id,
                    span,
                    route,
                    access,
                    _in_flight: in_flight,
                })
            }
            // Inside the span: an internal cause is logged by the mapping.
            Ok(Err((error, admission))) => (span.in_scope(|| ErrorReply::from(error)), admission),
            Err(payload) => {
                let panic = panic_message(payload.as_ref());
                span.in_scope(|| tracing::error!(panic = %panic, "handler panicked"));
                (ErrorReply::internal(), None)
            }
        };
        let status = reply.status().as_u16();
        self.finish(route, None, head.method, status, started, &span);
        Screened::Refused(Answer {
            body: AnswerBody::Error(reply),
            admission,
            request_id,
        })
    }

    async fn check(
        &self,
        head: &Head<'_>,
        route: Option<&'static str>,
    ) -> Result<(Option<(Caller, Admission)>, InFlight<'_>), Stop> {
        let state = &self.state;
        let app = &state.app;
        if state.draining.load(Ordering::Acquire) {
            let shutting_down = Error::Unavailable {
                reason: "shutting down",
                retry_after: app.shutdown_retry_after(),
            };
            return Err((shutting_down, None));
        }
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        // Decrements even if the request is cancelled, panics or is refused.
        let in_flight = InFlight(state);
        if app.config().simulate_errors {
            if let Some(failure) = head.simulate.map(simulated_failure) {
                return Err((failure, None));
            }
        }
        let Some(_) = route else {
            return Ok((None, in_flight));
        };
        let credential = match bearer_value(head.authorization) {
            Credential::Missing => None,
            Credential::Bearer(key) => Some(key),
            Credential::Unsupported => {
                return Err((Error::InvalidCredential { admin: false }, None))
            }
        };
        let caller = app.authenticate(credential).await.map_err(|e| (e, None))?;
        let admission = app.admit(&caller).await.map_err(|e| (e, None))?;
        match admission.retry_after {
            Some(wait) => Err((Error::RateLimited { retry_after: wait }, Some(admission))),
            None => Ok((Some((caller, admission)), in_flight)),
        }
    }

    /// Serves a request that [`Gateway::screen`] let through: the task read with
    /// [`Gateway::read_task`], everything else through the router; then the envelope for any
    /// error that is not in it yet, the `RateLimit` headers and the request id, and the count and
    /// the log line.
    pub async fn serve_passed(&self, req: Request<Body>, pass: Pass<'_>) -> Response {
        let pass = match pass.onward(req.method(), req.uri().path()) {
            Onward::TaskRead(read) => return self.read_task(read).await.into_response(),
            Onward::Serve(pass) => pass,
        };
        let Pass {
            started,
            request_id,
            span,
            route,
            access,
            _in_flight,
        } = pass;
        let request_id_header = HeaderValue::from_str(&request_id).ok();
        let method = req.method().clone();
        // Reference-counted, not copied: this runs on every request.
        let uri = req.uri().clone();
        let path = uri.path();
        // Only a charge can be refused for credits (the 402 whose message links to this server),
        // and no `GET` charges: the many reads skip the header lookups.
        let origin = if method == Method::GET || method == Method::HEAD {
            Origin::default()
        } else {
            Origin::of(req.headers())
        };
        let respond = async {
            let outcome = AssertUnwindSafe(self.dispatch(req, access))
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
        let served_by = response.extensions().get::<ServedBy>();
        self.finish(route, served_by, &method, status, started, &span);
        response
    }

    async fn dispatch(
        &self,
        mut req: Request<Body>,
        access: Option<(Caller, Admission)>,
    ) -> Response {
        let Some((caller, admission)) = access else {
            return self.route(req).await;
        };
        req.extensions_mut().insert(caller);
        let mut response = self.route(req).await;
        rate_limit_headers(response.headers_mut(), &admission);
        response
    }

    async fn route(&self, req: Request<Body>) -> Response {
        match self.router.clone().oneshot(req).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }

    /// `GET /v1/tasks/{id}`, the route clients poll, answered here for hyper and the fast lane
    /// alike: the task's JSON (or its error), the `RateLimit` headers and the request id; counted
    /// and logged like any other request.
    pub async fn read_task(&self, read: TaskRead<'_, '_>) -> Answer {
        let TaskRead {
            id,
            caller,
            admission,
            pass,
        } = read;
        let Pass {
            started,
            request_id,
            span,
            route,
            _in_flight,
            ..
        } = pass;
        let read = AssertUnwindSafe(self.state.app.get_task_json(&caller, id))
            .catch_unwind()
            .instrument(span.clone())
            .await;
        let body = match read {
            Ok(Ok(json)) => AnswerBody::Json(json),
            // Inside the span: an internal cause is logged by the mapping.
            Ok(Err(e)) => AnswerBody::Error(span.in_scope(|| ErrorReply::from(e))),
            Err(payload) => {
                let panic = panic_message(payload.as_ref());
                span.in_scope(|| tracing::error!(panic = %panic, "handler panicked"));
                AnswerBody::Error(ErrorReply::internal())
            }
        };
        let answer = Answer {
            body,
            admission: Some(admission),
            request_id,
        };
        let status = answer.status().as_u16();
        self.finish(route, None, &Method::GET, status, started, &span);
        answer
    }

    /// Counts the request (by its API route, else the route the router matched) and logs it.
    fn finish(
        &self,
        route: Option<&'static str>,
        served_by: Option<&ServedBy>,
        method: &Method,
        status: u16,
        started: Instant,
        span: &Span,
    ) {
        let elapsed = started.elapsed();
        let label = match (route, served_by) {
            (Some(route), _) => route,
            (None, Some(ServedBy(path))) => path.as_str(),
            (None, None) => "unmatched",
        };
        self.state.app.metrics().observe_request(
            label,
            method.as_str(),
            status,
            elapsed.as_secs_f64(),
        );
        span.in_scope(|| tracing::info!(status, micros = elapsed.as_micros() as u64, "served"));
    }
}

/// The `index`th segment of `path` (0: the one after the first `/`) when it needs no
/// percent-decoding; else `None`, and the router's `Path` extractor decodes it.
fn plain_segment(path: &str, index: usize) -> Option<&str> {
    let segment = path.as_bytes().split(|b| *b == b'/').nth(index + 1)?;
    let segment = std::str::from_utf8(segment).ok()?;
    (!segment.contains('%')).then_some(segment)
}

/// One request past the drain gate, until it is answered (the drain waits for none to be left).
pub struct InFlight<'a>(&'a AppState);

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
        s if s.is_server_error() => return internal_error(),
        _ => ErrorReply::new(
            ErrorCode::InvalidValue,
            format!("The request could not be understood ({}).", status.canonical_reason().unwrap_or("bad request")),
        ),
    };
    reply.allow(allow).into_response()
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

/// [`rate_limit_fields`] into a header map.
fn rate_limit_headers(headers: &mut HeaderMap, admission: &Admission) {
    rate_limit_fields(admission, |name, value| {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.insert(name.clone(), value);
        }
    });
}

/// `RateLimit-Policy` and `RateLimit` of draft-ietf-httpapi-ratelimit-headers: the quota is the
/// burst, its window the time to refill it; `r` is what is left now, `t` the seconds until full.
fn rate_limit_fields(admission: &Admission, mut header: impl FnMut(&HeaderName, &[u8])) {
    let window = retry_after::whole_seconds_ceil(admission.window());
    let reset = if admission.reset.is_zero() {
        0
    } else {
        retry_after::whole_seconds_ceil(admission.reset)
    };
    let mut value = FieldValue::default();
    value.join(
        b"\"default\";q=",
        admission.limit.burst.into(),
        b";w=",
        window,
    );
    header(&RATELIMIT_POLICY, value.as_bytes());
    value.join(b"\"default\";r=", admission.remaining.into(), b";t=", reset);
    header(&RATELIMIT, value.as_bytes());
}

/// A header value of the form `{a}{x}{b}{y}`, made on the stack without `fmt` (this runs on
/// every API request). 64 bytes hold the longest: 15 bytes of text and two 20-digit numbers.
struct FieldValue {
    bytes: [u8; 64],
    len: usize,
}

impl Default for FieldValue {
    fn default() -> FieldValue {
        FieldValue {
            bytes: [0; 64],
            len: 0,
        }
    }
}

impl FieldValue {
    /// Constant-length text parts: their copies are inlined moves, not calls.
    fn join<const A: usize, const B: usize>(&mut self, a: &[u8; A], x: u64, b: &[u8; B], y: u64) {
        self.len = 0;
        self.text(a);
        self.number(x);
        self.text(b);
        self.number(y);
    }

    fn text<const N: usize>(&mut self, part: &[u8; N]) {
        if let Some(slot) = self.bytes.get_mut(self.len..self.len + N) {
            slot.copy_from_slice(part);
            self.len += N;
        }
    }

    /// Decimal digits written in place (itoa would format into its own buffer, then be copied).
    fn number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for &digit in &digits[at..] {
            if let Some(slot) = self.bytes.get_mut(self.len) {
                *slot = digit;
                self.len += 1;
            }
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
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
    fn field_values() {
        let mut value = FieldValue::default();
        for (x, y) in [(0, 0), (9, 10), (1_000_000, 59), (u64::MAX, u64::MAX)] {
            value.join(b"\"default\";q=", x, b";w=", y);
            let expected = format!("\"default\";q={x};w={y}");
            assert_eq!(value.as_bytes(), expected.as_bytes());
        }
    }

    #[test]
    fn plain_segments() {
        assert_eq!(plain_segment("/v1/tasks/task_1", 2), Some("task_1"));
        assert_eq!(plain_segment("/v1/tasks/task%5F1", 2), None);
    }
}
