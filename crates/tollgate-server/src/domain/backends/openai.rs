//! An OpenAI-compatible images upstream: `POST {url}/v1/images/generations` with
//! `{"prompt", "n", "size", "response_format": "b64_json"}` (and `"model"` when configured), its
//! key as `Authorization: Bearer`, through the shared [`Upstream`] (the SDK's retry loop, the
//! rules for keys and messages). The answer must be exactly `n` base64 PNGs.

use super::upstream::{self, Upstream};
use super::{Backend, BackendError};
use crate::config::Secret;
use crate::error::Result;
use crate::store::TaskRecord;
use async_trait::async_trait;
use base64::Engine;
use serde::Deserialize;
use tokio::time::Instant;
use tollgate_client::RetryPolicy;

/// The upstream client: one per model, shared by every task (so its retry budget and its
/// pause after a 429 are too).
pub struct OpenAiImages {
    upstream: Upstream,
    endpoint: String,
    model: Option<String>,
}

impl OpenAiImages {
    /// A client of the upstream at `base_url` (`https://api.openai.com`, with or without a
    /// trailing `/v1`).
    pub fn new(base_url: &str, api_key: Secret, model: Option<String>) -> Result<Self> {
        let trimmed = base_url.trim().trim_end_matches('/');
        let base = trimmed.strip_suffix("/v1").unwrap_or(trimmed);
        let mut policy = RetryPolicy::default();
        // OpenAI answers 429 both for "slow down" and for "your quota is spent"; the second
        // does not pass by waiting.
        policy
            .code_overrides
            .insert("insufficient_quota".to_owned(), false);
        let upstream = Upstream::new(base, api_key, "Bearer", policy)?;
        Ok(OpenAiImages {
            endpoint: upstream.url("/v1/images/generations"),
            upstream,
            model,
        })
    }

    /// Where the requests go.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn request_body(&self, task: &TaskRecord) -> serde_json::Value {
        let mut body = serde_json::json!({
            "prompt": task.prompt,
            "n": task.n,
            "size": task.size.as_str(),
            "response_format": "b64_json",
        });
        if let Some(model) = &self.model {
            body["model"] = serde_json::Value::String(model.clone());
        }
        body
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
        let body = self
            .upstream
            .post(
                &self.endpoint,
                &self.request_body(task),
                "POST upstream /v1/images/generations",
                deadline,
            )
            .await?;
        decode_images(&body, task.n)
    }
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
    upstream::exactly(n, parsed.data.len())?;
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
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|_| rejected(format!("image {index} is not valid base64")))?;
            upstream::png(bytes, index)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn png() -> Vec<u8> {
        let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
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
    fn urls_are_normalised() {
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
        assert!(OpenAiImages::new("ftp://x", Secret::new("k"), None).is_err());
    }
}
