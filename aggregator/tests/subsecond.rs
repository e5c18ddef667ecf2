//! Usage belongs to a plan segment by its exact event time: a boundary with
//! a sub-second part (a real `now` switch at 12:00:00.0016) puts an event of
//! 12:00:00.0001 before it and one of 12:00:00.0020 after it, in both usage
//! stores, whether the question is answered from rollups and raw rows or
//! from raw rows only (re-rating evidence), and across an export to the
//! distributed mode (`embedded/tests/transfer.rs` moves `time_us` along).

use aggregator::metrics::Metrics;
use aggregator::pipeline::{DeadLetter, DeadLetterSink, Message, Processor};
use aggregator::store::clickhouse::ClickHouseStore;
use aggregator::store::sqlite::SqliteStore;
use aggregator::{UsageQuery, UsageStore, UsageWriter};
use chrono::{DateTime, Duration, DurationRound, Utc};
use rust_decimal::Decimal;
use schemas::MeterCatalog;
use serde_json::json;
use std::sync::Arc;

struct NoDeadLetters;
impl DeadLetterSink for NoDeadLetters {
    async fn send(&self, letters: Vec<DeadLetter>) -> anyhow::Result<()> {
        anyhow::bail!("unexpected dead letters: {letters:?}")
    }
}

fn msg(offset: i64, id: &str, t: DateTime<Utc>, count: u64) -> Message {
    Message {
        partition: 0,
        offset,
        key: Some(b"cus_s".to_vec()),
        payload: Some(
            json!({"specversion":"1.0","id":id,"source":"test","type":"tally.requests","subject":"cus_s",
                   "time":t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),"data":{"app":"web","count":count}})
            .to_string()
            .into_bytes(),
        ),
    }
}

async fn requests<S: UsageStore>(
    s: &S,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    raw: bool,
) -> (Decimal, u64) {
    let meters = MeterCatalog::default_catalog();
    let q = UsageQuery {
        customer: "cus_s".into(),
        meter: "requests".into(),
        from,
        to,
        group_by: vec![],
        granularity: None,
        raw,
    };
    let rows = s.query(meters.get("requests").unwrap(), &q).await.unwrap();
    rows.iter()
        .fold((Decimal::ZERO, 0), |(v, e), r| (v + r.value, e + r.events))
}

async fn scenario<S: UsageWriter + UsageStore>(store: Arc<S>) {
    store.migrate().await.unwrap();
    let hour = Utc::now().duration_trunc(Duration::hours(1)).unwrap() - Duration::hours(5);
    let us = |micros: i64| hour + Duration::microseconds(micros);
    let (_tx, stop) = tokio::sync::watch::channel(false);
    let mut p = Processor::new(
        store.clone(),
        Arc::new(MeterCatalog::default_catalog()),
        Metrics::new(),
    );
    p.process(
        vec![
            msg(0, "before", us(100), 1),            // 12:00:00.000100
            msg(1, "after", us(2_000), 10),          // 12:00:00.002000
            msg(2, "later", us(1_800_000_000), 100), // 12:30
            // Nanoseconds beyond the stored precision: 12:00:00.0016 exactly.
            msg(3, "at", hour + Duration::nanoseconds(1_600_999), 1000),
        ],
        &NoDeadLetters,
        &stop,
    )
    .await
    .unwrap();
    let switch = us(1_600);
    let (start, end) = (hour - Duration::hours(2), hour + Duration::hours(3));
    for raw in [false, true] {
        assert_eq!(
            requests(&*store, start, switch, raw).await,
            (Decimal::from(1), 1),
            "raw {raw}"
        );
        assert_eq!(
            requests(&*store, switch, end, raw).await,
            (Decimal::from(1110), 3),
            "raw {raw}"
        );
        // The two segments partition the period.
        assert_eq!(
            requests(&*store, start, end, raw).await,
            (Decimal::from(1111), 4)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_compares_event_times_to_the_microsecond() {
    let dir = tempfile::tempdir().unwrap();
    scenario(Arc::new(
        SqliteStore::open(&dir.path().join("usage.db"))
            .await
            .unwrap(),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_store_compares_event_times_to_the_microsecond() {
    let url = std::env::var("TALLY_CLICKHOUSE_URL")
        .expect("TALLY_CLICKHOUSE_URL is not set: run the tests through ops/test.sh");
    let db = format!(
        "subsecond_{}_{}",
        std::process::id(),
        Utc::now().timestamp_subsec_nanos()
    );
    let store = Arc::new(ClickHouseStore::new(&url, &db));
    scenario(store.clone()).await;
    // The ADD COLUMN migration run again (as if its record had been lost
    // after the DDL) fails in a way the runner recognises as applied.
    let m = &schemas::migrations::CLICKHOUSE[2];
    let err = store.client().query(m.sql).execute().await.unwrap_err();
    assert!(
        schemas::migrations::clickhouse_already_applied(m, &format!("{err:#}")),
        "{err:#}"
    );
    store.migrate().await.unwrap();
}
