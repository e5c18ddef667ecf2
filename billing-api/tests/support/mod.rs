//! Shared harness for billing tests against real PostgreSQL and ClickHouse
//! (addresses from the environment, set by `ops/test.sh`; a missing one
//! fails the test, never skips it). Each test gets its own PostgreSQL
//! database and ClickHouse database, kept afterwards for inspection.
#![allow(dead_code)]

use aggregator::metrics::Metrics as AggMetrics;
use aggregator::pipeline::{DeadLetter, DeadLetterSink, Message, Processor};
use aggregator::store::clickhouse::ClickHouseStore;
use aggregator::UsageWriter;
use billing_api::catalog::Catalog;
use billing_api::finalize::{FinalizeConfig, Finalizer};
use billing_api::metrics::Metrics;
use billing_api::service::load_catalog;
use billing_api::state::postgres::PgState;
use billing_api::state::StateStore;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use schemas::MeterCatalog;
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

/// A fresh PostgreSQL database: its URL and a migrated state store.
pub async fn pg(test: &str) -> (String, Arc<PgState>, sqlx::PgPool) {
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
    let url = format!("{prefix}/{name}");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .unwrap();
    let st = PgState::from_pool(pool.clone());
    st.migrate().await.unwrap();
    (url, Arc::new(st), pool)
}

/// A fresh, migrated ClickHouse database: (url, database, store).
pub async fn clickhouse(test: &str) -> (String, String, Arc<ClickHouseStore>) {
    let url = env("TALLY_CLICKHOUSE_URL");
    let db = unique(&format!("b_{test}"));
    let store = Arc::new(ClickHouseStore::new(&url, &db));
    store.migrate().await.unwrap();
    (url, db, store)
}

pub async fn default_catalog(st: &dyn StateStore) {
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
    fn send(&self, letters: Vec<DeadLetter>) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move { anyhow::bail!("unexpected dead letters: {letters:?}") })
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
    state: Arc<dyn StateStore>,
    usage: Arc<ClickHouseStore>,
    batch: usize,
) -> Finalizer {
    Finalizer {
        state,
        usage,
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
