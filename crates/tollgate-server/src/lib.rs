//! tollgate's server: accounts, hashed API keys, a credit ledger, per-account rate limits and
//! asynchronous image-generation tasks, behind the contract's HTTP API.
//!
//! The map (see `docs/ARCHITECTURE.md`):
//! - [`domain`]: the rules, with no HTTP in them; [`domain::service::Tollgate`] is the facade.
//! - [`store`]: the [`store::Store`] trait and its engines (SQLite by default).
//! - [`images`]: where PNGs are kept.
//! - [`http`]: routes and middleware over the domain; the only place that speaks HTTP.
//! - [`error`]: the crate's one error type; `http::error` maps it to the envelope.
//! - [`server`]: assembly and lifecycle (start, serve, drain, stop).

pub mod config;
pub mod disk;
pub mod domain;
pub mod error;
pub mod http;
pub mod images;
pub mod metrics;
pub mod server;
pub mod store;

pub use config::{parse_duration, Config, Secret};
pub use domain::pricing::Prices;
pub use error::{Error, Result};
pub use server::Server;
