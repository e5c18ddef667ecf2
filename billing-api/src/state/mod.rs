//! Billing state behind one interface: customers, published plan versions,
//! the plan history of each customer (subscription segments), seat changes,
//! invoices, API keys, quota settings, usage alerts and the append-only
//! audit log. One implementation (`sql.rs`, its SQL written once) runs on
//! two databases through a small [`dialect::Dialect`] each: PostgreSQL
//! (`postgres.rs`) for the distributed service and SQLite (`sqlite.rs`) for
//! the embedded mode; `tests/state_store.rs` runs every scenario against
//! both.
//!
//! Every admin change is written together with its audit entry in one
//! transaction (who, when, what, before and after).
//!
//! What does not touch SQL at all lives here:
//! turning rows into these types (`StateRow` abstracts each backend's
//! encodings of times, decimals and JSON), clipping plan segments and seat
//! intervals to a period, the audit entries (`AuditRecord`), and the
//! checks that decide between NotFound, Conflict and Invalid.

pub mod dialect;
pub mod postgres;
pub mod sql;
pub mod sqlite;

use crate::auth::ApiKey;
use billing_domain::catalog::PlanVersion;
use billing_domain::invoice::NewInvoice;
use billing_domain::rating::{Period, SeatInterval};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::future::Future;

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

impl From<RuleError> for StateError {
    fn from(e: RuleError) -> Self {
        match e {
            RuleError::NotFound(m) => StateError::NotFound(m),
            RuleError::Conflict(m) => StateError::Conflict(m),
            RuleError::Invalid(m) => StateError::Invalid(m),
        }
    }
}

pub type StateResult<T> = Result<T, StateError>;

/// (suspended, the customer's own spending cap).
pub type QuotaSettings = (bool, Option<Decimal>);

/// A raised alert and its delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Alert {
    pub id: i64,
    #[serde(flatten)]
    pub alert: NewAlert,
    pub created_at: DateTime<Utc>,
    pub status: AlertStatus,
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
    /// Inside the subscription's trial (fees waived).
    #[serde(default)]
    pub trial: bool,
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

pub use billing_domain::catalog::PublishedPlan;

pub use billing_domain::alert::{AlertKind, AlertStatus, NewAlert};
pub use billing_domain::credit::{Entry, EntryKind, Grant, GrantKind};
pub use billing_domain::invoice::{Invoice, PaymentStatus, SyncStatus};
pub use billing_domain::settle::{Applied, Coupon, TaxProfile, TaxRate};
pub use billing_domain::subscription::{
    anchor_for, check_can_subscribe, check_offered, check_plan_usable, reopen, retire_refused,
    trial_end, withdrawn_earlier, CancelWrites, Cancellation, NewSubscription, RuleError,
    Subscription, SwitchOutcome, SwitchWrites, WithdrawWrites,
};

/// Billing state: one implementation over both databases
/// (`sql::SqlState`). Behind a pointer it is [`DynStateStore`]
/// (`Arc<DynStateStore<'static>>` where `Arc<DynStateStore<'static>>` would be).
#[dynosaur::dynosaur(pub DynStateStore = dyn(box) StateStore)]
pub trait StateStore: Send + Sync {
    fn migrate(&self) -> impl Future<Output = StateResult<()>> + Send;
    /// Publishes a plan version; versions are immutable once published.
    fn publish_plan(
        &self,
        plan: &PlanVersion,
        actor: &str,
    ) -> impl Future<Output = StateResult<()>> + Send;
    fn plan_version(
        &self,
        plan: &str,
        version: u32,
    ) -> impl Future<Output = StateResult<PlanVersion>> + Send;
    fn create_customer(
        &self,
        c: &Customer,
        actor: &str,
    ) -> impl Future<Output = StateResult<()>> + Send;
    fn customer_by_external_id(
        &self,
        external_id: &str,
    ) -> impl Future<Output = StateResult<Customer>> + Send;
    /// Starts the first subscription of a customer, or a new one after a
    /// cancellation (`check_can_subscribe`), with the plan's trial when it
    /// is the customer's first subscription to that plan (`trial_days`
    /// overrides the plan's; `subscription::trial_end`). Returns the row.
    fn subscribe(
        &self,
        customer: &str,
        new: &NewSubscription,
        actor: &str,
    ) -> impl Future<Output = StateResult<Subscription>> + Send;
    /// Customers billed on an anchor day other than 1, with it.
    fn anchors(&self) -> impl Future<Output = StateResult<HashMap<String, u32>>> + Send;
    /// Cancels the subscription at `at`, in one transaction: changes
    /// scheduled at or after `at` are withdrawn and the plan in effect ends
    /// there (`subscription::CancelWrites`). Audited
    /// (`subscription.cancel`); a repeat changes nothing.
    fn cancel(
        &self,
        customer: &str,
        at: DateTime<Utc>,
        actor: &str,
    ) -> impl Future<Output = StateResult<Cancellation>> + Send;
    /// Withdraws a cancellation that has not taken effect at `now`: the
    /// plan runs on until changed. Audited (`subscription.uncancel`); a
    /// retry answers the same row; none scheduled is NotFound.
    fn withdraw_cancellation(
        &self,
        customer: &str,
        now: DateTime<Utc>,
        actor: &str,
    ) -> impl Future<Output = StateResult<Subscription>> + Send;
    /// Customers whose subscription ended (every row of the history has an
    /// end) inside `(period.start, period.end]`, with that end.
    fn cancellations(
        &self,
        period: Period,
    ) -> impl Future<Output = StateResult<HashMap<String, DateTime<Utc>>>> + Send;
    /// Switches to the plan at `at`, in one transaction: changes starting
    /// at or after `at` (scheduled switches) are withdrawn, the plan in
    /// effect at `at` ends there and the new plan runs from `at` until
    /// changed. A switch to the plan version already in effect at `at`
    /// adds no segment (so repeating a switch changes nothing) but still
    /// withdraws what was scheduled after it.
    fn switch_plan(
        &self,
        customer: &str,
        plan: &str,
        version: u32,
        at: DateTime<Utc>,
        actor: &str,
    ) -> impl Future<Output = StateResult<SwitchOutcome>> + Send;
    /// The customer's whole plan history, unclipped, in order.
    fn subscriptions(
        &self,
        customer: &str,
    ) -> impl Future<Output = StateResult<Vec<Subscription>>> + Send;
    /// Withdraws a scheduled change (a row of the history that starts after
    /// `now` and follows another): the plan before it runs on in its place.
    /// Audited. Withdrawing a change already withdrawn answers it again
    /// (safe to retry); one in effect already is a Conflict.
    fn withdraw_change(
        &self,
        customer: &str,
        id: i64,
        now: DateTime<Utc>,
        actor: &str,
    ) -> impl Future<Output = StateResult<Subscription>> + Send;
    /// Sets the seat count from `at` on.
    fn set_seats(
        &self,
        customer: &str,
        seats: u32,
        at: DateTime<Utc>,
        actor: &str,
    ) -> impl Future<Output = StateResult<()>> + Send;
    /// The customer's plan segments inside the period, in order.
    fn plan_segments(
        &self,
        customer: &str,
        period: Period,
    ) -> impl Future<Output = StateResult<Vec<PlanSegment>>> + Send;
    /// The customer's seat intervals inside the period, in order.
    fn seat_intervals(
        &self,
        customer: &str,
        period: Period,
    ) -> impl Future<Output = StateResult<Vec<SeatInterval>>> + Send;
    fn audit_log(&self, subject: &str)
        -> impl Future<Output = StateResult<Vec<AuditEntry>>> + Send;
    /// (id, subject) of the audit entries with ids above `after`, in id
    /// order, at most `limit`: what changed since, for replicas that keep
    /// state in memory.
    fn audit_after(
        &self,
        after: i64,
        limit: u32,
    ) -> impl Future<Output = StateResult<Vec<(i64, String)>>> + Send;
    /// The highest audit entry id (0 when there is none).
    fn audit_head(&self) -> impl Future<Output = StateResult<i64>> + Send;

    // Catalog administration.
    fn list_plans(&self) -> impl Future<Output = StateResult<Vec<PublishedPlan>>> + Send;
    fn retire_plan(
        &self,
        plan: &str,
        version: u32,
        actor: &str,
    ) -> impl Future<Output = StateResult<()>> + Send;

    // Customers and apps.
    fn customer(&self, id: &str) -> impl Future<Output = StateResult<Customer>> + Send;
    /// Customers ordered by id, after `after`, at most `limit`.
    fn list_customers(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> impl Future<Output = StateResult<Vec<Customer>>> + Send;
    fn create_app(&self, app: &App, actor: &str) -> impl Future<Output = StateResult<()>> + Send;
    fn apps(&self, customer: &str) -> impl Future<Output = StateResult<Vec<App>>> + Send;

    // Bulk reads for the finalization run.
    /// Plan segments of every customer inside the period.
    fn plan_segments_all(
        &self,
        period: Period,
    ) -> impl Future<Output = StateResult<HashMap<String, Vec<PlanSegment>>>> + Send;
    /// Seat intervals of every customer inside the period.
    fn seat_intervals_all(
        &self,
        period: Period,
    ) -> impl Future<Output = StateResult<HashMap<String, Vec<SeatInterval>>>> + Send;
    /// Start of the earliest subscription, if any.
    fn billing_start(&self) -> impl Future<Output = StateResult<Option<DateTime<Utc>>>> + Send;
    /// Opening invoices (fees in advance from where they start) issued for
    /// instants in `period`, by customer, in order.
    fn openings(
        &self,
        period: Period,
    ) -> impl Future<Output = StateResult<HashMap<String, Vec<Invoice>>>> + Send;
    /// Finalized period invoices (not opening ones) whose period starts at
    /// `start`, by customer.
    fn invoices_in_period(
        &self,
        start: DateTime<Utc>,
    ) -> impl Future<Output = StateResult<HashMap<String, Invoice>>> + Send;
    /// Invoices carried forward and not yet added to a later invoice, by
    /// customer (of one customer, or of all).
    fn open_carried(
        &self,
        customer: Option<&str>,
    ) -> impl Future<Output = StateResult<HashMap<String, Vec<Invoice>>>> + Send;

    // Invoices.
    /// Finalizes invoices in one transaction: numbers them from the gapless
    /// counter, marks the invoices they carry in, and skips (without using a
    /// number) any whose customer, period and kind already has an invoice.
    /// Returns the invoices written.
    fn insert_invoices(
        &self,
        new: Vec<NewInvoice>,
        finalized_at: DateTime<Utc>,
    ) -> impl Future<Output = StateResult<Vec<Invoice>>> + Send;
    fn invoice(&self, id: &str) -> impl Future<Output = StateResult<Invoice>> + Send;
    fn invoices_of(&self, customer: &str)
        -> impl Future<Output = StateResult<Vec<Invoice>>> + Send;
    /// Invoices waiting for Stripe, oldest first.
    fn pending_sync(&self, limit: u32) -> impl Future<Output = StateResult<Vec<Invoice>>> + Send;

    // Stripe mapping and status.
    fn stripe_customer(
        &self,
        customer: &str,
    ) -> impl Future<Output = StateResult<Option<String>>> + Send;
    fn set_stripe_customer(
        &self,
        customer: &str,
        stripe_id: &str,
    ) -> impl Future<Output = StateResult<()>> + Send;
    fn set_stripe_invoice(
        &self,
        invoice: &str,
        stripe_id: &str,
    ) -> impl Future<Output = StateResult<()>> + Send;
    fn set_sync_status(
        &self,
        invoice: &str,
        status: SyncStatus,
        error: Option<&str>,
    ) -> impl Future<Output = StateResult<()>> + Send;
    // Quota settings (audited).
    /// Sets or clears (None) the customer's monthly spending cap.
    fn set_spending_cap(
        &self,
        customer: &str,
        cap: Option<Decimal>,
        actor: &str,
    ) -> impl Future<Output = StateResult<()>> + Send;
    fn set_suspended(
        &self,
        customer: &str,
        suspended: bool,
        actor: &str,
    ) -> impl Future<Output = StateResult<()>> + Send;
    /// (suspended, spending cap) of every customer.
    fn quota_settings(
        &self,
    ) -> impl Future<Output = StateResult<HashMap<String, QuotaSettings>>> + Send;

    // API keys (audited).
    fn create_api_key(
        &self,
        key: &ApiKey,
        actor: &str,
    ) -> impl Future<Output = StateResult<()>> + Send;
    /// Every key, revoked ones included, newest first.
    fn api_keys(&self) -> impl Future<Output = StateResult<Vec<ApiKey>>> + Send;
    fn revoke_api_key(
        &self,
        id: &str,
        actor: &str,
    ) -> impl Future<Output = StateResult<ApiKey>> + Send;

    /// Sets the payment status of the invoice with this Stripe id; false
    /// when no invoice has it.
    fn set_payment_status(
        &self,
        stripe_invoice_id: &str,
        status: PaymentStatus,
    ) -> impl Future<Output = StateResult<bool>> + Send;

    /// Raises the alerts not raised before, due for delivery from `now`;
    /// returns those it raised.
    fn record_alerts(
        &self,
        alerts: &[NewAlert],
        now: DateTime<Utc>,
    ) -> impl Future<Output = StateResult<Vec<NewAlert>>> + Send;
    /// Claims up to `limit` pending alerts due at `now` for delivery: their
    /// next attempt moves to `now + lease`, so a replica that dies while
    /// sending leaves them to be retried after the lease, and two replicas
    /// never claim the same alert at once.
    fn claim_due_alerts(
        &self,
        now: DateTime<Utc>,
        lease: chrono::Duration,
        limit: u32,
    ) -> impl Future<Output = StateResult<Vec<Alert>>> + Send;
    /// Records the end of one delivery attempt.
    fn settle_alert(
        &self,
        id: i64,
        outcome: AlertOutcome,
    ) -> impl Future<Output = StateResult<()>> + Send;
    fn alerts_of(&self, customer: &str) -> impl Future<Output = StateResult<Vec<Alert>>> + Send;

    /// Records a credit grant and its ledger entry, audited. With an
    /// idempotency key already used by the customer: the first grant when
    /// the request is the same (`false`: nothing written), a conflict when
    /// it is not.
    fn grant_credit(
        &self,
        g: &NewGrant,
        actor: &str,
    ) -> impl Future<Output = StateResult<(Grant, bool)>> + Send;
    /// Voids the unused remainder of a grant (a `void` ledger entry),
    /// audited; a repeat answers the voided grant.
    fn void_grant(
        &self,
        customer: &str,
        grant: &str,
        actor: &str,
        at: DateTime<Utc>,
    ) -> impl Future<Output = StateResult<Grant>> + Send;
    /// Makes a purchased grant awaiting its top-up invoice usable (the
    /// invoice was paid), audited; a repeat answers the same.
    fn mark_grant_paid(
        &self,
        customer: &str,
        grant: &str,
        actor: &str,
    ) -> impl Future<Output = StateResult<Grant>> + Send;
    fn grants_of(&self, customer: &str) -> impl Future<Output = StateResult<Vec<Grant>>> + Send;
    /// The customer's ledger in order.
    fn ledger_of(&self, customer: &str) -> impl Future<Output = StateResult<Vec<Entry>>> + Send;
    /// Every customer's grants with a remaining balance, not voided.
    fn open_grants_all(
        &self,
    ) -> impl Future<Output = StateResult<HashMap<String, Vec<Grant>>>> + Send;
    /// Writes the expiry entry of every grant whose expiry is due at `now`
    /// (`credit::expiry_due`); returns how many.
    fn expire_grants(
        &self,
        now: DateTime<Utc>,
        grace: chrono::Duration,
    ) -> impl Future<Output = StateResult<u64>> + Send;

    /// Publishes the next version of a coupon (its `version` is assigned),
    /// audited.
    fn publish_coupon(
        &self,
        c: &Coupon,
        actor: &str,
    ) -> impl Future<Output = StateResult<Coupon>> + Send;
    /// Every version of every coupon, by id then version.
    fn coupons(&self) -> impl Future<Output = StateResult<Vec<Coupon>>> + Send;
    /// Applies the latest version of a coupon to a customer from `at`,
    /// audited; refused past its redemption limit.
    fn apply_coupon(
        &self,
        customer: &str,
        coupon: &str,
        at: DateTime<Utc>,
        actor: &str,
    ) -> impl Future<Output = StateResult<Applied>> + Send;
    /// Ends an applied coupon at `at`, audited; a repeat answers the same.
    fn remove_coupon(
        &self,
        customer: &str,
        applied: &str,
        at: DateTime<Utc>,
        actor: &str,
    ) -> impl Future<Output = StateResult<Applied>> + Send;
    fn coupons_of(&self, customer: &str) -> impl Future<Output = StateResult<Vec<Applied>>> + Send;
    /// Every customer's applied coupons not removed before `since`.
    fn applied_all(
        &self,
        since: DateTime<Utc>,
    ) -> impl Future<Output = StateResult<HashMap<String, Vec<Applied>>>> + Send;

    /// Creates a tax rate (immutable afterwards), audited.
    fn create_tax_rate(
        &self,
        r: &TaxRate,
        actor: &str,
    ) -> impl Future<Output = StateResult<()>> + Send;
    /// Archives a rate: no invoice uses it afterwards. Audited; a repeat
    /// answers the same.
    fn archive_tax_rate(
        &self,
        id: &str,
        actor: &str,
    ) -> impl Future<Output = StateResult<TaxRate>> + Send;
    fn tax_rates(&self) -> impl Future<Output = StateResult<Vec<TaxRate>>> + Send;
    /// Sets a customer's tax profile, audited.
    fn set_tax_profile(
        &self,
        customer: &str,
        p: &TaxProfile,
        actor: &str,
    ) -> impl Future<Output = StateResult<()>> + Send;
    fn tax_profile(
        &self,
        customer: &str,
    ) -> impl Future<Output = StateResult<Option<TaxProfile>>> + Send;
    fn tax_profiles_all(
        &self,
    ) -> impl Future<Output = StateResult<HashMap<String, TaxProfile>>> + Send;
}

/// A credit grant as requested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewGrant {
    pub customer_id: String,
    pub kind: GrantKind,
    pub currency: String,
    pub amount: Decimal,
    /// None: from when it is recorded. (The request as given is what an
    /// idempotency key stands for, so a repeat without it is the same.)
    pub effective_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub priority: u32,
    pub reason: String,
    /// A purchased grant invoiced on its own: usable once that invoice is
    /// paid.
    pub top_up: bool,
    pub idempotency_key: Option<String>,
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

// ----------------------------------------------------------------------------
// Shared by the implementations: everything that does not depend on the SQL
// dialect. Table and column names are the same in both schemas.

/// An invoice row's columns.
pub(crate) const INVOICE_COLUMNS: &str = "id, seq, number, customer_id, period_start, period_end, currency, subtotal, \
    adjustments_total, carried_in, total, body, finalized_at, sync_status, stripe_invoice_id, carried_to, \
    payment_status, sync_error, kind, discount_total, tax_total, credit_total, amount_due";

/// An API key row's columns.
pub(crate) const API_KEY_COLUMNS: &str =
    "id, role, customer_id, label, key_sha256, created_at, revoked_at";

/// A usage alert row's columns.
pub(crate) const ALERT_COLUMNS: &str =
    "id, customer_id, period_start, kind, subject, threshold, payload, \
    created_at, status, attempts, next_attempt_at, delivered_at, last_error";

/// Typed access to a stored row's columns. Each backend implements the
/// nullable accessors over its own encodings (PostgreSQL's native types;
/// SQLite's integer microseconds, decimal text and JSON text); the row →
/// struct conversions below are written once over them.
pub trait StateRow {
    fn opt_text(&self, col: &str) -> StateResult<Option<String>>;
    /// An `INT` column (versions, seats, thresholds, attempts).
    fn opt_int(&self, col: &str) -> StateResult<Option<i64>>;
    /// A `BIGINT` column (ids, invoice sequence numbers).
    fn opt_bigint(&self, col: &str) -> StateResult<Option<i64>>;
    fn opt_flag(&self, col: &str) -> StateResult<Option<bool>>;
    fn opt_time(&self, col: &str) -> StateResult<Option<DateTime<Utc>>>;
    fn opt_decimal(&self, col: &str) -> StateResult<Option<Decimal>>;
    fn opt_json(&self, col: &str) -> StateResult<Option<serde_json::Value>>;

    fn text(&self, col: &str) -> StateResult<String> {
        required(col, self.opt_text(col)?)
    }
    fn int(&self, col: &str) -> StateResult<i64> {
        required(col, self.opt_int(col)?)
    }
    fn bigint(&self, col: &str) -> StateResult<i64> {
        required(col, self.opt_bigint(col)?)
    }
    fn flag(&self, col: &str) -> StateResult<bool> {
        required(col, self.opt_flag(col)?)
    }
    fn time(&self, col: &str) -> StateResult<DateTime<Utc>> {
        required(col, self.opt_time(col)?)
    }
    fn decimal(&self, col: &str) -> StateResult<Decimal> {
        required(col, self.opt_decimal(col)?)
    }
    fn json(&self, col: &str) -> StateResult<serde_json::Value> {
        required(col, self.opt_json(col)?)
    }
}

fn required<T>(col: &str, v: Option<T>) -> StateResult<T> {
    v.ok_or_else(|| StateError::Invalid(format!("stored {col} is NULL")))
}

pub(crate) fn invoice_from(r: &impl StateRow) -> StateResult<Invoice> {
    Ok(Invoice {
        id: r.text("id")?,
        kind: r
            .text("kind")?
            .parse()
            .map_err(|e| StateError::Invalid(format!("stored invoice: {e}")))?,
        seq: r.bigint("seq")?,
        number: r.text("number")?,
        customer_id: r.text("customer_id")?,
        period: Period {
            start: r.time("period_start")?,
            end: r.time("period_end")?,
        },
        currency: r.text("currency")?,
        subtotal: r.decimal("subtotal")?,
        adjustments_total: r.decimal("adjustments_total")?,
        discount_total: r.decimal("discount_total")?,
        tax_total: r.decimal("tax_total")?,
        carried_in: r.decimal("carried_in")?,
        total: r.decimal("total")?,
        credit_total: r.decimal("credit_total")?,
        amount_due: r.decimal("amount_due")?,
        body: serde_json::from_value(r.json("body")?)
            .map_err(|e| StateError::Invalid(format!("stored invoice body: {e}")))?,
        finalized_at: r.time("finalized_at")?,
        sync_status: r
            .text("sync_status")?
            .parse()
            .map_err(|e| StateError::Invalid(format!("stored invoice: {e}")))?,
        stripe_invoice_id: r.opt_text("stripe_invoice_id")?,
        carried_to: r.opt_text("carried_to")?,
        payment_status: r
            .text("payment_status")?
            .parse()
            .map_err(|e| StateError::Invalid(format!("stored invoice: {e}")))?,
        sync_error: r.opt_text("sync_error")?,
    })
}

pub(crate) fn api_key_from(r: &impl StateRow) -> StateResult<ApiKey> {
    let role = r.text("role")?;
    Ok(ApiKey {
        id: r.text("id")?,
        role: crate::auth::Role::parse(&role)
            .ok_or_else(|| StateError::Invalid(format!("stored role {role}")))?,
        customer_id: r.opt_text("customer_id")?,
        label: r.text("label")?,
        key_sha256: r.text("key_sha256")?,
        created_at: r.time("created_at")?,
        revoked_at: r.opt_time("revoked_at")?,
    })
}

pub(crate) fn customer_from(r: &impl StateRow) -> StateResult<Customer> {
    Ok(Customer {
        id: r.text("id")?,
        external_id: r.text("external_id")?,
        name: r.text("name")?,
    })
}

pub(crate) fn app_from(r: &impl StateRow) -> StateResult<App> {
    Ok(App {
        customer_id: r.text("customer_id")?,
        app: r.text("app")?,
        name: r.text("name")?,
    })
}

pub(crate) fn audit_entry_from(r: &impl StateRow) -> StateResult<AuditEntry> {
    Ok(AuditEntry {
        id: r.bigint("id")?,
        at: r.time("at")?,
        actor: r.text("actor")?,
        action: r.text("action")?,
        subject: r.text("subject")?,
        before: r.opt_json("before")?,
        after: r.opt_json("after")?,
    })
}

pub(crate) fn alert_from(r: &impl StateRow) -> StateResult<Alert> {
    Ok(Alert {
        id: r.bigint("id")?,
        alert: NewAlert {
            customer_id: r.text("customer_id")?,
            period_start: r.time("period_start")?,
            kind: r
                .text("kind")?
                .parse()
                .map_err(|e| StateError::Invalid(format!("stored alert: {e}")))?,
            subject: r.text("subject")?,
            threshold: r.int("threshold")? as u32,
            payload: r.json("payload")?,
        },
        created_at: r.time("created_at")?,
        status: r
            .text("status")?
            .parse()
            .map_err(|e| StateError::Invalid(format!("stored alert: {e}")))?,
        attempts: r.int("attempts")? as u32,
        next_attempt_at: r.time("next_attempt_at")?,
        delivered_at: r.opt_time("delivered_at")?,
        last_error: r.opt_text("last_error")?,
    })
}

/// A stored plan version's body (column `body`).
pub(crate) fn plan_from(r: &impl StateRow, plan: &str, version: u32) -> StateResult<PlanVersion> {
    serde_json::from_value(r.json("body")?)
        .map_err(|e| StateError::Invalid(format!("stored plan {plan} v{version}: {e}")))
}

/// A row of `body` and `retired`.
pub(crate) fn published_plan_from(r: &impl StateRow) -> StateResult<PublishedPlan> {
    Ok(PublishedPlan {
        plan: serde_json::from_value(r.json("body")?)
            .map_err(|e| StateError::Invalid(format!("stored plan: {e}")))?,
        retired: r.flag("retired")?,
    })
}

/// Rows of `customer_id` and [`SUBSCRIPTION_COLUMNS`] (ordered by
/// customer and start) as plan segments clipped to the period, a row's
/// trial apart from the rest of it.
pub(crate) fn segments_from<R: StateRow>(
    rows: &[R],
    period: Period,
) -> StateResult<HashMap<String, Vec<PlanSegment>>> {
    let mut out: HashMap<String, Vec<PlanSegment>> = HashMap::new();
    for r in rows {
        let sub = subscription_from(r)?;
        for (s, e, trial) in sub.spans() {
            if let Some((start, end)) = clip([(s, e)], period).pop() {
                out.entry(r.text("customer_id")?)
                    .or_default()
                    .push(PlanSegment {
                        plan: sub.plan.clone(),
                        version: sub.version,
                        start,
                        end,
                        trial,
                    });
            }
        }
    }
    Ok(out)
}

/// Rows of `customer_id, effective_at, seats` (every change before the
/// period's end, ordered by customer and time) as seat intervals clipped to
/// the period; zero-seat intervals are left out.
pub(crate) fn seats_from<R: StateRow>(
    rows: &[R],
    period: Period,
) -> StateResult<HashMap<String, Vec<SeatInterval>>> {
    let mut changes: HashMap<String, Vec<(DateTime<Utc>, u32)>> = HashMap::new();
    for r in rows {
        changes
            .entry(r.text("customer_id")?)
            .or_default()
            .push((r.time("effective_at")?, r.int("seats")? as u32));
    }
    let mut out = HashMap::new();
    for (c, changes) in changes {
        let mut ivs = Vec::new();
        for (i, (at, seats)) in changes.iter().enumerate() {
            let until = changes.get(i + 1).map(|c| c.0);
            if let Some((start, end)) = clip([(*at, until)], period).pop() {
                if *seats > 0 {
                    ivs.push(SeatInterval {
                        start,
                        end,
                        seats: *seats,
                    });
                }
            }
        }
        out.insert(c, ivs);
    }
    Ok(out)
}

/// Invoices grouped by customer, in the order given.
pub(crate) fn by_customer(invoices: Vec<Invoice>) -> HashMap<String, Vec<Invoice>> {
    let mut out: HashMap<String, Vec<Invoice>> = HashMap::new();
    for i in invoices {
        out.entry(i.customer_id.clone()).or_default().push(i);
    }
    out
}

/// A unique violation is a Conflict, a foreign key violation a NotFound,
/// anything else a database error.
pub(crate) fn conflict_or(e: sqlx::Error, what: impl Into<String>) -> StateError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StateError::Conflict(what.into()),
        sqlx::Error::Database(d) if d.is_foreign_key_violation() => {
            StateError::NotFound(what.into())
        }
        _ => StateError::Db(e),
    }
}

pub(crate) fn customer_not_found(customer: &str) -> StateError {
    StateError::NotFound(format!("customer {customer}"))
}

/// The columns a [`Subscription`] is read from.
pub(crate) const SUBSCRIPTION_COLUMNS: &str =
    "id, plan, version, starts_at, ends_at, trial_ends_at, anchor_day";

/// From a row of [`SUBSCRIPTION_COLUMNS`].
pub(crate) fn subscription_from(r: &impl StateRow) -> StateResult<Subscription> {
    Ok(Subscription {
        id: r.bigint("id")?,
        plan: r.text("plan")?,
        version: r.int("version")? as u32,
        start: r.time("starts_at")?,
        end: r.opt_time("ends_at")?,
        trial_end: r.opt_time("trial_ends_at")?,
        anchor_day: r.int("anchor_day")? as u32,
    })
}

pub(crate) const WITHDRAW_ACTION: &str = "subscription.withdraw";
pub(crate) const UNCANCEL_ACTION: &str = "subscription.uncancel";

/// Seat counts are stored as `INT`.
pub(crate) fn seats_value(seats: u32) -> StateResult<i32> {
    i32::try_from(seats).map_err(|_| StateError::Invalid("seats out of range".into()))
}

/// The ids of the invoices a new invoice carries in.
pub(crate) fn carried_ids(n: &NewInvoice) -> Vec<String> {
    n.body
        .carried
        .iter()
        .map(|c| c.invoice_id.clone())
        .collect()
}

/// Marking carried invoices must move every one of them, once.
pub(crate) fn check_carried_moved(n: &NewInvoice, moved: u64, carried: usize) -> StateResult<()> {
    if moved as usize != carried {
        return Err(StateError::Conflict(format!(
            "invoices carried into {} changed during finalization; retry",
            n.id
        )));
    }
    Ok(())
}

/// An audit entry, written in the transaction of the change it records.
pub(crate) struct AuditRecord {
    pub action: &'static str,
    pub subject: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

impl AuditRecord {
    pub(crate) fn plan_publish(plan: &PlanVersion, body: serde_json::Value) -> Self {
        Self {
            action: "plan.publish",
            subject: format!("plan:{}", plan.plan),
            before: None,
            after: Some(body),
        }
    }

    /// A contract published for `customer`, on the customer's own record.
    pub(crate) fn contract_publish(customer: &str, plan: &PlanVersion) -> Self {
        Self {
            action: "contract.publish",
            subject: format!("customer:{customer}"),
            before: None,
            after: Some(serde_json::json!({"plan": plan.plan, "version": plan.version})),
        }
    }

    pub(crate) fn plan_retire(plan: &str, version: u32) -> Self {
        Self {
            action: "plan.retire",
            subject: format!("plan:{plan}"),
            before: Some(serde_json::json!({"version": version, "retired": false})),
            after: Some(serde_json::json!({"version": version, "retired": true})),
        }
    }

    pub(crate) fn customer_create(c: &Customer) -> Self {
        Self {
            action: "customer.create",
            subject: format!("customer:{}", c.id),
            before: None,
            after: serde_json::to_value(c).ok(),
        }
    }

    pub(crate) fn subscription_start(customer: &str, row: &Subscription) -> Self {
        Self {
            action: "subscription.start",
            subject: format!("customer:{customer}"),
            before: None,
            after: Some({
                let mut after = serde_json::json!({"plan": row.plan, "version": row.version, "starts_at": row.start});
                if let Some(t) = row.trial_end {
                    after["trial_ends_at"] = serde_json::json!(t);
                }
                after
            }),
        }
    }

    pub(crate) fn subscription_cancel(
        customer: &str,
        cut: &Subscription,
        at: DateTime<Utc>,
    ) -> Self {
        Self {
            action: "subscription.cancel",
            subject: format!("customer:{customer}"),
            before: serde_json::to_value(cut).ok(),
            after: Some(
                serde_json::json!({"plan": cut.plan, "version": cut.version, "cancelled_at": at}),
            ),
        }
    }

    pub(crate) fn subscription_uncancel(customer: &str, row: &Subscription) -> Self {
        Self {
            action: UNCANCEL_ACTION,
            subject: format!("customer:{customer}"),
            before: serde_json::to_value(row).ok(),
            after: Some(
                serde_json::json!({"plan": row.plan, "version": row.version, "ends_at": null}),
            ),
        }
    }

    pub(crate) fn subscription_switch(
        customer: &str,
        old: &Subscription,
        plan: &str,
        version: u32,
        at: DateTime<Utc>,
    ) -> Self {
        Self {
            action: "subscription.switch",
            subject: format!("customer:{customer}"),
            before: Some(serde_json::json!({"plan": old.plan, "version": old.version})),
            after: Some(serde_json::json!({"plan": plan, "version": version, "effective_at": at})),
        }
    }

    /// A scheduled change withdrawn, `by` a switch that replaced it or by a
    /// withdrawal; `before` is the change as it was.
    pub(crate) fn subscription_withdraw(customer: &str, change: &Subscription, by: &str) -> Self {
        Self {
            action: WITHDRAW_ACTION,
            subject: format!("customer:{customer}"),
            before: serde_json::to_value(change).ok(),
            after: Some(serde_json::json!({ "withdrawn": true, "by": by })),
        }
    }

    /// `before`: the seats in force at `at`, if any.
    pub(crate) fn seats_set(
        customer: &str,
        before: Option<i64>,
        seats: u32,
        at: DateTime<Utc>,
    ) -> Self {
        Self {
            action: "seats.set",
            subject: format!("customer:{customer}"),
            before: before.map(|s| serde_json::json!({ "seats": s })),
            after: Some(serde_json::json!({"seats": seats, "effective_at": at})),
        }
    }

    pub(crate) fn app_create(app: &App) -> Self {
        Self {
            action: "app.create",
            subject: format!("customer:{}", app.customer_id),
            before: None,
            after: serde_json::to_value(app).ok(),
        }
    }

    pub(crate) fn key_create(key: &ApiKey) -> Self {
        Self {
            action: "key.create",
            subject: format!("key:{}", key.id),
            before: None,
            after: serde_json::to_value(key).ok(),
        }
    }

    pub(crate) fn key_revoke(key: &ApiKey) -> Self {
        Self {
            action: "key.revoke",
            subject: format!("key:{}", key.id),
            before: Some(serde_json::json!({"revoked": false})),
            after: Some(serde_json::json!({"revoked": true, "role": key.role})),
        }
    }

    pub(crate) fn spending_cap_set(
        customer: &str,
        before: Option<Decimal>,
        cap: Option<Decimal>,
    ) -> Self {
        Self {
            action: "spending_cap.set",
            subject: format!("customer:{customer}"),
            before: Some(serde_json::json!({ "spending_cap": before })),
            after: Some(serde_json::json!({ "spending_cap": cap })),
        }
    }

    pub(crate) fn suspended_set(customer: &str, before: bool, suspended: bool) -> Self {
        Self {
            action: if suspended {
                "account.suspend"
            } else {
                "account.resume"
            },
            subject: format!("customer:{customer}"),
            before: Some(serde_json::json!({ "suspended": before })),
            after: Some(serde_json::json!({ "suspended": suspended })),
        }
    }
}
