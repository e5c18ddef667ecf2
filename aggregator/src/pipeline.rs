//! The aggregator's consume → validate → deduplicate → write → commit loop.
//!
//! [`Processor`] holds the logic and knows no Kafka: it takes a batch of
//! messages and a [`UsageWriter`], so the embedded mode can drive it too.
//! `crate::kafka::run` (the `kafka` feature) wires it to a Kafka consumer
//! group and a dead-letter producer.
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
use crate::delta::UsageDelta;
use crate::metrics::Metrics;
use crate::rollup::{hour_of, rollup_version, RollupKey, RollupValue};
use crate::store::{to_stored_precision, RawRow, UsageWriter};
use chrono::{DateTime, TimeZone, Utc};
use schemas::event::previous_month_start;
use schemas::{parse_single, AcceptWindow, FieldError, MeterCatalog, UsageEvent};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
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
    fn send(&self, letters: Vec<DeadLetter>) -> impl Future<Output = anyhow::Result<()>> + Send;
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

/// Rollup keys the processor keeps in memory between batches (see
/// `Processor::cap_rollup_cache`).
const ROLLUP_CACHE_MAX: usize = 100_000;

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
    /// Heads of partitions loaded since the last batch (see [`crate::delta`]).
    heads: Vec<UsageDelta>,
    /// The rollup cache's size that triggers [`Processor::cap_rollup_cache`].
    rollup_cap: usize,
}

/// Outcome of one batch: the next offset to commit per partition.
pub type Commits = BTreeMap<i32, i64>;

/// What one batch did: the offsets to commit, and what it added to the
/// store (one delta per partition written, after a head for each partition
/// loaded since the last batch), for followers of the usage state.
#[derive(Debug, Default)]
pub struct Processed {
    pub commits: Commits,
    pub deltas: Vec<UsageDelta>,
}

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
            heads: Vec::new(),
            rollup_cap: ROLLUP_CACHE_MAX,
        }
    }

    /// The heads of partitions loaded since the last batch (a writer
    /// publishes them as soon as it has loaded its partitions).
    pub fn take_heads(&mut self) -> Vec<UsageDelta> {
        std::mem::take(&mut self.heads)
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

    /// (Re)loads a partition's state; returns the highest offset stored,
    /// from which a consumer resumes (one past it), whatever Kafka
    /// committed.
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
            .await?;
        let version = self.parts[&p].max_offset.map_or(0, rollup_version);
        self.heads.retain(|h| h.partition != p as u32);
        self.heads
            .push(UsageDelta::head(p as u32, version, Utc::now()));
        Ok(())
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

    /// Keeps the rollup cache under [`ROLLUP_CACHE_MAX`] keys: a backfill
    /// (a day of usage of 10,000 customers sent at once) touches every
    /// (customer, hour) once and would otherwise hold them all until the
    /// minute's prune. The oldest hours go first, down to half the cap;
    /// anything dropped is reloaded from the store if touched again.
    fn cap_rollup_cache(&mut self) {
        if self.rollups.len() <= self.rollup_cap {
            return;
        }
        let mut hours: Vec<i64> = self.rollups.keys().map(|k| k.hour).collect();
        hours.sort_unstable();
        let keep_from = hours[hours.len() - ROLLUP_CACHE_MAX / 2];
        self.rollups.retain(|k, _| k.hour >= keep_from);
        self.loaded_pairs.retain(|(_, h)| *h >= keep_from);
        // One hour may hold more keys than the cap: then let the cache grow
        // to twice what it holds before sorting again.
        self.rollup_cap = ROLLUP_CACHE_MAX.max(self.rollups.len() * 2);
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
        self.rollup_cap = ROLLUP_CACHE_MAX.max(self.rollups.len() * 2);
    }

    /// Processes one batch through steps 1–6; returns the offsets to commit.
    pub async fn process(
        &mut self,
        msgs: Vec<Message>,
        dlq: &impl DeadLetterSink,
        stop: &watch::Receiver<bool>,
    ) -> anyhow::Result<Commits> {
        Ok(self.process_batch(msgs, dlq, stop).await?.commits)
    }

    /// [`Processor::process`], with what the batch added to the store.
    pub async fn process_batch(
        &mut self,
        msgs: Vec<Message>,
        dlq: &impl DeadLetterSink,
        stop: &watch::Receiver<bool>,
    ) -> anyhow::Result<Processed> {
        let mut commits = Commits::new();
        self.metrics.batch_messages.observe(msgs.len() as f64);
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
            return Ok(Processed {
                commits,
                deltas: self.take_heads(),
            });
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

        // 6. Durable: now remember it, and say what was added.
        let written_at = Utc::now();
        let mut deltas = self.take_heads();
        let mut parts: Vec<(&i32, &u64)> = written_max.iter().collect();
        parts.sort();
        for (p, max) in parts {
            let prev = self.parts[p].max_offset.map_or(0, rollup_version);
            deltas.push(UsageDelta::of_rows(
                *p as u32,
                prev,
                rollup_version(*max),
                written_at,
                rows.iter().filter(|r| r.partition == *p as u32),
            ));
        }
        self.rollups.extend(touched);
        self.cap_rollup_cache();
        for (p, fp, t) in new_keys {
            self.parts.get_mut(&p).unwrap().dedup.insert(fp, t);
        }
        for (p, max) in written_max {
            let st = self.parts.get_mut(&p).unwrap();
            st.max_offset = Some(st.max_offset.map_or(max, |m| m.max(max)));
        }
        self.metrics.events_written.inc_by(n);
        self.prune();
        Ok(Processed { commits, deltas })
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

/// Header names on dead letters.
pub const DLQ_REASON: &str = "tally-dlq-reason";
pub const DLQ_CODE: &str = "tally-dlq-code";
pub const DLQ_SOURCE_PARTITION: &str = "tally-dlq-source-partition";
pub const DLQ_SOURCE_OFFSET: &str = "tally-dlq-source-offset";
pub const DLQ_SOURCE_TOPIC: &str = "tally-dlq-source-topic";
