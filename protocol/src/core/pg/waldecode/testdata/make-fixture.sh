#!/usr/bin/env bash
# Regenerates pg15-1mb.wal.zst and pg15-1mb.waldump: two consecutive 1 MiB WAL segments
# written by PostgreSQL 15, and pg_waldump's reading of them (the oracle the unit tests
# compare against). Needs PostgreSQL 15 (/usr/lib/postgresql/15/bin) and zstd; run as
# root (PostgreSQL runs as the `postgres` user) or as an ordinary user.
#
# The first segment starts right after a pg_switch_wal(), so it holds only what is done
# here: heap inserts with full-page images (with a hole), the same compressed with pglz,
# lz4 and zstd, images for consistency checking only (not applied), visibility-map and
# free-space-map blocks (VACUUM, wal_log_hints), an unlogged table's init fork, a table
# in a non-default tablespace, TRUNCATE, and then a 1.2 MB logical message that spans
# many pages and crosses into the second segment, which ends with a few records and
# zeros (end of WAL).
#
# A new fixture has new LSNs: the golden-byte tests and the LSNs written in ../tests.rs
# (START, the end of WAL, the page after it) must follow.
set -euo pipefail
BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
OUT=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d /tmp/walfixture-XXXXXX)
chmod 755 "$WORK"
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$WORK"
as_pg "$BIN/initdb -D $WORK/data --wal-segsize=1 -A trust --no-sync --no-locale >/dev/null"
cat >>"$WORK/data/postgresql.conf" <<CONF
fsync = off
wal_log_hints = on
wal_keep_size = '1GB'
autovacuum = off
CONF
as_pg "mkdir $WORK/ts"
as_pg "$BIN/pg_ctl -D $WORK/data -o \"-k $WORK -c listen_addresses=''\" -l $WORK/log -w start >/dev/null"
sql() { as_pg "$BIN/psql -h $WORK -d postgres -AtqX -v ON_ERROR_STOP=1 -c \"$1\""; }
sql "CREATE TABLESPACE ts LOCATION '$WORK/ts'"
sql "CREATE TABLE t (a int, b text) WITH (fillfactor = 50)"
sql "CREATE TABLE tts (a int) TABLESPACE ts"
sql "INSERT INTO t SELECT g, repeat('x', 40) FROM generate_series(1, 1000) g"
sql "CHECKPOINT"
sql "SELECT pg_switch_wal()" >/dev/null
START=$(sql "SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
sql "CHECKPOINT"
sql "UPDATE t SET a = a + 1 WHERE a % 200 = 1"
i=10
for m in pglz lz4 zstd; do
  i=$((i + 1))
  sql "CHECKPOINT"
  sql "SET wal_compression = '$m'; UPDATE t SET a = a + 1000 WHERE a % 100 = $i"
done
# The second insert's image is there for consistency checking only (BKPIMAGE_APPLY unset).
sql "SET wal_consistency_checking = 'heap'; INSERT INTO t VALUES (0, 'checked'); INSERT INTO t VALUES (0, 'again')"
sql "INSERT INTO tts SELECT generate_series(1, 100)"
sql "VACUUM t"
sql "CREATE UNLOGGED TABLE u (id int PRIMARY KEY)"
sql "TRUNCATE tts"
sql "SELECT pg_logical_emit_message(false, 'walvault', repeat('y', 1200000))" >/dev/null
sql "INSERT INTO t VALUES (-1, 'after the message')"
END=$(sql "SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
as_pg "$BIN/pg_ctl -D $WORK/data -m immediate -w stop >/dev/null"
echo "segments $START .. $END" >&2
NEXT=$(printf '%08X%08X%08X' 0x${START:0:8} 0x${START:8:8} $((0x${START:16:8} + 1)))
[ "$END" = "$NEXT" ] || { echo "expected the WAL to end in $NEXT, not $END" >&2; exit 1; }
cat "$WORK/data/pg_wal/$START" "$WORK/data/pg_wal/$END" | zstd -19 -q -f -o "$OUT/pg15-1mb.wal.zst"
# pg_waldump's view, without the rmgr-specific description (the message payload alone
# would be 3.6 MB of hex).
as_pg "$BIN/pg_waldump -b -p $WORK/data/pg_wal $START $END" 2>"$WORK/waldump.err" \
  | sed -e 's/, desc: .*$//' >"$OUT/pg15-1mb.waldump" || true
cat "$WORK/waldump.err" >&2
rm -rf "$WORK"
