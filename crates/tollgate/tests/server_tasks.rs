//! Tasks end to end: lifecycle, real PNGs, pagination, tenant isolation, revocation, idempotency.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{expect_error, Call, TestServer};
use serde_json::{json, Value};

fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let be = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    (be(16), be(20))
}

#[tokio::test]
async fn a_task_runs_to_real_deterministic_pngs() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(100).await;
    let body = json!({"prompt": "a lighthouse at dusk", "n": 2, "size": "256x256", "seed": 7});
    let task = server.create_task(&acct.key, body.clone()).await;
    assert_eq!(task["object"], "task");
    assert_eq!(task["status"], "queued");
    assert_eq!(task["cost"], 2);
    assert_eq!(task["seed"], 7);
    assert!(task["id"].as_str().unwrap().starts_with("task_"));
    assert!(task["expires_at"].as_str().unwrap() > task["created_at"].as_str().unwrap());
    assert_eq!(task["images"], json!([]));
    assert_eq!(task["error"], Value::Null);

    let id = task["id"].as_str().unwrap();
    let done = server.wait_task(&acct.key, id).await;
    assert_eq!(done["status"], "succeeded");
    assert!(done["completed_at"].is_string());
    let images = done["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let url = images[0]["url"].as_str().unwrap();
    assert!(
        url.starts_with(&server.url(&format!("/v1/links/{id}/0.png?expires="))),
        "{url}"
    );
    let response = server
        .get(&acct.key, &format!("/v1/tasks/{id}/images/0"))
        .call()
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers().get("content-type").unwrap(), "image/png");
    let first = response.bytes().await.unwrap();
    assert_eq!(png_size(&first), (256, 256));

    // Same prompt, seed and size: the same image.
    let again = server.create_task(&acct.key, body).await;
    let again_id = again["id"].as_str().unwrap();
    server.wait_task(&acct.key, again_id).await;
    let second = server
        .get(&acct.key, &format!("/v1/tasks/{again_id}/images/0"))
        .call()
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(first, second);

    for bad in ["2", "x", "-1", "999"] {
        let response = server
            .get(&acct.key, &format!("/v1/tasks/{id}/images/{bad}"))
            .call()
            .await;
        expect_error(response, "404 not_found_error resource_not_found").await;
    }
    // Without a seed the server picks one and says which.
    let unseeded = server
        .create_task(&acct.key, json!({"prompt": "anything"}))
        .await;
    assert!(unseeded["seed"].is_i64());
    assert_eq!(unseeded["size"], "512x512");
    assert_eq!(unseeded["n"], 1);
}

#[tokio::test]
async fn listing_is_newest_first_with_a_cursor() {
    let (_tmp, server) = TestServer::start(&["--workers", "0"]);
    let acct = server.account(100).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let task = server
            .create_task(
                &acct.key,
                json!({"prompt": format!("p{i}"), "size": "256x256"}),
            )
            .await;
        ids.push(task["id"].as_str().unwrap().to_owned());
    }
    ids.reverse();
    let page: Value = server.get_json(&acct.key, "/v1/tasks?limit=2").await;
    assert_eq!(page["object"], "list");
    assert_eq!(page["has_more"], true);
    let got: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, ids[..2]);
    let next: Value = server
        .get(&acct.key, &format!("/v1/tasks?limit=2&after={}", got[1]))
        .fetch()
        .await;
    let got: Vec<&str> = next["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, ids[2..4]);
    let last: Value = server
        .get(&acct.key, &format!("/v1/tasks?limit=2&after={}", got[1]))
        .fetch()
        .await;
    assert_eq!(last["has_more"], false);
    assert_eq!(last["data"].as_array().unwrap().len(), 1);

    for query in ["limit=0", "limit=101", "limit=ten"] {
        let response = server
            .get(&acct.key, &format!("/v1/tasks?{query}"))
            .call()
            .await;
        let (_, e) = expect_error(response, "400 invalid_request_error invalid_value").await;
        assert_eq!(e["param"], "limit");
    }
    let response = server
        .get(&acct.key, "/v1/tasks?after=task_unknown")
        .call()
        .await;
    // A well-formed cursor naming nothing: the task it names is not found.
    let (_, e) = expect_error(response, "404 not_found_error resource_not_found").await;
    assert_eq!(e["param"], "after");
}

#[tokio::test]
async fn another_accounts_task_is_404_never_403() {
    let (_tmp, server) = TestServer::start(&[]);
    let alice = server.account(100).await;
    let bob = server.account(100).await;
    let task = server
        .create_task(&alice.key, json!({"prompt": "alice's", "size": "256x256"}))
        .await;
    let id = task["id"].as_str().unwrap();
    server.wait_task(&alice.key, id).await;
    for path in [
        format!("/v1/tasks/{id}"),
        format!("/v1/tasks/{id}/images/0"),
    ] {
        let response = server.get(&bob.key, &path).call().await;
        expect_error(response, "404 not_found_error resource_not_found").await;
    }
    let response = server
        .post(&bob.key, &format!("/v1/tasks/{id}/cancel"))
        .call()
        .await;
    expect_error(response, "404 not_found_error resource_not_found").await;
    let list: Value = server.get_json(&bob.key, "/v1/tasks").await;
    assert_eq!(list["data"], json!([]));
    let response = server
        .get(&bob.key, &format!("/v1/tasks?after={id}"))
        .call()
        .await;
    expect_error(response, "404 not_found_error resource_not_found").await;
    // Alice still sees it.
    assert_eq!(
        server.status(&alice.key, &format!("/v1/tasks/{id}")).await,
        200
    );
}

#[tokio::test]
async fn a_revoked_key_is_refused_on_the_very_next_request() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(10).await;
    let (second_id, second_key) = server.new_key(&acct.id).await;
    let (second_id, second_key) = (second_id.as_str(), second_key.as_str());
    assert!(second_key.starts_with("tg_") && second_key.len() >= 3 + 32);
    assert_eq!(server.status(second_key, "/v1/account").await, 200);

    let response = server
        .admin(
            reqwest::Method::DELETE,
            &format!("/admin/keys/{second_id}"),
            None,
        )
        .await;
    assert_eq!(response.status(), 204);
    let response = server.get(second_key, "/v1/account").call().await;
    expect_error(response, "401 authentication_error invalid_api_key").await;
    // The account's other key is untouched.
    assert_eq!(server.status(&acct.key, "/v1/account").await, 200);
    // Revoking twice: the key is no longer live.
    let response = server
        .admin(
            reqwest::Method::DELETE,
            &format!("/admin/keys/{second_id}"),
            None,
        )
        .await;
    expect_error(response, "404 not_found_error resource_not_found").await;
    // The key list shows both, without secrets.
    let keys = server.keys(&acct.id).await;
    assert_eq!(keys.len(), 2);
    assert!(keys
        .iter()
        .any(|k| k["id"] == second_id && k["revoked_at"].is_string()));
    assert!(!keys.iter().any(|k| k.to_string().contains(second_key)));
}

#[tokio::test]
async fn an_idempotent_retry_replays_and_never_charges_twice_even_after_a_restart() {
    let (tmp, server) = TestServer::start(&["--workers", "0"]);
    let acct = server.account(10).await;
    let body = json!({"prompt": "once", "size": "512x512"});
    let send = |server: &TestServer| {
        server
            .post(&acct.key, "/v1/images/generations")
            .header("Idempotency-Key", "retry-me")
            .json(&body)
            .send()
    };
    let first = send(&server).await.unwrap();
    assert_eq!(first.status(), 202);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    let replay = send(&server).await.unwrap();
    assert_eq!(replay.headers().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(replay.json::<Value>().await.unwrap(), first);
    assert_eq!(server.balance(&acct.key).await, 8);

    server.stop();
    let server = TestServer::start_in(tmp.path(), &["--workers", "0"]);
    let replay = send(&server).await.unwrap();
    assert_eq!(replay.status(), 202);
    assert_eq!(replay.headers().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(replay.json::<Value>().await.unwrap()["id"], first["id"]);
    assert_eq!(server.balance(&acct.key).await, 8);
    // Same key, same body, but a different account: a separate key space.
    let other = server.account(10).await;
    let response = server
        .post(&other.key, "/v1/images/generations")
        .header("Idempotency-Key", "retry-me")
        .json(&body)
        .call()
        .await;
    assert_eq!(response.status(), 202);
    assert_ne!(response.json::<Value>().await.unwrap()["id"], first["id"]);
    // A bad key is a 400 naming the header.
    let response = server
        .post(&acct.key, "/v1/images/generations")
        .header("Idempotency-Key", "x".repeat(256))
        .json(&body)
        .call()
        .await;
    let (_, e) = expect_error(response, "400 invalid_request_error invalid_value").await;
    assert_eq!(e["param"], "Idempotency-Key");
}

#[tokio::test]
async fn a_failed_request_does_not_burn_its_idempotency_key() {
    let (_tmp, server) = TestServer::start(&["--workers", "0"]);
    let acct = server.account(1).await;
    let body = json!({"prompt": "pricey", "size": "1024x1024"});
    let send = || {
        server
            .post(&acct.key, "/v1/images/generations")
            .header("Idempotency-Key", "after-top-up")
            .json(&body)
            .send()
    };
    expect_error(
        send().await.unwrap(),
        "402 billing_error insufficient_credits",
    )
    .await;
    let top_up = json!({"amount": 10});
    server
        .admin(
            reqwest::Method::POST,
            &format!("/admin/accounts/{}/credits", acct.id),
            Some(top_up),
        )
        .await;
    let response = send().await.unwrap();
    assert_eq!(
        response.status(),
        202,
        "the same key works once the account can pay"
    );
    assert_eq!(server.balance(&acct.key).await, 7);
}
