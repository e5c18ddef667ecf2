//! From the usage store to the rating engine's input.
//!
//! For each meter a plan prices, the segment's usage is asked of the
//! aggregator's [`UsageStore`] grouped by every dimension the plan's prices
//! of that meter filter on (e.g. `instance_type` for compute), so each
//! price sees exactly the usage it matches, with its event count as
//! evidence. The same function serves the ClickHouse store and, later, the
//! embedded SQLite store.
//!
//! The finalization run reads a whole period for every customer at once
//! ([`PeriodUsage`]): one query per (meter, grouping) instead of one per
//! customer and meter.

use crate::catalog::PlanVersion;
use crate::rating::{Period, UsageItem};
use aggregator::{UsageQuery, UsageRow, UsageStore};
use chrono::{DateTime, Utc};
use schemas::MeterCatalog;
use std::collections::{BTreeSet, HashMap};

/// The (meter, group-by dimensions) questions a plan's prices need.
fn price_groups(plan: &PlanVersion) -> Vec<(String, Vec<String>)> {
    let priced: BTreeSet<&str> = plan.prices.iter().map(|p| p.meter.as_str()).collect();
    priced
        .into_iter()
        .map(|meter| {
            let group_by: BTreeSet<String> = plan
                .prices
                .iter()
                .filter(|p| p.meter == meter)
                .flat_map(|p| p.filter.keys().cloned())
                .collect();
            (meter.to_owned(), group_by.into_iter().collect())
        })
        .collect()
}

fn items<'a>(meter: &str, rows: &'a [UsageRow]) -> impl Iterator<Item = UsageItem> + 'a {
    let meter = meter.to_owned();
    rows.iter().map(move |row| UsageItem {
        meter: meter.clone(),
        dims: row.group.clone(),
        quantity: row.value,
        events: row.events,
    })
}

/// Usage of `customer` in `[start, end)` for every meter `plan` prices;
/// from raw events only when `raw`.
pub async fn segment_usage_from(
    store: &dyn UsageStore,
    meters: &MeterCatalog,
    plan: &PlanVersion,
    customer: &str,
    (start, end): (DateTime<Utc>, DateTime<Utc>),
    raw: bool,
) -> anyhow::Result<Vec<UsageItem>> {
    let mut out = Vec::new();
    for (meter, group_by) in price_groups(plan) {
        let def = meters
            .get(&meter)
            .ok_or_else(|| anyhow::anyhow!("plan {} prices unknown meter {meter}", plan.plan))?;
        let q = UsageQuery {
            customer: customer.to_owned(),
            meter: meter.clone(),
            from: start,
            to: end,
            group_by,
            granularity: None,
            raw,
        };
        out.extend(items(&meter, &store.query(def, &q).await?));
    }
    Ok(out)
}

/// Usage of `customer` in `[start, end)` for every meter `plan` prices.
pub async fn segment_usage(
    store: &dyn UsageStore,
    meters: &MeterCatalog,
    plan: &PlanVersion,
    customer: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> anyhow::Result<Vec<UsageItem>> {
    segment_usage_from(store, meters, plan, customer, (start, end), false).await
}

/// A whole period's usage of every customer, for the questions of a set of
/// plans.
pub struct PeriodUsage {
    pub period: Period,
    rows: HashMap<(String, Vec<String>), HashMap<String, Vec<UsageRow>>>,
}

impl PeriodUsage {
    pub async fn fetch<'a>(
        store: &dyn UsageStore,
        meters: &MeterCatalog,
        plans: impl IntoIterator<Item = &'a PlanVersion>,
        period: Period,
    ) -> anyhow::Result<Self> {
        let questions: BTreeSet<(String, Vec<String>)> =
            plans.into_iter().flat_map(price_groups).collect();
        let mut rows = HashMap::new();
        for (meter, group_by) in questions {
            let def = meters
                .get(&meter)
                .ok_or_else(|| anyhow::anyhow!("a plan prices unknown meter {meter}"))?;
            let q = UsageQuery {
                customer: String::new(),
                meter: meter.clone(),
                from: period.start,
                to: period.end,
                group_by: group_by.clone(),
                granularity: None,
                raw: false,
            };
            rows.insert((meter, group_by), store.query_all(def, &q).await?);
        }
        Ok(Self { period, rows })
    }

    /// The customer's usage items for `plan` over the whole period.
    pub fn items(&self, plan: &PlanVersion, customer: &str) -> anyhow::Result<Vec<UsageItem>> {
        let mut out = Vec::new();
        for key in price_groups(plan) {
            let per = self
                .rows
                .get(&key)
                .ok_or_else(|| anyhow::anyhow!("usage of {} {:?} was not fetched", key.0, key.1))?;
            if let Some(rows) = per.get(customer) {
                out.extend(items(&key.0, rows));
            }
        }
        Ok(out)
    }
}
