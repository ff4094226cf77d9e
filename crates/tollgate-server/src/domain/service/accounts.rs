//! Accounts, their keys, credits, ledger and webhook secrets.

use super::*;

impl Tollgate {
    /// The caller's own account.
    pub async fn account(&self, account_id: &str) -> Result<Account> {
        let mut record = self
            .store
            .get_account(account_id)
            .await?
            .ok_or_else(|| no_account(account_id))?;
        // Credits past their expiry leave the balance before anyone sees it (the expiry job
        // may not have come round yet).
        let now = self.now();
        if record.expiring.iter().any(|(_, at)| *at <= now) {
            self.store.expire_account_credits(account_id, now).await?;
            record = self
                .store
                .get_account(account_id)
                .await?
                .ok_or_else(|| no_account(account_id))?;
        }
        Ok(self.account_view(&record))
    }

    pub(crate) fn account_view(&self, record: &AccountRecord) -> Account {
        Account {
            id: record.id.clone(),
            name: record.name.clone(),
            credits: record.credits,
            rate_limit: record.rate_limit.unwrap_or(self.config.default_rate_limit),
            expiring: record
                .expiring
                .iter()
                .map(|(credits, expires_at)| tollgate_contract::ExpiringCredits {
                    credits: *credits,
                    expires_at: *expires_at,
                })
                .collect(),
            low_balance: record.low_balance.clone(),
        }
    }

    pub(super) fn validate_name(name: &str) -> Result<()> {
        let chars = name.chars().count();
        if name.trim().is_empty() || chars > MAX_NAME_CHARS {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "name",
                format!("`name` must be 1 to {MAX_NAME_CHARS} characters and not blank."),
            ));
        }
        refuse_nul("name", name)
    }

    pub(super) fn validate_rate_limit(limit: Option<RateLimit>) -> Result<()> {
        if let Some(limit) = limit {
            if limit.requests_per_minute == 0 {
                return Err(Error::invalid(
                    ErrorCode::InvalidValue,
                    "rate_limit.requests_per_minute",
                    "`rate_limit.requests_per_minute` must be at least 1.",
                ));
            }
            if limit.burst == 0 {
                return Err(Error::invalid(
                    ErrorCode::InvalidValue,
                    "rate_limit.burst",
                    "`rate_limit.burst` must be at least 1.",
                ));
            }
        }
        Ok(())
    }

    pub(super) fn new_key(
        &self,
        account_id: &str,
        spend_limit: Option<tollgate_contract::SpendLimit>,
    ) -> Result<(KeyRecord, String)> {
        let api_key = secrets::new_api_key()?;
        let record = KeyRecord {
            id: secrets::new_id("key")?,
            account_id: account_id.to_owned(),
            key_hash: secrets::hash_secret(&api_key),
            prefix: secrets::key_prefix(&api_key),
            created_at: self.now(),
            revoked_at: None,
            spend_limit,
        };
        Ok((record, api_key))
    }

    /// Operator: a new account with its first key (shown once).
    pub async fn create_account(&self, request: CreateAccountRequest) -> Result<CreatedAccount> {
        Self::validate_name(&request.name)?;
        Self::validate_rate_limit(request.rate_limit)?;
        if request.credits > MAX_CREDITS {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "credits",
                format!("`credits` must be at most {MAX_CREDITS}."),
            ));
        }
        let account = NewAccount {
            id: secrets::new_id("acct")?,
            name: request.name,
            credits: request.credits,
            rate_limit: request.rate_limit,
            created_at: self.now(),
            webhook_secret: Some(secrets::new_webhook_secret()?),
        };
        let (key, api_key) = self.new_key(&account.id, None)?;
        self.disk.ensure_headroom()?;
        let record = self.store.create_account(&account, &key).await?;
        self.key_cache.forget_unknown();
        Ok(CreatedAccount {
            account: self.account_view(&record),
            api_key,
        })
    }

    pub async fn list_accounts(&self) -> Result<List<Account>> {
        let records = self.store.list_accounts().await?;
        Ok(List {
            object: "list".to_owned(),
            data: records.iter().map(|r| self.account_view(r)).collect(),
            has_more: false,
        })
    }

    pub async fn update_account(&self, id: &str, request: UpdateAccountRequest) -> Result<Account> {
        if let Some(name) = &request.name {
            Self::validate_name(name)?;
        }
        Self::validate_rate_limit(request.rate_limit)?;
        if let Some(alert) = &request.low_balance {
            self.validate_low_balance(alert.as_ref()).await?;
        }
        let record = self
            .store
            .update_account(
                id,
                request.name.as_deref(),
                request.rate_limit,
                request.low_balance.as_ref().map(Option::as_ref),
            )
            .await?
            .ok_or_else(|| no_account(id))?;
        self.key_cache.forget_account(id);
        Ok(self.account_view(&record))
    }

    /// Operator: another key for an account (shown once), with a spend limit if asked.
    pub async fn create_key(
        &self,
        account_id: &str,
        request: tollgate_contract::CreateKeyRequest,
    ) -> Result<CreatedKey> {
        billing::validate_spend_limit(request.spend_limit)?;
        let (key, api_key) = self.new_key(account_id, request.spend_limit)?;
        self.disk.ensure_headroom()?;
        if !self.store.create_key(&key).await? {
            return Err(no_account(account_id));
        }
        self.key_cache.forget_unknown();
        Ok(CreatedKey {
            id: key.id,
            api_key,
        })
    }

    /// The account's ledger, newest first (`limit` 1–100, default 100), after the entry with id
    /// `after` when given: a page of the whole ledger, as `GET /v1/tasks` pages the tasks.
    pub async fn ledger(
        &self,
        account_id: &str,
        limit: Option<u32>,
        after: Option<i64>,
    ) -> Result<List<LedgerEntry>> {
        let limit = limit.unwrap_or(MAX_LIST_LIMIT);
        if !(1..=MAX_LIST_LIMIT).contains(&limit) {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "limit",
                format!("`limit` must be 1 to {MAX_LIST_LIMIT}, not {limit}."),
            ));
        }
        self.account(account_id).await?;
        let mut entries = self.store.ledger(account_id, limit + 1, after).await?;
        let has_more = entries.len() > limit as usize;
        entries.truncate(limit as usize);
        let data = entries
            .into_iter()
            .map(|e| LedgerEntry {
                id: e.id,
                object: "ledger_entry".to_owned(),
                delta: e.delta,
                balance_after: e.balance_after,
                kind: e.kind,
                task_id: e.task_id,
                note: e.note,
                purchase_id: e.purchase_id,
                created_at: e.created_at,
            })
            .collect();
        Ok(List {
            object: "list".to_owned(),
            data,
            has_more,
        })
    }

    /// Operator: the account's keys (never the keys themselves).
    pub async fn list_keys(&self, account_id: &str) -> Result<List<KeyInfo>> {
        self.account(account_id).await?;
        let mut data = Vec::new();
        for k in self.store.list_keys(account_id).await? {
            data.push(KeyInfo {
                spend_limit: self.key_spend(k.spend_limit, &k.id).await?,
                id: k.id,
                prefix: k.prefix,
                created_at: k.created_at,
                revoked_at: k.revoked_at,
            });
        }
        Ok(List {
            object: "list".to_owned(),
            data,
            has_more: false,
        })
    }

    /// Operator: revokes a key; the next request with it is refused.
    pub async fn revoke_key(&self, key_id: &str) -> Result<()> {
        if self.store.revoke_key(key_id, self.now()).await? {
            self.key_cache.forget_key(key_id);
            Ok(())
        } else {
            Err(Error::NotFound {
                what: "key",
                id: shorten(key_id),
            })
        }
    }

    /// Revokes a key of this account (an account holder managing their own keys); another
    /// account's key is "not found", like its tasks.
    pub async fn revoke_account_key(&self, account_id: &str, key_id: &str) -> Result<()> {
        let owned = self
            .store
            .list_keys(account_id)
            .await?
            .iter()
            .any(|k| k.id == key_id && k.revoked_at.is_none());
        if !owned {
            return Err(Error::NotFound {
                what: "key",
                id: shorten(key_id),
            });
        }
        self.revoke_key(key_id).await
    }

    /// Operator: adds (or, negative, removes) credits, with a ledger entry.
    pub async fn add_credits(
        &self,
        account_id: &str,
        request: AddCreditsRequest,
    ) -> Result<Account> {
        if request.amount == 0 || request.amount.unsigned_abs() > MAX_CREDITS {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "amount",
                format!("`amount` must not be zero, and at most {MAX_CREDITS} either way."),
            ));
        }
        if request
            .note
            .as_ref()
            .is_some_and(|n| n.chars().count() > MAX_CREDIT_NOTE_CHARS)
        {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "note",
                format!("`note` must be at most {MAX_CREDIT_NOTE_CHARS} characters."),
            ));
        }
        if let Some(note) = &request.note {
            refuse_nul("note", note)?;
        }
        if let Some(expires_at) = request.expires_at {
            if request.amount < 0 {
                return Err(Error::invalid(
                    ErrorCode::InvalidValue,
                    "expires_at",
                    "`expires_at` is for a grant: a correction (a negative `amount`) takes no expiry.",
                ));
            }
            if expires_at <= self.now() {
                return Err(Error::invalid(
                    ErrorCode::InvalidValue,
                    "expires_at",
                    "`expires_at` must be in the future.",
                ));
            }
        }
        self.disk.ensure_headroom()?;
        let record = self
            .store
            .add_credits(
                account_id,
                request.amount,
                request.note.as_deref(),
                request.expires_at,
                self.now(),
            )
            .await?
            .ok_or_else(|| no_account(account_id))?;
        Ok(self.account_view(&record))
    }

    // ---------------------------------------------------------------- webhooks

    /// The secret that signs the account's webhooks, made now for an account older than
    /// webhooks.
    pub(crate) async fn webhook_secret_of(&self, account_id: &str) -> Result<String> {
        webhooks::secret_of(self.store.as_ref(), account_id)
            .await?
            .ok_or_else(|| no_account(account_id))
    }

    /// `GET /v1/account/webhook-secret`: the caller's webhook secret.
    pub async fn webhook_secret(&self, caller: &Caller) -> Result<WebhookSecret> {
        Ok(WebhookSecret {
            object: "webhook_secret".to_owned(),
            secret: self.webhook_secret_of(&caller.account_id).await?,
        })
    }

    /// `POST /v1/account/webhook-secret`: a new secret; deliveries from now on are signed with it.
    pub async fn rotate_webhook_secret(&self, caller: &Caller) -> Result<WebhookSecret> {
        let secret = secrets::new_webhook_secret()?;
        if !self
            .store
            .set_webhook_secret(&caller.account_id, &secret)
            .await?
        {
            return Err(no_account(&caller.account_id));
        }
        tracing::info!(account_id = %caller.account_id, "webhook secret rotated");
        Ok(WebhookSecret {
            object: "webhook_secret".to_owned(),
            secret,
        })
    }

    // ---------------------------------------------------------------- idempotency
}
