//! `/openai/v1`: the OpenAI images API over the same accounts, keys, credits, limits and errors,
//! so that the official OpenAI SDKs work against `base_url = <server>/openai/v1` unchanged.
//!
//! A create here is the native create (the same validation, price, charge and queue) followed
//! by a wait for its task (`--sync-timeout`); the answer is OpenAI's `{"created", "data"}`. Our
//! envelope is OpenAI's error shape already, so the SDKs raise the right exception classes from
//! it. A task that fails is refunded and answered as an error: `generation_rejected` (400) when
//! the provider refused it, `generation_failed` (502, retryable: nothing was charged) otherwise;
//! a wait that runs out is `504 timeout`, not retryable, naming the task (which goes on).
//!
//! OpenAI's API has no `Idempotency-Key`, and these routes take none: a retry whose first
//! attempt was accepted makes a second task. The SDKs retry only what our `x-should-retry` allows
//! and a connection lost mid-request; the native API, with its keys, is the one for exactly-once.

use super::extract::JsonBody;
use super::{wire, AppState};
use crate::domain::service::Caller;
use crate::error::Error;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tollgate_contract::{CreateGenerationRequest, ErrorCode, ImageSize, Task, TaskStatus};

/// OpenAI's `POST /v1/images/generations` body. Its fields that change nothing here (`quality`,
/// `style`, `user`, `background`, `moderation`, `output_compression`, `partial_images`) are
/// taken and ignored; a field OpenAI does not have is still `unknown_field`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesRequest {
    prompt: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    n: Option<u8>,
    #[serde(default)]
    size: Option<String>,
    #[serde(default)]
    response_format: Option<String>,
    #[serde(default)]
    output_format: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default, rename = "quality")]
    _quality: Option<String>,
    #[serde(default, rename = "style")]
    _style: Option<String>,
    #[serde(default, rename = "user")]
    _user: Option<String>,
    #[serde(default, rename = "background")]
    _background: Option<String>,
    #[serde(default, rename = "moderation")]
    _moderation: Option<String>,
    #[serde(default, rename = "output_compression")]
    _output_compression: Option<u8>,
    #[serde(default, rename = "partial_images")]
    _partial_images: Option<u8>,
}

/// OpenAI's images response.
#[derive(Debug, Serialize)]
pub struct ImagesResponse {
    created: i64,
    data: Vec<Image>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Image {
    Url { url: String },
    B64 { b64_json: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Url,
    B64,
}

fn invalid(param: &'static str, message: String) -> Error {
    Error::invalid(ErrorCode::InvalidValue, param, message)
}

impl ImagesRequest {
    /// The native create it stands for, and how the images go back.
    fn into_native(self) -> Result<(CreateGenerationRequest, Format), Error> {
        if self.stream == Some(true) {
            return Err(invalid(
                "stream",
                "Streaming is not offered; leave `stream` out or false.".to_owned(),
            ));
        }
        match self.output_format.as_deref() {
            None | Some("png") => {}
            Some(other) => {
                return Err(invalid(
                    "output_format",
                    format!(
                        "The images are PNG: `output_format` must be `png`, not `{}`.",
                        shorten(other)
                    ),
                ))
            }
        }
        let format = match self.response_format.as_deref() {
            None | Some("url") => Format::Url,
            Some("b64_json") => Format::B64,
            Some(other) => {
                return Err(invalid(
                    "response_format",
                    format!(
                        "`response_format` must be `url` or `b64_json`, not `{}`.",
                        shorten(other)
                    ),
                ))
            }
        };
        let size = match self.size.as_deref() {
            None | Some("auto") => None,
            Some(text) => Some(text.parse::<ImageSize>().map_err(|_| {
                let sizes: Vec<&str> = ImageSize::ALL.iter().map(|s| s.as_str()).collect();
                invalid(
                    "size",
                    format!(
                        "`size` must be `auto` or one of {}, not `{}`.",
                        sizes.join(", "),
                        shorten(text)
                    ),
                )
            })?),
        };
        let mut request = CreateGenerationRequest::new(self.prompt);
        request.n = self.n;
        request.size = size;
        request.seed = self.seed;
        request.model = self.model;
        Ok((request, format))
    }
}

fn shorten(text: &str) -> String {
    text.chars().take(40).collect()
}

/// `POST /openai/v1/images/generations`.
pub async fn create_image(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    JsonBody(request): JsonBody<ImagesRequest>,
) -> Result<Json<ImagesResponse>, Error> {
    let (request, format) = request.into_native()?;
    let app = &state.app;
    let task = app.create_generation(&caller, request, None).await?;
    let done = app
        .wait_task(&caller, &task.id, app.config().sync_timeout)
        .await?;
    match done.status {
        TaskStatus::Succeeded => {}
        TaskStatus::Queued | TaskStatus::Running => {
            return Err(Error::InvalidRequest {
                code: ErrorCode::Timeout,
                param: None,
                message: format!(
                    "The images were not ready within {} seconds. The task `{}` goes on and is not charged again: \
                     fetch it with GET /v1/tasks/{} rather than sending this request again.",
                    app.config().sync_timeout.as_secs(),
                    task.id,
                    task.id
                ),
            })
        }
        TaskStatus::Failed | TaskStatus::Canceled => return Err(failed(&done)),
    }
    let data = match format {
        Format::Url => {
            let done = wire::for_client(Task::clone(&done), app.config());
            done.images
                .into_iter()
                .map(|image| Image::Url { url: image.url })
                .collect()
        }
        Format::B64 => {
            let mut data = Vec::with_capacity(usize::from(done.n));
            for index in 0..done.n {
                let png = app
                    .task_image(&caller, &done.id, &index.to_string())
                    .await?;
                data.push(Image::B64 {
                    b64_json: base64::engine::general_purpose::STANDARD.encode(png),
                });
            }
            data
        }
    };
    Ok(Json(ImagesResponse {
        created: done.created_at.unix_timestamp(),
        data,
    }))
}

/// The error a failed or cancelled task is answered with (it was refunded).
fn failed(task: &Task) -> Error {
    let (code, reason) = match &task.error {
        Some(error) if error.code == "upstream_rejected" => {
            (ErrorCode::GenerationRejected, error.message.clone())
        }
        Some(error) => (ErrorCode::GenerationFailed, error.message.clone()),
        None => (
            ErrorCode::GenerationFailed,
            "The task was cancelled before its images were made; its credits were refunded."
                .to_owned(),
        ),
    };
    Error::InvalidRequest {
        code,
        message: format!("{reason} The task: `{}`.", task.id),
        param: None,
    }
}

/// OpenAI's model object.
#[derive(Debug, Serialize)]
pub struct OpenAiModel {
    id: String,
    object: &'static str,
    created: i64,
    owned_by: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    object: &'static str,
    data: Vec<OpenAiModel>,
}

fn openai_model(id: String) -> OpenAiModel {
    OpenAiModel {
        id,
        object: "model",
        // The catalogue has no dates; OpenAI's field is required.
        created: 0,
        owned_by: "tollgate",
    }
}

/// `GET /openai/v1/models`: the catalogue in OpenAI's shape.
pub async fn list_models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: state
            .app
            .models()
            .data
            .into_iter()
            .map(|m| openai_model(m.id))
            .collect(),
    })
}

/// `GET /openai/v1/models/{id}`.
pub async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<OpenAiModel>, Error> {
    state
        .app
        .models()
        .data
        .into_iter()
        .find(|m| m.id == id)
        .map(|m| Json(openai_model(m.id)))
        .ok_or_else(|| Error::NotFound {
            what: "model",
            id: shorten(&id),
        })
}
