//! Invoices: what one contains, how it is built from a rated period, late
//! usage and carried-forward amounts, periods and numbering. Rating a
//! customer's period from stored state and usage (drafts, previews) is
//! billing-api's `invoice` module.
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

use crate::adjust::{adjustments, AdjustmentLine, OriginalInvoice};
use crate::catalog::currency_digits;
use crate::rating::{Line, Period, Rated};
use crate::settle::{settle, Charge, Inputs, Settlement};
use chrono::{DateTime, Datelike, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The calendar month (UTC) containing `t`: the billing period of a
/// customer on the default anchor day 1.
pub fn month_of(t: DateTime<Utc>) -> Period {
    period_of(t, 1)
}

/// The day a billing period starts on (1 to 31; 1, the default: calendar
/// months). A day past a month's end means that month's last day.
pub const ANCHOR_DAYS: std::ops::RangeInclusive<u32> = 1..=31;

/// 00:00 UTC of day `anchor` of month `m` of year `y`, or of the month's
/// last day when it has fewer days.
fn anchor_in(y: i32, m: u32, anchor: u32) -> DateTime<Utc> {
    let last = (28..=31)
        .rev()
        .find(|d| Utc.with_ymd_and_hms(y, m, *d, 0, 0, 0).single().is_some())
        .expect("every month has 28 days");
    Utc.with_ymd_and_hms(y, m, anchor.clamp(1, last), 0, 0, 0)
        .unwrap()
}

fn month_after(y: i32, m: u32) -> (i32, u32) {
    if m == 12 {
        (y + 1, 1)
    } else {
        (y, m + 1)
    }
}

fn month_before(y: i32, m: u32) -> (i32, u32) {
    if m == 1 {
        (y - 1, 12)
    } else {
        (y, m - 1)
    }
}

/// The billing period containing `t` for anchor day `anchor`: from one
/// anchor to the next, in UTC (BILLING-EXAMPLES example 10).
pub fn period_of(t: DateTime<Utc>, anchor: u32) -> Period {
    let (y, m) = (t.year(), t.month());
    let here = anchor_in(y, m, anchor);
    if t >= here {
        let (ny, nm) = month_after(y, m);
        Period {
            start: here,
            end: anchor_in(ny, nm, anchor),
        }
    } else {
        let (py, pm) = month_before(y, m);
        Period {
            start: anchor_in(py, pm, anchor),
            end: here,
        }
    }
}

/// The anchor day a billing period was cut with: the larger of its start
/// and end days (of two consecutive months one has 31 days, so one of the
/// two is never shortened).
pub fn anchor_of(p: Period) -> u32 {
    p.start.day().max(p.end.day())
}

/// The parts of `period` that no span covers (spans in order, inside the
/// period, not overlapping): where the customer had no subscription.
pub fn uncovered(
    period: Period,
    spans: impl IntoIterator<Item = (DateTime<Utc>, DateTime<Utc>)>,
) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    let mut out = Vec::new();
    let mut from = period.start;
    for (s, e) in spans {
        if s > from {
            out.push((from, s));
        }
        from = from.max(e);
    }
    if from < period.end {
        out.push((from, period.end));
    }
    out
}

/// The period before `p` (same anchor).
pub fn previous(p: Period) -> Period {
    period_of(p.start - chrono::Duration::seconds(1), anchor_of(p))
}

/// The period after `p` (same anchor).
pub fn following(p: Period) -> Period {
    period_of(p.end, anchor_of(p))
}

/// The period of anchor day `anchor` that starts in the calendar month
/// `month` (any period: each month has exactly one anchor).
pub fn starting_in(month: Period, anchor: u32) -> Period {
    period_of(
        anchor_in(month.start.year(), month.start.month(), anchor),
        anchor,
    )
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

/// A period as `YYYY-MM` (its start's month: with an anchor day other
/// than 1, the period that starts in that month).
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

/// Stable id of the opening invoice of fees in advance starting at `t`
/// (`advance::opening`): the instant to the microsecond, so two starts in
/// one period (a reactivation, a trial's end) have two.
pub fn opening_id(customer: &str, t: DateTime<Utc>) -> String {
    format!("inv_{}_{}_open", customer, t.format("%Y%m%dT%H%M%S%6fZ"))
}

/// Stable id of the top-up invoice of credit grant `grant`.
pub fn top_up_id(customer: &str, grant: &str) -> String {
    format!("inv_{customer}_topup_{grant}")
}

/// The top-up invoice of a purchased grant of `amount` in `currency`
/// recorded at `at`: one line, no discount, tax or credit (the tax of
/// what credit pays is on the invoices that consume it), its period the
/// instant it was bought.
pub fn build_top_up(
    customer: &str,
    grant: &str,
    amount: Decimal,
    currency: &str,
    at: DateTime<Utc>,
    reason: &str,
) -> NewInvoice {
    let dp = currency_digits(currency);
    let amount = crate::rating::with_minor_units(amount, dp);
    let line = Line {
        kind: crate::rating::LineKind::TopUp,
        description: match reason {
            "" => "Prepaid credit".to_owned(),
            r => format!("Prepaid credit: {r}"),
        },
        plan: String::new(),
        plan_version: 0,
        segment_start: at,
        segment_end: at,
        meter: None,
        filter: Default::default(),
        events: 0,
        quantity: Decimal::ONE,
        price_quantity: Decimal::ONE,
        unit_price: Some(amount),
        tiers: vec![],
        amount_exact: amount,
        amount,
        waived: None,
        advance: None,
    };
    let rated = Rated::of_lines(currency.to_owned(), dp, vec![line]);
    let period = Period { start: at, end: at };
    NewInvoice {
        id: top_up_id(customer, grant),
        kind: InvoiceKind::TopUp,
        ..build(customer, period, rated, None, &[], Decimal::ZERO)
    }
}

crate::named! {
    /// What an invoice is for, stored and answered as its name. A customer
    /// has at most one `period` invoice per period and one `opening`
    /// invoice per start of fees in advance.
    pub enum InvoiceKind ("invoice kind") {
        /// A period's invoice, issued after it ends (or at a cancellation
        /// plus grace): its usage, fees in arrears, changes to fees in
        /// advance, and the next period's fees in advance.
        Period => "period",
        /// Fees in advance from where they start (a new subscription, a
        /// reactivation, a trial's end) to the period's end, issued at once.
        Opening => "opening",
        /// Prepaid credit bought on its own: written with its purchased
        /// grant, which is usable once this invoice is paid.
        TopUp => "top_up",
    }
}

impl Default for InvoiceKind {
    fn default() -> Self {
        InvoiceKind::Period
    }
}

/// The previous period as re-rated when this invoice was built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdjustedPeriod {
    pub invoice_id: String,
    pub invoice_number: String,
    pub rerated: Rated,
}

/// An earlier invoice whose amount due (below the minimum charge) is added
/// to this one; `total` is that amount due.
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
    /// Usage timed in the period where the customer had no subscription
    /// (after a cancellation), per meter, as it stood when the invoice was
    /// finalized: reported, not billed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unbilled: Vec<crate::rating::UsageItem>,
    /// The period two back re-rated when this invoice was built, when late
    /// usage reached it after the invoice between them (`add_earlier`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adjusted_earlier: Option<AdjustedPeriod>,
    /// The digits its amounts were rounded to (the plan's `minor_units`).
    /// Absent on invoices written before it was recorded: see [`billed`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_units: Option<u32>,
    /// Of an opening invoice: the billing period its fees are part of (the
    /// invoice's own period runs from where they start to its end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fees_period: Option<Period>,
    /// Discounts, tax and credits after the charges (`settle`), when any
    /// applied or the customer has a tax profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settlement: Option<Settlement>,
    /// What the settlement was computed from (the coupons applied, the tax
    /// rates and profile's treatment, the grants with their balances before
    /// this invoice): re-rating settles the re-rated charges with them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_with: Option<Inputs>,
}

/// An invoice before it is numbered: the draft of an open period, or what
/// the finalizer writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewInvoice {
    pub id: String,
    #[serde(default)]
    pub kind: InvoiceKind,
    pub customer_id: String,
    pub period: Period,
    pub currency: String,
    pub subtotal: Decimal,
    pub adjustments_total: Decimal,
    /// Σ discount lines (≤ 0).
    #[serde(default)]
    pub discount_total: Decimal,
    /// Σ exclusive tax lines.
    #[serde(default)]
    pub tax_total: Decimal,
    pub carried_in: Decimal,
    /// `subtotal + adjustments_total + discount_total + tax_total + carried_in`.
    pub total: Decimal,
    /// Σ credits consumed (≤ 0).
    #[serde(default)]
    pub credit_total: Decimal,
    /// `total + credit_total`: what is sent for payment (or carried, or,
    /// when zero, settled by credits).
    #[serde(default)]
    pub amount_due: Decimal,
    pub body: InvoiceBody,
    /// What finalization will do with it: `pending` (send), `carried_forward`
    /// (below the minimum charge) or `nothing_due` (zero).
    pub sync_status: SyncStatus,
}

/// The rating a finalized invoice billed for its own period, with the
/// digits it was rounded to as recorded in its body. An invoice written
/// before they were recorded: a non-zero subtotal keeps them as its scale;
/// a zero one does not (both stores write zero as `0`), so it takes its
/// currency's.
pub fn billed(inv: &Invoice) -> Rated {
    let minor_units = inv.body.minor_units.unwrap_or_else(|| {
        if inv.subtotal.is_zero() {
            currency_digits(&inv.currency)
        } else {
            inv.subtotal.scale()
        }
    });
    // Fees billed in advance are not the period's own rating: late usage
    // is delta-rated against the rest (`advance::arrears`).
    let lines: Vec<Line> = inv
        .body
        .lines
        .iter()
        .filter(|l| l.advance.is_none())
        .cloned()
        .collect();
    if lines.len() == inv.body.lines.len() {
        // The subtotal as stored (an invoice of no lines: zero at the
        // recorded digits, whatever its scale).
        return Rated {
            currency: inv.currency.clone(),
            minor_units,
            lines,
            total: inv.subtotal,
        };
    }
    Rated::of_lines(inv.currency.clone(), minor_units, lines)
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
        // Earlier periods' invoices, and opening invoices of this period
        // (their span starts inside it).
        .filter(|c| {
            c.customer_id == customer
                && (c.period.start < period.start
                    || (c.kind == InvoiceKind::Opening && c.period.end <= period.end))
        })
        .map(|c| CarriedInvoice {
            invoice_id: c.id.clone(),
            invoice_number: c.number.clone(),
            total: c.amount_due,
        })
        .collect();
    let carried_in = rated.money(carried.iter().map(|c| c.total).sum());
    let total = rated.money(rated.total + adjustments_total + carried_in);
    let status = status_of(total, min_charge);
    NewInvoice {
        id: invoice_id(customer, period),
        kind: InvoiceKind::Period,
        customer_id: customer.to_owned(),
        period,
        currency: rated.currency.clone(),
        subtotal: rated.money(rated.total),
        adjustments_total,
        discount_total: rated.money(Decimal::ZERO),
        tax_total: rated.money(Decimal::ZERO),
        carried_in,
        total,
        credit_total: rated.money(Decimal::ZERO),
        amount_due: total,
        body: InvoiceBody {
            lines: rated.lines,
            adjustments: adjs,
            adjusted,
            carried,
            unbilled: vec![],
            adjusted_earlier: None,
            minor_units: Some(rated.minor_units),
            fees_period: None,
            settlement: None,
            settled_with: None,
        },
        sync_status: status,
    }
}

/// The opening invoice of fees in advance starting at `t` in `period`
/// (`advance::opening` gives `rated`'s lines): for `[t, period.end)`, with
/// the carried-forward invoices added like any invoice.
pub fn build_opening(
    customer: &str,
    period: Period,
    t: DateTime<Utc>,
    rated: Rated,
    carried: &[Invoice],
    min_charge: Decimal,
) -> NewInvoice {
    let span = Period {
        start: t,
        end: period.end,
    };
    let mut n = build(customer, span, rated, None, carried, min_charge);
    n.body.fees_period = Some(period);
    NewInvoice {
        id: opening_id(customer, t),
        kind: InvoiceKind::Opening,
        ..n
    }
}

/// The charges discounts and tax work on: an invoice's lines and its
/// late-usage adjustments, in that order.
pub fn charges(lines: &[Line], adjustments: &[crate::adjust::AdjustmentLine]) -> Vec<Charge> {
    let lines = lines.iter().map(|l| Charge {
        kind: l.kind,
        meter: l.meter.clone(),
        amount: l.amount,
    });
    let adjs = adjustments.iter().map(|a| Charge {
        kind: a.kind,
        meter: a.meter.clone(),
        amount: a.amount,
    });
    lines.chain(adjs).collect()
}

/// The digits an invoice's amounts are rounded to.
pub fn digits(body: &InvoiceBody, currency: &str) -> u32 {
    body.minor_units
        .unwrap_or_else(|| currency_digits(currency))
}

/// Settles `n` (built, with its adjustments): discounts, tax and credits
/// from `inputs` (`settle::settle`), then its total, amount due and what
/// finalization does with it. An amount due of zero is settled (by
/// credits, or there was nothing) and not sent. The settlement and its
/// inputs are kept in the body unless nothing applied.
pub fn settle_invoice(n: &mut NewInvoice, mut inputs: Inputs, min_charge: Decimal) {
    let dp = digits(&n.body, &n.currency);
    if let Some(until) = inputs.until {
        inputs
            .grants
            .retain(|g| crate::credit::can_pay(g, &n.currency, until));
    }
    let s = settle(
        &charges(&n.body.lines, &n.body.adjustments),
        n.carried_in,
        &n.currency,
        dp,
        &inputs,
    );
    let money = |x: Decimal| crate::rating::with_minor_units(x, dp);
    n.discount_total = s.discount_total;
    n.tax_total = s.tax_total;
    n.total =
        money(n.subtotal + n.adjustments_total + s.discount_total + s.tax_total + n.carried_in);
    n.credit_total = s.credit_total;
    n.amount_due = money(n.total + s.credit_total);
    n.sync_status = status_of(n.amount_due, min_charge);
    let nothing = s.discounts.is_empty()
        && s.taxes.is_empty()
        && s.credits.is_empty()
        && s.treatment.is_none();
    if nothing {
        n.body.settlement = None;
        n.body.settled_with = None;
    } else {
        n.body.settlement = Some(s);
        n.body.settled_with = Some(inputs);
    }
}

/// What finalization does with a total: nothing when zero, carry it when
/// below the provider's minimum charge, send it otherwise.
fn status_of(total: Decimal, min_charge: Decimal) -> SyncStatus {
    if total.is_zero() {
        SyncStatus::NothingDue
    } else if total < min_charge {
        SyncStatus::CarriedForward
    } else {
        SyncStatus::Pending
    }
}

/// When events timed before `end` stop being accepted: the collector takes
/// events from the start of the previous calendar month on, so an event of
/// month M can arrive until M+1 ends.
pub fn ingest_closes(end: DateTime<Utc>) -> DateTime<Utc> {
    following(month_of(end - chrono::Duration::microseconds(1))).end
}

/// What an earlier invoice stands at now: the latest re-rating of its
/// period recorded by the invoice after it (`next`, whose `adjusted` it
/// is), else what it billed.
pub fn baseline(inv: &Invoice, next: Option<&Invoice>) -> Rated {
    next.and_then(|n| n.body.adjusted.as_ref())
        .filter(|a| a.invoice_id == inv.id)
        .map(|a| a.rerated.clone())
        .unwrap_or_else(|| billed(inv))
}

/// Whether the invoice two periods back (`earlier`) can have late usage
/// its successor `next` did not adjust: `next` was finalized before events
/// of `earlier`'s period stopped being accepted (a billing anchor day other
/// than 1, or a final invoice written before its period ended), or there
/// is no `next` (a cancelled customer whose last period changed nothing).
pub fn needs_earlier(earlier: &Invoice, next: Option<&Invoice>) -> bool {
    next.is_none_or(|n| n.finalized_at < ingest_closes(earlier.period.end))
}

/// Adds to `n` the adjustments of the period two back (`earlier`, standing
/// at `baseline` since its last re-rating, re-rated now as `rerated`), so
/// late usage that arrived after the invoice between them is billed too.
pub fn add_earlier(
    n: &mut NewInvoice,
    earlier: &Invoice,
    baseline: &Rated,
    rerated: Rated,
    min_charge: Decimal,
) {
    let original = OriginalInvoice {
        number: earlier.number.clone(),
        period: earlier.period,
    };
    let adjs = adjustments(baseline, &rerated, &original);
    if adjs.is_empty() {
        return;
    }
    let money = |x: Decimal| crate::rating::with_minor_units(x, baseline.minor_units);
    let more: Decimal = adjs.iter().map(|a| a.amount).sum();
    n.adjustments_total = money(n.adjustments_total + more);
    n.total = money(n.subtotal + n.adjustments_total + n.carried_in);
    n.amount_due = n.total;
    n.sync_status = status_of(n.total, min_charge);
    n.body.adjustments.extend(adjs);
    n.body.adjusted_earlier = Some(AdjustedPeriod {
        invoice_id: earlier.id.clone(),
        invoice_number: earlier.number.clone(),
        rerated,
    });
}

crate::named! {
    /// Delivery of a finalized invoice to the payment provider, stored and
    /// answered as its snake_case name (`carried_forward`).
    pub enum SyncStatus ("sync status") {
        /// Waiting to be sent to Stripe (or Stripe sync is off).
        Pending => "pending",
        Synced => "synced",
        /// Below the minimum charge: not sent, added to the next invoice.
        CarriedForward => "carried_forward",
        /// Total zero: nothing to send.
        NothingDue => "nothing_due",
        /// Sent but Stripe's total disagrees, or Stripe refused it; needs a human.
        Failed => "failed",
    }
}

crate::named! {
    /// Whether a finalized invoice is paid, as Stripe's webhooks report it
    /// (`webhook::payment_status`).
    pub enum PaymentStatus ("payment status") {
        /// Not (yet) reported paid.
        Open => "open",
        Paid => "paid",
        PaymentFailed => "payment_failed",
        Void => "void",
    }
}

/// A finalized invoice: immutable except for its status fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Invoice {
    pub id: String,
    #[serde(default)]
    pub kind: InvoiceKind,
    pub seq: i64,
    pub number: String,
    pub customer_id: String,
    pub period: Period,
    pub currency: String,
    pub subtotal: Decimal,
    pub adjustments_total: Decimal,
    pub discount_total: Decimal,
    pub tax_total: Decimal,
    pub carried_in: Decimal,
    /// Before credits.
    pub total: Decimal,
    pub credit_total: Decimal,
    /// After credits: what is owed (or, negative, refunded).
    pub amount_due: Decimal,
    pub body: InvoiceBody,
    pub finalized_at: DateTime<Utc>,
    pub sync_status: SyncStatus,
    pub stripe_invoice_id: Option<String>,
    pub carried_to: Option<String>,
    /// From Stripe's webhooks.
    pub payment_status: PaymentStatus,
    pub sync_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn sync_statuses_read_back_their_names() {
        for s in SyncStatus::ALL {
            assert_eq!(s.as_str().parse::<SyncStatus>(), Ok(*s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        let names: Vec<&str> = PaymentStatus::ALL.iter().map(|p| p.as_str()).collect();
        assert_eq!(names, ["open", "paid", "payment_failed", "void"]);
        for p in PaymentStatus::ALL {
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        assert!("bogus".parse::<SyncStatus>().is_err());
    }

    /// An invoice of nothing (a month without usage on payg) is stored with
    /// a subtotal of `0`, scale 0: what it billed is still rounded to the
    /// plan's digits, so re-rating it reproduces it and late usage is
    /// adjusted in cents, not whole units.
    #[test]
    fn a_zero_invoice_bills_with_the_plans_digits() {
        let period = parse_month("2026-11").unwrap();
        let rated = Rated {
            currency: "USD".into(),
            minor_units: 2,
            lines: vec![],
            total: Decimal::new(0, 2),
        };
        let n = build(
            "cus_z",
            period,
            rated.clone(),
            None,
            &[],
            Decimal::new(50, 2),
        );
        assert_eq!(n.body.minor_units, Some(2));
        let stored = |body: InvoiceBody| Invoice {
            id: n.id.clone(),
            kind: InvoiceKind::Period,
            seq: 1,
            number: "TLY-000001".into(),
            customer_id: n.customer_id.clone(),
            period,
            currency: n.currency.clone(),
            // As both stores read zero back.
            subtotal: Decimal::ZERO,
            adjustments_total: Decimal::ZERO,
            discount_total: Decimal::ZERO,
            tax_total: Decimal::ZERO,
            carried_in: Decimal::ZERO,
            total: Decimal::ZERO,
            credit_total: Decimal::ZERO,
            amount_due: Decimal::ZERO,
            body,
            finalized_at: period.end,
            sync_status: n.sync_status,
            stripe_invoice_id: None,
            carried_to: None,
            payment_status: PaymentStatus::ALL[0],
            sync_error: None,
        };
        assert_eq!(billed(&stored(n.body.clone())).minor_units, 2);
        assert_eq!(
            billed(&stored(n.body.clone())),
            Rated {
                total: Decimal::ZERO,
                ..rated
            }
        );
        // Written before the digits were recorded: the currency's (JPY: 0).
        let legacy = InvoiceBody {
            minor_units: None,
            ..n.body.clone()
        };
        assert_eq!(billed(&stored(legacy.clone())).minor_units, 2);
        let mut yen = stored(legacy);
        yen.currency = "JPY".into();
        assert_eq!(billed(&yen).minor_units, 0);
    }

    #[test]
    fn anchor_days_cut_periods_from_anchor_to_anchor() {
        let at = |y, m, d| Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap();
        // Example 10: anchor 31 from Jan 31 2027.
        let mut p = period_of(at(2027, 1, 31), 31);
        let mut got = vec![];
        for _ in 0..4 {
            got.push((p.start, p.end));
            assert_eq!(anchor_of(p), 31);
            p = following(p);
        }
        assert_eq!(
            got,
            [
                (at(2027, 1, 31), at(2027, 2, 28)),
                (at(2027, 2, 28), at(2027, 3, 31)),
                (at(2027, 3, 31), at(2027, 4, 30)),
                (at(2027, 4, 30), at(2027, 5, 31)),
            ]
        );
        assert_eq!(
            previous(period_of(at(2027, 3, 10), 31)).start,
            at(2027, 1, 31)
        );
        // A leap February, anchor 30; an instant just before an anchor.
        assert_eq!(
            period_of(at(2028, 2, 29), 30),
            Period {
                start: at(2028, 2, 29),
                end: at(2028, 3, 30)
            }
        );
        assert_eq!(
            period_of(at(2026, 12, 15) - chrono::Duration::seconds(1), 15),
            Period {
                start: at(2026, 11, 15),
                end: at(2026, 12, 15)
            }
        );
        // Across the year; anchor 1 is the calendar month.
        assert_eq!(
            following(period_of(at(2026, 12, 20), 15)).start,
            at(2027, 1, 15)
        );
        for d in 1..=28 {
            let t = at(2026, 11, d);
            assert_eq!(period_of(t, 1), month_of(t));
        }
        // Every anchor: periods tile the years and keep their anchor.
        for a in ANCHOR_DAYS {
            let mut p = period_of(at(2026, 1, 1), a);
            for _ in 0..30 {
                let n = following(p);
                assert_eq!((n.start, anchor_of(n), previous(n)), (p.end, a, p));
                assert!(n.end > n.start);
                p = n;
            }
            let dec = starting_in(parse_month("2026-12").unwrap(), a);
            assert_eq!(dec.start.month(), 12);
        }
    }

    #[test]
    fn late_usage_two_periods_back_is_adjusted_only_when_it_can_arrive() {
        let at = |y, m, d| Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap();
        // Events of November are accepted until December ends.
        assert_eq!(ingest_closes(at(2026, 12, 1)), at(2027, 1, 1));
        assert_eq!(ingest_closes(at(2026, 12, 15)), at(2027, 2, 1));
        assert_eq!(ingest_closes(at(2026, 11, 15)), at(2027, 1, 1));
        let inv = |p: Period, finalized_at| Invoice {
            id: invoice_id("c", p),
            kind: InvoiceKind::Period,
            seq: 1,
            number: "TALLY-000001".into(),
            customer_id: "c".into(),
            period: p,
            currency: "USD".into(),
            subtotal: Decimal::ZERO,
            adjustments_total: Decimal::ZERO,
            discount_total: Decimal::ZERO,
            tax_total: Decimal::ZERO,
            carried_in: Decimal::ZERO,
            total: Decimal::ZERO,
            credit_total: Decimal::ZERO,
            amount_due: Decimal::ZERO,
            body: InvoiceBody {
                lines: vec![],
                adjustments: vec![],
                adjusted: None,
                carried: vec![],
                unbilled: vec![],
                adjusted_earlier: None,
                minor_units: Some(2),
                fees_period: None,
                settlement: None,
                settled_with: None,
            },
            finalized_at,
            sync_status: SyncStatus::Pending,
            stripe_invoice_id: None,
            carried_to: None,
            payment_status: PaymentStatus::Open,
            sync_error: None,
        };
        // Calendar months: October's successor is finalized when
        // October's events are already refused.
        let oct = parse_month("2026-10").unwrap();
        let nov = parse_month("2026-11").unwrap();
        let (o, n) = (inv(oct, oct.end), inv(nov, nov.end));
        assert!(!needs_earlier(&o, Some(&n)));
        // Anchor day 15: the successor is finalized on Dec 15, events of
        // Nov 1–15 still arrive until Dec 31.
        let a = period_of(at(2026, 11, 1), 15);
        let b = following(a);
        assert!(needs_earlier(&inv(a, a.end), Some(&inv(b, b.end))));
        // A final invoice written inside its period; no successor at all.
        assert!(needs_earlier(&o, Some(&inv(nov, at(2026, 11, 13)))));
        assert!(needs_earlier(&o, None));
        // The baseline: the successor's re-rating of it, else what it billed.
        let mut next = inv(nov, nov.end);
        assert_eq!(baseline(&o, Some(&next)), billed(&o));
        let rerated = Rated {
            currency: "USD".into(),
            minor_units: 2,
            lines: vec![],
            total: Decimal::new(40, 2),
        };
        next.body.adjusted = Some(AdjustedPeriod {
            invoice_id: o.id.clone(),
            invoice_number: o.number.clone(),
            rerated: rerated.clone(),
        });
        assert_eq!(baseline(&o, Some(&next)), rerated);
    }

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
}
