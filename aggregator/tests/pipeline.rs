//! Pipeline behaviour against real tansu and ClickHouse: end to end from
//! the simulator to ClickHouse, duplicates, bad input, poison messages and
//! dead-letter replay, and gauge semantics of the inventory sampler.

use testkit::pipeline as support;

use chrono::{Duration as CDuration, Utc};
use collector::sources::simulator::{ground_truth, Workload};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use rust_decimal::Decimal;
use schemas::MeterCatalog;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use support::*;

fn workload_events(
    customers: usize,
    apps: usize,
    minutes: i64,
    seed: u64,
) -> Vec<schemas::RawEvent> {
    let now = Utc::now().timestamp();
    let from = chrono::DateTime::from_timestamp(now - now % 3600 - 3600, 0).unwrap();
    Workload {
        customers,
        apps_per_customer: apps,
        seed,
    }
    .events(from, from + CDuration::minutes(minutes), 60)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_to_clickhouse_totals_equal_ground_truth() {
    let env = Env::new("e2e");
    let (cfg, port) = env.collector_config("", 5000);
    let mut collector = env.spawn_collector(&cfg, port);
    let mut agg = env.spawn_aggregator(free_port(), None);
    let events = workload_events(5, 3, 45, 11);
    let truth = ground_truth(&events, &MeterCatalog::default_catalog());
    assert!(truth.len() >= 30, "workload too small: {}", truth.len());
    post_all(&format!("http://127.0.0.1:{port}"), &events, 250).await;
    env.wait_totals(&truth, Duration::from_secs(90)).await;
    assert_eq!(
        env.raw_count().await,
        events.len() as u64,
        "one raw row per event"
    );
    // Graceful shutdown on SIGTERM: both exit cleanly.
    for p in [&mut collector, &mut agg] {
        p.terminate();
        let status = p.child.try_wait().unwrap().expect("exited");
        assert!(status.success(), "{} exited with {status}", p.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_sent_twice_is_counted_once() {
    let env = Env::new("dup");
    let (cfg, port) = env.collector_config("", 5000);
    let _collector = env.spawn_collector(&cfg, port);
    let metrics_port = free_port();
    let _agg = env.spawn_aggregator(metrics_port, None);
    let events = workload_events(3, 2, 30, 12);
    let truth = ground_truth(&events, &MeterCatalog::default_catalog());
    let url = format!("http://127.0.0.1:{port}");
    post_all(&url, &events, 100).await;
    env.wait_totals(&truth, Duration::from_secs(60)).await;
    // The same (source, id) again: minutes apart in event time, reversed,
    // in batches of another size.
    let mut again: Vec<_> = events
        .iter()
        .map(|e| {
            let mut e = e.clone();
            let t = chrono::DateTime::parse_from_rfc3339(e["time"].as_str().unwrap()).unwrap()
                + CDuration::minutes(7);
            e.insert("time".into(), json!(t.to_rfc3339()));
            e
        })
        .collect();
    again.reverse();
    post_all(&url, &again, 37).await;
    let dup_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while metric(&dup_url, "tally_aggregator_events_duplicate_total").await < events.len() as f64 {
        assert!(
            std::time::Instant::now() < deadline,
            "duplicates were not all consumed"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    env.wait_totals(&truth, Duration::from_secs(10)).await;
    assert_eq!(env.raw_count().await, events.len() as u64);
}

fn ev(id: &str, ty: &str, data: serde_json::Value) -> serde_json::Value {
    json!({"specversion":"1.0","id":id,"source":"test","type":ty,"subject":"cus_bad","time":Utc::now().to_rfc3339(),"data":data})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_4xx_and_writes_nothing() {
    let env = Env::new("bad");
    let (cfg, port) = env.collector_config("", 5000);
    let _collector = env.spawn_collector(&cfg, port);
    let _agg = env.spawn_aggregator(free_port(), None);
    let url = format!("http://127.0.0.1:{port}/v1/events");
    let http = reqwest::Client::new();
    let good = ev("good-1", "tally.requests", json!({"app":"web","count":5}));
    let big_string = "x".repeat(300_000);
    let many: Vec<_> = (0..1001)
        .map(|i| {
            ev(
                &format!("m{i}"),
                "tally.requests",
                json!({"app":"web","count":1}),
            )
        })
        .collect();
    let single = "application/cloudevents+json";
    let batch = "application/cloudevents-batch+json";
    // (name, key, content type, body, status, code)
    type Case<'a> = (&'a str, Option<&'a str>, &'a str, String, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "no key",
            None,
            single,
            good.to_string(),
            401,
            "unauthorized",
        ),
        (
            "wrong key",
            Some("nope"),
            single,
            good.to_string(),
            401,
            "unauthorized",
        ),
        (
            "malformed json",
            Some(INGEST_KEY),
            single,
            "{\"id\": ".into(),
            400,
            "malformed_json",
        ),
        (
            "array as single",
            Some(INGEST_KEY),
            single,
            "[1]".into(),
            400,
            "wrong_shape",
        ),
        (
            "empty batch",
            Some(INGEST_KEY),
            batch,
            "[]".into(),
            400,
            "empty_batch",
        ),
        (
            "wrong content type",
            Some(INGEST_KEY),
            "text/plain",
            good.to_string(),
            415,
            "unsupported_media_type",
        ),
        (
            "wrong types",
            Some(INGEST_KEY),
            single,
            ev("b1", "tally.requests", json!({"app":7,"count":"many"})).to_string(),
            400,
            "invalid_event",
        ),
        (
            "missing fields",
            Some(INGEST_KEY),
            single,
            json!({"specversion":"1.0","type":"tally.requests","data":{}}).to_string(),
            400,
            "invalid_event",
        ),
        (
            "unknown event type",
            Some(INGEST_KEY),
            single,
            ev("b2", "tally.gpu", json!({"app":"web"})).to_string(),
            400,
            "invalid_event",
        ),
        (
            "negative quantity",
            Some(INGEST_KEY),
            single,
            ev("b3", "tally.requests", json!({"app":"web","count":-3})).to_string(),
            400,
            "invalid_event",
        ),
        (
            "far future",
            Some(INGEST_KEY),
            single,
            {
                let mut e = ev("b4", "tally.requests", json!({"app":"web","count":1}));
                e["time"] = json!((Utc::now() + CDuration::days(2)).to_rfc3339());
                e.to_string()
            },
            400,
            "invalid_event",
        ),
        (
            "before retention window",
            Some(INGEST_KEY),
            single,
            {
                let mut e = ev("b5", "tally.requests", json!({"app":"web","count":1}));
                e["time"] = json!((Utc::now() - CDuration::days(70)).to_rfc3339());
                e.to_string()
            },
            400,
            "invalid_event",
        ),
        (
            "oversized body",
            Some(INGEST_KEY),
            single,
            ev(
                "b6",
                "tally.requests",
                json!({"app":"web","count":1,"pad":big_string}),
            )
            .to_string(),
            413,
            "payload_too_large",
        ),
        (
            "batch too large",
            Some(INGEST_KEY),
            batch,
            serde_json::to_string(&many).unwrap(),
            413,
            "batch_too_large",
        ),
    ];
    for (name, key, ctype, body, status, code) in &cases {
        let mut req = http
            .post(&url)
            .header("content-type", *ctype)
            .body(body.clone());
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        let got = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap_or(json!({}));
        assert_eq!(got, *status, "{name}: {body}");
        assert_eq!(body["code"], *code, "{name}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: no human message: {body}"
        );
    }
    // Field-level reasons name the field.
    let resp = http
        .post(&url)
        .bearer_auth(INGEST_KEY)
        .header("content-type", single)
        .body(ev("b3", "tally.requests", json!({"app":"web","count":-3})).to_string())
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["errors"][0]["field"], "data.count");
    assert_eq!(body["errors"][0]["code"], "negative_quantity");
    // A mixed batch: valid events accepted (207), invalid ones itemised.
    let mixed = json!([
        good,
        ev("bad-in-batch", "tally.requests", json!({"app":"web"})),
        ev("good-2", "tally.egress", json!({"app":"web","bytes":10}))
    ]);
    let resp = http
        .post(&url)
        .bearer_auth(INGEST_KEY)
        .header("content-type", batch)
        .body(mixed.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 207);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected"].as_u64()),
        (Some(2), Some(1)),
        "{body}"
    );
    assert_eq!(body["errors"][0]["index"], 1);
    assert_eq!(body["errors"][0]["field"], "data.count");
    let want = BTreeMap::from([
        ("cus_bad/web/requests".to_string(), Decimal::from(5)),
        ("cus_bad/web/egress".to_string(), Decimal::from(10)),
    ]);
    env.wait_totals(&want, Duration::from_secs(60)).await;
    assert_eq!(
        env.raw_count().await,
        2,
        "only the two valid events were written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_goes_to_dead_letters_and_replays_after_a_fix() {
    let env = Env::new("dlq");
    let _agg = env.spawn_aggregator(free_port(), None);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .create()
        .unwrap();
    // Let the aggregator create the topics and join the group.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let send = |payload: Vec<u8>| {
        let producer = producer.clone();
        let topic = env.topic.clone();
        async move {
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key("cus_p")
                        .payload(&payload)
                        .partition(0),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    };
    send(b"\x00\x01 not json".to_vec()).await;
    send(
        ev("gpu-1", "tally.gpu", json!({"app":"ml","gpu_seconds":30}))
            .to_string()
            .replace("cus_bad", "cus_p")
            .into_bytes(),
    )
    .await;
    for i in 0..5 {
        send(
            ev(
                &format!("ok-{i}"),
                "tally.requests",
                json!({"app":"web","count":2}),
            )
            .to_string()
            .replace("cus_bad", "cus_p")
            .into_bytes(),
        )
        .await;
    }
    let want = BTreeMap::from([("cus_p/web/requests".to_string(), Decimal::from(10))]);
    env.wait_totals(&want, Duration::from_secs(60)).await;

    // Both poison messages are on the dead-letter topic with their reasons.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("group.id", unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&env.dlq_topic()]).unwrap();
    let mut codes = Vec::new();
    while codes.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("dead letters arrive")
            .unwrap();
        let h = m.headers().expect("dead letters carry headers");
        let code = aggregator::kafka::header(h, aggregator::pipeline::DLQ_CODE)
            .unwrap()
            .to_string();
        assert!(
            aggregator::kafka::header(h, aggregator::pipeline::DLQ_REASON)
                .is_some_and(|r| !r.is_empty())
        );
        assert_eq!(
            aggregator::kafka::header(h, aggregator::pipeline::DLQ_SOURCE_PARTITION),
            Some("0")
        );
        codes.push(code);
    }
    codes.sort();
    assert_eq!(codes, vec!["malformed_json", "unknown_event_type"]);

    // The fix: a catalog with a GPU meter. Restart the aggregator with it and
    // replay the dead letters; the GPU event now counts, once.
    drop(_agg);
    let mut cat = MeterCatalog::default_catalog();
    cat.meters.push(serde_json::from_value(json!({"key":"gpu","event_type":"tally.gpu","unit":"gpu_second","value_path":"gpu_seconds",
        "aggregation":"sum","dimensions":[{"name":"app","path":"app","required":true}]})).unwrap());
    let meters = env.dir.join("meters.json");
    std::fs::write(&meters, serde_json::to_string(&cat).unwrap()).unwrap();
    let _agg2 = env.spawn_aggregator(free_port(), Some(&meters));
    let report: serde_json::Value =
        serde_json::from_str(&env.aggregator_cmd(&["dlq-replay", "--idle-secs", "3"], None))
            .unwrap();
    assert_eq!(report["replayed"], 2, "{report}");
    let want = BTreeMap::from([
        ("cus_p/web/requests".to_string(), Decimal::from(10)),
        ("cus_p/ml/gpu".to_string(), Decimal::from(30)),
    ]);
    env.wait_totals(&want, Duration::from_secs(60)).await;
}

/// A control plane stand-in serving an inventory document that the test
/// changes over time.
async fn inventory_server(doc: std::sync::Arc<std::sync::Mutex<serde_json::Value>>) -> u16 {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route(
        "/v1/inventory",
        get(move || {
            let doc = doc.clone();
            async move { axum::Json(doc.lock().unwrap().clone()) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gauges_bill_exact_time_across_collector_restart_and_resize() {
    let env = Env::new("gauge");
    let _agg = env.spawn_aggregator(free_port(), None);
    let now = Utc::now();
    let t0 = chrono::DateTime::from_timestamp(now.timestamp() - 50, 0).unwrap();
    let at = |s: i64| (t0 + CDuration::seconds(s)).to_rfc3339();
    let doc = std::sync::Arc::new(std::sync::Mutex::new(json!({
        "instances": [{"customer":"cus_g","app":"web","instance_id":"i-95","instance_type":"t4g.nano","region":"fra","started_at": at(0)}],
        "volumes": [{"customer":"cus_g","app":"db","volume_id":"v-1","size_gb":"10","size_since": at(0)}]
    })));
    let inv_port = inventory_server(doc.clone()).await;
    let source = format!("[[sources]]\nkind = \"inventory\"\nname = \"inv\"\nurl = \"http://127.0.0.1:{inv_port}/v1/inventory\"\ninterval_secs = 1\nwindow_secs = 10\n");
    let (cfg, port) = env.collector_config(&source, 5000);
    let mut collector = env.spawn_collector(&cfg, port);
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Volume resized to 25 GB at t0+60; the collector is killed and
    // restarted while the instance runs.
    doc.lock().unwrap()["volumes"][0] = json!({"customer":"cus_g","app":"db","volume_id":"v-1","size_gb":"25","size_since": at(60)});
    collector.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _collector = env.spawn_collector(&cfg, port);
    // The instance stops at t0+95, the volume is deleted at t0+80.
    {
        let mut d = doc.lock().unwrap();
        d["instances"][0]["stopped_at"] = json!(at(95));
        d["volumes"][0]["deleted_at"] = json!(at(80));
    }
    let wait = (t0 + CDuration::seconds(97) - Utc::now())
        .num_milliseconds()
        .max(0) as u64;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let want = BTreeMap::from([
        ("cus_g/web/compute".to_string(), Decimal::from(95)),
        (
            "cus_g/db/disk".to_string(),
            Decimal::from(10 * 60 + 25 * 20),
        ),
    ]);
    env.wait_totals(&want, Duration::from_secs(60)).await;
}

/// A router stand-in serving Prometheus counters that the test changes.
async fn metrics_server(text: std::sync::Arc<std::sync::Mutex<String>>) -> u16 {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let text = text.clone();
            async move { text.lock().unwrap().clone() }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_counters_are_scraped_across_a_reset() {
    let env = Env::new("prom");
    let _agg = env.spawn_aggregator(free_port(), None);
    let counters = |req: u64, bytes: u64| {
        format!(
            "# TYPE router_requests_total counter\nrouter_requests_total{{customer=\"cus_r\",app=\"web\",code=\"200\"}} {req}\n\
             # TYPE router_egress_bytes_total counter\nrouter_egress_bytes_total{{customer=\"cus_r\",app=\"web\"}} {bytes}\n"
        )
    };
    let text = std::sync::Arc::new(std::sync::Mutex::new(counters(1000, 50_000)));
    let port = metrics_server(text.clone()).await;
    let source = format!("[[sources]]\nkind = \"prometheus\"\nname = \"router\"\nurl = \"http://127.0.0.1:{port}/metrics\"\ninterval_secs = 1\n");
    let (cfg, cport) = env.collector_config(&source, 5000);
    let _collector = env.spawn_collector(&cfg, cport);
    let scrapes = format!("http://127.0.0.1:{cport}/metrics");
    // Wait for the baseline scrape, then grow, reset (router restart) and grow.
    let wait_polls = |n: f64| {
        let scrapes = scrapes.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let start = metric(&scrapes, "tally_collector_source_events_total").await;
            while metric(&scrapes, "tally_collector_source_events_total").await < start + n {
                assert!(
                    std::time::Instant::now() < deadline,
                    "scraper made no progress"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    tokio::time::sleep(Duration::from_millis(2500)).await; // baseline taken: 1000 / 50,000
    *text.lock().unwrap() = counters(1600, 80_000);
    wait_polls(2.0).await; // +600 requests, +30,000 bytes
    *text.lock().unwrap() = counters(250, 9_000); // reset: counts since restart
    wait_polls(2.0).await;
    *text.lock().unwrap() = counters(400, 10_000);
    wait_polls(2.0).await;
    let want = BTreeMap::from([
        (
            "cus_r/web/requests".to_string(),
            Decimal::from(600 + 250 + 150),
        ),
        (
            "cus_r/web/egress".to_string(),
            Decimal::from(30_000 + 9_000 + 1_000),
        ),
    ]);
    env.wait_totals(&want, Duration::from_secs(60)).await;
}

/// Every metric the pipeline's Grafana dashboard (`dashboards/pipeline.json`)
/// queries exists in a running collector's or aggregator's `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_pipeline_dashboard_uses_real_metric_names() {
    let env = Env::new("grafana");
    let (cfg, port) = env.collector_config("", 5000);
    let _collector = env.spawn_collector(&cfg, port);
    let metrics_port = free_port();
    let _agg = env.spawn_aggregator(metrics_port, None);
    let url = format!("http://127.0.0.1:{port}");
    // One good event, one rejected, one poison message on the topic.
    let good = ev("g-1", "tally.requests", json!({"app":"web","count":3}));
    let good: schemas::RawEvent = serde_json::from_value(good).unwrap();
    post_all(&url, &[good], 10).await;
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/events"))
        .bearer_auth(INGEST_KEY)
        .header("content-type", "application/cloudevents+json")
        .body(r#"{"specversion":"1.0"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .create()
        .unwrap();
    producer
        .send(
            FutureRecord::to(&env.topic)
                .key("cus_bad")
                .payload(&b"not json"[..]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let want = BTreeMap::from([("cus_bad/web/requests".to_string(), Decimal::from(3))]);
    env.wait_totals(&want, Duration::from_secs(60)).await;
    let agg_url = format!("http://127.0.0.1:{metrics_port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while metric(
        &format!("{agg_url}/metrics"),
        "tally_aggregator_events_dead_lettered_total",
    )
    .await
        < 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no dead letter counted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let http = reqwest::Client::new();
    let collector_text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Lag is reported every 2 s once partitions are assigned.
    let agg_text = loop {
        let t = http
            .get(format!("{agg_url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if t.contains("tally_aggregator_consumer_lag_messages{") {
            break t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no consumer lag reported"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let missing = dashboard_metrics_missing("pipeline.json", &[&collector_text, &agg_text]);
    assert!(
        missing.is_empty(),
        "dashboards/pipeline.json uses metrics no service exposes: {missing:?}"
    );
}
