//! CPU per event on the collector's path, without I/O: a batch body of
//! 1,000 CloudEvents (requests and compute, as a router and an inventory
//! source send them) parsed, validated against the meter catalog and the
//! accept window, stamped, keyed by customer and serialized for Kafka
//! (`collector::api::validate_body`, everything the ingest handler does
//! between reading the body and handing it to the sink). Baseline in the
//! same run: `serde_json` parsing the same bytes into `Value`s and nothing
//! else. Reported per event (criterion's time per batch / 1,000).
//!
//! `cargo bench -p collector --bench event_path`; ns/event figures and
//! their ratio in BENCHMARKS.md.

use chrono::Utc;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use schemas::MeterCatalog;
use serde_json::Value;

const EVENTS: usize = 1000;

/// A batch as collectors send it: half requests, half compute.
fn batch_body() -> Vec<u8> {
    let events = testkit::pipeline::router_and_inventory_events("c", Utc::now(), EVENTS);
    serde_json::to_vec(&events).unwrap()
}

fn bench(c: &mut Criterion) {
    let body = batch_body();
    let meters = MeterCatalog::default_catalog();
    let now = Utc::now();
    // The path must accept every event (a bench of refusals measures
    // nothing useful).
    let v = collector::api::validate_body(&body, true, &meters, now)
        .unwrap_or_else(|_| panic!("the batch is refused"));
    assert_eq!((v.envelopes.len(), v.errors.len()), (EVENTS, 0));
    let mut g = c.benchmark_group("collector_event_path");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.bench_function("validate_body (parse, validate, key, serialize)", |b| {
        b.iter(|| {
            let v = collector::api::validate_body(black_box(&body), true, &meters, now)
                .unwrap_or_else(|_| panic!("refused"));
            black_box(v.envelopes.len())
        })
    });
    g.bench_function("baseline: serde_json::from_slice::<Vec<Value>>", |b| {
        b.iter(|| {
            let v: Vec<Value> = serde_json::from_slice(black_box(&body)).unwrap();
            black_box(v.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
