#!/usr/bin/env bash
# ops_bench.sh: what monitoring costs on a large archive (issue 13): the time and size of a
# /metrics scrape, and the time of `archived check`, on an archive of CLUSTERS clusters
# with SEGMENTS segments and BACKUPS backups each. The catalog is synthetic (`archived
# synthesize`, hidden: a real one of 100 x 10 000 segments would take hours of pushes);
# the first cluster's segment objects are in the store, so `archived check --cluster
# c000` lists and stats a whole cluster's WAL, as on a real archive. Goals: scrape under
# 100 ms, check under 1 s. The peer (`pgbackrest info --output=json` on a repository of
# the same number of segments) is not measured by this script (see RESULTS.md).
#
# Environment knobs (defaults in brackets):
#   CLUSTERS [100] SEGMENTS [10000] BACKUPS [50]
#   SCRAPES [20]   scrapes timed (median, max); CHECKS [5] check runs timed
#   SKIP_BUILD [0] CARGO_TARGET_DIR (whose release/ binaries)  BENCH_TMPDIR [/tmp]
#   RESULTS [benches/RESULTS.md]  CMD_TIMEOUT [600]
set -Eeuo pipefail
export LC_ALL=C
CLUSTERS=${CLUSTERS:-100}
SEGMENTS=${SEGMENTS:-10000}
BACKUPS=${BACKUPS:-50}
SCRAPES=${SCRAPES:-20}
CHECKS=${CHECKS:-5}
SKIP_BUILD=${SKIP_BUILD:-0}
CMD_TIMEOUT=${CMD_TIMEOUT:-600}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
RESULTS=${RESULTS:-$SCRIPT_DIR/RESULTS.md}
BUILD_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release
ENV_USED=""
for v in CLUSTERS SEGMENTS BACKUPS SCRAPES CHECKS SKIP_BUILD CARGO_TARGET_DIR BENCH_TMPDIR; do
    if printenv "$v" >/dev/null; then ENV_USED+="$v=$(printf '%q' "$(printenv "$v")") "; fi
done
BENCH_NAME=ops_bench
# shellcheck source=benches/lib.sh
source "$SCRIPT_DIR/lib.sh"

WORK=""
ARCHIVED_PID=""
cleanup() {
    local rc=$?
    set +e
    [[ -n $ARCHIVED_PID ]] && kill "$ARCHIVED_PID" 2>/dev/null && wait "$ARCHIVED_PID" 2>/dev/null
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

| figure | walvault | goal |
|---|---:|---|
| /metrics scrape, first | $FIRST_MS ms | - |
| /metrics scrape, median of $SCRAPES (max) | $MEDIAN_MS ms ($MAX_MS) | < 100 ms |
| scrape size | $BYTES bytes, $SERIES series | - |
| archived check, median of $CHECKS | $CHECK_MED s | < 1 s |

Peer not measured: \`pgbackrest info --output=json\` on a repository of the same number of
segments needs a pgBackRest repository of $((CLUSTERS * SEGMENTS)) archived WAL files,
which this script does not build yet.
"
printf '%s\n' "$SECTION" | results_insert "$RESULTS"
printf '%s\n' "$SECTION"
log "added the run to $RESULTS"
