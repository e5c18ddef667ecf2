//! Usage in quota decisions seconds after it is acknowledged, in both
//! modes, with the quota state's full re-read an hour apart
//! (`System::following`): only the usage deltas the state follows can
//! bring the usage in. Each wait is on the state's own progress marker
//! (the customer's usage version against the store's, read from the store
//! itself), never a fixed sleep; the time it took is printed, and the
//! bound is measured in BENCHMARKS.md, not asserted here.

use testkit::system as support;

use chrono::{Duration, Utc};
use reqwest::Method as M;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use std::str::FromStr;
use std::time::Duration as StdDuration;
use support::{requests, Mode, System};

const WAIT: StdDuration = StdDuration::from_secs(60);

fn dec(v: &Value) -> Decimal {
    Decimal::from_str(v.as_str().unwrap_or_else(|| panic!("not a decimal: {v}"))).unwrap()
}

async fn check_at(sys: &System, billing: &str, customer: &str) -> Value {
    let (s, q) = sys
        .api_at(
            billing,
            M::POST,
            "/v1/quota/check",
            Some(json!({"customer_id": customer, "ask": {"kind": "start_instances", "app": "web", "instance_type": "t4g.small", "count": 1}})),
        )
        .await;
    assert_eq!(s, 200, "{q}");
    q
}

/// Sets the customer's spending cap (through the API: the entry is read
/// again).
async fn set_cap(sys: &System, customer: &str, cap: &str) {
    let (s, v) = sys
        .api(
            M::PUT,
            &format!("/v1/customers/{customer}/spending-cap"),
            Some(json!({"spending_cap": cap})),
        )
        .await;
    assert_eq!(s, 204, "{v}");
}

/// Sends `events`, then waits until the quota state at `billing` holds
/// them; returns the decision after.
async fn send_and_follow(sys: &System, billing: &str, customer: &str, events: &[Value]) -> Value {
    let before = sys.store_version(customer).await;
    let (s, r) = sys.ingest(events).await;
    assert_eq!(s, 200, "{r}");
    let acked = std::time::Instant::now();
    let v = stored_after(sys, customer, before).await;
    let took = sys.await_quota_state(billing, customer, v, WAIT).await;
    println!(
        "{customer}: store version {v} in the quota state {took:?} after the store had it, {:?} after the 2xx",
        acked.elapsed()
    );
    check_at(sys, billing, customer).await
}

/// The customer's store version once it is past `before` (the distributed
/// collector's 2xx means Kafka holds the events; the aggregator writes them
/// after).
async fn stored_after(sys: &System, customer: &str, before: u64) -> u64 {
    let start = std::time::Instant::now();
    loop {
        let v = sys.store_version(customer).await;
        if v > before {
            return v;
        }
        assert!(start.elapsed() < WAIT, "the store never took the events");
        tokio::time::sleep(StdDuration::from_millis(10)).await;
    }
}

async fn usage_reaches_quota_from_the_write_path(mode: Mode) {
    let mut sys = System::following(mode, &format!("live_usage_{mode:?}").to_lowercase()).await;
    let billing = sys.billing.clone();
    let now = Utc::now();
    let start = billing_api::invoice::month_of(now).start;
    sys.customer("cus_live", "payg", start).await;
    set_cap(&sys, "cus_live", "100").await;

    // Nothing used yet: a small instance fits under the cap.
    let q = check_at(&sys, &billing, "cus_live").await;
    assert_eq!(q["allow"], true, "{q}");
    assert_eq!(dec(&q["month_to_date"]), Decimal::ZERO, "{q}");

    // $400 of requests ($0.40 per million): the cap stops the scale-up as
    // soon as the state holds them.
    let t = now - Duration::minutes(2);
    let q = send_and_follow(
        &sys,
        &billing,
        "cus_live",
        &[requests("live-1", "cus_live", "web", t, 1_000_000_000)],
    )
    .await;
    assert_eq!(q["allow"], false, "{q}");
    assert_eq!(q["reason"], "spending_cap", "{q}");
    assert_eq!(dec(&q["month_to_date"]), Decimal::from(400), "{q}");

    // A re-sent event is dropped by the store's dedup, and so in the
    // state; a new one in the same batch is counted once.
    let q = send_and_follow(
        &sys,
        &billing,
        "cus_live",
        &[
            requests("live-1", "cus_live", "web", t, 1_000_000_000),
            requests("live-2", "cus_live", "api", t, 1_000_000),
        ],
    )
    .await;
    let live = dec(&q["month_to_date"]);
    assert_eq!(live, Decimal::from_str("400.40").unwrap(), "{q}");

    // Usage of the previous month does not touch this month's entry.
    let q = send_and_follow(
        &sys,
        &billing,
        "cus_live",
        &[requests(
            "live-old",
            "cus_live",
            "web",
            start - Duration::minutes(5),
            5_000_000,
        )],
    )
    .await;
    assert_eq!(dec(&q["month_to_date"]), live, "{q}");

    // The followed state equals a fresh read of the store: a cap change
    // re-reads the customer.
    set_cap(&sys, "cus_live", "100").await;
    let q = check_at(&sys, &billing, "cus_live").await;
    assert_eq!(dec(&q["month_to_date"]), live, "{q}");

    if mode == Mode::Distributed {
        // A second replica reads the store on start and follows from
        // there; both agree with the store after more usage.
        let other = sys.billing_replica();
        let q = check_at(&sys, &other, "cus_live").await;
        assert_eq!(dec(&q["month_to_date"]), live, "{q}");
        let more = [requests("live-3", "cus_live", "web", now, 2_000_000)];
        let before = sys.store_version("cus_live").await;
        let (s, r) = sys.ingest(&more).await;
        assert_eq!(s, 200, "{r}");
        let v = stored_after(&sys, "cus_live", before).await;
        let expected = live + Decimal::from_str("0.80").unwrap();
        for b in [&billing, &other] {
            sys.await_quota_state(b, "cus_live", v, WAIT).await;
            let q = check_at(&sys, b, "cus_live").await;
            assert_eq!(dec(&q["month_to_date"]), expected, "{b}: {q}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reaches_quota_from_the_write_path_embedded() {
    usage_reaches_quota_from_the_write_path(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reaches_quota_from_the_write_path_distributed() {
    usage_reaches_quota_from_the_write_path(Mode::Distributed).await;
}

/// The aggregator aborted after writing a batch and before publishing its
/// delta: the replica learns of the missed delta from the partition's head
/// when the next aggregator loads the partition, re-reads the store, and
/// holds exactly the store's usage. Then a replica killed and started
/// again reads the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_lost_in_an_aggregator_crash_is_recovered() {
    let mut sys = System::following(Mode::Distributed, "live_usage_lost_delta").await;
    let billing = sys.billing.clone();
    let now = Utc::now();
    let start = billing_api::invoice::month_of(now).start;
    sys.customer("cus_lost", "payg", start).await;
    let t = now - Duration::minutes(1);
    let q = send_and_follow(
        &sys,
        &billing,
        "cus_lost",
        &[requests("lost-1", "cus_lost", "web", t, 10_000_000)],
    )
    .await;
    assert_eq!(dec(&q["month_to_date"]), Decimal::from(4), "{q}");

    // The next aggregator writes one batch and aborts before its delta.
    sys.kill9_named("aggregator");
    let env = sys.env.as_ref().unwrap();
    let mut crashing = env.spawn_aggregator_with(
        testkit::pipeline::free_port(),
        None,
        &["--fault-abort-before-delta", "1"],
    );
    let before = sys.store_version("cus_lost").await;
    let (s, r) = sys
        .ingest(&[requests("lost-2", "cus_lost", "web", t, 20_000_000)])
        .await;
    assert_eq!(s, 200, "{r}");
    let v = stored_after(&sys, "cus_lost", before).await;
    let status = crashing.child.wait().unwrap();
    assert!(!status.success(), "the aggregator aborted: {status}");
    // The state still stands where it was: the delta never came.
    let (_, p) = sys
        .api(M::GET, "/v1/quota/state?customer=cus_lost", None)
        .await;
    assert!(
        p["customer"]["usage_version"].as_u64().unwrap() < v,
        "no delta was published: {p}"
    );

    // A new aggregator loads the partition, publishes its head: the
    // replica re-reads and holds the batch.
    let env = sys.env.as_ref().unwrap();
    let _agg = env.spawn_aggregator(testkit::pipeline::free_port(), None);
    let took = sys.await_quota_state(&billing, "cus_lost", v, WAIT).await;
    println!("re-read after the head: {took:?}");
    let q = check_at(&sys, &billing, "cus_lost").await;
    assert_eq!(dec(&q["month_to_date"]), Decimal::from(12), "{q}");
    let (_, p) = sys.api(M::GET, "/v1/quota/state", None).await;
    assert!(p["full_rereads"].as_u64().unwrap() >= 2, "{p}");

    // A replica killed and started again reads the store's figure.
    sys.kill9_named("billing-api");
    let other = sys.billing_replica();
    let q = check_at(&sys, &other, "cus_lost").await;
    assert_eq!(dec(&q["month_to_date"]), Decimal::from(12), "{q}");
}
