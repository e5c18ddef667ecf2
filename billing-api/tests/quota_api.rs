//! Quota checks over HTTP, answered from memory: tier limits from what ran
//! in the last hour, instance types, the spending cap set by the customer,
//! suspension and plan switches reflected at once, the snapshot with
//! versions, and bad input.

use testkit::billing as support;

use chrono::{Duration, DurationRound, Utc};
use reqwest::Method as M;
use serde_json::{json, Value};
use support::*;

/// A new customer `id` subscribed to `plan` from `from`.
async fn subscribed(api: &Api, id: &str, plan: &str, from: chrono::DateTime<Utc>) {
    let (s, _) = api
        .call(
            M::POST,
            "/v1/customers",
            Some(json!({"id": id, "external_id": id, "name": id})),
        )
        .await;
    assert_eq!(s, 201);
    let (s, v) = api
        .call(
            M::POST,
            &format!("/v1/customers/{id}/subscription"),
            Some(json!({"plan": plan, "starts_at": from})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
}

/// A new control-plane key.
async fn control_plane_key(api: &Api) -> String {
    let (_, k) = api
        .call(
            M::POST,
            "/v1/keys",
            Some(json!({"role": "control-plane", "label": "deploy"})),
        )
        .await;
    k["key"].as_str().unwrap().to_owned()
}

fn start(customer: &str, app: &str, ty: &str, n: u32) -> Value {
    json!({"customer_id": customer, "ask": {"kind": "start_instances", "app": app, "instance_type": ty, "count": n}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_checks_from_memory_follow_changes_at_once() {
    let api = Api::start("quota").await;
    let now = Utc::now();
    let period_start = billing_api::invoice::month_of(now).start;
    let last_hour = now.duration_trunc(Duration::hours(1)).unwrap() - Duration::hours(1);
    // What ran in the last complete hour.
    Writer::new(api.usage.clone())
        .write(&[
            (
                "f1".into(),
                "cus_f",
                last_hour + Duration::minutes(5),
                "tally.compute",
                compute("web", "t4g.nano", 3600),
            ),
            (
                "p1".into(),
                "cus_p",
                last_hour + Duration::minutes(5),
                "tally.compute",
                compute("web", "t4g.small", 7200),
            ),
        ])
        .await;
    for (id, plan) in [("cus_f", "free"), ("cus_p", "payg")] {
        subscribed(&api, id, plan, period_start).await;
    }
    assert_eq!(api.quota.refresh(Utc::now()).await.unwrap(), 2);
    let cp = control_plane_key(&api).await;
    let check = |body: Value| {
        let (api, cp) = (&api, cp.clone());
        async move {
            api.call_as(&cp, M::POST, "/v1/quota/check", Some(body))
                .await
        }
    };

    // Free tier: one instance per app, t4g.nano only.
    let (s, d) = check(start("cus_f", "web", "t4g.nano", 1)).await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(
        (d["allow"].clone(), d["reason"].clone()),
        (json!(false), json!("tier_limit")),
        "{d}"
    );
    assert_eq!(
        (d["limit"].clone(), d["current"].clone()),
        (json!("1"), json!("1")),
        "{d}"
    );
    assert_eq!(d["plan"], "free");
    let (_, d) = check(start("cus_f", "api", "c6g.large", 1)).await;
    assert_eq!(d["reason"], "instance_type_not_in_tier", "{d}");

    // Pay-as-you-go: allowed; then the customer caps spending at $0.01.
    let (_, d) = check(start("cus_p", "web", "t4g.small", 1)).await;
    assert_eq!(d["allow"], true, "{d}");
    let (_, sess) = api
        .call(M::POST, "/v1/customers/cus_p/sessions", Some(json!({})))
        .await;
    let token = sess["token"].as_str().unwrap().to_owned();
    let (s, _) = api
        .call_as(
            &token,
            M::PUT,
            "/v1/customers/cus_p/spending-cap",
            Some(json!({"spending_cap": "0.01"})),
        )
        .await;
    assert_eq!(s, 204);
    let (_, d) = check(start("cus_p", "web", "t4g.small", 1)).await;
    assert_eq!(
        (d["allow"].clone(), d["reason"].clone()),
        (json!(false), json!("spending_cap")),
        "{d}"
    );
    assert_eq!(d["limit"], "0.01");
    let (s, _) = api
        .call_as(
            &token,
            M::PUT,
            "/v1/customers/cus_p/spending-cap",
            Some(json!({"spending_cap": null})),
        )
        .await;
    assert_eq!(s, 204);
    assert_eq!(
        check(start("cus_p", "web", "t4g.small", 1)).await.1["allow"],
        true
    );

    // Suspension, then a plan switch, apply at once.
    api.call(
        M::PUT,
        "/v1/customers/cus_p/suspension",
        Some(json!({"suspended": true})),
    )
    .await;
    assert_eq!(
        check(start("cus_p", "web", "t4g.small", 1)).await.1["reason"],
        "account_suspended"
    );
    api.call(
        M::PUT,
        "/v1/customers/cus_p/suspension",
        Some(json!({"suspended": false})),
    )
    .await;
    assert_eq!(
        check(start("cus_p", "web", "t4g.small", 1)).await.1["allow"],
        true
    );
    let (_, snap) = api.call_as(&cp, M::GET, "/v1/quota/snapshot", None).await;
    let v0 = snap["version"].as_u64().unwrap();
    assert_eq!(snap["customers"].as_array().unwrap().len(), 2, "{snap}");
    let (s, sw) = api
        .call(
            M::POST,
            "/v1/customers/cus_p/plan-switch",
            Some(json!({"plan": "free"})),
        )
        .await;
    assert_eq!(s, 200, "{sw}");
    let (_, d) = check(start("cus_p", "web", "t4g.small", 1)).await;
    assert_eq!(
        (d["plan"].clone(), d["reason"].clone()),
        (json!("free"), json!("instance_type_not_in_tier")),
        "{d}"
    );

    // The snapshot since v0 holds only what changed.
    let (_, snap) = api
        .call_as(&cp, M::GET, &format!("/v1/quota/snapshot?since={v0}"), None)
        .await;
    let changed: Vec<&str> = snap["customers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["customer_id"].as_str().unwrap())
        .collect();
    assert_eq!(changed, ["cus_p"], "{snap}");
    assert_eq!(snap["customers"][0]["limits"]["max_instances_per_app"], 1);
    let v1 = snap["version"].as_u64().unwrap();
    assert!(v1 > v0);
    let (_, snap) = api
        .call_as(&cp, M::GET, &format!("/v1/quota/snapshot?since={v1}"), None)
        .await;
    assert_eq!(snap["customers"], json!([]));

    // Refused: a customer credential, an unknown customer, bad asks.
    let (s, _) = api
        .call_as(
            &token,
            M::POST,
            "/v1/quota/check",
            Some(start("cus_p", "web", "t4g.nano", 1)),
        )
        .await;
    assert_eq!(s, 403);
    let (s, e) = check(start("cus_nobody", "web", "t4g.nano", 1)).await;
    assert_eq!((s.as_u16(), e["code"].as_str()), (404, Some("not_found")));
    for bad in [
        json!({"customer_id": "cus_f", "ask": {"kind": "fly", "app": "web"}}),
        json!({"customer_id": "cus_f", "ask": {"kind": "grow_volume", "app": "web", "volume_id": "v", "size_gb": "-1"}}),
        json!({"customer_id": "cus_f", "ask": {"kind": "start_instances", "app": "web", "instance_type": "t4g.nano", "count": -1}}),
    ] {
        let (s, e) = check(bad.clone()).await;
        assert_eq!(s.as_u16(), 422, "{bad} → {e}");
    }
    let m = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains(
            "tally_billing_quota_decisions_total{decision=\"deny\",reason=\"tier_limit\"} 1"
        ),
        "{m}"
    );
}

/// After a switch inside the period, the quota check's month to date is
/// the draft's total: the usage before the switch is rated on the plan it
/// was used on, and the new plan's fees from the switch on (issue 12; the
/// check used to rate the whole month's usage on the new plan).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_switch_the_month_to_date_is_the_drafts_total() {
    let api = Api::start("quota_switch").await;
    let now = Utc::now();
    let period_start = billing_api::invoice::month_of(now).start;
    let last_hour = now.duration_trunc(Duration::hours(1)).unwrap() - Duration::hours(1);
    subscribed(&api, "cus_s", "payg", period_start).await;
    // 10 M requests on pay-as-you-go ($4.00); on the business plan they
    // would be inside its free 50 M.
    Writer::new(api.usage.clone())
        .write(&[(
            "s1".into(),
            "cus_s",
            last_hour.max(period_start) + Duration::minutes(5),
            "tally.requests",
            requests("web", 10_000_000),
        )])
        .await;
    let (s, sw) = api
        .call(
            M::POST,
            "/v1/customers/cus_s/plan-switch",
            Some(json!({"plan": "business"})),
        )
        .await;
    assert_eq!(s, 200, "{sw}");
    let cp = control_plane_key(&api).await;
    let (s, d) = api
        .call_as(
            &cp,
            M::POST,
            "/v1/quota/check",
            Some(start("cus_s", "web", "t4g.nano", 1)),
        )
        .await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["plan"], "business", "{d}");
    let (s, draft) = api
        .call(M::GET, "/v1/customers/cus_s/invoices/draft", None)
        .await;
    assert_eq!(s, 200, "{draft}");
    let lines = draft["body"]["lines"].as_array().unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l["kind"] == "usage" && l["amount"] == "4.00"),
        "the requests are rated on pay-as-you-go: {draft}"
    );
    assert_eq!(
        d["month_to_date"], draft["total"],
        "check {d}\ndraft {draft}"
    );
    // A full refresh builds the same entry as the reload after the switch.
    api.quota.refresh(Utc::now()).await.unwrap();
    let (_, again) = api
        .call_as(
            &cp,
            M::POST,
            "/v1/quota/check",
            Some(start("cus_s", "web", "t4g.nano", 1)),
        )
        .await;
    assert_eq!(again["month_to_date"], draft["total"], "{again}");
}
