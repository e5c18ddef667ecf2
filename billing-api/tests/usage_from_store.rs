//! Events written through the aggregator into real ClickHouse, rated into
//! invoice lines for a period with a mid-period plan switch. Needs
//! TALLY_CLICKHOUSE_URL (ops/test.sh sets it); fails, never skips, without it.

use aggregator::metrics::Metrics;
use aggregator::pipeline::{DeadLetter, DeadLetterSink, Message, Processor};
use aggregator::store::clickhouse::ClickHouseStore;
use aggregator::UsageWriter;
use billing_api::catalog::Catalog;
use billing_api::rating::{rate, LineKind, Period, Segment};
use billing_api::usage::segment_usage;
use chrono::{DateTime, Duration, Utc};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_in_clickhouse_rates_into_lines_with_evidence() {
    let url = std::env::var("TALLY_CLICKHOUSE_URL")
        .expect("TALLY_CLICKHOUSE_URL is not set: run through ops/test.sh");
    let db = format!(
        "billing_{}_{:08x}",
        std::process::id(),
        Utc::now().timestamp_subsec_nanos()
    );
    let store = Arc::new(ClickHouseStore::new(&url, &db));
    store.migrate().await.unwrap();

    // The period: this month so far (events must be inside the accept window).
    let now = DateTime::from_timestamp(Utc::now().timestamp() - Utc::now().timestamp() % 3600, 0)
        .unwrap();
    let start = now - Duration::hours(10);
    let switch = now - Duration::hours(5) + Duration::minutes(17);
    let end = now;
    let ev = |i: i64, t: DateTime<Utc>, ty: &str, data: serde_json::Value| {
        Message {
        partition: 0,
        offset: i,
        key: Some(b"cus_b".to_vec()),
        payload: Some(json!({"specversion":"1.0","id":format!("b{i}"),"source":"bill","type":ty,"subject":"cus_b","time":t.to_rfc3339(),"data":data}).to_string().into_bytes()),
    }
    };
    let nano = |s: i64| json!({"app":"web","instance_type":"t4g.nano","region":"fra","instance_seconds":s});
    let msgs = vec![
        ev(0, start + Duration::minutes(5), "tally.compute", nano(3600)),
        ev(1, start + Duration::hours(2), "tally.compute", nano(7200)),
        ev(
            2,
            switch - Duration::seconds(1),
            "tally.requests",
            json!({"app":"web","count":3000000}),
        ),
        ev(
            3,
            switch,
            "tally.requests",
            json!({"app":"web","count":60000000}),
        ),
        ev(
            4,
            switch + Duration::hours(1),
            "tally.compute",
            json!({"app":"web","instance_type":"c6g.large","region":"fra","instance_seconds":3600}),
        ),
    ];
    let (_tx, stop) = tokio::sync::watch::channel(false);
    let meters = Arc::new(MeterCatalog::default_catalog());
    Processor::new(store.clone(), meters.clone(), Metrics::new())
        .process(msgs, &NoDeadLetters, &stop)
        .await
        .unwrap();

    let cat = Catalog::default_catalog();
    let (payg, business) = (
        cat.latest("payg").unwrap().clone(),
        cat.latest("business").unwrap().clone(),
    );
    let u1 = segment_usage(store.as_ref(), &meters, &payg, "cus_b", start, switch)
        .await
        .unwrap();
    let u2 = segment_usage(store.as_ref(), &meters, &business, "cus_b", switch, end)
        .await
        .unwrap();
    // Month of 10 h for simple fractions: the business segment is 4 h 43 min of it.
    let period = Period { start, end };
    let r = rate(
        &period,
        &[
            Segment {
                trial: false,
                plan: payg,
                start,
                end: switch,
                usage: u1,
            },
            Segment {
                trial: false,
                plan: business,
                start: switch,
                end,
                usage: u2,
            },
        ],
        &[],
    )
    .unwrap();
    let usage_lines: Vec<(Option<String>, u64, Decimal)> = r
        .lines
        .iter()
        .filter(|l| l.kind == LineKind::Usage)
        .map(|l| (l.meter.clone(), l.events, l.amount))
        .collect();
    // payg: 3 nano-hours × 0.0058 = 0.0174 → 0.02; 3 M requests × 0.40/M = 1.20.
    // business: 60 M requests, first 50 M free prorated to 50 × 283/600 = 23.5833… M,
    // so 36.41666… M × 0.30 = 10.925 → 10.92 (half-even); c6g.large 1 h × 0.07616 → 0.08.
    assert_eq!(
        usage_lines,
        vec![
            (Some("compute".into()), 2, "0.02".parse().unwrap()),
            (Some("requests".into()), 1, "1.20".parse().unwrap()),
            (Some("compute".into()), 1, "0.08".parse().unwrap()),
            (Some("requests".into()), 1, "10.92".parse().unwrap()),
        ]
    );
    let flat = r
        .lines
        .iter()
        .find(|l| l.kind == LineKind::FlatFee)
        .unwrap();
    assert_eq!(
        flat.amount,
        (Decimal::from(299) * Decimal::from(283) / Decimal::from(600)).round_dp(2)
    );
    assert_eq!(r.total, r.lines.iter().map(|l| l.amount).sum::<Decimal>());
}
