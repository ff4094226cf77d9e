//! Webhooks over real HTTP: a local receiver that fails the first attempts, signatures checked
//! with the SDK's helper, attempts shown on the task, retries with the seed's backoff, no
//! redirects followed, SSRF targets refused, secret rotation, and deliveries that survive a crash.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use common::{expect_error, Call, TestServer};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tollgate_client::webhook::{self, WebhookError, DEFAULT_TOLERANCE};
use tollgate_client::Task;

/// A delivery the receiver got.
#[derive(Debug, Clone)]
struct Delivery {
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

struct Receiver {
    /// Statuses to answer, in order; then 200.
    script: Mutex<VecDeque<u16>>,
    got: Mutex<Vec<Delivery>>,
    /// Hits on `/elsewhere`, where a redirect points.
    elsewhere: Mutex<usize>,
}

async fn hook(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> Response {
    r.got.lock().unwrap().push(Delivery {
        headers,
        body,
        at: Instant::now(),
    });
    let status = r.script.lock().unwrap().pop_front().unwrap_or(200);
    let mut response = StatusCode::from_u16(status).unwrap().into_response();
    if (300..400).contains(&status) {
        response
            .headers_mut()
            .insert("location", "/elsewhere".parse().unwrap());
    }
    response
}

async fn elsewhere(State(r): State<Arc<Receiver>>) -> StatusCode {
    *r.elsewhere.lock().unwrap() += 1;
    StatusCode::OK
}

async fn receiver_on(
    listener: tokio::net::TcpListener,
    script: Vec<u16>,
) -> (String, Arc<Receiver>) {
    let receiver = Arc::new(Receiver {
        script: Mutex::new(script.into()),
        got: Mutex::new(Vec::new()),
        elsewhere: Mutex::new(0),
    });
    let app = Router::new()
        .route("/hook", post(hook))
        .route("/elsewhere", post(elsewhere).get(elsewhere))
        .with_state(Arc::clone(&receiver));
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, receiver)
}

async fn receiver(script: Vec<u16>) -> (String, Arc<Receiver>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    receiver_on(listener, script).await
}

async fn secret_of(server: &TestServer, key: &str) -> String {
    let response = server.get(key, "/v1/account/webhook-secret").call().await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "webhook_secret");
    let secret = body["secret"].as_str().unwrap().to_owned();
    assert!(
        secret.starts_with("whsec_") && secret.len() >= 6 + 64,
        "{secret}"
    );
    secret
}

/// Polls the task until its webhook is no longer pending.
async fn wait_webhook(server: &TestServer, key: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let task: Value = server.get(key, &format!("/v1/tasks/{id}")).fetch().await;
        if task["webhook"]["state"] != "pending" {
            return task;
        }
        assert!(Instant::now() < deadline, "webhook still pending: {task}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn verify(secret: &str, delivery: &Delivery) -> Result<(), WebhookError> {
    let header = delivery
        .headers
        .get("tollgate-signature")
        .expect("signed")
        .to_str()
        .unwrap();
    webhook::verify(
        secret,
        header,
        &delivery.body,
        DEFAULT_TOLERANCE,
        SystemTime::now(),
    )
}

#[tokio::test]
async fn a_delivery_is_signed_retried_with_backoff_and_shown_on_the_task() {
    let (url, receiver) = receiver(vec![500, 503]).await;
    let (_tmp, server) = TestServer::start(&["--allow-private-webhooks"]);
    let acct = server.account(100).await;
    let secret = secret_of(&server, &acct.key).await;
    assert_eq!(
        secret_of(&server, &acct.key).await,
        secret,
        "the same secret every time"
    );
    let created = server
        .create_task(
            &acct.key,
            json!({"prompt": "a heron", "size": "256x256", "webhook_url": url}),
        )
        .await;
    assert_eq!(
        created["webhook"],
        json!({"url": url, "state": "pending", "delivered_at": null, "next_attempt_at": null, "attempts": []})
    );
    let id = created["id"].as_str().unwrap();
    let task = wait_webhook(&server, &acct.key, id).await;
    assert_eq!(task["status"], "succeeded");
    let hook = &task["webhook"];
    assert_eq!(hook["state"], "delivered", "{task}");
    assert!(hook["delivered_at"].is_string());
    assert_eq!(hook["next_attempt_at"], Value::Null);
    let attempts = hook["attempts"].as_array().unwrap();
    let statuses: Vec<_> = attempts.iter().map(|a| a["status"].clone()).collect();
    assert_eq!(statuses, vec![json!(500), json!(503), json!(200)]);
    assert!(attempts.iter().all(|a| a["at"].is_string()));

    let got = receiver.got.lock().unwrap().clone();
    assert_eq!(got.len(), 3);
    for (n, delivery) in got.iter().enumerate() {
        assert_eq!(verify(&secret, delivery), Ok(()), "attempt {}", n + 1);
        assert_eq!(delivery.headers["content-type"], "application/json");
        assert_eq!(delivery.headers["tollgate-webhook-id"], id);
        assert_eq!(
            delivery.headers["tollgate-webhook-attempt"],
            (n + 1).to_string().as_str()
        );
        let sent: Task = serde_json::from_slice(&delivery.body).unwrap();
        assert_eq!(sent.id, id);
        assert_eq!(sent.status, tollgate_client::TaskStatus::Succeeded);
        assert_eq!(sent.images.len(), 1);
        assert!(
            sent.webhook.is_none(),
            "the body is the task, not its bookkeeping"
        );
    }
    // The same task every time; its image links are signed fresh at each attempt, so their
    // expiry moves on when the attempts straddle a link window (a minute): compare without it.
    let task_without_link_expiry = |body: &[u8]| {
        let mut task: Value = serde_json::from_slice(body).unwrap();
        for image in task["images"].as_array_mut().unwrap() {
            let url = image["url"].as_str().unwrap();
            let path = url.split_once('?').map_or(url, |(path, _)| path).to_owned();
            image["url"] = json!(path);
        }
        task
    };
    assert_eq!(
        task_without_link_expiry(&got[0].body),
        task_without_link_expiry(&got[2].body),
        "every attempt sends the same task"
    );
    // The seed's backoff: 1 s then 2 s, each plus under 1 s of jitter (and the 0.5 s poll).
    let first_gap = got[1].at - got[0].at;
    let second_gap = got[2].at - got[1].at;
    assert!(
        (Duration::from_millis(1000)..Duration::from_millis(2700)).contains(&first_gap),
        "{first_gap:?}"
    );
    assert!(
        (Duration::from_millis(2000)..Duration::from_millis(3700)).contains(&second_gap),
        "{second_gap:?}"
    );

    // The helper refuses what it should, on a real delivery.
    let mut tampered = got[2].clone();
    tampered.body = Bytes::from(
        String::from_utf8(tampered.body.to_vec())
            .unwrap()
            .replace("succeeded", "failed"),
    );
    assert_eq!(verify(&secret, &tampered), Err(WebhookError::Mismatch));
    let other = server.account(1).await;
    let other_secret = secret_of(&server, &other.key).await;
    assert_ne!(other_secret, secret);
    assert_eq!(verify(&other_secret, &got[2]), Err(WebhookError::Mismatch));
    let header = got[2].headers["tollgate-signature"].to_str().unwrap();
    let hour_later = SystemTime::now() + Duration::from_secs(3600);
    assert_eq!(
        webhook::verify(&secret, header, &got[2].body, DEFAULT_TOLERANCE, hour_later),
        Err(WebhookError::Stale)
    );
    // The secret never reaches the log.
    assert!(!server.logs().contains(&secret));
}

#[tokio::test]
async fn a_receiver_that_keeps_failing_is_given_up_and_redirects_are_not_followed() {
    let (url, receiver) = receiver(vec![307, 307, 307]).await;
    let (_tmp, server) =
        TestServer::start(&["--allow-private-webhooks", "--webhook-attempts", "2"]);
    let acct = server.account(100).await;
    let task = server
        .create_task(
            &acct.key,
            json!({"prompt": "x", "size": "256x256", "webhook_url": url}),
        )
        .await;
    let task = wait_webhook(&server, &acct.key, task["id"].as_str().unwrap()).await;
    assert_eq!(task["webhook"]["state"], "failed", "{task}");
    assert_eq!(task["webhook"]["delivered_at"], Value::Null);
    let statuses: Vec<_> = task["webhook"]["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].clone())
        .collect();
    assert_eq!(statuses, vec![json!(307), json!(307)]);
    assert_eq!(receiver.got.lock().unwrap().len(), 2);
    assert_eq!(
        *receiver.elsewhere.lock().unwrap(),
        0,
        "a redirect could point inside the network: never followed"
    );
    server.wait_for_log("giving up").await;
}

#[tokio::test]
async fn private_and_malformed_webhook_urls_are_refused_and_nothing_is_charged() {
    let (_tmp, server) = TestServer::start(&["--workers", "0"]);
    let acct = server.account(10).await;
    let long = format!("https://example.com/{}", "a".repeat(2100));
    for (url, says) in [
        ("http://127.0.0.1:8080/hook", "public addresses only"),
        ("http://localhost/hook", "public addresses only"),
        ("http://10.0.0.7/hook", "public addresses only"),
        ("http://192.168.1.1/hook", "public addresses only"),
        ("http://100.64.0.1/hook", "public addresses only"),
        (
            "http://169.254.169.254/latest/meta-data/",
            "public addresses only",
        ),
        ("http://[::1]:9000/hook", "public addresses only"),
        ("http://[fd00::1]/hook", "public addresses only"),
        ("http://0.0.0.0/hook", "public addresses only"),
        ("http://2130706433/hook", "public addresses only"),
        ("ftp://example.com/hook", "http:// or https://"),
        ("HTTP://example.com/hook", "http:// or https://"),
        ("not a url", "http:// or https://"),
        ("http://", "absolute"),
        ("https://user:pw@example.com/hook", "user name"),
        (long.as_str(), "2048"),
    ] {
        let response = server
            .post(&acct.key, "/v1/images/generations")
            .json(&json!({"prompt": "x", "size": "256x256", "webhook_url": url}))
            .call()
            .await;
        let (_, error) = expect_error(response, "400 invalid_request_error invalid_value").await;
        assert_eq!(error["param"], "webhook_url", "{url}");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(says), "{url}: {message}");
        assert!(
            !message.contains("127.0.0.1") || url.contains("127.0.0.1"),
            "no resolved address is echoed: {message}"
        );
    }
    assert_eq!(server.balance(&acct.key).await, 10, "nothing charged");
    let list: Value = server.get_json(&acct.key, "/v1/tasks").await;
    assert_eq!(list["data"], json!([]), "nothing created");
    // A public address is accepted (this server runs no workers: nothing is sent).
    let task = server
        .create_task(
            &acct.key,
            json!({"prompt": "x", "size": "256x256", "webhook_url": "https://1.1.1.1/hook"}),
        )
        .await;
    assert_eq!(task["webhook"]["url"], "https://1.1.1.1/hook");
}

#[tokio::test]
async fn a_rotated_secret_signs_the_next_deliveries() {
    let (url, receiver) = receiver(vec![]).await;
    // No workers: the task stays queued, and cancelling it finishes it (and sends its webhook).
    let (_tmp, server) = TestServer::start(&["--allow-private-webhooks", "--workers", "0"]);
    let acct = server.account(10).await;
    let old = secret_of(&server, &acct.key).await;
    let rotated = server
        .post(&acct.key, "/v1/account/webhook-secret")
        .call()
        .await;
    assert_eq!(rotated.status(), 200);
    let new = rotated.json::<Value>().await.unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(new, old);
    assert_eq!(secret_of(&server, &acct.key).await, new);

    let task = server
        .create_task(
            &acct.key,
            json!({"prompt": "x", "size": "256x256", "webhook_url": url}),
        )
        .await;
    let id = task["id"].as_str().unwrap();
    let canceled = server
        .post(&acct.key, &format!("/v1/tasks/{id}/cancel"))
        .call()
        .await;
    assert_eq!(canceled.status(), 200);
    let task = wait_webhook(&server, &acct.key, id).await;
    assert_eq!(task["status"], "canceled");
    assert_eq!(task["webhook"]["state"], "delivered");
    let got = receiver.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(verify(&new, &got[0]), Ok(()));
    assert_eq!(verify(&old, &got[0]), Err(WebhookError::Mismatch));
    let sent: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(sent["status"], "canceled");
}

#[tokio::test]
async fn a_pending_delivery_survives_a_crash() {
    // A port with nothing behind it (yet): the first attempts are refused.
    let placeholder = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = placeholder.local_addr().unwrap();
    drop(placeholder);
    let url = format!("http://{addr}/hook");
    let (tmp, server) = TestServer::start(&["--allow-private-webhooks"]);
    let acct = server.account(10).await;
    let task = server
        .create_task(
            &acct.key,
            json!({"prompt": "x", "size": "256x256", "webhook_url": url}),
        )
        .await;
    let id = task["id"].as_str().unwrap().to_owned();
    // Wait for a failed attempt to be recorded, then kill the server outright.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let task: Value = server
            .get(&acct.key, &format!("/v1/tasks/{id}"))
            .fetch()
            .await;
        if let Some(first) = task["webhook"]["attempts"].get(0) {
            assert_eq!(first["status"], Value::Null);
            assert!(
                first["error"].as_str().unwrap().contains("refused"),
                "{task}"
            );
            assert!(task["webhook"]["next_attempt_at"].is_string());
            break;
        }
        assert!(Instant::now() < deadline, "no attempt: {task}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.kill();
    drop(server);

    // The receiver comes up; the restarted server delivers what the dead one could not.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (_, receiver) = receiver_on(listener, vec![]).await;
    let server = TestServer::start_in(tmp.path(), &["--allow-private-webhooks"]);
    let task = wait_webhook(&server, &acct.key, &id).await;
    assert_eq!(task["webhook"]["state"], "delivered", "{task}");
    let attempts = task["webhook"]["attempts"].as_array().unwrap();
    assert!(attempts.len() >= 2, "{task}");
    assert_eq!(attempts.last().unwrap()["status"], 200);
    let got = receiver.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    let secret = secret_of(&server, &acct.key).await;
    assert_eq!(verify(&secret, &got[0]), Ok(()));
}
