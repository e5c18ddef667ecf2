//! Rating a customer's period from stored state and stored usage: the
//! draft for the open period, estimated at any time, the preview of a plan
//! switch, and re-rating. What an invoice holds and how it is built is
//! [`billing_domain::invoice`], re-exported here.

pub use billing_domain::invoice::*;

use crate::state::{PlanSegment, StateResult, StateStore};
use crate::usage::{segment_usage_from, PeriodUsage};
use aggregator::UsageStore;
use billing_domain::advance;
use billing_domain::catalog::PlanVersion;
use billing_domain::credit::Grant;
use billing_domain::rating::{rate, Period, Rated, SeatInterval, Segment};
use billing_domain::settle::{self, Applied, Settlement, TaxProfile, TaxRate};
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

/// What a rating is for (fees in advance, `billing_domain::advance`).
#[derive(Clone, Copy)]
pub enum Billing<'a> {
    /// What the period costs, every fee prorated to its segments (drafts
    /// of cost, previews).
    Cost,
    /// The period's own rating without fees billed in advance: what an
    /// invoice's lines are delta-rated against (`advance::arrears`).
    Arrears,
    /// What the period's invoice bills: [`Billing::Arrears`], the changes
    /// to fees in advance, and the next period's fees from its start.
    Invoice(&'a NextFees),
}

/// The plan history and seats of the period after an invoice's (only what
/// is in force at its start is billed).
#[derive(Debug, Clone)]
pub struct NextFees {
    pub period: Period,
    pub segs: Vec<PlanSegment>,
    pub seats: Vec<SeatInterval>,
}

impl NextFees {
    /// Read from the state store for `customer`.
    pub async fn read(
        state: &(impl StateStore + ?Sized),
        customer: &str,
        period: Period,
    ) -> StateResult<Self> {
        Ok(NextFees {
            period,
            segs: state.plan_segments(customer, period).await?,
            seats: state.seat_intervals(customer, period).await?,
        })
    }
}

/// Segments of `segs` with their plan versions and no usage (for fees).
async fn fee_segments(
    state: &(impl StateStore + ?Sized),
    plans: &mut PlanCache,
    segs: &[PlanSegment],
) -> StateResult<Vec<Segment>> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        out.push(Segment {
            trial: s.trial,
            plan: plans.get(state, &s.plan, s.version).await?.clone(),
            start: s.start,
            end: s.end,
            usage: vec![],
        });
    }
    Ok(out)
}

/// Rates a customer's period from its plan segments and seats, for
/// `billing`; usage comes from `prefetched` when it holds the whole period
/// for the plan, else from the usage store (from raw events only when
/// `raw`).
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
    billing: Billing<'_>,
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
    let full = rate(&period, &segments, seats)?;
    Ok(match billing {
        Billing::Cost => full,
        Billing::Arrears => advance::arrears(full, &segments),
        Billing::Invoice(next) => {
            let next_segs = fee_segments(state, plans, &next.segs).await?;
            let n = advance::Next {
                period: next.period,
                segs: &next_segs,
                seats: &next.seats,
            };
            advance::invoice(full, period, &segments, seats, Some(&n))?
        }
    })
}

/// The opening invoices due in `period` (fees in advance starting there,
/// `advance::start_instants`), each as its instant and a rating of its
/// lines (`advance::opening`). `segs` and `seats` are the customer's read
/// over [`opening_window`], so that a start at the period's first instant
/// is told from a plan that runs on.
pub async fn openings_due(
    state: &(impl StateStore + ?Sized),
    plans: &mut PlanCache,
    period: Period,
    segs: &[PlanSegment],
    seats: &[SeatInterval],
) -> anyhow::Result<Vec<(DateTime<Utc>, Rated)>> {
    let segments = fee_segments(state, plans, segs).await?;
    let mut out = Vec::new();
    for t in advance::start_instants(&segments, seats, period) {
        out.push((t, advance::opening(period, &segments, seats, t)?));
    }
    Ok(out)
}

/// The span the plan history is read over to find the opening invoices of
/// `period`: from a second before it.
pub fn opening_window(period: Period) -> Period {
    Period {
        start: period.start - chrono::Duration::seconds(1),
        end: period.end,
    }
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
    rate_stored(
        state,
        usage,
        meters,
        customer,
        period,
        switch,
        false,
        Billing::Cost,
    )
    .await
}

/// Rates `customer`'s `period` from stored state for `billing`.
#[allow(clippy::too_many_arguments)]
async fn rate_stored(
    state: &(impl StateStore + ?Sized),
    usage: &(impl UsageStore + ?Sized),
    meters: &MeterCatalog,
    customer: &str,
    period: Period,
    switch: Option<&PlannedSwitch>,
    raw: bool,
    billing: Billing<'_>,
) -> anyhow::Result<Rated> {
    let mut segs = state.plan_segments(customer, period).await?;
    if let Some(sw) = switch {
        segs = with_switch(segs, sw, period);
    }
    let seats = state.seat_intervals(customer, period).await?;
    let mut plans = PlanCache::default();
    rate_segments(
        state, usage, meters, &mut plans, None, customer, period, segs, &seats, raw, billing,
    )
    .await
}

/// What `customer`'s invoice of `period` bills from stored state and usage
/// (`raw`: from raw events), the next period's fees in advance included.
pub async fn rate_invoice(
    state: &(impl StateStore + ?Sized),
    usage: &(impl UsageStore + ?Sized),
    meters: &MeterCatalog,
    customer: &str,
    period: Period,
    raw: bool,
) -> anyhow::Result<Rated> {
    let next = NextFees::read(state, customer, following(period)).await?;
    rate_stored(
        state,
        usage,
        meters,
        customer,
        period,
        None,
        raw,
        Billing::Invoice(&next),
    )
    .await
}

/// `customer`'s `period` rated without fees billed in advance: what its
/// invoice's lines are delta-rated against.
async fn rate_arrears(
    state: &(impl StateStore + ?Sized),
    usage: &(impl UsageStore + ?Sized),
    meters: &MeterCatalog,
    customer: &str,
    period: Period,
) -> anyhow::Result<Rated> {
    rate_stored(
        state,
        usage,
        meters,
        customer,
        period,
        None,
        false,
        Billing::Arrears,
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
    let rated = rate_invoice(state, usage, meters, customer, period, false).await?;
    let prev = previous(period);
    let mut invoices = state.invoices_of(customer).await?;
    invoices.retain(|i| i.kind == InvoiceKind::Period);
    let prev_inv = invoices.iter().find(|i| i.period == prev);
    let previous = match prev_inv {
        Some(inv) => Some((
            inv,
            rate_arrears(state, usage, meters, customer, prev).await?,
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
        let rerated = rate_arrears(state, usage, meters, customer, prev2).await?;
        add_earlier(&mut n, inv2, &baseline(inv2, prev_inv), rerated, min_charge);
    }
    // As finalization would settle it at the period's end (its credits cut
    // off where the usage period ends: a cancellation inside it).
    let until = usage_end(&state.plan_segments(customer, period).await?, period);
    Settling::read_one(state, customer)
        .await?
        .settle(&mut n, period.end, until, min_charge);
    Ok(n)
}

/// Re-rates a finalized invoice's period from raw events (not rollups), with
/// the plan versions and seats it was billed with: its own rating (what
/// [`billed`] reads off the invoice; equal when no late usage arrived
/// since) and its fees billed in advance (the lines [`billed`] leaves out,
/// re-derived from the plan history: equal always).
pub async fn rerate(
    state: &(impl StateStore + ?Sized),
    usage: &(impl UsageStore + ?Sized),
    meters: &MeterCatalog,
    inv: &Invoice,
) -> anyhow::Result<Rerated> {
    let c = &inv.customer_id;
    match inv.kind {
        InvoiceKind::Period => {
            let all = rate_invoice(state, usage, meters, c, inv.period, true).await?;
            let settlement = resettle(inv, &all.lines);
            let (advance, own): (Vec<_>, Vec<_>) =
                all.lines.into_iter().partition(|l| l.advance.is_some());
            Ok(Rerated {
                own: Rated::of_lines(all.currency, all.minor_units, own),
                advance,
                settlement,
            })
        }
        // One line of what was bought: nothing to derive again.
        InvoiceKind::TopUp => Ok(Rerated {
            own: billed(inv),
            advance: vec![],
            settlement: inv.body.settlement.clone(),
        }),
        InvoiceKind::Opening => {
            let period = inv.body.fees_period.unwrap_or(inv.period);
            let window = opening_window(period);
            let segs = state.plan_segments(c, window).await?;
            let seats = state.seat_intervals(c, window).await?;
            let mut plans = PlanCache::default();
            let due = openings_due(state, &mut plans, period, &segs, &seats).await?;
            let advance = due
                .into_iter()
                .find(|(t, _)| *t == inv.period.start)
                .map(|(_, r)| r.lines)
                .unwrap_or_default();
            let billed = billed(inv);
            Ok(Rerated {
                own: Rated::of_lines(billed.currency, billed.minor_units, vec![]),
                settlement: resettle(inv, &advance),
                advance,
            })
        }
    }
}

/// A finalized invoice rated again ([`rerate`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rerated {
    /// The period's own rating (usage, fees in arrears).
    pub own: Rated,
    /// Fees billed in advance: changes, the next period's fees, or an
    /// opening invoice's fees.
    pub advance: Vec<billing_domain::rating::Line>,
    /// Discounts, tax and credits settled again on the re-rated lines with
    /// what the invoice recorded it was settled with (`settled_with`).
    pub settlement: Option<Settlement>,
}

/// `inv`'s settlement computed again over `lines` (the re-rated lines, in
/// the invoice's order) and its adjustments and carried-in amount, from
/// the inputs it recorded; None when it recorded none.
fn resettle(inv: &Invoice, lines: &[billing_domain::rating::Line]) -> Option<Settlement> {
    let inputs = inv.body.settled_with.as_ref()?;
    Some(settle::settle(
        &charges(lines, &inv.body.adjustments),
        inv.carried_in,
        &inv.currency,
        digits(&inv.body, &inv.currency),
        inputs,
    ))
}

/// Where the usage an invoice of `period` bills ends: the period's end, or
/// a cancellation inside it (the end of its last segment). Credits must be
/// effective before it and not expired by it.
pub fn usage_end(segs: &[PlanSegment], period: Period) -> DateTime<Utc> {
    segs.iter()
        .map(|s| s.end)
        .max()
        .map_or(period.end, |e| e.min(period.end))
}

/// What settling invoices reads from the state: every customer's open
/// grants, applied coupons and tax profile, and the tax rates; read once
/// for a finalization pass or for one customer's draft.
#[derive(Debug, Default)]
pub struct Settling {
    grants: HashMap<String, Vec<Grant>>,
    applied: HashMap<String, Vec<Applied>>,
    profiles: HashMap<String, TaxProfile>,
    rates: Vec<TaxRate>,
}

impl Settling {
    /// Everyone's, with coupons not removed before `since`.
    pub async fn read_all(
        state: &(impl StateStore + ?Sized),
        since: DateTime<Utc>,
    ) -> anyhow::Result<Settling> {
        Ok(Settling {
            grants: state.open_grants_all().await?,
            applied: state.applied_all(since).await?,
            profiles: state.tax_profiles_all().await?,
            rates: state.tax_rates().await?,
        })
    }

    /// One customer's.
    pub async fn read_one(
        state: &(impl StateStore + ?Sized),
        customer: &str,
    ) -> anyhow::Result<Settling> {
        let one = |k: &str| k.to_owned();
        let mut s = Settling {
            rates: state.tax_rates().await?,
            ..Settling::default()
        };
        s.grants
            .insert(one(customer), state.grants_of(customer).await?);
        s.applied
            .insert(one(customer), state.coupons_of(customer).await?);
        if let Some(p) = state.tax_profile(customer).await? {
            s.profiles.insert(one(customer), p);
        }
        Ok(s)
    }

    /// What `customer`'s invoice in `currency` for a period ending at
    /// `period_end`, issued at `issued`, is settled with (credits cut off
    /// at `until`).
    pub fn inputs(
        &self,
        customer: &str,
        currency: &str,
        issued: DateTime<Utc>,
        period_end: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> settle::Inputs {
        settle::inputs(
            self.applied.get(customer).map(Vec::as_slice).unwrap_or(&[]),
            self.profiles.get(customer),
            &self.rates,
            self.grants.get(customer).map(Vec::as_slice).unwrap_or(&[]),
            currency,
            issued,
            period_end,
            until,
        )
    }

    /// Every grant of `customer` read (all of them for one customer's
    /// read, the open ones for everyone's).
    pub fn grants(&self, customer: &str) -> &[Grant] {
        self.grants.get(customer).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Settles `n` (`invoice::settle_invoice`): issued at `issued`, its
    /// credits cut off at `until`. What it consumes and redeems is taken
    /// off what this holds, so a second invoice of the customer settled
    /// from it (two opening invoices in one run) sees the balances and
    /// once-coupons as the first one leaves them.
    pub fn settle(
        &mut self,
        n: &mut NewInvoice,
        issued: DateTime<Utc>,
        until: DateTime<Utc>,
        min_charge: Decimal,
    ) {
        let end = n.body.fees_period.unwrap_or(n.period).end;
        let inputs = self.inputs(&n.customer_id, &n.currency, issued, end, until);
        settle_invoice(n, inputs, min_charge);
        let Some(s) = &n.body.settlement else {
            return;
        };
        if let Some(grants) = self.grants.get_mut(&n.customer_id) {
            for g in grants.iter_mut() {
                g.remaining = billing_domain::credit::after(g, &s.credits);
            }
        }
        if let Some(applied) = self.applied.get_mut(&n.customer_id) {
            for a in applied.iter_mut() {
                if s.discounts
                    .iter()
                    .any(|d| d.applied_id == a.id && settle::redeems(d))
                {
                    a.redeemed += 1;
                }
            }
        }
    }
}

impl Rerated {
    /// Whether it reproduces `inv` exactly, line by line.
    pub fn reproduces(&self, inv: &Invoice) -> bool {
        let ahead: Vec<_> = inv
            .body
            .lines
            .iter()
            .filter(|l| l.advance.is_some())
            .cloned()
            .collect();
        self.own == billed(inv) && self.advance == ahead && self.settlement == inv.body.settlement
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn credits_pay_usage_up_to_a_cancellation() {
        let d = |day| Utc.with_ymd_and_hms(2026, 11, day, 0, 0, 0).unwrap();
        let period = Period {
            start: d(1),
            end: Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
        };
        let seg = |a, b| PlanSegment {
            trial: false,
            plan: "payg".into(),
            version: 1,
            start: a,
            end: b,
        };
        assert_eq!(usage_end(&[seg(d(1), d(13))], period), d(13));
        assert_eq!(
            usage_end(&[seg(d(1), d(10)), seg(d(10), period.end)], period),
            period.end
        );
        // Segments reach past the period when nothing ends them.
        assert_eq!(
            usage_end(
                &[seg(d(1), period.end + chrono::Duration::days(40))],
                period
            ),
            period.end
        );
        assert_eq!(usage_end(&[], period), period.end);
    }

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
