//! The model catalogue (`--models`), against the real binary: each model sold at its own price
//! and sizes, `GET /v1/models`, the 400s that name `model`, `size` and `n`, the 402 that names
//! the price, a price change that leaves accepted tasks alone, a provider that hangs holding only
//! its own model's workers, and a bad file stopping the start with its line and reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::routing::post;
use axum::Router;
use common::{expect_error, Call, TestServer};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

const TWO_MODELS: &str = r#"
default = "sketch"

[models.sketch]
name = "Sketch"
backend = "builtin"
prices = { "256x256" = 1, "512x512" = 2 }
max_n = 2

[models.poster]
name = "Poster"
backend = "builtin"
prices = { "1024x1024" = 5 }
max_n = 1
"#;

fn catalogue(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("models.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn each_model_is_sold_at_its_own_prices_and_sizes() {
    let files = tempfile::tempdir().unwrap();
    let models = catalogue(files.path(), TWO_MODELS);
    let (_tmp, server) = TestServer::start(&["--models", models.to_str().unwrap()]);
    let acct = server.account(8).await;

    let listed = server.get_json(&acct.key, "/v1/models").await;
    assert_eq!(
        listed,
        json!({"object": "list", "has_more": false, "data": [
            {"id": "poster", "object": "model", "name": "Poster", "prices": {"1024x1024": 5}, "max_n": 1},
            {"id": "sketch", "object": "model", "name": "Sketch", "prices": {"256x256": 1, "512x512": 2}, "max_n": 2},
        ]})
    );

    // Without `model`: the default model, at its price for the contract's default size.
    let (task, done) = server.generate(&acct.key, json!({"prompt": "a fox"})).await;
    assert_eq!(
        (&task["model"], &task["size"], &task["cost"]),
        (&json!("sketch"), &json!("512x512"), &json!(2))
    );
    assert_eq!(done["status"], "succeeded", "{done}");
    // A model that does not make 512x512 gets its own size when none is asked for.
    let (task, done) = server
        .generate(&acct.key, json!({"prompt": "a fox", "model": "poster"}))
        .await;
    assert_eq!(
        (&task["model"], &task["size"], &task["cost"]),
        (&json!("poster"), &json!("1024x1024"), &json!(5))
    );
    assert_eq!(done["status"], "succeeded", "{done}");
    // The task's own link, without the key.
    let image = reqwest::get(done["images"][0]["url"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(image.status(), 200);
    assert_eq!(server.balance(&acct.key).await, 1);

    let refused = |body: Value| {
        let server = &server;
        let key = acct.key.clone();
        async move {
            server
                .post(&key, "/v1/images/generations")
                .json(&body)
                .call()
                .await
        }
    };
    let (_, e) = expect_error(
        refused(json!({"prompt": "a fox", "model": "dall-e-9"})).await,
        "400 invalid_request_error invalid_value",
    )
    .await;
    assert_eq!(e["param"], "model");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("`dall-e-9`") && message.contains("`poster` and `sketch`"),
        "{message}"
    );
    let (_, e) = expect_error(
        refused(json!({"prompt": "a fox", "model": "poster", "size": "256x256"})).await,
        "400 invalid_request_error invalid_value",
    )
    .await;
    assert_eq!(e["param"], "size");
    assert!(
        e["message"].as_str().unwrap().contains("`1024x1024`"),
        "{e}"
    );
    let (_, e) = expect_error(
        refused(json!({"prompt": "a fox", "model": "poster", "n": 2})).await,
        "400 invalid_request_error invalid_value",
    )
    .await;
    assert_eq!(e["param"], "n");
    // 402 names what was priced.
    let (_, e) = expect_error(
        refused(json!({"prompt": "a fox", "model": "sketch", "n": 2, "size": "256x256"})).await,
        "402 billing_error insufficient_credits",
    )
    .await;
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains(
            "costs 2 credits (2 × 256x256 with `sketch` at 1 credit each) but the balance is 1"
        ),
        "{message}"
    );
    // None of the refusals charged anything.
    assert_eq!(server.balance(&acct.key).await, 1);
}

#[tokio::test]
async fn without_a_catalogue_there_is_one_model_builtin_at_the_default_prices() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(10).await;
    let listed = server.get_json(&acct.key, "/v1/models").await;
    assert_eq!(
        listed["data"],
        json!([{"id": "builtin", "object": "model", "name": "Built-in",
            "prices": {"256x256": 1, "512x512": 2, "1024x1024": 4}, "max_n": 4}])
    );
    let task = server
        .create_task(
            &acct.key,
            json!({"prompt": "a fox", "model": "builtin", "n": 2}),
        )
        .await;
    assert_eq!(
        (&task["model"], &task["cost"]),
        (&json!("builtin"), &json!(4))
    );
}

#[tokio::test]
async fn a_price_change_never_changes_the_cost_of_an_accepted_task() {
    let files = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let one = |price: u64| {
        format!("[models.sketch]\nbackend = \"builtin\"\nprices = {{ \"512x512\" = {price} }}\n")
    };
    let models = catalogue(files.path(), &one(2));
    let models = models.to_str().unwrap();
    // No workers: the task stays queued across the restart.
    let server = TestServer::start_in(data.path(), &["--models", models, "--workers", "0"]);
    let acct = server.account(20).await;
    let queued = server
        .create_task(&acct.key, json!({"prompt": "a fox"}))
        .await;
    assert_eq!(queued["cost"], 2);
    server.stop();

    catalogue(files.path(), &one(7));
    let server = TestServer::start_in(data.path(), &["--models", models]);
    let done = server
        .wait_task(&acct.key, queued["id"].as_str().unwrap())
        .await;
    assert_eq!(
        (&done["status"], &done["cost"]),
        (&json!("succeeded"), &json!(2))
    );
    let (task, _) = server.generate(&acct.key, json!({"prompt": "a fox"})).await;
    assert_eq!(task["cost"], 7);
    let ledger = server.get_json(&acct.key, "/v1/account/ledger").await;
    let charges: Vec<i64> = ledger["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "charge")
        .map(|e| e["delta"].as_i64().unwrap())
        .collect();
    assert_eq!(charges, vec![-7, -2], "{ledger}");
    assert_eq!(server.balance(&acct.key).await, 11);
}

/// An OpenAI-compatible upstream that takes every request and never answers.
async fn hanging_upstream() -> String {
    let app = Router::new().route(
        "/v1/images/generations",
        post(std::future::pending::<&'static str>),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::test]
async fn a_hanging_provider_holds_only_its_own_models_workers() {
    let upstream = hanging_upstream().await;
    let files = tempfile::tempdir().unwrap();
    let models = catalogue(
        files.path(),
        &format!(
            r#"
default = "sketch"

[models.sketch]
backend = "builtin"
prices = {{ "256x256" = 1 }}
concurrency = 1

[models.stuck]
backend = "openai"
url = "{upstream}"
api_key_env = "STUCK_KEY"
prices = {{ "256x256" = 3 }}
concurrency = 2
timeout = "2s"
"#
        ),
    );
    let (_tmp, server) = TestServer::start_with_env(
        &["--models", models.to_str().unwrap()],
        &[("STUCK_KEY", "sk-stuck-provider-key-8d2e")],
    );
    let acct = server.account(100).await;
    // More stuck tasks than the stuck model has slots, queued first.
    let mut stuck = Vec::new();
    for i in 0..3 {
        let task = server
            .create_task(
                &acct.key,
                json!({"prompt": format!("stuck {i}"), "model": "stuck", "size": "256x256"}),
            )
            .await;
        stuck.push(task["id"].as_str().unwrap().to_owned());
    }
    server.wait_until_running(&acct.key, 2).await;
    // The other model's tasks run meanwhile, on their own worker.
    let started = Instant::now();
    for i in 0..3 {
        let (_, done) = server
            .generate(
                &acct.key,
                json!({"prompt": format!("free {i}"), "size": "256x256"}),
            )
            .await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    let stuck_now = server
        .get_json(&acct.key, &format!("/v1/tasks/{}", stuck[0]))
        .await;
    assert_eq!(
        stuck_now["status"],
        "running",
        "the builtin tasks finished while the provider still held its own ({:?})",
        started.elapsed()
    );
    // The stuck ones time out on their model's timeout, and are refunded.
    for id in &stuck {
        let done = server.wait_task(&acct.key, id).await;
        assert_eq!(
            (&done["status"], &done["error"]["code"]),
            (&json!("failed"), &json!("generation_timeout")),
            "{done}"
        );
        assert!(
            done["error"]["message"]
                .as_str()
                .unwrap()
                .contains("within 2 seconds"),
            "{done}"
        );
    }
    assert_eq!(server.balance(&acct.key).await, 100 - 3);
    assert!(!server.logs().contains("sk-stuck-provider-key-8d2e"));
}

#[test]
fn a_bad_catalogue_stops_the_start_with_its_line_and_reason() {
    let files = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[models.a]\nbackend = \"builtin\"\nprices = { \"300x300\" = 1 }\n",
            "line 3",
        ),
        (
            "default = \"b\"\n[models.a]\nbackend = \"builtin\"\nprices = { \"256x256\" = 1 }\n",
            "`default = \"b\"` names no model",
        ),
        (
            "[models.a]\nbackend = \"openai\"\nurl = \"http://127.0.0.1:9\"\napi_key_env = \"TOLLGATE_TEST_NOT_SET\"\nprices = { \"256x256\" = 1 }\n",
            "line 1, [models.a]: `api_key_env`: the variable TOLLGATE_TEST_NOT_SET is not set",
        ),
    ];
    for (text, expected) in cases {
        let models = catalogue(files.path(), text);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--addr", "127.0.0.1:0", "--models"])
            .arg(&models)
            .arg("--data-dir")
            .arg(files.path().join("data"))
            .env("TOLLGATE_ADMIN_TOKEN", "admin-token-for-tests")
            .env_remove("TOLLGATE_TEST_NOT_SET")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text:?} started");
        assert!(
            stderr.contains(expected) && stderr.contains("models.toml"),
            "{text:?}: {stderr}"
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("listening on"),
            "{text:?}"
        );
        // Nothing was opened before the catalogue was checked.
        assert!(!files.path().join("data").exists());
    }
}

#[tokio::test]
async fn the_cli_lists_the_models_and_generates_with_one() {
    let files = tempfile::tempdir().unwrap();
    let models = catalogue(files.path(), TWO_MODELS);
    let (_tmp, server) = TestServer::start(&["--models", models.to_str().unwrap()]);
    let acct = server.account(10).await;
    let cli = |args: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
        command
            .args(args)
            .env("TOLLGATE_BASE_URL", &server.base)
            .env("TOLLGATE_API_KEY", &acct.key);
        async move {
            tokio::task::spawn_blocking(move || command.output().unwrap())
                .await
                .unwrap()
        }
    };
    let out = cli(&["models"]).await;
    assert!(out.status.success(), "{out:?}");
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["data"][0]["id"], "poster");
    assert_eq!(listed["data"][1]["prices"]["256x256"], 1);

    let images = files.path().join("out");
    let out = cli(&[
        "generate",
        "a lighthouse",
        "--model",
        "poster",
        "--out",
        images.to_str().unwrap(),
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read_dir(&images).unwrap().count(), 1);
    assert_eq!(server.balance(&acct.key).await, 5);
    let tasks = server.get_json(&acct.key, "/v1/tasks").await;
    assert_eq!(tasks["data"][0]["model"], "poster");

    // A model the server does not sell: the 400's message, and the usage exit code.
    let out = cli(&["generate", "a lighthouse", "--model", "nope"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("There is no model `nope`"),
        "{out:?}"
    );
}
