//! Tasks: the paid create, reads, lists, cancels and images, and their views.

use super::*;

impl Tollgate {
    /// Validates, prices, charges and queues a generation: one transaction with its charge
    /// (and with its idempotency record, when the request carried a key).
    pub async fn create_generation(
        &self,
        caller: &Caller,
        request: CreateGenerationRequest,
        idempotency: Option<&IdempotencyScope>,
    ) -> Result<Task> {
        let prompt_chars = request.prompt.chars().count();
        if request.prompt.trim().is_empty() || prompt_chars > MAX_PROMPT_CHARS {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "prompt",
                format!("`prompt` must be 1 to {MAX_PROMPT_CHARS} characters and not blank; it has {prompt_chars}."),
            ));
        }
        refuse_nul("prompt", &request.prompt)?;
        let model = self.model(request.model.as_deref())?;
        let spec = &model.spec;
        let n = request.n.unwrap_or(1);
        if !(1..=spec.max_n).contains(&n) {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "n",
                format!(
                    "`n` must be 1 to {} for the model `{}`, not {n}.",
                    spec.max_n, spec.id
                ),
            ));
        }
        let size = request.size.unwrap_or_else(|| spec.default_size());
        let Some(per_image) = spec.price(size) else {
            let sizes: Vec<&str> = spec.prices.keys().map(|s| s.as_str()).collect();
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "size",
                format!(
                    "The model `{}` does not make {}; it makes {}.",
                    spec.id,
                    size.as_str(),
                    quoted_list(&sizes)
                ),
            ));
        };
        let cost = per_image.checked_mul(u64::from(n)).ok_or_else(|| {
            Error::invalid(
                ErrorCode::InvalidValue,
                "n",
                "The task would cost more credits than can be counted.",
            )
        })?;
        let seed = match request.seed {
            Some(seed) => seed,
            None => i64::from(rand::random::<u32>()),
        };
        let webhook_url = match &request.webhook_url {
            Some(url) => Some(
                webhooks::check_url(url, self.config.allow_private_webhooks)
                    .await
                    .map_err(webhooks::invalid_url)?
                    .url
                    .to_string(),
            ),
            None => None,
        };
        let record = TaskRecord {
            id: secrets::new_id("task")?,
            account_id: caller.account_id.clone(),
            status: TaskStatus::Queued,
            prompt: request.prompt,
            n,
            size,
            seed,
            cost,
            created_at: self.now(),
            webhook_url,
            model: spec.id.clone(),
            key_id: Some(caller.key_id.clone()),
            spend: caller
                .spend_limit
                .map(|limit| billing::spend_cap(limit, self.now())),
            ..TaskRecord::default()
        };
        self.disk.ensure_headroom()?;
        let task = self.task_view(&record);
        let stored = match idempotency {
            Some(scope) => {
                let body = serde_json::to_vec(&task).map_err(Error::internal)?;
                Some((scope, StoredResponse { status: 202, body }))
            }
            None => None,
        };
        self.store
            .create_task(
                &record,
                stored.as_ref().map(|(scope, response)| (*scope, response)),
            )
            .await
            .map_err(|e| match e {
                Error::InsufficientCredits { cost, balance, .. } => Error::InsufficientCredits {
                    cost,
                    balance,
                    priced: Some(format!(
                        "{n} × {} with `{}` at {per_image} credit{} each",
                        size.as_str(),
                        spec.id,
                        if per_image == 1 { "" } else { "s" }
                    )),
                },
                other => other,
            })?;
        self.metrics.credits_charged.inc_by(record.cost);
        model.work_ready.notify_one();
        Ok(task)
    }

    /// A task of the caller's account: 404 for another account's or an unknown id, 410 once expired.
    pub async fn get_task(&self, caller: &Caller, id: &str) -> Result<Task> {
        let record = self.live_task(caller, id).await?;
        Ok(self.views(&[record]).await?.remove(0))
    }

    /// [`Tollgate::get_task`], shared: what clients poll. A finished task without a webhook
    /// never changes again, so its view is made once and every poll gets the same `Arc` (which
    /// lets the HTTP layer serialise it once too).
    pub async fn get_task_shared(&self, caller: &Caller, id: &str) -> Result<Arc<Task>> {
        if let Some(entry) = self.finished_tasks.get(id) {
            let record = &entry.record;
            if record.webhook_url.is_none() {
                self.check_live(caller, id, record)?;
                // The view's links are the same for a window of the link expiry.
                let window = self.links.expires(self.now());
                return Ok(entry.view(window, || self.task_view(record)));
            }
        }
        Ok(Arc::new(self.get_task(caller, id).await?))
    }

    /// [`Tollgate::get_task_shared`] once the task is no longer queued or running, or after
    /// `wait` with its state then: the long poll of `GET /v1/tasks/{id}?wait=N`. Shutdown ends
    /// every wait at once.
    pub async fn wait_task(&self, caller: &Caller, id: &str, wait: Duration) -> Result<Arc<Task>> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut watch = self.waiters.watch(id);
        let notify = watch.notify();
        loop {
            let woken = notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let task = self.get_task_shared(caller, id).await?;
            let now = tokio::time::Instant::now();
            if task.status.is_terminal() || now >= deadline || watch.stopping() {
                return Ok(task);
            }
            let next_look = deadline.min(now + self.waiters.recheck());
            tokio::select! {
                () = woken => {}
                () = tokio::time::sleep_until(next_look) => {}
                () = watch.stopped() => {}
            }
        }
    }

    /// Ends every long poll with the state its task has (the server is shutting down).
    pub fn stop_waiting(&self) {
        self.waiters.stop();
    }

    /// The caller's tasks, newest first, `limit` (1–100, default 20) after the task `after`.
    pub async fn list_tasks(
        &self,
        caller: &Caller,
        limit: Option<u32>,
        after: Option<&str>,
    ) -> Result<List<Task>> {
        let limit = limit.unwrap_or(20);
        if !(1..=MAX_LIST_LIMIT).contains(&limit) {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "limit",
                format!("`limit` must be 1 to {MAX_LIST_LIMIT}, not {limit}."),
            ));
        }
        let no_such_task = || {
            Error::invalid(
                ErrorCode::ResourceNotFound,
                "after",
                "`after` names no task of this account (or one past the retention); \
                 page with the `id` of a task the previous page listed.",
            )
        };
        // No task id holds a NUL, and PostgreSQL refuses one in a comparison.
        if after.is_some_and(|id| id.contains('\0')) {
            return Err(no_such_task());
        }
        let not_before = self.now() - self.config.retention;
        let mut records = self
            .store
            .list_tasks(&caller.account_id, limit + 1, after, not_before)
            .await?
            .ok_or_else(no_such_task)?;
        let has_more = records.len() > limit as usize;
        records.truncate(limit as usize);
        Ok(List {
            object: "list".to_owned(),
            data: self.views(&records).await?,
            has_more,
        })
    }

    /// Cancels a queued or running task and refunds its whole cost; a running one's run is
    /// stopped (its provider asked to stop). A cancelled task stays cancelled (no second refund);
    /// a finished one cannot be cancelled.
    pub async fn cancel_task(&self, caller: &Caller, id: &str) -> Result<Task> {
        self.live_task(caller, id).await?;
        match self
            .store
            .cancel_task(&caller.account_id, id, self.now())
            .await?
        {
            CancelOutcome::Canceled(record) => {
                if let Some(run) = self.running.get(id) {
                    run.notify_one();
                }
                self.metrics.credits_refunded.inc_by(record.cost);
                self.metrics.task_finished(TaskStatus::Canceled.as_str());
                self.waiters.finished(id);
                if record.webhook_url.is_some() {
                    self.webhooks_ready.notify_one();
                }
                Ok(self.views(&[record]).await?.remove(0))
            }
            CancelOutcome::AlreadyCanceled(record) => Ok(self.views(&[record]).await?.remove(0)),
            CancelOutcome::NotCancelable(record) => Err(Error::NotCancelable {
                id: record.id,
                status: record.status,
            }),
            CancelOutcome::NotFound => Err(Error::NotFound {
                what: "task",
                id: id.to_owned(),
            }),
        }
    }

    /// The PNG bytes of image `index` of a task.
    pub async fn task_image(&self, caller: &Caller, id: &str, index: &str) -> Result<Vec<u8>> {
        let record = self.live_task(caller, id).await?;
        let not_found = || Error::NotFound {
            what: "image",
            id: format!("{}/images/{}", record.id, shorten(index)),
        };
        let index: u8 = index.parse().map_err(|_| not_found())?;
        if record.status != TaskStatus::Succeeded || index >= record.n {
            return Err(not_found());
        }
        self.images
            .get(&record.id, index)
            .await?
            .ok_or_else(not_found)
    }

    /// The PNG bytes behind a signed image link (`/v1/links/{task}/{index}.png?expires=…&
    /// signature=…`), and the seconds the link has left. No API key: the signature is the
    /// credential. A forged or altered link is 404, an authentic one past its expiry 410
    /// `url_expired`, and the task's own 410 holds past the retention.
    pub async fn linked_image(
        &self,
        task_id: &str,
        file: &str,
        expires: &str,
        signature: &str,
    ) -> Result<(Vec<u8>, u64)> {
        let not_found = || Error::NotFound {
            what: "image link",
            id: shorten(&format!("{task_id}/{file}")),
        };
        let index: u8 = file
            .strip_suffix(".png")
            .and_then(|i| i.parse().ok())
            .ok_or_else(not_found)?;
        let left = self
            .links
            .check(task_id, index, expires, signature, self.now())
            .map_err(|refusal| match refusal {
                LinkRefusal::Forged => not_found(),
                LinkRefusal::Expired => Error::LinkExpired,
            })?;
        let record = self.find_task(task_id).await?.ok_or_else(not_found)?;
        if record.purged || self.now() >= self.expires_at(&record) {
            return Err(Error::Gone {
                what: "task",
                id: record.id,
                retention: self.config.retention,
            });
        }
        if record.status != TaskStatus::Succeeded || index >= record.n {
            return Err(not_found());
        }
        let png = self
            .images
            .get(&record.id, index)
            .await?
            .ok_or_else(not_found)?;
        Ok((png, left))
    }

    /// A task by id, from the finished tasks kept in memory when it is one of them.
    async fn find_task(&self, id: &str) -> Result<Option<TaskRecord>> {
        if let Some(entry) = self.finished_tasks.get(id) {
            return Ok(Some(entry.record.clone()));
        }
        let found = self.store.get_task(id).await?;
        if let Some(record) = &found {
            self.finished_tasks.remember(record);
        }
        Ok(found)
    }

    pub(super) async fn live_task(&self, caller: &Caller, id: &str) -> Result<TaskRecord> {
        let record = self.find_task(id).await?.ok_or_else(|| Error::NotFound {
            what: "task",
            id: shorten(id),
        })?;
        self.check_live(caller, id, &record)?;
        Ok(record)
    }

    /// 404 for a task of another account (never 403), 410 once it is past the retention.
    pub(super) fn check_live(&self, caller: &Caller, id: &str, record: &TaskRecord) -> Result<()> {
        if record.account_id != caller.account_id {
            return Err(Error::NotFound {
                what: "task",
                id: shorten(id),
            });
        }
        if record.purged || self.now() >= self.expires_at(record) {
            return Err(Error::Gone {
                what: "task",
                id: record.id.clone(),
                retention: self.config.retention,
            });
        }
        Ok(())
    }

    pub(super) fn expires_at(&self, record: &TaskRecord) -> OffsetDateTime {
        record.created_at + self.config.retention
    }

    /// The wire form of tasks, with the deliveries of those that have a webhook.
    pub(super) async fn views(&self, records: &[TaskRecord]) -> Result<Vec<Task>> {
        let with_webhook: Vec<String> = records
            .iter()
            .filter(|r| r.webhook_url.is_some())
            .map(|r| r.id.clone())
            .collect();
        let deliveries = if with_webhook.is_empty() {
            Vec::new()
        } else {
            self.store.webhook_deliveries(&with_webhook).await?
        };
        Ok(records
            .iter()
            .map(|r| {
                let delivery = deliveries.iter().find(|d| d.task_id == r.id);
                self.task_view_with(r, delivery)
            })
            .collect())
    }

    /// The wire form of a task whose webhook (if any) has not been attempted yet.
    pub(crate) fn task_view(&self, record: &TaskRecord) -> Task {
        self.task_view_with(record, None)
    }

    /// The wire form of a task, with its webhook's delivery as stored.
    pub(crate) fn task_view_with(
        &self,
        record: &TaskRecord,
        delivery: Option<&WebhookDeliveryRecord>,
    ) -> Task {
        let webhook = record.webhook_url.as_ref().map(|url| match delivery {
            Some(d) => TaskWebhook {
                url: url.clone(),
                state: d.state,
                delivered_at: d.delivered_at,
                next_attempt_at: d
                    .next_attempt_at
                    .filter(|_| d.state == WebhookState::Pending),
                attempts: d
                    .history
                    .iter()
                    .map(|a| WebhookAttempt {
                        at: a.at,
                        status: a.status,
                        error: a.error.clone(),
                    })
                    .collect(),
            },
            None => TaskWebhook {
                url: url.clone(),
                state: WebhookState::Pending,
                delivered_at: None,
                next_attempt_at: None,
                attempts: Vec::new(),
            },
        });
        let mut task = self.task_view_plain(record);
        task.webhook = webhook;
        task
    }

    pub(super) fn task_view_plain(&self, record: &TaskRecord) -> Task {
        task_view(record, self.config.retention, &self.links, self.now())
    }

    // ---------------------------------------------------------------- accounts
}

/// The task as the API shows it, without its webhook's delivery state; its image links signed
/// at `now`, as paths (the HTTP layer and the webhook sender put the base URL before them).
pub(crate) fn task_view(
    record: &TaskRecord,
    retention: Duration,
    links: &ImageLinks,
    now: OffsetDateTime,
) -> Task {
    let images = if record.status == TaskStatus::Succeeded {
        (0..record.n)
            .map(|i| ImageRef {
                url: links.path(&record.id, i, now),
            })
            .collect()
    } else {
        Vec::new()
    };
    let error = match (&record.error_code, &record.error_message) {
        (Some(code), Some(message)) => Some(TaskError {
            code: code.clone(),
            message: message.clone(),
        }),
        _ => None,
    };
    Task {
        id: record.id.clone(),
        object: "task".to_owned(),
        status: record.status,
        model: record.model.clone(),
        prompt: record.prompt.clone(),
        n: record.n,
        size: record.size,
        seed: record.seed,
        cost: record.cost,
        created_at: record.created_at,
        completed_at: record.completed_at,
        expires_at: record.created_at + retention,
        images,
        error,
        webhook: None,
    }
}
