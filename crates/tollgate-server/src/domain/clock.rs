//! The domain's clock: the system's in production, a settable one in tests, so that expiry,
//! retention, sessions, idempotency and vouchers can be tested without sleeping.
//!
//! Times are truncated to milliseconds (as `store::now` does), so a value survives a round trip
//! through either store unchanged.

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
        crate::store::now()
    }
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
            at: Mutex::new(crate::store::now()),
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
        self.at
            .lock()
            .map_or_else(|_| crate::store::now(), |at| *at)
    }
}
