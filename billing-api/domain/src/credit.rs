//! Credit grants and their ledger: which grants may pay an invoice, in
//! what order they are consumed, and what a balance is.
//!
//! A grant is an amount in one currency, `promotional` or `purchased`,
//! effective from an instant, optionally expiring, with a priority (a lower
//! number is consumed first, after the earliest expiry). A purchased grant
//! invoiced on its own (a top-up) is usable once that invoice is paid.
//!
//! The ledger is append-only: a `grant` entry (+amount), then
//! `consumption` entries naming the invoice that consumed them, at most one
//! `void` of the unused remainder and at most one `expiry` of what was
//! left when it expired (all negative). A grant's remaining balance is the
//! sum of its entries and is never negative: the store writes a
//! consumption only where the remaining balance covers it, in the
//! transaction that writes the invoice (`StateStore::insert_invoices`).
//!
//! Rules (BILLING-EXAMPLES "Credits", example 11):
//! - A grant can pay an invoice when it is effective before the end of the
//!   invoiced usage period (an opening invoice of fees in advance: before
//!   it is issued) and has not expired by then (an expiry exactly at the
//!   end still counts).
//! - Order: earliest expiry first (no expiry last), then the lower
//!   priority number, then the oldest grant (effective instant, then the
//!   order of recording).
//! - At one instant: consumption, then new grants, then expiries.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

crate::named! {
    /// Where a grant's money comes from.
    pub enum GrantKind ("grant kind") {
        /// Given by the platform (a signup offer, a goodwill credit).
        Promotional => "promotional",
        /// Paid for by the customer (a top-up).
        Purchased => "purchased",
    }
}

crate::named! {
    /// One entry of a customer's credit ledger.
    pub enum EntryKind ("ledger entry kind") {
        /// The grant itself (+amount).
        Grant => "grant",
        /// Part of the balance paid an invoice (−amount, names the invoice).
        Consumption => "consumption",
        /// What was left when the grant expired (−amount).
        Expiry => "expiry",
        /// The unused remainder voided by staff (−amount).
        Void => "void",
    }
}

/// A grant with its remaining balance, as the store reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Grant {
    pub id: String,
    pub customer_id: String,
    pub kind: GrantKind,
    pub currency: String,
    /// What was granted.
    pub amount: Decimal,
    /// What is left: the sum of its ledger entries.
    pub remaining: Decimal,
    pub effective_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Lower numbers are consumed first (after the earliest expiry).
    pub priority: u32,
    pub reason: String,
    /// A purchased grant invoiced as a top-up is usable once that invoice
    /// is paid; every other grant at once (from `effective_at`).
    pub usable: bool,
    /// The top-up invoice of a purchased grant, when it was invoiced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoice_id: Option<String>,
    /// When it was recorded (the order of grants recorded at one instant).
    pub created_at: DateTime<Utc>,
    pub voided_at: Option<DateTime<Utc>>,
}

/// A ledger entry as stored and answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Entry {
    /// The ledger's order (one sequence for every customer).
    pub seq: i64,
    pub grant_id: String,
    pub kind: EntryKind,
    /// Signed: + for a grant, − for everything else.
    pub amount: Decimal,
    pub currency: String,
    /// When it takes effect: the grant's effective instant, the consuming
    /// invoice's finalization, the expiry instant, the void.
    pub at: DateTime<Utc>,
    /// The invoice that consumed it (consumptions only).
    pub invoice_id: Option<String>,
}

/// What one grant paid of an invoice: its evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreditLine {
    pub grant_id: String,
    pub kind: GrantKind,
    pub description: String,
    /// The grant's balance before this invoice consumed from it.
    pub balance_before: Decimal,
    /// Negative: what it paid (rounded already: grants are whole minor units).
    pub amount: Decimal,
    pub expires_at: Option<DateTime<Utc>>,
    pub priority: u32,
}

/// Whether `g` may pay an invoice whose cut-off is `until` (the end of the
/// invoiced usage period; of an opening invoice, its issue instant).
pub fn can_pay(g: &Grant, currency: &str, until: DateTime<Utc>) -> bool {
    live(g, currency) && g.effective_at < until && g.expires_at.is_none_or(|e| e >= until)
}

/// Whether `g` holds credit in `currency` that can ever be spent: usable
/// (a top-up paid), not voided, something left. Every question about
/// balances starts here.
pub fn live(g: &Grant, currency: &str) -> bool {
    g.usable
        && g.voided_at.is_none()
        && g.remaining > Decimal::ZERO
        && g.currency.eq_ignore_ascii_case(currency)
}

/// The order grants are consumed in: earliest expiry (none last), lower
/// priority, older grant, earlier recorded, id.
pub fn consumption_order(a: &Grant, b: &Grant) -> std::cmp::Ordering {
    let expiry = |g: &Grant| (g.expires_at.is_none(), g.expires_at);
    expiry(a)
        .cmp(&expiry(b))
        .then(a.priority.cmp(&b.priority))
        .then(a.effective_at.cmp(&b.effective_at))
        .then(a.created_at.cmp(&b.created_at))
        .then(a.id.cmp(&b.id))
}

/// The credits that pay `due` (the amount before credits) of an invoice in
/// `currency` with cut-off `until`, from `grants` (any order): the grants
/// that can pay, in consumption order, each giving what it has until `due`
/// is covered. Nothing is consumed when `due` is zero or negative (a refund
/// due is not paid by credit).
pub fn consume(
    due: Decimal,
    currency: &str,
    until: DateTime<Utc>,
    grants: &[Grant],
) -> Vec<CreditLine> {
    let mut usable: Vec<&Grant> = grants
        .iter()
        .filter(|g| can_pay(g, currency, until))
        .collect();
    usable.sort_by(|a, b| consumption_order(a, b));
    let mut left = due;
    let mut out = Vec::new();
    for g in usable {
        if left <= Decimal::ZERO {
            break;
        }
        let take = g.remaining.min(left);
        left -= take;
        out.push(CreditLine {
            grant_id: g.id.clone(),
            kind: g.kind,
            description: match &g.reason {
                r if r.is_empty() => format!("Credit ({})", g.kind),
                r => format!("Credit ({}): {r}", g.kind),
            },
            balance_before: g.remaining,
            amount: -take,
            expires_at: g.expires_at,
            priority: g.priority,
        });
    }
    out
}

/// What is left of `g` after the consumptions in `lines`.
pub fn after(g: &Grant, lines: &[CreditLine]) -> Decimal {
    g.remaining
        + lines
            .iter()
            .filter(|l| l.grant_id == g.id)
            .map(|l| l.amount)
            .sum::<Decimal>()
}

/// Of a customer's grants in `currency`, what can be spent at `at` (live,
/// effective, not expired): the balance the ledger and the dashboard show.
pub fn balance_at(grants: &[Grant], currency: &str, at: DateTime<Utc>) -> Decimal {
    sum_where(grants, currency, |g| {
        g.effective_at <= at && g.expires_at.is_none_or(|e| e > at)
    })
}

/// What the spending cap counts at `at`: the balance of the grants in
/// `currency` that are effective by then and can still pay the invoice of
/// usage ending at `until` (not expired before it, example 11).
pub fn spendable(
    grants: &[Grant],
    currency: &str,
    at: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Decimal {
    sum_where(grants, currency, |g| {
        g.effective_at <= at && g.expires_at.is_none_or(|e| e >= until)
    })
}

/// The remaining balance of the live grants in `currency` that `keep`.
fn sum_where(grants: &[Grant], currency: &str, keep: impl Fn(&Grant) -> bool) -> Decimal {
    grants
        .iter()
        .filter(|g| live(g, currency) && keep(g))
        .map(|g| g.remaining)
        .sum()
}

/// Whether an expiry entry is due for `g` at `now`: it has expired with a
/// remainder, and no invoice can still consume it (an invoice whose period
/// ended at or before the expiry is finalized by `expires_at + grace`; the
/// finalization run writes expiries after the invoices it finalizes).
pub fn expiry_due(g: &Grant, now: DateTime<Utc>, grace: chrono::Duration) -> bool {
    g.voided_at.is_none()
        && g.remaining > Decimal::ZERO
        && g.expires_at.is_some_and(|e| e + grace <= now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, m, d, 0, 0, 0).unwrap()
    }

    pub(crate) fn grant(id: &str, amount: i64, expires: Option<DateTime<Utc>>) -> Grant {
        Grant {
            id: id.into(),
            customer_id: "c".into(),
            kind: GrantKind::Promotional,
            currency: "USD".into(),
            amount: Decimal::new(amount, 2),
            remaining: Decimal::new(amount, 2),
            effective_at: at(11, 1),
            expires_at: expires,
            priority: 10,
            reason: String::new(),
            usable: true,
            invoice_id: None,
            created_at: at(11, 1),
            voided_at: None,
        }
    }

    #[test]
    fn grants_pay_in_order_of_expiry_priority_and_age() {
        let mut a = grant("a", 500, None);
        a.priority = 1;
        let b = grant("b", 500, Some(at(12, 31)));
        let mut c = grant("c", 500, None);
        c.priority = 1;
        c.effective_at = at(10, 1);
        let mut d = grant("d", 500, None);
        d.priority = 5;
        let lines = consume(Decimal::new(1700, 2), "USD", at(12, 1), &[a, b, c, d]);
        let order: Vec<(&str, Decimal)> = lines
            .iter()
            .map(|l| (l.grant_id.as_str(), l.amount))
            .collect();
        assert_eq!(
            order,
            [
                ("b", Decimal::new(-500, 2)),
                ("c", Decimal::new(-500, 2)),
                ("a", Decimal::new(-500, 2)),
                ("d", Decimal::new(-200, 2)),
            ]
        );
    }

    #[test]
    fn only_effective_unexpired_usable_grants_pay() {
        let until = at(12, 1);
        let mut late = grant("late", 100, None);
        late.effective_at = until;
        let mut unpaid = grant("unpaid", 100, None);
        unpaid.usable = false;
        let expired = grant("expired", 100, Some(at(11, 20)));
        let at_end = grant("at_end", 100, Some(until));
        let mut voided = grant("voided", 100, None);
        voided.voided_at = Some(at(11, 5));
        let mut euro = grant("euro", 100, None);
        euro.currency = "EUR".into();
        let all = [late, unpaid, expired, at_end, voided, euro];
        let lines = consume(Decimal::new(1000, 2), "USD", until, &all);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].grant_id, "at_end");
        // Nothing for a refund due or nothing due.
        assert!(consume(Decimal::ZERO, "USD", until, &all).is_empty());
        assert!(consume(Decimal::new(-100, 2), "USD", until, &all).is_empty());
        // Balances: the expired one is gone after Nov 20.
        assert_eq!(balance_at(&all, "USD", at(11, 10)), Decimal::new(200, 2));
        assert_eq!(balance_at(&all, "USD", at(11, 25)), Decimal::new(100, 2));
        // The cap counts only what can still pay the invoice cut at Dec 1:
        // not the one expiring Nov 20, even on Nov 10.
        assert_eq!(
            spendable(&all, "USD", at(11, 10), until),
            Decimal::new(100, 2)
        );
        assert_eq!(
            spendable(&all, "USD", at(11, 10), at(11, 15)),
            Decimal::new(200, 2)
        );
        let g = chrono::Duration::hours(1);
        assert!(expiry_due(&all[2], at(11, 20) + g, g));
        assert!(!expiry_due(&all[2], at(11, 20), g));
        assert!(!expiry_due(&all[0], at(12, 20), g));
    }
}
