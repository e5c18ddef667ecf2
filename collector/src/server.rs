//! Wiring of the collector process: sink, spool replayer, sources, HTTP.
//!
//! Shutdown on SIGTERM, in order: stop accepting HTTP requests and finish
//! the ones in flight (their events become durable before they are
//! answered), stop the sources, flush the Kafka producer, stop the replayer.
//! Whatever is still in the spool stays there for the next start.

use crate::api::{router, IngestState};
use crate::auth::KeySet;
use crate::config::{Config, SourceConfig};
use crate::kafka::{KafkaSettings, KafkaSink};
use crate::metrics::Metrics;
use crate::sink::DynEventSink;
use crate::sources::inventory::InventorySource;
use crate::sources::prometheus::PrometheusSource;
use crate::sources::simulator::SimulatorSource;
use crate::sources::{DynSource, SourceRunner};
use crate::spool::Spool;
use schemas::MeterCatalog;
use serving::kafka::ensure_topic;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub fn load_meters(cfg: &Config) -> anyhow::Result<MeterCatalog> {
    MeterCatalog::load(cfg.meters_file.as_deref()).map_err(anyhow::Error::msg)
}

pub fn build_sources(cfg: &Config) -> Vec<Box<DynSource<'static>>> {
    cfg.sources
        .iter()
        .map(|s| -> Box<DynSource<'static>> {
            match s {
                SourceConfig::Inventory(c) => DynSource::new_box(InventorySource::new(c.clone())),
                SourceConfig::Prometheus(c) => DynSource::new_box(PrometheusSource::new(c.clone())),
                SourceConfig::Simulator(c) => DynSource::new_box(SimulatorSource::new(c.clone())),
            }
        })
        .collect()
}

/// Runs the collector until `shutdown` turns true.
pub async fn run(cfg: Config, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let meters = Arc::new(load_meters(&cfg)?);
    let keys = Arc::new(KeySet::from_hex(&cfg.auth.key_sha256).map_err(anyhow::Error::msg)?);
    if let Err(e) = ensure_topic(&cfg.kafka.brokers, &cfg.kafka.topic, cfg.kafka.partitions).await {
        // Not fatal: with Kafka away, events go to the spool.
        tracing::warn!(error = %e, topic = %cfg.kafka.topic, "could not ensure the usage topic exists");
    }
    let spool = Arc::new(Spool::open(&cfg.spool.dir)?);
    let settings = KafkaSettings {
        brokers: cfg.kafka.brokers.clone(),
        topic: cfg.kafka.topic.clone(),
        partitions: cfg.kafka.partitions,
        delivery_timeout: Duration::from_millis(cfg.kafka.delivery_timeout_ms),
    };
    let kafka = KafkaSink::new(settings, spool, metrics.clone())?;
    let sink = DynEventSink::from_arc(kafka.clone());

    let (bg_tx, bg_rx) = watch::channel(false);
    let replayer = tokio::spawn(kafka.clone().run_replayer(bg_rx.clone()));
    let mut source_tasks = Vec::new();
    for src in build_sources(&cfg) {
        let runner = SourceRunner::new(
            src,
            &cfg.checkpoint_dir,
            sink.clone(),
            meters.clone(),
            metrics.clone(),
        );
        source_tasks.push(tokio::spawn(runner.run(bg_rx.clone())));
    }

    let state = IngestState {
        sink,
        meters,
        keys,
        metrics,
        max_body_bytes: cfg.limits.max_body_bytes,
        max_batch_events: cfg.limits.max_batch_events,
    };
    let listener = tokio::net::TcpListener::bind(&cfg.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "collector listening");
    // hyper's own 414/431/400 answers carry the error envelope too.
    // Ordered, within one time limit from the stop (serving::process):
    // open requests, the sources' last polls, the producer's flush, the
    // spool replayer. Events still only in the producer's queue at the
    // deadline were never acknowledged (2xx comes after Kafka's ack or
    // the spool's fsync).
    let limit = Duration::from_secs(cfg.shutdown_timeout_secs);
    let stop = async move {
        let _ = shutdown.wait_for(|v| *v).await;
    };
    let deadline = serving::process::serve(listener, router(state), stop, limit).await?;
    tracing::info!("http stopped; stopping sources and flushing");
    let _ = bg_tx.send(true);
    let _ = deadline
        .stage("sources", futures::future::join_all(source_tasks))
        .await;
    let k = kafka.clone();
    let _ = deadline
        .stage(
            "kafka flush",
            tokio::task::spawn_blocking(move || k.flush(limit)),
        )
        .await;
    let _ = deadline.stage("spool replayer", replayer).await;
    tracing::info!("collector stopped");
    Ok(())
}
