//! The client-side CLI, run as the real binary: usage errors, `--help`, one line per error and an
//! exit code per class, and each command against a scripted server (the SDK's test server).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../tollgate-client/tests/support/mod.rs"]
mod support;

use std::process::{Command, Output};

use support::{task_json, Reply, ScriptedServer};
use tollgate_contract::ErrorCode;

const KEY: &str = "tg_cli_test_key_0123456789abcdef";

/// The binary with no `TOLLGATE_*` variable from the outside.
fn tollgate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    for (name, _) in std::env::vars() {
        if name.starts_with("TOLLGATE_") {
            c.env_remove(name);
        }
    }
    c
}

/// Runs the binary off the async runtime, so the scripted server keeps answering.
async fn run(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn client(server: &ScriptedServer, args: &[&str]) -> Command {
    let mut c = tollgate();
    c.args(args)
        .env("TOLLGATE_BASE_URL", &server.base_url)
        .env("TOLLGATE_API_KEY", KEY);
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The error is one line that starts with `error:`.
fn one_error_line(o: &Output) -> String {
    let text = stderr(o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].starts_with("error: "), "{text}");
    lines[0].to_owned()
}

#[test]
fn help_documents_the_commands_the_environment_and_the_exit_codes() {
    let o = tollgate().arg("--help").output().unwrap();
    assert!(o.status.success());
    let help = stdout(&o);
    for needle in [
        "generate",
        "tasks",
        "account",
        "admin",
        "TOLLGATE_API_KEY",
        "TOLLGATE_BASE_URL",
        "TOLLGATE_ADMIN_TOKEN",
        "Exit codes:",
        "2  usage",
        "3  authentication",
        "4  insufficient credits",
        "5  not found (404) or gone",
        "6  rate limited",
        "7  server or network",
    ] {
        assert!(help.contains(needle), "missing {needle:?} in\n{help}");
    }
    let o = tollgate().args(["generate", "--help"]).output().unwrap();
    let help = stdout(&o);
    for flag in [
        "--n",
        "--size",
        "--seed",
        "--wait",
        "--out",
        "--api-key",
        "--base-url",
        "--max-retries",
        "Exit codes:",
    ] {
        assert!(help.contains(flag), "missing {flag} in\n{help}");
    }
    // The key's value is never shown by --help, even when set.
    let o = tollgate()
        .args(["account", "--help"])
        .env("TOLLGATE_API_KEY", KEY)
        .output()
        .unwrap();
    assert!(!stdout(&o).contains(KEY));
    let o = tollgate().args(["admin", "--help"]).output().unwrap();
    let help = stdout(&o);
    for sub in ["accounts", "keys", "credits"] {
        assert!(help.contains(sub), "{help}");
    }
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        vec!["generate"],
        vec!["generate", "a cat", "--n", "5"],
        vec!["generate", "a cat", "--size", "300x300"],
        vec!["generate", "a cat", "--timeout", "soon"],
        vec!["tasks"],
        vec!["tasks", "get"],
        vec!["tasks", "frobnicate"],
        vec!["admin", "accounts", "create", "acme", "--rpm", "60"],
        vec!["admin", "credits", "add", "acct_1", "many"],
        vec!["no-such-command"],
    ] {
        let o = tollgate()
            .args(&args)
            .env("TOLLGATE_API_KEY", KEY)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
    // A base URL that is not one is a usage error too, found before anything is sent.
    let o = tollgate()
        .args(["account", "--base-url", "ftp://x"])
        .env("TOLLGATE_API_KEY", KEY)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(one_error_line(&o).contains("http://"));
}

#[test]
fn a_missing_credential_exits_3_before_any_request() {
    let o = tollgate()
        .args(["account", "--base-url", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    assert!(one_error_line(&o).contains("TOLLGATE_API_KEY"));
    let o = tollgate()
        .args([
            "admin",
            "accounts",
            "list",
            "--base-url",
            "http://127.0.0.1:9",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    assert!(one_error_line(&o).contains("TOLLGATE_ADMIN_TOKEN"));
}

#[test]
fn an_unreachable_server_exits_7_and_says_how_many_attempts() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = tollgate()
        .args([
            "tasks",
            "get",
            "task_1",
            "--max-retries",
            "1",
            "--base-url",
            &format!("http://127.0.0.1:{port}"),
        ])
        .env("TOLLGATE_API_KEY", KEY)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(7));
    let line = one_error_line(&o);
    assert!(
        line.contains("could not connect") && line.contains("2 attempts"),
        "{line}"
    );
    assert!(!line.contains(KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_class_of_api_error_has_its_exit_code() {
    let cases = [
        (ErrorCode::InvalidValue, 2),
        (ErrorCode::InvalidApiKey, 3),
        (ErrorCode::InsufficientCredits, 4),
        (ErrorCode::ResourceNotFound, 5),
        (ErrorCode::ResourceExpired, 5),
        (ErrorCode::RateLimitExceeded, 6),
        (ErrorCode::ServiceUnavailable, 7),
    ];
    for (code, exit) in cases {
        let reply = Reply::error(code).header("retry-after", "0");
        let server = ScriptedServer::start(vec![], reply).await;
        let o = run(client(
            &server,
            &["generate", "a cat", "--max-retries", "1"],
        ))
        .await;
        assert_eq!(o.status.code(), Some(exit), "{code}: {}", stderr(&o));
        let line = one_error_line(&o);
        let attempts = if code.is_retryable() {
            "2 attempts"
        } else {
            "1 attempt"
        };
        for part in [code.as_str(), &format!("request id req_{code}"), attempts] {
            assert!(line.contains(part), "{code}: {part:?} not in {line}");
        }
        assert!(!line.contains(KEY));
        assert_eq!(
            server.count(),
            if code.is_retryable() { 2 } else { 1 },
            "{code}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_sends_the_request_and_prints_the_task() {
    let server = ScriptedServer::start(
        vec![Reply::json(202, task_json("task_1", "queued"))],
        Reply::error(ErrorCode::InternalError),
    )
    .await;
    let o = run(client(
        &server,
        &[
            "generate",
            "a cat",
            "-n",
            "2",
            "--size",
            "256x256",
            "--seed",
            "-7",
            "--idempotency-key",
            "k-1",
        ],
    ))
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let printed: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(printed["id"], "task_1");
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        (reqs[0].method.as_str(), reqs[0].path.as_str()),
        ("POST", "/v1/images/generations")
    );
    assert_eq!(
        reqs[0].header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(reqs[0].header("idempotency-key"), Some("k-1"));
    let body: serde_json::Value = serde_json::from_slice(&reqs[0].body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"prompt": "a cat", "n": 2, "size": "256x256", "seed": -7})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_wait_polls_then_writes_the_png_files() {
    let mut done: serde_json::Value =
        serde_json::from_str(&task_json("task_7", "succeeded")).unwrap();
    done["images"] = serde_json::json!([{"url": "/v1/tasks/task_7/images/0"}, {"url": "/v1/tasks/task_7/images/1"}]);
    let png = |i: u8| Reply::Http {
        status: 200,
        headers: vec![("content-type".into(), "image/png".into())],
        body: vec![0x89, b'P', b'N', b'G', i],
    };
    let server = ScriptedServer::start(
        vec![
            Reply::json(202, task_json("task_7", "queued")),
            Reply::json(200, task_json("task_7", "queued")),
            Reply::error(ErrorCode::ServiceUnavailable),
            Reply::json(200, task_json("task_7", "running")),
            Reply::json(200, done.to_string()),
            png(0),
            png(1),
        ],
        Reply::error(ErrorCode::InternalError),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("images");
    let o = run(client(
        &server,
        &[
            "generate",
            "a cat",
            "--out",
            out.to_str().unwrap(),
            "--poll-interval",
            "10ms",
        ],
    ))
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let paths: Vec<String> = stdout(&o).lines().map(str::to_owned).collect();
    assert_eq!(paths.len(), 2, "{paths:?}");
    for (i, p) in paths.iter().enumerate() {
        assert!(p.ends_with(&format!("task_7-{i}.png")), "{p}");
        assert_eq!(
            std::fs::read(p).unwrap(),
            vec![0x89, b'P', b'N', b'G', u8::try_from(i).unwrap()]
        );
    }
    let gets: Vec<String> = server
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(gets.last().unwrap(), "GET /v1/tasks/task_7/images/1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_task_exits_1_with_its_reason() {
    let mut failed: serde_json::Value =
        serde_json::from_str(&task_json("task_8", "failed")).unwrap();
    failed["error"] =
        serde_json::json!({"code": "generation_failed", "message": "The generator broke."});
    let server = ScriptedServer::start(
        vec![
            Reply::json(202, task_json("task_8", "queued")),
            Reply::json(200, failed.to_string()),
        ],
        Reply::error(ErrorCode::InternalError),
    )
    .await;
    let o = run(client(
        &server,
        &["generate", "a cat", "--wait", "--poll-interval", "10ms"],
    ))
    .await;
    assert_eq!(o.status.code(), Some(1));
    let line = one_error_line(&o);
    assert!(
        line.contains("task_8 failed") && line.contains("The generator broke."),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_and_account_commands_call_their_routes() {
    let account = r#"{"id":"acct_1","name":"acme","credits":10,"rate_limit":{"requests_per_minute":60,"burst":10}}"#;
    let list = format!(
        r#"{{"object":"list","data":[{}],"has_more":false}}"#,
        task_json("task_1", "queued")
    );
    let server = ScriptedServer::start(
        vec![
            Reply::json(200, task_json("task_1", "queued")),
            Reply::json(200, list),
            Reply::json(200, task_json("task_1", "canceled")),
            Reply::json(200, account),
        ],
        Reply::error(ErrorCode::InternalError),
    )
    .await;
    for args in [
        vec!["tasks", "get", "task_1"],
        vec!["tasks", "list", "--limit", "3", "--after", "task_0"],
        vec!["tasks", "cancel", "task_1"],
        vec!["account"],
    ] {
        let o = run(client(&server, &args)).await;
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let _: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    }
    let seen: Vec<String> = server
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        seen,
        [
            "GET /v1/tasks/task_1",
            "GET /v1/tasks?limit=3&after=task_0",
            "POST /v1/tasks/task_1/cancel",
            "GET /v1/account"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_call_their_routes_with_the_admin_token() {
    let account = r#"{"id":"acct_1","name":"acme","credits":10,"rate_limit":{"requests_per_minute":60,"burst":10}}"#;
    let server = ScriptedServer::start(
        vec![
            Reply::json(
                201,
                format!(r#"{{"account":{account},"api_key":"tg_new"}}"#),
            ),
            Reply::json(
                200,
                format!(r#"{{"object":"list","data":[{account}],"has_more":false}}"#),
            ),
            Reply::json(200, account),
            Reply::json(201, r#"{"id":"key_1","api_key":"tg_other"}"#),
            Reply::Http {
                status: 204,
                headers: vec![],
                body: vec![],
            },
            Reply::json(200, account),
        ],
        Reply::error(ErrorCode::InternalError),
    )
    .await;
    let admin = |args: &[&str]| {
        let mut c = tollgate();
        c.args(args)
            .env("TOLLGATE_BASE_URL", &server.base_url)
            .env("TOLLGATE_ADMIN_TOKEN", "admin-tok");
        c
    };
    let o = run(admin(&[
        "admin",
        "accounts",
        "create",
        "acme",
        "--credits",
        "10",
        "--rpm",
        "60",
        "--burst",
        "10",
    ]))
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("tg_new"), "the new key is shown once");
    for args in [
        vec!["admin", "accounts", "list"],
        vec!["admin", "accounts", "show", "acct_1"],
        vec!["admin", "keys", "create", "acct_1"],
        vec!["admin", "keys", "revoke", "key_1"],
        vec![
            "admin",
            "credits",
            "add",
            "acct_1",
            "-5",
            "--note",
            "correction",
        ],
    ] {
        let o = run(admin(&args)).await;
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
    let reqs = server.requests();
    let seen: Vec<String> = reqs
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        seen,
        [
            "POST /admin/accounts",
            "GET /admin/accounts",
            "GET /admin/accounts/acct_1",
            "POST /admin/accounts/acct_1/keys",
            "DELETE /admin/keys/key_1",
            "POST /admin/accounts/acct_1/credits",
        ]
    );
    assert!(reqs
        .iter()
        .all(|r| r.header("authorization") == Some("Bearer admin-tok")));
    let body = |i: usize| serde_json::from_slice::<serde_json::Value>(&reqs[i].body).unwrap();
    assert_eq!(
        body(0),
        serde_json::json!({"name": "acme", "credits": 10, "rate_limit": {"requests_per_minute": 60, "burst": 10}})
    );
    assert_eq!(
        body(5),
        serde_json::json!({"amount": -5, "note": "correction"})
    );
}
