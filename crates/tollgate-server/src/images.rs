//! Where generated images live: behind [`ImageStore`], files on disk by default.

use crate::error::Result;
use async_trait::async_trait;
use std::io::ErrorKind;
use std::path::PathBuf;

/// Storage of PNG bytes by task and index.
#[async_trait]
pub trait ImageStore: Send + Sync + 'static {
    async fn put(&self, task_id: &str, index: u8, png: Vec<u8>) -> Result<()>;
    /// `None` when the image is not there.
    async fn get(&self, task_id: &str, index: u8) -> Result<Option<Vec<u8>>>;
    /// Removes every image of the task; absent images are not an error.
    async fn delete_task(&self, task_id: &str) -> Result<()>;
    /// The ids of the tasks that have images here (for the sweep of orphans).
    async fn task_ids(&self) -> Result<Vec<String>>;
}

/// `<root>/<task id>/<index>.png`.
pub struct DiskImageStore {
    root: PathBuf,
}

impl DiskImageStore {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(DiskImageStore { root })
    }

    fn task_dir(&self, task_id: &str) -> PathBuf {
        // Task ids are made by the server (`task_` + hex); anything else never reaches here,
        // but a path separator must never turn an id into a path.
        self.root.join(task_id.replace(['/', '\\', '.'], "_"))
    }
}

#[async_trait]
impl ImageStore for DiskImageStore {
    async fn put(&self, task_id: &str, index: u8, png: Vec<u8>) -> Result<()> {
        let dir = self.task_dir(task_id);
        tokio::fs::create_dir_all(&dir).await?;
        // Write then rename, so a reader never sees half an image.
        let tmp = dir.join(format!("{index}.png.tmp"));
        tokio::fs::write(&tmp, png).await?;
        tokio::fs::rename(&tmp, dir.join(format!("{index}.png"))).await?;
        Ok(())
    }

    async fn get(&self, task_id: &str, index: u8) -> Result<Option<Vec<u8>>> {
        match tokio::fs::read(self.task_dir(task_id).join(format!("{index}.png"))).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn delete_task(&self, task_id: &str) -> Result<()> {
        match tokio::fs::remove_dir_all(self.task_dir(task_id)).await {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn task_ids(&self) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        let mut entries = tokio::fs::read_dir(&self.root).await?;
        while let Some(entry) = entries.next_entry().await? {
            if let Some(name) = entry.file_name().to_str() {
                if name.starts_with("task_") && entry.file_type().await?.is_dir() {
                    ids.push(name.to_owned());
                }
            }
        }
        Ok(ids)
    }
}
