//! A finalization run SIGKILLed at random moments and restarted: every
//! customer ends with exactly one invoice for the period, numbers run
//! 1..=N without gaps or repeats, and totals are right. One customer in
//! ten is on billing anchor day 15 (a walk of its own) and one in ten bills
//! a $20 fee in advance (an opening invoice too, written before the
//! period's): each of those invoices is written once as well. Half of the
//! customers have credit: every grant is consumed exactly once, never
//! below zero, and each customer consumes the lesser of its credit and
//! its invoices.

use testkit::billing as support;

use billing_api::invoice::{month_of, previous};
use billing_api::state::StateStore;
use chrono::{Duration, Utc};
use rand::Rng;
use rust_decimal::Decimal;
use std::process::{Command, Stdio};
use std::time::{Duration as StdDuration, Instant};
use support::*;

const CUSTOMERS: i64 = 2000;
/// One in ten customers bills its fee in advance: an opening invoice each.
const IN_ADVANCE: i64 = CUSTOMERS / 10;
const INVOICES: i64 = CUSTOMERS + IN_ADVANCE;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalization_killed_and_restarted_invoices_each_customer_once() {
    let (url, st, pool) = pg("fincrash").await;
    let (ch, db, usage) = clickhouse("fincrash").await;
    default_catalog(st.as_ref()).await;
    let q = previous(month_of(Utc::now()));
    // Customer i made i million requests: $0.40 × i.
    let ids = bulk_customers(&pool, "c", CUSTOMERS, "payg", q.start).await;
    let mut adv = st.plan_version("payg", 1).await.unwrap();
    adv.plan = "payg_adv".into();
    adv.flat_fee = Decimal::from(20);
    adv.fee_timing = billing_api::catalog::FeeTiming::InAdvance;
    st.publish_plan(&adv, "test").await.unwrap();
    for (set, rem) in [("anchor_day = 15", 1), ("plan = 'payg_adv'", 2)] {
        sqlx::query(&format!(
            "UPDATE subscriptions SET {set} WHERE (substr(customer_id, 2)::bigint - 1000000) % 10 = {rem}"
        ))
        .execute(&pool)
        .await
        .unwrap();
    }
    // Every other customer has $1.00 of promotional credit; every fourth
    // a second grant of $0.30 expiring after the period, consumed first.
    let mut grants = 0;
    for (i, c) in ids.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        for (amount, expires) in [("1.00", None), ("0.30", Some(q.end + Duration::days(40)))] {
            if expires.is_some() && i % 4 != 0 {
                continue;
            }
            st.grant_credit(
                &billing_api::state::NewGrant {
                    customer_id: c.clone(),
                    kind: billing_api::state::GrantKind::Promotional,
                    currency: "USD".into(),
                    amount: amount.parse().unwrap(),
                    effective_at: Some(q.start),
                    expires_at: expires,
                    priority: 10,
                    reason: "crash test".into(),
                    top_up: false,
                    idempotency_key: Some(format!("g-{c}-{amount}")),
                },
                "test",
            )
            .await
            .unwrap();
            grants += 1;
        }
    }
    let t = q.start + Duration::days(9);
    let events: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, c)| {
            (
                format!("e{i}"),
                c.as_str(),
                t,
                "tally.requests",
                requests("web", (i as i64 + 1) * 1_000_000),
            )
        })
        .collect();
    Writer::new(usage).write(&events).await;

    let exe = env!("CARGO_BIN_EXE_billing-api");
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM invoices")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    // Each run is killed a random 0–300 ms after it has written its first
    // invoice, so the kill lands among its batches however long a loaded
    // machine takes to start the process; after three such kills one run
    // goes on to the end.
    let (mut mid_run_kills, mut runs) = (0, 0);
    let mut rng = rand::rng();
    loop {
        runs += 1;
        assert!(runs < 50, "finalization never completed in {runs} runs");
        let before = count().await;
        let mut child = Command::new(exe)
            .args([
                "finalize",
                "--now",
                &(q.end + Duration::hours(2)).to_rfc3339(),
            ])
            .env("TALLY_DATABASE_URL", &url)
            .env("TALLY_CLICKHOUSE_URL", &ch)
            .env("TALLY_CLICKHOUSE_DATABASE", &db)
            .env("TALLY_FINALIZE_BATCH", "20")
            .env_remove("STRIPE_SECRET_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let last = mid_run_kills >= 3;
        let started = Instant::now();
        let mut kill_at: Option<Instant> = None;
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            assert!(
                started.elapsed() < StdDuration::from_secs(300),
                "a finalization run went on for 300 s"
            );
            match kill_at {
                Some(at) if Instant::now() >= at => break None,
                None if !last && count().await > before => {
                    kill_at =
                        Some(Instant::now() + StdDuration::from_millis(rng.random_range(0..300)));
                }
                _ => {}
            }
            tokio::time::sleep(StdDuration::from_millis(10)).await;
        };
        if let Some(status) = finished {
            assert!(status.success());
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        if count().await < INVOICES {
            mid_run_kills += 1;
        }
    }
    assert!(mid_run_kills >= 1, "no kill landed in the middle of a run");
    assert_eq!(count().await, INVOICES);
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM invoices ORDER BY seq")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(seqs, (1..=INVOICES).collect::<Vec<_>>(), "gapless");
    // One period invoice per customer (anchor day 15: the period that
    // closed first, mid-month to mid-month), one opening invoice per
    // customer billing in advance.
    let by_kind: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT kind, count(*), count(DISTINCT customer_id) FROM invoices GROUP BY kind ORDER BY kind",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        by_kind,
        [
            ("opening".to_string(), IN_ADVANCE, IN_ADVANCE),
            ("period".to_string(), CUSTOMERS, CUSTOMERS)
        ]
    );
    let anchored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM invoices WHERE kind = 'period' AND period_end = $1",
    )
    .bind(q.start + Duration::days(14))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(anchored, CUSTOMERS / 10);
    let total: Decimal = sqlx::query_scalar("SELECT sum(total) FROM invoices")
        .fetch_one(&pool)
        .await
        .unwrap();
    // 0.40 × (1 + … + N), and $20 twice (this period's fee at once, the
    // next one's on the period invoice) per customer billing in advance.
    assert_eq!(
        total,
        Decimal::new(40, 2) * Decimal::from(CUSTOMERS * (CUSTOMERS + 1) / 2)
            + Decimal::from(40 * IN_ADVANCE)
    );
    // Credits: each grant consumed at most once per invoice, never below
    // zero, its ledger summing to its balance; what the invoices say they
    // consumed is what the ledger holds; each customer consumed exactly
    // the lesser of its grants and its invoices' totals.
    let per_customer: Vec<(String, Decimal, Decimal, Option<Decimal>)> = sqlx::query_as(
        "SELECT i.customer_id, sum(i.total), -sum(i.credit_total), \
         (SELECT sum(amount) FROM credit_grants g WHERE g.customer_id = i.customer_id) \
         FROM invoices i GROUP BY i.customer_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut with_credit = 0;
    for (c, total, consumed, granted) in &per_customer {
        let granted = granted.unwrap_or_default();
        assert_eq!(*consumed, granted.min(*total), "{c}");
        with_credit += (!granted.is_zero()) as i64;
    }
    assert_eq!(with_credit, CUSTOMERS / 2);
    let bad: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM credit_grants g WHERE g.remaining < 0 OR g.amount - g.remaining <> \
         -(SELECT coalesce(sum(amount), 0) FROM credit_ledger l WHERE l.grant_id = g.id AND l.kind = 'consumption')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(bad, 0);
    let (entries, ledger_sum): (i64, Decimal) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(amount), 0) FROM credit_ledger WHERE kind = 'consumption'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let invoiced: Decimal = sqlx::query_scalar("SELECT sum(credit_total) FROM invoices")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(ledger_sum, invoiced);
    let twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT grant_id, invoice_id FROM credit_ledger WHERE kind = 'consumption' \
         GROUP BY grant_id, invoice_id HAVING count(*) > 1) x",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(twice, 0);
    assert!(
        entries >= grants / 2,
        "{entries} consumptions of {grants} grants"
    );
    println!(
        "{runs} runs, {mid_run_kills} killed mid-run, {entries} consumptions of {grants} grants"
    );
}
