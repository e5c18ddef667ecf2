//! The finalization run: turns every closed period's drafts into numbered,
//! immutable invoices.
//!
//! A period (from one billing anchor day to the next, UTC; the calendar
//! month for anchor day 1) is closed once `now ≥ end + grace`. A run walks,
//! for each anchor day in use, that day's closed periods from the first
//! subscription on, oldest first, writing its own customers' invoices
//! (an invoice's adjustments need the previous period's invoice), and for
//! each one finalizes every customer that had a subscription in it and has
//! no invoice for it yet. Per period it reads plan segments, seats, the
//! previous period's invoices and carried-forward invoices in bulk, and the
//! usage of the period (and of the previous one, for late usage) with one
//! usage query per (meter, grouping) for all customers.
//!
//! A subscription cancelled inside a period gets its final invoice at the
//! cancellation plus grace, before the period closes (`run_once` looks
//! for them in the periods still open); its body reports the usage timed
//! after the cancellation (`unbilled`, also counted by
//! `tally_billing_unbilled_usage_events_total`), which is not billed. A
//! customer with no subscription in a closed period but an invoice for the
//! one before (cancelled) gets an invoice of adjustments only, when late
//! usage changed what that invoice billed; otherwise nothing.
//!
//! Restart safety: invoices are written in batches, each batch in one
//! transaction that also advances the gapless number counter
//! (`StateStore::insert_invoices`). A run stopped at any moment has written
//! whole batches only; the next run finds those customers invoiced and
//! finalizes the rest. A customer and period can have at most one invoice
//! (unique key), and two concurrent runs serialize on the counter row, so
//! no invoice is skipped, duplicated, or numbered twice, and numbers have no
//! gaps.

use crate::invoice::{
    add_earlier, baseline, billed, build, build_opening, following, needs_earlier, opening_window,
    openings_due, period_of, previous, rate_segments, uncovered, Billing, NextFees, PlanCache,
    Settling,
};
use crate::metrics::Metrics;
use crate::state::{DynStateStore, Invoice, StateStore};
use crate::usage::{unbilled_usage, PeriodUsage};
use aggregator::DynUsageStore;
use billing_domain::rating::{Period, Rated};
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
    /// Credit grants whose remainder expired in this run.
    pub expired: u64,
}

pub struct Finalizer {
    pub state: Arc<DynStateStore<'static>>,
    pub usage: Arc<DynUsageStore<'static>>,
    pub meters: Arc<MeterCatalog>,
    pub config: FinalizeConfig,
    pub metrics: Metrics,
}

/// Whose invoices one walk over the periods of an anchor day writes.
#[derive(Clone, Copy)]
enum Group<'a> {
    /// Anchor day 1: everyone but the customers listed (those on other
    /// anchor days).
    Except(&'a BTreeSet<String>),
    /// Another anchor day: its customers.
    Only(&'a BTreeSet<String>),
}

impl Group<'_> {
    fn has(&self, c: &str) -> bool {
        match self {
            Group::Except(s) => !s.contains(c),
            Group::Only(s) => s.contains(c),
        }
    }
}

impl Finalizer {
    /// The latest calendar-month period closed at `now` (anchor day 1).
    pub fn last_closed(&self, now: DateTime<Utc>) -> Period {
        self.last_closed_at(now, 1)
    }

    fn last_closed_at(&self, now: DateTime<Utc>, anchor: u32) -> Period {
        let grace = chrono::Duration::from_std(self.config.grace).unwrap_or_default();
        previous(period_of(now - grace, anchor))
    }

    /// Finalizes everything closed at `now`: the periods of each billing
    /// anchor day in use, each walk writing its own customers' invoices.
    pub async fn run_once(&self, now: DateTime<Utc>) -> anyhow::Result<FinalizeReport> {
        let mut report = FinalizeReport::default();
        let Some(first) = self.state.billing_start().await? else {
            return Ok(report);
        };
        let (anchored, groups) =
            billing_domain::subscription::anchor_groups(self.state.anchors().await?);
        // Opening invoices only where some plan bills its fees in advance.
        let ahead = self
            .state
            .list_plans()
            .await?
            .iter()
            .any(|p| p.plan.in_advance());
        self.walk(1, Group::Except(&anchored), first, now, ahead, &mut report)
            .await?;
        for (a, ids) in &groups {
            self.walk(*a, Group::Only(ids), first, now, ahead, &mut report)
                .await?;
        }
        // Every invoice that could still consume a grant that has expired
        // is written by now (`credit::expiry_due`): its remainder expires.
        let grace = chrono::Duration::from_std(self.config.grace).unwrap_or_default();
        report.expired = self.state.expire_grants(now, grace).await?;
        Ok(report)
    }

    /// Issues the opening invoices due in `p` by `now` for the group's
    /// customers (fees in advance from where they start to the period's
    /// end, `billing_domain::advance`), each once: one per customer and
    /// instant, numbered in the same transactions as every invoice.
    async fn openings(
        &self,
        p: Period,
        now: DateTime<Utc>,
        group: Group<'_>,
    ) -> anyhow::Result<usize> {
        let state = self.state.as_ref();
        let window = opening_window(p);
        let mut segments = state.plan_segments_all(window).await?;
        segments.retain(|c, segs| group.has(c) && segs.iter().any(|s| s.start <= now));
        if segments.is_empty() {
            return Ok(0);
        }
        let issued = state.openings(p).await?;
        let mut seats = state.seat_intervals_all(window).await?;
        let mut plans = PlanCache::default();
        let mut customers: Vec<String> = segments.keys().cloned().collect();
        customers.sort();
        let mut due = Vec::new();
        for c in customers {
            let segs = segments.remove(&c).unwrap_or_default();
            let seats = seats.remove(&c).unwrap_or_default();
            let done = issued.get(&c).map(Vec::as_slice).unwrap_or(&[]);
            for (t, rated) in openings_due(state, &mut plans, p, &segs, &seats).await? {
                if t <= now && !done.iter().any(|i| i.period.start == t) {
                    due.push((c.clone(), t, rated));
                }
            }
        }
        if due.is_empty() {
            return Ok(0);
        }
        // Carried-forward amounts go on the first invoice written after them.
        let mut carried = state.open_carried(None).await?;
        let mut settling = Settling::read_all(state, p.start).await?;
        let mut batch: Vec<_> = due
            .into_iter()
            .map(|(c, t, rated)| {
                let carried = carried.remove(&c).unwrap_or_default();
                let mut n = build_opening(&c, p, t, rated, &carried, self.config.min_charge);
                // Fees in advance only: credits effective before it is issued.
                settling.settle(&mut n, now, now, self.config.min_charge);
                n
            })
            .collect();
        let mut written = 0;
        while !batch.is_empty() {
            let rest = batch.split_off(batch.len().min(self.config.batch.max(1)));
            let n = state.insert_invoices(batch, now).await?.len();
            self.metrics.invoices_finalized.inc_by(n as u64);
            written += n;
            batch = rest;
        }
        Ok(written)
    }

    /// The periods of anchor day `anchor` from the one containing `first`:
    /// the closed ones, then the open ones for final invoices due.
    async fn walk(
        &self,
        anchor: u32,
        group: Group<'_>,
        first: DateTime<Utc>,
        now: DateTime<Utc>,
        ahead: bool,
        report: &mut FinalizeReport,
    ) -> anyhow::Result<()> {
        let last = self.last_closed_at(now, anchor);
        let mut p = period_of(first, anchor);
        while p.start <= last.start {
            if ahead {
                report.finalized += self.openings(p, now, group).await?;
            }
            report.finalized += self.finalize(p, now, group, None, ahead).await?;
            report.periods += 1;
            p = following(p);
        }
        // Final invoices of subscriptions cancelled in a period still open:
        // due at the cancellation plus grace, not at the period's end.
        let grace = chrono::Duration::from_std(self.config.grace).unwrap_or_default();
        while p.start <= now {
            if ahead {
                report.finalized += self.openings(p, now, group).await?;
            }
            let due: BTreeSet<String> = self
                .state
                .cancellations(p)
                .await?
                .into_iter()
                .filter(|(c, ended)| group.has(c) && *ended + grace <= now)
                .map(|(c, _)| c)
                .collect();
            if !due.is_empty() {
                report.finalized += self.finalize(p, now, group, Some(&due), ahead).await?;
            }
            p = following(p);
        }
        Ok(())
    }

    /// Finalizes `p` for the group's customers with a subscription in it
    /// (`only` those, when given: final invoices before the period closes),
    /// and, for a closed period, an adjustment invoice for each of the
    /// group's customers whose previous period's invoice late usage
    /// changed and who has no subscription in `p` (a cancelled customer: no
    /// later invoice would carry the adjustment). `ahead`: some plan bills
    /// its fees in advance, so the next period's plans and seats are read
    /// for them. Returns how many invoices it wrote.
    async fn finalize(
        &self,
        p: Period,
        now: DateTime<Utc>,
        group: Group<'_>,
        only: Option<&BTreeSet<String>>,
        ahead: bool,
    ) -> anyhow::Result<usize> {
        let state = self.state.as_ref();
        let done = state.invoices_in_period(p.start).await?;
        let mut segments = state.plan_segments_all(p).await?;
        let prev = previous(p);
        let prev_invoices = state.invoices_in_period(prev.start).await?;
        // Invoices two periods back that late usage can have reached after
        // the invoice between (`invoice::needs_earlier`): re-rated here too.
        let prev2 = previous(prev);
        let mut earlier = state.invoices_in_period(prev2.start).await?;
        earlier.retain(|c, inv| {
            group.has(c)
                && !done.contains_key(c)
                && only.is_none_or(|o| o.contains(c))
                && needs_earlier(inv, prev_invoices.get(c))
        });
        let orphans: BTreeSet<String> = match only {
            Some(_) => BTreeSet::new(),
            None => prev_invoices
                .keys()
                .chain(earlier.keys())
                .filter(|c| group.has(c) && !segments.contains_key(*c) && !done.contains_key(*c))
                .cloned()
                .collect(),
        };
        segments.retain(|c, _| {
            group.has(c) && !done.contains_key(c) && only.is_none_or(|o| o.contains(c))
        });
        if segments.is_empty() && orphans.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        let mut prev_segments = state.plan_segments_all(prev).await?;
        prev_segments.retain(|c, _| {
            (segments.contains_key(c) || orphans.contains(c)) && prev_invoices.contains_key(c)
        });
        let cancelled = state.cancellations(p).await?;
        let seats = state.seat_intervals_all(p).await?;
        // The next period's plan and seats at its start: its fees in advance.
        let next = following(p);
        let (mut next_segments, mut next_seats) = if ahead {
            (
                state.plan_segments_all(next).await?,
                state.seat_intervals_all(next).await?,
            )
        } else {
            Default::default()
        };
        let prev_seats = state.seat_intervals_all(prev).await?;
        let carried = state.open_carried(None).await?;
        let mut settling = Settling::read_all(state, p.start).await?;

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
        // A few customers scattered over the ids (one anchor day's, or the
        // final invoices due) are read by their ids, not by the ranges
        // they span.
        let listed = matches!(group, Group::Only(_)) || only.is_some();
        let used = &used;
        let fetch = |period, ids| {
            PeriodUsage::fetch_by(self.usage.as_ref(), &self.meters, used, period, ids, listed)
        };
        let usage = fetch(p, &customers).await?;
        let prev_usage = if prev_segments.is_empty() {
            None
        } else {
            let mut with_prev: Vec<String> = prev_segments.keys().cloned().collect();
            with_prev.sort();
            Some(fetch(prev, &with_prev).await?)
        };
        let fetched = started.elapsed();
        customers.extend(orphans.iter().cloned());
        let mut written = 0;
        for chunk in customers.chunks(self.config.batch.max(1)) {
            let mut batch = Vec::with_capacity(chunk.len());
            for c in chunk {
                let t = Instant::now();
                let segs = segments.remove(c).unwrap_or_default();
                // Credits pay usage up to where it ends (a cancellation).
                let until = crate::invoice::usage_end(&segs, p);
                let none = Vec::new();
                let orphan = orphans.contains(c);
                let unbilled = match cancelled.get(c) {
                    Some(_) if !orphan => {
                        let spans = uncovered(p, segs.iter().map(|s| (s.start, s.end)));
                        unbilled_usage(self.usage.as_ref(), &self.meters, c, &spans).await?
                    }
                    _ => vec![],
                };
                let rated = match prev_invoices.get(c).or(earlier.get(c)).filter(|_| orphan) {
                    // Nothing of its own: the currency and digits of the
                    // invoice it adjusts.
                    Some(inv) => Rated {
                        lines: vec![],
                        total: Decimal::ZERO,
                        ..billed(inv)
                    },
                    None => {
                        let next = NextFees {
                            period: next,
                            segs: next_segments.remove(c).unwrap_or_default(),
                            seats: next_seats.remove(c).unwrap_or_default(),
                        };
                        rate_segments(
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
                            Billing::Invoice(&next),
                        )
                        .await?
                    }
                };
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
                            Billing::Arrears,
                        )
                        .await?,
                    )),
                    _ => None,
                };
                let carried: &[Invoice] = carried.get(c).map(Vec::as_slice).unwrap_or(&[]);
                let mut n = build(c, p, rated, previous, carried, self.config.min_charge);
                if let Some(inv2) = earlier.get(c) {
                    let base = baseline(inv2, prev_invoices.get(c));
                    let segs2 = state.plan_segments(c, prev2).await?;
                    let seats2 = state.seat_intervals(c, prev2).await?;
                    let rerated = rate_segments(
                        state,
                        self.usage.as_ref(),
                        &self.meters,
                        &mut plans,
                        None,
                        c,
                        prev2,
                        segs2,
                        &seats2,
                        false,
                        Billing::Arrears,
                    )
                    .await?;
                    add_earlier(&mut n, inv2, &base, rerated, self.config.min_charge);
                }
                if orphan && n.body.adjustments.is_empty() {
                    continue;
                }
                settling.settle(&mut n, now, until, self.config.min_charge);
                let events: u64 = unbilled.iter().map(|u| u.events).sum();
                self.metrics.unbilled_events.inc_by(events);
                n.body.unbilled = unbilled;
                batch.push(n);
                self.metrics
                    .rating_seconds
                    .observe(t.elapsed().as_secs_f64());
            }
            if batch.is_empty() {
                continue;
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
