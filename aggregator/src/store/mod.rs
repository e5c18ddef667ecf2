//! The usage store: where validated, deduplicated usage lives, and the query
//! interface billing uses. ClickHouse implements it in the distributed mode
//! (`clickhouse.rs`); SQLite in the embedded mode (`sqlite.rs`), answering
//! every question identically (`tests/sqlite_store.rs` compares them).
//!
//! Two traits split the two users: [`UsageWriter`] is the aggregator's
//! write path (atomic batch writes plus the state a restarted consumer
//! needs); [`UsageStore`] is the read path for billing and dashboards.

pub mod clickhouse;
pub mod sqlite;

use crate::rollup::{RollupKey, RollupValue};
use chrono::{DateTime, Datelike, TimeZone, Utc};
use rust_decimal::Decimal;
use schemas::{Aggregation, MeterDef};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;

/// One raw row: what one event contributes to one meter.
/// The partition number of usage rows imported from an embedded data
/// directory (`tally import`). No Kafka topic has this many partitions, so
/// resuming a live partition never reads them as its own; live partitions
/// load their (source, id) keys for deduplication, though, so an imported
/// event re-sent after the move is still dropped as a duplicate. Imported
/// rollups carry version 0, which every live write outranks
/// (`rollup::rollup_version`).
pub const IMPORTED_PARTITION: u32 = 1_000_000;

/// The partitions whose recent (source, id) keys seed a live partition's
/// deduplication when it is loaded: its own and the imported rows'
/// ([`IMPORTED_PARTITION`]), also while the partition itself is empty. Every
/// store loads exactly these.
pub fn dedup_partitions(partition: u32) -> [u32; 2] {
    [partition, IMPORTED_PARTITION]
}

/// Whether a partition's rollups must be re-derived from its raw rows on
/// load, and from which offset: the last batch's raw rows landed (highest
/// offset `raw_max`) but its rollup write, which records version
/// `rollup_version(offset)` and covers offsets below it, did not
/// (`roll_max` is the highest version recorded). None when nothing is to
/// repair. Every store decides with this.
pub fn repair_from(raw_max: Option<u64>, roll_max: Option<u64>) -> Option<u64> {
    let raw = raw_max?;
    match roll_max {
        Some(v) if v >= crate::rollup::rollup_version(raw) => None,
        Some(v) => Some(v),
        None => Some(0),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RawRow {
    pub customer: String,
    pub meter: String,
    /// The event time, at microsecond precision (see [`stored_time`]).
    pub time: DateTime<Utc>,
    pub app: String,
    pub dims: String,
    pub quantity: Decimal,
    pub unique_value: String,
    pub source: String,
    pub id: String,
    pub event_type: String,
    pub partition: u32,
    pub offset: u64,
}

/// What a consumer needs to resume a partition exactly once.
#[derive(Debug, Clone, Default)]
pub struct PartitionState {
    /// Highest offset whose rows are stored; messages at or below it were
    /// written already and are skipped.
    pub max_offset: Option<u64>,
    /// (`source`, `id`, first event time in seconds) of every stored event
    /// within the dedup window.
    pub seen: Vec<(String, String, i64)>,
    /// Rollup keys re-derived from raw rows because the previous writer
    /// stopped between the raw write and the rollup write.
    pub repaired_keys: usize,
}

/// The aggregator's write path.
pub trait UsageWriter: Send + Sync + 'static {
    /// Applies migrations (idempotent).
    fn migrate(&self) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Loads the resume state of a partition and repairs its rollups if the
    /// last batch's rollup write did not happen.
    fn load_partition(
        &self,
        partition: u32,
        window_start: DateTime<Utc>,
    ) -> impl Future<Output = anyhow::Result<PartitionState>> + Send;
    /// Writes raw rows in one atomic operation.
    fn write_raw(&self, rows: Vec<RawRow>) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Current rollup values of every key of these (customer, hour) pairs.
    fn load_rollups(
        &self,
        pairs: Vec<(String, i64)>,
    ) -> impl Future<Output = anyhow::Result<Vec<(RollupKey, RollupValue)>>> + Send;
    /// Writes cumulative rollup values (idempotent: same version, same row).
    fn write_rollups(
        &self,
        rows: Vec<(RollupKey, RollupValue)>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// True when [`UsageWriter::write_batch`] writes raw rows and rollups in
    /// one atomic operation (SQLite: one transaction, one fsync). Otherwise
    /// the processor writes them as two steps, raw rows first.
    fn atomic_batches(&self) -> bool {
        false
    }
    /// A batch's raw rows and rollups, atomically (see `atomic_batches`).
    fn write_batch(
        &self,
        _rows: Vec<RawRow>,
        _rollups: Vec<(RollupKey, RollupValue)>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        async { anyhow::bail!("this store writes raw rows and rollups separately") }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    Hour,
    Day,
    Month,
}

impl Granularity {
    pub fn bucket(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let ts = t.timestamp();
        match self {
            Granularity::Hour => Utc.timestamp_opt(ts - ts.rem_euclid(3600), 0).unwrap(),
            Granularity::Day => Utc.timestamp_opt(ts - ts.rem_euclid(86400), 0).unwrap(),
            Granularity::Month => Utc
                .with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
                .unwrap(),
        }
    }
}

/// A usage question: one customer, one meter, a half-open time range, an
/// optional grouping by dimensions (`app` or any dimension of the meter) and
/// an optional time granularity (none: one bucket for the whole range).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageQuery {
    pub customer: String,
    pub meter: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    #[serde(default)]
    pub group_by: Vec<String>,
    #[serde(default)]
    pub granularity: Option<Granularity>,
    /// Answer from raw events only, never from rollups (slower; used to
    /// re-derive an invoice from raw events as evidence).
    #[serde(default)]
    pub raw: bool,
}

/// One answer row. `value` is the meter's aggregate (sum, count, max,
/// latest or unique count); `events` the number of events behind it, the
/// evidence billing shows on an invoice line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    pub bucket: Option<DateTime<Utc>>,
    pub group: BTreeMap<String, String>,
    pub events: u64,
    pub value: Decimal,
}

/// The read path billing uses. Behind a pointer it is [`DynUsageStore`]
/// (`Arc<DynUsageStore<'static>>` where `Arc<dyn UsageStore>` would be).
#[dynosaur::dynosaur(pub DynUsageStore = dyn(box) UsageStore)]
pub trait UsageStore: Send + Sync {
    fn query(
        &self,
        meter: &MeterDef,
        q: &UsageQuery,
    ) -> impl Future<Output = anyhow::Result<Vec<UsageRow>>> + Send;
    /// Several questions over the same range, asked of every customer (or
    /// of those with ids in the inclusive range `customers`) in one pass
    /// (`q.customer` is ignored): billing's finalization run reads a whole
    /// period this way. One answer per question, rows per customer;
    /// customers without usage are absent.
    fn query_all(
        &self,
        questions: &[(MeterDef, UsageQuery)],
        customers: Option<(&str, &str)>,
    ) -> impl Future<Output = anyhow::Result<Vec<PerCustomer>>> + Send;
    /// [`UsageStore::query_all`] for the customers listed (`ids`, any
    /// order) and no others: billing reads the few customers of one billing
    /// anchor day this way instead of the whole id range they span.
    fn query_some(
        &self,
        questions: &[(MeterDef, UsageQuery)],
        ids: &[String],
    ) -> impl Future<Output = anyhow::Result<Vec<PerCustomer>>> + Send;
    /// The highest rollup version among each customer's cells with hours in
    /// `[from, to)` (of the customers listed, or of all): where a read of
    /// those hours stands against the stream of [`crate::delta`]s. A read
    /// taken between two equal answers for a customer holds exactly that
    /// customer's batches up to the version; customers without cells are
    /// absent.
    fn versions(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        ids: Option<&[String]>,
    ) -> impl Future<Output = anyhow::Result<HashMap<String, u64>>> + Send;
}

/// Answer rows by customer id.
pub type PerCustomer = HashMap<String, Vec<UsageRow>>;

/// A mergeable partial aggregate of one (bucket, app, dims) cell.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Partial {
    pub events: u64,
    pub sum: Decimal,
    pub max: Decimal,
    /// (time in seconds, quantity) of the latest event; ties broken by the
    /// larger quantity so the result does not depend on arrival order.
    pub latest: Option<(i64, Decimal)>,
    pub uniques: HashSet<String>,
}

impl Partial {
    pub fn merge(&mut self, o: Partial) {
        if self.events == 0 {
            self.max = o.max;
        } else if o.events > 0 {
            self.max = self.max.max(o.max);
        }
        self.events += o.events;
        self.sum += o.sum;
        self.latest = match (self.latest, o.latest) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.uniques.extend(o.uniques);
    }

    pub fn value(&self, agg: Aggregation) -> Decimal {
        match agg {
            Aggregation::Sum => self.sum,
            Aggregation::Count => Decimal::from(self.events),
            Aggregation::Max => self.max,
            Aggregation::Latest => self.latest.map(|l| l.1).unwrap_or_default(),
            Aggregation::UniqueCount => Decimal::from(self.uniques.len() as u64),
        }
    }
}

/// One cell as a store returns it, before grouping.
#[derive(Debug, Clone)]
pub struct Cell {
    /// Start of the cell's hour (or of the raw row's second).
    pub time: DateTime<Utc>,
    pub app: String,
    pub dims: String,
    pub partial: Partial,
}

/// Groups cells into answer rows: the one place where grouping and
/// bucketing rules live, shared by every store.
pub fn group_cells(
    meter: &MeterDef,
    q: &UsageQuery,
    cells: impl IntoIterator<Item = Cell>,
) -> Vec<UsageRow> {
    type GroupKey = (Option<DateTime<Utc>>, BTreeMap<String, String>);
    let mut groups: BTreeMap<GroupKey, Partial> = BTreeMap::new();
    let mut dims_cache: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    for c in cells {
        let dims = dims_cache
            .entry(c.dims.clone())
            .or_insert_with(|| serde_json::from_str(&c.dims).unwrap_or_default());
        let mut group = BTreeMap::new();
        for g in &q.group_by {
            let v = if g == schemas::meter::APP_DIMENSION {
                Some(c.app.clone())
            } else {
                dims.get(g).cloned()
            };
            group.insert(g.clone(), v.unwrap_or_default());
        }
        let bucket = q.granularity.map(|g| g.bucket(c.time));
        groups.entry((bucket, group)).or_default().merge(c.partial);
    }
    groups
        .into_iter()
        .map(|((bucket, group), p)| UsageRow {
            bucket,
            group,
            events: p.events,
            value: p.value(meter.aggregation),
        })
        .collect()
}

/// The distinct meters of `query_all`'s questions, checking they share one
/// range (one pass over the store answers them all).
pub fn meters_of(questions: &[(MeterDef, UsageQuery)]) -> anyhow::Result<Vec<&MeterDef>> {
    if let Some((_, first)) = questions.first() {
        anyhow::ensure!(
            questions
                .iter()
                .all(|(_, q)| (q.from, q.to, q.raw, q.granularity)
                    == (first.from, first.to, first.raw, first.granularity)),
            "query_all: every question must cover the same range"
        );
    }
    let mut meters: Vec<&MeterDef> = Vec::new();
    for (m, _) in questions {
        if !meters.iter().any(|x| x.key == m.key) {
            meters.push(m);
        }
    }
    Ok(meters)
}

/// `query_all`'s answers from one pass's `(customer, meter, cell)`s: per
/// question, rows per customer.
pub fn answer_all(
    questions: &[(MeterDef, UsageQuery)],
    cells: Vec<(String, String, Cell)>,
) -> Vec<PerCustomer> {
    let mut by_meter: HashMap<String, HashMap<String, Vec<Cell>>> = HashMap::new();
    for (customer, meter, cell) in cells {
        by_meter
            .entry(meter)
            .or_default()
            .entry(customer)
            .or_default()
            .push(cell);
    }
    questions
        .iter()
        .map(|(m, q)| {
            by_meter
                .get(&m.key)
                .map(|per| {
                    per.iter()
                        .map(|(c, cells)| (c.clone(), group_cells(m, q, cells.iter().cloned())))
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect()
}

/// A half-open range of unix seconds.
pub type SecondsRange = (i64, i64);

/// An event time as the stores keep it: whole unix seconds (the `time`
/// column, which rollups and buckets use) and the microseconds within that
/// second (`time_us`), so that usage belongs to a plan segment by its exact
/// time even when a boundary has a sub-second part (a real `now` switch).
/// Microseconds are the precision billing state stores instants at.
pub fn stored_time(t: DateTime<Utc>) -> (i64, u32) {
    (t.timestamp(), t.timestamp_subsec_micros())
}

/// The instant back from its stored parts.
pub fn from_stored_time(secs: i64, micros: u32) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, micros * 1000).unwrap_or_default()
}

/// An instant truncated to the stored precision (microseconds).
pub fn to_stored_precision(t: DateTime<Utc>) -> DateTime<Utc> {
    let (s, us) = stored_time(t);
    from_stored_time(s, us)
}

/// The SQL condition `from <= (time, time_us) < to` over the stored parts,
/// at microsecond precision, in the subset ClickHouse 18.16 and SQLite share.
pub fn time_range_sql(from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    let ((fs, fu), (ts, tu)) = (stored_time(from), stored_time(to));
    format!(
        "(time > {fs} OR (time = {fs} AND time_us >= {fu})) AND (time < {ts} OR (time = {ts} AND time_us < {tu}))"
    )
}

/// Splits `[from, to)` into whole hours (served by rollups, as seconds) and
/// the partial hours at its edges (served by raw rows, as exact instants).
/// An hour is whole only if the range covers all of it: a `from` of
/// 12:00:00.0016 leaves 12:00 to 13:00 to the raw rows.
pub fn split_hours(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> (Option<SecondsRange>, Vec<(DateTime<Utc>, DateTime<Utc>)>) {
    let (from, to) = (to_stored_precision(from), to_stored_precision(to));
    if from >= to {
        return (None, vec![]);
    }
    let f = from.timestamp() + i64::from(from.timestamp_subsec_micros() > 0);
    let t = to.timestamp();
    let first_full = f + (3600 - f.rem_euclid(3600)) % 3600;
    let last_full = t - t.rem_euclid(3600);
    if first_full >= last_full {
        return (None, vec![(from, to)]);
    }
    let at = |s: i64| from_stored_time(s, 0);
    let mut edges = Vec::new();
    if from < at(first_full) {
        edges.push((from, at(first_full)));
    }
    if at(last_full) < to {
        edges.push((at(last_full), to));
    }
    (Some((first_full, last_full)), edges)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rollups_are_repaired_only_when_the_last_batch_lost_them() {
        // Nothing written: nothing to repair.
        assert_eq!(repair_from(None, None), None);
        // Raw rows but no rollups at all: every raw row.
        assert_eq!(repair_from(Some(9), None), Some(0));
        // Rollups of version 10 cover offsets below 10, so all of 0..=9.
        assert_eq!(repair_from(Some(9), Some(10)), None);
        // Rollups through offset 4 only: offsets 5.. again.
        assert_eq!(repair_from(Some(9), Some(5)), Some(5));
        assert_eq!(dedup_partitions(3), [3, IMPORTED_PARTITION]);
    }

    use super::*;

    #[test]
    fn split_hours_cases() {
        let h = |x: i64| x * 3600;
        let d = |s: i64| Utc.timestamp_opt(s, 0).unwrap();
        assert_eq!(split_hours(d(h(1)), d(h(3))), (Some((h(1), h(3))), vec![]));
        assert_eq!(
            split_hours(d(h(1) + 5), d(h(3) + 7)),
            (
                Some((h(2), h(3))),
                vec![(d(h(1) + 5), d(h(2))), (d(h(3)), d(h(3) + 7))]
            )
        );
        assert_eq!(
            split_hours(d(h(1) + 5), d(h(1) + 9)),
            (None, vec![(d(h(1) + 5), d(h(1) + 9))])
        );
        assert_eq!(split_hours(d(h(2)), d(h(1))), (None, vec![]));
        // A sub-second bound leaves its hour to the raw rows.
        let us = |s: i64, micros: u32| from_stored_time(s, micros);
        assert_eq!(
            split_hours(us(h(1), 1600), d(h(3))),
            (Some((h(2), h(3))), vec![(us(h(1), 1600), d(h(2)))])
        );
        assert_eq!(
            split_hours(d(h(1)), us(h(3), 1600)),
            (Some((h(1), h(3))), vec![(d(h(3)), us(h(3), 1600))])
        );
        // Nanoseconds beyond the stored precision are dropped.
        let ns = DateTime::from_timestamp(h(1), 1_600_999).unwrap();
        assert_eq!(
            split_hours(ns, d(h(1) + 1)).1,
            vec![(us(h(1), 1600), d(h(1) + 1))]
        );
        assert_eq!(
            time_range_sql(us(10, 5), us(20, 0)),
            "(time > 10 OR (time = 10 AND time_us >= 5)) AND (time < 20 OR (time = 20 AND time_us < 0))"
        );
    }

    #[test]
    fn grouping_buckets_and_aggregates() {
        let meter = schemas::MeterCatalog::default_catalog()
            .get("compute")
            .unwrap()
            .clone();
        let t = |h: u32| Utc.with_ymd_and_hms(2026, 11, 10, h, 0, 0).unwrap();
        let cell = |h, app: &str, it: &str, q: i64| Cell {
            time: t(h),
            app: app.into(),
            dims: format!(r#"{{"instance_type":"{it}","region":"fra"}}"#),
            partial: Partial {
                events: 1,
                sum: Decimal::from(q),
                max: Decimal::from(q),
                latest: Some((t(h).timestamp(), Decimal::from(q))),
                ..Default::default()
            },
        };
        let cells = vec![
            cell(1, "web", "a", 10),
            cell(2, "web", "b", 5),
            cell(2, "api", "a", 7),
        ];
        let q = UsageQuery {
            customer: "c".into(),
            meter: "compute".into(),
            from: t(0),
            to: t(5),
            group_by: vec!["instance_type".into()],
            granularity: Some(Granularity::Day),
            raw: false,
        };
        let rows = group_cells(&meter, &q, cells);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (
                rows[0].group["instance_type"].as_str(),
                rows[0].value,
                rows[0].events
            ),
            ("a", Decimal::from(17), 2)
        );
        assert_eq!(
            rows[0].bucket,
            Some(Utc.with_ymd_and_hms(2026, 11, 10, 0, 0, 0).unwrap())
        );
        let mut p = Partial::default();
        p.merge(Partial {
            events: 1,
            max: Decimal::from(3),
            latest: Some((5, Decimal::from(3))),
            ..Default::default()
        });
        p.merge(Partial {
            events: 1,
            max: Decimal::from(9),
            latest: Some((4, Decimal::from(9))),
            ..Default::default()
        });
        assert_eq!(
            (
                p.value(Aggregation::Max),
                p.value(Aggregation::Latest),
                p.value(Aggregation::Count)
            ),
            (Decimal::from(9), Decimal::from(3), Decimal::from(2))
        );
    }
}
