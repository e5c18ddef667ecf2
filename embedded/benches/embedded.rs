//! Embedded-mode benchmark: a load generator against the release `tally`
//! binary, each figure next to a baseline measured in the same run.
//!
//! - ingest (HTTP batch → validated, deduplicated, raw rows + rollups
//!   committed and fsynced → 200), events/s, against a raw SQLite batch
//!   insert of the same rows into the same `usage_events` table with the
//!   same durability settings (WAL, `synchronous=FULL`) and batch size,
//!   and against the same insert committing as many rows per transaction
//!   as the product's group commits did (`tally_aggregator_batch_messages`
//!   from its /metrics): the honest limit;
//! - the same ingest without HTTP (the collector's sink driven in-process);
//! - event-to-queryable latency p50/p99 at 2,000 events/s (time from
//!   sending a batch until a separate connection reads it);
//! - peak RSS (VmHWM) of `tally serve` with 1,000 and with 10,000
//!   customers (subscribed, a day of usage each, quota state following it,
//!   cost reports and a finalization run).
//!
//! Run with `ops/bench.sh` (release build). Results go to
//! `bench-results/embedded.json` and stdout.

use testkit::system as support;

use aggregator::store::sqlite::SqliteStore;
use aggregator::store::{RawRow, UsageWriter};
use chrono::{TimeZone, Utc};
use collector::sink::{Envelope, EventSink};
use reqwest::Method as M;
use schemas::{AcceptWindow, MeterCatalog, UsageEvent};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::pipeline::{bench_events, rss_kb, INGEST_KEY};
use support::System;

const BATCH: usize = 1_000;
const CLIENTS: usize = 4;

fn rows_of(events: &[schemas::RawEvent]) -> Vec<RawRow> {
    let meters = MeterCatalog::default_catalog();
    let window = AcceptWindow::unbounded();
    let mut rows = Vec::new();
    for (i, ev) in events.iter().enumerate() {
        let v = UsageEvent::validate(ev, &meters, &window).unwrap();
        for r in v.records {
            rows.push(RawRow {
                customer: v.customer.clone(),
                meter: r.meter.clone(),
                time: Utc.timestamp_opt(v.time.timestamp(), 0).unwrap(),
                app: r.app.clone(),
                dims: r.dims_json(),
                quantity: r.quantity,
                unique_value: r.unique_value.clone().unwrap_or_default(),
                source: v.source.clone(),
                id: v.id.clone(),
                event_type: v.event_type.clone(),
                partition: 0,
                offset: i as u64,
            });
        }
    }
    rows
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Posts `events` with CLIENTS concurrent clients in BATCH-event requests;
/// returns events/s until the last is acknowledged.
async fn http_ingest(url: &str, events: Vec<schemas::RawEvent>) -> f64 {
    let batches: Vec<Vec<schemas::RawEvent>> = events.chunks(BATCH).map(|c| c.to_vec()).collect();
    let n = events.len();
    let queue = Arc::new(std::sync::Mutex::new(batches));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (queue, url) = (queue.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                let Some(b) = queue.lock().unwrap().pop() else {
                    return;
                };
                let r = http
                    .post(format!("{url}/v1/events"))
                    .bearer_auth(INGEST_KEY)
                    .header("content-type", "application/cloudevents-batch+json")
                    .json(&b)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let n = 200_000;
    let tmp = tempfile::tempdir().unwrap();
    let meters = Arc::new(MeterCatalog::default_catalog());

    // Baseline: raw batch inserts of the same rows, same settings.
    let base_events = bench_events(n, "bench-raw");
    let rows = rows_of(&base_events);
    let raw_store = SqliteStore::open(&tmp.path().join("raw.db")).await.unwrap();
    raw_store.migrate().await.unwrap();
    let t = Instant::now();
    for chunk in rows.chunks(BATCH) {
        raw_store.write_raw(chunk.to_vec()).await.unwrap();
    }
    let raw_rate = n as f64 / t.elapsed().as_secs_f64();
    println!(
        "raw SQLite batch insert: {raw_rate:.0} events/s ({} rows)",
        rows.len()
    );

    // In-process: the embedded sink and processor, no HTTP.
    let store = Arc::new(
        SqliteStore::open(&tmp.path().join("sink.db"))
            .await
            .unwrap(),
    );
    store.migrate().await.unwrap();
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let sink_metrics = aggregator::metrics::Metrics::new();
    let (sink, writer) = embedded::ingest::start(
        store.clone(),
        meters.clone(),
        sink_metrics.clone(),
        10_000,
        tokio::sync::broadcast::channel(16).0,
        stop,
    )
    .await
    .unwrap();
    let sink_events = bench_events(n, "bench-sink");
    let window = AcceptWindow::at(Utc::now());
    let batches: Vec<Vec<Envelope>> = sink_events
        .chunks(BATCH)
        .map(|c| {
            c.iter()
                .map(|ev| Envelope {
                    key: UsageEvent::validate(ev, &meters, &window).unwrap().customer,
                    payload: serde_json::to_vec(ev).unwrap(),
                })
                .collect()
        })
        .collect();
    let queue = Arc::new(std::sync::Mutex::new(batches));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (queue, sink) = (queue.clone(), sink.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(b) = queue.lock().unwrap().pop() else {
                    return;
                };
                sink.send(b).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let sink_rate = n as f64 / t.elapsed().as_secs_f64();
    drop(sink);
    writer.await.unwrap();
    let sink_group = sink_metrics.batch_messages.get_sample_sum()
        / sink_metrics.batch_messages.get_sample_count().max(1) as f64;
    println!("embedded sink (no HTTP): {sink_rate:.0} events/s, {sink_group:.0} events per commit");

    // The tally binary over HTTP.
    let mut sys = System::embedded("bench", Some(tmp.path().join("serve")));
    let http_rate = http_ingest(&sys.ingest, bench_events(n, "bench-http")).await;
    // Events per group commit the product made: the baseline that commits
    // as many rows per transaction as it does.
    let metrics_text = reqwest::get(format!("{}/metrics", sys.ingest))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sample = |name: &str| -> f64 {
        metrics_text
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    };
    let http_group = sample("tally_aggregator_batch_messages_sum ")
        / sample("tally_aggregator_batch_messages_count ").max(1.0);
    println!(
        "embedded ingest over HTTP: {http_rate:.0} events/s, {http_group:.0} events per commit"
    );

    // Latency: 100-event batches every 50 ms for 20 s; time until a
    // separate connection reads the batch's last event.
    let reader = SqliteStore::open(&sys.dir.join("usage.db")).await.unwrap();
    let lat_events = bench_events(40_000, "bench-latency");
    let mut lat = Vec::new();
    let http = reqwest::Client::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for b in lat_events.chunks(100).take(400) {
        tick.tick().await;
        // Looked up by the indexed (customer, meter, time), then the id.
        let last =
            UsageEvent::validate(b.last().unwrap(), &meters, &AcceptWindow::unbounded()).unwrap();
        let t = Instant::now();
        let r = http
            .post(format!("{}/v1/events", sys.ingest))
            .bearer_auth(INGEST_KEY)
            .header("content-type", "application/cloudevents-batch+json")
            .json(&b)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        loop {
            let found: Option<i64> = sqlx::query_scalar(
                "SELECT 1 FROM usage_events WHERE customer = ? AND meter = ? AND time = ? AND id = ? LIMIT 1",
            )
            .bind(&last.customer)
            .bind(&last.records[0].meter)
            .bind(last.time.timestamp())
            .bind(&last.id)
            .fetch_optional(reader.pool())
            .await
            .unwrap();
            if found.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    println!("event-to-queryable at 2,000 events/s: p50 {p50:.1} ms, p99 {p99:.1} ms");
    let rss_ingest = rss_kb(sys.procs_pid()) / 1024;
    assert!(sys.terminate(), "tally serve exits 0 on SIGTERM");

    // The same raw insert, committing as many rows per transaction as the
    // product's group commits did over HTTP; run once `tally` has stopped,
    // so nothing else competes for the CPU or the disk.
    let same_rows = rows_of(&bench_events(n, "bench-raw-same"));
    let same_store = SqliteStore::open(&tmp.path().join("raw_same.db"))
        .await
        .unwrap();
    same_store.migrate().await.unwrap();
    let group = (http_group.round() as usize).max(1);
    let t = Instant::now();
    for chunk in same_rows.chunks(group) {
        same_store.write_raw(chunk.to_vec()).await.unwrap();
    }
    let raw_same_rate = n as f64 / t.elapsed().as_secs_f64();
    println!("raw SQLite insert, {group} rows per transaction: {raw_same_rate:.0} events/s");

    // Peak RSS with 1,000 and with 10,000 customers (TALLY_BENCH_RSS_CUSTOMERS
    // picks other sizes, comma-separated).
    let sizes: Vec<usize> = std::env::var("TALLY_BENCH_RSS_CUSTOMERS")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .map(|v| {
            v.trim()
                .parse()
                .expect("TALLY_BENCH_RSS_CUSTOMERS: numbers")
        })
        .collect();
    let mut rss = serde_json::Map::new();
    for customers in sizes {
        let (mib, events, rate) = peak_rss(tmp.path(), customers).await;
        println!(
            "peak RSS with {customers} customers ({events} events at {rate:.0}/s): {mib} MiB (after the ingest benchmark: {rss_ingest} MiB)"
        );
        rss.insert(
            customers.to_string(),
            json!({"peak_rss_mib": mib, "usage_events": events, "ingest_events_per_s": rate.round()}),
        );
    }

    let results = json!({
        "events": n,
        "batch": BATCH,
        "clients": CLIENTS,
        "raw_sqlite_insert_events_per_s": raw_rate.round(),
        "embedded_sink_events_per_s": sink_rate.round(),
        "embedded_http_events_per_s": http_rate.round(),
        "sink_vs_raw": (sink_rate / raw_rate * 1000.0).round() / 1000.0,
        "http_vs_raw": (http_rate / raw_rate * 1000.0).round() / 1000.0,
        "sink_events_per_commit": sink_group.round(),
        "http_events_per_commit": http_group.round(),
        "raw_sqlite_same_size_events_per_s": raw_same_rate.round(),
        "http_vs_raw_same_size": (http_rate / raw_same_rate * 1000.0).round() / 1000.0,
        "latency_ms_p50": (p50 * 10.0).round() / 10.0,
        "latency_ms_p99": (p99 * 10.0).round() / 10.0,
        "peak_rss_by_customers": rss,
        "peak_rss_mib_after_ingest_bench": rss_ingest,
    });
    std::fs::create_dir_all("../bench-results").unwrap();
    std::fs::write(
        "../bench-results/embedded.json",
        serde_json::to_string_pretty(&results).unwrap(),
    )
    .unwrap();
    println!("{}", serde_json::to_string_pretty(&results).unwrap());
}

/// `tally serve` with `customers` subscribed, a day of hourly usage each
/// (2 apps) sent over HTTP, the quota state, a tenth of them reading their
/// cost report, and a finalization run: its peak RSS (MiB), the usage
/// events and the ingest rate.
async fn peak_rss(dir: &std::path::Path, customers: usize) -> (u64, usize, f64) {
    // As `tally serve` runs by default: the quota state follows usage and
    // re-reads everyone only hourly (TALLY_BENCH_RSS_REREAD_SECS=1 gives
    // the test harness's re-read every second, what the earlier figure of
    // this benchmark ran with).
    let reread = std::env::var("TALLY_BENCH_RSS_REREAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3600);
    let sys = System::embedded_with(
        &format!("bench-rss-{customers}-{reread}"),
        Some(dir.join(format!("rss-{customers}-{reread}"))),
        reread,
    );
    let now = Utc::now();
    let month = billing_api::invoice::month_of(now);
    let plans = ["payg", "team", "business", "free"];
    for i in 0..customers {
        let id = collector::sources::simulator::customer_id(i);
        sys.customer(&id, plans[i % plans.len()], month.start).await;
    }
    let hour = now.timestamp() - now.timestamp() % 3600;
    let to = Utc.timestamp_opt(hour, 0).unwrap();
    let from = (to - chrono::Duration::hours(24)).max(month.start);
    let day = collector::sources::simulator::Workload {
        customers,
        apps_per_customer: 2,
        seed: 9,
    }
    .events(from, to, 3600);
    let usage_events = day.len();
    let rate = http_ingest(&sys.ingest, day).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in (0..customers).step_by(10) {
        let id = collector::sources::simulator::customer_id(i);
        let (s, _) = sys
            .api(M::GET, &format!("/v1/customers/{id}/costs"), None)
            .await;
        assert_eq!(s, 200);
    }
    let out = sys.finalize(month.end + chrono::Duration::hours(2));
    assert!(
        out.contains(&format!("finalized {customers} invoice(s)")),
        "{out}"
    );
    (rss_kb(sys.procs_pid()) / 1024, usage_events, rate)
}
