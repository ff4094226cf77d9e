//! The repository's own rules, checked like any other test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn all_sources() -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    rust_files(&workspace_root().join("crates"), &mut files);
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect()
}

/// Every module says what it is for: a `//!` doc at the top of every source file under `src/`.
#[test]
fn every_module_has_a_doc() {
    let missing: Vec<_> = all_sources()
        .into_iter()
        .filter(|(p, _)| p.components().any(|c| c.as_os_str() == "src"))
        .filter(|(_, text)| !text.trim_start().starts_with("//!"))
        .map(|(p, _)| p)
        .collect();
    assert!(
        missing.is_empty(),
        "add a `//!` module doc to: {missing:#?}"
    );
}

/// No ignored tests and no placeholders: a stub is not done.
#[test]
fn no_ignored_tests_or_placeholders() {
    let patterns = [
        concat!("#[", "ignore"),
        concat!("todo", "!("),
        concat!("unimplemented", "!("),
    ];
    let hits: Vec<_> = all_sources()
        .into_iter()
        .flat_map(|(p, text)| {
            text.lines()
                .enumerate()
                .filter(|(_, line)| patterns.iter().any(|pat| line.contains(pat)))
                .map(|(i, _)| format!("{}:{}", p.display(), i + 1))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(hits.is_empty(), "{hits:#?}");
}

/// The README opens with the two commands: run the server, run the tests.
#[test]
fn readme_starts_with_the_two_commands() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let commands: Vec<&str> = readme
        .lines()
        .skip_while(|l| !l.starts_with("```"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .collect();
    assert!(
        commands[0].starts_with("cargo run --release -p tollgate -- serve"),
        "{commands:?}"
    );
    assert!(commands[1].starts_with("scripts/test "), "{commands:?}");
    let ci = std::fs::read_to_string(workspace_root().join(".ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == "scripts/test"),
        "CI runs the README's test command"
    );
    let script = std::fs::read_to_string(workspace_root().join("scripts/test")).unwrap();
    assert!(
        script.contains("cargo test --workspace"),
        "the test command runs the whole workspace"
    );
}

/// The TypeScript SDK's copy of the error table (`clients/typescript/src/errors.ts`) says what
/// the contract's does, code by code: the same codes, statuses, types and retryability.
#[test]
fn the_typescript_error_table_is_the_contracts() {
    use tollgate_contract::ErrorCode;
    let text =
        std::fs::read_to_string(workspace_root().join("clients/typescript/src/errors.ts")).unwrap();
    let table = &text[text.find("export const ERROR_CODES").unwrap()..];
    let table = &table[..table.find("});").unwrap()];
    let mut rows: Vec<(String, u16, String, bool)> = table
        .lines()
        .filter_map(|line| {
            let (code, rest) = line.trim().split_once(": row(")?;
            let mut args = rest.splitn(4, ", ");
            let status = args.next()?.parse().ok()?;
            let error_type = args.next()?.trim_matches('"').to_owned();
            let retryable = args.next()? == "true";
            Some((code.to_owned(), status, error_type, retryable))
        })
        .collect();
    rows.sort();
    let mut contract: Vec<(String, u16, String, bool)> = ErrorCode::ALL
        .iter()
        .map(|code| {
            (
                code.as_str().to_owned(),
                code.status(),
                code.error_type().as_str().to_owned(),
                code.is_retryable(),
            )
        })
        .collect();
    contract.sort();
    assert_eq!(rows, contract);
}
