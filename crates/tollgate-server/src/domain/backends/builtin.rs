//! The built-in backend: the offline, deterministic renderer of `domain/generator.rs`, run off
//! the async runtime. The same task always gives the same PNG bytes, so a task run again after a
//! crash gives the images the first run would have given.

use super::{Backend, BackendError};
use crate::domain::generator;
use crate::store::TaskRecord;
use async_trait::async_trait;
use tokio::time::Instant;

/// The reference renderer; needs nothing installed and nothing on the network.
#[derive(Debug, Clone, Copy, Default)]
pub struct Builtin;

#[async_trait]
impl Backend for Builtin {
    fn name(&self) -> &'static str {
        "builtin"
    }

    async fn generate(
        &self,
        task: &TaskRecord,
        _deadline: Instant,
    ) -> Result<Vec<Vec<u8>>, BackendError> {
        let (prompt, seed, size, n) = (task.prompt.clone(), task.seed, task.size, task.n);
        tokio::task::spawn_blocking(move || {
            (0..n)
                .map(|index| generator::render(&prompt, seed, size, index))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| BackendError::Internal(format!("generator thread: {e}")))?
        .map_err(|e| BackendError::Internal(e.to_string()))
    }
}
