//! Moving from the embedded mode to the distributed one: `tally export`
//! writes a data directory's state and usage to a dump directory, and
//! `tally import` loads a dump into an empty PostgreSQL database and an
//! empty ClickHouse database, from which `billing-api` and the aggregator
//! carry on.
//!
//! Dump layout (JSON lines, one file per table):
//!
//! - `manifest.json`: format version, export time, row counts;
//! - `state/<table>.jsonl`: every row of every billing table, with SQLite's
//!   values as they are (the SQLite and PostgreSQL tables have the same
//!   names and columns); the import converts each value to its PostgreSQL
//!   column's type (microsecond timestamps to `timestamptz`, decimal text
//!   to `numeric`, JSON text to `jsonb`, 0/1 to `boolean`);
//! - `usage/usage_events.jsonl`, `usage/usage_rollups_hourly.jsonl`: raw
//!   usage rows and hourly rollups.
//!
//! Usage rows land in ClickHouse under [`IMPORTED_PARTITION`] and rollups
//! with version 0, so live Kafka partitions neither resume from nor are
//! outranked by them, while their event ids still deduplicate re-sent
//! events. The state import is one PostgreSQL transaction (all or
//! nothing); identity sequences continue after the imported ids.
//!
//! Procedure: stop `tally serve`, export, import, start the distributed
//! services on the imported databases, point collectors at the collector.

use aggregator::rollup::{RollupKey, RollupValue};
use aggregator::store::clickhouse::ClickHouseStore;
use aggregator::store::{RawRow, IMPORTED_PARTITION};
use aggregator::UsageWriter;
use anyhow::Context;
use billing_api::state::postgres::PgState;
use billing_api::state::StateStore;
use chrono::{TimeZone, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sqlx::{Column, Row, TypeInfo, ValueRef};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;

pub const FORMAT: u32 = 1;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub exported_at: chrono::DateTime<Utc>,
    /// Rows per file, e.g. `state/customers` or `usage/usage_events`.
    pub rows: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct UsageLine {
    customer: String,
    meter: String,
    time: i64,
    /// Microseconds within `time` (0 in dumps written before they were kept).
    #[serde(default)]
    time_us: u32,
    app: String,
    dims: String,
    quantity: Decimal,
    unique_value: String,
    source: String,
    id: String,
    event_type: String,
    offset: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct RollupLine {
    customer: String,
    meter: String,
    hour: i64,
    app: String,
    dims: String,
    events: u64,
    sum: Decimal,
    max: Decimal,
    latest_time: i64,
    latest_quantity: Decimal,
}

/// A dump holds keys' hashes, customers and invoices: its directories are
/// created 0700 and its files 0600, like the data directory.
fn writer(path: &Path) -> anyhow::Result<BufWriter<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(d) = path.parent() {
        crate::secrets::private_dir(d)?;
    }
    Ok(BufWriter::new(
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?,
    ))
}

fn finish(mut w: BufWriter<std::fs::File>) -> anyhow::Result<()> {
    w.flush()?;
    w.into_inner()?.sync_all()?;
    Ok(())
}

/// Writes the dump of the data directory `data` into `out` (which must not
/// exist yet). Run it with `tally serve` stopped.
pub async fn export(data: &Path, out: &Path) -> anyhow::Result<Manifest> {
    anyhow::ensure!(
        !out.exists(),
        "--out {}: already exists; export into a new directory",
        out.display()
    );
    for f in ["usage.db", "state.db"] {
        anyhow::ensure!(
            data.join(f).exists(),
            "--data-dir {}: no {f} here",
            data.display()
        );
    }
    let (usage, state) = crate::server::open_stores(data).await?;
    let mut rows = BTreeMap::new();

    // State: every table as it is.
    let pool = state.pool();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
         AND name <> 'schema_migrations' ORDER BY name",
    )
    .fetch_all(pool)
    .await?;
    for t in &tables {
        let mut w = writer(&out.join("state").join(format!("{t}.jsonl")))?;
        let mut n = 0u64;
        for r in sqlx::query(&format!("SELECT * FROM \"{t}\""))
            .fetch_all(pool)
            .await?
        {
            let mut obj = Map::new();
            for (i, c) in r.columns().iter().enumerate() {
                let raw = r.try_get_raw(i)?;
                let v = if raw.is_null() {
                    Value::Null
                } else {
                    match raw.type_info().name() {
                        "INTEGER" => Value::from(r.try_get::<i64, _>(i)?),
                        "REAL" => anyhow::bail!(
                            "{t}.{}: a floating-point value in the billing state",
                            c.name()
                        ),
                        "BLOB" => Value::from(hex::encode(r.try_get::<Vec<u8>, _>(i)?)),
                        _ => Value::from(r.try_get::<String, _>(i)?),
                    }
                };
                obj.insert(c.name().to_owned(), v);
            }
            serde_json::to_writer(&mut w, &obj)?;
            w.write_all(b"\n")?;
            n += 1;
        }
        finish(w)?;
        rows.insert(format!("state/{t}"), n);
    }

    // Usage: raw rows page by page, then rollups.
    let mut w = writer(&out.join("usage/usage_events.jsonl"))?;
    let (mut after, mut n) = (0i64, 0u64);
    loop {
        let page = usage.raw_page(after, 10_000).await?;
        let Some((last, _)) = page.last() else { break };
        after = *last;
        for (_, r) in page {
            serde_json::to_writer(
                &mut w,
                &UsageLine {
                    customer: r.customer,
                    meter: r.meter,
                    time: r.time.timestamp(),
                    time_us: r.time.timestamp_subsec_micros(),
                    app: r.app,
                    dims: r.dims,
                    quantity: r.quantity,
                    unique_value: r.unique_value,
                    source: r.source,
                    id: r.id,
                    event_type: r.event_type,
                    offset: r.offset,
                },
            )?;
            w.write_all(b"\n")?;
            n += 1;
        }
    }
    finish(w)?;
    rows.insert("usage/usage_events".into(), n);
    let mut w = writer(&out.join("usage/usage_rollups_hourly.jsonl"))?;
    let rollups = usage.all_rollups().await?;
    for (k, v) in &rollups {
        serde_json::to_writer(
            &mut w,
            &RollupLine {
                customer: k.customer.clone(),
                meter: k.meter.clone(),
                hour: k.hour,
                app: k.app.clone(),
                dims: k.dims.clone(),
                events: v.events,
                sum: v.sum,
                max: v.max,
                latest_time: v.latest.0,
                latest_quantity: v.latest.1,
            },
        )?;
        w.write_all(b"\n")?;
    }
    finish(w)?;
    rows.insert("usage/usage_rollups_hourly".into(), rollups.len() as u64);

    let manifest = Manifest {
        format: FORMAT,
        exported_at: Utc::now(),
        rows,
    };
    let mut w = writer(&out.join("manifest.json"))?;
    w.write_all(&serde_json::to_vec_pretty(&manifest)?)?;
    finish(w)?;
    Ok(manifest)
}

fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<Vec<T>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::BufReader::new(f)
        .lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(&l?).with_context(|| format!("{} line {}", path.display(), i + 1))
        })
        .collect()
}

/// Converts a SQLite value to what `jsonb_populate_recordset` reads as the
/// PostgreSQL column type `udt`.
fn to_pg(v: Value, udt: &str, what: &str) -> anyhow::Result<Value> {
    Ok(match (udt, v) {
        (_, Value::Null) => Value::Null,
        ("timestamptz", Value::Number(n)) => {
            let us = n.as_i64().with_context(|| format!("{what}: {n}"))?;
            let t = Utc
                .timestamp_micros(us)
                .single()
                .with_context(|| format!("{what}: {us} is not a time"))?;
            Value::from(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        }
        ("bool", Value::Number(n)) => Value::from(n.as_i64() != Some(0)),
        ("jsonb" | "json", Value::String(s)) => {
            serde_json::from_str(&s).with_context(|| format!("{what}: stored JSON"))?
        }
        (_, v) => v,
    })
}

/// Tables in an order where every table comes after those it references.
async fn table_order(pg: &sqlx::PgPool, tables: &BTreeSet<String>) -> anyhow::Result<Vec<String>> {
    let refs: Vec<(String, String)> = sqlx::query_as(
        "SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint WHERE contype = 'f'",
    )
    .fetch_all(pg)
    .await?;
    let mut order = Vec::new();
    let mut left: BTreeSet<String> = tables.clone();
    while !left.is_empty() {
        let ready: Vec<String> = left
            .iter()
            .filter(|t| {
                refs.iter()
                    .all(|(from, to)| from != *t || to == *t || !left.contains(to))
            })
            .cloned()
            .collect();
        anyhow::ensure!(!ready.is_empty(), "circular references among {left:?}");
        for t in ready {
            left.remove(&t);
            order.push(t);
        }
    }
    Ok(order)
}

/// Tables the PostgreSQL migrations seed with a row (counters): replaced
/// by the dump's row.
const SEEDED: &[&str] = &["invoice_numbers"];

/// Loads the dump in `from` into an empty PostgreSQL database and an empty
/// ClickHouse database (both migrated here). Refuses non-empty targets.
pub async fn import(
    from: &Path,
    database_url: &str,
    clickhouse_url: &str,
    clickhouse_database: &str,
) -> anyhow::Result<Manifest> {
    let manifest: Manifest = serde_json::from_slice(
        &std::fs::read(from.join("manifest.json"))
            .with_context(|| format!("--from {}: no manifest.json", from.display()))?,
    )?;
    anyhow::ensure!(
        manifest.format == FORMAT,
        "--from: dump format {} (this tally reads {FORMAT})",
        manifest.format
    );
    let mut tables = BTreeSet::new();
    for key in manifest.rows.keys() {
        if let Some(t) = key.strip_prefix("state/") {
            tables.insert(t.to_owned());
        }
    }

    let pg = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(database_url)
        .await
        .context("--database-url")?;
    PgState::from_pool(pg.clone()).migrate().await?;
    let usage = ClickHouseStore::new(clickhouse_url, clickhouse_database);
    usage.migrate().await?;

    // Targets must be empty.
    for t in &tables {
        if SEEDED.contains(&t.as_str()) {
            continue;
        }
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{t}\""))
            .fetch_one(&pg)
            .await
            .with_context(|| format!("table {t} in PostgreSQL"))?;
        anyhow::ensure!(
            n == 0,
            "--database-url: table {t} already holds {n} row(s); import into a new database"
        );
    }
    let existing: u64 = usage
        .client()
        .query("SELECT count() FROM usage_events")
        .fetch_one()
        .await?;
    anyhow::ensure!(
        existing == 0,
        "--clickhouse-database {clickhouse_database}: usage_events already holds {existing} row(s); import into a new database"
    );

    // State: one transaction.
    let mut tx = pg.begin().await?;
    for t in table_order(&pg, &tables).await? {
        let cols: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT column_name::text, udt_name::text, column_default::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1",
        )
        .bind(&t)
        .fetch_all(&mut *tx)
        .await?;
        let types: BTreeMap<&str, &str> = cols
            .iter()
            .map(|(c, u, _)| (c.as_str(), u.as_str()))
            .collect();
        let mut rows = Vec::new();
        for obj in read_lines::<Map<String, Value>>(&from.join("state").join(format!("{t}.jsonl")))?
        {
            let mut out = Map::new();
            for (c, v) in obj {
                let udt = types
                    .get(c.as_str())
                    .with_context(|| format!("{t}.{c}: no such column in PostgreSQL"))?;
                out.insert(c.clone(), to_pg(v, udt, &format!("{t}.{c}"))?);
            }
            rows.push(Value::Object(out));
        }
        if SEEDED.contains(&t.as_str()) {
            sqlx::query(&format!("DELETE FROM \"{t}\""))
                .execute(&mut *tx)
                .await?;
        }
        let n = rows.len();
        for chunk in rows.chunks(5_000) {
            let names: Vec<String> = chunk[0]
                .as_object()
                .unwrap()
                .keys()
                .map(|c| format!("\"{c}\""))
                .collect();
            let names = names.join(", ");
            sqlx::query(&format!(
                "INSERT INTO \"{t}\" ({names}) SELECT {names} FROM jsonb_populate_recordset(NULL::\"{t}\", $1)"
            ))
            .bind(Value::Array(chunk.to_vec()))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("importing {t}"))?;
        }
        // Identity columns continue after the imported ids.
        for (c, _, default) in &cols {
            if default
                .as_deref()
                .is_some_and(|d| d.starts_with("nextval("))
                && n > 0
            {
                sqlx::query(&format!(
                    "SELECT setval(pg_get_serial_sequence('\"{t}\"', '{c}'), (SELECT max(\"{c}\") FROM \"{t}\"))"
                ))
                .execute(&mut *tx)
                .await?;
            }
        }
        tracing::info!(table = %t, rows = n, "state imported");
    }
    tx.commit().await?;

    // Usage: raw rows in pages, then rollups.
    let raw: Vec<UsageLine> = read_lines(&from.join("usage/usage_events.jsonl"))?;
    for chunk in raw.chunks(50_000) {
        let rows = chunk
            .iter()
            .map(|l| RawRow {
                customer: l.customer.clone(),
                meter: l.meter.clone(),
                time: aggregator::store::from_stored_time(l.time, l.time_us),
                app: l.app.clone(),
                dims: l.dims.clone(),
                quantity: l.quantity,
                unique_value: l.unique_value.clone(),
                source: l.source.clone(),
                id: l.id.clone(),
                event_type: l.event_type.clone(),
                partition: IMPORTED_PARTITION,
                offset: l.offset,
            })
            .collect();
        usage.write_raw(rows).await?;
    }
    let rollups: Vec<RollupLine> = read_lines(&from.join("usage/usage_rollups_hourly.jsonl"))?;
    let rows: Vec<(RollupKey, RollupValue)> = rollups
        .into_iter()
        .map(|l| {
            (
                RollupKey {
                    customer: l.customer,
                    meter: l.meter,
                    hour: l.hour,
                    app: l.app,
                    dims: l.dims,
                },
                RollupValue {
                    events: l.events,
                    sum: l.sum,
                    max: l.max,
                    latest: (l.latest_time, l.latest_quantity),
                    partition: IMPORTED_PARTITION,
                    version: 0,
                },
            )
        })
        .collect();
    for chunk in rows.chunks(50_000) {
        usage.write_rollups(chunk.to_vec()).await?;
    }
    tracing::info!(raw = raw.len(), rollups = rows.len(), "usage imported");
    Ok(manifest)
}
