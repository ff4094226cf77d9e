//! A browser without JavaScript for the dashboard tests: cookies kept, redirects not followed.

use super::Call;
use super::TestServer;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::redirect::Policy;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

/// A browser without JavaScript: keeps cookies, does not follow redirects (so they can be
/// checked), and can come from another loopback address.
pub struct Browser {
    pub base: String,
    pub http: reqwest::Client,
    pub cookies: BTreeMap<String, String>,
    /// Every `Set-Cookie` seen, to check flags.
    pub set_cookies: Vec<String>,
}

impl Browser {
    pub fn new(server: &TestServer) -> Browser {
        Browser::from_address(server, "127.0.0.1".parse().unwrap())
    }

    pub fn from_address(server: &TestServer, local: IpAddr) -> Browser {
        Browser {
            base: server.base.clone(),
            http: reqwest::Client::builder()
                .redirect(Policy::none())
                .local_address(local)
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            cookies: BTreeMap::new(),
            set_cookies: Vec::new(),
        }
    }

    pub fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub fn remember(&mut self, response: &reqwest::Response) {
        for value in response.headers().get_all(SET_COOKIE) {
            let text = value.to_str().unwrap().to_owned();
            let (pair, attributes) = text.split_once(';').unwrap_or((&text, ""));
            let (name, value) = pair.split_once('=').unwrap();
            if attributes.contains("Max-Age=0") {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
            self.set_cookies.push(text);
        }
    }

    pub async fn get(&mut self, path: &str) -> reqwest::Response {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .header(COOKIE, self.cookie_header())
            .call()
            .await;
        self.remember(&response);
        response
    }

    pub async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .header(COOKIE, self.cookie_header())
            .form(form)
            .call()
            .await;
        self.remember(&response);
        response
    }

    /// GETs a page that must render (200 HTML) and returns its text.
    pub async fn page(&mut self, path: &str) -> String {
        let response = self.get(path).await;
        assert_eq!(response.status(), 200, "GET {path}");
        assert!(response
            .headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        response.text().await.unwrap()
    }

    /// Signs in through the form; returns the response to the POST.
    pub async fn sign_in(&mut self, credential: &str) -> reqwest::Response {
        let form = self.page("/dashboard/sign-in").await;
        let csrf = csrf_of(&form);
        self.post(
            "/dashboard/sign-in",
            &[("csrf", &csrf), ("credential", credential)],
        )
        .await
    }

    /// Signs in and expects to land on `home`.
    pub async fn signed_in(server: &TestServer, credential: &str, home: &str) -> Browser {
        let mut browser = Browser::new(server);
        let response = browser.sign_in(credential).await;
        assert_eq!(response.status(), 303, "{}", response.text().await.unwrap());
        assert_eq!(location(&response), home);
        browser
    }

    /// The CSRF token of the session, read from a page's form.
    pub async fn csrf(&mut self) -> String {
        let home = self.get("/dashboard").await;
        assert_eq!(home.status(), 303);
        let page = self.page(&location(&home)).await;
        csrf_of(&page)
    }
}

pub fn csrf_of(html: &str) -> String {
    let start = html.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    let end = start + html[start..].find('"').unwrap();
    html[start..end].to_owned()
}

/// The secret a page shows once (a new key or voucher code).
pub fn shown_once(html: &str) -> String {
    let start = html
        .find("class=\"shown-once\">")
        .expect("a secret shown once")
        + 19;
    let end = start + html[start..].find('<').unwrap();
    html[start..end].to_owned()
}

pub fn location(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(LOCATION)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}
