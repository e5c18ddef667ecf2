//! Where accepted events go: [`EventSink`], the transport edge.
//!
//! [`EventSink::send`] returns only when every envelope is durable: the
//! distributed collector's `crate::kafka::KafkaSink` when Kafka
//! acknowledged it (`acks=all`, idempotent producer) or it was fsynced to
//! the spool, the embedded mode's sink when its store committed it. That is
//! the moment the collector may answer 2xx.

use chrono::{DateTime, Utc};
use schemas::event::stamp_accepted;
use schemas::{AcceptWindow, FieldError, MeterCatalog, RawEvent, UsageEvent};
use std::future::Future;

/// One event on its way to Kafka: keyed by customer, so a customer's events
/// share a partition (and deduplication state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub key: String,
    pub payload: Vec<u8>,
}

impl Envelope {
    /// Accepts one event at `now`, the only place the accept window is
    /// judged: validates it against the window of `now`, stamps it with
    /// that instant (`schemas::event::ACCEPTED_AT`, so the aggregator judges
    /// it the same way however late it processes it) and keys it by
    /// customer.
    pub fn accept(
        mut raw: RawEvent,
        meters: &MeterCatalog,
        now: DateTime<Utc>,
    ) -> Result<Envelope, Vec<FieldError>> {
        let valid = UsageEvent::validate(&raw, meters, &AcceptWindow::at(now))?;
        stamp_accepted(&mut raw, now);
        Ok(Envelope {
            key: valid.customer,
            payload: serde_json::to_vec(&raw).expect("a JSON object serializes"),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Kafka,
    Spool,
    /// Written to the embedded mode's usage store.
    Store,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Kafka => "kafka",
            Delivery::Spool => "spool",
            Delivery::Store => "store",
        }
    }
}

/// The transport edge of the collector. The distributed mode uses
/// `crate::kafka::KafkaSink`; the embedded mode writes straight into its store.
/// Behind a pointer it is [`DynEventSink`] (`Arc<DynEventSink<'static>>`).
#[dynosaur::dynosaur(pub DynEventSink = dyn(box) EventSink)]
pub trait EventSink: Send + Sync {
    /// Makes every envelope durable, or fails without acknowledging any.
    fn send(&self, batch: Vec<Envelope>) -> impl Future<Output = anyhow::Result<Delivery>> + Send;
}
