//! Faults of the store, injected for real, and the one invariant every scenario checks after
//! them: **a 202 is a promise**. Every task answered 202 is committed and charged, before and
//! after a restart; every refusal (a 503 with `Retry-After`) charged nothing; the ledger's pages
//! add up to the balance; no request is charged twice, whatever was retried.
//!
//! - a real full disk (a small tmpfs mounted as the data directory, filled by a file) under a
//!   burst of creates and top-ups, then space coming back, without a restart;
//! - the free-space floor (`--min-free-disk`): refused before the wall, reads still served;
//! - PostgreSQL backends terminated again and again under a mixed load;
//! - Redis stopped and started again under load (an instance of its own, never the shared one);
//! - SIGKILL under a burst, and the unanswered requests replayed with their `Idempotency-Key`.
//!
//! Mounting needs root (CI runs as root); without `CI` set, a machine that cannot mount says so
//! and the scenario is skipped, with `CI` set it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{expect_error, free_port, psql, skip, unique, Call, TestAccount, TestServer};
use futures_util::future::join_all;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Whether a missing capability or service must fail the test (CI) or only skip it.
/// A tmpfs of `bytes` mounted at a directory, unmounted when dropped.
struct SmallDisk {
    at: PathBuf,
}

impl SmallDisk {
    fn mount(at: &Path, bytes: u64) -> Option<SmallDisk> {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(at)
            .output();
        match out {
            Ok(out) if out.status.success() => Some(SmallDisk { at: at.to_owned() }),
            Ok(out) => {
                skip(&format!(
                    "cannot mount a small filesystem ({}): the full-disk scenario needs root",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
                None
            }
            Err(e) => {
                skip(&format!("cannot run mount ({e})"));
                None
            }
        }
    }

    /// Fills the filesystem with one file until at most `leave` bytes are free.
    fn fill(&self, leave: u64) -> PathBuf {
        use std::io::Write;
        let path = self.at.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        while file.write_all(&chunk).is_ok() {
            written += chunk.len() as u64;
        }
        let _ = file.flush();
        file.set_len(written.saturating_sub(leave)).unwrap();
        file.sync_all().unwrap();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// What one request got.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    body: Value,
    retry_after: Option<String>,
    replayed: bool,
}

async fn send(request: reqwest::RequestBuilder) -> Answer {
    let response = request.call().await;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let replayed = response.headers().get("idempotent-replayed").is_some();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    Answer {
        status,
        body,
        retry_after,
        replayed,
    }
}

/// A refusal the client can act on: 503 `service_unavailable`, with `Retry-After`.
fn assert_refused_cleanly(answer: &Answer) {
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(
        answer.body["error"]["code"], "service_unavailable",
        "{answer:?}"
    );
    assert!(
        answer.retry_after.is_some(),
        "503 without Retry-After: {answer:?}"
    );
    let text = answer.body.to_string();
    for leak in ["sqlx", "SQLITE", "database or disk", "/tmp/", "filler"] {
        assert!(!text.contains(leak), "internals in {text}");
    }
}

fn create(server: &TestServer, acct: &TestAccount, key: &str, i: usize) -> reqwest::RequestBuilder {
    server
        .post(&acct.key, "/v1/images/generations")
        .header("Idempotency-Key", key)
        .json(&json!({"prompt": format!("fault {i}"), "size": "256x256", "seed": i}))
}

fn top_up(server: &TestServer, acct: &TestAccount, note: &str) -> reqwest::RequestBuilder {
    server
        .http
        .post(server.url(&format!("/admin/accounts/{}/credits", acct.id)))
        .bearer_auth(common::ADMIN_TOKEN)
        .json(&json!({"amount": 1, "note": note}))
}

/// Every ledger entry of the account, page after page (`after` = the last id of a page).
async fn whole_ledger(server: &TestServer, key: &str) -> Vec<Value> {
    let mut entries: Vec<Value> = Vec::new();
    let mut after: Option<i64> = None;
    loop {
        let path = match after {
            None => "/v1/account/ledger?limit=7".to_owned(),
            Some(id) => format!("/v1/account/ledger?limit=7&after={id}"),
        };
        let page = server.get_json(key, &path).await;
        let data = page["data"].as_array().unwrap();
        entries.extend(data.iter().cloned());
        if page["has_more"] != true {
            return entries;
        }
        after = Some(data.last().unwrap()["id"].as_i64().unwrap());
    }
}

/// The invariant, from what the clients were told: each task answered 202 is there with its
/// charge, each acknowledged top-up is in the ledger, nothing else was charged, and the
/// ledger's pages add up to the balance.
async fn check_promises(
    server: &TestServer,
    acct: &TestAccount,
    accepted: &HashMap<String, u64>,
    topped_up: &HashSet<String>,
    granted: i64,
) {
    for (id, cost) in accepted {
        let task = server.get_json(&acct.key, &format!("/v1/tasks/{id}")).await;
        assert_eq!(
            task["id"],
            id.as_str(),
            "a task answered 202 is there: {task}"
        );
        assert_eq!(task["cost"], *cost);
    }
    let ledger = whole_ledger(server, &acct.key).await;
    let ids: HashSet<i64> = ledger.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), ledger.len(), "pages do not overlap");
    let charged: Vec<&str> = ledger
        .iter()
        .filter(|e| e["kind"] == "charge")
        .map(|e| e["task_id"].as_str().unwrap())
        .collect();
    let charged_set: HashSet<&str> = charged.iter().copied().collect();
    assert_eq!(charged.len(), charged_set.len(), "no task charged twice");
    let accepted_set: HashSet<&str> = accepted.keys().map(String::as_str).collect();
    assert_eq!(
        charged_set, accepted_set,
        "exactly the tasks answered 202 are charged"
    );
    let notes: HashSet<&str> = ledger
        .iter()
        .filter(|e| e["kind"] == "grant")
        .filter_map(|e| e["note"].as_str())
        .collect();
    for note in topped_up {
        assert!(
            notes.contains(note.as_str()),
            "acknowledged top-up {note} is kept"
        );
    }
    let top_ups = ledger
        .iter()
        .filter(|e| e["kind"] == "grant" && e["note"] != "opening balance")
        .count();
    assert_eq!(
        top_ups,
        topped_up.len(),
        "no top-up that was refused was kept"
    );
    let sum: i64 = ledger.iter().map(|e| e["delta"].as_i64().unwrap()).sum();
    let balance = i64::try_from(server.balance(&acct.key).await).unwrap();
    assert_eq!(sum, balance, "the ledger's pages add up to the balance");
    let charges: i64 = accepted.values().map(|c| *c as i64).sum();
    let refunds: i64 = ledger
        .iter()
        .filter(|e| e["kind"] == "refund")
        .map(|e| e["delta"].as_i64().unwrap())
        .sum();
    assert_eq!(
        balance,
        granted + topped_up.len() as i64 - charges + refunds,
        "balance = granted + top-ups − charges + refunds"
    );
}

/// Sends the requests of a burst, `wave` at a time; top-ups every tenth.
async fn burst(
    server: &TestServer,
    acct: &TestAccount,
    range: std::ops::Range<usize>,
    wave: usize,
) -> Vec<(usize, Answer)> {
    let mut answers = Vec::new();
    let all: Vec<usize> = range.collect();
    for chunk in all.chunks(wave) {
        let sent = chunk.iter().map(|&i| async move {
            let request = if i % 10 == 9 {
                top_up(server, acct, &format!("top-up {i}"))
            } else {
                create(server, acct, &format!("key-{i}"), i)
            };
            (i, send(request).await)
        });
        answers.extend(join_all(sent).await);
    }
    answers
}

/// Sorts a burst's answers into what was promised; anything but a promise or a clean 503 fails.
fn tally(
    answers: &[(usize, Answer)],
    accepted: &mut HashMap<String, u64>,
    topped_up: &mut HashSet<String>,
) -> Vec<usize> {
    let mut refused = Vec::new();
    for (i, answer) in answers {
        match answer.status {
            202 => {
                accepted.insert(
                    answer.body["id"].as_str().unwrap().to_owned(),
                    answer.body["cost"].as_u64().unwrap(),
                );
            }
            200 if i % 10 == 9 => {
                topped_up.insert(format!("top-up {i}"));
            }
            _ => {
                assert_refused_cleanly(answer);
                refused.push(*i);
            }
        }
    }
    refused
}

#[tokio::test]
async fn a_full_disk_is_refused_with_503_and_served_again_when_space_comes_back() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&tmp.path().join("data"), 128 << 20) else {
        return;
    };
    // No floor: this scenario is about the wall itself.
    let args = ["--min-free-disk", "0", "--workers", "1"];
    let server = TestServer::start_in(tmp.path(), &args);
    let acct = server.account(100_000).await;
    let mut accepted = HashMap::new();
    let mut topped_up = HashSet::new();
    let warm = burst(&server, &acct, 0..5, 5).await;
    assert!(tally(&warm, &mut accepted, &mut topped_up).is_empty());

    let filler = disk.fill(1 << 20);
    let answers = burst(&server, &acct, 5..400, 20).await;
    let refused = tally(&answers, &mut accepted, &mut topped_up);
    eprintln!(
        "disk full: {} of {} requests refused with 503, {} tasks and {} top-ups accepted in all",
        refused.len(),
        answers.len(),
        accepted.len(),
        topped_up.len()
    );
    assert!(
        !refused.is_empty(),
        "the disk never filled: {} answers, none refused",
        answers.len()
    );
    // Reads go on while it is full.
    assert_eq!(server.status(&acct.key, "/v1/account").await, 200);
    assert_eq!(server.status(&acct.key, "/healthz").await, 200);
    check_promises(&server, &acct, &accepted, &topped_up, 100_000).await;

    // Space comes back: served again, no restart, and /readyz says so.
    std::fs::remove_file(filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = send(server.http.get(server.url("/readyz"))).await;
        if ready.status == 200 {
            assert_eq!(ready.body["status"], "ready");
            break;
        }
        assert_refused_cleanly(&ready);
        assert!(Instant::now() < deadline, "never ready again: {ready:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The refused requests, retried with their Idempotency-Key as a client would: each is
    // carried out once now; the accepted ones replay their first answer.
    for i in &refused {
        let request = if i % 10 == 9 {
            top_up(&server, &acct, &format!("top-up {i}"))
        } else {
            create(&server, &acct, &format!("key-{i}"), *i)
        };
        let answer = send(request).await;
        assert!(matches!(answer.status, 200 | 202), "{answer:?}");
        tally(&[(*i, answer)], &mut accepted, &mut topped_up);
    }
    let replayed = send(create(&server, &acct, "key-0", 0)).await;
    assert_eq!(replayed.status, 202);
    assert!(replayed.replayed);
    assert!(accepted.contains_key(replayed.body["id"].as_str().unwrap()));
    check_promises(&server, &acct, &accepted, &topped_up, 100_000).await;
    assert!(
        !server.logs().contains("internal error"),
        "no fault of the disk is a 500"
    );

    // And all of it is still there after a restart.
    server.stop();
    let server = TestServer::start_in(tmp.path(), &args);
    check_promises(&server, &acct, &accepted, &topped_up, 100_000).await;
    for id in accepted.keys() {
        let task = server.wait_task(&acct.key, id).await;
        assert_eq!(task["status"], "succeeded", "{task}");
    }
    drop(server);
    drop(disk);
}

#[tokio::test]
async fn below_the_free_space_floor_writes_wait_and_reads_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&tmp.path().join("data"), 32 << 20) else {
        return;
    };
    let server = TestServer::start_in(tmp.path(), &["--min-free-disk", "8MiB"]);
    let acct = server.account(1000).await;
    let before = server
        .create_task(&acct.key, json!({"prompt": "before", "size": "256x256"}))
        .await;
    let id = before["id"].as_str().unwrap().to_owned();
    server.wait_task(&acct.key, &id).await;
    assert_eq!(
        send(server.http.get(server.url("/readyz"))).await.status,
        200
    );

    let filler = disk.fill(4 << 20);
    let refused = server
        .post(&acct.key, "/v1/images/generations")
        .json(&json!({"prompt": "while low", "size": "256x256"}))
        .call()
        .await;
    let (headers, error) = expect_error(refused, "503 server_error service_unavailable").await;
    assert!(headers.get("retry-after").is_some());
    assert!(
        error["message"].as_str().unwrap().contains("disk space"),
        "{error}"
    );
    assert_refused_cleanly(&send(top_up(&server, &acct, "while low")).await);
    // Reads are served: the account, the task, its image.
    assert_eq!(server.balance(&acct.key).await, 1000 - 1);
    assert_eq!(
        server.status(&acct.key, &format!("/v1/tasks/{id}")).await,
        200
    );
    assert_eq!(
        server
            .status(&acct.key, &format!("/v1/tasks/{id}/images/0"))
            .await,
        200
    );
    assert_refused_cleanly(&send(server.http.get(server.url("/readyz"))).await);
    let metrics = server
        .http
        .get(server.url("/metrics"))
        .call()
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tollgate_store_faults_total{kind=\"low_disk\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("tollgate_ready 0"), "{metrics}");

    std::fs::remove_file(filler).unwrap();
    let after = server
        .create_task(&acct.key, json!({"prompt": "after", "size": "256x256"}))
        .await;
    server
        .wait_task(&acct.key, after["id"].as_str().unwrap())
        .await;
    assert_eq!(
        server.balance(&acct.key).await,
        1000 - 2,
        "only the two accepted tasks were charged"
    );
    drop(server);
    drop(disk);
}

#[tokio::test]
async fn postgres_backends_terminated_under_load_lose_nothing_and_give_no_500() {
    let Ok(url) = std::env::var("TOLLGATE_TEST_DATABASE_URL") else {
        skip("TOLLGATE_TEST_DATABASE_URL is not set: the PostgreSQL fault scenario");
        return;
    };
    let schema = unique("tg_fault");
    let app = unique("tollgate_fault");
    let separator = if url.contains('?') { '&' } else { '?' };
    let tagged = format!("{url}{separator}application_name={app}");
    let (_tmp, server) = TestServer::start(&[
        "--database-url",
        &tagged,
        "--database-schema",
        &schema,
        "--workers",
        "1",
    ]);
    let acct = server.account(1_000_000).await;

    // The killer: every backend of this server, every 150 ms, for as long as the load runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let (url, app, stop) = (url.clone(), app.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut killed = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = psql(
                    &url,
                    &format!(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = '{app}'"
                    ),
                );
                killed += out.trim().parse::<usize>().unwrap_or(0);
                std::thread::sleep(Duration::from_millis(150));
            }
            killed
        })
    };

    // Four clients, each creating (with its Idempotency-Key, retried on 503 as the SDK
    // would), reading and topping up, for a few seconds.
    let deadline = Instant::now() + Duration::from_secs(6);
    let clients = (0..4).map(|c| {
        let (server, acct) = (&server, &acct);
        async move {
            let mut accepted = HashMap::new();
            let mut topped_up = HashSet::new();
            let mut refusals = 0usize;
            let mut i = 0;
            while Instant::now() < deadline {
                i += 1;
                let key = format!("c{c}-{i}");
                let mut created = None;
                for _ in 0..200 {
                    let answer = send(create(server, acct, &key, i)).await;
                    if answer.status == 202 {
                        created = Some(answer);
                        break;
                    }
                    assert_refused_cleanly(&answer);
                    refusals += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let created = created.expect("a create is carried out once the database is back");
                accepted.insert(
                    created.body["id"].as_str().unwrap().to_owned(),
                    created.body["cost"].as_u64().unwrap(),
                );
                let read = send(server.get(&acct.key, "/v1/account")).await;
                if read.status != 200 {
                    assert_refused_cleanly(&read);
                    refusals += 1;
                }
                if i % 5 == 0 {
                    let note = format!("top-up c{c}-{i}");
                    let answer = send(top_up(server, acct, &note)).await;
                    if answer.status == 200 {
                        topped_up.insert(note);
                    } else {
                        assert_refused_cleanly(&answer);
                        refusals += 1;
                    }
                }
            }
            (accepted, topped_up, refusals)
        }
    });
    let results = join_all(clients).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let killed = killer.join().unwrap();
    assert!(killed > 0, "no backend was terminated");

    let mut accepted = HashMap::new();
    let mut topped_up = HashSet::new();
    let mut refusals = 0;
    for (a, t, r) in results {
        accepted.extend(a);
        topped_up.extend(t);
        refusals += r;
    }
    eprintln!(
        "{killed} backends terminated; {} tasks accepted, {} top-ups, {refusals} clean 503s",
        accepted.len(),
        topped_up.len()
    );
    assert!(!accepted.is_empty());
    check_promises(&server, &acct, &accepted, &topped_up, 1_000_000).await;
    let logs = server.logs();
    assert!(
        !logs.contains("internal error"),
        "a terminated backend is never a 500"
    );
    drop(server);
    psql(&url, &format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"));
}

/// A Redis of this test's own (the machine's shared one is never stopped).
fn start_redis(port: u16) -> Option<std::process::Child> {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(child) => {
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "redis-server did not start");
                std::thread::sleep(Duration::from_millis(10));
            }
            Some(child)
        }
        Err(e) => {
            skip(&format!("cannot start redis-server ({e})"));
            None
        }
    }
}

#[tokio::test]
async fn a_redis_restart_is_503_while_down_and_served_within_2_s_after() {
    let port = free_port();
    let Some(mut redis) = start_redis(port) else {
        return;
    };
    let url = format!("redis://127.0.0.1:{port}");
    let (_tmp, server) = TestServer::start(&["--redis-url", &url]);
    let acct = server.account(10).await;
    assert_eq!(server.status(&acct.key, "/v1/account").await, 200);

    redis.kill().unwrap();
    redis.wait().unwrap();
    let down_since = Instant::now();
    let mut refused = 0;
    while down_since.elapsed() < Duration::from_secs(3) {
        let answer = send(server.get(&acct.key, "/v1/account")).await;
        assert_refused_cleanly(&answer);
        refused += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused > 10);

    let mut redis = start_redis(port).unwrap();
    let back = Instant::now();
    loop {
        let answer = send(server.get(&acct.key, "/v1/account")).await;
        if answer.status == 200 {
            break;
        }
        assert_refused_cleanly(&answer);
        assert!(
            back.elapsed() < Duration::from_secs(2),
            "still refused {:?} after Redis came back",
            back.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("served again {:?} after Redis was back", back.elapsed());
    assert_eq!(
        send(server.http.get(server.url("/readyz"))).await.status,
        200
    );
    drop(server);
    let _ = redis.kill();
    let _ = redis.wait();
}

#[tokio::test]
async fn sigkill_under_a_burst_then_replay_charges_each_request_once() {
    // Every other request is held in its handler (after its key is reserved, before its task
    // is written) when the kill comes: those are the requests left unanswered.
    let (tmp, server) = TestServer::start(&["--workers", "1", "--simulate-errors"]);
    let acct = server.account(10_000).await;
    let total = 120;
    // The burst, all at once; the server is killed while it is answering.
    let answered = std::sync::atomic::AtomicUsize::new(0);
    let answers = {
        let sent = (0..total).map(|i| {
            let mut request = create(&server, &acct, &format!("burst-{i}"), i);
            if i % 2 == 1 {
                request = request.header("Tollgate-Simulate-Delay-Ms", "5000");
            }
            let answered = &answered;
            async move {
                let response = request.send().await.ok();
                answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                response
            }
        });
        // Killed once a quarter of the burst is answered: the rest is in flight or unsent.
        let kill = async {
            let deadline = Instant::now() + Duration::from_secs(5);
            while answered.load(std::sync::atomic::Ordering::SeqCst) < total / 4
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            server.kill();
        };
        let (answers, ()) = tokio::join!(join_all(sent), kill);
        answers
    };
    let mut first_answers: HashMap<usize, String> = HashMap::new();
    for (i, response) in answers.into_iter().enumerate() {
        if let Some(response) = response {
            if response.status() == 202 {
                if let Ok(body) = response.json::<Value>().await {
                    first_answers.insert(i, body["id"].as_str().unwrap().to_owned());
                }
            }
        }
    }
    drop(server);

    let server = TestServer::start_in(tmp.path(), &["--workers", "1", "--simulate-errors"]);
    let mut accepted = HashMap::new();
    for i in 0..total {
        let answer = send(create(&server, &acct, &format!("burst-{i}"), i)).await;
        assert_eq!(answer.status, 202, "{answer:?}");
        let id = answer.body["id"].as_str().unwrap().to_owned();
        if let Some(first) = first_answers.get(&i) {
            assert_eq!(&id, first, "an answered request replays its task");
            assert!(answer.replayed);
        }
        accepted.insert(id, answer.body["cost"].as_u64().unwrap());
    }
    eprintln!(
        "{} of {total} answered before the kill",
        first_answers.len()
    );
    assert!(
        first_answers.len() < total,
        "the kill came after every answer: nothing was left to replay"
    );
    assert_eq!(accepted.len(), total, "one task per request");
    check_promises(&server, &acct, &accepted, &HashSet::new(), 10_000).await;
}
