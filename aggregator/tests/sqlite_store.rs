//! The SQLite usage store (embedded mode) answers every usage question
//! exactly as the ClickHouse store does for the same events written through
//! the same processor (validation, deduplication, rollups), and resumes a
//! partition the same way: offsets, dedup keys and rollup repair after an
//! interrupted batch.

use aggregator::metrics::Metrics;
use aggregator::pipeline::{DeadLetter, DeadLetterSink, Message, Processor};
use aggregator::store::clickhouse::ClickHouseStore;
use aggregator::store::sqlite::SqliteStore;
use aggregator::store::{RawRow, IMPORTED_PARTITION};
use aggregator::{Granularity, UsageQuery, UsageRow, UsageStore, UsageWriter};
use chrono::{DateTime, Duration, DurationRound, Utc};
use rust_decimal::Decimal;
use schemas::MeterCatalog;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

struct NoDeadLetters;
impl DeadLetterSink for NoDeadLetters {
    async fn send(&self, letters: Vec<DeadLetter>) -> anyhow::Result<()> {
        anyhow::bail!("unexpected dead letters: {letters:?}")
    }
}

fn msg(
    offset: i64,
    id: &str,
    customer: &str,
    t: DateTime<Utc>,
    ty: &str,
    data: serde_json::Value,
) -> Message {
    Message {
        partition: 0,
        offset,
        key: Some(customer.as_bytes().to_vec()),
        payload: Some(
            json!({"specversion":"1.0","id":id,"source":"test","type":ty,"subject":customer,
                   "time":t.to_rfc3339(),"data":data})
            .to_string()
            .into_bytes(),
        ),
    }
}

fn sorted(mut rows: Vec<UsageRow>) -> Vec<UsageRow> {
    rows.sort_by(|a, b| (a.bucket, &a.group).cmp(&(b.bucket, &b.group)));
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_answers_as_clickhouse_does() {
    let url = std::env::var("TALLY_CLICKHOUSE_URL")
        .expect("TALLY_CLICKHOUSE_URL is not set: run the tests through ops/test.sh");
    let db = format!(
        "sqlite_cmp_{}_{}",
        std::process::id(),
        Utc::now().timestamp_subsec_nanos()
    );
    let ch = Arc::new(ClickHouseStore::new(&url, &db));
    ch.migrate().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("usage.db");
    let lite = Arc::new(SqliteStore::open(&path).await.unwrap());
    lite.migrate().await.unwrap();
    lite.migrate().await.unwrap(); // idempotent

    let meters = Arc::new(MeterCatalog::default_catalog());
    let t0 = Utc::now().duration_trunc(Duration::hours(1)).unwrap() - Duration::hours(30);
    let mut msgs = Vec::new();
    let mut off = 0;
    let mut push = |id: String, c: &str, t: DateTime<Utc>, ty: &str, data: serde_json::Value| {
        off += 1;
        msgs.push(msg(off, &id, c, t, ty, data));
    };
    for i in 0..60i64 {
        let t = t0 + Duration::minutes(i * 29 + 7);
        let c = ["cus_a", "cus_b", "cus_c"][(i % 3) as usize];
        let app = ["web", "worker"][(i % 2) as usize];
        let ty = ["t4g.nano", "t4g.small", "c6g.large"][(i % 4 % 3) as usize];
        push(
            format!("c{i}"),
            c,
            t,
            "tally.compute",
            json!({"app": app, "instance_type": ty, "region": "fra", "instance_seconds": 300 + i}),
        );
        push(
            format!("r{i}"),
            c,
            t + Duration::seconds(13),
            "tally.requests",
            json!({"app": app, "count": 1000 * i + 7}),
        );
        push(
            format!("d{i}"),
            c,
            t,
            "tally.disk",
            json!({"app": app, "volume_id": format!("vol-{}", i % 2), "gb_seconds": format!("{}.25", 10 * i)}),
        );
        if i % 7 == 0 {
            // A client retry: same source and id, counted once.
            push(
                format!("r{i}"),
                c,
                t + Duration::seconds(13),
                "tally.requests",
                json!({"app": app, "count": 1000 * i + 7}),
            );
        }
    }
    let (_tx, stop) = tokio::sync::watch::channel(false);
    let mut p_ch = Processor::new(ch.clone(), meters.clone(), Metrics::new());
    let mut p_lite = Processor::new(lite.clone(), meters.clone(), Metrics::new());
    for batch in msgs.chunks(37) {
        p_ch.process(batch.to_vec(), &NoDeadLetters, &stop)
            .await
            .unwrap();
        p_lite
            .process(batch.to_vec(), &NoDeadLetters, &stop)
            .await
            .unwrap();
    }

    assert_eq!(lite.totals().await.unwrap(), ch.totals().await.unwrap());
    let mut asked = 0;
    let ranges = [
        (t0, t0 + Duration::hours(31)),
        (
            t0 + Duration::minutes(17),
            t0 + Duration::hours(3) + Duration::minutes(5),
        ),
        (t0 + Duration::minutes(40), t0 + Duration::minutes(50)),
    ];
    let groupings: [&[&str]; 4] = [&[], &["app"], &["app", "instance_type"], &["volume_id"]];
    for customer in ["cus_a", "cus_b", "cus_c", "cus_none"] {
        for meter in ["compute", "requests", "disk"] {
            let def = meters.get(meter).unwrap();
            for (from, to) in ranges {
                for group_by in groupings {
                    for granularity in [None, Some(Granularity::Hour), Some(Granularity::Day)] {
                        for raw in [false, true] {
                            let q = UsageQuery {
                                customer: customer.into(),
                                meter: meter.into(),
                                from,
                                to,
                                group_by: group_by.iter().map(|s| s.to_string()).collect(),
                                granularity,
                                raw,
                            };
                            let a = sorted(ch.query(def, &q).await.unwrap());
                            let b = sorted(lite.query(def, &q).await.unwrap());
                            assert_eq!(b, a, "{q:?}");
                            asked += 1;
                        }
                    }
                }
            }
        }
    }
    assert_eq!(asked, 4 * 3 * 3 * 4 * 3 * 2);

    // One pass for every customer (finalization's read), and for an id range.
    let questions: Vec<_> = ["compute", "requests"]
        .iter()
        .map(|m| {
            (
                meters.get(m).unwrap().clone(),
                UsageQuery {
                    customer: String::new(),
                    meter: m.to_string(),
                    from: t0,
                    to: t0 + Duration::hours(31),
                    group_by: vec!["app".into()],
                    granularity: None,
                    raw: false,
                },
            )
        })
        .collect();
    for range in [None, Some(("cus_b", "cus_c"))] {
        let norm =
            |v: Vec<aggregator::store::PerCustomer>| -> Vec<BTreeMap<String, Vec<UsageRow>>> {
                v.into_iter()
                    .map(|per| per.into_iter().map(|(c, rows)| (c, sorted(rows))).collect())
                    .collect()
            };
        let a = norm(ch.query_all(&questions, range).await.unwrap());
        let b = norm(lite.query_all(&questions, range).await.unwrap());
        assert_eq!(b, a, "{range:?}");
        assert_eq!(a[0].len(), if range.is_none() { 3 } else { 2 });
    }
    // A list of ids reads those customers and no others (cus_b lies
    // between them and is left out; an unknown id matches nothing).
    let ids = vec!["cus_c".to_string(), "cus_a".into(), "cus_zz".into()];
    let norm = |v: Vec<aggregator::store::PerCustomer>| -> Vec<BTreeMap<String, Vec<UsageRow>>> {
        v.into_iter()
            .map(|per| per.into_iter().map(|(c, rows)| (c, sorted(rows))).collect())
            .collect()
    };
    let a = norm(ch.query_some(&questions, &ids).await.unwrap());
    let b = norm(lite.query_some(&questions, &ids).await.unwrap());
    assert_eq!(b, a);
    let everyone = norm(ch.query_all(&questions, None).await.unwrap());
    for (some, all) in a.iter().zip(&everyone) {
        let keys: Vec<&String> = some.keys().collect();
        assert_eq!(keys, ["cus_a", "cus_c"]);
        for (c, rows) in some {
            assert_eq!(rows, &all[c]);
        }
    }

    // Resume after reopening the file: the same offset and dedup keys.
    drop(p_lite);
    let lite2 = Arc::new(SqliteStore::open(&path).await.unwrap());
    let window = t0 - Duration::days(1);
    let s_ch = ch.load_partition(0, window).await.unwrap();
    let s_lite = lite2.load_partition(0, window).await.unwrap();
    assert_eq!(s_lite.max_offset, s_ch.max_offset);
    assert_eq!(
        s_lite.max_offset,
        Some(off as u64),
        "the last message's offset"
    );
    let mut seen_a = s_ch.seen.clone();
    let mut seen_b = s_lite.seen.clone();
    seen_a.sort();
    seen_b.sort();
    assert_eq!(seen_b, seen_a);
    assert_eq!(s_lite.repaired_keys, 0);

    // A batch whose raw rows landed but whose rollups did not: repaired
    // from raw rows on the next load.
    let next = s_lite.max_offset.unwrap() + 1;
    let late = RawRow {
        offset: next,
        ..late_row(t0)
    };
    lite2.write_raw(vec![late.clone()]).await.unwrap();
    ch.write_raw(vec![late]).await.unwrap();
    let r_lite = lite2.load_partition(0, window).await.unwrap();
    let r_ch = ch.load_partition(0, window).await.unwrap();
    assert_eq!(r_lite.max_offset, Some(next));
    assert_eq!((r_lite.repaired_keys, r_ch.repaired_keys), (1, 1));
    assert_eq!(lite2.totals().await.unwrap(), ch.totals().await.unwrap());

    // Imported rows (`tally import`) seed every partition's deduplication,
    // an empty one's too, in both stores (SQLite used to load none).
    let imported = RawRow {
        id: "imported-1".into(),
        partition: IMPORTED_PARTITION,
        offset: 0,
        ..late_row(t0)
    };
    lite2.write_raw(vec![imported.clone()]).await.unwrap();
    ch.write_raw(vec![imported]).await.unwrap();
    let e_lite = lite2.load_partition(1, window).await.unwrap();
    let e_ch = ch.load_partition(1, window).await.unwrap();
    assert_eq!((e_lite.max_offset, e_ch.max_offset), (None, None));
    let ids = |s: &aggregator::store::PartitionState| {
        let mut v: Vec<String> = s.seen.iter().map(|(_, id, _)| id.clone()).collect();
        v.sort();
        v
    };
    assert_eq!(ids(&e_ch), ["imported-1"]);
    assert_eq!(ids(&e_lite), ids(&e_ch));
    // And a live partition's keys include them beside its own.
    let l_lite = lite2.load_partition(0, window).await.unwrap();
    let l_ch = ch.load_partition(0, window).await.unwrap();
    assert!(ids(&l_ch).contains(&"imported-1".to_owned()));
    assert_eq!(ids(&l_lite), ids(&l_ch));
}

/// A row of partition 0 (offset 0: set it) at `t0` + 5 minutes.
fn late_row(t0: DateTime<Utc>) -> RawRow {
    RawRow {
        customer: "cus_a".into(),
        meter: "requests".into(),
        time: t0 + Duration::minutes(5),
        app: "web".into(),
        dims: "{}".into(),
        quantity: Decimal::from(500),
        unique_value: String::new(),
        source: "test".into(),
        id: "late-1".into(),
        event_type: "tally.requests".into(),
        partition: 0,
        offset: 0,
    }
}
