#!/usr/bin/env bash
# archive_bench.sh: macro benchmark of walvault's archive path against cp+fsync and
# pgBackRest, on one fixed set of real WAL segments made by pgbench in the same run.
#
# Phases (all on 127.0.0.1 / local disk, one process per segment, sequential, as
# PostgreSQL calls archive_command / restore_command):
#   1. cp + fsync (file and directory) into a local directory      (baseline)
#   2. walvault: pushclient archive-push, then pullclient archive-get
#   3. pgBackRest (posix repo, compress-type=zst, archive-async=n): archive-push, archive-get
#   4. walvault with PUSHERS concurrent pushers (clusters bench1..benchN, each pushing the
#      full set) against a fresh archived; reports aggregate rate and archived's VmHWM.
#
# Prints a table and adds it to benches/RESULTS.md as the newest run (results_insert, lib.sh).
# Must run as root (PostgreSQL and pgBackRest run as the `postgres` user via runuser).
#
# Environment knobs (defaults in brackets):
#   SEGMENTS [64]       segments in the set (>= 64 for a publishable run)
#   PUSHERS [8]         concurrent pushers in phase 4
#   PGBENCH_SCALE [20]  pgbench -i scale factor
#   PGBIN [/usr/lib/postgresql/15/bin]
#   BENCH_TMPDIR [/tmp] where the work directory is made (its disk is what is measured)
#   CMD_TIMEOUT [120]   seconds allowed to any single push/get/cp process
#   SKIP_BUILD [0]      1 = use the existing target/release binaries
#   CARGO_TARGET_DIR    whose release/ binaries to measure [this tree's target]; with
#                       SKIP_BUILD=1, another worktree's build (its commit is recorded)
#   KEEP_WORK [0]       1 = keep the work directory (for post-mortems)
#   RESULTS [benches/RESULTS.md]
set -Eeuo pipefail

SEGMENTS=${SEGMENTS:-64}
PUSHERS=${PUSHERS:-8}
PGBENCH_SCALE=${PGBENCH_SCALE:-20}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
BENCH_TMPDIR=${BENCH_TMPDIR:-/tmp}
CMD_TIMEOUT=${CMD_TIMEOUT:-120}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_WORK=${KEEP_WORK:-0}
PGPORT=${PGPORT:-5432}          # Unix socket only, in a private directory
MAX_LOAD_ROUNDS=60              # pgbench rounds of LOAD_SECS at most
LOAD_SECS=10

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
RESULTS=${RESULTS:-$SCRIPT_DIR/RESULTS.md}
BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release
SEG_BYTES=16777216
INVOCATION=$(printf '%q ' "$0" "$@")
INVOCATION=${INVOCATION% }
# Knobs given in the environment, for the "exact command" in RESULTS.md.
ENV_USED=""
for v in SEGMENTS PUSHERS PGBENCH_SCALE PGBIN BENCH_TMPDIR CMD_TIMEOUT SKIP_BUILD CARGO_TARGET_DIR PGPORT; do
    if printenv "$v" >/dev/null; then ENV_USED+="$v=$(printenv "$v") "; fi
done

BENCH_NAME=archive_bench
# shellcheck source=benches/lib.sh
source "$SCRIPT_DIR/lib.sh"

# ---------------------------------------------------------------- cleanup
WORK=""
PG_STARTED=0
ARCHIVED_PID=""
BG_PIDS=()

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    for p in "${BG_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    if [[ -n $ARCHIVED_PID ]]; then stop_archived; fi
    if [[ $PG_STARTED == 1 && -n $WORK ]]; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pgdata" -m immediate -w -t 30 stop \
            >/dev/null 2>&1
    fi
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $KEEP_WORK == 1 || $rc != 0 && ${KEEP_ON_FAILURE:-0} == 1 ]]; then
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

# ---------------------------------------------------------------- helpers

ROWS=()
# add_row TOOL PHASE SEGMENTS SECONDS
add_row() {
    local segs_s mb_s
    segs_s=$(awk -v n="$3" -v s="$4" 'BEGIN { printf "%.1f", n / s }')
    mb_s=$(awk -v n="$3" -v s="$4" -v b="$SEG_BYTES" 'BEGIN { printf "%.1f", n * b / 1e6 / s }')
    ROWS+=("$1|$2|$3|$4|$segs_s|$mb_s")
    log "$1 $2: $3 segments in $4 s = $segs_s segments/s, $mb_s MB/s"
}

stop_archived() {
    local i
    [[ -n $ARCHIVED_PID ]] || return 0
    kill -TERM "$ARCHIVED_PID" 2>/dev/null || true
    for ((i = 0; i < 350; i++)); do
        kill -0 "$ARCHIVED_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$ARCHIVED_PID" 2>/dev/null; then
        log "archived $ARCHIVED_PID ignored SIGTERM for 35 s; killing it"
        kill -KILL "$ARCHIVED_PID" 2>/dev/null || true
    fi
    wait "$ARCHIVED_PID" 2>/dev/null || true
    ARCHIVED_PID=""
}

# verify_copies DIR: every segment of the set is present in DIR with identical bytes.
verify_copies() {
    local dir=$1 name
    for name in "${NAMES[@]}"; do
        cmp -s -- "$SET/$name" "$dir/$name" || die "$dir/$name differs from $SET/$name"
    done
}

# ---------------------------------------------------------------- preflight
[[ $(id -u) == 0 ]] || die "run as root (PostgreSQL and pgBackRest run as 'postgres' via runuser)"
[[ $SEGMENTS =~ ^[0-9]+$ && $SEGMENTS -ge 1 ]] || die "SEGMENTS must be a positive integer"
[[ $PUSHERS =~ ^[0-9]+$ && $PUSHERS -ge 1 ]] || die "PUSHERS must be a positive integer"
((SEGMENTS >= 64)) || log "warning: SEGMENTS=$SEGMENTS < 64: not a publishable run"
need_pg_tools initdb pg_ctl pgbench psql postgres
need_commands runuser timeout python3 awk cmp sync getconf
ensure_pgbackrest
PG_VERSION=$("$PGBIN/postgres" --version)
release_build "$BIN"

WORK=$(mktemp -d "$BENCH_TMPDIR/walvault-bench.XXXXXX")
chmod 0755 "$WORK"
cd "$WORK"
mkdir -p logs sock pglog src set cp-dst wv-get pgbr/repo pgbr/log pgbr/lock pgbr/spool pgbr-get
chown postgres: sock pglog src pgbr pgbr/* pgbr-get
LOGS=$WORK/logs
log "work directory $WORK"

# ---------------------------------------------------------------- 0. the WAL set
PGDATA=$WORK/pgdata
log "initdb + pgBackRest stanza + pgbench to make >= $SEGMENTS segments"
mkdir "$PGDATA" && chown postgres: "$PGDATA"
as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres -A trust -E UTF8 --no-sync >"$LOGS/initdb.log" 2>&1 ||
    { cat "$LOGS/initdb.log" >&2; die "initdb failed"; }
cat >>"$PGDATA/postgresql.conf" <<EOF

# archive_bench.sh
listen_addresses = ''
unix_socket_directories = '$WORK/sock'
port = $PGPORT
wal_level = replica
archive_mode = on
archive_command = 'test ! -f $WORK/src/%f && cp %p $WORK/src/%f'
synchronous_commit = off
EOF

PGBR_CONF=$WORK/pgbr/pgbackrest.conf
cat >"$PGBR_CONF" <<EOF
[global]
repo1-path=$WORK/pgbr/repo
log-path=$WORK/pgbr/log
lock-path=$WORK/pgbr/lock
spool-path=$WORK/pgbr/spool
compress-type=zst
archive-async=n
log-level-console=warn

[bench]
pg1-path=$PGDATA
pg1-socket-path=$WORK/sock
pg1-port=$PGPORT
EOF
chown postgres: "$PGBR_CONF"

as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/pglog/postgresql.log" -w -t 60 start >/dev/null ||
    { cat "$WORK/pglog/postgresql.log" >&2; die "pg_ctl start failed"; }
PG_STARTED=1
# pgBackRest checks each segment's system identifier against its stanza, so the stanza
# is made against this very cluster while it runs.
run_logged "$LOGS/pgbackrest.log" runuser -u postgres -- \
    pgbackrest --config="$PGBR_CONF" --stanza=bench stanza-create

run_logged "$LOGS/pgbench.log" runuser -u postgres -- \
    "$PGBIN/pgbench" -h "$WORK/sock" -p "$PGPORT" -i -q -s "$PGBENCH_SCALE" postgres

INIT_END=$(psql_q "select pg_walfile_name(pg_current_wal_lsn())")

count_archived() { find "$WORK/src" -maxdepth 1 -regextype posix-extended -regex '.*/[0-9A-F]{24}' | wc -l; }
rounds=0
while (($(count_archived) < SEGMENTS)); do
    ((rounds < MAX_LOAD_ROUNDS)) ||
        die "only $(count_archived) segments archived after $MAX_LOAD_ROUNDS pgbench rounds"
    rounds=$((rounds + 1))
    CMD_TIMEOUT=$((LOAD_SECS + 60)) run_logged "$LOGS/pgbench.log" runuser -u postgres -- \
        "$PGBIN/pgbench" -h "$WORK/sock" -p "$PGPORT" -n -c 4 -j 2 -T "$LOAD_SECS" postgres
done
SWITCHED=$(psql_q "select pg_walfile_name(pg_switch_wal())")
for ((i = 0; i < 300; i++)); do
    last=$(psql_q "select coalesce(last_archived_wal, '') from pg_stat_archiver")
    [[ $last > $SWITCHED || $last == "$SWITCHED" ]] && break
    sleep 0.2
done
SYSID=$(psql_q "select system_identifier from pg_control_system()")
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 120 stop >/dev/null || die "pg_ctl stop failed"
PG_STARTED=0

# The set: the first SEGMENTS complete 16 MiB segments (24 hex digit names), in order.
mapfile -t ALL < <(find "$WORK/src" -maxdepth 1 -type f -size "${SEG_BYTES}c" \
    -regextype posix-extended -regex '.*/[0-9A-F]{24}' -printf '%f\n' | sort)
((${#ALL[@]} >= SEGMENTS)) || die "only ${#ALL[@]} complete segments archived, need $SEGMENTS"
NAMES=("${ALL[@]:0:SEGMENTS}")
SET=$WORK/set
for name in "${NAMES[@]}"; do ln "$WORK/src/$name" "$SET/$name"; done
chmod 0644 "$SET"/*
N_INIT=0
for name in "${NAMES[@]}"; do [[ $name > $INIT_END ]] || N_INIT=$((N_INIT + 1)); done
SET_MB=$(awk -v n="$SEGMENTS" -v b="$SEG_BYTES" 'BEGIN { printf "%.1f", n * b / 1e6 }')
log "set: $SEGMENTS segments ${NAMES[0]}..${NAMES[-1]} ($SET_MB MB raw), system id $SYSID," \
    "${#ALL[@]} archived in all, $rounds pgbench rounds of ${LOAD_SECS}s;" \
    "$N_INIT of the set hold initdb + pgbench -i WAL"

# ---------------------------------------------------------------- 1. cp + fsync
log "phase 1: cp + fsync"
sync
t0=$(now)
for name in "${NAMES[@]}"; do
    cp -- "$SET/$name" "$WORK/cp-dst/$name" && sync -- "$WORK/cp-dst/$name" "$WORK/cp-dst" ||
        die "cp/sync of $name failed"
done
t1=$(now)
add_row "cp + fsync" "copy" "$SEGMENTS" "$(elapsed "$t0" "$t1")"
verify_copies "$WORK/cp-dst"

# ---------------------------------------------------------------- 2. walvault
log "phase 2: walvault (archived serve, pushclient archive-push, pullclient archive-get)"
WV=$WORK/wv
WV_PORT=$(free_udp_port)
run_logged "$LOGS/archived-admin.log" "$BIN/archived" init --data-dir "$WV" --listen "127.0.0.1:$WV_PORT"
run_logged "$LOGS/archived-admin.log" "$BIN/archived" issue --data-dir "$WV" --cluster bench \
    --role push --out "$WORK/push.toml"
run_logged "$LOGS/archived-admin.log" "$BIN/archived" issue --data-dir "$WV" --cluster bench \
    --role pull --out "$WORK/pull.toml"
start_archived "$WV" "$LOGS/archived-serve.log" "$WORK/push.toml"

sync
t0=$(now)
for name in "${NAMES[@]}"; do
    run_logged "$LOGS/pushclient.log" "$BIN/pushclient" archive-push "$SET/$name" --config "$WORK/push.toml"
done
t1=$(now)
add_row "walvault" "archive-push" "$SEGMENTS" "$(elapsed "$t0" "$t1")"

sync
t0=$(now)
for name in "${NAMES[@]}"; do
    run_logged "$LOGS/pullclient.log" "$BIN/pullclient" archive-get "$name" "$WORK/wv-get/$name" \
        --config "$WORK/pull.toml"
done
t1=$(now)
add_row "walvault" "archive-get" "$SEGMENTS" "$(elapsed "$t0" "$t1")"
verify_copies "$WORK/wv-get"
WV_SEQ_HWM_KIB=$(status_kib "$ARCHIVED_PID" VmHWM)
WV_SEQ_CPU=$(cpu_secs "$ARCHIVED_PID")
stop_archived
WV_STORED=$(du -sb "$WV/store" | awk '{ print $1 }')

# ---------------------------------------------------------------- 3. pgBackRest
log "phase 3: pgBackRest ($PGBR_VERSION) archive-push / archive-get, synchronous"
# One runuser for the whole loop (not one per segment), so pgBackRest's figures carry no
# runuser/PAM overhead; each segment is still its own pgbackrest process.
export -f run_logged die log
export CMD_TIMEOUT PGBR_CONF SET
sync
t0=$(now)
runuser -u postgres -- bash -Eeuo pipefail -c '
    for name in "$@"; do
        run_logged "'"$WORK"'/pgbr/bench-push.log" pgbackrest --config="$PGBR_CONF" \
            --stanza=bench archive-push "$SET/$name"
    done' bash "${NAMES[@]}" || die "pgbackrest archive-push loop failed"
t1=$(now)
add_row "pgBackRest" "archive-push" "$SEGMENTS" "$(elapsed "$t0" "$t1")"

sync
t0=$(now)
runuser -u postgres -- bash -Eeuo pipefail -c '
    for name in "$@"; do
        run_logged "'"$WORK"'/pgbr/bench-get.log" pgbackrest --config="$PGBR_CONF" \
            --stanza=bench archive-get "$name" "'"$WORK"'/pgbr-get/$name"
    done' bash "${NAMES[@]}" || die "pgbackrest archive-get loop failed"
t1=$(now)
add_row "pgBackRest" "archive-get" "$SEGMENTS" "$(elapsed "$t0" "$t1")"
verify_copies "$WORK/pgbr-get"
PGBR_STORED=$(du -sb "$WORK/pgbr/repo/archive" | awk '{ print $1 }')

# ---------------------------------------------------------------- 4. N concurrent pushers
log "phase 4: walvault, $PUSHERS concurrent pushers (clusters bench1..bench$PUSHERS), fresh archived"
WV8=$WORK/wv8
WV8_PORT=$(free_udp_port)
run_logged "$LOGS/archived-admin.log" "$BIN/archived" init --data-dir "$WV8" --listen "127.0.0.1:$WV8_PORT"
for ((k = 1; k <= PUSHERS; k++)); do
    run_logged "$LOGS/archived-admin.log" "$BIN/archived" issue --data-dir "$WV8" \
        --cluster "bench$k" --role push --out "$WORK/push$k.toml"
done
start_archived "$WV8" "$LOGS/archived-serve8.log" "$WORK/push1.toml"

sync
BG_PIDS=()
t0=$(now)
for ((k = 1; k <= PUSHERS; k++)); do
    (
        for name in "${NAMES[@]}"; do
            run_logged "$LOGS/pushclient$k.log" "$BIN/pushclient" archive-push "$SET/$name" \
                --config "$WORK/push$k.toml"
        done
    ) 2>"$LOGS/pusher$k.err" &
    BG_PIDS+=($!)
done
failed=0
for ((k = 1; k <= PUSHERS; k++)); do
    wait "${BG_PIDS[k - 1]}" || { failed=1; cat "$LOGS/pusher$k.err" >&2; }
done
t1=$(now)
BG_PIDS=()
((failed == 0)) || die "a concurrent pusher failed (its command and output above)"
add_row "walvault" "archive-push x$PUSHERS" "$((SEGMENTS * PUSHERS))" "$(elapsed "$t0" "$t1")"
WV8_HWM_KIB=$(status_kib "$ARCHIVED_PID" VmHWM)
WV8_CPU=$(cpu_secs "$ARCHIVED_PID")
stop_archived
WV8_HWM_MIB=$(awk -v k="$WV8_HWM_KIB" 'BEGIN { printf "%.1f", k / 1024 }')
WV_SEQ_HWM_MIB=$(awk -v k="$WV_SEQ_HWM_KIB" 'BEGIN { printf "%.1f", k / 1024 }')

# ---------------------------------------------------------------- report
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
RAW_BYTES=$((SEGMENTS * SEG_BYTES))

table() {
    echo "| tool | phase | segments | seconds | segments/s | MB/s |"
    echo "|---|---|---:|---:|---:|---:|"
    local r
    for r in "${ROWS[@]}"; do
        IFS='|' read -r a b c d e f <<<"$r"
        echo "| $a | $b | $c | $d | $e | $f |"
    done
}

echo
table
echo
echo "archived peak RSS (VmHWM) with $PUSHERS concurrent pushers: $WV8_HWM_MIB MiB (CPU ${WV8_CPU}s)"
echo "archived peak RSS (VmHWM), sequential push+get:            $WV_SEQ_HWM_MIB MiB (CPU ${WV_SEQ_CPU}s)"
echo "stored: walvault $(mib "$WV_STORED") MiB, pgBackRest $(mib "$PGBR_STORED") MiB for $(mib "$RAW_BYTES") MiB raw"

# machine
MACHINE=$(machine_desc "$BENCH_TMPDIR")
GIT_REV=$(build_rev "$BIN")

section() {
    cat <<EOF
## Archive benchmark, run $(date -u '+%Y-%m-%d %H:%M:%S UTC')

- command: \`cd $REPO_ROOT && ${ENV_USED}$INVOCATION\` (as root)
- walvault: commit $GIT_REV, release build (\`cargo build --release --workspace --bins\`)
- machine: $MACHINE
- $PG_VERSION; $PGBR_VERSION (posix repo, compress-type=zst, default level, archive-async=n)
- set: $SEGMENTS segments of 16 MiB (${NAMES[0]} .. ${NAMES[-1]}), $SET_MB MB raw WAL, made in this run
  by pgbench (-i -s $PGBENCH_SCALE, then $rounds rounds of \`-c 4 -j 2 -T $LOAD_SECS\`, then pg_switch_wal);
  the first $N_INIT segments hold initdb + \`pgbench -i\` WAL (bulk COPY, very compressible), the rest TPC-B load
- per segment: \`cp SEG DST/ && sync DST/SEG DST\`; \`pushclient archive-push SEG --config push.toml\`;
  \`pullclient archive-get NAME DST/NAME --config pull.toml\`; \`pgbackrest --stanza=bench archive-push SEG\`;
  \`pgbackrest --stanza=bench archive-get NAME DST/NAME\` (pgBackRest as postgres, its config in the work dir)
- MB = 10^6 bytes of raw WAL; one process per segment, one after another, except the last row
  ($PUSHERS loops at once, each pushing the whole set under its own cluster name)

$(table)

- archived peak RSS (VmHWM) with $PUSHERS concurrent pushers: **$WV8_HWM_MIB MiB** (archived CPU ${WV8_CPU} s); sequential push+get: $WV_SEQ_HWM_MIB MiB (CPU ${WV_SEQ_CPU} s)
- stored size: walvault $(mib "$WV_STORED") MiB, pgBackRest $(mib "$PGBR_STORED") MiB, for $(mib "$RAW_BYTES") MiB raw
- walvault / pgBackRest: push $(ratio "${ROWS[1]##*|}" "${ROWS[3]##*|}")x, get $(ratio "${ROWS[2]##*|}" "${ROWS[4]##*|}")x (throughput ratio; >= 1 is the target)

EOF
}

section | results_insert "$RESULTS"
log "wrote $RESULTS"
