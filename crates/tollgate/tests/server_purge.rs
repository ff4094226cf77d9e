//! A purge interrupted by a crash resumes: the state a crash leaves between deleting a batch's
//! images and marking its tombstones (some image directories gone, no task marked) is finished
//! on the next start, and every task ends a tombstone answering 410, across another restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{expect_error, Call, TestServer};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_purge_interrupted_between_images_and_tombstones_resumes_on_restart() {
    let (tmp, server) = TestServer::start(&[]);
    let acct = server.account(100).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let task = server
            .create_task(
                &acct.key,
                json!({"prompt": format!("kept a while {i}"), "size": "256x256", "n": 2}),
            )
            .await;
        ids.push(task["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        assert_eq!(server.wait_task(&acct.key, id).await["status"], "succeeded");
    }
    let balance = server.balance(&acct.key).await;
    server.stop();

    // What a crash mid-batch leaves: the images of half the batch deleted, no tombstone marked
    // (the purge deletes images first and marks tombstones after, per batch).
    let images = tmp.path().join("data").join("images");
    for id in &ids[..3] {
        std::fs::remove_dir_all(images.join(id)).unwrap();
    }
    // And a half-written file in another task's directory.
    std::fs::write(images.join(&ids[3]).join("1.png.tmp"), b"partial").unwrap();

    // Restart with a retention that every task is past: the purge finds them all again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let server = TestServer::start_in(tmp.path(), &["--retention", "1s"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while ids.iter().any(|id| images.join(id).exists()) {
        assert!(Instant::now() < deadline, "the purge did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in &ids {
        for path in [
            format!("/v1/tasks/{id}"),
            format!("/v1/tasks/{id}/images/0"),
        ] {
            let response = server.get(&acct.key, &path).call().await;
            expect_error(response, "410 gone_error resource_expired").await;
        }
    }
    // Its progress is in the log.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.logs().contains("retention purge") {
        assert!(Instant::now() < deadline, "{}", server.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        server.logs().contains("purged_so_far=6"),
        "{}",
        server.logs()
    );
    // Finished tasks are not refunded by the purge: the balance is what it was.
    assert_eq!(server.balance(&acct.key).await, balance);
    server.stop();

    // The tombstones stay: with the default retention again, still 410, never 404.
    let server = TestServer::start_in(tmp.path(), &[]);
    for id in &ids {
        let response = server
            .get(&acct.key, &format!("/v1/tasks/{id}"))
            .call()
            .await;
        expect_error(response, "410 gone_error resource_expired").await;
    }
    assert!(ids.iter().all(|id| !images.join(id).exists()));
}

#[tokio::test]
async fn images_of_tasks_the_store_does_not_have_are_swept_at_start() {
    let (tmp, server) = TestServer::start(&[]);
    let acct = server.account(10).await;
    let task = server
        .create_task(&acct.key, json!({"prompt": "kept", "size": "256x256"}))
        .await;
    let id = task["id"].as_str().unwrap().to_owned();
    server.wait_task(&acct.key, &id).await;
    server.stop();
    // What a run whose task never committed would leave behind.
    let images = tmp.path().join("data").join("images");
    let orphan = images.join("task_0000000000000000deadbeef");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("0.png"), b"not a task's").unwrap();

    let server = TestServer::start_in(tmp.path(), &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while orphan.exists() {
        assert!(Instant::now() < deadline, "the orphan was not swept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(server
        .logs()
        .contains("removed the images of tasks the store does not have"));
    let png = server
        .get(&acct.key, &format!("/v1/tasks/{id}/images/0"))
        .call()
        .await;
    assert_eq!(png.status(), 200, "a real task's images stay");
}
