//! PostgreSQL billing state (sqlx, parameterized queries only).
//!
//! Concurrency: changes to one customer's plan history take a row lock on
//! the customer (`SELECT … FOR UPDATE`) inside their transaction, and a
//! partial unique index allows one open subscription per customer, so two
//! concurrent switches cannot interleave into overlapping segments.

use super::{clip, AuditEntry, Customer, PlanSegment, StateError, StateResult, StateStore};
use crate::catalog::PlanVersion;
use crate::rating::{Period, SeatInterval};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Executor, Postgres, Row, Transaction};

#[derive(Clone)]
pub struct PgState {
    pool: PgPool,
}

fn conflict_or(e: sqlx::Error, what: impl Into<String>) -> StateError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StateError::Conflict(what.into()),
        sqlx::Error::Database(d) if d.is_foreign_key_violation() => {
            StateError::NotFound(what.into())
        }
        _ => StateError::Db(e),
    }
}

async fn audit(
    tx: &mut Transaction<'_, Postgres>,
    actor: &str,
    action: &str,
    subject: &str,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
) -> StateResult<()> {
    sqlx::query(
        "INSERT INTO audit_log (actor, action, subject, before, after) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(actor)
    .bind(action)
    .bind(subject)
    .bind(before)
    .bind(after)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn lock_customer(tx: &mut Transaction<'_, Postgres>, customer: &str) -> StateResult<()> {
    sqlx::query("SELECT id FROM customers WHERE id = $1 FOR UPDATE")
        .bind(customer)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| StateError::NotFound(format!("customer {customer}")))?;
    Ok(())
}

async fn require_plan(
    tx: &mut Transaction<'_, Postgres>,
    plan: &str,
    version: u32,
) -> StateResult<()> {
    let row = sqlx::query("SELECT retired_at IS NOT NULL AS retired FROM plan_versions WHERE plan = $1 AND version = $2")
        .bind(plan)
        .bind(version as i32)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| StateError::NotFound(format!("plan {plan} version {version}")))?;
    if row.get::<bool, _>("retired") {
        return Err(StateError::Invalid(format!(
            "plan {plan} version {version} is retired"
        )));
    }
    Ok(())
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
            audit(
                &mut tx,
                actor,
                "plan.publish",
                &format!("plan:{}", plan.plan),
                None,
                Some(body),
            )
            .await?;
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
            serde_json::from_value(row.get("body"))
                .map_err(|e| StateError::Invalid(format!("stored plan {plan} v{version}: {e}")))
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
            audit(
                &mut tx,
                actor,
                "customer.create",
                &format!("customer:{}", c.id),
                None,
                Some(serde_json::to_value(c).unwrap()),
            )
            .await?;
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
            Ok(Customer {
                id: row.get("id"),
                external_id: row.get("external_id"),
                name: row.get("name"),
            })
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
            if any.is_some() {
                return Err(StateError::Conflict(format!(
                    "customer {customer} already has a subscription; switch plans instead"
                )));
            }
            sqlx::query("INSERT INTO subscriptions (customer_id, plan, version, starts_at) VALUES ($1, $2, $3, $4)")
                .bind(customer)
                .bind(plan)
                .bind(version as i32)
                .bind(at)
                .execute(&mut *tx)
                .await?;
            let after = serde_json::json!({"plan": plan, "version": version, "starts_at": at});
            audit(
                &mut tx,
                actor,
                "subscription.start",
                &format!("customer:{customer}"),
                None,
                Some(after),
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
    ) -> BoxFuture<'a, StateResult<()>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            lock_customer(&mut tx, customer).await?;
            require_plan(&mut tx, plan, version).await?;
            let open = sqlx::query("SELECT id, plan, version, starts_at FROM subscriptions WHERE customer_id = $1 AND ends_at IS NULL")
                .bind(customer)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| StateError::Invalid(format!("customer {customer} has no open subscription")))?;
            let starts: DateTime<Utc> = open.get("starts_at");
            if at <= starts {
                return Err(StateError::Invalid(format!(
                    "a switch at {at} must come after the current plan's start {starts}"
                )));
            }
            let (old_plan, old_version): (String, i32) = (open.get("plan"), open.get("version"));
            sqlx::query("UPDATE subscriptions SET ends_at = $2 WHERE id = $1")
                .bind(open.get::<i64, _>("id"))
                .bind(at)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO subscriptions (customer_id, plan, version, starts_at) VALUES ($1, $2, $3, $4)")
                .bind(customer)
                .bind(plan)
                .bind(version as i32)
                .bind(at)
                .execute(&mut *tx)
                .await?;
            let before = serde_json::json!({"plan": old_plan, "version": old_version});
            let after = serde_json::json!({"plan": plan, "version": version, "effective_at": at});
            audit(
                &mut tx,
                actor,
                "subscription.switch",
                &format!("customer:{customer}"),
                Some(before),
                Some(after),
            )
            .await?;
            tx.commit().await?;
            Ok(())
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
            let seats_i = i32::try_from(seats)
                .map_err(|_| StateError::Invalid("seats out of range".into()))?;
            let mut tx = self.pool.begin().await?;
            lock_customer(&mut tx, customer).await?;
            let before = sqlx::query("SELECT seats FROM seat_changes WHERE customer_id = $1 AND effective_at <= $2 ORDER BY effective_at DESC LIMIT 1")
                .bind(customer)
                .bind(at)
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| serde_json::json!({"seats": r.get::<i32, _>("seats")}));
            sqlx::query(
                "INSERT INTO seat_changes (customer_id, effective_at, seats) VALUES ($1, $2, $3) \
                 ON CONFLICT (customer_id, effective_at) DO UPDATE SET seats = EXCLUDED.seats",
            )
            .bind(customer)
            .bind(at)
            .bind(seats_i)
            .execute(&mut *tx)
            .await?;
            let after = serde_json::json!({"seats": seats, "effective_at": at});
            audit(
                &mut tx,
                actor,
                "seats.set",
                &format!("customer:{customer}"),
                before,
                Some(after),
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
            let rows = sqlx::query(
                "SELECT plan, version, starts_at, ends_at FROM subscriptions WHERE customer_id = $1 \
                 AND starts_at < $3 AND (ends_at IS NULL OR ends_at > $2) ORDER BY starts_at",
            )
            .bind(customer)
            .bind(period.start)
            .bind(period.end)
            .fetch_all(&self.pool)
            .await?;
            Ok(rows
                .iter()
                .filter_map(|r| {
                    let (start, end) =
                        clip([(r.get("starts_at"), r.get("ends_at"))], period).pop()?;
                    Some(PlanSegment {
                        plan: r.get("plan"),
                        version: r.get::<i32, _>("version") as u32,
                        start,
                        end,
                    })
                })
                .collect())
        })
    }

    fn seat_intervals<'a>(
        &'a self,
        customer: &'a str,
        period: Period,
    ) -> BoxFuture<'a, StateResult<Vec<SeatInterval>>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT effective_at, seats FROM seat_changes WHERE customer_id = $1 AND effective_at < $2 ORDER BY effective_at")
                .bind(customer)
                .bind(period.end)
                .fetch_all(&self.pool)
                .await?;
            let changes: Vec<(DateTime<Utc>, u32)> = rows
                .iter()
                .map(|r| (r.get("effective_at"), r.get::<i32, _>("seats") as u32))
                .collect();
            let mut out = Vec::new();
            for (i, (at, seats)) in changes.iter().enumerate() {
                let until = changes.get(i + 1).map(|c| c.0);
                if let Some((start, end)) = clip([(*at, until)], period).pop() {
                    if *seats > 0 {
                        out.push(SeatInterval {
                            start,
                            end,
                            seats: *seats,
                        });
                    }
                }
            }
            Ok(out)
        })
    }

    fn audit_log<'a>(&'a self, subject: &'a str) -> BoxFuture<'a, StateResult<Vec<AuditEntry>>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT id, at, actor, action, subject, before, after FROM audit_log WHERE subject = $1 ORDER BY id")
                .bind(subject)
                .fetch_all(&self.pool)
                .await?;
            Ok(rows
                .iter()
                .map(|r| AuditEntry {
                    id: r.get("id"),
                    at: r.get("at"),
                    actor: r.get("actor"),
                    action: r.get("action"),
                    subject: r.get("subject"),
                    before: r.get("before"),
                    after: r.get("after"),
                })
                .collect())
        })
    }
}
