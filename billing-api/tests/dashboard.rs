//! The customer cost dashboard in headless Chromium (Debian's `chromium`,
//! driven by `chromedriver` over the WebDriver protocol): it loads with a
//! customer session, draws the daily chart, shows the API's figures, and
//! changes the spending cap from the page. A screenshot is written to
//! `target/test-artifacts/dashboard.png`.

use testkit::billing as support;

use billing_api::invoice::{month_of, previous};
use chrono::{Duration, Utc};
use reqwest::Method as M;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use support::*;

/// A chromedriver process with one Chromium session; both end on drop.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    async fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver must be installed (ops/install.sh installs chromium-driver)");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let mut ready = false;
        for _ in 0..100 {
            if let Ok(r) = http.get(format!("{base}/status")).send().await {
                let v: Value = r.json().await.unwrap_or_default();
                if v["value"]["ready"] == true {
                    ready = true;
                    break;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(ready, "chromedriver did not become ready");
        let profile = tempfile::tempdir().unwrap();
        // Flags: INFRA notes that without the background-networking ones
        // Chromium keeps dialing Google's hosts on this closed network.
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,1600",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }
        }}});
        let r: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {r}"))
            .to_owned();
        Browser {
            driver,
            base,
            session,
            http,
            _profile: profile,
        }
    }

    async fn cmd(&self, m: M, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut r = self.http.request(m.clone(), url);
        if m != M::GET {
            r = r.json(&body);
        }
        let v: Value = r.send().await.unwrap().json().await.unwrap();
        let failed = v["value"]["error"].is_string() && v["value"]["message"].is_string();
        assert!(!failed, "WebDriver {path} failed: {v}");
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(M::POST, "/url", json!({ "url": url })).await;
    }

    /// Runs `script` (a function body) in the page and returns its value.
    async fn js(&self, script: &str) -> Value {
        self.cmd(
            M::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    async fn wait_for(&self, script: &str, what: &str) -> Value {
        for _ in 0..200 {
            let v = self.js(script).await;
            if !v.is_null() && v != false {
                return v;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("timed out waiting for {what}");
    }

    async fn element(&self, testid: &str) -> String {
        let v = self
            .cmd(
                M::POST,
                "/element",
                json!({"using": "css selector", "value": format!("[data-testid=\"{testid}\"]")}),
            )
            .await;
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .expect("element reference")
            .to_owned()
    }

    async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let v = self.cmd(M::GET, "/screenshot", Value::Null).await;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    }
}

fn dec(v: &Value) -> Decimal {
    v.as_str()
        .unwrap_or_else(|| panic!("not a decimal string: {v}"))
        .parse()
        .unwrap()
}

/// `(key, amount)` pairs of a JSON list of `{key, amount}` (or of the given fields).
fn pairs(v: &Value, key: &str, amount: &str) -> Vec<(String, Decimal)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| (x[key].as_str().unwrap().to_owned(), dec(&x[amount])))
        .collect()
}

/// What the page shows, read from its DOM.
const READ_PAGE: &str = r#"
const q = (id) => document.querySelector(`[data-testid="${id}"]`);
const rows = (id, key) => [...q(id).querySelectorAll("tbody tr[data-" + key + "]")].map((tr) => {
  const cells = [...tr.querySelectorAll("td")];
  return { key: tr.getAttribute("data-" + key), values: cells.filter((c) => c.dataset.value !== undefined).map((c) => c.dataset.value),
           text: cells.map((c) => c.textContent) };
});
return {
  customer: q("customer").textContent,
  plan: q("plan").textContent, lifecycle: q("lifecycle").textContent,
  mtd: q("month-to-date").dataset.value, mtd_text: q("month-to-date").textContent,
  forecast: q("forecast").dataset.value, forecast_text: q("forecast").textContent,
  cap: q("spending-cap").dataset.value, cap_text: q("spending-cap").textContent,
  credit: q("credit-balance").dataset.value, expiring: q("credit-expiring").textContent,
  forecast_split: q("forecast-split").textContent, due: q("forecast-due").dataset.value,
  bars: [...q("daily-chart").querySelectorAll("rect.bar")].map((b) => ({ key: b.dataset.date, amount: b.dataset.value, h: Number(b.getAttribute("height")) })),
  meters: rows("by-meter", "key"), apps: rows("by-app", "key"),
  advisor: rows("advisor", "plan"), invoices: rows("invoices", "invoice"),
  error: q("error").hidden ? null : q("error").textContent,
};
"#;

fn cells(rows: &Value) -> Vec<(String, Vec<Decimal>)> {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_owned(),
                r["values"].as_array().unwrap().iter().map(dec).collect(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_chromium_shows_the_api_figures_and_sets_the_cap() {
    let api = Api::start("dashboard").await;
    let now = Utc::now();
    let period = month_of(now);
    let prev = previous(period);
    // Usage on up to five days of this month (fewer early on the 1st),
    // across apps and meters, and some last month for an invoice.
    let mut events = Vec::new();
    for k in 0..5i64 {
        let t = (now - Duration::days(k) - Duration::minutes(5)).max(period.start);
        let n = (k + 1) * 1000;
        events.push((
            format!("c{k}"),
            "cus_d",
            t,
            "tally.compute",
            compute("web", "t4g.small", 36 * n),
        ));
        events.push((
            format!("a{k}"),
            "cus_d",
            t,
            "tally.compute",
            compute("worker", "c6g.large", 18 * n),
        ));
        events.push((
            format!("r{k}"),
            "cus_d",
            t,
            "tally.requests",
            requests("web", 700 * n),
        ));
    }
    events.push((
        "p1".into(),
        "cus_d",
        prev.start + Duration::days(3),
        "tally.compute",
        compute("web", "c6g.xlarge", 360_000),
    ));
    Writer::new(api.usage.clone()).write(&events).await;
    let (s, v) = api
        .call(
            M::POST,
            "/v1/customers",
            Some(json!({"id": "cus_d", "external_id": "cus_d", "name": "Dee"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = api
        .call(
            M::POST,
            "/v1/customers/cus_d/subscription",
            Some(json!({"plan": "payg", "starts_at": prev.start})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let fin = finalizer(api.st.clone(), api.usage.clone(), 100);
    let rep = fin
        .run_once(period.start + Duration::days(1))
        .await
        .unwrap();
    assert_eq!(rep.finalized, 1, "{rep:?}");
    // Cancelled at the period end (issue 13): the page says so.
    let (s, v) = api
        .call(
            M::POST,
            "/v1/customers/cus_d/cancellation",
            Some(json!({"effective": "period_end"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    // Credit expiring in ten days, a 10 % coupon and 20 % VAT (issue 14):
    // the page shows the balance, what expires, and the month settled.
    let expires = billing_api::wire::to_micros(Utc::now()) + Duration::days(10);
    for (path, body) in [
        (
            "/v1/customers/cus_d/credit-grants",
            json!({"kind": "promotional", "amount": "3.00", "expires_at": expires}),
        ),
        (
            "/v1/coupons",
            json!({"id": "ten", "name": "Ten", "percent_off": "10", "duration": "forever"}),
        ),
        ("/v1/customers/cus_d/coupons", json!({"coupon": "ten"})),
        (
            "/v1/tax-rates",
            json!({"id": "vat", "name": "VAT", "country": "FR", "percentage": "20"}),
        ),
    ] {
        let (s, v) = api.call(M::POST, path, Some(body)).await;
        assert_eq!(s, 201, "{path}: {v}");
    }
    let (s, v) = api
        .call(
            M::PUT,
            "/v1/customers/cus_d/tax-profile",
            Some(json!({"country": "FR"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    api.quota.refresh(Utc::now()).await.unwrap();
    let (_, sess) = api
        .call(M::POST, "/v1/customers/cus_d/sessions", Some(json!({})))
        .await;
    let token = sess["token"].as_str().unwrap().to_owned();

    let browser = Browser::start().await;
    browser
        .goto(&format!("{}/dashboard#token={token}", api.base))
        .await;
    let state = browser
        .wait_for(
            "return document.body.dataset.loaded || null;",
            "the page to load",
        )
        .await;
    let page = browser.js(READ_PAGE).await;
    assert_eq!(state, "true", "{page}");
    // The token left the address bar.
    let url = browser.js("return location.href;").await;
    assert!(!url.as_str().unwrap().contains("token"), "{url}");

    // The API, with the same credential.
    let get = |path: String| {
        let (api, token) = (&api, token.clone());
        async move {
            let (s, v) = api.call_as(&token, M::GET, &path, None).await;
            assert_eq!(s, 200, "{path}: {v}");
            v
        }
    };
    // As of the instant the page showed (forecasts move with the clock).
    let at = browser.js("return document.body.dataset.asOf;").await;
    let at = at
        .as_str()
        .expect("the page records its as_of")
        .replace('+', "%2B");
    let costs = get(format!("/v1/customers/cus_d/costs?at={at}")).await;
    let adv = get(format!("/v1/customers/cus_d/plan-advisor?at={at}")).await;
    let invoices = get("/v1/customers/cus_d/invoices".into()).await;

    assert_eq!(page["customer"], "cus_d");
    assert_eq!(page["plan"], "Pay as you go (v1)", "{page}");
    assert_eq!(
        page["lifecycle"],
        format!("· cancels on {}", period.end.format("%Y-%m-%d")),
        "{page}"
    );
    assert_eq!(dec(&page["mtd"]), dec(&costs["month_to_date"]));
    assert_eq!(dec(&page["forecast"]), dec(&costs["forecast"]));
    assert!(dec(&costs["month_to_date"]) > Decimal::ZERO, "{costs}");
    assert_eq!(
        page["mtd_text"].as_str().unwrap(),
        format!("${:.2}", dec(&costs["month_to_date"]))
    );
    // The chart: one bar per day so far, with the API's amounts, drawn.
    assert_eq!(
        pairs(&page["bars"], "key", "amount"),
        pairs(&costs["daily"], "date", "amount")
    );
    assert!(
        page["bars"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["h"].as_f64().unwrap() > 1.0),
        "no bar was drawn: {page}"
    );
    let one = |v: &Value| -> Vec<(String, Vec<Decimal>)> {
        pairs(v, "key", "amount")
            .into_iter()
            .map(|(k, a)| (k, vec![a]))
            .collect()
    };
    assert_eq!(cells(&page["meters"]), one(&costs["by_meter"]));
    assert_eq!(cells(&page["apps"]), one(&costs["by_app"]));
    let advisor: Vec<(String, Vec<Decimal>)> = adv["plans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["plan"].as_str().unwrap().to_owned(),
                vec![
                    dec(&p["month_to_date"]),
                    dec(&p["forecast"]),
                    dec(&p["forecast_total"]),
                    dec(&p["saving"]),
                ],
            )
        })
        .collect();
    assert_eq!(cells(&page["advisor"]), advisor);
    assert_eq!(advisor.len(), 4);
    let inv = &invoices[0];
    assert_eq!(
        cells(&page["invoices"]),
        vec![(
            inv["number"].as_str().unwrap().to_owned(),
            [
                "discount_total",
                "tax_total",
                "total",
                "credit_total",
                "amount_due"
            ]
            .iter()
            .map(|k| dec(&inv[*k]))
            .collect()
        )]
    );
    // The month settled: credit, what expires, discounts and tax.
    let st = &costs["settlement"];
    assert_eq!(
        (dec(&page["credit"]), dec(&st["credit_balance"])),
        (Decimal::new(300, 2), Decimal::new(300, 2)),
        "{page}"
    );
    assert_eq!(
        page["expiring"].as_str().unwrap(),
        format!("$3.00 expires {}", expires.format("%Y-%m-%d"))
    );
    assert_eq!(dec(&page["due"]), dec(&st["forecast_due"]));
    let (fd, ft) = (dec(&st["forecast_discounts"]), dec(&st["forecast_tax"]));
    let mut want = String::new();
    if !fd.is_zero() {
        want += &format!("discounts −${:.2} · ", -fd);
    }
    if !ft.is_zero() {
        want += &format!("tax ${ft:.2} · ");
    }
    want += &format!("total ${:.2}", dec(&st["forecast_total"]));
    assert_eq!(page["forecast_split"].as_str().unwrap(), want);
    assert!(ft > Decimal::ZERO, "{st}");
    // 10 % off then 20 %: the forecast settled is 1.08 × the forecast,
    // give or take the rounding of each step.
    let f = dec(&costs["forecast"]);
    let diff = (dec(&st["forecast_total"]) - f * Decimal::new(108, 2)).abs();
    assert!(diff <= Decimal::new(2, 2), "{st}");
    assert!(dec(&inv["total"]) > Decimal::ZERO);
    let inv_text = page["invoices"][0]["text"].to_string();
    assert!(inv_text.contains("open"), "{inv_text}");

    std::fs::create_dir_all("../target/test-artifacts").unwrap();
    let png = browser.screenshot().await;
    assert_eq!(&png[..4], b"\x89PNG");
    std::fs::write("../target/test-artifacts/dashboard.png", &png).unwrap();

    // The cap, from the page: typed, saved, shown, and in force for quota.
    assert_eq!(page["cap_text"], "No cap");
    let input = browser.element("cap-input").await;
    browser
        .cmd(
            M::POST,
            &format!("/element/{input}/value"),
            json!({"text": "12.50"}),
        )
        .await;
    let save = browser.element("cap-save").await;
    browser
        .cmd(M::POST, &format!("/element/{save}/click"), json!({}))
        .await;
    let outcome = browser
        .wait_for(
            r#"return document.querySelector('[data-testid="cap-status"]').dataset.state || null;"#,
            "the cap to be saved",
        )
        .await;
    assert_eq!(outcome, "saved");
    let page = browser.js(READ_PAGE).await;
    assert_eq!(dec(&page["cap"]), "12.50".parse::<Decimal>().unwrap());
    assert_eq!(page["cap_text"], "$12.50");
    let costs = get("/v1/customers/cus_d/costs".into()).await;
    assert_eq!(
        dec(&costs["spending_cap"]),
        "12.5".parse::<Decimal>().unwrap()
    );
    assert_eq!(
        api.quota.entry("cus_d").unwrap().spending_cap,
        Some("12.5".parse().unwrap())
    );
    let (_, audit) = api
        .call(M::GET, "/v1/audit?subject=customer:cus_d", None)
        .await;
    assert!(
        audit.to_string().contains("customer:cus_d"),
        "cap change not audited with the customer as actor: {audit}"
    );

    // A bad amount is refused on the page and changes nothing.
    browser
        .cmd(M::POST, &format!("/element/{input}/clear"), json!({}))
        .await;
    browser
        .cmd(
            M::POST,
            &format!("/element/{input}/value"),
            json!({"text": "lots"}),
        )
        .await;
    browser
        .cmd(M::POST, &format!("/element/{save}/click"), json!({}))
        .await;
    let status = browser
        .js(r#"return document.querySelector('[data-testid="cap-status"]').dataset.state;"#)
        .await;
    assert_eq!(status, "error");
    assert_eq!(
        api.quota.entry("cus_d").unwrap().spending_cap,
        Some("12.5".parse().unwrap())
    );

    // Without a token the page says what it needs.
    browser.js("sessionStorage.clear(); return null;").await;
    browser.goto(&format!("{}/dashboard", api.base)).await;
    let err = browser
        .wait_for(
            r#"const e = document.querySelector('[data-testid="error"]'); return e.hidden ? null : e.textContent;"#,
            "the error",
        )
        .await;
    assert!(err.as_str().unwrap().contains("token"), "{err}");
}

/// Issue 13, fees in advance: the header says the plan bills its fees in
/// advance, and the opening invoice is listed by the day its fees start,
/// beside the period's own invoice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_fees_billed_in_advance() {
    let api = Api::start("dashboard_adv").await;
    let prev = previous(month_of(Utc::now()));
    let (s, v) = api
        .call(
            M::POST,
            "/v1/plans",
            Some(
                json!({"plan": "pro", "version": 1, "name": "Pro", "currency": "USD",
                "flat_fee": "20", "fee_timing": "in_advance"}),
            ),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = api
        .call(
            M::POST,
            "/v1/customers",
            Some(json!({"id": "cus_p", "external_id": "cus_p", "name": "Pat"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let start = prev.start + Duration::days(10);
    let (s, v) = api
        .call(
            M::POST,
            "/v1/customers/cus_p/subscription",
            Some(json!({"plan": "pro", "starts_at": start})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let fin = finalizer(api.st.clone(), api.usage.clone(), 100);
    assert_eq!(
        fin.run_once(prev.end + Duration::hours(2))
            .await
            .unwrap()
            .finalized,
        2
    );
    api.quota.refresh(Utc::now()).await.unwrap();
    let (_, sess) = api
        .call(M::POST, "/v1/customers/cus_p/sessions", Some(json!({})))
        .await;
    let token = sess["token"].as_str().unwrap().to_owned();
    let browser = Browser::start().await;
    browser
        .goto(&format!("{}/dashboard#token={token}", api.base))
        .await;
    browser
        .wait_for(
            "return document.body.dataset.loaded || null;",
            "the page to load",
        )
        .await;
    let page = browser.js(READ_PAGE).await;
    assert_eq!(page["lifecycle"], "· fees billed in advance", "{page}");
    let periods: Vec<String> = page["invoices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["text"][1].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        periods,
        [
            prev.start.format("%Y-%m").to_string(),
            format!("fees from {}", start.format("%Y-%m-%d")),
        ],
        "{page}"
    );
}
