//! The collector's Kafka sink (the `kafka` feature): an idempotent
//! producer with the local spool as its fallback while Kafka is away.

use crate::metrics::Metrics;
use crate::sink::{Delivery, Envelope, EventSink};
use crate::spool::Spool;
use futures::future::join_all;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    pub topic: String,
    pub partitions: i32,
    /// How long one produce may wait for an acknowledgement before the
    /// events go to the spool instead.
    pub delivery_timeout: Duration,
}

/// The producer the collector uses: idempotent, `acks=all`, lz4.
pub fn new_producer(s: &KafkaSettings) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", &s.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set(
            "message.timeout.ms",
            s.delivery_timeout.as_millis().to_string(),
        )
        .create()?)
}

/// Kafka producer with the spool as its fallback.
pub struct KafkaSink {
    settings: KafkaSettings,
    producer: Mutex<Arc<FutureProducer>>,
    spool: Arc<Spool>,
    metrics: Metrics,
    /// Set when a produce failed; while set (and for `cooldown` after), new
    /// requests go straight to the spool instead of waiting on a dead broker.
    kafka_down: AtomicBool,
    down_since_ms: AtomicI64,
    started: Instant,
}

const COOLDOWN: Duration = Duration::from_secs(2);

impl KafkaSink {
    pub fn new(
        settings: KafkaSettings,
        spool: Arc<Spool>,
        metrics: Metrics,
    ) -> anyhow::Result<Arc<Self>> {
        let producer = Mutex::new(Arc::new(new_producer(&settings)?));
        let sink = Arc::new(Self {
            settings,
            producer,
            spool,
            metrics,
            kafka_down: AtomicBool::new(false),
            down_since_ms: AtomicI64::new(0),
            started: Instant::now(),
        });
        sink.metrics.spool_events.set(sink.spool.depth()? as i64);
        Ok(sink)
    }

    fn producer(&self) -> Arc<FutureProducer> {
        self.producer.lock().unwrap().clone()
    }

    /// An idempotent producer can be left unusable: by a fatal error (e.g.
    /// after message timeouts), or by a broker that lost its producer state
    /// in a restart and now rejects the producer id. Any failure other than a
    /// plain timeout (broker away) gets a fresh producer.
    fn replace_if_broken(&self, p: &Arc<FutureProducer>, broker_rejected: bool) {
        let fatal = p.client().fatal_error();
        if fatal.is_some() || broker_rejected {
            tracing::warn!(fatal = ?fatal, "kafka producer unusable; creating a new one");
            let mut cur = self.producer.lock().unwrap();
            if !Arc::ptr_eq(&cur, p) {
                return; // another task replaced it already
            }
            match new_producer(&self.settings) {
                Ok(np) => *cur = Arc::new(np),
                Err(e) => tracing::error!(error = %e, "could not create a new kafka producer"),
            }
        }
    }

    fn now_ms(&self) -> i64 {
        self.started.elapsed().as_millis() as i64
    }

    fn mark_down(&self) {
        if !self.kafka_down.swap(true, Ordering::SeqCst) {
            tracing::warn!("kafka unreachable; spooling accepted events to disk");
        }
        self.down_since_ms.store(self.now_ms(), Ordering::SeqCst);
    }

    fn skip_kafka(&self) -> bool {
        self.kafka_down.load(Ordering::SeqCst)
            && self.now_ms() - self.down_since_ms.load(Ordering::SeqCst)
                < COOLDOWN.as_millis() as i64
    }

    /// Produces every envelope and waits for all acknowledgements. Returns
    /// the envelopes that were not acknowledged.
    pub async fn produce_all(&self, batch: Vec<Envelope>) -> Vec<Envelope> {
        let producer = self.producer();
        let start = Instant::now();
        let mut sent = Vec::with_capacity(batch.len());
        let mut futures = Vec::with_capacity(batch.len());
        let mut failed = Vec::new();
        let mut broker_rejected = false;
        for env in batch {
            let rec = FutureRecord::to(&self.settings.topic)
                .key(&env.key)
                .payload(&env.payload);
            match producer.send_result(rec) {
                Ok(f) => {
                    futures.push(f);
                    sent.push(env);
                }
                Err((e, _)) => {
                    tracing::debug!(error = %e, "enqueue to kafka failed");
                    failed.push(env);
                }
            }
        }
        for (env, res) in sent.iter().zip(join_all(futures).await) {
            match res {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    tracing::debug!(error = %e, "kafka delivery failed");
                    broker_rejected |=
                        e.rdkafka_error_code() != Some(RDKafkaErrorCode::MessageTimedOut);
                    failed.push(env.clone());
                }
                Err(_) => failed.push(env.clone()),
            }
        }
        self.metrics
            .produce_duration
            .observe(start.elapsed().as_secs_f64());
        if !failed.is_empty() {
            self.replace_if_broken(&producer, broker_rejected);
        }
        failed
    }

    /// Replays spooled files to Kafka, oldest first, until the spool is
    /// empty or Kafka fails again. Returns the number of events replayed.
    pub async fn replay_spool(&self) -> anyhow::Result<usize> {
        let mut replayed = 0;
        for file in self.spool.pending()? {
            let n = file.records.len();
            let failed = self.produce_all(file.records.clone()).await;
            if !failed.is_empty() {
                tracing::debug!(file = %file.path.display(), failed = failed.len(), "spool replay attempt failed");
                self.mark_down();
                break;
            }
            self.spool.remove(&file)?;
            replayed += n;
            self.metrics.spool_events.sub(n as i64);
            self.metrics.spool_replayed.inc_by(n as u64);
        }
        if replayed > 0 {
            tracing::info!(events = replayed, "replayed spooled events to kafka");
        }
        if self.spool.pending()?.is_empty() && self.kafka_down.swap(false, Ordering::SeqCst) {
            tracing::info!("kafka reachable again; spool drained");
        }
        Ok(replayed)
    }

    /// Background task: drains the spool whenever it holds anything.
    pub async fn run_replayer(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(250);
        loop {
            let has = self.spool.pending().map(|p| !p.is_empty()).unwrap_or(false);
            if has {
                match self.replay_spool().await {
                    Ok(_) if !self.kafka_down.load(Ordering::SeqCst) => {
                        backoff = Duration::from_millis(250)
                    }
                    Ok(_) => backoff = (backoff * 2).min(Duration::from_secs(5)),
                    Err(e) => {
                        tracing::error!(error = %e, "spool replay failed");
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Waits until librdkafka has delivered (or failed) every queued message.
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer().flush(timeout);
    }
}

impl EventSink for KafkaSink {
    async fn send(&self, batch: Vec<Envelope>) -> anyhow::Result<Delivery> {
        let n = batch.len();
        let failed = if self.skip_kafka() {
            batch
        } else {
            self.produce_all(batch).await
        };
        if failed.is_empty() {
            return Ok(Delivery::Kafka);
        }
        self.mark_down();
        let spooled = failed.len();
        let spool = self.spool.clone();
        tokio::task::spawn_blocking(move || spool.append(&failed)).await??;
        self.metrics.spool_events.add(spooled as i64);
        tracing::debug!(events = spooled, of = n, "events spooled");
        Ok(Delivery::Spool)
    }
}
