//! An OpenAI-compatible images upstream: `POST {url}/v1/images/generations` with
//! `{"prompt", "n", "size", "response_format": "b64_json"}` (and `"model"` when configured), its
//! key from `TOLLGATE_UPSTREAM_API_KEY` as `Authorization: Bearer`.
//!
//! The call goes through the SDK's own retry loop ([`Retrier`] with the contract's
//! [`RetryPolicy`]): 429 (honouring `Retry-After`), 5xx and transport failures are retried with
//! the seed's backoff, up to 5 times, within the task's deadline, under a retry budget and a host
//! pause shared by every task of this instance. Any other 4xx fails the task at once with the
//! upstream's own message, cleaned and cut to 200 characters. The answer must be exactly `n`
//! base64 PNGs.
//!
//! **Secrets:** the key lives in a sensitive header value (its `Debug` prints nothing), and no
//! reason built here contains it: an upstream message is scrubbed of it (and of anything that
//! looks like a key) before it reaches a task, and 401/403 messages are not echoed at all.

use super::{Backend, BackendError};
use crate::config::Secret;
use crate::error::{Error, Result};
use crate::store::TaskRecord;
use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::HeaderValue;
use serde::Deserialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tollgate_client::{
    CallInfo, RawResponse, Retrier, RetryPolicy, StopReason, TransportFailure, TransportKind,
};

/// The largest answer read from the upstream (4 images of 1024×1024 in base64 fit many times).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// How much of an upstream's error message a task shows.
const MAX_REASON_CHARS: usize = 200;
const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

/// The upstream client: one per instance, shared by every task (so its retry budget and its
/// pause after a 429 are too).
pub struct OpenAiImages {
    endpoint: String,
    /// `host:port`, the key of the retry loop's host pause.
    host: String,
    /// `Bearer <key>`, marked sensitive.
    authorization: HeaderValue,
    /// The key itself, to scrub it from anything the upstream echoes.
    api_key: Secret,
    model: Option<String>,
    http: reqwest::Client,
    retrier: Retrier,
}

impl OpenAiImages {
    /// A client of the upstream at `base_url` (`https://api.openai.com`, with or without a
    /// trailing `/v1`).
    pub fn new(base_url: &str, api_key: Secret, model: Option<String>) -> Result<Self> {
        let trimmed = base_url.trim().trim_end_matches('/');
        let base = trimmed.strip_suffix("/v1").unwrap_or(trimmed);
        let url = reqwest::Url::parse(base)
            .map_err(|e| Error::internal(format!("--upstream-url {base:?} is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(Error::internal(
                "--upstream-url must be an http:// or https:// URL with a host",
            ));
        }
        let host = format!(
            "{}:{}",
            url.host_str().unwrap_or_default(),
            url.port_or_known_default().unwrap_or(0)
        );
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", api_key.expose()))
            .map_err(|_| {
                Error::internal("TOLLGATE_UPSTREAM_API_KEY is not a valid header value")
            })?;
        authorization.set_sensitive(true);
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::internal(format!("upstream HTTP client: {e}")))?;
        let mut policy = RetryPolicy::default();
        // OpenAI answers 429 both for "slow down" and for "your quota is spent"; the second
        // does not pass by waiting.
        policy
            .code_overrides
            .insert("insufficient_quota".to_owned(), false);
        // No per-attempt limit: one image can take a minute. The task's deadline bounds the
        // whole call, retries included.
        let retrier = Retrier::new(policy).with_attempt_timeout(None);
        Ok(OpenAiImages {
            endpoint: format!("{base}/v1/images/generations"),
            host,
            authorization,
            api_key,
            model,
            http,
            retrier,
        })
    }

    /// Where the requests go.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn request_body(&self, task: &TaskRecord) -> Result<Bytes, BackendError> {
        let mut body = serde_json::json!({
            "prompt": task.prompt,
            "n": task.n,
            "size": task.size.as_str(),
            "response_format": "b64_json",
        });
        if let Some(model) = &self.model {
            body["model"] = serde_json::Value::String(model.clone());
        }
        serde_json::to_vec(&body)
            .map(Bytes::from)
            .map_err(|e| BackendError::Internal(format!("request body: {e}")))
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
                    _ => match last_body.and_then(|b| upstream_message(b, self.api_key.expose())) {
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
}

#[async_trait]
impl Backend for OpenAiImages {
    fn name(&self) -> &'static str {
        "openai"
    }

    async fn generate(
        &self,
        task: &TaskRecord,
        deadline: Instant,
    ) -> Result<Vec<Vec<u8>>, BackendError> {
        let body = self.request_body(task)?;
        // The loop reads error bodies as tollgate envelopes; keep the last one to quote the
        // upstream's own message.
        let last_error: Arc<Mutex<Option<Bytes>>> = Arc::default();
        let call = CallInfo {
            host: &self.host,
            label: "POST upstream /v1/images/generations",
            deadline: Some(deadline),
        };
        let result = self
            .retrier
            .run(call, |_attempt| {
                let request = self
                    .http
                    .post(&self.endpoint)
                    .header(AUTHORIZATION, self.authorization.clone())
                    .header(CONTENT_TYPE, "application/json")
                    .body(body.clone());
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
            Ok(response) => decode_images(&response.body, task.n),
            Err(error) => {
                let last = last_error.lock().ok().and_then(|slot| slot.clone());
                let failure = self.classify(&error, last.as_deref());
                tracing::warn!(
                    task_id = %task.id,
                    attempts = error.attempts(),
                    status = error.status(),
                    error = %failure,
                    "the upstream call gave up"
                );
                Err(failure)
            }
        }
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

#[derive(Deserialize)]
struct ImagesResponse {
    data: Vec<ImageDatum>,
}

#[derive(Deserialize)]
struct ImageDatum {
    b64_json: Option<String>,
}

/// The `n` PNGs of a 2xx answer, or why it is not that.
fn decode_images(body: &[u8], n: u8) -> Result<Vec<Vec<u8>>, BackendError> {
    let rejected = |reason: String| BackendError::Rejected { reason };
    let parsed: ImagesResponse = serde_json::from_slice(body).map_err(|_| {
        rejected("its answer was not the JSON of the images API (no `data` list)".to_owned())
    })?;
    if parsed.data.len() != usize::from(n) {
        return Err(rejected(format!(
            "it sent {} images instead of {n}",
            parsed.data.len()
        )));
    }
    parsed
        .data
        .into_iter()
        .enumerate()
        .map(|(index, datum)| {
            let encoded = datum.b64_json.ok_or_else(|| {
                rejected(format!(
                    "image {index} came without `b64_json`; the upstream must support response_format b64_json"
                ))
            })?;
            let png = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|_| rejected(format!("image {index} is not valid base64")))?;
            if !png.starts_with(PNG_MAGIC) {
                return Err(rejected(format!("image {index} is not a PNG")));
            }
            Ok(png)
        })
        .collect()
}

/// The upstream's own message from an error body (`{"error": {"message": …}}`, the OpenAI
/// shape, or a bare `error`/`message` string), cleaned for a task.
fn upstream_message(body: &[u8], api_key: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = value
        .pointer("/error/message")
        .and_then(serde_json::Value::as_str)
        .or_else(|| value.get("error").and_then(serde_json::Value::as_str))
        .or_else(|| value.get("message").and_then(serde_json::Value::as_str))?;
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
            // OpenAI echoes masked keys ("sk-proj-****abcd"); a task shows none of it.
            if w.contains("sk-") || w.to_ascii_lowercase().starts_with("bearer") {
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

    fn png() -> Vec<u8> {
        let mut bytes = PNG_MAGIC.to_vec();
        bytes.extend_from_slice(b"rest");
        bytes
    }

    fn answer(images: &[Vec<u8>]) -> Vec<u8> {
        let data: Vec<_> = images
            .iter()
            .map(|i| serde_json::json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(i)}))
            .collect();
        serde_json::to_vec(&serde_json::json!({"created": 1, "data": data})).unwrap()
    }

    #[test]
    fn decodes_exactly_n_pngs() {
        assert_eq!(
            decode_images(&answer(&[png(), png()]), 2).unwrap(),
            vec![png(), png()]
        );
        let wrong_count = decode_images(&answer(&[png()]), 2).unwrap_err();
        assert!(
            matches!(wrong_count, BackendError::Rejected { reason } if reason.contains("1 images instead of 2"))
        );
        let not_png = decode_images(&answer(&[b"GIF89a".to_vec()]), 1).unwrap_err();
        assert!(
            matches!(not_png, BackendError::Rejected { reason } if reason.contains("not a PNG"))
        );
        let url_only = br#"{"data":[{"url":"https://x/y.png"}]}"#;
        assert!(matches!(
            decode_images(url_only, 1),
            Err(BackendError::Rejected { .. })
        ));
        assert!(matches!(
            decode_images(b"<html>", 1),
            Err(BackendError::Rejected { .. })
        ));
    }

    #[test]
    fn upstream_messages_are_cleaned() {
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
    }

    #[test]
    fn the_key_is_not_in_debug_output_and_urls_are_normalised() {
        let backend = OpenAiImages::new(
            "http://127.0.0.1:9/v1/",
            Secret::new("sk-very-secret"),
            None,
        )
        .unwrap();
        assert_eq!(
            backend.endpoint(),
            "http://127.0.0.1:9/v1/images/generations"
        );
        assert_eq!(backend.host, "127.0.0.1:9");
        assert!(!format!("{:?}", backend.authorization).contains("very-secret"));
        assert!(OpenAiImages::new("ftp://x", Secret::new("k"), None).is_err());
        assert!(OpenAiImages::new("http://x", Secret::new("bad\nkey"), None).is_err());
    }
}
