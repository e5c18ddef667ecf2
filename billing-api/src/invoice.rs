//! Rating a customer's period from stored state and stored usage: the
//! draft for the open period, estimated at any time, the preview of a plan
//! switch, and re-rating. What an invoice holds and how it is built is
//! [`billing_domain::invoice`], re-exported here.

pub use billing_domain::invoice::*;

use crate::state::{PlanSegment, StateResult, StateStore};
use crate::usage::{segment_usage_from, PeriodUsage};
use aggregator::UsageStore;
use billing_domain::catalog::PlanVersion;
use billing_domain::rating::{rate, Period, Rated, SeatInterval, Segment};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use schemas::MeterCatalog;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Plan versions by (plan, version), loaded from the state store once each.
#[derive(Default)]
pub struct PlanCache(HashMap<(String, u32), PlanVersion>);

impl PlanCache {
    pub async fn get(
        &mut self,
        state: &(impl StateStore + ?Sized),
        plan: &str,
        version: u32,
    ) -> StateResult<&PlanVersion> {
        let key = (plan.to_owned(), version);
        if !self.0.contains_key(&key) {
            let p = state.plan_version(plan, version).await?;
            self.0.insert(key.clone(), p);
        }
        Ok(&self.0[&key])
    }
}

/// Rates a customer's period from its plan segments and seats; usage comes
/// from `prefetched` when it holds the whole period for the plan, else from
/// the usage store (from raw events only when `raw`).
#[allow(clippy::too_many_arguments)]
pub async fn rate_segments(
    state: &(impl StateStore + ?Sized),
    usage: &(impl UsageStore + ?Sized),
    meters: &MeterCatalog,
    plans: &mut PlanCache,
    prefetched: Option<&PeriodUsage>,
    customer: &str,
    period: Period,
    segs: Vec<PlanSegment>,
    seats: &[SeatInterval],
    raw: bool,
) -> anyhow::Result<Rated> {
    let mut segments = Vec::with_capacity(segs.len());
    for s in segs {
        let plan = plans.get(state, &s.plan, s.version).await?.clone();
        let whole = s.start == period.start && s.end == period.end;
        let u = match prefetched.filter(|p| whole && p.period == period) {
            Some(p) => p.items(&plan, customer)?,
            None => {
                segment_usage_from(usage, meters, &plan, customer, (s.start, s.end), raw).await?
            }
        };
        segments.push(Segment {
            trial: s.trial,
            plan,
            start: s.start,
            end: s.end,
            usage: u,
        });
    }
    Ok(rate(&period, &segments, seats)?)
}

/// A plan switch not yet confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedSwitch {
    pub plan: String,
    pub version: u32,
    pub at: DateTime<Utc>,
}

/// The plan history with a planned switch applied: every segment is cut at
/// `at`, and the new plan covers the rest of the period.
pub fn with_switch(
    mut segs: Vec<PlanSegment>,
    sw: &PlannedSwitch,
    period: Period,
) -> Vec<PlanSegment> {
    segs.retain(|s| s.start < sw.at);
    for s in segs.iter_mut() {
        s.end = s.end.min(sw.at);
    }
    if sw.at < period.end {
        segs.push(PlanSegment {
            trial: false,
            plan: sw.plan.clone(),
            version: sw.version,
            start: sw.at.max(period.start),
            end: period.end,
        });
    }
    segs
}

/// Rates `customer`'s `period` as things stand (or with `switch` applied):
/// plan segments and seats from the state store, usage per segment from the
/// usage store.
pub async fn rate_period(
    state: &(impl StateStore + ?Sized),
    usage: &(impl UsageStore + ?Sized),
    meters: &MeterCatalog,
    customer: &str,
    period: Period,
    switch: Option<&PlannedSwitch>,
) -> anyhow::Result<Rated> {
    rate_stored(state, usage, meters, customer, period, switch, false).await
}

async fn rate_stored(
    state: &(impl StateStore + ?Sized),
    usage: &(impl UsageStore + ?Sized),
    meters: &MeterCatalog,
    customer: &str,
    period: Period,
    switch: Option<&PlannedSwitch>,
    raw: bool,
) -> anyhow::Result<Rated> {
    let mut segs = state.plan_segments(customer, period).await?;
    if let Some(sw) = switch {
        segs = with_switch(segs, sw, period);
    }
    let seats = state.seat_intervals(customer, period).await?;
    let mut plans = PlanCache::default();
    rate_segments(
        state, usage, meters, &mut plans, None, customer, period, segs, &seats, raw,
    )
    .await
}

/// The invoice the customer's `period` would get if it were finalized now
/// (the draft): its lines, pending adjustments for late usage of the
/// previous period, and carried-forward amounts.
pub async fn draft(
    state: &(impl StateStore + ?Sized),
    usage: &(impl UsageStore + ?Sized),
    meters: &MeterCatalog,
    customer: &str,
    period: Period,
    min_charge: Decimal,
) -> anyhow::Result<NewInvoice> {
    let rated = rate_period(state, usage, meters, customer, period, None).await?;
    let prev = previous(period);
    let invoices = state.invoices_of(customer).await?;
    let prev_inv = invoices.iter().find(|i| i.period == prev);
    let previous = match prev_inv {
        Some(inv) => Some((
            inv,
            rate_period(state, usage, meters, customer, prev, None).await?,
        )),
        None => None,
    };
    let carried = state
        .open_carried(Some(customer))
        .await?
        .remove(customer)
        .unwrap_or_default();
    let mut n = build(customer, period, rated, previous, &carried, min_charge);
    let prev2 = self::previous(prev);
    if let Some(inv2) = invoices
        .iter()
        .find(|i| i.period == prev2)
        .filter(|i| needs_earlier(i, prev_inv))
    {
        let rerated = rate_period(state, usage, meters, customer, prev2, None).await?;
        add_earlier(&mut n, inv2, &baseline(inv2, prev_inv), rerated, min_charge);
    }
    Ok(n)
}

/// Re-rates a finalized invoice's period from raw events (not rollups), with
/// the plan versions and seats it was billed with. Equal to the invoice's
/// own lines when no late usage arrived since.
pub async fn rerate(
    state: &(impl StateStore + ?Sized),
    usage: &(impl UsageStore + ?Sized),
    meters: &MeterCatalog,
    inv: &Invoice,
) -> anyhow::Result<Rated> {
    rate_stored(
        state,
        usage,
        meters,
        &inv.customer_id,
        inv.period,
        None,
        true,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_switch_cuts_the_history() {
        let d = |day| Utc.with_ymd_and_hms(2026, 11, day, 0, 0, 0).unwrap();
        let period = Period {
            start: d(1),
            end: Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
        };
        let seg = |p: &str, a, b| PlanSegment {
            trial: false,
            plan: p.into(),
            version: 1,
            start: a,
            end: b,
        };
        let hist = vec![seg("payg", d(1), d(10)), seg("team", d(10), period.end)];
        let sw = PlannedSwitch {
            plan: "business".into(),
            version: 2,
            at: d(5),
        };
        let got = with_switch(hist, &sw, period);
        assert_eq!(
            got,
            vec![
                seg("payg", d(1), d(5)),
                PlanSegment {
                    trial: false,
                    plan: "business".into(),
                    version: 2,
                    start: d(5),
                    end: period.end
                }
            ]
        );
    }
}
