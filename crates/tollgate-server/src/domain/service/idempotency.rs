//! `Idempotency-Key` reservations and the responses stored under them.

use super::*;

/// Abandoned reservation times kept per key: a client retries a few times, not forever.
const ABANDONED_PER_KEY: usize = 8;

impl Tollgate {
    pub async fn idempotency_begin(&self, scope: &IdempotencyScope) -> Result<IdempotencyBegin> {
        let now = self.now();
        // A reservation this process made for a request known to have ended without a response
        // is taken over by the retry at once instead of after going stale; it is named by its
        // time, so another request's reservation under the same key never is. Taken out of the
        // map first, so one retry alone does.
        let id = (scope.scope.clone(), scope.key.clone());
        let mut abandoned = self
            .abandoned_reservations
            .remove(&id)
            .map(|(_, times)| times)
            .unwrap_or_default();
        let begun = self
            .store
            .idempotency_begin(scope, now, now - STALE_RESERVATION, &abandoned)
            .await;
        if begun.is_err() {
            // The store failed mid-reservation: the reservation may have been committed at
            // `now` even so (a lost answer to COMMIT), and its request is over (the client gets
            // the 503).
            abandoned.push(now);
            self.abandon(id, abandoned);
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

    /// Releases the reservation made `at`, whose request ended without a response to keep. When
    /// the store cannot (it is the store's fault that the request failed, often), the
    /// reservation is remembered as abandoned, for [`Tollgate::idempotency_begin`].
    pub async fn idempotency_release(
        &self,
        scope: &IdempotencyScope,
        at: OffsetDateTime,
    ) -> Result<()> {
        let released = self.store.idempotency_release(scope).await;
        if released.is_err() {
            self.abandon((scope.scope.clone(), scope.key.clone()), vec![at]);
        }
        released
    }

    fn abandon(&self, id: (String, String), times: Vec<OffsetDateTime>) {
        let mut entry = self.abandoned_reservations.entry(id).or_default();
        entry.extend(times);
        let excess = entry.len().saturating_sub(ABANDONED_PER_KEY);
        entry.drain(..excess);
    }

    // ---------------------------------------------------------------- retention
}
