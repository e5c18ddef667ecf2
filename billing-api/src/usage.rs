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

use aggregator::{UsageQuery, UsageRow, UsageStore};
use billing_domain::catalog::{price_groups, PlanVersion};
use billing_domain::rating::{Period, UsageItem};
use chrono::{DateTime, Utc};
use schemas::MeterCatalog;
use std::collections::{BTreeSet, HashMap};

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
    store: &(impl UsageStore + ?Sized),
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
    store: &(impl UsageStore + ?Sized),
    meters: &MeterCatalog,
    plan: &PlanVersion,
    customer: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> anyhow::Result<Vec<UsageItem>> {
    segment_usage_from(store, meters, plan, customer, (start, end), false).await
}

/// Usage of `customer` timed inside `spans` (where it had no
/// subscription: after a cancellation, before a first subscription), per
/// meter of the catalog, summed over the spans; what no invoice bills.
pub async fn unbilled_usage(
    store: &(impl UsageStore + ?Sized),
    meters: &MeterCatalog,
    customer: &str,
    spans: &[(DateTime<Utc>, DateTime<Utc>)],
) -> anyhow::Result<Vec<UsageItem>> {
    let mut out: Vec<UsageItem> = Vec::new();
    for def in &meters.meters {
        let mut item = UsageItem {
            meter: def.key.clone(),
            dims: Default::default(),
            quantity: Default::default(),
            events: 0,
        };
        for (from, to) in spans {
            let q = UsageQuery {
                customer: customer.to_owned(),
                meter: def.key.clone(),
                from: *from,
                to: *to,
                group_by: vec![],
                granularity: None,
                raw: false,
            };
            for row in store.query(def, &q).await? {
                item.quantity += row.value;
                item.events += row.events;
            }
        }
        if item.events > 0 {
            out.push(item);
        }
    }
    Ok(out)
}

/// A whole period's usage of every customer, for the questions of a set of
/// plans.
pub struct PeriodUsage {
    pub period: Period,
    rows: HashMap<(String, Vec<String>), HashMap<String, Vec<UsageRow>>>,
}

impl PeriodUsage {
    /// Customers per usage-store read: bounds each read's memory; two
    /// reads run at a time (the store merges rows in key order, one core
    /// per read).
    pub const CHUNK: usize = 2500;

    /// Reads the period's usage of `customers` (sorted ids) for every
    /// question the plans ask, one pass per chunk of customers (each chunk
    /// read as the id range it spans).
    pub async fn fetch<'a>(
        store: &(impl UsageStore + ?Sized),
        meters: &MeterCatalog,
        plans: impl IntoIterator<Item = &'a PlanVersion>,
        period: Period,
        customers: &[String],
    ) -> anyhow::Result<Self> {
        Self::fetch_by(store, meters, plans, period, customers, false).await
    }

    /// [`PeriodUsage::fetch`], or when `listed`, for customers scattered
    /// over the id space (those of one billing anchor day): each chunk read
    /// as its list of ids, not as the range it spans.
    pub async fn fetch_by<'a>(
        store: &(impl UsageStore + ?Sized),
        meters: &MeterCatalog,
        plans: impl IntoIterator<Item = &'a PlanVersion>,
        period: Period,
        customers: &[String],
        listed: bool,
    ) -> anyhow::Result<Self> {
        use futures::StreamExt;
        let keys: Vec<(String, Vec<String>)> = plans
            .into_iter()
            .flat_map(price_groups)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut questions = Vec::with_capacity(keys.len());
        for (meter, group_by) in &keys {
            let def = meters
                .get(meter)
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
            questions.push((def.clone(), q));
        }
        let mut rows: HashMap<(String, Vec<String>), HashMap<String, Vec<UsageRow>>> =
            keys.iter().map(|k| (k.clone(), HashMap::new())).collect();
        if questions.is_empty() || customers.is_empty() {
            return Ok(Self { period, rows });
        }
        let questions = &questions;
        let mut pending = Vec::new();
        for c in customers.chunks(Self::CHUNK) {
            let range = (c[0].as_str(), c[c.len() - 1].as_str());
            pending.push(async move {
                if listed {
                    store.query_some(questions, c).await
                } else {
                    store.query_all(questions, Some(range)).await
                }
            });
        }
        let mut reads = futures::stream::iter(pending).buffer_unordered(2);
        while let Some(answers) = reads.next().await {
            for (key, answer) in keys.iter().zip(answers?) {
                rows.get_mut(key).expect("key").extend(answer);
            }
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
