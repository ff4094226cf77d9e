//! What every provider backend shares: one HTTP client per model with the provider's key, the
//! SDK's retry loop around every call, and the rules for what a task may be told.
//!
//! Every call goes through the SDK's [`Retrier`] with the contract's [`RetryPolicy`]: 429
//! (honouring `Retry-After`), 5xx and transport failures are retried with the seed's backoff, up
//! to 5 times, within the task's deadline, under a retry budget and a host pause shared by every
//! task of the model. Any other 4xx fails the task at once with the provider's own message,
//! cleaned and cut to 200 characters.
//!
//! **Secrets:** the key lives in a sensitive header value (its `Debug` prints nothing) that is
//! sent only to the provider's own origin (never to the CDN an output URL points at), and no
//! reason built here contains it: a provider's message is scrubbed of it (and of anything that
//! looks like a key) before it reaches a task, and 401/403 messages are not echoed at all.

use super::BackendError;
use crate::config::Secret;
use crate::error::{Error, Result};
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tollgate_client::{
    CallInfo, RawResponse, Retrier, RetryPolicy, StopReason, TransportFailure, TransportKind,
};

/// The largest answer read from a provider (4 images of 1024×1024, even in base64, fit many times).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// How much of a provider's error message a task shows.
const MAX_REASON_CHARS: usize = 200;
const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

/// A provider's API: its base URL, its key, and the retry loop every call goes through.
pub struct Upstream {
    /// `http(s)://host[:port][/prefix]`, without a trailing slash.
    base: String,
    origin: reqwest::Url,
    /// `host:port`, the key of the retry loop's host pause.
    host: String,
    /// `<scheme> <key>`, marked sensitive; `None` for a provider without a key (a ComfyUI on
    /// the operator's own network).
    authorization: Option<HeaderValue>,
    /// The key itself, to scrub it from anything the provider echoes.
    api_key: Secret,
    http: reqwest::Client,
    retrier: Retrier,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// A client of the provider at `base_url`, authenticating as `<scheme> <api_key>` (`Bearer`
    /// for most, `Key` for fal; no header for an empty key). `policy` is the contract's, with the
    /// provider's overrides.
    pub fn new(base_url: &str, api_key: Secret, scheme: &str, policy: RetryPolicy) -> Result<Self> {
        let base = base_url.trim().trim_end_matches('/').to_owned();
        let origin = reqwest::Url::parse(&base)
            .map_err(|e| Error::internal(format!("the provider URL {base:?} is not a URL: {e}")))?;
        if !matches!(origin.scheme(), "http" | "https") || origin.host_str().is_none() {
            return Err(Error::internal(
                "the provider URL must be an http:// or https:// URL with a host",
            ));
        }
        let host = format!(
            "{}:{}",
            origin.host_str().unwrap_or_default(),
            origin.port_or_known_default().unwrap_or(0)
        );
        let authorization = if api_key.expose().is_empty() {
            None
        } else {
            let mut value = HeaderValue::from_str(&format!("{scheme} {}", api_key.expose()))
                .map_err(|_| Error::internal("the provider's key is not a valid header value"))?;
            value.set_sensitive(true);
            Some(value)
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::internal(format!("provider HTTP client: {e}")))?;
        // No per-attempt limit: one image can take a minute. The task's deadline bounds the
        // whole call, retries included.
        let retrier = Retrier::new(policy).with_attempt_timeout(None);
        Ok(Upstream {
            base,
            origin,
            host,
            authorization,
            api_key,
            http,
            retrier,
        })
    }

    /// `{base}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The host the key is sent to, as `host:port`.
    #[cfg(test)]
    pub fn host(&self) -> &str {
        &self.host
    }

    /// One call, retried by the contract's policy within `deadline`: the body of its 2xx answer,
    /// or why there is none. The key goes only to the provider's own origin.
    pub async fn call(
        &self,
        method: Method,
        url: &str,
        body: Option<&serde_json::Value>,
        label: &'static str,
        deadline: Instant,
    ) -> Result<Bytes, BackendError> {
        let body = match body {
            Some(value) => Some((
                "application/json",
                serde_json::to_vec(value)
                    .map(Bytes::from)
                    .map_err(|e| BackendError::Internal(format!("request body: {e}")))?,
            )),
            None => None,
        };
        self.send_retried(method, url, body, None, label, deadline)
            .await
    }

    /// `POST url` with a form-encoded body (Stripe's API) under an `Idempotency-Key`, which
    /// every retry repeats so the provider acts once.
    pub async fn post_form(
        &self,
        url: &str,
        form: &[(String, String)],
        idempotency_key: &str,
        label: &'static str,
        deadline: Instant,
    ) -> Result<Bytes, BackendError> {
        let body = serde_urlencoded::to_string(form)
            .map_err(|e| BackendError::Internal(format!("form body: {e}")))?;
        let body = Some(("application/x-www-form-urlencoded", Bytes::from(body)));
        let key = HeaderValue::from_str(idempotency_key).map_err(|_| {
            BackendError::Internal("an idempotency key that is not a header".into())
        })?;
        self.send_retried(Method::POST, url, body, Some(key), label, deadline)
            .await
    }

    async fn send_retried(
        &self,
        method: Method,
        url: &str,
        body: Option<(&'static str, Bytes)>,
        idempotency_key: Option<HeaderValue>,
        label: &'static str,
        deadline: Instant,
    ) -> Result<Bytes, BackendError> {
        let target = reqwest::Url::parse(url).map_err(|_| BackendError::Rejected {
            reason: "it answered with a link that is not a URL".to_owned(),
        })?;
        if !matches!(target.scheme(), "http" | "https") {
            return Err(BackendError::Rejected {
                reason: "it answered with a link that is not http(s)".to_owned(),
            });
        }
        let authorized = target.origin() == self.origin.origin();
        // The loop reads error bodies as tollgate envelopes; keep the last one to quote the
        // provider's own message.
        let last_error: Arc<Mutex<Option<Bytes>>> = Arc::default();
        let call = CallInfo {
            host: &self.host,
            label,
            deadline: Some(deadline),
        };
        let result = self
            .retrier
            .run(call, |_attempt| {
                let mut request = self.http.request(method.clone(), target.clone());
                if let Some(value) = self.authorization.as_ref().filter(|_| authorized) {
                    request = request.header(AUTHORIZATION, value.clone());
                }
                if let Some((content_type, body)) = &body {
                    request = request
                        .header(CONTENT_TYPE, *content_type)
                        .body(body.clone());
                }
                if let Some(key) = &idempotency_key {
                    request = request.header("Idempotency-Key", key.clone());
                }
                let last_error = Arc::clone(&last_error);
                async move {
                    let response = send(request).await?;
                    if !(200..300).contains(&response.status) {
                        if let Ok(mut slot) = last_error.lock() {
                            *slot = Some(response.body.clone());
                        }
                    }
                    Ok(response)
                }
            })
            .await;
        match result {
            Ok(response) => Ok(response.body),
            Err(error) => {
                let last = last_error.lock().ok().and_then(|slot| slot.clone());
                let failure = self.classify(&error, last.as_deref());
                tracing::warn!(
                    call = label,
                    attempts = error.attempts(),
                    status = error.status(),
                    error = %failure,
                    "a provider call gave up"
                );
                Err(failure)
            }
        }
    }

    /// `POST url` with a JSON body.
    pub async fn post(
        &self,
        url: &str,
        body: &serde_json::Value,
        label: &'static str,
        deadline: Instant,
    ) -> Result<Bytes, BackendError> {
        self.call(Method::POST, url, Some(body), label, deadline)
            .await
    }

    /// `GET url`.
    pub async fn get(
        &self,
        url: &str,
        label: &'static str,
        deadline: Instant,
    ) -> Result<Bytes, BackendError> {
        self.call(Method::GET, url, None, label, deadline).await
    }

    /// The provider's message from an error body, cleaned for a task.
    pub fn message(&self, body: &[u8]) -> Option<String> {
        upstream_message(body, self.api_key.expose())
    }

    /// A provider's own words (a failed prediction's `error`), cleaned for a task.
    pub fn clean(&self, text: &str) -> String {
        clean_reason(text, self.api_key.expose())
    }

    /// What to tell the task's owner about a call that gave up.
    fn classify(&self, error: &tollgate_client::Error, last_body: Option<&[u8]>) -> BackendError {
        let attempts = error.attempts();
        let tries = if attempts == 1 {
            "1 attempt".to_owned()
        } else {
            format!("{attempts} attempts")
        };
        if error.stop_reason() == StopReason::Deadline {
            return BackendError::Timeout;
        }
        match error.status() {
            Some(status) if !error.is_retryable() => {
                let reason = match status {
                    401 | 403 => format!(
                        "{status}: it did not accept this server's credentials; the operator must check them"
                    ),
                    _ => match last_body.and_then(|b| self.message(b)) {
                        Some(message) => format!("{status}: {message}"),
                        None => format!("{status}, without a reason"),
                    },
                };
                if matches!(status, 429 | 500..=599) {
                    // Retryable by status, refused by an override (a spent quota): unavailable.
                    BackendError::Exhausted { reason }
                } else {
                    BackendError::Rejected { reason }
                }
            }
            Some(status) => BackendError::Exhausted {
                reason: match error.stop_reason() {
                    StopReason::RetryAfterTooLong(wait) => format!(
                        "{status}; it asked to wait {} s, longer than tollgate waits",
                        wait.as_secs()
                    ),
                    StopReason::BudgetExhausted => {
                        format!("{status}; too many recent failures to retry")
                    }
                    _ => format!("{status} after {tries}"),
                },
            },
            None if error.is_timeout() => BackendError::Exhausted {
                reason: format!("no answer after {tries}"),
            },
            None => BackendError::Exhausted {
                reason: format!("it could not be reached after {tries}"),
            },
        }
    }

    /// Downloads the images at `urls` (a queue provider's outputs), each a PNG.
    pub async fn download_pngs(
        &self,
        urls: &[String],
        deadline: Instant,
    ) -> Result<Vec<Vec<u8>>, BackendError> {
        let mut images = Vec::with_capacity(urls.len());
        for (index, url) in urls.iter().enumerate() {
            let bytes = self.get(url, "GET provider output", deadline).await?;
            images.push(png(bytes.to_vec(), index)?);
        }
        Ok(images)
    }
}

/// A provider's run to stop when the task ends without its result (a timeout, a cancel of the
/// task, a shutdown: each drops the backend's future, and so this guard): the calls that cancel
/// it, made in order without waiting for them. [`CancelOnDrop::disarm`] once the run is over.
pub struct CancelOnDrop {
    upstream: Arc<Upstream>,
    calls: Vec<(Method, String, Option<serde_json::Value>)>,
}

impl CancelOnDrop {
    pub fn new(
        upstream: &Arc<Upstream>,
        calls: Vec<(Method, String, Option<serde_json::Value>)>,
    ) -> Self {
        CancelOnDrop {
            upstream: Arc::clone(upstream),
            calls,
        }
    }

    /// The run is over: nothing to cancel.
    pub fn disarm(&mut self) {
        self.calls.clear();
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.calls.is_empty() {
            return;
        }
        let upstream = Arc::clone(&self.upstream);
        let calls = std::mem::take(&mut self.calls);
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            for (method, url, body) in calls {
                if let Err(e) = upstream
                    .call(method, &url, body.as_ref(), "cancel", deadline)
                    .await
                {
                    tracing::warn!(error = %e, "could not cancel a provider's run");
                }
            }
        });
    }
}

/// A provider's JSON answer as `T`, or a refusal that says it was not `what`.
pub fn json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, BackendError> {
    serde_json::from_slice(body).map_err(|_| BackendError::Rejected {
        reason: format!("its answer was not {what}"),
    })
}

/// Waits before poll `attempt` (from 0) of a queued run: 250 ms, doubling to 2 s at most, and
/// never past `deadline` (the caller sees the deadline on its next call).
pub async fn poll_pause(attempt: u32, deadline: Instant) {
    let pause = Duration::from_millis(250)
        .saturating_mul(2u32.saturating_pow(attempt.min(3)))
        .min(Duration::from_secs(2));
    tokio::time::sleep_until((Instant::now() + pause).min(deadline)).await;
}

/// `bytes` when they are a PNG, else why the task fails.
pub fn png(bytes: Vec<u8>, index: usize) -> Result<Vec<u8>, BackendError> {
    if bytes.starts_with(PNG_MAGIC) {
        Ok(bytes)
    } else {
        Err(BackendError::Rejected {
            reason: format!("image {index} is not a PNG; the model must be asked for PNG output"),
        })
    }
}

/// The `n` images a provider says it made must be `n`.
pub fn exactly(n: u8, got: usize) -> Result<(), BackendError> {
    if got == usize::from(n) {
        Ok(())
    } else {
        Err(BackendError::Rejected {
            reason: format!("it made {got} images instead of {n}"),
        })
    }
}

/// One attempt: the whole answer, up to [`MAX_RESPONSE_BYTES`].
async fn send(request: reqwest::RequestBuilder) -> Result<RawResponse, TransportFailure> {
    let mut response = request.send().await.map_err(transport_failure)?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_failure)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(TransportFailure {
                kind: TransportKind::Other,
                message: format!("the answer is larger than {} MiB", MAX_RESPONSE_BYTES >> 20),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(RawResponse {
        status,
        headers,
        body: body.into(),
    })
}

/// A transport failure for the retry loop's log: the cause chain, without the URL.
fn transport_failure(error: reqwest::Error) -> TransportFailure {
    let (kind, top) = if error.is_connect() {
        (TransportKind::Connect, "connection failed")
    } else if error.is_timeout() {
        (TransportKind::Timeout, "timed out")
    } else {
        (TransportKind::Other, "the connection broke")
    };
    let mut message = top.to_owned();
    let error = error.without_url();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    TransportFailure { kind, message }
}

/// The provider's own message from an error body: `{"error": {"message": …}}` (OpenAI),
/// `{"detail": "…"}` (Replicate, fal), `{"detail": [{"msg": …}]}` (a validation error), or a
/// bare `error`/`message` string; cleaned for a task.
fn upstream_message(body: &[u8], api_key: &str) -> Option<String> {
    use serde_json::Value;
    let value: Value = serde_json::from_slice(body).ok()?;
    let text = value
        .pointer("/error/message")
        .and_then(Value::as_str)
        .or_else(|| value.get("error").and_then(Value::as_str))
        .or_else(|| value.get("detail").and_then(Value::as_str))
        .or_else(|| value.pointer("/detail/0/msg").and_then(Value::as_str))
        .or_else(|| value.get("message").and_then(Value::as_str))?;
    let cleaned = clean_reason(text, api_key);
    (!cleaned.is_empty()).then_some(cleaned)
}

/// One line of at most [`MAX_REASON_CHARS`] characters, without the key or anything key-like.
fn clean_reason(text: &str, api_key: &str) -> String {
    let text = if api_key.is_empty() {
        text.to_owned()
    } else {
        text.replace(api_key, "[redacted]")
    };
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .map(|w| {
            // Providers echo masked keys ("sk-proj-****abcd", "r8_****"); a task shows none of it.
            let lower = w.to_ascii_lowercase();
            if w.contains("sk-") || lower.starts_with("bearer") || lower.starts_with("r8_") {
                "[redacted]"
            } else {
                w
            }
        })
        .collect();
    let line = words.join(" ");
    let line = line.trim_end_matches('.');
    if line.chars().count() > MAX_REASON_CHARS {
        format!(
            "{}…",
            line.chars().take(MAX_REASON_CHARS).collect::<String>()
        )
    } else {
        line.to_owned()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn provider_messages_are_cleaned() {
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-proj-****abcd. You can find your key at https://x.","type":"invalid_request_error","code":"invalid_api_key"}}"#;
        let message = upstream_message(body, "sk-secret").unwrap();
        assert!(!message.contains("sk-"), "{message}");
        let echoed = r#"{"error":{"message":"bad key sk-secret\n\u0007 here."}}"#;
        let message = upstream_message(echoed.as_bytes(), "sk-secret").unwrap();
        assert_eq!(message, "bad key [redacted] here");
        let long = format!(r#"{{"error":"{}"}}"#, "x".repeat(500));
        let message = upstream_message(long.as_bytes(), "k").unwrap();
        assert_eq!(message.chars().count(), MAX_REASON_CHARS + 1);
        assert!(upstream_message(b"<html>oops</html>", "k").is_none());
        assert_eq!(
            upstream_message(
                br#"{"detail":"Invalid version or not permitted","status":422}"#,
                "k"
            )
            .unwrap(),
            "Invalid version or not permitted"
        );
        assert_eq!(
            upstream_message(
                br#"{"detail":[{"loc":["body","prompt"],"msg":"field required","type":"value_error.missing"}]}"#,
                "k"
            )
            .unwrap(),
            "field required"
        );
    }

    #[test]
    fn the_key_is_not_in_debug_output_and_bad_urls_are_refused() {
        let upstream = Upstream::new(
            "http://127.0.0.1:9/",
            Secret::new("sk-very-secret"),
            "Bearer",
            RetryPolicy::default(),
        )
        .unwrap();
        assert_eq!(upstream.url("/v1/x"), "http://127.0.0.1:9/v1/x");
        assert_eq!(upstream.host(), "127.0.0.1:9");
        assert!(!format!("{upstream:?}").contains("very-secret"));
        assert!(!format!("{:?}", upstream.authorization).contains("very-secret"));
        for (url, key) in [("ftp://x", "k"), ("http://x", "bad\nkey")] {
            assert!(
                Upstream::new(url, Secret::new(key), "Bearer", RetryPolicy::default()).is_err()
            );
        }
    }

    #[test]
    fn outputs_must_be_n_pngs() {
        let mut png_bytes = PNG_MAGIC.to_vec();
        png_bytes.extend_from_slice(b"rest");
        assert!(png(png_bytes, 0).is_ok());
        assert!(matches!(
            png(b"RIFF....WEBP".to_vec(), 1),
            Err(BackendError::Rejected { reason }) if reason.contains("image 1 is not a PNG")
        ));
        assert!(exactly(2, 2).is_ok());
        assert!(matches!(
            exactly(2, 1),
            Err(BackendError::Rejected { reason }) if reason.contains("1 images instead of 2")
        ));
    }
}
