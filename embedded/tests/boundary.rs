//! The embedded mode counts an event answered before a month boundary and
//! committed after it (a batch waiting on its commit across midnight): the
//! ingest API stamps the acceptance instant (`Envelope::accept`) and the
//! in-process writer judges the event against that window. The writer is
//! fed here exactly as `tally serve`'s ingest API feeds it, with envelopes
//! accepted in the last second of the previous month; the event's time is
//! in the month before that, outside today's window. A restart re-sending
//! the batch counts nothing twice.

use aggregator::metrics::Metrics;
use aggregator::store::sqlite::SqliteStore;
use aggregator::UsageWriter;
use chrono::{Duration, Utc};
use collector::sink::{Envelope, EventSink};
use rust_decimal::Decimal;
use schemas::event::previous_month_start;
use schemas::MeterCatalog;
use serde_json::json;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_accepted_before_the_boundary_is_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteStore::open(&dir.path().join("usage.db"))
            .await
            .unwrap(),
    );
    store.migrate().await.unwrap();
    let meters = Arc::new(MeterCatalog::default_catalog());
    let accepted = aggregator::dedup::month_start(Utc::now()) - Duration::seconds(1);
    let old = previous_month_start(previous_month_start(Utc::now())) + Duration::days(4);
    let batch = || {
        [("e1", old, 700), ("e2", accepted - Duration::hours(1), 20)]
            .map(|(id, t, n)| {
                let ev = json!({"specversion":"1.0","id":id,"source":"router","type":"tally.requests",
                                "subject":"cus_e","time":t.to_rfc3339(),"data":{"app":"web","count":n}});
                Envelope::accept(ev.as_object().unwrap().clone(), &meters, accepted).unwrap()
            })
            .to_vec()
    };
    for _run in 0..2 {
        let (_tx, stop) = tokio::sync::watch::channel(false);
        let (sink, task) = embedded::ingest::start(
            store.clone(),
            meters.clone(),
            Metrics::new(),
            1000,
            tokio::sync::broadcast::channel(16).0,
            stop,
        )
        .await
        .unwrap();
        sink.send(batch()).await.unwrap();
        drop(sink);
        task.await.unwrap();
    }
    assert!(
        store.dead_letters().await.unwrap().is_empty(),
        "nothing dead-lettered"
    );
    let totals = store.totals().await.unwrap();
    assert_eq!(totals["cus_e/web/requests"], Decimal::from(720));
    assert_eq!(store.raw_page(0, 100).await.unwrap().len(), 2);
}
