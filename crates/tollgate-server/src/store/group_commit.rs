//! Group commit of task creations, on either engine: concurrent creates written together, one
//! transaction and one commit for a batch, and every request answered only after its commit.
//!
//! Why on both: on SQLite with `synchronous = FULL` the commit is the fsync, one per batch
//! instead of one per task. On PostgreSQL every create of an account takes that account's row
//! lock until its transaction commits, so creates of one account went one commit (one WAL
//! flush) at a time; a batch holds the lock once for all of its creates. Several writers take
//! batches side by side on PostgreSQL; each batch first locks its accounts' rows in the order
//! of their ids, before any other row (a key's spend counter is locked only under its account's
//! lock), so two batches (of this instance or another) never wait on each other in a circle.

use super::engine::{placeholders, q, value_rows, Engine, Tx};
use super::sql::{
    self, charge, charge_together, complete_idempotency, NEW_TASK_COLUMNS, NEW_TASK_WIDTH,
};
use super::{to_millis, IdempotencyScope, StoredResponse, TaskRecord};
use crate::error::{Error, Result};
use sqlx::Pool;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Mutex};

/// The most creations one transaction takes.
const MAX_BATCH: usize = 256;

/// Where creates are sent to be written.
pub(crate) struct GroupCommit {
    jobs: mpsc::Sender<CreateJob>,
}

/// One task creation waiting for a writer.
struct CreateJob {
    task: TaskRecord,
    idempotency: Option<(IdempotencyScope, StoredResponse)>,
    reply: oneshot::Sender<Result<TaskRecord>>,
}

impl GroupCommit {
    /// Starts `writers` writers on `pool`, sharing one queue.
    pub(crate) fn spawn<E: Engine>(pool: Pool<E::Db>, writers: usize) -> GroupCommit {
        let (jobs, queue) = mpsc::channel(MAX_BATCH * 4);
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..writers.max(1) {
            tokio::spawn(write_creates::<E>(pool.clone(), Arc::clone(&queue)));
        }
        GroupCommit { jobs }
    }

    /// Charges and inserts `task`, answering once its batch committed.
    pub(crate) async fn create(
        &self,
        task: &TaskRecord,
        idempotency: Option<(&IdempotencyScope, &StoredResponse)>,
    ) -> Result<TaskRecord> {
        let (reply, answer) = oneshot::channel();
        let job = CreateJob {
            task: task.clone(),
            idempotency: idempotency.map(|(scope, response)| (scope.clone(), response.clone())),
            reply,
        };
        self.jobs
            .send(job)
            .await
            .map_err(|_| Error::internal("the task writer has stopped"))?;
        answer
            .await
            .map_err(|_| Error::internal("the task writer dropped a request"))?
    }
}

/// One writer: takes every creation waiting (up to [`MAX_BATCH`]), writes them in one
/// transaction, commits once, and only then answers them all.
///
/// A batch is first written grouped ([`create_batch_grouped`]: a few statements for the whole
/// batch). Should that fail, it is written again task by task, each in its savepoint
/// ([`create_batch`]), so that a task that cannot be written fails alone. Nothing is answered
/// before its COMMIT; a failed batch is refused whole, each request with the batch's error (a
/// store fault stays a 503).
async fn write_creates<E: Engine>(pool: Pool<E::Db>, queue: Arc<Mutex<mpsc::Receiver<CreateJob>>>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        // The queue is held only while taking a batch: the next writer takes the next one
        // while this one writes.
        if queue.lock().await.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        // Accounts in the order of their ids (stable: one account's creates keep their order).
        batch.sort_by(|a, b| a.task.account_id.cmp(&b.task.account_id));
        let written = match create_batch_grouped::<E>(&pool, &batch).await {
            Ok(results) => Ok(results),
            // A full disk or a lost connection fails the batch as a whole: writing it again
            // task by task would meet the same fault.
            Err(e @ Error::StoreUnavailable { .. }) => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, tasks = batch.len(), "a grouped batch of task creations failed; writing them one by one");
                create_batch::<E>(&pool, &batch).await
            }
        };
        match written {
            Ok(results) => {
                for (job, result) in batch.drain(..).zip(results) {
                    let _ = job.reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, tasks = batch.len(), "a batch of task creations failed; none was accepted");
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(e.for_each_request()));
                }
            }
        }
    }
}

/// Opens the batch's transaction; where other writers run beside it, with the batch's accounts
/// locked first, in the order of their ids (SQLite's one writer holds the database anyway).
async fn begin<E: Engine>(pool: &Pool<E::Db>, batch: &[CreateJob]) -> Result<Tx<E>> {
    let mut tx = Tx::begin(pool.acquire().await?, E::BEGIN_WRITE).await?;
    if E::SHARED {
        let mut accounts: Vec<&str> = batch
            .iter()
            .map(|job| job.task.account_id.as_str())
            .collect();
        accounts.dedup();
        let mut lock = q(format!(
            "SELECT id FROM accounts WHERE id IN ({}) ORDER BY id{}",
            placeholders(1, accounts.len()),
            E::FOR_UPDATE
        ));
        for account in accounts {
            lock = lock.bind(account);
        }
        lock.execute(&mut *tx).await?;
    }
    Ok(tx)
}

/// Commits `tx`, the batch that charged `charged_id` (a task of it, if any). A COMMIT whose
/// answer was lost (the connection broke) may have committed all the same: the batch is one
/// transaction, so whether its task is there, asked on another connection, says for all of
/// them. Answering an error for tasks that were accepted would leave their retries facing
/// charges they never heard of.
async fn commit<E: Engine>(pool: &Pool<E::Db>, tx: Tx<E>, charged_id: Option<&str>) -> Result<()> {
    let Err(e) = tx.commit().await else {
        return Ok(());
    };
    if let Some(id) = charged_id {
        if let Ok(mut conn) = pool.acquire().await {
            if let Ok(Some(_)) = sql::get_task(&mut *conn, id).await {
                return Ok(());
            }
        }
    }
    Err(e)
}

/// The batch in a handful of statements, whatever its size: the guarded charge of each run of
/// one account's tasks (one `UPDATE … RETURNING` for the run when its balance covers it all,
/// else one per task, which decides the 402s; either way each ledger entry gets the balance
/// after its own charge, in order), then one multi-row `INSERT`
/// of the charged tasks and one of their ledger entries, and the idempotency records. Why: on
/// SQLite every statement is a round trip to sqlx's connection thread, and the task-by-task
/// writer's six per task took more of the core than SQLite's own work (bench/README.md).
/// A refused charge changes nothing, so no savepoint is needed; any error fails the whole
/// transaction, and [`write_creates`] writes the batch again task by task.
async fn create_batch_grouped<E: Engine>(
    pool: &Pool<E::Db>,
    batch: &[CreateJob],
) -> Result<Vec<Result<TaskRecord>>> {
    let mut tx = begin::<E>(pool, batch).await?;
    // Per task: charged (its task is answered) or why not; and the charged ones with their
    // cost and the balance after their charge.
    let mut results = Vec::with_capacity(batch.len());
    let mut charged: Vec<(&CreateJob, i64, i64)> = Vec::with_capacity(batch.len());
    let mut rest = batch;
    while let Some(job) = rest.first() {
        // The run of this account's creates that no spend limit needs to count one by one.
        let together = rest
            .iter()
            .take_while(|next| {
                next.task.account_id == job.task.account_id && next.task.spend.is_none()
            })
            .count();
        if together > 1 {
            let run = &rest[..together];
            let tasks: Vec<&TaskRecord> = run.iter().map(|job| &job.task).collect();
            if let Some(charges) = charge_together(&mut *tx, &tasks).await? {
                for (job, (cost, balance)) in run.iter().zip(charges) {
                    results.push(Ok(job.task.clone()));
                    charged.push((job, cost, balance));
                }
                rest = &rest[together..];
                continue;
            }
        }
        match charge(&mut *tx, &job.task).await? {
            Ok((cost, balance)) => {
                results.push(Ok(job.task.clone()));
                charged.push((job, cost, balance));
            }
            Err(refused) => results.push(Err(refused)),
        }
        rest = &rest[1..];
    }
    if !charged.is_empty() {
        let mut tasks = q(format!(
            "INSERT INTO tasks ({NEW_TASK_COLUMNS}) VALUES {}",
            value_rows(charged.len(), NEW_TASK_WIDTH)
        ));
        for (job, cost, _) in &charged {
            tasks = sql::task_values(tasks, &job.task, *cost);
        }
        tasks.execute(&mut *tx).await?;
        let mut ledger = q(format!(
            "INSERT INTO ledger (account_id, delta, balance_after, kind, task_id, created_at) VALUES {}",
            value_rows(charged.len(), 6)
        ));
        for (job, cost, balance) in &charged {
            let task = &job.task;
            ledger = ledger
                .bind(&task.account_id)
                .bind(-*cost)
                .bind(*balance)
                .bind("charge")
                .bind(&task.id)
                .bind(to_millis(task.created_at));
        }
        ledger.execute(&mut *tx).await?;
        for (job, _, _) in &charged {
            if let Some((scope, response)) = &job.idempotency {
                complete_idempotency(&mut *tx, scope, response).await?;
            }
        }
    }
    let first = charged.first().map(|(job, _, _)| job.task.id.as_str());
    commit::<E>(pool, tx, first).await?;
    Ok(results)
}

/// Task by task, each in a savepoint of one transaction (so a 402, or a task that cannot be
/// written, undoes only its own statements).
async fn create_batch<E: Engine>(
    pool: &Pool<E::Db>,
    batch: &[CreateJob],
) -> Result<Vec<Result<TaskRecord>>> {
    let mut tx = begin::<E>(pool, batch).await?;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        q("SAVEPOINT create_task").execute(&mut *tx).await?;
        let idempotency = job
            .idempotency
            .as_ref()
            .map(|(scope, response)| (scope, response));
        let created = match sql::create_one(&mut *tx, &job.task, idempotency).await {
            Ok(Ok(())) => Ok(job.task.clone()),
            Ok(Err(refused)) => Err(refused),
            Err(e) => Err(e),
        };
        if created.is_err() {
            q("ROLLBACK TO create_task").execute(&mut *tx).await?;
        }
        q("RELEASE create_task").execute(&mut *tx).await?;
        results.push(created);
    }
    let first = results
        .iter()
        .find_map(|r| r.as_ref().ok())
        .map(|task| task.id.clone());
    commit::<E>(pool, tx, first.as_deref()).await?;
    Ok(results)
}
