//! A customer's period rated from real stores: usage in ClickHouse (written
//! by the aggregator's processor), plan history in PostgreSQL. The preview
//! of a plan switch equals the draft after the switch is confirmed, line by
//! line. Needs TALLY_CLICKHOUSE_URL and TALLY_DATABASE_URL (ops/test.sh).

use aggregator::metrics::Metrics;
use aggregator::pipeline::{DeadLetter, DeadLetterSink, Message, Processor};
use aggregator::store::clickhouse::ClickHouseStore;
use aggregator::UsageWriter;
use billing_api::catalog::Catalog;
use billing_api::invoice::{rate_period, PlannedSwitch};
use billing_api::rating::Period;
use billing_api::state::postgres::PgState;
use billing_api::state::{Customer, StateStore};
use chrono::{DateTime, Duration, Utc};
use futures::future::BoxFuture;
use rust_decimal::Decimal;
use schemas::MeterCatalog;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::Executor;
use std::str::FromStr;
use std::sync::Arc;

struct NoDeadLetters;
impl DeadLetterSink for NoDeadLetters {
    fn send(&self, letters: Vec<DeadLetter>) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move { anyhow::bail!("unexpected dead letters: {letters:?}") })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_preview_equals_the_draft_after_confirming() {
    let ch_url = std::env::var("TALLY_CLICKHOUSE_URL")
        .expect("TALLY_CLICKHOUSE_URL is not set: run through ops/test.sh");
    let pg_url = std::env::var("TALLY_DATABASE_URL")
        .expect("TALLY_DATABASE_URL is not set: run through ops/test.sh");
    let id = format!(
        "{}_{:08x}",
        std::process::id(),
        Utc::now().timestamp_subsec_nanos()
    );
    let usage = Arc::new(ClickHouseStore::new(&ch_url, &format!("preview_{id}")));
    usage.migrate().await.unwrap();
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&pg_url)
        .await
        .unwrap();
    admin
        .execute(format!("CREATE SCHEMA preview_{id}").as_str())
        .await
        .unwrap();
    let opts = PgConnectOptions::from_str(&pg_url)
        .unwrap()
        .options([("search_path", format!("preview_{id}"))]);
    let state = PgState::from_pool(
        PgPoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .unwrap(),
    );
    state.migrate().await.unwrap();

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
        .subscribe("cus_p", "payg", 1, period.start, "signup")
        .await
        .unwrap();

    let meters = Arc::new(MeterCatalog::default_catalog());
    let msg = |i: i64, t: DateTime<Utc>, count: u64| {
        Message {
        partition: 0,
        offset: i,
        key: None,
        payload: Some(json!({"specversion":"1.0","id":format!("p{i}"),"source":"preview","type":"tally.requests","subject":"cus_p",
            "time":t.to_rfc3339(),"data":{"app":"web","count":count}}).to_string().into_bytes()),
    }
    };
    let (_tx, stop) = tokio::sync::watch::channel(false);
    Processor::new(usage.clone(), meters.clone(), Metrics::new())
        .process(
            vec![
                msg(0, now - Duration::hours(3), 3_000_000),
                msg(1, now - Duration::hours(1), 60_000_000),
            ],
            &NoDeadLetters,
            &stop,
        )
        .await
        .unwrap();

    // Draft as things stand: all on pay-as-you-go, 63 M × $0.40/M.
    let before = rate_period(&state, usage.as_ref(), &meters, "cus_p", period, None)
        .await
        .unwrap();
    assert_eq!(before.total, "25.20".parse::<Decimal>().unwrap());

    // Preview a switch to business two hours ago, then confirm it.
    let sw = PlannedSwitch {
        plan: "business".into(),
        version: 1,
        at: now - Duration::hours(2),
    };
    let preview = rate_period(&state, usage.as_ref(), &meters, "cus_p", period, Some(&sw))
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
    let after = rate_period(&state, usage.as_ref(), &meters, "cus_p", period, None)
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
