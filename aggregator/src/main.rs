use aggregator::kafka::PipelineConfig;
use aggregator::metrics::Metrics;
use aggregator::store::clickhouse::ClickHouseStore;
use aggregator::{Granularity, UsageQuery, UsageStore};
use axum::routing::get;
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use schemas::MeterCatalog;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "aggregator",
    version,
    about = "Tally aggregator: Kafka → validate, dedup, roll up → ClickHouse"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Common {
    #[arg(long, env = "TALLY_KAFKA_BROKERS", default_value = "127.0.0.1:19092")]
    brokers: String,
    #[arg(long, env = "TALLY_KAFKA_TOPIC", default_value = "usage-events")]
    topic: String,
    #[arg(
        long,
        env = "TALLY_KAFKA_DLQ_TOPIC",
        default_value = "usage-events-dlq"
    )]
    dlq_topic: String,
    /// Where each written batch's usage delta goes, for billing's quota
    /// state to follow.
    #[arg(long, env = "TALLY_KAFKA_DELTAS_TOPIC", default_value = "usage-deltas")]
    deltas_topic: String,
    #[arg(
        long,
        env = "TALLY_CLICKHOUSE_URL",
        default_value = "http://127.0.0.1:18123"
    )]
    clickhouse_url: String,
    /// ClickHouse database. The same flag name as billing-api's and tally's;
    /// `--database`, its old name here, is still accepted.
    #[arg(
        long,
        alias = "database",
        env = "TALLY_CLICKHOUSE_DATABASE",
        default_value = "tally"
    )]
    clickhouse_database: String,
    /// Meter catalog (JSON); the built-in one when absent.
    #[arg(long, env = "TALLY_METERS_FILE")]
    meters_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the consumer.
    Run {
        #[command(flatten)]
        common: Common,
        #[arg(
            long,
            env = "TALLY_AGGREGATOR_GROUP",
            default_value = "tally-aggregator"
        )]
        group: String,
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        #[arg(long, default_value_t = 20_000)]
        batch_max_events: usize,
        #[arg(long, default_value_t = 250)]
        batch_max_wait_ms: u64,
        /// Consume these partitions (comma-separated, or `all`) instead of
        /// joining the consumer group's assignment.
        #[arg(long, value_delimiter = ',')]
        assign: Vec<String>,
        /// Address of the /metrics endpoint.
        #[arg(
            long,
            env = "TALLY_AGGREGATOR_METRICS",
            default_value = "127.0.0.1:9464"
        )]
        metrics_listen: String,
        /// Seconds the shutdown may take after SIGTERM (the batch in hand is
        /// finished and committed first); a batch still being written then
        /// is abandoned and consumed again at the next start.
        #[arg(long, env = "TALLY_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
        shutdown_timeout_secs: u64,
        /// Fault injection for tests: abort the process after the Nth
        /// written batch, before its usage delta is published.
        #[arg(long, hide = true)]
        fault_abort_before_delta: Option<u64>,
    },
    /// Apply ClickHouse migrations and exit.
    Migrate {
        #[command(flatten)]
        common: Common,
    },
    /// Replay the dead-letter topic into the usage topic.
    DlqReplay {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value = "tally-dlq-replay")]
        group: String,
        #[arg(long, default_value_t = 5)]
        idle_secs: u64,
    },
    /// Query usage (JSON rows), as billing does.
    Query {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        customer: String,
        #[arg(long)]
        meter: String,
        #[arg(long)]
        from: DateTime<Utc>,
        #[arg(long)]
        to: DateTime<Utc>,
        /// Comma-separated: app and/or meter dimensions.
        #[arg(long, value_delimiter = ',')]
        group_by: Vec<String>,
        #[arg(long, value_parser = parse_granularity)]
        granularity: Option<Granularity>,
    },
    /// Totals per customer/app/meter over everything stored (JSON).
    Totals {
        #[command(flatten)]
        common: Common,
        /// Compute from raw rows instead of rollups.
        #[arg(long)]
        raw: bool,
    },
}

fn parse_granularity(s: &str) -> Result<Granularity, String> {
    match s {
        "hour" => Ok(Granularity::Hour),
        "day" => Ok(Granularity::Day),
        "month" => Ok(Granularity::Month),
        other => Err(format!(
            "granularity must be hour, day or month, got {other:?}"
        )),
    }
}

fn meters(c: &Common) -> anyhow::Result<MeterCatalog> {
    MeterCatalog::load(c.meters_file.as_deref()).map_err(anyhow::Error::msg)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    serving::process::init_tracing();
    match serving::config::parse::<Cli>().command {
        Command::Run {
            common,
            group,
            partitions,
            batch_max_events,
            batch_max_wait_ms,
            assign,
            metrics_listen,
            shutdown_timeout_secs,
            fault_abort_before_delta,
        } => {
            let static_partitions = match assign.as_slice() {
                [] => None,
                [all] if all == "all" => Some((0..partitions).collect()),
                list => Some(
                    list.iter()
                        .map(|p| {
                            p.parse::<i32>().map_err(|_| {
                                anyhow::anyhow!("--assign: {p:?} is not a partition number")
                            })
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?,
                ),
            };
            let metrics = Metrics::new();
            let mut store =
                ClickHouseStore::new(&common.clickhouse_url, &common.clickhouse_database);
            store.metrics = Some(metrics.clone());
            // ClickHouse may still be starting: retry migrations.
            let mut wait = Duration::from_millis(200);
            while let Err(e) = store.apply_migrations().await {
                tracing::warn!(error = format!("{e:#}"), "migrations failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                serving::process::shutdown_signal().await;
                tracing::info!("shutdown requested; finishing the current batch");
                let _ = tx.send(true);
            });
            let m = metrics.clone();
            let app = axum::Router::new()
                .route("/metrics", get(move || async move { m.render() }))
                .route("/healthz", get(|| async { "ok" }));
            let listener = tokio::net::TcpListener::bind(&metrics_listen).await?;
            tracing::info!(addr = %listener.local_addr()?, "aggregator metrics listening");
            let mut srx = rx.clone();
            tokio::spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = srx.wait_for(|v| *v).await;
                    })
                    .await;
            });
            let cfg = PipelineConfig {
                brokers: common.brokers.clone(),
                topic: common.topic.clone(),
                dlq_topic: common.dlq_topic.clone(),
                deltas_topic: common.deltas_topic.clone(),
                group_id: group,
                partitions,
                batch_max_events,
                batch_max_wait: Duration::from_millis(batch_max_wait_ms),
                static_partitions,
                fault_abort_before_delta,
            };
            let mut stopping = rx.clone();
            let run = aggregator::kafka::run(
                cfg,
                Arc::new(store),
                Arc::new(meters(&common)?),
                metrics,
                rx,
            );
            tokio::pin!(run);
            tokio::select! {
                r = &mut run => r,
                _ = stopping.wait_for(|v| *v) => {
                    let deadline = serving::process::Deadline::after(Duration::from_secs(shutdown_timeout_secs));
                    deadline.stage("current batch", run).await.unwrap_or(Ok(()))
                }
            }
        }
        Command::Migrate { common } => {
            ClickHouseStore::new(&common.clickhouse_url, &common.clickhouse_database)
                .apply_migrations()
                .await
        }
        Command::DlqReplay {
            common,
            group,
            idle_secs,
        } => {
            let r = aggregator::dlq::replay(
                &common.brokers,
                &common.dlq_topic,
                &common.topic,
                &group,
                Duration::from_secs(idle_secs),
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
        Command::Query {
            common,
            customer,
            meter,
            from,
            to,
            group_by,
            granularity,
        } => {
            let cat = meters(&common)?;
            let def = cat
                .get(&meter)
                .ok_or_else(|| anyhow::anyhow!("--meter: unknown meter {meter:?}"))?;
            anyhow::ensure!(from < to, "--from must be before --to");
            let store = ClickHouseStore::new(&common.clickhouse_url, &common.clickhouse_database);
            let q = UsageQuery {
                customer,
                meter: meter.clone(),
                from,
                to,
                group_by,
                granularity,
                raw: false,
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&store.query(def, &q).await?)?
            );
            Ok(())
        }
        Command::Totals { common, raw } => {
            let store = ClickHouseStore::new(&common.clickhouse_url, &common.clickhouse_database);
            let t = if raw {
                store.raw_totals().await?
            } else {
                store.totals().await?
            };
            println!("{}", serde_json::to_string_pretty(&t)?);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    #[test]
    fn the_clickhouse_database_flag_has_the_name_it_has_everywhere() {
        use clap::Parser;
        for flag in ["--clickhouse-database", "--database"] {
            let cli = super::Cli::try_parse_from(["aggregator", "migrate", flag, "other"]).unwrap();
            let super::Command::Migrate { common } = cli.command else {
                panic!("parsed as another command");
            };
            assert_eq!(common.clickhouse_database, "other", "{flag}");
        }
    }

    /// The aggregator reads a settings file (`serving::config`): its keys
    /// are the flag names, and the flags still win.
    #[test]
    fn a_config_file_sets_flags_beneath_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aggregator.toml");
        std::fs::write(
            &path,
            "clickhouse-database = \"from_file\"\nshutdown-timeout-secs = 5\npartitions = 8\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let cli: super::Cli =
            serving::config::try_parse_from(["aggregator", "run", "--config", p]).unwrap();
        let super::Command::Run {
            common,
            partitions,
            shutdown_timeout_secs,
            ..
        } = cli.command
        else {
            panic!("parsed as another command");
        };
        assert_eq!(
            (
                common.clickhouse_database.as_str(),
                partitions,
                shutdown_timeout_secs
            ),
            ("from_file", 8, 5)
        );
        // The same file serves every subcommand: `migrate` takes what it
        // has a flag for, and its flag beats the file.
        let cli: super::Cli = serving::config::try_parse_from([
            "aggregator",
            "migrate",
            "--config",
            p,
            "--clickhouse-database",
            "flag",
        ])
        .unwrap();
        let super::Command::Migrate { common } = cli.command else {
            panic!("parsed as another command");
        };
        assert_eq!(common.clickhouse_database, "flag");
    }
}
