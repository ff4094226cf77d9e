//! Money over real HTTP: Stripe Checkout against a local server that speaks Stripe's documented
//! protocol (form-encoded `POST /v1/checkout/sessions` under a secret key and an
//! `Idempotency-Key`; events signed `Stripe-Signature: t=…,v1=…`), purchases credited once
//! however often and concurrently they are delivered, refunds taken back with the shortfall
//! recorded, spend limits per key under concurrency, low-balance alerts through the outbox,
//! and the expiring credits an account is shown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use common::{Call, TestServer};
use futures_util::future::join_all;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SECRET_KEY: &str = "sk_test_tollgate_4eC39HqLyjWDarjtT1zdp7dc";
const WEBHOOK_SECRET: &str = "whsec_test_tollgate_5c1a0d9e";

/// A Checkout Session creation the stand-in received.
#[derive(Debug, Clone)]
struct Received {
    form: HashMap<String, String>,
    headers: HeaderMap,
}

/// Stripe, as far as its API reference describes `POST /v1/checkout/sessions`.
#[derive(Default)]
struct FakeStripe {
    received: Mutex<Vec<Received>>,
    /// Sessions by the `Idempotency-Key` that made them: Stripe answers a repeated key with the
    /// first answer.
    by_key: Mutex<HashMap<String, Value>>,
    /// Statuses to answer before succeeding (5xx: Stripe having a bad moment).
    failures: Mutex<Vec<u16>>,
}

async fn create_session(
    State(stripe): State<Arc<FakeStripe>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let stripe_error = |status: StatusCode, message: &str| {
        (
            status,
            Json(json!({"error": {"type": "invalid_request_error", "message": message}})),
        )
            .into_response()
    };
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {SECRET_KEY}"))
    {
        return stripe_error(StatusCode::UNAUTHORIZED, "Invalid API Key provided");
    }
    if headers.get("content-type").and_then(|v| v.to_str().ok())
        != Some("application/x-www-form-urlencoded")
    {
        return stripe_error(StatusCode::BAD_REQUEST, "Invalid request (not a form)");
    }
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(&body).unwrap();
    stripe.received.lock().unwrap().push(Received {
        form: form.clone(),
        headers: headers.clone(),
    });
    if let Some(status) = stripe.failures.lock().unwrap().pop() {
        return stripe_error(StatusCode::from_u16(status).unwrap(), "An error occurred");
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut by_key = stripe.by_key.lock().unwrap();
    let count = by_key.len();
    let session = by_key.entry(key).or_insert_with(|| {
        let id = format!("cs_test_a1{count:06}");
        let unit = form["line_items[0][price_data][unit_amount]"]
            .parse::<u64>()
            .unwrap();
        let metadata: HashMap<&str, &str> = form
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("metadata[")
                    .and_then(|k| k.strip_suffix(']'))
                    .map(|k| (k, v.as_str()))
            })
            .collect();
        json!({
            "id": id,
            "object": "checkout.session",
            "mode": form["mode"],
            "status": "open",
            "payment_status": "unpaid",
            "client_reference_id": form.get("client_reference_id"),
            "amount_total": unit,
            "currency": form["line_items[0][price_data][currency]"],
            "metadata": metadata,
            "payment_intent": null,
            "success_url": form["success_url"],
            "cancel_url": form["cancel_url"],
            "url": format!("https://checkout.stripe.com/c/pay/{id}"),
        })
    });
    Json(session.clone()).into_response()
}

async fn fake_stripe() -> (String, Arc<FakeStripe>) {
    let stripe = Arc::new(FakeStripe::default());
    let app = Router::new()
        .route("/v1/checkout/sessions", post(create_session))
        .with_state(Arc::clone(&stripe));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, stripe)
}

/// The envelope's `error` of a refusal with this status and code.
async fn refused(response: reqwest::Response, status: u16, code: &str) -> Value {
    let error_type = match status {
        400 => "invalid_request_error",
        402 => "billing_error",
        404 => "not_found_error",
        _ => "server_error",
    };
    common::expect_error(response, &format!("{status} {error_type} {code}"))
        .await
        .1
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `Stripe-Signature` as Stripe makes it: HMAC-SHA256 of `<t>.<body>` under the endpoint secret.
fn stripe_signature(secret: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.{body}").as_bytes());
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={timestamp},v1={hex}")
}

fn event(event_type: &str, object: Value) -> String {
    json!({
        "id": format!("evt_test_{}", common::unique("e")),
        "object": "event",
        "api_version": "2024-06-20",
        "created": unix_now(),
        "type": event_type,
        "data": {"object": object},
    })
    .to_string()
}

/// The session as Stripe reports it once paid.
fn paid(session: &Value, payment_intent: &str) -> String {
    let mut object = session.clone();
    object["status"] = json!("complete");
    object["payment_status"] = json!("paid");
    object["payment_intent"] = json!(payment_intent);
    event("checkout.session.completed", object)
}

async fn deliver(server: &TestServer, body: &str, signature: Option<String>) -> reqwest::Response {
    let mut request = server
        .http
        .post(server.url("/webhooks/stripe"))
        .header("content-type", "application/json; charset=utf-8")
        .body(body.to_owned());
    if let Some(signature) = signature {
        request = request.header("stripe-signature", signature);
    }
    request.call().await
}

async fn deliver_signed(server: &TestServer, body: &str) -> reqwest::Response {
    deliver(
        server,
        body,
        Some(stripe_signature(WEBHOOK_SECRET, unix_now(), body)),
    )
    .await
}

fn billing_server(stripe: &str, extra: &[&str]) -> (tempfile::TempDir, TestServer) {
    let mut args = vec![
        "--stripe-api-base",
        stripe,
        "--credit-packs",
        "500:5.00:usd,2000:18.00:usd",
    ];
    args.extend_from_slice(extra);
    TestServer::start_with_env(
        &args,
        &[
            ("TOLLGATE_STRIPE_SECRET_KEY", SECRET_KEY),
            ("TOLLGATE_STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET),
        ],
    )
}

async fn checkout(
    server: &TestServer,
    key: &str,
    body: Value,
    idempotency: Option<&str>,
) -> reqwest::Response {
    let mut request = server.post(key, "/v1/billing/checkout").json(&body);
    if let Some(k) = idempotency {
        request = request.header("idempotency-key", k);
    }
    request.call().await
}

async fn ledger(server: &TestServer, key: &str) -> Vec<Value> {
    server.get_json(key, "/v1/account/ledger").await["data"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn a_checkout_is_made_as_stripe_documents_and_its_payment_credits_once() {
    let (stripe_url, stripe) = fake_stripe().await;
    let (_tmp, server) = billing_server(&stripe_url, &[]);
    let acct = server.account(0).await;

    let response = checkout(&server, &acct.key, json!({"pack": 500}), Some("buy-1")).await;
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("cs_test_"), "{created}");
    assert_eq!(
        created["url"],
        format!("https://checkout.stripe.com/c/pay/{id}")
    );

    let received = stripe.received.lock().unwrap().clone();
    assert_eq!(received.len(), 1);
    let form = &received[0].form;
    assert_eq!(form["mode"], "payment");
    assert_eq!(form["client_reference_id"], acct.id);
    assert_eq!(form["line_items[0][quantity]"], "1");
    assert_eq!(form["line_items[0][price_data][currency]"], "usd");
    assert_eq!(form["line_items[0][price_data][unit_amount]"], "500");
    assert_eq!(
        form["line_items[0][price_data][product_data][name]"],
        "500 credits"
    );
    assert_eq!(form["metadata[credits]"], "500");
    assert_eq!(form["metadata[account_id]"], acct.id);
    let top_up = server.url("/dashboard/credits");
    assert_eq!(
        form["success_url"],
        format!("{top_up}?checkout=success&session_id={{CHECKOUT_SESSION_ID}}")
    );
    assert_eq!(form["cancel_url"], format!("{top_up}?checkout=canceled"));
    let stripe_key = received[0].headers["idempotency-key"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(stripe_key.starts_with("tollgate-checkout-"), "{stripe_key}");

    // The caller's retry replays the answer: one session.
    let again = checkout(&server, &acct.key, json!({"pack": 500}), Some("buy-1")).await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap()["id"], id);
    assert_eq!(stripe.received.lock().unwrap().len(), 1);

    // Not paid yet: nothing credited.
    let session = stripe.by_key.lock().unwrap()[&stripe_key].clone();
    let unpaid = event("checkout.session.completed", session.clone());
    assert_eq!(deliver_signed(&server, &unpaid).await.status(), 200);
    assert_eq!(server.balance(&acct.key).await, 0);

    // Paid: delivered twice in a row, then ten times at once, it credits the pack once.
    let body = paid(&session, "pi_test_1");
    for _ in 0..2 {
        let response = deliver_signed(&server, &body).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.json::<Value>().await.unwrap(),
            json!({"received": true})
        );
    }
    let statuses = join_all((0..10).map(|_| deliver_signed(&server, &body))).await;
    assert!(statuses.iter().all(|r| r.status() == 200));
    assert_eq!(server.balance(&acct.key).await, 500);
    let purchases: Vec<Value> = ledger(&server, &acct.key)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "purchase")
        .collect();
    assert_eq!(purchases.len(), 1, "{purchases:?}");
    assert_eq!(purchases[0]["delta"], 500);
    assert_eq!(purchases[0]["purchase_id"], id);

    // The operator sees it.
    let listed: Value = server
        .admin(
            reqwest::Method::GET,
            &format!("/admin/accounts/{}/purchases", acct.id),
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["data"][0]["id"], id);
    assert_eq!(listed["data"][0]["status"], "paid");
    assert_eq!(listed["data"][0]["credits"], 500);

    // Other events are acknowledged and change nothing; an unknown pack is a 400.
    let other = event(
        "customer.created",
        json!({"id": "cus_1", "object": "customer"}),
    );
    assert_eq!(deliver_signed(&server, &other).await.status(), 200);
    assert_eq!(server.balance(&acct.key).await, 500);
    refused(
        checkout(&server, &acct.key, json!({"pack": 7}), None).await,
        400,
        "invalid_value",
    )
    .await;
    let packs = server.get_json(&acct.key, "/v1/billing/packs").await;
    assert_eq!(
        packs["data"],
        json!([{"credits": 500, "amount": 500, "currency": "usd"}, {"credits": 2000, "amount": 1800, "currency": "usd"}])
    );
    // The secret key is in no log line.
    assert!(!server.logs().contains(SECRET_KEY));
}

#[tokio::test]
async fn a_bad_or_stale_signature_is_refused_and_credits_nothing() {
    let (stripe_url, stripe) = fake_stripe().await;
    let (_tmp, server) = billing_server(&stripe_url, &[]);
    let acct = server.account(0).await;
    let created: Value = checkout(&server, &acct.key, json!({"pack": 2000}), None)
        .await
        .json()
        .await
        .unwrap();
    let session = stripe
        .by_key
        .lock()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    assert_eq!(session["id"], created["id"]);
    let body = paid(&session, "pi_test_2");

    let cases = [
        ("missing", None),
        (
            "another secret",
            Some(stripe_signature("whsec_other", unix_now(), &body)),
        ),
        (
            "stale",
            Some(stripe_signature(WEBHOOK_SECRET, unix_now() - 301, &body)),
        ),
        ("malformed", Some("v1=abc".to_owned())),
    ];
    for (what, signature) in cases {
        let response = deliver(&server, &body, signature).await;
        let error = refused(response, 400, "invalid_signature").await;
        assert_eq!(error["param"], "Stripe-Signature", "{what}");
    }
    // A body changed after signing.
    let signature = stripe_signature(WEBHOOK_SECRET, unix_now(), &body);
    let tampered = body.replace("2000", "9000");
    refused(
        deliver(&server, &tampered, Some(signature)).await,
        400,
        "invalid_signature",
    )
    .await;
    assert_eq!(server.balance(&acct.key).await, 0);
    assert!(ledger(&server, &acct.key).await.is_empty());

    // The genuine one, still.
    assert_eq!(deliver_signed(&server, &body).await.status(), 200);
    assert_eq!(server.balance(&acct.key).await, 2000);
}

#[tokio::test]
async fn a_refund_takes_the_credits_back_as_far_as_the_balance_goes() {
    let (stripe_url, stripe) = fake_stripe().await;
    let (_tmp, server) = billing_server(&stripe_url, &[]);
    let acct = server.account(0).await;
    checkout(&server, &acct.key, json!({"pack": 500}), None).await;
    let session = stripe
        .by_key
        .lock()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    assert_eq!(
        deliver_signed(&server, &paid(&session, "pi_test_3"))
            .await
            .status(),
        200
    );
    assert_eq!(server.balance(&acct.key).await, 500);
    // 300 of it spent.
    let spent = server
        .admin(
            reqwest::Method::POST,
            &format!("/admin/accounts/{}/credits", acct.id),
            Some(json!({"amount": -300, "note": "spent"})),
        )
        .await;
    assert_eq!(spent.status(), 200);

    let refund = |refunded: u64| {
        event(
            "charge.refunded",
            json!({"id": "ch_test_3", "object": "charge", "payment_intent": "pi_test_3",
                   "amount": 500, "amount_refunded": refunded, "refunded": refunded == 500,
                   "currency": "usd"}),
        )
    };
    // A fifth of the money back: a fifth of the credits.
    let partial = refund(100);
    assert_eq!(deliver_signed(&server, &partial).await.status(), 200);
    assert_eq!(deliver_signed(&server, &partial).await.status(), 200);
    assert_eq!(server.balance(&acct.key).await, 100);
    // The rest: 400 owed, 100 there.
    assert_eq!(deliver_signed(&server, &refund(500)).await.status(), 200);
    assert_eq!(server.balance(&acct.key).await, 0);
    let listed: Value = server
        .admin(
            reqwest::Method::GET,
            &format!("/admin/accounts/{}/purchases", acct.id),
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    let purchase = &listed["data"][0];
    assert_eq!(
        (
            &purchase["refunded_amount"],
            &purchase["refunded_credits"],
            &purchase["shortfall"]
        ),
        (&json!(500), &json!(200), &json!(300))
    );
    let refunds: Vec<i64> = ledger(&server, &acct.key)
        .await
        .iter()
        .filter(|e| e["kind"] == "purchase_refund")
        .map(|e| e["delta"].as_i64().unwrap())
        .collect();
    assert_eq!(refunds, [-100, -100]);
}

#[tokio::test]
async fn stripe_failing_for_a_moment_is_retried_under_one_idempotency_key() {
    let (stripe_url, stripe) = fake_stripe().await;
    let (_tmp, server) = billing_server(&stripe_url, &[]);
    let acct = server.account(0).await;
    *stripe.failures.lock().unwrap() = vec![503, 500];
    let response = checkout(&server, &acct.key, json!({"pack": 500}), None).await;
    assert_eq!(response.status(), 201);
    let received = stripe.received.lock().unwrap().clone();
    assert_eq!(received.len(), 3);
    let keys: std::collections::HashSet<_> = received
        .iter()
        .map(|r| r.headers["idempotency-key"].clone())
        .collect();
    assert_eq!(keys.len(), 1, "every retry repeats the key");

    // Stripe refusing the request (a wrong key) is the operator's to fix: a 500 that says
    // nothing of it, the reason in the log.
    let (_tmp2, wrong) = TestServer::start_with_env(
        &["--stripe-api-base", &stripe_url],
        &[
            ("TOLLGATE_STRIPE_SECRET_KEY", "sk_test_wrong_key_123"),
            ("TOLLGATE_STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET),
        ],
    );
    let other = wrong.account(0).await;
    let error = refused(
        checkout(&wrong, &other.key, json!({"pack": 500}), None).await,
        500,
        "internal_error",
    )
    .await;
    assert!(!error.to_string().contains("sk_test"), "{error}");
    assert!(!error.to_string().contains("Stripe refused"), "{error}");
    assert!(!wrong.logs().contains("sk_test_wrong_key_123"));
}

#[tokio::test]
async fn without_stripe_the_routes_say_so() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(0).await;
    refused(
        checkout(&server, &acct.key, json!({"pack": 500}), None).await,
        404,
        "billing_not_configured",
    )
    .await;
    refused(
        deliver(&server, "{}", None).await,
        404,
        "billing_not_configured",
    )
    .await;
    let packs = server.get_json(&acct.key, "/v1/billing/packs").await;
    assert_eq!(packs["data"], json!([]));
}

/// The shared deployment when the tests have one, else SQLite: the spend limit is a store rule.
fn engines() -> Vec<Vec<String>> {
    let mut engines = vec![vec![]];
    match std::env::var("TOLLGATE_TEST_DATABASE_URL") {
        Ok(db) => engines.push(vec![
            "--database-url".into(),
            db,
            "--database-schema".into(),
            common::unique("money").replace('-', "_"),
        ]),
        Err(_) => common::skip("money on PostgreSQL: TOLLGATE_TEST_DATABASE_URL is not set"),
    }
    engines
}

#[tokio::test]
async fn two_hundred_concurrent_creates_against_a_key_limit_of_50_charge_exactly_50() {
    for args in engines() {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (_tmp, server) = TestServer::start(&args);
        let acct = server.account(1000).await;
        let response = server
            .admin(
                reqwest::Method::POST,
                &format!("/admin/accounts/{}/keys", acct.id),
                Some(json!({"spend_limit": {"credits": 50, "period": "day"}})),
            )
            .await;
        assert_eq!(response.status(), 201);
        let key: Value = response.json().await.unwrap();
        let api_key = key["api_key"].as_str().unwrap().to_owned();
        let responses = join_all((0..200).map(|i| {
            server
                .post(&api_key, "/v1/images/generations")
                .json(&json!({"prompt": format!("limit {i}"), "size": "256x256"}))
                .send()
        }))
        .await;
        let mut accepted = 0;
        for response in responses {
            let response = response.unwrap();
            match response.status().as_u16() {
                202 => accepted += 1,
                402 => {
                    let error = refused(response, 402, "key_spend_limit_reached").await;
                    let message = error["message"].as_str().unwrap();
                    assert!(
                        message.contains("50 credits a day") && message.contains("resets at"),
                        "{message}"
                    );
                }
                other => panic!("unexpected {other}: {}", response.text().await.unwrap()),
            }
        }
        assert_eq!(accepted, 50, "{args:?}");
        assert_eq!(server.balance(&acct.key).await, 950);
        // The key's page shows the spend.
        let keys = server.keys(&acct.id).await;
        let limited = keys.iter().find(|k| k["id"] == key["id"]).unwrap();
        assert_eq!(limited["spend_limit"]["credits"], 50);
        assert_eq!(limited["spend_limit"]["spent"], 50);
        assert!(limited["spend_limit"]["resets_at"]
            .as_str()
            .unwrap()
            .ends_with("T00:00:00Z"));
        // The account's other key is not limited.
        server
            .create_task(&acct.key, json!({"prompt": "unlimited", "size": "256x256"}))
            .await;
        refused(
            server
                .admin(
                    reqwest::Method::POST,
                    &format!("/admin/accounts/{}/keys", acct.id),
                    Some(json!({"spend_limit": {"credits": 0, "period": "day"}})),
                )
                .await,
            400,
            "invalid_value",
        )
        .await;
        server.stop();
        if let Some(schema) = args.iter().position(|a| *a == "--database-schema") {
            common::drop_schema(args[schema - 1], args[schema + 1]);
        }
    }
}

/// What a receiver was sent.
type Got = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

/// A receiver that records what it is sent.
async fn receiver() -> (String, Got) {
    let got: Got = Arc::default();
    let app = Router::new()
        .route(
            "/low",
            post(
                |State(got): State<Got>, headers: HeaderMap, body: Bytes| async move {
                    got.lock().unwrap().push((headers, body));
                    StatusCode::OK
                },
            ),
        )
        .with_state(Arc::clone(&got));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/low", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

#[tokio::test]
async fn a_low_balance_alert_is_delivered_once_per_crossing_and_signed() {
    let (url, got) = receiver().await;
    let (_tmp, server) = TestServer::start(&["--allow-private-webhooks"]);
    let acct = server.account(7).await;
    let patched = server
        .admin(
            reqwest::Method::PATCH,
            &format!("/admin/accounts/{}", acct.id),
            Some(json!({"low_balance": {"threshold": 5, "notify_url": url}})),
        )
        .await;
    assert_eq!(patched.status(), 200);
    let account: Value = patched.json().await.unwrap();
    assert_eq!(account["low_balance"]["threshold"], 5);
    // 7 → 3: one crossing.
    for i in 0..4 {
        server
            .create_task(
                &acct.key,
                json!({"prompt": format!("low {i}"), "size": "256x256"}),
            )
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no alert");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Top up and cross again.
    server
        .admin(
            reqwest::Method::POST,
            &format!("/admin/accounts/{}/credits", acct.id),
            Some(json!({"amount": 10})),
        )
        .await;
    for i in 0..10 {
        server
            .create_task(
                &acct.key,
                json!({"prompt": format!("again {i}"), "size": "256x256"}),
            )
            .await;
    }
    while got.lock().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "no second alert");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing more comes: one event per crossing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 2);
    let secret = server
        .get_json(&acct.key, "/v1/account/webhook-secret")
        .await["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    for (headers, body) in &got {
        let signature = headers["tollgate-signature"].to_str().unwrap();
        tollgate_client::webhook::verify(
            &secret,
            signature,
            body,
            tollgate_client::webhook::DEFAULT_TOLERANCE,
            SystemTime::now(),
        )
        .unwrap();
        let event: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(event["type"], "account.balance_low");
        assert_eq!(event["data"]["account_id"], acct.id);
        assert_eq!(event["data"]["credits"], 4);
        assert_eq!(event["data"]["threshold"], 5);
        assert_eq!(
            headers["tollgate-webhook-id"].to_str().unwrap(),
            event["id"]
        );
    }
    // A receiver that must be public is checked as task webhooks are.
    let (_tmp2, strict) = TestServer::start(&[]);
    let other = strict.account(1).await;
    let error = refused(
        strict
            .admin(
                reqwest::Method::PATCH,
                &format!("/admin/accounts/{}", other.id),
                Some(json!({"low_balance": {"threshold": 5, "notify_url": "http://127.0.0.1:9/low"}})),
            )
            .await,
        400,
        "invalid_value",
    )
    .await;
    assert_eq!(error["param"], "low_balance.notify_url");
}

#[tokio::test]
async fn expiring_credits_are_shown_and_used_first() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(5).await;
    let expires = "2099-01-31T00:00:00Z";
    let granted = server
        .admin(
            reqwest::Method::POST,
            &format!("/admin/accounts/{}/credits", acct.id),
            Some(json!({"amount": 10, "expires_at": expires})),
        )
        .await;
    assert_eq!(granted.status(), 200);
    let account = server.get_json(&acct.key, "/v1/account").await;
    assert_eq!(account["credits"], 15);
    assert_eq!(
        account["expiring"],
        json!([{"credits": 10, "expires_at": expires}])
    );
    server
        .create_task(&acct.key, json!({"prompt": "first", "size": "512x512"}))
        .await;
    let account = server.get_json(&acct.key, "/v1/account").await;
    assert_eq!(account["credits"], 13);
    assert_eq!(
        account["expiring"],
        json!([{"credits": 8, "expires_at": expires}])
    );
    // A voucher's credits expire with it.
    let voucher: Value = server
        .admin(
            reqwest::Method::POST,
            "/admin/vouchers",
            Some(json!({"credits": 3, "expires_at": "2098-06-01T00:00:00Z"})),
        )
        .await
        .json()
        .await
        .unwrap();
    let redeemed = server
        .post(&acct.key, "/v1/vouchers/redeem")
        .json(&json!({"code": voucher["code"]}))
        .call()
        .await;
    assert_eq!(redeemed.status(), 200);
    let account = server.get_json(&acct.key, "/v1/account").await;
    assert_eq!(
        account["expiring"],
        json!([{"credits": 3, "expires_at": "2098-06-01T00:00:00Z"}, {"credits": 8, "expires_at": expires}])
    );
    for (body, param) in [
        (
            json!({"amount": 5, "expires_at": "2001-01-01T00:00:00Z"}),
            "expires_at",
        ),
        (json!({"amount": -1, "expires_at": expires}), "expires_at"),
    ] {
        let error = refused(
            server
                .admin(
                    reqwest::Method::POST,
                    &format!("/admin/accounts/{}/credits", acct.id),
                    Some(body),
                )
                .await,
            400,
            "invalid_value",
        )
        .await;
        assert_eq!(error["param"], param);
    }
}

#[tokio::test]
async fn the_dashboard_buys_through_stripe_warns_of_a_low_balance_and_shows_the_operator_the_money()
{
    use common::browser::{csrf_of, location, Browser};
    let (stripe_url, stripe) = fake_stripe().await;
    let (_tmp, server) = billing_server(&stripe_url, &["--allow-private-webhooks"]);
    let acct = server.account(3).await;
    let mut holder = Browser::signed_in(&server, &acct.key, "/dashboard/overview").await;
    let page = holder.page("/dashboard/credits").await;
    assert!(page.contains("Buy 500 credits · $5.00"), "{page}");
    assert!(page.contains("Buy 2,000 credits · $18.00"), "{page}");
    let csrf = csrf_of(&page);
    // The Buy button goes on to Stripe's page.
    let response = holder
        .post(
            "/dashboard/credits/checkout",
            &[("csrf", &csrf), ("pack", "2000")],
        )
        .await;
    assert_eq!(response.status(), 303);
    let to = location(&response);
    assert!(
        to.starts_with("https://checkout.stripe.com/c/pay/cs_test_"),
        "{to}"
    );
    let session = stripe
        .by_key
        .lock()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    assert_eq!(session["client_reference_id"], acct.id);
    // Back from Stripe.
    let page = holder
        .page("/dashboard/credits?checkout=success&session_id=x")
        .await;
    assert!(page.contains("the payment went through"), "{page}");
    let page = holder.page("/dashboard/credits?checkout=canceled").await;
    assert!(page.contains("nothing was charged"), "{page}");
    assert_eq!(
        deliver_signed(&server, &paid(&session, "pi_dash"))
            .await
            .status(),
        200
    );
    assert_eq!(server.balance(&acct.key).await, 2003);

    // The operator: a key with a spend limit, credits that expire, an alert, the purchase.
    let mut operator = Browser::signed_in(&server, common::ADMIN_TOKEN, "/dashboard/admin").await;
    let here = format!("/dashboard/admin/accounts/{}", acct.id);
    let csrf = csrf_of(&operator.page(&here).await);
    let response = operator
        .post(
            &format!("{here}/keys"),
            &[
                ("csrf", &csrf),
                ("spend_limit", "25"),
                ("spend_period", "week"),
            ],
        )
        .await;
    assert_eq!(response.status(), 200);
    let limited = server
        .keys(&acct.id)
        .await
        .into_iter()
        .find(|k| !k["spend_limit"].is_null())
        .expect("a limited key");
    assert_eq!(limited["spend_limit"]["credits"], 25);
    assert_eq!(limited["spend_limit"]["period"], "week");
    let response = operator
        .post(
            &format!("{here}/credits"),
            &[("csrf", &csrf), ("amount", "10"), ("expires", "2099-12-31")],
        )
        .await;
    assert_eq!(response.status(), 303);
    let account = server.get_json(&acct.key, "/v1/account").await;
    assert_eq!(
        account["expiring"],
        json!([{"credits": 10, "expires_at": "2100-01-01T00:00:00Z"}])
    );
    let (url, _got) = receiver().await;
    let response = operator
        .post(
            &format!("{here}/low-balance"),
            &[("csrf", &csrf), ("threshold", "5000"), ("notify_url", &url)],
        )
        .await;
    assert_eq!(response.status(), 303);
    let page = operator.page(&here).await;
    assert!(page.contains("Low-balance alert saved."), "{page}");
    assert!(
        page.contains(&session["id"].as_str().unwrap().to_owned()),
        "{page}"
    );
    assert!(page.contains("id=\"purchases\""), "{page}");
    // The holder sees the banner (2013 is below 5000) and the key's spend.
    let page = holder.page("/dashboard/overview").await;
    assert!(page.contains("below your alert threshold"), "{page}");
    let page = holder.page("/dashboard/keys").await;
    assert!(page.contains("0 of 25 credits this week"), "{page}");
    // Turned off, the banner goes.
    let response = operator
        .post(
            &format!("{here}/low-balance"),
            &[("csrf", &csrf), ("threshold", ""), ("notify_url", "")],
        )
        .await;
    assert_eq!(response.status(), 303);
    let page = holder.page("/dashboard/overview").await;
    assert!(!page.contains("below your alert threshold"), "{page}");
}
