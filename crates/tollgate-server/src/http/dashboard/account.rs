//! The account holder's pages: overview (balance, spend chart, ledger), top-up (redeem a
//! voucher), the gallery of tasks, and API keys.

use super::chart::spend_chart;
use super::layout::{
    self, badge, credits, csrf_field, datetime, html_response, page, page_head, shown_once,
    signed_credits, thousands, Nav, Shell,
};
use super::session::{
    read_flash, redirect_with_flash, see_other, take_flash, AccountPage, CsrfForm, Flash,
};
use super::{user_message, SPEND_DAYS};
use crate::domain::service::Caller;
use crate::error::Error;
use crate::http::AppState;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use maud::{html, Markup};
use serde::Deserialize;
use std::sync::Arc;
use tollgate_contract::{Account, KeyInfo, LedgerEntry, Task, TaskStatus};

/// Ledger entries on the overview, and with "show more".
const LEDGER_ROWS: u32 = 20;
const LEDGER_MORE: u32 = 100;
const GALLERY_PAGE: u32 = 24;

fn shell<'a>(
    title: &'a str,
    active: &'a str,
    account: &'a Account,
    page_: &'a AccountPage,
    flash: Option<Flash>,
) -> Shell<'a> {
    // The low-balance banner, on every page while the balance is under the alert's threshold.
    let flash = flash.or_else(|| {
        account
            .low_balance
            .as_ref()
            .filter(|alert| account.credits < alert.threshold)
            .map(|alert| {
                Flash::error(format!(
                    "Your balance ({}) is below your alert threshold of {}: top up credits to keep your tasks running.",
                    credits(account.credits),
                    credits(alert.threshold)
                ))
            })
    });
    Shell {
        title,
        nav: Nav::Account,
        active,
        who: &account.name,
        csrf: &page_.session.csrf_token,
        flash,
    }
}

fn caller(page_: &AccountPage, account: &Account) -> Caller {
    Caller {
        account_id: page_.account_id.clone(),
        key_id: page_.key_id.clone(),
        rate_limit: account.rate_limit,
        spend_limit: None,
    }
}

/// The ledger as a table (shared with the operator's account page).
pub fn ledger_table(entries: &[LedgerEntry]) -> Markup {
    html! {
        div.table-wrap {
            table {
                thead { tr {
                    th { "When (UTC)" } th { "Kind" } th.hide-sm { "Details" }
                    th.num { "Change" } th.num { "Balance" }
                } }
                tbody {
                    @for e in entries {
                        tr {
                            td.when { (layout::short_datetime(e.created_at)) }
                            td { (badge(&e.kind, &e.kind)) }
                            td.hide-sm {
                                @if let Some(task) = &e.task_id { span.mono { (task) } }
                                @if let Some(note) = &e.note {
                                    @if e.task_id.is_some() { " · " }
                                    span.muted { (note) }
                                }
                            }
                            td.num class=(if e.delta >= 0 { "plus" } else { "minus" }) { (signed_credits(e.delta)) }
                            td.num { (thousands(e.balance_after)) }
                        }
                    }
                    @if entries.is_empty() {
                        tr { td.empty colspan="5" { "No changes of balance yet." } }
                    }
                }
            }
        }
    }
}

/// The spend chart in its card, with a one-line summary.
pub fn spend_card(days: &[crate::domain::usage::DaySpend]) -> Markup {
    let total: u64 = days.iter().map(|d| d.credits).sum();
    let today = days.last().map_or(0, |d| d.credits);
    let peak = days
        .iter()
        .filter(|d| d.credits > 0)
        .max_by_key(|d| (d.credits, d.day));
    html! {
        section.card {
            div.card-head {
                h2 { "Credits spent per day" }
                span.muted.small { "Last " (days.len()) " days, UTC" }
            }
            (spend_chart(days))
            div.legend {
                span { "Total: " strong { (credits(total)) } }
                span { "Today: " strong { (credits(today)) } }
                @if let Some(peak) = peak {
                    span { "Busiest day: " strong { (credits(peak.credits)) } " on " (super::chart::day_label(peak.day)) }
                }
            }
        }
    }
}

/// `GET /dashboard/overview`
pub async fn overview(
    State(state): State<Arc<AppState>>,
    page_: AccountPage,
    headers: HeaderMap,
    Query(query): Query<OverviewQuery>,
) -> Result<Response, Error> {
    let app = &state.app;
    let account = app.account(&page_.account_id).await?;
    let days = app.spend_per_day(&page_.account_id, SPEND_DAYS).await?;
    let rows = if query.ledger.as_deref() == Some("all") {
        LEDGER_MORE
    } else {
        LEDGER_ROWS
    };
    let ledger = app.ledger(&page_.account_id, Some(rows), None).await?;
    let spent: u64 = days.iter().map(|d| d.credits).sum();
    let body = html! {
        (page_head(&account.name, Some(html! { "Account " span.mono { (account.id) } }), None))
        div.grid.stats {
            div.card.stat.accent {
                div.label { "Balance" }
                div.value #balance { (thousands(account.credits)) " " small { "credits" } }
                a.button href="/dashboard/credits" { "Top up" }
            }
            div.card.stat {
                div.label { "Spent, last " (SPEND_DAYS) " days" }
                div.value { (thousands(spent)) " " small { "credits" } }
                div.muted.small { "Charges minus refunds" }
            }
            div.card.stat {
                div.label { "Rate limit" }
                div.value { (thousands(u64::from(account.rate_limit.requests_per_minute))) " " small { "/ min" } }
                div.muted.small { "Bursts of up to " (account.rate_limit.burst) " requests" }
            }
        }
        (spend_card(&days))
        section.card #ledger {
            div.card-head {
                h2 { "Ledger" }
                span.muted.small { "Every change of balance, newest first" }
            }
            (ledger_table(&ledger.data))
            @if ledger.has_more && rows == LEDGER_ROWS {
                div.pager { a.button.secondary href="/dashboard/overview?ledger=all#ledger" { "Show " (LEDGER_MORE) " entries" } }
            }
        }
    };
    let flash = read_flash(&headers);
    let markup = page(
        shell("Overview", "/dashboard/overview", &account, &page_, flash),
        body,
    );
    Ok(take_flash(html_response(markup), &headers))
}

fn credits_page(
    state: &AppState,
    account: &Account,
    page_: &AccountPage,
    flash: Option<Flash>,
    code: &str,
) -> Markup {
    let models = state.app.models().data;
    let packs = state.app.credit_packs();
    let body = html! {
        (page_head("Top up credits", Some(html! { "Credits pay for images: each task is charged when it is accepted and refunded if it fails." }), None))
        @if !packs.is_empty() {
            section.card #buy {
                h2 { "Buy credits" }
                p.muted { "Pay by card with Stripe; the credits are added as soon as the payment is confirmed." }
                div.row {
                    @for pack in packs {
                        form method="post" action="/dashboard/credits/checkout" {
                            (csrf_field(&page_.session.csrf_token))
                            input type="hidden" name="pack" value=(pack.credits);
                            button type="submit" aria-label={ "Buy " (pack.credits) " credits" } {
                                "Buy " (thousands(pack.credits)) " credits · " (price(pack))
                            }
                        }
                    }
                }
            }
        }
        div.grid.two {
            section.card {
                h2 { "Redeem a voucher" }
                p.muted { "Your operator issues voucher codes. Each code works once; its credits are added at once." }
                form method="post" action="/dashboard/credits/redeem" {
                    (csrf_field(&page_.session.csrf_token))
                    div.row {
                        div.field {
                            label for="code" { "Voucher code" }
                            input #code type="text" name="code" value=(code) required
                                autocomplete="off" spellcheck="false" placeholder="tgv_…";
                        }
                        button type="submit" { "Redeem" }
                    }
                }
            }
            div {
                div.card.stat.accent {
                    div.label { "Balance" }
                    div.value #balance { (thousands(account.credits)) " " small { "credits" } }
                    div.muted.small { "Available for new tasks now" }
                    @for lot in &account.expiring {
                        div.small.muted.expiring { (thousands(lot.credits)) " expire " (datetime(lot.expires_at)) }
                    }
                }
                section.card #prices {
                    h2 { "Prices" }
                    table {
                        thead { tr { th { "Model" } th { "Size" } th.num { "Per image" } } }
                        tbody {
                            @for model in &models {
                                @for (size, price) in &model.prices {
                                    tr {
                                        td title=(model.id) { (model.name) }
                                        td { (size.as_str()) }
                                        td.num { (credits(*price)) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    page(
        shell("Top up", "/dashboard/credits", account, page_, flash),
        body,
    )
}

/// A pack's price as people write it: `$5.00`, `18.00 EUR`.
fn price(pack: &tollgate_contract::CreditPack) -> String {
    let amount = if crate::config::currency_decimals(&pack.currency) == 0 {
        pack.amount.to_string()
    } else {
        format!("{}.{:02}", pack.amount / 100, pack.amount % 100)
    };
    match pack.currency.as_str() {
        "usd" => format!("${amount}"),
        "eur" => format!("€{amount}"),
        "gbp" => format!("£{amount}"),
        other => format!("{amount} {}", other.to_ascii_uppercase()),
    }
}

#[derive(Debug, Deserialize)]
pub struct CreditsQuery {
    /// `success` or `canceled`: Stripe sent the buyer back.
    checkout: Option<String>,
}

/// `GET /dashboard/credits`: the top-up page the 402 message points to (and where Stripe sends
/// a buyer back).
pub async fn credits_form(
    State(state): State<Arc<AppState>>,
    page_: AccountPage,
    headers: HeaderMap,
    Query(query): Query<CreditsQuery>,
) -> Result<Response, Error> {
    let account = state.app.account(&page_.account_id).await?;
    let returned = match query.checkout.as_deref() {
        Some("success") => Some(Flash::ok(
            "Thank you: the payment went through. The credits are added as soon as Stripe confirms it, usually within seconds.",
        )),
        Some("canceled") => Some(Flash::error("The checkout was canceled; nothing was charged.")),
        _ => None,
    };
    let flash = read_flash(&headers).or(returned);
    let markup = credits_page(&state, &account, &page_, flash, "");
    Ok(take_flash(html_response(markup), &headers))
}

#[derive(Debug, Deserialize)]
pub struct CheckoutForm {
    // Text: the CSRF wrapper's flattened form reads every field as a string.
    #[serde(default)]
    pack: String,
}

/// `POST /dashboard/credits/checkout`: a Stripe Checkout Session for the pack; the browser goes
/// on to Stripe's page.
pub async fn checkout(
    State(state): State<Arc<AppState>>,
    page_: AccountPage,
    headers: HeaderMap,
    CsrfForm(form): CsrfForm<CheckoutForm>,
) -> Result<Response, Error> {
    let account = state.app.account(&page_.account_id).await?;
    let return_to = format!(
        "{}{}",
        crate::http::wire::link_base(state.app.config()),
        crate::http::error::TOP_UP_PATH
    );
    let Ok(pack) = form.pack.trim().parse() else {
        return Ok(redirect_with_flash(
            "/dashboard/credits",
            Flash::error("Choose one of the packs."),
            &headers,
        ));
    };
    let request = tollgate_contract::CheckoutRequest { pack };
    match state
        .app
        .checkout(&caller(&page_, &account), request, &return_to, None)
        .await
    {
        Ok(session) => Ok(see_other(&session.url)),
        Err(e) => {
            let message = user_message(e)?;
            Ok(redirect_with_flash(
                "/dashboard/credits",
                Flash::error(message),
                &headers,
            ))
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct OverviewQuery {
    /// `all`: the last 100 ledger entries instead of 20.
    ledger: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RedeemForm {
    #[serde(default)]
    code: String,
}

/// `POST /dashboard/credits/redeem`
pub async fn redeem(
    State(state): State<Arc<AppState>>,
    page_: AccountPage,
    headers: HeaderMap,
    CsrfForm(form): CsrfForm<RedeemForm>,
) -> Result<Response, Error> {
    match state
        .app
        .redeem_voucher(&page_.account_id, &form.code)
        .await
    {
        Ok(redeemed) => Ok(redirect_with_flash(
            "/dashboard/credits",
            Flash::ok(format!(
                "Voucher redeemed: {} added. Your balance is now {}.",
                credits(redeemed.credits),
                credits(redeemed.account.credits)
            )),
            &headers,
        )),
        Err(e) => {
            let message = match user_message(e) {
                Ok(message) => message,
                Err(e) => return Err(e),
            };
            let account = state.app.account(&page_.account_id).await?;
            let code: String = form.code.trim().chars().take(80).collect();
            Ok(html_response(credits_page(
                &state,
                &account,
                &page_,
                Some(Flash::error(message)),
                &code,
            )))
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct GalleryQuery {
    after: Option<String>,
}

fn task_tile(task: &Task) -> Markup {
    let status = task.status.as_str();
    html! {
        article.tile title=(task.id) {
            @if task.status == TaskStatus::Succeeded && !task.images.is_empty() {
                a.thumb href={ "/dashboard/tasks/" (task.id) "/images/0" } {
                    img src={ "/dashboard/tasks/" (task.id) "/images/0" } alt={ "Image for: " (task.prompt) } loading="lazy"
                        width=(task.size.pixels()) height=(task.size.pixels());
                    @if task.images.len() > 1 { span.count { (task.images.len()) " images" } }
                }
            } @else {
                div.thumb { (status) }
            }
            div.tile-body {
                p.prompt title=(task.prompt) { (task.prompt) }
                @if let Some(error) = &task.error { p.small.muted { (error.message) } }
                div.meta {
                    (badge(status, status))
                    span.model { (task.model) }
                    span { (task.size.as_str()) " · " (credits(task.cost)) }
                }
                div.meta { span { (layout::datetime(task.created_at)) } }
            }
        }
    }
}

/// `GET /dashboard/tasks`: the account's tasks as thumbnails, newest first.
pub async fn gallery(
    State(state): State<Arc<AppState>>,
    page_: AccountPage,
    headers: HeaderMap,
    Query(query): Query<GalleryQuery>,
) -> Result<Response, Error> {
    let account = state.app.account(&page_.account_id).await?;
    let after = query.after.as_deref().filter(|a| !a.is_empty());
    let tasks = match state
        .app
        .list_tasks(&caller(&page_, &account), Some(GALLERY_PAGE), after)
        .await
    {
        Ok(tasks) => tasks,
        // A stale or edited `after`: start from the newest.
        Err(Error::InvalidRequest { .. }) => return Ok(see_other("/dashboard/tasks")),
        Err(e) => return Err(e),
    };
    let body = html! {
        (page_head("Gallery", Some(html! { "Your tasks, newest first. Images are kept for "
            (retention_words(state.app.config().retention)) " after creation." }), None))
        @if tasks.data.is_empty() {
            section.card {
                p.empty {
                    @if after.is_some() { "No older tasks." } @else {
                        "No tasks yet. Create one with the API: "
                        code { "POST /v1/images/generations" }
                    }
                }
            }
        } @else {
            div.gallery { @for task in &tasks.data { (task_tile(task)) } }
        }
        div.pager {
            @if after.is_some() { a.button.secondary href="/dashboard/tasks" { "← Newest" } }
            @if let (true, Some(last)) = (tasks.has_more, tasks.data.last()) {
                a.button href={ "/dashboard/tasks?after=" (last.id) } { "Older →" }
            }
        }
    };
    let markup = page(
        shell(
            "Gallery",
            "/dashboard/tasks",
            &account,
            &page_,
            read_flash(&headers),
        ),
        body,
    );
    Ok(take_flash(html_response(markup), &headers))
}

fn retention_words(retention: std::time::Duration) -> String {
    let secs = retention.as_secs();
    match secs {
        s if s >= 86_400 && s % 86_400 == 0 => format!("{} days", s / 86_400),
        s if s >= 3600 && s % 3600 == 0 => format!("{} hours", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{} minutes", s / 60),
        s => format!("{s} seconds"),
    }
}

/// `GET /dashboard/tasks/{id}/images/{index}`: a thumbnail, authorised by the session.
pub async fn task_image(
    State(state): State<Arc<AppState>>,
    page_: AccountPage,
    Path((id, index)): Path<(String, String)>,
) -> Result<Response, Error> {
    let account = state.app.account(&page_.account_id).await?;
    let png = state
        .app
        .task_image(&caller(&page_, &account), &id, &index)
        .await?;
    Ok(crate::http::routes::png_response(png))
}

/// The keys table; `revoke_action` makes the form's target from a key id.
pub fn keys_table(
    keys: &[KeyInfo],
    csrf: &str,
    current: Option<&str>,
    revoke_action: &dyn Fn(&str) -> String,
) -> Markup {
    html! {
        div.table-wrap {
            table {
                thead { tr { th { "Key" } th { "Created" } th { "Status" } th { "Spend limit" } th.num { "" } } }
                tbody {
                    @for key in keys {
                        tr {
                            td {
                                span.mono { (key.prefix) "…" }
                                @if current == Some(key.id.as_str()) { " " span.badge { "this session" } }
                                div.small.muted.mono { (key.id) }
                            }
                            td { (datetime(key.created_at)) }
                            td {
                                @match key.revoked_at {
                                    Some(at) => { (badge("revoked", "Revoked")) div.small.muted { (datetime(at)) } }
                                    None => (badge("active", "Active")),
                                }
                            }
                            td.spend {
                                @match &key.spend_limit {
                                    Some(limit) => {
                                        (thousands(limit.spent)) " of " (credits(limit.credits)) " "
                                        (match limit.period {
                                            tollgate_contract::SpendPeriod::Day => "today",
                                            tollgate_contract::SpendPeriod::Week => "this week",
                                            tollgate_contract::SpendPeriod::Month => "this month",
                                            tollgate_contract::SpendPeriod::Total => "in all",
                                        })
                                        @if let Some(at) = limit.resets_at { div.small.muted { "resets " (datetime(at)) } }
                                    }
                                    None => span.muted { "none" },
                                }
                            }
                            td.num {
                                @if key.revoked_at.is_none() {
                                    form method="post" action=(revoke_action(&key.id)) {
                                        (csrf_field(csrf))
                                        button.danger type="submit" aria-label={ "Revoke key " (key.prefix) } { "Revoke" }
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

async fn keys_page(
    state: &AppState,
    page_: &AccountPage,
    flash: Option<Flash>,
    new_key: Option<&str>,
) -> Result<Markup, Error> {
    let account = state.app.account(&page_.account_id).await?;
    let keys = state.app.list_keys(&page_.account_id).await?;
    let csrf = page_.session.csrf_token.as_str();
    let body = html! {
        (page_head("API keys", Some(html! { "Send a key as " code { "Authorization: Bearer tg_…" } ". Revoking a key refuses it from the next request on." }),
            Some(html! {
                form method="post" action="/dashboard/keys" {
                    (csrf_field(csrf))
                    button type="submit" { "Create a key" }
                }
            })))
        @if let Some(key) = new_key {
            (shown_once("API key", key, "Only its hash is kept on the server."))
        }
        section.card {
            (keys_table(&keys.data, csrf, Some(&page_.key_id), &|id| format!("/dashboard/keys/{id}/revoke")))
        }
    };
    Ok(page(
        shell("API keys", "/dashboard/keys", &account, page_, flash),
        body,
    ))
}

/// `GET /dashboard/keys`
pub async fn keys(
    State(state): State<Arc<AppState>>,
    page_: AccountPage,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let markup = keys_page(&state, &page_, read_flash(&headers), None).await?;
    Ok(take_flash(html_response(markup), &headers))
}

/// `POST /dashboard/keys`: a new key, shown once in the answer.
pub async fn create_key(
    State(state): State<Arc<AppState>>,
    page_: AccountPage,
    CsrfForm(_form): CsrfForm<super::sign_in::Empty>,
) -> Result<Response, Error> {
    let created = state
        .app
        .create_key(&page_.account_id, Default::default())
        .await?;
    let markup = keys_page(&state, &page_, None, Some(&created.api_key)).await?;
    Ok(html_response(markup))
}

/// `POST /dashboard/keys/{id}/revoke`
pub async fn revoke_key(
    State(state): State<Arc<AppState>>,
    page_: AccountPage,
    headers: HeaderMap,
    Path(key_id): Path<String>,
    CsrfForm(_form): CsrfForm<super::sign_in::Empty>,
) -> Result<Response, Error> {
    match state
        .app
        .revoke_account_key(&page_.account_id, &key_id)
        .await
    {
        Ok(()) if key_id == page_.key_id => Ok(redirect_with_flash(
            "/dashboard/sign-in",
            Flash::ok("You revoked the key this session was opened with, so you are signed out."),
            &headers,
        )),
        Ok(()) => Ok(redirect_with_flash(
            "/dashboard/keys",
            Flash::ok(format!("Key {key_id} revoked: it is refused from now on.")),
            &headers,
        )),
        Err(e) => match user_message(e) {
            Ok(message) => Ok(redirect_with_flash(
                "/dashboard/keys",
                Flash::error(message),
                &headers,
            )),
            Err(e) => Err(e),
        },
    }
}
