//! Hourly rollups, as pure data: the key, the cumulative value, and how one
//! raw row updates it. The store writes cumulative values with a version
//! (the Kafka offset that produced them), so a rollup write can be repeated
//! without counting anything twice.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RollupKey {
    pub customer: String,
    pub meter: String,
    /// Unix seconds of the hour start.
    pub hour: i64,
    pub app: String,
    pub dims: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RollupValue {
    pub events: u64,
    pub sum: Decimal,
    pub max: Decimal,
    /// Latest (time in seconds, quantity); ties broken by larger quantity.
    pub latest: (i64, Decimal),
    pub partition: u32,
    pub version: u64,
}

impl RollupValue {
    pub fn add(&mut self, time: DateTime<Utc>, quantity: Decimal) {
        self.max = if self.events == 0 {
            quantity
        } else {
            self.max.max(quantity)
        };
        self.events += 1;
        self.sum += quantity;
        let cand = (time.timestamp(), quantity);
        if self.events == 1 || cand > self.latest {
            self.latest = cand;
        }
    }
}

pub fn hour_of(t: DateTime<Utc>) -> i64 {
    let s = t.timestamp();
    s - s.rem_euclid(3600)
}

/// The rollup version a batch writes: its highest offset in the partition
/// plus one. Version 0 is never written by a partition: it belongs to rows
/// imported from an embedded data directory (`store::IMPORTED_PARTITION`),
/// so a live update of the same key always wins over the imported value.
pub fn rollup_version(max_offset: u64) -> u64 {
    max_offset + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn add_accumulates() {
        let t = |s| Utc.timestamp_opt(s, 0).unwrap();
        let mut v = RollupValue::default();
        v.add(t(10), Decimal::from(5));
        v.add(t(20), Decimal::from(2));
        v.add(t(20), Decimal::from(3));
        assert_eq!(
            (v.events, v.sum, v.max, v.latest),
            (
                3,
                Decimal::from(10),
                Decimal::from(5),
                (20, Decimal::from(3))
            )
        );
        assert_eq!(hour_of(t(7250)), 7200);
    }
}
