//! PostgreSQL billing state (sqlx, parameterized queries only).
//!
//! Concurrency: changes to one customer's plan history take a row lock on
//! the customer (`SELECT … FOR UPDATE`) inside their transaction, and a
//! partial unique index allows one open subscription per customer, so two
//! concurrent switches cannot interleave into overlapping segments.

use super::{
    alert_from, api_key_from, app_from, audit_entry_from, by_customer, carried_ids,
    check_carried_moved, check_first_subscription, check_plan_usable, conflict_or, customer_from,
    customer_not_found, invoice_from, plan_from, published_plan_from, retire_refused, seats_from,
    seats_value, segments_from, subscription_from, withdrawn_earlier, Alert, AlertOutcome, App,
    AuditEntry, AuditRecord, Customer, Invoice, NewAlert, PaymentStatus, PlanSegment,
    PublishedPlan, StateError, StateResult, StateRow, StateStore, Subscription, SwitchOutcome,
    SwitchWrites, SyncStatus, WithdrawWrites, ALERT_COLUMNS, API_KEY_COLUMNS, INVOICE_COLUMNS,
    SUBSCRIPTION_COLUMNS, WITHDRAW_ACTION,
};
use crate::auth::ApiKey;
use crate::invoice::NewInvoice;
use billing_domain::catalog::PlanVersion;
use billing_domain::rating::{Period, SeatInterval};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use rust_decimal::Decimal;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{Executor, Postgres, Row, Transaction};
use std::collections::HashMap;

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

#[derive(Clone)]
pub struct PgState {
    pool: PgPool,
}

async fn audit(
    tx: &mut Transaction<'_, Postgres>,
    actor: &str,
    rec: AuditRecord,
) -> StateResult<()> {
    sqlx::query(
        "INSERT INTO audit_log (actor, action, subject, before, after) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(actor)
    .bind(rec.action)
    .bind(&rec.subject)
    .bind(rec.before)
    .bind(rec.after)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn lock_customer(tx: &mut Transaction<'_, Postgres>, customer: &str) -> StateResult<()> {
    sqlx::query("SELECT id FROM customers WHERE id = $1 FOR UPDATE")
        .bind(customer)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| customer_not_found(customer))?;
    Ok(())
}

async fn require_plan(
    tx: &mut Transaction<'_, Postgres>,
    plan: &str,
    version: u32,
) -> StateResult<()> {
    let retired = sqlx::query("SELECT retired_at IS NOT NULL AS retired FROM plan_versions WHERE plan = $1 AND version = $2")
        .bind(plan)
        .bind(version as i32)
        .fetch_optional(&mut **tx)
        .await?
        .map(|r| r.flag("retired"))
        .transpose()?;
    check_plan_usable(retired, plan, version)
}

impl PgState {
    pub async fn connect(url: &str) -> StateResult<Self> {
        Ok(Self {
            pool: PgPoolOptions::new().max_connections(8).connect(url).await?,
        })
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    async fn do_migrate(&self) -> StateResult<()> {
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
}

impl PgState {
    /// Plan segments inside the period, of one customer or of all.
    async fn segments(
        &self,
        customer: Option<&str>,
        period: Period,
    ) -> StateResult<HashMap<String, Vec<PlanSegment>>> {
        let rows = sqlx::query(
            "SELECT customer_id, plan, version, starts_at, ends_at FROM subscriptions \
             WHERE ($1::text IS NULL OR customer_id = $1) \
             AND starts_at < $3 AND (ends_at IS NULL OR ends_at > $2) ORDER BY customer_id, starts_at",
        )
        .bind(customer)
        .bind(period.start)
        .bind(period.end)
        .fetch_all(&self.pool)
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
             WHERE ($1::text IS NULL OR customer_id = $1) AND effective_at < $2 ORDER BY customer_id, effective_at",
        )
        .bind(customer)
        .bind(period.end)
        .fetch_all(&self.pool)
        .await?;
        seats_from(&rows, period)
    }

    async fn invoices_where(&self, filter: &str, arg: Option<&str>) -> StateResult<Vec<Invoice>> {
        let sql = format!("SELECT {INVOICE_COLUMNS} FROM invoices WHERE {filter} ORDER BY seq");
        let rows = sqlx::query(&sql).bind(arg).fetch_all(&self.pool).await?;
        rows.iter().map(invoice_from).collect()
    }
}

/// The customer's plan history in order (inside the transaction that
/// changes it).
async fn history(
    tx: &mut Transaction<'_, Postgres>,
    customer: &str,
) -> StateResult<Vec<Subscription>> {
    let sql = format!(
        "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE customer_id = $1 ORDER BY starts_at"
    );
    sqlx::query(&sql)
        .bind(customer)
        .fetch_all(&mut **tx)
        .await?
        .iter()
        .map(subscription_from)
        .collect()
}

impl StateStore for PgState {
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
            let mut tx = self.pool.begin().await?;
            sqlx::query("INSERT INTO plan_versions (plan, version, body) VALUES ($1, $2, $3)")
                .bind(&plan.plan)
                .bind(plan.version as i32)
                .bind(&body)
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
            audit(&mut tx, actor, AuditRecord::plan_publish(plan, body)).await?;
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
                sqlx::query("SELECT body FROM plan_versions WHERE plan = $1 AND version = $2")
                    .bind(plan)
                    .bind(version as i32)
                    .fetch_optional(&self.pool)
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
            let mut tx = self.pool.begin().await?;
            sqlx::query("INSERT INTO customers (id, external_id, name) VALUES ($1, $2, $3)")
                .bind(&c.id)
                .bind(&c.external_id)
                .bind(&c.name)
                .execute(&mut *tx)
                .await
                .map_err(|e| {
                    conflict_or(
                        e,
                        format!("customer {} or external id {} exists", c.id, c.external_id),
                    )
                })?;
            audit(&mut tx, actor, AuditRecord::customer_create(c)).await?;
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
                sqlx::query("SELECT id, external_id, name FROM customers WHERE external_id = $1")
                    .bind(external_id)
                    .fetch_optional(&self.pool)
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
            let mut tx = self.pool.begin().await?;
            lock_customer(&mut tx, customer).await?;
            require_plan(&mut tx, plan, version).await?;
            let any = sqlx::query("SELECT 1 FROM subscriptions WHERE customer_id = $1 LIMIT 1")
                .bind(customer)
                .fetch_optional(&mut *tx)
                .await?;
            check_first_subscription(customer, any.is_some())?;
            sqlx::query("INSERT INTO subscriptions (customer_id, plan, version, starts_at) VALUES ($1, $2, $3, $4)")
                .bind(customer)
                .bind(plan)
                .bind(version as i32)
                .bind(at)
                .execute(&mut *tx)
                .await?;
            audit(
                &mut tx,
                actor,
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
            let mut tx = self.pool.begin().await?;
            lock_customer(&mut tx, customer).await?;
            require_plan(&mut tx, plan, version).await?;
            let rows = history(&mut tx, customer).await?;
            let w = SwitchWrites::plan(rows, customer, plan, version, at)?;
            if !w.changes() {
                return Ok(w.outcome());
            }
            for old in &w.withdrawn {
                sqlx::query("DELETE FROM subscriptions WHERE id = $1")
                    .bind(old.id)
                    .execute(&mut *tx)
                    .await?;
                audit(
                    &mut tx,
                    actor,
                    AuditRecord::subscription_withdraw(customer, old, "switch"),
                )
                .await?;
            }
            if w.cut_end != w.cut.end {
                sqlx::query("UPDATE subscriptions SET ends_at = $2 WHERE id = $1")
                    .bind(w.cut.id)
                    .bind(w.cut_end)
                    .execute(&mut *tx)
                    .await?;
            }
            if w.insert {
                sqlx::query(
                    "INSERT INTO subscriptions (customer_id, plan, version, starts_at) VALUES ($1, $2, $3, $4)",
                )
                .bind(customer)
                .bind(plan)
                .bind(version as i32)
                .bind(at)
                .execute(&mut *tx)
                .await?;
                audit(
                    &mut tx,
                    actor,
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
            // A read: one snapshot (REPEATABLE READ), no lock.
            let mut tx = self.pool.begin().await?;
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .execute(&mut *tx)
                .await?;
            sqlx::query("SELECT 1 FROM customers WHERE id = $1")
                .bind(customer)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| customer_not_found(customer))?;
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
            let mut tx = self.pool.begin().await?;
            lock_customer(&mut tx, customer).await?;
            let rows = history(&mut tx, customer).await?;
            let Some(w) = WithdrawWrites::plan(&rows, customer, id, now)? else {
                let entries = sqlx::query(
                    "SELECT id, at, actor, action, subject, before, after FROM audit_log WHERE subject = $1 AND action = $2 ORDER BY id",
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
            sqlx::query("DELETE FROM subscriptions WHERE id = $1")
                .bind(w.withdrawn.id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE subscriptions SET ends_at = $2 WHERE id = $1")
                .bind(w.previous.id)
                .bind(w.withdrawn.end)
                .execute(&mut *tx)
                .await?;
            audit(
                &mut tx,
                actor,
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
            let mut tx = self.pool.begin().await?;
            lock_customer(&mut tx, customer).await?;
            let before = sqlx::query("SELECT seats FROM seat_changes WHERE customer_id = $1 AND effective_at <= $2 ORDER BY effective_at DESC LIMIT 1")
                .bind(customer)
                .bind(at)
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| r.int("seats"))
                .transpose()?;
            sqlx::query(
                "INSERT INTO seat_changes (customer_id, effective_at, seats) VALUES ($1, $2, $3) \
                 ON CONFLICT (customer_id, effective_at) DO UPDATE SET seats = EXCLUDED.seats",
            )
            .bind(customer)
            .bind(at)
            .bind(seats_i)
            .execute(&mut *tx)
            .await?;
            audit(
                &mut tx,
                actor,
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
            let rows = sqlx::query("SELECT id, at, actor, action, subject, before, after FROM audit_log WHERE subject = $1 ORDER BY id")
                .bind(subject)
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(audit_entry_from).collect()
        })
    }

    fn list_plans(&self) -> BoxFuture<'_, StateResult<Vec<PublishedPlan>>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT body, retired_at IS NOT NULL AS retired FROM plan_versions ORDER BY plan, version")
                .fetch_all(&self.pool)
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
            let mut tx = self.pool.begin().await?;
            let n = sqlx::query("UPDATE plan_versions SET retired_at = now() WHERE plan = $1 AND version = $2 AND retired_at IS NULL")
                .bind(plan)
                .bind(version as i32)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if n == 0 {
                let exists =
                    sqlx::query("SELECT 1 FROM plan_versions WHERE plan = $1 AND version = $2")
                        .bind(plan)
                        .bind(version as i32)
                        .fetch_optional(&mut *tx)
                        .await?;
                return Err(retire_refused(exists.is_some(), plan, version));
            }
            audit(&mut tx, actor, AuditRecord::plan_retire(plan, version)).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn customer<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StateResult<Customer>> {
        Box::pin(async move {
            let row = sqlx::query("SELECT id, external_id, name FROM customers WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
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
            let rows = sqlx::query("SELECT id, external_id, name FROM customers WHERE ($1::text IS NULL OR id > $1) ORDER BY id LIMIT $2")
                .bind(after)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(customer_from).collect()
        })
    }

    fn create_app<'a>(&'a self, app: &'a App, actor: &'a str) -> BoxFuture<'a, StateResult<()>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            lock_customer(&mut tx, &app.customer_id).await?;
            sqlx::query("INSERT INTO apps (customer_id, app, name) VALUES ($1, $2, $3)")
                .bind(&app.customer_id)
                .bind(&app.app)
                .bind(&app.name)
                .execute(&mut *tx)
                .await
                .map_err(|e| conflict_or(e, format!("app {} exists", app.app)))?;
            audit(&mut tx, actor, AuditRecord::app_create(app)).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn apps<'a>(&'a self, customer: &'a str) -> BoxFuture<'a, StateResult<Vec<App>>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT customer_id, app, name FROM apps WHERE customer_id = $1 ORDER BY app",
            )
            .bind(customer)
            .fetch_all(&self.pool)
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
                .fetch_one(&self.pool)
                .await?
                .opt_time("s")
        })
    }

    fn invoices_in_period(
        &self,
        start: DateTime<Utc>,
    ) -> BoxFuture<'_, StateResult<HashMap<String, Invoice>>> {
        Box::pin(async move {
            let sql = format!("SELECT {INVOICE_COLUMNS} FROM invoices WHERE period_start = $1");
            let rows = sqlx::query(&sql).bind(start).fetch_all(&self.pool).await?;
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
                    "sync_status = 'carried_forward' AND carried_to IS NULL AND ($1::text IS NULL OR customer_id = $1)",
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
            let mut tx = self.pool.begin().await?;
            // The counter row lock serializes finalizers until commit.
            let mut last: i64 = sqlx::query("SELECT last FROM invoice_numbers WHERE id FOR UPDATE")
                .fetch_one(&mut *tx)
                .await?
                .bigint("last")?;
            let mut written = Vec::with_capacity(new.len());
            for n in new {
                let exists = sqlx::query(
                    "SELECT 1 FROM invoices WHERE customer_id = $1 AND period_start = $2",
                )
                .bind(&n.customer_id)
                .bind(n.period.start)
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
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING {INVOICE_COLUMNS}"
                );
                let row = sqlx::query(&sql)
                    .bind(&n.id)
                    .bind(last)
                    .bind(&number)
                    .bind(&n.customer_id)
                    .bind(n.period.start)
                    .bind(n.period.end)
                    .bind(&n.currency)
                    .bind(n.subtotal)
                    .bind(n.adjustments_total)
                    .bind(n.carried_in)
                    .bind(n.total)
                    .bind(body)
                    .bind(finalized_at)
                    .bind(n.sync_status.as_str())
                    .fetch_one(&mut *tx)
                    .await?;
                let carried = carried_ids(&n);
                if !carried.is_empty() {
                    let moved = sqlx::query("UPDATE invoices SET carried_to = $1 WHERE id = ANY($2) AND customer_id = $3 AND carried_to IS NULL AND sync_status = 'carried_forward'")
                        .bind(&n.id)
                        .bind(&carried)
                        .bind(&n.customer_id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    check_carried_moved(&n, moved, carried.len())?;
                }
                written.push(invoice_from(&row)?);
            }
            sqlx::query("UPDATE invoice_numbers SET last = $1 WHERE id")
                .bind(last)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(written)
        })
    }

    fn invoice<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StateResult<Invoice>> {
        Box::pin(async move {
            self.invoices_where("id = $1", Some(id))
                .await?
                .pop()
                .ok_or_else(|| StateError::NotFound(format!("invoice {id}")))
        })
    }

    fn invoices_of<'a>(&'a self, customer: &'a str) -> BoxFuture<'a, StateResult<Vec<Invoice>>> {
        Box::pin(self.invoices_where("customer_id = $1", Some(customer)))
    }

    fn pending_sync(&self, limit: u32) -> BoxFuture<'_, StateResult<Vec<Invoice>>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT {INVOICE_COLUMNS} FROM invoices WHERE sync_status = '{}' ORDER BY seq LIMIT $1",
                SyncStatus::Pending
            );
            let rows = sqlx::query(&sql)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(invoice_from).collect()
        })
    }

    fn stripe_customer<'a>(
        &'a self,
        customer: &'a str,
    ) -> BoxFuture<'a, StateResult<Option<String>>> {
        Box::pin(async move {
            let row = sqlx::query("SELECT stripe_customer_id FROM customers WHERE id = $1")
                .bind(customer)
                .fetch_optional(&self.pool)
                .await?
                .ok_or_else(|| customer_not_found(customer))?;
            row.opt_text("stripe_customer_id")
        })
    }

    fn set_stripe_customer<'a>(
        &'a self,
        customer: &'a str,
        stripe_id: &'a str,
    ) -> BoxFuture<'a, StateResult<()>> {
        Box::pin(async move {
            sqlx::query("UPDATE customers SET stripe_customer_id = $2 WHERE id = $1")
                .bind(customer)
                .bind(stripe_id)
                .execute(&self.pool)
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
            sqlx::query("UPDATE invoices SET stripe_invoice_id = $2 WHERE id = $1")
                .bind(invoice)
                .bind(stripe_id)
                .execute(&self.pool)
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
            sqlx::query("UPDATE invoices SET sync_status = $2, sync_error = $3 WHERE id = $1")
                .bind(invoice)
                .bind(status.as_str())
                .bind(error)
                .execute(&self.pool)
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
                sqlx::query("UPDATE invoices SET payment_status = $2 WHERE stripe_invoice_id = $1")
                    .bind(stripe_invoice_id)
                    .bind(status.as_str())
                    .execute(&self.pool)
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
            let mut tx = self.pool.begin().await?;
            if let Some(c) = &key.customer_id {
                lock_customer(&mut tx, c).await?;
            }
            sqlx::query("INSERT INTO api_keys (id, role, customer_id, label, key_sha256, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
                .bind(&key.id)
                .bind(key.role.as_str())
                .bind(&key.customer_id)
                .bind(&key.label)
                .bind(&key.key_sha256)
                .bind(key.created_at)
                .execute(&mut *tx)
                .await
                .map_err(|e| conflict_or(e, format!("key {} exists", key.id)))?;
            audit(&mut tx, actor, AuditRecord::key_create(key)).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn api_keys(&self) -> BoxFuture<'_, StateResult<Vec<ApiKey>>> {
        Box::pin(async move {
            let sql =
                format!("SELECT {API_KEY_COLUMNS} FROM api_keys ORDER BY created_at DESC, id");
            let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
            rows.iter().map(api_key_from).collect()
        })
    }

    fn revoke_api_key<'a>(
        &'a self,
        id: &'a str,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<ApiKey>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            let sql = format!(
                "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING {API_KEY_COLUMNS}"
            );
            let row = sqlx::query(&sql)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| StateError::NotFound(format!("active key {id}")))?;
            let key = api_key_from(&row)?;
            audit(&mut tx, actor, AuditRecord::key_revoke(&key)).await?;
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
            let mut tx = self.pool.begin().await?;
            lock_customer(&mut tx, customer).await?;
            let before: Option<Decimal> =
                sqlx::query_scalar("SELECT spending_cap FROM customers WHERE id = $1")
                    .bind(customer)
                    .fetch_one(&mut *tx)
                    .await?;
            sqlx::query("UPDATE customers SET spending_cap = $2 WHERE id = $1")
                .bind(customer)
                .bind(cap)
                .execute(&mut *tx)
                .await?;
            audit(
                &mut tx,
                actor,
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
            let mut tx = self.pool.begin().await?;
            lock_customer(&mut tx, customer).await?;
            let before: bool = sqlx::query_scalar("SELECT suspended FROM customers WHERE id = $1")
                .bind(customer)
                .fetch_one(&mut *tx)
                .await?;
            sqlx::query("UPDATE customers SET suspended = $2 WHERE id = $1")
                .bind(customer)
                .bind(suspended)
                .execute(&mut *tx)
                .await?;
            audit(
                &mut tx,
                actor,
                AuditRecord::suspended_set(customer, before, suspended),
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn record_alerts<'a>(
        &'a self,
        alerts: &'a [NewAlert],
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, StateResult<Vec<NewAlert>>> {
        Box::pin(async move {
            let mut raised = Vec::new();
            let mut tx = self.pool.begin().await?;
            for a in alerts {
                let n = sqlx::query(
                    "INSERT INTO usage_alerts (customer_id, period_start, kind, subject, threshold, payload, next_attempt_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) \
                     ON CONFLICT (customer_id, period_start, kind, subject, threshold) DO NOTHING",
                )
                .bind(&a.customer_id)
                .bind(a.period_start)
                .bind(a.kind.as_str())
                .bind(&a.subject)
                .bind(a.threshold as i32)
                .bind(&a.payload)
                .bind(now)
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
            let sql = format!(
                "UPDATE usage_alerts SET next_attempt_at = $2 WHERE id IN ( \
                   SELECT id FROM usage_alerts WHERE status = 'pending' AND next_attempt_at <= $1 \
                   ORDER BY next_attempt_at, id LIMIT $3 FOR UPDATE SKIP LOCKED) \
                 RETURNING {ALERT_COLUMNS}"
            );
            let rows = sqlx::query(&sql)
                .bind(now)
                .bind(now + lease)
                .bind(limit as i64)
                .fetch_all(&self.pool)
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
                     delivered_at = now(), last_error = NULL WHERE id = $1",
                )
                .bind(id),
                AlertOutcome::Retry { at, error } => sqlx::query(
                    "UPDATE usage_alerts SET attempts = attempts + 1, next_attempt_at = $2, \
                     last_error = $3 WHERE id = $1",
                )
                .bind(id)
                .bind(*at)
                .bind(error),
                AlertOutcome::GaveUp { error } => sqlx::query(
                    "UPDATE usage_alerts SET status = 'failed', attempts = attempts + 1, \
                     last_error = $2 WHERE id = $1",
                )
                .bind(id)
                .bind(error),
            };
            q.execute(&self.pool).await?;
            Ok(())
        })
    }

    fn alerts_of<'a>(&'a self, customer: &'a str) -> BoxFuture<'a, StateResult<Vec<Alert>>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT {ALERT_COLUMNS} FROM usage_alerts WHERE customer_id = $1 ORDER BY id"
            );
            let rows = sqlx::query(&sql)
                .bind(customer)
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(alert_from).collect()
        })
    }

    fn quota_settings(&self) -> BoxFuture<'_, StateResult<HashMap<String, super::QuotaSettings>>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT id, suspended, spending_cap FROM customers")
                .fetch_all(&self.pool)
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
}
