//! The finalization run: turns every closed period's drafts into numbered,
//! immutable invoices.
//!
//! A period (calendar month, UTC) is closed once `now ≥ end + grace`. A run
//! walks the closed periods from the first subscription on, oldest first
//! (an invoice's adjustments need the previous period's invoice), and for
//! each one finalizes every customer that had a subscription in it and has
//! no invoice for it yet. Per period it reads plan segments, seats, the
//! previous period's invoices and carried-forward invoices in bulk, and the
//! usage of the period (and of the previous one, for late usage) with one
//! usage query per (meter, grouping) for all customers.
//!
//! Restart safety: invoices are written in batches, each batch in one
//! transaction that also advances the gapless number counter
//! (`StateStore::insert_invoices`). A run stopped at any moment has written
//! whole batches only; the next run finds those customers invoiced and
//! finalizes the rest. A customer and period can have at most one invoice
//! (unique key), and two concurrent runs serialize on the counter row, so
//! no invoice is skipped, duplicated, or numbered twice, and numbers have no
//! gaps.

use crate::invoice::{build, following, month_of, previous, rate_segments, PlanCache};
use crate::metrics::Metrics;
use crate::state::{DynStateStore, Invoice, StateStore};
use crate::usage::PeriodUsage;
use aggregator::DynUsageStore;
use billing_domain::rating::Period;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use schemas::MeterCatalog;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct FinalizeConfig {
    /// How long after a period's end late usage is still awaited.
    pub grace: Duration,
    /// The smallest total sent to the payment provider (Stripe: $0.50).
    pub min_charge: Decimal,
    /// Invoices per transaction.
    pub batch: usize,
}

impl Default for FinalizeConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(3600),
            min_charge: Decimal::new(50, 2),
            batch: 500,
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FinalizeReport {
    pub periods: usize,
    pub finalized: usize,
}

pub struct Finalizer {
    pub state: Arc<DynStateStore<'static>>,
    pub usage: Arc<DynUsageStore<'static>>,
    pub meters: Arc<MeterCatalog>,
    pub config: FinalizeConfig,
    pub metrics: Metrics,
}

impl Finalizer {
    /// The latest period closed at `now`, if any.
    pub fn last_closed(&self, now: DateTime<Utc>) -> Period {
        let grace = chrono::Duration::from_std(self.config.grace).unwrap_or_default();
        previous(month_of(now - grace))
    }

    /// Finalizes everything closed at `now`.
    pub async fn run_once(&self, now: DateTime<Utc>) -> anyhow::Result<FinalizeReport> {
        let mut report = FinalizeReport::default();
        let Some(first) = self.state.billing_start().await? else {
            return Ok(report);
        };
        let last = self.last_closed(now);
        let mut p = month_of(first);
        while p.start <= last.start {
            report.finalized += self.finalize_period(p, now).await?;
            report.periods += 1;
            p = following(p);
        }
        Ok(report)
    }

    /// Finalizes every customer due in period `p`; returns how many.
    pub async fn finalize_period(&self, p: Period, now: DateTime<Utc>) -> anyhow::Result<usize> {
        let state = self.state.as_ref();
        let done = state.invoices_in_period(p.start).await?;
        let mut segments = state.plan_segments_all(p).await?;
        segments.retain(|c, _| !done.contains_key(c));
        if segments.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        let prev = previous(p);
        let prev_invoices = state.invoices_in_period(prev.start).await?;
        let mut prev_segments = state.plan_segments_all(prev).await?;
        prev_segments.retain(|c, _| segments.contains_key(c) && prev_invoices.contains_key(c));
        let seats = state.seat_intervals_all(p).await?;
        let prev_seats = state.seat_intervals_all(prev).await?;
        let carried = state.open_carried(None).await?;

        let mut plans = PlanCache::default();
        let versions: BTreeSet<(String, u32)> = segments
            .values()
            .chain(prev_segments.values())
            .flatten()
            .map(|s| (s.plan.clone(), s.version))
            .collect();
        let mut used = Vec::new();
        for (plan, v) in &versions {
            used.push(plans.get(state, plan, *v).await?.clone());
        }
        let mut customers: Vec<String> = segments.keys().cloned().collect();
        customers.sort();
        let usage =
            PeriodUsage::fetch(self.usage.as_ref(), &self.meters, &used, p, &customers).await?;
        let prev_usage = if prev_segments.is_empty() {
            None
        } else {
            let mut with_prev: Vec<String> = prev_segments.keys().cloned().collect();
            with_prev.sort();
            Some(
                PeriodUsage::fetch(self.usage.as_ref(), &self.meters, &used, prev, &with_prev)
                    .await?,
            )
        };
        let fetched = started.elapsed();
        let mut written = 0;
        for chunk in customers.chunks(self.config.batch.max(1)) {
            let mut batch = Vec::with_capacity(chunk.len());
            for c in chunk {
                let t = Instant::now();
                let segs = segments.remove(c).unwrap_or_default();
                let none = Vec::new();
                let rated = rate_segments(
                    state,
                    self.usage.as_ref(),
                    &self.meters,
                    &mut plans,
                    Some(&usage),
                    c,
                    p,
                    segs,
                    seats.get(c).unwrap_or(&none),
                    false,
                )
                .await?;
                let previous = match (prev_invoices.get(c), prev_segments.remove(c)) {
                    (Some(inv), Some(psegs)) => Some((
                        inv,
                        rate_segments(
                            state,
                            self.usage.as_ref(),
                            &self.meters,
                            &mut plans,
                            prev_usage.as_ref(),
                            c,
                            prev,
                            psegs,
                            prev_seats.get(c).unwrap_or(&none),
                            false,
                        )
                        .await?,
                    )),
                    _ => None,
                };
                let carried: &[Invoice] = carried.get(c).map(Vec::as_slice).unwrap_or(&[]);
                batch.push(build(
                    c,
                    p,
                    rated,
                    previous,
                    carried,
                    self.config.min_charge,
                ));
                self.metrics
                    .rating_seconds
                    .observe(t.elapsed().as_secs_f64());
            }
            let n = state.insert_invoices(batch, now).await?.len();
            self.metrics.invoices_finalized.inc_by(n as u64);
            written += n;
        }
        tracing::info!(
            period = %p.start.format("%Y-%m"),
            invoices = written,
            seconds = started.elapsed().as_secs_f64(),
            usage_read_seconds = fetched.as_secs_f64(),
            "finalized period"
        );
        Ok(written)
    }
}
