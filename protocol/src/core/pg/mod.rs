//! PostgreSQL's own formats, read as PostgreSQL writes them.

pub mod backup_manifest;
pub mod basebackup;
pub mod conf;
pub mod control;
pub mod relpath;
pub mod replication;
pub mod tar;
pub mod timeline;
pub mod wal;
pub mod waldecode;
