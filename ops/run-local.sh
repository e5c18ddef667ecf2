#!/usr/bin/env bash
# Quick start: runs the local pipeline (collector → tansu → aggregator →
# ClickHouse) with the workload simulator feeding it live, and prints usage
# totals as they grow. Ctrl-C stops the processes (the services keep
# running; `ops/services.sh stop` stops them).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

bash ops/install.sh
bash ops/services.sh start all
eval "$(bash ops/services.sh env)"
cargo build --release -p collector -p aggregator

data=.tally-data/demo
mkdir -p "$data"
port=${TALLY_DEMO_PORT:-8080}
cat > "$data/collector.toml" <<TOML
listen = "127.0.0.1:$port"
checkpoint_dir = "$data/checkpoints"
[kafka]
brokers = "$TALLY_KAFKA_BROKERS"
[spool]
dir = "$data/spool"
[auth]
# SHA-256 of the demo ingest key "dev-collector-key".
key_sha256 = ["6aeb24d354f739abe684aa49a3f80e49886a9afe984d9f52e4d1a77292073c53"]
[[sources]]
kind = "simulator"
name = "simulator"
customers = 5
apps_per_customer = 3
seed = 7
interval_secs = 10
TOML

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
target/release/aggregator run --metrics-listen 127.0.0.1:9464 2> "$data/aggregator.log" &
pids+=($!)
target/release/collector serve --config "$data/collector.toml" 2> "$data/collector.log" &
pids+=($!)

cat <<TXT

Tally pipeline running (logs in $data/):
  ingest API        POST http://127.0.0.1:$port/v1/events   (Authorization: Bearer dev-collector-key)
  collector metrics http://127.0.0.1:$port/metrics
  aggregator metrics http://127.0.0.1:9464/metrics
  usage queries     target/release/aggregator query --customer sim-c0000 --meter compute \\
                      --from $(date -u +%Y-%m-01T00:00:00Z) --to $(date -u -d '+1 day' +%Y-%m-%dT00:00:00Z) --group-by app --granularity hour
The simulator sends 5 customers x 3 apps every 10 s. Totals (customer/app/meter):
TXT
while sleep 15; do
  echo "--- $(date -u +%H:%M:%S)"
  target/release/aggregator totals 2>/dev/null | head -n 12 || true
done
