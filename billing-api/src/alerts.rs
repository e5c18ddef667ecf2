//! Usage alerts: when a customer's month-to-date usage passes a threshold
//! (50, 80 and 100 % by default, `--alert-thresholds`) of its spending cap
//! or of an allowance its plan includes, an alert is raised once for the
//! period and delivered as a signed webhook to the configured URL.
//!
//! - **What is measured**: from the quota state (usage through the last
//!   complete hour, refreshed every `--quota-refresh-secs`), right after
//!   each refresh. The cap is the customer's own, else the plan's default;
//!   a cap of 0 (the free tier) raises nothing, since any usage would be
//!   100 % of it. Cost is the month-to-date usage cost before the plan's
//!   maximum (what the cap check compares). Allowances are a price's
//!   free units as rating frees them (`rating::free_units`): its
//!   `allowance_per_seat` (× the seats held while the plan in force now has
//!   been in force) or a zero-priced first tier (the free tier's 750
//!   instance-hours); usage is that price's matching quantity in price
//!   units since the plan in force now started (after a mid-period switch,
//!   the new plan's allowance counts the new plan's usage, as the invoice
//!   does).
//! - **Once per period**: the alert is a row keyed by (customer, period,
//!   kind, subject, threshold); a second evaluation, or another replica,
//!   inserts nothing. Crossing 80 % and 100 % in one refresh raises both.
//! - **Delivery**: an outbox. A sender claims due rows with a lease (60 s),
//!   POSTs the payload with `Tally-Signature: t=<unix>,v1=<hex HMAC-SHA256
//!   of "<t>.<body>">` (Stripe's scheme: `webhook::verify` checks it) and
//!   `Tally-Alert-Id`, and on anything but a 2xx retries with exponential
//!   backoff (10 s doubling to at most 1 h) up to 12 attempts, then marks
//!   the alert `failed`. Delivery is at least once (a lost response is
//!   sent again): receivers deduplicate on `Tally-Alert-Id`.
//! - Without `--alert-webhook-url` nothing is evaluated or sent.
//!
//! The rules (what is crossed, thresholds, back-off) are
//! `billing_domain::alert`; this module records, schedules and sends.

use crate::metrics::Metrics;
use crate::quota_service::QuotaService;
use crate::state::{Alert, AlertKind, AlertOutcome, DynStateStore, NewAlert, StateStore};
pub use billing_domain::alert::{evaluate, parse_thresholds, retry_delay};
use billing_domain::webhook;
use chrono::{DateTime, Duration, Utc};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Where and how alerts go.
#[derive(Debug, Clone)]
pub struct AlertConfig {
    pub url: String,
    pub secret: serving::Secret,
    /// Percentages, ascending.
    pub thresholds: Vec<u32>,
    pub max_attempts: u32,
    /// Wait after the first failure; doubles after each, up to an hour.
    pub first_retry: Duration,
}

impl AlertConfig {
    pub const DEFAULT_THRESHOLDS: [u32; 3] = [50, 80, 100];

    pub fn new(url: String, secret: impl Into<serving::Secret>, thresholds: Vec<u32>) -> Self {
        Self {
            url,
            secret: secret.into(),
            thresholds,
            max_attempts: 12,
            first_retry: Duration::seconds(10),
        }
    }

    /// When to try again after `attempts` failed attempts.
    pub fn retry_at(&self, now: DateTime<Utc>, attempts: u32) -> DateTime<Utc> {
        now + retry_delay(self.first_retry, attempts)
    }
}

/// (customer, period start, kind, subject, threshold): what makes an alert once-only.
type AlertKey = (String, DateTime<Utc>, AlertKind, String, u32);

fn key(a: &NewAlert) -> AlertKey {
    (
        a.customer_id.clone(),
        a.period_start,
        a.kind,
        a.subject.clone(),
        a.threshold,
    )
}

/// Raises alerts after each quota refresh. The state store makes each alert
/// once-only across replicas; this remembers what this process already
/// recorded, so a refresh writes only alerts that are new (not every
/// crossed threshold of every customer again, each minute).
pub struct AlertRaiser {
    pub config: AlertConfig,
    recorded: Mutex<HashSet<AlertKey>>,
}

impl AlertRaiser {
    pub fn new(config: AlertConfig) -> Self {
        Self {
            config,
            recorded: Mutex::new(HashSet::new()),
        }
    }

    /// Evaluates every customer in the quota state and records what is
    /// new, due for delivery from `now`; returns the alerts raised.
    pub async fn raise(
        &self,
        quota: &QuotaService,
        state: &(impl StateStore + ?Sized),
        metrics: &Metrics,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Vec<NewAlert>> {
        self.raise_for(quota.entries(), state, metrics, now).await
    }

    /// [`Self::raise`] for these entries only (those changed since the
    /// last evaluation, when the quota state follows usage).
    pub async fn raise_for(
        &self,
        entries: Vec<(String, std::sync::Arc<crate::quota_service::Entry>)>,
        state: &(impl StateStore + ?Sized),
        metrics: &Metrics,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Vec<NewAlert>> {
        let mut fresh = Vec::new();
        {
            let mut recorded = self.recorded.lock().unwrap();
            let mut oldest: Option<DateTime<Utc>> = None;
            for (c, e) in entries {
                oldest = Some(oldest.map_or(e.period.start, |o| o.min(e.period.start)));
                for a in evaluate(&c, &e.input(), &self.config.thresholds)? {
                    if !recorded.contains(&key(&a)) {
                        fresh.push(a);
                    }
                }
            }
            // Keys of past periods can never come back.
            if let Some(oldest) = oldest {
                recorded.retain(|k| k.1 >= oldest);
            }
        }
        if fresh.is_empty() {
            return Ok(fresh);
        }
        let raised = state.record_alerts(&fresh, now).await?;
        self.recorded.lock().unwrap().extend(fresh.iter().map(key));
        for a in &raised {
            metrics
                .alerts_raised
                .with_label_values(&[a.kind.as_str()])
                .inc();
            tracing::info!(customer = %a.customer_id, kind = %a.kind, subject = %a.subject, threshold = a.threshold, "usage alert raised");
        }
        Ok(raised)
    }
}

/// Delivers raised alerts.
pub struct AlertSender {
    pub state: Arc<DynStateStore<'static>>,
    pub config: AlertConfig,
    pub metrics: Metrics,
    pub http: reqwest::Client,
}

/// The `Tally-Signature` header for `body` at unix time `t`.
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    format!("t={t},v1={}", webhook::sign(secret, t, body))
}

impl AlertSender {
    pub fn new(state: Arc<DynStateStore<'static>>, config: AlertConfig, metrics: Metrics) -> Self {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .expect("HTTP client");
        Self {
            state,
            config,
            metrics,
            http,
        }
    }

    async fn send(&self, a: &Alert, now: DateTime<Utc>) -> Result<(), String> {
        let body = serde_json::to_vec(&a.alert.payload).map_err(|e| e.to_string())?;
        let resp = self
            .http
            .post(&self.config.url)
            .header("content-type", "application/json")
            .header("tally-alert-id", a.id.to_string())
            .header(
                "tally-signature",
                signature(self.config.secret.expose(), now.timestamp(), &body),
            )
            .body(body)
            .send()
            .await
            .map_err(|e| format!("transport: {e}"))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", resp.status().as_u16()))
        }
    }

    /// Sends the alerts due at `now`; returns how many were delivered.
    pub async fn run_once(&self, now: DateTime<Utc>) -> anyhow::Result<usize> {
        let due = self
            .state
            .claim_due_alerts(now, Duration::seconds(60), 100)
            .await?;
        let mut delivered = 0;
        for a in due {
            let outcome = match self.send(&a, now).await {
                Ok(()) => {
                    delivered += 1;
                    AlertOutcome::Delivered
                }
                Err(error) if a.attempts + 1 >= self.config.max_attempts => {
                    tracing::error!(alert = a.id, customer = %a.alert.customer_id, %error, "usage alert not delivered; giving up");
                    AlertOutcome::GaveUp { error }
                }
                Err(error) => {
                    tracing::warn!(alert = a.id, %error, "usage alert delivery failed; will retry");
                    AlertOutcome::Retry {
                        at: self.config.retry_at(now, a.attempts + 1),
                        error,
                    }
                }
            };
            let label = match outcome {
                AlertOutcome::Delivered => "delivered",
                AlertOutcome::Retry { .. } => "retry",
                AlertOutcome::GaveUp { .. } => "gave_up",
            };
            self.metrics
                .alert_deliveries
                .with_label_values(&[label])
                .inc();
            self.state.settle_alert(a.id, outcome).await?;
        }
        Ok(delivered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_and_backoff() {
        assert_eq!(
            parse_thresholds("100, 50,80,50").unwrap(),
            vec![50, 80, 100]
        );
        assert!(parse_thresholds("50,x").unwrap_err().contains("\"x\""));
        assert!(parse_thresholds("0").is_err());
        let c = AlertConfig::new("http://x".into(), "s", vec![50]);
        let t0 = Utc::now();
        assert_eq!(c.retry_at(t0, 1), t0 + Duration::seconds(10));
        assert_eq!(c.retry_at(t0, 3), t0 + Duration::seconds(40));
        assert_eq!(c.retry_at(t0, 11), t0 + Duration::hours(1));
    }
}
