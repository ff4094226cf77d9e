//! Signed image links, against the real binary: `images[].url` is an absolute URL that a
//! browser fetches without the API key (cacheable, readable cross-origin) until it expires;
//! then 410 `url_expired`, and the task gives a fresh one. A forged or altered link is 404.
//! `--public-url` is the base links are made with, webhook bodies included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use common::{expect_error, Call, TestServer};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn link(task: &Value, index: usize) -> String {
    task["images"][index]["url"].as_str().unwrap().to_owned()
}

/// A GET as a web page's `fetch` makes it: another origin, no credentials.
async fn browser_fetch(url: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(url)
        .header("origin", "https://app.example.com")
        .header("accept", "image/avif,image/webp,image/png,*/*")
        .call()
        .await
}

#[tokio::test]
async fn a_link_works_without_the_key_and_any_change_to_it_is_404() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(10).await;
    let (_, done) = server
        .generate(
            &acct.key,
            json!({"prompt": "a lighthouse", "n": 2, "size": "256x256"}),
        )
        .await;
    assert_eq!(done["status"], "succeeded");
    let id = done["id"].as_str().unwrap();
    let url = link(&done, 1);
    assert!(
        url.starts_with(&server.url(&format!("/v1/links/{id}/1.png?expires="))),
        "{url}"
    );

    let response = browser_fetch(&url).await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "image/png");
    assert_eq!(headers["access-control-allow-origin"], "*");
    let cache = headers["cache-control"].to_str().unwrap().to_owned();
    let max_age: u64 = cache
        .strip_prefix("public, max-age=")
        .and_then(|rest| rest.strip_suffix(", immutable"))
        .unwrap()
        .parse()
        .unwrap();
    assert!((3000..=3660).contains(&max_age), "{cache}");
    let by_link = response.bytes().await.unwrap();
    let by_key = server
        .get(&acct.key, &format!("/v1/tasks/{id}/images/1"))
        .call()
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(by_link, by_key);

    // The other image's link, another task's id, another expiry, another signature, no
    // signature: each is a link this server did not make.
    let (other, _) = server
        .generate(&acct.key, json!({"prompt": "a fox", "size": "256x256"}))
        .await;
    let other_id = other["id"].as_str().unwrap();
    let (path, query) = url.split_once('?').unwrap();
    let (expires, signature) = query.split_once('&').unwrap();
    let expiry: i64 = expires.strip_prefix("expires=").unwrap().parse().unwrap();
    let mut flipped = signature.to_owned().into_bytes();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).unwrap();
    for forged in [
        url.replace("/1.png?", "/0.png?"),
        url.replace(id, other_id),
        format!("{path}?expires={}&{signature}", expiry + 86_400),
        format!("{path}?{expires}&{flipped}"),
        format!("{path}?{expires}"),
        path.to_owned(),
        url.replace("/1.png?", "/1.jpg?"),
    ] {
        let response = browser_fetch(&forged).await;
        expect_error(response, "404 not_found_error resource_not_found").await;
    }
    // The key is no substitute for a signature.
    let response = reqwest::Client::new()
        .get(path)
        .bearer_auth(&acct.key)
        .call()
        .await;
    expect_error(response, "404 not_found_error resource_not_found").await;
}

/// A server started with `args`, an account's key, and one succeeded task of one image.
async fn one_image(args: &[&str]) -> (tempfile::TempDir, TestServer, String, Value) {
    let (tmp, server) = TestServer::start(args);
    let acct = server.account(10).await;
    let (_, done) = server
        .generate(
            &acct.key,
            json!({"prompt": "a lighthouse", "size": "256x256"}),
        )
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    (tmp, server, acct.key, done)
}

#[tokio::test]
async fn an_expired_link_is_410_and_the_task_gives_a_fresh_one() {
    let (_tmp, server, key, done) = one_image(&["--image-url-ttl", "1s"]).await;
    let old = link(&done, 0);
    assert_eq!(browser_fetch(&old).await.status(), 200);
    // At least the ttl, at most a window (1 s here) more.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let response = browser_fetch(&old).await;
    let (_, e) = expect_error(response, "410 gone_error url_expired").await;
    assert!(e["message"].as_str().unwrap().contains("fresh link"), "{e}");

    let again = server
        .get_json(&key, &format!("/v1/tasks/{}", done["id"].as_str().unwrap()))
        .await;
    let fresh = link(&again, 0);
    assert_ne!(fresh, old);
    assert_eq!(browser_fetch(&fresh).await.status(), 200);
}

#[tokio::test]
async fn a_link_to_a_task_past_the_retention_is_410_resource_expired() {
    let (_tmp, _server, _key, done) =
        one_image(&["--retention", "2s", "--image-url-ttl", "1h"]).await;
    let url = link(&done, 0);
    assert_eq!(browser_fetch(&url).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let response = browser_fetch(&url).await;
    expect_error(response, "410 gone_error resource_expired").await;
}

#[tokio::test]
async fn links_start_with_the_public_url_in_answers_and_webhook_bodies() {
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    async fn hook(State(got): State<Arc<Mutex<Vec<Value>>>>, body: axum::body::Bytes) {
        got.lock()
            .unwrap()
            .push(serde_json::from_slice(&body).unwrap());
    }
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(Arc::clone(&got));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let (_tmp, server) = TestServer::start(&[
        "--public-url",
        "https://img.example.com/",
        "--allow-private-webhooks",
    ]);
    let acct = server.account(10).await;
    let (_, done) = server
        .generate(
            &acct.key,
            json!({"prompt": "a lighthouse", "size": "256x256", "webhook_url": hook_url}),
        )
        .await;
    let url = link(&done, 0);
    assert!(
        url.starts_with("https://img.example.com/v1/links/"),
        "{url}"
    );
    // The path and query work here, the base being the proxy's.
    let here = url.replace("https://img.example.com", &server.base);
    assert_eq!(browser_fetch(&here).await.status(), 200);
    let list = server.get_json(&acct.key, "/v1/tasks").await;
    assert!(link(&list["data"][0], 0).starts_with("https://img.example.com/v1/links/"));

    for _ in 0..200 {
        if !got.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let delivered = got.lock().unwrap().first().cloned().expect("no delivery");
    assert!(
        link(&delivered, 0).starts_with("https://img.example.com/v1/links/"),
        "{delivered}"
    );
}

#[tokio::test]
async fn a_bad_public_url_stops_the_start() {
    for bad in [
        "img.example.com",
        "ftp://img.example.com",
        "https://img.example.com/?a=1",
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--addr", "127.0.0.1:0", "--public-url", bad])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--public-url"), "{bad}: {stderr}");
    }
}
