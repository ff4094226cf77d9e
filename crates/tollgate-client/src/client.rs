//! [`Client`]: typed calls for the API-key routes, and the HTTP plumbing every call shares.
//!
//! Each typed method names its route and body; all of them go through one private path that adds
//! the `Authorization` header, gives every POST an `Idempotency-Key` (the caller's, or a UUID v4
//! made once per call so that every retry of it carries the same key), runs the attempts through
//! the [`Retrier`] and decodes the answer. The admin routes live in [`crate::admin`] on the same
//! plumbing.
//!
//! A `Client` is cheap to clone; clones share the connection pool, the retry budget and the host
//! pause, which is what makes the budget "per client" rather than per call.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::time::Instant;
use tollgate_contract::headers;
use tollgate_contract::retry::RetryPolicy;
use tollgate_contract::types::{
    Account, CreateGenerationRequest, Health, LedgerEntry, List, Model, Task, WebhookSecret,
};

use crate::admin::AdminClient;
use crate::budget::{RetryBudget, RetryBudgetConfig};
use crate::error::{AttemptRecord, Error, Result, TransportKind};
use crate::retry::{CallInfo, RawResponse, Retrier, TransportFailure};
use tollgate_contract::Secret;

/// Where the SDK looks for the server when no base URL is given.
pub const DEFAULT_BASE_URL: &str = "http://127.0.0.1:8080";
/// Environment variable for the server's base URL.
pub const ENV_BASE_URL: &str = "TOLLGATE_BASE_URL";
/// Environment variable for the API key.
pub const ENV_API_KEY: &str = "TOLLGATE_API_KEY";
/// Environment variable for the operator's token.
pub const ENV_ADMIN_TOKEN: &str = "TOLLGATE_ADMIN_TOKEN";

/// Configures a [`Client`] (or an [`AdminClient`]). Every setting has the seed's default.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    base_url: String,
    token: Option<Secret>,
    policy: RetryPolicy,
    budget: Option<RetryBudgetConfig>,
    deadline: Option<Duration>,
    attempt_timeout: Option<Duration>,
    connect_timeout: Duration,
    http: Option<reqwest::Client>,
}

impl ClientBuilder {
    pub fn new(base_url: impl Into<String>) -> Self {
        ClientBuilder {
            base_url: base_url.into(),
            token: None,
            policy: RetryPolicy::default(),
            budget: Some(RetryBudgetConfig::default()),
            deadline: None,
            attempt_timeout: Some(Duration::from_secs(30)),
            connect_timeout: Duration::from_secs(10),
            http: None,
        }
    }

    /// `TOLLGATE_BASE_URL` (default `http://127.0.0.1:8080`) and, when set, `TOLLGATE_API_KEY`.
    pub fn from_env() -> Self {
        let base = std::env::var(ENV_BASE_URL).ok().filter(|v| !v.is_empty());
        let mut b = ClientBuilder::new(base.unwrap_or_else(|| DEFAULT_BASE_URL.to_owned()));
        if let Some(key) = std::env::var(ENV_API_KEY).ok().filter(|v| !v.is_empty()) {
            b = b.api_key(key);
        }
        b
    }

    /// The API key (`tg_…`) sent as `Authorization: Bearer`.
    pub fn api_key(mut self, key: impl Into<Secret>) -> Self {
        self.token = Some(key.into());
        self
    }

    /// The operator's token, for [`ClientBuilder::build_admin`].
    pub fn admin_token(mut self, token: impl Into<Secret>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The whole retry policy: what is retried, backoff, jitter, `Retry-After` ceiling, overrides.
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Retries after the first attempt (default 5; 0 disables retries).
    pub fn max_retries(mut self, n: u32) -> Self {
        self.policy.max_retries = n;
        self
    }

    /// The retry budget shared by all calls of the client (default: [`RetryBudgetConfig::default`]).
    pub fn retry_budget(mut self, config: RetryBudgetConfig) -> Self {
        self.budget = Some(config);
        self
    }

    /// Retries without a budget: every call gets its full retries whatever the others did. Not
    /// recommended: in an outage each call becomes `max_retries + 1` requests.
    pub fn no_retry_budget(mut self) -> Self {
        self.budget = None;
        self
    }

    /// The default overall deadline of each call, retries and waits included (default: none).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The longest one attempt may take before it counts as a retryable timeout (default 30 s).
    pub fn attempt_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// How long to wait for a TCP connection (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Uses a reqwest client of the caller's (its own timeouts, proxies, TLS).
    pub fn http_client(mut self, http: reqwest::Client) -> Self {
        self.http = Some(http);
        self
    }

    /// A client for the API-key routes. The key may be absent (the server then answers 401).
    pub fn build(self) -> Result<Client> {
        Ok(Client {
            core: Arc::new(self.core()?),
            deadline: None,
        }
        .with_default_deadline())
    }

    /// A client for the operator's routes, authenticated with [`ClientBuilder::admin_token`].
    pub fn build_admin(self) -> Result<AdminClient> {
        Ok(AdminClient::from_client(self.build()?))
    }

    fn core(self) -> Result<Core> {
        let url = reqwest::Url::parse(self.base_url.trim())
            .map_err(|e| Error::config(format!("invalid base URL {:?}: {e}", self.base_url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::config(format!(
                "the base URL must be http:// or https://, not {:?}",
                self.base_url
            )));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(Error::config(
                "the base URL must not have a query or a fragment",
            ));
        }
        let host = match (url.host_str(), url.port_or_known_default()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            _ => {
                return Err(Error::config(format!(
                    "the base URL {:?} has no host",
                    self.base_url
                )))
            }
        };
        let base = url.as_str().trim_end_matches('/').to_owned();
        let auth = match &self.token {
            Some(t) => {
                let mut v =
                    HeaderValue::from_str(&format!("Bearer {}", t.expose())).map_err(|_| {
                        Error::config(
                            "the API key or admin token contains characters a header cannot carry",
                        )
                    })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let http = match self.http {
            Some(http) => http,
            None => reqwest::Client::builder()
                .connect_timeout(self.connect_timeout)
                .user_agent(concat!("tollgate-client/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| {
                    Error::config(format!("cannot build the HTTP client: {}", describe(&e)))
                })?,
        };
        let retrier = Retrier::new(self.policy)
            .with_budget(self.budget.map(|c| Arc::new(RetryBudget::new(c))))
            .with_attempt_timeout(self.attempt_timeout);
        Ok(Core {
            http,
            base,
            host,
            auth,
            retrier,
            default_deadline: self.deadline,
            attempt_timeout: self.attempt_timeout,
        })
    }
}

/// What every clone of a client shares.
pub(crate) struct Core {
    http: reqwest::Client,
    /// The base URL without a trailing slash.
    base: String,
    /// `host:port`: the key of the host pause.
    host: String,
    /// `Bearer …`, marked sensitive.
    auth: Option<HeaderValue>,
    retrier: Retrier,
    default_deadline: Option<Duration>,
    /// How long one attempt may take (a long poll must end well inside it).
    attempt_timeout: Option<Duration>,
}

/// How long [`Client::wait_for_task`] asks the server to hold each answer.
const LONG_POLL: Duration = Duration::from_secs(25);
/// What a long poll leaves of the attempt timeout and the deadline, for the answer to travel.
const LONG_POLL_MARGIN: Duration = Duration::from_secs(5);

/// Parameters of the list routes (`GET /v1/tasks`, `GET /admin/accounts`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListParams {
    /// Page size (the server's default when absent).
    pub limit: Option<u32>,
    /// The id of the last item of the previous page.
    pub after: Option<String>,
}

impl ListParams {
    pub(crate) fn query(&self) -> String {
        let mut parts = Vec::new();
        if let Some(limit) = self.limit {
            parts.push(format!("limit={limit}"));
        }
        if let Some(after) = &self.after {
            parts.push(format!("after={}", encode(after)));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!("?{}", parts.join("&"))
        }
    }
}

/// The SDK for the API-key routes. See the crate docs for an example.
#[derive(Clone)]
pub struct Client {
    pub(crate) core: Arc<Core>,
    deadline: Option<Duration>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.core.base)
            .field("credential", &self.core.auth.as_ref().map(|_| "[redacted]"))
            .field("deadline", &self.deadline)
            .field("policy", self.core.retrier.policy())
            .finish_non_exhaustive()
    }
}

impl Client {
    pub fn builder(base_url: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(base_url)
    }

    /// A client configured from `TOLLGATE_BASE_URL` and `TOLLGATE_API_KEY`.
    pub fn from_env() -> Result<Client> {
        ClientBuilder::from_env().build()
    }

    fn with_default_deadline(mut self) -> Self {
        self.deadline = self.core.default_deadline;
        self
    }

    /// The same client (pool, budget, host pause) with another overall deadline per call.
    pub fn with_deadline(&self, deadline: Option<Duration>) -> Client {
        Client {
            core: self.core.clone(),
            deadline,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.core.base
    }

    /// The retry loop, with its policy, budget and host pause.
    pub fn retrier(&self) -> &Retrier {
        &self.core.retrier
    }

    /// `POST /v1/images/generations`: queues a task and charges its cost. Safe to retry: the SDK
    /// makes one `Idempotency-Key` for the call and sends it with every attempt.
    pub async fn create_generation(&self, request: &CreateGenerationRequest) -> Result<Task> {
        self.post_json("/v1/images/generations", request, None)
            .await
    }

    /// Like [`Client::create_generation`] with the caller's `Idempotency-Key` (1–255 printable
    /// ASCII), so that a retry by the caller, later or from elsewhere, cannot create a second task.
    pub async fn create_generation_with_key(
        &self,
        request: &CreateGenerationRequest,
        key: &str,
    ) -> Result<Task> {
        self.post_json("/v1/images/generations", request, Some(key.to_owned()))
            .await
    }

    /// `GET /v1/tasks/{id}`.
    pub async fn get_task(&self, id: &str) -> Result<Task> {
        let path = format!("/v1/tasks/{}", segment(id, "task id")?);
        self.get_json(&path).await
    }

    /// `GET /v1/tasks?limit=&after=`: the account's tasks, newest first.
    pub async fn list_tasks(&self, params: &ListParams) -> Result<List<Task>> {
        self.get_json(&format!("/v1/tasks{}", params.query())).await
    }

    /// `POST /v1/tasks/{id}/cancel`: cancels a queued task and refunds it.
    pub async fn cancel_task(&self, id: &str) -> Result<Task> {
        let path = format!("/v1/tasks/{}/cancel", segment(id, "task id")?);
        let response = self.send(Method::POST, &path, None, None).await?;
        decode(response)
    }

    /// `GET /v1/tasks/{id}/images/{index}`: the PNG bytes of one image.
    pub async fn get_image(&self, task_id: &str, index: u32) -> Result<Bytes> {
        let path = format!("/v1/tasks/{}/images/{index}", segment(task_id, "task id")?);
        Ok(self.send(Method::GET, &path, None, None).await?.0.body)
    }

    /// `GET /v1/account`: name, balance and rate limit of the key's account.
    pub async fn account(&self) -> Result<Account> {
        self.get_json("/v1/account").await
    }

    /// `GET /v1/models`: the models for sale, with their prices per size and `max_n`.
    pub async fn models(&self) -> Result<List<Model>> {
        self.get_json("/v1/models").await
    }

    /// `GET /v1/account/ledger?limit=&after=`: the account's balance changes.
    ///
    /// A page of the ledger, newest first; `params.after` is the `id` of the last entry of
    /// the previous page (the whole ledger is every page until `has_more` is false).
    pub async fn ledger(&self, params: &ListParams) -> Result<List<LedgerEntry>> {
        self.get_json(&format!("/v1/account/ledger{}", params.query()))
            .await
    }

    /// `GET /v1/account/webhook-secret` (extension): the secret that signs this account's
    /// webhook deliveries; check them with [`crate::webhook::verify`].
    pub async fn webhook_secret(&self) -> Result<WebhookSecret> {
        self.get_json("/v1/account/webhook-secret").await
    }

    /// `POST /v1/account/webhook-secret` (extension): replaces the webhook secret; deliveries
    /// are signed with the new one from now on.
    pub async fn rotate_webhook_secret(&self) -> Result<WebhookSecret> {
        let response = self
            .send(Method::POST, "/v1/account/webhook-secret", None, None)
            .await?;
        decode(response)
    }

    /// `GET /healthz` (extension): `ok`, or `draining` during shutdown.
    pub async fn health(&self) -> Result<Health> {
        self.get_json("/healthz").await
    }

    /// Waits until the task is succeeded, failed or canceled, calling `on_update` with each
    /// state seen. Each ask is `GET /v1/tasks/{id}?wait=N`, which the server holds until the
    /// task finishes (up to 25 s, less when the attempt timeout or the deadline is shorter), so
    /// the end is seen at once with one request per 25 s. `poll_interval` is the least time
    /// between two asks: against a server that answers at once (one without the long poll) this
    /// is plain polling. Each ask is a call with its own retries; wrap this in a timeout (or drop
    /// it) to stop waiting.
    pub async fn wait_for_task(
        &self,
        id: &str,
        poll_interval: Duration,
        mut on_update: impl FnMut(&Task),
    ) -> Result<Task> {
        let path = format!("/v1/tasks/{}", segment(id, "task id")?);
        let hold = self.long_poll();
        loop {
            let asked = Instant::now();
            let task: Task = match hold {
                Some(hold) => {
                    self.get_json(&format!("{path}?wait={}", hold.as_secs()))
                        .await?
                }
                None => self.get_json(&path).await?,
            };
            on_update(&task);
            if task.status.is_terminal() {
                return Ok(task);
            }
            tokio::time::sleep(poll_interval.saturating_sub(asked.elapsed())).await;
        }
    }

    /// How long each ask of [`Client::wait_for_task`] may be held; `None` when the limits of an
    /// attempt leave too little for a long poll to be worth it.
    fn long_poll(&self) -> Option<Duration> {
        let bound = |limit: Option<Duration>| {
            limit.map_or(LONG_POLL, |l| l.saturating_sub(LONG_POLL_MARGIN))
        };
        let hold = LONG_POLL
            .min(bound(self.core.attempt_timeout))
            .min(bound(self.deadline));
        (hold >= Duration::from_secs(1)).then_some(hold)
    }

    pub(crate) async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        decode(self.send(Method::GET, path, None, None).await?)
    }

    pub(crate) async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        key: Option<String>,
    ) -> Result<T> {
        let body = serde_json::to_vec(body)
            .map_err(|e| Error::config(format!("cannot encode the request: {e}")))?;
        decode(
            self.send(Method::POST, path, Some(body.into()), key)
                .await?,
        )
    }

    pub(crate) async fn patch_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let body = serde_json::to_vec(body)
            .map_err(|e| Error::config(format!("cannot encode the request: {e}")))?;
        decode(
            self.send(Method::PATCH, path, Some(body.into()), None)
                .await?,
        )
    }

    /// Sends one call through the retry loop. Every POST gets an `Idempotency-Key`, the same on
    /// every attempt.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        key: Option<String>,
    ) -> Result<(RawResponse, Vec<AttemptRecord>)> {
        let key = match key {
            Some(k) => Some(validate_key(k)?),
            None if method == Method::POST => Some(uuid::Uuid::new_v4().to_string()),
            None => None,
        };
        let key = key
            .map(|k| HeaderValue::from_str(&k))
            .transpose()
            .map_err(|_| Error::config("invalid Idempotency-Key"))?;
        let url = format!("{}{path}", self.core.base);
        let label = format!("{method} {path}");
        let deadline = self.deadline.map(|d| Instant::now() + d);
        let core = &*self.core;
        let call = CallInfo {
            host: &core.host,
            label: &label,
            deadline,
        };
        core.retrier
            .run_with_history(call, |_attempt| {
                let mut request = core.http.request(method.clone(), &url);
                if let Some(auth) = &core.auth {
                    request = request.header(AUTHORIZATION, auth.clone());
                }
                if let Some(key) = &key {
                    request = request.header(headers::IDEMPOTENCY_KEY, key.clone());
                }
                if let Some(body) = &body {
                    request = request
                        .header(CONTENT_TYPE, "application/json")
                        .body(body.clone());
                }
                async move {
                    let response = request.send().await.map_err(transport_failure)?;
                    let status = response.status().as_u16();
                    let headers = response.headers().clone();
                    let body = response.bytes().await.map_err(transport_failure)?;
                    Ok(RawResponse {
                        status,
                        headers,
                        body,
                    })
                }
            })
            .await
    }
}

/// Decodes a 2xx body as the contract's type; a mismatch keeps the call's attempt history.
pub(crate) fn decode<T: DeserializeOwned>(
    (response, history): (RawResponse, Vec<AttemptRecord>),
) -> Result<T> {
    serde_json::from_slice(&response.body).map_err(|e| {
        Error::decode(
            response.status,
            response.request_id(),
            format!("the body does not match the contract: {e}"),
        )
        .with_history(history)
    })
}

fn transport_failure(err: reqwest::Error) -> TransportFailure {
    let kind = if err.is_connect() {
        TransportKind::Connect
    } else if err.is_timeout() {
        TransportKind::Timeout
    } else {
        TransportKind::Other
    };
    TransportFailure {
        kind,
        message: describe(&err),
    }
}

/// The cause chain of a reqwest error, without its URL (which could carry credentials).
fn describe(err: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    let top = if err.is_connect() {
        "connection failed"
    } else if err.is_timeout() {
        "timed out"
    } else if err.is_body() || err.is_decode() {
        "reading the response failed"
    } else {
        "request failed"
    };
    parts.push(top.to_owned());
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// An `Idempotency-Key` must be 1–255 printable ASCII characters (the contract).
fn validate_key(key: String) -> Result<String> {
    if (1..=255).contains(&key.len()) && key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        Ok(key)
    } else {
        Err(Error::config(
            "an Idempotency-Key must be 1 to 255 printable ASCII characters",
        ))
    }
}

/// A path segment, percent-encoded so an id cannot change the route.
pub(crate) fn segment(value: &str, what: &str) -> Result<String> {
    if value.is_empty() {
        return Err(Error::config(format!("the {what} must not be empty")));
    }
    Ok(encode(value))
}

fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_cannot_change_the_route() {
        assert_eq!(segment("task_abc-1", "task id").unwrap(), "task_abc-1");
        assert_eq!(
            segment("../admin/accounts?x=1", "task id").unwrap(),
            "..%2Fadmin%2Faccounts%3Fx%3D1"
        );
        assert!(segment("", "task id").is_err());
    }

    #[test]
    fn list_query() {
        assert_eq!(ListParams::default().query(), "");
        let p = ListParams {
            limit: Some(5),
            after: Some("task_1".into()),
        };
        assert_eq!(p.query(), "?limit=5&after=task_1");
    }

    #[test]
    fn keys_are_checked() {
        assert!(validate_key("abc".into()).is_ok());
        assert!(validate_key(String::new()).is_err());
        assert!(validate_key("é".into()).is_err());
        assert!(validate_key("a\nb".into()).is_err());
        assert!(validate_key("k".repeat(256)).is_err());
    }

    #[test]
    fn base_urls_are_checked_and_debug_hides_the_key() {
        assert!(Client::builder("ftp://x").build().is_err());
        assert!(Client::builder("not a url").build().is_err());
        assert!(Client::builder("http://h:1/?q").build().is_err());
        let c = Client::builder("http://127.0.0.1:9/")
            .api_key("tg_topsecret")
            .build()
            .unwrap();
        assert_eq!(c.base_url(), "http://127.0.0.1:9");
        assert_eq!(c.core.host, "127.0.0.1:9");
        assert!(!format!("{c:?}").contains("topsecret"));
        let b = Client::builder("http://h").api_key("tg_topsecret");
        assert!(!format!("{b:?}").contains("topsecret"));
        assert_eq!(
            Client::builder("http://h").build().unwrap().core.host,
            "h:80"
        );
    }
}
