//! Data safety of the embedded mode: `tally serve` SIGKILLed while clients
//! are sending loses no acknowledged event, and a restart on the same data
//! directory resumes (new events are accepted, re-sent ones deduplicated,
//! the rollups agree with the raw rows).

use testkit::system as support;

use aggregator::store::sqlite::SqliteStore;
use chrono::{Duration, Utc};
use rust_decimal::Decimal;
use sqlx::Row;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use support::{requests, System};

/// Distinct event ids stored, and per-customer request totals from raw
/// rows and from rollups.
async fn stored(
    dir: &std::path::Path,
) -> (
    BTreeSet<String>,
    BTreeMap<String, Decimal>,
    BTreeMap<String, Decimal>,
) {
    let store = SqliteStore::open(&dir.join("usage.db")).await.unwrap();
    let ids: BTreeSet<String> = sqlx::query("SELECT DISTINCT id FROM usage_events")
        .fetch_all(store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| r.get("id"))
        .collect();
    let mut raw: BTreeMap<String, Decimal> = BTreeMap::new();
    for r in sqlx::query("SELECT customer, quantity FROM usage_events")
        .fetch_all(store.pool())
        .await
        .unwrap()
    {
        *raw.entry(r.get("customer")).or_default() +=
            r.get::<String, _>("quantity").parse::<Decimal>().unwrap();
    }
    let mut rolled: BTreeMap<String, Decimal> = BTreeMap::new();
    for (k, v) in store.totals().await.unwrap() {
        *rolled
            .entry(k.split('/').next().unwrap().to_owned())
            .or_default() += v;
    }
    (ids, raw, rolled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_ingest_loses_no_acknowledged_event() {
    let mut sys = System::embedded("crash", None);
    let dir = sys.dir.clone();
    let acked: Arc<Mutex<BTreeSet<String>>> = Default::default();
    let sent: Arc<Mutex<BTreeSet<String>>> = Default::default();
    let t = Utc::now() - Duration::minutes(1);

    // Four clients send batches of 50 one-request events as fast as they can.
    let client = |c: usize| {
        let (ingest, acked, sent) = (sys.ingest.clone(), acked.clone(), sent.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for b in 0.. {
                let ids: Vec<String> = (0..50).map(|i| format!("c{c}-b{b}-e{i}")).collect();
                let body: Vec<_> = ids
                    .iter()
                    .map(|id| requests(id, &format!("cus_{c}"), "web", t, 1))
                    .collect();
                sent.lock().unwrap().extend(ids.iter().cloned());
                let r = http
                    .post(format!("{ingest}/v1/events"))
                    .bearer_auth(support::pipeline::INGEST_KEY)
                    .header("content-type", "application/cloudevents-batch+json")
                    .json(&body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => acked.lock().unwrap().extend(ids),
                    _ => return b,
                }
            }
            unreachable!()
        })
    };
    let clients: Vec<_> = (0..4).map(client).collect();
    // Kill once a good number of batches have been acknowledged.
    while acked.lock().unwrap().len() < 4_000 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    sys.kill9();
    for c in clients {
        c.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let sent = sent.lock().unwrap().clone();
    assert!(
        acked.len() >= 4_000 && sent.len() > acked.len(),
        "{} acked of {} sent",
        acked.len(),
        sent.len()
    );

    let (ids, _, _) = stored(&dir).await;
    let lost: Vec<_> = acked.difference(&ids).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged events lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );

    // Restart on the same directory: everything sent is re-sent (clients
    // retry what was not acknowledged, and some of what was); new events
    // too. Every event is stored exactly once; rollups equal raw rows.
    let sys = System::embedded("crash", Some(dir.clone()));
    let all: Vec<String> = sent.iter().cloned().collect();
    for chunk in all.chunks(500) {
        let body: Vec<_> = chunk
            .iter()
            .map(|id| {
                let c = &id[1..id.find('-').unwrap()];
                requests(id, &format!("cus_{c}"), "web", t, 1)
            })
            .collect();
        let (s, v) = sys.ingest(&body).await;
        assert_eq!(s, 200, "{v}");
    }
    let (ids, raw, rolled) = stored(&dir).await;
    assert_eq!(ids, sent, "every sent event stored once after the retry");
    let mut want: BTreeMap<String, Decimal> = BTreeMap::new();
    for id in &sent {
        *want
            .entry(format!("cus_{}", &id[1..id.find('-').unwrap()]))
            .or_default() += Decimal::ONE;
    }
    assert_eq!(raw, want, "raw rows: one per event");
    assert_eq!(rolled, want, "rollups agree with the raw rows");
}
