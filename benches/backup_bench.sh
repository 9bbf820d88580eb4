#!/usr/bin/env bash
# backup_bench.sh: base backup and restore of one pgbench database with walvault,
# pg_basebackup and pgBackRest, in the same run, then a second backup after updating 1% of
# pgbench_accounts (a contiguous range of aid) beside pgBackRest's incrementals.
#
# Phases (one PostgreSQL 15 cluster on a Unix socket; archived on 127.0.0.1):
#   0. initdb, archive_command pushing to walvault AND pgBackRest (both need the WAL),
#      pgbench -i -s SCALE
#   1. pg_basebackup -Ft -X none -c fast (tar to local disk, fsynced)
#   2. walvault: pushclient backup --fast (waits for its WAL), bytes stored, peak RSS
#   3. pgBackRest full backups: repo1 plain, repo2 block incremental (repo-bundle=y,
#      repo-block=y, beta=y); posix repos, compress-type=zst, process-max=PROCESS_MAX
#   4. restores: pullclient restore, pgbackrest restore (repo1), into empty directories,
#      RESTORE_ROUNDS rounds in alternating order, medians
#   5. UPDATE 1% of pgbench_accounts; walvault second backup; pgBackRest incr on both repos
#
# Adds its section to benches/RESULTS.md as the newest run (results_insert, lib.sh).
# Must run as root (PostgreSQL and pgBackRest run as `postgres` via runuser).
#
# Environment knobs (defaults in brackets):
#   SCALE [50]          pgbench -i scale (50 = 5 million accounts, ~750 MB)
#   PROCESS_MAX [2]     pgBackRest process-max
#   PGBIN [/usr/lib/postgresql/15/bin]
#   BENCH_TMPDIR [/tmp] where the work directory is made (its disk is what is measured)
#   SKIP_BUILD [0]      1 = use the existing release binaries
#   CARGO_TARGET_DIR    whose release/ binaries to measure [this tree's target]; with
#                       SKIP_BUILD=1, another worktree's build (its commit is recorded)
#   KEEP_WORK [0]       1 = keep the work directory
#   RESTORE_ROUNDS [3]  restores of each tool, order alternating; the median is reported
#   RESULTS [benches/RESULTS.md]
set -Eeuo pipefail

SCALE=${SCALE:-50}
PROCESS_MAX=${PROCESS_MAX:-2}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
BENCH_TMPDIR=${BENCH_TMPDIR:-/tmp}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_WORK=${KEEP_WORK:-0}
RESTORE_ROUNDS=${RESTORE_ROUNDS:-3}
PGPORT=5432
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
RESULTS=${RESULTS:-$SCRIPT_DIR/RESULTS.md}
BUILD_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release

BENCH_NAME=backup_bench
# shellcheck source=benches/lib.sh
source "$SCRIPT_DIR/lib.sh"

WORK=""
PG_STARTED=0
ARCHIVED_PID=""
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ -n $ARCHIVED_PID ]]; then kill -TERM "$ARCHIVED_PID" 2>/dev/null; wait "$ARCHIVED_PID" 2>/dev/null; fi
    if [[ $PG_STARTED == 1 ]]; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pgdata" -m immediate -w -t 30 stop >/dev/null 2>&1
    fi
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $KEEP_WORK == 1 ]]; then log "work directory kept: $WORK"; else rm -rf -- "$WORK"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
dusb() { du -sb "$1" | awk '{ print $1 }'; }

# timed LOG CMD...: runs CMD (stdout+stderr to LOG) under /usr/bin/time; sets SECS and
# RSS_KIB (peak RSS of CMD itself).
timed() {
    local logf=$1
    shift
    local t0 t1 rc=0
    t0=$(now)
    /usr/bin/time -f 'walvault-bench-maxrss %M cpu %U %S' -o "$logf.time" "$@" >>"$logf" 2>&1 || rc=$?
    t1=$(now)
    if ((rc != 0)); then
        tail -n 40 "$logf" >&2
        die "command failed (exit $rc): $(printf '%q ' "$@") (log $logf above)"
    fi
    SECS=$(elapsed "$t0" "$t1")
    RSS_KIB=$(awk '$1 == "walvault-bench-maxrss" { print $2 }' "$logf.time")
    CPU=$(awk '$1 == "walvault-bench-maxrss" { printf "%.1f", $4 + $5 }' "$logf.time")
}

# CPU seconds (user + system) archived has used so far.
archived_cpu() {
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.1f", ($12 + $13) / hz }' "/proc/$ARCHIVED_PID/stat"
}

ROWS=()
row() { ROWS+=("$1|$2|$3|$4|$5|$6|$7"); log "$1 $2: $3 s, $4 MB/s, stored $5 MiB, peak RSS $6, CPU $7 s"; }
rate() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.0f", b / 1e6 / s }'; }

[[ $(id -u) == 0 ]] || die "run as root (PostgreSQL and pgBackRest run as 'postgres' via runuser)"
need_pg_tools initdb pg_ctl pgbench psql pg_basebackup
[[ -x /usr/bin/time ]] || { apt-get install -y time >&2 || die "/usr/bin/time missing (apt-get install time)"; }
ensure_pgbackrest
release_build "$BUILD_BIN"

WORK=$(mktemp -d "$BENCH_TMPDIR/walvault-backup-bench.XXXXXX")
chmod 0755 "$WORK"
cd "$WORK"
mkdir -p bin logs sock pgbr/repo1 pgbr/repo2 pgbr/log pgbr/lock pgbr/spool pgbb
for b in archived pushclient pullclient; do
    [[ -x $BUILD_BIN/$b ]] || die "$BUILD_BIN/$b missing (cargo build --release --workspace --bins)"
    cp "$BUILD_BIN/$b" bin/ && chmod 0755 "bin/$b"
done
BIN=$WORK/bin
chown postgres: sock pgbr pgbr/* pgbb
LOGS=$WORK/logs
chmod 0777 "$LOGS"
log "work directory $WORK"

# ---------------------------------------------------------------- archived
WV=$WORK/wv
WV_PORT=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN/archived" init --data-dir "$WV" --listen "127.0.0.1:$WV_PORT" >>"$LOGS/admin.log" 2>&1 || die "archived init"
"$BIN/archived" issue --data-dir "$WV" --cluster bench --role push --out "$WORK/push.toml" >>"$LOGS/admin.log" 2>&1
"$BIN/archived" issue --data-dir "$WV" --cluster bench --role pull --out "$WORK/pull.toml" >>"$LOGS/admin.log" 2>&1
chown postgres: "$WORK/push.toml" "$WORK/pull.toml"
start_archived "$WV" "$LOGS/archived.log" "$WORK/push.toml"

# ---------------------------------------------------------------- PostgreSQL + pgBackRest
PGDATA=$WORK/pgdata
mkdir "$PGDATA" && chown postgres: "$PGDATA"
as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres -A trust -E UTF8 --no-sync >"$LOGS/initdb.log" 2>&1 || die "initdb"
PGBR_CONF=$WORK/pgbr/pgbackrest.conf
cat >"$PGBR_CONF" <<EOF
[global]
repo1-path=$WORK/pgbr/repo1
repo2-path=$WORK/pgbr/repo2
repo2-bundle=y
repo2-block=y
beta=y
log-path=$WORK/pgbr/log
lock-path=$WORK/pgbr/lock
spool-path=$WORK/pgbr/spool
compress-type=zst
process-max=$PROCESS_MAX
start-fast=y
log-level-console=warn

[bench]
pg1-path=$PGDATA
pg1-socket-path=$WORK/sock
pg1-port=$PGPORT
EOF
chown postgres: "$PGBR_CONF"
cat >>"$PGDATA/postgresql.conf" <<EOF

# backup_bench.sh
listen_addresses = ''
unix_socket_directories = '$WORK/sock'
port = $PGPORT
wal_level = replica
max_wal_senders = 4
archive_mode = on
archive_command = '$BIN/pushclient archive-push %p --config $WORK/push.toml && pgbackrest --config=$PGBR_CONF --stanza=bench archive-push %p'
max_wal_size = '4GB'
EOF
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$LOGS/postgresql.log" -w -t 60 start >/dev/null || die "pg_ctl start"
PG_STARTED=1
as_pg pgbackrest --config="$PGBR_CONF" --stanza=bench stanza-create >>"$LOGS/pgbackrest.log" 2>&1 || die "stanza-create"
log "pgbench -i -s $SCALE"
as_pg "$PGBIN/pgbench" -h "$WORK/sock" -p "$PGPORT" -i -q -s "$SCALE" postgres >>"$LOGS/pgbench.log" 2>&1 || die "pgbench -i"
psql_q "CHECKPOINT" >/dev/null
DB_BYTES=$(psql_q "SELECT sum(pg_database_size(oid)) FROM pg_database")
log "database: $(mib "$DB_BYTES") MiB"
sync

# ---------------------------------------------------------------- full backups
export PGHOST=$WORK/sock PGPORT
log "pg_basebackup -Ft -X none -c fast"
timed "$LOGS/pg_basebackup.log" runuser -u postgres -- "$PGBIN/pg_basebackup" -D "$WORK/pgbb/full" -Ft -X none -c fast
row "pg_basebackup -Ft" "full backup" "$SECS" "$(rate "$DB_BYTES" "$SECS")" "$(mib "$(dusb "$WORK/pgbb/full")")" "$((RSS_KIB / 1024)) MiB" "$CPU"
rm -rf "$WORK/pgbb/full"
sync

bw_stored() { # id -> stored_bytes from the archive's listing
    "$BIN/archived" backups list --data-dir "$WV" --cluster bench --json |
        python3 -c 'import json,sys; print(next(b["stored_bytes"] for b in json.load(sys.stdin) if b["id"] == sys.argv[1]))' "$1"
}
log "walvault: pushclient backup --fast"
A0=$(archived_cpu)
timed "$LOGS/wv-full.log" runuser -u postgres -- env PGHOST="$WORK/sock" PGPORT=$PGPORT "$BIN/pushclient" backup --fast --config "$WORK/push.toml"
WV_FULL_ID=$(awk '$1 == "backup" && $3 == "committed:" { print $2 }' "$LOGS/wv-full.log" | tail -n 1)
row "walvault" "full backup" "$SECS" "$(rate "$DB_BYTES" "$SECS")" "$(mib "$(bw_stored "$WV_FULL_ID")")" "$((RSS_KIB / 1024)) MiB" "$CPU + archived $(awk -v a="$A0" -v b="$(archived_cpu)" 'BEGIN { printf "%.1f", b - a }')"
sync

for repo in 1 2; do
    log "pgBackRest full backup, repo$repo"
    before=$(dusb "$WORK/pgbr/repo$repo/backup")
    timed "$LOGS/pgbr-full$repo.log" runuser -u postgres -- pgbackrest --config="$PGBR_CONF" --stanza=bench --repo=$repo --type=full backup
    kind=$([[ $repo == 1 ]] && echo "pgBackRest" || echo "pgBackRest block")
    row "$kind" "full backup" "$SECS" "$(rate "$DB_BYTES" "$SECS")" "$(mib $(($(dusb "$WORK/pgbr/repo$repo/backup") - before)))" "$((RSS_KIB / 1024)) MiB" "$CPU"
    sync
done

# ---------------------------------------------------------------- restores
# RESTORE_ROUNDS rounds, the order alternating (walvault first in odd rounds): whichever
# runs first inherits the kernel's state after the backups (writeback, reclaim), which
# moved one restore by 2x in single-order runs. Each restore starts after a sync; the
# table shows the median round, the notes every round.
mkdir -p "$WORK/restore" && chown postgres: "$WORK/restore"
WV_R=() PGBR_R=()
wv_restore() {
    sync
    log "walvault: pullclient restore (round $1)"
    A0=$(archived_cpu)
    timed "$LOGS/wv-restore-$1.log" runuser -u postgres -- "$BIN/pullclient" restore --pgdata "$WORK/restore/wv" --config "$WORK/pull.toml"
    WV_R+=("$SECS|$((RSS_KIB / 1024)) MiB|$CPU + archived $(awk -v a="$A0" -v b="$(archived_cpu)" 'BEGIN { printf "%.1f", b - a }')")
    rm -rf "$WORK/restore/wv"
}
pgbr_restore() {
    sync
    log "pgBackRest restore (repo1, round $1)"
    mkdir -m 0700 "$WORK/restore/pgbr" && chown postgres: "$WORK/restore/pgbr"
    timed "$LOGS/pgbr-restore-$1.log" runuser -u postgres -- pgbackrest --config="$PGBR_CONF" --stanza=bench --repo=1 --pg1-path="$WORK/restore/pgbr" restore
    PGBR_R+=("$SECS|$((RSS_KIB / 1024)) MiB|$CPU")
    rm -rf "$WORK/restore/pgbr"
}
for ((round = 1; round <= RESTORE_ROUNDS; round++)); do
    if ((round % 2 == 1)); then wv_restore $round; pgbr_restore $round; else pgbr_restore $round; wv_restore $round; fi
done
sync
# median_row NAME ROUNDS...: the row of the median round (by seconds), every round in a note.
median_row() {
    local name=$1
    shift
    local med
    med=$(printf '%s\n' "$@" | sort -t'|' -k1,1g | sed -n "$((($# + 1) / 2))p")
    IFS='|' read -r secs rss cpu <<<"$med"
    row "$name" "restore" "$secs" "$(rate "$DB_BYTES" "$secs")" "" "$rss" "$cpu"
    NOTES+=("$name restore, seconds per round (order alternating, walvault first in round 1): $(printf '%s\n' "$@" | cut -d'|' -f1 | paste -sd' ')")
}
NOTES=()
median_row "walvault" "${WV_R[@]}"
median_row "pgBackRest" "${PGBR_R[@]}"

# ---------------------------------------------------------------- 1% change, second backups
ROWS_1PCT=$((SCALE * 1000))
FIRST=$((SCALE * 50000))
log "UPDATE of $ROWS_1PCT accounts (aid $((FIRST + 1)) .. $((FIRST + ROWS_1PCT)))"
psql_q "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN $((FIRST + 1)) AND $((FIRST + ROWS_1PCT))" >/dev/null
log "walvault: second backup"
A0=$(archived_cpu)
timed "$LOGS/wv-incr.log" runuser -u postgres -- env PGHOST="$WORK/sock" PGPORT=$PGPORT "$BIN/pushclient" backup --fast --config "$WORK/push.toml"
WV_INCR_ID=$(awk '$1 == "backup" && $3 == "committed:" { print $2 }' "$LOGS/wv-incr.log" | tail -n 1)
row "walvault" "2nd backup after 1% update" "$SECS" "$(rate "$DB_BYTES" "$SECS")" "$(mib "$(bw_stored "$WV_INCR_ID")")" "$((RSS_KIB / 1024)) MiB" "$CPU + archived $(awk -v a="$A0" -v b="$(archived_cpu)" 'BEGIN { printf "%.1f", b - a }')"
WV_INCR_BYTES=$(bw_stored "$WV_INCR_ID")
for repo in 1 2; do
    before=$(dusb "$WORK/pgbr/repo$repo/backup")
    timed "$LOGS/pgbr-incr$repo.log" runuser -u postgres -- pgbackrest --config="$PGBR_CONF" --stanza=bench --repo=$repo --type=incr backup
    kind=$([[ $repo == 1 ]] && echo "pgBackRest incr" || echo "pgBackRest block incr")
    stored=$(($(dusb "$WORK/pgbr/repo$repo/backup") - before))
    [[ $repo == 2 ]] && PGBR_BLOCK_INCR_BYTES=$stored
    row "$kind" "2nd backup after 1% update" "$SECS" "$(rate "$DB_BYTES" "$SECS")" "$(mib "$stored")" "$((RSS_KIB / 1024)) MiB" "$CPU"
done
ARCHIVED_HWM_KIB=$(awk '$1 == "VmHWM:" { print $2 }' "/proc/$ARCHIVED_PID/status")

# ---------------------------------------------------------------- report
COMMIT=$(build_rev "$BUILD_BIN")
{
    echo
    echo "## Backup benchmark, run $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo
    echo "- command: \`benches/backup_bench.sh\` (as root; SCALE=$SCALE PROCESS_MAX=$PROCESS_MAX RESTORE_ROUNDS=$RESTORE_ROUNDS), commit $COMMIT, release build"
    echo "- machine: $(nproc) CPUs, $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo), $BENCH_TMPDIR on $(df --output=source "$BENCH_TMPDIR" | tail -n 1)"
    echo "- $("$PGBIN/postgres" --version); $PGBR_VERSION: posix repos, compress-type=zst, process-max=$PROCESS_MAX, start-fast=y; repo2 with repo-bundle=y repo-block=y beta=y"
    echo "- database: pgbench -i -s $SCALE, $(mib "$DB_BYTES") MiB (pg_database_size); MB/s = database bytes (10^6) / seconds"
    echo "- walvault: 128 KiB chunks, zstd level 3, archived on 127.0.0.1 (QUIC + mTLS), local store; the backup time includes waiting for its WAL to be archived"
    echo "- 1% update: \`UPDATE pgbench_accounts SET abalance = abalance + 1\` on $ROWS_1PCT contiguous aids"
    echo
    echo "| tool | operation | seconds | MB/s | stored MiB | peak RSS | CPU s |"
    echo "|---|---|---:|---:|---:|---:|---:|"
    for r in "${ROWS[@]}"; do
        IFS='|' read -r a b c d e f g <<<"$r"
        echo "| $a | $b | $c | $d | $e | $f | $g |"
    done
    echo
    echo "- archived peak RSS (VmHWM) over the whole run: $((ARCHIVED_HWM_KIB / 1024)) MiB"
    for n in "${NOTES[@]}"; do echo "- $n"; done
    echo "- second backup stored: walvault $(mib "$WV_INCR_BYTES") MiB, pgBackRest block incremental $(mib "$PGBR_BLOCK_INCR_BYTES") MiB"
} | tee /dev/stderr | results_insert "$RESULTS"
log "added to $RESULTS as the newest run"
