//! Billing state behind one interface: customers, published plan versions,
//! the plan history of each customer (subscription segments), seat changes
//! and the append-only audit log. PostgreSQL implements it
//! (`postgres.rs`); the embedded mode will add SQLite.
//!
//! Every admin change is written together with its audit entry in one
//! transaction (who, when, what, before and after).

pub mod postgres;

use crate::catalog::PlanVersion;
use crate::rating::{Period, SeatInterval};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl StateError {
    /// Machine-readable code for API errors.
    pub fn code(&self) -> &'static str {
        match self {
            StateError::NotFound(_) => "not_found",
            StateError::Conflict(_) => "conflict",
            StateError::Invalid(_) => "invalid",
            StateError::Db(_) => "internal",
        }
    }
}

pub type StateResult<T> = Result<T, StateError>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub id: String,
    pub external_id: String,
    pub name: String,
}

/// A span of a customer's plan history, clipped to the asked period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSegment {
    pub plan: String,
    pub version: u32,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

pub trait StateStore: Send + Sync + 'static {
    fn migrate(&self) -> BoxFuture<'_, StateResult<()>>;
    /// Publishes a plan version; versions are immutable once published.
    fn publish_plan<'a>(
        &'a self,
        plan: &'a PlanVersion,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<()>>;
    fn plan_version<'a>(
        &'a self,
        plan: &'a str,
        version: u32,
    ) -> BoxFuture<'a, StateResult<PlanVersion>>;
    fn create_customer<'a>(
        &'a self,
        c: &'a Customer,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<()>>;
    fn customer_by_external_id<'a>(
        &'a self,
        external_id: &'a str,
    ) -> BoxFuture<'a, StateResult<Customer>>;
    /// Starts the first subscription of a customer.
    fn subscribe<'a>(
        &'a self,
        customer: &'a str,
        plan: &'a str,
        version: u32,
        at: DateTime<Utc>,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<()>>;
    /// Ends the open subscription at `at` and starts the new plan there.
    fn switch_plan<'a>(
        &'a self,
        customer: &'a str,
        plan: &'a str,
        version: u32,
        at: DateTime<Utc>,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<()>>;
    /// Sets the seat count from `at` on.
    fn set_seats<'a>(
        &'a self,
        customer: &'a str,
        seats: u32,
        at: DateTime<Utc>,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<()>>;
    /// The customer's plan segments inside the period, in order.
    fn plan_segments<'a>(
        &'a self,
        customer: &'a str,
        period: Period,
    ) -> BoxFuture<'a, StateResult<Vec<PlanSegment>>>;
    /// The customer's seat intervals inside the period, in order.
    fn seat_intervals<'a>(
        &'a self,
        customer: &'a str,
        period: Period,
    ) -> BoxFuture<'a, StateResult<Vec<SeatInterval>>>;
    fn audit_log<'a>(&'a self, subject: &'a str) -> BoxFuture<'a, StateResult<Vec<AuditEntry>>>;
}

/// Clips `[start, end?)` spans to a period, dropping the ones outside it.
pub fn clip(
    spans: impl IntoIterator<Item = (DateTime<Utc>, Option<DateTime<Utc>>)>,
    period: Period,
) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    spans
        .into_iter()
        .filter_map(|(s, e)| {
            let (a, b) = (s.max(period.start), e.unwrap_or(period.end).min(period.end));
            (b > a).then_some((a, b))
        })
        .collect()
}
