//! Usage alerts: thresholds of the spending cap and of an allowance raised
//! once per period, delivered as signed webhooks to a real HTTP receiver,
//! retried with backoff after failures, given up after the last attempt.

use testkit::billing as support;

use axum::http::{HeaderMap, StatusCode};
use billing_api::alerts::{AlertConfig, AlertRaiser, AlertSender};
use billing_api::invoice::{month_of, previous};
use billing_api::metrics::Metrics;
use billing_api::state::{DynStateStore, StateStore};
use billing_api::webhook;
use chrono::Duration;
use reqwest::Method as M;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use support::*;

const SECRET: &str = "alert-secret-0123456789";

/// Collects deliveries; answers 500 while `fail` is above zero (counting down; `u32::MAX`: always).
#[derive(Default)]
struct Receiver {
    got: Mutex<Vec<(HeaderMap, Vec<u8>, u16)>>,
    fail: Mutex<u32>,
}

async fn receiver() -> (String, Arc<Receiver>) {
    let r = Arc::new(Receiver::default());
    let state = r.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let r = state.clone();
            async move {
                let mut fail = r.fail.lock().unwrap();
                let status = if *fail > 0 {
                    if *fail != u32::MAX {
                        *fail -= 1;
                    }
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::NO_CONTENT
                };
                r.got
                    .lock()
                    .unwrap()
                    .push((headers, body.to_vec(), status.as_u16()));
                status
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_are_raised_once_per_period_signed_and_retried() {
    let api = Api::start("alerts").await;
    let (url, rx) = receiver().await;
    // A past month, so the test means the same on any date.
    let p = previous(month_of(chrono::Utc::now()));
    let now = p.start + Duration::days(10);
    let mut w = Writer::new(api.usage.clone());
    for (id, plan) in [
        ("cus_cap", "payg"),
        ("cus_free", "free"),
        ("cus_quiet", "payg"),
    ] {
        let (s, v) = api
            .call(
                M::POST,
                "/v1/customers",
                Some(json!({"id": id, "external_id": id, "name": id})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        let (s, v) = api
            .call(
                M::POST,
                &format!("/v1/customers/{id}/subscription"),
                Some(json!({"plan": plan, "starts_at": p.start})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }
    let (s, _) = api
        .call(
            M::PUT,
            "/v1/customers/cus_cap/spending-cap",
            Some(json!({"spending_cap": "10"})),
        )
        .await;
    assert_eq!(s, 204);
    // cus_cap: 250 h of t4g.small = $5.80, 58 % of $10. cus_free: 400 of
    // its 750 free nano hours (53 %). cus_quiet: no cap, $0.58.
    w.write(&[
        (
            "c1".into(),
            "cus_cap",
            p.start + Duration::days(1),
            "tally.compute",
            compute("web", "t4g.small", 250 * 3600),
        ),
        (
            "f1".into(),
            "cus_free",
            p.start + Duration::days(1),
            "tally.compute",
            compute("web", "t4g.nano", 400 * 3600),
        ),
        (
            "q1".into(),
            "cus_quiet",
            p.start + Duration::days(1),
            "tally.compute",
            compute("web", "t4g.nano", 100 * 3600),
        ),
    ])
    .await;
    let mut config = AlertConfig::new(url, SECRET, vec![50, 80, 100]);
    config.max_attempts = 3;
    let metrics = Metrics::new();
    let st: Arc<DynStateStore<'static>> = api.st.clone();
    let raiser = AlertRaiser::new(config.clone());

    api.quota.refresh(now).await.unwrap();
    let raised = raiser
        .raise(&api.quota, st.as_ref(), &metrics, now)
        .await
        .unwrap();
    let mut got: Vec<(String, String, String, u32)> = raised
        .iter()
        .map(|a| {
            (
                a.customer_id.clone(),
                a.kind.to_string(),
                a.subject.clone(),
                a.threshold,
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("cus_cap".into(), "spending_cap".into(), "".into(), 50),
            (
                "cus_free".into(),
                "allowance".into(),
                "compute instance_type=t4g.nano".into(),
                50
            ),
        ]
    );
    // Once per period: evaluating again raises nothing.
    api.quota.refresh(now).await.unwrap();
    assert!(raiser
        .raise(&api.quota, st.as_ref(), &metrics, now)
        .await
        .unwrap()
        .is_empty());
    // Nor does another replica (its own raiser): the state store keeps them once-only.
    let replica = AlertRaiser::new(config.clone());
    assert!(replica
        .raise(&api.quota, st.as_ref(), &metrics, now)
        .await
        .unwrap()
        .is_empty());

    // Delivery: the receiver fails twice, then accepts.
    *rx.fail.lock().unwrap() = 2;
    let sender = AlertSender::new(st.clone(), config.clone(), metrics.clone());
    assert_eq!(sender.run_once(now).await.unwrap(), 0);
    let alerts = st.alerts_of("cus_cap").await.unwrap();
    assert_eq!(
        (alerts[0].status.as_str(), alerts[0].attempts),
        ("pending", 1)
    );
    assert_eq!(alerts[0].next_attempt_at, now + Duration::seconds(10));
    assert_eq!(alerts[0].last_error.as_deref(), Some("HTTP 500"));
    // Not due again before the backoff.
    assert_eq!(
        sender.run_once(now + Duration::seconds(5)).await.unwrap(),
        0
    );
    let t2 = now + Duration::seconds(11);
    assert_eq!(sender.run_once(t2).await.unwrap(), 2);
    {
        let got = rx.got.lock().unwrap();
        assert_eq!(
            got.iter().map(|g| g.2).collect::<Vec<_>>(),
            vec![500, 500, 204, 204]
        );
        for (headers, body, status) in got.iter().filter(|g| g.2 == 204) {
            let sig = headers.get("tally-signature").unwrap().to_str().unwrap();
            webhook::verify(SECRET, body, Some(sig), t2.timestamp(), 300)
                .unwrap_or_else(|e| panic!("{status}: {e}"));
            let mut tampered = body.clone();
            tampered[1] ^= 1;
            assert!(webhook::verify(SECRET, &tampered, Some(sig), t2.timestamp(), 300).is_err());
            assert!(webhook::verify("other-secret", body, Some(sig), t2.timestamp(), 300).is_err());
            assert!(headers.get("tally-alert-id").is_some());
        }
        let cap: Value = got
            .iter()
            .filter(|g| g.2 == 204)
            .map(|g| serde_json::from_slice::<Value>(&g.1).unwrap())
            .find(|v| v["customer_id"] == "cus_cap")
            .unwrap();
        assert_eq!(
            (
                &cap["kind"],
                &cap["threshold_percent"],
                &cap["used"],
                &cap["limit"],
                &cap["unit"]
            ),
            (
                &json!("spending_cap"),
                &json!(50),
                &json!("5.80"),
                &json!("10"),
                &json!("USD")
            ),
            "{cap}"
        );
    }
    let alerts = st.alerts_of("cus_cap").await.unwrap();
    assert_eq!(
        (alerts[0].status.as_str(), alerts[0].attempts),
        ("delivered", 2)
    );
    assert!(st.alerts_of("cus_quiet").await.unwrap().is_empty());

    // 200 more hours ($10.44 in all): 80 % and 100 % in one evaluation.
    w.write(&[(
        "c2".into(),
        "cus_cap",
        p.start + Duration::days(2),
        "tally.compute",
        compute("web", "t4g.small", 200 * 3600),
    )])
    .await;
    api.quota.refresh(now).await.unwrap();
    let raised = raiser
        .raise(&api.quota, st.as_ref(), &metrics, now)
        .await
        .unwrap();
    let mut t: Vec<u32> = raised.iter().map(|a| a.threshold).collect();
    t.sort();
    assert_eq!(t, vec![80, 100]);
    // A receiver that keeps failing: three attempts, then the alerts fail.
    *rx.fail.lock().unwrap() = u32::MAX;
    let mut at = now;
    for _ in 0..3 {
        at += Duration::hours(2);
        assert_eq!(sender.run_once(at).await.unwrap(), 0);
    }
    let alerts = st.alerts_of("cus_cap").await.unwrap();
    let states: Vec<(u32, &str, u32)> = alerts
        .iter()
        .map(|a| (a.alert.threshold, a.status.as_str(), a.attempts))
        .collect();
    assert_eq!(
        states,
        vec![(50, "delivered", 2), (80, "failed", 3), (100, "failed", 3)]
    );
    assert_eq!(sender.run_once(at + Duration::hours(2)).await.unwrap(), 0);
    assert_eq!(
        rx.got.lock().unwrap().len(),
        4 + 6,
        "nothing is sent after giving up"
    );

    let text = metrics.render();
    for line in [
        "tally_billing_alerts_raised_total{kind=\"spending_cap\"} 3",
        "tally_billing_alerts_raised_total{kind=\"allowance\"} 1",
        "tally_billing_alert_deliveries_total{outcome=\"delivered\"} 2",
        "tally_billing_alert_deliveries_total{outcome=\"retry\"} 6",
        "tally_billing_alert_deliveries_total{outcome=\"gave_up\"} 2",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
}
