//! The long poll, `GET /v1/tasks/{id}?wait=N`, against the real binary with an OpenAI-compatible
//! upstream that holds every generation until the test lets it go: the answer comes when the
//! task finishes (not at the end of N), after N with the state then, at once for a finished
//! task, at a cancel, and at shutdown; bad `wait`s are 400 with `param`; the CLI's
//! `generate --wait` (the SDK's `wait_for_task`) asks with the long poll instead of polling.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use common::{expect_error, Call, TestServer};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::sync::watch;

const UPSTREAM_KEY: &str = "sk-test-waiting-0f3a";

/// An OpenAI images API that answers every request once `release` says so.
async fn held_upstream() -> (String, watch::Sender<bool>) {
    let (release, held) = watch::channel(false);
    async fn generations(
        State(mut held): State<watch::Receiver<bool>>,
        Json(body): Json<Value>,
    ) -> Json<Value> {
        held.wait_for(|go| *go).await.unwrap();
        let png = base64::engine::general_purpose::STANDARD.encode(b"\x89PNG\r\n\x1a\nheld");
        let data: Vec<Value> = (0..body["n"].as_u64().unwrap())
            .map(|_| json!({ "b64_json": png }))
            .collect();
        Json(json!({"created": 1_700_000_000, "data": data}))
    }
    let app = Router::new()
        .route("/v1/images/generations", post(generations))
        .with_state(held);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, release)
}

fn server_for(url: &str) -> (tempfile::TempDir, TestServer) {
    TestServer::start_with_env(
        &["--backend", "openai", "--upstream-url", url],
        &[("TOLLGATE_UPSTREAM_API_KEY", UPSTREAM_KEY)],
    )
}

/// `GET /v1/tasks/{id}?wait=…`: the task, and how long the answer took.
async fn wait_for(server: &TestServer, key: &str, id: &str, wait: &str) -> (Value, Duration) {
    let started = Instant::now();
    let response = server
        .get(key, &format!("/v1/tasks/{id}?wait={wait}"))
        .call()
        .await;
    assert_eq!(response.status(), 200);
    (response.json().await.unwrap(), started.elapsed())
}

/// How many `GET /v1/tasks/{id}` the server has answered, from its metrics.
async fn task_reads(server: &TestServer) -> u64 {
    let text = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("tollgate_http_requests_total{") && l.contains("/v1/tasks/{id}\"")
        })
        .filter(|l| l.contains("method=\"GET\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[tokio::test]
async fn the_long_poll_answers_when_the_task_finishes() {
    let (url, release) = held_upstream().await;
    let (_tmp, server) = server_for(&url);
    let acct = server.account(10).await;
    let task = server
        .create_task(&acct.key, json!({"prompt": "a lighthouse"}))
        .await;
    let id = task["id"].as_str().unwrap().to_owned();
    server.wait_until_running(&acct.key, 1).await;

    // Still running at the end of the wait: the state then, after the wait and not before.
    let (now, took) = wait_for(&server, &acct.key, &id, "1").await;
    assert_eq!(now["status"], "running", "{now}");
    assert!(took >= Duration::from_secs(1), "{took:?}");

    // Released a second into a 30-second wait: the answer is the finished task, long before 30.
    let waiting = {
        let (server_base, key, id) = (server.base.clone(), acct.key.clone(), id.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let task: Value = reqwest::Client::new()
                .get(format!("{server_base}/v1/tasks/{id}?wait=30"))
                .bearer_auth(key)
                .fetch()
                .await;
            (task, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "answered before the task finished");
    release.send_replace(true);
    let (done, took) = waiting.await.unwrap();
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(took < Duration::from_secs(15), "answered after {took:?}");

    // A finished task is answered at once, whatever the wait.
    let (again, took) = wait_for(&server, &acct.key, &id, "60").await;
    assert_eq!(again, done);
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn a_cancel_and_a_shutdown_end_the_waits() {
    let (url, _release) = held_upstream().await;
    let (_tmp, server) = server_for(&url);
    let acct = server.account(10).await;
    let first = server
        .create_task(&acct.key, json!({"prompt": "one"}))
        .await;
    let second = server
        .create_task(&acct.key, json!({"prompt": "two"}))
        .await;
    server.wait_until_running(&acct.key, 1).await;

    let wait = |id: &Value| {
        let (base, key, id) = (
            server.base.clone(),
            acct.key.clone(),
            id.as_str().unwrap().to_owned(),
        );
        tokio::spawn(async move {
            let response = reqwest::Client::new()
                .get(format!("{base}/v1/tasks/{id}?wait=50"))
                .bearer_auth(key)
                .call()
                .await;
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        })
    };

    // A cancel here ends the waits on that task.
    let waiting = wait(&first["id"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let response = server
        .post(
            &acct.key,
            &format!("/v1/tasks/{}/cancel", first["id"].as_str().unwrap()),
        )
        .call()
        .await;
    assert_eq!(response.status(), 200);
    let (status, task) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the wait outlived the cancel")
        .unwrap();
    assert_eq!((status, &task["status"]), (200, &json!("canceled")));

    // Shutdown answers a wait in flight with the state it has, instead of holding the drain.
    let waiting = wait(&second["id"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    server.terminate();
    let (status, task) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the wait held the shutdown")
        .unwrap();
    assert_eq!(status, 200, "{task}");
    assert!(
        matches!(task["status"].as_str(), Some("queued" | "running")),
        "{task}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_bad_wait_is_an_invalid_value_that_names_it() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(10).await;
    let (task, _) = server
        .generate(
            &acct.key,
            json!({"prompt": "a lighthouse", "size": "256x256"}),
        )
        .await;
    let id = task["id"].as_str().unwrap();
    for wait in ["61", "-1", "soon", "NaN", "inf", ""] {
        let response = server
            .get(&acct.key, &format!("/v1/tasks/{id}?wait={wait}"))
            .call()
            .await;
        let (_, e) = expect_error(response, "400 invalid_request_error invalid_value").await;
        assert_eq!(e["param"], "wait", "{wait}");
    }
    for wait in ["0", "0.5", "60"] {
        let (done, _) = wait_for(&server, &acct.key, id, wait).await;
        assert_eq!(done["status"], "succeeded");
    }
    // An unknown task is still 404, with or without a wait.
    let response = server
        .get(&acct.key, "/v1/tasks/task_000000000000000000000000?wait=5")
        .call()
        .await;
    expect_error(response, "404 not_found_error resource_not_found").await;
}

#[tokio::test]
async fn generate_wait_asks_with_the_long_poll_instead_of_polling() {
    let (url, release) = held_upstream().await;
    let (_tmp, server) = server_for(&url);
    let acct = server.account(10).await;
    let out = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
    command
        .args([
            "generate",
            "a lighthouse",
            "--poll-interval",
            "100ms",
            "--out",
        ])
        .arg(out.path())
        .env("TOLLGATE_BASE_URL", &server.base)
        .env("TOLLGATE_API_KEY", &acct.key);
    let cli = tokio::task::spawn_blocking(move || command.output().unwrap());
    let before = task_reads(&server).await;
    // Three seconds of a held task: polling every 100 ms would ask some 30 times.
    tokio::time::sleep(Duration::from_secs(3)).await;
    release.send_replace(true);
    let output = cli.await.unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 1);
    let asked = task_reads(&server).await - before;
    assert!((1..=3).contains(&asked), "{asked} reads of the task");
}
