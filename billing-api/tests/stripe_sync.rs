//! Invoices pushed to the local Stripe stand-in: idempotency keys, retries
//! through injected faults (429, 500, a response lost after the write),
//! paginated read-back, totals to the cent; and a billing process killed in
//! the middle of a sync, restarted, leaving each invoice exactly once.

use testkit::billing as support;

use billing_api::invoice::{month_of, previous};
use billing_api::metrics::Metrics;
use billing_api::state::{Customer, NewSubscription, StateStore, SyncStatus};
use billing_api::stripe_sync::{minor_units, stripe_lines, StripeConfig, StripeSync};
use chrono::{Duration, Utc};
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;
use stripe_standin::{Fault, StandIn};
use support::*;

/// Three customers with last month's usage, finalized; returns the state.
async fn finalized(
    test: &str,
) -> (
    String,
    String,
    String,
    Arc<billing_api::state::DynStateStore<'static>>,
) {
    let (url, st, _pool) = pg(test).await;
    let (ch, db, usage) = clickhouse(test).await;
    default_catalog(st.as_ref()).await;
    let q = previous(month_of(Utc::now()));
    let t = q.start + Duration::days(3);
    let mut w = Writer::new(usage.clone());
    for (i, (id, plan)) in [("cus_x", "payg"), ("cus_y", "business"), ("cus_z", "team")]
        .into_iter()
        .enumerate()
    {
        st.create_customer(
            &Customer {
                id: id.into(),
                external_id: format!("ext-{id}"),
                name: format!("Customer {id}"),
            },
            "test",
        )
        .await
        .unwrap();
        st.subscribe(id, &NewSubscription::new(plan, 1, q.start), "test")
            .await
            .unwrap();
        let mut evs = Vec::new();
        for (j, ty) in [
            "t4g.nano",
            "t4g.small",
            "m6g.large",
            "c6g.xlarge",
            "c6g.2xlarge",
        ]
        .iter()
        .enumerate()
        {
            evs.push((
                format!("{id}-c{j}"),
                id,
                t,
                "tally.compute",
                compute("web", ty, 3600 * (10 + 7 * j as i64 + i as i64)),
            ));
        }
        evs.push((
            format!("{id}-r"),
            id,
            t,
            "tally.requests",
            requests("web", 77_777_777),
        ));
        w.write(&evs).await;
    }
    st.set_seats("cus_z", 3, q.start, "test").await.unwrap();
    let f = finalizer(st.clone(), usage, 100);
    assert_eq!(
        f.run_once(q.end + Duration::hours(2))
            .await
            .unwrap()
            .finalized,
        3
    );
    (url, ch, db, st)
}

fn config(standin: &StandIn) -> StripeConfig {
    let mut c = StripeConfig::new(standin.url(), "sk_test_standin");
    c.backoff = std::time::Duration::from_millis(10);
    c.page_size = 2; // several pages per invoice
    c
}

/// Each Tally invoice exists once in the stand-in, with its lines once,
/// finalized, and the same total to the cent.
async fn assert_exactly_once(st: &(impl StateStore + ?Sized), standin: &StandIn) {
    let mut tally_total = 0;
    let invoices = standin.invoices();
    let mut by_tally: BTreeMap<String, usize> = BTreeMap::new();
    for i in &invoices {
        *by_tally
            .entry(i.metadata["tally_invoice"].clone())
            .or_default() += 1;
    }
    for c in ["cus_x", "cus_y", "cus_z"] {
        for inv in st.invoices_of(c).await.unwrap() {
            assert_eq!(inv.sync_status, SyncStatus::Synced, "{}", inv.number);
            assert_eq!(by_tally.get(&inv.id), Some(&1), "{} in Stripe", inv.number);
            let sid = inv.stripe_invoice_id.clone().unwrap();
            let s = invoices.iter().find(|i| i.id == sid).unwrap();
            assert_eq!(s.status, "open");
            assert_eq!(s.lines.len(), stripe_lines(&inv).len());
            let cents = minor_units(inv.total, &inv.currency).unwrap();
            assert_eq!(standin.invoice_total(&sid), Some(cents), "{}", inv.number);
            tally_total += cents;
        }
    }
    assert_eq!(invoices.len(), 3);
    assert_eq!(standin.customers().len(), 3);
    // No stray invoice items.
    let items = standin.items();
    assert!(items.iter().all(|i| i.invoice.is_some()));
    assert_eq!(items.iter().map(|i| i.amount).sum::<i64>(), tally_total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_retries_through_faults_and_matches_to_the_cent() {
    let (_url, _ch, _db, st) = finalized("sync").await;
    let standin = StandIn::start(0).await.unwrap();
    standin.inject([
        Fault::RateLimit,
        Fault::ServerError,
        Fault::LoseResponse, // the customer is created, the answer is lost
        Fault::Pass,
        Fault::LoseResponse, // the invoice is created, the answer is lost
        Fault::Pass,
        Fault::RateLimit,
        Fault::LoseResponse, // an item
    ]);
    let metrics = Metrics::new();
    let sync = StripeSync::new(config(&standin), st.clone(), metrics.clone());
    assert_eq!(sync.run_once().await.unwrap(), (3, 0));
    assert_exactly_once(st.as_ref(), &standin).await;
    assert!(
        metrics
            .stripe_errors
            .with_label_values(&["create_customer", "rate_limited"])
            .get()
            >= 1
    );
    assert_eq!(metrics.invoices_synced.get(), 3);
    // A second run has nothing to send and sends nothing.
    let posts = standin.posts_executed();
    assert_eq!(sync.run_once().await.unwrap(), (0, 0));
    assert_eq!(standin.posts_executed(), posts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standin_treats_idempotency_keys_as_stripe_does() {
    let standin = StandIn::start(0).await.unwrap();
    let c = reqwest::Client::new();
    let post = |key: &str, name: &str| {
        c.post(format!("{}v1/customers", standin.url()))
            .bearer_auth("sk_test_x")
            .header("Idempotency-Key", key)
            .form(&[("name", name)])
            .send()
    };
    let a: serde_json::Value = post("k1", "Ada").await.unwrap().json().await.unwrap();
    let b: serde_json::Value = post("k1", "Ada").await.unwrap().json().await.unwrap();
    assert_eq!(a, b, "same key, same parameters: the same response");
    assert_eq!(standin.customers().len(), 1);
    let r = post("k1", "Grace").await.unwrap();
    assert_eq!(r.status(), 400);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "idempotency_error");
    assert_eq!(standin.customers().len(), 1);
    post("k2", "Grace").await.unwrap();
    assert_eq!(standin.customers().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_killed_mid_sync_leaves_each_invoice_once() {
    let (url, ch, db, st) = finalized("synckill").await;
    let standin = StandIn::start(0).await.unwrap();
    let exe = env!("CARGO_BIN_EXE_billing-api");
    let run = || {
        Command::new(exe)
            .arg("finalize")
            .env("TALLY_DATABASE_URL", &url)
            .env("TALLY_CLICKHOUSE_URL", &ch)
            .env("TALLY_CLICKHOUSE_DATABASE", &db)
            .env("STRIPE_SECRET_KEY", "sk_test_standin")
            .env("TALLY_STRIPE_API_BASE", standin.url())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    // Kill the process while Stripe holds its k-th POST (already executed:
    // the write happened, the answer never comes), at several points of the
    // flow: customer, invoice, items, finalize.
    let mut kills = 0;
    for k in [1, 3, 6, 10, 16, 21] {
        let hung = standin.hung();
        let mut q = vec![Fault::Pass; k - 1];
        q.push(Fault::Hang);
        standin.inject(q);
        let mut child = run();
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if standin.hung() > hung {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
                break;
            }
            if let Some(status) = child.try_wait().unwrap() {
                // Finished before reaching the k-th new POST.
                assert!(status.success());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "billing-api neither hung nor finished"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // Drop whatever faults were not consumed.
        standin.clear_faults();
    }
    assert!(kills >= 4, "only {kills} kills landed mid-sync");
    let status = run().wait().unwrap();
    assert!(status.success());
    assert_exactly_once(st.as_ref(), &standin).await;
}

/// Fees in advance reach Stripe as they are billed, through injected
/// faults: the opening invoice, and a boundary invoice whose refunds after
/// a downgrade are negative invoice items beside the charges, each
/// invoice's total equal to Tally's to the cent, each item once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_of_fees_in_advance_are_negative_lines_in_stripe() {
    let (_url, st, _pool) = pg("syncadvance").await;
    let (_ch, _db, usage) = clickhouse("syncadvance").await;
    default_catalog(st.as_ref()).await;
    let plan = |key: &str, flat: &str| -> billing_api::catalog::PlanVersion {
        serde_json::from_value(serde_json::json!({"plan": key, "version": 1, "name": key,
            "currency": "USD", "flat_fee": flat, "seat_fee": "10", "fee_timing": "in_advance"}))
        .unwrap()
    };
    st.publish_plan(&plan("adv_big", "90"), "test")
        .await
        .unwrap();
    st.publish_plan(&plan("adv_small", "60"), "test")
        .await
        .unwrap();
    let q = previous(month_of(Utc::now()));
    st.create_customer(
        &Customer {
            id: "cus_a".into(),
            external_id: "ext-a".into(),
            name: "A".into(),
        },
        "test",
    )
    .await
    .unwrap();
    st.subscribe(
        "cus_a",
        &NewSubscription::new("adv_big", 1, q.start),
        "test",
    )
    .await
    .unwrap();
    st.set_seats("cus_a", 4, q.start, "test").await.unwrap();
    let down = q.start + Duration::days(10);
    st.switch_plan("cus_a", "adv_small", 1, down, "test")
        .await
        .unwrap();
    st.set_seats("cus_a", 1, down, "test").await.unwrap();
    let f = finalizer(st.clone(), usage, 100);
    assert_eq!(
        f.run_once(q.end + Duration::hours(2))
            .await
            .unwrap()
            .finalized,
        2
    );
    let invoices = st.invoices_of("cus_a").await.unwrap();
    let boundary = &invoices[1];
    let negative: Vec<_> = boundary
        .body
        .lines
        .iter()
        .filter(|l| l.amount.is_sign_negative())
        .map(|l| l.description.clone())
        .collect();
    assert_eq!(negative.len(), 2, "{:?}", boundary.body.lines);
    assert!(
        negative.iter().all(|d| d.starts_with("Refund of adv_big")),
        "{negative:?}"
    );
    assert!(boundary.total.is_sign_positive(), "{}", boundary.total);

    let standin = StandIn::start(0).await.unwrap();
    standin.inject([
        Fault::RateLimit,
        Fault::LoseResponse, // the customer
        Fault::Pass,
        Fault::ServerError,
        Fault::LoseResponse, // an invoice
        Fault::Pass,
        Fault::Pass,
        Fault::LoseResponse, // an item
    ]);
    let sync = StripeSync::new(config(&standin), st.clone(), Metrics::new());
    assert_eq!(sync.run_once().await.unwrap(), (2, 0));
    assert_eq!(standin.invoices().len(), 2);
    let sent: i64 = standin.items().iter().map(|i| i.amount).sum();
    let mut billed = 0;
    for inv in st.invoices_of("cus_a").await.unwrap() {
        assert_eq!(inv.sync_status, SyncStatus::Synced, "{}", inv.number);
        let sid = inv.stripe_invoice_id.clone().unwrap();
        assert_eq!(
            standin.invoice_total(&sid),
            Some(minor_units(inv.total, &inv.currency).unwrap()),
            "{}",
            inv.number
        );
        billed += minor_units(inv.total, &inv.currency).unwrap();
    }
    assert_eq!(sent, billed, "no item twice, none astray");
    let refunds: Vec<i64> = standin
        .items()
        .iter()
        .filter(|i| i.amount < 0)
        .map(|i| i.amount)
        .collect();
    // 90 and 4 seats × 10 for the rest of the month after the downgrade,
    // refunded.
    assert_eq!(refunds.len(), 2, "{:?}", standin.items());
    let secs = (q.end - down).num_seconds();
    let len = (q.end - q.start).num_seconds();
    let cents = |fee: i64| {
        -(rust_decimal::Decimal::from(fee * 100 * secs) / rust_decimal::Decimal::from(len))
            .round_dp_with_strategy(0, rust_decimal::RoundingStrategy::MidpointNearestEven)
            .to_string()
            .parse::<i64>()
            .unwrap()
    };
    assert_eq!(refunds, [cents(90), cents(40)]);
}

/// A discount, exclusive tax and credit reach Stripe as invoice items of
/// their own (discount and credit negative), so Stripe's total is Tally's
/// amount due to the cent, through faults; inclusive tax is not sent again;
/// an invoice paid in full by credit is not sent at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discounts_tax_and_credits_reach_stripe_as_their_own_lines() {
    use billing_api::state::{Coupon, GrantKind, NewGrant, TaxProfile, TaxRate};
    use billing_domain::settle::CouponDuration;
    let (_url, st, _pool) = pg("syncsettle").await;
    let (_ch, _db, usage) = clickhouse("syncsettle").await;
    default_catalog(st.as_ref()).await;
    let plan: billing_api::catalog::PlanVersion = serde_json::from_value(serde_json::json!({
        "plan": "flat40", "version": 1, "name": "Flat", "currency": "USD", "flat_fee": "40"}))
    .unwrap();
    st.publish_plan(&plan, "test").await.unwrap();
    let q = previous(month_of(Utc::now()));
    for id in ["cus_s", "cus_paid"] {
        st.create_customer(
            &Customer {
                id: id.into(),
                external_id: format!("ext-{id}"),
                name: id.into(),
            },
            "test",
        )
        .await
        .unwrap();
        st.subscribe(id, &NewSubscription::new("flat40", 1, q.start), "test")
            .await
            .unwrap();
    }
    let coupon = Coupon {
        id: "quarter".into(),
        version: 1,
        name: "Quarter off".into(),
        percent_off: Some("25".parse().unwrap()),
        amount_off: None,
        currency: None,
        duration: CouponDuration::Forever,
        periods: None,
        applies_to: None,
        max_redemptions: None,
    };
    st.publish_coupon(&coupon, "test").await.unwrap();
    st.apply_coupon("cus_s", "quarter", q.start, "test")
        .await
        .unwrap();
    st.create_tax_rate(
        &TaxRate {
            id: "vat".into(),
            name: "VAT".into(),
            country: "FR".into(),
            region: None,
            percentage: "20".parse().unwrap(),
            inclusive: false,
            archived: false,
        },
        "test",
    )
    .await
    .unwrap();
    st.set_tax_profile(
        "cus_s",
        &TaxProfile {
            country: "FR".into(),
            region: None,
            tax_id: None,
            exempt: false,
            reverse_charge: false,
        },
        "test",
    )
    .await
    .unwrap();
    let grant = |c: &str, amount: &str| NewGrant {
        customer_id: c.into(),
        kind: GrantKind::Promotional,
        currency: "USD".into(),
        amount: amount.parse().unwrap(),
        effective_at: Some(q.start),
        expires_at: None,
        priority: 10,
        reason: "welcome".into(),
        top_up: false,
        idempotency_key: None,
    };
    st.grant_credit(&grant("cus_s", "5.00"), "test")
        .await
        .unwrap();
    st.grant_credit(&grant("cus_paid", "100.00"), "test")
        .await
        .unwrap();
    // A top-up of $25 for cus_paid: its own invoice, usable once paid.
    let (top, _) = st
        .grant_credit(
            &NewGrant {
                kind: GrantKind::Purchased,
                top_up: true,
                ..grant("cus_paid", "25.00")
            },
            "test",
        )
        .await
        .unwrap();
    let f = finalizer(st.clone(), usage, 100);
    f.run_once(q.end + Duration::hours(2)).await.unwrap();
    let inv = st
        .invoices_of("cus_s")
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.kind == billing_api::invoice::InvoiceKind::Period)
        .unwrap();
    // $40 − 25 % = $30; VAT $6.00; total $36.00; credit −$5.00; due $31.00.
    let d = |s: &str| -> rust_decimal::Decimal { s.parse().unwrap() };
    assert_eq!(
        (
            inv.discount_total,
            inv.tax_total,
            inv.total,
            inv.credit_total,
            inv.amount_due
        ),
        (d("-10.00"), d("6.00"), d("36.00"), d("-5.00"), d("31.00"))
    );
    let keys: Vec<String> = stripe_lines(&inv).into_iter().map(|l| l.0).collect();
    assert_eq!(keys, ["l0", "d0", "t0", "k0"]);
    let paid = st
        .invoices_of("cus_paid")
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.kind == billing_api::invoice::InvoiceKind::Period)
        .unwrap();
    assert_eq!(
        (paid.amount_due, paid.sync_status),
        (d("0.00"), SyncStatus::NothingDue)
    );

    let standin = StandIn::start(0).await.unwrap();
    standin.inject([
        Fault::Pass,
        Fault::Pass,
        Fault::LoseResponse, // an item
        Fault::ServerError,
    ]);
    let sync = StripeSync::new(config(&standin), st.clone(), Metrics::new());
    assert_eq!(sync.run_once().await.unwrap(), (2, 0));
    assert_eq!(
        standin.invoices().len(),
        2,
        "the top-up and the invoice due; the credit-settled one is not sent"
    );
    let inv = st.invoice(&inv.id).await.unwrap();
    assert_eq!(inv.sync_status, SyncStatus::Synced);
    let sid = inv.stripe_invoice_id.clone().unwrap();
    assert_eq!(standin.invoice_total(&sid), Some(3100));
    let mut amounts: Vec<i64> = standin.items().iter().map(|i| i.amount).collect();
    amounts.sort();
    assert_eq!(amounts, [-1000, -500, 600, 2500, 4000]);
    // Stripe reports the top-up paid: the grant becomes usable.
    let bill = st
        .invoice(top.invoice_id.as_deref().unwrap())
        .await
        .unwrap();
    let sid = bill.stripe_invoice_id.clone().unwrap();
    assert_eq!(standin.invoice_total(&sid), Some(2500));
    let usable = || async {
        st.grants_of("cus_paid")
            .await
            .unwrap()
            .into_iter()
            .find(|g| g.id == top.id)
            .unwrap()
            .usable
    };
    assert!(!usable().await);
    st.set_payment_status(&sid, billing_api::state::PaymentStatus::Paid)
        .await
        .unwrap();
    assert!(usable().await);
}
