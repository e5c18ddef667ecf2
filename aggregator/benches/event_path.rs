//! CPU per event on the aggregator's path, without I/O: batches of 1,000
//! messages as the collector produces them (requests and compute, stamped
//! with their acceptance) through `Processor::process`: decode, validate,
//! deduplicate (against the partition's keys and the batch), raw rows and
//! rollups, over a writer that stores nothing (every store call returns at
//! once), so only the aggregator's own work is timed. Each iteration gets
//! new event ids and offsets (prepared outside the timing), so nothing is
//! skipped as stored or duplicate. Baseline in the same run: `serde_json`
//! parsing the same payloads into `Value`s. Reported per event.
//!
//! `cargo bench -p aggregator --bench event_path`; ns/event figures and
//! their ratio in BENCHMARKS.md.

use aggregator::metrics::Metrics;
use aggregator::pipeline::{DeadLetter, DeadLetterSink, Message, Processor};
use aggregator::rollup::{RollupKey, RollupValue};
use aggregator::store::{PartitionState, RawRow, UsageWriter};
use chrono::{DateTime, Utc};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use schemas::MeterCatalog;
use serde_json::Value;
use std::sync::Arc;

const EVENTS: usize = 1000;

/// A store that keeps nothing: the processor's own work is what is timed.
struct NullWriter;

impl UsageWriter for NullWriter {
    async fn migrate(&self) -> anyhow::Result<()> {
        Ok(())
    }
    async fn load_partition(&self, _: u32, _: DateTime<Utc>) -> anyhow::Result<PartitionState> {
        Ok(PartitionState::default())
    }
    async fn write_raw(&self, rows: Vec<RawRow>) -> anyhow::Result<()> {
        black_box(rows.len());
        Ok(())
    }
    async fn load_rollups(
        &self,
        _: Vec<(String, i64)>,
    ) -> anyhow::Result<Vec<(RollupKey, RollupValue)>> {
        Ok(vec![])
    }
    async fn write_rollups(&self, rows: Vec<(RollupKey, RollupValue)>) -> anyhow::Result<()> {
        black_box(rows.len());
        Ok(())
    }
}

struct NoLetters;

impl DeadLetterSink for NoLetters {
    async fn send(&self, letters: Vec<DeadLetter>) -> anyhow::Result<()> {
        anyhow::bail!("{} dead letters in a bench of valid events", letters.len())
    }
}

/// One batch of messages starting at `offset`, ids unique to `round`, as
/// the collector produces them (`collector::sink::Envelope::accept`).
fn messages(round: u64, offset: i64, at: DateTime<Utc>) -> Vec<Message> {
    let meters = MeterCatalog::default_catalog();
    testkit::pipeline::router_and_inventory_events(&round.to_string(), at, EVENTS)
        .into_iter()
        .enumerate()
        .map(|(i, ev)| {
            let raw = schemas::event::parse_single(&serde_json::to_vec(&ev).unwrap())
                .unwrap()
                .unwrap();
            let env = collector::Envelope::accept(raw, &meters, at).unwrap();
            Message {
                partition: 0,
                offset: offset + i as i64,
                key: Some(env.key.into_bytes()),
                payload: Some(env.payload),
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let now = Utc::now();
    let mut p = Processor::new(
        Arc::new(NullWriter),
        Arc::new(MeterCatalog::default_catalog()),
        Metrics::new(),
    );
    let (_tx, stop) = tokio::sync::watch::channel(false);
    let mut round = 0u64;
    let mut next = move || {
        round += 1;
        messages(round, (round as i64) * EVENTS as i64, now)
    };
    // Every event is written once: nothing is refused or skipped.
    let commits = rt.block_on(p.process(next(), &NoLetters, &stop)).unwrap();
    assert_eq!(commits.get(&0), Some(&(2 * EVENTS as i64)));
    let payloads: Vec<Vec<u8>> = next().into_iter().filter_map(|m| m.payload).collect();

    let mut g = c.benchmark_group("aggregator_event_path");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.bench_function(
        "Processor::process (decode, validate, dedup, roll up)",
        |b| {
            b.iter_batched(
                &mut next,
                |msgs| black_box(rt.block_on(p.process(msgs, &NoLetters, &stop)).unwrap()),
                BatchSize::SmallInput,
            )
        },
    );
    g.bench_function(
        "baseline: serde_json::from_slice::<Value> per payload",
        |b| {
            b.iter(|| {
                let mut n = 0;
                for pl in &payloads {
                    let v: Value = serde_json::from_slice(black_box(pl)).unwrap();
                    n += v.as_object().map_or(0, |o| o.len());
                }
                black_box(n)
            })
        },
    );
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
