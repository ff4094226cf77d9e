//! The ledger's promises under load: never negative, never double-charged, every change recorded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{expect_error, Call, TestServer};
use futures_util::future::join_all;
use serde_json::{json, Value};

async fn ledger(server: &TestServer, key: &str) -> Vec<Value> {
    let body: Value = server.get_json(key, "/v1/account/ledger?limit=100").await;
    assert_eq!(body["has_more"], false);
    body["data"].as_array().unwrap().clone()
}

#[tokio::test]
async fn two_hundred_concurrent_creates_against_fifty_credits() {
    // No workers: nothing is refunded meanwhile, so the arithmetic is exact.
    let (_tmp, server) = TestServer::start(&["--workers", "0"]);
    let acct = server.account(50).await;
    let requests = (0..200).map(|i| {
        server
            .post(&acct.key, "/v1/images/generations")
            .json(&json!({"prompt": format!("race {i}"), "size": "256x256"}))
            .send()
    });
    let responses = join_all(requests).await;
    let mut accepted = 0;
    for response in responses {
        let response = response.unwrap();
        match response.status().as_u16() {
            202 => accepted += 1,
            402 => {
                expect_error(response, "402 billing_error insufficient_credits").await;
            }
            other => panic!("unexpected {other}: {}", response.text().await.unwrap()),
        }
    }
    assert_eq!(accepted, 50, "exactly as many tasks as the credits pay for");
    assert_eq!(server.balance(&acct.key).await, 0);

    let entries = ledger(&server, &acct.key).await;
    let charges: Vec<&Value> = entries.iter().filter(|e| e["kind"] == "charge").collect();
    assert_eq!(charges.len(), 50);
    let sum: i64 = entries.iter().map(|e| e["delta"].as_i64().unwrap()).sum();
    assert_eq!(sum, 0, "grant 50 minus 50 charges");
    assert!(entries
        .iter()
        .all(|e| e["balance_after"].as_i64().unwrap() >= 0));

    let tasks: Value = server.get_json(&acct.key, "/v1/tasks?limit=100").await;
    let tasks = tasks["data"].as_array().unwrap();
    assert_eq!(tasks.len(), 50);
    // Every task has exactly one charge, and every charge names a task.
    let mut charged: Vec<&str> = charges
        .iter()
        .map(|e| e["task_id"].as_str().unwrap())
        .collect();
    let mut listed: Vec<&str> = tasks.iter().map(|t| t["id"].as_str().unwrap()).collect();
    charged.sort_unstable();
    listed.sort_unstable();
    assert_eq!(charged, listed);
}

#[tokio::test]
async fn cancel_refunds_a_queued_task_once() {
    let (_tmp, server) = TestServer::start(&["--workers", "0"]);
    let acct = server.account(10).await;
    let task = server
        .create_task(
            &acct.key,
            json!({"prompt": "to cancel", "n": 2, "size": "512x512"}),
        )
        .await;
    assert_eq!(task["cost"], 4);
    assert_eq!(server.balance(&acct.key).await, 6);
    let id = task["id"].as_str().unwrap();
    for _ in 0..2 {
        let response = server
            .post(&acct.key, &format!("/v1/tasks/{id}/cancel"))
            .call()
            .await;
        assert_eq!(response.status(), 200);
        let canceled: Value = response.json().await.unwrap();
        assert_eq!(canceled["status"], "canceled");
    }
    assert_eq!(
        server.balance(&acct.key).await,
        10,
        "refunded once, not twice"
    );
    let entries = ledger(&server, &acct.key).await;
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["refund", "charge", "grant"]);
}

#[tokio::test]
async fn a_finished_task_cannot_be_cancelled_and_keeps_its_charge() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(10).await;
    let task = server
        .create_task(&acct.key, json!({"prompt": "quick", "size": "256x256"}))
        .await;
    let id = task["id"].as_str().unwrap();
    let done = server.wait_task(&acct.key, id).await;
    assert_eq!(done["status"], "succeeded");
    let response = server
        .post(&acct.key, &format!("/v1/tasks/{id}/cancel"))
        .call()
        .await;
    expect_error(response, "409 conflict_error task_not_cancelable").await;
    assert_eq!(server.balance(&acct.key).await, 9);
}

#[tokio::test]
async fn operator_grants_and_corrections_are_ledger_entries_and_never_overdraw() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(5).await;
    let path = format!("/admin/accounts/{}/credits", acct.id);
    let response = server
        .admin(
            reqwest::Method::POST,
            &path,
            Some(json!({"amount": 50, "note": "top-up"})),
        )
        .await;
    assert_eq!(response.status(), 200);
    let account: Value = response.json().await.unwrap();
    assert_eq!(account["credits"], 55);
    let response = server
        .admin(reqwest::Method::POST, &path, Some(json!({"amount": -60})))
        .await;
    // Well formed, but the balance cannot take it.
    let (_, e) = expect_error(response, "409 conflict_error balance_out_of_range").await;
    assert_eq!(e["param"], "amount");
    let response = server
        .admin(
            reqwest::Method::POST,
            &path,
            Some(json!({"amount": -5, "note": "correction"})),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(server.balance(&acct.key).await, 50);
    let entries = ledger(&server, &acct.key).await;
    let notes: Vec<&str> = entries
        .iter()
        .map(|e| e["note"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(notes, vec!["correction", "top-up", "opening balance"]);
    let response = server
        .admin(
            reqwest::Method::POST,
            &path,
            Some(json!({"amount": "lots"})),
        )
        .await;
    let (_, e) = expect_error(response, "400 invalid_request_error invalid_value").await;
    assert_eq!(e["param"], "amount");
}

#[tokio::test]
async fn the_ledger_pages_with_after_on_both_routes() {
    let (_tmp, server) = TestServer::start(&["--workers", "0"]);
    let acct = server.account(3).await;
    for i in 0..4 {
        let path = format!("/admin/accounts/{}/credits", acct.id);
        let topped = server
            .admin(
                reqwest::Method::POST,
                &path,
                Some(json!({"amount": 1, "note": format!("n{i}")})),
            )
            .await;
        assert_eq!(topped.status(), 200);
    }
    for base in [
        "/v1/account/ledger".to_owned(),
        format!("/admin/accounts/{}/ledger", acct.id),
    ] {
        let get = |path: String| {
            let server = &server;
            let key = acct.key.clone();
            async move {
                let request = if path.starts_with("/admin") {
                    server
                        .http
                        .get(server.url(&path))
                        .bearer_auth(common::ADMIN_TOKEN)
                } else {
                    server.get(&key, &path)
                };
                request.fetch().await
            }
        };
        let first = get(format!("{base}?limit=3")).await;
        assert_eq!(first["has_more"], true, "{first}");
        let last_id = first["data"][2]["id"].as_i64().unwrap();
        let second = get(format!("{base}?limit=3&after={last_id}")).await;
        assert_eq!(second["has_more"], false, "{second}");
        let notes: Vec<&str> = first["data"]
            .as_array()
            .unwrap()
            .iter()
            .chain(second["data"].as_array().unwrap())
            .map(|e| e["note"].as_str().unwrap())
            .collect();
        assert_eq!(notes, ["n3", "n2", "n1", "n0", "opening balance"]);
    }
    let bad = server
        .get(&acct.key, "/v1/account/ledger?after=le_1")
        .call()
        .await;
    let (_, error) = expect_error(bad, "400 invalid_request_error invalid_value").await;
    assert_eq!(error["param"], "after");
}

#[tokio::test]
async fn balances_stay_within_what_a_javascript_number_holds_exactly() {
    let (_tmp, server) = TestServer::start(&[]);
    const MAX: u64 = (1 << 53) - 1;
    let response = server
        .admin(
            reqwest::Method::POST,
            "/admin/accounts",
            Some(json!({"name": "big", "credits": MAX + 1})),
        )
        .await;
    let (_, e) = expect_error(response, "400 invalid_request_error invalid_value").await;
    assert_eq!(e["param"], "credits");
    let acct = server.account(MAX - 5).await;
    let path = format!("/admin/accounts/{}/credits", acct.id);
    let response = server
        .admin(
            reqwest::Method::POST,
            &path,
            Some(json!({"amount": i64::MAX})),
        )
        .await;
    let (_, e) = expect_error(response, "400 invalid_request_error invalid_value").await;
    assert_eq!(e["param"], "amount");
    // Within the bound for an amount, but not for this balance: the account refuses it.
    let response = server
        .admin(reqwest::Method::POST, &path, Some(json!({"amount": 6})))
        .await;
    let (_, e) = expect_error(response, "409 conflict_error balance_out_of_range").await;
    assert!(
        e["message"].as_str().unwrap().contains("largest balance"),
        "{e}"
    );
    let response = server
        .admin(reqwest::Method::POST, &path, Some(json!({"amount": 5})))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(server.balance(&acct.key).await, MAX);
}
