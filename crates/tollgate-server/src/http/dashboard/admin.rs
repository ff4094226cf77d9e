//! The operator's pages: every account (balance, usage, rate limit), one account (grant credits,
//! create and revoke keys, its ledger and spend), and voucher codes (issue, list).

use super::account::{keys_table, ledger_table, spend_card};
use super::layout::{
    badge, credits, csrf_field, date, datetime, html_response, page, page_head, shown_once,
    thousands, Nav, Shell,
};
use super::session::{read_flash, redirect_with_flash, take_flash, CsrfForm, Flash, OperatorPage};
use super::{user_message, SPEND_DAYS};
use crate::error::Error;
use crate::http::AppState;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use maud::{html, Markup};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use time::macros::format_description;
use time::{Date, OffsetDateTime, Time};
use tollgate_contract::{
    AddCreditsRequest, CreateAccountRequest, CreateVoucherRequest, RateLimit, Voucher,
};

const VOUCHER_ROWS: u32 = 50;
const LEDGER_ROWS: u32 = 20;

fn shell<'a>(
    title: &'a str,
    active: &'a str,
    page_: &'a OperatorPage,
    flash: Option<Flash>,
) -> Shell<'a> {
    Shell {
        title,
        nav: Nav::Operator,
        active,
        who: "Operator",
        csrf: &page_.session.csrf_token,
        flash,
    }
}

fn rate_limit(limit: RateLimit) -> Markup {
    html! { (thousands(u64::from(limit.requests_per_minute))) "/min · burst " (limit.burst) }
}

/// A whole number typed in a form, or what to tell the operator.
fn whole_number(text: &str, what: &str) -> Result<i64, String> {
    let cleaned: String = text
        .trim()
        .chars()
        .filter(|c| *c != ',' && *c != '_')
        .collect();
    cleaned
        .parse::<i64>()
        .map_err(|_| format!("{what} must be a whole number, not “{}”.", text.trim()))
}

/// The models for sale, their prices, and how their providers have done since the start.
fn models_card(state: &AppState) -> Markup {
    let models = state.app.model_health();
    html! {
        section.card #models {
            h2 { "Models" }
            div.table-wrap {
                table {
                    thead { tr {
                        th { "Model" } th.hide-sm { "Backend" } th { "Prices (per image)" }
                        th.num { "Runs ok" } th.num { "Failed" } th { "Provider" }
                    } }
                    tbody {
                        @for (model, backend, health) in &models {
                            tr {
                                td { strong { (model.name) } div.small.muted.mono { (model.id) } }
                                td.hide-sm { (backend) }
                                td.small {
                                    @for (i, (size, price)) in model.prices.iter().enumerate() {
                                        @if i > 0 { " · " }
                                        (size.as_str()) " " (credits(*price))
                                    }
                                }
                                td.num { (thousands(health.succeeded)) }
                                td.num { (thousands(health.failed)) }
                                td {
                                    @if health.failing() {
                                        (badge("failed", "failing"))
                                        @if let Some((code, at)) = &health.last_failure {
                                            div.small.muted { (health.consecutive_failures) " in a row; last " span.mono { (code) } " at " (datetime(*at)) }
                                        }
                                    } @else {
                                        (badge("succeeded", "ok"))
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

async fn accounts_page(
    state: &AppState,
    page_: &OperatorPage,
    flash: Option<Flash>,
    created: Option<(&str, &str)>,
) -> Result<Markup, Error> {
    let accounts = state.app.accounts_with_usage(SPEND_DAYS).await?;
    let total_balance: u64 = accounts.iter().map(|a| a.account.credits).sum();
    let total_spent: u64 = accounts.iter().map(|a| a.spent).sum();
    let csrf = page_.session.csrf_token.as_str();
    let body = html! {
        (page_head("Accounts", Some(html! { "Every account, its balance and what it spent in the last " (SPEND_DAYS) " days." }), None))
        @if let Some((name, key)) = created {
            (shown_once(&format!("API key for {name}"), key, "Hand it to the account holder; they can sign in here with it."))
        }
        div.grid.stats {
            div.card.stat { div.label { "Accounts" } div.value { (thousands(accounts.len() as u64)) } }
            div.card.stat { div.label { "Credits held" } div.value { (thousands(total_balance)) " " small { "credits" } } }
            div.card.stat { div.label { "Spent, last " (SPEND_DAYS) " days" } div.value { (thousands(total_spent)) " " small { "credits" } } }
        }
        (models_card(state))
        section.card {
            div.table-wrap {
                table #accounts {
                    thead { tr {
                        th { "Account" } th.num { "Balance" } th.num { "Spent (" (SPEND_DAYS) " d)" }
                        th.hide-sm { "Rate limit" } th.num { "" }
                    } }
                    tbody {
                        @for usage in &accounts {
                            @let a = &usage.account;
                            tr {
                                td {
                                    a href={ "/dashboard/admin/accounts/" (a.id) } { strong { (a.name) } }
                                    div.small.muted.mono { (a.id) }
                                }
                                td.num { (thousands(a.credits)) }
                                td.num { (thousands(usage.spent)) }
                                td.hide-sm { (rate_limit(a.rate_limit)) }
                                td.num { a href={ "/dashboard/admin/accounts/" (a.id) } { "Manage →" } }
                            }
                        }
                        @if accounts.is_empty() {
                            tr { td.empty colspan="5" { "No accounts yet: create the first one below." } }
                        }
                    }
                }
            }
        }
        section.card {
            h2 { "Create an account" }
            form method="post" action="/dashboard/admin/accounts" {
                (csrf_field(csrf))
                div.row {
                    div.field {
                        label for="name" { "Name" }
                        input #name type="text" name="name" required maxlength="200" placeholder="acme";
                    }
                    div.field {
                        label for="opening" { "Opening credits" }
                        input #opening type="number" name="credits" min="0" step="1" value="0";
                    }
                    button type="submit" { "Create account" }
                }
                p.hint { "The account gets the server's default rate limit and a first API key, shown once." }
            }
        }
    };
    Ok(page(
        shell("Accounts", "/dashboard/admin", page_, flash),
        body,
    ))
}

/// `GET /dashboard/admin`
pub async fn accounts(
    State(state): State<Arc<AppState>>,
    page_: OperatorPage,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let markup = accounts_page(&state, &page_, read_flash(&headers), None).await?;
    Ok(take_flash(html_response(markup), &headers))
}

#[derive(Debug, Deserialize)]
pub struct CreateAccountForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    credits: String,
}

/// `POST /dashboard/admin/accounts`
pub async fn create_account(
    State(state): State<Arc<AppState>>,
    page_: OperatorPage,
    headers: HeaderMap,
    CsrfForm(form): CsrfForm<CreateAccountForm>,
) -> Result<Response, Error> {
    let opening = if form.credits.trim().is_empty() {
        Ok(0)
    } else {
        whole_number(&form.credits, "Opening credits").and_then(|n| {
            u64::try_from(n).map_err(|_| "Opening credits cannot be negative.".to_owned())
        })
    };
    let result = match opening {
        Ok(credits) => state
            .app
            .create_account(CreateAccountRequest {
                name: form.name.trim().to_owned(),
                credits,
                rate_limit: None,
            })
            .await
            .map_err(user_message),
        Err(message) => Err(Ok(message)),
    };
    match result {
        Ok(created) => {
            let markup = accounts_page(
                &state,
                &page_,
                Some(Flash::ok(format!(
                    "Account {} created.",
                    created.account.name
                ))),
                Some((&created.account.name, &created.api_key)),
            )
            .await?;
            Ok(html_response(markup))
        }
        Err(Ok(message)) => Ok(redirect_with_flash(
            "/dashboard/admin",
            Flash::error(message),
            &headers,
        )),
        Err(Err(e)) => Err(e),
    }
}

async fn account_page(
    state: &AppState,
    page_: &OperatorPage,
    id: &str,
    flash: Option<Flash>,
    new_key: Option<&str>,
) -> Result<Markup, Error> {
    let app = &state.app;
    let account = app.account(id).await?;
    let keys = app.list_keys(id).await?;
    let days = app.spend_per_day(id, SPEND_DAYS).await?;
    let ledger = app.ledger(id, Some(LEDGER_ROWS), None).await?;
    let purchases = app.purchases(id).await?.data;
    let csrf = page_.session.csrf_token.as_str();
    let here = format!("/dashboard/admin/accounts/{}", account.id);
    let body = html! {
        p.small { a href="/dashboard/admin" { "← All accounts" } }
        (page_head(&account.name, Some(html! { span.mono { (account.id) } " · " (rate_limit(account.rate_limit)) }), None))
        @if let Some(key) = new_key {
            (shown_once(&format!("API key for {}", account.name), key, "Hand it to the account holder."))
        }
        (spend_card(&days))
        div.grid.two {
            div {
                section.card {
                    div.card-head { h2 { "API keys" } }
                    form.row method="post" action={ (here) "/keys" } {
                        (csrf_field(csrf))
                        div.field {
                            label for="spend_limit" { "Spend limit (optional)" }
                            input #spend_limit type="number" name="spend_limit" min="1" step="1" placeholder="credits";
                        }
                        div.field {
                            label for="spend_period" { "per" }
                            select #spend_period name="spend_period" {
                                option value="day" { "day" }
                                option value="week" { "week" }
                                option value="month" { "month" }
                                option value="total" { "in all" }
                            }
                        }
                        button.secondary type="submit" { "Create a key" }
                    }
                    (keys_table(&keys.data, csrf, None, &|key_id| format!("{here}/keys/{key_id}/revoke")))
                }
                @if !purchases.is_empty() {
                    section.card #purchases {
                        h2 { "Purchases" }
                        div.table-wrap { table {
                            thead { tr { th { "When (UTC)" } th { "Checkout" } th.num { "Credits" } th { "Status" } th.num { "Refunded" } th.num { "Shortfall" } } }
                            tbody { @for p in &purchases { tr {
                                td { (datetime(p.created_at)) }
                                td.mono.small { (p.id) }
                                td.num { (thousands(p.credits)) }
                                td { (badge(&p.status, &p.status)) }
                                td.num { (thousands(p.refunded_credits)) }
                                td.num { @if p.shortfall > 0 { strong { (thousands(p.shortfall)) } } @else { "0" } }
                            } } }
                        } }
                        @let short: u64 = purchases.iter().map(|p| p.shortfall).sum();
                        @if short > 0 {
                            p.small { "Refunds took back what the balance had; " strong { (credits(short)) } " had been spent already." }
                        }
                    }
                }
                section.card {
                    div.card-head { h2 { "Ledger" } span.muted.small { "Latest " (LEDGER_ROWS) " entries" } }
                    (ledger_table(&ledger.data))
                }
            }
            div {
                div.card.stat.accent {
                    div.label { "Balance" }
                    div.value #balance { (thousands(account.credits)) " " small { "credits" } }
                }
                section.card {
                    h2 { "Grant credits" }
                    form method="post" action={ (here) "/credits" } {
                        (csrf_field(csrf))
                        div.field {
                            label for="amount" { "Credits" }
                            input #amount type="number" name="amount" step="1" required placeholder="50";
                            div.hint { "A negative amount corrects a mistake; the balance never goes below zero." }
                        }
                        div.field {
                            label for="note" { "Note (on the ledger)" }
                            input #note type="text" name="note" maxlength="500" placeholder="top-up";
                        }
                        div.field {
                            label for="grant_expires" { "Credits expire (optional)" }
                            input #grant_expires type="date" name="expires";
                            div.hint { "At the end of that day, UTC; charges use the soonest-expiring credits first." }
                        }
                        button.wide type="submit" { "Grant credits" }
                    }
                }
                section.card #low-balance {
                    h2 { "Low-balance alert" }
                    form method="post" action={ (here) "/low-balance" } {
                        (csrf_field(csrf))
                        div.field {
                            label for="threshold" { "Below (credits)" }
                            input #threshold type="number" name="threshold" min="1" step="1"
                                value=[account.low_balance.as_ref().map(|a| a.threshold)];
                        }
                        div.field {
                            label for="notify_url" { "Notify URL" }
                            input #notify_url type="url" name="notify_url" placeholder="https://…"
                                value=[account.low_balance.as_ref().map(|a| a.notify_url.as_str())];
                            div.hint { "One signed account.balance_low event each time a charge crosses it. Empty: off." }
                        }
                        button.secondary.wide type="submit" { "Save alert" }
                    }
                }
            }
        }
    };
    Ok(page(
        shell(&account.name, "/dashboard/admin", page_, flash),
        body,
    ))
}

fn account_path(id: &str) -> String {
    format!(
        "/dashboard/admin/accounts/{}",
        super::session::encode_query(id)
    )
}

/// `GET /dashboard/admin/accounts/{id}`
pub async fn account(
    State(state): State<Arc<AppState>>,
    page_: OperatorPage,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    match account_page(&state, &page_, &id, read_flash(&headers), None).await {
        Ok(markup) => Ok(take_flash(html_response(markup), &headers)),
        Err(Error::NotFound { .. }) => Ok(redirect_with_flash(
            "/dashboard/admin",
            Flash::error("There is no such account."),
            &headers,
        )),
        Err(e) => Err(e),
    }
}

#[derive(Debug, Deserialize)]
pub struct GrantForm {
    #[serde(default)]
    amount: String,
    note: Option<String>,
    expires: Option<String>,
}

/// `POST /dashboard/admin/accounts/{id}/credits`
pub async fn grant(
    State(state): State<Arc<AppState>>,
    _page: OperatorPage,
    headers: HeaderMap,
    Path(id): Path<String>,
    CsrfForm(form): CsrfForm<GrantForm>,
) -> Result<Response, Error> {
    let back = account_path(&id);
    let amount = match whole_number(&form.amount, "The amount") {
        Ok(amount) => amount,
        Err(message) => return Ok(redirect_with_flash(&back, Flash::error(message), &headers)),
    };
    let note = form
        .note
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty());
    let expires_at = match end_of_day(form.expires.as_deref().unwrap_or("")) {
        Ok(at) => at,
        Err(message) => return Ok(redirect_with_flash(&back, Flash::error(message), &headers)),
    };
    match state
        .app
        .add_credits(
            &id,
            AddCreditsRequest {
                amount,
                note,
                expires_at,
            },
        )
        .await
    {
        Ok(account) => Ok(redirect_with_flash(
            &back,
            Flash::ok(format!(
                "{} {}. The balance is now {}.",
                if amount >= 0 { "Granted" } else { "Removed" },
                credits(amount.unsigned_abs()),
                credits(account.credits)
            )),
            &headers,
        )),
        Err(e) => match user_message(e) {
            Ok(message) => Ok(redirect_with_flash(&back, Flash::error(message), &headers)),
            Err(e) => Err(e),
        },
    }
}

#[derive(Debug, Deserialize)]
pub struct KeyForm {
    spend_limit: Option<String>,
    spend_period: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct LowBalanceForm {
    #[serde(default)]
    threshold: String,
    #[serde(default)]
    notify_url: String,
}

/// `POST /dashboard/admin/accounts/{id}/low-balance`: sets (or, empty, turns off) the alert.
pub async fn low_balance(
    State(state): State<Arc<AppState>>,
    _page: OperatorPage,
    headers: HeaderMap,
    Path(id): Path<String>,
    CsrfForm(form): CsrfForm<LowBalanceForm>,
) -> Result<Response, Error> {
    let back = account_path(&id);
    let alert = if form.threshold.trim().is_empty() && form.notify_url.trim().is_empty() {
        None
    } else {
        match whole_number(&form.threshold, "The threshold").and_then(|n| {
            u64::try_from(n).map_err(|_| "The threshold must be at least 1.".to_owned())
        }) {
            Ok(threshold) => Some(tollgate_contract::LowBalance {
                threshold,
                notify_url: form.notify_url.trim().to_owned(),
            }),
            Err(message) => return Ok(redirect_with_flash(&back, Flash::error(message), &headers)),
        }
    };
    let on = alert.is_some();
    let request = tollgate_contract::UpdateAccountRequest {
        low_balance: Some(alert),
        ..Default::default()
    };
    match state.app.update_account(&id, request).await {
        Ok(_) => Ok(redirect_with_flash(
            &back,
            Flash::ok(if on {
                "Low-balance alert saved."
            } else {
                "Low-balance alert turned off."
            }),
            &headers,
        )),
        Err(e) => match user_message(e) {
            Ok(message) => Ok(redirect_with_flash(&back, Flash::error(message), &headers)),
            Err(e) => Err(e),
        },
    }
}

/// `POST /dashboard/admin/accounts/{id}/keys`: a new key, shown once in the answer.
pub async fn create_key(
    State(state): State<Arc<AppState>>,
    page_: OperatorPage,
    headers: HeaderMap,
    Path(id): Path<String>,
    CsrfForm(form): CsrfForm<KeyForm>,
) -> Result<Response, Error> {
    let limit = form
        .spend_limit
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let spend_limit = match limit {
        None => None,
        Some(text) => {
            let period = form.spend_period.as_deref().unwrap_or("day").parse();
            match (whole_number(text, "The spend limit"), period) {
                (Ok(credits), Ok(period)) if credits > 0 => Some(tollgate_contract::SpendLimit {
                    credits: credits.unsigned_abs(),
                    period,
                }),
                _ => {
                    return Ok(redirect_with_flash(
                        &account_path(&id),
                        Flash::error("The spend limit must be a whole number of credits, at least 1, per day, week, month or in all."),
                        &headers,
                    ))
                }
            }
        }
    };
    let request = tollgate_contract::CreateKeyRequest { spend_limit };
    let created = state.app.create_key(&id, request).await?;
    let markup = account_page(
        &state,
        &page_,
        &id,
        Some(Flash::ok(format!("Key {} created.", created.id))),
        Some(&created.api_key),
    )
    .await?;
    Ok(html_response(markup))
}

/// `POST /dashboard/admin/accounts/{id}/keys/{key_id}/revoke`
pub async fn revoke_key(
    State(state): State<Arc<AppState>>,
    _page: OperatorPage,
    headers: HeaderMap,
    Path((id, key_id)): Path<(String, String)>,
    CsrfForm(_form): CsrfForm<super::sign_in::Empty>,
) -> Result<Response, Error> {
    let back = account_path(&id);
    let flash = match state.app.revoke_account_key(&id, &key_id).await {
        Ok(()) => Flash::ok(format!("Key {key_id} revoked: it is refused from now on.")),
        Err(e) => match user_message(e) {
            Ok(message) => Flash::error(message),
            Err(e) => return Err(e),
        },
    };
    Ok(redirect_with_flash(&back, flash, &headers))
}

fn voucher_status(v: &Voucher, now: OffsetDateTime, names: &HashMap<String, String>) -> Markup {
    html! {
        @if let (Some(at), Some(by)) = (v.redeemed_at, &v.redeemed_by) {
            (badge("redeemed", "Redeemed"))
            div.small.muted {
                (datetime(at)) " by "
                a href={ "/dashboard/admin/accounts/" (by) } { (names.get(by).map_or(by.as_str(), String::as_str)) }
            }
        } @else if v.expires_at.is_some_and(|e| e <= now) {
            (badge("expired", "Expired"))
        } @else {
            (badge("active", "Active"))
        }
    }
}

async fn vouchers_page(
    state: &AppState,
    page_: &OperatorPage,
    flash: Option<Flash>,
    created: Option<(&str, u64)>,
) -> Result<Markup, Error> {
    let vouchers = state.app.list_vouchers(VOUCHER_ROWS).await?;
    let names: HashMap<String, String> = state
        .app
        .list_accounts()
        .await?
        .data
        .into_iter()
        .map(|a| (a.id, a.name))
        .collect();
    let csrf = page_.session.csrf_token.as_str();
    let now = state.app.now();
    let body = html! {
        (page_head("Vouchers", Some(html! { "Single-use codes worth credits. Account holders redeem them on their Top up page, or with " code { "POST /v1/vouchers/redeem" } "." }), None))
        @if let Some((code, worth)) = created {
            (shown_once(&format!("voucher code ({})", credits(worth)), code, "Only its hash is kept; send it to the account holder."))
        }
        div.grid.two {
            section.card {
                div.card-head { h2 { "Recent vouchers" } span.muted.small { "Codes are never shown again" } }
                div.table-wrap {
                    table #vouchers {
                        thead { tr { th { "Code" } th.num { "Credits" } th { "Status" } th.hide-sm { "Expires" } } }
                        tbody {
                            @for v in &vouchers.data {
                                tr {
                                    td {
                                        span.mono { (v.prefix) "…" }
                                        @if let Some(note) = &v.note { div.small.muted { (note) } }
                                        div.small.muted { "Issued " (date(v.created_at)) }
                                    }
                                    td.num { (thousands(v.credits)) }
                                    td { (voucher_status(v, now, &names)) }
                                    td.hide-sm {
                                        @match v.expires_at { Some(at) => (datetime(at)), None => span.muted { "Never" } }
                                    }
                                }
                            }
                            @if vouchers.data.is_empty() {
                                tr { td.empty colspan="4" { "No vouchers yet." } }
                            }
                        }
                    }
                }
            }
            section.card {
                h2 { "Issue a voucher" }
                form method="post" action="/dashboard/admin/vouchers" {
                    (csrf_field(csrf))
                    div.field {
                        label for="credits" { "Credits" }
                        input #credits type="number" name="credits" min="1" step="1" required placeholder="100";
                    }
                    div.field {
                        label for="expires" { "Valid until (optional)" }
                        input #expires type="date" name="expires";
                        div.hint { "Through the end of that day, UTC. Empty: never expires." }
                    }
                    div.field {
                        label for="vnote" { "Note (optional)" }
                        input #vnote type="text" name="note" maxlength="500" placeholder="Welcome credit for acme";
                    }
                    button.wide type="submit" { "Issue voucher" }
                }
            }
        }
    };
    Ok(page(
        shell("Vouchers", "/dashboard/admin/vouchers", page_, flash),
        body,
    ))
}

/// `GET /dashboard/admin/vouchers`
pub async fn vouchers(
    State(state): State<Arc<AppState>>,
    page_: OperatorPage,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let markup = vouchers_page(&state, &page_, read_flash(&headers), None).await?;
    Ok(take_flash(html_response(markup), &headers))
}

#[derive(Debug, Deserialize)]
pub struct VoucherForm {
    #[serde(default)]
    credits: String,
    expires: Option<String>,
    note: Option<String>,
}

/// "2026-12-31" → the end of that day, UTC.
fn end_of_day(text: &str) -> Result<Option<OffsetDateTime>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let day = Date::parse(text, format_description!("[year]-[month]-[day]"))
        .map_err(|_| format!("“{text}” is not a date like 2026-12-31."))?;
    let next = day
        .next_day()
        .ok_or_else(|| "That date is too far away.".to_owned())?;
    Ok(Some(next.with_time(Time::MIDNIGHT).assume_utc()))
}

/// `POST /dashboard/admin/vouchers`: a new code, shown once in the answer.
pub async fn issue_voucher(
    State(state): State<Arc<AppState>>,
    page_: OperatorPage,
    headers: HeaderMap,
    CsrfForm(form): CsrfForm<VoucherForm>,
) -> Result<Response, Error> {
    let request = whole_number(&form.credits, "Credits")
        .and_then(|n| u64::try_from(n).map_err(|_| "Credits must be at least 1.".to_owned()))
        .and_then(|credits| {
            Ok(CreateVoucherRequest {
                credits,
                expires_at: end_of_day(form.expires.as_deref().unwrap_or(""))?,
                note: form.note.clone(),
            })
        });
    let result = match request {
        Ok(request) => state
            .app
            .create_voucher(request)
            .await
            .map_err(user_message),
        Err(message) => Err(Ok(message)),
    };
    match result {
        Ok(created) => {
            let markup = vouchers_page(
                &state,
                &page_,
                None,
                Some((&created.code, created.voucher.credits)),
            )
            .await?;
            Ok(html_response(markup))
        }
        Err(Ok(message)) => Ok(redirect_with_flash(
            "/dashboard/admin/vouchers",
            Flash::error(message),
            &headers,
        )),
        Err(Err(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_numbers_and_dates() {
        assert_eq!(whole_number(" 1,000 ", "x"), Ok(1000));
        assert!(whole_number("ten", "x").is_err());
        assert_eq!(end_of_day(""), Ok(None));
        assert_eq!(
            end_of_day("2026-12-31").unwrap().unwrap().to_string(),
            "2027-01-01 0:00:00.0 +00:00:00"
        );
        assert!(end_of_day("31/12/2026").is_err());
    }
}
