//! The SDK against a scripted HTTP server on a real socket: attempt counts, one `Idempotency-Key`
//! per call on every attempt, no retry after a final status, the budget, deadlines, the host pause
//! and the routes of every typed method.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant, SystemTime};

use support::{task_json, Reply, ScriptedServer};
use tollgate_client::{
    AddCreditsRequest, Client, ClientBuilder, CreateAccountRequest, CreateGenerationRequest,
    ErrorCode, ErrorKind, ImageSize, ListParams, RetryBudgetConfig, RetryPolicy, StopReason,
    TaskStatus, TransportKind, UpdateAccountRequest,
};

const EMPTY_LIST: &str = r#"{"object":"list","data":[],"has_more":false}"#;
const KEY: &str = "tg_test_0123456789abcdef_secret";

/// The seed's policy scaled down 100×, so a test waits milliseconds instead of seconds.
fn fast_policy() -> RetryPolicy {
    RetryPolicy {
        base: Duration::from_millis(10),
        cap: Duration::from_millis(300),
        max_jitter: Duration::from_millis(10),
        ..RetryPolicy::default()
    }
}

fn fast(server: &ScriptedServer) -> ClientBuilder {
    Client::builder(&server.base_url)
        .api_key(KEY)
        .retry_policy(fast_policy())
}

fn accepted() -> Reply {
    Reply::json(202, task_json("task_1", "queued"))
}

fn account_json() -> String {
    r#"{"id":"acct_1","name":"acme","credits":10,"rate_limit":{"requests_per_minute":60,"burst":10}}"#.to_owned()
}

#[tokio::test]
async fn a_post_is_retried_with_the_same_idempotency_key_on_every_attempt() {
    let server = ScriptedServer::start(
        vec![
            Reply::error(ErrorCode::ServiceUnavailable),
            Reply::Close,
            Reply::error(ErrorCode::InternalError),
            accepted(),
        ],
        Reply::error(ErrorCode::InternalError),
    )
    .await;
    let client = fast(&server).build().unwrap();
    let request = CreateGenerationRequest {
        n: Some(2),
        size: Some(ImageSize::S256),
        ..CreateGenerationRequest::new("a cat")
    };
    let task = client.create_generation(&request).await.unwrap();
    assert_eq!(task.id, "task_1");
    assert_eq!(task.status, TaskStatus::Queued);

    let reqs = server.requests();
    assert_eq!(reqs.len(), 4);
    let key = reqs[0].header("idempotency-key").unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&key).is_ok(), "{key}");
    for r in &reqs {
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("POST", "/v1/images/generations")
        );
        assert_eq!(r.header("idempotency-key"), Some(key.as_str()));
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {KEY}").as_str())
        );
        assert_eq!(r.header("content-type"), Some("application/json"));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"prompt": "a cat", "n": 2, "size": "256x256"})
        );
    }

    // The next call is another request: another key.
    server.set_script(vec![accepted()]);
    client.create_generation(&request).await.unwrap();
    let next = server.requests()[4]
        .header("idempotency-key")
        .unwrap()
        .to_owned();
    assert_ne!(next, key);
}

#[tokio::test]
async fn the_callers_key_is_kept_and_409_in_use_is_retried() {
    let server = ScriptedServer::start(
        vec![
            Reply::error(ErrorCode::IdempotencyKeyInUse),
            Reply::Close,
            accepted(),
        ],
        Reply::error(ErrorCode::InternalError),
    )
    .await;
    let client = fast(&server).build().unwrap();
    client
        .create_generation_with_key(&CreateGenerationRequest::new("a cat"), "order-42")
        .await
        .unwrap();
    let keys: Vec<_> = server
        .requests()
        .iter()
        .map(|r| r.header("idempotency-key").unwrap().to_owned())
        .collect();
    assert_eq!(keys, vec!["order-42"; 3]);

    let bad = client
        .create_generation_with_key(&CreateGenerationRequest::new("a cat"), "")
        .await
        .unwrap_err();
    assert!(matches!(bad.kind(), ErrorKind::Config(_)));
    assert_eq!(server.count(), 3, "an invalid key sends nothing");
}

#[tokio::test]
async fn final_statuses_are_never_retried() {
    for code in [
        ErrorCode::InvalidValue,
        ErrorCode::InvalidApiKey,
        ErrorCode::InsufficientCredits,
        ErrorCode::ResourceNotFound,
        ErrorCode::ResourceExpired,
        ErrorCode::MethodNotAllowed,
        ErrorCode::BodyTooLarge,
        ErrorCode::IdempotencyKeyReused,
    ] {
        let server = ScriptedServer::start(vec![Reply::error(code)], accepted()).await;
        let client = fast(&server).build().unwrap();
        let e = client
            .create_generation(&CreateGenerationRequest::new("a cat"))
            .await
            .unwrap_err();
        assert_eq!(server.count(), 1, "{code}");
        assert_eq!(e.status(), Some(code.status()), "{code}");
        assert_eq!(e.error_code(), Some(code));
        assert_eq!(e.request_id(), Some(format!("req_{code}").as_str()));
        assert_eq!(e.attempts(), 1);
        assert_eq!(e.stop_reason(), StopReason::NotRetryable);
        assert!(!e.is_retryable());
        let line = e.to_string();
        assert!(
            line.contains(&format!("req_{code}")) && line.contains("1 attempt"),
            "{line}"
        );
        assert!(!line.contains(KEY) && !format!("{e:?}").contains(KEY));
    }
}

#[tokio::test]
async fn gives_up_after_five_retries_and_says_how_many_attempts() {
    let server = ScriptedServer::start(vec![], Reply::error(ErrorCode::ServiceUnavailable)).await;
    let client = fast(&server).build().unwrap();
    let e = client.account().await.unwrap_err();
    assert_eq!(server.count(), 6);
    assert_eq!(e.attempts(), 6);
    assert_eq!(e.stop_reason(), StopReason::RetriesExhausted);
    assert_eq!(e.code(), Some("service_unavailable"));
    assert!(
        e.to_string().contains("6 attempts: retries exhausted"),
        "{e}"
    );
    assert!(e.history().iter().all(|r| r.status == Some(503)));
    // GETs carry no Idempotency-Key.
    assert!(server
        .requests()
        .iter()
        .all(|r| r.header("idempotency-key").is_none()));
}

#[tokio::test]
async fn the_budget_is_shared_by_the_clients_calls_and_runs_out() {
    let server = ScriptedServer::start(vec![], Reply::error(ErrorCode::ServiceUnavailable)).await;
    let budget = RetryBudgetConfig {
        capacity: 8.0,
        extra_load: 0.0,
        refill_per_sec: 0.0,
    };
    let client = fast(&server).retry_budget(budget).build().unwrap();
    let clone = client.clone();

    let e = client.account().await.unwrap_err();
    assert_eq!(
        (server.count(), e.stop_reason()),
        (6, StopReason::RetriesExhausted)
    );
    let e = clone.account().await.unwrap_err();
    assert_eq!(
        (server.count(), e.stop_reason()),
        (6 + 4, StopReason::BudgetExhausted)
    );
    assert!(
        e.to_string().contains("4 attempts: retry budget exhausted"),
        "{e}"
    );
    let e = client.account().await.unwrap_err();
    assert_eq!(
        (server.count(), e.stop_reason()),
        (6 + 4 + 1, StopReason::BudgetExhausted)
    );

    // A client of its own has its own budget; so has one without a budget.
    let other = fast(&server).no_retry_budget().build().unwrap();
    other.account().await.unwrap_err();
    assert_eq!(server.count(), 11 + 6);
}

#[tokio::test]
async fn a_retry_after_beyond_the_limit_comes_back_at_once() {
    let server = ScriptedServer::start(
        vec![Reply::error(ErrorCode::RateLimitExceeded).header("retry-after", "120")],
        Reply::json(200, account_json()),
    )
    .await;
    let client = fast(&server).build().unwrap();
    let started = Instant::now();
    let e = client.account().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(server.count(), 1);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(120)));
    assert_eq!(
        e.stop_reason(),
        StopReason::RetryAfterTooLong(Duration::from_secs(120))
    );
    let until = e
        .retry_at()
        .unwrap()
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(until > Duration::from_secs(110), "{until:?}");
    assert!(e.is_retryable());
}

#[tokio::test]
async fn retry_after_is_honoured_in_both_forms() {
    let date = {
        let at = time::OffsetDateTime::from(SystemTime::now() + Duration::from_secs(2));
        at.format(&time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        ))
        .unwrap()
    };
    let server = ScriptedServer::start(
        vec![
            Reply::error(ErrorCode::RateLimitExceeded).header("retry-after", date),
            Reply::error(ErrorCode::ServiceUnavailable).header("retry-after", "1"),
        ],
        Reply::json(200, account_json()),
    )
    .await;
    let client = fast(&server).build().unwrap();
    client.account().await.unwrap();
    let reqs = server.requests();
    assert_eq!(reqs.len(), 3);
    // The date has whole seconds: "2 s ahead" is between 1 and 2 s away.
    let first = reqs[1].at - reqs[0].at;
    assert!(
        first >= Duration::from_millis(950) && first < Duration::from_millis(2600),
        "{first:?}"
    );
    let second = reqs[2].at - reqs[1].at;
    assert!(
        second >= Duration::from_secs(1) && second < Duration::from_millis(1500),
        "{second:?}"
    );
}

#[tokio::test]
async fn a_429_pauses_the_clients_other_requests_to_the_host() {
    let server = ScriptedServer::start(
        vec![Reply::error(ErrorCode::RateLimitExceeded).header("retry-after", "1")],
        Reply::json(200, account_json()),
    )
    .await;
    let client = fast(&server).build().unwrap();
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.account().await }
    });
    while server.count() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // This call starts after the 429: it waits for the pause instead of meeting the limit itself.
    client.account().await.unwrap();
    first.await.unwrap().unwrap();
    let reqs = server.requests();
    assert_eq!(reqs.len(), 3, "no second 429");
    assert!(reqs[1].at - reqs[0].at >= Duration::from_secs(1));
    assert!(reqs[2].at - reqs[0].at >= Duration::from_secs(1));
}

#[tokio::test]
async fn a_wait_that_does_not_fit_the_deadline_fails_at_once() {
    let server = ScriptedServer::start(vec![], Reply::error(ErrorCode::InternalError)).await;
    let policy = RetryPolicy {
        base: Duration::from_secs(2),
        ..RetryPolicy::default()
    };
    let client = Client::builder(&server.base_url)
        .retry_policy(policy)
        .deadline(Duration::from_millis(1500))
        .build()
        .unwrap();
    let started = Instant::now();
    let e = client.account().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(server.count(), 1);
    assert_eq!(e.stop_reason(), StopReason::Deadline);
    assert!(e.retry_at().unwrap() > SystemTime::now() + Duration::from_millis(1500));
    // Without the deadline the same client would retry: the per-call override.
    let quick = client.with_deadline(Some(Duration::from_millis(50)));
    quick.account().await.unwrap_err();
    assert_eq!(server.count(), 2);
}

#[tokio::test]
async fn a_refused_connection_is_a_retried_transport_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let client = Client::builder(format!("http://127.0.0.1:{port}"))
        .api_key(KEY)
        .retry_policy(RetryPolicy {
            max_retries: 2,
            ..fast_policy()
        })
        .build()
        .unwrap();
    let e = client.get_task("task_1").await.unwrap_err();
    assert!(e.is_transport(), "{e:?}");
    assert!(
        matches!(e.kind(), ErrorKind::Transport(t) if t.kind == TransportKind::Connect),
        "{e:?}"
    );
    assert_eq!(e.attempts(), 3);
    assert!(e.is_retryable());
    let line = e.to_string();
    assert!(
        line.starts_with("could not connect to the server"),
        "{line}"
    );
    assert!(!line.contains('\n') && !line.contains(KEY), "{line}");
}

#[tokio::test]
async fn a_success_body_that_does_not_match_is_a_decode_error_not_retried() {
    let server = ScriptedServer::start(
        vec![],
        Reply::json(200, "{\"id\": 3}").header("x-request-id", "req_odd"),
    )
    .await;
    let e = fast(&server).build().unwrap().account().await.unwrap_err();
    assert!(e.is_decode());
    assert_eq!(e.request_id(), Some("req_odd"));
    assert_eq!(server.count(), 1);
    assert_eq!((e.attempts(), e.history()[0].status), (1, Some(200)));
    assert!(
        e.to_string()
            .contains("[HTTP 200, request id req_odd, 1 attempt]"),
        "{e}"
    );
}

#[tokio::test]
async fn every_typed_method_calls_its_route() {
    let server = ScriptedServer::start(vec![], Reply::error(ErrorCode::InternalError)).await;
    let client = fast(&server).build().unwrap();
    let png = vec![0x89, b'P', b'N', b'G'];
    let list = format!(
        r#"{{"object":"list","data":[{}],"has_more":true}}"#,
        task_json("task_2", "succeeded")
    );
    server.set_script(vec![
        Reply::json(200, task_json("task_1", "running")),
        Reply::json(200, list),
        Reply::json(200, task_json("task_1", "canceled")),
        Reply::Http {
            status: 200,
            headers: vec![("content-type".into(), "image/png".into())],
            body: png.clone(),
        },
        Reply::json(200, account_json()),
        Reply::json(200, r#"{"status":"ok"}"#),
        Reply::json(200, EMPTY_LIST),
    ]);
    assert_eq!(
        client.get_task("task_1").await.unwrap().status,
        TaskStatus::Running
    );
    let page = client
        .list_tasks(&ListParams {
            limit: Some(5),
            after: Some("task_9".into()),
        })
        .await
        .unwrap();
    assert!(page.has_more && page.data[0].id == "task_2");
    assert_eq!(
        client.cancel_task("task_1").await.unwrap().status,
        TaskStatus::Canceled
    );
    assert_eq!(
        client.get_image("task_1", 0).await.unwrap().as_ref(),
        png.as_slice()
    );
    assert_eq!(client.account().await.unwrap().credits, 10);
    assert_eq!(client.health().await.unwrap().status, "ok");
    assert!(client
        .ledger(&ListParams {
            limit: Some(3),
            after: None,
        })
        .await
        .unwrap()
        .data
        .is_empty());

    let admin = Client::builder(&server.base_url)
        .admin_token("admin_secret_token")
        .retry_policy(fast_policy())
        .build_admin()
        .unwrap();
    let accounts = format!(
        r#"{{"object":"list","data":[{}],"has_more":false}}"#,
        account_json()
    );
    server.set_script(vec![
        Reply::json(
            201,
            format!(r#"{{"account":{},"api_key":"tg_new"}}"#, account_json()),
        ),
        Reply::json(200, accounts),
        Reply::json(200, account_json()),
        Reply::json(200, account_json()),
        Reply::json(201, r#"{"id":"key_1","api_key":"tg_other"}"#),
        Reply::Http {
            status: 204,
            headers: vec![],
            body: vec![],
        },
        Reply::json(200, account_json()),
        Reply::json(200, EMPTY_LIST),
        Reply::json(200, EMPTY_LIST),
    ]);
    let created = admin
        .create_account(&CreateAccountRequest {
            name: "acme".into(),
            credits: 10,
            rate_limit: None,
        })
        .await
        .unwrap();
    assert_eq!(created.api_key, "tg_new");
    assert_eq!(
        admin
            .list_accounts(&ListParams::default())
            .await
            .unwrap()
            .data
            .len(),
        1
    );
    assert_eq!(admin.get_account("acct_1").await.unwrap().name, "acme");
    admin
        .update_account(
            "acct_1",
            &UpdateAccountRequest {
                name: Some("acme2".into()),
                rate_limit: None,
                low_balance: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(admin.create_key("acct_1").await.unwrap().id, "key_1");
    admin.revoke_key("key_1").await.unwrap();
    admin
        .add_credits(
            "acct_1",
            &AddCreditsRequest {
                amount: 50,
                note: Some("top-up".into()),
                expires_at: None,
            },
        )
        .await
        .unwrap();
    assert!(admin.list_keys("acct_1").await.unwrap().data.is_empty());
    assert!(admin
        .ledger("acct_1", &ListParams::default())
        .await
        .unwrap()
        .data
        .is_empty());

    let seen: Vec<(String, String, bool)> = server
        .requests()
        .iter()
        .map(|r| {
            (
                r.method.clone(),
                r.path.clone(),
                r.header("idempotency-key").is_some(),
            )
        })
        .collect();
    let expected = [
        ("GET", "/v1/tasks/task_1", false),
        ("GET", "/v1/tasks?limit=5&after=task_9", false),
        ("POST", "/v1/tasks/task_1/cancel", true),
        ("GET", "/v1/tasks/task_1/images/0", false),
        ("GET", "/v1/account", false),
        ("GET", "/healthz", false),
        ("GET", "/v1/account/ledger?limit=3", false),
        ("POST", "/admin/accounts", true),
        ("GET", "/admin/accounts", false),
        ("GET", "/admin/accounts/acct_1", false),
        ("PATCH", "/admin/accounts/acct_1", false),
        ("POST", "/admin/accounts/acct_1/keys", true),
        ("DELETE", "/admin/keys/key_1", false),
        ("POST", "/admin/accounts/acct_1/credits", true),
        ("GET", "/admin/accounts/acct_1/keys", false),
        ("GET", "/admin/accounts/acct_1/ledger", false),
    ];
    let expected: Vec<(String, String, bool)> = expected
        .iter()
        .map(|(m, p, k)| ((*m).to_owned(), (*p).to_owned(), *k))
        .collect();
    assert_eq!(seen, expected);
    let reqs = server.requests();
    assert!(reqs[7..]
        .iter()
        .all(|r| r.header("authorization") == Some("Bearer admin_secret_token")));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&reqs[13].body).unwrap(),
        serde_json::json!({"amount": 50, "note": "top-up"})
    );
    assert!(!format!("{admin:?}").contains("admin_secret_token"));
    assert!(!format!("{created:?}").contains("tg_new"));
}

#[tokio::test]
async fn wait_for_task_polls_until_the_task_is_done() {
    let server = ScriptedServer::start(
        vec![
            Reply::json(200, task_json("task_1", "queued")),
            Reply::error(ErrorCode::ServiceUnavailable),
            Reply::json(200, task_json("task_1", "running")),
            Reply::json(200, task_json("task_1", "succeeded")),
        ],
        Reply::error(ErrorCode::InternalError),
    )
    .await;
    let client = fast(&server).build().unwrap();
    let mut seen = Vec::new();
    let task = client
        .wait_for_task("task_1", Duration::from_millis(5), |t| seen.push(t.status))
        .await
        .unwrap();
    assert_eq!(task.status, TaskStatus::Succeeded);
    assert_eq!(
        seen,
        vec![
            TaskStatus::Queued,
            TaskStatus::Running,
            TaskStatus::Succeeded
        ]
    );
    assert_eq!(server.count(), 4);
}
