//! Generation backends: what turns a task into PNG bytes, behind one trait, chosen at `serve` time.
//!
//! - [`builtin::Builtin`]: the offline reference renderer (`domain/generator.rs`), the default.
//! - [`openai::OpenAiImages`]: an OpenAI-compatible images API
//!   (`POST {url}/v1/images/generations`, `response_format: b64_json`).
//! - [`replicate::Replicate`]: Replicate's predictions (create, poll, download, cancel).
//! - [`fal::Fal`]: fal's queue (submit, status, result, download, cancel).
//! - [`comfyui::ComfyUi`]: a ComfyUI server running a workflow file (`/prompt`, `/history`,
//!   `/view`, and `/queue` + `/interrupt` to cancel).
//!
//! The providers' backends share [`upstream::Upstream`]: every call through the SDK's retry
//! loop, the key sent to the provider's origin only, messages cleaned for the task.
//!
//! The worker (`domain/worker.rs`) calls the backend under the per-backend concurrency limit and
//! the per-task timeout, stores what it returns, and turns a [`BackendError`] into the task's
//! `error` with [`BackendError::task_error`]. A backend's reasons are written to be shown on the
//! task: they never carry a credential or an upstream body beyond a short, cleaned message.

pub mod builtin;
pub mod comfyui;
pub mod fal;
pub mod openai;
pub mod replicate;
pub mod upstream;

use crate::domain::catalogue::BackendSpec;
use crate::error::Result;
use crate::store::TaskRecord;
use async_trait::async_trait;
use std::sync::Arc;
use tokio::time::Instant;

/// Makes the images of a task.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs: `builtin`, `openai`.
    fn name(&self) -> &'static str;

    /// The task's `n` PNG images, in order. `deadline` is when the worker stops waiting: a
    /// backend that retries should not start a wait that ends after it.
    async fn generate(
        &self,
        task: &TaskRecord,
        deadline: Instant,
    ) -> std::result::Result<Vec<Vec<u8>>, BackendError>;
}

/// Why a backend made no images. The `reason`s are safe to show to the task's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// Failures that may pass (429, 5xx, no connection) went on until the retries ran out.
    Exhausted { reason: String },
    /// The request will not succeed as sent: the upstream refused it (a 4xx other than 429) or
    /// answered with something that is not the images asked for.
    Rejected { reason: String },
    /// The time of the task ran out.
    Timeout,
    /// Something broke on this side (a bug, a full disk). The text is for the log only.
    Internal(String),
}

impl BackendError {
    /// The task's `error` for this failure: a code and a sentence for its owner.
    pub fn task_error(&self, task_timeout: std::time::Duration) -> (String, String) {
        match self {
            BackendError::Exhausted { reason } => (
                "upstream_unavailable".to_owned(),
                format!(
                    "The image service did not answer successfully ({reason}); the task's credits were refunded."
                ),
            ),
            BackendError::Rejected { reason } => (
                "upstream_rejected".to_owned(),
                format!(
                    "The image service refused the request ({reason}); the task's credits were refunded."
                ),
            ),
            BackendError::Timeout => (
                "generation_timeout".to_owned(),
                format!(
                    "The images were not ready within {}; the task's credits were refunded.",
                    human(task_timeout)
                ),
            ),
            BackendError::Internal(_) => (
                "generation_failed".to_owned(),
                "The image could not be generated; the task's credits were refunded.".to_owned(),
            ),
        }
    }
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendError::Exhausted { reason } => write!(f, "upstream unavailable: {reason}"),
            BackendError::Rejected { reason } => write!(f, "upstream rejected: {reason}"),
            BackendError::Timeout => f.write_str("timed out"),
            BackendError::Internal(cause) => write!(f, "internal: {cause}"),
        }
    }
}

/// "5 minutes", "90 seconds".
fn human(duration: std::time::Duration) -> String {
    let secs = duration.as_secs();
    let (n, unit) = match secs {
        s if s >= 3600 && s % 3600 == 0 => (s / 3600, "hour"),
        s if s >= 60 && s % 60 == 0 => (s / 60, "minute"),
        0 => (duration.as_millis() as u64, "millisecond"),
        s => (s, "second"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// The backend a model of the catalogue names, with its provider's settings.
pub fn for_model(spec: &BackendSpec) -> Result<Arc<dyn Backend>> {
    match spec {
        BackendSpec::Builtin => Ok(Arc::new(builtin::Builtin)),
        BackendSpec::OpenAi {
            url,
            api_key,
            upstream_model,
        } => Ok(Arc::new(openai::OpenAiImages::new(
            url,
            api_key.clone(),
            upstream_model.clone(),
        )?)),
        BackendSpec::Replicate(p) => Ok(Arc::new(replicate::Replicate::new(
            &p.url,
            p.api_key.clone(),
            &p.upstream_model,
            p.input.clone(),
        )?)),
        BackendSpec::Fal(p) => Ok(Arc::new(fal::Fal::new(
            &p.url,
            p.api_key.clone(),
            &p.upstream_model,
            p.input.clone(),
        )?)),
        BackendSpec::ComfyUi {
            url,
            api_key,
            workflow,
        } => Ok(Arc::new(comfyui::ComfyUi::new(
            url,
            api_key.clone(),
            workflow.clone(),
        )?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn task_errors_read_well() {
        let (code, message) = BackendError::Timeout.task_error(Duration::from_secs(300));
        assert_eq!(code, "generation_timeout");
        assert!(message.contains("within 5 minutes"), "{message}");
        let (code, message) = BackendError::Rejected {
            reason: "400: the prompt is too long".into(),
        }
        .task_error(Duration::from_secs(1));
        assert_eq!(code, "upstream_rejected");
        assert!(
            message.contains("(400: the prompt is too long)"),
            "{message}"
        );
        let (_, message) =
            BackendError::Internal("disk full at /srv".into()).task_error(Duration::from_secs(1));
        assert!(!message.contains("/srv"));
        assert_eq!(human(Duration::from_millis(1500)), "1 second");
        assert_eq!(human(Duration::from_millis(500)), "500 milliseconds");
    }
}
