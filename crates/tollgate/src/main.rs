//! The `tollgate` binary: glue over the library crates.
//!
//! `serve` runs the server ([`tollgate_server`]); every other command is a client of a running
//! server through the SDK ([`tollgate_client`]). Errors print as one line and exit with a code per
//! class (see `tollgate --help`).

mod client_cmd;
mod serve_cmd;

use clap::{Parser, Subcommand};

// The server allocates a few small buffers per request; glibc's malloc/free took ~13% of the
// CPU of the 429 path in a profile. mimalloc is built for exactly this.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "tollgate", version, about = "Self-hosted API platform for paid, asynchronous image generation", after_help = client_cmd::EXIT_CODES_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start and matched at once: the size of its variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the server (SQLite and files under --data-dir by default).
    Serve(serve_cmd::ServeArgs),
    #[command(flatten)]
    Client(client_cmd::ClientCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve_cmd::run(args),
        Command::Client(cmd) => client_cmd::run(cmd),
    }
}
