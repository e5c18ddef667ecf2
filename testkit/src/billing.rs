//! Shared harness for billing tests against real PostgreSQL and ClickHouse
//! (addresses from the environment, set by `ops/test.sh`; a missing one
//! fails the test, never skips it). Each test gets its own PostgreSQL
//! database and ClickHouse database, kept afterwards for inspection.

use aggregator::metrics::Metrics as AggMetrics;
use aggregator::pipeline::{DeadLetter, DeadLetterSink, Message, Processor};
use aggregator::store::clickhouse::ClickHouseStore;
use aggregator::{DynUsageStore, UsageWriter};
use billing_api::api::{router, ApiState};
use billing_api::auth::Authenticator;
use billing_api::catalog::Catalog;
use billing_api::finalize::{FinalizeConfig, Finalizer};
use billing_api::metrics::Metrics;
use billing_api::service::load_catalog;
use billing_api::state::postgres::PgState;
use billing_api::state::{DynStateStore, StateStore};
use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use rust_decimal::Decimal;
use schemas::MeterCatalog;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::Executor;
use std::sync::Arc;

pub fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run the tests through ops/test.sh"))
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{:08x}",
        std::process::id(),
        Utc::now().timestamp_subsec_nanos()
    )
}

/// A new, empty PostgreSQL database for one test: its URL.
pub async fn pg_database(test: &str) -> String {
    let base = env("TALLY_DATABASE_URL");
    let name = unique(&format!("b_{test}"));
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&base)
        .await
        .unwrap();
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    let (prefix, _) = base.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

/// A fresh PostgreSQL database: its URL and a migrated state store.
pub async fn pg(test: &str) -> (String, Arc<DynStateStore<'static>>, sqlx::PgPool) {
    let url = pg_database(test).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .unwrap();
    let st = PgState::from_pool(pool.clone());
    st.migrate().await.unwrap();
    (url, DynStateStore::new_arc(st), pool)
}

/// A fresh, migrated SQLite state store (the embedded mode's) in a new
/// temporary directory, removed when the returned `TempDir` is dropped:
/// (directory, database file, store).
pub async fn sqlite_state() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Arc<billing_api::state::sqlite::SqliteState>,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let st = billing_api::state::sqlite::SqliteState::open(&path)
        .await
        .unwrap();
    st.migrate().await.unwrap();
    (dir, path, Arc::new(st))
}

/// A fresh, migrated ClickHouse database: (url, database, store).
pub async fn clickhouse(test: &str) -> (String, String, Arc<ClickHouseStore>) {
    let url = env("TALLY_CLICKHOUSE_URL");
    let db = unique(&format!("b_{test}"));
    let store = Arc::new(ClickHouseStore::new(&url, &db));
    store.migrate().await.unwrap();
    (url, db, store)
}

/// `n` customers `{prefix}1000000`, `{prefix}1000001`, … (ids of equal
/// length, so they sort as numbers), each subscribed to `plan` version 1
/// from `starts_at`, written in two statements. Returns their ids.
pub async fn bulk_customers(
    pool: &sqlx::PgPool,
    prefix: &str,
    n: i64,
    plan: &str,
    starts_at: DateTime<Utc>,
) -> Vec<String> {
    sqlx::query(
        "INSERT INTO customers (id, external_id, name) \
         SELECT $2 || (1000000 + i - 1), 'x' || $2 || i, 'Customer ' || i FROM generate_series(1, $1) i",
    )
    .bind(n)
    .bind(prefix)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO subscriptions (customer_id, plan, version, starts_at) \
         SELECT $2 || (1000000 + i - 1), $3, 1, $4 FROM generate_series(1, $1) i",
    )
    .bind(n)
    .bind(prefix)
    .bind(plan)
    .bind(starts_at)
    .execute(pool)
    .await
    .unwrap();
    (0..n)
        .map(|i| format!("{prefix}{}", 1_000_000 + i))
        .collect()
}

/// Runs one ClickHouse statement over HTTP; returns its output.
pub async fn clickhouse_exec(url: &str, sql: &str) -> String {
    let r = reqwest::Client::new()
        .post(url)
        .body(sql.to_owned())
        .send()
        .await
        .unwrap();
    let ok = r.status().is_success();
    let text = r.text().await.unwrap();
    assert!(ok, "{sql}: {text}");
    text
}

pub async fn default_catalog(st: &(impl StateStore + ?Sized)) {
    load_catalog(
        st,
        &Catalog::default_catalog(),
        &MeterCatalog::default_catalog(),
    )
    .await
    .unwrap();
}

struct NoDeadLetters;
impl DeadLetterSink for NoDeadLetters {
    async fn send(&self, letters: Vec<DeadLetter>) -> anyhow::Result<()> {
        anyhow::bail!("unexpected dead letters: {letters:?}")
    }
}

/// Writes events through the aggregator's processor (validation, dedup,
/// raw rows and rollups) into ClickHouse.
pub struct Writer {
    store: Arc<ClickHouseStore>,
    next_offset: i64,
}

impl Writer {
    pub fn new(store: Arc<ClickHouseStore>) -> Self {
        Self {
            store,
            next_offset: 0,
        }
    }

    /// `(id, customer, time, type, data)`
    pub async fn write(
        &mut self,
        events: &[(String, &str, DateTime<Utc>, &str, serde_json::Value)],
    ) {
        let msgs = events
            .iter()
            .map(|(id, customer, t, ty, data)| {
                self.next_offset += 1;
                Message {
                    partition: 0,
                    offset: self.next_offset,
                    key: Some(customer.as_bytes().to_vec()),
                    payload: Some(
                        serde_json::json!({"specversion":"1.0","id":id,"source":"test","type":ty,
                            "subject":customer,"time":t.to_rfc3339(),"data":data})
                        .to_string()
                        .into_bytes(),
                    ),
                }
            })
            .collect();
        let (_tx, stop) = tokio::sync::watch::channel(false);
        Processor::new(
            self.store.clone(),
            Arc::new(MeterCatalog::default_catalog()),
            AggMetrics::new(),
        )
        .process(msgs, &NoDeadLetters, &stop)
        .await
        .unwrap();
    }
}

pub fn finalizer(
    state: Arc<DynStateStore<'static>>,
    usage: Arc<ClickHouseStore>,
    batch: usize,
) -> Finalizer {
    Finalizer {
        state,
        usage: DynUsageStore::from_arc(usage),
        meters: Arc::new(MeterCatalog::default_catalog()),
        config: FinalizeConfig {
            batch,
            ..FinalizeConfig::default()
        },
        metrics: Metrics::new(),
    }
}

pub fn compute(app: &str, ty: &str, secs: i64) -> serde_json::Value {
    serde_json::json!({"app":app,"instance_type":ty,"region":"fra","instance_seconds":secs})
}

pub fn requests(app: &str, n: i64) -> serde_json::Value {
    serde_json::json!({"app":app,"count":n})
}

pub const KEY: &str = "test-admin-key";
pub const WHSEC: &str = "whsec_test_secret";
pub const SESSION_SECRET: &[u8] = b"test-session-secret-0123456789abcdef";

/// billing-api's router in this process over fresh stores.
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
    pub pool: sqlx::PgPool,
    pub st: Arc<DynStateStore<'static>>,
    pub usage: Arc<ClickHouseStore>,
    pub quota: Arc<billing_api::quota_service::QuotaService>,
}

impl Api {
    pub async fn start(test: &str) -> Api {
        let (_url, st, pool) = pg(test).await;
        let (_ch, _db, usage) = clickhouse(test).await;
        default_catalog(st.as_ref()).await;
        let quota = Arc::new(billing_api::quota_service::QuotaService::new(
            st.clone(),
            DynUsageStore::from_arc(usage.clone()),
            Arc::new(MeterCatalog::default_catalog()),
        ));
        let app = Arc::new(ApiState {
            quota: quota.clone(),
            state: st.clone(),
            usage: DynUsageStore::from_arc(usage.clone()),
            meters: Arc::new(MeterCatalog::default_catalog()),
            metrics: Metrics::new(),
            auth: Arc::new(Authenticator::new(
                vec![Sha256::digest(KEY.as_bytes()).into()],
                SESSION_SECRET.to_vec(),
            )),
            webhook_secret: Some(WHSEC.into()),
            min_charge: Decimal::new(50, 2),
            grace: std::time::Duration::from_secs(3600),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router(app)).await.unwrap() });
        Api {
            base,
            http: reqwest::Client::new(),
            pool,
            st,
            usage,
            quota,
        }
    }

    pub async fn call(&self, m: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_as(KEY, m, path, body).await
    }

    /// A call with another bearer credential (`""`: none).
    pub async fn call_as(
        &self,
        bearer: &str,
        m: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut r = self
            .http
            .request(m, format!("{}{path}", self.base))
            .header("X-Tally-Actor", "alice");
        if !bearer.is_empty() {
            r = r.bearer_auth(bearer);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn raw(
        &self,
        m: Method,
        path: &str,
        ctype: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let mut r = self
            .http
            .request(m, format!("{}{path}", self.base))
            .bearer_auth(KEY)
            .body(body);
        if let Some(c) = ctype {
            r = r.header("content-type", c);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Row counts of every table an admin call can change.
    pub async fn snapshot(&self) -> Vec<i64> {
        let mut out = Vec::new();
        for t in [
            "customers",
            "plan_versions",
            "subscriptions",
            "seat_changes",
            "apps",
            "audit_log",
            "invoices",
        ] {
            out.push(
                sqlx::query_scalar(&format!("SELECT count(*) FROM {t}"))
                    .fetch_one(&self.pool)
                    .await
                    .unwrap(),
            );
        }
        let retired: i64 =
            sqlx::query_scalar("SELECT count(*) FROM plan_versions WHERE retired_at IS NOT NULL")
                .fetch_one(&self.pool)
                .await
                .unwrap();
        out.push(retired);
        out
    }
}

/// A rounded invoice line of `kind` (and `meter`) for `amount`, its segment
/// November 2026: what settlement tests put on an invoice.
pub fn line(
    kind: billing_api::rating::LineKind,
    meter: Option<&str>,
    amount: &str,
) -> billing_api::rating::Line {
    use chrono::TimeZone;
    let amount: Decimal = amount.parse().unwrap();
    billing_api::rating::Line {
        kind,
        description: format!("{kind:?}"),
        plan: "p".into(),
        plan_version: 1,
        segment_start: Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
        segment_end: Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
        meter: meter.map(str::to_owned),
        filter: Default::default(),
        events: 0,
        quantity: Decimal::ZERO,
        price_quantity: Decimal::ZERO,
        unit_price: None,
        tiers: vec![],
        amount_exact: amount,
        amount,
        waived: None,
        advance: None,
    }
}
