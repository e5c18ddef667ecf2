#![doc = include_str!("../README.md")]

pub mod event;
pub mod ids;
pub mod json;
pub mod meter;
pub mod migrations;

pub use event::{
    parse_batch, parse_single, AcceptWindow, EventError, FieldError, ParsedEvent, RawEvent,
    UsageEvent, UsageRecord,
};
pub use meter::{Aggregation, Dimension, MeterCatalog, MeterDef};
