//! PostgreSQL as the state store's [`Dialect`]: native types for times,
//! decimals and JSON; row locks (`SELECT … FOR UPDATE`) on the customer
//! and the invoice counter inside a change's transaction, and a partial
//! unique index allowing one open subscription per customer, so two
//! concurrent switches cannot interleave into overlapping segments;
//! `FOR UPDATE SKIP LOCKED` for alert claims; reads in a snapshot are
//! `REPEATABLE READ`.

use super::dialect::{sqlx_statements, Arg, Dialect, Query};
use super::sql::SqlState;
use super::{StateResult, StateRow};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::postgres::{PgArguments, PgPool, PgPoolOptions, PgRow};
use sqlx::{Executor, Postgres, Row, Transaction};

/// The billing state in PostgreSQL.
pub type PgState = SqlState<PgDialect>;

#[derive(Clone)]
pub struct PgDialect {
    pool: PgPool,
}

impl PgState {
    pub async fn connect(url: &str) -> StateResult<Self> {
        Ok(Self::from_pool(
            PgPoolOptions::new().max_connections(8).connect(url).await?,
        ))
    }

    pub fn from_pool(pool: PgPool) -> Self {
        SqlState {
            db: PgDialect { pool },
        }
    }
}

impl StateRow for PgRow {
    fn opt_text(&self, col: &str) -> StateResult<Option<String>> {
        Ok(self.try_get(col)?)
    }
    fn opt_int(&self, col: &str) -> StateResult<Option<i64>> {
        Ok(self.try_get::<Option<i32>, _>(col)?.map(i64::from))
    }
    fn opt_bigint(&self, col: &str) -> StateResult<Option<i64>> {
        Ok(self.try_get(col)?)
    }
    fn opt_flag(&self, col: &str) -> StateResult<Option<bool>> {
        Ok(self.try_get(col)?)
    }
    fn opt_time(&self, col: &str) -> StateResult<Option<DateTime<Utc>>> {
        Ok(self.try_get(col)?)
    }
    fn opt_decimal(&self, col: &str) -> StateResult<Option<Decimal>> {
        Ok(self.try_get(col)?)
    }
    fn opt_json(&self, col: &str) -> StateResult<Option<serde_json::Value>> {
        Ok(self.try_get(col)?)
    }
}

type Bound<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// The statement with its arguments in PostgreSQL's own types.
fn bound(sql: &str, args: Vec<Arg>) -> Bound<'_> {
    args.into_iter().fold(sqlx::query(sql), |x, a| match a {
        Arg::Text(v) => x.bind(v),
        Arg::Int(v) => x.bind(v),
        Arg::BigInt(v) => x.bind(v),
        Arg::Flag(v) => x.bind(v),
        Arg::Time(v) => x.bind(v),
        Arg::Decimal(v) => x.bind(v),
        Arg::Json(v) => x.bind(v),
    })
}

impl Dialect for PgDialect {
    type Tx = Transaction<'static, Postgres>;
    type Row = PgRow;
    // NO KEY UPDATE: serializes writers of the row as FOR UPDATE does, but
    // not the KEY SHARE lock a foreign-key check takes on it, so inserting
    // a customer's invoice or ledger entry never waits for (and never
    // deadlocks with) a change that holds the customer row.
    const FOR_UPDATE: &'static str = " FOR NO KEY UPDATE";
    const SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";

    async fn migrate(&self) -> StateResult<()> {
        self.pool
            .execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INT PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            .await?;
        for m in schemas::migrations::POSTGRES {
            let mut tx = self.pool.begin().await?;
            // Serialize concurrent starts on the migrations table.
            sqlx::query("LOCK TABLE schema_migrations IN EXCLUSIVE MODE")
                .execute(&mut *tx)
                .await?;
            let done = sqlx::query("SELECT 1 FROM schema_migrations WHERE version = $1")
                .bind(m.version as i32)
                .fetch_optional(&mut *tx)
                .await?;
            if done.is_none() {
                // A plain string runs as a simple query: several statements.
                (&mut *tx).execute(m.sql).await?;
                sqlx::query("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)")
                    .bind(m.version as i32)
                    .bind(m.name)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        }
        Ok(())
    }

    async fn begin(&self) -> sqlx::Result<Self::Tx> {
        self.pool.begin().await
    }

    async fn snapshot(&self) -> sqlx::Result<Self::Tx> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    async fn commit(tx: Self::Tx) -> sqlx::Result<()> {
        tx.commit().await
    }

    sqlx_statements!(PgRow, pool, pool);
}
