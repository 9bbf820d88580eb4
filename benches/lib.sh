# benches/lib.sh: what the benchmark scripts share; sourced after they set BENCH_NAME,
# PGBIN, REPO_ROOT and SKIP_BUILD (and, for the helpers that use them, WORK, PGPORT and
# CMD_TIMEOUT, read when a helper is called).

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
    printf '\n%s: FAILED: %s\n' "$BENCH_NAME" "$*" >&2
    exit 1
}

now() { printf '%s' "$EPOCHREALTIME"; }
# elapsed T0 T1 [DECIMALS]: seconds between two now() readings (3 decimals by default).
elapsed() { awk -v a="$1" -v b="$2" -v d="${3:-3}" 'BEGIN { printf "%.*f", d, b - a }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
as_pg() { runuser -u postgres -- "$@"; }
# psql_q SQL: one statement on the benchmark's PostgreSQL (socket $WORK/sock), unaligned.
psql_q() { as_pg "$PGBIN/psql" -X -h "$WORK/sock" -p "$PGPORT" -d postgres -Atqc "$1"; }

# status_kib PID FIELD: a /proc/PID/status field in KiB (VmHWM, VmRSS).
status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
# cpu_secs PID: user + system CPU seconds PID has used so far.
cpu_secs() {
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.1f", ($12 + $13) / hz }' \
        "/proc/$1/stat"
}

# machine_desc DIR: "N CPUs (model), memory, disk of DIR (file system, kind, size), kernel".
machine_desc() {
    local cpu mem src fs dev rot kind size
    cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    mem=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
    src=$(findmnt -no SOURCE -T "$1" 2>/dev/null | head -1)
    fs=$(findmnt -no FSTYPE -T "$1" 2>/dev/null | head -1)
    dev=$(basename "${src%%[*}")
    rot=$(cat "/sys/class/block/$dev/queue/rotational" 2>/dev/null || echo "?")
    case $rot in 0) kind="non-rotational" ;; 1) kind="rotational" ;; *) kind="unknown kind" ;; esac
    size=$(df -h --output=size "$1" | tail -1 | tr -d ' ')
    printf '%s CPUs (%s), %s memory, disk %s (%s, %s, %s), kernel %s' \
        "$(nproc)" "$cpu" "$mem" "$src" "$fs" "$kind" "$size" "$(uname -r)"
}

free_udp_port() {
    python3 -c 'import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# run_logged LOGFILE CMD...: runs CMD under a timeout ($CMD_TIMEOUT), appending its
# stdout+stderr to LOGFILE; on failure prints the exact command and that invocation's
# output, then dies.
run_logged() {
    local logfile=$1
    shift
    local out rc=0
    out=$(timeout "$CMD_TIMEOUT" "$@" 2>&1) || rc=$?
    [[ -n $out ]] && printf '%s\n' "$out" >>"$logfile"
    if ((rc != 0)); then
        printf '\ncommand failed (exit %d): %s\n--- its output ---\n%s\n------------------\n' \
            "$rc" "$(printf '%q ' "$@")" "$out" >&2
        die "see the command above"
    fi
}

# build_rev BINDIR: the commit of the tree whose target/release is BINDIR, with
# " (with uncommitted changes outside benches/)" when that tree has such changes. With
# CARGO_TARGET_DIR pointing at another worktree's target (and SKIP_BUILD=1), a run measures
# and records that tree's binaries: how a before/after comparison runs one script over two
# builds.
build_rev() {
    local tree rev
    # A CARGO_TARGET_DIR outside the checkout is no tree: the script's own checkout is.
    tree=$(cd "$1/../.." 2>/dev/null && pwd)
    git -C "$tree" rev-parse --git-dir >/dev/null 2>&1 || tree=${REPO_ROOT:-$tree}
    rev=$(git -C "$tree" rev-parse --short HEAD 2>/dev/null) || { echo "?"; return 0; }
    if git -C "$tree" status --porcelain --untracked-files=no -- ':!benches' 2>/dev/null | grep -q .; then
        rev+=" (with uncommitted changes outside benches/)"
    fi
    echo "$rev"
}

# need_pg_tools TOOL...: PostgreSQL 15's programs under $PGBIN and its 'postgres' user.
need_pg_tools() {
    local tool
    for tool in "$@"; do
        [[ -x $PGBIN/$tool ]] || die "$PGBIN/$tool missing (install postgresql-15)"
    done
    id postgres >/dev/null 2>&1 || die "no 'postgres' user (install postgresql-15)"
}

# need_commands CMD...: programs on PATH.
need_commands() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || die "$tool not found"
    done
}

# ensure_pgbackrest: installs pgBackRest (Debian) when missing; sets PGBR_VERSION.
ensure_pgbackrest() {
    if ! command -v pgbackrest >/dev/null; then
        log "pgbackrest missing: apt-get install pgbackrest"
        { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y pgbackrest; } >&2 ||
            die "could not install pgbackrest"
    fi
    PGBR_VERSION=$(pgbackrest version)
    [[ $PGBR_VERSION == "pgBackRest 2.45" ]] ||
        log "warning: $PGBR_VERSION installed; the issues' reference figures are for 2.45"
}

# release_build BINDIR: cargo build --release (unless SKIP_BUILD=1), then checks that
# BINDIR holds the three binaries.
release_build() {
    local b
    if [[ $SKIP_BUILD != 1 ]]; then
        command -v cargo >/dev/null || die "cargo not found"
        log "building: cargo build --release --workspace --bins"
        (cd "$REPO_ROOT" && cargo build --release --workspace --bins) >&2 ||
            die "cargo build --release --workspace --bins failed"
    fi
    for b in archived pushclient pullclient; do
        [[ -x $1/$b ]] || die "$1/$b missing (cargo build --release --workspace --bins)"
    done
}

# start_archived DATADIR LOG PUSH_CONFIG: starts `archived serve` (from $BIN) in the
# background, sets ARCHIVED_PID, and waits until `pushclient check --archive-only` with PUSH_CONFIG gets an
# answer (20 s at most); dies with the server's log if it exits first.
start_archived() {
    local dir=$1 logf=$2 push=$3 i
    "$BIN/archived" serve --data-dir "$dir" >>"$logf" 2>&1 &
    ARCHIVED_PID=$!
    for ((i = 0; i < 100; i++)); do
        kill -0 "$ARCHIVED_PID" 2>/dev/null || {
            cat "$logf" >&2
            die "archived serve --data-dir $dir exited at start (log above)"
        }
        if timeout 10 "$BIN/pushclient" --config "$push" check --archive-only >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    timeout 10 "$BIN/pushclient" --config "$push" check --archive-only >&2 || true
    die "archived serve --data-dir $dir did not answer pushclient check within 20 s"
}

# results_insert FILE: reads one run's section (from its "## " heading on) on stdin and puts
# it first among FILE's runs, just below the marker line, so runs stay newest first and the
# current-figures table at the top of the file is left alone (it is kept by hand).
RESULTS_MARKER='<!-- runs below, newest first; benches/lib.sh results_insert adds new ones here -->'
results_insert() {
    local file=$1 section tmp
    section=$(mktemp "${BENCH_TMPDIR:-/tmp}/walvault-section.XXXXXX")
    cat >"$section"
    [[ -f $file ]] || printf '# walvault benchmark results\n\n%s\n' "$RESULTS_MARKER" >"$file"
    grep -qxF -- "$RESULTS_MARKER" "$file" || die "$file has no marker line: $RESULTS_MARKER"
    tmp=$(mktemp "${BENCH_TMPDIR:-/tmp}/walvault-results.XXXXXX")
    awk -v marker="$RESULTS_MARKER" -v section="$section" '
        { print }
        $0 == marker && !done { print ""; while ((getline l < section) > 0) print l; done = 1 }
    ' "$file" >"$tmp"
    mv -- "$tmp" "$file"
    chmod 0644 "$file"
    rm -f -- "$section"
}
