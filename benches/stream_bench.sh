#!/usr/bin/env bash
# stream_bench.sh: what a synchronous standby costs the primary's commits, with walvault's
# streaming receiver beside pg_receivewal --synchronous, a real streaming standby and no
# synchronous standby at all (the ceiling), on one primary in one run (issue 11).
#
# One PostgreSQL 15 primary (Unix socket only), synchronous_commit = on, pgbench -i -s SCALE.
# Every receiver runs from the start to the end of the run, streaming; between
# configurations only synchronous_standby_names changes (ALTER SYSTEM + pg_reload_conf,
# checked in pg_stat_replication.sync_state), so each configuration runs beside the same
# processes and only what the commit waits for differs:
#   none        synchronous_standby_names = ''                (the ceiling)
#   standby     a streaming standby (pg_basebackup -R, slot standby1) = 'standby1'
#   receivewal  pg_receivewal --synchronous into a local directory, own slot = 'pg_receivewal'
#   walvault    archived serve + pushclient stream --create-slot --slot walvault = 'walvault'
# For each client count in CLIENTS, each configuration in turn: CHECKPOINT, every receiver
# caught up, then `pgbench -M prepared -c N -j N -T DURATION -l`: TPS (without initial
# connection time) and transaction latency p50/p99 from the per-transaction logs.
# Then, with synchronous_standby_names = '' and LAG_CLIENTS (8) clients for LAG_DURATION s:
# every second, each receiver's write_lag / flush_lag / bytes behind (pg_stat_replication),
# and the replay lag in bytes of the streaming standby and of a standby fed by the archive
# alone (restore_command = pullclient archive-get, standby.signal, no primary_conninfo).
# At the end: peak RSS (VmHWM) of pushclient stream and archived.
#
# Prints a table and adds it to benches/RESULTS.md as the newest run (results_insert, lib.sh).
# Must run as root (PostgreSQL, pg_receivewal and pushclient run as `postgres`).
#
# Environment knobs (defaults in brackets):
#   DURATION [20]        seconds of each pgbench run
#   CLIENTS ["1 8 32"]   client counts (-c N -j N)
#   ROUNDS [1]           rounds of every (client count, configuration) run, the order of the
#                        configurations reversed in even rounds; median TPS, pooled latencies
#   CONFIGS ["none standby receivewal walvault"]  configurations, in the order they run
#                        at each client count (without walvault: no build, no archive-fed standby)
#   LAG_CLIENTS [8]      clients of the lag run (synchronous_standby_names = '')
#   LAG_DURATION [DURATION]  seconds of the lag run (one sample a second)
#   SCALE [10]           pgbench -i scale
#   PGBIN [/usr/lib/postgresql/15/bin]
#   BENCH_TMPDIR [/tmp]  where the work directory is made (its disk takes every fsync)
#   CMD_TIMEOUT [120]    seconds allowed to any one step beyond its own duration
#   SKIP_BUILD [0]       1 = use the existing release binaries
#   CARGO_TARGET_DIR     whose release/ binaries to measure [this tree's target]; with
#                        SKIP_BUILD=1, another worktree's build (its commit is recorded)
#   KEEP_WORK [0]        1 = keep the work directory (logs in logs/, pgbench logs in pgbench/)
#   RESULTS [benches/RESULTS.md]
set -Eeuo pipefail
export LC_ALL=C

DURATION=${DURATION:-20}
CLIENTS=${CLIENTS:-1 8 32}
ROUNDS=${ROUNDS:-1}
CONFIGS=${CONFIGS:-none standby receivewal walvault}
LAG_CLIENTS=${LAG_CLIENTS:-8}
LAG_DURATION=${LAG_DURATION:-$DURATION}
SCALE=${SCALE:-10}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
BENCH_TMPDIR=${BENCH_TMPDIR:-/tmp}
CMD_TIMEOUT=${CMD_TIMEOUT:-120}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_WORK=${KEEP_WORK:-0}
PGPORT=${PGPORT:-5432}          # Unix sockets only, in a private directory
STANDBY_PORT=$((PGPORT + 1))
ARCHFED_PORT=$((PGPORT + 2))

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
RESULTS=${RESULTS:-$SCRIPT_DIR/RESULTS.md}
BUILD_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release
INVOCATION=$(printf '%q ' "$0" "$@")
INVOCATION=${INVOCATION% }
# Knobs given in the environment, for the "exact command" in RESULTS.md.
ENV_USED=""
for v in DURATION CLIENTS ROUNDS CONFIGS LAG_CLIENTS LAG_DURATION SCALE PGBIN BENCH_TMPDIR CMD_TIMEOUT SKIP_BUILD CARGO_TARGET_DIR PGPORT; do
    if printenv "$v" >/dev/null; then ENV_USED+="$v=$(printf '%q' "$(printenv "$v")") "; fi
done
T_SCRIPT0=$EPOCHREALTIME
LOAD_START=$(cut -d" " -f1-3 /proc/loadavg)

BENCH_NAME=stream_bench
# shellcheck source=benches/lib.sh
source "$SCRIPT_DIR/lib.sh"

# ---------------------------------------------------------------- configurations
declare -A LABEL=([none]="none (ceiling)" [standby]="streaming standby" [receivewal]="pg_receivewal --synchronous" [walvault]="walvault")
# application_name of each configuration's receiver: what synchronous_standby_names names.
declare -A APP=([none]="" [standby]="standby1" [receivewal]="pg_receivewal" [walvault]="walvault")
has_config() { [[ " $CONFIGS " == *" $1 "* ]]; }

# ---------------------------------------------------------------- cleanup
WORK=""
PG_DIRS=()             # data directories pg_ctl start was run on
declare -A PROC=()     # name -> pid of the receivers and archived
BG_PIDS=()             # pgbench runs and samplers
ARCHIVED_PID=""

# stop_pid PID WHAT: SIGTERM, up to 30 s for it to go, then SIGKILL.
stop_pid() {
    local pid=$1 what=$2 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$what ($pid) ignored SIGTERM for 30 s; killing it"
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null || true
}

# The prefetch daemon archive-get starts for the archive-fed standby (pid in its spool's
# daemon.lock, the spool beside the data directory), if it is ours and still running.
stop_prefetch_daemon() {
    local lock=$WORK/archfed.walvault-spool/daemon.lock pid
    [[ -f $lock ]] || return 0
    pid=$(head -1 "$lock" 2>/dev/null) || return 0
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$WORK/bin/pullclient"; then
        stop_pid "$pid" "prefetch daemon"
    fi
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM ERR
    local p d i
    for p in "${BG_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for p in "${BG_PIDS[@]}"; do wait "$p" 2>/dev/null; done
    for p in pushclient pg_receivewal; do
        [[ -n ${PROC[$p]:-} ]] && stop_pid "${PROC[$p]}" "$p"
    done
    [[ -n $WORK ]] && stop_prefetch_daemon
    for ((i = ${#PG_DIRS[@]} - 1; i >= 0; i--)); do
        d=${PG_DIRS[i]}
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$d" -m immediate -w -t 30 stop >/dev/null 2>&1
    done
    [[ -n $ARCHIVED_PID ]] && stop_pid "$ARCHIVED_PID" archived
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $KEEP_WORK == 1 ]]; then
            log "work directory kept: $WORK"
        else
            rm -rf -- "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'die "line $LINENO: \`$BASH_COMMAND\` failed (exit $?)"' ERR

# ---------------------------------------------------------------- helpers

# sql PORT QUERY: one statement on the server at PORT (socket $WORK/sock), unaligned.
sql() { timeout 30 "$PGBIN/psql" -X -h "$WORK/sock" -p "$1" -U postgres -d postgres -Atqc "$2"; }
# "${AS_PG_EXEC[@]}" CMD...: CMD as postgres through exec (no fork, unlike runuser), so that
# $! of a background one is CMD's own pid (VmHWM, signals). Set after the preflight.
AS_PG_EXEC=()

# show_log FILE LINES: the end of FILE on stderr, on the way to a die (never fails itself).
show_log() { tail -n "$2" -- "$1" >&2 2>/dev/null || true; }

# start_receiver NAME LOG CMD...: starts a receiver as postgres in the background.
start_receiver() {
    local name=$1 logf=$2
    shift 2
    "${AS_PG_EXEC[@]}" "$@" >>"$logf" 2>&1 </dev/null &
    PROC[$name]=$!
}

# receiver_alive NAME: dies with the end of its log when the receiver NAME has exited.
receiver_alive() {
    local name=$1
    kill -0 "${PROC[$name]}" 2>/dev/null && return 0
    show_log "$LOGS/$name.log" 30
    die "$name (pid ${PROC[$name]}) exited (the end of $LOGS/$name.log above)"
}

all_receivers_alive() {
    local n
    for n in "${!PROC[@]}"; do receiver_alive "$n"; done
    if [[ -n $ARCHIVED_PID ]] && ! kill -0 "$ARCHIVED_PID" 2>/dev/null; then
        show_log "$LOGS/archived.log" 30
        die "archived (pid $ARCHIVED_PID) exited (the end of $LOGS/archived.log above)"
    fi
}

# wait_streaming APP: until pg_stat_replication shows APP streaming (60 s at most).
wait_streaming() {
    local app=$1 i state
    for ((i = 0; i < 300; i++)); do
        state=$(sql "$PGPORT" "SELECT state FROM pg_stat_replication WHERE application_name = '$app'")
        [[ $state == streaming ]] && return 0
        all_receivers_alive
        sleep 0.2
    done
    sql "$PGPORT" "SELECT application_name, state, sync_state FROM pg_stat_replication" >&2 || true
    die "$app is not streaming after 60 s (pg_stat_replication above)"
}

# set_sync CONFIG: synchronous_standby_names = that configuration's receiver (or ''), reloaded,
# and waits (30 s at most) until pg_stat_replication shows exactly that one as 'sync'.
set_sync() {
    local app=${APP[$1]} i want got
    sql "$PGPORT" "ALTER SYSTEM SET synchronous_standby_names = '$app'" >/dev/null
    sql "$PGPORT" "SELECT pg_reload_conf()" >/dev/null
    want=""
    [[ -z $app ]] || want="$app|sync"
    for ((i = 0; i < 150; i++)); do
        got=$(sql "$PGPORT" "SELECT application_name || '|' || sync_state FROM pg_stat_replication WHERE sync_state <> 'async' ORDER BY 1")
        [[ $got == "$want" && $(sql "$PGPORT" "SHOW synchronous_standby_names") == "$app" ]] && return 0
        sleep 0.2
    done
    sql "$PGPORT" "SELECT application_name, state, sync_state FROM pg_stat_replication" >&2 || true
    die "synchronous_standby_names = '$app' did not take effect within 30 s (wanted '$want', got '$got'; pg_stat_replication above)"
}

# caught_up: every receiver has flushed (and the streaming standby replayed) the primary's
# WAL as of now (60 s at most), so no run inherits the previous one's backlog.
caught_up() {
    local target i behind
    target=$(sql "$PGPORT" "SELECT pg_current_wal_lsn()")
    for ((i = 0; i < 300; i++)); do
        behind=$(sql "$PGPORT" "SELECT string_agg(application_name, ' ') FROM pg_stat_replication
            WHERE flush_lsn IS NULL OR flush_lsn < '$target'
               OR (application_name = 'standby1' AND (replay_lsn IS NULL OR replay_lsn < '$target'))")
        [[ -z $behind ]] && return 0
        all_receivers_alive
        sleep 0.2
    done
    sql "$PGPORT" "SELECT application_name, state, sent_lsn, flush_lsn, replay_lsn FROM pg_stat_replication" >&2 || true
    die "receivers still behind $target after 60 s: $behind (pg_stat_replication above)"
}

# pct_of FILE: "p50 p99 max n" of the numbers in FILE (one a line), nearest rank.
pct_of() {
    sort -g "$1" | awk '{ a[NR] = $1 }
        END {
            if (NR == 0) { print "- - - 0"; exit }
            r50 = int((NR * 50 + 99) / 100); r99 = int((NR * 99 + 99) / 100)
            print a[r50], a[r99], a[NR], NR
        }'
}

wal_lsn() { sql "$PGPORT" "SELECT pg_current_wal_lsn()"; }
kib_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
wal_bytes_between() { sql "$PGPORT" "SELECT pg_wal_lsn_diff('$2', '$1')::bigint"; }

# cpu_of NAME: CPU seconds the receiver NAME (or archived) has used so far ("-" if none).
cpu_of() {
    local pid
    if [[ $1 == archived ]]; then pid=$ARCHIVED_PID; else pid=${PROC[$1]:-}; fi
    [[ -n $pid ]] && cpu_secs "$pid" || echo "-"
}
CPU_WATCH=(pg_receivewal pushclient archived)

# latency_ms FILE: "p50 p99 n" of the per-transaction latencies (µs, one a line) in FILE, in ms.
latency_ms() {
    local p50 p99 n
    read -r p50 p99 _ n < <(pct_of "$1")
    ((n > 0)) || die "no transactions logged in $1"
    awk -v a="$p50" -v b="$p99" -v n="$n" 'BEGIN { printf "%.2f %.2f %d\n", a / 1000, b / 1000, n }'
}

# median NUMBER...: the median (the mean of the two middle ones for an even count).
median() {
    printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 }
        END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.0f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# run_pgbench TAG CLIENTS SECONDS: one pgbench run (CHECKPOINT and every receiver caught up
# first). Sets TPS, LAT_FILE (its latencies in µs, one a line), NTX, WAL_BYTES, and CPU_D
# (CPU seconds each of CPU_WATCH that runs used during it). With SAMPLE=1, samples lag every
# second for the run's duration (sample_lag).
run_pgbench() {
    local tag=$1 n=$2 secs=$3 dir=$WORK/pgbench/$1 out=$LOGS/pgbench-$1.log pid sampler="" lsn0 lsn1 failed
    local -A cpu0=()
    local w
    mkdir -p "$dir"
    sql "$PGPORT" "CHECKPOINT" >/dev/null
    caught_up
    for w in "${CPU_WATCH[@]}"; do cpu0[$w]=$(cpu_of "$w"); done
    lsn0=$(wal_lsn)
    log "pgbench $tag: -c $n -j $n -T $secs"
    timeout $((secs + CMD_TIMEOUT)) "$PGBIN/pgbench" -h "$WORK/sock" -p "$PGPORT" -U postgres \
        -M prepared -c "$n" -j "$n" -T "$secs" -l --log-prefix="$dir/tx" postgres >"$out" 2>&1 &
    pid=$!
    BG_PIDS+=("$pid")
    if [[ ${SAMPLE:-0} == 1 ]]; then
        sample_lag "$secs" >"$WORK/lag-samples.txt" 2>>"$LOGS/sampler.err" &
        sampler=$!
        BG_PIDS+=("$sampler")
    fi
    # A receiver that exits mid-run fails the run now, not when the timeout ends commits
    # that wait for it.
    while kill -0 "$pid" 2>/dev/null; do
        all_receivers_alive
        sleep 0.5
    done
    if ! wait "$pid"; then
        show_log "$out" 20
        die "pgbench $tag failed or took more than $((secs + CMD_TIMEOUT)) s (its output above; synchronous_standby_names = '$(sql "$PGPORT" "SHOW synchronous_standby_names" || true)')"
    fi
    [[ -z $sampler ]] || wait "$sampler" || die "the lag sampler failed ($LOGS/sampler.err)"
    BG_PIDS=()
    lsn1=$(wal_lsn)
    all_receivers_alive
    TPS=$(awk '/^tps = .*without initial connection time/ { printf "%.0f", $3 }' "$out")
    [[ -n $TPS ]] || { show_log "$out" 40; die "no 'tps = ... (without initial connection time)' line in pgbench $tag's output (above)"; }
    failed=$(awk -F': ' '/^number of failed transactions/ { split($2, a, " "); print a[1] }' "$out")
    [[ -z $failed || $failed == 0 ]] || die "pgbench $tag: $failed failed transactions ($out)"
    LAT_FILE=$dir/latency-us
    cat "$dir"/tx.* | awk '{ print $3 }' >"$LAT_FILE"
    local p50 p99
    read -r p50 p99 NTX < <(latency_ms "$LAT_FILE")
    WAL_BYTES=$(wal_bytes_between "$lsn0" "$lsn1")
    CPU_D=()
    local cpu_note=""
    for w in "${CPU_WATCH[@]}"; do
        [[ ${cpu0[$w]} == - ]] && continue
        CPU_D[$w]=$(awk -v a="${cpu0[$w]}" -v b="$(cpu_of "$w")" 'BEGIN { printf "%.1f", b - a }')
        cpu_note+="${cpu_note:+, }$w ${CPU_D[$w]} s"
    done
    log "pgbench $tag: $TPS tps, p50 $p50 ms, p99 $p99 ms, $NTX transactions, $(mib "$WAL_BYTES") MiB of WAL${cpu_note:+; CPU: $cpu_note}"
    if [[ $KEEP_WORK != 1 ]]; then rm -f "$dir"/tx.*; fi
}

# sample_lag SECONDS: one line a second for SECONDS s:
#   recv|APP|write_lag ms|flush_lag ms|bytes behind (pg_current_wal_lsn() - flush_lsn)
#   replay|STANDBY|bytes (pg_current_wal_lsn() on the primary - pg_last_wal_replay_lsn() on it)
# Empty fields where PostgreSQL has no value (NULL lag). A failed query is logged to stderr
# and that second skipped.
sample_lag() {
    local end=$((${EPOCHREALTIME%.*} + $1)) q l1 l2 t
    while ((${EPOCHREALTIME%.*} < end)); do
        t=$EPOCHREALTIME
        q="SELECT 'recv|' || application_name || '|' || coalesce((extract(epoch FROM write_lag) * 1000)::numeric(12,3)::text, '')
                || '|' || coalesce((extract(epoch FROM flush_lag) * 1000)::numeric(12,3)::text, '')
                || '|' || coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::bigint::text, '')
             FROM pg_stat_replication"
        if [[ -n $STANDBY_UP ]]; then
            l1=$(sql "$STANDBY_PORT" "SELECT pg_last_wal_replay_lsn()") || { echo "standby query failed" >&2; l1=""; }
            [[ -n $l1 ]] && q+=" UNION ALL SELECT 'replay|streaming standby|' || pg_wal_lsn_diff(pg_current_wal_lsn(), '$l1')::bigint"
        fi
        if [[ -n $ARCHFED_UP ]]; then
            l2=$(sql "$ARCHFED_PORT" "SELECT pg_last_wal_replay_lsn()") || { echo "archive-fed standby query failed" >&2; l2=""; }
            [[ -n $l2 ]] && q+=" UNION ALL SELECT 'replay|archive-fed standby|' || pg_wal_lsn_diff(pg_current_wal_lsn(), '$l2')::bigint"
        fi
        sql "$PGPORT" "$q" || echo "primary query failed" >&2
        # One sample a second, whatever the queries took.
        sleep "$(awk -v t="$t" -v n="$EPOCHREALTIME" 'BEGIN { s = 1 - (n - t); printf "%.3f", (s > 0 ? s : 0) }')"
    done
}

# lag_stats KIND NAME FIELD: "median max n" of one sampled series (empty values skipped).
lag_stats() {
    local f=$WORK/lag-series
    awk -F'|' -v k="$1" -v n="$2" -v c="$3" '$1 == k && $2 == n && $c != "" { print $c }' "$WORK/lag-samples.txt" >"$f"
    local p50 _p99 max cnt
    read -r p50 _p99 max cnt < <(pct_of "$f")
    echo "$p50 $max $cnt"
}

# ---------------------------------------------------------------- preflight
[[ $(id -u) == 0 ]] || die "run as root (PostgreSQL, pg_receivewal and pushclient run as 'postgres')"
[[ $DURATION =~ ^[0-9]+$ && $DURATION -ge 1 ]] || die "DURATION must be a positive integer"
[[ $ROUNDS =~ ^[0-9]+$ && $ROUNDS -ge 1 ]] || die "ROUNDS must be a positive integer"
[[ $LAG_DURATION =~ ^[0-9]+$ && $LAG_DURATION -ge 1 ]] || die "LAG_DURATION must be a positive integer"
[[ $LAG_CLIENTS =~ ^[0-9]+$ && $LAG_CLIENTS -ge 1 ]] || die "LAG_CLIENTS must be a positive integer"
for n in $CLIENTS; do [[ $n =~ ^[0-9]+$ && $n -ge 1 ]] || die "CLIENTS must be positive integers, not '$n'"; done
for c in $CONFIGS; do [[ -v "LABEL[$c]" ]] || die "CONFIGS: unknown configuration '$c' (none standby receivewal walvault)"; done
[[ -n ${CLIENTS// /} && -n ${CONFIGS// /} ]] || die "CLIENTS and CONFIGS must not be empty"
((DURATION >= 20)) || log "warning: DURATION=$DURATION < 20: not a publishable run"
need_pg_tools initdb pg_ctl pgbench psql postgres pg_basebackup pg_receivewal
need_commands runuser setpriv timeout python3 awk sort getconf
AS_PG_EXEC=(setpriv --reuid=postgres --regid=postgres --init-groups -- env HOME="$(getent passwd postgres | cut -d: -f6)")
PG_VERSION=$("$PGBIN/postgres" --version)
if has_config walvault; then
    release_build "$BUILD_BIN"
    "$BUILD_BIN/pushclient" stream --help >/dev/null 2>&1 ||
        die "$BUILD_BIN/pushclient has no 'stream' command (build a tree that has it: cargo build --release --workspace --bins)"
fi

WORK=$(mktemp -d "$BENCH_TMPDIR/walvault-stream-bench.XXXXXX")
chmod 0755 "$WORK"
cd "$WORK"
mkdir -p bin logs sock pgbench receivewal stream
mkdir -m 0700 primary standby1 archfed
chown postgres: logs sock receivewal stream primary standby1 archfed
LOGS=$WORK/logs
log "work directory $WORK"
if has_config walvault; then
    # Copies: the binaries measured stay these, whatever is rebuilt meanwhile.
    for b in archived pushclient pullclient; do cp "$BUILD_BIN/$b" bin/ && chmod 0755 "bin/$b"; done
fi
BIN=$WORK/bin

# ---------------------------------------------------------------- the primary
PRIMARY=$WORK/primary
as_pg "$PGBIN/initdb" -D "$PRIMARY" -U postgres -A trust -E UTF8 --no-sync >"$LOGS/initdb.log" 2>&1 ||
    { show_log "$LOGS/initdb.log" 30; die "initdb failed"; }
cat >>"$PRIMARY/postgresql.conf" <<EOF

# stream_bench.sh
listen_addresses = ''
unix_socket_directories = '$WORK/sock'
port = $PGPORT
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
synchronous_commit = on
synchronous_standby_names = ''
# No checkpoint inside a run (each run starts after its own CHECKPOINT).
max_wal_size = 16GB
checkpoint_timeout = 1h
log_line_prefix = '%m [%p] %a '
EOF
PG_DIRS+=("$PRIMARY")
as_pg "$PGBIN/pg_ctl" -D "$PRIMARY" -l "$LOGS/primary.log" -w -t 60 start >/dev/null ||
    { show_log "$LOGS/primary.log" 30; die "pg_ctl start of the primary failed"; }
log "pgbench -i -s $SCALE"
run_logged "$LOGS/pgbench-init.log" "$PGBIN/pgbench" -h "$WORK/sock" -p "$PGPORT" -U postgres -i -q -s "$SCALE" postgres
SYSID=$(sql "$PGPORT" "SELECT system_identifier FROM pg_control_system()")

# ---------------------------------------------------------------- the receivers
STANDBY_UP=""
ARCHFED_UP=""
if has_config standby; then
    log "streaming standby: pg_basebackup -R -C -S standby1 -X stream, application_name standby1"
    run_logged "$LOGS/basebackup.log" runuser -u postgres -- "$PGBIN/pg_basebackup" \
        -d "host=$WORK/sock port=$PGPORT user=postgres application_name=standby1" \
        -D "$WORK/standby1" -R -C -S standby1 -X stream -c fast
    grep -q "application_name=standby1" "$WORK/standby1/postgresql.auto.conf" ||
        die "pg_basebackup -R wrote no application_name=standby1 into primary_conninfo ($WORK/standby1/postgresql.auto.conf)"
    cat >>"$WORK/standby1/postgresql.conf" <<EOF

# stream_bench.sh: the streaming standby
port = $STANDBY_PORT
hot_standby = on
EOF
    PG_DIRS+=("$WORK/standby1")
    as_pg "$PGBIN/pg_ctl" -D "$WORK/standby1" -l "$LOGS/standby1.log" -w -t 120 start >/dev/null ||
        { show_log "$LOGS/standby1.log" 30; die "pg_ctl start of the streaming standby failed"; }
    wait_streaming standby1
    STANDBY_UP=1
fi

if has_config receivewal; then
    log "pg_receivewal --synchronous on slot pg_receivewal into $WORK/receivewal"
    run_logged "$LOGS/pg_receivewal.log" "${AS_PG_EXEC[@]}" "$PGBIN/pg_receivewal" -h "$WORK/sock" -p "$PGPORT" -U postgres \
        --slot=pg_receivewal --create-slot
    start_receiver pg_receivewal "$LOGS/pg_receivewal.log" "$PGBIN/pg_receivewal" -h "$WORK/sock" -p "$PGPORT" \
        -U postgres -D "$WORK/receivewal" --slot=pg_receivewal --synchronous --no-loop -v
    wait_streaming pg_receivewal
fi

if has_config walvault; then
    log "walvault: archived serve, pushclient stream --create-slot --slot walvault"
    WV=$WORK/wv
    WV_PORT=$(free_udp_port)
    run_logged "$LOGS/archived-admin.log" "$BIN/archived" init --data-dir "$WV" --listen "127.0.0.1:$WV_PORT"
    run_logged "$LOGS/archived-admin.log" "$BIN/archived" issue --data-dir "$WV" --cluster bench \
        --role push --out "$WORK/push.toml"
    run_logged "$LOGS/archived-admin.log" "$BIN/archived" issue --data-dir "$WV" --cluster bench \
        --role pull --out "$WORK/pull.toml"
    chown postgres: "$WORK/push.toml" "$WORK/pull.toml"
    start_archived "$WV" "$LOGS/archived.log" "$WORK/push.toml"
    start_receiver pushclient "$LOGS/pushclient.log" env PGHOST="$WORK/sock" PGPORT="$PGPORT" PGUSER=postgres \
        "$BIN/pushclient" --config "$WORK/push.toml" stream --create-slot --slot walvault \
        --status-file "$WORK/stream/status.json"
    wait_streaming walvault
fi
STREAM_LSN0=$(wal_lsn)

# ---------------------------------------------------------------- the runs
# Per "config clients": TPS of each round, transactions, WAL bytes, CPU per watched process
# ("config clients process"); latencies pooled over the rounds in pgbench/CONFIG-cN.latency-us.
declare -A TPS_RUNS=() NTX_OF=() WALB_OF=() CPU_OF=()
declare -A CPU_D=()
HWM_NOTES=()
for ((round = 1; round <= ROUNDS; round++)); do
    order=()
    for c in $CONFIGS; do
        if ((round % 2 == 0)); then order=("$c" "${order[@]}"); else order+=("$c"); fi
    done
    for n in $CLIENTS; do
        for c in "${order[@]}"; do
            set_sync "$c"
            run_pgbench "$c-c$n-r$round" "$n" "$DURATION"
            k="$c $n"
            TPS_RUNS[$k]+="${TPS_RUNS[$k]:+ }$TPS"
            cat "$LAT_FILE" >>"$WORK/pgbench/$c-c$n.latency-us"
            NTX_OF[$k]=$((${NTX_OF[$k]:-0} + NTX))
            WALB_OF[$k]=$((${WALB_OF[$k]:-0} + WAL_BYTES))
            for w in "${!CPU_D[@]}"; do
                CPU_OF["$k $w"]=$(awk -v a="${CPU_OF["$k $w"]:-0}" -v b="${CPU_D[$w]}" 'BEGIN { printf "%.1f", a + b }')
            done
        done
        if has_config walvault; then
            HWM_NOTES+=("after the $n-client runs of round $round ($(mib "$(wal_bytes_between "$STREAM_LSN0" "$(wal_lsn)")") MiB of WAL streamed): pushclient stream $(kib_mib "$(status_kib "${PROC[pushclient]}" VmHWM)") MiB, archived $(kib_mib "$(status_kib "$ARCHIVED_PID" VmHWM)") MiB")
        fi
    done
done
ROWS=()                 # clients|config|TPS (median)|p50|p99|transactions|WAL MiB|CPU|TPS per round
declare -A TPS_OF=()    # "config clients" -> median TPS
for n in $CLIENTS; do
    for c in $CONFIGS; do
        k="$c $n"
        # shellcheck disable=SC2086 # the rounds' TPS, one word each
        TPS_OF[$k]=$(median ${TPS_RUNS[$k]})
        read -r p50 p99 _ < <(latency_ms "$WORK/pgbench/$c-c$n.latency-us")
        cpu=""
        for w in "${CPU_WATCH[@]}"; do
            [[ -v "CPU_OF[$k $w]" ]] && cpu+="${cpu:+, }$w ${CPU_OF["$k $w"]} s"
        done
        ROWS+=("$n|$c|${TPS_OF[$k]}|$p50|$p99|${NTX_OF[$k]}|$(mib "${WALB_OF[$k]}")|$cpu|${TPS_RUNS[$k]}")
    done
done

# ---------------------------------------------------------------- lag, without a sync standby
NOTES=()
if has_config walvault; then
    log "archive-fed standby: pg_basebackup -X stream, restore_command = pullclient archive-get, standby.signal, no primary_conninfo"
    run_logged "$LOGS/basebackup.log" runuser -u postgres -- "$PGBIN/pg_basebackup" \
        -d "host=$WORK/sock port=$PGPORT user=postgres application_name=archfed-backup" \
        -D "$WORK/archfed" -X stream -c fast
    cat >>"$WORK/archfed/postgresql.conf" <<EOF

# stream_bench.sh: the standby fed by the archive alone
port = $ARCHFED_PORT
hot_standby = on
primary_conninfo = ''
primary_slot_name = ''
restore_command = '$BIN/pullclient archive-get %f %p --config $WORK/pull.toml'
EOF
    touch "$WORK/archfed/standby.signal" && chown postgres: "$WORK/archfed/standby.signal"
    PG_DIRS+=("$WORK/archfed")
    as_pg "$PGBIN/pg_ctl" -D "$WORK/archfed" -l "$LOGS/archfed.log" -w -t 120 start >/dev/null ||
        { show_log "$LOGS/archfed.log" 30; die "pg_ctl start of the archive-fed standby failed"; }
    # It replays what the archive holds, the receiver's unfinished segment included: wait
    # until it has replayed the primary's WAL as of now (idle primary).
    target=$(wal_lsn)
    for ((i = 0; i < 300; i++)); do
        replayed=$(sql "$ARCHFED_PORT" "SELECT pg_last_wal_replay_lsn() >= '$target'") || replayed=""
        [[ $replayed == t ]] && break
        sleep 0.2
    done
    if [[ $replayed != t ]]; then
        NOTES+=("the archive-fed standby had not replayed the idle primary's WAL up to $target 60 s after it started (it was at $(sql "$ARCHFED_PORT" "SELECT pg_last_wal_replay_lsn()" || echo "?")): its lag below starts from there")
        log "warning: ${NOTES[-1]}"
    fi
    ARCHFED_UP=1
fi
set_sync none
log "lag run: $LAG_CLIENTS clients, $LAG_DURATION s, synchronous_standby_names = '', sampling every second"
SAMPLE=1 run_pgbench "lag-c$LAG_CLIENTS" "$LAG_CLIENTS" "$LAG_DURATION"
LAG_TPS=$TPS
LAG_WAL_MIB=$(mib "$WAL_BYTES")

RECV_ROWS=()            # receiver|write median|write max|flush median|flush max|bytes median|bytes max|samples
for c in $CONFIGS; do
    app=${APP[$c]}
    [[ -n $app ]] || continue
    read -r wm wx _ < <(lag_stats recv "$app" 3)
    read -r fm fx _ < <(lag_stats recv "$app" 4)
    read -r bm bx bn < <(lag_stats recv "$app" 5)
    RECV_ROWS+=("${LABEL[$c]} ($app)|$wm|$wx|$fm|$fx|$bm|$bx|$bn")
done
REPLAY_ROWS=()          # standby|median|max|samples
for s in "streaming standby" "archive-fed standby"; do
    read -r rm rx rn < <(lag_stats replay "$s" 3)
    if ((rn > 0)); then REPLAY_ROWS+=("$s|$rm|$rx|$rn"); fi
done
((${#RECV_ROWS[@]} == 0 || $(awk -F'|' '$1 == "recv"' "$WORK/lag-samples.txt" | wc -l) > 0)) ||
    die "the lag sampler recorded nothing ($LOGS/sampler.err: $(head -c 500 "$LOGS/sampler.err"))"
[[ ! -s $LOGS/sampler.err ]] || NOTES+=("lag sampler: $(sort "$LOGS/sampler.err" | uniq -c | awk '{ $1 = $1 " x"; print }' | paste -sd';' -)")

# ---------------------------------------------------------------- the end
TOTAL_WAL_MIB=$(mib "$(wal_bytes_between "$STREAM_LSN0" "$(wal_lsn)")")
all_receivers_alive
if has_config walvault; then
    PUSH_HWM_KIB=$(status_kib "${PROC[pushclient]}" VmHWM)
    ARCHIVED_HWM_KIB=$(status_kib "$ARCHIVED_PID" VmHWM)
    RECONNECTS=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("reconnects", "?"))' \
        "$WORK/stream/status.json" 2>/dev/null || echo "? (no status file)")
    "${AS_PG_EXEC[@]}" "$BIN/pushclient" stream-status --status-file "$WORK/stream/status.json" >"$LOGS/stream-status.txt" 2>&1 || true
fi
LOAD_END=$(cut -d" " -f1-3 /proc/loadavg)
T_TOTAL=$(elapsed "$T_SCRIPT0" "$(now)" 0)

# ---------------------------------------------------------------- report
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "-"; else printf "%.2f", a / b }'; }
goal() { awk -v r="$1" -v g="$2" 'BEGIN { if (r == "-") print "-"; else print (r >= g ? "met" : "NOT met") }'; }

runs_table() {
    local r n c tps p50 p99 ntx wal cpu runs head=TPS more="" more_sep=""
    if ((ROUNDS > 1)); then head="TPS, median of $ROUNDS" more=" TPS per round |" more_sep="---|"; fi
    echo "| clients | configuration | synchronous_standby_names | $head | p50 ms | p99 ms | transactions | WAL MiB | CPU during the runs |$more"
    echo "|---:|---|---|---:|---:|---:|---:|---:|---|$more_sep"
    for r in "${ROWS[@]}"; do
        IFS='|' read -r n c tps p50 p99 ntx wal cpu runs <<<"$r"
        ((ROUNDS > 1)) && more=" $runs |"
        echo "| $n | ${LABEL[$c]} | '${APP[$c]}' | $tps | $p50 | $p99 | $ntx | $wal | ${cpu:--} |$more"
    done
}

ratio_table() {
    has_config walvault || return 0
    echo "| clients | walvault TPS | / pg_receivewal --synchronous (goal >= 1) | / streaming standby (goal >= 0.9 at 8 clients) | / none (ceiling) |"
    echo "|---:|---:|---|---|---|"
    local n rv rs rn gs
    for n in $CLIENTS; do
        rv=$(ratio "${TPS_OF["walvault $n"]}" "${TPS_OF["receivewal $n"]:-}")
        rs=$(ratio "${TPS_OF["walvault $n"]}" "${TPS_OF["standby $n"]:-}")
        rn=$(ratio "${TPS_OF["walvault $n"]}" "${TPS_OF["none $n"]:-}")
        gs=$([[ $n == 8 ]] && echo " ($(goal "$rs" 0.9))" || echo "")
        echo "| $n | ${TPS_OF["walvault $n"]} | ${rv}x ($(goal "$rv" 1)) | ${rs}x$gs | ${rn}x |"
    done
}

lag_tables() {
    local r a b c d e f g h
    if ((${#RECV_ROWS[@]} > 0)); then
        echo "| receiver (async) | write_lag ms, median | max | flush_lag ms, median | max | bytes behind (current - flush_lsn), median | max | samples |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|"
        for r in "${RECV_ROWS[@]}"; do
            IFS='|' read -r a b c d e f g h <<<"$r"
            echo "| $a | $b | $c | $d | $e | $f | $g | $h |"
        done
        echo
    fi
    if ((${#REPLAY_ROWS[@]} > 0)); then
        echo "| standby | replay lag bytes (primary's current - its pg_last_wal_replay_lsn), median | max | samples |"
        echo "|---|---:|---:|---:|"
        for r in "${REPLAY_ROWS[@]}"; do
            IFS='|' read -r a b c d <<<"$r"
            echo "| $a | $b | $c | $d |"
        done
    fi
}

GIT_REV=$(has_config walvault && build_rev "$BUILD_BIN" || echo "- (walvault not run)")
section() {
    cat <<EOF
## Stream benchmark, run $(date -u '+%Y-%m-%d %H:%M:%S UTC')

Written by \`benches/stream_bench.sh\` (see \`benches/README.md\`). Goals (issue 11): walvault's
TPS at least pg_receivewal --synchronous's at every client count, and at 8 clients at least
0.9x a streaming standby's.

- command: \`cd $REPO_ROOT && ${ENV_USED}$INVOCATION\` (as root), $T_TOTAL s in all
- walvault: commit $GIT_REV, release build (\`cargo build --release --workspace --bins\`)
- machine: $(machine_desc "$BENCH_TMPDIR"); load average $LOAD_START at the start, $LOAD_END at the end (the machine may be shared)
- $PG_VERSION; one primary (system identifier $SYSID), Unix socket only, \`synchronous_commit = on\`,
  \`max_wal_size = 16GB\`, otherwise defaults; \`pgbench -i -s $SCALE\`
- every receiver (configurations: $CONFIGS) streams from start to end on its own slot; between
  configurations only \`synchronous_standby_names\` changes (ALTER SYSTEM, pg_reload_conf, then
  pg_stat_replication.sync_state checked): each configuration runs beside the same processes.
  walvault: \`archived serve\` on 127.0.0.1 (QUIC + mTLS, local store) and \`pushclient stream
  --create-slot --slot walvault\` as postgres over the socket; pg_receivewal: \`--synchronous
  --no-loop\`, own slot, local directory; standby: \`pg_basebackup -R -C -S standby1 -X stream\`,
  hot_standby on. All data directories on $BENCH_TMPDIR.
- each run: \`CHECKPOINT\`, every receiver caught up (flush, and the standby's replay), then
  \`pgbench -M prepared -c N -j N -T $DURATION -l\` (TPC-B; pgbench's own vacuum first);
  TPS = pgbench's "without initial connection time"; latency = column 3 of the
  per-transaction log (whole transaction, commit wait included), nearest rank.
  Order: $ROUNDS round(s); in each, for each client count ($CLIENTS), the configurations in
  the order above (reversed in even rounds). TPS: $([[ $ROUNDS == 1 ]] && echo "one run" || echo "median of the rounds"); latency percentiles over
  every transaction of the rounds. CPU = user + system seconds the named processes used
  during those runs.

$(runs_table)

$(ratio_table)

**Lag without a synchronous standby**: \`synchronous_standby_names = ''\`, \`pgbench -M prepared
-c $LAG_CLIENTS -j $LAG_CLIENTS -T $LAG_DURATION\` ($LAG_TPS TPS, $LAG_WAL_MIB MiB of WAL), sampled every second on the
primary (pg_stat_replication; for the standbys pg_last_wal_replay_lsn() queried on each standby
just before the primary's pg_current_wal_lsn()). The archive-fed standby: \`pg_basebackup -X
stream\` after the runs above, \`restore_command = 'pullclient archive-get %f %p'\` (issued pull
config, defaults), standby.signal, no primary_conninfo, wal_retrieve_retry_interval at its
default (5 s).

$(lag_tables)

EOF
    if has_config walvault; then
        echo "- peak RSS (VmHWM) at the end of the run, after $TOTAL_WAL_MIB MiB of WAL streamed: **pushclient stream $(kib_mib "$PUSH_HWM_KIB") MiB**, **archived $(kib_mib "$ARCHIVED_HWM_KIB") MiB**"
        local h
        for h in "${HWM_NOTES[@]}"; do echo "- VmHWM $h"; done
        echo "- pushclient stream reconnects during the run: $RECONNECTS"
    fi
    local note
    for note in "${NOTES[@]}"; do echo "- $note"; done
    echo
}

echo
runs_table
echo
ratio_table
echo
lag_tables
section | results_insert "$RESULTS"
log "added to $RESULTS as the newest run ($T_TOTAL s in all)"
