//! Collector metrics. Naming: `tally_collector_<what>_<unit>` with `_total`
//! for counters; label values come from bounded sets (rejection codes,
//! delivery kinds, source names from the config).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub events_received: IntCounter,
    pub events_accepted: IntCounterVec,
    pub events_rejected: IntCounterVec,
    pub produce_duration: Histogram,
    pub spool_events: IntGauge,
    pub spool_replayed: IntCounter,
    pub source_events: IntCounterVec,
    pub source_errors: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Self {
            events_received: IntCounter::new(
                "tally_collector_events_received_total",
                "Events received over HTTP, valid or not",
            )
            .unwrap(),
            events_accepted: IntCounterVec::new(
                Opts::new(
                    "tally_collector_events_accepted_total",
                    "Events made durable, by delivery (kafka or spool)",
                ),
                &["delivery"],
            )
            .unwrap(),
            events_rejected: IntCounterVec::new(
                Opts::new(
                    "tally_collector_events_rejected_total",
                    "Events rejected, by reason code",
                ),
                &["reason"],
            )
            .unwrap(),
            produce_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "tally_collector_produce_duration_seconds",
                    "Time from produce to Kafka acknowledgement of one batch",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )
            .unwrap(),
            spool_events: IntGauge::new(
                "tally_collector_spool_events",
                "Events waiting in the local spool",
            )
            .unwrap(),
            spool_replayed: IntCounter::new(
                "tally_collector_spool_replayed_events_total",
                "Spooled events replayed to Kafka",
            )
            .unwrap(),
            source_events: IntCounterVec::new(
                Opts::new(
                    "tally_collector_source_events_total",
                    "Events emitted by built-in sources",
                ),
                &["source"],
            )
            .unwrap(),
            source_errors: IntCounterVec::new(
                Opts::new(
                    "tally_collector_source_errors_total",
                    "Failed polls of built-in sources",
                ),
                &["source"],
            )
            .unwrap(),
            registry,
        };
        m.registry
            .register(Box::new(m.events_received.clone()))
            .unwrap();
        m.registry
            .register(Box::new(m.events_accepted.clone()))
            .unwrap();
        m.registry
            .register(Box::new(m.events_rejected.clone()))
            .unwrap();
        m.registry
            .register(Box::new(m.produce_duration.clone()))
            .unwrap();
        m.registry
            .register(Box::new(m.spool_events.clone()))
            .unwrap();
        m.registry
            .register(Box::new(m.spool_replayed.clone()))
            .unwrap();
        m.registry
            .register(Box::new(m.source_events.clone()))
            .unwrap();
        m.registry
            .register(Box::new(m.source_errors.clone()))
            .unwrap();
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
