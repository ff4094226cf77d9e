//! The worker pool: a fixed number of workers take queued tasks from the store and run them.
//!
//! The queue is the `tasks` table itself, so an accepted task survives a crash. A worker holds
//! the task it runs under a lease that it renews while it works; if its process dies, the lease
//! runs out and a worker of any instance takes the task again (its charge stands, and the
//! built-in generator is deterministic, so running it again gives the same images).

use crate::domain::generator;
use crate::domain::secrets;
use crate::domain::service::Tollgate;
use crate::error::Error;
use crate::store::{now, FinishOutcome, TaskOutcome, TaskRecord};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tollgate_contract::TaskStatus;

/// How often an idle worker looks at the queue even without a wake-up (tasks queued by a
/// previous run, or by another process on the same database).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Starts `count` workers (0: this process queues tasks but runs none); they stop when `stop` turns true, after their current task.
pub fn spawn(app: Arc<Tollgate>, count: usize, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    (0..count)
        .map(|_| tokio::spawn(run(Arc::clone(&app), stop.clone())))
        .collect()
}

async fn run(app: Arc<Tollgate>, mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        let claim = match secrets::new_id("claim") {
            Ok(claim) => claim,
            Err(e) => {
                tracing::error!(error = %e, "worker could not make a claim id");
                tokio::time::sleep(IDLE_POLL).await;
                continue;
            }
        };
        let lease = app.config().task_lease;
        match app
            .store
            .claim_next_task(now(), now() + lease, &claim)
            .await
        {
            Ok(Some(task)) => run_task(&app, task, &claim).await,
            Ok(None) => {
                tokio::select! {
                    _ = app.work_ready.notified() => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                    _ = stop.changed() => {}
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "worker could not read the queue");
                tokio::time::sleep(IDLE_POLL).await;
            }
        }
    }
}

async fn run_task(app: &Tollgate, task: TaskRecord, claim: &str) {
    let started = Instant::now();
    let lease = app.config().task_lease;
    // Renew the lease at a third of its length while the work runs.
    let renewing = async {
        loop {
            tokio::time::sleep(lease / 3).await;
            match app.store.renew_lease(&task.id, claim, now() + lease).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(task_id = %task.id, "lost the lease of a running task");
                    std::future::pending::<()>().await;
                }
                Err(e) => {
                    tracing::warn!(task_id = %task.id, error = %e, "could not renew a task lease")
                }
            }
        }
    };
    let rendered = tokio::select! {
        rendered = render_and_store(app, &task) => rendered,
        _ = renewing => unreachable_pending(),
    };
    let outcome = match rendered {
        Ok(()) => TaskOutcome::Succeeded,
        Err(e) => {
            tracing::error!(task_id = %task.id, error = %e, "task failed; refunding");
            TaskOutcome::Failed {
                code: "generation_failed".to_owned(),
                message: "The image could not be generated; the task's credits were refunded."
                    .to_owned(),
            }
        }
    };
    match app
        .store
        .finish_task(&task.id, claim, &outcome, now())
        .await
    {
        Ok(FinishOutcome::Finished) => {
            app.metrics
                .task_duration
                .observe(started.elapsed().as_secs_f64());
            let status = match outcome {
                TaskOutcome::Succeeded => TaskStatus::Succeeded,
                TaskOutcome::Failed { .. } => {
                    app.metrics.credits_refunded.inc_by(task.cost);
                    TaskStatus::Failed
                }
            };
            app.metrics.task_finished(status.as_str());
            tracing::info!(task_id = %task.id, status = %status, ms = started.elapsed().as_millis() as u64, "task finished");
        }
        Ok(FinishOutcome::Lost) => {
            tracing::warn!(task_id = %task.id, "another worker took the task over; its result stands");
        }
        Ok(FinishOutcome::Purged) => {
            // Purged while it ran: its images must not outlive the tombstone.
            if let Err(e) = app.images.delete_task(&task.id).await {
                tracing::warn!(task_id = %task.id, error = %e, "could not delete images of a purged task");
            }
        }
        Err(e) => {
            tracing::error!(task_id = %task.id, error = %e, "could not record the end of a task")
        }
    }
}

async fn render_and_store(app: &Tollgate, task: &TaskRecord) -> Result<(), Error> {
    let (prompt, seed, size, n) = (task.prompt.clone(), task.seed, task.size, task.n);
    let images = tokio::task::spawn_blocking(move || {
        (0..n)
            .map(|index| generator::render(&prompt, seed, size, index))
            .collect::<Result<Vec<_>, Error>>()
    })
    .await
    .map_err(|e| Error::internal(format!("generator thread: {e}")))??;
    for (index, png) in (0u8..).zip(images) {
        app.images.put(&task.id, index, png).await?;
    }
    Ok(())
}

/// The renewal loop never ends on its own; this arm of the `select!` is never taken.
fn unreachable_pending() -> Result<(), Error> {
    Err(Error::internal("lease renewal loop ended"))
}
