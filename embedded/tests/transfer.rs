//! Moving from embedded to distributed: a data directory with customers,
//! plans, seats, usage, finalized invoices, a late-usage adjustment, keys,
//! caps and audit entries is exported (`tally export`), imported into a new
//! PostgreSQL and ClickHouse database (`tally import`), and the distributed
//! services started on them answer exactly as the embedded process did.
//! They then carry on: new usage is added, an imported event sent again is
//! deduplicated, and invoice numbers continue. An import into a non-empty
//! database is refused.

use testkit::system as support;

use billing_api::invoice::{month_of, previous};
use chrono::{Duration, Utc};
use reqwest::Method as M;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration as StdDuration;
use support::pipeline::{bin, Env};
use support::{pg_database, requests, System};

/// What the billing API says about everything that was moved.
async fn snapshot(sys: &System) -> Vec<(String, Value)> {
    let mut paths: Vec<String> = vec![
        "/v1/plans".into(),
        "/v1/customers".into(),
        "/v1/keys".into(),
        "/v1/audit?subject=plan:payg".into(),
    ];
    for c in ["cus_a", "cus_b"] {
        for p in ["", "/invoices", "/apps"] {
            paths.push(format!("/v1/customers/{c}{p}"));
        }
        paths.push(format!("/v1/audit?subject=customer:{c}"));
    }
    let mut out = Vec::new();
    for p in paths {
        let (s, v) = sys.api(M::GET, &p, None).await;
        assert_eq!(s, 200, "{p}: {v}");
        out.push((p, v));
    }
    // The draft up to a fixed instant is comparable; its open segment ends
    // "now", so keep the figures.
    for c in ["cus_a", "cus_b"] {
        let (s, d) = sys
            .api(M::GET, &format!("/v1/customers/{c}/invoices/draft"), None)
            .await;
        assert_eq!(s, 200, "{d}");
        let amounts: Vec<Value> = d["body"]["lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| json!([l["kind"], l["plan"], l["meter"], l["quantity"], l["amount"]]))
            .collect();
        out.push((
            format!("draft {c}"),
            json!({"total": d["total"], "lines": amounts, "adjustments": d["body"]["adjustments"]}),
        ));
    }
    out
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_import_carries_on_in_distributed_mode() {
    let wait = StdDuration::from_secs(90);
    let mut emb = System::embedded("transfer", None);
    let now = Utc::now();
    let (cur, prev) = (month_of(now), previous(month_of(now)));
    let this_month = (now - Duration::seconds(2)).max(cur.start);
    for (id, plan) in [("cus_a", "payg"), ("cus_b", "team")] {
        emb.customer(id, plan, prev.start).await;
        let (s, v) = emb
            .api(
                M::POST,
                &format!("/v1/customers/{id}/apps"),
                Some(json!({"app": "web", "name": "Web"})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }
    let (s, v) = emb
        .api(
            M::PUT,
            "/v1/customers/cus_b/seats",
            Some(json!({"seats": 3, "at": prev.start})),
        )
        .await;
    assert!((200..300).contains(&s), "{v}");
    let (s, v) = emb
        .api(
            M::POST,
            "/v1/keys",
            Some(json!({"role": "control-plane", "label": "deploy"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, _) = emb
        .api(
            M::PUT,
            "/v1/customers/cus_a/spending-cap",
            Some(json!({"spending_cap": "250.00"})),
        )
        .await;
    assert_eq!(s, 204);
    let events = vec![
        requests(
            "a-1",
            "cus_a",
            "web",
            prev.start + Duration::days(2),
            3_000_000,
        ),
        requests(
            "b-1",
            "cus_b",
            "web",
            prev.start + Duration::days(2),
            7_000_000,
        ),
        requests("a-2", "cus_a", "web", this_month, 1_000_000),
    ];
    let (s, v) = emb.ingest(&events).await;
    assert_eq!(s, 200, "{v}");
    let out = emb.finalize(now);
    assert!(out.contains("finalized 2 invoice(s)"), "{out}");
    // Late usage of the invoiced month: an adjustment in A's draft.
    let (s, v) = emb
        .ingest(&[requests(
            "a-late",
            "cus_a",
            "web",
            prev.start + Duration::days(3),
            500_000,
        )])
        .await;
    assert_eq!(s, 200, "{v}");
    let before = snapshot(&emb).await;
    let draft_a = &before.iter().find(|(k, _)| k == "draft cus_a").unwrap().1;
    assert_eq!(
        draft_a["adjustments"].as_array().unwrap().len(),
        1,
        "{draft_a}"
    );
    assert!(emb.terminate(), "tally serve exits 0 on SIGTERM");

    // Export, then import into new databases.
    let dump = emb.dir.join("dump");
    let (ok, out) = run(Command::new(bin("tally"))
        .args(["export", "--data-dir"])
        .arg(&emb.dir)
        .arg("--out")
        .arg(&dump));
    assert!(ok, "{out}");
    assert!(out.contains("\"usage/usage_events\": 4"), "{out}");
    let env = Env::new("transfer");
    let db = pg_database("transfer").await;
    let import = |db: &str| {
        let mut c = Command::new(bin("tally"));
        c.arg("import")
            .arg("--from")
            .arg(&dump)
            .args(["--database-url", db])
            .args(["--clickhouse-url", &env.clickhouse_url])
            .args(["--clickhouse-database", &env.database]);
        run(&mut c)
    };
    let (ok, out) = import(&db);
    assert!(ok, "{out}");

    // The distributed services answer as the embedded process did.
    let dist = System::distributed_on(env.clone(), db.clone());
    let after = snapshot(&dist).await;
    for ((k, a), (_, b)) in before.iter().zip(&after) {
        assert_eq!(a, b, "{k} differs after the move");
    }
    assert_eq!(before.len(), after.len());

    // ...and carry on: a new event counts, an imported one sent again does not.
    let (s, v) = dist
        .ingest(&[
            requests("a-3", "cus_a", "web", this_month, 2_000_000),
            requests("a-2", "cus_a", "web", this_month, 1_000_000),
        ])
        .await;
    assert_eq!(s, 200, "{v}");
    dist.eventually("the new event in A's draft", wait, || async {
        let (_, d) = dist
            .api(M::GET, "/v1/customers/cus_a/invoices/draft", None)
            .await;
        let q: Vec<&Value> = d["body"]["lines"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["meter"] == "requests")
            .map(|l| &l["quantity"])
            .collect();
        if q == [&json!("3000000")] {
            Ok(())
        } else {
            Err(format!("{q:?}"))
        }
    })
    .await;
    // Invoice numbers continue after the imported ones.
    let out = dist.finalize(cur.end + Duration::hours(2));
    assert!(out.contains("finalized 2 invoice(s)"), "{out}");
    let (_, list) = dist.api(M::GET, "/v1/customers/cus_a/invoices", None).await;
    let numbers: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["number"].as_str().unwrap())
        .collect();
    assert!(
        numbers.contains(&"TALLY-000001")
            && numbers
                .iter()
                .any(|n| *n == "TALLY-000003" || *n == "TALLY-000004"),
        "{numbers:?}"
    );

    // A second import into the same (now non-empty) databases is refused.
    let (ok, out) = import(&db);
    assert!(!ok && out.contains("already holds"), "{out}");
}
