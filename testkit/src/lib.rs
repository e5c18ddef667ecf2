//! Tally's test harnesses, one crate shared by every crate's integration
//! tests and benchmarks (a dev-dependency, never in a binary), instead of
//! source files included into each test through `#[path]`: compiled once,
//! not once per test binary.
//!
//! - [`pipeline`]: services from the environment, the collector and
//!   aggregator processes, ClickHouse checks;
//! - [`billing`]: fresh PostgreSQL, SQLite and ClickHouse stores, the
//!   billing router in-process ([`billing::Api`]), writing usage through
//!   the aggregator's processor;
//! - [`served`]: the real `billing-api serve` process;
//! - [`system`]: one running Tally, embedded or distributed, through its
//!   public surface only;
//! - [`deps`]: what a package's normal dependency tree holds;
//! - [`http`]: one response read off a raw connection.
//!
//! A service address missing from the environment fails the test: nothing
//! here skips.

pub mod billing;
pub mod deps;
pub mod http;
pub mod pipeline;
pub mod served;
pub mod system;
