//! The aggregator's Kafka edge (the `kafka` feature): the consumer group
//! that feeds [`Processor`] batches, the dead-letter producer, and the
//! commit of offsets after each batch is stored. Everything that decides
//! what is counted lives in [`crate::pipeline`], which knows no Kafka.

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
    for t in [&cfg.topic, &cfg.dlq_topic] {
        ensure_topic(
            &cfg.brokers,
            t,
            if t == &cfg.topic { cfg.partitions } else { 1 },
        )
        .await?;
    }
    let consumer = consumer(&cfg)?;
    let dlq = KafkaDeadLetters::new(&cfg.brokers, &cfg.dlq_topic, &cfg.topic)?;
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
    }
    let revoked = consumer.context().revoked.clone();
    let mut last_lag = Instant::now();
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
            let commits = proc.process(msgs, &dlq, &shutdown).await?;
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
