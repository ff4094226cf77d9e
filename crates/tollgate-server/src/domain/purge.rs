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
