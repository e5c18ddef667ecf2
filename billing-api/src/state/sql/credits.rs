//! The SQL of credits, coupons and taxes (the `StateStore` methods in
//! `sql.rs` call these), and what an invoice's transaction writes for them.
//!
//! Exactly once: an invoice's consumptions are written in the transaction
//! that writes the invoice, each after reading the grant's row with the
//! row lock and checking that its remaining balance is still what the
//! invoice was settled with (a void, an expiry or another invoice in
//! between makes the batch fail and the next run settle again); the ledger
//! admits one consumption per grant and invoice. A grant's `remaining` is
//! written beside its ledger entries in the same transaction.

use super::{q, AuditRecord, Dialect, SqlState, StateError, StateResult, StateRow, Tx};
use crate::state::{conflict_or, customer_not_found, NewGrant};
use billing_domain::credit::{Entry, EntryKind, Grant};
use billing_domain::invoice::{build_top_up, NewInvoice};
use billing_domain::settle::{Applied, Coupon, CouponDuration, TaxProfile, TaxRate};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sha2::Digest;
use std::collections::HashMap;

const GRANT_COLUMNS: &str = "id, customer_id, kind, currency, amount, remaining, effective_at, \
    expires_at, priority, reason, usable, invoice_id, created_at, voided_at";

fn invalid(what: &str, e: impl std::fmt::Display) -> StateError {
    StateError::Invalid(format!("stored {what}: {e}"))
}

fn grant_from(r: &impl StateRow) -> StateResult<Grant> {
    Ok(Grant {
        id: r.text("id")?,
        customer_id: r.text("customer_id")?,
        kind: r.text("kind")?.parse().map_err(|e| invalid("grant", e))?,
        currency: r.text("currency")?,
        amount: r.decimal("amount")?,
        remaining: r.decimal("remaining")?,
        effective_at: r.time("effective_at")?,
        expires_at: r.opt_time("expires_at")?,
        priority: r.int("priority")? as u32,
        reason: r.text("reason")?,
        usable: r.flag("usable")?,
        invoice_id: r.opt_text("invoice_id")?,
        created_at: r.time("created_at")?,
        voided_at: r.opt_time("voided_at")?,
    })
}

fn entry_from(r: &impl StateRow) -> StateResult<Entry> {
    Ok(Entry {
        seq: r.bigint("seq")?,
        grant_id: r.text("grant_id")?,
        kind: r
            .text("kind")?
            .parse()
            .map_err(|e| invalid("ledger entry", e))?,
        amount: r.decimal("amount")?,
        currency: r.text("currency")?,
        at: r.time("at")?,
        invoice_id: r.opt_text("invoice_id")?,
    })
}

fn json_of<T: serde::de::DeserializeOwned>(r: &impl StateRow, what: &str) -> StateResult<T> {
    serde_json::from_value(r.json("body")?).map_err(|e| invalid(what, e))
}

fn to_json(v: &impl serde::Serialize) -> StateResult<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| StateError::Invalid(e.to_string()))
}

/// The request a grant's idempotency key stands for.
fn request_sha256(g: &NewGrant) -> StateResult<String> {
    Ok(hex::encode(sha2::Sha256::digest(
        serde_json::to_vec(g).map_err(|e| StateError::Invalid(e.to_string()))?,
    )))
}

fn audit(
    action: &'static str,
    customer: &str,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
) -> AuditRecord {
    AuditRecord {
        action,
        subject: format!("customer:{customer}"),
        before,
        after,
    }
}

const APPLIED_COLUMNS: &str =
    "a.id, a.customer_id, a.applied_at, a.removed_at, a.ends_at, c.body, \
    (SELECT count(*) FROM coupon_redemptions r WHERE r.applied_id = a.id) AS redeemed";

fn applied_from(r: &impl StateRow) -> StateResult<Applied> {
    Ok(Applied {
        id: r.text("id")?,
        customer_id: r.text("customer_id")?,
        coupon: json_of(r, "coupon")?,
        applied_at: r.time("applied_at")?,
        removed_at: r.opt_time("removed_at")?,
        ends_at: r.opt_time("ends_at")?,
        redeemed: r.bigint("redeemed")? as u32,
    })
}

impl<D: Dialect> Tx<D> {
    async fn grant_row(&mut self, customer: &str, grant: &str) -> StateResult<Grant> {
        let sql = format!(
            "SELECT {GRANT_COLUMNS} FROM credit_grants WHERE id = $1 AND customer_id = $2{}",
            D::FOR_UPDATE
        );
        let row = self
            .opt(q(sql).bind(grant).bind(customer))
            .await?
            .ok_or_else(|| StateError::NotFound(format!("credit grant {grant}")))?;
        grant_from(&row)
    }

    async fn ledger(
        &mut self,
        g: &Grant,
        kind: EntryKind,
        amount: Decimal,
        at: DateTime<Utc>,
        invoice: Option<&str>,
    ) -> StateResult<()> {
        self.run_or(
            q("INSERT INTO credit_ledger (grant_id, customer_id, kind, amount, currency, at, invoice_id, \
               recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
            .bind(&g.id)
            .bind(&g.customer_id)
            .bind(kind.as_str())
            .bind(amount)
            .bind(&g.currency)
            .bind(at)
            .bind(invoice)
            .bind(Utc::now()),
            format!("credit grant {} already has a {kind} entry", g.id),
        )
        .await?;
        Ok(())
    }

    async fn set_usable(&mut self, grant: &str) -> StateResult<()> {
        self.run(
            q("UPDATE credit_grants SET usable = $1 WHERE id = $2")
                .bind(true)
                .bind(grant),
        )
        .await?;
        Ok(())
    }

    /// Audits a change to grant `before` (as it stands now, after it) and
    /// commits; the grant as changed.
    async fn grant_changed(
        mut self,
        action: &'static str,
        before: &Grant,
        actor: &str,
    ) -> StateResult<Grant> {
        let after = self.grant_row(&before.customer_id, &before.id).await?;
        self.audit(
            actor,
            Utc::now(),
            audit(
                action,
                &before.customer_id,
                Some(to_json(before)?),
                Some(to_json(&after)?),
            ),
        )
        .await?;
        self.commit().await?;
        Ok(after)
    }

    async fn set_remaining(&mut self, grant: &str, remaining: Decimal) -> StateResult<()> {
        self.run(
            q("UPDATE credit_grants SET remaining = $1 WHERE id = $2")
                .bind(remaining)
                .bind(grant),
        )
        .await?;
        Ok(())
    }
}

/// What the transaction writing invoice `n` writes for its settlement:
/// each credit consumed (checked against the grant's balance now) and
/// each coupon redeemed.
pub(super) async fn settle_writes<D: Dialect>(
    tx: &mut Tx<D>,
    n: &NewInvoice,
    finalized_at: DateTime<Utc>,
) -> StateResult<()> {
    let Some(s) = &n.body.settlement else {
        return Ok(());
    };
    for c in &s.credits {
        let g = tx.grant_row(&n.customer_id, &c.grant_id).await?;
        if g.remaining != c.balance_before || g.voided_at.is_some() || !g.usable {
            return Err(StateError::Conflict(format!(
                "credit grant {} changed while invoice {} was settled (balance {}, settled with {})",
                g.id, n.id, g.remaining, c.balance_before
            )));
        }
        let left = g.remaining + c.amount;
        if left < Decimal::ZERO {
            return Err(StateError::Conflict(format!(
                "credit grant {} holds {} but invoice {} would consume {}",
                g.id, g.remaining, n.id, -c.amount
            )));
        }
        tx.ledger(
            &g,
            EntryKind::Consumption,
            c.amount,
            finalized_at,
            Some(&n.id),
        )
        .await?;
        tx.set_remaining(&g.id, left).await?;
    }
    let once: Vec<&str> = n
        .body
        .settled_with
        .iter()
        .flat_map(|i| &i.coupons)
        .filter(|a| a.coupon.duration == CouponDuration::Once)
        .map(|a| a.id.as_str())
        .collect();
    for d in &s.discounts {
        if !billing_domain::settle::redeems(d) {
            // Nothing in its scope: not redeemed (a once coupon waits).
            continue;
        }
        if once.contains(&d.applied_id.as_str()) {
            let used = tx
                .one(
                    q("SELECT count(*) AS n FROM coupon_redemptions WHERE applied_id = $1")
                        .bind(&d.applied_id),
                )
                .await?
                .bigint("n")?;
            if used > 0 {
                return Err(StateError::Conflict(format!(
                    "coupon {} (once) was redeemed by another invoice while {} was settled",
                    d.applied_id, n.id
                )));
            }
        }
        tx.run_or(
            q("INSERT INTO coupon_redemptions (applied_id, invoice_id) VALUES ($1, $2)")
                .bind(&d.applied_id)
                .bind(&n.id),
            format!(
                "coupon {} already redeemed by invoice {}",
                d.applied_id, n.id
            ),
        )
        .await?;
    }
    Ok(())
}

impl<D: Dialect> SqlState<D> {
    pub(super) async fn grant_credit_sql(
        &self,
        g: &NewGrant,
        actor: &str,
    ) -> StateResult<(Grant, bool)> {
        let hash = request_sha256(g)?;
        let mut tx = self.begin().await?;
        tx.lock_customer(&g.customer_id).await?;
        if let Some(key) = &g.idempotency_key {
            let sql = format!(
                "SELECT {GRANT_COLUMNS}, request_sha256 FROM credit_grants \
                 WHERE customer_id = $1 AND idempotency_key = $2"
            );
            if let Some(row) = tx.opt(q(sql).bind(&g.customer_id).bind(key)).await? {
                if row.text("request_sha256")? != hash {
                    return Err(StateError::Conflict(format!(
                        "idempotency key {key:?} was used for another credit grant request"
                    )));
                }
                return Ok((grant_from(&row)?, false));
            }
        }
        let now = crate::wire::now();
        let effective_at = g.effective_at.unwrap_or(now);
        if g.expires_at.is_some_and(|e| e <= effective_at) {
            return Err(StateError::Invalid(format!(
                "expires_at: must be after effective_at ({effective_at})"
            )));
        }
        let id = format!("gr_{}", hex::encode(rand::random::<[u8; 8]>()));
        let usable = !g.top_up;
        let sql = format!(
            "INSERT INTO credit_grants (id, customer_id, kind, currency, amount, remaining, effective_at, \
             expires_at, priority, reason, usable, invoice_id, idempotency_key, request_sha256, created_at) \
             VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8, $9, $10, NULL, $11, $12, $13) RETURNING {GRANT_COLUMNS}"
        );
        let row = tx
            .one(
                q(sql)
                    .bind(&id)
                    .bind(&g.customer_id)
                    .bind(g.kind.as_str())
                    .bind(&g.currency)
                    .bind(g.amount)
                    .bind(effective_at)
                    .bind(g.expires_at)
                    .bind(g.priority as i32)
                    .bind(&g.reason)
                    .bind(usable)
                    .bind(&g.idempotency_key)
                    .bind(hash)
                    .bind(now),
            )
            .await?;
        let mut grant = grant_from(&row)?;
        tx.ledger(
            &grant,
            EntryKind::Grant,
            grant.amount,
            grant.effective_at,
            None,
        )
        .await?;
        if g.top_up {
            // Its top-up invoice, numbered with every other invoice.
            let mut last = tx.lock_counter().await?;
            let n = build_top_up(&g.customer_id, &id, g.amount, &g.currency, now, &g.reason);
            tx.insert_invoice(&n, now, &mut last)
                .await?
                .ok_or_else(|| StateError::Conflict(format!("top-up invoice {} exists", n.id)))?;
            tx.run(q("UPDATE invoice_numbers SET last = $1 WHERE id").bind(last))
                .await?;
            tx.run(
                q("UPDATE credit_grants SET invoice_id = $1 WHERE id = $2")
                    .bind(&n.id)
                    .bind(&id),
            )
            .await?;
            grant.invoice_id = Some(n.id);
        }
        tx.audit(
            actor,
            now,
            audit("credit.grant", &g.customer_id, None, Some(to_json(&grant)?)),
        )
        .await?;
        tx.commit().await?;
        Ok((grant, true))
    }

    pub(super) async fn void_grant_sql(
        &self,
        customer: &str,
        grant: &str,
        actor: &str,
        at: DateTime<Utc>,
    ) -> StateResult<Grant> {
        let mut tx = self.begin().await?;
        tx.lock_customer(customer).await?;
        let g = tx.grant_row(customer, grant).await?;
        if g.voided_at.is_some() {
            return Ok(g);
        }
        if !g.usable && g.invoice_id.is_some() {
            // Invoices are not voided here: a top-up still to be paid would
            // be collected for credit that never becomes usable.
            return Err(StateError::Conflict(format!(
                "credit grant {grant} awaits payment of its top-up invoice {}; it can be voided once paid",
                g.invoice_id.as_deref().unwrap_or_default()
            )));
        }
        if !g.remaining.is_zero() {
            tx.ledger(&g, EntryKind::Void, -g.remaining, at, None)
                .await?;
        }
        tx.run(
            q("UPDATE credit_grants SET remaining = $1, voided_at = $2 WHERE id = $3")
                .bind(Decimal::ZERO)
                .bind(at)
                .bind(&g.id),
        )
        .await?;
        tx.grant_changed("credit.void", &g, actor).await
    }

    pub(super) async fn mark_grant_paid_sql(
        &self,
        customer: &str,
        grant: &str,
        actor: &str,
    ) -> StateResult<Grant> {
        let mut tx = self.begin().await?;
        tx.lock_customer(customer).await?;
        let g = tx.grant_row(customer, grant).await?;
        if g.usable {
            return Ok(g);
        }
        if g.voided_at.is_some() {
            return Err(StateError::Conflict(format!(
                "credit grant {grant} is voided"
            )));
        }
        if let Some(inv) = &g.invoice_id {
            let sent = tx
                .one(q("SELECT stripe_invoice_id FROM invoices WHERE id = $1").bind(inv))
                .await?
                .opt_text("stripe_invoice_id")?;
            if let Some(sid) = sent {
                return Err(StateError::Conflict(format!(
                    "top-up invoice {inv} is with Stripe ({sid}): Stripe's invoice.paid makes the grant usable"
                )));
            }
        }
        tx.set_usable(grant).await?;
        // Its top-up invoice is paid (marked by staff where Stripe is not).
        if let Some(inv) = &g.invoice_id {
            tx.run(q("UPDATE invoices SET payment_status = 'paid' WHERE id = $1").bind(inv))
                .await?;
        }
        tx.grant_changed("credit.paid", &g, actor).await
    }

    pub(super) async fn grants_where(
        &self,
        filter: &str,
        arg: Option<&str>,
    ) -> StateResult<Vec<Grant>> {
        let sql = format!(
            "SELECT {GRANT_COLUMNS} FROM credit_grants WHERE {filter} ORDER BY customer_id, created_at, id"
        );
        self.read(q(sql).bind(arg))
            .await?
            .iter()
            .map(grant_from)
            .collect()
    }

    pub(super) async fn grants_of_sql(&self, customer: &str) -> StateResult<Vec<Grant>> {
        self.customer_exists(customer).await?;
        self.grants_where("customer_id = $1", Some(customer)).await
    }

    async fn customer_exists(&self, customer: &str) -> StateResult<()> {
        self.read_opt(q("SELECT id FROM customers WHERE id = $1").bind(customer))
            .await?
            .ok_or_else(|| customer_not_found(customer))?;
        Ok(())
    }

    pub(super) async fn ledger_of_sql(&self, customer: &str) -> StateResult<Vec<Entry>> {
        self.customer_exists(customer).await?;
        self.read(
            q(
                "SELECT seq, grant_id, kind, amount, currency, at, invoice_id FROM credit_ledger \
               WHERE customer_id = $1 ORDER BY seq",
            )
            .bind(customer),
        )
        .await?
        .iter()
        .map(entry_from)
        .collect()
    }

    pub(super) async fn open_grants_all_sql(&self) -> StateResult<HashMap<String, Vec<Grant>>> {
        // `remaining` is decimal text in SQLite: zero is filtered here.
        let mut out: HashMap<String, Vec<Grant>> = HashMap::new();
        for g in self
            .grants_where("voided_at IS NULL AND CAST($1 AS TEXT) IS NULL", None)
            .await?
        {
            if g.remaining > Decimal::ZERO {
                out.entry(g.customer_id.clone()).or_default().push(g);
            }
        }
        Ok(out)
    }

    pub(super) async fn expire_grants_sql(
        &self,
        now: DateTime<Utc>,
        grace: chrono::Duration,
    ) -> StateResult<u64> {
        let due: Vec<Grant> = self
            .grants_where(
                "voided_at IS NULL AND expires_at IS NOT NULL AND CAST($1 AS TEXT) IS NULL",
                None,
            )
            .await?
            .into_iter()
            .filter(|g| billing_domain::credit::expiry_due(g, now, grace))
            .collect();
        let mut written = 0;
        for g in due {
            let mut tx = self.begin().await?;
            // The customer, then the grant: the order a void takes them in.
            tx.lock_customer(&g.customer_id).await?;
            let cur = tx.grant_row(&g.customer_id, &g.id).await?;
            if !billing_domain::credit::expiry_due(&cur, now, grace) {
                continue;
            }
            let at = cur.expires_at.expect("due grants expire");
            tx.ledger(&cur, EntryKind::Expiry, -cur.remaining, at, None)
                .await?;
            tx.set_remaining(&cur.id, Decimal::ZERO).await?;
            tx.audit(
                "finalizer",
                Utc::now(),
                audit(
                    "credit.expire",
                    &cur.customer_id,
                    Some(serde_json::json!({"grant": cur.id, "remaining": cur.remaining})),
                    Some(serde_json::json!({"grant": cur.id, "remaining": "0", "expired_at": at})),
                ),
            )
            .await?;
            tx.commit().await?;
            written += 1;
        }
        Ok(written)
    }

    pub(super) async fn publish_coupon_sql(&self, c: &Coupon, actor: &str) -> StateResult<Coupon> {
        let mut tx = self.begin().await?;
        let now = Utc::now();
        let last = tx
            .opt(q("SELECT max(version) AS v FROM coupons WHERE id = $1").bind(&c.id))
            .await?
            .map(|r| r.opt_int("v"))
            .transpose()?
            .flatten()
            .unwrap_or(0);
        let published = Coupon {
            version: last as u32 + 1,
            ..c.clone()
        };
        let body = to_json(&published)?;
        tx.run_or(
            q("INSERT INTO coupons (id, version, body, created_at) VALUES ($1, $2, $3, $4)")
                .bind(&published.id)
                .bind(published.version as i32)
                .bind(&body)
                .bind(now),
            format!(
                "coupon {} version {} exists",
                published.id, published.version
            ),
        )
        .await?;
        tx.audit(
            actor,
            now,
            AuditRecord {
                action: "coupon.publish",
                subject: format!("coupon:{}", published.id),
                before: None,
                after: Some(body),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(published)
    }

    pub(super) async fn coupons_sql(&self) -> StateResult<Vec<Coupon>> {
        self.read(q("SELECT body FROM coupons ORDER BY id, version"))
            .await?
            .iter()
            .map(|r| json_of(r, "coupon"))
            .collect()
    }

    pub(super) async fn apply_coupon_sql(
        &self,
        customer: &str,
        coupon: &str,
        at: DateTime<Utc>,
        actor: &str,
    ) -> StateResult<Applied> {
        let mut tx = self.begin().await?;
        tx.lock_customer(customer).await?;
        let sql = format!(
            "SELECT body FROM coupons WHERE id = $1 AND version = (SELECT max(version) FROM coupons WHERE id = $1){}",
            D::FOR_UPDATE
        );
        let c: Coupon = match tx.opt(q(sql).bind(coupon)).await? {
            Some(r) => json_of(&r, "coupon")?,
            None => return Err(StateError::NotFound(format!("coupon {coupon}"))),
        };
        if let Some(max) = c.max_redemptions {
            let used = tx
                .one(
                    q("SELECT count(*) AS n FROM customer_coupons WHERE coupon_id = $1")
                        .bind(coupon),
                )
                .await?
                .bigint("n")?;
            if used >= max as i64 {
                return Err(StateError::Conflict(format!(
                    "coupon {coupon} has reached its {max} redemptions"
                )));
            }
        }
        let anchor = tx
            .one(
                q("SELECT max(anchor_day) AS a FROM subscriptions WHERE customer_id = $1")
                    .bind(customer),
            )
            .await?
            .opt_int("a")?
            .unwrap_or(1) as u32;
        let ends_at = match (c.duration, c.periods) {
            (CouponDuration::Repeating, Some(n)) => {
                let mut p = billing_domain::invoice::period_of(at, anchor);
                for _ in 1..n {
                    p = billing_domain::invoice::following(p);
                }
                Some(p.end)
            }
            _ => None,
        };
        let now = Utc::now();
        let id = format!("ac_{}", hex::encode(rand::random::<[u8; 8]>()));
        tx.run(
            q("INSERT INTO customer_coupons (id, customer_id, coupon_id, coupon_version, applied_at, \
               removed_at, ends_at, created_at) VALUES ($1, $2, $3, $4, $5, NULL, $6, $7)")
            .bind(&id)
            .bind(customer)
            .bind(&c.id)
            .bind(c.version as i32)
            .bind(at)
            .bind(ends_at)
            .bind(now),
        )
        .await?;
        let applied = Applied {
            id,
            customer_id: customer.into(),
            coupon: c,
            applied_at: at,
            removed_at: None,
            ends_at,
            redeemed: 0,
        };
        tx.audit(
            actor,
            now,
            audit("coupon.apply", customer, None, Some(to_json(&applied)?)),
        )
        .await?;
        tx.commit().await?;
        Ok(applied)
    }

    async fn applied_where(
        &self,
        filter: &str,
        args: (Option<&str>, Option<DateTime<Utc>>),
    ) -> StateResult<Vec<Applied>> {
        let sql = format!(
            "SELECT {APPLIED_COLUMNS} FROM customer_coupons a JOIN coupons c \
             ON c.id = a.coupon_id AND c.version = a.coupon_version WHERE {filter} \
             ORDER BY a.customer_id, a.applied_at, a.id"
        );
        self.read(q(sql).bind(args.0).bind(args.1))
            .await?
            .iter()
            .map(applied_from)
            .collect()
    }

    pub(super) async fn remove_coupon_sql(
        &self,
        customer: &str,
        applied: &str,
        at: DateTime<Utc>,
        actor: &str,
    ) -> StateResult<Applied> {
        let mut tx = self.begin().await?;
        tx.lock_customer(customer).await?;
        let row = tx
            .opt(
                q("SELECT removed_at FROM customer_coupons WHERE id = $1 AND customer_id = $2")
                    .bind(applied)
                    .bind(customer),
            )
            .await?
            .ok_or_else(|| StateError::NotFound(format!("applied coupon {applied}")))?;
        if row.opt_time("removed_at")?.is_none() {
            tx.run(
                q("UPDATE customer_coupons SET removed_at = $1 WHERE id = $2")
                    .bind(at)
                    .bind(applied),
            )
            .await?;
            tx.audit(
                actor,
                Utc::now(),
                audit(
                    "coupon.remove",
                    customer,
                    Some(serde_json::json!({"applied": applied})),
                    Some(serde_json::json!({"applied": applied, "removed_at": at})),
                ),
            )
            .await?;
        }
        tx.commit().await?;
        self.applied_where(
            "a.id = $1 AND CAST($2 AS TEXT) IS NULL",
            (Some(applied), None),
        )
        .await?
        .pop()
        .ok_or_else(|| StateError::NotFound(format!("applied coupon {applied}")))
    }

    pub(super) async fn coupons_of_sql(&self, customer: &str) -> StateResult<Vec<Applied>> {
        self.customer_exists(customer).await?;
        self.applied_where(
            "a.customer_id = $1 AND CAST($2 AS TEXT) IS NULL",
            (Some(customer), None),
        )
        .await
    }

    pub(super) async fn applied_all_sql(
        &self,
        since: DateTime<Utc>,
    ) -> StateResult<HashMap<String, Vec<Applied>>> {
        let mut out: HashMap<String, Vec<Applied>> = HashMap::new();
        for a in self
            .applied_where(
                "CAST($1 AS TEXT) IS NULL AND (a.removed_at IS NULL OR a.removed_at > $2)",
                (None, Some(since)),
            )
            .await?
        {
            out.entry(a.customer_id.clone()).or_default().push(a);
        }
        Ok(out)
    }

    pub(super) async fn create_tax_rate_sql(&self, r: &TaxRate, actor: &str) -> StateResult<()> {
        let mut tx = self.begin().await?;
        let now = Utc::now();
        let stored = TaxRate {
            archived: false,
            ..r.clone()
        };
        let body = to_json(&stored)?;
        tx.run_or(
            q("INSERT INTO tax_rates (id, body, archived_at, created_at) VALUES ($1, $2, NULL, $3)")
                .bind(&r.id)
                .bind(&body)
                .bind(now),
            format!("tax rate {} exists (rates are immutable: create another)", r.id),
        )
        .await?;
        tx.audit(
            actor,
            now,
            AuditRecord {
                action: "tax_rate.create",
                subject: format!("tax_rate:{}", r.id),
                before: None,
                after: Some(body),
            },
        )
        .await?;
        tx.commit().await
    }

    pub(super) async fn archive_tax_rate_sql(&self, id: &str, actor: &str) -> StateResult<TaxRate> {
        let mut tx = self.begin().await?;
        let row = tx
            .opt(
                q(format!(
                    "SELECT body, archived_at FROM tax_rates WHERE id = $1{}",
                    D::FOR_UPDATE
                ))
                .bind(id),
            )
            .await?
            .ok_or_else(|| StateError::NotFound(format!("tax rate {id}")))?;
        let mut rate: TaxRate = json_of(&row, "tax rate")?;
        if row.opt_time("archived_at")?.is_none() {
            let now = Utc::now();
            tx.run(
                q("UPDATE tax_rates SET archived_at = $1 WHERE id = $2")
                    .bind(now)
                    .bind(id),
            )
            .await?;
            tx.audit(
                actor,
                now,
                AuditRecord {
                    action: "tax_rate.archive",
                    subject: format!("tax_rate:{id}"),
                    before: Some(serde_json::json!({"archived": false})),
                    after: Some(serde_json::json!({"archived": true})),
                },
            )
            .await?;
        }
        tx.commit().await?;
        rate.archived = true;
        Ok(rate)
    }

    pub(super) async fn tax_rates_sql(&self) -> StateResult<Vec<TaxRate>> {
        self.read(q("SELECT body, archived_at FROM tax_rates ORDER BY id"))
            .await?
            .iter()
            .map(|r| {
                let mut rate: TaxRate = json_of(r, "tax rate")?;
                rate.archived = r.opt_time("archived_at")?.is_some();
                Ok(rate)
            })
            .collect()
    }

    pub(super) async fn set_tax_profile_sql(
        &self,
        customer: &str,
        p: &TaxProfile,
        actor: &str,
    ) -> StateResult<()> {
        let mut tx = self.begin().await?;
        tx.lock_customer(customer).await?;
        let now = Utc::now();
        let before = tx
            .opt(q("SELECT body FROM tax_profiles WHERE customer_id = $1").bind(customer))
            .await?
            .map(|r| r.json("body"))
            .transpose()?;
        let body = to_json(p)?;
        let changed = tx
            .run(
                q("UPDATE tax_profiles SET body = $1, updated_at = $2 WHERE customer_id = $3")
                    .bind(&body)
                    .bind(now)
                    .bind(customer),
            )
            .await?;
        if changed == 0 {
            tx.run(
                q("INSERT INTO tax_profiles (customer_id, body, updated_at) VALUES ($1, $2, $3)")
                    .bind(customer)
                    .bind(&body)
                    .bind(now),
            )
            .await
            .map_err(|e| match e {
                StateError::Db(e) => conflict_or(e, format!("tax profile of {customer}")),
                e => e,
            })?;
        }
        tx.audit(
            actor,
            now,
            audit("tax_profile.set", customer, before, Some(body)),
        )
        .await?;
        tx.commit().await
    }

    pub(super) async fn tax_profile_sql(&self, customer: &str) -> StateResult<Option<TaxProfile>> {
        self.customer_exists(customer).await?;
        self.read_opt(q("SELECT body FROM tax_profiles WHERE customer_id = $1").bind(customer))
            .await?
            .map(|r| json_of(&r, "tax profile"))
            .transpose()
    }

    pub(super) async fn tax_profiles_all_sql(&self) -> StateResult<HashMap<String, TaxProfile>> {
        self.read(q("SELECT customer_id, body FROM tax_profiles"))
            .await?
            .iter()
            .map(|r| Ok((r.text("customer_id")?, json_of(r, "tax profile")?)))
            .collect()
    }
}

impl<D: Dialect> Tx<D> {
    /// A top-up invoice reported paid: its grant becomes usable (audited).
    pub(super) async fn top_up_paid(&mut self, stripe_invoice: &str) -> StateResult<()> {
        let rows = self
            .all(
                q(format!(
                    "SELECT {GRANT_COLUMNS} FROM credit_grants WHERE usable = $2 AND voided_at IS NULL \
                     AND invoice_id IN (SELECT id FROM invoices WHERE stripe_invoice_id = $1){}",
                    D::FOR_UPDATE
                ))
                .bind(stripe_invoice)
                .bind(false),
            )
            .await?;
        for r in &rows {
            let g = grant_from(r)?;
            self.set_usable(&g.id).await?;
            self.audit(
                "stripe",
                Utc::now(),
                audit(
                    "credit.paid",
                    &g.customer_id,
                    Some(serde_json::json!({"grant": g.id, "usable": false})),
                    Some(serde_json::json!({"grant": g.id, "usable": true, "stripe_invoice": stripe_invoice})),
                ),
            )
            .await?;
        }
        Ok(())
    }
}
