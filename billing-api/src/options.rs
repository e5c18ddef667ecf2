//! Command-line options of the billing service, shared by the distributed
//! binary (`billing-api serve`) and the embedded one (`tally serve`), so
//! both read the same flags and environment variables the same way.

use crate::alerts::{parse_thresholds, AlertConfig};
use crate::finalize::FinalizeConfig;
use crate::stripe_sync::StripeConfig;
use billing_domain::catalog::Catalog;
use clap::Args;
use rust_decimal::Decimal;
use schemas::MeterCatalog;
use serving::Secret;
use std::path::PathBuf;
use std::time::Duration;

/// Catalogs, finalization and Stripe: what every billing command needs.
#[derive(Args, Clone, Debug)]
pub struct BillingOptions {
    /// Meter catalog (JSON); the built-in one when absent.
    #[arg(long, env = "TALLY_METERS_FILE")]
    pub meters_file: Option<PathBuf>,
    /// Pricing catalog (JSON) published at start; the built-in default when absent.
    #[arg(long, env = "TALLY_CATALOG_FILE")]
    pub catalog_file: Option<PathBuf>,
    /// Grace window after a period's end before its invoices are finalized.
    #[arg(long, env = "TALLY_GRACE_SECS", default_value_t = 3600)]
    pub grace_secs: u64,
    /// Invoices written per transaction by a finalization run.
    #[arg(long, env = "TALLY_FINALIZE_BATCH", default_value_t = 500)]
    pub finalize_batch: usize,
    /// Smallest invoice total sent to Stripe; smaller totals are carried forward.
    #[arg(long, env = "TALLY_MIN_CHARGE", default_value = "0.50")]
    pub min_charge: Decimal,
    /// Stripe secret key; Stripe sync is off without one.
    #[arg(long, env = "STRIPE_SECRET_KEY", hide_env_values = true)]
    pub stripe_secret_key: Option<Secret>,
    #[arg(
        long,
        env = "TALLY_STRIPE_API_BASE",
        default_value = "https://api.stripe.com/"
    )]
    pub stripe_api_base: String,
}

impl BillingOptions {
    pub fn meters(&self) -> anyhow::Result<MeterCatalog> {
        MeterCatalog::load(self.meters_file.as_deref())
            .map_err(|e| anyhow::anyhow!("--meters-file {e}"))
    }

    pub fn catalog(&self) -> anyhow::Result<Catalog> {
        match &self.catalog_file {
            Some(p) => Catalog::from_json(&std::fs::read_to_string(p)?)
                .map_err(|e| anyhow::anyhow!("--catalog-file {}: {e}", p.display())),
            None => Ok(Catalog::default_catalog()),
        }
    }

    pub fn finalize_config(&self) -> anyhow::Result<FinalizeConfig> {
        anyhow::ensure!(
            self.min_charge >= Decimal::ZERO,
            "--min-charge must not be negative"
        );
        Ok(FinalizeConfig {
            grace: Duration::from_secs(self.grace_secs),
            min_charge: self.min_charge,
            batch: self.finalize_batch.max(1),
        })
    }

    /// Stripe settings, or `None` (sync off) without a key.
    pub fn stripe(&self) -> Option<StripeConfig> {
        self.stripe_secret_key
            .as_ref()
            .map(|key| StripeConfig::new(self.stripe_api_base.clone(), key.clone()))
    }
}

/// What a serving process adds: keys, sessions, webhooks, schedules, alerts.
#[derive(Args, Clone, Debug)]
pub struct ServeOptions {
    /// SHA-256 (hex) of each admin API key (`billing-api hash-key`).
    #[arg(long, env = "TALLY_ADMIN_KEY_SHA256", value_delimiter = ',')]
    pub admin_key_sha256: Vec<String>,
    /// Secret that signs customer session tokens (any string, 32+
    /// characters).
    #[arg(long, env = "TALLY_SESSION_SECRET", hide_env_values = true)]
    pub session_secret: Option<Secret>,
    /// Stripe webhook endpoint secret (`whsec_…`); webhooks are refused without one.
    #[arg(long, env = "STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
    pub stripe_webhook_secret: Option<Secret>,
    /// Seconds between full re-reads of the quota state (usage, plans,
    /// caps) when it does not follow usage deltas (a distributed billing-api
    /// without --kafka-brokers).
    #[arg(long, env = "TALLY_QUOTA_REFRESH_SECS", default_value_t = 60)]
    pub quota_refresh_secs: u64,
    /// Seconds between full re-reads of the quota state when it follows
    /// usage deltas (tally always; billing-api with --kafka-brokers): only a
    /// backstop, for what neither the deltas nor the audit log carry (credit
    /// consumed by a finalization run in another process).
    #[arg(long, env = "TALLY_QUOTA_BACKSTOP_SECS", default_value_t = 3600)]
    pub quota_backstop_secs: u64,
    /// Seconds between scheduler runs.
    #[arg(long, env = "TALLY_FINALIZE_EVERY_SECS", default_value_t = 60)]
    pub finalize_every_secs: u64,
    /// URL that receives usage alerts (signed webhooks); no alerts without it.
    #[arg(long, env = "TALLY_ALERT_WEBHOOK_URL")]
    pub alert_webhook_url: Option<String>,
    /// Secret that signs usage alerts (`Tally-Signature`); required with the URL.
    #[arg(long, env = "TALLY_ALERT_WEBHOOK_SECRET", hide_env_values = true)]
    pub alert_webhook_secret: Option<Secret>,
    /// Percentages of the spending cap or an allowance that raise an alert.
    #[arg(long, env = "TALLY_ALERT_THRESHOLDS", default_value = "50,80,100")]
    pub alert_thresholds: String,
    /// Seconds the whole shutdown may take after SIGTERM: open requests,
    /// then the finalization or sync step in hand; what is still running
    /// then is abandoned (and redone at the next start).
    #[arg(long, env = "TALLY_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,
}

impl ServeOptions {
    /// The alert settings, or `None` without a webhook URL.
    pub fn alerts(&self) -> anyhow::Result<Option<AlertConfig>> {
        let thresholds =
            parse_thresholds(&self.alert_thresholds).map_err(|e| anyhow::anyhow!("--{e}"))?;
        match (&self.alert_webhook_url, &self.alert_webhook_secret) {
            (Some(url), Some(secret)) => {
                anyhow::ensure!(
                    url.starts_with("http://") || url.starts_with("https://"),
                    "--alert-webhook-url: an http(s) URL, got {url:?}"
                );
                anyhow::ensure!(
                    secret.len() >= 16,
                    "--alert-webhook-secret: at least 16 characters"
                );
                Ok(Some(AlertConfig::new(url.clone(), secret.clone(), thresholds)))
            }
            (Some(_), None) => anyhow::bail!(
                "--alert-webhook-secret (or TALLY_ALERT_WEBHOOK_SECRET) is required with --alert-webhook-url"
            ),
            (None, _) => Ok(None),
        }
    }

    /// The bootstrap admin key hashes (possibly none).
    pub fn admin_keys(&self) -> anyhow::Result<Vec<[u8; 32]>> {
        self.admin_key_sha256
            .iter()
            .map(|h| {
                hex::decode(h.trim())
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| {
                        anyhow::anyhow!("--admin-key-sha256: {h:?} is not 64 hex digits")
                    })
            })
            .collect()
    }

    /// The session secret given, checked, or `None`.
    pub fn session_secret(&self) -> anyhow::Result<Option<Vec<u8>>> {
        match &self.session_secret {
            Some(s) => {
                anyhow::ensure!(s.len() >= 32, "--session-secret: at least 32 characters");
                Ok(Some(s.expose().as_bytes().to_vec()))
            }
            None => Ok(None),
        }
    }

    pub fn finalize_every(&self) -> Duration {
        Duration::from_secs(self.finalize_every_secs.max(1))
    }

    pub fn quota_every(&self) -> Duration {
        Duration::from_secs(self.quota_refresh_secs.max(1))
    }

    pub fn quota_backstop(&self) -> Duration {
        Duration::from_secs(self.quota_backstop_secs.max(1))
    }

    pub fn shutdown_limit(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        billing: BillingOptions,
        #[command(flatten)]
        serve: ServeOptions,
    }

    /// Options are logged and shown in panics with `{:?}`: no secret given
    /// on the command line appears there, while each is read where used.
    #[test]
    fn secrets_never_print() {
        let cli = Cli::try_parse_from([
            "x",
            "--stripe-secret-key",
            "sk_test_SECRET1",
            "--session-secret",
            "SECRET2-0123456789abcdef0123456789abcdef",
            "--stripe-webhook-secret",
            "whsec_SECRET3",
            "--alert-webhook-url",
            "http://127.0.0.1:9/hook",
            "--alert-webhook-secret",
            "SECRET4-0123456789",
        ])
        .unwrap();
        let shown = format!("{cli:?} {:?}", cli.serve.alerts().unwrap());
        for s in ["SECRET1", "SECRET2", "SECRET3", "SECRET4"] {
            assert!(!shown.contains(s), "{s} printed: {shown}");
        }
        assert_eq!(
            cli.billing.stripe().unwrap().secret_key.expose(),
            "sk_test_SECRET1"
        );
        assert_eq!(
            cli.serve.session_secret().unwrap().unwrap(),
            b"SECRET2-0123456789abcdef0123456789abcdef"
        );
        assert_eq!(
            cli.serve.alerts().unwrap().unwrap().secret.expose(),
            "SECRET4-0123456789"
        );
    }
}
