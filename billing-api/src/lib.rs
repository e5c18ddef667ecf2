#![doc = include_str!("../README.md")]

pub mod admin_cli;
pub mod alerts;
pub mod api;
pub mod auth;
pub mod costs;
pub mod dashboard;
#[cfg(feature = "kafka")]
pub mod delta_feed;
pub mod finalize;
pub mod invoice;
pub mod metrics;
pub mod options;
pub mod quota_service;
pub mod service;
pub mod state;
pub mod stripe_sync;
pub mod usage;
pub mod wire;

// The domain's modules at their old paths, for the crates and tests that
// name them there.
pub use billing_domain::{adjust, advance, catalog, quota, rating, webhook};
