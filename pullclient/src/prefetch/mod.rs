//! The prefetch daemon: keeps the segments PostgreSQL will ask for next fetched and
//! verified in the spool, and warms the heap blocks their records touch.
//!
//! Contract: the daemon is an optimization. Nothing it does can make a restore return
//! wrong bytes (archive-get re-verifies every spool hit against the archive's blake3) or
//! fail (archive-get falls back to fetching directly). It never runs inside PGDATA (its
//! working directory is the spool), runs no child processes, closes every file under
//! PGDATA as soon as PostgreSQL is not running, and exits within a second of SIGTERM.
//!
//! What it knows of replay: the last segment archive-get was asked for (PostgreSQL asks
//! for segment N once it has replayed N-1), and, when it can connect through the
//! socket named in `postmaster.pid`, `pg_last_wal_replay_lsn()`.
//!
//! Bounds: at most `spool_max_bytes` of segments ahead of the requested one and
//! `fetch_concurrency` downloads at once. When the archive does not have the next
//! segment yet, it asks again after 1, 2, 4 ... 30 seconds, or at once when PostgreSQL
//! asks for something new: never a busy loop.

mod control;
mod daemon;
mod metrics;

pub(crate) use daemon::run;
