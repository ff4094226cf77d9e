//! The retention job: on a schedule, drops the data of expired tasks and keeps their tombstones,
//! so an expired id answers 410 for as long as the server runs, across restarts.

use crate::domain::service::Tollgate;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Runs the purge once now and then every `config.effective_purge_interval()` until `stop`.
pub fn spawn(app: Arc<Tollgate>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let interval = app.config().effective_purge_interval();
        match app.collect_orphan_images().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                tasks = n,
                "removed the images of tasks the store does not have"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not sweep orphaned images; the next start tries again")
            }
        }
        loop {
            match app.purge_expired().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(purged = n, "retention purge removed expired tasks' data"),
                Err(e) => tracing::error!(error = %e, "retention purge failed; it will run again"),
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.changed() => break,
            }
        }
    })
}

/// How often credits past their expiry are taken from the balances.
const EXPIRY_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs the credit expiry every second until `stop`: what lapsed leaves the balance with an
/// `expiry` ledger entry. (Charges and balance reads settle an account's due credits themselves,
/// so a late round never lets lapsed credits be spent or shown.)
pub fn spawn_credit_expiry(app: Arc<Tollgate>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match app.expire_credits().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(accounts = n, "expired credits left the balances"),
                Err(e) => tracing::warn!(error = %e, "credit expiry failed; it will run again"),
            }
            tokio::select! {
                _ = tokio::time::sleep(EXPIRY_EVERY) => {}
                _ = stop.changed() => break,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    //! A purge that fails half-way (here: the image store breaks after a few deletions, as a
    //! crash would stop it) leaves no tombstone without its images gone, and the next run, in
    //! a new process over the same data, finishes it.
    #![allow(clippy::unwrap_used)]

    use crate::config::Config;
    use crate::domain::clock::system_now as now;
    use crate::domain::ratelimit::{Limiter, RateLimits};
    use crate::domain::service::Tollgate;
    use crate::error::{Error, Result};
    use crate::images::{DiskImageStore, ImageStore};
    use crate::store::sqlite::SqliteStore;
    use crate::store::{KeyRecord, NewAccount, Store, TaskRecord};
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use tollgate_contract::{ImageSize, TaskStatus};

    /// Disk images whose deletions fail after the first `budget`.
    struct Breaking {
        disk: DiskImageStore,
        budget: AtomicUsize,
    }

    #[async_trait]
    impl ImageStore for Breaking {
        async fn put(&self, task_id: &str, index: u8, png: Vec<u8>) -> Result<()> {
            self.disk.put(task_id, index, png).await
        }
        async fn get(&self, task_id: &str, index: u8) -> Result<Option<Vec<u8>>> {
            self.disk.get(task_id, index).await
        }
        async fn task_ids(&self) -> Result<Vec<String>> {
            self.disk.task_ids().await
        }
        async fn delete_task(&self, task_id: &str) -> Result<()> {
            let left = self.budget.load(Ordering::SeqCst);
            if left == 0 {
                return Err(Error::internal("the disk went away"));
            }
            self.budget.store(left - 1, Ordering::SeqCst);
            self.disk.delete_task(task_id).await
        }
    }

    fn app(store: Arc<dyn Store>, images: Arc<dyn ImageStore>, dir: &std::path::Path) -> Tollgate {
        let config = Config {
            retention: Duration::from_secs(3600),
            ..Config::new(dir)
        };
        Tollgate::new(
            config,
            store,
            images,
            Limiter::Local(RateLimits::default()),
            "0".repeat(64),
        )
    }

    #[tokio::test]
    async fn an_interrupted_purge_resumes_and_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).await.unwrap());
        let account = NewAccount {
            id: "acct_purge".into(),
            name: "purge".into(),
            credits: 100,
            rate_limit: None,
            created_at: now(),
            webhook_secret: None,
        };
        let key = KeyRecord {
            id: "key_purge".into(),
            account_id: account.id.clone(),
            key_hash: "1".repeat(64),
            prefix: "tg_purge".into(),
            created_at: now(),
            revoked_at: None,
            spend_limit: None,
        };
        store.create_account(&account, &key).await.unwrap();
        let root = dir.path().join("images");
        let disk = DiskImageStore::new(&root).unwrap();
        let two_hours_ago = now() - Duration::from_secs(7200);
        let mut ids = Vec::new();
        for i in 0..5 {
            let task = TaskRecord {
                id: format!("task_{i:024}"),
                account_id: account.id.clone(),
                status: TaskStatus::Queued,
                prompt: format!("old {i}"),
                n: 1,
                size: ImageSize::S256,
                seed: 1,
                cost: 1,
                created_at: two_hours_ago,
                ..TaskRecord::default()
            };
            store.create_task(&task, None).await.unwrap();
            disk.put(&task.id, 0, vec![1, 2, 3]).await.unwrap();
            ids.push(task.id);
        }

        // First run: breaks after two deletions, mid-batch.
        let breaking = Arc::new(Breaking {
            disk: DiskImageStore::new(&root).unwrap(),
            budget: AtomicUsize::new(2),
        });
        let first = app(Arc::clone(&store), breaking, dir.path());
        assert!(first.purge_expired().await.is_err());
        let gone = ids.iter().filter(|id| !root.join(id).exists()).count();
        assert_eq!(gone, 2, "two tasks' images went before it broke");
        for id in &ids {
            assert!(
                !store.get_task(id).await.unwrap().unwrap().purged,
                "no tombstone is marked before its whole batch is deleted"
            );
        }

        // Next start: the same data, a working image store. The purge resumes and finishes.
        let second = app(Arc::clone(&store), Arc::new(disk), dir.path());
        assert_eq!(second.purge_expired().await.unwrap(), 5);
        for id in &ids {
            assert!(store.get_task(id).await.unwrap().unwrap().purged);
            assert!(!root.join(id).exists());
        }
        assert_eq!(
            second.purge_expired().await.unwrap(),
            0,
            "nothing left to do"
        );
        // They expired in the queue: cancelled and refunded, once.
        assert_eq!(
            store
                .get_account("acct_purge")
                .await
                .unwrap()
                .unwrap()
                .credits,
            100
        );
    }
}
