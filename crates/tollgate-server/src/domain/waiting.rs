//! What a long poll (`GET /v1/tasks/{id}?wait=N`) sleeps on: a wake-up per awaited task, given
//! when a worker of this process finishes it or a cancel here ends it, and one for shutdown.
//!
//! A wake-up is a hint, never the only way to learn: the waiter reads the task again whenever
//! it wakes and also every [`TaskWaiters::recheck`], which is what finds a task finished by
//! another instance of a shared deployment (or ended by the retention purge).

use dashmap::DashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// How often a waiter reads its task again without a wake-up: often when other instances may
/// finish it, rarely when every end of a task here gives one.
const RECHECK_SHARED: Duration = Duration::from_millis(250);
const RECHECK_ALONE: Duration = Duration::from_secs(2);

pub struct TaskWaiters {
    by_task: DashMap<String, Arc<Notify>>,
    stopping: watch::Sender<bool>,
    recheck: Duration,
}

impl TaskWaiters {
    /// `shared`: whether other instances write the same store.
    pub fn new(shared: bool) -> TaskWaiters {
        TaskWaiters {
            by_task: DashMap::new(),
            stopping: watch::channel(false).0,
            recheck: if shared {
                RECHECK_SHARED
            } else {
                RECHECK_ALONE
            },
        }
    }

    pub fn recheck(&self) -> Duration {
        self.recheck
    }

    /// The task `id` is no longer queued or running: its waiters read it again now.
    pub fn finished(&self, id: &str) {
        if let Some((_, notify)) = self.by_task.remove(id) {
            notify.notify_waiters();
        }
    }

    /// The server is shutting down: every waiter answers with what it has.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// The wake-ups a waiter for `id` listens to, until it is dropped.
    pub fn watch(self: &Arc<Self>, id: &str) -> Watch {
        let notify = Arc::clone(
            self.by_task
                .entry(id.to_owned())
                .or_insert_with(|| Arc::new(Notify::new()))
                .value(),
        );
        Watch {
            waiters: Arc::clone(self),
            id: id.to_owned(),
            notify,
            stopping: self.stopping.subscribe(),
        }
    }
}

/// One waiter's wake-ups.
pub struct Watch {
    waiters: Arc<TaskWaiters>,
    id: String,
    notify: Arc<Notify>,
    stopping: watch::Receiver<bool>,
}

impl Watch {
    pub fn stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// The task's wake-up. Its `notified()` future must be made (and
    /// [`enabled`](tokio::sync::futures::Notified::enable)) before the task is read, so that a
    /// finish between the read and the sleep is not missed.
    pub fn notify(&self) -> Arc<Notify> {
        Arc::clone(&self.notify)
    }

    /// Completes when the server starts shutting down.
    pub async fn stopped(&mut self) {
        // An error means the sender is gone: the domain itself is going away.
        let _ = self.stopping.wait_for(|stopping| *stopping).await;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // The last waiter of a task that has not finished takes its entry away; a waiter that
        // comes at the same moment makes a new one.
        self.waiters.by_task.remove_if(&self.id, |_, notify| {
            Arc::ptr_eq(notify, &self.notify) && Arc::strong_count(notify) <= 2
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_finish_wakes_the_waiters_of_that_task_only() {
        let waiters = Arc::new(TaskWaiters::new(false));
        let a = waiters.watch("a");
        let b = waiters.watch("b");
        let (a, b) = (a.notify(), b.notify());
        let mut woke_a = std::pin::pin!(a.notified());
        woke_a.as_mut().enable();
        let mut woke_b = std::pin::pin!(b.notified());
        woke_b.as_mut().enable();
        waiters.finished("a");
        tokio::time::timeout(Duration::from_secs(1), woke_a)
            .await
            .unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(50), woke_b)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn the_last_waiter_takes_its_entry_away() {
        let waiters = Arc::new(TaskWaiters::new(false));
        let first = waiters.watch("a");
        let second = waiters.watch("a");
        drop(first);
        assert!(waiters.by_task.contains_key("a"));
        drop(second);
        assert!(!waiters.by_task.contains_key("a"));
    }

    #[tokio::test]
    async fn stop_wakes_every_waiter() {
        let waiters = Arc::new(TaskWaiters::new(true));
        let mut watch = waiters.watch("a");
        assert!(!watch.stopping());
        waiters.stop();
        tokio::time::timeout(Duration::from_secs(1), watch.stopped())
            .await
            .unwrap();
        assert!(watch.stopping());
    }
}
