//! Acknowledged-to-quota staleness, both modes, under load.
//!
//! A running Tally (the release `tally`, or collector → tansu → aggregator
//! → ClickHouse → billing-api) with its quota state re-read only hourly
//! (`System::following`): usage reaches quota decisions only through the
//! deltas the state follows. A loader sends events of 200 customers at a
//! fixed rate (2,000 and 20,000 events/s, batches of 100 over 4
//! connections) while a probe customer sends one event every 100 ms; for
//! each probe, from its 2xx:
//!
//! - **store**: until the usage store holds it (the customer's rollup
//!   version moves, read from the store itself): the baseline, as fresh
//!   as anything reading the store can be;
//! - **quota**: until the quota state holds it (`GET /v1/quota/state`
//!   shows the customer's usage version at least the store's).
//!
//! Prints p50/p99 of both and the rate reached; writes
//! `bench-results/staleness.json`. Run with `ops/bench.sh` (release
//! binaries of `tally`, `collector`, `aggregator`, `billing-api`).

use testkit::system as support;

use chrono::{Duration as CDuration, Utc};
use reqwest::Method as M;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{requests, Mode, System};

const LOAD_CUSTOMERS: usize = 200;
const PROBES: usize = 150;
const BATCH: usize = 100;
const CONNECTIONS: usize = 4;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

async fn usage_version(sys: &System, customer: &str) -> (u64, usize) {
    let (s, p) = sys
        .api(
            M::GET,
            &format!("/v1/quota/state?customer={customer}"),
            None,
        )
        .await;
    assert_eq!(s, 200, "{p}");
    (
        p["customer"]["usage_version"].as_u64().unwrap_or(0),
        p["pending_rereads"].as_u64().unwrap_or(0) as usize,
    )
}

/// Runs the loader at `rate` events/s and the probes; returns the figures.
async fn measure(sys: Arc<System>, rate: u64, tag: &str) -> Value {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut loaders = Vec::new();
    for c in 0..CONNECTIONS {
        let (sys, stop, sent) = (sys.clone(), stop.clone(), sent.clone());
        let tag = tag.to_owned();
        loaders.push(tokio::spawn(async move {
            // Each connection sends its share of the rate in batches.
            let per_conn = rate as f64 / CONNECTIONS as f64;
            let every = Duration::from_secs_f64(BATCH as f64 / per_conn);
            let mut next = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let now = Utc::now() - CDuration::seconds(5);
                let batch: Vec<Value> = (0..BATCH)
                    .map(|i| {
                        let k = n as usize * BATCH + i;
                        requests(
                            &format!("{tag}-{c}-{k}"),
                            &format!("cus_load_{}", k % LOAD_CUSTOMERS),
                            "web",
                            now,
                            1,
                        )
                    })
                    .collect();
                let (s, r) = sys.ingest(&batch).await;
                assert_eq!(s, 200, "{r}");
                sent.fetch_add(BATCH as u64, Ordering::Relaxed);
                n += 1;
                next += every;
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(d).await;
                }
            }
        }));
    }
    // Let the load settle before probing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (mut store, mut quota) = (Vec::new(), Vec::new());
    for i in 0..PROBES {
        let (before, _) = usage_version(&sys, "cus_probe").await;
        let t = Utc::now() - CDuration::seconds(1);
        let (s, r) = sys
            .ingest(&[requests(
                &format!("{tag}-probe-{i}"),
                "cus_probe",
                "web",
                t,
                1,
            )])
            .await;
        assert_eq!(s, 200, "{r}");
        let acked = Instant::now();
        let mut stored: Option<(u64, f64)> = None;
        let deadline = acked + Duration::from_secs(60);
        loop {
            if stored.is_none() {
                let v = sys.store_version("cus_probe").await;
                if v > before {
                    stored = Some((v, acked.elapsed().as_secs_f64() * 1000.0));
                }
            }
            let (at, _) = usage_version(&sys, "cus_probe").await;
            if let Some((v, ms)) = stored {
                if at >= v {
                    store.push(ms);
                    quota.push(acked.elapsed().as_secs_f64() * 1000.0);
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "probe {i} never reached the quota state"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.await.unwrap();
    }
    let achieved = sent.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    let out = json!({
        "target_events_per_sec": rate,
        "achieved_events_per_sec": achieved.round(),
        "probes": PROBES,
        "store_visible_ms": {"p50": pct(&mut store, 0.5), "p99": pct(&mut store, 0.99)},
        "quota_visible_ms": {"p50": pct(&mut quota, 0.5), "p99": pct(&mut quota, 0.99)},
    });
    println!("{tag} at {rate} events/s: {out}");
    out
}

async fn mode_run(mode: Mode) -> Value {
    let sys = System::following(mode, &format!("bench_staleness_{mode:?}").to_lowercase()).await;
    let start = billing_api::invoice::month_of(Utc::now()).start;
    sys.customer("cus_probe", "payg", start).await;
    for i in 0..LOAD_CUSTOMERS {
        sys.customer(&format!("cus_load_{i}"), "payg", start).await;
    }
    let sys = Arc::new(sys);
    let mut out = serde_json::Map::new();
    for rate in [2_000u64, 20_000] {
        let tag = format!("{mode:?}-{rate}").to_lowercase();
        out.insert(rate.to_string(), measure(sys.clone(), rate, &tag).await);
    }
    let (_, pending) = usage_version(&sys, "cus_probe").await;
    let (_, p) = sys.api(M::GET, "/v1/quota/state", None).await;
    println!("{mode:?} state after the run: {p} (pending {pending})");
    out.insert("state".into(), p);
    Value::Object(out)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let results = rt.block_on(async {
        json!({
            "embedded": mode_run(Mode::Embedded).await,
            "distributed": mode_run(Mode::Distributed).await,
        })
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench-results");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("staleness.json"),
        serde_json::to_string_pretty(&results).unwrap(),
    )
    .unwrap();
}
