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
use chrono::{DateTime, Datelike, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

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
    /// Usage timed in the period where the customer had no subscription
    /// (after a cancellation), per meter, as it stood when the invoice was
    /// finalized: reported, not billed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unbilled: Vec<crate::rating::UsageItem>,
    /// The digits its amounts were rounded to (the plan's `minor_units`).
    /// Absent on invoices written before it was recorded: see [`billed`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_units: Option<u32>,
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
    Rated {
        currency: inv.currency.clone(),
        minor_units,
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
        SyncStatus::NothingDue
    } else if total < min_charge {
        SyncStatus::CarriedForward
    } else {
        SyncStatus::Pending
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
            unbilled: vec![],
            minor_units: Some(rated.minor_units),
        },
        sync_status: status,
    }
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
    pub seq: i64,
    pub number: String,
    pub customer_id: String,
    pub period: Period,
    pub currency: String,
    pub subtotal: Decimal,
    pub adjustments_total: Decimal,
    pub carried_in: Decimal,
    pub total: Decimal,
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
            seq: 1,
            number: "TLY-000001".into(),
            customer_id: n.customer_id.clone(),
            period,
            currency: n.currency.clone(),
            // As both stores read zero back.
            subtotal: Decimal::ZERO,
            adjustments_total: Decimal::ZERO,
            carried_in: Decimal::ZERO,
            total: Decimal::ZERO,
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
