//! Finalization against real PostgreSQL and ClickHouse: numbering, restart
//! idempotence, immutability, re-rating from raw events, late usage as one
//! adjustment line on the next invoice, and carry-forward below the minimum
//! charge.

use testkit::billing as support;

use billing_api::invoice::{self, following, month_of, previous};
use billing_api::rating::LineKind;
use billing_api::state::{Customer, NewSubscription, StateStore, SyncStatus};
use chrono::{Duration, Utc};
use rust_decimal::Decimal;
use schemas::MeterCatalog;
use support::*;

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalize_number_rerate_and_adjust_late_usage() {
    let (_url, st, pool) = pg("inv").await;
    let (_ch, _db, usage) = clickhouse("inv").await;
    default_catalog(st.as_ref()).await;
    let now = Utc::now();
    let p = month_of(now); // the open period
    let q = previous(p); // last month: inside the collector's accept window
    for (id, plan) in [("cus_a", "payg"), ("cus_b", "team"), ("cus_c", "payg")] {
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
        st.subscribe(id, &NewSubscription::new(plan, 1, q.start), "test")
            .await
            .unwrap();
    }
    st.set_seats("cus_b", 2, q.start, "test").await.unwrap();

    let in_q = q.start + Duration::days(2);
    let in_p = p.start + (now - p.start) / 2;
    let mut w = Writer::new(usage.clone());
    w.write(&[
        (
            "a1".into(),
            "cus_a",
            in_q,
            "tally.requests",
            requests("web", 250_000_000),
        ),
        (
            "a2".into(),
            "cus_a",
            in_q,
            "tally.compute",
            compute("web", "t4g.nano", 360_000),
        ),
        (
            "b1".into(),
            "cus_b",
            in_q,
            "tally.requests",
            requests("api", 12_000_000),
        ),
        (
            "c1".into(),
            "cus_c",
            in_q,
            "tally.requests",
            requests("web", 1_000_000),
        ),
        (
            "a3".into(),
            "cus_a",
            in_p,
            "tally.requests",
            requests("web", 10_000_000),
        ),
        (
            "c2".into(),
            "cus_c",
            in_p,
            "tally.requests",
            requests("web", 2_000_000),
        ),
    ])
    .await;

    let f = finalizer(st.clone(), usage.clone(), 2);
    // Last month closes at its end plus the grace hour.
    let r = f.run_once(q.end + Duration::minutes(59)).await.unwrap();
    assert_eq!(r.finalized, 0, "nothing is final inside the grace window");
    let r = f.run_once(q.end + Duration::hours(2)).await.unwrap();
    assert_eq!(r.finalized, 3);
    assert_eq!(
        f.run_once(q.end + Duration::hours(3))
            .await
            .unwrap()
            .finalized,
        0,
        "a second run finalizes nothing twice"
    );

    let a_q = st.invoice(&invoice::invoice_id("cus_a", q)).await.unwrap();
    let b_q = st.invoice(&invoice::invoice_id("cus_b", q)).await.unwrap();
    let c_q = st.invoice(&invoice::invoice_id("cus_c", q)).await.unwrap();
    assert_eq!(
        (
            a_q.number.as_str(),
            b_q.number.as_str(),
            c_q.number.as_str()
        ),
        ("TALLY-000001", "TALLY-000002", "TALLY-000003")
    );
    // 250 M requests × $0.40/M + 100 nano hours × $0.0058.
    assert_eq!(a_q.total, d("100.58"));
    // 2 seats × $15 + (12 M − 2 × 5 M included) × $0.30/M.
    assert_eq!(b_q.total, d("30.60"));
    // $0.40 is below Stripe's $0.50 minimum: carried forward, not sent.
    assert_eq!(c_q.total, d("0.40"));
    assert_eq!(c_q.sync_status, SyncStatus::CarriedForward);
    assert_eq!(a_q.sync_status, SyncStatus::Pending);
    let req = a_q
        .body
        .lines
        .iter()
        .find(|l| l.meter.as_deref() == Some("requests"))
        .unwrap();
    assert_eq!((req.events, req.quantity), (1, d("250000000")));

    // Finalized invoices are immutable; only status columns change.
    for sql in [
        format!("UPDATE invoices SET total = 0 WHERE id = '{}'", a_q.id),
        format!("UPDATE invoices SET number = 'X' WHERE id = '{}'", a_q.id),
        format!("DELETE FROM invoices WHERE id = '{}'", a_q.id),
    ] {
        let e = sqlx::query(&sql).execute(&pool).await.unwrap_err();
        assert!(e.to_string().contains("immutable"), "{sql}: {e}");
    }
    sqlx::query("UPDATE invoices SET payment_status = 'open' WHERE id = $1")
        .bind(&a_q.id)
        .execute(&pool)
        .await
        .unwrap();

    // Re-rating from raw events reproduces the invoice exactly.
    let meters = MeterCatalog::default_catalog();
    for inv in [&a_q, &b_q, &c_q] {
        let rerated = invoice::rerate(st.as_ref(), usage.as_ref(), &meters, inv)
            .await
            .unwrap();
        assert_eq!(rerated.own, invoice::billed(inv), "{}", inv.number);
        assert!(rerated.advance.is_empty() && rerated.reproduces(inv));
    }

    // Late usage for last month, after its invoice was finalized.
    w.write(&[(
        "a-late".into(),
        "cus_a",
        q.end - Duration::hours(3),
        "tally.requests",
        requests("web", 12_500_000),
    )])
    .await;
    let rerated = invoice::rerate(st.as_ref(), usage.as_ref(), &meters, &a_q)
        .await
        .unwrap();
    assert_eq!(rerated.own.total, d("105.58"));
    // The finalized invoice itself did not change.
    assert_eq!(st.invoice(&a_q.id).await.unwrap(), a_q);

    // The draft of the open period already shows the adjustment.
    let draft = invoice::draft(st.as_ref(), usage.as_ref(), &meters, "cus_a", p, d("0.50"))
        .await
        .unwrap();
    assert_eq!(draft.adjustments_total, d("5.00"));

    // Finalize this month (as of its end plus grace).
    let r = f.run_once(p.end + Duration::hours(2)).await.unwrap();
    assert_eq!(r.finalized, 3);
    let a_p = st.invoice(&invoice::invoice_id("cus_a", p)).await.unwrap();
    assert_eq!(a_p.subtotal, d("4.00"));
    assert_eq!(a_p.body.adjustments.len(), 1, "{:#?}", a_p.body.adjustments);
    let adj = &a_p.body.adjustments[0];
    assert_eq!(adj.amount, d("5.00"));
    assert_eq!(adj.original_invoice, "TALLY-000001");
    assert_eq!(adj.original_period, q);
    assert_eq!((adj.events_delta, adj.quantity_delta), (1, d("12500000")));
    assert_eq!(adj.kind, LineKind::Usage);
    assert!(
        adj.description.contains("TALLY-000001"),
        "{}",
        adj.description
    );
    assert_eq!(a_p.total, d("9.00"));

    let c_p = st.invoice(&invoice::invoice_id("cus_c", p)).await.unwrap();
    assert_eq!(c_p.carried_in, d("0.40"));
    assert_eq!(c_p.total, d("1.20"));
    assert_eq!(c_p.body.carried[0].invoice_number, "TALLY-000003");
    assert_eq!(c_p.sync_status, SyncStatus::Pending);
    assert_eq!(
        st.invoice(&c_q.id).await.unwrap().carried_to,
        Some(c_p.id.clone())
    );
    let b_p = st.invoice(&invoice::invoice_id("cus_b", p)).await.unwrap();
    assert_eq!((b_p.total, b_p.body.adjustments.len()), (d("30.00"), 0));

    // Numbers are sequential without gaps.
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM invoices ORDER BY seq")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(seqs, (1..=6).collect::<Vec<_>>());
    assert_eq!(f.metrics.invoices_finalized.get(), 6);
    // Nothing is due for the month after.
    assert_eq!(f.run_once(following(p).start).await.unwrap().finalized, 0);
}
