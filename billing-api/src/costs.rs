//! Loading a customer's open month for the cost report and the plan
//! advisor (`GET /v1/customers/{id}/costs`, `/plan-advisor`); the
//! arithmetic, and what each figure means, is `billing_domain::costs`.

use crate::invoice::{period_of, PlanCache};
use crate::quota_service::QuotaService;
use crate::state::StateStore;
use aggregator::{Granularity, UsageQuery, UsageStore};
use billing_domain::catalog::{latest_active, price_groups, PlanVersion};
use billing_domain::rating::{Segment, UsageItem};
use chrono::{DateTime, Utc};
use schemas::MeterCatalog;
use std::collections::{BTreeMap, BTreeSet};

pub use billing_domain::costs::{
    additive, merged, share, Advisor, AdvisorPlan, Amount, CostReport, DayCost, DayItem, Month,
    PlanRef,
};

/// Reads `customer`'s open month at `now`: its plan segments and seats,
/// the usage of each segment (by day where it adds over days), grouped by
/// every dimension the segments' plans and `also` price on, and what runs
/// now and its own cap from the quota state.
pub async fn load(
    state: &(impl StateStore + ?Sized),
    usage: &(impl UsageStore + ?Sized),
    meters: &MeterCatalog,
    quota: &QuotaService,
    customer: &str,
    now: DateTime<Utc>,
    also: &[PlanVersion],
) -> anyhow::Result<Month> {
    let anchor =
        billing_domain::subscription::anchor_of_history(&state.subscriptions(customer).await?);
    let period = period_of(now, anchor);
    let segs = state.plan_segments(customer, period).await?;
    let seats = state.seat_intervals(customer, period).await?;
    let mut plans = PlanCache::default();
    let mut segments = Vec::new();
    for s in &segs {
        segments.push(Segment {
            trial: s.trial,
            plan: plans.get(state, &s.plan, s.version).await?.clone(),
            start: s.start,
            end: s.end,
            usage: vec![],
        });
    }
    // One grouping per meter serves every plan asked about: rating
    // ignores dimensions a price does not filter on.
    let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in segments.iter().map(|s| &s.plan).chain(also) {
        for (meter, dims) in price_groups(p) {
            let g = groups.entry(meter).or_default();
            g.extend(dims);
            g.insert("app".into());
        }
    }
    let mut items = Vec::new();
    for (i, s) in segments.iter().enumerate() {
        let to = s.end.min(now);
        if to <= s.start {
            continue;
        }
        for (meter, dims) in &groups {
            let def = meters
                .get(meter)
                .ok_or_else(|| anyhow::anyhow!("a plan prices unknown meter {meter}"))?;
            let by_day = additive(def.aggregation);
            let q = UsageQuery {
                customer: customer.to_owned(),
                meter: meter.clone(),
                from: s.start,
                to,
                group_by: dims.iter().cloned().collect(),
                granularity: by_day.then_some(Granularity::Day),
                raw: false,
            };
            for row in usage.query(def, &q).await? {
                items.push(DayItem {
                    seg: i,
                    day: if by_day { row.bucket } else { None },
                    item: UsageItem {
                        meter: meter.clone(),
                        dims: row.group,
                        quantity: row.value,
                        events: row.events,
                    },
                });
            }
        }
    }
    // What runs now and the customer's own cap: from the quota state
    // (reloaded at once when changed through this process).
    let entry = quota.entry(customer);
    let running = entry
        .as_ref()
        .map(|e| e.running_at(now))
        .unwrap_or_default();
    let own_cap = entry.and_then(|e| e.spending_cap);
    let to_date = merged(items.iter().map(|d| &d.item));
    // What the month's invoice would be settled with, at the period's end.
    let currency = segments
        .last()
        .map(|s| s.plan.currency.clone())
        .unwrap_or_else(|| "USD".into());
    let settling = crate::invoice::Settling::read_one(state, customer).await?;
    let mut settle = settling.inputs(
        customer,
        &currency,
        period.end.max(now),
        period.end,
        period.end,
    );
    // The balance and what expires soon count every grant, not only those
    // that can pay this period's invoice.
    settle.grants = settling.grants(customer).to_vec();
    Ok(Month {
        period,
        now,
        segments,
        seats,
        items,
        to_date,
        running,
        own_cap,
        settle,
    })
}

/// The cost report of `customer`'s open month at `now`.
pub async fn report(
    state: &(impl StateStore + ?Sized),
    usage: &(impl UsageStore + ?Sized),
    meters: &MeterCatalog,
    quota: &QuotaService,
    customer: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<CostReport> {
    let m = load(state, usage, meters, quota, customer, now, &[]).await?;
    billing_domain::costs::report(&m, customer)
}

/// This month priced on every published plan.
pub async fn advisor(
    state: &(impl StateStore + ?Sized),
    usage: &(impl UsageStore + ?Sized),
    meters: &MeterCatalog,
    quota: &QuotaService,
    customer: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<Advisor> {
    let listed = state.list_plans().await?;
    let candidates: Vec<PlanVersion> = latest_active(&listed)
        .into_values()
        .filter(|p| p.offered_to(customer))
        .cloned()
        .collect();
    let m = load(state, usage, meters, quota, customer, now, &candidates).await?;
    billing_domain::costs::advisor(&m, &candidates, customer)
}
