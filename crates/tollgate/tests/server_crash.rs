//! A crash loses nothing: SIGKILL in the middle of a batch, restart, and every accepted task
//! ends (the ones that were running are run again), with balance, charges and refunds adding up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Call, TestServer};
use serde_json::{json, Value};

#[tokio::test]
async fn sigkill_mid_batch_then_restart_finishes_every_accepted_task() {
    let (tmp, server) = TestServer::start(&["--workers", "2"]);
    let acct = server.account(1000).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let task = server
            .create_task(
                &acct.key,
                json!({"prompt": format!("batch {i}"), "n": 4, "size": "1024x1024"}),
            )
            .await;
        ids.push(task["id"].as_str().unwrap().to_owned());
    }
    // Kill while tasks are running (two workers busy on heavy tasks).
    server.wait_until_running(&acct.key, 1).await;
    server.kill();
    drop(server);

    let server = TestServer::start_in(tmp.path(), &["--workers", "2"]);
    // The restart says what it recovered.
    server.wait_for_log("queued again").await;
    for id in &ids {
        let task = server.wait_task(&acct.key, id).await;
        assert_eq!(task["status"], "succeeded", "{task}");
        let png = server
            .get(&acct.key, &format!("/v1/tasks/{id}/images/3"))
            .call()
            .await;
        assert_eq!(png.status(), 200);
    }
    // balance + charges − refunds = what was granted; one charge per task, none twice.
    let ledger: Value = server
        .get_json(&acct.key, "/v1/account/ledger?limit=100")
        .await;
    let entries = ledger["data"].as_array().unwrap();
    let sum = |kind: &str| {
        entries
            .iter()
            .filter(|e| e["kind"] == kind)
            .map(|e| e["delta"].as_i64().unwrap())
            .sum::<i64>()
    };
    let balance = i64::try_from(server.balance(&acct.key).await).unwrap();
    assert_eq!(sum("grant"), 1000);
    assert_eq!(entries.iter().filter(|e| e["kind"] == "charge").count(), 10);
    assert_eq!(
        balance - sum("charge") - sum("refund"),
        1000,
        "balance + charges − refunds = granted"
    );
    assert_eq!(balance, 1000 - 10 * 16);
}
