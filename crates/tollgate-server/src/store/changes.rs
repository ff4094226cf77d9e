//! What other instances change, as a shared store tells it.
//!
//! On a store of this process alone every change goes through this process's domain, which
//! updates its caches itself. On a store several instances share, another instance may revoke a
//! key, create one, change an account's limit or purge a task behind our back: the store tells
//! each instance through a [`ChangeSink`], and the domain's caches (`domain/caches.rs`) are
//! trusted only while that feed is known to be live.
//!
//! On PostgreSQL the feed is `LISTEN/NOTIFY`: triggers notify in the transaction that made the
//! change (so a change is told exactly when it commits, whoever made it), and every instance
//! sends a heartbeat every [`HEARTBEAT`] on the same channel. An instance that has heard nothing
//! for [`SILENCE`] (its notification connection broke, or went quiet) stops trusting its caches
//! until it hears again, and then starts them afresh.

use std::time::Duration;

/// How often each instance sends a heartbeat through the feed.
pub const HEARTBEAT: Duration = Duration::from_millis(250);

/// How long the feed may be silent before the caches that rely on it are not trusted: a change
/// whose notification was lost is acted on within this time, and it stays under one second.
pub const SILENCE: Duration = Duration::from_millis(900);

/// One change another instance (or this one) committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A key was created: a hash cached as unknown may now be a key.
    KeyCreated,
    /// A key's row changed (revoked, or its spend limit set).
    KeyChanged(String),
    /// An account's rate limit changed.
    AccountChanged(String),
    /// A task's data was purged (it is a tombstone now).
    TaskPurged(String),
}

impl Change {
    /// The change a notification's payload names (`key_created`, `key:ID`, `account:ID`,
    /// `purged:ID`); `None` for a heartbeat or anything else.
    pub fn parse(payload: &str) -> Option<Change> {
        if payload == "key_created" {
            return Some(Change::KeyCreated);
        }
        let (kind, id) = payload.split_once(':')?;
        let id = id.to_owned();
        match kind {
            "key" => Some(Change::KeyChanged(id)),
            "account" => Some(Change::AccountChanged(id)),
            "purged" => Some(Change::TaskPurged(id)),
            _ => None,
        }
    }
}

/// Where a shared store tells what it hears.
pub trait ChangeSink: Send + Sync {
    /// Something came through the feed (a change or a heartbeat): it is live now.
    fn heard(&self);
    /// A change was committed.
    fn changed(&self, change: Change);
    /// The feed broke: changes may have been missed since it was last heard.
    fn lost(&self);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_name_their_change() {
        assert_eq!(Change::parse("key_created"), Some(Change::KeyCreated));
        assert_eq!(
            Change::parse("key:key_1"),
            Some(Change::KeyChanged("key_1".into()))
        );
        assert_eq!(
            Change::parse("account:acct_1"),
            Some(Change::AccountChanged("acct_1".into()))
        );
        assert_eq!(
            Change::parse("purged:task_1"),
            Some(Change::TaskPurged("task_1".into()))
        );
        assert_eq!(Change::parse("ping"), None);
        assert_eq!(Change::parse("what:x"), None);
    }
}
