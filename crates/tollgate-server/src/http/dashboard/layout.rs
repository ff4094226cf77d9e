//! The page shell (head, top bar, navigation, flash, footer) and the small pieces every page
//! uses: numbers, dates, badges, the hidden CSRF field. Everything goes through maud, which
//! escapes every value it interpolates.

use super::session::Flash;
use crate::domain::secrets;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use std::sync::LazyLock;
use time::macros::format_description;
use time::OffsetDateTime;

/// The stylesheet, embedded in the binary.
pub const STYLESHEET: &str = include_str!("style.css");

/// A short hash of the stylesheet, so its URL changes when it does and it can be cached long.
pub static STYLESHEET_VERSION: LazyLock<String> =
    LazyLock::new(|| secrets::sha256_hex(STYLESHEET.as_bytes())[..12].to_owned());

/// The mark of the brand (also the favicon).
const LOGO: &str = r##"<svg viewBox="0 0 32 32" aria-hidden="true" focusable="false"><rect width="32" height="32" rx="8" fill="#4f46e5"/><path d="M8 12h16M16 12v12" stroke="#fff" stroke-width="3.2" stroke-linecap="round"/><circle cx="24" cy="21" r="3" fill="#a5b4fc"/></svg>"##;
const FAVICON: &str = "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 32 32'%3E%3Crect width='32' height='32' rx='8' fill='%234f46e5'/%3E%3Cpath d='M8 12h16M16 12v12' stroke='%23fff' stroke-width='3.2' stroke-linecap='round'/%3E%3Ccircle cx='24' cy='21' r='3' fill='%23a5b4fc'/%3E%3C/svg%3E";

/// Which navigation a page shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Account,
    Operator,
}

const ACCOUNT_NAV: &[(&str, &str)] = &[
    ("/dashboard/overview", "Overview"),
    ("/dashboard/credits", "Top up"),
    ("/dashboard/tasks", "Gallery"),
    ("/dashboard/keys", "API keys"),
];

const OPERATOR_NAV: &[(&str, &str)] = &[
    ("/dashboard/admin", "Accounts"),
    ("/dashboard/admin/vouchers", "Vouchers"),
];

/// What the shell of a signed-in page needs.
pub struct Shell<'a> {
    pub title: &'a str,
    pub nav: Nav,
    /// The path of the navigation entry to highlight.
    pub active: &'a str,
    /// Shown next to "Sign out": the account's name, or "Operator".
    pub who: &'a str,
    pub csrf: &'a str,
    pub flash: Option<Flash>,
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            meta name="referrer" content="same-origin";
            title { (title) " · tollgate" }
            link rel="icon" href=(FAVICON);
            link rel="stylesheet" href={ "/dashboard/style.css?v=" (*STYLESHEET_VERSION) };
        }
    }
}

/// The brand: logo and name.
pub fn brand(role: Option<&str>) -> Markup {
    html! {
        a.brand href="/dashboard" {
            (PreEscaped(LOGO))
            span { "tollgate" }
            @if let Some(role) = role { span.role { (role) } }
        }
    }
}

/// A signed-in page.
pub fn page(shell: Shell<'_>, body: Markup) -> Markup {
    let (entries, role) = match shell.nav {
        Nav::Account => (ACCOUNT_NAV, None),
        Nav::Operator => (OPERATOR_NAV, Some("Operator")),
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(shell.title))
            body {
                header.topbar {
                    div.topbar-inner {
                        (brand(role))
                        nav.nav aria-label="Dashboard" {
                            @for (href, label) in entries {
                                @if *href == shell.active {
                                    a.active href=(href) aria-current="page" { (label) }
                                } @else {
                                    a href=(href) { (label) }
                                }
                            }
                        }
                        div.who {
                            span.name { (shell.who) }
                            form method="post" action="/dashboard/sign-out" {
                                (csrf_field(shell.csrf))
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main {
                    @if let Some(flash) = &shell.flash { (flash_box(flash)) }
                    (body)
                }
                (footer())
            }
        }
    }
}

/// A page outside a session (sign-in).
pub fn bare_page(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                div.center { (body) }
                (footer())
            }
        }
    }
}

fn footer() -> Markup {
    html! {
        footer {
            "tollgate · paid image generation · "
            a href="/openapi.json" { "API reference (OpenAPI)" }
        }
    }
}

pub fn flash_box(flash: &Flash) -> Markup {
    html! {
        @if flash.ok {
            div.alert.ok role="status" { (flash.text) }
        } @else {
            div.alert.error role="alert" { (flash.text) }
        }
    }
}

/// The hidden field every form carries.
pub fn csrf_field(token: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(token); }
}

/// A secret shown once (a new API key or voucher code).
pub fn shown_once(what: &str, secret: &str, advice: &str) -> Markup {
    html! {
        div.secret role="status" {
            strong { "Your new " (what) " — copy it now. " }
            span { "It will not be shown again. " (advice) }
            code.shown-once { (secret) }
        }
    }
}

/// An HTML response: `no-store`, since pages show balances, keys and codes.
pub fn html_response(markup: Markup) -> Response {
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        markup.into_string(),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// 12,345
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && i % 3 == digits.len() % 3 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// +50 / −2 with the sign.
pub fn signed_credits(n: i64) -> String {
    if n >= 0 {
        format!("+{}", thousands(n.unsigned_abs()))
    } else {
        format!("−{}", thousands(n.unsigned_abs()))
    }
}

/// "1 credit", "12 credits".
pub fn credits(n: u64) -> String {
    format!("{} credit{}", thousands(n), if n == 1 { "" } else { "s" })
}

/// 2026-11-26 10:33 UTC
pub fn datetime(t: OffsetDateTime) -> String {
    t.format(format_description!(
        "[year]-[month]-[day] [hour]:[minute] UTC"
    ))
    .unwrap_or_default()
}

/// 2026-11-26 10:33 (in tables whose heading says UTC); the year is left out on a phone.
pub fn short_datetime(t: OffsetDateTime) -> Markup {
    let year = t.format(format_description!("[year]-")).unwrap_or_default();
    let rest = t
        .format(format_description!("[month]-[day] [hour]:[minute]"))
        .unwrap_or_default();
    html! { span.hide-sm { (year) } (rest) }
}

/// 2026-11-26
pub fn date(t: OffsetDateTime) -> String {
    t.format(format_description!("[year]-[month]-[day]"))
        .unwrap_or_default()
}

/// A coloured status word.
pub fn badge(kind: &str, label: &str) -> Markup {
    html! { span class={ "badge " (kind) } { (label) } }
}

/// The heading of a page with an optional line under it and an action on the right.
pub fn page_head(title: &str, sub: Option<Markup>, action: Option<Markup>) -> Markup {
    html! {
        div.page-head {
            div {
                h1 { (title) }
                @if let Some(sub) = sub { p.muted { (sub) } }
            }
            @if let Some(action) = action { div { (action) } }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(signed_credits(-2), "−2");
        assert_eq!(signed_credits(50), "+50");
        assert_eq!(credits(1), "1 credit");
    }

    #[test]
    fn values_are_escaped() {
        let markup = html! { p { ("<script>alert(1)</script>") } };
        assert_eq!(
            markup.into_string(),
            "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"
        );
    }
}
