//! The client-side commands — `generate`, `tasks`, `account`, `admin` — as glue over the SDK.
//!
//! Each command builds a [`tollgate_client::Client`] (or `AdminClient`) from flags and the
//! `TOLLGATE_*` variables, makes its calls, and prints JSON (or, for `generate --wait`, the files
//! it wrote) on stdout. Everything else goes to stderr: the progress indicator, and on failure one
//! line from the SDK's error (message, code, request id, attempts, what to do). The exit code
//! tells the class of failure apart, so scripts can branch on it; the table is
//! [`EXIT_CODES_HELP`], shown by `tollgate --help`.
//!
//! **Invariant:** retries, idempotency keys and backoff are the SDK's; this module never retries.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde::Serialize;
use tollgate_client::{
    AddCreditsRequest, AdminClient, Client, ClientBuilder, CreateAccountRequest,
    CreateGenerationRequest, ErrorKind, ImageSize, ListParams, RateLimit, Task, TaskStatus,
    DEFAULT_BASE_URL,
};

/// Shown at the end of `tollgate --help`.
pub const EXIT_CODES_HELP: &str = "\
Environment:
  TOLLGATE_BASE_URL     server of the client commands (default http://127.0.0.1:8080)
  TOLLGATE_API_KEY      API key of generate, tasks and account
  TOLLGATE_ADMIN_TOKEN  operator token of the admin commands (and of serve)
  TOLLGATE_LOG          log filter of the client commands, e.g. `info` to see every retry

Exit codes:
  0  success
  1  other failure: the task failed or was canceled, a conflict (409, e.g. a task that
     can no longer be canceled), a file could not be written
  2  usage: invalid arguments, or a request the server rejected as invalid (400, 405, 413, 415)
  3  authentication: missing or invalid API key or admin token (401, 403)
  4  insufficient credits (402)
  5  not found (404) or gone (410: older than the server's retention)
  6  rate limited (429) or busy (409 idempotency_key_in_use), still after every retry
  7  server or network: 5xx, connection failure, timeout (408 too: the upload was too slow),
     unreadable response";

/// Exit codes, one per class of failure (see [`EXIT_CODES_HELP`]).
mod exit {
    pub const OTHER: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const AUTH: u8 = 3;
    pub const CREDITS: u8 = 4;
    pub const NOT_FOUND_OR_GONE: u8 = 5;
    pub const RATE_LIMITED: u8 = 6;
    pub const SERVER_OR_NETWORK: u8 = 7;
}

#[derive(Subcommand)]
pub enum ClientCommand {
    /// Queue an image generation; with --wait (or --out), wait for it and write the PNG files.
    #[command(after_help = EXIT_CODES_HELP)]
    Generate(GenerateArgs),
    /// Get, list or cancel the tasks of the API key's account.
    #[command(after_help = EXIT_CODES_HELP)]
    Tasks {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: TasksCommand,
    },
    /// Show the API key's account: name, credits and rate limit.
    #[command(after_help = EXIT_CODES_HELP)]
    Account {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the models for sale, with their prices per size (what `generate --model` takes).
    #[command(after_help = EXIT_CODES_HELP)]
    Models {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Operator commands: accounts, keys, credits (with TOLLGATE_ADMIN_TOKEN).
    #[command(after_help = EXIT_CODES_HELP)]
    Admin {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

/// How a client command reaches the server and how hard it tries.
#[derive(Args)]
pub struct ConnArgs {
    /// Server base URL.
    #[arg(long, env = "TOLLGATE_BASE_URL", default_value = DEFAULT_BASE_URL, global = true)]
    base_url: String,
    /// Retries of a request after a retryable failure (429, 5xx, network); 0 disables them.
    #[arg(long, default_value_t = 5, global = true)]
    max_retries: u32,
    /// Overall deadline of each request, retries included (e.g. 30s, 2m); none by default.
    #[arg(long, value_name = "DURATION", value_parser = tollgate_server::parse_duration, global = true)]
    timeout: Option<Duration>,
}

impl ConnArgs {
    fn builder(&self) -> ClientBuilder {
        let mut b = ClientBuilder::new(self.base_url.clone()).max_retries(self.max_retries);
        if let Some(t) = self.timeout {
            b = b.deadline(t);
        }
        b
    }
}

#[derive(Args)]
pub struct ApiArgs {
    /// API key (tg_…); prefer TOLLGATE_API_KEY, as other users can see a process's flags.
    #[arg(long, env = "TOLLGATE_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    #[command(flatten)]
    conn: ConnArgs,
}

impl ApiArgs {
    fn client(&self) -> Result<Client, Failure> {
        let key = self
            .api_key
            .as_deref()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                Failure::new(
                    exit::AUTH,
                    "no API key: set TOLLGATE_API_KEY or pass --api-key",
                )
            })?;
        self.conn
            .builder()
            .api_key(key)
            .build()
            .map_err(Failure::from)
    }
}

#[derive(Args)]
pub struct AdminArgs {
    /// Operator token; prefer TOLLGATE_ADMIN_TOKEN, as other users can see a process's flags.
    #[arg(
        long,
        env = "TOLLGATE_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    admin_token: Option<String>,
    #[command(flatten)]
    conn: ConnArgs,
}

impl AdminArgs {
    fn client(&self) -> Result<AdminClient, Failure> {
        let token = self
            .admin_token
            .as_deref()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                Failure::new(
                    exit::AUTH,
                    "no admin token: set TOLLGATE_ADMIN_TOKEN or pass --admin-token",
                )
            })?;
        self.conn
            .builder()
            .admin_token(token)
            .build_admin()
            .map_err(Failure::from)
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    /// What to draw (1–4000 characters).
    prompt: String,
    /// The model (`tollgate models` lists them; default: the server's default model).
    #[arg(long, short = 'm')]
    model: Option<String>,
    /// Number of images, 1 to the model's max_n (server default 1).
    #[arg(long, short = 'n', value_parser = clap::value_parser!(u8).range(1..=4))]
    n: Option<u8>,
    /// Image size: 256x256, 512x512 (server default, when the model makes it) or 1024x1024.
    #[arg(long, value_parser = parse_size)]
    size: Option<ImageSize>,
    /// Seed, for a reproducible image.
    #[arg(long, allow_negative_numbers = true)]
    seed: Option<i64>,
    /// An http(s) URL that receives the finished task, signed (see `GET /v1/account/webhook-secret`).
    #[arg(long, value_name = "URL")]
    webhook_url: Option<String>,
    /// Wait until the task is done, showing its progress, then write its images.
    #[arg(long)]
    wait: bool,
    /// Directory for the PNG files (created if missing; default: the current directory). Implies --wait.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Idempotency-Key of the request (default: a new UUID). Reuse one to retry by hand without a second charge.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// The least time between two asks for the task's state while waiting (each ask is held by
    /// the server until the task finishes, up to 25 s).
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = tollgate_server::parse_duration)]
    poll_interval: Duration,
    #[command(flatten)]
    api: ApiArgs,
}

fn parse_size(s: &str) -> Result<ImageSize, String> {
    s.parse()
}

#[derive(Subcommand)]
pub enum TasksCommand {
    /// Show one task.
    Get {
        /// The task id (task_…).
        id: String,
    },
    /// List the account's tasks, newest first.
    List {
        /// Page size, 1–100 (server default 20).
        #[arg(long)]
        limit: Option<u32>,
        /// Start after this task id (the last one of the previous page).
        #[arg(long)]
        after: Option<String>,
    },
    /// Cancel a queued task; its cost is refunded.
    Cancel {
        /// The task id (task_…).
        id: String,
    },
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Create, list or show accounts.
    Accounts {
        #[command(subcommand)]
        command: AccountsCommand,
    },
    /// Create or revoke API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Change an account's balance.
    Credits {
        #[command(subcommand)]
        command: CreditsCommand,
    },
}

#[derive(Subcommand)]
pub enum AccountsCommand {
    /// Create an account; prints it with its first API key (shown this once).
    Create {
        /// The account's name.
        name: String,
        /// Opening balance.
        #[arg(long, default_value_t = 0)]
        credits: u64,
        /// Rate limit: sustained requests per minute (with --burst; default: the server's).
        #[arg(long, requires = "burst")]
        rpm: Option<u32>,
        /// Rate limit: burst (with --rpm).
        #[arg(long, requires = "rpm")]
        burst: Option<u32>,
    },
    /// List every account.
    List,
    /// Show one account.
    Show {
        /// The account id (acct_…).
        id: String,
    },
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create an API key for an account; prints it (shown this once).
    Create {
        /// The account id (acct_…).
        account_id: String,
        /// The most the key may spend per --spend-period, in credits.
        #[arg(long, value_name = "CREDITS")]
        spend_limit: Option<u64>,
        /// day, week, month (calendar, UTC) or total.
        #[arg(
            long,
            value_name = "PERIOD",
            default_value = "day",
            requires = "spend_limit"
        )]
        spend_period: String,
    },
    /// Revoke a key at once.
    Revoke {
        /// The key id (key_…), as printed by `keys create`.
        key_id: String,
    },
}

#[derive(Subcommand)]
pub enum CreditsCommand {
    /// Add credits (a negative amount corrects a balance, never below zero).
    Add {
        /// The account id (acct_…).
        account_id: String,
        /// Credits to add.
        #[arg(allow_negative_numbers = true)]
        amount: i64,
        /// Kept on the ledger entry.
        #[arg(long)]
        note: Option<String>,
        /// When the granted credits lapse (RFC 3339, e.g. 2027-01-31T00:00:00Z).
        #[arg(long, value_name = "TIME")]
        expires_at: Option<String>,
    },
}

/// Why a command failed: its exit code and the one line to print.
#[derive(Debug)]
struct Failure {
    code: u8,
    line: String,
}

impl Failure {
    fn new(code: u8, line: impl Into<String>) -> Self {
        Failure {
            code,
            line: line.into(),
        }
    }
}

impl From<tollgate_client::Error> for Failure {
    fn from(err: tollgate_client::Error) -> Self {
        Failure {
            code: exit_code(&err),
            line: err.to_string(),
        }
    }
}

/// The class of an SDK error, as an exit code.
fn exit_code(err: &tollgate_client::Error) -> u8 {
    match err.kind() {
        ErrorKind::Config(_) => exit::USAGE,
        ErrorKind::Paused => exit::RATE_LIMITED,
        ErrorKind::Transport(_) => exit::SERVER_OR_NETWORK,
        ErrorKind::Api(_) | ErrorKind::Decode(_) => match err.status().unwrap_or(0) {
            400 | 405 | 413 | 415 | 422 => exit::USAGE,
            401 | 403 => exit::AUTH,
            402 => exit::CREDITS,
            404 | 410 => exit::NOT_FOUND_OR_GONE,
            429 => exit::RATE_LIMITED,
            409 if err.is_retryable() => exit::RATE_LIMITED,
            408 | 500..=599 => exit::SERVER_OR_NETWORK,
            _ if err.is_decode() => exit::SERVER_OR_NETWORK,
            _ => exit::OTHER,
        },
        _ => exit::OTHER,
    }
}

/// Runs a client command to its exit code.
pub fn run(cmd: ClientCommand) -> ExitCode {
    init_logging();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::OTHER);
        }
    };
    match runtime.block_on(dispatch(cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.line);
            ExitCode::from(failure.code)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn dispatch(cmd: ClientCommand) -> Result<(), Failure> {
    match cmd {
        ClientCommand::Generate(args) => generate(args).await,
        ClientCommand::Tasks { api, command } => {
            let client = api.client()?;
            match command {
                TasksCommand::Get { id } => print_json(&client.get_task(&id).await?),
                TasksCommand::List { limit, after } => {
                    print_json(&client.list_tasks(&ListParams { limit, after }).await?)
                }
                TasksCommand::Cancel { id } => print_json(&client.cancel_task(&id).await?),
            }
        }
        ClientCommand::Account { api } => print_json(&api.client()?.account().await?),
        ClientCommand::Models { api } => print_json(&api.client()?.models().await?),
        ClientCommand::Admin { admin, command } => {
            let client = admin.client()?;
            match command {
                AdminCommand::Accounts { command } => match command {
                    AccountsCommand::Create {
                        name,
                        credits,
                        rpm,
                        burst,
                    } => {
                        let rate_limit = match (rpm, burst) {
                            (Some(requests_per_minute), Some(burst)) => Some(RateLimit {
                                requests_per_minute,
                                burst,
                            }),
                            _ => None,
                        };
                        let request = CreateAccountRequest {
                            name,
                            credits,
                            rate_limit,
                        };
                        print_json(&client.create_account(&request).await?)
                    }
                    AccountsCommand::List => {
                        print_json(&client.list_accounts(&ListParams::default()).await?)
                    }
                    AccountsCommand::Show { id } => print_json(&client.get_account(&id).await?),
                },
                AdminCommand::Keys { command } => match command {
                    KeysCommand::Create {
                        account_id,
                        spend_limit: None,
                        ..
                    } => print_json(&client.create_key(&account_id).await?),
                    KeysCommand::Create {
                        account_id,
                        spend_limit: Some(credits),
                        spend_period,
                    } => {
                        let period = spend_period
                            .parse()
                            .map_err(|e: String| Failure::new(exit::USAGE, e))?;
                        let request = tollgate_contract::CreateKeyRequest {
                            spend_limit: Some(tollgate_contract::SpendLimit { credits, period }),
                        };
                        print_json(&client.create_key_with(&account_id, &request).await?)
                    }
                    KeysCommand::Revoke { key_id } => {
                        client.revoke_key(&key_id).await?;
                        print_line(&format!("revoked {key_id}"))
                    }
                },
                AdminCommand::Credits { command } => match command {
                    CreditsCommand::Add {
                        account_id,
                        amount,
                        note,
                        expires_at,
                    } => {
                        let expires_at = expires_at
                            .map(|t| {
                                time::OffsetDateTime::parse(
                                    &t,
                                    &time::format_description::well_known::Rfc3339,
                                )
                                .map_err(|_| Failure::new(exit::USAGE, "--expires-at takes an RFC 3339 time, e.g. 2027-01-31T00:00:00Z"))
                            })
                            .transpose()?;
                        let request = AddCreditsRequest {
                            amount,
                            note,
                            expires_at,
                        };
                        print_json(&client.add_credits(&account_id, &request).await?)
                    }
                },
            }
        }
    }
}

async fn generate(args: GenerateArgs) -> Result<(), Failure> {
    let client = args.api.client()?;
    let request = CreateGenerationRequest {
        prompt: args.prompt,
        n: args.n,
        size: args.size,
        seed: args.seed,
        webhook_url: args.webhook_url,
        model: args.model,
    };
    let task = match &args.idempotency_key {
        Some(key) => client.create_generation_with_key(&request, key).await?,
        None => client.create_generation(&request).await?,
    };
    if !args.wait && args.out.is_none() {
        return print_json(&task);
    }
    let task = wait_with_progress(&client, &task, args.poll_interval).await?;
    match task.status {
        TaskStatus::Succeeded => {}
        TaskStatus::Failed => {
            let why = task.error.as_ref().map_or_else(
                || "no reason given".to_owned(),
                |e| format!("{} ({})", e.message, e.code),
            );
            return Err(Failure::new(
                exit::OTHER,
                format!("task {} failed: {why}; its cost was refunded", task.id),
            ));
        }
        other => {
            return Err(Failure::new(
                exit::OTHER,
                format!("task {} ended {other}", task.id),
            ))
        }
    }
    let dir = args.out.unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Failure::new(exit::OTHER, format!("cannot create {}: {e}", dir.display())))?;
    for index in 0..u32::try_from(task.images.len()).unwrap_or(u32::MAX) {
        let png = client.get_image(&task.id, index).await?;
        let path = dir.join(format!("{}-{index}.png", task.id));
        write_file(&path, &png)?;
        print_line(&path.display().to_string())?;
    }
    Ok(())
}

/// Polls the task until it is done, with a spinner on stderr (hidden when stderr is not a terminal).
async fn wait_with_progress(
    client: &Client,
    task: &Task,
    poll_interval: Duration,
) -> Result<Task, Failure> {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    let started = Instant::now();
    let describe = |t: &Task| {
        format!(
            "{} {} ({} × {}, {} credits)",
            t.id, t.status, t.n, t.size, t.cost
        )
    };
    bar.set_message(describe(task));
    let result = client
        .wait_for_task(&task.id, poll_interval, |t| {
            bar.set_message(format!(
                "{} — {}s",
                describe(t),
                started.elapsed().as_secs()
            ));
        })
        .await;
    bar.finish_and_clear();
    Ok(result?)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    std::fs::write(path, bytes)
        .map_err(|e| Failure::new(exit::OTHER, format!("cannot write {}: {e}", path.display())))
}

fn print_json<T: Serialize>(value: &T) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Failure::new(exit::OTHER, format!("cannot print the answer: {e}")))?;
    print_line(&text)
}

fn print_line(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(|e| Failure::new(exit::OTHER, format!("cannot write to stdout: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_client::ErrorCode;

    #[test]
    fn the_help_documents_every_exit_code() {
        for code in [
            exit::OTHER,
            exit::USAGE,
            exit::AUTH,
            exit::CREDITS,
            exit::NOT_FOUND_OR_GONE,
            exit::RATE_LIMITED,
            exit::SERVER_OR_NETWORK,
        ] {
            assert!(EXIT_CODES_HELP.contains(&format!("\n  {code}  ")), "{code}");
        }
    }

    #[test]
    fn every_contract_code_has_a_class() {
        // One class per status family; the statuses of the contract map as the help says.
        let expected = |c: ErrorCode| match c.status() {
            400 | 405 | 413 | 415 => exit::USAGE,
            401 | 403 => exit::AUTH,
            402 => exit::CREDITS,
            404 | 410 => exit::NOT_FOUND_OR_GONE,
            429 => exit::RATE_LIMITED,
            409 if c == ErrorCode::IdempotencyKeyInUse => exit::RATE_LIMITED,
            409 => exit::OTHER,
            _ => exit::SERVER_OR_NETWORK,
        };
        for code in ErrorCode::ALL {
            let body = serde_json::to_vec(&tollgate_client::ErrorBody::new(*code, "x")).unwrap();
            let err = api_error(code.status(), &body);
            assert_eq!(exit_code(&err), expected(*code), "{code}");
        }
    }

    /// An SDK error for a response, made the way the SDK makes it: through its retry loop.
    fn api_error(status: u16, body: &[u8]) -> tollgate_client::Error {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let retrier = tollgate_client::Retrier::new(tollgate_client::RetryPolicy {
            max_retries: 0,
            ..Default::default()
        });
        let call = tollgate_client::CallInfo {
            host: "h:1",
            label: "test",
            deadline: None,
        };
        let body = body.to_vec();
        rt.block_on(retrier.run(call, |_| {
            let body = body.clone();
            async move {
                Ok(tollgate_client::RawResponse {
                    status,
                    headers: Default::default(),
                    body: body.into(),
                })
            }
        }))
        .unwrap_err()
    }
}
