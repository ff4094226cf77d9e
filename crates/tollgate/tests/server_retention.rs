//! Retention: 410 after expiry on every route that names the task, the purge's tombstones,
//! and both across a restart; an id that never existed stays 404.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{expect_error, Call, TestServer};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn expired_tasks_answer_410_before_and_after_purge_and_restart() {
    let (tmp, server) = TestServer::start(&["--retention", "2s"]);
    let acct = server.account(100).await;
    let task = server
        .create_task(
            &acct.key,
            json!({"prompt": "short-lived", "size": "256x256"}),
        )
        .await;
    let id = task["id"].as_str().unwrap().to_owned();
    let done = server.wait_task(&acct.key, &id).await;
    assert_eq!(done["status"], "succeeded");
    let image_dir = tmp.path().join("data").join("images").join(&id);
    assert!(image_dir.join("0.png").exists());

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let routes = [
        ("GET", format!("/v1/tasks/{id}")),
        ("GET", format!("/v1/tasks/{id}/images/0")),
        ("POST", format!("/v1/tasks/{id}/cancel")),
    ];
    let check = |server: &TestServer, key: String| {
        let routes = routes.clone();
        let http = server.http.clone();
        let base = server.base.clone();
        async move {
            for (method, path) in &routes {
                let request = if *method == "GET" {
                    http.get(format!("{base}{path}"))
                } else {
                    http.post(format!("{base}{path}"))
                };
                let response = request.bearer_auth(&key).call().await;
                let (_, e) = expect_error(response, "410 gone_error resource_expired").await;
                assert!(e["message"].as_str().unwrap().contains("has expired"));
            }
        }
    };
    check(&server, acct.key.clone()).await;

    // The purge (every retention/4) removes the images and keeps the tombstone.
    for _ in 0..100 {
        if !image_dir.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!image_dir.exists(), "images purged");
    check(&server, acct.key.clone()).await;
    let never = "/v1/tasks/task_ffffffffffffffffffffffff";
    expect_error(
        server.get(&acct.key, never).call().await,
        "404 not_found_error resource_not_found",
    )
    .await;
    // Expired tasks leave the list.
    let list: serde_json::Value = server.get_json(&acct.key, "/v1/tasks").await;
    assert_eq!(list["data"], json!([]));
    // Another account still gets 404 for it, not 410.
    let other = server.account(1).await;
    let response = server
        .get(&other.key, &format!("/v1/tasks/{id}"))
        .call()
        .await;
    expect_error(response, "404 not_found_error resource_not_found").await;

    // The purge logs its progress.
    server
        .wait_for_log("retention purge removed expired tasks' data")
        .await;
    server.stop();
    // Restart with the default 30-day retention: the tombstone still says 410.
    let server = TestServer::start_in(tmp.path(), &[]);
    check(&server, acct.key.clone()).await;
    expect_error(
        server.get(&acct.key, never).call().await,
        "404 not_found_error resource_not_found",
    )
    .await;
}

#[tokio::test]
async fn a_task_that_expires_in_the_queue_is_refunded() {
    let (_tmp, server) = TestServer::start(&["--retention", "1s", "--workers", "0"]);
    let acct = server.account(10).await;
    server
        .create_task(
            &acct.key,
            json!({"prompt": "never ran", "size": "1024x1024"}),
        )
        .await;
    assert_eq!(server.balance(&acct.key).await, 6);
    let mut balance = 0;
    for _ in 0..100 {
        balance = server.balance(&acct.key).await;
        if balance == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(balance, 10);
}
