#!/usr/bin/env bash
# ops_bench.sh: what monitoring costs on a large archive (issue 13): the time and size of a
# /metrics scrape, and the time of `archived check`, on an archive of CLUSTERS clusters
# with SEGMENTS segments and BACKUPS backups each. The catalog is synthetic (`archived
# synthesize`, hidden: a real one of 100 x 10 000 segments would take hours of pushes);
# the first cluster's segment objects are in the store, so `archived check --cluster
# c000` lists and stats a whole cluster's WAL, as on a real archive. Goals: scrape under
# 100 ms, check under 1 s. The peer, run as root (PostgreSQL as postgres makes the
# stanzas): `pgbackrest info --output=json` (what pgbackrest_exporter runs) on a
# repository of CLUSTERS stanzas x SEGMENTS archived WAL files, all stanzas against the
# scrape and one stanza against the check. The peer's WAL files are empty files under
# pgBackRest's names (info reads names, never contents) and its stanzas have no backups
# (backup.info cannot be made without running backups).
#
# Environment knobs (defaults in brackets):
#   CLUSTERS [100] SEGMENTS [10000] BACKUPS [50]
#   SCRAPES [20]   scrapes timed (median, max); CHECKS [5] check runs timed
#   SKIP_BUILD [0] CARGO_TARGET_DIR (whose release/ binaries)  BENCH_TMPDIR [/tmp]
#   RESULTS [benches/RESULTS.md]  CMD_TIMEOUT [600]
#   PEER [1 as root, else 0]  PGBIN [/usr/lib/postgresql/15/bin]  PGPORT [5439]
set -Eeuo pipefail
export LC_ALL=C
CLUSTERS=${CLUSTERS:-100}
SEGMENTS=${SEGMENTS:-10000}
BACKUPS=${BACKUPS:-50}
SCRAPES=${SCRAPES:-20}
CHECKS=${CHECKS:-5}
SKIP_BUILD=${SKIP_BUILD:-0}
if [[ $(id -u) -eq 0 ]]; then PEER=${PEER:-1}; else PEER=${PEER:-0}; fi
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PGPORT=${PGPORT:-5439}
CMD_TIMEOUT=${CMD_TIMEOUT:-600}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
RESULTS=${RESULTS:-$SCRIPT_DIR/RESULTS.md}
BUILD_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release
ENV_USED=""
for v in CLUSTERS SEGMENTS BACKUPS SCRAPES CHECKS SKIP_BUILD CARGO_TARGET_DIR BENCH_TMPDIR PEER; do
    if printenv "$v" >/dev/null; then ENV_USED+="$v=$(printf '%q' "$(printenv "$v")") "; fi
done
BENCH_NAME=ops_bench
# shellcheck source=benches/lib.sh
source "$SCRIPT_DIR/lib.sh"

WORK=""
ARCHIVED_PID=""
PG_STARTED=""
cleanup() {
    local rc=$?
    set +e
    [[ -n $ARCHIVED_PID ]] && kill "$ARCHIVED_PID" 2>/dev/null && wait "$ARCHIVED_PID" 2>/dev/null
    [[ -n $PG_STARTED ]] && as_pg "$PGBIN/pg_ctl" -D "$WORK/pgdata" -m immediate stop >/dev/null 2>&1
    [[ -n $WORK ]] && rm -rf -- "$WORK"
    exit "$rc"
}
trap cleanup EXIT
need_commands python3 promtool awk sort
release_build "$BUILD_BIN"
BIN=$BUILD_BIN
WORK=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/walvault-ops-bench.XXXXXX")
DATA=$WORK/archive
PORT=$(free_udp_port)
run_logged "$WORK/log" "$BIN/archived" init --data-dir "$DATA" --listen "127.0.0.1:$PORT"
sed -i 's/^metrics_listen = .*/metrics_listen = "127.0.0.1:0"/' "$DATA/archived.toml"
log "synthesizing $CLUSTERS clusters x $SEGMENTS segments x $BACKUPS backups"
T0=$(now)
run_logged "$WORK/log" "$BIN/archived" synthesize --data-dir "$DATA" --clusters "$CLUSTERS" --segments "$SEGMENTS" --backups "$BACKUPS"
SYNTH_S=$(elapsed "$T0" "$(now)" 1)
"$BIN/archived" serve --data-dir "$DATA" --metrics-address-file "$WORK/metrics.addr" 2>>"$WORK/archived.log" &
ARCHIVED_PID=$!
for _ in $(seq 300); do [[ -s $WORK/metrics.addr ]] && break; sleep 0.1; done
[[ -s $WORK/metrics.addr ]] || { cat "$WORK/archived.log" >&2; die "archived did not bind its metrics endpoint"; }
ADDR=$(cat "$WORK/metrics.addr")

# Scrapes: the first one reads every cluster's newest segment time from the store (cached
# after), so it is reported on its own.
read -r FIRST_MS MEDIAN_MS MAX_MS BYTES SERIES < <(python3 - "$ADDR" "$SCRAPES" "$WORK/scrape.txt" <<'PY'
import sys, time, urllib.request
addr, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
times = []
for i in range(n + 1):
    t = time.perf_counter()
    body = urllib.request.urlopen("http://" + addr + "/metrics").read()
    times.append((time.perf_counter() - t) * 1000)
open(out, "wb").write(body)
rest = sorted(times[1:])
series = sum(1 for l in body.decode().splitlines() if l and not l.startswith("#"))
print(f"{times[0]:.1f} {rest[len(rest) // 2]:.1f} {rest[-1]:.1f} {len(body)} {series}")
PY
)
promtool check metrics <"$WORK/scrape.txt" >/dev/null 2>&1 || log "warning: promtool check metrics complained about the scrape"
CHECK_TIMES=()
for ((i = 0; i < CHECKS; i++)); do
    T0=$(now)
    "$BIN/archived" check --data-dir "$DATA" --cluster c000 --json >"$WORK/check.json" 2>>"$WORK/log" || true
    CHECK_TIMES+=("$(elapsed "$T0" "$(now)" 3)")
done
CHECK_MED=$(printf '%s\n' "${CHECK_TIMES[@]}" | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
CONTINUITY=$(python3 -c 'import json,sys; c={x["name"]: x for x in json.load(open(sys.argv[1]))}; print(c["wal_continuity"]["status"], "-", c["wal_continuity"]["message"])' "$WORK/check.json")
# ---------------------------------------------------------------- the peer
PEER_ALL="not measured (PEER=0: run as root)"
PEER_ONE="not measured"
PEER_NOTE="Peer not measured: the script makes pgBackRest's stanzas with a PostgreSQL run as
postgres, so it measures the peer only as root (PEER=1)."
if [[ $PEER == 1 ]]; then
    ensure_pgbackrest
    log "pgBackRest repository: $CLUSTERS stanzas x $SEGMENTS WAL files"
    mkdir -p "$WORK/sock" "$WORK/pgbr/repo" "$WORK/pgbr/log" "$WORK/pgbr/lock"
    chown -R postgres: "$WORK"
    as_pg "$PGBIN/initdb" -D "$WORK/pgdata" -U postgres -A trust --no-sync >"$WORK/initdb.log" 2>&1 ||
        { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
    printf "listen_addresses = ''\nunix_socket_directories = '%s'\nport = %s\n" "$WORK/sock" "$PGPORT" >>"$WORK/pgdata/postgresql.conf"
    as_pg "$PGBIN/pg_ctl" -D "$WORK/pgdata" -l "$WORK/pg.log" -w -t 60 start >/dev/null ||
        { cat "$WORK/pg.log" >&2; die "pg_ctl start failed"; }
    PG_STARTED=1
    PGBR_CONF=$WORK/pgbr/pgbackrest.conf
    {
        printf '[global]\nrepo1-path=%s\nlog-path=%s\nlock-path=%s\nlog-level-console=warn\n' \
            "$WORK/pgbr/repo" "$WORK/pgbr/log" "$WORK/pgbr/lock"
        for ((i = 0; i < CLUSTERS; i++)); do
            printf '[s%03d]\npg1-path=%s\npg1-socket-path=%s\npg1-port=%s\n' "$i" "$WORK/pgdata" "$WORK/sock" "$PGPORT"
        done
    } >"$PGBR_CONF"
    chown postgres: "$PGBR_CONF"
    for ((i = 0; i < CLUSTERS; i++)); do
        run_logged "$WORK/pgbr/stanza.log" runuser -u postgres -- pgbackrest --config="$PGBR_CONF" --stanza="$(printf 's%03d' "$i")" stanza-create
    done
    as_pg "$PGBIN/pg_ctl" -D "$WORK/pgdata" -m fast stop >/dev/null
    PG_STARTED=""
    as_pg python3 - "$WORK/pgbr/repo" "$CLUSTERS" "$SEGMENTS" <<'PY'
import hashlib, os, sys
repo, stanzas, segs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for s in range(stanzas):
    base = f"{repo}/archive/s{s:03d}/15-1"
    for n in range(1, segs + 1):
        log, seg = divmod(n, 256)
        d = f"{base}/00000001{log:08X}"
        if seg == 0 or n == 1:
            os.makedirs(d, exist_ok=True)
        name = f"00000001{log:08X}{seg:08X}"
        open(f"{d}/{name}-{hashlib.sha1(name.encode()).hexdigest()}.gz", "wb").close()
PY
    median_of() { # median_of N CMD...: the median wall time of N runs, in seconds
        local n=$1 t0 ts=()
        shift
        for ((j = 0; j < n; j++)); do
            t0=$(now)
            "$@" >"$WORK/pgbr/info.json" 2>>"$WORK/pgbr/info.log" || die "$* failed (see $WORK/pgbr/info.log)"
            ts+=("$(elapsed "$t0" "$(now)" 3)")
        done
        printf '%s\n' "${ts[@]}" | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'
    }
    PEER_ALL_S=$(median_of "$CHECKS" as_pg pgbackrest --config="$PGBR_CONF" info --output=json)
    PEER_MAX=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["archive"][0]["max"])' "$WORK/pgbr/info.json")
    PEER_ONE_S=$(median_of "$CHECKS" as_pg pgbackrest --config="$PGBR_CONF" --stanza=s000 info --output=json)
    PEER_ALL="$(awk -v s="$PEER_ALL_S" 'BEGIN { printf "%.1f ms", s * 1000 }')"
    PEER_ONE="$PEER_ONE_S s"
    PEER_NOTE="Peer: pgBackRest $(pgbackrest version | awk '{ print $2 }'), \`pgbackrest info --output=json\` (as pgbackrest_exporter runs it) over $CLUSTERS stanzas of $SEGMENTS WAL files each (empty files under pgBackRest's names, newest $PEER_MAX; no backups: backup.info cannot be made without running them), median of $CHECKS runs; \`--stanza=s000\` beside \`archived check\`. Its answer is the WAL range and backups only: no archive age, no gap, no failure count."
    log "peer: pgbackrest info, all stanzas $PEER_ALL, one stanza $PEER_ONE"
fi

log "scrape: first $FIRST_MS ms, then median $MEDIAN_MS ms (max $MAX_MS) over $SCRAPES, $BYTES bytes, $SERIES series; check: median $CHECK_MED s (${CHECK_TIMES[*]})"

STAMP=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
SECTION="## Operations benchmark, run $STAMP

Written by \`benches/ops_bench.sh\`. Goals (issue 13): a /metrics scrape under 100 ms and
\`archived check\` under 1 s, on an archive of 100 clusters x 10 000 segments x 50 backups.

- command: \`${ENV_USED}./benches/ops_bench.sh\`
- walvault: commit $(build_rev "$BUILD_BIN"), release build
- machine: $(machine_desc "$WORK"); load average $(cut -d' ' -f1-3 /proc/loadavg) at the end
- archive: $CLUSTERS clusters x $SEGMENTS segments x $BACKUPS backups, synthetic catalog (\`archived synthesize\`, $SYNTH_S s), local store; c000's $SEGMENTS segment objects in the store
- scrape: GET /metrics over loopback from Python (urllib), the first scrape timed on its own (it reads each cluster's newest segment time from the store, cached after), then $SCRAPES timed
- check: \`archived check --cluster c000 --json\` as a command (process start, QUIC + TLS connect, the checks, exit), $CHECKS runs; its wal_continuity said: $CONTINUITY

| figure | walvault | peer | goal |
|---|---:|---:|---|
| /metrics scrape, first | $FIRST_MS ms | - | - |
| /metrics scrape, median of $SCRAPES (max) | $MEDIAN_MS ms ($MAX_MS) | pgbackrest info, all stanzas: $PEER_ALL | < 100 ms |
| scrape size | $BYTES bytes, $SERIES series | - | - |
| archived check, median of $CHECKS | $CHECK_MED s | pgbackrest info --stanza: $PEER_ONE | < 1 s |

$PEER_NOTE
"
printf '%s\n' "$SECTION" | results_insert "$RESULTS"
printf '%s\n' "$SECTION"
log "added the run to $RESULTS"
