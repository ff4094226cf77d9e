//! Images on S3-compatible storage (`--image-store s3://bucket/prefix`), against a real local S3
//! server: moto's (PyPI; `scripts/test` installs it beside TOLLGATE_TEST_PYTHON), one per test.
//! Two instances with no disk in common serve each other's images; the store's objects are where
//! the prefix says; a bucket that stops answering is a 503 with Retry-After, a task waits in the
//! queue rather than fail, and both recover when the bucket answers again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{expect_error, free_port, skip, unique, Call, TestServer};
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tollgate_server::config::S3Config;
use tollgate_server::images::{ImageStore, S3ImageStore};

/// A moto S3 server on a port of its own, with one bucket; killed on drop.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    async fn start(bucket: &str) -> Option<Moto> {
        let python = common::test_python("S3 image storage on moto")?;
        let program = python.with_file_name("moto_server");
        if !program.exists() {
            skip("S3 image storage on moto: no moto_server beside TOLLGATE_TEST_PYTHON");
            return None;
        }
        let port = free_port().to_string();
        let child = Command::new(program)
            .args(["-H", "127.0.0.1", "-p", &port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        for _ in 0..200 {
            // CreateBucket: PUT /{bucket}, path style.
            if let Ok(r) = http.put(format!("{}/{bucket}", moto.endpoint)).send().await {
                assert!(r.status().is_success(), "CreateBucket: {}", r.status());
                return Some(moto);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("moto did not start on {}", moto.endpoint);
    }

    /// The keys under `prefix` (ListObjectsV2).
    async fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let xml = reqwest::get(format!(
            "{}/{bucket}?list-type=2&prefix={prefix}",
            self.endpoint
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
        xml.split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split("</Key>").next())
            .map(str::to_owned)
            .collect()
    }

    /// Freezes the server (SIGSTOP): connections open, no answers, as a bucket that hangs.
    fn pause(&self) {
        signal(&self.child, "-STOP");
    }

    fn resume(&self) {
        signal(&self.child, "-CONT");
    }
}

fn signal(child: &Child, which: &str) {
    let status = Command::new("kill")
        .args([which, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

impl Drop for Moto {
    fn drop(&mut self) {
        signal(&self.child, "-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The standard AWS variables a deployment would set (moto takes any credentials).
const AWS_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "tollgate-test"),
    ("AWS_SECRET_ACCESS_KEY", "tollgate-test-secret"),
    ("AWS_REGION", "us-east-1"),
];

#[tokio::test]
async fn two_instances_without_a_shared_disk_serve_each_others_images_from_one_bucket() {
    let (Ok(database), Ok(redis)) = (
        std::env::var("TOLLGATE_TEST_DATABASE_URL"),
        std::env::var("TOLLGATE_TEST_REDIS_URL"),
    ) else {
        skip("S3 image storage shared by two instances (TOLLGATE_TEST_DATABASE_URL / TOLLGATE_TEST_REDIS_URL not set)");
        return;
    };
    let Some(moto) = Moto::start("shared").await else {
        return;
    };
    let schema = unique("tg_s3");
    let shared = |workers: &'static str| {
        vec![
            "--database-url".to_owned(),
            database.clone(),
            "--database-schema".to_owned(),
            schema.clone(),
            "--redis-url".to_owned(),
            redis.clone(),
            "--workers".to_owned(),
            workers.to_owned(),
            "--image-store".to_owned(),
            "s3://shared/deploy/images".to_owned(),
            "--s3-endpoint".to_owned(),
            moto.endpoint.clone(),
        ]
    };
    let (a_args, b_args) = (shared("2"), shared("0"));
    let a_args: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    // Separate data directories: the only place the images can be shared is the bucket.
    let (_a_dir, a) = TestServer::start_with_env(&a_args, &AWS_ENV);
    let (_b_dir, b) = TestServer::start_with_env(&b_args, &AWS_ENV);
    let acct = b.account(100).await;
    // Made on B, which runs no workers: A generates it and puts its images in the bucket.
    let (_, done) = b
        .generate(
            &acct.key,
            json!({"prompt": "a shared bucket", "n": 2, "size": "256x256"}),
        )
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let id = done["id"].as_str().unwrap().to_owned();
    let mut keys = moto.keys("shared", "deploy/images/").await;
    keys.sort();
    assert_eq!(
        keys,
        [
            format!("deploy/images/{id}/0.png"),
            format!("deploy/images/{id}/1.png")
        ]
    );
    for server in [&a, &b] {
        for index in 0..2 {
            let png = server
                .get(&acct.key, &format!("/v1/tasks/{id}/images/{index}"))
                .call()
                .await;
            assert_eq!(png.status(), 200);
            assert!(png.bytes().await.unwrap().starts_with(b"\x89PNG\r\n\x1a\n"));
        }
    }
    // The signed link B handed out works on A, with no key, as a browser would fetch it.
    let link = done["images"][1]["url"].as_str().unwrap();
    let on_a = link.replacen(&b.base, &a.base, 1);
    let fetched = reqwest::get(&on_a).await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.headers()["content-type"], "image/png");
    drop((a, b));
    common::drop_schema(&database, &schema);
}

#[tokio::test]
async fn a_bucket_that_stops_answering_is_a_503_and_both_recover_when_it_answers() {
    let Some(moto) = Moto::start("faults").await else {
        return;
    };
    let (_dir, server) = TestServer::start_with_env(
        &[
            "--image-store",
            "s3://faults",
            "--s3-endpoint",
            &moto.endpoint,
            "--image-store-timeout",
            "1s",
        ],
        &AWS_ENV,
    );
    let acct = server.account(100).await;
    let (_, before) = server
        .generate(&acct.key, json!({"prompt": "before", "size": "256x256"}))
        .await;
    assert_eq!(before["status"], "succeeded", "{before}");
    let before_id = before["id"].as_str().unwrap().to_owned();

    moto.pause();
    let response = server
        .get(&acct.key, &format!("/v1/tasks/{before_id}/images/0"))
        .call()
        .await;
    let (headers, _) = expect_error(response, "503 server_error service_unavailable").await;
    assert!(headers.contains_key("retry-after"));
    // Accepted and charged (nothing of a create touches the bucket), then it waits in the queue.
    let during = server
        .create_task(&acct.key, json!({"prompt": "during", "size": "256x256"}))
        .await;
    let during_id = during["id"].as_str().unwrap().to_owned();
    server.wait_for_log("could not store a task's images").await;
    let task = server
        .get_json(&acct.key, &format!("/v1/tasks/{during_id}"))
        .await;
    assert!(
        matches!(task["status"].as_str(), Some("queued" | "running")),
        "{task}"
    );
    assert_eq!(server.balance(&acct.key).await, 98);

    moto.resume();
    let task = server.wait_task(&acct.key, &during_id).await;
    assert_eq!(task["status"], "succeeded", "{task}");
    for id in [&before_id, &during_id] {
        let png = server
            .get(&acct.key, &format!("/v1/tasks/{id}/images/0"))
            .call()
            .await;
        assert_eq!(png.status(), 200);
    }
    assert_eq!(
        server.balance(&acct.key).await,
        98,
        "charged once each, refunded nothing"
    );
}

#[tokio::test]
async fn the_store_puts_reads_lists_and_deletes_under_its_prefix() {
    let Some(moto) = Moto::start("direct").await else {
        return;
    };
    for (name, value) in AWS_ENV {
        // Read by the store's builder (the standard variables); this process is the test's own.
        std::env::set_var(name, value);
    }
    let store = S3ImageStore::new(&S3Config {
        bucket: "direct".into(),
        prefix: "p/q".into(),
        endpoint: Some(moto.endpoint.clone()),
        timeout: Duration::from_secs(5),
    })
    .unwrap();
    store.put("task_a", 0, b"zero".to_vec()).await.unwrap();
    store.put("task_a", 1, b"one".to_vec()).await.unwrap();
    store.put("task_b", 0, b"other".to_vec()).await.unwrap();
    assert_eq!(store.get("task_a", 1).await.unwrap().unwrap(), b"one");
    assert_eq!(store.get("task_a", 2).await.unwrap(), None);
    let mut ids = store.task_ids().await.unwrap();
    ids.sort();
    assert_eq!(ids, ["task_a", "task_b"]);
    store.delete_task("task_a").await.unwrap();
    store.delete_task("task_never").await.unwrap();
    assert_eq!(store.get("task_a", 0).await.unwrap(), None);
    assert_eq!(moto.keys("direct", "").await, ["p/q/task_b/0.png"]);
}
