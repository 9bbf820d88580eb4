//! Answers of the admin requests (pure code): what a retention run did.

use serde::{Deserialize, Serialize};

/// What `archived retention run` did (or would do, with `dry_run`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionReport {
    /// True when nothing was deleted.
    pub dry_run: bool,
    /// Per cluster.
    pub clusters: Vec<ClusterRetention>,
}

/// Retention of one cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRetention {
    /// Cluster name.
    pub cluster: String,
    /// Backups kept.
    pub kept_backups: Vec<String>,
    /// Backups expired.
    pub expired_backups: Vec<String>,
    /// WAL files expired.
    pub expired_wal: Vec<String>,
    /// Bytes of those WAL files.
    pub expired_wal_bytes: u64,
    /// Chunks collected (unreferenced and past the grace period).
    pub collected_chunks: u64,
    /// Bytes of those chunks.
    pub collected_chunk_bytes: u64,
    /// Unreferenced chunks still within the grace period.
    pub chunks_in_grace: u64,
    /// Packs deleted (every chunk in them collected).
    #[serde(default)]
    pub collected_packs: u64,
    /// Why nothing or less than the policy asked was expired, for the operator.
    pub notes: Vec<String>,
}
