//! Retention: purging expired tasks and images nobody refers to.

use super::*;

impl Tollgate {
    /// Purges the data of expired tasks (keeping tombstones) and forgets old idempotency keys.
    /// Returns how many tasks were purged.
    ///
    /// Batch by batch, images go first and the tombstones are marked after: a crash in between
    /// leaves those tasks unmarked, so the next run (on the next start) finds them again,
    /// deletes what is left (absent images are fine) and marks them. A purge resumes; it never
    /// leaves a tombstone whose images survive.
    pub async fn purge_expired(&self) -> Result<usize> {
        let mut purged = 0;
        loop {
            let cutoff = self.now() - self.config.retention;
            let ids = self.store.expired_tasks(cutoff, PURGE_BATCH).await?;
            if ids.is_empty() {
                break;
            }
            for id in &ids {
                self.images.delete_task(id).await?;
            }
            self.store.mark_purged(&ids, self.now()).await?;
            self.finished_tasks.forget(&ids);
            purged += ids.len();
            tracing::info!(
                batch = ids.len(),
                purged_so_far = purged,
                "retention purge: a batch of expired tasks is now tombstones"
            );
        }
        self.store
            .idempotency_purge(self.now() - KEY_RETENTION)
            .await?;
        self.store.delete_expired_sessions(self.now()).await?;
        self.sign_in_limits.forget_idle();
        Ok(purged)
    }

    /// Removes the images of tasks the store does not have, or has only as tombstones: left by a
    /// run whose task never committed (older versions could, after a full disk) or by
    /// a purge cut short. Run once at start, before the first purge.
    pub async fn collect_orphan_images(&self) -> Result<usize> {
        let mut removed = 0;
        for id in self.images.task_ids().await? {
            let orphan = match self.store.get_task(&id).await? {
                None => true,
                Some(task) => task.purged,
            };
            if orphan {
                self.images.delete_task(&id).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}
