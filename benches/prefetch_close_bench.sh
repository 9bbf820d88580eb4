#!/usr/bin/env bash
# prefetch_close_bench.sh: how long the prefetch daemon holds files under PGDATA after the
# postmaster exits (issue 10 item 10: `pg_ctl stop && umount` must not fail; goal < 100 ms).
#
# A primary (full_page_writes = off, so replay reads the blocks it changes) makes SEGS
# segments of pgbench WAL after a `pg_basebackup -X none -c fast`, archived to walvault.
# Every run restores a fresh copy of the backup and starts it with
# `restore_command = pullclient archive-get` and recovery_min_apply_delay = 1h: replay
# waits at its first commit while the daemon (started by the first archive-get) spools the
# WAL ahead and warms its blocks, holding relation files of the copy open. Once the daemon
# holds files under the copy, `pg_ctl stop -m fast -w`. A watcher outside both processes
# measures the delay: from the postmaster's exit (a pidfd of it turns readable) to the
# first moment no /proc/<daemon>/fd link points under the copy (scanned in a tight loop).
#
# With BASELINE_PULLCLIENT=/path/to/an/older/pullclient the runs alternate between it and
# this tree's release build (same WAL, same archive), for a before/after comparison.
#
# Prints a table and adds it to benches/RESULTS.md as the newest run (results_insert,
# lib.sh). Must run as root (PostgreSQL runs as `postgres` via runuser).
#
# Environment knobs (defaults in brackets):
#   RUNS [8]                  runs per binary
#   SCALE [10]                pgbench -i scale
#   SEGS [4]                  segments of pgbench WAL after the backup
#   BASELINE_PULLCLIENT []    another pullclient to measure beside this tree's
#   PGBIN [/usr/lib/postgresql/15/bin]
#   BENCH_TMPDIR [/tmp]       where the work directory is made
#   SKIP_BUILD [0]            1 = use the existing release binaries
#   CARGO_TARGET_DIR          whose release/ binaries to measure [this tree's target]; with
#                             SKIP_BUILD=1, another worktree's build (its commit is recorded)
#   KEEP_WORK [0]             1 = keep the work directory (logs, daemon logs)
#   RESULTS [benches/RESULTS.md]
set -Eeuo pipefail
export LC_ALL=C

RUNS=${RUNS:-8}
SCALE=${SCALE:-10}
SEGS=${SEGS:-4}
BASELINE_PULLCLIENT=${BASELINE_PULLCLIENT:-}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
BENCH_TMPDIR=${BENCH_TMPDIR:-/tmp}
SKIP_BUILD=${SKIP_BUILD:-0}
CMD_TIMEOUT=${CMD_TIMEOUT:-300}
KEEP_WORK=${KEEP_WORK:-0}
PGPORT=5432
SEG_BYTES=16777216

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
RESULTS=${RESULTS:-$SCRIPT_DIR/RESULTS.md}
BUILD_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release
INVOCATION=$(printf '%q ' "$0" "$@")
INVOCATION=${INVOCATION% }
ENV_USED=""
for v in RUNS SCALE SEGS BASELINE_PULLCLIENT PGBIN BENCH_TMPDIR SKIP_BUILD CARGO_TARGET_DIR; do
    if printenv "$v" >/dev/null; then ENV_USED+="$v=$(printenv "$v") "; fi
done
LOAD_START=$(cut -d" " -f1-3 /proc/loadavg)

BENCH_NAME=prefetch_close_bench
# shellcheck source=benches/lib.sh
source "$SCRIPT_DIR/lib.sh"

WORK=""
ARCHIVED_PID=""
PRIMARY_UP=0
RUN_PGDATA=""
DAEMON_PID=""

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ -n $RUN_PGDATA && -f $RUN_PGDATA/postmaster.pid ]]; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$RUN_PGDATA" -m immediate -w -t 30 stop >/dev/null 2>&1
    fi
    [[ $PRIMARY_UP == 1 ]] &&
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/primary" -m immediate -w -t 30 stop >/dev/null 2>&1
    [[ -n $DAEMON_PID ]] && kill -TERM "$DAEMON_PID" 2>/dev/null
    if [[ -n $ARCHIVED_PID ]]; then
        kill -TERM "$ARCHIVED_PID" 2>/dev/null
        wait "$ARCHIVED_PID" 2>/dev/null
    fi
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $KEEP_WORK == 1 ]]; then log "work directory kept: $WORK"; else rm -rf -- "$WORK"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM


[[ $(id -u) == 0 ]] || die "run as root (PostgreSQL runs as 'postgres' via runuser)"
for n in RUNS SCALE SEGS; do
    [[ ${!n} =~ ^[0-9]+$ && ${!n} -ge 1 ]] || die "$n must be a positive integer"
done
need_pg_tools initdb pg_ctl pgbench psql pg_basebackup
need_commands runuser timeout python3
[[ -z $BASELINE_PULLCLIENT || -x $BASELINE_PULLCLIENT ]] || die "BASELINE_PULLCLIENT=$BASELINE_PULLCLIENT is not executable"
release_build "$BUILD_BIN"
GIT_REV=$(build_rev "$BUILD_BIN")

WORK=$(mktemp -d "$BENCH_TMPDIR/walvault-close.XXXXXX")
chmod 0755 "$WORK"
cd "$WORK"
mkdir -p bin logs sock runs base
chown postgres: sock runs base logs
chmod 0700 base
LOGS=$WORK/logs
BIN=$WORK/bin
cp "$BUILD_BIN/archived" "$BUILD_BIN/pushclient" "$BUILD_BIN/pullclient" "$BIN/"
[[ -n $BASELINE_PULLCLIENT ]] && cp "$BASELINE_PULLCLIENT" "$BIN/pullclient-baseline"
chmod 0755 "$BIN"/*
log "work directory $WORK (walvault $GIT_REV)"

# closewatch.py DAEMON_PID POSTMASTER_PID PGDATA: prints "ready" once it holds a pidfd of
# the postmaster, then, after the postmaster exits, "DELAY_MS HELD_AT_EXIT": milliseconds
# from the exit to the first scan of /proc/DAEMON_PID/fd with no link under PGDATA, and
# how many such links the first scan after the exit found.
cat >"$BIN/closewatch.py" <<'EOF'
import os, select, sys, time
daemon, postmaster, root = int(sys.argv[1]), int(sys.argv[2]), os.path.realpath(sys.argv[3]) + "/"
pidfd = os.pidfd_open(postmaster)
def held():
    n = 0
    try:
        names = os.listdir("/proc/%d/fd" % daemon)
    except FileNotFoundError:
        return 0
    for fd in names:
        try:
            if os.readlink("/proc/%d/fd/%s" % (daemon, fd)).startswith(root):
                n += 1
        except OSError:
            pass
    return n
print("ready", flush=True)
p = select.poll()
p.register(pidfd, select.POLLIN)
if not p.poll(120000):
    sys.exit("the postmaster did not exit within 120 s")
t_exit = time.monotonic()
at_exit = held()
n = at_exit
while n > 0 and time.monotonic() < t_exit + 30:
    n = held()
t_close = time.monotonic()
if n > 0:
    sys.exit("the daemon still holds %d files under %s 30 s after the postmaster exited" % (n, root))
print("%.1f %d" % ((t_close - t_exit) * 1000, at_exit))
EOF

# ---------------------------------------------------------------- archived, primary, WAL
WV=$WORK/archive
WV_PORT=$(python3 -c 'import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
run_logged "$LOGS/archived-admin.log" "$BIN/archived" init --data-dir "$WV" --listen "127.0.0.1:$WV_PORT"
run_logged "$LOGS/archived-admin.log" "$BIN/archived" issue --data-dir "$WV" --cluster close --role push --out "$WORK/push.toml"
run_logged "$LOGS/archived-admin.log" "$BIN/archived" issue --data-dir "$WV" --cluster close --role pull --out "$WORK/pull.toml"
chown postgres: "$WORK/push.toml" "$WORK/pull.toml"
start_archived "$WV" "$LOGS/archived-serve.log" "$WORK/push.toml"

PRIMARY=$WORK/primary
mkdir "$PRIMARY" && chown postgres: "$PRIMARY"
log "primary: initdb, pgbench -i -s $SCALE, backup, $SEGS segments of pgbench"
as_pg "$PGBIN/initdb" -D "$PRIMARY" -U postgres -A trust -E UTF8 --no-sync >"$LOGS/initdb.log" 2>&1 ||
    { cat "$LOGS/initdb.log" >&2; die "initdb failed"; }
cat >>"$PRIMARY/postgresql.conf" <<EOF

# prefetch_close_bench.sh (primary; restored copies append their own settings)
listen_addresses = ''
unix_socket_directories = '$WORK/sock'
port = $PGPORT
wal_level = replica
archive_mode = on
archive_command = '$BIN/pushclient archive-push %p --config $WORK/push.toml'
synchronous_commit = off
checkpoint_timeout = '1h'
max_wal_size = '4GB'
full_page_writes = off
log_line_prefix = '%m '
EOF
as_pg "$PGBIN/pg_ctl" -D "$PRIMARY" -l "$LOGS/primary.log" -w -t 60 start >/dev/null ||
    { tail -20 "$LOGS/primary.log" >&2; die "pg_ctl start (primary) failed"; }
PRIMARY_UP=1
run_logged "$LOGS/pgbench.log" runuser -u postgres -- "$PGBIN/pgbench" -h "$WORK/sock" -p "$PGPORT" -i -q -s "$SCALE" postgres
run_logged "$LOGS/basebackup.log" runuser -u postgres -- "$PGBIN/pg_basebackup" -h "$WORK/sock" -p "$PGPORT" -U postgres \
    -D "$WORK/base" -X none -c fast
START_LSN=$(psql_q "select pg_current_wal_lsn()")
while (($(psql_q "select pg_wal_lsn_diff(pg_current_wal_lsn(), '$START_LSN')::bigint") < SEGS * SEG_BYTES)); do
    run_logged "$LOGS/pgbench.log" runuser -u postgres -- "$PGBIN/pgbench" -h "$WORK/sock" -p "$PGPORT" -n -c 4 -j 2 -T 5 postgres
done
LAST=$(psql_q "select pg_walfile_name(pg_switch_wal())")
for ((i = 0; ; i++)); do
    a=$(psql_q "select coalesce(last_archived_wal, '') from pg_stat_archiver")
    [[ $a > $LAST || $a == "$LAST" ]] && break
    ((i < 600)) || die "$LAST not archived after 120 s"
    sleep 0.2
done
as_pg "$PGBIN/pg_ctl" -D "$PRIMARY" -m fast -w -t 120 stop >/dev/null || die "pg_ctl stop (primary) failed"
PRIMARY_UP=0

# ---------------------------------------------------------------- one run
# close_run TOOL SEQ: TOOL walvault|baseline; appends "TOOL DELAY_MS HELD_AT_EXIT HELD_BEFORE"
# to $WORK/runs.tsv.
close_run() {
    local tool=$1 seq=$2 pullclient=$BIN/pullclient
    [[ $tool == baseline ]] && pullclient=$BIN/pullclient-baseline
    local d=$WORK/runs/r$seq
    cp -a "$WORK/base" "$d"
    RUN_PGDATA=$d
    cat >>"$d/postgresql.conf" <<EOF

# prefetch_close_bench.sh: restored copy, run $seq ($tool)
archive_mode = off
restore_command = '$pullclient archive-get %f %p --config $WORK/pull.toml'
recovery_min_apply_delay = '1h'
unix_socket_directories = '$WORK/runs'
EOF
    touch "$d/recovery.signal"
    chown postgres: "$d/recovery.signal" "$d/postgresql.conf"
    as_pg "$PGBIN/pg_ctl" -D "$d" -l "$WORK/runs/r$seq.log" -W start >/dev/null || die "pg_ctl start of $d failed"
    local spool=$d.walvault-spool i held=0
    DAEMON_PID=""
    for ((i = 0; i < 600; i++)); do
        [[ -z $DAEMON_PID && -s $spool/daemon.lock ]] && DAEMON_PID=$(head -1 "$spool/daemon.lock")
        if [[ -n $DAEMON_PID ]]; then
            held=$(find "/proc/$DAEMON_PID/fd" -lname "$d/*" 2>/dev/null | wc -l)
            ((held > 0)) && break
        fi
        sleep 0.1
    done
    ((held > 0)) || { tail -20 "$WORK/runs/r$seq.log" >&2; die "run $seq ($tool): the daemon never held a file under $d"; }
    local postmaster
    postmaster=$(head -1 "$d/postmaster.pid")
    local watch_out=$WORK/runs/r$seq.watch watch_pid
    python3 "$BIN/closewatch.py" "$DAEMON_PID" "$postmaster" "$d" >"$watch_out" 2>&1 &
    watch_pid=$!
    for ((i = 0; i < 200; i++)); do
        grep -q '^ready$' "$watch_out" && break
        kill -0 "$watch_pid" 2>/dev/null || break
        sleep 0.05
    done
    grep -q '^ready$' "$watch_out" || die "run $seq: the watcher did not start: $(cat "$watch_out")"
    as_pg "$PGBIN/pg_ctl" -D "$d" -m fast -w -t 60 stop >/dev/null || die "pg_ctl stop of $d failed"
    RUN_PGDATA=""
    wait "$watch_pid" || die "run $seq ($tool): the watcher failed: $(cat "$watch_out")"
    local result
    result=$(sed -n 2p "$watch_out")
    [[ $result =~ ^[0-9.]+\ [0-9]+$ ]] || die "run $seq ($tool): the watcher said: $(cat "$watch_out")"
    printf '%s\t%s\t%s\n' "$tool" "${result// /$'\t'}" "$held" >>"$WORK/runs.tsv"
    log "  run $seq ($tool): files held before the stop $held; after the exit: ${result#* } held, all closed in ${result%% *} ms"
    cp "$spool/daemon.log" "$LOGS/daemon-r$seq.log" 2>/dev/null || true
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.05; done
    DAEMON_PID=""
    rm -rf -- "$d" "$spool"
}

: >"$WORK/runs.tsv"
TOOLS=(walvault)
[[ -n $BASELINE_PULLCLIENT ]] && TOOLS=(baseline walvault)
seq=0
for ((run = 1; run <= RUNS; run++)); do
    for tool in "${TOOLS[@]}"; do
        seq=$((seq + 1))
        close_run "$tool" "$seq"
    done
done
LOAD_AFTER=$(cut -d" " -f1-3 /proc/loadavg)

REPORT=$(python3 - "$WORK/runs.tsv" <<'EOF'
import sys, statistics
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
out = ["| pullclient | runs | files held before the stop, median | held at the exit, median | postmaster exit -> last close, median ms | max ms | goal < 100 ms |",
       "|---|---:|---:|---:|---:|---:|---|"]
for tool in ("baseline", "walvault"):
    rs = [r for r in rows if r[0] == tool]
    if not rs: continue
    d = [float(r[1]) for r in rs]
    out.append("| %s | %d | %d | %d | **%.1f** | %.1f | %s |" % (
        "this tree" if tool == "walvault" else "baseline (BASELINE_PULLCLIENT)", len(rs),
        statistics.median(int(r[3]) for r in rs), statistics.median(int(r[2]) for r in rs),
        statistics.median(d), max(d), "met" if max(d) < 100 else "NOT met"))
print("\n".join(out))
EOF
) || die "cannot summarize $WORK/runs.tsv"

SECTION=$(cat <<EOF
## Prefetch close benchmark $(date -u '+%Y-%m-%d %H:%M:%S UTC')

Written by \`benches/prefetch_close_bench.sh\`. Goal (issue 10 item 10): the prefetch daemon
closes every file under PGDATA within 100 ms of the postmaster's exit.

- command: \`cd $REPO_ROOT && ${ENV_USED}$INVOCATION\` (as root)
- walvault: commit $GIT_REV, release build${BASELINE_PULLCLIENT:+; baseline: \`$BASELINE_PULLCLIENT\`}
- machine: $(nproc) CPUs, kernel $(uname -r); load average $LOAD_START at the start, $LOAD_AFTER at the end (shared machine)
- $("$PGBIN/postgres" --version); \`pgbench -i -s $SCALE\`, then $SEGS segments of pgbench WAL (full_page_writes = off)
  after \`pg_basebackup -X none -c fast\`
- every run: a fresh copy of the backup, \`restore_command = pullclient archive-get\`, issued
  [prefetch] defaults (fadvise), recovery_min_apply_delay = 1h (replay waits at the first commit,
  the daemon warms the WAL ahead); once the daemon holds files under the copy, \`pg_ctl stop -m fast -w\`.
  Delay: from the postmaster's exit (a pidfd of it turns readable, in a watcher process) to the
  first scan of \`/proc/<daemon>/fd\` with no link under the copy (tight loop)

$REPORT
EOF
)
printf '\n%s\n' "$SECTION"
printf '%s\n' "$SECTION" | results_insert "$RESULTS"
log "added the run to $RESULTS"
