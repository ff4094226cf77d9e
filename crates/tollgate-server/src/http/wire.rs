//! Serialised forms the HTTP layer keeps, so that what never changes is not serialised again.

use crate::config::Config;
use crate::domain::links;
use crate::error::{Error, Result};
use bytes::Bytes;
use dashmap::DashMap;
use std::sync::Arc;
use tollgate_contract::Task;

/// What goes before the image links of the tasks a response carries: `--public-url`, else the
/// origin the request was sent to; without either (no `Host`), the links stay paths.
pub fn link_base(config: &Config) -> String {
    config
        .public_url
        .clone()
        .or_else(super::error::request_base)
        .unwrap_or_default()
}

/// `task` as clients get it: its image links absolute.
pub fn for_client(mut task: Task, config: &Config) -> Task {
    links::absolute(&mut task, &link_base(config));
    task
}

/// How many tasks' JSON is kept before the memo starts over.
const MAX_TASKS: usize = 20_000;

/// The JSON of tasks by id, each beside the view it was made from. The domain hands out one
/// `Arc<Task>` for a finished task for as long as it keeps it (`FinishedTasks`), so the bytes are
/// reused only for that very view (`Arc::ptr_eq`, and the `Arc` kept here holds its address):
/// whatever the domain decides (a 410 after the retention, a changed webhook state) the memo
/// cannot serve a stale body.
#[derive(Default)]
pub struct TaskJson {
    /// The view, the link base its JSON was made with, the JSON.
    by_id: DashMap<String, (Arc<Task>, String, Bytes), crate::domain::caches::FastHash>,
}

impl TaskJson {
    /// `task` as JSON, its image links after `base` (see [`link_base`]).
    pub fn of(&self, task: &Arc<Task>, base: &str) -> Result<Bytes> {
        if let Some(kept) = self.by_id.get(&task.id) {
            if Arc::ptr_eq(&kept.0, task) && kept.1 == base {
                return Ok(kept.2.clone());
            }
        }
        let json = if task.images.is_empty() {
            serde_json::to_vec(task.as_ref())
        } else {
            let mut absolute = Task::clone(task);
            links::absolute(&mut absolute, base);
            serde_json::to_vec(&absolute)
        };
        let json = Bytes::from(json.map_err(Error::internal)?);
        // Only a view that will come again (a finished task, shared by the domain's cache) is
        // worth keeping: the domain holds it, so one more `Arc` is all it costs.
        if Arc::strong_count(task) > 1 {
            if self.by_id.len() >= MAX_TASKS {
                self.by_id.clear();
            }
            self.by_id.insert(
                task.id.clone(),
                (Arc::clone(task), base.to_owned(), json.clone()),
            );
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

    const BASE: &str = "http://127.0.0.1:8080";

    #[test]
    fn image_links_go_out_after_the_base_of_each_request() {
        let memo = TaskJson::default();
        let mut done = task(TaskStatus::Succeeded);
        done.images = vec![tollgate_contract::ImageRef {
            url: "/v1/links/task_1/0.png?expires=1&signature=ab".into(),
        }];
        let shared = Arc::new(done);
        let _held_by_the_domain = Arc::clone(&shared);
        let json = |base: &str| {
            let bytes = memo.of(&shared, base).unwrap();
            let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            value["images"][0]["url"].as_str().unwrap().to_owned()
        };
        assert_eq!(
            json(BASE),
            "http://127.0.0.1:8080/v1/links/task_1/0.png?expires=1&signature=ab"
        );
        assert_eq!(
            json("https://img.example.com"),
            "https://img.example.com/v1/links/task_1/0.png?expires=1&signature=ab"
        );
        // The domain's view keeps its paths.
        assert!(shared.images[0].url.starts_with("/v1/links/"));
    }

    #[test]
    fn a_kept_view_is_serialised_once_and_a_new_view_again() {
        let memo = TaskJson::default();
        let shared = Arc::new(task(TaskStatus::Succeeded));
        let _held_by_the_domain = Arc::clone(&shared);
        let first = memo.of(&shared, BASE).unwrap();
        // The same bytes, not an equal copy: nothing was serialised the second time.
        assert_eq!(first.as_ptr(), memo.of(&shared, BASE).unwrap().as_ptr());
        // Another view of the same id (the domain's cache started over, say) is serialised anew.
        let other = Arc::new(task(TaskStatus::Failed));
        let _held = Arc::clone(&other);
        let second = memo.of(&other, BASE).unwrap();
        assert!(String::from_utf8_lossy(&second).contains("\"failed\""));
        assert!(String::from_utf8_lossy(&first).contains("\"succeeded\""));
        // A view nobody else holds is not kept.
        let lone = Arc::new(task(TaskStatus::Queued));
        memo.of(&lone, BASE).unwrap();
        assert!(Arc::ptr_eq(&memo.by_id.get("task_1").unwrap().0, &other));
    }
}
