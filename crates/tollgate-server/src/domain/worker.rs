//! The worker pools: each model of the catalogue has its own workers, which take that model's
//! queued tasks from the store and run them on the model's backend.
//!
//! The queue is the `tasks` table itself, so an accepted task survives a crash. A worker holds
//! the task it runs under a lease that it renews while it works; if its process dies, the lease
//! runs out (or, on SQLite, the next start puts it back in the queue) and a worker of any
//! instance takes the task again. **The rule:** an interrupted task is run again, its single
//! charge standing, up to [`MAX_RUNS`] runs in all; one claimed once more after that is failed
//! and refunded instead, so no task hangs and none is charged twice. The built-in generator is
//! deterministic, so a second run gives the images the first would have given; an upstream
//! backend is not, and a second run is a new request to it.
//!
//! A worker claims a task only with a slot of its model in hand (the model's `concurrency`, or
//! `--backend-concurrency` without a catalogue), so tasks wait in the queue, where any instance
//! can take them, rather than in a worker; and a model whose provider hangs holds only its own
//! slots. A run has the model's `timeout` (`--task-timeout`) to produce its images; a timeout,
//! like any failure, fails the task and refunds it in the same transaction.

use crate::disk::DiskSpace;
use crate::domain::backends::{Backend, BackendError};
use crate::domain::clock::Clock;
use crate::domain::secrets;
use crate::error::Error;
use crate::images::ImageStore;
use crate::metrics::Metrics;
use crate::store::{FinishOutcome, Store, TaskOutcome, TaskRecord};
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinHandle;
use tollgate_contract::TaskStatus;

/// What a worker may use, and nothing else of the facade (no accounts, keys or limits): the
/// queue through the store's claim, lease, finish and release; the backend and its slots; the
/// images; the disk's floor; the clock; the metrics; and the two wake-ups. Made by
/// `Tollgate::runner`.
pub struct Runner {
    /// The model whose tasks this runner's workers take, and only those.
    pub(in crate::domain) model: String,
    pub(in crate::domain) store: Arc<dyn Store>,
    pub(in crate::domain) images: Arc<dyn ImageStore>,
    pub(in crate::domain) backend: Arc<dyn Backend>,
    /// One permit per generation the backend may run at once.
    pub(in crate::domain) slots: Arc<Semaphore>,
    pub(in crate::domain) disk: DiskSpace,
    pub(in crate::domain) clock: Arc<dyn Clock>,
    pub(in crate::domain) metrics: Arc<Metrics>,
    /// Notified when a task is queued.
    pub(in crate::domain) work_ready: Arc<Notify>,
    /// Notified when a finished task has a webhook to deliver.
    pub(in crate::domain) webhooks_ready: Arc<Notify>,
    pub(in crate::domain) lease: Duration,
    pub(in crate::domain) timeout: Duration,
    /// How this model's runs have gone (shared with the facade, which reports it).
    pub(in crate::domain) health: Arc<ModelHealth>,
    /// The tasks this process runs, each with the wake-up the facade gives when it cancels one.
    pub(in crate::domain) running: Running,
    /// The long polls, woken when a task of this runner finishes.
    pub(in crate::domain) waiters: Arc<crate::domain::waiting::TaskWaiters>,
}

/// Tasks being run by this process's workers (every model's), by id: what a cancel notifies so
/// that the run stops at once. A cancel on another instance is seen at the next lease renewal.
pub type Running = Arc<dashmap::DashMap<String, Arc<Notify>>>;

impl Runner {
    fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }
}

/// Consecutive provider failures after which a model is reported failing (`/metrics`'s
/// `tollgate_model_failing`, the operator's dashboard) until one of its runs succeeds.
pub const FAILING_AFTER: u64 = 3;

/// How a model's runs have gone in this process: what `/metrics` and the operator's dashboard
/// show of it. A provider failure is a run its backend could not turn into images (refused,
/// unavailable until the retries ran out, or timed out); a crash or a full disk is not.
#[derive(Debug, Default)]
pub struct ModelHealth {
    succeeded: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
    consecutive_failures: std::sync::atomic::AtomicU64,
    /// The last provider failure: its task error code and when.
    last_failure: std::sync::Mutex<Option<(String, OffsetDateTime)>>,
}

/// A snapshot of a [`ModelHealth`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    pub succeeded: u64,
    pub failed: u64,
    pub consecutive_failures: u64,
    pub last_failure: Option<(String, OffsetDateTime)>,
}

impl HealthReport {
    /// The provider keeps failing: [`FAILING_AFTER`] failures in a row, none since succeeded.
    pub fn failing(&self) -> bool {
        self.consecutive_failures >= FAILING_AFTER
    }
}

impl ModelHealth {
    fn succeeded(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.succeeded.fetch_add(1, Relaxed);
        self.consecutive_failures.store(0, Relaxed);
    }

    fn failed(&self, code: &str, at: OffsetDateTime) {
        use std::sync::atomic::Ordering::Relaxed;
        self.failed.fetch_add(1, Relaxed);
        self.consecutive_failures.fetch_add(1, Relaxed);
        if let Ok(mut last) = self.last_failure.lock() {
            *last = Some((code.to_owned(), at));
        }
    }

    pub fn report(&self) -> HealthReport {
        use std::sync::atomic::Ordering::Relaxed;
        HealthReport {
            succeeded: self.succeeded.load(Relaxed),
            failed: self.failed.load(Relaxed),
            consecutive_failures: self.consecutive_failures.load(Relaxed),
            last_failure: self.last_failure.lock().ok().and_then(|l| l.clone()),
        }
    }
}

/// Runs a task may start, in all: a task claimed for run `MAX_RUNS + 1` (its last three runs
/// were interrupted by crashes or lost leases) is failed and refunded rather than run again.
pub const MAX_RUNS: u32 = 3;

/// How often an idle worker looks at the queue even without a wake-up (tasks queued by a
/// previous run, or by another process on the same database).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Starts `count` workers (0: this process queues tasks but runs none); they stop when `stop` turns true, after their current task.
pub fn spawn(app: Arc<Runner>, count: usize, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    (0..count)
        .map(|_| tokio::spawn(run(Arc::clone(&app), stop.clone())))
        .collect()
}

async fn run(app: Arc<Runner>, mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        // A slot of the backend first: without one, the task is better left in the queue.
        let slot = tokio::select! {
            slot = Arc::clone(&app.slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = stop.changed() => continue,
        };
        // Below the disk's floor a task's images would take the last of it: the tasks wait in
        // the queue, charged and safe, until there is room again.
        if let Err(e) = app.disk.ensure_headroom() {
            drop(slot);
            warn_low_disk(&e, app.now());
            tokio::select! {
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let claim = match secrets::new_id("claim") {
            Ok(claim) => claim,
            Err(e) => {
                tracing::error!(error = %e, "worker could not make a claim id");
                tokio::time::sleep(IDLE_POLL).await;
                continue;
            }
        };
        let lease = app.lease;
        match app
            .store
            .claim_next_task(&app.model, app.now(), app.now() + lease, &claim)
            .await
        {
            Ok(Some(task)) => {
                run_task(&app, task, &claim).await;
                drop(slot);
            }
            Ok(None) => {
                drop(slot);
                tokio::select! {
                    _ = app.work_ready.notified() => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                    _ = stop.changed() => {}
                }
            }
            Err(e) => {
                drop(slot);
                tracing::error!(error = %e, "worker could not read the queue");
                tokio::time::sleep(IDLE_POLL).await;
            }
        }
    }
}

async fn run_task(app: &Runner, task: TaskRecord, claim: &str) {
    let started = Instant::now();
    let lease = app.lease;
    let canceled = Arc::new(Notify::new());
    app.running.insert(task.id.clone(), Arc::clone(&canceled));
    // Renew the lease at a third of its length while the work runs; end when the task was
    // cancelled (told by this process's cancel, or found at a renewal).
    let renewing = async {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(lease / 3) => {}
                _ = canceled.notified() => return,
            }
            match app
                .store
                .renew_lease(&task.id, claim, app.now() + lease)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    if let Ok(Some(now)) = app.store.get_task(&task.id).await {
                        if now.status == TaskStatus::Canceled {
                            return;
                        }
                    }
                    tracing::warn!(task_id = %task.id, "lost the lease of a running task");
                    std::future::pending::<()>().await;
                }
                Err(e) => {
                    tracing::warn!(task_id = %task.id, error = %e, "could not renew a task lease")
                }
            }
        }
    };
    let rendered = if task.runs > MAX_RUNS {
        tracing::warn!(task_id = %task.id, runs = task.runs, "a task interrupted {MAX_RUNS} times is failed and refunded, not run again");
        Err(TaskFailure::Interrupted)
    } else {
        // A cancel drops the run: its backend's future with it, which asks a queue provider to
        // stop (the backends' `CancelOnDrop`).
        tokio::select! {
            rendered = generate_and_store(app, &task) => rendered,
            _ = renewing => Err(TaskFailure::Canceled),
        }
    };
    app.running.remove(&task.id);
    if matches!(rendered, Err(TaskFailure::Canceled)) {
        // Cancelled and refunded by the cancel itself: nothing to record, and no image kept.
        tracing::info!(task_id = %task.id, model = %app.model, "a running task was cancelled; its run is stopped");
        if let Err(e) = app.images.delete_task(&task.id).await {
            tracing::warn!(task_id = %task.id, error = %e, "could not delete the images of a cancelled task");
        }
        return;
    }
    match &rendered {
        Ok(()) => {
            app.health.succeeded();
            app.metrics.model_run(&app.model, true, false);
        }
        Err(failure @ TaskFailure::Backend(e)) if !matches!(e, BackendError::Internal(_)) => {
            app.health
                .failed(&failure.task_error(app.timeout).0, app.now());
            let failing = app.health.report().failing();
            if failing {
                tracing::warn!(model = %app.model, backend = app.backend.name(), "the model's provider keeps failing");
            }
            app.metrics.model_run(&app.model, false, failing);
        }
        // Not the provider's doing (a crash, the disk, a bug).
        Err(_) => {}
    }
    let outcome = match rendered {
        Ok(()) => TaskOutcome::Succeeded,
        Err(TaskFailure::Storage(e)) => {
            // The images could not be stored (a full or failing disk, a bucket that does not
            // answer): the task goes back to the queue, its charge standing, to run again once
            // the store takes writes. Not a failure of the task: it is neither failed nor
            // refunded, and the run is not counted.
            tracing::warn!(task_id = %task.id, error = %e, "could not store a task's images; it goes back to the queue");
            if let Err(e) = app.images.delete_task(&task.id).await {
                tracing::warn!(task_id = %task.id, error = %e, "could not delete the partial images of a task");
            }
            match app.store.release_task(&task.id, claim).await {
                Ok(_) => app.work_ready.notify_one(),
                // Its lease runs out instead, and a worker takes it again then.
                Err(e) => {
                    tracing::warn!(task_id = %task.id, error = %e, "could not put a task back in the queue")
                }
            }
            tokio::time::sleep(IDLE_POLL).await;
            return;
        }
        Err(failure) => {
            let (code, message) = failure.task_error(app.timeout);
            match &failure {
                TaskFailure::Backend(BackendError::Internal(cause)) => {
                    tracing::error!(task_id = %task.id, model = %app.model, backend = app.backend.name(), cause = %cause, "task failed; refunding")
                }
                other => {
                    tracing::warn!(task_id = %task.id, model = %app.model, backend = app.backend.name(), error = %other, code = %code, "task failed; refunding")
                }
            }
            TaskOutcome::Failed { code, message }
        }
    };
    match app
        .store
        .finish_task(&task.id, claim, &outcome, app.now())
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
            app.waiters.finished(&task.id);
            tracing::info!(task_id = %task.id, status = %status, ms = started.elapsed().as_millis() as u64, "task finished");
            if task.webhook_url.is_some() {
                app.webhooks_ready.notify_one();
            }
        }
        Ok(FinishOutcome::Lost) => match app.store.get_task(&task.id).await {
            Ok(Some(now)) if now.status == TaskStatus::Canceled => {
                // Cancelled between the end of the run and its record: the images go.
                if let Err(e) = app.images.delete_task(&task.id).await {
                    tracing::warn!(task_id = %task.id, error = %e, "could not delete the images of a cancelled task");
                }
            }
            _ => {
                tracing::warn!(task_id = %task.id, "another worker took the task over; its result stands");
            }
        },
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

/// Why a run made no images.
#[derive(Debug)]
enum TaskFailure {
    /// The backend failed, or ran out of time.
    Backend(BackendError),
    /// The task was claimed more than [`MAX_RUNS`] times.
    Interrupted,
    /// The images were made but could not be stored: a fault of the disk, which passes.
    Storage(Error),
    /// The task was cancelled while it ran (and refunded by the cancel).
    Canceled,
}

impl TaskFailure {
    fn task_error(&self, task_timeout: Duration) -> (String, String) {
        match self {
            TaskFailure::Backend(e) => e.task_error(task_timeout),
            TaskFailure::Storage(_) => (
                "storage".to_owned(),
                "The task's images could not be stored.".to_owned(),
            ),
            TaskFailure::Canceled => (
                "canceled".to_owned(),
                "The task was cancelled while it ran; its credits were refunded.".to_owned(),
            ),
            TaskFailure::Interrupted => (
                "interrupted".to_owned(),
                format!(
                    "The task was interrupted {MAX_RUNS} times while it ran (the server stopped); its credits were refunded."
                ),
            ),
        }
    }
}

impl std::fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskFailure::Backend(e) => e.fmt(f),
            TaskFailure::Interrupted => write!(f, "interrupted {MAX_RUNS} times"),
            TaskFailure::Storage(e) => write!(f, "storing the images: {e}"),
            TaskFailure::Canceled => f.write_str("cancelled while it ran"),
        }
    }
}

impl From<Error> for TaskFailure {
    fn from(e: Error) -> Self {
        TaskFailure::Backend(BackendError::Internal(e.to_string()))
    }
}

/// Asks the backend for the task's images within `--task-timeout`, then stores them.
async fn generate_and_store(app: &Runner, task: &TaskRecord) -> Result<(), TaskFailure> {
    let deadline = tokio::time::Instant::now() + app.timeout;
    let images = match tokio::time::timeout_at(deadline, app.backend.generate(task, deadline)).await
    {
        Ok(Ok(images)) => images,
        Ok(Err(e)) => return Err(TaskFailure::Backend(e)),
        Err(_) => return Err(TaskFailure::Backend(BackendError::Timeout)),
    };
    if images.len() != usize::from(task.n) {
        return Err(TaskFailure::Backend(BackendError::Internal(format!(
            "the {} backend made {} images for n = {}",
            app.backend.name(),
            images.len(),
            task.n
        ))));
    }
    for (index, png) in (0u8..).zip(images) {
        match app.images.put(&task.id, index, png).await {
            Ok(()) => {}
            Err(e @ Error::StoreUnavailable { .. }) => return Err(TaskFailure::Storage(e)),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Logs that workers wait for disk space, at most once a minute per process (every idle worker
/// checks once a second).
fn warn_low_disk(e: &Error, now: OffsetDateTime) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let minute = now.unix_timestamp().unsigned_abs() / 60;
    if LAST.swap(minute, Ordering::Relaxed) != minute {
        tracing::warn!(error = %e, "workers wait: the disk is below its free-space floor");
    }
}
