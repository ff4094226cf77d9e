//! Signed image links: `images[].url` of a succeeded task, which works without the API key
//! until it expires, so a browser (an `<img>`, a `fetch`) can show a result without a proxy.
//!
//! A link is `/v1/links/{task}/{index}.png?expires=<unix seconds>&signature=<hex>`, the
//! signature an HMAC-SHA256 of the task id, the index and the expiry under a key every instance
//! of a deployment shares (made once and kept in the store). Altering any part breaks the
//! signature, which is checked first: a forged or altered link is 404, an authentic one past its
//! expiry 410.
//!
//! The expiry is `now + ttl` rounded up to a *window* (a twentieth of the ttl, 1 s to 60 s), so
//! that a link lives at least the ttl and the views of a finished task polled again and again
//! stay the same for a window, which lets them be made and serialised once per window.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::Duration;
use time::OffsetDateTime;
use tollgate_contract::webhook::{hex, unhex};

type HmacSha256 = Hmac<Sha256>;

/// The path under which the links are served.
pub const LINK_PREFIX: &str = "/v1/links/";

/// Why a link is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRefusal {
    /// Not a link this deployment made (forged, altered, or made under another key).
    Forged,
    /// Authentic, and past its expiry.
    Expired,
}

pub struct ImageLinks {
    key: Vec<u8>,
    ttl: Duration,
    window: i64,
}

impl std::fmt::Debug for ImageLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageLinks")
            .field("key", &"[redacted]")
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl ImageLinks {
    /// Links signed with `key`, valid for at least `ttl`.
    pub fn new(key: &[u8], ttl: Duration) -> ImageLinks {
        let window = (ttl.as_secs() / 20).clamp(1, 60);
        ImageLinks {
            key: key.to_vec(),
            ttl,
            window: i64::try_from(window).unwrap_or(60),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The expiry a link made at `now` gets: `now + ttl`, rounded up to the window.
    pub fn expires(&self, now: OffsetDateTime) -> i64 {
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX / 4);
        let at = now.unix_timestamp().saturating_add(ttl);
        at.div_euclid(self.window)
            .saturating_add(1)
            .saturating_mul(self.window)
    }

    /// The link to image `index` of `task_id`, made at `now`: a path, to be put after the
    /// server's base URL.
    pub fn path(&self, task_id: &str, index: u8, now: OffsetDateTime) -> String {
        let expires = self.expires(now);
        format!(
            "{LINK_PREFIX}{task_id}/{index}.png?expires={expires}&signature={}",
            self.signature(task_id, index, expires)
        )
    }

    fn mac(&self, task_id: &str, index: u8, expires: i64) -> HmacSha256 {
        // HMAC takes keys of any length, so this never falls back.
        let mut mac = HmacSha256::new_from_slice(&self.key)
            .unwrap_or_else(|_| <HmacSha256 as hmac::digest::KeyInit>::new(&Default::default()));
        mac.update(format!("tollgate image link\n{task_id}\n{index}\n{expires}").as_bytes());
        mac
    }

    fn signature(&self, task_id: &str, index: u8, expires: i64) -> String {
        hex(&self.mac(task_id, index, expires).finalize().into_bytes())
    }

    /// Whether the link's parts are one this deployment made and it is still valid at `now`:
    /// the seconds it has left.
    pub fn check(
        &self,
        task_id: &str,
        index: u8,
        expires: &str,
        signature: &str,
        now: OffsetDateTime,
    ) -> Result<u64, LinkRefusal> {
        let expires: i64 = expires.parse().map_err(|_| LinkRefusal::Forged)?;
        let signature = unhex(signature).ok_or(LinkRefusal::Forged)?;
        // Constant-time comparison.
        self.mac(task_id, index, expires)
            .verify_slice(&signature)
            .map_err(|_| LinkRefusal::Forged)?;
        let left = expires - now.unix_timestamp();
        u64::try_from(left)
            .ok()
            .filter(|&left| left > 0)
            .ok_or(LinkRefusal::Expired)
    }
}

/// Puts `base` (`https://host[:port]`, no trailing slash) before the task's image links, which
/// the domain makes as paths: what clients and webhook receivers get are absolute URLs.
pub fn absolute(task: &mut tollgate_contract::Task, base: &str) {
    for image in &mut task.images {
        if image.url.starts_with('/') {
            image.url.insert_str(0, base);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(unix: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(unix).unwrap()
    }

    fn parts(path: &str) -> (String, u8, String, String) {
        let rest = path.strip_prefix(LINK_PREFIX).unwrap();
        let (file, query) = rest.split_once('?').unwrap();
        let (task, index) = file.split_once('/').unwrap();
        let index = index.strip_suffix(".png").unwrap().parse().unwrap();
        let (expires, signature) = query.split_once('&').unwrap();
        (
            task.to_owned(),
            index,
            expires.strip_prefix("expires=").unwrap().to_owned(),
            signature.strip_prefix("signature=").unwrap().to_owned(),
        )
    }

    #[test]
    fn a_link_lives_at_least_the_ttl_and_at_most_a_window_more() {
        let links = ImageLinks::new(b"k", Duration::from_secs(3600));
        for now in [1_000_000, 1_000_001, 1_000_059, 1_000_060] {
            let expires = links.expires(at(now));
            assert!(expires >= now + 3600 && expires <= now + 3600 + 60, "{now}");
            assert_eq!(expires % 60, 0);
        }
        // Within a window, the same link.
        assert_eq!(
            links.path("task_a", 0, at(1_000_001)),
            links.path("task_a", 0, at(1_000_002))
        );
    }

    #[test]
    fn an_authentic_link_passes_until_it_expires() {
        let links = ImageLinks::new(b"secret", Duration::from_secs(10));
        let (task, index, expires, signature) = parts(&links.path("task_a", 1, at(100)));
        assert_eq!((task.as_str(), index), ("task_a", 1));
        let left = links
            .check(&task, index, &expires, &signature, at(100))
            .unwrap();
        assert!((10..=11).contains(&left), "{left}");
        let end: i64 = expires.parse().unwrap();
        assert_eq!(
            links.check(&task, index, &expires, &signature, at(end)),
            Err(LinkRefusal::Expired)
        );
    }

    #[test]
    fn any_change_is_a_forgery() {
        let links = ImageLinks::new(b"secret", Duration::from_secs(10));
        let (task, index, expires, signature) = parts(&links.path("task_a", 1, at(100)));
        let later = (expires.parse::<i64>().unwrap() + 3600).to_string();
        let mut flipped = signature.clone().into_bytes();
        flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        for (t, i, e, s) in [
            ("task_b", index, expires.as_str(), signature.as_str()),
            (task.as_str(), 0, expires.as_str(), signature.as_str()),
            (task.as_str(), index, later.as_str(), signature.as_str()),
            (task.as_str(), index, expires.as_str(), flipped.as_str()),
            (task.as_str(), index, expires.as_str(), "zz"),
            (task.as_str(), index, "soon", signature.as_str()),
        ] {
            assert_eq!(
                links.check(t, i, e, s, at(100)),
                Err(LinkRefusal::Forged),
                "{t} {i} {e} {s}"
            );
        }
        // Another deployment's key: a forgery too, even when expired.
        let other = ImageLinks::new(b"other", Duration::from_secs(10));
        assert_eq!(
            other.check(&task, index, &expires, &signature, at(10_000)),
            Err(LinkRefusal::Forged)
        );
    }
}
