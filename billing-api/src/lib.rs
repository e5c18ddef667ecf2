#![doc = include_str!("../README.md")]

pub mod adjust;
pub mod admin_cli;
pub mod api;
pub mod auth;
pub mod catalog;
pub mod finalize;
pub mod invoice;
pub mod metrics;
pub mod quota;
pub mod quota_service;
pub mod rating;
pub mod service;
pub mod state;
pub mod stripe_sync;
pub mod usage;
pub mod webhook;
