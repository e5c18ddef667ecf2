//! The rating engine: turns plan segments, usage and seat history into
//! invoice lines. Pure and deterministic: no I/O, no clock.
//!
//! Rules (`shared/BILLING-EXAMPLES.md` pins them down):
//!
//! - A period is `[start, end)`; a segment `[s, e)` inside it has the
//!   fraction `f = (e − s) / (end − start)` in whole seconds, each boundary
//!   floored to its whole second first ([`prorated_secs`]), so segments
//!   always add up to the period; usage belongs to a segment by its exact
//!   time (the caller asks the usage store for `[s, e)` at the stored
//!   microsecond precision). `f` multiplies
//!   the flat fee, every tier bound, every per-tier flat price, the minimum
//!   and the maximum; never unit prices or package sizes.
//! - Seats: `Σ seats × seat_fee × interval / period` over the seat intervals
//!   inside the segment (interval lengths floored the same way). A price's per-seat allowance frees
//!   `allowance_per_seat × Σ seats × interval / period` units before its
//!   model applies.
//! - Graduated: each tier's units at its price, plus the flat price of every
//!   tier reached (quantity above its lower bound). Volume: all units at the
//!   price of the tier the total falls in (a total equal to `up_to` is in
//!   that tier), plus that tier's flat price. Package:
//!   `⌈quantity / package_size⌉ × price`. Zero usage costs nothing.
//! - Each line is computed exactly and rounded once, to the currency's minor
//!   unit with the plan's rounding (half-even by default). Subtotals and the
//!   total are sums of rounded lines.
//! - Minimum per segment: a true-up line when the rounded subtotal is below
//!   `minimum × f`; maximum: a negative cap line when above `maximum × f`.
//! - Adjacent segments on the same plan version are merged first, so a
//!   switch to the plan a customer is already on never changes the bill.
//!
//! Exactness: sums and products are exact decimals. Proration multiplies
//! first and divides by the period length last, and a price stated `per` N
//! base units divides by N last; those divisions carry 28 significant
//! digits. Before its one rounding, each line's amount is snapped to 20
//! decimal places ([`SNAP_DP`]): the division residue (below 1e-21 for any
//! amount under $10^6) disappears, so an amount that is exactly a half-cent
//! tie, like 36.41666…M requests × $0.30/M = $10.925, rounds as the tie it
//! is; and no true amount moves across a rounding boundary, because the
//! engine's amounts are rationals with denominators at most `per` × the
//! period's seconds, whose distance from a tie, when not zero, exceeds 1e-18.

use crate::catalog::{MeterPrice, PlanVersion, PriceModel};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Decimal places an exact amount is snapped to before rounding.
pub const SNAP_DP: u32 = 20;

fn snap(x: Decimal) -> Decimal {
    x.round_dp(SNAP_DP)
}

/// Digits of a currency's minor unit when no plan says otherwise.
pub const DEFAULT_MINOR_UNITS: u32 = 2;

fn default_minor_units() -> u32 {
    DEFAULT_MINOR_UNITS
}

/// `amount` written with at least the currency's `minor_units` digits:
/// `"20.00"` and `"0.00"` for USD, not `"20"` and `"0"`. The value never
/// changes: an amount with more digits (a cap a customer set to the
/// thousandth, say) keeps them. Every amount Tally answers with passes
/// through here once it is rounded; sums and differences of such amounts
/// keep the digits.
pub fn with_minor_units(amount: Decimal, minor_units: u32) -> Decimal {
    let mut a = amount;
    if a.scale() < minor_units {
        a.rescale(minor_units);
    }
    a
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Period {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// Usage of one meter with one set of dimension values, in base units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageItem {
    pub meter: String,
    #[serde(default)]
    pub dims: BTreeMap<String, String>,
    pub quantity: Decimal,
    pub events: u64,
}

/// A span of the period rated by one plan version.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub plan: PlanVersion,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// Usage whose event time falls in `[start, end)`.
    pub usage: Vec<UsageItem>,
    /// A trial segment: its flat and seat fees are waived (lines at zero
    /// whose `waived` says what they would have cost) and the plan's
    /// minimum does not apply; usage and the maximum apply as usual.
    pub trial: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SeatInterval {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub seats: u32,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    FlatFee,
    SeatFee,
    Usage,
    MinimumTrueUp,
    MaximumCap,
    /// Prepaid credit bought on its own (a top-up invoice's one line).
    TopUp,
}

/// How one tier contributed to a usage line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TierCharge {
    pub tier: usize,
    /// Units in this tier, in price units.
    pub quantity: Decimal,
    pub unit_price: Decimal,
    /// Flat price charged for reaching the tier (already prorated).
    pub flat_price: Decimal,
}

/// One invoice line with its evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Line {
    pub kind: LineKind,
    pub description: String,
    pub plan: String,
    pub plan_version: u32,
    pub segment_start: DateTime<Utc>,
    pub segment_end: DateTime<Utc>,
    pub meter: Option<String>,
    #[serde(default)]
    pub filter: BTreeMap<String, String>,
    /// Events behind a usage line.
    pub events: u64,
    /// Quantity in the meter's base units (seat-seconds for seat lines).
    pub quantity: Decimal,
    /// Quantity in price units.
    pub price_quantity: Decimal,
    pub unit_price: Option<Decimal>,
    pub tiers: Vec<TierCharge>,
    /// Exact amount before rounding (snapped to [`SNAP_DP`] places).
    pub amount_exact: Decimal,
    /// Rounded once, to the currency's minor unit.
    pub amount: Decimal,
    /// A fee waived in a trial: what the line would have cost, rounded as
    /// it would have been (`amount` is zero).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waived: Option<Decimal>,
    /// A fee of a plan billing in advance (`advance.rs`): charged ahead
    /// for its span, or refunded or charged for the rest of its period
    /// after a change. Absent on the lines of the period's own rating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advance: Option<Advance>,
}

/// Why a fee line billed in advance is on an invoice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Advance {
    /// The fee of the span `[segment_start, segment_end)` ahead, charged
    /// at its start.
    Fee,
    /// A refund (negative) of a fee charged in advance, for the rest of
    /// its period after a change (`segment_start` to `segment_end`).
    Credit,
    /// The fee in force after a change, for the rest of its period.
    Charge,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rated {
    pub currency: String,
    /// Digits of the currency's minor unit (the plan's `minor_units`).
    #[serde(default = "default_minor_units")]
    pub minor_units: u32,
    pub lines: Vec<Line>,
    /// Sum of the rounded lines.
    pub total: Decimal,
}

impl Rated {
    /// A rating of `lines`, its total their sum (each already rounded).
    pub fn of_lines(currency: String, minor_units: u32, lines: Vec<Line>) -> Rated {
        let total = with_minor_units(lines.iter().map(|l| l.amount).sum(), minor_units);
        Rated {
            currency,
            minor_units,
            lines,
            total,
        }
    }

    /// The total without the plan's maximum (what the usage itself costs;
    /// spending caps and alerts compare this).
    pub fn before_maximum(&self) -> Decimal {
        self.money(
            self.lines
                .iter()
                .filter(|l| l.kind != LineKind::MaximumCap)
                .map(|l| l.amount)
                .sum(),
        )
    }

    /// `amount` with this rating's currency digits ([`with_minor_units`]).
    pub fn money(&self, amount: Decimal) -> Decimal {
        with_minor_units(amount, self.minor_units)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RatingError {
    #[error("the period is empty or reversed")]
    EmptyPeriod,
    #[error("segment {0} lies outside the period, is empty, or overlaps the previous one")]
    BadSegment(usize),
    #[error("segments use different currencies ({0} and {1})")]
    MixedCurrencies(String, String),
}

/// `f = num / den` in whole seconds.
#[derive(Debug, Clone, Copy)]
struct Frac {
    num: Decimal,
    den: Decimal,
}

impl Frac {
    fn of(&self, x: Decimal) -> Decimal {
        x * self.num / self.den
    }
}

/// Whole seconds from `a` to `b` for proration: each boundary is floored
/// to its whole second first (BILLING-EXAMPLES "Instants"), so the lengths
/// of segments that partition a period add up to the period exactly, however
/// their boundaries fall inside a second. Truncating each length on its own
/// instead loses a second whenever a boundary has a sub-second part.
pub fn prorated_secs(a: DateTime<Utc>, b: DateTime<Utc>) -> i64 {
    // `timestamp()` floors: the sub-second part is never negative.
    b.timestamp() - a.timestamp()
}

fn secs(a: DateTime<Utc>, b: DateTime<Utc>) -> i64 {
    prorated_secs(a, b)
}

/// Amount of usage `q` (base units) under a price, with the segment's `f`.
fn price_amount(
    p: &MeterPrice,
    q: Decimal,
    f: Frac,
) -> (Decimal, Option<Decimal>, Vec<TierCharge>) {
    if q.is_zero() {
        return (Decimal::ZERO, None, vec![]);
    }
    match &p.model {
        PriceModel::PerUnit {
            unit_price,
            package_size: None,
        } => (q * unit_price / p.per, Some(*unit_price), vec![]),
        PriceModel::PerUnit {
            unit_price,
            package_size: Some(size),
        } => {
            let packages = (q / (size * p.per)).ceil();
            (packages * unit_price, Some(*unit_price), vec![])
        }
        PriceModel::Graduated { tiers } => {
            let mut amount = Decimal::ZERO;
            let mut charges = Vec::new();
            let mut lower = Decimal::ZERO;
            for (i, t) in tiers.iter().enumerate() {
                if q <= lower {
                    break;
                }
                let upper = t.up_to.map(|u| f.of(u * p.per));
                let in_tier = match upper {
                    Some(u) => q.min(u) - lower,
                    None => q - lower,
                };
                let flat = f.of(t.flat_price);
                amount += in_tier * t.unit_price / p.per + flat;
                charges.push(TierCharge {
                    tier: i,
                    quantity: in_tier / p.per,
                    unit_price: t.unit_price,
                    flat_price: flat,
                });
                match upper {
                    Some(u) => lower = u,
                    None => break,
                }
            }
            (amount, None, charges)
        }
        PriceModel::Volume { tiers } => {
            let (i, t) = tiers
                .iter()
                .enumerate()
                .find(|(_, t)| t.up_to.is_none_or(|u| q <= f.of(u * p.per)))
                .expect("validated tiers end unbounded");
            let flat = f.of(t.flat_price);
            let charge = TierCharge {
                tier: i,
                quantity: q / p.per,
                unit_price: t.unit_price,
                flat_price: flat,
            };
            (
                q * t.unit_price / p.per + flat,
                Some(t.unit_price),
                vec![charge],
            )
        }
    }
}

/// Whether a price applies to a usage item: same meter, and the item has
/// every dimension value the price filters on.
/// Seat-seconds of `seats` inside `[start, end)` (interval lengths floored
/// as proration floors them).
pub fn seat_secs(seats: &[SeatInterval], start: DateTime<Utc>, end: DateTime<Utc>) -> i64 {
    seats
        .iter()
        .map(|iv| {
            let (a, b) = (iv.start.max(start), iv.end.min(end));
            if b > a {
                iv.seats as i64 * secs(a, b)
            } else {
                0
            }
        })
        .sum()
}

/// The meter quantity a price's per-seat allowance frees in a segment with
/// `seat_secs` seat-seconds of a period of `period_secs` (as a decimal):
/// `allowance_per_seat × per × seat_secs / period_secs`. None when the
/// price has no per-seat allowance.
pub fn seat_allowance(p: &MeterPrice, seat_secs: i64, period_secs: Decimal) -> Option<Decimal> {
    p.allowance_per_seat
        .map(|a| a * p.per * Decimal::from(seat_secs) / period_secs)
}

/// The price units a segment `[start, end)` of `period` gets free under
/// `p`: its per-seat allowance, else the first tier of a graduated price
/// whose first tier is free (a free tier's allowance, as rating applies
/// it to the segment's usage). None when the price frees nothing. Usage
/// alerts count against this.
pub fn free_units(
    p: &MeterPrice,
    seats: &[SeatInterval],
    period: &Period,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Option<Decimal> {
    let den = Decimal::from(secs(period.start, period.end).max(1));
    if let Some(q) = seat_allowance(p, seat_secs(seats, start, end), den) {
        return Some(q / p.per);
    }
    match &p.model {
        PriceModel::Graduated { tiers }
            if tiers.len() > 1
                && tiers[0].unit_price.is_zero()
                && tiers[0].flat_price.is_zero() =>
        {
            tiers[0].up_to
        }
        _ => None,
    }
}

pub fn matches(p: &MeterPrice, u: &UsageItem) -> bool {
    p.meter == u.meter && p.filter.iter().all(|(k, v)| u.dims.get(k) == Some(v))
}

/// A fee line's description: `"Team seats"`, `"Team seats (trial)"`.
fn fee_description(plan: &PlanVersion, what: &str, trial: bool) -> String {
    if trial {
        format!("{} {what} (trial)", plan.name)
    } else {
        format!("{} {what}", plan.name)
    }
}

/// Rates a period. Segments must be in order, inside the period and not
/// overlapping; they may leave gaps (no subscription then).
pub fn rate(
    period: &Period,
    segments: &[Segment],
    seats: &[SeatInterval],
) -> Result<Rated, RatingError> {
    let period_secs = secs(period.start, period.end);
    if period_secs <= 0 {
        return Err(RatingError::EmptyPeriod);
    }
    let mut prev_end = period.start;
    for (i, s) in segments.iter().enumerate() {
        if s.start < prev_end || s.end <= s.start || s.end > period.end {
            return Err(RatingError::BadSegment(i));
        }
        prev_end = s.end;
        if s.plan.currency != segments[0].plan.currency {
            return Err(RatingError::MixedCurrencies(
                segments[0].plan.currency.clone(),
                s.plan.currency.clone(),
            ));
        }
    }
    // Merge adjacent segments on the same plan version (by reference: no
    // plan or usage is copied).
    struct Merged<'a> {
        plan: &'a PlanVersion,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        usage: Vec<&'a UsageItem>,
        trial: bool,
    }
    let mut merged: Vec<Merged<'_>> = Vec::with_capacity(segments.len());
    for s in segments {
        match merged.last_mut() {
            Some(m) if m.end == s.start && *m.plan == s.plan && m.trial == s.trial => {
                m.end = s.end;
                m.usage.extend(s.usage.iter());
            }
            _ => merged.push(Merged {
                plan: &s.plan,
                start: s.start,
                end: s.end,
                usage: s.usage.iter().collect(),
                trial: s.trial,
            }),
        }
    }
    let den = Decimal::from(period_secs);
    let mut lines = Vec::new();
    for s in &merged {
        let plan = s.plan;
        let f = Frac {
            num: Decimal::from(secs(s.start, s.end)),
            den,
        };
        let round = |x: Decimal| {
            with_minor_units(
                snap(x).round_dp_with_strategy(plan.minor_units, plan.rounding.strategy()),
                plan.minor_units,
            )
        };
        let line = |kind, description: String| Line {
            kind,
            description,
            plan: plan.plan.clone(),
            plan_version: plan.version,
            segment_start: s.start,
            segment_end: s.end,
            meter: None,
            filter: BTreeMap::new(),
            events: 0,
            quantity: Decimal::ZERO,
            price_quantity: Decimal::ZERO,
            unit_price: None,
            tiers: vec![],
            amount_exact: Decimal::ZERO,
            amount: Decimal::ZERO,
            waived: None,
            advance: None,
        };
        // A fee line: charged, or in a trial waived (zero, with what it
        // would have cost as evidence).
        let fee = |l: Line, exact: Decimal| {
            if s.trial {
                Line {
                    amount: round(Decimal::ZERO),
                    waived: Some(round(exact)),
                    ..l
                }
            } else {
                Line {
                    amount_exact: snap(exact),
                    amount: round(exact),
                    ..l
                }
            }
        };
        let mut seg_lines = Vec::new();
        if !plan.flat_fee.is_zero() {
            let exact = f.of(plan.flat_fee);
            seg_lines.push(fee(
                Line {
                    quantity: f.num,
                    price_quantity: f.num / den,
                    unit_price: Some(plan.flat_fee),
                    ..line(
                        LineKind::FlatFee,
                        fee_description(plan, "flat fee", s.trial),
                    )
                },
                exact,
            ));
        }
        // Seat-seconds inside the segment: seat fees and per-seat allowances.
        let seat_secs = seat_secs(seats, s.start, s.end);
        if !plan.seat_fee.is_zero() && seat_secs > 0 {
            let q = Decimal::from(seat_secs);
            let exact = q * plan.seat_fee / den;
            seg_lines.push(fee(
                Line {
                    quantity: q,
                    price_quantity: q / den,
                    unit_price: Some(plan.seat_fee),
                    ..line(LineKind::SeatFee, fee_description(plan, "seats", s.trial))
                },
                exact,
            ));
        }
        let mut used = vec![false; s.usage.len()];
        for p in &plan.prices {
            let (mut q, mut events) = (Decimal::ZERO, 0u64);
            for (i, u) in s.usage.iter().enumerate() {
                if !used[i] && matches(p, u) {
                    used[i] = true;
                    q += u.quantity;
                    events += u.events;
                }
            }
            if q.is_zero() {
                continue;
            }
            let allowance = seat_allowance(p, seat_secs, den).unwrap_or_default();
            let (exact, unit_price, tiers) = price_amount(p, (q - allowance).max(Decimal::ZERO), f);
            let what = p.filter.values().cloned().collect::<Vec<_>>().join(", ");
            let description = if what.is_empty() {
                p.meter.clone()
            } else {
                format!("{} ({what})", p.meter)
            };
            seg_lines.push(Line {
                meter: Some(p.meter.clone()),
                filter: p.filter.clone(),
                events,
                quantity: q,
                price_quantity: q / p.per,
                unit_price,
                tiers,
                amount_exact: snap(exact),
                amount: round(exact),
                ..line(LineKind::Usage, description)
            });
        }
        let subtotal: Decimal = seg_lines.iter().map(|l| l.amount).sum();
        if let Some(min) = plan.minimum.filter(|_| !s.trial).map(|m| f.of(m)) {
            if subtotal < min {
                let exact = min - subtotal;
                seg_lines.push(Line {
                    amount_exact: snap(exact),
                    amount: round(exact),
                    ..line(
                        LineKind::MinimumTrueUp,
                        format!("{} minimum spend", plan.name),
                    )
                });
            }
        }
        if let Some(max) = plan.maximum.map(|m| f.of(m)) {
            if subtotal > max {
                let exact = max - subtotal;
                seg_lines.push(Line {
                    amount_exact: snap(exact),
                    amount: round(exact),
                    ..line(LineKind::MaximumCap, format!("{} spending cap", plan.name))
                });
            }
        }
        lines.extend(seg_lines);
    }
    let minor_units = segments
        .first()
        .map_or(DEFAULT_MINOR_UNITS, |s| s.plan.minor_units);
    let currency = segments
        .first()
        .map(|s| s.plan.currency.clone())
        .unwrap_or_default();
    Ok(Rated::of_lines(currency, minor_units, lines))
}
