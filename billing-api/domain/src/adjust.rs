//! Delta rating of late usage.
//!
//! Usage whose event time falls in an already-finalized period is never
//! dropped or moved: the original period is rated again with all its usage
//! (same plan versions, same tiers), and what changed against the invoice
//! as billed becomes adjustment lines on the next invoice, each naming the
//! original period and invoice. Lines are matched by what they charge for
//! (kind, plan version, segment, meter and filter); since both sides are
//! rounded lines, every adjustment is already in the minor unit and the
//! adjustments add up exactly to `rerated.total − billed.total`.

use crate::rating::{Line, LineKind, Period, Rated};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The finalized invoice the late usage belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OriginalInvoice {
    pub number: String,
    pub period: Period,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdjustmentLine {
    pub description: String,
    pub original_invoice: String,
    pub original_period: Period,
    pub kind: LineKind,
    pub plan: String,
    pub plan_version: u32,
    pub segment_start: DateTime<Utc>,
    pub segment_end: DateTime<Utc>,
    pub meter: Option<String>,
    pub filter: BTreeMap<String, String>,
    /// Evidence: how many more events and units the period now has.
    pub events_delta: i64,
    pub quantity_delta: Decimal,
    pub amount: Decimal,
}

type Key = (
    LineKind,
    String,
    u32,
    DateTime<Utc>,
    Option<String>,
    BTreeMap<String, String>,
);

fn key(l: &Line) -> Key {
    (
        l.kind,
        l.plan.clone(),
        l.plan_version,
        l.segment_start,
        l.meter.clone(),
        l.filter.clone(),
    )
}

/// Adjustment lines turning `billed` into `rerated`; empty when nothing
/// changed.
pub fn adjustments(
    billed: &Rated,
    rerated: &Rated,
    original: &OriginalInvoice,
) -> Vec<AdjustmentLine> {
    let mut old: BTreeMap<Key, &Line> = billed.lines.iter().map(|l| (key(l), l)).collect();
    let month = original.period.start.format("%B %Y");
    let mut out = Vec::new();
    let mut push = |new: Option<&Line>, old: Option<&Line>| {
        let l = new.or(old).expect("one side exists");
        let amount = rerated.money(
            new.map_or(Decimal::ZERO, |n| n.amount) - old.map_or(Decimal::ZERO, |o| o.amount),
        );
        let events_delta = new.map_or(0, |n| n.events as i64) - old.map_or(0, |o| o.events as i64);
        let quantity_delta =
            new.map_or(Decimal::ZERO, |n| n.quantity) - old.map_or(Decimal::ZERO, |o| o.quantity);
        if amount.is_zero() && events_delta == 0 && quantity_delta.is_zero() {
            return;
        }
        out.push(AdjustmentLine {
            description: format!(
                "Adjustment for {month} (invoice {}): {}",
                original.number, l.description
            ),
            original_invoice: original.number.clone(),
            original_period: original.period,
            kind: l.kind,
            plan: l.plan.clone(),
            plan_version: l.plan_version,
            segment_start: l.segment_start,
            segment_end: l.segment_end,
            meter: l.meter.clone(),
            filter: l.filter.clone(),
            events_delta,
            quantity_delta,
            amount,
        });
    };
    for l in &rerated.lines {
        let o = old.remove(&key(l));
        push(Some(l), o);
    }
    for l in billed.lines.iter().filter(|l| old.contains_key(&key(l))) {
        push(None, Some(l));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::PlanVersion;
    use crate::rating::{rate, Segment, UsageItem};
    use chrono::TimeZone;
    use serde_json::json;

    fn nov() -> Period {
        Period {
            start: Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
            end: Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
        }
    }

    fn req(q: &str, events: u64) -> UsageItem {
        UsageItem {
            meter: "requests".into(),
            dims: Default::default(),
            quantity: q.parse().unwrap(),
            events,
        }
    }

    fn bill(plan: &PlanVersion, usage: Vec<UsageItem>) -> Rated {
        let p = nov();
        rate(
            &p,
            &[Segment {
                trial: false,
                plan: plan.clone(),
                start: p.start,
                end: p.end,
                usage,
            }],
            &[],
        )
        .unwrap()
    }

    fn inv() -> OriginalInvoice {
        OriginalInvoice {
            number: "TALLY-000042".into(),
            period: nov(),
        }
    }

    #[test]
    fn late_usage_becomes_one_line_naming_the_original_period() {
        let payg: PlanVersion = serde_json::from_value(json!({"plan":"payg","version":1,"name":"PAYG","currency":"USD",
            "prices":[{"meter":"requests","per":"1000000","model":"per_unit","unit_price":"0.40"}]}))
        .unwrap();
        let billed = bill(&payg, vec![req("10000000", 100)]);
        let rerated = bill(&payg, vec![req("10000000", 100), req("2500000", 1)]);
        let adj = adjustments(&billed, &rerated, &inv());
        assert_eq!(adj.len(), 1);
        assert_eq!(adj[0].amount, "1.00".parse::<Decimal>().unwrap());
        assert_eq!(
            (adj[0].events_delta, adj[0].quantity_delta),
            (1, Decimal::from(2_500_000))
        );
        assert_eq!(
            adj[0].description,
            "Adjustment for November 2026 (invoice TALLY-000042): requests"
        );
        assert!(
            adjustments(&billed, &billed, &inv()).is_empty(),
            "nothing late, nothing adjusted"
        );
    }

    #[test]
    fn late_usage_under_a_minimum_moves_money_between_lines_not_the_total() {
        let min: PlanVersion = serde_json::from_value(
            json!({"plan":"m","version":1,"name":"Min","currency":"USD","minimum":"10",
            "prices":[{"meter":"requests","model":"per_unit","unit_price":"1"}]}),
        )
        .unwrap();
        let billed = bill(&min, vec![req("3.333", 1)]);
        let rerated = bill(&min, vec![req("3.333", 1), req("2", 1)]);
        let adj = adjustments(&billed, &rerated, &inv());
        let amounts: Vec<(LineKind, Decimal)> = adj.iter().map(|a| (a.kind, a.amount)).collect();
        assert_eq!(
            amounts,
            vec![
                (LineKind::Usage, Decimal::from(2)),
                (LineKind::MinimumTrueUp, Decimal::from(-2))
            ]
        );
        let sum: Decimal = adj.iter().map(|a| a.amount).sum();
        assert_eq!(sum, rerated.total - billed.total);
        assert_eq!(sum, Decimal::ZERO);
    }
}
