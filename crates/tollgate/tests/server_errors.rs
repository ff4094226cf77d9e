//! One test per row of the contract's error table, against the real server over HTTP:
//! status, type, code, and the headers the row names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{expect_error, Call, TestServer, ADMIN_TOKEN};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::test]
async fn row_400_invalid_json_missing_field_invalid_value_with_param() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(100).await;
    let post = |body: &'static str| {
        server
            .post(&acct.key, "/v1/images/generations")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    expect_error(
        post("{\"prompt\": ").await.unwrap(),
        "400 invalid_request_error invalid_json",
    )
    .await;
    expect_error(
        post("").await.unwrap(),
        "400 invalid_request_error invalid_json",
    )
    .await;

    let (_, e) = expect_error(
        post("{}").await.unwrap(),
        "400 invalid_request_error missing_field",
    )
    .await;
    assert_eq!(e["param"], "prompt");

    for (body, param) in [
        (r#"{"prompt":"a cat","n":9}"#, "n"),
        (r#"{"prompt":"a cat","n":"two"}"#, "n"),
        (r#"{"prompt":"a cat","size":"300x300"}"#, "size"),
        (r#"{"prompt":"a cat","seed":"x"}"#, "seed"),
        (r#"{"prompt":""}"#, "prompt"),
        (r#"{"prompt":42}"#, "prompt"),
    ] {
        let (_, e) = expect_error(
            post(body).await.unwrap(),
            "400 invalid_request_error invalid_value",
        )
        .await;
        assert_eq!(e["param"], param, "{body}");
    }
    let long = json!({"prompt": "x".repeat(4001)});
    let response = server
        .post(&acct.key, "/v1/images/generations")
        .json(&long)
        .call()
        .await;
    let (_, e) = expect_error(response, "400 invalid_request_error invalid_value").await;
    assert_eq!(e["param"], "prompt");
    let (_, e) = expect_error(
        post(r#"{"prompt":"a cat","sise":"256x256"}"#)
            .await
            .unwrap(),
        "400 invalid_request_error unknown_field",
    )
    .await;
    assert_eq!(e["param"], "sise");

    // Nothing was charged for any of it.
    assert_eq!(server.balance(&acct.key).await, 100);
}

#[tokio::test]
async fn row_400_idempotency_key_reused() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(100).await;
    let send = |prompt: &str| {
        server
            .post(&acct.key, "/v1/images/generations")
            .header("Idempotency-Key", "order-17")
            .json(&json!({"prompt": prompt, "size": "256x256"}))
            .send()
    };
    assert_eq!(send("a cat").await.unwrap().status(), 202);
    let (_, e) = expect_error(
        send("a dog").await.unwrap(),
        "400 invalid_request_error idempotency_key_reused",
    )
    .await;
    assert_eq!(e["param"], "Idempotency-Key");
    assert_eq!(server.balance(&acct.key).await, 99);
}

#[tokio::test]
async fn row_401_missing_and_invalid_api_key() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(10).await;
    let response = server.http.get(server.url("/v1/account")).call().await;
    let (headers, _) = expect_error(response, "401 authentication_error missing_api_key").await;
    assert_eq!(headers.get("www-authenticate").unwrap(), "Bearer");

    let wrong = format!("{}x", acct.key);
    for key in [wrong.as_str(), "tg_nope", "not-even-a-tollgate-key"] {
        let response = server.get(key, "/v1/account").call().await;
        let (headers, _) = expect_error(response, "401 authentication_error invalid_api_key").await;
        assert_eq!(headers.get("www-authenticate").unwrap(), "Bearer");
    }
    let response = server
        .http
        .get(server.url("/v1/account"))
        .basic_auth("user", Some("pw"))
        .call()
        .await;
    expect_error(response, "401 authentication_error invalid_api_key").await;
    // The operator routes want the admin token, not an API key.
    let response = server.get(&acct.key, "/admin/accounts").call().await;
    expect_error(response, "401 authentication_error invalid_api_key").await;
    let response = server.http.get(server.url("/admin/accounts")).call().await;
    expect_error(response, "401 authentication_error missing_api_key").await;
}

#[tokio::test]
async fn row_402_insufficient_credits_creates_and_charges_nothing() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(3).await;
    let response = server
        .post(&acct.key, "/v1/images/generations")
        .json(&json!({"prompt": "a castle", "n": 1, "size": "1024x1024"}))
        .call()
        .await;
    let (_, e) = expect_error(response, "402 billing_error insufficient_credits").await;
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("costs 4 credits"), "{message}");
    assert!(message.contains("balance is 3"), "{message}");
    assert!(
        message.contains("Dashboard") && message.contains("/dashboard/credits"),
        "{message}"
    );

    assert_eq!(server.balance(&acct.key).await, 3);
    let list: Value = server.get_json(&acct.key, "/v1/tasks").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    let ledger: Value = server.get_json(&acct.key, "/v1/account/ledger").await;
    assert_eq!(
        ledger["data"].as_array().unwrap().len(),
        1,
        "only the opening grant: {ledger}"
    );
}

#[tokio::test]
async fn a_402_for_one_credit_says_credit() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(0).await;
    let response = server
        .post(&acct.key, "/v1/images/generations")
        .json(&json!({"prompt": "a castle", "size": "256x256"}))
        .call()
        .await;
    let (_, e) = expect_error(response, "402 billing_error insufficient_credits").await;
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("costs 1 credit ("), "{message}");
}

#[tokio::test]
async fn row_415_a_body_sent_as_anything_but_json_is_refused_and_nothing_is_created() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(10).await;
    let body = r#"{"prompt": "a castle", "size": "256x256"}"#;
    for content_type in [
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let response = server
            .post(&acct.key, "/v1/images/generations")
            .header("content-type", content_type)
            .body(body)
            .call()
            .await;
        let (_, e) =
            expect_error(response, "415 invalid_request_error unsupported_media_type").await;
        assert_eq!(e["param"], "Content-Type");
        let message = e["message"].as_str().unwrap();
        let essence = content_type.split(';').next().unwrap();
        assert!(message.contains(&format!("not `{essence}`")), "{message}");
        assert!(message.contains("--json"), "{message}");
    }
    assert_eq!(server.balance(&acct.key).await, 10, "nothing charged");
    // JSON with parameters, a `+json` type, and no Content-Type at all are read as JSON.
    for content_type in [
        Some("application/json; charset=utf-8"),
        Some("Application/JSON"),
        Some("application/vnd.api+json"),
        None,
    ] {
        let mut request = server.post(&acct.key, "/v1/images/generations").body(body);
        if let Some(value) = content_type {
            request = request.header("content-type", value);
        }
        let response = request.call().await;
        assert_eq!(response.status(), 202, "{content_type:?}");
    }
    assert_eq!(server.balance(&acct.key).await, 6);
}

#[tokio::test]
async fn an_empty_voucher_code_is_an_invalid_value() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(0).await;
    for code in ["", "   "] {
        let response = server
            .post(&acct.key, "/v1/vouchers/redeem")
            .json(&json!({ "code": code }))
            .call()
            .await;
        let (_, e) = expect_error(response, "400 invalid_request_error invalid_value").await;
        assert_eq!(e["param"], "code");
    }
    // Absent is what `missing_field` is for.
    let response = server
        .post(&acct.key, "/v1/vouchers/redeem")
        .json(&json!({}))
        .call()
        .await;
    expect_error(response, "400 invalid_request_error missing_field").await;
}

#[tokio::test]
async fn a_whole_number_written_as_a_float_is_that_number_and_a_fraction_is_refused() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(100).await;
    // JSON Schema's `integer` takes 2.0, and so do we: Python and JavaScript clients write it.
    let task = server
        .create_task(
            &acct.key,
            json!({"prompt": "a float", "n": 2.0, "size": "256x256", "seed": 7.0}),
        )
        .await;
    assert_eq!(
        (
            task["n"].clone(),
            task["seed"].clone(),
            task["cost"].clone()
        ),
        (json!(2), json!(7), json!(2))
    );
    let response = server
        .post(&acct.key, "/v1/images/generations")
        .json(&json!({"prompt": "a fraction", "n": 1.5}))
        .call()
        .await;
    let (_, e) = expect_error(response, "400 invalid_request_error invalid_value").await;
    assert_eq!(e["param"], "n");
    assert_eq!(server.balance(&acct.key).await, 98);
}

#[tokio::test]
async fn text_with_a_nul_character_is_refused_on_every_field_that_keeps_text() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(100).await;
    let response = server
        .post(&acct.key, "/v1/images/generations")
        .json(&json!({"prompt": "before\u{0}after"}))
        .call()
        .await;
    let (_, e) = expect_error(response, "400 invalid_request_error invalid_value").await;
    assert_eq!(e["param"], "prompt");
    assert!(e["message"].as_str().unwrap().contains("NUL"), "{e}");
    for (path, body, param) in [
        (
            "/admin/accounts".to_owned(),
            json!({"name": "a\u{0}"}),
            "name",
        ),
        (
            format!("/admin/accounts/{}", acct.id),
            json!({"name": "b\u{0}"}),
            "name",
        ),
        (
            format!("/admin/accounts/{}/credits", acct.id),
            json!({"amount": 1, "note": "\u{0}"}),
            "note",
        ),
        (
            "/admin/vouchers".to_owned(),
            json!({"credits": 1, "note": "\u{0}"}),
            "note",
        ),
    ] {
        let method = if param == "name" && path.contains("acct_") {
            reqwest::Method::PATCH
        } else {
            reqwest::Method::POST
        };
        let response = server.admin(method, &path, Some(body)).await;
        let (_, e) = expect_error(response, "400 invalid_request_error invalid_value").await;
        assert_eq!(e["param"], param, "{path}");
    }
    // In a URL (PostgreSQL refuses it in any comparison): no resource has it in its name.
    for path in [
        "/v1/tasks/task_%00",
        "/v1/tasks/task_%00/images/0",
        "/v1/tasks/task_%00/cancel",
    ] {
        let response = server.get(&acct.key, path).call().await;
        expect_error(response, "404 not_found_error resource_not_found").await;
    }
    let response = server
        .admin(reqwest::Method::DELETE, "/admin/keys/key_%00", None)
        .await;
    expect_error(response, "404 not_found_error resource_not_found").await;
    let response = server
        .get(&acct.key, "/v1/tasks?after=task_%00")
        .call()
        .await;
    let (_, e) = expect_error(response, "404 not_found_error resource_not_found").await;
    assert_eq!(e["param"], "after");
    assert_eq!(server.balance(&acct.key).await, 100);
}

#[tokio::test]
async fn row_404_unknown_endpoint_and_resource_not_found() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(10).await;
    for path in ["/v2/images", "/", "/v1/tasks/x/y/z"] {
        let response = server.get(&acct.key, path).call().await;
        expect_error(response, "404 not_found_error unknown_endpoint").await;
    }
    let response = server
        .get(&acct.key, "/v1/tasks/task_000000000000000000000000")
        .call()
        .await;
    expect_error(response, "404 not_found_error resource_not_found").await;
    let response = server
        .admin(reqwest::Method::GET, "/admin/accounts/acct_nope", None)
        .await;
    expect_error(response, "404 not_found_error resource_not_found").await;
    let response = server
        .admin(reqwest::Method::DELETE, "/admin/keys/key_nope", None)
        .await;
    expect_error(response, "404 not_found_error resource_not_found").await;
}

#[tokio::test]
async fn row_405_method_not_allowed_with_allow() {
    let (_tmp, server) = TestServer::start(&[]);
    let response = server.http.put(server.url("/v1/tasks")).call().await;
    let (headers, _) = expect_error(response, "405 invalid_request_error method_not_allowed").await;
    assert!(headers
        .get("allow")
        .unwrap()
        .to_str()
        .unwrap()
        .contains("GET"));
    let response = server
        .http
        .get(server.url("/v1/images/generations"))
        .call()
        .await;
    let (headers, _) = expect_error(response, "405 invalid_request_error method_not_allowed").await;
    assert_eq!(headers.get("allow").unwrap(), "POST");
    let response = server
        .http
        .delete(server.url("/admin/accounts"))
        .bearer_auth(ADMIN_TOKEN)
        .call()
        .await;
    let (headers, _) = expect_error(response, "405 invalid_request_error method_not_allowed").await;
    assert!(headers
        .get("allow")
        .unwrap()
        .to_str()
        .unwrap()
        .contains("POST"));
}

#[tokio::test]
async fn row_409_idempotency_key_in_use_while_the_first_runs() {
    let (_tmp, server) = TestServer::start(&["--simulate-errors"]);
    let acct = server.account(100).await;
    let body = json!({"prompt": "slow one", "size": "256x256"});
    let first = server
        .post(&acct.key, "/v1/images/generations")
        .header("Idempotency-Key", "k-409")
        .header("Tollgate-Simulate-Delay-Ms", "1500")
        .json(&body)
        .send();
    let second = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        server
            .post(&acct.key, "/v1/images/generations")
            .header("Idempotency-Key", "k-409")
            .json(&body)
            .send()
            .await
    };
    let (first, second) = tokio::join!(first, second);
    expect_error(second.unwrap(), "409 conflict_error idempotency_key_in_use").await;
    let first = first.unwrap();
    assert_eq!(first.status(), 202);
    let task: Value = first.json().await.unwrap();
    // Once the first is done, the same request replays it.
    let replay = server
        .post(&acct.key, "/v1/images/generations")
        .header("Idempotency-Key", "k-409")
        .json(&body)
        .call()
        .await;
    assert_eq!(replay.status(), 202);
    assert_eq!(replay.headers().get("idempotent-replayed").unwrap(), "true");
    let again: Value = replay.json().await.unwrap();
    assert_eq!(again["id"], task["id"]);
    assert_eq!(server.balance(&acct.key).await, 99);
}

#[tokio::test]
async fn row_413_body_too_large() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(10).await;
    let big = json!({"prompt": "x".repeat(1024 * 1024 + 10)});
    let response = server
        .post(&acct.key, "/v1/images/generations")
        .json(&big)
        .call()
        .await;
    expect_error(response, "413 invalid_request_error body_too_large").await;
    let response = server
        .post(&acct.key, "/v1/images/generations")
        .header("Idempotency-Key", "big")
        .json(&big)
        .call()
        .await;
    expect_error(response, "413 invalid_request_error body_too_large").await;
    assert_eq!(server.balance(&acct.key).await, 10);
}

#[tokio::test]
async fn row_429_exact_retry_after_and_ratelimit_headers() {
    let (_tmp, server) = TestServer::start(&[]);
    // One request every 2 s, burst 1: the second is refused for just under 2 s.
    let acct = server.account_with_limit(10, 30, 1).await;
    let first = server.get(&acct.key, "/v1/account").call().await;
    assert_eq!(first.status(), 200);
    assert_eq!(
        first.headers().get("ratelimit-policy").unwrap(),
        "\"default\";q=1;w=2"
    );
    assert_eq!(
        first.headers().get("ratelimit").unwrap(),
        "\"default\";r=0;t=2"
    );

    let refused = server.get(&acct.key, "/v1/account").call().await;
    let (headers, e) = expect_error(refused, "429 rate_limit_error rate_limit_exceeded").await;
    let retry_after: u64 = headers
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(retry_after, 2);
    assert!(headers
        .get("ratelimit")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("\"default\";r=0;"));
    assert!(headers.get("ratelimit-policy").is_some());
    assert!(e["message"].as_str().unwrap().contains("2 seconds"));

    // Waiting exactly Retry-After is enough: never earlier than the server can admit.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(server.status(&acct.key, "/v1/account").await, 200);

    // Other accounts are not affected.
    let other = server.account_with_limit(10, 30, 1).await;
    assert_eq!(server.status(&other.key, "/v1/account").await, 200);
}

#[tokio::test]
async fn legacy_x_ratelimit_headers_are_sent_only_when_asked_for_and_say_the_same() {
    let (_tmp, plain) = TestServer::start(&[]);
    let acct = plain.account_with_limit(10, 60, 3).await;
    let response = plain.get(&acct.key, "/v1/account").call().await;
    assert!(response.headers().contains_key("ratelimit"));
    assert!(!response.headers().contains_key("x-ratelimit-limit"));

    let (_tmp, server) = TestServer::start(&["--legacy-ratelimit-headers"]);
    let acct = server.account_with_limit(10, 60, 3).await;
    let header = |r: &reqwest::Response, name: &str| -> i64 {
        r.headers()[name].to_str().unwrap().parse().unwrap()
    };
    let mut remaining = Vec::new();
    for _ in 0..4 {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let response = server.get(&acct.key, "/v1/account").call().await;
        assert!(response.headers()["ratelimit"]
            .to_str()
            .unwrap()
            .contains(";r="));
        assert_eq!(header(&response, "x-ratelimit-limit"), 3);
        let reset = header(&response, "x-ratelimit-reset");
        // One request a second refills: the bucket is full again within the burst's seconds.
        assert!(
            (before..=before + 4).contains(&reset),
            "{reset} vs {before}"
        );
        remaining.push((
            response.status().as_u16(),
            header(&response, "x-ratelimit-remaining"),
        ));
    }
    assert_eq!(remaining, [(200, 2), (200, 1), (200, 0), (429, 0)]);
}

#[tokio::test]
async fn row_429_limits_are_set_by_the_operator_and_apply_at_once() {
    let (_tmp, server) = TestServer::start(&["--default-rpm", "60", "--default-burst", "2"]);
    let response = server
        .admin(
            reqwest::Method::POST,
            "/admin/accounts",
            Some(json!({"name": "defaults"})),
        )
        .await;
    let created: Value = response.json().await.unwrap();
    assert_eq!(
        created["account"]["rate_limit"],
        json!({"requests_per_minute": 60, "burst": 2})
    );
    let key = created["api_key"].as_str().unwrap().to_owned();
    let id = created["account"]["id"].as_str().unwrap().to_owned();
    assert_eq!(server.status(&key, "/v1/account").await, 200);
    assert_eq!(server.status(&key, "/v1/account").await, 200);
    assert_eq!(server.status(&key, "/v1/account").await, 429);

    server.set_rate_limit(&id, 6000, 50).await;
    for _ in 0..20 {
        assert_eq!(server.status(&key, "/v1/account").await, 200);
    }
}

#[tokio::test]
async fn row_500_panic_is_caught_enveloped_and_logged_with_the_request_id() {
    let (_tmp, server) = TestServer::start(&["--simulate-errors"]);
    let acct = server.account(10).await;
    for simulate in ["500", "panic"] {
        let response = server
            .get(&acct.key, "/v1/account")
            .header("Tollgate-Simulate", simulate)
            .call()
            .await;
        let (_, e) = expect_error(response, "500 server_error internal_error").await;
        let request_id = e["request_id"].as_str().unwrap().to_owned();
        // The log has the cause under the request id; the client saw none of it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let logs = server.logs();
        let line = logs
            .lines()
            .find(|l| l.contains(&request_id) && l.contains("ERROR"))
            .unwrap_or_else(|| panic!("{logs}"));
        assert!(line.contains("simulated"), "{line}");
    }
    // The server is still serving.
    assert_eq!(server.status(&acct.key, "/v1/account").await, 200);
}

#[tokio::test]
async fn row_503_simulated_and_on_shutdown_with_retry_after() {
    let (_tmp, mut server) = TestServer::start(&["--simulate-errors"]);
    let acct = server.account(10).await;
    let response = server
        .get(&acct.key, "/v1/account")
        .header("Tollgate-Simulate", "503")
        .call()
        .await;
    let (headers, _) = expect_error(response, "503 server_error service_unavailable").await;
    assert!(
        headers
            .get("retry-after")
            .unwrap()
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    let response = server
        .get(&acct.key, "/v1/account")
        .header("Tollgate-Simulate", "429")
        .call()
        .await;
    let (headers, _) = expect_error(response, "429 rate_limit_error rate_limit_exceeded").await;
    assert_eq!(headers.get("retry-after").unwrap(), "1");

    // Graceful shutdown: an in-flight request finishes; a new one gets 503 with Retry-After.
    let slow = server
        .get(&acct.key, "/v1/account")
        .header("Tollgate-Simulate-Delay-Ms", "1500")
        .send();
    let during = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        server.terminate();
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A fresh client: a new connection, as a new caller would open.
        reqwest::Client::new()
            .get(server.url("/v1/account"))
            .bearer_auth(&acct.key)
            .send()
            .await
    };
    let started = Instant::now();
    let (slow, during) = tokio::join!(slow, during);
    let (headers, _) = expect_error(during.unwrap(), "503 server_error service_unavailable").await;
    assert!(headers.get("retry-after").is_some());
    let slow = slow.unwrap();
    assert_eq!(slow.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(1400));
    let status = server.wait(Duration::from_secs(15));
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_incoming_ids_are_kept() {
    let (_tmp, server) = TestServer::start(&[]);
    for path in [
        "/healthz",
        "/metrics",
        "/openapi.json",
        "/nope",
        "/v1/account",
    ] {
        let response = server.http.get(server.url(path)).call().await;
        let id = response
            .headers()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap();
        assert!(id.starts_with("req_"), "{path}: {id}");
    }
    let response = server
        .http
        .get(server.url("/healthz"))
        .header("X-Request-Id", "trace-abc-123")
        .call()
        .await;
    assert_eq!(
        response.headers().get("x-request-id").unwrap(),
        "trace-abc-123"
    );
    let response = server
        .http
        .get(server.url("/healthz"))
        .header("X-Request-Id", "bad id with spaces")
        .call()
        .await;
    assert_ne!(
        response.headers().get("x-request-id").unwrap(),
        "bad id with spaces"
    );
}

#[tokio::test]
async fn simulation_headers_do_nothing_unless_the_operator_turned_them_on() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(10).await;
    for value in ["500", "503", "429", "panic"] {
        let response = server
            .get(&acct.key, "/v1/account")
            .header("Tollgate-Simulate", value)
            .header("Tollgate-Simulate-Delay-Ms", "5000")
            .call()
            .await;
        assert_eq!(response.status(), 200, "Tollgate-Simulate: {value}");
    }
}
