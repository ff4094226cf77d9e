//! The domain: what tollgate does, with no knowledge of HTTP.
//!
//! [`Tollgate`](service::Tollgate) is the facade the HTTP layer calls. It validates input, checks
//! the rules of the contract (who owns a task, when it expires, what it costs) and delegates
//! persistence to a [`Store`](crate::store::Store). The HTTP layer turns its answers into JSON.

pub mod backends;
pub mod caches;
pub mod catalogue;
pub mod clock;
pub mod generator;
pub mod idempotency;
pub mod links;
pub mod pricing;
pub mod purge;
pub mod ratelimit;
pub mod secrets;
pub mod service;
pub mod sessions;
pub mod stripe;
pub mod usage;
pub mod vouchers;
pub mod waiting;
pub mod webhooks;
pub mod worker;
