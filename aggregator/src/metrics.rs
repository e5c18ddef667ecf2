//! Aggregator metrics. Naming: `tally_aggregator_<what>_<unit>`, `_total`
//! for counters; labels from bounded sets (rejection codes, table names,
//! partition numbers).

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub messages_consumed: IntCounter,
    pub events_written: IntCounter,
    pub events_duplicate: IntCounter,
    pub messages_skipped_stored: IntCounter,
    pub events_dead_lettered: IntCounterVec,
    pub insert_duration: HistogramVec,
    pub consumer_lag: IntGaugeVec,
    pub write_retries: IntCounter,
    pub deltas_published: IntCounter,
    pub rollup_repairs: IntCounter,
    pub dedup_window_widened: IntCounter,
    /// Messages per processed batch (in the embedded mode: per group
    /// commit, one transaction and one fsync).
    pub batch_messages: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        Self::in_registry(Registry::new())
    }

    /// The aggregator's metrics registered in `registry` (the embedded
    /// process serves the collector's and the aggregator's together).
    pub fn in_registry(registry: Registry) -> Self {
        let m = Self {
            registry,
            messages_consumed: IntCounter::new(
                "tally_aggregator_messages_consumed_total",
                "Kafka messages consumed",
            )
            .unwrap(),
            events_written: IntCounter::new(
                "tally_aggregator_events_written_total",
                "Events written to the usage store (after dedup)",
            )
            .unwrap(),
            events_duplicate: IntCounter::new(
                "tally_aggregator_events_duplicate_total",
                "Events dropped as duplicates by (source, id)",
            )
            .unwrap(),
            messages_skipped_stored: IntCounter::new(
                "tally_aggregator_messages_skipped_stored_total",
                "Redelivered messages skipped because their offset is already stored",
            )
            .unwrap(),
            events_dead_lettered: IntCounterVec::new(
                Opts::new(
                    "tally_aggregator_events_dead_lettered_total",
                    "Messages sent to the dead-letter topic, by reason code",
                ),
                &["reason"],
            )
            .unwrap(),
            insert_duration: HistogramVec::new(
                HistogramOpts::new(
                    "tally_aggregator_insert_duration_seconds",
                    "Duration of one usage store insert",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
                &["table"],
            )
            .unwrap(),
            consumer_lag: IntGaugeVec::new(
                Opts::new(
                    "tally_aggregator_consumer_lag_messages",
                    "Messages between the committed offset and the partition end",
                ),
                &["partition"],
            )
            .unwrap(),
            write_retries: IntCounter::new(
                "tally_aggregator_write_retries_total",
                "Failed store writes that were retried",
            )
            .unwrap(),
            deltas_published: IntCounter::new(
                "tally_aggregator_deltas_published_total",
                "Usage deltas (one per written batch and partition, and partition heads) published for followers",
            )
            .unwrap(),
            rollup_repairs: IntCounter::new(
                "tally_aggregator_rollup_repairs_total",
                "Rollup keys recomputed from raw rows after an interrupted batch",
            )
            .unwrap(),
            dedup_window_widened: IntCounter::new(
                "tally_aggregator_dedup_window_widened_total",
                "Dedup key reloads reaching back before the usual window, for events accepted before a month boundary",
            )
            .unwrap(),
            batch_messages: Histogram::with_opts(
                HistogramOpts::new(
                    "tally_aggregator_batch_messages",
                    "Messages per processed batch (embedded mode: per group commit)",
                )
                .buckets(vec![
                    1.0, 10.0, 100.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 50000.0,
                ]),
            )
            .unwrap(),
        };
        let r = &m.registry;
        r.register(Box::new(m.messages_consumed.clone())).unwrap();
        r.register(Box::new(m.events_written.clone())).unwrap();
        r.register(Box::new(m.events_duplicate.clone())).unwrap();
        r.register(Box::new(m.messages_skipped_stored.clone()))
            .unwrap();
        r.register(Box::new(m.events_dead_lettered.clone()))
            .unwrap();
        r.register(Box::new(m.insert_duration.clone())).unwrap();
        r.register(Box::new(m.consumer_lag.clone())).unwrap();
        r.register(Box::new(m.write_retries.clone())).unwrap();
        r.register(Box::new(m.rollup_repairs.clone())).unwrap();
        r.register(Box::new(m.deltas_published.clone())).unwrap();
        r.register(Box::new(m.dedup_window_widened.clone()))
            .unwrap();
        r.register(Box::new(m.batch_messages.clone())).unwrap();
        m
    }

    pub fn render(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
