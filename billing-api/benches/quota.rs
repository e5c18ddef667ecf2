//! Quota check latency and throughput under `wrk` on loopback: the real
//! `/v1/quota/check` route (authentication, JSON, decision with a rating of
//! the projected month, metrics) against a trivial axum handler measured in
//! the same run as the baseline. 100,000 customers on pay-as-you-go
//! (`TALLY_BENCH_QUOTA_CUSTOMERS`), each with 20 usage series (10 apps ×
//! compute and requests) over the last 24 hours; every request asks for one
//! more instance for a customer picked at random. Server-side latency
//! comes from the service's own histogram; the state's memory is the
//! process's resident set before and after the state is read, per
//! customer. Writes bench-results/quota.json.
//!
//! Needs TALLY_DATABASE_URL and TALLY_CLICKHOUSE_URL (ops/bench.sh) and
//! `wrk` (Debian package).

use testkit::billing as support;

use aggregator::DynUsageStore;
use axum::routing::post;
use billing_api::api::{router, ApiState};
use billing_api::auth::Authenticator;
use billing_api::invoice::month_of;
use billing_api::metrics::Metrics;
use billing_api::quota_service::QuotaService;
use chrono::{Duration, DurationRound, Utc};
use rust_decimal::Decimal;
use schemas::MeterCatalog;
use sha2::{Digest, Sha256};
use std::process::Command;
use std::sync::Arc;
use support::clickhouse_exec as ch;

const SERIES: i64 = 20;
const HOURS: i64 = 24;

fn customers() -> i64 {
    std::env::var("TALLY_BENCH_QUOTA_CUSTOMERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}
const KEY: &str = "bench-admin-key";

/// Runs wrk against `url`; returns (requests/s, p50 ms, p99 ms).
fn wrk(url: &str, script: &str) -> (f64, f64, f64) {
    let out = Command::new("wrk")
        .args(["-t2", "-c32", "-d10s", "--latency", "-s", script, url])
        .output()
        .expect("wrk is installed (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{text}");
    let ms = |label: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label} in wrk output"));
        let v = line.split_whitespace().nth(1).unwrap();
        let (num, unit) = v.split_at(v.find(|c: char| c.is_alphabetic()).unwrap());
        let n: f64 = num.parse().unwrap();
        match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => panic!("unit {unit}"),
        }
    };
    let rps: f64 = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    assert!(!text.contains("Non-2xx"), "errors in the run:\n{text}");
    (rps, ms("50%"), ms("99%"))
}

/// Counts the bytes the process holds allocated, so the state's own size
/// is measured apart from what the allocator keeps after the read.
struct Counting;

static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Counting is on only while the state is read: a shared counter on every
/// allocation would slow the checks measured after (by a third here).
static COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

fn count(add: usize, sub: usize) {
    if COUNTING.load(std::sync::atomic::Ordering::Relaxed) {
        LIVE.fetch_add(add, std::sync::atomic::Ordering::Relaxed);
        LIVE.fetch_sub(sub, std::sync::atomic::Ordering::Relaxed);
    }
}

unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        count(l.size(), 0);
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        count(0, l.size());
        unsafe { std::alloc::System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, n: usize) -> *mut u8 {
        count(n, l.size());
        unsafe { std::alloc::System.realloc(p, l, n) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> usize {
    LIVE.load(std::sync::atomic::Ordering::Relaxed)
}

/// A memory figure of this process from /proc (KiB).
fn vm_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

#[tokio::main]
async fn main() {
    let now = Utc::now();
    let period = month_of(now);
    let as_of = now.duration_trunc(Duration::hours(1)).unwrap();

    // Usage: in each of 10 apps every customer ran 2 t4g.small and served
    // requests every hour of the last day.
    let customers = customers();
    let (ch_url, tag, store) = support::clickhouse("bench_quota").await;
    let hours = HOURS.min(((as_of - period.start).num_hours()).max(1));
    let first = as_of - Duration::hours(hours);
    ch(&ch_url, &format!(
        "INSERT INTO {tag}.usage_rollups_hourly \
         SELECT concat('q', toString(1000000 + intDiv(number, {SERIES} * {hours}))) AS customer, \
                if(number % 2 = 0, 'compute', 'requests') AS meter, \
                toDateTime({start} + (intDiv(number, {SERIES}) % {hours}) * 3600) AS hour, \
                concat('a', toString(intDiv(number % {SERIES}, 2))), \
                if(number % 2 = 0, '{{\"instance_type\":\"t4g.small\",\"region\":\"fra\"}}', '{{}}'), 60, \
                toDecimal128(if(number % 2 = 0, 7200, 250000), 12), toDecimal128(0, 12), hour, toDecimal128(0, 12), 0, 1 \
         FROM system.numbers LIMIT {rows}",
        start = first.timestamp(),
        rows = customers * SERIES * hours,
    ))
    .await;

    let (_url, st, pool) = support::pg("bench_quota").await;
    support::default_catalog(st.as_ref()).await;
    support::bulk_customers(&pool, "q", customers, "payg", period.start).await;
    sqlx::query("UPDATE customers SET spending_cap = 1000")
        .execute(&pool)
        .await
        .unwrap();
    let meters = Arc::new(MeterCatalog::default_catalog());
    let quota = Arc::new(QuotaService::new(
        st.clone(),
        DynUsageStore::from_arc(store.clone()),
        meters.clone(),
    ));
    let rss_before = vm_kib("VmRSS:");
    let live_before = live();
    let t = std::time::Instant::now();
    let n = quota.refresh(now).await.unwrap();
    let refresh_secs = t.elapsed().as_secs_f64();
    let rss_after = vm_kib("VmRSS:");
    let peak = vm_kib("VmHWM:");
    let state_bytes = live().saturating_sub(live_before);
    COUNTING.store(false, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(n as i64, customers);
    // The state holds usage as the plan prices it (compute by instance
    // type, requests whole: 2 items for the 20 series) and the gauges of
    // what runs per app.
    let e = quota.entry("q1000000").unwrap();
    assert_eq!(e.usage_to_date.len(), 2, "{:?}", e.usage_to_date);
    assert_eq!(
        e.running.instances.len() as i64,
        SERIES / 2,
        "{:?}",
        e.running
    );
    let metrics = Metrics::new();
    let app = Arc::new(ApiState {
        state: st.clone(),
        usage: DynUsageStore::from_arc(store.clone()),
        meters,
        metrics: metrics.clone(),
        auth: Arc::new(Authenticator::new(
            vec![Sha256::digest(KEY.as_bytes()).into()],
            b"bench".to_vec(),
        )),
        webhook_secret: None,
        min_charge: Decimal::new(50, 2),
        grace: std::time::Duration::from_secs(3600),
        quota,
    });
    let real = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let real_addr = real.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(real, router(app)).await.unwrap() });
    let trivial = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trivial_addr = trivial.local_addr().unwrap();
    let trivial_app = axum::Router::new().route(
        "/v1/quota/check",
        post(|body: String| async move {
            axum::Json(serde_json::json!({"allow": true, "len": body.len()}))
        }),
    );
    tokio::spawn(async move { axum::serve(trivial, trivial_app).await.unwrap() });

    let script = std::env::temp_dir().join(format!("{tag}.lua"));
    std::fs::write(
        &script,
        format!(
            r#"wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {KEY}"
request = function()
  local c = math.random(0, {max})
  return wrk.format(nil, nil, nil, '{{"customer_id":"q' .. (1000000 + c) .. '","ask":{{"kind":"start_instances","app":"web","instance_type":"t4g.small","count":1}}}}')
end
"#,
            max = customers - 1
        ),
    )
    .unwrap();
    let script = script.to_str().unwrap().to_owned();
    // Warm up, then measure: baseline first, then the real route.
    let _ = wrk(&format!("http://{real_addr}/v1/quota/check"), &script);
    let base = tokio::task::spawn_blocking({
        let s = script.clone();
        move || wrk(&format!("http://{trivial_addr}/v1/quota/check"), &s)
    })
    .await
    .unwrap();
    let before = metrics.quota_check_duration.get_sample_count();
    let got = tokio::task::spawn_blocking({
        let s = script.clone();
        move || wrk(&format!("http://{real_addr}/v1/quota/check"), &s)
    })
    .await
    .unwrap();
    assert!(metrics.quota_check_duration.get_sample_count() > before);
    // Server-side p99 from the service's histogram (bucket upper bound).
    let h = metrics.quota_check_duration.clone();
    let m = prometheus::core::Collector::collect(&h);
    let hist = m[0].get_metric()[0].get_histogram();
    let total = hist.get_sample_count() as f64;
    let p = |q: f64| {
        hist.get_bucket()
            .iter()
            .find(|b| b.cumulative_count() as f64 >= q * total)
            .map_or(f64::INFINITY, |b| b.upper_bound() * 1000.0)
    };
    let out = serde_json::json!({
        "customers": customers, "series_per_customer": SERIES, "hours": hours, "wrk": "-t2 -c32 -d10s",
        "quota": {"requests_per_sec": got.0, "p50_ms": got.1, "p99_ms": got.2},
        "baseline_trivial_axum": {"requests_per_sec": base.0, "p50_ms": base.1, "p99_ms": base.2},
        "ratio_throughput": got.0 / base.0,
        "server_side_p50_ms_at_most": p(0.5), "server_side_p99_ms_at_most": p(0.99), "server_side_p999_ms_at_most": p(0.999),
        "state_read_seconds": refresh_secs,
        "rss_kib_before_read": rss_before, "rss_kib_after_read": rss_after, "peak_rss_kib": peak,
        "rss_bytes_per_customer": (rss_after.saturating_sub(rss_before) as f64 * 1024.0 / customers as f64).round(),
        "state_heap_bytes_per_customer": (state_bytes as f64 / customers as f64).round(),
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench-results");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        format!("{dir}/quota.json"),
        serde_json::to_string_pretty(&out).unwrap(),
    )
    .unwrap();
    ch(&ch_url, &format!("DROP DATABASE {tag}")).await;
}
