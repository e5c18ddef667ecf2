//! What differs between the two SQL databases, and nothing else: how a
//! value is bound ([`Arg`] in each backend's encoding), how a transaction
//! starts (a row-locking transaction in PostgreSQL; `BEGIN IMMEDIATE` on
//! SQLite's single writer), which pool a read or a write goes to, the
//! row-lock clause, and the migrations. The SQL itself is written once, in
//! [`super::sql`], with `$N` placeholders (which sqlx's SQLite driver binds
//! by number as PostgreSQL does).

use super::{StateResult, StateRow};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use std::borrow::Cow;
use std::future::Future;

/// A bound value, in the store's own terms; each dialect encodes it
/// (PostgreSQL natively; SQLite as integer microseconds, decimal text and
/// JSON text).
#[derive(Debug, Clone)]
pub enum Arg {
    Text(Option<String>),
    /// A 32-bit INTEGER column (versions, seats, thresholds).
    Int(Option<i32>),
    /// A 64-bit column (ids, counters, limits).
    BigInt(Option<i64>),
    Flag(Option<bool>),
    Time(Option<DateTime<Utc>>),
    Decimal(Option<Decimal>),
    Json(Option<serde_json::Value>),
}

/// One statement and its arguments, `$1` being the first.
#[derive(Debug, Clone)]
pub struct Query {
    pub sql: Cow<'static, str>,
    pub args: Vec<Arg>,
}

/// A statement to bind arguments to.
pub fn q(sql: impl Into<Cow<'static, str>>) -> Query {
    Query {
        sql: sql.into(),
        args: Vec::new(),
    }
}

impl Query {
    pub fn bind(mut self, a: impl Into<Arg>) -> Self {
        self.args.push(a.into());
        self
    }
}

/// One SQL database as the state store uses it. Errors stay sqlx's, so that
/// the store can tell unique and foreign-key violations apart.
pub trait Dialect: Send + Sync + 'static {
    /// A write (or snapshot) transaction.
    type Tx: Send;
    type Row: StateRow + Send + Sync;

    /// Appended to a `SELECT` that must lock the rows it reads until
    /// commit: `FOR NO KEY UPDATE` where row locks exist (it leaves
    /// foreign-key checks of inserts referencing the row unblocked); empty
    /// where a write transaction already holds the database's only write
    /// lock.
    const FOR_UPDATE: &'static str;
    /// Appended to a sub-select that claims rows other claimers may hold:
    /// `FOR UPDATE SKIP LOCKED`, or empty where the statement runs alone.
    const SKIP_LOCKED: &'static str;

    /// Creates or upgrades the schema.
    fn migrate(&self) -> impl Future<Output = StateResult<()>> + Send;
    /// A transaction that will write: its changes and the reads they rest
    /// on are serialized with every other writer's on the rows it locks.
    fn begin(&self) -> impl Future<Output = sqlx::Result<Self::Tx>> + Send;
    /// A read-only transaction: one consistent snapshot, no locks.
    fn snapshot(&self) -> impl Future<Output = sqlx::Result<Self::Tx>> + Send;
    fn commit(tx: Self::Tx) -> impl Future<Output = sqlx::Result<()>> + Send;

    /// Rows of a read outside any transaction.
    fn read(&self, q: Query) -> impl Future<Output = sqlx::Result<Vec<Self::Row>>> + Send;
    /// A single-statement write outside any transaction; its returned rows.
    fn write(&self, q: Query) -> impl Future<Output = sqlx::Result<Vec<Self::Row>>> + Send;
    /// A single-statement write outside any transaction; rows affected.
    fn execute(&self, q: Query) -> impl Future<Output = sqlx::Result<u64>> + Send;
    /// Rows of a statement inside a transaction.
    fn fetch(
        tx: &mut Self::Tx,
        q: Query,
    ) -> impl Future<Output = sqlx::Result<Vec<Self::Row>>> + Send;
    /// Rows affected by a statement inside a transaction.
    fn run(tx: &mut Self::Tx, q: Query) -> impl Future<Output = sqlx::Result<u64>> + Send;
}

macro_rules! arg_from {
    ($variant:ident: $($t:ty => $f:expr),* $(,)?) => {
        $(impl From<$t> for Arg {
            fn from(v: $t) -> Self {
                #[allow(clippy::redundant_closure_call)]
                Arg::$variant(($f)(v))
            }
        })*
    };
}

arg_from!(Text:
    &str => |v: &str| Some(v.to_owned()),
    String => Some,
    &String => |v: &String| Some(v.clone()),
    Option<&str> => |v: Option<&str>| v.map(str::to_owned),
    Option<String> => |v| v,
    &Option<String> => |v: &Option<String>| v.clone(),
);
arg_from!(Int: i32 => Some);
arg_from!(BigInt: i64 => Some);
arg_from!(Flag: bool => Some);
arg_from!(Time:
    DateTime<Utc> => Some,
    Option<DateTime<Utc>> => |v| v,
);
arg_from!(Decimal:
    Decimal => Some,
    Option<Decimal> => |v| v,
);
arg_from!(Json:
    serde_json::Value => Some,
    &serde_json::Value => |v: &serde_json::Value| Some(v.clone()),
    Option<serde_json::Value> => |v| v,
);

/// The statement methods of a [`Dialect`] over sqlx, the same text for
/// every database (each binds with its own `bound`): reads on the `$reader`
/// pool, single-statement writes on the `$writer` pool, and statements
/// inside a transaction.
macro_rules! sqlx_statements {
    ($row:ty, $reader:ident, $writer:ident) => {
        async fn read(&self, q: Query) -> sqlx::Result<Vec<$row>> {
            bound(&q.sql, q.args).fetch_all(&self.$reader).await
        }

        async fn write(&self, q: Query) -> sqlx::Result<Vec<$row>> {
            bound(&q.sql, q.args).fetch_all(&self.$writer).await
        }

        async fn execute(&self, q: Query) -> sqlx::Result<u64> {
            Ok(bound(&q.sql, q.args)
                .execute(&self.$writer)
                .await?
                .rows_affected())
        }

        async fn fetch(tx: &mut Self::Tx, q: Query) -> sqlx::Result<Vec<$row>> {
            bound(&q.sql, q.args).fetch_all(&mut **tx).await
        }

        async fn run(tx: &mut Self::Tx, q: Query) -> sqlx::Result<u64> {
            Ok(bound(&q.sql, q.args)
                .execute(&mut **tx)
                .await?
                .rows_affected())
        }
    };
}
pub(crate) use sqlx_statements;
