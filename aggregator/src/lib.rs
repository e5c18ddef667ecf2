#![doc = include_str!("../README.md")]

pub mod dedup;
pub mod delta;
#[cfg(feature = "kafka")]
pub mod dlq;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod metrics;
pub mod pipeline;
pub mod rollup;
pub mod store;

pub use store::{DynUsageStore, Granularity, UsageQuery, UsageRow, UsageStore, UsageWriter};
