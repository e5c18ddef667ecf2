//! Quota decisions across tiers, plans, caps and instance types, on the
//! default catalog, with hand-computed forecasts. November 2026 (720 h);
//! checks made on November 11 (10 days used, 20 days = 480 h left).

use billing_api::catalog::Catalog;
use billing_api::quota::{decide, forecast, Ask, Decision, QuotaInput, Reason, Running};
use billing_api::rating::{Period, UsageItem};
use chrono::{TimeZone, Utc};
use rust_decimal::Decimal;

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

fn requests(n: &str) -> UsageItem {
    UsageItem {
        meter: "requests".into(),
        dims: Default::default(),
        quantity: d(n),
        events: 1,
    }
}

fn nano_secs(s: i64) -> UsageItem {
    UsageItem {
        meter: "compute".into(),
        dims: [("instance_type".to_string(), "t4g.nano".to_string())].into(),
        quantity: Decimal::from(s),
        events: 1,
    }
}

fn running(instances: &[(&str, &str, u32)], volumes: &[(&str, &str, &str)]) -> Running {
    Running {
        instances: instances
            .iter()
            .map(|(a, t, n)| ((a.to_string(), t.to_string()), *n))
            .collect(),
        volumes: volumes
            .iter()
            .map(|(a, v, g)| ((a.to_string(), v.to_string()), d(g)))
            .collect(),
    }
}

fn start(app: &str, ty: &str, count: u32) -> Ask {
    Ask::StartInstances {
        app: app.into(),
        instance_type: ty.into(),
        count,
    }
}

fn grow(app: &str, vol: &str, gb: &str) -> Ask {
    Ask::GrowVolume {
        app: app.into(),
        volume_id: vol.into(),
        size_gb: d(gb),
    }
}

struct Case {
    name: &'static str,
    plan: &'static str,
    usage: Vec<UsageItem>,
    running: Running,
    suspended: bool,
    cap: Option<&'static str>,
    ask: Ask,
    /// (allow, reason, limit, current, projected usage cost)
    want: (
        bool,
        Option<Reason>,
        Option<&'static str>,
        &'static str,
        Option<&'static str>,
    ),
}

#[test]
fn quota_decision_table() {
    let cat = Catalog::default_catalog();
    let period = Period {
        start: Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
        end: Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
    };
    let now = Utc.with_ymd_and_hms(2026, 11, 11, 0, 0, 0).unwrap();
    let web2small = || running(&[("web", "t4g.small", 2)], &[]);
    let cases = vec![
        Case {
            name: "free: one nano for the rest of the month stays inside 750 free hours",
            plan: "free",
            usage: vec![],
            running: Running::default(),
            suspended: false,
            cap: None,
            ask: start("web", "t4g.nano", 1),
            want: (true, None, None, "0", Some("0")),
        },
        Case {
            name: "free: a second instance in the same app is over the tier limit",
            plan: "free",
            usage: vec![nano_secs(240 * 3600)],
            running: running(&[("web", "t4g.nano", 1)], &[]),
            suspended: false,
            cap: None,
            ask: start("web", "t4g.nano", 1),
            want: (false, Some(Reason::TierLimit), Some("1"), "1", None),
        },
        Case {
            // 240 h used + 2 × 480 h = 1,200 h; 450 h past the free 750 × $0.0058.
            name:
                "free: a nano in a second app would cost $2.61 past the free hours, over the $0 cap",
            plan: "free",
            usage: vec![nano_secs(240 * 3600)],
            running: running(&[("web", "t4g.nano", 1)], &[]),
            suspended: false,
            cap: None,
            ask: start("api", "t4g.nano", 1),
            want: (
                false,
                Some(Reason::SpendingCap),
                Some("0"),
                "0",
                Some("2.61"),
            ),
        },
        Case {
            name: "free with the customer's own $5 cap: the same start is allowed",
            plan: "free",
            usage: vec![nano_secs(240 * 3600)],
            running: running(&[("web", "t4g.nano", 1)], &[]),
            suspended: false,
            cap: Some("5"),
            ask: start("api", "t4g.nano", 1),
            want: (true, None, None, "0", Some("2.61")),
        },
        Case {
            name: "free: c6g.large is not in the tier",
            plan: "free",
            usage: vec![],
            running: Running::default(),
            suspended: false,
            cap: None,
            ask: start("web", "c6g.large", 1),
            want: (false, Some(Reason::InstanceTypeNotInTier), None, "0", None),
        },
        Case {
            name: "payg: an instance type no plan prices",
            plan: "payg",
            usage: vec![],
            running: Running::default(),
            suspended: false,
            cap: None,
            ask: start("web", "x9.huge", 1),
            want: (false, Some(Reason::InstanceTypeNotInTier), None, "0", None),
        },
        Case {
            // 30 M requests × $0.40 + 3 × 480 h × $0.0232 = 12.00 + 33.41.
            name: "payg: one more t4g.small projects $45.41, over a $40 cap",
            plan: "payg",
            usage: vec![requests("10000000")],
            running: web2small(),
            suspended: false,
            cap: Some("40"),
            ask: start("web", "t4g.small", 1),
            want: (
                false,
                Some(Reason::SpendingCap),
                Some("40"),
                "4.00",
                Some("45.41"),
            ),
        },
        Case {
            name: "payg: the same under a $50 cap",
            plan: "payg",
            usage: vec![requests("10000000")],
            running: web2small(),
            suspended: false,
            cap: Some("50"),
            ask: start("web", "t4g.small", 1),
            want: (true, None, None, "0", Some("45.41")),
        },
        Case {
            name: "payg: 2 running + 4 is over 5 per app",
            plan: "payg",
            usage: vec![],
            running: web2small(),
            suspended: false,
            cap: None,
            ask: start("web", "t4g.small", 4),
            want: (false, Some(Reason::TierLimit), Some("5"), "2", None),
        },
        Case {
            name: "payg: the limit is per app",
            plan: "payg",
            usage: vec![],
            running: web2small(),
            suspended: false,
            cap: None,
            ask: start("api", "t4g.small", 4),
            want: (true, None, None, "0", None),
        },
        Case {
            name: "suspended: no scale-up",
            plan: "payg",
            usage: vec![],
            running: Running::default(),
            suspended: true,
            cap: None,
            ask: start("web", "t4g.nano", 1),
            want: (false, Some(Reason::AccountSuspended), None, "0", None),
        },
        Case {
            name: "suspended: asking for nothing more is allowed",
            plan: "payg",
            usage: vec![],
            running: web2small(),
            suspended: true,
            cap: None,
            ask: start("web", "t4g.small", 0),
            want: (true, None, None, "0", None),
        },
        Case {
            name: "free: a 2 GB volume is over 1 GB",
            plan: "free",
            usage: vec![],
            running: Running::default(),
            suspended: false,
            cap: None,
            ask: grow("web", "vol-1", "2"),
            want: (false, Some(Reason::TierLimit), Some("1"), "0", None),
        },
        Case {
            name: "payg: 100 GB to 600 GB is over 500 GB",
            plan: "payg",
            usage: vec![],
            running: running(&[], &[("web", "vol-1", "100")]),
            suspended: false,
            cap: None,
            ask: grow("web", "vol-1", "600"),
            want: (false, Some(Reason::TierLimit), Some("500"), "100", None),
        },
        Case {
            // 300 GB × 480 h of a 720 h GB-month × $0.20 = $40.00.
            name: "payg: growing 100 GB to 300 GB projects $40 of disk for the rest of the month",
            plan: "payg",
            usage: vec![],
            running: running(&[], &[("web", "vol-1", "100")]),
            suspended: false,
            cap: Some("39.99"),
            ask: grow("web", "vol-1", "300"),
            want: (
                false,
                Some(Reason::SpendingCap),
                Some("39.99"),
                "0",
                Some("40.00"),
            ),
        },
        Case {
            name: "payg: shrinking a volume is always allowed",
            plan: "payg",
            usage: vec![],
            running: running(&[], &[("web", "vol-1", "100")]),
            suspended: true,
            cap: Some("0"),
            ask: grow("web", "vol-1", "50"),
            want: (true, None, None, "0", None),
        },
    ];
    for c in cases {
        let plan = cat.latest(c.plan).unwrap();
        let q = QuotaInput {
            trial_end: None,
            ends: None,
            plan,
            period,
            now,
            usage_to_date: &c.usage,
            earlier: &[],
            seats: &[],
            running: &c.running,
            suspended: c.suspended,
            spending_cap: c.cap.map(d),
            credit: Decimal::ZERO,
        };
        let got: Decision = decide(&q, &c.ask).unwrap();
        let (allow, reason, limit, current, cost) = c.want;
        assert_eq!(
            (got.allow, got.reason, got.limit, got.current),
            (allow, reason, limit.map(d), d(current)),
            "{}: {got:?}",
            c.name
        );
        if let Some(cost) = cost {
            assert_eq!(got.projected_usage_cost, d(cost), "{}", c.name);
        }
        // The plan maximum bounds the bill, never the usage cost.
        assert!(
            got.projected_month_end <= got.projected_usage_cost,
            "{}",
            c.name
        );
    }
}

#[test]
fn forecast_extends_counters_at_their_rate_and_gauges_as_they_run() {
    let cat = Catalog::default_catalog();
    let period = Period {
        start: Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
        end: Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
    };
    let usage = vec![requests("10000000")];
    let run = running(&[("web", "t4g.small", 2)], &[]);
    let at = |day: u32| QuotaInput {
        trial_end: None,
        ends: None,
        plan: cat.latest("payg").unwrap(),
        period,
        now: Utc.with_ymd_and_hms(2026, 11, day, 0, 0, 0).unwrap(),
        usage_to_date: &usage,
        earlier: &[],
        seats: &[],
        running: &run,
        suspended: false,
        spending_cap: None,
        credit: Decimal::ZERO,
    };
    // Day 11: 10 M so far → 30 M ($12.00); 2 smalls × 480 h × $0.0232 = $22.27.
    assert_eq!(forecast(&at(11)).unwrap(), d("34.27"));
    // Day 21: 10 M in 20 days → 15 M ($6.00); 2 × 240 h × $0.0232 = $11.14.
    assert_eq!(forecast(&at(21)).unwrap(), d("17.14"));
    // Cancelled on Nov 21 (issue 13): the forecast stops there. Day 11:
    // 10 M more to Nov 21 → 20 M ($8.00); 2 × 240 h × $0.0232 = $11.14.
    let cancelled = QuotaInput {
        ends: Some(Utc.with_ymd_and_hms(2026, 11, 21, 0, 0, 0).unwrap()),
        ..at(11)
    };
    assert_eq!(forecast(&cancelled).unwrap(), d("19.14"));
}

#[test]
fn a_cancellation_prorates_the_forecast_fees_to_it() {
    let cat = Catalog::default_catalog();
    let period = Period {
        start: Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
        end: Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
    };
    let run = running(&[], &[]);
    let q = |ends| QuotaInput {
        trial_end: None,
        ends,
        plan: cat.latest("business").unwrap(),
        period,
        now: Utc.with_ymd_and_hms(2026, 11, 5, 0, 0, 0).unwrap(),
        usage_to_date: &[],
        earlier: &[],
        seats: &[],
        running: &run,
        suspended: false,
        spending_cap: None,
        credit: Decimal::ZERO,
    };
    // $299 flat: the whole month, or 12 of its 30 days (cancelled Nov 13).
    assert_eq!(forecast(&q(None)).unwrap(), d("299.00"));
    let nov13 = Utc.with_ymd_and_hms(2026, 11, 13, 0, 0, 0).unwrap();
    assert_eq!(forecast(&q(Some(nov13))).unwrap(), d("119.60"));
}

/// Spending caps count credit: on the free tier ($0 cap), the nano in a
/// second app that would cost $2.61 past the free hours is allowed with
/// $5 of promotional credit, refused with $2.60, and the decision says
/// what credit it counted.
#[test]
fn a_zero_cap_lets_usage_run_as_far_as_the_credit() {
    let cat = Catalog::default_catalog();
    let period = Period {
        start: Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
        end: Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
    };
    let usage = vec![nano_secs(240 * 3600)];
    let running = running(&[("web", "t4g.nano", 1)], &[]);
    let q = |credit: &str| QuotaInput {
        trial_end: None,
        ends: None,
        plan: cat.latest("free").unwrap(),
        period,
        now: Utc.with_ymd_and_hms(2026, 11, 11, 0, 0, 0).unwrap(),
        usage_to_date: &usage,
        earlier: &[],
        seats: &[],
        running: &running,
        suspended: false,
        spending_cap: None,
        credit: d(credit),
    };
    let ask = start("api", "t4g.nano", 1);
    let with = decide(&q("5.00"), &ask).unwrap();
    assert_eq!(
        (
            with.allow,
            with.spending_cap,
            with.credit,
            with.projected_usage_cost
        ),
        (true, Some(d("0")), d("5.00"), d("2.61"))
    );
    let short = decide(&q("2.60"), &ask).unwrap();
    assert_eq!(
        (short.allow, short.reason),
        (false, Some(Reason::SpendingCap))
    );
    let exact = decide(&q("2.61"), &ask).unwrap();
    assert!(exact.allow);
}
