//! The default catalog validates, and rates sample months as its README
//! table says.

use billing_api::catalog::Catalog;
use billing_api::rating::{rate, Period, Rated, SeatInterval, Segment, UsageItem};
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;

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

fn u(meter: &str, dims: &[(&str, &str)], q: &str) -> UsageItem {
    UsageItem {
        meter: meter.into(),
        dims: dims
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        quantity: d(q),
        events: 1,
    }
}

fn month(plan: &str, usage: Vec<UsageItem>, seats: &[SeatInterval]) -> Rated {
    let cat = Catalog::default_catalog();
    let p = cat.latest(plan).unwrap().clone();
    let period = Period {
        start: nov(1),
        end: nov(31),
    };
    rate(
        &period,
        &[Segment {
            trial: false,
            plan: p,
            start: nov(1),
            end: nov(31),
            usage,
        }],
        seats,
    )
    .unwrap()
}

#[test]
fn default_catalog_is_valid() {
    let cat = Catalog::default_catalog();
    cat.validate(&schemas::MeterCatalog::default_catalog())
        .unwrap();
    for p in ["free", "payg", "team", "business"] {
        assert!(cat.latest(p).is_some(), "missing plan {p}");
    }
}

#[test]
fn an_idle_toy_app_costs_cents_on_payg_and_nothing_on_free() {
    // One t4g.nano all month (720 h), 1 GB volume, 30,000 requests, 100 MB out.
    let usage = || {
        vec![
            u(
                "compute",
                &[("instance_type", "t4g.nano"), ("region", "fra")],
                "2592000",
            ),
            u("disk", &[("volume_id", "v")], "2592000"),
            u("requests", &[], "30000"),
            u("egress", &[], "100000000"),
        ]
    };
    let payg = month("payg", usage(), &[]);
    // 720 × 0.0058 = 4.176 → 4.18; 1 × 0.20; 0.03 × 0.40 = 0.012 → 0.01; 0.1 × 0.09 = 0.009 → 0.01.
    assert_eq!(
        payg.lines.iter().map(|l| l.amount).collect::<Vec<_>>(),
        vec![d("4.18"), d("0.20"), d("0.01"), d("0.01")]
    );
    assert_eq!(payg.total, d("4.40"));
    assert_eq!(month("free", usage(), &[]).total, d("0.00"));
}

#[test]
fn team_allowances_scale_with_seat_time() {
    // 2 seats for the first half, 4 for the second: 3 seat-months.
    let seats = [
        SeatInterval {
            start: nov(1),
            end: nov(16),
            seats: 2,
        },
        SeatInterval {
            start: nov(16),
            end: nov(31),
            seats: 4,
        },
    ];
    let r = month("team", vec![u("requests", &[], "20000000")], &seats);
    // Seats 3 × 15 = 45; requests 20 M − 15 M included = 5 M × 0.30 = 1.50.
    assert_eq!(r.total, d("46.50"));
}

#[test]
fn business_flat_fee_and_volume_discounted_egress() {
    let r = month(
        "business",
        vec![
            u("egress", &[], "2000000000000"),
            u("requests", &[], "60000000"),
        ],
        &[],
    );
    // 299 + 2,000 GB all at 0.06 = 120 + (60 − 50) M × 0.30 = 3 → 422.
    assert_eq!(r.total, d("422.00"));
}

#[test]
fn quota_limits_are_catalog_data_and_validated() {
    let cat = Catalog::default_catalog();
    let free = cat.latest("free").unwrap();
    assert_eq!(free.limits.max_instances_per_app, Some(1));
    assert_eq!(
        free.limits.instance_types.as_deref(),
        Some(&["t4g.nano".to_string()][..])
    );
    assert_eq!(free.limits.default_spending_cap, Some(Decimal::ZERO));
    assert_eq!(
        cat.latest("payg").unwrap().limits.max_instances_per_app,
        Some(5)
    );
    assert_eq!(
        cat.latest("payg").unwrap().limits.instance_types,
        None,
        "all types"
    );

    // An allowed type the plan does not price, a negative size or cap: errors by field.
    let meters = schemas::MeterCatalog::default_catalog();
    let mut bad = free.clone();
    bad.limits.instance_types = Some(vec!["c6g.large".into()]);
    bad.limits.max_volume_gb = Some(d("-1"));
    bad.limits.default_spending_cap = Some(d("-5"));
    let errs = bad.validate(&meters).unwrap_err();
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "limits.instance_types[0]",
            "limits.max_volume_gb",
            "limits.default_spending_cap"
        ]
    );
    // Unknown limit keys are refused when parsing.
    let mut v = serde_json::to_value(free).unwrap();
    v["limits"]["max_gpus"] = serde_json::json!(1);
    assert!(serde_json::from_value::<billing_api::catalog::PlanVersion>(v).is_err());
}
