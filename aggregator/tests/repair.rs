//! A crash between the raw insert and the rollup insert: the restarted
//! consumer skips the stored offsets and recomputes the missing rollups from
//! raw rows, so rollups and raw rows agree and nothing counts twice.
//! Drives the `Processor` directly against real ClickHouse.

use testkit::pipeline as support;

use aggregator::metrics::Metrics;
use aggregator::pipeline::{DeadLetter, DeadLetterSink, Message, Processor};
use aggregator::store::{RawRow, UsageWriter};
use chrono::Utc;
use rust_decimal::Decimal;
use schemas::MeterCatalog;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

#[derive(Default)]
struct Letters(Mutex<Vec<DeadLetter>>);

impl DeadLetterSink for Letters {
    async fn send(&self, letters: Vec<DeadLetter>) -> anyhow::Result<()> {
        self.0.lock().unwrap().extend(letters);
        Ok(())
    }
}

fn msg(offset: i64, count: u64) -> Message {
    let ev = json!({"specversion":"1.0","id":format!("r{offset}"),"source":"repair","type":"tally.requests",
        "subject":"cus_r","time":Utc::now().to_rfc3339(),"data":{"app":"web","count":count}});
    Message {
        partition: 0,
        offset,
        key: Some(b"cus_r".to_vec()),
        payload: Some(ev.to_string().into_bytes()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_batch_is_repaired_on_restart() {
    let env = Env::new("repair");
    let store = Arc::new(env.store());
    store.migrate().await.unwrap();
    let meters = Arc::new(MeterCatalog::default_catalog());
    let (_tx, stop) = tokio::sync::watch::channel(false);
    let dlq = Letters::default();

    // Batch 1 (offsets 0..5) completes.
    let mut p = Processor::new(store.clone(), meters.clone(), Metrics::new());
    p.process((0..5).map(|o| msg(o, 10)).collect(), &dlq, &stop)
        .await
        .unwrap();

    // Batch 2 (offsets 5..10): the raw insert lands, then the process dies
    // before its rollup insert.
    let rows: Vec<RawRow> = (5..10)
        .map(|o| RawRow {
            customer: "cus_r".into(),
            meter: "requests".into(),
            time: chrono::DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap(),
            app: "web".into(),
            dims: "{}".into(),
            quantity: Decimal::from(100),
            unique_value: String::new(),
            source: "repair".into(),
            id: format!("r{o}"),
            event_type: "tally.requests".into(),
            partition: 0,
            offset: o as u64,
        })
        .collect();
    store.write_raw(rows).await.unwrap();
    drop(p);

    // Restart: Kafka redelivers from its committed offset (5) onwards, plus
    // new messages 10..13; offsets 5..10 must be skipped, their rollups
    // repaired, and 10..13 counted.
    let metrics = Metrics::new();
    let mut p = Processor::new(store.clone(), meters, metrics.clone());
    p.process(
        (5..13)
            .map(|o| msg(o, if o < 10 { 100 } else { 1 }))
            .collect(),
        &dlq,
        &stop,
    )
    .await
    .unwrap();
    assert_eq!(
        metrics.rollup_repairs.get(),
        1,
        "one rollup key recomputed from raw rows"
    );
    assert_eq!(metrics.messages_skipped_stored.get(), 5);
    let want = BTreeMap::from([(
        "cus_r/web/requests".to_string(),
        Decimal::from(5 * 10 + 5 * 100 + 3),
    )]);
    env.wait_totals(&want, Duration::from_secs(10)).await;
    assert!(dlq.0.lock().unwrap().is_empty());
}
