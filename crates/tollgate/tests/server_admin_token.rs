//! The operator token when `TOLLGATE_ADMIN_TOKEN` is unset: made on the first start, printed
//! once, kept only as a hash, and still valid after a restart that prints nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Starts `tollgate serve` without an admin token; returns the child, its base URL and every
/// stdout line printed up to the address.
fn start(dir: &std::path::Path) -> (Child, String, Vec<String>) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    for (name, _) in std::env::vars() {
        if name.starts_with("TOLLGATE_") {
            command.env_remove(name);
        }
    }
    let mut child = command
        .args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("TOLLGATE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Its log, for the message of a failed stop.
        .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            seen.push(line.clone());
            if let Some(addr) = line.strip_prefix("listening on ") {
                let _ = tx.send((addr.to_owned(), seen.clone()));
            }
        }
    });
    let (base, lines) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("server started");
    (child, base, lines)
}

fn stop(mut child: Child, dir: &std::path::Path) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "{status} after SIGTERM; its log:\n{}",
        std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
    );
}

#[tokio::test]
async fn a_made_token_is_printed_once_and_only_its_hash_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, base, lines) = start(tmp.path());
    let token = lines
        .iter()
        .find_map(|l| l.strip_prefix("admin token (shown once; only its hash is kept): "))
        .expect("the first start prints the token")
        .to_owned();
    assert!(token.len() >= 3 + 32, "{token}");
    let http = reqwest::Client::new();
    let accounts = |token: String| {
        http.get(format!("{base}/admin/accounts"))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(accounts(token.clone()).await.unwrap().status(), 200);
    assert_eq!(accounts("wrong".into()).await.unwrap().status(), 401);
    stop(child, tmp.path());

    // Nowhere on disk in clear.
    for entry in std::fs::read_dir(tmp.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
                "{} holds the token",
                path.display()
            );
        }
    }

    // A restart prints no token, and the one made first still works.
    let (child, base, lines) = start(tmp.path());
    assert!(
        !lines.iter().any(|l| l.contains("admin token")),
        "{lines:?}"
    );
    let response = http
        .get(format!("{base}/admin/accounts"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    stop(child, tmp.path());
}
