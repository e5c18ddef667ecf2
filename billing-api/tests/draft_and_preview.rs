//! A customer's period rated from real stores: usage in ClickHouse (written
//! by the aggregator's processor), plan history in PostgreSQL. The preview
//! of a plan switch equals the draft after the switch is confirmed, line by
//! line. Needs TALLY_CLICKHOUSE_URL and TALLY_DATABASE_URL (ops/test.sh).

use testkit::billing as support;

use billing_api::catalog::Catalog;
use billing_api::invoice::{rate_period, PlannedSwitch};
use billing_api::rating::Period;
use billing_api::state::{Customer, NewSubscription, StateStore};
use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use schemas::MeterCatalog;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_preview_equals_the_draft_after_confirming() {
    let (_ch, _db, usage) = support::clickhouse("preview").await;
    let (_url, state, _pool) = support::pg("preview").await;
    let state = state.as_ref();

    let now = DateTime::from_timestamp(Utc::now().timestamp() - Utc::now().timestamp() % 3600, 0)
        .unwrap();
    let period = Period {
        start: now - Duration::hours(10),
        end: now + Duration::hours(1),
    };
    let cat = Catalog::default_catalog();
    for p in ["payg", "business"] {
        state
            .publish_plan(cat.latest(p).unwrap(), "staff")
            .await
            .unwrap();
    }
    state
        .create_customer(
            &Customer {
                id: "cus_p".into(),
                external_id: "org_p".into(),
                name: "P".into(),
            },
            "staff",
        )
        .await
        .unwrap();
    state
        .subscribe(
            "cus_p",
            &NewSubscription::new("payg", 1, period.start),
            "signup",
        )
        .await
        .unwrap();

    let meters = MeterCatalog::default_catalog();
    let requests = |i: i64, t: DateTime<Utc>, count: i64| {
        (
            format!("p{i}"),
            "cus_p",
            t,
            "tally.requests",
            support::requests("web", count),
        )
    };
    support::Writer::new(usage.clone())
        .write(&[
            requests(0, now - Duration::hours(3), 3_000_000),
            requests(1, now - Duration::hours(1), 60_000_000),
        ])
        .await;

    // Draft as things stand: all on pay-as-you-go, 63 M × $0.40/M.
    let before = rate_period(state, usage.as_ref(), &meters, "cus_p", period, None)
        .await
        .unwrap();
    assert_eq!(before.total, "25.20".parse::<Decimal>().unwrap());

    // Preview a switch to business two hours ago, then confirm it.
    let sw = PlannedSwitch {
        plan: "business".into(),
        version: 1,
        at: now - Duration::hours(2),
    };
    let preview = rate_period(state, usage.as_ref(), &meters, "cus_p", period, Some(&sw))
        .await
        .unwrap();
    assert_eq!(
        state.plan_segments("cus_p", period).await.unwrap().len(),
        1,
        "a preview changes nothing"
    );
    state
        .switch_plan("cus_p", &sw.plan, sw.version, sw.at, "staff")
        .await
        .unwrap();
    let after = rate_period(state, usage.as_ref(), &meters, "cus_p", period, None)
        .await
        .unwrap();
    assert_eq!(
        preview, after,
        "the preview is exactly what the switch produces"
    );
    // payg 3 M = $1.20; business: flat 299 × 3/11 h, 60 M − 50 M × 3/11 allowance at $0.30/M.
    let flat = (Decimal::from(299) * Decimal::from(3) / Decimal::from(11)).round_dp(2);
    let req = ((Decimal::from(60) - Decimal::from(50) * Decimal::from(3) / Decimal::from(11))
        * "0.30".parse::<Decimal>().unwrap())
    .round_dp(2);
    assert_eq!(after.total, "1.20".parse::<Decimal>().unwrap() + flat + req);
}
