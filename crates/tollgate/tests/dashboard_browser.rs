//! The dashboard in a real browser: headless Chromium driven over WebDriver (Debian's
//! `chromium` and `chromium-driver`, through `fantoccini`), against the real binary.
//!
//! The three scenarios: the operator issues a voucher and an account that got a 402
//! redeems it, after which the API accepts the request; a key revoked in the browser is refused
//! by the API at once; a prompt that is a script renders as text. A fourth visits every main
//! page at a phone's width.
//!
//! Set `TOLLGATE_SCREENSHOTS=<dir>` to keep a PNG of each main page there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{expect_error, Call, TestServer, ADMIN_TOKEN};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// One browser at a time: Chromium is heavy, and CI machines are small.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// chromedriver on a free 127.0.0.1 port, with a headless Chromium session on a fresh profile.
struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

fn program(env: &str, default: &str) -> PathBuf {
    std::env::var_os(env).map_or_else(|| PathBuf::from(default), PathBuf::from)
}

impl Browser {
    async fn start() -> Browser {
        let chromedriver = program("TOLLGATE_CHROMEDRIVER", CHROMEDRIVER);
        let chromium = program("TOLLGATE_CHROMIUM", CHROMIUM);
        for (path, package) in [(&chromedriver, "chromium-driver"), (&chromium, "chromium")] {
            assert!(
                path.exists(),
                "{} is missing: the dashboard's browser tests drive headless Chromium through \
                 chromedriver. Install them with `apt-get update && apt-get install -y chromium \
                 chromium-driver` (Debian; the `{package}` package), or point TOLLGATE_CHROMIUM and \
                 TOLLGATE_CHROMEDRIVER at your own.",
                path.display()
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let profile = tempfile::tempdir().unwrap();
        let driver = Command::new(&chromedriver)
            // Its own process group, which Chromium's processes join: `Drop` ends them all, even
            // when a test fails half-way.
            .process_group(0)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = reqwest::get(format!("{url}/status")).await;
            if let Ok(response) = ready {
                let status: Value = response.json().await.unwrap_or_default();
                if status["value"]["ready"] == true {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not come up on {url}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        });
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities.as_object().unwrap().clone())
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("no Chromium session from chromedriver: {e}"));
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    /// Ends the WebDriver session (Chromium quits), then chromedriver (in `Drop`).
    async fn close(self) {
        let _ = self.client.clone().close().await;
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    async fn path(&self) -> String {
        let url = self.client.current_url().await.unwrap();
        match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        }
    }

    async fn fill(&self, css: &str, text: &str) {
        let field = self.client.find(Locator::Css(css)).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    /// Clicks a link or a submit button and waits for the page it leads to: WebDriver's click
    /// may return before a form's navigation has replaced the document.
    async fn click(&self, css: &str) {
        let old_page = self.client.find(Locator::Css("html")).await.unwrap();
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
            .click()
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        // The old document's root goes stale once the new page has replaced it.
        while old_page.tag_name().await.is_ok() {
            assert!(Instant::now() < deadline, "clicking {css} led nowhere");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        while self
            .client
            .execute("return document.readyState", vec![])
            .await
            .map_or(true, |state| state != "complete")
        {
            assert!(
                Instant::now() < deadline,
                "the page after {css} did not load"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn text(&self, css: &str) -> String {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
            .text()
            .await
            .unwrap()
    }

    /// Signs in through the form on the page the browser is at (or the sign-in page).
    async fn sign_in(&self, base: &str, credential: &str) {
        if !self.path().await.starts_with("/dashboard/sign-in") {
            self.goto(&format!("{base}/dashboard/sign-in")).await;
        }
        self.fill("input[name=credential]", credential).await;
        self.click("form[action='/dashboard/sign-in'] button[type=submit]")
            .await;
        assert!(
            !self.path().await.starts_with("/dashboard/sign-in"),
            "still on the sign-in page: {}",
            self.text(".card").await
        );
    }

    async fn sign_out(&self) {
        self.click("form[action='/dashboard/sign-out'] button")
            .await;
        assert_eq!(self.path().await, "/dashboard/sign-in");
    }

    /// With `TOLLGATE_SCREENSHOTS` set, keeps a PNG of the page there.
    async fn screenshot(&self, name: &str) {
        let Some(dir) = std::env::var_os("TOLLGATE_SCREENSHOTS") else {
            return;
        };
        let dir = Path::new(&dir);
        std::fs::create_dir_all(dir).unwrap();
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    /// Sizes the window so the whole page fits, for a full-page screenshot.
    async fn fit_height(&self, width: u32) {
        self.client.set_window_size(width, 900).await.unwrap();
        let height = self
            .client
            .execute("return document.documentElement.scrollHeight", vec![])
            .await
            .unwrap()
            .as_u64()
            .unwrap();
        // The window's frame is not part of the viewport in headless mode.
        self.client
            .set_window_size(width, u32::try_from(height).unwrap().clamp(600, 2400))
            .await
            .unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &group])
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

async fn api_status(server: &TestServer, key: &str, body: Value) -> reqwest::Response {
    server
        .post(key, "/v1/images/generations")
        .json(&body)
        .call()
        .await
}

#[tokio::test]
async fn an_account_that_got_402_redeems_the_operators_voucher_and_the_next_request_succeeds() {
    let _one = ONE_BROWSER.lock().await;
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(1).await;
    let big = json!({"prompt": "a cathedral of glass", "size": "1024x1024"});
    let (_, error) = expect_error(
        api_status(&server, &acct.key, big.clone()).await,
        "402 billing_error insufficient_credits",
    )
    .await;
    let message = error["message"].as_str().unwrap();
    let link = format!("{}/dashboard/credits", server.base);
    assert!(message.contains(&link), "{message}");

    let browser = Browser::start().await;

    // The operator issues a voucher.
    browser.sign_in(&server.base, ADMIN_TOKEN).await;
    assert_eq!(browser.path().await, "/dashboard/admin");
    browser
        .click("nav a[href='/dashboard/admin/vouchers']")
        .await;
    browser.fill("input[name=credits]", "10").await;
    browser.fill("input[name=note]", "for the 402").await;
    browser
        .click("form[action='/dashboard/admin/vouchers'] button")
        .await;
    let code = browser.text("code.shown-once").await;
    assert!(code.starts_with("tgv_") && code.len() == 36, "{code}");
    browser.sign_out().await;

    // The account holder follows the 402's link, signs in, lands on the top-up page, redeems.
    browser.goto(&link).await;
    assert_eq!(
        browser.path().await,
        "/dashboard/sign-in?next=/dashboard/credits"
    );
    browser.sign_in(&server.base, &acct.key).await;
    assert_eq!(browser.path().await, "/dashboard/credits");
    browser.fill("input[name=code]", &code).await;
    browser
        .click("form[action='/dashboard/credits/redeem'] button")
        .await;
    assert_eq!(browser.path().await, "/dashboard/credits");
    let flash = browser.text(".alert.ok").await;
    assert!(flash.contains("10 credits added"), "{flash}");
    assert_eq!(browser.text("#balance").await, "11 credits");

    // The request that got 402 now succeeds.
    assert_eq!(api_status(&server, &acct.key, big).await.status(), 202);

    // The same code a second time: refused, in the page.
    browser.fill("input[name=code]", &code).await;
    browser
        .click("form[action='/dashboard/credits/redeem'] button")
        .await;
    let refusal = browser.text(".alert.error").await;
    assert!(refusal.contains("already redeemed"), "{refusal}");
    browser.close().await;
}

#[tokio::test]
async fn a_key_revoked_in_the_browser_is_refused_by_the_api_at_once() {
    let _one = ONE_BROWSER.lock().await;
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(5).await;
    let (second_id, second_key) = server.new_key(&acct.id).await;
    let (second_id, second_key) = (second_id.as_str(), second_key.as_str());
    assert_eq!(server.balance(second_key).await, 5);

    let browser = Browser::start().await;
    browser.sign_in(&server.base, &acct.key).await;
    browser.click("nav a[href='/dashboard/keys']").await;
    browser
        .click(&format!(
            "form[action='/dashboard/keys/{second_id}/revoke'] button"
        ))
        .await;
    let flash = browser.text(".alert.ok").await;
    assert!(flash.contains("revoked"), "{flash}");

    // At once: the very next API request with it is refused; the other key still works.
    let response = server.get(second_key, "/v1/account").call().await;
    expect_error(response, "401 authentication_error invalid_api_key").await;
    assert_eq!(server.balance(&acct.key).await, 5);
    assert!(browser.text("table").await.contains("Revoked"));
    browser.close().await;
}

#[tokio::test]
async fn a_script_in_a_prompt_renders_as_text() {
    let _one = ONE_BROWSER.lock().await;
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(10).await;
    let prompt = "<script>alert(1)</script><img src=x onerror=\"document.title='pwned'\">";
    let (_, done) = server
        .generate(&acct.key, json!({"prompt": prompt, "size": "256x256"}))
        .await;
    assert_eq!(done["status"], "succeeded");

    let browser = Browser::start().await;
    browser.sign_in(&server.base, &acct.key).await;
    browser.click("nav a[href='/dashboard/tasks']").await;
    assert_eq!(browser.text("p.prompt").await, prompt);
    assert!(
        browser.client.get_alert_text().await.is_err(),
        "no alert opened"
    );
    let mut checks = Value::Null;
    for _ in 0..50 {
        checks = browser
            .client
            .execute(
                "return [document.title, document.scripts.length, \
                 document.querySelectorAll('img[src=x]').length, \
                 document.querySelector('.thumb img').naturalWidth];",
                vec![],
            )
            .await
            .unwrap();
        if checks[3] != 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(checks[0], "Gallery · tollgate");
    assert_eq!(checks[1], 0, "no script element on the page");
    assert_eq!(checks[2], 0, "the prompt's <img> is text, not an element");
    assert_eq!(checks[3], 256, "the thumbnail loaded through the session");
    browser.close().await;
}

/// Every main page at a desktop's width and at a phone's (375 px), with nothing wider than the
/// screen; with `TOLLGATE_SCREENSHOTS` set, a PNG of each.
#[tokio::test]
async fn main_pages_fit_desktop_and_phone_screens() {
    let _one = ONE_BROWSER.lock().await;
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(60).await;
    for (prompt, size, n) in [
        ("a lighthouse at dusk, oil on canvas", "512x512", 1),
        ("a fox in fresh snow, watercolor", "256x256", 2),
        ("neon city at night, rain", "512x512", 1),
        ("mountain lake, morning fog", "256x256", 1),
    ] {
        let task = server
            .create_task(&acct.key, json!({"prompt": prompt, "size": size, "n": n}))
            .await;
        server
            .wait_task(&acct.key, task["id"].as_str().unwrap())
            .await;
    }
    let browser = Browser::start().await;
    browser
        .goto(&format!("{}/dashboard/sign-in", server.base))
        .await;
    browser.screenshot("sign-in").await;
    browser.sign_in(&server.base, &acct.key).await;
    let pages = [
        ("overview", "/dashboard/overview"),
        ("top-up", "/dashboard/credits"),
        ("gallery", "/dashboard/tasks"),
        ("keys", "/dashboard/keys"),
    ];
    for (width, suffix) in [(1280, ""), (375, "-phone")] {
        for (name, path) in pages {
            browser.goto(&format!("{}{path}", server.base)).await;
            browser.fit_height(width).await;
            let overflow = browser
                .client
                .execute(
                    "return document.documentElement.scrollWidth - window.innerWidth",
                    vec![],
                )
                .await
                .unwrap();
            assert!(
                overflow.as_i64().unwrap() <= 0,
                "{path} is {overflow} px wider than a {width} px screen"
            );
            browser.screenshot(&format!("{name}{suffix}")).await;
        }
    }
    browser.client.set_window_size(1280, 900).await.unwrap();
    browser.sign_out().await;
    browser.sign_in(&server.base, ADMIN_TOKEN).await;
    for (name, path) in [
        ("operator-accounts", "/dashboard/admin"),
        ("operator-vouchers", "/dashboard/admin/vouchers"),
        (
            "operator-account",
            &format!("/dashboard/admin/accounts/{}", acct.id),
        ),
    ] {
        browser.goto(&format!("{}{path}", server.base)).await;
        browser.fit_height(1280).await;
        browser.screenshot(name).await;
    }
    browser.close().await;
}
