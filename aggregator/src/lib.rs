#![doc = include_str!("../README.md")]

pub mod dedup;
pub mod dlq;
pub mod metrics;
pub mod pipeline;
pub mod rollup;
pub mod store;

pub use store::{Granularity, UsageQuery, UsageRow, UsageStore, UsageWriter};
