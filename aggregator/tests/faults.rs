//! Fault injection: during one run the aggregator is SIGKILLed at random
//! moments (at least 5 times), the broker is restarted once, ClickHouse is
//! restarted once, and the collector is SIGKILLed while it holds spooled
//! events. Clients retry. At the end the totals equal the ground truth
//! exactly: nothing lost, nothing counted twice.
//!
//! This test runs its own tansu and ClickHouse (through ops/services.sh, on
//! ports of its own) so restarting them does not disturb other tests.

use testkit::pipeline as support;

use chrono::{Duration as CDuration, Utc};
use collector::sources::simulator::{ground_truth, Workload};
use rand::Rng;
use schemas::MeterCatalog;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::*;

struct Services {
    dir: PathBuf,
    kafka: u16,
    ch_http: u16,
    ch_tcp: u16,
    ch_inter: u16,
}

impl Services {
    fn ops(&self, action: &str, service: &str) {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ops/services.sh");
        let st = Command::new("bash")
            .arg(script)
            .args([action, service])
            .env("TALLY_SERVICES_DIR", &self.dir)
            .env("TALLY_KAFKA_PORT", self.kafka.to_string())
            .env("TALLY_CH_HTTP_PORT", self.ch_http.to_string())
            .env("TALLY_CH_TCP_PORT", self.ch_tcp.to_string())
            .env("TALLY_CH_INTERSERVER_PORT", self.ch_inter.to_string())
            .status()
            .unwrap();
        assert!(st.success(), "ops/services.sh {action} {service} failed");
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        self.ops("stop", "kafka");
        self.ops("stop", "clickhouse");
    }
}

/// tansu 0.6.0's group coordinator keeps SIGKILLed members (their
/// partitions are never reassigned) and can crash on their rejoin, so this
/// test assigns partitions statically; the offsets come from ClickHouse
/// either way. Group mode is covered by the other pipeline tests.
const STATIC: &[&str] = &["--assign", "all"];

fn pause(lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rand::rng().random_range(lo..hi))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_totals_through_kills_and_restarts() {
    // Require the shared services too, so a missing setup fails loudly.
    let _ = env("TALLY_KAFKA_BROKERS");
    let base = Env::new("faults");
    let svc = Services {
        dir: base.dir.join("services"),
        kafka: free_port(),
        ch_http: free_port(),
        ch_tcp: free_port(),
        ch_inter: free_port(),
    };
    svc.ops("start", "kafka");
    svc.ops("start", "clickhouse");
    let env = Env::with_services(
        "faults",
        format!("127.0.0.1:{}", svc.kafka),
        format!("http://127.0.0.1:{}", svc.ch_http),
    );

    let (cfg, port) = env.collector_config("", 1500);
    let url = format!("http://127.0.0.1:{port}");
    let mut collector = env.spawn_collector(&cfg, port);
    let mut agg = env.spawn_aggregator_with(free_port(), None, STATIC);

    let now = Utc::now().timestamp();
    let from = chrono::DateTime::from_timestamp(now - now % 3600 - 3 * 3600, 0).unwrap();
    let events = Workload {
        customers: 8,
        apps_per_customer: 3,
        seed: 99,
    }
    .events(from, from + CDuration::minutes(150), 60);
    let extra = Workload {
        customers: 2,
        apps_per_customer: 1,
        seed: 1234,
    }
    .events(from, from + CDuration::minutes(10), 60);
    let mut all = events.clone();
    all.extend(extra.iter().cloned());
    let truth = ground_truth(&all, &MeterCatalog::default_catalog());

    // The client: small batches, paced, retried until accepted.
    let done = Arc::new(AtomicBool::new(false));
    let client = {
        let (url, events, done) = (url.clone(), events.clone(), done.clone());
        tokio::spawn(async move {
            for chunk in events.chunks(60) {
                post_all(&url, chunk, 60).await;
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            done.store(true, Ordering::SeqCst);
        })
    };

    let mut kills = 0;
    let mut kill_agg = |agg: &mut Proc| {
        agg.kill9();
        kills += 1;
    };
    // Two aggregator kills at random moments.
    for _ in 0..2 {
        tokio::time::sleep(pause(700, 2500)).await;
        kill_agg(&mut agg);
        tokio::time::sleep(pause(200, 1000)).await;
        agg = env.spawn_aggregator_with(free_port(), None, STATIC);
    }
    // Broker restart.
    tokio::time::sleep(pause(500, 1500)).await;
    svc.ops("restart", "kafka");
    // The collector recovers by itself: whatever it spooled meanwhile drains.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while metric(&format!("{url}/metrics"), "tally_collector_spool_events").await > 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "spool did not drain after the broker came back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(pause(700, 2000)).await;
    kill_agg(&mut agg);
    agg = env.spawn_aggregator_with(free_port(), None, STATIC);
    // ClickHouse restart (the aggregator keeps retrying its writes).
    tokio::time::sleep(pause(500, 1500)).await;
    svc.ops("restart", "clickhouse");
    // Collector killed while it holds spooled events: stop the broker,
    // post a batch (accepted into the spool), SIGKILL the collector, bring
    // the broker back, restart the collector on the same spool.
    tokio::time::sleep(pause(500, 1500)).await;
    svc.ops("stop", "kafka");
    post_all(&url, &extra, 100).await;
    let spooled = metric(&format!("{url}/metrics"), "tally_collector_spool_events").await;
    assert!(
        spooled > 0.0,
        "the collector should hold spooled events while the broker is down"
    );
    collector.kill9();
    svc.ops("start", "kafka");
    collector = env.spawn_collector(&cfg, port);
    // More aggregator kills.
    for _ in 0..3 {
        tokio::time::sleep(pause(700, 2500)).await;
        kill_agg(&mut agg);
        tokio::time::sleep(pause(200, 1000)).await;
        agg = env.spawn_aggregator_with(free_port(), None, STATIC);
    }
    assert!(kills >= 5);
    client.await.unwrap();
    assert!(done.load(Ordering::SeqCst));
    env.wait_totals(&truth, Duration::from_secs(240)).await;
    let rows = env.raw_count().await;
    assert_eq!(rows, all.len() as u64, "one raw row per distinct event");
    drop(collector);
    drop(agg);
}
