#!/usr/bin/env bash
# Benchmarks (release builds) against private services; results in
# bench-results/*.json and on stdout. Copy the figures into BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin"
bash ops/install.sh
bash ops/services.sh start all
eval "$(bash ops/services.sh env)"
# The benchmark spawns the release binaries next to it.
cargo build --release -p collector -p aggregator
cargo bench -p aggregator --bench pipeline
# CPU per event without I/O, each beside serde_json parsing the same bytes.
cargo bench -p collector --bench event_path
cargo bench -p aggregator --bench event_path
# Billing: the rating engine (criterion) and a finalization run of
# 10,000 customers x 20 series over a month of hourly rollups.
cargo bench -p billing-api --bench rating
cargo bench -p billing-api --bench finalize
# Quota checks under wrk against a trivial axum handler, 100,000 customers.
command -v wrk >/dev/null || apt-get install -y wrk
cargo bench -p billing-api --bench quota
# Embedded mode: ingest vs a raw SQLite batch insert, latency, RSS with
# 1,000 customers (spawns the release `tally`).
cargo build --release -p embedded --bin tally
cargo bench -p embedded --bench embedded
# Acknowledged-to-quota staleness, both modes, at 2,000 and 20,000 events/s.
cargo build --release -p collector -p aggregator -p billing-api -p embedded --bins
cargo bench -p embedded --bench staleness
