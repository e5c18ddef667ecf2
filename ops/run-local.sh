#!/usr/bin/env bash
# Quick start: runs the local pipeline (collector → tansu → aggregator →
# ClickHouse) with the workload simulator feeding it live, and billing-api
# over it (the simulated customers subscribed to the default plans); prints
# usage totals and month-to-date invoice drafts as they grow. Ctrl-C stops the processes (the services keep
# running; `ops/services.sh stop` stops them).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

bash ops/install.sh
bash ops/services.sh start all
eval "$(bash ops/services.sh env)"
cargo build --release -p collector -p aggregator -p billing-api

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
# billing-api with the demo admin key "dev-admin-key"; TALLY_KAFKA_BROKERS
# (from the services env) makes its quota state follow the aggregator's
# usage deltas.
admin_key=dev-admin-key
TALLY_ADMIN_KEY_SHA256=$(target/release/billing-api hash-key "$admin_key") \
  target/release/billing-api serve --listen 127.0.0.1:8090 2> "$data/billing.log" &
pids+=($!)
api() { curl -sf -H "Authorization: Bearer $admin_key" -H 'Content-Type: application/json' "$@"; }
for _ in $(seq 100); do curl -sf http://127.0.0.1:8090/healthz >/dev/null && break; sleep 0.2; done
month_start=$(date -u +%Y-%m-01T00:00:00Z)
plans=(payg team business payg free)
for i in 0 1 2 3 4; do
  c=sim-c000$i
  api -X POST -d "{\"id\":\"$c\",\"external_id\":\"paas-$i\",\"name\":\"Demo customer $i\"}" \
    http://127.0.0.1:8090/v1/customers >/dev/null 2>&1 || true
  api -X POST -d "{\"plan\":\"${plans[$i]}\",\"starts_at\":\"$month_start\"}" \
    http://127.0.0.1:8090/v1/customers/$c/subscription >/dev/null 2>&1 || true
done
api -X PUT -d "{\"seats\":3,\"at\":\"$month_start\"}" http://127.0.0.1:8090/v1/customers/sim-c0001/seats >/dev/null 2>&1 || true
# A 24-hour customer session for the cost dashboard.
token=$(api -X POST -d '{"ttl_secs":86400}' http://127.0.0.1:8090/v1/customers/sim-c0000/sessions |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])' || true)

cat <<TXT

Tally pipeline running (logs in $data/):
  ingest API        POST http://127.0.0.1:$port/v1/events   (Authorization: Bearer dev-collector-key)
  collector metrics http://127.0.0.1:$port/metrics
  aggregator metrics http://127.0.0.1:9464/metrics
  cost dashboard    http://127.0.0.1:8090/dashboard#token=$token
                    (customer sim-c0000; usage appears as the simulator's hours complete)
  billing API       http://127.0.0.1:8090/v1/...   (Authorization: Bearer dev-admin-key; schemas/openapi.json)
  invoice draft     curl -H 'Authorization: Bearer dev-admin-key' http://127.0.0.1:8090/v1/customers/sim-c0000/invoices/draft
  usage queries     target/release/aggregator query --customer sim-c0000 --meter compute \\
                      --from $(date -u +%Y-%m-01T00:00:00Z) --to $(date -u -d '+1 day' +%Y-%m-%dT00:00:00Z) --group-by app --granularity hour
The simulator sends 5 customers x 3 apps every 10 s. Totals (customer/app/meter):
TXT
while sleep 15; do
  echo "--- $(date -u +%H:%M:%S)"
  target/release/aggregator totals 2>/dev/null | head -n 12 || true
  for i in 0 1 2 3 4; do
    api http://127.0.0.1:8090/v1/customers/sim-c000$i/invoices/draft 2>/dev/null |
      python3 -c 'import json,sys; d=json.load(sys.stdin); print("  draft %s: %s %s (%d lines)" % (d["customer_id"], d["total"], d["currency"], len(d["body"]["lines"])))' || true
  done
done
