//! Billing metrics. Naming: `tally_billing_<what>_<unit>`, `_total` for
//! counters; labels from bounded sets (Stripe operations, error kinds,
//! webhook event types).

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

/// Stripe operations, the values of the `operation` label.
pub const STRIPE_OPERATIONS: &[&str] = &[
    "create_customer",
    "create_invoice",
    "create_invoice_item",
    "finalize_invoice",
    "retrieve_invoice",
    "list_lines",
];
/// Kinds of failed Stripe attempts, the values of the `kind` label.
pub const STRIPE_ERROR_KINDS: &[&str] =
    &["rate_limited", "conflict", "server", "transport", "client"];
/// Webhook event types counted by name (others count as `other`; a bad
/// signature as `unknown`) and outcomes.
pub const WEBHOOK_TYPES: &[&str] = &[
    "invoice.paid",
    "invoice.payment_failed",
    "invoice.voided",
    "other",
    "unknown",
];
pub const WEBHOOK_OUTCOMES: &[&str] = &["applied", "ignored", "bad_signature"];

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub invoices_drafted: IntCounter,
    pub invoices_finalized: IntCounter,
    pub unbilled_events: IntCounter,
    pub invoices_synced: IntCounter,
    pub invoices_sync_failed: IntCounter,
    pub stripe_request_duration: HistogramVec,
    pub stripe_errors: IntCounterVec,
    pub rating_seconds: Histogram,
    pub webhooks: IntCounterVec,
    pub quota_decisions: IntCounterVec,
    pub quota_check_duration: Histogram,
    pub alerts_raised: IntCounterVec,
    pub alert_deliveries: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let counter = |name: &str, help: &str| IntCounter::new(name, help).unwrap();
        let m = Self {
            registry: Registry::new(),
            invoices_drafted: counter(
                "tally_billing_invoices_drafted_total",
                "Draft invoices computed (estimates of open periods)",
            ),
            invoices_finalized: counter(
                "tally_billing_invoices_finalized_total",
                "Invoices finalized and numbered",
            ),
            unbilled_events: counter(
                "tally_billing_unbilled_usage_events_total",
                "Events timed where the customer had no subscription (after a cancellation), reported on its final invoice and not billed",
            ),
            invoices_synced: counter(
                "tally_billing_invoices_synced_total",
                "Invoices created and finalized in Stripe",
            ),
            invoices_sync_failed: counter(
                "tally_billing_invoices_sync_failed_total",
                "Invoice syncs that failed (retried on the next run unless marked failed)",
            ),
            stripe_request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "tally_billing_stripe_request_duration_seconds",
                    "Duration of one Stripe API call, retries included, by operation",
                )
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                &["operation"],
            )
            .unwrap(),
            stripe_errors: IntCounterVec::new(
                Opts::new(
                    "tally_billing_stripe_errors_total",
                    "Failed Stripe API attempts, by operation and kind (rate_limited, server, client, transport)",
                ),
                &["operation", "kind"],
            )
            .unwrap(),
            rating_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "tally_billing_rating_duration_seconds",
                    "Time to rate one customer's period (usage already fetched)",
                )
                .buckets(vec![0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5]),
            )
            .unwrap(),
            webhooks: IntCounterVec::new(
                Opts::new(
                    "tally_billing_webhooks_total",
                    "Stripe webhooks received, by event type and outcome",
                ),
                &["type", "outcome"],
            )
            .unwrap(),
            quota_decisions: IntCounterVec::new(
                Opts::new(
                    "tally_billing_quota_decisions_total",
                    "Quota checks answered, by decision (allow, deny) and reason",
                ),
                &["decision", "reason"],
            )
            .unwrap(),
            quota_check_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "tally_billing_quota_check_duration_seconds",
                    "Server-side time to decide one quota check (from memory)",
                )
                .buckets(vec![0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01]),
            )
            .unwrap(),
            alerts_raised: IntCounterVec::new(
                Opts::new(
                    "tally_billing_alerts_raised_total",
                    "Usage alerts raised (once per customer, period, subject and threshold), by kind",
                ),
                &["kind"],
            )
            .unwrap(),
            alert_deliveries: IntCounterVec::new(
                Opts::new(
                    "tally_billing_alert_deliveries_total",
                    "Usage alert webhook attempts, by outcome (delivered, retry, gave_up)",
                ),
                &["outcome"],
            )
            .unwrap(),
        };
        let r = &m.registry;
        r.register(Box::new(m.invoices_drafted.clone())).unwrap();
        r.register(Box::new(m.invoices_finalized.clone())).unwrap();
        r.register(Box::new(m.invoices_synced.clone())).unwrap();
        r.register(Box::new(m.unbilled_events.clone())).unwrap();
        r.register(Box::new(m.invoices_sync_failed.clone()))
            .unwrap();
        r.register(Box::new(m.stripe_request_duration.clone()))
            .unwrap();
        r.register(Box::new(m.stripe_errors.clone())).unwrap();
        r.register(Box::new(m.rating_seconds.clone())).unwrap();
        r.register(Box::new(m.webhooks.clone())).unwrap();
        r.register(Box::new(m.quota_decisions.clone())).unwrap();
        r.register(Box::new(m.alerts_raised.clone())).unwrap();
        r.register(Box::new(m.alert_deliveries.clone())).unwrap();
        for kind in billing_domain::alert::AlertKind::ALL {
            m.alerts_raised.with_label_values(&[kind.as_str()]);
        }
        for outcome in ["delivered", "retry", "gave_up"] {
            m.alert_deliveries.with_label_values(&[outcome]);
        }
        r.register(Box::new(m.quota_check_duration.clone()))
            .unwrap();
        // Labels: `allow`/`none`, and `deny` with each reason's code.
        m.quota_decisions.with_label_values(&["allow", "none"]);
        for reason in billing_domain::quota::Reason::ALL {
            m.quota_decisions
                .with_label_values(&["deny", reason.as_str()]);
        }
        // Every label combination exists from the start (at zero), so
        // dashboards and alerts see a series before the first event.
        for op in STRIPE_OPERATIONS {
            m.stripe_request_duration.with_label_values(&[op]);
            for kind in STRIPE_ERROR_KINDS {
                m.stripe_errors.with_label_values(&[op, kind]);
            }
        }
        for t in WEBHOOK_TYPES {
            for o in WEBHOOK_OUTCOMES {
                m.webhooks.with_label_values(&[t, o]);
            }
        }
        m
    }

    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("utf-8")
    }
}
