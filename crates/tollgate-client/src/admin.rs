//! [`AdminClient`]: typed calls for the operator's routes (`/admin/...`, admin token).
//!
//! It is a [`Client`] authenticated with the operator's token instead of an API key, so the
//! operator's calls get the same retries, idempotency keys, budget and errors. It is a separate
//! type so that an API-key client cannot call an admin route by mistake, nor the reverse.

use std::fmt;

use http::Method;
use tollgate_contract::types::{
    Account, AddCreditsRequest, CreateAccountRequest, CreatedAccount, CreatedKey, KeyInfo,
    LedgerEntry, List, UpdateAccountRequest,
};

use crate::client::{decode, segment, Client, ClientBuilder, ListParams};
use crate::error::Result;

/// The SDK for the operator's routes.
#[derive(Clone)]
pub struct AdminClient {
    client: Client,
}

impl fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminClient")
            .field("client", &self.client)
            .finish()
    }
}

impl AdminClient {
    /// A builder; set the token with [`ClientBuilder::admin_token`] and finish with
    /// [`ClientBuilder::build_admin`].
    pub fn builder(base_url: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(base_url)
    }

    /// `TOLLGATE_BASE_URL` and `TOLLGATE_ADMIN_TOKEN`.
    pub fn from_env() -> Result<AdminClient> {
        let mut b = ClientBuilder::from_env();
        if let Some(token) = std::env::var(crate::client::ENV_ADMIN_TOKEN)
            .ok()
            .filter(|v| !v.is_empty())
        {
            b = b.admin_token(token);
        }
        b.build_admin()
    }

    pub(crate) fn from_client(client: Client) -> Self {
        AdminClient { client }
    }

    /// The underlying client (its retrier, base URL, deadline).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The same admin client with another overall deadline per call.
    pub fn with_deadline(&self, deadline: Option<std::time::Duration>) -> AdminClient {
        AdminClient {
            client: self.client.with_deadline(deadline),
        }
    }

    /// `POST /admin/accounts`: the account and its first API key, shown this once.
    pub async fn create_account(&self, request: &CreateAccountRequest) -> Result<CreatedAccount> {
        self.client
            .post_json("/admin/accounts", request, None)
            .await
    }

    /// `GET /admin/accounts`.
    pub async fn list_accounts(&self, params: &ListParams) -> Result<List<Account>> {
        self.client
            .get_json(&format!("/admin/accounts{}", params.query()))
            .await
    }

    /// `GET /admin/accounts/{id}`.
    pub async fn get_account(&self, id: &str) -> Result<Account> {
        self.client
            .get_json(&format!("/admin/accounts/{}", segment(id, "account id")?))
            .await
    }

    /// `PATCH /admin/accounts/{id}` (extension): rename, or change the rate limit.
    pub async fn update_account(
        &self,
        id: &str,
        request: &UpdateAccountRequest,
    ) -> Result<Account> {
        self.client
            .patch_json(
                &format!("/admin/accounts/{}", segment(id, "account id")?),
                request,
            )
            .await
    }

    /// `POST /admin/accounts/{id}/keys`: a new API key, shown this once.
    pub async fn create_key(&self, account_id: &str) -> Result<CreatedKey> {
        let path = format!(
            "/admin/accounts/{}/keys",
            segment(account_id, "account id")?
        );
        decode(self.client.send(Method::POST, &path, None, None).await?)
    }

    /// `POST /admin/accounts/{id}/keys` with a body: a new key with a spend limit.
    pub async fn create_key_with(
        &self,
        account_id: &str,
        request: &tollgate_contract::CreateKeyRequest,
    ) -> Result<CreatedKey> {
        let path = format!(
            "/admin/accounts/{}/keys",
            segment(account_id, "account id")?
        );
        self.client.post_json(&path, request, None).await
    }

    /// `GET /admin/accounts/{id}/keys` (extension): the account's keys, without the secrets.
    pub async fn list_keys(&self, account_id: &str) -> Result<List<KeyInfo>> {
        self.client
            .get_json(&format!(
                "/admin/accounts/{}/keys",
                segment(account_id, "account id")?
            ))
            .await
    }

    /// `GET /admin/accounts/{id}/ledger?limit=&after=`: a page of the account's balance
    /// changes, newest first, as [`crate::Client::ledger`].
    pub async fn ledger(&self, account_id: &str, params: &ListParams) -> Result<List<LedgerEntry>> {
        let path = format!(
            "/admin/accounts/{}/ledger{}",
            segment(account_id, "account id")?,
            params.query()
        );
        self.client.get_json(&path).await
    }

    /// `DELETE /admin/keys/{key_id}`: revokes a key at once.
    pub async fn revoke_key(&self, key_id: &str) -> Result<()> {
        let path = format!("/admin/keys/{}", segment(key_id, "key id")?);
        self.client
            .send(Method::DELETE, &path, None, None)
            .await
            .map(|_| ())
    }

    /// `POST /admin/accounts/{id}/credits`: adds (or, negative, corrects) credits; the account
    /// with its new balance.
    pub async fn add_credits(
        &self,
        account_id: &str,
        request: &AddCreditsRequest,
    ) -> Result<Account> {
        let path = format!(
            "/admin/accounts/{}/credits",
            segment(account_id, "account id")?
        );
        self.client.post_json(&path, request, None).await
    }
}
