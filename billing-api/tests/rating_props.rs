//! Properties of the rating engine (proptest).

use billing_api::catalog::PlanVersion;
use billing_api::rating::{rate, Period, SeatInterval, Segment, UsageItem};
use chrono::{DateTime, Duration};
use proptest::prelude::*;
use rust_decimal::Decimal;
use serde_json::json;

const START: i64 = 1793491200; // 2026-11-01
const LEN: i64 = 30 * 86400;

fn period() -> Period {
    Period {
        start: DateTime::from_timestamp(START, 0).unwrap(),
        end: DateTime::from_timestamp(START + LEN, 0).unwrap(),
    }
}

fn plan(version: u32, flat: u32, seat: u32, price_micros: u32) -> PlanVersion {
    serde_json::from_value(json!({"plan":"p","version":version,"name":"P","currency":"USD",
        "flat_fee": flat.to_string(), "seat_fee": seat.to_string(),
        "prices":[{"meter":"requests","model":"per_unit","unit_price": Decimal::new(price_micros as i64, 6).to_string()}]}))
    .unwrap()
}

fn tiered(model: &str, bounds: &[u32], prices: &[u32]) -> PlanVersion {
    let mut tiers: Vec<serde_json::Value> =
        bounds.iter().zip(prices).map(|(b, p)| json!({"up_to": b.to_string(), "unit_price": Decimal::new(*p as i64, 3).to_string(), "flat_price": "1"})).collect();
    tiers.push(json!({"unit_price": Decimal::new(*prices.last().unwrap() as i64, 3).to_string()}));
    serde_json::from_value(json!({"plan":"t","version":1,"name":"T","currency":"USD","prices":[{"meter":"requests","model":model,"tiers":tiers}]})).unwrap()
}

fn req(q: u64) -> UsageItem {
    UsageItem {
        meter: "requests".into(),
        dims: Default::default(),
        quantity: Decimal::from(q),
        events: 1,
    }
}

/// A period's plan history from generated cuts (a switch at each, to
/// plan version i + 1 with `fees[i]`, made by `plan`), seat changes and a
/// cancellation: its segment bounds (seconds into the period), segments
/// and seat intervals.
fn history(
    cuts: std::collections::BTreeSet<i64>,
    fees: &[(u32, u32)],
    seat_changes: std::collections::BTreeMap<i64, u32>,
    cancel: Option<i64>,
    plan: impl Fn(u32, (u32, u32)) -> PlanVersion,
) -> (Vec<i64>, Vec<Segment>, Vec<SeatInterval>) {
    let at = |s: i64| DateTime::from_timestamp(START + s, 0).unwrap();
    let end = cancel.unwrap_or(LEN);
    let mut bounds: Vec<i64> = std::iter::once(0)
        .chain(cuts.into_iter().filter(|c| *c < end))
        .collect();
    bounds.push(end);
    let segs = bounds
        .windows(2)
        .enumerate()
        .map(|(i, w)| Segment {
            trial: false,
            plan: plan(i as u32 + 1, fees[i]),
            start: at(w[0]),
            end: at(w[1]),
            usage: vec![],
        })
        .collect();
    let changes: Vec<(i64, u32)> = seat_changes.into_iter().collect();
    let seats = changes
        .iter()
        .enumerate()
        .filter(|(_, (_, n))| *n > 0)
        .map(|(i, (s, n))| SeatInterval {
            start: at(*s),
            end: at(changes.get(i + 1).map_or(LEN, |c| c.0)),
            seats: *n,
        })
        .collect();
    (bounds, segs, seats)
}

fn sorted_bounds() -> impl Strategy<Value = Vec<u32>> {
    prop::collection::btree_set(1u32..1_000_000, 1..4).prop_map(|s| s.into_iter().collect())
}

proptest! {
    /// Splitting a segment at any second, with the same terms on both sides
    /// (two plan versions, so the engine cannot merge them), changes the
    /// total by at most one rounding step per line.
    #[test]
    fn splitting_a_segment_changes_at_most_one_cent_per_line(
        cut in 1i64..LEN, flat in 0u32..500, seat in 0u32..50, price in 0u32..5000,
        seats in 1u32..20, q1 in 0u64..10_000_000, q2 in 0u64..10_000_000,
    ) {
        let (p, t) = (period(), DateTime::from_timestamp(START + cut, 0).unwrap());
        let sv = [SeatInterval { start: p.start, end: p.end, seats }];
        let whole = rate(&p, &[Segment { trial: false, plan: plan(1, flat, seat, price), start: p.start, end: p.end, usage: vec![req(q1), req(q2)] }], &sv).unwrap();
        let split = rate(&p, &[
            Segment { trial: false, plan: plan(1, flat, seat, price), start: p.start, end: t, usage: vec![req(q1)] },
            Segment { trial: false, plan: plan(2, flat, seat, price), start: t, end: p.end, usage: vec![req(q2)] },
        ], &sv).unwrap();
        let steps = Decimal::new(split.lines.len() as i64, 2);
        prop_assert!((split.total - whole.total).abs() <= steps, "whole {} split {}", whole.total, split.total);
        // And with the same version the engine merges: exactly equal.
        let merged = rate(&p, &[
            Segment { trial: false, plan: plan(1, flat, seat, price), start: p.start, end: t, usage: vec![req(q1)] },
            Segment { trial: false, plan: plan(1, flat, seat, price), start: t, end: p.end, usage: vec![req(q2)] },
        ], &sv).unwrap();
        prop_assert_eq!(merged.total, whole.total);
    }

    /// More usage never costs less, for per-unit, package and graduated
    /// prices. (Volume pricing is not monotonic by design: BILLING-EXAMPLES
    /// example 2.)
    #[test]
    fn cost_never_decreases_when_usage_grows(bounds in sorted_bounds(), prices in prop::collection::vec(0u32..2000, 4), q in 0u64..2_000_000, extra in 0u64..2_000_000, days in 1i64..31) {
        let p = period();
        let end = p.start + Duration::days(days);
        let plans = [tiered("graduated", &bounds, &prices), plan(1, 0, 0, prices[0])];
        for pl in plans {
            let a = rate(&p, &[Segment { trial: false, plan: pl.clone(), start: p.start, end, usage: vec![req(q)] }], &[]).unwrap();
            let b = rate(&p, &[Segment { trial: false, plan: pl, start: p.start, end, usage: vec![req(q + extra)] }], &[]).unwrap();
            prop_assert!(b.total >= a.total, "{} then {}", a.total, b.total);
        }
    }

    /// The total is the sum of the rounded lines, and every line is rounded
    /// once to cents from its exact amount.
    #[test]
    fn total_is_the_sum_of_rounded_lines(bounds in sorted_bounds(), prices in prop::collection::vec(0u32..2000, 4), q in 0u64..5_000_000, days in 1i64..31, volume: bool) {
        let p = period();
        let pl = tiered(if volume { "volume" } else { "graduated" }, &bounds, &prices);
        let r = rate(&p, &[Segment { trial: false, plan: pl, start: p.start, end: p.start + Duration::days(days), usage: vec![req(q)] }], &[]).unwrap();
        let sum: Decimal = r.lines.iter().map(|l| l.amount).sum();
        prop_assert_eq!(r.total, sum);
        for l in &r.lines {
            prop_assert_eq!(l.amount, l.amount_exact.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointNearestEven));
        }
    }
}

proptest! {
    /// Adjustment lines for late usage add up exactly to the change of the
    /// period's total, whatever the prices and quantities.
    #[test]
    fn adjustments_sum_to_the_change_in_total(bounds in sorted_bounds(), prices in prop::collection::vec(0u32..2000, 4), q in 0u64..3_000_000, late in 0u64..3_000_000, volume: bool) {
        use billing_api::adjust::{adjustments, OriginalInvoice};
        let p = period();
        let pl = tiered(if volume { "volume" } else { "graduated" }, &bounds, &prices);
        let seg = |u: Vec<UsageItem>| vec![Segment { trial: false, plan: pl.clone(), start: p.start, end: p.end, usage: u }];
        let billed = rate(&p, &seg(vec![req(q)]), &[]).unwrap();
        let rerated = rate(&p, &seg(vec![req(q), req(late)]), &[]).unwrap();
        let adj = adjustments(&billed, &rerated, &OriginalInvoice { number: "T-1".into(), period: p });
        let sum: Decimal = adj.iter().map(|a| a.amount).sum();
        prop_assert_eq!(sum, rerated.total - billed.total);
    }
}

proptest! {
    /// Issue 13: for any sequence of switches (each to a plan with its own
    /// fees), seat changes and a cancellation inside a period, the fee lines
    /// sum to one independent calculation over the segments: each
    /// segment's flat fee × its share of the period, and its seat-seconds
    /// × the seat fee ÷ the period, each rounded once, half-even.
    #[test]
    fn fee_lines_of_any_history_sum_to_one_calculation_over_its_segments(
        cuts in prop::collection::btree_set(1i64..LEN, 0..5),
        fees in prop::collection::vec((0u32..400, 0u32..60), 6),
        seat_changes in prop::collection::btree_map(0i64..LEN, 0u32..30, 1..6),
        cancel in prop::option::of(1i64..LEN),
    ) {
        use rust_decimal::RoundingStrategy::MidpointNearestEven;
        let p = period();
        let (bounds, segs, seats) = history(cuts, &fees, seat_changes, cancel, |i, (f, s)| plan(i, f, s, 0));
        let r = rate(&p, &segs, &seats).unwrap();
        let billed: Decimal = r.lines.iter().map(|l| l.amount).sum();
        let len = Decimal::from(LEN);
        let mut expected = Decimal::ZERO;
        let mut lines = 0;
        for (i, w) in bounds.windows(2).enumerate() {
            let (flat, seat) = (Decimal::from(fees[i].0), Decimal::from(fees[i].1));
            if !flat.is_zero() {
                expected += (flat * Decimal::from(w[1] - w[0]) / len).round_dp_with_strategy(2, MidpointNearestEven);
                lines += 1;
            }
            let seat_secs: i64 = seats.iter().map(|iv| {
                let (a, b) = ((iv.start.timestamp() - START).max(w[0]), (iv.end.timestamp() - START).min(w[1]));
                if b > a { iv.seats as i64 * (b - a) } else { 0 }
            }).sum();
            if !seat.is_zero() && seat_secs > 0 {
                expected += (seat * Decimal::from(seat_secs) / len).round_dp_with_strategy(2, MidpointNearestEven);
                lines += 1;
            }
        }
        prop_assert_eq!(r.lines.len(), lines);
        prop_assert_eq!(billed, expected);
        prop_assert_eq!(r.total, expected);
    }
}

fn in_advance(version: u32, flat: u32, seat: u32) -> PlanVersion {
    let mut p = plan(version, flat, seat, 0);
    p.fee_timing = billing_api::catalog::FeeTiming::InAdvance;
    p
}

proptest! {
    /// Issue 13, fees in advance: for any sequence of switches, seat
    /// changes and a cancellation inside a period, the fees billed for it
    /// (those in force at its start, for the whole period, then every
    /// change's refund of the rest and charge of the rest) add up exactly,
    /// before rounding, to the fees of its segments rated in arrears; after
    /// rounding each line once they differ by at most half a cent a line.
    /// Refunds are negative, charges positive.
    #[test]
    fn fees_in_advance_with_their_refunds_and_charges_add_up_to_the_fees_in_arrears(
        cuts in prop::collection::btree_set(1i64..LEN, 0..5),
        fees in prop::collection::vec((0u32..400, 0u32..60), 6),
        seat_changes in prop::collection::btree_map(0i64..LEN, 0u32..30, 1..6),
        cancel in prop::option::of(1i64..LEN),
    ) {
        use billing_api::advance;
        use billing_api::rating::Advance;
        let p = period();
        let (_, segs, seats) = history(cuts, &fees, seat_changes, cancel, |i, (f, s)| in_advance(i, f, s));
        let arrears = rate(&p, &segs, &seats).unwrap();
        // What the period's fees were billed as: at its start (as the
        // invoice before, or an opening invoice, bills them), then changes.
        let mut ahead = advance::opening(p, &segs, &seats, p.start).unwrap().lines;
        let changes = advance::changes(p, &segs, &seats).unwrap();
        for l in &changes {
            match l.advance {
                Some(Advance::Credit) => prop_assert!(l.amount <= Decimal::ZERO, "{:?}", l),
                Some(Advance::Charge) => prop_assert!(l.amount >= Decimal::ZERO, "{:?}", l),
                other => prop_assert!(false, "{:?}", other),
            }
        }
        ahead.extend(changes);
        let exact = |ls: &[billing_api::rating::Line]| ls.iter().map(|l| l.amount_exact).sum::<Decimal>();
        let rounded = |ls: &[billing_api::rating::Line]| ls.iter().map(|l| l.amount).sum::<Decimal>();
        prop_assert!((exact(&ahead) - exact(&arrears.lines)).abs() < Decimal::new(1, 15),
            "{} vs {}", exact(&ahead), exact(&arrears.lines));
        let slack = Decimal::new(5, 3) * Decimal::from(ahead.len() + arrears.lines.len());
        prop_assert!((rounded(&ahead) - rounded(&arrears.lines)).abs() <= slack);
        // In arrears, a plan billing in advance leaves nothing of its fees.
        prop_assert!(advance::arrears(arrears, &segs).lines.is_empty());
    }
}
