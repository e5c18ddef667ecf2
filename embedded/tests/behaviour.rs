//! The behavioural suite, written once and run against both modes: the
//! embedded default (`tally serve`, SQLite) and the distributed services
//! (collector → tansu → aggregator → ClickHouse, billing-api on
//! PostgreSQL). Only public surfaces are used: the ingest API, the billing
//! API and the `finalize` commands.
//!
//! Covered, in order: bad input refused and nothing stored; ingest;
//! deduplication of a re-sent batch; rating of the month-to-date draft; a
//! plan switch (preview, confirm, segments in the draft); invoices of the
//! closed month (gapless numbers, totals, a second run finalizes nothing);
//! late usage of the invoiced month as an adjustment naming the invoice;
//! quota checks (spending cap, suspension, allowed). Prices are the default
//! catalog's: requests $0.40 per million on payg, $0.30 on team + $15 a seat.

mod support;

use billing_api::invoice::{month_of, previous};
use chrono::{Duration, Utc};
use reqwest::Method as M;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use std::str::FromStr;
use std::time::Duration as StdDuration;
use support::{requests, Mode, System};

fn dec(v: &Value) -> Decimal {
    Decimal::from_str(
        v.as_str()
            .unwrap_or_else(|| panic!("not a decimal string: {v}")),
    )
    .unwrap()
}

/// The draft's usage lines of `meter` as (plan, price_quantity, amount).
fn usage_lines(draft: &Value, meter: &str) -> Vec<(String, Decimal, Decimal)> {
    draft["body"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == "usage" && l["meter"] == meter)
        .map(|l| {
            (
                l["plan"].as_str().unwrap().to_owned(),
                dec(&l["price_quantity"]),
                dec(&l["amount"]),
            )
        })
        .collect()
}

async fn draft(sys: &System, customer: &str) -> Value {
    let (s, d) = sys
        .api(
            M::GET,
            &format!("/v1/customers/{customer}/invoices/draft"),
            None,
        )
        .await;
    assert_eq!(s, 200, "{d}");
    d
}

async fn quota(sys: &System, customer: &str) -> Value {
    let (s, d) = sys
        .api(
            M::POST,
            "/v1/quota/check",
            Some(json!({"customer_id": customer, "ask": {"kind": "start_instances", "app": "web", "instance_type": "t4g.small", "count": 1}})),
        )
        .await;
    assert_eq!(s, 200, "{d}");
    d
}

async fn behaviour(mode: Mode) {
    let sys = System::start(mode, &format!("behaviour_{mode:?}").to_lowercase()).await;
    let wait = StdDuration::from_secs(90);
    let now = Utc::now();
    let cur = month_of(now);
    let prev = previous(cur);
    // A moment of this month that is already past (at least a second ago).
    let this_month = (now - Duration::seconds(2)).max(cur.start);
    let last_month = prev.start + Duration::days(3);

    // Customers: A and B on payg since the start of last month.
    for id in ["cus_a", "cus_b"] {
        sys.customer(id, "payg", prev.start).await;
    }

    // Bad input: refused with a code naming the field; nothing stored.
    let mut bad = requests("bad-1", "cus_a", "web", this_month, 5);
    bad["type"] = json!("tally.nope");
    let (s, v) = sys.ingest(&[bad]).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["code"].is_string() && v["message"].is_string(), "{v}");

    // Ingest: last month 3 M (A) and 2 M (B) requests; this month 0.5 M
    // (A) and 1 M (B). Then the whole first batch again (a client retry).
    let batch = vec![
        requests("a-1", "cus_a", "web", last_month, 1_000_000),
        requests(
            "a-2",
            "cus_a",
            "web",
            last_month + Duration::hours(1),
            1_000_000,
        ),
        requests(
            "a-3",
            "cus_a",
            "api",
            last_month + Duration::hours(2),
            1_000_000,
        ),
        requests("b-1", "cus_b", "web", last_month, 2_000_000),
    ];
    let (s, v) = sys.ingest(&batch).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = sys
        .ingest(&[
            requests("a-4", "cus_a", "web", this_month, 500_000),
            requests("b-2", "cus_b", "web", this_month, 1_000_000),
        ])
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = sys.ingest(&batch).await;
    assert_eq!(s, 200, "a retried batch is accepted: {v}");

    // Rating: A's draft is 0.5 M requests at $0.40 per million.
    let d = sys
        .eventually("A's usage this month", wait, || async {
            let d = draft(&sys, "cus_a").await;
            let lines = usage_lines(&d, "requests");
            if lines.is_empty() {
                Err(format!("no requests line yet: {d}"))
            } else {
                Ok(d)
            }
        })
        .await;
    assert_eq!(
        usage_lines(&d, "requests"),
        [("payg".into(), Decimal::new(5, 1), Decimal::new(20, 2))],
        "{d}"
    );
    assert_eq!(d["total"], "0.20", "{d}");

    // Plan switch: B (2 seats) to team, now. The preview shows both; after
    // the switch the draft has payg lines before and team lines after.
    let (s, v) = sys
        .api(
            M::PUT,
            "/v1/customers/cus_b/seats",
            Some(json!({"seats": 2, "at": cur.start})),
        )
        .await;
    assert!((200..300).contains(&s), "{s} {v}");
    let (s, pv) = sys
        .api(
            M::POST,
            "/v1/customers/cus_b/plan-switch/preview",
            Some(json!({"plan": "team", "effective": "now"})),
        )
        .await;
    assert_eq!(s, 200, "{pv}");
    let (s, sw) = sys
        .api(
            M::POST,
            "/v1/customers/cus_b/plan-switch",
            Some(json!({"plan": "team", "effective": "now"})),
        )
        .await;
    assert_eq!(s, 200, "{sw}");
    let d = sys
        .eventually("B's usage this month", wait, || async {
            let d = draft(&sys, "cus_b").await;
            if usage_lines(&d, "requests").is_empty() {
                Err(format!("no requests line yet: {d}"))
            } else {
                Ok(d)
            }
        })
        .await;
    let plans: Vec<&str> = d["body"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["plan"].as_str().unwrap())
        .collect();
    assert!(plans.contains(&"payg") && plans.contains(&"team"), "{d}");
    // The 1 M requests were before the switch: rated on payg.
    assert_eq!(
        usage_lines(&d, "requests"),
        [("payg".into(), Decimal::ONE, Decimal::new(40, 2))],
        "{d}"
    );
    let sum: Decimal = d["body"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| dec(&l["amount"]))
        .sum();
    assert_eq!(dec(&d["total"]), sum, "{d}");
    assert!(
        d["body"]["lines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["plan"] == "team" && l["kind"] == "seat_fee"),
        "{d}"
    );
    assert!(
        pv["with_switch"]["lines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["plan"] == "team" && l["kind"] == "seat_fee"),
        "{pv}"
    );

    // Invoices of last month: deduplicated quantities, gapless numbers.
    let out = sys.finalize(now);
    assert!(out.contains("finalized 2 invoice(s)"), "{out}");
    let out = sys.finalize(now);
    assert!(out.contains("finalized 0 invoice(s)"), "{out}");
    let mut numbers = Vec::new();
    for (c, total) in [("cus_a", "1.20"), ("cus_b", "0.80")] {
        let (s, list) = sys
            .api(M::GET, &format!("/v1/customers/{c}/invoices"), None)
            .await;
        assert_eq!(s, 200, "{list}");
        let list = list.as_array().unwrap();
        assert_eq!(list.len(), 1, "{list:?}");
        let inv = &list[0];
        assert_eq!(inv["total"], total, "{c}: {inv}");
        assert_eq!(inv["period"]["start"], json!(prev.start), "{inv}");
        numbers.push(inv["number"].as_str().unwrap().to_owned());
        let id = inv["id"].as_str().unwrap();
        let (s, rr) = sys
            .api(M::GET, &format!("/v1/invoices/{id}/rerate"), None)
            .await;
        assert_eq!(s, 200, "{rr}");
        assert_eq!(rr["reproduces"], true, "{rr}");
    }
    assert_eq!(numbers, ["TALLY-000001", "TALLY-000002"]);

    // Late usage of the invoiced month: an adjustment on A's next invoice.
    let (s, v) = sys
        .ingest(&[requests("a-late", "cus_a", "web", last_month, 2_500_000)])
        .await;
    assert_eq!(s, 200, "{v}");
    let d = sys
        .eventually("the late-usage adjustment", wait, || async {
            let d = draft(&sys, "cus_a").await;
            match d["body"]["adjustments"].as_array() {
                Some(a) if !a.is_empty() => Ok(d),
                _ => Err(format!("no adjustment yet: {d}")),
            }
        })
        .await;
    let adj = &d["body"]["adjustments"];
    assert_eq!(adj.as_array().unwrap().len(), 1, "{d}");
    assert_eq!(adj[0]["original_invoice"], "TALLY-000001", "{d}");
    assert_eq!(adj[0]["amount"], "1.00", "2.5 M at $0.40: {d}");
    assert_eq!(d["total"], "1.20", "0.20 + 1.00: {d}");

    // Quota: allowed; a cap below month-to-date spend denies; suspension
    // denies; lifting both allows again. Quota state refreshes each second.
    let q = quota(&sys, "cus_a").await;
    assert_eq!(q["allow"], true, "{q}");
    let (s, v) = sys
        .api(
            M::PUT,
            "/v1/customers/cus_a/spending-cap",
            Some(json!({"spending_cap": "0.10"})),
        )
        .await;
    assert_eq!(s, 204, "{v}");
    let q = sys
        .eventually("the cap to deny", wait, || async {
            let q = quota(&sys, "cus_a").await;
            if q["allow"] == false {
                Ok(q)
            } else {
                Err(q.to_string())
            }
        })
        .await;
    assert_eq!(q["reason"], "spending_cap", "{q}");
    let (s, _) = sys
        .api(
            M::PUT,
            "/v1/customers/cus_b/suspension",
            Some(json!({"suspended": true})),
        )
        .await;
    assert_eq!(s, 204);
    let q = quota(&sys, "cus_b").await;
    assert_eq!(
        (q["allow"].clone(), q["reason"].clone()),
        (json!(false), json!("account_suspended")),
        "{q}"
    );
    let (s, _) = sys
        .api(
            M::PUT,
            "/v1/customers/cus_b/suspension",
            Some(json!({"suspended": false})),
        )
        .await;
    assert_eq!(s, 204);
    assert_eq!(quota(&sys, "cus_b").await["allow"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded() {
    behaviour(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed() {
    behaviour(Mode::Distributed).await;
}
