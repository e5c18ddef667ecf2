//! The aggregator's consume → validate → deduplicate → write → commit loop.
//!
//! [`Processor`] holds the logic and knows no Kafka: it takes a batch of
//! messages and a [`UsageWriter`], so the embedded mode can drive it too.
//! [`run`] wires it to a Kafka consumer group and a dead-letter producer.
//!
//! Per batch, in this order (the delivery guarantee depends on it):
//!
//! 1. skip messages whose offset is at or below the partition's highest
//!    stored offset (already written; Kafka redelivered them);
//! 2. decode and validate each message; invalid ones are collected as dead
//!    letters, never stalling the partition;
//! 3. drop duplicates by (`source`, `id`) against the partition's dedup set
//!    and the batch itself;
//! 4. send dead letters to the dead-letter topic and wait for the acks;
//! 5. write raw rows (one atomic insert), then the updated cumulative
//!    rollups (idempotent), retrying each until it succeeds;
//! 6. only then add the batch's keys to the dedup set and update caches;
//! 7. commit the offsets to Kafka.
//!
//! A crash at any point leaves the store either without the batch (it is
//! consumed again) or with it (its offsets are skipped on restart, and
//! missing rollups are recomputed, see `store/clickhouse.rs`).

use crate::dedup::{fingerprint, month_start, DedupSet};
use crate::metrics::Metrics;
use crate::rollup::{hour_of, RollupKey, RollupValue};
use crate::store::{to_stored_precision, RawRow, UsageWriter};
use chrono::{DateTime, TimeZone, Utc};
use futures::future::BoxFuture;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use schemas::event::previous_month_start;
use schemas::{parse_single, AcceptWindow, FieldError, MeterCatalog, UsageEvent};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A consumed message, owned.
#[derive(Debug, Clone)]
pub struct Message {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub message: Message,
    pub code: String,
    pub reason: String,
}

/// Where invalid messages go.
pub trait DeadLetterSink: Send + Sync {
    fn send(&self, letters: Vec<DeadLetter>) -> BoxFuture<'_, anyhow::Result<()>>;
}

#[derive(Debug)]
struct PartState {
    max_offset: Option<u64>,
    dedup: DedupSet,
    /// `dedup` holds the key of every stored event whose time is at or
    /// after this instant.
    floor: DateTime<Utc>,
    /// When `floor` was last moved below the usual window to cover an
    /// event accepted before a month boundary (see [`Processor::cover`]).
    widened: Option<Instant>,
}

/// How long a widened dedup window is kept after the last event that
/// needed it, before `prune` drops the older keys again.
const WIDENED_KEEP: Duration = Duration::from_secs(3600);

pub struct Processor<W: UsageWriter> {
    writer: Arc<W>,
    meters: Arc<MeterCatalog>,
    metrics: Metrics,
    parts: HashMap<i32, PartState>,
    rollups: HashMap<RollupKey, RollupValue>,
    loaded_pairs: HashSet<(String, i64)>,
    last_prune: Instant,
}

/// Outcome of one batch: the next offset to commit per partition.
pub type Commits = BTreeMap<i32, i64>;

async fn retry<T, F, Fut>(
    what: &str,
    metrics: &Metrics,
    stop: &watch::Receiver<bool>,
    mut f: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                if *stop.borrow() {
                    return Err(e.context(format!("{what}: giving up on shutdown")));
                }
                metrics.write_retries.inc();
                tracing::warn!(
                    error = format!("{e:#}"),
                    what,
                    backoff_ms = backoff.as_millis() as u64,
                    "store operation failed; retrying"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

impl<W: UsageWriter> Processor<W> {
    pub fn new(writer: Arc<W>, meters: Arc<MeterCatalog>, metrics: Metrics) -> Self {
        Self {
            writer,
            meters,
            metrics,
            parts: HashMap::new(),
            rollups: HashMap::new(),
            loaded_pairs: HashSet::new(),
            last_prune: Instant::now(),
        }
    }

    /// Forgets everything about partitions this consumer no longer owns;
    /// they are reloaded from the store if they come back.
    pub fn revoke(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.parts.remove(p);
        }
        // The rollup cache is not indexed by partition; drop it whole and
        // reload lazily (it only holds recent hours).
        self.loaded_pairs.clear();
        self.rollups.clear();
    }

    /// Loads a partition's state and returns the offset to resume from:
    /// one past the highest offset in the store, whatever Kafka committed.
    pub async fn resume_offset(
        &mut self,
        p: i32,
        stop: &watch::Receiver<bool>,
    ) -> anyhow::Result<Offset> {
        Ok(match self.stored_max_offset(p, stop).await? {
            Some(o) => Offset::Offset(o as i64 + 1),
            None => Offset::Beginning,
        })
    }

    /// (Re)loads a partition's state; returns the highest offset stored.
    pub async fn stored_max_offset(
        &mut self,
        p: i32,
        stop: &watch::Receiver<bool>,
    ) -> anyhow::Result<Option<u64>> {
        self.parts.remove(&p);
        self.ensure_partition(p, stop).await?;
        Ok(self.parts[&p].max_offset)
    }

    async fn ensure_partition(
        &mut self,
        p: i32,
        stop: &watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        if self.parts.contains_key(&p) {
            return Ok(());
        }
        self.load_partition(p, previous_month_start(Utc::now()), stop)
            .await
    }

    /// Makes sure partition `p`'s dedup set reaches back to `oldest`, the
    /// earliest event time of a batch. The usual window (keys of events
    /// since the start of the previous month) covers every event accepted
    /// this month or last; an event accepted before a month boundary and
    /// processed after it (Kafka lag, a spool replay after an outage) can
    /// be older, so the partition's keys are reloaded from the store from
    /// the start of that event's month. Rare, and bounded by the store.
    async fn cover(
        &mut self,
        p: i32,
        oldest: DateTime<Utc>,
        stop: &watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let st = self.parts.get_mut(&p).expect("partition loaded");
        if oldest >= st.floor {
            if st.widened.is_some() {
                st.widened = Some(Instant::now());
            }
            return Ok(());
        }
        let floor = month_start(oldest);
        tracing::info!(partition = p, from = %floor, "widening the dedup window for events accepted before a month boundary");
        self.metrics.dedup_window_widened.inc();
        self.load_partition(p, floor, stop).await?;
        self.parts.get_mut(&p).expect("just loaded").widened = Some(Instant::now());
        Ok(())
    }

    /// (Re)loads partition `p`'s offsets and dedup keys of events since
    /// `window`.
    async fn load_partition(
        &mut self,
        p: i32,
        window: DateTime<Utc>,
        stop: &watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let writer = self.writer.clone();
        let st = retry("loading partition state", &self.metrics, stop, || {
            writer.load_partition(p as u32, window)
        })
        .await?;
        self.metrics.rollup_repairs.inc_by(st.repaired_keys as u64);
        let mut dedup = DedupSet::default();
        for (source, id, t) in &st.seen {
            dedup.insert(fingerprint(source, id), Utc.timestamp_opt(*t, 0).unwrap());
        }
        tracing::info!(partition = p, max_offset = ?st.max_offset, dedup_keys = dedup.len(), repaired = st.repaired_keys, "partition state loaded");
        self.parts.insert(
            p,
            PartState {
                max_offset: st.max_offset,
                dedup,
                floor: window,
                widened: None,
            },
        );
        Ok(())
    }

    fn prune(&mut self) {
        if self.last_prune.elapsed() < Duration::from_secs(60) {
            return;
        }
        self.last_prune = Instant::now();
        let now = Utc::now();
        let window = previous_month_start(now);
        for st in self.parts.values_mut() {
            if st.widened.is_some_and(|t| t.elapsed() < WIDENED_KEEP) {
                continue;
            }
            st.widened = None;
            st.floor = st.floor.max(window);
            st.dedup.prune(st.floor);
        }
        // Keep the rollup cache to recent hours; older ones reload on demand.
        let min_hour = hour_of(now) - 3 * 3600;
        self.rollups.retain(|k, _| k.hour >= min_hour);
        self.loaded_pairs.retain(|(_, h)| *h >= min_hour);
    }

    /// Processes one batch through steps 1–6; returns the offsets to commit.
    pub async fn process(
        &mut self,
        msgs: Vec<Message>,
        dlq: &dyn DeadLetterSink,
        stop: &watch::Receiver<bool>,
    ) -> anyhow::Result<Commits> {
        let mut commits = Commits::new();
        let mut partitions: Vec<i32> = msgs.iter().map(|m| m.partition).collect();
        partitions.sort_unstable();
        partitions.dedup();
        for p in partitions {
            self.ensure_partition(p, stop).await?;
        }
        // 1–2. Skip what is stored; decode and validate the rest. Each
        // event is judged against the accept window of the instant the
        // collector accepted it (`schemas::event::ACCEPTED_AT`), never
        // against this process's clock: an event answered 2xx is counted
        // however late it is processed.
        let now = Utc::now();
        let mut letters = Vec::new();
        let mut valid: Vec<(Message, UsageEvent)> = Vec::with_capacity(msgs.len());
        let mut oldest: HashMap<i32, DateTime<Utc>> = HashMap::new();
        for m in msgs {
            self.metrics.messages_consumed.inc();
            let next = commits.entry(m.partition).or_insert(m.offset + 1);
            *next = (*next).max(m.offset + 1);
            let st = &self.parts[&m.partition];
            if st.max_offset.is_some_and(|max| m.offset as u64 <= max) {
                self.metrics.messages_skipped_stored.inc();
                continue;
            }
            match decode(&m, &self.meters, now) {
                Ok(ev) => {
                    let o = oldest.entry(m.partition).or_insert(ev.time);
                    *o = (*o).min(ev.time);
                    valid.push((m, ev));
                }
                Err((code, reason)) => letters.push(DeadLetter {
                    message: m,
                    code: code.to_owned(),
                    reason,
                }),
            }
        }
        for (p, t) in oldest {
            self.cover(p, t, stop).await?;
        }

        // 3. Duplicates, against the partition's keys and the batch itself.
        let mut rows: Vec<RawRow> = Vec::new();
        let mut new_keys: Vec<(i32, u128, DateTime<Utc>)> = Vec::new();
        let mut batch_seen: HashSet<u128> = HashSet::new();
        let mut written_max: HashMap<i32, u64> = HashMap::new();
        let mut duplicates = 0u64;
        for (m, ev) in valid {
            let st = &self.parts[&m.partition];
            let fp = fingerprint(&ev.source, &ev.id);
            if st.dedup.contains(fp) || !batch_seen.insert(fp) {
                duplicates += 1;
                continue;
            }
            new_keys.push((m.partition, fp, ev.time));
            let w = written_max.entry(m.partition).or_insert(0);
            *w = (*w).max(m.offset as u64);
            for r in ev.records {
                rows.push(RawRow {
                    customer: ev.customer.clone(),
                    meter: r.meter.clone(),
                    time: to_stored_precision(ev.time),
                    app: r.app.clone(),
                    dims: r.dims_json(),
                    quantity: r.quantity,
                    unique_value: r.unique_value.clone().unwrap_or_default(),
                    source: ev.source.clone(),
                    id: ev.id.clone(),
                    event_type: ev.event_type.clone(),
                    partition: m.partition as u32,
                    offset: m.offset as u64,
                });
            }
        }
        self.metrics.events_duplicate.inc_by(duplicates);

        // 4. dead letters first: their offsets are committed with the batch.
        if !letters.is_empty() {
            for l in &letters {
                self.metrics
                    .events_dead_lettered
                    .with_label_values(&[&l.code])
                    .inc();
                tracing::warn!(partition = l.message.partition, offset = l.message.offset, code = %l.code, reason = %l.reason, "dead-lettered");
            }
            retry("dead-lettering", &self.metrics, stop, || {
                dlq.send(letters.clone())
            })
            .await?;
        }
        if rows.is_empty() {
            self.prune();
            return Ok(commits);
        }

        // 5a. Rollups: load the current value of every (customer, hour) the
        // batch touches, then apply the rows to copies.
        let mut pairs: Vec<(String, i64)> = rows
            .iter()
            .map(|r| (r.customer.clone(), hour_of(r.time)))
            .filter(|p| !self.loaded_pairs.contains(p))
            .collect();
        pairs.sort();
        pairs.dedup();
        if !pairs.is_empty() {
            let writer = self.writer.clone();
            let loaded = retry("loading rollups", &self.metrics, stop, || {
                writer.load_rollups(pairs.clone())
            })
            .await?;
            self.rollups.extend(loaded);
            self.loaded_pairs.extend(pairs);
        }
        let mut touched: HashMap<RollupKey, RollupValue> = HashMap::new();
        for r in &rows {
            let key = RollupKey {
                customer: r.customer.clone(),
                meter: r.meter.clone(),
                hour: hour_of(r.time),
                app: r.app.clone(),
                dims: r.dims.clone(),
            };
            let v = touched
                .entry(key)
                .or_insert_with_key(|k| self.rollups.get(k).cloned().unwrap_or_default());
            v.add(r.time, r.quantity);
            v.partition = r.partition;
            v.version = rollup_version(written_max[&(r.partition as i32)]);
        }

        // 5b. Raw rows (atomic), then rollups (idempotent); or both in one
        // atomic write where the store can.
        let n = new_keys.len() as u64;
        let writer = self.writer.clone();
        let rollup_rows: Vec<(RollupKey, RollupValue)> = touched
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if writer.atomic_batches() {
            retry("writing usage", &self.metrics, stop, || {
                writer.write_batch(rows.clone(), rollup_rows.clone())
            })
            .await?;
        } else {
            retry("writing raw usage", &self.metrics, stop, || {
                writer.write_raw(rows.clone())
            })
            .await?;
            retry("writing rollups", &self.metrics, stop, || {
                writer.write_rollups(rollup_rows.clone())
            })
            .await?;
        }

        // 6. Durable: now remember it.
        self.rollups.extend(touched);
        for (p, fp, t) in new_keys {
            self.parts.get_mut(&p).unwrap().dedup.insert(fp, t);
        }
        for (p, max) in written_max {
            let st = self.parts.get_mut(&p).unwrap();
            st.max_offset = Some(st.max_offset.map_or(max, |m| m.max(max)));
        }
        self.metrics.events_written.inc_by(n);
        self.prune();
        Ok(commits)
    }
}

/// Decodes and validates one message, strictly (duplicate keys and inexact
/// numbers refused, as the collector does), against the accept window of
/// its acceptance stamp; an invalid one becomes a dead letter's code and
/// reason.
fn decode(
    m: &Message,
    meters: &MeterCatalog,
    now: DateTime<Utc>,
) -> Result<UsageEvent, (&'static str, String)> {
    let Some(payload) = &m.payload else {
        return Err(("empty_payload", "message has no payload".into()));
    };
    let raw = match parse_single(payload) {
        Ok(Ok(raw)) => raw,
        Ok(Err(errs)) => return Err(field_errors(errs)),
        Err(e) => return Err((e.code(), format!("payload: {e}"))),
    };
    let window = AcceptWindow::of_event(&raw, now).map_err(|e| field_errors(vec![e]))?;
    UsageEvent::validate(&raw, meters, &window).map_err(field_errors)
}

fn field_errors(errs: Vec<FieldError>) -> (&'static str, String) {
    let reason = errs
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect::<Vec<_>>()
        .join("; ");
    (errs[0].code, reason)
}

/// The rollup version a batch writes: its highest offset in the partition
/// plus one. Version 0 is never written by a partition: it belongs to rows
/// imported from an embedded data directory (`store::IMPORTED_PARTITION`),
/// so a live update of the same key always wins over the imported value.
pub fn rollup_version(max_offset: u64) -> u64 {
    max_offset + 1
}

/// Header names on dead letters.
pub const DLQ_REASON: &str = "tally-dlq-reason";
pub const DLQ_CODE: &str = "tally-dlq-code";
pub const DLQ_SOURCE_PARTITION: &str = "tally-dlq-source-partition";
pub const DLQ_SOURCE_OFFSET: &str = "tally-dlq-source-offset";
pub const DLQ_SOURCE_TOPIC: &str = "tally-dlq-source-topic";

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
    fn send(&self, letters: Vec<DeadLetter>) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
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
        })
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
            let off = proc.resume_offset(*p, &shutdown).await?;
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

/// Creates a topic if missing (shared with the collector's helper).
pub async fn ensure_topic(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::error::RDKafkaErrorCode;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for r in admin
        .create_topics(
            [&t],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?
    {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("creating topic {name}: {code}"),
        }
    }
    Ok(())
}

/// Reads a header as UTF-8.
pub fn header<'a>(h: &'a rdkafka::message::BorrowedHeaders, name: &str) -> Option<&'a str> {
    h.iter()
        .find(|x| x.key == name)
        .and_then(|x| x.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}
