//! The ClickHouse usage store (distributed mode).
//!
//! Exactly-once, in the order the aggregator performs it for each batch:
//!
//! 1. raw rows are inserted in one INSERT: every row carries the batch's
//!    `ingested_at`, so the batch is one part of one partition, written
//!    atomically; each row carries its Kafka partition and offset, so "this
//!    message is stored" and "the offset is stored" are one fact;
//! 2. the cumulative hourly rollups of the keys the batch touched are
//!    inserted with `version` = the batch's highest offset in that Kafka
//!    partition + 1 (`rollup::rollup_version`; idempotent: rewriting a
//!    version changes nothing);
//! 3. the aggregator commits the offsets to Kafka (an optimisation only).
//!
//! On assignment, [`UsageWriter::load_partition`] reads the highest stored
//! offset (messages at or below it are skipped, wherever Kafka's committed
//! offset is) and, if the highest rollup version is lower (a crash between
//! 1 and 2), recomputes those keys' rollups from raw rows. A crash anywhere
//! therefore neither loses nor double-counts a row.
//!
//! The SQL stays within what ClickHouse 18.16 accepts.

use super::{
    group_cells, split_hours, time_range_sql, Cell, Partial, PartitionState, RawRow, UsageQuery,
    UsageRow, UsageStore, UsageWriter,
};
use crate::rollup::rollup_version;
use crate::rollup::{RollupKey, RollupValue};
use anyhow::Context;
use chrono::{DateTime, TimeZone, Utc};
use clickhouse::{Client, Compression, Row};
use rust_decimal::Decimal;
use schemas::{Aggregation, MeterDef};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Scale of `Decimal(38, 12)` columns.
const SCALE: u32 = 12;

/// A quantity as the i128 mantissa of `Decimal(38, 12)`.
pub fn to_ch(d: Decimal) -> i128 {
    let d = if d.scale() > SCALE {
        d.round_dp(SCALE)
    } else {
        d
    };
    d.mantissa() * 10i128.pow(SCALE - d.scale())
}

/// Back from `Decimal(38, 12)`, dropping trailing zeros first so that large
/// integral sums still fit `rust_decimal`'s 96-bit mantissa.
pub fn from_ch(mut v: i128) -> anyhow::Result<Decimal> {
    let mut scale = SCALE;
    while scale > 0 && v % 10 == 0 {
        v /= 10;
        scale -= 1;
    }
    Decimal::try_from_i128_with_scale(v, scale)
        .map_err(|e| anyhow::anyhow!("stored quantity out of range: {e}"))
}

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            _ => out.push(c),
        }
    }
    out.push('\'');
    out
}

fn ts(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0).single().unwrap_or_default()
}

#[derive(Debug, Row, Serialize)]
struct RawCh {
    customer: String,
    meter: String,
    time: u32,
    time_us: u32,
    app: String,
    dims: String,
    quantity: i128,
    unique_value: String,
    source: String,
    id: String,
    event_type: String,
    kafka_partition: u32,
    kafka_offset: u64,
    ingested_at: u32,
}

#[derive(Debug, Row, Serialize, Deserialize)]
struct RollupCh {
    customer: String,
    meter: String,
    hour: u32,
    app: String,
    dims: String,
    events: u64,
    quantity_sum: i128,
    quantity_max: i128,
    latest_time: u32,
    latest_quantity: i128,
    kafka_partition: u32,
    version: u64,
}

#[derive(Debug, Row, Deserialize)]
struct CellCh {
    customer: String,
    meter: String,
    bucket: u32,
    app: String,
    dims: String,
    events: u64,
    sum: i128,
    max: i128,
    latest_time: u32,
    latest_quantity: i128,
    uniques: Vec<String>,
}

#[derive(Debug, Row, Deserialize)]
struct MaxCount {
    max: u64,
    count: u64,
}

#[derive(Debug, Row, Deserialize)]
struct SourceId {
    source: String,
    id: String,
    time: u32,
}

/// Columns of a rollup row, computed from raw rows (used by repair).
const ROLLUP_FROM_RAW: &str =
    "customer, meter, toStartOfHour(time) AS hour, app, dims, count() AS events, \
     sum(quantity), max(quantity), max(time), argMax(quantity, tuple(time, quantity))";

#[derive(Clone)]
pub struct ClickHouseStore {
    client: Client,
    url: String,
    database: String,
    pub metrics: Option<crate::metrics::Metrics>,
}

impl ClickHouseStore {
    pub fn new(url: &str, database: &str) -> Self {
        let client = Client::default()
            .with_url(url)
            .with_database(database)
            // ClickHouse 18.16 has no RowBinaryWithNamesAndTypes.
            .with_validation(false)
            .with_compression(Compression::None);
        Self {
            client,
            url: url.to_owned(),
            database: database.to_owned(),
            metrics: None,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn observe(&self, table: &str, start: Instant) {
        if let Some(m) = &self.metrics {
            m.insert_duration
                .with_label_values(&[table])
                .observe(start.elapsed().as_secs_f64());
        }
    }

    async fn exec(&self, sql: &str) -> anyhow::Result<()> {
        self.client
            .query(sql)
            .execute()
            .await
            .with_context(|| format!("clickhouse: {sql}"))
    }

    /// Creates the database if missing (uses a client without database).
    pub async fn create_database(&self) -> anyhow::Result<()> {
        let c = Client::default()
            .with_url(&self.url)
            .with_validation(false)
            .with_compression(Compression::None);
        c.query(&format!(
            "CREATE DATABASE IF NOT EXISTS `{}`",
            self.database.replace('`', "")
        ))
        .execute()
        .await
        .context("creating clickhouse database")
    }

    pub async fn apply_migrations(&self) -> anyhow::Result<()> {
        self.create_database().await?;
        self.exec(schemas::migrations::CLICKHOUSE_MIGRATIONS_TABLE)
            .await?;
        let applied: Vec<u32> = self
            .client
            .query("SELECT version FROM schema_migrations")
            .fetch_all()
            .await?;
        for m in schemas::migrations::CLICKHOUSE {
            if applied.contains(&m.version) {
                continue;
            }
            if let Err(e) = self.exec(m.sql).await {
                if !schemas::migrations::clickhouse_already_applied(m, &format!("{e:#}")) {
                    return Err(e);
                }
            }
            self.exec(&format!(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ({}, {}, now())",
                m.version,
                quote(m.name)
            ))
            .await?;
            tracing::info!(
                version = m.version,
                name = m.name,
                "applied clickhouse migration"
            );
        }
        Ok(())
    }

    async fn partition_state(
        &self,
        partition: u32,
        window_start: DateTime<Utc>,
    ) -> anyhow::Result<PartitionState> {
        let raw: MaxCount = self
            .client
            .query("SELECT max(kafka_offset), count() FROM usage_events WHERE kafka_partition = ?")
            .bind(partition)
            .fetch_one()
            .await?;
        let mut st = PartitionState {
            max_offset: (raw.count > 0).then_some(raw.max),
            ..Default::default()
        };
        if raw.count > 0 {
            let roll: MaxCount = self
                .client
                .query("SELECT max(version), count() FROM usage_rollups_hourly WHERE kafka_partition = ?")
                .bind(partition)
                .fetch_one()
                .await?;
            let roll_max = (roll.count > 0).then_some(roll.max);
            if let Some(from) = super::repair_from(st.max_offset, roll_max) {
                let after = format!(" AND kafka_offset >= {from}");
                let touched = format!(
                    "SELECT customer, meter, toStartOfHour(time), app, dims FROM usage_events WHERE kafka_partition = {partition}{after}"
                );
                let n: u64 = self
                    .client
                    .query(&format!(
                        "SELECT count() FROM (SELECT DISTINCT * FROM ({touched}))"
                    ))
                    .fetch_one()
                    .await?;
                self.exec(&format!(
                    "INSERT INTO usage_rollups_hourly SELECT {ROLLUP_FROM_RAW}, {partition} AS kafka_partition, {max} AS version \
                     FROM usage_events WHERE (customer, meter, toStartOfHour(time), app, dims) IN ({touched}) \
                     GROUP BY customer, meter, hour, app, dims",
                    max = rollup_version(raw.max)
                ))
                .await?;
                st.repaired_keys = n as usize;
                tracing::warn!(
                    partition,
                    keys = n,
                    "repaired rollups after an interrupted batch"
                );
            }
        }
        // The partition's own keys, and those of imported rows, even while
        // the partition is still empty.
        let [own, imported] = super::dedup_partitions(partition);
        let seen: Vec<SourceId> = self
            .client
            .query("SELECT source, id, toUInt32(min(time)) FROM usage_events WHERE kafka_partition IN (?, ?) AND time >= toDateTime(?) GROUP BY source, id")
            .bind(own)
            .bind(imported)
            .bind(window_start.timestamp() as u32)
            .fetch_all()
            .await?;
        st.seen = seen
            .into_iter()
            .map(|s| (s.source, s.id, s.time as i64))
            .collect();
        Ok(st)
    }

    fn bucket_sql(col: &str, q: &UsageQuery) -> String {
        match q.granularity {
            None => "toUInt32(0)".into(),
            Some(super::Granularity::Hour) => {
                format!("toUInt32(intDiv(toUInt32({col}), 3600) * 3600)")
            }
            // Months are bucketed from days in Rust (group_cells).
            Some(_) => format!("toUInt32(intDiv(toUInt32({col}), 86400) * 86400)"),
        }
    }

    /// Cells of `meters` over `q`'s range, each with its customer and
    /// meter: of one customer ([`Scope::One`]) or of every customer in an
    /// optional id range ([`Scope::All`]). Whole hours come from the
    /// rollups, the partial hours at the edges (and unique counts) from raw
    /// rows. The one-customer path takes the newest version per key with
    /// `argMax`; the every-customer path (billing's finalization run,
    /// millions of keys) with `FINAL`, which merges in key order instead of
    /// holding every key in a hash table. Both pick the highest version.
    async fn cells(
        &self,
        meters: &[&MeterDef],
        q: &UsageQuery,
        scope: Scope<'_>,
    ) -> anyhow::Result<Vec<(String, String, Cell)>> {
        let mut cells = Vec::new();
        let (uniques, rolled): (Vec<&MeterDef>, Vec<&MeterDef>) = meters
            .iter()
            .partition(|m| m.aggregation == Aggregation::UniqueCount || q.raw);
        let who = match scope {
            Scope::One(c) => format!("customer = {}", quote(c)),
            Scope::All(None) => "1".into(),
            Scope::All(Some((lo, hi))) => {
                format!("customer >= {} AND customer <= {}", quote(lo), quote(hi))
            }
            Scope::List(ids) => {
                let list: Vec<String> = ids.iter().map(|c| quote(c)).collect();
                format!("customer IN ({})", list.join(", "))
            }
        };
        let meter_in = |ms: &[&MeterDef]| {
            let list: Vec<String> = ms.iter().map(|m| quote(&m.key)).collect();
            format!("meter IN ({})", list.join(", "))
        };
        let raw_sql = |ms: &[&MeterDef], from: DateTime<Utc>, to: DateTime<Utc>, distinct: bool| {
            let uniques = if distinct {
                "groupUniqArray(unique_value)"
            } else {
                "emptyArrayString()"
            };
            format!(
                "SELECT customer, meter, {b} AS bucket, app, dims, count(), sum(quantity), max(quantity), toUInt32(max(time)), \
                 argMax(quantity, tuple(time, quantity)), {uniques} FROM usage_events \
                 WHERE {who} AND {m} AND {range} GROUP BY customer, meter, bucket, app, dims",
                b = Self::bucket_sql("time", q),
                m = meter_in(ms),
                range = time_range_sql(from, to),
            )
        };
        let mut sqls = Vec::new();
        for m in &uniques {
            // Distinct counts do not roll up: answer from raw rows.
            let distinct = m.aggregation == Aggregation::UniqueCount;
            sqls.push(raw_sql(&[m], q.from, q.to, distinct));
        }
        if !rolled.is_empty() {
            let (full, edges) = split_hours(q.from, q.to);
            if let Some((f, t)) = full {
                let b = Self::bucket_sql("hour", q);
                let filter = format!("{who} AND {}", meter_in(&rolled));
                // Sums and counts need neither the maximum nor the latest value.
                let extremes = if rolled
                    .iter()
                    .all(|m| matches!(m.aggregation, Aggregation::Sum | Aggregation::Count))
                {
                    "toDecimal128(0, 12), toUInt32(0), toDecimal128(0, 12)"
                } else {
                    "max(quantity_max), toUInt32(max(latest_time)), argMax(latest_quantity, tuple(latest_time, latest_quantity))"
                };
                sqls.push(match scope {
                    Scope::All(_) | Scope::List(_) => format!(
                        "SELECT customer, meter, {b} AS bucket, app, dims, sum(events), sum(quantity_sum), {extremes}, emptyArrayString() \
                         FROM usage_rollups_hourly FINAL WHERE {filter} AND hour >= toDateTime({f}) AND hour < toDateTime({t}) \
                         GROUP BY customer, meter, bucket, app, dims"
                    ),
                    Scope::One(_) => format!(
                        "SELECT customer, meter, {b} AS bucket, app, dims, sum(ev), sum(s), max(m), toUInt32(max(lt)), argMax(lq, tuple(lt, lq)), emptyArrayString() FROM (\
                           SELECT customer, meter, hour, app, dims, argMax(events, version) AS ev, argMax(quantity_sum, version) AS s, \
                                  argMax(quantity_max, version) AS m, argMax(latest_time, version) AS lt, argMax(latest_quantity, version) AS lq \
                           FROM usage_rollups_hourly WHERE {filter} AND hour >= toDateTime({f}) AND hour < toDateTime({t}) \
                           GROUP BY customer, meter, hour, app, dims) GROUP BY customer, meter, bucket, app, dims"
                    ),
                });
            }
            for (f, t) in edges {
                sqls.push(raw_sql(&rolled, f, t, false));
            }
        }
        for sql in sqls {
            let rows: Vec<CellCh> = self
                .client
                .query(&sql)
                .fetch_all()
                .await
                .with_context(|| format!("clickhouse: {sql}"))?;
            for r in rows {
                let latest_q = from_ch(r.latest_quantity)?;
                cells.push((
                    r.customer,
                    r.meter,
                    Cell {
                        time: ts(r.bucket as i64),
                        app: r.app,
                        dims: r.dims,
                        partial: Partial {
                            events: r.events,
                            sum: from_ch(r.sum)?,
                            max: from_ch(r.max)?,
                            latest: (r.events > 0).then_some((r.latest_time as i64, latest_q)),
                            uniques: r.uniques.into_iter().collect(),
                        },
                    },
                ));
            }
        }
        Ok(cells)
    }

    /// Totals per `customer/app/meter` over everything stored, from the
    /// rollups; used by tests and `aggregator totals` to compare with a
    /// ground truth.
    pub async fn totals(&self) -> anyhow::Result<std::collections::BTreeMap<String, Decimal>> {
        self.totals_from(
            "SELECT customer, app, meter, sum(s) FROM (SELECT customer, meter, hour, app, dims, argMax(quantity_sum, version) AS s \
             FROM usage_rollups_hourly GROUP BY customer, meter, hour, app, dims) GROUP BY customer, app, meter",
        )
        .await
    }

    /// The same totals computed from raw rows (must always equal
    /// [`Self::totals`]).
    pub async fn raw_totals(&self) -> anyhow::Result<std::collections::BTreeMap<String, Decimal>> {
        self.totals_from("SELECT customer, app, meter, sum(quantity) FROM usage_events GROUP BY customer, app, meter").await
    }

    async fn totals_from(
        &self,
        sql: &str,
    ) -> anyhow::Result<std::collections::BTreeMap<String, Decimal>> {
        #[derive(Row, Deserialize)]
        struct T {
            customer: String,
            app: String,
            meter: String,
            sum: i128,
        }
        let rows: Vec<T> = self.client.query(sql).fetch_all().await?;
        rows.into_iter()
            .map(|r| {
                Ok((
                    format!("{}/{}/{}", r.customer, r.app, r.meter),
                    from_ch(r.sum)?,
                ))
            })
            .collect()
    }
}

impl UsageWriter for ClickHouseStore {
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
        let start = Instant::now();
        let ingested_at = Utc::now().timestamp() as u32;
        let mut ins = self.client.insert::<RawCh>("usage_events").await?;
        for r in rows {
            ins.write(&RawCh {
                customer: r.customer,
                meter: r.meter,
                time: r.time.timestamp() as u32,
                time_us: r.time.timestamp_subsec_micros(),
                app: r.app,
                dims: r.dims,
                quantity: to_ch(r.quantity),
                unique_value: r.unique_value,
                source: r.source,
                id: r.id,
                event_type: r.event_type,
                kafka_partition: r.partition,
                kafka_offset: r.offset,
                ingested_at,
            })
            .await?;
        }
        ins.end().await.context("inserting raw usage")?;
        self.observe("usage_events", start);
        Ok(())
    }

    async fn load_rollups(
        &self,
        pairs: Vec<(String, i64)>,
    ) -> anyhow::Result<Vec<(RollupKey, RollupValue)>> {
        if pairs.is_empty() {
            return Ok(vec![]);
        }
        let list: Vec<String> = pairs
            .iter()
            .map(|(c, h)| format!("({}, {h})", quote(c)))
            .collect();
        let sql = format!(
            "SELECT customer, meter, toUInt32(hour), app, dims, argMax(events, version), argMax(quantity_sum, version), \
             argMax(quantity_max, version), toUInt32(argMax(latest_time, version)), argMax(latest_quantity, version), \
             any(kafka_partition), max(version) FROM usage_rollups_hourly WHERE (customer, toUInt32(hour)) IN ({}) \
             GROUP BY customer, meter, hour, app, dims",
            list.join(", ")
        );
        let rows: Vec<RollupCh> = self
            .client
            .query(&sql)
            .fetch_all()
            .await
            .context("loading rollups")?;
        rows.into_iter()
            .map(|r| {
                Ok((
                    RollupKey {
                        customer: r.customer,
                        meter: r.meter,
                        hour: r.hour as i64,
                        app: r.app,
                        dims: r.dims,
                    },
                    RollupValue {
                        events: r.events,
                        sum: from_ch(r.quantity_sum)?,
                        max: from_ch(r.quantity_max)?,
                        latest: (r.latest_time as i64, from_ch(r.latest_quantity)?),
                        partition: r.kafka_partition,
                        version: r.version,
                    },
                ))
            })
            .collect()
    }

    async fn write_rollups(&self, rows: Vec<(RollupKey, RollupValue)>) -> anyhow::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let start = Instant::now();
        let mut ins = self
            .client
            .insert::<RollupCh>("usage_rollups_hourly")
            .await?;
        for (k, v) in rows {
            ins.write(&RollupCh {
                customer: k.customer,
                meter: k.meter,
                hour: k.hour as u32,
                app: k.app,
                dims: k.dims,
                events: v.events,
                quantity_sum: to_ch(v.sum),
                quantity_max: to_ch(v.max),
                latest_time: v.latest.0 as u32,
                latest_quantity: to_ch(v.latest.1),
                kafka_partition: v.partition,
                version: v.version,
            })
            .await?;
        }
        ins.end().await.context("inserting rollups")?;
        self.observe("usage_rollups_hourly", start);
        Ok(())
    }
}

impl UsageStore for ClickHouseStore {
    async fn query(&self, meter: &MeterDef, q: &UsageQuery) -> anyhow::Result<Vec<UsageRow>> {
        let cells = self.cells(&[meter], q, Scope::One(&q.customer)).await?;
        Ok(group_cells(meter, q, cells.into_iter().map(|(_, _, c)| c)))
    }

    async fn query_all(
        &self,
        questions: &[(MeterDef, UsageQuery)],
        customers: Option<(&str, &str)>,
    ) -> anyhow::Result<Vec<super::PerCustomer>> {
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
    ) -> anyhow::Result<Vec<super::PerCustomer>> {
        let Some((_, first)) = questions.first() else {
            return Ok(vec![]);
        };
        if ids.is_empty() {
            return Ok(vec![Default::default(); questions.len()]);
        }
        let meters = super::meters_of(questions)?;
        let cells = self.cells(&meters, first, Scope::List(ids)).await?;
        Ok(super::answer_all(questions, cells))
    }

    async fn versions(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        ids: Option<&[String]>,
    ) -> anyhow::Result<std::collections::HashMap<String, u64>> {
        #[derive(Row, Deserialize)]
        struct V {
            customer: String,
            v: u64,
        }
        let who = match ids {
            Some([]) => return Ok(Default::default()),
            Some(ids) => {
                let list: Vec<String> = ids.iter().map(|c| quote(c)).collect();
                format!("customer IN ({})", list.join(", "))
            }
            None => "1".into(),
        };
        // Every version row counts, merged or not: the highest is the
        // latest write of the customer's cells either way.
        let sql = format!(
            "SELECT customer, max(version) AS v FROM usage_rollups_hourly \
             WHERE {who} AND hour >= toDateTime({}, 'UTC') AND hour < toDateTime({}, 'UTC') GROUP BY customer",
            from.timestamp(),
            to.timestamp()
        );
        let rows: Vec<V> = self.client.query(&sql).fetch_all().await?;
        Ok(rows.into_iter().map(|r| (r.customer, r.v)).collect())
    }
}

/// Whose cells to read.
#[derive(Clone, Copy)]
enum Scope<'a> {
    One(&'a str),
    /// Every customer, or those with ids in the inclusive range.
    All(Option<(&'a str, &'a str)>),
    /// The customers listed.
    List(&'a [String]),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_roundtrip() {
        for s in [
            "0",
            "1",
            "0.000000000001",
            "123456789.5",
            "9999999999999999.999999999999",
            "100000000000000000000",
        ] {
            let d: Decimal = s.parse().unwrap();
            assert_eq!(from_ch(to_ch(d)).unwrap(), d, "{s}");
        }
        assert_eq!(quote("a'b\\c"), "'a\\'b\\\\c'");
    }
}
