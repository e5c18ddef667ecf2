//! Issue 11 item 15: every amount the billing API answers with has the
//! currency's digits ("299.00", "0.00"; never "299", "0"), and every
//! instant it answers with has the stored precision (microseconds).

use testkit::billing as support;

use chrono::{DateTime, Utc};
use reqwest::Method as M;
use serde_json::{json, Value};
use support::*;

/// A JSON amount, as the string the API wrote.
fn amount(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("{v} is not a decimal string"))
}

/// Asserts `v` is an amount with exactly two decimals.
#[track_caller]
fn cents(v: &Value, what: &str) {
    let a = amount(v);
    let (_, frac) = a
        .split_once('.')
        .unwrap_or_else(|| panic!("{what} = {a:?} has no cents"));
    assert_eq!(frac.len(), 2, "{what} = {a:?}");
}

/// Digits after the seconds of an RFC 3339 instant.
fn fraction_digits(t: &str) -> usize {
    let secs = t.find('.').map_or(0, |dot| {
        t[dot + 1..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .count()
    });
    assert!(t.parse::<DateTime<Utc>>().is_ok(), "{t}");
    secs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amounts_have_the_currency_digits_and_instants_the_stored_precision() {
    let api = Api::start("moneydigits").await;
    let start = billing_api::invoice::month_of(Utc::now()).start;
    for (id, plan) in [("cus_biz", "business"), ("cus_free", "free")] {
        let c = json!({"id": id, "external_id": id, "name": id});
        assert_eq!(api.call(M::POST, "/v1/customers", Some(c)).await.0, 201);
        let (s, v) = api
            .call(
                M::POST,
                &format!("/v1/customers/{id}/subscription"),
                Some(json!({"plan": plan, "starts_at": start})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }
    // A cap set as a whole number is answered with cents.
    let (s, v) = api
        .call(
            M::PUT,
            "/v1/customers/cus_biz/spending-cap",
            Some(json!({"spending_cap": "5000"})),
        )
        .await;
    assert_eq!(s, 204, "{v}");

    // The draft: a whole month of the $299 flat fee, nothing else.
    let (s, d) = api
        .call(M::GET, "/v1/customers/cus_biz/invoices/draft", None)
        .await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["body"]["lines"][0]["amount"], "299.00", "{d}");
    assert_eq!(d["subtotal"], "299.00", "{d}");
    assert_eq!(d["adjustments_total"], "0.00", "{d}");
    assert_eq!(d["carried_in"], "0.00", "{d}");
    assert_eq!(d["total"], "299.00", "{d}");
    // The free plan's draft has no lines at all.
    let (s, d) = api
        .call(M::GET, "/v1/customers/cus_free/invoices/draft", None)
        .await;
    assert_eq!(s, 200, "{d}");
    for f in ["subtotal", "adjustments_total", "carried_in", "total"] {
        assert_eq!(d[f], "0.00", "{f}: {d}");
    }

    // The cost report.
    let (s, r) = api.call(M::GET, "/v1/customers/cus_biz/costs", None).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["month_to_date"], "299.00", "{r}");
    assert_eq!(r["fees"], "299.00", "{r}");
    assert_eq!(r["usage"], "0.00", "{r}");
    assert_eq!(r["plan_adjustments"], "0.00", "{r}");
    assert_eq!(r["spending_cap"], "5000.00", "{r}");
    assert_eq!(r["own_spending_cap"], "5000.00", "{r}");
    cents(&r["forecast"], "forecast");
    for d in r["daily"].as_array().unwrap() {
        cents(&d["amount"], "daily amount");
    }
    let (s, r) = api.call(M::GET, "/v1/customers/cus_free/costs", None).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(
        r["spending_cap"], "0.00",
        "the free plan's default cap: {r}"
    );
    assert_eq!(r["month_to_date"], "0.00", "{r}");
    assert!(fraction_digits(r["as_of"].as_str().unwrap()) <= 6, "{r}");

    // The advisor.
    let (s, a) = api
        .call(M::GET, "/v1/customers/cus_biz/plan-advisor", None)
        .await;
    assert_eq!(s, 200, "{a}");
    cents(&a["forecast"], "advisor forecast");
    for p in a["plans"].as_array().unwrap() {
        for f in ["month_to_date", "forecast", "saving"] {
            cents(&p[f], &format!("{} {f}", p["plan"]));
        }
    }

    // A quota decision.
    api.quota.refresh(Utc::now()).await.unwrap();
    let (s, q) = api
        .call(
            M::POST,
            "/v1/quota/check",
            Some(
                json!({"customer_id": "cus_biz", "ask": {"kind": "start_instances",
                "app": "web", "instance_type": "t4g.nano", "count": 1}}),
            ),
        )
        .await;
    assert_eq!(s, 200, "{q}");
    assert_eq!(q["allow"], true, "{q}");
    assert_eq!(q["month_to_date"], "299.00", "{q}");
    assert_eq!(q["spending_cap"], "5000.00", "{q}");
    cents(&q["projected_month_end"], "projected_month_end");
    cents(&q["projected_usage_cost"], "projected_usage_cost");

    // Instants: a `now` switch answers the instant it stored, in
    // microseconds at most; the preview's rating has cents too.
    let (s, pv) = api
        .call(
            M::POST,
            "/v1/customers/cus_biz/plan-switch/preview",
            Some(json!({"plan": "payg", "effective": "now"})),
        )
        .await;
    assert_eq!(s, 200, "{pv}");
    cents(&pv["difference"], "preview difference");
    cents(&pv["with_switch"]["total"], "preview total");
    let (s, sw) = api
        .call(
            M::POST,
            "/v1/customers/cus_biz/plan-switch",
            Some(json!({"plan": "payg", "effective": "now"})),
        )
        .await;
    assert_eq!(s, 200, "{sw}");
    let at = sw["effective_at"].as_str().unwrap().to_owned();
    assert!(fraction_digits(&at) <= 6, "{at}");
    let (s, sub) = api
        .call(M::GET, "/v1/customers/cus_biz/subscription", None)
        .await;
    assert_eq!(s, 200, "{sub}");
    let stored: DateTime<Utc> = sub["current"]["start"]
        .as_str()
        .unwrap_or_else(|| panic!("{sub}"))
        .parse()
        .unwrap();
    assert_eq!(stored, at.parse::<DateTime<Utc>>().unwrap(), "{sub}");

    // A subscription without `starts_at` starts now, at the same precision.
    let c = json!({"id": "cus_new", "external_id": "cus_new", "name": "N"});
    assert_eq!(api.call(M::POST, "/v1/customers", Some(c)).await.0, 201);
    let (s, v) = api
        .call(
            M::POST,
            "/v1/customers/cus_new/subscription",
            Some(json!({"plan": "payg"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert!(
        fraction_digits(v["effective_at"].as_str().unwrap()) <= 6,
        "{v}"
    );
}
