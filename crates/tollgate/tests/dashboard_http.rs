//! The dashboard over plain HTTP, against the real binary: cookies and their flags, CSRF,
//! session expiry and sign-out, escaping, the sign-in rate limit, and vouchers (single use under
//! concurrency, expiry) through both the pages and the API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::browser::{csrf_of, location, shown_once, Browser};
use common::{expect_error, Call, TestServer, ADMIN_TOKEN};
use futures_util::future::join_all;
use reqwest::header::SET_COOKIE;
use serde_json::{json, Value};
use std::time::Duration;

async fn create_voucher(server: &TestServer, body: Value) -> String {
    let response = server
        .admin(reqwest::Method::POST, "/admin/vouchers", Some(body))
        .await;
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    created["code"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn sign_in_exchanges_the_key_for_a_strict_http_only_cookie() {
    let (_tmp, server) = TestServer::start(&["--session-ttl", "1h"]);
    let acct = server.account(10).await;

    // A page asked for without a session: to the sign-in page, which remembers the way back.
    let mut browser = Browser::new(&server);
    let response = browser.get("/dashboard/credits").await;
    assert_eq!(response.status(), 303);
    assert_eq!(
        location(&response),
        "/dashboard/sign-in?next=/dashboard/credits"
    );
    let form = browser
        .page("/dashboard/sign-in?next=/dashboard/credits")
        .await;
    assert!(form.contains("type=\"password\""));
    let response = browser
        .post(
            "/dashboard/sign-in",
            &[
                ("csrf", &csrf_of(&form)),
                ("credential", &acct.key),
                ("next", "/dashboard/credits"),
            ],
        )
        .await;
    assert_eq!(response.status(), 303);
    assert_eq!(location(&response), "/dashboard/credits");
    let cookie = browser
        .set_cookies
        .iter()
        .find(|c| c.starts_with("tollgate_session="))
        .unwrap()
        .clone();
    for flag in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/dashboard",
        "Max-Age=3600",
    ] {
        assert!(cookie.contains(flag), "{flag} in {cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    let token = cookie
        .split(';')
        .next()
        .unwrap()
        .trim_start_matches("tollgate_session=");
    assert_eq!(token.len(), 48, "192 random bits");
    assert!(!cookie.contains(&acct.key));
    assert!(browser.page("/dashboard/credits").await.contains("Redeem"));

    // An open redirect is not followed.
    let mut other = Browser::new(&server);
    let form = other.page("/dashboard/sign-in").await;
    let response = other
        .post(
            "/dashboard/sign-in",
            &[
                ("csrf", &csrf_of(&form)),
                ("credential", &acct.key),
                ("next", "//evil.example/"),
            ],
        )
        .await;
    assert_eq!(location(&response), "/dashboard/overview");

    // Behind a TLS proxy the cookie is Secure.
    let response = server
        .http
        .get(server.url("/dashboard/sign-in"))
        .header("X-Forwarded-Proto", "https")
        .call()
        .await;
    let cookie = response
        .headers()
        .get(SET_COOKIE)
        .unwrap()
        .to_str()
        .unwrap();
    assert!(cookie.contains("; Secure"), "{cookie}");

    // Security headers on every page: no scripts, no framing.
    let response = browser.get("/dashboard/overview").await;
    let csp = response
        .headers()
        .get("content-security-policy")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
    assert_eq!(response.headers().get("cache-control").unwrap(), "no-store");

    // The key reached no log.
    assert!(!server.logs().contains(&acct.key));
}

#[tokio::test]
async fn a_wrong_key_re_renders_the_form() {
    let (_tmp, server) = TestServer::start(&[]);
    let mut browser = Browser::new(&server);
    let response = browser.sign_in("tg_0000000000not-a-key").await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("not valid"), "{text}");
    assert!(!browser.cookies.contains_key("tollgate_session"));
}

#[tokio::test]
async fn forms_without_the_session_csrf_token_are_refused() {
    let (_tmp, server) = TestServer::start(&[]);
    let code = create_voucher(&server, json!({"credits": 5})).await;
    let acct = server.account(0).await;
    let other = server.account(0).await;
    let mut browser = Browser::signed_in(&server, &acct.key, "/dashboard/overview").await;
    let mut intruder = Browser::signed_in(&server, &other.key, "/dashboard/overview").await;
    let foreign_token = intruder.csrf().await;

    for form in [
        vec![("code", code.as_str())],
        vec![("code", code.as_str()), ("csrf", "")],
        vec![("code", code.as_str()), ("csrf", foreign_token.as_str())],
    ] {
        let response = browser.post("/dashboard/credits/redeem", &form).await;
        expect_error(response, "403 invalid_request_error csrf_token_invalid").await;
    }
    let response = browser.post("/dashboard/keys", &[]).await;
    expect_error(response, "403 invalid_request_error csrf_token_invalid").await;
    assert_eq!(server.balance(&acct.key).await, 0, "nothing was redeemed");

    // The session's own token works.
    let csrf = browser.csrf().await;
    let response = browser
        .post(
            "/dashboard/credits/redeem",
            &[("csrf", &csrf), ("code", &code)],
        )
        .await;
    assert_eq!(response.status(), 303);
    assert_eq!(server.balance(&acct.key).await, 5);

    // The sign-in form has its own (double-submit) token: a forged POST signs nobody in.
    let mut forger = Browser::new(&server);
    let response = forger
        .post(
            "/dashboard/sign-in",
            &[("csrf", &"0".repeat(48)), ("credential", &acct.key)],
        )
        .await;
    assert_eq!(response.status(), 200);
    assert!(response.text().await.unwrap().contains("expired"));
    assert!(!forger.cookies.contains_key("tollgate_session"));
}

#[tokio::test]
async fn sessions_expire() {
    let (_tmp, server) = TestServer::start(&["--session-ttl", "2s"]);
    let acct = server.account(1).await;
    let mut browser = Browser::signed_in(&server, &acct.key, "/dashboard/overview").await;
    browser.page("/dashboard/overview").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let response = browser.get("/dashboard/overview").await;
    assert_eq!(response.status(), 303);
    assert!(location(&response).starts_with("/dashboard/sign-in"));
    assert!(
        !browser.cookies.contains_key("tollgate_session"),
        "the stale cookie is cleared"
    );
}

#[tokio::test]
async fn sign_out_ends_the_session_for_good() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(1).await;
    let mut browser = Browser::signed_in(&server, &acct.key, "/dashboard/overview").await;
    let stolen = browser.cookies.clone();
    let csrf = browser.csrf().await;
    let response = browser
        .post("/dashboard/sign-out", &[("csrf", &csrf)])
        .await;
    assert_eq!(response.status(), 303);
    assert_eq!(location(&response), "/dashboard/sign-in");
    assert!(!browser.cookies.contains_key("tollgate_session"));
    // The old cookie, replayed, opens nothing: the session is gone on the server.
    browser.cookies = stolen;
    let response = browser.get("/dashboard/overview").await;
    assert_eq!(response.status(), 303);
}

#[tokio::test]
async fn revoking_the_key_ends_its_sessions_at_once() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(1).await;
    let mut browser = Browser::signed_in(&server, &acct.key, "/dashboard/overview").await;
    let keys = server.keys(&acct.id).await;
    let key_id = keys[0]["id"].as_str().unwrap();
    let response = server
        .admin(
            reqwest::Method::DELETE,
            &format!("/admin/keys/{key_id}"),
            None,
        )
        .await;
    assert_eq!(response.status(), 204);
    let response = browser.get("/dashboard/overview").await;
    assert_eq!(response.status(), 303);
    assert!(location(&response).starts_with("/dashboard/sign-in"));
}

#[tokio::test]
async fn prompts_render_as_text() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(10).await;
    let prompt = "<script>alert(1)</script><img src=x onerror=alert(2)>\"'&";
    let task = server
        .create_task(&acct.key, json!({"prompt": prompt, "size": "256x256"}))
        .await;
    server
        .wait_task(&acct.key, task["id"].as_str().unwrap())
        .await;
    let mut browser = Browser::signed_in(&server, &acct.key, "/dashboard/overview").await;
    let html = browser.page("/dashboard/tasks").await;
    assert!(
        html.contains(
            "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;&quot;'&amp;"
        ),
        "{html}"
    );
    assert!(!html.contains("<script"));
    assert!(!html.contains("<img src=x"));
    // Its thumbnail is served to the session (and only as a PNG).
    let response = browser
        .get(&format!(
            "/dashboard/tasks/{}/images/0",
            task["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers().get("content-type").unwrap(), "image/png");
    // Not to a stranger.
    let response = Browser::new(&server)
        .get(&format!(
            "/dashboard/tasks/{}/images/0",
            task["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(response.status(), 303);
}

#[tokio::test]
async fn sign_in_is_rate_limited_per_address_and_per_key() {
    let (_tmp, server) = TestServer::start(&[]);
    let a = server.account(1).await;
    let b = server.account(1).await;
    let prefix_of_a: String = a.key.chars().take(9).collect();
    let mut attacker = Browser::new(&server);
    for i in 0..10 {
        let response = attacker.sign_in(&format!("{prefix_of_a}guess{i}")).await;
        assert_eq!(response.status(), 200);
        assert!(response.text().await.unwrap().contains("not valid"));
    }
    // The eleventh attempt from that address is refused, even with the right key.
    let response = attacker.sign_in(&a.key).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("Too many sign-in attempts"), "{text}");
    assert!(!attacker.cookies.contains_key("tollgate_session"));

    // Another address with another key is not affected...
    let mut neighbour = Browser::from_address(&server, "127.0.0.2".parse().unwrap());
    let response = neighbour.sign_in(&b.key).await;
    assert_eq!(response.status(), 303);
    // ...but the attacked key's prefix is limited from everywhere.
    let mut elsewhere = Browser::from_address(&server, "127.0.0.3".parse().unwrap());
    let response = elsewhere.sign_in(&a.key).await;
    assert_eq!(response.status(), 200);
    assert!(response
        .text()
        .await
        .unwrap()
        .contains("Too many sign-in attempts"));
}

#[tokio::test]
async fn a_voucher_pays_out_once_however_many_redeem_it_at_once() {
    let (_tmp, server) = TestServer::start(&[]);
    let code = create_voucher(&server, json!({"credits": 25, "note": "race"})).await;
    assert!(code.starts_with("tgv_") && code.len() == 36, "{code}");
    let accounts = join_all((0..8).map(|_| server.account(0))).await;
    // Half through the API, half through the dashboard's form, all at once.
    let mut browsers = Vec::new();
    for acct in &accounts[4..] {
        let mut browser = Browser::signed_in(&server, &acct.key, "/dashboard/overview").await;
        let csrf = browser.csrf().await;
        browsers.push((browser, csrf));
    }
    let api = accounts[..4].iter().map(|acct| {
        server
            .post(&acct.key, "/v1/vouchers/redeem")
            .json(&json!({"code": code}))
            .send()
    });
    let pages = browsers.iter_mut().map(|(browser, csrf)| {
        let csrf = csrf.clone();
        let code = code.clone();
        async move {
            browser
                .post(
                    "/dashboard/credits/redeem",
                    &[("csrf", &csrf), ("code", &code)],
                )
                .await
        }
    });
    let (api, pages) = tokio::join!(join_all(api), join_all(pages));
    let mut paid = 0;
    for response in api {
        let response = response.unwrap();
        if response.status() == 200 {
            let account: Value = response.json().await.unwrap();
            assert_eq!(account["credits"], 25);
            paid += 1;
        } else {
            expect_error(response, "409 conflict_error voucher_already_redeemed").await;
        }
    }
    for response in pages {
        if response.status() == 303 {
            paid += 1;
        } else {
            assert_eq!(response.status(), 200);
            assert!(response.text().await.unwrap().contains("already redeemed"));
        }
    }
    assert_eq!(paid, 1, "exactly one redemption succeeds");
    let mut total = 0;
    for acct in &accounts {
        total += server.balance(&acct.key).await;
    }
    assert_eq!(total, 25, "the credits were added once");
    let listed: Value = server
        .admin(reqwest::Method::GET, "/admin/vouchers", None)
        .await
        .json()
        .await
        .unwrap();
    let voucher = &listed["data"][0];
    assert_eq!(voucher["credits"], 25);
    assert!(voucher["redeemed_by"].is_string());
    assert!(
        !listed.to_string().contains(&code),
        "the code is never listed"
    );
}

#[tokio::test]
async fn expired_and_unknown_vouchers_are_refused() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(0).await;
    let soon = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let expires_at = soon
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let code = create_voucher(&server, json!({"credits": 5, "expires_at": expires_at})).await;
    let past = server
        .admin(
            reqwest::Method::POST,
            "/admin/vouchers",
            Some(json!({"credits": 5, "expires_at": "2001-01-01T00:00:00Z"})),
        )
        .await;
    let (_, error) = expect_error(past, "400 invalid_request_error invalid_value").await;
    assert_eq!(error["param"], "expires_at");

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let response = server
        .post(&acct.key, "/v1/vouchers/redeem")
        .json(&json!({"code": code}))
        .call()
        .await;
    expect_error(response, "410 gone_error voucher_expired").await;

    let response = server
        .post(&acct.key, "/v1/vouchers/redeem")
        .json(&json!({"code": "tgv_00000000000000000000000000000000"}))
        .call()
        .await;
    expect_error(response, "404 not_found_error voucher_not_found").await;

    // The page tells the same, in the form (200), keeping what was typed.
    let mut browser = Browser::signed_in(&server, &acct.key, "/dashboard/overview").await;
    let csrf = browser.csrf().await;
    let response = browser
        .post(
            "/dashboard/credits/redeem",
            &[("csrf", &csrf), ("code", &code)],
        )
        .await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("has expired"), "{text}");
    assert_eq!(server.balance(&acct.key).await, 0);
}

#[tokio::test]
async fn the_402_links_to_the_top_up_page_where_a_voucher_fixes_it() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(1).await;
    let response = server
        .post(&acct.key, "/v1/images/generations")
        .json(&json!({"prompt": "too big", "size": "1024x1024"}))
        .call()
        .await;
    let (_, error) = expect_error(response, "402 billing_error insufficient_credits").await;
    let link = format!("{}/dashboard/credits", server.base);
    assert!(
        error["message"].as_str().unwrap().contains(&link),
        "{error}"
    );

    let code = create_voucher(&server, json!({"credits": 10})).await;
    let mut browser = Browser::new(&server);
    // The link, followed: sign in, and back to the top-up page.
    let response = browser.get("/dashboard/credits").await;
    let next = location(&response);
    let form = browser.page(&next).await;
    let response = browser
        .post(
            "/dashboard/sign-in",
            &[
                ("csrf", &csrf_of(&form)),
                ("credential", &acct.key),
                ("next", "/dashboard/credits"),
            ],
        )
        .await;
    assert_eq!(location(&response), "/dashboard/credits");
    let page = browser.page("/dashboard/credits").await;
    let response = browser
        .post(
            "/dashboard/credits/redeem",
            &[
                ("csrf", &csrf_of(&page)),
                ("code", &format!("  {}  ", code.to_uppercase())),
            ],
        )
        .await;
    assert_eq!(response.status(), 303);
    assert_eq!(location(&response), "/dashboard/credits");
    let page = browser.page("/dashboard/credits").await;
    assert!(
        page.contains("Voucher redeemed: 10 credits added"),
        "{page}"
    );
    assert!(
        !browser.cookies.contains_key("tollgate_flash"),
        "a flash shows once"
    );
    let response = server
        .post(&acct.key, "/v1/images/generations")
        .json(&json!({"prompt": "too big", "size": "1024x1024"}))
        .call()
        .await;
    assert_eq!(response.status(), 202);
    let ledger: Value = server.get_json(&acct.key, "/v1/account/ledger").await;
    assert!(ledger["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "voucher" && e["delta"] == 10));
}

#[tokio::test]
async fn the_operator_manages_accounts_keys_credits_and_vouchers() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(3).await;
    let mut operator = Browser::signed_in(&server, ADMIN_TOKEN, "/dashboard/admin").await;
    let page = operator.page("/dashboard/admin").await;
    assert!(page.contains(&acct.id));
    let csrf = csrf_of(&page);

    // Grant credits.
    let response = operator
        .post(
            &format!("/dashboard/admin/accounts/{}/credits", acct.id),
            &[("csrf", &csrf), ("amount", "40"), ("note", "welcome")],
        )
        .await;
    assert_eq!(response.status(), 303);
    assert_eq!(server.balance(&acct.key).await, 43);
    let page = operator
        .page(&format!("/dashboard/admin/accounts/{}", acct.id))
        .await;
    assert!(page.contains("Granted 40 credits"), "{page}");

    // A key made here works on the API; revoked here, it is refused at once.
    let response = operator
        .post(
            &format!("/dashboard/admin/accounts/{}/keys", acct.id),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(response.status(), 200);
    let page = response.text().await.unwrap();
    let key = shown_once(&page);
    assert!(key.starts_with("tg_") && key.len() == 51, "{key}");
    assert_eq!(server.balance(&key).await, 43);
    let keys = server.keys(&acct.id).await;
    let key_id = keys[1]["id"].as_str().unwrap();
    let response = operator
        .post(
            &format!("/dashboard/admin/accounts/{}/keys/{key_id}/revoke", acct.id),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(response.status(), 303);
    let response = server.get(&key, "/v1/account").call().await;
    expect_error(response, "401 authentication_error invalid_api_key").await;

    // Issue a voucher: the code is on the answer page and nowhere after.
    let response = operator
        .post(
            "/dashboard/admin/vouchers",
            &[
                ("csrf", &csrf),
                ("credits", "15"),
                ("expires", "2099-12-31"),
                ("note", "<b>bold</b>"),
            ],
        )
        .await;
    assert_eq!(response.status(), 200);
    let page = response.text().await.unwrap();
    let code = shown_once(&page);
    assert!(code.starts_with("tgv_") && code.len() == 36, "{code}");
    assert!(page.contains("&lt;b&gt;bold&lt;/b&gt;"));
    let later = operator.page("/dashboard/admin/vouchers").await;
    assert!(!later.contains(&code));
    assert!(
        later.contains("2100-01-01 00:00 UTC"),
        "valid through 2099-12-31"
    );
    let response = server
        .post(&acct.key, "/v1/vouchers/redeem")
        .json(&json!({"code": code}))
        .call()
        .await;
    let account: Value = response.json().await.unwrap();
    assert_eq!(account["credits"], 58);

    // A bad amount is a message, not an error page.
    let response = operator
        .post(
            "/dashboard/admin/vouchers",
            &[("csrf", &csrf), ("credits", "lots")],
        )
        .await;
    assert_eq!(response.status(), 303);
    assert!(operator
        .page("/dashboard/admin/vouchers")
        .await
        .contains("whole number"));

    // Account holders cannot reach the operator's pages, and the operator's are not theirs.
    let mut holder = Browser::signed_in(&server, &acct.key, "/dashboard/overview").await;
    let response = holder.get("/dashboard/admin").await;
    assert_eq!(location(&response), "/dashboard/overview");
    let response = operator.get("/dashboard/credits").await;
    assert_eq!(location(&response), "/dashboard/admin");
    assert!(!server.logs().contains(ADMIN_TOKEN));
}

#[tokio::test]
async fn account_holders_manage_their_own_keys_only() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(3).await;
    let other = server.account(3).await;
    let mut browser = Browser::signed_in(&server, &acct.key, "/dashboard/overview").await;
    let csrf = browser.csrf().await;
    let response = browser.post("/dashboard/keys", &[("csrf", &csrf)]).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers().get("cache-control").unwrap(), "no-store");
    let page = response.text().await.unwrap();
    assert!(page.contains("copy it now"));
    let new_key = shown_once(&page);
    assert!(new_key.starts_with("tg_"), "{new_key}");
    assert_eq!(server.balance(&new_key).await, 3);

    // Another account's key is not theirs to revoke.
    let keys = server.keys(&other.id).await;
    let foreign = keys[0]["id"].as_str().unwrap();
    let response = browser
        .post(
            &format!("/dashboard/keys/{foreign}/revoke"),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(response.status(), 303);
    assert!(browser
        .page("/dashboard/keys")
        .await
        .contains("no such key"));
    assert_eq!(server.balance(&other.key).await, 3);

    // Revoking the key of the session signs the browser out.
    let keys = server.keys(&acct.id).await;
    let own = keys[0]["id"].as_str().unwrap();
    let response = browser
        .post(&format!("/dashboard/keys/{own}/revoke"), &[("csrf", &csrf)])
        .await;
    assert_eq!(location(&response), "/dashboard/sign-in");
    let response = browser.get("/dashboard/keys").await;
    assert_eq!(response.status(), 303);
    let response = server.get(&acct.key, "/v1/account").call().await;
    expect_error(response, "401 authentication_error invalid_api_key").await;
}

#[tokio::test]
async fn the_stylesheet_is_cached_and_pages_show_spend() {
    let (_tmp, server) = TestServer::start(&["--workers", "0"]);
    let acct = server.account(20).await;
    for _ in 0..3 {
        server
            .create_task(&acct.key, json!({"prompt": "p", "size": "512x512"}))
            .await;
    }
    let mut browser = Browser::signed_in(&server, &acct.key, "/dashboard/overview").await;
    let page = browser.page("/dashboard/overview").await;
    assert!(page.contains("<svg class=\"chart\""));
    assert!(page.contains("6 credits"), "spent today: 3 × 2");
    let start = page.find("/dashboard/style.css?v=").unwrap();
    let end = start + page[start..].find('"').unwrap();
    let response = browser.get(&page[start..end]).await;
    assert_eq!(response.status(), 200);
    assert!(response
        .headers()
        .get("cache-control")
        .unwrap()
        .to_str()
        .unwrap()
        .contains("immutable"));
    assert!(response.text().await.unwrap().contains("@media"));
}

/// An OpenAI-compatible upstream that refuses every request (a 400, as for a bad parameter).
async fn refusing_upstream() -> String {
    let app = axum::Router::new().route(
        "/v1/images/generations",
        axum::routing::post(|| async {
            (
                axum::http::StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": {"message": "model not available", "type": "invalid_request_error"}})),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::test]
async fn the_operator_sees_the_models_their_prices_and_a_provider_that_keeps_failing() {
    let upstream = refusing_upstream().await;
    let files = tempfile::tempdir().unwrap();
    let models = files.path().join("models.toml");
    std::fs::write(
        &models,
        format!(
            "default = \"sketch\"\n\n[models.sketch]\nname = \"Sketch\"\nbackend = \"builtin\"\n\
             prices = {{ \"256x256\" = 1, \"512x512\" = 2 }}\n\n[models.broken]\nname = \"Broken\"\n\
             backend = \"openai\"\nurl = \"{upstream}\"\napi_key_env = \"BROKEN_KEY\"\n\
             prices = {{ \"1024x1024\" = 9 }}\n"
        ),
    )
    .unwrap();
    let (_tmp, server) = TestServer::start_with_env(
        &["--models", models.to_str().unwrap()],
        &[("BROKEN_KEY", "sk-broken-0c1d")],
    );
    let acct = server.account(100).await;
    let metric = |text: &str, line: &str| {
        text.lines()
            .find(|l| l.starts_with(line))
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
    };
    let metrics = server.http.get(server.url("/metrics")).call().await;
    let text = metrics.text().await.unwrap();
    assert_eq!(
        metric(&text, "tollgate_model_failing{model=\"broken\"}").as_deref(),
        Some("0"),
        "{text}"
    );

    for i in 0..3 {
        let (_, done) = server
            .generate(
                &acct.key,
                json!({"prompt": format!("p{i}"), "model": "broken"}),
            )
            .await;
        assert_eq!(done["error"]["code"], "upstream_rejected", "{done}");
    }
    let (_, done) = server.generate(&acct.key, json!({"prompt": "fine"})).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(
        server.balance(&acct.key).await,
        100 - 2,
        "the failures were refunded"
    );

    let text = server
        .http
        .get(server.url("/metrics"))
        .call()
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&text, "tollgate_model_failing{model=\"broken\"}").as_deref(),
        Some("1"),
        "{text}"
    );
    assert_eq!(
        metric(&text, "tollgate_model_failing{model=\"sketch\"}").as_deref(),
        Some("0"),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "tollgate_model_runs_total{model=\"broken\",outcome=\"failed\"}"
        )
        .as_deref(),
        Some("3"),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "tollgate_model_runs_total{model=\"sketch\",outcome=\"succeeded\"}"
        )
        .as_deref(),
        Some("1"),
        "{text}"
    );

    let mut operator = Browser::signed_in(&server, ADMIN_TOKEN, "/dashboard/admin").await;
    let page = operator.page("/dashboard/admin").await;
    let models_card = &page[page.find("id=\"models\"").expect("a models card")..];
    let broken_row = &models_card[models_card.find("broken").unwrap()..];
    let broken_row = &broken_row[..broken_row.find("</tr>").unwrap()];
    assert!(broken_row.contains("failing"), "{broken_row}");
    assert!(broken_row.contains("3 in a row"), "{broken_row}");
    assert!(broken_row.contains("upstream_rejected"), "{broken_row}");
    assert!(broken_row.contains("1024x1024 9 credits"), "{broken_row}");
    let sketch_row = &models_card[models_card.find("sketch").unwrap()..];
    let sketch_row = &sketch_row[..sketch_row.find("</tr>").unwrap()];
    assert!(sketch_row.contains(">ok<"), "{sketch_row}");
    assert!(!page.contains("sk-broken-0c1d"));

    // The account holder's Top up page lists the prices of every model.
    let mut holder = Browser::signed_in(&server, &acct.key, "/dashboard/overview").await;
    let credits = holder.page("/dashboard/credits").await;
    let prices = &credits[credits.find("id=\"prices\"").unwrap()..];
    for expected in [
        "Broken",
        "1024x1024",
        "9 credits",
        "Sketch",
        "256x256",
        "1 credit",
    ] {
        assert!(prices.contains(expected), "{expected} in {prices}");
    }
}
