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

use testkit::system as support;

use billing_api::invoice::{month_of, previous};
use chrono::{Datelike, Duration, Utc};
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

// ------------------------------------------------------------ issue 11

/// The plan history as GET subscription reports it: (plan, start, end).
async fn subscription(sys: &System, customer: &str) -> Value {
    let (s, v) = sys
        .api(
            M::GET,
            &format!("/v1/customers/{customer}/subscription"),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    v
}

fn instant(v: &Value) -> chrono::DateTime<Utc> {
    v.as_str()
        .unwrap_or_else(|| panic!("not an instant: {v}"))
        .parse()
        .unwrap()
}

/// Issue 11, items 13 and 4: GET subscription reports the plan's real
/// start and end; a switch scheduled for the period end is listed, replaced
/// by a later switch instead of blocking it, and withdrawn by staff,
/// audited and safe to retry.
async fn plan_history_and_scheduled_switches(mode: Mode) {
    let sys = System::start(mode, &format!("history_{mode:?}").to_lowercase()).await;
    let cur = month_of(Utc::now());
    let prev = previous(cur);
    sys.customer("cus_h", "payg", prev.start).await;

    // Item 13: the real start, and no end while the plan runs on.
    let v = subscription(&sys, "cus_h").await;
    assert_eq!(v["current"]["plan"], "payg", "{v}");
    assert_eq!(instant(&v["current"]["start"]), prev.start, "{v}");
    assert_eq!(v["current"]["end"], Value::Null, "{v}");
    assert_eq!(v["scheduled"], json!([]), "{v}");
    let (s, e) = sys
        .api(M::GET, "/v1/customers/cus_h/subscription?at=now", None)
        .await;
    assert_eq!((s, e["code"].as_str()), (400, Some("bad_query")), "{e}");
    assert!(e["message"].as_str().unwrap().contains("`at`"), "{e}");

    // Scheduled for the period end: the current plan ends there.
    let switch = |plan: &'static str, effective: &'static str| {
        let sys = &sys;
        async move {
            let (s, v) = sys
                .api(
                    M::POST,
                    "/v1/customers/cus_h/plan-switch",
                    Some(json!({"plan": plan, "effective": effective})),
                )
                .await;
            assert_eq!(s, 200, "{plan} {effective}: {v}");
            v
        }
    };
    let sw = switch("team", "period_end").await;
    assert_eq!(instant(&sw["effective_at"]), cur.end, "{sw}");
    assert_eq!(sw["withdrawn"], json!([]), "{sw}");
    let v = subscription(&sys, "cus_h").await;
    assert_eq!(instant(&v["current"]["start"]), prev.start, "{v}");
    assert_eq!(instant(&v["current"]["end"]), cur.end, "{v}");
    assert_eq!(v["scheduled"].as_array().unwrap().len(), 1, "{v}");
    let scheduled = v["scheduled"][0].clone();
    assert_eq!(scheduled["plan"], "team", "{v}");
    assert_eq!(instant(&scheduled["start"]), cur.end, "{v}");
    assert_eq!(scheduled["end"], Value::Null, "{v}");
    let (s, list) = sys
        .api(M::GET, "/v1/customers/cus_h/scheduled-changes", None)
        .await;
    assert_eq!((s, list.clone()), (200, json!([scheduled.clone()])));
    // The same switch again (a retry) changes nothing.
    let again = switch("team", "period_end").await;
    assert_eq!(again["withdrawn"], json!([]), "{again}");
    let (_, list) = sys
        .api(M::GET, "/v1/customers/cus_h/scheduled-changes", None)
        .await;
    assert_eq!(list, json!([scheduled.clone()]), "a retry keeps the change");

    // Item 4: a switch now is no longer refused; it replaces the scheduled one.
    let (s, pv) = sys
        .api(
            M::POST,
            "/v1/customers/cus_h/plan-switch/preview",
            Some(json!({"plan": "business", "effective": "now"})),
        )
        .await;
    assert_eq!(s, 200, "{pv}");
    assert_eq!(pv["replaces"], json!([scheduled.clone()]), "{pv}");
    let now_sw = switch("business", "now").await;
    assert_eq!(now_sw["withdrawn"], json!([scheduled.clone()]), "{now_sw}");
    let t = instant(&now_sw["effective_at"]);
    let v = subscription(&sys, "cus_h").await;
    assert_eq!(v["current"]["plan"], "business", "{v}");
    assert_eq!(instant(&v["current"]["start"]), t, "{v}");
    assert_eq!(v["current"]["end"], Value::Null, "{v}");
    assert_eq!(v["scheduled"], json!([]), "{v}");

    // A period-end switch replaces another period-end switch.
    let first = switch("team", "period_end").await;
    let (_, list) = sys
        .api(M::GET, "/v1/customers/cus_h/scheduled-changes", None)
        .await;
    let team_change = list[0].clone();
    assert_eq!(team_change["plan"], "team", "{first} {list}");
    let second = switch("payg", "period_end").await;
    assert_eq!(second["withdrawn"], json!([team_change]), "{second}");
    let (_, list) = sys
        .api(M::GET, "/v1/customers/cus_h/scheduled-changes", None)
        .await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["plan"], "payg", "{list}");
    let change = list[0].clone();

    // Withdrawn by staff; again (a retry) answers the same; business runs on.
    let path = format!(
        "/v1/customers/cus_h/scheduled-changes/{}",
        change["id"].as_i64().unwrap()
    );
    for _ in 0..2 {
        let (s, w) = sys.api(M::DELETE, &path, None).await;
        assert_eq!((s, w.clone()), (200, change.clone()), "{w}");
    }
    let v = subscription(&sys, "cus_h").await;
    assert_eq!(v["current"]["plan"], "business", "{v}");
    assert_eq!(v["current"]["end"], Value::Null, "{v}");
    assert_eq!(v["scheduled"], json!([]), "{v}");
    // Not withdrawable: the plan in effect (409), an unknown change (404).
    let cur_id = v["current"]["id"].as_i64().unwrap();
    let (s, e) = sys
        .api(
            M::DELETE,
            &format!("/v1/customers/cus_h/scheduled-changes/{cur_id}"),
            None,
        )
        .await;
    assert_eq!((s, e["code"].as_str()), (409, Some("conflict")), "{e}");
    for bad in ["999999999", "nope"] {
        let (s, e) = sys
            .api(
                M::DELETE,
                &format!("/v1/customers/cus_h/scheduled-changes/{bad}"),
                None,
            )
            .await;
        assert_eq!((s, e["code"].as_str()), (404, Some("not_found")), "{e}");
    }
    // Audited: each switch and each withdrawal, with what it withdrew.
    let (s, log) = sys
        .api(M::GET, "/v1/audit?subject=customer:cus_h", None)
        .await;
    assert_eq!(s, 200, "{log}");
    let withdrawals: Vec<&Value> = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "subscription.withdraw")
        .collect();
    assert_eq!(withdrawals.len(), 3, "{log}");
    assert_eq!(withdrawals[2]["before"], change, "{log}");
    assert_eq!(withdrawals[2]["after"]["by"], "withdrawal", "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_history_and_scheduled_switches_embedded() {
    plan_history_and_scheduled_switches(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_history_and_scheduled_switches_distributed() {
    plan_history_and_scheduled_switches(Mode::Distributed).await;
}

/// A flat-fee plan of $0.10 a second of `period`: `name` at `fee`.
fn per_second_plan(name: &str, period: billing_api::rating::Period) -> (Value, Decimal) {
    let secs = (period.end - period.start).num_seconds();
    let fee = Decimal::from(secs) / Decimal::from(10);
    (
        json!({"plan": name, "version": 1, "name": name, "currency": "USD",
               "flat_fee": fee.to_string(), "prices": []}),
        fee,
    )
}

/// Issue 11, item 3: a switch `now` has a sub-second part; the two
/// segments still add up to the whole period (two plans at the same monthly
/// fee bill exactly that fee, not a second less).
async fn sub_second_switch_bills_the_whole_period(mode: Mode) {
    let sys = System::start(mode, &format!("subsecond_{mode:?}").to_lowercase()).await;
    let cur = month_of(Utc::now());
    let (a, fee) = per_second_plan("big_a", cur);
    let (b, _) = per_second_plan("big_b", cur);
    for p in [a, b] {
        let (s, v) = sys.api(M::POST, "/v1/plans", Some(p)).await;
        assert_eq!(s, 201, "{v}");
    }
    sys.customer("cus_big", "big_a", cur.start).await;
    let (s, sw) = sys
        .api(
            M::POST,
            "/v1/customers/cus_big/plan-switch",
            Some(json!({"plan": "big_b", "effective": "now"})),
        )
        .await;
    assert_eq!(s, 200, "{sw}");
    let t = instant(&sw["effective_at"]);
    assert_ne!(
        t.timestamp_subsec_micros(),
        0,
        "a real now has a sub-second part (one chance in a million to be whole)"
    );
    let d = draft(&sys, "cus_big").await;
    let fees: Vec<(String, Decimal)> = d["body"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == "flat_fee")
        .map(|l| (l["plan"].as_str().unwrap().to_owned(), dec(&l["quantity"])))
        .collect();
    let whole = Decimal::from((cur.end - cur.start).num_seconds());
    let floor = Decimal::from(t.timestamp() - cur.start.timestamp());
    assert_eq!(
        fees,
        [("big_a".into(), floor), ("big_b".into(), whole - floor)],
        "{d}"
    );
    assert_eq!(dec(&d["total"]), fee, "the whole month's fee: {d}");
    // Issue 11 item 15: written with the currency's digits in both modes.
    assert_eq!(d["total"], format!("{fee:.2}"), "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_second_switch_bills_the_whole_period_embedded() {
    sub_second_switch_bills_the_whole_period(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_second_switch_bills_the_whole_period_distributed() {
    sub_second_switch_bills_the_whole_period(Mode::Distributed).await;
}

/// A requests event at an exact instant (microseconds).
fn requests_at(id: &str, customer: &str, time: chrono::DateTime<Utc>, count: u64) -> Value {
    let mut e = requests(id, customer, "web", time, count);
    e["time"] = json!(time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    e
}

/// Issue 11, item 3: usage belongs to a segment by its exact time, start
/// inclusive, end exclusive: an event a microsecond before a sub-second
/// switch is rated on the old plan, one at the switch on the new plan.
async fn usage_at_a_sub_second_switch(mode: Mode) {
    let sys = System::start(mode, &format!("usageswitch_{mode:?}").to_lowercase()).await;
    let wait = StdDuration::from_secs(90);
    let cur = month_of(Utc::now());
    sys.customer("cus_us", "payg", cur.start).await;
    let (s, sw) = sys
        .api(
            M::POST,
            "/v1/customers/cus_us/plan-switch",
            Some(json!({"plan": "team", "effective": "now"})),
        )
        .await;
    assert_eq!(s, 200, "{sw}");
    let t = instant(&sw["effective_at"]);
    assert_ne!(t.timestamp_subsec_micros(), 0, "{t}");
    let (s, v) = sys
        .ingest(&[
            requests_at(
                "us-before",
                "cus_us",
                t - Duration::microseconds(1),
                1_000_000,
            ),
            requests_at("us-at", "cus_us", t, 3_000_000),
        ])
        .await;
    assert_eq!(s, 200, "{v}");
    let d = sys
        .eventually("both events in the draft", wait, || async {
            let d = draft(&sys, "cus_us").await;
            let q: Decimal = d["body"]["lines"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|l| l["kind"] == "usage" && l["meter"] == "requests")
                .map(|l| dec(&l["quantity"]))
                .sum();
            if q == Decimal::from(4_000_000) {
                Ok(d)
            } else {
                Err(format!("{q} requests so far: {d}"))
            }
        })
        .await;
    let by_plan: Vec<(String, Decimal)> = d["body"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == "usage" && l["meter"] == "requests")
        .map(|l| (l["plan"].as_str().unwrap().to_owned(), dec(&l["quantity"])))
        .collect();
    assert_eq!(
        by_plan,
        [
            ("payg".into(), Decimal::from(1_000_000)),
            ("team".into(), Decimal::from(3_000_000))
        ],
        "{d}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_at_a_sub_second_switch_embedded() {
    usage_at_a_sub_second_switch(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_at_a_sub_second_switch_distributed() {
    usage_at_a_sub_second_switch(Mode::Distributed).await;
}

/// Issue 11, item 14: the draft of any open period, `?period=YYYY-MM`: the
/// closing month's until it is finalized (the grace window) and the
/// current one, for staff and for the customer; unknown parameters and
/// other periods refused with the error envelope.
async fn drafts_of_open_periods(mode: Mode) {
    let sys = System::start(mode, &format!("drafts_{mode:?}").to_lowercase()).await;
    let wait = StdDuration::from_secs(90);
    let now = Utc::now();
    let cur = month_of(now);
    let prev = previous(cur);
    let label = |p: billing_api::rating::Period| p.start.format("%Y-%m").to_string();
    sys.customer("cus_d", "payg", prev.start).await;
    let (s, v) = sys
        .ingest(&[
            requests(
                "d-1",
                "cus_d",
                "web",
                prev.start + Duration::days(3),
                1_000_000,
            ),
            requests(
                "d-2",
                "cus_d",
                "web",
                (now - Duration::seconds(2)).max(cur.start),
                2_000_000,
            ),
        ])
        .await;
    assert_eq!(s, 200, "{v}");
    let get = |q: String| {
        let sys = &sys;
        async move {
            sys.api(
                M::GET,
                &format!("/v1/customers/cus_d/invoices/draft{q}"),
                None,
            )
            .await
        }
    };
    // Both months, by staff: the closing one (1 M) and the current one (2 M).
    let closing = sys
        .eventually("last month's usage", wait, || async {
            let (s, d) = get(format!("?period={}", label(prev))).await;
            assert_eq!(s, 200, "{d}");
            if d["total"].as_str().map(|t| dec(&json!(t))) == Some(Decimal::new(40, 2)) {
                Ok(d)
            } else {
                Err(d.to_string())
            }
        })
        .await;
    assert_eq!(
        instant(&closing["period"]["start"]),
        prev.start,
        "{closing}"
    );
    let current = sys
        .eventually("this month's usage", wait, || async {
            let (s, d) = get(format!("?period={}", label(cur))).await;
            assert_eq!(s, 200, "{d}");
            if d["total"].as_str().map(|t| dec(&json!(t))) == Some(Decimal::new(80, 2)) {
                Ok(d)
            } else {
                Err(d.to_string())
            }
        })
        .await;
    assert_eq!(instant(&current["period"]["start"]), cur.start, "{current}");
    let (s, default) = get(String::new()).await;
    assert_eq!((s, &default["period"]), (200, &current["period"]));

    // The customer itself, with a session.
    let (s, session) = sys
        .api(M::POST, "/v1/customers/cus_d/sessions", Some(json!({})))
        .await;
    assert_eq!(s, 201, "{session}");
    let r = reqwest::Client::new()
        .get(format!(
            "{}/v1/customers/cus_d/invoices/draft?period={}",
            sys.billing,
            label(prev)
        ))
        .bearer_auth(session["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mine: Value = r.json().await.unwrap();
    assert_eq!(mine["total"], closing["total"], "{mine}");

    // Refused, with the envelope naming the problem.
    for (q, status, code, names) in [
        ("?perod=2026-11".to_string(), 400, "bad_query", "perod"),
        (
            format!("?period={}&x=1", label(cur)),
            400,
            "bad_query",
            "`x`",
        ),
        ("?period=2026-13".into(), 400, "bad_query", "period"),
        ("?period=november".into(), 400, "bad_query", "period"),
        (
            format!("?period={}", label(billing_api::invoice::following(cur))),
            422,
            "invalid",
            "not open",
        ),
        (
            format!("?period={}", label(previous(prev))),
            422,
            "invalid",
            "not open",
        ),
    ] {
        let (s, e) = get(q.clone()).await;
        assert_eq!((s, e["code"].as_str()), (status, Some(code)), "{q}: {e}");
        assert!(e["message"].as_str().unwrap().contains(names), "{q}: {e}");
    }

    // Finalized, the closing month has no draft any more: it names the invoice.
    let out = sys.finalize(now);
    assert!(out.contains("finalized 1 invoice(s)"), "{out}");
    let (s, e) = get(format!("?period={}", label(prev))).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (409, Some("period_finalized")),
        "{e}"
    );
    assert!(
        e["message"].as_str().unwrap().contains("TALLY-000001"),
        "{e}"
    );
    let (s, d) = get(format!("?period={}", label(cur))).await;
    assert_eq!((s, &d["period"]), (200, &current["period"]), "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drafts_of_open_periods_embedded() {
    drafts_of_open_periods(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drafts_of_open_periods_distributed() {
    drafts_of_open_periods(Mode::Distributed).await;
}

// ------------------------------------------------------------ issue 13

/// An invoice of `customer` for `period`, as listed.
async fn invoice_of(sys: &System, customer: &str, period: billing_api::rating::Period) -> Value {
    let (s, list) = sys
        .api(M::GET, &format!("/v1/customers/{customer}/invoices"), None)
        .await;
    assert_eq!(s, 200, "{list}");
    list.as_array()
        .unwrap()
        .iter()
        .find(|i| i["kind"] == "period" && instant(&i["period"]["start"]) == period.start)
        .unwrap_or_else(|| panic!("{customer} has no invoice for {period:?}: {list}"))
        .clone()
}

/// The lines of `kind` as (description, amount, waived).
fn lines_of(inv: &Value, kind: &str) -> Vec<(String, String, Option<String>)> {
    inv["body"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == kind)
        .map(|l| {
            (
                l["description"].as_str().unwrap().to_owned(),
                l["amount"].as_str().unwrap().to_owned(),
                l["waived"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// `299 × secs / period secs`, rounded half-even to cents (as text).
fn prorated(fee: i64, secs: i64, period: billing_api::rating::Period) -> String {
    let len = (period.end - period.start).num_seconds();
    let mut x = (Decimal::from(fee) * Decimal::from(secs) / Decimal::from(len))
        .round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointNearestEven);
    x.rescale(2);
    x.to_string()
}

/// Issue 13, items 1–3: cancellation now, at the period end and at an
/// instant (withdrawn, repeated, refused in an invoiced period); usage
/// after a cancellation reported and not billed; the final invoice due at
/// the cancellation (the finalize command runs with grace 0) and quota
/// checks denied with `no_subscription`; late usage after the final
/// invoice as an invoice of its own; reactivation; trials converted and
/// cancelled, and no second trial.
async fn lifecycle(mode: Mode) {
    let sys = System::start(mode, &format!("lifecycle_{mode:?}").to_lowercase()).await;
    let wait = StdDuration::from_secs(90);
    let now = billing_api::wire::to_micros(Utc::now());
    let cur = month_of(now);
    let prev = previous(cur);
    let next = billing_api::invoice::following(cur);

    // A plan with a 14-day trial: the default catalog's business ($299
    // flat) under another key.
    publish_variant(&sys, "business", "trialbiz", |p| {
        p["trial_days"] = json!(14)
    })
    .await;

    for (id, plan) in [
        ("cus_now", "payg"),
        ("cus_pe", "payg"),
        ("cus_re", "payg"),
        ("cus_tr", "trialbiz"),
        ("cus_tc", "trialbiz"),
    ] {
        sys.customer(id, plan, prev.start).await;
    }
    let day = Duration::days(1);
    let sub = subscription(&sys, "cus_tr").await;
    assert_eq!(
        instant(&sub["current"]["trial_end"]),
        prev.start + day * 14,
        "{sub}"
    );

    // Bad input: named fields, nothing written.
    for (path, body, status, code, field) in [
        (
            "/v1/customers/cus_pe/cancellation",
            json!({"effective": "now", "at": now}),
            422,
            "invalid",
            "at:",
        ),
        (
            "/v1/customers/cus_pe/plan-switch",
            json!({"plan": "team", "trial_days": 7}),
            422,
            "invalid",
            "trial_days:",
        ),
        (
            "/v1/customers/cus_pe/cancellation",
            json!({"at": now + Duration::days(400)}),
            422,
            "invalid",
            "at:",
        ),
        (
            "/v1/customers/nobody/cancellation",
            json!({}),
            404,
            "not_found",
            "nobody",
        ),
    ] {
        let (s, v) = sys.api(M::POST, path, Some(body)).await;
        assert_eq!((s, v["code"].as_str()), (status, Some(code)), "{path}: {v}");
        assert!(v["message"].as_str().unwrap().contains(field), "{v}");
    }
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_x/subscription",
            Some(json!({"plan": "payg", "trial_days": 400})),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(v["message"].as_str().unwrap().starts_with("trial_days:"));
    let (s, v) = sys
        .api(M::DELETE, "/v1/customers/cus_pe/cancellation", None)
        .await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")), "{v}");
    assert_eq!(
        subscription(&sys, "cus_pe").await["cancelled_at"],
        Value::Null
    );

    // Trial then cancel: cancelled 9 days in, inside the trial, in the
    // month not invoiced yet.
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_tc/cancellation",
            Some(json!({"at": prev.start + day * 9})),
        )
        .await;
    assert_eq!(s, 200, "{v}");

    // Last month's invoices: the trial's fees at zero with what was waived.
    sys.finalize(now);
    let tr = invoice_of(&sys, "cus_tr", prev).await;
    let trial_secs = (day * 14).num_seconds();
    let rest = (prev.end - prev.start).num_seconds() - trial_secs;
    assert_eq!(
        lines_of(&tr, "flat_fee"),
        [
            (
                "Business flat fee (trial)".into(),
                "0.00".into(),
                Some(prorated(299, trial_secs, prev))
            ),
            ("Business flat fee".into(), prorated(299, rest, prev), None),
        ],
        "{tr}"
    );
    assert_eq!(tr["total"], json!(prorated(299, rest, prev)), "{tr}");
    let tc = invoice_of(&sys, "cus_tc", prev).await;
    assert_eq!(
        lines_of(&tc, "flat_fee"),
        [(
            "Business flat fee (trial)".into(),
            "0.00".into(),
            Some(prorated(299, (day * 9).num_seconds(), prev))
        )],
        "{tc}"
    );
    // Stored zero reads back as `0`.
    assert_eq!(dec(&tc["total"]), Decimal::ZERO, "{tc}");
    // Subscribing again to the plan: no second trial.
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_tc/subscription",
            Some(json!({"plan": "trialbiz"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["trial_ends_at"], Value::Null, "{v}");

    // A cancellation inside the invoiced month is refused.
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_pe/cancellation",
            Some(json!({"at": prev.start + day * 20})),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (409, Some("period_finalized")),
        "{v}"
    );

    // At the period end: scheduled, withdrawn (twice: the same answer),
    // then at an instant ahead.
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_pe/cancellation",
            Some(json!({"effective": "period_end"})),
        )
        .await;
    assert_eq!((s, instant(&v["effective_at"])), (200, cur.end), "{v}");
    let sub = subscription(&sys, "cus_pe").await;
    assert_eq!(instant(&sub["cancelled_at"]), cur.end, "{sub}");
    assert_eq!(instant(&sub["current"]["end"]), cur.end, "{sub}");
    assert_eq!(quota(&sys, "cus_pe").await["allow"], true);
    for _ in 0..2 {
        let (s, v) = sys
            .api(M::DELETE, "/v1/customers/cus_pe/cancellation", None)
            .await;
        assert_eq!((s, &v["end"]), (200, &Value::Null), "{v}");
    }
    assert_eq!(
        subscription(&sys, "cus_pe").await["cancelled_at"],
        Value::Null
    );
    let ahead = now + Duration::hours(1);
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_pe/cancellation",
            Some(json!({"at": ahead})),
        )
        .await;
    assert_eq!((s, instant(&v["effective_at"])), (200, ahead), "{v}");
    let (s, audit) = sys
        .api(M::GET, "/v1/audit?subject=customer:cus_pe", None)
        .await;
    assert_eq!(s, 200, "{audit}");
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .filter(|a| a.starts_with("subscription.") && *a != "subscription.start")
        .collect();
    assert_eq!(
        actions,
        [
            "subscription.cancel",
            "subscription.uncancel",
            "subscription.cancel"
        ],
        "{audit}"
    );

    // Reactivation: cancelled now; subscribing again inside this month is
    // refused once the final invoice is due (at once here: grace 0), so
    // the new subscription starts at the month's end.
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_re/cancellation",
            Some(json!({"effective": "now"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(quota(&sys, "cus_re").await["reason"], "no_subscription");
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_re/subscription",
            Some(json!({"plan": "team"})),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (409, Some("period_finalized")),
        "{v}"
    );
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_re/subscription",
            Some(json!({"plan": "team", "starts_at": cur.end})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let sub = subscription(&sys, "cus_re").await;
    assert_eq!(
        (
            &sub["current"],
            &sub["scheduled"][0]["plan"],
            &sub["cancelled_at"]
        ),
        (&Value::Null, &json!("team"), &Value::Null),
        "{sub}"
    );
    // A subscription that starts later is not a scheduled change.
    let (s, v) = sys
        .api(M::GET, "/v1/customers/cus_re/scheduled-changes", None)
        .await;
    assert_eq!((s, v), (200, json!([])));

    // Cancel now: 1 M requests before, 0.5 M after (not billed).
    let before = (now - Duration::seconds(30)).max(cur.start);
    let (s, v) = sys
        .ingest(&[requests("n-1", "cus_now", "web", before, 1_000_000)])
        .await;
    assert_eq!(s, 200, "{v}");
    sys.eventually("cus_now's usage", wait, || async {
        let d = draft(&sys, "cus_now").await;
        if usage_lines(&d, "requests").is_empty() {
            Err(format!("no requests line yet: {d}"))
        } else {
            Ok(())
        }
    })
    .await;
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_now/cancellation",
            Some(json!({"effective": "now"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let c = instant(&v["effective_at"]);
    // Repeated: the same answer.
    let (s, again) = sys
        .api(
            M::POST,
            "/v1/customers/cus_now/cancellation",
            Some(json!({"at": c})),
        )
        .await;
    assert_eq!(
        (s, &again["effective_at"]),
        (200, &v["effective_at"]),
        "{again}"
    );
    let (s, v) = sys
        .ingest(&[requests(
            "n-2",
            "cus_now",
            "web",
            c + Duration::seconds(1),
            500_000,
        )])
        .await;
    assert_eq!(s, 200, "{v}");
    let sub = subscription(&sys, "cus_now").await;
    assert_eq!(
        (&sub["current"], instant(&sub["cancelled_at"])),
        (&Value::Null, c),
        "{sub}"
    );
    let q = quota(&sys, "cus_now").await;
    assert_eq!(
        (&q["allow"], &q["reason"], &q["plan"]),
        (&json!(false), &json!("no_subscription"), &Value::Null),
        "{q}"
    );
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_now/plan-switch",
            Some(json!({"plan": "team"})),
        )
        .await;
    assert_eq!(s, 422, "no plan to switch from after a cancellation: {v}");
    let unbilled = sys
        .eventually("usage after the cancellation", wait, || async {
            let (s, v) = sys
                .api(M::GET, "/v1/customers/cus_now/unbilled-usage", None)
                .await;
            assert_eq!(s, 200, "{v}");
            if v["usage"].as_array().unwrap().is_empty() {
                Err(format!("not yet: {v}"))
            } else {
                Ok(v)
            }
        })
        .await;
    assert_eq!(
        unbilled["usage"],
        json!([{"meter": "requests", "dims": {}, "quantity": "500000", "events": 1}]),
        "{unbilled}"
    );
    assert_eq!(instant(&unbilled["uncovered"][0]["start"]), c, "{unbilled}");

    // The final invoice, due at the cancellation (grace 0 here), before
    // the month ends: the usage before it, the usage after it reported.
    sys.finalize(c + Duration::seconds(1));
    let fin = invoice_of(&sys, "cus_now", cur).await;
    assert_eq!(
        usage_lines(&fin, "requests"),
        [("payg".into(), Decimal::ONE, Decimal::new(40, 2))],
        "{fin}"
    );
    assert_eq!(
        (&fin["total"], &fin["sync_status"]),
        (&json!("0.40"), &json!("carried_forward")),
        "{fin}"
    );
    assert_eq!(fin["body"]["unbilled"], unbilled["usage"], "{fin}");
    assert_eq!(
        instant(&fin["finalized_at"]),
        c + Duration::seconds(1),
        "{fin}"
    );
    // Subscribing again inside the finalized month is refused; the
    // cancellation cannot be withdrawn once in effect.
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_now/subscription",
            Some(json!({"plan": "payg", "starts_at": c + Duration::seconds(2)})),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (409, Some("period_finalized")),
        "{v}"
    );
    let (s, v) = sys
        .api(M::DELETE, "/v1/customers/cus_now/cancellation", None)
        .await;
    assert_eq!((s, v["code"].as_str()), (409, Some("conflict")), "{v}");

    // Every invoice so far re-rates from raw events exactly.
    assert_rerated(&sys, &["cus_now", "cus_pe", "cus_re", "cus_tr", "cus_tc"]).await;

    // Late usage timed before the cancellation, after the final invoice,
    // and late usage of last month (still accepted, and after the one
    // invoice that adjusted last month): with no later invoice to carry
    // them, an invoice of its own adjusting both.
    let (s, v) = sys
        .ingest(&[
            requests("n-3", "cus_now", "web", before, 1_000_000),
            requests("n-4", "cus_now", "web", prev.start + day, 2_000_000),
        ])
        .await;
    assert_eq!(s, 200, "{v}");
    let prev_inv = invoice_of(&sys, "cus_now", prev).await;
    for inv in [&fin, &prev_inv] {
        let id = inv["id"].as_str().unwrap().to_owned();
        sys.eventually("the late usage", wait, || async {
            let (s, r) = sys
                .api(M::GET, &format!("/v1/invoices/{id}/rerate"), None)
                .await;
            assert_eq!(s, 200, "{r}");
            if r["reproduces"] == true {
                Err(format!("not yet: {r}"))
            } else {
                Ok(())
            }
        })
        .await;
    }
    sys.finalize(next.end + Duration::seconds(1));
    let adj = invoice_of(&sys, "cus_now", next).await;
    assert_eq!(adj["body"]["lines"], json!([]), "{adj}");
    let a: Vec<(Value, Value)> = adj["body"]["adjustments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["amount"].clone(), a["original_invoice"].clone()))
        .collect();
    assert_eq!(
        a,
        [
            (json!("0.40"), fin["number"].clone()),
            (json!("0.80"), prev_inv["number"].clone())
        ],
        "{adj}"
    );
    assert_eq!(
        adj["body"]["adjusted_earlier"]["invoice_number"], prev_inv["number"],
        "{adj}"
    );
    assert_eq!(
        (&adj["adjustments_total"], &adj["carried_in"], &adj["total"]),
        (&json!("1.20"), &json!("0.40"), &json!("1.60")),
        "{adj}"
    );
    // A second run adds nothing; re-rating the adjusted invoices shows the
    // late usage, which the adjustment invoice carries.
    let out = sys.finalize(next.end + Duration::seconds(2));
    assert!(out.contains("finalized 0 invoice(s)"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_embedded() {
    lifecycle(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_distributed() {
    lifecycle(Mode::Distributed).await;
}

/// A plan of the default catalog under another key, changed by `edit`,
/// published.
async fn publish_variant(sys: &System, base: &str, key: &str, edit: impl FnOnce(&mut Value)) {
    let (s, plans) = sys.api(M::GET, "/v1/plans", None).await;
    assert_eq!(s, 200, "{plans}");
    let mut p = plans
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["plan"]["plan"] == base)
        .unwrap_or_else(|| panic!("no plan {base}"))["plan"]
        .clone();
    p["plan"] = json!(key);
    edit(&mut p);
    let (s, v) = sys.api(M::POST, "/v1/plans", Some(p)).await;
    assert_eq!(s, 201, "{v}");
}

/// Issue 13, item 4 and BILLING-EXAMPLES example 10: anchor day 31 from
/// Jan 31 (of last year, so every period is closed): periods run anchor
/// to anchor across February, a switch on Mar 10 prorates the $30 fee by
/// that period's own 31 days, and each period has its invoice. The anchor
/// is refused out of range and cannot change on a later subscription.
async fn anchor_days(mode: Mode) {
    use billing_api::invoice::{following, period_of};
    use chrono::TimeZone;
    let sys = System::start(mode, &format!("anchor_{mode:?}").to_lowercase()).await;
    let y = Utc::now().year() - 1;
    let at = |m, d| Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap();
    publish_variant(&sys, "payg", "flat30", |p| p["flat_fee"] = json!("30")).await;
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers",
            Some(json!({"id": "cus_31", "external_id": "ext-31", "name": "Anchor 31"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    for bad in [0, 32] {
        let (s, v) = sys
            .api(
                M::POST,
                "/v1/customers/cus_31/subscription",
                Some(json!({"plan": "flat30", "starts_at": at(1, 31), "anchor_day": bad})),
            )
            .await;
        assert_eq!(s, 422, "{v}");
        assert!(
            v["message"].as_str().unwrap().starts_with("anchor_day:"),
            "{v}"
        );
    }
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_31/subscription",
            Some(json!({"plan": "flat30", "starts_at": at(1, 31), "anchor_day": 31})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        subscription(&sys, "cus_31").await["current"]["anchor_day"],
        31
    );
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_31/plan-switch",
            Some(json!({"plan": "payg", "at": at(3, 10)})),
        )
        .await;
    assert_eq!(s, 200, "{v}");

    let p1 = period_of(at(1, 31), 31);
    let (p2, p3) = (following(p1), following(following(p1)));
    assert_eq!((p1.end, p2.end, p3.end), (p2.start, at(3, 31), at(4, 30)));
    let out = sys.finalize(at(5, 1));
    assert!(out.contains("finalized 3 invoice(s)"), "{out}");
    let fees = |inv: &Value| lines_of(inv, "flat_fee");
    let i1 = invoice_of(&sys, "cus_31", p1).await;
    assert_eq!(instant(&i1["period"]["end"]), p1.end, "{i1}");
    assert_eq!(
        fees(&i1),
        [("Pay as you go flat fee".into(), "30.00".into(), None)]
    );
    let i2 = invoice_of(&sys, "cus_31", p2).await;
    assert_eq!(
        fees(&i2),
        [("Pay as you go flat fee".into(), "9.68".into(), None)],
        "30 × 10/31: {i2}"
    );
    let i3 = invoice_of(&sys, "cus_31", p3).await;
    assert_eq!(dec(&i3["total"]), Decimal::ZERO, "{i3}");
    // Numbered in order, gapless.
    let seqs: Vec<i64> = [&i1, &i2, &i3]
        .iter()
        .map(|i| i["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [seqs[0], seqs[0] + 1, seqs[0] + 2]);
    assert_rerated(&sys, &["cus_31"]).await;

    // Cancelled, then subscribed again: the anchor stays.
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_31/cancellation",
            Some(json!({"at": at(5, 10)})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_31/subscription",
            Some(json!({"plan": "payg", "starts_at": at(6, 30), "anchor_day": 1})),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(
        v["message"].as_str().unwrap().starts_with("anchor_day:"),
        "{v}"
    );
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_31/subscription",
            Some(json!({"plan": "payg", "starts_at": at(6, 30)})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        subscription(&sys, "cus_31").await["current"]["anchor_day"],
        31
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anchor_days_embedded() {
    anchor_days(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anchor_days_distributed() {
    anchor_days(Mode::Distributed).await;
}

/// Issue 13, item 6: a contract derived from the team plan for one
/// customer (seats at $12 instead of $15), validated by field, published
/// once however often it is sent, subscribable by that customer only and
/// shown by its plan advisor as its contract.
async fn contracts(mode: Mode) {
    let sys = System::start(mode, &format!("contract_{mode:?}").to_lowercase()).await;
    let now = Utc::now();
    let cur = month_of(now);
    for id in ["cus_k", "cus_o"] {
        sys.customer(id, "payg", cur.start).await;
    }
    let body = json!({"base_plan": "team", "overrides": {"seat_fee": "12"}});
    let (s, k) = sys
        .api(M::POST, "/v1/customers/cus_k/contracts", Some(body.clone()))
        .await;
    assert_eq!(s, 201, "{k}");
    assert_eq!(
        (&k["plan"], &k["version"], &k["customer"], &k["seat_fee"]),
        (
            &json!("team-cus_k"),
            &json!(1),
            &json!("cus_k"),
            &json!("12")
        ),
        "{k}"
    );
    let (s, again) = sys
        .api(M::POST, "/v1/customers/cus_k/contracts", Some(body))
        .await;
    assert_eq!((s, &again), (200, &k), "the same contract again");

    // Bad input, by field; nothing published.
    for (overrides, field) in [
        (json!({"currency": "EUR"}), "overrides.currency"),
        (
            json!({"prices": [{"meter": "nope", "model": "per_unit", "unit_price": "1"}]}),
            "overrides.prices[0].meter",
        ),
        (json!("cheaper"), "overrides"),
    ] {
        let (s, v) = sys
            .api(
                M::POST,
                "/v1/customers/cus_k/contracts",
                Some(json!({"base_plan": "team", "overrides": overrides})),
            )
            .await;
        assert_eq!((s, v["code"].as_str()), (422, Some("invalid")), "{v}");
        assert_eq!(v["details"][0]["field"], field, "{v}");
    }
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_k/contracts",
            Some(json!({"base_plan": "nope", "overrides": {}})),
        )
        .await;
    assert_eq!(s, 404, "{v}");
    assert!(
        v["message"].as_str().unwrap().starts_with("base_plan:"),
        "{v}"
    );
    let (s, list) = sys.api(M::GET, "/v1/customers/cus_k/contracts", None).await;
    assert_eq!(s, 200, "{list}");
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");

    // Another customer may not be subscribed to it.
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_o/plan-switch",
            Some(json!({"plan": "team-cus_k"})),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(v["message"].as_str().unwrap().starts_with("plan:"), "{v}");

    // Its customer is: seats at $12.
    let (s, v) = sys
        .api(
            M::PUT,
            "/v1/customers/cus_k/seats",
            Some(json!({"seats": 2, "at": cur.start})),
        )
        .await;
    assert!((200..300).contains(&s), "{v}");
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_k/plan-switch",
            Some(json!({"plan": "team-cus_k"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let d = draft(&sys, "cus_k").await;
    let seat_prices: Vec<&Value> = d["body"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == "seat_fee")
        .map(|l| &l["unit_price"])
        .collect();
    assert_eq!(seat_prices, [&json!("12")], "{d}");

    // The advisor: the contract for its customer, marked; not for others.
    let advised = |c: &'static str| {
        let sys = &sys;
        async move {
            let (s, a) = sys
                .api(M::GET, &format!("/v1/customers/{c}/plan-advisor"), None)
                .await;
            assert_eq!(s, 200, "{a}");
            a["plans"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        p["plan"].as_str().unwrap().to_owned(),
                        p["contract"] == true,
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    let k_plans = advised("cus_k").await;
    assert!(
        k_plans.contains(&("team-cus_k".into(), true)),
        "{k_plans:?}"
    );
    assert!(k_plans.contains(&("team".into(), false)), "{k_plans:?}");
    let o_plans = advised("cus_o").await;
    assert!(
        o_plans.iter().all(|(p, c)| p != "team-cus_k" && !c),
        "{o_plans:?}"
    );
    let (s, audit) = sys
        .api(M::GET, "/v1/audit?subject=customer:cus_k", None)
        .await;
    assert_eq!(s, 200, "{audit}");
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "contract.publish" && e["after"]["plan"] == "team-cus_k"),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contracts_embedded() {
    contracts(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contracts_distributed() {
    contracts(Mode::Distributed).await;
}

/// A fee line billed in advance as (description, amount, why).
fn advance_lines(inv: &Value) -> Vec<(String, String, String)> {
    inv["body"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| !l["advance"].is_null())
        .map(|l| {
            (
                l["description"].as_str().unwrap().to_owned(),
                l["amount"].as_str().unwrap().to_owned(),
                l["advance"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A period's span as fee lines write it.
fn span(a: chrono::DateTime<Utc>, b: chrono::DateTime<Utc>) -> String {
    format!("{} – {}", a.format("%Y-%m-%d"), b.format("%Y-%m-%d"))
}

/// Issue 13, item 5 and BILLING-EXAMPLES example 9: fees in advance with
/// an upgrade and a seat decrease mid-period. A subscription to a plan
/// billing its $20 fee in advance gets an opening invoice at once; the
/// boundary invoice carries the closed month's usage and the next month's
/// fee; a switch to a $50 + $10/seat plan with 5 seats and a decrease to
/// 3 seats later refund and charge the rest of the month on the next
/// invoice, beside the following month's fees; a cancellation's refund
/// makes a negative final invoice, carried forward; nothing takes effect
/// before an invoice that billed fees in advance; a plan billing in
/// advance with a minimum is refused; every invoice re-rates exactly.
async fn fees_in_advance(mode: Mode) {
    let sys = System::start(mode, &format!("advance_{mode:?}").to_lowercase()).await;
    let wait = StdDuration::from_secs(90);
    let now = billing_api::wire::to_micros(Utc::now());
    let cur = month_of(now);
    let prev = previous(cur);
    let next = billing_api::invoice::following(cur);
    let day = Duration::days(1);
    let secs = |a: chrono::DateTime<Utc>, b: chrono::DateTime<Utc>| (b - a).num_seconds();

    // Refused: fees in advance with a minimum, named by field.
    let (_, plans) = sys.api(M::GET, "/v1/plans", None).await;
    let mut bad = plans
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["plan"]["plan"] == "payg")
        .unwrap()["plan"]
        .clone();
    bad["plan"] = json!("advbad");
    bad["fee_timing"] = json!("in_advance");
    bad["minimum"] = json!("10");
    let (s, v) = sys.api(M::POST, "/v1/plans", Some(bad)).await;
    assert_eq!(s, 422, "{v}");
    assert!(v.to_string().contains("minimum"), "{v}");

    publish_variant(&sys, "payg", "advpro", |p| {
        p["name"] = json!("Pro");
        p["flat_fee"] = json!("20");
        p["fee_timing"] = json!("in_advance");
    })
    .await;
    publish_variant(&sys, "payg", "advplus", |p| {
        p["name"] = json!("Pro Plus");
        p["flat_fee"] = json!("50");
        p["seat_fee"] = json!("10");
        p["fee_timing"] = json!("in_advance");
    })
    .await;
    let start = prev.start + day * 9;
    sys.customer("cus_adv", "advpro", start).await;
    sys.customer("cus_adv2", "advpro", start).await;

    // The opening invoices, issued when the finalizer runs after the start.
    let issued = start + Duration::hours(1);
    sys.finalize(issued);
    let (s, list) = sys
        .api(M::GET, "/v1/customers/cus_adv/invoices", None)
        .await;
    assert_eq!(s, 200, "{list}");
    let opening = list[0].clone();
    assert_eq!(
        (list.as_array().unwrap().len(), &opening["kind"]),
        (1, &json!("opening")),
        "{list}"
    );
    assert_eq!(instant(&opening["period"]["start"]), start);
    let open_fee = prorated(20, secs(start, prev.end), prev);
    assert_eq!(
        advance_lines(&opening),
        [(
            format!("Pro flat fee, {}", span(start, prev.end)),
            open_fee.clone(),
            "fee".into()
        )],
        "{opening}"
    );
    assert_eq!(opening["total"], json!(open_fee));
    // A second run issues nothing more.
    sys.finalize(issued + Duration::minutes(5));
    let (_, list) = sys
        .api(M::GET, "/v1/customers/cus_adv/invoices", None)
        .await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    // Nothing takes effect before it was issued.
    let (s, v) = sys
        .api(
            M::PUT,
            "/v1/customers/cus_adv/seats",
            Some(json!({"seats": 2, "at": start + Duration::minutes(30)})),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (409, Some("period_finalized")),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains(opening["number"].as_str().unwrap()),
        "{v}"
    );

    // Last month's usage: 1 M requests ($0.40).
    let (s, v) = sys
        .ingest(&[requests("adv-1", "cus_adv", "web", start + day, 1_000_000)])
        .await;
    assert_eq!(s, 200, "{v}");
    sys.eventually("cus_adv's usage", wait, || async {
        let (_, d) = sys
            .api(
                M::GET,
                &format!(
                    "/v1/customers/cus_adv/invoices/draft?period={}",
                    billing_api::invoice::month_label(prev)
                ),
                None,
            )
            .await;
        if usage_lines(&d, "requests").is_empty() {
            Err(format!("no requests line yet: {d}"))
        } else {
            Ok(())
        }
    })
    .await;

    // The boundary invoice: last month's usage and this month's fee.
    sys.finalize(cur.start);
    let b = invoice_of(&sys, "cus_adv", prev).await;
    assert_eq!(usage_lines(&b, "requests").len(), 1, "{b}");
    assert_eq!(
        lines_of(&b, "flat_fee"),
        [(
            format!("Pro flat fee, {}", span(cur.start, cur.end)),
            "20.00".into(),
            None
        )],
        "{b}"
    );
    assert_eq!(b["total"], json!("20.40"), "{b}");

    // The upgrade on day 15 with 5 seats; 3 seats from day 20.
    let (sw, fewer) = (cur.start + day * 15, cur.start + day * 20);
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_adv/plan-switch",
            Some(json!({"plan": "advplus", "at": sw})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    for (n, at) in [(5, sw), (3, fewer)] {
        let (s, v) = sys
            .api(
                M::PUT,
                "/v1/customers/cus_adv/seats",
                Some(json!({"seats": n, "at": at})),
            )
            .await;
        assert_eq!(s, 204, "{v}");
    }
    // The draft shows what the invoice will bill.
    let d = draft(&sys, "cus_adv").await;
    assert!(advance_lines(&d).iter().any(|l| l.2 == "charge"), "{d}");

    // cus_adv2 cancels on day 2: its final invoice refunds the rest.
    let c = cur.start + day * 2;
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_adv2/cancellation",
            Some(json!({"at": c})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    sys.finalize(c.max(now));
    let f = invoice_of(&sys, "cus_adv2", cur).await;
    let refund = format!("-{}", prorated(20, secs(c, cur.end), cur));
    assert_eq!(
        advance_lines(&f),
        [(
            format!("Refund of Pro flat fee, {}", span(c, cur.end)),
            refund.clone(),
            "credit".into()
        )],
        "{f}"
    );
    assert_eq!(
        (&f["total"], &f["sync_status"]),
        (&json!(refund), &json!("carried_forward")),
        "{f}"
    );

    // This month's invoice, at its end.
    sys.finalize(cur.end);
    let inv = invoice_of(&sys, "cus_adv", cur).await;
    let (rest_sw, rest_few) = (secs(sw, cur.end), secs(fewer, cur.end));
    let want = vec![
        (
            format!("Refund of Pro flat fee, {}", span(sw, cur.end)),
            format!("-{}", prorated(20, rest_sw, cur)),
            "credit".to_string(),
        ),
        (
            format!("Pro Plus flat fee, {}", span(sw, cur.end)),
            prorated(50, rest_sw, cur),
            "charge".into(),
        ),
        (
            format!("Pro Plus seats, {}", span(sw, cur.end)),
            prorated(50, rest_sw, cur),
            "charge".into(),
        ),
        (
            format!("Refund of Pro Plus seats, {}", span(fewer, cur.end)),
            format!("-{}", prorated(50, rest_few, cur)),
            "credit".into(),
        ),
        (
            format!("Pro Plus seats, {}", span(fewer, cur.end)),
            prorated(30, rest_few, cur),
            "charge".into(),
        ),
        (
            format!("Pro Plus flat fee, {}", span(next.start, next.end)),
            "50.00".into(),
            "fee".into(),
        ),
        (
            format!("Pro Plus seats, {}", span(next.start, next.end)),
            "30.00".into(),
            "fee".into(),
        ),
    ];
    assert_eq!(advance_lines(&inv), want, "{inv}");
    let sum: Decimal = want.iter().map(|l| Decimal::from_str(&l.1).unwrap()).sum();
    assert_eq!(dec(&inv["total"]), sum, "{inv}");

    // Every invoice re-rates exactly, fees in advance included.
    assert_rerated(&sys, &["cus_adv", "cus_adv2"]).await;
}

/// Every invoice of `customers` re-rated from raw events reproduces it,
/// line by line (fees in advance derived again from the plan history).
async fn assert_rerated(sys: &System, customers: &[&str]) {
    let mut n = 0;
    for c in customers {
        let (s, list) = sys
            .api(M::GET, &format!("/v1/customers/{c}/invoices"), None)
            .await;
        assert_eq!(s, 200, "{list}");
        for i in list.as_array().unwrap() {
            let id = i["id"].as_str().unwrap();
            let (s, r) = sys
                .api(M::GET, &format!("/v1/invoices/{id}/rerate"), None)
                .await;
            assert_eq!((s, &r["reproduces"]), (200, &json!(true)), "{id}: {r}");
            n += 1;
        }
    }
    assert!(n > 0, "no invoice of {customers:?} to re-rate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fees_in_advance_embedded() {
    fees_in_advance(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fees_in_advance_distributed() {
    fees_in_advance(Mode::Distributed).await;
}

/// The invoices of `customer` by period start: (kind, total, discount,
/// tax, credit, amount due, sync status) of each.
async fn invoice_at(sys: &System, customer: &str, start: chrono::DateTime<Utc>) -> Value {
    let (s, list) = sys
        .api(M::GET, &format!("/v1/customers/{customer}/invoices"), None)
        .await;
    assert_eq!(s, 200, "{list}");
    list.as_array()
        .unwrap()
        .iter()
        .find(|i| i["kind"] == "period" && instant(&i["period"]["start"]) == start)
        .unwrap_or_else(|| panic!("{customer}: no invoice of {start}: {list}"))
        .clone()
}

fn steps(inv: &Value) -> [String; 5] {
    [
        "total",
        "discount_total",
        "tax_total",
        "credit_total",
        "amount_due",
    ]
    .map(|k| {
        let mut x = dec(&inv[k]);
        x.rescale(2);
        x.to_string()
    })
}

async fn grant(sys: &System, customer: &str, body: Value, key: Option<&str>) -> (u16, Value) {
    let headers: Vec<(&str, &str)> = key.map(|k| ("idempotency-key", k)).into_iter().collect();
    sys.api_with(
        M::POST,
        &format!("/v1/customers/{customer}/credit-grants"),
        Some(body),
        &headers,
    )
    .await
}

/// Issue 14: credits, coupons and taxes through the public API in both
/// modes: promotional credit on signup used up over two months (drafts
/// showing what would be consumed); a top-up grant usable once paid, then
/// consumed; a grant expiring mid-period paying nothing and expiring in the
/// ledger; a coupon for 3 periods; tax exclusive, inclusive, exempt and
/// reverse charge; a free-tier customer ($0 cap) allowed by its credit and
/// stopped by the cap once the credit is spent; bad input refused by field
/// with nothing written; every invoice re-rated reproduces every step.
async fn credits_coupons_taxes(mode: Mode) {
    let sys = System::start(mode, &format!("credits_{mode:?}").to_lowercase()).await;
    let wait = StdDuration::from_secs(90);
    let now = billing_api::wire::to_micros(Utc::now());
    let cur = month_of(now);
    let prev = previous(cur);
    let next = billing_api::invoice::following(cur);
    let next2 = billing_api::invoice::following(next);
    let day = Duration::days(1);
    let in_cur = cur.start + (now - cur.start) / 2;

    publish_variant(&sys, "payg", "cflat", |p| p["flat_fee"] = json!("10")).await;
    publish_variant(&sys, "free", "freecr", |p| {
        p.as_object_mut().unwrap().remove("maximum");
        p["limits"]["max_volume_gb"] = json!("1000000");
    })
    .await;
    for c in ["cus_promo", "cus_top", "cus_exp"] {
        sys.customer(c, "payg", prev.start).await;
    }
    for c in ["cus_cp", "cus_de", "cus_at", "cus_ex", "cus_rc"] {
        sys.customer(c, "cflat", prev.start).await;
    }
    sys.customer("cus_free", "freecr", prev.start).await;

    // Grants. Bad input first: refused by field, nothing written.
    let ok = json!({"kind": "promotional", "amount": "5.00", "effective_at": prev.start, "reason": "signup"});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    for (body, field) in [
        (with("amount", json!("0")), "amount"),
        (with("amount", json!("1.001")), "amount"),
        (with("amount", json!(5)), "decimal string"),
        (with("kind", json!("gift")), "kind"),
        (with("currency", json!("usd")), "currency"),
        (with("expires_at", json!(prev.start)), "expires_at"),
        (with("priority", json!(5000)), "priority"),
        (with("top_up", json!(true)), "top_up"),
        (with("colour", json!("red")), "colour"),
    ] {
        let (s, v) = grant(&sys, "cus_promo", body, None).await;
        assert!((400..500).contains(&s), "{field}: {s} {v}");
        assert!(
            v["message"].as_str().unwrap().contains(field),
            "{field}: {v}"
        );
    }
    let (s, v) = grant(&sys, "cus_nobody", ok.clone(), None).await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = sys
        .api(M::GET, "/v1/customers/cus_promo/credit-grants", None)
        .await;
    assert_eq!((s, v.as_array().unwrap().len()), (200, 0), "{v}");
    // Granted once under its key; the same request answers the first
    // grant, another body under the key is a conflict.
    let (s, promo) = grant(&sys, "cus_promo", ok.clone(), Some("signup-promo")).await;
    assert_eq!(s, 201, "{promo}");
    let (s, again) = grant(&sys, "cus_promo", ok.clone(), Some("signup-promo")).await;
    assert_eq!((s, &again["id"]), (200, &promo["id"]), "{again}");
    let (s, v) = grant(
        &sys,
        "cus_promo",
        with("amount", json!("6.00")),
        Some("signup-promo"),
    )
    .await;
    assert_eq!((s, &v["code"]), (409, &json!("conflict")), "{v}");
    let (s, top) = grant(
        &sys,
        "cus_top",
        json!({"kind": "purchased", "amount": "3.00", "effective_at": prev.start, "top_up": true}),
        None,
    )
    .await;
    assert_eq!((s, &top["usable"]), (201, &json!(false)), "{top}");
    let (s, v) = grant(
        &sys,
        "cus_exp",
        with("expires_at", json!(prev.start + day * 10)),
        None,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = grant(&sys, "cus_free", ok.clone(), None).await;
    assert_eq!(s, 201, "{v}");

    // Coupons: refused by field; a 10 % coupon for 3 periods.
    let coupon = json!({"id": "three", "name": "Three months", "percent_off": "10", "duration": "repeating", "periods": 3});
    let cwith = |k: &str, v: Value| {
        let mut b = coupon.clone();
        b[k] = v;
        b
    };
    for (body, field) in [
        (cwith("percent_off", json!("150")), "percent_off"),
        (cwith("periods", Value::Null), "periods"),
        (
            cwith("applies_to", json!({"meters": ["nope"]})),
            "applies_to.meters",
        ),
        (cwith("amount_off", json!("1.00")), "amount_off"),
    ] {
        let (s, v) = sys.api(M::POST, "/v1/coupons", Some(body)).await;
        assert_eq!(s, 422, "{field}: {v}");
        assert!(
            v["message"].as_str().unwrap().contains(field),
            "{field}: {v}"
        );
    }
    let (s, v) = sys.api(M::POST, "/v1/coupons", Some(coupon)).await;
    assert_eq!((s, &v["version"]), (201, &json!(1)), "{v}");
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/customers/cus_cp/coupons",
            Some(json!({"coupon": "nope"})),
        )
        .await;
    assert_eq!(s, 404, "{v}");
    let (s, applied) = sys
        .api(
            M::POST,
            "/v1/customers/cus_cp/coupons",
            Some(json!({"coupon": "three", "applied_at": prev.start})),
        )
        .await;
    assert_eq!(s, 201, "{applied}");
    assert_eq!(instant(&applied["ends_at"]), next.end, "{applied}");

    // Taxes: refused by field; DE 19 % exclusive, AT 20 % inclusive.
    let rate = json!({"id": "de_vat", "name": "VAT", "country": "DE", "percentage": "19"});
    for (k, v, field) in [
        ("country", json!("de"), "country"),
        ("percentage", json!("150"), "percentage"),
    ] {
        let mut b = rate.clone();
        b[k] = v;
        let (s, v) = sys.api(M::POST, "/v1/tax-rates", Some(b)).await;
        assert_eq!(s, 422, "{v}");
        assert!(v["message"].as_str().unwrap().contains(field), "{v}");
    }
    let (s, v) = sys.api(M::POST, "/v1/tax-rates", Some(rate.clone())).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = sys.api(M::POST, "/v1/tax-rates", Some(rate)).await;
    assert_eq!(s, 409, "{v}");
    let (s, v) = sys
        .api(
            M::POST,
            "/v1/tax-rates",
            Some(json!({"id": "at_vat", "name": "USt", "country": "AT", "percentage": "20", "inclusive": true})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    for (c, profile) in [
        ("cus_de", json!({"country": "DE"})),
        ("cus_at", json!({"country": "AT"})),
        ("cus_ex", json!({"country": "DE", "exempt": true})),
        (
            "cus_rc",
            json!({"country": "DE", "reverse_charge": true, "tax_id": "DE123456789"}),
        ),
    ] {
        let (s, v) = sys
            .api(
                M::PUT,
                &format!("/v1/customers/{c}/tax-profile"),
                Some(profile),
            )
            .await;
        assert_eq!(s, 200, "{c}: {v}");
    }
    let (s, v) = sys
        .api(
            M::PUT,
            "/v1/customers/cus_cp/tax-profile",
            Some(json!({"country": "DE", "reverse_charge": true})),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(v["message"].as_str().unwrap().contains("tax_id"), "{v}");

    // Usage last month: $4.00 each for promo, top and exp (exp's after
    // its grant expired), $5.00 past the free million for the free tier.
    let last = prev.start + day * 12;
    let (s, v) = sys
        .ingest(&[
            requests("p-1", "cus_promo", "web", last, 10_000_000),
            requests("t-1", "cus_top", "web", last, 10_000_000),
            requests("e-1", "cus_exp", "web", last, 10_000_000),
            requests("f-1", "cus_free", "web", last, 13_500_000),
        ])
        .await;
    assert_eq!(s, 200, "{v}");
    let prev_q = format!("?period={}", billing_api::invoice::month_label(prev));
    sys.eventually("last month's usage", wait, || async {
        let d = sys
            .api(
                M::GET,
                &format!("/v1/customers/cus_free/invoices/draft{prev_q}"),
                None,
            )
            .await
            .1;
        if d["subtotal"] == json!("5.00") {
            Ok(())
        } else {
            Err(format!("{d}"))
        }
    })
    .await;
    // The draft shows the credit it would consume.
    let (_, d) = sys
        .api(
            M::GET,
            &format!("/v1/customers/cus_promo/invoices/draft{prev_q}"),
            None,
        )
        .await;
    assert_eq!(steps(&d), ["4.00", "0.00", "0.00", "-4.00", "0.00"], "{d}");

    // The free tier: a $0 cap, $5 of credit. A volume costing about $3
    // for the rest of the month is allowed, counting the credit.
    let left = (cur.end - Utc::now()).num_seconds().max(1);
    let gb = (16 * 2_592_000 + left - 1) / left;
    let ask = json!({"customer_id": "cus_free", "ask": {"kind": "grow_volume", "app": "web", "volume_id": "vol-1", "size_gb": gb.to_string()}});
    let (s, q) = sys.api(M::POST, "/v1/quota/check", Some(ask.clone())).await;
    assert_eq!(s, 200, "{q}");
    assert_eq!(
        (&q["allow"], dec(&q["credit"])),
        (&json!(true), Decimal::new(500, 2)),
        "{q}"
    );
    let cost = dec(&q["projected_usage_cost"]);
    assert!(cost > Decimal::ZERO && cost <= Decimal::from(5), "{q}");

    // November is invoiced.
    sys.finalize(cur.start);
    let inv = invoice_at(&sys, "cus_promo", prev.start).await;
    assert_eq!(
        steps(&inv),
        ["4.00", "0.00", "0.00", "-4.00", "0.00"],
        "{inv}"
    );
    assert_eq!(inv["sync_status"], "nothing_due", "{inv}");
    for (c, want) in [
        ("cus_top", ["4.00", "0.00", "0.00", "0.00", "4.00"]),
        ("cus_exp", ["4.00", "0.00", "0.00", "0.00", "4.00"]),
        ("cus_free", ["5.00", "0.00", "0.00", "-5.00", "0.00"]),
        ("cus_cp", ["9.00", "-1.00", "0.00", "0.00", "9.00"]),
        ("cus_de", ["11.90", "0.00", "1.90", "0.00", "11.90"]),
        ("cus_at", ["10.00", "0.00", "0.00", "0.00", "10.00"]),
    ] {
        let inv = invoice_at(&sys, c, prev.start).await;
        assert_eq!(steps(&inv), want, "{c}: {inv}");
    }
    let inv = invoice_at(&sys, "cus_at", prev.start).await;
    let at_tax = &inv["body"]["settlement"]["taxes"][0];
    assert_eq!(
        (&at_tax["amount"], &at_tax["inclusive"]),
        (&json!("1.67"), &json!(true)),
        "{inv}"
    );
    for (c, treatment) in [("cus_ex", "exempt"), ("cus_rc", "reverse_charge")] {
        let inv = invoice_at(&sys, c, prev.start).await;
        assert_eq!(
            steps(&inv),
            ["10.00", "0.00", "0.00", "0.00", "10.00"],
            "{inv}"
        );
        let s = &inv["body"]["settlement"];
        assert_eq!(
            (&s["treatment"], s["taxes"].as_array().unwrap().len()),
            (&json!(treatment), 0),
            "{inv}"
        );
    }
    // The expired grant: its remainder expired in the ledger at its expiry.
    let (_, ledger) = sys
        .api(M::GET, "/v1/customers/cus_exp/credit-ledger", None)
        .await;
    let kinds: Vec<(String, String)> = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_owned(),
                e["amount"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("grant".into(), "5.00".into()),
            ("expiry".into(), "-5.00".into())
        ],
        "{ledger}"
    );
    assert_eq!(instant(&ledger["entries"][1]["at"]), prev.start + day * 10);

    // The free tier's credit is spent: the same volume is now over the cap.
    sys.eventually("the cap without credit", wait, || async {
        let q = sys
            .api(M::POST, "/v1/quota/check", Some(ask.clone()))
            .await
            .1;
        if q["allow"] == json!(false) {
            Ok(q)
        } else {
            Err(format!("{q}"))
        }
    })
    .await;
    let q = sys
        .api(M::POST, "/v1/quota/check", Some(ask.clone()))
        .await
        .1;
    assert_eq!(
        (&q["reason"], dec(&q["credit"])),
        (&json!("spending_cap"), Decimal::ZERO),
        "{q}"
    );

    // The top-up is paid; this month's usage: $2.00 each.
    let (s, v) = sys
        .api(
            M::POST,
            &format!(
                "/v1/customers/cus_top/credit-grants/{}/paid",
                top["id"].as_str().unwrap()
            ),
            None,
        )
        .await;
    assert_eq!((s, &v["usable"]), (200, &json!(true)), "{v}");
    // Its top-up invoice, numbered with the others, is paid.
    let (_, list) = sys
        .api(M::GET, "/v1/customers/cus_top/invoices", None)
        .await;
    let bill = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["kind"] == "top_up")
        .unwrap_or_else(|| panic!("no top-up invoice: {list}"));
    assert_eq!(
        (&bill["amount_due"], &bill["payment_status"], &bill["id"]),
        (&json!("3.00"), &json!("paid"), &v["invoice_id"]),
        "{bill}"
    );
    let (s, v) = sys
        .ingest(&[
            requests("p-2", "cus_promo", "web", in_cur, 5_000_000),
            requests("t-2", "cus_top", "web", in_cur, 5_000_000),
        ])
        .await;
    assert_eq!(s, 200, "{v}");
    let d = sys
        .eventually("this month's usage", wait, || async {
            let d = draft(&sys, "cus_promo").await;
            if d["subtotal"] == json!("2.00") {
                Ok(d)
            } else {
                Err(format!("{d}"))
            }
        })
        .await;
    // The $1.00 left of the promotional credit.
    assert_eq!(steps(&d), ["2.00", "0.00", "0.00", "-1.00", "1.00"], "{d}");
    sys.finalize(cur.end);
    let inv = invoice_at(&sys, "cus_promo", cur.start).await;
    assert_eq!(
        steps(&inv),
        ["2.00", "0.00", "0.00", "-1.00", "1.00"],
        "{inv}"
    );
    assert_eq!(inv["sync_status"], "pending", "{inv}");
    let inv = invoice_at(&sys, "cus_top", cur.start).await;
    assert_eq!(
        steps(&inv),
        ["2.00", "0.00", "0.00", "-2.00", "0.00"],
        "{inv}"
    );
    let (_, ledger) = sys
        .api(M::GET, "/v1/customers/cus_promo/credit-ledger", None)
        .await;
    assert_eq!(dec(&ledger["balances"]["USD"]), Decimal::ZERO, "{ledger}");
    let consumed: Vec<&str> = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "consumption")
        .map(|e| e["amount"].as_str().unwrap())
        .collect();
    assert_eq!(consumed, ["-4.00", "-1.00"], "{ledger}");

    // The coupon's three periods: last month, this one and the next; not
    // the one after.
    sys.finalize(next.end);
    sys.finalize(next2.end);
    for (p, want) in [(cur, "-1.00"), (next, "-1.00"), (next2, "0.00")] {
        let inv = invoice_at(&sys, "cus_cp", p.start).await;
        assert_eq!(steps(&inv)[1], want, "{inv}");
    }
    let (_, list) = sys.api(M::GET, "/v1/customers/cus_cp/coupons", None).await;
    assert_eq!(list[0]["redeemed"], json!(3), "{list}");

    // Re-rating reproduces every step of every invoice.
    assert_rerated(
        &sys,
        &[
            "cus_promo",
            "cus_top",
            "cus_exp",
            "cus_cp",
            "cus_de",
            "cus_at",
            "cus_ex",
            "cus_rc",
            "cus_free",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_coupons_taxes_embedded() {
    credits_coupons_taxes(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_coupons_taxes_distributed() {
    credits_coupons_taxes(Mode::Distributed).await;
}
