//! Billing state behind one interface: customers, published plan versions,
//! the plan history of each customer (subscription segments), seat changes
//! and the append-only audit log. PostgreSQL implements it
//! (`postgres.rs`); the embedded mode will add SQLite.
//!
//! Every admin change is written together with its audit entry in one
//! transaction (who, when, what, before and after).

pub mod postgres;

use crate::auth::ApiKey;
use crate::catalog::PlanVersion;
use crate::invoice::{InvoiceBody, NewInvoice};
use crate::rating::{Period, SeatInterval};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

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

/// (suspended, the customer's own spending cap).
pub type QuotaSettings = (bool, Option<Decimal>);

/// A usage alert to raise: once per (customer, period, kind, subject,
/// threshold).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewAlert {
    pub customer_id: String,
    pub period_start: DateTime<Utc>,
    /// `spending_cap` or `allowance`.
    pub kind: String,
    /// What the threshold is of: empty for the cap, the price for an
    /// allowance (e.g. `compute instance_type=t4g.small`).
    pub subject: String,
    /// Percent.
    pub threshold: u32,
    /// The webhook body.
    pub payload: serde_json::Value,
}

/// A raised alert and its delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Alert {
    pub id: i64,
    #[serde(flatten)]
    pub alert: NewAlert,
    pub created_at: DateTime<Utc>,
    /// `pending`, `delivered` or `failed` (gave up).
    pub status: String,
    pub attempts: u32,
    pub next_attempt_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// How one delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertOutcome {
    Delivered,
    Retry { at: DateTime<Utc>, error: String },
    GaveUp { error: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Customer {
    pub id: String,
    pub external_id: String,
    pub name: String,
}

/// A span of a customer's plan history, clipped to the asked period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlanSegment {
    pub plan: String,
    pub version: u32,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct App {
    pub customer_id: String,
    pub app: String,
    pub name: String,
}

/// A published plan version and whether it is retired (retired versions
/// keep billing their current subscribers but take no new ones).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PublishedPlan {
    pub plan: PlanVersion,
    pub retired: bool,
}

/// Delivery of a finalized invoice to the payment provider.
pub mod sync_status {
    /// Waiting to be sent to Stripe (or Stripe sync is off).
    pub const PENDING: &str = "pending";
    pub const SYNCED: &str = "synced";
    /// Below the minimum charge: not sent, added to the next invoice.
    pub const CARRIED_FORWARD: &str = "carried_forward";
    /// Total zero: nothing to send.
    pub const NOTHING_DUE: &str = "nothing_due";
    /// Sent but Stripe's total disagrees, or Stripe refused it; needs a human.
    pub const FAILED: &str = "failed";
}

/// A finalized invoice: immutable except for its status fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Invoice {
    pub id: String,
    pub seq: i64,
    pub number: String,
    pub customer_id: String,
    pub period: Period,
    pub currency: String,
    pub subtotal: Decimal,
    pub adjustments_total: Decimal,
    pub carried_in: Decimal,
    pub total: Decimal,
    pub body: InvoiceBody,
    pub finalized_at: DateTime<Utc>,
    pub sync_status: String,
    pub stripe_invoice_id: Option<String>,
    pub carried_to: Option<String>,
    /// `open`, `paid`, `payment_failed` or `void` (from Stripe's webhooks).
    pub payment_status: String,
    pub sync_error: Option<String>,
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

    // Catalog administration.
    fn list_plans(&self) -> BoxFuture<'_, StateResult<Vec<PublishedPlan>>>;
    fn retire_plan<'a>(
        &'a self,
        plan: &'a str,
        version: u32,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<()>>;

    // Customers and apps.
    fn customer<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StateResult<Customer>>;
    /// Customers ordered by id, after `after`, at most `limit`.
    fn list_customers<'a>(
        &'a self,
        after: Option<&'a str>,
        limit: u32,
    ) -> BoxFuture<'a, StateResult<Vec<Customer>>>;
    fn create_app<'a>(&'a self, app: &'a App, actor: &'a str) -> BoxFuture<'a, StateResult<()>>;
    fn apps<'a>(&'a self, customer: &'a str) -> BoxFuture<'a, StateResult<Vec<App>>>;

    // Bulk reads for the finalization run.
    /// Plan segments of every customer inside the period.
    fn plan_segments_all(
        &self,
        period: Period,
    ) -> BoxFuture<'_, StateResult<HashMap<String, Vec<PlanSegment>>>>;
    /// Seat intervals of every customer inside the period.
    fn seat_intervals_all(
        &self,
        period: Period,
    ) -> BoxFuture<'_, StateResult<HashMap<String, Vec<SeatInterval>>>>;
    /// Start of the earliest subscription, if any.
    fn billing_start(&self) -> BoxFuture<'_, StateResult<Option<DateTime<Utc>>>>;
    /// Finalized invoices whose period starts at `start`, by customer.
    fn invoices_in_period(
        &self,
        start: DateTime<Utc>,
    ) -> BoxFuture<'_, StateResult<HashMap<String, Invoice>>>;
    /// Invoices carried forward and not yet added to a later invoice, by
    /// customer (of one customer, or of all).
    fn open_carried<'a>(
        &'a self,
        customer: Option<&'a str>,
    ) -> BoxFuture<'a, StateResult<HashMap<String, Vec<Invoice>>>>;

    // Invoices.
    /// Finalizes invoices in one transaction: numbers them from the gapless
    /// counter, marks the invoices they carry in, and skips (without using a
    /// number) any whose customer and period already has an invoice.
    /// Returns the invoices written.
    fn insert_invoices(
        &self,
        new: Vec<NewInvoice>,
        finalized_at: DateTime<Utc>,
    ) -> BoxFuture<'_, StateResult<Vec<Invoice>>>;
    fn invoice<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StateResult<Invoice>>;
    fn invoices_of<'a>(&'a self, customer: &'a str) -> BoxFuture<'a, StateResult<Vec<Invoice>>>;
    /// Invoices waiting for Stripe, oldest first.
    fn pending_sync(&self, limit: u32) -> BoxFuture<'_, StateResult<Vec<Invoice>>>;

    // Stripe mapping and status.
    fn stripe_customer<'a>(
        &'a self,
        customer: &'a str,
    ) -> BoxFuture<'a, StateResult<Option<String>>>;
    fn set_stripe_customer<'a>(
        &'a self,
        customer: &'a str,
        stripe_id: &'a str,
    ) -> BoxFuture<'a, StateResult<()>>;
    fn set_stripe_invoice<'a>(
        &'a self,
        invoice: &'a str,
        stripe_id: &'a str,
    ) -> BoxFuture<'a, StateResult<()>>;
    fn set_sync_status<'a>(
        &'a self,
        invoice: &'a str,
        status: &'a str,
        error: Option<&'a str>,
    ) -> BoxFuture<'a, StateResult<()>>;
    // Quota settings (audited).
    /// Sets or clears (None) the customer's monthly spending cap.
    fn set_spending_cap<'a>(
        &'a self,
        customer: &'a str,
        cap: Option<Decimal>,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<()>>;
    fn set_suspended<'a>(
        &'a self,
        customer: &'a str,
        suspended: bool,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<()>>;
    /// (suspended, spending cap) of every customer.
    fn quota_settings(&self) -> BoxFuture<'_, StateResult<HashMap<String, QuotaSettings>>>;

    // API keys (audited).
    fn create_api_key<'a>(
        &'a self,
        key: &'a ApiKey,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<()>>;
    /// Every key, revoked ones included, newest first.
    fn api_keys(&self) -> BoxFuture<'_, StateResult<Vec<ApiKey>>>;
    fn revoke_api_key<'a>(
        &'a self,
        id: &'a str,
        actor: &'a str,
    ) -> BoxFuture<'a, StateResult<ApiKey>>;

    /// Sets the payment status of the invoice with this Stripe id; false
    /// when no invoice has it.
    fn set_payment_status<'a>(
        &'a self,
        stripe_invoice_id: &'a str,
        status: &'a str,
    ) -> BoxFuture<'a, StateResult<bool>>;

    /// Raises the alerts not raised before, due for delivery from `now`;
    /// returns those it raised.
    fn record_alerts<'a>(
        &'a self,
        alerts: &'a [NewAlert],
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, StateResult<Vec<NewAlert>>>;
    /// Claims up to `limit` pending alerts due at `now` for delivery: their
    /// next attempt moves to `now + lease`, so a replica that dies while
    /// sending leaves them to be retried after the lease, and two replicas
    /// never claim the same alert at once.
    fn claim_due_alerts(
        &self,
        now: DateTime<Utc>,
        lease: chrono::Duration,
        limit: u32,
    ) -> BoxFuture<'_, StateResult<Vec<Alert>>>;
    /// Records the end of one delivery attempt.
    fn settle_alert(&self, id: i64, outcome: AlertOutcome) -> BoxFuture<'_, StateResult<()>>;
    fn alerts_of<'a>(&'a self, customer: &'a str) -> BoxFuture<'a, StateResult<Vec<Alert>>>;
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
