//! The SDK against the real server (`tollgate serve` on 127.0.0.1 port 0, `--simulate-errors`):
//! the happy path, simulated failures, a `409 idempotency_key_in_use`, and — through a proxy that
//! loses the response of the first POST after the server handled it — the retry with the same
//! `Idempotency-Key` that ends with exactly one task and one charge.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestServer, ADMIN_TOKEN};

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tollgate_client::{
    AdminClient, Client, ClientBuilder, CreateAccountRequest, CreateGenerationRequest, DelaySource,
    ErrorCode, ImageSize, ListParams, RateLimit, RetryPolicy, StopReason, TaskStatus,
};

/// A `tollgate serve --simulate-errors` of this test (the shared harness), killed when dropped.
struct Server {
    base: String,
    _server: TestServer,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let (dir, server) = TestServer::start(&["--simulate-errors"]);
        Server {
            base: server.base.clone(),
            _server: server,
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.base.trim_start_matches("http://").parse().unwrap()
    }

    fn admin(&self) -> AdminClient {
        Client::builder(&self.base)
            .admin_token(ADMIN_TOKEN)
            .build_admin()
            .unwrap()
    }

    /// A new account with `credits` and a rate limit the tests do not meet; its API key.
    async fn account(&self, credits: u64) -> (String, String) {
        let created = self
            .admin()
            .create_account(&CreateAccountRequest {
                name: "e2e".into(),
                credits,
                rate_limit: Some(RateLimit {
                    requests_per_minute: 6000,
                    burst: 200,
                }),
            })
            .await
            .unwrap();
        (created.account.id, created.api_key)
    }
}

/// The seed's policy, 20× faster; `Retry-After` stays what the server says.
fn fast_policy() -> RetryPolicy {
    RetryPolicy {
        base: Duration::from_millis(50),
        cap: Duration::from_millis(1500),
        max_jitter: Duration::from_millis(50),
        ..RetryPolicy::default()
    }
}

/// A client whose every request carries `headers` (e.g. `Tollgate-Simulate: 503`).
fn client_with(base: &str, key: &str, headers: &[(&'static str, &'static str)]) -> ClientBuilder {
    let mut map = reqwest::header::HeaderMap::new();
    for (name, value) in headers {
        map.insert(*name, reqwest::header::HeaderValue::from_static(value));
    }
    let http = reqwest::Client::builder()
        .default_headers(map)
        .build()
        .unwrap();
    Client::builder(base)
        .api_key(key)
        .retry_policy(fast_policy())
        .http_client(http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_drives_the_real_server() {
    let server = Server::start();
    let (account_id, key) = server.account(10).await;
    let client = Client::builder(&server.base)
        .api_key(&*key)
        .retry_policy(fast_policy())
        .build()
        .unwrap();

    let request = CreateGenerationRequest {
        size: Some(ImageSize::S256),
        ..CreateGenerationRequest::new("a lighthouse")
    };
    let task = client.create_generation(&request).await.unwrap();
    assert_eq!(task.cost, 1);
    let done = client
        .wait_for_task(&task.id, Duration::from_millis(100), |_| {})
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Succeeded);
    let png = client.get_image(&done.id, 0).await.unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(client.account().await.unwrap().credits, 9);

    // 402: nothing created, nothing charged, not retried.
    let expensive = CreateGenerationRequest {
        n: Some(4),
        size: Some(ImageSize::S1024),
        ..CreateGenerationRequest::new("x")
    };
    let e = client.create_generation(&expensive).await.unwrap_err();
    assert_eq!(e.error_code(), Some(ErrorCode::InsufficientCredits));
    assert_eq!(
        (e.attempts(), e.stop_reason()),
        (1, StopReason::NotRetryable)
    );
    assert!(e.request_id().is_some_and(|id| !id.is_empty()));
    assert_eq!(client.account().await.unwrap().credits, 9);
    assert_eq!(
        client
            .list_tasks(&ListParams::default())
            .await
            .unwrap()
            .data
            .len(),
        1
    );

    let e = client.get_task("task_doesnotexist").await.unwrap_err();
    assert_eq!((e.status(), e.attempts()), (Some(404), 1));

    // A revoked key is refused at once.
    let admin = server.admin();
    let extra = admin.create_key(&account_id).await.unwrap();
    let other = Client::builder(&server.base)
        .api_key(&*extra.api_key)
        .build()
        .unwrap();
    other.account().await.unwrap();
    admin.revoke_key(&extra.id).await.unwrap();
    let e = other.account().await.unwrap_err();
    assert_eq!(
        (e.status(), e.code(), e.attempts()),
        (Some(401), Some("invalid_api_key"), 1)
    );
    assert!(!e.to_string().contains(&extra.api_key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_failures_are_retried_then_reported_with_their_history() {
    let server = Server::start();
    let (_, key) = server.account(10).await;

    // 503 with Retry-After: 1 — every retry waits at least a second.
    let client = client_with(&server.base, &key, &[("tollgate-simulate", "503")])
        .max_retries(2)
        .build()
        .unwrap();
    let started = Instant::now();
    let e = client
        .create_generation(&CreateGenerationRequest::new("a cat"))
        .await
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(e.attempts(), 3);
    assert_eq!(
        (e.status(), e.code(), e.stop_reason()),
        (
            Some(503),
            Some("service_unavailable"),
            StopReason::RetriesExhausted
        )
    );
    assert_eq!(e.retry_after(), Some(Duration::from_secs(1)));
    let history = e.history();
    assert!(history[1..].iter().all(|a| matches!(a.waited.map(|w| w.source), Some(DelaySource::RetryAfter(d)) if d == Duration::from_secs(1))));
    let ids: std::collections::HashSet<_> = history
        .iter()
        .map(|a| a.request_id.clone().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "each attempt is its own request");
    assert!(e.to_string().contains("3 attempts"), "{e}");

    // 500: backoff, all six attempts.
    let client = client_with(&server.base, &key, &[("tollgate-simulate", "500")])
        .build()
        .unwrap();
    let e = client.account().await.unwrap_err();
    assert_eq!((e.attempts(), e.code()), (6, Some("internal_error")));
    assert!(e.is_retryable());

    // 429 without retries: the error says when to come back.
    let client = client_with(&server.base, &key, &[("tollgate-simulate", "429")])
        .max_retries(0)
        .build()
        .unwrap();
    let e = client.account().await.unwrap_err();
    assert_eq!(
        (e.status(), e.retry_after()),
        (Some(429), Some(Duration::from_secs(1)))
    );

    // None of it charged anything.
    let plain = Client::builder(&server.base)
        .api_key(&*key)
        .build()
        .unwrap();
    assert_eq!(plain.account().await.unwrap().credits, 10);
    assert!(plain
        .list_tasks(&ListParams::default())
        .await
        .unwrap()
        .data
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_409_in_use_is_retried_until_the_first_request_answers() {
    let server = Server::start();
    let (_, key) = server.account(10).await;
    let request = CreateGenerationRequest {
        size: Some(ImageSize::S256),
        ..CreateGenerationRequest::new("a slow cat")
    };
    // The first request is held in its handler for 1.5 s; the second, same key and body, meets it.
    let slow = client_with(
        &server.base,
        &key,
        &[("tollgate-simulate-delay-ms", "1500")],
    )
    .build()
    .unwrap();
    let first = tokio::spawn({
        let request = request.clone();
        async move { slow.create_generation_with_key(&request, "order-1").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let once = Client::builder(&server.base)
        .api_key(&*key)
        .max_retries(0)
        .build()
        .unwrap();
    let e = once
        .create_generation_with_key(&request, "order-1")
        .await
        .unwrap_err();
    assert_eq!(
        (e.status(), e.code()),
        (Some(409), Some("idempotency_key_in_use"))
    );
    assert!(e.is_retryable());
    let policy = RetryPolicy {
        base: Duration::from_millis(400),
        ..fast_policy()
    };
    let second = Client::builder(&server.base)
        .api_key(&*key)
        .retry_policy(policy)
        .build()
        .unwrap();
    let replayed = second
        .create_generation_with_key(&request, "order-1")
        .await
        .unwrap();
    let original = first.await.unwrap().unwrap();
    assert_eq!(replayed.id, original.id);
    assert_eq!(second.account().await.unwrap().credits, 9);
    assert_eq!(
        second
            .list_tasks(&ListParams::default())
            .await
            .unwrap()
            .data
            .len(),
        1
    );
}

/// Forwards to the server, but loses the answer of the first `POST /v1/images/generations`
/// after the server sent it. Records each POST's `Idempotency-Key` and whether its answer was a
/// replay.
struct LossyProxy {
    base: String,
    posts: Arc<Mutex<Vec<(String, bool)>>>,
}

impl LossyProxy {
    async fn start(upstream: SocketAddr) -> LossyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let posts = Arc::new(Mutex::new(Vec::new()));
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let p = posts.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (p, lost) = (p.clone(), lost.clone());
                tokio::spawn(async move {
                    let _ = relay(stream, upstream, p, lost).await;
                });
            }
        });
        LossyProxy { base, posts }
    }
}

async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    posts: Arc<Mutex<Vec<(String, bool)>>>,
    lost: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<()> {
    // One request per connection: read its head and body.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            l.split_once(':')
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_owned())
        })
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    // Ask the server to close after answering, so its answer ends at EOF.
    let (request_line, rest) = head.split_once("\r\n").unwrap_or((&head, ""));
    let rest: String = rest
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect::<Vec<_>>()
        .join("\r\n");
    let mut forwarded = format!("{request_line}\r\nconnection: close\r\n{rest}").into_bytes();
    forwarded.extend_from_slice(&buf[head_end..]);
    let mut server = TcpStream::connect(upstream).await?;
    server.write_all(&forwarded).await?;
    let mut response = Vec::new();
    server.read_to_end(&mut response).await?;

    if request_line.starts_with("POST /v1/images/generations ") {
        let text = String::from_utf8_lossy(&response).to_ascii_lowercase();
        let replayed = text.contains("\r\nidempotent-replayed: true");
        posts
            .lock()
            .unwrap()
            .push((header("idempotency-key").unwrap_or_default(), replayed));
        if !lost.swap(true, std::sync::atomic::Ordering::SeqCst) {
            // The server has done the work and answered; the client never hears of it.
            return Ok(());
        }
    }
    client.write_all(&response).await?;
    client.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_response_is_retried_with_the_same_key_and_charged_once() {
    let server = Server::start();
    let (account_id, key) = server.account(10).await;
    let proxy = LossyProxy::start(server.addr()).await;
    let client = Client::builder(&proxy.base)
        .api_key(&*key)
        .retry_policy(fast_policy())
        .build()
        .unwrap();

    let request = CreateGenerationRequest {
        n: Some(2),
        size: Some(ImageSize::S512),
        ..CreateGenerationRequest::new("a fox")
    };
    let task = client.create_generation(&request).await.unwrap();
    assert_eq!(task.cost, 4);

    let posts = proxy.posts.lock().unwrap().clone();
    assert_eq!(posts.len(), 2, "{posts:?}");
    assert!(!posts[0].0.is_empty());
    assert_eq!(
        posts[0].0, posts[1].0,
        "the retry carries the same Idempotency-Key"
    );
    assert_eq!(
        (posts[0].1, posts[1].1),
        (false, true),
        "the retry's answer is the stored one"
    );

    let direct = Client::builder(&server.base)
        .api_key(&*key)
        .build()
        .unwrap();
    let tasks = direct.list_tasks(&ListParams::default()).await.unwrap();
    assert_eq!(tasks.data.len(), 1);
    assert_eq!(tasks.data[0].id, task.id);
    assert_eq!(direct.account().await.unwrap().credits, 10 - 4);
    let charges: Vec<_> = server
        .admin()
        .ledger(&account_id, &tollgate_client::ListParams::default())
        .await
        .unwrap()
        .data
        .into_iter()
        .filter(|e| e.kind == "charge")
        .collect();
    assert_eq!(charges.len(), 1, "{charges:?}");
    assert_eq!(charges[0].delta, -4);
}
