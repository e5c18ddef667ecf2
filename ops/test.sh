#!/usr/bin/env bash
# The project's single test command: install what is missing, start private
# Kafka/ClickHouse/PostgreSQL, run the whole workspace's tests with nextest,
# stop the services. Extra arguments go to `cargo nextest run`.
# TALLY_KEEP_SERVICES=1 leaves the services running afterwards.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# cargo-installed tools; clickhouse-server and runuser live in /usr/sbin.
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin"

bash ops/install.sh

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    if [[ ${TALLY_KEEP_SERVICES:-0} != 1 ]]; then
        bash ops/services.sh stop all || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bash ops/services.sh start all
eval "$(bash ops/services.sh env)"
# Integration tests fail (instead of skipping) when a service is missing.
export TALLY_REQUIRE_SERVICES=1

status=0
cargo nextest run --workspace --no-fail-fast "$@" || status=$?
exit "$status"
