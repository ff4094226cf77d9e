//! Replicate's predictions API (`https://api.replicate.com`), key as `Authorization: Bearer`:
//!
//! 1. create: `POST /v1/models/{owner}/{name}/predictions` with `{"input"}` for a model named
//!    `owner/name`, or `POST /v1/predictions` with `{"version", "input"}` for `owner/name:version`;
//! 2. poll the prediction's `urls.get` (`GET /v1/predictions/{id}`), 250 ms doubling to 2 s, until
//!    it is `succeeded`, `failed` or `canceled`;
//! 3. download its `output` (one URL or a list; a `data:` URL is decoded), each a PNG;
//! 4. when the task ends without it (the model's timeout, a failed poll, a shutdown), cancel the
//!    prediction (`POST urls.cancel`), so that it stops running and billing for nothing.
//!
//! The input sent is `prompt`, `num_outputs` (n), `seed`, `width`/`height` (the size),
//! `aspect_ratio` `1:1` and `output_format` `png`, then the model's `input` table from the
//! catalogue on top (a model's own names win). Replicate's webhooks are not used: they need a
//! public URL for this server, and polling loses nothing.

use super::upstream::{self, CancelOnDrop, Upstream};
use super::{Backend, BackendError};
use crate::config::Secret;
use crate::error::{Error, Result};
use crate::store::TaskRecord;
use async_trait::async_trait;
use base64::Engine;
use http::Method;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use tokio::time::Instant;
use tollgate_client::RetryPolicy;

pub struct Replicate {
    upstream: Arc<Upstream>,
    /// Where predictions are created.
    create: String,
    /// `Some` for a pinned version (`owner/name:version`).
    version: Option<String>,
    /// The model's own inputs, from the catalogue.
    input: Map<String, Value>,
}

#[derive(Deserialize)]
struct Prediction {
    id: String,
    status: String,
    #[serde(default)]
    output: Value,
    #[serde(default)]
    error: Value,
    #[serde(default)]
    urls: Urls,
}

#[derive(Default, Deserialize)]
struct Urls {
    get: Option<String>,
    cancel: Option<String>,
}

impl Replicate {
    /// A client of Replicate at `base_url` for `model` (`owner/name` or `owner/name:version`).
    pub fn new(
        base_url: &str,
        api_key: Secret,
        model: &str,
        input: Map<String, Value>,
    ) -> Result<Self> {
        let upstream = Upstream::new(base_url, api_key, "Bearer", RetryPolicy::default())?;
        let (create, version) = match model.split_once(':') {
            Some((_, version)) => (upstream.url("/v1/predictions"), Some(version.to_owned())),
            None => {
                let (owner, name) = model.split_once('/').ok_or_else(|| {
                    Error::internal("a Replicate model is named owner/name or owner/name:version")
                })?;
                (
                    upstream.url(&format!("/v1/models/{owner}/{name}/predictions")),
                    None,
                )
            }
        };
        Ok(Replicate {
            upstream: Arc::new(upstream),
            create,
            version,
            input,
        })
    }

    fn request_body(&self, task: &TaskRecord) -> Value {
        let side = task.size.pixels();
        let mut input = json!({
            "prompt": task.prompt,
            "num_outputs": task.n,
            "seed": task.seed,
            "width": side,
            "height": side,
            "aspect_ratio": "1:1",
            "output_format": "png",
        });
        if let Some(fields) = input.as_object_mut() {
            fields.extend(self.input.clone());
        }
        match &self.version {
            Some(version) => json!({"version": version, "input": input}),
            None => json!({"input": input}),
        }
    }
}

#[async_trait]
impl Backend for Replicate {
    fn name(&self) -> &'static str {
        "replicate"
    }

    async fn generate(
        &self,
        task: &TaskRecord,
        deadline: Instant,
    ) -> Result<Vec<Vec<u8>>, BackendError> {
        let created = self
            .upstream
            .post(
                &self.create,
                &self.request_body(task),
                "POST replicate predictions",
                deadline,
            )
            .await?;
        let mut prediction: Prediction = upstream::json(&created, "a prediction")?;
        let id = prediction.id.clone();
        let get = (prediction.urls.get.take())
            .unwrap_or_else(|| self.upstream.url(&format!("/v1/predictions/{id}")));
        let cancel_url = (prediction.urls.cancel.take())
            .unwrap_or_else(|| self.upstream.url(&format!("/v1/predictions/{id}/cancel")));
        let mut cancel = CancelOnDrop::new(&self.upstream, vec![(Method::POST, cancel_url, None)]);
        let mut polls = 0;
        while matches!(prediction.status.as_str(), "starting" | "processing") {
            if Instant::now() >= deadline {
                return Err(BackendError::Timeout);
            }
            upstream::poll_pause(polls, deadline).await;
            polls += 1;
            let body = self
                .upstream
                .get(&get, "GET replicate prediction", deadline)
                .await?;
            prediction = upstream::json(&body, "a prediction")?;
        }
        cancel.disarm();
        match prediction.status.as_str() {
            "succeeded" => {
                let urls = output_urls(&prediction.output)?;
                upstream::exactly(task.n, urls.len())?;
                let mut images = Vec::with_capacity(urls.len());
                for (index, url) in urls.iter().enumerate() {
                    images.push(match data_url(url) {
                        Some(bytes) => upstream::png(bytes?, index)?,
                        None => self
                            .upstream
                            .download_pngs(std::slice::from_ref(url), deadline)
                            .await?
                            .remove(0),
                    });
                }
                Ok(images)
            }
            "failed" => Err(BackendError::Rejected {
                reason: match prediction.error.as_str() {
                    Some(error) if !error.trim().is_empty() => {
                        format!("the prediction failed: {}", self.upstream.clean(error))
                    }
                    _ => "the prediction failed without a reason".to_owned(),
                },
            }),
            "canceled" => Err(BackendError::Exhausted {
                reason: "the prediction was cancelled at the provider".to_owned(),
            }),
            other => Err(BackendError::Rejected {
                reason: format!(
                    "the prediction is in an unknown state `{}`",
                    self.upstream.clean(other)
                ),
            }),
        }
    }
}

/// The output's URLs: one URL, or a list of them.
fn output_urls(output: &Value) -> Result<Vec<String>, BackendError> {
    let urls = match output {
        Value::String(url) => vec![url.clone()],
        Value::Array(items) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    if urls.is_empty() {
        return Err(BackendError::Rejected {
            reason: "the prediction succeeded without image URLs in its output".to_owned(),
        });
    }
    Ok(urls)
}

/// The bytes of a `data:…;base64,…` URL (what a synchronous prediction returns), if it is one.
fn data_url(url: &str) -> Option<Result<Vec<u8>, BackendError>> {
    let rest = url.strip_prefix("data:")?;
    let (_, encoded) = rest.split_once(";base64,")?;
    Some(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| BackendError::Rejected {
                reason: "an output data URL is not valid base64".to_owned(),
            }),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tollgate_contract::ImageSize;

    #[test]
    fn requests_name_the_model_or_its_version_and_carry_the_task() {
        let official = Replicate::new(
            "http://127.0.0.1:9",
            Secret::new("r8_x"),
            "black-forest-labs/flux-schnell",
            Map::from_iter([("go_fast".to_owned(), json!(true))]),
        )
        .unwrap();
        assert_eq!(
            official.create,
            "http://127.0.0.1:9/v1/models/black-forest-labs/flux-schnell/predictions"
        );
        let task = TaskRecord {
            prompt: "a fox".into(),
            n: 2,
            size: ImageSize::S1024,
            seed: 7,
            ..TaskRecord::default()
        };
        let body = official.request_body(&task);
        assert_eq!(body["input"]["num_outputs"], 2);
        assert_eq!(body["input"]["width"], 1024);
        assert_eq!(body["input"]["go_fast"], true);
        assert!(body.get("version").is_none());
        let pinned = Replicate::new(
            "http://127.0.0.1:9",
            Secret::new("r8_x"),
            "a/b:abc123",
            Map::new(),
        )
        .unwrap();
        assert_eq!(pinned.create, "http://127.0.0.1:9/v1/predictions");
        assert_eq!(pinned.request_body(&task)["version"], "abc123");
        assert!(
            Replicate::new("http://127.0.0.1:9", Secret::new("k"), "flux", Map::new()).is_err()
        );
    }

    #[test]
    fn outputs_are_urls_or_data_urls() {
        assert_eq!(output_urls(&json!("https://x/0.png")).unwrap().len(), 1);
        assert_eq!(output_urls(&json!(["a", "b"])).unwrap().len(), 2);
        assert!(output_urls(&json!(null)).is_err());
        assert!(output_urls(&json!([1])).is_err());
        assert_eq!(
            data_url("data:image/png;base64,iVBORw==").unwrap().unwrap(),
            vec![0x89, b'P', b'N', b'G']
        );
        assert!(data_url("https://x").is_none());
    }
}
