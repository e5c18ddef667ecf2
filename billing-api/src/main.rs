//! `billing-api`: the billing service and its admin commands.

use billing_api::api::{openapi_json, ApiState};
use billing_api::auth::Authenticator;
use billing_api::catalog::Catalog;
use billing_api::finalize::{FinalizeConfig, Finalizer};
use billing_api::metrics::Metrics;
use billing_api::quota_service::QuotaService;
use billing_api::service::{load_catalog, serve};
use billing_api::state::postgres::PgState;
use billing_api::state::StateStore;
use billing_api::stripe_sync::{StripeConfig, StripeSync};
use clap::{Args, Parser, Subcommand};
use rust_decimal::Decimal;
use schemas::MeterCatalog;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "billing-api",
    about = "Tally billing: catalog, subscriptions, invoices, Stripe"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Common {
    #[arg(
        long,
        env = "TALLY_DATABASE_URL",
        default_value = "postgres://tally@127.0.0.1:15432/tally"
    )]
    database_url: String,
    #[arg(
        long,
        env = "TALLY_CLICKHOUSE_URL",
        default_value = "http://127.0.0.1:18123"
    )]
    clickhouse_url: String,
    #[arg(long, env = "TALLY_CLICKHOUSE_DATABASE", default_value = "tally")]
    clickhouse_database: String,
    /// Meter catalog (JSON); the built-in one when absent.
    #[arg(long, env = "TALLY_METERS_FILE")]
    meters_file: Option<PathBuf>,
    /// Pricing catalog (JSON) published at start; the built-in default when absent.
    #[arg(long, env = "TALLY_CATALOG_FILE")]
    catalog_file: Option<PathBuf>,
    /// Grace window after a period's end before its invoices are finalized.
    #[arg(long, env = "TALLY_GRACE_SECS", default_value_t = 3600)]
    grace_secs: u64,
    /// Invoices written per transaction by a finalization run.
    #[arg(long, env = "TALLY_FINALIZE_BATCH", default_value_t = 500)]
    finalize_batch: usize,
    /// Smallest invoice total sent to Stripe; smaller totals are carried forward.
    #[arg(long, env = "TALLY_MIN_CHARGE", default_value = "0.50")]
    min_charge: Decimal,
    /// Stripe secret key; Stripe sync is off without one.
    #[arg(long, env = "STRIPE_SECRET_KEY", hide_env_values = true)]
    stripe_secret_key: Option<String>,
    #[arg(
        long,
        env = "TALLY_STRIPE_API_BASE",
        default_value = "https://api.stripe.com/"
    )]
    stripe_api_base: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API and the finalization/sync scheduler.
    Serve {
        #[command(flatten)]
        common: Common,
        #[arg(long, env = "TALLY_BILLING_LISTEN", default_value = "127.0.0.1:8090")]
        listen: String,
        /// SHA-256 (hex) of each admin API key (`billing-api hash-key`).
        #[arg(long, env = "TALLY_ADMIN_KEY_SHA256", value_delimiter = ',')]
        admin_key_sha256: Vec<String>,
        /// Secret that signs customer session tokens (any string, 32+
        /// characters); a random one when absent (sessions then end with
        /// the process, and replicas do not share them).
        #[arg(long, env = "TALLY_SESSION_SECRET", hide_env_values = true)]
        session_secret: Option<String>,
        /// Stripe webhook endpoint secret (`whsec_…`); webhooks are refused without one.
        #[arg(long, env = "STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
        stripe_webhook_secret: Option<String>,
        /// Seconds between reloads of the quota state (usage, plans, caps).
        #[arg(long, env = "TALLY_QUOTA_REFRESH_SECS", default_value_t = 60)]
        quota_refresh_secs: u64,
        /// Seconds between scheduler runs.
        #[arg(long, env = "TALLY_FINALIZE_EVERY_SECS", default_value_t = 60)]
        finalize_every_secs: u64,
        /// URL that receives usage alerts (signed webhooks); no alerts without it.
        #[arg(long, env = "TALLY_ALERT_WEBHOOK_URL")]
        alert_webhook_url: Option<String>,
        /// Secret that signs usage alerts (`Tally-Signature`); required with the URL.
        #[arg(long, env = "TALLY_ALERT_WEBHOOK_SECRET", hide_env_values = true)]
        alert_webhook_secret: Option<String>,
        /// Percentages of the spending cap or an allowance that raise an alert.
        #[arg(long, env = "TALLY_ALERT_THRESHOLDS", default_value = "50,80,100")]
        alert_thresholds: String,
    },
    /// Apply PostgreSQL migrations and load the catalog, then exit.
    Migrate {
        #[command(flatten)]
        common: Common,
    },
    /// One finalization run (and Stripe sync when a key is set), then exit.
    Finalize {
        #[command(flatten)]
        common: Common,
        /// Finalize as of this instant (RFC 3339); default now.
        #[arg(long)]
        now: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Print the OpenAPI document (checked in as schemas/openapi.json).
    Openapi,
    /// Staff commands against a running billing-api: find a customer,
    /// preview and confirm a plan switch, read the audit log.
    Admin(billing_api::admin_cli::AdminArgs),
    /// Print the SHA-256 of an API key, for --admin-key-sha256.
    HashKey { key: String },
}

fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("TALLY_LOG_FORMAT").is_ok_and(|v| v == "json") {
        b.json().init()
    } else {
        b.init()
    }
}

struct Parts {
    state: Arc<dyn StateStore>,
    finalizer: Arc<Finalizer>,
    sync: Option<Arc<StripeSync>>,
    meters: Arc<MeterCatalog>,
    metrics: Metrics,
}

async fn setup(c: &Common) -> anyhow::Result<Parts> {
    let meters = Arc::new(match &c.meters_file {
        Some(p) => MeterCatalog::from_json(&std::fs::read_to_string(p)?)
            .map_err(|e| anyhow::anyhow!("--meters-file {}: {e}", p.display()))?,
        None => MeterCatalog::default_catalog(),
    });
    let catalog = match &c.catalog_file {
        Some(p) => serde_json::from_str::<Catalog>(&std::fs::read_to_string(p)?)
            .map_err(|e| anyhow::anyhow!("--catalog-file {}: {e}", p.display()))?,
        None => Catalog::default_catalog(),
    };
    anyhow::ensure!(
        c.min_charge >= Decimal::ZERO,
        "--min-charge must not be negative"
    );
    let pg = PgState::connect(&c.database_url).await?;
    pg.migrate().await?;
    let state: Arc<dyn StateStore> = Arc::new(pg);
    let n = load_catalog(state.as_ref(), &catalog, &meters).await?;
    tracing::info!(published = n, "catalog loaded");
    let usage = Arc::new(aggregator::store::clickhouse::ClickHouseStore::new(
        &c.clickhouse_url,
        &c.clickhouse_database,
    ));
    let metrics = Metrics::new();
    let finalizer = Arc::new(Finalizer {
        state: state.clone(),
        usage,
        meters: meters.clone(),
        config: FinalizeConfig {
            grace: Duration::from_secs(c.grace_secs),
            min_charge: c.min_charge,
            batch: c.finalize_batch.max(1),
        },
        metrics: metrics.clone(),
    });
    let sync = c.stripe_secret_key.as_ref().map(|key| {
        Arc::new(StripeSync::new(
            StripeConfig::new(c.stripe_api_base.clone(), key.clone()),
            state.clone(),
            metrics.clone(),
        ))
    });
    if sync.is_none() {
        tracing::warn!("STRIPE_SECRET_KEY not set: invoices are finalized but not sent to Stripe");
    }
    Ok(Parts {
        state,
        finalizer,
        sync,
        meters,
        metrics,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    match Cli::parse().command {
        Command::Serve {
            common,
            listen,
            admin_key_sha256,
            session_secret,
            stripe_webhook_secret,
            quota_refresh_secs,
            finalize_every_secs,
            alert_webhook_url,
            alert_webhook_secret,
            alert_thresholds,
        } => {
            let thresholds = billing_api::alerts::parse_thresholds(&alert_thresholds)
                .map_err(|e| anyhow::anyhow!("--{e}"))?;
            let alerts = match (alert_webhook_url, alert_webhook_secret) {
                (Some(url), Some(secret)) => {
                    anyhow::ensure!(
                        url.starts_with("http://") || url.starts_with("https://"),
                        "--alert-webhook-url: an http(s) URL, got {url:?}"
                    );
                    anyhow::ensure!(
                        secret.len() >= 16,
                        "--alert-webhook-secret: at least 16 characters"
                    );
                    Some(billing_api::alerts::AlertConfig::new(url, secret, thresholds))
                }
                (Some(_), None) => anyhow::bail!(
                    "--alert-webhook-secret (or TALLY_ALERT_WEBHOOK_SECRET) is required with --alert-webhook-url"
                ),
                (None, _) => None,
            };
            let mut admin_keys = Vec::new();
            for h in &admin_key_sha256 {
                let b = hex::decode(h.trim())
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| {
                        anyhow::anyhow!("--admin-key-sha256: {h:?} is not 64 hex digits")
                    })?;
                admin_keys.push(b);
            }
            anyhow::ensure!(
                !admin_keys.is_empty(),
                "--admin-key-sha256 (or TALLY_ADMIN_KEY_SHA256) is required: the bootstrap admin key"
            );
            let session_secret = match session_secret {
                Some(s) => {
                    anyhow::ensure!(s.len() >= 32, "--session-secret: at least 32 characters");
                    s.into_bytes()
                }
                None => {
                    tracing::warn!(
                        "TALLY_SESSION_SECRET not set: customer sessions end with this process"
                    );
                    rand::random::<[u8; 32]>().to_vec()
                }
            };
            let p = setup(&common).await?;
            let auth = Arc::new(Authenticator::new(admin_keys, session_secret));
            auth.load(p.state.api_keys().await?);
            let quota = Arc::new(QuotaService::new(
                p.state.clone(),
                p.finalizer.usage.clone(),
                p.meters.clone(),
            ));
            // The usage store may not be ready yet (the aggregator creates its
            // tables): answer from an empty state until the next refresh.
            match quota.refresh(chrono::Utc::now()).await {
                Ok(n) => tracing::info!(customers = n, "quota state loaded"),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "quota state not loaded yet; retrying on the next refresh")
                }
            }
            let api = Arc::new(ApiState {
                state: p.state,
                usage: p.finalizer.usage.clone(),
                meters: p.meters,
                quota,
                metrics: p.metrics,
                auth,
                webhook_secret: stripe_webhook_secret,
                min_charge: common.min_charge,
            });
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .map_err(|e| anyhow::anyhow!("--listen {listen}: {e}"))?;
            serve(
                listener,
                api,
                p.finalizer,
                p.sync,
                Duration::from_secs(finalize_every_secs.max(1)),
                Duration::from_secs(quota_refresh_secs.max(1)),
                alerts,
            )
            .await
        }
        Command::Migrate { common } => {
            setup(&common).await?;
            Ok(())
        }
        Command::Finalize { common, now } => {
            let p = setup(&common).await?;
            let r = p
                .finalizer
                .run_once(now.unwrap_or_else(chrono::Utc::now))
                .await?;
            println!(
                "finalized {} invoice(s) over {} period(s)",
                r.finalized, r.periods
            );
            if let Some(s) = p.sync {
                let (ok, failed) = s.run_once().await?;
                println!("synced {ok} invoice(s) to Stripe, {failed} failed");
                anyhow::ensure!(failed == 0, "{failed} invoice(s) failed to sync");
            }
            Ok(())
        }
        Command::Openapi => {
            print!("{}", openapi_json());
            Ok(())
        }
        Command::Admin(args) => {
            print!("{}", billing_api::admin_cli::run(&args).await?);
            Ok(())
        }
        Command::HashKey { key } => {
            println!("{}", hex::encode(Sha256::digest(key.as_bytes())));
            Ok(())
        }
    }
}
