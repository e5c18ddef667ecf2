//! Billing state behind `StateStore`, every scenario written once and run
//! against both implementations: PostgreSQL (TALLY_DATABASE_URL, set by
//! ops/test.sh; the test fails, never skips, without it; a database of its
//! own per test, kept afterwards for inspection) and SQLite (a fresh file in
//! a temporary directory). Raw SQL checks (the triggers) run against both
//! databases.

use testkit::billing as support;

use billing_api::auth::{ApiKey, Role};
use billing_api::catalog::PlanVersion;
use billing_api::invoice::{
    invoice_id, invoice_number, opening_id, CarriedInvoice, InvoiceBody, InvoiceKind, NewInvoice,
};
use billing_api::rating::{rate, Line, Period, SeatInterval, Segment, UsageItem};
use billing_api::state::postgres::PgState;
use billing_api::state::sqlite::{micros, SqliteState};
use billing_api::state::NewSubscription;
use billing_api::state::{
    Alert, AlertOutcome, AlertStatus, App, AuditEntry, Customer, DynStateStore, Invoice, NewAlert,
    PaymentStatus, PlanSegment, PublishedPlan, StateError, StateStore, Subscription, SwitchOutcome,
    SyncStatus,
};
use chrono::{DateTime, Duration, TimeZone, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::Row;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

// ------------------------------------------------------------------ harness

/// Raw SQL against the database behind a store.
enum Raw {
    Pg(sqlx::PgPool),
    Lite(sqlx::SqlitePool),
}

impl Raw {
    /// Runs one statement (`$1`, `$2` … bound to `args`, in both dialects);
    /// rows affected, or the database's error text.
    async fn exec(&self, sql: &str, args: &[&str]) -> Result<u64, String> {
        match self {
            Raw::Pg(p) => {
                let mut q = sqlx::query(sql);
                for a in args {
                    q = q.bind(*a);
                }
                q.execute(p).await.map(|r| r.rows_affected())
            }
            Raw::Lite(p) => {
                let mut q = sqlx::query(sql);
                for a in args {
                    q = q.bind(*a);
                }
                q.execute(p).await.map(|r| r.rows_affected())
            }
        }
        .map_err(|e| e.to_string())
    }
}

/// A fresh, migrated store on one backend.
struct Db {
    st: Arc<DynStateStore<'static>>,
    raw: Raw,
    /// PostgreSQL URL or SQLite file: where another handle connects.
    at: Where,
    _dir: Option<tempfile::TempDir>,
}

enum Where {
    Pg(String),
    Lite(PathBuf),
}

impl Db {
    async fn pg(test: &str) -> Db {
        let (url, st, pool) = support::pg(test).await;
        Db {
            st,
            raw: Raw::Pg(pool),
            at: Where::Pg(url),
            _dir: None,
        }
    }

    async fn sqlite() -> Db {
        let (dir, path, st) = support::sqlite_state().await;
        let raw = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(&path)
                    .busy_timeout(std::time::Duration::from_secs(30)),
            )
            .await
            .unwrap();
        Db {
            st: DynStateStore::from_arc(st),
            raw: Raw::Lite(raw),
            at: Where::Lite(path),
            _dir: Some(dir),
        }
    }

    /// A second, independent handle on the same database, with pools of its
    /// own (as another process would have).
    async fn other(&self) -> Arc<DynStateStore<'static>> {
        match &self.at {
            Where::Pg(url) => DynStateStore::new_arc(PgState::connect(url).await.unwrap()),
            Where::Lite(path) => {
                let st = SqliteState::open(path).await.unwrap();
                st.migrate().await.unwrap();
                DynStateStore::new_arc(st)
            }
        }
    }
}

/// Two tests per scenario: `<scenario>::postgres` and `<scenario>::sqlite`.
macro_rules! on_both {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$scenario(super::Db::pg(stringify!($scenario)).await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$scenario(super::Db::sqlite().await).await
            }
        }
    )*};
}

on_both!(
    history,
    scheduled_changes,
    catalog,
    customers_apps_seats,
    invoices,
    zero_invoice_keeps_its_digits,
    opening_invoices,
    keys_and_quota,
    alerts,
    concurrent_writers,
    credits_ledger,
    coupons_and_taxes,
    one_customers_invoices_in_a_batch_share_its_credit,
);

// ------------------------------------------------------------------ fixtures

fn t(y: i32, m: u32, d: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap()
}

fn nov(day: u32) -> DateTime<Utc> {
    if day == 31 {
        t(2026, 12, 1)
    } else {
        t(2026, 11, day)
    }
}

fn month(y: i32, m: u32) -> Period {
    let end = if m == 12 {
        t(y + 1, 1, 1)
    } else {
        t(y, m + 1, 1)
    };
    Period {
        start: t(y, m, 1),
        end,
    }
}

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

fn plan(v: Value) -> PlanVersion {
    serde_json::from_value(v).unwrap()
}

fn payg(version: u32) -> PlanVersion {
    plan(
        json!({"plan":"payg","version":version,"name":"Pay as you go","currency":"USD","prices":[{"meter":"requests","model":"per_unit","unit_price":"0.0000004"}]}),
    )
}

fn team() -> PlanVersion {
    plan(
        json!({"plan":"team","version":1,"name":"Team","currency":"USD","seat_fee":"15","prices":[{"meter":"requests","model":"graduated",
        "tiers":[{"up_to":"1000000","unit_price":"0"},{"unit_price":"0.0000003"}]}]}),
    )
}

fn customer(id: &str) -> Customer {
    Customer {
        id: id.into(),
        external_id: format!("ext_{id}"),
        name: format!("Customer {id}"),
    }
}

async fn customers(st: &(impl StateStore + ?Sized), ids: &[&str]) {
    for id in ids {
        st.create_customer(&customer(id), "test").await.unwrap();
    }
}

/// The audit log of `subject` is exactly `expected` (actor, action,
/// before, after), with increasing ids, written between `since` and now.
async fn assert_audit(
    st: &(impl StateStore + ?Sized),
    subject: &str,
    since: DateTime<Utc>,
    expected: &[(&str, &str, Option<Value>, Option<Value>)],
) -> Vec<AuditEntry> {
    let log = st.audit_log(subject).await.unwrap();
    let got: Vec<(&str, &str, Option<Value>, Option<Value>)> = log
        .iter()
        .map(|e| {
            assert_eq!(e.subject, subject);
            (
                e.actor.as_str(),
                e.action.as_str(),
                e.before.clone(),
                e.after.clone(),
            )
        })
        .collect();
    assert_eq!(got, expected, "audit log of {subject}");
    assert!(log.windows(2).all(|w| w[0].id < w[1].id), "{log:?}");
    assert_within(log.iter().map(|e| e.at), since);
    log
}

/// Times set by the store's clock: between `since` and now (with a second
/// of slack for PostgreSQL's own clock).
fn assert_within(times: impl IntoIterator<Item = DateTime<Utc>>, since: DateTime<Utc>) {
    let until = Utc::now() + Duration::seconds(1);
    for at in times {
        assert!(
            at >= since - Duration::seconds(1) && at <= until,
            "{at} not in [{since}, {until}]"
        );
    }
}

fn err_kind<T: std::fmt::Debug>(r: Result<T, StateError>) -> &'static str {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code(),
    }
}

/// Lines of a real rating, as evidence in an invoice body.
fn rated_lines(period: Period, requests: &str) -> Vec<Line> {
    let segments = vec![Segment {
        trial: false,
        plan: payg(1),
        start: period.start,
        end: period.end,
        usage: vec![UsageItem {
            meter: "requests".into(),
            dims: Default::default(),
            quantity: d(requests),
            events: 3,
        }],
    }];
    rate(&period, &segments, &[]).unwrap().lines
}

fn new_invoice(
    customer: &str,
    period: Period,
    subtotal: &str,
    carried: Vec<CarriedInvoice>,
    status: SyncStatus,
    lines: Vec<Line>,
) -> NewInvoice {
    let carried_in: Decimal = carried.iter().map(|c| c.total).sum();
    NewInvoice {
        id: invoice_id(customer, period),
        kind: InvoiceKind::Period,
        customer_id: customer.into(),
        period,
        currency: "USD".into(),
        subtotal: d(subtotal),
        adjustments_total: d("0.00"),
        discount_total: d("0.00"),
        tax_total: d("0.00"),
        carried_in,
        total: d(subtotal) + carried_in,
        credit_total: d("0.00"),
        amount_due: d(subtotal) + carried_in,
        body: InvoiceBody {
            lines,
            adjustments: vec![],
            adjusted: None,
            carried,
            unbilled: vec![],
            adjusted_earlier: None,
            minor_units: Some(2),
            fees_period: None,
            settlement: None,
            settled_with: None,
        },
        sync_status: status.into(),
    }
}

/// The invoice `insert_invoices` writes for `n` with number `seq`.
fn finalized(n: &NewInvoice, seq: i64, at: DateTime<Utc>) -> Invoice {
    Invoice {
        id: n.id.clone(),
        kind: n.kind,
        seq,
        number: invoice_number(seq),
        customer_id: n.customer_id.clone(),
        period: n.period,
        currency: n.currency.clone(),
        subtotal: n.subtotal,
        adjustments_total: n.adjustments_total,
        discount_total: n.discount_total,
        tax_total: n.tax_total,
        carried_in: n.carried_in,
        total: n.total,
        credit_total: n.credit_total,
        amount_due: n.amount_due,
        body: n.body.clone(),
        finalized_at: at,
        sync_status: n.sync_status.clone(),
        stripe_invoice_id: None,
        carried_to: None,
        payment_status: PaymentStatus::Open,
        sync_error: None,
    }
}

/// Decimals compare equal across scales: the stored ones must keep the
/// scale too (zero is stored as `0`, as sqlx stores it in PostgreSQL).
fn assert_same_text(stored: &Invoice, new: &Invoice) {
    let text = |d: Decimal| {
        if d.is_zero() {
            "0".to_string()
        } else {
            d.to_string()
        }
    };
    for (x, y) in [
        (stored.subtotal, new.subtotal),
        (stored.adjustments_total, new.adjustments_total),
        (stored.carried_in, new.carried_in),
        (stored.total, new.total),
    ] {
        assert_eq!(x.to_string(), text(y), "{}", stored.id);
    }
    let (a, b) = (stored, new);
    assert_eq!(
        serde_json::to_string(&a.body).unwrap(),
        serde_json::to_string(&b.body).unwrap()
    );
}

// ---------------------------------------------------------------- scenarios

/// Plan history and seats feed the rating engine; every change is audited
/// with before and after; the audit log is append-only.
async fn history(db: Db) {
    let st = db.st.clone();
    let since = Utc::now();
    st.migrate().await.unwrap(); // idempotent
    st.publish_plan(&payg(1), "staff@paas").await.unwrap();
    st.publish_plan(&team(), "staff@paas").await.unwrap();
    assert_eq!(
        err_kind(st.publish_plan(&team(), "staff@paas").await),
        "conflict",
        "a published version is immutable"
    );

    let c = Customer {
        id: "cus_1".into(),
        external_id: "org_42".into(),
        name: "Acme".into(),
    };
    st.create_customer(&c, "staff@paas").await.unwrap();
    let dup = Customer {
        id: "cus_2".into(),
        ..c.clone()
    };
    assert_eq!(
        err_kind(st.create_customer(&dup, "staff@paas").await),
        "conflict",
        "external ids are unique"
    );
    assert_eq!(st.customer_by_external_id("org_42").await.unwrap(), c);

    st.subscribe("cus_1", &NewSubscription::new("payg", 1, nov(1)), "signup")
        .await
        .unwrap();
    assert_eq!(
        err_kind(
            st.subscribe("cus_1", &NewSubscription::new("payg", 1, nov(2)), "signup")
                .await
        ),
        "conflict"
    );
    assert_eq!(
        err_kind(
            st.switch_plan("cus_1", "nope", 1, nov(16), "staff@paas")
                .await
        ),
        "not_found"
    );
    assert_eq!(
        err_kind(
            st.switch_plan("cus_1", "team", 1, nov(1), "staff@paas")
                .await
        ),
        "invalid"
    );
    st.switch_plan("cus_1", "team", 1, nov(16), "staff@paas")
        .await
        .unwrap();
    st.set_seats("cus_1", 2, nov(16), "staff@paas")
        .await
        .unwrap();
    st.set_seats("cus_1", 3, nov(21), "staff@paas")
        .await
        .unwrap();

    let period = Period {
        start: nov(1),
        end: nov(31),
    };
    let segs = st.plan_segments("cus_1", period).await.unwrap();
    assert_eq!(
        segs,
        vec![
            PlanSegment {
                trial: false,
                plan: "payg".into(),
                version: 1,
                start: nov(1),
                end: nov(16)
            },
            PlanSegment {
                trial: false,
                plan: "team".into(),
                version: 1,
                start: nov(16),
                end: nov(31)
            },
        ]
    );
    let seats = st.seat_intervals("cus_1", period).await.unwrap();
    assert_eq!(
        seats,
        vec![
            SeatInterval {
                start: nov(16),
                end: nov(21),
                seats: 2
            },
            SeatInterval {
                start: nov(21),
                end: nov(31),
                seats: 3
            },
        ]
    );

    // BILLING-EXAMPLES example 4, from stored state.
    let usage = [("12345678", 0usize), ("3000000", 1usize)];
    let mut segments = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        let p = st.plan_version(&s.plan, s.version).await.unwrap();
        let u = usage
            .iter()
            .filter(|(_, seg)| *seg == i)
            .map(|(q, _)| UsageItem {
                meter: "requests".into(),
                dims: Default::default(),
                quantity: q.parse().unwrap(),
                events: 1,
            })
            .collect();
        segments.push(Segment {
            trial: false,
            plan: p,
            start: s.start,
            end: s.end,
            usage: u,
        });
    }
    assert_eq!(rate(&period, &segments, &seats).unwrap().total, d("25.69"));

    // Every change is audited, with before and after; refused changes are not.
    assert_audit(
        st.as_ref(),
        "customer:cus_1",
        since,
        &[
            (
                "staff@paas",
                "customer.create",
                None,
                Some(json!({"id": "cus_1", "external_id": "org_42", "name": "Acme"})),
            ),
            (
                "signup",
                "subscription.start",
                None,
                Some(json!({"plan": "payg", "version": 1, "starts_at": nov(1)})),
            ),
            (
                "staff@paas",
                "subscription.switch",
                Some(json!({"plan": "payg", "version": 1})),
                Some(json!({"plan": "team", "version": 1, "effective_at": nov(16)})),
            ),
            (
                "staff@paas",
                "seats.set",
                None,
                Some(json!({"seats": 2, "effective_at": nov(16)})),
            ),
            (
                "staff@paas",
                "seats.set",
                Some(json!({"seats": 2})),
                Some(json!({"seats": 3, "effective_at": nov(21)})),
            ),
        ],
    )
    .await;
    assert_audit(
        st.as_ref(),
        "plan:team",
        since,
        &[(
            "staff@paas",
            "plan.publish",
            None,
            Some(serde_json::to_value(team()).unwrap()),
        )],
    )
    .await;

    // The log is append-only, in the database itself.
    let tamper = db
        .raw
        .exec("UPDATE audit_log SET actor = 'someone else'", &[])
        .await;
    assert!(
        tamper.as_ref().is_err_and(|e| e.contains("append-only")),
        "{tamper:?}"
    );
    let delete = db.raw.exec("DELETE FROM audit_log", &[]).await;
    assert!(
        delete.as_ref().is_err_and(|e| e.contains("append-only")),
        "{delete:?}"
    );
    assert_eq!(st.audit_log("customer:cus_1").await.unwrap().len(), 5);
}

/// Issue 11, item 4: a switch scheduled for the period end no longer blocks
/// other switches; a new switch replaces it; scheduled changes are listed
/// (the unclipped history) and withdrawn, audited, safe to retry.
async fn scheduled_changes(db: Db) {
    let st = db.st.clone();
    for p in [payg(1), payg(2), team()] {
        st.publish_plan(&p, "staff").await.unwrap();
    }
    customers(st.as_ref(), &["cus_s"]).await;
    st.subscribe("cus_s", &NewSubscription::new("payg", 1, nov(1)), "signup")
        .await
        .unwrap();
    let sr: &DynStateStore<'_> = st.as_ref();
    let history = move || async move { sr.subscriptions("cus_s").await.unwrap() };
    let shape = |h: &[Subscription]| -> Vec<(String, u32, DateTime<Utc>, Option<DateTime<Utc>>)> {
        h.iter()
            .map(|s| (s.plan.clone(), s.version, s.start, s.end))
            .collect()
    };
    let row = |p: &str, v: u32, a, b| (p.to_owned(), v, a, b);
    let audit_len = move || async move { sr.audit_log("customer:cus_s").await.unwrap().len() };

    // Scheduled for the period end (Dec 1).
    let o = st
        .switch_plan("cus_s", "team", 1, nov(31), "staff")
        .await
        .unwrap();
    assert_eq!((o.effective_at, o.withdrawn.len()), (nov(31), 0));
    let h = history().await;
    assert_eq!(
        shape(&h),
        [
            row("payg", 1, nov(1), Some(nov(31))),
            row("team", 1, nov(31), None)
        ]
    );
    let scheduled = h[1].clone();
    // The same switch again changes nothing (a retry), not even the log.
    let n = audit_len().await;
    let o = st
        .switch_plan("cus_s", "team", 1, nov(31), "staff")
        .await
        .unwrap();
    assert_eq!((o.effective_at, o.withdrawn.len()), (nov(31), 0));
    assert_eq!(history().await, h, "ids and rows unchanged");
    assert_eq!(audit_len().await, n);

    // A switch "now" (a sub-second instant) while one is scheduled: it
    // replaces the scheduled one instead of being refused.
    let now = nov(16) + Duration::microseconds(1600);
    let o = st
        .switch_plan("cus_s", "payg", 2, now, "staff")
        .await
        .unwrap();
    assert_eq!(o.effective_at, now);
    assert_eq!(o.withdrawn, [scheduled.clone()]);
    assert_eq!(
        shape(&history().await),
        [row("payg", 1, nov(1), Some(now)), row("payg", 2, now, None)]
    );
    assert_eq!(
        st.plan_segments("cus_s", month(2026, 11)).await.unwrap(),
        [
            PlanSegment {
                trial: false,
                plan: "payg".into(),
                version: 1,
                start: nov(1),
                end: now
            },
            PlanSegment {
                trial: false,
                plan: "payg".into(),
                version: 2,
                start: now,
                end: nov(31)
            },
        ],
        "the boundary keeps its microseconds"
    );

    // Scheduled again, then withdrawn: the plan before runs on.
    st.switch_plan("cus_s", "team", 1, nov(31), "staff")
        .await
        .unwrap();
    let h = history().await;
    let scheduled = h[2].clone();
    assert_eq!(
        shape(&h),
        [
            row("payg", 1, nov(1), Some(now)),
            row("payg", 2, now, Some(nov(31))),
            row("team", 1, nov(31), None)
        ]
    );
    let w = st
        .withdraw_change("cus_s", scheduled.id, nov(20), "staff/carol")
        .await
        .unwrap();
    assert_eq!(w, scheduled);
    let after = history().await;
    assert_eq!(
        shape(&after),
        [row("payg", 1, nov(1), Some(now)), row("payg", 2, now, None)]
    );
    // Withdrawing it again answers the same (a retry), and writes nothing.
    let n = audit_len().await;
    let again = st
        .withdraw_change("cus_s", scheduled.id, nov(21), "staff/carol")
        .await
        .unwrap();
    assert_eq!(again, scheduled);
    assert_eq!((history().await, audit_len().await), (after.clone(), n));

    // Refused: a change in effect already, the first subscription, an
    // unknown change or customer. Nothing changes.
    assert_eq!(
        err_kind(
            st.withdraw_change("cus_s", after[1].id, nov(20), "staff")
                .await
        ),
        "conflict"
    );
    assert_eq!(
        err_kind(
            st.withdraw_change("cus_s", after[0].id, t(2026, 10, 1), "staff")
                .await
        ),
        "conflict"
    );
    assert_eq!(
        err_kind(
            st.withdraw_change("cus_s", 987_654_321, nov(20), "staff")
                .await
        ),
        "not_found"
    );
    assert_eq!(
        err_kind(
            st.withdraw_change("zz", scheduled.id, nov(20), "staff")
                .await
        ),
        "not_found"
    );
    assert_eq!(err_kind(st.subscriptions("zz").await), "not_found");
    let before_first = st.switch_plan("cus_s", "team", 1, nov(1), "staff").await;
    assert!(
        matches!(&before_first, Err(StateError::Invalid(m)) if m.contains("first plan starts")),
        "{before_first:?}"
    );
    assert_eq!(history().await, after);

    // A switch to the plan in effect adds nothing; with a change scheduled
    // after it, it withdraws that change (stay on this plan).
    let o = st
        .switch_plan("cus_s", "payg", 2, nov(25), "staff")
        .await
        .unwrap();
    assert_eq!((o.effective_at, o.withdrawn.len()), (now, 0));
    assert_eq!(history().await, after);
    st.switch_plan("cus_s", "team", 1, nov(31), "staff")
        .await
        .unwrap();
    let o = st
        .switch_plan("cus_s", "payg", 2, nov(25), "staff")
        .await
        .unwrap();
    assert_eq!((o.effective_at, o.withdrawn.len()), (now, 1));
    assert_eq!(shape(&history().await), shape(&after));

    // The audit trail: every switch and withdrawal, with what it replaced.
    let log = st.audit_log("customer:cus_s").await.unwrap();
    let actions: Vec<(&str, Option<&str>)> = log
        .iter()
        .map(|e| {
            (
                e.action.as_str(),
                e.after.as_ref().and_then(|a| a["by"].as_str()),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("customer.create", None),
            ("subscription.start", None),
            ("subscription.switch", None),
            ("subscription.withdraw", Some("switch")),
            ("subscription.switch", None),
            ("subscription.switch", None),
            ("subscription.withdraw", Some("withdrawal")),
            ("subscription.switch", None),
            ("subscription.withdraw", Some("switch")),
        ]
    );
    let withdrawal = &log[6];
    assert_eq!(withdrawal.actor, "staff/carol");
    assert_eq!(
        withdrawal.before,
        Some(serde_json::to_value(&scheduled).unwrap())
    );
}

/// Publishing, listing and retiring plan versions.
async fn catalog(db: Db) {
    let st = db.st.clone();
    let since = Utc::now();
    st.publish_plan(&team(), "staff").await.unwrap();
    st.publish_plan(&payg(2), "staff").await.unwrap();
    st.publish_plan(&payg(1), "staff").await.unwrap();
    // The version > 0 check is the database's: neither a conflict nor found.
    assert_eq!(
        err_kind(st.publish_plan(&payg(0), "staff").await),
        "internal"
    );
    let listed = |retired_payg1: bool| {
        vec![
            PublishedPlan {
                plan: payg(1),
                retired: retired_payg1,
            },
            PublishedPlan {
                plan: payg(2),
                retired: false,
            },
            PublishedPlan {
                plan: team(),
                retired: false,
            },
        ]
    };
    assert_eq!(st.list_plans().await.unwrap(), listed(false));
    assert_eq!(st.plan_version("payg", 2).await.unwrap(), payg(2));
    assert_eq!(err_kind(st.plan_version("payg", 3).await), "not_found");

    customers(st.as_ref(), &["a", "b"]).await;
    st.subscribe("a", &NewSubscription::new("payg", 1, nov(1)), "test")
        .await
        .unwrap();
    st.retire_plan("payg", 1, "staff").await.unwrap();
    assert_eq!(
        err_kind(st.retire_plan("payg", 1, "staff").await),
        "conflict"
    );
    assert_eq!(
        err_kind(st.retire_plan("payg", 9, "staff").await),
        "not_found"
    );
    assert_eq!(st.list_plans().await.unwrap(), listed(true));

    // A retired version keeps billing its subscribers but takes no new ones.
    let nov_p = month(2026, 11);
    assert_eq!(
        st.plan_segments("a", nov_p).await.unwrap(),
        vec![PlanSegment {
            trial: false,
            plan: "payg".into(),
            version: 1,
            start: nov(1),
            end: nov(31)
        }]
    );
    assert_eq!(
        err_kind(
            st.subscribe("b", &NewSubscription::new("payg", 1, nov(1)), "test")
                .await
        ),
        "invalid"
    );
    st.subscribe("b", &NewSubscription::new("payg", 2, nov(1)), "test")
        .await
        .unwrap();
    assert_eq!(
        err_kind(st.switch_plan("b", "payg", 1, nov(5), "test").await),
        "invalid"
    );
    st.switch_plan("a", "team", 1, nov(10), "test")
        .await
        .unwrap();

    assert_audit(
        st.as_ref(),
        "plan:payg",
        since,
        &[
            (
                "staff",
                "plan.publish",
                None,
                Some(serde_json::to_value(payg(2)).unwrap()),
            ),
            (
                "staff",
                "plan.publish",
                None,
                Some(serde_json::to_value(payg(1)).unwrap()),
            ),
            (
                "staff",
                "plan.retire",
                Some(json!({"version": 1, "retired": false})),
                Some(json!({"version": 1, "retired": true})),
            ),
        ],
    )
    .await;
}

/// Customers (lookup, pagination), apps, subscriptions' errors, seats and
/// the bulk reads of the finalization run.
async fn customers_apps_seats(db: Db) {
    let st = db.st.clone();
    let since = Utc::now();
    st.publish_plan(&payg(1), "staff").await.unwrap();
    st.publish_plan(&team(), "staff").await.unwrap();
    customers(st.as_ref(), &["c3", "c1", "c5", "c2", "c4"]).await;
    assert_eq!(
        err_kind(
            st.create_customer(
                &Customer {
                    external_id: "other".into(),
                    ..customer("c1")
                },
                "test"
            )
            .await
        ),
        "conflict"
    );

    // Pagination by id.
    assert_eq!(
        st.list_customers(None, 2).await.unwrap(),
        vec![customer("c1"), customer("c2")]
    );
    assert_eq!(
        st.list_customers(Some("c2"), 2).await.unwrap(),
        vec![customer("c3"), customer("c4")]
    );
    assert_eq!(
        st.list_customers(Some("c4"), 2).await.unwrap(),
        vec![customer("c5")]
    );
    assert_eq!(st.list_customers(Some("c5"), 2).await.unwrap(), vec![]);
    assert_eq!(
        st.list_customers(Some("c"), 100).await.unwrap(),
        ["c1", "c2", "c3", "c4", "c5"].map(customer).to_vec()
    );
    assert_eq!(st.customer("c3").await.unwrap(), customer("c3"));
    assert_eq!(err_kind(st.customer("zz").await), "not_found");
    assert_eq!(
        st.customer_by_external_id("ext_c4").await.unwrap(),
        customer("c4")
    );
    assert_eq!(
        err_kind(st.customer_by_external_id("c4").await),
        "not_found"
    );

    // Apps.
    let app = |c: &str, a: &str| App {
        customer_id: c.into(),
        app: a.into(),
        name: format!("App {a}"),
    };
    st.create_app(&app("c1", "web"), "alice").await.unwrap();
    st.create_app(&app("c1", "api"), "alice").await.unwrap();
    st.create_app(&app("c2", "web"), "alice").await.unwrap();
    assert_eq!(
        err_kind(st.create_app(&app("c1", "web"), "alice").await),
        "conflict"
    );
    assert_eq!(
        err_kind(st.create_app(&app("zz", "web"), "alice").await),
        "not_found"
    );
    assert_eq!(
        st.apps("c1").await.unwrap(),
        vec![app("c1", "api"), app("c1", "web")]
    );
    assert_eq!(st.apps("c3").await.unwrap(), vec![]);

    // Subscriptions: errors in order (customer, plan, state).
    assert_eq!(st.billing_start().await.unwrap(), None);
    assert_eq!(
        err_kind(
            st.subscribe("zz", &NewSubscription::new("payg", 1, nov(1)), "t")
                .await
        ),
        "not_found"
    );
    assert_eq!(
        err_kind(
            st.subscribe("c1", &NewSubscription::new("nope", 1, nov(1)), "t")
                .await
        ),
        "not_found"
    );
    assert_eq!(
        err_kind(st.switch_plan("c3", "team", 1, nov(1), "t").await),
        "invalid",
        "no subscription to switch from"
    );
    assert_eq!(
        err_kind(st.switch_plan("zz", "team", 1, nov(1), "t").await),
        "not_found"
    );
    st.subscribe("c1", &NewSubscription::new("payg", 1, nov(5)), "t")
        .await
        .unwrap();
    st.switch_plan("c1", "team", 1, nov(20), "t").await.unwrap();
    st.subscribe("c2", &NewSubscription::new("team", 1, t(2026, 10, 1)), "t")
        .await
        .unwrap();
    st.subscribe("c4", &NewSubscription::new("payg", 1, t(2026, 9, 1)), "t")
        .await
        .unwrap();
    st.switch_plan("c4", "team", 1, t(2026, 10, 1), "t")
        .await
        .unwrap();
    st.switch_plan("c4", "payg", 1, nov(31), "t").await.unwrap();
    // A switch at a time with microseconds keeps them.
    let fine = nov(25) + Duration::microseconds(123_456);
    st.subscribe("c5", &NewSubscription::new("payg", 1, fine), "t")
        .await
        .unwrap();
    assert_eq!(st.billing_start().await.unwrap(), Some(t(2026, 9, 1)));

    // Seats: changes before the period, zero seats, the same instant twice.
    assert_eq!(
        err_kind(st.set_seats("zz", 1, nov(1), "t").await),
        "not_found"
    );
    assert_eq!(
        err_kind(st.set_seats("c1", u32::MAX, nov(1), "t").await),
        "invalid"
    );
    st.set_seats("c1", 3, t(2026, 10, 20), "t").await.unwrap();
    st.set_seats("c1", 0, nov(10), "t").await.unwrap();
    st.set_seats("c1", 4, nov(15), "t").await.unwrap();
    st.set_seats("c1", 5, nov(15), "t").await.unwrap();
    st.set_seats("c3", 0, nov(2), "t").await.unwrap();
    st.set_seats("c2", 7, nov(31), "t").await.unwrap(); // after the period

    let p = month(2026, 11);
    let seg = |plan: &str, start, end| PlanSegment {
        trial: false,
        plan: plan.into(),
        version: 1,
        start,
        end,
    };
    let segments: HashMap<String, Vec<PlanSegment>> = [
        (
            "c1".to_string(),
            vec![seg("payg", nov(5), nov(20)), seg("team", nov(20), nov(31))],
        ),
        ("c2".to_string(), vec![seg("team", nov(1), nov(31))]),
        ("c4".to_string(), vec![seg("team", nov(1), nov(31))]),
        ("c5".to_string(), vec![seg("payg", fine, nov(31))]),
    ]
    .into();
    assert_eq!(st.plan_segments_all(p).await.unwrap(), segments);
    assert_eq!(
        st.plan_segments("c1", p).await.unwrap(),
        segments["c1"].clone()
    );
    assert_eq!(st.plan_segments("c3", p).await.unwrap(), vec![]);
    assert_eq!(
        st.plan_segments("c4", month(2026, 12)).await.unwrap(),
        vec![seg("payg", nov(31), t(2027, 1, 1))]
    );

    let iv = |start, end, seats| SeatInterval { start, end, seats };
    let seats: HashMap<String, Vec<SeatInterval>> = [
        (
            "c1".to_string(),
            vec![iv(nov(1), nov(10), 3), iv(nov(15), nov(31), 5)],
        ),
        ("c3".to_string(), vec![]),
    ]
    .into();
    assert_eq!(st.seat_intervals_all(p).await.unwrap(), seats);
    assert_eq!(
        st.seat_intervals("c1", p).await.unwrap(),
        seats["c1"].clone()
    );
    assert_eq!(
        st.seat_intervals("c2", month(2026, 12)).await.unwrap(),
        vec![iv(nov(31), t(2027, 1, 1), 7)]
    );

    assert_audit(
        st.as_ref(),
        "customer:c1",
        since,
        &[
            (
                "test",
                "customer.create",
                None,
                Some(serde_json::to_value(customer("c1")).unwrap()),
            ),
            (
                "alice",
                "app.create",
                None,
                Some(json!({"customer_id": "c1", "app": "web", "name": "App web"})),
            ),
            (
                "alice",
                "app.create",
                None,
                Some(json!({"customer_id": "c1", "app": "api", "name": "App api"})),
            ),
            (
                "t",
                "subscription.start",
                None,
                Some(json!({"plan": "payg", "version": 1, "starts_at": nov(5)})),
            ),
            (
                "t",
                "subscription.switch",
                Some(json!({"plan": "payg", "version": 1})),
                Some(json!({"plan": "team", "version": 1, "effective_at": nov(20)})),
            ),
            (
                "t",
                "seats.set",
                None,
                Some(json!({"seats": 3, "effective_at": t(2026, 10, 20)})),
            ),
            (
                "t",
                "seats.set",
                Some(json!({"seats": 3})),
                Some(json!({"seats": 0, "effective_at": nov(10)})),
            ),
            (
                "t",
                "seats.set",
                Some(json!({"seats": 0})),
                Some(json!({"seats": 4, "effective_at": nov(15)})),
            ),
            (
                "t",
                "seats.set",
                Some(json!({"seats": 4})),
                Some(json!({"seats": 5, "effective_at": nov(15)})),
            ),
        ],
    )
    .await;
}

/// An invoice of nothing, stored and read back, still bills with the
/// plan's digits (both stores write a zero subtotal as `0`): re-rating it
/// reproduces it.
async fn zero_invoice_keeps_its_digits(db: Db) {
    let st = db.st.clone();
    customers(st.as_ref(), &["z"]).await;
    let period = month(2026, 10);
    let rated = billing_api::rating::Rated {
        currency: "USD".into(),
        minor_units: 2,
        lines: vec![],
        total: d("0.00"),
    };
    let n = billing_api::invoice::build("z", period, rated.clone(), None, &[], d("0.50"));
    st.insert_invoices(vec![n.clone()], nov(1) + Duration::hours(2))
        .await
        .unwrap();
    let inv = st.invoice(&n.id).await.unwrap();
    assert!(inv.subtotal.is_zero(), "{}", inv.subtotal);
    assert_eq!(billing_api::invoice::billed(&inv), rated);
}

/// Opening invoices (fees in advance from where they start): one per
/// customer and instant beside the period's own invoice with the same
/// period start; a repeat is skipped without a number; read by period and
/// kind; immutable, kind included.
async fn opening_invoices(db: Db) {
    let st = db.st.clone();
    customers(st.as_ref(), &["o"]).await;
    let nov_p = month(2026, 11);
    let rated = |total: &str| billing_api::rating::Rated {
        currency: "USD".into(),
        minor_units: 2,
        lines: vec![],
        total: d(total),
    };
    let open =
        |t| billing_api::invoice::build_opening("o", nov_p, t, rated("20.00"), &[], d("0.50"));
    let (at_start, mid) = (nov(1), nov(10) + Duration::microseconds(7));
    let first = open(at_start);
    assert_eq!(first.id, opening_id("o", at_start));
    assert_eq!(first.id, "inv_o_20261101T000000000000Z_open");
    assert_eq!(
        (first.kind, first.period.start, first.period.end),
        (InvoiceKind::Opening, nov(1), nov_p.end)
    );
    assert_eq!(first.body.fees_period, Some(nov_p));
    let w = st
        .insert_invoices(
            vec![first.clone(), open(mid)],
            nov(1) + Duration::minutes(1),
        )
        .await
        .unwrap();
    assert_eq!(
        w.iter().map(|i| (i.seq, i.kind)).collect::<Vec<_>>(),
        [(1, InvoiceKind::Opening), (2, InvoiceKind::Opening)]
    );
    assert_eq!(w[1].period.start, mid);
    // Again: skipped, no number used.
    assert!(st
        .insert_invoices(vec![open(at_start)], nov(2))
        .await
        .unwrap()
        .is_empty());
    // The period's own invoice starts where the first opening one does.
    let own = billing_api::invoice::build("o", nov_p, rated("4.00"), None, &[], d("0.50"));
    let w = st
        .insert_invoices(vec![own.clone()], nov_p.end + Duration::hours(1))
        .await
        .unwrap();
    assert_eq!((w[0].seq, w[0].kind), (3, InvoiceKind::Period));
    let by_period = st.invoices_in_period(nov_p.start).await.unwrap();
    assert_eq!(by_period["o"].id, own.id);
    let openings = st.openings(nov_p).await.unwrap();
    assert_eq!(
        openings["o"]
            .iter()
            .map(|i| i.id.clone())
            .collect::<Vec<_>>(),
        [opening_id("o", at_start), opening_id("o", mid)]
    );
    assert!(st.openings(month(2026, 12)).await.unwrap().is_empty());
    assert_eq!(st.invoices_of("o").await.unwrap().len(), 3);
    let sql = format!(
        "UPDATE invoices SET kind = 'period' WHERE id = '{}'",
        first.id
    );
    let e = db.raw.exec(&sql, &[]).await.unwrap_err();
    assert!(e.contains("immutable"), "{e}");
}

/// Credit grants: idempotent on the caller's key (same body: the first
/// grant; another body: a conflict); each finalized invoice consumes once,
/// in its own transaction, and only what the grant still holds (a balance
/// changed since settling fails the batch and writes nothing); void and
/// expiry take the remainder; the ledger is append-only and sums to the
/// balances; every change is audited.
async fn credits_ledger(db: Db) {
    use billing_api::state::{EntryKind, GrantKind, NewGrant};
    let st = db.st.clone();
    customers(st.as_ref(), &["cr", "other"]).await;
    let since = Utc::now();
    let new = |amount: &str, key: Option<&str>, expires: Option<DateTime<Utc>>| NewGrant {
        customer_id: "cr".into(),
        kind: GrantKind::Promotional,
        currency: "USD".into(),
        amount: d(amount),
        effective_at: Some(nov(1)),
        expires_at: expires,
        priority: 10,
        reason: "signup".into(),
        top_up: false,
        idempotency_key: key.map(str::to_owned),
    };
    let (promo, created) = st
        .grant_credit(&new("5.00", Some("k1"), Some(t(2026, 12, 31))), "staff")
        .await
        .unwrap();
    assert!(created);
    assert_eq!((promo.amount, promo.remaining), (d("5.00"), d("5.00")));
    let (again, created) = st
        .grant_credit(&new("5.00", Some("k1"), Some(t(2026, 12, 31))), "staff")
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(again, promo);
    let e = st
        .grant_credit(&new("6.00", Some("k1"), None), "staff")
        .await
        .unwrap_err();
    assert!(matches!(e, StateError::Conflict(_)), "{e}");
    // The same key is another customer's own.
    let mut theirs = new("1.00", Some("k1"), None);
    theirs.customer_id = "other".into();
    assert!(st.grant_credit(&theirs, "staff").await.unwrap().1);
    let mut bought = new("20.00", None, None);
    bought.kind = GrantKind::Purchased;
    let (bought, _) = st.grant_credit(&bought, "staff").await.unwrap();
    let expiring = st
        .grant_credit(&new("3.00", None, Some(nov(20))), "staff")
        .await
        .unwrap()
        .0;
    let missing = NewGrant {
        customer_id: "nobody".into(),
        ..new("1.00", None, None)
    };
    assert!(matches!(
        st.grant_credit(&missing, "staff").await.unwrap_err(),
        StateError::NotFound(_)
    ));

    // November: $7.40 before credits (example 11).
    let nov_p = month(2026, 11);
    let rated = billing_api::rating::Rated {
        currency: "USD".into(),
        minor_units: 2,
        lines: vec![],
        total: d("7.40"),
    };
    let mut settling = billing_api::invoice::Settling::read_all(st.as_ref(), nov_p.start)
        .await
        .unwrap();
    let mut n = billing_api::invoice::build("cr", nov_p, rated, None, &[], d("0.50"));
    n.body.lines = vec![flat_line("7.40")];
    settling.settle(&mut n, nov_p.end, nov_p.end, d("0.50"));
    assert_eq!((n.credit_total, n.amount_due), (d("-7.40"), d("0.00")));
    // A grant voided between settling and writing: the batch fails whole.
    let (spare, _) = st
        .grant_credit(&new("1.00", None, None), "staff")
        .await
        .unwrap();
    let mut stale = n.clone();
    stale.id = "inv_stale".into();
    stale.period = month(2026, 10);
    stale.body.settlement.as_mut().unwrap().credits[0].balance_before = d("4.00");
    let e = st
        .insert_invoices(vec![stale], nov_p.end)
        .await
        .unwrap_err();
    assert!(matches!(e, StateError::Conflict(_)), "{e}");
    assert!(st.invoices_of("cr").await.unwrap().is_empty());
    let w = st
        .insert_invoices(vec![n.clone()], nov_p.end + Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(w.len(), 1);
    assert_eq!(
        (
            w[0].total,
            w[0].credit_total,
            w[0].amount_due,
            w[0].sync_status
        ),
        (d("7.40"), d("-7.40"), d("0.00"), SyncStatus::NothingDue)
    );
    // Written again (a restarted run): skipped, nothing consumed twice.
    assert!(st
        .insert_invoices(vec![n.clone()], nov_p.end + Duration::hours(2))
        .await
        .unwrap()
        .is_empty());
    let balances: HashMap<String, Decimal> = st
        .grants_of("cr")
        .await
        .unwrap()
        .into_iter()
        .map(|g| (g.id, g.remaining))
        .collect();
    assert_eq!(balances[&promo.id], d("0"));
    assert_eq!(balances[&bought.id], d("17.60"));
    assert_eq!(balances[&expiring.id], d("3.00"));

    // Void the spare; expire the one that ended on Nov 20 (due an hour
    // after with a grace of one hour).
    let voided = st
        .void_grant("cr", &spare.id, "staff", nov(25))
        .await
        .unwrap();
    assert_eq!(
        (voided.remaining, voided.voided_at),
        (d("0"), Some(nov(25)))
    );
    assert_eq!(
        st.void_grant("cr", &spare.id, "staff", nov(26))
            .await
            .unwrap(),
        voided
    );
    assert!(matches!(
        st.void_grant("other", &spare.id, "staff", nov(26))
            .await
            .unwrap_err(),
        StateError::NotFound(_)
    ));
    let grace = Duration::hours(1);
    assert_eq!(st.expire_grants(nov(20), grace).await.unwrap(), 0);
    assert_eq!(st.expire_grants(nov(21), grace).await.unwrap(), 1);
    assert_eq!(st.expire_grants(nov(22), grace).await.unwrap(), 0);

    let ledger = st.ledger_of("cr").await.unwrap();
    let kinds: Vec<(String, EntryKind, Decimal, Option<String>)> = ledger
        .iter()
        .map(|e| (e.grant_id.clone(), e.kind, e.amount, e.invoice_id.clone()))
        .collect();
    assert_eq!(
        kinds,
        [
            (promo.id.clone(), EntryKind::Grant, d("5.00"), None),
            (bought.id.clone(), EntryKind::Grant, d("20.00"), None),
            (expiring.id.clone(), EntryKind::Grant, d("3.00"), None),
            (spare.id.clone(), EntryKind::Grant, d("1.00"), None),
            (
                promo.id.clone(),
                EntryKind::Consumption,
                d("-5.00"),
                Some(n.id.clone())
            ),
            (
                bought.id.clone(),
                EntryKind::Consumption,
                d("-2.40"),
                Some(n.id.clone())
            ),
            (spare.id.clone(), EntryKind::Void, d("-1.00"), None),
            (expiring.id.clone(), EntryKind::Expiry, d("-3.00"), None),
        ]
    );
    assert!(ledger.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(
        ledger
            .iter()
            .find(|e| e.kind == EntryKind::Expiry)
            .unwrap()
            .at,
        nov(20)
    );
    // The ledger sums to the balances, grant by grant.
    for g in st.grants_of("cr").await.unwrap() {
        let sum: Decimal = ledger
            .iter()
            .filter(|e| e.grant_id == g.id)
            .map(|e| e.amount)
            .sum();
        assert_eq!(sum, g.remaining, "{}", g.id);
    }
    let open = st.open_grants_all().await.unwrap();
    assert_eq!(
        open["cr"].iter().map(|g| g.id.clone()).collect::<Vec<_>>(),
        [bought.id.clone()]
    );
    assert_eq!(open["other"].len(), 1);
    // Append-only.
    for sql in [
        "UPDATE credit_ledger SET amount = '0'",
        "DELETE FROM credit_ledger",
    ] {
        let e = db.raw.exec(sql, &[]).await.unwrap_err();
        assert!(e.contains("append-only"), "{e}");
    }
    // A top-up is usable once paid.
    let mut top = new("10.00", None, None);
    top.kind = GrantKind::Purchased;
    top.top_up = true;
    let (top, _) = st.grant_credit(&top, "staff").await.unwrap();
    assert!(!top.usable);
    // Not voided while its invoice may still be collected.
    assert!(matches!(
        st.void_grant("cr", &top.id, "staff", nov(26))
            .await
            .unwrap_err(),
        StateError::Conflict(_)
    ));
    // Its own invoice, numbered after the others, pending for Stripe.
    let bill = st
        .invoice(top.invoice_id.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(
        (
            bill.kind,
            bill.seq,
            bill.total,
            bill.amount_due,
            bill.sync_status
        ),
        (
            InvoiceKind::TopUp,
            2,
            d("10.00"),
            d("10.00"),
            SyncStatus::Pending
        )
    );
    assert_eq!(bill.body.lines.len(), 1);
    let paid = st.mark_grant_paid("cr", &top.id, "staff").await.unwrap();
    assert!(paid.usable);
    assert_eq!(
        st.invoice(&bill.id).await.unwrap().payment_status,
        PaymentStatus::Paid
    );
    assert_eq!(
        st.mark_grant_paid("cr", &top.id, "staff").await.unwrap(),
        paid
    );
    let actions: Vec<String> = st
        .audit_log("customer:cr")
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.at >= since && e.action.starts_with("credit."))
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions,
        [
            "credit.grant",
            "credit.grant",
            "credit.grant",
            "credit.grant",
            "credit.void",
            "credit.expire",
            "credit.grant",
            "credit.paid"
        ]
    );
    // Paid through Stripe: its `invoice.paid` makes the grant usable.
    let mut top2 = new("20.00", None, None);
    top2.kind = GrantKind::Purchased;
    top2.top_up = true;
    let (top2, _) = st.grant_credit(&top2, "staff").await.unwrap();
    let bill = top2.invoice_id.clone().unwrap();
    st.set_stripe_invoice(&bill, "in_top2").await.unwrap();
    // With Stripe, Stripe says when it is paid, not staff.
    assert!(matches!(
        st.mark_grant_paid("cr", &top2.id, "staff")
            .await
            .unwrap_err(),
        StateError::Conflict(_)
    ));
    assert!(st
        .set_payment_status("in_top2", PaymentStatus::Paid)
        .await
        .unwrap());
    let g = st
        .grants_of("cr")
        .await
        .unwrap()
        .into_iter()
        .find(|g| g.id == top2.id)
        .unwrap();
    assert!(g.usable);
}

/// Two invoices of one customer settled in one pass (two opening invoices
/// in a run) and written in one batch: the second is settled with what the
/// first left of the grant and of a once coupon, and the batch is written
/// (a stale balance would fail it at every run).
async fn one_customers_invoices_in_a_batch_share_its_credit(db: Db) {
    use billing_api::state::{Coupon, GrantKind, NewGrant};
    use billing_domain::settle::CouponDuration;
    let st = db.st.clone();
    customers(st.as_ref(), &["two"]).await;
    st.grant_credit(
        &NewGrant {
            customer_id: "two".into(),
            kind: GrantKind::Promotional,
            currency: "USD".into(),
            amount: d("5.00"),
            effective_at: Some(nov(1)),
            expires_at: None,
            priority: 10,
            reason: String::new(),
            top_up: false,
            idempotency_key: None,
        },
        "staff",
    )
    .await
    .unwrap();
    let c = Coupon {
        id: "once".into(),
        version: 1,
        name: "Once".into(),
        percent_off: None,
        amount_off: Some(d("1.00")),
        currency: Some("USD".into()),
        duration: CouponDuration::Once,
        periods: None,
        applies_to: None,
        max_redemptions: None,
    };
    st.publish_coupon(&c, "staff").await.unwrap();
    st.apply_coupon("two", "once", nov(1), "staff")
        .await
        .unwrap();
    let nov_p = month(2026, 11);
    let rated = billing_api::rating::Rated::of_lines("USD".into(), 2, vec![flat_line("4.00")]);
    let mut settling = billing_api::invoice::Settling::read_all(st.as_ref(), nov_p.start)
        .await
        .unwrap();
    let mut batch = vec![];
    for t in [nov(2), nov(12)] {
        let mut n =
            billing_api::invoice::build_opening("two", nov_p, t, rated.clone(), &[], d("0.50"));
        settling.settle(&mut n, t, t, d("0.50"));
        batch.push(n);
    }
    // $4 − $1 once = $3, all of it credit; then $4, $2 of credit left.
    let steps: Vec<(Decimal, Decimal, Decimal)> = batch
        .iter()
        .map(|n| (n.discount_total, n.credit_total, n.amount_due))
        .collect();
    assert_eq!(
        steps,
        [
            (d("-1.00"), d("-3.00"), d("0.00")),
            (d("0.00"), d("-2.00"), d("2.00"))
        ]
    );
    assert_eq!(st.insert_invoices(batch, nov(12)).await.unwrap().len(), 2);
    let g = st.grants_of("two").await.unwrap().pop().unwrap();
    assert_eq!(g.remaining, d("0"));
    assert_eq!(st.coupons_of("two").await.unwrap()[0].redeemed, 1);
}

/// Coupons: versions assigned on publication, applied from an instant,
/// redemption limits, removal; a once coupon is redeemed by one invoice;
/// tax rates immutable but for archiving; tax profiles set and read.
async fn coupons_and_taxes(db: Db) {
    use billing_api::state::{Coupon, TaxProfile, TaxRate};
    use billing_domain::settle::CouponDuration;
    let st = db.st.clone();
    customers(st.as_ref(), &["cp", "cq"]).await;
    let c = Coupon {
        id: "welcome".into(),
        version: 1,
        name: "Welcome".into(),
        percent_off: Some(d("10")),
        amount_off: None,
        currency: None,
        duration: CouponDuration::Once,
        periods: None,
        applies_to: None,
        max_redemptions: Some(1),
    };
    assert_eq!(st.publish_coupon(&c, "staff").await.unwrap().version, 1);
    let v2 = Coupon {
        percent_off: Some(d("15")),
        ..c.clone()
    };
    assert_eq!(st.publish_coupon(&v2, "staff").await.unwrap().version, 2);
    assert_eq!(st.coupons().await.unwrap().len(), 2);
    let a = st
        .apply_coupon("cp", "welcome", nov(5), "staff")
        .await
        .unwrap();
    assert_eq!(
        (a.coupon.version, a.coupon.percent_off, a.redeemed),
        (2, Some(d("15")), 0)
    );
    // One redemption in all.
    assert!(matches!(
        st.apply_coupon("cq", "welcome", nov(5), "staff")
            .await
            .unwrap_err(),
        StateError::Conflict(_)
    ));
    assert!(matches!(
        st.apply_coupon("cq", "nope", nov(5), "staff")
            .await
            .unwrap_err(),
        StateError::NotFound(_)
    ));
    // Three periods from Nov 5: ends with January.
    let r = st
        .publish_coupon(
            &Coupon {
                id: "three".into(),
                duration: CouponDuration::Repeating,
                periods: Some(3),
                max_redemptions: None,
                ..c.clone()
            },
            "staff",
        )
        .await
        .unwrap();
    let ra = st.apply_coupon("cq", &r.id, nov(5), "staff").await.unwrap();
    assert_eq!(ra.ends_at, Some(t(2027, 2, 1)));

    // Tax.
    let vat = TaxRate {
        id: "de_vat".into(),
        name: "VAT".into(),
        country: "DE".into(),
        region: None,
        percentage: d("19"),
        inclusive: false,
        archived: false,
    };
    st.create_tax_rate(&vat, "staff").await.unwrap();
    assert!(matches!(
        st.create_tax_rate(&vat, "staff").await.unwrap_err(),
        StateError::Conflict(_)
    ));
    let profile = TaxProfile {
        country: "DE".into(),
        region: None,
        tax_id: None,
        exempt: false,
        reverse_charge: false,
    };
    assert_eq!(st.tax_profile("cp").await.unwrap(), None);
    st.set_tax_profile("cp", &profile, "staff").await.unwrap();
    st.set_tax_profile("cp", &profile, "staff").await.unwrap();
    assert_eq!(st.tax_profile("cp").await.unwrap(), Some(profile.clone()));
    assert_eq!(st.tax_profiles_all().await.unwrap().len(), 1);

    // November's invoice of $100: 15 % off once, then 19 % VAT.
    let nov_p = month(2026, 11);
    let rated = |c: &str| billing_api::rating::Rated {
        currency: "USD".into(),
        minor_units: 2,
        lines: vec![],
        total: d(c),
    };
    let mut n = billing_api::invoice::build("cp", nov_p, rated("100.00"), None, &[], d("0.50"));
    n.body.lines = vec![flat_line("100.00")];
    let mut settling = billing_api::invoice::Settling::read_all(st.as_ref(), nov_p.start)
        .await
        .unwrap();
    settling.settle(&mut n, nov_p.end, nov_p.end, d("0.50"));
    assert_eq!(
        (n.discount_total, n.tax_total, n.total, n.amount_due),
        (d("-15.00"), d("16.15"), d("101.15"), d("101.15"))
    );
    st.insert_invoices(vec![n], nov_p.end).await.unwrap();
    let a = st.coupons_of("cp").await.unwrap().pop().unwrap();
    assert_eq!(a.redeemed, 1);
    // Redeemed once: December's invoice gets no discount.
    let dec_p = month(2026, 12);
    let mut n = billing_api::invoice::build("cp", dec_p, rated("100.00"), None, &[], d("0.50"));
    n.body.lines = vec![flat_line("100.00")];
    let mut settling = billing_api::invoice::Settling::read_all(st.as_ref(), dec_p.start)
        .await
        .unwrap();
    settling.settle(&mut n, dec_p.end, dec_p.end, d("0.50"));
    assert_eq!((n.discount_total, n.tax_total), (d("0.00"), d("19.00")));
    // Archived: no more tax; removal ends a coupon; repeats answer the same.
    assert!(
        st.archive_tax_rate("de_vat", "staff")
            .await
            .unwrap()
            .archived
    );
    assert!(
        st.archive_tax_rate("de_vat", "staff")
            .await
            .unwrap()
            .archived
    );
    assert!(st.tax_rates().await.unwrap()[0].archived);
    let removed = st
        .remove_coupon("cq", &ra.id, nov(20), "staff")
        .await
        .unwrap();
    assert_eq!(removed.removed_at, Some(nov(20)));
    assert_eq!(
        st.remove_coupon("cq", &ra.id, nov(25), "staff")
            .await
            .unwrap(),
        removed
    );
    assert!(st.applied_all(nov(21)).await.unwrap().get("cq").is_none());
    assert_eq!(st.applied_all(nov(19)).await.unwrap()["cq"].len(), 1);
}

fn flat_line(amount: &str) -> Line {
    support::line(billing_api::rating::LineKind::FlatFee, None, amount)
}

/// A state file written before opening invoices existed keeps its invoices
/// (and their carried-forward links) through the table's rebuilds in
/// migrations 3 and 4, each of kind `period`, owing its total, still
/// immutable.
#[tokio::test]
async fn sqlite_invoices_survive_the_fees_in_advance_migration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true)
                    .foreign_keys(true),
            )
            .await
            .unwrap();
        sqlx::query(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, \
             applied_at INTEGER NOT NULL DEFAULT 0)",
        )
        .execute(&pool)
        .await
        .unwrap();
        for m in &schemas::migrations::SQLITE_STATE[..2] {
            sqlx::raw_sql(m.sql).execute(&pool).await.unwrap();
            sqlx::query("INSERT INTO schema_migrations (version, name) VALUES (?1, ?2)")
                .bind(m.version as i64)
                .bind(m.name)
                .execute(&pool)
                .await
                .unwrap();
        }
        sqlx::raw_sql(
            "INSERT INTO customers (id, external_id, name) VALUES ('m', 'ext-m', 'M');
             INSERT INTO invoices (id, seq, number, customer_id, period_start, period_end, currency,
               subtotal, adjustments_total, carried_in, total, body, finalized_at, sync_status)
             VALUES ('inv_m_202610', 1, 'TALLY-000001', 'm', 1790812800000000, 1793491200000000,
               'USD', '0.40', '0', '0', '0.40',
               '{\"lines\":[],\"adjustments\":[],\"adjusted\":null,\"carried\":[]}',
               1793494800000000, 'carried_forward'),
             ('inv_m_202611', 2, 'TALLY-000002', 'm', 1793491200000000, 1796083200000000,
               'USD', '5.00', '0', '0.40', '5.40',
               '{\"lines\":[],\"adjustments\":[],\"adjusted\":null,\"carried\":[]}',
               1796086800000000, 'pending');
             UPDATE invoices SET carried_to = 'inv_m_202611' WHERE id = 'inv_m_202610';
             UPDATE invoice_numbers SET last = 2;",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
    let st = SqliteState::open(&path).await.unwrap();
    st.migrate().await.unwrap();
    let got = st.invoices_of("m").await.unwrap();
    assert_eq!(
        got.iter()
            .map(|i| (
                i.id.as_str(),
                i.kind,
                i.carried_to.as_deref(),
                i.total.to_string(),
                // Migration 4: what is due of an earlier invoice is its total.
                i.amount_due.to_string(),
                i.credit_total.is_zero() && i.discount_total.is_zero() && i.tax_total.is_zero()
            ))
            .collect::<Vec<_>>(),
        [
            (
                "inv_m_202610",
                InvoiceKind::Period,
                Some("inv_m_202611"),
                "0.40".to_string(),
                "0.40".to_string(),
                true
            ),
            (
                "inv_m_202611",
                InvoiceKind::Period,
                None,
                "5.40".to_string(),
                "5.40".to_string(),
                true
            ),
        ]
    );
    assert_eq!(
        st.invoices_in_period(month(2026, 11).start)
            .await
            .unwrap()
            .len(),
        1
    );
    // The counter and the triggers carried on.
    let n = billing_api::invoice::build(
        "m",
        month(2026, 12),
        billing_api::rating::Rated {
            currency: "USD".into(),
            minor_units: 2,
            lines: vec![],
            total: d("1.00"),
        },
        None,
        &[],
        d("0.50"),
    );
    let w = st.insert_invoices(vec![n], t(2027, 1, 1)).await.unwrap();
    assert_eq!(w[0].number, "TALLY-000003");
    let raw = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(SqliteConnectOptions::new().filename(&path))
        .await
        .unwrap();
    for sql in [
        "UPDATE invoices SET total = '0' WHERE id = 'inv_m_202611'",
        "UPDATE invoices SET amount_due = '0' WHERE id = 'inv_m_202611'",
        "DELETE FROM invoices WHERE id = 'inv_m_202610'",
    ] {
        let e = sqlx::query(sql).execute(&raw).await.unwrap_err();
        assert!(e.to_string().contains("immutable"), "{sql}: {e}");
    }
}

/// Finalized invoices: gapless numbers from the counter in the insert's
/// transaction, duplicates skipped without a number, carried-in marking,
/// reads, status changes and the immutability trigger.
async fn invoices(db: Db) {
    let st = db.st.clone();
    customers(st.as_ref(), &["a", "b", "c"]).await;
    let (oct, nov_p, dec) = (month(2026, 10), month(2026, 11), month(2026, 12));
    let fin1 = nov(1) + Duration::hours(2) + Duration::microseconds(654_321);

    let a_oct = new_invoice(
        "a",
        oct,
        "12.30",
        vec![],
        SyncStatus::Pending,
        rated_lines(oct, "30750000"),
    );
    let b_oct = new_invoice("b", oct, "0.40", vec![], SyncStatus::CarriedForward, vec![]);
    let c_oct = new_invoice("c", oct, "0.00", vec![], SyncStatus::NothingDue, vec![]);
    let written = st
        .insert_invoices(vec![a_oct.clone(), b_oct.clone(), c_oct.clone()], fin1)
        .await
        .unwrap();
    let expected = vec![
        finalized(&a_oct, 1, fin1),
        finalized(&b_oct, 2, fin1),
        finalized(&c_oct, 3, fin1),
    ];
    assert_eq!(written, expected);
    assert_eq!(
        (
            written[0].subtotal.to_string(),
            written[0].adjustments_total.to_string()
        ),
        ("12.30".to_string(), "0".to_string())
    );
    for (w, e) in written.iter().zip(&expected) {
        assert_same_text(w, e);
        let stored = st.invoice(&e.id).await.unwrap();
        assert_eq!(&stored, e);
        assert_same_text(&stored, e);
    }
    assert_eq!(written[0].number, "TALLY-000001");

    // A second run: the existing (customer, period) is skipped without
    // using a number.
    let fin2 = nov(31) + Duration::hours(2);
    let a_nov = new_invoice("a", nov_p, "7.00", vec![], SyncStatus::Pending, vec![]);
    let a_oct_again = new_invoice("a", oct, "99.00", vec![], SyncStatus::Pending, vec![]);
    assert_eq!(
        st.insert_invoices(vec![a_oct_again, a_nov.clone()], fin2)
            .await
            .unwrap(),
        vec![finalized(&a_nov, 4, fin2)]
    );
    assert_eq!(st.invoice(&a_oct.id).await.unwrap(), expected[0]);

    // A batch that fails writes nothing and uses no number.
    let c_nov = new_invoice("c", nov_p, "0.00", vec![], SyncStatus::NothingDue, vec![]);
    let ghost = new_invoice("ghost", nov_p, "1.00", vec![], SyncStatus::Pending, vec![]);
    assert_eq!(
        err_kind(st.insert_invoices(vec![c_nov.clone(), ghost], fin2).await),
        "internal"
    );
    assert_eq!(err_kind(st.invoice(&c_nov.id).await), "not_found");
    assert_eq!(
        st.insert_invoices(vec![c_nov.clone()], fin2).await.unwrap(),
        vec![finalized(&c_nov, 5, fin2)]
    );

    // Carry-forward: the carried invoice is marked with the one that took it.
    let carried_b = |inv: &Invoice| CarriedInvoice {
        invoice_id: inv.id.clone(),
        invoice_number: inv.number.clone(),
        total: inv.total,
    };
    let b_oct_inv = st.invoice(&b_oct.id).await.unwrap();
    assert_eq!(
        st.open_carried(None).await.unwrap(),
        HashMap::from([("b".to_string(), vec![b_oct_inv.clone()])])
    );
    assert_eq!(
        st.open_carried(Some("b")).await.unwrap(),
        HashMap::from([("b".to_string(), vec![b_oct_inv.clone()])])
    );
    assert_eq!(st.open_carried(Some("a")).await.unwrap(), HashMap::new());
    let b_nov = new_invoice(
        "b",
        nov_p,
        "1.00",
        vec![carried_b(&b_oct_inv)],
        SyncStatus::Pending,
        vec![],
    );
    assert_eq!(b_nov.total, d("1.40"));
    assert_eq!(
        st.insert_invoices(vec![b_nov.clone()], fin2).await.unwrap(),
        vec![finalized(&b_nov, 6, fin2)]
    );
    let b_oct_after = Invoice {
        carried_to: Some(b_nov.id.clone()),
        ..b_oct_inv.clone()
    };
    assert_eq!(st.invoice(&b_oct.id).await.unwrap(), b_oct_after);
    assert_eq!(st.open_carried(None).await.unwrap(), HashMap::new());

    // Carrying an invoice already carried (or not carried forward at all)
    // is a conflict, and the batch uses no number.
    let fin3 = dec.end + Duration::hours(2);
    let b_dec = new_invoice(
        "b",
        dec,
        "2.00",
        vec![carried_b(&b_oct_inv)],
        SyncStatus::Pending,
        vec![],
    );
    assert_eq!(
        err_kind(st.insert_invoices(vec![b_dec], fin3).await),
        "conflict"
    );
    let a_oct_inv = st.invoice(&a_oct.id).await.unwrap();
    let a_dec_bad = new_invoice(
        "a",
        dec,
        "2.00",
        vec![carried_b(&a_oct_inv)],
        SyncStatus::Pending,
        vec![],
    );
    assert_eq!(
        err_kind(st.insert_invoices(vec![a_dec_bad], fin3).await),
        "conflict"
    );
    let a_dec = new_invoice("a", dec, "2.50", vec![], SyncStatus::Pending, vec![]);
    assert_eq!(
        st.insert_invoices(vec![a_dec.clone()], fin3).await.unwrap(),
        vec![finalized(&a_dec, 7, fin3)]
    );
    assert_eq!(st.insert_invoices(vec![], fin3).await.unwrap(), vec![]);

    // Reads.
    assert_eq!(
        st.invoices_in_period(oct.start).await.unwrap(),
        HashMap::from([
            ("a".to_string(), expected[0].clone()),
            ("b".to_string(), b_oct_after.clone()),
            ("c".to_string(), expected[2].clone()),
        ])
    );
    assert_eq!(
        st.invoices_in_period(t(2026, 10, 2)).await.unwrap(),
        HashMap::new()
    );
    assert_eq!(
        st.invoices_of("a").await.unwrap(),
        vec![
            expected[0].clone(),
            finalized(&a_nov, 4, fin2),
            finalized(&a_dec, 7, fin3)
        ]
    );
    assert_eq!(st.invoices_of("ghost").await.unwrap(), vec![]);
    assert_eq!(err_kind(st.invoice("inv_nope").await), "not_found");

    // Waiting for Stripe, oldest first.
    let pending_ids = |v: Vec<Invoice>| v.into_iter().map(|i| i.seq).collect::<Vec<_>>();
    assert_eq!(
        pending_ids(st.pending_sync(10).await.unwrap()),
        vec![1, 4, 6, 7]
    );
    assert_eq!(
        st.pending_sync(2).await.unwrap(),
        vec![expected[0].clone(), finalized(&a_nov, 4, fin2)]
    );

    // Status changes.
    st.set_stripe_invoice(&a_oct.id, "in_1").await.unwrap();
    st.set_sync_status(&a_oct.id, SyncStatus::Synced, None)
        .await
        .unwrap();
    st.set_sync_status(&a_nov.id, SyncStatus::Failed, Some("total differs"))
        .await
        .unwrap();
    // An unknown status cannot be written: `SyncStatus` is an enum (the
    // database's CHECK constraint stays as a second guard).
    assert_eq!(
        err_kind(st.set_stripe_invoice(&a_dec.id, "in_1").await),
        "internal",
        "Stripe invoice ids are unique"
    );
    assert!(st
        .set_payment_status("in_1", PaymentStatus::Paid)
        .await
        .unwrap());
    assert!(!st
        .set_payment_status("in_unknown", PaymentStatus::Paid)
        .await
        .unwrap());
    assert_eq!(
        st.invoice(&a_oct.id).await.unwrap(),
        Invoice {
            sync_status: SyncStatus::Synced.into(),
            stripe_invoice_id: Some("in_1".into()),
            payment_status: PaymentStatus::Paid,
            ..expected[0].clone()
        }
    );
    assert_eq!(
        st.invoice(&a_nov.id).await.unwrap(),
        Invoice {
            sync_status: SyncStatus::Failed.into(),
            sync_error: Some("total differs".into()),
            ..finalized(&a_nov, 4, fin2)
        }
    );
    assert_eq!(pending_ids(st.pending_sync(10).await.unwrap()), vec![6, 7]);

    // The Stripe customer mapping.
    assert_eq!(st.stripe_customer("a").await.unwrap(), None);
    st.set_stripe_customer("a", "cus_S1").await.unwrap();
    assert_eq!(
        st.stripe_customer("a").await.unwrap(),
        Some("cus_S1".into())
    );
    assert_eq!(err_kind(st.stripe_customer("ghost").await), "not_found");
    st.set_stripe_customer("ghost", "cus_S2").await.unwrap(); // changes nothing

    // Finalized invoices are immutable in the database itself; only the
    // status columns change.
    for sql in [
        "UPDATE invoices SET total = '0' WHERE id = $1",
        "UPDATE invoices SET subtotal = '12.31' WHERE id = $1",
        "UPDATE invoices SET number = 'X' WHERE id = $1",
        "UPDATE invoices SET body = '{}' WHERE id = $1",
        "UPDATE invoices SET currency = 'EUR' WHERE id = $1",
        "UPDATE invoices SET customer_id = 'b' WHERE id = $1",
        "DELETE FROM invoices WHERE id = $1",
    ] {
        let e = db.raw.exec(sql, &[&a_oct.id]).await.unwrap_err();
        assert!(e.contains("immutable"), "{sql}: {e}");
    }
    for sql in [
        "UPDATE invoices SET sync_status = 'failed', sync_error = 'x' WHERE id = $1",
        "UPDATE invoices SET payment_status = 'void', stripe_invoice_id = 'in_9' WHERE id = $1",
        "UPDATE invoices SET carried_to = $1 WHERE id = $1",
    ] {
        assert_eq!(db.raw.exec(sql, &[&a_oct.id]).await, Ok(1), "{sql}");
    }
    assert_eq!(
        st.invoice(&a_oct.id).await.unwrap(),
        Invoice {
            sync_status: SyncStatus::Failed.into(),
            sync_error: Some("x".into()),
            payment_status: PaymentStatus::Void,
            stripe_invoice_id: Some("in_9".into()),
            carried_to: Some(a_oct.id.clone()),
            ..expected[0].clone()
        }
    );
}

/// API keys (created, listed newest first, revoked once) and quota settings
/// (spending cap, suspension), all audited.
async fn keys_and_quota(db: Db) {
    let st = db.st.clone();
    let since = Utc::now();
    customers(st.as_ref(), &["a", "b"]).await;
    let t1 = t(2026, 11, 3) + Duration::microseconds(5);
    let t2 = t(2026, 11, 4);
    let key = |id: &str, role: Role, customer: Option<&str>, at| ApiKey {
        id: id.into(),
        role,
        customer_id: customer.map(Into::into),
        label: format!("label {id}"),
        key_sha256: format!("{id:0>64}"),
        created_at: at,
        revoked_at: None,
    };
    let k1 = key("k1", Role::Admin, None, t1);
    let k3 = key("k3", Role::Customer, Some("a"), t2);
    let k2 = key("k2", Role::Collector, None, t2);
    for k in [&k1, &k3, &k2] {
        st.create_api_key(k, "root").await.unwrap();
    }
    assert_eq!(
        err_kind(
            st.create_api_key(&key("k4", Role::Customer, Some("zz"), t2), "root")
                .await
        ),
        "not_found"
    );
    assert_eq!(
        err_kind(
            st.create_api_key(
                &ApiKey {
                    label: "again".into(),
                    key_sha256: "f".repeat(64),
                    ..k1.clone()
                },
                "root"
            )
            .await
        ),
        "conflict",
        "ids are unique"
    );
    assert_eq!(
        err_kind(
            st.create_api_key(
                &ApiKey {
                    id: "k5".into(),
                    ..k1.clone()
                },
                "root"
            )
            .await
        ),
        "conflict",
        "hashes are unique"
    );
    assert_eq!(
        err_kind(
            st.create_api_key(&key("k6", Role::Admin, Some("a"), t2), "root")
                .await
        ),
        "internal",
        "only customer keys have a customer (the database's check)"
    );
    assert_eq!(
        st.api_keys().await.unwrap(),
        vec![k2.clone(), k3.clone(), k1.clone()]
    );

    let revoked = st.revoke_api_key("k2", "root").await.unwrap();
    let at = revoked.revoked_at.expect("revoked");
    assert_within([at], since);
    assert_eq!(
        revoked,
        ApiKey {
            revoked_at: Some(at),
            ..k2.clone()
        }
    );
    assert_eq!(err_kind(st.revoke_api_key("k2", "root").await), "not_found");
    assert_eq!(
        err_kind(st.revoke_api_key("nope", "root").await),
        "not_found"
    );
    assert_eq!(
        st.api_keys().await.unwrap(),
        vec![revoked.clone(), k3.clone(), k1.clone()]
    );
    assert_audit(
        st.as_ref(),
        "key:k2",
        since,
        &[
            (
                "root",
                "key.create",
                None,
                Some(json!({"id": "k2", "role": "collector", "customer_id": null,
                    "label": "label k2", "created_at": t2, "revoked_at": null})),
            ),
            (
                "root",
                "key.revoke",
                Some(json!({"revoked": false})),
                Some(json!({"revoked": true, "role": "collector"})),
            ),
        ],
    )
    .await;

    // Quota settings.
    assert_eq!(
        st.quota_settings().await.unwrap(),
        HashMap::from([("a".into(), (false, None)), ("b".into(), (false, None))])
    );
    st.set_spending_cap("a", Some(d("250.50")), "alice")
        .await
        .unwrap();
    st.set_suspended("b", true, "ops").await.unwrap();
    let settings = st.quota_settings().await.unwrap();
    assert_eq!(
        settings,
        HashMap::from([
            ("a".into(), (false, Some(d("250.50")))),
            ("b".into(), (true, None))
        ])
    );
    assert_eq!(settings["a"].1.unwrap().to_string(), "250.50");
    assert_eq!(
        err_kind(st.set_spending_cap("a", Some(d("-1")), "alice").await),
        "internal",
        "a negative cap is refused by the database's check"
    );
    assert_eq!(
        err_kind(st.set_spending_cap("zz", None, "alice").await),
        "not_found"
    );
    assert_eq!(
        err_kind(st.set_suspended("zz", true, "ops").await),
        "not_found"
    );
    st.set_spending_cap("a", None, "alice").await.unwrap();
    st.set_suspended("b", false, "ops").await.unwrap();
    st.set_spending_cap("b", Some(d("0")), "alice")
        .await
        .unwrap();
    assert_eq!(
        st.quota_settings().await.unwrap(),
        HashMap::from([
            ("a".into(), (false, None)),
            ("b".into(), (false, Some(d("0"))))
        ])
    );
    assert_audit(
        st.as_ref(),
        "customer:a",
        since,
        &[
            (
                "test",
                "customer.create",
                None,
                Some(serde_json::to_value(customer("a")).unwrap()),
            ),
            (
                "alice",
                "spending_cap.set",
                Some(json!({"spending_cap": null})),
                Some(json!({"spending_cap": "250.50"})),
            ),
            (
                "alice",
                "spending_cap.set",
                Some(json!({"spending_cap": "250.50"})),
                Some(json!({"spending_cap": null})),
            ),
        ],
    )
    .await;
    assert_audit(
        st.as_ref(),
        "customer:b",
        since,
        &[
            (
                "test",
                "customer.create",
                None,
                Some(serde_json::to_value(customer("b")).unwrap()),
            ),
            (
                "ops",
                "account.suspend",
                Some(json!({"suspended": false})),
                Some(json!({"suspended": true})),
            ),
            (
                "ops",
                "account.resume",
                Some(json!({"suspended": true})),
                Some(json!({"suspended": false})),
            ),
            (
                "alice",
                "spending_cap.set",
                Some(json!({"spending_cap": null})),
                Some(json!({"spending_cap": "0"})),
            ),
        ],
    )
    .await;
}

fn new_alert(customer: &str, kind: &str, subject: &str, threshold: u32) -> NewAlert {
    NewAlert {
        customer_id: customer.into(),
        period_start: nov(1),
        kind: kind.parse().unwrap(),
        subject: subject.into(),
        threshold,
        payload: json!({"customer": customer, "kind": kind, "threshold": threshold,
            "amount": "12.34", "nested": {"z": 1, "a": [1, 2]}}),
    }
}

/// The usage alert outbox: raised once, claimed under a lease, settled.
async fn alerts(db: Db) {
    let st = db.st.clone();
    let since = Utc::now();
    customers(st.as_ref(), &["a", "b", "c"]).await;
    let now = nov(10) + Duration::microseconds(17);
    let now2 = now + Duration::seconds(30);
    let lease = Duration::seconds(60);
    let a50 = new_alert("a", "spending_cap", "", 50);
    let a80 = new_alert("a", "spending_cap", "", 80);
    let a_allow = new_alert("a", "allowance", "compute instance_type=t4g.small", 50);
    let b50 = new_alert("b", "spending_cap", "", 50);

    assert_eq!(
        st.record_alerts(&[a50.clone(), a80.clone()], now)
            .await
            .unwrap(),
        vec![a50.clone(), a80.clone()]
    );
    assert_eq!(
        st.record_alerts(&[a50.clone(), a_allow.clone(), b50.clone()], now2)
            .await
            .unwrap(),
        vec![a_allow.clone(), b50.clone()],
        "raised once per (customer, period, kind, subject, threshold)"
    );
    assert_eq!(
        st.record_alerts(std::slice::from_ref(&a80), now2)
            .await
            .unwrap(),
        vec![]
    );
    // One bad alert fails the whole call: nothing of it is recorded.
    let c50 = new_alert("c", "spending_cap", "", 50);
    assert_eq!(
        err_kind(
            st.record_alerts(&[c50.clone(), new_alert("zz", "spending_cap", "", 50)], now)
                .await
        ),
        "internal"
    );
    assert_eq!(st.alerts_of("c").await.unwrap(), vec![]);

    let stored = st.alerts_of("a").await.unwrap();
    assert_within(stored.iter().map(|a| a.created_at), since);
    assert!(stored.windows(2).all(|w| w[0].id < w[1].id));
    let fresh = |stored: &Alert, a: &NewAlert, due| Alert {
        id: stored.id,
        alert: a.clone(),
        created_at: stored.created_at,
        status: AlertStatus::Pending,
        attempts: 0,
        next_attempt_at: due,
        delivered_at: None,
        last_error: None,
    };
    let expected = vec![
        fresh(&stored[0], &a50, now),
        fresh(&stored[1], &a80, now),
        fresh(&stored[2], &a_allow, now2),
    ];
    assert_eq!(stored, expected);
    let b_stored = st.alerts_of("b").await.unwrap();
    assert_eq!(b_stored, vec![fresh(&b_stored[0], &b50, now2)]);
    let leased = |a: &Alert, until| Alert {
        next_attempt_at: until,
        ..a.clone()
    };

    // Claims: due ones, oldest first, up to the limit; a claim is a lease.
    assert_eq!(
        st.claim_due_alerts(now, lease, 10).await.unwrap(),
        vec![
            leased(&expected[0], now + lease),
            leased(&expected[1], now + lease)
        ]
    );
    assert_eq!(st.claim_due_alerts(now, lease, 10).await.unwrap(), vec![]);
    assert_eq!(
        st.claim_due_alerts(now2, lease, 1).await.unwrap(),
        vec![leased(&expected[2], now2 + lease)]
    );
    assert_eq!(
        st.claim_due_alerts(now2, lease, 10).await.unwrap(),
        vec![leased(&b_stored[0], now2 + lease)]
    );
    // A claimer that died: its alerts come back after the lease.
    let later = now + lease;
    assert_eq!(
        st.claim_due_alerts(later, lease, 10).await.unwrap(),
        vec![
            leased(&expected[0], later + lease),
            leased(&expected[1], later + lease)
        ]
    );

    // Settling.
    let retry_at = now + Duration::minutes(5);
    st.settle_alert(expected[0].id, AlertOutcome::Delivered)
        .await
        .unwrap();
    st.settle_alert(
        expected[1].id,
        AlertOutcome::Retry {
            at: retry_at,
            error: "HTTP 500".into(),
        },
    )
    .await
    .unwrap();
    st.settle_alert(
        expected[2].id,
        AlertOutcome::GaveUp {
            error: "HTTP 410".into(),
        },
    )
    .await
    .unwrap();
    st.settle_alert(i64::MAX, AlertOutcome::Delivered)
        .await
        .unwrap(); // changes nothing
    let settled = st.alerts_of("a").await.unwrap();
    let delivered_at = settled[0].delivered_at.expect("delivered");
    assert_within([delivered_at], since);
    assert_eq!(
        settled,
        vec![
            Alert {
                status: AlertStatus::Delivered,
                attempts: 1,
                delivered_at: Some(delivered_at),
                ..leased(&expected[0], later + lease)
            },
            Alert {
                attempts: 1,
                last_error: Some("HTTP 500".into()),
                ..leased(&expected[1], retry_at)
            },
            Alert {
                status: AlertStatus::Failed,
                attempts: 1,
                last_error: Some("HTTP 410".into()),
                ..leased(&expected[2], now2 + lease)
            },
        ]
    );
    // Delivered and failed alerts are never claimed again.
    let much_later = now + Duration::hours(1);
    assert_eq!(
        st.claim_due_alerts(much_later, lease, 10).await.unwrap(),
        vec![
            leased(&settled[1], much_later + lease),
            leased(&b_stored[0], much_later + lease)
        ]
    );
}

/// Concurrent writers through two independent handles (two processes):
/// nothing fails for being busy, and the state stays consistent.
async fn concurrent_writers(db: Db) {
    let st = db.st.clone();
    let other = db.other().await;
    let handles = [st.clone(), other.clone()];
    st.publish_plan(&payg(1), "staff").await.unwrap();
    st.publish_plan(&team(), "staff").await.unwrap();
    let ids: Vec<String> = (0..8).map(|i| format!("c{i}")).collect();
    for id in &ids {
        st.create_customer(&customer(id), "test").await.unwrap();
        st.subscribe(id, &NewSubscription::new("payg", 1, t(2026, 10, 1)), "test")
            .await
            .unwrap();
    }

    // Two concurrent switches per customer (one per handle): to team at
    // Nov 10 and to payg v2 at Nov 20. Both succeed, serialized: when the
    // later one ran first, the earlier one replaces it (withdraws it).
    st.publish_plan(&payg(2), "staff").await.unwrap();
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        for (j, (day, to, v)) in [(10, "team", 1), (20, "payg", 2)].into_iter().enumerate() {
            let h = handles[(i + j) % 2].clone();
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                let r = h.switch_plan(&id, to, v, nov(day), "staff").await;
                (id, day, r)
            }));
        }
    }
    let mut outcomes: HashMap<String, HashMap<u32, SwitchOutcome>> = HashMap::new();
    for task in tasks {
        let (id, day, r) = task.await.unwrap();
        let o = r.unwrap_or_else(|e| panic!("switch of {id} at day {day}: {e:?}"));
        assert_eq!(o.effective_at, nov(day), "{id}");
        outcomes.entry(id).or_default().insert(day, o);
    }
    let wide = Period {
        start: t(2026, 1, 1),
        end: t(2028, 1, 1),
    };
    let all = st.plan_segments_all(wide).await.unwrap();
    let seg = |plan: &str, version, start, end| PlanSegment {
        trial: false,
        plan: plan.into(),
        version,
        start,
        end,
    };
    let mut replaced_some = 0;
    for id in &ids {
        let o = &outcomes[id];
        assert!(o[&20].withdrawn.is_empty(), "{id}: {o:?}");
        let replaced = !o[&10].withdrawn.is_empty();
        let expected = if replaced {
            replaced_some += 1;
            let w = &o[&10].withdrawn;
            assert_eq!(
                (
                    w.len(),
                    w[0].plan.as_str(),
                    w[0].version,
                    w[0].start,
                    w[0].end
                ),
                (1, "payg", 2, nov(20), None),
                "{id}"
            );
            vec![
                seg("payg", 1, t(2026, 10, 1), nov(10)),
                seg("team", 1, nov(10), wide.end),
            ]
        } else {
            vec![
                seg("payg", 1, t(2026, 10, 1), nov(10)),
                seg("team", 1, nov(10), nov(20)),
                seg("payg", 2, nov(20), wide.end),
            ]
        };
        assert_eq!(all[id], expected, "{id}");
        let log = st.audit_log(&format!("customer:{id}")).await.unwrap();
        assert_eq!(log.len(), 4 + replaced as usize, "{id}: {log:?}");
    }
    eprintln!(
        "{replaced_some} of {} switches at Nov 10 replaced the one at Nov 20",
        ids.len()
    );

    // Concurrent finalization batches that overlap: every (customer,
    // period) once, numbers 1..=8 without a gap.
    let oct = month(2026, 10);
    let fin = nov(1) + Duration::hours(2);
    let mut tasks = Vec::new();
    for k in 0..6 {
        let batch: Vec<NewInvoice> = (k..k + 3)
            .map(|i| {
                new_invoice(
                    &ids[i % 8],
                    oct,
                    "1.00",
                    vec![],
                    SyncStatus::Pending,
                    vec![],
                )
            })
            .collect();
        let h = handles[k % 2].clone();
        tasks.push(tokio::spawn(
            async move { h.insert_invoices(batch, fin).await },
        ));
    }
    let mut written = Vec::new();
    for task in tasks {
        written.extend(task.await.unwrap().expect("no batch fails"));
    }
    written.sort_by_key(|i| i.seq);
    assert_eq!(
        written.iter().map(|i| i.seq).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    let stored = other.invoices_in_period(oct.start).await.unwrap();
    assert_eq!(stored.len(), 8);
    for inv in &written {
        assert_eq!(inv.number, invoice_number(inv.seq));
        assert_eq!(&stored[&inv.customer_id], inv);
    }

    // Concurrent claimers never claim the same alert.
    let alerts: Vec<NewAlert> = (0..20)
        .map(|i| new_alert(&ids[i % 8], "spending_cap", "", 10 + i as u32))
        .collect();
    let now = nov(10);
    assert_eq!(
        st.record_alerts(&alerts, now).await.unwrap().len(),
        alerts.len()
    );
    let mut tasks = Vec::new();
    for k in 0..4 {
        let h = handles[k % 2].clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = h
                    .claim_due_alerts(now, Duration::minutes(5), 3)
                    .await
                    .unwrap();
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|a| a.id));
            }
        }));
    }
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.extend(task.await.unwrap());
    }
    let unique: BTreeSet<i64> = claimed.iter().copied().collect();
    assert_eq!(unique.len(), claimed.len(), "claimed twice: {claimed:?}");
    let mut all_ids = BTreeSet::new();
    for id in &ids {
        all_ids.extend(st.alerts_of(id).await.unwrap().into_iter().map(|a| a.id));
    }
    assert_eq!(unique, all_ids);
}

// -------------------------------------------------------- schema and SQLite

/// Both schemas have the same tables with the same columns in the same
/// order (an export/import copies them by name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_schemas_have_the_same_tables_and_columns() {
    let pg = Db::pg("schema").await;
    let lite = Db::sqlite().await;
    let (Raw::Pg(pg), Raw::Lite(lite)) = (&pg.raw, &lite.raw) else {
        unreachable!()
    };
    let mut pg_tables: HashMap<String, Vec<String>> = HashMap::new();
    for r in sqlx::query(
        "SELECT table_name::text AS t, column_name::text AS c FROM information_schema.columns \
         WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
    )
    .fetch_all(pg)
    .await
    .unwrap()
    {
        pg_tables.entry(r.get("t")).or_default().push(r.get("c"));
    }
    let mut lite_tables: HashMap<String, Vec<String>> = HashMap::new();
    for r in sqlx::query(
        "SELECT m.name AS t, c.name AS c FROM sqlite_schema m, pragma_table_info(m.name) c \
         WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' ORDER BY m.name, c.cid",
    )
    .fetch_all(lite)
    .await
    .unwrap()
    {
        lite_tables.entry(r.get("t")).or_default().push(r.get("c"));
    }
    // The migrations tables differ (applied_at and its type) and are not
    // copied.
    assert_eq!(
        pg_tables.remove("schema_migrations"),
        Some(vec!["version".into(), "name".into(), "applied_at".into()])
    );
    assert_eq!(
        lite_tables.remove("schema_migrations"),
        Some(vec!["version".into(), "name".into(), "applied_at".into()])
    );
    assert_eq!(lite_tables, pg_tables);
    assert_eq!(pg_tables.len(), 17, "{:?}", pg_tables.keys());
}

/// The SQLite file: WAL, synchronous=FULL, foreign keys, busy timeout;
/// times as integer microseconds and money as exact text; idempotent
/// migrations; data survives reopening; a usage store's file is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_settings_and_encodings() {
    let (dir, path, st) = support::sqlite_state().await;
    let pragma = |name: &'static str| {
        let st = st.clone();
        async move {
            let r = sqlx::query(&format!("PRAGMA {name}"))
                .fetch_one(st.pool())
                .await
                .unwrap();
            if name == "journal_mode" {
                r.get::<String, _>(0)
            } else {
                r.get::<i64, _>(0).to_string()
            }
        }
    };
    assert_eq!(pragma("journal_mode").await, "wal");
    assert_eq!(pragma("synchronous").await, "2", "FULL");
    assert_eq!(pragma("foreign_keys").await, "1");
    assert_eq!(pragma("busy_timeout").await, "30000");

    st.migrate().await.unwrap();
    st.migrate().await.unwrap();
    let applied: Vec<(i64, String)> =
        sqlx::query_as("SELECT version, name FROM schema_migrations ORDER BY version")
            .fetch_all(st.pool())
            .await
            .unwrap();
    assert_eq!(
        applied,
        vec![
            (1, "state".to_string()),
            (2, "lifecycle".to_string()),
            (3, "fees_in_advance".to_string()),
            (4, "credits".to_string())
        ]
    );

    st.create_customer(&customer("a"), "test").await.unwrap();
    let oct = month(2026, 10);
    let fin = nov(1) + Duration::microseconds(1_234_567);
    let inv = new_invoice("a", oct, "12.300", vec![], SyncStatus::Pending, vec![]);
    st.insert_invoices(vec![inv.clone()], fin).await.unwrap();
    let row = sqlx::query(
        "SELECT typeof(subtotal) AS ts, subtotal, typeof(finalized_at) AS tf, finalized_at, \
         typeof(period_start) AS tp, period_start, typeof(body) AS tb FROM invoices",
    )
    .fetch_one(st.pool())
    .await
    .unwrap();
    assert_eq!(
        (
            row.get::<String, _>("ts"),
            row.get::<String, _>("subtotal"),
            row.get::<String, _>("tf"),
            row.get::<i64, _>("finalized_at"),
            row.get::<String, _>("tp"),
            row.get::<i64, _>("period_start"),
            row.get::<String, _>("tb"),
        ),
        (
            "text".to_string(),
            "12.300".to_string(),
            "integer".to_string(),
            micros(fin),
            "integer".to_string(),
            micros(oct.start),
            "text".to_string(),
        )
    );
    assert_eq!(micros(fin), 1_793_491_201_234_567);
    // STRICT tables refuse a float where a time belongs.
    let mut conn = st.pool().acquire().await.unwrap();
    let e = sqlx::query("UPDATE customers SET created_at = 1.5 WHERE id = 'a'")
        .execute(&mut *conn)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cannot store REAL"), "{e}");
    drop(conn);

    // Reopened, the state is there.
    drop(st);
    let st = SqliteState::open(&path).await.unwrap();
    st.migrate().await.unwrap();
    assert_eq!(st.customer("a").await.unwrap(), customer("a"));
    assert_eq!(st.invoice(&inv.id).await.unwrap(), finalized(&inv, 1, fin));

    // A file whose migrations are another store's is refused.
    let usage = dir.path().join("usage.db");
    let other = SqliteState::open(&usage).await.unwrap();
    sqlx::query("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL)")
        .execute(other.pool())
        .await
        .unwrap();
    sqlx::query("INSERT INTO schema_migrations (version, name) VALUES (1, 'usage')")
        .execute(other.pool())
        .await
        .unwrap();
    let e = other.migrate().await.unwrap_err();
    assert!(
        matches!(&e, StateError::Invalid(m) if m.contains("a SQLite file of its own")),
        "{e:?}"
    );
}
