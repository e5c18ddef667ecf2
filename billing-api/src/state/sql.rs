//! The state store, its SQL written once for both databases. What differs
//! between them (binding, transactions, pools, row locks, migrations) is a
//! [`Dialect`]: [`PgState`](super::postgres::PgState) and
//! [`SqliteState`](super::sqlite::SqliteState) are this store over each.
//!
//! Conventions that keep one text valid on both: `$N` placeholders;
//! `CAST($1 AS TEXT) IS NULL` for an optional filter; times set by the
//! store (created, published, retired, revoked, delivered, audited) are the
//! process clock's, bound like any other value, never a database function;
//! a row lock is `D::FOR_UPDATE` appended to the `SELECT`.
//!
//! Concurrency: every change to one customer's plan history, seats, apps,
//! keys or quota settings first reads the customer row with
//! `D::FOR_UPDATE` inside its transaction (`Tx::lock_customer`); finalization
//! batches lock the invoice counter the same way, so invoice numbers stay
//! gapless; alert claims skip rows another claimer holds.

mod credits;

use super::dialect::{q, Dialect, Query};
use super::{
    alert_from, api_key_from, app_from, audit_entry_from, by_customer, carried_ids,
    check_can_subscribe, check_carried_moved, check_plan_usable, conflict_or, customer_from,
    customer_not_found, invoice_from, plan_from, published_plan_from, retire_refused, seats_from,
    seats_value, segments_from, subscription_from, withdrawn_earlier, Alert, AlertOutcome, App,
    AuditEntry, AuditRecord, Customer, Invoice, NewAlert, PaymentStatus, PlanSegment,
    PublishedPlan, QuotaSettings, StateError, StateResult, StateRow, StateStore, Subscription,
    SwitchOutcome, SwitchWrites, SyncStatus, WithdrawWrites, ALERT_COLUMNS, API_KEY_COLUMNS,
    INVOICE_COLUMNS, SUBSCRIPTION_COLUMNS, WITHDRAW_ACTION,
};
use super::{
    anchor_for, check_offered, reopen, trial_end, CancelWrites, Cancellation, NewSubscription,
    UNCANCEL_ACTION,
};
use super::{Applied, Coupon, Entry, Grant, NewGrant, TaxProfile, TaxRate};
use crate::auth::ApiKey;
use billing_domain::catalog::PlanVersion;
use billing_domain::invoice::NewInvoice;
use billing_domain::rating::{Period, SeatInterval};
use chrono::{DateTime, Utc};
use credits::settle_writes;
use rust_decimal::Decimal;
use std::collections::HashMap;

/// The billing state over one SQL database.
#[derive(Clone)]
pub struct SqlState<D> {
    pub(super) db: D,
}

/// A transaction of the store.
struct Tx<D: Dialect>(D::Tx);

impl<D: Dialect> Tx<D> {
    async fn all(&mut self, q: Query) -> StateResult<Vec<D::Row>> {
        Ok(D::fetch(&mut self.0, q).await?)
    }
    async fn opt(&mut self, q: Query) -> StateResult<Option<D::Row>> {
        Ok(self.all(q).await?.into_iter().next())
    }
    async fn one(&mut self, q: Query) -> StateResult<D::Row> {
        self.opt(q)
            .await?
            .ok_or(StateError::Db(sqlx::Error::RowNotFound))
    }
    async fn run(&mut self, q: Query) -> StateResult<u64> {
        Ok(D::run(&mut self.0, q).await?)
    }
    /// A statement whose unique or foreign-key violation means `what`.
    async fn run_or(&mut self, q: Query, what: String) -> StateResult<u64> {
        D::run(&mut self.0, q)
            .await
            .map_err(|e| conflict_or(e, what))
    }
    async fn commit(self) -> StateResult<()> {
        Ok(D::commit(self.0).await?)
    }

    /// Writes the audit entry of a change, in the change's transaction.
    async fn audit(&mut self, actor: &str, at: DateTime<Utc>, rec: AuditRecord) -> StateResult<()> {
        self.run(
            q(
                "INSERT INTO audit_log (at, actor, action, subject, before, after) \
               VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(at)
            .bind(actor)
            .bind(rec.action)
            .bind(rec.subject)
            .bind(rec.before)
            .bind(rec.after),
        )
        .await?;
        Ok(())
    }

    /// Numbers and writes one invoice (`last` is the counter, locked by the
    /// caller), its settlement's writes and its carried-forward links;
    /// None when the customer already has it.
    async fn insert_invoice(
        &mut self,
        n: &NewInvoice,
        finalized_at: DateTime<Utc>,
        last: &mut i64,
    ) -> StateResult<Option<Invoice>> {
        let exists = self
            .opt(
                q(
                    "SELECT 1 FROM invoices WHERE customer_id = $1 AND period_start = $2 \
                   AND kind = $3",
                )
                .bind(&n.customer_id)
                .bind(n.period.start)
                .bind(n.kind.as_str()),
            )
            .await?;
        if exists.is_some() {
            return Ok(None);
        }
        *last += 1;
        let number = crate::invoice::invoice_number(*last);
        let body = serde_json::to_value(&n.body).map_err(|e| StateError::Invalid(e.to_string()))?;
        let row = self
            .one(
                q(format!(
                    "INSERT INTO invoices (id, seq, number, customer_id, period_start, period_end, \
                     currency, subtotal, adjustments_total, carried_in, total, body, finalized_at, \
                     sync_status, kind, discount_total, tax_total, credit_total, amount_due) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
                     $17, $18, $19) RETURNING {INVOICE_COLUMNS}"
                ))
                .bind(&n.id)
                .bind(*last)
                .bind(number)
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
                .bind(n.kind.as_str())
                .bind(n.discount_total)
                .bind(n.tax_total)
                .bind(n.credit_total)
                .bind(n.amount_due),
            )
            .await?;
        // Credits consumed and coupons redeemed, once, with the invoice.
        settle_writes(self, n, finalized_at).await?;
        // An invoice under the minimum points the earlier ones it
        // carries at itself; each is carried once.
        let carried = carried_ids(n);
        let mut moved = 0;
        for id in &carried {
            moved += self
                .run(
                    q(
                        "UPDATE invoices SET carried_to = $1 WHERE id = $2 AND customer_id = $3 \
                       AND carried_to IS NULL AND sync_status = 'carried_forward'",
                    )
                    .bind(&n.id)
                    .bind(id)
                    .bind(&n.customer_id),
                )
                .await?;
        }
        check_carried_moved(n, moved, carried.len())?;
        Ok(Some(invoice_from(&row)?))
    }

    /// The invoice counter, locked until commit.
    async fn lock_counter(&mut self) -> StateResult<i64> {
        self.one(q(format!(
            "SELECT last FROM invoice_numbers WHERE id{}",
            D::FOR_UPDATE
        )))
        .await?
        .bigint("last")
    }

    /// The customer must exist; its row stays locked until commit, so
    /// changes to one customer are serialized.
    async fn lock_customer(&mut self, customer: &str) -> StateResult<()> {
        let sql = format!("SELECT id FROM customers WHERE id = $1{}", D::FOR_UPDATE);
        self.opt(q(sql).bind(customer))
            .await?
            .ok_or_else(|| customer_not_found(customer))?;
        Ok(())
    }

    /// The plan version must be published, not retired, and offered to
    /// `customer` (public, or its own contract); returns it.
    async fn require_plan(
        &mut self,
        plan: &str,
        version: u32,
        customer: &str,
    ) -> StateResult<PlanVersion> {
        let row = self
            .opt(
                q(
                    "SELECT retired_at IS NOT NULL AS retired, body FROM plan_versions \
                   WHERE plan = $1 AND version = $2",
                )
                .bind(plan)
                .bind(version as i32),
            )
            .await?;
        let retired = row.as_ref().map(|r| r.flag("retired")).transpose()?;
        check_plan_usable(retired, plan, version)?;
        let pv = plan_from(&row.expect("usable: found"), plan, version)?;
        check_offered(&pv, customer)?;
        Ok(pv)
    }

    /// Deletes scheduled changes replaced `by` a switch or a cancellation,
    /// each audited.
    async fn withdraw(
        &mut self,
        customer: &str,
        changes: &[Subscription],
        by: &str,
        actor: &str,
        now: DateTime<Utc>,
    ) -> StateResult<()> {
        for old in changes {
            self.run(q("DELETE FROM subscriptions WHERE id = $1").bind(old.id))
                .await?;
            self.audit(
                actor,
                now,
                AuditRecord::subscription_withdraw(customer, old, by),
            )
            .await?;
        }
        Ok(())
    }

    /// The customer's plan history in order.
    async fn history(&mut self, customer: &str) -> StateResult<Vec<Subscription>> {
        let sql = format!(
            "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE customer_id = $1 ORDER BY starts_at"
        );
        self.all(q(sql).bind(customer))
            .await?
            .iter()
            .map(subscription_from)
            .collect()
    }
}

impl<D: Dialect> SqlState<D> {
    async fn begin(&self) -> StateResult<Tx<D>> {
        Ok(Tx(self.db.begin().await?))
    }
    async fn read(&self, q: Query) -> StateResult<Vec<D::Row>> {
        Ok(self.db.read(q).await?)
    }
    async fn read_opt(&self, q: Query) -> StateResult<Option<D::Row>> {
        Ok(self.read(q).await?.into_iter().next())
    }
    async fn read_one(&self, q: Query) -> StateResult<D::Row> {
        self.read_opt(q)
            .await?
            .ok_or(StateError::Db(sqlx::Error::RowNotFound))
    }
    async fn execute(&self, q: Query) -> StateResult<u64> {
        Ok(self.db.execute(q).await?)
    }

    /// Plan segments inside the period, of one customer or of all.
    async fn segments(
        &self,
        customer: Option<&str>,
        period: Period,
    ) -> StateResult<HashMap<String, Vec<PlanSegment>>> {
        let rows = self
            .read(
                q(format!(
                    "SELECT customer_id, {SUBSCRIPTION_COLUMNS} FROM subscriptions \
                   WHERE (CAST($1 AS TEXT) IS NULL OR customer_id = $1) \
                   AND starts_at < $3 AND (ends_at IS NULL OR ends_at > $2) \
                   ORDER BY customer_id, starts_at"
                ))
                .bind(customer)
                .bind(period.start)
                .bind(period.end),
            )
            .await?;
        segments_from(&rows, period)
    }

    /// Seat intervals inside the period, of one customer or of all.
    async fn seats(
        &self,
        customer: Option<&str>,
        period: Period,
    ) -> StateResult<HashMap<String, Vec<SeatInterval>>> {
        let rows = self
            .read(
                q("SELECT customer_id, effective_at, seats FROM seat_changes \
                   WHERE (CAST($1 AS TEXT) IS NULL OR customer_id = $1) AND effective_at < $2 \
                   ORDER BY customer_id, effective_at")
                .bind(customer)
                .bind(period.end),
            )
            .await?;
        seats_from(&rows, period)
    }

    /// Invoices matching `filter` (with `$1` bound to `arg`), by number.
    async fn invoices_where(&self, filter: &str, arg: Option<&str>) -> StateResult<Vec<Invoice>> {
        let sql = format!("SELECT {INVOICE_COLUMNS} FROM invoices WHERE {filter} ORDER BY seq");
        self.read(q(sql).bind(arg))
            .await?
            .iter()
            .map(invoice_from)
            .collect()
    }

    /// Reads a customer's current value of one column and writes the new
    /// one, with its audit entry, in one transaction on the locked row.
    async fn set_customer_field(
        &self,
        customer: &str,
        column: &str,
        value: impl Into<super::dialect::Arg> + Send,
        actor: &str,
        audit: impl FnOnce(&D::Row) -> StateResult<AuditRecord> + Send,
    ) -> StateResult<()> {
        let mut tx = self.begin().await?;
        let now = Utc::now();
        tx.lock_customer(customer).await?;
        let before = tx
            .one(q(format!("SELECT {column} FROM customers WHERE id = $1")).bind(customer))
            .await?;
        let rec = audit(&before)?;
        tx.run(
            q(format!("UPDATE customers SET {column} = $2 WHERE id = $1"))
                .bind(customer)
                .bind(value),
        )
        .await?;
        tx.audit(actor, now, rec).await?;
        tx.commit().await
    }
}

impl<D: Dialect> StateStore for SqlState<D> {
    async fn migrate(&self) -> StateResult<()> {
        self.db.migrate().await
    }

    async fn publish_plan(&self, plan: &PlanVersion, actor: &str) -> StateResult<()> {
        let body = serde_json::to_value(plan).map_err(|e| StateError::Invalid(e.to_string()))?;
        let mut tx = self.begin().await?;
        let now = Utc::now();
        tx.run_or(
            q(
                "INSERT INTO plan_versions (plan, version, body, published_at) \
               VALUES ($1, $2, $3, $4)",
            )
            .bind(&plan.plan)
            .bind(plan.version as i32)
            .bind(&body)
            .bind(now),
            format!(
                "plan {} version {} is already published",
                plan.plan, plan.version
            ),
        )
        .await?;
        if let Some(c) = &plan.customer {
            tx.audit(actor, now, AuditRecord::contract_publish(c, plan))
                .await?;
        }
        tx.audit(actor, now, AuditRecord::plan_publish(plan, body))
            .await?;
        tx.commit().await
    }

    async fn plan_version(&self, plan: &str, version: u32) -> StateResult<PlanVersion> {
        let row = self
            .read_opt(
                q("SELECT body FROM plan_versions WHERE plan = $1 AND version = $2")
                    .bind(plan)
                    .bind(version as i32),
            )
            .await?
            .ok_or_else(|| StateError::NotFound(format!("plan {plan} version {version}")))?;
        plan_from(&row, plan, version)
    }

    async fn create_customer(&self, c: &Customer, actor: &str) -> StateResult<()> {
        let mut tx = self.begin().await?;
        let now = Utc::now();
        tx.run_or(
            q("INSERT INTO customers (id, external_id, name, created_at) VALUES ($1, $2, $3, $4)")
                .bind(&c.id)
                .bind(&c.external_id)
                .bind(&c.name)
                .bind(now),
            format!("customer {} or external id {} exists", c.id, c.external_id),
        )
        .await?;
        tx.audit(actor, now, AuditRecord::customer_create(c))
            .await?;
        tx.commit().await
    }

    async fn customer_by_external_id(&self, external_id: &str) -> StateResult<Customer> {
        let row = self
            .read_opt(
                q("SELECT id, external_id, name FROM customers WHERE external_id = $1")
                    .bind(external_id),
            )
            .await?
            .ok_or_else(|| {
                StateError::NotFound(format!("customer with external id {external_id}"))
            })?;
        customer_from(&row)
    }

    async fn subscribe(
        &self,
        customer: &str,
        new: &NewSubscription,
        actor: &str,
    ) -> StateResult<Subscription> {
        let (plan, version, at) = (new.plan.as_str(), new.version, new.start);
        let mut tx = self.begin().await?;
        let now = Utc::now();
        tx.lock_customer(customer).await?;
        let pv = tx.require_plan(plan, version, customer).await?;
        let rows = tx.history(customer).await?;
        check_can_subscribe(&rows, customer, at)?;
        let anchor = anchor_for(&rows, customer, new.anchor_day)?;
        let trial = trial_end(&rows, plan, pv.trial_days, new.trial_days, at);
        tx.run(insert_subscription(
            customer, plan, version, at, trial, anchor,
        ))
        .await?;
        let row = tx
            .history(customer)
            .await?
            .pop()
            .expect("the row just inserted");
        tx.audit(actor, now, AuditRecord::subscription_start(customer, &row))
            .await?;
        tx.commit().await?;
        Ok(row)
    }

    async fn cancel(
        &self,
        customer: &str,
        at: DateTime<Utc>,
        actor: &str,
    ) -> StateResult<Cancellation> {
        let mut tx = self.begin().await?;
        let now = Utc::now();
        tx.lock_customer(customer).await?;
        let rows = tx.history(customer).await?;
        let Some(w) = CancelWrites::plan(rows, customer, at)? else {
            return Ok(Cancellation {
                effective_at: at,
                withdrawn: vec![],
            });
        };
        tx.withdraw(customer, &w.withdrawn, "cancellation", actor, now)
            .await?;
        tx.run(
            q("UPDATE subscriptions SET ends_at = $2 WHERE id = $1")
                .bind(w.cut.id)
                .bind(at),
        )
        .await?;
        tx.audit(
            actor,
            now,
            AuditRecord::subscription_cancel(customer, &w.cut, at),
        )
        .await?;
        tx.commit().await?;
        Ok(w.outcome())
    }

    async fn withdraw_cancellation(
        &self,
        customer: &str,
        now: DateTime<Utc>,
        actor: &str,
    ) -> StateResult<Subscription> {
        let mut tx = self.begin().await?;
        tx.lock_customer(customer).await?;
        let rows = tx.history(customer).await?;
        let Some(row) = reopen(&rows, customer, now)? else {
            // A retry: the row reopened by the last withdrawal, when it
            // still runs until changed.
            let reopened = tx
                .opt(
                    q(
                        "SELECT before FROM audit_log WHERE subject = $1 AND action = $2 \
                       ORDER BY id DESC LIMIT 1",
                    )
                    .bind(format!("customer:{customer}"))
                    .bind(UNCANCEL_ACTION),
                )
                .await?
                .map(|r| r.json("before"))
                .transpose()?
                .and_then(|b| serde_json::from_value::<Subscription>(b).ok());
            let last = rows.last().cloned();
            return match (reopened, last) {
                (Some(was), Some(last)) if was.id == last.id && last.end.is_none() => Ok(last),
                _ => Err(StateError::NotFound(format!(
                    "scheduled cancellation of customer {customer}"
                ))),
            };
        };
        tx.run(q("UPDATE subscriptions SET ends_at = NULL WHERE id = $1").bind(row.id))
            .await?;
        tx.audit(
            actor,
            Utc::now(),
            AuditRecord::subscription_uncancel(customer, &row),
        )
        .await?;
        tx.commit().await?;
        Ok(Subscription { end: None, ..row })
    }

    async fn anchors(&self) -> StateResult<HashMap<String, u32>> {
        let rows = self
            .read(q(
                "SELECT customer_id, max(anchor_day) AS anchor_day FROM subscriptions \
                 WHERE anchor_day <> 1 GROUP BY customer_id",
            ))
            .await?;
        rows.iter()
            .map(|r| Ok((r.text("customer_id")?, r.int("anchor_day")? as u32)))
            .collect()
    }

    async fn cancellations(&self, period: Period) -> StateResult<HashMap<String, DateTime<Utc>>> {
        let rows = self
            .read(
                q("SELECT customer_id, max(ends_at) AS ended FROM subscriptions GROUP BY customer_id \
                   HAVING count(*) = count(ends_at) AND max(ends_at) > $1 AND max(ends_at) <= $2")
                .bind(period.start)
                .bind(period.end),
            )
            .await?;
        rows.iter()
            .map(|r| Ok((r.text("customer_id")?, r.time("ended")?)))
            .collect()
    }

    async fn switch_plan(
        &self,
        customer: &str,
        plan: &str,
        version: u32,
        at: DateTime<Utc>,
        actor: &str,
    ) -> StateResult<SwitchOutcome> {
        let mut tx = self.begin().await?;
        let now = Utc::now();
        tx.lock_customer(customer).await?;
        tx.require_plan(plan, version, customer).await?;
        let rows = tx.history(customer).await?;
        let w = SwitchWrites::plan(rows, customer, plan, version, at)?;
        if !w.changes() {
            return Ok(w.outcome());
        }
        tx.withdraw(customer, &w.withdrawn, "switch", actor, now)
            .await?;
        if w.cut_end != w.cut.end {
            tx.run(
                q("UPDATE subscriptions SET ends_at = $2 WHERE id = $1")
                    .bind(w.cut.id)
                    .bind(w.cut_end),
            )
            .await?;
        }
        if w.insert {
            tx.run(insert_subscription(
                customer,
                plan,
                version,
                at,
                None,
                w.cut.anchor_day,
            ))
            .await?;
            tx.audit(
                actor,
                now,
                AuditRecord::subscription_switch(customer, &w.cut, plan, version, at),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(w.outcome())
    }

    async fn subscriptions(&self, customer: &str) -> StateResult<Vec<Subscription>> {
        // A read: one snapshot, no lock.
        let mut tx = Tx::<D>(self.db.snapshot().await?);
        tx.opt(q("SELECT 1 FROM customers WHERE id = $1").bind(customer))
            .await?
            .ok_or_else(|| customer_not_found(customer))?;
        let rows = tx.history(customer).await?;
        tx.commit().await?;
        Ok(rows)
    }

    async fn withdraw_change(
        &self,
        customer: &str,
        id: i64,
        now: DateTime<Utc>,
        actor: &str,
    ) -> StateResult<Subscription> {
        let mut tx = self.begin().await?;
        tx.lock_customer(customer).await?;
        let rows = tx.history(customer).await?;
        let Some(w) = WithdrawWrites::plan(&rows, customer, id, now)? else {
            let entries = tx
                .all(
                    q(
                        "SELECT id, at, actor, action, subject, before, after FROM audit_log \
                       WHERE subject = $1 AND action = $2 ORDER BY id",
                    )
                    .bind(format!("customer:{customer}"))
                    .bind(WITHDRAW_ACTION),
                )
                .await?
                .iter()
                .map(audit_entry_from)
                .collect::<StateResult<Vec<_>>>()?;
            // The query read only this customer's withdrawals.
            let befores = entries.iter().filter_map(|e| e.before.as_ref());
            return Ok(withdrawn_earlier(befores, customer, id)?);
        };
        tx.run(q("DELETE FROM subscriptions WHERE id = $1").bind(w.withdrawn.id))
            .await?;
        tx.run(
            q("UPDATE subscriptions SET ends_at = $2 WHERE id = $1")
                .bind(w.previous.id)
                .bind(w.withdrawn.end),
        )
        .await?;
        tx.audit(
            actor,
            Utc::now(),
            AuditRecord::subscription_withdraw(customer, &w.withdrawn, "withdrawal"),
        )
        .await?;
        tx.commit().await?;
        Ok(w.withdrawn)
    }

    async fn set_seats(
        &self,
        customer: &str,
        seats: u32,
        at: DateTime<Utc>,
        actor: &str,
    ) -> StateResult<()> {
        let seats_i = seats_value(seats)?;
        let mut tx = self.begin().await?;
        let now = Utc::now();
        tx.lock_customer(customer).await?;
        let before = tx
            .opt(
                q(
                    "SELECT seats FROM seat_changes WHERE customer_id = $1 AND effective_at <= $2 \
                   ORDER BY effective_at DESC LIMIT 1",
                )
                .bind(customer)
                .bind(at),
            )
            .await?
            .map(|r| r.int("seats"))
            .transpose()?;
        tx.run(
            q(
                "INSERT INTO seat_changes (customer_id, effective_at, seats) VALUES ($1, $2, $3) \
               ON CONFLICT (customer_id, effective_at) DO UPDATE SET seats = excluded.seats",
            )
            .bind(customer)
            .bind(at)
            .bind(seats_i),
        )
        .await?;
        tx.audit(
            actor,
            now,
            AuditRecord::seats_set(customer, before, seats, at),
        )
        .await?;
        tx.commit().await
    }

    async fn plan_segments(&self, customer: &str, period: Period) -> StateResult<Vec<PlanSegment>> {
        Ok(self
            .segments(Some(customer), period)
            .await?
            .remove(customer)
            .unwrap_or_default())
    }

    async fn seat_intervals(
        &self,
        customer: &str,
        period: Period,
    ) -> StateResult<Vec<SeatInterval>> {
        Ok(self
            .seats(Some(customer), period)
            .await?
            .remove(customer)
            .unwrap_or_default())
    }

    async fn audit_log(&self, subject: &str) -> StateResult<Vec<AuditEntry>> {
        self.read(
            q(
                "SELECT id, at, actor, action, subject, before, after FROM audit_log \
               WHERE subject = $1 ORDER BY id",
            )
            .bind(subject),
        )
        .await?
        .iter()
        .map(audit_entry_from)
        .collect()
    }

    async fn audit_after(&self, after: i64, limit: u32) -> StateResult<Vec<(i64, String)>> {
        self.read(
            q("SELECT id, subject FROM audit_log WHERE id > $1 ORDER BY id LIMIT $2")
                .bind(after)
                .bind(limit as i64),
        )
        .await?
        .iter()
        .map(|r| Ok((r.int("id")?, r.text("subject")?)))
        .collect()
    }

    async fn audit_head(&self) -> StateResult<i64> {
        self.read_one(q("SELECT COALESCE(MAX(id), 0) AS id FROM audit_log"))
            .await?
            .int("id")
    }

    async fn list_plans(&self) -> StateResult<Vec<PublishedPlan>> {
        self.read(q(
            "SELECT body, retired_at IS NOT NULL AS retired FROM plan_versions ORDER BY plan, version",
        ))
        .await?
        .iter()
        .map(published_plan_from)
        .collect()
    }

    async fn retire_plan(&self, plan: &str, version: u32, actor: &str) -> StateResult<()> {
        let mut tx = self.begin().await?;
        let now = Utc::now();
        let n = tx
            .run(
                q("UPDATE plan_versions SET retired_at = $3 \
                   WHERE plan = $1 AND version = $2 AND retired_at IS NULL")
                .bind(plan)
                .bind(version as i32)
                .bind(now),
            )
            .await?;
        if n == 0 {
            let exists = tx
                .opt(
                    q("SELECT 1 FROM plan_versions WHERE plan = $1 AND version = $2")
                        .bind(plan)
                        .bind(version as i32),
                )
                .await?;
            return Err(retire_refused(exists.is_some(), plan, version).into());
        }
        tx.audit(actor, now, AuditRecord::plan_retire(plan, version))
            .await?;
        tx.commit().await
    }

    async fn customer(&self, id: &str) -> StateResult<Customer> {
        let row = self
            .read_opt(q("SELECT id, external_id, name FROM customers WHERE id = $1").bind(id))
            .await?
            .ok_or_else(|| customer_not_found(id))?;
        customer_from(&row)
    }

    async fn list_customers(&self, after: Option<&str>, limit: u32) -> StateResult<Vec<Customer>> {
        self.read(
            q("SELECT id, external_id, name FROM customers \
               WHERE (CAST($1 AS TEXT) IS NULL OR id > $1) ORDER BY id LIMIT $2")
            .bind(after)
            .bind(limit as i64),
        )
        .await?
        .iter()
        .map(customer_from)
        .collect()
    }

    async fn create_app(&self, app: &App, actor: &str) -> StateResult<()> {
        let mut tx = self.begin().await?;
        let now = Utc::now();
        tx.lock_customer(&app.customer_id).await?;
        tx.run_or(
            q("INSERT INTO apps (customer_id, app, name, created_at) VALUES ($1, $2, $3, $4)")
                .bind(&app.customer_id)
                .bind(&app.app)
                .bind(&app.name)
                .bind(now),
            format!("app {} exists", app.app),
        )
        .await?;
        tx.audit(actor, now, AuditRecord::app_create(app)).await?;
        tx.commit().await
    }

    async fn apps(&self, customer: &str) -> StateResult<Vec<App>> {
        self.read(
            q("SELECT customer_id, app, name FROM apps WHERE customer_id = $1 ORDER BY app")
                .bind(customer),
        )
        .await?
        .iter()
        .map(app_from)
        .collect()
    }

    async fn plan_segments_all(
        &self,
        period: Period,
    ) -> StateResult<HashMap<String, Vec<PlanSegment>>> {
        self.segments(None, period).await
    }

    async fn seat_intervals_all(
        &self,
        period: Period,
    ) -> StateResult<HashMap<String, Vec<SeatInterval>>> {
        self.seats(None, period).await
    }

    async fn billing_start(&self) -> StateResult<Option<DateTime<Utc>>> {
        self.read_one(q("SELECT min(starts_at) AS s FROM subscriptions"))
            .await?
            .opt_time("s")
    }

    async fn invoices_in_period(
        &self,
        start: DateTime<Utc>,
    ) -> StateResult<HashMap<String, Invoice>> {
        let sql = format!(
            "SELECT {INVOICE_COLUMNS} FROM invoices WHERE period_start = $1 AND kind = 'period'"
        );
        self.read(q(sql).bind(start))
            .await?
            .iter()
            .map(|r| invoice_from(r).map(|i| (i.customer_id.clone(), i)))
            .collect()
    }

    async fn openings(&self, period: Period) -> StateResult<HashMap<String, Vec<Invoice>>> {
        let sql = format!(
            "SELECT {INVOICE_COLUMNS} FROM invoices WHERE kind = 'opening' \
             AND period_start >= $1 AND period_start < $2 ORDER BY seq"
        );
        let rows = self
            .read(q(sql).bind(period.start).bind(period.end))
            .await?;
        Ok(by_customer(
            rows.iter().map(invoice_from).collect::<StateResult<_>>()?,
        ))
    }

    async fn open_carried(
        &self,
        customer: Option<&str>,
    ) -> StateResult<HashMap<String, Vec<Invoice>>> {
        Ok(by_customer(
            self.invoices_where(
                "sync_status = 'carried_forward' AND carried_to IS NULL \
                 AND (CAST($1 AS TEXT) IS NULL OR customer_id = $1)",
                customer,
            )
            .await?,
        ))
    }

    async fn insert_invoices(
        &self,
        new: Vec<NewInvoice>,
        finalized_at: DateTime<Utc>,
    ) -> StateResult<Vec<Invoice>> {
        let mut tx = self.begin().await?;
        // The counter row lock serializes finalizers until commit.
        let mut last = tx.lock_counter().await?;
        let mut written = Vec::with_capacity(new.len());
        for n in new {
            if let Some(inv) = tx.insert_invoice(&n, finalized_at, &mut last).await? {
                written.push(inv);
            }
        }
        tx.run(q("UPDATE invoice_numbers SET last = $1 WHERE id").bind(last))
            .await?;
        tx.commit().await?;
        Ok(written)
    }

    async fn invoice(&self, id: &str) -> StateResult<Invoice> {
        self.invoices_where("id = $1", Some(id))
            .await?
            .pop()
            .ok_or_else(|| StateError::NotFound(format!("invoice {id}")))
    }

    async fn invoices_of(&self, customer: &str) -> StateResult<Vec<Invoice>> {
        self.invoices_where("customer_id = $1", Some(customer))
            .await
    }

    async fn pending_sync(&self, limit: u32) -> StateResult<Vec<Invoice>> {
        let sql = format!(
            "SELECT {INVOICE_COLUMNS} FROM invoices WHERE sync_status = $1 ORDER BY seq LIMIT $2"
        );
        self.read(q(sql).bind(SyncStatus::Pending.as_str()).bind(limit as i64))
            .await?
            .iter()
            .map(invoice_from)
            .collect()
    }

    async fn stripe_customer(&self, customer: &str) -> StateResult<Option<String>> {
        self.read_opt(q("SELECT stripe_customer_id FROM customers WHERE id = $1").bind(customer))
            .await?
            .ok_or_else(|| customer_not_found(customer))?
            .opt_text("stripe_customer_id")
    }

    async fn set_stripe_customer(&self, customer: &str, stripe_id: &str) -> StateResult<()> {
        self.execute(
            q("UPDATE customers SET stripe_customer_id = $2 WHERE id = $1")
                .bind(customer)
                .bind(stripe_id),
        )
        .await?;
        Ok(())
    }

    async fn set_stripe_invoice(&self, invoice: &str, stripe_id: &str) -> StateResult<()> {
        self.execute(
            q("UPDATE invoices SET stripe_invoice_id = $2 WHERE id = $1")
                .bind(invoice)
                .bind(stripe_id),
        )
        .await?;
        Ok(())
    }

    async fn set_sync_status(
        &self,
        invoice: &str,
        status: SyncStatus,
        error: Option<&str>,
    ) -> StateResult<()> {
        self.execute(
            q("UPDATE invoices SET sync_status = $2, sync_error = $3 WHERE id = $1")
                .bind(invoice)
                .bind(status.as_str())
                .bind(error),
        )
        .await?;
        Ok(())
    }

    async fn set_payment_status(
        &self,
        stripe_invoice_id: &str,
        status: PaymentStatus,
    ) -> StateResult<bool> {
        let mut tx = self.begin().await?;
        // A paid top-up's grant first: grant rows before invoice rows, as
        // marking a grant paid takes them.
        if status == PaymentStatus::Paid {
            tx.top_up_paid(stripe_invoice_id).await?;
        }
        let n = tx
            .run(
                q("UPDATE invoices SET payment_status = $2 WHERE stripe_invoice_id = $1")
                    .bind(stripe_invoice_id)
                    .bind(status.as_str()),
            )
            .await?;
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn create_api_key(&self, key: &ApiKey, actor: &str) -> StateResult<()> {
        let mut tx = self.begin().await?;
        let now = Utc::now();
        if let Some(c) = &key.customer_id {
            tx.lock_customer(c).await?;
        }
        tx.run_or(
            q(
                "INSERT INTO api_keys (id, role, customer_id, label, key_sha256, created_at) \
               VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&key.id)
            .bind(key.role.as_str())
            .bind(&key.customer_id)
            .bind(&key.label)
            .bind(&key.key_sha256)
            .bind(key.created_at),
            format!("key {} exists", key.id),
        )
        .await?;
        tx.audit(actor, now, AuditRecord::key_create(key)).await?;
        tx.commit().await
    }

    async fn api_keys(&self) -> StateResult<Vec<ApiKey>> {
        let sql = format!("SELECT {API_KEY_COLUMNS} FROM api_keys ORDER BY created_at DESC, id");
        self.read(q(sql)).await?.iter().map(api_key_from).collect()
    }

    async fn revoke_api_key(&self, id: &str, actor: &str) -> StateResult<ApiKey> {
        let mut tx = self.begin().await?;
        let now = Utc::now();
        let sql = format!(
            "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL \
             RETURNING {API_KEY_COLUMNS}"
        );
        let row = tx
            .opt(q(sql).bind(id).bind(now))
            .await?
            .ok_or_else(|| StateError::NotFound(format!("active key {id}")))?;
        let key = api_key_from(&row)?;
        tx.audit(actor, now, AuditRecord::key_revoke(&key)).await?;
        tx.commit().await?;
        Ok(key)
    }

    async fn set_spending_cap(
        &self,
        customer: &str,
        cap: Option<Decimal>,
        actor: &str,
    ) -> StateResult<()> {
        self.set_customer_field(customer, "spending_cap", cap, actor, move |r| {
            Ok(AuditRecord::spending_cap_set(
                customer,
                r.opt_decimal("spending_cap")?,
                cap,
            ))
        })
        .await
    }

    async fn set_suspended(&self, customer: &str, suspended: bool, actor: &str) -> StateResult<()> {
        self.set_customer_field(customer, "suspended", suspended, actor, move |r| {
            Ok(AuditRecord::suspended_set(
                customer,
                r.flag("suspended")?,
                suspended,
            ))
        })
        .await
    }

    async fn quota_settings(&self) -> StateResult<HashMap<String, QuotaSettings>> {
        self.read(q("SELECT id, suspended, spending_cap FROM customers"))
            .await?
            .iter()
            .map(|r| {
                Ok((
                    r.text("id")?,
                    (r.flag("suspended")?, r.opt_decimal("spending_cap")?),
                ))
            })
            .collect()
    }

    async fn record_alerts(
        &self,
        alerts: &[NewAlert],
        now: DateTime<Utc>,
    ) -> StateResult<Vec<NewAlert>> {
        let mut raised = Vec::new();
        let mut tx = self.begin().await?;
        let created_at = Utc::now();
        for a in alerts {
            let n = tx
                .run(
                    q("INSERT INTO usage_alerts (customer_id, period_start, kind, subject, threshold, \
                       payload, created_at, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                       ON CONFLICT (customer_id, period_start, kind, subject, threshold) DO NOTHING")
                    .bind(&a.customer_id)
                    .bind(a.period_start)
                    .bind(a.kind.as_str())
                    .bind(&a.subject)
                    .bind(a.threshold as i32)
                    .bind(&a.payload)
                    .bind(created_at)
                    .bind(now),
                )
                .await?;
            if n > 0 {
                raised.push(a.clone());
            }
        }
        tx.commit().await?;
        Ok(raised)
    }

    async fn claim_due_alerts(
        &self,
        now: DateTime<Utc>,
        lease: chrono::Duration,
        limit: u32,
    ) -> StateResult<Vec<Alert>> {
        // One statement: a claimer skips the rows another one holds
        // (SQLite: the statement holds the only write lock throughout).
        let sql = format!(
            "UPDATE usage_alerts SET next_attempt_at = $2 WHERE id IN ( \
               SELECT id FROM usage_alerts WHERE status = 'pending' AND next_attempt_at <= $1 \
               ORDER BY next_attempt_at, id LIMIT $3{}) \
             RETURNING {ALERT_COLUMNS}",
            D::SKIP_LOCKED
        );
        let rows = self
            .db
            .write(q(sql).bind(now).bind(now + lease).bind(limit as i64))
            .await?;
        let mut out = rows
            .iter()
            .map(alert_from)
            .collect::<StateResult<Vec<Alert>>>()?;
        out.sort_by_key(|a| a.id);
        Ok(out)
    }

    async fn settle_alert(&self, id: i64, outcome: AlertOutcome) -> StateResult<()> {
        let q = match outcome {
            AlertOutcome::Delivered => q(
                "UPDATE usage_alerts SET status = 'delivered', attempts = attempts + 1, \
                 delivered_at = $2, last_error = NULL WHERE id = $1",
            )
            .bind(id)
            .bind(Utc::now()),
            AlertOutcome::Retry { at, error } => q(
                "UPDATE usage_alerts SET attempts = attempts + 1, next_attempt_at = $2, \
                 last_error = $3 WHERE id = $1",
            )
            .bind(id)
            .bind(at)
            .bind(error),
            AlertOutcome::GaveUp { error } => q(
                "UPDATE usage_alerts SET status = 'failed', attempts = attempts + 1, \
                 last_error = $2 WHERE id = $1",
            )
            .bind(id)
            .bind(error),
        };
        self.execute(q).await?;
        Ok(())
    }

    async fn alerts_of(&self, customer: &str) -> StateResult<Vec<Alert>> {
        let sql =
            format!("SELECT {ALERT_COLUMNS} FROM usage_alerts WHERE customer_id = $1 ORDER BY id");
        self.read(q(sql).bind(customer))
            .await?
            .iter()
            .map(alert_from)
            .collect()
    }

    async fn grant_credit(&self, g: &NewGrant, actor: &str) -> StateResult<(Grant, bool)> {
        self.grant_credit_sql(g, actor).await
    }
    async fn void_grant(
        &self,
        customer: &str,
        grant: &str,
        actor: &str,
        at: DateTime<Utc>,
    ) -> StateResult<Grant> {
        self.void_grant_sql(customer, grant, actor, at).await
    }
    async fn mark_grant_paid(
        &self,
        customer: &str,
        grant: &str,
        actor: &str,
    ) -> StateResult<Grant> {
        self.mark_grant_paid_sql(customer, grant, actor).await
    }
    async fn grants_of(&self, customer: &str) -> StateResult<Vec<Grant>> {
        self.grants_of_sql(customer).await
    }
    async fn ledger_of(&self, customer: &str) -> StateResult<Vec<Entry>> {
        self.ledger_of_sql(customer).await
    }
    async fn open_grants_all(&self) -> StateResult<HashMap<String, Vec<Grant>>> {
        self.open_grants_all_sql().await
    }
    async fn expire_grants(&self, now: DateTime<Utc>, grace: chrono::Duration) -> StateResult<u64> {
        self.expire_grants_sql(now, grace).await
    }
    async fn publish_coupon(&self, c: &Coupon, actor: &str) -> StateResult<Coupon> {
        self.publish_coupon_sql(c, actor).await
    }
    async fn coupons(&self) -> StateResult<Vec<Coupon>> {
        self.coupons_sql().await
    }
    async fn apply_coupon(
        &self,
        customer: &str,
        coupon: &str,
        at: DateTime<Utc>,
        actor: &str,
    ) -> StateResult<Applied> {
        self.apply_coupon_sql(customer, coupon, at, actor).await
    }
    async fn remove_coupon(
        &self,
        customer: &str,
        applied: &str,
        at: DateTime<Utc>,
        actor: &str,
    ) -> StateResult<Applied> {
        self.remove_coupon_sql(customer, applied, at, actor).await
    }
    async fn coupons_of(&self, customer: &str) -> StateResult<Vec<Applied>> {
        self.coupons_of_sql(customer).await
    }
    async fn applied_all(
        &self,
        since: DateTime<Utc>,
    ) -> StateResult<HashMap<String, Vec<Applied>>> {
        self.applied_all_sql(since).await
    }
    async fn create_tax_rate(&self, r: &TaxRate, actor: &str) -> StateResult<()> {
        self.create_tax_rate_sql(r, actor).await
    }
    async fn archive_tax_rate(&self, id: &str, actor: &str) -> StateResult<TaxRate> {
        self.archive_tax_rate_sql(id, actor).await
    }
    async fn tax_rates(&self) -> StateResult<Vec<TaxRate>> {
        self.tax_rates_sql().await
    }
    async fn set_tax_profile(
        &self,
        customer: &str,
        p: &TaxProfile,
        actor: &str,
    ) -> StateResult<()> {
        self.set_tax_profile_sql(customer, p, actor).await
    }
    async fn tax_profile(&self, customer: &str) -> StateResult<Option<TaxProfile>> {
        self.tax_profile_sql(customer).await
    }
    async fn tax_profiles_all(&self) -> StateResult<HashMap<String, TaxProfile>> {
        self.tax_profiles_all_sql().await
    }
}

/// A new open segment of the customer's plan history.
fn insert_subscription(
    customer: &str,
    plan: &str,
    version: u32,
    at: DateTime<Utc>,
    trial_end: Option<DateTime<Utc>>,
    anchor_day: u32,
) -> Query {
    q(
        "INSERT INTO subscriptions (customer_id, plan, version, starts_at, trial_ends_at, anchor_day) \
       VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(customer)
    .bind(plan)
    .bind(version as i32)
    .bind(at)
    .bind(trial_end)
    .bind(anchor_day as i32)
}
