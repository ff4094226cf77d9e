//! How many requests one logical call costs during a full outage, with and without the retry
//! budget, against the seed's naive loop.
//!
//! A local server answers every request with 503 `service_unavailable` (no `Retry-After`). Each
//! strategy makes the same number of logical calls from the same number of concurrent workers,
//! and the server counts what reaches it. Time is scaled 1:1000 (the seed's 1 s backoff is 1 ms,
//! and the budget's refill of 0.1 token/s becomes 100 tokens/s), so the run takes about a second
//! and keeps the proportions of the real schedule.
//!
//! ```text
//! cargo run -p tollgate-client --example amplification --release -- [--calls N] [--concurrency C]
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{Reply, ScriptedServer};
use tollgate_client::{Client, ClientBuilder, ErrorCode, RetryBudgetConfig, RetryPolicy};

/// 1 real second = 1 ms here.
const SCALE: u32 = 1000;

fn scaled_policy() -> RetryPolicy {
    let seed = RetryPolicy::default();
    RetryPolicy {
        base: seed.base / SCALE,
        cap: seed.cap / SCALE,
        max_jitter: seed.max_jitter / SCALE,
        max_retry_after: seed.max_retry_after / SCALE,
        ..seed
    }
}

fn scaled_budget() -> RetryBudgetConfig {
    let d = RetryBudgetConfig::default();
    RetryBudgetConfig {
        refill_per_sec: d.refill_per_sec * f64::from(SCALE),
        ..d
    }
}

/// The seed's `requestWithRetry`, as written: up to 5 retries of 429/5xx, backoff plus jitter.
async fn seed_naive_loop(http: &reqwest::Client, url: &str) -> Result<(), String> {
    let max_retries = 5;
    for attempt in 0..=max_retries {
        let response = http.get(url).send().await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        if response.status().is_success() {
            return Ok(());
        }
        if status != 429 && status < 500 {
            return Err(format!("Request failed with status {status}"));
        }
        if attempt < max_retries {
            let backoff = (1000u64 << attempt).min(30_000);
            let jitter = rand_ms();
            tokio::time::sleep(
                Duration::from_millis(backoff + jitter).mul_f64(1.0 / f64::from(SCALE)),
            )
            .await;
        }
    }
    Err("Max retries exceeded".to_owned())
}

fn rand_ms() -> u64 {
    // The SDK's jitter source, in whole milliseconds in [0, 1000).
    u64::try_from(RetryPolicy::default().random_jitter().as_millis()).unwrap_or(0)
}

struct Row {
    name: &'static str,
    requests: usize,
    calls: usize,
    elapsed: Duration,
}

async fn run_sdk(
    name: &'static str,
    builder: ClientBuilder,
    server: &ScriptedServer,
    calls: usize,
    workers: usize,
) -> Row {
    let client = builder.build().unwrap();
    let before = server.count();
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (client, next): (Client, _) = (client.clone(), next.clone());
        handles.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < calls {
                let _ = client.account().await;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    Row {
        name,
        requests: server.count() - before,
        calls,
        elapsed: started.elapsed(),
    }
}

async fn run_naive(server: &ScriptedServer, calls: usize, workers: usize) -> Row {
    let http = reqwest::Client::new();
    let url = format!("{}/v1/account", server.base_url);
    let before = server.count();
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (http, url, next) = (http.clone(), url.clone(), next.clone());
        handles.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < calls {
                let _ = seed_naive_loop(&http, &url).await;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    Row {
        name: "seed's naive loop",
        requests: server.count() - before,
        calls,
        elapsed: started.elapsed(),
    }
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let calls = arg("--calls", 1000).max(1);
    let workers = arg("--concurrency", 20).max(1);
    let server = ScriptedServer::start(vec![], Reply::error(ErrorCode::ServiceUnavailable)).await;
    let sdk = || {
        Client::builder(&server.base_url)
            .api_key("tg_bench")
            .retry_policy(scaled_policy())
    };

    println!("Full outage: every response is 503. {calls} logical calls, {workers} concurrent, time scaled 1:{SCALE}.");
    println!();
    println!(
        "{:<34} {:>9} {:>17} {:>12}",
        "strategy", "requests", "requests per call", "elapsed (ms)"
    );
    let rows = vec![
        run_naive(&server, calls, workers).await,
        run_sdk(
            "SDK without budget",
            sdk().no_retry_budget(),
            &server,
            calls,
            workers,
        )
        .await,
        run_sdk(
            "SDK with the default budget",
            sdk().retry_budget(scaled_budget()),
            &server,
            calls,
            workers,
        )
        .await,
        run_sdk(
            "SDK, budget without time refill",
            sdk().retry_budget(RetryBudgetConfig {
                refill_per_sec: 0.0,
                ..RetryBudgetConfig::default()
            }),
            &server,
            calls,
            workers,
        )
        .await,
    ];
    for r in &rows {
        // Precision loss is irrelevant for a ratio of counts this small.
        #[allow(clippy::cast_precision_loss)]
        let per_call = r.requests as f64 / r.calls as f64;
        println!(
            "{:<34} {:>9} {:>17.2} {:>12}",
            r.name,
            r.requests,
            per_call,
            r.elapsed.as_millis()
        );
    }

    println!();
    println!("Isolated failure: five 503s, then 200, on a fresh client with the default budget.");
    let flaky = ScriptedServer::start(
        vec![Reply::error(ErrorCode::ServiceUnavailable); 5],
        Reply::json(200, r#"{"id":"acct_1","name":"a","credits":1,"rate_limit":{"requests_per_minute":60,"burst":10}}"#),
    )
    .await;
    let client = Client::builder(&flaky.base_url)
        .retry_policy(scaled_policy())
        .retry_budget(scaled_budget())
        .build()
        .unwrap();
    let outcome = client
        .account()
        .await
        .map(|_| "succeeded")
        .unwrap_or("failed");
    println!("{} requests, {outcome}", flaky.count());
}
