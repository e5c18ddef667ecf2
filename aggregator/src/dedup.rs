//! Deduplication by (`source`, `id`).
//!
//! Window: every event whose `time` is at or after the start of the
//! previous calendar month (UTC), the same window the collector accepts
//! events in (`schemas::AcceptWindow`). That covers the open billing period
//! plus the previous period through its grace window. The set is kept in
//! memory per Kafka partition (events are keyed by customer, so all copies
//! of an event share a partition), rebuilt from the stored raw rows when a
//! partition is assigned, and pruned of keys whose event month left the
//! window. An event accepted before a month boundary and processed after
//! it (Kafka lag, a spool replay) can be older than that: the processor
//! then reloads the partition's keys from the store back to the start of
//! that event's month and keeps them for an hour after the last such
//! event (`pipeline::Processor::cover`), so every event that can be
//! accepted is deduplicated against every stored one.
//! A key enters the set only after its row is durably written, so a
//! failed write never makes a retried event count zero times.

use chrono::{DateTime, Datelike, TimeZone, Utc};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// 128-bit fingerprint of (`source`, `id`).
pub fn fingerprint(source: &str, id: &str) -> u128 {
    let mut h = Sha256::new();
    h.update((source.len() as u64).to_le_bytes());
    h.update(source.as_bytes());
    h.update(id.as_bytes());
    u128::from_le_bytes(h.finalize()[..16].try_into().unwrap())
}

/// First instant of the calendar month containing `t` (UTC).
pub fn month_start(t: DateTime<Utc>) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
        .single()
        .expect("valid month start")
}

fn month_index(t: DateTime<Utc>) -> u32 {
    t.year() as u32 * 12 + t.month0()
}

#[derive(Debug, Default)]
pub struct DedupSet {
    /// fingerprint → month index of the event time first seen.
    keys: HashMap<u128, u32>,
}

impl DedupSet {
    pub fn contains(&self, fp: u128) -> bool {
        self.keys.contains_key(&fp)
    }

    pub fn insert(&mut self, fp: u128, time: DateTime<Utc>) {
        self.keys.entry(fp).or_insert(month_index(time));
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Drops keys whose event month is before the window start.
    pub fn prune(&mut self, window_start: DateTime<Utc>) {
        let min = month_index(window_start);
        self.keys.retain(|_, m| *m >= min);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn insert_contains_prune() {
        let mut s = DedupSet::default();
        let oct = Utc.with_ymd_and_hms(2026, 10, 31, 23, 0, 0).unwrap();
        let nov = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        s.insert(fingerprint("a", "1"), oct);
        s.insert(fingerprint("a", "2"), nov);
        assert!(s.contains(fingerprint("a", "1")) && !s.contains(fingerprint("a1", "")));
        s.prune(nov);
        assert!(!s.contains(fingerprint("a", "1")) && s.contains(fingerprint("a", "2")));
    }
}
