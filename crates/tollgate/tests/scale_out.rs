//! Several instances on one PostgreSQL and one Redis keep the guarantees of one: exactly as many
//! tasks as the credits pay for, one rate limit per account, revocations and limit changes on
//! every instance within a second although each serves keys and finished tasks from its caches
//! (also after its change feed is cut), refusals repeated locally without asking Redis, and the
//! tasks of an instance killed mid-task finished by the others.
//!
//! Needs `TOLLGATE_TEST_DATABASE_URL` and `TOLLGATE_TEST_REDIS_URL` (CI sets both); without
//! them the tests say so and return.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{expect_error, psql, unique, Call, TestServer};
use futures_util::future::join_all;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

struct Cluster {
    instances: Vec<TestServer>,
    url: String,
    schema: String,
    _dir: tempfile::TempDir,
}

fn services() -> Option<(String, String)> {
    match (
        std::env::var("TOLLGATE_TEST_DATABASE_URL"),
        std::env::var("TOLLGATE_TEST_REDIS_URL"),
    ) {
        (Ok(db), Ok(redis)) => Some((db, redis)),
        _ => {
            common::skip(
                "scale-out (TOLLGATE_TEST_DATABASE_URL / TOLLGATE_TEST_REDIS_URL not set)",
            );
            None
        }
    }
}

impl Cluster {
    /// `workers[i]` workers on instance i, all on one schema, one Redis and one image directory.
    fn start(workers: &[usize], extra: &[&str]) -> Option<Cluster> {
        let (url, redis) = services()?;
        let schema = unique("tg_scale");
        let dir = tempfile::tempdir().unwrap();
        let instances = workers
            .iter()
            .map(|w| {
                let w = w.to_string();
                let mut args = vec![
                    "--database-url",
                    url.as_str(),
                    "--database-schema",
                    schema.as_str(),
                    "--redis-url",
                    redis.as_str(),
                    "--workers",
                    w.as_str(),
                ];
                args.extend_from_slice(extra);
                TestServer::start_in(dir.path(), &args)
            })
            .collect();
        Some(Cluster {
            instances,
            url,
            schema,
            _dir: dir,
        })
    }

    fn drop_schema(&self) {
        let status = Command::new("psql")
            .arg(&self.url)
            .args([
                "-q",
                "-c",
                &format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema),
            ])
            .status();
        if let Err(e) = status {
            eprintln!("could not drop {}: {e}", self.schema);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.instances.clear();
        self.drop_schema();
    }
}

#[tokio::test]
async fn three_instances_share_one_ledger_one_limit_and_one_set_of_keys() {
    let Some(cluster) = Cluster::start(&[0, 0, 0], &[]) else {
        return;
    };
    let [a, b, c] = [
        &cluster.instances[0],
        &cluster.instances[1],
        &cluster.instances[2],
    ];

    // 300 concurrent creates spread over the three, against 100 credits: exactly 100 accepted.
    let acct = a.account(100).await;
    let creates = (0..300).map(|i| {
        let server = &cluster.instances[i % 3];
        server
            .post(&acct.key, "/v1/images/generations")
            .json(&json!({"prompt": format!("p{i}"), "size": "256x256"}))
            .send()
    });
    let statuses: Vec<u16> = join_all(creates)
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        100,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 402).count(), 200);
    for server in [a, b, c] {
        assert_eq!(server.balance(&acct.key).await, 0);
    }
    let ledger: Value = b.get_json(&acct.key, "/v1/account/ledger?limit=100").await;
    let charges = ledger["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "charge")
        .count();
    assert_eq!(charges, 100);

    // One rate limit across the three: burst 10, then one request per 10 s.
    let limited = a.account_with_limit(10, 6, 10).await;
    let mut admitted = 0;
    for i in 0..30 {
        let response = cluster.instances[i % 3]
            .get(&limited.key, "/v1/account")
            .call()
            .await;
        match response.status().as_u16() {
            200 => admitted += 1,
            429 => {
                let (headers, _) =
                    expect_error(response, "429 rate_limit_error rate_limit_exceeded").await;
                let wait: u64 = headers
                    .get("retry-after")
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((1..=10).contains(&wait), "{wait}");
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        (10..=11).contains(&admitted),
        "burst of 10 across three instances, within one request: {admitted}"
    );

    // A key revoked through one instance is refused by the others at once.
    let (key_id, key) = a.new_key(&acct.id).await;
    let (key, key_id) = (key.as_str(), key_id.as_str());
    assert_eq!(c.status(key, "/v1/account").await, 200);
    let revoked_at = Instant::now();
    assert_eq!(
        a.admin(
            reqwest::Method::DELETE,
            &format!("/admin/keys/{key_id}"),
            None
        )
        .await
        .status(),
        204
    );
    for server in [b, c] {
        refused_within_a_second(server, key, revoked_at).await;
    }
}

/// Asks `server` with `key` until it answers `status`, and checks that this came within one
/// second of `changed_at` (each instance learns of a change made on another through the
/// store's change feed); until then the answers are 200s.
async fn answered_within_a_second(
    server: &TestServer,
    key: &str,
    status: u16,
    changed_at: Instant,
) -> reqwest::Response {
    loop {
        let response = server.get(key, "/v1/models").call().await;
        if response.status() == status {
            assert!(changed_at.elapsed() < Duration::from_secs(1));
            return response;
        }
        assert_eq!(response.status(), 200);
        assert!(
            changed_at.elapsed() < Duration::from_secs(1),
            "still served as before the change after {:?}",
            changed_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A revoked key refused by `server` within a second of `revoked_at`.
async fn refused_within_a_second(server: &TestServer, key: &str, revoked_at: Instant) {
    let response = answered_within_a_second(server, key, 401, revoked_at).await;
    expect_error(response, "401 authentication_error invalid_api_key").await;
}

#[tokio::test]
async fn tasks_of_an_instance_killed_mid_task_finish_on_the_others() {
    // Instance 0 has two workers, the others one each: four tasks running at once means two
    // of them are instance 0's, whatever the scheduling.
    let Some(mut cluster) = Cluster::start(&[2, 1, 1], &["--task-lease", "2s"]) else {
        return;
    };
    let acct = cluster.instances[1].account(1000).await;
    let mut ids = Vec::new();
    for i in 0..8 {
        let task = cluster.instances[1]
            .create_task(
                &acct.key,
                json!({"prompt": format!("heavy {i}"), "n": 4, "size": "1024x1024"}),
            )
            .await;
        ids.push(task["id"].as_str().unwrap().to_owned());
    }
    let observer = &cluster.instances[1];
    observer.wait_until_running(&acct.key, 4).await;
    let victim = cluster.instances.remove(0);
    victim.kill();
    drop(victim);

    let observer = &cluster.instances[0];
    for id in &ids {
        let task = observer.wait_task(&acct.key, id).await;
        assert_eq!(task["status"], "succeeded", "{task}");
        assert_eq!(task["images"].as_array().unwrap().len(), 4);
    }
    // Nothing charged twice, nothing refunded: 8 tasks × 16 credits.
    assert_eq!(observer.balance(&acct.key).await, 1000 - 8 * 16);
    let ledger: Value = observer
        .get_json(&acct.key, "/v1/account/ledger?limit=100")
        .await;
    let kinds: Vec<&str> = ledger["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.iter().filter(|k| **k == "charge").count(), 8);
    assert_eq!(kinds.iter().filter(|k| **k == "refund").count(), 0);
}

/// A Redis of our own that we can stop, to see the failure modes.
struct OwnRedis {
    child: std::process::Child,
    url: String,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server package)");
        let url = format!("redis://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        OwnRedis { child, url }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn when_redis_goes_away_the_limit_fails_closed_by_default_or_open_if_asked() {
    for (mode, expect_status) in [("closed", 503u16), ("open", 200u16)] {
        let mut redis = OwnRedis::start();
        let (_tmp, server) =
            TestServer::start(&["--redis-url", &redis.url, "--redis-failure", mode]);
        let acct = server.account(10).await;
        assert_eq!(server.status(&acct.key, "/v1/account").await, 200);
        redis.child.kill().unwrap();
        redis.child.wait().unwrap();
        let response = server.get(&acct.key, "/v1/account").call().await;
        assert_eq!(response.status().as_u16(), expect_status, "fail {mode}");
        if expect_status == 503 {
            let (headers, _) = expect_error(response, "503 server_error service_unavailable").await;
            assert!(headers.get("retry-after").is_some());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let logs = server.logs();
        assert!(
            logs.contains("rate limiter unreachable"),
            "a log line either way ({mode}):\n{logs}"
        );
    }
}

/// Redis's count of script calls (`EVALSHA`, and `EVAL` when the script was not loaded yet).
fn script_calls(redis_url: &str) -> u64 {
    let output = Command::new("redis-cli")
        .args(["-u", redis_url, "INFO", "commandstats"])
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:"))
        .filter_map(|line| {
            let calls = line.split("calls=").nth(1)?.split(',').next()?;
            calls.parse::<u64>().ok()
        })
        .sum()
}

#[tokio::test]
async fn a_refusal_redis_gave_is_repeated_locally_until_its_moment_with_the_exact_wait() {
    if services().is_none() {
        return;
    }
    let redis = OwnRedis::start();
    let (_tmp, server) = TestServer::start(&["--redis-url", &redis.url]);
    // Burst 2, then one request per 10 s.
    let acct = server.account_with_limit(10, 6, 2).await;
    for _ in 0..2 {
        assert_eq!(server.status(&acct.key, "/v1/account").await, 200);
    }
    let before = script_calls(&redis.url);
    let mut waits = Vec::new();
    for _ in 0..100 {
        let response = server.get(&acct.key, "/v1/account").call().await;
        let (headers, _) = expect_error(response, "429 rate_limit_error rate_limit_exceeded").await;
        let ms: u64 = headers["retry-after-ms"].to_str().unwrap().parse().unwrap();
        waits.push(ms);
    }
    let asked = script_calls(&redis.url) - before;
    assert!(
        asked <= 2,
        "the first refusal asks Redis, the 99 after it are answered here: {asked} script calls"
    );
    // The exact wait that is left, shrinking as time passes, never beyond the 10 s interval.
    assert!(waits.windows(2).all(|w| w[1] <= w[0]), "{waits:?}");
    assert!(waits[0] <= 10_000 && waits[0] > 8_000, "{waits:?}");

    // Another account is not refused, and asks Redis.
    let other = server.account_with_limit(10, 6, 2).await;
    assert_eq!(server.status(&other.key, "/v1/account").await, 200);
    assert!(script_calls(&redis.url) > before + asked);

    // A limit raised by the operator applies at once: the remembered refusal was for the old
    // one, so Redis is asked again (and its schedule, 20 s ahead, is within the new burst of 100 s).
    server.set_rate_limit(&acct.id, 600, 1000).await;
    let before = script_calls(&redis.url);
    assert_eq!(server.status(&acct.key, "/v1/account").await, 200);
    assert_eq!(script_calls(&redis.url), before + 1);
}

/// Revokes `key_id` through `server`, returning when it answered.
async fn revoke(server: &TestServer, key_id: &str) -> Instant {
    let path = format!("/admin/keys/{key_id}");
    let response = server.admin(reqwest::Method::DELETE, &path, None).await;
    assert_eq!(response.status(), 204);
    Instant::now()
}

#[tokio::test]
async fn revocations_and_limit_changes_reach_instances_serving_from_their_caches_even_after_their_feed_is_cut(
) {
    let Some(cluster) = Cluster::start(&[0, 0, 0], &[]) else {
        return;
    };
    let [a, b, c] = [
        &cluster.instances[0],
        &cluster.instances[1],
        &cluster.instances[2],
    ];
    let acct = a.account_with_limit(10, 100_000, 10_000).await;

    // A steady load on b and c while a revokes the key.
    let (key_id, key) = a.new_key(&acct.id).await;
    for server in [b, c] {
        assert_eq!(server.status(&key, "/v1/models").await, 200);
    }
    let load = async {
        let revoked_at = revoke(a, &key_id).await;
        tokio::join!(
            refused_within_a_second(b, &key, revoked_at),
            refused_within_a_second(c, &key, revoked_at)
        );
    };
    let steady = async {
        for _ in 0..50 {
            assert_eq!(b.status(&acct.key, "/v1/models").await, 200);
        }
    };
    tokio::join!(load, steady);

    // A limit lowered through a reaches b, which had the old one cached with the key, within
    // the second too.
    a.set_rate_limit(&acct.id, 6, 1).await;
    let lowered_at = Instant::now();
    let refused = answered_within_a_second(b, &acct.key, 429, lowered_at).await;
    let policy = refused.headers()["ratelimit-policy"].to_str().unwrap();
    assert!(policy.contains(";q=1;"), "the new burst: {policy}");
    let acct = a.account_with_limit(10, 100_000, 10_000).await;

    // c's notification connection is cut; a key revoked right after is still refused by c
    // within the second, and c hears the feed again without a restart.
    let (key_id, key) = a.new_key(&acct.id).await;
    assert_eq!(c.status(&key, "/v1/models").await, 200);
    let cut = psql(
        &cluster.url,
        &format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'tollgate changes {}'",
            c.pid()
        ),
    );
    assert_eq!(cut, "1", "c's listener connection");
    let revoked_at = revoke(a, &key_id).await;
    refused_within_a_second(c, &key, revoked_at).await;
    c.wait_for_log("change feed lost").await;

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let listening = psql(
            &cluster.url,
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tollgate changes {}'",
                c.pid()
            ),
        );
        if listening == "1" {
            break;
        }
        assert!(Instant::now() < deadline, "c's feed did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (key_id, key) = a.new_key(&acct.id).await;
    assert_eq!(c.status(&key, "/v1/models").await, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let revoked_at = revoke(a, &key_id).await;
    refused_within_a_second(c, &key, revoked_at).await;
}

/// Index and table scans PostgreSQL counted on the cluster's `table`.
fn scans(cluster: &Cluster, table: &str) -> u64 {
    psql(
        &cluster.url,
        &format!(
            "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables \
             WHERE schemaname = '{}' AND relname = '{table}'",
            cluster.schema
        ),
    )
    .parse()
    .unwrap()
}

#[tokio::test]
async fn cached_keys_and_finished_tasks_are_served_without_asking_postgres() {
    let Some(cluster) = Cluster::start(&[1, 0], &[]) else {
        return;
    };
    let [a, b] = [&cluster.instances[0], &cluster.instances[1]];
    let acct = a.account_with_limit(10, 100_000, 10_000).await;
    let (_, done) = a
        .generate(&acct.key, json!({"prompt": "a fox", "size": "256x256"}))
        .await;
    assert_eq!(done["status"], "succeeded");
    let id = done["id"].as_str().unwrap();
    let path = format!("/v1/tasks/{id}");
    // b reads the finished task once from PostgreSQL, and then keeps it.
    assert_eq!(b.status(&acct.key, &path).await, 200);

    // PostgreSQL's statistics reach pg_stat_user_tables within a second of a backend going idle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (keys_before, tasks_before) = (scans(&cluster, "api_keys"), scans(&cluster, "tasks"));
    for _ in 0..300 {
        let task: Value = b.get(&acct.key, &path).fetch().await;
        assert_eq!(task["status"], "succeeded");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let keys = scans(&cluster, "api_keys") - keys_before;
    let tasks = scans(&cluster, "tasks") - tasks_before;
    // (A scan or two may be counted late: a busy server can hold a backend's statistics back.)
    assert!(
        keys <= 2,
        "300 authenticated reads, and the key looked up {keys} times"
    );
    // The worker on a polls the queue meanwhile; 300 reads asking would be 300 scans at least.
    assert!(
        tasks < 30,
        "300 reads of a finished task, and {tasks} scans of tasks"
    );
}
