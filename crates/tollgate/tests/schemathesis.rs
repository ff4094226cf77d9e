//! schemathesis (PyPI) against the served `/openapi.json`, with all its checks, on the real
//! binary: on SQLite alone, and on PostgreSQL + Redis. It generates requests from the document,
//! valid and invalid, and checks that the valid ones are accepted, the invalid ones refused with
//! a 4xx, that no answer is a 5xx, and that every answer (status, headers, body) is the one the
//! document describes. `tests/schemathesis/hooks.py` says what it cannot learn from the document.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{skip, unique, TestServer, ADMIN_TOKEN};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The same seed every run, so that CI is repeatable; `TOLLGATE_TEST_SCHEMATHESIS_SEED` explores.
const SEED: &str = "20261207";

fn schemathesis() -> Option<PathBuf> {
    let python = common::test_python("schemathesis against /openapi.json")?;
    let program = python.with_file_name("schemathesis");
    if !program.exists() {
        skip("schemathesis against /openapi.json: no schemathesis beside TOLLGATE_TEST_PYTHON");
        return None;
    }
    Some(program)
}

/// Runs schemathesis against `server` and fails with its report when it finds anything.
async fn run(program: PathBuf, server: &TestServer) {
    let account = server.account(1_000_000).await;
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis");
    let seed = std::env::var("TOLLGATE_TEST_SCHEMATHESIS_SEED").unwrap_or_else(|_| SEED.into());
    let document = server.url("/openapi.json");
    let scratch = tempfile::tempdir().unwrap();
    let scratch_path = scratch.path().to_owned();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(program)
            .arg("--config-file")
            .arg(here.join("schemathesis.toml"))
            .args(["run", &document, "--checks", "all", "--max-examples", "40"])
            // One worker: hypothesis parses lambda sources with `ast` and, on CPython 3.11, two threads
            // doing so at once can fail inside the interpreter ("AST constructor recursion depth
            // mismatch"), a runtime error of the tool, not a finding.
            .args(["--workers", "1", "--seed", &seed, "--no-color"])
            // Each run on its own: no example database or cache carried over from an earlier one.
            .args(["--generation-database", ":memory:"])
            .current_dir(&scratch_path)
            .env("TOLLGATE_ST_HOOKS", here.join("hooks.py"))
            .env("TOLLGATE_ST_API_KEY", &account.key)
            .env("TOLLGATE_ST_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found something:\n{report}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        server.logs()
    );
    // Something was tested: every operation of the document, none of them failing.
    assert!(report.contains("passed"), "{report}");
    assert!(!report.contains("failures"), "{report}");
}

#[tokio::test]
async fn the_document_holds_on_sqlite() {
    let Some(program) = schemathesis() else {
        return;
    };
    let (_dir, server) = TestServer::start(&[]);
    run(program, &server).await;
}

#[tokio::test]
async fn the_document_holds_on_postgres_and_redis() {
    let Some(program) = schemathesis() else {
        return;
    };
    let (Ok(database), Ok(redis)) = (
        std::env::var("TOLLGATE_TEST_DATABASE_URL"),
        std::env::var("TOLLGATE_TEST_REDIS_URL"),
    ) else {
        skip("schemathesis on PostgreSQL + Redis (TOLLGATE_TEST_DATABASE_URL / TOLLGATE_TEST_REDIS_URL not set)");
        return;
    };
    let schema = unique("tg_schemathesis");
    let (_dir, server) = TestServer::start(&[
        "--database-url",
        &database,
        "--database-schema",
        &schema,
        "--redis-url",
        &redis,
    ]);
    run(program, &server).await;
    drop(server);
    common::drop_schema(&database, &schema);
}
