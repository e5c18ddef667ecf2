//! The aggregator's Kafka edge (the `kafka` feature): the consumer group
//! that feeds [`Processor`] batches, the dead-letter producer, the
//! publication of each written batch's [`UsageDelta`] to the deltas topic
//! (after the write, before the commit: a delta lost in a crash in between
//! is noticed by followers through the partition's head, published again
//! when the partition is loaded), and the commit of offsets after each
//! batch is stored. Everything that decides
//! what is counted lives in [`crate::pipeline`], which knows no Kafka.

use crate::delta::UsageDelta;
use crate::metrics::Metrics;
use crate::pipeline::{
    DeadLetter, DeadLetterSink, Message, Processor, DLQ_CODE, DLQ_REASON, DLQ_SOURCE_OFFSET,
    DLQ_SOURCE_PARTITION, DLQ_SOURCE_TOPIC,
};
use crate::store::UsageWriter;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use schemas::MeterCatalog;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub use serving::kafka::{ensure_topic, header};

pub struct KafkaDeadLetters {
    producer: FutureProducer,
    topic: String,
    source_topic: String,
}

pub fn producer(brokers: &str) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "10000")
        .create()?)
}

impl KafkaDeadLetters {
    pub fn new(brokers: &str, topic: &str, source_topic: &str) -> anyhow::Result<Self> {
        Ok(Self {
            producer: producer(brokers)?,
            topic: topic.to_owned(),
            source_topic: source_topic.to_owned(),
        })
    }
}

impl DeadLetterSink for KafkaDeadLetters {
    async fn send(&self, letters: Vec<DeadLetter>) -> anyhow::Result<()> {
        let mut futs = Vec::new();
        for l in &letters {
            let (p, o) = (
                l.message.partition.to_string(),
                l.message.offset.to_string(),
            );
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: DLQ_CODE,
                    value: Some(l.code.as_str()),
                })
                .insert(Header {
                    key: DLQ_REASON,
                    value: Some(l.reason.as_str()),
                })
                .insert(Header {
                    key: DLQ_SOURCE_TOPIC,
                    value: Some(self.source_topic.as_str()),
                })
                .insert(Header {
                    key: DLQ_SOURCE_PARTITION,
                    value: Some(p.as_str()),
                })
                .insert(Header {
                    key: DLQ_SOURCE_OFFSET,
                    value: Some(o.as_str()),
                });
            let mut rec: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).headers(headers);
            if let Some(k) = &l.message.key {
                rec = rec.key(k.as_slice());
            }
            if let Some(v) = &l.message.payload {
                rec = rec.payload(v.as_slice());
            }
            futs.push(self.producer.send(rec, Duration::from_secs(10)));
        }
        for r in futures::future::join_all(futs).await {
            r.map_err(|(e, _)| anyhow::anyhow!("dead-letter produce failed: {e}"))?;
        }
        Ok(())
    }
}

/// Publishes usage deltas to the deltas topic's one partition (one order
/// for every follower to resume from), keyed by the usage partition.
pub struct KafkaDeltas {
    brokers: String,
    producer: Mutex<Arc<FutureProducer>>,
    topic: String,
}

/// The deltas topic's partition count: one, so followers read one ordered
/// stream (a delta is one message per written batch).
pub const DELTA_PARTITIONS: i32 = 1;

impl KafkaDeltas {
    pub fn new(brokers: &str, topic: &str) -> anyhow::Result<Self> {
        Ok(Self {
            brokers: brokers.to_owned(),
            producer: Mutex::new(Arc::new(producer(brokers)?)),
            topic: topic.to_owned(),
        })
    }

    /// Sends `deltas` in order and waits for every ack. A failure other
    /// than a timeout (a broker that lost the idempotent producer's state in
    /// a restart rejects it for good) gets a fresh producer for the retry.
    pub async fn publish(&self, deltas: &[UsageDelta]) -> anyhow::Result<()> {
        let p = self.producer.lock().unwrap().clone();
        for d in deltas {
            let key = d.partition.to_string();
            let body = d.to_json();
            let rec: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.topic)
                .partition(0)
                .key(key.as_str())
                .payload(body.as_slice());
            if let Err((e, _)) = p.send(rec, Duration::from_secs(10)).await {
                if e.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::MessageTimedOut)
                {
                    tracing::warn!(error = %e, "usage delta producer rejected; creating a new one");
                    let mut cur = self.producer.lock().unwrap();
                    if Arc::ptr_eq(&cur, &p) {
                        *cur = Arc::new(producer(&self.brokers)?);
                    }
                }
                anyhow::bail!("usage delta produce failed: {e}");
            }
        }
        Ok(())
    }

    /// [`Self::publish`], retried until it succeeds or `stop` turns true.
    async fn publish_retrying(
        &self,
        deltas: &[UsageDelta],
        metrics: &Metrics,
        stop: &watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.publish(deltas).await {
                Ok(()) => {
                    metrics.deltas_published.inc_by(deltas.len() as u64);
                    return Ok(());
                }
                Err(e) if *stop.borrow() => return Err(e.context("giving up on shutdown")),
                Err(e) => {
                    metrics.write_retries.inc();
                    tracing::warn!(error = %format!("{e:#}"), backoff_ms = backoff.as_millis() as u64, "usage delta publication failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Records revoked partitions so the loop can drop their state.
#[derive(Default, Clone)]
pub struct RebalanceContext {
    revoked: Arc<Mutex<Vec<i32>>>,
}

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, _c: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut r = self.revoked.lock().unwrap();
            r.extend(tpl.elements().iter().map(|e| e.partition()));
            tracing::info!(partitions = ?tpl.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(), "partitions revoked");
        }
    }
    fn post_rebalance(
        &self,
        _c: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(partitions = ?tpl.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(), "partitions assigned");
        }
    }
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub brokers: String,
    pub topic: String,
    pub dlq_topic: String,
    /// Where each written batch's usage delta is published.
    pub deltas_topic: String,
    pub group_id: String,
    pub partitions: i32,
    pub batch_max_events: usize,
    pub batch_max_wait: Duration,
    /// `None`: join the consumer group and let it assign partitions (the
    /// default). `Some(partitions)`: consume exactly these, resuming from the
    /// store's offsets, with the group used only for offset commits. Static
    /// assignment suits one aggregator per partition set under an external
    /// supervisor, and brokers whose group coordinator is unreliable (tansu
    /// 0.6.0 keeps SIGKILLed members in a group, see README).
    pub static_partitions: Option<Vec<i32>>,
    /// Fault injection for tests: abort after this many written batches,
    /// before the last one's delta is published.
    pub fault_abort_before_delta: Option<u64>,
}

pub fn consumer(cfg: &PipelineConfig) -> anyhow::Result<StreamConsumer<RebalanceContext>> {
    let c: StreamConsumer<RebalanceContext> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        // Bounds how long a fetch waits for data: event-to-queryable
        // latency against fewer fetch round trips (librdkafka's 500 ms
        // default doubles the p99 at 2,000 events/s; see BENCHMARKS.md).
        .set("fetch.wait.max.ms", "100")
        .create_with_context(RebalanceContext::default())?;
    if cfg.static_partitions.is_none() {
        c.subscribe(&[&cfg.topic])?;
    }
    Ok(c)
}

/// Runs the consumer loop until `shutdown` turns true. On shutdown the batch
/// in hand is finished and committed first.
pub async fn run<W: UsageWriter>(
    cfg: PipelineConfig,
    writer: Arc<W>,
    meters: Arc<MeterCatalog>,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    for t in [&cfg.topic, &cfg.dlq_topic, &cfg.deltas_topic] {
        let n = if t == &cfg.topic {
            cfg.partitions
        } else if t == &cfg.deltas_topic {
            DELTA_PARTITIONS
        } else {
            1
        };
        ensure_topic(&cfg.brokers, t, n).await?;
    }
    let consumer = consumer(&cfg)?;
    let dlq = KafkaDeadLetters::new(&cfg.brokers, &cfg.dlq_topic, &cfg.topic)?;
    let deltas = KafkaDeltas::new(&cfg.brokers, &cfg.deltas_topic)?;
    let mut proc = Processor::new(writer, meters, metrics.clone());
    if let Some(parts) = &cfg.static_partitions {
        let mut tpl = TopicPartitionList::new();
        for p in parts {
            // One past the highest offset in the store, whatever Kafka
            // committed.
            let off = match proc.stored_max_offset(*p, &shutdown).await? {
                Some(o) => Offset::Offset(o as i64 + 1),
                None => Offset::Beginning,
            };
            tpl.add_partition_offset(&cfg.topic, *p, off)?;
        }
        consumer.assign(&tpl)?;
        tracing::info!(partitions = ?parts, "partitions statically assigned");
        deltas
            .publish_retrying(&proc.take_heads(), &metrics, &shutdown)
            .await?;
    }
    let revoked = consumer.context().revoked.clone();
    let mut last_lag = Instant::now();
    let mut written = 0u64;
    loop {
        let mut msgs = Vec::new();
        let deadline = tokio::time::Instant::now() + cfg.batch_max_wait;
        let mut stopping = false;
        while msgs.len() < cfg.batch_max_events {
            tokio::select! {
                biased;
                _ = shutdown.changed() => { stopping = true; break }
                r = consumer.recv() => match r {
                    Ok(m) => msgs.push(Message {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(|k| k.to_vec()),
                        payload: m.payload().map(|p| p.to_vec()),
                    }),
                    Err(e) => { tracing::warn!(error = %e, "kafka consume error"); tokio::time::sleep(Duration::from_millis(200)).await; }
                },
                _ = tokio::time::sleep_until(deadline), if !msgs.is_empty() => break,
                // While idle, wake up now and then to report lag.
                _ = tokio::time::sleep(LAG_REPORT_EVERY), if msgs.is_empty() => break,
            }
        }
        let gone: Vec<i32> = std::mem::take(&mut *revoked.lock().unwrap());
        if !gone.is_empty() {
            // Messages of partitions we no longer own are left to the new
            // owner, which resumes from the store's offsets.
            msgs.retain(|m| !gone.contains(&m.partition));
            proc.revoke(&gone);
        }
        if !msgs.is_empty() {
            let (n, t) = (msgs.len(), Instant::now());
            let done = proc.process_batch(msgs, &dlq, &shutdown).await?;
            if done.deltas.iter().any(|d| !d.is_head()) {
                written += 1;
                if cfg.fault_abort_before_delta == Some(written) {
                    tracing::error!(
                        batches = written,
                        "fault injection: aborting before the delta is published"
                    );
                    std::process::abort();
                }
            }
            // Followers see the batch before Kafka forgets it.
            deltas
                .publish_retrying(&done.deltas, &metrics, &shutdown)
                .await?;
            let commits = done.commits;
            tracing::debug!(
                messages = n,
                process_ms = t.elapsed().as_millis() as u64,
                "batch processed"
            );
            let mut tpl = TopicPartitionList::new();
            for (p, next) in &commits {
                tpl.add_partition_offset(&cfg.topic, *p, Offset::Offset(*next))?;
            }
            // Asynchronous: Kafka's committed offset only saves re-reading;
            // the store's offsets are authoritative, so a lost commit is
            // harmless, and waiting for it would stall the next batch.
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                tracing::warn!(error = %e, "offset commit failed");
            }
        }
        if last_lag.elapsed() >= LAG_REPORT_EVERY {
            last_lag = Instant::now();
            report_lag(&consumer, &cfg.topic, &metrics);
        }
        if stopping || *shutdown.borrow() {
            tracing::info!("aggregator loop stopped");
            return Ok(());
        }
    }
}

/// How often consumer lag is measured, busy or idle.
const LAG_REPORT_EVERY: Duration = Duration::from_secs(2);

fn report_lag(consumer: &StreamConsumer<RebalanceContext>, topic: &str, metrics: &Metrics) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let Ok(committed) = consumer.committed_offsets(assignment, Duration::from_millis(500)) else {
        return;
    };
    for e in committed.elements() {
        if let Ok((_, high)) =
            consumer.fetch_watermarks(topic, e.partition(), Duration::from_millis(500))
        {
            let pos = match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            };
            metrics
                .consumer_lag
                .with_label_values(&[&e.partition().to_string()])
                .set((high - pos).max(0));
        }
    }
}
