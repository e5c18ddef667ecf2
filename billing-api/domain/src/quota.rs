//! Quota decisions: may a customer start N instances of a type for an app,
//! or grow a volume to S GB? Pure and deterministic (no I/O, no clock): the
//! caller supplies the customer's state. Serving these from memory over
//! HTTP, with a snapshot for the control plane, is the rest of issue 4;
//! this module is the rule book it will use.
//!
//! Checks, in order (the first that fails is the reason):
//!
//! 0. `no_subscription`: a customer without a plan in force (never
//!    subscribed, or cancelled) may start nothing and grow no volume
//!    ([`without_subscription`]).
//! 1. `account_suspended`: a suspended customer may not scale up.
//! 2. `instance_type_not_in_tier`: the plan must price the type, and its
//!    `limits.instance_types`, when set, must list it.
//! 3. `tier_limit`: instances running in the app + requested ≤
//!    `limits.max_instances_per_app`; a volume's new size ≤
//!    `limits.max_volume_gb`.
//! 4. `spending_cap`: the forecast month-end cost with the change must not
//!    exceed the cap (the customer's own, else the plan's default) plus
//!    the credit the customer can spend now.
//!
//! Scaling down (zero instances, a volume no larger than now) is always
//! allowed.
//!
//! **Forecast.** The month-end usage is projected, then rated with the
//! rating engine, so allowances, tiers, fees, minimum and maximum apply
//! exactly as on the invoice:
//!
//! - gauges continue as they are now: every running instance runs, and
//!   every volume keeps its size, until the period ends;
//! - counters (requests, egress, …) continue at their month-to-date average
//!   rate: `quantity × period_elapsed⁻¹ × seconds_left` more;
//! - the change asked for is added on top (`count × seconds_left`
//!   instance-seconds of the type; `(S − current) × seconds_left`
//!   GB-seconds).
//!
//! The month to date and the projected cost are rated exactly as the
//! draft invoice rates the period: the plan segments that ended earlier in
//! the period with their own usage (`QuotaInput::earlier`), then the plan
//! in force now from where it starts to the period end, with its usage so
//! far (and, for the forecast, the projection; counters are projected from
//! the whole period's usage, as the dashboard's forecast projects them).
//! The cap check compares the cost *before* the plan's maximum: a plan maximum (the free tier's $0) limits what is
//! billed, not what may be used, so usage beyond the free allowance is
//! stopped here rather than given away.

use crate::catalog::{cap_in_force, price_groups, PlanVersion};
use crate::rating::{rate, with_minor_units, Period, SeatInterval, Segment, UsageItem};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What the control plane asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Ask {
    StartInstances {
        app: String,
        instance_type: String,
        count: u32,
    },
    GrowVolume {
        app: String,
        volume_id: String,
        #[serde(deserialize_with = "crate::wire::decimal")]
        size_gb: Decimal,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    NoSubscription,
    AccountSuspended,
    InstanceTypeNotInTier,
    TierLimit,
    SpendingCap,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::NoSubscription,
        Reason::AccountSuspended,
        Reason::InstanceTypeNotInTier,
        Reason::TierLimit,
        Reason::SpendingCap,
    ];

    /// The machine-readable code (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoSubscription => "no_subscription",
            Reason::AccountSuspended => "account_suspended",
            Reason::InstanceTypeNotInTier => "instance_type_not_in_tier",
            Reason::TierLimit => "tier_limit",
            Reason::SpendingCap => "spending_cap",
        }
    }
}

/// What runs now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Running {
    /// (app, instance type) → instances.
    pub instances: BTreeMap<(String, String), u32>,
    /// (app, volume id) → size in GB.
    pub volumes: BTreeMap<(String, String), Decimal>,
}

/// The decision for a customer with no plan in force: every start of
/// instances and every volume size above zero is denied (nothing is known
/// of what runs, so only stopping and releasing are allowed).
pub fn without_subscription(ask: &Ask) -> Decision {
    let growing = match ask {
        Ask::StartInstances { count, .. } => *count > 0,
        Ask::GrowVolume { size_gb, .. } => *size_gb > Decimal::ZERO,
    };
    Decision {
        allow: !growing,
        reason: growing.then_some(Reason::NoSubscription),
        limit: None,
        current: Decimal::ZERO,
        month_to_date: Decimal::ZERO,
        projected_month_end: Decimal::ZERO,
        projected_usage_cost: Decimal::ZERO,
        spending_cap: None,
        credit: Decimal::ZERO,
    }
}

/// A customer as quota checks see it.
#[derive(Debug, Clone)]
pub struct QuotaInput<'a> {
    pub plan: &'a PlanVersion,
    pub period: Period,
    pub now: DateTime<Utc>,
    /// Usage of `[since, now)`, where `since` is where `earlier` ends (the
    /// period start when it is empty), grouped as `plan`'s prices need.
    pub usage_to_date: &'a [UsageItem],
    /// The period's plan segments that ended before the plan in force now
    /// started, in order, each with its usage: what the draft rates before
    /// `plan`'s segment. Empty for a customer on one plan all period.
    pub earlier: &'a [Segment],
    /// Where the trial of `plan` ends, while it is in one: fees are waived
    /// until then (usage to date and the forecast are rated in the trial).
    pub trial_end: Option<DateTime<Utc>>,
    /// Where the subscription ends inside the period (a cancellation),
    /// if it does: fees and the forecast stop there.
    pub ends: Option<DateTime<Utc>>,
    pub seats: &'a [SeatInterval],
    pub running: &'a Running,
    pub suspended: bool,
    /// The customer's own monthly cap, if set.
    pub spending_cap: Option<Decimal>,
    /// Credit the customer can spend on this period's invoice, in the
    /// plan's currency (`credit::spendable`): the cap check lets usage run
    /// that much further (a $0 cap with $5 of credit allows $5 of usage).
    pub credit: Decimal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Decision {
    pub allow: bool,
    pub reason: Option<Reason>,
    /// The limit the reason refers to (instances, GB, or money for the cap).
    pub limit: Option<Decimal>,
    /// Current use of that limit (instances running in the app, the
    /// volume's GB, or the month-to-date cost).
    pub current: Decimal,
    /// Rated cost of the usage so far.
    pub month_to_date: Decimal,
    /// Forecast month-end bill with the change.
    pub projected_month_end: Decimal,
    /// The same usage's cost before the plan's maximum (what the cap check
    /// compares).
    pub projected_usage_cost: Decimal,
    pub spending_cap: Option<Decimal>,
    /// The credit the customer can spend now, counted beside the cap.
    #[serde(default)]
    pub credit: Decimal,
}

const COMPUTE: &str = "compute";
const DISK: &str = "disk";

/// Dimensions of a projected item: only the ones the plan groups `meter` by.
fn dims_for(plan: &PlanVersion, meter: &str, all: &[(&str, &str)]) -> BTreeMap<String, String> {
    let keys: BTreeSet<String> = price_groups(plan)
        .into_iter()
        .filter(|(m, _)| m == meter)
        .flat_map(|(_, g)| g)
        .collect();
    all.iter()
        .filter(|(k, _)| keys.contains(*k))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Seconds from `a` to `b` the way proration counts them (boundaries
/// floored to whole seconds), so the elapsed and the remaining part of a
/// period always add up to the period.
fn secs(a: DateTime<Utc>, b: DateTime<Utc>) -> Decimal {
    Decimal::from(crate::rating::prorated_secs(a, b).max(0))
}

/// Where the plan in force now starts: the end of the earlier segments, or
/// the period start.
pub fn since(q: &QuotaInput) -> DateTime<Utc> {
    q.earlier
        .last()
        .map_or(q.period.start, |s| s.end.max(q.period.start))
}

/// Where the plan in force now stops being billed: the subscription's end
/// inside the period (a cancellation), else the period's end.
fn until(q: &QuotaInput) -> DateTime<Utc> {
    q.ends
        .filter(|e| *e > since(q))
        .map_or(q.period.end, |e| e.min(q.period.end))
}

/// (billed total, cost before the plan's maximum) of the period: the
/// earlier segments as they are, then the plan in force now with `usage`.
fn rated_total(q: &QuotaInput, usage: Vec<UsageItem>) -> anyhow::Result<(Decimal, Decimal)> {
    let mut segments = q.earlier.to_vec();
    let start = since(q);
    let end = until(q);
    match q.trial_end.filter(|t| *t > start) {
        Some(t) if t < end => {
            segments.push(Segment {
                trial: true,
                plan: q.plan.clone(),
                start,
                end: t,
                usage,
            });
            segments.push(Segment {
                trial: false,
                plan: q.plan.clone(),
                start: t,
                end,
                usage: vec![],
            });
        }
        trial => segments.push(Segment {
            trial: trial.is_some(),
            plan: q.plan.clone(),
            start,
            end,
            usage,
        }),
    }
    let r = rate(&q.period, &segments, q.seats)?;
    Ok((r.total, r.before_maximum()))
}

/// What the rest of the period adds to `usage_to_date` (usage of
/// `[period.start, now)`, on every plan segment) under the forecast method
/// above: counters at their month-to-date rate, instances and volumes as
/// they run now. Gauge items carry only the dimensions `plan` prices on.
pub fn projection(
    plan: &PlanVersion,
    period: Period,
    now: DateTime<Utc>,
    usage_to_date: &[UsageItem],
    running: &Running,
) -> Vec<UsageItem> {
    let left = secs(now.max(period.start), period.end);
    let elapsed = secs(period.start, now.min(period.end));
    let mut out = Vec::new();
    // Counters continue at their month-to-date rate.
    if !elapsed.is_zero() {
        for u in usage_to_date
            .iter()
            .filter(|u| u.meter != COMPUTE && u.meter != DISK)
        {
            out.push(UsageItem {
                quantity: u.quantity * left / elapsed,
                events: 0,
                ..u.clone()
            });
        }
    }
    // Gauges continue as they run now.
    for ((app, ty), n) in &running.instances {
        out.push(UsageItem {
            meter: COMPUTE.into(),
            dims: dims_for(plan, COMPUTE, &[("app", app), ("instance_type", ty)]),
            quantity: Decimal::from(*n) * left,
            events: 0,
        });
    }
    for ((app, vol), gb) in &running.volumes {
        out.push(UsageItem {
            meter: DISK.into(),
            dims: dims_for(plan, DISK, &[("app", app), ("volume_id", vol)]),
            quantity: *gb * left,
            events: 0,
        });
    }
    out
}

/// The projected usage of the plan in force now to the period end (or the
/// subscription's end inside it), plus
/// `extra`. Counters are projected from the whole period's usage, on every
/// segment, as the dashboard's forecast does.
fn projected_usage(q: &QuotaInput, extra: Vec<UsageItem>) -> Vec<UsageItem> {
    let mut out: Vec<UsageItem> = q.usage_to_date.to_vec();
    let month: Vec<UsageItem> = q
        .earlier
        .iter()
        .flat_map(|s| s.usage.iter().cloned())
        .chain(q.usage_to_date.iter().cloned())
        .collect();
    let to = Period {
        start: q.period.start,
        end: until(q),
    };
    out.extend(projection(q.plan, to, q.now, &month, q.running));
    out.extend(extra);
    out
}

/// (billed total, cost before the plan's maximum) of the usage so far.
pub fn cost_to_date(q: &QuotaInput) -> anyhow::Result<(Decimal, Decimal)> {
    rated_total(q, q.usage_to_date.to_vec())
}

/// Forecast month-end bill with nothing changed.
pub fn forecast(q: &QuotaInput) -> anyhow::Result<Decimal> {
    Ok(rated_total(q, projected_usage(q, vec![]))?.0)
}

fn priced_type(plan: &PlanVersion, ty: &str) -> bool {
    plan.prices
        .iter()
        .any(|p| p.meter == COMPUTE && p.filter.get("instance_type").is_some_and(|t| t == ty))
}

/// The decision for `ask`.
pub fn decide(q: &QuotaInput, ask: &Ask) -> anyhow::Result<Decision> {
    let cap = cap_in_force(q.plan, q.spending_cap).map(|c| with_minor_units(c, q.plan.minor_units));
    let left = secs(q.now.max(q.period.start), q.period.end);
    // The asked volume's size now (0 when new or when asking for instances).
    let volume_now = match ask {
        Ask::GrowVolume { app, volume_id, .. } => q
            .running
            .volumes
            .get(&(app.clone(), volume_id.clone()))
            .copied()
            .unwrap_or_default(),
        Ask::StartInstances { .. } => Decimal::ZERO,
    };
    let (extra, growing) = match ask {
        Ask::StartInstances {
            app,
            instance_type,
            count,
        } => (
            vec![UsageItem {
                meter: COMPUTE.into(),
                dims: dims_for(
                    q.plan,
                    COMPUTE,
                    &[("app", app), ("instance_type", instance_type)],
                ),
                quantity: Decimal::from(*count) * left,
                events: 0,
            }],
            *count > 0,
        ),
        Ask::GrowVolume {
            app,
            volume_id,
            size_gb,
        } => {
            let more = (*size_gb - volume_now).max(Decimal::ZERO);
            (
                vec![UsageItem {
                    meter: DISK.into(),
                    dims: dims_for(q.plan, DISK, &[("app", app), ("volume_id", volume_id)]),
                    quantity: more * left,
                    events: 0,
                }],
                more > Decimal::ZERO,
            )
        }
    };
    let mtd = rated_total(q, q.usage_to_date.to_vec())?.0;
    let (projected, usage_cost) = rated_total(q, projected_usage(q, extra))?;
    let mut d = Decision {
        allow: true,
        reason: None,
        limit: None,
        current: Decimal::ZERO,
        month_to_date: mtd,
        projected_month_end: projected,
        projected_usage_cost: usage_cost,
        spending_cap: cap,
        credit: q.credit,
    };
    if !growing {
        return Ok(d);
    }
    let mut deny = |reason, limit: Option<Decimal>, current: Decimal| {
        d.allow = false;
        d.reason = Some(reason);
        d.limit = limit;
        d.current = current;
    };
    if q.suspended {
        deny(Reason::AccountSuspended, None, Decimal::ZERO);
        return Ok(d);
    }
    match ask {
        Ask::StartInstances {
            app,
            instance_type,
            count,
        } => {
            if !q.plan.limits.allows_instance_type(instance_type)
                || !priced_type(q.plan, instance_type)
            {
                deny(Reason::InstanceTypeNotInTier, None, Decimal::ZERO);
                return Ok(d);
            }
            let running: u32 = q
                .running
                .instances
                .iter()
                .filter(|((a, _), _)| a == app)
                .map(|(_, n)| n)
                .sum();
            if let Some(max) = q.plan.limits.max_instances_per_app {
                if running + count > max {
                    deny(Reason::TierLimit, Some(max.into()), running.into());
                    return Ok(d);
                }
            }
        }
        Ask::GrowVolume { size_gb, .. } => {
            if let Some(max) = q.plan.limits.max_volume_gb {
                if *size_gb > max {
                    deny(Reason::TierLimit, Some(max), volume_now);
                    return Ok(d);
                }
            }
        }
    }
    if let Some(cap) = cap {
        if usage_cost > cap + q.credit {
            deny(Reason::SpendingCap, Some(cap), mtd);
        }
    }
    Ok(d)
}
