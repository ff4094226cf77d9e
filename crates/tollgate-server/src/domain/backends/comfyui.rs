//! A ComfyUI server (self-hosted models), through its HTTP API:
//!
//! 1. `POST /prompt` with `{"prompt": <the workflow>, "client_id"}`: the workflow is the model's
//!    file in ComfyUI's API format, with placeholders filled in for the task (below); the answer
//!    names the `prompt_id` (a 400 carries the workflow's `error` and `node_errors`);
//! 2. poll `GET /history/{prompt_id}` (250 ms doubling to 2 s): `{}` until the run is over, then
//!    its `status` (`status_str` `success`, or `error` with the `execution_error` message) and
//!    `outputs`, node by node, with their `images`;
//! 3. download each output image with `GET /view?filename=…&subfolder=…&type=output`, a PNG;
//! 4. when the task ends without it (the model's timeout, a failed poll, a shutdown), take the
//!    prompt out of the queue (`POST /queue {"delete": [id]}`) and stop it if it runs
//!    (`POST /interrupt {"prompt_id"}`).
//!
//! Placeholders, in any string of the workflow: `{{prompt}}`, `{{seed}}`, `{{width}}`,
//! `{{height}}`, `{{n}}`. A string that is exactly one numeric placeholder becomes the number
//! (`"seed": "{{seed}}"` → `"seed": 42`), so the workflow stays valid JSON for ComfyUI's inputs.
//! A key is optional: ComfyUI has none of its own, but a proxy in front of it may want one.

use super::upstream::{self, CancelOnDrop, Upstream};
use super::{Backend, BackendError};
use crate::config::Secret;
use crate::error::Result;
use crate::store::TaskRecord;
use async_trait::async_trait;
use http::Method;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::time::Instant;
use tollgate_client::RetryPolicy;

pub struct ComfyUi {
    upstream: Arc<Upstream>,
    /// The workflow, in ComfyUI's API format, with its placeholders.
    workflow: Value,
}

impl ComfyUi {
    pub fn new(base_url: &str, api_key: Option<Secret>, workflow: Value) -> Result<Self> {
        let upstream = Upstream::new(
            base_url,
            api_key.unwrap_or_else(|| Secret::new(String::new())),
            "Bearer",
            RetryPolicy::default(),
        )?;
        Ok(ComfyUi {
            upstream: Arc::new(upstream),
            workflow,
        })
    }

    /// The workflow for `task`: every placeholder filled in.
    fn workflow_for(&self, task: &TaskRecord) -> Value {
        let side = i64::from(task.size.pixels());
        let numbers = [
            ("{{seed}}", task.seed),
            ("{{width}}", side),
            ("{{height}}", side),
            ("{{n}}", i64::from(task.n)),
        ];
        fill(&self.workflow, &task.prompt, &numbers)
    }
}

/// Whether the workflow has a `{{prompt}}` to put the task's prompt in.
pub fn has_prompt_placeholder(workflow: &Value) -> bool {
    match workflow {
        Value::String(s) => s.contains("{{prompt}}"),
        Value::Array(items) => items.iter().any(has_prompt_placeholder),
        Value::Object(fields) => fields.values().any(has_prompt_placeholder),
        _ => false,
    }
}

fn fill(value: &Value, prompt: &str, numbers: &[(&str, i64); 4]) -> Value {
    match value {
        Value::String(s) => {
            if let Some((_, n)) = numbers.iter().find(|(p, _)| s == p) {
                return json!(n);
            }
            let mut text = s.replace("{{prompt}}", prompt);
            for (placeholder, n) in numbers {
                text = text.replace(placeholder, &n.to_string());
            }
            Value::String(text)
        }
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| fill(v, prompt, numbers)).collect())
        }
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), fill(v, prompt, numbers)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn rejected(reason: impl Into<String>) -> BackendError {
    BackendError::Rejected {
        reason: reason.into(),
    }
}

#[async_trait]
impl Backend for ComfyUi {
    fn name(&self) -> &'static str {
        "comfyui"
    }

    async fn generate(
        &self,
        task: &TaskRecord,
        deadline: Instant,
    ) -> Result<Vec<Vec<u8>>, BackendError> {
        let body = json!({
            "prompt": self.workflow_for(task),
            "client_id": format!("tollgate-{}", task.id),
        });
        let queued = self
            .upstream
            .post(
                &self.upstream.url("/prompt"),
                &body,
                "POST comfyui /prompt",
                deadline,
            )
            .await?;
        let queued: Value = upstream::json(&queued, "JSON, to /prompt")?;
        let prompt_id = queued["prompt_id"]
            .as_str()
            .ok_or_else(|| rejected("its answer to /prompt had no prompt_id"))?
            .to_owned();
        // Out of the queue if it waits there, stopped if it runs.
        let mut cancel = CancelOnDrop::new(
            &self.upstream,
            vec![
                (
                    Method::POST,
                    self.upstream.url("/queue"),
                    Some(json!({"delete": [prompt_id]})),
                ),
                (
                    Method::POST,
                    self.upstream.url("/interrupt"),
                    Some(json!({"prompt_id": prompt_id})),
                ),
            ],
        );
        let history_url = self.upstream.url(&format!("/history/{prompt_id}"));
        let mut polls = 0;
        let entry = loop {
            let body = self
                .upstream
                .call(
                    Method::GET,
                    &history_url,
                    None,
                    "GET comfyui /history",
                    deadline,
                )
                .await?;
            let history: Value = serde_json::from_slice(&body)
                .map_err(|_| rejected("its /history answer was not JSON"))?;
            // A prompt enters the history when its run is over, with `completed: false` on an
            // error: being there is what ends the wait.
            if let Some(entry) = history.get(&prompt_id) {
                break entry.clone();
            }
            if Instant::now() >= deadline {
                return Err(BackendError::Timeout);
            }
            upstream::poll_pause(polls, deadline).await;
            polls += 1;
        };
        cancel.disarm();
        if entry["status"]["status_str"].as_str() == Some("error") {
            let why = entry["status"]["messages"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m[0] == "execution_error")
                .and_then(|m| m[1]["exception_message"].as_str())
                .map(|m| self.upstream.clean(m));
            return Err(rejected(match why {
                Some(why) => format!("the workflow failed: {why}"),
                None => "the workflow failed without a reason".to_owned(),
            }));
        }
        let mut files = Vec::new();
        if let Some(outputs) = entry["outputs"].as_object() {
            for output in outputs.values() {
                for image in output["images"].as_array().into_iter().flatten() {
                    if image["type"].as_str().unwrap_or("output") == "output" {
                        let filename = image["filename"]
                            .as_str()
                            .ok_or_else(|| rejected("an output image has no filename"))?;
                        let subfolder = image["subfolder"].as_str().unwrap_or("");
                        files.push((filename.to_owned(), subfolder.to_owned()));
                    }
                }
            }
        }
        upstream::exactly(task.n, files.len())?;
        let mut urls = Vec::with_capacity(files.len());
        for (filename, subfolder) in files {
            let mut url = reqwest::Url::parse(&self.upstream.url("/view"))
                .map_err(|_| BackendError::Internal("the /view URL".to_owned()))?;
            url.query_pairs_mut()
                .append_pair("filename", &filename)
                .append_pair("subfolder", &subfolder)
                .append_pair("type", "output");
            urls.push(url.to_string());
        }
        self.upstream.download_pngs(&urls, deadline).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tollgate_contract::ImageSize;

    #[test]
    fn placeholders_are_filled_with_the_task() {
        let workflow = json!({
            "3": {"class_type": "KSampler", "inputs": {"seed": "{{seed}}", "steps": 20}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": "{{width}}", "height": "{{height}}", "batch_size": "{{n}}"}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "{{prompt}}, masterpiece"}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "tg_{{seed}}"}},
        });
        assert!(has_prompt_placeholder(&workflow));
        assert!(!has_prompt_placeholder(&json!({"a": "b"})));
        let backend = ComfyUi::new("http://127.0.0.1:8188", None, workflow).unwrap();
        let task = TaskRecord {
            prompt: "a \"quoted\" fox".into(),
            n: 2,
            size: ImageSize::S512,
            seed: 42,
            ..TaskRecord::default()
        };
        let filled = backend.workflow_for(&task);
        assert_eq!(filled["3"]["inputs"]["seed"], 42);
        assert_eq!(filled["3"]["inputs"]["steps"], 20);
        assert_eq!(filled["5"]["inputs"]["width"], 512);
        assert_eq!(filled["5"]["inputs"]["batch_size"], 2);
        assert_eq!(
            filled["6"]["inputs"]["text"],
            "a \"quoted\" fox, masterpiece"
        );
        assert_eq!(filled["9"]["inputs"]["filename_prefix"], "tg_42");
    }
}
