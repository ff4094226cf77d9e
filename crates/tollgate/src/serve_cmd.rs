//! `tollgate serve`: flags and `TOLLGATE_*` variables into a [`Config`], then run until SIGTERM.

use clap::Args;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tollgate_contract::RateLimit;
use tollgate_server::config::{BackendKind, ConnectionLimits, ImageStoreConfig, MinFreeDisk};
use tollgate_server::domain::catalogue::Catalogue;
use tollgate_server::{parse_duration, Config, Prices, Secret, Server};

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "TOLLGATE_ADDR", default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Where the SQLite database and the images are kept.
    #[arg(long, env = "TOLLGATE_DATA_DIR", default_value = "./tollgate-data")]
    data_dir: PathBuf,
    /// How long tasks are kept; older ones answer 410 and their data is purged (30d, 12h, 2s…).
    #[arg(long, env = "TOLLGATE_RETENTION", default_value = "30d", value_parser = parse_duration)]
    retention: Duration,
    /// How long a task's image links (`images[].url`, usable without the API key) work, at least.
    #[arg(long, env = "TOLLGATE_IMAGE_URL_TTL", default_value = "1h", value_parser = parse_duration)]
    image_url_ttl: Duration,
    /// How long `POST /openai/v1/images/generations` waits for its images before answering
    /// 504 with the task's id (the task goes on; it is not charged again).
    #[arg(long, env = "TOLLGATE_SYNC_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    sync_timeout: Duration,
    /// The base URL clients reach this server at, e.g. `https://img.example.com` behind a proxy:
    /// image links start with it (default: the `Host` each request was sent to, and the
    /// listening address in webhook bodies).
    #[arg(long, env = "TOLLGATE_PUBLIC_URL", value_name = "URL", value_parser = tollgate_server::config::parse_public_url)]
    public_url: Option<String>,
    /// Where the images are kept: `s3://bucket/prefix` for an S3-compatible bucket (credentials
    /// and region from the standard AWS variables: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// AWS_REGION, AWS_ENDPOINT_URL…), or a directory (default: `images` in --data-dir).
    #[arg(long, env = "TOLLGATE_IMAGE_STORE", value_name = "URL", value_parser = ImageStoreConfig::parse)]
    image_store: Option<ImageStoreConfig>,
    /// The S3-compatible service to use instead of AWS (MinIO, R2, a local server), e.g.
    /// `http://127.0.0.1:9000`; path-style requests, plain HTTP allowed for an http:// URL.
    #[arg(long, env = "TOLLGATE_S3_ENDPOINT", value_name = "URL")]
    s3_endpoint: Option<String>,
    /// How long one request to the image store may take, its retries included, before it counts
    /// as unreachable (503 with Retry-After; a worker puts its task back in the queue).
    #[arg(long, env = "TOLLGATE_IMAGE_STORE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    image_store_timeout: Duration,
    /// Also send GitHub-style `X-RateLimit-Limit`, `-Remaining` and `-Reset` (Unix seconds when
    /// the burst is full again) beside the IETF `RateLimit-Policy`/`RateLimit`, for clients that
    /// read only those.
    #[arg(long, env = "TOLLGATE_LEGACY_RATELIMIT_HEADERS")]
    legacy_ratelimit_headers: bool,
    /// The credit packs sold through Stripe Checkout, as `credits:price:currency,…`; sold only
    /// when TOLLGATE_STRIPE_SECRET_KEY and TOLLGATE_STRIPE_WEBHOOK_SECRET are set.
    #[arg(long, env = "TOLLGATE_CREDIT_PACKS", value_name = "PACKS", default_value = tollgate_server::config::DEFAULT_CREDIT_PACKS)]
    credit_packs: String,
    /// Where Stripe's API is (a local Stripe-protocol server in tests).
    #[arg(
        long,
        env = "TOLLGATE_STRIPE_API_BASE",
        value_name = "URL",
        default_value = "https://api.stripe.com"
    )]
    stripe_api_base: String,
    /// Let requests ask for a failure with `Tollgate-Simulate: 429|500|503|panic`
    /// (and a delay with `Tollgate-Simulate-Delay-Ms`), to test clients against a real server.
    #[arg(long, env = "TOLLGATE_SIMULATE_ERRORS")]
    simulate_errors: bool,
    /// Tasks generated at once (0: accept and queue tasks but run none here).
    #[arg(long, env = "TOLLGATE_WORKERS", default_value_t = 2)]
    workers: usize,
    /// Credits per image by size, e.g. `256x256=1,512x512=2,1024x1024=4`.
    #[arg(long, env = "TOLLGATE_PRICES", default_value = "256x256=1,512x512=2,1024x1024=4", value_parser = Prices::parse)]
    prices: Prices,
    /// Rate limit of accounts without one of their own: sustained requests per minute.
    #[arg(long, env = "TOLLGATE_DEFAULT_RPM", default_value_t = 600, value_parser = clap::value_parser!(u32).range(1..))]
    default_rpm: u32,
    /// Rate limit of accounts without one of their own: burst.
    #[arg(long, env = "TOLLGATE_DEFAULT_BURST", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    default_burst: u32,
    /// `postgres://…` to share one database between instances, or `sqlite://PATH`
    /// (default: SQLite in --data-dir).
    #[arg(long, env = "TOLLGATE_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// PostgreSQL schema for tollgate's tables (created if missing; default: the search path).
    #[arg(long, env = "TOLLGATE_DATABASE_SCHEMA")]
    database_schema: Option<String>,
    /// `redis://…` to share rate limits between instances (default: in process).
    #[arg(long, env = "TOLLGATE_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// When Redis cannot be reached: `closed` answers 503 with Retry-After, `open` lets requests through.
    #[arg(long, env = "TOLLGATE_REDIS_FAILURE", default_value = "closed")]
    redis_failure: tollgate_server::config::RedisFailure,
    /// How long a worker holds a task without renewing it; tasks of a dead instance wait this long.
    #[arg(long, env = "TOLLGATE_TASK_LEASE", default_value = "30s", value_parser = parse_duration)]
    task_lease: Duration,
    /// How long a dashboard session lasts after sign-in (sign-out or revoking its key ends it sooner).
    #[arg(long, env = "TOLLGATE_SESSION_TTL", default_value = "12h", value_parser = parse_duration)]
    session_ttl: Duration,
    /// How long shutdown waits for in-flight requests.
    #[arg(long, env = "TOLLGATE_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// The model catalogue, a TOML file: models, each with its backend, provider settings,
    /// prices per size, max_n, concurrency and timeout (README, "Models"). Without it there is
    /// one model, `builtin`, made by --backend at --prices.
    #[arg(long, env = "TOLLGATE_MODELS", value_name = "FILE")]
    models: Option<PathBuf>,
    /// What generates the images: `builtin` (the offline renderer) or `openai` (an
    /// OpenAI-compatible images API at --upstream-url, its key in TOLLGATE_UPSTREAM_API_KEY).
    #[arg(long, env = "TOLLGATE_BACKEND", default_value = "builtin")]
    backend: BackendKind,
    /// The OpenAI-compatible upstream, e.g. `https://api.openai.com`; requests go to
    /// `{url}/v1/images/generations`.
    #[arg(long, env = "TOLLGATE_UPSTREAM_URL", value_name = "URL")]
    upstream_url: Option<String>,
    /// The upstream's `model` (default: the upstream's own default).
    #[arg(long, env = "TOLLGATE_UPSTREAM_MODEL")]
    upstream_model: Option<String>,
    /// Generations in flight against the backend at once (default: --workers).
    #[arg(long, env = "TOLLGATE_BACKEND_CONCURRENCY", value_parser = clap::value_parser!(u32).range(1..))]
    backend_concurrency: Option<u32>,
    /// How long one run of a task may take, the upstream's retries included; then it fails and is refunded.
    #[arg(long, env = "TOLLGATE_TASK_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    task_timeout: Duration,
    /// Accept webhook URLs on loopback, private or link-local addresses (off: refused, against SSRF).
    #[arg(long, env = "TOLLGATE_ALLOW_PRIVATE_WEBHOOKS")]
    allow_private_webhooks: bool,
    /// Attempts per webhook delivery (the first included) before it is given up.
    #[arg(long, env = "TOLLGATE_WEBHOOK_ATTEMPTS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=50))]
    webhook_attempts: u32,
    /// Free space to keep under the data directory: below it, creates, top-ups and new keys
    /// are refused with 503 (reads go on) and workers wait. `auto`: 100MiB, or 5% of a smaller
    /// disk; `0`: no floor. Sizes like 500MiB, 2GiB.
    #[arg(long, env = "TOLLGATE_MIN_FREE_DISK", default_value = "auto")]
    min_free_disk: MinFreeDisk,
    /// A connection that has not sent a complete request head within this is closed.
    #[arg(long, env = "TOLLGATE_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    header_read_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this.
    #[arg(long, env = "TOLLGATE_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_positive_duration)]
    idle_timeout: Duration,
    /// A request body must arrive whole within this of its head; else 408 `request_timeout`.
    #[arg(long, env = "TOLLGATE_BODY_READ_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    body_read_timeout: Duration,
    /// A response write that makes no progress for this long (the client stopped reading) ends the connection.
    #[arg(long, env = "TOLLGATE_WRITE_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    write_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog while idle ones are closed
    /// to make room. Capped by the file descriptor limit (`ulimit -n`, raised to its hard value).
    #[arg(long, env = "TOLLGATE_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err("must be longer than zero".to_owned()),
        d => Ok(d),
    }
}

pub fn run(args: ServeArgs) -> ExitCode {
    // Held to the end: dropping it writes out the lines still queued.
    let _log = init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tollgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr through a writer thread of its own: a request's line is queued, not written on
/// the request's path, and lines that come together leave in one write (the way nginx buffers
/// its access log). Never lossy: a full queue waits rather than drops.
fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    use std::io::IsTerminal;
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("tollgate-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer)
        .init();
    // A panic is logged as an event inside the request's span, so it carries the request id.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(panic = info.payload_as_str().unwrap_or("non-string payload"), %location, "panic");
    }));
    guard
}

async fn serve(args: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut config = Config::new(&args.data_dir);
    config.retention = args.retention;
    config.image_url_ttl = args.image_url_ttl;
    config.sync_timeout = args.sync_timeout;
    config.public_url = args.public_url;
    config.image_store = match args.image_store.unwrap_or_default() {
        ImageStoreConfig::S3(mut s3) => {
            s3.endpoint = args.s3_endpoint;
            s3.timeout = args.image_store_timeout;
            ImageStoreConfig::S3(s3)
        }
        _ if args.s3_endpoint.is_some() => {
            return Err("--s3-endpoint needs --image-store s3://bucket/prefix".into())
        }
        other => other,
    };
    config.simulate_errors = args.simulate_errors;
    config.legacy_ratelimit_headers = args.legacy_ratelimit_headers;
    config.workers = args.workers;
    config.prices = args.prices;
    config.default_rate_limit = RateLimit {
        requests_per_minute: args.default_rpm,
        burst: args.default_burst,
    };
    config.shutdown_grace = args.shutdown_grace;
    config.session_ttl = args.session_ttl;
    config.database_url = args.database_url.map(Secret::new);
    config.database_schema = args.database_schema;
    config.redis_url = args.redis_url.map(Secret::new);
    config.redis_failure = args.redis_failure;
    config.task_lease = args.task_lease;
    config.backend = args.backend;
    config.upstream_url = args.upstream_url;
    config.upstream_model = args.upstream_model;
    config.models = args.models;
    config.backend_concurrency = args.backend_concurrency.map(|n| n as usize);
    config.task_timeout = args.task_timeout;
    config.allow_private_webhooks = args.allow_private_webhooks;
    config.webhook_attempts = args.webhook_attempts;
    config.min_free_disk = args.min_free_disk;
    config.connections = ConnectionLimits {
        header_read_timeout: args.header_read_timeout,
        idle_timeout: args.idle_timeout,
        body_read_timeout: args.body_read_timeout,
        write_timeout: args.write_timeout,
        max_connections: args.max_connections as usize,
    };
    // Not a flag, like the operator token: a flag is visible to everyone who can list processes.
    config.upstream_api_key = std::env::var("TOLLGATE_UPSTREAM_API_KEY")
        .ok()
        .filter(|k| !k.is_empty())
        .map(Secret::new);
    if config.backend == BackendKind::OpenAi {
        if config.upstream_url.is_none() {
            return Err("--backend openai needs --upstream-url (or TOLLGATE_UPSTREAM_URL)".into());
        }
        if config.upstream_api_key.is_none() {
            return Err(
                "--backend openai needs TOLLGATE_UPSTREAM_API_KEY in the environment".into(),
            );
        }
    }
    // Stripe's keys are not flags either.
    let stripe_key = |name: &str| {
        std::env::var(name)
            .ok()
            .filter(|k| !k.is_empty())
            .map(Secret::new)
    };
    match (
        stripe_key("TOLLGATE_STRIPE_SECRET_KEY"),
        stripe_key("TOLLGATE_STRIPE_WEBHOOK_SECRET"),
    ) {
        (Some(secret_key), Some(webhook_secret)) => {
            config.billing = Some(tollgate_server::config::BillingConfig {
                secret_key,
                webhook_secret,
                api_base: tollgate_server::config::parse_public_url(&args.stripe_api_base)
                    .map_err(|e| format!("--stripe-api-base: {e}"))?,
                packs: tollgate_server::config::parse_credit_packs(&args.credit_packs)
                    .map_err(|e| format!("--credit-packs: {e}"))?,
            });
        }
        (None, None) => {}
        _ => {
            return Err(
                "Stripe needs both TOLLGATE_STRIPE_SECRET_KEY and TOLLGATE_STRIPE_WEBHOOK_SECRET"
                    .into(),
            )
        }
    }
    // Not a flag: a flag would show the token to everyone who can list processes.
    config.admin_token = std::env::var("TOLLGATE_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .map(Secret::new);

    // The catalogue first: a bad file stops the start, with its line and reason, before
    // anything is opened.
    let catalogue = Catalogue::from_config(&config)?;
    let server = Server::open(config, catalogue).await?;
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
    let local = listener.local_addr()?;
    // The handlers are in place before the address is printed: a SIGTERM sent as soon as a
    // supervisor sees the server listening must drain it, not kill it by default.
    let shutdown = shutdown_signal()?;
    {
        let mut out = std::io::stdout().lock();
        if let Some(token) = server.generated_admin_token() {
            writeln!(
                out,
                "admin token (shown once; only its hash is kept): {}",
                token.expose()
            )?;
        }
        writeln!(out, "listening on http://{local}")?;
        out.flush()?;
    }
    tracing::info!(
        addr = %local,
        data_dir = %args.data_dir.display(),
        retention_secs = args.retention.as_secs(),
        backend = args.backend.as_str(),
        "serving"
    );
    server.run(listener, shutdown).await?;
    Ok(())
}

/// SIGINT or SIGTERM, listened for from this call on (not from the first poll).
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let (mut interrupt, mut terminate) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        )
    };
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = interrupt.recv() => {},
            _ = terminate.recv() => {},
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    })
}
