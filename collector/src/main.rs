use chrono::{DateTime, Duration as CDuration, Utc};
use clap::{Parser, Subcommand};
use collector::sources::simulator::{ground_truth, Workload};
use schemas::MeterCatalog;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "collector",
    version,
    about = "Tally collector: ingest API, usage sources, Kafka sink with spool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the collector.
    Serve {
        #[arg(long, short, env = "TALLY_COLLECTOR_CONFIG")]
        config: PathBuf,
    },
    /// Print the SHA-256 of an ingest key, for `auth.key_sha256`.
    HashKey { key: String },
    /// Generate a simulated workload; print its ground truth (JSON), and
    /// optionally post it to a collector.
    Simulate {
        #[arg(long, default_value_t = 3)]
        customers: usize,
        #[arg(long, default_value_t = 2)]
        apps: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Start (RFC 3339); default: the start of the previous hour.
        #[arg(long)]
        from: Option<DateTime<Utc>>,
        #[arg(long, default_value_t = 60)]
        minutes: i64,
        #[arg(long, default_value_t = 60)]
        step_secs: i64,
        /// Collector URL, e.g. http://127.0.0.1:8080
        #[arg(long)]
        post: Option<String>,
        #[arg(long, env = "TALLY_INGEST_KEY", default_value = "dev-collector-key")]
        key: String,
        #[arg(long, default_value_t = 500)]
        batch: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    serving::process::init_tracing();
    match Cli::parse().command {
        Command::Serve { config } => {
            let cfg = collector::Config::load(&config)?;
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                serving::process::shutdown_signal().await;
                tracing::info!("shutdown requested");
                let _ = tx.send(true);
            });
            collector::server::run(cfg, rx).await
        }
        Command::HashKey { key } => {
            println!("{}", hex::encode(collector::auth::hash_key(&key)));
            Ok(())
        }
        Command::Simulate {
            customers,
            apps,
            seed,
            from,
            minutes,
            step_secs,
            post,
            key,
            batch,
        } => {
            let from = from.unwrap_or_else(|| {
                let now = Utc::now().timestamp();
                DateTime::from_timestamp(now - now % 3600 - 3600, 0).unwrap()
            });
            let w = Workload {
                customers,
                apps_per_customer: apps,
                seed,
            };
            let events = w.events(from, from + CDuration::minutes(minutes), step_secs);
            if let Some(url) = post {
                post_events(&url, &key, &events, batch).await?;
                eprintln!("posted {} events", events.len());
            }
            let truth = ground_truth(&events, &MeterCatalog::default_catalog());
            println!("{}", serde_json::to_string_pretty(&truth)?);
            Ok(())
        }
    }
}

/// Posts in batches, retrying connection errors and 5xx with backoff.
async fn post_events(
    url: &str,
    key: &str,
    events: &[schemas::RawEvent],
    batch: usize,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let endpoint = format!("{}/v1/events", url.trim_end_matches('/'));
    for chunk in events.chunks(batch.max(1)) {
        let body = serde_json::to_vec(chunk)?;
        let mut backoff = Duration::from_millis(200);
        loop {
            let res = http
                .post(&endpoint)
                .bearer_auth(key)
                .header("content-type", "application/cloudevents-batch+json")
                .body(body.clone())
                .send()
                .await;
            match res {
                Ok(r) if r.status().is_success() => break,
                Ok(r) if r.status().is_client_error() => {
                    let status = r.status();
                    anyhow::bail!(
                        "collector rejected a batch: {status} {}",
                        r.text().await.unwrap_or_default()
                    )
                }
                Ok(r) => eprintln!("collector answered {}; retrying", r.status()),
                Err(e) => eprintln!("post failed: {e}; retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
