#![doc = include_str!("../README.md")]

pub mod api;
pub mod auth;
pub mod config;
pub mod metrics;
pub mod server;
pub mod sink;
pub mod sources;
pub mod spool;

pub use config::Config;
pub use sink::{Delivery, Envelope, EventSink, KafkaSink};
