//! Issue 11 at the billing API's edges (items 2, 7, 8, 9): input the
//! document refuses is refused with a `{code, message}` naming the field,
//! and every error answer carries that envelope.

use testkit::billing as support;
use testkit::http::read_one;
use testkit::served;

use chrono::{Duration, Utc};
use reqwest::Method as M;
use serde_json::{json, Value};
use served::*;
use support::*;

fn says(v: &Value, code: &str, words: &[&str]) -> bool {
    v["code"] == code
        && words
            .iter()
            .all(|w| v["message"].as_str().is_some_and(|m| m.contains(w)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_the_document_refuses_are_refused_naming_the_field() {
    let api = Api::start("apiedges").await;

    // Item 8: POST /v1/customers refused unknown fields nowhere.
    let (s, v) = api
        .call(
            M::POST,
            "/v1/customers",
            Some(json!({"id":"cus_e","external_id":"e","name":"E","plan":"team"})),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(says(&v, "invalid_body", &["unknown field `plan`"]), "{v}");
    let c = json!({"id":"cus_e","external_id":"e","name":"E"});
    assert_eq!(api.call(M::POST, "/v1/customers", Some(c)).await.0, 201);

    // Seats before the customer has a plan, then around its start.
    let (s, v) = api
        .call(
            M::PUT,
            "/v1/customers/cus_e/seats",
            Some(json!({"seats": 2})),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(says(&v, "invalid", &["at:", "no subscription"]), "{v}");
    let start = invoice_month_start();
    let (s, v) = api
        .call(
            M::POST,
            "/v1/customers/cus_e/subscription",
            Some(json!({"plan":"team","starts_at": start})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    for (at, words) in [
        (
            json!("1970-01-01T00:00:00Z"),
            &["at:", "before the customer's subscription starts"][..],
        ),
        (
            json!((start - Duration::seconds(1))),
            &["at:", "before the customer's subscription starts"][..],
        ),
        (json!("9999-12-31T00:00:00Z"), &["at:", "days ahead"][..]),
    ] {
        let (s, v) = api
            .call(
                M::PUT,
                "/v1/customers/cus_e/seats",
                Some(json!({"seats": 7, "at": at})),
            )
            .await;
        assert_eq!(s, 422, "{at}: {v}");
        assert!(says(&v, "invalid", words), "{at}: {v}");
    }
    let (s, v) = api
        .call(
            M::PUT,
            "/v1/customers/cus_e/seats",
            Some(json!({"seats": 7, "at": "2026-11-05T10:00:00.123456789Z"})),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(says(&v, "invalid_body", &["at", "microseconds"]), "{v}");
    // Nothing of that changed the preview's seats: only the valid change
    // below is in the draft.
    assert_eq!(
        api.call(
            M::PUT,
            "/v1/customers/cus_e/seats",
            Some(json!({"seats": 3, "at": start}))
        )
        .await
        .0,
        204
    );
    let (s, d) = api
        .call(M::GET, "/v1/customers/cus_e/invoices/draft", None)
        .await;
    assert_eq!(s, 200, "{d}");
    let lines = d["body"]["lines"].as_array().expect("draft lines");
    let seat_lines: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "seat_fee").collect();
    assert_eq!(seat_lines.len(), 1, "{d}");
    // 3 seats since the month's start, none of the refused 7.
    let now_secs = (Utc::now() - start).num_seconds();
    let q: i64 = seat_lines[0]["quantity"].as_str().unwrap().parse().unwrap();
    assert!(q % 3 == 0 || q <= 3 * (now_secs + 5), "{d}");
    let later = billing_api::wire::to_micros(Utc::now() + Duration::days(30));
    let (s, v) = api
        .call(
            M::PUT,
            "/v1/customers/cus_e/seats",
            Some(json!({"seats": 4, "at": later})),
        )
        .await;
    assert_eq!(s, 204, "{v}");

    // Item 8 / item 2: a cap as a JSON number, and "-0".
    for cap in [
        json!(12.5),
        json!(10),
        json!("-0"),
        json!("-0.00"),
        json!("1e3"),
    ] {
        let (s, v) = api
            .call(
                M::PUT,
                "/v1/customers/cus_e/spending-cap",
                Some(json!({"spending_cap": cap})),
            )
            .await;
        assert_eq!(s, 422, "{cap}: {v}");
        assert!(
            v["message"].as_str().unwrap().contains("spending_cap"),
            "{cap}: {v}"
        );
    }
    for cap in [json!("12.50"), Value::Null] {
        let (s, v) = api
            .call(
                M::PUT,
                "/v1/customers/cus_e/spending-cap",
                Some(json!({"spending_cap": cap})),
            )
            .await;
        assert_eq!(s, 204, "{cap}: {v}");
    }

    // Item 2: a quota ask's size as a number.
    let (s, v) = api
        .call(
            M::POST,
            "/v1/quota/check",
            Some(json!({"customer_id":"cus_e","ask":{"kind":"grow_volume","app":"web","volume_id":"v1","size_gb":9007199254740993.5}})),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(says(&v, "invalid_body", &["ask", "decimal string"]), "{v}");

    // Items 2 and 7 through POST /v1/plans: a number price, a 14-place tier.
    let plan = |tier_price: Value| {
        json!({"plan":"edge","version":1,"name":"Edge","currency":"USD","prices":[
            {"meter":"requests","per":"1000000","model":"graduated",
             "tiers":[{"up_to":"10","unit_price":"0"},{"unit_price": tier_price}]}]})
    };
    let (s, v) = api.call(M::POST, "/v1/plans", Some(plan(json!(0.3)))).await;
    assert_eq!(s, 422, "{v}");
    assert!(
        says(
            &v,
            "invalid_body",
            &["prices[0]", "unit_price", "decimal string"]
        ),
        "{v}"
    );
    let (s, v) = api
        .call(M::POST, "/v1/plans", Some(plan(json!("0.00000000000004"))))
        .await;
    assert_eq!(s, 422, "{v}");
    let d = &v["details"][0];
    assert_eq!(d["field"], "prices[0].tiers[1].unit_price", "{v}");
    assert_eq!(d["code"], "too_precise", "{v}");
    assert!(d["message"].as_str().unwrap().contains("`per`"), "{v}");
    assert_eq!(
        api.call(M::POST, "/v1/plans", Some(plan(json!("0.30"))))
            .await
            .0,
        201
    );
}

/// The start of the current month (the open period).
fn invoice_month_start() -> chrono::DateTime<Utc> {
    billing_api::invoice::month_of(Utc::now()).start
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_carries_the_envelope() {
    let api = Api::start("apienvelope").await;
    // Invalid UTF-8 in a path segment (the Path extractor's rejection).
    let (s, v) = api.call(M::GET, "/v1/customers/%FF%FE", None).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["code"], "bad_request", "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    // A wrong method, on a route and on a route behind authentication.
    for (m, path) in [
        (M::DELETE, "/v1/plans"),
        (M::PUT, "/healthz"),
        (M::GET, "/v1/stripe/webhook"),
    ] {
        let (s, v) = api.call(m.clone(), path, None).await;
        assert_eq!(s, 405, "{m} {path}: {v}");
        assert_eq!(v["code"], "method_not_allowed", "{m} {path}: {v}");
    }
    // Unknown paths.
    for path in ["/nope", "/v1/customers/x/nope", "/v2/plans"] {
        let (s, v) = api.call(M::GET, path, None).await;
        assert_eq!(s, 404, "{path}: {v}");
        assert_eq!(v["code"], "not_found", "{path}: {v}");
    }
    // A bad query string.
    let (s, v) = api.call(M::GET, "/v1/customers?limit=x", None).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["code"].is_string() && v["message"].is_string(), "{v}");
}

/// Item 9: hyper answers a head it cannot parse before the router sees it
/// (a 100 kB path: 414); the `billing-api serve` process answers that with
/// the envelope too, and a normal request on the same server still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uri_over_the_limit_gets_the_envelope_from_the_real_server() {
    use std::process::Stdio;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (url, _st, _pool) = pg("apiedges_uri").await;
    let (ch, db, _usage) = clickhouse("apiedges_uri").await;
    let Served {
        mut child,
        port,
        base,
    } = spawn_serve(&url, &ch, &db, "edges-key", &[], Stdio::null()).await;
    let http = reqwest::Client::new();

    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    // A normal request first on the kept-alive connection.
    s.write_all(b"GET /v1/plans HTTP/1.1\r\nhost: x\r\nauthorization: Bearer edges-key\r\n\r\n")
        .await
        .unwrap();
    let (status, head, body) = read_one(&mut s).await;
    assert_eq!(status, 200, "{head}");
    let plans: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(plans.as_array().map(Vec::len), Some(4), "{plans}");
    let long = format!(
        "GET /v1/customers/{} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer edges-key\r\n\r\n",
        "c".repeat(100_000)
    );
    // The server may answer and close before it has read all of it.
    let _ = s.write_all(long.as_bytes()).await;
    let (status, head, body) =
        tokio::time::timeout(std::time::Duration::from_secs(10), read_one(&mut s))
            .await
            .expect("an answer to the long path");
    let mut rest = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("closed after the 414")
        .unwrap();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 414, "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(says(&v, "uri_too_long", &["longer"]), "{v}");

    // The server still answers, on a new connection.
    let r = http
        .get(format!("{base}/v1/plans"))
        .bearer_auth("edges-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s404, v) = {
        let r = http
            .get(format!("{base}/v1/nothing-here"))
            .bearer_auth("edges-key")
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(s404, 404, "{v}");
    assert!(v["code"].is_string(), "{v}");

    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no exit after SIGTERM"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
}
