//! The queue providers' backends against local servers that follow each provider's documented
//! protocol over real HTTP: Replicate's predictions (create, poll, output URLs, cancel), fal's
//! queue (submit, status, result, cancel) and ComfyUI's (prompt, history, view, queue delete).
//! Each: images made and served, the task's input and the catalogue's `input` sent, the key sent
//! to the provider and not to the CDN that serves the outputs, a 503 and a 429 with `Retry-After`
//! ridden out as the retry policy says, a failed run refunded with the provider's reason, an
//! output that is not an image refused and refunded, and a run past the model's timeout refunded
//! and cancelled at the provider.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use common::{Call, TestServer};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const REPLICATE_KEY: &str = "r8_test_replicate_token_5b1e";
const FAL_KEY: &str = "fal-key-id:fal-key-secret-77c2";

fn png(tag: &str) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend_from_slice(tag.as_bytes());
    bytes
}

/// What a fake provider saw and holds.
#[derive(Default)]
struct Provider {
    /// The base URL of the API and of the CDN that serves outputs (another origin).
    api: String,
    cdn: String,
    /// Run id → (the request's input, polls so far).
    runs: Mutex<HashMap<String, (Value, u32)>>,
    authorizations: Mutex<Vec<Option<String>>>,
    cdn_authorizations: Mutex<Vec<Option<String>>>,
    cancels: Mutex<Vec<String>>,
    /// Answers the next API calls get instead of the handler's: a status and its `Retry-After`.
    faults: Mutex<VecDeque<(StatusCode, Option<u64>)>>,
    /// Every API call: when it came and the fault it got (`None`: it reached the handler).
    calls: Mutex<Vec<(Instant, Option<StatusCode>)>>,
}

type Shared = Arc<Provider>;

fn authorization(headers: &HeaderMap) -> Option<String> {
    headers
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_owned())
}

impl Provider {
    /// Records the `Authorization` of a call to the API.
    fn saw(&self, headers: &HeaderMap) {
        self.authorizations
            .lock()
            .unwrap()
            .push(authorization(headers));
    }

    fn new_run(&self, headers: &HeaderMap, input: Value) -> String {
        self.saw(headers);
        let mut runs = self.runs.lock().unwrap();
        let id = format!("run{}", runs.len());
        runs.insert(id.clone(), (input, 0));
        id
    }

    /// One poll of `id`: its input and how many polls came before.
    fn poll(&self, headers: &HeaderMap, id: &str) -> Option<(Value, u32)> {
        self.saw(headers);
        let mut runs = self.runs.lock().unwrap();
        let (input, polls) = runs.get_mut(id)?;
        *polls += 1;
        Some((input.clone(), *polls - 1))
    }

    fn prompt_of(&self, id: &str) -> String {
        let runs = self.runs.lock().unwrap();
        runs[id].0["prompt"].as_str().unwrap().to_owned()
    }

    /// The input of the first run.
    fn first_input(&self) -> Value {
        self.runs.lock().unwrap()["run0"].0.clone()
    }
}

/// The CDN: `GET /{run}/{index}.png`, without a key.
async fn cdn_file(
    State(provider): State<Shared>,
    headers: HeaderMap,
    Path((run, file)): Path<(String, String)>,
) -> Vec<u8> {
    provider
        .cdn_authorizations
        .lock()
        .unwrap()
        .push(authorization(&headers));
    image(&provider, &run, &format!("{run}/{file}"))
}

/// The bytes of an output of `run`: a PNG, or an HTML error page when its prompt asked for
/// garbled output.
fn image(provider: &Provider, run: &str, tag: &str) -> Vec<u8> {
    if provider.prompt_of(run).contains("garbled") {
        return b"<html><body>502 Bad Gateway</body></html>".to_vec();
    }
    png(tag)
}

/// Answers an API call with the next queued fault, if any, before it reaches the provider.
async fn faults(
    State(provider): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let fault = provider.faults.lock().unwrap().pop_front();
    provider
        .calls
        .lock()
        .unwrap()
        .push((Instant::now(), fault.map(|(status, _)| status)));
    match fault {
        Some((status, retry_after)) => {
            let mut response =
                (status, Json(json!({"detail": "Service is overloaded"}))).into_response();
            if let Some(seconds) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", seconds.to_string().parse().unwrap());
            }
            response
        }
        None => next.run(request).await,
    }
}

/// Starts a provider's API (`api`) and its CDN; returns the shared state with both URLs.
async fn start(api: impl FnOnce(Shared) -> Router) -> Shared {
    let api_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut provider = Provider {
        api: format!("http://{}", api_listener.local_addr().unwrap()),
        ..Provider::default()
    };
    let cdn_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    provider.cdn = format!("http://{}", cdn_listener.local_addr().unwrap());
    let provider = Arc::new(provider);
    let cdn = Router::new()
        .route("/{run}/{file}", get(cdn_file))
        .with_state(Arc::clone(&provider));
    tokio::spawn(async move { axum::serve(cdn_listener, cdn).await.unwrap() });
    let router = api(Arc::clone(&provider)).layer(axum::middleware::from_fn_with_state(
        Arc::clone(&provider),
        faults,
    ));
    tokio::spawn(async move { axum::serve(api_listener, router).await.unwrap() });
    provider
}

// ---------------------------------------------------------------- Replicate

fn prediction(provider: &Provider, id: &str, status: &str, output: Value, error: Value) -> Value {
    json!({
        "id": id,
        "model": "black-forest-labs/flux-schnell",
        "status": status,
        "output": output,
        "error": error,
        "urls": {
            "get": format!("{}/v1/predictions/{id}", provider.api),
            "cancel": format!("{}/v1/predictions/{id}/cancel", provider.api),
        },
    })
}

async fn replicate_create(
    State(provider): State<Shared>,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    assert_eq!(format!("{owner}/{name}"), "black-forest-labs/flux-schnell");
    let id = provider.new_run(&headers, body["input"].clone());
    (
        StatusCode::CREATED,
        Json(prediction(
            &provider,
            &id,
            "starting",
            Value::Null,
            Value::Null,
        )),
    )
        .into_response()
}

async fn replicate_get(
    State(provider): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if provider.cancels.lock().unwrap().contains(&id) {
        return Json(prediction(
            &provider,
            &id,
            "canceled",
            Value::Null,
            Value::Null,
        ))
        .into_response();
    }
    let Some((input, polls)) = provider.poll(&headers, &id) else {
        return (StatusCode::NOT_FOUND, Json(json!({"detail": "Not found."}))).into_response();
    };
    let prompt = input["prompt"].as_str().unwrap();
    let body = if polls < 2 || prompt.contains("hang") {
        prediction(&provider, &id, "processing", Value::Null, Value::Null)
    } else if prompt.contains("refuse") {
        prediction(
            &provider,
            &id,
            "failed",
            Value::Null,
            json!(format!(
                "{REFUSAL}. Try running it again, or try a different prompt."
            )),
        )
    } else {
        let n = input["num_outputs"].as_u64().unwrap();
        let output: Vec<String> = (0..n)
            .map(|i| format!("{}/{id}/{i}.png", provider.cdn))
            .collect();
        prediction(&provider, &id, "succeeded", json!(output), Value::Null)
    };
    Json(body).into_response()
}

async fn replicate_cancel(
    State(provider): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    provider.saw(&headers);
    provider.cancels.lock().unwrap().push(id.clone());
    Json(prediction(
        &provider,
        &id,
        "canceled",
        Value::Null,
        Value::Null,
    ))
    .into_response()
}

async fn replicate() -> Shared {
    start(|provider| {
        Router::new()
            .route(
                "/v1/models/{owner}/{name}/predictions",
                post(replicate_create),
            )
            .route("/v1/predictions/{id}", get(replicate_get))
            .route("/v1/predictions/{id}/cancel", post(replicate_cancel))
            .with_state(provider)
    })
    .await
}

// ---------------------------------------------------------------- fal

fn fal_urls(provider: &Provider, id: &str) -> Value {
    // As fal does for a model id with a sub-path: the request's URLs drop it.
    let request = format!("{}/fal-ai/flux/requests/{id}", provider.api);
    json!({
        "request_id": id,
        "response_url": request,
        "status_url": format!("{request}/status"),
        "cancel_url": format!("{request}/cancel"),
    })
}

async fn fal_submit(
    State(provider): State<Shared>,
    Path((owner, app, path)): Path<(String, String, String)>,
    headers: HeaderMap,
    Json(input): Json<Value>,
) -> Response {
    assert_eq!(format!("{owner}/{app}/{path}"), "fal-ai/flux/schnell");
    let id = provider.new_run(&headers, input);
    let mut body = fal_urls(&provider, &id);
    body["status"] = json!("IN_QUEUE");
    body["queue_position"] = json!(0);
    Json(body).into_response()
}

async fn fal_status(
    State(provider): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some((input, polls)) = provider.poll(&headers, &id) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"detail": "Request not found"})),
        )
            .into_response();
    };
    let status = match polls {
        0 => "IN_QUEUE",
        _ if input["prompt"].as_str().unwrap().contains("hang") => "IN_PROGRESS",
        1 => "IN_PROGRESS",
        _ => "COMPLETED",
    };
    let mut body = fal_urls(&provider, &id);
    body["status"] = json!(status);
    Json(body).into_response()
}

async fn fal_result(
    State(provider): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    provider.saw(&headers);
    let prompt = provider.prompt_of(&id);
    if prompt.contains("refuse") {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"detail": [{"loc": ["body", "prompt"], "msg": REFUSAL, "type": "content_policy_violation"}]})),
        )
            .into_response();
    }
    let runs = provider.runs.lock().unwrap();
    let n = runs[&id].0["num_images"].as_u64().unwrap();
    let images: Vec<Value> = (0..n)
        .map(|i| json!({"url": format!("{}/{id}/{i}.png", provider.cdn), "content_type": "image/png", "width": 512, "height": 512}))
        .collect();
    Json(json!({"images": images, "seed": 1, "has_nsfw_concepts": [false]})).into_response()
}

async fn fal_cancel(
    State(provider): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    provider.saw(&headers);
    provider.cancels.lock().unwrap().push(id);
    (
        StatusCode::ACCEPTED,
        Json(json!({"status": "CANCELLATION_REQUESTED"})),
    )
        .into_response()
}

async fn fal() -> Shared {
    start(|provider| {
        Router::new()
            .route("/{owner}/{app}/{path}", post(fal_submit))
            .route("/fal-ai/flux/requests/{id}/status", get(fal_status))
            .route("/fal-ai/flux/requests/{id}", get(fal_result))
            .route("/fal-ai/flux/requests/{id}/cancel", put(fal_cancel))
            .with_state(provider)
    })
    .await
}

// ---------------------------------------------------------------- ComfyUI

/// A workflow in ComfyUI's API format, with tollgate's placeholders.
const WORKFLOW: &str = r#"{
  "3": {"class_type": "KSampler", "inputs": {"seed": "{{seed}}", "steps": 4, "cfg": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
  "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-schnell.safetensors"}},
  "5": {"class_type": "EmptyLatentImage", "inputs": {"width": "{{width}}", "height": "{{height}}", "batch_size": "{{n}}"}},
  "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "{{prompt}}", "clip": ["4", 1]}},
  "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
  "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "tollgate", "images": ["8", 0]}}
}"#;

async fn comfy_prompt(
    State(provider): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let workflow = &body["prompt"];
    // What the run was asked for, as the workflow's nodes carry it.
    let seen = json!({
        "prompt": workflow["6"]["inputs"]["text"],
        "seed": workflow["3"]["inputs"]["seed"],
        "width": workflow["5"]["inputs"]["width"],
        "batch_size": workflow["5"]["inputs"]["batch_size"],
        "client_id": body["client_id"],
    });
    let id = provider.new_run(&headers, seen);
    Json(json!({"prompt_id": id, "number": 1, "node_errors": {}})).into_response()
}

async fn comfy_history(
    State(provider): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some((input, polls)) = provider.poll(&headers, &id) else {
        return Json(json!({})).into_response();
    };
    let prompt = input["prompt"].as_str().unwrap();
    if polls < 1 || prompt.contains("hang") {
        // Queued or running: not in the history yet.
        return Json(json!({})).into_response();
    }
    let entry = if prompt.contains("refuse") {
        json!({"prompt": [], "outputs": {}, "status": {"status_str": "error", "completed": false, "messages": [
            ["execution_start", {"prompt_id": id}],
            ["execution_error", {"prompt_id": id, "node_id": "3", "node_type": "KSampler", "exception_message": REFUSAL, "exception_type": "RuntimeError"}],
        ]}})
    } else {
        let n = input["batch_size"].as_u64().unwrap();
        let images: Vec<Value> = (0..n)
            .map(|i| json!({"filename": format!("{i}.png"), "subfolder": id, "type": "output"}))
            .collect();
        json!({"prompt": [], "outputs": {"9": {"images": images}}, "status": {"status_str": "success", "completed": true, "messages": []}})
    };
    Json(json!({ id: entry })).into_response()
}

#[derive(serde::Deserialize)]
struct View {
    filename: String,
    subfolder: String,
    #[serde(rename = "type")]
    kind: String,
}

async fn comfy_view(
    State(provider): State<Shared>,
    headers: HeaderMap,
    axum::extract::Query(view): axum::extract::Query<View>,
) -> Vec<u8> {
    assert_eq!(view.kind, "output");
    provider
        .cdn_authorizations
        .lock()
        .unwrap()
        .push(authorization(&headers));
    image(
        &provider,
        &view.subfolder,
        &format!("{}/{}", view.subfolder, view.filename),
    )
}

async fn comfy_queue(
    State(provider): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> StatusCode {
    provider.saw(&headers);
    for id in body["delete"].as_array().into_iter().flatten() {
        provider
            .cancels
            .lock()
            .unwrap()
            .push(id.as_str().unwrap().to_owned());
    }
    StatusCode::OK
}

async fn comfy_interrupt(State(provider): State<Shared>, headers: HeaderMap) -> StatusCode {
    provider.saw(&headers);
    StatusCode::OK
}

async fn comfyui() -> Shared {
    start(|provider| {
        Router::new()
            .route("/prompt", post(comfy_prompt))
            .route("/history/{id}", get(comfy_history))
            .route("/view", get(comfy_view))
            .route("/queue", post(comfy_queue))
            .route("/interrupt", post(comfy_interrupt))
            .with_state(provider)
    })
    .await
}

// ---------------------------------------------------------------- the scenario

/// One model on `backend` (its settings in `settings`, files it names in `files`), against
/// `provider`; the three runs every provider must get right. `key`: the variable and the key,
/// and the `Authorization` the provider must see on every call (`None`: no key at all).
async fn a_provider_makes_refuses_and_times_out(
    backend: &str,
    settings: &str,
    files: &[(&str, &str)],
    key: Option<(&str, &str, &str)>,
    provider: Shared,
) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let models = dir.path().join("models.toml");
    let key_line = key.map_or(String::new(), |(var, _, _)| {
        format!("api_key_env = \"{var}\"\n")
    });
    // `m` gives up after 2 s; `patient`, the same model, waits out the faults' retries.
    let model = |name: &str, timeout: &str| {
        format!(
            "[models.{name}]\nbackend = \"{backend}\"\nurl = \"{}\"\n{settings}\n{key_line}\
             prices = {{ \"512x512\" = 3 }}\ntimeout = \"{timeout}\"\n",
            provider.api
        )
    };
    std::fs::write(
        &models,
        format!(
            "default = \"m\"\n{}\n{}",
            model("m", "2s"),
            model("patient", "30s")
        ),
    )
    .unwrap();
    let env: Vec<(&str, &str)> = key.iter().map(|(var, secret, _)| (*var, *secret)).collect();
    let (_tmp, server) = TestServer::start_with_env(&["--models", models.to_str().unwrap()], &env);
    let acct = server.account(100).await;

    // Made: two images, from the provider's CDN, served as the task's.
    let (task, done) = server
        .generate(
            &acct.key,
            json!({"prompt": "a lighthouse", "n": 2, "seed": 9}),
        )
        .await;
    assert_eq!((&task["model"], &task["cost"]), (&json!("m"), &json!(6)));
    assert_eq!(done["status"], "succeeded", "{done}");
    for i in 0..2 {
        let bytes = server
            .get(
                &acct.key,
                &format!("/v1/tasks/{}/images/{i}", task["id"].as_str().unwrap()),
            )
            .call()
            .await
            .bytes()
            .await
            .unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "image {i}");
        assert!(bytes.ends_with(format!("/{i}.png").as_bytes()), "image {i}");
    }
    assert_eq!(provider.first_input()["prompt"], "a lighthouse");
    assert_eq!(server.balance(&acct.key).await, 94);

    // Overloaded: a 503, then a 429 with `Retry-After: 1`; the call is retried, the second
    // time no sooner than the provider asked, and the task succeeds.
    let before = provider.calls.lock().unwrap().len();
    provider.faults.lock().unwrap().extend([
        (StatusCode::SERVICE_UNAVAILABLE, None),
        (StatusCode::TOO_MANY_REQUESTS, Some(1)),
    ]);
    let (_, done) = server
        .generate(
            &acct.key,
            json!({"prompt": "a busy harbour", "model": "patient"}),
        )
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let calls = provider.calls.lock().unwrap()[before..].to_vec();
    let faulted: Vec<Option<StatusCode>> = calls.iter().take(3).map(|(_, f)| *f).collect();
    assert_eq!(
        faulted,
        vec![
            Some(StatusCode::SERVICE_UNAVAILABLE),
            Some(StatusCode::TOO_MANY_REQUESTS),
            None
        ]
    );
    let waited = calls[2].0 - calls[1].0;
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}");
    assert_eq!(server.balance(&acct.key).await, 91);

    // Garbled output (an error page where the image should be): failed, refunded.
    let (_, done) = server
        .generate(&acct.key, json!({"prompt": "garbled output"}))
        .await;
    assert_eq!(
        (&done["status"], &done["error"]["code"]),
        (&json!("failed"), &json!("upstream_rejected")),
        "{done}"
    );
    let message = done["error"]["message"].as_str().unwrap();
    assert!(message.contains("not a PNG"), "{message}");
    assert_eq!(server.balance(&acct.key).await, 91);

    // Refused by the provider: failed with its reason, refunded.
    let (_, done) = server
        .generate(&acct.key, json!({"prompt": "refuse this"}))
        .await;
    assert_eq!(
        (&done["status"], &done["error"]["code"]),
        (&json!("failed"), &json!("upstream_rejected")),
        "{done}"
    );
    let message = done["error"]["message"].as_str().unwrap();
    assert!(message.contains(REFUSAL), "{message}");
    assert_eq!(server.balance(&acct.key).await, 91);

    // Still running at the model's timeout: failed, refunded, and cancelled at the provider.
    let (_, done) = server
        .generate(&acct.key, json!({"prompt": "hang forever"}))
        .await;
    assert_eq!(done["error"]["code"], "generation_timeout", "{done}");
    assert_eq!(server.balance(&acct.key).await, 91);
    let deadline = Instant::now() + Duration::from_secs(5);
    while provider.cancels.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the provider's run was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cancelled = provider.cancels.lock().unwrap().clone();
    assert_eq!(cancelled.len(), 1);
    assert_eq!(provider.prompt_of(&cancelled[0]), "hang forever");

    // The key went to the provider on every call, never to its CDN, and nowhere else.
    let sent = provider.authorizations.lock().unwrap().clone();
    assert!(!sent.is_empty());
    let expected = key.map(|(_, _, authorization)| authorization);
    assert!(sent.iter().all(|a| a.as_deref() == expected), "{sent:?}");
    let cdn = provider.cdn_authorizations.lock().unwrap().clone();
    assert_eq!(cdn, vec![None; 4], "two images, one, one garbled");
    if let Some((_, secret, _)) = key {
        let logs = server.logs();
        assert!(!logs.contains(secret), "the key is in the log");
        assert!(!done.to_string().contains(secret));
    }
}

/// What every fake provider says of a prompt with `refuse` in it.
const REFUSAL: &str = "NSFW content detected";

#[tokio::test]
async fn replicate_predictions_are_created_polled_downloaded_and_cancelled() {
    let provider = replicate().await;
    a_provider_makes_refuses_and_times_out(
        "replicate",
        "upstream_model = \"black-forest-labs/flux-schnell\"\ninput = { go_fast = true, num_inference_steps = 4 }",
        &[],
        Some((
            "REPLICATE_API_TOKEN",
            REPLICATE_KEY,
            &format!("Bearer {REPLICATE_KEY}"),
        )),
        Arc::clone(&provider),
    )
    .await;
    let input = provider.first_input();
    assert_eq!(
        (&input["num_outputs"], &input["width"]),
        (&json!(2), &json!(512))
    );
    assert_eq!(
        (&input["seed"], &input["output_format"]),
        (&json!(9), &json!("png"))
    );
    assert_eq!(
        (&input["go_fast"], &input["num_inference_steps"]),
        (&json!(true), &json!(4))
    );
}

#[tokio::test]
async fn fal_requests_are_queued_polled_fetched_and_cancelled() {
    let provider = fal().await;
    a_provider_makes_refuses_and_times_out(
        "fal",
        "upstream_model = \"fal-ai/flux/schnell\"\ninput = { enable_safety_checker = false }",
        &[],
        Some(("FAL_KEY", FAL_KEY, &format!("Key {FAL_KEY}"))),
        Arc::clone(&provider),
    )
    .await;
    let input = provider.first_input();
    assert_eq!(input["num_images"], 2);
    assert_eq!(input["image_size"], json!({"width": 512, "height": 512}));
    assert_eq!(
        (&input["seed"], &input["output_format"]),
        (&json!(9), &json!("png"))
    );
    assert_eq!(input["enable_safety_checker"], false);
}

#[tokio::test]
async fn a_comfyui_workflow_is_filled_in_queued_read_from_the_history_and_cancelled() {
    let provider = comfyui().await;
    a_provider_makes_refuses_and_times_out(
        "comfyui",
        "workflow = \"flux.json\"",
        &[("flux.json", WORKFLOW)],
        None,
        Arc::clone(&provider),
    )
    .await;
    let input = provider.first_input();
    assert_eq!((&input["seed"], &input["width"]), (&json!(9), &json!(512)));
    assert_eq!(input["batch_size"], 2);
    assert!(input["client_id"]
        .as_str()
        .unwrap()
        .starts_with("tollgate-task_"));
}

#[tokio::test]
async fn cancelling_a_running_task_stops_the_prediction_and_refunds_it() {
    let provider = replicate().await;
    let files = tempfile::tempdir().unwrap();
    let models = files.path().join("models.toml");
    std::fs::write(
        &models,
        format!(
            "[models.m]\nbackend = \"replicate\"\nurl = \"{}\"\n\
             upstream_model = \"black-forest-labs/flux-schnell\"\napi_key_env = \"REPLICATE_API_TOKEN\"\n\
             prices = {{ \"512x512\" = 3 }}\n",
            provider.api
        ),
    )
    .unwrap();
    let (_tmp, server) = TestServer::start_with_env(
        &["--models", models.to_str().unwrap()],
        &[("REPLICATE_API_TOKEN", REPLICATE_KEY)],
    );
    let acct = server.account(10).await;
    let task = server
        .create_task(&acct.key, json!({"prompt": "hang until cancelled"}))
        .await;
    let id = task["id"].as_str().unwrap();
    server.wait_until_running(&acct.key, 1).await;
    // The prediction exists at the provider before the cancel.
    let deadline = Instant::now() + Duration::from_secs(10);
    while provider.runs.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no prediction was created");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let response = server
        .post(&acct.key, &format!("/v1/tasks/{id}/cancel"))
        .call()
        .await;
    assert_eq!(response.status(), 200);
    let canceled: Value = response.json().await.unwrap();
    assert_eq!(canceled["status"], "canceled");
    assert_eq!(server.balance(&acct.key).await, 10, "refunded in full");
    // The worker stops the run at once and asks Replicate to cancel the prediction.
    while provider.cancels.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the prediction was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        provider.cancels.lock().unwrap().clone(),
        vec!["run0".to_owned()]
    );
    let logs = server.wait_for_log("a running task was cancelled").await;
    assert!(logs.contains(id));
    // It stays cancelled, refunded once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let now = server.get_json(&acct.key, &format!("/v1/tasks/{id}")).await;
    assert_eq!(
        (&now["status"], &now["images"]),
        (&json!("canceled"), &json!([]))
    );
    let ledger = server.get_json(&acct.key, "/v1/account/ledger").await;
    let kinds: Vec<&str> = ledger["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["refund", "charge", "grant"]);
    assert_eq!(ledger["data"][0]["note"], "canceled while it ran");
}
