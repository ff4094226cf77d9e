//! The OpenAI-compatible backend against a local fake upstream, over real HTTP: images, 429 with
//! Retry-After, 500, 503 until the retries run out, 400, a hang (the task timeout), the
//! per-backend concurrency limit; every failure refunded; the upstream key never shown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use common::{Call, TestServer};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const UPSTREAM_KEY: &str = "sk-test-upstream-3f9a1c77e2b04d5c";

/// What the fake answers to one request.
#[derive(Debug, Clone)]
enum Reply {
    /// `n` PNGs, base64, as the images API does.
    Images,
    /// The images after holding the request this long.
    SlowImages(Duration),
    /// A status with a JSON body and maybe a `Retry-After`.
    Status(u16, Value, Option<&'static str>),
    /// Never answers.
    Hang,
}

/// A request the fake received.
#[derive(Debug, Clone)]
struct Seen {
    authorization: Option<String>,
    body: Value,
    at: Instant,
}

struct Fake {
    script: Mutex<VecDeque<Reply>>,
    otherwise: Reply,
    seen: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// A PNG the fake returns for image `index` (distinct bytes per index).
fn fake_png(index: usize) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend_from_slice(format!("fake image {index}").as_bytes());
    bytes
}

async fn generations(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    fake.seen.lock().unwrap().push(Seen {
        authorization: headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned()),
        body: body.clone(),
        at: Instant::now(),
    });
    let reply = fake
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| fake.otherwise.clone());
    let now = fake.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    fake.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let images = |body: &Value| {
        let n = body["n"].as_u64().unwrap() as usize;
        let data: Vec<Value> = (0..n)
            .map(|i| {
                json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(fake_png(i))})
            })
            .collect();
        Json(json!({"created": 1_700_000_000, "data": data})).into_response()
    };
    let response = match reply {
        Reply::Images => images(&body),
        Reply::SlowImages(wait) => {
            tokio::time::sleep(wait).await;
            images(&body)
        }
        Reply::Status(status, body, retry_after) => {
            let mut response = (StatusCode::from_u16(status).unwrap(), Json(body)).into_response();
            if let Some(wait) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", wait.parse().unwrap());
            }
            response
        }
        Reply::Hang => {
            fake.in_flight.fetch_sub(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
            unreachable!()
        }
    };
    fake.in_flight.fetch_sub(1, Ordering::SeqCst);
    response
}

/// Starts the fake upstream on 127.0.0.1:0; answers `script` in order, then `otherwise`.
async fn fake_upstream(script: Vec<Reply>, otherwise: Reply) -> (String, Arc<Fake>) {
    let fake = Arc::new(Fake {
        script: Mutex::new(script.into()),
        otherwise,
        seen: Mutex::new(Vec::new()),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
    });
    let app = Router::new()
        .route("/v1/images/generations", post(generations))
        .with_state(Arc::clone(&fake));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, fake)
}

fn server_for(url: &str, extra: &[&str]) -> (tempfile::TempDir, TestServer) {
    let mut args = vec!["--backend", "openai", "--upstream-url", url];
    args.extend_from_slice(extra);
    TestServer::start_with_env(&args, &[("TOLLGATE_UPSTREAM_API_KEY", UPSTREAM_KEY)])
}

/// The key appears in no task JSON and no log line.
fn assert_no_key(server: &TestServer, task: &Value) {
    assert!(!task.to_string().contains(UPSTREAM_KEY), "{task}");
    assert!(!task.to_string().contains("sk-"), "{task}");
    let logs = server.logs();
    assert!(
        !logs.contains(UPSTREAM_KEY),
        "the key is in the log:\n{logs}"
    );
}

#[tokio::test]
async fn images_come_from_the_upstream_with_its_key_and_the_right_request() {
    let (url, fake) = fake_upstream(vec![], Reply::Images).await;
    let (_tmp, server) = server_for(&url, &["--upstream-model", "dall-e-2"]);
    let acct = server.account(100).await;
    let task = server
        .create_task(
            &acct.key,
            json!({"prompt": "a lighthouse at dusk", "n": 2, "size": "256x256"}),
        )
        .await;
    let id = task["id"].as_str().unwrap();
    let done = server.wait_task(&acct.key, id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    for index in 0..2 {
        let png = server
            .get(&acct.key, &format!("/v1/tasks/{id}/images/{index}"))
            .call()
            .await;
        assert_eq!(png.status(), 200);
        assert_eq!(png.bytes().await.unwrap().to_vec(), fake_png(index));
    }
    let seen = fake.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );
    assert_eq!(
        seen[0].body,
        json!({"prompt": "a lighthouse at dusk", "n": 2, "size": "256x256",
               "response_format": "b64_json", "model": "dall-e-2"})
    );
    assert_eq!(server.balance(&acct.key).await, 98);
    let logs = server.wait_for_log("serving").await;
    let serving = logs
        .lines()
        .find(|l| l.contains("serving"))
        .expect("the serving line");
    assert!(serving.contains("backend=\"openai\""), "{serving}");
    assert_no_key(&server, &done);
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_then_the_task_succeeds() {
    let busy = json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}});
    let (url, fake) = fake_upstream(vec![Reply::Status(429, busy, Some("2"))], Reply::Images).await;
    let (_tmp, server) = server_for(&url, &[]);
    let acct = server.account(100).await;
    let (_, done) = server
        .generate(&acct.key, json!({"prompt": "busy", "size": "256x256"}))
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let seen = fake.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let gap = seen[1].at - seen[0].at;
    assert!(
        gap >= Duration::from_secs(2),
        "Retry-After: 2 is a floor, waited {gap:?}"
    );
    assert!(
        gap < Duration::from_secs(4),
        "plus under 1 s of jitter: {gap:?}"
    );
    assert_eq!(server.balance(&acct.key).await, 99);
    assert_no_key(&server, &done);
}

#[tokio::test]
async fn a_500_is_retried_with_backoff_then_the_task_succeeds() {
    let broken = json!({"error": {"message": "The server had an error", "type": "server_error"}});
    let (url, fake) = fake_upstream(vec![Reply::Status(500, broken, None)], Reply::Images).await;
    let (_tmp, server) = server_for(&url, &[]);
    let acct = server.account(100).await;
    let (_, done) = server
        .generate(&acct.key, json!({"prompt": "flaky", "size": "256x256"}))
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let seen = fake.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let gap = seen[1].at - seen[0].at;
    assert!(
        (Duration::from_secs(1)..Duration::from_secs(3)).contains(&gap),
        "the seed's first backoff: 1 s plus jitter, waited {gap:?}"
    );
    // Each retry is logged.
    server.wait_for_log("retrying").await;
    assert_no_key(&server, &done);
}

#[tokio::test]
async fn a_400_fails_the_task_at_once_with_its_reason_and_refunds_it() {
    let refused = json!({"error": {
        "message": format!("Your request was rejected by the safety system. (key {UPSTREAM_KEY}, masked sk-proj-****9f2c)\nRequest id: req_123."),
        "type": "invalid_request_error", "param": null, "code": "content_policy_violation"}});
    let (url, fake) = fake_upstream(vec![], Reply::Status(400, refused, None)).await;
    let (_tmp, server) = server_for(&url, &[]);
    let acct = server.account(10).await;
    let task = server
        .create_task(
            &acct.key,
            json!({"prompt": "forbidden", "size": "1024x1024"}),
        )
        .await;
    // Charged on acceptance (the refund may already have followed: a 400 fails at once).
    assert_eq!(task["cost"], 4);
    let done = server
        .wait_task(&acct.key, task["id"].as_str().unwrap())
        .await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "upstream_rejected");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("The image service refused the request (400: Your request was rejected by the safety system."),
        "{message}"
    );
    assert!(message.contains("refunded"), "{message}");
    assert!(message.chars().count() < 400, "{message}");
    assert_eq!(fake.seen.lock().unwrap().len(), 1, "a 400 is not retried");
    assert_eq!(server.balance(&acct.key).await, 10, "refunded");
    let ledger = server
        .get_json(&acct.key, "/v1/account/ledger?limit=10")
        .await;
    let of_task: Vec<(&str, i64)> = ledger["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["task_id"] == task["id"])
        .map(|e| (e["kind"].as_str().unwrap(), e["delta"].as_i64().unwrap()))
        .collect();
    assert_eq!(of_task, [("refund", 4), ("charge", -4)], "{ledger}");
    assert_no_key(&server, &done);
}

#[tokio::test]
async fn a_401_does_not_echo_the_upstream_and_says_who_must_act() {
    let refused = json!({"error": {"message": "Incorrect API key provided: sk-test-****4d5c.", "type": "invalid_request_error", "code": "invalid_api_key"}});
    let (url, _fake) = fake_upstream(vec![], Reply::Status(401, refused, None)).await;
    let (_tmp, server) = server_for(&url, &[]);
    let acct = server.account(10).await;
    let (_, done) = server
        .generate(&acct.key, json!({"prompt": "x", "size": "256x256"}))
        .await;
    assert_eq!(done["error"]["code"], "upstream_rejected", "{done}");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("401") && message.contains("operator"),
        "{message}"
    );
    assert!(!message.contains("Incorrect API key"), "{message}");
    assert_eq!(server.balance(&acct.key).await, 10);
    assert_no_key(&server, &done);
}

#[tokio::test]
async fn a_persistent_503_exhausts_the_retries_and_refunds() {
    let down = json!({"error": {"message": "overloaded", "type": "server_error"}});
    // Retry-After: 0 keeps the five retries quick (each waits only its jitter).
    let (url, fake) = fake_upstream(vec![], Reply::Status(503, down, Some("0"))).await;
    let (_tmp, server) = server_for(&url, &[]);
    let acct = server.account(10).await;
    let (_, done) = server
        .generate(&acct.key, json!({"prompt": "x", "size": "512x512"}))
        .await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "upstream_unavailable");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(message.contains("503 after 6 attempts"), "{message}");
    assert_eq!(
        fake.seen.lock().unwrap().len(),
        6,
        "1 + the seed's 5 retries"
    );
    assert_eq!(server.balance(&acct.key).await, 10);
    assert_no_key(&server, &done);
}

#[tokio::test]
async fn a_hanging_upstream_hits_the_task_timeout_and_is_refunded() {
    let (url, _fake) = fake_upstream(vec![], Reply::Hang).await;
    let (_tmp, server) = server_for(&url, &["--task-timeout", "2s"]);
    let acct = server.account(10).await;
    let started = Instant::now();
    let (_, done) = server
        .generate(&acct.key, json!({"prompt": "x", "size": "256x256"}))
        .await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "generation_timeout");
    assert!(done["error"]["message"]
        .as_str()
        .unwrap()
        .contains("within 2 seconds"));
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(server.balance(&acct.key).await, 10);
    assert_no_key(&server, &done);
}

#[tokio::test]
async fn the_backend_concurrency_limit_holds_across_workers() {
    let (url, fake) = fake_upstream(vec![], Reply::SlowImages(Duration::from_millis(400))).await;
    let (_tmp, server) = server_for(&url, &["--workers", "4", "--backend-concurrency", "2"]);
    let acct = server.account(100).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let task = server
            .create_task(
                &acct.key,
                json!({"prompt": format!("slow {i}"), "size": "256x256"}),
            )
            .await;
        ids.push(task["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        assert_eq!(server.wait_task(&acct.key, id).await["status"], "succeeded");
    }
    assert_eq!(fake.seen.lock().unwrap().len(), 6);
    assert_eq!(
        fake.max_in_flight.load(Ordering::SeqCst),
        2,
        "never more than --backend-concurrency at once, and it is used"
    );
}

#[test]
fn openai_without_a_key_or_url_does_not_start() {
    let tmp = tempfile::tempdir().unwrap();
    for (args, env, needle) in [
        (
            vec![
                "--backend",
                "openai",
                "--upstream-url",
                "http://127.0.0.1:9",
            ],
            vec![],
            "TOLLGATE_UPSTREAM_API_KEY",
        ),
        (
            vec!["--backend", "openai"],
            vec![("TOLLGATE_UPSTREAM_API_KEY", UPSTREAM_KEY)],
            "--upstream-url",
        ),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("serve")
            .args(["--addr", "127.0.0.1:0", "--data-dir"])
            .arg(tmp.path())
            .args(&args)
            .env_remove("TOLLGATE_UPSTREAM_API_KEY")
            .envs(env)
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{stderr}");
        assert!(!stderr.contains(UPSTREAM_KEY));
    }
}

/// The crash rule with a backend that is not deterministic: a task whose run a crash interrupts
/// is run again (a new upstream request), up to three runs; claimed a fourth time, it is failed
/// and refunded instead, once.
#[tokio::test]
async fn a_task_interrupted_three_times_is_failed_and_refunded() {
    let (url, fake) = fake_upstream(vec![], Reply::Hang).await;
    let args = [
        "--backend",
        "openai",
        "--upstream-url",
        url.as_str(),
        "--task-timeout",
        "10m",
    ];
    let env = [("TOLLGATE_UPSTREAM_API_KEY", UPSTREAM_KEY)];
    let (tmp, mut server) = TestServer::start_with_env(&args, &env);
    let acct = server.account(10).await;
    let task = server
        .create_task(&acct.key, json!({"prompt": "x", "size": "1024x1024"}))
        .await;
    let id = task["id"].as_str().unwrap().to_owned();
    assert_eq!(server.balance(&acct.key).await, 6);
    for run in 1..=3 {
        // Wait until this run's request reached the upstream, then crash.
        let deadline = Instant::now() + Duration::from_secs(30);
        while fake.seen.lock().unwrap().len() < run {
            assert!(
                Instant::now() < deadline,
                "run {run} never reached the upstream"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.kill();
        drop(server);
        server = TestServer::start_in_with_env(tmp.path(), &args, &env);
    }
    let done = server.wait_task(&acct.key, &id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "interrupted");
    assert!(done["error"]["message"]
        .as_str()
        .unwrap()
        .contains("interrupted 3 times"));
    assert_eq!(fake.seen.lock().unwrap().len(), 3, "no fourth run");
    assert_eq!(server.balance(&acct.key).await, 10, "refunded");
    let ledger: Value = server.get_json(&acct.key, "/v1/account/ledger").await;
    let kinds: Vec<_> = ledger["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds,
        vec!["refund", "charge", "grant"],
        "one charge, one refund"
    );
}
