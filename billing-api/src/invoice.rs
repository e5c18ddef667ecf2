//! Invoices: what one contains, how it is built from a rated period, late
//! usage and carried-forward amounts, and rating a customer's period from
//! stored state and stored usage (the draft for the open period, estimated
//! at any time, and the preview of a plan switch).
//!
//! An invoice for period P holds:
//! - the lines of P (rated with every plan segment, seat interval and usage
//!   of P);
//! - adjustment lines for late usage of the previous period P−1, when P−1
//!   was invoiced: P−1 is rated again with all its usage and the difference
//!   against what its invoice billed becomes lines naming that invoice
//!   (`adjust.rs`). Only P−1 can change: the collector accepts events from
//!   the start of the previous UTC month on, so by the time P is finalized
//!   (after P's end plus grace) nothing older than P can still arrive, and
//!   usage for P−1 that arrives after P is finalized is refused at ingest.
//! - the totals of earlier invoices that were below the payment provider's
//!   minimum charge and were carried forward instead of sent.
//!
//! `total = subtotal + adjustments_total + carried_in`, every part a sum of
//! lines already rounded to the minor unit.

use crate::state::{sync_status, Invoice, PlanSegment, StateResult, StateStore};
use crate::usage::{segment_usage_from, PeriodUsage};
use aggregator::UsageStore;
use billing_domain::adjust::{adjustments, AdjustmentLine, OriginalInvoice};
use billing_domain::catalog::PlanVersion;
use billing_domain::rating::{rate, Line, Period, Rated, SeatInterval, Segment};
use chrono::{DateTime, Datelike, TimeZone, Utc};
use rust_decimal::Decimal;
use schemas::MeterCatalog;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The calendar month (UTC) containing `t`: Tally's billing period.
pub fn month_of(t: DateTime<Utc>) -> Period {
    let start = Utc
        .with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
        .unwrap();
    Period {
        start,
        end: next_month(start),
    }
}

fn next_month(start: DateTime<Utc>) -> DateTime<Utc> {
    let (y, m) = if start.month() == 12 {
        (start.year() + 1, 1)
    } else {
        (start.year(), start.month() + 1)
    };
    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).unwrap()
}

/// The period before `p`.
pub fn previous(p: Period) -> Period {
    month_of(p.start - chrono::Duration::seconds(1))
}

/// The period after `p`.
pub fn following(p: Period) -> Period {
    month_of(p.end)
}

/// A period written `YYYY-MM` (the UTC calendar month), as the draft
/// endpoint's `?period=` takes it; None unless exactly that form.
pub fn parse_month(s: &str) -> Option<Period> {
    let (y, m) = s.split_once('-')?;
    if y.len() != 4 || m.len() != 2 || !(y.bytes().chain(m.bytes())).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (y, m): (i32, u32) = (y.parse().ok()?, m.parse().ok()?);
    let start = Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).single()?;
    Some(month_of(start))
}

/// A period as `YYYY-MM` (its start's month).
pub fn month_label(p: Period) -> String {
    p.start.format("%Y-%m").to_string()
}

/// Invoice numbers: a fixed prefix and the gapless sequence.
pub fn invoice_number(seq: i64) -> String {
    format!("TALLY-{seq:06}")
}

/// Stable invoice id for a customer's period.
pub fn invoice_id(customer: &str, period: Period) -> String {
    format!("inv_{}_{}", customer, period.start.format("%Y%m"))
}

/// The previous period as re-rated when this invoice was built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdjustedPeriod {
    pub invoice_id: String,
    pub invoice_number: String,
    pub rerated: Rated,
}

/// An earlier invoice whose total is added to this one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CarriedInvoice {
    pub invoice_id: String,
    pub invoice_number: String,
    pub total: Decimal,
}

/// Everything an invoice says, with its evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InvoiceBody {
    /// The period's own lines (each with events, quantity, prices, tiers).
    pub lines: Vec<Line>,
    pub adjustments: Vec<AdjustmentLine>,
    /// The re-rating behind `adjustments`, kept as evidence.
    pub adjusted: Option<AdjustedPeriod>,
    pub carried: Vec<CarriedInvoice>,
}

/// An invoice before it is numbered: the draft of an open period, or what
/// the finalizer writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewInvoice {
    pub id: String,
    pub customer_id: String,
    pub period: Period,
    pub currency: String,
    pub subtotal: Decimal,
    pub adjustments_total: Decimal,
    pub carried_in: Decimal,
    pub total: Decimal,
    pub body: InvoiceBody,
    /// What finalization will do with it: `pending` (send), `carried_forward`
    /// (below the minimum charge) or `nothing_due` (zero).
    pub sync_status: String,
}

/// The rating a finalized invoice billed for its own period.
pub fn billed(inv: &Invoice) -> Rated {
    Rated {
        currency: inv.currency.clone(),
        // The subtotal was written with the currency's digits.
        minor_units: inv.subtotal.scale(),
        lines: inv.body.lines.clone(),
        total: inv.subtotal,
    }
}

/// Builds the invoice of `period` from its rating, the previous period's
/// invoice with that period re-rated now, and carried-forward invoices.
/// `min_charge` is the smallest total the payment provider collects.
pub fn build(
    customer: &str,
    period: Period,
    rated: Rated,
    previous: Option<(&Invoice, Rated)>,
    carried: &[Invoice],
    min_charge: Decimal,
) -> NewInvoice {
    let (adjs, adjusted) = match previous {
        Some((inv, rerated)) => {
            let original = OriginalInvoice {
                number: inv.number.clone(),
                period: inv.period,
            };
            let adjs = adjustments(&billed(inv), &rerated, &original);
            let adjusted = (!adjs.is_empty()).then(|| AdjustedPeriod {
                invoice_id: inv.id.clone(),
                invoice_number: inv.number.clone(),
                rerated,
            });
            (adjs, adjusted)
        }
        None => (vec![], None),
    };
    let adjustments_total = rated.money(adjs.iter().map(|a| a.amount).sum());
    let carried: Vec<CarriedInvoice> = carried
        .iter()
        .filter(|c| c.customer_id == customer && c.period.start < period.start)
        .map(|c| CarriedInvoice {
            invoice_id: c.id.clone(),
            invoice_number: c.number.clone(),
            total: c.total,
        })
        .collect();
    let carried_in = rated.money(carried.iter().map(|c| c.total).sum());
    let total = rated.money(rated.total + adjustments_total + carried_in);
    let status = if total.is_zero() {
        sync_status::NOTHING_DUE
    } else if total < min_charge {
        sync_status::CARRIED_FORWARD
    } else {
        sync_status::PENDING
    };
    NewInvoice {
        id: invoice_id(customer, period),
        customer_id: customer.to_owned(),
        period,
        currency: rated.currency.clone(),
        subtotal: rated.money(rated.total),
        adjustments_total,
        carried_in,
        total,
        body: InvoiceBody {
            lines: rated.lines,
            adjustments: adjs,
            adjusted,
            carried,
        },
        sync_status: status.to_owned(),
    }
}

/// Plan versions by (plan, version), loaded from the state store once each.
#[derive(Default)]
pub struct PlanCache(HashMap<(String, u32), PlanVersion>);

impl PlanCache {
    pub async fn get(
        &mut self,
        state: &dyn StateStore,
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
    state: &dyn StateStore,
    usage: &dyn UsageStore,
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
    state: &dyn StateStore,
    usage: &dyn UsageStore,
    meters: &MeterCatalog,
    customer: &str,
    period: Period,
    switch: Option<&PlannedSwitch>,
) -> anyhow::Result<Rated> {
    rate_stored(state, usage, meters, customer, period, switch, false).await
}

async fn rate_stored(
    state: &dyn StateStore,
    usage: &dyn UsageStore,
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
    state: &dyn StateStore,
    usage: &dyn UsageStore,
    meters: &MeterCatalog,
    customer: &str,
    period: Period,
    min_charge: Decimal,
) -> anyhow::Result<NewInvoice> {
    let rated = rate_period(state, usage, meters, customer, period, None).await?;
    let prev = previous(period);
    let prev_inv = state
        .invoices_of(customer)
        .await?
        .into_iter()
        .find(|i| i.period == prev);
    let previous = match &prev_inv {
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
    Ok(build(
        customer, period, rated, previous, &carried, min_charge,
    ))
}

/// Re-rates a finalized invoice's period from raw events (not rollups), with
/// the plan versions and seats it was billed with. Equal to the invoice's
/// own lines when no late usage arrived since.
pub async fn rerate(
    state: &dyn StateStore,
    usage: &dyn UsageStore,
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
    fn periods_are_written_yyyy_mm() {
        let nov = parse_month("2026-11").unwrap();
        assert_eq!(
            nov.start,
            Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(nov.end, Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap());
        assert_eq!(month_label(nov), "2026-11");
        let dec = parse_month("2026-12").unwrap();
        assert_eq!(dec.end, Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap());
        assert_eq!(previous(dec), nov);
        for bad in [
            "",
            "2026",
            "2026-1",
            "2026-13",
            "2026-00",
            "26-11",
            "2026-11-01",
            "2026/11",
            "+026-11",
            "2026-1a",
            " 2026-11",
            "２０２６-11",
        ] {
            assert_eq!(parse_month(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_switch_cuts_the_history() {
        let d = |day| Utc.with_ymd_and_hms(2026, 11, day, 0, 0, 0).unwrap();
        let period = Period {
            start: d(1),
            end: Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
        };
        let seg = |p: &str, a, b| PlanSegment {
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
                    plan: "business".into(),
                    version: 2,
                    start: d(5),
                    end: period.end
                }
            ]
        );
    }
}
