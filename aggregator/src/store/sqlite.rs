//! The usage store on SQLite, for the embedded mode: the same traits, the
//! same two tables and the same resume rules as ClickHouse
//! (`clickhouse.rs`), so the aggregator's processor and billing run on it
//! unchanged. Grouping and bucketing are the shared [`group_cells`].
//!
//! Durability: the database runs in WAL mode with `synchronous=FULL`, so a
//! committed write survives a crash or power loss. The processor writes a
//! batch's raw rows and rollups in one transaction (`write_batch`: one fsync,
//! never rows without rollups); `write_raw` and `write_rollups` alone are one
//! transaction each, and a raw write without its rollups is still repaired
//! on load. Quantities are stored as decimal text
//! and aggregated in Rust (SQLite's numbers are floating point).

use super::{
    from_stored_time, group_cells, split_hours, stored_time, Cell, Partial, PartitionState,
    PerCustomer, RawRow, UsageQuery, UsageRow, UsageStore, UsageWriter,
};
use crate::pipeline::{DeadLetter, DeadLetterSink};
use crate::rollup::rollup_version;
use crate::rollup::{RollupKey, RollupValue};
use anyhow::Context;
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use schemas::{Aggregation, MeterDef};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::str::FromStr;

/// Rows per INSERT statement (12 parameters each, far below SQLite's
/// limit of 32,766): one statement per few hundred rows instead of one per
/// row is most of the write cost.
const ROWS_PER_INSERT: usize = 500;

pub struct SqliteStore {
    pool: SqlitePool,
}

fn dec(s: &str) -> anyhow::Result<Decimal> {
    Decimal::from_str(s).with_context(|| format!("stored quantity {s:?} is not a decimal"))
}

fn ts(s: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(s, 0).single().unwrap_or_default()
}

fn rollup_row(r: &sqlx::sqlite::SqliteRow) -> anyhow::Result<(RollupKey, RollupValue)> {
    Ok((
        RollupKey {
            customer: r.get("customer"),
            meter: r.get("meter"),
            hour: r.get("hour"),
            app: r.get("app"),
            dims: r.get("dims"),
        },
        RollupValue {
            events: r.get::<i64, _>("events") as u64,
            sum: dec(r.get("quantity_sum"))?,
            max: dec(r.get("quantity_max"))?,
            latest: (r.get("latest_time"), dec(r.get("latest_quantity"))?),
            partition: r.get::<i64, _>("kafka_partition") as u32,
            version: r.get::<i64, _>("version") as u64,
        },
    ))
}

type Tx<'a> = sqlx::Transaction<'a, sqlx::Sqlite>;

/// Inserts raw rows inside `tx`, a few hundred per statement.
async fn insert_raw(tx: &mut Tx<'_>, rows: &[RawRow]) -> anyhow::Result<()> {
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO usage_events (customer, meter, time, time_us, app, dims, quantity, unique_value, source, id, \
             event_type, kafka_partition, kafka_offset) ",
        );
        q.push_values(chunk, |mut b, r| {
            b.push_bind(&r.customer)
                .push_bind(&r.meter)
                .push_bind(r.time.timestamp())
                .push_bind(r.time.timestamp_subsec_micros() as i64)
                .push_bind(&r.app)
                .push_bind(&r.dims)
                .push_bind(r.quantity.to_string())
                .push_bind(&r.unique_value)
                .push_bind(&r.source)
                .push_bind(&r.id)
                .push_bind(&r.event_type)
                .push_bind(r.partition as i64)
                .push_bind(r.offset as i64);
        });
        q.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Upserts rollups inside `tx`: a newer version replaces an older one, the
/// same version again is a no-op (idempotent rewrites).
async fn insert_rollups(tx: &mut Tx<'_>, rows: &[(RollupKey, RollupValue)]) -> anyhow::Result<()> {
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO usage_rollups_hourly (customer, meter, hour, app, dims, events, quantity_sum, quantity_max, \
             latest_time, latest_quantity, kafka_partition, version) ",
        );
        q.push_values(chunk, |mut b, (k, v)| {
            b.push_bind(&k.customer)
                .push_bind(&k.meter)
                .push_bind(k.hour)
                .push_bind(&k.app)
                .push_bind(&k.dims)
                .push_bind(v.events as i64)
                .push_bind(v.sum.to_string())
                .push_bind(v.max.to_string())
                .push_bind(v.latest.0)
                .push_bind(v.latest.1.to_string())
                .push_bind(v.partition as i64)
                .push_bind(v.version as i64);
        });
        // A newer version replaces an older one; the same version again
        // is a no-op (idempotent rewrites).
        q.push(
            " ON CONFLICT (customer, meter, hour, app, dims) DO UPDATE SET events = excluded.events, \
             quantity_sum = excluded.quantity_sum, quantity_max = excluded.quantity_max, latest_time = excluded.latest_time, \
             latest_quantity = excluded.latest_quantity, kafka_partition = excluded.kafka_partition, version = excluded.version \
             WHERE excluded.version > usage_rollups_hourly.version",
        );
        q.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Whose rows to read.
#[derive(Clone, Copy)]
enum Scope<'a> {
    One(&'a str),
    All(Option<(&'a str, &'a str)>),
    /// The ids of a JSON array of strings.
    List(&'a str),
}

impl Scope<'_> {
    fn sql(&self) -> &'static str {
        match self {
            Scope::One(_) => "customer = ?1",
            Scope::All(None) => "?1 IS NULL",
            Scope::All(Some(_)) => "customer >= ?1 AND customer <= ?4",
            Scope::List(_) => "customer IN (SELECT value FROM json_each(?1))",
        }
    }

    fn bounds(&self) -> (Option<&str>, Option<&str>) {
        match self {
            Scope::One(c) => (Some(c), None),
            Scope::All(None) => (None, None),
            Scope::All(Some((lo, hi))) => (Some(lo), Some(hi)),
            Scope::List(ids) => (Some(ids), None),
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`.
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Raw rows after `after` (a rowid), oldest first, with their rowids:
    /// a page of an export.
    pub async fn raw_page(&self, after: i64, limit: u32) -> anyhow::Result<Vec<(i64, RawRow)>> {
        let rows = sqlx::query(
            "SELECT rowid, customer, meter, time, time_us, app, dims, quantity, unique_value, source, id, event_type, \
             kafka_partition, kafka_offset FROM usage_events WHERE rowid > ? ORDER BY rowid LIMIT ?",
        )
        .bind(after)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.get("rowid"),
                    RawRow {
                        customer: r.get("customer"),
                        meter: r.get("meter"),
                        time: from_stored_time(r.get("time"), r.get::<i64, _>("time_us") as u32),
                        app: r.get("app"),
                        dims: r.get("dims"),
                        quantity: dec(r.get("quantity"))?,
                        unique_value: r.get("unique_value"),
                        source: r.get("source"),
                        id: r.get("id"),
                        event_type: r.get("event_type"),
                        partition: r.get::<i64, _>("kafka_partition") as u32,
                        offset: r.get::<i64, _>("kafka_offset") as u64,
                    },
                ))
            })
            .collect()
    }

    /// Every rollup row (an export).
    pub async fn all_rollups(&self) -> anyhow::Result<Vec<(RollupKey, RollupValue)>> {
        let rows = sqlx::query(
            "SELECT customer, meter, hour, app, dims, events, quantity_sum, quantity_max, latest_time, \
             latest_quantity, kafka_partition, version FROM usage_rollups_hourly ORDER BY customer, meter, hour, app, dims",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rollup_row).collect()
    }

    /// Dead letters stored so far: (code, reason, offset, payload), oldest first.
    pub async fn dead_letters(&self) -> anyhow::Result<Vec<(String, String, i64, Vec<u8>)>> {
        let rows =
            sqlx::query("SELECT code, reason, kafka_offset, payload FROM dead_letters ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get("code"),
                    r.get("reason"),
                    r.get("kafka_offset"),
                    r.get::<Option<Vec<u8>>, _>("payload").unwrap_or_default(),
                )
            })
            .collect())
    }

    async fn apply_migrations(&self) -> anyhow::Result<()> {
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL)")
            .execute(&self.pool)
            .await?;
        for m in schemas::migrations::SQLITE_USAGE {
            let mut tx = self.pool.begin().await?;
            let done = sqlx::query("SELECT 1 FROM schema_migrations WHERE version = ?")
                .bind(m.version as i64)
                .fetch_optional(&mut *tx)
                .await?;
            if done.is_none() {
                // A plain string runs as a simple query: several statements.
                sqlx::Executor::execute(&mut *tx, m.sql).await?;
                sqlx::query("INSERT INTO schema_migrations (version, name) VALUES (?, ?)")
                    .bind(m.version as i64)
                    .bind(m.name)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        }
        Ok(())
    }

    /// Every raw row of `meters` in `[from, to)` (exact instants, compared
    /// at microsecond precision) as a cell of its own.
    async fn raw_cells(
        &self,
        meters: &[&MeterDef],
        scope: Scope<'_>,
        (from, to): (DateTime<Utc>, DateTime<Utc>),
        distinct: bool,
        out: &mut Vec<(String, String, Cell)>,
    ) -> anyhow::Result<()> {
        let ((fs, fu), (ts_, tu)) = (stored_time(from), stored_time(to));
        for m in meters {
            let sql = format!(
                "SELECT customer, meter, time, app, dims, quantity, unique_value FROM usage_events \
                 WHERE {} AND meter = ?2 AND (time > ?3 OR (time = ?3 AND time_us >= ?6)) \
                 AND (time < ?5 OR (time = ?5 AND time_us < ?7))",
                scope.sql()
            );
            let (lo, hi) = scope.bounds();
            let rows = sqlx::query(&sql)
                .bind(lo)
                .bind(&m.key)
                .bind(fs)
                .bind(hi)
                .bind(ts_)
                .bind(fu as i64)
                .bind(tu as i64)
                .fetch_all(&self.pool)
                .await?;
            for r in rows {
                let q = dec(r.get("quantity"))?;
                let t: i64 = r.get("time");
                let mut p = Partial {
                    events: 1,
                    sum: q,
                    max: q,
                    latest: Some((t, q)),
                    ..Default::default()
                };
                if distinct {
                    p.uniques.insert(r.get("unique_value"));
                }
                out.push((
                    r.get("customer"),
                    r.get("meter"),
                    Cell {
                        time: ts(t),
                        app: r.get("app"),
                        dims: r.get("dims"),
                        partial: p,
                    },
                ));
            }
        }
        Ok(())
    }

    /// Cells of `meters` over `q`'s range: whole hours from the rollups,
    /// partial hours (and unique counts, and `raw` questions) from raw rows,
    /// as the ClickHouse store answers.
    async fn cells(
        &self,
        meters: &[&MeterDef],
        q: &UsageQuery,
        scope: Scope<'_>,
    ) -> anyhow::Result<Vec<(String, String, Cell)>> {
        let mut cells = Vec::new();
        let (raw, rolled): (Vec<&MeterDef>, Vec<&MeterDef>) = meters
            .iter()
            .partition(|m| m.aggregation == Aggregation::UniqueCount || q.raw);
        let range = (q.from, q.to);
        for m in &raw {
            let distinct = m.aggregation == Aggregation::UniqueCount;
            self.raw_cells(&[m], scope, range, distinct, &mut cells)
                .await?;
        }
        if rolled.is_empty() {
            return Ok(cells);
        }
        let (full, edges) = split_hours(q.from, q.to);
        if let Some((f, t)) = full {
            for m in &rolled {
                let sql = format!(
                    "SELECT customer, meter, hour, app, dims, events, quantity_sum, quantity_max, latest_time, latest_quantity \
                     FROM usage_rollups_hourly WHERE {} AND meter = ?2 AND hour >= ?3 AND hour < ?5",
                    scope.sql()
                );
                let (lo, hi) = scope.bounds();
                let rows = sqlx::query(&sql)
                    .bind(lo)
                    .bind(&m.key)
                    .bind(f)
                    .bind(hi)
                    .bind(t)
                    .fetch_all(&self.pool)
                    .await?;
                for r in rows {
                    let events = r.get::<i64, _>("events") as u64;
                    cells.push((
                        r.get("customer"),
                        r.get("meter"),
                        Cell {
                            time: ts(r.get("hour")),
                            app: r.get("app"),
                            dims: r.get("dims"),
                            partial: Partial {
                                events,
                                sum: dec(r.get("quantity_sum"))?,
                                max: dec(r.get("quantity_max"))?,
                                latest: (events > 0).then_some((
                                    r.get("latest_time"),
                                    dec(r.get("latest_quantity"))?,
                                )),
                                ..Default::default()
                            },
                        },
                    ));
                }
            }
        }
        for edge in edges {
            self.raw_cells(&rolled, scope, edge, false, &mut cells)
                .await?;
        }
        Ok(cells)
    }

    /// The rollup values of `keys` recomputed from raw rows.
    async fn rollups_from_raw(
        &self,
        keys: &[RollupKey],
        partition: u32,
        version: u64,
    ) -> anyhow::Result<Vec<(RollupKey, RollupValue)>> {
        let mut out = Vec::new();
        for k in keys {
            let rows = sqlx::query(
                "SELECT time, quantity FROM usage_events WHERE customer = ? AND meter = ? AND time >= ? AND time < ? AND app = ? AND dims = ?",
            )
            .bind(&k.customer)
            .bind(&k.meter)
            .bind(k.hour)
            .bind(k.hour + 3600)
            .bind(&k.app)
            .bind(&k.dims)
            .fetch_all(&self.pool)
            .await?;
            let mut p = Partial::default();
            for r in rows {
                let q = dec(r.get("quantity"))?;
                p.merge(Partial {
                    events: 1,
                    sum: q,
                    max: q,
                    latest: Some((r.get("time"), q)),
                    ..Default::default()
                });
            }
            out.push((
                k.clone(),
                RollupValue {
                    events: p.events,
                    sum: p.sum,
                    max: p.max,
                    latest: p.latest.unwrap_or_default(),
                    partition,
                    version,
                },
            ));
        }
        Ok(out)
    }

    async fn partition_state(
        &self,
        partition: u32,
        window_start: DateTime<Utc>,
    ) -> anyhow::Result<PartitionState> {
        let raw_max: Option<i64> = sqlx::query_scalar(
            "SELECT max(kafka_offset) FROM usage_events WHERE kafka_partition = ?",
        )
        .bind(partition as i64)
        .fetch_one(&self.pool)
        .await?;
        let mut st = PartitionState {
            max_offset: raw_max.map(|m| m as u64),
            ..Default::default()
        };
        let roll_max: Option<i64> = match raw_max {
            Some(_) => {
                sqlx::query_scalar(
                    "SELECT max(version) FROM usage_rollups_hourly WHERE kafka_partition = ?",
                )
                .bind(partition as i64)
                .fetch_one(&self.pool)
                .await?
            }
            None => None,
        };
        let repair = super::repair_from(raw_max.map(|m| m as u64), roll_max.map(|r| r as u64));
        if let (Some(from), Some(raw_max)) = (repair, raw_max) {
            // The last batch's raw rows landed but its rollups did not:
            // re-derive every key it touched from raw rows.
            let rows = sqlx::query(
                "SELECT DISTINCT customer, meter, time - (time % 3600) AS hour, app, dims FROM usage_events \
                 WHERE kafka_partition = ? AND kafka_offset >= ?",
            )
            .bind(partition as i64)
            .bind(from as i64)
            .fetch_all(&self.pool)
            .await?;
            let keys: Vec<RollupKey> = rows
                .iter()
                .map(|r| RollupKey {
                    customer: r.get("customer"),
                    meter: r.get("meter"),
                    hour: r.get("hour"),
                    app: r.get("app"),
                    dims: r.get("dims"),
                })
                .collect();
            let repaired = self
                .rollups_from_raw(&keys, partition, rollup_version(raw_max as u64))
                .await?;
            st.repaired_keys = repaired.len();
            self.write_rollups_tx(repaired).await?;
            tracing::warn!(
                partition,
                keys = st.repaired_keys,
                "repaired rollups after an interrupted batch"
            );
        }
        let [own, imported] = super::dedup_partitions(partition);
        let seen = sqlx::query(
            "SELECT source, id, min(time) AS t FROM usage_events WHERE kafka_partition IN (?, ?) AND time >= ? GROUP BY source, id",
        )
        .bind(own as i64)
        .bind(imported as i64)
        .bind(window_start.timestamp())
        .fetch_all(&self.pool)
        .await?;
        st.seen = seen
            .iter()
            .map(|r| (r.get("source"), r.get("id"), r.get("t")))
            .collect();
        Ok(st)
    }

    async fn write_rollups_tx(&self, rows: Vec<(RollupKey, RollupValue)>) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        insert_rollups(&mut tx, &rows).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Totals per `customer/app/meter` from the rollups (as
    /// `ClickHouseStore::totals`).
    pub async fn totals(&self) -> anyhow::Result<BTreeMap<String, Decimal>> {
        let rows =
            sqlx::query("SELECT customer, app, meter, quantity_sum FROM usage_rollups_hourly")
                .fetch_all(&self.pool)
                .await?;
        let mut out: BTreeMap<String, Decimal> = BTreeMap::new();
        for r in rows {
            let key = format!(
                "{}/{}/{}",
                r.get::<String, _>("customer"),
                r.get::<String, _>("app"),
                r.get::<String, _>("meter")
            );
            *out.entry(key).or_default() += dec(r.get("quantity_sum"))?;
        }
        Ok(out)
    }
}

impl UsageWriter for SqliteStore {
    async fn migrate(&self) -> anyhow::Result<()> {
        self.apply_migrations().await
    }

    async fn load_partition(
        &self,
        partition: u32,
        window_start: DateTime<Utc>,
    ) -> anyhow::Result<PartitionState> {
        self.partition_state(partition, window_start).await
    }

    async fn write_raw(&self, rows: Vec<RawRow>) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        insert_raw(&mut tx, &rows).await?;
        tx.commit().await.context("committing raw usage")?;
        Ok(())
    }

    async fn load_rollups(
        &self,
        pairs: Vec<(String, i64)>,
    ) -> anyhow::Result<Vec<(RollupKey, RollupValue)>> {
        let mut out = Vec::new();
        for (customer, hour) in pairs {
            let rows =
                sqlx::query("SELECT * FROM usage_rollups_hourly WHERE customer = ? AND hour = ?")
                    .bind(&customer)
                    .bind(hour)
                    .fetch_all(&self.pool)
                    .await?;
            for r in &rows {
                out.push(rollup_row(r)?);
            }
        }
        Ok(out)
    }

    async fn write_rollups(&self, rows: Vec<(RollupKey, RollupValue)>) -> anyhow::Result<()> {
        self.write_rollups_tx(rows).await
    }

    fn atomic_batches(&self) -> bool {
        true
    }

    /// Raw rows and rollups in one transaction: one fsync per batch, and
    /// no batch is ever stored without its rollups.
    async fn write_batch(
        &self,
        rows: Vec<RawRow>,
        rollups: Vec<(RollupKey, RollupValue)>,
    ) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        insert_raw(&mut tx, &rows).await?;
        insert_rollups(&mut tx, &rollups).await?;
        tx.commit().await.context("committing usage")?;
        Ok(())
    }
}

impl UsageStore for SqliteStore {
    async fn query(&self, meter: &MeterDef, q: &UsageQuery) -> anyhow::Result<Vec<UsageRow>> {
        let cells = self.cells(&[meter], q, Scope::One(&q.customer)).await?;
        Ok(group_cells(meter, q, cells.into_iter().map(|(_, _, c)| c)))
    }

    async fn query_all(
        &self,
        questions: &[(MeterDef, UsageQuery)],
        customers: Option<(&str, &str)>,
    ) -> anyhow::Result<Vec<PerCustomer>> {
        let Some((_, first)) = questions.first() else {
            return Ok(vec![]);
        };
        let meters = super::meters_of(questions)?;
        let cells = self.cells(&meters, first, Scope::All(customers)).await?;
        Ok(super::answer_all(questions, cells))
    }

    async fn query_some(
        &self,
        questions: &[(MeterDef, UsageQuery)],
        ids: &[String],
    ) -> anyhow::Result<Vec<PerCustomer>> {
        let Some((_, first)) = questions.first() else {
            return Ok(vec![]);
        };
        let meters = super::meters_of(questions)?;
        let list = serde_json::to_string(ids)?;
        let cells = self.cells(&meters, first, Scope::List(&list)).await?;
        Ok(super::answer_all(questions, cells))
    }

    async fn versions(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        ids: Option<&[String]>,
    ) -> anyhow::Result<HashMap<String, u64>> {
        let list = ids.map(serde_json::to_string).transpose()?;
        let scope = match &list {
            Some(l) => Scope::List(l),
            None => Scope::All(None),
        };
        let sql = format!(
            "SELECT customer, max(version) AS v FROM usage_rollups_hourly \
             WHERE {} AND hour >= ?2 AND hour < ?3 GROUP BY customer",
            scope.sql()
        );
        let rows = sqlx::query(&sql)
            .bind(scope.bounds().0)
            .bind(from.timestamp())
            .bind(to.timestamp())
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<String, _>("customer"), r.get::<i64, _>("v") as u64))
            .collect())
    }
}

/// The embedded mode's dead-letter "topic": a table in the same file.
impl DeadLetterSink for SqliteStore {
    async fn send(&self, letters: Vec<DeadLetter>) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        let at = Utc::now().timestamp();
        for l in &letters {
            sqlx::query(
                "INSERT INTO dead_letters (at, code, reason, kafka_partition, kafka_offset, key, payload) \
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(at)
            .bind(&l.code)
            .bind(&l.reason)
            .bind(l.message.partition)
            .bind(l.message.offset)
            .bind(&l.message.key)
            .bind(&l.message.payload)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
