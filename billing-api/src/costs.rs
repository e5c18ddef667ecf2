//! A customer's open month as the cost dashboard shows it, and the plan
//! advisor. Both are API responses (`GET /v1/customers/{id}/costs`,
//! `GET /v1/customers/{id}/plan-advisor`): the dashboard shows nothing a
//! customer could not ask for itself.
//!
//! Every figure comes from the rating engine over the same usage the draft
//! invoice reads, so nothing here is a second pricing rule:
//!
//! - **month to date** is the rated total of the open period as the draft
//!   invoice rates it: the whole month's flat and seat fees, usage through
//!   now, the plan's minimum and maximum;
//! - **cost by meter** is the usage lines summed per meter; fees (flat and
//!   seat) and plan adjustments (minimum true-up, maximum cap) are reported
//!   beside them, so `usage + fees + plan_adjustments = month_to_date`;
//! - **cost by app**: each usage line's rounded amount is shared among the
//!   apps in proportion to their quantity of the usage it prices (largest
//!   remainder to the minor unit, so the apps add up to the line exactly).
//!   Tiered prices and allowances are not separable per app; a share of the
//!   line is what cloud bills show too;
//! - **daily cost**: the usage lines rated on the usage through the end of
//!   each day, minus the same through the previous day. The days add up to
//!   the usage total exactly, and a day that crossed into a cheaper tier
//!   shows the cheaper price. Meters whose aggregate does not add over days
//!   (max, latest, unique count) are counted on the last day;
//! - **forecast**: the quota checks' method (`quota.rs`): counters continue
//!   at their month-to-date rate, instances and volumes as they ran in the
//!   last complete hour, rated with the plan segments as they stand;
//! - **plan advisor**: this month's usage through now, and its forecast,
//!   rated as if the whole month had been on each published plan (latest
//!   version of each plan in the customer's currency), with the saving
//!   against the customer's own forecast. Per-seat plans take the
//!   customer's seats, or one seat when it has none. A plan that does not
//!   offer something the month used (an instance type), or whose default
//!   spending cap the forecast passes (the free tier), is listed as not
//!   fitting, after those that fit.

use crate::invoice::{month_of, PlanCache};
use crate::quota_service::QuotaService;
use crate::state::StateStore;
use aggregator::{Granularity, UsageQuery, UsageStore};
use billing_domain::catalog::PlanVersion;
use billing_domain::catalog::{cap_in_force, latest_active, price_groups};
use billing_domain::quota::{projection, Running};
use billing_domain::rating::{
    matches, rate, with_minor_units, LineKind, Period, Rated, SeatInterval, Segment, UsageItem,
};
use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use schemas::{Aggregation, MeterCatalog};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct PlanRef {
    pub plan: String,
    pub version: u32,
    pub name: String,
}

/// An amount for one key (a meter, an app).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Amount {
    pub key: String,
    pub amount: Decimal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct DayCost {
    /// UTC day, `YYYY-MM-DD`.
    pub date: String,
    pub amount: Decimal,
}

/// The open month of one customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct CostReport {
    pub customer_id: String,
    pub currency: String,
    pub period: Period,
    /// Usage is counted through this instant.
    pub as_of: DateTime<Utc>,
    /// The plan now (none without a subscription).
    pub plan: Option<PlanRef>,
    /// `usage + fees + plan_adjustments`, as the draft invoice rates it.
    pub month_to_date: Decimal,
    pub usage: Decimal,
    /// Flat and per-seat fees of the whole month.
    pub fees: Decimal,
    /// Minimum true-up and maximum cap lines.
    pub plan_adjustments: Decimal,
    /// Projected month-end bill.
    pub forecast: Decimal,
    /// The cap in force: the customer's own, else the plan's default.
    pub spending_cap: Option<Decimal>,
    /// The cap the customer set (none: the plan's default applies).
    pub own_spending_cap: Option<Decimal>,
    /// Usage cost per meter (sums to `usage`).
    pub by_meter: Vec<Amount>,
    /// Usage cost per app (sums to `usage`).
    pub by_app: Vec<Amount>,
    /// Usage cost per UTC day of the period so far (sums to `usage`).
    pub daily: Vec<DayCost>,
}

/// One plan priced on this month's usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct AdvisorPlan {
    pub plan: String,
    pub version: u32,
    pub name: String,
    /// The customer is on this plan now.
    pub current: bool,
    /// This month's usage through now, rated on this plan for the whole month.
    pub month_to_date: Decimal,
    /// The month-end forecast on this plan.
    pub forecast: Decimal,
    /// The customer's own forecast minus this plan's (positive: cheaper).
    pub saving: Decimal,
    /// The plan offers everything this month used, and the forecast stays
    /// within its default spending cap (the free tier's $0): a plan that
    /// does not fit would deny the scale-ups the usage needed.
    pub fits: bool,
    /// Why the plan does not fit.
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Advisor {
    pub customer_id: String,
    pub currency: String,
    pub period: Period,
    pub as_of: DateTime<Utc>,
    /// The customer's forecast as things stand (as in the cost report).
    pub forecast: Decimal,
    /// Plans that fit first, cheapest forecast first.
    pub plans: Vec<AdvisorPlan>,
}

/// Usage of one segment: by day for meters that add over days, or for the
/// whole range (`day: None`) for those that do not.
struct DayItem {
    seg: usize,
    day: Option<DateTime<Utc>>,
    item: UsageItem,
}

/// What the report and the advisor are computed from.
struct Month {
    period: Period,
    now: DateTime<Utc>,
    segments: Vec<Segment>,
    seats: Vec<SeatInterval>,
    items: Vec<DayItem>,
    /// All usage so far, merged (what the forecast and the advisor rate).
    to_date: Vec<UsageItem>,
    running: Running,
    own_cap: Option<Decimal>,
}

fn additive(a: Aggregation) -> bool {
    matches!(a, Aggregation::Sum | Aggregation::Count)
}

/// Sums items with the same meter and dimensions.
fn merged<'a>(items: impl Iterator<Item = &'a UsageItem>) -> Vec<UsageItem> {
    let mut m: BTreeMap<(String, BTreeMap<String, String>), UsageItem> = BTreeMap::new();
    for u in items {
        m.entry((u.meter.clone(), u.dims.clone()))
            .and_modify(|e| {
                e.quantity += u.quantity;
                e.events += u.events;
            })
            .or_insert_with(|| u.clone());
    }
    m.into_values().collect()
}

impl Month {
    async fn load(
        state: &(impl StateStore + ?Sized),
        usage: &(impl UsageStore + ?Sized),
        meters: &MeterCatalog,
        quota: &QuotaService,
        customer: &str,
        now: DateTime<Utc>,
        also: &[PlanVersion],
    ) -> anyhow::Result<Self> {
        let period = month_of(now);
        let segs = state.plan_segments(customer, period).await?;
        let seats = state.seat_intervals(customer, period).await?;
        let mut plans = PlanCache::default();
        let mut segments = Vec::new();
        for s in &segs {
            segments.push(Segment {
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
            .map(|e| e.running.clone())
            .unwrap_or_default();
        let own_cap = entry.and_then(|e| e.spending_cap);
        let to_date = merged(items.iter().map(|d| &d.item));
        Ok(Self {
            period,
            now,
            segments,
            seats,
            items,
            to_date,
            running,
            own_cap,
        })
    }

    /// The segments with the usage of days up to `through` (all when None).
    fn segments_through(&self, through: Option<DateTime<Utc>>) -> Vec<Segment> {
        self.segments
            .iter()
            .enumerate()
            .map(|(i, s)| Segment {
                usage: merged(
                    self.items
                        .iter()
                        .filter(|d| d.seg == i)
                        .filter(|d| match (through, d.day) {
                            (None, _) => true,
                            (Some(t), Some(day)) => day <= t,
                            // Non-additive meters count on the last day.
                            (Some(t), None) => t + Duration::days(1) > self.now,
                        })
                        .map(|d| &d.item),
                ),
                ..s.clone()
            })
            .collect()
    }

    /// Rated total with the rest of the period projected onto the last
    /// segment (the plan in force now).
    fn forecast(&self) -> anyhow::Result<Decimal> {
        let mut segs = self.segments_through(None);
        if let Some(last) = segs.last_mut() {
            let extra = projection(
                &last.plan,
                self.period,
                self.now,
                &self.to_date,
                &self.running,
            );
            last.usage.extend(extra);
        }
        Ok(rate(&self.period, &segs, &self.seats)?.total)
    }

    /// (month to date, forecast, why it does not fit) as if the whole month
    /// were on `plan`.
    fn on_plan(&self, plan: &PlanVersion) -> anyhow::Result<(Decimal, Decimal, Option<String>)> {
        let mut seats = self.seats.clone();
        if seats.is_empty() && !plan.seat_fee.is_zero() {
            seats.push(SeatInterval {
                start: self.period.start,
                end: self.period.end,
                seats: 1,
            });
        }
        let to_date = &self.to_date;
        let whole = |usage| Segment {
            plan: plan.clone(),
            start: self.period.start,
            end: self.period.end,
            usage,
        };
        let mtd = rate(&self.period, &[whole(to_date.clone())], &seats)?.total;
        let mut projected = to_date.clone();
        projected.extend(projection(
            plan,
            self.period,
            self.now,
            to_date,
            &self.running,
        ));
        let rated = rate(&self.period, &[whole(projected)], &seats)?;
        let mut unpriced: BTreeSet<String> = BTreeSet::new();
        for u in to_date.iter().filter(|u| !u.quantity.is_zero()) {
            let priced = plan.prices.iter().any(|p| matches(p, u));
            let listed = u
                .dims
                .get("instance_type")
                .is_none_or(|t| plan.limits.allows_instance_type(t));
            if !priced || !listed {
                let what = u.dims.get("instance_type").map_or("", String::as_str);
                unpriced.insert(format!("{} {what}", u.meter).trim().to_owned());
            }
        }
        let uncapped = rated.before_maximum();
        let note = if !unpriced.is_empty() {
            Some(format!(
                "does not offer {}",
                unpriced.into_iter().collect::<Vec<_>>().join(", ")
            ))
        } else {
            match plan.limits.default_spending_cap {
                Some(cap) if uncapped > cap => Some(format!(
                    "usage would pass the plan's spending cap of {cap} {}",
                    plan.currency
                )),
                _ => None,
            }
        };
        Ok((mtd, rated.total, note))
    }

    fn currency(&self) -> String {
        self.segments
            .last()
            .map(|s| s.plan.currency.clone())
            .unwrap_or_else(|| "USD".into())
    }

    /// The plan in force at `now`.
    fn current_plan(&self) -> Option<&PlanVersion> {
        self.segments
            .iter()
            .find(|s| s.start <= self.now && self.now < s.end)
            .map(|s| &s.plan)
    }
}

fn usage_total(r: &Rated) -> Decimal {
    r.money(
        r.lines
            .iter()
            .filter(|l| l.kind == LineKind::Usage)
            .map(|l| l.amount)
            .sum(),
    )
}

/// Splits `amount` (a multiple of `10^-dp`) by `weights`, largest remainder
/// first, so the parts add up to `amount` exactly.
pub fn share(amount: Decimal, weights: &[Decimal], dp: u32) -> Vec<Decimal> {
    let total: Decimal = weights.iter().sum();
    if weights.is_empty() {
        return vec![];
    }
    if total.is_zero() {
        let mut v = vec![Decimal::ZERO; weights.len()];
        v[0] = amount;
        return v;
    }
    let unit = Decimal::new(1, dp);
    let exact: Vec<Decimal> = weights.iter().map(|w| amount * w / total).collect();
    let mut parts: Vec<Decimal> = exact
        .iter()
        .map(|x| x.round_dp_with_strategy(dp, rust_decimal::RoundingStrategy::ToZero))
        .collect();
    let mut left = amount - parts.iter().sum::<Decimal>();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    // Largest remainder in magnitude first; ties to the earlier key.
    order.sort_by(|&a, &b| {
        (exact[b] - parts[b])
            .abs()
            .cmp(&(exact[a] - parts[a]).abs())
            .then(a.cmp(&b))
    });
    let step = if left.is_sign_negative() { -unit } else { unit };
    for i in order.into_iter().cycle() {
        if left.is_zero() {
            break;
        }
        parts[i] += step;
        left -= step;
    }
    parts
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
    let m = Month::load(state, usage, meters, quota, customer, now, &[]).await?;
    let rated = rate(&m.period, &m.segments_through(None), &m.seats)?;
    let mut by_meter: BTreeMap<String, Decimal> = BTreeMap::new();
    let mut by_app: BTreeMap<String, Decimal> = BTreeMap::new();
    let (mut fees, mut adjustments) = (Decimal::ZERO, Decimal::ZERO);
    for line in &rated.lines {
        match line.kind {
            LineKind::FlatFee | LineKind::SeatFee => fees += line.amount,
            LineKind::MinimumTrueUp | LineKind::MaximumCap => adjustments += line.amount,
            LineKind::Usage => {
                let meter = line.meter.clone().unwrap_or_default();
                *by_meter.entry(meter.clone()).or_default() += line.amount;
                // The usage this line priced, per app.
                let seg = m
                    .segments
                    .iter()
                    .position(|s| s.start == line.segment_start)
                    .unwrap_or(0);
                let mut apps: BTreeMap<String, Decimal> = BTreeMap::new();
                for d in m.items.iter().filter(|d| {
                    d.seg == seg
                        && d.item.meter == meter
                        && line
                            .filter
                            .iter()
                            .all(|(k, v)| d.item.dims.get(k) == Some(v))
                }) {
                    let app = d.item.dims.get("app").cloned().unwrap_or_default();
                    *apps.entry(app).or_default() += d.item.quantity;
                }
                let dp = m.segments[seg].plan.minor_units;
                let weights: Vec<Decimal> = apps.values().copied().collect();
                for (app, part) in apps.keys().zip(share(line.amount, &weights, dp)) {
                    *by_app.entry(app.clone()).or_default() += part;
                }
            }
        }
    }
    let usage_sum = usage_total(&rated);
    let mut daily = Vec::new();
    let mut before = Decimal::ZERO;
    let mut day = m.period.start;
    while day < m.now && day < m.period.end {
        let through = usage_total(&rate(&m.period, &m.segments_through(Some(day)), &m.seats)?);
        daily.push(DayCost {
            date: day.format("%Y-%m-%d").to_string(),
            amount: rated.money(through - before),
        });
        before = through;
        day += Duration::days(1);
    }
    let plan = m.current_plan();
    let money = |x| rated.money(x);
    Ok(CostReport {
        customer_id: customer.to_owned(),
        currency: m.currency(),
        period: m.period,
        as_of: now,
        plan: plan.map(|p| PlanRef {
            plan: p.plan.clone(),
            version: p.version,
            name: p.name.clone(),
        }),
        month_to_date: rated.total,
        usage: usage_sum,
        fees: money(fees),
        plan_adjustments: money(adjustments),
        forecast: m.forecast()?,
        spending_cap: plan
            .map_or(m.own_cap, |p| cap_in_force(p, m.own_cap))
            .map(money),
        own_spending_cap: m.own_cap.map(money),
        by_meter: by_meter
            .into_iter()
            .map(|(key, amount)| Amount {
                key,
                amount: money(amount),
            })
            .collect(),
        by_app: by_app
            .into_iter()
            .map(|(key, amount)| Amount {
                key,
                amount: money(amount),
            })
            .collect(),
        daily,
    })
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
    let candidates: Vec<PlanVersion> = latest_active(&listed).into_values().cloned().collect();
    let m = Month::load(state, usage, meters, quota, customer, now, &candidates).await?;
    let currency = m.currency();
    let own = m.forecast()?;
    let current = m.current_plan().map(|p| (p.plan.clone(), p.version));
    let mut plans = Vec::new();
    for p in candidates.iter().filter(|p| p.currency == currency) {
        let (mtd, forecast, note) = m.on_plan(p)?;
        plans.push(AdvisorPlan {
            plan: p.plan.clone(),
            version: p.version,
            name: p.name.clone(),
            current: current.as_ref() == Some(&(p.plan.clone(), p.version)),
            month_to_date: mtd,
            forecast,
            saving: with_minor_units(own - forecast, p.minor_units),
            fits: note.is_none(),
            note,
        });
    }
    plans.sort_by(|a, b| {
        b.fits
            .cmp(&a.fits)
            .then(a.forecast.cmp(&b.forecast))
            .then(a.plan.cmp(&b.plan))
    });
    Ok(Advisor {
        customer_id: customer.to_owned(),
        currency,
        period: m.period,
        as_of: now,
        forecast: own,
        plans,
    })
}

#[cfg(test)]
mod tests {
    use super::share;
    use rust_decimal::Decimal;

    fn dec(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn shares_add_up_to_the_amount() {
        assert_eq!(
            share(dec("10.00"), &[dec("1"), dec("1"), dec("1")], 2),
            vec![dec("3.34"), dec("3.33"), dec("3.33")]
        );
        assert_eq!(
            share(dec("0.05"), &[dec("3"), dec("1")], 2),
            vec![dec("0.04"), dec("0.01")]
        );
        assert_eq!(
            share(dec("-1.00"), &[dec("1"), dec("2")], 2),
            vec![dec("-0.33"), dec("-0.67")]
        );
        assert_eq!(
            share(dec("7"), &[dec("0"), dec("0")], 2),
            vec![dec("7"), dec("0")]
        );
        for n in 1..9u32 {
            let w: Vec<_> = (1..=n).map(|i| Decimal::from(i * i)).collect();
            let s = share(dec("123.45"), &w, 2);
            assert_eq!(s.iter().sum::<Decimal>(), dec("123.45"));
        }
    }
}
