//! From the usage store to the rating engine's input.
//!
//! For each meter a plan prices, the segment's usage is asked of the
//! aggregator's [`UsageStore`] grouped by every dimension the plan's prices
//! of that meter filter on (e.g. `instance_type` for compute), so each
//! price sees exactly the usage it matches, with its event count as
//! evidence. The same function serves the ClickHouse store and, later, the
//! embedded SQLite store.

use crate::catalog::PlanVersion;
use crate::rating::UsageItem;
use aggregator::{UsageQuery, UsageStore};
use chrono::{DateTime, Utc};
use schemas::MeterCatalog;
use std::collections::BTreeSet;

/// Usage of `customer` in `[start, end)` for every meter `plan` prices.
pub async fn segment_usage(
    store: &dyn UsageStore,
    meters: &MeterCatalog,
    plan: &PlanVersion,
    customer: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> anyhow::Result<Vec<UsageItem>> {
    let priced: BTreeSet<&str> = plan.prices.iter().map(|p| p.meter.as_str()).collect();
    let mut items = Vec::new();
    for meter in priced {
        let def = meters
            .get(meter)
            .ok_or_else(|| anyhow::anyhow!("plan {} prices unknown meter {meter}", plan.plan))?;
        let group_by: BTreeSet<String> = plan
            .prices
            .iter()
            .filter(|p| p.meter == meter)
            .flat_map(|p| p.filter.keys().cloned())
            .collect();
        let q = UsageQuery {
            customer: customer.to_owned(),
            meter: meter.to_owned(),
            from: start,
            to: end,
            group_by: group_by.into_iter().collect(),
            granularity: None,
        };
        for row in store.query(def, &q).await? {
            items.push(UsageItem {
                meter: meter.to_owned(),
                dims: row.group,
                quantity: row.value,
                events: row.events,
            });
        }
    }
    Ok(items)
}
