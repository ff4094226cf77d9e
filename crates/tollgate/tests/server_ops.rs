//! Operability: health, Prometheus metrics, and an OpenAPI document that matches the server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Call, TestServer};
use serde_json::{json, Value};

#[tokio::test]
async fn healthz_and_metrics() {
    let (_tmp, server) = TestServer::start(&[]);
    let health: Value = server.http.get(server.url("/healthz")).fetch().await;
    assert_eq!(health, json!({"status": "ok"}));

    let acct = server.account_with_limit(100, 60, 1).await;
    let task = server
        .create_task(&acct.key, json!({"prompt": "metered", "size": "256x256"}))
        .await;
    let _ = server.get(&acct.key, "/v1/account").call().await; // 429
    server
        .wait_task(&acct.key, task["id"].as_str().unwrap())
        .await;

    let response = server.http.get(server.url("/metrics")).call().await;
    assert!(response
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = response.text().await.unwrap();
    for needle in [
        "tollgate_http_requests_total{route=\"/v1/images/generations\",method=\"POST\",status=\"202\"} 1",
        "tollgate_rate_limit_rejections_total",
        "tollgate_credits_charged_total 1",
        "tollgate_credits_refunded_total 0",
        "tollgate_task_queue_depth",
        "tollgate_task_duration_seconds_count 1",
        "tollgate_tasks_finished_total{status=\"succeeded\"} 1",
        "tollgate_http_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    let rejected: f64 = text
        .lines()
        .find(|l| l.starts_with("tollgate_rate_limit_rejections_total"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap()
        .parse()
        .unwrap();
    assert!(rejected >= 1.0);
}

/// Every route and every error status the contract names is in the document, and the statuses
/// the server actually sends (as the other tests see them) are documented for their operation.
#[tokio::test]
async fn openapi_documents_every_route_and_error_response() {
    let (_tmp, server) = TestServer::start(&[]);
    let doc: Value = server.http.get(server.url("/openapi.json")).fetch().await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let expected: &[(&str, &str, &[&str])] = &[
        (
            "post",
            "/v1/images/generations",
            &[
                "202", "400", "401", "402", "409", "413", "429", "500", "503",
            ],
        ),
        (
            "get",
            "/v1/tasks/{id}",
            &["200", "401", "404", "410", "429"],
        ),
        ("get", "/v1/tasks", &["200", "400", "401", "429"]),
        (
            "post",
            "/v1/tasks/{id}/cancel",
            &["200", "401", "404", "409", "410", "429"],
        ),
        (
            "get",
            "/v1/tasks/{id}/images/{index}",
            &["200", "401", "404", "410", "429"],
        ),
        ("get", "/v1/account", &["200", "401", "429"]),
        ("get", "/v1/account/ledger", &["200", "400", "401", "429"]),
        ("get", "/v1/account/webhook-secret", &["200", "401", "429"]),
        (
            "post",
            "/v1/account/webhook-secret",
            &["200", "401", "409", "429"],
        ),
        ("get", "/v1/models", &["200", "401", "429"]),
        ("post", "/admin/accounts", &["201", "400", "401"]),
        ("get", "/admin/accounts", &["200", "401"]),
        ("get", "/admin/accounts/{id}", &["200", "401", "404"]),
        (
            "patch",
            "/admin/accounts/{id}",
            &["200", "400", "401", "404"],
        ),
        ("post", "/admin/accounts/{id}/keys", &["201", "401", "404"]),
        ("get", "/admin/accounts/{id}/keys", &["200", "401", "404"]),
        ("delete", "/admin/keys/{key_id}", &["204", "401", "404"]),
        (
            "post",
            "/admin/accounts/{id}/credits",
            &["200", "400", "401", "404"],
        ),
        (
            "get",
            "/admin/accounts/{id}/ledger",
            &["200", "400", "401", "404"],
        ),
        (
            "get",
            "/admin/accounts/{id}/purchases",
            &["200", "401", "404"],
        ),
        ("get", "/v1/billing/packs", &["200", "401", "429"]),
        (
            "post",
            "/v1/billing/checkout",
            &["201", "400", "401", "404", "429", "503"],
        ),
        ("post", "/webhooks/stripe", &["200", "400", "404", "503"]),
        ("post", "/admin/vouchers", &["201", "400", "401"]),
        ("get", "/admin/vouchers", &["200", "400", "401"]),
        (
            "post",
            "/v1/vouchers/redeem",
            &["200", "400", "401", "404", "409", "410", "429"],
        ),
        ("get", "/v1/links/{task_id}/{file}", &["200", "404", "410"]),
        ("get", "/healthz", &["200", "503"]),
        ("get", "/readyz", &["200", "503"]),
        ("get", "/metrics", &["200"]),
        ("get", "/openapi.json", &["200"]),
    ];
    let paths = doc["paths"].as_object().unwrap();
    let mut documented = 0;
    for (path, item) in paths {
        documented += item.as_object().unwrap().len();
        assert!(
            expected.iter().any(|(_, p, _)| p == path),
            "{path} is documented but not tested here"
        );
    }
    assert_eq!(documented, expected.len(), "one operation per route");
    for (method, path, statuses) in expected {
        let operation = &doc["paths"][path][method];
        assert!(operation.is_object(), "{method} {path} missing");
        for status in *statuses {
            let response = &operation["responses"][status];
            assert!(response.is_object(), "{method} {path} {status} missing");
            if status.starts_with('4') || status.starts_with('5') {
                let schema = &response["content"]["application/json"]["schema"]["$ref"];
                assert_eq!(
                    schema, "#/components/schemas/ErrorBody",
                    "{method} {path} {status}"
                );
            }
        }
        // The route really exists on the server: no 404 unknown_endpoint / 405 for it.
        let url = server.url(
            &path
                .replace("{id}", "x")
                .replace("{key_id}", "x")
                .replace("{index}", "0"),
        );
        let request = server
            .http
            .request(method.to_uppercase().parse().unwrap(), url);
        let response = request.call().await;
        assert_ne!(response.status(), 405, "{method} {path}");
        if response.status() == 404 {
            let body: Value = response.json().await.unwrap();
            assert_ne!(body["error"]["code"], "unknown_endpoint", "{method} {path}");
        }
    }
    let error_body = &doc["components"]["schemas"]["ErrorBody"];
    assert!(error_body.is_object());
    assert!(doc["components"]["securitySchemes"]["api_key"].is_object());
}

/// A SIGTERM sent the moment the server says it listens (as a supervisor may) drains it and it
/// exits 0: its signal handlers are in place before it prints the address. (They were once
/// installed on the first poll of the shutdown future, and such a SIGTERM killed the process.)
#[tokio::test]
async fn a_sigterm_right_after_the_listening_line_is_a_clean_shutdown() {
    for _ in 0..20 {
        let (_tmp, mut server) = TestServer::start(&[]);
        server.terminate();
        let status = server.wait(std::time::Duration::from_secs(10));
        assert!(status.success(), "{status}: {}", server.logs());
    }
}
