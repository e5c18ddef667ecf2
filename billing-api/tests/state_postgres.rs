//! Billing state in real PostgreSQL (TALLY_DATABASE_URL, set by
//! ops/test.sh; the test fails, never skips, without it). Each test runs in
//! a database of its own, kept afterwards for inspection.

mod support;

use billing_api::catalog::PlanVersion;
use billing_api::rating::{rate, Period, Segment, UsageItem};
use billing_api::state::postgres::PgState;
use billing_api::state::{Customer, PlanSegment, StateError, StateStore};
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use serde_json::json;
use sqlx::Executor;

async fn state(test: &str) -> (std::sync::Arc<PgState>, sqlx::PgPool) {
    let (_url, st, pool) = support::pg(test).await;
    (st, pool)
}

fn nov(day: u32) -> DateTime<Utc> {
    if day == 31 {
        Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap()
    } else {
        Utc.with_ymd_and_hms(2026, 11, day, 0, 0, 0).unwrap()
    }
}

fn plan(v: serde_json::Value) -> PlanVersion {
    serde_json::from_value(v).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_history_and_seats_feed_the_rating_engine() {
    let (st, pool) = state("history").await;
    st.migrate().await.unwrap();
    st.migrate().await.unwrap(); // idempotent
    let payg = plan(
        json!({"plan":"payg","version":1,"name":"Pay as you go","currency":"USD","prices":[{"meter":"requests","model":"per_unit","unit_price":"0.0000004"}]}),
    );
    let team = plan(
        json!({"plan":"team","version":1,"name":"Team","currency":"USD","seat_fee":"15","prices":[{"meter":"requests","model":"graduated",
        "tiers":[{"up_to":"1000000","unit_price":"0"},{"unit_price":"0.0000003"}]}]}),
    );
    st.publish_plan(&payg, "staff@paas").await.unwrap();
    st.publish_plan(&team, "staff@paas").await.unwrap();
    assert!(
        matches!(
            st.publish_plan(&team, "staff@paas").await,
            Err(StateError::Conflict(_))
        ),
        "a published version is immutable"
    );

    let c = Customer {
        id: "cus_1".into(),
        external_id: "org_42".into(),
        name: "Acme".into(),
    };
    st.create_customer(&c, "staff@paas").await.unwrap();
    let dup = Customer {
        id: "cus_2".into(),
        ..c.clone()
    };
    assert!(
        matches!(
            st.create_customer(&dup, "staff@paas").await,
            Err(StateError::Conflict(_))
        ),
        "external ids are unique"
    );
    assert_eq!(st.customer_by_external_id("org_42").await.unwrap(), c);

    st.subscribe("cus_1", "payg", 1, nov(1), "signup")
        .await
        .unwrap();
    assert!(matches!(
        st.subscribe("cus_1", "payg", 1, nov(2), "signup").await,
        Err(StateError::Conflict(_))
    ));
    assert!(matches!(
        st.switch_plan("cus_1", "nope", 1, nov(16), "staff@paas")
            .await,
        Err(StateError::NotFound(_))
    ));
    assert!(matches!(
        st.switch_plan("cus_1", "team", 1, nov(1), "staff@paas")
            .await,
        Err(StateError::Invalid(_))
    ));
    st.switch_plan("cus_1", "team", 1, nov(16), "staff@paas")
        .await
        .unwrap();
    st.set_seats("cus_1", 2, nov(16), "staff@paas")
        .await
        .unwrap();
    st.set_seats("cus_1", 3, nov(21), "staff@paas")
        .await
        .unwrap();

    let period = Period {
        start: nov(1),
        end: nov(31),
    };
    let segs = st.plan_segments("cus_1", period).await.unwrap();
    assert_eq!(
        segs,
        vec![
            PlanSegment {
                plan: "payg".into(),
                version: 1,
                start: nov(1),
                end: nov(16)
            },
            PlanSegment {
                plan: "team".into(),
                version: 1,
                start: nov(16),
                end: nov(31)
            },
        ]
    );
    let seats = st.seat_intervals("cus_1", period).await.unwrap();
    assert_eq!(
        seats
            .iter()
            .map(|s| (s.start, s.end, s.seats))
            .collect::<Vec<_>>(),
        vec![(nov(16), nov(21), 2), (nov(21), nov(31), 3)]
    );

    // BILLING-EXAMPLES example 4, from stored state.
    let usage = [("12345678", 0usize), ("3000000", 1usize)];
    let mut segments = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        let p = st.plan_version(&s.plan, s.version).await.unwrap();
        let u = usage
            .iter()
            .filter(|(_, seg)| *seg == i)
            .map(|(q, _)| UsageItem {
                meter: "requests".into(),
                dims: Default::default(),
                quantity: q.parse().unwrap(),
                events: 1,
            })
            .collect();
        segments.push(Segment {
            plan: p,
            start: s.start,
            end: s.end,
            usage: u,
        });
    }
    assert_eq!(
        rate(&period, &segments, &seats).unwrap().total,
        "25.69".parse::<Decimal>().unwrap()
    );

    // Every change is audited, with before and after; the log is append-only.
    let log = st.audit_log("customer:cus_1").await.unwrap();
    let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        vec![
            "customer.create",
            "subscription.start",
            "subscription.switch",
            "seats.set",
            "seats.set"
        ]
    );
    let switch = &log[2];
    assert_eq!(
        (
            switch.actor.as_str(),
            switch.before.as_ref().unwrap()["plan"].as_str()
        ),
        ("staff@paas", Some("payg"))
    );
    assert_eq!(switch.after.as_ref().unwrap()["plan"], "team");
    assert_eq!(log[4].before.as_ref().unwrap()["seats"], 2);
    let tamper = pool
        .execute("UPDATE audit_log SET actor = 'someone else'")
        .await;
    assert!(tamper.is_err_and(|e| e.to_string().contains("append-only")));
    assert!(pool.execute("DELETE FROM audit_log").await.is_err());
}
