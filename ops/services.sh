#!/usr/bin/env bash
# shellcheck disable=SC2317 # functions are called indirectly ("${s}_start")
# Private Kafka (tansu), ClickHouse and PostgreSQL instances on loopback for
# Tally's tests. See usage() below; ops/install.sh installs the binaries.
#
# Everything lives under $TALLY_SERVICES_DIR (default <repo>/.tally-services):
#   kafka/       tansu.db (sqlite), tansu.pid, tansu.log
#   clickhouse/  data/, clickhouse.pid, clickhouse.log, clickhouse.err.log,
#                stdout.log
#   postgres/    data/ (PGDATA), postgres.pid, postgres.log, unix socket
# A second, independent instance runs alongside when TALLY_SERVICES_DIR and
# all TALLY_*_PORT variables differ.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# cargo-installed tools; clickhouse-server and runuser live in /usr/sbin.
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin"

# Absolute and canonical: services run in other directories, and pid checks
# compare against /proc/PID/cwd.
DIR=$(realpath -m -- "${TALLY_SERVICES_DIR:-$ROOT/.tally-services}")

KAFKA_PORT=${TALLY_KAFKA_PORT:-19092}
CH_HTTP_PORT=${TALLY_CH_HTTP_PORT:-18123}
CH_TCP_PORT=${TALLY_CH_TCP_PORT:-19000}
CH_INTERSERVER_PORT=${TALLY_CH_INTERSERVER_PORT:-19009}
PG_PORT=${TALLY_PG_PORT:-15432}

TANSU=${TALLY_TANSU_BIN:-tansu}
CH_CONFIG=/etc/clickhouse-server/config.xml
PG_BIN=/usr/lib/postgresql/15/bin
START_TIMEOUT=60 # seconds to wait for a service to answer
STOP_TIMEOUT=60  # seconds to wait for a graceful stop before SIGKILL

KDIR=$DIR/kafka
CHDIR=$DIR/clickhouse
PGDIR=$DIR/postgres
PGDATA_DIR=$PGDIR/data

usage() {
    cat >&2 <<EOF
usage: $0 start|stop|restart|kill|status|env [kafka|clickhouse|postgres|all]

  start    start (idempotent; cleans stale pid files), wait until answering
  stop     graceful stop (SIGTERM / pg_ctl -m fast), wait for exit
  restart  stop, then start
  kill     SIGKILL, for fault-injection tests (restart with start)
  status   print running/stopped; exit 3 if any is not running
  env      print export lines: eval "\$($0 env)"

Environment: TALLY_SERVICES_DIR (default $ROOT/.tally-services),
TALLY_KAFKA_PORT=19092 TALLY_CH_HTTP_PORT=18123 TALLY_CH_TCP_PORT=19000
TALLY_CH_INTERSERVER_PORT=19009 TALLY_PG_PORT=15432
EOF
    exit 2
}

say() { printf '%s\n' "$*" >&2; }
die() {
    say "services: $*"
    exit 1
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Print the pid in file $1 if that process is alive and its command line
# (args joined by spaces, with a trailing space) contains $2: guards against
# pid reuse and other instances. Zombies have an empty cmdline.
live_pid() {
    local file=$1 pattern=$2 pid cmd
    [[ -f $file ]] || return 1
    pid=$(head -n 1 "$file" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
    [[ -n $cmd && $cmd == *"$pattern"* ]] || return 1
    printf '%s\n' "$pid"
}

# True while process $1 runs (a zombie has an empty cmdline).
alive() {
    local cmd
    cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline") || return 1
    [[ -n $cmd ]]
}

# Wait until process $1 is gone; return 1 after $2 seconds.
wait_gone() {
    local pid=$1 secs=$2 i
    for ((i = 0; i < secs * 10; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then return 1; fi
    # Exited. Give init up to 5 s to reap the zombie: other programs'
    # pid checks (postgres lock files) count a zombie as alive.
    for ((i = 0; i < 50; i++)); do
        [[ -e /proc/$pid ]] || break
        sleep 0.1
    done
}

# Launch "$@" in its own session (so it outlives this script and can be
# killed as a group), with cwd $3, output appended to $2, pid written to $1.
spawn() {
    local pidfile=$1 logfile=$2 cwd=$3 i
    shift 3
    rm -f "$pidfile"
    # shellcheck disable=SC2016 # $$ and $@ expand in the child shell
    (cd "$cwd" && exec setsid nohup bash -c 'echo "$$" >"$0" && exec "$@"' \
        "$pidfile" "$@" >>"$logfile" 2>&1 </dev/null 9>&-) &
    for ((i = 0; i < 50; i++)); do
        [[ -s $pidfile ]] && return 0
        sleep 0.1
    done
    die "could not launch $1"
}

# Wait until check command "$3..." succeeds while pid $2 lives; $1 = name.
wait_ready() {
    local name=$1 pid=$2 i
    shift 2
    for ((i = 0; i < START_TIMEOUT * 5; i++)); do
        "$@" && return 0
        alive "$pid" || return 1
        sleep 0.2
    done
    say "services: $name did not answer within ${START_TIMEOUT}s"
    return 1
}

# Fail early when a port we need is taken by something else.
need_free_port() {
    port_open "$2" && die "$1: port $2 is already in use by another process"
    return 0
}

# Send SIGTERM (or $3) to pid $2 and wait; escalate to SIGKILL.
stop_pid() {
    local name=$1 pid=$2 sig=${3:-TERM}
    kill "-$sig" "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" "$STOP_TIMEOUT"; then
        say "services: $name ignored SIG$sig for ${STOP_TIMEOUT}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 10 || die "$name (pid $pid) does not exit"
    fi
}

past() { if [[ $1 == KILL ]]; then echo killed; else echo stopped; fi; }

show_log() { if [[ -f $1 ]]; then tail -n 20 "$1" >&2; fi; }

# ---------------------------------------------------------------- kafka ---
KPID=$KDIR/tansu.pid

kafka_pid() {
    local pid
    pid=$(live_pid "$KPID" tansu) || return 1
    # Same binary name in another instance: check the working directory.
    [[ $(readlink "/proc/$pid/cwd" 2>/dev/null) == "$KDIR" ]] || return 1
    printf '%s\n' "$pid"
}

kafka_start() {
    local pid
    if pid=$(kafka_pid); then
        say "kafka: already running (pid $pid, 127.0.0.1:$KAFKA_PORT)"
        return 0
    fi
    rm -f "$KPID"
    command -v "$TANSU" >/dev/null 2>&1 || die "kafka: $TANSU not found (run ops/install.sh)"
    need_free_port kafka "$KAFKA_PORT"
    mkdir -p "$KDIR"
    # Unset the env vars tansu would read for options we do not pass.
    spawn "$KPID" "$KDIR/tansu.log" "$KDIR" \
        env -u CLUSTER_ID -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT \
        RUST_LOG="${TALLY_KAFKA_RUST_LOG:-warn}" \
        "$TANSU" broker \
        --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --storage-engine sqlite://tansu.db
    pid=$(<"$KPID")
    if ! wait_ready kafka "$pid" port_open "$KAFKA_PORT"; then
        show_log "$KDIR/tansu.log"
        die "kafka: failed to start (log: $KDIR/tansu.log)"
    fi
    say "kafka: started (pid $pid, 127.0.0.1:$KAFKA_PORT)"
}

# $1: TERM (stop) or KILL (kill).
kafka_stop() {
    local pid
    if pid=$(kafka_pid); then
        stop_pid kafka "$pid" "${1:-TERM}"
        say "kafka: $(past "${1:-TERM}")"
    else
        say "kafka: not running"
    fi
    rm -f "$KPID"
}

kafka_status() {
    local pid
    if pid=$(kafka_pid); then
        say "kafka: running (pid $pid, 127.0.0.1:$KAFKA_PORT, dir $KDIR)"
    else
        say "kafka: stopped"
        return 1
    fi
}

# ----------------------------------------------------------- clickhouse ---
CHPID=$CHDIR/clickhouse.pid
CHDATA=$CHDIR/data

ch_pid() { live_pid "$CHPID" "--path=$CHDATA/ "; }

ch_ping() { curl -sf --max-time 5 -o /dev/null "http://127.0.0.1:$CH_HTTP_PORT/?query=SELECT%201"; }

clickhouse_start() {
    local pid p
    if pid=$(ch_pid); then
        say "clickhouse: already running (pid $pid, http 127.0.0.1:$CH_HTTP_PORT)"
        return 0
    fi
    rm -f "$CHPID"
    command -v clickhouse-server >/dev/null 2>&1 || die "clickhouse: clickhouse-server not found (run ops/install.sh)"
    for p in "$CH_HTTP_PORT" "$CH_TCP_PORT" "$CH_INTERSERVER_PORT"; do
        need_free_port clickhouse "$p"
    done
    mkdir -p "$CHDATA"/{tmp,user_files,format_schemas}
    # Runs fine as root; listen on loopback only, server timezone UTC.
    spawn "$CHPID" "$CHDIR/stdout.log" "$CHDIR" \
        clickhouse-server --config-file="$CH_CONFIG" -- \
        --path="$CHDATA/" \
        --tmp_path="$CHDATA/tmp/" \
        --user_files_path="$CHDATA/user_files/" \
        --format_schema_path="$CHDATA/format_schemas/" \
        --http_port="$CH_HTTP_PORT" \
        --tcp_port="$CH_TCP_PORT" \
        --interserver_http_port="$CH_INTERSERVER_PORT" \
        --listen_host=127.0.0.1 \
        --timezone=UTC \
        --logger.log="$CHDIR/clickhouse.log" \
        --logger.errorlog="$CHDIR/clickhouse.err.log"
    pid=$(<"$CHPID")
    if ! wait_ready clickhouse "$pid" ch_ping; then
        show_log "$CHDIR/clickhouse.err.log"
        show_log "$CHDIR/stdout.log"
        die "clickhouse: failed to start (logs in $CHDIR)"
    fi
    say "clickhouse: started (pid $pid, http 127.0.0.1:$CH_HTTP_PORT, tcp $CH_TCP_PORT)"
}

# $1: TERM (stop) or KILL (kill).
clickhouse_stop() {
    local pid
    if pid=$(ch_pid); then
        stop_pid clickhouse "$pid" "${1:-TERM}"
        say "clickhouse: $(past "${1:-TERM}")"
    else
        say "clickhouse: not running"
    fi
    rm -f "$CHPID"
}

clickhouse_status() {
    local pid
    if pid=$(ch_pid); then
        say "clickhouse: running (pid $pid, http 127.0.0.1:$CH_HTTP_PORT, tcp $CH_TCP_PORT, dir $CHDIR)"
    else
        say "clickhouse: stopped"
        return 1
    fi
}

# ------------------------------------------------------------- postgres ---
PGPID=$PGDIR/postgres.pid

# PostgreSQL refuses to run as root: use the postgres user then.
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        (cd "$PGDIR" && runuser -u postgres -- "$@")
    else
        (cd "$PGDIR" && "$@")
    fi
}

# postmaster.pid is authoritative; postgres.pid is a copy for consistency.
pg_pid() { live_pid "$PGDATA_DIR/postmaster.pid" "-D $PGDATA_DIR "; }

pg_psql() {
    PGCONNECT_TIMEOUT=5 "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 \
        -h 127.0.0.1 -p "$PG_PORT" -U tally "$@"
}

postgres_start() {
    local pid
    if pid=$(pg_pid); then
        say "postgres: already running (pid $pid, 127.0.0.1:$PG_PORT)"
        printf '%s\n' "$pid" >"$PGPID"
        return 0
    fi
    [[ -x $PG_BIN/pg_ctl ]] || die "postgres: $PG_BIN/pg_ctl not found (run ops/install.sh)"
    need_free_port postgres "$PG_PORT"
    # Stale lock files (no live postmaster, checked above).
    rm -f "$PGPID" "$PGDATA_DIR/postmaster.pid" "$PGDIR/.s.PGSQL.$PG_PORT.lock"
    mkdir -p "$PGDIR"
    touch "$PGDIR/postgres.log"
    if [[ $EUID -eq 0 ]]; then chown postgres:postgres "$PGDIR" "$PGDIR/postgres.log"; fi
    # The postgres user must reach $PGDIR: a mktemp/tempfile dir is 0700.
    if [[ $EUID -eq 0 ]] && ! as_pg test -w "$PGDIR"; then chmod o+x "$DIR"; fi
    as_pg test -w "$PGDIR" \
        || die "postgres: $PGDIR is not writable by user postgres (check parent directory permissions)"
    if [[ ! -f $PGDATA_DIR/PG_VERSION ]]; then
        as_pg "$PG_BIN/initdb" -D "$PGDATA_DIR" -A trust -U tally \
            -E UTF8 --no-locale >>"$PGDIR/postgres.log" 2>&1 9>&- \
            || {
                show_log "$PGDIR/postgres.log"
                die "postgres: initdb failed"
            }
    fi
    if ! as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -l "$PGDIR/postgres.log" -w -t "$START_TIMEOUT" \
        -o "-p $PG_PORT -k '$PGDIR' -c listen_addresses=127.0.0.1" \
        start >/dev/null 9>&-; then
        show_log "$PGDIR/postgres.log"
        die "postgres: failed to start (log: $PGDIR/postgres.log)"
    fi
    pid=$(pg_pid) || die "postgres: started but no postmaster.pid"
    printf '%s\n' "$pid" >"$PGPID"
    if [[ $(pg_psql -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'tally'") != 1 ]]; then
        pg_psql -d postgres -c 'CREATE DATABASE tally'
    fi
    say "postgres: started (pid $pid, 127.0.0.1:$PG_PORT)"
}

# SIGKILL the postmaster and its children (each child runs in its own
# process group), so no orphaned backend keeps the shared memory.
pg_kill() {
    local pid=$1 children c
    children=$(ps -o pid= --ppid "$pid" || true)
    kill -KILL "$pid" 2>/dev/null || true
    for c in $children; do kill -KILL "$c" 2>/dev/null || true; done
    wait_gone "$pid" 10 || die "postgres: pid $pid does not exit"
    for c in $children; do wait_gone "$c" 10 || true; done
}

postgres_stop() {
    local pid
    if pid=$(pg_pid); then
        if ! as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w -t "$STOP_TIMEOUT" stop >/dev/null; then
            say "services: pg_ctl stop failed, sending SIGKILL to postgres"
            pg_kill "$pid"
        fi
        wait_gone "$pid" 10 || die "postgres: pid $pid does not exit"
        say "postgres: stopped"
    else
        say "postgres: not running"
    fi
    rm -f "$PGPID"
}

postgres_kill() {
    local pid
    if pid=$(pg_pid); then
        pg_kill "$pid"
        say "postgres: killed"
    else
        say "postgres: not running"
    fi
    rm -f "$PGPID"
}

postgres_status() {
    local pid
    if pid=$(pg_pid); then
        say "postgres: running (pid $pid, 127.0.0.1:$PG_PORT, dir $PGDIR)"
    else
        say "postgres: stopped"
        return 1
    fi
}

# ------------------------------------------------------------------ main ---
print_env() {
    printf 'export TALLY_KAFKA_BROKERS=%q\n' "127.0.0.1:$KAFKA_PORT"
    printf 'export TALLY_CLICKHOUSE_URL=%q\n' "http://127.0.0.1:$CH_HTTP_PORT"
    printf 'export TALLY_DATABASE_URL=%q\n' "postgres://tally@127.0.0.1:$PG_PORT/tally"
    printf 'export TALLY_SERVICES_DIR=%q\n' "$DIR"
}

cmd=${1:-}
target=${2:-all}
case $target in
    all) services=(postgres clickhouse kafka) ;;
    kafka | clickhouse | postgres) services=("$target") ;;
    *) usage ;;
esac

# Serialise start/stop/kill per directory (parallel test processes).
lock() {
    mkdir -p "$DIR"
    exec 9>"$DIR/.lock"
    flock 9
}

rc=0
case $cmd in
    start)
        lock
        for s in "${services[@]}"; do "${s}_start"; done
        ;;
    stop)
        lock
        for ((i = ${#services[@]} - 1; i >= 0; i--)); do "${services[i]}_stop"; done
        ;;
    restart)
        lock
        for ((i = ${#services[@]} - 1; i >= 0; i--)); do "${services[i]}_stop"; done
        for s in "${services[@]}"; do "${s}_start"; done
        ;;
    kill)
        lock
        for s in "${services[@]}"; do
            if [[ $s == postgres ]]; then postgres_kill; else "${s}_stop" KILL; fi
        done
        ;;
    status)
        for s in "${services[@]}"; do "${s}_status" || rc=3; done
        ;;
    env)
        print_env
        ;;
    *) usage ;;
esac
exit "$rc"
