#!/usr/bin/env bash
# Install what Tally's tests need: ClickHouse, PostgreSQL, curl, Chromium
# and ChromeDriver (apt; the dashboard's browser test),
# tansu (Kafka-compatible broker) and cargo-nextest (cargo).
# Idempotent: does nothing when everything is already present.
set -euo pipefail

# cargo-installed tools; clickhouse-server and runuser live in /usr/sbin.
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin"

TANSU_VERSION=0.6.0
PG_BIN=/usr/lib/postgresql/15/bin

log() { printf 'install: %s\n' "$*" >&2; }

# Run as root, or through sudo when we are not root.
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        log "need root (or sudo) to run: $*"
        return 1
    fi
}

# --- Debian packages -------------------------------------------------------
if ! command -v clickhouse-server >/dev/null 2>&1 \
    || [[ ! -x $PG_BIN/initdb ]] \
    || ! command -v curl >/dev/null 2>&1 \
    || ! command -v chromium >/dev/null 2>&1 \
    || ! command -v chromedriver >/dev/null 2>&1; then
    log "installing clickhouse-server, postgresql, curl, chromium, chromium-driver (apt)"
    # Keep the packages from starting system-wide services on the default
    # ports: ops/services.sh runs private instances instead.
    policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' >$policy && chmod 755 $policy"
        trap 'as_root rm -f "$policy"' EXIT
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y \
        clickhouse-server postgresql curl chromium chromium-driver
fi

# --- tansu -----------------------------------------------------------------
# `tansu --version` prints "tansu 0.6.0".
tansu_version=$(tansu --version 2>/dev/null || true)
if [[ $tansu_version != *"$TANSU_VERSION"* ]]; then
    log "installing tansu $TANSU_VERSION (cargo, takes ~10 minutes)"
    # The default features build no storage engine; dynostore gives sqlite.
    cargo install tansu --locked --version "$TANSU_VERSION" \
        --features dynostore,libsql
fi

# --- cargo-nextest ---------------------------------------------------------
if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest (cargo)"
    cargo install cargo-nextest --locked
fi

log "ok"
