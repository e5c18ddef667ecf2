//! An event answered 2xx before a month boundary and processed after it is
//! counted, exactly once (issue: the accept window judged twice).
//!
//! The collector judges an event's time against the accept window of the
//! instant it accepts it and stamps that instant on the event
//! (`schemas::event::ACCEPTED_AT`); the aggregator must judge it against
//! the same window, however late it processes it, and its deduplication
//! must reach back to the oldest event that window lets in. The tests run
//! at the real time of day: "before the boundary" is the last second of the
//! previous month, and the event's time is in the month before that (the
//! oldest month that acceptance allowed, outside today's window).

use testkit::pipeline as support;

use aggregator::metrics::Metrics;
use aggregator::pipeline::{DeadLetter, DeadLetterSink, Message, Processor};
use aggregator::store::clickhouse::ClickHouseStore;
use aggregator::store::sqlite::SqliteStore;
use aggregator::UsageWriter;
use chrono::{DateTime, Duration as CDuration, Utc};
use collector::sink::Envelope;
use collector::spool::Spool;
use rust_decimal::Decimal;
use schemas::event::{previous_month_start, stamp_accepted};
use schemas::{MeterCatalog, RawEvent};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

/// The last second of the previous month: when the collector accepted.
fn accepted_at() -> DateTime<Utc> {
    aggregator::dedup::month_start(Utc::now()) - CDuration::seconds(1)
}

/// A time in the month before the previous one: inside the window at
/// `accepted_at()`, outside the window now.
fn old_time(day: i64) -> DateTime<Utc> {
    previous_month_start(previous_month_start(Utc::now())) + CDuration::days(day)
}

fn event(id: &str, customer: &str, t: DateTime<Utc>, count: u64) -> RawEvent {
    json!({"specversion":"1.0","id":id,"source":"router","type":"tally.requests",
           "subject":customer,"time":t.to_rfc3339(),"data":{"app":"web","count":count}})
    .as_object()
    .unwrap()
    .clone()
}

/// The message the collector would have produced for `ev` accepted at `at`.
fn accepted(offset: i64, ev: RawEvent, at: DateTime<Utc>) -> Message {
    let e =
        Envelope::accept(ev, &MeterCatalog::default_catalog(), at).expect("valid when accepted");
    Message {
        partition: 0,
        offset,
        key: Some(e.key.into_bytes()),
        payload: Some(e.payload),
    }
}

/// A message stamped at `at` without the collector's validation.
fn stamped(offset: i64, mut ev: RawEvent, at: DateTime<Utc>) -> Message {
    stamp_accepted(&mut ev, at);
    Message {
        partition: 0,
        offset,
        key: Some(b"cus_m".to_vec()),
        payload: Some(serde_json::to_vec(&ev).unwrap()),
    }
}

#[derive(Default)]
struct Letters(Mutex<Vec<DeadLetter>>);
impl DeadLetterSink for Letters {
    async fn send(&self, letters: Vec<DeadLetter>) -> anyhow::Result<()> {
        self.0.lock().unwrap().extend(letters);
        Ok(())
    }
}

/// The same scenario on any store: two processors in turn (a restart, or
/// another aggregator taking the partition over), each starting from the
/// store's state.
async fn accepted_before_the_boundary<W: UsageWriter>(store: Arc<W>) {
    let meters = Arc::new(MeterCatalog::default_catalog());
    let (_tx, stop) = tokio::sync::watch::channel(false);
    let at = accepted_at();
    let letters = Letters::default();

    let metrics = Metrics::new();
    let mut first = Processor::new(store.clone(), meters.clone(), metrics.clone());
    first
        .process(
            vec![
                accepted(0, event("x", "cus_m", old_time(3), 1000), at),
                accepted(1, event("y", "cus_m", at - CDuration::days(2), 20), at),
                // The same event twice in a batch: once.
                accepted(2, event("x", "cus_m", old_time(3), 1000), at),
            ],
            &letters,
            &stop,
        )
        .await
        .unwrap();
    assert!(
        letters.0.lock().unwrap().is_empty(),
        "accepted events were dead-lettered: {:?}",
        letters.0.lock().unwrap()
    );
    assert_eq!(metrics.dedup_window_widened.get(), 1);

    // A restart: the new processor's window starts at the previous month,
    // so its dedup keys must be widened before the replayed copy of `x` is
    // judged a duplicate.
    let mut second = Processor::new(store.clone(), meters.clone(), Metrics::new());
    let commits = second
        .process(
            vec![
                accepted(3, event("x", "cus_m", old_time(3), 1000), at),
                accepted(4, event("z", "cus_m", old_time(9), 300), at),
                // Not stamped (written by something other than a collector):
                // judged now, and too old now.
                Message {
                    partition: 0,
                    offset: 5,
                    key: Some(b"cus_m".to_vec()),
                    payload: Some(
                        serde_json::to_vec(&event("w", "cus_m", old_time(4), 7)).unwrap(),
                    ),
                },
                // Stamped at an acceptance whose window did not hold it
                // (only something other than the collector writes that).
                stamped(
                    6,
                    event("v", "cus_m", old_time(0) - CDuration::days(20), 5),
                    old_time(40),
                ),
            ],
            &letters,
            &stop,
        )
        .await
        .unwrap();
    assert_eq!(commits[&0], 7);
    let dead: Vec<(String, String)> = letters
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|l| (l.message.offset.to_string(), l.code.clone()))
        .collect();
    assert_eq!(
        dead,
        [
            ("5".to_string(), "time_before_window".to_string()),
            ("6".to_string(), "time_before_window".to_string())
        ]
    );
}

fn requests_total(totals: &BTreeMap<String, Decimal>) -> Decimal {
    totals["cus_m/web/requests"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_counts_events_accepted_before_the_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteStore::open(&dir.path().join("usage.db"))
            .await
            .unwrap(),
    );
    store.migrate().await.unwrap();
    accepted_before_the_boundary(store.clone()).await;
    let totals = store.totals().await.unwrap();
    assert_eq!(requests_total(&totals), Decimal::from(1000 + 20 + 300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_store_counts_events_accepted_before_the_boundary() {
    let env = Env::new("boundary_ch");
    let store = Arc::new(ClickHouseStore::new(&env.clickhouse_url, &env.database));
    store.migrate().await.unwrap();
    accepted_before_the_boundary(store.clone()).await;
    for totals in [
        store.totals().await.unwrap(),
        store.raw_totals().await.unwrap(),
    ] {
        assert_eq!(requests_total(&totals), Decimal::from(1000 + 20 + 300));
    }
}

/// Distributed: the collector spooled events during a Kafka outage that
/// spans the month boundary (accepted before it, spool files written then)
/// and replays them when it starts after it; one of them had already
/// reached the store before the outage, and the aggregator restarted in
/// between. Each is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_replay_after_an_outage_across_the_boundary() {
    let env = Env::new("boundary_spool");
    let at = accepted_at();
    let meters = MeterCatalog::default_catalog();
    let envelope = |ev| Envelope::accept(ev, &meters, at).unwrap();
    let spool_dir = env.dir.join("spool");
    let (cfg, port) = env.collector_config("", 5000);

    // Before the outage: `a`, accepted and spooled during an earlier Kafka
    // hiccup, reaches the store.
    Spool::open(&spool_dir)
        .unwrap()
        .append(&[envelope(event("a", "cus_m", old_time(2), 11))])
        .unwrap();
    let mut agg = env.spawn_aggregator(free_port(), None);
    let mut collector = env.spawn_collector(&cfg, port);
    let first = BTreeMap::from([("cus_m/web/requests".to_string(), Decimal::from(11))]);
    env.wait_totals(&first, Duration::from_secs(90)).await;
    collector.terminate();
    agg.terminate();

    // During the outage: the collector answered 200 for these and wrote
    // them to its spool (`a` again: the client retried).
    let spool = Spool::open(&spool_dir).unwrap();
    spool
        .append(&[
            envelope(event("a", "cus_m", old_time(2), 11)),
            envelope(event("b", "cus_m", old_time(6), 1000)),
        ])
        .unwrap();
    spool
        .append(&[
            envelope(event("b", "cus_m", old_time(6), 1000)),
            envelope(event("c", "cus_m", at - CDuration::hours(3), 5)),
        ])
        .unwrap();

    // After the boundary: Kafka is back; a new aggregator (its usual dedup
    // window starts at the previous month) and the collector start, and the
    // collector replays its spool.
    let _agg = env.spawn_aggregator(free_port(), None);
    let _collector = env.spawn_collector(&cfg, port);
    let want = BTreeMap::from([(
        "cus_m/web/requests".to_string(),
        Decimal::from(11 + 1000 + 5),
    )]);
    env.wait_totals(&want, Duration::from_secs(90)).await;
    assert_eq!(env.raw_count().await, 3, "one raw row per distinct event");
    // Still exactly that a while later.
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.wait_totals(&want, Duration::from_secs(1)).await;
}
