//! The TypeScript SDK (`clients/typescript`): compiled with `tsc` (strict, declarations) and its
//! `node --test` suites run: the retry policy on a virtual clock with a scripted `fetch`, the
//! routes, errors and webhook verification, and the end-to-end suite against this build's
//! `tollgate serve` (which the suite starts itself from `TOLLGATE_BIN`). `scripts/test` installs
//! TypeScript beside the `openai` package in target/test-tools/node.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn the_typescript_sdk_compiles_and_its_suites_pass() {
    let Some(modules) = std::env::var_os("TOLLGATE_TEST_NODE_MODULES").map(PathBuf::from) else {
        common::skip("the TypeScript SDK's suites: TOLLGATE_TEST_NODE_MODULES is not set (scripts/test sets it)");
        return;
    };
    let tsc = modules.join("typescript/bin/tsc");
    if !tsc.exists() {
        common::skip("the TypeScript SDK's suites: typescript is not installed in TOLLGATE_TEST_NODE_MODULES");
        return;
    }
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients/typescript");
    let run = |args: Vec<std::ffi::OsString>| {
        let output = Command::new("node")
            .args(args)
            .current_dir(&package)
            .env("TOLLGATE_BIN", env!("CARGO_BIN_EXE_tollgate"))
            .output()
            .expect("node runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    };
    let (compiled, text) = run(vec![tsc.into(), "-p".into(), ".".into()]);
    assert!(compiled, "tsc:\n{text}");

    let (passed, text) = run(vec![
        "--test".into(),
        "--test-reporter=tap".into(),
        "test/".into(),
    ]);
    // node's closing lines: "# tests N", "# pass N", "# fail N", "# skipped N"…
    let count = |what: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("# {what} ")))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no \"# {what}\" line in node's report:\n{text}"))
    };
    let summary = format!(
        "{} tests: {} passed, {} failed, {} skipped",
        count("tests"),
        count("pass"),
        count("fail"),
        count("skipped")
    );
    println!("node --test: {summary}");
    assert!(passed && count("fail") == 0, "{summary}\n{text}");
    assert_eq!(count("skipped"), 0, "{summary}\n{text}");
    // The suites are many; a report of a handful means files were not found or not run.
    assert!(count("pass") >= 70, "{summary}\n{text}");
}
