//! Discounts, tax and credits on an invoice: BILLING-EXAMPLES.md examples
//! 11 and 12 with every figure asserted, one case per rule, and properties
//! over random coupons, rates, grants and charges.

use testkit::billing::line;

use billing_domain::credit::{self, Grant, GrantKind};
use billing_domain::invoice::{build, settle_invoice, NewInvoice};
use billing_domain::rating::{Line, LineKind, Period, Rated};
use billing_domain::settle::{
    self, settle, Applied, Charge, Coupon, CouponDuration, Inputs, Scope, TaxProfile, TaxRate,
    TaxTreatment,
};
use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

fn at(m: u32, day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, m, day, 0, 0, 0).unwrap()
}

const NOV: Period = Period {
    start: DateTime::from_timestamp(1793491200, 0).unwrap(), // 2026-11-01
    end: DateTime::from_timestamp(1796083200, 0).unwrap(),   // 2026-12-01
};

fn invoice(lines: Vec<Line>) -> NewInvoice {
    let rated = Rated::of_lines("USD".into(), 2, lines);
    build("cus_1", NOV, rated, None, &[], d("0.50"))
}

fn grant(id: &str, kind: GrantKind, amount: &str, expires: Option<DateTime<Utc>>) -> Grant {
    Grant {
        id: id.into(),
        customer_id: "cus_1".into(),
        kind,
        currency: "USD".into(),
        amount: d(amount),
        remaining: d(amount),
        effective_at: at(11, 2),
        expires_at: expires,
        priority: 10,
        reason: String::new(),
        usable: true,
        invoice_id: None,
        created_at: at(11, 2),
        voided_at: None,
    }
}

fn coupon(
    id: &str,
    percent: Option<&str>,
    amount: Option<&str>,
    duration: CouponDuration,
) -> Coupon {
    Coupon {
        id: id.into(),
        version: 1,
        name: id.into(),
        percent_off: percent.map(d),
        amount_off: amount.map(d),
        currency: amount.map(|_| "USD".into()),
        duration,
        periods: None,
        applies_to: None,
        max_redemptions: None,
    }
}

fn applied(c: Coupon, at_: DateTime<Utc>) -> Applied {
    Applied {
        id: format!("app_{}", c.id),
        customer_id: "cus_1".into(),
        coupon: c,
        applied_at: at_,
        removed_at: None,
        ends_at: None,
        redeemed: 0,
    }
}

fn vat(id: &str, pct: &str, inclusive: bool) -> TaxRate {
    TaxRate {
        id: id.into(),
        name: "VAT".into(),
        country: "DE".into(),
        region: None,
        percentage: d(pct),
        inclusive,
        archived: false,
    }
}

fn standard(rates: Vec<TaxRate>) -> Inputs {
    Inputs {
        treatment: Some(TaxTreatment::Standard),
        rates,
        until: Some(NOV.end),
        ..Inputs::default()
    }
}

#[test]
fn example_11_credits() {
    // November invoice $7.40 before credits.
    let mut n = invoice(vec![line(LineKind::Usage, Some("requests"), "7.40")]);
    let promo = grant("promo", GrantKind::Promotional, "5.00", Some(at(12, 31)));
    let bought = grant("bought", GrantKind::Purchased, "20.00", None);
    let mut expired = grant("expired", GrantKind::Promotional, "3.00", Some(at(11, 20)));
    expired.priority = 0;
    let grants = vec![bought.clone(), expired.clone(), promo.clone()];
    let inputs = Inputs {
        grants: grants.clone(),
        until: Some(NOV.end),
        ..Inputs::default()
    };
    settle_invoice(&mut n, inputs, d("0.50"));
    let s = n.body.settlement.as_ref().unwrap();
    let paid: Vec<(&str, Decimal, Decimal)> = s
        .credits
        .iter()
        .map(|c| (c.grant_id.as_str(), c.balance_before, c.amount))
        .collect();
    // Earliest expiry first: promotional $5.00, then purchased $2.40; the
    // grant that expired on Nov 20 pays nothing.
    assert_eq!(
        paid,
        [
            ("promo", d("5.00"), d("-5.00")),
            ("bought", d("20.00"), d("-2.40"))
        ]
    );
    assert_eq!(
        (n.total, n.credit_total, n.amount_due),
        (d("7.40"), d("-7.40"), d("0.00"))
    );
    assert_eq!(n.amount_due.to_string(), "0.00");
    // Settled by credits: not sent for payment.
    assert_eq!(n.sync_status.as_str(), "nothing_due");
    // Balances after: $0.00 and $17.60.
    assert_eq!(credit::after(&promo, &s.credits), d("0.00"));
    assert_eq!(credit::after(&bought, &s.credits), d("17.60"));
    // The expired grant's remainder expires (an expiry entry at Nov 20),
    // once no invoice can still consume it.
    let grace = Duration::hours(1);
    assert!(!credit::expiry_due(&expired, at(11, 20), grace));
    assert!(credit::expiry_due(&expired, at(11, 20) + grace, grace));
    // The evidence holds only the grants that could pay.
    let with: Vec<&str> = n
        .body
        .settled_with
        .as_ref()
        .unwrap()
        .grants
        .iter()
        .map(|g| g.id.as_str())
        .collect();
    assert_eq!(with, ["bought", "promo"]);
}

#[test]
fn example_12_order_of_steps() {
    // Usage $80.00 and seats $20.00; 10 % off everything; VAT 20 %
    // exclusive; a credit balance of $50.00.
    let mut n = invoice(vec![
        line(LineKind::Usage, Some("requests"), "80.00"),
        line(LineKind::SeatFee, None, "20.00"),
    ]);
    let inputs = Inputs {
        coupons: vec![applied(
            coupon("ten", Some("10"), None, CouponDuration::Forever),
            at(11, 1),
        )],
        grants: vec![grant("g", GrantKind::Purchased, "50.00", None)],
        ..standard(vec![vat("de_vat", "20", false)])
    };
    settle_invoice(&mut n, inputs, d("0.50"));
    let s = n.body.settlement.as_ref().unwrap();
    assert_eq!(n.subtotal, d("100.00"));
    assert_eq!(s.discounts.len(), 1);
    assert_eq!(
        (s.discounts[0].base, s.discounts[0].amount),
        (d("100.00"), d("-10.00"))
    );
    assert_eq!(s.taxes.len(), 1);
    assert_eq!(
        (s.taxes[0].taxable, s.taxes[0].amount),
        (d("90.00"), d("18.00"))
    );
    assert_eq!(
        (n.discount_total, n.tax_total, n.total),
        (d("-10.00"), d("18.00"), d("108.00"))
    );
    assert_eq!((n.credit_total, n.amount_due), (d("-50.00"), d("58.00")));
    assert_eq!(n.sync_status.as_str(), "pending");

    // 15 % of $33.33 is 4.9995: −$5.00, rounded once.
    let s = settle(
        &[charge(LineKind::Usage, "33.33")],
        Decimal::ZERO,
        "USD",
        2,
        &Inputs {
            coupons: vec![applied(
                coupon("c15", Some("15"), None, CouponDuration::Once),
                at(11, 1),
            )],
            ..Inputs::default()
        },
    );
    assert_eq!(s.discounts[0].amount_exact, d("-4.9995"));
    assert_eq!(s.discount_total, d("-5.00"));

    // $25 off once on a $20.00 invoice: −$20.00, the rest is not carried.
    let mut n = invoice(vec![line(LineKind::FlatFee, None, "20.00")]);
    settle_invoice(
        &mut n,
        Inputs {
            coupons: vec![applied(
                coupon("c25", None, Some("25.00"), CouponDuration::Once),
                at(11, 1),
            )],
            ..Inputs::default()
        },
        d("0.50"),
    );
    assert_eq!(
        (n.discount_total, n.total, n.amount_due),
        (d("-20.00"), d("0.00"), d("0.00"))
    );

    // $120.00 with 20 % VAT included: the line stays, the tax shows $20.00
    // included and adds nothing.
    let mut n = invoice(vec![line(LineKind::FlatFee, None, "120.00")]);
    settle_invoice(
        &mut n,
        standard(vec![vat("de_incl", "20", true)]),
        d("0.50"),
    );
    let s = n.body.settlement.as_ref().unwrap();
    assert_eq!(
        (s.taxes[0].amount, s.tax_included, n.tax_total),
        (d("20.00"), d("20.00"), d("0.00"))
    );
    assert!(s.taxes[0].description.contains("included"));
    assert_eq!(n.total, d("120.00"));
}

fn charge(kind: LineKind, amount: &str) -> Charge {
    Charge {
        kind,
        meter: (kind == LineKind::Usage).then(|| "requests".into()),
        amount: d(amount),
    }
}

#[test]
fn coupons_apply_in_order_each_on_what_the_earlier_left_in_its_scope() {
    let charges = [
        charge(LineKind::Usage, "60.00"),
        charge(LineKind::FlatFee, "40.00"),
    ];
    let mut on_usage = coupon("half_usage", Some("50"), None, CouponDuration::Forever);
    on_usage.applies_to = Some(Scope {
        meters: vec!["requests".into()],
        fees: vec![],
    });
    let all = coupon("ten_off", None, Some("10.00"), CouponDuration::Forever);
    let s = settle(
        &charges,
        Decimal::ZERO,
        "USD",
        2,
        &Inputs {
            coupons: vec![
                applied(all.clone(), at(11, 1)),
                applied(on_usage.clone(), at(11, 2)),
            ],
            ..Inputs::default()
        },
    );
    // $10 off all, shared 6:4, leaves usage at $54.00; half of it: $27.00.
    let got: Vec<(Decimal, Decimal)> = s.discounts.iter().map(|x| (x.base, x.amount)).collect();
    assert_eq!(got, [(d("100.00"), d("-10.00")), (d("54.00"), d("-27.00"))]);
    // The other order: half the usage ($30), then $10 of the $70 left.
    let s = settle(
        &charges,
        Decimal::ZERO,
        "USD",
        2,
        &Inputs {
            coupons: vec![applied(on_usage, at(11, 1)), applied(all, at(11, 2))],
            ..Inputs::default()
        },
    );
    let got: Vec<(Decimal, Decimal)> = s.discounts.iter().map(|x| (x.base, x.amount)).collect();
    assert_eq!(got, [(d("60.00"), d("-30.00")), (d("70.00"), d("-10.00"))]);
    // A coupon on seats when there are none discounts nothing.
    let mut seats = coupon("seats", Some("100"), None, CouponDuration::Forever);
    seats.applies_to = Some(Scope {
        meters: vec![],
        fees: vec![LineKind::SeatFee],
    });
    let s = settle(
        &charges,
        Decimal::ZERO,
        "USD",
        2,
        &Inputs {
            coupons: vec![applied(seats, at(11, 1))],
            ..Inputs::default()
        },
    );
    assert_eq!(s.discount_total, d("0.00"));
    // Zero is written as zero, never "-0.00".
    assert_eq!(s.discounts[0].amount.to_string(), "0.00");
    assert_eq!(s.discounts[0].amount_exact.to_string(), "0");
    assert!(!settle::redeems(&s.discounts[0]));
    // An amount off in another currency does not apply at all.
    let mut euros = coupon("eur5", None, Some("5.00"), CouponDuration::Once);
    euros.currency = Some("EUR".into());
    let i = settle::inputs(
        &[applied(euros, at(11, 1))],
        None,
        &[],
        &[],
        "USD",
        NOV.end,
        NOV.end,
        NOV.end,
    );
    assert!(i.coupons.is_empty());
}

#[test]
fn coupon_durations_once_repeating_forever_and_removal() {
    let mut a = applied(
        coupon("c", Some("10"), None, CouponDuration::Once),
        at(11, 15),
    );
    // Once: the first invoice issued at or after it was applied.
    assert!(!a.applies(at(11, 14), NOV.end));
    assert!(a.applies(at(12, 1), NOV.end));
    a.redeemed = 1;
    assert!(!a.applies(
        Utc.with_ymd_and_hms(2027, 1, 1, 1, 0, 0).unwrap(),
        at(12, 1)
    ));
    // Three periods from November: November's, December's and January's
    // invoices, not February's.
    let mut r = applied(
        coupon("r", Some("10"), None, CouponDuration::Repeating),
        at(11, 15),
    );
    r.coupon.periods = Some(3);
    r.ends_at = Some(Utc.with_ymd_and_hms(2027, 2, 1, 0, 0, 0).unwrap());
    let feb1 = Utc.with_ymd_and_hms(2027, 2, 1, 1, 0, 0).unwrap();
    assert!(r.applies(feb1, Utc.with_ymd_and_hms(2027, 2, 1, 0, 0, 0).unwrap()));
    assert!(!r.applies(
        Utc.with_ymd_and_hms(2027, 3, 1, 1, 0, 0).unwrap(),
        Utc.with_ymd_and_hms(2027, 3, 1, 0, 0, 0).unwrap()
    ));
    // Forever until removed.
    let mut f = applied(
        coupon("f", Some("10"), None, CouponDuration::Forever),
        at(11, 1),
    );
    assert!(f.applies(feb1, feb1));
    f.removed_at = Some(at(12, 15));
    assert!(f.applies(at(12, 1), at(12, 1)));
    assert!(!f.applies(feb1, feb1));
}

#[test]
fn exempt_and_reverse_charge_invoices_carry_no_tax_and_say_so() {
    let rates = vec![vat("de_vat", "19", false), {
        let mut r = vat("by_extra", "1", false);
        r.region = Some("BY".into());
        r
    }];
    let profile = |exempt, reverse_charge, region: Option<&str>| TaxProfile {
        country: "DE".into(),
        region: region.map(str::to_owned),
        tax_id: Some("DE123456789".into()),
        exempt,
        reverse_charge,
    };
    // The region's rate applies only in the region.
    assert_eq!(profile(false, false, None).rates(&rates).len(), 1);
    assert_eq!(profile(false, false, Some("BY")).rates(&rates).len(), 2);
    for (p, treatment) in [
        (profile(true, false, None), TaxTreatment::Exempt),
        (profile(false, true, None), TaxTreatment::ReverseCharge),
    ] {
        let i = settle::inputs(&[], Some(&p), &rates, &[], "USD", NOV.end, NOV.end, NOV.end);
        let mut n = invoice(vec![line(LineKind::FlatFee, None, "100.00")]);
        settle_invoice(&mut n, i, d("0.50"));
        let s = n.body.settlement.as_ref().unwrap();
        assert_eq!(s.treatment, Some(treatment));
        assert!(s.taxes.is_empty());
        assert_eq!(s.tax_id.as_deref(), Some("DE123456789"));
        assert_eq!((n.tax_total, n.total), (d("0.00"), d("100.00")));
    }
    // Both at once, or reverse charge without a tax id: refused by field.
    assert_eq!(
        profile(true, true, None).validate().unwrap_err().field,
        "reverse_charge"
    );
    let mut p = profile(false, true, None);
    p.tax_id = None;
    assert_eq!(p.validate().unwrap_err().field, "tax_id");
}

/// Found by the property below: $3.81 of fees and a −$0.02 refund of
/// usage, with $0.87 and $2.93 off the fees: the second discount stops at
/// what keeps the whole invoice at zero ($2.92), not at the fees' $2.94.
#[test]
fn a_discount_never_takes_the_invoice_below_zero() {
    let mut a = coupon("c0", None, Some("0.87"), CouponDuration::Forever);
    a.applies_to = Some(Scope {
        meters: vec![],
        fees: vec![LineKind::FlatFee],
    });
    let mut b = a.clone();
    b.amount_off = Some(d("2.93"));
    let s = settle(
        &[
            charge(LineKind::FlatFee, "3.81"),
            charge(LineKind::Usage, "-0.02"),
        ],
        Decimal::ZERO,
        "USD",
        2,
        &Inputs {
            coupons: vec![applied(a, at(11, 1)), applied(b, at(11, 2))],
            ..Inputs::default()
        },
    );
    let got: Vec<Decimal> = s.discounts.iter().map(|x| x.amount).collect();
    assert_eq!(got, [d("-0.87"), d("-2.92")]);
    assert_eq!(s.discount_total, d("-3.79"));
}

#[test]
fn a_refund_invoice_consumes_no_credit_and_its_tax_is_refunded() {
    let s = settle(
        &[charge(LineKind::Usage, "-10.00")],
        Decimal::ZERO,
        "USD",
        2,
        &Inputs {
            grants: vec![grant("g", GrantKind::Promotional, "5.00", None)],
            coupons: vec![applied(
                coupon("c", Some("10"), None, CouponDuration::Forever),
                at(11, 1),
            )],
            ..standard(vec![vat("v", "20", false)])
        },
    );
    assert_eq!(s.discount_total, d("0.00"));
    assert_eq!(s.tax_total, d("-2.00"));
    assert!(s.credits.is_empty());
}

#[test]
fn catalog_data_is_refused_by_field() {
    let meters = ["requests", "compute"];
    let ok = coupon("c", Some("10"), None, CouponDuration::Once);
    assert_eq!(ok.validate(&meters), Ok(()));
    let cases: Vec<(Coupon, &str)> = vec![
        (
            Coupon {
                id: "Bad Id".into(),
                ..ok.clone()
            },
            "id",
        ),
        (
            Coupon {
                percent_off: Some(d("0")),
                ..ok.clone()
            },
            "percent_off",
        ),
        (
            Coupon {
                percent_off: Some(d("100.5")),
                ..ok.clone()
            },
            "percent_off",
        ),
        (
            Coupon {
                percent_off: None,
                ..ok.clone()
            },
            "percent_off",
        ),
        (
            Coupon {
                amount_off: Some(d("1.00")),
                ..ok.clone()
            },
            "amount_off",
        ),
        (
            coupon("a", None, Some("1.005"), CouponDuration::Once),
            "amount_off",
        ),
        (
            Coupon {
                currency: None,
                ..coupon("a", None, Some("1.00"), CouponDuration::Once)
            },
            "currency",
        ),
        (
            Coupon {
                duration: CouponDuration::Repeating,
                ..ok.clone()
            },
            "periods",
        ),
        (
            Coupon {
                periods: Some(2),
                ..ok.clone()
            },
            "periods",
        ),
        (
            Coupon {
                applies_to: Some(Scope {
                    meters: vec!["nope".into()],
                    fees: vec![],
                }),
                ..ok.clone()
            },
            "applies_to.meters",
        ),
        (
            Coupon {
                applies_to: Some(Scope {
                    meters: vec![],
                    fees: vec![LineKind::Usage],
                }),
                ..ok.clone()
            },
            "applies_to.fees",
        ),
        (
            Coupon {
                applies_to: Some(Scope::default()),
                ..ok.clone()
            },
            "applies_to",
        ),
        (
            Coupon {
                max_redemptions: Some(0),
                ..ok.clone()
            },
            "max_redemptions",
        ),
    ];
    for (c, field) in cases {
        assert_eq!(c.validate(&meters).unwrap_err().field, field, "{c:?}");
    }
    let r = vat("v", "20", false);
    assert_eq!(r.validate(), Ok(()));
    for (r, field) in [
        (
            TaxRate {
                country: "de".into(),
                ..r.clone()
            },
            "country",
        ),
        (
            TaxRate {
                percentage: d("101"),
                ..r.clone()
            },
            "percentage",
        ),
        (
            TaxRate {
                percentage: d("-1"),
                ..r.clone()
            },
            "percentage",
        ),
        (
            TaxRate {
                percentage: d("1.00001"),
                ..r.clone()
            },
            "percentage",
        ),
        (
            TaxRate {
                name: " ".into(),
                ..r.clone()
            },
            "name",
        ),
    ] {
        assert_eq!(r.validate().unwrap_err().field, field);
    }
}

// ------------------------------------------------------------ properties

fn arb_grant() -> impl Strategy<Value = Grant> {
    (
        0u32..5000,
        prop::option::of(0i64..60),
        0u32..4,
        0i64..40,
        any::<bool>(),
        any::<u8>(),
    )
        .prop_map(|(cents, exp, priority, eff, usable, id)| {
            let mut g = grant(&format!("g{id}"), GrantKind::Promotional, "1", None);
            g.amount = Decimal::new(cents as i64 + 1, 2);
            g.remaining = Decimal::new(cents as i64, 2);
            g.expires_at = exp.map(|days| NOV.start + Duration::days(days));
            g.effective_at = NOV.start + Duration::days(eff);
            g.priority = priority;
            g.usable = usable;
            g
        })
}

fn arb_coupon() -> impl Strategy<Value = Applied> {
    (any::<bool>(), 1u32..10000, 0u8..3, any::<u8>()).prop_map(|(pct, n, scope, id)| {
        let mut c = if pct {
            coupon(
                &format!("c{id}"),
                Some(&Decimal::new(n as i64, 2).to_string()),
                None,
                CouponDuration::Forever,
            )
        } else {
            coupon(
                &format!("c{id}"),
                None,
                Some(&Decimal::new(n as i64, 2).to_string()),
                CouponDuration::Forever,
            )
        };
        c.applies_to = match scope {
            0 => None,
            1 => Some(Scope {
                meters: vec!["requests".into()],
                fees: vec![],
            }),
            _ => Some(Scope {
                meters: vec![],
                fees: vec![LineKind::FlatFee],
            }),
        };
        applied(c, at(11, 1))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn every_step_is_rounded_once_and_nothing_goes_below_zero(
        amounts in prop::collection::vec((-2000i64..200000, any::<bool>()), 0..6),
        coupons in prop::collection::vec(arb_coupon(), 0..4),
        rates in prop::collection::vec((0u32..3000, any::<bool>()), 0..3),
        mut grants in prop::collection::vec(arb_grant(), 0..6),
        carried in 0i64..500,
    ) {
        let charges: Vec<Charge> = amounts.iter().map(|(c, usage)| Charge {
            kind: if *usage { LineKind::Usage } else { LineKind::FlatFee },
            meter: usage.then(|| "requests".into()),
            amount: Decimal::new(*c, 2),
        }).collect();
        for (i, g) in grants.iter_mut().enumerate() {
            g.id = format!("g{i}");
        }
        let rates: Vec<TaxRate> = rates.iter().enumerate().map(|(i, (bp, incl))| {
            vat(&format!("r{i}"), &Decimal::new(*bp as i64, 2).to_string(), *incl)
        }).collect();
        let inputs = Inputs { coupons, grants: grants.clone(), ..standard(rates) };
        let carried = Decimal::new(carried, 2);
        let s = settle(&charges, carried, "USD", 2, &inputs);
        let net: Decimal = charges.iter().map(|c| c.amount).sum();
        // Each line is in cents; the totals are the sums of the lines.
        for x in s.discounts.iter().map(|x| x.amount).chain(s.taxes.iter().map(|t| t.amount)).chain(s.credits.iter().map(|c| c.amount)) {
            prop_assert_eq!(x.round_dp(2), x);
        }
        prop_assert_eq!(s.discount_total, s.discounts.iter().map(|x| x.amount).sum::<Decimal>());
        prop_assert_eq!(s.tax_total, s.taxes.iter().filter(|t| !t.inclusive).map(|t| t.amount).sum::<Decimal>());
        prop_assert_eq!(s.credit_total, s.credits.iter().map(|c| c.amount).sum::<Decimal>());
        // Discounts never take the charges in scope (nor all of them) below zero.
        prop_assert!(s.discount_total <= Decimal::ZERO);
        for x in &s.discounts {
            prop_assert!(x.amount <= Decimal::ZERO);
            prop_assert!(-x.amount <= x.base.max(Decimal::ZERO));
        }
        if net >= Decimal::ZERO {
            prop_assert!(net + s.discount_total >= Decimal::ZERO);
        }
        // Credits: never below zero, never more than a grant holds, in order.
        let total = net + s.discount_total + s.tax_total + carried;
        let due = total + s.credit_total;
        if total >= Decimal::ZERO {
            prop_assert!(due >= Decimal::ZERO);
        } else {
            prop_assert!(s.credits.is_empty());
        }
        let mut seen = std::collections::HashSet::new();
        for c in &s.credits {
            prop_assert!(seen.insert(c.grant_id.clone()));
            let g = grants.iter().find(|g| g.id == c.grant_id).unwrap();
            prop_assert!(credit::can_pay(g, "USD", NOV.end));
            prop_assert!(-c.amount <= g.remaining && c.amount < Decimal::ZERO);
            prop_assert_eq!(c.balance_before, g.remaining);
        }
        for w in s.credits.windows(2) {
            let a = grants.iter().find(|g| g.id == w[0].grant_id).unwrap();
            let b = grants.iter().find(|g| g.id == w[1].grant_id).unwrap();
            prop_assert!(credit::consumption_order(a, b).is_le());
            // Only the last grant consumed can be left with a balance.
            prop_assert_eq!(credit::after(a, &s.credits), Decimal::ZERO);
        }
        // A grant that could pay is untouched only if the due was covered.
        let usable: Decimal = grants.iter().filter(|g| credit::can_pay(g, "USD", NOV.end)).map(|g| g.remaining).sum();
        if total > Decimal::ZERO {
            prop_assert_eq!(-s.credit_total, usable.min(total));
        }
        // Recomputed from the same inputs, every step is the same.
        prop_assert_eq!(settle(&charges, carried, "USD", 2, &inputs), s);
    }
}
