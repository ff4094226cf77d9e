//! What [`super::sql::SqlStore`] needs of a database engine, and the statements it sends.
//!
//! The statements are written once, with `$N` placeholders (PostgreSQL's, which sqlx's SQLite
//! driver reads as numbered parameters too), and bound through [`Arg`]: the handful of value kinds
//! the schema stores (BIGINT, TEXT, bytes). That small indirection is what lets one body of SQL
//! code run on both engines: sqlx's own generic API would need each function to restate the
//! `Encode`/`Type`/`Executor` bounds of every value it binds, for every engine.

use super::rows::Columns;
use crate::error::Result;
use async_trait::async_trait;
use sqlx::pool::PoolConnection;
use sqlx::Pool;
use std::borrow::Cow;
use std::ops::{Deref, DerefMut};

/// A value bound to a statement.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Int(Option<i64>),
    Text(Option<&'a str>),
    Bytes(Option<&'a [u8]>),
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::Int(Some(v))
    }
}

impl From<Option<i64>> for Arg<'_> {
    fn from(v: Option<i64>) -> Self {
        Arg::Int(v)
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::Text(Some(v))
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(v: &'a String) -> Self {
        Arg::Text(Some(v))
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Arg::Text(v)
    }
}

impl<'a> From<&'a Option<String>> for Arg<'a> {
    fn from(v: &'a Option<String>) -> Self {
        Arg::Text(v.as_deref())
    }
}

impl<'a> From<&'a [u8]> for Arg<'a> {
    fn from(v: &'a [u8]) -> Self {
        Arg::Bytes(Some(v))
    }
}

/// One SQL statement with its arguments, in the order of their `$N`.
#[derive(Debug, Clone)]
pub struct Stmt<'a> {
    pub sql: Cow<'a, str>,
    pub args: Vec<Arg<'a>>,
}

/// A statement, to be bound and run: `q("… $1 …").bind(x).execute(&mut *conn)`.
pub fn q<'a>(sql: impl Into<Cow<'a, str>>) -> Stmt<'a> {
    Stmt {
        sql: sql.into(),
        args: Vec::new(),
    }
}

impl<'a> Stmt<'a> {
    pub fn bind(mut self, arg: impl Into<Arg<'a>>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Runs it; the number of rows it changed.
    pub async fn execute<C: Conn>(self, conn: &mut C) -> Result<u64> {
        conn.execute(self).await
    }

    pub async fn fetch_optional<C: Conn>(self, conn: &mut C) -> Result<Option<C::Row>> {
        conn.fetch_optional(self).await
    }

    pub async fn fetch_all<C: Conn>(self, conn: &mut C) -> Result<Vec<C::Row>> {
        conn.fetch_all(self).await
    }
}

/// `$from, $from+1, …`: `count` numbered placeholders, for an `IN (…)` list or a row of `VALUES`.
pub fn placeholders(from: usize, count: usize) -> String {
    let mut marks = String::with_capacity(count * 5);
    for n in from..from + count {
        if n > from {
            marks.push_str(", ");
        }
        marks.push('$');
        marks.push_str(itoa::Buffer::new().format(n));
    }
    marks
}

/// `($1, …, $width), ($width+1, …), …`: the placeholders of a multi-row `VALUES` of `rows` rows.
pub fn value_rows(rows: usize, width: usize) -> String {
    (0..rows)
        .map(|row| format!("({})", placeholders(row * width + 1, width)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One engine's connection: runs a [`Stmt`].
#[async_trait]
pub trait Conn: Send {
    type Row: Columns + Send;
    async fn execute(&mut self, stmt: Stmt<'_>) -> Result<u64>;
    async fn fetch_optional(&mut self, stmt: Stmt<'_>) -> Result<Option<Self::Row>>;
    async fn fetch_all(&mut self, stmt: Stmt<'_>) -> Result<Vec<Self::Row>>;
}

/// Implements [`Conn`] for an sqlx connection type whose engine encodes our three value kinds.
macro_rules! conn_for {
    ($conn:ty, $row:ty) => {
        #[async_trait]
        impl Conn for $conn {
            type Row = $row;

            async fn execute(&mut self, stmt: Stmt<'_>) -> Result<u64> {
                Ok(bound(&stmt).execute(self).await?.rows_affected())
            }

            async fn fetch_optional(&mut self, stmt: Stmt<'_>) -> Result<Option<$row>> {
                Ok(bound(&stmt).fetch_optional(self).await?)
            }

            async fn fetch_all(&mut self, stmt: Stmt<'_>) -> Result<Vec<$row>> {
                Ok(bound(&stmt).fetch_all(self).await?)
            }
        }
    };
}

/// The sqlx query of `stmt`, with its arguments bound.
fn bound<'q, DB>(stmt: &'q Stmt<'_>) -> sqlx::query::Query<'q, DB, DB::Arguments<'q>>
where
    DB: sqlx::Database,
    Option<i64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<&'q [u8]>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let mut query = sqlx::query::<DB>(&stmt.sql);
    for arg in &stmt.args {
        query = match *arg {
            Arg::Int(v) => query.bind(v),
            Arg::Text(v) => query.bind(v),
            Arg::Bytes(v) => query.bind(v),
        };
    }
    query
}

conn_for!(sqlx::SqliteConnection, sqlx::sqlite::SqliteRow);
conn_for!(sqlx::PgConnection, sqlx::postgres::PgRow);

/// A database engine: where connections come from, and what differs between dialects.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// sqlx's engine, whose connections run our statements.
    type Db: sqlx::Database<Connection: Conn>;

    /// Whether other processes may write to this database (several instances on one database).
    const SHARED: bool;
    /// Opens a write transaction.
    const BEGIN_WRITE: &'static str;
    /// Opens a read-only transaction that sees one snapshot throughout.
    const BEGIN_SNAPSHOT: &'static str;
    /// Ends a subquery that picks rows to claim: rows another transaction holds are skipped
    /// (empty where writers are serialised anyway).
    const SKIP_LOCKED: &'static str;
    /// Ends a select whose row the transaction goes on to update.
    const FOR_UPDATE: &'static str;

    /// Where reads get a connection.
    fn readers(&self) -> &Pool<Self::Db>;
    /// Where writes get a connection.
    fn writers(&self) -> &Pool<Self::Db>;

    /// Group-commit writers taking task creations side by side (`group_commit.rs`).
    const CREATE_WRITERS: usize;

    /// See `Store::follow_changes`: nothing to follow unless other processes write.
    async fn follow_changes(
        &self,
        _sink: std::sync::Arc<dyn super::changes::ChangeSink>,
        _stop: tokio::sync::watch::Receiver<bool>,
    ) {
    }
}

/// A connection of engine `E`, and one on loan from its pool.
pub type ConnOf<E> = <<E as Engine>::Db as sqlx::Database>::Connection;
pub type Pooled<E> = PoolConnection<<E as Engine>::Db>;

/// A transaction on one connection (`BEGIN` … `COMMIT`).
///
/// **The rule:** the connection goes back to the pool only after a `COMMIT` or `ROLLBACK` that
/// succeeded. After any error, and when the transaction is dropped unfinished (its request was
/// cancelled), the connection is closed instead, which rolls back whatever it still holds, and
/// the pool opens a fresh one. Why: SQLite ends a transaction by itself on some errors
/// (`SQLITE_FULL`, `SQLITE_IOERR`, `SQLITE_BUSY`), and a connection whose state is not known
/// must not carry the next request's writes: once, after a full disk, it held them in a
/// transaction that never committed while every write was answered as done (issue 16). sqlx's
/// own `Transaction` is not used for the same reason: its count of open transactions was what
/// drifted from SQLite's, turning every later `BEGIN`/`COMMIT` into a savepoint inside that dead
/// transaction. Savepoints inside a `Tx` are the caller's, under this rule.
pub struct Tx<E: Engine> {
    conn: Pooled<E>,
    ended: bool,
}

impl<E: Engine> Tx<E> {
    /// Runs `begin` (one of the engine's `BEGIN_*`) on `conn`.
    pub async fn begin(conn: Pooled<E>, begin: &'static str) -> Result<Tx<E>> {
        let mut tx = Tx { conn, ended: false };
        q(begin).execute(&mut *tx).await?;
        Ok(tx)
    }

    pub async fn commit(mut self) -> Result<()> {
        q("COMMIT").execute(&mut *self).await?;
        self.ended = true;
        Ok(())
    }

    pub async fn rollback(mut self) -> Result<()> {
        q("ROLLBACK").execute(&mut *self).await?;
        self.ended = true;
        Ok(())
    }
}

impl<E: Engine> Deref for Tx<E> {
    type Target = ConnOf<E>;
    fn deref(&self) -> &ConnOf<E> {
        &self.conn
    }
}

impl<E: Engine> DerefMut for Tx<E> {
    fn deref_mut(&mut self) -> &mut ConnOf<E> {
        &mut self.conn
    }
}

impl<E: Engine> Drop for Tx<E> {
    fn drop(&mut self) {
        if !self.ended {
            self.conn.close_on_drop();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_number_from_where_they_start() {
        assert_eq!(super::placeholders(1, 3), "$1, $2, $3");
        assert_eq!(super::placeholders(11, 2), "$11, $12");
        assert_eq!(super::placeholders(1, 0), "");
        assert_eq!(super::value_rows(2, 2), "($1, $2), ($3, $4)");
    }
}
