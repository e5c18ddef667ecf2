//! SQLite as the state store's [`Dialect`], for the embedded mode: the
//! store's one SQL text over the schema in `schemas/migrations/sqlite/state/`
//! (PostgreSQL's tables and column names), so the same errors in the same
//! situations, the same orderings and the same audit entries in the same
//! transactions as [`PgState`](super::postgres::PgState).
//!
//! Encodings: times are INTEGER microseconds since the epoch ([`micros`],
//! [`from_micros`]), so SQL compares and orders them exactly and at
//! PostgreSQL's resolution; money is the decimal's exact text (zero as `0`,
//! as sqlx writes it to PostgreSQL), parsed back with rust_decimal (never
//! REAL); JSON is text. Tables are `STRICT`.
//!
//! Durability: WAL with `synchronous=FULL` (every commit is fsynced before
//! it returns), foreign keys on, a 30 s busy timeout. The state needs a file
//! of its own (not the usage store's): both record their migrations in
//! `schema_migrations`, and `migrate` refuses a file whose
//! recorded migrations are another store's.
//!
//! Concurrency: SQLite has one writer at a time. Every write transaction
//! starts with `BEGIN IMMEDIATE` (sqlx's `begin_with`), which takes the
//! write lock up front, so a transaction never fails to upgrade a read lock
//! to a write lock (`SQLITE_BUSY`) half way through; a writer that finds the
//! lock taken waits (busy timeout). Within one store from `SqliteState::open`,
//! writes also go through a pool of one connection, so this process's
//! writers queue in order instead of polling the lock; reads use a separate
//! pool and, in WAL mode, neither wait for writers nor block them. Holding
//! the write lock for the whole transaction is what `SELECT … FOR UPDATE`
//! on the customer and on the invoice counter is in PostgreSQL: changes to
//! one customer's plan history and finalization batches are serialized,
//! and the invoice numbers stay gapless.

use super::dialect::{sqlx_statements, Arg, Dialect, Query};
use super::sql::SqlState;
use super::{StateError, StateResult, StateRow};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Executor, Row, Sqlite, Transaction};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// The billing state in SQLite.
pub type SqliteState = SqlState<SqliteDialect>;

#[derive(Clone)]
pub struct SqliteDialect {
    /// Write transactions (`BEGIN IMMEDIATE`); one connection when opened
    /// by [`SqliteState::open`].
    writer: SqlitePool,
    reader: SqlitePool,
}

/// How long a writer waits for another connection's write lock.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// A time as stored: microseconds since the epoch (PostgreSQL's resolution;
/// finer parts are dropped, as PostgreSQL drops them).
pub fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// A stored time.
pub fn from_micros(us: i64) -> StateResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(us)
        .ok_or_else(|| StateError::Invalid(format!("stored time {us} is out of range")))
}

/// A decimal as stored: its exact text, scale included; zero is `0`
/// whatever its scale or sign, as sqlx stores it in PostgreSQL's NUMERIC.
fn dec_text(d: Decimal) -> String {
    if d.is_zero() {
        "0".into()
    } else {
        d.to_string()
    }
}

fn now_micros() -> i64 {
    micros(Utc::now())
}

impl StateRow for SqliteRow {
    fn opt_text(&self, col: &str) -> StateResult<Option<String>> {
        Ok(self.try_get(col)?)
    }
    fn opt_int(&self, col: &str) -> StateResult<Option<i64>> {
        Ok(self.try_get(col)?)
    }
    fn opt_bigint(&self, col: &str) -> StateResult<Option<i64>> {
        Ok(self.try_get(col)?)
    }
    fn opt_flag(&self, col: &str) -> StateResult<Option<bool>> {
        Ok(self.try_get(col)?)
    }
    fn opt_time(&self, col: &str) -> StateResult<Option<DateTime<Utc>>> {
        self.try_get::<Option<i64>, _>(col)?
            .map(from_micros)
            .transpose()
    }
    fn opt_decimal(&self, col: &str) -> StateResult<Option<Decimal>> {
        self.try_get::<Option<String>, _>(col)?
            .map(|s| {
                Decimal::from_str(&s).map_err(|e| {
                    StateError::Invalid(format!("stored {col} {s:?} is not a decimal: {e}"))
                })
            })
            .transpose()
    }
    fn opt_json(&self, col: &str) -> StateResult<Option<serde_json::Value>> {
        self.try_get::<Option<String>, _>(col)?
            .map(|s| {
                serde_json::from_str(&s)
                    .map_err(|e| StateError::Invalid(format!("stored {col} is not JSON: {e}")))
            })
            .transpose()
    }
}

impl SqliteState {
    /// Opens (creating if needed) the state database at `path`: WAL,
    /// `synchronous=FULL`, foreign keys on, a 30 s busy timeout; a pool of
    /// one connection for writes and one of four for reads.
    pub async fn open(path: &Path) -> StateResult<Self> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        // The writer first: it creates the file and switches it to WAL.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(opts.clone().create_if_missing(true))
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        Ok(SqlState {
            db: SqliteDialect { writer, reader },
        })
    }

    /// Over an existing pool, for reads and writes. Its connections should
    /// have a busy timeout and foreign keys on (sqlx's default): writes
    /// still begin with `BEGIN IMMEDIATE` and wait for the lock.
    pub fn from_pool(pool: SqlitePool) -> Self {
        SqlState {
            db: SqliteDialect {
                writer: pool.clone(),
                reader: pool,
            },
        }
    }

    /// The pool reads use.
    pub fn pool(&self) -> &SqlitePool {
        &self.db.reader
    }
}

type Bound<'q> = sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>;

/// The statement with its arguments in this schema's encodings.
fn bound(sql: &str, args: Vec<Arg>) -> Bound<'_> {
    args.into_iter().fold(sqlx::query(sql), |x, a| match a {
        Arg::Text(v) => x.bind(v),
        Arg::Int(v) => x.bind(v),
        Arg::BigInt(v) => x.bind(v),
        Arg::Flag(v) => x.bind(v),
        Arg::Time(v) => x.bind(v.map(micros)),
        Arg::Decimal(v) => x.bind(v.map(dec_text)),
        Arg::Json(v) => x.bind(v.map(|j| j.to_string())),
    })
}

impl Dialect for SqliteDialect {
    type Tx = Transaction<'static, Sqlite>;
    type Row = SqliteRow;
    // A write transaction holds the database's only write lock from
    // `BEGIN IMMEDIATE` to commit: every row it reads is already its own.
    const FOR_UPDATE: &'static str = "";
    const SKIP_LOCKED: &'static str = "";

    async fn migrate(&self) -> StateResult<()> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, \
             applied_at INTEGER NOT NULL DEFAULT (unixepoch() * 1000000))",
        )
        .execute(&self.writer)
        .await?;
        for m in schemas::migrations::SQLITE_STATE {
            // The write lock serializes concurrent starts.
            let mut tx = self.begin().await?;
            let done: Option<String> =
                sqlx::query_scalar("SELECT name FROM schema_migrations WHERE version = ?1")
                    .bind(m.version as i64)
                    .fetch_optional(&mut *tx)
                    .await?;
            match done {
                Some(name) if name == m.name => {}
                Some(name) => {
                    return Err(StateError::Invalid(format!(
                        "this database's migration {} is {name:?}, not the billing state's {:?}: \
                         the billing state needs a SQLite file of its own",
                        m.version, m.name
                    )))
                }
                None => {
                    // A plain string runs as several statements.
                    (&mut *tx).execute(m.sql).await?;
                    sqlx::query(
                        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
                    )
                    .bind(m.version as i64)
                    .bind(m.name)
                    .bind(now_micros())
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await?;
        }
        Ok(())
    }

    /// A write transaction holding SQLite's write lock from its start.
    async fn begin(&self) -> sqlx::Result<Self::Tx> {
        self.writer.begin_with("BEGIN IMMEDIATE").await
    }

    /// A deferred transaction on the read pool: in WAL mode one snapshot
    /// from its first read, without waiting for writers.
    async fn snapshot(&self) -> sqlx::Result<Self::Tx> {
        self.reader.begin().await
    }

    async fn commit(tx: Self::Tx) -> sqlx::Result<()> {
        tx.commit().await
    }

    sqlx_statements!(SqliteRow, reader, writer);
}
