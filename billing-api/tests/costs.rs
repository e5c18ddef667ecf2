//! The cost report and the plan advisor against hand-computed figures: a
//! pay-as-you-go customer's first days of a month (the previous calendar
//! month, so the test means the same on any date), then the same over HTTP
//! for a customer session.

use testkit::billing as support;

use billing_api::costs::{advisor, report};
use billing_api::invoice::{month_of, previous};
use chrono::{Datelike, Duration, Utc};
use reqwest::Method as M;
use rust_decimal::Decimal;
use schemas::MeterCatalog;
use serde_json::json;
use support::*;

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

/// Half-even to cents.
fn cents(x: Decimal) -> Decimal {
    x.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointNearestEven)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_report_and_plan_advisor_match_hand_computed_figures() {
    let api = Api::start("costs").await;
    let p = previous(month_of(Utc::now()));
    let now = p.start + Duration::days(2) + Duration::hours(12);
    let h = |x: i64| p.start + Duration::hours(x);
    Writer::new(api.usage.clone())
        .write(&[
            (
                "e1".into(),
                "cus_c",
                h(2),
                "tally.compute",
                compute("web", "t4g.small", 36_000),
            ),
            (
                "e2".into(),
                "cus_c",
                h(3),
                "tally.compute",
                compute("api", "t4g.small", 18_000),
            ),
            (
                "e3".into(),
                "cus_c",
                h(29),
                "tally.requests",
                requests("web", 2_500_000),
            ),
            (
                "e4".into(),
                "cus_c",
                h(30),
                "tally.requests",
                requests("api", 500_000),
            ),
            (
                "e5".into(),
                "cus_c",
                h(49),
                "tally.compute",
                compute("web", "t4g.nano", 360_000),
            ),
            // After `now`: not counted yet.
            (
                "e6".into(),
                "cus_c",
                h(61),
                "tally.requests",
                requests("web", 9_000_000),
            ),
        ])
        .await;
    let (s, v) = api
        .call(
            M::POST,
            "/v1/customers",
            Some(json!({"id": "cus_c", "external_id": "cus_c", "name": "C"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = api
        .call(
            M::POST,
            "/v1/customers/cus_c/subscription",
            Some(json!({"plan": "payg", "starts_at": p.start})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let meters = MeterCatalog::default_catalog();

    let r = report(
        api.st.as_ref(),
        api.usage.as_ref(),
        &meters,
        &api.quota,
        "cus_c",
        now,
    )
    .await
    .unwrap();
    // t4g.small 15 h × 0.0232 = 0.348 → 0.35; requests 3 M × 0.40 = 1.20;
    // t4g.nano 100 h × 0.0058 = 0.58.
    assert_eq!(r.usage, d("2.13"));
    assert_eq!((r.fees, r.plan_adjustments), (d("0"), d("0")));
    assert_eq!(r.month_to_date, d("2.13"));
    let pairs = |v: &[billing_api::costs::Amount]| -> Vec<(String, Decimal)> {
        v.iter().map(|a| (a.key.clone(), a.amount)).collect()
    };
    assert_eq!(
        pairs(&r.by_meter),
        vec![
            ("compute".into(), d("0.93")),
            ("requests".into(), d("1.20"))
        ]
    );
    // 0.35 shared 2:1 → 0.23 / 0.12 (largest remainder); requests 5:1.
    assert_eq!(
        pairs(&r.by_app),
        vec![("api".into(), d("0.32")), ("web".into(), d("1.81"))]
    );
    let daily: Vec<(String, Decimal)> =
        r.daily.iter().map(|x| (x.date.clone(), x.amount)).collect();
    let day = |n: i64| (p.start + Duration::days(n)).format("%Y-%m-%d").to_string();
    assert_eq!(
        daily,
        vec![
            (day(0), d("0.35")),
            (day(1), d("1.20")),
            (day(2), d("0.58"))
        ]
    );
    // Forecast: requests continue at 3 M per 2.5 days; nothing runs now.
    let days = Decimal::from((p.end - p.start).num_days());
    let req_month = d("3") * days / d("2.5"); // millions
    let payg = d("0.93") + cents(req_month * d("0.40"));
    assert_eq!(r.forecast, payg, "{} days", p.start.month());
    assert_eq!(r.plan.as_ref().unwrap().plan, "payg");
    assert_eq!(r.spending_cap, None);

    let a = advisor(
        api.st.as_ref(),
        api.usage.as_ref(),
        &meters,
        &api.quota,
        "cus_c",
        now,
    )
    .await
    .unwrap();
    assert_eq!(a.forecast, payg);
    let row = |plan: &str| a.plans.iter().find(|x| x.plan == plan).unwrap().clone();
    let team = d("15") + d("0.52") + cents((req_month - d("5")).max(d("0")) * d("0.30"));
    let expect = [
        ("payg", d("2.13"), payg, true),
        // One seat: $15 fee; t4g.small inside the 100 h allowance; nano 100 h × 0.00522.
        ("team", d("15.52"), team, true),
        // $299 flat; small 15 h × 0.01856 = 0.28, nano 100 h × 0.00464 = 0.46.
        ("business", d("299.74"), d("299.74"), true),
        // Free does not price t4g.small and caps at $0.
        ("free", d("0"), d("0"), false),
    ];
    for (plan, mtd, forecast, fits) in expect {
        let x = row(plan);
        assert_eq!(
            (x.month_to_date, x.forecast, x.fits, x.saving),
            (mtd, forecast, fits, payg - forecast),
            "{plan}: {x:?}"
        );
        assert_eq!(x.current, plan == "payg");
    }
    assert!(row("free").note.unwrap().contains("t4g.small"));
    assert_eq!(
        a.plans.last().unwrap().plan,
        "free",
        "plans that do not fit come last"
    );

    // Over HTTP with the customer's session: the open month, same shape;
    // another customer's report is not found.
    let (_, sess) = api
        .call(M::POST, "/v1/customers/cus_c/sessions", Some(json!({})))
        .await;
    let token = sess["token"].as_str().unwrap().to_owned();
    let (s, me) = api.call_as(&token, M::GET, "/v1/me", None).await;
    assert_eq!(
        (s.as_u16(), me["customer_id"].as_str()),
        (200, Some("cus_c"))
    );
    let (s, c) = api
        .call_as(&token, M::GET, "/v1/customers/cus_c/costs", None)
        .await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["plan"]["plan"], "payg");
    let sum = |v: &serde_json::Value| -> Decimal {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| d(x["amount"].as_str().unwrap()))
            .sum()
    };
    let usage = d(c["usage"].as_str().unwrap());
    assert_eq!(sum(&c["by_meter"]), usage);
    assert_eq!(sum(&c["by_app"]), usage);
    assert_eq!(sum(&c["daily"]), usage);
    let (s, adv) = api
        .call_as(&token, M::GET, "/v1/customers/cus_c/plan-advisor", None)
        .await;
    assert_eq!(s, 200, "{adv}");
    assert_eq!(adv["plans"].as_array().unwrap().len(), 4);

    // `?at=` asks again as of the report's instant: the same figures,
    // however much later; a future instant, one before last month, or
    // text that is no instant are refused naming `at`.
    for (path, first) in [("costs", &c), ("plan-advisor", &adv)] {
        let at = first["as_of"].as_str().unwrap();
        let (s, again) = api
            .call_as(
                &token,
                M::GET,
                &format!("/v1/customers/cus_c/{path}?at={at}"),
                None,
            )
            .await;
        assert_eq!(s, 200, "{again}");
        assert_eq!(&again, first, "{path} as of {at}");
    }
    let future = (Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let ancient = "2001-01-01T00:00:00Z";
    for (at, status, code) in [
        (future.as_str(), 422, "invalid"),
        (ancient, 422, "invalid"),
        ("yesterday", 400, "bad_query"),
    ] {
        let (s, v) = api
            .call_as(
                &token,
                M::GET,
                &format!("/v1/customers/cus_c/costs?at={at}"),
                None,
            )
            .await;
        assert_eq!(
            (s.as_u16(), v["code"].as_str()),
            (status, Some(code)),
            "{at}: {v}"
        );
        assert!(v["message"].as_str().unwrap().contains("at: "), "{at}: {v}");
    }
    let (s, _) = api
        .call(
            M::POST,
            "/v1/customers",
            Some(json!({"id": "cus_x", "external_id": "cus_x", "name": "X"})),
        )
        .await;
    assert_eq!(s, 201);
    for path in [
        "/v1/customers/cus_x/costs",
        "/v1/customers/cus_x/plan-advisor",
    ] {
        let (s, v) = api.call_as(&token, M::GET, path, None).await;
        assert_eq!(
            (s.as_u16(), v["code"].as_str()),
            (404, Some("not_found")),
            "{path}"
        );
    }
}
