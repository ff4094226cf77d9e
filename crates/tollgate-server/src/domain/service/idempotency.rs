//! `Idempotency-Key` reservations and the responses stored under them.

use super::*;

impl Tollgate {
    pub async fn idempotency_begin(&self, scope: &IdempotencyScope) -> Result<IdempotencyBegin> {
        let now = self.now();
        // A reservation this process could not release (the store failed) belongs to a request
        // known to have ended without a response: its retry takes it over at once instead of
        // waiting for it to go stale. Taken out of the set first, so one retry alone does.
        let abandoned = self
            .abandoned_reservations
            .remove(&(scope.scope.clone(), scope.key.clone()))
            .is_some();
        let stale_before = if abandoned {
            now + Duration::from_millis(1)
        } else {
            now - STALE_RESERVATION
        };
        let begun = self.store.idempotency_begin(scope, now, stale_before).await;
        if abandoned && begun.is_err() {
            self.abandoned_reservations
                .insert((scope.scope.clone(), scope.key.clone()));
        }
        begun
    }

    pub async fn idempotency_complete(
        &self,
        scope: &IdempotencyScope,
        response: &StoredResponse,
    ) -> Result<()> {
        self.store.idempotency_complete(scope, response).await
    }

    /// Releases the reservation of a request that ended without a response to keep. When the
    /// store cannot (it is the store's fault that the request failed, often), the reservation
    /// is remembered as abandoned, for [`Tollgate::idempotency_begin`].
    pub async fn idempotency_release(&self, scope: &IdempotencyScope) -> Result<()> {
        let released = self.store.idempotency_release(scope).await;
        if released.is_err() {
            self.abandoned_reservations
                .insert((scope.scope.clone(), scope.key.clone()));
        }
        released
    }

    // ---------------------------------------------------------------- retention
}
