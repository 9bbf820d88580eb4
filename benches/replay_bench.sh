#!/usr/bin/env bash
# replay_bench.sh: how fast a restored PostgreSQL 15 replays archived WAL, with and
# without walvault's prefetching archive-get and prefaulter, in one run:
#
#   1. Cold-cache replay. A primary makes two WAL sets, each after its own base backup
#      (pg_basebackup -X none -c fast): set "off" with full_page_writes = off (replay must
#      read the blocks it changes), set "on" with full_page_writes = on. Every run restores
#      a fresh copy of the base backup, optionally evicts it (and its source) from the page
#      cache (fsync + posix_fadvise DONTNEED on every file), replays the whole set through
#      restore_command (recovery.signal, no target: replay all, then promote), and times
#      PostgreSQL's own "redo starts at" -> "redo done at" log lines (log_line_prefix '%m ').
#      Configurations: warm cache; cold, recovery_prefetch = off; cold, recovery_prefetch =
#      try (PostgreSQL's default, "on" where posix_fadvise exists); cold with walvault
#      (pullclient archive-get, prefault on) with recovery_prefetch off and try; cold with
#      walvault but prefault = false (what the prefaulter alone buys). Runs without walvault
#      use restore_command = cp from a local directory (isolates the prefetch effect).
#      Optional (TUNE=1): knob trials of the prefaulter, and the prefetch daemon started before
#      PostgreSQL (as the systemd unit would) instead of by the first archive-get.
#   2. archive-get latency during a real recovery (set "on", warm cache, PostgreSQL
#      defaults): every restore_command call is timed by a wrapper; median and p99 per
#      segment call, and recovery time ("starting archive recovery" -> "redo done") for cp (the
#      floor), walvault (pullclient archive-get with its spool) and pgBackRest 2.45
#      archive-get with archive-async=y (spool-path, process-max=2).
#   3. Decoder throughput: pullclient wal-blocks on each set beside pg_waldump (and -b).
#   4. The prefetch daemon's peak RSS (VmHWM) in every walvault run.
#
# Prints the tables and adds a "## Replay benchmark" section to benches/RESULTS.md as the
# newest run (results_insert, lib.sh).
# Must run as root (PostgreSQL and pgBackRest run as `postgres` via runuser).
#
# Environment knobs (defaults in brackets):
#   SCALE [40]          pgbench -i scale (40: 4 million accounts, ~600 MB of heap + index)
#   SEGS_OFF [8]        segments of pgbench WAL in set "off" (at least 4)
#   SEGS_ON [16]        segments of pgbench WAL in set "on"
#   RUNS [5]            runs per configuration of set "off" (medians reported)
#   RUNS_ON [3]         runs per configuration of set "on"
#   PASSES ["off on"]   which sets' recoveries to run (both sets are always made)
#   TUNE [0]            1 = also try prefaulter knobs, and the daemon started before PostgreSQL
#                       (set "off", cold, recovery_prefetch off, 3 runs each; adds ~4 minutes)
#   PGBIN [/usr/lib/postgresql/15/bin]
#   BENCH_TMPDIR [/tmp] where the work directory is made (its disk is what is measured)
#   RECOVERY_TIMEOUT [300] seconds allowed to one recovery
#   SKIP_BUILD [0]      1 = use the existing release binaries
#   CARGO_TARGET_DIR    whose release/ binaries to measure [this tree's target]; with
#                       SKIP_BUILD=1, another worktree's build (its commit is recorded)
#   KEEP_WORK [0]       1 = keep the work directory (logs, per-run files)
#   RESULTS [benches/RESULTS.md]
set -Eeuo pipefail
export LC_ALL=C

SCALE=${SCALE:-40}
SEGS_OFF=${SEGS_OFF:-8}
SEGS_ON=${SEGS_ON:-16}
RUNS=${RUNS:-5}
PASSES=${PASSES:-off on}
RUNS_ON=${RUNS_ON:-3}
TUNE=${TUNE:-0}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
BENCH_TMPDIR=${BENCH_TMPDIR:-/tmp}
RECOVERY_TIMEOUT=${RECOVERY_TIMEOUT:-300}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_WORK=${KEEP_WORK:-0}
PGPORT=5432                     # Unix sockets only, in private directories
CMD_TIMEOUT=300
LOAD_SECS=5
MAX_LOAD_ROUNDS=80
SEG_BYTES=16777216

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
RESULTS=${RESULTS:-$SCRIPT_DIR/RESULTS.md}
BUILD_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release
INVOCATION=$(printf '%q ' "$0" "$@")
INVOCATION=${INVOCATION% }
ENV_USED=""
for v in SCALE SEGS_OFF SEGS_ON RUNS RUNS_ON PASSES TUNE PGBIN BENCH_TMPDIR RECOVERY_TIMEOUT SKIP_BUILD CARGO_TARGET_DIR; do
    if printenv "$v" >/dev/null; then ENV_USED+="$v=$(printenv "$v") "; fi
done
T_SCRIPT0=$EPOCHREALTIME
LOAD_START=$(cut -d" " -f1-3 /proc/loadavg)

BENCH_NAME=replay_bench
# shellcheck source=benches/lib.sh
source "$SCRIPT_DIR/lib.sh"

# ---------------------------------------------------------------- cleanup
WORK=""
PRIMARY_UP=0
ARCHIVED_PID=""
RUN_PGDATA=""                   # the restored cluster of the run in progress

# Prefetch daemons whose command line names this work directory (started by our
# archive-get calls); killed one by one, by pid.
kill_our_daemons() {
    [[ -n $WORK ]] || return 0
    local pid
    for pid in $(pgrep -f -- "pullclient prefetch --pgdata $WORK/" 2>/dev/null); do
        kill -TERM "$pid" 2>/dev/null || true
    done
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ -n $RUN_PGDATA && -f $RUN_PGDATA/postmaster.pid ]]; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$RUN_PGDATA" -m immediate -w -t 30 stop >/dev/null 2>&1
    fi
    if [[ $PRIMARY_UP == 1 ]]; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/primary" -m immediate -w -t 30 stop >/dev/null 2>&1
    fi
    kill_our_daemons
    if [[ -n $ARCHIVED_PID ]]; then
        kill -TERM "$ARCHIVED_PID" 2>/dev/null
        wait "$ARCHIVED_PID" 2>/dev/null
    fi
    # pgBackRest's async archive-get workers, if any were left (they exit on their own).
    [[ -n $WORK ]] && for pid in $(pgrep -f -- "--config=$WORK/pgbr/" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null; done
    sleep 0.5
    kill_our_daemons
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $KEEP_WORK == 1 ]]; then log "work directory kept: $WORK"; else rm -rf -- "$WORK"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM




# ---------------------------------------------------------------- preflight
[[ $(id -u) == 0 ]] || die "run as root (PostgreSQL and pgBackRest run as 'postgres' via runuser)"
for n in SCALE SEGS_OFF SEGS_ON RUNS RUNS_ON; do
    [[ ${!n} =~ ^[0-9]+$ && ${!n} -ge 1 ]] || die "$n must be a positive integer"
done
((SEGS_OFF >= 4)) || log "warning: SEGS_OFF=$SEGS_OFF < 4: not what the issue asks for"
((RUNS >= 3 && RUNS_ON >= 3)) || log "warning: RUNS=$RUNS < 3: not a publishable run"
need_pg_tools initdb pg_ctl pgbench psql postgres pg_basebackup pg_waldump
need_commands runuser timeout python3 awk pgrep fincore getconf
ensure_pgbackrest
PG_VERSION=$("$PGBIN/postgres" --version)
release_build "$BUILD_BIN"
GIT_REV=$(build_rev "$BUILD_BIN")

WORK=$(mktemp -d "$BENCH_TMPDIR/walvault-replay.XXXXXX")
chmod 0755 "$WORK"
cd "$WORK"
mkdir -p bin logs pglog sock runs wal/off wal/on base-off base-on pgbr/repo pgbr/log pgbr/lock pgbr/spool
chown postgres: pglog sock runs wal wal/off wal/on base-off base-on pgbr pgbr/*
chmod 0700 base-off base-on
LOGS=$WORK/logs
BIN=$WORK/bin
# A private copy of the binaries: others may rebuild target/ while this runs.
cp "$BUILD_BIN/archived" "$BUILD_BIN/pushclient" "$BUILD_BIN/pullclient" "$BIN/"
chmod 0755 "$BIN"/*
log "work directory $WORK (walvault $GIT_REV)"

# ---------------------------------------------------------------- helper programs
# timed.sh TIMES NAME CMD...: runs CMD, appends "NAME elapsed_ns exit_code" to TIMES
# (bash $EPOCHREALTIME: microsecond resolution, no extra process).
cat >"$BIN/timed.sh" <<'EOF'
#!/bin/bash
times=$1 name=$2
shift 2
t0=$EPOCHREALTIME
"$@"
rc=$?
t1=$EPOCHREALTIME
printf '%s %d %d\n' "$name" "$(( (10#${t1/./} - 10#${t0/./}) * 1000 ))" "$rc" >>"$times"
exit $rc
EOF

# archive.sh PATH NAME: the primary's archive_command. Pushes to walvault (cluster of the
# current phase) and copies into wal/<phase>/ (the cp source, also fed to pgBackRest).
cat >"$BIN/archive.sh" <<EOF
#!/bin/bash
set -e
phase=\$(cat $WORK/phase)
$BIN/pushclient archive-push "\$1" --config $WORK/push-\$phase.toml
if [ ! -f $WORK/wal/\$phase/\$2 ]; then
    cp "\$1" $WORK/wal/\$phase/.tmp.\$2
    mv $WORK/wal/\$phase/.tmp.\$2 $WORK/wal/\$phase/\$2
fi
EOF

# evict.py [--sync-only] PATH...: fsync every regular file (dirty pages cannot be
# dropped), then posix_fadvise(POSIX_FADV_DONTNEED) it unless --sync-only.
cat >"$BIN/evict.py" <<'EOF'
import os, sys
sync_only = sys.argv[1] == "--sync-only"
paths = sys.argv[2:] if sync_only else sys.argv[1:]
n = 0
for top in paths:
    for root, dirs, files in os.walk(top):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.isfile(p) or os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                if not sync_only:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
print(n)
EOF

# logtimes.py LOG: seconds from "redo starts at" to "redo done at", from "starting archive
# recovery" (just before the first restore_command call) to "redo done at", the redo-done LSN
# and PostgreSQL's own "elapsed" figure of that line.
cat >"$BIN/logtimes.py" <<'EOF'
import re, sys, datetime
ts = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) (\w+) ")
out = {"start": None, "redo_start": None, "redo_done": None, "done_lsn": "-", "pg_elapsed": "-"}
restored = []
for line in open(sys.argv[1], errors="replace"):
    m = ts.match(line)
    if not m:
        continue
    t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f")
    if m.group(2) == "UTC":
        t = t.replace(tzinfo=datetime.timezone.utc)
    e = t.timestamp()
    if "LOG:  starting archive recovery" in line and out["start"] is None:
        out["start"] = e
    elif "LOG:  restored log file" in line and out["redo_done"] is None:
        restored.append(e)
    elif "LOG:  redo starts at" in line:
        out["redo_start"] = e
    elif "LOG:  redo done at" in line:
        out["redo_done"] = e
        out["done_lsn"] = line.split("redo done at ")[1].split()[0]
        m2 = re.search(r"elapsed: ([0-9.]+) s", line)
        if m2:
            out["pg_elapsed"] = m2.group(1)
if None in (out["start"], out["redo_start"], out["redo_done"]):
    sys.exit("log lacks 'starting archive recovery'/'redo starts at'/'redo done at' lines")
# Replay of the 2nd and 3rd segments (the first two after the base backup's own segment):
# from the restore of the 2nd to the restore of the 4th.
early = "%.3f" % (restored[3] - restored[1]) if len(restored) >= 4 else "-"
print("%.3f %.3f %s %s %s" % (out["redo_done"] - out["redo_start"], out["redo_done"] - out["start"],
                              out["done_lsn"], out["pg_elapsed"], early))
EOF

# setconf.py IN OUT key=value...: a client config with [prefetch] settings replaced.
cat >"$BIN/setconf.py" <<'EOF'
import sys
src, dst, sets = sys.argv[1], sys.argv[2], dict(a.split("=", 1) for a in sys.argv[3:])
lines, section, seen = [], None, set()
for line in open(src):
    s = line.strip()
    if s.startswith("[") and not s.startswith("[["):
        section = s.strip("[]")
    key = s.split("=", 1)[0].strip() if "=" in s and not s.startswith("#") else None
    if section == "prefetch" and key in sets:
        line = "%s = %s\n" % (key, sets[key]); seen.add(key)
    lines.append(line)
if "prefetch" not in [l.strip().strip("[]") for l in lines if l.strip().startswith("[")]:
    lines.append("\n[prefetch]\n")
    section = "prefetch"
for k, v in sets.items():
    if k not in seen:
        if section != "prefetch":
            sys.exit("[prefetch] is not the last table of %s" % src)
        lines.append("%s = %s\n" % (k, v))
open(dst, "w").write("".join(lines))
EOF
chmod 0755 "$BIN"/*.sh

# ---------------------------------------------------------------- archived
WV=$WORK/archive
WV_PORT=$(free_udp_port)
run_logged "$LOGS/archived-admin.log" "$BIN/archived" init --data-dir "$WV" --listen "127.0.0.1:$WV_PORT"
for phase in off on; do
    run_logged "$LOGS/archived-admin.log" "$BIN/archived" issue --data-dir "$WV" \
        --cluster "replay-$phase" --role push --out "$WORK/push-$phase.toml"
    run_logged "$LOGS/archived-admin.log" "$BIN/archived" issue --data-dir "$WV" \
        --cluster "replay-$phase" --role pull --out "$WORK/pull-$phase.toml"
done
chown postgres: "$WORK"/push-*.toml "$WORK"/pull-*.toml
start_archived "$WV" "$LOGS/archived-serve.log" "$WORK/push-off.toml"

# ---------------------------------------------------------------- the primary and the two sets
PRIMARY=$WORK/primary
mkdir "$PRIMARY" && chown postgres: "$PRIMARY"
log "primary: initdb, pgbench -i -s $SCALE"
echo off >"$WORK/phase"
as_pg "$PGBIN/initdb" -D "$PRIMARY" -U postgres -A trust -E UTF8 --no-sync >"$LOGS/initdb.log" 2>&1 ||
    { cat "$LOGS/initdb.log" >&2; die "initdb failed"; }
cat >>"$PRIMARY/postgresql.conf" <<EOF

# replay_bench.sh (primary; restored copies append their own settings after these)
listen_addresses = ''
unix_socket_directories = '$WORK/sock'
port = $PGPORT
wal_level = replica
archive_mode = on
archive_command = '$BIN/archive.sh %p %f'
synchronous_commit = off
checkpoint_timeout = '1h'
max_wal_size = '16GB'
full_page_writes = off
log_line_prefix = '%m '
EOF
as_pg "$PGBIN/pg_ctl" -D "$PRIMARY" -l "$WORK/pglog/primary.log" -w -t 60 start >/dev/null ||
    { tail -20 "$WORK/pglog/primary.log" >&2; die "pg_ctl start (primary) failed"; }
PRIMARY_UP=1
PGBR_CONF=$WORK/pgbr/pgbackrest.conf
cat >"$PGBR_CONF" <<EOF
[global]
repo1-path=$WORK/pgbr/repo
log-path=$WORK/pgbr/log
lock-path=$WORK/pgbr/lock
spool-path=$WORK/pgbr/spool
compress-type=zst
archive-async=y
process-max=2
log-level-console=warn
log-level-file=info

[bench]
pg1-path=$PRIMARY
pg1-socket-path=$WORK/sock
pg1-port=$PGPORT
EOF
chown postgres: "$PGBR_CONF"
# pgBackRest checks every segment's system identifier against the stanza: made against
# this very cluster while it runs.
run_logged "$LOGS/pgbackrest.log" runuser -u postgres -- \
    pgbackrest --config="$PGBR_CONF" --stanza=bench stanza-create

T_INIT0=$(now)
run_logged "$LOGS/pgbench.log" runuser -u postgres -- \
    "$PGBIN/pgbench" -h "$WORK/sock" -p "$PGPORT" -i -q -s "$SCALE" postgres
T_INIT1=$(now)
psql_q "checkpoint" >/dev/null
DB_BYTES=$(psql_q "select pg_database_size('postgres')")

# wait_archived LSN_SEGMENT: until pg_stat_archiver has archived that segment.
wait_archived() {
    local want=$1 last i
    for ((i = 0; i < 600; i++)); do
        last=$(psql_q "select coalesce(last_archived_wal, '') from pg_stat_archiver")
        [[ $last > $want || $last == "$want" ]] && return 0
        sleep 0.2
    done
    die "segment $want not archived after 120 s (pg_stat_archiver: $(psql_q 'select * from pg_stat_archiver'))"
}

# make_set PHASE SEGMENTS: base backup of the primary as it is now, then pgbench until
# SEGMENTS x 16 MiB of WAL, pg_switch_wal, all archived.
declare -A SET_FIRST SET_LAST SET_END_LSN SET_ROUNDS SET_TPS
make_set() {
    local phase=$1 segs=$2 start_lsn rounds=0 bytes sw out
    log "set $phase: pg_basebackup -X none -c fast, then pgbench until $segs segments of WAL"
    run_logged "$LOGS/basebackup.log" runuser -u postgres -- "$PGBIN/pg_basebackup" \
        -h "$WORK/sock" -p "$PGPORT" -U postgres -D "$WORK/base-$phase" -X none -c fast
    SET_FIRST[$phase]=$(awk '/^START WAL LOCATION/ { gsub(/\)/, "", $NF); print $NF }' "$WORK/base-$phase/backup_label")
    start_lsn=$(psql_q "select pg_current_wal_lsn()")
    local txns=0
    while :; do
        bytes=$(psql_q "select pg_wal_lsn_diff(pg_current_wal_lsn(), '$start_lsn')::bigint")
        ((bytes >= segs * SEG_BYTES)) && break
        ((rounds < MAX_LOAD_ROUNDS)) || die "only $bytes bytes of WAL after $rounds pgbench rounds"
        rounds=$((rounds + 1))
        out=$(timeout $((LOAD_SECS + 60)) runuser -u postgres -- "$PGBIN/pgbench" -h "$WORK/sock" \
            -p "$PGPORT" -n -c 4 -j 2 -T "$LOAD_SECS" postgres 2>&1) ||
            { printf '%s\n' "$out" >&2; die "pgbench failed"; }
        printf '%s\n' "$out" >>"$LOGS/pgbench.log"
        txns=$((txns + $(awk '/number of transactions actually processed/ { split($NF, a, "/"); print a[1] }' <<<"$out")))
    done
    SET_ROUNDS[$phase]=$rounds
    SET_TPS[$phase]=$((txns / ((rounds > 0 ? rounds : 1) * LOAD_SECS)))
    SET_END_LSN[$phase]=$(psql_q "select pg_current_wal_lsn()")
    sw=$(psql_q "select pg_walfile_name(pg_switch_wal())")
    SET_LAST[$phase]=$sw
    wait_archived "$sw"
    log "set $phase: ${SET_FIRST[$phase]} .. $sw ($rounds x ${LOAD_SECS}s of pgbench, ~${SET_TPS[$phase]} tps)"
}
make_set off "$SEGS_OFF"
# Set "on": from here the archive_command files WAL under the other cluster / directory.
echo on >"$WORK/phase"
printf 'full_page_writes = on\n' >>"$PRIMARY/postgresql.conf"
psql_q "select pg_reload_conf()" >/dev/null
sleep 1
[[ $(psql_q "show full_page_writes") == on ]] || die "full_page_writes did not turn on"
make_set on "$SEGS_ON"
SYSID=$(psql_q "select system_identifier from pg_control_system()")
as_pg "$PGBIN/pg_ctl" -D "$PRIMARY" -m fast -w -t 120 stop >/dev/null || die "pg_ctl stop (primary) failed"
PRIMARY_UP=0

# The segments of each set (what recovery will ask for), and pgBackRest's copy of set "on".
declare -A SET_NSEG
for phase in off on; do
    mapfile -t segs < <(find "$WORK/wal/$phase" -maxdepth 1 -type f -regextype posix-extended \
        -regex '.*/[0-9A-F]{24}' -printf '%f\n' | sort |
        awk -v first="${SET_FIRST[$phase]}" '($0 "") >= (first "")')
    SET_NSEG[$phase]=${#segs[@]}
    [[ ${segs[0]} == "${SET_FIRST[$phase]}" && ${segs[-1]} == "${SET_LAST[$phase]}" ]] ||
        die "set $phase: archived ${segs[0]}..${segs[-1]}, expected ${SET_FIRST[$phase]}..${SET_LAST[$phase]}"
    if [[ $phase == on ]]; then
        log "pgBackRest: archive-push of set on (${#segs[@]} segments) into its repository"
        for s in "${segs[@]}"; do
            run_logged "$LOGS/pgbackrest.log" runuser -u postgres -- pgbackrest --config="$PGBR_CONF" \
                --stanza=bench --archive-async=n archive-push "$WORK/wal/on/$s"
        done
    fi
done
BASE_BYTES=$(du -sb "$WORK/base-off" | awk '{ print $1 }')

# The block device under the work directory: its read counter (/proc/diskstats, sectors
# read) gives the bytes each recovery made the disk read, whoever asked for them.
DISK_SRC=$(findmnt -no SOURCE -T "$BENCH_TMPDIR" 2>/dev/null | head -1)
DISK_FS=$(findmnt -no FSTYPE -T "$BENCH_TMPDIR" 2>/dev/null | head -1)
DISK_DEV=$(basename "${DISK_SRC%%[*}")
disk_read_sectors() {
    awk -v dev="$DISK_DEV" '$3 == dev { print $6; found = 1 } END { if (!found) print "-" }' /proc/diskstats
}

# ---------------------------------------------------------------- one recovery
# replay_run PASS CONFIG RUN CACHE TOOL PG_PREFETCH [PULLCONF]
#   CACHE warm|cold; TOOL cp|walvault|pgbackrest; PG_PREFETCH off|try
# Appends a line to $WORK/runs.tsv.
RUN_SEQ=0
replay_run() {
    local pass=$1 config=$2 run=$3 cache=$4 tool=$5 pgpf=$6 pullconf=${7:-}
    RUN_SEQ=$((RUN_SEQ + 1))
    local d=$WORK/runs/r$RUN_SEQ
    local times=$WORK/runs/r$RUN_SEQ.times
    local pglog=$WORK/runs/r$RUN_SEQ.log
    local rc_cmd
    case $tool in
    cp) rc_cmd="$BIN/timed.sh $times %f cp $WORK/wal/$pass/%f %p" ;;
    walvault | walvault-first) rc_cmd="$BIN/timed.sh $times %f $BIN/pullclient archive-get %f %p --config $pullconf" ;;
    pgbackrest)
        rc_cmd="$BIN/timed.sh $times %f pgbackrest --config=$PGBR_CONF --stanza=bench --pg1-path=$d archive-get %f %p"
        rm -rf "$WORK/pgbr/spool"/* "$WORK/pgbr/lock"/*
        ;;
    esac
    cp -a "$WORK/base-$pass" "$d"
    RUN_PGDATA=$d
    cat >>"$d/postgresql.conf" <<EOF

# replay_bench.sh: restored copy, run $RUN_SEQ ($pass / $config / run $run)
archive_mode = off
restore_command = '$rc_cmd'
recovery_prefetch = $pgpf
log_line_prefix = '%m '
unix_socket_directories = '$WORK/runs'
# The start-up sync of the data directory (before the measured window) as one syncfs
# instead of an fsync per file: only shortens the run.
recovery_init_sync_method = syncfs
port = $PGPORT
EOF
    touch "$d/recovery.signal" "$times"
    chown postgres: "$d/recovery.signal" "$d/postgresql.conf" "$times"
    if [[ $cache == cold ]]; then
        python3 "$BIN/evict.py" "$d" "$WORK/base-$pass" >/dev/null
    else
        python3 "$BIN/evict.py" --sync-only "$d" >/dev/null
    fi
    local resident
    resident=$(find "$d/base" -type f -size +1M -print0 | xargs -0 -r fincore -b -n -o RES | awk '{ s += $1 } END { printf "%d", s / 1048576 }')

    # Device reads from here to the end of recovery (the daemon started first included).
    local rd0 rd1 disk_mib="-"
    rd0=$(disk_read_sectors)
    if [[ $tool == walvault-first ]]; then
        # The daemon as a service would run it: started before PostgreSQL, told where the
        # restore begins; PostgreSQL starts once it has spooled 4 segments (at most 10 s).
        (cd "$WORK/runs" && as_pg setsid "$BIN/pullclient" prefetch --pgdata "$d" --config "$pullconf" \
            --start-at "${SET_FIRST[$pass]}" --exit-when-idle </dev/null >>"$LOGS/daemon-first-r$RUN_SEQ.log" 2>&1 &)
        for ((i = 0; i < 100; i++)); do
            (($(find "$d.walvault-spool/ready" -name '*.b3' 2>/dev/null | wc -l) >= 4)) && break
            sleep 0.1
        done
    fi
    as_pg "$PGBIN/pg_ctl" -D "$d" -l "$pglog" -W start >/dev/null || die "pg_ctl start of $d failed"
    local i ok=0
    for ((i = 0; i < RECOVERY_TIMEOUT * 10; i++)); do
        if grep -q 'database system is ready to accept connections' "$pglog" 2>/dev/null; then ok=1; break; fi
        if grep -Eq 'FATAL|PANIC' "$pglog" 2>/dev/null && ! grep -q 'the database system is' "$pglog"; then break; fi
        if ((i > 50)) && [[ ! -f $d/postmaster.pid ]]; then break; fi
        sleep 0.1
    done
    if ((ok == 0)); then
        tail -40 "$pglog" >&2
        die "recovery of run $RUN_SEQ ($pass/$config) did not finish (log tail above: $pglog)"
    fi
    rd1=$(disk_read_sectors)
    [[ $rd0 != - && $rd1 != - ]] && disk_mib=$(((rd1 - rd0) * 512 / 1048576))

    # Counters and the daemon's peak RSS while everything is still up.
    local hwm="-" wv="-" daemon_pid=""
    if [[ $tool == walvault* ]]; then
        local spool=$d.walvault-spool
        daemon_pid=$(head -1 "$spool/daemon.lock" 2>/dev/null || true)
        if [[ -n $daemon_pid && -r /proc/$daemon_pid/status ]]; then
            hwm=$(awk '$1 == "VmHWM:" { print $2 }' "/proc/$daemon_pid/status")
        fi
        wv=$(as_pg timeout 10 "$BIN/pullclient" prefetch-status --pgdata "$d" --json --config "$pullconf" 2>>"$LOGS/prefetch-status.err" |
            python3 -c 'import json, sys
c = json.load(sys.stdin); p = c["prefault"]
print("hits=%d,misses=%d,fetched=%d,decoded=%d,warmed=%d,for_pg_prefetch=%d,requests=%d,fpw=%d,will_init=%d,past_eof=%d,recent=%d,no_file=%d,warmed_up_to=%s,pg_recovery_prefetch=%s(%s)" % (
    c["spool_hits"], c["spool_misses"], c["segments_fetched"], p["segments_decoded"], p["blocks_warmed"],
    p["warmed_for_pg_prefetch"], p["io_requests"],
    p["skipped_fpw"], p["skipped_will_init"], p["skipped_past_eof"], p["skipped_recent"], p["skipped_no_file"],
    p.get("warmed_up_to"), p.get("pg_recovery_prefetch"), p.get("pg_recovery_prefetch_source")))' 2>/dev/null || echo "status-unavailable")
        cp "$spool/daemon.log" "$LOGS/daemon-r$RUN_SEQ.log" 2>/dev/null || true
    fi
    local pgstat
    pgstat=$(as_pg "$PGBIN/psql" -X -h "$WORK/runs" -p "$PGPORT" -d postgres -Atqc \
        "select 'prefetch='||prefetch||',hit='||hit||',skip_init='||skip_init||',skip_new='||skip_new||',skip_fpw='||skip_fpw||',skip_rep='||skip_rep from pg_stat_recovery_prefetch" 2>/dev/null || echo "-")
    as_pg "$PGBIN/pg_ctl" -D "$d" -m immediate -w -t 60 stop >/dev/null 2>&1 || die "pg_ctl stop of $d failed"
    RUN_PGDATA=""
    if [[ -n $daemon_pid ]]; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$daemon_pid" 2>/dev/null && log "warning: prefetch daemon $daemon_pid still alive 5 s after SIGTERM"
    fi

    local lt redo total done_lsn pg_el early
    lt=$(python3 "$BIN/logtimes.py" "$pglog") || { tail -30 "$pglog" >&2; die "cannot read the timings of $pglog"; }
    read -r redo total done_lsn pg_el early <<<"$lt"
    # Every run must replay the whole set: same end LSN, no early end of recovery.
    if [[ -z ${DONE_LSN[$pass]:-} ]]; then DONE_LSN[$pass]=$done_lsn; fi
    [[ $done_lsn == "${DONE_LSN[$pass]}" ]] ||
        { tail -30 "$pglog" >&2; die "run $RUN_SEQ ($pass/$config): redo done at $done_lsn, other runs at ${DONE_LSN[$pass]}"; }
    # A failed restore of any segment of the set is a broken run (only those after its end
    # may fail: that is how recovery learns the archive ends).
    local nfail
    nfail=$(awk -v last="${SET_LAST[$pass]}" 'length($1) == 24 && $1 ~ /^[0-9A-F]+$/ && $3 != 0 && ($1 "") <= (last "")' "$times" | wc -l)
    ((nfail == 0)) || { cat "$times" >&2; die "run $RUN_SEQ ($pass/$config): $nfail restores of segments of the set failed"; }
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$pass" "$config" "$run" "$cache" "$tool" \
        "$pgpf" "$redo" "$total" "$pg_el" "$resident" "$hwm" "$wv" "$pgstat" "$times" "$RUN_SEQ" "$early" "$disk_mib" >>"$WORK/runs.tsv"
    log "  $pass/$config run $run: redo ${redo}s (recovery ${total}s, PG says ${pg_el}s, load segments 1-2 ${early}s), disk read ${disk_mib} MiB, resident before start ${resident} MiB$([[ $hwm != - ]] && echo ", daemon VmHWM $hwm kB") ${wv#-} ${pgstat#-}"
    if [[ $KEEP_WORK != 1 ]]; then
        rm -rf -- "$d" "$d.walvault-spool"
    else
        rm -rf -- "$d"
    fi
}
declare -A DONE_LSN
: >"$WORK/runs.tsv"

# ---------------------------------------------------------------- 1 + 2: the recoveries
cp "$WORK/pull-off.toml" "$WORK/pull-off-default.toml"
cp "$WORK/pull-on.toml" "$WORK/pull-on-default.toml"
python3 "$BIN/setconf.py" "$WORK/pull-off.toml" "$WORK/pull-off-noprefault.toml" prefault=false
python3 "$BIN/setconf.py" "$WORK/pull-on.toml" "$WORK/pull-on-noprefault.toml" prefault=false
# config name | cache | tool | recovery_prefetch | pull config suffix
CONFIGS_OFF=(
    "warm|warm|cp|try|"
    "warm-pg-off|warm|cp|off|"
    "cold-pg-off|cold|cp|off|"
    "cold-pg-default|cold|cp|try|"
    "cold-walvault-pg-off|cold|walvault|off|default"
    "cold-walvault-pg-default|cold|walvault|try|default"
    "cold-walvault-noprefault-pg-off|cold|walvault|off|noprefault"
)
CONFIGS_ON=(
    "warm|warm|cp|try|"
    "warm-pg-off|warm|cp|off|"
    "cold-pg-off|cold|cp|off|"
    "cold-pg-default|cold|cp|try|"
    "cold-walvault-pg-off|cold|walvault|off|default"
    "cold-walvault-pg-default|cold|walvault|try|default"
    "warm-walvault|warm|walvault|try|default"
    "warm-pgbackrest|warm|pgbackrest|try|"
)
TUNES=()
if [[ $TUNE == 1 ]]; then
    # name | settings for [prefetch]
    TUNES=(
        "pread|prefault_method=\"pread\""
        "ahead-16MiB|prefault_ahead_bytes=16777216"
        "ahead-256MiB|prefault_ahead_bytes=268435456"
        "concurrency-64|prefault_concurrency=64"
        "pread-ahead-256MiB-c64|prefault_method=\"pread\" prefault_ahead_bytes=268435456 prefault_concurrency=64"
    )
    CONFIGS_OFF+=("tune-daemon-first|cold|walvault-first|off|default")
    for t in "${TUNES[@]}"; do
        IFS='|' read -r tname tsets <<<"$t"
        # shellcheck disable=SC2086
        python3 "$BIN/setconf.py" "$WORK/pull-off.toml" "$WORK/pull-off-$tname.toml" $tsets
        CONFIGS_OFF+=("tune-$tname|cold|walvault|off|$tname")
    done
fi
chown postgres: "$WORK"/pull-*.toml
chmod 0600 "$WORK"/pull-*.toml

T_RUNS0=$(now)
for pass in $PASSES; do
    if [[ $pass == off ]]; then cfgs=("${CONFIGS_OFF[@]}"); else cfgs=("${CONFIGS_ON[@]}"); fi
    if [[ $pass == off ]]; then nruns=$RUNS; else nruns=$RUNS_ON; fi
    log "recoveries of set $pass: ${#cfgs[@]} configurations x $nruns runs, interleaved"
    for ((run = 1; run <= nruns; run++)); do
        for c in "${cfgs[@]}"; do
            IFS='|' read -r cname ccache ctool cpf cconf <<<"$c"
            # knob trials: 3 runs each at most
            if [[ $cname == tune-* ]] && ((run > 3)); then continue; fi
            replay_run "$pass" "$cname" "$run" "$ccache" "$ctool" "$cpf" \
                "${cconf:+$WORK/pull-$pass-$cconf.toml}"
        done
    done
done
T_RUNS1=$(now)
LOAD_AFTER=$(cut -d" " -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- 3. decoder throughput
log "decoder throughput: pullclient wal-blocks vs pg_waldump"
: >"$WORK/decode.tsv"
for phase in off on; do
    mapfile -t segs < <(find "$WORK/wal/$phase" -maxdepth 1 -type f -regextype posix-extended \
        -regex '.*/[0-9A-F]{24}' -printf '%f\n' | sort |
        awk -v first="${SET_FIRST[$phase]}" '($0 "") >= (first "")')
    files=("${segs[@]/#/$WORK/wal/$phase/}")
    cat "${files[@]}" >/dev/null # page cache: both tools read warm files
    nrefs=$(timeout "$CMD_TIMEOUT" "$BIN/pullclient" wal-blocks "${files[@]}" 2>/dev/null | wc -l)
    printf '%s\n' "$nrefs" >"$WORK/nrefs-$phase"
    nrecs=$(timeout "$CMD_TIMEOUT" "$PGBIN/pg_waldump" -p "$WORK/wal/$phase" "${segs[0]}" "${segs[-1]}" 2>/dev/null | wc -l)
    for rep in 1 2 3; do
        for tool in wal-blocks pg_waldump pg_waldump-b; do
            t0=$(now)
            case $tool in
            wal-blocks) timeout "$CMD_TIMEOUT" "$BIN/pullclient" wal-blocks "${files[@]}" >/dev/null 2>"$LOGS/decode.err" ||
                { cat "$LOGS/decode.err" >&2; die "pullclient wal-blocks failed on set $phase"; } ;;
            # pg_waldump ends with an error at the end of the WAL it was given: not a failure here.
            pg_waldump) timeout "$CMD_TIMEOUT" "$PGBIN/pg_waldump" -p "$WORK/wal/$phase" "${segs[0]}" "${segs[-1]}" >/dev/null 2>"$LOGS/decode.err" || true ;;
            pg_waldump-b) timeout "$CMD_TIMEOUT" "$PGBIN/pg_waldump" -b -p "$WORK/wal/$phase" "${segs[0]}" "${segs[-1]}" >/dev/null 2>"$LOGS/decode.err" || true ;;
            esac
            t1=$(now)
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$phase" "$tool" "$rep" "$(elapsed "$t0" "$t1")" "${#segs[@]}" "$nrefs/$nrecs" >>"$WORK/decode.tsv"
        done
    done
done

# ---------------------------------------------------------------- report
CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
MEM_TOTAL=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
DISK_RA=$(cat "/sys/class/block/$DISK_DEV/queue/read_ahead_kb" 2>/dev/null || echo "?")
DISK_ROT=$(cat "/sys/class/block/$DISK_DEV/queue/rotational" 2>/dev/null || echo "?")
case $DISK_ROT in 0) DISK_KIND="non-rotational" ;; 1) DISK_KIND="rotational" ;; *) DISK_KIND="unknown kind" ;; esac
T_TOTAL=$(elapsed "$T_SCRIPT0" "$(now)")

export WORK SEG_BYTES RUNS
REPORT=$(python3 - "$WORK/runs.tsv" "$WORK/decode.tsv" <<'EOF'
import os, sys, statistics, collections
runs_f, dec_f = sys.argv[1], sys.argv[2]
rows = [l.rstrip("\n").split("\t") for l in open(runs_f) if l.strip()]
by = collections.OrderedDict()
for r in rows:
    by.setdefault((r[0], r[1]), []).append(r)
def med(xs): return statistics.median(xs) if xs else float("nan")
def pct(xs, p):
    xs = sorted(xs)
    if not xs: return float("nan")
    k = max(0, min(len(xs) - 1, int(round(p / 100 * len(xs) + 0.5)) - 1))
    return xs[k]
def seg_times(path):
    out = []
    for l in open(path):
        f = l.split()
        if len(f) == 3 and len(f[0]) == 24 and f[2] == "0":
            out.append(int(f[1]) / 1e6)
    return out
def desc(cache, tool, pf, conf_name):
    rc = {"cp": "cp", "walvault": "pullclient archive-get", "walvault-first": "pullclient archive-get, daemon started before PostgreSQL",
          "pgbackrest": "pgbackrest archive-get (async)"}[tool]
    return rc, {"off": "off", "try": "try (default)"}[pf]
out = []
med_redo = {}
for (p, c), rs in by.items():
    med_redo[(p, c)] = med([float(r[6]) for r in rs])
for p in ("off", "on"):
    keys = [k for k in by if k[0] == p]
    if not keys: continue
    warm_same = {"try": med_redo.get((p, "warm")), "off": med_redo.get((p, "warm-pg-off"))}
    best_warm = min(v for v in warm_same.values() if v is not None)
    try:
        nrefs = int(open(os.path.join(os.environ["WORK"], "nrefs-" + p)).read())
    except Exception:
        nrefs = 0
    out.append("")
    out.append("**Set `%s`** (full_page_writes = %s; %d block references in its WAL): redo time, `redo starts at` -> `redo done at` from PostgreSQL's log timestamps" % (p, p, nrefs))
    out.append("")
    out.append("| configuration | cache | restore_command | recovery_prefetch | runs | redo s, median | min .. max | vs warm, same recovery_prefetch | vs best warm | first 2 load segments s, median | disk read MiB, median | prefaulter: block refs considered, median (share of the set's) | walvault counters (last run) | pg_stat_recovery_prefetch (last run) |")
    out.append("|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---|---|---|")
    for k in keys:
        rs = by[k]
        r0 = rs[-1]
        rc, pf = desc(r0[3], r0[4], r0[5], k[1])
        xs = [float(r[6]) for r in rs]
        m = med(xs)
        ws = warm_same.get(r0[5])
        cons = []
        for r in rs:
            if r[11].startswith("hits="):
                c = dict(kv.split("=", 1) for kv in r[11].split(","))
                cons.append(sum(int(c[x]) for x in ("warmed", "fpw", "will_init", "past_eof", "recent", "no_file")))
        cov = ("%d (%.0f%%)" % (med(cons), 100.0 * med(cons) / nrefs)) if cons and nrefs and med(cons) > 0 else ""
        ea = [float(r[15]) for r in rs if len(r) > 15 and r[15] != "-"]
        dr = [int(r[16]) for r in rs if len(r) > 16 and r[16] != "-"]
        out.append("| %s | %s | %s | %s | %d | **%.2f** | %.2f .. %.2f | %s | %.2fx | %s | %s | %s | %s | %s |" % (
            k[1], r0[3], rc, pf, len(rs), m, min(xs), max(xs), ("%.2fx" % (m / ws)) if ws else "-", m / best_warm,
            ("%.2f" % med(ea)) if ea else "-", ("%d" % med(dr)) if dr else "-", cov,
            r0[11].replace(",", ", ") if r0[11] != "-" else "", r0[12].replace(",", ", ") if r0[12] != "-" else ""))
# goals
out.append("")
out.append("Goals, on medians (\"best warm\" = the faster of the two warm configurations, the floor replay can reach):")
out.append("")
for p in ("off", "on"):
    ws = [med_redo[(p, c)] for c in ("warm", "warm-pg-off") if (p, c) in med_redo]
    pgd = med_redo.get((p, "cold-pg-default"))
    for c, same in (("cold-walvault-pg-off", "warm-pg-off"), ("cold-walvault-pg-default", "warm"), ("tune-daemon-first", "warm-pg-off")):
        v = med_redo.get((p, c))
        if v is None or not ws or pgd is None: continue
        w = min(ws); wsame = med_redo.get((p, same))
        out.append("- set `%s`, %s: %.2fx best warm (goal <= 1.3: %s), %.2fx warm with the same recovery_prefetch; %.2fx PostgreSQL's prefetch at defaults (goal < 1: %s)" % (
            p, c, v / w, "met" if v / w <= 1.3 else "NOT met", v / wsame if wsame else float("nan"), v / pgd, "met" if v < pgd else "NOT met"))
# latency
out.append("")
out.append("**archive-get latency and recovery time** (set `on`, warm cache, recovery_prefetch = try; every restore_command call timed by a bash wrapper, microsecond resolution; segment calls that succeeded, pooled over the runs; recovery = `starting archive recovery` -> `redo done at`, i.e. from just before the first restore_command call)")
out.append("")
out.append("| restore_command | runs | segment calls | median ms | p99 ms | max ms | recovery s, median | redo s, median | vs cp |")
out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
lat = {}
for c, label in (("warm", "cp from a local directory (floor)"), ("warm-walvault", "pullclient archive-get (spool)"), ("warm-pgbackrest", "pgbackrest archive-get, archive-async=y, process-max=2")):
    rs = by.get(("on", c))
    if not rs: continue
    ts = []
    for r in rs: ts += seg_times(r[13])
    tot = med([float(r[7]) for r in rs])
    lat[c] = tot
    out.append("| %s | %d | %d | %.1f | %.1f | %.1f | **%.2f** | %.2f | %s |" % (
        label, len(rs), len(ts), med(ts), pct(ts, 99), max(ts), tot, med([float(r[6]) for r in rs]),
        "%.2fx" % (tot / lat["warm"]) if "warm" in lat else "-"))
if "warm" in lat and "warm-walvault" in lat:
    r = lat["warm-walvault"] / lat["warm"]
    out.append("")
    out.append("- walvault recovery time %.2fx the cp floor (goal <= 1.2: %s)" % (r, "met" if r <= 1.2 else "NOT met"))
# latency of walvault in the cold runs too (first call is always a miss)
ts_cold = []
first = []
for (p, c), rs in by.items():
    if c.startswith("cold-walvault") and not "noprefault" in c:
        for r in rs:
            t = seg_times(r[13]); ts_cold += t[1:]; first += t[:1]
if ts_cold:
    out.append("- pullclient archive-get in all cold walvault runs: %d calls after the first, median %.1f ms, p99 %.1f ms; first call of a run (spool miss, starts the daemon): median %.1f ms" % (
        len(ts_cold), med(ts_cold), pct(ts_cold, 99), med(first)))
# daemon RSS
hwm = [(int(r[10]), r[0], r[1]) for r in rows if r[10] not in ("-", "")]
if hwm:
    h = max(hwm)
    out.append("- prefetch daemon peak RSS (VmHWM, read before SIGTERM): max **%.1f MiB** (set %s, %s), median %.1f MiB over %d walvault runs" % (
        h[0] / 1024, h[1], h[2], med([x[0] for x in hwm]) / 1024, len(hwm)))
# decoder
dec = [l.rstrip("\n").split("\t") for l in open(dec_f) if l.strip()]
if dec:
    out.append("")
    out.append("**Decoder throughput** (files in the page cache, output to /dev/null, median of 3; MB = 10^6 bytes of WAL)")
    out.append("")
    out.append("| set | segments | tool | seconds | MB/s of WAL | lines (block refs / pg_waldump records) |")
    out.append("|---|---:|---|---:|---:|---|")
    dd = collections.OrderedDict()
    for d in dec: dd.setdefault((d[0], d[1]), []).append(d)
    names = {"wal-blocks": "`pullclient wal-blocks FILES`", "pg_waldump": "`pg_waldump -p DIR FIRST LAST`", "pg_waldump-b": "`pg_waldump -b -p DIR FIRST LAST`"}
    for (p, t), ds in dd.items():
        s = med([float(d[3]) for d in ds]); n = int(ds[0][4])
        out.append("| %s | %d | %s | %.3f | %.0f | %s |" % (p, n, names[t], s, n * 16777216 / 1e6 / s, ds[0][5]))
print("\n".join(out))
EOF
) || die "cannot summarize ($WORK/runs.tsv)"

section() {
    cat <<EOF

## Replay benchmark $(date -u '+%Y-%m-%d %H:%M:%S UTC')

Written by \`benches/replay_bench.sh\` (see \`benches/README.md\`). Goals (issue 3): cold-cache
replay with walvault within 1.3x of warm and faster than PostgreSQL's own prefetch at its
defaults; recovery from the archive within 1.2x of \`cp\` from a local directory.

- command: \`cd $REPO_ROOT && ${ENV_USED}$INVOCATION\` (as root), $T_TOTAL s in all
- walvault: commit $GIT_REV, release build (\`cargo build --release --workspace --bins\`)
- machine: $(nproc) CPUs ($CPU_MODEL), $MEM_TOTAL memory, disk $DISK_SRC ($DISK_FS, $DISK_KIND, read_ahead_kb $DISK_RA), kernel $(uname -r);
  load average $LOAD_START when the script started, $LOAD_AFTER after the recoveries (the machine is shared)
- $PG_VERSION; $PGBR_VERSION
- data: \`pgbench -i -s $SCALE\` ($((DB_BYTES / 1048576)) MiB database, base backup $((BASE_BYTES / 1048576)) MiB);
  set \`off\`: full_page_writes = off, ${SET_NSEG[off]} segments ${SET_FIRST[off]} .. ${SET_LAST[off]}
  (${SET_ROUNDS[off]} x \`pgbench -n -c 4 -j 2 -T $LOAD_SECS\`, ~${SET_TPS[off]} tps);
  set \`on\`: full_page_writes = on, ${SET_NSEG[on]} segments ${SET_FIRST[on]} .. ${SET_LAST[on]}
  (${SET_ROUNDS[on]} x the same, ~${SET_TPS[on]} tps). Each set starts at its own \`pg_basebackup -X none -c fast\`
  (the first segment holds only the backup's checkpoint); \`pg_switch_wal()\` ends it.
- every run: \`cp -a\` of the base backup, settings appended (archive_mode off, restore_command,
  recovery_prefetch, log_line_prefix '%m '), \`recovery.signal\`, no recovery target (replay
  everything, then promote); "cold" = fsync + \`posix_fadvise(DONTNEED)\` of every file of the copy and
  of its source (the "resident" check with fincore before start is in the run log), "warm" = fsync
  only (the fresh copy stays in the page cache); the WAL sources (cp directory, archived's store)
  stay in the page cache. Runs of all configurations interleaved; every run must end at the same
  \`redo done\` LSN. shared_buffers 128 MB (default), maintenance_io_concurrency 10 (default).
- walvault runs: \`restore_command = 'pullclient archive-get %f %p --config pull.toml'\` against
  archived on 127.0.0.1, issued client config defaults ([prefetch] spool_max_bytes 256 MiB,
  fetch_concurrency 4, prefault on, fadvise, prefault_ahead_bytes 64 MiB, prefault_concurrency 16)
  unless the row says otherwise; the spool is the default \`<PGDATA>.walvault-spool\`; the daemon is
  started by the first archive-get of each run and stopped with SIGTERM after it.
$REPORT
EOF
}
echo
section | tee /dev/stderr | results_insert "$RESULTS"
log "added to $RESULTS as the newest run ($T_TOTAL s in all)"
