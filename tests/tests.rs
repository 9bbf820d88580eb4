//! walvault's one integration-test binary: every end-to-end test, linked once.
//!
//! The binaries under test are found in the cargo target directory (build them first:
//! `cargo build --workspace --bins`); PostgreSQL 15 under /usr/lib/postgresql/15/bin.

mod backup_promises;
mod backup_topologies;
mod cli;
mod client;
mod deploy;
mod layout;
mod pg_archive;
mod pg_audit;
mod pg_backup;
mod pg_backup_checks;
mod pg_backup_gc;
mod pg_check;
mod pg_metrics;
mod pg_restore;
mod pg_setup;
mod pg_stream;
mod prefetch;
mod promises;
mod retention_window;
mod s3;
mod server_bounds;
mod store_truth;
mod wal_scale;
mod waldump;
