//! The billing HTTP API against real PostgreSQL and ClickHouse: admin
//! flows, the audit log, plan switch preview and confirm, invoices and
//! re-rating, Stripe webhooks with signatures, metrics; every endpoint's
//! bad input gets a 4xx with a code and changes nothing; the checked-in
//! OpenAPI document is current.

use testkit::billing as support;

use billing_api::api::openapi_json;
use billing_api::invoice::{self, month_of, previous};
use billing_api::state::StateStore;
use chrono::{Duration, Utc};
use reqwest::{Method, StatusCode};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use support::*;

fn plan_v2() -> Value {
    json!({"plan":"payg","version":2,"name":"Pay as you go","currency":"USD","prices":[
        {"meter":"requests","per":"1000000","model":"per_unit","unit_price":"0.35"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_flows_audit_preview_switch_invoices_and_webhooks() {
    let api = Api::start("apiflow").await;
    use Method as M;

    // Authentication.
    let r = api
        .http
        .get(format!("{}/v1/plans", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = api
        .http
        .get(format!("{}/v1/plans", api.base))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Catalog.
    let (s, plans) = api.call(M::GET, "/v1/plans", None).await;
    assert_eq!(s, 200);
    assert_eq!(plans.as_array().unwrap().len(), 4);
    assert_eq!(api.call(M::POST, "/v1/plans", Some(plan_v2())).await.0, 201);
    assert_eq!(
        api.call(M::POST, "/v1/plans/payg/versions/2/retire", None)
            .await
            .0,
        204
    );

    // Customers, apps, subscription, seats.
    let cust = json!({"id":"cus_api","external_id":"paas-42","name":"Acme"});
    assert_eq!(
        api.call(M::POST, "/v1/customers", Some(cust.clone()))
            .await
            .0,
        201
    );
    let (s, got) = api.call(M::GET, "/v1/customers/cus_api", None).await;
    assert_eq!((s, got), (StatusCode::OK, cust.clone()));
    let (_, found) = api
        .call(M::GET, "/v1/customers?external_id=paas-42", None)
        .await;
    assert_eq!(found, json!([cust]));
    assert_eq!(
        api.call(
            M::POST,
            "/v1/customers/cus_api/apps",
            Some(json!({"app":"web","name":"Web"}))
        )
        .await
        .0,
        201
    );
    let now = Utc::now();
    let p = month_of(now);
    let q = previous(p);
    let (s, sub) = api
        .call(
            M::POST,
            "/v1/customers/cus_api/subscription",
            Some(json!({"plan":"payg","starts_at": q.start})),
        )
        .await;
    assert_eq!(s, 201, "{sub}");
    assert_eq!(sub["version"], 1, "retired v2 is not the default");
    assert_eq!(
        api.call(
            M::PUT,
            "/v1/customers/cus_api/seats",
            Some(json!({"seats": 3, "at": q.start}))
        )
        .await
        .0,
        204
    );

    // Usage last month and this month.
    let mut w = Writer::new(api.usage.clone());
    let t = p.start + (now - p.start) / 2;
    w.write(&[
        (
            "r1".into(),
            "cus_api",
            q.start + Duration::days(1),
            "tally.requests",
            requests("web", 50_000_000),
        ),
        (
            "r2".into(),
            "cus_api",
            t,
            "tally.requests",
            requests("web", 20_000_000),
        ),
    ])
    .await;

    // Preview a switch to team: current payg lines vs. team from now on.
    let (s, pv) = api
        .call(
            M::POST,
            "/v1/customers/cus_api/plan-switch/preview",
            Some(json!({"plan":"team","effective":"now"})),
        )
        .await;
    assert_eq!(s, 200, "{pv}");
    assert_eq!(pv["current"]["total"], "8.00", "20 M requests on payg");
    let with: Vec<&Value> = pv["with_switch"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    assert!(
        with.iter()
            .any(|l| l["plan"] == "team" && l["kind"] == "seat_fee"),
        "{pv}"
    );
    let audit_before = api.snapshot().await;
    assert_eq!(
        api.snapshot().await,
        audit_before,
        "a preview changes nothing"
    );
    let (s, sw) = api
        .call(
            M::POST,
            "/v1/customers/cus_api/plan-switch",
            Some(json!({"plan":"team","effective":"period_end"})),
        )
        .await;
    assert_eq!(s, 200, "{sw}");
    assert_eq!(sw["effective_at"], json!(p.end));

    let (_, log) = api
        .call(M::GET, "/v1/audit?subject=customer:cus_api", None)
        .await;
    let actions: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "customer.create",
            "app.create",
            "subscription.start",
            "seats.set",
            "subscription.switch"
        ]
    );
    let last = log.as_array().unwrap().last().unwrap();
    assert!(
        last["actor"].as_str().unwrap().ends_with("/alice"),
        "{last}"
    );
    assert_eq!(last["before"]["plan"], "payg");
    assert_eq!(last["after"]["plan"], "team");
    let (_, plog) = api.call(M::GET, "/v1/audit?subject=plan:payg", None).await;
    assert_eq!(
        plog.as_array().unwrap().len(),
        3,
        "publish v1 (catalog), v2, retire v2"
    );

    // Draft of the open period.
    let (s, draft) = api
        .call(M::GET, "/v1/customers/cus_api/invoices/draft", None)
        .await;
    assert_eq!(s, 200, "{draft}");
    assert_eq!(draft["subtotal"], "8.00");

    // Finalize last month; read it back, re-rate it from raw events.
    let f = finalizer(api.st.clone(), api.usage.clone(), 10);
    f.run_once(q.end + Duration::hours(2)).await.unwrap();
    let (_, list) = api
        .call(M::GET, "/v1/customers/cus_api/invoices", None)
        .await;
    let inv = &list.as_array().unwrap()[0];
    assert_eq!(inv["total"], "20.00");
    let id = inv["id"].as_str().unwrap().to_owned();
    let (s, rr) = api
        .call(M::GET, &format!("/v1/invoices/{id}/rerate"), None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(rr["reproduces"], true, "{rr}");
    assert_eq!(rr["differences"], json!([]));
    // A change effective inside the invoiced period is refused.
    let (s, e) = api
        .call(
            M::PUT,
            "/v1/customers/cus_api/seats",
            Some(json!({"seats": 1, "at": q.start + Duration::days(3)})),
        )
        .await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::CONFLICT, Some("period_finalized"))
    );

    // Webhooks: signed invoice.paid marks the invoice paid.
    api.st.set_stripe_invoice(&id, "in_test_1").await.unwrap();
    let hook = |body: String, t: i64| {
        let sig = stripe_standin::sign_webhook(WHSEC, &body, t);
        api.http
            .post(format!("{}/v1/stripe/webhook", api.base))
            .header("Stripe-Signature", sig)
            .body(body)
            .send()
    };
    let paid = stripe_standin::invoice_event("invoice.paid", "in_test_1");
    let r = hook(paid.clone(), Utc::now().timestamp()).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["applied"], true);
    assert_eq!(api.st.invoice(&id).await.unwrap().payment_status, "paid");
    // An old signature (replay) and a wrong secret are refused.
    let failed = stripe_standin::invoice_event("invoice.payment_failed", "in_test_1");
    let r = hook(failed.clone(), Utc::now().timestamp() - 600)
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = api
        .http
        .post(format!("{}/v1/stripe/webhook", api.base))
        .header(
            "Stripe-Signature",
            stripe_standin::sign_webhook("whsec_other", &failed, Utc::now().timestamp()),
        )
        .body(failed.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(api.st.invoice(&id).await.unwrap().payment_status, "paid");
    let voided = stripe_standin::invoice_event("invoice.voided", "in_test_1");
    hook(voided, Utc::now().timestamp()).await.unwrap();
    assert_eq!(api.st.invoice(&id).await.unwrap().payment_status, "void");

    // Metrics.
    let m = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "tally_billing_invoices_drafted_total 1",
        "tally_billing_webhooks_total{outcome=\"applied\",type=\"invoice.paid\"} 1",
        "tally_billing_webhooks_total{outcome=\"bad_signature\",type=\"unknown\"} 2",
    ] {
        assert!(m.contains(name), "{name} not in\n{m}");
    }
    // The invoice is unchanged by all of this but its payment status.
    let inv_now = api.st.invoice(&id).await.unwrap();
    assert_eq!(inv_now.total, Decimal::new(2000, 2));
    let _ = invoice::billed(&inv_now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_4xx_with_a_code_and_changes_nothing() {
    let api = Api::start("apibad").await;
    use Method as M;
    api.call(
        M::POST,
        "/v1/customers",
        Some(json!({"id":"cus_1","external_id":"e1","name":"One"})),
    )
    .await;
    api.call(
        M::POST,
        "/v1/customers/cus_1/subscription",
        Some(json!({"plan":"payg"})),
    )
    .await;
    api.call(M::POST, "/v1/plans/free/versions/1/retire", None)
        .await;
    let before = api.snapshot().await;

    let big = "x".repeat(300 * 1024);
    let cases: Vec<(Method, &str, Option<Value>, u16, &str)> = vec![
        (
            M::POST,
            "/v1/plans",
            Some(json!({"plan":"p","version":"one"})),
            422,
            "invalid_body",
        ),
        (
            M::POST,
            "/v1/plans",
            Some(
                json!({"plan":"p","version":1,"name":"P","currency":"USD","prices":[
            {"meter":"requests","model":"graduated","tiers":[{"up_to":"10","unit_price":"1"},{"up_to":"5","unit_price":"1"},{"unit_price":"1"}]}]}),
            ),
            422,
            "invalid",
        ),
        (
            M::POST,
            "/v1/plans",
            Some(
                json!({"plan":"p","version":1,"name":"P","currency":"USD","prices":[
            {"meter":"nope","model":"per_unit","unit_price":"1"}]}),
            ),
            422,
            "invalid",
        ),
        (
            M::POST,
            "/v1/plans",
            Some(
                json!({"plan":"p","version":1,"name":"P","currency":"USD","prices":[
            {"meter":"requests","model":"per_unit","unit_price":"-1"}]}),
            ),
            422,
            "invalid",
        ),
        (
            M::POST,
            "/v1/plans",
            Some(json!({"plan":"p","version":1,"name":"P","prices":[]})),
            422,
            "invalid_body",
        ),
        (
            M::POST,
            "/v1/plans",
            Some(json!({"plan":"p","version":1,"name":"P","currency":"","prices":[]})),
            422,
            "invalid",
        ),
        (
            M::POST,
            "/v1/plans",
            Some(
                serde_json::to_value(
                    billing_api::catalog::Catalog::default_catalog().plans[1].clone(),
                )
                .unwrap(),
            ),
            409,
            "conflict",
        ),
        (
            M::POST,
            "/v1/plans/nope/versions/1/retire",
            None,
            404,
            "not_found",
        ),
        (
            M::POST,
            "/v1/plans/payg/versions/x/retire",
            None,
            422,
            "invalid",
        ),
        (
            M::POST,
            "/v1/plans/free/versions/1/retire",
            None,
            409,
            "conflict",
        ),
        (
            M::POST,
            "/v1/customers",
            Some(json!({"id":"cus_2","name":"Two"})),
            422,
            "invalid_body",
        ),
        (
            M::POST,
            "/v1/customers",
            Some(json!({"id":"bad id","external_id":"e2","name":"Two"})),
            422,
            "invalid",
        ),
        (
            M::POST,
            "/v1/customers",
            Some(json!({"id":"cus_2","external_id":"e2","name":""})),
            422,
            "invalid",
        ),
        (
            M::POST,
            "/v1/customers",
            Some(json!({"id":"cus_1","external_id":"e9","name":"Dup"})),
            409,
            "conflict",
        ),
        (
            M::POST,
            "/v1/customers",
            Some(json!({"id":"cus_9","external_id":"e1","name":"Dup ext"})),
            409,
            "conflict",
        ),
        (M::GET, "/v1/customers?limit=0", None, 400, "bad_query"),
        (M::GET, "/v1/customers?limit=abc", None, 400, "bad_query"),
        (M::GET, "/v1/customers/nope", None, 404, "not_found"),
        (
            M::POST,
            "/v1/customers/nope/apps",
            Some(json!({"app":"web","name":"Web"})),
            404,
            "not_found",
        ),
        (
            M::POST,
            "/v1/customers/cus_1/apps",
            Some(json!({"app":"","name":"Web"})),
            422,
            "invalid",
        ),
        (
            M::POST,
            "/v1/customers/cus_1/apps",
            Some(json!({"app":"web"})),
            422,
            "invalid_body",
        ),
        (
            M::POST,
            "/v1/customers/cus_1/subscription",
            Some(json!({"plan":"payg"})),
            409,
            "conflict",
        ),
        (
            M::POST,
            "/v1/customers/cus_1/subscription",
            Some(json!({"plan":"gold"})),
            404,
            "not_found",
        ),
        (
            M::POST,
            "/v1/customers/cus_1/subscription",
            Some(json!({"plan":"payg","starts_at":"yesterday"})),
            422,
            "invalid_body",
        ),
        (
            M::POST,
            "/v1/customers/nope/subscription",
            Some(json!({"plan":"payg"})),
            404,
            "not_found",
        ),
        (
            M::PUT,
            "/v1/customers/cus_1/seats",
            Some(json!({"seats":-1})),
            422,
            "invalid_body",
        ),
        (
            M::PUT,
            "/v1/customers/cus_1/seats",
            Some(json!({"seats":1000000})),
            422,
            "invalid",
        ),
        (
            M::PUT,
            "/v1/customers/nope/seats",
            Some(json!({"seats":1})),
            404,
            "not_found",
        ),
        (
            M::POST,
            "/v1/customers/cus_1/plan-switch",
            Some(json!({"plan":"team","effective":"tomorrow"})),
            422,
            "invalid_body",
        ),
        (
            M::POST,
            "/v1/customers/cus_1/plan-switch",
            Some(json!({"plan":"free","version":1})),
            422,
            "invalid",
        ),
        (
            M::POST,
            "/v1/customers/cus_1/plan-switch",
            Some(json!({"plan":"gold"})),
            404,
            "not_found",
        ),
        (
            M::POST,
            "/v1/customers/cus_1/plan-switch",
            Some(json!({"plan":"team","version":9})),
            404,
            "not_found",
        ),
        (
            M::POST,
            "/v1/customers/cus_1/plan-switch/preview",
            Some(json!({"plan":"team","extra":1})),
            422,
            "invalid_body",
        ),
        (
            M::POST,
            "/v1/customers/nope/plan-switch",
            Some(json!({"plan":"team"})),
            404,
            "not_found",
        ),
        (
            M::GET,
            "/v1/customers/nope/invoices",
            None,
            404,
            "not_found",
        ),
        (
            M::GET,
            "/v1/customers/nope/invoices/draft",
            None,
            404,
            "not_found",
        ),
        (M::GET, "/v1/invoices/nope", None, 404, "not_found"),
        (M::GET, "/v1/invoices/nope/rerate", None, 404, "not_found"),
        (M::GET, "/v1/audit", None, 400, "bad_query"),
        (M::GET, "/v1/nothing-here", None, 404, "not_found"),
    ];
    for (m, path, body, status, code) in cases {
        let (s, e) = api.call(m.clone(), path, body.clone()).await;
        assert_eq!(
            (s.as_u16(), e["code"].as_str()),
            (status, Some(code)),
            "{m} {path} {body:?} → {e}"
        );
        assert!(
            !e["message"].as_str().unwrap_or("").is_empty(),
            "{path}: no message"
        );
    }
    // Several problems in a plan are all reported, by field.
    let (_, e) = api
        .call(
            M::POST,
            "/v1/plans",
            Some(
                json!({"plan":"p","version":1,"name":"P","currency":"","prices":[
            {"meter":"nope","model":"per_unit","unit_price":"-1"}]}),
            ),
        )
        .await;
    assert!(e["details"].as_array().unwrap().len() >= 3, "{e}");
    // Malformed JSON, wrong content type, oversized body.
    for (ctype, body, status, code) in [
        (
            Some("application/json"),
            // (A known field: an unknown one is refused before the end.)
            b"{\"name\":".to_vec(),
            400,
            "malformed_json",
        ),
        (None, b"{}".to_vec(), 415, "unsupported_media_type"),
        (
            Some("application/json"),
            format!("{{\"name\":\"{big}\"}}").into_bytes(),
            413,
            "body_too_large",
        ),
    ] {
        let (s, e) = api.raw(M::POST, "/v1/customers", ctype, body).await;
        assert_eq!(
            (s.as_u16(), e["code"].as_str()),
            (status, Some(code)),
            "{e}"
        );
    }
    // Webhook without or with a bad signature.
    for sig in [None, Some("t=1,v1=00")] {
        let mut r = api
            .http
            .post(format!("{}/v1/stripe/webhook", api.base))
            .body(stripe_standin::invoice_event("invoice.paid", "in_x"));
        if let Some(s) = sig {
            r = r.header("Stripe-Signature", s);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(
            r.json::<Value>().await.unwrap()["code"],
            "invalid_signature"
        );
    }
    assert_eq!(api.snapshot().await, before, "rejected calls changed state");
}

#[test]
fn openapi_document_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/openapi.json");
    let checked_in = std::fs::read_to_string(path).unwrap();
    assert!(
        checked_in == openapi_json(),
        "schemas/openapi.json is stale: run `cargo run -p billing-api -- openapi > schemas/openapi.json`"
    );
    let doc: Value = serde_json::from_str(&checked_in).unwrap();
    for p in [
        "/v1/plans",
        "/v1/customers/{id}/plan-switch/preview",
        "/v1/invoices/{id}/rerate",
        "/v1/keys",
        "/v1/keys/{id}/revoke",
        "/v1/customers/{id}/sessions",
        "/v1/customers/{id}/subscription",
        "/v1/customers/{id}/scheduled-changes",
        "/v1/customers/{id}/scheduled-changes/{change}",
        "/v1/stripe/webhook",
    ] {
        assert!(doc["paths"].get(p).is_some(), "{p} missing");
    }
    // The draft's period parameter is documented.
    let draft = &doc["paths"]["/v1/customers/{id}/invoices/draft"]["get"];
    assert!(
        draft["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "period" && p["in"] == "query"),
        "{draft}"
    );
}
