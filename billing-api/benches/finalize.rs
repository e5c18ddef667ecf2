//! Finalization run benchmark: N customers (default 10,000) × 20 usage
//! series each (7 instance types × 2 regions, 3 volumes, requests of 2
//! apps, egress), one rollup row per series per hour for a whole month,
//! in ClickHouse; from ClickHouse to finalized invoices in PostgreSQL
//! (Stripe excluded). Baseline in the same run: the raw work underneath,
//! i.e. a ClickHouse scan aggregating the same rollups per customer and
//! series in the same chunks, plus one bulk insert of N invoice rows into
//! PostgreSQL.
//!
//! A second run in the same process finalizes the same usage for a mixed
//! customer base (one in ten on billing anchor day 15, one in ten on a plan
//! billing a $20 fee in advance, the rest calendar months in arrears), in
//! a database of its own, and is reported next to the calendar run. A
//! third run finalizes it once more with every customer holding a $5
//! credit grant, a 10 % coupon and a 20 % VAT profile (settlement and the
//! consumption writes), also next to the calendar run.
//!
//! `TALLY_BENCH_CUSTOMERS` sets N. Needs TALLY_DATABASE_URL and
//! TALLY_CLICKHOUSE_URL (ops/bench.sh sets them). Writes
//! bench-results/finalize.json.

use testkit::billing as support;

use billing_api::finalize::{FinalizeConfig, Finalizer};
use billing_api::invoice::month_of;
use billing_api::metrics::Metrics;
use billing_api::state::StateStore;
use chrono::{Duration, Utc};
use schemas::MeterCatalog;
use std::sync::Arc;
use std::time::Instant;
use support::clickhouse_exec as ch;

fn peak_rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map_or(0.0, |k| k / 1024.0)
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let n: i64 = std::env::var("TALLY_BENCH_CUSTOMERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);

    // Last month: a whole month of hourly rollups.
    let period = month_of(month_of(Utc::now()).start - Duration::seconds(1));
    let hours = (period.end - period.start).num_hours();
    let series = 20;

    let (ch_url, tag, store) = support::clickhouse("bench_fin").await;
    let t = Instant::now();
    let types =
        "['t4g.nano','t4g.micro','t4g.small','t4g.medium','c6g.large','c6g.xlarge','c6g.2xlarge']";
    ch(&ch_url, &format!(
        "INSERT INTO {tag}.usage_rollups_hourly \
         SELECT customer, meter, hour, app, dims, 60, q, q, hour, q, 0, 1 FROM ( \
           SELECT concat('c', toString(1000000 + intDiv(number, {series} * {hours}))) AS customer, \
                  intDiv(number, {hours}) % {series} AS s, \
                  toDateTime({start} + (number % {hours}) * 3600) AS hour, \
                  multiIf(s < 14, 'compute', s < 17, 'disk', s < 19, 'requests', 'egress') AS meter, \
                  if(s = 18, 'api', 'web') AS app, \
                  multiIf(s < 14, concat('{{\"instance_type\":\"', arrayElement({types}, (s % 7) + 1), '\",\"region\":\"', if(s < 7, 'fra', 'iad'), '\"}}'), \
                          s < 17, concat('{{\"volume_id\":\"vol-', toString(s), '\"}}'), '{{}}') AS dims, \
                  toDecimal128(multiIf(s < 14, 3600, s < 17, 36000, s < 19, 250000 + (number % 997), 120000000), 12) AS q \
           FROM system.numbers LIMIT {rows})",
        start = period.start.timestamp(),
        rows = n * series * hours,
    ))
    .await;
    let load_secs = t.elapsed().as_secs_f64();
    ch(
        &ch_url,
        &format!("OPTIMIZE TABLE {tag}.usage_rollups_hourly FINAL"),
    )
    .await;
    let rows: u64 = ch(
        &ch_url,
        &format!("SELECT count() FROM {tag}.usage_rollups_hourly"),
    )
    .await
    .trim()
    .parse()
    .unwrap();
    println!("loaded {rows} rollup rows in {load_secs:.1} s");

    // PostgreSQL: customers on the pay-as-you-go plan from the period start.
    let (_url, st, pool) = support::pg("bench_fin").await;
    support::default_catalog(st.as_ref()).await;
    support::bulk_customers(&pool, "c", n, "payg", period.start).await;
    let meters = Arc::new(MeterCatalog::default_catalog());

    // Baseline: the raw scan and the raw insert. The scan reads the same
    // rows the same way the finalizer does (FINAL, in chunks of 2,500
    // customers, two at a time) but only sums events and quantities.
    let t = Instant::now();
    let chunk = billing_api::usage::PeriodUsage::CHUNK as i64;
    let mut groups = 0u64;
    let ranges: Vec<(i64, i64)> = (0..n)
        .step_by(chunk as usize)
        .map(|lo| (1_000_000 + lo, 1_000_000 + (lo + chunk).min(n) - 1))
        .collect();
    for pair in ranges.chunks(2) {
        let reads = pair.iter().map(|(lo, hi)| {
            let sql = format!(
                "SELECT count() FROM (SELECT customer, meter, app, dims, sum(events), sum(quantity_sum) \
                 FROM {tag}.usage_rollups_hourly FINAL WHERE customer >= 'c{lo}' AND customer <= 'c{hi}' \
                 AND hour >= toDateTime({s}) AND hour < toDateTime({e}) GROUP BY customer, meter, app, dims)",
                s = period.start.timestamp(),
                e = period.end.timestamp()
            );
            let url = ch_url.clone();
            async move { ch(&url, &sql).await }
        });
        for r in futures::future::join_all(reads).await {
            groups += r.trim().parse::<u64>().unwrap();
        }
    }
    let scan_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    sqlx::query("CREATE TABLE raw_invoices (id TEXT PRIMARY KEY, customer_id TEXT, total NUMERIC, body JSONB)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO raw_invoices SELECT 'r' || i, 'c' || i, i * 0.01, \
         jsonb_build_object('lines', jsonb_build_array(jsonb_build_object('amount', i))) FROM generate_series(1, $1) i",
    )
    .bind(n)
    .execute(&pool)
    .await
    .unwrap();
    let insert_secs = t.elapsed().as_secs_f64();
    let baseline = scan_secs + insert_secs;

    // The finalization run.
    let f = Finalizer {
        state: st.clone(),
        usage: aggregator::DynUsageStore::from_arc(store),
        meters,
        config: FinalizeConfig::default(),
        metrics: Metrics::new(),
    };
    let rss_before = peak_rss_mib();
    let t = Instant::now();
    let r = f.run_once(period.end + Duration::hours(2)).await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(r.finalized as i64, n);
    let lines: i64 =
        sqlx::query_scalar("SELECT sum(jsonb_array_length(body->'lines'))::bigint FROM invoices")
            .fetch_one(&pool)
            .await
            .unwrap();

    // The mixed run: the same usage, 1 in 10 customers on anchor day 15
    // (their period that closed: mid-month to mid-month) and 1 in 10
    // billing a $20 fee in advance (an opening invoice and the period's).
    let (_url, mst, mpool) = support::pg("bench_fin_mix").await;
    support::default_catalog(mst.as_ref()).await;
    let mut adv: billing_api::catalog::PlanVersion = mst.plan_version("payg", 1).await.unwrap();
    adv.plan = "payg_adv".into();
    adv.flat_fee = rust_decimal::Decimal::from(20);
    adv.fee_timing = billing_api::catalog::FeeTiming::InAdvance;
    mst.publish_plan(&adv, "bench").await.unwrap();
    support::bulk_customers(&mpool, "c", n, "payg", period.start).await;
    let every = |rem: i64| format!("(substr(customer_id, 2)::bigint - 1000000) % 10 = {rem}");
    // Anchored customers subscribed from their period's start (Oct 15):
    // the steady state, each period one whole segment. (A first period
    // begun mid-way is rated from per-customer usage reads instead: see
    // BENCHMARKS.md.)
    let anchored_from = billing_api::invoice::period_of(period.start, 15).start;
    sqlx::query(&format!(
        "UPDATE subscriptions SET anchor_day = 15, starts_at = $1 WHERE {}",
        every(1)
    ))
    .bind(anchored_from)
    .execute(&mpool)
    .await
    .unwrap();
    sqlx::query(&format!(
        "UPDATE subscriptions SET plan = 'payg_adv' WHERE {}",
        every(2)
    ))
    .execute(&mpool)
    .await
    .unwrap();
    let mf = Finalizer {
        state: mst.clone(),
        usage: f.usage.clone(),
        meters: f.meters.clone(),
        config: FinalizeConfig::default(),
        metrics: Metrics::new(),
    };
    let t = Instant::now();
    let mr = mf.run_once(period.end + Duration::hours(2)).await.unwrap();
    let mixed_secs = t.elapsed().as_secs_f64();
    let in_advance = (0..n).filter(|i| i % 10 == 2).count() as i64;
    assert_eq!(mr.finalized as i64, n + in_advance);
    // The settled run: the same usage on the calendar, every customer with
    // a $5 grant, a 10 % coupon applied and a 20 % VAT profile (the
    // settlement step and the consumption writes), beside the plain run.
    let (_url, sst, spool) = support::pg("bench_fin_settle").await;
    support::default_catalog(sst.as_ref()).await;
    support::bulk_customers(&spool, "c", n, "payg", period.start).await;
    sst.publish_coupon(
        &serde_json::from_value(serde_json::json!({"id": "ten", "name": "Ten",
            "percent_off": "10", "duration": "forever"}))
        .unwrap(),
        "bench",
    )
    .await
    .unwrap();
    sst.create_tax_rate(
        &serde_json::from_value(serde_json::json!({"id": "vat", "name": "VAT",
            "country": "FR", "percentage": "20"}))
        .unwrap(),
        "bench",
    )
    .await
    .unwrap();
    for sql in [
        "INSERT INTO credit_grants (id, customer_id, kind, currency, amount, remaining, effective_at, \
         expires_at, priority, reason, usable, invoice_id, idempotency_key, request_sha256, created_at) \
         SELECT 'g' || id, id, 'promotional', 'USD', 5, 5, $1, NULL, 10, 'bench', true, NULL, NULL, '', $1 \
         FROM customers",
        "INSERT INTO credit_ledger (grant_id, customer_id, kind, amount, currency, at, invoice_id, recorded_at) \
         SELECT id, customer_id, 'grant', amount, currency, effective_at, NULL, created_at FROM credit_grants",
        "INSERT INTO customer_coupons (id, customer_id, coupon_id, coupon_version, applied_at, removed_at, \
         ends_at, created_at) SELECT 'a' || id, id, 'ten', 1, $1, NULL, NULL, $1 FROM customers",
        "INSERT INTO tax_profiles (customer_id, body, updated_at) \
         SELECT id, '{\"country\": \"FR\"}'::jsonb, $1 FROM customers",
    ] {
        sqlx::query(sql)
            .bind(period.start)
            .execute(&spool)
            .await
            .unwrap();
    }
    let sf = Finalizer {
        state: sst.clone(),
        usage: f.usage.clone(),
        meters: f.meters.clone(),
        config: FinalizeConfig::default(),
        metrics: Metrics::new(),
    };
    let t = Instant::now();
    let sr = sf.run_once(period.end + Duration::hours(2)).await.unwrap();
    let settled_secs = t.elapsed().as_secs_f64();
    assert_eq!(sr.finalized as i64, n);
    let consumed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM credit_ledger WHERE kind = 'consumption'")
            .fetch_one(&spool)
            .await
            .unwrap();
    assert_eq!(consumed, n, "one consumption per customer");
    let out = serde_json::json!({
        "customers": n, "series_per_customer": series, "hours": hours, "rollup_rows": rows,
        "groups": groups, "invoice_lines": lines,
        "finalize_seconds": secs, "invoices_per_second": n as f64 / secs,
        "baseline_scan_seconds": scan_secs, "baseline_insert_seconds": insert_secs,
        "ratio_to_baseline": baseline / secs,
        "peak_rss_mib": peak_rss_mib(), "peak_rss_before_run_mib": rss_before,
        "mixed": {
            "anchor_15_customers": (0..n).filter(|i| i % 10 == 1).count(),
            "in_advance_customers": in_advance,
            "invoices": mr.finalized, "periods_walked": mr.periods,
            "finalize_seconds": mixed_secs,
            "ratio_to_calendar_run": secs / mixed_secs,
        },
        "settled": {
            "grants": n, "coupons": n, "tax_profiles": n, "consumptions": consumed,
            "finalize_seconds": settled_secs,
            "ratio_to_calendar_run": secs / settled_secs,
        },
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench-results");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        format!("{dir}/finalize.json"),
        serde_json::to_string_pretty(&out).unwrap(),
    )
    .unwrap();
    // Leave nothing big behind.
    ch(&ch_url, &format!("DROP DATABASE {tag}")).await;
}
