//! Usage: credits spent per day and per account, read from the ledger (charges minus refunds).

use crate::domain::service::Tollgate;
use crate::error::Result;
use std::collections::HashMap;
use time::{Date, Duration, OffsetDateTime, Time};
use tollgate_contract::Account;

/// Credits spent on one UTC day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaySpend {
    pub day: Date,
    pub credits: u64,
}

/// An account and what it spent over a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountUsage {
    pub account: Account,
    pub spent: u64,
}

/// Midnight (UTC) starting the window of the last `days` days, today (`now`'s day) included.
fn window_start(now: OffsetDateTime, days: u16) -> OffsetDateTime {
    let today = now.date();
    let first = today - Duration::days(i64::from(days.max(1)) - 1);
    first.with_time(Time::MIDNIGHT).assume_utc()
}

impl Tollgate {
    /// The account's spend on each of the last `days` UTC days (today included), oldest first,
    /// with a zero for days without any. A refund that lands on a later day than its charge
    /// can make a day's net negative; it counts as zero.
    pub async fn spend_per_day(&self, account_id: &str, days: u16) -> Result<Vec<DaySpend>> {
        let start = window_start(self.now(), days);
        let spent: HashMap<Date, i64> = self
            .store
            .daily_spend(account_id, start)
            .await?
            .into_iter()
            .map(|d| (d.day, d.credits))
            .collect();
        Ok((0..i64::from(days.max(1)))
            .map(|i| {
                let day = start.date() + Duration::days(i);
                DaySpend {
                    day,
                    credits: u64::try_from(spent.get(&day).copied().unwrap_or(0)).unwrap_or(0),
                }
            })
            .collect())
    }

    /// Every account with what it spent over the last `days` UTC days (today included).
    pub async fn accounts_with_usage(&self, days: u16) -> Result<Vec<AccountUsage>> {
        let spent: HashMap<String, i64> = self
            .store
            .spend_by_account(window_start(self.now(), days))
            .await?
            .into_iter()
            .collect();
        Ok(self
            .store
            .list_accounts()
            .await?
            .iter()
            .map(|record| AccountUsage {
                account: self.account_view(record),
                spent: u64::try_from(spent.get(&record.id).copied().unwrap_or(0)).unwrap_or(0),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_starts_at_midnight_days_ago() {
        let now = time::macros::datetime!(2026-12-04 23:59:59 UTC);
        let start = window_start(now, 30);
        assert_eq!(start.time(), Time::MIDNIGHT);
        assert_eq!(start.date(), time::macros::date!(2026 - 11 - 05));
        assert_eq!(window_start(now, 1).date(), now.date());
    }
}
