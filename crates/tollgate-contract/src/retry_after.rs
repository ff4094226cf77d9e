//! `Retry-After` in both forms of RFC 9110 §10.2.3: delay-seconds and HTTP-date.

use std::time::{Duration, SystemTime};

/// Formats a wait as whole seconds, rounded up and at least 1, so a client that obeys it is never early.
pub fn format(wait: Duration) -> String {
    whole_seconds_ceil(wait).to_string()
}

/// A wait in whole seconds, rounded up, never below 1.
pub fn whole_seconds_ceil(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// Parses a `Retry-After` value relative to `now`; a date in the past is a zero wait.
/// `None` for a value that is neither form (the caller falls back to its own backoff).
pub fn parse(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse::<u64>().ok().map(Duration::from_secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up_and_never_zero() {
        assert_eq!(format(Duration::from_millis(1)), "1");
        assert_eq!(format(Duration::ZERO), "1");
        assert_eq!(format(Duration::from_millis(1000)), "1");
        assert_eq!(format(Duration::from_millis(1001)), "2");
        assert_eq!(format(Duration::from_secs(59)), "59");
    }

    #[test]
    fn parses_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse(&later, now), Some(Duration::from_secs(30)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse("soon", now), None);
        assert_eq!(parse("-3", now), None);
        assert_eq!(parse("", now), None);
    }
}
