//! [`Store`] on SQLite: the embedded default, one file under the data directory.
//!
//! WAL mode with `synchronous = FULL`: a commit is on disk before the call returns, so a 202 is
//! never sent for a task a crash could lose. All writes go through a pool of one connection:
//! SQLite admits one writer at a time anyway, and serialising in-process avoids `SQLITE_BUSY`
//! when a read transaction would upgrade to a write. Reads use a separate pool and run in parallel.
//!
//! The statements are `sql.rs`'s, and task creations go through the group commit
//! (`group_commit.rs`) with one writer; what is SQLite's own is here: connecting and pragmas.

use super::engine::Engine;
use super::sql::SqlStore;
use super::*;
use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Sqlite;
use std::path::Path;
use std::time::Duration;

/// SQLite-backed storage.
pub type SqliteStore = SqlStore<SqliteEngine>;

/// SQLite's connections: one writer, several readers, and the group-commit writer's queue.
pub struct SqliteEngine {
    write: SqlitePool,
    read: SqlitePool,
}

#[async_trait]
impl Engine for SqliteEngine {
    type Db = Sqlite;

    const SHARED: bool = false;
    // IMMEDIATE: the write lock is taken at BEGIN, so a transaction never fails halfway on
    // upgrading a read lock.
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
    // In WAL mode a read transaction sees one snapshot from its first read on.
    const BEGIN_SNAPSHOT: &'static str = "BEGIN";
    const SKIP_LOCKED: &'static str = "";
    const FOR_UPDATE: &'static str = "";
    // One writer: SQLite has one write connection anyway.
    const CREATE_WRITERS: usize = 1;

    fn readers(&self) -> &SqlitePool {
        &self.read
    }

    fn writers(&self) -> &SqlitePool {
        &self.write
    }
}

impl SqliteStore {
    /// Opens (creating if needed) `tollgate.db` in `dir` and brings its schema up to date.
    pub async fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        Self::open_file(&dir.join("tollgate.db")).await
    }

    /// Opens (creating if needed) the database file at `path`.
    pub async fn open_file(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        migrations::sqlite().run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.read_only(true))
            .await?;
        Ok(SqlStore::new(SqliteEngine { write, read }))
    }
}
