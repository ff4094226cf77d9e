//! The host pause: one 429 with `Retry-After` holds back the client's other requests to that host.
//!
//! The rate limit is per account, so when one request of a client learns that the server wants
//! no more requests for 5 s, every other request of that client would learn the same thing the
//! hard way — each spending a request and a retry on it. [`HostPause`] remembers, per host, the
//! instant until which requests wait; the retry loop consults it before every attempt, the first
//! included, and adds its own jitter on top so the paused requests do not all leave at once.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::time::Instant;

/// Per-host "paused until" instants, shared by every request of one client.
#[derive(Debug, Default)]
pub struct HostPause {
    until: Mutex<HashMap<String, Instant>>,
}

impl HostPause {
    pub fn new() -> Self {
        HostPause::default()
    }

    /// Pauses `host` until `until`, unless it is already paused for longer.
    pub fn pause(&self, host: &str, until: Instant) {
        let mut map = self
            .until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = map.entry(host.to_owned()).or_insert(until);
        if *entry < until {
            *entry = until;
        }
    }

    /// The instant `host` is paused until, if that is still ahead.
    pub fn paused_until(&self, host: &str) -> Option<Instant> {
        let mut map = self
            .until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        match map.get(host) {
            Some(until) if *until > now => Some(*until),
            Some(_) => {
                map.remove(host);
                None
            }
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn keeps_the_longest_pause_and_forgets_it_after() {
        let p = HostPause::new();
        let t0 = Instant::now();
        assert_eq!(p.paused_until("h:1"), None);
        p.pause("h:1", t0 + Duration::from_secs(5));
        p.pause("h:1", t0 + Duration::from_secs(2));
        assert_eq!(p.paused_until("h:1"), Some(t0 + Duration::from_secs(5)));
        assert_eq!(p.paused_until("other:1"), None);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(p.paused_until("h:1"), None);
    }
}
