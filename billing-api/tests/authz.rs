//! The authorization matrix: every billing endpoint × every kind of
//! credential (none, unknown, revoked key, expired or forged session,
//! collector, control plane, customer key and session, admin key, bootstrap
//! admin), plus a customer's credential used on another customer's ids.
//! Denials are 401/403/404 with a code and carry none of the other
//! customer's data; keys are stored hashed, shown once, audited, revocable.

use testkit::billing as support;

use billing_api::auth;
use billing_api::invoice::{invoice_id, month_of, previous};
use billing_api::state::StateStore;
use chrono::{Duration, Utc};
use reqwest::Method;
use serde_json::{json, Value};
use support::*;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Class {
    Staff,
    Catalog,
    Mint,
    /// Customer A's data.
    ReadA,
    /// The same endpoints on customer B's ids.
    ReadB,
    /// Any valid credential (`/v1/me`).
    Anyone,
}

const B_SECRET: &str = "Beta Secret Corp";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_by_every_role() {
    use Method as M;
    let api = Api::start("authz").await;
    let q = previous(month_of(Utc::now()));
    for (id, ext, name) in [
        ("cus_a", "ext-alpha", "Alpha"),
        ("cus_b", "ext-beta-secret", B_SECRET),
    ] {
        let (s, _) = api
            .call(
                M::POST,
                "/v1/customers",
                Some(json!({"id": id, "external_id": ext, "name": name})),
            )
            .await;
        assert_eq!(s, 201);
        api.call(
            M::POST,
            &format!("/v1/customers/{id}/subscription"),
            Some(json!({"plan":"payg","starts_at": q.start})),
        )
        .await;
        api.call(
            M::POST,
            &format!("/v1/customers/{id}/apps"),
            Some(json!({"app":"web","name": format!("{name} web")})),
        )
        .await;
    }
    Writer::new(api.usage.clone())
        .write(&[
            (
                "a".into(),
                "cus_a",
                q.start + Duration::days(2),
                "tally.requests",
                requests("web", 9_000_000),
            ),
            (
                "b".into(),
                "cus_b",
                q.start + Duration::days(2),
                "tally.requests",
                requests("web", 7_000_000),
            ),
        ])
        .await;
    finalizer(api.st.clone(), api.usage.clone(), 10)
        .run_once(q.end + Duration::hours(2))
        .await
        .unwrap();
    let (inv_a, inv_b) = (invoice_id("cus_a", q), invoice_id("cus_b", q));

    // Credentials.
    let key = |role: &str, customer: Option<&str>| {
        let body = json!({"role": role, "customer_id": customer, "label": format!("{role} key")});
        let api = &api;
        async move {
            let (s, k) = api.call(M::POST, "/v1/keys", Some(body)).await;
            assert_eq!(s, 201, "{k}");
            (
                k["id"].as_str().unwrap().to_owned(),
                k["key"].as_str().unwrap().to_owned(),
            )
        }
    };
    let (_, control) = key("control-plane", None).await;
    let (_, collector) = key("collector", None).await;
    let (_, cust_a) = key("customer", Some("cus_a")).await;
    let (admin_id, admin) = key("admin", None).await;
    let (revoked_id, revoked) = key("customer", Some("cus_a")).await;
    let (s, _) = api
        .call(M::POST, &format!("/v1/keys/{revoked_id}/revoke"), None)
        .await;
    assert_eq!(s, 200);
    let (s, sess) = api
        .call_as(
            &control,
            M::POST,
            "/v1/customers/cus_a/sessions",
            Some(json!({"ttl_secs": 600})),
        )
        .await;
    assert_eq!(s, 201, "the control plane mints sessions: {sess}");
    let session_a = sess["token"].as_str().unwrap().to_owned();
    let expired = auth::mint_session(SESSION_SECRET, "cus_a", Utc::now().timestamp() - 1);
    let forged = auth::mint_session(
        b"not-the-server-secret-0123456789",
        "cus_b",
        Utc::now().timestamp() + 600,
    );

    let endpoints: Vec<(Method, String, Option<Value>, Class)> = vec![
        (M::GET, "/v1/plans".into(), None, Class::Catalog),
        (
            M::POST,
            "/v1/plans".into(),
            Some(json!({"plan":"zzz","version":1,"name":"Z","currency":"USD","prices":[]})),
            Class::Staff,
        ),
        (
            M::POST,
            "/v1/plans/zzz/versions/1/retire".into(),
            None,
            Class::Staff,
        ),
        (M::GET, "/v1/customers".into(), None, Class::Staff),
        (
            M::POST,
            "/v1/customers".into(),
            Some(json!({"id":"cus_a","external_id":"dup","name":"Dup"})),
            Class::Staff,
        ),
        (
            M::POST,
            "/v1/customers/cus_a/apps".into(),
            Some(json!({"app":"web","name":"again"})),
            Class::Staff,
        ),
        (
            M::POST,
            "/v1/customers/cus_a/subscription".into(),
            Some(json!({"plan":"payg"})),
            Class::Staff,
        ),
        (
            M::PUT,
            "/v1/customers/cus_a/seats".into(),
            Some(json!({"seats": 0})),
            Class::Staff,
        ),
        (
            M::POST,
            "/v1/customers/cus_a/plan-switch".into(),
            Some(json!({"plan":"payg","effective":"period_end"})),
            Class::Staff,
        ),
        (
            M::DELETE,
            "/v1/customers/cus_a/scheduled-changes/1".into(),
            None,
            Class::Staff,
        ),
        (
            M::POST,
            "/v1/customers/cus_a/cancellation".into(),
            Some(json!({"effective":"period_end"})),
            Class::Staff,
        ),
        (
            M::DELETE,
            "/v1/customers/cus_a/cancellation".into(),
            None,
            Class::Staff,
        ),
        (
            M::GET,
            "/v1/customers/cus_a/unbilled-usage".into(),
            None,
            Class::Staff,
        ),
        (
            M::GET,
            format!("/v1/invoices/{inv_a}/rerate"),
            None,
            Class::Staff,
        ),
        (
            M::GET,
            "/v1/audit?subject=customer:cus_b".into(),
            None,
            Class::Staff,
        ),
        (M::GET, "/v1/keys".into(), None, Class::Staff),
        (
            M::POST,
            "/v1/keys".into(),
            Some(json!({"role":"collector","label":"x"})),
            Class::Staff,
        ),
        (
            M::POST,
            "/v1/keys/0000000000000000/revoke".into(),
            None,
            Class::Staff,
        ),
        (
            M::POST,
            "/v1/customers/cus_a/sessions".into(),
            Some(json!({})),
            Class::Mint,
        ),
        (
            M::POST,
            "/v1/customers/cus_b/sessions".into(),
            Some(json!({})),
            Class::Mint,
        ),
        (
            M::POST,
            "/v1/quota/check".into(),
            Some(json!({"customer_id":"cus_b","ask":{"kind":"start_instances","app":"web","instance_type":"t4g.nano","count":1}})),
            Class::Mint,
        ),
        (M::GET, "/v1/quota/snapshot".into(), None, Class::Mint),
        (M::GET, "/v1/me".into(), None, Class::Anyone),
        (
            M::PUT,
            "/v1/customers/cus_b/suspension".into(),
            Some(json!({"suspended": false})),
            Class::Staff,
        ),
    ]
    .into_iter()
    .chain(["cus_a", "cus_b"].into_iter().flat_map(|c| {
        let class = if c == "cus_a" {
            Class::ReadA
        } else {
            Class::ReadB
        };
        let inv = if c == "cus_a" { &inv_a } else { &inv_b };
        vec![
            (M::GET, format!("/v1/customers/{c}"), None, class),
            (M::GET, format!("/v1/customers/{c}/apps"), None, class),
            (M::GET, format!("/v1/customers/{c}/invoices"), None, class),
            (
                M::GET,
                format!("/v1/customers/{c}/invoices/draft"),
                None,
                class,
            ),
            (M::GET, format!("/v1/invoices/{inv}"), None, class),
            (
                M::POST,
                format!("/v1/customers/{c}/plan-switch/preview"),
                Some(json!({"plan":"team"})),
                class,
            ),
            (M::GET, format!("/v1/customers/{c}/subscription"), None, class),
            (
                M::GET,
                format!("/v1/customers/{c}/scheduled-changes"),
                None,
                class,
            ),
            (
                M::GET,
                format!(
                    "/v1/customers/{c}/invoices/draft?period={}",
                    chrono::Utc::now().format("%Y-%m")
                ),
                None,
                class,
            ),
            (M::GET, format!("/v1/customers/{c}/costs"), None, class),
            (M::GET, format!("/v1/customers/{c}/plan-advisor"), None, class),
            (
                M::PUT,
                format!("/v1/customers/{c}/spending-cap"),
                Some(json!({"spending_cap": "500"})),
                class,
            ),
        ]
    }))
    .collect();

    #[derive(Debug)]
    enum Who {
        Nobody,
        Unknown,
        Revoked,
        Expired,
        Forged,
        Collector,
        Control,
        CustomerKey,
        CustomerSession,
        AdminKey,
        Bootstrap,
    }
    let creds: Vec<(Who, &str)> = vec![
        (Who::Nobody, ""),
        (Who::Unknown, "tk_0123456789abcdef_00"),
        (Who::Revoked, &revoked),
        (Who::Expired, &expired),
        (Who::Forged, &forged),
        (Who::Collector, &collector),
        (Who::Control, &control),
        (Who::CustomerKey, &cust_a),
        (Who::CustomerSession, &session_a),
        (Who::AdminKey, &admin),
        (Who::Bootstrap, KEY),
    ];
    let mut checked = 0;
    for (who, bearer) in &creds {
        for (m, path, body, class) in &endpoints {
            let (s, v) = api.call_as(bearer, m.clone(), path, body.clone()).await;
            let s = s.as_u16();
            let want: Option<u16> = match (who, class) {
                (Who::Nobody | Who::Unknown | Who::Revoked | Who::Expired | Who::Forged, _) => {
                    Some(401)
                }
                (Who::AdminKey | Who::Bootstrap, _) | (_, Class::Anyone) => None,
                (Who::Collector, _) => Some(403),
                (Who::Control, Class::Catalog | Class::Mint) => None,
                (Who::Control, _) => Some(403),
                (Who::CustomerKey | Who::CustomerSession, Class::Catalog | Class::ReadA) => None,
                (Who::CustomerKey | Who::CustomerSession, Class::ReadB) => Some(404),
                (Who::CustomerKey | Who::CustomerSession, _) => Some(403),
            };
            let ctx = format!("{who:?} {m} {path} → {s} {v}");
            match want {
                Some(code) => {
                    assert_eq!(s, code, "{ctx}");
                    let expect = match code {
                        401 => "unauthorized",
                        403 => "forbidden",
                        _ => "not_found",
                    };
                    assert_eq!(v["code"], expect, "{ctx}");
                    let text = v.to_string();
                    assert!(
                        !text.contains(B_SECRET) && !text.contains("ext-beta-secret"),
                        "leak: {ctx}"
                    );
                }
                None => {
                    assert!(![401, 403].contains(&s), "{ctx}");
                    if matches!(
                        class,
                        Class::ReadA | Class::ReadB | Class::Catalog | Class::Anyone
                    ) {
                        assert!((200..300).contains(&s), "{ctx}");
                    }
                    // A customer's own answers never carry the other customer.
                    if matches!(who, Who::CustomerKey | Who::CustomerSession) {
                        assert!(!v.to_string().contains(B_SECRET), "leak: {ctx}");
                    }
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, creds.len() * endpoints.len());

    // Keys: shown once, stored hashed, creation audited with its actor.
    let rows: Vec<String> = sqlx::query_scalar("SELECT row_to_json(k)::text FROM api_keys k")
        .fetch_all(&api.pool)
        .await
        .unwrap();
    for k in [&control, &collector, &cust_a, &admin] {
        let secret = k.rsplit('_').next().unwrap();
        assert!(
            rows.iter().all(|r| !r.contains(secret)),
            "a key is stored in clear"
        );
    }
    let (_, listed) = api.call(M::GET, "/v1/keys", None).await;
    assert!(!listed.to_string().contains(&admin), "listing shows a key");
    let (_, log) = api
        .call(M::GET, &format!("/v1/audit?subject=key:{admin_id}"), None)
        .await;
    assert_eq!(log[0]["action"], "key.create");
    assert!(
        log[0]["actor"].as_str().unwrap().starts_with("admin:"),
        "{log}"
    );
    let (_, log) = api
        .call(M::GET, &format!("/v1/audit?subject=key:{revoked_id}"), None)
        .await;
    let actions: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["key.create", "key.revoke"]);
    // An admin change made with a database admin key is audited under it.
    api.call_as(
        &admin,
        M::PUT,
        "/v1/customers/cus_b/seats",
        Some(json!({"seats": 2})),
    )
    .await;
    let entries = api.st.audit_log("customer:cus_b").await.unwrap();
    assert_eq!(
        entries.last().unwrap().actor,
        format!("key:{admin_id}/alice")
    );
    // Bad key requests.
    for body in [
        json!({"role":"customer","label":"no customer"}),
        json!({"role":"admin","customer_id":"cus_a","label":"scoped admin"}),
        json!({"role":"root","label":"x"}),
        json!({"role":"customer","customer_id":"cus_zzz","label":"x"}),
    ] {
        let (s, v) = api.call(M::POST, "/v1/keys", Some(body.clone())).await;
        assert!([404, 422].contains(&s.as_u16()), "{body} → {s} {v}");
    }
    let (s, _) = api
        .call(
            M::POST,
            "/v1/customers/cus_a/sessions",
            Some(json!({"ttl_secs": 999999})),
        )
        .await;
    assert_eq!(s, 422);
}
