//! What a written batch added to the usage store, for the processes that
//! keep usage state in memory (billing's quota state) to follow the store
//! without re-reading it.
//!
//! After a batch's raw rows and rollups are durable, the [`Processor`]
//! reports one [`UsageDelta`] per partition it wrote: the cells the batch
//! touched (per customer, meter, hour, app and dims: what the batch itself
//! added, not the cumulative value) and the partition's rollup version
//! before and after it. Duplicates and dead letters are not in it: a delta
//! holds exactly what the store accepted.
//!
//! The versions chain a partition's deltas: a delta's `prev` is the
//! `version` of the one before it (rollup versions are the highest written
//! offset plus one, `rollup::rollup_version`). A follower that has applied
//! a partition through version `v` applies a delta with `prev == v`, skips
//! one with `version <= v` (a repeat), and on `prev > v` knows it missed one
//! and re-reads the store. A writer that (re)loads a partition reports a
//! *head* (`prev == version`, no cells): the store's version of that
//! partition, so a delta lost in a crash between the write and its
//! publication is noticed as soon as the partition is written again.
//!
//! On the wire (the distributed mode's `usage-deltas` topic, keyed by the
//! partition so each partition's deltas stay in order) a delta is JSON:
//! decimals as strings, instants in RFC 3339.
//!
//! [`Processor`]: crate::pipeline::Processor

use crate::rollup::hour_of;
use crate::store::RawRow;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageDelta {
    /// The usage topic's partition (0 in the embedded mode).
    pub partition: u32,
    /// The partition's rollup version before the batch (0: nothing written).
    pub prev: u64,
    /// Its version after the batch: every cell below carries it in the store.
    pub version: u64,
    /// When the batch was durable.
    pub written_at: DateTime<Utc>,
    /// Sorted by (customer, meter, hour, app, dims): a follower takes each
    /// customer's cells as one run.
    pub cells: Vec<DeltaCell>,
}

/// What one batch added to one rollup cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaCell {
    pub customer: String,
    pub meter: String,
    /// Unix seconds of the hour start.
    pub hour: i64,
    pub app: String,
    /// The dimensions as stored (a JSON object of strings).
    pub dims: String,
    pub events: u64,
    pub sum: Decimal,
    pub max: Decimal,
    /// (time in seconds, quantity) of the cell's latest event in the batch.
    pub latest: (i64, Decimal),
    /// The earliest event time in the cell (seconds): a follower that
    /// splits an hour (a plan change inside it) knows which side it is on.
    pub first: i64,
    pub last: i64,
}

impl UsageDelta {
    /// The store's version of a partition, reported when a writer loads it.
    pub fn head(partition: u32, version: u64, at: DateTime<Utc>) -> Self {
        Self {
            partition,
            prev: version,
            version,
            written_at: at,
            cells: Vec::new(),
        }
    }

    pub fn is_head(&self) -> bool {
        self.prev == self.version && self.cells.is_empty()
    }

    /// The delta of the rows of one partition written as one batch.
    pub fn of_rows<'a>(
        partition: u32,
        prev: u64,
        version: u64,
        written_at: DateTime<Utc>,
        rows: impl IntoIterator<Item = &'a RawRow>,
    ) -> Self {
        type Key<'a> = (&'a str, &'a str, i64, &'a str, &'a str);
        let mut cells: BTreeMap<Key<'a>, DeltaCell> = BTreeMap::new();
        for r in rows {
            let hour = hour_of(r.time);
            let t = r.time.timestamp();
            let key = (
                r.customer.as_str(),
                r.meter.as_str(),
                hour,
                r.app.as_str(),
                r.dims.as_str(),
            );
            let c = cells.entry(key).or_insert_with(|| DeltaCell {
                customer: r.customer.clone(),
                meter: r.meter.clone(),
                hour,
                app: r.app.clone(),
                dims: r.dims.clone(),
                events: 0,
                sum: Decimal::ZERO,
                max: r.quantity,
                latest: (t, r.quantity),
                first: t,
                last: t,
            });
            c.events += 1;
            c.sum += r.quantity;
            c.max = c.max.max(r.quantity);
            c.latest = c.latest.max((t, r.quantity));
            c.first = c.first.min(t);
            c.last = c.last.max(t);
        }
        Self {
            partition,
            prev,
            version,
            written_at,
            cells: cells.into_values().collect(),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a delta serializes")
    }

    pub fn from_json(bytes: &[u8]) -> anyhow::Result<Self> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// Where a partition's deltas stand for a follower (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Apply it: it follows what was applied.
    Apply,
    /// Already applied (a repeat after a writer's restart, or a head the
    /// follower is at).
    Skip,
    /// One or more deltas before it were missed: re-read the store.
    Gap,
}

/// What to do with a delta of a partition applied through `applied`
/// (`None`: nothing of it seen yet since the state was read; the first one
/// is taken as it comes, its cells judged by the versions read with the
/// state, except a head, which is all a follower could have missed).
pub fn step(applied: Option<u64>, d: &UsageDelta) -> Step {
    match applied {
        None if d.is_head() => Step::Gap,
        None => Step::Apply,
        Some(v) if d.version <= v => Step::Skip,
        Some(v) if d.prev == v => Step::Apply,
        // A head above what was applied, or a delta that starts later.
        Some(_) => Step::Gap,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn row(customer: &str, t: i64, q: i64) -> RawRow {
        RawRow {
            customer: customer.into(),
            meter: "requests".into(),
            time: Utc.timestamp_opt(t, 0).unwrap(),
            app: "web".into(),
            dims: "{}".into(),
            quantity: Decimal::from(q),
            unique_value: String::new(),
            source: "s".into(),
            id: format!("{customer}-{t}"),
            event_type: "tally.requests".into(),
            partition: 3,
            offset: t as u64,
        }
    }

    #[test]
    fn rows_sum_into_cells_per_hour() {
        let rows = [
            row("a", 10, 2),
            row("a", 20, 5),
            row("a", 3700, 1),
            row("b", 30, 4),
        ];
        let d = UsageDelta::of_rows(3, 7, 9, Utc::now(), rows.iter());
        let got: Vec<_> = d
            .cells
            .iter()
            .map(|c| {
                (
                    c.customer.as_str(),
                    c.hour,
                    c.events,
                    c.sum,
                    c.max,
                    c.latest,
                    c.first,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "a",
                    0,
                    2,
                    Decimal::from(7),
                    Decimal::from(5),
                    (20, Decimal::from(5)),
                    10
                ),
                (
                    "a",
                    3600,
                    1,
                    Decimal::ONE,
                    Decimal::ONE,
                    (3700, Decimal::ONE),
                    3700
                ),
                (
                    "b",
                    0,
                    1,
                    Decimal::from(4),
                    Decimal::from(4),
                    (30, Decimal::from(4)),
                    30
                ),
            ]
        );
        let back = UsageDelta::from_json(&d.to_json()).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn steps_follow_the_chain() {
        let d = |prev, version, cells: usize| UsageDelta {
            partition: 0,
            prev,
            version,
            written_at: Utc::now(),
            cells: (0..cells)
                .map(|_| DeltaCell {
                    customer: "a".into(),
                    meter: "m".into(),
                    hour: 0,
                    app: String::new(),
                    dims: "{}".into(),
                    events: 1,
                    sum: Decimal::ONE,
                    max: Decimal::ONE,
                    latest: (0, Decimal::ONE),
                    first: 0,
                    last: 0,
                })
                .collect(),
        };
        assert_eq!(step(None, &d(5, 9, 1)), Step::Apply);
        assert_eq!(step(None, &d(9, 9, 0)), Step::Gap);
        assert_eq!(step(Some(5), &d(5, 9, 1)), Step::Apply);
        assert_eq!(step(Some(9), &d(5, 9, 1)), Step::Skip);
        assert_eq!(step(Some(9), &d(9, 9, 0)), Step::Skip);
        assert_eq!(step(Some(5), &d(9, 9, 0)), Step::Gap);
        assert_eq!(step(Some(5), &d(7, 9, 1)), Step::Gap);
    }
}
