//! The `billing-api serve` process: loads the catalog at start, answers
//! the API, its scheduler finalizes closed periods by itself, the staff
//! command line (`billing-api admin`) finds a customer, previews and
//! confirms a switch, lists and withdraws a scheduled switch and reads the
//! audit log through it, and SIGTERM stops it cleanly.

use testkit::billing as support;
use testkit::served;

use billing_api::invoice::{month_of, previous};
use billing_api::state::{Customer, NewSubscription, StateStore};
use chrono::{Duration, Utc};
use served::*;
use std::process::Command;
use std::time::Instant;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_loads_catalog_finalizes_and_stops_on_sigterm() {
    let (url, st, _pool) = pg("serve").await;
    let (ch, db, usage) = clickhouse("serve").await;
    // No catalog yet: serve publishes the default one at start.
    let hash = hash_key("serve-key");
    let log = std::fs::File::create(std::env::temp_dir().join(format!("serve-{db}.log"))).unwrap();
    let Served {
        mut child, base, ..
    } = spawn_serve(
        &url,
        &ch,
        &db,
        "serve-key",
        &["--finalize-every-secs", "1"],
        log.into(),
    )
    .await;
    let http = reqwest::Client::new();
    let plans: serde_json::Value = http
        .get(format!("{base}/v1/plans"))
        .bearer_auth("serve-key")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        plans.as_array().unwrap().len(),
        4,
        "default catalog published"
    );

    // The cost dashboard's assets are compiled in and served with a CSP.
    let page = http.get(format!("{base}/dashboard")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));
    assert!(page.text().await.unwrap().contains("/dashboard/app.js"));
    for (asset, ty) in [("app.js", "text/javascript"), ("app.css", "text/css")] {
        let r = http
            .get(format!("{base}/dashboard/{asset}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{asset}");
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with(ty));
    }
    let r = http
        .get(format!("{base}/dashboard/secrets.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Alert flags are checked at start, naming the flag.
    let bad = Command::new(env!("CARGO_BIN_EXE_billing-api"))
        .args(["serve", "--alert-webhook-url", "http://127.0.0.1:9/hook"])
        .env("TALLY_DATABASE_URL", &url)
        .env("TALLY_ADMIN_KEY_SHA256", &hash)
        .env_remove("TALLY_ALERT_WEBHOOK_SECRET")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--alert-webhook-secret"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_billing-api"))
        .args(["serve", "--alert-thresholds", "50,lots"])
        .env("TALLY_DATABASE_URL", &url)
        .env("TALLY_ADMIN_KEY_SHA256", &hash)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--alert-thresholds"));

    // A customer with last month's usage is invoiced by the scheduler.
    let q = previous(month_of(Utc::now()));
    st.create_customer(
        &Customer {
            id: "cus_s".into(),
            external_id: "s".into(),
            name: "S".into(),
        },
        "test",
    )
    .await
    .unwrap();
    // Usage first: the running scheduler finalizes as soon as the
    // subscription exists.
    Writer::new(usage)
        .write(&[(
            "s1".into(),
            "cus_s",
            q.start + Duration::days(1),
            "tally.requests",
            requests("web", 5_000_000),
        )])
        .await;
    st.subscribe("cus_s", &NewSubscription::new("payg", 1, q.start), "test")
        .await
        .unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let invs = st.invoices_of("cus_s").await.unwrap();
        if let Some(inv) = invs.first() {
            assert_eq!(inv.total, rust_decimal::Decimal::new(200, 2));
            break;
        }
        assert!(Instant::now() < deadline, "scheduler did not finalize");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let m = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("tally_billing_invoices_finalized_total 1"),
        "{m}"
    );

    // The staff command line, through the running API.
    let admin = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_billing-api"))
            .args(["admin", "--url", &base, "--as", "carol"])
            .args(args)
            .env("TALLY_ADMIN_KEY", "serve-key")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = admin(&["find", "s"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("cus_s") && out.contains("plan: payg v1"),
        "{out}"
    );
    let (ok, out, _) = admin(&["preview", "cus_s", "team"]);
    assert!(
        ok && out.contains("with the switch") && out.contains("difference so far"),
        "{out}"
    );
    let (ok, out, _) = admin(&["switch", "cus_s", "team"]);
    assert!(ok && out.contains("not switched"), "{out}");
    assert!(
        !st.audit_log("customer:cus_s")
            .await
            .unwrap()
            .iter()
            .any(|e| e.action == "subscription.switch"),
        "a switch without --yes changed something"
    );
    let (ok, out, err) = admin(&["switch", "cus_s", "team", "--at-period-end", "--yes"]);
    assert!(
        ok && out.contains("switched cus_s to team v1"),
        "{out}{err}"
    );
    let (_, out, _) = admin(&["find", "cus_s"]);
    assert!(
        out.contains("plan: payg v1") && out.contains("scheduled: team v1"),
        "{out}"
    );
    let (ok, out, _) = admin(&["audit", "cus_s"]);
    assert!(
        ok && out.contains("subscription.switch") && out.contains("/carol"),
        "{out}"
    );

    // Scheduled changes: listed with their ids, withdrawn by id; errors
    // name the flag.
    let (ok, out, err) = admin(&["scheduled-changes", "list", "--customer", "cus_s"]);
    assert!(ok && out.contains(": team v1 from "), "{out}{err}");
    let (ok, out, err) = admin(&["--json", "scheduled-changes", "list", "--customer", "cus_s"]);
    assert!(ok, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    let change = listed[0]["id"].as_i64().expect("a change id");
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let change_s = change.to_string();
    for (args, words) in [
        (&["scheduled-changes", "list"][..], &["--customer"][..]),
        (
            &["scheduled-changes", "list", "--customer", "nobody"],
            &["--customer nobody", "404"],
        ),
        (
            &["scheduled-changes", "withdraw", "--change", &change_s],
            &["--customer"],
        ),
        (
            &[
                "scheduled-changes",
                "withdraw",
                "--customer",
                "cus_s",
                "--change",
                "abc",
            ],
            &["--change", "abc"],
        ),
        (
            &["scheduled-changes", "withdraw", "--customer", "cus_s"],
            &["--change"],
        ),
        (
            &[
                "scheduled-changes",
                "withdraw",
                "--customer",
                "cus_s",
                "--change",
                "987654",
            ],
            &["--change 987654", "404"],
        ),
    ] {
        let (ok, out, err) = admin(args);
        assert!(!ok, "{args:?}: {out}");
        for w in words {
            assert!(err.contains(w), "{args:?} should say {w}: {err}");
        }
    }
    let withdraw = [
        "scheduled-changes",
        "withdraw",
        "--customer",
        "cus_s",
        "--change",
        &change_s,
    ];
    let (ok, out, err) = admin(&withdraw);
    assert!(
        ok && out.contains(&format!("withdrew change {change} of cus_s: team v1 from ")),
        "{out}{err}"
    );
    // Again: the same change (safe to retry).
    let (ok, again, err) = admin(&withdraw);
    assert!(ok && again == out, "{again}{err}");
    let (ok, out, err) = admin(&["scheduled-changes", "list", "--customer", "cus_s"]);
    assert!(
        ok && out.contains("no scheduled changes for cus_s"),
        "{out}{err}"
    );
    let (_, out, _) = admin(&["find", "cus_s"]);
    assert!(
        out.contains("plan: payg v1") && !out.contains("scheduled:"),
        "{out}"
    );
    let (ok, out, _) = admin(&["audit", "cus_s"]);
    assert!(
        ok && out.contains("subscription.withdraw") && out.contains("/carol"),
        "{out}"
    );
    // Cancellation (issue 13): without --yes nothing happens; scheduled at
    // the period end, shown by find, withdrawn; a bad instant names --at.
    let (ok, out, _) = admin(&["cancel", "cus_s", "--at-period-end"]);
    assert!(ok && out.contains("not cancelled"), "{out}");
    assert!(!st
        .audit_log("customer:cus_s")
        .await
        .unwrap()
        .iter()
        .any(|e| e.action == "subscription.cancel"));
    let (ok, out, err) = admin(&["cancel", "cus_s", "--at-period-end", "--yes"]);
    assert!(
        ok && out.contains("cancelled cus_s effective "),
        "{out}{err}"
    );
    let (_, out, _) = admin(&["find", "cus_s"]);
    assert!(
        out.contains("cancelled at ") && out.contains("billed from day 1"),
        "{out}"
    );
    let (ok, out, err) = admin(&["uncancel", "cus_s"]);
    assert!(
        ok && out.contains("withdrew the cancellation of cus_s: payg v1 runs on"),
        "{out}{err}"
    );
    let (_, out, _) = admin(&["find", "cus_s"]);
    assert!(!out.contains("cancelled at"), "{out}");
    // A plan billing its fees in advance: `find` says so, beside the
    // latest invoices.
    let mut adv = st.plan_version("payg", 1).await.unwrap();
    adv.plan = "payg_adv".into();
    adv.flat_fee = rust_decimal::Decimal::from(20);
    adv.fee_timing = billing_api::catalog::FeeTiming::InAdvance;
    st.publish_plan(&adv, "test").await.unwrap();
    let (ok, out, err) = admin(&["switch", "cus_s", "payg_adv", "--yes"]);
    assert!(ok, "{out}{err}");
    let (_, out, _) = admin(&["find", "cus_s"]);
    assert!(
        out.contains("plan: payg_adv v1")
            && out.contains("fees billed in advance")
            && out.contains(&format!(
                "invoice TALLY-000001 period {}: 2.00 USD due 2.00",
                q.start.format("%Y-%m")
            )),
        "{out}"
    );
    // Credit from the command line: a grant under a key (a repeat answers
    // the first grant), its ledger, its void; bad flags named.
    let grant_args = [
        "credit",
        "grant",
        "--customer",
        "cus_s",
        "--amount",
        "5.00",
        "--reason",
        "goodwill",
        "--key",
        "cli-1",
    ];
    let (ok, out, err) = admin(&grant_args);
    assert!(
        ok && out.contains("promotional 5.00 USD, 5.00 left"),
        "{out}{err}"
    );
    let id = out.split_whitespace().nth(1).unwrap().to_owned();
    let (ok, again, _) = admin(&grant_args);
    assert!(ok && again.contains(&id), "{again}");
    let (ok, _, err) = admin(&["credit", "grant", "--customer", "cus_s", "--amount", "0"]);
    assert!(
        !ok && err.contains("--customer cus_s: 422") && err.contains("amount"),
        "{err}"
    );
    let (ok, _, err) = admin(&[
        "credit",
        "grant",
        "--customer",
        "cus_s",
        "--amount",
        "1",
        "--expires",
        "soon",
    ]);
    assert!(!ok && err.contains("--expires"), "{err}");
    let (ok, out, err) = admin(&["credit", "void", "--customer", "cus_s", "--grant", &id]);
    assert!(ok && out.contains("0 left, voided at"), "{out}{err}");
    let (ok, out, err) = admin(&["credit", "ledger", "--customer", "cus_s"]);
    assert!(
        ok && out.contains("balance: 0 USD")
            && out.contains("grant")
            && out.contains("void")
            && out.contains("-5.00"),
        "{out}{err}"
    );
    let (ok, _, err) = admin(&[
        "credit",
        "void",
        "--customer",
        "cus_s",
        "--grant",
        "gr_nope",
    ]);
    assert!(!ok && err.contains("--grant gr_nope: 404"), "{err}");
    let (ok, _, err) = admin(&["cancel", "cus_s", "--at", "tomorrow", "--yes"]);
    assert!(!ok && err.contains("--at"), "{err}");
    let (ok, out, err) = admin(&["preview", "cus_s", "team", "--at", "2099-01-01T00:00:00Z"]);
    assert!(!ok && err.contains("422 invalid: at:"), "{out}{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_billing-api"))
        .args(["admin", "--url", &base, "--key", "wrong", "find", "s"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401 unauthorized"));

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
}
