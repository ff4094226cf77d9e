//! Webhooks: the URL check at task creation, and the loop that delivers finished tasks.
//!
//! **Accepting a URL** ([`check_url`]): `http` or `https`, at most 2048 characters, no user name
//! or password, and a host whose every address is public: loopback, private (10/8, 172.16/12,
//! 192.168/16), link-local (cloud metadata at 169.254.169.254), CGNAT (100.64/10), unique-local
//! (fc00::/7), unspecified, multicast, documentation and reserved ranges are refused, so an API
//! key cannot make the server probe its own network (SSRF). `--allow-private-webhooks` lifts the
//! address rule for receivers on the operator's own network.
//!
//! **Delivering** ([`spawn`]): the store's outbox holds a delivery for every finished task that
//! has a URL, written in the transaction that recorded the final state. A loop claims due
//! deliveries (a claim moves their due time ahead by a lease, so a dead sender's deliveries come
//! back), checks the URL's addresses again and connects to exactly those (DNS rebinding cannot
//! slip in a private address between the check and the connection), follows no redirects, and
//! POSTs the task's JSON signed with the account's secret (`Tollgate-Signature`, see
//! `tollgate_contract::webhook`). A 2xx delivers it; anything else is retried with the seed's
//! backoff (`RetryPolicy::backoff` plus jitter, or the receiver's `Retry-After`) until
//! `--webhook-attempts`. Every attempt is recorded and shown on the task.

use crate::domain::clock::Clock;
use crate::domain::secrets;
use crate::error::{Error, Result};
use crate::store::{
    AccountEventRecord, DeliveryNext, Store, WebhookAttemptRecord, WebhookDeliveryRecord,
};
use futures_util::future::join_all;
use http::header::{CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use reqwest::Url;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tollgate_contract::retry::RetryPolicy;
use tollgate_contract::{headers, webhook, ErrorCode};

/// The longest `webhook_url` accepted.
pub const MAX_URL_CHARS: usize = 2048;
/// The JSON Schema `pattern` of a webhook URL: what [`check_url`] takes before it parses.
pub const URL_PATTERN: &str = "^https?://[^\\u0000]*$";
/// Deliveries claimed per round.
const BATCH: u32 = 16;
/// How often an idle sender looks for due deliveries without a wake-up.
const IDLE_POLL: Duration = Duration::from_millis(500);
/// How long a host name may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A URL that passed the check, with the addresses to connect to.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: Url,
    /// The host name when it is one (not an IP literal): the name to pin to `addrs`.
    pub domain: Option<String>,
    pub addrs: Vec<SocketAddr>,
}

/// Whether `ip` is an address on the public internet. Everything a server should not be made to
/// reach on a caller's behalf is not: its own loopback, private and link-local networks, CGNAT,
/// unique-local IPv6, multicast, and unspecified, documentation, benchmarking and reserved
/// ranges; IPv4 embedded in IPv6 (mapped, compatible, NAT64, 6to4) is judged as IPv4.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    let private = a == 0 // "this network", 0.0.0.0
        || a == 10
        || a == 127
        || (a == 100 && (64..128).contains(&b)) // CGNAT
        || (a == 169 && b == 254) // link-local, cloud metadata
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2) // TEST-NET-1
        || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast
        || (a == 192 && b == 168)
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || (a == 198 && b == 51 && c == 100) // TEST-NET-2
        || (a == 203 && b == 0 && c == 113) // TEST-NET-3
        || a >= 224; // multicast, reserved, broadcast
    !private
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let segments = ip.segments();
    if let Some(v4) = embedded_v4(ip) {
        return is_public_v4(v4);
    }
    let private = ip.is_unspecified()
        || ip.is_loopback()
        || (segments[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (segments[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (segments[0] & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
        || (segments[0] & 0xff00) == 0xff00 // multicast
        || (segments[0] == 0x2001 && segments[1] == 0x0db8) // documentation
        || (segments[0] == 0x0100 && segments[1..4] == [0, 0, 0]) // discard-only 100::/64
        || segments[0] == 0; // the rest of ::/16 (IPv4-compatible and reserved)
    !private
}

/// The IPv4 address inside an IPv6 one that carries it: mapped (`::ffff:a.b.c.d`), NAT64
/// (`64:ff9b::a.b.c.d`) and 6to4 (`2002:AABB:CCDD::`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = || Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    let mapped = s[..5] == [0, 0, 0, 0, 0] && s[5] == 0xffff;
    let nat64 = s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0];
    if mapped || nat64 {
        Some(tail())
    } else if s[0] == 0x2002 {
        Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ))
    } else {
        None
    }
}

/// Why a URL was refused, as the end of a sentence that starts with "`webhook_url` ".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

/// Checks a webhook URL and resolves its host: the rules of the module doc.
pub async fn check_url(raw: &str, allow_private: bool) -> std::result::Result<Target, Refusal> {
    let refuse = |why: &str| Refusal(why.to_owned());
    if raw.chars().count() > MAX_URL_CHARS {
        return Err(refuse(&format!(
            "must be at most {MAX_URL_CHARS} characters"
        )));
    }
    // Spelled exactly so (the schema's `pattern`): `Url::parse` would also take `HTTP:host`.
    if raw.contains('\0') {
        return Err(refuse("contains a NUL character"));
    }
    if !(raw.starts_with("http://") || raw.starts_with("https://")) {
        return Err(refuse("must start with http:// or https://"));
    }
    let url = Url::parse(raw).map_err(|_| refuse("must be an absolute http:// or https:// URL"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(refuse(
            "must not contain a user name or password; authenticate deliveries with their signature",
        ));
    }
    let port = url
        .port_or_known_default()
        .ok_or_else(|| refuse("must name a port"))?;
    let (domain, addrs) = match url.host() {
        Some(url::Host::Ipv4(ip)) => (None, vec![SocketAddr::new(IpAddr::V4(ip), port)]),
        Some(url::Host::Ipv6(ip)) => (None, vec![SocketAddr::new(IpAddr::V6(ip), port)]),
        Some(url::Host::Domain(name)) => {
            let lookup = tokio::time::timeout(
                RESOLVE_TIMEOUT,
                tokio::net::lookup_host((name.to_owned(), port)),
            )
            .await;
            let addrs: Vec<SocketAddr> = match lookup {
                Ok(Ok(found)) => found.collect(),
                _ => Vec::new(),
            };
            if addrs.is_empty() {
                return Err(refuse("names a host that could not be resolved"));
            }
            (Some(name.to_owned()), addrs)
        }
        None => return Err(refuse("must name a host")),
    };
    if !allow_private && !addrs.iter().all(|a| is_public(a.ip())) {
        // The addresses are not named: they could describe the server's own network.
        return Err(refuse(
            "points to a loopback, private or otherwise internal address; webhooks go to public addresses only",
        ));
    }
    Ok(Target { url, domain, addrs })
}

/// The 400 for a refused URL.
pub fn invalid_url(refusal: Refusal) -> Error {
    invalid_url_of("webhook_url", refusal)
}

/// The 400 of a refused URL in the field `param`.
pub fn invalid_url_of(param: &str, refusal: Refusal) -> Error {
    Error::invalid(
        ErrorCode::InvalidValue,
        param,
        format!("`{param}` {}.", refusal.0),
    )
}

/// What the webhook sender may use, and nothing else of the facade: the outbox in the store, the
/// clock, its wake-up and its settings. Made by `Tollgate::outbox`.
pub struct Outbox {
    pub(in crate::domain) store: Arc<dyn Store>,
    pub(in crate::domain) clock: Arc<dyn Clock>,
    /// Notified when a finished task has a delivery waiting.
    pub(in crate::domain) ready: Arc<Notify>,
    /// `--webhook-timeout`: one attempt's bound.
    pub(in crate::domain) timeout: Duration,
    /// `--webhook-attempts`: attempts in all before giving up.
    pub(in crate::domain) attempts: u32,
    /// `--allow-private-webhooks`: loopback and private addresses accepted (tests, intranets).
    pub(in crate::domain) allow_private: bool,
    /// How long tasks are kept: the `expires_at` of the task a delivery carries.
    pub(in crate::domain) retention: Duration,
    /// Signs the image links of the task a delivery carries.
    pub(in crate::domain) links: Arc<crate::domain::links::ImageLinks>,
    /// The base URL put before those links (`--public-url`, else the listening address).
    pub(in crate::domain) link_base: String,
}

impl Outbox {
    fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }
}

/// The account's webhook secret, made on first use (accounts made before webhooks existed).
/// `None`: no such account.
pub(crate) async fn secret_of(store: &dyn Store, account_id: &str) -> Result<Option<String>> {
    let candidate = secrets::new_webhook_secret()?;
    store.webhook_secret(account_id, &candidate).await
}

/// Starts the delivery loop; it stops when `stop` turns true, after the attempts in flight.
pub fn spawn(app: Outbox, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let timeout = app.timeout;
        // A claim must outlast an attempt: resolving plus the request's own timeout.
        let lease = (timeout * 2 + RESOLVE_TIMEOUT).max(Duration::from_secs(30));
        while !*stop.borrow() {
            let claim = match secrets::new_id("whclaim") {
                Ok(claim) => claim,
                Err(e) => {
                    tracing::error!(error = %e, "webhook sender could not make a claim id");
                    tokio::time::sleep(IDLE_POLL).await;
                    continue;
                }
            };
            let events = app
                .store
                .claim_account_events(app.now(), app.now() + lease, &claim, BATCH)
                .await
                .unwrap_or_else(|e| {
                    tracing::error!(error = %e, "webhook sender could not read the account events");
                    Vec::new()
                });
            let sent_events = !events.is_empty();
            join_all(events.into_iter().map(|e| deliver_event(&app, e, &claim))).await;
            let claimed = app
                .store
                .claim_webhook_deliveries(app.now(), app.now() + lease, &claim, BATCH)
                .await;
            match claimed {
                Ok(batch) if !batch.is_empty() => {
                    join_all(batch.into_iter().map(|d| deliver(&app, d, &claim))).await;
                }
                Ok(_) if sent_events => {}
                Ok(_) => {
                    tokio::select! {
                        _ = app.ready.notified() => {}
                        _ = tokio::time::sleep(IDLE_POLL) => {}
                        _ = stop.changed() => {}
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "webhook sender could not read the outbox");
                    tokio::time::sleep(IDLE_POLL).await;
                }
            }
        }
    })
}

/// What one attempt came to.
struct AttemptResult {
    status: Option<u16>,
    error: Option<String>,
    retry_after: Option<Duration>,
}

impl AttemptResult {
    fn failed(error: impl Into<String>) -> Self {
        AttemptResult {
            status: None,
            error: Some(error.into()),
            retry_after: None,
        }
    }

    fn delivered(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// What follows attempt `number` of `attempts` (task deliveries and account events alike).
    fn next(&self, number: u32, attempts: u32, at: OffsetDateTime) -> DeliveryNext {
        if self.delivered() {
            DeliveryNext::Delivered
        } else if number >= attempts {
            DeliveryNext::GiveUp
        } else {
            DeliveryNext::RetryAt(at + retry_delay(number, self.retry_after))
        }
    }
}

/// Makes one attempt of a claimed delivery and records it.
async fn deliver(app: &Outbox, delivery: WebhookDeliveryRecord, claim: &str) {
    let number = delivery.attempts + 1;
    let result = match attempt(app, &delivery, number).await {
        Ok(result) => result,
        Err(e) => {
            tracing::error!(task_id = %delivery.task_id, error = %e, "webhook attempt failed inside the server");
            AttemptResult::failed("the server could not send it")
        }
    };
    let at = app.now();
    let next = result.next(number, app.attempts, at);
    let outcome = match (&result.status, &result.error) {
        (Some(status), _) => format!("HTTP {status}"),
        (None, Some(error)) => error.clone(),
        (None, None) => String::new(),
    };
    match next {
        DeliveryNext::Delivered => {
            tracing::info!(task_id = %delivery.task_id, attempt = number, %outcome, "webhook delivered")
        }
        DeliveryNext::RetryAt(when) => {
            tracing::warn!(task_id = %delivery.task_id, attempt = number, %outcome, retry_at = %when, "webhook attempt failed; will retry")
        }
        DeliveryNext::GiveUp => {
            tracing::warn!(task_id = %delivery.task_id, attempt = number, %outcome, "webhook attempt failed; giving up")
        }
    }
    let record = WebhookAttemptRecord {
        number,
        at,
        status: result.status,
        error: result.error,
    };
    match app
        .store
        .record_webhook_attempt(&delivery.task_id, claim, &record, next)
        .await
    {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            task_id = %delivery.task_id,
            "a webhook claim lapsed during its attempt; another sender has it"
        ),
        Err(e) => {
            tracing::error!(task_id = %delivery.task_id, error = %e, "could not record a webhook attempt")
        }
    }
}

/// Makes one attempt of a claimed account event (`account.balance_low`) and records it.
async fn deliver_event(app: &Outbox, event: AccountEventRecord, claim: &str) {
    let number = event.attempts + 1;
    let result = match post_signed(
        app,
        &event.url,
        &event.account_id,
        &event.id,
        number,
        event.body.clone().into_bytes(),
    )
    .await
    {
        Ok(result) => result,
        Err(e) => {
            tracing::error!(event_id = %event.id, error = %e, "event attempt failed inside the server");
            AttemptResult::failed("the server could not send it")
        }
    };
    let at = app.now();
    let next = result.next(number, app.attempts, at);
    let outcome = match (&result.status, &result.error) {
        (Some(status), _) => Some(format!("HTTP {status}")),
        (None, error) => error.clone(),
    };
    tracing::info!(event_id = %event.id, event_type = %event.event_type, attempt = number, outcome = ?outcome, next = ?next, "account event attempt");
    let error = if result.delivered() { None } else { outcome };
    if let Err(e) = app
        .store
        .record_account_event_attempt(&event.id, claim, number, error.as_deref(), next, at)
        .await
    {
        tracing::error!(event_id = %event.id, error = %e, "could not record an event attempt");
    }
}

/// The seed's wait before attempt `number + 1`: the receiver's `Retry-After` when it sent a
/// reasonable one, else `min(1000·2^k, 30000)` ms; plus a jitter in `[0, 1000)` ms either way.
fn retry_delay(number: u32, retry_after: Option<Duration>) -> Duration {
    let policy = RetryPolicy::default();
    let k = number.saturating_sub(1);
    let base = match retry_after {
        Some(wait) if wait <= policy.max_retry_after => wait,
        _ => policy.backoff(k),
    };
    base + policy.random_jitter()
}

/// One POST of the task to its URL.
async fn attempt(
    app: &Outbox,
    delivery: &WebhookDeliveryRecord,
    number: u32,
) -> Result<AttemptResult> {
    let Some(task) = app.store.get_task(&delivery.task_id).await? else {
        return Ok(AttemptResult::failed("the task no longer exists"));
    };
    if task.purged {
        return Ok(AttemptResult::failed(
            "the task expired before its webhook could be delivered",
        ));
    }
    // The task as `GET /v1/tasks/{id}` shows it, without the webhook's own bookkeeping: every
    // attempt sends the same task, with image links fresh at the attempt.
    let mut view = crate::domain::service::task_view(&task, app.retention, &app.links, app.now());
    crate::domain::links::absolute(&mut view, &app.link_base);
    let body = serde_json::to_vec(&view).map_err(Error::internal)?;
    post_signed(
        app,
        &delivery.url,
        &delivery.account_id,
        &task.id,
        number,
        body,
    )
    .await
}

/// One signed POST of `body` to `url`, as the account's deliveries are made: the URL checked
/// again and its addresses pinned, no redirects, `Tollgate-Signature` under the account's secret.
async fn post_signed(
    app: &Outbox,
    url: &str,
    account_id: &str,
    id: &str,
    number: u32,
    body: Vec<u8>,
) -> Result<AttemptResult> {
    let target = match check_url(url, app.allow_private).await {
        Ok(target) => target,
        Err(Refusal(why)) => return Ok(AttemptResult::failed(format!("the URL {why}"))),
    };
    let Some(secret) = secret_of(app.store.as_ref(), account_id).await? else {
        return Ok(AttemptResult::failed("the account no longer exists"));
    };
    let timestamp = app.now().unix_timestamp();
    let signature = webhook::sign(&secret, timestamp, &body);

    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(app.timeout)
        .connect_timeout(app.timeout);
    if let Some(domain) = &target.domain {
        // Connect to the addresses just checked, not to whatever a second lookup would say.
        builder = builder.resolve_to_addrs(domain, &target.addrs);
    }
    let client = builder
        .build()
        .map_err(|e| Error::internal(format!("webhook HTTP client: {e}")))?;
    let sent = client
        .post(target.url)
        .header(CONTENT_TYPE, "application/json")
        .header(
            USER_AGENT,
            concat!("tollgate-webhooks/", env!("CARGO_PKG_VERSION")),
        )
        .header(webhook::SIGNATURE_HEADER, signature)
        .header(headers::WEBHOOK_ID, id)
        .header(headers::WEBHOOK_ATTEMPT, number.to_string())
        .body(body)
        .send()
        .await;
    Ok(match sent {
        Ok(response) => AttemptResult {
            status: Some(response.status().as_u16()),
            error: None,
            retry_after: response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    tollgate_contract::retry_after::parse(v, std::time::SystemTime::now())
                }),
        },
        Err(e) if e.is_timeout() => {
            AttemptResult::failed(format!("no answer within {} s", app.timeout.as_secs()))
        }
        Err(e) if e.is_connect() => AttemptResult::failed("the connection was refused or failed"),
        Err(_) => AttemptResult::failed("the connection broke before an answer"),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn public(text: &str) -> bool {
        is_public(text.parse().unwrap())
    }

    #[test]
    fn classifies_addresses() {
        for private in [
            "127.0.0.1",
            "127.8.9.10",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.254",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.2.10",
            "198.51.100.7",
            "203.0.113.9",
            "198.18.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:0001::1",
            "::127.0.0.1",
        ] {
            assert!(!public(private), "{private} must not count as public");
        }
        for open in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.215.14",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "2002:0808:0808::1",
        ] {
            assert!(public(open), "{open} is public");
        }
    }

    #[tokio::test]
    async fn refuses_what_it_should() {
        let refused = |url: &'static str| async move { check_url(url, false).await.unwrap_err() };
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://localhost/hook",
            "http://10.0.0.5/hook",
            "http://[::1]:9000/",
            "http://169.254.169.254/latest/meta-data/",
            "http://0x7f000001/",
            "http://2130706433/",
            "http://[::ffff:192.168.0.1]/",
        ] {
            let Refusal(why) = refused(url).await;
            assert!(why.contains("public addresses only"), "{url}: {why}");
        }
        for url in ["ftp://example.com/", "/relative", " https://example.com/"] {
            assert!(
                refused(url).await.0.contains("http:// or https://"),
                "{url}"
            );
        }
        assert!(refused("http://[::1/").await.0.contains("absolute"));
        assert!(refused("https://example.com/\0").await.0.contains("NUL"));
        assert!(refused("https://user:pw@example.com/")
            .await
            .0
            .contains("user name"));
        let long: &'static str =
            Box::leak(format!("https://example.com/{}", "a".repeat(2100)).into_boxed_str());
        assert!(refused(long).await.0.contains("2048"));
        assert!(refused("http://no-such-host.invalid/")
            .await
            .0
            .contains("resolved"));
        // Public literals pass without any lookup; private ones pass when allowed.
        let ok = check_url("https://1.1.1.1/hook?x=1", false).await.unwrap();
        assert_eq!(ok.addrs, vec!["1.1.1.1:443".parse().unwrap()]);
        assert!(ok.domain.is_none());
        assert!(check_url("http://127.0.0.1:9/x", true).await.is_ok());
        let local = check_url("http://localhost:9/x", true).await.unwrap();
        assert_eq!(local.domain.as_deref(), Some("localhost"));
        assert!(local.addrs.iter().all(|a| a.port() == 9));
    }

    #[test]
    fn delays_follow_the_seed() {
        for (number, floor) in [(1, 1000), (2, 2000), (3, 4000), (6, 30_000), (9, 30_000)] {
            let d = retry_delay(number, None).as_millis();
            assert!(
                (floor..floor + 1000).contains(&d),
                "attempt {number}: {d} ms"
            );
        }
        let d = retry_delay(1, Some(Duration::from_secs(7))).as_millis();
        assert!((7000..8000).contains(&d));
        // A Retry-After beyond the policy's ceiling falls back to the backoff.
        let d = retry_delay(1, Some(Duration::from_secs(3600))).as_millis();
        assert!((1000..2000).contains(&d));
    }
}
