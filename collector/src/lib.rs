#![doc = include_str!("../README.md")]

pub mod api;
pub mod auth;
pub mod config;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod metrics;
#[cfg(feature = "kafka")]
pub mod server;
pub mod sink;
pub mod sources;
pub mod spool;

pub use config::Config;
#[cfg(feature = "kafka")]
pub use kafka::KafkaSink;
pub use sink::{Delivery, DynEventSink, Envelope, EventSink};
