//! A customer's open month as the cost dashboard shows it, and the plan
//! advisor: the arithmetic over a loaded [`Month`] (billing-api's
//! `costs::load` reads it from the stores). Both are API responses (`GET /v1/customers/{id}/costs`,
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

use crate::catalog::{cap_in_force, PlanVersion};
use crate::credit::{balance_at, consume};
use crate::invoice::charges;
use crate::quota::{projection, Running};
use crate::rating::{
    matches, rate, with_minor_units, LineKind, Period, Rated, SeatInterval, Segment, UsageItem,
};
use crate::settle::{settle, Inputs};
use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use schemas::Aggregation;
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
    /// Discounts, tax and credits on the month to date and the forecast,
    /// as the invoice would settle them.
    pub settlement: MonthSettlement,
}

/// Discounts, tax and credit on the open month (`settle`): the month to
/// date and the forecast settled as its invoice would be, with the credit
/// that would pay them and what expires soon.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, ToSchema)]
pub struct MonthSettlement {
    /// Σ discount lines on the month to date (≤ 0).
    pub month_to_date_discounts: Decimal,
    /// Exclusive tax on the month to date.
    pub month_to_date_tax: Decimal,
    /// Month to date after discounts and tax.
    pub month_to_date_total: Decimal,
    pub forecast_discounts: Decimal,
    pub forecast_tax: Decimal,
    /// The forecast after discounts and tax.
    pub forecast_total: Decimal,
    /// What the customer's credit would pay of `forecast_total` (≤ 0).
    pub forecast_credit: Decimal,
    /// `forecast_total + forecast_credit`: what would be due.
    pub forecast_due: Decimal,
    /// Credit that can be spent now, in the month's currency.
    pub credit_balance: Decimal,
    /// Grants with a balance that expire within 30 days of now.
    pub credit_expiring: Vec<ExpiringCredit>,
}

/// Credit that expires soon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ExpiringCredit {
    pub grant_id: String,
    pub remaining: Decimal,
    pub expires_at: DateTime<Utc>,
}

/// One plan priced on this month's usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct AdvisorPlan {
    pub plan: String,
    pub version: u32,
    pub name: String,
    /// The customer is on this plan now.
    pub current: bool,
    /// The customer's own contract (a private version for it alone), not a
    /// public plan.
    pub contract: bool,
    /// This month's usage through now, rated on this plan for the whole month.
    pub month_to_date: Decimal,
    /// The month-end forecast on this plan.
    pub forecast: Decimal,
    /// The forecast after the customer's discounts and tax on this plan
    /// (the same footing as its own: its coupons, its tax profile).
    pub forecast_total: Decimal,
    /// The customer's own forecast minus this plan's, both after discounts
    /// and tax (positive: cheaper).
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
    /// The same after its discounts and tax.
    pub forecast_total: Decimal,
    /// Plans that fit first, cheapest forecast (after discounts and tax) first.
    pub plans: Vec<AdvisorPlan>,
}

/// Usage of one segment: by day for meters that add over days, or for the
/// whole range (`day: None`) for those that do not.
#[derive(Debug, Clone)]
pub struct DayItem {
    /// Index of the segment in [`Month::segments`].
    pub seg: usize,
    pub day: Option<DateTime<Utc>>,
    pub item: UsageItem,
}

/// What the report and the advisor are computed from.
#[derive(Debug, Clone)]
pub struct Month {
    pub period: Period,
    pub now: DateTime<Utc>,
    /// The period's plan segments (their usage is in `items`).
    pub segments: Vec<Segment>,
    pub seats: Vec<SeatInterval>,
    pub items: Vec<DayItem>,
    /// All usage so far, merged (what the forecast and the advisor rate).
    pub to_date: Vec<UsageItem>,
    pub running: Running,
    pub own_cap: Option<Decimal>,
    /// The coupons, tax rates and treatment the month's invoice would be
    /// settled with (`settle::inputs` at the period's end); its grants are
    /// the customer's grants as they stand now.
    pub settle: Inputs,
}

/// Whether a meter's usage adds over days (counted by day in the daily
/// cost; the others on the last day).
pub fn additive(a: Aggregation) -> bool {
    matches!(a, Aggregation::Sum | Aggregation::Count)
}

/// Sums items with the same meter and dimensions.
pub fn merged<'a>(items: impl Iterator<Item = &'a UsageItem>) -> Vec<UsageItem> {
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
    /// The segments with the usage of days up to `through` (all when None).
    pub fn segments_through(&self, through: Option<DateTime<Utc>>) -> Vec<Segment> {
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
    /// segment (the plan in force now), up to where it ends: the period's
    /// end, or a cancellation inside it (nothing after one in the past).
    pub fn forecast(&self) -> anyhow::Result<Decimal> {
        Ok(self.forecast_rated()?.total)
    }

    /// The forecast's rating ([`forecast`](Self::forecast)).
    pub fn forecast_rated(&self) -> anyhow::Result<Rated> {
        let mut segs = self.segments_through(None);
        if let Some(last) = segs.last_mut() {
            let to = Period {
                start: self.period.start,
                end: last.end.max(self.now).min(self.period.end),
            };
            let extra = projection(&last.plan, to, self.now, &self.to_date, &self.running);
            last.usage.extend(extra);
        }
        Ok(rate(&self.period, &segs, &self.seats)?)
    }

    /// `rated` settled as the month's invoice would be, without credits:
    /// (discounts, exclusive tax, total after them).
    pub fn discounted(&self, rated: &Rated) -> (Decimal, Decimal, Decimal) {
        let inputs = Inputs {
            grants: vec![],
            until: None,
            ..self.settle.clone()
        };
        let s = settle(
            &charges(&rated.lines, &[]),
            Decimal::ZERO,
            &rated.currency,
            rated.minor_units,
            &inputs,
        );
        let total = rated.money(rated.total + s.discount_total + s.tax_total);
        (s.discount_total, s.tax_total, total)
    }

    /// The month's settlement: discounts and tax on the month to date and
    /// the forecast, the credit that would pay the forecast, the balance
    /// and what expires within 30 days.
    pub fn settlement(&self, mtd: &Rated, forecast: &Rated) -> MonthSettlement {
        let (md, mt, mtotal) = self.discounted(mtd);
        let (fd, ft, ftotal) = self.discounted(forecast);
        let currency = &forecast.currency;
        let paying = match self.settle.until {
            Some(until) => consume(ftotal, currency, until, &self.settle.grants),
            None => vec![],
        };
        let fcredit = forecast.money(paying.iter().map(|c| c.amount).sum());
        let soon = self.now + Duration::days(30);
        MonthSettlement {
            month_to_date_discounts: md,
            month_to_date_tax: mt,
            month_to_date_total: mtotal,
            forecast_discounts: fd,
            forecast_tax: ft,
            forecast_total: ftotal,
            forecast_credit: fcredit,
            forecast_due: forecast.money(ftotal + fcredit),
            credit_balance: forecast.money(balance_at(&self.settle.grants, currency, self.now)),
            credit_expiring: self
                .settle
                .grants
                .iter()
                .filter(|g| {
                    crate::credit::live(g, currency)
                        && g.expires_at.is_some_and(|e| e > self.now && e <= soon)
                })
                .map(|g| ExpiringCredit {
                    grant_id: g.id.clone(),
                    remaining: g.remaining,
                    expires_at: g.expires_at.expect("filtered"),
                })
                .collect(),
        }
    }

    /// (month to date, forecast, why it does not fit) as if the whole month
    /// were on `plan`.
    pub fn on_plan(&self, plan: &PlanVersion) -> anyhow::Result<(Decimal, Rated, Option<String>)> {
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
            trial: false,
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
        Ok((mtd, rated, note))
    }

    pub fn currency(&self) -> String {
        self.segments
            .last()
            .map(|s| s.plan.currency.clone())
            .unwrap_or_else(|| "USD".into())
    }

    /// The plan in force at `now`.
    pub fn current_plan(&self) -> Option<&PlanVersion> {
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

/// The cost report of `customer`'s month `m` as of `m.now`.
pub fn report(m: &Month, customer: &str) -> anyhow::Result<CostReport> {
    let now = m.now;
    let rated = rate(&m.period, &m.segments_through(None), &m.seats)?;
    let mut by_meter: BTreeMap<String, Decimal> = BTreeMap::new();
    let mut by_app: BTreeMap<String, Decimal> = BTreeMap::new();
    let (mut fees, mut adjustments) = (Decimal::ZERO, Decimal::ZERO);
    for line in &rated.lines {
        match line.kind {
            LineKind::FlatFee | LineKind::SeatFee => fees += line.amount,
            LineKind::MinimumTrueUp | LineKind::MaximumCap => adjustments += line.amount,
            // Not part of a month's rating.
            LineKind::TopUp => {}
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
    let forecast = m.forecast_rated()?;
    let settlement = m.settlement(&rated, &forecast);
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
        forecast: forecast.total,
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
        settlement,
    })
}

/// Month `m` priced on each of `candidates` (the latest active version of
/// every published plan) offered to the customer (public plans and its
/// own contracts, marked as such) in the customer's currency.
pub fn advisor(m: &Month, candidates: &[PlanVersion], customer: &str) -> anyhow::Result<Advisor> {
    let now = m.now;
    let currency = m.currency();
    let own_rated = m.forecast_rated()?;
    let own = own_rated.total;
    let own_total = m.discounted(&own_rated).2;
    let current = m.current_plan().map(|p| (p.plan.clone(), p.version));
    let mut plans = Vec::new();
    for p in candidates
        .iter()
        .filter(|p| p.currency == currency && p.offered_to(customer))
    {
        let (mtd, rated, note) = m.on_plan(p)?;
        let forecast = rated.total;
        let forecast_total = m.discounted(&rated).2;
        plans.push(AdvisorPlan {
            plan: p.plan.clone(),
            version: p.version,
            name: p.name.clone(),
            current: current.as_ref() == Some(&(p.plan.clone(), p.version)),
            contract: p.customer.is_some(),
            month_to_date: mtd,
            forecast,
            forecast_total,
            saving: with_minor_units(own_total - forecast_total, p.minor_units),
            fits: note.is_none(),
            note,
        });
    }
    plans.sort_by(|a, b| {
        b.fits
            .cmp(&a.fits)
            .then(a.forecast_total.cmp(&b.forecast_total))
            .then(a.plan.cmp(&b.plan))
    });
    Ok(Advisor {
        customer_id: customer.to_owned(),
        currency,
        period: m.period,
        as_of: now,
        forecast: own,
        forecast_total: own_total,
        plans,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use chrono::TimeZone;

    fn nov(d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, d, 0, 0, 0).unwrap()
    }

    fn requests(day: u32, app: &str, n: i64) -> DayItem {
        DayItem {
            seg: 0,
            day: Some(nov(day)),
            item: UsageItem {
                meter: "requests".into(),
                dims: [("app".to_owned(), app.to_owned())].into(),
                quantity: Decimal::from(n),
                events: 1,
            },
        }
    }

    /// Two days of requests on payg ($0.40 per million), two apps: every
    /// breakdown adds up to the usage line, and the advisor prices the
    /// same usage on the other plans.
    #[test]
    fn a_month_on_payg_adds_up_by_meter_app_and_day() {
        let cat = Catalog::default_catalog();
        let payg = cat.latest("payg").unwrap().clone();
        let period = Period {
            start: nov(1),
            end: Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
        };
        let items = vec![
            requests(1, "a", 3_000_000),
            requests(1, "b", 1_000_000),
            requests(2, "a", 1_000_000),
        ];
        let m = Month {
            period,
            now: nov(3),
            segments: vec![Segment {
                trial: false,
                plan: payg.clone(),
                start: period.start,
                end: period.end,
                usage: vec![],
            }],
            seats: vec![],
            to_date: merged(items.iter().map(|d| &d.item)),
            items,
            running: Running::default(),
            own_cap: Some(dec("25")),
            settle: Inputs::default(),
        };
        let r = report(&m, "cus_1").unwrap();
        assert_eq!(r.usage, dec("2.00"));
        assert_eq!(r.fees + r.plan_adjustments + r.usage, r.month_to_date);
        let pairs = |v: &[Amount]| -> Vec<(String, Decimal)> {
            v.iter().map(|a| (a.key.clone(), a.amount)).collect()
        };
        assert_eq!(pairs(&r.by_meter), [("requests".into(), dec("2.00"))]);
        assert_eq!(
            pairs(&r.by_app),
            [("a".into(), dec("1.60")), ("b".into(), dec("0.40"))]
        );
        let daily: Vec<(&str, Decimal)> = r
            .daily
            .iter()
            .map(|d| (d.date.as_str(), d.amount))
            .collect();
        assert_eq!(
            daily,
            [("2026-11-01", dec("1.60")), ("2026-11-02", dec("0.40"))]
        );
        // 5 M requests in 2 of 30 days continue at that rate: 75 M.
        assert_eq!(r.forecast, dec("30.00"));
        assert_eq!(
            (r.spending_cap, r.own_spending_cap),
            (Some(dec("25.00")), Some(dec("25.00")))
        );
        assert_eq!(r.plan.as_ref().map(|p| p.plan.as_str()), Some("payg"));
        // Cancelled on Nov 16: the rate runs 13 more days, not 27: 5 M in
        // 2 days → 37.5 M requests by then, $15.00; cancelled now: nothing
        // more than the month to date.
        for (day, want) in [(16, "15.00"), (3, "2.00")] {
            let mut c = m.clone();
            c.segments[0].end = nov(day);
            assert_eq!(
                report(&c, "cus_1").unwrap().forecast,
                dec(want),
                "Nov {day}"
            );
        }

        let candidates: Vec<PlanVersion> = ["payg", "free"]
            .iter()
            .map(|p| cat.latest(p).unwrap().clone())
            .collect();
        let a = advisor(&m, &candidates, "cus_1").unwrap();
        assert_eq!(a.forecast, r.forecast);
        let on_payg = a.plans.iter().find(|p| p.plan == "payg").unwrap();
        assert!(on_payg.current && on_payg.fits, "{on_payg:?}");
        assert_eq!(
            (on_payg.month_to_date, on_payg.saving),
            (dec("2.00"), dec("0.00"))
        );
        assert_eq!(a.forecast_total, a.forecast);

        // With a 10 % coupon, 20 % VAT and $10 of credit of which $4
        // expire on Nov 20: month to date $2.00 − 0.20 + 0.36 = $2.16;
        // the forecast $30.00 − 3.00 + 5.40 = $32.40, $10.00 of it paid by
        // credit.
        let mut s = m.clone();
        let coupon: crate::settle::Coupon = serde_json::from_value(serde_json::json!({
            "id": "ten", "name": "Ten", "percent_off": "10", "duration": "forever"}))
        .unwrap();
        let grant = |id: &str, amount: i64, expires: Option<DateTime<Utc>>| crate::credit::Grant {
            id: id.into(),
            customer_id: "cus_1".into(),
            kind: crate::credit::GrantKind::Promotional,
            currency: "USD".into(),
            amount: Decimal::new(amount, 2),
            remaining: Decimal::new(amount, 2),
            effective_at: nov(1),
            expires_at: expires,
            priority: 10,
            reason: String::new(),
            usable: true,
            invoice_id: None,
            created_at: nov(1),
            voided_at: None,
        };
        s.settle = Inputs {
            coupons: vec![crate::settle::Applied {
                id: "a".into(),
                customer_id: "cus_1".into(),
                coupon,
                applied_at: nov(1),
                removed_at: None,
                ends_at: None,
                redeemed: 0,
            }],
            treatment: Some(crate::settle::TaxTreatment::Standard),
            tax_id: None,
            rates: vec![serde_json::from_value(serde_json::json!({
                "id": "vat", "name": "VAT", "country": "FR", "percentage": "20"}))
            .unwrap()],
            grants: vec![grant("g1", 600, None), grant("g2", 400, Some(nov(20)))],
            until: Some(period.end),
        };
        let st = report(&s, "cus_1").unwrap().settlement;
        assert_eq!(
            (
                st.month_to_date_discounts,
                st.month_to_date_tax,
                st.month_to_date_total
            ),
            (dec("-0.20"), dec("0.36"), dec("2.16"))
        );
        assert_eq!(
            (st.forecast_discounts, st.forecast_tax, st.forecast_total),
            (dec("-3.00"), dec("5.40"), dec("32.40"))
        );
        // The grant expiring Nov 20 cannot pay the invoice cut at Dec 1.
        assert_eq!(
            (st.forecast_credit, st.forecast_due, st.credit_balance),
            (dec("-6.00"), dec("26.40"), dec("10.00"))
        );
        assert_eq!(
            st.credit_expiring
                .iter()
                .map(|e| (e.grant_id.as_str(), e.remaining))
                .collect::<Vec<_>>(),
            [("g2", dec("4.00"))]
        );
        // The advisor compares every plan after the same coupon and tax.
        let a = advisor(&s, &candidates, "cus_1").unwrap();
        assert_eq!((a.forecast, a.forecast_total), (dec("30.00"), dec("32.40")));
        let on_payg = a.plans.iter().find(|p| p.plan == "payg").unwrap();
        assert_eq!(
            (on_payg.forecast_total, on_payg.saving),
            (dec("32.40"), dec("0.00"))
        );
    }

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
