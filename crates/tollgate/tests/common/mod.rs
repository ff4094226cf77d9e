//! Test harness: the real `tollgate` binary on 127.0.0.1 port 0 with its own data directory,
//! driven over real HTTP. Shared by the `server_*` test files.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

pub mod browser;

/// A request the test needs answered: `send().await.unwrap()`, and its JSON body in one call.
/// A transport error fails the test where it happened.
pub trait Call {
    fn call(self) -> impl std::future::Future<Output = reqwest::Response>;
    fn fetch(self) -> impl std::future::Future<Output = Value>;
}

impl Call for reqwest::RequestBuilder {
    async fn call(self) -> reqwest::Response {
        self.send().await.unwrap()
    }

    async fn fetch(self) -> Value {
        self.call().await.json().await.unwrap()
    }
}

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A test that cannot run here (a service is missing): fails when `CI` is set; otherwise says so
/// and appends `what` to the file `TOLLGATE_TEST_SKIPS` names, which `scripts/test` lists in its
/// closing summary.
pub fn skip(what: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{what} (CI is set, so this fails rather than skips)"
    );
    eprintln!("SKIPPED: {what}");
    if let Some(path) = std::env::var_os("TOLLGATE_TEST_SKIPS") {
        use std::io::Write;
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
        {
            let _ = writeln!(file, "{what}");
        }
    }
}

/// The Python of `target/test-tools` (`TOLLGATE_TEST_PYTHON`, set by `scripts/test`), with the
/// packages the tests drive the server with (openai, schemathesis); `None` after a [`skip`].
pub fn test_python(what: &str) -> Option<PathBuf> {
    let python = std::env::var_os("TOLLGATE_TEST_PYTHON").map(PathBuf::from);
    if python.is_none() {
        skip(&format!(
            "{what}: TOLLGATE_TEST_PYTHON is not set (scripts/test sets it)"
        ));
    }
    python
}

/// Drops a PostgreSQL schema a test made for itself (best effort: a leftover harms no other test).
/// Runs `sql` with psql on `url` and returns what it printed (unaligned, no headers), trimmed.
pub fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-XAtqc", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub fn drop_schema(database: &str, schema: &str) {
    let _ = Command::new("psql")
        .arg(database)
        .args([
            "-q",
            "-c",
            &format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"),
        ])
        .status();
}

/// A port nothing listens on now, for a service a test starts itself.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `tollgate serve`.
pub struct TestServer {
    child: Child,
    pub base: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    pub http: reqwest::Client,
}

/// An account made through the operator API.
#[derive(Debug, Clone)]
pub struct TestAccount {
    pub id: String,
    pub key: String,
}

impl TestServer {
    /// Starts a server on a data dir of its own (kept under the returned tempdir).
    pub fn start(args: &[&str]) -> (tempfile::TempDir, TestServer) {
        let tmp = tempfile::tempdir().unwrap();
        let server = TestServer::start_in(tmp.path(), args);
        (tmp, server)
    }

    /// Starts a server on `dir` (restarts reuse it).
    pub fn start_in(dir: &Path, args: &[&str]) -> TestServer {
        TestServer::start_in_with_env(dir, args, &[])
    }

    /// Starts a server on a data dir of its own with extra environment variables (secrets that
    /// are not flags, like `TOLLGATE_UPSTREAM_API_KEY`).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> (tempfile::TempDir, TestServer) {
        let tmp = tempfile::tempdir().unwrap();
        let server = TestServer::start_in_with_env(tmp.path(), args, env);
        (tmp, server)
    }

    /// [`TestServer::start_in`] with extra environment variables.
    pub fn start_in_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> TestServer {
        TestServer::launch(dir, args, env, None)
    }

    /// Starts a server whose file descriptor limit is `ulimit` (e.g. `-n 256`, both limits;
    /// `-S -n 256`, the soft one only), set by the shell that then becomes the server.
    pub fn start_with_ulimit(ulimit: &str, args: &[&str]) -> (tempfile::TempDir, TestServer) {
        let tmp = tempfile::tempdir().unwrap();
        let server = TestServer::launch(tmp.path(), args, &[], Some(ulimit));
        (tmp, server)
    }

    fn launch(dir: &Path, args: &[&str], env: &[(&str, &str)], ulimit: Option<&str>) -> TestServer {
        let log = dir.join(format!(
            "server-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let log_file = std::fs::File::create(&log).unwrap();
        let binary = env!("CARGO_BIN_EXE_tollgate");
        let mut command = match ulimit {
            None => Command::new(binary),
            Some(limit) => {
                let mut shell = Command::new("sh");
                shell
                    .arg("-c")
                    .arg(format!("ulimit {limit} && exec \"$0\" \"$@\""))
                    .arg(binary);
                shell
            }
        };
        for (name, _) in std::env::vars() {
            if name.starts_with("TOLLGATE_") {
                command.env_remove(name);
            }
        }
        let mut child = command
            .arg("serve")
            .args(["--addr", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("data"))
            .args(args)
            .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("TOLLGATE_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(base) => base,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "server did not start; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        TestServer {
            child,
            base,
            dir: dir.to_owned(),
            log,
            http,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    /// SIGKILL: the process dies at once, as in a crash or an OOM kill.
    pub fn kill(&self) {
        self.signal("-KILL");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "server did not exit in {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait: a clean stop, as an operator would do before a restart.
    pub fn stop(mut self) {
        self.terminate();
        let status = self.wait(Duration::from_secs(30));
        assert!(status.success(), "server exited with {status}");
    }

    /// The server's log so far. The server writes it from a thread of its own, a moment after
    /// the event: this waits until the file has stopped growing (for up to 2 s), so that a check
    /// that a secret is *not* in it reads what was logged, not what was flushed in time.
    pub fn logs(&self) -> String {
        let size = || std::fs::metadata(&self.log).map_or(0, |m| m.len());
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut seen = size();
        loop {
            std::thread::sleep(Duration::from_millis(40));
            let now = size();
            if now == seen || std::time::Instant::now() > deadline {
                break;
            }
            seen = now;
        }
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log, once it has a line containing `needle` (panics after 10 s without one).
    pub async fn wait_for_log(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let logs = std::fs::read_to_string(&self.log).unwrap_or_default();
            if logs.contains(needle) {
                return logs;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no log line with {needle:?} within 10 s:\n{logs}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .request(method, self.url(path))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.call().await
    }

    /// A new account with `credits` and a generous rate limit unless one is given.
    pub async fn account(&self, credits: u64) -> TestAccount {
        self.account_with_limit(credits, 100_000, 10_000).await
    }

    pub async fn account_with_limit(&self, credits: u64, rpm: u32, burst: u32) -> TestAccount {
        let response = self
            .admin(
                reqwest::Method::POST,
                "/admin/accounts",
                Some(json!({"name": "test", "credits": credits, "rate_limit": {"requests_per_minute": rpm, "burst": burst}})),
            )
            .await;
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.unwrap();
        TestAccount {
            id: body["account"]["id"].as_str().unwrap().to_owned(),
            key: body["api_key"].as_str().unwrap().to_owned(),
        }
    }

    pub fn get(&self, key: &str, path: &str) -> reqwest::RequestBuilder {
        self.http.get(self.url(path)).bearer_auth(key)
    }

    /// `GET path` with `key`, its body as JSON (whatever the status).
    pub async fn get_json(&self, key: &str, path: &str) -> Value {
        self.get(key, path).fetch().await
    }

    pub fn post(&self, key: &str, path: &str) -> reqwest::RequestBuilder {
        self.http.post(self.url(path)).bearer_auth(key)
    }

    /// Creates a task and returns its JSON (asserting 202).
    pub async fn create_task(&self, key: &str, body: Value) -> Value {
        let response = self
            .post(key, "/v1/images/generations")
            .json(&body)
            .call()
            .await;
        assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
        response.json().await.unwrap()
    }

    /// Creates a task and waits for it to end: the task as accepted, and as it ended.
    pub async fn generate(&self, key: &str, body: Value) -> (Value, Value) {
        let task = self.create_task(key, body).await;
        let done = self
            .wait_task(key, task["id"].as_str().expect("a task id"))
            .await;
        (task, done)
    }

    /// Polls a task until it is in a final state.
    pub async fn wait_task(&self, key: &str, id: &str) -> Value {
        for _ in 0..600 {
            let task: Value = self.get(key, &format!("/v1/tasks/{id}")).fetch().await;
            if matches!(
                task["status"].as_str(),
                Some("succeeded" | "failed" | "canceled")
            ) {
                return task;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("task {id} did not finish");
    }

    /// Polls the account's tasks until at least `count` run at the same moment.
    pub async fn wait_until_running(&self, key: &str, count: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let list: Value = self.get_json(key, "/v1/tasks?limit=100").await;
            let running = list["data"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| t["status"] == "running")
                .count();
            if running >= count {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never saw {count} tasks running at once"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The status of `GET path` with `key`.
    pub async fn status(&self, key: &str, path: &str) -> u16 {
        self.get(key, path).call().await.status().as_u16()
    }

    /// The account's keys as the operator lists them (the `data` array).
    pub async fn keys(&self, account_id: &str) -> Vec<Value> {
        let path = format!("/admin/accounts/{account_id}/keys");
        let list: Value = self
            .admin(reqwest::Method::GET, &path, None)
            .await
            .json()
            .await
            .unwrap();
        list["data"].as_array().unwrap().clone()
    }

    /// Another key for the account (asserting 201): its id and the key.
    /// The operator sets the account's rate limit (asserting 200).
    pub async fn set_rate_limit(&self, account_id: &str, rpm: u32, burst: u32) {
        let response = self
            .admin(
                reqwest::Method::PATCH,
                &format!("/admin/accounts/{account_id}"),
                Some(json!({"rate_limit": {"requests_per_minute": rpm, "burst": burst}})),
            )
            .await;
        assert_eq!(response.status(), 200);
    }

    pub async fn new_key(&self, account_id: &str) -> (String, String) {
        let path = format!("/admin/accounts/{account_id}/keys");
        let response = self.admin(reqwest::Method::POST, &path, None).await;
        assert_eq!(response.status(), 201);
        let created: Value = response.json().await.unwrap();
        (
            created["id"].as_str().unwrap().to_owned(),
            created["api_key"].as_str().unwrap().to_owned(),
        )
    }

    pub async fn balance(&self, key: &str) -> u64 {
        let account: Value = self.get_json(key, "/v1/account").await;
        account["credits"].as_u64().unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A name no other test run uses at the same time (PostgreSQL schemas, application names).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// Checks a response is the contract's envelope with this status, type and code, and returns
/// its headers and `error` object.
/// The contract's retry hints on an error: `x-should-retry` as its table's "retryable" column
/// says (429, every 5xx but the OpenAI route's 504 `timeout`, and 409 `idempotency_key_in_use`),
/// and `retry-after-ms` beside every
/// `Retry-After`, within the second that `Retry-After` rounds up to.
pub fn assert_retry_hints(headers: &reqwest::header::HeaderMap, status: u16, code: &str) {
    let retryable = status == 429
        || ((500..600).contains(&status) && !(status == 504 && code == "timeout"))
        || (status == 409 && code == "idempotency_key_in_use");
    let hint = headers.get("x-should-retry").map(|v| v.to_str().unwrap());
    assert_eq!(
        hint,
        Some(if retryable { "true" } else { "false" }),
        "{code}"
    );
    let seconds = headers
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
    let millis = headers
        .get("retry-after-ms")
        .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
    match (seconds, millis) {
        (None, None) => {}
        (Some(s), Some(ms)) => assert!(ms <= s * 1000 && ms + 1000 > s * 1000, "{s} s, {ms} ms"),
        other => panic!("Retry-After and retry-after-ms go together: {other:?}"),
    }
}

/// Checks that `response` is the envelope `expected` names, as "status type code" (e.g. "402
/// billing_error insufficient_credits"), with its retry hints, request id and a sentence for a
/// message; returns its headers and `error` object.
pub async fn expect_error(
    response: reqwest::Response,
    expected: &str,
) -> (reqwest::header::HeaderMap, Value) {
    let (status, error_type, code) = match expected.split(' ').collect::<Vec<_>>()[..] {
        [status, error_type, code] => (status.parse::<u16>().unwrap(), error_type, code),
        _ => panic!("expected \"status type code\", not {expected:?}"),
    };
    let headers = response.headers().clone();
    let actual = response.status().as_u16();
    let text = response.text().await.unwrap();
    assert_eq!(actual, status, "body: {text}");
    assert_eq!(
        headers.get("content-type").unwrap(),
        "application/json",
        "body: {text}"
    );
    let body: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    let object = body.as_object().unwrap();
    assert_eq!(
        object.keys().collect::<Vec<_>>(),
        vec!["error"],
        "only `error` at the top: {text}"
    );
    let error = &body["error"];
    assert_eq!(error["type"], error_type, "{text}");
    assert_eq!(error["code"], code, "{text}");
    assert_retry_hints(&headers, status, code);
    let message = error["message"].as_str().unwrap();
    assert!(
        message.len() > 10 && message.ends_with('.'),
        "a sentence: {message:?}"
    );
    let request_id = headers
        .get("x-request-id")
        .expect("X-Request-Id")
        .to_str()
        .unwrap();
    assert_eq!(error["request_id"], request_id);
    for leak in ["sqlx", "SQLITE", "panicked", "/tmp/", "src/"] {
        assert!(!text.contains(leak), "internals in {text}");
    }
    (headers, error.clone())
}
