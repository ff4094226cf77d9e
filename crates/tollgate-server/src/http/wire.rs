//! Serialised forms the HTTP layer keeps, so that what never changes is not serialised again.

use crate::error::{Error, Result};
use bytes::Bytes;
use dashmap::DashMap;
use std::sync::Arc;
use tollgate_contract::Task;

/// How many tasks' JSON is kept before the memo starts over.
const MAX_TASKS: usize = 20_000;

/// The JSON of tasks by id, each beside the view it was made from. The domain hands out one
/// `Arc<Task>` for a finished task for as long as it keeps it (`FinishedTasks`), so the bytes are
/// reused only for that very view (`Arc::ptr_eq`, and the `Arc` kept here holds its address):
/// whatever the domain decides (a 410 after the retention, a changed webhook state) the memo
/// cannot serve a stale body.
#[derive(Default)]
pub struct TaskJson {
    by_id: DashMap<String, (Arc<Task>, Bytes), crate::domain::caches::FastHash>,
}

impl TaskJson {
    /// `task` as JSON.
    pub fn of(&self, task: &Arc<Task>) -> Result<Bytes> {
        if let Some(kept) = self.by_id.get(&task.id) {
            if Arc::ptr_eq(&kept.0, task) {
                return Ok(kept.1.clone());
            }
        }
        let json = Bytes::from(serde_json::to_vec(task.as_ref()).map_err(Error::internal)?);
        // Only a view that will come again (a finished task, shared by the domain's cache) is
        // worth keeping: the domain holds it, so one more `Arc` is all it costs.
        if Arc::strong_count(task) > 1 {
            if self.by_id.len() >= MAX_TASKS {
                self.by_id.clear();
            }
            self.by_id
                .insert(task.id.clone(), (Arc::clone(task), json.clone()));
        }
        Ok(json)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tollgate_contract::{ImageSize, TaskStatus};

    fn task(status: TaskStatus) -> Task {
        Task {
            id: "task_1".into(),
            object: "task".into(),
            status,
            model: "builtin".into(),
            prompt: "a lighthouse".into(),
            n: 1,
            size: ImageSize::S512,
            seed: 7,
            cost: 1,
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            completed_at: None,
            expires_at: time::OffsetDateTime::UNIX_EPOCH,
            images: Vec::new(),
            error: None,
            webhook: None,
        }
    }

    #[test]
    fn a_kept_view_is_serialised_once_and_a_new_view_again() {
        let memo = TaskJson::default();
        let shared = Arc::new(task(TaskStatus::Succeeded));
        let _held_by_the_domain = Arc::clone(&shared);
        let first = memo.of(&shared).unwrap();
        // The same bytes, not an equal copy: nothing was serialised the second time.
        assert_eq!(first.as_ptr(), memo.of(&shared).unwrap().as_ptr());
        // Another view of the same id (the domain's cache started over, say) is serialised anew.
        let other = Arc::new(task(TaskStatus::Failed));
        let _held = Arc::clone(&other);
        let second = memo.of(&other).unwrap();
        assert!(String::from_utf8_lossy(&second).contains("\"failed\""));
        assert!(String::from_utf8_lossy(&first).contains("\"succeeded\""));
        // A view nobody else holds is not kept.
        let lone = Arc::new(task(TaskStatus::Queued));
        memo.of(&lone).unwrap();
        assert!(Arc::ptr_eq(&memo.by_id.get("task_1").unwrap().0, &other));
    }
}
