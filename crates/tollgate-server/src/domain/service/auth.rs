//! Who is calling: API keys, the account's rate limit, the operator's token.

use super::*;

impl Tollgate {
    /// Checks an API key. A revocation takes effect on the very next request: on a store shared
    /// with other instances every call asks the store; on a store of this process alone the
    /// answer may come from the key cache, which every revocation here updates first.
    pub async fn authenticate(&self, api_key: Option<&str>) -> Result<Caller> {
        let key = api_key.ok_or(Error::MissingCredential { admin: false })?;
        if !key.starts_with(secrets::API_KEY_PREFIX) {
            return Err(Error::InvalidCredential { admin: false });
        }
        let digest = secrets::key_digest(key);
        let cached = match &self.key_cache {
            Some(cache) => cache.get(&digest),
            None => Cached::Miss,
        };
        let auth = match cached {
            Cached::Live(auth) => auth,
            Cached::Unknown => return Err(Error::InvalidCredential { admin: false }),
            Cached::Miss => {
                let epoch = self.key_cache.as_ref().map(KeyCache::epoch);
                let found = self.store.authenticate(&secrets::hex(&digest)).await?;
                if let (Some(cache), Some(epoch)) = (&self.key_cache, epoch) {
                    cache.remember(epoch, &digest, found.as_ref());
                }
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
