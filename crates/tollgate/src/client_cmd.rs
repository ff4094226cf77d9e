//! Client-side commands (owned by the SDK work): generate, tasks, account, admin.

use clap::Subcommand;
use std::process::ExitCode;

pub const EXIT_CODES_HELP: &str = "";

#[derive(Subcommand)]
pub enum ClientCommand {
    /// Show the account of TOLLGATE_API_KEY.
    Account,
}

pub fn run(_cmd: ClientCommand) -> ExitCode {
    eprintln!("not yet available");
    ExitCode::from(1)
}
