//! `billing-api`: the billing service and its admin commands.

use aggregator::DynUsageStore;
use billing_api::api::openapi_json;
use billing_api::options::{BillingOptions, ServeOptions};
use billing_api::service::{serve, Parts};
use billing_api::state::postgres::PgState;
use billing_api::state::DynStateStore;
use clap::{Args, Parser, Subcommand};
use sha2::{Digest, Sha256};

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
    #[command(flatten)]
    billing: BillingOptions,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API and the finalization/sync scheduler.
    Serve {
        #[command(flatten)]
        common: Common,
        #[arg(long, env = "TALLY_BILLING_LISTEN", default_value = "127.0.0.1:8090")]
        listen: String,
        #[command(flatten)]
        serve: ServeOptions,
        /// Kafka brokers to follow the aggregators' usage deltas from: quota
        /// decisions then see usage seconds after it is acknowledged. Unset,
        /// the quota state re-reads usage every --quota-refresh-secs.
        #[arg(long, env = "TALLY_KAFKA_BROKERS")]
        kafka_brokers: Option<String>,
        /// The aggregators' --deltas-topic.
        #[arg(long, env = "TALLY_KAFKA_DELTAS_TOPIC", default_value = "usage-deltas")]
        deltas_topic: String,
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

async fn setup(c: &Common) -> anyhow::Result<Parts> {
    let state = DynStateStore::new_arc(PgState::connect(&c.database_url).await?);
    let usage = DynUsageStore::new_arc(aggregator::store::clickhouse::ClickHouseStore::new(
        &c.clickhouse_url,
        &c.clickhouse_database,
    ));
    billing_api::service::setup(state, usage, &c.billing).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    serving::process::init_tracing();
    match serving::config::parse::<Cli>().command {
        Command::Serve {
            common,
            listen,
            serve: opts,
            kafka_brokers,
            deltas_topic,
        } => {
            let alerts = opts.alerts()?;
            let admin_keys = opts.admin_keys()?;
            anyhow::ensure!(
                !admin_keys.is_empty(),
                "--admin-key-sha256 (or TALLY_ADMIN_KEY_SHA256) is required: the bootstrap admin key"
            );
            let session_secret = match opts.session_secret()? {
                Some(s) => s,
                None => {
                    tracing::warn!(
                        "TALLY_SESSION_SECRET not set: customer sessions end with this process"
                    );
                    rand::random::<[u8; 32]>().to_vec()
                }
            };
            let p = setup(&common).await?;
            // Positioned before the state is read (see `delta_feed`).
            let follower = match &kafka_brokers {
                Some(b) => Some(billing_api::delta_feed::subscribe(b, &deltas_topic).await?),
                None => {
                    tracing::warn!("--kafka-brokers not set: quota usage is re-read every --quota-refresh-secs instead of followed");
                    None
                }
            };
            let api = p
                .api(&common.billing, &opts, admin_keys, session_secret)
                .await?;
            if let Some(c) = follower {
                // Ends with the process.
                let (keep, stop) = tokio::sync::watch::channel(false);
                std::mem::forget(keep);
                tokio::spawn(
                    api.quota
                        .clone()
                        .follow(billing_api::delta_feed::feed(c), stop),
                );
            }
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .map_err(|e| anyhow::anyhow!("--listen {listen}: {e}"))?;
            serve(listener, api, p.finalizer, p.sync, &opts, alerts).await
        }
        Command::Migrate { common } => {
            setup(&common).await?;
            Ok(())
        }
        Command::Finalize { common, now } => {
            setup(&common)
                .await?
                .finalize_once(now.unwrap_or_else(chrono::Utc::now))
                .await
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
