//! The server's configuration, read once into typed values.
//!
//! The binary fills it from flags and `TOLLGATE_*` variables (see `tollgate serve --help`);
//! tests build it directly. Secrets sit in [`Secret`], whose `Debug` prints nothing.

pub use crate::disk::MinFreeDisk;
use crate::domain::pricing::Prices;
use std::path::PathBuf;
use std::time::Duration;
use tollgate_contract::RateLimit;
pub use tollgate_contract::Secret;

/// Everything `tollgate serve` needs to know.
#[derive(Debug, Clone)]
pub struct Config {
    /// SQLite database and images live here.
    pub data_dir: PathBuf,
    /// Tasks older than this answer 410 and are purged.
    pub retention: Duration,
    /// How long a signed image link (`images[].url`) works, at least.
    pub image_url_ttl: Duration,
    /// How long `POST /openai/v1/images/generations` waits for its task before a 504.
    pub sync_timeout: Duration,
    /// The base URL clients reach this server at (`https://img.example.com`), for the links it
    /// hands out; `None`: the `Host` of each request (and the listening address for webhooks).
    pub public_url: Option<String>,
    /// Where the images are kept: a directory, or an S3-compatible bucket.
    pub image_store: ImageStoreConfig,
    /// Honour the `Tollgate-Simulate` headers.
    pub simulate_errors: bool,
    /// Also send `X-RateLimit-Limit/-Remaining/-Reset` beside the IETF `RateLimit` headers.
    pub legacy_ratelimit_headers: bool,
    /// Credits per image by size.
    pub prices: Prices,
    /// The limit of accounts that have none of their own.
    pub default_rate_limit: RateLimit,
    /// Tasks generated at once.
    pub workers: usize,
    /// `TOLLGATE_ADMIN_TOKEN`; when `None` the server makes one on first start.
    pub admin_token: Option<Secret>,
    /// How long shutdown waits for in-flight requests before it stops anyway.
    pub shutdown_grace: Duration,
    /// `Retry-After` sent with 503 while shutting down.
    pub shutdown_retry_after: Duration,
    /// How often the retention purge runs.
    pub purge_interval: Duration,
    /// `postgres://…` for PostgreSQL, `sqlite://PATH` for a SQLite file; `None`: SQLite in `data_dir`.
    pub database_url: Option<Secret>,
    /// PostgreSQL only: the schema to keep tollgate's tables in (created if missing).
    pub database_schema: Option<String>,
    /// `redis://…`: rate limits shared through Redis; `None`: in process.
    pub redis_url: Option<Secret>,
    /// What to do when Redis cannot be reached.
    pub redis_failure: RedisFailure,
    /// How long a worker holds a task without renewing; a dead instance's tasks wait this long.
    pub task_lease: Duration,
    /// How long a dashboard session lasts after sign-in (it ends sooner on sign-out or when its
    /// API key is revoked).
    pub session_ttl: Duration,
    /// What generates the images.
    pub backend: BackendKind,
    /// The OpenAI-compatible upstream's base URL (`https://api.openai.com`); `/v1/images/generations`
    /// is appended. Required by [`BackendKind::OpenAi`].
    pub upstream_url: Option<String>,
    /// `TOLLGATE_UPSTREAM_API_KEY`, sent as `Authorization: Bearer`. Required by [`BackendKind::OpenAi`].
    pub upstream_api_key: Option<Secret>,
    /// The upstream's `model` field; `None` leaves it out (the upstream's default).
    pub upstream_model: Option<String>,
    /// Generations in flight against the backend at once, per instance; `None`: as many as `workers`.
    pub backend_concurrency: Option<usize>,
    /// The model catalogue (`--models`, TOML); `None`: one model, `builtin`, made by `backend`
    /// at `prices`.
    pub models: Option<std::path::PathBuf>,
    /// How long one run of a task may take (the backend's retries included) before it fails and
    /// is refunded.
    pub task_timeout: Duration,
    /// Accept webhook URLs that resolve to loopback, private or link-local addresses (tests, or
    /// receivers on the operator's own network). Off: such URLs are refused (SSRF).
    pub allow_private_webhooks: bool,
    /// Attempts per webhook delivery before it is given up (the first included).
    pub webhook_attempts: u32,
    /// How long one webhook attempt may take (connect, send, answer).
    pub webhook_timeout: Duration,
    /// Below this much free space under `data_dir`, writes that grow the data are refused
    /// with 503 (reads go on), so the disk's wall is not reached by the server's own writes.
    pub min_free_disk: MinFreeDisk,
    /// The bounds on client connections (the contract's "Connections").
    pub connections: ConnectionLimits,
    /// Credit packs sold through Stripe Checkout; `None`: no payments are taken.
    pub billing: Option<BillingConfig>,
}

/// Stripe Checkout: the keys, where Stripe's API is, and what is for sale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingConfig {
    /// `TOLLGATE_STRIPE_SECRET_KEY` (`sk_…`).
    pub secret_key: Secret,
    /// `TOLLGATE_STRIPE_WEBHOOK_SECRET` (`whsec_…`): what `Stripe-Signature` is checked with.
    pub webhook_secret: Secret,
    /// `--stripe-api-base`: `https://api.stripe.com`, or a local server in tests.
    pub api_base: String,
    /// `--credit-packs`.
    pub packs: Vec<tollgate_contract::CreditPack>,
}

/// The default of `--credit-packs`.
pub const DEFAULT_CREDIT_PACKS: &str = "500:5.00:usd,2000:18.00:usd";

/// Currencies without a minor unit (Stripe's list): their prices are whole numbers.
const ZERO_DECIMAL: &[&str] = &[
    "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
    "xaf", "xof", "xpf",
];

/// How many decimals a price in `currency` has (0 for the currencies without a minor unit).
pub fn currency_decimals(currency: &str) -> usize {
    if ZERO_DECIMAL.contains(&currency) {
        0
    } else {
        2
    }
}

/// Parses `credits:price:currency,…` (`500:5.00:usd`) into packs, the price in the currency's
/// minor unit as Stripe takes it.
pub fn parse_credit_packs(text: &str) -> Result<Vec<tollgate_contract::CreditPack>, String> {
    let mut packs: Vec<tollgate_contract::CreditPack> = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let bad = || format!("{item:?}: a pack is credits:price:currency, as 500:5.00:usd");
        let mut parts = item.split(':');
        let (Some(credits), Some(price), Some(currency), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let credits: u64 = credits.trim().parse().map_err(|_| bad())?;
        let currency = currency.trim().to_ascii_lowercase();
        if credits == 0 || credits > tollgate_contract::MAX_CREDITS {
            return Err(format!(
                "{item:?}: a pack holds 1 to {} credits",
                tollgate_contract::MAX_CREDITS
            ));
        }
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(format!(
                "{item:?}: the currency is a three-letter ISO code, as usd"
            ));
        }
        let decimals = if ZERO_DECIMAL.contains(&currency.as_str()) {
            0
        } else {
            2
        };
        let (whole, fraction) = price.trim().split_once('.').unwrap_or((price.trim(), ""));
        if fraction.len() > decimals
            || whole.is_empty()
            || !whole
                .bytes()
                .chain(fraction.bytes())
                .all(|b| b.is_ascii_digit())
        {
            return Err(format!(
                "{item:?}: the price is a number with at most {decimals} decimals"
            ));
        }
        let digits = format!("{whole}{fraction:0<decimals$}");
        let amount: u64 = digits.parse().map_err(|_| bad())?;
        if amount == 0 {
            return Err(format!("{item:?}: the price must be above zero"));
        }
        if packs.iter().any(|p| p.credits == credits) {
            return Err(format!("{item:?}: two packs of {credits} credits"));
        }
        packs.push(tollgate_contract::CreditPack {
            credits,
            amount,
            currency,
        });
    }
    if packs.is_empty() {
        return Err("no credit packs".to_owned());
    }
    Ok(packs)
}

/// How long a client may take, and how many may be connected at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// A connection that has not sent a complete request head within this is closed.
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// A request body must arrive whole within this of its head (else 408).
    pub body_read_timeout: Duration,
    /// A response write that makes no progress for this long ends the connection.
    pub write_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            max_connections: 10_000,
        }
    }
}

/// The generation backend (`tollgate serve --backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// The built-in renderer: offline and deterministic (the default).
    #[default]
    Builtin,
    /// An OpenAI-compatible images API (`POST {upstream_url}/v1/images/generations`).
    OpenAi,
}

impl BackendKind {
    /// The name `--backend` takes.
    pub const fn as_str(self) -> &'static str {
        match self {
            BackendKind::Builtin => "builtin",
            BackendKind::OpenAi => "openai",
        }
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "builtin" => Ok(BackendKind::Builtin),
            "openai" => Ok(BackendKind::OpenAi),
            other => Err(format!("{other:?}: use builtin or openai")),
        }
    }
}

/// Behaviour when the rate limiter's Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RedisFailure {
    /// Refuse with 503 `service_unavailable` and `Retry-After` (the default: limits are a promise).
    #[default]
    FailClosed,
    /// Let requests through unlimited.
    FailOpen,
}

impl std::str::FromStr for RedisFailure {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "closed" | "fail-closed" => Ok(RedisFailure::FailClosed),
            "open" | "fail-open" => Ok(RedisFailure::FailOpen),
            other => Err(format!("{other:?}: use closed or open")),
        }
    }
}

impl Config {
    /// Defaults of the contract, with data under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            data_dir: data_dir.into(),
            retention: Duration::from_secs(30 * 24 * 3600),
            image_url_ttl: Duration::from_secs(3600),
            sync_timeout: Duration::from_secs(120),
            public_url: None,
            image_store: ImageStoreConfig::default(),
            simulate_errors: false,
            legacy_ratelimit_headers: false,
            prices: Prices::default(),
            default_rate_limit: RateLimit {
                requests_per_minute: 600,
                burst: 20,
            },
            workers: 2,
            admin_token: None,
            shutdown_grace: Duration::from_secs(30),
            shutdown_retry_after: Duration::from_secs(5),
            purge_interval: Duration::from_secs(60),
            database_url: None,
            database_schema: None,
            redis_url: None,
            redis_failure: RedisFailure::default(),
            task_lease: Duration::from_secs(30),
            session_ttl: Duration::from_secs(12 * 3600),
            backend: BackendKind::default(),
            upstream_url: None,
            upstream_api_key: None,
            upstream_model: None,
            backend_concurrency: None,
            models: None,
            task_timeout: Duration::from_secs(5 * 60),
            allow_private_webhooks: false,
            webhook_attempts: 8,
            webhook_timeout: Duration::from_secs(10),
            min_free_disk: MinFreeDisk::Auto,
            connections: ConnectionLimits::default(),
            billing: None,
        }
    }

    /// Generations in flight at once: `backend_concurrency`, or else one per worker.
    pub fn effective_backend_concurrency(&self) -> usize {
        self.backend_concurrency.unwrap_or(self.workers).max(1)
    }

    /// The purge runs often enough that a short retention (tests, demos) is honoured promptly.
    pub fn effective_purge_interval(&self) -> Duration {
        self.purge_interval
            .min(self.retention / 4)
            .max(Duration::from_millis(200))
    }
}

/// Parses durations like `30d`, `12h`, `15m`, `2s`, `500ms` (one number and one unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| {
        format!("{text:?} is not a duration: write a whole number and a unit, like 30d, 12h or 2s")
    })?;
    let seconds_per_unit = match unit {
        "ms" => return Ok(Duration::from_millis(number)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit: use ms, s, m, h or d"
            ))
        }
    };
    number
        .checked_mul(seconds_per_unit)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// `--image-store`: where the images are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ImageStoreConfig {
    /// `<data dir>/images`.
    #[default]
    DataDir,
    /// A directory of its own (a shared mount, say).
    Directory(PathBuf),
    /// `s3://bucket/prefix`: an S3-compatible bucket, reached with the standard AWS variables
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`…).
    S3(S3Config),
}

/// An S3-compatible bucket for the images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Keys start with it (`images/` → `images/task_…/0.png`); empty: at the bucket's root.
    pub prefix: String,
    /// `--s3-endpoint`: another S3-compatible service (MinIO, R2, a local test server);
    /// `None`: `AWS_ENDPOINT_URL`, else AWS itself.
    pub endpoint: Option<String>,
    /// One request's bound (its retries included) before the store counts as unreachable.
    pub timeout: Duration,
}

impl ImageStoreConfig {
    /// `s3://bucket[/prefix]`, or a directory.
    pub fn parse(text: &str) -> Result<ImageStoreConfig, String> {
        let Some(rest) = text.strip_prefix("s3://") else {
            if text.contains("://") {
                return Err("use s3://bucket/prefix or a directory".to_owned());
            }
            return Ok(ImageStoreConfig::Directory(PathBuf::from(text)));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err("s3:// needs a bucket: s3://bucket/prefix".to_owned());
        }
        Ok(ImageStoreConfig::S3(S3Config {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            endpoint: None,
            timeout: Duration::from_secs(10),
        }))
    }
}

/// `--public-url`: an http(s) URL with a host and nothing after the path, kept without its
/// trailing slash.
pub fn parse_public_url(text: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("must be an http:// or https:// URL with a host".to_owned());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or a fragment".to_owned());
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_stores() {
        let s3 = |bucket: &str, prefix: &str| {
            ImageStoreConfig::S3(S3Config {
                bucket: bucket.into(),
                prefix: prefix.into(),
                endpoint: None,
                timeout: Duration::from_secs(10),
            })
        };
        assert_eq!(ImageStoreConfig::parse("s3://b"), Ok(s3("b", "")));
        assert_eq!(ImageStoreConfig::parse("s3://b/"), Ok(s3("b", "")));
        assert_eq!(ImageStoreConfig::parse("s3://b/a/c/"), Ok(s3("b", "a/c")));
        assert!(ImageStoreConfig::parse("s3://").is_err());
        let packs = parse_credit_packs("500:5.00:usd, 2000:18:EUR,100:150:jpy").unwrap();
        assert_eq!(
            packs
                .iter()
                .map(|p| (p.credits, p.amount, p.currency.as_str()))
                .collect::<Vec<_>>(),
            [(500, 500, "usd"), (2000, 1800, "eur"), (100, 150, "jpy")]
        );
        for bad in [
            "",
            "500",
            "500:5.001:usd",
            "0:5:usd",
            "5:0:usd",
            "5:1.5:jpy",
            "5:-1:usd",
            "5:1:dollars",
            "5:1:usd,5:2:usd",
        ] {
            assert!(parse_credit_packs(bad).is_err(), "{bad}");
        }
        assert!(ImageStoreConfig::parse("gs://b").is_err());
        assert_eq!(
            ImageStoreConfig::parse("/mnt/images"),
            Ok(ImageStoreConfig::Directory("/mnt/images".into()))
        );
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(
            parse_duration("12h").unwrap(),
            Duration::from_secs(12 * 3600)
        );
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("2").is_err());
        assert!(parse_duration("d").is_err());
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Config {
            admin_token: Some(Secret::new("hunter2")),
            upstream_api_key: Some(Secret::new("sk-upstream")),
            ..Config::new("/tmp")
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{c:?}").contains("sk-upstream"));
    }
}
