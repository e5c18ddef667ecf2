//! End to end: simulator events → collector → Kafka (tansu) → aggregator
//! → ClickHouse → last month's invoices finalized → pushed to the Stripe
//! stand-in. Each invoice's usage evidence equals the simulator's ground
//! truth, and the Stripe invoice total equals the Tally total to the cent.

use testkit::billing as support;
use testkit::pipeline;

use billing_api::invoice::{month_of, previous};
use billing_api::metrics::Metrics;
use billing_api::state::{Customer, NewSubscription, StateStore, SyncStatus};
use billing_api::stripe_sync::{minor_units, StripeConfig, StripeSync};
use chrono::{Duration, Utc};
use collector::sources::simulator::{ground_truth, Workload};
use rust_decimal::Decimal;
use schemas::MeterCatalog;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_to_stripe_totals_match_to_the_cent() {
    let env = pipeline::Env::new("bille2e");
    let (cfg, port) = env.collector_config("", 5000);
    let _collector = env.spawn_collector(&cfg, port);
    let _agg = env.spawn_aggregator(pipeline::free_port(), None);

    // Six hours of last month (inside the collector's accept window).
    let q = previous(month_of(Utc::now()));
    let from = q.start + Duration::days(5);
    let events = Workload {
        customers: 4,
        apps_per_customer: 2,
        seed: 5,
    }
    .events(from, from + Duration::hours(6), 60);
    let truth = ground_truth(&events, &MeterCatalog::default_catalog());
    pipeline::post_all(&format!("http://127.0.0.1:{port}"), &events, 500).await;
    env.wait_totals(&truth, std::time::Duration::from_secs(120))
        .await;

    // Billing: each simulated customer on a different plan.
    let (_url, st, _pool) = support::pg("e2e").await;
    support::default_catalog(st.as_ref()).await;
    let customers: BTreeSet<String> = truth
        .keys()
        .map(|k| k.split('/').next().unwrap().to_owned())
        .collect();
    assert_eq!(customers.len(), 4);
    for (c, plan) in customers.iter().zip(["payg", "team", "business", "payg"]) {
        st.create_customer(
            &Customer {
                id: c.clone(),
                external_id: format!("paas-{c}"),
                name: c.clone(),
            },
            "e2e",
        )
        .await
        .unwrap();
        st.subscribe(c, &NewSubscription::new(plan, 1, q.start), "e2e")
            .await
            .unwrap();
        if plan == "team" {
            st.set_seats(c, 2, q.start, "e2e").await.unwrap();
        }
    }
    let usage = Arc::new(env.store());
    let f = support::finalizer(st.clone(), usage, 100);
    assert_eq!(
        f.run_once(q.end + Duration::hours(2))
            .await
            .unwrap()
            .finalized,
        4
    );

    // Evidence: usage quantities on the invoices equal the ground truth.
    let mut billed: BTreeMap<(String, String), Decimal> = BTreeMap::new();
    for c in &customers {
        for inv in st.invoices_of(c).await.unwrap() {
            for l in &inv.body.lines {
                if let Some(m) = &l.meter {
                    *billed.entry((c.clone(), m.clone())).or_default() += l.quantity;
                }
            }
        }
    }
    let mut want: BTreeMap<(String, String), Decimal> = BTreeMap::new();
    for (k, v) in &truth {
        let parts: Vec<&str> = k.split('/').collect();
        *want
            .entry((parts[0].to_owned(), parts[2].to_owned()))
            .or_default() += *v;
    }
    assert_eq!(billed, want, "invoice evidence vs simulator ground truth");

    // Stripe: every invoice due is sent; totals equal to the cent.
    let standin = stripe_standin::StandIn::start(0).await.unwrap();
    let mut cfg = StripeConfig::new(standin.url(), "sk_test_e2e");
    cfg.backoff = std::time::Duration::from_millis(10);
    let sync = StripeSync::new(cfg, st.clone(), Metrics::new());
    let (ok, failed) = sync.run_once().await.unwrap();
    assert_eq!(failed, 0);
    let mut sent = 0;
    for c in &customers {
        for inv in st.invoices_of(c).await.unwrap() {
            match inv.sync_status {
                SyncStatus::Synced => {
                    sent += 1;
                    let sid = inv.stripe_invoice_id.as_deref().unwrap();
                    assert_eq!(
                        standin.invoice_total(sid),
                        Some(minor_units(inv.total, &inv.currency).unwrap()),
                        "{} ({c})",
                        inv.number
                    );
                }
                // Below the minimum charge: carried forward, not sent.
                s => assert!(
                    inv.total < Decimal::new(50, 2),
                    "{} not sent ({s}) with total {}",
                    inv.number,
                    inv.total
                ),
            }
        }
    }
    assert_eq!(ok, sent);
    assert!(sent >= 3, "only {sent} invoices sent");
    assert!(standin.items().len() >= 10);
    assert_eq!(standin.invoices().len(), sent);
}
