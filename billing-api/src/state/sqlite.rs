//! SQLite billing state for the embedded mode (sqlx, parameterized queries
//! only): the same behaviour as [`PgState`](super::postgres::PgState) —
//! the same errors in the same situations, the same orderings, the same
//! audit entries in the same transactions — over the schema in
//! `schemas/migrations/sqlite/state/` (PostgreSQL's tables and column names).
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

use super::{
    alert_from, api_key_from, app_from, audit_entry_from, by_customer, carried_ids,
    check_carried_moved, check_first_subscription, check_plan_usable, conflict_or, customer_from,
    customer_not_found, invoice_from, plan_from, published_plan_from, retire_refused, seats_from,
    seats_value, segments_from, subscription_from, withdrawn_earlier, Alert, AlertOutcome, App,
    AuditEntry, AuditRecord, Customer, Invoice, NewAlert, PaymentStatus, PlanSegment,
    PublishedPlan, QuotaSettings, StateError, StateResult, StateRow, StateStore, Subscription,
    SwitchOutcome, SwitchWrites, SyncStatus, WithdrawWrites, ALERT_COLUMNS, API_KEY_COLUMNS,
    INVOICE_COLUMNS, SUBSCRIPTION_COLUMNS, WITHDRAW_ACTION,
};
use crate::auth::ApiKey;
use crate::invoice::NewInvoice;
use billing_domain::catalog::PlanVersion;
use billing_domain::rating::{Period, SeatInterval};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use rust_decimal::Decimal;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Executor, Row, Sqlite, Transaction};
use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

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

fn json_text(v: &serde_json::Value) -> String {
    v.to_string()
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

type Tx = Transaction<'static, Sqlite>;

/// Writes the audit entry of a change, in the change's transaction.
async fn audit(tx: &mut Tx, actor: &str, at: i64, rec: AuditRecord) -> StateResult<()> {
    sqlx::query(
        "INSERT INTO audit_log (at, actor, action, subject, before, after) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .bind(at)
    .bind(actor)
    .bind(rec.action)
    .bind(&rec.subject)
    .bind(rec.before.as_ref().map(json_text))
    .bind(rec.after.as_ref().map(json_text))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The customer must exist (the write lock is already held: nothing can
/// change it until commit).
async fn require_customer(tx: &mut Tx, customer: &str) -> StateResult<()> {
    sqlx::query("SELECT id FROM customers WHERE id = ?1")
        .bind(customer)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| customer_not_found(customer))?;
    Ok(())
}

async fn require_plan(tx: &mut Tx, plan: &str, version: u32) -> StateResult<()> {
    let retired = sqlx::query(
        "SELECT retired_at IS NOT NULL AS retired FROM plan_versions WHERE plan = ?1 AND version = ?2",
    )
    .bind(plan)
    .bind(version as i32)
    .fetch_optional(&mut **tx)
    .await?
    .map(|r| r.flag("retired"))
    .transpose()?;
    check_plan_usable(retired, plan, version)
}

#[derive(Clone)]
pub struct SqliteState {
    /// Write transactions (`BEGIN IMMEDIATE`); one connection when opened
    /// by [`SqliteState::open`].
    writer: SqlitePool,
    reader: SqlitePool,
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
        Ok(Self { writer, reader })
    }

    /// Over an existing pool, for reads and writes. Its connections should
    /// have a busy timeout and foreign keys on (sqlx's default): writes
    /// still begin with `BEGIN IMMEDIATE` and wait for the lock.
    pub fn from_pool(pool: SqlitePool) -> Self {
        Self {
            writer: pool.clone(),
            reader: pool,
        }
    }

    /// The pool reads use.
    pub fn pool(&self) -> &SqlitePool {
        &self.reader
    }

    /// A write transaction holding SQLite's write lock from its start.
    async fn begin(&self) -> StateResult<Tx> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }

    async fn do_migrate(&self) -> StateResult<()> {
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

    /// Plan segments inside the period, of one customer or of all.
    async fn segments(
        &self,
        customer: Option<&str>,
        period: Period,
    ) -> StateResult<HashMap<String, Vec<PlanSegment>>> {
        let rows = sqlx::query(
            "SELECT customer_id, plan, version, starts_at, ends_at FROM subscriptions \
             WHERE (?1 IS NULL OR customer_id = ?1) \
             AND starts_at < ?3 AND (ends_at IS NULL OR ends_at > ?2) ORDER BY customer_id, starts_at",
        )
        .bind(customer)
        .bind(micros(period.start))
        .bind(micros(period.end))
        .fetch_all(&self.reader)
        .await?;
        segments_from(&rows, period)
    }

    /// Seat intervals inside the period, of one customer or of all.
    async fn seats(
        &self,
        customer: Option<&str>,
        period: Period,
    ) -> StateResult<HashMap<String, Vec<SeatInterval>>> {
        let rows = sqlx::query(
            "SELECT customer_id, effective_at, seats FROM seat_changes \
             WHERE (?1 IS NULL OR customer_id = ?1) AND effective_at < ?2 ORDER BY customer_id, effective_at",
        )
        .bind(customer)
        .bind(micros(period.end))
        .fetch_all(&self.reader)
        .await?;
        seats_from(&rows, period)
    }

    /// Invoices matching `filter` (with `?1` bound to `arg`), by number.
    async fn invoices_where(&self, filter: &str, arg: Option<&str>) -> StateResult<Vec<Invoice>> {
        let sql = format!("SELECT {INVOICE_COLUMNS} FROM invoices WHERE {filter} ORDER BY seq");
        let rows = sqlx::query(&sql).bind(arg).fetch_all(&self.reader).await?;
        rows.iter().map(invoice_from).collect()
    }
}

/// The customer's plan history in order (inside the transaction that
/// changes it).
async fn history(tx: &mut Tx, customer: &str) -> StateResult<Vec<Subscription>> {
    let sql = format!(
        "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE customer_id = ?1 ORDER BY starts_at"
    );
    sqlx::query(&sql)
        .bind(customer)
        .fetch_all(&mut **tx)
        .await?
        .iter()
        .map(subscription_from)
        .collect()
}

impl StateStore for SqliteState {
    fn migrate(&self) -> BoxFuture<'_, StateResult<()>> {
        Box::pin(self.do_migrate())
    }

    fn publish_plan<'a>(
        &'a self,
        plan: &'a PlanVersion,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<()>> {
        Box::pin(async move {
            let body =
                serde_json::to_value(plan).map_err(|e| StateError::Invalid(e.to_string()))?;
            let mut tx = self.begin().await?;
            let at = now_micros();
            sqlx::query(
                "INSERT INTO plan_versions (plan, version, body, published_at) VALUES (?1, ?2, ?3, ?4)",
            )
            .bind(&plan.plan)
            .bind(plan.version as i32)
            .bind(json_text(&body))
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                conflict_or(
                    e,
                    format!(
                        "plan {} version {} is already published",
                        plan.plan, plan.version
                    ),
                )
            })?;
            audit(&mut tx, actor, at, AuditRecord::plan_publish(plan, body)).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn plan_version<'a>(
        &'a self,
        plan: &'a str,
        version: u32,
    ) -> BoxFuture<'a, StateResult<PlanVersion>> {
        Box::pin(async move {
            let row =
                sqlx::query("SELECT body FROM plan_versions WHERE plan = ?1 AND version = ?2")
                    .bind(plan)
                    .bind(version as i32)
                    .fetch_optional(&self.reader)
                    .await?
                    .ok_or_else(|| {
                        StateError::NotFound(format!("plan {plan} version {version}"))
                    })?;
            plan_from(&row, plan, version)
        })
    }

    fn create_customer<'a>(
        &'a self,
        c: &'a Customer,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<()>> {
        Box::pin(async move {
            let mut tx = self.begin().await?;
            let at = now_micros();
            sqlx::query(
                "INSERT INTO customers (id, external_id, name, created_at) VALUES (?1, ?2, ?3, ?4)",
            )
            .bind(&c.id)
            .bind(&c.external_id)
            .bind(&c.name)
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                conflict_or(
                    e,
                    format!("customer {} or external id {} exists", c.id, c.external_id),
                )
            })?;
            audit(&mut tx, actor, at, AuditRecord::customer_create(c)).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn customer_by_external_id<'a>(
        &'a self,
        external_id: &'a str,
    ) -> BoxFuture<'a, StateResult<Customer>> {
        Box::pin(async move {
            let row =
                sqlx::query("SELECT id, external_id, name FROM customers WHERE external_id = ?1")
                    .bind(external_id)
                    .fetch_optional(&self.reader)
                    .await?
                    .ok_or_else(|| {
                        StateError::NotFound(format!("customer with external id {external_id}"))
                    })?;
            customer_from(&row)
        })
    }

    fn subscribe<'a>(
        &'a self,
        customer: &'a str,
        plan: &'a str,
        version: u32,
        at: DateTime<Utc>,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<()>> {
        Box::pin(async move {
            let mut tx = self.begin().await?;
            let now = now_micros();
            require_customer(&mut tx, customer).await?;
            require_plan(&mut tx, plan, version).await?;
            let any = sqlx::query("SELECT 1 FROM subscriptions WHERE customer_id = ?1 LIMIT 1")
                .bind(customer)
                .fetch_optional(&mut *tx)
                .await?;
            check_first_subscription(customer, any.is_some())?;
            sqlx::query(
                "INSERT INTO subscriptions (customer_id, plan, version, starts_at) VALUES (?1, ?2, ?3, ?4)",
            )
            .bind(customer)
            .bind(plan)
            .bind(version as i32)
            .bind(micros(at))
            .execute(&mut *tx)
            .await?;
            audit(
                &mut tx,
                actor,
                now,
                AuditRecord::subscription_start(customer, plan, version, at),
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn switch_plan<'a>(
        &'a self,
        customer: &'a str,
        plan: &'a str,
        version: u32,
        at: DateTime<Utc>,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<SwitchOutcome>> {
        Box::pin(async move {
            let mut tx = self.begin().await?;
            let now_us = now_micros();
            require_customer(&mut tx, customer).await?;
            require_plan(&mut tx, plan, version).await?;
            let rows = history(&mut tx, customer).await?;
            let w = SwitchWrites::plan(rows, customer, plan, version, at)?;
            if !w.changes() {
                return Ok(w.outcome());
            }
            for old in &w.withdrawn {
                sqlx::query("DELETE FROM subscriptions WHERE id = ?1")
                    .bind(old.id)
                    .execute(&mut *tx)
                    .await?;
                audit(
                    &mut tx,
                    actor,
                    now_us,
                    AuditRecord::subscription_withdraw(customer, old, "switch"),
                )
                .await?;
            }
            if w.cut_end != w.cut.end {
                sqlx::query("UPDATE subscriptions SET ends_at = ?2 WHERE id = ?1")
                    .bind(w.cut.id)
                    .bind(w.cut_end.map(micros))
                    .execute(&mut *tx)
                    .await?;
            }
            if w.insert {
                sqlx::query(
                    "INSERT INTO subscriptions (customer_id, plan, version, starts_at) VALUES (?1, ?2, ?3, ?4)",
                )
                .bind(customer)
                .bind(plan)
                .bind(version as i32)
                .bind(micros(at))
                .execute(&mut *tx)
                .await?;
                audit(
                    &mut tx,
                    actor,
                    now_us,
                    AuditRecord::subscription_switch(customer, &w.cut, plan, version, at),
                )
                .await?;
            }
            tx.commit().await?;
            Ok(w.outcome())
        })
    }

    fn subscriptions<'a>(
        &'a self,
        customer: &'a str,
    ) -> BoxFuture<'a, StateResult<Vec<Subscription>>> {
        Box::pin(async move {
            // A read: one consistent snapshot, no write lock.
            let mut tx = self.reader.begin().await?;
            require_customer(&mut tx, customer).await?;
            let rows = history(&mut tx, customer).await?;
            tx.commit().await?;
            Ok(rows)
        })
    }

    fn withdraw_change<'a>(
        &'a self,
        customer: &'a str,
        id: i64,
        now: DateTime<Utc>,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<Subscription>> {
        Box::pin(async move {
            let mut tx = self.begin().await?;
            require_customer(&mut tx, customer).await?;
            let rows = history(&mut tx, customer).await?;
            let Some(w) = WithdrawWrites::plan(&rows, customer, id, now)? else {
                let entries = sqlx::query(
                    "SELECT id, at, actor, action, subject, before, after FROM audit_log WHERE subject = ?1 AND action = ?2 ORDER BY id",
                )
                .bind(format!("customer:{customer}"))
                .bind(WITHDRAW_ACTION)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(audit_entry_from)
                .collect::<StateResult<Vec<_>>>()?;
                return withdrawn_earlier(&entries, customer, id);
            };
            sqlx::query("DELETE FROM subscriptions WHERE id = ?1")
                .bind(w.withdrawn.id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE subscriptions SET ends_at = ?2 WHERE id = ?1")
                .bind(w.previous.id)
                .bind(w.withdrawn.end.map(micros))
                .execute(&mut *tx)
                .await?;
            audit(
                &mut tx,
                actor,
                now_micros(),
                AuditRecord::subscription_withdraw(customer, &w.withdrawn, "withdrawal"),
            )
            .await?;
            tx.commit().await?;
            Ok(w.withdrawn)
        })
    }

    fn set_seats<'a>(
        &'a self,
        customer: &'a str,
        seats: u32,
        at: DateTime<Utc>,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<()>> {
        Box::pin(async move {
            let seats_i = seats_value(seats)?;
            let mut tx = self.begin().await?;
            let now = now_micros();
            require_customer(&mut tx, customer).await?;
            let before = sqlx::query(
                "SELECT seats FROM seat_changes WHERE customer_id = ?1 AND effective_at <= ?2 \
                 ORDER BY effective_at DESC LIMIT 1",
            )
            .bind(customer)
            .bind(micros(at))
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.int("seats"))
            .transpose()?;
            sqlx::query(
                "INSERT INTO seat_changes (customer_id, effective_at, seats) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (customer_id, effective_at) DO UPDATE SET seats = excluded.seats",
            )
            .bind(customer)
            .bind(micros(at))
            .bind(seats_i)
            .execute(&mut *tx)
            .await?;
            audit(
                &mut tx,
                actor,
                now,
                AuditRecord::seats_set(customer, before, seats, at),
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn plan_segments<'a>(
        &'a self,
        customer: &'a str,
        period: Period,
    ) -> BoxFuture<'a, StateResult<Vec<PlanSegment>>> {
        Box::pin(async move {
            Ok(self
                .segments(Some(customer), period)
                .await?
                .remove(customer)
                .unwrap_or_default())
        })
    }

    fn seat_intervals<'a>(
        &'a self,
        customer: &'a str,
        period: Period,
    ) -> BoxFuture<'a, StateResult<Vec<SeatInterval>>> {
        Box::pin(async move {
            Ok(self
                .seats(Some(customer), period)
                .await?
                .remove(customer)
                .unwrap_or_default())
        })
    }

    fn audit_log<'a>(&'a self, subject: &'a str) -> BoxFuture<'a, StateResult<Vec<AuditEntry>>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT id, at, actor, action, subject, before, after FROM audit_log \
                 WHERE subject = ?1 ORDER BY id",
            )
            .bind(subject)
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(audit_entry_from).collect()
        })
    }

    fn list_plans(&self) -> BoxFuture<'_, StateResult<Vec<PublishedPlan>>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT body, retired_at IS NOT NULL AS retired FROM plan_versions ORDER BY plan, version",
            )
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(published_plan_from).collect()
        })
    }

    fn retire_plan<'a>(
        &'a self,
        plan: &'a str,
        version: u32,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<()>> {
        Box::pin(async move {
            let mut tx = self.begin().await?;
            let now = now_micros();
            let n = sqlx::query(
                "UPDATE plan_versions SET retired_at = ?3 WHERE plan = ?1 AND version = ?2 AND retired_at IS NULL",
            )
            .bind(plan)
            .bind(version as i32)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 0 {
                let exists =
                    sqlx::query("SELECT 1 FROM plan_versions WHERE plan = ?1 AND version = ?2")
                        .bind(plan)
                        .bind(version as i32)
                        .fetch_optional(&mut *tx)
                        .await?;
                return Err(retire_refused(exists.is_some(), plan, version));
            }
            audit(&mut tx, actor, now, AuditRecord::plan_retire(plan, version)).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn customer<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StateResult<Customer>> {
        Box::pin(async move {
            let row = sqlx::query("SELECT id, external_id, name FROM customers WHERE id = ?1")
                .bind(id)
                .fetch_optional(&self.reader)
                .await?
                .ok_or_else(|| customer_not_found(id))?;
            customer_from(&row)
        })
    }

    fn list_customers<'a>(
        &'a self,
        after: Option<&'a str>,
        limit: u32,
    ) -> BoxFuture<'a, StateResult<Vec<Customer>>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT id, external_id, name FROM customers WHERE (?1 IS NULL OR id > ?1) ORDER BY id LIMIT ?2",
            )
            .bind(after)
            .bind(limit as i64)
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(customer_from).collect()
        })
    }

    fn create_app<'a>(&'a self, app: &'a App, actor: &'a str) -> BoxFuture<'a, StateResult<()>> {
        Box::pin(async move {
            let mut tx = self.begin().await?;
            let now = now_micros();
            require_customer(&mut tx, &app.customer_id).await?;
            sqlx::query(
                "INSERT INTO apps (customer_id, app, name, created_at) VALUES (?1, ?2, ?3, ?4)",
            )
            .bind(&app.customer_id)
            .bind(&app.app)
            .bind(&app.name)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| conflict_or(e, format!("app {} exists", app.app)))?;
            audit(&mut tx, actor, now, AuditRecord::app_create(app)).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn apps<'a>(&'a self, customer: &'a str) -> BoxFuture<'a, StateResult<Vec<App>>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT customer_id, app, name FROM apps WHERE customer_id = ?1 ORDER BY app",
            )
            .bind(customer)
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(app_from).collect()
        })
    }

    fn plan_segments_all(
        &self,
        period: Period,
    ) -> BoxFuture<'_, StateResult<HashMap<String, Vec<PlanSegment>>>> {
        Box::pin(self.segments(None, period))
    }

    fn seat_intervals_all(
        &self,
        period: Period,
    ) -> BoxFuture<'_, StateResult<HashMap<String, Vec<SeatInterval>>>> {
        Box::pin(self.seats(None, period))
    }

    fn billing_start(&self) -> BoxFuture<'_, StateResult<Option<DateTime<Utc>>>> {
        Box::pin(async move {
            sqlx::query("SELECT min(starts_at) AS s FROM subscriptions")
                .fetch_one(&self.reader)
                .await?
                .opt_time("s")
        })
    }

    fn invoices_in_period(
        &self,
        start: DateTime<Utc>,
    ) -> BoxFuture<'_, StateResult<HashMap<String, Invoice>>> {
        Box::pin(async move {
            let sql = format!("SELECT {INVOICE_COLUMNS} FROM invoices WHERE period_start = ?1");
            let rows = sqlx::query(&sql)
                .bind(micros(start))
                .fetch_all(&self.reader)
                .await?;
            rows.iter()
                .map(|r| invoice_from(r).map(|i| (i.customer_id.clone(), i)))
                .collect()
        })
    }

    fn open_carried<'a>(
        &'a self,
        customer: Option<&'a str>,
    ) -> BoxFuture<'a, StateResult<HashMap<String, Vec<Invoice>>>> {
        Box::pin(async move {
            Ok(by_customer(
                self.invoices_where(
                    "sync_status = 'carried_forward' AND carried_to IS NULL AND (?1 IS NULL OR customer_id = ?1)",
                    customer,
                )
                .await?,
            ))
        })
    }

    fn insert_invoices(
        &self,
        new: Vec<NewInvoice>,
        finalized_at: DateTime<Utc>,
    ) -> BoxFuture<'_, StateResult<Vec<Invoice>>> {
        Box::pin(async move {
            // The write lock, held from BEGIN IMMEDIATE to commit,
            // serializes finalizers.
            let mut tx = self.begin().await?;
            let mut last = sqlx::query("SELECT last FROM invoice_numbers WHERE id")
                .fetch_one(&mut *tx)
                .await?
                .bigint("last")?;
            let mut written = Vec::with_capacity(new.len());
            for n in new {
                let exists = sqlx::query(
                    "SELECT 1 FROM invoices WHERE customer_id = ?1 AND period_start = ?2",
                )
                .bind(&n.customer_id)
                .bind(micros(n.period.start))
                .fetch_optional(&mut *tx)
                .await?;
                if exists.is_some() {
                    continue;
                }
                last += 1;
                let number = crate::invoice::invoice_number(last);
                let body = serde_json::to_value(&n.body)
                    .map_err(|e| StateError::Invalid(e.to_string()))?;
                let sql = format!(
                    "INSERT INTO invoices (id, seq, number, customer_id, period_start, period_end, currency, subtotal, \
                     adjustments_total, carried_in, total, body, finalized_at, sync_status) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) RETURNING {INVOICE_COLUMNS}"
                );
                let row = sqlx::query(&sql)
                    .bind(&n.id)
                    .bind(last)
                    .bind(&number)
                    .bind(&n.customer_id)
                    .bind(micros(n.period.start))
                    .bind(micros(n.period.end))
                    .bind(&n.currency)
                    .bind(dec_text(n.subtotal))
                    .bind(dec_text(n.adjustments_total))
                    .bind(dec_text(n.carried_in))
                    .bind(dec_text(n.total))
                    .bind(json_text(&body))
                    .bind(micros(finalized_at))
                    .bind(n.sync_status.as_str())
                    .fetch_one(&mut *tx)
                    .await?;
                let carried = carried_ids(&n);
                if !carried.is_empty() {
                    let ids = serde_json::to_string(&carried)
                        .map_err(|e| StateError::Invalid(e.to_string()))?;
                    let moved = sqlx::query(
                        "UPDATE invoices SET carried_to = ?1 WHERE id IN (SELECT value FROM json_each(?2)) \
                         AND customer_id = ?3 AND carried_to IS NULL AND sync_status = 'carried_forward'",
                    )
                    .bind(&n.id)
                    .bind(ids)
                    .bind(&n.customer_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    check_carried_moved(&n, moved, carried.len())?;
                }
                written.push(invoice_from(&row)?);
            }
            sqlx::query("UPDATE invoice_numbers SET last = ?1 WHERE id")
                .bind(last)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(written)
        })
    }

    fn invoice<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StateResult<Invoice>> {
        Box::pin(async move {
            self.invoices_where("id = ?1", Some(id))
                .await?
                .pop()
                .ok_or_else(|| StateError::NotFound(format!("invoice {id}")))
        })
    }

    fn invoices_of<'a>(&'a self, customer: &'a str) -> BoxFuture<'a, StateResult<Vec<Invoice>>> {
        Box::pin(self.invoices_where("customer_id = ?1", Some(customer)))
    }

    fn pending_sync(&self, limit: u32) -> BoxFuture<'_, StateResult<Vec<Invoice>>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT {INVOICE_COLUMNS} FROM invoices WHERE sync_status = '{}' ORDER BY seq LIMIT ?1",
                SyncStatus::Pending
            );
            let rows = sqlx::query(&sql)
                .bind(limit as i64)
                .fetch_all(&self.reader)
                .await?;
            rows.iter().map(invoice_from).collect()
        })
    }

    fn stripe_customer<'a>(
        &'a self,
        customer: &'a str,
    ) -> BoxFuture<'a, StateResult<Option<String>>> {
        Box::pin(async move {
            sqlx::query("SELECT stripe_customer_id FROM customers WHERE id = ?1")
                .bind(customer)
                .fetch_optional(&self.reader)
                .await?
                .ok_or_else(|| customer_not_found(customer))?
                .opt_text("stripe_customer_id")
        })
    }

    fn set_stripe_customer<'a>(
        &'a self,
        customer: &'a str,
        stripe_id: &'a str,
    ) -> BoxFuture<'a, StateResult<()>> {
        Box::pin(async move {
            sqlx::query("UPDATE customers SET stripe_customer_id = ?2 WHERE id = ?1")
                .bind(customer)
                .bind(stripe_id)
                .execute(&self.writer)
                .await?;
            Ok(())
        })
    }

    fn set_stripe_invoice<'a>(
        &'a self,
        invoice: &'a str,
        stripe_id: &'a str,
    ) -> BoxFuture<'a, StateResult<()>> {
        Box::pin(async move {
            sqlx::query("UPDATE invoices SET stripe_invoice_id = ?2 WHERE id = ?1")
                .bind(invoice)
                .bind(stripe_id)
                .execute(&self.writer)
                .await?;
            Ok(())
        })
    }

    fn set_sync_status<'a>(
        &'a self,
        invoice: &'a str,
        status: SyncStatus,
        error: Option<&'a str>,
    ) -> BoxFuture<'a, StateResult<()>> {
        Box::pin(async move {
            sqlx::query("UPDATE invoices SET sync_status = ?2, sync_error = ?3 WHERE id = ?1")
                .bind(invoice)
                .bind(status.as_str())
                .bind(error)
                .execute(&self.writer)
                .await?;
            Ok(())
        })
    }

    fn set_payment_status<'a>(
        &'a self,
        stripe_invoice_id: &'a str,
        status: PaymentStatus,
    ) -> BoxFuture<'a, StateResult<bool>> {
        Box::pin(async move {
            let n =
                sqlx::query("UPDATE invoices SET payment_status = ?2 WHERE stripe_invoice_id = ?1")
                    .bind(stripe_invoice_id)
                    .bind(status.as_str())
                    .execute(&self.writer)
                    .await?
                    .rows_affected();
            Ok(n > 0)
        })
    }

    fn create_api_key<'a>(
        &'a self,
        key: &'a ApiKey,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<()>> {
        Box::pin(async move {
            let mut tx = self.begin().await?;
            let now = now_micros();
            if let Some(c) = &key.customer_id {
                require_customer(&mut tx, c).await?;
            }
            sqlx::query(
                "INSERT INTO api_keys (id, role, customer_id, label, key_sha256, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .bind(&key.id)
            .bind(key.role.as_str())
            .bind(&key.customer_id)
            .bind(&key.label)
            .bind(&key.key_sha256)
            .bind(micros(key.created_at))
            .execute(&mut *tx)
            .await
            .map_err(|e| conflict_or(e, format!("key {} exists", key.id)))?;
            audit(&mut tx, actor, now, AuditRecord::key_create(key)).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn api_keys(&self) -> BoxFuture<'_, StateResult<Vec<ApiKey>>> {
        Box::pin(async move {
            let sql =
                format!("SELECT {API_KEY_COLUMNS} FROM api_keys ORDER BY created_at DESC, id");
            let rows = sqlx::query(&sql).fetch_all(&self.reader).await?;
            rows.iter().map(api_key_from).collect()
        })
    }

    fn revoke_api_key<'a>(
        &'a self,
        id: &'a str,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<ApiKey>> {
        Box::pin(async move {
            let mut tx = self.begin().await?;
            let now = now_micros();
            let sql = format!(
                "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL RETURNING {API_KEY_COLUMNS}"
            );
            let row = sqlx::query(&sql)
                .bind(id)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| StateError::NotFound(format!("active key {id}")))?;
            let key = api_key_from(&row)?;
            audit(&mut tx, actor, now, AuditRecord::key_revoke(&key)).await?;
            tx.commit().await?;
            Ok(key)
        })
    }

    fn set_spending_cap<'a>(
        &'a self,
        customer: &'a str,
        cap: Option<Decimal>,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<()>> {
        Box::pin(async move {
            let mut tx = self.begin().await?;
            let now = now_micros();
            require_customer(&mut tx, customer).await?;
            let before = sqlx::query("SELECT spending_cap FROM customers WHERE id = ?1")
                .bind(customer)
                .fetch_one(&mut *tx)
                .await?
                .opt_decimal("spending_cap")?;
            sqlx::query("UPDATE customers SET spending_cap = ?2 WHERE id = ?1")
                .bind(customer)
                .bind(cap.map(dec_text))
                .execute(&mut *tx)
                .await?;
            audit(
                &mut tx,
                actor,
                now,
                AuditRecord::spending_cap_set(customer, before, cap),
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn set_suspended<'a>(
        &'a self,
        customer: &'a str,
        suspended: bool,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<()>> {
        Box::pin(async move {
            let mut tx = self.begin().await?;
            let now = now_micros();
            require_customer(&mut tx, customer).await?;
            let before = sqlx::query("SELECT suspended FROM customers WHERE id = ?1")
                .bind(customer)
                .fetch_one(&mut *tx)
                .await?
                .flag("suspended")?;
            sqlx::query("UPDATE customers SET suspended = ?2 WHERE id = ?1")
                .bind(customer)
                .bind(suspended)
                .execute(&mut *tx)
                .await?;
            audit(
                &mut tx,
                actor,
                now,
                AuditRecord::suspended_set(customer, before, suspended),
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn quota_settings(&self) -> BoxFuture<'_, StateResult<HashMap<String, QuotaSettings>>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT id, suspended, spending_cap FROM customers")
                .fetch_all(&self.reader)
                .await?;
            rows.iter()
                .map(|r| {
                    Ok((
                        r.text("id")?,
                        (r.flag("suspended")?, r.opt_decimal("spending_cap")?),
                    ))
                })
                .collect()
        })
    }

    fn record_alerts<'a>(
        &'a self,
        alerts: &'a [NewAlert],
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, StateResult<Vec<NewAlert>>> {
        Box::pin(async move {
            let mut raised = Vec::new();
            let mut tx = self.begin().await?;
            let created_at = now_micros();
            for a in alerts {
                let n = sqlx::query(
                    "INSERT INTO usage_alerts (customer_id, period_start, kind, subject, threshold, payload, \
                     created_at, next_attempt_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                     ON CONFLICT (customer_id, period_start, kind, subject, threshold) DO NOTHING",
                )
                .bind(&a.customer_id)
                .bind(micros(a.period_start))
                .bind(a.kind.as_str())
                .bind(&a.subject)
                .bind(a.threshold as i32)
                .bind(json_text(&a.payload))
                .bind(created_at)
                .bind(micros(now))
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n > 0 {
                    raised.push(a.clone());
                }
            }
            tx.commit().await?;
            Ok(raised)
        })
    }

    fn claim_due_alerts(
        &self,
        now: DateTime<Utc>,
        lease: chrono::Duration,
        limit: u32,
    ) -> BoxFuture<'_, StateResult<Vec<Alert>>> {
        Box::pin(async move {
            // One statement: atomic, and it holds the write lock from its
            // first read, so two claimers never take the same alert.
            let sql = format!(
                "UPDATE usage_alerts SET next_attempt_at = ?2 WHERE id IN ( \
                   SELECT id FROM usage_alerts WHERE status = 'pending' AND next_attempt_at <= ?1 \
                   ORDER BY next_attempt_at, id LIMIT ?3) \
                 RETURNING {ALERT_COLUMNS}"
            );
            let rows = sqlx::query(&sql)
                .bind(micros(now))
                .bind(micros(now + lease))
                .bind(limit as i64)
                .fetch_all(&self.writer)
                .await?;
            let mut out = rows
                .iter()
                .map(alert_from)
                .collect::<StateResult<Vec<Alert>>>()?;
            out.sort_by_key(|a| a.id);
            Ok(out)
        })
    }

    fn settle_alert(&self, id: i64, outcome: AlertOutcome) -> BoxFuture<'_, StateResult<()>> {
        Box::pin(async move {
            let q = match &outcome {
                AlertOutcome::Delivered => sqlx::query(
                    "UPDATE usage_alerts SET status = 'delivered', attempts = attempts + 1, \
                     delivered_at = ?2, last_error = NULL WHERE id = ?1",
                )
                .bind(id)
                .bind(now_micros()),
                AlertOutcome::Retry { at, error } => sqlx::query(
                    "UPDATE usage_alerts SET attempts = attempts + 1, next_attempt_at = ?2, \
                     last_error = ?3 WHERE id = ?1",
                )
                .bind(id)
                .bind(micros(*at))
                .bind(error),
                AlertOutcome::GaveUp { error } => sqlx::query(
                    "UPDATE usage_alerts SET status = 'failed', attempts = attempts + 1, \
                     last_error = ?2 WHERE id = ?1",
                )
                .bind(id)
                .bind(error),
            };
            q.execute(&self.writer).await?;
            Ok(())
        })
    }

    fn alerts_of<'a>(&'a self, customer: &'a str) -> BoxFuture<'a, StateResult<Vec<Alert>>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT {ALERT_COLUMNS} FROM usage_alerts WHERE customer_id = ?1 ORDER BY id"
            );
            let rows = sqlx::query(&sql)
                .bind(customer)
                .fetch_all(&self.reader)
                .await?;
            rows.iter().map(alert_from).collect()
        })
    }
}
