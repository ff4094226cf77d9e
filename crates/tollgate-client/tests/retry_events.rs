//! Each retry is a `tracing` event with the attempt, the status or the cause, and the delay.
//!
//! A binary of its own: tracing caches per-callsite interest process-wide, so a thread-local
//! subscriber is only reliable when no other test runs beside it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

mod support;

use support::{Reply, ScriptedServer};
use tollgate_client::{Client, ErrorCode, RetryPolicy};

const KEY: &str = "tg_never_logged_0123456789";

struct Writer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn each_retry_is_a_tracing_event_without_secrets() {
    let log = Arc::new(Mutex::new(Vec::<u8>::new()));
    let sink = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || Writer(sink.clone()))
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = ScriptedServer::start(
        vec![Reply::error(ErrorCode::ServiceUnavailable), Reply::Close],
        Reply::json(200, r#"{"id":"acct_1","name":"a","credits":1,"rate_limit":{"requests_per_minute":1,"burst":1}}"#),
    )
    .await;
    let policy = RetryPolicy {
        base: Duration::from_millis(10),
        max_jitter: Duration::ZERO,
        ..RetryPolicy::default()
    };
    let client = Client::builder(&server.base_url)
        .api_key(KEY)
        .retry_policy(policy)
        .build()
        .unwrap();
    client.account().await.unwrap();
    assert_eq!(server.count(), 3);

    let text = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("retrying")).collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("attempt=1") && lines[0].contains("status=503"),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains("code=\"service_unavailable\""),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains("delay_ms=10") && lines[0].contains("source=backoff 10 ms"),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains("call=\"GET /v1/account\""),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains("attempt=2") && lines[1].contains("cause="),
        "{}",
        lines[1]
    );
    assert!(lines[1].contains("delay_ms=20"), "{}", lines[1]);
    assert!(!text.contains(KEY), "{text}");
}
