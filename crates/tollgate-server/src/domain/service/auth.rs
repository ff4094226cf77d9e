//! Who is calling: API keys, the account's rate limit, the operator's token.

use super::*;

impl Tollgate {
    /// Checks an API key. A revocation made here takes effect on the very next request (the key
    /// cache is told before the revocation returns); one made by another instance sharing the
    /// store, within a second (the store's change feed tells the cache, see caches.rs).
    pub async fn authenticate(&self, api_key: Option<&str>) -> Result<Caller> {
        let key = api_key.ok_or(Error::MissingCredential { admin: false })?;
        if !key.starts_with(secrets::API_KEY_PREFIX) {
            return Err(Error::InvalidCredential { admin: false });
        }
        let digest = secrets::key_digest(key);
        let auth = match self.key_cache.get(&digest) {
            Cached::Live(auth) => auth,
            Cached::Unknown => return Err(Error::InvalidCredential { admin: false }),
            Cached::Miss => {
                let epoch = self.key_cache.epoch();
                let found = self.store.authenticate(&secrets::hex(&digest)).await?;
                self.key_cache.remember(epoch, &digest, found.as_ref());
                found.ok_or(Error::InvalidCredential { admin: false })?
            }
        };
        Ok(Caller {
            account_id: auth.account_id,
            key_id: auth.key_id,
            rate_limit: auth.rate_limit.unwrap_or(self.config.default_rate_limit),
            spend_limit: auth.spend_limit,
        })
    }

    /// Counts one request against the caller's rate limit.
    pub async fn admit(&self, caller: &Caller) -> Result<Admission> {
        let admission = self
            .limits
            .check(&caller.account_id, caller.rate_limit)
            .await?;
        if !admission.admitted() {
            self.metrics.rate_limited.inc();
        }
        Ok(admission)
    }

    /// The hash the operator's token must match (dashboard sessions remember it).
    pub(crate) fn admin_token_hash(&self) -> &str {
        &self.admin_token_hash
    }

    /// Checks the operator's token.
    pub fn authenticate_admin(&self, token: Option<&str>) -> Result<()> {
        let token = token.ok_or(Error::MissingCredential { admin: true })?;
        if secrets::constant_time_eq(&secrets::hash_secret(token), &self.admin_token_hash) {
            Ok(())
        } else {
            Err(Error::InvalidCredential { admin: true })
        }
    }

    // ---------------------------------------------------------------- tasks
}
