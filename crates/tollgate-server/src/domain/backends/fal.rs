//! fal's queue API (`https://queue.fal.run`), key as `Authorization: Key …`:
//!
//! 1. submit: `POST /{model_id}` with the input; the answer names the request's `status_url`,
//!    `response_url` and `cancel_url` (used as given: for a model id with a sub-path they drop it);
//! 2. poll `status_url`, 250 ms doubling to 2 s, while it is `IN_QUEUE` or `IN_PROGRESS`;
//! 3. once `COMPLETED`, read `response_url` (`{"images": [{"url", …}]}`; an error of the run
//!    comes back there as a 4xx/5xx with its `detail`) and download each image, a PNG;
//! 4. when the task ends without it (the model's timeout, a failed poll, a shutdown), cancel the
//!    request (`PUT cancel_url`).
//!
//! The input sent is `prompt`, `num_images` (n), `seed`, `image_size` `{width, height}` and
//! `output_format` `png`, then the model's `input` table from the catalogue on top.

use super::upstream::{self, CancelOnDrop, Upstream};
use super::{Backend, BackendError};
use crate::config::Secret;
use crate::error::Result;
use crate::store::TaskRecord;
use async_trait::async_trait;
use http::Method;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use tokio::time::Instant;
use tollgate_client::RetryPolicy;

pub struct Fal {
    upstream: Arc<Upstream>,
    /// `POST` here submits.
    submit: String,
    /// The model's own inputs, from the catalogue.
    input: Map<String, Value>,
}

#[derive(Deserialize)]
struct Submitted {
    request_id: String,
    status_url: Option<String>,
    response_url: Option<String>,
    cancel_url: Option<String>,
}

#[derive(Deserialize)]
struct Status {
    status: String,
}

#[derive(Deserialize)]
struct Output {
    #[serde(default)]
    images: Vec<OutputImage>,
}

#[derive(Deserialize)]
struct OutputImage {
    url: String,
}

impl Fal {
    /// A client of fal's queue at `base_url` for the model `model_id` (`fal-ai/flux/schnell`).
    pub fn new(
        base_url: &str,
        api_key: Secret,
        model_id: &str,
        input: Map<String, Value>,
    ) -> Result<Self> {
        let upstream = Upstream::new(base_url, api_key, "Key", RetryPolicy::default())?;
        Ok(Fal {
            submit: upstream.url(&format!("/{}", model_id.trim_matches('/'))),
            upstream: Arc::new(upstream),
            input,
        })
    }

    fn request_body(&self, task: &TaskRecord) -> Value {
        let side = task.size.pixels();
        let mut input = json!({
            "prompt": task.prompt,
            "num_images": task.n,
            "seed": task.seed,
            "image_size": {"width": side, "height": side},
            "output_format": "png",
        });
        if let Some(fields) = input.as_object_mut() {
            fields.extend(self.input.clone());
        }
        input
    }

    /// The request's URLs as the submit answer gave them, or as fal builds them.
    fn urls(&self, submitted: &Submitted) -> (String, String, String) {
        let request = format!("{}/requests/{}", self.submit, submitted.request_id);
        (
            submitted
                .status_url
                .clone()
                .unwrap_or_else(|| format!("{request}/status")),
            submitted
                .response_url
                .clone()
                .unwrap_or_else(|| request.clone()),
            submitted
                .cancel_url
                .clone()
                .unwrap_or_else(|| format!("{request}/cancel")),
        )
    }
}

#[async_trait]
impl Backend for Fal {
    fn name(&self) -> &'static str {
        "fal"
    }

    async fn generate(
        &self,
        task: &TaskRecord,
        deadline: Instant,
    ) -> Result<Vec<Vec<u8>>, BackendError> {
        let body = self
            .upstream
            .post(
                &self.submit,
                &self.request_body(task),
                "POST fal queue submit",
                deadline,
            )
            .await?;
        let submitted: Submitted = upstream::json(&body, "a queued request")?;
        let (status_url, response_url, cancel_url) = self.urls(&submitted);
        let mut cancel = CancelOnDrop::new(&self.upstream, vec![(Method::PUT, cancel_url, None)]);
        let mut polls = 0;
        loop {
            let body = self
                .upstream
                .get(&status_url, "GET fal queue status", deadline)
                .await?;
            let status: Status = upstream::json(&body, "a request status")?;
            match status.status.as_str() {
                "IN_QUEUE" | "IN_PROGRESS" => {}
                "COMPLETED" => break,
                other => {
                    cancel.disarm();
                    return Err(BackendError::Rejected {
                        reason: format!("the request ended as `{}`", self.upstream.clean(other)),
                    });
                }
            }
            if Instant::now() >= deadline {
                return Err(BackendError::Timeout);
            }
            upstream::poll_pause(polls, deadline).await;
            polls += 1;
        }
        cancel.disarm();
        // A run that failed answers here with its error (a 4xx/5xx and a `detail`).
        let body = self
            .upstream
            .get(&response_url, "GET fal queue result", deadline)
            .await?;
        let output: Output = upstream::json(&body, "the result of an image model (no `images`)")?;
        upstream::exactly(task.n, output.images.len())?;
        let urls: Vec<String> = output.images.into_iter().map(|i| i.url).collect();
        self.upstream.download_pngs(&urls, deadline).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tollgate_contract::ImageSize;

    #[test]
    fn submits_to_the_model_and_finds_the_request_urls() {
        let fal = Fal::new(
            "http://127.0.0.1:9/",
            Secret::new("key-id:key-secret"),
            "fal-ai/flux/schnell",
            Map::from_iter([("enable_safety_checker".to_owned(), json!(false))]),
        )
        .unwrap();
        assert_eq!(fal.submit, "http://127.0.0.1:9/fal-ai/flux/schnell");
        let task = TaskRecord {
            prompt: "a fox".into(),
            n: 3,
            size: ImageSize::S256,
            ..TaskRecord::default()
        };
        let body = fal.request_body(&task);
        assert_eq!(body["num_images"], 3);
        assert_eq!(body["image_size"], json!({"width": 256, "height": 256}));
        assert_eq!(body["enable_safety_checker"], false);
        let given = Submitted {
            request_id: "r1".into(),
            status_url: Some("http://q/fal-ai/flux/requests/r1/status".into()),
            response_url: None,
            cancel_url: None,
        };
        let (status, response, cancel) = fal.urls(&given);
        assert_eq!(status, "http://q/fal-ai/flux/requests/r1/status");
        assert_eq!(
            response,
            "http://127.0.0.1:9/fal-ai/flux/schnell/requests/r1"
        );
        assert!(cancel.ends_with("/requests/r1/cancel"));
    }
}
