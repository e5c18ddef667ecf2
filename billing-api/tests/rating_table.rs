//! Hand-computed rating cases: every example of BILLING-EXAMPLES.md and one
//! case per rule of the rating engine.

use billing_api::catalog::PlanVersion;
use billing_api::rating::{rate, LineKind, Period, Rated, SeatInterval, Segment, UsageItem};
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use serde_json::json;

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

fn nov(day: u32) -> DateTime<Utc> {
    if day == 31 {
        Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap()
    } else {
        Utc.with_ymd_and_hms(2026, 11, day, 0, 0, 0).unwrap()
    }
}

const NOV: Period = Period {
    start: DateTime::from_timestamp(1793491200, 0).unwrap(), // 2026-11-01
    end: DateTime::from_timestamp(1796083200, 0).unwrap(),   // 2026-12-01
};

fn plan(v: serde_json::Value) -> PlanVersion {
    let mut base = json!({"plan":"p","version":1,"name":"Plan","currency":"USD"});
    base.as_object_mut()
        .unwrap()
        .extend(v.as_object().unwrap().clone());
    let p: PlanVersion = serde_json::from_value(base).unwrap();
    p.validate(&schemas::MeterCatalog::default_catalog())
        .unwrap();
    p
}

fn usage(meter: &str, q: &str) -> UsageItem {
    UsageItem {
        meter: meter.into(),
        dims: Default::default(),
        quantity: d(q),
        events: 1,
    }
}

fn one(p: PlanVersion, start: u32, end: u32, u: Vec<UsageItem>) -> Rated {
    rate(
        &NOV,
        &[Segment {
            trial: false,
            plan: p,
            start: nov(start),
            end: nov(end),
            usage: u,
        }],
        &[],
    )
    .unwrap()
}

fn amounts(r: &Rated) -> Vec<(LineKind, Decimal)> {
    r.lines.iter().map(|l| (l.kind, l.amount)).collect()
}

fn allowance_plan() -> PlanVersion {
    plan(
        json!({"prices":[{"meter":"requests","model":"graduated","tiers":[{"up_to":"100","unit_price":"0"},{"unit_price":"0.50"}]}]}),
    )
}

#[test]
fn example_1_free_allowance_full_and_half_period() {
    let full = one(allowance_plan(), 1, 31, vec![usage("requests", "150")]);
    assert_eq!(full.total, d("25.00"));
    let half = one(allowance_plan(), 1, 16, vec![usage("requests", "150")]);
    assert_eq!(half.total, d("50.00"), "allowance prorated to 50");
    assert_eq!(half.lines[0].tiers[1].quantity, d("100"));
}

#[test]
fn example_2_volume_crossing() {
    let p = plan(
        json!({"prices":[{"meter":"requests","model":"volume","tiers":[{"up_to":"1000","unit_price":"0.10"},{"unit_price":"0.08"}]}]}),
    );
    assert_eq!(
        one(p.clone(), 1, 31, vec![usage("requests", "1000")]).total,
        d("100.00")
    );
    assert_eq!(
        one(p, 1, 31, vec![usage("requests", "1001")]).total,
        d("80.08")
    );
}

#[test]
fn example_3_package() {
    let p = plan(
        json!({"prices":[{"meter":"requests","model":"per_unit","unit_price":"0.90","package_size":"10"}]}),
    );
    assert_eq!(
        one(p, 1, 31, vec![usage("requests", "10.0001")]).total,
        d("1.80")
    );
}

#[test]
fn example_4_mid_month_switch_payg_to_team_with_seats() {
    let payg = plan(
        json!({"plan":"payg","name":"Pay as you go","prices":[{"meter":"requests","model":"per_unit","unit_price":"0.0000004"}]}),
    );
    let team = plan(
        json!({"plan":"team","name":"Team","seat_fee":"15","prices":[{"meter":"requests","model":"graduated",
        "tiers":[{"up_to":"1000000","unit_price":"0"},{"unit_price":"0.0000003"}]}]}),
    );
    let seats = [
        SeatInterval {
            start: nov(16),
            end: nov(21),
            seats: 2,
        },
        SeatInterval {
            start: nov(21),
            end: nov(31),
            seats: 3,
        },
    ];
    let r = rate(
        &NOV,
        &[
            Segment {
                trial: false,
                plan: payg,
                start: nov(1),
                end: nov(16),
                usage: vec![usage("requests", "12345678")],
            },
            Segment {
                trial: false,
                plan: team,
                start: nov(16),
                end: nov(31),
                usage: vec![usage("requests", "3000000")],
            },
        ],
        &seats,
    )
    .unwrap();
    assert_eq!(
        amounts(&r),
        vec![
            (LineKind::Usage, d("4.94")),
            (LineKind::SeatFee, d("20.00")),
            (LineKind::Usage, d("0.75"))
        ]
    );
    assert_eq!(r.lines[0].amount_exact, d("4.9382712"));
    assert_eq!(r.total, d("25.69"));
}

#[test]
fn example_5_minimum_true_up_and_maximum_cap() {
    let min = plan(
        json!({"minimum":"10","prices":[{"meter":"requests","model":"per_unit","unit_price":"1"}]}),
    );
    let r = one(min, 1, 31, vec![usage("requests", "3.333")]);
    assert_eq!(
        amounts(&r),
        vec![
            (LineKind::Usage, d("3.33")),
            (LineKind::MinimumTrueUp, d("6.67"))
        ]
    );
    assert_eq!(r.total, d("10.00"));
    let max = plan(
        json!({"maximum":"2","prices":[{"meter":"requests","model":"per_unit","unit_price":"1"}]}),
    );
    let r = one(max, 1, 31, vec![usage("requests", "3.333")]);
    assert_eq!(
        amounts(&r),
        vec![
            (LineKind::Usage, d("3.33")),
            (LineKind::MaximumCap, d("-1.33"))
        ]
    );
    assert_eq!(r.total, d("2.00"));
}

#[test]
fn example_6_half_even() {
    let p = plan(json!({"prices":[{"meter":"requests","model":"per_unit","unit_price":"0.125"}]}));
    assert_eq!(one(p, 1, 31, vec![usage("requests", "1")]).total, d("0.12"));
    let p = plan(json!({"prices":[{"meter":"requests","model":"per_unit","unit_price":"0.135"}]}));
    assert_eq!(one(p, 1, 31, vec![usage("requests", "1")]).total, d("0.14"));
    let up = plan(
        json!({"rounding":"half_up","prices":[{"meter":"requests","model":"per_unit","unit_price":"0.125"}]}),
    );
    assert_eq!(
        one(up, 1, 31, vec![usage("requests", "1")]).total,
        d("0.13"),
        "rounding is configurable per plan"
    );
}

#[test]
fn graduated_with_per_tier_flat_fees_prorated() {
    let p = plan(
        json!({"prices":[{"meter":"requests","model":"graduated","tiers":[
        {"up_to":"10","unit_price":"1","flat_price":"5"},{"up_to":"20","unit_price":"0.5","flat_price":"3"},{"unit_price":"0.1","flat_price":"100"}]}]}),
    );
    // Full period, 15 units: tier 1 (10 × 1 + 5) + tier 2 (5 × 0.5 + 3) = 20.50; tier 3 not reached.
    assert_eq!(
        one(p.clone(), 1, 31, vec![usage("requests", "15")]).total,
        d("20.50")
    );
    // Exactly at a bound: tier 2 is not reached.
    assert_eq!(
        one(p.clone(), 1, 31, vec![usage("requests", "10")]).total,
        d("15.00")
    );
    // Zero usage reaches no tier.
    assert_eq!(
        one(p.clone(), 1, 31, vec![usage("requests", "0")]).total,
        d("0")
    );
    // A 6-day segment (f = 1/5): bounds 2 and 4, flats 1, 0.6, 20. 5 units:
    // 2 × 1 + 1 + 2 × 0.5 + 0.6 + 1 × 0.1 + 20 = 24.70.
    assert_eq!(one(p, 1, 7, vec![usage("requests", "5")]).total, d("24.70"));
}

#[test]
fn flat_fee_and_seats_prorated_to_the_second() {
    let p = plan(json!({"flat_fee":"299","seat_fee":"15"}));
    let start = nov(1);
    let switch = Utc.with_ymd_and_hms(2026, 11, 10, 13, 27, 41).unwrap();
    let seats = [SeatInterval {
        start,
        end: nov(31),
        seats: 4,
    }];
    let r = rate(
        &NOV,
        &[Segment {
            trial: false,
            plan: p,
            start: switch,
            end: nov(31),
            usage: vec![],
        }],
        &seats,
    )
    .unwrap();
    let secs = (nov(31) - switch).num_seconds();
    let f = Decimal::from(secs) / Decimal::from(30 * 86400);
    assert_eq!(r.lines[0].amount, (d("299") * f).round_dp(2));
    assert_eq!(r.lines[1].amount, (d("60") * f).round_dp(2));
    assert_eq!(r.lines[0].amount, d("203.71"));
    assert_eq!(r.lines[1].amount, d("40.88"));
}

#[test]
fn sub_cent_unit_prices_over_millions_of_requests() {
    let p = plan(
        json!({"prices":[{"meter":"requests","model":"per_unit","unit_price":"0.000000123456"}]}),
    );
    let r = one(p, 1, 31, vec![usage("requests", "987654321")]);
    assert_eq!(r.lines[0].amount_exact, d("121.931851853376"));
    assert_eq!(r.total, d("121.93"));
}

#[test]
fn per_unit_prices_by_dimension_and_price_units() {
    // Compute priced per instance-hour by instance type; egress per GB.
    let p = plan(json!({"prices":[
        {"meter":"compute","filter":{"instance_type":"t4g.nano"},"per":"3600","unit_name":"instance-hour","model":"per_unit","unit_price":"0.0042"},
        {"meter":"compute","filter":{"instance_type":"c6g.2xlarge"},"per":"3600","model":"per_unit","unit_price":"0.272"},
        {"meter":"egress","per":"1000000000","model":"per_unit","unit_price":"0.09"}]}));
    let dims = |t: &str| {
        [("instance_type".to_string(), t.to_string())]
            .into_iter()
            .collect()
    };
    let u = vec![
        UsageItem {
            meter: "compute".into(),
            dims: dims("t4g.nano"),
            quantity: d("2592000"),
            events: 720,
        },
        UsageItem {
            meter: "compute".into(),
            dims: dims("c6g.2xlarge"),
            quantity: d("36000"),
            events: 10,
        },
        UsageItem {
            meter: "compute".into(),
            dims: dims("m5.large"),
            quantity: d("3600"),
            events: 1,
        },
        usage("egress", "12500000000"),
    ];
    let r = one(p, 1, 31, u);
    assert_eq!(
        amounts(&r),
        vec![
            (LineKind::Usage, d("3.02")),
            (LineKind::Usage, d("2.72")),
            (LineKind::Usage, d("1.12"))
        ]
    );
    assert_eq!(
        (r.lines[0].events, r.lines[0].price_quantity),
        (720, d("720")),
        "evidence: events and hours"
    );
    assert_eq!(
        r.total,
        d("6.86"),
        "an unpriced instance type is not charged"
    );
}

#[test]
fn a_switch_to_the_same_plan_version_changes_nothing() {
    let p = allowance_plan();
    let whole = one(p.clone(), 1, 31, vec![usage("requests", "150")]);
    let split = rate(
        &NOV,
        &[
            Segment {
                trial: false,
                plan: p.clone(),
                start: nov(1),
                end: nov(9),
                usage: vec![usage("requests", "150")],
            },
            Segment {
                trial: false,
                plan: p,
                start: nov(9),
                end: nov(31),
                usage: vec![],
            },
        ],
        &[],
    )
    .unwrap();
    assert_eq!(split.total, whole.total);
}

#[test]
fn bad_segments_are_errors() {
    let p = allowance_plan();
    let seg = |a, b| Segment {
        trial: false,
        plan: p.clone(),
        start: nov(a),
        end: nov(b),
        usage: vec![],
    };
    assert!(
        rate(&NOV, &[seg(5, 10), seg(9, 12)], &[]).is_err(),
        "overlap"
    );
    assert!(rate(&NOV, &[seg(5, 5)], &[]).is_err(), "empty");
    assert!(
        rate(
            &Period {
                start: nov(2),
                end: nov(1)
            },
            &[],
            &[]
        )
        .is_err(),
        "reversed period"
    );
}

#[test]
fn a_prorated_allowance_that_makes_an_exact_half_cent_tie_rounds_as_a_tie() {
    // 283 of 600 minutes on a plan with 50 M requests included, 60 M used:
    // 60 − 50 × 283/600 = 36.41666… M at $0.30/M = $10.925 exactly → $10.92.
    let p = plan(
        json!({"prices":[{"meter":"requests","per":"1000000","model":"graduated","tiers":[{"up_to":"50","unit_price":"0"},{"unit_price":"0.30"}]}]}),
    );
    let period = Period {
        start: nov(1),
        end: nov(1) + chrono::Duration::minutes(600),
    };
    let seg = Segment {
        trial: false,
        plan: p,
        start: nov(1),
        end: nov(1) + chrono::Duration::minutes(283),
        usage: vec![usage("requests", "60000000")],
    };
    let r = rate(&period, &[seg], &[]).unwrap();
    assert_eq!(r.lines[0].amount_exact, d("10.925"));
    assert_eq!(r.total, d("10.92"));
}

/// BILLING-EXAMPLES "Instants": a boundary with a sub-second part is floored
/// to its whole second for proration, so the segments' fractions add up to
/// the period; usage belongs to a segment by its exact time (the caller
/// queries each segment's exact bounds). Issue 11, item 3.
#[test]
fn sub_second_switch_segments_add_up_to_the_period() {
    let a = plan(json!({"plan":"big_a","name":"Big A","flat_fee":"259200"}));
    let b = plan(json!({"plan":"big_b","name":"Big B","flat_fee":"259200"}));
    // Nov 16 12:00:00.0016: 1,339,200.0016 s into the 2,592,000 s month.
    let at = nov(16) + chrono::Duration::hours(12) + chrono::Duration::microseconds(1600);
    let seg = |p: &PlanVersion, start, end| Segment {
        trial: false,
        plan: p.clone(),
        start,
        end,
        usage: vec![],
    };
    let r = rate(&NOV, &[seg(&a, nov(1), at), seg(&b, at, nov(31))], &[]).unwrap();
    // $0.10 a second: 1,339,200 s (floored) and 1,252,800 s.
    assert_eq!(
        amounts(&r),
        [
            (LineKind::FlatFee, d("133920.00")),
            (LineKind::FlatFee, d("125280.00"))
        ]
    );
    assert_eq!(
        r.total,
        d("259200.00"),
        "the whole month, not a second less"
    );
    assert_eq!(r.lines[0].quantity + r.lines[1].quantity, d("2592000"));
    // The lines keep the exact boundary.
    assert_eq!((r.lines[0].segment_end, r.lines[1].segment_start), (at, at));

    // Three segments with sub-second boundaries on both sides, and seats
    // changing at sub-second instants: still the whole month, to the cent.
    let c = plan(json!({"plan":"big_c","name":"Big C","flat_fee":"259200","seat_fee":"2592"}));
    let at2 = nov(20) + chrono::Duration::microseconds(999_999);
    let seats = [
        SeatInterval {
            start: nov(1),
            end: at,
            seats: 1,
        },
        SeatInterval {
            start: at,
            end: nov(31),
            seats: 1,
        },
    ];
    let r = rate(
        &NOV,
        &[seg(&c, nov(1), at), seg(&a, at, at2), seg(&c, at2, nov(31))],
        &seats,
    )
    .unwrap();
    let fees: Decimal = r
        .lines
        .iter()
        .filter(|l| l.kind == LineKind::FlatFee)
        .map(|l| l.quantity)
        .sum();
    assert_eq!(fees, d("2592000"), "{:?}", amounts(&r));
    // Seat-seconds on plan c: [Nov 1, 16 12:00:00) + [Nov 20 00:00:00, Dec 1).
    let seat_q: Decimal = r
        .lines
        .iter()
        .filter(|l| l.kind == LineKind::SeatFee)
        .map(|l| l.quantity)
        .sum();
    assert_eq!(seat_q, d("1339200") + d("950400"), "{:?}", amounts(&r));
    assert_eq!(r.total, d("259200.00") + d("2289.60"), "{:?}", amounts(&r));
}

/// A segment shorter than a second inside one whole second prorates to
/// nothing; the neighbours carry the whole period.
#[test]
fn a_sub_second_segment_prorates_to_nothing() {
    let a = plan(json!({"plan":"big_a","name":"Big A","flat_fee":"259200"}));
    let b = plan(json!({"plan":"big_b","name":"Big B","flat_fee":"259200"}));
    let t1 = nov(10) + chrono::Duration::microseconds(100);
    let t2 = nov(10) + chrono::Duration::microseconds(900);
    let seg = |p: &PlanVersion, start, end| Segment {
        trial: false,
        plan: p.clone(),
        start,
        end,
        usage: vec![],
    };
    let r = rate(
        &NOV,
        &[seg(&a, nov(1), t1), seg(&b, t1, t2), seg(&a, t2, nov(31))],
        &[],
    )
    .unwrap();
    assert_eq!(r.total, d("259200.00"), "{:?}", amounts(&r));
}

fn team_example() -> PlanVersion {
    plan(
        json!({"plan":"team","name":"Team","seat_fee":"15","prices":[{"meter":"requests","model":"graduated",
        "tiers":[{"up_to":"1000000","unit_price":"0"},{"unit_price":"0.0000003"}]}]}),
    )
}

#[test]
fn example_7_cancel_mid_period() {
    // 4 seats from Nov 1, cancelled at Nov 13 00:00: the segment ends
    // there, so the 500,000 requests of Nov 20 are in no segment.
    let seats = [SeatInterval {
        start: nov(1),
        end: nov(31),
        seats: 4,
    }];
    let r = rate(
        &NOV,
        &[Segment {
            trial: false,
            plan: team_example(),
            start: nov(1),
            end: nov(13),
            usage: vec![usage("requests", "1400000")],
        }],
        &seats,
    )
    .unwrap();
    assert_eq!(
        amounts(&r),
        [
            (LineKind::SeatFee, d("24.00")),
            (LineKind::Usage, d("0.30"))
        ]
    );
    assert_eq!(r.lines[0].quantity, d("4147200"), "4 seats × 12 days");
    assert_eq!(
        r.lines[1].tiers[0].quantity,
        d("400000"),
        "allowance × 12/30"
    );
    assert_eq!(r.total, d("24.30"));
}

fn business_example(trial_days: u32) -> PlanVersion {
    plan(
        json!({"plan":"business","name":"Business","flat_fee":"299","trial_days": trial_days,
        "prices":[{"meter":"requests","model":"per_unit","unit_price":"0.0000004"}]}),
    )
}

#[test]
fn example_8_trial() {
    let seg = |trial, start, end| Segment {
        trial,
        plan: business_example(14),
        start: nov(start),
        end: nov(end),
        usage: vec![],
    };
    // Trial Nov 1–15, then paid to Dec 1.
    let r = rate(&NOV, &[seg(true, 1, 15), seg(false, 15, 31)], &[]).unwrap();
    let fees: Vec<(Decimal, Option<Decimal>, &str)> = r
        .lines
        .iter()
        .map(|l| (l.amount, l.waived, l.description.as_str()))
        .collect();
    assert_eq!(
        fees,
        [
            (d("0.00"), Some(d("139.53")), "Business flat fee (trial)"),
            (d("159.47"), None, "Business flat fee"),
        ]
    );
    assert_eq!(r.total, d("159.47"));
    // Cancelled on Nov 10, inside the trial: the only fee line is the
    // trial's; usage until then is billed as usual.
    let mut trial = seg(true, 1, 10);
    trial.usage = vec![usage("requests", "5000000")];
    let r = rate(&NOV, &[trial], &[]).unwrap();
    assert_eq!(
        amounts(&r),
        [(LineKind::FlatFee, d("0.00")), (LineKind::Usage, d("2.00"))]
    );
    assert_eq!(r.lines[0].waived, Some(d("89.70")));
    assert_eq!(r.total, d("2.00"));
}

#[test]
fn a_trial_waives_seats_skips_the_minimum_and_keeps_the_maximum() {
    let p = plan(json!({"seat_fee":"10","minimum":"50","maximum":"60",
        "prices":[{"meter":"requests","model":"per_unit","unit_price":"1"}]}));
    let seats = [SeatInterval {
        start: nov(1),
        end: nov(31),
        seats: 3,
    }];
    let trial = |u: &str| {
        rate(
            &NOV,
            &[Segment {
                trial: true,
                plan: p.clone(),
                start: nov(1),
                end: nov(31),
                usage: vec![usage("requests", u)],
            }],
            &seats,
        )
        .unwrap()
    };
    // Seats waived ($30.00 in the evidence), no minimum true-up.
    let r = trial("2");
    assert_eq!(
        amounts(&r),
        [(LineKind::SeatFee, d("0.00")), (LineKind::Usage, d("2.00"))]
    );
    assert_eq!(r.lines[0].waived, Some(d("30.00")));
    // The maximum still caps usage.
    let r = trial("70");
    assert_eq!(
        amounts(&r),
        [
            (LineKind::SeatFee, d("0.00")),
            (LineKind::Usage, d("70.00")),
            (LineKind::MaximumCap, d("-10.00"))
        ]
    );
    // A trial segment is never merged with the paid one that follows.
    let r = rate(
        &NOV,
        &[
            Segment {
                trial: true,
                plan: p.clone(),
                start: nov(1),
                end: nov(16),
                usage: vec![],
            },
            Segment {
                trial: false,
                plan: p.clone(),
                start: nov(16),
                end: nov(31),
                usage: vec![],
            },
        ],
        &seats,
    )
    .unwrap();
    assert_eq!(
        amounts(&r),
        [
            (LineKind::SeatFee, d("0.00")),
            (LineKind::SeatFee, d("15.00")),
            (LineKind::MinimumTrueUp, d("10.00"))
        ]
    );
}

#[test]
fn example_10_anchor_day_31() {
    use billing_api::invoice::{following, period_of};
    let at = |m, d| Utc.with_ymd_and_hms(2027, m, d, 0, 0, 0).unwrap();
    let jan = period_of(at(1, 31), 31);
    let periods: Vec<Period> = std::iter::successors(Some(jan), |p| Some(following(*p)))
        .take(4)
        .collect();
    let bounds: Vec<_> = periods.iter().map(|p| (p.start, p.end)).collect();
    assert_eq!(
        bounds,
        [
            (at(1, 31), at(2, 28)),
            (at(2, 28), at(3, 31)),
            (at(3, 31), at(4, 30)),
            (at(4, 30), at(5, 31)),
        ]
    );
    // $30 flat with a switch at Mar 10: 10 of the period's 31 days.
    let flat = plan(json!({"flat_fee":"30"}));
    let r = rate(
        &periods[1],
        &[Segment {
            trial: false,
            plan: flat,
            start: at(2, 28),
            end: at(3, 10),
            usage: vec![],
        }],
        &[],
    )
    .unwrap();
    assert_eq!(amounts(&r), [(LineKind::FlatFee, d("9.68"))]);
    assert_eq!(r.lines[0].amount_exact.round_dp(6), d("9.677419"));
}

fn dec(day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, day, 0, 0, 0).unwrap()
}

fn in_advance(plan_key: &str, name: &str, flat: &str, seat: &str) -> PlanVersion {
    plan(
        json!({"plan": plan_key, "name": name, "flat_fee": flat, "seat_fee": seat,
        "fee_timing": "in_advance",
        "prices":[{"meter":"requests","model":"per_unit","unit_price":"0.0000004"}]}),
    )
}

fn lines_of(lines: &[billing_api::rating::Line]) -> Vec<(&str, Decimal, Option<Advance>)> {
    lines
        .iter()
        .map(|l| (l.description.as_str(), l.amount, l.advance))
        .collect()
}

use billing_api::advance::{self, Next};
use billing_api::rating::Advance;

#[test]
fn example_9_fees_in_advance() {
    let pro = in_advance("pro", "Pro", "20", "0");
    let plus = in_advance("pro_plus", "Pro Plus", "50", "0");
    let dec_p = Period {
        start: dec(1),
        end: Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap(),
    };
    let jan = Period {
        start: dec_p.end,
        end: Utc.with_ymd_and_hms(2027, 2, 1, 0, 0, 0).unwrap(),
    };
    let seg = |p: &PlanVersion, start, end, u: Vec<UsageItem>| Segment {
        trial: false,
        plan: p.clone(),
        start,
        end,
        usage: u,
    };
    // Subscribed Nov 10 00:00: fees start there (nothing before), so an
    // opening invoice at once for 20 × 21/30.
    let nov_segs = [seg(
        &pro,
        nov(10),
        nov(31),
        vec![usage("requests", "10000000")],
    )];
    assert_eq!(advance::start_instants(&nov_segs, &[], NOV), [nov(10)]);
    let open = advance::opening(NOV, &nov_segs, &[], nov(10)).unwrap();
    assert_eq!((open.currency.as_str(), open.total), ("USD", d("14.00")));
    let open = open.lines;
    assert_eq!(
        lines_of(&open),
        [(
            "Pro flat fee, 2026-11-10 – 2026-12-01",
            d("14.00"),
            Some(Advance::Fee)
        )]
    );
    assert_eq!(open[0].amount_exact, d("14"));
    // At Dec 1 01:00: November's usage ($4.00, the flat fee of the
    // segment billed ahead is not billed again) and December's fee.
    let dec_segs = [
        seg(&pro, dec(1), dec(16), vec![usage("requests", "1000000")]),
        seg(
            &plus,
            dec(16),
            jan.start,
            vec![usage("requests", "2000000")],
        ),
    ];
    let full = rate(&NOV, &nov_segs, &[]).unwrap();
    assert_eq!(
        full.total,
        d("18.00"),
        "the period's own rating keeps its fee"
    );
    let next = Next {
        period: dec_p,
        segs: &dec_segs,
        seats: &[],
    };
    let nov_inv = advance::invoice(full, NOV, &nov_segs, &[], Some(&next)).unwrap();
    assert_eq!(
        lines_of(&nov_inv.lines),
        [
            ("requests", d("4.00"), None),
            (
                "Pro flat fee, 2026-12-01 – 2027-01-01",
                d("20.00"),
                Some(Advance::Fee)
            ),
        ]
    );
    assert_eq!(nov_inv.total, d("24.00"));
    // A switch to pro_plus on Dec 16, 16 of December's 31 days left: the
    // January invoice refunds −20 × 16/31 and charges 50 × 16/31 beside
    // December's usage on each plan and January's $50.00.
    let jan_segs = [seg(&plus, jan.start, jan.end, vec![])];
    let full = rate(&dec_p, &dec_segs, &[]).unwrap();
    let next = Next {
        period: jan,
        segs: &jan_segs,
        seats: &[],
    };
    let dec_inv = advance::invoice(full, dec_p, &dec_segs, &[], Some(&next)).unwrap();
    assert_eq!(
        lines_of(&dec_inv.lines),
        [
            ("requests", d("0.40"), None),
            ("requests", d("0.80"), None),
            (
                "Refund of Pro flat fee, 2026-12-16 – 2027-01-01",
                d("-10.32"),
                Some(Advance::Credit)
            ),
            (
                "Pro Plus flat fee, 2026-12-16 – 2027-01-01",
                d("25.81"),
                Some(Advance::Charge)
            ),
            (
                "Pro Plus flat fee, 2027-01-01 – 2027-02-01",
                d("50.00"),
                Some(Advance::Fee)
            ),
        ]
    );
    assert_eq!(dec_inv.lines[2].amount_exact.round_dp(6), d("-10.322581"));
    assert_eq!(dec_inv.lines[3].amount_exact.round_dp(6), d("25.806452"));
    assert_eq!(dec_inv.total, d("66.69"));
    // What late usage is delta-rated against: the usage lines only.
    let arrears = advance::arrears(rate(&dec_p, &dec_segs, &[]).unwrap(), &dec_segs);
    assert_eq!(arrears.total, d("1.20"));
}

#[test]
fn in_advance_seats_a_cancellation_and_a_trial() {
    let team = in_advance("team_adv", "Team", "0", "15");
    let seg = |trial, start, end| Segment {
        trial,
        plan: team.clone(),
        start: nov(start),
        end: nov(end),
        usage: vec![],
    };
    let seats = |v: &[(u32, u32, u32)]| -> Vec<SeatInterval> {
        v.iter()
            .map(|&(a, b, n)| SeatInterval {
                start: nov(a),
                end: nov(b),
                seats: n,
            })
            .collect()
    };
    // 5 seats from Nov 1 to Nov 16, 3 after: refund 5 × 15 × 15/30 and
    // charge 3 × 15 × 15/30; the flat fee (none here) does not move.
    let segs = [seg(false, 1, 31)];
    let s = seats(&[(1, 16, 5), (16, 31, 3)]);
    let ch = advance::changes(NOV, &segs, &s).unwrap();
    assert_eq!(
        lines_of(&ch),
        [
            (
                "Refund of Team seats, 2026-11-16 – 2026-12-01",
                d("-37.50"),
                Some(Advance::Credit)
            ),
            (
                "Team seats, 2026-11-16 – 2026-12-01",
                d("22.50"),
                Some(Advance::Charge)
            ),
        ]
    );
    // Cancelled Nov 13 with 4 seats: 4 × 15 × 18/30 refunded, nothing charged.
    let ch = advance::changes(NOV, &[seg(false, 1, 13)], &seats(&[(1, 31, 4)])).unwrap();
    assert_eq!(
        lines_of(&ch),
        [(
            "Refund of Team seats, 2026-11-13 – 2026-12-01",
            d("-36.00"),
            Some(Advance::Credit)
        )]
    );
    // A 14-day trial from Nov 1: nothing to bill at the start; the paid
    // rest of the period is invoiced when the trial ends, and the trial's
    // waived seats stay on the period's own lines.
    let segs = [seg(true, 1, 15), seg(false, 15, 31)];
    let s = seats(&[(1, 31, 2)]);
    assert_eq!(advance::start_instants(&segs, &s, NOV), [nov(15)]);
    assert_eq!(
        lines_of(&advance::opening(NOV, &segs, &s, nov(15)).unwrap().lines),
        [(
            "Team seats, 2026-11-15 – 2026-12-01",
            d("16.00"),
            Some(Advance::Fee)
        )]
    );
    assert!(advance::changes(NOV, &segs, &s).unwrap().is_empty());
    let own = advance::arrears(rate(&NOV, &segs, &s).unwrap(), &segs);
    assert_eq!(
        own.lines
            .iter()
            .map(|l| (l.amount, l.waived))
            .collect::<Vec<_>>(),
        [(d("0.00"), Some(d("14.00")))]
    );
    // A subscription running on from October is no start; a first one
    // on Nov 1 is (read from a second before the period).
    let from_oct = [Segment {
        start: nov(1) - chrono::Duration::seconds(1),
        ..seg(false, 1, 31)
    }];
    assert!(advance::start_instants(&from_oct, &[], NOV).is_empty());
    assert_eq!(
        advance::start_instants(&[seg(false, 1, 31)], &[], NOV),
        [nov(1)]
    );
}

#[test]
fn a_plan_billing_in_advance_has_no_minimum_or_maximum() {
    let p: PlanVersion = serde_json::from_value(json!({"plan":"p","version":1,"name":"P",
        "currency":"USD","flat_fee":"20","minimum":"30","maximum":"90","fee_timing":"in_advance"}))
    .unwrap();
    let errs = p
        .validate(&schemas::MeterCatalog::default_catalog())
        .unwrap_err();
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["minimum", "maximum"]);
    assert!(
        errs[0].message.contains("in_advance"),
        "{}",
        errs[0].message
    );
}
