//! Where generated images live: behind [`ImageStore`], files on disk by default
//! ([`DiskImageStore`]), or an S3-compatible bucket ([`S3ImageStore`], `--image-store s3://…`).

use crate::config::S3Config;
use crate::error::{Error, Result, StoreFault};
use async_trait::async_trait;
use futures_util::TryStreamExt;
use object_store::ObjectStore;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::time::Duration;

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

/// `<prefix>/<task id>/<index>.png` in an S3-compatible bucket, through `object_store` (signed
/// requests, retries, timeouts). Every instance of a deployment pointed at the same bucket
/// serves every image, with no shared disk.
///
/// Faults: a request that times out or fails (the service down, a 5xx, refused credentials) is
/// [`StoreFault::ObjectStore`], answered 503 with `Retry-After`; a worker puts its task back in
/// the queue; the next request tries again, so the store recovers by itself.
pub struct S3ImageStore {
    store: object_store::aws::AmazonS3,
    prefix: object_store::path::Path,
}

impl S3ImageStore {
    /// The bucket of `config`, with the credentials and region of the standard AWS variables.
    pub fn new(config: &S3Config) -> Result<Self> {
        use object_store::{BackoffConfig, ClientOptions, RetryConfig};
        let mut builder = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(config.timeout)
                    .with_connect_timeout(config.timeout.min(Duration::from_secs(5))),
            )
            // The client waits for us, not for the default three minutes of retries.
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 2,
                retry_timeout: config.timeout,
            });
        if let Some(endpoint) = &config.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let store = builder
            .build()
            .map_err(|e| Error::internal(format!("--image-store s3://{}: {e}", config.bucket)))?;
        Ok(S3ImageStore {
            store,
            prefix: object_store::path::Path::from(config.prefix.as_str()),
        })
    }

    fn task_dir(&self, task_id: &str) -> object_store::path::Path {
        // `child` escapes what a path part may not hold, so an id never becomes a path.
        self.prefix.child(task_id)
    }

    fn image(&self, task_id: &str, index: u8) -> object_store::path::Path {
        self.task_dir(task_id).child(format!("{index}.png"))
    }
}

fn unavailable(e: object_store::Error) -> Error {
    Error::store_unavailable(StoreFault::ObjectStore, format!("image store: {e}"))
}

#[async_trait]
impl ImageStore for S3ImageStore {
    async fn put(&self, task_id: &str, index: u8, png: Vec<u8>) -> Result<()> {
        // A PUT is atomic: a reader sees the whole image or none.
        self.store
            .put(&self.image(task_id, index), png.into())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn get(&self, task_id: &str, index: u8) -> Result<Option<Vec<u8>>> {
        match self.store.get(&self.image(task_id, index)).await {
            Ok(found) => Ok(Some(found.bytes().await.map_err(unavailable)?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn delete_task(&self, task_id: &str) -> Result<()> {
        let dir = self.task_dir(task_id);
        let objects: Vec<_> = self
            .store
            .list(Some(&dir))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await
            .map_err(unavailable)?;
        for location in objects {
            match self.store.delete(&location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(unavailable(e)),
            }
        }
        Ok(())
    }

    async fn task_ids(&self) -> Result<Vec<String>> {
        let listing = self
            .store
            .list_with_delimiter(Some(&self.prefix))
            .await
            .map_err(unavailable)?;
        Ok(listing
            .common_prefixes
            .iter()
            .filter_map(|dir| dir.filename())
            .filter(|name| name.starts_with("task_"))
            .map(str::to_owned)
            .collect())
    }
}
