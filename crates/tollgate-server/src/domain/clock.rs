//! The domain's clock: the system's in production, a settable one in tests, so that expiry,
//! retention, sessions, idempotency and vouchers can be tested without sleeping.
//!
//! Times are truncated to milliseconds, so a value survives a round trip through either store
//! unchanged.

use std::sync::Mutex;
use std::time::Duration;
use time::OffsetDateTime;

/// What time it is, for the domain.
pub trait Clock: Send + Sync {
    fn now(&self) -> OffsetDateTime;
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        system_now()
    }
}

/// The system's time now, truncated to milliseconds (the storage's resolution).
pub fn system_now() -> OffsetDateTime {
    crate::store::from_millis(crate::store::to_millis(OffsetDateTime::now_utc()))
}

/// A clock that moves only when told to (tests).
#[derive(Debug)]
pub struct ManualClock {
    at: Mutex<OffsetDateTime>,
}

impl ManualClock {
    /// Starts at the system's time now.
    pub fn new() -> ManualClock {
        ManualClock {
            at: Mutex::new(system_now()),
        }
    }

    pub fn advance(&self, by: Duration) {
        if let Ok(mut at) = self.at.lock() {
            *at += by;
        }
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        self.at.lock().map_or_else(|_| system_now(), |at| *at)
    }
}
