//! In-process caches that spare the hot read paths a database round trip, exactly.
//!
//! [`KeyCache`]: API-key lookups without a round trip, with revocation still reaching every
//! instance within a second.
//! [`FinishedTasks`]: tasks in a final state, which never change again (expiry is computed from
//! `created_at` at read time, so a cached task still answers 410 once it is old enough).
//!
//! Every authenticated request must know its key's account and limit; reading them from the store
//! costs a round trip (on SQLite, a hop to the connection's thread and back; on PostgreSQL, the
//! network), more than the rest of a 401 or 429. The cache keeps the answers by key hash,
//! known-live and known-unknown alike.
//!
//! **Why it is exact:** every change that could alter an answer is told to the cache. On a store
//! of this process alone (SQLite) every change goes through [`Tollgate`](super::service::Tollgate),
//! which tells the cache before it returns. On a store shared by several instances
//! (PostgreSQL) the store's change feed tells every instance ([`SharedCaches`], the
//! `ChangeSink`), and the key cache is used only while that feed is [`Freshness::fresh`]: heard
//! within `store::changes::SILENCE`. A feed that broke or went quiet means changes may have been
//! missed: the cache answers nothing until the feed is heard again, and then starts empty.

use crate::store::changes::{self, Change, ChangeSink};
use crate::store::{KeyAuth, TaskRecord};
use dashmap::{DashMap, DashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tollgate_contract::Task;

/// How many unknown key hashes are remembered before the set starts over: random keys from a
/// scanner must not grow memory without bound.
const MAX_UNKNOWN: usize = 10_000;

/// The hasher of the hot maps (key cache, rate limits): seeded per process like std's, but a
/// fraction of SipHash's cost on every authenticated request.
pub type FastHash = foldhash::fast::RandomState;

/// A key's SHA-256 (see [`secrets::key_digest`](super::secrets::key_digest)).
pub type KeyDigest = [u8; 32];

/// Answers of past lookups, by key hash.
///
/// A lookup that started before a change must not store its (now stale) answer after the change
/// was applied: every change bumps `epoch` before it removes entries, and an answer is kept only
/// if the epoch it was read under is still current once it is in (otherwise it is taken out again).
#[derive(Default)]
pub struct KeyCache {
    live: DashMap<KeyDigest, KeyAuth, FastHash>,
    unknown: DashSet<KeyDigest, FastHash>,
    epoch: AtomicU64,
    /// On a shared store: whether its change feed is live; the cache is used only while it is.
    feed: Option<Arc<Freshness>>,
}

/// Whether a shared store's change feed has been heard lately.
pub struct Freshness {
    origin: Instant,
    /// When the feed was last heard, in milliseconds since `origin`, plus one; 0: not since it
    /// was (re)started.
    heard: AtomicU64,
}

impl Default for Freshness {
    fn default() -> Self {
        Freshness {
            origin: Instant::now(),
            heard: AtomicU64::new(0),
        }
    }
}

impl Freshness {
    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// Heard within `changes::SILENCE`.
    pub fn fresh(&self) -> bool {
        let heard = self.heard.load(Ordering::Acquire);
        let silence = u64::try_from(changes::SILENCE.as_millis()).unwrap_or(u64::MAX);
        heard != 0 && self.now().saturating_sub(heard) < silence
    }

    fn touch(&self) {
        self.heard.store(self.now(), Ordering::Release);
    }

    fn lose(&self) {
        self.heard.store(0, Ordering::Release);
    }
}

/// What the cache knows of a key hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    Live(KeyAuth),
    Unknown,
    Miss,
}

impl KeyCache {
    /// A cache over a shared store, used only while `feed` is fresh.
    pub fn following(feed: Arc<Freshness>) -> Self {
        KeyCache {
            feed: Some(feed),
            ..KeyCache::default()
        }
    }

    fn trusted(&self) -> bool {
        self.feed.as_ref().is_none_or(|feed| feed.fresh())
    }

    pub fn get(&self, key_hash: &KeyDigest) -> Cached {
        if !self.trusted() {
            return Cached::Miss;
        }
        if let Some(auth) = self.live.get(key_hash) {
            return Cached::Live(auth.clone());
        }
        if self.unknown.contains(key_hash) {
            return Cached::Unknown;
        }
        Cached::Miss
    }

    /// The epoch to pass to [`KeyCache::remember`]: read it before asking the store.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Remembers what the store answered for `key_hash`, unless something changed since `epoch`.
    pub fn remember(&self, epoch: u64, key_hash: &KeyDigest, auth: Option<&KeyAuth>) {
        if self.epoch() != epoch || !self.trusted() {
            return;
        }
        match auth {
            Some(auth) => {
                self.live.insert(*key_hash, auth.clone());
            }
            None => {
                if self.unknown.len() >= MAX_UNKNOWN {
                    self.unknown.clear();
                }
                self.unknown.insert(*key_hash);
            }
        }
        if self.epoch() != epoch {
            self.live.remove(key_hash);
            self.unknown.remove(key_hash);
        }
    }

    fn bump(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// A key was revoked (call after the store committed it).
    pub fn forget_key(&self, key_id: &str) {
        self.bump();
        self.live.retain(|_, auth| auth.key_id != key_id);
    }

    /// An account's limit (or anything else a lookup returns) changed.
    pub fn forget_account(&self, account_id: &str) {
        self.bump();
        self.live.retain(|_, auth| auth.account_id != account_id);
    }

    /// A key was created: its hash may be in the unknown set (someone tried it before it existed).
    pub fn forget_unknown(&self) {
        self.bump();
        self.unknown.clear();
    }

    /// Everything: changes may have been missed.
    pub fn forget_all(&self) {
        self.bump();
        self.live.clear();
        self.unknown.clear();
    }
}

/// The caches a shared store's change feed keeps exact (the store's `ChangeSink`).
pub struct SharedCaches {
    pub feed: Arc<Freshness>,
    pub keys: Arc<KeyCache>,
    pub tasks: Arc<FinishedTasks>,
}

impl ChangeSink for SharedCaches {
    fn heard(&self) {
        if !self.feed.fresh() {
            // Back after a silence or a break: what was cached before may have changed.
            self.keys.forget_all();
        }
        self.feed.touch();
    }

    fn changed(&self, change: Change) {
        match change {
            Change::KeyCreated => self.keys.forget_unknown(),
            Change::KeyChanged(key_id) => self.keys.forget_key(&key_id),
            Change::AccountChanged(account_id) => self.keys.forget_account(&account_id),
            Change::TaskPurged(task_id) => self.tasks.forget(&[task_id]),
        }
    }

    fn lost(&self) {
        self.feed.lose();
        self.keys.forget_all();
    }
}

/// How many finished tasks are kept before the cache starts over.
const MAX_FINISHED: usize = 20_000;

/// Tasks that reached a final state, by id. They never change again, on any instance, so this
/// needs no feed; the purge (here, or told by the feed) forgets what it turns into tombstones.
#[derive(Default)]
pub struct FinishedTasks {
    tasks: DashMap<String, Arc<FinishedTask>>,
}

/// A task in a final state, and its view once it was asked for.
pub struct FinishedTask {
    pub record: TaskRecord,
    /// The task as the API shows it, for a task without a webhook (whose delivery state still
    /// changes), with the link expiry it was made for: polling clients ask for the same view
    /// again and again, and get this one `Arc` until the links' window moves on (the HTTP layer
    /// keeps its JSON beside it).
    view: Mutex<Option<(i64, Arc<Task>)>>,
}

impl FinishedTask {
    /// The view for the link expiry `window`: the kept one, or a new one made by `make`.
    pub fn view(&self, window: i64, make: impl FnOnce() -> Task) -> Arc<Task> {
        let mut kept = self
            .view
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match &*kept {
            Some((at, view)) if *at == window => Arc::clone(view),
            _ => {
                let view = Arc::new(make());
                *kept = Some((window, Arc::clone(&view)));
                view
            }
        }
    }
}

impl FinishedTasks {
    pub fn get(&self, id: &str) -> Option<Arc<FinishedTask>> {
        self.tasks.get(id).map(|t| Arc::clone(&t))
    }

    /// Keeps `task` if it is final and not purged.
    pub fn remember(&self, task: &TaskRecord) {
        if task.status.is_terminal() && !task.purged {
            if self.tasks.len() >= MAX_FINISHED {
                self.tasks.clear();
            }
            let entry = FinishedTask {
                record: task.clone(),
                view: Mutex::new(None),
            };
            self.tasks.insert(task.id.clone(), Arc::new(entry));
        }
    }

    pub fn forget(&self, ids: &[String]) {
        for id in ids {
            self.tasks.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(key: &str) -> KeyDigest {
        crate::domain::secrets::key_digest(key)
    }

    fn auth(key: &str, account: &str) -> KeyAuth {
        KeyAuth {
            key_id: key.into(),
            account_id: account.into(),
            rate_limit: None,
            spend_limit: None,
        }
    }

    #[test]
    fn remembers_and_forgets() {
        let cache = KeyCache::default();
        assert_eq!(cache.get(&d("h1")), Cached::Miss);
        let e = cache.epoch();
        cache.remember(e, &d("h1"), Some(&auth("k1", "a1")));
        cache.remember(e, &d("h2"), Some(&auth("k2", "a1")));
        cache.remember(e, &d("h3"), None);
        assert_eq!(cache.get(&d("h1")), Cached::Live(auth("k1", "a1")));
        assert_eq!(cache.get(&d("h3")), Cached::Unknown);
        cache.forget_key("k1");
        assert_eq!(cache.get(&d("h1")), Cached::Miss);
        assert_eq!(cache.get(&d("h2")), Cached::Live(auth("k2", "a1")));
        cache.forget_account("a1");
        assert_eq!(cache.get(&d("h2")), Cached::Miss);
        cache.forget_unknown();
        assert_eq!(cache.get(&d("h3")), Cached::Miss);
    }

    #[test]
    fn an_answer_read_before_a_change_is_not_kept() {
        let cache = KeyCache::default();
        let before = cache.epoch();
        // A revocation lands while the lookup is in flight...
        cache.forget_key("k1");
        // ...so the lookup's answer (still live when it was read) is dropped.
        cache.remember(before, &d("h1"), Some(&auth("k1", "a1")));
        assert_eq!(cache.get(&d("h1")), Cached::Miss);
        cache.remember(cache.epoch(), &d("h1"), None);
        assert_eq!(cache.get(&d("h1")), Cached::Unknown);
    }

    #[test]
    fn the_unknown_set_is_bounded() {
        let cache = KeyCache::default();
        for i in 0..(MAX_UNKNOWN + 5) {
            cache.remember(cache.epoch(), &d(&format!("h{i}")), None);
        }
        assert!(cache.unknown.len() <= MAX_UNKNOWN);
    }

    #[test]
    fn on_a_shared_store_the_cache_is_used_only_while_the_feed_is_heard() {
        let feed = Arc::new(Freshness::default());
        let caches = SharedCaches {
            feed: Arc::clone(&feed),
            keys: Arc::new(KeyCache::following(Arc::clone(&feed))),
            tasks: Arc::new(FinishedTasks::default()),
        };
        let keys = &caches.keys;
        // Never heard: nothing is kept or answered.
        keys.remember(keys.epoch(), &d("k1"), Some(&auth("key_1", "a1")));
        assert_eq!(keys.get(&d("k1")), Cached::Miss);

        caches.heard();
        keys.remember(keys.epoch(), &d("k1"), Some(&auth("key_1", "a1")));
        keys.remember(keys.epoch(), &d("k2"), Some(&auth("key_2", "a2")));
        assert!(matches!(keys.get(&d("k1")), Cached::Live(_)));

        // A revocation another instance made.
        caches.changed(Change::KeyChanged("key_1".into()));
        assert_eq!(keys.get(&d("k1")), Cached::Miss);
        assert!(matches!(keys.get(&d("k2")), Cached::Live(_)));

        // The feed broke: nothing answered, and once it is heard again the cache starts empty.
        caches.lost();
        assert_eq!(keys.get(&d("k2")), Cached::Miss);
        caches.heard();
        assert_eq!(keys.get(&d("k2")), Cached::Miss);
    }

    #[test]
    fn a_lookup_read_before_the_feed_broke_is_not_kept_after() {
        let feed = Arc::new(Freshness::default());
        let caches = SharedCaches {
            feed: Arc::clone(&feed),
            keys: Arc::new(KeyCache::following(Arc::clone(&feed))),
            tasks: Arc::new(FinishedTasks::default()),
        };
        caches.heard();
        let epoch = caches.keys.epoch();
        caches.lost();
        caches.heard();
        caches
            .keys
            .remember(epoch, &d("k1"), Some(&auth("key_1", "a1")));
        assert_eq!(caches.keys.get(&d("k1")), Cached::Miss);
    }
}
