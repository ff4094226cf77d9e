//! Readiness, gauges and the shutdown's `Retry-After`.

use super::*;

impl Tollgate {
    /// Refreshes gauges that are read from storage; called before metrics are rendered.
    pub async fn refresh_gauges(&self) -> Result<()> {
        let depth = self.store.queue_depth().await?;
        self.metrics
            .queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
        Ok(())
    }

    /// Whether this instance can carry out writes now (`GET /readyz`): the disk is above its
    /// floor (checked every time: one `statvfs`), the store commits a real write, and Redis
    /// answers when it keeps the limits. That probe writes (an fsync on SQLite), so it runs at
    /// most once per [`PROBE_EVERY`]; callers in between share its answer. Sets the
    /// `tollgate_ready` gauge.
    pub async fn readiness(&self) -> Result<()> {
        if let Err(e) = self.disk.ensure_headroom() {
            self.metrics.ready.set(0);
            tracing::warn!(error = %e, "not ready: low disk");
            return Err(Error::Unavailable {
                reason: "disk space below the floor",
                retry_after: Duration::from_secs(5),
            });
        }
        let mut last = self.last_probe.lock().await;
        let found = match &*last {
            Some((at, found)) if at.elapsed() < PROBE_EVERY => *found,
            _ => {
                let found = self.probe().await;
                *last = Some((std::time::Instant::now(), found));
                found
            }
        };
        self.metrics.ready.set(i64::from(found.is_ok()));
        found.map_err(|reason| Error::Unavailable {
            reason,
            retry_after: Duration::from_secs(1),
        })
    }

    pub(super) async fn probe(&self) -> Result<(), &'static str> {
        if let Err(e) = self.store.probe_write(self.now()).await {
            tracing::warn!(error = %e, "not ready: the store cannot commit");
            return Err("the store cannot commit");
        }
        self.limits
            .ping()
            .await
            .map_err(|_| "the rate limiter does not answer")
    }

    /// How long clients should wait before retrying during shutdown.
    pub fn shutdown_retry_after(&self) -> Duration {
        self.config.shutdown_retry_after
    }
}
