//! Pipeline benchmark: a load generator against real tansu and ClickHouse,
//! each figure next to a baseline measured in the same run.
//!
//! - collector ingest (HTTP batch → Kafka ack), events/s, against the raw
//!   rdkafka producer rate (same producer settings, same payloads, same
//!   broker);
//! - aggregator (Kafka → ClickHouse), events/s, against a raw consume of the
//!   same messages plus a raw bulk insert of the same rows;
//! - event-to-queryable latency p50/p99 under a steady load;
//! - peak RSS (VmHWM) of the collector and aggregator processes.
//!
//! Run with `ops/bench.sh` (release build, services started). Results go to
//! `bench-results/pipeline.json` and stdout.

use testkit::pipeline as support;

use aggregator::store::clickhouse::ClickHouseStore;
use aggregator::store::{RawRow, UsageWriter};
use chrono::Utc;
use rdkafka::producer::FutureRecord;
use rust_decimal::Decimal;
use serde_json::json;
use std::time::{Duration, Instant};
use support::*;

async fn raw_produce(brokers: &str, topic: &str, payloads: &[(String, Vec<u8>)]) -> f64 {
    // Exactly the collector's producer, so the ratio isolates the
    // collector's own work (HTTP, validation, batching).
    let p = collector::kafka::new_producer(&collector::kafka::KafkaSettings {
        brokers: brokers.into(),
        topic: topic.into(),
        partitions: 4,
        delivery_timeout: Duration::from_secs(30),
    })
    .unwrap();
    let start = Instant::now();
    let mut futs = Vec::with_capacity(payloads.len());
    for (k, v) in payloads {
        futs.push(
            p.send_result(FutureRecord::to(topic).key(k).payload(v))
                .map_err(|(e, _)| e)
                .unwrap(),
        );
    }
    for f in futures::future::join_all(futs).await {
        f.unwrap().map_err(|(e, _)| e).unwrap();
    }
    payloads.len() as f64 / start.elapsed().as_secs_f64()
}

async fn post_concurrently(
    url: &str,
    evs: &[schemas::RawEvent],
    batch: usize,
    clients: usize,
) -> f64 {
    let chunks: Vec<Vec<schemas::RawEvent>> = evs.chunks(batch).map(|c| c.to_vec()).collect();
    let per = chunks.len().div_ceil(clients);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for part in chunks.chunks(per) {
        let part = part.to_vec();
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            for c in part {
                post_all(&url, &c, batch).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    evs.len() as f64 / start.elapsed().as_secs_f64()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let env = Env::new("bench");
    let mut results = serde_json::Map::new();
    results.insert("events".into(), json!(n));

    // 1. Raw producer baseline vs collector ingest, same payloads.
    let base_events = bench_events(n, "bench-raw");
    let payloads: Vec<(String, Vec<u8>)> = base_events
        .iter()
        .map(|e| {
            (
                e["subject"].as_str().unwrap().to_string(),
                serde_json::to_vec(e).unwrap(),
            )
        })
        .collect();
    aggregator::kafka::ensure_topic(&env.brokers, &env.topic, 4)
        .await
        .unwrap();
    let raw_topic = format!("{}-raw", env.topic);
    aggregator::kafka::ensure_topic(&env.brokers, &raw_topic, 4)
        .await
        .unwrap();
    let raw_rate = raw_produce(&env.brokers, &raw_topic, &payloads).await;
    println!("raw rdkafka producer: {raw_rate:.0} events/s");

    let (cfg, port) = env.collector_config("", 10_000);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("max_batch_events = 1000", "max_batch_events = 5000")
        .replace("max_body_bytes = 262144", "max_body_bytes = 8388608");
    std::fs::write(&cfg, text).unwrap();
    let collector = env.spawn_collector(&cfg, port);
    let url = format!("http://127.0.0.1:{port}");
    let ingest_events = bench_events(n, "bench-ingest");
    let ingest_rate = post_concurrently(&url, &ingest_events, 1000, 4).await;
    println!(
        "collector ingest: {ingest_rate:.0} events/s ({:.0}% of raw)",
        100.0 * ingest_rate / raw_rate
    );
    results.insert("raw_producer_events_per_s".into(), json!(raw_rate.round()));
    results.insert(
        "collector_ingest_events_per_s".into(),
        json!(ingest_rate.round()),
    );
    results.insert(
        "collector_vs_raw".into(),
        json!((ingest_rate / raw_rate * 1000.0).round() / 1000.0),
    );

    // 2. Raw consume + raw bulk insert baseline vs the aggregator, on the
    // n messages the collector just wrote.
    // The aggregator's own consumer configuration, so the ratio isolates
    // its work (decode, validate, dedup, roll up, insert) from the broker.
    let consumer = aggregator::kafka::consumer(&aggregator::kafka::PipelineConfig {
        brokers: env.brokers.clone(),
        topic: env.topic.clone(),
        dlq_topic: env.dlq_topic(),
        deltas_topic: env.deltas_topic(),
        fault_abort_before_delta: None,
        group_id: unique("bench-raw-consumer"),
        partitions: 4,
        batch_max_events: 20_000,
        batch_max_wait: Duration::from_millis(100),
        static_partitions: None,
    })
    .unwrap();
    let start = Instant::now();
    let mut got = 0usize;
    while got < n {
        let _ = consumer.recv().await.unwrap();
        got += 1;
    }
    let consume_secs = start.elapsed().as_secs_f64();
    drop(consumer);
    let raw_store = ClickHouseStore::new(&env.clickhouse_url, &format!("{}_raw", env.database));
    raw_store.migrate().await.unwrap();
    let now = chrono::DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
    let rows: Vec<RawRow> = ingest_events
        .iter()
        .enumerate()
        .map(|(i, e)| RawRow {
            customer: e["subject"].as_str().unwrap().into(),
            meter: "requests".into(),
            time: now,
            app: "app".into(),
            dims: "{}".into(),
            quantity: Decimal::from(i as u64),
            unique_value: String::new(),
            source: "bench".into(),
            id: e["id"].as_str().unwrap().into(),
            event_type: "tally.requests".into(),
            partition: 0,
            offset: i as u64,
        })
        .collect();
    let start = Instant::now();
    for chunk in rows.chunks(20_000) {
        raw_store.write_raw(chunk.to_vec()).await.unwrap();
    }
    let insert_secs = start.elapsed().as_secs_f64();
    let baseline_rate = n as f64 / (consume_secs + insert_secs);
    println!(
        "raw consume {:.0}/s + raw insert {:.0}/s → baseline {baseline_rate:.0} events/s",
        n as f64 / consume_secs,
        n as f64 / insert_secs
    );

    let metrics_port = free_port();
    let start = Instant::now();
    let agg = env.spawn_aggregator(metrics_port, None);
    let murl = format!("http://127.0.0.1:{metrics_port}/metrics");
    wait_http(&murl, Duration::from_secs(30));
    loop {
        if metric(&murl, "tally_aggregator_events_written_total").await >= n as f64 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "aggregator did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agg_rate = n as f64 / start.elapsed().as_secs_f64();
    println!(
        "aggregator: {agg_rate:.0} events/s ({:.0}% of baseline; includes start-up and group join)",
        100.0 * agg_rate / baseline_rate
    );
    results.insert(
        "raw_consume_events_per_s".into(),
        json!((n as f64 / consume_secs).round()),
    );
    results.insert(
        "raw_insert_events_per_s".into(),
        json!((n as f64 / insert_secs).round()),
    );
    results.insert(
        "raw_consume_plus_insert_events_per_s".into(),
        json!(baseline_rate.round()),
    );
    results.insert("aggregator_events_per_s".into(), json!(agg_rate.round()));
    results.insert(
        "aggregator_vs_baseline".into(),
        json!((agg_rate / baseline_rate * 1000.0).round() / 1000.0),
    );

    // 3. Event-to-queryable latency under a steady load: 100-event batches
    // every 50 ms (2,000 events/s) for 20 s.
    let store = env.store();
    let lat_events = bench_events(40_000, "bench-latency");
    let sent: std::sync::Arc<std::sync::Mutex<Vec<Instant>>> = Default::default();
    let sender = {
        let (url, sent, evs) = (url.clone(), sent.clone(), lat_events.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            for chunk in evs.chunks(100) {
                tick.tick().await;
                sent.lock().unwrap().push(Instant::now());
                post_all(&url, chunk, 100).await;
            }
        })
    };
    let mut latencies = Vec::new();
    let mut next = 0usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    while next < lat_events.len() / 100 && Instant::now() < deadline {
        let count: u64 = store
            .client()
            .query("SELECT count() FROM usage_events WHERE source = 'bench-latency'")
            .fetch_one()
            .await
            .unwrap();
        let seen_at = Instant::now();
        let sent_now = sent.lock().unwrap().clone();
        while next < sent_now.len() && count as usize >= (next + 1) * 100 {
            latencies.push(seen_at.duration_since(sent_now[next]).as_secs_f64() * 1000.0);
            next += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sender.await.unwrap();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p50, p99) = (pct(&latencies, 0.5), pct(&latencies, 0.99));
    println!("event-to-queryable latency at 2,000 events/s: p50 {p50:.0} ms, p99 {p99:.0} ms ({} batches)", latencies.len());
    results.insert("latency_rate_events_per_s".into(), json!(2000));
    results.insert("latency_p50_ms".into(), json!(p50.round()));
    results.insert("latency_p99_ms".into(), json!(p99.round()));
    results.insert(
        "collector_peak_rss_mib".into(),
        json!(rss_kb(collector.child.id()) / 1024),
    );
    results.insert(
        "aggregator_peak_rss_mib".into(),
        json!(rss_kb(agg.child.id()) / 1024),
    );
    println!(
        "peak RSS: collector {} MiB, aggregator {} MiB",
        rss_kb(collector.child.id()) / 1024,
        rss_kb(agg.child.id()) / 1024
    );

    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench-results");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("pipeline.json"),
        serde_json::to_string_pretty(&results).unwrap(),
    )
    .unwrap();
    println!("{}", serde_json::to_string_pretty(&results).unwrap());
}
