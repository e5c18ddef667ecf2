//! `tally`: the embedded default — the whole product in one process on
//! SQLite. `tally serve --demo` is the quick start.

use clap::{Parser, Subcommand};
use embedded::server::{open_stores, Config};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "tally",
    about = "Tally usage metering and billing, embedded: ingest, aggregation and billing in one process on SQLite"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run ingest, aggregation, billing API, scheduler and dashboard.
    Serve(Box<Config>),
    /// One finalization run (and Stripe sync when a key is set), then exit.
    Finalize {
        #[arg(long, env = "TALLY_DATA_DIR", default_value = ".tally")]
        data_dir: PathBuf,
        /// Finalize as of this instant (RFC 3339); default now.
        #[arg(long)]
        now: Option<chrono::DateTime<chrono::Utc>>,
        #[command(flatten)]
        billing: billing_api::options::BillingOptions,
    },
    /// Write the data directory's state and usage to a dump directory (run
    /// with `tally serve` stopped).
    Export {
        #[arg(long, env = "TALLY_DATA_DIR", default_value = ".tally")]
        data_dir: PathBuf,
        /// A new directory for the dump.
        #[arg(long)]
        out: PathBuf,
    },
    /// Load a dump into empty PostgreSQL and ClickHouse databases, from which
    /// the distributed services carry on.
    Import {
        /// The dump directory (`tally export --out`).
        #[arg(long)]
        from: PathBuf,
        #[arg(long, env = "TALLY_DATABASE_URL")]
        database_url: String,
        #[arg(long, env = "TALLY_CLICKHOUSE_URL")]
        clickhouse_url: String,
        #[arg(long, env = "TALLY_CLICKHOUSE_DATABASE", default_value = "tally")]
        clickhouse_database: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    serving::process::init_tracing();
    match serving::config::parse::<Cli>().command {
        Command::Serve(cfg) => {
            embedded::server::run(*cfg, serving::process::shutdown_signal()).await
        }
        Command::Finalize {
            data_dir,
            now,
            billing,
        } => {
            let (usage, state) = open_stores(&data_dir).await?;
            let state = billing_api::state::DynStateStore::from_arc(state);
            let usage = aggregator::DynUsageStore::from_arc(usage);
            billing_api::service::setup(state, usage, &billing)
                .await?
                .finalize_once(now.unwrap_or_else(chrono::Utc::now))
                .await
        }
        Command::Export { data_dir, out } => {
            let m = embedded::transfer::export(&data_dir, &out).await?;
            println!("{}", serde_json::to_string_pretty(&m)?);
            Ok(())
        }
        Command::Import {
            from,
            database_url,
            clickhouse_url,
            clickhouse_database,
        } => {
            let m = embedded::transfer::import(
                &from,
                &database_url,
                &clickhouse_url,
                &clickhouse_database,
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&m)?);
            Ok(())
        }
    }
}
